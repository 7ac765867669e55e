"""Request limits: body size (64 KiB, whatever Content-Length claims, chunked or not), the size of
the request head, `limit` bounds on every list route, and slow clients.

Where the HTTP server matters (framing, headers, slow sockets) the tests run `payments-api` as a
subprocess, exactly as deployed, and talk to it over raw sockets; `serve_api` is also used by the
TLS, fuzzing and fault tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger.merchants import NewKey
from tests.apihelpers import Api, assert_problem, created, free_port, snapshot, start_api

MAX_BODY = 64 * 1024


# --- a real server ------------------------------------------------------------------------------


@dataclass
class ApiProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    logfile: Path

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


def _console_script(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e .")
    return found


@contextlib.contextmanager
def serve_api(
    db_url: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    scheme: str = "http",
    verify: Any = False,
) -> Iterator[ApiProcess]:
    """`payments-api` on 127.0.0.1 and a free port, up when /healthz answers; SIGTERM at exit."""
    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="payments-api-"))
    logfile = logdir / "api.log"
    command = [_console_script("payments-api"), "--port", str(port), "--log-level", "warning",
               *args]
    with open(logfile, "wb") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, "DATABASE_URL": db_url, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = ApiProcess(f"{scheme}://127.0.0.1:{port}", port, process, logfile)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"payments-api exited: {running.log()}"
            try:
                if httpx.get(f"{running.url}/healthz", verify=verify, timeout=1).status_code:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"payments-api did not start: {running.log()}"
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(logdir, ignore_errors=True)


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, chunk: int = 65536) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (the heads ask for
    `Connection: close`) or `timeout`. A server that answers early and closes while we are still
    sending is fine: what it sent before the reset is kept."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for i in range(0, len(data), chunk):
                sock.sendall(data[i:i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while part := sock.recv(65536):
                received += part
    return bytes(received)


def read_response(sock: socket.socket) -> bytes:
    """One response (head and Content-Length body) from a socket that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def statuses(raw: bytes) -> list[int]:
    """The status codes of every HTTP response in a raw byte stream."""
    out = []
    for line in raw.split(b"\r\n"):
        if line.startswith(b"HTTP/1.1 ") or line.startswith(b"HTTP/1.0 "):
            out.append(int(line.split()[1]))
    return out


def request_head(method: str, path: str, key: str, extra: Sequence[str] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}",
             "Content-Type: application/json", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def account_body(size: int) -> bytes:
    """A valid POST /v1/accounts body of exactly `size` bytes."""
    # Padded with JSON whitespace: metadata values are limited to 500 characters.
    skeleton = b'{"currency":"USD","metadata":{"pad":"x"}}'
    pad = size - len(skeleton)
    assert pad >= 0
    return skeleton[:-1] + b" " * pad + b"}"


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


@pytest.fixture
def server(db_url: str) -> Iterator[ApiProcess]:
    with serve_api(db_url) as running:
        yield running


# --- body size ----------------------------------------------------------------------------------


def test_a_body_of_exactly_64_kib_is_accepted_and_one_byte_more_is_413(
    db_url: str, api: Api
) -> None:
    json_type = {"Content-Type": "application/json"}
    exact = account_body(MAX_BODY)
    assert len(exact) == MAX_BODY
    created(api.post("/v1/accounts", content=exact, headers=json_type))
    before = snapshot(db_url)
    for path in ("/v1/accounts", "/v1/payments", "/v1/deposits", "/v1/webhook_endpoints"):
        resp = api.post(path, content=account_body(MAX_BODY + 1), headers=json_type)
        assert_problem(resp, 413, "payload_too_large")
        resp = api.post(path, content=b"[" + b"1," * 400_000 + b"1]", headers=json_type)
        assert_problem(resp, 413, "payload_too_large")
        resp = api.post(path, content=b"x" * (MAX_BODY + 1), headers={"Content-Type": "text/plain"})
        assert resp.status_code == 413, "the size is judged before the media type"
    assert snapshot(db_url) == before


