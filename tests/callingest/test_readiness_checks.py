"""One MongoDB readiness check (``callingest.mongo.reachable``) for every service (issue 13)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from callingest import mongo
from callingest.settings import Settings
from tests.conftest import ROOT, free_port


def test_only_callingest_mongo_pings_mongodb() -> None:
    pinging = [path.relative_to(ROOT).as_posix()
               for package in ("callingest", "services")
               for path in sorted((ROOT / package).rglob("*.py"))
               if '"ping"' in path.read_text(encoding="utf-8")]
    assert pinging == ["callingest/mongo.py"]


@pytest.mark.mongo
async def test_reachable_answers_for_a_live_and_a_closed_store(settings: Settings) -> None:
    live = mongo.open_client(settings)
    closed = mongo.open_client(settings.model_copy(
        update={"mongodb_uri": SecretStr(f"mongodb://127.0.0.1:{free_port()}/")}), timeout_ms=300)
    try:
        assert await mongo.reachable(live)
        assert not await mongo.reachable(closed, timeout=1.0)
    finally:
        await live.close()
        await closed.close()
