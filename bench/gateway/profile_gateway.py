"""Profile one gateway process under wrk load (bench-only; needs ``pyinstrument`` in .venv).

    .venv/bin/pip install pyinstrument   # not a project dependency
    .venv/bin/python bench/gateway/profile_gateway.py [--connections 64] [--duration 15]

Uses the same database/topic set-up as ``run.py`` (removed afterwards), serves the
gateway in this process under pyinstrument's sampling profiler (or, with ``--steps``,
with timers around the calls insert, the Kafka send and the whole submission), drives it with
``wrk`` and ``submit.lua``, and prints the profile (wall-clock time of the event-loop
thread: time in ``select`` is idle) and writes an HTML copy to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import HERE, RESULTS, TOKEN, URL_PATH, cleanup, free_port, prepare  # noqa: E402

from callingest.settings import Settings  # noqa: E402
from services.gateway.main import serve_one  # noqa: E402

STEPS: dict[str, list[float]] = {}


def time_steps() -> None:
    """Wrap the awaited steps of a submission with timers (``--steps``, no pyinstrument)."""
    from callingest.kafka import Producer
    from services.gateway.calls import CallService
    from services.gateway.writer import CallWriter

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                STEPS.setdefault(label, []).append(time.perf_counter() - started)

        setattr(owner, name, wrapper)

    timed(CallWriter, "insert", "calls insert (queued + batched insert_many)")
    timed(Producer, "send", "Kafka send (acks=all)")
    timed(CallService, "submit", "whole submission (after the body was read)")


def print_steps() -> None:
    for label, values in STEPS.items():
        values.sort()
        print(f"{label}: n={len(values)} median {statistics.median(values) * 1000:.1f} ms "
              f"p90 {values[int(len(values) * 0.9)] * 1000:.1f} ms")


async def profiled(settings: Settings, connections: int, duration: int, steps: bool) -> str:
    """Serve, load and profile (or time the steps); returns the HTML profile."""
    if steps:
        time_steps()

    server = asyncio.create_task(serve_one(settings, with_metrics=True))
    await asyncio.sleep(3.0)
    url = f"http://127.0.0.1:{settings.http_port}{URL_PATH}"
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s",
           str(HERE / "submit.lua"), url]
    env = {**os.environ, "BENCH_TOKEN": TOKEN, "BENCH_RUN": uuid.uuid4().hex[:8]}
    warm_env = {**env, "BENCH_RUN": "warm" + env["BENCH_RUN"]}
    warm = await asyncio.create_subprocess_exec(*cmd[:3], "-d3s", *cmd[4:], env=warm_env,
                                                stdout=subprocess.DEVNULL)
    await warm.wait()
    STEPS.clear()
    if steps:
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.PIPE)
        stdout, _ = await proc.communicate()
        print(stdout.decode().strip().splitlines()[-1])
        print_steps()
        await stop_server(server)
        return ""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.PIPE)
    stdout, _ = await proc.communicate()
    profiler.stop()
    print(stdout.decode().strip().splitlines()[-1])
    print(profiler.output_text(unicode=False, color=False, show_all="--all" in sys.argv))
    await stop_server(server)
    return profiler.output_html()


async def stop_server(server: asyncio.Task[None]) -> None:
    """Stop the gateway the way a service manager does (SIGTERM: graceful shutdown)."""
    os.kill(os.getpid(), signal.SIGTERM)
    await server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--all", action="store_true", help="show library frames too")
    parser.add_argument("--steps", action="store_true", help="time the awaited steps instead")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    settings = Settings(callingest_env="dev", mongodb_database=f"bench_{tag}", topic_prefix=f"bench{tag}.",
                        http_port=free_port(), http_host="127.0.0.1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gateway-profile-{time.strftime('%Y%m%dT%H%M%S')}-c{args.connections}.html"
    asyncio.run(prepare(settings))
    try:
        html = asyncio.run(profiled(settings, args.connections, args.duration, args.steps))
        if html:
            out.write_text(html)
    finally:
        asyncio.run(cleanup(settings))
    if not args.steps:
        print(f"HTML profile: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
