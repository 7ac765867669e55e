"""Configuration of a receiver process from its environment, read once at start-up.

- `RECEIVER_DATABASE_URL`: the receiver's own PostgreSQL (libpq URL); default
  `postgresql:///receiver`.
- `RECEIVER_WEBHOOK_SECRETS`: the endpoint's `whsec_` secrets, comma-separated (two during a
  rotation); required to serve.
- `RECEIVER_EVENTS_URL`: base URL of the payments API, to backfill gaps; without it, no backfill.
- `RECEIVER_API_KEY`: the merchant's secret key (`sk_…`) for `GET /v1/events`; required with the
  URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_DATABASE_URL = "postgresql:///receiver"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class ReceiverSettings:
    database_url: str = DEFAULT_DATABASE_URL
    secrets: tuple[str, ...] = ()
    events_url: str | None = None
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ReceiverSettings:
        env = os.environ if env is None else env
        secrets = tuple(
            s.strip() for s in env.get("RECEIVER_WEBHOOK_SECRETS", "").split(",") if s.strip()
        )
        for secret in secrets:
            if not secret.startswith("whsec_"):
                raise SettingsError("RECEIVER_WEBHOOK_SECRETS: each secret starts with whsec_")
        events_url = env.get("RECEIVER_EVENTS_URL") or None
        api_key = env.get("RECEIVER_API_KEY") or None
        if events_url is not None:
            if not events_url.startswith(("http://", "https://")):
                raise SettingsError("RECEIVER_EVENTS_URL must be an http:// or https:// URL")
            if api_key is None:
                raise SettingsError("RECEIVER_EVENTS_URL needs RECEIVER_API_KEY (sk_…)")
        return cls(
            database_url=env.get("RECEIVER_DATABASE_URL") or DEFAULT_DATABASE_URL,
            secrets=secrets,
            events_url=events_url,
            api_key=api_key,
        )
