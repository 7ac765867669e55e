"""Database settings, read once from the environment."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgresql:///payments"


def database_url() -> str:
    """The libpq URL of the payments database (`DATABASE_URL`)."""
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def sqlalchemy_url(url: str) -> str:
    """The same URL for SQLAlchemy with the psycopg 3 driver."""
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg"
    return f"{scheme}://{rest}"


def maintenance_url(url: str) -> str:
    """The same server, database `postgres`: where CREATE DATABASE runs."""
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/postgres{query}"
