"""The relay's share-out of its slots (relay/fairness.py), rule by rule, without a relay.

The end-to-end promise (another merchant's events are not delayed) is tests/test_relay_fairness.py;
here each rule that makes it hold is checked on its own, deterministically.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime

from outbox.claim import Claimed
from outbox.envelope import Event
from relay.fairness import FairShare
from relay.retry import Attempt

_ids = itertools.count()
ANSWER = Attempt(204, None, 3)
NO_ANSWER = Attempt(None, "timed out after 2 s", 2000, unanswered=True)


def item(consumer: str, merchant: str) -> Claimed:
    n = next(_ids)
    event = Event(f"evt_{n}", "t.x", f"sub_{n}", 1, datetime.now(UTC), {}, merchant)
    return Claimed(consumer, uuid.uuid4(), 0, event, "https://example.com/", "whsec_AAAA")


def backlog(share: FairShare, consumer: str, merchant: str, count: int, now: float = 0.0) -> None:
    share.hold([item(consumer, merchant) for _ in range(count)], now)


def started(items: list[Claimed]) -> Counter[str]:
    return Counter(i.consumer for i in items)


def slow(share: FairShare, consumers: list[str], merchant: str, now: float = 0.0) -> None:
    """Each consumer has had an attempt here that got no answer (call before any backlog)."""
    for consumer in consumers:
        backlog(share, consumer, merchant, 1, now)
        [claimed], _ = share.take(now)
        share.observe(claimed.consumer, NO_ANSWER)
        share.done(claimed)


def test_slots_go_to_merchants_equally_then_to_their_endpoints() -> None:
    share = FairShare(8, depth=4, queue_wait=2.0)
    for n in range(4):
        backlog(share, f"we_a{n}", "mer_a", 20)
    backlog(share, "we_b", "mer_b", 20)
    for consumer in ["we_a0", "we_a1", "we_a2", "we_a3", "we_b"]:  # limits of 8: no borrowing
        share._endpoints[consumer].limit = 8.0
    start, _ = share.take(0.0)
    taken = started(start)
    assert sum(taken.values()) == 8
    assert taken["we_b"] == 4  # half of the slots, although A has four endpoints
    assert sorted(taken[f"we_a{n}"] for n in range(4)) == [1, 1, 1, 1]


def test_limits_grow_with_answers_and_halve_without() -> None:
    share = FairShare(32, depth=4, queue_wait=2.0)
    backlog(share, "we_a", "mer_a", 1)
    endpoint = share._endpoints["we_a"]
    assert endpoint.limit == 1
    for _ in range(10):
        share.observe("we_a", ANSWER)
    assert endpoint.limit == 11 and endpoint.answering
    share.observe("we_a", Attempt(429, "HTTP 429", 3))  # asks for less: no more
    share.observe("we_a", Attempt(503, "HTTP 503", 3))
    assert endpoint.limit == 11
    share.observe("we_a", NO_ANSWER)
    assert endpoint.limit == 5.5 and not endpoint.answering
    for _ in range(5):
        share.observe("we_a", NO_ANSWER)
    assert endpoint.limit == 1
    share.observe("we_a", Attempt(None, "URL refused: private address", 0))  # not its doing
    assert endpoint.limit == 1 and not endpoint.answering
    share.observe("we_a", Attempt(500, "HTTP 500", 3))  # an answer, whatever it says
    assert endpoint.limit == 2 and endpoint.answering
    for _ in range(100):
        share.observe("we_a", ANSWER)
    assert endpoint.limit == 32


def test_slow_endpoints_of_any_number_of_merchants_leave_the_reserve() -> None:
    """Forty merchants with an endpoint that hangs, each with a backlog: together they take
    C - R slots, and an endpoint that answers still finds the R others."""
    share = FairShare(32, depth=4, queue_wait=2.0)
    hanging = [(f"we_{n}", f"mer_{n}") for n in range(40)]
    for consumer, merchant in hanging:
        slow(share, [consumer], merchant)
    for consumer, merchant in hanging:
        backlog(share, consumer, merchant, 10)
    start, _ = share.take(0.0)
    assert len(start) == 32 - share.reserve == 28
    backlog(share, "we_b", "mer_b", share.reserve)
    share._endpoints["we_b"].limit = float(share.reserve)
    start, _ = share.take(0.0)
    assert started(start) == {"we_b": share.reserve}
    assert share.in_flight == 32


def test_a_merchant_never_takes_the_reserve() -> None:
    """Even with endpoints that answer and limits that allow everything: C - R at most, and the
    next merchant's delivery starts at once."""
    share = FairShare(32, depth=4, queue_wait=2.0)
    for n in range(16):
        backlog(share, f"we_a{n}", "mer_a", 20)
        share._endpoints[f"we_a{n}"].limit = 32.0
    start, _ = share.take(0.0)
    assert len(start) == 28
    backlog(share, "we_b", "mer_b", 1)
    start, _ = share.take(0.0)
    assert started(start) == {"we_b": 1}


