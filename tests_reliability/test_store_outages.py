"""The MongoDB-protocol store stopped for 10 s during processing, and the S3 store stopped
for 10 s during fetching: consumers pause and retry, nothing is lost, nothing is done twice,
and no offset is committed past unprocessed work (every call still completes afterwards).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import make_settings
from tests.system.fault.harness import Report, count_events, open_pipeline
from tests.system.fault.privatestack import PrivateServers

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(900)]

CALLS = 120
OUTAGE_SECONDS = 10.0


@pytest.mark.parametrize("component", ["mongodb", "s3"])
async def test_store_stopped_10s_during_processing(faults: PrivateServers, wav: bytes,
                                                    component: str) -> None:
    # Retries outlast the outage: 2 + 4 + 8 + 8 + 8 s before a call would give up.
    settings = make_settings(faults.ports, max_in_flight=8, retry_delays_seconds=[2.0, 4.0, 8.0],
                             max_processing_attempts=6)
    async with open_pipeline(settings, faults.mail_dir, wav, f"{component}-outage") as pipeline:
        answers = await asyncio.gather(*(pipeline.submit(f"{component}-{i}", f"ok-{i}.wav")
                                         for i in range(CALLS)))
        assert all(a.status == 201 for a in answers), [a.status for a in answers]
        cuids = {str(a.cuid) for a in answers}

        async def some_fetched() -> int:
            return len(await count_events(settings, pipeline.topics.fetched))

        deadline = time.monotonic() + 60
        while await some_fetched() < 5:  # the outage starts while calls are mid-pipeline
            assert time.monotonic() < deadline, "processing never started"
            await asyncio.sleep(0.2)
        before = await pipeline.calls(cuids)
        in_progress = sum(1 for c in before.values() if c["status"] not in ("normalized", "failed"))
        await asyncio.to_thread(faults.stop, component)
        stopped_at = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(faults.start, component)
        report = Report(f"{component}_outage", submitted=CALLS)
        report.extra.update(in_progress_at_outage=in_progress,
                            outage_seconds=round(time.monotonic() - stopped_at, 1))
        assert in_progress > 0
        await pipeline.account(report, cuids, timeout=400)
