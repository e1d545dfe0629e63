"""A submission validated against the network: the normalized call, or one ``RecordInvalid``
naming every problem (in the words of :mod:`callingest.rules` for configuration rules)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from callingest import rules
from callingest.callview import format_utc
from services.gateway.errors import RecordInvalid
from services.gateway.models import MAX_LIST_ITEMS, CallSubmission, ValidationContext


@dataclass(frozen=True)
class NormalizedCall:
    """A validated call in canonical form; ``content_hash`` decides 202 versus 409."""

    network_id: str
    external_call_unique_id: str
    start_time: datetime
    calling_phone_number: str
    destination_phone_number: str
    advertiser_campaign_id_from_network: str
    call_direction: str
    recording_url: str
    recording_auth_config_id: str | None
    language_code: str
    signals: tuple[tuple[str, bool], ...]
    custom_data: tuple[tuple[str, str], ...]

    def canonical(self) -> dict[str, Any]:
        """Every normalized field as JSON-ready values (start_time in ms precision, Z)."""
        return {
            "network_id": self.network_id,
            "external_call_unique_id": self.external_call_unique_id,
            "start_time": format_utc(self.start_time),
            "calling_phone_number": self.calling_phone_number,
            "destination_phone_number": self.destination_phone_number,
            "advertiser_campaign_id_from_network": self.advertiser_campaign_id_from_network,
            "call_direction": self.call_direction,
            "recording_url": self.recording_url,
            "recording_auth_config_id": self.recording_auth_config_id,
            "language_code": self.language_code,
            "signals": [{"name": n, "value": v} for n, v in self.signals],
            "custom_data": [{"name": n, "value": v} for n, v in self.custom_data],
        }

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON; equal for resubmissions that differ only in form
        (signals and custom data in another order included: they are hashed sorted by name,
        and kept in the order submitted)."""
        canonical = self.canonical()
        for field in ("signals", "custom_data"):
            canonical[field] = sorted(canonical[field], key=lambda item: (item["name"], item["value"]))
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: Any) -> str:
    loc, kind = tuple(error["loc"]), error["type"]
    path = _path(loc)
    if kind == "missing":
        return f"'{path}' is required"
    if kind == "invalid":
        return rules.field_problem(path, error["msg"])
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if path and error.get("input") is None:  # "call": null is a call not passed
            return f"'{path}' is required"
        return f"'{path}' must be an object" if path else "the request body must be a JSON object"
    if kind == "list_type":
        return f"'{path}' must be a list"
    if kind == "too_long":
        return f"'{path}' must have at most {MAX_LIST_ITEMS} items"
    if kind in ("string_type", "string_too_long"):
        return f"'{path}' must be a string"
    return f"'{path}' is invalid"


def validate_submission(body: Any, ctx: ValidationContext) -> NormalizedCall:
    """The normalized call, or :class:`RecordInvalid` naming every problem of ``body``."""
    try:
        submission = CallSubmission.model_validate(body, context=ctx)
    except ValidationError as exc:
        raise RecordInvalid([_describe(e) for e in exc.errors()]) from None
    call = submission.call
    return NormalizedCall(
        network_id=ctx.network.id,
        external_call_unique_id=call.external_call_unique_id,
        start_time=call.start_time,
        calling_phone_number=call.calling_phone_number,
        destination_phone_number=call.destination_phone_number,
        advertiser_campaign_id_from_network=call.advertiser_campaign_id_from_network,
        call_direction=call.call_direction,
        recording_url=call.recording_url,
        recording_auth_config_id=call.recording_auth_config_id,
        language_code=call.language_code or ctx.network.default_language_code,
        signals=tuple((s.name, s.value) for s in submission.signals),
        custom_data=tuple((d.name, d.value) for d in submission.custom_data),
    )
