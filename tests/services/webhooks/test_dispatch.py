"""The deliverer on the real servers (Kafka in, MongoDB, loopback receivers): a hanging or dead
receiver delays no other receiver or network, nor do many hanging receivers of one network;
production refuses loopback without connecting; retries keep the event id and give up only
after the retry period."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from callingest.settings import Settings
from callingest.topics import Topics
from callingest.webhooks import next_retry_in
from services.webhooks.dispatch import Dispatcher
from services.webhooks.intake import Intake
from tests.conftest import free_port, wait_until
from tests.services.webhooks.conftest import (
    Receiver,
    apply,
    doc_verify,
    fail_call,
    fail_calls,
    network,
    new_secret,
)

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


def _tuned(settings: Settings, **overrides: Any) -> Settings:
    """This test's settings (its topics and database) with short webhook delays."""
    values: dict[str, Any] = {"webhook_retry_first_seconds": 0.5,
                              "webhook_retry_max_delay_seconds": 1.0,
                              "webhook_poll_interval_seconds": 0.2}
    return settings.model_copy(update={**values, **overrides})


@pytest.fixture
def deliverer(db: Any, topics: Topics) -> Callable[..., Any]:
    """``async with deliverer(settings)``: the intake and dispatcher running in this process."""

    @contextlib.asynccontextmanager
    async def run(settings: Settings) -> AsyncIterator[Dispatcher]:
        wake = asyncio.Event()
        intake, dispatcher = Intake(settings, db, wake), Dispatcher(settings, db, wake)
        tasks = [asyncio.create_task(intake.run()), asyncio.create_task(dispatcher.run())]
        try:
            yield dispatcher
        finally:
            intake.stop()
            dispatcher.stop()
            await asyncio.wait(tasks, timeout=20)
            for task in tasks:
                task.cancel()

    return run


async def test_a_hanging_and_a_dead_receiver_delay_no_other_receiver_or_network(
        settings: Settings, db: Any, topics: Topics, receivers: Any, deliverer: Any,
        tmp_path: Path) -> None:
    settings = _tuned(settings, webhook_timeout_seconds=10.0, webhook_max_in_flight=4,
                         webhook_concurrency_per_endpoint=2)
    hanging: Receiver = await receivers(hang=True)
    healthy: Receiver = await receivers()
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: connection refused
    await apply(db, tmp_path, [
        network("1001", [
            {"id": "hangs", "url": hanging.url, "secret": new_secret(), "events": ["call.failed"]},
            {"id": "dead", "url": dead, "secret": new_secret(), "events": ["call.failed"]}]),
        network("3003", [
            {"id": "ok", "url": healthy.url, "secret": new_secret(), "events": ["call.failed"]}]),
    ])
    # The troubled network's events come first and outnumber every limit.
    cuids = await fail_calls(settings, db, ["1001"] * 8 + ["3003"] * 3)
    ok = cuids[8:]
    async with deliverer(settings):
        await wait_until(lambda: len(set(healthy.ids())) == 3, timeout=60, what="healthy deliveries")
        # All three arrived while the hanging receiver's first attempts were still hanging:
        # no attempt of it has ended, and it never held more than its own two lanes.
        hung = await db.webhook_deliveries.count_documents(
            {"webhook_id": "hangs", "attempts_made": {"$gt": 0}})
        assert hung == 0
        assert len(hanging.requests) <= 2
        assert {f"evt_{cuid}_failed_1" for cuid in ok} == set(healthy.ids())
        async for delivery in db.webhook_deliveries.find({"webhook_id": "ok"}):
            # Sent as soon as queued: it never waited for a lane of the hanging receiver.
            waited = (delivery["attempts"][0]["at"] - delivery["created_at"]).total_seconds()
            assert waited < 5.0
        dead_attempts = await db.webhook_deliveries.count_documents(
            {"webhook_id": "dead", "attempts.outcome": "connection_error"})
        assert dead_attempts > 0  # the dead receiver was tried, failed fast, waits for a retry

        # The hanging attempt ends at the timeout and is retried with the same event id.
        await wait_until(lambda: any(hanging.ids().count(i) >= 2 for i in hanging.ids()),
                         timeout=60, what="a retry of a timed-out delivery")
        timed_out = await db.webhook_deliveries.find_one(
            {"webhook_id": "hangs", "attempts.outcome": "timeout"})
        assert timed_out["attempts"][0]["error"] == "no answer within 10 s"


