"""What an operator sees at a psql prompt: documented objects and the two views
(docs/operations.md)."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row


def test_every_outbox_table_and_view_has_a_comment(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "SELECT c.relname, c.relkind, obj_description(c.oid, 'pg_class') FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'outbox' AND c.relkind IN ('r', 'p', 'v', 'm') ORDER BY c.relname"
    ).fetchall()
    names = {name for name, _, _ in rows}
    assert {"events", "consumers", "deliveries", "backlog", "dead_letters"} <= names
    missing = [f"outbox.{name} ({kind})" for name, kind, comment in rows if not comment]
    assert missing == [], f"without COMMENT: {missing}"


def test_every_outbox_column_has_a_comment(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "SELECT c.relname, a.attname, col_description(c.oid, a.attnum) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE n.nspname = 'outbox' AND c.relkind IN ('r', 'p', 'v', 'm') "
        "ORDER BY c.relname, a.attnum"
    ).fetchall()
    assert rows
    missing = [f"outbox.{table}.{column}" for table, column, comment in rows if not comment]
    assert missing == [], f"without COMMENT: {missing}"


def test_the_outbox_schema_has_a_comment(conn: psycopg.Connection) -> None:
    row = conn.execute(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = 'outbox'"
    ).fetchone()
    assert row is not None and row[0]


def test_backlog_has_a_row_for_the_reports_consumer(conn: psycopg.Connection) -> None:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute("SELECT * FROM outbox.backlog").fetchall()
    reports = [row for row in rows if row["consumer"] == "reports"]
    assert len(reports) == 1
    row = reports[0]
    assert {"consumer", "pending", "in_flight", "dead", "oldest_pending_age"} <= row.keys()
    assert (row["pending"], row["in_flight"], row["dead"]) == (0, 0, 0)
    assert row["oldest_pending_age"] is None


def test_dead_letters_answers(conn: psycopg.Connection) -> None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM outbox.dead_letters")
        assert cur.fetchall() == []
        assert cur.description is not None
        columns = {column.name for column in cur.description}
    assert {
        "consumer",
        "event",
        "type",
        "attempts",
        "last_status_code",
        "last_error",
        "dead_since",
    } <= columns


def test_every_public_table_and_column_has_a_comment(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "SELECT c.relname, NULL, obj_description(c.oid, 'pg_class') FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') "
        "UNION ALL "
        "SELECT c.relname, a.attname, col_description(c.oid, a.attnum) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') "
        "ORDER BY 1, 2 NULLS FIRST"
    ).fetchall()
    assert {"merchants", "accounts", "payments", "daily_reports", "alembic_version"} <= {
        table for table, _, _ in rows
    }
    missing = [f"{table}.{column}" if column else table
               for table, column, comment in rows if not comment]
    assert missing == [], f"without COMMENT: {missing}"
