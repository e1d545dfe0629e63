"""The SSRF guard's decisions, at the policy, resolver and connector level.

No test here connects anywhere but 127.0.0.1: refused addresses are only ever handed to
the guard, and the ``tripwire`` fixture fails a test whose code tries to open a socket to a
non-loopback address.
"""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from callingest.ssrf import (
    AddressPolicy,
    AddressRefused,
    GuardedResolver,
    check_url,
    guarded_session,
    parse_ip_host,
)
from tests.services.fetcher.conftest import RecordingServer, StubResolver, Tripwire, serve

STRICT = AddressPolicy(allow_loopback=False)
DEV = AddressPolicy(allow_loopback=True)

# (address, reason fragment): refused under every policy.
ALWAYS_REFUSED = [
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("169.254.0.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("192.0.0.192", "metadata"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.10", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::", "unspecified"),
    ("::ffff:10.0.0.1", "IPv4-mapped"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0:a00:1", "IPv4-translated"),
    ("::10.0.0.1", "IPv4-compatible"),
    ("64:ff9b::a9fe:a9fe", "NAT64"),
    ("64:ff9b::a00:1", "NAT64"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:a00:1::1", "6to4"),
    ("2002:a9fe:a9fe::1", "6to4"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard"),
    ("fc00::1", "unique local"),
    ("fd12:3456:789a::1", "unique local"),
    ("fd00:ec2::254", "metadata"),
    ("fd00:ec2::23", "metadata"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
]

LOOPBACK = ["127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"]

PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001::1",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize(("address", "reason"), ALWAYS_REFUSED)
@pytest.mark.parametrize("policy", [STRICT, DEV], ids=["strict", "dev"])
def test_refused_addresses(address: str, reason: str, policy: AddressPolicy) -> None:
    refusal = policy.refusal(address)
    assert refusal is not None and reason in refusal
    with pytest.raises(AddressRefused):
        policy.check(address)


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_only_where_enabled(address: str) -> None:
    assert "loopback" in (STRICT.refusal(address) or "")
    assert DEV.refusal(address) is None


@pytest.mark.parametrize("address", PUBLIC)
@pytest.mark.parametrize("policy", [STRICT, DEV], ids=["strict", "dev"])
def test_public_addresses_allowed(address: str, policy: AddressPolicy) -> None:
    assert policy.refusal(address) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("012.0.0.1", "10.0.0.1"),
        ("167772161", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::ffff:7f00:1]", "::ffff:7f00:1"),
        ("::1", "::1"),
        ("fe80::1%25eth0", "fe80::1"),
    ],
)
def test_ip_spellings_parsed(host: str, expected: str) -> None:
    assert parse_ip_host(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize("host", ["example.com", "0x7g.1", "1.2.3.4.5", "a.0177.0.0.1", "08.1",
                                  "localhost", "xn--e1afmkfd.xn--p1ai"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip_host(host) is None


@pytest.mark.parametrize("host", ["256.1.1.1", "1.2.3.256", "4294967296", "1.16777216",
                                  "0x100.0.0.1", "[::g]"])
def test_out_of_range_spellings_refused(host: str) -> None:
    with pytest.raises(AddressRefused):
        parse_ip_host(host)


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/", "http://0177.0.0.1/", "http://0x7f.1/", "http://127.1/",
        "http://[::1]/", "http://[::ffff:127.0.0.1]/", "https://127.0.0.1:8443/a",
    ],
)
def test_check_url_loopback_spellings(url: str) -> None:
    with pytest.raises(AddressRefused, match="loopback"):
        check_url(URL(url, encoded=True), STRICT)
    check_url(URL(url, encoded=True), DEV)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
        "http://0xa9fea9fe/", "http://10.0.0.1/", "http://[::ffff:a00:1]/",
        "http://metadata.google.internal/computeMetadata/v1/", "http://METADATA.goog./",
        "file:///etc/passwd", "ftp://example.com/a.wav", "gopher://example.com/",
        "s3://bucket/key", "http:///no-host", "dict://127.0.0.1:11211/",
    ],
)
@pytest.mark.parametrize("policy", [STRICT, DEV], ids=["strict", "dev"])
def test_check_url_refusals(url: str, policy: AddressPolicy) -> None:
    with pytest.raises(AddressRefused):
        check_url(URL(url, encoded=True), policy)


@pytest.mark.parametrize("url", [
    "http://%zz/a.wav", f"http://{'a' * 300}.com/a.wav", f"http://{'a' * 64}.example/a.wav",
    "http://a..b/a.wav", "http://-a.example/a.wav", "http://a-.example/a.wav",
])
@pytest.mark.parametrize("policy", [STRICT, DEV], ids=["strict", "dev"])
def test_check_url_refuses_host_names_no_resolver_can_look_up(url: str, policy: AddressPolicy) -> None:
    """Refused as a URL (permanent), not left to fail in the resolver at every retry."""
    with pytest.raises(AddressRefused, match="not a valid host name"):
        check_url(URL(url, encoded=True), policy)


@pytest.mark.parametrize("url", ["http://bücher.example/a.wav", "http://a_b.example./a.wav",
                                 f"http://{'a' * 63}.example/a.wav", "http://recordings/a.wav"])
def test_check_url_accepts_valid_host_names(url: str) -> None:
    check_url(URL(url), STRICT)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://[::]/a.wav", "[::]: unspecified address"),
        ("http://[fd00::1]:8080/a.wav?sig=x", "[fd00::1]: unique local (private) address"),
        ("http://[::ffff:a00:1]/", "[::ffff:a00:1]: IPv4-mapped 10.0.0.1: private address"),
        ("http://10.0.0.1/", "10.0.0.1: private address"),
    ],
)
def test_refusals_show_an_ipv6_host_in_brackets(url: str, shown: str) -> None:
    """Not "::: unspecified address": the host as a URL writes it, then the reason."""
    with pytest.raises(AddressRefused) as info:
        check_url(URL(url, encoded=True), STRICT)
    assert str(info.value) == shown


