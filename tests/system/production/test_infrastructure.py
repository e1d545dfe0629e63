"""Issue 11 point 2: the infrastructure is created in one place, ``callingest admin init``.

Services started before it ran report not-ready with a log line naming what is missing,
create none of it, and get ready once admin init has run.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from callingest import mongo, s3
from callingest.settings import Settings
from tests.conftest import Services, wait_until

STARTED = ("gateway", "validator", "fetcher")


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


async def existing_infrastructure(settings: Settings) -> dict[str, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
    finally:
        await admin.close()
    client = mongo.open_client(settings)
    try:
        indexes = await mongo.missing_indexes(mongo.database(client, settings))
    finally:
        await client.close()
    async with s3.s3_client(settings) as s3c:
        buckets = [b["Name"] for b in (await s3c.list_buckets())["Buckets"]]
    return {"topics": topics, "missing_indexes": indexes,
            "bucket": settings.s3_bucket in buckets}


async def test_services_wait_for_admin_init_and_create_nothing(settings: Settings) -> None:
    settings = settings.model_copy(update={"s3_bucket": f"infra-{uuid.uuid4().hex[:12]}"})
    from tests.conftest import TEST_LOGS

    log_dir = TEST_LOGS / f"infra-wait-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True)
    services = Services(settings, log_dir, initialized=True)  # admin init has not run
    try:
        started = {name: services.start(name, wait=False) for name in STARTED}

        async def all_say_missing() -> bool:
            return all("infrastructure missing" in s.log_text() for s in started.values())

        await wait_until(all_say_missing, timeout=60, what="the 'infrastructure missing' lines")
        time.sleep(3)  # several verification rounds later, still nothing was created
        for name, service in started.items():
            assert service.proc.poll() is None, f"{name} exited:\n{service.log_text()[-2000:]}"
            status, body = readyz(service.url)
            assert status == 503 and body["checks"]["infrastructure"] is False, (name, body)
            line = next(json.loads(x) for x in service.log_text().splitlines()
                        if "infrastructure missing" in x)
            assert line["level"] == "warning" and "callingest admin init" in line["msg"]
            assert any(m.startswith("topic ") for m in line["missing"]), line
            if name != "validator":  # the validator does not use S3
                assert f"bucket {settings.s3_bucket}" in line["missing"], line
        found = await existing_infrastructure(settings)
        assert found == {"topics": [], "missing_indexes": found["missing_indexes"],
                         "bucket": False}
        assert len(found["missing_indexes"]) == len(mongo.INDEXES)

        services.admin_init()  # what the Job does

        async def all_ready() -> bool:
            return all(readyz(s.url)[0] == 200 for s in started.values())

        await wait_until(all_ready, timeout=60, what="ready after admin init")
        found = await existing_infrastructure(settings)
        assert found["bucket"] and found["missing_indexes"] == [] and found["topics"]
    finally:
        services.stop_all()
