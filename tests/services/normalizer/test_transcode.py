"""The transcoder, called directly (no broker): house format, channel order, levels, failures."""

from __future__ import annotations

import io
import os
import pickle
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
import pytest

from callingest.errors import PermanentError
from services.normalizer.transcode import (
    DBFS_FLOOR,
    NormalizedInfo,
    RecordingError,
    transcode,
    transcode_file,
)
from tests import audiogen
from tests.audiogen import LEFT_HZ, RIGHT_HZ

# RMS of a sine at half of full scale, in dBFS (full scale 32768): 20*log10(0.5/sqrt(2)).
SINE_DBFS = 20 * np.log10(audiogen.AMPLITUDE / np.sqrt(2))


def check_house_format(path: Path, seconds: float) -> np.ndarray:
    """Assert the canonical 8 kHz s16 stereo header and sizes; return the samples."""
    fields, pcm = audiogen.read_wav(path)
    assert fields["format_tag"] == 1
    assert fields["channels"] == 2
    assert fields["sample_rate"] == 8000
    assert fields["bits"] == 16
    assert fields["block_align"] == 4
    assert fields["byte_rate"] == 32000
    assert fields["fmt_len"] == 16
    assert fields["data_size"] == fields["payload_bytes"]
    assert fields["riff_size"] == 36 + fields["data_size"]
    assert abs(pcm.shape[0] - seconds * 8000) <= 1
    return pcm


def check_tones(pcm: np.ndarray, channel0_hz: float, channel1_hz: float) -> None:
    assert audiogen.dominant_hz(pcm[:, 0], 8000) == pytest.approx(channel0_hz, abs=2)
    assert audiogen.dominant_hz(pcm[:, 1], 8000) == pytest.approx(channel1_hz, abs=2)


def expected_order(direction: str) -> tuple[float, float]:
    return (LEFT_HZ, RIGHT_HZ) if direction == "inbound" else (RIGHT_HZ, LEFT_HZ)


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
@pytest.mark.parametrize("sample_format", ["s16", "f32"])
@pytest.mark.parametrize("rate", [44100, 48000, 16000])
def test_wav_rates_and_formats(tmp_path: Path, rate: int, sample_format: str, direction: str) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    audiogen.write_wav(src, 3.0, rate, sample_format)
    info = transcode_file(str(src), str(dst), direction)
    pcm = check_house_format(dst, 3.0)
    check_tones(pcm, *expected_order(direction))
    assert info.duration_seconds == 3.0
    assert (info.sample_rate, info.channels, info.sample_format) == (8000, 2, "s16")
    assert info.input_format == "wav"
    assert info.input_sample_rate == rate
    assert info.swapped is (direction == "outbound")
    assert info.rms_dbfs == pytest.approx([SINE_DBFS, SINE_DBFS], abs=0.1)
    assert info.silent_channels == [False, False]
    assert info.size_bytes == dst.stat().st_size == 44 + 3 * 32000


@pytest.mark.parametrize("sample_format", ["u8", "s24", "s32", "f64"])
def test_other_wav_sample_widths(tmp_path: Path, sample_format: str) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    audiogen.write_wav(src, 2.0, 22050, sample_format)
    info = transcode_file(str(src), str(dst), "inbound")
    check_tones(check_house_format(dst, 2.0), LEFT_HZ, RIGHT_HZ)
    assert info.duration_seconds == 2.0


def test_rf64_and_8khz_input(tmp_path: Path) -> None:
    for rf64, rate in ((True, 16000), (False, 8000)):
        src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
        audiogen.write_wav(src, 2.0, rate, rf64=rf64)
        transcode_file(str(src), str(dst), "outbound")
        check_tones(check_house_format(dst, 2.0), RIGHT_HZ, LEFT_HZ)


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_mp3(tmp_path: Path, direction: str) -> None:
    src, dst = tmp_path / "in.mp3", tmp_path / "out.wav"
    audiogen.write_encoded(src, "mp3", 4.0, 44100)
    info = transcode_file(str(src), str(dst), direction)
    pcm = check_house_format(dst, 4.0)  # LAME's gapless header: encoder delay trimmed
    check_tones(pcm, *expected_order(direction))
    assert info.input_format == "mp3"
    assert info.rms_dbfs == pytest.approx([SINE_DBFS, SINE_DBFS], abs=1.0)


