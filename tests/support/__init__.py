"""Helpers shared by the test suite: databases, a private PostgreSQL cluster, a TCP proxy and a
webhook receiver. Import the modules directly (`from tests.support.receiver import Receiver`)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def with_database(url: str, name: str) -> str:
    """The same server and options as `url`, database `name`.

    Built by hand because urlunsplit drops the `//` of socket URLs such as `postgresql:///x`.
    """
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{name}{query}"
