"""Issue 11 point 6: managed Kafka settings (SASL), against a private local broker with a
SASL_PLAINTEXT listener (PLAIN and SCRAM-SHA-512; its plaintext listener is only for the
broker itself). admin init, a consumer service and the producer all authenticate."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from callingest import events, kafka
from callingest.kafka import Producer
from callingest.settings import Settings
from tests.conftest import ROOT, Services, free_port, settings_env, used_secret, wait_until
from tests.helpers import apply_config, call_doc
from tools.kafka_cluster import KafkaCluster, Sasl

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER = "callingest"
PASSWORD = used_secret("k4fka-sasl-s3cret")


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[KafkaCluster]:
    run_dir = Path(tempfile.mkdtemp(prefix="callingest-sasl-"))
    cluster = KafkaCluster(run_dir, [free_port()], [free_port()],
                           Sasl([free_port()], USER, PASSWORD))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(run_dir, ignore_errors=True)


def over_sasl(settings: Settings, broker: KafkaCluster, mechanism: str,
              password: str = PASSWORD) -> Settings:
    return settings.model_copy(update={
        "kafka_bootstrap_servers": broker.sasl_bootstrap,
        "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": mechanism,
        "kafka_sasl_username": USER, "kafka_sasl_password": SecretStr(password)})


def admin_init(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/callingest"), "admin", "init"],
                          env=settings_env(settings) | {"PATH": "/usr/bin:/bin"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


async def topic_names(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                **kafka.client_options(settings))
    await admin.start()
    try:
        return [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
    finally:
        await admin.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
async def test_admin_init_and_a_service_over_sasl(settings: Settings, db: Any,
                                                  sasl_broker: KafkaCluster,
                                                  mechanism: str, tmp_path: Path) -> None:
    sasl = over_sasl(settings, sasl_broker, mechanism)
    done = admin_init(sasl)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(await topic_names(sasl)) >= 6
    apply_config(sasl)
    services = Services(sasl, tmp_path, initialized=True)
    try:
        services.start("validator")
        doc = call_doc()
        await db.calls.insert_one(doc)
        producer = Producer(sasl.kafka_bootstrap_servers, "tests",
                            options=kafka.client_options(sasl))
        await producer.start()
        try:
            await producer.send(f"{sasl.topic_prefix}calls.submitted", "CallSubmitted",
                                events.call_submitted(doc), key=doc["_id"])
        finally:
            await producer.stop()

        async def validated() -> bool:
            call = await db.calls.find_one({"_id": doc["_id"]})
            return bool(call and call["status"] == "validated")

        await wait_until(validated, timeout=60, what="the call validated over SASL")
    finally:
        services.stop_all()


def test_wrong_password_or_no_sasl_fails_clearly(settings: Settings,
                                                 sasl_broker: KafkaCluster) -> None:
    wrong = admin_init(over_sasl(settings, sasl_broker, "SCRAM-SHA-512", "not-the-password"))
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1].startswith("callingest admin init: Kafka")
    assert "not-the-password" not in wrong.stderr and PASSWORD not in wrong.stderr
    plain = admin_init(settings.model_copy(update={
        "kafka_bootstrap_servers": sasl_broker.sasl_bootstrap}))  # PLAINTEXT to the SASL port
    assert plain.returncode == 1
