"""Issue 11 point 6: managed Kafka settings (SASL, TLS), against a private local broker with
SASL_PLAINTEXT (PLAIN and SCRAM-SHA-512), SSL and SASL_SSL listeners (its plaintext listener is
only for the broker itself; its certificate, for 127.0.0.1, is signed by a CA made at start).
admin init, a consumer service and the producer all connect; a client that does not trust the
CA fails with one clear line."""

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
from tools.kafka_cluster import CertificateAuthority, KafkaCluster, Sasl, Tls

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER = "callingest"
PASSWORD = used_secret("k4fka-sasl-s3cret")


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[KafkaCluster]:
    run_dir = Path(tempfile.mkdtemp(prefix="callingest-secure-kafka-"))
    cluster = KafkaCluster(run_dir, [free_port()], [free_port()],
                           Sasl([free_port()], USER, PASSWORD), Tls([free_port()], [free_port()]))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(run_dir, ignore_errors=True)


def secured(settings: Settings, broker: KafkaCluster, protocol: str, mechanism: str = "PLAIN",
            password: str = PASSWORD, cafile: Path | None = None) -> Settings:
    """``settings`` connecting to ``broker``'s ``protocol`` listener (TLS trusting ``cafile``,
    default the broker's CA)."""
    update: dict[str, Any] = {"kafka_bootstrap_servers": broker.bootstrap_for(protocol),
                              "kafka_security_protocol": protocol}
    if protocol.startswith("SASL_"):
        update.update(kafka_sasl_mechanism=mechanism, kafka_sasl_username=USER,
                      kafka_sasl_password=SecretStr(password))
    if protocol.endswith("SSL"):
        update["kafka_ssl_cafile"] = str(cafile or broker.ca_file)
    return settings.model_copy(update=update)


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


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("SASL_PLAINTEXT", "PLAIN"), ("SASL_PLAINTEXT", "SCRAM-SHA-512"), ("SSL", ""),
    ("SASL_SSL", "SCRAM-SHA-512")], ids=["SASL_PLAINTEXT-PLAIN", "SASL_PLAINTEXT-SCRAM", "SSL",
                                         "SASL_SSL-SCRAM"])
async def test_admin_init_and_a_service_over_sasl_or_tls(settings: Settings, db: Any,
                                                         secure_broker: KafkaCluster,
                                                         protocol: str, mechanism: str,
                                                         tmp_path: Path) -> None:
    sasl = secured(settings, secure_broker, protocol, mechanism or "PLAIN")
    if protocol.endswith("SSL"):  # the broker's name (127.0.0.1) is checked against its cert
        assert kafka.client_options(sasl)["ssl_context"].check_hostname
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

        await wait_until(validated, timeout=60, what=f"the call validated over {protocol}")
    finally:
        services.stop_all()


def test_wrong_password_or_no_sasl_fails_clearly(settings: Settings,
                                                 secure_broker: KafkaCluster) -> None:
    wrong = admin_init(secured(settings, secure_broker, "SASL_PLAINTEXT", "SCRAM-SHA-512",
                               "not-the-password"))
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1].startswith("callingest admin init: Kafka")
    assert "not-the-password" not in wrong.stderr and PASSWORD not in wrong.stderr
    plain = admin_init(settings.model_copy(update={  # PLAINTEXT to the SASL port
        "kafka_bootstrap_servers": secure_broker.bootstrap_for("SASL_PLAINTEXT")}))
    assert plain.returncode == 1


def test_a_client_not_trusting_the_brokers_ca_fails_clearly(settings: Settings,
                                                           secure_broker: KafkaCluster,
                                                           tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(CertificateAuthority("another CA").cert_pem())
    for client in [secured(settings, secure_broker, "SSL", cafile=other_ca),
                   secured(settings, secure_broker, "SASL_SSL", "SCRAM-SHA-512", cafile=other_ca),
                   secured(settings, secure_broker, "SASL_SSL", "PLAIN").model_copy(
                       update={"kafka_ssl_cafile": None})]:  # the system's CAs only
        failed = admin_init(client)
        assert failed.returncode == 1, failed.stdout
        [line] = failed.stderr.splitlines()  # one line: no traceback, no aiokafka log lines
        assert line.startswith("callingest admin init: KafkaConnectionError"), line
        assert "CERTIFICATE_VERIFY_FAILED" in line, line
        assert "Traceback" not in failed.stderr and PASSWORD not in failed.stderr
