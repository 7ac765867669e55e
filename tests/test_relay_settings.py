"""Relay configuration and the retry decision."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from relay.retry import Attempt, decide, parse_retry_after
from relay.settings import Settings, SettingsError


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env({})
    assert s.database_url == "postgresql:///payments"
    assert s.retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    assert (s.http_timeout, s.lease_seconds, s.allowed_networks) == (15, 60, ())
    assert (s.purge_interval, s.retention) == (timedelta(hours=1), timedelta(days=7))


def test_environment_is_parsed() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/payments",
            "OUTBOX_RETRY_SCHEDULE": "0, 0.2,0.4",
            "OUTBOX_HTTP_TIMEOUT": "2.5",
            "OUTBOX_LEASE_SECONDS": "8",
            "OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8, ::1/128",
            "OUTBOX_PURGE_INTERVAL": "off",
            "OUTBOX_RETENTION": "12h",
        },
        concurrency=4,
        batch_size=10,
    )
    assert s.retry_schedule == (0, 0.2, 0.4)
    assert (s.http_timeout, s.lease_seconds) == (2.5, 8)
    assert [str(n) for n in s.allowed_networks] == ["127.0.0.0/8", "::1/128"]
    assert (s.purge_interval, s.retention) == (timedelta(0), timedelta(hours=12))
    assert (s.concurrency, s.batch_size) == (4, 10)


@pytest.mark.parametrize(
    "env",
    [
        {"OUTBOX_RETRY_SCHEDULE": "0,-1"},
        {"OUTBOX_RETRY_SCHEDULE": "0,,1"},
        {"OUTBOX_HTTP_TIMEOUT": "nan"},
        {"OUTBOX_LEASE_SECONDS": "10", "OUTBOX_HTTP_TIMEOUT": "10"},
        # Longer than the timeout, but not than an attempt can last with its wait in the queue.
        {"OUTBOX_LEASE_SECONDS": "15", "OUTBOX_HTTP_TIMEOUT": "10"},
        {"OUTBOX_LEASE_SECONDS": "20", "OUTBOX_HTTP_TIMEOUT": "15"},
        {"OUTBOX_PURGE_INTERVAL": "soon"},
        {"DATABASE_URL": "postgresql://h/?bogus_option=1"},
    ],
)
def test_bad_environment_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(env)


SCHEDULE = (0.0, 5.0, 300.0)


def test_decide_follows_the_schedule_with_jitter_that_never_shortens() -> None:
    rng = random.Random(1)
    failed = Attempt(500, "HTTP 500", 3)
    for _ in range(50):
        outcome, delay = decide(failed, 0, SCHEDULE, rng)
        assert outcome == "retry" and 5.0 <= delay <= 5.5
    assert decide(failed, 1, SCHEDULE, rng)[0] == "retry"
    assert decide(failed, 2, SCHEDULE, rng) == ("dead", 0.0)  # three attempts made
    assert decide(Attempt(204, None, 1), 2, SCHEDULE) == ("delivered", 0.0)
    assert decide(Attempt(410, "HTTP 410", 1), 0, SCHEDULE) == ("park", 0.0)
    assert decide(Attempt(None, "timeout", 1), 0, SCHEDULE, rng)[0] == "retry"
    assert decide(Attempt(302, "HTTP 302", 1), 2, SCHEDULE) == ("dead", 0.0)


def test_the_lease_covers_the_timeout_the_queue_wait_and_a_margin() -> None:
    assert Settings.from_env({"OUTBOX_HTTP_TIMEOUT": "15", "OUTBOX_LEASE_SECONDS": "20.5"})
    with pytest.raises(SettingsError, match="must be greater than 20 "):
        Settings.from_env({"OUTBOX_HTTP_TIMEOUT": "15", "OUTBOX_LEASE_SECONDS": "20"})


def test_retry_after_replaces_the_wait_on_429_and_503_only() -> None:
    assert decide(Attempt(429, "x", 1, retry_after=42), 0, SCHEDULE) == ("retry", 42)
    assert decide(Attempt(503, "x", 1, retry_after=0), 0, SCHEDULE) == ("retry", 0)
    assert decide(Attempt(500, "x", 1, retry_after=42), 0, SCHEDULE)[1] >= 5
    assert decide(Attempt(429, "x", 1, retry_after=42), 2, SCHEDULE) == ("dead", 0.0)


def test_parse_retry_after() -> None:
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("9999999") == 86400
    assert parse_retry_after("Fri, 27 Nov 2026 12:00:30 GMT", now) == 30
    assert parse_retry_after("Fri, 27 Nov 2026 11:00:00 GMT", now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") is None
    assert parse_retry_after(" 7 ") == 7
    assert parse_retry_after("9" * 5000) == 86400  # float(), unlike int(), takes any length


@pytest.mark.parametrize(
    "value",
    ["①", "²", "１２", "٣", "1.5", "1e3", "+5", "0x10", "",
     # Dates that are not HTTP-dates (RFC 9110 section 5.6.7), though email.utils reads them:
     "27 Nov 2026 12:00:30 GMT", "Fri, 27 Nov 2026 12:00:30 +0000", "Fri, 31 Feb 2026 12:00:30 GMT",
     "Fri, 27 Nov 2026 25:00:00 GMT", "Fri, ２７ Nov 2026 12:00:30 GMT"],
)
def test_retry_after_is_ascii_digits_or_an_http_date_and_never_raises(value: str) -> None:
    assert parse_retry_after(value) is None


def test_retry_after_accepts_the_three_http_date_forms() -> None:
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    for value in ("Fri, 27 Nov 2026 12:01:00 GMT", "Friday, 27-Nov-26 12:01:00 GMT",
                  "Fri Nov 27 12:01:00 2026"):
        assert parse_retry_after(value, now) == 60, value
    # A two-digit year more than 50 years ahead is in the past.
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now) == 0
