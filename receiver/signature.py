"""Verifying Standard Webhooks signatures with the `standardwebhooks` package.

Several secrets may be configured at once, which is how a receiver rides through a secret
rotation: while the sender's overlap window lasts, each request carries one `v1,` signature per
valid secret, and a request is accepted when any configured secret verifies any of them. Deploy
the new secret next to the old one, then drop the old one once the window is over.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping, Sequence

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError, WebhookVerificationError

from receiver.errors import BadSignature


class SignatureVerifier:
    """Checks `webhook-id`, `webhook-timestamp` (within five minutes, the package's tolerance)
    and `webhook-signature` against the raw body."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is needed")
        self._webhooks: list[Webhook] = []
        for secret in secrets:
            try:
                self._webhooks.append(Webhook(secret))
            except (EmptyWebhookSecretError, binascii.Error, ValueError):
                raise ValueError("a webhook secret is not a whsec_ base64 secret") from None

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Returns when some secret verifies the request; raises BadSignature otherwise."""
        plain = {name.lower(): value for name, value in headers.items()}
        reason = "no signature"
        for webhook in self._webhooks:
            try:
                webhook.verify(body, plain, json_parse=False)
                return
            except WebhookVerificationError as exc:
                reason = str(exc)
            except ValueError:  # a body that is not UTF-8, a signature that is not base64, …
                reason = "malformed signature headers or body"
        raise BadSignature(reason)
