"""The fetcher step called directly, against the real MongoDB-protocol store and S3."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callingest import avro
from callingest.errors import PermanentError
from callingest.settings import Settings
from callingest.steps import StageContext, StepResult
from callingest.topics import Topics
from services.fetcher.step import FetcherResources, raw_key, step
from tests.conftest import DEV_KEYRING
from tests.services.fetcher.conftest import LOOPBACK_OK, RecordingServer, Store, serve, wav_bytes

pytestmark = [pytest.mark.s3, pytest.mark.mongo]

NETWORK = "1001"
TOKEN = "net-5ecret-token-81"
WAV = wav_bytes(12_000)


@pytest.fixture
async def network(db: Any) -> dict[str, Any]:
    doc = {
        "_id": NETWORK,
        "name": "Test Network",
        "recording_auth_configs": [
            {"id": "7", "method": "bearer_header", "token": TOKEN},
            {"id": "8", "method": "query_param", "name": "access_token", "token": TOKEN},
            {"id": "9", "method": "custom_header", "name": "X-Api-Key", "token": TOKEN},
        ],
    }
    await db.networks.insert_one(doc)
    return doc


@pytest.fixture
async def cuid(store: Store) -> AsyncIterator[str]:
    value = f"test{uuid.uuid4().hex[:20]}"
    yield value
    for attempt in (1, 2):
        await store.client.delete_object(Bucket=store.bucket, Key=raw_key(value, attempt))


def event(cuid: str, url: str, auth_id: str | None = None, attempt: int = 1) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "cuid": cuid,
        "occurred_at": datetime.now(UTC),
        "schema_version": 1,
        "network_id": NETWORK,
        "attempt": attempt,
        "recording_url": url,
        "recording_auth_config_id": auth_id,
        "call_direction": "outbound",
    }


def context(settings: Settings, db: Any,
            resources: FetcherResources) -> StageContext[FetcherResources]:
    return StageContext(settings, db, Topics(settings.topic_prefix), None, 0, resources)


@pytest.fixture
def resources(store: Store, http: aiohttp.ClientSession) -> FetcherResources:
    return FetcherResources(http=http, s3=store.client, address_policy=LOOPBACK_OK,
                            keyring=DEV_KEYRING)


def authorized(header: str, value: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get(header) != value and request.query.get("access_token") != value:
            return web.Response(status=401)
        return web.Response(body=WAV)
    return handler


async def test_step_stores_and_describes(server: RecordingServer, settings: Settings, db: Any,
                                         network: dict[str, Any], store: Store,
                                         resources: FetcherResources, cuid: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # As in production (callingest.logging.configure): pymongo's DEBUG command log prints
    # whole documents, network auth configs included.
    caplog.set_level(logging.WARNING, logger="pymongo")
    url = server.route("/call.bin", authorized("Authorization", f"Bearer {TOKEN}"))
    ev = event(cuid, url, "7")
    result = await step(ev, context(settings, db, resources))
    key = f"raw/{cuid}/1"
    assert result == StepResult(
        next_event={"bucket": store.bucket, "key": key, "size_bytes": len(WAV), "format": "wav",
                    "call_direction": "outbound"},
        call_update={"fetched": {"bucket": store.bucket, "key": key, "size_bytes": len(WAV),
                                 "format": "wav"}},
    )
    assert await store.get(key) == WAV
    assert result.next_event is not None
    record = {k: ev[k] for k in ("event_id", "cuid", "occurred_at", "schema_version",
                                 "network_id", "attempt")}
    name, decoded = avro.decode(avro.encode("RecordingFetched", {**record, **result.next_event}))
    assert name == "RecordingFetched"
    assert decoded["key"] == key
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(("auth_id", "header", "value"),
                         [("8", "-", TOKEN), ("9", "X-Api-Key", TOKEN)])
async def test_step_applies_network_auth_config(server: RecordingServer, settings: Settings,
                                                db: Any, network: dict[str, Any],
                                                resources: FetcherResources, cuid: str,
                                                auth_id: str, header: str, value: str) -> None:
    url = server.route("/call.wav", authorized(header, value))
    result = await step(event(cuid, url, auth_id), context(settings, db, resources))
    assert result.next_event is not None
    assert len(server.hits) == 1


async def test_step_without_auth_config_gets_401(server: RecordingServer, settings: Settings,
                                                 db: Any, network: dict[str, Any],
                                                 resources: FetcherResources, cuid: str) -> None:
    url = server.route("/call.wav", authorized("Authorization", f"Bearer {TOKEN}"))
    with pytest.raises(PermanentError) as info:
        await step(event(cuid, url, None), context(settings, db, resources))
    assert info.value.failure_class == "RecordingUnavailable"


async def test_step_is_idempotent_per_attempt(server: RecordingServer, settings: Settings,
                                              db: Any, network: dict[str, Any], store: Store,
                                              resources: FetcherResources, cuid: str) -> None:
    url = server.route("/call.wav", serve(WAV))
    ctx = context(settings, db, resources)
    first = await step(event(cuid, url), ctx)
    second = await step(event(cuid, url), ctx)
    assert first == second
    assert len(server.hits) == 1  # the redelivery reused the stored object
    replay = await step(event(cuid, url, attempt=2), ctx)
    assert replay.next_event is not None
    assert replay.next_event["key"] == f"raw/{cuid}/2"
    assert len(server.hits) == 2


async def test_step_reuses_object_without_format_metadata(
    server: RecordingServer, settings: Settings, db: Any, network: dict[str, Any],
    store: Store, resources: FetcherResources, cuid: str
) -> None:
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + b"\0" * 3000
    await store.client.put_object(Bucket=store.bucket, Key=raw_key(cuid, 1), Body=mp3)
    url = server.route("/call.wav", serve(WAV))
    result = await step(event(cuid, url), context(settings, db, resources))
    assert result.next_event is not None
    assert (result.next_event["format"], result.next_event["size_bytes"]) == ("mp3", len(mp3))
    assert server.hits == []


async def test_step_replaces_unrecognized_leftover(
    server: RecordingServer, settings: Settings, db: Any, network: dict[str, Any],
    store: Store, resources: FetcherResources, cuid: str
) -> None:
    await store.client.put_object(Bucket=store.bucket, Key=raw_key(cuid, 1), Body=b"junk" * 100)
    url = server.route("/call.wav", serve(WAV))
    result = await step(event(cuid, url), context(settings, db, resources))
    assert result.next_event is not None and result.next_event["format"] == "wav"
    assert await store.get(raw_key(cuid, 1)) == WAV


@pytest.mark.parametrize("auth_id", ["42", "7"])
async def test_step_missing_auth_config(server: RecordingServer, settings: Settings, db: Any,
                                        resources: FetcherResources, cuid: str,
                                        auth_id: str) -> None:
    """The config (or the whole network) is gone: permanent, nothing fetched."""
    if auth_id == "42":
        await db.networks.insert_one({"_id": NETWORK, "recording_auth_configs": []})
    url = server.route("/call.wav", serve(WAV))
    with pytest.raises(PermanentError) as info:
        await step(event(cuid, url, auth_id), context(settings, db, resources))
    assert info.value.failure_class == "RecordingAuthConfigNotFound"
    assert server.hits == []


async def test_open_resources_follow_loopback_setting(server: RecordingServer,
                                                      settings: Settings, db: Any,
                                                      network: dict[str, Any],
                                                      store: Store, cuid: str) -> None:
    url = server.route("/call.wav", serve(WAV))
    strict = settings.model_copy(update={"allow_loopback_recordings": False})
    async with FetcherResources.open(strict) as resources:
        with pytest.raises(PermanentError) as info:
            await step(event(cuid, url), context(strict, db, resources))
        assert info.value.failure_class == "RecordingUrlRefused"
        assert server.hits == []
    async with FetcherResources.open(settings) as resources:
        result = await step(event(cuid, url), context(settings, db, resources))
        assert result.next_event is not None
    assert await store.get(raw_key(cuid, 1)) == WAV