def test_check_url_leaves_names_to_the_resolver() -> None:
    check_url(URL("https://recordings.example.com/a.wav?sig=x", encoded=True), STRICT)


# -- resolver ------------------------------------------------------------------------------

async def test_resolver_refuses_private_answer() -> None:
    stub = StubResolver({"evil.test": ["10.0.0.1"]})
    resolver = GuardedResolver(STRICT, stub)
    with pytest.raises(AddressRefused, match="private"):
        await resolver.resolve("evil.test", 80)
    assert stub.calls == ["evil.test"]


async def test_resolver_refuses_mixed_answer() -> None:
    stub = StubResolver({"mixed.test": ["93.184.216.34", "169.254.169.254"]})
    with pytest.raises(AddressRefused, match="metadata"):
        await GuardedResolver(DEV, stub).resolve("mixed.test", 80)


async def test_resolver_returns_checked_public_answer() -> None:
    stub = StubResolver({"good.test": ["93.184.216.34", "2606:2800:220:1::1"]})
    answers = await GuardedResolver(STRICT, stub).resolve("good.test", 443)
    assert [a["host"] for a in answers] == ["93.184.216.34", "2606:2800:220:1::1"]
    assert all(a["port"] == 443 for a in answers)


async def test_resolver_decides_ip_spellings_without_dns() -> None:
    stub = StubResolver({})
    resolver = GuardedResolver(STRICT, stub)
    for host in ("2130706433", "0x7f.1", "0177.0.0.1"):
        with pytest.raises(AddressRefused, match="loopback"):
            await resolver.resolve(host, 80)
    answers = await GuardedResolver(DEV, stub).resolve("0x7f.1", 80)
    assert [a["host"] for a in answers] == ["127.0.0.1"]
    with pytest.raises(AddressRefused, match="metadata"):
        await resolver.resolve("metadata.google.internal", 80)
    assert stub.calls == []


# -- connector: the decision is made before any socket is opened --------------------------

async def test_connector_refuses_name_resolving_to_private(
    server: RecordingServer, tripwire: Tripwire
) -> None:
    stub = StubResolver({"evil.test": ["10.0.0.1"]})
    async with guarded_session(DEV, resolver=stub) as session:
        with pytest.raises(AddressRefused):
            await session.get(f"http://evil.test:{server.port}/a.wav")
    assert tripwire.attempted == []
    assert server.hits == []


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "169.254.169.254", "[fd00:ec2::254]", "[::ffff:10.0.0.1]", "0xa9fea9fe",
     "2852039166", "[fe80::1]", "100.64.0.1", "0.0.0.0"],
)
async def test_connector_refuses_literals_without_connecting(host: str, tripwire: Tripwire) -> None:
    """IP literals bypass aiohttp's resolver; the connector still decides on them."""
    async with guarded_session(DEV) as session:
        with pytest.raises(AddressRefused):
            await session.get(f"http://{host}:8080/", allow_redirects=False)
    assert tripwire.attempted == []


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1"])
async def test_connector_loopback_spellings(server: RecordingServer, tripwire: Tripwire,
                                           host: str) -> None:
    server.route("/ok", serve(b"fine"))
    async with guarded_session(STRICT) as session:
        with pytest.raises(AddressRefused, match="loopback"):
            await session.get(f"http://{host}:{server.port}/ok")
    assert tripwire.attempted == []
    async with guarded_session(DEV) as session:
        async with session.get(f"http://{host}:{server.port}/ok") as resp:
            assert resp.status == 200
            assert await resp.read() == b"fine"
    assert tripwire.attempted == ["127.0.0.1"]


async def test_connects_to_the_checked_answer_no_rebinding(
    server: RecordingServer, tripwire: Tripwire
) -> None:
    """One resolution per connection, and the connection uses exactly that answer: a name
    that answers 127.0.0.1 and then 10.0.0.1 (DNS rebinding) never reaches 10.0.0.1."""
    server.route("/a.wav", serve(b"ok"))
    stub = StubResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
    async with guarded_session(DEV, resolver=stub) as session:
        async with session.get(f"http://rebind.test:{server.port}/a.wav") as resp:
            assert resp.status == 200
        assert stub.calls == ["rebind.test"]
        assert [h.peer for h in server.hits] == ["127.0.0.1"]
        connector = session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        connector.clear_dns_cache()
        await connector.close()
    async with guarded_session(DEV, resolver=stub) as session:
        with pytest.raises(AddressRefused, match="private"):
            await session.get(f"http://rebind.test:{server.port}/a.wav")
    assert stub.calls == ["rebind.test", "rebind.test"]
    assert tripwire.attempted == ["127.0.0.1"]
    assert len(server.hits) == 1


async def test_session_ignores_proxy_environment(
    monkeypatch: pytest.MonkeyPatch, server: RecordingServer, tripwire: Tripwire
) -> None:
    """HTTP(S)_PROXY would route the request through an address the guard never checked."""
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("http_proxy", "http://10.0.0.1:3128")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="direct")

    server.route("/p", ok)
    async with guarded_session(DEV) as session, session.get(server.url("/p")) as resp:
        assert await resp.text() == "direct"
    assert tripwire.attempted == ["127.0.0.1"]
