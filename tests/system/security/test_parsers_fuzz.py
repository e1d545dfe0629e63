"""Hypothesis tests for the parsers the gateway suite does not already fuzz.

Already covered elsewhere (not repeated): start_time and phone numbers fail only with
FieldError (tests/services/gateway/test_gateway_parsing.py), IP spellings and refusals
(tests/services/fetcher/test_ssrf.py, parametrized), random bytes as audio
(tests/services/normalizer/test_audioformat.py). Here: the whole submission body, signal values,
the token's place in a request, Avro decoding of foreign or corrupted bytes, IPv4
spellings, URL redaction, Retry-After, format sniffing.
"""

from __future__ import annotations

import ipaddress
import string
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from callingest import avro, events
from callingest.audioformat import FORMATS, sniff_format
from callingest.config_file import NetworkSettings as Network
from callingest.ssrf import AddressPolicy, AddressRefused, parse_ip_host
from services.fetcher.pacing import retry_after_seconds
from services.fetcher.urls import redact_url
from services.gateway.auth import request_token
from services.gateway.errors import RecordInvalid
from services.gateway.models import ValidationContext
from services.gateway.parsing import FieldError, parse_signal_value
from services.gateway.validation import validate_submission
from tests.helpers import call_doc

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) \
    | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=20)

NETWORK = Network.from_document({
    "_id": "1001", "timezone": "America/Los_Angeles", "call_ingestion_enabled": True,
    "signals": ["Sale", "Quote"], "custom_data_fields": ["channel"],
    "recording_auth_configs": [{"id": 7, "method": "bearer_header", "token": "t"}]})
FIELDS = {
    "external_call_unique_id": st.one_of(json_values, st.text(min_size=1, max_size=300)),
    "start_time": st.one_of(json_values, st.sampled_from(
        ["2016-02-03 09:30:00 AM", "1459281600", "2016-08-08 11:03:31 -0700"])),
    "destination_phone_number": st.one_of(json_values, st.just(2165388265)),
    "calling_phone_number": st.one_of(json_values, st.just("+18779257383")),
    "advertiser_campaign_id_from_network": st.one_of(json_values, st.just(85)),
    "call_direction": st.one_of(json_values, st.sampled_from(["inbound", "outbound"])),
    "recording_url": st.one_of(json_values, st.just("https://rec.example.com/a.wav?sig=SECRET")),
    "recording_auth_config_id": json_values,
    "language_code": json_values,
}
calls = st.fixed_dictionaries({}, optional=FIELDS)
bodies = st.fixed_dictionaries({}, optional={
    "call": st.one_of(calls, json_values),
    "signals": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["Sale", "sale", "Nope", ""]), "value": json_values}),
        max_size=5)),
    "custom_data": json_values,
    "oauth_token": json_values,
})


@FUZZ
@given(bodies)
def test_submission_body_is_accepted_or_refused_with_record_invalid(body: dict[str, Any]) -> None:
    try:
        call = validate_submission(body, ValidationContext(NETWORK))
    except RecordInvalid as exc:
        assert str(exc).startswith("Validation failed: ")
        assert "SECRET" not in str(exc)  # the recording URL's query string is never echoed
        return
    assert call.destination_phone_number.startswith("+")
    assert call.call_direction in ("inbound", "outbound")


@FUZZ
@given(json_values)
def test_signal_value_is_a_bool_or_field_error(value: Any) -> None:
    try:
        parsed = parse_signal_value(value)
    except FieldError:
        return
    assert isinstance(parsed, bool)
    if isinstance(value, str):
        assert value.strip().lower() in {"true", "yes", "1", "false", "no", "0"}


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@FUZZ
@given(header=header_text, query=st.text(max_size=20), body=json_values)
def test_token_is_taken_only_from_where_the_request_put_it(header: str, query: str,
                                                            body: Any) -> None:
    path = f"/api/2022-03-01/calls.json?oauth_token={quote(query, safe='')}" if query else "/"
    request = make_mocked_request("POST", path, headers={"Authorization": header})
    token = request_token(request, body if isinstance(body, dict) else None)
    if token is None:
        return
    assert token and (token in header or token == query
                      or (isinstance(body, dict) and token == body.get("oauth_token")))


valid_events = st.builds(lambda: avro.encode("CallSubmitted", events.call_submitted(call_doc())))


@FUZZ
@given(st.binary(max_size=300))
def test_foreign_bytes_never_decode_as_events(data: bytes) -> None:
    try:
        avro.decode(data)
    except avro.UndecodableMessage:
        return
    raise AssertionError("random bytes decoded")


@FUZZ
@given(valid_events, st.data())
def test_corrupted_events_decode_or_are_refused(encoded: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(encoded)))
    flips = data.draw(st.lists(st.tuples(st.integers(10, len(encoded) - 1), st.integers(1, 255)),
                               max_size=4))
    mutated = bytearray(encoded[:cut] if data.draw(st.booleans()) else encoded)
    for pos, xor in flips:
        if pos < len(mutated):
            mutated[pos] ^= xor
    try:
        name, record = avro.decode(bytes(mutated))
    except avro.UndecodableMessage:
        return
    assert name == "CallSubmitted" and isinstance(record, dict)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.sampled_from(["dec", "hex", "oct", "dotted", "two"]))
def test_every_ipv4_spelling_is_the_same_address(number: int, form: str) -> None:
    address = ipaddress.IPv4Address(number)
    a, b, c, d = address.packed
    host = {"dec": str(number), "hex": hex(number), "oct": "0" + oct(number)[2:],
            "dotted": f"{a:#x}.{b:#o}.{c}.{d}".replace("0o", "0"),
            "two": f"{a}.{number & 0xFFFFFF}"}[form]
    assert parse_ip_host(host) == address
    if not address.is_global or address.is_multicast:
        assert AddressPolicy().refusal(address) is not None


@FUZZ
@given(st.text(max_size=40))
def test_ip_host_parser_answers_or_refuses(host: str) -> None:
    try:
        parse_ip_host(host)
    except AddressRefused:
        pass


@FUZZ
@given(st.text(string.ascii_letters + string.digits + "-._~%/", max_size=30),
       st.text(string.ascii_letters + string.digits, min_size=8, max_size=30))
def test_redacted_url_never_shows_query_parameters_or_credentials(path: str, secret: str) -> None:
    assume(secret not in path and "rec.example.com" not in secret)
    for url in (f"https://rec.example.com/{path}?sig={secret}",
                f"https://user:{secret}@rec.example.com/{path}",
                f"http://127.0.0.1:8/{path}#{secret}",
                f"https://rec.example.com/{path};jsessionid={secret}/a.wav"):
        assert secret not in redact_url(url)


@FUZZ
@given(st.text(max_size=40))
def test_any_text_redacts_without_raising(text: str) -> None:
    assert isinstance(redact_url(text), str)


@FUZZ
@given(st.one_of(st.text(max_size=40), st.integers(0, 10**6).map(str)))
def test_retry_after_is_none_or_non_negative_seconds(value: str) -> None:
    seconds = retry_after_seconds(value)
    assert seconds is None or seconds >= 0


@FUZZ
@given(st.binary(max_size=64))
def test_sniffed_format_is_none_or_a_known_format(data: bytes) -> None:
    assert sniff_format(data) in (None, *FORMATS)


@pytest.mark.parametrize("value", ["NaN", "Infinity", float("nan"), float("inf")])
def test_non_finite_numbers_are_not_signal_values(value: Any) -> None:
    with pytest.raises(FieldError):
        parse_signal_value(value)