@pytest.mark.parametrize(("kind", "rate"), [("flac", 44100), ("ogg", 48000), ("m4a", 44100)])
def test_flac_ogg_m4a(tmp_path: Path, kind: str, rate: int) -> None:
    src, dst = tmp_path / f"in.{kind}", tmp_path / "out.wav"
    audiogen.write_encoded(src, kind, 3.0, rate)
    info = transcode_file(str(src), str(dst), "outbound")
    fields, pcm = audiogen.read_wav(dst)
    assert (fields["channels"], fields["sample_rate"], fields["bits"]) == (2, 8000, 16)
    check_tones(pcm, RIGHT_HZ, LEFT_HZ)
    # AAC in MP4 as PyAV writes it keeps its 1024-sample priming (no edit list): ~+23 ms.
    assert info.duration_seconds == pytest.approx(3.0, abs=0.03)


def test_resampled_waveform_matches_the_source(tmp_path: Path) -> None:
    """Beyond the dominant frequency: the output is the tone itself, in phase, at the level."""
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    audiogen.write_wav(src, 1.0, 48000, "f32")
    transcode_file(str(src), str(dst), "inbound")
    _, pcm = audiogen.read_wav(dst)
    t = np.arange(8000) / 8000
    for channel, hz in ((0, LEFT_HZ), (1, RIGHT_HZ)):
        expected = audiogen.AMPLITUDE * 32767 * np.sin(2 * np.pi * hz * t)
        middle = slice(400, 7600)  # away from the resampler's edges
        error = pcm[middle, channel] - expected[middle]
        assert np.sqrt(np.mean(error**2)) < 0.01 * 32767 * audiogen.AMPLITUDE


def test_silent_channel_is_flagged(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    audiogen.write_wav(src, 2.0, 16000, freqs=(None, RIGHT_HZ))
    info = transcode_file(str(src), str(dst), "outbound")
    assert info.silent_channels == [False, True]  # swapped: the silent caller is channel 1
    assert info.rms_dbfs[1] == DBFS_FLOOR
    assert info.rms_dbfs[0] == pytest.approx(SINE_DBFS, abs=0.1)


def test_quiet_but_not_silent_channel(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    audiogen.write_wav(src, 2.0, 16000, freqs=(LEFT_HZ, RIGHT_HZ))
    with open(src, "r+b") as f:  # scale channel 1 down by 40 dB in place
        f.seek(44)
        data = np.frombuffer(f.read(), dtype="<i2").reshape(-1, 2).copy()
        data[:, 1] //= 100
        f.seek(44)
        f.write(data.tobytes())
    info = transcode_file(str(src), str(dst), "inbound")
    assert info.rms_dbfs[1] == pytest.approx(SINE_DBFS - 40, abs=0.5)
    assert info.silent_channels == [False, False]
    info = transcode(str(src), io.BytesIO(), "inbound", silence_threshold_dbfs=-45.0)
    assert info.silent_channels == [False, True]


@pytest.mark.parametrize(
    ("freqs", "word"),
    [((LEFT_HZ,), "mono"), ((LEFT_HZ, RIGHT_HZ, 300.0), "3-channel")],
)
def test_not_dual_channel_wav_is_a_format_failure(
    tmp_path: Path, freqs: tuple[float, ...], word: str
) -> None:
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, 1.0, 16000, freqs=freqs)
    with pytest.raises(RecordingError) as caught:
        transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
    assert caught.value.failure_class == "RecordingFormat"
    assert word in caught.value.message
    assert "dual-channel" in caught.value.message


def test_a_wav_codec_without_a_decoder_is_a_format_failure(tmp_path: Path) -> None:
    """A WAV whose format tag names no codec FFmpeg decodes (0x1234): a permanent format
    failure, not an internal error retried as if it were transient."""
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, 1.0, 16000)
    data = bytearray(src.read_bytes())
    assert data[20:22] == struct.pack("<H", 1)  # the fmt chunk's format tag: PCM
    data[20:22] = struct.pack("<H", 0x1234)
    src.write_bytes(bytes(data))
    with pytest.raises(RecordingError) as caught:
        transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
    assert caught.value.failure_class == "RecordingFormat"
    assert "codec is not supported" in caught.value.message


