"""Who may call what: no answer without a valid token except the ops endpoints and the
OpenAPI document; a token of network A can neither read nor submit calls of network B
(each route); no secret in an error body or a log line.

The refusal of recording URLs to private and metadata addresses is decided at the
fetcher's connector without connecting and is tested there: tests/services/fetcher/test_ssrf.py
(``test_connector_refuses_literals_without_connecting``, ``..._name_resolving_to_private``,
``test_connects_to_the_checked_answer_no_rebinding``) and tests/services/fetcher/test_download.py
(``test_redirect_to_refused_address``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import used_secret
from tests.system.security.conftest import API, AUTH_SECRET, TOKEN_A, TOKEN_B, SecureGateway, call_body

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.mongo]

OPEN = ["/healthz", "/readyz", "/metrics", f"{API}/openapi.json"]


def routes(cuid: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every operation of the OpenAPI document, with a body where it takes one."""
    body = call_body(f"sec-{uuid.uuid4().hex}")
    return [
        ("POST", f"{API}/calls.json", body),
        ("PUT", f"{API}/calls.json", body),
        ("GET", f"{API}/calls.json", None),
        ("GET", f"{API}/calls/{cuid}.json", None),
        ("GET", f"{API}/calls/{cuid}/recording.wav", None),
        ("POST", f"{API}/calls/{cuid}/retry.json", None),
    ]


