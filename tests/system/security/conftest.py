"""A real gateway process on the session's servers, configured with two networks A and B.

Network A and network B each have a network-wide token; B has a call whose
recording is normalized (its WAV stored in S3) so that every read route has
something to refuse. Module-scoped: the hostile and schema tests share it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from callingest import config_apply, config_file, mongo, s3
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.conftest import (
    DEV_KEYRING,
    TEST_LOGS,
    Services,
    delete_topics,
    make_settings,
    used_secret,
)
from tests.helpers import demo_call
from tools import devstack

TOKEN_A = used_secret(f"sec-a-{uuid.uuid4().hex}")
TOKEN_B = used_secret(f"sec-b-{uuid.uuid4().hex}")
AUTH_SECRET = used_secret(f"sec-auth-{uuid.uuid4().hex}")
API = "/api/2022-03-01"

CONFIG = f"""
networks:
  - id: "4001"
    name: Network A
    timezone: America/New_York
    call_ingestion_enabled: true
    csm_email: csm-a@example.com
    api_tokens: [{{token: {TOKEN_A}}}]
    signals: [Sale, Quote]
    custom_data_fields: [channel]
    recording_auth_configs: [{{id: 7, method: bearer_header, token: {AUTH_SECRET}}}]
    advertisers:
      - id: adv-a
        campaigns: [{{id_from_network: "85", type: ExternalOnly, signal_ai_enabled: true}}]
  - id: "4002"
    name: Network B
    timezone: Europe/Paris
    call_ingestion_enabled: true
    csm_email: csm-b@example.com
    api_tokens: [{{token: {TOKEN_B}}}]
    signals: [Sale]
    advertisers:
      - id: adv-b
        campaigns: [{{id_from_network: "95", type: ExternalOnly, signal_ai_enabled: true}}]
"""


def call_body(external_id: str, campaign: Any = 85, **fields: Any) -> dict[str, Any]:
    return {"call": demo_call(external_id, **{"recording_url": "http://127.0.0.1:9/rec.wav",
                                              "advertiser_campaign_id_from_network": campaign,
                                              **fields})}


@dataclass
class SecureGateway:
    settings: Settings
    db: Any
    url: str
    services: Services
    cuid_b: str
    """A normalized call of network B (its recording stored in S3)."""

    @property
    def log(self) -> Path:
        return self.services.running["gateway"].log


async def normalized_call_of_b(settings: Settings, db: Any) -> str:
    cuid = uuid.uuid4().hex
    key = f"normalized/{cuid}.wav"
    async with s3.s3_client(settings) as client:
        await s3.ensure_bucket(client, settings.s3_bucket)
        await client.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"RIFF0000WAVE")
    now = datetime.now(UTC)
    await db.calls.insert_one({
        "_id": cuid, "network_id": "4002", "external_call_unique_id": "b-1",
        "content_hash": "x", "status": "normalized", "start_time": now,
        "calling_phone_number": "+18779257383", "destination_phone_number": "+12165388265",
        "advertiser_campaign_id_from_network": "95", "advertiser_id": "adv-b",
        "call_direction": "inbound", "language_code": "en-US", "signals": [], "custom_data": [],
        "recording_url": "http://127.0.0.1:9/b.wav", "attempt": 1, "published": True,
        "created_at": now, "history": [{"stage": "gateway", "status": "received", "at": now}],
        "recording": {"bucket": settings.s3_bucket, "key": key, "sample_rate": 8000,
                      "channels": 2, "sample_format": "s16", "duration_seconds": 0.0},
    })
    return cuid


@contextlib.asynccontextmanager
async def secure_gateway(servers: devstack.Ports, name: str,
                         env: dict[str, str] | None = None) -> AsyncIterator[SecureGateway]:
    settings = make_settings(servers)
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    await mongo.ensure_indexes(db)
    path = TEST_LOGS / f"{name}-config.yaml"
    TEST_LOGS.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG)
    await config_apply.apply(db, config_file.load(path), DEV_KEYRING)
    path.unlink()
    cuid_b = await normalized_call_of_b(settings, db)
    log_dir = TEST_LOGS / f"{name}-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings, log_dir)
    try:
        service = services.start("gateway", env=env)
        yield SecureGateway(settings, db, service.url, services, cuid_b)
    finally:
        services.stop_all()
        with contextlib.suppress(Exception):
            await client.drop_database(settings.mongodb_database)
        await client.close()
        await delete_topics(settings, topics.all())


@pytest.fixture(scope="module")
async def gw(servers: devstack.Ports) -> AsyncIterator[SecureGateway]:
    """The module's gateway; token guessing is not throttled here (see test_token_guessing)."""
    async with secure_gateway(servers, "security", {"AUTH_FAILURE_THRESHOLD": "1000000"}) as g:
        yield g
