"""S3 access through aiobotocore (any S3-compatible store: AWS, versitygw, MinIO)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from callingest.settings import Settings


@asynccontextmanager
async def s3_client(settings: Settings) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for the configured endpoint and credentials.

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
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
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


async def ensure_bucket(client: Any, bucket: str) -> bool:
    """Create ``bucket`` if it is missing; returns True if it was created. Idempotent."""
    try:
        await client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        await client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou", "BucketAlreadyExists"
        ):
            raise
        return False
    return True


async def object_exists(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None if it does not exist."""
    try:
        head: dict[str, Any] = await client.head_object(Bucket=bucket, Key=key)
        return head
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
