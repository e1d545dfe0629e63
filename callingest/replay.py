"""``callingest replay``: send failed calls back to the stage that failed.

For each matching call: its attempt is incremented and its status set back to
the one before the failed stage (so the status endpoint shows it moving
again), then that stage's input event is published with the new attempt.
Events of earlier attempts still in flight are ignored by the stages, so a
replayed call reaches exactly one terminal state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from callingest import events, mongo
from callingest.kafka import Producer, PublishError, client_options
from callingest.settings import Settings
from callingest.topics import Topics


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
        for cuid in flt.cuids:
            if cuid not in {c["_id"] for c in calls}:
                summary.skipped.append(f"{cuid}: no failed call with this cuid")
        if dry_run or not calls:
            for call in calls:
                failure = call.get("failure", {})
                print(f"would replay {call['_id']} at stage {failure.get('stage')} "
                      f"({failure.get('class')}: {failure.get('message')})")
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
    stage = call.get("failure", {}).get("stage")
    if stage not in events.STAGE_INPUT:
        summary.skipped.append(f"{cuid}: failed in unknown stage {stage!r}")
        return
    attempt = int(call.get("attempt", 1))
    new_attempt = attempt + 1
    try:
        _suffix, event_name, record = events.stage_input(call, stage, new_attempt)
    except ValueError as exc:
        summary.skipped.append(f"{cuid}: {exc}")
        return
    at = datetime.now(UTC)
    claimed = await db.calls.find_one_and_update(
        {"_id": cuid, "status": "failed", "attempt": {"$in": [attempt, None]} if attempt == 1
         else attempt},
        {"$set": {"status": events.STATUS_BEFORE[stage], "attempt": new_attempt,
                  "last_failure": call.get("failure")},
         "$unset": {"failure": "", "csm_notified_at": ""},
         "$push": {"history": {"stage": "replay", "status": events.STATUS_BEFORE[stage],
                               "at": at}}},
    )
    if claimed is None:
        summary.skipped.append(f"{cuid}: changed while replaying; not replayed")
        return
    try:
        await producer.send(events.input_topic(topics, stage), event_name, record, key=cuid)
    except PublishError as exc:
        await db.calls.update_one(
            {"_id": cuid, "attempt": new_attempt},
            {"$set": {"status": "failed", "attempt": attempt, "failure": call.get("failure")},
             "$pull": {"history": {"stage": "replay", "at": at}}},
        )
        summary.errors.append(f"{cuid}: {exc}")
        return
    summary.replayed += 1


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
