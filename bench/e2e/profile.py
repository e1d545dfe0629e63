"""py-spy sampling profiles of service processes during a benchmark run.

:class:`Profiles` starts ``py-spy record --format raw --nonblocking`` (collapsed stacks, the
target is not paused while sampled) on each named process, children included, and stops
them with SIGINT (py-spy then writes its file); :func:`summarize` reads a collapsed-stack
file into the functions that hold the most samples, by self time and inclusive.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY_SPY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "py-spy"


@dataclass
class Profiles:
    out_dir: Path
    rate: int = 100
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    def start(self, name: str, pid: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.txt"
        proc = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
             "--rate", str(self.rate), "--nonblocking", "--subprocesses", "--duration", "3600"],
            stdout=subprocess.DEVNULL, stderr=open(self.out_dir / f"{name}.log", "wb"))
        self.running[name] = (proc, out)

    def stop(self) -> dict[str, dict[str, Any]]:
        for proc, _out in self.running.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
        summaries = {}
        for name, (proc, out) in self.running.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                summaries[name] = {"file": str(out), **summarize(out)}
        self.running.clear()
        return summaries


def _frame_name(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``function (module.py)``."""
    if " (" in frame:
        func, where = frame.split(" (", 1)
        where = where.rstrip(")").rsplit(":", 1)[0]
        parts = where.split("/")
        short = "/".join(parts[-2:]) if "site-packages" in where or "lib" in where else where
        return f"{func} ({short})"
    return frame


def summarize(path: Path, top: int = 25, process: str | None = None) -> dict[str, Any]:
    """Total samples, samples per process (the profiled one first, then its children such as
    pool workers), and the ``top`` functions by self and by inclusive samples, of every
    process or of the processes whose first frame starts with ``process``."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        root = stack.split(";", 1)[0]
        processes[root.split(":", 1)[0]] += count
        if process is not None and not root.startswith(process):
            continue
        total += count
        frames = [_frame_name(f) for f in stack.split(";")[1:]] or [root]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {
        "samples": total,
        "processes": dict(processes),
        "self": [(f, n, round(100 * n / total, 1)) for f, n in own.most_common(top)] if total else [],
        "inclusive": [(f, n, round(100 * n / total, 1)) for f, n in inclusive.most_common(top)]
        if total else [],
    }


if __name__ == "__main__":  # python bench/e2e/profile.py FILE [TOP] ["process PID"]
    import sys

    result = summarize(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40,
                       sys.argv[3] if len(sys.argv) > 3 else None)
    print(f"samples: {result['samples']}; by process: {result['processes']}")
    for kind in ("self", "inclusive"):
        print(f"\n{kind}:")
        for frame, n, pct in result[kind]:
            print(f"  {pct:5.1f} %  {n:7d}  {frame}")
