"""SSRF guard for customer-given URLs (OWASP API7: Server Side Request Forgery).

Recording URLs (the fetcher) and webhook URLs (the webhooks deliverer) come from customers,
so neither service may be turned into a proxy towards the platform's own network; both
use this one guard, with loopback allowed only where the dev stack enables it. The guard
works at three levels:

* :func:`check_url` - before every request, including every redirect hop: only ``http``
  and ``https``, a host is required, and a host written as an IP address (in any
  spelling: ``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``[::ffff:7f00:1]``) is decided
  at once, without DNS.
* :class:`GuardedResolver` - the only DNS resolution a download does. Each host is
  resolved once; every address of the answer must be allowed, otherwise the whole host is
  refused (a mixed answer is treated as an attack, not filtered).
* :class:`GuardedConnector` - an aiohttp ``TCPConnector`` that checks the exact addresses
  it is about to connect to, IP literals included (aiohttp does not pass those to the
  resolver). Resolution and connection use the same answer, so DNS rebinding between
  "check" and "connect" cannot swap the address.

:class:`AddressPolicy` is the decision: loopback (127.0.0.0/8, ``::1``) only when the
dev stack enables it (``allow_loopback_recordings``, ``allow_loopback_webhooks``);
private, shared (carrier-grade NAT), link-local, multicast, reserved, unspecified,
documentation and cloud metadata addresses always refused, in IPv4 and IPv6, including IPv4 embedded in IPv6
(IPv4-mapped, IPv4-translated, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``). Teredo and
the deprecated IPv4-compatible and site-local ranges are refused outright.

A refusal raises :class:`AddressRefused`, which deliberately is not an ``OSError`` so that
aiohttp lets it through unwrapped (it would otherwise become a retryable connection error).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES: Final = frozenset({"http", "https"})

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

#: Instance metadata and host-agent endpoints of cloud providers: refused even where the
#: surrounding range would be allowed (168.63.129.16 is a public Azure address).
METADATA_ADDRESSES: Final[frozenset[IPAddress]] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, ...
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "169.254.170.23",  # AWS EKS Pod Identity agent
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer / host agent
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity agent over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
    )
)

#: Host names of metadata services, refused without resolving them.
METADATA_HOSTNAMES: Final = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
    }
)

# Ranges refused whatever else is true of the address, with the reason given in errors.
_REFUSED_V4: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = (
    (_v4("0.0.0.0/8"), "unspecified or 'this network' address"),
    (_v4("10.0.0.0/8"), "private address"),
    (_v4("100.64.0.0/10"), "carrier-grade NAT (shared) address"),
    (_v4("127.0.0.0/8"), "loopback address"),
    (_v4("169.254.0.0/16"), "link-local address"),
    (_v4("172.16.0.0/12"), "private address"),
    (_v4("192.0.0.0/24"), "IETF protocol assignment (reserved) address"),
    (_v4("192.0.2.0/24"), "documentation (reserved) address"),
    (_v4("192.88.99.0/24"), "6to4 relay anycast (reserved) address"),
    (_v4("192.168.0.0/16"), "private address"),
    (_v4("198.18.0.0/15"), "benchmarking (reserved) address"),
    (_v4("198.51.100.0/24"), "documentation (reserved) address"),
    (_v4("203.0.113.0/24"), "documentation (reserved) address"),
    (_v4("224.0.0.0/4"), "multicast address"),
    (_v4("240.0.0.0/4"), "reserved address"),  # includes 255.255.255.255 (broadcast)
)
_REFUSED_V6: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = (
    (_v6("::/128"), "unspecified address"),
    (_v6("::1/128"), "loopback address"),
    (_v6("::/96"), "IPv4-compatible (deprecated, reserved) address"),
    (_v6("64:ff9b:1::/48"), "local-use NAT64 (private) address"),
    (_v6("100::/64"), "discard-only (reserved) address"),
    (_v6("2001::/32"), "Teredo address"),
    (_v6("2001::/23"), "IETF protocol assignment (reserved) address"),
    (_v6("2001:db8::/32"), "documentation (reserved) address"),
    (_v6("3fff::/20"), "documentation (reserved) address"),
    (_v6("5f00::/16"), "segment routing (reserved) address"),
    (_v6("fc00::/7"), "unique local (private) address"),
    (_v6("fe80::/10"), "link-local address"),
    (_v6("fec0::/10"), "site-local (deprecated, private) address"),
    (_v6("ff00::/8"), "multicast address"),
)
_LOOPBACK_V4: Final = _v4("127.0.0.0/8")
_LOOPBACK_V6: Final = ipaddress.IPv6Address("::1")
_IPV4_TRANSLATED: Final = _v6("::ffff:0:0:0/96")
_NAT64_WELL_KNOWN: Final = _v6("64:ff9b::/96")


class AddressRefused(Exception):
    """The recording URL points somewhere the fetcher must not go.

    ``str(exc)`` names the host and the reason and is safe to log (no query string,
    no credentials). Not an ``OSError`` on purpose (see the module docstring).
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{show_host(host)}: {reason}")
        self.host = host
        self.reason = reason


