"""The republisher: the gateway's background loop for calls left unpublished.

Every few seconds it retries the publications that failed in this process (and writes the
receipts that could not be written); now and then it scans the store for calls that no
publisher finished (those of a crashed or stopped gateway). Scans are rare because on the
dev store (FerretDB on SQLite) every query reads the whole collection.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import metrics
from callingest.logging import get_logger
from callingest.replay import republish_unpublished_restarts
from services.gateway.claims import CLAIM_SECONDS
from services.gateway.publisher import CallPublisher, KafkaUnavailable
from services.gateway.receipts import (
    SCAN_MARGIN,
    advance_scan_mark,
    aware,
    scan_mark,
    unpublished_cuids,
)

log = get_logger(__name__)

Document = dict[str, Any]

FULL_SCAN_SECONDS = 60.0


class Republisher:
    """Publishes what ``publisher`` left unpublished, and the calls of stopped gateways."""

    def __init__(self, db: AsyncDatabase[Document], publisher: CallPublisher) -> None:
        self._db = db
        self._publisher = publisher
        self._scan_from: datetime | None = None  # None: read the stored mark first
        self._marked = False
        self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return at its next step, also if a cancellation of its task is
        swallowed (see callingest/tasks.py): the gateway calls it before cancelling the task."""
        self._stopping = True

    async def republish_pending(self, older_than_seconds: float, limit: int = 1000) -> int:
        """Publish calls left unpublished for ``older_than_seconds``; returns how many.

        A scan reads what was created since the oldest call the previous scan left
        unpublished, or since its cut-off (see
        :func:`~services.gateway.receipts.unpublished_cuids`), and stores that point as the
        scan mark, shared by every gateway. The first scan of a process starts at the stored
        mark (the calls of a gateway that stopped before us are after it), or, on a database
        no scan has finished on, reads ``calls`` and the receipts whole. Sets the
        unpublished-calls gauge to what is left.
        """
        publisher, receipts = self._publisher, self._publisher.receipts
        await publisher.kafka()  # no claims are taken while Kafka is known to be down
        if not self._marked:
            self._scan_from = await scan_mark(self._db)
            self._marked = True
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_seconds)
        candidates = await unpublished_cuids(self._db, older_than=cutoff, created_since=self._scan_from)
        candidates = [c for c in candidates if not receipts.seen(c["_id"])]
        batch = [c for c in candidates[:limit] if not publisher.busy(c["_id"])]
        done = await publisher.delivered_before(batch)
        for cuid in done:  # sent by a gateway that stopped before writing the receipt
            await receipts.record_or_keep(cuid)
        for call in batch:
            if publisher.busy(call["_id"]) or call["_id"] in done:
                continue
            if await publisher.publish_if_unpublished(call):
                done.add(call["_id"])
                log.info("republished unpublished call", extra={"cuid": call["_id"]})
        left = [c for c in candidates if c["_id"] not in done]
        # The next scan starts at the oldest call still unpublished (claimed by another
        # publisher, over the limit), or at this cut-off (less a margin for slow inserts).
        self._scan_from = min([cutoff - SCAN_MARGIN, *(aware(c.get("created_at")) for c in left)])
        await advance_scan_mark(self._db, self._scan_from)
        metrics.UNPUBLISHED_CALLS.set(len(left))
        return len(done)

    async def retry_failed(self) -> int:
        """Publish the calls whose publication failed in this process (and write the
        receipts that could not be written)."""
        publisher = self._publisher
        await publisher.receipts.write_unwritten()
        if not publisher.failed:
            return 0
        await publisher.kafka()  # no claims are taken while Kafka is known to be down
        published = 0
        for cuid in list(publisher.failed):
            if publisher.busy(cuid):  # e.g. its claim is held until aiokafka settles the send
                continue
            call = await self._db.calls.find_one({"_id": cuid})
            if call is None or await publisher.receipts.is_published(call):
                publisher.failed.discard(cuid)
                continue
            if await publisher.publish_if_unpublished(call):
                published += 1
                log.info("republished unpublished call", extra={"cuid": cuid})
        return published

    async def run(self, interval_seconds: float, older_than_seconds: float,
                  scans: bool = True) -> None:
        """Until :meth:`stop` (never raises): every ``interval_seconds`` :meth:`retry_failed`;
        ``older_than_seconds`` after start and then every :data:`FULL_SCAN_SECONDS`
        :meth:`republish_pending` (from the stored scan mark, then what was created since)
        and the restarts of failed calls whose event was never published (callingest/replay.py).
        ``scans=False``: only the retries (another worker scans).
        """
        next_scan = time.monotonic() + older_than_seconds  # calls of before our start are due
        while not self._stopping:
            await asyncio.sleep(interval_seconds)
            if self._stopping:
                return
            try:
                await self.retry_failed()
                if scans and time.monotonic() >= next_scan:
                    await self.republish_pending(older_than_seconds)
                    await republish_unpublished_restarts(
                        self._db.calls, self._publisher.send_stage_input,
                        timedelta(seconds=max(older_than_seconds, CLAIM_SECONDS)))
                    next_scan = time.monotonic() + max(FULL_SCAN_SECONDS, older_than_seconds)
            except KafkaUnavailable:
                pass
            except PyMongoError as exc:
                log.warning("republisher cannot read calls", extra={"error": type(exc).__name__})
