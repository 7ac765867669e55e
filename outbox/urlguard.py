"""The webhook URL guard: where a webhook may be sent (docs/api.md, URL rules).

A URL is accepted when its scheme is `https` and every address its host resolves to is a public
unicast address, or when every address lies inside one of the operator's allowed networks
(`OUTBOX_WEBHOOK_ALLOWED_NETWORKS`), in which case `http` is accepted too.

Refused: private (RFC 1918, fc00::/7), loopback, link-local (including the cloud metadata
addresses 169.254.169.254 and fd00:ec2::254), CGNAT 100.64.0.0/10, unspecified, multicast,
reserved and documentation ranges; IPv4 hidden in IPv6 (::ffff:127.0.0.1, NAT64, 6to4, Teredo) is
judged by its IPv4 address; numeric hosts that are not canonical dotted quads (2130706433,
0x7f.1, 0177.0.0.1) are refused outright, because resolvers read them as addresses but people and
naive checks do not.

The check runs at registration (`check_url`, `check_url_async`) and again at send time:
`GuardedResolver` is the aiohttp resolver of the relay's sessions, so the connection goes to an
address that was just checked, not to whatever a second DNS lookup returns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)

# Not covered (or not covered on every Python) by ipaddress's is_global.
_ALWAYS_REFUSED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "192.0.0.0/24",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
        "::/128",
        "::1/128",
        "100::/64",
        "2001:db8::/32",
    )
)


class UrlRefused(ValueError):
    """The URL may not receive webhooks. The message says why, for the API's `detail`."""

    code = "url_refused"


def parse_networks(text: str | Iterable[str]) -> tuple[Network, ...]:
    """`"127.0.0.0/8, 10.1.0.0/16"` (or a list of CIDRs) as networks; ValueError names a bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[Network] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not a network in CIDR form: {item!r}") from None
    return tuple(out)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in ipaddress.IPv6Network("::/96") and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # deprecated IPv4-compatible
    return None


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        inner = _embedded_ipv4(address)
        if inner is not None:
            return is_public(inner)
    if any(address in net for net in _ALWAYS_REFUSED if net.version == address.version):
        return False
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def _allowed(address: IPAddress, allowed: Sequence[Network]) -> bool:
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(a in net for a in candidates for net in allowed if net.version == a.version)


def check_address(address: IPAddress, allowed: Sequence[Network], *, plain_http: bool) -> None:
    """Raise UrlRefused unless a webhook may connect to `address`."""
    if _allowed(address, allowed):
        return
    if plain_http:
        raise UrlRefused(
            "http:// is accepted only for allowed networks; this host is not in one "
            "(use https://)"
        )
    if not is_public(address):
        # The address itself stays out of the message: it would tell a caller what a name
        # resolves to inside our network.
        raise UrlRefused("the URL's host is a non-public address (private, loopback, reserved)")


@dataclass(frozen=True, slots=True)
class Target:
    """A URL that passed the static checks."""

    scheme: str
    host: str
    port: int
    literal: IPAddress | None

    @property
    def plain_http(self) -> bool:
        return self.scheme == "http"


def parse_url(url: str) -> Target:
    """Static checks (scheme, host form) without resolving; raises UrlRefused."""
    if not isinstance(url, str) or len(url) > 2048:
        raise UrlRefused("the URL must be a string of at most 2048 characters")
    if any(ch == "\\" or ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        # Parsers disagree on backslashes and control characters in the authority
        # (https://127.0.0.1\@example.com); refuse them rather than guess which host is meant.
        raise UrlRefused("the URL must not contain backslashes, spaces or control characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise UrlRefused("the URL must start with https://")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("the URL has no host")
    if "%" in host:
        raise UrlRefused("IPv6 zone identifiers are not accepted")
    literal: IPAddress | None = None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        if all(_NUMERIC_PART.match(label) for label in labels if label):
            raise UrlRefused(
                f"{host!r} is an IPv4 address in a non-canonical notation; "
                "write it as a dotted quad or use a host name"
            ) from None
    return Target(scheme, host.lower(), port or (443 if scheme == "https" else 80), literal)


def _check_all(target: Target, addresses: Iterable[IPAddress], allowed: Sequence[Network]) -> None:
    found = False
    for address in addresses:
        found = True
        check_address(address, allowed, plain_http=target.plain_http)
    if not found:
        raise UrlRefused(f"{target.host} does not resolve to any address")


def _addresses(infos: Iterable[tuple[Any, ...]]) -> list[IPAddress]:
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def check_url(url: str, allowed_networks: Sequence[Network] | str = ()) -> None:
    """Registration check (blocking DNS). Raises UrlRefused with a readable reason."""
    allowed = parse_networks(allowed_networks) if isinstance(allowed_networks, str) else (
        allowed_networks
    )
    target = parse_url(url)
    if target.literal is not None:
        _check_all(target, [target.literal], allowed)
        return
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"{target.host} does not resolve: {exc}") from None
    _check_all(target, _addresses(infos), allowed)


async def check_url_async(url: str, allowed_networks: Sequence[Network] | str = ()) -> None:
    """The same check without blocking the event loop."""
    allowed = parse_networks(allowed_networks) if isinstance(allowed_networks, str) else (
        allowed_networks
    )
    target = parse_url(url)
    if target.literal is not None:
        _check_all(target, [target.literal], allowed)
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"{target.host} does not resolve: {exc}") from None
    _check_all(target, _addresses(infos), allowed)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that only ever returns addresses that passed `check_address`.

    One instance serves one policy: the relay keeps a session for https URLs and another for
    http URLs (allowed networks only), because a resolver is not told the scheme. aiohttp does not
    consult the resolver for IP-literal hosts, so the sender checks those itself (`parse_url`).
    """

    def __init__(self, allowed: Sequence[Network], *, plain_http: bool) -> None:
        self._inner = ThreadedResolver()
        self._allowed = tuple(allowed)
        self._plain_http = plain_http

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        target = Target("http" if self._plain_http else "https", host, port, None)
        # Any refused address refuses the host: a name that mixes public and private answers is
        # a rebinding attempt, not a multi-homed receiver.
        _check_all(target, (ipaddress.ip_address(r["host"]) for r in results), self._allowed)
        return results

    async def close(self) -> None:
        await self._inner.close()
