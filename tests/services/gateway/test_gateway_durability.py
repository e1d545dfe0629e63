"""Durability: Kafka unavailable -> 503 and an unpublished record, published exactly once later."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import pytest
from aiohttp.test_utils import TestClient

from callingest import avro, events
from callingest.settings import Settings
from services.gateway import keys
from services.gateway import publisher as publisher_module
from services.gateway.receipts import SCAN_MARKS, advance_scan_mark, scan_mark, unpublished_cuids
from tests.conftest import free_port
from tests.services.gateway.conftest import EventReader, poll, start_client
from tests.services.gateway.test_gateway_api import call_body, get_call, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


def without_republisher(settings: Settings) -> Settings:
    """The same settings with the background republisher's first scan an hour away."""
    return settings.model_copy(update={"republish_after_seconds": 3600.0})


async def wait_all_published(db: Any) -> None:
    """Wait (at most 20 s) until no stored call is left unpublished."""

    async def all_published() -> bool:
        return await unpublished_cuids(db) == []

    await poll(all_published, patience=20.0)


def kafka_down(settings: Settings) -> Settings:
    """The same settings with Kafka at a loopback port nothing listens on."""
    return settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})


async def submit_while_kafka_is_down(
    settings: Settings, db: Any, body: dict[str, Any]
) -> dict[str, Any]:
    down: TestClient[Any, Any] = await start_client(kafka_down(settings))
    try:
        resp = await down.post("/api/2022-03-01/calls.json", json=body)
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) > 0
        answer = await resp.json()
        assert answer["errors"]["class"] == "ServiceUnavailable"
        ready = await down.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["checks"]["kafka_producer"] is False
    finally:
        await down.close()
    stored = await db.calls.find_one(
        {"external_call_unique_id": body["call"]["external_call_unique_id"]}
    )
    assert stored is not None and stored["published"] is False
    assert stored["_id"] in {c["_id"] for c in await unpublished_cuids(db)}
    return stored


@pytest.mark.slow
async def test_resubmission_publishes_a_call_accepted_while_kafka_was_down(
    settings: Settings, configured_db: Any, topics: Any, read_events: EventReader
) -> None:
    body = call_body("down-1")
    stored = await submit_while_kafka_is_down(settings, configured_db, body)

    up = await start_client(without_republisher(settings))
    try:
        status, answer = await post(up, body)
        assert (status, answer) == (202, {"cuid": stored["_id"]})
        assert await configured_db.published_calls.find_one({"_id": stored["_id"]}) is not None
        assert await unpublished_cuids(configured_db) == []
        status, answer = await post(up, body)
        assert status == 202
        assert (await get_call(up, stored["_id"]))[1]["status"] == "received"
    finally:
        await up.close()
    published = await read_events(expected=1, settle=3.0)
    assert [e["cuid"] for e in published] == [stored["_id"]]


@pytest.mark.slow
async def test_republisher_publishes_unpublished_calls_once(
    settings: Settings, configured_db: Any, topics: Any, read_events: EventReader
) -> None:
    stored = [
        await submit_while_kafka_is_down(settings, configured_db, call_body(f"down-r{i}"))
        for i in range(3)
    ]
    # Two gateways (as two worker processes would) race for the same unpublished calls.
    first = await start_client(settings)
    second = await start_client(settings)
    try:
        await wait_all_published(configured_db)
    finally:
        await first.close()
        await second.close()
    published = await read_events(expected=3, settle=3.0)
    assert sorted(e["cuid"] for e in published) == sorted(s["_id"] for s in stored)


