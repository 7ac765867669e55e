"""The relay's statements stay bounded by their batch when the statistics say the queue is empty.

Autovacuum usually sees a queue drained: it records the pending indexes with zero rows, and
PostgreSQL then believes a scan of them returns one row, however large the backlog that builds up
afterwards (a relay that was down, an endpoint that was failing). Plans chosen on that belief
used to walk a consumer's whole backlog once per candidate: with 20,000 pending deliveries, a
webhook claim took 0.1-70 s and a successor claim minutes. Each statement here runs under a
generic plan (what a prepared statement gets) against such a database, and the pages it touches
must not grow with the backlog.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import psycopg
import pytest

from outbox import claim

BACKLOG = 10_000  # pending deliveries per consumer, 2,500 subjects of 4 events
WEBHOOKS = {"we_a": "mer_x", "we_b": "mer_y"}  # two merchants' endpoints, each with the backlog
BATCH = 32
# Pages a statement may touch for a batch of BATCH: about 25 per claimed row (claim index, order
# check, event, the update of six indexes). A plan that walks the backlog touches 10-10,000x more.
MAX_PAGES = 2_500
IN_FLIGHT = 64  # subjects whose last pending delivery is leased (in flight)


def _load(conn: psycopg.Connection[Any], first: int, count: int, status: str) -> None:
    conn.execute(
        "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)"
        " SELECT 'evt_' || i, 'mer_x', 't.x', 'sub_' || (i %% 2500), i / 2500 + 1, now(), '{}'"
        " FROM generate_series(%s::int, %s::int) i",
        (first, first + count - 1),
    )
    conn.execute(
        "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, status,"
        "                               next_attempt_at, delivered_at)"
        " SELECT k, e.id, e.subject, e.sequence, %s::text,"
        "        now() - interval '1 hour' + e.sequence * interval '1 ms',"
        "        CASE WHEN %s::text = 'delivered' THEN now() END"
        " FROM outbox.events e, unnest(ARRAY['we_a', 'we_b', 'reports']) k"
        " WHERE e.id IN (SELECT 'evt_' || i FROM generate_series(%s::int, %s::int) i)",
        (status, status, first, first + count - 1),
    )


@pytest.fixture(params=["with-history", "from-empty"])
def drained_then_backlog(request: pytest.FixtureRequest, db_url: str) -> str:
    """A queue vacuumed and analysed while it had nothing pending (with delivered history, or
    with nothing at all), then a backlog of BACKLOG per consumer."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for endpoint, merchant in WEBHOOKS.items():
            conn.execute("INSERT INTO merchants (id, name) VALUES (%s, 'x')", (merchant,))
            conn.execute(
                "INSERT INTO webhook_endpoints (id, merchant_id, url, event_types, secret)"
                " VALUES (%s, %s, 'https://example.com/', '{*}', 'whsec_AAAA')",
                (endpoint, merchant),
            )
            conn.execute(
                "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
                " VALUES (%s, 'webhook', %s, '{*}')",
                (endpoint, merchant),
            )
        if request.param == "with-history":
            _load(conn, 0, BACKLOG, "delivered")
        for table in ("outbox.deliveries", "outbox.events", "outbox.consumers"):
            conn.execute(f"VACUUM ANALYZE {table}")
        _load(conn, BACKLOG, BACKLOG, "pending")
        # Deliveries in flight behind a redriven predecessor: the last event of some subjects
        # leased while the earlier ones are pending. The in-flight check of every claim
        # probes the leased deliveries, an index analysed empty as well.
        conn.execute(
            "UPDATE outbox.deliveries SET lease_token = gen_random_uuid(), leased_by = 'r',"
            " next_attempt_at = now() + interval '1 hour'"
            " WHERE consumer IN ('we_a', 'reports') AND sequence = %s"
            "   AND subject IN (SELECT 'sub_' || i FROM generate_series(0, %s) i)",
            (2 * BACKLOG // 2500, IN_FLIGHT - 1),
        )
        (pending_index_rows,) = conn.execute(
            "SELECT reltuples FROM pg_class WHERE relname = 'ix_deliveries_subject_pending'"
        ).fetchone() or (None,)
        assert pending_index_rows == 0  # the belief the plans must survive
    return db_url


def _pages(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> int:
    """Shared pages the statement touched, under a generic plan; rolled back."""
    conn.execute("SET plan_cache_mode = force_generic_plan")
    row = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params, prepare=True
    ).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    pages = int(plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0))
    conn.rollback()
    return pages