@pytest.mark.parametrize("kind", ["mp3", "flac"])
def test_mono_and_surround_encoded_are_format_failures(tmp_path: Path, kind: str) -> None:
    for freqs in ((LEFT_HZ,), (100.0, 200.0, 300.0, 400.0, 500.0, 600.0)):
        if kind == "mp3" and len(freqs) > 2:
            continue  # MP3 has no surround
        src = tmp_path / f"in.{kind}"
        audiogen.write_encoded(src, kind, 1.0, 44100, freqs=freqs)
        with pytest.raises(RecordingError) as caught:
            transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
        assert caught.value.failure_class == "RecordingFormat"


def _extensible_wav(path: Path, channel_mask: int) -> None:
    """A WAVE_FORMAT_EXTENSIBLE stereo file with the given speaker mask."""
    rate = 16000
    blk = next(audiogen.tone_blocks(1.0, rate, block=rate))
    data = np.round(blk * 32767).astype("<i2").tobytes()
    pcm_guid = bytes.fromhex("0100000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, rate, rate * 4, 4, 16, 22, 16, channel_mask)
    fmt += pcm_guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("mask", [0x0, 0x3, 0x4 | 0x8])  # unspecified, FL+FR, FC+LFE
def test_two_channels_with_any_speaker_layout_are_not_remixed(tmp_path: Path, mask: int) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    _extensible_wav(src, mask)
    transcode_file(str(src), str(dst), "inbound")
    check_tones(check_house_format(dst, 1.0), LEFT_HZ, RIGHT_HZ)


def test_empty_file_fails(tmp_path: Path) -> None:
    src = tmp_path / "empty.wav"
    src.write_bytes(b"")
    with pytest.raises(RecordingError) as caught:
        transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
    assert caught.value.failure_class == "RecordingEmpty"
    with pytest.raises(RecordingError) as caught:
        transcode(io.BytesIO(b""), io.BytesIO(), "inbound")
    assert caught.value.failure_class == "RecordingEmpty"


def test_header_without_samples_fails(tmp_path: Path) -> None:
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, 0.0, 16000)
    with pytest.raises(RecordingError) as caught:
        transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
    assert caught.value.failure_class == "RecordingEmpty"
    assert "no audio samples" in caught.value.message


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(50_000),
        b"<html><body>404 Not Found</body></html>",
        b"ID3\x04\x00\x00\x00\x00\x00\x10" + b"\x00" * 16 + os.urandom(20_000),
    ],
)
def test_garbage_is_corrupt(tmp_path: Path, content: bytes) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(content)
    with pytest.raises(RecordingError) as caught:
        transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
    assert caught.value.failure_class in ("RecordingCorrupt", "RecordingFormat")
    assert "recording" in caught.value.message


def test_mp3_whose_audio_is_overwritten_with_noise_is_corrupt(tmp_path: Path) -> None:
    src = tmp_path / "in.mp3"
    audiogen.write_encoded(src, "mp3", 4.0, 44100)
    data = bytearray(src.read_bytes())
    data[3000:] = np.random.default_rng(7).integers(0, 256, len(data) - 3000, np.uint8).tobytes()
    src.write_bytes(bytes(data))
    with pytest.raises(RecordingError) as caught:
        transcode_file(str(src), str(tmp_path / "out.wav"), "inbound")
    assert caught.value.failure_class == "RecordingCorrupt"
    assert "could not be decoded" in caught.value.message


