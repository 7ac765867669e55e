"""Standard Webhooks signatures (docs/api.md, Webhooks).

`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the
base64-decoded part of the endpoint's `whsec_` secret. While a rotated-out secret is still valid
the header carries one signature per secret, space-separated, the current secret's first
(`v1,<new> v1,<old>`), as the Standard Webhooks specification allows: a receiver that verifies
with either secret accepts the request.

`verify` is the receiving side (`paymentsctl listen`), as the specification's libraries do it:
the three headers present, the timestamp within TOLERANCE of now, and one `v1` signature equal
(in constant time) to the one computed with the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"
TOLERANCE = 5 * 60  # seconds a webhook-timestamp may differ from the receiver's clock


class SignatureRefused(ValueError):
    """A request that does not verify; the message says why."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (unpadded base64 is accepted, as the spec's SDKs do)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    return "v1," + base64.b64encode(_digest(key, msg_id, timestamp, body)).decode()


def sign_all(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value signed with each key in turn (current key first)."""
    if not keys:
        raise ValueError("no signing key")
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def new_secret() -> str:
    """A fresh `whsec_` secret: 24 random bytes, as the Standard Webhooks SDKs generate."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def verify(key: bytes, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
    """Raise SignatureRefused unless `body` with `headers` (names in lower case) is signed with
    `key` and timestamped within TOLERANCE of `now`."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    header = headers.get("webhook-signature")
    if not (msg_id and stamp and header):
        raise SignatureRefused("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise SignatureRefused(f"webhook-timestamp {stamp[:40]!r} is not a number") from None
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE:
        raise SignatureRefused(f"webhook-timestamp {timestamp} is too far from now")
    expected = _digest(key, msg_id, timestamp, body)
    for candidate in header.split(" "):
        version, _, signature = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, given):
            return
    raise SignatureRefused("no signature matches the secret")
