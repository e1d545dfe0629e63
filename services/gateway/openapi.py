"""The OpenAPI 3.1 document of the gateway, generated from the pydantic models.

The request fields that the models accept in several JSON forms (an identifier as a
string or an integer, a timestamp in any of the spec's formats) are described in their
canonical string form with a named ``format`` (:data:`REQUEST_FORMATS`), so that a
client or a fuzzer generating from the document can produce acceptable values; their
descriptions still list every accepted form. ``links`` lead from a submission's
``cuid`` to the call, its recording, its retry and a resubmission.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from callingest.callview import CallView
from services.gateway.listing import DEFAULT_LIMIT, MAX_LIMIT, STATUSES
from services.gateway.models import (
    MAX_ID_LENGTH,
    MAX_URL_LENGTH,
    CallCreated,
    CallSubmission,
    ErrorResponse,
)

API_VERSION = "2022-03-01"
REF = "#/components/schemas/{model}"

EARLIEST_EPOCH_SECONDS = 1_000_000_000  # the first 10-digit epoch second (2001-09-09)
INTEGERS_TOO = " A JSON integer is accepted as well (the 2022-03-01 spec's examples)."
# Canonical forms of request fields: (schema object, properties) -> replacement schema.
REQUEST_FORMATS: dict[tuple[str, str], dict[str, Any]] = {
    ("CallIn", "external_call_unique_id"): {
        "type": "string", "format": "external-call-unique-id", "minLength": 1,
        "maxLength": MAX_ID_LENGTH, "pattern": r"\S"},
    ("CallIn", "destination_phone_number"): {"type": "string", "format": "phone-number"},
    ("CallIn", "calling_phone_number"): {"type": "string", "format": "phone-number"},
    ("CallIn", "advertiser_campaign_id_from_network"): {
        "type": "string", "format": "campaign-id-from-network", "minLength": 1,
        "maxLength": MAX_ID_LENGTH},
    ("CallIn", "recording_url"): {"type": "string", "format": "recording-url", "minLength": 1,
                                  "maxLength": MAX_URL_LENGTH},
    ("CallIn", "recording_auth_config_id"): {
        "anyOf": [{"type": "string", "format": "recording-auth-config-id"}, {"type": "null"}]},
    ("SignalIn", "name"): {"type": "string", "format": "signal-name"},
    ("SignalIn", "value"): {"anyOf": [
        {"type": "boolean"}, {"enum": [0, 1]},
        {"enum": ["true", "false", "yes", "no", "1", "0", "TRUE", "FALSE", "Yes", "No"]},
        {"type": "null"}]},
    ("CustomDatumIn", "name"): {"type": "string", "format": "custom-data-field"},
    ("CallSubmission", "oauth_token"): {
        "anyOf": [{"type": "string", "format": "api-token"}, {"type": "null"}]},
}


class CallList(BaseModel):
    """GET /api/2022-03-01/calls.json."""

    calls: list[CallView]
    next_cursor: str | None = Field(description="Pass as ``cursor`` for the next page; null on the last.")


class RetryAccepted(BaseModel):
    """202 answer of POST /api/2022-03-01/calls/{cuid}/retry.json."""

    cuid: str
    status: Literal["received", "validated", "fetched"] = Field(
        description="The status the call resumes from (the one before the stage that failed).")


_ERROR_STATUSES = {
    "400": "Invalid API version for the route, or a bad query parameter",
    "401": "Invalid or missing oauth token",
    "403": "Permission, campaign configuration or validation error (RecordInvalid)",
    "404": "No such call (or recording not normalized yet)",
    "409": "external_call_unique_id already used with other content (of a call that has not "
    "failed; for a call being processed again after a retry or correction, the message names "
    "its cuid and status, to a token that may see it), or a retry of a call that is not failed, "
    "or a retry or correction of a failed call that another one restarted first",
    "413": "Body larger than 1 MiB",
    "415": "Body not application/json",
    "429": "Too many invalid tokens from this address; retry after the Retry-After seconds",
    "503": "Kafka or MongoDB unavailable; retry after the Retry-After seconds",
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: {"description": _ERROR_STATUSES[s], "content": _json("ErrorResponse")} for s in statuses}


_CUID = {"cuid": "$response.body#/cuid"}
_CALL_LINKS = {
    "GetCall": {"operationId": "getCall", "parameters": _CUID,
                "description": "The call and its processing state"},
    "GetRecording": {"operationId": "getRecording", "parameters": _CUID,
                     "description": "Its normalized recording (404 until normalized)"},
    "RetryCall": {"operationId": "retryCall", "parameters": _CUID,
                  "description": "Process it again if it failed (409 otherwise)"},
    "ResubmitCall": {"operationId": "submitCallPut", "requestBody": "$request.body",
                     "description": "Submit it again (202 when the content is the same; a "
                     "failed call with corrected content is processed again, 201)"},
}


def _canonical_request_forms(definitions: dict[str, Any]) -> None:
    """Describe the request fields in their canonical form (see the module docstring)."""
    for (model, name), schema in REQUEST_FORMATS.items():
        prop = definitions[model]["properties"][name]
        kept = {k: v for k, v in prop.items() if k in ("title", "description", "default", "examples")}
        if {"type": "integer"} in prop.get("anyOf", []) and "description" in kept:
            kept["description"] += INTEGERS_TOO
        kept.pop("examples", None)
        prop.clear()
        prop.update({**schema, **kept})
    start = definitions["CallIn"]["properties"]["start_time"]
    start["anyOf"] = [
        {"type": "string", "format": "call-start-time"},
        # 10-digit epoch seconds up to when this document was built (always acceptable).
        {"type": "integer", "minimum": EARLIEST_EPOCH_SECONDS, "maximum": int(time.time())},
    ]
    definitions["CallIn"]["properties"]["external_call_unique_id"]["examples"] = ["100002"]
    for name in ("destination_phone_number", "calling_phone_number"):
        definitions["CallIn"]["properties"][name]["examples"] = ["+18885551212", "8779257383"]
    definitions["CallIn"]["properties"]["advertiser_campaign_id_from_network"]["examples"] = ["85"]


def build_openapi(server_url: str) -> dict[str, Any]:
    """The document served at GET /api/2022-03-01/openapi.json."""
    _, schemas = models_json_schema(
        [
            (CallSubmission, "validation"),
            (CallCreated, "serialization"),
            (ErrorResponse, "serialization"),
            (CallView, "serialization"),
            (CallList, "serialization"),
            (RetryAccepted, "serialization"),
        ],
        ref_template=REF,
    )
    definitions = schemas["$defs"]
    _canonical_request_forms(definitions)
    submit = {
        "summary": "Submit a call",
        "description": "Token in the body (oauth_token), the query string or the Authorization "
        "header. Every validation problem is reported in one RecordInvalid message. "
        "Resubmitting a call whose processing failed, with the same external_call_unique_id and "
        "changed content, replaces its content and processes it again from the start (201, "
        "same cuid); an identical resubmission is 202 and changes nothing.",
        "requestBody": {"required": True, "content": _json("CallSubmission")},
        "responses": {
            "201": {"description": "Call created (or a failed call corrected)",
                    "content": _json("CallCreated"), "links": _CALL_LINKS},
            "202": {
                "description": "Call already received (same content)",
                "content": _json("CallCreated"), "links": _CALL_LINKS,
            },
            **_errors("400", "401", "403", "409", "413", "415", "429", "503"),
        },
    }
    cuid = {"name": "cuid", "in": "path", "required": True, "schema": {"type": "string"}}
    list_parameters = [
        {"name": "status", "in": "query", "required": False,
         "schema": {"type": "string", "enum": list(STATUSES)}},
        {"name": "since", "in": "query", "required": False,
         "description": "Calls received at or after this time (ISO 8601; UTC when zone-less).",
         "schema": {"type": "string", "format": "date-time"}},
        {"name": "until", "in": "query", "required": False,
         "description": "Calls received at or before this time (ISO 8601; UTC when zone-less).",
         "schema": {"type": "string", "format": "date-time"}},
        {"name": "external_call_unique_id", "in": "query", "required": False,
         "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}},
        {"name": "cursor", "in": "query", "required": False,
         "description": "The next_cursor of the previous page (opaque).",
         "schema": {"type": "string"}},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Call Ingestion API", "version": API_VERSION},
        "servers": [{"url": server_url}],
        "components": {
            "schemas": definitions,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "tokenHeader": {
                    "type": "apiKey", "in": "header", "name": "Authorization",
                    "description": "The whole header value: Token token=<token>",
                },
                "queryToken": {"type": "apiKey", "in": "query", "name": "oauth_token"},
            },
        },
        # A submission may also carry the token in its body (oauth_token, described there).
        "security": [{"bearer": []}, {"tokenHeader": []}, {"queryToken": []}],
        "paths": {
            f"/api/{API_VERSION}/calls.json": {
                "post": {**submit, "operationId": "submitCall"},
                "put": {**submit, "operationId": "submitCallPut"},
                "get": {
                    "summary": "The token's calls, newest first (by received time), one page",
                    "description": "A scoped token sees only its advertisers' calls. Follow "
                    "next_cursor until it is null; calls received meanwhile never shift a page.",
                    "operationId": "listCalls",
                    "parameters": list_parameters,
                    "responses": {
                        "200": {"description": "A page of calls", "content": _json("CallList")},
                        **_errors("400", "401", "403", "429"),
                    },
                },
            },
            f"/api/{API_VERSION}/calls/{{cuid}}/retry.json": {
                "post": {
                    "summary": "Process a failed call again from the stage that failed",
                    "operationId": "retryCall",
                    "parameters": [cuid],
                    "responses": {
                        "202": {"description": "The call is being processed again",
                                "content": _json("RetryAccepted")},
                        **_errors("401", "403", "404", "409", "429", "503"),
                    },
                }
            },
            f"/api/{API_VERSION}/calls/{{cuid}}.json": {
                "get": {
                    "summary": "A call and its processing state",
                    "operationId": "getCall",
                    "parameters": [cuid],
                    "responses": {
                        "200": {"description": "The call", "content": _json("CallView")},
                        **_errors("401", "403", "404", "429"),
                    },
                }
            },
            f"/api/{API_VERSION}/calls/{{cuid}}/recording.wav": {
                "get": {
                    "summary": "The normalized recording (8 kHz, 16-bit PCM, 2 channels)",
                    "operationId": "getRecording",
                    "parameters": [cuid],
                    "responses": {
                        "200": {
                            "description": "WAV",
                            "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        **_errors("401", "403", "404", "429"),
                    },
                }
            },
        },
    }
