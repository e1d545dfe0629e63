"""API tokens: where a request carries one, and whom it speaks for.

Tokens are looked up by their SHA-256 (the only form stored), the stored hash
is compared in constant time, and answers are cached for a short while so a
burst of submissions costs one lookup. A token is never logged or echoed.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import deque
from typing import Any

from aiohttp import hdrs, web
from cachetools import TLRUCache
from pymongo.asynchronous.database import AsyncDatabase

from callingest.config_file import hash_token
from callingest.mongo import storable
from callingest.settings import IPNetwork
from services.gateway.domain import Principal
from services.gateway.errors import NotAuthorized, TooManyRequests

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Token token=<token>, quoted or not, and the options Rails' token scheme allows after it
# (``Token token="abc", nonce="def"``; separated by commas, semicolons or tabs): ignored.
_TOKEN_HEADER = re.compile(
    r'Token\s+token="?(?P<token>[^"\s,;]+)"?(?:\s*[,;\t]\s*[A-Za-z_][\w-]*="[^"]*"|'
    r'\s*[,;\t]\s*[A-Za-z_][\w-]*=[^\s,;"]*)*', re.IGNORECASE)
_BEARER_HEADER = re.compile(r"Bearer\s+(?P<token>\S+)", re.IGNORECASE)
NEGATIVE_CACHE_SECONDS = 1.0
MAX_CACHE_ENTRIES = 10_000
_UNCACHED: Any = object()


def request_token(request: web.Request, body: dict[str, Any] | None) -> str | None:
    """The token from ``Authorization`` (Bearer or Token token=), the query string, or the body."""
    header = request.headers.get("Authorization", "").strip()
    for pattern in (_BEARER_HEADER, _TOKEN_HEADER):
        if match := pattern.fullmatch(header):
            return match["token"]
    if token := request.query.get("oauth_token"):
        return token
    if body is not None and isinstance(body.get("oauth_token"), str) and body["oauth_token"]:
        return str(body["oauth_token"])
    return None


class TokenAuthenticator:
    """Resolves tokens to principals through ``api_tokens``, with a brief cache."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], cache_seconds: float) -> None:
        self._tokens = db.api_tokens

        def expiry(_digest: str, principal: Principal | None, now: float) -> float:
            return now + (cache_seconds if principal is not None else NEGATIVE_CACHE_SECONDS)

        # token digest -> principal (None: unknown), least recently used out first when full
        self._cache: TLRUCache[str, Principal | None] = TLRUCache(
            maxsize=MAX_CACHE_ENTRIES, ttu=expiry, timer=time.monotonic)

    async def authenticate(self, token: str | None) -> Principal:
        """The principal of ``token``; raises :class:`NotAuthorized` if missing or unknown."""
        if not token or not storable(token):  # a NUL or a surrogate: no token has one
            raise NotAuthorized("Invalid or missing oauth token.")
        digest = hash_token(token)
        principal = self._cache.get(digest, _UNCACHED)
        if principal is _UNCACHED:
            principal = await self._lookup(digest)
            self._cache[digest] = principal
        if principal is None:
            raise NotAuthorized("Invalid or missing oauth token.")
        return principal

    async def _lookup(self, digest: str) -> Principal | None:
        doc = await self._tokens.find_one({"_id": digest})
        if doc is None:  # found by the token's digest: nothing left to compare
            return None
        advertisers = doc.get("advertisers")
        return Principal(
            network_id=str(doc["network_id"]),
            advertisers=None if advertisers is None else frozenset(str(a) for a in advertisers),
        )


class FailureThrottle:
    """Token guessing defence: after ``threshold`` failed tokens from one source address within
    ``window`` seconds, that address gets 429 until the oldest failure leaves the window.

    Per process, in memory, bounded: at most ``MAX_CACHE_ENTRIES`` addresses are tracked.
    Other addresses are unaffected. The source address is the client's (:meth:`address_of`):
    behind ``trusted_proxies`` (an ingress), the one their ``X-Forwarded-For`` names, so that one
    client's failures do not lock out every client of the same ingress.
    """

    def __init__(self, threshold: int, window: float,
                 trusted_proxies: tuple[IPNetwork, ...] = ()) -> None:
        self.threshold = threshold
        self.window = window
        self.trusted_proxies = trusted_proxies
        self._failures: dict[str, deque[float]] = {}

    def address_of(self, request: web.Request) -> str:
        """The client's address: the peer's, unless the peer is a trusted proxy; then the
        nearest ``X-Forwarded-For`` entry (read from the right) that is not one, or the last
        trusted hop when the next entry is not an address (no client can name itself past
        a proxy it does not control: only what trusted proxies appended is believed)."""
        address = request.remote or "unknown"
        if not self.trusted_proxies or not self._trusted(address):
            return address
        hops = [hop.strip() for header in request.headers.getall(hdrs.X_FORWARDED_FOR, ())
                for hop in header.split(",")]
        for hop in reversed(hops):
            try:
                ip = ipaddress.ip_address(hop)
            except ValueError:
                return address
            if not self._trusted(ip):
                return str(ip)
            address = hop
        return address

    def _trusted(self, address: str | IPAddress) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures

    def check(self, address: str) -> None:
        """Raise :class:`TooManyRequests` if ``address`` is over the threshold."""
        now = time.monotonic()
        failures = self._recent(address, now)
        if failures is not None and len(failures) >= self.threshold:
            raise TooManyRequests(max(1, math.ceil(failures[0] + self.window - now)))

    def record_failure(self, address: str) -> None:
        now = time.monotonic()
        failures = self._recent(address, now)
        if failures is None:
            if len(self._failures) >= MAX_CACHE_ENTRIES:
                self._failures.pop(next(iter(self._failures)))
            failures = self._failures[address] = deque()
        failures.append(now)