# A claim as the relay makes it: each endpoint's room, and its merchant's (held here, room).
CLAIM_PARAMS = {
    "consumers": list(WEBHOOKS), "rooms": [BATCH, BATCH], "share": BATCH,
    "merchants": ["mer_x", "mer_y"], "merchant_held": [BATCH // 2, 0],
    "merchant_rooms": [BATCH, BATCH], "merchant_share": BATCH, "limit": BATCH,
    "lease": 60, "relay": "t",
}


def test_queue_statements_stay_bounded_by_the_batch(drained_then_backlog: str) -> None:
    url = drained_then_backlog
    token = uuid.uuid4()
    pages: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        pages["claim_webhooks"] = _pages(conn, claim.CLAIM_WEBHOOKS,
                                         {**CLAIM_PARAMS, "token": token})
        pages["claim_for_handler"] = _pages(
            conn, claim.CLAIM_FOR_HANDLER, {"consumer": "reports", "limit": BATCH}
        )
        pages["next_due"] = _pages(conn, claim.NEXT_DUE, {})

    # Claimed for real, so completion, successors and release find leases.
    with psycopg.connect(url, autocommit=True) as conn:
        leased = conn.execute(claim.CLAIM_WEBHOOKS, {**CLAIM_PARAMS, "token": token}).fetchall()
    assert len(leased) == BATCH  # the claim returns what it says it claims
    # Turns: mer_y holds nothing here, mer_x half a batch, so mer_y gets three quarters of it.
    taken = Counter(row[0] for row in leased)
    assert taken == {"we_b": BATCH * 3 // 4, "we_a": BATCH // 4}, taken
    keys = [(row[0], row[2], row[4]) for row in leased]  # consumer, event id, subject
    n = len(keys)
    with psycopg.connect(url) as conn:
        pages["complete_webhooks"] = _pages(conn, claim.COMPLETE_WEBHOOKS, {
            "consumers": [k[0] for k in keys], "event_ids": [k[1] for k in keys],
            "tokens": [token] * n, "outcomes": ["delivered"] * n, "delays": [0.0] * n,
            "codes": [204] * n, "errors": [None] * n, "latencies": [1] * n,
        })
        pages["release"] = _pages(conn, claim.RELEASE, {
            "consumers": [k[0] for k in keys], "event_ids": [k[1] for k in keys],
            "tokens": [token] * n,
        })
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(  # delivered: their successors become claimable
            "UPDATE outbox.deliveries SET status = 'delivered', lease_token = NULL"
            " WHERE lease_token = %s", (token,))
    with psycopg.connect(url) as conn:
        pages["claim_successors"] = _pages(conn, claim.CLAIM_SUCCESSORS, {
            "consumers": [k[0] for k in keys], "subjects": [k[2] for k in keys],
            "lease": 60, "token": uuid.uuid4(), "relay": "t",
        })
        handler_ids = [r[0] for r in conn.execute(
            "SELECT event_id FROM outbox.deliveries WHERE consumer = 'reports'"
            " AND status = 'pending' ORDER BY event_id LIMIT %s", (BATCH,))]
        conn.rollback()
        pages["complete_for_handler"] = _pages(
            conn, claim.COMPLETE_FOR_HANDLER, {"consumer": "reports", "event_ids": handler_ids}
        )
    over = {name: p for name, p in pages.items() if p > MAX_PAGES}
    assert not over, f"pages touched (limit {MAX_PAGES}): {pages}"


def test_the_in_flight_check_probes_the_leased_deliveries_only(drained_then_backlog: str) -> None:
    """Each claim's in-flight check (no other delivery of the subject holds a live lease) is a
    probe of ix_deliveries_leased, whatever the statistics say, beside the order check's probe of
    ix_deliveries_subject_pending."""
    statements = {
        "claim_webhooks": (claim.CLAIM_WEBHOOKS, {**CLAIM_PARAMS, "token": uuid.uuid4()}),
        "claim_for_handler": (claim.CLAIM_FOR_HANDLER, {"consumer": "reports", "limit": BATCH}),
        "claim_successors": (claim.CLAIM_SUCCESSORS, {
            "consumers": ["we_a"] * 3, "subjects": ["sub_0", "sub_1", "sub_2000"], "lease": 60,
            "token": uuid.uuid4(), "relay": "t"}),
    }
    with psycopg.connect(drained_then_backlog) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for name, (sql, params) in statements.items():
            plan = "\n".join(
                row[0] for row in conn.execute("EXPLAIN " + sql, params, prepare=True)
            )
            assert "Index Scan using ix_deliveries_leased" in plan, (name, plan)
            assert "ix_deliveries_subject_pending" in plan, (name, plan)
            conn.rollback()
