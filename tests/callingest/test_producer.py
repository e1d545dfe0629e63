"""callingest.kafka.Producer's start on first use (the gateway's), against the real broker."""

from __future__ import annotations

import pytest

from callingest.kafka import Producer, PublishError
from callingest.settings import Settings
from callingest.topics import Topics
from tests.conftest import free_port
from tests.helpers import read_topic

pytestmark = pytest.mark.kafka


async def test_unreachable_broker_refuses_at_once_and_is_not_retried_in_a_tight_loop() -> None:
    producer = Producer(f"127.0.0.1:{free_port()}", "test", request_timeout_ms=1000,
                        restart_interval=60.0)
    with pytest.raises(PublishError, match="cannot start"):
        await producer.ensure_started()
    with pytest.raises(PublishError, match="unavailable"):  # within the restart interval
        await producer.ensure_started()
    assert not producer.started
    await producer.stop()


async def test_started_on_first_use(settings: Settings, topics: Topics) -> None:
    producer = Producer(settings.kafka_bootstrap_servers, "test")
    assert not producer.started
    try:
        await producer.ensure_started()
        assert producer.started
        await producer.ensure_started()  # started: nothing to do
        await producer.send_raw(topics.submitted, b"not avro", key="k1", timeout=10)
    finally:
        await producer.stop()
    assert not producer.started
    assert [r.value for r in await read_topic(settings, topics.submitted)] == [b"not avro"]


async def test_no_producer_is_left_unclosed(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Every AIOKafkaProducer the wrapper makes is closed: the one made up front and replaced at
    the first start, a failed start's, and one never started (aiokafka reports an unclosed
    producer as an asyncio error when it is collected; every gateway start logged one)."""
    import gc

    caplog.set_level("ERROR", logger="asyncio")
    started = Producer(settings.kafka_bootstrap_servers, "test")
    await started.ensure_started()
    await started.stop()
    unreachable = Producer(f"127.0.0.1:{free_port()}", "test", request_timeout_ms=500)
    with pytest.raises(PublishError):
        await unreachable.ensure_started()
    await unreachable.stop()
    never_started = Producer(settings.kafka_bootstrap_servers, "test")
    await never_started.stop()
    del started, unreachable, never_started
    gc.collect()
    assert not [r for r in caplog.records if "Unclosed AIOKafkaProducer" in r.getMessage()]
