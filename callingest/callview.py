"""The call view: a stored call as API clients see it, built in this one place.

The gateway answers ``GET calls/{cuid}.json`` with it (and documents it in OpenAPI), and
the webhooks deliverer sends it as the ``data`` of every webhook. It carries no hashes,
claims, recording URL or secrets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SignalOut(BaseModel):
    name: str
    value: bool


class CustomDatumOut(BaseModel):
    name: str
    value: str


class HistoryEntry(BaseModel):
    stage: str
    status: str
    at: str | None = Field(description="ISO 8601 UTC with Z")


class RecordingOut(BaseModel):
    sample_rate: int
    channels: int
    sample_format: str
    duration_seconds: float


class FailureOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    stage: str
    failure_class: str = Field(alias="class")
    message: str


class CallView(BaseModel):
    """GET /api/2022-03-01/calls/{cuid}.json."""

    cuid: str
    external_call_unique_id: str
    status: Literal["received", "validated", "fetched", "normalized", "failed"]
    start_time: str = Field(description="ISO 8601 UTC with Z")
    calling_phone_number: str
    destination_phone_number: str
    advertiser_campaign_id_from_network: str
    call_direction: Literal["inbound", "outbound"]
    language_code: str
    signals: list[SignalOut]
    custom_data: list[CustomDatumOut]
    recording: RecordingOut | None = None
    failure: FailureOut | None = None
    csm_notified_at: str | None = None
    history: list[HistoryEntry] = Field(default_factory=list)


def format_utc(moment: datetime) -> str:
    """``2016-04-11T20:00:00.000Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _iso(value: Any) -> str | None:
    return format_utc(value) if isinstance(value, datetime) else value


def call_view(call: dict[str, Any]) -> dict[str, Any]:
    """The call as interfaces.md lists it (no hashes, claims or secrets)."""
    recording = call.get("recording")
    failure = call.get("failure")
    view = CallView.model_validate(
        {
            "cuid": call["_id"],
            "external_call_unique_id": call["external_call_unique_id"],
            "status": call.get("status", "received"),
            "start_time": _iso(call["start_time"]),
            "calling_phone_number": call["calling_phone_number"],
            "destination_phone_number": call["destination_phone_number"],
            "advertiser_campaign_id_from_network": call["advertiser_campaign_id_from_network"],
            "call_direction": call["call_direction"],
            "language_code": call["language_code"],
            "signals": call.get("signals", []),
            "custom_data": call.get("custom_data", []),
            "recording": recording if recording and "sample_rate" in recording else None,
            "failure": failure,
            "csm_notified_at": _iso(call.get("csm_notified_at")),
            "history": [{**entry, "at": _iso(entry.get("at"))} for entry in call.get("history", [])],
        }
    )
    return view.model_dump(mode="json", by_alias=True)
