"""The call document as the consumer loop reads and writes it, for one stage.

The loop (:mod:`callingest.pipeline`) is about Kafka; every read and write of a call it
makes is here:

* the call as stored when an event arrives (:meth:`CallStore.load`), whether the event is
  from an earlier attempt (:func:`stale`) and whether this stage's outcome of the attempt
  is already stored (:func:`stored_outcome`: a redelivery republishes it);
* a success (:meth:`CallStore.succeeded`): the step's fields, the status the stage sets
  and a history entry, the outcome under ``outputs.<stage>``, ``retrying`` cleared;
* a failure (:meth:`CallStore.failed`): status ``failed``, ``failure``, a history entry,
  the CallFailed outcome, ``retrying`` cleared;
* a counted retry (:meth:`CallStore.retrying`): ``retrying`` (where the call stands) and a
  ``retrying`` history entry with the error class; the message is scrubbed of query
  strings and secrets;
* a refusal by an open circuit (:meth:`CallStore.refused`): ``retrying`` (the try the call
  waits for, and the host's failure that opened the circuit), no history entry: it is no try,
  and recurs every cool-down.

An outcome is ``{"attempt", "topic", "event", "record"}`` (topic, event and record only
when the stage publishes something): the output event with its deterministic id, stored
before it is produced so that a redelivered event is answered with the same event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from callingest import avro
from callingest.kafka import event_id
from callingest.logging import scrub
from callingest.stages import StageSpec
from callingest.steps import StepResult
from callingest.topics import Topics

Outcome = dict[str, Any]


def now() -> datetime:
    return datetime.now(UTC)


def attempt_of(event: dict[str, Any]) -> int:
    return int(event.get("attempt", 1))


def stale(call: dict[str, Any] | None, event: dict[str, Any]) -> bool:
    """True if the call has moved on to a later attempt than the event's."""
    return call is not None and int(call.get("attempt", 1)) > attempt_of(event)


def stored_outcome(call: dict[str, Any] | None, stage: str,
                   event: dict[str, Any]) -> Outcome | None:
    """The outcome ``stage`` stored for the event's attempt, if it finished it already."""
    stored: Outcome | None = (call or {}).get("outputs", {}).get(stage)
    if stored is not None and int(stored.get("attempt", 0)) == attempt_of(event):
        return stored
    return None


class CallStore:
    """Reads and writes of the call documents for one stage."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], spec: StageSpec, topics: Topics) -> None:
        self.db = db
        self.spec = spec
        self.topics = topics

    async def load(self, cuid: str) -> dict[str, Any] | None:
        return await self.db.calls.find_one({"_id": cuid})

    def _event(self, event: dict[str, Any], name: str, fields: dict[str, Any]) -> dict[str, Any]:
        """The record of event ``name`` this stage publishes for ``event``'s attempt."""
        cuid = event["cuid"]
        attempt = attempt_of(event)
        return {
            "event_id": event_id(cuid, self.spec.name, attempt),
            "cuid": cuid,
            "occurred_at": now(),
            "schema_version": avro.LATEST[name].version,
            "network_id": event["network_id"],
            "attempt": attempt,
            **fields,
        }

    async def succeeded(self, event: dict[str, Any], result: StepResult) -> Outcome:
        """Record the step's result on the call; the outcome to publish."""
        stage = self.spec.name
        output: Outcome = {"attempt": attempt_of(event)}
        if result.next_event is not None and self.spec.output_event and self.spec.output_topic:
            output.update(topic=self.topics.name(self.spec.output_topic),
                          event=self.spec.output_event,
                          record=self._event(event, self.spec.output_event, result.next_event))
        update: dict[str, Any] = {"$set": {**result.call_update, f"outputs.{stage}": output},
                                  "$unset": {"retrying": ""}}
        if self.spec.status:
            update["$set"]["status"] = self.spec.status
            update["$push"] = {"history": {"stage": stage, "status": self.spec.status,
                                           "at": now()}}
        await self.db.calls.update_one({"_id": event["cuid"]}, update)
        return output

    async def failed(self, event: dict[str, Any], failure_class: str, message: str,
                     retryable: bool) -> Outcome:
        """Mark the call failed in this stage; the CallFailed outcome to publish."""
        stage = self.spec.name
        attempt = attempt_of(event)
        record = self._event(event, "CallFailed", {
            "stage": stage, "failure_class": failure_class, "message": message,
            "retryable": retryable})
        output: Outcome = {"attempt": attempt, "topic": self.topics.failed, "event": "CallFailed",
                           "record": record}
        at = now()
        await self.db.calls.update_one(
            {"_id": event["cuid"]},
            {
                "$set": {
                    "status": "failed",
                    "failure": {"stage": stage, "class": failure_class, "message": message,
                                "retryable": retryable, "attempt": attempt, "at": at},
                    f"outputs.{stage}": output,
                },
                "$unset": {"retrying": ""},
                "$push": {"history": {"stage": stage, "status": "failed", "at": at,
                                      "class": failure_class, "message": message}},
            },
        )
        return output

    def _waiting(self, retry: int, next_attempt_at: datetime, failure_class: str,
                 message: str) -> dict[str, Any]:
        """``retrying``: the call waits for try ``retry + 1`` of this stage, due at
        ``next_attempt_at``, after a failure of ``failure_class``."""
        return {"stage": self.spec.name, "attempt": retry + 1, "next_attempt_at": next_attempt_at,
                "last_error": {"class": failure_class, "message": scrub(message)[:500]}}

    async def retrying(self, cuid: str, retry: int, next_attempt_at: datetime,
                       failure_class: str, message: str) -> None:
        """Record that the call waits for try ``retry + 1`` of this stage, due at
        ``next_attempt_at``, after a failure of ``failure_class``."""
        waiting = self._waiting(retry, next_attempt_at, failure_class, message)
        await self.db.calls.update_one(
            {"_id": cuid},
            {"$set": {"retrying": waiting},
             "$push": {"history": {"stage": self.spec.name, "status": "retrying", "at": now(),
                                   "attempt": retry, "class": failure_class,
                                   "next_attempt_at": next_attempt_at}}},
        )

    async def refused(self, cuid: str, retry: int, next_attempt_at: datetime,
                      failure_class: str, message: str) -> None:
        """Record that try ``retry + 1`` of this stage was refused untried by an open circuit
        (no attempt used) and is due again at ``next_attempt_at``; ``failure_class`` and
        ``message``: the failure that opened the circuit (the message says the circuit is
        open and names the host only)."""
        waiting = self._waiting(retry, next_attempt_at, failure_class, message)
        await self.db.calls.update_one({"_id": cuid}, {"$set": {"retrying": waiting}})
