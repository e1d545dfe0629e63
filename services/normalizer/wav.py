"""The house format's WAV file: 8 kHz, s16, 2 channels PCM; its header and its data writer."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, BinaryIO, Final, cast

import av
import numpy as np

SAMPLE_RATE: Final = 8000
CHANNELS: Final = 2
SAMPLE_FORMAT: Final = "s16"
BYTES_PER_FRAME: Final = CHANNELS * 2
# RIFF sizes are 32-bit: the data chunk must stay below 4 GiB (about 37 h of output).
MAX_DATA_BYTES: Final = 0xFFFFFFFF - 36
_HEADER: Final = struct.Struct("<4sI4s4sIHHIIHH4sI")


def wav_header(data_bytes: int) -> bytes:
    """The 44-byte canonical header of an 8 kHz, s16, 2-channel PCM WAV with ``data_bytes``."""
    return _HEADER.pack(
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # WAVE_FORMAT_PCM
        CHANNELS,
        SAMPLE_RATE,
        SAMPLE_RATE * BYTES_PER_FRAME,
        BYTES_PER_FRAME,
        16,
        b"data",
        data_bytes,
    )


class WavSink:
    """Resampled s16 stereo blocks -> the WAV data chunk, swapping channels if asked and
    accumulating per-channel sums of squares (float64: exact to 2**53, ~200 h of audio)."""

    def __init__(self, dst: BinaryIO, swap: bool, too_long: Callable[[], Exception]) -> None:
        self.dst = dst
        self.too_long = too_long
        self.swap = swap
        self.samples = 0
        self.sum_squares = [0.0] * CHANNELS

    def write(self, frames: list[av.AudioFrame]) -> None:
        for out in frames:
            # Packed s16, L R L R ...; the plane may be padded past the last sample.
            interleaved = np.frombuffer(
                cast(Any, out.planes[0]), dtype=np.int16, count=out.samples * CHANNELS
            )
            if self.swap:
                # One 32-bit word per stereo frame: rotating it by 16 bits swaps L and R,
                # ~20x faster than a strided copy of pcm[:, ::-1].
                words = interleaved.view(np.uint32)
                interleaved = ((words << 16) | (words >> 16)).view(np.int16)
            wide = interleaved.astype(np.float64)
            left, right = wide[0::2], wide[1::2]
            self.sum_squares[0] += float(left @ left)
            self.sum_squares[1] += float(right @ right)
            self.samples += interleaved.size // CHANNELS
            if self.samples * BYTES_PER_FRAME > MAX_DATA_BYTES:
                raise self.too_long()
            self.dst.write(interleaved.astype("<i2", copy=False).data)
