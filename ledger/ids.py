"""Opaque, prefixed, time-ordered ids (`pay_01J…`).

The body is 26 Crockford base32 characters: 10 for the milliseconds, 2 for the microsecond within
the millisecond, then 14 random (70 bits), so ids sort by creation time and list cursors can
compare ids. Within one process ids are strictly increasing (the random part is incremented when
the clock has not moved). The SQL function `restamp_ids` (used by `ledger_create_payment`) writes
the same time prefix from the database's clock once the accounts are locked, so ledger entries
of one account sort in the order they were applied.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last_us = 0
_last_rand = 0


# Two base32 characters per 10 bits: an id's 26 characters are 13 table lookups.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode(value: int, length: int) -> str:
    """`value` as `length` Crockford base32 characters, most significant first (`length` even)."""
    return "".join(_PAIRS[(value >> shift) & 1023] for shift in range(5 * length - 10, -1, -10))


def new_id(prefix: str) -> str:
    global _last_us, _last_rand
    with _lock:
        us = time.time_ns() // 1_000
        if us <= _last_us:
            us = _last_us
            rand = _last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(9), "big") >> 3  # 69 bits: room to increment
        _last_us, _last_rand = us, rand
    return f"{prefix}_{_encode(((us // 1000) << 80) | ((us % 1000) << 70) | rand, 26)}"

