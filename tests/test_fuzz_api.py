"""Schemathesis against our own `/openapi.json`, over a real `payments-api`, with a real key.

The CI run is derandomized (`--generation-deterministic`) and small; the same test is the long run
when the environment asks for more (docs/reliability.md has the command):

    FUZZ_MAX_EXAMPLES=60 FUZZ_SEED=1234 python -m pytest tests/test_fuzz_api.py -k schemathesis

Before the run the merchant gets one of each object, and a schemathesis.toml written next to the
run binds ids, currencies and webhook URLs to real values part of the time, so generated requests
reach the handlers instead of stopping at 404 and 400. Stateful sequences use the links that
schemathesis infers from the document.

Checks: no 5xx; status codes, content types, headers and bodies as documented; a deleted object
stays gone, a created one is retrievable; no operation works without the key; an unsupported
method answers 405 with `Allow`. Findings in the API are not hidden here: the run fails and names
them. The last tests pin, as plain requests, the failures the fuzzer found, so each one has an
exact reproduction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.merchants import NewKey
from tests.apihelpers import Api, assert_problem, created, execute, start_api
from tests.test_request_limits import ApiProcess, serve_api

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "missing_required_header",
    "unsupported_method",
])
CI_MAX_EXAMPLES = 8
CI_MIN_CASES = 300
PUBLIC_URL = "https://93.184.216.34/hook"


def _st() -> str:
    beside_python = Path(sys.executable).parent / "st"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return found


def seed_objects(api: Api) -> dict[str, list[str]]:
    """One of each object, so generated requests have real ids to work on."""
    usd = [api.funded_account(1_000_000)["id"] for _ in range(2)] + [api.account()["id"]]
    eur = [api.funded_account(1_000_000, "EUR")["id"], api.account("EUR")["id"]]
    payments = [api.payment(usd[0], usd[1], 5_000)["id"],
                api.payment(eur[0], eur[1], 700, "EUR")["id"]]
    refund = created(api.refund(payments[0], 100))["id"]
    payout = created(api.payout(usd[1], 100))["id"]
    endpoint = created(api.post("/v1/webhook_endpoints",
                                {"url": PUBLIC_URL, "event_types": ["*"]}))["id"]
    api.payment(usd[0], usd[2], 10)  # events after the endpoint: deliveries to list
    events = [e["id"] for e in api.events()[:5]]
    return {
        "accounts": usd + eur,
        "ids": [*usd, *eur, *payments, refund, payout, endpoint, *events],
    }


def write_config(directory: Path, seeded: dict[str, list[str]]) -> Path:
    def values(items: list[str]) -> str:
        return json.dumps(items)

    text = f"""\
[dictionaries]
ids = {{ values = {values(seeded["ids"])} }}
accounts = {{ values = {values(seeded["accounts"])} }}
currencies = {{ values = ["USD", "EUR", "JPY"] }}
urls = {{ values = ["{PUBLIC_URL}", "https://93.184.216.34/other"] }}
types = {{ values = ["*", "payment.*", "account.created", "payment.succeeded"] }}
days = {{ values = ["2024-02-29", "1970-01-01"] }}

[parameters]
"path.id" = {{ dictionary = "ids", probability = 0.6 }}
"query.starting_after" = {{ dictionary = "ids", probability = 0.3 }}
"query.ending_before" = {{ dictionary = "ids", probability = 0.3 }}
"query.type" = {{ dictionary = "types", probability = 0.5 }}
"query.day" = {{ dictionary = "days", probability = 0.5 }}
"body.account" = {{ dictionary = "accounts", probability = 0.7 }}
"body.source" = {{ dictionary = "accounts", probability = 0.7 }}
"body.destination" = {{ dictionary = "accounts", probability = 0.7 }}
"body.currency" = {{ dictionary = "currencies", probability = 0.8 }}
"body.url" = {{ dictionary = "urls", probability = 0.6 }}
"body.event_types[*]" = {{ dictionary = "types", probability = 0.8 }}
"""
    path = directory / "schemathesis.toml"
    path.write_text(text)
    return path


def run_schemathesis(
    server: ApiProcess, api_key: str, workdir: Path, config: Path
) -> subprocess.CompletedProcess[str]:
    examples = int(os.environ.get("FUZZ_MAX_EXAMPLES", CI_MAX_EXAMPLES))
    seed = os.environ.get("FUZZ_SEED")
    command = [
        _st(), "--config-file", str(config), "--no-color", "run",
        f"{server.url}/openapi.json",
        "--header", f"Authorization: Bearer {api_key}",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--workers", os.environ.get("FUZZ_WORKERS", "1"),
        "--request-timeout", "10",
        "--output-sanitize", "true",
        "--output-truncate", "false",
        *(["--seed", seed] if seed else ["--generation-deterministic"]),
    ]
    if phases := os.environ.get("FUZZ_PHASES"):
        command += ["--phases", phases]
    return subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=1800,
        stdin=subprocess.DEVNULL, env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )


def _report(output: str) -> str:
    """Schemathesis' own report: phases, links covered, every failure with a curl line."""
    return output[-60_000:]


