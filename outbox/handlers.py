"""Handler consumers: effects inside the database, applied exactly once.

A handler is `async apply(conn, events)`. The relay calls it inside the transaction that locked
those deliveries and marks them delivered, so the effect and the record of delivery commit
together (or not at all). A handler must therefore only touch the database through `conn`, never
commit, and be deterministic enough to be re-run on the same events after a rollback.

Built in: `reports`, which keeps `daily_reports` (what `GET /v1/reports/daily` serves). Its
amounts are `numeric`: exact for any sum of amounts, so no day's volume can make an event fail
(and die, and take every later money event of that merchant and day with it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, date

from psycopg import AsyncConnection

from outbox.envelope import Event

Handler = Callable[[AsyncConnection, Sequence[Event]], Awaitable[None]]

# Which column each event type adds its amount to; payments also count.
_REPORT_COLUMNS = {
    "payment.succeeded": "payments_amount",
    "refund.succeeded": "refunds_amount",
    "deposit.succeeded": "deposits_amount",
    "payout.paid": "payouts_amount",
}

_UPSERT_REPORTS = """
INSERT INTO public.daily_reports AS r (merchant_id, day, currency, payments_count,
    payments_amount, refunds_amount, deposits_amount, payouts_amount)
SELECT * FROM unnest(%s::text[], %s::date[], %s::text[], %s::bigint[], %s::numeric[],
                     %s::numeric[], %s::numeric[], %s::numeric[])
ON CONFLICT (merchant_id, day, currency) DO UPDATE SET
    payments_count = r.payments_count + excluded.payments_count,
    payments_amount = r.payments_amount + excluded.payments_amount,
    refunds_amount = r.refunds_amount + excluded.refunds_amount,
    deposits_amount = r.deposits_amount + excluded.deposits_amount,
    payouts_amount = r.payouts_amount + excluded.payouts_amount
"""

_FIELDS = ("payments_count", *sorted(set(_REPORT_COLUMNS.values())))


async def apply_reports(conn: AsyncConnection, events: Sequence[Event]) -> None:
    """Add a batch of money events to the daily totals: aggregated here, one upsert.

    The day is the UTC date of the event's `time`."""
    totals: dict[tuple[str, date, str], dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(_FIELDS, 0)
    )
    for event in events:
        column = _REPORT_COLUMNS.get(event.type)
        if column is None or event.merchant_id is None:
            continue
        key = (event.merchant_id, event.time.astimezone(UTC).date(), event.data["currency"])
        row = totals[key]
        row[column] += int(event.data["amount"])
        if event.type == "payment.succeeded":
            row["payments_count"] += 1
    if not totals:
        return
    keys = sorted(totals)  # a fixed order, so two relays' upserts cannot deadlock
    await conn.execute(
        _UPSERT_REPORTS,
        (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [totals[k]["payments_count"] for k in keys],
            [totals[k]["payments_amount"] for k in keys],
            [totals[k]["refunds_amount"] for k in keys],
            [totals[k]["deposits_amount"] for k in keys],
            [totals[k]["payouts_amount"] for k in keys],
        ),
    )


HANDLERS: Mapping[str, Handler] = {"reports": apply_reports}
