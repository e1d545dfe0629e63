"""S3 access through aiobotocore (any S3-compatible store: AWS, versitygw, MinIO).

The one place that talks to the object store for the stages:

* :func:`upload` streams chunks into an object: one PUT when the whole body is at most
  :data:`PART_SIZE`, otherwise a multipart upload that is aborted on any failure (of the
  store or of the source). Memory stays at about two parts whatever the object's size.
* :func:`head` is an object's HEAD response, or None when it does not exist.
* :func:`download_to_file` streams an object into a local file, one chunk in memory.
* Every failure of the store itself becomes a
  :class:`~callingest.errors.TransientError` ``ObjectStoreUnavailable`` (botocore has
  already retried); "not found" is recognised by one set of codes, :data:`NOT_FOUND_CODES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from callingest.errors import TransientError
from callingest.settings import Settings

#: Size of each multipart-upload part, and the largest object stored with one PUT.
PART_SIZE: Final = 8 * 1024 * 1024
#: Error codes by which S3-compatible stores say "no such object / bucket" (a HEAD has no
#: body, so only its status, "404", is seen there).
NOT_FOUND_CODES: Final = frozenset({"404", "NotFound", "NoSuchKey", "NoSuchBucket"})
_DOWNLOAD_CHUNK: Final = 1024 * 1024
#: Failures of a call to the store (aiohttp's connection errors are OSErrors too).
_STORE_FAILURES: Final = (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError)


class ObjectMissing(Exception):
    """The object (or its bucket) does not exist."""


def sign_payload(endpoint_url: str | None) -> bool:
    """Whether request bodies are hashed into the signature (SigV4 ``x-amz-content-sha256``).

    Not over TLS (the provider's default endpoint, or any ``https://`` one) nor to a loopback
    address: there the transport already protects the body, and the SHA-256 of every byte
    stored - once by us, once more by the store to check it - is a large part of what a
    transfer costs (docs/benchmarks.md, "Where each core-millisecond goes"). Only a plain
    ``http://`` endpoint on another host keeps the signed payload. The headers are signed
    in every case."""
    if not endpoint_url:
        return False
    parts = urlsplit(endpoint_url)
    if parts.scheme.lower() == "https":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


@asynccontextmanager
async def s3_client(settings: Settings, signed_payload: bool | None = None) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for the configured endpoint and credentials.

    ``signed_payload``: hash request bodies into the signature or not; None (the services):
    as :func:`sign_payload` decides for the endpoint.

    ``S3_ENDPOINT_URL`` unset or empty: the provider's default endpoint for ``S3_REGION``.
    ``S3_USE_IAM_ROLE=true``: no static keys; botocore's credential chain finds the role
    (IRSA's web identity token, an instance profile, ECS task credentials).
    """
    session = get_session()
    config = AioConfig(
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        # Path style for S3-compatible stores on a custom endpoint; AWS's own: its default.
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto",
            "payload_signing_enabled": sign_payload(settings.s3_endpoint_url)
            if signed_payload is None else signed_payload},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    keys: dict[str, str] = {}
    if not settings.s3_use_iam_role:
        keys = {"aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
                "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value()}
    async with session.create_client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        config=config,
        **keys,
    ) as client:
        yield client


def error_code(exc: ClientError) -> str:
    """The store's error code of ``exc`` ("error" when it gave none)."""
    return str(exc.response.get("Error", {}).get("Code") or "error")


def is_not_found(exc: BaseException) -> bool:
    """Whether ``exc`` is the store saying the object or its bucket does not exist."""
    return isinstance(exc, ClientError) and error_code(exc) in NOT_FOUND_CODES


def store_error(operation: str, exc: BaseException) -> TransientError:
    """The transient failure for a failed store call; the text names no key or secret."""
    detail = error_code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    return TransientError(f"object store unavailable ({operation}: {detail})",
                          "ObjectStoreUnavailable")


async def _call(operation: str, method: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
    try:
        return await method(**kwargs)
    except _STORE_FAILURES as exc:
        raise store_error(operation, exc) from None


async def ensure_bucket(client: Any, bucket: str) -> bool:
    """Create ``bucket`` if it is missing; returns True if it was created. Idempotent."""
    try:
        await client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if not is_not_found(exc):
            raise
    try:
        await client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
        return False
    return True


async def head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None if it does not exist; TransientError if the
    store fails."""
    try:
        response: dict[str, Any] = await client.head_object(Bucket=bucket, Key=key)
        return response
    except _STORE_FAILURES as exc:
        if is_not_found(exc):
            return None
        raise store_error("head_object", exc) from None


async def read_range(client: Any, bucket: str, key: str, first: int, last: int) -> bytes:
    """Bytes ``first``..``last`` (inclusive) of an object; TransientError if the store fails."""
    try:
        obj = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={first}-{last}")
        async with obj["Body"] as body:
            data: bytes = await body.read()
            return data
    except _STORE_FAILURES as exc:
        raise store_error("get_object", exc) from None


async def download_to_file(client: Any, bucket: str, key: str, path: str) -> int:
    """Stream ``s3://bucket/key`` into the file ``path``; returns the number of bytes.

    Raises :class:`ObjectMissing` if there is no such object, TransientError if the store
    fails, and OSError (as raised) if the local file cannot be written.
    """
    try:
        obj = await client.get_object(Bucket=bucket, Key=key)
    except _STORE_FAILURES as exc:
        if is_not_found(exc):
            raise ObjectMissing(f"s3://{bucket}/{key}") from None
        raise store_error("get_object", exc) from None
    size = 0
    f = await asyncio.to_thread(open, path, "wb")
    try:
        async with obj["Body"] as body:
            while True:
                try:
                    chunk = await body.read(_DOWNLOAD_CHUNK)
                except _STORE_FAILURES as exc:
                    raise store_error("get_object body", exc) from None
                if not chunk:
                    return size
                size += len(chunk)
                await asyncio.to_thread(f.write, chunk)
    finally:
        await asyncio.to_thread(f.close)


async def upload(
    client: Any,
    bucket: str,
    key: str,
    chunks: AsyncIterable[bytes],
    *,
    attributes: Callable[[], Mapping[str, Any]],
) -> int:
    """Stream ``chunks`` into ``s3://bucket/key``; returns the number of bytes stored.

    ``attributes()`` gives the extra arguments of the object's creation (``ContentType``,
    ``Metadata``); it is called once, when the first part is full or ``chunks`` ended, so a
    caller may decide them from the first bytes it passed through. A body of at most
    :data:`PART_SIZE` bytes is one PUT; a larger one is a multipart upload, aborted if
    anything fails - the store (TransientError) or ``chunks`` (its exception, as raised).
    Nothing is visible under ``key`` unless the whole body was stored.
    """
    buffer = bytearray()
    total = 0
    upload_id: str | None = None
    parts: list[dict[str, Any]] = []

    async def send_part(body: bytes) -> None:
        assert upload_id is not None
        number = len(parts) + 1
        response = await _call("upload_part", client.upload_part, Bucket=bucket, Key=key,
                               UploadId=upload_id, PartNumber=number, Body=body)
        parts.append({"PartNumber": number, "ETag": response["ETag"]})

    try:
        async for chunk in chunks:
            total += len(chunk)
            buffer += chunk
            while len(buffer) > PART_SIZE:
                if upload_id is None:
                    created = await _call("create_multipart_upload",
                                          client.create_multipart_upload, Bucket=bucket,
                                          Key=key, **attributes())
                    upload_id = str(created["UploadId"])
                part = bytes(buffer[:PART_SIZE])
                del buffer[:PART_SIZE]
                await send_part(part)
        if upload_id is None:
            await _call("put_object", client.put_object, Bucket=bucket, Key=key,
                        Body=buffer, **attributes())  # no copy: botocore takes a bytearray
            return total
        if buffer:
            await send_part(bytes(buffer))
            buffer.clear()
        await _call("complete_multipart_upload", client.complete_multipart_upload,
                    Bucket=bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts})
        upload_id = None
        return total
    finally:
        if upload_id is not None:
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
