"""Streaming transcoder: any supported recording -> the house format (8 kHz, s16, 2 channels WAV).

Pure and broker-free: :func:`transcode` reads a file-like object (or path) and writes a WAV
to a seekable file-like object; :func:`transcode_file` is the process-pool entry point (paths
in, a picklable :class:`NormalizedInfo` or a picklable :class:`RecordingError` out).

Memory does not grow with duration: packets are demuxed and decoded one at a time, pushed
through one ``av.AudioResampler`` (libswresample, the same conversion as the ``ffmpeg``
CLI's default), and each resampled block is written out at once. The WAV header is written
with placeholder sizes first and patched when the stream ends.

Channel layout of the output: caller on channel 0, agent on channel 1. ``inbound``
recordings already have that order; ``outbound`` recordings have the opposite one and are
swapped.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Final, cast

import av
import av.error

from callingest.audioformat import SNIFF_BYTES, sniff_format
from callingest.errors import PermanentError
from services.normalizer.wav import (
    BYTES_PER_FRAME,
    CHANNELS,
    MAX_DATA_BYTES,
    SAMPLE_FORMAT,
    SAMPLE_RATE,
    WavSink,
    wav_header,
)

#: Below this RMS level (dBFS, full scale = 32768) a channel counts as silent.
SILENCE_THRESHOLD_DBFS: Final = -60.0
#: How -inf dBFS (a channel of exact zeros) is reported; the Avro schema has no infinity.
DBFS_FLOOR: Final = -200.0

CALL_DIRECTIONS: Final = ("inbound", "outbound")

# Input samples per resampler call and output samples per resampled block: fewer, larger
# blocks keep the per-call Python work small (bounded memory: ~256 KiB per block).
_IN_BATCH_SAMPLES: Final = 32768
_OUT_FRAME_SAMPLES: Final = 8192
# wav demuxer packet size cap (its default, 4096 bytes, means ~100 packets per second) and
# stream-info probe size (FFmpeg's 5 MB default costs ~0.5 s with big packets).
_WAV_MAX_PACKET_BYTES: Final = 128 * 1024
_WAV_PROBE_BYTES: Final = 32 * 1024
# A recording is corrupt when more packets than this fraction (plus a small allowance for a
# damaged first or last frame) fail to decode.
_MAX_BAD_PACKET_FRACTION: Final = 0.05
_BAD_PACKET_ALLOWANCE: Final = 10


class RecordingError(PermanentError):
    """The recording cannot be normalized; retrying without a new recording cannot help.

    ``failure_class`` is one of ``RecordingFormat`` (not dual-channel, no audio stream,
    unsupported codec), ``RecordingEmpty`` (no bytes or no samples), ``RecordingCorrupt``
    (undecodable) or ``RecordingTooLong`` (output beyond the 4 GiB WAV limit).
    Picklable, so it crosses a process pool unchanged.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failure_class, self.message))


#: The measurements the call's ``recording`` sub-document and RecordingNormalized carry.
RECORDING_FIELDS: Final = (
    "sample_rate",
    "channels",
    "sample_format",
    "duration_seconds",
    "rms_dbfs",
    "silent_channels",
)


@dataclass(frozen=True)
class NormalizedInfo:
    """What :func:`transcode` wrote and measured, plus a description of the input. Picklable."""

    sample_rate: int
    channels: int
    sample_format: str
    duration_seconds: float
    rms_dbfs: list[float]
    silent_channels: list[bool]
    size_bytes: int
    input_format: str
    input_codec: str
    input_sample_rate: int
    swapped: bool
    decode_errors: int = 0

    def recording_fields(self) -> dict[str, Any]:
        """The :data:`RECORDING_FIELDS` of this result, as a plain dict."""
        data = asdict(self)
        return {name: data[name] for name in RECORDING_FIELDS}


def dbfs(sum_squares: float, samples: int) -> float:
    """RMS level in dBFS of s16 samples (full scale 32768); :data:`DBFS_FLOOR` for silence."""
    if samples <= 0 or sum_squares <= 0:
        return DBFS_FLOOR
    rms = math.sqrt(sum_squares / samples) / 32768.0
    return max(DBFS_FLOOR, 20.0 * math.log10(rms))


