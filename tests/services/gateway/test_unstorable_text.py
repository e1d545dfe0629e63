"""Text no store can hold (a NUL, an unpaired UTF-16 surrogate): a clear 4xx for the request that
sends it, and nothing at all for the requests that happen to share its batch of inserts."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo.errors import ExecutionTimeout, WriteConcernError

from callingest.mongo import UNSTORABLE_TEXT
from services.gateway import writer
from tests.services.gateway.conftest import NETWORK_TOKEN
from tests.services.gateway.test_gateway_api import assert_error, call_body, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

Client = TestClient[Any, Any]
NUL, SURROGATE = "\x00", "\ud800"


def _body(external_id: str, field: str, bad: str) -> dict[str, Any]:
    """A valid submission but for ``bad`` text in ``field`` (a call field, or a signal's or a
    custom data field's name or value)."""
    body = call_body(external_id)
    body["signals"] = [{"name": "Sale", "value": "true"}]
    body["custom_data"] = [{"name": "channel", "value": "web"}]
    if field.startswith(("signals", "custom_data")):
        group, key = field.split(".")
        body[group][0][key] += bad
    else:
        body["call"][field] = str(body["call"].get(field, "")) + bad
    return body


STRING_FIELDS = ["external_call_unique_id", "advertiser_campaign_id_from_network", "recording_url",
                 "language_code", "recording_auth_config_id", "signals.name", "custom_data.name",
                 "custom_data.value"]


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
async def test_unstorable_text_in_any_field_is_403_naming_it_and_spares_concurrent_calls(
    gateway: Client, bad: str
) -> None:
    """Each string field with a NUL or a lone surrogate is refused with 403 RecordInvalid naming
    the field (not a 503 from the store, not a 500 from an encoder), while valid submissions
    sent at the same moment are all created."""
    tag = uuid.uuid4().hex[:8]
    bodies = [_body(f"bad-{tag}-{i}", field, bad) for i, field in enumerate(STRING_FIELDS)]
    bodies[4]["call"]["recording_auth_config_id"] = "7" + bad  # a configured id, then the bad text
    good = [call_body(f"good-{tag}-{i}") for i in range(24)]
    # json.dumps writes a NUL as \u0000 and a surrogate as \ud800: the escapes a client sends
    results = await asyncio.gather(*(post(gateway, json.dumps(b)) for b in bodies + good))
    for field, (status, answer) in zip(STRING_FIELDS, results[:len(bodies)], strict=True):
        message = assert_error(status, answer, 403, "RecordInvalid")
        path = field if field.startswith(("signals", "custom_data")) else f"call.{field}"
        path = path.replace("signals.", "signals[0].").replace("custom_data.", "custom_data[0].")
        assert f"'{path}' {UNSTORABLE_TEXT}" in message, (field, message)
    assert [status for status, _ in results[len(bodies):]] == [201] * len(good)


async def test_unstorable_token_or_cuid_is_401_or_404(gateway: Client) -> None:
    """A token with a NUL or a surrogate (in the body, the query, or an Authorization header
    whose raw bytes are not UTF-8) is just not a token: 401; such a cuid names no call: 404."""
    body = call_body("tok-1")
    for token in (NUL, "ab" + SURROGATE):
        status, answer = await post(gateway, json.dumps({**body, "oauth_token": token}))
        assert_error(status, answer, 401, "NotAuthorized")
    resp = await gateway.get("/api/2022-03-01/calls.json?oauth_token=a%00b")
    assert resp.status == 401

    # aiohttp's server decodes a header byte that is not UTF-8 (0xff) to a lone surrogate
    reader, writer_ = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer_.write(b"GET /api/2022-03-01/calls.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer ab\xffcd\r\nConnection: close\r\n\r\n")
    await writer_.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer_.close()
    assert raw.startswith(b"HTTP/1.1 401"), raw[:200]

    headers = {"Authorization": f"Bearer {NETWORK_TOKEN}"}
    for path in ("calls/a%00b.json", "calls/a%00b/recording.wav"):
        resp = await gateway.get(f"/api/2022-03-01/{path}", headers=headers)
        assert resp.status == 404, (path, await resp.text())
    resp = await gateway.post("/api/2022-03-01/calls/a%00b/retry.json", headers=headers)
    assert resp.status == 404


async def test_a_document_the_store_refuses_fails_only_its_own_insert(db: Any) -> None:
    """One insert in a batch that the store (a NUL, which FerretDB on PostgreSQL cannot hold) or
    the driver (a surrogate, which BSON cannot encode) refuses fails alone; every other insert
    of the same batch is written and reported written."""
    calls = writer.CallWriter(db)
    calls.start()
    try:
        futures = [calls.enqueue("calls", {"_id": f"ok-{i}", "text": "fine"}) for i in range(10)]
        nul = calls.enqueue("calls", {"_id": "nul", "text": "a" + NUL})
        surrogate = calls.enqueue("calls", {"_id": "surrogate", "text": SURROGATE})
        futures += [calls.enqueue("calls", {"_id": f"ok-{i}", "text": "fine"}) for i in range(10, 20)]
        assert await asyncio.gather(*futures) == [True] * 20
        with pytest.raises(UnicodeEncodeError):
            await surrogate
        # A store that holds NULs (MongoDB) writes that one too; FerretDB on PostgreSQL refuses it.
        stored_nul = await asyncio.gather(nul, return_exceptions=True)
    finally:
        await calls.stop()
    assert await db.calls.count_documents({"_id": {"$regex": "^ok-"}}) == 20
    assert await db.calls.count_documents({"_id": "nul"}) == (1 if stored_nul == [True] else 0)


@pytest.mark.parametrize("error", [
    ExecutionTimeout("operation exceeded time limit", code=50),
    WriteConcernError("waiting for replication timed out", code=64),
], ids=["timeout", "write-concern"])
async def test_a_batch_refused_for_every_document_is_not_retried_one_by_one(error: Exception) -> None:
    """A refusal that would recur for each document (a timeout; a write concern left unsatisfied,
    the batch being written) fails the whole batch at once: one attempt, not one per document."""
    attempts = 0

    class Refusing:  # a database whose every insert is refused with ``error``
        def __getitem__(self, _name: str) -> Refusing:
            return self

        async def insert_many(self, _docs: list[Any], ordered: bool) -> None:
            nonlocal attempts
            attempts += 1
            raise error

    calls = writer.CallWriter(Refusing())  # type: ignore[arg-type]
    calls.start()
    try:
        futures = [calls.enqueue("calls", {"_id": f"t{i}"}) for i in range(5)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await calls.stop()
    assert outcomes == [error] * 5
    assert attempts == 1
