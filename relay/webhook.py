"""Sending one webhook attempt: Standard Webhooks headers, the URL guard, one aiohttp pool.

Errors are translated here, at the boundary, into an `Attempt`: "no answer" (connection refused,
timeout, refused URL) has no status code; "answered" carries the status. The status line is the
answer: a 2xx is a delivery whatever the headers or the body after it say, and `Retry-After` is
read only on 429 and 503. Nothing raises out of `send` except cancellation.
"""

from __future__ import annotations

import asyncio
import binascii
import time
from contextvars import ContextVar
from typing import Any

import aiohttp

from outbox.claim import Claimed
from outbox.signing import secret_key, sign_all
from outbox.urlguard import GuardedResolver, Target, UrlRefused, check_address, parse_url
from relay.retry import RETRY_AFTER_STATUSES, Attempt, parse_retry_after
from relay.settings import Settings

CONTENT_TYPE = "application/cloudevents+json"
USER_AGENT = "payments-outbox-relay/1"
_READ_LIMIT = 64 * 1024
_REMEMBERED_URLS = 10_000

# The interim-response futures of the attempt running in this task (see _NotingResponse).
_interim: ContextVar[list[asyncio.Future[bool]] | None] = ContextVar("interim", default=None)


class _NotingResponse(aiohttp.ClientResponse):
    """aiohttp skips informational (1xx) responses while it waits for the final one, and marks
    the skip only on a future it keeps for `Expect: 100-continue`. Giving every response such a
    future lets `send` tell "timed out after a 1xx" from "timed out with no answer at all"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        interim = _interim.get()
        if interim is not None and self._continue is None:
            self._continue = asyncio.get_running_loop().create_future()
            interim.append(self._continue)


class WebhookSender:
    """Owns the HTTP client sessions; use as `async with WebhookSender(settings) as sender`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._keys: dict[str, bytes] = {}
        self._targets: dict[str, Target | str] = {}  # a URL's target, or why it is refused

    async def __aenter__(self) -> WebhookSender:
        timeout = aiohttp.ClientTimeout(total=self._settings.http_timeout)
        # One session per URL policy, because the resolver (which checks addresses) is not told
        # the scheme: https may go to public addresses, http only into the allowed networks.
        for plain_http in (False, True):
            connector = aiohttp.TCPConnector(
                limit=self._settings.concurrency,
                limit_per_host=0,
                resolver=GuardedResolver(self._settings.allowed_networks, plain_http=plain_http),
                ttl_dns_cache=10,
            )
            self._sessions[plain_http] = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                # Bodies are read raw and thrown away: ask for none compressed (aiohttp would
                # offer gzip and deflate, and no Accept-Encoding at all means "any").
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                auto_decompress=False,
                response_class=_NotingResponse,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    def _key(self, secret: str) -> bytes:
        key = self._keys.get(secret)
        if key is None:
            key = self._keys[secret] = secret_key(secret)
        return key

    def _target(self, url: str) -> Target:
        """The URL's static checks, remembered per URL (they depend on nothing else)."""
        target = self._targets.get(url)
        if target is None:
            try:
                target = parse_url(url)
                if target.literal is not None:
                    # aiohttp does not ask the resolver about literal addresses.
                    check_address(target.literal, self._settings.allowed_networks,
                                  plain_http=target.plain_http)
            except UrlRefused as exc:
                target = str(exc)
            if len(self._targets) >= _REMEMBERED_URLS:
                self._targets.clear()
            self._targets[url] = target
        if isinstance(target, str):
            raise UrlRefused(target)
        return target

    async def send(self, claimed: Claimed) -> Attempt:
        if claimed.url is None or claimed.secret is None:
            return Attempt(None, "the webhook endpoint no longer exists", 0)
        try:
            target = self._target(claimed.url)
            keys = [self._key(claimed.secret)]
            if claimed.previous_secret is not None and claimed.previous_secret != claimed.secret:
                # A rotation's overlap window: receivers still on the old secret verify too.
                keys.append(self._key(claimed.previous_secret))
        except UrlRefused as exc:
            return Attempt(None, f"URL refused: {exc}", 0)
        except (ValueError, binascii.Error):
            return Attempt(None, "the endpoint's signing secret is malformed", 0)

        body = claimed.event.body()
        timestamp = int(time.time())
        headers = {
            "Content-Type": CONTENT_TYPE,
            "webhook-id": claimed.event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_all(keys, claimed.event.id, timestamp, body),
        }
        session = self._sessions[target.plain_http]
        interim: list[asyncio.Future[bool]] = []
        _interim.set(interim)  # each attempt runs in a task of its own
        started = time.monotonic()
        try:
            async with session.post(
                claimed.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = (parse_retry_after(response.headers.get("Retry-After"))
                               if status in RETRY_AFTER_STATUSES else None)
                try:
                    # Read (a bounded part) so the connection can be reused.
                    await response.content.read(_READ_LIMIT)
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass  # the status line was the answer; a body that breaks off changes nothing
        except UrlRefused as exc:
            return Attempt(None, f"URL refused: {exc}", _ms(started))
        except TimeoutError:
            waited = f"timed out after {self._settings.http_timeout:g} s"
            if any(f.done() for f in interim):
                waited += (" waiting for a final answer: the endpoint sent only an informational"
                           " (1xx) response")
            return Attempt(None, waited, _ms(started), unanswered=True)
        except aiohttp.ClientError as exc:
            refused = _refused(exc)
            if refused is not None:
                return Attempt(None, refused, _ms(started))
            return Attempt(None, _describe(exc), _ms(started), unanswered=True)
        except OSError as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}", _ms(started), unanswered=True)
        latency = _ms(started)
        if 200 <= status < 300:
            return Attempt(status, None, latency)
        if 300 <= status < 400:
            return Attempt(status, f"HTTP {status}: redirects are not followed", latency)
        return Attempt(status, f"HTTP {status}", latency, retry_after)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _refused(exc: aiohttp.ClientError) -> str | None:
    """The guard's refusal at connect time (the resolver's answer was not allowed), if it is one:
    no request went out, so it says nothing about the endpoint's health."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, UrlRefused):
        return f"URL refused: {exc.os_error}"
    return None


def _describe(exc: aiohttp.ClientError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]

