"""The OpenAPI 3.1 document of the gateway, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from callingest.callview import CallView
from services.gateway.models import CallCreated, CallSubmission, ErrorResponse

API_VERSION = "2022-03-01"
REF = "#/components/schemas/{model}"

_ERROR_STATUSES = {
    "400": "Invalid API version for the route",
    "401": "Invalid or missing oauth token",
    "403": "Permission, campaign configuration or validation error (RecordInvalid)",
    "404": "No such call (or recording not normalized yet)",
    "409": "external_call_unique_id already used with other content",
    "413": "Body larger than 1 MiB",
    "415": "Body not application/json",
    "429": "Too many invalid tokens from this address; retry after the Retry-After seconds",
    "503": "Kafka or MongoDB unavailable; retry after the Retry-After seconds",
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: {"description": _ERROR_STATUSES[s], "content": _json("ErrorResponse")} for s in statuses}


def build_openapi(server_url: str) -> dict[str, Any]:
    """The document served at GET /api/2022-03-01/openapi.json."""
    _, schemas = models_json_schema(
        [
            (CallSubmission, "validation"),
            (CallCreated, "serialization"),
            (ErrorResponse, "serialization"),
            (CallView, "serialization"),
        ],
        ref_template=REF,
    )
    submit = {
        "summary": "Submit a call",
        "description": "Token in the body (oauth_token), the query string or the Authorization "
        "header. Every validation problem is reported in one RecordInvalid message.",
        "requestBody": {"required": True, "content": _json("CallSubmission")},
        "responses": {
            "201": {"description": "Call created", "content": _json("CallCreated")},
            "202": {
                "description": "Call already received (same content)",
                "content": _json("CallCreated"),
            },
            **_errors("400", "401", "403", "409", "413", "415", "429", "503"),
        },
    }
    cuid = {"name": "cuid", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Call Ingestion API", "version": API_VERSION},
        "servers": [{"url": server_url}],
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "oauth_token"},
            },
        },
        "security": [{"bearer": []}, {"queryToken": []}],
        "paths": {
            f"/api/{API_VERSION}/calls.json": {
                "post": {**submit, "operationId": "submitCall"},
                "put": {**submit, "operationId": "submitCallPut"},
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
