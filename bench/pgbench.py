"""The baseline for the API: `pgbench` running the payment transaction's own SQL.

The script is generated from the product's statement constants (`ledger.service._LOCK_ACCOUNTS`,
`_RECENT_PAYMENTS`, `_MOVE`, `_INSERT_PAYMENT`, `outbox.publish._HOLD_CONSUMERS` and
`_PUBLISH`), verbatim, with each
psycopg placeholder bound to a pgbench expression. When the product's SQL changes, the baseline
changes with it; when a statement's parameters change, `bind` fails loudly instead of drifting.

What the client computes in Python is computed in SQL here: ids (time-ordered, like
`ledger.ids.new_id`, so the indexes see the same right-edge inserts), the balances after the move
(read in the same statement's snapshot, which is the locked balance), the event payloads. The
accounts are `PGBENCH_ACCOUNTS` rows seeded with ids computable from a number, so a random pair is
drawn without a lookup. What pgbench does not run is what the API adds on top: authentication, the
idempotency key (reserve and record) and the savepoint around the handler; that is the cost the
ratio shows.

Two shapes: `pipelined` (round trips as the product's payment writes: BEGIN + locks + risk count,
then the writes + COMMIT) and `plain` (one round trip per statement).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Child
from ledger import service
from outbox import publish

ACCOUNT_PREFIX = "acct_pgbench"  # + 19 digits = the 26 characters of a real id body
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")

# pgbench expressions for the values the product binds.
_SRC = f"('{ACCOUNT_PREFIX}' || lpad(:s::text, 19, '0'))"
_DST = f"('{ACCOUNT_PREFIX}' || lpad(:d::text, 19, '0'))"
_STAMP = "lpad((extract(epoch FROM now()) * 1000000)::bigint::text, 16, '0')"
_PAY = f"('pay_' || {_STAMP} || lpad(:r::text, 10, '0'))"
_AMT = "(:amount::bigint)"
_MER = "(:merchant::text)"


def _id(prefix: str, tag: str) -> str:
    # 16 time digits + 9 random digits + a tag = 26 characters, time-ordered like new_id().
    return f"('{prefix}_' || {_STAMP} || lpad(:r::text, 10, '0')::char(9) || '{tag}')"


def bind(sql: str, positional: list[str] | None = None, named: dict[str, str] | None = None) -> str:
    """Replace psycopg placeholders with SQL expressions; every one must be used exactly."""
    values = list(positional or [])
    names = dict(named or {})
    used: set[str] = set()

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        if match.group(1) is not None:
            used.add(match.group(1))
            return names[match.group(1)]
        if not values:
            raise ValueError("the product's statement has more %s placeholders than expected")
        return values.pop(0)

    out = _PLACEHOLDER.sub(sub, sql)
    if values:
        raise ValueError(f"the product's statement has {len(values)} fewer placeholders")
    if set(names) - used:
        raise ValueError(f"unused named parameters: {sorted(set(names) - used)}")
    return out.strip()


def _payment_json() -> str:
    return (
        f"jsonb_build_object('id', {_PAY}, 'object', 'payment', 'source', {_SRC},"
        f" 'destination', {_DST}, 'amount', {_AMT}, 'amount_refunded', 0, 'currency', 'USD',"
        " 'status', 'succeeded', 'failure_code', NULL, 'description', NULL,"
        " 'metadata', '{}'::jsonb,"
        # No ':' in literals: pgbench would take ':MI' for a variable.
        " 'created_at', now() AT TIME ZONE 'UTC')"
    )


def _balance_json(account: str, sign: str) -> str:
    return (
        f"jsonb_build_object('account', {account}, 'currency', 'USD', 'delta', {sign}{_AMT},"
        f" 'balance', (SELECT balance FROM accounts WHERE id = {account}),"
        f" 'cause', jsonb_build_object('object', 'payment', 'id', {_PAY}))"
    )


def statements() -> list[str]:
    """The payment transaction's statements, in the product's order, bound for pgbench."""
    lock = bind(
        service._LOCK_ACCOUNTS,
        named={
            "merchant": _MER,
            "ids": f"ARRAY[{_SRC}, {_DST}]",
            "kind": "''",  # a payment asks for no system account
            "currency": "'USD'",
        },
    )
    recent = bind(service._RECENT_PAYMENTS, [_SRC])
    move = bind(
        service._MOVE,
        [
            f"ARRAY[{_SRC}, {_DST}]",
            f"ARRAY[-{_AMT}, {_AMT}]",
            "'USD'",
            _PAY,
            "now()",
            f"ARRAY[{_id('ent', 'a')}, {_id('ent', 'b')}]",
            f"ARRAY[{_SRC}, {_DST}]",
            f"ARRAY[-{_AMT}, {_AMT}]",
            # The statement's snapshot still holds the locked balances, as the client's copy does.
            f"ARRAY[(SELECT balance FROM accounts WHERE id = {_SRC}) - {_AMT},"
            f" (SELECT balance FROM accounts WHERE id = {_DST}) + {_AMT}]",
        ],
    )
    insert = bind(
        service._INSERT_PAYMENT,
        [_PAY, _MER, _SRC, _DST, _AMT, "'USD'", "'succeeded'", "NULL", "NULL",
         "'{}'::jsonb", "now()"],
    )
    events = bind(
        publish._PUBLISH,
        [
            f"ARRAY[{_id('evt', 'a')}, {_id('evt', 'b')}, {_id('evt', 'c')}]",
            f"ARRAY[{_MER}, {_MER}, {_MER}]",
            "ARRAY['payment.succeeded', 'account.balance_changed', 'account.balance_changed']",
            f"ARRAY[{_PAY}, {_SRC}, {_DST}]",
            # After the move: the balance events carry the new balances, as the product's do.
            f"ARRAY[{_payment_json()}, {_balance_json(_SRC, '-')}, {_balance_json(_DST, '')}]",
            "ARRAY[0, 1, 2]",
            "now()",
        ],
    )
    hold = bind(publish._HOLD_CONSUMERS, [f"ARRAY[{_MER}]"])
    return [lock, recent, move, insert, hold, events]


def api_statements() -> tuple[str, str, str]:
    """What the API adds around the payment: authentication, the idempotency key reserved and
    recorded (api/auth.py, api/idempotency.py), bound like the rest."""
    from api import auth, idempotency

    key = "('k' || :r::text || '_' || :client_id::text)"
    lookup = bind(auth._LOOKUP, ["decode(:keyhash::text, 'hex')"])
    begin = bind(idempotency._BEGIN, named={
        "lock": f"({_MER} || ':' || {key})", "merchant": _MER, "key": key})
    finish = bind(idempotency._FINISH, [
        _MER, key, "'POST /v1/payments'", "sha256(convert_to(" + key + ", 'UTF8'))", "201",
        f"convert_to({_payment_json()}::text, 'UTF8')"])
    return lookup, begin, finish


def script(naccounts: int, pipelined: bool, with_api: bool = False) -> str:
    lock, recent, move, insert, hold, events = statements()
    head = [
        f"\\set s random(1, {naccounts})",
        f"\\set d 1 + (:s + random(0, {naccounts - 2})) % {naccounts}",
        "\\set amount random(1, 100)",
        "\\set r random(0, 9999999999)",
    ]
    if with_api:
        # The API's round trips (api/uow.py): BEGIN + auth; reserve the key; SAVEPOINT + locks;
        # the writes + RELEASE + record the key + COMMIT.
        lookup, begin, finish = api_statements()
        body = ["\\startpipeline", "BEGIN;", f"{lookup};", "\\endpipeline",
                f"{begin};",
                "\\startpipeline", "SAVEPOINT s;", f"{lock};", f"{recent};", "\\endpipeline",
                "\\startpipeline", f"{move};", f"{insert};", f"{hold};", f"{events};",
                "RELEASE SAVEPOINT s;",
                f"{finish};", "COMMIT;", "\\endpipeline"]
    elif pipelined:
        body = ["\\startpipeline", "BEGIN;", f"{lock};", f"{recent};", "\\endpipeline",
                "\\startpipeline", f"{move};", f"{insert};", f"{hold};", f"{events};", "COMMIT;",
                "\\endpipeline"]
    else:
        body = ["BEGIN;", f"{lock};", f"{recent};", f"{move};", f"{insert};", f"{hold};",
                f"{events};", "COMMIT;"]
    # pgbench reads one command per line unless it ends with ';': join each statement's lines.
    return "\n".join(head + [" ".join(line.split()) for line in body]) + "\n"


SEED_SQL = f"""
INSERT INTO accounts (id, merchant_id, currency, kind, balance)
SELECT '{ACCOUNT_PREFIX}' || lpad(n::text, 19, '0'), %(merchant)s, 'USD', 'customer',
       1000000000000
