"""What `config apply` removes, as the gateway sees it: a revoked token is refused once its
cache entry expires (``AUTH_CACHE_SECONDS``)."""

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
from tests.services.gateway.test_call_list import listing
from tests.services.gateway.test_gateway_api import Client

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
