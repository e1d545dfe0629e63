"""Processing failed calls again: ``callingest replay``, the gateway's
``POST calls/{cuid}/retry.json`` and correction by resubmission share
:func:`restart_failed_call`.

For each call: its attempt is incremented (claimed with one conditional
update, so concurrent restarts of one call make one new attempt) and its
status set back to the one before the stage it resumes from (so the status
endpoint shows it moving again), then that stage's input event is published
with the new attempt. Events of earlier attempts still in flight are ignored
by the stages, so a restarted call reaches exactly one terminal state.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import DuplicateKeyError
from tqdm import tqdm

from callingest import events, mongo, stages
from callingest.kafka import Producer, PublishError, client_options
from callingest.settings import Settings
from callingest.topics import Topics

# {_id: "<cuid>:<attempt>", cuid, attempt, stage, source, at, published}: who started an attempt
RESTART_CLAIMS = "call_restarts"
#: How often :func:`restart_published` reads a claim whose publication is under way.
SETTLE_POLL_SECONDS = 0.05


@dataclass
class ReplayFilter:
    cuids: list[str] = field(default_factory=list)
    stage: str | None = None
    since: datetime | None = None
    failure_class: str | None = None

    def query(self) -> dict[str, Any]:
        q: dict[str, Any] = {"status": "failed"}
        if self.cuids:
            q["_id"] = {"$in": self.cuids}
        if self.stage:
            q["failure.stage"] = self.stage
        if self.failure_class:
            q["failure.class"] = self.failure_class
        if self.since:
            q["failure.at"] = {"$gte": self.since.astimezone(UTC)}
        return q


@dataclass
class ReplaySummary:
    matched: int = 0
    replayed: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def replay_calls(settings: Settings, flt: ReplayFilter, dry_run: bool = False,
                       progress: bool = False) -> ReplaySummary:
    """Replay every failed call matching ``flt``; idempotent per (cuid, attempt)."""
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    summary = ReplaySummary()
    producer: Producer | None = None
    try:
        calls = await db.calls.find(flt.query()).sort("_id", 1).to_list(None)
        summary.matched = len(calls)
        narrowed = " matching the other filters" if flt.stage or flt.failure_class or flt.since else ""
        for cuid in flt.cuids:
            if cuid not in {c["_id"] for c in calls}:
                summary.skipped.append(f"{cuid}: no failed call with this cuid{narrowed}")
        if dry_run or not calls:
            for call in calls:
                failure = call.get("failure", {})
                try:
                    stage = restart_stage(call)
                except NotRestartable as exc:
                    stage = f"none ({exc})"
                print(f"would replay {call['_id']} at stage {stage} (failed in "
                      f"{failure.get('stage')}: {failure.get('class')}: {failure.get('message')})")
            return summary
        producer = Producer(settings.kafka_bootstrap_servers, "replay",
                            options=client_options(settings))
        await producer.start()
        for call in tqdm(calls, desc="replaying", unit="call", disable=not progress,
                         file=sys.stderr):
            await _replay_one(db, producer, topics, call, summary)
    finally:
        if producer is not None:
            await producer.stop()
        await client.close()
    return summary


async def _replay_one(db: Any, producer: Producer, topics: Topics, call: dict[str, Any],
                      summary: ReplaySummary) -> None:
    cuid = call["_id"]

    async def send(stage: str, event_name: str, record: dict[str, Any]) -> None:
        await producer.send(events.input_topic(topics, stage), event_name, record, key=cuid)

    try:
        restarted = await restart_failed_call(db.calls, call, send, source="replay")
    except NotRestartable as exc:
        summary.skipped.append(f"{cuid}: {exc}")
        return
    except PublishError as exc:
        summary.errors.append(f"{cuid}: {exc}")
        return
    if restarted is None:
        summary.skipped.append(f"{cuid}: changed while replaying; not replayed")
        return
    summary.replayed += 1


class NotRestartable(Exception):
    """The failed call cannot be processed again as it is (``str(exc)`` says why)."""


@dataclass(frozen=True)
class Restart:
    """A failed call sent back into the pipeline: its new attempt, stage and status."""

    cuid: str
    attempt: int
    stage: str
    status: str


Send = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""``send(stage, event name, record)``: publish a stage's input event; raises if not acknowledged."""


def restart_stage(call: dict[str, Any]) -> str:
    """The stage a failed call resumes from: the one that failed, or the fetcher for a
    normalizer failure whose fetched recording is gone or was the cause (a permanent failure
    of the normalizer is about the recording's bytes: mono, empty, corrupt, an unknown codec;
    only a new download, of a recording fixed at the same URL, can change the outcome)."""
    failure = call.get("failure") or {}
    stage = failure.get("stage")
    if stage not in stages.CALL_STAGES:
        raise NotRestartable(f"failed in unknown stage {stage!r}")
    if stage == "normalizer" and (not call.get("fetched") or failure.get("retryable") is False):
        return "fetcher"
    return str(stage)


