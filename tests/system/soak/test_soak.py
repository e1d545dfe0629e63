"""Soak: steady load through the whole pipeline; throughput, memory of every service over
time, end-state counts.

``SOAK_SECONDS`` (default 60; ``make soak DURATION=...`` sets it) of submissions at
``SOAK_RATE`` calls a second (default 4) on loopback. Every
``SAMPLE_SECONDS`` the RSS (from /proc, summed over each service's process tree) of the
five services is sampled. Asserted: every accepted call normalized exactly once, nothing
lost or duplicated, and no service's RSS grows by more than the bound between the end of
the warm-up (the first third) and the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.system.fault.harness import FIGURES_DIR, SERVICES, Answer, Report, one_second_wav, open_pipeline
from tools import devstack

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SOAK_RATE = float(os.environ.get("SOAK_RATE", "4"))
SAMPLE_SECONDS = 5.0
GROWTH_BOUND_MB = float(os.environ.get("SOAK_GROWTH_BOUND_MB", "40"))

pytestmark = [pytest.mark.slow, pytest.mark.stack,
              pytest.mark.timeout(int(SOAK_SECONDS * 2 + 300))]


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, in MiB (0 if gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


async def test_soak(servers: devstack.Ports, tmp_path: Path) -> None:
    settings = make_settings(servers, max_in_flight=16)
    async with open_pipeline(settings, devstack.RUN / "mail", one_second_wav(tmp_path),
                             "soak") as pipeline:
        pids = {name: pipeline.services.running[name].proc.pid for name in SERVICES}
        samples: list[dict[str, float]] = []
        answers: list[Answer] = []
        started = time.monotonic()

        async def sample() -> None:
            while True:
                samples.append({"t": round(time.monotonic() - started, 1),
                                **{n: round(tree_rss_mb(p), 1) for n, p in pids.items()}})
                await asyncio.sleep(SAMPLE_SECONDS)

        async def one(i: int) -> None:
            answers.append(await pipeline.submit(f"soak-{i}", f"ok-{i % 50}.wav"))

        sampler = asyncio.create_task(sample())
        tasks: list[asyncio.Task[None]] = []
        i = 0
        while time.monotonic() - started < SOAK_SECONDS:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, started + i / SOAK_RATE - time.monotonic()))
        await asyncio.gather(*tasks)
        submitted_for = time.monotonic() - started
        accepted = {str(a.cuid) for a in answers if a.accepted}
        report = Report("soak", submitted=len(answers))
        await pipeline.wait_terminal(accepted, timeout=SOAK_SECONDS + 120)
        drained_for = time.monotonic() - started
        sampler.cancel()
        samples.append({"t": round(drained_for, 1),
                        **{n: round(tree_rss_mb(p), 1) for n, p in pids.items()}})

        warm = samples[max(1, len(samples) // 3)]
        growth = {n: round(samples[-1][n] - warm[n], 1) for n in SERVICES}
        report.extra.update(
            duration_seconds=SOAK_SECONDS, rate_per_second=SOAK_RATE,
            submit_seconds=round(submitted_for, 1), drained_seconds=round(drained_for, 1),
            throughput_calls_per_second=round(len(accepted) / drained_for, 2),
            rss_growth_mb_after_warmup=growth, rss_bound_mb=GROWTH_BOUND_MB,
            rss_peak_mb={n: max(s[n] for s in samples) for n in SERVICES})
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        (FIGURES_DIR / "soak-samples.json").write_text(json.dumps(samples, indent=1))
        print("\nRSS MiB over time:\n" + "\n".join(json.dumps(s) for s in samples))
        assert len(accepted) == len(answers), sorted({a.status for a in answers}, key=str)
        await pipeline.account(report, accepted, timeout=30)
        assert all(g < GROWTH_BOUND_MB for g in growth.values()), growth
