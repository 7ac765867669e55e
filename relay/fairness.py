"""Which claimed webhook delivery gets the relay's next free slot: weighted fair sharing.

A relay has `slots` attempts in flight at most (`--concurrency`). Claimed deliveries wait here,
queued per endpoint, and whenever a slot is free the next one to start is chosen:

1. among merchants, the one with the fewest attempts in flight here (ties: the one served least
   recently); within it, the endpoint with the fewest in flight for its limit (ties alike). So
   slots are shared between merchants first, equally, then between a merchant's endpoints in
   proportion to their limits.
2. Each endpoint has a limit (AIMD): it starts at 1, grows by one with every answer (any status
   but 429 and 503, which ask for less), and halves, down to 1, with every attempt that got no
   answer (timeout, refused or dropped connection). An endpoint whose last attempt here got no
   answer is *slow* until it answers again.
3. An endpoint within its limit may take any free slot, except that slow endpoints together hold
   at most `slots - reserve`, and a merchant's slow endpoints at most `slots - 2 * reserve`.
   Beyond its limit an endpoint may only borrow: while more than `reserve` slots are free, and
   more than `reserve` of its merchant's.
4. A merchant holds at most `slots - reserve` slots.

So however many endpoints are slow, of however many merchants, `reserve` slots (an eighth, at
least one) are only ever taken by endpoints that answer, which turn them over as fast as they
answer; an endpoint's deliveries never queue behind another merchant's, and a merchant whose
endpoints hang still gets attempts: its limits' worth, and whatever it can borrow. What an
endpoint that starts hanging holds when it starts is held until those attempts time out.

The queues are bounded too, so that claims always have room for other merchants: an endpoint
waits with at most `depth` times its limit, a merchant holds (in flight and waiting) at most
`depth * (slots - reserve)`, and slow endpoints hold no more than the slots they may take, so a
relay does not sit on deliveries of a hanging endpoint that another relay could start. `rooms()`
tells the claim what each may still take. A delivery that waited `queue_wait` seconds is given
back instead of started (relay/settings.py: the lease covers that wait).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from outbox.claim import Claimed
from relay.retry import RETRY_AFTER_STATUSES, Attempt

INITIAL_LIMIT = 1.0
FORGET_AFTER = 300.0  # seconds an idle endpoint's limit is remembered


@dataclass(slots=True)
class _Endpoint:
    merchant: str
    limit: float = INITIAL_LIMIT
    answering: bool = True  # no attempt here yet counts as answering
    in_flight: int = 0
    served: int = 0
    seen: float = 0.0
    waiting: deque[tuple[float, Claimed]] = field(default_factory=deque)

    @property
    def cap(self) -> int:
        return int(self.limit)


@dataclass(slots=True)
class _Merchant:
    in_flight: int = 0
    slow_in_flight: int = 0
    waiting: int = 0
    slow_waiting: int = 0
    served: int = 0
    queued: set[str] = field(default_factory=set)  # its endpoints with deliveries waiting


@dataclass(frozen=True, slots=True)
class Rooms:
    """What a claim may take: per consumer known here, per merchant known here (with how many
    it holds here, so that merchants holding little come first), and the defaults for others."""

    consumers: dict[str, int]
    merchants: dict[str, tuple[int, int]]  # merchant -> (held here, room)
    consumer_default: int
    merchant_default: int


class FairShare:
    def __init__(self, slots: int, *, depth: int, queue_wait: float) -> None:
        self.slots = slots
        self.reserve = max(1, slots // 8) if slots > 1 else 0
        self.merchant_cap = slots - self.reserve
        self.slow_cap = slots - self.reserve
        self.merchant_slow_cap = max(1, self.merchant_cap - self.reserve)
        self.depth = depth
        self.hold_cap = depth * slots
        self.merchant_hold_cap = depth * self.merchant_cap
        self.queue_wait = queue_wait
        self.in_flight = 0
        self.waiting = 0
        self._slow_in_flight = 0
        self._slow_waiting = 0
        self._endpoints: dict[str, _Endpoint] = {}
        self._merchants: dict[str, _Merchant] = {}
        self._turns = itertools.count(1)
        self._forgotten_at = 0.0

    @property
    def held(self) -> int:
        return self.in_flight + self.waiting

    # --- queueing -------------------------------------------------------------------------------

    def hold(self, items: Iterable[Claimed], now: float) -> None:
        for item in items:
            e = self._endpoint(item, now)
            m = self._merchants.setdefault(e.merchant, _Merchant())
            e.waiting.append((now, item))
            m.waiting += 1
            m.queued.add(item.consumer)
            self.waiting += 1
            if not e.answering:
                m.slow_waiting += 1
                self._slow_waiting += 1

    def take(self, now: float) -> tuple[list[Claimed], list[Claimed]]:
        """(deliveries to start now, in order; deliveries that waited too long, to give back).
        Those to start count as in flight until `done`."""
        stale = self._stale(now)
        start: list[Claimed] = []
        while self.in_flight < self.slots:
            picked = self._pick()
            if picked is None:
                break
            consumer, e = picked
            _, item = self._pop(consumer, e)
            m = self._merchants[e.merchant]
            e.in_flight += 1
            e.served = m.served = next(self._turns)
            e.seen = now
            m.in_flight += 1
            self.in_flight += 1
            if not e.answering:
                m.slow_in_flight += 1
                self._slow_in_flight += 1
            start.append(item)
        self._forget(now)
        return start, stale

    def drop(self, consumer: str) -> list[Claimed]:
        """Remove and return the deliveries of `consumer` waiting here (it was disabled)."""
        e = self._endpoints.get(consumer)
        out: list[Claimed] = []
        while e is not None and e.waiting:
            out.append(self._pop(consumer, e)[1])
        return out

    def drain(self) -> list[Claimed]:
        """Remove and return every waiting delivery (shutdown)."""
        return [item for consumer in list(self._endpoints) for item in self.drop(consumer)]

    # --- attempts -------------------------------------------------------------------------------

    def observe(self, consumer: str, attempt: Attempt) -> None:
        """Adjust the endpoint's limit to what its attempt says about it."""
        e = self._endpoints.get(consumer)
        if e is None:
            return
        if attempt.status_code is not None:
            if attempt.status_code not in RETRY_AFTER_STATUSES:
                e.limit = min(float(self.slots), e.limit + 1.0)
            self._set_answering(e, True)
        elif attempt.unanswered:
            e.limit = max(1.0, e.limit / 2)
            self._set_answering(e, False)

    def done(self, item: Claimed) -> None:
        """An attempt started by `take` ended (whatever became of it)."""
        e = self._endpoints[item.consumer]
        m = self._merchants[e.merchant]
        e.in_flight -= 1
        m.in_flight -= 1
        self.in_flight -= 1
        if not e.answering:
            m.slow_in_flight -= 1
            self._slow_in_flight -= 1

    # --- what claims may bring ------------------------------------------------------------------

    def rooms(self) -> Rooms:
        merchants: dict[str, tuple[int, int]] = {}
        for name, m in self._merchants.items():
            held = m.in_flight + m.waiting
            merchants[name] = (held, max(0, self.merchant_hold_cap - held))
        # Slow endpoints hold no more than the slots they may take: what is left of those is
        # split evenly between the merchants with slow endpoints, then between those endpoints.
        slow: dict[str, int] = {}
        for e in self._endpoints.values():
            if not e.answering:
                slow[e.merchant] = slow.get(e.merchant, 0) + 1
        slow_room = self.slow_cap - self._slow_in_flight - self._slow_waiting
        per_merchant = -(-max(0, slow_room) // len(slow)) if slow else 0
        consumers: dict[str, int] = {}
        for consumer, e in self._endpoints.items():
            room = max(0, self.depth * max(1, e.cap) - len(e.waiting))
            if not e.answering:
                m = self._merchants[e.merchant]
                allowance = min(per_merchant,
                                self.merchant_slow_cap - m.slow_in_flight - m.slow_waiting)
                room = min(room, -(-max(0, allowance) // slow[e.merchant]))
            consumers[consumer] = min(room, merchants[e.merchant][1])
        return Rooms(consumers, merchants, self.depth * int(INITIAL_LIMIT),
                     self.merchant_hold_cap)

    # --- internals ------------------------------------------------------------------------------

    def _endpoint(self, item: Claimed, now: float) -> _Endpoint:
        e = self._endpoints.get(item.consumer)
        if e is None:
            e = self._endpoints[item.consumer] = _Endpoint(item.event.merchant_id or "")
        e.seen = now
        return e

    def _pick(self) -> tuple[str, _Endpoint] | None:
        free = self.slots - self.in_flight
        best: tuple[str, _Endpoint] | None = None
        best_key: tuple[int, int, float, int] | None = None
        for m in self._merchants.values():
            if not m.queued or m.in_flight >= self.merchant_cap:
                continue
            lendable = free > self.reserve and self.merchant_cap - m.in_flight > self.reserve
            for consumer in m.queued:
                e = self._endpoints[consumer]
                within = e.in_flight < e.cap
                if not e.answering and (self._slow_in_flight >= self.slow_cap
                                        or m.slow_in_flight >= self.merchant_slow_cap):
                    continue
                if not within and not lendable:
                    continue
                key = (m.in_flight, m.served, e.in_flight / max(e.limit, 1.0), e.served)
                if best_key is None or key < best_key:
                    best, best_key = (consumer, e), key
        return best

    def _pop(self, consumer: str, e: _Endpoint) -> tuple[float, Claimed]:
        claimed_at, item = e.waiting.popleft()
        m = self._merchants[e.merchant]
        m.waiting -= 1
        self.waiting -= 1
        if not e.answering:
            m.slow_waiting -= 1
            self._slow_waiting -= 1
        if not e.waiting:
            m.queued.discard(consumer)
        return claimed_at, item

    def _stale(self, now: float) -> list[Claimed]:
        stale: list[Claimed] = []
        for m in self._merchants.values():
            for consumer in list(m.queued):
                e = self._endpoints[consumer]
                while e.waiting and now - e.waiting[0][0] > self.queue_wait:
                    stale.append(self._pop(consumer, e)[1])
        return stale

    def _set_answering(self, e: _Endpoint, answering: bool) -> None:
        if e.answering == answering:
            return
        e.answering = answering
        sign = -1 if answering else 1
        m = self._merchants[e.merchant]
        m.slow_in_flight += sign * e.in_flight
        m.slow_waiting += sign * len(e.waiting)
        self._slow_in_flight += sign * e.in_flight
        self._slow_waiting += sign * len(e.waiting)

    def _forget(self, now: float) -> None:
        """Drop the state of endpoints idle for FORGET_AFTER (checked every few seconds)."""
        if now - self._forgotten_at < 10.0:
            return
        self._forgotten_at = now
        for consumer, e in list(self._endpoints.items()):
            if not e.in_flight and not e.waiting and now - e.seen > FORGET_AFTER:
                del self._endpoints[consumer]
        used = {e.merchant for e in self._endpoints.values()}
        for merchant in [m for m in self._merchants if m not in used]:
            del self._merchants[merchant]
