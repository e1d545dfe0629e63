"""The normalizer stage: RecordingFetched in, the house-format WAV in S3, RecordingNormalized out.

Wiring: :class:`NormalizerResources` (the type the stage graph names for the normalizer)
holds an aiobotocore S3 client and the :class:`~services.normalizer.pool.TranscodePool`;
:func:`step` reads them from ``ctx.resources``.

Per call: the raw object ``raw/<cuid>/<attempt>`` is streamed into a temp file, transcoded
in a worker process into a second temp file, and uploaded to ``normalized/<cuid>.wav``
(:func:`callingest.s3.upload`: multipart above one part); memory stays at about one part
whatever the duration.
The object's metadata records which attempt and which raw object it came from, and what
the transcoder measured, so a redelivery finds the work done and does not redo it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from callingest import metrics
from callingest import s3 as s3io
from callingest.errors import PermanentError, TransientError
from callingest.infra import Check, bucket_check
from callingest.logging import get_logger
from callingest.s3 import s3_client
from callingest.settings import Settings
from callingest.steps import Resources, StageContext, StepResult
from services.normalizer.pool import TranscodePool
from services.normalizer.transcode import RECORDING_FIELDS

log = get_logger(__name__)

STAGE = "normalizer"
_CONTENT_TYPE = "audio/wav"


def normalized_key(cuid: str) -> str:
    """The object key of a call's normalized recording (one per call; replays overwrite it)."""
    return f"normalized/{cuid}.wav"


@dataclass
class NormalizerResources(Resources):
    """What the normalizer's step uses, open for the life of the service."""

    s3: Any
    pool: TranscodePool

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[NormalizerResources]:
        pool = TranscodePool(settings.normalizer_workers)
        try:
            async with s3_client(settings) as s3:
                yield cls(s3=s3, pool=pool)
        finally:
            await asyncio.to_thread(pool.close)

    def checks(self, settings: Settings) -> list[Check]:
        return [bucket_check(self.s3, settings.s3_bucket)]


async def step(event: dict[str, Any], ctx: StageContext[NormalizerResources]) -> StepResult:
    """Normalize the recording of one call and describe it.

    Idempotent per (cuid, attempt): if ``normalized/<cuid>.wav`` already holds the output
    of this attempt from this raw object and call direction, it is reused as is.
    Raises PermanentError (``RecordingMissing``, or the transcoder's ``RecordingFormat``,
    ``RecordingEmpty``, ``RecordingCorrupt``, ``RecordingTooLong``) and TransientError
    (``ObjectStoreUnavailable``, ``NormalizerWorkerCrashed``, ``NormalizerDiskError``).
    """
    cuid = str(event["cuid"])
    attempt = int(event.get("attempt", 1))
    direction = str(event["call_direction"])
    src_bucket, src_key = str(event["bucket"]), str(event["key"])
    bucket = ctx.settings.s3_bucket
    key = normalized_key(cuid)
    s3 = ctx.resources.s3
    pool = ctx.resources.pool
    extra = {"cuid": cuid, "event_id": str(event.get("event_id")), "stage": STAGE}
    provenance = {"attempt": str(attempt), "source-key": src_key, "call-direction": direction}

    recording = await _already_normalized(s3, bucket, key, provenance)
    if recording is not None:
        log.info("normalized recording already stored, reused", extra={**extra, "key": key})
    else:
        async with pool.slot():
            workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="normalizer-")
            try:
                src_path = os.path.join(workdir, "raw")
                dst_path = os.path.join(workdir, "normalized.wav")
                await _download(s3, src_bucket, src_key, src_path)
                info = await pool.transcode(src_path, dst_path, direction)
                recording = info.recording_fields()
                metadata = {**provenance, "info": json.dumps(recording, separators=(",", ":"))}
                await _upload(s3, bucket, key, dst_path, metadata)
            finally:
                await asyncio.to_thread(shutil.rmtree, workdir, True)
        metrics.AUDIO_NORMALIZED.inc(info.duration_seconds)
        log.info(
            "recording normalized",
            extra={
                **extra,
                "key": key,
                "input_format": info.input_format,
                "input_codec": info.input_codec,
                "input_sample_rate": info.input_sample_rate,
                "duration_seconds": info.duration_seconds,
                "silent_channels": info.silent_channels,
                "decode_errors": info.decode_errors,
            },
        )
    described = {"bucket": bucket, "key": key, **recording}
    return StepResult(
        next_event=described,
        call_update={"recording": described},
    )


async def _already_normalized(
    s3: Any, bucket: str, key: str, provenance: dict[str, str]
) -> dict[str, Any] | None:
    """The stored measurements if ``key`` holds this attempt's output, else None."""
    head = await s3io.head(s3, bucket, key)
    if head is None:
        return None
    metadata = head.get("Metadata") or {}
    if any(metadata.get(name) != value for name, value in provenance.items()):
        return None
    try:
        stored = json.loads(metadata.get("info", ""))
    except ValueError:
        return None
    if not isinstance(stored, dict) or set(stored) != set(RECORDING_FIELDS):
        return None
    return stored


async def _download(s3: Any, bucket: str, key: str, path: str) -> None:
    """Stream ``s3://bucket/key`` into ``path``, one chunk in memory at a time."""
    try:
        await s3io.download_to_file(s3, bucket, key, path)
    except s3io.ObjectMissing:
        raise PermanentError(
            "RecordingMissing",
            f"the fetched recording s3://{bucket}/{key} is no longer in the object store; "
            "replay the call from the fetcher",
        ) from None
    except OSError as exc:
        raise _disk_error(exc) from None


async def _upload(s3: Any, bucket: str, key: str, path: str, metadata: dict[str, str]) -> None:
    """Upload ``path`` to ``s3://bucket/key`` (:func:`callingest.s3.upload`)."""
    f: BinaryIO = await _disk(open, path, "rb")

    async def parts() -> AsyncIterator[bytes]:
        while part := await _disk(f.read, s3io.PART_SIZE):
            yield part

    try:
        await s3io.upload(s3, bucket, key, parts(),
                          attributes=lambda: {"ContentType": _CONTENT_TYPE, "Metadata": metadata})
    finally:
        await _disk(f.close)


def _disk_error(exc: OSError) -> TransientError:
    return TransientError(
        f"normalizer temp storage failed: {exc.strerror or type(exc).__name__}",
        "NormalizerDiskError",
    )


async def _disk(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking file I/O in a thread; local disk trouble is transient (full, unmounted)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as exc:
        raise _disk_error(exc) from None
