"""How the gateway uses the store: inserts only on a new call's path, receipts, busy retries, 503s."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo.errors import OperationFailure

from callingest import mongo
from services.gateway import keys, writer
from services.gateway.receipts import unpublished_cuids
from tests.services.gateway.conftest import EventReader, poll
from tests.services.gateway.test_gateway_api import call_body, post

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


@pytest.mark.mongo
async def test_writer_holds_background_inserts_back_by_age_not_by_idleness(db: Any) -> None:
    """Receipts (background inserts) are written BACKGROUND_MAX_DELAY_SECONDS after the first
    was queued, in one batch, not each time the queue is empty; urgent inserts are not held,
    and nothing queued is lost, also at stop."""
    calls = writer.CallWriter(db)
    calls.start()
    try:
        started = asyncio.get_running_loop().time()
        receipts = [calls.enqueue("published_calls", {"_id": f"r{i}"}, background=True) for i in range(3)]
        assert await calls.insert("calls", {"_id": "urgent-1"}) is True
        await asyncio.sleep(0.05)
        assert await db.published_calls.count_documents({}) == 0  # queue idle, still held back
        assert await asyncio.gather(*receipts) == [True, True, True]
        assert asyncio.get_running_loop().time() - started >= writer.BACKGROUND_MAX_DELAY_SECONDS * 0.9
        assert await db.published_calls.count_documents({}) == 3

        mixed = [calls.enqueue("calls", {"_id": f"c{i}"}, background=i % 2 == 0) for i in range(300)]
        late = calls.enqueue("published_calls", {"_id": "at-stop"}, background=True)
    finally:
        await calls.stop()
    assert all(await asyncio.gather(*mixed, late))
    assert await db.calls.count_documents({}) == 301
    assert await db.published_calls.count_documents({"_id": "at-stop"}) == 1


@pytest.mark.mongo
async def test_scan_since_reads_only_calls_created_since(db: Any) -> None:
    now = datetime.now(UTC)
    old, recent, receipted = now - timedelta(hours=2), now - timedelta(minutes=1), now - timedelta(minutes=2)
    await db.calls.insert_many([
        {"_id": "old", "published": False, "created_at": old},
        {"_id": "recent", "published": False, "created_at": recent},
        {"_id": "receipted", "published": False, "created_at": receipted},
        {"_id": "too-new", "published": False, "created_at": now},
    ])
    await db.published_calls.insert_one({"_id": "receipted", "at": receipted + timedelta(seconds=1)})
    cutoff = now - timedelta(seconds=5)
    everything = await unpublished_cuids(db, older_than=cutoff)
    assert sorted(c["_id"] for c in everything) == ["old", "recent"]
    window = await unpublished_cuids(db, older_than=cutoff, created_since=now - timedelta(minutes=10))
    assert [c["_id"] for c in window] == ["recent"]
    # On MongoDB the window is an index range in both collections, not a scan of the history;
    # so are the republisher's other periodic reads (restarts not yet out, a call's claims).
    indexed = {(collection, keys[0][0]) for collection, keys, _, _ in mongo.INDEXES}
    assert {("calls", "created_at"), ("published_calls", "at"), ("call_restarts", "published"),
            ("publish_claims", "cuid")} <= indexed


@pytest.mark.mongo
async def test_writer_stop_waits_for_the_batch_being_written(db: Any) -> None:
    """stop() returns only after every queued insert is settled, including the batch the
    writer took off the queue last and is still writing (the queue is empty by then)."""
    calls = writer.CallWriter(db)
    calls.start()
    inserts = [calls.enqueue("calls", {"_id": f"s{i}", "pad": "x" * 200}) for i in range(1500)]
    await calls.stop()
    assert [f for f in inserts if not f.done()] == []
    assert all(f.result() is True for f in inserts)
    assert await db.calls.count_documents({}) == 1500