def test_over_a_real_socket_a_declared_size_over_the_limit_is_413_at_once(
    db_url: str, merchant: NewKey, server: ApiProcess
) -> None:
    """Content-Length far above the limit: the answer comes before the body is sent, so a client
    cannot make the server wait for (or buffer) a gigabyte."""
    head = request_head("POST", "/v1/accounts", merchant.api_key, ["Content-Length: 1000000000"])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b'{"currency":')
        answer = read_response(sock)
    assert time.monotonic() - started < 3
    assert statuses(answer) == [413], answer[:300]
    assert b"payload_too_large" in answer


def test_a_content_length_smaller_than_the_body_never_5xx_nor_writes(
    db_url: str, merchant: NewKey, server: ApiProcess
) -> None:
    """The server reads what Content-Length says; the rest is the start of a next request, which
    is garbage: 4xx and the connection closed, never a 5xx, never a write of the smuggled part."""
    before = snapshot(db_url)
    smuggled = request_head("POST", "/v1/accounts", merchant.api_key,
                            ["Content-Length: 18"]) + b'{"currency":"USD"}'
    body = b'{"currency":"USD", "metadata": {"pad": "' + b"x" * 100_000 + b'"}}'
    for claimed in (10, len(body) - 1):
        head = request_head("POST", "/v1/accounts", merchant.api_key,
                            [f"Content-Length: {claimed}"])
        answer = raw_exchange(server.port, head + body + smuggled)
        codes = statuses(answer)
        assert codes, f"no answer at all: {server.log()[-2000:]}"
        assert all(400 <= c < 500 for c in codes), (codes, answer[:500])
    assert snapshot(db_url) == before
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize("header", [
    "Content-Length: -1",
    "Content-Length: abc",
    "Content-Length: 1e3",
    "Content-Length: 18, 18000",
    "Content-Length: 18\r\nContent-Length: 17",
    "Content-Length: 18\r\nTransfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: identity",
])
def test_malformed_framing_is_4xx(
    db_url: str, merchant: NewKey, server: ApiProcess, header: str
) -> None:
    before = snapshot(db_url)
    head = request_head("POST", "/v1/accounts", merchant.api_key, [header])
    answer = raw_exchange(server.port, head + b'{"currency":"USD"}')
    codes = statuses(answer)
    # Closing without an answer is acceptable for unparseable framing; a 2xx or 5xx is not.
    assert all(400 <= c < 500 for c in codes), (header, codes, answer[:400])
    assert snapshot(db_url) == before
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def _chunked(body: bytes, size: int) -> bytes:
    out = bytearray()
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def test_chunked_bodies_are_held_to_the_same_limit(
    db_url: str, merchant: NewKey, server: ApiProcess
) -> None:
    head = request_head("POST", "/v1/accounts", merchant.api_key, ["Transfer-Encoding: chunked"])
    small = raw_exchange(server.port, head + _chunked(account_body(1000), 100))
    assert statuses(small) == [201], small[:400]
    before = snapshot(db_url)
    big = raw_exchange(server.port, head + _chunked(account_body(MAX_BODY + 1), 8192))
    assert statuses(big) == [413], big[:400]
    assert b"payload_too_large" in big
    # One chunk that announces 4 GiB: refused once 64 KiB have arrived, not after 4 GiB.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(head + b"ffffffff\r\n" + b"x" * (MAX_BODY + 4096))
        answer = read_response(sock)
    assert statuses(answer) == [413], answer[:400]
    assert time.monotonic() - started < 3
    assert snapshot(db_url) == before


# --- the request head ---------------------------------------------------------------------------


