"""Where the machine's CPU goes while one gateway takes submissions at c=64: per process group.

    .venv/bin/python bench/gateway/cpu_split.py [--workers 2] [--duration 15] [--no-scans]

Runs against the dev stack's servers like ``run.py`` (a database and topic prefix of its own,
removed afterwards): after a 3 s warm-up, reads the CPU time of every process from ``/proc``
before and after one wrk run, and prints it per group (the gateway and its workers, FerretDB,
PostgreSQL, Kafka, the rest) as microseconds per request and as cores. wrk's own CPU is not
counted (it exits before the second reading). See docs/benchmarks.md, "Fresh machine,
2026-12-01 (second session)".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # this directory's benchmark: its servers, wrk and process helpers

# First match wins: the servers before the gateway (whose workers are multiprocessing children).
GROUPS = (("ferretdb", ("ferretdb",)), ("postgresql", ("postgres",)), ("kafka", ("kafka",)),
          ("gateway", ("serve_gateway", "multiprocessing")))


def group(cmdline: str) -> str:
    return next((name for name, needles in GROUPS if any(n in cmdline for n in needles)), "other")


def cpu_by_pid() -> dict[int, tuple[str, float]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[int(entry.name)] = (cmdline, run.cpu_seconds(int(entry.name)))
            except OSError:  # the process ended meanwhile
                continue
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--no-scans", action="store_true")
    args = parser.parse_args()
    run.require_wrk(parser)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    log = run.RESULTS / f"cpu-split-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.log"
    settings = run.new_settings()
    try:
        gateway, port = run.start_gateway(run.gateway_env(settings, args.workers, None, None), True, log,
                                          scans=not args.no_scans)
        try:
            run.wrk(port, 64, 3, f"warm{uuid.uuid4().hex[:8]}", log)
            before, started = cpu_by_pid(), time.monotonic()
            result = run.wrk(port, 64, args.duration, uuid.uuid4().hex[:8], log)
            after, elapsed = cpu_by_pid(), time.monotonic() - started
        finally:
            run.stop(gateway)
    finally:
        asyncio.run(run.cleanup(settings))
    totals: dict[str, float] = {}
    for pid, (cmdline, cpu) in after.items():
        used = cpu - before.get(pid, (cmdline, 0.0))[1]
        totals[group(cmdline)] = totals.get(group(cmdline), 0.0) + used
    requests = result["requests"]
    print(f"gateway, {args.workers} worker(s), c=64: {result['rps']:.0f} req/s, {requests} requests "
          f"in {elapsed:.1f} s")
    print("| processes | CPU µs per request | cores |")
    print("|---|---:|---:|")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds / requests * 1e6:.0f} | {seconds / elapsed:.2f} |")
    print(f"raw output: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
