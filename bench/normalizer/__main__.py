"""Normalizer benchmark: our transcoder vs the ``ffmpeg`` CLI, and peak RSS on a long recording.

Run as ``.venv/bin/python -m bench.normalizer`` (or ``bash bench/normalizer/run.sh``, which
also installs ffmpeg). For every test file, in the same run and interleaved round by
round, it times

* ours: :func:`services.normalizer.transcode.transcode_file` (the process-pool entry point,
  file to file, including the per-channel RMS), in a warm process as in the service;
* ffmpeg: ``ffmpeg -i IN -map 0:a:0 -ar 8000 -ac 2 -c:a pcm_s16le -f wav OUT`` (plus
  ``-af pan=stereo|c0=c1|c1=c0`` for outbound), one process per file as a shell user runs it;

and reports seconds of audio per wall second (best of the rounds, and median). Then it
normalizes a long recording (2 h by default) in a fresh process and reports its peak RSS
(VmHWM), next to ffmpeg's for the same file. Results go to stdout as Markdown and to
``bench/results/normalizer/<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.normalizer.transcode import transcode_file
from tests import audiogen

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "normalizer"

# (label, generator) for the timed set; each writes `seconds` of a two-tone recording.
FILES: dict[str, Any] = {
    "wav-44.1k-s16": lambda p, s: audiogen.write_wav(p, s, 44100, "s16"),
    "wav-48k-f32": lambda p, s: audiogen.write_wav(p, s, 48000, "f32"),
    "wav-16k-s16": lambda p, s: audiogen.write_wav(p, s, 16000, "s16"),
    "mp3-44.1k-128k": lambda p, s: audiogen.write_long_mp3(p, s, 44100),
    "flac-44.1k": lambda p, s: audiogen.write_encoded(p, "flac", s, 44100),
}

_RSS_PROBE = """
import json, re, sys
from services.normalizer.transcode import transcode_file
info = transcode_file(sys.argv[1], sys.argv[2], sys.argv[3])
with open("/proc/self/status") as f:
    peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
print(json.dumps({"peak_kib": peak_kib, "duration_seconds": info.duration_seconds}))
"""


def ffmpeg_command(src: Path, dst: Path, direction: str) -> list[str]:
    """The ffmpeg CLI doing our conversion: first audio stream to 8 kHz s16 stereo WAV."""
    swap = ["-af", "pan=stereo|c0=c1|c1=c0"] if direction == "outbound" else []
    return [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-i", str(src), "-map", "0:a:0", *swap,
        "-ar", "8000", "-ac", "2", "-c:a", "pcm_s16le", "-f", "wav", str(dst),
    ]  # fmt: skip


def ensure_ffmpeg() -> str:
    """The ffmpeg binary; installed with apt-get if missing (the bench's own dependency)."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    print("ffmpeg not found: apt-get update && apt-get install -y ffmpeg", file=sys.stderr)
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "ffmpeg"], check=True)
    found = shutil.which("ffmpeg")
    if not found:
        raise SystemExit("ffmpeg still missing after apt-get install")
    return found


def ffmpeg_version() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


@dataclass
class Timing:
    label: str
    direction: str
    audio_seconds: float
    ours: list[float]
    ffmpeg: list[float]
    ours_cpu: list[float]
    ffmpeg_cpu: list[float]

    def rate(self, times: list[float], best: bool) -> float:
        wall = min(times) if best else statistics.median(times)
        return self.audio_seconds / wall

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.label,
            "direction": self.direction,
            "audio_seconds": self.audio_seconds,
            "ours_wall_seconds": self.ours,
            "ffmpeg_wall_seconds": self.ffmpeg,
            "ours_rate_best": self.rate(self.ours, True),
            "ffmpeg_rate_best": self.rate(self.ffmpeg, True),
            "ratio_best": self.rate(self.ours, True) / self.rate(self.ffmpeg, True),
            "ratio_median": self.rate(self.ours, False) / self.rate(self.ffmpeg, False),
            "ours_cpu_seconds": self.ours_cpu,
            "ffmpeg_cpu_seconds": self.ffmpeg_cpu,
            "cpu_ratio_best": min(self.ffmpeg_cpu) / min(self.ours_cpu),
        }


