"""A whole pipeline (gateway and four consumers as processes) for fault, soak and security tests.

:func:`open_pipeline` starts the services against given servers with their own
topic prefix and database, serves recordings from a loopback server whose
misbehaviour is chosen by the file name, and hands back a :class:`Pipeline`
that submits calls over HTTP, waits for terminal states and counts, straight
from Kafka, MongoDB, S3 and the mail sink, what happened to every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from callingest import avro, mongo, s3
from callingest.infra import prepare_infrastructure
from callingest.settings import Settings
from callingest.topics import Topics
from tests.audiogen import write_wav
from tests.conftest import ROOT, TEST_LOGS, Services, delete_topics, wait_until
from tests.helpers import apply_config, demo_call, serve_recordings

TOKEN = "demo-network-token"  # the demo configuration's network-wide token
CALLS_URL = "/api/2022-03-01/calls.json"
TERMINAL = ("normalized", "failed")
SERVICES = ("gateway", "validator", "fetcher", "normalizer", "notifier")
FIGURES_DIR = ROOT / ".run" / "reliability"
MAX_HANG_SECONDS = 120.0


@dataclass
class Recordings:
    """Loopback recording server; the name's prefix picks the behaviour.

    ``ok-*`` serves a 1 s stereo WAV; ``missing-*`` answers 404; ``hang-*`` accepts and
    never answers (for at most :data:`MAX_HANG_SECONDS`); ``reset-*`` aborts the connection before answering;
    ``trickle-*`` sends headers then one byte per second. ``open_requests`` counts requests
    being answered: a hanging or trickling one ends as soon as the client drops it.
    """

    wav: bytes
    base: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    open_requests: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        self.open_requests += 1
        try:
            if name.startswith("hang-"):
                deadline = time.monotonic() + MAX_HANG_SECONDS
                transport = request.transport
                while transport is not None and not transport.is_closing():
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                return web.Response(status=504)
            if name.startswith("missing-"):
                return web.Response(status=404)
            if name.startswith("reset-"):
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
            if name.startswith("trickle-"):
                response = web.StreamResponse(headers={"Content-Length": str(len(self.wav))})
                await response.prepare(request)
                deadline = time.monotonic() + MAX_HANG_SECONDS
                for byte in self.wav:
                    if time.monotonic() > deadline:
                        break
                    await response.write(bytes([byte]))
                    await asyncio.sleep(1.0)
                return response
            return web.Response(body=self.wav, content_type="audio/wav")
        finally:
            self.open_requests -= 1


@dataclass
class Report:
    """What happened to the calls of one fault run (asserted by the test, kept as figures)."""

    name: str
    submitted: int = 0
    accepted: int = 0
    terminal: int = 0
    lost: int = 0
    duplicated: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def emit(self) -> None:
        """Print the figures and keep them in .run/reliability/<name>.json."""
        data = {**asdict(self), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(f"\nRELIABILITY {json.dumps(data, sort_keys=True)}")
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        (FIGURES_DIR / f"{self.name}.json").write_text(json.dumps(data, indent=2, sort_keys=True))


@dataclass
class Answer:
    """One HTTP submission as the client saw it (status None: no answer, connection lost)."""

    external_id: str
    status: int | None
    body: dict[str, Any] | None
    retry_after: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status in (201, 202)

    @property
    def cuid(self) -> str | None:
        return str(self.body["cuid"]) if self.accepted and self.body else None


@dataclass
class Pipeline:
    settings: Settings
    db: Any
    topics: Topics
    services: Services
    recordings: Recordings
    http: aiohttp.ClientSession
    mail_dir: Path

    @property
    def gateway(self) -> str:
        return self.services.running["gateway"].url

    def body(self, external_id: str, recording: str, token: str = TOKEN) -> dict[str, Any]:
        """A submission; ``recording`` is a name on the recording server or a whole URL."""
        url = recording if "://" in recording else f"{self.recordings.base}/{recording}"
        return {"oauth_token": token, "call": demo_call(external_id, url)}

    async def submit(self, external_id: str, recording: str = "ok-1.wav",
                     timeout: float = 30.0, gateway: str | None = None,
                     token: str = TOKEN) -> Answer:
        """POST one call; a lost connection or a timeout is an answer with status None."""
        try:
            async with self.http.post(f"{gateway or self.gateway}{CALLS_URL}",
                                      json=self.body(external_id, recording, token),
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.json(content_type=None)
                return Answer(external_id, resp.status, body, resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return Answer(external_id, None, None)

    async def calls(self, cuids: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(cuids)
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(wanted), 500):
            async for doc in self.db.calls.find({"_id": {"$in": wanted[i:i + 500]}}):
                found[doc["_id"]] = doc
        return found

    async def wait_terminal(self, cuids: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Wait until every call is normalized or failed (or ``timeout``); the calls as stored."""
        wanted = set(cuids)
        deadline = time.monotonic() + timeout
        while True:
            calls = await self.calls(wanted)
            if all(calls.get(c, {}).get("status") in TERMINAL for c in wanted):
                return calls
            if time.monotonic() > deadline:
                return calls
            await asyncio.sleep(0.5)

    async def events(self, topic: str) -> Counter[str]:
        """How many events of ``topic`` name each cuid (the topic read to its end)."""
        return await count_events(self.settings, topic)

    def mails(self) -> Counter[str]:
        """Notification emails per cuid in the sink."""
        counts: Counter[str] = Counter()
        for path in self.mail_dir.glob("*.eml"):
            msg = email.message_from_bytes(path.read_bytes())
            if cuid := msg.get("X-Callingest-Cuid"):
                counts[cuid] += 1
        return counts

    async def objects(self, cuids: set[str]) -> Counter[tuple[str, str]]:
        """S3 objects per (cuid, stage): raw/<cuid>/<attempt> is fetcher, normalized/<cuid>.wav."""
        counts: Counter[tuple[str, str]] = Counter()
        async with s3.s3_client(self.settings) as client:
            paginator = client.get_paginator("list_objects_v2")
            for prefix, stage in (("raw/", "fetcher"), ("normalized/", "normalizer")):
                async for page in paginator.paginate(Bucket=self.settings.s3_bucket, Prefix=prefix):
                    for obj in page.get("Contents", []):
                        cuid = obj["Key"][len(prefix):].split("/")[0].removesuffix(".wav")
                        if cuid in cuids:
                            counts[(cuid, stage)] += 1
        return counts

    async def account(self, report: Report, accepted: set[str], timeout: float,
                      expect_status: str | None = "normalized") -> dict[str, dict[str, Any]]:
        """Wait for ``accepted`` calls, then fill ``report`` and assert the guarantees.

        Every accepted call reaches exactly one terminal state (one terminal history
        entry), exactly one CallSubmitted event, at most one notification email and at
        most one S3 object per stage; with ``expect_status`` every call ends in it.
        """
        calls = await self.wait_terminal(accepted, timeout)
        terminal = {c for c in accepted if calls.get(c, {}).get("status") in TERMINAL}
        submitted_events = await self.events(self.topics.submitted)
        mails = self.mails()
        objects = await self.objects(accepted)
        terminal_entries = {
            c: sum(1 for h in calls[c].get("history", []) if h.get("status") in TERMINAL)
            for c in terminal
        }
        problems: dict[str, list[str]] = {
            "never_terminal": sorted(accepted - terminal),
            "not_published": sorted(c for c in accepted if submitted_events[c] == 0),
            "published_twice": sorted(c for c in accepted if submitted_events[c] > 1),
            "two_terminal_states": sorted(c for c, n in terminal_entries.items() if n != 1),
            "duplicate_email": sorted(c for c in accepted if mails[c] > 1),
            "failed_without_email": sorted(
                c for c in terminal if calls[c]["status"] == "failed" and mails[c] == 0),
            "second_object": sorted(f"{c}/{s}" for (c, s), n in objects.items() if n > 1),
        }
        if expect_status is not None:
            problems["unexpected_status"] = sorted(
                f"{c}:{calls[c]['status']}:{(calls[c].get('failure') or {}).get('class')}"
                for c in terminal if calls[c]["status"] != expect_status)
        report.accepted = len(accepted)
        report.terminal = len(terminal)
        report.lost = len(problems["never_terminal"]) + len(
            set(problems["not_published"]) - set(problems["never_terminal"]))
        duplicated = set(problems["published_twice"]) | set(problems["two_terminal_states"])
        duplicated |= set(problems["duplicate_email"])
        duplicated |= {s.split("/")[0] for s in problems["second_object"]}
        report.duplicated = len(duplicated)
        report.extra["statuses"] = dict(Counter(calls[c]["status"] for c in terminal))
        report.extra["problems"] = {k: len(v) for k, v in problems.items() if v}
        report.emit()
        assert {k: v[:5] for k, v in problems.items() if v} == {}, report
        return calls


