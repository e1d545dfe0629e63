"""Memory does not grow with duration: peak RSS of a fresh process, 10 min vs 60 min of audio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import audiogen

ROOT = Path(__file__).resolve().parents[3]

# Runs in a fresh interpreter. The peak is VmHWM (the high-water RSS of this process's own
# address space, reset by exec): resource.getrusage's ru_maxrss survives exec on Linux and
# would report the parent's RSS at fork time when that is larger (pytest's is).
_PROBE = """
import json, re, sys
from services.normalizer.transcode import transcode_file
info = transcode_file(sys.argv[1], sys.argv[2], "outbound")
with open("/proc/self/status") as f:
    peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
print(json.dumps({"peak_kib": peak_kib, "duration_seconds": info.duration_seconds}))
"""


def peak_rss_mib(src: Path, dst: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds of audio written) of a transcode in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(src), str(dst)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak_kib"] / 1024, result["duration_seconds"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wav", "mp3"])
def test_peak_rss_does_not_grow_with_duration(tmp_path: Path, kind: str) -> None:
    peaks = {}
    for minutes in (10, 60):
        src = tmp_path / f"in{minutes}.{kind}"
        if kind == "wav":
            audiogen.write_wav(src, minutes * 60, 48000, "f32")
        else:
            audiogen.write_long_mp3(src, minutes * 60)
        peak, seconds = peak_rss_mib(src, tmp_path / "out.wav")
        # MP3 copies each carry ~29 ms of encoder delay: 60 joints add ~1.8 s.
        assert seconds == pytest.approx(minutes * 60, abs=3.0)
        peaks[minutes] = peak
        src.unlink()
    # Six times the audio: the same peak, within allocator noise.
    print(f"peak RSS MiB by minutes of {kind}: {peaks}")
    assert peaks[60] - peaks[10] < 8, peaks
    assert peaks[60] < 200, peaks
