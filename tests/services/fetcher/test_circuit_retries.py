"""The fetcher stage in the consumer loop, on the real broker, store and object store, with
loopback recording hosts that hang: a call refused by its host's open circuit uses up no
attempt and is never failed untried; a dead host still fails its calls in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from callingest import events, mongo
from callingest.callview import call_view
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


def circuit_refusals() -> float:
    return REGISTRY.get_sample_value("callingest_fetch_rejections_total",
                                     {"reason": "circuit_open"}) or 0.0


async def test_a_call_refused_by_its_hosts_open_circuit_says_so_in_the_call_view(
        settings: Settings, db: Any, topics: Topics, store: Store, server: RecordingServer,
        http: aiohttp.ClientSession) -> None:
    """A call refused untried by its host's open circuit shows it in ``retrying``: the try it
    waits for, when it is due, and the host's failure that opened the circuit, in the keys
    interfaces.md gives ``retrying``. Before, a refusal recorded nothing: a call never
    tried showed ``retrying: null``, a call tried before kept the ``retrying`` of its own
    failed try, due in the past, for as long as the circuit refused it."""
    tuned = settings.model_copy(update={"fetch_host_wait_seconds": 0.0,
                                        "retry_delays_seconds": [1.0, 60.0]})
    guard = HostGuard(max_per_host=8, failure_threshold=1, cooldown=60.0)
    key, host = ("http", "127.0.0.1", server.port), f"http://127.0.0.1:{server.port}"
    dead = server.route("/dead.wav", reset_connection())
    good = server.route("/good.wav", serve(wav_bytes()))

    async def stored(cuid: str) -> dict[str, Any]:
        return dict(await db.calls.find_one({"_id": cuid}))

    async with fetcher(tuned, store, http, guard):
        opener = await send_validated(tuned, db, dead)  # its failed try opens the circuit
        await wait_until(lambda: guard.state(key) == OPEN, timeout=30, what="the open circuit")
        refusals = circuit_refusals()
        waiting = await send_validated(tuned, db, good)
        await wait_until(lambda: circuit_refusals() >= refusals + 2, timeout=30,
                         what="both calls refused (the opener's retry is due after 1 s)")

        async def refusals_recorded() -> bool:
            calls = [await stored(cuid) for cuid in (waiting, opener)]
            return all("circuit open" in ((call.get("retrying") or {}).get("last_error") or {})
                       .get("message", "") for call in calls)
        await wait_until(refusals_recorded, timeout=10, what="the refusals on the calls")
        views = {cuid: call_view(await stored(cuid)) for cuid in (waiting, opener)}
    assert not server.hits_for("/good.wav")  # never tried
    cause = (await stored(opener))["history"][-1]  # the opener's own failed try
    assert cause["status"] == "retrying"
    for cuid, attempt in ((waiting, 1), (opener, 2)):
        view = views[cuid]
        assert view["status"] == "validated"
        retrying = view["retrying"]
        assert (retrying["stage"], retrying["attempt"]) == ("fetcher", attempt), retrying
        assert retrying["last_error"]["class"] == cause["class"]
        assert retrying["last_error"]["message"].endswith(
            "(host not contacted again: circuit open)"), retrying
        assert host in retrying["last_error"]["message"]
        assert set(retrying) == {"stage", "attempt", "next_attempt_at", "last_error"}
        due = datetime.fromisoformat(retrying["next_attempt_at"])
        assert datetime.now(UTC) < due, retrying  # the rest of the cool-down
    # A refusal is not a try: no history entry for it, the opener's failed try stays the last.
    assert [h["status"] for h in views[waiting]["history"]] == ["received"]
    assert views[opener]["history"][-1]["status"] == "retrying"
    assert views[opener]["history"][-1]["attempt"] == 1
