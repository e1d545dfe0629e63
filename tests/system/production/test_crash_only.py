"""Issue 11 point 4: crash-only consumers, on real servers with real service processes.

* an exception outside the step is logged with the call id and event id and the process
  exits non-zero; after the restart the uncommitted event is consumed again;
* the dead-letter limit logs and exits non-zero;
* MongoDB unavailable for longer than INFRA_RETRY_SECONDS: readiness goes false and the
  process exits non-zero; after the restart (MongoDB back) the event is processed.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from callingest import events, mongo
from callingest.dead_letters import MAX_CONSECUTIVE_DEAD_LETTERS
from callingest.service import EXIT_FAILED
from callingest.settings import Settings
from tests.conftest import ROOT, ServiceProcess, Services, free_port, wait_until
from tests.helpers import apply_config, call_doc, publish, read_topic
from tools import devstack

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


def exit_code(service: ServiceProcess, timeout: float = 90.0) -> int:
    try:
        return service.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{service.name} did not exit:\n{service.log_text()[-3000:]}") from None


def log_lines(service: ServiceProcess) -> list[dict[str, Any]]:
    out = []
    for line in service.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def status_of(db: Any, cuid: str) -> str | None:
    doc = await db.calls.find_one({"_id": cuid})
    return doc and doc["status"]


async def test_exception_outside_the_step_exits_and_the_event_is_consumed_again(
    settings: Settings, db: Any, services: Services
) -> None:
    apply_config(settings)
    doc = call_doc()
    event = events.call_submitted(doc)
    # The stored call's bookkeeping is corrupt: reading its attempt fails before the step.
    await db.calls.insert_one({**doc, "attempt": "corrupt"})
    services.admin_init()
    await publish(settings, f"{settings.topic_prefix}calls.submitted", "CallSubmitted", event,
                  doc["_id"])
    validator = services.start("validator", wait=False)
    assert exit_code(validator) == EXIT_FAILED
    errors = [line for line in log_lines(validator) if line["level"] == "error"]
    outside = [e for e in errors if "outside the step" in e["msg"]]
    assert outside, errors
    assert outside[0]["cuid"] == doc["_id"]
    assert outside[0]["event_id"] == str(event["event_id"])
    assert "ValueError" in outside[0].get("exc_info", "") + outside[0]["error"]
    assert await status_of(db, doc["_id"]) == "received"

    services.running.pop("validator")
    await db.calls.update_one({"_id": doc["_id"]}, {"$set": {"attempt": 1}})  # repaired
    services.start("validator")  # as Kubernetes restarts it
    await wait_until(lambda: _is(db, doc["_id"], "validated"), timeout=60,
                     what="the uncommitted event consumed again")


async def test_dead_letter_limit_logs_and_exits_non_zero(settings: Settings, db: Any,
                                                        services: Services) -> None:
    validator = services.start("validator")
    raw = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await raw.start()
    try:
        for i in range(MAX_CONSECUTIVE_DEAD_LETTERS + 1):
            await raw.send(f"{settings.topic_prefix}calls.submitted", b"not avro %d" % i,
                           key=b"junk")
        await raw.flush()
    finally:
        await raw.stop()
    assert exit_code(validator) == EXIT_FAILED
    errors = [line for line in log_lines(validator) if line["level"] == "error"]
    assert any("too many undecodable messages" in e["msg"] for e in errors), errors
    dead = await read_topic(settings, f"{settings.topic_prefix}calls.dead-letter")
    assert len(dead) == MAX_CONSECUTIVE_DEAD_LETTERS


class PrivateMongo:
    """A FerretDB of this test only (the test kills it), on a free port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (tmp / "data").mkdir()

    def start(self) -> None:
        with (self.tmp / "ferretdb.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ROOT / ".tools/bin/ferretdb"), "--listen-addr", f"127.0.0.1:{self.port}",
                 "--sqlite-dir", str(self.tmp / "data")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not devstack.port_open(self.port):
            assert time.monotonic() < deadline, "private FerretDB did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def private_mongodb(tmp_path: Path) -> Iterator[PrivateMongo]:
    server = PrivateMongo(tmp_path)
    server.start()
    yield server
    server.kill()


def readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


async def test_infrastructure_retry_is_bounded(settings: Settings, services: Services,
                                               private_mongodb: PrivateMongo) -> None:
    settings = settings.model_copy(update={
        "mongodb_uri": SecretStr(f"mongodb://127.0.0.1:{private_mongodb.port}/"),
        "infra_retry_seconds": 3.0})
    services.settings = settings
    apply_config(settings)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    try:
        validator = services.start("validator")
        doc = call_doc()
        await db.calls.insert_one(doc)
        private_mongodb.kill()  # MongoDB goes away; then the event arrives
        await publish(settings, f"{settings.topic_prefix}calls.submitted", "CallSubmitted",
                      events.call_submitted(doc), doc["_id"])
        saw_not_ready = False
        deadline = time.monotonic() + 90
        while validator.proc.poll() is None and time.monotonic() < deadline:
            saw_not_ready = saw_not_ready or readyz(validator.url) == 503
            time.sleep(0.2)
        assert exit_code(validator, 5) == EXIT_FAILED
        assert saw_not_ready, "readiness never went false before the exit"
        errors = [line for line in log_lines(validator) if line["level"] == "error"]
        bounded = [e for e in errors if "INFRA_RETRY_SECONDS" in e["msg"]]
        assert bounded and bounded[0]["cuid"] == doc["_id"], errors
        assert bounded[0]["event_id"] == str(events.call_submitted(doc)["event_id"])

        services.running.pop("validator")
        private_mongodb.start()
        services.start("validator")  # restarted: the event is consumed again
        await wait_until(lambda: _is(db, doc["_id"], "validated"), timeout=60,
                         what="the event processed after the restart")
    finally:
        await client.close()


async def _is(db: Any, cuid: str, status: str) -> bool:
    return await status_of(db, cuid) == status