def time_file(src: Path, workdir: Path, label: str, direction: str, rounds: int) -> Timing:
    """Interleaved rounds; wall time, and CPU time (user + system, robust to other load)."""
    ours: list[float] = []
    theirs: list[float] = []
    ours_cpu: list[float] = []
    theirs_cpu: list[float] = []
    audio_seconds = 0.0
    for _ in range(rounds):
        cpu, started = time.process_time(), time.perf_counter()
        info = transcode_file(str(src), str(workdir / "ours.wav"), direction)
        ours.append(time.perf_counter() - started)
        ours_cpu.append(time.process_time() - cpu)
        audio_seconds = info.duration_seconds
        cpu, started = _children_cpu(), time.perf_counter()
        subprocess.run(ffmpeg_command(src, workdir / "ffmpeg.wav", direction), check=True)
        theirs.append(time.perf_counter() - started)
        theirs_cpu.append(_children_cpu() - cpu)
    return Timing(label, direction, audio_seconds, ours, theirs, ours_cpu, theirs_cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_ours(src: Path, dst: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(src), str(dst), "outbound"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mib": result["peak_kib"] / 1024,
        "audio_seconds": result["duration_seconds"],
        "wall_seconds_incl_startup": wall,
    }


def peak_rss_ffmpeg(src: Path, dst: Path) -> dict[str, Any]:
    """ffmpeg's VmHWM, sampled every 20 ms from /proc while it runs (its memory is flat)."""
    started = time.perf_counter()
    proc = subprocess.Popen(ffmpeg_command(src, dst, "outbound"))
    peak_kib = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return {"peak_rss_mib": peak_kib / 1024, "wall_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.normalizer", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each timed file")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per file and tool")
    parser.add_argument("--long-hours", type=float, default=2.0, help="0 skips the RSS part")
    parser.add_argument("--files", nargs="*", default=list(FILES), choices=list(FILES))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args(argv)

    ensure_ffmpeg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-normalizer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.normalizer", *sys.argv[1:]]),
        "ffmpeg_cli": ffmpeg_version(),
        "pyav": __import__("av").__version__,
        "pyav_libavcodec": ".".join(map(str, __import__("av").library_versions["libavcodec"])),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "timings": [],
        "rss": [],
    }
    try:
        for label in args.files:
            src = workdir / f"{label}.{label.split('-')[0]}"
            if not src.exists():
                FILES[label](src, seconds)
            for direction in ("inbound", "outbound"):
                timing = time_file(src, workdir, label, direction, args.rounds)
                report["timings"].append(timing.as_dict())
                print(f"timed {label} {direction}", file=sys.stderr)
        if args.long_hours > 0:
            long_seconds = args.long_hours * 3600
            for label, write in (
                ("wav-44.1k-s16", lambda p: audiogen.write_wav(p, long_seconds, 44100, "s16")),
                ("mp3-44.1k-128k", lambda p: audiogen.write_long_mp3(p, long_seconds, 44100)),
            ):
                src = workdir / f"long-{label}.{label.split('-')[0]}"
                write(src)
                ours = peak_rss_ours(src, workdir / "long-ours.wav")
                theirs = peak_rss_ffmpeg(src, workdir / "long-ffmpeg.wav")
                report["rss"].append(
                    {"file": label, "input_bytes": src.stat().st_size, "ours": ours,
                     "ffmpeg": theirs}
                )  # fmt: skip
                src.unlink()
                print(f"measured RSS {label}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\n(raw results: {out.relative_to(ROOT)})")
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"ffmpeg CLI: {report['ffmpeg_cli']}; PyAV {report['pyav']} "
        f"(libavcodec {report['pyav_libavcodec']}); {report['cpus']} CPUs; "
        f"load average at start {report['loadavg_at_start'][0]:.2f}",
        "",
        "| file | direction | audio s | ours: audio s / wall s (best, median) "
        "| ffmpeg: audio s / wall s (best, median) | ours / ffmpeg (best, median) "
        "| ours / ffmpeg by CPU time (best) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    total_audio = total_ours = total_ffmpeg = total_ours_cpu = total_ffmpeg_cpu = 0.0
    for t in report["timings"]:
        a = t["audio_seconds"]
        ours, theirs = t["ours_wall_seconds"], t["ffmpeg_wall_seconds"]
        total_audio += a
        total_ours += min(ours)
        total_ffmpeg += min(theirs)
        total_ours_cpu += min(t["ours_cpu_seconds"])
        total_ffmpeg_cpu += min(t["ffmpeg_cpu_seconds"])
        lines.append(
            f"| {t['file']} | {t['direction']} | {a:.0f} "
            f"| {a / min(ours):.0f}, {a / statistics.median(ours):.0f} "
            f"| {a / min(theirs):.0f}, {a / statistics.median(theirs):.0f} "
            f"| {t['ratio_best']:.2f}, {t['ratio_median']:.2f} | {t['cpu_ratio_best']:.2f} |"
        )
    if report["timings"]:
        lines.append(
            f"| **all** | | {total_audio:.0f} | {total_audio / total_ours:.0f} "
            f"| {total_audio / total_ffmpeg:.0f} | **{total_ffmpeg / total_ours:.2f}** "
            f"| **{total_ffmpeg_cpu / total_ours_cpu:.2f}** |"
        )
    if report["rss"]:
        lines += [
            "",
            "| long recording | input MB | audio s | ours peak RSS MiB | ours wall s "
            "| ffmpeg peak RSS MiB | ffmpeg wall s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["rss"]:
            lines.append(
                f"| {r['file']} | {r['input_bytes'] / 1e6:.0f} | {r['ours']['audio_seconds']:.0f} "
                f"| {r['ours']['peak_rss_mib']:.1f} | {r['ours']['wall_seconds_incl_startup']:.1f} "
                f"| {r['ffmpeg']['peak_rss_mib']:.1f} | {r['ffmpeg']['wall_seconds']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
