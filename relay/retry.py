"""What happens after a webhook attempt: delivered, retried later, parked or dead."""

from __future__ import annotations

import email.utils
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from outbox.claim import Outcome

MAX_RETRY_AFTER = 86_400.0
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one HTTP attempt produced. `status_code` is None when no answer came."""

    status_code: int | None
    error: str | None
    latency_ms: int
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), clamped to a day."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def decide(
    attempt: Attempt,
    attempts_before: int,
    schedule: Sequence[float],
    rng: random.Random | None = None,
) -> tuple[Outcome, float]:
    """(outcome, delay in seconds before the next attempt).

    Entry i of the schedule is the wait before attempt i, so after attempt n (n = attempts made)
    the wait is schedule[n], and with no entry left the delivery is dead. Jitter stretches a wait
    by up to 10% (never shortens it), so endpoints recovering from an outage are not hit by every
    retry at once. A Retry-After on 429/503 replaces the scheduled wait but not the count.
    """
    if attempt.ok:
        return "delivered", 0.0
    if attempt.status_code == 410:
        return "park", 0.0
    made = attempts_before + 1
    if made >= len(schedule):
        return "dead", 0.0
    if attempt.status_code in (429, 503) and attempt.retry_after is not None:
        return "retry", attempt.retry_after
    wait = schedule[made]
    return "retry", wait * (1.0 + JITTER * (rng or random).random())
