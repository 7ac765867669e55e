"""The relay's configuration: read once from the environment and the command line."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import psycopg
from psycopg.conninfo import conninfo_to_dict

from db.settings import DEFAULT_DATABASE_URL
from outbox.urlguard import Network, parse_networks

DEFAULT_RETRY_SCHEDULE = "0,5,300,1800,7200,18000,36000,50400,72000,86400"

# What a lease must cover beyond OUTBOX_HTTP_TIMEOUT, so that no attempt is still running (or its
# 2xx still unrecorded) when the lease runs out and another relay claims the delivery again:
# - the wait of a claimed delivery in its relay's queue: one that waited longer is given back
#   instead of sent (relay/worker.py);
# - the attempt's overrun: aiohttp rounds deadlines of 5 s or more up to the next whole second;
# - the claim's and the completion's round trips, and a loaded machine's scheduling delays.
QUEUE_WAIT_LIMIT = 2.0
ATTEMPT_OVERRUN = 1.0
LEASE_SLACK = 2.0


class SettingsError(ValueError):
    """Bad configuration: the daemon exits 2 with this message."""


def _seconds(environ: Mapping[str, str], name: str, default: str, *, minimum: float) -> float:
    raw = environ.get(name, "").strip() or default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < minimum:
        raise SettingsError(f"{name}={raw!r} must be a number of seconds >= {minimum:g}")
    return value


def _schedule(environ: Mapping[str, str]) -> tuple[float, ...]:
    raw = environ.get("OUTBOX_RETRY_SCHEDULE", "").strip() or DEFAULT_RETRY_SCHEDULE
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise SettingsError(
            f"OUTBOX_RETRY_SCHEDULE={raw!r} must be comma-separated seconds, e.g. 0,5,300"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise SettingsError(f"OUTBOX_RETRY_SCHEDULE={raw!r} must hold non-negative seconds")
    return values


def _duration(environ: Mapping[str, str], name: str, default: str) -> timedelta:
    from admin.retention import parse_duration

    raw = environ.get(name, "").strip() or default
    if raw in ("0", "off"):
        return timedelta(0)
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def min_lease_seconds(http_timeout: float) -> float:
    """The lease must be longer than this (see QUEUE_WAIT_LIMIT)."""
    return http_timeout + QUEUE_WAIT_LIMIT + ATTEMPT_OVERRUN + LEASE_SLACK


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    retry_schedule: tuple[float, ...] = tuple(
        float(s) for s in DEFAULT_RETRY_SCHEDULE.split(",")
    )
    http_timeout: float = 15.0
    lease_seconds: float = 60.0
    allowed_networks: tuple[Network, ...] = ()
    # Retention: how often the relay purges (0 = never) and what it keeps.
    purge_interval: timedelta = timedelta(hours=1)
    retention: timedelta = timedelta(days=7)
    concurrency: int = 32
    batch_size: int = 100
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"
    # How long in-flight deliveries may run on after SIGTERM before their leases are released;
    # systemd's stop timeout (30 s by contract) must cover this plus the release.
    shutdown_grace: float = 20.0

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        concurrency: int = 32,
        batch_size: int = 100,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        log_format: str = "text",
    ) -> Settings:
        env = os.environ if environ is None else environ
        http_timeout = _seconds(env, "OUTBOX_HTTP_TIMEOUT", "15", minimum=0.001)
        lease = _seconds(env, "OUTBOX_LEASE_SECONDS", "60", minimum=1)
        shortest = min_lease_seconds(http_timeout)
        if lease <= shortest:
            raise SettingsError(
                f"OUTBOX_LEASE_SECONDS ({lease:g}) must be greater than {shortest:g}"
                f" (OUTBOX_HTTP_TIMEOUT {http_timeout:g} + {QUEUE_WAIT_LIMIT:g} s of queue wait"
                f" + {ATTEMPT_OVERRUN + LEASE_SLACK:g} s of margin), or an attempt still running"
                " when the lease ends would be sent again by another relay"
            )
        try:
            networks = parse_networks(env.get("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", ""))
        except ValueError as exc:
            raise SettingsError(f"OUTBOX_WEBHOOK_ALLOWED_NETWORKS: {exc}") from None
        if concurrency < 1:
            raise SettingsError("--concurrency must be at least 1")
        if batch_size < 1:
            raise SettingsError("--batch-size must be at least 1")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise SettingsError("--metrics-port must be a TCP port (0-65535)")
        if log_format not in ("text", "json"):
            raise SettingsError("--log-format must be text or json")
        database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        try:
            conninfo_to_dict(database_url)
        except psycopg.ProgrammingError as exc:
            raise SettingsError(f"DATABASE_URL is not a valid libpq URL: {exc}") from None
        return cls(
            database_url=database_url,
            retry_schedule=_schedule(env),
            http_timeout=http_timeout,
            lease_seconds=lease,
            allowed_networks=networks,
            purge_interval=_duration(env, "OUTBOX_PURGE_INTERVAL", "1h"),
            retention=_duration(env, "OUTBOX_RETENTION", "7d"),
            concurrency=concurrency,
            batch_size=batch_size,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            log_format=log_format,
            shutdown_grace=_seconds(env, "OUTBOX_SHUTDOWN_GRACE", "20", minimum=0),
        )
