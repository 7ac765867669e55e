"""Standard Webhooks signatures, checked against the standardwebhooks package."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from outbox.signing import SignatureRefused, new_secret, secret_key, sign, verify


def test_signature_verifies_with_the_reference_package() -> None:
    secret = new_secret()
    body = b'{"id":"evt_1","data":{"amount":5}}'
    now = int(time.time())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret_key(secret), "evt_1", now, body),
    }
    assert Webhook(secret).verify(body, headers) == {"id": "evt_1", "data": {"amount": 5}}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_known_vector() -> None:
    # The example of the Standard Webhooks specification.
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_secrets() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert secret_key("whsec_AAAA") == b"\x00\x00\x00"
    with pytest.raises(ValueError):
        secret_key("whsec_")
    with pytest.raises(ValueError):
        secret_key("whsec_***")


def test_verify_agrees_with_the_reference_package() -> None:
    """outbox.signing.verify (what `paymentsctl listen` checks) accepts and refuses exactly what
    standardwebhooks' Webhook.verify does."""
    secret, other = new_secret(), new_secret()
    key = secret_key(secret)
    body = b'{"id":"evt_1"}'
    now = int(time.time())
    good = sign(key, "evt_1", now, body)
    cases: list[tuple[str, dict[str, str], bytes]] = [
        ("valid", {"webhook-id": "evt_1", "webhook-timestamp": str(now),
                   "webhook-signature": good}, body),
        ("two signatures, ours second", {
            "webhook-id": "evt_1", "webhook-timestamp": str(now),
            "webhook-signature": f"{sign(secret_key(other), 'evt_1', now, body)} {good}"}, body),
        ("another body", {"webhook-id": "evt_1", "webhook-timestamp": str(now),
                          "webhook-signature": good}, body + b" "),
        ("another id", {"webhook-id": "evt_2", "webhook-timestamp": str(now),
                        "webhook-signature": good}, body),
        ("another secret", {"webhook-id": "evt_1", "webhook-timestamp": str(now),
                            "webhook-signature": sign(secret_key(other), "evt_1", now, body)},
         body),
        ("too old", {"webhook-id": "evt_1", "webhook-timestamp": str(now - 3600),
                     "webhook-signature": sign(key, "evt_1", now - 3600, body)}, body),
        ("from the future", {"webhook-id": "evt_1", "webhook-timestamp": str(now + 3600),
                             "webhook-signature": sign(key, "evt_1", now + 3600, body)}, body),
        ("no signature", {"webhook-id": "evt_1", "webhook-timestamp": str(now)}, body),
        ("v2 only", {"webhook-id": "evt_1", "webhook-timestamp": str(now),
                     "webhook-signature": "v2," + good[3:]}, body),
    ]
    for name, headers, payload in cases:
        try:
            Webhook(secret).verify(payload, headers)
            reference = True
        except WebhookVerificationError:
            reference = False
        try:
            verify(key, headers, payload)
            ours = True
        except SignatureRefused:
            ours = False
        assert ours == reference, name
    assert sum(1 for name, _, _ in cases if name.startswith(("valid", "two"))) == 2
