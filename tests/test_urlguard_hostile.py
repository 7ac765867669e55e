"""Hostile webhook URLs, refused by the guard itself (`check_url`, `check_url_async`) and by the
API where merchants register them (`POST /v1/webhook_endpoints`, `PATCH` with `url`).

docs/api.md (URL rules): `https://` only, never into private, loopback, link-local or metadata
networks, except inside OUTBOX_WEBHOOK_ALLOWED_NETWORKS (where `http://` is allowed too).

Names are resolved by a fake resolver (socket.getaddrinfo patched for `*.example` names), so a name
that resolves to a private address needs no DNS server; `localhost` goes to the real one.
Sending (the relay's second check, redirects not followed) is covered with the relay's tests.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import yarl

from ledger.merchants import NewKey
from outbox.urlguard import UrlRefused, check_url, check_url_async, parse_url
from tests.apihelpers import Api, assert_problem, created, query, snapshot, start_api
from tests.support.receiver import Receiver, Reply

PUBLIC = "93.184.216.34"

FAKE_DNS: dict[str, list[str]] = {
    "internal.example": ["10.0.0.7"],
    "corp.example": ["172.20.1.1", "192.168.7.7"],
    "metadata.example": ["169.254.169.254"],
    "cgnat.example": ["100.64.1.1"],
    "zero.example": ["0.0.0.0"],
    "loop6.example": ["::1"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "ula.example": ["fd12:3456::1"],
    "linklocal6.example": ["fe80::1"],
    "rebind.example": [PUBLIC, "127.0.0.1"],  # one public and one private answer
    "public.example": [PUBLIC],
    "public6.example": ["2606:2800:220:1:248:1893:25c8:1946"],
}


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Resolve the *.example names above; record every name looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        looked_up.append(name)
        name = name.lower().rstrip(".")
        if name.endswith(".example"):
            if name not in FAKE_DNS:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            out = []
            for addr in FAKE_DNS[name]:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                sockaddr: tuple[Any, ...] = (addr, port or 443)
                if family == socket.AF_INET6:
                    sockaddr = (addr, port or 443, 0, 0)
                out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            return out
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.delenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", raising=False)
    return looked_up


# Every one of these is refused with no allowed networks.
HOSTILE: list[str] = [
    # private, loopback, link-local, metadata, CGNAT, unspecified, and the other special ranges
    "https://127.0.0.1/hook",
    "https://127.255.255.254/hook",
    "https://10.0.0.1/hook",
    "https://172.16.0.1/hook",
    "https://172.31.255.255/hook",
    "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://169.254.0.1/hook",
    "https://100.64.0.1/hook",
    "https://100.127.255.254/hook",
    "https://0.0.0.0/hook",
    "https://198.18.0.1/hook",
    "https://192.0.0.1/hook",
    "https://192.0.2.1/hook",
    "https://224.0.0.1/hook",
    "https://240.0.0.1/hook",
    "https://255.255.255.255/hook",
    # IPv6 forms
    "https://[::1]/hook",
    "https://[0:0:0:0:0:0:0:1]/hook",
    "https://[::]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::ffff:7f00:1]/hook",
    "https://[::ffff:169.254.169.254]/hook",
    "https://[::ffff:10.0.0.1]/hook",
    "https://[::127.0.0.1]/hook",  # IPv4-compatible (deprecated)
    "https://[::10.0.0.1]/hook",
    "https://[::ffff:0:7f00:1]/hook",  # SIIT
    "https://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
    "https://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of the metadata address
    "https://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
    "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook",  # Teredo of 127.0.0.1
    "https://[fc00::1]/hook",
    "https://[fd00:ec2::254]/hook",  # the AWS IPv6 metadata address
    "https://[fe80::1]/hook",
    "https://[fe80::1%25eth0]/hook",  # zone identifier
    "https://[ff02::1]/hook",
    "https://[2001:db8::1]/hook",
    "https://[100::1]/hook",
    # IPv4 in notations resolvers accept and naive checks do not
    "https://2130706433/hook",  # decimal
    "https://0x7f000001/hook",  # hexadecimal
    "https://017700000001/hook",  # octal
    "https://0177.0.0.1/hook",
    "https://0x7f.1/hook",
    "https://0x7f.0x0.0x0.0x1/hook",
    "https://127.1/hook",  # short forms
    "https://127.0.1/hook",
    "https://10.1/hook",
    "https://0/hook",
    "https://127.0.0.01/hook",
    "https://127.000.000.001/hook",
    "https://169.254.43518/hook",  # 169.254.169.254 with the last two parts as one
    "https://2852039166/hook",  # 169.254.169.254 as one number
    "https://127.0.0.1./hook",  # trailing dot
    "https://127。0。0。1/hook",  # ideographic full stops, which IDNA reads as dots
    "https://①②⑦.0.0.1/hook",  # circled digits, which NFKC turns into 127
    # names that resolve into refused networks
    "https://localhost/hook",
    "https://LOCALHOST./hook",
    "https://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/hook",  # NFKC: localhost
    "https://internal.example/hook",
    "https://corp.example/hook",
    "https://metadata.example/latest/meta-data/",
    "https://cgnat.example/hook",
    "https://zero.example/hook",
    "https://loop6.example/hook",
    "https://mapped.example/hook",
    "https://ula.example/hook",
    "https://linklocal6.example/hook",
    "https://rebind.example/hook",
    "https://nowhere.example/hook",  # does not resolve at all
    # userinfo and delimiter tricks: the host is the part after the last @ of the authority
    "https://good.example@127.0.0.1/hook",
    f"https://{PUBLIC}@127.0.0.1/hook",
    f"https://{PUBLIC}:443@169.254.169.254/hook",
    "https://public.example@internal.example/hook",
    f"https://127.0.0.1#@{PUBLIC}/hook",
    f"https://127.0.0.1?@{PUBLIC}/hook",
    f"https://{PUBLIC}\\@127.0.0.1/hook",
    # WHATWG parsers (browsers, many HTTP clients) end the authority at a backslash, so the host
    # of these is the private one; urllib reads the part after the @.
    f"https://127.0.0.1\\@{PUBLIC}/hook",
    "https://internal.example\\@public.example/hook",
    "https://127.0.0.1\t/hook",
    " https://127.0.0.1/hook",
    # plain http to a public address, other schemes, no host
    f"http://{PUBLIC}/hook",
    "http://public.example/hook",
    f"HTTP://{PUBLIC}/hook",
    f"ftp://{PUBLIC}/hook",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "javascript:alert(1)",
    "data:text/plain,hi",
    f"//{PUBLIC}/hook",
    f"{PUBLIC}/hook",
    "https:///hook",
    "https://:443/hook",
    f"https://{PUBLIC}:99999/hook",
    f"https://{PUBLIC}:-1/hook",
    "https://" + "a" * 2050 + ".example/hook",
    "",
]

# Accepted with no allowed networks: the positive control for the list above.
ACCEPTED = [
    f"https://{PUBLIC}/hook",
    f"https://{PUBLIC}:8443/hook?x=1#frag",
    "https://public.example/hook",
    "https://PUBLIC.example./hook",
    "https://public6.example/hook",
    "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
    "https://1.1.1.1/hook",
    # A public host whose path or query mentions private addresses (the relay does not follow
    # redirects, so nothing here can lead it elsewhere).
    f"https://{PUBLIC}/redirect?to=http://169.254.169.254/",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        check_url(url)
    assert str(refused.value), "a refusal says why"


@pytest.mark.parametrize("url", HOSTILE)
async def test_check_url_async_refuses(url: str) -> None:
    with pytest.raises(UrlRefused):
        await check_url_async(url)


@pytest.mark.parametrize("url", ACCEPTED)
async def test_public_urls_are_accepted(url: str) -> None:
    check_url(url)
    await check_url_async(url)


def test_http_and_private_addresses_only_inside_allowed_networks() -> None:
    allowed = "127.0.0.0/8, 10.1.0.0/16"
    for url in ("http://127.0.0.1:8080/hook", "https://127.0.0.1/hook", "http://localhost/hook",
                "http://10.1.2.3/hook", "http://[::ffff:127.0.0.1]/hook"):
        check_url(url, allowed)
    for url in (f"http://{PUBLIC}/hook", "http://10.2.0.1/hook", "https://169.254.169.254/",
                "https://internal.example/hook", "http://rebind.example/hook",
                "http://2130706433/hook", "http://127.1/hook"):
        with pytest.raises(UrlRefused):
            check_url(url, allowed)


@pytest.mark.parametrize("url", [u for u in HOSTILE + ACCEPTED if u])
def test_an_accepted_url_means_the_same_host_to_the_relay(url: str) -> None:
    """The relay posts with aiohttp, which parses URLs with yarl; the guard parses with urllib.
    A URL the guard accepts must name the same host to both, or the check guards a host the
    relay never connects to (the classic parser-differential bypass)."""
    try:
        check_url(url)
    except UrlRefused:
        return
    checked = parse_url(url).host
    try:
        sent = yarl.URL(url.strip()).host
    except ValueError as exc:
        pytest.fail(f"accepted {url!r} (host {checked}), but the relay cannot parse it: {exc}")
    same = sent is not None and sent.lower().strip("[]").rstrip(".") == checked.strip("[]")
    assert same, (
        f"{url!r}: the guard checked {checked!r}, the relay would connect to {sent!r}"
    )


def test_literal_addresses_are_judged_without_dns(fake_dns: list[str]) -> None:
    for url in ("https://127.0.0.1/", "https://[::1]/", "https://2130706433/",
                f"https://{PUBLIC}/"):
        try:
            check_url(url)
        except UrlRefused:
            pass
    assert fake_dns == []


# --- through the API ----------------------------------------------------------------------------


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


def test_registration_refuses_every_hostile_url(db_url: str, api: Api) -> None:
    before = snapshot(db_url)
    wrong = []
    for url in HOSTILE:
        resp = api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]})
        if resp.status_code != 400:
            wrong.append(f"{url!r}: {resp.status_code} {resp.text[:200]}")
            continue
        assert_problem(resp, 400, "invalid_request", param="url")
    assert not wrong, "registered:\n" + "\n".join(wrong)
    assert snapshot(db_url) == before, "a refused registration wrote something"
    for url in ACCEPTED:
        created(api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]}))


def test_patch_refuses_every_hostile_url_and_keeps_the_old_one(db_url: str, api: Api) -> None:
    endpoint = created(api.post("/v1/webhook_endpoints",
                                {"url": f"https://{PUBLIC}/ok", "event_types": ["*"]}))
    before = snapshot(db_url)
    wrong = []
    for url in HOSTILE:
        resp = api.patch(f"/v1/webhook_endpoints/{endpoint['id']}",
                         {"url": url, "description": "changed"})
        if resp.status_code != 400:
            wrong.append(f"{url!r}: {resp.status_code} {resp.text[:200]}")
            api.patch(f"/v1/webhook_endpoints/{endpoint['id']}",
                      {"url": f"https://{PUBLIC}/ok", "description": None})
            continue
        assert_problem(resp, 400, "invalid_request", param="url")
    assert not wrong, "accepted by PATCH:\n" + "\n".join(wrong)
    assert snapshot(db_url) == before, "a refused PATCH changed the endpoint"
    got = api.get(f"/v1/webhook_endpoints/{endpoint['id']}").json()
    assert got["url"] == f"https://{PUBLIC}/ok" and got["description"] is None
    resp = api.patch(f"/v1/webhook_endpoints/{endpoint['id']}", {"url": "https://public.example/"})
    assert resp.status_code == 200 and resp.json()["url"] == "https://public.example/"


@pytest.mark.parametrize("value", [None, 42, ["https://1.1.1.1/"], {"url": "x"}, True, ""])
def test_registration_refuses_a_url_that_is_not_a_string(api: Api, value: Any) -> None:
    resp = api.post("/v1/webhook_endpoints", {"url": value, "event_types": ["*"]})
    assert_problem(resp, 400, "invalid_request", param="url")


def test_allowed_networks_admit_http_to_them_and_nothing_else(
    db_url: str, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    created(api.post("/v1/webhook_endpoints",
                     {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}))
    created(api.post("/v1/webhook_endpoints",
                     {"url": "http://localhost:9/hook", "event_types": ["*"]}))
    for url in (f"http://{PUBLIC}/hook", "http://10.0.0.1/hook", "https://169.254.169.254/",
                "https://internal.example/hook", "http://[::ffff:10.0.0.1]/hook",
                "http://2130706433/hook"):
        resp = api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]})
        assert_problem(resp, 400, "invalid_request", param="url")


def test_registration_never_contacts_the_url(
    db_url: str, api: Api, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registration checks addresses; it does not fetch the URL, so a receiver that redirects to
    the metadata service cannot lead the API anywhere (and the relay does not follow redirects)."""
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    url = receiver.add_endpoint("/redirect", "whsec_" + "A" * 32,
                                default=Reply.redirect("http://169.254.169.254/latest/"))
    endpoint = created(api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]}))
    resp = api.patch(f"/v1/webhook_endpoints/{endpoint['id']}", {"url": url + "?again=1"})
    assert resp.status_code == 200, resp.text
    assert receiver.receipts() == []


