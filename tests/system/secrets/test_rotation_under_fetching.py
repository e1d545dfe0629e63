"""Key rotation while the pipeline fetches with auth configs of all three methods: nothing fails.

Real validator and fetcher processes, real Kafka, MongoDB-protocol store and S3; recordings
served on loopback by a server that answers only with each network's own token. The keys
roll over the way docs/deployment.md says: the new key is configured first (newest first,
old key still listed), ``callingest admin rotate-secrets`` runs while calls stream in (and is
held mid-way with SIGSTOP, so calls of every method provably fetch from networks sealed with
either key at once), then the old key is removed from the fetcher, and calls still fetch.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from callingest import config_apply, config_file, events, mongo
from callingest.kafka import Producer
from callingest.secretbox import Keyring, generate_key_entry
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.conftest import (
    ROOT,
    Services,
    delete_topics,
    make_settings,
    settings_env,
    used_secret,
    wait_until,
)
from tests.helpers import call_doc, serve_recordings
from tests.services.fetcher.conftest import wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]

NETWORKS = 90
WAV = wav_bytes(4000)
METHODS = {"7": "bearer_header", "8": "query_param", "9": "custom_header"}


def entry(ring: Keyring) -> str:
    return f"{ring.primary}:{base64.b64encode(ring.keys[ring.primary]).decode()}"


class Recordings:
    """Serves WAV only to a request carrying the network's token the way its config says."""

    def __init__(self, tokens: dict[tuple[str, str], str]) -> None:
        self.tokens = tokens
        self.refused: list[str] = []
        self.served = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        network, config_id, _ = request.match_info["name"].split("~", 2)
        token = self.tokens[(network, config_id)]
        presented = {
            "7": request.headers.get("Authorization"),
            "8": request.query.get("access_token"),
            "9": request.headers.get("X-Api-Key"),
        }[config_id]
        expected = f"Bearer {token}" if config_id == "7" else token
        if presented != expected:
            self.refused.append(request.match_info["name"])
            return web.Response(status=401)
        self.served += 1
        return web.Response(body=WAV, content_type="audio/wav")


def configuration(tokens: dict[tuple[str, str], str]) -> config_file.ConfigFile:
    return config_file.ConfigFile.model_validate({"networks": [{
        "id": f"r{n:03d}", "name": f"Rotation {n}",
        "recording_auth_configs": [
            {"id": 7, "method": "bearer_header", "token": tokens[(f"r{n:03d}", "7")]},
            {"id": 8, "method": "query_param", "name": "access_token",
             "token": tokens[(f"r{n:03d}", "8")]},
            {"id": 9, "method": "custom_header", "name": "X-Api-Key",
             "token": tokens[(f"r{n:03d}", "9")]},
        ],
        "advertisers": [{"id": "adv", "campaigns": [{"id_from_network": "85", "signal_ai_enabled": True}]}],
    } for n in range(NETWORKS)]})


@pytest.fixture
async def pipeline(servers: Any) -> AsyncIterator[dict[str, Any]]:
    settings = make_settings(servers)
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    await mongo.ensure_indexes(db)
    try:
        yield {"settings": settings, "db": db, "topics": topics}
    finally:
        await client.drop_database(settings.mongodb_database)
        await client.close()
        await delete_topics(settings, topics.all())


