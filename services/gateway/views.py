"""HTTP views of the gateway: read the request, call the service, answer.

Views raise :class:`~services.gateway.errors.ApiError`; the error middleware
renders every refusal as the spec's errors body.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import hdrs, web
from botocore.exceptions import ClientError

from callingest.callview import call_view
from services.gateway import keys, listing
from services.gateway.auth import request_token
from services.gateway.domain import Principal
from services.gateway.errors import (
    InvalidApiVersion,
    NotAuthorized,
    NotFound,
    PayloadTooLarge,
    RecordInvalid,
    UnsupportedMediaType,
)
from services.gateway.listing import CallQuery

API_VERSION = "2022-03-01"
MAX_BODY_BYTES = 1024 * 1024
RECORDING_CHUNK_BYTES = 64 * 1024


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class DuplicateKey(ValueError):
    """A JSON object names the same key twice (ambiguous: parsers disagree on which wins)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKey("duplicate key")
    return obj


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: 415 for a non-JSON content type, 413 over 1 MiB,
    403 RecordInvalid when undecodable, unparseable, not an object, or naming a key twice in an object.
    An empty body is ``{}``."""
    if hdrs.CONTENT_TYPE in request.headers:
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise UnsupportedMediaType("Send the request body as application/json.")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge("The request body is larger than 1 MiB.")
    try:
        raw = await request.read()
    except web.RequestPayloadError:  # a body its Content-Encoding (gzip, deflate) cannot decode
        raise RecordInvalid(["the request body cannot be decoded as its Content-Encoding says"]) from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except DuplicateKey:
        raise RecordInvalid(["the request body has an object with a duplicate key"]) from None
    except (ValueError, RecursionError):
        raise RecordInvalid(["the request body is not valid JSON"]) from None
    if not isinstance(body, dict):
        raise RecordInvalid(["the request body must be a JSON object"])
    return body


async def _principal(request: web.Request, body: dict[str, Any] | None = None) -> Principal:
    """The token's principal; unknown tokens count against the source address (429 past a
    limit). A request without a token is 401 and not counted: it guesses nothing, and a
    client that forgot its header must not lock out its address's other clients."""
    authenticator = request.app[keys.AUTHENTICATOR]
    token = request_token(request, body)
    if token is None:
        return await authenticator.authenticate(None)  # raises NotAuthorized
    throttle = request.app[keys.AUTH_THROTTLE]
    address = throttle.address_of(request)
    throttle.check(address)
    try:
        return await authenticator.authenticate(token)
    except NotAuthorized:
        throttle.record_failure(address)
        raise


async def submit_call(request: web.Request) -> web.Response:
    """POST|PUT /api/2022-03-01/calls.json: 201 {cuid} when created, 202 {cuid} when known."""
    body = await read_json_object(request)
    principal = await _principal(request, body)
    submission = await request.app[keys.CALL_SERVICE].submit(principal, body)
    return web.json_response({"cuid": submission.cuid}, status=201 if submission.created else 202)


async def other_api_version(request: web.Request) -> web.Response:
    """Any route under another API version: 400."""
    raise InvalidApiVersion(
        f"Invalid API version {request.match_info['version']!r} for this route; "
        f"use /api/{API_VERSION}/calls.json."
    )


async def _visible_call(request: web.Request) -> dict[str, Any]:
    principal = await _principal(request)
    service = request.app[keys.CALL_SERVICE]
    await service.network_of(principal)
    call = await service.find(principal, request.match_info["cuid"])
    if call is None:
        raise NotFound("No such call.")
    return call


async def get_call(request: web.Request) -> web.Response:
    """GET /api/2022-03-01/calls/{cuid}.json: the call and its processing state."""
    call = await _visible_call(request)
    return web.json_response(call_view(call))


async def list_calls(request: web.Request) -> web.Response:
    """GET /api/2022-03-01/calls.json: the token's calls, newest first, one page."""
    principal = await _principal(request)
    await request.app[keys.CALL_SERVICE].network_of(principal)
    query = CallQuery.parse(request.query)
    calls, next_cursor = await listing.list_calls(request.app[keys.DB].calls, principal, query)
    return web.json_response({"calls": [call_view(c) for c in calls], "next_cursor": next_cursor})


async def retry_call(request: web.Request) -> web.Response:
    """POST /api/2022-03-01/calls/{cuid}/retry.json: a failed call resumes from the failed stage."""
    principal = await _principal(request)
    service = request.app[keys.CALL_SERVICE]
    await service.network_of(principal)
    restarted = await service.retry(principal, request.match_info["cuid"])
    return web.json_response({"cuid": restarted.cuid, "status": restarted.status}, status=202)


async def get_recording(request: web.Request) -> web.StreamResponse:
    """GET /api/2022-03-01/calls/{cuid}/recording.wav: the normalized WAV; 404 until normalized."""
    call = await _visible_call(request)
    recording = call.get("recording") or {}
    if not recording.get("key"):
        raise NotFound("The call has no normalized recording yet.")
    try:
        obj = await request.app[keys.S3_CLIENT].get_object(
            Bucket=recording.get("bucket") or request.app[keys.SETTINGS].s3_bucket,
            Key=recording["key"],
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise NotFound("The call's recording is not stored.") from None
        raise
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "audio/wav",
            hdrs.CONTENT_LENGTH: str(obj["ContentLength"]),
            hdrs.CONTENT_DISPOSITION: f'inline; filename="{call["_id"]}.wav"',
        }
    )
    await response.prepare(request)
    async with obj["Body"] as stream:
        while chunk := await stream.read(RECORDING_CHUNK_BYTES):
            await response.write(chunk)
    await response.write_eof()
    return response


async def openapi(request: web.Request) -> web.Response:
    """GET /api/2022-03-01/openapi.json."""
    return web.json_response(request.app[keys.OPENAPI])
