"""What happens after a webhook attempt: delivered, retried later, parked or dead."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from outbox.claim import Outcome

MAX_RETRY_AFTER = 86_400.0
JITTER = 0.1
# The statuses whose Retry-After is read (RFC 9110 section 10.2.3): elsewhere it means nothing
# to a webhook sender, and a 2xx is a delivery whatever its headers say.
RETRY_AFTER_STATUSES = frozenset((429, 503))


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one HTTP attempt produced. `status_code` is None when no answer came; `unanswered`
    says that the request went out (or tried to) and the endpoint never answered it (timeout,
    refused or dropped connection), as opposed to an attempt the relay did not make (URL
    refused by the guard, endpoint gone, malformed secret)."""

    status_code: int | None
    error: str | None
    latency_ms: int
    retry_after: float | None = None
    unanswered: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# RFC 9110 section 5.6.7: IMF-fixdate, and the two obsolete forms recipients must accept.
# [0-9] rather than \d: \d matches any Unicode digit.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(?P<month>" + "|".join(_MONTHS) + ")"
_TIME = "(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
_IMF_FIXDATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (?P<day>[0-9]{{2}}) {_MONTH} (?P<year>[0-9]{{4}}) "
    rf"{_TIME} GMT"
)
_RFC850_DATE = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rf"(?P<day>[0-9]{{2}})-{_MONTH}-(?P<year>[0-9]{{2}}) {_TIME} GMT"
)
_ASCTIME_DATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} (?P<day>[0-9]{{2}}| [0-9]) {_TIME} "
    r"(?P<year>[0-9]{4})"
)


def parse_http_date(value: str, now: datetime) -> datetime | None:
    """An HTTP-date (RFC 9110 section 5.6.7) as an aware UTC datetime; None when `value` is not
    one."""
    for form in (_IMF_FIXDATE, _RFC850_DATE, _ASCTIME_DATE):
        match = form.fullmatch(value)
        if match is not None:
            break
    else:
        return None
    year = int(match["year"])
    if form is _RFC850_DATE:
        # A two-digit year that would be more than 50 years ahead is the most recent past year
        # with those digits.
        year += now.year - now.year % 100
        if year > now.year + 50:
            year -= 100
    try:
        return datetime(year, _MONTHS.index(match["month"]) + 1, int(match["day"]),
                        int(match["hour"]), int(match["minute"]), int(match["second"]),
                        tzinfo=UTC)
    except ValueError:  # 31 Feb, 25:00:00
        return None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After value: delay-seconds (ASCII digits) or an HTTP-date, clamped to
    a day. Anything else is None; nothing raises."""
    if not value:
        return None
    value = value.strip(" \t")
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)  # float(), unlike int(), takes any length
    now = now or datetime.now(UTC)
    when = parse_http_date(value, now)
    if when is None:
        return None
    seconds = (when - now) / timedelta(seconds=1)
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
    if attempt.status_code in RETRY_AFTER_STATUSES and attempt.retry_after is not None:
        return "retry", attempt.retry_after
    wait = schedule[made]
    return "retry", wait * (1.0 + JITTER * (rng or random).random())
