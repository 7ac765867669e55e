"""An event as a receiver sees it: our CloudEvents envelope, parsed and checked.

`sequence_number` is the one place a `sequence` is read. Senders write it either as a JSON
integer (`7`) or, as the CloudEvents sequence extension asks (a string that orders
lexicographically), as a decimal string zero-padded to 19 digits (`"0000000000000000007"`);
both mean 7 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.errors import BadEvent

MAX_SEQUENCE = 2**63 - 1  # the inbox keeps sequences in bigint columns
_MAX_DIGITS = 40


def sequence_number(value: object) -> int:
    """The sequence as an int from a JSON integer or a decimal string; BadEvent otherwise
    (booleans, floats, signs, spaces, non-ASCII digits, zero, beyond 2^63-1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_DIGITS
        and value.isascii()
        and value.isdigit()
    ):
        number = int(value)
    else:
        raise BadEvent(f"sequence must be a positive integer or decimal string, not {value!r:.40}")
    if not 1 <= number <= MAX_SEQUENCE:
        raise BadEvent(f"sequence out of range: {number}")
    return number


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event: its id (the `webhook-id` of its deliveries), what happened (`type`), to what
    (`subject`, the ordering key), where in that subject's history (`sequence`, 1, 2, 3, …), and
    the whole envelope as it was sent (`envelope`, with `data`)."""

    id: str
    type: str
    subject: str
    sequence: int
    envelope: dict[str, Any]

    @property
    def data(self) -> Any:
        return self.envelope.get("data")


def parse_event(envelope: Any) -> ReceivedEvent:
    """A parsed JSON body (or an item of `GET /v1/events`) as a ReceivedEvent; BadEvent when it
    lacks what ordering needs."""
    if not isinstance(envelope, dict):
        raise BadEvent("the event is not a JSON object")
    fields = {}
    for name in ("id", "type", "subject"):
        value = envelope.get(name)
        if not isinstance(value, str) or not value or "\x00" in value:
            raise BadEvent(f"the event has no valid {name}")
        fields[name] = value
    return ReceivedEvent(
        id=fields["id"],
        type=fields["type"],
        subject=fields["subject"],
        sequence=sequence_number(envelope.get("sequence")),
        envelope=envelope,
    )
