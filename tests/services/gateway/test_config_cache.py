"""The gateway's configuration cache is bounded: an entry pushed out is read again."""

from __future__ import annotations

from typing import Any

import pytest

from callingest.config_file import campaign_id
from services.gateway.calls import ConfigCache

pytestmark = pytest.mark.mongo


async def test_campaign_cache_is_bounded(db: Any) -> None:
    await db.campaigns.insert_one({"_id": campaign_id("1001", "85"), "network_id": "1001",
                                   "advertiser_id": "adv-1", "id_from_network": "85",
                                   "type": "ExternalOnly", "signal_ai_enabled": True,
                                   "voice_signals": 0})
    cache = ConfigCache(db, ttl=3600, size=2)
    cached = await cache.campaign("1001", "85")
    assert cached is not None and cached.advertiser_id == "adv-1"
    await db.campaigns.delete_one({"_id": campaign_id("1001", "85")})
    assert await cache.campaign("1001", "85") is cached  # within the TTL: from the cache
    for unknown in ("86", "87"):  # a flood of other ids pushes it out
        assert await cache.campaign("1001", unknown) is None
    assert await cache.campaign("1001", "85") is None  # read again: it is gone


async def test_network_cache_is_bounded(db: Any) -> None:
    await db.networks.insert_one({"_id": "1001", "name": "N", "call_ingestion_enabled": True})
    cache = ConfigCache(db, ttl=3600, size=1)
    assert (await cache.network("1001")) is not None
    await db.networks.delete_one({"_id": "1001"})
    assert await cache.network("9999") is None
    assert await cache.network("1001") is None
