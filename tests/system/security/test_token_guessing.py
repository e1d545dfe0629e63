"""Token guessing: after AUTH_FAILURE_THRESHOLD 401s within AUTH_FAILURE_WINDOW_SECONDS from
one source address, that address gets 429 with Retry-After; other addresses are unaffected.

The second source address is 127.0.0.2 (the client socket is bound to it; loopback only).
Behind a proxy listed in TRUSTED_PROXIES (here 127.0.0.1 plays the ingress), the source address
is the client's from X-Forwarded-For; the addresses there are only header text (documentation
networks), nothing connects to them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import used_secret
from tests.system.security.conftest import API, TOKEN_A, call_body, secure_gateway
from tools import devstack

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.mongo]

THRESHOLD = 5
WINDOW = 30


def client(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0),
                                                                force_close=True))


async def submit(http: aiohttp.ClientSession, url: str, token: str,
                 forwarded_for: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    async with http.post(f"{url}{API}/calls.json", json=call_body(uuid.uuid4().hex),
                         headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_repeated_401s_from_one_address_get_429_others_unaffected(
    servers: devstack.Ports,
) -> None:
    env = {"AUTH_FAILURE_THRESHOLD": str(THRESHOLD), "AUTH_FAILURE_WINDOW_SECONDS": str(WINDOW)}
    async with secure_gateway(servers, "token-guessing", env) as gw, \
            client("127.0.0.1") as guesser, client("127.0.0.2") as other:
        for _ in range(THRESHOLD):
            status, body, _ = await submit(guesser, gw.url, used_secret(uuid.uuid4().hex))
            assert status == 401, body
        statuses = []
        for _ in range(3):
            status, body, headers = await submit(guesser, gw.url, used_secret(uuid.uuid4().hex))
            statuses.append(status)
            if status == 429:
                assert 0 < int(headers["Retry-After"]) <= WINDOW
                assert set(body["errors"]) == {"class", "invalid_data"}
        assert statuses == [429, 429, 429], (
            f"after {THRESHOLD} failed tokens from 127.0.0.1 the gateway still answers "
            f"{statuses}: token guessing is not throttled (AUTH_FAILURE_THRESHOLD unused)")
        # Another source address: its own failures count separately, a valid token works.
        status, _, _ = await submit(other, gw.url, used_secret(uuid.uuid4().hex))
        assert status == 401
        status, body, _ = await submit(other, gw.url, TOKEN_A)
        assert status == 201, json.dumps(body)


async def test_requests_without_a_token_are_401_and_never_lock_out_the_address(
    servers: devstack.Ports,
) -> None:
    """No token guesses nothing: a client that forgot its Authorization header gets 401 every
    time, and its address's other clients (a valid token, a typo'd one) are not locked out."""
    env = {"AUTH_FAILURE_THRESHOLD": str(THRESHOLD), "AUTH_FAILURE_WINDOW_SECONDS": str(WINDOW)}
    async with secure_gateway(servers, "token-missing", env) as gw, client("127.0.0.1") as http:
        for _ in range(THRESHOLD * 3):
            async with http.post(f"{gw.url}{API}/calls.json",
                                 json=call_body(uuid.uuid4().hex)) as resp:
                assert resp.status == 401, await resp.text()
        status, body, _ = await submit(http, gw.url, used_secret(uuid.uuid4().hex))
        assert status == 401, body
        status, body, _ = await submit(http, gw.url, TOKEN_A)
        assert status == 201, json.dumps(body)


async def test_behind_a_trusted_proxy_one_clients_failures_do_not_lock_out_the_others(
    servers: devstack.Ports,
) -> None:
    """Every client of an ingress reaches the gateway from the ingress's address: counted by
    that address, one client's bad tokens would get every client 429. With the ingress in
    TRUSTED_PROXIES the client in X-Forwarded-For is counted; an entry a client wrote itself
    (left of what the proxy appended) does not move it, and a peer that is not a trusted proxy
    cannot name another address."""
    env = {"AUTH_FAILURE_THRESHOLD": str(THRESHOLD), "AUTH_FAILURE_WINDOW_SECONDS": str(WINDOW),
           "TRUSTED_PROXIES": "127.0.0.1/32, 10.0.0.0/8"}
    guesser, neighbour = "198.51.100.7", "198.51.100.8"
    async with secure_gateway(servers, "token-guessing-proxy", env) as gw, \
            client("127.0.0.1") as ingress, client("127.0.0.2") as direct:
        for _ in range(THRESHOLD):
            status, body, _ = await submit(ingress, gw.url, used_secret(uuid.uuid4().hex),
                                           f"{guesser}, 10.1.2.3")  # through two proxies
            assert status == 401, body
        for forwarded in (guesser, f"203.0.113.9, {guesser}", f"not-an-address, {guesser}"):
            status, body, _ = await submit(ingress, gw.url, used_secret(uuid.uuid4().hex), forwarded)
            assert status == 429, (forwarded, body)
        status, body, _ = await submit(ingress, gw.url, TOKEN_A, neighbour)
        assert status == 201, json.dumps(body)
        # Not through the proxy: X-Forwarded-For is the client's own claim, ignored.
        for _ in range(THRESHOLD):
            status, _, _ = await submit(direct, gw.url, used_secret(uuid.uuid4().hex), neighbour)
            assert status == 401
        status, _, _ = await submit(direct, gw.url, used_secret(uuid.uuid4().hex), neighbour)
        assert status == 429
        status, body, _ = await submit(ingress, gw.url, TOKEN_A, neighbour)
        assert status == 201, json.dumps(body)
