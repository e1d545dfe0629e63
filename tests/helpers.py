"""Helpers shared by tests: stored calls, publishing and reading events, reading the mail sink."""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from callingest import avro, events
from callingest.kafka import Producer
from callingest.settings import Settings
from tests.conftest import ROOT, settings_env


def call_doc(network_id: str = "1001", campaign: str = "85", direction: str = "inbound",
             recording_url: str = "http://127.0.0.1:9/none.wav", **extra: Any) -> dict[str, Any]:
    """A call as the gateway stores it."""
    cuid = extra.pop("cuid", uuid.uuid4().hex)
    now = datetime.now(UTC)
    doc = {
        "_id": cuid,
        "network_id": network_id,
        "external_call_unique_id": extra.pop("external_call_unique_id", f"ext-{cuid[:8]}"),
        "status": "received",
        "start_time": datetime(2016, 4, 11, 20, 0, tzinfo=UTC),
        "calling_phone_number": "+18779257383",
        "destination_phone_number": "+12165388265",
        "advertiser_campaign_id_from_network": campaign,
        "call_direction": direction,
        "recording_url": recording_url,
        "recording_auth_config_id": None,
        "language_code": "en-US",
        "signals": [],
        "custom_data": [],
        "attempt": 1,
        "published": True,
        "created_at": now,
        "history": [{"stage": "gateway", "status": "received", "at": now}],
    }
    doc.update(extra)
    return doc


async def submit(settings: Settings, db: Any, doc: dict[str, Any]) -> str:
    """Store ``doc`` and publish its CallSubmitted event, as the gateway does."""
    await db.calls.insert_one(doc)
    await publish(settings, f"{settings.topic_prefix}calls.submitted", "CallSubmitted",
                  events.call_submitted(doc), doc["_id"])
    return str(doc["_id"])


async def publish(settings: Settings, topic: str, event: str, record: dict[str, Any],
                  key: str) -> None:
    producer = Producer(settings.kafka_bootstrap_servers, "tests")
    await producer.start()
    try:
        await producer.send(topic, event, record, key=key)
    finally:
        await producer.stop()


async def read_topic(settings: Settings, topic: str, timeout: float = 3.0) -> list[Any]:
    """Every message currently on ``topic`` (read from the beginning until idle)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def decoded(records: list[Any]) -> list[dict[str, Any]]:
    return [avro.decode(r.value)[1] for r in records]


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    """The current end offset of every partition of ``topic`` (one past its last record)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def committed_past(settings: Settings, stage: str, ends: dict[TopicPartition, int]) -> bool:
    """True once ``stage``'s consumer group has committed at least ``ends`` on every partition:
    it has processed (or deliberately skipped) every record before them. The positive signal
    to wait for before asserting that something did *not* happen."""
    group = f"{settings.topic_prefix}callingest-{stage}"  # as callingest.pipeline names it
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return all(end == 0 or (tp in committed and committed[tp].offset >= end)
               for tp, end in ends.items())


def mails_about(mail_dir: Path, cuid: str) -> list[Message]:
    """Messages in the SMTP sink that concern ``cuid``."""
    found = []
    for path in sorted(mail_dir.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes())
        if msg.get("X-Callingest-Cuid") == cuid:
            found.append(msg)
    return found


def apply_config(settings: Settings, path: Path | None = None) -> None:
    path = path or ROOT / "deploy" / "examples" / "demo-config.yaml"
    subprocess.run([str(ROOT / ".venv/bin/callingest"), "config", "apply", str(path)],
                   env={**os.environ, **settings_env(settings)}, check=True,
                   capture_output=True, timeout=60)


async def serve_recordings(handler: Any, shutdown_timeout: float = 60.0, *, prefix: str = "/rec",
                           method: str = "GET") -> tuple[web.AppRunner, str]:
    """The one loopback recording server of tests and benchmarks: an HTTP server on
    127.0.0.1 (a free port) answering ``<method> <prefix>/{name}`` (``name`` may contain
    slashes) with ``handler``. Returns its runner (clean it up) and the base URL of the
    recordings, ``http://127.0.0.1:<port><prefix>``."""
    app = web.Application()
    app.router.add_route(method, prefix + "/{name:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}{prefix}"


def demo_call(external_id: str, recording_url: str = "http://127.0.0.1:9/none.wav",
              **fields: Any) -> dict[str, Any]:
    """The ``call`` object of a submission that is valid under the demo configuration
    (deploy/examples/demo-config.yaml) and the tests' configurations: network 1001's
    ExternalOnly campaign 85, the spec's example numbers and start time; ``fields``
    override or add fields."""
    return {
        "external_call_unique_id": external_id,
        "start_time": "2016-02-03 09:30:00 AM",
        "destination_phone_number": 2165388265,
        "calling_phone_number": 8779257383,
        "advertiser_campaign_id_from_network": 85,
        "call_direction": "inbound",
        "recording_url": recording_url,
        **fields,
    }


class BlackHole:
    """A loopback TCP listener that accepts every connection and never answers (a dead
    recording host that timeouts must end). Connections are closed after ``hold`` seconds
    at most, and all of them when the listener stops."""

    def __init__(self, hold: float = 120.0) -> None:
        self.hold = hold
        self.accepted = 0
        self.open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self._writers.add(writer)
        try:
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(self.hold):
                    while await reader.read(4096):  # read the request, answer nothing
                        pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


@contextlib.asynccontextmanager
async def black_hole(hold: float = 120.0) -> AsyncIterator[BlackHole]:
    """A running :class:`BlackHole`, stopped afterwards."""
    listener = BlackHole(hold)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


async def parts_count(client: Any, bucket: str, key: str) -> int:
    """How many parts an S3 object was uploaded in (1: a single PUT), asked of the store
    (``HEAD ?partNumber=1``): the ETag's shape tells it only for MD5 ETags, and the dev
    store derives its ETags from the CRC64 of the object (``--data-integrity-etag``)."""
    head = await client.head_object(Bucket=bucket, Key=key, PartNumber=1)
    return int(head.get("PartsCount") or 1)