def test_unauthenticated_registration_is_401_before_any_lookup(
    db_url: str, api: Api, fake_dns: list[str]
) -> None:
    """Without a valid key nothing about the URL is examined: no DNS lookup on behalf of a
    stranger, no answer that says what a name resolves to."""
    endpoint = created(api.post("/v1/webhook_endpoints",
                                {"url": f"https://{PUBLIC}/ok", "event_types": ["*"]}))
    fake_dns.clear()
    for key in (None, "sk_" + "A" * 43):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        for method, path in (("POST", "/v1/webhook_endpoints"),
                             ("PATCH", f"/v1/webhook_endpoints/{endpoint['id']}")):
            resp = api.client.request(
                method, path, headers=headers,
                json={"url": "https://internal.example/hook", "event_types": ["*"]},
            )
            assert resp.status_code == 401, (
                f"{method} {path} without a valid key: {resp.status_code} {resp.text}"
            )
            assert "10.0.0.7" not in resp.text
    assert fake_dns == [], f"names resolved for an unauthenticated caller: {fake_dns}"


def test_a_refusal_does_not_reveal_what_a_name_resolves_to(api: Api) -> None:
    """The detail may say the URL is refused and why in general terms; the private address a
    name resolves to is the service's internal view of the network, not the merchant's."""
    for name, addresses in FAKE_DNS.items():
        private = [a for a in addresses if not ipaddress.ip_address(a).is_global]
        if not private:
            continue
        resp = api.post("/v1/webhook_endpoints",
                        {"url": f"https://{name}/hook", "event_types": ["*"]})
        body = assert_problem(resp, 400, "invalid_request", param="url")
        shown = [a for a in private if a in body["detail"]
                 or str(ipaddress.ip_address(a)) in body["detail"]]
        assert not shown, f"{name}: the detail shows {shown}: {body['detail']}"


def test_stored_urls_are_exactly_what_was_checked(db_url: str, api: Api) -> None:
    url = f"https://{PUBLIC}/hook?x=1"
    endpoint = created(api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]}))
    assert endpoint["url"] == url
    assert query(db_url, "SELECT url FROM webhook_endpoints WHERE id = %s",
                 (endpoint["id"],)) == [(url,)]
