"""Token guessing: after AUTH_FAILURE_THRESHOLD 401s within AUTH_FAILURE_WINDOW_SECONDS from
one source address, that address gets 429 with Retry-After; other addresses are unaffected.

The second source address is 127.0.0.2 (the client socket is bound to it; loopback only).
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


async def submit(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, Any, Any]:
    async with http.post(f"{url}{API}/calls.json", json=call_body(uuid.uuid4().hex),
                         headers={"Authorization": f"Bearer {token}"}) as resp:
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