@pytest.mark.slow
async def test_a_starting_republisher_scans_from_the_stored_mark_not_the_whole_history(
    settings: Settings, configured_db: Any, topics: Any, read_events: EventReader
) -> None:
    """Every scan stores how far back all calls are known published (``scan_marks``); a gateway
    that starts scans from there, not every call and receipt ever stored (a production database
    holds millions). On a database without a mark it reads everything, as before."""
    now = datetime.now(UTC).replace(microsecond=0)  # the store keeps milliseconds
    history, recent = [await submit_while_kafka_is_down(settings, configured_db, call_body(f"mark-{name}"))
                       for name in ("history", "recent")]
    # A call left unpublished before the mark: only a whole-history scan would find it.
    await configured_db.calls.update_one({"_id": history["_id"]},
                                         {"$set": {"created_at": now - timedelta(hours=2)}})
    await configured_db.calls.update_one({"_id": recent["_id"]},
                                         {"$set": {"created_at": now - timedelta(seconds=60)}})
    await advance_scan_mark(configured_db, now - timedelta(hours=1))
    await advance_scan_mark(configured_db, now - timedelta(hours=3))  # the mark only moves forward
    assert await scan_mark(configured_db) == now - timedelta(hours=1)

    async def recent_published() -> bool:
        return await configured_db.published_calls.find_one({"_id": recent["_id"]}) is not None

    starting = await start_client(settings.model_copy(update={"republish_after_seconds": 1.0}))
    try:
        await poll(recent_published)
        mark = await poll(lambda: marked_after(configured_db, now - timedelta(minutes=2)))
    finally:
        await starting.close()
    assert mark <= datetime.now(UTC)
    assert [c["_id"] for c in await unpublished_cuids(configured_db)] == [history["_id"]]
    assert [e["cuid"] for e in await read_events(expected=1, settle=3.0)] == [recent["_id"]]

    # Without a mark (a new database), the first scan reads everything and finds the old call.
    await configured_db[SCAN_MARKS].delete_many({})
    fresh = await start_client(settings.model_copy(update={"republish_after_seconds": 1.0}))
    try:
        await wait_all_published(configured_db)
    finally:
        await fresh.close()


async def marked_after(db: Any, earliest: datetime) -> datetime | None:
    """The stored scan mark once it is later than ``earliest`` (else None)."""
    mark = await scan_mark(db)
    return mark if mark is not None and mark > earliest else None


async def crash_after_kafka_ack(settings: Settings, db: Any, body: dict[str, Any]) -> str:
    """Submit ``body`` (201), then leave the state a gateway killed between Kafka's
    acknowledgement and the publication receipt leaves: the event on the topic, no receipt.
    The call is back-dated so that the inserting request's implicit claim has expired."""
    first = await start_client(without_republisher(settings))
    try:
        status, answer = await post(first, body)
        assert status == 201
    finally:
        await first.close()
    cuid: str = answer["cuid"]
    assert (await db.published_calls.delete_one({"_id": cuid})).deleted_count == 1
    await db.calls.update_one({"_id": cuid},
                              {"$set": {"created_at": datetime.now(UTC) - timedelta(seconds=60)}})
    assert cuid in {c["_id"] for c in await unpublished_cuids(db)}
    return cuid


@pytest.mark.slow
async def test_an_event_already_on_kafka_is_not_published_again_after_a_crash(
    settings: Settings, configured_db: Any, topics: Any, read_events: EventReader
) -> None:
    body = call_body("crash-resubmitted")
    resubmitted = await crash_after_kafka_ack(settings, configured_db, body)
    scanned = await crash_after_kafka_ack(settings, configured_db, call_body("crash-republished"))

    # A new gateway process: the client's resubmission finds the event on the topic.
    up = await start_client(without_republisher(settings))
    try:
        assert await post(up, body) == (202, {"cuid": resubmitted})
    finally:
        await up.close()
    assert await configured_db.published_calls.find_one({"_id": resubmitted}) is not None

    # Another one: its republisher's scan finds the other call's event on the topic.
    republisher = await start_client(settings.model_copy(update={"republish_after_seconds": 1.0}))
    try:
        await wait_all_published(configured_db)
    finally:
        await republisher.close()
    published = await read_events(expected=2, settle=3.0)
    assert sorted(e["cuid"] for e in published) == sorted([resubmitted, scanned])


