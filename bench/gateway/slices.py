"""One gateway under a steady wrk load, measured in short slices: where its rate dips, and what
the store was doing then (see docs/benchmarks.md, "Fresh machine, 2026-12-01").

    .venv/bin/python bench/gateway/slices.py [--slices 36] [--seconds 5] [--connections 4]
        [--tracing off|on|default] [--no-scans]

Runs against the dev stack's servers, like ``run.py`` (a database and topic prefix of its own,
removed afterwards). Each slice prints the gateway's rate, p50 and p99, its CPU per request
and, on the PostgreSQL store, the vacuums in progress at the slice's end
(``pg_stat_progress_vacuum``). ``--no-scans``: the gateway does not run the republisher's
minute scan for unpublished calls.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # this directory's benchmark: its servers, wrk and process helpers (and ROOT on the path)

from tools import devstack

VACUUMS = ("SELECT coalesce(string_agg(relid::regclass || ' ' || phase, ', '), '-') "
           "FROM pg_stat_progress_vacuum")


def vacuums() -> str:
    if devstack.store_backend() != "postgresql":
        return "n/a"
    try:
        return devstack.psql(devstack.Ports().postgresql, VACUUMS, timeout=5)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"({type(exc).__name__})"


def measure(pid: int, port: int, args: argparse.Namespace, log: Path) -> None:
    """wrk in ``args.slices`` slices of ``args.seconds``; a table row per slice."""
    started = time.monotonic()
    print("| s | req/s | p50 ms | p99 ms | CPU µs per request | vacuums |")
    print("|---:|---:|---:|---:|---:|---|")
    for _ in range(args.slices):
        cpu = run.cpu_seconds(pid)
        result = run.wrk(port, args.connections, args.seconds, uuid.uuid4().hex[:8], log)
        cpu_us = (run.cpu_seconds(pid) - cpu) / max(result["requests"], 1) * 1e6
        print(f"| {time.monotonic() - started:.0f} | {result['rps']:.0f} | {result['p50_us'] / 1000:.1f} "
              f"| {result['p99_us'] / 1000:.1f} | {cpu_us:.0f} | {vacuums()} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=36)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--tracing", choices=("off", "on", "default"), default="off")
    parser.add_argument("--no-scans", action="store_true")
    args = parser.parse_args()
    run.require_wrk(parser)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    log = run.RESULTS / f"slices-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.log"
    sink, sink_port = run.start_sink(log)
    settings = run.new_settings()
    tracing = None if args.tracing == "default" else args.tracing
    try:
        gateway, port = run.start_gateway(run.gateway_env(settings, 1, tracing, sink_port), True, log,
                                          scans=not args.no_scans)
        try:
            measure(gateway.pid, port, args, log)
        finally:
            run.stop(gateway)
    finally:
        run.stop(sink)
        asyncio.run(run.cleanup(settings))
    print(f"raw output: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
