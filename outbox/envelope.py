"""The CloudEvents 1.0 envelope of an outbox event, and its JSON body.

The body is rendered from the stored row the same way every time, so a redelivered event carries
the same bytes as the first attempt.

`sequence` is the CloudEvents sequence extension, whose value is a string that orders
lexicographically: the subject's counter (a bigint) in decimal, zero-padded to the 19 digits of
the largest bigint, so string order is numeric order and `int()` gives the number back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

SOURCE = "payments"
SEQUENCE_DIGITS = 19  # len(str(2**63 - 1))


def sequence_string(sequence: int) -> str:
    """0000000000000000001 for 1: the envelope's form of a subject's counter."""
    return f"{sequence:0{SEQUENCE_DIGITS}d}"


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds, `Z` suffix: 2026-11-27T01:02:03.456789Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to publish: what happened (`type`), to what (`subject`), and the object."""

    type: str
    subject: str
    data: dict[str, Any]
    merchant_id: str | None


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    subject: str
    sequence: int
    time: datetime
    data: dict[str, Any]
    merchant_id: str | None = None

    def envelope(self) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": SOURCE,
            "type": self.type,
            "subject": self.subject,
            "sequence": sequence_string(self.sequence),
            "time": rfc3339(self.time),
            "datacontenttype": "application/json",
            "data": self.data,
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())
