"""The decision for one event, under its subject's lock, in the caller's transaction. The event
is …

- applied (or handed over as late) before: `duplicate`, nothing happens;
- the subject's next sequence: `applied`, the handler runs, the inbox row and the subject's new
  sequence are written;
- beyond the next sequence (a gap before it): `held`, stored in the inbox to wait;
- behind its subject, and its sequence was skipped: `late`, the late handler runs (if any);
- behind its subject, and its sequence was applied: `duplicate` (its inbox row was purged).

The handler's effects, the inbox row and the subject's new sequence commit together or not at
all: a crash in the middle leaves no trace, and the next delivery applies the event again from
scratch. An event is *late* only when its subject moved past it without it: its sequence was
skipped because the events API no longer had it (docs/receiver.md, Late events).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection

from receiver import store
from receiver.event import ReceivedEvent

Handler = Callable[[AsyncConnection[Any], ReceivedEvent], Awaitable[None]]
"""`async def handle(conn, event)`: apply the event with `conn`, inside the inbox's transaction
(do not commit or roll back; raise to refuse the event, which rolls everything back)."""


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    HELD = "held"
    LATE = "late"


@dataclass(frozen=True, slots=True)
class Admission:
    outcome: Outcome
    held_waiting: bool = False
    """Events of the subject are held and may now be next: catching up should look."""


@dataclass(frozen=True, slots=True)
class Handlers:
    apply: Handler
    late: Handler | None = None


async def admit(
    conn: AsyncConnection[Any], event: ReceivedEvent, via: store.Via, handlers: Handlers
) -> Admission:
    """Apply, hold, hand over as late, or drop as a duplicate (the table above). Must run inside
    a transaction, which the caller commits."""
    last = await store.lock_subject(conn, event.subject)
    status = await store.inbox_status(conn, event.id)
    if status in ("applied", "late"):
        return Admission(Outcome.DUPLICATE)
    if event.sequence == last + 1:
        await handlers.apply(conn, event)
        await store.record(conn, event, "applied", via)
        return Admission(Outcome.APPLIED, await store.advance(conn, event.subject, event.sequence))
    if event.sequence > last + 1:
        if status is None:
            await store.record(conn, event, "held", via)
        return Admission(Outcome.HELD)
    if await store.unskip(conn, event.subject, event.sequence) or status == "held":
        if handlers.late is not None:
            await handlers.late(conn, event)
        await store.record(conn, event, "late", via)
        return Admission(Outcome.LATE)
    return Admission(Outcome.DUPLICATE)
