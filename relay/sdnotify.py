"""A minimal sd_notify(3) client: tells systemd about readiness, health and shutdown.

Without `NOTIFY_SOCKET` (not started by systemd as `Type=notify`) every call is a no-op, so the
daemon calls these unconditionally. A failed send is logged and reported as False, never raised:
losing one watchdog ping must not take the relay down (systemd notices if pings stop for good).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        # Linux abstract namespace: systemd writes the leading NUL byte as '@'.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path; notifications disabled", address)
    return None


def notify(message: str) -> bool:
    """Send one notification datagram, e.g. "READY=1". True when it was sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking: the relay calls this from its event loop, and a full receive
            # queue on systemd's side must not stall it.
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message.split("=", 1)[0], exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    # The protocol is newline-separated assignments; a newline would end the status early.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not watched.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; a child that merely
    inherited the environment must not ping on its parent's behalf.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000
