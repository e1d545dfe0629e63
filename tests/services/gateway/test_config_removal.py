"""What `config apply` removes, as the gateway sees it once its cache entries expire
(``AUTH_CACHE_SECONDS``): a revoked token is refused; a removed campaign takes no new calls,
and its calls are still viewed and listed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callingest import config_apply, config_file
from callingest.infra import prepare_infrastructure
from callingest.settings import Settings
from tests.conftest import DEV_KEYRING
from tests.services.gateway.conftest import ADVERTISER_TOKEN, CONFIG_YAML, NETWORK_TOKEN, start_client
from tests.services.gateway.test_call_list import listing, submit
from tests.services.gateway.test_gateway_api import Client, assert_error, call_body, get_call, post

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

CACHE_SECONDS = 1.0


@pytest.fixture
async def short_cache_gateway(settings: Settings, configured_db: Any) -> AsyncIterator[Client]:
    await prepare_infrastructure(settings)
    client = await start_client(settings.model_copy(update={"auth_cache_seconds": CACHE_SECONDS}))
    yield client
    await client.close()


async def reapply(db: Any, tmp_path: Path, yaml_text: str) -> list[str]:
    path = tmp_path / "changed.yaml"
    path.write_text(yaml_text)
    return await config_apply.apply(db, config_file.load(path), DEV_KEYRING)


async def test_a_token_removed_from_the_file_is_refused_after_the_cache_time(
        short_cache_gateway: Client, configured_db: Any, tmp_path: Path) -> None:
    assert (await listing(short_cache_gateway, ADVERTISER_TOKEN))[0] == 200  # now cached
    without = CONFIG_YAML.replace(f'      - token: {ADVERTISER_TOKEN}\n        advertisers: ["adv-1"]\n', "")
    assert without != CONFIG_YAML
    changes = await reapply(configured_db, tmp_path, without)
    assert [line for line in changes if line.startswith("revoked api token of network 1001")]
    await asyncio.sleep(CACHE_SECONDS + 0.2)
    status, body = await listing(short_cache_gateway, ADVERTISER_TOKEN)
    assert status == 401, body
    assert (await listing(short_cache_gateway, NETWORK_TOKEN))[0] == 200  # still listed: kept


async def test_a_removed_campaign_takes_no_new_calls_and_its_calls_are_still_shown(
        short_cache_gateway: Client, configured_db: Any, tmp_path: Path) -> None:
    cuid = await submit(short_cache_gateway, "removed-campaign-1")  # campaign 85 of adv-1
    without = CONFIG_YAML.replace(
        '          - id_from_network: "85"\n            type: ExternalOnly\n'
        "            signal_ai_enabled: true\n", "")
    assert without != CONFIG_YAML
    assert "removed campaign 85 of network 1001" in await reapply(configured_db, tmp_path, without)
    await asyncio.sleep(CACHE_SECONDS + 0.2)
    status, body = await post(short_cache_gateway, call_body("removed-campaign-2"))
    assert "campaign not found" in assert_error(
        status, body, 403, "call.advertiser_campaign_id_from_network")
    for token in (NETWORK_TOKEN, ADVERTISER_TOKEN):
        status, view = await get_call(short_cache_gateway, cuid, token)
        assert status == 200, view
        assert view["advertiser_campaign_id_from_network"] == "85"
        status, page = await listing(short_cache_gateway, token)
        assert status == 200 and [c["cuid"] for c in page["calls"]] == [cuid], page