async def test_a_network_of_many_hanging_receivers_takes_only_its_share_of_the_lanes(
        settings: Settings, db: Any, topics: Topics, receivers: Any, deliverer: Any,
        tmp_path: Path) -> None:
    # Six hanging endpoints of one network want 12 lanes, more than the process has (8).
    settings = _tuned(settings, webhook_timeout_seconds=30.0, webhook_max_in_flight=8,
                      webhook_max_in_flight_per_network=4, webhook_concurrency_per_endpoint=2)
    hanging: list[Receiver] = [await receivers(hang=True) for _ in range(6)]
    healthy: Receiver = await receivers()
    await apply(db, tmp_path, [
        network("1001", [{"id": f"hangs-{i}", "url": r.url, "secret": new_secret(),
                          "events": ["call.failed"]} for i, r in enumerate(hanging)]),
        network("3003", [
            {"id": "ok", "url": healthy.url, "secret": new_secret(), "events": ["call.failed"]}]),
    ])

    def hung() -> int:
        return sum(len(r.requests) for r in hanging)

    async with deliverer(settings):
        await fail_calls(settings, db, ["1001"] * 4)
        await wait_until(lambda: db.webhook_deliveries.count_documents({"network_id": "1001"}),
                         timeout=60, what="the hanging network's deliveries")
        await wait_until(lambda: hung() >= 4, timeout=60, what="hanging attempts")
        await asyncio.sleep(1.0)  # five polls: room for more attempts, had the network any
        assert await db.webhook_deliveries.count_documents({"network_id": "1001"}) == 24
        assert hung() == 4  # its share, although 20 of its deliveries are due
        ok = await fail_calls(settings, db, ["3003"] * 3)
        await wait_until(lambda: len(set(healthy.ids())) == 3, timeout=60, what="healthy deliveries")
        # Delivered while every hanging attempt still hangs: none has ended (timed out).
        ended = await db.webhook_deliveries.count_documents(
            {"network_id": "1001", "attempts_made": {"$gt": 0}})
        assert ended == 0
        assert hung() == 4
    assert {f"evt_{cuid}_failed_1" for cuid in ok} == set(healthy.ids())


async def test_waiting_for_its_own_busy_endpoint_is_not_dispatch_lag(
        settings: Settings, db: Any, topics: Topics, receivers: Any, deliverer: Any,
        tmp_path: Path) -> None:
    # One lane: each of the hanging receiver's deliveries waits for the previous one's timeout.
    settings = _tuned(settings, webhook_timeout_seconds=2.0, webhook_concurrency_per_endpoint=1)
    hanging: Receiver = await receivers(hang=True)
    await apply(db, tmp_path, [network("1001", [
        {"id": "hangs", "url": hanging.url, "secret": new_secret(), "events": ["call.failed"]}])])

    def delays() -> tuple[float, float]:
        """(observations of the dispatch delay, those of at most 1 s) so far."""
        name = "callingest_webhook_dispatch_delay_seconds"
        return (REGISTRY.get_sample_value(f"{name}_count") or 0.0,
                REGISTRY.get_sample_value(f"{name}_bucket", {"le": "1.0"}) or 0.0)

    count, prompt = delays()
    async with deliverer(settings):
        await fail_calls(settings, db, ["1001"] * 3)
        # the third event's first attempt waited for two timeouts of its endpoint
        await wait_until(lambda: len(set(hanging.ids())) == 3, timeout=60, what="three attempts")
    after_count, after_prompt = delays()
    assert after_count - count >= 3
    assert after_prompt - prompt == after_count - count  # none counted its endpoint's wait


