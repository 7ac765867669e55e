"""The webhook receiver: answers 204 at once and records when each webhook-id arrived.

Runs as its own process (`python -m bench.receiver --port P`), so its CPU is not the harness's.
It keeps (webhook-id, wall-clock arrival, path) per request and the first few requests whole,
for the signature check; the harness reads them over `GET /_stats`, `GET /_arrivals`,
`GET /_samples` and clears them with `POST /_reset`. Paths under `/hang/` never answer in time:
they hold the request for HANG_SECONDS (an endpoint that hangs past any sender's timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import orjson
from aiohttp import web

_KEEP_SAMPLES = 20
HANG_SECONDS = 600.0


class Receiver:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.times: list[float] = []
        self.paths: list[str] = []
        self.samples: list[dict[str, str]] = []

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        now = time.time()
        path = request.path
        if path.startswith("/_"):
            return self._control(request, path)
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        self.ids.append(webhook_id)
        self.times.append(now)
        self.paths.append(path)
        if path.startswith("/hang/"):
            await asyncio.sleep(HANG_SECONDS)
        elif len(self.samples) < _KEEP_SAMPLES:
            self.samples.append({
                "id": webhook_id,
                "timestamp": request.headers.get("webhook-timestamp", ""),
                "signature": request.headers.get("webhook-signature", ""),
                "body": body.decode(errors="replace"),
            })
        return web.Response(status=204)

    def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        data: dict[str, Any]
        if path == "/_stats":
            data = {
                "count": len(self.ids),
                "unique": len(set(self.ids)),
                "first": self.times[0] if self.times else None,
                "last": self.times[-1] if self.times else None,
            }
        elif path == "/_arrivals":
            data = {"ids": self.ids, "times": self.times, "paths": self.paths}
        elif path == "/_samples":
            data = {"samples": self.samples}
        elif path == "/_reset" and request.method == "POST":
            self.ids, self.times, self.paths, self.samples = [], [], [], []
            data = {"ok": True}
        else:
            return web.Response(status=404)
        return web.Response(body=orjson.dumps(data), content_type="application/json")


def verify(secret: str, sample: dict[str, str]) -> bool:
    """Standard Webhooks: v1,base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))."""
    encoded = secret.removeprefix("whsec_")
    key = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
    signed = f"{sample['id']}.{sample['timestamp']}.{sample['body']}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [part.split(",", 1)[1] for part in sample["signature"].split() if "," in part]
    return any(hmac.compare_digest(expected, sig) for sig in offered)


async def _serve(host: str, port: int) -> None:
    receiver = Receiver()
    server = web.Server(receiver.handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"receiver listening on {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_serve(args.host, args.port))
    except ImportError:
        asyncio.run(_serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