async def restart_failed_call(
    calls: Any, call: dict[str, Any], send: Send, *, source: str,
    replace: dict[str, Any] | None = None,
) -> Restart | None:
    """Process the failed ``call`` (as read) again; the one code path of ``callingest replay``,
    ``POST calls/{cuid}/retry.json`` and correction by resubmission.

    ``replace``: new stored content (a correction), which restarts from the validator;
    otherwise the call resumes from the stage that failed. The new attempt is claimed by
    inserting ``<cuid>:<attempt>`` into ``call_restarts`` (unique _id), then the call is
    updated only if still ``failed`` at the attempt read, so of concurrent restarts of one
    call exactly one wins; the others get None. The claim is recorded in
    the history as ``{stage: source, status, at}``. If ``send`` fails the claim is undone
    and the exception propagates.
    """
    cuid = call["_id"]
    stage = "validator" if replace is not None else restart_stage(call)
    attempt = int(call.get("attempt") or 1)
    new_attempt = attempt + 1
    try:
        _suffix, event_name, record = events.stage_input({**call, **(replace or {})}, stage,
                                                         new_attempt)
    except ValueError as exc:
        raise NotRestartable(str(exc)) from None
    status = stages.status_before(stage)
    at = datetime.now(UTC)
    # The claim of the new attempt: a unique _id makes exactly one taker win, also on
    # stores whose findAndModify is not atomic under concurrency (FerretDB on SQLite).
    claims = calls.database[RESTART_CLAIMS]
    claim_id = f"{cuid}:{new_attempt}"
    try:
        await claims.insert_one({"_id": claim_id, "cuid": cuid, "attempt": new_attempt,
                                 "stage": stage, "source": source, "at": at, "published": False})
    except DuplicateKeyError:
        return None
    updated = await calls.update_one(
        {"_id": cuid, "status": "failed",
         "attempt": {"$in": [attempt, None]} if attempt == 1 else attempt},
        {"$set": {**(replace or {}), "status": status, "attempt": new_attempt,
                  "last_failure": call.get("failure")},
         "$unset": {"failure": "", "csm_notified_at": ""},
         "$push": {"history": {"stage": source, "status": status, "at": at}}},
    )
    if updated.matched_count == 0:  # changed since it was read
        await claims.delete_one({"_id": claim_id})
        return None
    try:
        await send(stage, event_name, record)
    except Exception:
        original = {k: call[k] for k in (replace or {}) if k in call}
        await calls.update_one(
            {"_id": cuid, "attempt": new_attempt},
            {"$set": {**original, "status": "failed", "attempt": attempt,
                      "failure": call.get("failure")},
             "$pull": {"history": {"stage": source, "at": at}}},
        )
        await claims.delete_one({"_id": claim_id})
        raise
    await claims.update_one({"_id": claim_id}, {"$set": {"published": True}})
    return Restart(cuid=cuid, attempt=new_attempt, stage=stage, status=status)


async def republish_unpublished_restarts(calls: Any, send: Send, older_than: timedelta) -> int:
    """Publish the input event of every restart claimed more than ``older_than`` ago whose
    publication was never recorded (its process died between the claim and Kafka's
    acknowledgement), so a restarted call is never left waiting; the number published.
    A claim whose call never reached its attempt (the process died before updating the
    call) is deleted, or the call, still failed, could never be restarted again: every
    restart would lose to that claim.

    Sending again what was in fact delivered is harmless: the event has the same id and
    attempt, and a stage republishes its stored outcome for a redelivered event.
    """
    claims = calls.database[RESTART_CLAIMS]
    published = 0
    cutoff = datetime.now(UTC) - older_than
    async for claim in claims.find({"published": False, "at": {"$lt": cutoff}}):
        call = await calls.find_one({"_id": claim.get("cuid")})
        attempt = None if call is None else int(call.get("attempt") or 1)
        if attempt is not None and attempt < claim.get("attempt", 0):
            # Claimed, but the call was never moved to that attempt (its process died in
            # between, or the update failed): released, so the call can be restarted again.
            await claims.delete_one({"_id": claim["_id"], "published": False})
            continue
        if call is not None and attempt == claim.get("attempt"):
            _suffix, event_name, record = events.stage_input(call, claim["stage"], claim["attempt"])
            await send(claim["stage"], event_name, record)
            published += 1
        await claims.update_one({"_id": claim["_id"]}, {"$set": {"published": True}})
    return published


async def restart_published(calls: Any, cuid: str, attempt: int, patience: float) -> bool | None:
    """Whether the restart that claimed ``attempt`` of the call ``cuid`` went through: True
    once its event is acknowledged, False if its claim is gone (undone: Kafka did not take
    the event; or never claimed); waits up to ``patience`` seconds while its publication
    is under way, then None."""
    claims = calls.database[RESTART_CLAIMS]
    deadline = time.monotonic() + patience
    while True:
        claim = await claims.find_one({"_id": f"{cuid}:{attempt}"}, {"published": 1})
        if claim is None:
            return False
        if claim.get("published"):
            return True
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(SETTLE_POLL_SECONDS)


async def run_replay(settings: Settings, flt: ReplayFilter, dry_run: bool) -> int:
    """The CLI entry: replays with a progress bar and prints a summary; 1 if anything errored."""
    summary = await replay_calls(settings, flt, dry_run=dry_run, progress=True)
    for line in summary.skipped:
        print(f"skipped {line}")
    for line in summary.errors:
        print(f"error {line}", file=sys.stderr)
    verb = "would replay" if dry_run else "replayed"
    print(f"{summary.matched} failed call(s) matched; {verb} "
          f"{summary.matched if dry_run else summary.replayed}; skipped {len(summary.skipped)}; "
          f"errors {len(summary.errors)}")
    return 1 if summary.errors else 0
