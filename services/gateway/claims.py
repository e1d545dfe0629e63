"""Publish claims: who may publish a stored call's CallSubmitted event right now.

* The request that inserted the call holds an implicit claim for :data:`CLAIM_SECONDS`
  from the call's ``created_at``; if its publication fails it releases the claim by
  inserting an expired claim (generation 0).
* Anyone else (a resubmission, another worker, the background republisher) must first take
  a claim: insert ``{_id: "<cuid>:<generation>", owner, until}`` into the small
  ``publish_claims`` collection, where the unique ``_id`` makes exactly one taker win a
  generation; a generation whose claim expired is skipped.

So a call is published once while its publishers live (docs/architecture.md, "Publication").
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.gateway.receipts import EPOCH, aware
from services.gateway.writer import retry_busy

Document = dict[str, Any]

CLAIMS = "publish_claims"
CLAIM_SECONDS = 15.0
MAX_CLAIM_GENERATIONS = 10_000


class Claims:
    """The claims of one publisher (``owner``) in the ``publish_claims`` collection."""

    def __init__(self, db: AsyncDatabase[Document], owner: str) -> None:
        self._claims = db[CLAIMS]
        self.owner = owner

    async def take(self, call: Document) -> str | None:
        """Take the publish claim of ``call``: its claim id, or None if someone holds it."""
        cuid = call["_id"]
        for generation in range(MAX_CLAIM_GENERATIONS):
            claim_id = f"{cuid}:{generation}"
            now = datetime.now(UTC)
            held = await self._claims.find_one({"_id": claim_id})
            if held is not None:
                if aware(held.get("until")) > now:
                    return None
                continue  # expired or released: the next generation is free to take
            if generation == 0 and aware(call.get("created_at")) + timedelta(seconds=CLAIM_SECONDS) > now:
                return None  # the inserting request is still publishing it
            claim = {
                "_id": claim_id,
                "cuid": cuid,
                "owner": self.owner,
                "until": now + timedelta(seconds=CLAIM_SECONDS),
            }
            try:
                await retry_busy(functools.partial(self._claims.insert_one, claim))
            except DuplicateKeyError:
                return None  # another taker won this generation
            return claim_id
        return None

    async def renew(self, cuid: str, claim_id: str) -> None:
        """Hold ``claim_id`` for another :data:`CLAIM_SECONDS` (creating it if need be)."""
        renewal = {"cuid": cuid, "owner": self.owner,
                   "until": datetime.now(UTC) + timedelta(seconds=CLAIM_SECONDS)}
        await retry_busy(functools.partial(
            self._claims.update_one, {"_id": claim_id}, {"$set": renewal}, upsert=True))

    async def release(self, cuid: str, claim_id: str | None) -> None:
        """Give up our claim so that a resubmission may publish at once."""
        if claim_id is None:  # the implicit claim of the inserter: mark generation 0 expired
            try:
                await retry_busy(
                    lambda: self._claims.insert_one(
                        {"_id": f"{cuid}:0", "cuid": cuid, "owner": self.owner, "until": EPOCH}
                    )
                )
            except DuplicateKeyError:
                pass
        else:
            await retry_busy(lambda: self._claims.update_one({"_id": claim_id}, {"$set": {"until": EPOCH}}))

    async def drop(self, claim_id: str) -> None:
        """Delete one claim (the call turned out to be published)."""
        await retry_busy(lambda: self._claims.delete_one({"_id": claim_id}))

    async def drop_all(self, cuid: str) -> None:
        """Delete every claim of ``cuid`` (its receipt is written: claims are moot)."""
        await retry_busy(lambda: self._claims.delete_many({"cuid": cuid}))
