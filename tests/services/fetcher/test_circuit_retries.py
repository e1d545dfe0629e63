"""The fetcher stage in the consumer loop, on the real broker, store and object store, with
loopback recording hosts that hang: a call refused by its host's open circuit uses up no
attempt and is never failed untried; a dead host still fails its calls in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callingest import events, mongo
from callingest.errors import TransientError
from callingest.kafka import Producer
from callingest.pipeline import StageRunner
from callingest.settings import Settings
from callingest.stages import stage
from callingest.steps import Stage
from callingest.topics import Topics
from services.fetcher.download import FetchPolicy, fetch_recording
from services.fetcher.hosts import CLOSED, HALF_OPEN, OPEN, HostGuard
from services.fetcher.step import FetcherResources, raw_key, step
from tests.conftest import DEV_KEYRING, wait_until
from tests.helpers import call_doc, publish
from tests.services.fetcher.conftest import (
    LOOPBACK_OK,
    RecordingServer,
    Store,
    hang,
    reset_connection,
    serve,
    wav_bytes,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.s3, pytest.mark.timeout(120)]

HANG_SECONDS = 3.0


@contextlib.asynccontextmanager
async def fetcher(settings: Settings, store: Store, http: aiohttp.ClientSession,
                  guard: HostGuard) -> AsyncIterator[None]:
    client = mongo.open_client(settings)
    producer = Producer(settings.kafka_bootstrap_servers, "test")
    await producer.start()
    resources = FetcherResources(http=http, s3=store.client, address_policy=LOOPBACK_OK,
                                 keyring=DEV_KEYRING, hosts=guard)
    runner = StageRunner(Stage(stage("fetcher"), step, resources), settings,
                         mongo.database(client, settings), producer)
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        runner.stop()
        await asyncio.wait_for(task, 20)
        await producer.stop()
        await client.close()


async def send_validated(settings: Settings, db: Any, url: str) -> str:
    doc = call_doc(recording_url=url, status="validated")
    await db.calls.insert_one(doc)
    topic, name, record = events.stage_input(doc, "fetcher", 1)
    await publish(settings, f"{settings.topic_prefix}{topic}", name, record, doc["_id"])
    return str(doc["_id"])


async def statuses(db: Any, cuids: list[str]) -> dict[str, dict[str, Any]]:
    return {c["_id"]: c async for c in db.calls.find({"_id": {"$in": cuids}})}


async def test_calls_refused_behind_hanging_probes_are_tried_and_fetched(
        settings: Settings, db: Any, topics: Topics, store: Store, server: RecordingServer,
        http: aiohttp.ClientSession) -> None:
    """Six calls whose recordings hang open the host's circuit; three good recordings of the
    same host arrive while a hanging call is the half-open probe. Before, each refusal used
    up an attempt and the good calls failed ``RecordingHostUnavailable`` without the host
    ever seeing a request for them. Now a refusal uses none; past its retry deadline a call
    never tried gets its own try, so all three are fetched, while the hanging calls still
    fail in bounded time."""
    tuned = settings.model_copy(update={
        "fetch_first_byte_timeout_seconds": 2.0, "fetch_host_wait_seconds": 0.0,
        "max_processing_attempts": 3, "retry_delays_seconds": [0.5, 0.5]})
    guard = HostGuard(max_per_host=32, failure_threshold=5, cooldown=0.5)
    key = ("http", "127.0.0.1", server.port)
    good = [server.route(f"/good-{i}.wav", serve(wav_bytes(4000, seed=i))) for i in range(3)]
    async with fetcher(tuned, store, http, guard):
        hanging = [await send_validated(tuned, db, server.route(f"/hang-{i}.wav",
                                                                hang(HANG_SECONDS)))
                   for i in range(6)]

        def probe_under_way() -> bool:  # a hanging call's second request: the probe
            return sum(h.path.startswith("/hang-") for h in server.hits) > len(hanging)
        await wait_until(probe_under_way, timeout=30, interval=0.02, what="a hanging probe")
        assert guard.state(key) == HALF_OPEN
        good_cuids = [await send_validated(tuned, db, url) for url in good]

        async def settled() -> bool:
            calls = await statuses(db, good_cuids + hanging)
            return all(c["status"] in ("fetched", "failed") for c in calls.values())
        await wait_until(settled, timeout=60, what="every call fetched or failed")
    calls = await statuses(db, good_cuids + hanging)
    for cuid in good_cuids:
        await store.client.delete_object(Bucket=store.bucket, Key=raw_key(cuid, 1))
    assert [calls[c]["status"] for c in good_cuids] == ["fetched"] * 3, [
        calls[c].get("failure") for c in good_cuids]
    assert all(len(server.hits_for(f"/good-{i}.wav")) == 1 for i in range(3))
    for cuid in hanging:  # the real cause, not the breaker, and no other call's path
        failure = calls[cuid]["failure"]
        assert (calls[cuid]["status"], failure["class"]) == ("failed", "RecordingTimeout")
        own = f"timed out fetching {calls[cuid]['recording_url']} (gave up after"
        host_only = (f"timed out fetching http://127.0.0.1:{server.port} (host not contacted "
                     "again: circuit")
        assert failure["message"].startswith((own, host_only)), failure


async def test_a_probe_that_answered_closes_the_circuit_before_its_body_is_read(
        settings: Settings, store: Store, server: RecordingServer,
        http: aiohttp.ClientSession) -> None:
    """The probe's response headers prove the host alive: calls arriving while its body is
    still streaming go ahead. Before, the circuit closed only when the probe's download
    ended, and calls due meanwhile were refused ("probe under way") by a host known alive."""
    body = wav_bytes(64_000)
    down, mode = reset_connection(), {"down": True}

    async def slow_body(request: web.Request) -> web.StreamResponse:
        if mode["down"]:
            return await down(request)
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:1000])
        await asyncio.sleep(1.0)
        await response.write(body[1000:])
        return response

    url = server.route("/slow.wav", slow_body)
    guard = HostGuard(max_per_host=8, failure_threshold=1, cooldown=0.2)
    key = ("http", "127.0.0.1", server.port)
    pol = FetchPolicy.from_settings(settings)

    keys: list[str] = []

    async def fetch() -> Any:
        keys.append(f"raw/test-{uuid.uuid4().hex}/1")
        return await fetch_recording(url, auth=None, http=http, s3=store.client,
                                     bucket=store.bucket, key=keys[-1], policy=pol,
                                     address_policy=LOOPBACK_OK, hosts=guard)
    with pytest.raises(TransientError):
        await fetch()
    assert guard.state(key) == OPEN
    await asyncio.sleep(0.25)
    mode["down"] = False
    probe = asyncio.create_task(fetch())
    hits = len(server.hits_for("/slow.wav"))
    await wait_until(lambda: len(server.hits_for("/slow.wav")) > hits, timeout=5, interval=0.01,
                     what="the probe's request")
    await asyncio.sleep(0.2)  # headers and the first bytes are in, the rest is a second away
    assert not probe.done()
    assert guard.state(key) == CLOSED
    try:
        second = await fetch()  # not refused: the host answered
        assert second.size_bytes == (await probe).size_bytes == len(body)
    finally:
        await asyncio.gather(probe, return_exceptions=True)
        for name in keys:
            await store.client.delete_object(Bucket=store.bucket, Key=name)