def _unhandled(server: ApiProcess) -> str:
    lines = server.log().splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith("unhandled error on")]
    causes = []
    for i in found:
        exception = re.compile(r"^\w+(\.\w+)*(Error|Exception)")
        cause = next((ln for ln in lines[i + 1:] if exception.match(ln)), "?")
        causes.append(f"{lines[i]} -> {cause}")
    return "\n".join(sorted(set(causes)))


def _operation_count() -> int:
    """Operations in the document (schemathesis leaves out /openapi.json itself)."""
    from api.openapi import document

    methods = ("get", "post", "put", "patch", "delete")
    return sum(m in methods for item in document()["paths"].values() for m in item)


@pytest.fixture
def fuzz_target(
    db_url: str, merchant: NewKey, tmp_path: Path
) -> Iterator[tuple[ApiProcess, Path]]:
    with start_api(db_url, merchant) as api:
        seeded = seed_objects(api)
    config = write_config(tmp_path, seeded)
    with serve_api(db_url) as server:
        yield server, config


def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(
    merchant: NewKey, fuzz_target: tuple[ApiProcess, Path], tmp_path: Path
) -> None:
    server, config = fuzz_target
    started = time.monotonic()
    result = run_schemathesis(server, merchant.api_key, tmp_path, config)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    generated = re.search(r"(\d+) generated", output)
    assert generated, f"schemathesis did not run:\n{output[-3000:]}"
    if "FUZZ_MAX_EXAMPLES" not in os.environ:
        assert int(generated.group(1)) >= CI_MIN_CASES, output[-2000:]
        assert elapsed < 60, f"the CI fuzz run took {elapsed:.0f} s"
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert selected and tested, output[-3000:]
    assert selected.group(1) == selected.group(2) == tested.group(1), "not every operation ran"
    assert int(tested.group(1)) >= _operation_count() - 1, "the document lost operations"
    assert result.returncode == 0, (
        f"schemathesis found problems ({generated.group(1)} cases, {elapsed:.0f} s).\n"
        f"Unhandled errors in the API log:\n{_unhandled(server) or '(none)'}\n\n"
        f"{_report(output)}"
    )


# --- the fuzzer's findings, pinned as plain requests ------------------------------------------


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


@pytest.mark.parametrize("number", ["1e20", "18446744073709551616", "1.7976931348623157e308",
                                    "-9223372036854775809"])
def test_metadata_numbers_that_json_allows_round_trip(api: Api, number: str) -> None:
    """metadata is free JSON. A number accepted on the way in must come back out: the account,
    the list and the events that carry it must answer 200, not 500."""
    raw = ('{"currency": "USD", "metadata": {"n": ' + number + "}}").encode()
    resp = api.post("/v1/accounts", content=raw, headers={"Content-Type": "application/json"})
    if resp.status_code == 400:
        assert_problem(resp, 400, "invalid_request", param="metadata")
        return
    account = created(resp)["id"]
    broken = []
    for path in (f"/v1/accounts/{account}", "/v1/accounts", "/v1/events"):
        got = api.get(path)
        if got.status_code != 200:
            broken.append(f"GET {path}: {got.status_code} {got.text[:120]}")
    assert not broken, f"metadata {{'n': {number}}} was accepted (201) but then:\n" + "\n".join(
        broken)