@dataclass(frozen=True)
class AddressPolicy:
    """Which IP addresses a recording may be downloaded from."""

    allow_loopback: bool = False

    def refusal(self, address: IPAddress | str) -> str | None:
        """Why ``address`` is refused, or None if a download may connect to it. Never raises."""
        try:
            ip = _as_ip(address)
        except ValueError:
            return "not an IP address"
        if ip in METADATA_ADDRESSES:
            return "cloud metadata address"
        if isinstance(ip, ipaddress.IPv6Address):
            embedded, how = _embedded_ipv4(ip)
            if embedded is not None:
                inner = self.refusal(embedded)
                return None if inner is None else f"{how} {embedded}: {inner}"
            if ip == _LOOPBACK_V6:
                return None if self.allow_loopback else "loopback address"
            for network, reason in _REFUSED_V6:
                if ip in network:
                    return reason
        else:
            if ip in _LOOPBACK_V4:
                return None if self.allow_loopback else "loopback address"
            for network4, reason in _REFUSED_V4:
                if ip in network4:
                    return reason
        if not ip.is_global:  # anything the standard library knows is special-purpose
            return "non-global (special-purpose) address"
        return None

    def check(self, address: IPAddress | str, host: str | None = None) -> None:
        """Raise :class:`AddressRefused` unless ``address`` is allowed."""
        reason = self.refusal(address)
        if reason is not None:
            shown = str(address) if host is None or host == str(address) else (
                f"{show_host(host)} ({address})")
            raise AddressRefused(shown, reason)


def show_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``[::1]``), so that a port
    or a reason after it reads unambiguously; anything else as it is."""
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])  # a zone id is allowed after it
    except ValueError:
        return host
    return f"[{host}]"


def _as_ip(address: IPAddress | str) -> IPAddress:
    if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip: IPAddress = address
    else:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(ip.packed)
    return ip


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, str]:
    """The IPv4 address an IPv6 address stands for, if it is one of the embedding forms."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-translated"
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None, ""


