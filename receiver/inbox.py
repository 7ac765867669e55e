"""The receiver's front door, free of any web framework: `Inbox.receive(body, headers)` for each
webhook request, and `Inbox.running()` around the process's life for catching up.

    pool = AsyncConnectionPool("postgresql:///shop", open=False)
    inbox = Inbox(pool, ["whsec_…"], apply, events=EventsApi("https://payments…", "sk_…"))
    async with pool, inbox.running():
        outcome = await inbox.receive(body, headers)   # BadSignature → 401, BadEvent → 400

`receive` verifies the signature, parses the event and admits it (receiver/admit.py) in one
transaction on a connection of `pool`; an exception from the handler propagates (answer 5xx,
and the sender retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from receiver.admit import Handler, Handlers, Outcome, admit
from receiver.backfill import EventsSource
from receiver.catchup import CatchUp
from receiver.errors import BadEvent
from receiver.event import parse_event
from receiver.signature import SignatureVerifier


class Inbox:
    """Exactly-once, in-order application of our webhooks to the receiver's database.

    `handler` applies an event; `late_handler`, if given, is called instead for an event whose
    subject has already moved past it (docs/receiver.md, Late events); without one such an event
    is only recorded. `events` fills gaps from the sender's events API; without it, held events
    wait for the missing ones to be delivered."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        secrets: Sequence[str],
        handler: Handler,
        *,
        late_handler: Handler | None = None,
        events: EventsSource | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self._verifier = SignatureVerifier(secrets)
        self._handlers = Handlers(handler, late_handler)
        self._events = events
        self.catch_up = CatchUp(pool, self._handlers, events, poll_interval=poll_interval)

    async def receive(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        """Verify, parse and admit one webhook request. Raises BadSignature, BadEvent, or what
        the handler or the database raised (nothing is then recorded)."""
        self._verifier.verify(body, headers)
        try:
            envelope = json.loads(body)
        except ValueError:
            raise BadEvent("the body is not JSON") from None
        event = parse_event(envelope)
        webhook_id = next((v for k, v in headers.items() if k.lower() == "webhook-id"), None)
        if webhook_id != event.id:
            raise BadEvent("the webhook-id header is not the event's id")
        async with self.pool.connection() as conn, conn.transaction():
            admission = await admit(conn, event, "webhook", self._handlers)
        if admission.outcome is Outcome.HELD or admission.held_waiting:
            self.catch_up.wake()
        return admission.outcome

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Inbox]:
        """Catches up in the background while the block runs (the pool must be open)."""
        task = asyncio.create_task(self.catch_up.run(), name="receiver-catch-up")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.close()

    async def close(self) -> None:
        """Releases the events source's connections (`running()` does it at its end)."""
        if self._events is not None:
            await self._events.close()
