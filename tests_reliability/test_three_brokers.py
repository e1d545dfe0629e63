"""Issue 11 point 5: the pipeline on a 3-broker KRaft Kafka cluster on loopback.

Topics at replication factor 3 with min.insync.replicas=2; every producer acks=all with
idempotence. Each scenario submits N >= 500 calls with recordings (a fifth answer 404 and
must fail, the rest must be normalized) while something is broken:

* the broker leading the most partitions of the busiest topics is killed (kill -9) half-way
  and restarted;
* every consumer service runs 3 instances in its group; one of each is killed (kill -9) and
  a new one added during the load (rebalances);
* every service is restarted one after another under load (a rolling upgrade; two gateways
  so the API stays up).

Each must show accepted = normalized + failed-as-expected, lost 0, duplicated outcomes 0
(one CallSubmitted per call, one terminal state, at most one email and one S3 object per
stage) and no 5xx other than 503s, which the client retries (as it does lost connections).
Figures: .run/reliability/three_brokers_*.json and docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import free_port, make_settings
from tests.system.fault.harness import Answer, Pipeline, Report, open_pipeline
from tools import devstack
from tools.kafka_cluster import KafkaCluster

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(1500)]

CALLS = int(os.environ.get("RELIABILITY_CALLS", "500"))
CONCURRENCY = 16
RATE_PER_SECOND = float(os.environ.get("RELIABILITY_RATE", "8"))  # ~60 s of submissions
CONSUMERS = ("validator", "fetcher", "normalizer", "notifier")
BUSY_TOPICS = ("calls.submitted", "calls.validated", "recordings.fetched")


def _ports(variable: str) -> list[int]:
    """Ports from ``variable`` (comma-separated) or three free ones."""
    given = os.environ.get(variable)
    return [int(p) for p in given.split(",")] if given else [free_port() for _ in range(3)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    """Three combined broker/controller KRaft nodes (RELIABILITY_KAFKA_PORTS and
    RELIABILITY_CONTROLLER_PORTS pick their ports)."""
    run_dir = Path(tempfile.mkdtemp(prefix="callingest-3brokers-"))
    kafka = KafkaCluster(run_dir, _ports("RELIABILITY_KAFKA_PORTS"),
                         _ports("RELIABILITY_CONTROLLER_PORTS"))
    try:
        kafka.up(timeout=180)
        yield kafka
    finally:
        kafka.down()
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Load:
    """N calls submitted through the gateways with a client that retries 503s and lost
    connections with the same content (round robin over the gateways)."""

    pipeline: Pipeline
    gateways: Callable[[], list[str]]
    total: int = CALLS
    statuses: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, str] = field(default_factory=dict)  # external id -> cuid
    recordings: dict[str, str] = field(default_factory=dict)  # external id -> recording name
    submitted: int = 0
    server_errors: list[str] = field(default_factory=list)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def one(self, i: int, tag: str) -> None:
        external_id = f"{tag}-{i}"
        recording = f"missing-{i}.wav" if i % 5 == 0 else f"ok-{i}.wav"
        self.recordings[external_id] = recording
        deadline = time.monotonic() + 180
        attempt = 0
        while True:
            gateways = self.gateways()
            gateway = gateways[(i + attempt) % len(gateways)]
            answer: Answer = await self.pipeline.submit(external_id, recording, gateway=gateway)
            self.statuses[str(answer.status)] += 1
            if answer.accepted:
                self.accepted[external_id] = str(answer.cuid)
                return
            if answer.status is not None and answer.status >= 500 and answer.status != 503:
                self.server_errors.append(f"{external_id}: {answer.status} {answer.body}")
            if answer.status is not None and answer.status not in (503,) and answer.status < 500:
                raise AssertionError(f"{external_id}: {answer.status} {answer.body}")
            assert time.monotonic() < deadline, f"{external_id} never accepted: {answer}"
            attempt += 1
            await asyncio.sleep(1.0 if answer.status == 503 else 0.3)

    async def run(self, tag: str) -> None:
        # A fresh external id per run: the cuid derives from it, and the mail sink keeps the
        # emails of earlier runs.
        tag = f"{tag}-{uuid.uuid4().hex[:8]}"
        slots = asyncio.Semaphore(CONCURRENCY)

        started = time.monotonic()

        async def limited(i: int) -> None:
            await asyncio.sleep(max(0.0, started + i / RATE_PER_SECOND - time.monotonic()))
            async with slots:
                await self.one(i, tag)
            async with self.progress:
                self.submitted += 1
                self.progress.notify_all()

        await asyncio.gather(*(limited(i) for i in range(self.total)))

    async def reached(self, fraction: float) -> None:
        """Until ``fraction`` of the calls are accepted."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.submitted >= self.total * fraction)