def parse_ip_host(host: str) -> IPAddress | None:
    """The address ``host`` spells, or None if it is a name to resolve.

    Accepts what browsers and ``inet_aton`` accept, so that an unusual spelling cannot
    slip past the guard and still reach the address through ``getaddrinfo``: bracketed or
    bare IPv6 (zone id dropped), dotted IPv4 with one to four parts, each decimal, octal
    (leading ``0``) or hexadecimal (``0x``), the last part filling the remaining bytes
    (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``). An all-numeric host that is
    out of range raises :class:`AddressRefused` rather than being handed to DNS.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return _as_ip(text.replace("%25", "%"))
        except ValueError:
            raise AddressRefused(host, "malformed IPv6 address") from None
    if text.endswith("."):
        text = text[:-1]
    parts = text.split(".")
    if not text or len(parts) > 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _ipv4_number(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise AddressRefused(host, "out-of-range numeric IPv4 address")
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _ipv4_number(part: str) -> int | None:
    if not part:
        return None
    lowered = part.lower()
    try:
        if lowered.startswith("0x"):
            return int(lowered[2:] or "0", 16)
        if len(lowered) > 1 and lowered.startswith("0"):
            return int(lowered[1:], 8)
        if lowered.isdigit():
            return int(lowered, 10)
    except ValueError:
        return None
    return None


def url_as_given(raw: str) -> URL:
    """``raw`` as a URL exactly as given (a presigned URL's encoding is kept byte for byte);
    raises ValueError if it is none."""
    return URL(raw, encoded=True) if raw.isascii() else URL(raw)


def check_url(url: URL, policy: AddressPolicy) -> None:
    """Refuse a URL the fetcher must not request: scheme, missing host, or a refused literal.

    Called for the first URL and for every redirect hop. A host name is not resolved here;
    the connector's resolver decides on it when it connects.
    """
    scheme = (url.scheme or "").lower()
    host = url.raw_host
    if scheme not in ALLOWED_SCHEMES:
        raise AddressRefused(host or "?", f"scheme {scheme or '(none)'!r} is not allowed")
    if not host:
        raise AddressRefused("?", "URL has no host")
    if _normalized_name(host) in METADATA_HOSTNAMES:
        raise AddressRefused(host, "cloud metadata host name")
    ip = parse_ip_host(host)
    if ip is not None:
        policy.check(ip, host)
    elif not valid_host_name(host):
        raise AddressRefused(host, "not a valid host name")


def _normalized_name(host: str) -> str:
    return host.lower().rstrip(".")


# A DNS label as RFC 1123 writes it (an underscore too: some real hosts have one).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE | re.ASCII)


def valid_host_name(host: str) -> bool:
    """True if ``host`` (not an IP literal) can be looked up: IDNA-encodable, labels of 1-63
    letters, digits, hyphens (not at either end) or underscores, 253 characters at most.
    What fails here would fail in the resolver (``UnicodeError``) or ask DNS for nonsense."""
    name = host[:-1] if host.endswith(".") else host
    try:
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return 0 < len(encoded) <= 253 and all(_LABEL.fullmatch(label) for label in encoded.split("."))


def _result(hostname: str, ip: IPAddress, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return {"hostname": hostname, "host": str(ip), "port": port, "family": family,
            "proto": 0, "flags": socket.AI_NUMERICHOST}


class GuardedResolver(AbstractResolver):
    """Resolves a host once through ``resolver`` and refuses it unless every address is allowed.

    IP spellings are decided without DNS (:func:`parse_ip_host`); metadata host names are
    refused without DNS. The returned results carry the checked addresses only, so the
    connection goes to exactly what was checked.
    """

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if _normalized_name(host) in METADATA_HOSTNAMES:
            raise AddressRefused(host, "cloud metadata host name")
        ip = parse_ip_host(host)
        if ip is not None:
            self.policy.check(ip, host)
            return [_result(host, ip, port)]
        if self._resolver is None:
            self._resolver = ThreadedResolver()
        answers = await self._resolver.resolve(host, port, family)
        if not answers:
            raise OSError(f"{host}: no addresses")
        checked: list[ResolveResult] = []
        for answer in answers:
            ip = _as_ip(answer["host"])
            self.policy.check(ip, host)
            checked.append(_result(host, ip, answer["port"]))
        return checked

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()


class GuardedConnector(TCPConnector):
    """A ``TCPConnector`` that only connects to addresses the policy allows.

    Every host goes through :class:`GuardedResolver`, IP literals included, and the
    addresses the connector is about to use are checked once more right before the
    connection is opened.
    """

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver | None = None,
                 **kwargs: Any) -> None:
        self.policy = policy
        self.guarded_resolver = GuardedResolver(policy, resolver)
        super().__init__(resolver=self.guarded_resolver, **kwargs)

    async def _resolve_host(self, host: str, port: int,
                            traces: Sequence[Any] | None = None) -> list[ResolveResult]:
        if parse_ip_host(host) is not None or _normalized_name(host) in METADATA_HOSTNAMES:
            # aiohttp bypasses (or rejects) IP spellings before its resolver: decide here.
            return await self.guarded_resolver.resolve(host, port)
        results = await super()._resolve_host(host, port, traces=traces)  # type: ignore[arg-type]
        _check_all(self.policy, host, results)
        return results


def _check_all(policy: AddressPolicy, host: str, results: Iterable[ResolveResult]) -> None:
    for result in results:
        policy.check(result["host"], host)


def guarded_session(policy: AddressPolicy, *, resolver: AbstractResolver | None = None,
                    limit: int = 100, timeout: ClientTimeout | None = None) -> ClientSession:
    """An aiohttp session for recording downloads: guarded connector, no proxy from the
    environment, no cookies kept between recordings. The caller closes it."""
    connector = GuardedConnector(policy, resolver, limit=limit, ttl_dns_cache=10)
    return ClientSession(connector=connector, trust_env=False, cookie_jar=DummyCookieJar(),
                         timeout=timeout or ClientTimeout(total=None))
