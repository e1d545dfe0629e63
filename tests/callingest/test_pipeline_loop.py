"""The shared consumer loop on the real broker and store, with a test step."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from callingest import events, mongo, pipeline
from callingest.errors import PermanentError, TransientError
from callingest.kafka import Producer
from callingest.offsets import PartitionTracker
from callingest.pipeline import StageRunner
from callingest.settings import Settings
from callingest.stages import stage
from callingest.steps import NoResources, Stage, StageContext, StepResult
from callingest.topics import Topics
from tests.conftest import wait_until
from tests.helpers import call_doc, committed_past, decoded, end_offsets, read_topic, submit

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


def test_commit_position_never_passes_unfinished_work() -> None:
    t = PartitionTracker()
    for offset in (5, 6, 7):
        t.add(offset)
    assert t.commit_position() == 5
    t.done(6)
    t.done(7)
    assert t.commit_position() == 5
    t.done(5)
    assert t.commit_position() == 8


class Recorder:
    """A step whose behaviour per cuid is scripted: ok, transient N times, permanent."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, event: dict[str, Any], ctx: StageContext) -> StepResult:
        cuid = event["cuid"]
        self.calls.append((cuid, ctx.retry))
        plan = self.script.get(cuid, ["ok"])
        action = plan[min(ctx.retry, len(plan) - 1)]
        if action == "transient":
            raise TransientError("store unavailable", "Transient")
        if action == "permanent":
            raise PermanentError("RecordingFormat", "mono recording")
        if action == "crash":
            raise KeyError("bug")
        return StepResult(next_event={"recording_url": event["recording_url"],
                                      "recording_auth_config_id": None,
                                      "call_direction": event["call_direction"]})


@contextlib.asynccontextmanager
async def running(settings: Settings, topics: Topics, step: Any) -> Any:
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    producer = Producer(settings.kafka_bootstrap_servers, "test")
    await producer.start()
    runner = StageRunner(Stage(stage("validator"), step, NoResources()), settings, db, producer)
    task = asyncio.create_task(runner.run())
    try:
        yield runner
    finally:
        runner.stop()
        await asyncio.wait_for(task, 20)
        await producer.stop()
        await client.close()


async def status_of(db: Any, cuid: str) -> str | None:
    doc = await db.calls.find_one({"_id": cuid})
    return doc and doc["status"]


async def test_outcomes_retry_failure_and_dead_letter(settings: Settings, db: Any,
                                                      topics: Topics) -> None:
    ok, flaky, broken, buggy = (call_doc() for _ in range(4))
    step = Recorder({flaky["_id"]: ["transient", "transient", "ok"],
                     broken["_id"]: ["permanent"],
                     buggy["_id"]: ["crash"]})
    async with running(settings.model_copy(update={"max_processing_attempts": 3}), topics, step):
        for doc in (ok, flaky, broken, buggy):
            await submit(settings, db, doc)
        raw = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await raw.start()
        await raw.send_and_wait(topics.submitted, b"not avro", key=b"junk")
        await raw.stop()
        await wait_until(lambda: _all_terminal(db, [ok, flaky, broken, buggy]), timeout=40,
                         what="all calls settled")
    assert await status_of(db, ok["_id"]) == "validated"
    assert await status_of(db, flaky["_id"]) == "validated"
    assert [r for c, r in step.calls if c == flaky["_id"]] == [0, 1, 2]
    failed = await db.calls.find_one({"_id": broken["_id"]})
    assert failed["failure"]["class"] == "RecordingFormat"
    assert failed["failure"]["retryable"] is False
    crashed = await db.calls.find_one({"_id": buggy["_id"]})
    assert crashed["failure"]["class"] == "InternalError"
    assert crashed["failure"]["retryable"] is True
    assert "KeyError" in crashed["failure"]["message"] and "3 attempts" in crashed["failure"]["message"]

    validated = decoded(await read_topic(settings, topics.validated))
    assert sorted(e["cuid"] for e in validated) == sorted([ok["_id"], flaky["_id"]])
    failed_events = decoded(await read_topic(settings, topics.failed))
    assert sorted(e["cuid"] for e in failed_events) == sorted([broken["_id"], buggy["_id"]])
    dead = await read_topic(settings, topics.dead_letter)
    assert [d.value for d in dead] == [b"not avro"]
    headers = dict(dead[0].headers)
    assert headers["callingest-origin-topic"] == topics.submitted.encode()


