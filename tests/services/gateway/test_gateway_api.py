"""The Call Ingestion API on real Kafka, FerretDB and S3: the spec's examples, every status."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callingest.kafka import event_id
from tests.conftest import wait_until
from tests.helpers import demo_call
from tests.services.gateway.conftest import (
    ADVERTISER_TOKEN,
    DISABLED_TOKEN,
    NETWORK_TOKEN,
    OTHER_NETWORK_TOKEN,
    RECORDING_URL,
    EventReader,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

Client = TestClient[Any, Any]
URL = "/api/2022-03-01/calls.json"

# The request bodies of the spec, verbatim; only the two placeholders are filled in.
SPEC_REQUIRED_FIELDS = """
{
  "call": {
    "external_call_unique_id": "100002",
    "start_time": "2016-02-03 09:30:00 AM",
    "destination_phone_number": 2165388265,
    "calling_phone_number": 8779257383,
    "advertiser_campaign_id_from_network": 85,
    "call_direction": "inbound",
    "recording_url": "<CALL RECORDING URL>"
  },
  "oauth_token": "<YOUR OAUTH TOKEN>"
}
"""
SPEC_ALL_FIELDS = """
{
  "call": {
    "external_call_unique_id": "123ABC",
    "start_time": "2016-08-08 11:03:31 -0700",
    "destination_phone_number": 9093900003,
    "calling_phone_number": 8779257383,
    "advertiser_campaign_id_from_network": 85,
    "call_direction": "inbound",
    "recording_url": "<CALL RECORDING URL>"
  },
  "signals": [
    {
      "name": "sale",
      "value": 1
    },
    {
      "name": "quote",
      "value": 1
    }
  ],
  "custom_data": [
    {
      "name": "channel",
      "value": "Paid Search"
    },
    {
      "name": "line_of_business",
      "value": "Social"
    }
  ],
  "oauth_token": "<YOUR OAUTH TOKEN>"
}
"""
SPEC_CURL_QUERY_TOKEN = """
{
  "call": {
    "external_call_unique_id": "10002",
    "start_time": "2022-03-25 09:31:29",
    "destination_phone_number": 9093900003,
    "calling_phone_number": 8779257384,
    "advertiser_campaign_id_from_network": 86,
    "call_direction": "inbound",
    "recording_url": "<CALL RECORDING URL>"
  }
}"""
SPEC_CURL_BODY_TOKEN = """
{
  "call": {
    "external_call_unique_id": "10001",
    "start_time": "2022-03-25 09:31:29",
    "destination_phone_number": 9093900003,
    "calling_phone_number": 8779257384,
    "advertiser_campaign_id_from_network": 86,
    "call_direction": "inbound",
    "recording_url": "<CALL RECORDING URL>"
  },
  "oauth_token": "<oauth_token>"
}"""


def fill(text: str, token: str = NETWORK_TOKEN) -> str:
    return (
        text.replace("<CALL RECORDING URL>", RECORDING_URL)
        .replace("<YOUR OAUTH TOKEN>", token)
        .replace("<oauth_token>", token)
    )


def call_body(external_id: str = "ext-1", **overrides: Any) -> dict[str, Any]:
    call = demo_call(external_id, **{
        "recording_url": RECORDING_URL,
        "start_time": "2016/04/11T13:00:00.000-07:00",
        "destination_phone_number": "+18885551212",
        **overrides,
    })
    return {"call": call, "oauth_token": NETWORK_TOKEN}


async def post(client: Client, body: Any, **kwargs: Any) -> tuple[int, Any]:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    resp = await client.post(URL, data=data, headers=headers, **kwargs)
    return resp.status, await resp.json(content_type=None)


async def get_call(client: Client, cuid: str, token: str = NETWORK_TOKEN) -> tuple[int, Any]:
    resp = await client.get(
        f"/api/2022-03-01/calls/{cuid}.json", headers={"Authorization": f"Bearer {token}"}
    )
    return resp.status, await resp.json(content_type=None)


def assert_error(status: int, body: Any, expected_status: int, error_class: str) -> str:
    assert status == expected_status, body
    assert set(body) == {"errors"} and set(body["errors"]) == {"class", "invalid_data"}, body
    assert body["errors"]["class"] == error_class, body
    return str(body["errors"]["invalid_data"])


# --------------------------------------------------------------------------- spec examples


async def test_spec_example_with_required_fields(gateway: Client, read_events: EventReader) -> None:
    status, body = await post(gateway, fill(SPEC_REQUIRED_FIELDS))
    assert status == 201 and set(body) == {"cuid"}
    status, call = await get_call(gateway, body["cuid"])
    assert status == 200
    assert call["cuid"] == body["cuid"]
    assert call["external_call_unique_id"] == "100002"
    assert call["status"] == "received"
    assert call["start_time"] == "2016-02-03T17:30:00.000Z"  # 09:30 PST
    assert call["destination_phone_number"] == "+12165388265"
    assert call["calling_phone_number"] == "+18779257383"
    assert call["call_direction"] == "inbound"
    assert call["language_code"] == "en-US"
    assert call["signals"] == [] and call["custom_data"] == []
    assert call["history"][0]["stage"] == "gateway"
    events = await read_events(expected=1)
    assert len(events) == 1
    event = events[0]
    assert event["cuid"] == body["cuid"]
    assert str(event["event_id"]) == event_id(body["cuid"], "gateway", 1)
    assert event["network_id"] == "1001"
    assert event["advertiser_campaign_id_from_network"] == "85"
    assert event["calling_phone_number"] == "+18779257383"
    assert event["recording_url"] == RECORDING_URL
    assert event["start_time"].isoformat() == "2016-02-03T17:30:00+00:00"


async def test_spec_example_with_all_fields(gateway: Client, read_events: EventReader) -> None:
    status, body = await post(gateway, fill(SPEC_ALL_FIELDS))
    assert status == 201, body
    _, call = await get_call(gateway, body["cuid"])
    assert call["start_time"] == "2016-08-08T18:03:31.000Z"
    assert call["destination_phone_number"] == "+19093900003"
    # In the order submitted (names as configured), not sorted.
    assert call["signals"] == [{"name": "Sale", "value": True}, {"name": "Quote", "value": True}]
    assert call["custom_data"] == [
        {"name": "channel", "value": "Paid Search"},
        {"name": "line_of_business", "value": "Social"},
    ]
    (event,) = await read_events(expected=1)
    assert [s["name"] for s in event["signals"]] == ["Sale", "Quote"]
    # The same content in another order is the same call: 202, nothing changes.
    again = json.loads(fill(SPEC_ALL_FIELDS))
    again["signals"].reverse()
    again["custom_data"].reverse()
    status, answer = await post(gateway, again)
    assert (status, answer) == (202, {"cuid": body["cuid"]})
    assert (await get_call(gateway, body["cuid"]))[1]["signals"][0]["name"] == "Sale"
    assert {(c["name"], c["value"]) for c in event["custom_data"]} == {
        ("channel", "Paid Search"),
        ("line_of_business", "Social"),
    }


async def test_spec_curl_examples(gateway: Client) -> None:
    resp = await gateway.post(
        f"{URL}?oauth_token={NETWORK_TOKEN}",
        data=fill(SPEC_CURL_QUERY_TOKEN),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 201, await resp.text()
    query_cuid = (await resp.json())["cuid"]
    status, body = await post(gateway, fill(SPEC_CURL_BODY_TOKEN))
    assert status == 201, body
    assert body["cuid"] != query_cuid
    _, call = await get_call(gateway, body["cuid"])
    assert call["start_time"] == "2022-03-25T16:31:29.000Z"  # 09:31:29 PDT


async def test_put_behaves_like_post(gateway: Client) -> None:
    body = call_body("put-1")
    resp = await gateway.put(URL, json=body)
    assert resp.status == 201
    cuid = (await resp.json())["cuid"]
    status, again = await post(gateway, body)
    assert (status, again["cuid"]) == (202, cuid)


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("form", ["body", "query", "bearer", "token_header", "token_header_quoted",
                                  "token_header_options"])
async def test_every_token_form_is_accepted(gateway: Client, form: str) -> None:
    body = call_body(f"auth-{form}")
    del body["oauth_token"]
    headers: dict[str, str] = {}
    url = URL
    if form == "body":
        body["oauth_token"] = NETWORK_TOKEN
    elif form == "query":
        url = f"{URL}?oauth_token={NETWORK_TOKEN}"
    elif form == "bearer":
        headers["Authorization"] = f"Bearer {NETWORK_TOKEN}"
    elif form == "token_header":
        headers["Authorization"] = f"Token token={NETWORK_TOKEN}"
    elif form == "token_header_quoted":
        headers["Authorization"] = f'Token token="{NETWORK_TOKEN}"'
    else:  # options after the token, as Rails' token scheme allows: ignored
        headers["Authorization"] = f'Token token="{NETWORK_TOKEN}", realm="calls"; nonce=x1'
    resp = await gateway.post(url, json=body, headers=headers)
    assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("token", [None, "", "no-such-token", NETWORK_TOKEN.upper()])
async def test_missing_or_unknown_token_is_401(gateway: Client, token: str | None) -> None:
    body = call_body("auth-bad")
    body["oauth_token"] = token
    status, answer = await post(gateway, body)
    assert_error(status, answer, 401, "NotAuthorized")
    resp = await gateway.get(
        "/api/2022-03-01/calls/whatever.json", headers={"Authorization": f"Bearer {token}"}
    )
    assert_error(resp.status, await resp.json(), 401, "NotAuthorized")


async def test_tokens_never_reach_a_log(gateway: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await post(gateway, call_body("log-1"))
    await post(gateway, {**call_body("log-2"), "oauth_token": "secret-unknown-token"})
    text = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert NETWORK_TOKEN not in text and "secret-unknown-token" not in text


# --------------------------------------------------------------------------- 400, 403


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/2021-01-01/calls.json"),
        ("PUT", "/api/2017-02-01/calls.json"),
        ("POST", "/api/v1/calls.json"),
        ("GET", "/api/2015-05-01/calls/abc.json"),
        ("POST", "/api/2020-10-01"),
        ("GET", "/api/2020-10-01/"),
    ],
)
async def test_other_api_versions_are_400(gateway: Client, method: str, path: str) -> None:
    resp = await gateway.request(method, path, json=call_body("v-1"))
    message = assert_error(resp.status, await resp.json(), 400, "InvalidApiVersion")
    assert "2022-03-01" in message


async def test_network_without_call_ingestion_is_403(gateway: Client) -> None:
    status, body = await post(gateway, {**call_body("perm-1"), "oauth_token": DISABLED_TOKEN})
    message = assert_error(status, body, 403, "UnauthorizedOperation")
    assert message == "You do not have permissions to perform the requested operation."


async def test_advertiser_token_with_another_advertisers_campaign_is_403(gateway: Client) -> None:
    body = {**call_body("adv-1", advertiser_campaign_id_from_network="90")}
    body["oauth_token"] = ADVERTISER_TOKEN
    status, answer = await post(gateway, body)
    message = assert_error(status, answer, 403, "UnauthorizedAdvertiser")
    assert message == "You do not have access to this advertiser"
    # A campaign nobody has is answered alike: the token cannot probe which ids exist.
    body["call"]["advertiser_campaign_id_from_network"] = "999"
    assert (await post(gateway, body)) == (status, answer)
    body["call"]["advertiser_campaign_id_from_network"] = "85"  # its own advertiser's campaign
    status, answer = await post(gateway, body)
    assert status == 201, answer


@pytest.mark.parametrize(
    ("campaign", "message"),
    [
        (91, "campaign must be for external calls only"),
        ("92", "campaign must have transcription enabled"),
        (999, "campaign not found"),
        ("300", "campaign not found"),  # a campaign of another network
    ],
)
async def test_campaign_configuration_errors(gateway: Client, campaign: Any, message: str) -> None:
    status, body = await post(
        gateway, call_body("camp", advertiser_campaign_id_from_network=campaign)
    )
    assert assert_error(status, body, 403, "call.advertiser_campaign_id_from_network") == message


async def test_missing_call_is_record_invalid(gateway: Client) -> None:
    status, body = await post(gateway, {"oauth_token": NETWORK_TOKEN})
    message = assert_error(status, body, 403, "RecordInvalid")
    assert message == "Validation failed: 'call' is required"


async def test_every_problem_is_named_in_one_message(gateway: Client) -> None:
    body = {
        "call": {
            "start_time": "yesterday",
            "destination_phone_number": "+11234567890",
            "calling_phone_number": 12,
            "advertiser_campaign_id_from_network": 85,
            "call_direction": "sideways",
            "recording_url": "ftp://example.invalid/x.wav",
            "language_code": "fr-FR",
            "recording_auth_config_id": 99,
            "unknown_field": "ignored",
        },
        "signals": [{"name": "Nope"}, {"name": "sale", "value": "maybe"}],
        "custom_data": [{"name": "unknown", "value": "x"}, {"name": "channel", "value": {"a": 1}}],
        "oauth_token": NETWORK_TOKEN,
    }
    status, answer = await post(gateway, body)
    message = assert_error(status, answer, 403, "RecordInvalid")
    assert message.startswith("Validation failed: ")
    for field in (
        "'call.external_call_unique_id' is required",
        "'call.start_time'",
        "'call.destination_phone_number'",
        "'call.calling_phone_number'",
        "'call.call_direction'",
        "'call.recording_url'",
        "'call.language_code'",
        "'call.recording_auth_config_id'",
        "'signals[0].name'",
        "'signals[1].value'",
        "'custom_data[0].name'",
        "'custom_data[1].value'",
    ):
        assert field in message, (field, message)
    assert "unknown_field" not in message


@pytest.mark.parametrize(
    "start_time", ["1999-12-31T23:59:59Z", "2099-01-01T00:00:00Z", "31/12/2020", 1460404800.5]
)
async def test_invalid_start_time_is_record_invalid(gateway: Client, start_time: Any) -> None:
    status, body = await post(gateway, call_body("st", start_time=start_time))
    assert "'call.start_time'" in assert_error(status, body, 403, "RecordInvalid")


async def test_language_codes(gateway: Client) -> None:
    status, body = await post(gateway, call_body("lang-1", language_code="en-US"))
    assert status == 201
    status, body = await post(gateway, call_body("lang-2", language_code="es-ES"))
    assert "'call.language_code'" in assert_error(status, body, 403, "RecordInvalid")
    status, body = await post(
        gateway,
        {
            **call_body("lang-3", language_code="fr-FR", advertiser_campaign_id_from_network="300"),
            "oauth_token": OTHER_NETWORK_TOKEN,
        },
    )
    assert status == 201, body
    _, call = await get_call(gateway, body["cuid"], OTHER_NETWORK_TOKEN)
    assert call["language_code"] == "fr-FR"


async def test_recording_auth_config_and_signal_values(gateway: Client) -> None:
    body = call_body("sig-1", recording_auth_config_id=7)
    body["signals"] = [
        {"name": "SALE", "value": "No"},
        {"name": "free trial"},
        {"name": "Quote", "value": 0},
    ]
    status, answer = await post(gateway, body)
    assert status == 201, answer
    _, call = await get_call(gateway, answer["cuid"])
    assert sorted((s["name"], s["value"]) for s in call["signals"]) == [
        ("Free Trial", True),
        ("Quote", False),
        ("Sale", False),
    ]


# --------------------------------------------------------------------------- bad input never 5xx


async def test_bad_bodies_are_4xx_with_errors_body(gateway: Client) -> None:
    auth = {"Authorization": f"Bearer {NETWORK_TOKEN}"}
    status, body = await post(gateway, "{not json", headers=auth)
    assert "not valid JSON" in assert_error(status, body, 403, "RecordInvalid")
    status, body = await post(gateway, "{not json")  # no token anywhere: still RecordInvalid
    assert_error(status, body, 403, "RecordInvalid")
    for non_object in ("[1, 2]", '"call"', "42", "null", '{"call": NaN}'):
        status, body = await post(gateway, non_object, headers=auth)
        assert_error(status, body, 403, "RecordInvalid")
    status, body = await post(gateway, '{"call": [1]}', headers=auth)
    assert "'call' must be an object" in assert_error(status, body, 403, "RecordInvalid")
    status, body = await post(gateway, b"\xff\xfe\x00garbage", headers=auth)
    assert_error(status, body, 403, "RecordInvalid")
    status, body = await post(gateway, "[" * 100_000 + "]" * 100_000, headers=auth)
    assert_error(status, body, 403, "RecordInvalid")

    resp = await gateway.post(URL, data="call=1", headers={"Content-Type": "text/plain", **auth})
    assert_error(resp.status, await resp.json(), 415, "UnsupportedMediaType")

    # A compressed body is read as its Content-Encoding says; one that does not decode is bad input.
    gzipped = {"Content-Type": "application/json", "Content-Encoding": "gzip", **auth}
    resp = await gateway.post(URL, data=gzip.compress(json.dumps(call_body("gz")).encode()),
                              headers=gzipped)
    assert resp.status == 201, await resp.text()
    for broken in (b"notgzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xffgarbage"):
        resp = await gateway.post(URL, data=broken, headers=gzipped)
        assert "Content-Encoding" in assert_error(resp.status, await resp.json(), 403, "RecordInvalid")

    huge = json.dumps({**call_body("big"), "padding": "x" * (1024 * 1024)})
    status, body = await post(gateway, huge)
    assert_error(status, body, 413, "PayloadTooLarge")

    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 100_000

    resp = await gateway.post(URL, data=chunks(), headers={"Content-Type": "application/json"})
    assert_error(resp.status, await resp.json(), 413, "PayloadTooLarge")

    resp = await gateway.delete(URL)
    assert_error(resp.status, await resp.json(), 405, "MethodNotAllowed")
    resp = await gateway.get("/api/2022-03-01/nothing-here")
    assert_error(resp.status, await resp.json(), 404, "NotFound")


# --------------------------------------------------------------------------- idempotency


async def test_same_content_is_202_other_content_is_409(
    gateway: Client, read_events: EventReader
) -> None:
    status, first = await post(gateway, call_body("idem-1"))
    assert status == 201
    # The same call in other forms: epoch start time, national phone number, string campaign id.
    same = call_body(
        "idem-1",
        start_time=1460404800,
        destination_phone_number=8885551212,
        advertiser_campaign_id_from_network="85",
    )
    status, second = await post(gateway, same)
    assert (status, second) == (202, first)
    status, body = await post(gateway, call_body("idem-1", call_direction="outbound"))
    assert_error(status, body, 409, "Conflict")
    # The id is per network: another network may use it.
    other = call_body("idem-1", advertiser_campaign_id_from_network="300")
    other["oauth_token"] = OTHER_NETWORK_TOKEN
    other["call"]["language_code"] = "es-ES"
    status, body = await post(gateway, other)
    assert status == 201 and body["cuid"] != first["cuid"]
    events = await read_events(expected=2)
    assert sorted(e["cuid"] for e in events) == sorted([first["cuid"], body["cuid"]])


@pytest.mark.slow
async def test_50_concurrent_identical_submissions(
    gateway: Client, configured_db: Any, read_events: EventReader
) -> None:
    body = call_body("race-1")
    answers = await asyncio.gather(*(post(gateway, body) for _ in range(50)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] + [202] * 49
    assert len({answer["cuid"] for _, answer in answers}) == 1
    assert await configured_db.calls.count_documents({"external_call_unique_id": "race-1"}) == 1
    events = await read_events(expected=1, settle=3.0)
    assert len(events) == 1


# --------------------------------------------------------------------------- timestamps, phones

SPEC_TIMESTAMPS = [
    (1460404800, "2016-04-11T20:00:00.000Z"),
    (1460404800000, "2016-04-11T20:00:00.000Z"),
    ("20160411130000000", "2016-04-11T13:00:00.000Z"),  # compressed: always UTC
    ("2016/04/11T23:00:00.000+03:00", "2016-04-11T20:00:00.000Z"),
    ("2016/04/11T13:00:00.000-07:00", "2016-04-11T20:00:00.000Z"),
    ("2016/04/11T20:00:00.000Z", "2016-04-11T20:00:00.000Z"),
    ("2016/04/11T13:00:00-07:00", "2016-04-11T20:00:00.000Z"),
    ("2016/04/11 13:00:00.000 PM", "2016-04-11T20:00:00.000Z"),
    ("2016/04/11 13:00:00 PM", "2016-04-11T20:00:00.000Z"),
]


async def test_every_spec_timestamp_example(gateway: Client) -> None:
    for i, (value, expected) in enumerate(SPEC_TIMESTAMPS):
        status, body = await post(gateway, call_body(f"ts-{i}", start_time=value))
        assert status == 201, (value, body)
        _, call = await get_call(gateway, body["cuid"])
        assert call["start_time"] == expected, value


async def test_phone_forms_are_stored_in_e164(gateway: Client) -> None:
    forms = [
        (2165388265, "+12165388265"),
        ("8779257383", "+18779257383"),
        ("+18885551212", "+18885551212"),
        ("+44 20 7183 8750", "+442071838750"),
        ("+34912345678", "+34912345678"),
    ]
    for i, (value, expected) in enumerate(forms):
        status, body = await post(
            gateway,
            call_body(f"ph-{i}", calling_phone_number=value, destination_phone_number=value),
        )
        assert status == 201, body
        _, call = await get_call(gateway, body["cuid"])
        assert call["calling_phone_number"] == call["destination_phone_number"] == expected


# --------------------------------------------------------------------------- reading calls


async def test_get_call_is_scoped_to_the_tokens_network_and_advertisers(gateway: Client) -> None:
    status, body = await post(
        gateway, call_body("scope-1", advertiser_campaign_id_from_network="90")
    )
    assert status == 201
    assert (await get_call(gateway, body["cuid"]))[0] == 200
    status, answer = await get_call(gateway, body["cuid"], OTHER_NETWORK_TOKEN)
    assert_error(status, answer, 404, "NotFound")
    status, answer = await get_call(gateway, body["cuid"], ADVERTISER_TOKEN)  # adv-1 only
    assert_error(status, answer, 404, "NotFound")
    status, answer = await get_call(gateway, "no-such-cuid")
    assert_error(status, answer, 404, "NotFound")
    status, answer = await get_call(gateway, body["cuid"], DISABLED_TOKEN)
    assert_error(status, answer, 403, "UnauthorizedOperation")


async def test_openapi_document_is_generated_from_the_models(gateway: Client) -> None:
    resp = await gateway.get("/api/2022-03-01/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert set(paths["/api/2022-03-01/calls.json"]) == {"post", "put", "get"}
    assert "/api/2022-03-01/calls/{cuid}.json" in paths
    assert "/api/2022-03-01/calls/{cuid}/recording.wav" in paths
    assert set(paths["/api/2022-03-01/calls/{cuid}/retry.json"]) == {"post"}
    # A submission's cuid links to the call, its recording, its retry and a resubmission.
    for status in ("201", "202"):
        links = paths["/api/2022-03-01/calls.json"]["post"]["responses"][status]["links"]
        assert {name: link["operationId"] for name, link in links.items()} == {
            "GetCall": "getCall", "GetRecording": "getRecording", "RetryCall": "retryCall",
            "ResubmitCall": "submitCallPut"}
        for name in ("GetCall", "GetRecording", "RetryCall"):
            assert links[name]["parameters"] == {"cuid": "$response.body#/cuid"}
    from callingest.callview import CallView
    from services.gateway.models import CallIn, CallSubmission

    schemas = doc["components"]["schemas"]
    assert set(schemas["CallIn"]["properties"]) == set(CallIn.model_fields)
    assert set(schemas["CallSubmission"]["properties"]) == set(CallSubmission.model_fields)
    assert set(schemas["CallView"]["properties"]) == set(CallView.model_fields)
    assert set(schemas["CallIn"]["required"]) == {
        "external_call_unique_id",
        "start_time",
        "destination_phone_number",
        "calling_phone_number",
        "advertiser_campaign_id_from_network",
        "call_direction",
        "recording_url",
    }
    # every way of giving the token the gateway accepts (the body's is CallSubmission.oauth_token)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer"}
    assert (schemes["tokenHeader"]["in"], schemes["tokenHeader"]["name"]) == ("header", "Authorization")
    assert (schemes["queryToken"]["in"], schemes["queryToken"]["name"]) == ("query", "oauth_token")
    assert doc["security"] == [{name: []} for name in schemes]


async def test_ops_endpoints_and_route_metrics(gateway: Client) -> None:
    assert (await gateway.get("/healthz")).status == 200

    async def ready() -> bool:  # the infrastructure check runs in the background
        return (await gateway.get("/readyz")).status == 200

    await wait_until(ready, timeout=20, what="/readyz 200")
    await post(gateway, call_body("metrics-1"))
    text = await (await gateway.get("/metrics")).text()
    assert 'route="/api/2022-03-01/calls.json"' in text
    assert "callingest_http_request_duration_seconds_bucket" in text