def transcode(
    src: BinaryIO | str | os.PathLike[str],
    dst: BinaryIO,
    call_direction: str,
    *,
    silence_threshold_dbfs: float = SILENCE_THRESHOLD_DBFS,
) -> NormalizedInfo:
    """Decode ``src`` and write it to ``dst`` as 8 kHz, s16, 2-channel PCM WAV.

    ``src`` is a path or a readable binary file-like object (seekable or not; a container
    whose index sits at the end, like some M4A files, needs a seekable one). ``dst`` must
    be writable and seekable; it is written from its current position (expected 0) and
    left positioned at the end of the WAV. ``call_direction`` is ``inbound`` (channel
    order kept) or ``outbound`` (channels swapped).

    Memory is bounded by one demuxed packet and one resampled block, whatever the
    duration. Raises :class:`RecordingError` for recordings that are not dual-channel,
    empty, corrupt or too long (``dst`` then holds a partial file the caller discards);
    ``ValueError`` for a bad ``call_direction`` or unseekable ``dst``; ``OSError`` from
    the file objects propagates.
    """
    if call_direction not in CALL_DIRECTIONS:
        raise ValueError(f"call_direction must be one of {CALL_DIRECTIONS}, not {call_direction!r}")
    if not dst.seekable():
        raise ValueError("dst must be seekable: the WAV header is patched at the end")
    swap = call_direction == "outbound"

    try:
        container = av.open(src, mode="r", metadata_errors="ignore", **_open_options(src))
    except av.error.FFmpegError as exc:
        if isinstance(exc, OSError) and not isinstance(exc, av.error.InvalidDataError):
            raise  # a missing or unreadable source file is not the recording's fault
        raise _open_error(src, exc) from None
    with container:
        return _transcode_container(container, dst, swap, silence_threshold_dbfs)


def transcode_file(
    src_path: str,
    dst_path: str,
    call_direction: str,
    silence_threshold_dbfs: float = SILENCE_THRESHOLD_DBFS,
) -> NormalizedInfo:
    """Process-pool entry point: :func:`transcode` from one path to another (overwritten).

    Arguments and result are plain picklable values; failures are :class:`RecordingError`
    (picklable) or ``OSError``.
    """
    with open(dst_path, "wb") as dst:
        return transcode(src_path, dst, call_direction, silence_threshold_dbfs=silence_threshold_dbfs)


def _open_options(src: object) -> dict[str, Any]:
    """Demuxer options for ``src``: for WAV, large packets and no long stream probing.

    The wav demuxer cuts 4096-byte packets by default (~100 per second of audio, each a
    Python round trip); with big packets FFmpeg's default 5 MB stream-info probe gets slow,
    and WAV needs none (its header says everything). Other containers keep the defaults.
    """
    if _sniff(src) != "wav":
        return {}
    return {
        "format": "wav",
        "container_options": {
            "max_size": str(_WAV_MAX_PACKET_BYTES),
            "probesize": str(_WAV_PROBE_BYTES),
        },
    }


def _sniff(src: object) -> str | None:
    """The sniffed format of a path or a seekable file object (position kept), else None."""
    if isinstance(src, str | os.PathLike):
        try:
            with open(src, "rb") as f:
                return sniff_format(f.read(SNIFF_BYTES))
        except OSError:
            return None  # av.open reports the error
    if not getattr(src, "seekable", lambda: False)():
        return None
    stream = cast(BinaryIO, src)
    pos = stream.tell()
    try:
        return sniff_format(stream.read(SNIFF_BYTES))
    finally:
        stream.seek(pos)


def _open_error(src: object, exc: av.error.FFmpegError) -> RecordingError:
    if _is_empty(src):
        return RecordingError("RecordingEmpty", "the recording is empty (0 bytes)")
    return RecordingError(
        "RecordingCorrupt",
        f"the recording is not a decodable audio file ({exc.strerror or type(exc).__name__})",
    )


def _is_empty(src: object) -> bool:
    if isinstance(src, str | os.PathLike):
        try:
            return os.path.getsize(src) == 0
        except OSError:
            return False
    seek = getattr(src, "seek", None)
    tell = getattr(src, "tell", None)
    if seek is None or tell is None or not getattr(src, "seekable", lambda: False)():
        return False
    try:
        return bool(seek(0, os.SEEK_END) == 0)
    except OSError:
        return False


