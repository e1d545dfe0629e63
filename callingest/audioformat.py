"""Recording container sniffing from magic bytes (never from the extension or Content-Type).

Shared by the fetcher (which records the format on the call and refuses unknown ones as
permanent failures) and the normalizer. Pure functions, no I/O.

Recognized containers and the names returned (the ``format`` field of RecordingFetched):

- ``wav``  - ``RIFF``/``RF64``/``BW64`` chunk header with form type ``WAVE``
- ``mp3``  - an ``ID3v2`` tag not followed by ``fLaC``, or an MPEG audio layer I/II/III
  frame header (11-bit frame sync plus valid version, layer, bitrate and sample-rate fields)
- ``flac`` - ``fLaC``, also behind an ``ID3v2`` tag
- ``ogg``  - ``OggS`` page header (Vorbis, Opus, FLAC-in-Ogg)
- ``m4a``  - ISO base media file (``ftyp`` box at offset 4): m4a, mp4, 3gp, mov
"""

from __future__ import annotations

from typing import Final

#: How many leading bytes to pass to :func:`sniff_format` for a reliable answer.
#: Fewer work for every format except a recording whose ID3v2 tag is longer than the
#: head (cover art); that case is reported as ``mp3``, as the tag is MP3's own.
SNIFF_BYTES: Final = 4096

#: Every name :func:`sniff_format` can return.
FORMATS: Final = frozenset({"wav", "mp3", "flac", "ogg", "m4a"})

_ID3_HEADER_LEN: Final = 10

# MPEG audio bitrates in kbit/s indexed by [version is MPEG-1][layer][bitrate index];
# only used to tell a real frame header from noise and to find the next frame.
_BITRATES_V1: Final = {
    1: (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    2: (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
}
_BITRATES_V2: Final = {
    1: (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    3: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLE_RATES: Final = {  # version bits -> rates by index
    0b11: (44100, 48000, 32000),  # MPEG-1
    0b10: (22050, 24000, 16000),  # MPEG-2
    0b00: (11025, 12000, 8000),  # MPEG-2.5
}


def sniff_format(head: bytes) -> str | None:
    """The container format of a recording from its first bytes, or None if unrecognized.

    ``head`` is the start of the file (:data:`SNIFF_BYTES` recommended; any length is
    accepted, too few bytes simply give None). Never raises.
    """
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if len(head) >= 8 and head[4:8] == b"ftyp":
        return "m4a"
    if head[:3] == b"ID3" and len(head) >= _ID3_HEADER_LEN:
        return _after_id3(head)
    if _mpeg_frame_length(head, 0) is not None and _frames_chain(head, 0):
        return "mp3"
    return None


def _after_id3(head: bytes) -> str | None:
    """Format of what follows an ID3v2 tag: flac if ``fLaC``, otherwise mp3."""
    size_bytes = head[6:10]
    if any(b & 0x80 for b in size_bytes):  # sizes are syncsafe: top bit always clear
        return None
    size = 0
    for b in size_bytes:
        size = (size << 7) | b
    end = _ID3_HEADER_LEN + size + (10 if head[5] & 0x10 else 0)  # footer flag
    if head[end : end + 4] == b"fLaC":
        return "flac"
    return "mp3"


def _mpeg_frame_length(data: bytes, pos: int) -> int | None:
    """Length in bytes of the MPEG audio frame whose header starts at ``pos``, or None."""
    if pos + 4 > len(data):
        return None
    b1, b2, b3 = data[pos + 1], data[pos + 2], data[pos + 3]
    if data[pos] != 0xFF or (b1 & 0xE0) != 0xE0:
        return None
    version = (b1 >> 3) & 0b11
    layer_bits = (b1 >> 1) & 0b11
    bitrate_index = b2 >> 4
    rate_index = (b2 >> 2) & 0b11
    if version == 0b01 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved version, ADTS/reserved layer, free-format or bad bitrate/rate
    if (b3 & 0b11) == 0b10:  # reserved emphasis
        return None
    layer = 4 - layer_bits
    table = _BITRATES_V1 if version == 0b11 else _BITRATES_V2
    bitrate = table[layer][bitrate_index] * 1000
    sample_rate = _SAMPLE_RATES[version][rate_index]
    padding = (b2 >> 1) & 1
    if layer == 1:
        return (12 * bitrate // sample_rate + padding) * 4
    per_frame = 144 if (layer == 3 and version == 0b11) or layer == 2 else 72
    return per_frame * bitrate // sample_rate + padding


def _frames_chain(data: bytes, pos: int) -> bool:
    """True unless the bytes after the first frame show it was a false sync.

    When the head is long enough to hold the next header, that header must be a valid
    frame too (a random 0xFFEx pair in noise passes the first check 1 time in ~50).
    """
    length = _mpeg_frame_length(data, pos)
    if length is None:
        return False
    nxt = pos + length
    if nxt + 4 > len(data):
        return True
    return _mpeg_frame_length(data, nxt) is not None
