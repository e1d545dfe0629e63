"""The validator's step: re-check a submitted call against the campaign configuration as it is now.

It is the authority for CallSubmitted events that never passed the gateway
(a replayed or hand-published event): a call it does not know yet is recorded
from the event first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo.errors import DuplicateKeyError

from callingest import rules
from callingest.config_file import load_campaign, load_network
from callingest.errors import PermanentError
from callingest.steps import NoResources, StageContext, StepResult


async def step(event: dict[str, Any], ctx: StageContext[NoResources]) -> StepResult:
    """Pass the call on (CallValidated) or fail it permanently; idempotent per (cuid, attempt)."""
    if ctx.call is None:
        await _record_call(event, ctx)
    network = await load_network(ctx.db, event["network_id"])
    if network is None:
        raise PermanentError("UnknownNetwork", f"network {event['network_id']} is not configured")
    if not network.call_ingestion_enabled:
        raise PermanentError(
            "UnauthorizedOperation",
            "You do not have permissions to perform the requested operation.",
        )
    campaign = await load_campaign(ctx.db, event["network_id"],
                                   str(event["advertiser_campaign_id_from_network"]))
    problem = rules.campaign_problem(campaign)
    if problem:
        raise PermanentError(rules.CAMPAIGN_CLASS, problem)
    field_problems = rules.call_problems(network, event)
    if field_problems:
        raise PermanentError(rules.RECORD_INVALID_CLASS, rules.record_invalid(field_problems))
    return StepResult(
        next_event={
            "recording_url": event["recording_url"],
            "recording_auth_config_id": event.get("recording_auth_config_id"),
            "call_direction": event["call_direction"],
        },
    )


async def _record_call(event: dict[str, Any], ctx: StageContext[NoResources]) -> None:
    """Insert the call described by ``event`` (status received) unless it exists."""
    now = datetime.now(UTC)
    doc = {
        "_id": event["cuid"],
        "network_id": event["network_id"],
        "external_call_unique_id": event["external_call_unique_id"],
        "status": "received",
        "start_time": event["start_time"],
        "calling_phone_number": event["calling_phone_number"],
        "destination_phone_number": event["destination_phone_number"],
        "advertiser_campaign_id_from_network": str(event["advertiser_campaign_id_from_network"]),
        "call_direction": event["call_direction"],
        "recording_url": event["recording_url"],
        "recording_auth_config_id": event.get("recording_auth_config_id"),
        "language_code": event["language_code"],
        "signals": event.get("signals", []),
        "custom_data": event.get("custom_data", []),
        "attempt": int(event.get("attempt", 1)),
        "published": True,
        "created_at": now,
        "history": [{"stage": "replay-intake", "status": "received", "at": now}],
    }
    try:
        await ctx.db.calls.insert_one(doc)
    except DuplicateKeyError:
        return
