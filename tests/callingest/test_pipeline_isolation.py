"""The consumer loop's isolation on the real broker and store: fairness between networks,
no slot held while a retry waits, ``retrying`` and retry history, deferrals."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from callingest import retry_tiers
from callingest.callview import call_view
from callingest.errors import Deferred, Refused, TransientError
from callingest.scheduling import network_share
from callingest.settings import Settings
from callingest.steps import StageContext, StepResult
from callingest.topics import Topics
from tests.callingest.test_pipeline_loop import running, status_of
from tests.conftest import wait_until
from tests.helpers import call_doc, submit

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


def _ok(event: dict[str, Any]) -> StepResult:
    return StepResult(next_event={"recording_url": event["recording_url"],
                                  "recording_auth_config_id": None,
                                  "call_direction": event["call_direction"]})


class ByNetwork:
    """Network A's events take ``slow`` seconds each, every other network's none."""

    def __init__(self, slow: float) -> None:
        self.slow = slow
        self.done: list[str] = []
        self.running = {"A": 0}
        self.most_running_a = 0

    async def __call__(self, event: dict[str, Any], ctx: StageContext) -> StepResult:
        network = event["network_id"]
        if network == "A":
            self.running["A"] += 1
            self.most_running_a = max(self.most_running_a, self.running["A"])
            try:
                await asyncio.sleep(self.slow)
            finally:
                self.running["A"] -= 1
        self.done.append(network)
        return _ok(event)


async def test_a_backlog_does_not_delay_another_network(settings: Settings, db: Any,
                                                        topics: Topics) -> None:
    """24 slow events of network A, then 4 of network B, 4 slots: B is served as soon as it
    is read (a quarter of the slots stay free for other networks), not after A's backlog."""
    step = ByNetwork(slow=1.0)
    a_docs = [call_doc(network_id="A") for _ in range(24)]
    b_docs = [call_doc(network_id="B") for _ in range(4)]
    for doc in a_docs + b_docs:
        await submit(settings, db, doc)
    async with running(settings.model_copy(update={"max_in_flight": 4}), topics, step):
        await wait_until(lambda: step.done.count("B") == 4, timeout=60, what="B done")
        a_before_b = step.done.count("A")
        await wait_until(lambda: step.done.count("A") == 24, timeout=60, what="A done")
    assert a_before_b <= 8, step.done  # FIFO would finish 20 or more of A first
    assert step.most_running_a == network_share(4) == 3
    for doc in a_docs + b_docs:
        assert await status_of(db, doc["_id"]) == "validated"


class Script:
    """Per cuid: a list of actions, one per try ('transient', 'deferred', 'refused', 'ok')."""

    def __init__(self, plans: dict[str, list[str]]) -> None:
        self.plans = plans
        self.tries: list[tuple[str, int]] = []
        self.past_deadline: list[bool] = []

    async def __call__(self, event: dict[str, Any], ctx: StageContext) -> StepResult:
        cuid = event["cuid"]
        count = sum(1 for c, _ in self.tries if c == cuid)
        self.tries.append((cuid, ctx.retry))
        self.past_deadline.append(ctx.past_deadline)
        plan = self.plans.get(cuid, ["ok"])
        action = plan[min(count, len(plan) - 1)]
        if action == "transient":
            raise TransientError(
                "timed out fetching http://rec.example/a.wav;jsessionid=s3cret-session?token=sup3r-s3cret",
                "RecordingTimeout")
        if action == "refused":
            raise Refused("timed out fetching http://rec.example (host not contacted again: "
                          "circuit open)", "RecordingTimeout")
        if action == "deferred":
            raise Deferred("rec.example already has 32 downloads running", "RecordingHostBusy")
        if action == "rate-limited":
            raise TransientError("HTTP 429 from http://rec.example/a.wav", "RecordingRateLimited",
                                 retry_after=45.0)
        return _ok(event)


