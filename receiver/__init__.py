"""Receiving our webhooks exactly once and in order, in the receiver's own PostgreSQL.

`Inbox` verifies each request's Standard Webhooks signature (several secrets, for rotations),
then applies the event with the receiver's handler in the same transaction that records its
`webhook-id` in an inbox table and moves its subject's sequence on. Duplicates are acknowledged
without a second effect; an event that arrives ahead of a gap is held and the gap is filled from
the sender's events API, so each subject's events are applied in `sequence` order.
`receiver.asgi` serves it from Starlette; `python -m receiver migrate` creates its tables;
`python -m receiver.example` is a complete receiver. See docs/receiver.md.
"""

from receiver.admit import Handler, Outcome
from receiver.backfill import EventsApi, EventsSource
from receiver.errors import BackfillError, BadEvent, BadSignature, ReceiverError
from receiver.event import ReceivedEvent, parse_event, sequence_number
from receiver.inbox import Inbox
from receiver.migrate import migrate

__all__ = [
    "BackfillError",
    "BadEvent",
    "BadSignature",
    "EventsApi",
    "EventsSource",
    "Handler",
    "Inbox",
    "Outcome",
    "ReceivedEvent",
    "ReceiverError",
    "migrate",
    "parse_event",
    "sequence_number",
]