async def test_redelivery_republishes_the_stored_outcome_without_rerunning(
    settings: Settings, db: Any, topics: Topics
) -> None:
    doc = call_doc()
    step = Recorder({})
    async with running(settings, topics, step):
        await submit(settings, db, doc)
        await wait_until(lambda: _all_terminal(db, [doc]), what="validated")
    # The same event again (as after a crash before the commit).
    from tests.helpers import publish

    await publish(settings, topics.submitted, "CallSubmitted", events.call_submitted(doc),
                  doc["_id"])
    async with running(settings, topics, step):
        await wait_until(lambda: _count(settings, topics.validated, 2), timeout=30,
                         what="republished outcome")
    assert [c for c, _ in step.calls] == [doc["_id"]]
    validated = decoded(await read_topic(settings, topics.validated))
    assert len({str(e["event_id"]) for e in validated}) == 1
    stored = await db.calls.find_one({"_id": doc["_id"]})
    assert [h["status"] for h in stored["history"]] == ["received", "validated"]


async def test_events_of_an_earlier_attempt_are_skipped(settings: Settings, db: Any,
                                                        topics: Topics) -> None:
    doc = call_doc(attempt=2)
    step = Recorder({})
    async with running(settings, topics, step):
        await submit(settings, db, doc)  # CallSubmitted built with attempt 1
        ends = await end_offsets(settings, topics.submitted)
        await wait_until(lambda: committed_past(settings, "validator", ends),
                         what="the consumer committed past the event")
    assert step.calls == []
    assert await status_of(db, doc["_id"]) == "received"



async def test_work_finished_between_commits_is_committed_at_shutdown(
    settings: Settings, db: Any, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop commits at most every COMMIT_INTERVAL_SECONDS; an interval longer than the
    # test means only the shutdown commit can move the group past the event.
    monkeypatch.setattr(pipeline, "COMMIT_INTERVAL_SECONDS", 3600.0)
    doc = call_doc()
    async with running(settings, topics, Recorder({})):
        await submit(settings, db, doc)
        ends = await end_offsets(settings, topics.submitted)
        await wait_until(lambda: _all_terminal(db, [doc]), what="validated")
        await asyncio.sleep(1.0)  # the loop has been round a few times since
    assert await committed_past(settings, "validator", ends)

async def _all_terminal(db: Any, docs: list[dict[str, Any]]) -> bool:
    for d in docs:
        if await status_of(db, d["_id"]) not in ("validated", "failed"):
            return False
    return True


async def _count(settings: Settings, topic: str, n: int) -> bool:
    return len(await read_topic(settings, topic, timeout=1.0)) >= n


async def test_an_event_cancelled_while_it_waits_for_its_calls_previous_event_is_not_processed(
    settings: Settings, db: Any
) -> None:
    """At shutdown the runner cancels what is still in flight; an event queued behind an
    earlier event of the same call must end there, not go on to its step once the earlier one
    is done (it is redelivered after the restart)."""
    step = Recorder({})
    producer = Producer(settings.kafka_bootstrap_servers, "test")  # never started: not used
    runner = StageRunner(Stage(stage("validator"), step, NoResources()), settings, db, producer)
    previous_may_end = asyncio.Event()
    previous = asyncio.create_task(previous_may_end.wait())
    # No partition or record: the event must stop before it reads them.
    waiting = asyncio.create_task(runner._process(None, None, previous))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    waiting.cancel()
    await asyncio.sleep(0.05)
    previous_may_end.set()
    await asyncio.wait({waiting}, timeout=5)
    assert waiting.cancelled()
    assert step.calls == []
