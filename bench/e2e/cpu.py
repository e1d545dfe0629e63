"""CPU accounting for the end-to-end benchmark: CPU seconds of each process of the stack
(and of its children, such as the normalizer's pool workers) over a run, from ``/proc``.

A process's CPU is ``utime + stime`` of ``/proc/<pid>/stat``; its children's is the
``cutime + cstime`` of the children it has reaped plus the same total of every child
still alive, so a pool worker that is replaced during the run is counted whole (its time
moves into the parent's ``cutime`` when it is reaped). The servers (Kafka, FerretDB, the
S3 server, the SMTP sink) are found by the port they listen on; their CPU is the run's
alone only if nothing else uses them (run the benchmark on servers of its own, see
docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of one process (``own``) and of its children, live and reaped."""

    own: float = 0.0
    children: float = 0.0

    @property
    def total(self) -> float:
        return self.own + self.children

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.own - other.own, self.children - other.children)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return text[text.rindex(")") + 2:].split()


def child_pids(pid: int) -> list[int]:
    """The live direct children of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.extend(int(x) for x in (task / "children").read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    """The live direct and indirect children of ``pid``."""
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = child_pids(todo.pop())
        found.extend(kids)
        todo.extend(kids)
    return found


def process_cpu(pid: int) -> Cpu | None:
    """CPU of ``pid`` and all its descendants; None if it is gone."""
    fields = _stat(pid)
    if fields is None:
        return None
    # after the name: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    own = (int(fields[11]) + int(fields[12])) / TICK
    children = (int(fields[13]) + int(fields[14])) / TICK
    for kid in child_pids(pid):
        sub = process_cpu(kid)
        if sub is not None:
            children += sub.total
    return Cpu(own, children)


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (IPv4 or IPv6), if it is ours to see."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(cols[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(proc.name)
    return None


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass
class CpuMeter:
    """Snapshots of the CPU of named processes and of this process (the benchmark's client:
    submissions, the recording server, polling); :meth:`delta` is the CPU used in between."""

    pids: dict[str, int]

    def snapshot(self) -> dict[str, Cpu]:
        out: dict[str, Cpu] = {}
        for name, pid in self.pids.items():
            cpu = process_cpu(pid)
            if cpu is not None:
                out[name] = cpu
        own = os.times()
        out[CLIENT] = Cpu(own.user + own.system, 0.0)
        return out

    @staticmethod
    def delta(before: dict[str, Cpu], after: dict[str, Cpu]) -> dict[str, Cpu]:
        return {name: after[name] - before[name] for name in after if name in before}


CLIENT = "benchmark client"
