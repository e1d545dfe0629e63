"""The JSON log formatter scrubs credentials in every form a request can carry them."""

from __future__ import annotations

import logging
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callingest.logging import JsonFormatter

FORMS = [
    "Authorization: Bearer {s}",
    'Authorization: Bearer "{s}"',
    "Authorization: Token token={s}",
    'Authorization: Token token="{s}"',
    "Authorization: Token token='{s}'",
    "{{'Authorization': 'Token token=\"{s}\"'}}",
    '{{"oauth_token": "{s}"}}',
    "oauth_token='{s}'",
    'token="{s}"',
    "api_key: '{s}'",
    "GET /api/2022-03-01/calls.json?oauth_token={s} HTTP/1.1",
    "b'Token token=\"{s}\" and more'",
    "fetching http://127.0.0.1:8000/a.wav#{s} failed",
    "GET /api/2022-03-01/calls/c1.json#{s} HTTP/1.1",
]


def formatted(message: str) -> str:
    record = logging.makeLogRecord({"msg": message, "levelno": logging.ERROR, "levelname": "ERROR"})
    return JsonFormatter("test").format(record)


@pytest.mark.parametrize("form", FORMS)
def test_a_credential_in_any_quoting_is_scrubbed(form: str) -> None:
    line = formatted("Error handling request: " + form.format(s="SCRUBTESTSECRET123"))
    assert "SCRUBTESTSECRET123" not in line
    assert "Error handling request" in line


@given(st.sampled_from(FORMS), st.text(string.ascii_letters + string.digits + "-._~+/", min_size=8))
def test_no_credential_survives_the_formatter(form: str, secret: str) -> None:
    assert secret not in formatted(form.format(s=secret))