FROM generate_series(1, %(n)s) AS n
ON CONFLICT (id) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    p50_ms: float
    p99_ms: float
    clients: int
    seconds: float
    pipelined: bool
    with_api: bool


def available() -> bool:
    return shutil.which("pgbench") is not None


def run(
    dbname: str,
    merchant: str,
    naccounts: int,
    clients: int,
    seconds: float,
    pipelined: bool,
    threads: int = 2,
    with_api: bool = False,
    keyhash: str = "",
) -> PgbenchResult:
    """Run the script for `seconds` with `clients` connections; latencies from pgbench's log."""
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        path = Path(tmp) / "payment.sql"
        path.write_text(script(naccounts, pipelined, with_api))
        argv = [
            "pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads),
            "-T", str(max(1, round(seconds))), "-D", f"merchant={merchant}",
            "-D", f"keyhash={keyhash or '00'}",
            "--max-tries=10", "-l", "--log-prefix", str(Path(tmp) / "log"),
            "-f", str(path), dbname,
        ]
        # A registered child, so an interrupted run stops it instead of waiting for -T.
        child = Child("pgbench", argv, None, Path(tmp))
        try:
            code = child.proc.wait(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            code = -1
        child.stop()
        out = child.log_path.read_text() if child.log_path else ""
        if code != 0:
            raise RuntimeError(f"pgbench failed ({code}):\n{out[-3000:]}")
        latencies: list[float] = []
        for log in Path(tmp).glob("log*"):
            for line in log.read_text().splitlines():
                parts = line.split()
                # client_id transaction_no time script_no time_epoch time_us [...]
                if len(parts) >= 3 and parts[2].isdigit():
                    latencies.append(int(parts[2]) / 1000.0)
    tps = float(_grab(r"tps = ([\d.]+) \(without initial connection time\)", out))
    done = int(_grab(r"number of transactions actually processed: (\d+)", out))
    failed_text = re.search(r"number of failed transactions: (\d+)", out)
    latencies.sort()
    return PgbenchResult(
        tps=tps,
        transactions=done,
        failed=int(failed_text.group(1)) if failed_text else 0,
        p50_ms=_pct(latencies, 50),
        p99_ms=_pct(latencies, 99),
        clients=clients,
        seconds=seconds,
        pipelined=pipelined,
        with_api=with_api,
    )


def _grab(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"unexpected pgbench output (no {pattern!r}):\n{text[-2000:]}")
    return match.group(1)


def _pct(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]
