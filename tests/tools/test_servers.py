"""The dev stack's real servers answer as the platform needs them to."""

from __future__ import annotations

import asyncio
import email
import smtplib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymongo.errors import DuplicateKeyError

from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.conftest import delete_topics

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.s3, pytest.mark.smtp]


async def test_kafka_round_trip(settings: Settings) -> None:
    topic = f"{settings.topic_prefix}roundtrip"
    created = await ensure_topics(settings.kafka_bootstrap_servers, [topic], 3, 1)
    assert created == [topic]
    try:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    acks="all", enable_idempotence=True)
        await producer.start()
        payload = uuid.uuid4().bytes
        try:
            meta = await producer.send_and_wait(topic, payload, key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                                    auto_offset_reset="earliest", group_id=f"{topic}-g")
        await consumer.start()
        try:
            msg = await asyncio.wait_for(consumer.getone(), 30)
        finally:
            await consumer.stop()
        assert msg.value == payload
        assert (msg.partition, msg.offset) == (meta.partition, meta.offset)
    finally:
        await delete_topics(settings, [topic])


async def test_topics_have_three_partitions_and_auto_creation_is_off(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix, retry_tiers=2)
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                request_timeout_ms=3000)
    await producer.start()
    try:
        for name in topics.all():
            assert len(await producer.partitions_for(name)) >= 3, name
        with pytest.raises(Exception):  # noqa: B017 - aiokafka raises a timeout on unknown topics
            await asyncio.wait_for(producer.send_and_wait(f"{settings.topic_prefix}nope", b"x"), 8)
    finally:
        await producer.stop()
        await delete_topics(settings, topics.all())


async def test_mongodb_hello_and_unique_index(db: Any) -> None:
    hello = await db.client.admin.command("hello")
    assert hello["isWritablePrimary"] is True or hello.get("ismaster") is True
    await db.calls.insert_one({"_id": "c1", "network_id": "1", "external_call_unique_id": "x"})
    with pytest.raises(DuplicateKeyError):
        await db.calls.insert_one({"_id": "c2", "network_id": "1", "external_call_unique_id": "x"})
    assert await db.calls.count_documents({}) == 1


async def test_s3_put_get_round_trip(s3_client: Any, settings: Settings) -> None:
    key = f"tests/{uuid.uuid4().hex}"
    body = uuid.uuid4().bytes * 1000
    await s3_client.put_object(Bucket=settings.s3_bucket, Key=key, Body=body)
    resp = await s3_client.get_object(Bucket=settings.s3_bucket, Key=key)
    async with resp["Body"] as stream:
        assert await stream.read() == body
    await s3_client.delete_object(Bucket=settings.s3_bucket, Key=key)


def test_email_lands_in_mail_dir(settings: Settings, mail_dir: Path) -> None:
    marker = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=10) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"],
                      f"Subject: {marker}\r\n\r\nhello {marker}\r\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for path in mail_dir.glob("*.eml"):
            if marker in path.read_text(errors="replace"):
                msg = email.message_from_bytes(path.read_bytes())
                assert msg["Subject"] == marker
                return
        time.sleep(0.1)
    pytest.fail("the email never reached .run/mail")
