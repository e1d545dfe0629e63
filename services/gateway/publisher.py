"""Publishing CallSubmitted for stored calls, once per call.

Publication is recorded as a *receipt*: a document ``{_id: cuid, at}`` in
``published_calls``, inserted (batched, through the :class:`CallWriter`)
after Kafka acknowledged the event: in the background for a new call (its
201 waits for the store and Kafka, not for the receipt; a receipt that could
not be written is retried by the republisher loop, and one lost with the
process only costs a read of the topic before the call is published again), awaited on
the rarer paths (resubmission, republisher). A call is published when it has a
receipt, or when its ``calls`` document says ``published: true`` (calls
recorded by other services, and calls of before receipts). The gateway
stores calls with ``published: false`` and never updates them: on the dev
store (FerretDB on SQLite) every update of ``calls`` scans the collection,
while inserts stay cheap. :func:`unpublished_cuids` is the one definition of
"not yet published" (for tests and tools too).

Who may publish (so that a call is published once while its publishers live):

* the request that inserted the call holds an implicit claim for
  :data:`CLAIM_SECONDS` from the call's ``created_at``; if its publication
  fails it releases the claim by inserting an expired claim (generation 0);
* anyone else (a resubmission, another worker, the background republisher)
  must first take a claim: insert ``{_id: "<cuid>:<generation>", owner, until}``
  into the small ``publish_claims`` collection, where the unique ``_id`` makes
  exactly one taker win a generation; a generation whose claim expired is
  skipped. After taking a claim the taker checks for a receipt again, so a
  publication that finished meanwhile is not repeated.

A send that Kafka did not acknowledge in time is not over: aiokafka keeps the
message and may still deliver it (a broker that comes back). The request
answers 503 at once, but its claim is kept, renewed, until aiokafka settles
the send; delivered, the receipt is written; failed, the claim is released.

Publishing a call again (anyone but the inserting request) first reads the
topic: the partition of the call's key, from the call's creation on. An
event of the same id found there (a holder that died between Kafka's
acknowledgement and the receipt) is not published again, only its receipt
is written. So a call is published once also across a crash of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from callingest import avro, events, metrics, tracing
from callingest.kafka import Producer, PublishError, TopicScanner, event_id
from callingest.logging import get_logger
from callingest.topics import Topics
from services.gateway.writer import CallWriter, WriterStopped, retry_busy

log = get_logger(__name__)

Document = dict[str, Any]

RECEIPTS = "published_calls"
CLAIMS = "publish_claims"
PUBLISH_TIMEOUT_SECONDS = 5.0
# The producer's own delivery timeout equals PUBLISH_TIMEOUT_SECONDS and the gateway waits a
# little longer, so that aiokafka (not our wait) decides: a publication answered with 503 has
# been expired by aiokafka and is not delivered later behind the gateway's back.
PUBLISH_WAIT_SECONDS = PUBLISH_TIMEOUT_SECONDS + 2.0
CLAIM_SECONDS = 15.0
# How long a claim is held (renewed) for a send aiokafka has not settled; aiokafka settles a
# send within its request timeout once the broker answers, so this only bounds a stuck producer.
MAX_HOLD_SECONDS = 120.0
PRODUCER_RESTART_INTERVAL_SECONDS = 1.0
FULL_SCAN_SECONDS = 60.0
MAX_CLAIM_GENERATIONS = 10_000
RECENT_MAX = 50_000  # cuids whose event this process saw acknowledged
# The topic is read for an earlier copy of an event from this long before its call's
# creation (clock differences between gateway hosts).
SCAN_MARGIN = timedelta(seconds=10)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class KafkaUnavailable(Exception):
    """The event could not be acknowledged now; the call stays unpublished."""


async def unpublished_cuids(
    db: AsyncDatabase[Document], older_than: datetime | None = None,
    created_since: datetime | None = None,
) -> list[Document]:
    """``{_id, created_at, attempt, trace_context}`` of every stored call that is not published yet
    (created at or after ``created_since`` and before ``older_than`` when given).

    Without ``created_since`` it reads ``calls`` and ``published_calls`` whole: call it
    rarely. With it, the calls created since then and the receipts written since then
    (a receipt is written after its call's creation; :data:`SCAN_MARGIN` covers clocks).
    """
    calls_query: Document = {"published": False}
    receipts_query: Document = {}
    if created_since is not None:
        calls_query["created_at"] = {"$gte": created_since}
        receipts_query["at"] = {"$gte": created_since - SCAN_MARGIN}
    receipts = {doc["_id"] async for doc in db[RECEIPTS].find(receipts_query, {"_id": 1})}
    pending = []
    async for doc in db.calls.find(calls_query, {"_id": 1, "created_at": 1, "attempt": 1,
                                                 "trace_context": 1}):
        if doc["_id"] in receipts:
            continue
        if older_than is not None and _aware(doc.get("created_at")) >= older_than:
            continue
        pending.append(doc)
    return pending


def _aware(value: Any) -> datetime:
    if not isinstance(value, datetime):
        return EPOCH
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


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
            if self._producer is not None:  # its sender died (e.g. after a broker restart)
                with contextlib.suppress(Exception):
                    await self._producer.stop()
                self._producer = None
            producer = Producer(self._bootstrap_servers, self._service,
                                request_timeout_ms=int(PUBLISH_TIMEOUT_SECONDS * 1000))
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
    """Produces the CallSubmitted event of stored calls and records their receipts."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        writer: CallWriter,
        producer: LazyProducer,
        topics: Topics,
        scanner: TopicScanner,
    ) -> None:
        self._db = db
        self._calls = db.calls
        self._receipts = db[RECEIPTS]
        self._claims = db[CLAIMS]
        self._writer = writer
        self._producer = producer
        self._topics = topics
        self.owner = uuid.uuid4().hex
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._failed: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._unwritten_receipts: dict[str, Document] = {}
        self._scanner = scanner
        self._scan_from: datetime | None = None  # None: the next scan reads everything
        # Sends that timed out and that aiokafka has not settled yet: cuid -> the task that
        # holds the call's claim until then; its result says whether the event was delivered.
        self._unsettled: dict[str, asyncio.Task[bool]] = {}

    async def publish_new(self, call: Document) -> None:
        """Publish a call this process just inserted (its implicit claim).

        Raises :class:`KafkaUnavailable` (claim released, call unpublished)
        if Kafka does not acknowledge in time.
        """
        await self._publish(call, claim_id=None)

    async def _publish(self, call: Document, claim_id: str | None) -> None:
        """Produce the event of ``call`` (we hold its claim), then insert its receipt.

        Requests of this process waiting for the same call share the outcome.
        """
        cuid = call["_id"]
        pending = self._in_flight.get(cuid)
        if pending is not None:  # this process is already publishing it
            await asyncio.shield(pending)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[cuid] = done
        try:
            await self._send(call, claim_id)
        except BaseException as exc:
            done.set_exception(KafkaUnavailable(f"publication failed: {type(exc).__name__}"))
            done.exception()  # waiters are optional: never warn about an unretrieved exception
            raise
        else:
            done.set_result(None)
        finally:
            if self._in_flight.get(cuid) is done:
                del self._in_flight[cuid]

    async def _send(self, call: Document, claim_id: str | None) -> None:
        cuid = call["_id"]
        try:
            producer = await self._producer.get()
            with tracing.attached(call.get("trace_context")):
                await producer.send(
                    self._topics.submitted,
                    "CallSubmitted",
                    events.call_submitted(call, int(call.get("attempt", 1))),
                    key=cuid,
                    timeout=PUBLISH_WAIT_SECONDS,
                )
        except (PublishError, KafkaUnavailable) as exc:
            self._failed.add(cuid)
            pending = exc.pending if isinstance(exc, PublishError) else None
            if pending is not None:  # aiokafka may still deliver it: keep the claim until it knows
                self._unsettled[cuid] = asyncio.create_task(self._hold_until_settled(cuid, claim_id, pending))
            else:
                with contextlib.suppress(PyMongoError):
                    await self._release(cuid, claim_id)
            raise KafkaUnavailable(str(exc)) from None
        self._remember(cuid)
        if claim_id is None and cuid not in self._failed:
            # A new call: its receipt is written in the background, batched with others (the
            # event is acknowledged; a lost receipt only means a read of the topic before the
            # call would be published again).
            self._write_receipt_later({"_id": cuid, "at": datetime.now(UTC)})
            return
        await self._record_receipt(cuid)

    async def _hold_until_settled(self, cuid: str, claim_id: str | None,
                                  delivery: asyncio.Future[Any]) -> bool:
        """Keep the claim of ``cuid`` (renewed) until aiokafka settles ``delivery``; then
        write the receipt (delivered) or release the claim (not delivered). True if delivered.
        """
        held = claim_id or f"{cuid}:0"
        give_up = time.monotonic() + MAX_HOLD_SECONDS
        try:
            while not delivery.done():
                if time.monotonic() > give_up:  # never keep a call from being published for good
                    log.warning("a timed-out publication is still not settled; claim released",
                                extra={"cuid": cuid})
                    with contextlib.suppress(PyMongoError):
                        await self._release(cuid, held)
                    return False
                with contextlib.suppress(PyMongoError):
                    renewal = {"cuid": cuid, "owner": self.owner,
                               "until": datetime.now(UTC) + timedelta(seconds=CLAIM_SECONDS)}
                    await retry_busy(functools.partial(
                        self._claims.update_one, {"_id": held}, {"$set": renewal}, upsert=True))
                await asyncio.wait([delivery], timeout=CLAIM_SECONDS / 3)
            delivered = not delivery.cancelled() and delivery.exception() is None
            if delivered:
                log.info("a timed-out publication was delivered after all", extra={"cuid": cuid})
                self._remember(cuid)
                await self._record_receipt_or_keep(cuid)
            else:
                with contextlib.suppress(PyMongoError):
                    await self._release(cuid, held)
            return delivered
        finally:
            if self._unsettled.get(cuid) is asyncio.current_task():
                del self._unsettled[cuid]

    async def _record_receipt(self, cuid: str) -> None:
        """Insert the receipt of ``cuid`` (store errors propagate) and drop its claims."""
        await self._writer.insert(RECEIPTS, {"_id": cuid, "at": datetime.now(UTC)})
        self._failed.discard(cuid)
        with contextlib.suppress(PyMongoError):  # after the receipt, claims are moot
            await retry_busy(lambda: self._claims.delete_many({"cuid": cuid}))

    async def _record_receipt_or_keep(self, cuid: str) -> None:
        """:meth:`_record_receipt`; a receipt the store refuses is kept for the republisher loop."""
        try:
            await self._record_receipt(cuid)
        except PyMongoError:  # WriterStopped included
            self._unwritten_receipts[cuid] = {"_id": cuid, "at": datetime.now(UTC)}

    async def _delivered_before(self, calls: list[Document]) -> set[str]:
        """The cuids among ``calls`` whose CallSubmitted (same event id) is on the topic already.

        Raises :class:`KafkaUnavailable` if the topic cannot be read.
        """
        if not calls:
            return set()
        producer = events.PRODUCER_OF_INPUT["validator"]  # CallSubmitted's event id, as events.py builds it
        expected = {call["_id"]: event_id(call["_id"], producer, int(call.get("attempt", 1)))
                    for call in calls}
        since = min(_aware(call.get("created_at")) for call in calls) - SCAN_MARGIN
        try:
            records = await self._scanner.find(self._topics.submitted, expected, since)
        except PublishError as exc:
            raise KafkaUnavailable(str(exc)) from None
        found = set()
        for cuid, value in records:
            try:
                _, record = avro.decode(value)
            except avro.UndecodableMessage:
                continue
            if str(record.get("event_id")) == expected[cuid]:  # decoded as a uuid.UUID
                found.add(cuid)
        return found

    def _remember(self, cuid: str) -> None:
        """Note that this process saw the event of ``cuid`` acknowledged (bounded memory)."""
        self._recent[cuid] = None
        if len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    def _write_receipt_later(self, receipt: Document) -> None:
        def written(future: asyncio.Future[bool]) -> None:
            if future.cancelled() or future.exception() is not None:
                self._unwritten_receipts[receipt["_id"]] = receipt
                log.warning("receipt not written yet", extra={"cuid": receipt["_id"]})

        try:
            self._writer.enqueue(RECEIPTS, receipt, background=True).add_done_callback(written)
        except WriterStopped:  # shutdown: the republisher loop or the next start writes it
            self._unwritten_receipts[receipt["_id"]] = receipt

    async def _release(self, cuid: str, claim_id: str | None) -> None:
        """Give up our claim so that a resubmission may publish at once."""
        if claim_id is None:  # the implicit claim of the inserter: mark generation 0 expired
            with contextlib.suppress(DuplicateKeyError):
                await retry_busy(
                    lambda: self._claims.insert_one(
                        {"_id": f"{cuid}:0", "cuid": cuid, "owner": self.owner, "until": EPOCH}
                    )
                )
        else:
            await retry_busy(lambda: self._claims.update_one({"_id": claim_id}, {"$set": {"until": EPOCH}}))

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for unsettled sends (their producer was stopped first, so
        they are settled now or soon) and close the topic scanner."""
        if self._unsettled:
            await asyncio.wait(list(self._unsettled.values()), timeout=timeout)
        await self._scanner.close()

    async def is_published(self, call: Document) -> bool:
        """True if the call has a receipt (or its document says it is published)."""
        if call.get("published") or call["_id"] in self._recent:
            return True
        return await self._receipts.find_one({"_id": call["_id"]}, {"_id": 1}) is not None

    async def claim(self, call: Document) -> str | None:
        """Take the publish claim of ``call``: its claim id, or None if someone holds it."""
        cuid = call["_id"]
        for generation in range(MAX_CLAIM_GENERATIONS):
            claim_id = f"{cuid}:{generation}"
            now = datetime.now(UTC)
            held = await self._claims.find_one({"_id": claim_id})
            if held is not None:
                if _aware(held.get("until")) > now:
                    return None
                continue  # expired or released: the next generation is free to take
            if generation == 0 and _aware(call.get("created_at")) + timedelta(seconds=CLAIM_SECONDS) > now:
                return None  # the inserting request is still publishing it
            claim = {
                "_id": claim_id,
                "cuid": cuid,
                "owner": self.owner,
                "until": now + timedelta(seconds=CLAIM_SECONDS),
            }
            try:
                await retry_busy(functools.partial(self._claims.insert_one, claim))
            except DuplicateKeyError:
                return None  # another taker won this generation
            return claim_id
        return None

    async def _publish_if_unpublished(self, call: Document) -> bool:
        """Claim and publish ``call`` unless published or claimed; True if we published it
        (or found it published on the topic)."""
        await self._producer.get()  # Kafka known to be down: no claim, no scan
        claim_id = await self.claim(call)
        if claim_id is None:
            return False
        if await self.is_published(call):  # finished while we were taking the claim
            with contextlib.suppress(PyMongoError):
                await retry_busy(lambda: self._claims.delete_one({"_id": claim_id}))
            return False
        if "recording_url" not in call:  # a projection: the event needs the whole call
            full = await self._calls.find_one({"_id": call["_id"]})
            if full is None:
                return False
            call = full
        try:
            delivered = call["_id"] in await self._delivered_before([call])
        except KafkaUnavailable:
            with contextlib.suppress(PyMongoError):
                await self._release(call["_id"], claim_id)
            raise
        if delivered:  # an earlier send reached Kafka after all: only its receipt is missing
            log.info("event found on the topic; not published again", extra={"cuid": call["_id"]})
            self._remember(call["_id"])
            await self._record_receipt_or_keep(call["_id"])
            return True
        await self._publish(call, claim_id)
        return True

    async def ensure_published(self, call: Document, deadline_seconds: float = CLAIM_SECONDS) -> None:
        """Return once the stored ``call``'s event is acknowledged, publishing it if nobody is.

        Raises :class:`KafkaUnavailable` if that does not happen within
        ``deadline_seconds`` or our own attempt fails.
        """
        cuid = call["_id"]
        deadline = time.monotonic() + deadline_seconds
        while True:
            pending = self._in_flight.get(cuid)
            if pending is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(pending), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise KafkaUnavailable("the call is being published by another request") from None
                return
            unsettled = self._unsettled.get(cuid)
            if unsettled is not None:  # an earlier send of ours may still be delivered
                try:
                    delivered = await asyncio.wait_for(asyncio.shield(unsettled),
                                                       max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise KafkaUnavailable("an earlier publication is not settled yet") from None
                if delivered:
                    return
                continue
            if await self.is_published(call):
                return
            if await self._publish_if_unpublished(call):
                return
            if time.monotonic() > deadline:
                raise KafkaUnavailable("the call is being published by another request")
            await asyncio.sleep(0.05)

    async def republish_pending(self, older_than_seconds: float, limit: int = 1000) -> int:
        """Publish calls left unpublished for ``older_than_seconds``; returns how many.

        The first scan of a process reads ``calls`` and the receipts whole (the calls of a
        gateway that stopped before us); later ones only what was created since the oldest
        call the previous scan left unpublished, or since its cut-off (see
        :func:`unpublished_cuids`). Sets the unpublished-calls gauge to what is left.
        """
        await self._producer.get()  # no claims are taken while Kafka is known to be down
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        candidates = await unpublished_cuids(self._db, older_than=cutoff, created_since=self._scan_from)
        candidates = [c for c in candidates if c["_id"] not in self._recent]
        batch = [c for c in candidates[:limit] if c["_id"] not in self._unsettled]
        done = await self._delivered_before(batch)
        for cuid in done:  # sent by a gateway that stopped before writing the receipt
            await self._record_receipt_or_keep(cuid)
        for call in batch:
            if call["_id"] in self._in_flight or call["_id"] in done:
                continue
            with tracing.attached(call.get("trace_context")):
                if await self._publish_if_unpublished(call):
                    done.add(call["_id"])
                    log.info("republished unpublished call", extra={"cuid": call["_id"]})
        left = [c for c in candidates if c["_id"] not in done]
        # The next scan starts at the oldest call still unpublished (claimed by another
        # publisher, over the limit), or at this cut-off (less a margin for slow inserts).
        self._scan_from = min([cutoff - SCAN_MARGIN, *(_aware(c.get("created_at")) for c in left)])
        metrics.UNPUBLISHED_CALLS.set(len(left))
        return len(done)

    async def retry_failed(self) -> int:
        """Publish the calls whose publication failed in this process (and write the
        receipts that could not be written)."""
        for cuid, receipt in list(self._unwritten_receipts.items()):
            await self._writer.insert(RECEIPTS, receipt)
            del self._unwritten_receipts[cuid]
        if not self._failed:
            return 0
        await self._producer.get()  # no claims are taken while Kafka is known to be down
        published = 0
        for cuid in list(self._failed):
            if cuid in self._unsettled:  # its claim is held until aiokafka settles the send
                continue
            call = await self._calls.find_one({"_id": cuid})
            if call is None or await self.is_published(call):
                self._failed.discard(cuid)
                continue
            with tracing.attached(call.get("trace_context")):
                if await self._publish_if_unpublished(call):
                    published += 1
                    log.info("republished unpublished call", extra={"cuid": cuid})
        return published

    async def run_republisher(self, interval_seconds: float, older_than_seconds: float,
                              scans: bool = True) -> None:
        """Forever (never raises): every ``interval_seconds`` retry this process's failed
        publications; ``older_than_seconds`` after start and then every ``FULL_SCAN_SECONDS``
        scan for any unpublished call (those of a crashed or stopped gateway): the whole
        collection once, then what was created since (:meth:`republish_pending`). Scans are
        rare because on the dev store (FerretDB on SQLite) every query reads the whole
        collection. ``scans=False``: only the retries (another worker scans).
        """
        next_scan = time.monotonic() + older_than_seconds  # calls of before our start are due
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.retry_failed()
                if scans and time.monotonic() >= next_scan:
                    await self.republish_pending(older_than_seconds)
                    next_scan = time.monotonic() + max(FULL_SCAN_SECONDS, older_than_seconds)
            except KafkaUnavailable:
                pass
            except PyMongoError as exc:
                log.warning("republisher cannot read calls", extra={"error": type(exc).__name__})
