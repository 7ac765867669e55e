"""outbox.redrive: the one redrive behind the API's recover and `paymentsctl outbox redrive`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import AsyncConnection

from outbox.redrive import Redriven, UnknownConsumerError, redrive

CONSUMER = "we_redrive"
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def auto(db_url: str) -> AsyncIterator[AsyncConnection]:
    conn = await AsyncConnection.connect(db_url, autocommit=True)
    yield conn
    await conn.close()


def _dead(db_url: str, subjects: dict[str, int], dead_since: datetime = LONG_AGO) -> None:
    """`subjects[s]` dead deliveries of subject s (sequences 1..n) for CONSUMER."""
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO merchants (id, name) VALUES ('mer_r', 'r') ON CONFLICT DO NOTHING")
        conn.execute(
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
            " VALUES (%s, 'webhook', 'mer_r', '{*}') ON CONFLICT DO NOTHING", (CONSUMER,))
        for subject, count in subjects.items():
            for sequence in range(1, count + 1):
                event_id = f"evt_{subject}_{sequence}"
                conn.execute(
                    "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time,"
                    " data) VALUES (%s, 'mer_r', 't.x', %s, %s, now(), '{}')",
                    (event_id, subject, sequence))
                conn.execute(
                    "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, status,"
                    " attempts, dead_since) VALUES (%s, %s, %s, %s, 'dead', 3, %s)",
                    (CONSUMER, event_id, subject, sequence, dead_since))


def _pending(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox.deliveries WHERE consumer = %s AND status = 'pending'",
            (CONSUMER,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_each_batch_is_its_own_transaction(db_url: str, auto: AsyncConnection) -> None:
    """A million dead letters never become one transaction: each batch is committed (seen from
    another connection) before the next one starts."""
    _dead(db_url, {f"sub_{i}": 1 for i in range(7)})
    seen: list[tuple[int, int]] = []
    result = await redrive(auto, CONSUMER, batch_size=3,
                           progress=lambda n: seen.append((n, _pending(db_url))))
    assert result == Redriven(7, 0)
    assert seen == [(3, 3), (6, 6), (7, 7)]


async def test_a_subject_split_across_batches_goes_back_whole_and_counts_once(
    db_url: str, auto: AsyncConnection
) -> None:
    """Batches follow (subject, sequence), so a subject's dead deliveries go back in order, and a
    subject with a later delivered event counts once, however the batches cut it."""
    _dead(db_url, {"a": 3, "b": 2})
    with psycopg.connect(db_url) as conn:
        for subject in ("a", "b"):
            conn.execute(
                "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)"
                " VALUES (%s, 'mer_r', 't.x', %s, 9, now(), '{}')", (f"evt_{subject}_9", subject))
            conn.execute(
                "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, status,"
                " delivered_at) VALUES (%s, %s, %s, 9, 'delivered', now())",
                (CONSUMER, f"evt_{subject}_9", subject))
    assert await redrive(auto, CONSUMER, batch_size=2) == Redriven(5, 2)


async def test_since_and_the_cursor(db_url: str, auto: AsyncConnection) -> None:
    """Only deliveries dead since `since`; the older ones of the same subjects stay dead."""
    recent = datetime.now(UTC) - timedelta(minutes=1)
    _dead(db_url, {"a": 2, "c": 1})
    _dead(db_url, {"b": 2}, dead_since=recent)
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.deliveries SET dead_since = %s WHERE event_id = 'evt_a_2'",
                     (recent,))
    result = await redrive(auto, CONSUMER, recent - timedelta(seconds=1), batch_size=1)
    assert result.requeued == 3
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT event_id, status FROM outbox.deliveries ORDER BY event_id").fetchall()
    assert rows == [("evt_a_1", "dead"), ("evt_a_2", "pending"), ("evt_b_1", "pending"),
                    ("evt_b_2", "pending"), ("evt_c_1", "dead")]


async def test_refusals(db_url: str, auto: AsyncConnection) -> None:
    with pytest.raises(UnknownConsumerError, match="we_nobody"):
        await redrive(auto, "we_nobody")
    with pytest.raises(ValueError, match="batch_size"):
        await redrive(auto, CONSUMER, batch_size=0)
    async with await AsyncConnection.connect(db_url) as in_transactions:
        with pytest.raises(ValueError, match="autocommit"):
            await redrive(in_transactions, CONSUMER)
