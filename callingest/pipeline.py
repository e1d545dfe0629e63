"""The one consumer loop every pipeline service runs; it is about Kafka only.

A stage is a row of the stage graph (:mod:`callingest.stages`) bound to a step
``async def step(event, ctx) -> StepResult`` (:mod:`callingest.steps`); this module is the
plumbing around it, written once (arroyo's RunTask -> Produce -> CommitOffsets):

* consumer group, manual commits, at-least-once: an offset is committed only after the
  call document is updated (:mod:`callingest.call_store`) and the step's output event is
  acknowledged by Kafka; commits in offset order per partition (:mod:`callingest.offsets`),
  from the loop at most every :data:`COMMIT_INTERVAL_SECONDS` (each commit is a broker
  request and a write to its offsets log), on revocation and at the end at once;
* read ahead, then fair scheduling across networks (:mod:`callingest.scheduling`), a bound
  on events in flight (the stage's ``in_flight_setting``), events of one call (one key)
  one after another;
* idempotent per (cuid, stage, attempt): a redelivered event whose outcome is stored on
  the call republishes that outcome (same event id) instead of running the step again;
* :class:`~callingest.errors.TransientError` -> delayed retry through the tiered retry
  topics (:mod:`callingest.retry_tiers`); no slot is held while it waits; after
  ``MAX_PROCESSING_ATTEMPTS`` the call fails with ``retryable=true`` (unless the stage
  retries forever). :class:`~callingest.errors.Deferred` -> tier 0 without using up an
  attempt. :class:`~callingest.errors.PermanentError` -> the call fails, CallFailed is
  published to ``calls.failed``;
* undecodable bytes -> the dead-letter topic (:mod:`callingest.dead_letters`);
* infrastructure trouble (MongoDB or Kafka unavailable) -> the message is retried in place
  with backoff and nothing is committed past it, for at most ``INFRA_RETRY_SECONDS``;
* crash-only: anything fatal (an exception outside the step, the dead-letter limit, the
  infrastructure retry bound) is logged with the call and event id, readiness goes false,
  finished work is committed and :meth:`StageRunner.run` raises :class:`ConsumerFailed`, so
  the process exits non-zero and Kubernetes restarts it; the failed event is consumed again;
* SIGTERM: stop taking messages, let in-flight work finish within the grace period, commit
  what is done, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import avro, metrics, retry_tiers
from callingest.dead_letters import MAX_CONSECUTIVE_DEAD_LETTERS
from callingest.handling import DeadLetterLimit, MessageHandler
from callingest.kafka import Producer, PublishError, client_options
from callingest.logging import get_logger
from callingest.offsets import Offsets
from callingest.scheduling import FairQueue, Queued
from callingest.settings import Settings
from callingest.steps import Stage
from callingest.tasks import cancel_and_wait
from callingest.topics import Topics

log = get_logger(__name__)

COMMIT_INTERVAL_SECONDS = 0.5
"""The loop commits finished work at most this often: at a few dozen events a second, one
commit per event was a good part of the broker's CPU per call. A crash redelivers at most
this much more finished work, which the stored outcomes answer (idempotent per attempt)."""


class ConsumerFailed(Exception):
    """The consumer hit something it must not carry on past (already logged); exit non-zero."""


class StageRunner:
    """Runs one :class:`Stage` until :meth:`stop` is called."""

    def __init__(self, stage: Stage[Any], settings: Settings, db: AsyncDatabase[dict[str, Any]],
                 producer: Producer, service: str | None = None) -> None:
        self.stage = stage
        self.spec = stage.spec
        self.settings = settings
        self.db = db
        self.producer = producer
        self.service = service or stage.name
        self.topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
        self.input_topic = self.topics.name(self.spec.input_topic)
        self.retry_topics = self.topics.retry_topics(stage.name)
        self.consumed = [self.input_topic, *self.retry_topics]
        self._handler = MessageHandler(stage, settings, db, producer, self.topics, self.service,
                                       self.consumed)
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets = Offsets(self.service)
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_tails: dict[bytes, asyncio.Task[None]] = {}
        self.max_in_flight = int(getattr(settings, self.spec.in_flight_setting))
        self.read_ahead = max(settings.consumer_read_ahead, self.max_in_flight)
        self._fair = FairQueue(self.max_in_flight)
        self._retry_pauses = retry_tiers.Pauses()
        self._fetch_failing_since: float | None = None
        self._retrying_in_place = 0
        self._last_commit = 0.0
        self.failure: str | None = None
        self.ready = False

    @property
    def infrastructure_ok(self) -> bool:
        """False while an event is retried in place or fetching fails (readiness)."""
        return self._retrying_in_place == 0 and self._fetch_failing_since is None

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop taking messages; :meth:`run` then drains and returns."""
        self._stopping.set()

    def _fatal(self, reason: str) -> None:
        """Stop taking messages and make :meth:`run` raise :class:`ConsumerFailed`."""
        if self.failure is None:
            self.failure = reason
        self.ready = False
        self.stop()

    async def run(self) -> None:
        """Consume until stopped; commits everything finished before returning."""
        runner = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                runner._fair.forget(set(revoked))
                metrics.EVENTS_QUEUED.labels(runner.service).set(runner._fair.queued)
                await runner._drain(runner.settings.shutdown_grace_seconds)
                await runner._commit()
                for tp in revoked:
                    runner._offsets.forget(tp)
                    runner._retry_pauses.forget(tp)

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                return None

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            **client_options(self.settings),
            group_id=f"{self.settings.topic_prefix}callingest-{self.stage.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"callingest-{self.service}",
            max_poll_interval_ms=600000,
            session_timeout_ms=10000,
            heartbeat_interval_ms=3000,
        )
        consumer.subscribe(self.consumed, listener=Listener())
        self._consumer = consumer
        await consumer.start()
        self.ready = True
        lag_task = asyncio.create_task(self._offsets.report_lag(consumer))
        try:
            await self._loop(consumer)
        finally:
            self.ready = False
            await cancel_and_wait(lag_task, f"{self.service} lag report")
            await self._drain(self.settings.shutdown_grace_seconds)
            with contextlib.suppress(Exception):
                await self._commit()
            await consumer.stop()
        if self.failure is not None:
            raise ConsumerFailed(self.failure)

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            self._retry_pauses.resume_due(consumer)
            self._schedule()
            room = self.read_ahead - self._fair.queued - len(self._tasks)
            if room <= 0:
                if self._tasks:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED,
                                       timeout=1.0)
                else:  # pragma: no cover - the queue is never full without tasks running
                    await asyncio.sleep(0.1)
                await self._commit(due_only=True)
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=room)
                self._fetch_failing_since = None
            except KafkaError as exc:
                failing = self._fetch_failing_since = self._fetch_failing_since or time.monotonic()
                if time.monotonic() - failing > self.settings.infra_retry_seconds:
                    log.error("Kafka fetch failing for longer than INFRA_RETRY_SECONDS; exiting",
                              extra={"error": type(exc).__name__,
                                     "limit_seconds": self.settings.infra_retry_seconds})
                    self._fatal("Kafka fetch failing")
                    break
                log.warning("fetch failed, retrying", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                for record in records:
                    if self._stopping.is_set():
                        # Not started: rewind so the next owner gets it.
                        consumer.seek(tp, record.offset)
                        break
                    if not self._retry_pauses.due(consumer, tp, record):
                        break
                    self._enqueue(tp, record)
            self._schedule()
            await self._commit(due_only=True)

    # -- fair scheduling across networks ---------------------------------------------------

    def _enqueue(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        """Hold ``record`` in its network's queue; its offset counts as unfinished from now."""
        self._offsets.tracker(tp).add(record.offset)
        self._fair.push(tp, record)
        metrics.EVENTS_QUEUED.labels(self.service).set(self._fair.queued)

    def _schedule(self) -> None:
        """Start queued events while slots are free."""
        while (self._fair.queued and len(self._tasks) < self.max_in_flight
               and not self._stopping.is_set()):
            item = self._fair.pop()
            if item is None:
                break
            self._start(item)
        metrics.EVENTS_QUEUED.labels(self.service).set(self._fair.queued)

    # -- one message -----------------------------------------------------------------------

    def _start(self, item: Queued) -> None:
        tp, record, network = item.tp, item.record, item.network
        tracker = self._offsets.tracker(tp)
        previous = self._key_tails.get(record.key) if record.key else None
        task = asyncio.create_task(self._process(tp, record, previous))
        self._tasks.add(task)
        metrics.EVENTS_IN_FLIGHT.labels(self.service).set(len(self._tasks))
        if record.key:
            self._key_tails[record.key] = task

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._fair.finished(network)
            metrics.EVENTS_IN_FLIGHT.labels(self.service).set(len(self._tasks))
            if record.key and self._key_tails.get(record.key) is t:
                del self._key_tails[record.key]
            if not t.cancelled() and t.exception() is None:
                tracker.done(record.offset)
            self._schedule()

        task.add_done_callback(finished)

    async def _process(self, tp: TopicPartition, record: ConsumerRecord,
                       previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # its outcome does not matter here; our own cancellation does
            await asyncio.wait({previous})
        if self.failure is not None:  # not after an event of this call that failed
            raise ConsumerFailed(self.failure)
        retrying = False
        delay = 0.5
        failing_since = 0.0
        try:
            while True:
                try:
                    await self._handler.handle(tp, record)
                    return
                except (PyMongoError, KafkaError, PublishError) as exc:
                    if self._stopping.is_set():
                        raise
                    if not retrying:  # readiness is false while any event retries in place
                        retrying, failing_since = True, time.monotonic()
                        self._retrying_in_place += 1
                    error = f"{type(exc).__name__}: {exc}"[:300]
                    if time.monotonic() - failing_since > self.settings.infra_retry_seconds:
                        log.error("infrastructure unavailable for longer than "
                                  "INFRA_RETRY_SECONDS; exiting, the event will be consumed "
                                  "again after the restart",
                                  extra={**_ids(tp, record), "error": error,
                                         "limit_seconds": self.settings.infra_retry_seconds})
                        self._fatal("infrastructure unavailable")
                        raise
                    log.warning("infrastructure unavailable, retrying in place",
                                extra={**_ids(tp, record), "error": error})
                    await asyncio.sleep(delay + random.uniform(0, delay))
                    delay = min(delay * 2, 10.0)
                except DeadLetterLimit:
                    log.error("too many undecodable messages in a row; exiting (is a producer "
                              "writing something else to this topic?)",
                              extra={**_ids(tp, record), "limit": MAX_CONSECUTIVE_DEAD_LETTERS})
                    self._fatal("dead-letter limit")
                    raise ConsumerFailed("dead-letter limit") from None
                except ConsumerFailed:
                    raise
                except Exception as exc:
                    log.exception("event processing failed outside the step; exiting, the event "
                                  "will be consumed again after the restart",
                                  extra={**_ids(tp, record), "error": type(exc).__name__})
                    self._fatal(f"{type(exc).__name__} outside the step")
                    raise
        finally:
            if retrying:
                self._retrying_in_place -= 1

    # -- commits, drain ---------------------------------------------------------------

    async def _commit(self, due_only: bool = False) -> None:
        """Commit finished work; with ``due_only``, only if the last commit is
        :data:`COMMIT_INTERVAL_SECONDS` old."""
        now = time.monotonic()
        if due_only and now - self._last_commit < COMMIT_INTERVAL_SECONDS:
            return
        self._last_commit = now
        await self._offsets.commit(self._consumer)

    async def _drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for all in-flight work, then cancel it."""
        tasks = set(self._tasks)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
            log.warning("abandoned in-flight events at shutdown; they will be redelivered",
                        extra={"count": len(pending)})


def _ids(tp: TopicPartition, record: ConsumerRecord) -> dict[str, Any]:
    """Where a record is and, if it decodes, its call id and event id (for log lines)."""
    ids: dict[str, Any] = {"topic": tp.topic, "partition": tp.partition, "offset": record.offset}
    try:
        _name, event = avro.decode(record.value)
    except Exception:  # undecodable: its place is all there is
        return ids
    ids.update(cuid=event.get("cuid"), event_id=str(event.get("event_id")))
    return ids

