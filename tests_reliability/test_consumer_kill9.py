"""Issue 4's acceptance under faults: 200 calls in flight, kill -9 of each consumer service
in turn, restarted: every call reaches exactly one terminal state, no duplicate email, no
second S3 object for the same call and stage.

A quarter of the calls have a recording that answers 404 so that the failure path (calls.failed,
the notifier, its email) is exercised by the kills too.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.conftest import make_settings
from tests.system.fault.harness import Report, open_pipeline, service_up
from tests.system.fault.privatestack import PrivateServers

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(900)]

CALLS = 200
CONSUMERS = ("validator", "fetcher", "normalizer", "notifier")


async def test_kill9_each_consumer_in_turn_with_200_calls_in_flight(
    faults: PrivateServers, wav: bytes
) -> None:
    settings = make_settings(faults.ports, max_in_flight=8, fetch_max_attempts=1,
                             retry_delays_seconds=[1.0, 2.0], max_processing_attempts=3)
    async with open_pipeline(settings, faults.mail_dir, wav, "consumer-kill9") as pipeline:
        names = [f"missing-{i}.wav" if i % 4 == 0 else f"ok-{i}.wav" for i in range(CALLS)]
        slots = asyncio.Semaphore(32)

        async def one(i: int) -> str:
            async with slots:
                answer = await pipeline.submit(f"ck-{i}", names[i])
                assert answer.status == 201, answer
                return str(answer.cuid)

        cuids = await asyncio.gather(*(one(i) for i in range(CALLS)))
        kills: dict[str, float] = {}
        for consumer in CONSUMERS:
            await asyncio.sleep(2.0)
            pipeline.services.stop(consumer, sig=signal.SIGKILL)
            started = time.monotonic()
            await service_up(pipeline, consumer)
            kills[consumer] = round(time.monotonic() - started, 1)
        report = Report("consumer_kill9", submitted=CALLS)
        report.extra["restart_seconds"] = kills
        calls = await pipeline.account(report, set(cuids), timeout=600, expect_status=None)
        for cuid, name in zip(cuids, names, strict=True):
            expected = "failed" if name.startswith("missing-") else "normalized"
            assert calls[cuid]["status"] == expected, (name, calls[cuid].get("failure"))
        mails = pipeline.mails()
        assert all(mails[c] == 1 for c, n in zip(cuids, names, strict=True)
                   if n.startswith("missing-"))