async def request(gw: SecureGateway, method: str, path: str, body: Any = None,
                  headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as http, http.request(
            method, f"{gw.url}{path}", json=body, headers=headers or {}) as resp:
        raw = await resp.read()
        return resp.status, raw, resp.headers


async def test_openapi_lists_exactly_the_routes_checked_here(gw: SecureGateway) -> None:
    status, raw, _ = await request(gw, "GET", f"{API}/openapi.json")
    assert status == 200
    operations = {(m.upper(), p) for p, ops in json.loads(raw)["paths"].items() for m in ops}
    checked = {(m, p.replace(gw.cuid_b, "{cuid}")) for m, p, _ in routes(gw.cuid_b)}
    assert operations == checked


@pytest.mark.parametrize("credentials", [
    {}, {"Authorization": "Bearer "}, {"Authorization": "Bearer not-a-token"},
    {"Authorization": "Token token=not-a-token"}, {"Authorization": f"Basic {TOKEN_B}"},
    {"Authorization": f"Bearer {TOKEN_B}x"}, {"Authorization": f"Bearer {TOKEN_B.upper()}"},
], ids=["none", "empty-bearer", "unknown-bearer", "unknown-token", "basic-scheme",
        "token-with-suffix", "token-upper-case"])
async def test_no_operation_answers_without_a_valid_token(gw: SecureGateway,
                                                          credentials: dict[str, str]) -> None:
    for method, path, body in routes(gw.cuid_b):
        status, raw, _ = await request(gw, method, path, body, credentials)
        assert status == 401, (method, path, status, raw[:200])
        errors = json.loads(raw)["errors"]
        assert errors["class"] == "NotAuthorized"
        assert TOKEN_B not in raw.decode() and TOKEN_B.upper() not in raw.decode()
    assert await gw.db.calls.count_documents({"network_id": {"$ne": "4002"}}) == 0


async def test_only_ops_endpoints_and_openapi_answer_without_a_token(gw: SecureGateway) -> None:
    for path in OPEN:
        status, _, _ = await request(gw, "GET", path)
        assert status == 200, path
    for method, path in [("GET", "/"), ("GET", "/api"), ("GET", f"{API}/calls"),
                         ("GET", f"{API}/calls/{gw.cuid_b}"), ("DELETE", f"{API}/calls.json"),
                         ("GET", f"{API}/calls.json"), ("PATCH", f"{API}/calls/{gw.cuid_b}.json"),
                         ("GET", "/api/2021-01-01/calls.json"), ("GET", "/admin"),
                         ("GET", f"{API}/../healthz"), ("OPTIONS", f"{API}/calls.json")]:
        status, raw, _ = await request(gw, method, path)
        assert 400 <= status < 500, (method, path, status)
        assert gw.cuid_b not in raw.decode(errors="replace") or path.endswith(gw.cuid_b)


async def test_a_token_of_network_a_cannot_read_calls_of_network_b(gw: SecureGateway) -> None:
    a = {"Authorization": f"Bearer {TOKEN_A}"}
    b = {"Authorization": f"Bearer {TOKEN_B}"}
    for path in (f"{API}/calls/{gw.cuid_b}.json", f"{API}/calls/{gw.cuid_b}/recording.wav"):
        status, _, _ = await request(gw, "GET", path, headers=b)
        assert status == 200, path  # the owner reads it
        for token_form in (a, {}):
            query = f"?oauth_token={TOKEN_A}" if not token_form else ""
            status, raw, _ = await request(gw, "GET", path + query, headers=token_form)
            assert status == 404, (path, status)  # not 403: existence is not disclosed
            assert json.loads(raw)["errors"]["class"] == "NotFound"
            assert b"4002" not in raw and b"b-1" not in raw


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_token_of_network_a_cannot_submit_calls_of_network_b(
    gw: SecureGateway, method: str
) -> None:
    a = {"Authorization": f"Bearer {TOKEN_A}"}
    # B's campaign with A's token: unknown to A, refused, nothing stored for B.
    body = call_body(f"cross-{method}-{uuid.uuid4().hex}", campaign=95)
    status, raw, _ = await request(gw, method, f"{API}/calls.json", body, a)
    assert status == 403, raw
    assert "campaign" in json.loads(raw)["errors"]["invalid_data"].lower()
    # B's token in the body but A's in the header: the header decides, B gets nothing.
    status, raw, _ = await request(gw, method, f"{API}/calls.json",
                                   {**body, "oauth_token": TOKEN_B}, a)
    assert status == 403
    # Reusing B's external_call_unique_id with A's token creates A's own call, B's is untouched.
    before = await gw.db.calls.find_one({"_id": gw.cuid_b})
    status, raw, _ = await request(gw, method, f"{API}/calls.json", call_body("b-1"), a)
    assert status in (201, 202), raw
    cuid = json.loads(raw)["cuid"]
    assert cuid != gw.cuid_b
    assert (await gw.db.calls.find_one({"_id": cuid}))["network_id"] == "4001"
    assert await gw.db.calls.find_one({"_id": gw.cuid_b}) == before
    assert await gw.db.calls.count_documents({"network_id": "4002"}) == 1


async def test_secrets_are_absent_from_error_bodies_and_logs(gw: SecureGateway) -> None:
    signature = used_secret(f"sig-{uuid.uuid4().hex}")
    guessed = used_secret(f"guess-{uuid.uuid4().hex}")
    url = f"http://127.0.0.1:9/rec.wav?X-Amz-Signature={signature}"
    a = {"Authorization": f"Bearer {TOKEN_A}"}
    bodies: list[tuple[dict[str, str], Any]] = [
        ({"Authorization": f"Bearer {guessed}"}, call_body("s-1", recording_url=url)),
        ({}, {**call_body("s-2", recording_url=url), "oauth_token": guessed}),
        (a, call_body("s-3", recording_url=url, calling_phone_number="not-a-number")),
        (a, call_body("s-4", recording_url=url, recording_auth_config_id=99)),
        (a, call_body("s-5", recording_url=url + "\x00", start_time="soon")),
        (a, call_body("s-6", recording_url="ftp://user:" + signature + "@127.0.0.1/x")),
        (a, call_body("s-7", recording_url=url, campaign=12345)),
        (a, {"call": "x", "oauth_token": TOKEN_A, "auth": AUTH_SECRET}),
    ]
    for headers, body in bodies:
        for path in (f"{API}/calls.json", f"{API}/calls.json?oauth_token={guessed}"):
            status, raw, _ = await request(gw, "POST", path, body, headers)
            assert 400 <= status < 500, (status, raw)
            text = raw.decode()
            assert "errors" in json.loads(text)
            for secret in (signature, guessed, TOKEN_A, TOKEN_B, AUTH_SECRET):
                assert secret not in text, (secret, text)
    # Same content again, then other content: 202 and 409 name no secret either.
    ok = call_body("s-ok", recording_url=url)
    for _ in range(2):
        status, raw, _ = await request(gw, "POST", f"{API}/calls.json", ok, a)
        assert status in (201, 202) and signature not in raw.decode()
    status, raw, _ = await request(gw, "POST", f"{API}/calls.json",
                                   call_body("s-ok", recording_url=url + "2"), a)
    assert status == 409 and signature not in raw.decode()
    log = gw.log.read_text()
    for secret in (signature, guessed, TOKEN_A, TOKEN_B, AUTH_SECRET):
        assert secret not in log


async def test_a_token_of_network_a_cannot_list_or_retry_calls_of_network_b(gw: SecureGateway) -> None:
    a = {"Authorization": f"Bearer {TOKEN_A}"}
    b = {"Authorization": f"Bearer {TOKEN_B}"}
    status, raw, _ = await request(gw, "GET", f"{API}/calls.json", headers=b)
    assert status == 200 and gw.cuid_b in raw.decode()
    for query in ("", "?external_call_unique_id=b-1", "?status=normalized"):
        status, raw, _ = await request(gw, "GET", f"{API}/calls.json{query}", headers=a)
        assert status == 200 and gw.cuid_b not in raw.decode(), query
    status, raw, _ = await request(gw, "POST", f"{API}/calls/{gw.cuid_b}/retry.json", headers=a)
    assert status == 404 and json.loads(raw)["errors"]["class"] == "NotFound"
    status, raw, _ = await request(gw, "POST", f"{API}/calls/{gw.cuid_b}/retry.json", headers=b)
    assert status == 409 and json.loads(raw)["errors"]["class"] == "Conflict"  # normalized
