"""Pydantic models of the Call Ingestion API 2022-03-01: request, responses, call view.

The request models validate and normalize in one pass, given a
:class:`ValidationContext` (the token's network) through pydantic's validation
context; :func:`services.gateway.validation.validate_submission` turns every problem
pydantic collected into one ``RecordInvalid`` message. The same models generate the OpenAPI
document (``services.gateway.openapi``), so the document cannot drift.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from callingest import rules, ssrf
from callingest.config_file import LanguageCode as LanguageCodes
from callingest.config_file import NetworkSettings
from callingest.mongo import UNSTORABLE_TEXT, storable
from services.gateway.parsing import (
    FieldError,
    normalize_phone_number,
    parse_signal_value,
    parse_start_time,
)

MAX_ID_LENGTH = 255
MAX_URL_LENGTH = 8192  # presigned URLs carrying session tokens pass 2,048
MAX_NAME_LENGTH = 255
MAX_CUSTOM_VALUE_LENGTH = 1024
MAX_LIST_ITEMS = 100


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs besides the request: the network and the S3 buckets granted to us."""

    network: NetworkSettings
    allowed_s3_buckets: frozenset[str] = field(default_factory=frozenset)


def _problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", message)


def _context(info: ValidationInfo) -> ValidationContext:
    ctx = info.context
    if not isinstance(ctx, ValidationContext):
        raise TypeError("validate with context=ValidationContext(...)")
    return ctx