def test_nul_characters_are_400_not_500(db_url: str, api: Api) -> None:
    """JSON and URLs can carry U+0000; PostgreSQL text and jsonb cannot. Every string that
    reaches the database must be refused as 400 (or found missing, 404), never a 500."""
    source = api.funded_account(1_000)["id"]
    destination = api.account()["id"]
    endpoint = created(api.post("/v1/webhook_endpoints", {"url": PUBLIC_URL, "event_types": ["*"]}))
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/v1/accounts/acct_%00x", None),
        ("GET", "/v1/accounts/acct_%00x/entries", None),
        ("GET", "/v1/payments/pay_%00x", None),
        ("GET", "/v1/events/evt_%00x", None),
        ("GET", "/v1/webhook_endpoints/we_%00x", None),
        ("GET", "/v1/accounts?starting_after=a%00b", None),
        ("GET", "/v1/payments?ending_before=a%00b", None),
        ("POST", "/v1/accounts", {"currency": "USD", "metadata": {"k": "\u0000"}}),
        ("POST", "/v1/accounts", {"currency": "USD", "metadata": {"k\u0000": 1}}),
        ("POST", "/v1/deposits", {"account": source + "\u0000", "amount": 1, "currency": "USD"}),
        ("POST", "/v1/payments", {"source": source, "destination": destination, "amount": 1,
                                  "currency": "USD", "description": "a\u0000b"}),
        ("POST", "/v1/payments", {"source": source, "destination": destination, "amount": 1,
                                  "currency": "USD", "metadata": {"k": "\u0000"}}),
        ("POST", "/v1/payments/pay_%00/refunds", {}),
        ("POST", "/v1/webhook_endpoints",
         {"url": PUBLIC_URL, "event_types": ["*"], "description": "a\u0000"}),
        ("PATCH", f"/v1/webhook_endpoints/{endpoint['id']}", {"description": "a\u0000"}),
    ]
    wrong = []
    for method, path, body in requests:
        content = None if body is None else json.dumps(body)
        resp = api.client.request(method, path, content=content, headers={
            **api.headers(), "Content-Type": "application/json"})
        if resp.status_code not in (400, 404):
            wrong.append(f"{method} {path} {content or ''}: {resp.status_code}")
    assert not wrong, "\n".join(wrong)


def test_recover_reports_how_many_deliveries_it_requeued(db_url: str, api: Api) -> None:
    """POST /v1/webhook_endpoints/{id}/recover answers {requeued: N, out_of_order_subjects: M},
    N >= 0 the number of dead deliveries put back to pending (docs/api.md)."""
    source = api.funded_account(1_000)["id"]
    endpoint = created(api.post("/v1/webhook_endpoints", {"url": PUBLIC_URL, "event_types": ["*"]}))
    path = f"/v1/webhook_endpoints/{endpoint['id']}/recover"
    assert api.post(path, {"since": "2000-01-01T00:00:00Z"}).json() == {
        "requeued": 0, "out_of_order_subjects": 0}
    api.payment(source, api.account()["id"], 1)
    dead = execute(db_url, "UPDATE outbox.deliveries SET status = 'dead', dead_since = now()"
                           " WHERE consumer = %s", (endpoint["id"],))
    assert dead >= 1
    resp = api.post(path, {"since": "2000-01-01T00:00:00Z"})
    assert resp.status_code == 202
    # All dead, nothing delivered after them: nothing out of order.
    assert resp.json() == {"requeued": dead, "out_of_order_subjects": 0}


def test_405_lists_the_allowed_methods(api: Api) -> None:
    """RFC 9110 section 15.5.6: a 405 response must carry Allow."""
    missing = []
    for method, path in (("PUT", "/v1/accounts"), ("DELETE", "/v1/payments"),
                         ("TRACE", "/healthz"), ("PATCH", "/v1/events")):
        resp = api.client.request(method, path, headers=api.headers())
        assert_problem(resp, 405, "method_not_allowed")
        if "allow" not in resp.headers:
            missing.append(f"{method} {path}")
    assert not missing, f"405 without Allow: {missing}"


def test_delete_documents_the_idempotency_statuses_it_answers(api: Api) -> None:
    """DELETE takes an Idempotency-Key like every write, so it can answer 409 and 422; the
    document must list what the API answers."""
    doc = api.client.get("/openapi.json").json()
    endpoint = created(api.post("/v1/webhook_endpoints", {"url": PUBLIC_URL, "event_types": ["*"]}))
    api.post("/v1/accounts", {"currency": "USD"}, idem="shared-key")
    resp = api.client.delete(f"/v1/webhook_endpoints/{endpoint['id']}",
                             headers=api.headers(idem="shared-key"))
    assert_problem(resp, 422, "idempotency_key_reused")
    documented = doc["paths"]["/v1/webhook_endpoints/{id}"]["delete"]["responses"]
    assert {"409", "422"} <= set(documented), (
        f"DELETE answers 409/422 but documents only {sorted(documented)}"
    )


def test_validation_does_not_run_before_authentication(api: Api) -> None:
    """A request without a key is 401 whatever else is wrong with it (the fuzzer's
    missing_required_header check reports 400 instead)."""
    wrong = []
    for method, path, body in (
        ("GET", "/v1/accounts?limit=0", None),
        ("GET", "/v1/events?starting_after=a&ending_before=b", None),
        ("GET", "/v1/reports/daily?day=yesterday", None),
        ("POST", "/v1/payments", {"amount": "ten"}),
        ("POST", "/v1/accounts", {"currency": "usd"}),
        ("PATCH", "/v1/webhook_endpoints/we_x", {"status": "on"}),
    ):
        resp = api.client.request(method, path, json=body)
        if resp.status_code != 401:
            wrong.append(f"{method} {path} {body or ''}: {resp.status_code}")
    assert not wrong, "answered without authenticating first:\n" + "\n".join(wrong)
