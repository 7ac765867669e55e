"""Every statement the receiver runs against its tables (receiver/migrations/), each a named
function taking the caller's connection: the caller owns the transaction.

A subject's row in `receiver.subjects` is its lock. Whoever applies, holds or skips an event of a
subject locks that row first (`lock_subject`) and reads the inbox after the lock, so two
deliveries of one event, or a delivery and a backfill, cannot both apply it, and a subject's
events are applied one at a time in sequence order.
"""

from __future__ import annotations

from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from receiver.event import ReceivedEvent, parse_event

Conn = AsyncConnection[Any]
Status = Literal["held", "applied", "late"]
Via = Literal["webhook", "backfill"]


async def lock_subject(conn: Conn, subject: str) -> int:
    """Locks the subject's row until the transaction ends (creating it at 0 the first time);
    returns its last applied sequence."""
    select = "SELECT last_sequence FROM receiver.subjects WHERE subject = %s FOR UPDATE"
    row = await (await conn.execute(select, (subject,))).fetchone()
    if row is None:
        await conn.execute(
            "INSERT INTO receiver.subjects (subject) VALUES (%s) ON CONFLICT DO NOTHING",
            (subject,),
        )
        row = await (await conn.execute(select, (subject,))).fetchone()
        assert row is not None
    last: int = row[0]
    return last


async def inbox_status(conn: Conn, webhook_id: str) -> Status | None:
    row = await (
        await conn.execute("SELECT status FROM receiver.inbox WHERE webhook_id = %s", (webhook_id,))
    ).fetchone()
    return None if row is None else row[0]


async def record(conn: Conn, event: ReceivedEvent, status: Status, via: Via) -> None:
    """The event's inbox row, inserted or (held → applied/late) updated. An applied event keeps
    no body: the row is there to recognise a second delivery."""
    await conn.execute(
        """
        INSERT INTO receiver.inbox (webhook_id, subject, sequence, type, status, via, event,
                                    applied_at)
        VALUES (%(id)s, %(subject)s, %(sequence)s, %(type)s, %(status)s, %(via)s, %(event)s,
                CASE WHEN %(status)s <> 'held' THEN now() END)
        ON CONFLICT (webhook_id) DO UPDATE
            SET status = EXCLUDED.status, event = EXCLUDED.event, applied_at = EXCLUDED.applied_at
        """,
        {
            "id": event.id,
            "subject": event.subject,
            "sequence": event.sequence,
            "type": event.type,
            "status": status,
            "via": via,
            "event": None if status == "applied" else Jsonb(event.envelope),
        },
    )


async def advance(conn: Conn, subject: str, sequence: int) -> bool:
    """Moves the subject to `sequence`; returns whether events of it are held, waiting."""
    row = await (
        await conn.execute(
            "UPDATE receiver.subjects SET last_sequence = %(sequence)s, updated_at = now()"
            " WHERE subject = %(subject)s"
            " RETURNING EXISTS (SELECT 1 FROM receiver.inbox"
            "                   WHERE subject = %(subject)s AND status = 'held')",
            {"subject": subject, "sequence": sequence},
        )
    ).fetchone()
    assert row is not None, f"advance without lock_subject: {subject}"
    held: bool = row[0]
    return held


async def first_held(conn: Conn, subject: str) -> ReceivedEvent | None:
    """The subject's held event with the lowest sequence."""
    row = await (
        await conn.execute(
            "SELECT event FROM receiver.inbox WHERE subject = %s AND status = 'held'"
            " ORDER BY sequence LIMIT 1",
            (subject,),
        )
    ).fetchone()
    return None if row is None else parse_event(row[0])


async def held_subjects(conn: Conn, limit: int, except_: list[str]) -> list[str]:
    """Subjects with held events, those waiting longest first, leaving out `except_`."""
    cur = await conn.execute(
        "SELECT subject FROM receiver.inbox WHERE status = 'held' AND subject <> ALL(%s)"
        " GROUP BY subject ORDER BY min(received_at) LIMIT %s",
        (except_, limit),
    )
    return [row[0] for row in await cur.fetchall()]


async def skip(conn: Conn, subject: str, sequence: int) -> bool:
    """Records a sequence given up on and moves the subject past it; returns whether events of
    it are held."""
    await conn.execute(
        "INSERT INTO receiver.skipped (subject, sequence) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (subject, sequence),
    )
    return await advance(conn, subject, sequence)


async def unskip(conn: Conn, subject: str, sequence: int) -> bool:
    """Removes a skipped sequence (its event has turned up); returns whether it was skipped."""
    cur = await conn.execute(
        "DELETE FROM receiver.skipped WHERE subject = %s AND sequence = %s", (subject, sequence)
    )
    return cur.rowcount > 0


async def purge_applied(conn: Conn, older_than_seconds: float, batch_size: int) -> int:
    """Deletes up to `batch_size` inbox rows of events applied longer ago than that; returns how
    many. Safe: a late redelivery of such an event is behind its subject and was not skipped,
    which admit() recognises as a duplicate without the row."""
    cur = await conn.execute(
        """
        DELETE FROM receiver.inbox WHERE webhook_id IN (
            SELECT webhook_id FROM receiver.inbox
            WHERE status = 'applied' AND applied_at < now() - make_interval(secs => %s)
            LIMIT %s)
        """,
        (older_than_seconds, batch_size),
    )
    return cur.rowcount