def test_a_huge_request_head_is_refused_with_4xx(merchant: NewKey, server: ApiProcess) -> None:
    """A megabyte of headers (one huge header, ten thousand small ones, a huge URL) is a memory
    attack, not a request: it must be refused with a 4xx (400/413/414/431), never served, never a
    5xx. An ordinary 8 KiB header still works (the control)."""
    ordinary = request_head("GET", "/v1/accounts", merchant.api_key, ["X-Trace: " + "a" * 8192])
    assert statuses(raw_exchange(server.port, ordinary)) == [200]
    heads = {
        "one 1 MiB header": request_head("GET", "/v1/accounts", merchant.api_key,
                                         ["X-Junk: " + "a" * (1 << 20)]),
        "10,000 headers": request_head("GET", "/v1/accounts", merchant.api_key,
                                       [f"X-Junk-{i}: {'a' * 100}" for i in range(10_000)]),
        "a 1 MiB URL": request_head("GET", "/v1/accounts?x=" + "a" * (1 << 20),
                                    merchant.api_key),
        "a 1 MiB Authorization": request_head("GET", "/v1/accounts", "sk_" + "a" * (1 << 20)),
    }
    answers = {what: statuses(raw_exchange(server.port, head)) for what, head in heads.items()}
    served = {what: codes for what, codes in answers.items()
              if not codes or not all(400 <= c < 500 for c in codes)}
    assert not served, f"not refused with a 4xx: {served}"
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# --- list bounds --------------------------------------------------------------------------------

BAD_LIMITS = ["0", "101", "-1", "abc", "", "1.5", "1e2", " 5", "5 ", "+5", "0x10", "10**2",
              "99999999999999999999999", "²", "٣", "５", "\x00", "5%00"]


def test_limit_bounds_on_every_list_route(api: Api) -> None:
    """Every operation of the OpenAPI document that takes `limit`: 1 and 100 work, everything
    else is 400 naming `limit`."""
    account = api.funded_account(100)["id"]
    endpoint = created(api.post("/v1/webhook_endpoints",
                                {"url": "https://93.184.216.34/hook", "event_types": ["*"]}))
    doc = api.client.get("/openapi.json").json()
    listed = []
    wrong = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            names = [p["name"] for p in op.get("parameters", []) if p.get("in") == "query"]
            if "limit" not in names:
                continue
            concrete = path.replace("{id}", account if "accounts" in path else endpoint["id"])
            listed.append(concrete)
            for good in ("1", "100", "007"):
                resp = api.get(concrete, {"limit": good})
                assert resp.status_code == 200, (concrete, good, resp.text)
            for bad in BAD_LIMITS:
                resp = api.get(concrete, {"limit": bad})
                if resp.status_code != 400:
                    wrong.append(f"{method.upper()} {path}?limit={bad!r}: {resp.status_code}"
                                 f" {resp.text[:100]}")
                    continue
                assert_problem(resp, 400, "invalid_request", param="limit")
    assert len(listed) >= 6, listed
    assert not wrong, "\n".join(wrong)


# --- slow clients -------------------------------------------------------------------------------


def test_slow_clients_do_not_hold_up_the_others(merchant: NewKey, server: ApiProcess) -> None:
    """Fifty connections dribble a request head (and one a body) a byte at a time; meanwhile
    ordinary requests are answered promptly. Bounded: about four seconds."""
    stop = threading.Event()
    head = request_head("POST", "/v1/accounts", merchant.api_key, ["Content-Length: 18"])
    sockets: list[socket.socket] = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sockets.append(sock)

    def dribble() -> None:
        position = 0
        while not stop.is_set() and position < len(head) - 4:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.sendall(head[position:position + 1])
            position += 1
            stop.wait(0.05)

    slow_body = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    slow_body.sendall(head)
    slow_body.sendall(b'{"cur')
    worker = threading.Thread(target=dribble, daemon=True)
    worker.start()
    try:
        latencies = []
        with httpx.Client(base_url=server.url, timeout=5,
                          headers={"Authorization": f"Bearer {merchant.api_key}"}) as client:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                started = time.monotonic()
                resp = client.get("/v1/accounts")
                latencies.append(time.monotonic() - started)
                assert resp.status_code == 200, resp.text
                time.sleep(0.05)
        assert len(latencies) >= 10
        assert max(latencies) < 1.0, f"an ordinary request waited {max(latencies):.2f} s"
        # The slow body, finished at last, is still served correctly.
        slow_body.sendall(b'rency":"USD"}')
        assert statuses(read_response(slow_body)) == [201]
    finally:
        stop.set()
        worker.join(5)
        for sock in [*sockets, slow_body]:
            sock.close()
