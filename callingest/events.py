"""Builders of the events that start a stage, from the call as stored in MongoDB.

The gateway builds CallSubmitted with :func:`call_submitted`; replay rebuilds
the input event of whichever stage failed with :func:`stage_input`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from callingest import avro
from callingest.kafka import event_id
from callingest.topics import Topics

# The stage that consumes each event, and the event it consumes.
STAGE_INPUT = {
    "validator": "CallSubmitted",
    "fetcher": "CallValidated",
    "normalizer": "RecordingFetched",
}
# Status a call has while it waits for each stage.
STATUS_BEFORE = {"validator": "received", "fetcher": "validated", "normalizer": "fetched"}
# The stage that produced each stage's input event.
PRODUCER_OF_INPUT = {"validator": "gateway", "fetcher": "validator", "normalizer": "fetcher"}


def _header(call: dict[str, Any], stage: str, attempt: int, event: str) -> dict[str, Any]:
    return {
        "event_id": event_id(call["_id"], PRODUCER_OF_INPUT[stage], attempt),
        "cuid": call["_id"],
        "occurred_at": datetime.now(UTC),
        "schema_version": avro.LATEST[event].version,
        "network_id": call["network_id"],
        "attempt": attempt,
    }


def call_submitted(call: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    """The CallSubmitted record for a stored call."""
    return {
        **_header(call, "validator", attempt, "CallSubmitted"),
        "external_call_unique_id": call["external_call_unique_id"],
        "start_time": call["start_time"],
        "calling_phone_number": call["calling_phone_number"],
        "destination_phone_number": call["destination_phone_number"],
        "advertiser_campaign_id_from_network": str(call["advertiser_campaign_id_from_network"]),
        "call_direction": call["call_direction"],
        "recording_url": call["recording_url"],
        "recording_auth_config_id": call.get("recording_auth_config_id"),
        "language_code": call["language_code"],
        "signals": [{"name": s["name"], "value": bool(s["value"])} for s in call.get("signals", [])],
        "custom_data": [{"name": c["name"], "value": str(c["value"])}
                        for c in call.get("custom_data", [])],
    }


def stage_input(call: dict[str, Any], stage: str, attempt: int) -> tuple[str, str, dict[str, Any]]:
    """``(topic suffix event name, event name, record)`` that makes ``stage`` process ``call``.

    Raises ValueError if the call lacks what the stage needs (e.g. no fetched
    recording for the normalizer).
    """
    if stage == "validator":
        return "submitted", "CallSubmitted", call_submitted(call, attempt)
    if stage == "fetcher":
        return "validated", "CallValidated", {
            **_header(call, stage, attempt, "CallValidated"),
            "recording_url": call["recording_url"],
            "recording_auth_config_id": call.get("recording_auth_config_id"),
            "call_direction": call["call_direction"],
        }
    if stage == "normalizer":
        fetched = call.get("fetched")
        if not fetched:
            raise ValueError("the call has no fetched recording; replay the fetcher instead")
        return "fetched", "RecordingFetched", {
            **_header(call, stage, attempt, "RecordingFetched"),
            "bucket": fetched["bucket"],
            "key": fetched["key"],
            "size_bytes": int(fetched["size_bytes"]),
            "format": fetched["format"],
            "call_direction": call["call_direction"],
        }
    raise ValueError(f"unknown stage {stage!r}")


def input_topic(topics: Topics, stage: str) -> str:
    return {"validator": topics.submitted, "fetcher": topics.validated,
            "normalizer": topics.fetched}[stage]
