"""Publishing CallSubmitted for stored calls, once per call.

The parts (why the design has receipts and claims: docs/architecture.md, "Publication"):

* :mod:`.receipts` - the record that an event was acknowledged, and "not yet published";
* :mod:`.claims` - who may publish a call right now;
* this module - the send itself, sends that timed out but may still be delivered, and
  the check of the topic before a call is published again;
* :mod:`.republisher` - the background loop for calls left unpublished.

A send that Kafka did not acknowledge in time is not over: aiokafka keeps the message and
may still deliver it (a broker that comes back). The request answers 503 at once, but its
claim is kept, renewed, until aiokafka settles the send; delivered, the receipt is
written; failed, the claim is released.

Publishing a call again (anyone but the inserting request) first reads the topic: the
partition of the call's key, from the call's creation on. An event of the same id found
there (a holder that died between Kafka's acknowledgement and the receipt) is not
published again, only its receipt is written. So a call is published once also across a
crash of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import avro, events, tracing
from callingest.kafka import Producer, PublishError, TopicScanner, event_id
from callingest.logging import get_logger
from callingest.topics import Topics
from services.gateway.claims import CLAIM_SECONDS, Claims
from services.gateway.receipts import SCAN_MARGIN, Receipts, aware
from services.gateway.writer import CallWriter

log = get_logger(__name__)

Document = dict[str, Any]

PUBLISH_TIMEOUT_SECONDS = 5.0
# The producer's own delivery timeout equals PUBLISH_TIMEOUT_SECONDS and the gateway waits a
# little longer, so that aiokafka (not our wait) decides: a publication answered with 503 has
# been expired by aiokafka and is not delivered later behind the gateway's back.
PUBLISH_WAIT_SECONDS = PUBLISH_TIMEOUT_SECONDS + 2.0
# How long a claim is held (renewed) for a send aiokafka has not settled; aiokafka settles a
# send within its request timeout once the broker answers, so this only bounds a stuck producer.
MAX_HOLD_SECONDS = 120.0


class KafkaUnavailable(Exception):
    """The event could not be acknowledged now; the call stays unpublished."""


def gateway_producer(bootstrap_servers: str) -> Producer:
    """The gateway's producer: started on first use (the gateway serves 503s while Kafka is
    down), its delivery timeout :data:`PUBLISH_TIMEOUT_SECONDS`."""
    return Producer(bootstrap_servers, "gateway",
                    request_timeout_ms=int(PUBLISH_TIMEOUT_SECONDS * 1000))


class CallPublisher:
    """Produces the CallSubmitted event of stored calls and records their receipts."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        writer: CallWriter,
        producer: Producer,
        topics: Topics,
        scanner: TopicScanner,
    ) -> None:
        self._calls = db.calls
        self._producer = producer
        self._topics = topics
        self._scanner = scanner
        self.owner = uuid.uuid4().hex
        self.claims = Claims(db, self.owner)
        self.receipts = Receipts(db, writer, self._receipt_written)
        #: Calls whose publication failed in this process (retried by the republisher).
        self.failed: set[str] = set()
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        # Sends that timed out and that aiokafka has not settled yet: cuid -> the task that
        # holds the call's claim until then; its result says whether the event was delivered.
        self._unsettled: dict[str, asyncio.Task[bool]] = {}

    async def kafka(self) -> Producer:
        """The started producer; raises :class:`KafkaUnavailable` if Kafka cannot be reached."""
        try:
            await self._producer.ensure_started()
        except PublishError:
            raise KafkaUnavailable("Kafka is unavailable") from None
        return self._producer

    def busy(self, cuid: str) -> bool:
        """True while this process publishes ``cuid`` or waits for a send of it to settle."""
        return cuid in self._in_flight or cuid in self._unsettled

    async def send_stage_input(self, stage: str, event: str, record: Document) -> None:
        """Publish the input event of ``stage`` now (a failed call processed again, see
        callingest/replay.py); raises KafkaUnavailable or PublishError if not acknowledged."""
        producer = await self.kafka()
        await producer.send(events.input_topic(self._topics, stage), event, record,
                            key=record["cuid"], timeout=PUBLISH_WAIT_SECONDS)

    async def publish_new(self, call: Document) -> None:
        """Publish a call this process just inserted (its implicit claim).

        Raises :class:`KafkaUnavailable` (claim released, call unpublished)
        if Kafka does not acknowledge in time.
        """
        await self._publish(call, claim_id=None)

    async def _receipt_written(self, cuid: str) -> None:
        self.failed.discard(cuid)
        with contextlib.suppress(PyMongoError):  # after the receipt, claims are moot
            await self.claims.drop_all(cuid)

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
            producer = await self.kafka()
            with tracing.attached(call.get("trace_context")):
                await producer.send(
                    self._topics.submitted,
                    "CallSubmitted",
                    events.call_submitted(call, int(call.get("attempt", 1))),
                    key=cuid,
                    timeout=PUBLISH_WAIT_SECONDS,
                )
        except (PublishError, KafkaUnavailable) as exc:
            self.failed.add(cuid)
            pending = exc.pending if isinstance(exc, PublishError) else None
            if pending is not None:  # aiokafka may still deliver it: keep the claim until it knows
                self._unsettled[cuid] = asyncio.create_task(self._hold_until_settled(cuid, claim_id, pending))
            else:
                with contextlib.suppress(PyMongoError):
                    await self.claims.release(cuid, claim_id)
            raise KafkaUnavailable(str(exc)) from None
        self.receipts.remember(cuid)
        if claim_id is None and cuid not in self.failed:
            self.receipts.write_later(cuid)  # a new call: batched, in the background
            return
        await self.receipts.record(cuid)

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
                        await self.claims.release(cuid, held)
                    return False
                with contextlib.suppress(PyMongoError):
                    await self.claims.renew(cuid, held)
                await asyncio.wait([delivery], timeout=CLAIM_SECONDS / 3)
            delivered = not delivery.cancelled() and delivery.exception() is None
            if delivered:
                log.info("a timed-out publication was delivered after all", extra={"cuid": cuid})
                self.receipts.remember(cuid)
                await self.receipts.record_or_keep(cuid)
            else:
                with contextlib.suppress(PyMongoError):
                    await self.claims.release(cuid, held)
            return delivered
        finally:
            if self._unsettled.get(cuid) is asyncio.current_task():
                del self._unsettled[cuid]

    async def delivered_before(self, calls: list[Document]) -> set[str]:
        """The cuids among ``calls`` whose CallSubmitted (same event id) is on the topic already.

        Raises :class:`KafkaUnavailable` if the topic cannot be read.
        """
        if not calls:
            return set()
        producer = events.PRODUCER_OF_INPUT["validator"]  # CallSubmitted's event id, as events.py builds it
        expected = {call["_id"]: event_id(call["_id"], producer, int(call.get("attempt", 1)))
                    for call in calls}
        since = min(aware(call.get("created_at")) for call in calls) - SCAN_MARGIN
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

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for unsettled sends (their producer was stopped first, so
        they are settled now or soon) and close the topic scanner."""
        if self._unsettled:
            await asyncio.wait(list(self._unsettled.values()), timeout=timeout)
        await self._scanner.close()

    async def publish_if_unpublished(self, call: Document) -> bool:
        """Claim and publish ``call`` unless published or claimed; True if we published it
        (or found it published on the topic)."""
        await self.kafka()  # Kafka known to be down: no claim, no scan
        claim_id = await self.claims.take(call)
        if claim_id is None:
            return False
        if await self.receipts.is_published(call):  # finished while we were taking the claim
            with contextlib.suppress(PyMongoError):
                await self.claims.drop(claim_id)
            return False
        if "recording_url" not in call:  # a projection: the event needs the whole call
            full = await self._calls.find_one({"_id": call["_id"]})
            if full is None:
                return False
            call = full
        try:
            delivered = call["_id"] in await self.delivered_before([call])
        except KafkaUnavailable:
            with contextlib.suppress(PyMongoError):
                await self.claims.release(call["_id"], claim_id)
            raise
        if delivered:  # an earlier send reached Kafka after all: only its receipt is missing
            log.info("event found on the topic; not published again", extra={"cuid": call["_id"]})
            self.receipts.remember(call["_id"])
            await self.receipts.record_or_keep(call["_id"])
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
            if await self.receipts.is_published(call):
                return
            if await self.publish_if_unpublished(call):
                return
            if time.monotonic() > deadline:
                raise KafkaUnavailable("the call is being published by another request")
            await asyncio.sleep(0.05)
