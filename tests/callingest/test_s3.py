"""callingest.s3 against the real S3 store: one PUT or multipart, abort, head, download,
and every store failure as one transient error."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callingest import s3
from callingest.errors import TransientError
from callingest.settings import Settings
from tests.helpers import parts_count

pytestmark = pytest.mark.s3


@pytest.fixture
async def key(s3_client: Any, settings: Settings) -> AsyncIterator[str]:
    name = f"test-s3/{uuid.uuid4().hex}"
    yield name
    listing = await s3_client.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=name)
    for upload in listing.get("Uploads", []):
        await s3_client.abort_multipart_upload(Bucket=settings.s3_bucket, Key=upload["Key"],
                                               UploadId=upload["UploadId"])
    await s3_client.delete_object(Bucket=settings.s3_bucket, Key=name)


async def chunks_of(data: bytes, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def attributes() -> dict[str, Any]:
    return {"ContentType": "audio/wav", "Metadata": {"format": "wav"}}


async def test_small_object_is_one_put(s3_client: Any, settings: Settings, key: str,
                                       tmp_path: Path) -> None:
    data = os.urandom(300_000)
    assert await s3.upload(s3_client, settings.s3_bucket, key, chunks_of(data, 70_000),
                           attributes=attributes) == len(data)
    head = await s3.head(s3_client, settings.s3_bucket, key)
    assert head is not None
    assert await parts_count(s3_client, settings.s3_bucket, key) == 1
    assert head["Metadata"] == {"format": "wav"}
    assert head["ContentType"] == "audio/wav"
    path = tmp_path / "copy"
    assert await s3.download_to_file(s3_client, settings.s3_bucket, key, str(path)) == len(data)
    assert path.read_bytes() == data


@pytest.mark.slow
async def test_large_object_is_multipart(s3_client: Any, settings: Settings, key: str,
                                         tmp_path: Path) -> None:
    data = os.urandom(2 * s3.PART_SIZE + 12_345)
    await s3.upload(s3_client, settings.s3_bucket, key, chunks_of(data), attributes=attributes)
    head = await s3.head(s3_client, settings.s3_bucket, key)
    assert head is not None and await parts_count(s3_client, settings.s3_bucket, key) == 3
    assert head["Metadata"] == {"format": "wav"}
    path = tmp_path / "copy"
    await s3.download_to_file(s3_client, settings.s3_bucket, key, str(path))
    assert path.read_bytes() == data


async def test_failing_source_aborts_the_multipart_upload(s3_client: Any, settings: Settings,
                                                          key: str) -> None:
    class SourceBroke(Exception):
        pass

    async def breaking() -> AsyncIterator[bytes]:
        yield os.urandom(s3.PART_SIZE + 1)  # the first part goes out
        raise SourceBroke()

    with pytest.raises(SourceBroke):
        await s3.upload(s3_client, settings.s3_bucket, key, breaking(), attributes=attributes)
    listing = await s3_client.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=key)
    assert listing.get("Uploads", []) == []
    assert await s3.head(s3_client, settings.s3_bucket, key) is None


async def test_missing_object(s3_client: Any, settings: Settings, key: str,
                              tmp_path: Path) -> None:
    assert await s3.head(s3_client, settings.s3_bucket, key) is None
    with pytest.raises(s3.ObjectMissing):
        await s3.download_to_file(s3_client, settings.s3_bucket, key, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


async def test_store_failures_are_transient(s3_client: Any, key: str, tmp_path: Path) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    with pytest.raises(TransientError) as put:
        await s3.upload(s3_client, bucket, key, chunks_of(b"RIFF"), attributes=attributes)
    assert put.value.failure_class == "ObjectStoreUnavailable"
    assert put.value.message == "object store unavailable (put_object: NoSuchBucket)"
    with pytest.raises(TransientError) as multipart:
        await s3.upload(s3_client, bucket, key, chunks_of(os.urandom(s3.PART_SIZE + 1)),
                        attributes=attributes)
    assert multipart.value.message == (
        "object store unavailable (create_multipart_upload: NoSuchBucket)")
    with pytest.raises(TransientError):
        await s3.read_range(s3_client, bucket, key, 0, 15)


async def test_bodies_to_a_loopback_store_are_not_hashed_into_the_signature(
        s3_client: Any, settings: Settings, key: str) -> None:
    """Over loopback (and TLS) the body's SHA-256 is not computed - by us, or by the store to
    check it: UNSIGNED-PAYLOAD. The store still authenticates the signed headers."""
    sent: list[dict[str, bytes]] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append(dict(request.headers))  # values as sent: bytes

    s3_client.meta.events.register("before-send.s3.PutObject", capture)
    try:
        await s3.upload(s3_client, settings.s3_bucket, key, chunks_of(os.urandom(100_000)),
                        attributes=attributes)
    finally:
        s3_client.meta.events.unregister("before-send.s3.PutObject", capture)
    assert [h["X-Amz-Content-SHA256"] for h in sent] == [b"UNSIGNED-PAYLOAD"]
    assert (await s3.head(s3_client, settings.s3_bucket, key) or {})["ContentLength"] == 100_000


@pytest.mark.parametrize(("endpoint", "signed"), [
    (None, False),  # the provider's default endpoint: https
    ("https://s3.example.com", False),
    ("http://127.0.0.1:9000", False),
    ("http://localhost:9000", False),
    ("http://[::1]:9000", False),
    ("http://10.0.0.5:9000", True),  # plain http across a network: the body stays signed
    ("http://minio.storage:9000", True),
])
def test_payload_signed_only_over_plain_http_to_another_host(endpoint: str | None,
                                                             signed: bool) -> None:
    assert s3.sign_payload(endpoint) is signed


async def test_wrong_secret_is_still_refused_with_unsigned_payload(settings: Settings,
                                                                   key: str) -> None:
    from pydantic import SecretStr

    wrong = settings.model_copy(update={"s3_secret_access_key": SecretStr("not-the-secret")})
    async with s3.s3_client(wrong) as client:
        with pytest.raises(TransientError):
            await s3.upload(client, settings.s3_bucket, key, chunks_of(b"RIFF" + bytes(100)),
                            attributes=attributes)
