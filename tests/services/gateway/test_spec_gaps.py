"""Spec conformance gaps of issue 12 point 6, on the real gateway (Kafka, FerretDB)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.services.gateway.test_gateway_api import Client, assert_error, call_body, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


@pytest.mark.parametrize(("campaign", "message"), [
    (91, "campaign must be for external calls only"),
    ("92", "campaign must have transcription enabled"),
    (999, "campaign not found"),
])
async def test_campaign_and_field_errors_come_back_together(
    gateway: Client, campaign: Any, message: str
) -> None:
    body = call_body("gap-both", advertiser_campaign_id_from_network=campaign,
                     call_direction="sideways")
    del body["call"]["recording_url"]
    status, answer = await post(gateway, body)
    text = assert_error(status, answer, 403, "RecordInvalid")
    assert text == (f"Validation failed: 'call.advertiser_campaign_id_from_network' {message}, "
                    "'call.call_direction' must be inbound or outbound, "
                    "'call.recording_url' is required")
    # Alone, the campaign's problem keeps its own class (the spec's examples).
    status, answer = await post(gateway, call_body("gap-alone",
                                                   advertiser_campaign_id_from_network=campaign))
    assert assert_error(status, answer, 403, "call.advertiser_campaign_id_from_network") == message


async def test_recording_url_up_to_8192_characters(gateway: Client) -> None:
    base = "https://bucket.s3.amazonaws.com/call.wav?X-Amz-Security-Token="
    url = base + "A" * (8192 - len(base))
    status, answer = await post(gateway, call_body("gap-url", recording_url=url))
    assert status == 201, answer
    status, answer = await post(gateway, call_body("gap-url-long", recording_url=url + "A"))
    assert "'call.recording_url' must be at most 8192 characters" in assert_error(
        status, answer, 403, "RecordInvalid")


@pytest.mark.parametrize("number", [-2165388265, "-2165388265", " -8779257383"])
async def test_negative_phone_numbers_are_refused(gateway: Client, number: Any) -> None:
    status, answer = await post(gateway, call_body("gap-phone", destination_phone_number=number))
    assert "'call.destination_phone_number'" in assert_error(status, answer, 403, "RecordInvalid")


@pytest.mark.parametrize("start_time", [
    "１４６０４０４８００",  # full-width epoch seconds
    "١٤٦٠٤٠٤٨٠٠",  # Arabic-Indic epoch seconds
    "۱۴۶۰۴۰۴۸۰۰",  # extended Arabic-Indic
    "２０１６/04/11T13:00:00.000-07:00",
    "2016/04/11 1٣:00:00 PM",
    "2016-02-03 09:30:0０",
    "20160411200000０００",
])
async def test_timestamp_digits_must_be_ascii(gateway: Client, start_time: str) -> None:
    status, answer = await post(gateway, call_body("gap-time", start_time=start_time))
    text = assert_error(status, answer, 403, "RecordInvalid")
    assert text == "Validation failed: 'call.start_time' is not a supported timestamp format"


async def test_optional_fields_given_empty_or_null_are_not_given(gateway: Client) -> None:
    """The optional fields sent as "" or null (as many clients send "none"): the network's
    language, no auth config, no signals or custom data; a null call is a call not passed."""
    body = call_body("gap-empty", language_code="", recording_auth_config_id=" ")
    body["signals"], body["custom_data"] = None, None
    status, answer = await post(gateway, body)
    assert status == 201, answer
    resp = await gateway.get(f"/api/2022-03-01/calls/{answer['cuid']}.json",
                             headers={"Authorization": f"Bearer {body['oauth_token']}"})
    view = await resp.json()
    assert (view["language_code"], view["signals"], view["custom_data"]) == ("en-US", [], [])
    status, answer = await post(gateway, {"call": None, "oauth_token": body["oauth_token"]})
    assert assert_error(status, answer, 403, "RecordInvalid") == "Validation failed: 'call' is required"


async def test_a_custom_data_number_out_of_range_is_refused(gateway: Client) -> None:
    """1e400 is valid JSON that reads as infinity: refused, not stored as "Infinity"."""
    body = json.dumps(call_body("gap-inf")).replace(
        '"oauth_token"', '"custom_data": [{"name": "channel", "value": 1e400}], "oauth_token"')
    status, answer = await post(gateway, body)
    assert assert_error(status, answer, 403, "RecordInvalid") == (
        "Validation failed: 'custom_data[0].value' must be a finite number")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/my call.wav", "http://127.0.0.1:8000/call.wav?q=a b",
    "http://127.0.0.1:8000/ca\tll.wav", "http://127.0.0.1:8000\\@10.0.0.1/call.wav",
])
async def test_a_recording_url_with_spaces_controls_or_backslashes_is_refused(
    gateway: Client, url: str
) -> None:
    """Not a URL as RFC 3986 writes one; sent as is, a server reads it otherwise (a raw space
    in the request line is a 400), and parsers disagree on a backslash: refused at submission."""
    status, answer = await post(gateway, call_body("gap-space", recording_url=url))
    assert assert_error(status, answer, 403, "RecordInvalid") == (
        "Validation failed: 'call.recording_url' must not contain spaces, control characters or "
        "backslashes (percent-encode them)")


@pytest.mark.parametrize(("url", "why"), [
    ("http://0.0.0.0/call.wav", "0.0.0.0: unspecified or 'this network' address"),
    ("http://[::]/call.wav", "[::]: unspecified address"),
    ("http://10.0.0.1/call.wav?sig=SECRET", "10.0.0.1: private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254: cloud metadata address"),
    ("http://%zz/call.wav", "%zz: not a valid host name"),
    (f"http://{'a' * 300}.example/call.wav", f"{'a' * 300}.example: not a valid host name"),
])
async def test_a_recording_url_the_fetcher_always_refuses_is_refused_at_submission(
    gateway: Client, url: str, why: str
) -> None:
    """Refused on every deployment (loopback alone is the deployment's choice): a 403 now, not a
    201 and a failed call with a CSM email a moment later. Nothing is connected to."""
    status, answer = await post(gateway, call_body("gap-refused", recording_url=url))
    message = assert_error(status, answer, 403, "RecordInvalid")
    assert message == f"Validation failed: 'call.recording_url' is refused: {why}"
    assert "SECRET" not in message
