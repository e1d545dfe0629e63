"""The call view: a stored call as API clients see it, built in this one place.

The gateway answers ``GET calls/{cuid}.json`` with it (and documents it in OpenAPI), and
the webhooks deliverer sends it as the ``data`` of every webhook. It carries no hashes,
claims, recording URL or secrets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class SignalOut(BaseModel):
    name: str
    value: bool


class CustomDatumOut(BaseModel):
    name: str
    value: str


class HistoryEntry(BaseModel):
    """One step of the call's processing; ``retrying`` entries also carry the try that
    failed, its error class and when the next try is due, ``failed`` entries the failure's
    class and message (so a failure stays readable after a retry clears ``failure``); each
    key only where it applies."""

    model_config = ConfigDict(populate_by_name=True)

    stage: str
    status: str
    at: str | None = Field(description="ISO 8601 UTC with Z")
    attempt: int | None = Field(None, description="retrying entries: the try that failed (1 = first)")
    error_class: str | None = Field(None, alias="class",
                                    description="retrying and failed entries: the error class")
    message: str | None = Field(None, description="failed entries: the failure's message")
    next_attempt_at: str | None = Field(None, description="retrying entries: ISO 8601 UTC with Z")

    @model_serializer(mode="wrap")
    def _only_set_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items()
                if v is not None or k not in ("attempt", "class", "error_class", "message",
                                              "next_attempt_at")}


class RetryError(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    error_class: str = Field(alias="class")
    message: str = Field(description="no secrets, no query strings")


class RetryingOut(BaseModel):
    """Where a call waiting for its next try stands (null when no stage waits)."""

    stage: str
    attempt: int = Field(description="the number of the next try of this stage (1 = the first, "
                         "2 = the first retry)")
    next_attempt_at: str = Field(description="ISO 8601 UTC with Z")
    last_error: RetryError


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
    retrying: RetryingOut | None = None
    csm_notified_at: str | None = None
    history: list[HistoryEntry] = Field(default_factory=list)


def format_utc(moment: datetime) -> str:
    """``2016-04-11T20:00:00.000Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _iso(value: Any) -> str | None:
    return format_utc(value) if isinstance(value, datetime) else value


def _retrying(retrying: dict[str, Any] | None) -> dict[str, Any] | None:
    if not retrying:
        return None
    return {**retrying, "next_attempt_at": _iso(retrying.get("next_attempt_at"))}


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
            "retrying": _retrying(call.get("retrying")),
            "csm_notified_at": _iso(call.get("csm_notified_at")),
            "history": [{**entry, "at": _iso(entry.get("at")),
                         "next_attempt_at": _iso(entry.get("next_attempt_at"))}
                        for entry in call.get("history", [])],
        }
    )
    return view.model_dump(mode="json", by_alias=True)