def test_a_slow_endpoint_borrows_only_spare_slots_and_leaves_its_siblings_room() -> None:
    share = FairShare(32, depth=4, queue_wait=2.0)
    slow(share, ["we_hang"], "mer_a")
    backlog(share, "we_hang", "mer_a", 40)
    start, _ = share.take(0.0)
    # Beyond its limit of 1 it borrows while more than R are free, overall and in its
    # merchant's share: up to C - 2R, so the merchant's answering endpoints keep R.
    assert started(start) == {"we_hang": 32 - 2 * share.reserve}
    backlog(share, "we_ok", "mer_a", 10)
    start, _ = share.take(0.0)
    assert started(start) == {"we_ok": 1}  # within its limit of 1
    # Another merchant's endpoint that answers: its one within its limit, then spare slots
    # down to the reserve.
    backlog(share, "we_b", "mer_b", 10)
    start, _ = share.take(0.0)
    assert started(start) == {"we_b": 32 - 25 - share.reserve}
    assert share.slots - share.in_flight == share.reserve


def test_a_slow_endpoint_within_its_limit_is_not_starved_by_busy_ones() -> None:
    """Endpoints that answer keep every slot busy; one that hangs still gets its one attempt:
    the next free slot goes to its merchant, which has the fewest in flight."""
    share = FairShare(8, depth=4, queue_wait=2.0)
    slow(share, ["we_hang"], "mer_a")
    for n in range(3):
        backlog(share, f"we_busy{n}", f"mer_busy{n}", 50)
        share._endpoints[f"we_busy{n}"].limit = 8.0
    start, _ = share.take(0.0)
    assert len(start) == 8
    backlog(share, "we_hang", "mer_a", 5)
    assert share.take(0.0)[0] == []
    share.done(start[0])  # one busy attempt ends
    assert started(share.take(0.0)[0]) == {"we_hang": 1}


def test_deliveries_that_waited_too_long_are_given_back() -> None:
    share = FairShare(2, depth=4, queue_wait=2.0)
    backlog(share, "we_a", "mer_a", 3, now=0.0)
    start, stale = share.take(0.0)
    assert len(start) == 1 and stale == []  # C - R = 1 for one merchant
    start, stale = share.take(2.5)
    assert start == [] and len(stale) == 2
    assert share.waiting == 0 and share.in_flight == 1


def test_rooms_keep_the_claims_open_for_other_merchants() -> None:
    share = FairShare(32, depth=4, queue_wait=2.0)
    hanging = [f"we_a{n}" for n in range(4)]
    slow(share, hanging, "mer_a")
    for consumer in hanging:
        backlog(share, consumer, "mer_a", 4)
    rooms = share.rooms()
    # Slow endpoints hold no more than the slots they may take (C - 2R for one merchant).
    assert sum(rooms.consumers[c] for c in hanging) + 16 <= 32 - 2 * share.reserve
    share.take(0.0)
    rooms = share.rooms()
    assert all(rooms.consumers[c] >= 0 for c in hanging)
    held, room = rooms.merchants["mer_a"]
    assert held == share.held and room == share.merchant_hold_cap - held
    # A merchant never seen here may take the claim's default, and its endpoints theirs.
    assert rooms.merchant_default == 4 * (32 - share.reserve) and rooms.consumer_default == 4


def test_drop_and_drain_give_back_what_waits() -> None:
    share = FairShare(1, depth=4, queue_wait=2.0)
    backlog(share, "we_a", "mer_a", 3)
    backlog(share, "we_b", "mer_b", 2)
    start, _ = share.take(0.0)
    assert started(start) == {"we_a": 1}
    assert len(share.drop("we_a")) == 2  # disabled (a 410): its queue goes back at once
    assert started(share.drain()) == {"we_b": 2}  # shutdown
    assert share.waiting == 0 and share.in_flight == 1
