"""The webhooks service's log lines about a call carry the call's trace id (docs/webhooks.md,
``traceparent``; every JSON log line about a call carries ``trace_id``): read from the log of
the real process for a delivery that succeeds, one refused once and retried, one given up."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from callingest import tracing
from callingest.settings import Settings
from callingest.topics import Topics
from tests.conftest import Services, make_settings, wait_until
from tests.services.webhooks.conftest import Receiver, apply, fail_call, network, new_secret

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.slow]

DELIVERED = "webhook delivered"
RETRIED = "webhook attempt failed; retry scheduled"
GIVEN_UP = "webhook delivery given up after the retry period"


@pytest.fixture
def settings(servers: Any) -> Settings:
    return make_settings(servers, webhook_retry_first_seconds=0.5,
                         webhook_retry_max_delay_seconds=1.0, webhook_retry_for_seconds=3.0,
                         webhook_poll_interval_seconds=0.2)


async def test_every_log_line_about_a_delivery_carries_the_calls_trace_id(
        settings: Settings, db: Any, topics: Topics, services: Services, receivers: Any,
        tmp_path: Path) -> None:
    answers = {"ok": lambda _r, _n: 204, "flaky": lambda _r, nth: 500 if nth == 1 else 204,
               "down": lambda _r, _n: 503}
    hooks: dict[str, Receiver] = {name: await receivers(answer=answer)
                                  for name, answer in answers.items()}
    nets = {"ok": "1001", "flaky": "2002", "down": "3003"}
    await apply(db, tmp_path, [
        network(nets[name], [{"id": name, "url": hook.url, "secret": new_secret(),
                              "events": ["call.failed"]}]) for name, hook in hooks.items()])
    service = services.start("webhooks")
    trace_of: dict[str, str] = {}  # cuid -> the trace id of its submission's traceparent
    for name in hooks:
        trace_id = secrets.token_hex(16)
        with tracing.attached({"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}):
            trace_of[await fail_call(settings, db, nets[name])] = trace_id

    async def settled() -> bool:
        statuses = [d["status"] async for d in db.webhook_deliveries.find({}, {"status": 1})]
        return sorted(statuses) == ["delivered", "delivered", "failed"]

    await wait_until(settled, timeout=60, what="two deliveries delivered, one given up")

    def lines() -> list[dict[str, Any]]:
        return [entry for raw in service.log_text().splitlines() if raw.startswith("{")
                if (entry := json.loads(raw)).get("cuid") in trace_of]

    await wait_until(lambda: GIVEN_UP in {e["msg"] for e in lines()}, timeout=10,
                     what="the given-up line")
    by_hook: dict[str, set[str]] = {}
    for entry in lines():
        assert entry.get("trace_id") == trace_of[entry["cuid"]], entry
        if "webhook_id" in entry:
            by_hook.setdefault(entry["webhook_id"], set()).add(entry["msg"])
    assert by_hook["ok"] == {DELIVERED}
    assert by_hook["flaky"] == {RETRIED, DELIVERED}
    assert by_hook["down"] == {RETRIED, GIVEN_UP}
