"""Webhook test helpers: loopback receivers, a config with webhooks, the docs' verifier."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from callingest import avro, config_apply, config_file
from callingest.kafka import Producer
from callingest.settings import Settings
from tests.conftest import DEV_KEYRING, ROOT, used_secret
from tests.helpers import call_doc, serve_recordings

DOC = ROOT / "docs" / "webhooks.md"


def new_secret() -> str:
    """A fresh ``whsec_`` secret, registered so the final test checks no log carries it."""
    return used_secret("whsec_" + base64.b64encode(os.urandom(24)).decode())


def doc_snippets() -> list[str]:
    """The Python code blocks of docs/webhooks.md, in order."""
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def doc_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The ``verify`` function docs/webhooks.md shows receivers, executed as written."""
    namespace: dict[str, Any] = {}
    exec(compile(doc_snippets()[0], str(DOC), "exec"), namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A loopback webhook endpoint: records every request; ``answer`` decides the reply."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    answer: Callable[[Received, int], Any] | None = None  # (request, nth for its webhook-id)
    hang: bool = False

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.requests]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(dict(request.headers), await request.read(), time.monotonic())
        self.requests.append(received)
        if self.hang:
            await asyncio.sleep(3600)
        nth = self.ids().count(received.headers.get("webhook-id", ""))
        status = self.answer(received, nth) if self.answer else 204
        return web.Response(status=int(status))


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Any]]:
    """``await make(**Receiver fields)`` starts a loopback receiver; all stopped afterwards."""
    runners: list[web.AppRunner] = []

    async def make(**kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)
        runner, base = await serve_recordings(receiver.handle, 0.5, prefix="", method="POST")
        receiver.url = f"{base}/hook"
        runners.append(runner)
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


def network(net_id: str, webhooks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A network of the config file with campaign 85 (external) and 91 (standard) and ``webhooks``."""
    return {
        "id": net_id, "name": f"Network {net_id}", "csm_email": f"csm{net_id}@example.com",
        "api_tokens": [{"token": used_secret(f"token-{net_id}-{os.urandom(4).hex()}")}],
        "advertisers": [{"id": f"adv-{net_id}", "campaigns": [
            {"id_from_network": "85", "type": "ExternalOnly", "signal_ai_enabled": True},
            {"id_from_network": "91", "type": "Standard", "signal_ai_enabled": True}]}],
        "webhooks": webhooks, **extra,
    }


def write_config(tmp_path: Path, networks: list[dict[str, Any]]) -> Path:
    path = tmp_path / f"config-{os.urandom(3).hex()}.yaml"
    path.write_text(yaml.safe_dump({"networks": networks}))
    return path


async def apply(db: Any, tmp_path: Path, networks: list[dict[str, Any]]) -> None:
    """Store ``networks`` the way ``callingest config apply`` does."""
    await config_apply.apply(db, config_file.load(write_config(tmp_path, networks)), DEV_KEYRING)


async def fail_calls(settings: Settings, db: Any, network_ids: list[str]) -> list[str]:
    """Store one failed call per entry of ``network_ids`` and publish their CallFailed events
    in that order, as a stage does."""
    producer = Producer(settings.kafka_bootstrap_servers, "tests")
    await producer.start()
    cuids = []
    try:
        for network_id in network_ids:
            doc = call_doc(network_id=network_id, status="failed",
                           failure={"stage": "validator", "class": "call.x", "message": "bad"})
            await db.calls.insert_one(doc)
            record = {"event_id": str(uuid.uuid4()), "cuid": doc["_id"],
                      "occurred_at": datetime.now(UTC),
                      "schema_version": avro.LATEST["CallFailed"].version,
                      "network_id": network_id, "attempt": 1, "stage": "validator",
                      "failure_class": "call.x", "message": "bad", "retryable": False}
            await producer.send(f"{settings.topic_prefix}calls.failed", "CallFailed", record,
                                key=doc["_id"])
            cuids.append(str(doc["_id"]))
    finally:
        await producer.stop()
    return cuids


async def fail_call(settings: Settings, db: Any, network_id: str) -> str:
    return (await fail_calls(settings, db, [network_id]))[0]
