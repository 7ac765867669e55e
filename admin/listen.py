"""`paymentsctl listen`: receive this service's webhooks on this machine, verify and print them,
the way `stripe listen` does.

It runs an HTTP server on 127.0.0.1 and registers a temporary webhook endpoint pointing at it for
the merchant of an API key, through the API (`POST /v1/webhook_endpoints`): the API's own rules
for endpoints apply, and the relay delivers there as anywhere else. Each request is verified with
the endpoint's secret (outbox.signing.verify) and its event printed on stdout: one line for
people, or the body as one JSON line with `--json`. With `--forward-to URL` each verified request
is also POSTed there with the same body and `webhook-*` headers, and that answer is the relay's
answer (so a failing app sees retries). On SIGINT or SIGTERM the endpoint is deleted through the
API (`DELETE /v1/webhook_endpoints/{id}`) and the command exits 0.

The relay sends `http://` only into OUTBOX_WEBHOOK_ALLOWED_NETWORKS, and the API registers such
a URL only under the same rule: both must allow loopback (deploy/run-local sets 127.0.0.0/8).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from outbox.signing import SignatureRefused, secret_key, verify

HOST = "127.0.0.1"
API_TIMEOUT = 10.0
FORWARD_TIMEOUT = 10.0
MAX_BODY = 1024 * 1024
_FORWARDED_HEADERS = ("content-type", "webhook-id", "webhook-timestamp", "webhook-signature")
LOOPBACK_HINT = (
    "the API and the relay send and accept http:// webhook URLs only inside "
    "OUTBOX_WEBHOOK_ALLOWED_NETWORKS: set it to 127.0.0.0/8 for both (deploy/run-local does)"
)


class ListenError(Exception):
    """A failure with a message fit for the operator (paymentsctl exits 1)."""


@dataclass
class Listener:
    api: str
    api_key: str
    event_types: Sequence[str]
    forward_to: str | None = None
    port: int = 0
    as_json: bool = False
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    endpoint_id: str | None = None
    _key: bytes = b""
    _seen: set[str] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    async def run(self) -> int:
        """Serve until SIGINT or SIGTERM, then delete the endpoint. Returns the exit status."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/{tail:.*}", self._receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        timeout = aiohttp.ClientTimeout(total=API_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    listening.bind((HOST, self.port))
                except OSError as exc:
                    listening.close()
                    raise ListenError(f"cannot listen on {HOST}:{self.port}: {exc}") from None
                port = listening.getsockname()[1]
                await web.SockSite(runner, listening).start()
                endpoint = await self._register(f"http://{HOST}:{port}/")
                self._note(
                    f"Ready: webhook endpoint {endpoint['id']} receives "
                    f"{', '.join(self.event_types)} at http://{HOST}:{port}/ (signing secret "
                    f"{endpoint['secret']}). Ctrl-C stops and removes it."
                )
                await stop.wait()
            finally:
                await runner.cleanup()
                if self.endpoint_id is not None:
                    await self._unregister()
        return 0

    # --- the API --------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self._session is not None
        try:
            async with self._session.request(
                method, self.api.rstrip("/") + path, json=body,
                headers={"Authorization": f"Bearer {self.api_key}"},
            ) as resp:
                text = await resp.text()
                try:
                    return resp.status, json.loads(text) if text else None
                except ValueError:
                    return resp.status, {"detail": text[:200]}
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ListenError(f"cannot reach the API at {self.api}: {_describe(exc)}") from None

    async def _register(self, url: str) -> dict[str, Any]:
        body = {
            "url": url,
            "event_types": list(self.event_types),
            "description": f"paymentsctl listen on {socket.gethostname()}:{os.getpid()}",
        }
        status, answer = await self._call("POST", "/v1/webhook_endpoints", body)
        if status == 201:
            self.endpoint_id = answer["id"]
            self._key = secret_key(answer["secret"])
            return dict(answer)
        detail = _problem(answer)
        if status == 401:
            raise ListenError(f"the API refused the API key: {detail}")
        if status == 400 and isinstance(answer, dict) and answer.get("param") == "url":
            raise ListenError(f"the API refused {url}: {detail}; {LOOPBACK_HINT}")
        if status == 400 and isinstance(answer, dict) and answer.get("param") == "event_types":
            raise ListenError(f"bad --events: {detail}")
        raise ListenError(f"the API answered {status} to registering the endpoint: {detail}")

    async def _unregister(self) -> None:
        path = f"/v1/webhook_endpoints/{self.endpoint_id}"
        try:
            status, answer = await self._call("DELETE", path)
        except ListenError as exc:
            raise ListenError(f"could not remove endpoint {self.endpoint_id} ({exc}); "
                              f"remove it with DELETE {path}") from None
        if status not in (204, 404):
            raise ListenError(f"could not remove endpoint {self.endpoint_id}: {status} "
                              f"{_problem(answer)}; remove it with DELETE {path}")
        self._note(f"Removed webhook endpoint {self.endpoint_id}.")

    # --- receiving ------------------------------------------------------------------------------

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            verify(self._key, headers, body)
            event = json.loads(body)
            if not isinstance(event, dict):
                raise ValueError("the body is not a JSON object")
        except (SignatureRefused, ValueError) as exc:
            self._note(f"refused a request (webhook-id {headers.get('webhook-id')!r}): {exc}")
            return web.Response(status=400, text=f"{exc}\n")
        status = 204
        if self.forward_to is not None:
            status = await self._forward(body, headers)
        again = event.get("id") in self._seen
        self._seen.add(str(event.get("id")))
        self._print(event, body, status, again)
        return web.Response(status=status)

    async def _forward(self, body: bytes, headers: dict[str, str]) -> int:
        assert self._session is not None and self.forward_to is not None
        try:
            async with self._session.post(
                self.forward_to, data=body, allow_redirects=False,
                headers={k: headers[k] for k in _FORWARDED_HEADERS if k in headers},
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT),
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._note(f"could not forward to {self.forward_to}: {_describe(exc)}")
            return 502

    def _print(self, event: dict[str, Any], body: bytes, status: int, again: bool) -> None:
        if self.as_json:
            line = body.decode()
        else:
            line = (f"{event.get('time')}  {event.get('type', ''):<24} {event.get('id')}  "
                    f"{event.get('subject')} (sequence {_number(event.get('sequence'))})")
            if self.forward_to is not None:
                line += f"  -> {status}"
            if again:
                line += "  (again)"
        self.out.write(line + "\n")
        self.out.flush()

    def _note(self, text: str) -> None:
        self.err.write(f"paymentsctl listen: {text}\n")
        self.err.flush()


def _number(sequence: Any) -> Any:
    try:
        return int(sequence)
    except (TypeError, ValueError):
        return sequence


def _problem(answer: Any) -> str:
    if isinstance(answer, dict):
        return str(answer.get("detail") or answer.get("title") or answer)
    return str(answer)


def _describe(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