async def test_a_waiting_retry_holds_no_slot_and_says_where_it_stands(
        settings: Settings, db: Any, topics: Topics) -> None:
    """One slot: a call waiting 30 s for its retry does not stop the next call; while it
    waits the call has ``retrying`` and a ``retrying`` history entry with the error class,
    and neither carries the URL's path parameters or query string."""
    waiting, after = call_doc(), call_doc()
    step = Script({waiting["_id"]: ["transient", "ok"]})
    tuned = settings.model_copy(update={"max_in_flight": 1, "retry_delays_seconds": [30.0, 30.0]})
    async with running(tuned, topics, step):
        before = datetime.now(UTC)
        await submit(settings, db, waiting)
        await submit(settings, db, after)
        await wait_until(lambda: _status_is(db, after["_id"], "validated"), timeout=20,
                         what="the call behind the waiting retry")
        call = await wait_until(lambda: _with_retrying(db, waiting["_id"]), timeout=10,
                                what="retrying set")
    retrying = call["retrying"]
    assert retrying["stage"] == "validator"
    assert retrying["attempt"] == 2
    assert retrying["last_error"] == {"class": "RecordingTimeout",
                                      "message": "timed out fetching http://rec.example/a.wav"}
    due = retrying["next_attempt_at"].replace(tzinfo=UTC)
    assert before + timedelta(seconds=25) < due < datetime.now(UTC) + timedelta(seconds=31)
    entry = call["history"][-1]
    assert (entry["stage"], entry["status"], entry["attempt"], entry["class"]) == (
        "validator", "retrying", 1, "RecordingTimeout")
    assert call["status"] == "received"
    assert "s3cret" not in repr(call)


async def test_retrying_is_cleared_by_success_and_by_the_final_failure(
        settings: Settings, db: Any, topics: Topics) -> None:
    recovers, dies = call_doc(), call_doc()
    step = Script({recovers["_id"]: ["transient", "ok"], dies["_id"]: ["transient"]})
    tuned = settings.model_copy(update={"max_processing_attempts": 3,
                                        "retry_delays_seconds": [0.5, 0.5]})
    ok, failed = await _one_recovers_one_fails(tuned, db, topics, step, recovers, dies)
    assert "retrying" not in ok and "retrying" not in failed
    assert [h["status"] for h in ok["history"]] == ["received", "retrying", "validated"]
    assert [(h["status"], h.get("attempt")) for h in failed["history"]] == [
        ("received", None), ("retrying", 1), ("retrying", 2), ("failed", None)]
    assert failed["failure"]["class"] == "RecordingTimeout"
    assert "gave up after 3 attempts" in failed["failure"]["message"]
    # The failed entry keeps the failure: readable in the view after a retry clears `failure`.
    shown = call_view({**failed, "status": "validated", "failure": None})["history"][-1]
    assert shown == {"stage": "validator", "status": "failed", "at": shown["at"],
                     "class": "RecordingTimeout", "message": failed["failure"]["message"]}


async def test_a_deferral_uses_up_no_attempt(settings: Settings, db: Any, topics: Topics) -> None:
    """Deferred three times with only two attempts allowed: still processed, never failed,
    and the try counter the step sees does not move."""
    doc = call_doc()
    step = Script({doc["_id"]: ["deferred", "deferred", "deferred", "ok"]})
    tuned = settings.model_copy(update={"max_processing_attempts": 2,
                                        "retry_delays_seconds": [0.5, 0.5]})
    async with running(tuned, topics, step):
        await submit(settings, db, doc)
        await wait_until(lambda: _status_is(db, doc["_id"], "validated"), timeout=30,
                         what="validated after deferrals")
    assert step.tries == [(doc["_id"], 0)] * 4
    stored = await db.calls.find_one({"_id": doc["_id"]})
    assert [h["status"] for h in stored["history"]] == ["received", "validated"]