@pytest.fixture
def services_dir(request: pytest.FixtureRequest) -> Any:
    from tests.conftest import TEST_LOGS

    path = TEST_LOGS / f"rotation-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def test_rotating_keys_while_fetching_with_every_auth_method_fails_nothing(
        pipeline: dict[str, Any], services_dir: Any) -> None:
    settings: Settings = pipeline["settings"]
    db = pipeline["db"]
    old, new = Keyring.parse(generate_key_entry("old")), Keyring.parse(generate_key_entry("new"))
    tokens = {(f"r{n:03d}", c): used_secret(f"rot-{c}-{uuid.uuid4().hex}")
              for n in range(NETWORKS) for c in METHODS}
    await config_apply.apply(db, configuration(tokens), old)
    recordings = Recordings(tokens)
    runner, base = await serve_recordings(recordings.handle)

    both = f"{entry(new)},{entry(old)}"  # step 1 of a rotation: new key first, old still listed
    svc = Services(settings.model_copy(update={"secret_keys": SecretStr(both)}), services_dir)
    producer = Producer(settings.kafka_bootstrap_servers, "tests")
    submitted: list[str] = []

    async def submit(i: int, network: str | None = None) -> str:
        network, config_id = network or f"r{i % NETWORKS:03d}", str(7 + i % 3)
        doc = call_doc(network_id=network, recording_auth_config_id=config_id,
                       recording_url=f"{base}/{network}~{config_id}~{uuid.uuid4().hex}.wav")
        await db.calls.insert_one(doc)
        await producer.send(f"{settings.topic_prefix}calls.submitted", "CallSubmitted",
                            events.call_submitted(doc), key=doc["_id"])
        submitted.append(doc["_id"])
        return str(doc["_id"])

    try:
        svc.start("validator")
        svc.start("fetcher")
        await producer.start()
        for i in range(6):  # the pipeline is warm and fetching before the rotation starts
            await submit(i)
        rotation = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv/bin/callingest"), "admin", "rotate-secrets",
            env={**os.environ, **settings_env(settings), "SECRET_KEYS": both},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        output = asyncio.create_task(rotation.communicate())
        try:
            # Calls stream in while the rotation runs in short bursts (SIGCONT, 20 ms, SIGSTOP:
            # one burst re-seals a few of the 90 networks at most, so checking between bursts
            # catches it part-way however fast the store is); once it has re-sealed some
            # networks it stays held and calls of every method go to networks sealed with
            # either key.
            i = 6
            os.kill(rotation.pid, signal.SIGSTOP)
            while not (kids := await _kids_by_network(db)) or "new" not in kids.values():
                assert rotation.returncode is None, "the rotation finished before it was caught"
                await submit(i)
                i += 1
                os.kill(rotation.pid, signal.SIGCONT)
                await asyncio.sleep(0.02)
                os.kill(rotation.pid, signal.SIGSTOP)
            kids = await _kids_by_network(db)
            assert "old" in kids.values(), f"the rotation was not caught part-way: {kids}"
            held = {kid: next(n for n, k in sorted(kids.items()) if k == kid)
                    for kid in ("new", "old")}
            meanwhile = [await submit(m, network=held[kid]) for kid in held for m in range(3)]
            await wait_until(lambda: _all_fetched(db, meanwhile), timeout=120,
                             what="calls to old- and new-sealed networks fetched mid-rotation")
            os.kill(rotation.pid, signal.SIGCONT)
            while not output.done():
                await submit(i)
                i += 1
                await asyncio.sleep(0.05)
            stdout, stderr = await asyncio.wait_for(output, 60)
        finally:
            if rotation.returncode is None:
                os.kill(rotation.pid, signal.SIGCONT)
                rotation.kill()
                await rotation.wait()
        assert rotation.returncode == 0, stderr.decode()
        assert (f"{NETWORKS} document(s) checked, {NETWORKS * 3} secret(s) re-encrypted"
                in stdout.decode())
        for _ in range(6):
            await submit(i)
            i += 1

        # Step 3: the old key is retired; the fetcher restarts with the new one only.
        await wait_until(lambda: _all_fetched(db, submitted), timeout=120,
                         what="every call submitted around the rotation fetched")
        svc.stop("fetcher")
        svc.settings = settings.model_copy(update={"secret_keys": SecretStr(entry(new))})
        svc.start("fetcher")
        for _ in range(6):
            await submit(i)
            i += 1
        await wait_until(lambda: _all_fetched(db, submitted), timeout=120,
                         what="every call fetched after the old key was retired")
    finally:
        await producer.stop()
        svc.stop_all()
        await runner.cleanup()

    calls = await db.calls.find({"_id": {"$in": submitted}}).to_list(None)
    assert {c["status"] for c in calls} == {"fetched"}
    assert not [c for c in calls if c.get("failure")]
    assert recordings.refused == []  # every download presented the right token at once
    fetcher_logs = "".join(p.read_text() for p in services_dir.glob("fetcher.log"))
    for failure_class in ("SecretKeyUnavailable", "RecordingAuthConfigInvalid", "Transient"):
        assert failure_class not in fetcher_logs  # nor was a step retried
    assert {c["recording_auth_config_id"] for c in calls} == set(METHODS)
    assert set((await _kids_by_network(db)).values()) == {"new"}


async def _kids_by_network(db: Any) -> dict[str, str]:
    """Network -> the key id its auth-config tokens are sealed with ("mixed" mid-document)."""
    out = {}
    for doc in await db.networks.find().to_list(None):
        kids = {c["token"]["kid"] for c in doc["recording_auth_configs"]}
        out[doc["_id"]] = kids.pop() if len(kids) == 1 else "mixed"
    return out


async def _all_fetched(db: Any, cuids: list[str]) -> bool:
    failed = await db.calls.find_one({"_id": {"$in": cuids}, "status": "failed"})
    assert failed is None, failed.get("failure")
    return bool(await db.calls.count_documents({"_id": {"$in": cuids}, "status": "fetched"})
                == len(cuids))