def _transcode_container(
    container: Any, dst: BinaryIO, swap: bool, silence_threshold_dbfs: float
) -> NormalizedInfo:
    if not container.streams.audio:
        raise RecordingError("RecordingFormat", "the recording has no audio stream")
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    if ctx is None:  # an audio stream of a codec FFmpeg has no decoder for (WAV format 0x1234)
        raise RecordingError("RecordingFormat", "the recording's audio codec is not supported")
    if ctx.channels != CHANNELS:
        raise _channel_error(ctx.channels)

    start = dst.tell()
    dst.write(wav_header(0))
    sink = WavSink(dst, swap, too_long=_too_long)
    pipeline = _Resampling(sink)
    packets = 0
    bad_packets = 0
    try:
        for packet in container.demux(stream):
            flush = packet.size == 0  # the demuxer's last packet: drains the decoder
            packets += 0 if flush else 1
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad_packets += 1
                if bad_packets > _BAD_PACKET_ALLOWANCE and bad_packets > packets // 2:
                    raise _corrupt(bad_packets, packets) from None
                continue
            for frame in frames:
                pipeline.push(frame)
        pipeline.finish()
    except av.error.FFmpegError as exc:
        raise RecordingError(
            "RecordingCorrupt",
            f"the recording is damaged after {sink.samples / SAMPLE_RATE:.1f} s of audio "
            f"({exc.strerror or type(exc).__name__})",
        ) from None

    if sink.samples == 0:
        if bad_packets:
            raise _corrupt(bad_packets, packets)
        raise RecordingError("RecordingEmpty", "the recording contains no audio samples")
    if bad_packets > _BAD_PACKET_ALLOWANCE + packets * _MAX_BAD_PACKET_FRACTION:
        raise _corrupt(bad_packets, packets)

    end = dst.tell()
    dst.seek(start)
    dst.write(wav_header(sink.samples * BYTES_PER_FRAME))
    dst.seek(end)

    rms = [dbfs(s, sink.samples) for s in sink.sum_squares]
    return NormalizedInfo(
        sample_rate=SAMPLE_RATE,
        channels=CHANNELS,
        sample_format=SAMPLE_FORMAT,
        duration_seconds=sink.samples / SAMPLE_RATE,
        rms_dbfs=rms,
        silent_channels=[level < silence_threshold_dbfs for level in rms],
        size_bytes=end - start,
        input_format=container.format.name,
        input_codec=ctx.name,
        input_sample_rate=ctx.sample_rate,
        swapped=swap,
        decode_errors=bad_packets,
    )


class _Resampling:
    """Decoded frames -> batches of at least :data:`_IN_BATCH_SAMPLES` (an ``AudioFifo``)
    -> ``AudioResampler`` -> sink.

    Batching matters: every resampler call costs a filter-graph round trip from Python,
    and decoders such as MP3 (1152 samples per frame) would pay it ~40 times per second
    of audio. When the decoded format, layout or rate changes mid-stream (concatenated
    MP3s), the current resampler is drained and a new one started.
    """

    def __init__(self, sink: WavSink) -> None:
        self.sink = sink
        self.key: tuple[str, str, int, int] | None = None
        self.fifo: av.AudioFifo | None = None
        self.resampler: av.AudioResampler | None = None

    def push(self, frame: av.AudioFrame) -> None:
        key = (frame.format.name, frame.layout.name, frame.layout.nb_channels, frame.sample_rate)
        if key != self.key:
            if key[2] != CHANNELS:
                raise _channel_error(key[2])
            self.finish()
            self.key = key
            self.fifo = av.AudioFifo()
            self.resampler = av.AudioResampler(
                format=SAMPLE_FORMAT,
                layout=frame.layout,  # same layout in and out: no channel remixing
                rate=SAMPLE_RATE,
                frame_size=_OUT_FRAME_SAMPLES,
            )
        assert self.fifo is not None and self.resampler is not None
        frame.pts = None  # resample by sample count: damaged timestamps must not open gaps
        if self.fifo.samples == 0 and frame.samples >= _IN_BATCH_SAMPLES:
            self.sink.write(self.resampler.resample(frame))
            return
        self.fifo.write(frame)
        if self.fifo.samples >= _IN_BATCH_SAMPLES:
            self.sink.write(self.resampler.resample(self.fifo.read()))

    def finish(self) -> None:
        """Drain the batch and the resampler's delay line into the sink."""
        if self.resampler is None or self.fifo is None:
            return
        if self.fifo.samples:
            self.sink.write(self.resampler.resample(self.fifo.read()))
        self.sink.write(self.resampler.resample(None))
        self.resampler = None
        self.fifo = None
        self.key = None


def _too_long() -> RecordingError:
    limit_hours = MAX_DATA_BYTES // BYTES_PER_FRAME // SAMPLE_RATE // 3600
    return RecordingError("RecordingTooLong",
                          f"the recording is longer than {limit_hours} h, the limit of a WAV file")


def _channel_error(channels: int) -> RecordingError:
    kind = "mono" if channels == 1 else f"{channels}-channel"
    return RecordingError(
        "RecordingFormat",
        f"the recording is {kind}; recordings must be dual-channel (stereo) with the caller "
        "and the agent on separate channels",
    )


def _corrupt(bad_packets: int, packets: int) -> RecordingError:
    return RecordingError(
        "RecordingCorrupt",
        f"the recording is corrupt: {bad_packets} of {packets} audio packets could not be decoded",
    )
