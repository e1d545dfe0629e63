"""The validator's step called directly on the real store, and the one rule set: every
configuration rule reads the same from the gateway (a 403) and from the validator (a
permanent failure)."""

from __future__ import annotations

from typing import Any

import pytest

from callingest import events
from callingest.errors import PermanentError
from callingest.settings import Settings
from callingest.steps import NoResources, StageContext
from callingest.topics import Topics
from services.validator.step import step
from tests.helpers import call_doc
from tests.services.gateway.conftest import configured_db, gateway  # noqa: F401 - fixtures
from tests.services.gateway.test_gateway_api import call_body, post

pytestmark = [pytest.mark.mongo, pytest.mark.kafka]

# (what breaks a rule: call fields, signals, custom data) -> the one text of the problem
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("language outside the list", {"language_code": "xx-XX"}, "RecordInvalid",
     "Validation failed: 'call.language_code' must be one of en-US en-GB es-ES fr-FR"),
    ("language of another network", {"language_code": "es-ES"}, "RecordInvalid",
     "Validation failed: 'call.language_code' must be en-US: multiple language processing "
     "is not enabled for the network"),
    ("unknown signal", {"signals": [{"name": "Refund", "value": True}]}, "RecordInvalid",
     "Validation failed: 'signals[0].name' is not a signal configured for the network"),
    ("unknown custom data field", {"custom_data": [{"name": "region", "value": "x"}]},
     "RecordInvalid",
     "Validation failed: 'custom_data[0].name' is not a custom data field configured for "
     "the network"),
    ("unknown auth config", {"recording_auth_config_id": "99"}, "RecordInvalid",
     "Validation failed: 'call.recording_auth_config_id' does not name a recording auth "
     "config of the network"),
    ("two problems", {"language_code": "xx-XX", "signals": [{"name": "Refund", "value": True}]},
     "RecordInvalid",
     "Validation failed: 'call.language_code' must be one of en-US en-GB es-ES fr-FR, "
     "'signals[0].name' is not a signal configured for the network"),
    ("campaign not ExternalOnly", {"advertiser_campaign_id_from_network": "91"},
     "call.advertiser_campaign_id_from_network", "campaign must be for external calls only"),
    ("campaign without transcription", {"advertiser_campaign_id_from_network": "92"},
     "call.advertiser_campaign_id_from_network", "campaign must have transcription enabled"),
    ("unknown campaign", {"advertiser_campaign_id_from_network": "404"},
     "call.advertiser_campaign_id_from_network", "campaign not found"),
]


def context(settings: Settings, db: Any, topics: Topics,
            call: dict[str, Any] | None) -> StageContext:
    return StageContext(settings=settings, db=db, topics=topics, call=call, retry=0,
                        resources=NoResources())


def stored_call(fields: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in fields.items() if k in ("signals", "custom_data")}
    call_fields = {k: v for k, v in fields.items() if k not in extra}
    campaign = str(call_fields.pop("advertiser_campaign_id_from_network", "85"))
    return call_doc(campaign=campaign, **call_fields, **extra)


@pytest.mark.parametrize(("case", "fields", "error_class", "text"), CASES,
                         ids=[c[0] for c in CASES])
async def test_one_text_per_rule_from_gateway_and_validator(
    gateway: Any, configured_db: Any, settings: Settings, topics: Topics,  # noqa: F811
    case: str, fields: dict[str, Any], error_class: str, text: str,
) -> None:
    body = call_body(f"rules-{case}", **{k: v for k, v in fields.items()
                                         if k not in ("signals", "custom_data")})
    for name in ("signals", "custom_data"):
        if name in fields:
            body[name] = fields[name]
    status, answer = await post(gateway, body)
    assert status == 403, answer
    assert answer == {"errors": {"class": error_class, "invalid_data": text}}

    call = stored_call(fields)
    with pytest.raises(PermanentError) as failed:
        await step(events.call_submitted(call), context(settings, configured_db, topics, call))
    assert (failed.value.failure_class, failed.value.message) == (error_class, text)


async def test_valid_call_passes_with_names_in_any_case(
    configured_db: Any, settings: Settings, topics: Topics,  # noqa: F811
) -> None:
    call = call_doc(language_code="en-us", recording_auth_config_id="7",
                    signals=[{"name": "free trial", "value": True}],
                    custom_data=[{"name": "CHANNEL", "value": "web"}])
    result = await step(events.call_submitted(call), context(settings, configured_db, topics,
                                                             call))
    assert result.next_event == {"recording_url": call["recording_url"],
                                 "recording_auth_config_id": "7",
                                 "call_direction": "inbound"}


async def test_unknown_call_is_recorded_from_the_event(
    configured_db: Any, settings: Settings, topics: Topics,  # noqa: F811
) -> None:
    call = call_doc()
    result = await step(events.call_submitted(call), context(settings, configured_db, topics,
                                                             None))
    assert result.next_event is not None
    stored = await configured_db.calls.find_one({"_id": call["_id"]})
    assert stored is not None and stored["status"] == "received"
    assert stored["history"][0]["stage"] == "replay-intake"


async def test_disabled_and_unknown_networks_fail_permanently(
    configured_db: Any, settings: Settings, topics: Topics,  # noqa: F811
) -> None:
    for network_id, error_class in (("2002", "UnauthorizedOperation"),
                                    ("5005", "UnknownNetwork")):
        call = call_doc(network_id=network_id)
        with pytest.raises(PermanentError) as failed:
            await step(events.call_submitted(call), context(settings, configured_db, topics,
                                                            call))
        assert failed.value.failure_class == error_class