async def test_a_refusal_uses_up_no_attempt_until_the_retry_deadline(
        settings: Settings, db: Any, topics: Topics) -> None:
    """Refused (the resource believed down) more often than attempts allowed: no attempt is
    used while the retry deadline (first retry + the tiers' delays) lasts; the step is told
    when it has passed; a call still refused then fails with the refusal's class."""
    recovers, refused = call_doc(), call_doc()
    step = Script({recovers["_id"]: ["refused", "refused", "refused", "ok"],
                   refused["_id"]: ["refused"]})
    # A refusal goes round tier 0 in about 0.55 s here, so the recovering call's fourth try
    # comes about 1.65 s after its first refusal: a deadline of 1.7 s (0.2 + 1.5) left it 50 ms,
    # less than the refusals' writes of `retrying` can take on a busy store.
    tuned = settings.model_copy(update={"max_processing_attempts": 2,
                                        "retry_delays_seconds": [0.2, 3.0]})
    _, failed = await _one_recovers_one_fails(tuned, db, topics, step, recovers, refused)
    assert {retry for _, retry in step.tries} == {0}
    refusals = [c for c, _ in step.tries if c == refused["_id"]]
    assert len(refusals) > 2  # more than the two attempts allowed
    assert step.past_deadline.count(True) == 1  # the last try only
    assert failed["failure"]["class"] == "RecordingTimeout"
    assert failed["failure"]["message"].endswith(
        "(host not contacted again: circuit open) (gave up at the retry deadline after "
        "0 attempts)")
    assert [h["status"] for h in failed["history"]] == ["received", "failed"]


async def _one_recovers_one_fails(settings: Settings, db: Any, topics: Topics, step: Script,
                                  recovers: dict[str, Any], dies: dict[str, Any],
                                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``step`` on the two calls until the first is validated and the second failed;
    the two as stored."""
    async with running(settings, topics, step):
        for doc in (recovers, dies):
            await submit(settings, db, doc)
        await wait_until(lambda: _status_is(db, recovers["_id"], "validated"), timeout=30,
                         what="recovered")
        await wait_until(lambda: _status_is(db, dies["_id"], "failed"), timeout=30, what="failed")
    return (await db.calls.find_one({"_id": recovers["_id"]}),
            await db.calls.find_one({"_id": dies["_id"]}))


async def _status_is(db: Any, cuid: str, status: str) -> bool:
    return await status_of(db, cuid) == status


async def _with_retrying(db: Any, cuid: str) -> dict[str, Any] | None:
    call: dict[str, Any] | None = await db.calls.find_one({"_id": cuid})
    return call if call and call.get("retrying") else None


async def test_a_retry_after_moves_the_retry_to_a_tier_that_waits_as_long(
        settings: Settings, db: Any, topics: Topics) -> None:
    """A server that asked for 45 s (Retry-After): the next try goes to the first tier waiting
    at least that long (60 s here), not to the 1 s one the first retry would take."""
    limited = call_doc()
    step = Script({limited["_id"]: ["rate-limited", "ok"]})
    tuned = settings.model_copy(update={"retry_delays_seconds": [1.0, 60.0]})
    async with running(tuned, topics, step):
        before = datetime.now(UTC)
        await submit(settings, db, limited)
        call = await wait_until(lambda: _with_retrying(db, limited["_id"]), timeout=20,
                                what="retrying set")
        await asyncio.sleep(3)  # the 1 s tier would have run the second try by now
        assert len(step.tries) == 1
    due = call["retrying"]["next_attempt_at"].replace(tzinfo=UTC)
    assert before + timedelta(seconds=55) < due < datetime.now(UTC) + timedelta(seconds=61)


def test_retry_plans_honour_a_retry_after_up_to_the_last_tier() -> None:
    delays = [5.0, 30.0, 120.0, 600.0]
    assert [retry_tiers.plan(delays, 1, at_least=a).tier for a in (None, 5, 6, 30, 31, 3600)] == [
        0, 0, 1, 1, 2, 3]
    assert retry_tiers.plan(delays, 3, at_least=10).tier == 2  # never earlier than its own tier
    assert retry_tiers.plan(delays, 1, counted=False, at_least=100).tier == 2
