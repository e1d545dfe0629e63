"""Publishing CallSubmitted for stored calls, exactly once per call.

A call is stored with ``published: false`` and a publish claim
(``publish_claim: {owner, until}``) held by the request that inserted it.
Whoever holds an unexpired claim is the only one allowed to produce the
event; on Kafka's acknowledgement it sets ``published: true``. A claim is
taken atomically with ``find_one_and_update`` on an unpublished call whose
claim is missing or expired, so concurrent resubmissions, several gateway
workers and the background republisher never publish a call twice while a
claim holder is alive. (A holder that dies mid-send can leave an event that
is republished after the claim expires: same event id, consumers dedupe.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import events, metrics
from callingest.kafka import Producer, PublishError
from callingest.logging import get_logger
from callingest.topics import Topics
from services.gateway.writer import CallWriter

log = get_logger(__name__)

Document = dict[str, Any]

PUBLISH_TIMEOUT_SECONDS = 5.0
CLAIM_SECONDS = 15.0
PRODUCER_RESTART_INTERVAL_SECONDS = 1.0
FULL_SCAN_SECONDS = 60.0


class KafkaUnavailable(Exception):
    """The event could not be acknowledged now; the call stays unpublished."""


class LazyProducer:
    """A :class:`Producer` started on first use and restarted after a failed start.

    The gateway must come up (and answer 503) while Kafka is down, so the
    connection is not a precondition of serving.
    """

    def __init__(self, bootstrap_servers: str, service: str = "gateway") -> None:
        self._bootstrap_servers = bootstrap_servers
        self._service = service
        self._producer: Producer | None = None
        self._lock = asyncio.Lock()
        self._last_attempt = 0.0

    @property
    def ready(self) -> bool:
        return self._producer is not None and self._producer.started

    async def get(self) -> Producer:
        """The started producer; raises :class:`KafkaUnavailable` if Kafka cannot be reached."""
        if self._producer is not None and self._producer.started:
            return self._producer
        async with self._lock:
            if self._producer is not None and self._producer.started:
                return self._producer
            if time.monotonic() - self._last_attempt < PRODUCER_RESTART_INTERVAL_SECONDS:
                raise KafkaUnavailable("Kafka is unavailable")
            self._last_attempt = time.monotonic()
            producer = Producer(self._bootstrap_servers, self._service)
            try:
                await asyncio.wait_for(producer.start(), PUBLISH_TIMEOUT_SECONDS)
            except Exception as exc:  # aiokafka raises several types on bootstrap failure
                with contextlib.suppress(Exception):
                    await producer.stop()
                log.warning("Kafka producer cannot start", extra={"error": type(exc).__name__})
                raise KafkaUnavailable("Kafka is unavailable") from None
            self._producer = producer
            return producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class CallPublisher:
    """Claims unpublished calls and produces their CallSubmitted event."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        writer: CallWriter,
        producer: LazyProducer,
        topics: Topics,
    ) -> None:
        self._calls = db.calls
        self._writer = writer
        self._producer = producer
        self._topics = topics
        self.owner = uuid.uuid4().hex
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._failed: set[str] = set()

    def new_claim(self) -> dict[str, Any]:
        """The claim a freshly inserted call carries: held by this publisher."""
        return {"owner": self.owner, "until": datetime.now(UTC) + timedelta(seconds=CLAIM_SECONDS)}

    async def publish_claimed(self, call: Document) -> None:
        """Produce the event of ``call`` (claimed by us), then mark it published.

        Raises :class:`KafkaUnavailable` (claim released, call unpublished) if
        Kafka does not acknowledge in time. Requests of this process waiting
        for the same call share the outcome.
        """
        cuid = call["_id"]
        pending = self._in_flight.get(cuid)
        if pending is not None:  # this process is already publishing it (an expired claim)
            await asyncio.shield(pending)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[cuid] = done
        try:
            await self._send(call)
        except BaseException as exc:
            done.set_exception(KafkaUnavailable(f"publication failed: {type(exc).__name__}"))
            done.exception()  # waiters are optional: never warn about an unretrieved exception
            raise
        else:
            done.set_result(None)
        finally:
            if self._in_flight.get(cuid) is done:
                del self._in_flight[cuid]

    async def _send(self, call: Document) -> None:
        cuid = call["_id"]
        try:
            producer = await self._producer.get()
            await producer.send(
                self._topics.submitted,
                "CallSubmitted",
                events.call_submitted(call, int(call.get("attempt", 1))),
                key=cuid,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except (PublishError, KafkaUnavailable) as exc:
            await self._calls.update_one(
                {"_id": cuid, "publish_claim.owner": self.owner}, {"$unset": {"publish_claim": ""}}
            )
            self._failed.add(cuid)
            raise KafkaUnavailable(str(exc)) from None
        await self._writer.mark_published(cuid)
        self._failed.discard(cuid)

    async def ensure_published(self, cuid: str, deadline_seconds: float = CLAIM_SECONDS) -> None:
        """Return once the call's event is acknowledged, publishing it ourselves if nobody is.

        Raises :class:`KafkaUnavailable` if that does not happen within
        ``deadline_seconds`` or our own attempt fails.
        """
        deadline = time.monotonic() + deadline_seconds
        while True:
            pending = self._in_flight.get(cuid)
            if pending is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(pending), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise KafkaUnavailable("the call is being published by another request") from None
                return
            claimed = await self.claim(cuid)
            if claimed is not None:
                await self.publish_claimed(claimed)
                return
            current = await self._calls.find_one({"_id": cuid}, {"published": 1})
            if current is None or current.get("published"):
                return
            if time.monotonic() > deadline:
                raise KafkaUnavailable("the call is being published by another request")
            await asyncio.sleep(0.02)

    async def claim(self, cuid: str | None = None, older_than: datetime | None = None) -> Document | None:
        """Atomically take the publish claim of an unpublished call (``cuid``, or any older one)."""
        now = datetime.now(UTC)
        query: Document = {
            "published": False,
            "$or": [{"publish_claim": None}, {"publish_claim.until": {"$lt": now}}],
        }
        if cuid is not None:
            query["_id"] = cuid
        if older_than is not None:
            query["created_at"] = {"$lt": older_than}
        return await self._calls.find_one_and_update(
            query,
            {"$set": {"publish_claim": self.new_claim()}},
            return_document=ReturnDocument.AFTER,
        )

    async def republish_pending(self, older_than_seconds: float, limit: int = 100) -> int:
        """Publish calls left unpublished for ``older_than_seconds``; returns how many.

        Sets the unpublished-calls gauge: 0 when none is left, the remaining
        count when ``limit`` was reached.
        """
        published = 0
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        while published < limit:
            call = await self.claim(older_than=cutoff)
            if call is None:
                metrics.UNPUBLISHED_CALLS.set(0)
                return published
            await self.publish_claimed(call)
            published += 1
            log.info("republished unpublished call", extra={"cuid": call["_id"]})
        metrics.UNPUBLISHED_CALLS.set(await self._calls.count_documents({"published": False}))
        return published

    async def retry_failed(self) -> int:
        """Publish the calls whose publication failed in this process (cheap: by ``_id``)."""
        published = 0
        for cuid in list(self._failed):
            call = await self.claim(cuid)
            self._failed.discard(cuid)
            if call is not None:
                await self.publish_claimed(call)
                published += 1
                log.info("republished unpublished call", extra={"cuid": cuid})
        return published

    async def run_republisher(self, interval_seconds: float, older_than_seconds: float) -> None:
        """Forever (never raises): every ``interval_seconds`` retry this process's failed
        publications; at start and every ``FULL_SCAN_SECONDS`` scan for any unpublished call
        (those of a crashed or stopped gateway). Scans are rare because on the dev store
        (FerretDB on SQLite) a non-``_id`` query reads the whole collection.
        """
        next_scan = time.monotonic() + older_than_seconds  # calls of before our start are due
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.retry_failed()
                if time.monotonic() >= next_scan:
                    await self.republish_pending(older_than_seconds)
                    next_scan = time.monotonic() + max(FULL_SCAN_SECONDS, older_than_seconds)
            except KafkaUnavailable:
                pass
            except PyMongoError as exc:
                log.warning("republisher cannot read calls", extra={"error": type(exc).__name__})
