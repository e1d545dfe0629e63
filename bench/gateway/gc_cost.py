"""Where a gateway's CPU per submission goes, tracing off and on: garbage collection and threads.

    .venv/bin/python bench/gateway/gc_cost.py [--rounds 3] [--duration 8] [--gc-threshold N]

Starts two gateways as ``run.py --tracing`` does (tracing off, and on with every span exported
over OTLP/HTTP to ``otlp_sink.py``), each on a database of its own, and drives one at a time
with wrk at c=64, alternating. Each gateway runs under this script (``--serve``), which times
every collection with ``gc.callbacks`` (CPU of the collecting thread). Per wrk run it prints
throughput, the process's CPU per submission, the collector's share of it (per generation:
microseconds and number of collections) and the CPU of the event loop's thread and of the
others (the BatchSpanProcessor's). ``--gc-threshold N`` replaces the young generation's
threshold that ``callingest.service.settle_heap`` sets at start-up (e.g. 700, CPython's default).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import runpy
import signal
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def serve(threshold: int | None, stats_file: str) -> None:
    """Run serve_gateway.py in this process with the collector timed; SIGUSR1 appends the
    totals so far to ``stats_file``."""
    totals = {generation: [0, 0.0] for generation in range(3)}
    started: dict[int, float] = {}

    def timed(phase: str, info: dict[str, int]) -> None:
        me = threading.get_ident()
        if phase == "start":
            started[me] = time.thread_time()
        elif me in started:
            total = totals[info["generation"]]
            total[0] += 1
            total[1] += time.thread_time() - started.pop(me)

    def dump(*_: Any) -> None:
        with open(stats_file, "a") as out:
            out.write(json.dumps({"gc": totals, "thresholds": gc.get_threshold()}) + "\n")

    gc.callbacks.append(timed)
    signal.signal(signal.SIGUSR1, dump)
    if threshold is not None:
        import callingest.service

        callingest.service.GC_THRESHOLDS = (threshold, *callingest.service.GC_THRESHOLDS[1:])
    sys.argv = [str(HERE / "serve_gateway.py")]
    runpy.run_path(sys.argv[0], run_name="__main__")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def gc_totals(pid: int, stats_file: Path) -> list[list[float]]:
    lines = stats_file.read_text().splitlines() if stats_file.exists() else []
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = stats_file.read_text().splitlines() if stats_file.exists() else []
        if len(now) > len(lines):
            return [list(v) for v in json.loads(now[-1])["gc"].values()]
        time.sleep(0.05)
    raise RuntimeError(f"gateway {pid} wrote no GC totals")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--gc-threshold", type=int, default=None)
    parser.add_argument("--serve", metavar="STATS_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.gc_threshold, args.serve)
        return 0

    sys.path.insert(0, str(HERE))
    import run

    run.RESULTS.mkdir(parents=True, exist_ok=True)
    log = run.RESULTS / f"gc-cost-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.log"
    sink_port = run.free_port()
    sink = run.start([run.PYTHON, str(HERE / "otlp_sink.py"), str(sink_port)], {},
                     log.with_suffix(".otlp.log"))
    threshold = [] if args.gc_threshold is None else ["--gc-threshold", str(args.gc_threshold)]
    targets: dict[str, tuple[Any, Any, int, Path]] = {}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for tracing in ("off", "on"):
            settings = run.new_settings()
            stats = log.with_suffix(f".{tracing}.gc.jsonl")
            port = run.free_port()
            env = {**run.gateway_env(settings, 1, tracing, sink_port), "HTTP_PORT": str(port)}
            gateway = run.start([run.PYTHON, __file__, *threshold, "--serve", str(stats)], env,
                                log.with_suffix(".gateway.log"))
            targets[tracing] = (settings, gateway, port, stats)
            run.wait_ready(f"http://127.0.0.1:{port}/readyz")
        for _, _, port, _ in targets.values():
            run.wrk(port, 64, 3, f"warm{uuid.uuid4().hex[:8]}", log)
        for round_ in range(args.rounds):
            for tracing in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                _, gateway, port, stats = targets[tracing]
                gc_before, threads_before = gc_totals(gateway.pid, stats), thread_cpu(gateway.pid)
                result = run.wrk(port, 64, args.duration, f"c64{uuid.uuid4().hex[:8]}", log)
                gc_after, threads_after = gc_totals(gateway.pid, stats), thread_cpu(gateway.pid)
                n = result["requests"]
                per = {tid: (threads_after[tid] - threads_before.get(tid, 0.0)) * 1e6 / n
                       for tid in threads_after}
                loop_us = per.pop(gateway.pid, 0.0)
                collections = [(gc_after[g][1] - gc_before[g][1]) * 1e6 / n for g in range(3)]
                counts = [int(gc_after[g][0] - gc_before[g][0]) for g in range(3)]
                total = loop_us + sum(per.values())
                cpu[tracing].append(total)
                print(f"round {round_ + 1}, tracing {tracing}: {result['rps']:.0f} req/s, CPU "
                      f"{total:.0f} us/submission (event loop thread {loop_us:.0f}, others "
                      f"{sum(per.values()):.0f}), collector {sum(collections):.1f} us/submission ("
                      + ", ".join(f"gen {g} {collections[g]:.1f} us in {counts[g]}" for g in range(3))
                      + ")", flush=True)
    finally:
        for settings, gateway, _, _ in targets.values():
            run.stop(gateway)
            asyncio.run(run.cleanup(settings))
        run.stop(sink)
    if cpu["off"] and cpu["on"]:
        off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
        print(f"median CPU per submission: off {off:.0f} us, on {on:.0f} us ({on / off - 1:+.1%})")
    print(f"raw output: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
