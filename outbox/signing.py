"""Standard Webhooks signatures (docs/api.md, Webhooks).

`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the
base64-decoded part of the endpoint's `whsec_` secret. While a rotated-out secret is still valid
the header carries one signature per secret, space-separated, the current secret's first
(`v1,<new> v1,<old>`), as the Standard Webhooks specification allows: a receiver that verifies
with either secret accepts the request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (unpadded base64 is accepted, as the spec's SDKs do)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_all(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value signed with each key in turn (current key first)."""
    if not keys:
        raise ValueError("no signing key")
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def new_secret() -> str:
    """A fresh `whsec_` secret: 24 random bytes, as the Standard Webhooks SDKs generate."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()
