"""The platform's infrastructure: created in one place, verified everywhere else.

``callingest admin init`` (the Kubernetes Job, ``make up``, the test fixtures) runs
:func:`prepare_infrastructure`, which creates every Kafka topic, MongoDB index and the S3
bucket. The services never create any of it: at start-up they :func:`wait_for` it, report
not-ready on /readyz with a log line naming what is missing, and start work once it exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from botocore.exceptions import BotoCoreError, ClientError
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import kafka, mongo
from callingest.logging import get_logger
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics

log = get_logger(__name__)

Check = Callable[[], Awaitable[list[str]]]
"""Returns what is missing (empty: all there); raises when it cannot tell."""

CHECK_INTERVAL_SECONDS = 2.0
LOG_EVERY_SECONDS = 30.0


async def prepare_infrastructure(settings: Settings) -> None:
    """Create every topic, index and the bucket the platform needs; idempotent."""
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(),
                        settings.topic_partitions, settings.topic_replication_factor,
                        **kafka.client_options(settings))
    client = mongo.open_client(settings)
    try:
        await mongo.ensure_indexes(mongo.database(client, settings))
    finally:
        await client.close()
    from callingest import s3

    async with s3.s3_client(settings) as s3c:
        await s3.ensure_bucket(s3c, settings.s3_bucket)


def topics_check(settings: Settings, names: Sequence[str]) -> Check:
    """The topics of ``names`` that do not exist."""

    async def check() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    request_timeout_ms=5000, **kafka.client_options(settings))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        return [f"topic {n}" for n in names if n not in existing]

    return check


def indexes_check(db: AsyncDatabase[dict[str, Any]]) -> Check:
    async def check() -> list[str]:
        return [f"index {name}" for name in await mongo.missing_indexes(db)]

    return check


def bucket_check(client: Any, bucket: str) -> Check:
    """The bucket, if it does not exist (HEAD answers 404)."""

    async def check() -> list[str]:
        try:
            await client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket", "NotFound"):
                return [f"bucket {bucket}"]
            raise
        return []

    return check


class InfrastructureUnavailable(Exception):
    """The servers could not be asked for longer than ``INFRA_RETRY_SECONDS``."""


async def wait_for(checks: Sequence[Check], service: str, limit_seconds: float) -> None:
    """Return once every check finds nothing missing.

    While something is missing, logs what (at once, then every 30 s) and keeps waiting:
    ``callingest admin init`` may still be running. While the servers cannot be asked,
    retries for ``limit_seconds``, then raises :class:`InfrastructureUnavailable`.
    """
    last_log = 0.0
    last_missing: list[str] | None = None
    failing_since: float | None = None
    while True:
        try:
            missing = [m for check in checks for m in await check()]
            failing_since = None
        except (KafkaError, PyMongoError, BotoCoreError, ClientError, OSError,
                TimeoutError) as exc:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > limit_seconds:
                raise InfrastructureUnavailable(
                    f"cannot verify the infrastructure for {limit_seconds:.0f} s: "
                    f"{type(exc).__name__}: {exc}"[:300]) from exc
            log.warning("cannot verify the infrastructure yet; not ready",
                        extra={"service": service, "error": f"{type(exc).__name__}: {exc}"[:300]})
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)
            continue
        if not missing:
            if last_missing:
                log.info("infrastructure present; starting", extra={"service": service})
            return
        if missing != last_missing or time.monotonic() - last_log > LOG_EVERY_SECONDS:
            log.warning("infrastructure missing, not ready: run `callingest admin init` "
                        "(the admin-init Job) to create it",
                        extra={"service": service, "missing": missing})
            last_log = time.monotonic()
            last_missing = missing
        await asyncio.sleep(CHECK_INTERVAL_SECONDS)
