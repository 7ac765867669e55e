"""What can go wrong in the receiver, one class each, under `ReceiverError`.

    ReceiverError
    ├── BadSignature   the request is not ours: no valid signature with any configured secret
    ├── BadEvent       signed by us, but not an event this library can order (no subject, a
    │                  sequence that is not a positive integer, a webhook-id that is not the id)
    └── BackfillError  the events API could not say what a gap holds (unreachable, an error
                       answer, or it does not know the very event that revealed the gap)

The first two are the sender's problem and answer 4xx; a backfill error only delays catching up.
"""

from __future__ import annotations


class ReceiverError(Exception):
    """Base of the receiver's own errors."""


class BadSignature(ReceiverError):
    """No configured secret verifies the request (or its timestamp is too far off)."""


class BadEvent(ReceiverError):
    """A verified body that is not an orderable event."""


class BackfillError(ReceiverError):
    """The events API did not answer what a gap holds; the gap waits and is tried again."""