async def progress(pipeline: Pipeline, load: Load) -> dict[str, int]:
    """How far the load is: calls accepted, and calls stored as normalized or failed."""
    terminal = await pipeline.db.calls.count_documents({"status": {"$in": ["normalized", "failed"]}})
    return {"accepted": load.submitted, "terminal": terminal}


async def account(pipeline: Pipeline, load: Load, name: str, cluster: KafkaCluster,
                  extra: dict[str, Any], started: float) -> None:
    report = Report(name, submitted=load.total)
    report.extra.update(extra)
    report.extra.update(brokers=cluster.size, replication_factor=3, min_insync_replicas=2,
                        statuses_seen=dict(load.statuses),
                        other_5xx=len(load.server_errors))
    calls = await pipeline.account(report, set(load.accepted.values()), timeout=900,
                                   expect_status=None)
    unexpected = []
    for external_id, cuid in load.accepted.items():
        expected = "failed" if load.recordings[external_id].startswith("missing-") else "normalized"
        if calls[cuid]["status"] != expected:
            unexpected.append((external_id, calls[cuid]["status"], calls[cuid].get("failure")))
    normalized = sum(1 for c in calls.values() if c["status"] == "normalized")
    failed = sum(1 for c in calls.values() if c["status"] == "failed")
    report.extra.update(normalized=normalized, failed_as_expected=failed - len(unexpected),
                        seconds=round(time.monotonic() - started, 1))
    report.emit()
    assert load.server_errors == [], load.server_errors[:5]
    assert unexpected == [], unexpected[:5]
    assert len(load.accepted) == load.total
    assert normalized + failed == len(load.accepted)


def settings_for(cluster: KafkaCluster, ports: devstack.Ports) -> Any:
    return make_settings(ports, kafka_bootstrap_servers=cluster.bootstrap,
                         topic_replication_factor=3, topic_partitions=6, max_in_flight=8,
                         fetch_max_attempts=1, retry_delays_seconds=[1.0, 2.0],
                         max_processing_attempts=4)


async def leaders(settings: Any, topics: list[str]) -> Counter[int]:
    """Partitions led per broker node id, over ``topics``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    counts: Counter[int] = Counter()
    for topic in described:
        for partition in topic["partitions"]:
            counts[partition["leader"]] += 1
    return counts


async def topic_settings(settings: Any, topic: str) -> dict[str, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    entries = {e[0]: e[1] for e in configs[0].resources[0][4]}
    return {"replicas": len(described["partitions"][0]["replicas"]),
            "min.insync.replicas": entries.get("min.insync.replicas")}


async def during(load: Load, tag: str, disrupt: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run the load and, concurrently, ``disrupt``; the disruption's figures."""
    results: dict[str, Any] = {}

    async def disruption() -> None:
        results.update(await disrupt())

    await asyncio.gather(load.run(tag), disruption())
    return results


