"""MongoDB access through PyMongo's async API.

Only operations that both MongoDB and FerretDB (the dev stack's store)
support are used: single-document updates and upserts, findAndModify,
unique indexes; no transactions, no change streams.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest.settings import Settings

# A NUL cannot be stored in PostgreSQL text (the dev store's FerretDB refuses the whole write),
# and an unpaired UTF-16 surrogate (JSON "\ud800", or a header byte aiohttp decodes with
# surrogateescape) cannot be encoded as UTF-8 at all (BSON, hashing): neither is text anyone
# can mean, so it is refused where it comes in (a submission, a token, a configuration file),
# before it reaches the store or a hash.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_TEXT = "must not contain NUL characters or unpaired surrogates"


def storable(text: str) -> bool:
    """True unless ``text`` holds a NUL or an unpaired surrogate (see :data:`UNSTORABLE_TEXT`)."""
    return _UNSTORABLE.search(text) is None


def unstorable_locations(data: Any, loc: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Where, in ``data`` (parsed JSON or YAML), a key or a string is not :func:`storable`:
    each as a location of keys and list indexes, like pydantic's error ``loc``."""
    if isinstance(data, str):
        return [] if storable(data) else [loc]
    if isinstance(data, list):
        return [found for i, item in enumerate(data) for found in unstorable_locations(item, (*loc, i))]
    if isinstance(data, dict):
        return [found for key, value in data.items()
                for found in unstorable_locations(str(key), (*loc, str(key)))
                + unstorable_locations(value, (*loc, str(key)))]
    return []


Document = dict[str, Any]


def open_client(settings: Settings, timeout_ms: int = 5000) -> AsyncMongoClient[Document]:
    """A client for ``MONGODB_URI``; connects lazily.

    Finding a server and connecting time out after ``timeout_ms``; waiting for a reply after
    ``MONGODB_SOCKET_TIMEOUT_SECONDS``. PyMongo's heartbeat alone interrupts operations only
    when the server stops answering its hellos too: a store that still answers them but not a
    query (FerretDB whose backend hangs) would otherwise hold the operation, and whoever awaits
    it, for good. A timed-out operation raises ``NetworkTimeout`` (a ``PyMongoError``).
    """
    return AsyncMongoClient(
        settings.mongodb_uri.get_secret_value(),
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=round(settings.mongodb_socket_timeout_seconds * 1000),
        tz_aware=True,
        appname="callingest",
    )


async def reachable(client: AsyncMongoClient[Document], timeout: float = 2.0) -> bool:
    """True if MongoDB answers a ping within ``timeout`` seconds (a readiness check)."""
    try:
        await asyncio.wait_for(client.admin.command("ping"), timeout)
    except (TimeoutError, PyMongoError):
        return False
    return True


def database(client: AsyncMongoClient[Document], settings: Settings) -> AsyncDatabase[Document]:
    return client[settings.mongodb_database]


_LIST_ORDER = [("created_at", DESCENDING), ("_id", DESCENDING)]

INDEXES: tuple[tuple[str, list[tuple[str, int]], str, bool], ...] = (
    # (collection, keys, name, unique)
    ("calls", [("network_id", ASCENDING), ("external_call_unique_id", ASCENDING)],
     "network_external_call_unique_id", True),
    ("calls", [("status", ASCENDING)], "status", False),
    # The gateway's republisher reads the calls created since its last scan.
    ("calls", [("created_at", ASCENDING)], "created_at", False),
    # ... and the receipts written since then (without it, every scan read every receipt).
    ("published_calls", [("at", ASCENDING)], "at", False),
    # ... and the restarts whose event is not out yet (callingest/replay.py), every minute.
    ("call_restarts", [("published", ASCENDING), ("at", ASCENDING)], "published_at", False),
    # A call's publication claims, deleted together once its receipt is written.
    ("publish_claims", [("cuid", ASCENDING)], "cuid", False),
    # GET calls.json (services/gateway/listing.py): newest first within a network, by
    # received time then _id; one index per kind of filter (docs/architecture.md).
    ("calls", [("network_id", ASCENDING), *_LIST_ORDER], "list_network", False),
    ("calls", [("network_id", ASCENDING), ("status", ASCENDING), *_LIST_ORDER],
     "list_network_status", False),
    ("calls", [("network_id", ASCENDING), ("advertiser_id", ASCENDING), *_LIST_ORDER],
     "list_network_advertiser", False),
    ("campaigns", [("network_id", ASCENDING), ("id_from_network", ASCENDING)],
     "network_campaign", True),
    ("api_tokens", [("network_id", ASCENDING)], "network", False),
    # The webhooks dispatcher reads due deliveries; `callingest calls show` a call's deliveries.
    ("webhook_deliveries", [("status", ASCENDING), ("next_attempt_at", ASCENDING)],
     "status_next_attempt_at", False),
    ("webhook_deliveries", [("cuid", ASCENDING)], "cuid", False),
)
"""Every index the platform relies on (created by ``callingest admin init`` only)."""


async def ensure_indexes(db: AsyncDatabase[Document]) -> None:
    """Create every index of :data:`INDEXES`; idempotent."""
    for collection, keys, name, unique in INDEXES:
        await db[collection].create_index(keys, unique=unique, name=name)


async def missing_indexes(db: AsyncDatabase[Document]) -> list[str]:
    """The indexes of :data:`INDEXES` that do not exist, as ``collection.name``."""
    present: dict[str, set[str]] = {}
    for collection in {c for c, *_ in INDEXES}:
        present[collection] = {doc["name"] async for doc in await db[collection].list_indexes()}
    return [f"{c}.{name}" for c, _keys, name, _unique in INDEXES if name not in present[c]]
