"""Builders of the events that start a stage, from the call as stored in MongoDB.

The gateway builds CallSubmitted with :func:`call_submitted`; replay rebuilds
the input event of whichever stage failed with :func:`stage_input`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from callingest import avro, stages
from callingest.kafka import event_id
from callingest.topics import Topics

#: The stage that produced each call stage's input event (its event id names it).
PRODUCER_OF_INPUT = {name: stages.upstream(name) for name in stages.CALL_STAGES}


def _header(call: dict[str, Any], stage: str, attempt: int) -> dict[str, Any]:
    """The fields every input event of ``stage`` starts with."""
    return {
        "event_id": event_id(call["_id"], PRODUCER_OF_INPUT[stage], attempt),
        "cuid": call["_id"],
        "occurred_at": datetime.now(UTC),
        "schema_version": avro.LATEST[stages.stage(stage).input_event].version,
        "network_id": call["network_id"],
        "attempt": attempt,
    }


def call_submitted(call: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    """The CallSubmitted record for a stored call."""
    return {
        **_header(call, "validator", attempt),
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


def _call_validated(call: dict[str, Any], attempt: int) -> dict[str, Any]:
    return {
        **_header(call, "fetcher", attempt),
        "recording_url": call["recording_url"],
        "recording_auth_config_id": call.get("recording_auth_config_id"),
        "call_direction": call["call_direction"],
    }


def _recording_fetched(call: dict[str, Any], attempt: int) -> dict[str, Any]:
    fetched = call.get("fetched")
    if not fetched:
        raise ValueError("the call has no fetched recording; replay the fetcher instead")
    return {
        **_header(call, "normalizer", attempt),
        "bucket": fetched["bucket"],
        "key": fetched["key"],
        "size_bytes": int(fetched["size_bytes"]),
        "format": fetched["format"],
        "call_direction": call["call_direction"],
    }


#: How each call stage's input event is rebuilt from the stored call, by event name.
_BUILDERS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "CallSubmitted": call_submitted,
    "CallValidated": _call_validated,
    "RecordingFetched": _recording_fetched,
}


def stage_input(call: dict[str, Any], stage: str, attempt: int) -> tuple[str, str, dict[str, Any]]:
    """``(input topic base name, event name, record)`` that makes ``stage`` process ``call``.

    Raises ValueError for a stage that does not process calls, or if the call lacks what
    the stage needs (e.g. no fetched recording for the normalizer).
    """
    if stage not in stages.CALL_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    spec = stages.stage(stage)
    return spec.input_topic, spec.input_event, _BUILDERS[spec.input_event](call, attempt)


def input_topic(topics: Topics, stage: str) -> str:
    """The topic (with its prefix) that ``stage`` consumes."""
    return topics.name(stages.stage(stage).input_topic)