async def count_events(settings: Settings, topic: str) -> Counter[str]:
    """Events per cuid on ``topic``, read from the beginning to the current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + 60
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    counts[avro.decode(record.value)[1]["cuid"]] += 1
    finally:
        await consumer.stop()
    return counts


def one_second_wav(tmp: Path) -> bytes:
    path = tmp / "call.wav"
    write_wav(path, seconds=1.0, rate=8000)
    return path.read_bytes()


@contextlib.asynccontextmanager
async def open_pipeline(settings: Settings, mail_dir: Path, wav: bytes, name: str,
                        services: Iterable[str] = SERVICES,
                        env: dict[str, dict[str, str]] | None = None) -> AsyncIterator[Pipeline]:
    """Topics, database, demo configuration, recording server and the service processes.

    Everything is torn down afterwards (services stopped, topics and database dropped).
    """
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await prepare_infrastructure(settings)  # what `callingest admin init` does
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    apply_config(settings)
    recordings = Recordings(wav)
    runner, recordings.base = await serve_recordings(recordings.handle, shutdown_timeout=1.0)
    log_dir = TEST_LOGS / f"{name}-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    svc = Services(settings, log_dir)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    try:
        for service in services:
            svc.start(service, env=(env or {}).get(service))
        yield Pipeline(settings, db, topics, svc, recordings, http, mail_dir)
    finally:
        await http.close()
        svc.stop_all()
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await client.drop_database(settings.mongodb_database)
        await client.close()
        with contextlib.suppress(Exception):
            await delete_topics(settings, topics.all())


async def service_up(pipeline: Pipeline, name: str, timeout: float = 60.0) -> None:
    """Restart ``name`` (after a kill) on a new port and wait until it is ready."""
    await asyncio.to_thread(pipeline.services.start, name, None, timeout)


__all__ = ["Answer", "Pipeline", "Recordings", "Report", "count_events", "one_second_wav",
           "open_pipeline", "service_up", "wait_until"]
