"""MongoDB access through PyMongo's async API.

Only operations that both MongoDB and FerretDB (the dev stack's store)
support are used: single-document updates and upserts, findAndModify,
unique indexes; no transactions, no change streams.
"""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from callingest.settings import Settings

Document = dict[str, Any]


def open_client(settings: Settings, timeout_ms: int = 5000) -> AsyncMongoClient[Document]:
    """A client for ``MONGODB_URI``; connects lazily, times out operations after ``timeout_ms``."""
    return AsyncMongoClient(
        settings.mongodb_uri.get_secret_value(),
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        tz_aware=True,
        appname="callingest",
    )


def database(client: AsyncMongoClient[Document], settings: Settings) -> AsyncDatabase[Document]:
    return client[settings.mongodb_database]


async def ensure_indexes(db: AsyncDatabase[Document]) -> None:
    """Create every index the platform relies on; idempotent."""
    await db.calls.create_index(
        [("network_id", ASCENDING), ("external_call_unique_id", ASCENDING)],
        unique=True,
        name="network_external_call_unique_id",
    )
    await db.calls.create_index([("status", ASCENDING)], name="status")
    # The gateway's republisher reads the calls created since its last scan.
    await db.calls.create_index([("created_at", ASCENDING)], name="created_at")
    # GET calls.json (services/gateway/listing.py): newest first within a network, by
    # received time then _id; one index per kind of filter (docs/architecture.md).
    order = [("created_at", DESCENDING), ("_id", DESCENDING)]
    await db.calls.create_index([("network_id", ASCENDING), *order], name="list_network")
    await db.calls.create_index([("network_id", ASCENDING), ("status", ASCENDING), *order],
                                name="list_network_status")
    await db.calls.create_index([("network_id", ASCENDING), ("advertiser_id", ASCENDING), *order],
                                name="list_network_advertiser")
    await db.campaigns.create_index(
        [("network_id", ASCENDING), ("id_from_network", ASCENDING)],
        unique=True,
        name="network_campaign",
    )
    await db.api_tokens.create_index([("network_id", ASCENDING)], name="network")
    # The webhooks dispatcher reads due deliveries; `callingest calls show` a call's deliveries.
    await db.webhook_deliveries.create_index(
        [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="status_next_attempt_at")
    await db.webhook_deliveries.create_index([("cuid", ASCENDING)], name="cuid")