async def test_production_refuses_loopback_receivers_without_connecting(
        settings: Settings, db: Any, topics: Topics, receivers: Any, deliverer: Any,
        tmp_path: Path) -> None:
    settings = _tuned(settings, allow_loopback_webhooks=False)
    receiver: Receiver = await receivers()
    port = receiver.url.split(":")[2].split("/")[0]
    await apply(db, tmp_path, [network("1001", [
        {"id": "literal", "url": receiver.url, "secret": new_secret(), "events": ["call.failed"]},
        {"id": "named", "url": f"http://localhost:{port}/hook", "secret": new_secret(),
         "events": ["call.failed"]}])])
    async with deliverer(settings):
        cuid = await fail_call(settings, db, "1001")

        async def refused() -> dict[str, str]:
            out = {}
            async for d in db.webhook_deliveries.find({"cuid": cuid, "attempts.outcome": "refused"}):
                out[d["webhook_id"]] = d["attempts"][0]["error"]
            return out if len(out) == 2 else {}

        errors = await wait_until(refused, timeout=60, what="refused attempts")
    assert errors["literal"] == "refused: 127.0.0.1: loopback address"
    assert errors["named"].startswith("address refused: localhost (")
    assert errors["named"].endswith("loopback address")
    assert receiver.requests == []


async def test_while_a_secret_is_rotated_deliveries_verify_with_the_old_and_the_new_secret(
        settings: Settings, db: Any, topics: Topics, receivers: Any, deliverer: Any,
        tmp_path: Path) -> None:
    receiver: Receiver = await receivers()
    old, new = new_secret(), new_secret()
    await apply(db, tmp_path, [network("1001", [
        {"id": "wh", "url": receiver.url, "secret": new, "previous_secrets": [old],
         "events": ["call.failed"]}])])
    async with deliverer(_tuned(settings)):
        await fail_call(settings, db, "1001")
        await wait_until(lambda: receiver.requests, timeout=60, what="a delivery")
    (request,) = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    verify = doc_verify()
    for secret in (old, new):
        assert verify(secret, request.headers, request.body)
        Webhook(secret).verify(request.body, request.headers)
    assert not verify(new_secret(), request.headers, request.body)


async def test_a_receiver_that_always_fails_is_retried_with_one_id_then_given_up(
        settings: Settings, db: Any, topics: Topics, receivers: Any, deliverer: Any,
        tmp_path: Path) -> None:
    settings = _tuned(settings, webhook_retry_for_seconds=3.0)
    receiver: Receiver = await receivers(answer=lambda _r, _n: 503)
    await apply(db, tmp_path, [network("1001", [
        {"id": "wh", "url": receiver.url, "secret": new_secret(), "events": ["call.failed"]}])])
    before = REGISTRY.get_sample_value("callingest_webhook_deliveries_total",
                                       {"event": "call.failed", "outcome": "abandoned"}) or 0.0
    async with deliverer(settings):
        cuid = await fail_call(settings, db, "1001")
        await wait_until(lambda: db.webhook_deliveries.find_one({"cuid": cuid, "status": "failed"}),
                         timeout=60, what="given up")
    delivery = await db.webhook_deliveries.find_one({"cuid": cuid})
    assert len(delivery["attempts"]) >= 3
    assert set(receiver.ids()) == {f"evt_{cuid}_failed_1"}
    assert [a["status_code"] for a in delivery["attempts"]] == [503] * len(delivery["attempts"])
    after = REGISTRY.get_sample_value("callingest_webhook_deliveries_total",
                                      {"event": "call.failed", "outcome": "abandoned"})
    assert after == before + 1


def test_the_production_schedule_retries_within_a_minute_then_backs_off_with_jitter_for_a_day() -> None:
    settings = Settings()
    rng = random.Random(7)
    assert all(next_retry_in(1, 0.0, settings, random.Random(s)) <= 60 for s in range(200))  # type: ignore[operator]
    age, attempts, delays = 0.0, 1, []
    while (delay := next_retry_in(attempts, age, settings, rng)) is not None:
        delays.append(delay)
        age += delay
        attempts += 1
    assert age >= 24 * 3600  # the last attempt comes at least a day after the event
    assert delays[1] > delays[0] * 1.2 and max(delays) <= settings.webhook_retry_max_delay_seconds * 1.25
    assert len(set(delays)) == len(delays)  # jittered, never a fixed grid
    assert attempts < 40