async def test_kill9_the_busiest_leader_broker(cluster: KafkaCluster, servers: devstack.Ports,
                                               mail_dir: Path, wav: bytes) -> None:
    settings = settings_for(cluster, servers)
    async with open_pipeline(settings, mail_dir, wav, "3brokers-leader-kill") as pipeline:
        started = time.monotonic()
        assert await topic_settings(settings, pipeline.topics.submitted) == {
            "replicas": 3, "min.insync.replicas": "2"}
        load = Load(pipeline, lambda: [pipeline.gateway])

        async def kill_leader() -> dict[str, Any]:
            await load.reached(0.5)
            busy = [f"{settings.topic_prefix}{t}" for t in BUSY_TOPICS]
            led = await leaders(settings, busy)
            node, partitions = led.most_common(1)[0]
            await asyncio.to_thread(cluster.kill9, node)
            killed_at = time.monotonic()
            at_kill = {"at_kill": await progress(pipeline, load)}
            await asyncio.sleep(15.0)
            await asyncio.to_thread(cluster.start, node)
            at_kill["at_restart"] = await progress(pipeline, load)
            return {"killed_broker": node, "partitions_it_led": partitions,
                    "leaders_before": dict(led), **at_kill,
                    "seconds_until_back_and_ready": round(time.monotonic() - killed_at, 1)}

        figures = await during(load, "leader", kill_leader)
        await account(pipeline, load, "three_brokers_leader_kill9", cluster, figures, started)


async def test_three_instances_per_consumer_kill9_one_add_one(
    cluster: KafkaCluster, servers: devstack.Ports, mail_dir: Path, wav: bytes
) -> None:
    settings = settings_for(cluster, servers)
    async with open_pipeline(settings, mail_dir, wav, "3brokers-rebalance") as pipeline:
        started = time.monotonic()
        services = pipeline.services
        for name in CONSUMERS:
            for k in (2, 3):
                await asyncio.to_thread(services.start, name, None, 90.0, None, True,
                                        f"{name}-{k}")
        load = Load(pipeline, lambda: [pipeline.gateway])

        async def kill_and_add() -> dict[str, Any]:
            await load.reached(0.3)
            at_kill = await progress(pipeline, load)
            for name in CONSUMERS:
                services.stop(f"{name}-2", sig=signal.SIGKILL)
            await load.reached(0.6)
            at_add = await progress(pipeline, load)
            for name in CONSUMERS:
                await asyncio.to_thread(services.start, name, None, 90.0, None, True,
                                        f"{name}-4")
            return {"instances_per_consumer": 3, "killed": [f"{n}-2" for n in CONSUMERS],
                    "at_kill": at_kill, "at_add": at_add,
                    "added": [f"{n}-4" for n in CONSUMERS]}

        figures = await during(load, "rebalance", kill_and_add)
        await account(pipeline, load, "three_brokers_consumer_rebalance", cluster, figures,
                      started)


async def test_rolling_restart_of_every_service(cluster: KafkaCluster, servers: devstack.Ports,
                                                mail_dir: Path, wav: bytes) -> None:
    settings = settings_for(cluster, servers)
    async with open_pipeline(settings, mail_dir, wav, "3brokers-rolling") as pipeline:
        started = time.monotonic()
        services = pipeline.services
        await asyncio.to_thread(services.start, "gateway", None, 90.0, None, True, "gateway-2")
        gateway_instances = ["gateway", "gateway-2"]

        def gateways() -> list[str]:
            return [services.running[g].url for g in gateway_instances if g in services.running]

        load = Load(pipeline, gateways)

        async def rolling() -> dict[str, Any]:
            await load.reached(0.2)
            at_start = await progress(pipeline, load)
            restarted = []
            for instance in [*gateway_instances, *CONSUMERS]:
                name = "gateway" if instance.startswith("gateway") else instance
                code = await asyncio.to_thread(services.stop, instance)
                await asyncio.to_thread(services.start, name, None, 90.0, None, True, instance)
                restarted.append(f"{instance}:{code}")
            return {"restarted_in_order": restarted, "at_start": at_start,
                    "at_end": await progress(pipeline, load)}

        figures = await during(load, "rolling", rolling)
        assert all(r.endswith(":0") for r in figures["restarted_in_order"]), figures
        await account(pipeline, load, "three_brokers_rolling_restart", cluster, figures, started)
