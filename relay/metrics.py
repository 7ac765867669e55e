"""Prometheus metrics of the relay, served on --metrics-host (127.0.0.1 unless told otherwise:
the series name every webhook endpoint) and --metrics-port."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from outbox.claim import Backlog

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 86400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["consumer"]
        self.pending = Gauge(
            "outbox_pending", "Deliveries waiting for an attempt.", labels, registry=self.registry
        )
        self.in_flight = Gauge(
            "outbox_in_flight", "Deliveries under a lease.", labels, registry=self.registry
        )
        self.dead = Gauge(
            "outbox_dead", "Deliveries that ran out of retries.", labels, registry=self.registry
        )
        self.oldest_pending_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest undelivered event.",
            labels,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "outbox_deliveries",
            "Delivery attempts by outcome: delivered, retry, dead, park (410), applied "
            "(handler), stale (lease lost before completion).",
            ["outcome"],
            registry=self.registry,
        )
        self.attempt_duration = Histogram(
            "outbox_attempt_duration_seconds",
            "Duration of one webhook attempt.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.end_to_end = Histogram(
            "outbox_end_to_end_seconds",
            "From the event's commit to its acknowledgement by the consumer.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self._known: set[str] = set()

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def set_backlog(self, rows: Sequence[Backlog]) -> None:
        seen = set()
        for row in rows:
            seen.add(row.consumer)
            self.pending.labels(row.consumer).set(row.pending)
            self.in_flight.labels(row.consumer).set(row.in_flight)
            self.dead.labels(row.consumer).set(row.dead)
            self.oldest_pending_age.labels(row.consumer).set(row.oldest_pending_age)
        for gone in self._known - seen:
            for gauge in (self.pending, self.in_flight, self.dead, self.oldest_pending_age):
                gauge.remove(gone)
        self._known = seen