def test_a_few_damaged_mp3_frames_are_tolerated(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.mp3", tmp_path / "out.wav"
    audiogen.write_encoded(src, "mp3", 5.0, 44100)
    data = bytearray(src.read_bytes())
    for i in range(2000, len(data), 3001):
        data[i] ^= 0x5A
    src.write_bytes(bytes(data))
    info = transcode_file(str(src), str(dst), "inbound")
    assert info.duration_seconds == pytest.approx(5.0, abs=0.2)
    check_tones(audiogen.read_wav(dst)[1], LEFT_HZ, RIGHT_HZ)


def test_sample_rate_change_mid_stream(tmp_path: Path) -> None:
    """Concatenated MP3s at 44.1 and 22.05 kHz: the resampler restarts, nothing is lost."""
    first, second = tmp_path / "a.mp3", tmp_path / "b.mp3"
    audiogen.write_encoded(first, "mp3", 2.0, 44100)
    audiogen.write_encoded(second, "mp3", 2.0, 22050)
    src, dst = tmp_path / "in.mp3", tmp_path / "out.wav"
    src.write_bytes(first.read_bytes() + second.read_bytes())
    info = transcode_file(str(src), str(dst), "outbound")
    assert info.duration_seconds == pytest.approx(4.0, abs=0.15)
    check_tones(audiogen.read_wav(dst)[1], RIGHT_HZ, LEFT_HZ)


class _Unseekable(io.RawIOBase):
    """A streaming body: read() only (like an HTTP or S3 response body)."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        return self._inner.readinto(b)


@pytest.mark.parametrize("kind", ["wav", "mp3"])
def test_file_objects_seekable_or_streaming(tmp_path: Path, kind: str) -> None:
    src = tmp_path / f"in.{kind}"
    if kind == "wav":
        audiogen.write_wav(src, 2.0, 44100)
    else:
        audiogen.write_encoded(src, "mp3", 2.0, 44100)
    bodies: list[BinaryIO] = [io.BytesIO(src.read_bytes()), cast(BinaryIO, _Unseekable(src.read_bytes()))]
    for body in bodies:
        out = io.BytesIO()
        info = transcode(body, out, "outbound")
        path = tmp_path / "out.wav"
        path.write_bytes(out.getvalue())
        _, pcm = audiogen.read_wav(path)
        check_tones(pcm, RIGHT_HZ, LEFT_HZ)
        assert info.duration_seconds == pytest.approx(2.0, abs=0.03)


def test_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "in.wav"
    audiogen.write_wav(src, 0.5, 16000)
    with pytest.raises(ValueError, match="call_direction"):
        transcode(str(src), io.BytesIO(), "sideways")
    with pytest.raises(ValueError, match="seekable"):
        transcode(str(src), _Unseekable(b""), "inbound")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):  # not the recording's fault: no RecordingError
        transcode_file(str(tmp_path / "missing.wav"), str(tmp_path / "out.wav"), "inbound")


def test_errors_and_results_cross_a_process_pool(tmp_path: Path) -> None:
    good, mono = tmp_path / "good.wav", tmp_path / "mono.wav"
    audiogen.write_wav(good, 1.0, 44100)
    audiogen.write_wav(mono, 1.0, 44100, freqs=(LEFT_HZ,))
    error = pickle.loads(pickle.dumps(RecordingError("RecordingFormat", "mono")))
    assert isinstance(error, PermanentError)
    assert (error.failure_class, error.message) == ("RecordingFormat", "mono")
    with ProcessPoolExecutor(max_workers=1) as pool:
        info = pool.submit(transcode_file, str(good), str(tmp_path / "o.wav"), "outbound").result()
        assert isinstance(info, NormalizedInfo)
        assert info.duration_seconds == 1.0
        with pytest.raises(RecordingError) as caught:
            pool.submit(transcode_file, str(mono), str(tmp_path / "m.wav"), "inbound").result()
    assert caught.value.failure_class == "RecordingFormat"


def test_the_pool_starts_every_worker_at_once() -> None:
    """Memory is flat under load: the workers exist before the first transcode, not spawned
    one by one as transcodes first overlap (the soak test measures growth after warm-up)."""
    import time

    from services.normalizer.pool import TranscodePool

    pool = TranscodePool(workers=2)
    try:
        deadline = time.monotonic() + 60
        while len(pool._executor._processes) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pool._executor._processes) == 2
    finally:
        pool.close()
