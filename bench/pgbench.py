"""The baseline for the API: `pgbench` running the payment's own SQL transaction.

`POST /v1/payments` is one statement, `SELECT … FROM api_create_payment(…)`
(`api.routes_ledger._CREATE_PAYMENT`): authentication, the idempotency key, the ledger writes, the
payment row, the events and their delivery rows, the rendered response stored with the key. The
scripts are generated from the product's statement constants, verbatim, with each psycopg
placeholder bound to a pgbench expression; when a statement's parameters change, `bind` fails
loudly instead of drifting.

Two shapes:
- `same_txn`: the API's statement itself, with a fresh idempotency key per transaction: the
  request's whole database work without HTTP and Python. This is the issue's baseline.
- `ledger_only`: `ledger.service.CREATE_PAYMENT` (`ledger_create_payment`): the ledger writes,
  the payment row, the events and their deliveries, without authentication or idempotency.

What the client computes in Python is computed in SQL here: ids (time-ordered, like
`ledger.ids.new_id`, so the indexes see the same right-edge inserts) and the request hash. The
accounts are `PGBENCH_ACCOUNTS` rows seeded with ids computable from a number, so a random pair is
drawn without a lookup.
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


def statement(shape: str) -> str:
    """The payment's statement for `shape`, bound for pgbench."""
    from api import routes_ledger

    entries = f"ARRAY[{_id('ent', 'a')}, {_id('ent', 'b')}]"
    events = f"ARRAY[{_id('evt', 'a')}, {_id('evt', 'b')}, {_id('evt', 'c')}]"
    if shape == "same_txn":
        key = f"('k' || {_STAMP} || :r::text || '_' || :client_id::text)"
        return bind(routes_ledger._CREATE_PAYMENT, [
            "decode(:keyhash::text, 'hex')", key, "'POST /v1/payments'",
            f"sha256(convert_to({key}, 'UTF8'))",
            _SRC, _DST, _AMT, "'USD'", "NULL", "'{}'", _PAY, entries, events,
        ])
    if shape == "ledger_only":
        limits = service.Merchant("")
        return bind(service.CREATE_PAYMENT, [
            _MER, str(limits.risk_max_amount), str(limits.risk_max_payments_per_minute),
            _SRC, _DST, _AMT, "'USD'", "NULL", "'{}'::jsonb", _PAY, entries, events,
        ])
    raise ValueError(f"unknown shape {shape!r}")


SHAPES = ("same_txn", "ledger_only")


def script(naccounts: int, shape: str) -> str:
    head = [
        f"\\set s random(1, {naccounts})",
        f"\\set d 1 + (:s + random(0, {naccounts - 2})) % {naccounts}",
        "\\set amount random(1, 100)",
        "\\set r random(0, 9999999999)",
    ]
    # pgbench reads one command per line unless it ends with ';': one line for the statement.
    return "\n".join([*head, " ".join(statement(shape).split()) + ";"]) + "\n"


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
    shape: str


def available() -> bool:
    return shutil.which("pgbench") is not None


def run(
    dbname: str,
    merchant: str,
    naccounts: int,
    clients: int,
    seconds: float,
    shape: str,
    keyhash: str,
    threads: int = 2,
) -> PgbenchResult:
    """Run the script for `seconds` with `clients` connections; latencies from pgbench's log."""
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        path = Path(tmp) / "payment.sql"
        path.write_text(script(naccounts, shape))
        argv = [
            "pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads),
            "-T", str(max(1, round(seconds))), "-D", f"merchant={merchant}",
            "-D", f"keyhash={keyhash}",
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
        shape=shape,
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
