"""Format sniffing from magic bytes, on real files written by PyAV and numpy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from callingest.audioformat import FORMATS, SNIFF_BYTES, sniff_format
from tests import audiogen


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


@pytest.mark.parametrize("kind", ["mp3", "flac", "ogg", "m4a"])
def test_encoded_formats_are_recognized(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"x.{kind}"
    audiogen.write_encoded(path, kind, 1.0, 44100 if kind != "ogg" else 48000)
    assert sniff_format(head(path)) == kind


@pytest.mark.parametrize("rf64", [False, True])
def test_wav_and_rf64(tmp_path: Path, rf64: bool) -> None:
    path = tmp_path / "x.wav"
    audiogen.write_wav(path, 0.5, 16000, rf64=rf64)
    assert head(path)[:4] == (b"RF64" if rf64 else b"RIFF")
    assert sniff_format(head(path)) == "wav"


def test_mp3_without_id3_by_frame_sync(tmp_path: Path) -> None:
    path = tmp_path / "x.mp3"
    audiogen.write_encoded(path, "mp3", 1.0, 44100)
    data = path.read_bytes()
    if data[:3] == b"ID3":  # strip the tag: what is left starts with a frame header
        size = 0
        for b in data[6:10]:
            size = (size << 7) | b
        data = data[10 + size :]
    assert data[0] == 0xFF
    assert sniff_format(data[:SNIFF_BYTES]) == "mp3"


def test_flac_behind_id3_tag_is_flac(tmp_path: Path) -> None:
    path = tmp_path / "x.flac"
    audiogen.write_encoded(path, "flac", 0.5, 16000)
    tag_body = b"\x00" * 300
    size = bytes((len(tag_body) >> s) & 0x7F for s in (21, 14, 7, 0))
    tagged = b"ID3\x04\x00\x00" + size + tag_body + path.read_bytes()
    assert sniff_format(tagged[:SNIFF_BYTES]) == "flac"


def test_long_id3_tag_counts_as_mp3() -> None:
    size = bytes((100_000 >> s) & 0x7F for s in (21, 14, 7, 0))
    assert sniff_format(b"ID3\x03\x00\x00" + size + b"\x00" * 4000) == "mp3"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RIFF",
        b"RIFF\x00\x00\x00\x00AVI LIST",  # RIFF but not WAVE
        b"\xff\xf1\x50\x80\x02\x1f\xfc" + b"\x00" * 100,  # AAC ADTS: layer bits 00
        b"\xff\xfb\xf0\x00" + b"\x00" * 100,  # bad bitrate index 15
        b"<html><body>Not Found</body></html>",
        b'{"error": "forbidden"}',
        b"%PDF-1.7\n",
    ],
)
def test_non_audio_is_none(data: bytes) -> None:
    assert sniff_format(data) is None


def test_random_bytes_are_almost_never_audio() -> None:
    hits = [sniff_format(os.urandom(SNIFF_BYTES)) for _ in range(300)]
    assert hits.count(None) >= 298


def test_false_mp3_sync_is_rejected_when_next_header_is_missing() -> None:
    # A valid-looking MPEG-1 layer III header (128 kbit/s, 44.1 kHz): 417-byte frame.
    header = b"\xff\xfb\x90\x00"
    fake = header + b"\x00" * 413 + b"\x12\x34\x56\x78" + b"\x00" * 100
    real = header + b"\x00" * 413 + header + b"\x00" * 100
    assert sniff_format(fake) is None
    assert sniff_format(real) == "mp3"


def test_every_returned_name_is_declared() -> None:
    assert {"wav", "mp3", "flac", "ogg", "m4a"} == set(FORMATS)
