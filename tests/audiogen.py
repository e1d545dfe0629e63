"""Synthetic test recordings: a different tone on each channel, written with PyAV or numpy.

Used by the normalizer tests and the normalizer benchmark. Every writer streams in blocks,
so hour-long files cost no memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from fractions import Fraction
from typing import cast

import av
import av.audio.stream
import numpy as np

LEFT_HZ = 440.0
RIGHT_HZ = 1000.0
AMPLITUDE = 0.5  # of full scale: RMS of such a sine is -9.03 dBFS

# (extension, container, codec, sample format) for each encodable format.
ENCODED = {
    "mp3": ("mp3", "libmp3lame", "s16p"),
    "flac": ("flac", "flac", "s16"),
    "ogg": ("ogg", "libopus", "s16"),  # Opus in Ogg: FFmpeg's own Vorbis encoder is experimental
    "m4a": ("ipod", "aac", "fltp"),
}


def tone_blocks(
    seconds: float,
    rate: int,
    freqs: tuple[float | None, ...] = (LEFT_HZ, RIGHT_HZ),
    block: int = 65536,
    amplitude: float = AMPLITUDE,
) -> Iterator[np.ndarray]:
    """Float64 blocks of shape (n, channels): one sine per channel (None = digital silence)."""
    total = round(seconds * rate)
    for start in range(0, total, block):
        n = min(block, total - start)
        t = (np.arange(start, start + n, dtype=np.float64)) / rate
        cols = [np.zeros(n) if f is None else amplitude * np.sin(2 * np.pi * f * t) for f in freqs]
        yield np.stack(cols, axis=1)


def write_wav(
    path: str | os.PathLike[str],
    seconds: float,
    rate: int,
    sample_format: str = "s16",
    freqs: tuple[float | None, ...] = (LEFT_HZ, RIGHT_HZ),
    rf64: bool = False,
) -> None:
    """A PCM (s16, s24, s32) or IEEE float (f32, f64) WAV written with numpy; RF64 if asked."""
    dtype, fmt_tag = {
        "u8": ("u1", 1),
        "s16": ("<i2", 1),
        "s24": (None, 1),
        "s32": ("<i4", 1),
        "f32": ("<f4", 3),
        "f64": ("<f8", 3),
    }[sample_format]
    width = {"u8": 1, "s16": 2, "s24": 3, "s32": 4, "f32": 4, "f64": 8}[sample_format]
    channels = len(freqs)
    data_bytes = round(seconds * rate) * channels * width
    fmt = struct.pack(
        "<HHIIHH", fmt_tag, channels, rate, rate * channels * width, channels * width, width * 8
    )
    with open(path, "wb") as f:
        if rf64:
            ds64 = struct.pack("<QQQI", 36 + 12 + 24 + 8 + data_bytes, data_bytes, 0, 0)
            f.write(b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE")
            f.write(b"ds64" + struct.pack("<I", len(ds64)) + ds64)
        else:
            f.write(b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt)
        f.write(b"data" + struct.pack("<I", 0xFFFFFFFF if rf64 else data_bytes))
        for blk in tone_blocks(seconds, rate, freqs):
            f.write(_pcm_bytes(blk, sample_format, dtype))


def _pcm_bytes(blk: np.ndarray, sample_format: str, dtype: str | None) -> bytes:
    if sample_format in ("f32", "f64"):
        return blk.astype(dtype).tobytes()
    if sample_format == "u8":
        return np.clip(np.round(blk * 127 + 128), 0, 255).astype("u1").tobytes()
    if sample_format == "s24":
        ints = np.clip(np.round(blk * 8388607), -8388608, 8388607).astype("<i4")
        return ints.view("u1").reshape(-1, 4)[:, :3].tobytes()
    scale = 32767 if sample_format == "s16" else 2147483647
    return np.clip(np.round(blk * scale), -scale - 1, scale).astype(dtype).tobytes()


def write_encoded(
    path: str | os.PathLike[str],
    kind: str,
    seconds: float,
    rate: int,
    freqs: tuple[float | None, ...] = (LEFT_HZ, RIGHT_HZ),
    bit_rate: int | None = None,
    container_options: dict[str, str] | None = None,
) -> None:
    """An encoded recording (``kind`` a key of :data:`ENCODED`) written with PyAV."""
    container_format, codec, sample_format = ENCODED[kind]
    layout = {1: "mono", 2: "stereo", 3: "2.1", 6: "5.1"}[len(freqs)]
    with av.open(
        str(path), mode="w", format=container_format, container_options=container_options or {}
    ) as out:
        stream = cast(av.audio.stream.AudioStream, out.add_stream(codec, rate=rate, layout=layout))
        stream.codec_context.format = sample_format
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        stream.time_base = Fraction(1, rate)
        pts = 0
        for blk in tone_blocks(seconds, rate, freqs, block=4096):
            planar = sample_format.endswith("p")
            if sample_format.startswith("s16"):
                data = np.round(blk * 32767).astype(np.int16)
            else:
                data = blk.astype(np.float32)
            arr = np.ascontiguousarray(data.T if planar else data.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(arr, format=sample_format, layout=layout)
            frame.sample_rate = rate
            frame.pts = pts
            frame.time_base = Fraction(1, rate)
            pts += blk.shape[0]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_long_mp3(path: str | os.PathLike[str], seconds: float, rate: int = 44100) -> None:
    """A long CBR MP3, fast: one minute encoded once (no ID3 tag, no Xing header), repeated.

    Frames of a plain CBR stream are self-contained at the start of an encode, so the
    copies join into one valid stream (the tone's phase jumps at each joint: harmless).
    """
    unit = 60.0 if seconds >= 60 else seconds
    part = f"{os.fspath(path)}.unit"
    write_encoded(part, "mp3", unit, rate, container_options={"write_xing": "0", "id3v2_version": "0"})
    with open(part, "rb") as f:
        frames = f.read()
    os.unlink(part)
    copies = round(seconds / unit)
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(frames)


def read_wav(path: str | os.PathLike[str]) -> tuple[dict[str, int], np.ndarray]:
    """A canonical 44-byte-header PCM WAV as (fmt fields, int16 samples of shape (n, channels))."""
    with open(path, "rb") as f:
        header = f.read(44)
        (
            riff,
            riff_size,
            wave,
            fmt_id,
            fmt_len,
            tag,
            ch,
            rate,
            byte_rate,
            align,
            bits,
            data_id,
            size,
        ) = struct.unpack("<4sI4s4sIHHIIHH4sI", header)
        assert (riff, wave, fmt_id, data_id) == (b"RIFF", b"WAVE", b"fmt ", b"data")
        payload = f.read()
    fields = {
        "riff_size": riff_size,
        "fmt_len": fmt_len,
        "format_tag": tag,
        "channels": ch,
        "sample_rate": rate,
        "byte_rate": byte_rate,
        "block_align": align,
        "bits": bits,
        "data_size": size,
        "payload_bytes": len(payload),
    }
    return fields, np.frombuffer(payload, dtype="<i2").reshape(-1, ch)


def dominant_hz(channel: np.ndarray, rate: int) -> float:
    """The frequency of the strongest FFT bin of one channel."""
    x = channel.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])
