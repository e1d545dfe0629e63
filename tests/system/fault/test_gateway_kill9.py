"""kill -9 of the gateway during a burst of submissions.

Every 201/202 the client saw names a call that is published and completes
exactly once; calls whose answer was lost with the connection are accepted
(201 or 202, same cuid) when the client submits them again to the restarted
gateway, and complete too. Nothing stays unpublished, and nothing is
published twice: a call killed between Kafka's acknowledgement and its receipt
is found on the topic when it is submitted again, not published again.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.conftest import make_settings
from tests.system.fault.harness import Answer, Report, open_pipeline, service_up
from tests.system.fault.privatestack import PrivateServers

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(300)]

BURST = 200
CONCURRENCY = 32
KILL_AFTER_ANSWERS = 60


async def test_gateway_killed_during_a_burst(faults: PrivateServers, wav: bytes) -> None:
    settings = make_settings(faults.ports)
    async with open_pipeline(settings, faults.mail_dir, wav, "gateway-kill9") as pipeline:
        gateway = pipeline.gateway
        answers: list[Answer] = []
        slots = asyncio.Semaphore(CONCURRENCY)
        enough = asyncio.Event()

        async def one(i: int) -> None:
            async with slots:
                answer = await pipeline.submit(f"burst-{i}", gateway=gateway, timeout=20)
                answers.append(answer)
                if len(answers) >= KILL_AFTER_ANSWERS:
                    enough.set()

        burst = asyncio.gather(*(one(i) for i in range(BURST)))
        await asyncio.wait_for(enough.wait(), 60)
        pipeline.services.stop("gateway", sig=signal.SIGKILL)
        killed_at = time.monotonic()
        await burst

        statuses = [a.status for a in answers]
        assert set(statuses) <= {201, 202, None}, statuses
        seen_accepted = {str(a.cuid) for a in answers if a.accepted}
        unanswered = [a.external_id for a in answers if a.status is None]
        assert seen_accepted and unanswered, statuses  # the kill did land mid-burst

        await service_up(pipeline, "gateway")
        restarted_in = time.monotonic() - killed_at
        retried: dict[str, Answer] = {}
        for external_id in unanswered:
            deadline = time.monotonic() + 60
            answer = await pipeline.submit(external_id)
            while not answer.accepted and time.monotonic() < deadline:
                assert answer.status in (None, 503), answer
                await asyncio.sleep(1.0)
                answer = await pipeline.submit(external_id)
            assert answer.accepted, answer
            retried[external_id] = answer

        report = Report("gateway_kill9", submitted=BURST)
        report.extra.update(accepted_before_kill=len(seen_accepted),
                            unanswered_at_kill=len(unanswered),
                            gateway_restart_seconds=round(restarted_in, 1))
        accepted = seen_accepted | {str(a.cuid) for a in retried.values()}
        await pipeline.account(report, accepted, timeout=240)
        assert await pipeline.db.calls.count_documents({}) == len(accepted) == BURST
