"""Pydantic models of the Call Ingestion API 2022-03-01: request, responses, call view.

The request models validate and normalize in one pass, given a
:class:`ValidationContext` (the token's network) through pydantic's validation
context; :func:`validate_submission` turns every problem pydantic collected
into one ``RecordInvalid`` message. The same models generate the OpenAPI
document (``services.gateway.openapi``), so the document cannot drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from callingest.callview import format_utc
from callingest.rules import LANGUAGE_CODES
from services.gateway.domain import Network
from services.gateway.errors import RecordInvalid
from services.gateway.parsing import (
    FieldError,
    normalize_phone_number,
    parse_signal_value,
    parse_start_time,
)

MAX_ID_LENGTH = 255
MAX_URL_LENGTH = 2048
MAX_NAME_LENGTH = 255
MAX_CUSTOM_VALUE_LENGTH = 1024
MAX_LIST_ITEMS = 100


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs besides the request: the network and the S3 buckets granted to us."""

    network: Network
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


def _identifier(value: Any) -> str:
    value = _required(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _problem("must be a string or an integer")
    text = str(value).strip()
    if len(text) > MAX_ID_LENGTH:
        raise _problem(f"must be at most {MAX_ID_LENGTH} characters")
    return text


def _start_time(value: Any, info: ValidationInfo) -> datetime:
    try:
        return parse_start_time(_required(value), _context(info).network.timezone)
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


def _recording_url(value: Any, info: ValidationInfo) -> str:
    value = _required(value)
    if not isinstance(value, str):
        raise _problem("must be a string")
    url = value.strip()
    if len(url) > MAX_URL_LENGTH:
        raise _problem(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise _problem("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and host:
        return url
    if scheme == "s3":
        if parts.netloc in _context(info).allowed_s3_buckets and parts.path.strip("/"):
            return url
        raise _problem("names an S3 bucket the platform has not been granted")
    raise _problem("must be an http or https URL")


def _language_code(value: Any, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    network = _context(info).network
    if not isinstance(value, str):
        raise _problem("must be a string")
    canonical = {code.casefold(): code for code in LANGUAGE_CODES}.get(value.strip().casefold())
    if canonical is None:
        raise _problem("must be one of " + " ".join(LANGUAGE_CODES))
    if not network.multi_language_enabled and canonical != network.default_language_code:
        raise _problem(
            f"must be {network.default_language_code}: "
            "multiple language processing is not enabled for the network"
        )
    return canonical


def _recording_auth_config_id(value: Any, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    config_id = _identifier(value)
    if config_id not in _context(info).network.recording_auth_config_ids:
        raise _problem("does not name a recording auth config of the network")
    return config_id


def _configured_name(value: Any, configured: dict[str, str], what: str) -> str:
    """The configured spelling of the name ``value`` (matched case-insensitively)."""
    value = _required(value)
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH:
        raise _problem("must be a string")
    name = configured.get(value.strip().casefold())
    if name is None:
        raise _problem(f"is not a {what} configured for the network")
    return name


def _signal_name(value: Any, info: ValidationInfo) -> str:
    return _configured_name(value, _context(info).network.signals, "signal")


def _signal_value(value: Any) -> bool:
    try:
        return parse_signal_value(value)
    except FieldError as exc:
        raise _problem(str(exc)) from None


def _custom_data_name(value: Any, info: ValidationInfo) -> str:
    return _configured_name(value, _context(info).network.custom_data_fields, "custom data field")


def _custom_data_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _problem("must be a string or a number")
    text = value if isinstance(value, str) else json.dumps(value)
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
        json_schema_input_type=Literal["en-US", "en-GB", "es-ES", "fr-FR"] | None,
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


# --------------------------------------------------------------------------- validation


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
        """sha256 of the canonical JSON; equal for resubmissions that differ only in form."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
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
        return f"'{path}' {error['msg']}" if path else error["msg"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
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
        signals=tuple(sorted((s.name, s.value) for s in submission.signals)),
        custom_data=tuple(sorted((d.name, d.value) for d in submission.custom_data)),
    )