@pytest.mark.slow
async def test_a_send_that_times_out_but_is_delivered_later_is_published_once(
    settings: Settings, configured_db: Any, topics: Any, read_events: EventReader,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    body = call_body("late-delivery")
    up = await start_client(without_republisher(settings))
    try:
        # No wait at all: Kafka cannot have acknowledged, so the gateway answers 503, while
        # aiokafka still delivers the event (a broker that was slow, or came back). (A wait
        # of 1 ms was not enough on a loaded machine: asyncio runs I/O callbacks before
        # expired timers, so an acknowledgement read in the same loop pass won the race.)
        monkeypatch.setattr(publisher_module, "PUBLISH_WAIT_SECONDS", 0.0)
        status, answer = await post(up, body)
        assert status == 503 and answer["errors"]["class"] == "ServiceUnavailable"
        monkeypatch.undo()
        # The client's retry: answered from the late delivery, not by publishing again.
        status, answer = await post(up, body)
        assert status == 202
        cuid = answer["cuid"]

        async def receipt() -> Any:
            return await configured_db.published_calls.find_one({"_id": cuid})

        await poll(receipt, patience=10.0)
        assert await unpublished_cuids(configured_db) == []
    finally:
        await up.close()
    published = await read_events(expected=1, settle=3.0)
    assert [e["cuid"] for e in published] == [cuid]


async def test_recording_is_served_once_normalized(
    gateway: TestClient[Any, Any], configured_db: Any, s3_client: Any, settings: Settings
) -> None:
    status, answer = await post(gateway, call_body("rec-1"))
    assert status == 201
    cuid = answer["cuid"]
    url = f"/api/2022-03-01/calls/{cuid}/recording.wav"
    auth = {"Authorization": "Bearer gw-network-token-0001"}
    resp = await gateway.get(url, headers=auth)
    assert resp.status == 404 and (await resp.json())["errors"]["class"] == "NotFound"

    wav = b"RIFF" + bytes(range(256)) * 1000
    key = f"normalized/{cuid}.wav"
    await s3_client.put_object(Bucket=settings.s3_bucket, Key=key, Body=wav)
    await configured_db.calls.update_one(
        {"_id": cuid},
        {
            "$set": {
                "status": "normalized",
                "recording": {
                    "bucket": settings.s3_bucket,
                    "key": key,
                    "sample_rate": 8000,
                    "channels": 2,
                    "sample_format": "s16",
                    "duration_seconds": 1.5,
                },
            },
            "$push": {
                "history": {"stage": "normalizer", "status": "normalized", "at": datetime.now(UTC)}
            },
        },
    )
    resp = await gateway.get(url, headers=auth)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/wav"
    assert await resp.read() == wav
    _, call = await get_call(gateway, cuid)
    assert call["status"] == "normalized"
    assert call["recording"] == {
        "sample_rate": 8000,
        "channels": 2,
        "sample_format": "s16",
        "duration_seconds": 1.5,
    }
    assert [h["status"] for h in call["history"]] == ["received", "normalized"]
    assert "bucket" not in call["recording"] and "content_hash" not in call


def test_every_callsubmitted_schema_version_still_decodes() -> None:
    call = {
        "_id": "cuid-1",
        "network_id": "1001",
        "external_call_unique_id": "x",
        "start_time": datetime(2016, 4, 11, 20, tzinfo=UTC),
        "calling_phone_number": "+18885551212",
        "destination_phone_number": "+18885551212",
        "advertiser_campaign_id_from_network": "85",
        "call_direction": "inbound",
        "recording_url": "http://127.0.0.1/x.wav",
        "language_code": "en-US",
        "signals": [{"name": "Sale", "value": True}],
        "custom_data": [{"name": "channel", "value": "Paid Search"}],
    }
    record = events.call_submitted(call)
    versions = [sv for sv in avro.BY_FINGERPRINT.values() if sv.event == "CallSubmitted"]
    assert versions
    for writer in versions:
        out = io.BytesIO()
        out.write(avro.MAGIC + writer.fingerprint)
        fastavro.schemaless_writer(out, writer.parsed, record)
        name, decoded = avro.decode(out.getvalue())
        assert name == "CallSubmitted"
        assert decoded["cuid"] == "cuid-1" and decoded["signals"] == record["signals"]


async def test_a_send_that_never_settles_gives_its_claim_back(
    settings: Settings, configured_db: Any, topics: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim of a timed-out send is renewed while aiokafka may still deliver it, but not
    for ever: a producer that never settles it must not keep the call from being published."""
    monkeypatch.setattr(publisher_module, "CLAIM_SECONDS", 0.6)
    monkeypatch.setattr(publisher_module, "MAX_HOLD_SECONDS", 1.0)
    up = await start_client(without_republisher(settings))
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        hold = asyncio.create_task(up.app[keys.PUBLISHER]._hold_until_settled("never-settled", None, never))
        await asyncio.sleep(0.3)
        claim = await configured_db.publish_claims.find_one({"_id": "never-settled:0"})
        assert claim is not None and claim["until"] > datetime.now(UTC)  # held meanwhile
        assert await asyncio.wait_for(hold, 10) is False
        claim = await configured_db.publish_claims.find_one({"_id": "never-settled:0"})
        assert claim is not None and claim["until"] < datetime.now(UTC)  # given back
    finally:
        never.cancel()
        await up.close()