def _required(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _problem("is required")
    return value


def _storable(text: str) -> str:
    if not storable(text):
        raise _problem(UNSTORABLE_TEXT)
    return text


def _identifier(value: Any) -> str:
    value = _required(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _problem("must be a string or an integer")
    text = _storable(str(value).strip())
    if len(text) > MAX_ID_LENGTH:
        raise _problem(f"must be at most {MAX_ID_LENGTH} characters")
    return text


def _start_time(value: Any, info: ValidationInfo) -> datetime:
    try:
        return parse_start_time(_required(value), _context(info).network.zone)
    except FieldError as exc:
        raise _problem(str(exc)) from None


def _phone_number(value: Any) -> str:
    try:
        return normalize_phone_number(_required(value))
    except FieldError as exc:
        raise _problem(str(exc)) from None


def _call_direction(value: Any) -> str:
    value = _required(value)
    if isinstance(value, str) and value.strip().lower() in ("inbound", "outbound"):
        return value.strip().lower()
    raise _problem("must be inbound or outbound")


# Loopback is a deployment's choice (the fetcher's ALLOW_LOOPBACK_RECORDINGS); every other
# refused address, and a host name no resolver can look up, is refused on every deployment.
ALWAYS_REFUSED = ssrf.AddressPolicy(allow_loopback=True)
_NOT_IN_URLS = re.compile(r"[\s\x00-\x1f\x7f\\]")


def _recording_url(value: Any, info: ValidationInfo) -> str:
    value = _required(value)
    if not isinstance(value, str):
        raise _problem("must be a string")
    url = _storable(value.strip())
    if len(url) > MAX_URL_LENGTH:
        raise _problem(f"must be at most {MAX_URL_LENGTH} characters")
    if _NOT_IN_URLS.search(url):  # RFC 3986 has none of them; parsers disagree on what they mean
        raise _problem("must not contain spaces, control characters or backslashes (percent-encode them)")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise _problem("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and host:
        try:  # what the fetcher refuses on every deployment, refused now rather than later
            ssrf.check_url(ssrf.url_as_given(url), ALWAYS_REFUSED)
        except ValueError:
            raise _problem("is not a valid URL") from None
        except ssrf.AddressRefused as exc:
            raise _problem(f"is refused: {exc}") from None
        return url
    if scheme == "s3":
        if parts.netloc in _context(info).allowed_s3_buckets and parts.path.strip("/"):
            return url
        raise _problem("names an S3 bucket the platform has not been granted")
    raise _problem("must be an http or https URL")


def _rule(rule: Any, value: str, info: ValidationInfo) -> str:
    """``rule`` of :mod:`callingest.rules` (the validator's too) applied to ``value``."""
    try:
        result: str = rule(_context(info).network, value)
    except rules.Violation as exc:
        raise _problem(exc.text) from None
    return result


def _absent(value: Any) -> bool:
    """An optional field not given: null, or a blank string (clients send "" for "none")."""
    return value is None or (isinstance(value, str) and not value.strip())


def _language_code(value: Any, info: ValidationInfo) -> str | None:
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise _problem("must be a string")
    return _rule(rules.language_code, _storable(value), info)


def _recording_auth_config_id(value: Any, info: ValidationInfo) -> str | None:
    if _absent(value):
        return None
    return _rule(rules.recording_auth_config_id, _identifier(value), info)


def _name(value: Any) -> str:
    value = _required(value)
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH:
        raise _problem("must be a string")
    return _storable(value)


def _signal_name(value: Any, info: ValidationInfo) -> str:
    return _rule(rules.signal_name, _name(value), info)


def _signal_value(value: Any) -> bool:
    try:
        return parse_signal_value(value)
    except FieldError as exc:
        raise _problem(str(exc)) from None


def _custom_data_name(value: Any, info: ValidationInfo) -> str:
    return _rule(rules.custom_data_name, _name(value), info)


def _custom_data_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _problem("must be a string or a number")
    if isinstance(value, float) and not math.isfinite(value):  # 1e400 reads as infinity
        raise _problem("must be a finite number")
    text = _storable(value) if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_CUSTOM_VALUE_LENGTH:
        raise _problem(f"must be at most {MAX_CUSTOM_VALUE_LENGTH} characters")
    return text


StringOrInteger = str | int

ExternalCallUniqueId = Annotated[
    str,
    PlainValidator(_identifier, json_schema_input_type=StringOrInteger),
    Field(description="Unique per network among externally submitted calls.", examples=["100002"]),
]
StartTime = Annotated[
    datetime,
    PlainValidator(_start_time, json_schema_input_type=StringOrInteger),
    Field(
        description=(
            "Epoch seconds (10 digits) or milliseconds (13 digits); compressed "
            "YYYYMMDDHHMMSSsss (UTC); ISO 8601 with offset or Z (YYYY/MM/DDTHH:MM:SS.sss+hh:mm, "
            "'-' or '/' separators, 'T' or space); Excel-compatible YYYY/MM/DD HH:MM:SS.sss AM/PM "
            "or zone-less YYYY-MM-DD HH:MM:SS in the network's timezone."
        ),
        examples=[1460404800, "2016/04/11T13:00:00.000-07:00", "2016/04/11 13:00:00 PM"],
    ),
]
PhoneNumber = Annotated[
    str,
    PlainValidator(_phone_number, json_schema_input_type=StringOrInteger),
    Field(
        description="E.164 (+country national number) or a 10-digit NANP number.",
        examples=["+18885551212", 8779257383],
    ),
]
CampaignIdFromNetwork = Annotated[
    str,
    PlainValidator(_identifier, json_schema_input_type=StringOrInteger),
    Field(description="The campaign's ID from network; must be ExternalOnly.", examples=[85]),
]
CallDirection = Annotated[
    Literal["inbound", "outbound"],
    PlainValidator(_call_direction, json_schema_input_type=Literal["inbound", "outbound"]),
]
RecordingUrl = Annotated[
    str,
    PlainValidator(_recording_url, json_schema_input_type=str),
    Field(description="http(s) URL of a WAV or MP3 recording.", max_length=MAX_URL_LENGTH),
]
LanguageCode = Annotated[
    str | None,
    PlainValidator(
        _language_code,
        json_schema_input_type=LanguageCodes | None,
    ),
    Field(description="Defaults to the network's default language code (en-US when unset)."),
]
RecordingAuthConfigId = Annotated[
    str | None,
    PlainValidator(_recording_auth_config_id, json_schema_input_type=StringOrInteger | None),
    Field(description="ID of a recording auth configuration of the network."),
]
SignalName = Annotated[
    str,
    PlainValidator(_signal_name, json_schema_input_type=str),
    Field(description="A signal configured for the network; matched case-insensitively."),
]
SignalValue = Annotated[
    bool,
    PlainValidator(_signal_value, json_schema_input_type=bool | Literal[0, 1] | str | None),
    Field(description="true/false, 1/0, 'true'/'false', 'yes'/'no' in any case; default true."),
]
CustomDataName = Annotated[
    str,
    PlainValidator(_custom_data_name, json_schema_input_type=str),
    Field(description="The Partner (API) name of a custom data field of the network."),
]
CustomDataValue = Annotated[
    str,
    PlainValidator(_custom_data_value, json_schema_input_type=str | int | float),
    Field(description="A string or a number (stored as a string)."),
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CallIn(_Lenient):
    """The ``call`` object of a submission."""

    external_call_unique_id: ExternalCallUniqueId
    start_time: StartTime
    destination_phone_number: PhoneNumber
    calling_phone_number: PhoneNumber
    advertiser_campaign_id_from_network: CampaignIdFromNetwork
    call_direction: CallDirection
    recording_url: RecordingUrl
    language_code: LanguageCode = None
    recording_auth_config_id: RecordingAuthConfigId = None


class SignalIn(_Lenient):
    """A signal of the call."""

    name: SignalName
    value: SignalValue = True


class CustomDatumIn(_Lenient):
    """A custom data value of the call."""

    name: CustomDataName
    value: CustomDataValue


class CallSubmission(_Lenient):
    """Body of POST/PUT /api/2022-03-01/calls.json."""

    call: CallIn
    signals: list[SignalIn] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    custom_data: list[CustomDatumIn] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    oauth_token: str | None = Field(
        None, description="API token; may instead be given in the query string or a header."
    )

    @field_validator("signals", "custom_data", mode="before")
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _unique_names(self) -> CallSubmission:
        for label, items in (("signals", self.signals), ("custom_data", self.custom_data)):
            names = [item.name for item in items]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise _problem(f"'{label}' names {' / '.join(repeated)} more than once")
        return self


class CallCreated(BaseModel):
    """201 and 202 answer."""

    cuid: str


class ErrorDetail(BaseModel):
    """The spec's error: a class and a human-readable message."""

    model_config = ConfigDict(populate_by_name=True)

    error_class: str = Field(alias="class", examples=["RecordInvalid"])
    invalid_data: str = Field(examples=["Validation failed: 'call' is required"])


class ErrorResponse(BaseModel):
    """Every non-2xx answer."""

    errors: ErrorDetail
