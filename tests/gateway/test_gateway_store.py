"""How the gateway uses the store: inserts only on a new call's path, receipts, busy retries, 503s."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo.errors import OperationFailure

from services.gateway import keys, writer
from services.gateway.publisher import unpublished_cuids
from tests.gateway.conftest import EventReader, poll
from tests.gateway.test_gateway_api import call_body, post

BUSY = "database is locked (5) (SQLITE_BUSY)"


def test_locked_database_is_recognized() -> None:
    assert writer.is_busy(OperationFailure(BUSY, code=1, details={"errmsg": BUSY, "code": 1}))
    assert writer.is_busy({"index": 0, "code": 1, "errmsg": BUSY})
    assert not writer.is_busy(OperationFailure("E11000 duplicate key", code=11000))
    assert not writer.is_busy({"index": 0, "code": 11000, "errmsg": "duplicate key"})
    assert not writer.is_busy(ValueError(BUSY))


async def test_busy_retries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A locked database is retried a bounded number of times, then the error reaches the caller."""
    monkeypatch.setattr(writer, "BUSY_RETRY_DELAYS", (0.0, 0.0, 0.0))
    attempts = 0

    async def locked_twice() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise OperationFailure(BUSY, code=1)
        return "written"

    assert await writer.retry_busy(locked_twice) == "written" and attempts == 3

    attempts = 0

    async def always_locked() -> str:
        nonlocal attempts
        attempts += 1
        raise OperationFailure(BUSY, code=1)

    with pytest.raises(OperationFailure):
        await writer.retry_busy(always_locked)
    assert attempts == 4

    attempts = 0

    async def other_error() -> str:
        nonlocal attempts
        attempts += 1
        raise OperationFailure("not authorized", code=13)

    with pytest.raises(OperationFailure):
        await writer.retry_busy(other_error)
    assert attempts == 1



@pytest.mark.kafka
@pytest.mark.mongo
async def test_new_call_is_stored_unchanged_and_receipted(
    gateway: TestClient[Any, Any], configured_db: Any, read_events: EventReader
) -> None:
    """The call document is written once (never updated by the gateway); publication is a receipt."""
    status, answer = await post(gateway, call_body("store-1"))
    assert status == 201
    cuid = answer["cuid"]

    async def receipted() -> Any:
        return await configured_db.published_calls.find_one({"_id": cuid})

    await poll(receipted, patience=10.0)
    stored = await configured_db.calls.find_one({"_id": cuid})
    assert stored["published"] is False and "publish_claim" not in stored
    assert stored["history"] == [
        {"stage": "gateway", "status": "received", "at": stored["history"][0]["at"]}
    ]
    assert await unpublished_cuids(configured_db) == []
    assert await configured_db.publish_claims.count_documents({}) == 0
    status, again = await post(gateway, call_body("store-1"))
    assert (status, again) == (202, {"cuid": cuid})
    assert [e["cuid"] for e in await read_events(expected=1, settle=2.0)] == [cuid]


@pytest.mark.kafka
@pytest.mark.mongo
async def test_store_refusing_writes_is_503_with_retry_after(gateway: TestClient[Any, Any]) -> None:
    """When the store cannot take the call (here: the writer has stopped), 503, never a 500."""
    await gateway.app[keys.WRITER].stop()
    resp = await gateway.post("/api/2022-03-01/calls.json", json=call_body("store-2"))
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    assert (await resp.json())["errors"]["class"] == "ServiceUnavailable"
