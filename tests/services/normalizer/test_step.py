"""The normalizer step against the real S3 store (no broker): download, transcode, upload."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from callingest import avro, metrics
from callingest.errors import PermanentError
from callingest.kafka import event_id
from callingest.s3 import PART_SIZE
from callingest.settings import Settings
from callingest.steps import StageContext
from callingest.topics import Topics
from services.normalizer.pool import TranscodePool
from services.normalizer.step import NormalizerResources, normalized_key, step
from tests import audiogen
from tests.audiogen import LEFT_HZ, RIGHT_HZ
from tests.helpers import parts_count

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[TranscodePool]:
    transcode_pool = TranscodePool(workers=2)
    yield transcode_pool
    transcode_pool.close()


def context(settings: Settings, s3: Any,
            pool: TranscodePool) -> StageContext[NormalizerResources]:
    return StageContext(
        settings=settings,
        db=None,  # type: ignore[arg-type]  # the normalizer step never reads MongoDB
        topics=Topics(settings.topic_prefix),
        call=None,
        retry=0,
        resources=NormalizerResources(s3=s3, pool=pool),
    )


def fetched_event(cuid: str, key: str, direction: str, attempt: int = 1) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "cuid": cuid,
        "network_id": "1001",
        "attempt": attempt,
        "bucket": "recordings",
        "key": key,
        "size_bytes": 0,
        "format": "wav",
        "call_direction": direction,
    }


async def put_raw(s3: Any, settings: Settings, cuid: str, path: Path, attempt: int = 1) -> str:
    key = f"raw/{cuid}/{attempt}"
    await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=await asyncio.to_thread(path.read_bytes))
    return key


async def get_normalized(s3: Any, settings: Settings, cuid: str, into: Path) -> dict[str, Any]:
    obj = await s3.get_object(Bucket=settings.s3_bucket, Key=normalized_key(cuid))
    async with obj["Body"] as body:
        data = await body.read()
    await asyncio.to_thread(into.write_bytes, data)
    return dict(obj)


@pytest.mark.parametrize(
    ("kind", "direction"), [("wav", "inbound"), ("wav", "outbound"), ("mp3", "outbound")]
)
async def test_step_normalizes_into_s3(
    tmp_path: Path,
    settings: Settings,
    s3_client: Any,
    pool: TranscodePool,
    kind: str,
    direction: str,
) -> None:
    cuid = uuid.uuid4().hex
    src = tmp_path / f"in.{kind}"
    if kind == "wav":
        audiogen.write_wav(src, 3.0, 44100, "f32")
    else:
        audiogen.write_encoded(src, "mp3", 3.0, 44100)
    key = await put_raw(s3_client, settings, cuid, src)
    before = metrics.AUDIO_NORMALIZED._value.get()

    result = await step(fetched_event(cuid, key, direction), context(settings, s3_client, pool))

    event = result.next_event
    assert event is not None
    assert event["bucket"] == settings.s3_bucket
    assert event["key"] == f"normalized/{cuid}.wav"
    assert (event["sample_rate"], event["channels"], event["sample_format"]) == (8000, 2, "s16")
    assert event["duration_seconds"] == pytest.approx(3.0, abs=0.01)
    assert len(event["rms_dbfs"]) == 2 and event["silent_channels"] == [False, False]
    assert result.call_update == {"recording": event}
    # What the consumer loop publishes must encode with the RecordingNormalized schema.
    published = {
        "event_id": event_id(cuid, "normalizer", 1),
        "cuid": cuid,
        "occurred_at": datetime.now(UTC),
        "schema_version": 1,
        "network_id": "1001",
        "attempt": 1,
        **event,
    }
    name, decoded = avro.decode(avro.encode("RecordingNormalized", published))
    assert name == "RecordingNormalized"
    assert decoded["rms_dbfs"] == pytest.approx(event["rms_dbfs"])
    assert metrics.AUDIO_NORMALIZED._value.get() - before == pytest.approx(3.0, abs=0.01)

    out = tmp_path / "out.wav"
    obj = await get_normalized(s3_client, settings, cuid, out)
    assert obj["ContentType"] == "audio/wav"
    fields, pcm = audiogen.read_wav(out)
    assert (fields["channels"], fields["sample_rate"], fields["bits"]) == (2, 8000, 16)
    first, second = (LEFT_HZ, RIGHT_HZ) if direction == "inbound" else (RIGHT_HZ, LEFT_HZ)
    assert audiogen.dominant_hz(pcm[:, 0], 8000) == pytest.approx(first, abs=2)
    assert audiogen.dominant_hz(pcm[:, 1], 8000) == pytest.approx(second, abs=2)


async def test_redelivery_reuses_the_stored_output(
    tmp_path: Path, settings: Settings, s3_client: Any, pool: TranscodePool
) -> None:
    cuid = uuid.uuid4().hex
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, 2.0, 16000)
    key = await put_raw(s3_client, settings, cuid, src)
    ctx = context(settings, s3_client, pool)
    first = await step(fetched_event(cuid, key, "inbound"), ctx)
    head = await s3_client.head_object(Bucket=settings.s3_bucket, Key=normalized_key(cuid))

    # The raw object is gone: a second run can only succeed without downloading it.
    await s3_client.delete_object(Bucket=settings.s3_bucket, Key=key)
    before = metrics.AUDIO_NORMALIZED._value.get()
    second = await step(fetched_event(cuid, key, "inbound"), ctx)
    assert second.next_event == first.next_event
    assert metrics.AUDIO_NORMALIZED._value.get() == before
    again = await s3_client.head_object(Bucket=settings.s3_bucket, Key=normalized_key(cuid))
    assert again["ETag"] == head["ETag"] and again["LastModified"] == head["LastModified"]

    # Another attempt (a replay) or another direction is not the same work: it is redone,
    # and here fails because its raw object does not exist.
    for event in (
        fetched_event(cuid, key, "inbound", attempt=2),
        fetched_event(cuid, key, "outbound"),
    ):
        with pytest.raises(PermanentError) as caught:
            await step(event, ctx)
        assert caught.value.failure_class == "RecordingMissing"


async def test_replay_with_a_new_raw_object_overwrites(
    tmp_path: Path, settings: Settings, s3_client: Any, pool: TranscodePool
) -> None:
    cuid = uuid.uuid4().hex
    ctx = context(settings, s3_client, pool)
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, 2.0, 16000)
    key1 = await put_raw(s3_client, settings, cuid, src, attempt=1)
    await step(fetched_event(cuid, key1, "inbound"), ctx)
    audiogen.write_wav(src, 5.0, 16000)
    key2 = await put_raw(s3_client, settings, cuid, src, attempt=2)
    result = await step(fetched_event(cuid, key2, "inbound", attempt=2), ctx)
    assert result.next_event is not None
    assert result.next_event["duration_seconds"] == 5.0
    head = await s3_client.head_object(Bucket=settings.s3_bucket, Key=normalized_key(cuid))
    assert head["Metadata"]["attempt"] == "2"
    assert head["ContentLength"] == 44 + 5 * 32000


@pytest.mark.slow
async def test_large_output_goes_up_in_parts(
    tmp_path: Path, settings: Settings, s3_client: Any, pool: TranscodePool
) -> None:
    cuid = uuid.uuid4().hex
    seconds = 300.0  # 9.6 MB of output: more than one part
    assert seconds * 32000 > PART_SIZE
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, seconds, 16000)
    key = await put_raw(s3_client, settings, cuid, src)
    result = await step(fetched_event(cuid, key, "outbound"), context(settings, s3_client, pool))
    assert result.next_event is not None
    assert result.next_event["duration_seconds"] == seconds
    out = tmp_path / "out.wav"
    obj = await get_normalized(s3_client, settings, cuid, out)
    assert obj["ContentLength"] == 44 + seconds * 32000
    assert await parts_count(s3_client, settings.s3_bucket, normalized_key(cuid)) == 2
    fields, pcm = audiogen.read_wav(out)
    assert fields["data_size"] == seconds * 32000
    assert audiogen.dominant_hz(pcm[-8000:, 0], 8000) == pytest.approx(RIGHT_HZ, abs=2)


@pytest.mark.parametrize(
    ("content", "failure_class"),
    [("mono", "RecordingFormat"), ("empty", "RecordingEmpty"), ("garbage", "RecordingCorrupt")],
)
async def test_bad_recordings_fail_permanently_and_store_nothing(
    tmp_path: Path,
    settings: Settings,
    s3_client: Any,
    pool: TranscodePool,
    content: str,
    failure_class: str,
) -> None:
    cuid = uuid.uuid4().hex
    src = tmp_path / "in.wav"
    if content == "mono":
        audiogen.write_wav(src, 1.0, 16000, freqs=(LEFT_HZ,))
    elif content == "empty":
        src.write_bytes(b"")
    else:
        src.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)) * 10)
    key = await put_raw(s3_client, settings, cuid, src)
    with pytest.raises(PermanentError) as caught:
        await step(fetched_event(cuid, key, "inbound"), context(settings, s3_client, pool))
    assert caught.value.failure_class == failure_class
    assert caught.value.message
    listing = await s3_client.list_objects_v2(Bucket=settings.s3_bucket, Prefix=normalized_key(cuid))
    assert listing.get("KeyCount", 0) == 0
