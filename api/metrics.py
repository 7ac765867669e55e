"""Prometheus metrics of the API: request latency and status counts per route template, and the
outbox backlog per handler consumer and for all webhook endpoints together, read from
`outbox.backlog` at scrape time.

The backlog gauges carry the same names, help and labels as the relay's (relay/metrics.py), so one
dashboard serves both endpoints. They are built for each scrape from the rows just read, so a
consumer that is gone has no series and two concurrent scrapes never mix their figures. When the
database does not answer within `BACKLOG_TIMEOUT`, `payments_api_database_up` is 0 and the backlog
series are left out (a stale backlog would look like a healthy one); the rest is served as usual.

With several uvicorn workers (`payments-api --workers N`) each worker counts its own requests and a
scrape reaches one of them. Set `PROMETHEUS_MULTIPROC_DIR` to an empty directory writable by the
service (before it starts, cleared at every start) and the request metrics of all workers are
summed from there instead (prometheus_client's multiprocess mode); the process_* and python_*
metrics, which describe one process, are then left out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

import psycopg
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "payments_api_requests_total", "HTTP requests by method, route and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "payments_api_request_duration_seconds", "HTTP request latency by method and route.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Name and help of the backlog gauges, as in relay/metrics.py; all labelled by consumer.
BACKLOG_GAUGES = (
    ("outbox_pending", "Deliveries waiting for an attempt."),
    ("outbox_in_flight", "Deliveries under a lease."),
    ("outbox_dead", "Deliveries that ran out of retries."),
    ("outbox_oldest_pending_age_seconds", "Age of the oldest undelivered event."),
)
DATABASE_UP = (
    "payments_api_database_up",
    "1 when the database answered the backlog query of this scrape, else 0.",
)

# Seconds for taking a pool connection, and again for the query itself (statement_timeout).
BACKLOG_TIMEOUT = 2.0
# /metrics needs no key, so webhook endpoints (merchants' objects) are summed into one series,
# consumer="webhooks"; per-endpoint series are on the relay's metrics port, which belongs on the
# operators' network. Handler consumers are the operator's own and keep their names.
WEBHOOKS_LABEL = "webhooks"
BACKLOG_SQL = f"""
SELECT CASE WHEN kind = 'webhook' THEN '{WEBHOOKS_LABEL}' ELSE consumer END,
       sum(pending)::bigint, sum(in_flight)::bigint, sum(dead)::bigint,
       coalesce(max(extract(epoch FROM oldest_pending_age)), 0)::float8
FROM outbox.backlog
GROUP BY 1
ORDER BY 1
"""

BacklogRow = tuple[str, int, int, int, float]
log = logging.getLogger("payments.api.metrics")


class BacklogCollector(Collector):
    """The backlog rows of one scrape as gauges; None means the database did not answer."""

    def __init__(self, rows: Sequence[BacklogRow] | None) -> None:
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(*DATABASE_UP, value=0 if self.rows is None else 1)
        if self.rows is None:
            return
        for column, (name, documentation) in enumerate(BACKLOG_GAUGES, start=1):
            family = GaugeMetricFamily(name, documentation, labels=["consumer"])
            for row in self.rows:
                family.add_metric([row[0]], float(row[column]))
            yield family


async def read_backlog(pool: AsyncConnectionPool | None) -> list[BacklogRow] | None:
    """outbox.backlog through `pool`, or None (logged) when the database does not answer in
    time. Never raises for a database problem."""
    if pool is None:
        return None
    try:
        async with pool.connection(timeout=BACKLOG_TIMEOUT) as conn:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('statement_timeout', %s, true)",
                    (str(int(BACKLOG_TIMEOUT * 1000)),),
                )
                cur = await conn.execute(BACKLOG_SQL)
                return [tuple(row) for row in await cur.fetchall()]
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        log.warning("metrics: outbox backlog unavailable: %s", " ".join(str(exc).split())[:200])
        return None


def _process_registry() -> CollectorRegistry:
    """The request metrics: this process's, or every worker's in multiprocess mode."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    return registry


async def exposition(pool: AsyncConnectionPool | None) -> bytes:
    """The whole /metrics body: request and process metrics, then this scrape's backlog."""
    backlog = CollectorRegistry()
    backlog.register(BacklogCollector(await read_backlog(pool)))
    return generate_latest(_process_registry()) + generate_latest(backlog)


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "")
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
