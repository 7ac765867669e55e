"""The webhook URL guard: at registration (check_url) and at send time (the resolver)."""

from __future__ import annotations

import ipaddress
import socket
import uuid
from datetime import UTC, datetime

import pytest

from outbox.claim import Claimed
from outbox.envelope import Event
from outbox.signing import new_secret
from outbox.urlguard import (
    GuardedResolver,
    UrlRefused,
    check_url,
    check_url_async,
    is_public,
    parse_networks,
)
from relay.settings import Settings
from relay.webhook import WebhookSender
from tests.support.receiver import Receiver

REFUSED_ADDRESSES = [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1",
    "100.127.255.254", "169.254.169.254", "169.254.1.1", "0.0.0.0", "224.0.0.1", "239.1.1.1",
    "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
    "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "fc00::1", "fd00:ec2::254", "fe80::1", "ff02::1", "64:ff9b::7f00:1", "2002:7f00:1::1",
    "2001:db8::1",
]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UrlRefused):
        check_url(f"https://{host}/hook")


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
    host = f"[{address}]" if ":" in address else address
    check_url(f"https://{host}/hook")


@pytest.mark.parametrize(
    "url",
    [
        "https://2130706433/",  # 127.0.0.1 in decimal
        "https://0x7f000001/",
        "https://0x7f.0.0.1/",
        "https://0177.0.0.1/",
        "https://127.1/",
        "https://017700000001/",
        "https://8.8.8.010/",  # a leading zero is octal to resolvers
    ],
)
def test_non_canonical_ipv4_notations_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused, match="non-canonical"):
        check_url(url, "127.0.0.0/8")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "example.com", "https:///path", "https://[fe80::1%25eth0]/",
            "javascript:alert(1)", "https://" + "a" * 3000 + ".com/"],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(url)


def test_host_names_are_resolved_and_checked() -> None:
    with pytest.raises(UrlRefused, match="non-public"):
        check_url("https://localhost/hook")
    with pytest.raises(UrlRefused, match="does not resolve"):
        check_url("https://no-such-host.invalid/hook")


def test_allowed_networks_admit_private_addresses_and_plain_http() -> None:
    check_url("http://127.0.0.1:8080/hook", "127.0.0.0/8")
    check_url("https://localhost/hook", parse_networks("127.0.0.0/8, ::1/128"))
    with pytest.raises(UrlRefused, match="http://"):
        check_url("http://8.8.8.8/hook", "127.0.0.0/8")  # public, but http
    with pytest.raises(UrlRefused):
        check_url("https://10.0.0.1/hook", "127.0.0.0/8")
    with pytest.raises(ValueError, match="CIDR"):
        parse_networks("127.0.0.0/8,nonsense")


async def test_async_variant() -> None:
    await check_url_async("http://127.0.0.1/hook", "127.0.0.0/8")
    with pytest.raises(UrlRefused):
        await check_url_async("https://localhost/hook")


async def test_resolver_refuses_what_the_policy_refuses() -> None:
    strict = GuardedResolver((), plain_http=False)
    with pytest.raises(UrlRefused):
        await strict.resolve("localhost", 443, socket.AF_UNSPEC)
    lenient = GuardedResolver(parse_networks("127.0.0.0/8,::1/128"), plain_http=True)
    results = await lenient.resolve("localhost", 80, socket.AF_INET)
    assert {r["host"] for r in results} == {"127.0.0.1"}


async def test_sender_checks_again_at_send_time(receiver: Receiver) -> None:
    secret = new_secret()
    url = receiver.add_endpoint("/hook", secret)
    event = Event("evt_1", "t.x", "s", 1, datetime.now(UTC), {})
    claimed = Claimed("we_1", uuid.uuid4(), 0, event, url, secret)
    by_name = Claimed("we_1", uuid.uuid4(), 0, event, url.replace("127.0.0.1", "localhost"),
                      secret)

    async with WebhookSender(Settings(allowed_networks=())) as sender:
        for item in (claimed, by_name):
            attempt = await sender.send(item)
            assert attempt.status_code is None
            assert attempt.error is not None and attempt.error.startswith("URL refused")
    assert receiver.receipts() == []

    allowed = parse_networks("127.0.0.0/8,::1/128")
    async with WebhookSender(Settings(allowed_networks=allowed)) as sender:
        assert (await sender.send(claimed)).status_code == 204
        assert (await sender.send(by_name)).status_code == 204
    assert len(receiver.accepted("/hook")) == 2
