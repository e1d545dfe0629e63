"""Kafka stopped for 10 s under steady submission.

While the broker is down the gateway answers 503 with Retry-After; it recovers
by itself once the broker is back; every call the client saw accepted (and
every 503'd call the client submits again) is published on calls.submitted
exactly once and reaches exactly one terminal state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.system.fault.harness import Answer, Report, open_pipeline
from tests.system.fault.privatestack import PrivateServers

pytestmark = [pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(420)]

RATE_PER_SECOND = 5
MAX_CONCURRENT = 24
OUTAGE_SECONDS = 10.0


async def steady(submit: Any, stop: asyncio.Event, answers: list[Answer],
                 times: dict[str, tuple[float, float]]) -> None:
    """Submit RATE_PER_SECOND new calls a second until ``stop``; keeps every answer."""
    slots = asyncio.Semaphore(MAX_CONCURRENT)
    tasks: set[asyncio.Task[None]] = set()

    async def one(external_id: str) -> None:
        async with slots:
            started = time.monotonic()
            answers.append(await submit(external_id))
            times[external_id] = (started, time.monotonic())

    while not stop.is_set():
        task = asyncio.create_task(one(f"kafka-{uuid.uuid4().hex}"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(1.0 / RATE_PER_SECOND)
    await asyncio.gather(*tasks)


async def test_kafka_stopped_10s_under_steady_submission(faults: PrivateServers,
                                                         wav: bytes) -> None:
    settings = make_settings(faults.ports, max_processing_attempts=10,
                             retry_delays_seconds=[1.0, 2.0])
    async with open_pipeline(settings, faults.mail_dir, wav, "kafka-outage") as pipeline:
        answers: list[Answer] = []
        sent_at: dict[str, tuple[float, float]] = {}
        stop = asyncio.Event()
        load = asyncio.create_task(steady(pipeline.submit, stop, answers, sent_at))
        await asyncio.sleep(3.0)
        await asyncio.to_thread(faults.stop, "kafka")
        down_at = time.monotonic()  # the broker's port is closed from here on
        await asyncio.sleep(OUTAGE_SECONDS)
        restart_at = time.monotonic()
        await asyncio.to_thread(faults.start, "kafka")
        up_at = time.monotonic()
        await asyncio.sleep(15.0)  # the gateway must find the broker again by itself
        stop.set()
        await load

        statuses = [a.status for a in answers]
        # Requests made and answered while the broker was certainly down.
        during = [a for a in answers if sent_at[a.external_id][0] > down_at
                  and sent_at[a.external_id][1] < restart_at]
        unavailable = [a for a in answers if a.status == 503]
        assert unavailable, f"no 503 while Kafka was down: {statuses}"
        assert all(a.status in (201, 202, 503) for a in answers), sorted(set(map(str, statuses)))
        assert all(a.status == 503 for a in during), [a.status for a in during]
        for answer in unavailable:
            assert answer.retry_after is not None and int(answer.retry_after) > 0
            assert answer.body is not None
            assert answer.body["errors"]["class"] == "ServiceUnavailable"
        recovered = [a for a in answers if a.accepted and sent_at[a.external_id][0] > up_at]
        assert recovered, "the gateway did not accept calls again after the broker came back"

        # The client retries each 503 with the same content, as Retry-After tells it to.
        retried: list[Answer] = []
        for answer in unavailable:
            again = await pipeline.submit(answer.external_id)
            deadline = time.monotonic() + 60
            while not again.accepted and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                again = await pipeline.submit(answer.external_id)
            retried.append(again)
        assert all(a.accepted for a in retried), [a.status for a in retried]

        accepted = {a.cuid for a in [*answers, *retried] if a.cuid}
        stored = await pipeline.db.calls.count_documents({})
        report = Report("kafka_outage", submitted=len({a.external_id for a in answers}))
        assert during, "no request was made and answered during the outage"
        report.extra.update(answers_503=len(unavailable), outage_seconds=round(up_at - down_at, 1),
                            answered_during_outage=len(during),
                            calls_stored=stored)
        await pipeline.account(report, accepted, timeout=240)
        assert stored == len(accepted)
