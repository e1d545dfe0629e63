"""Receipts: the record that a stored call's CallSubmitted event was acknowledged by Kafka.

A receipt is a document ``{_id: cuid, at}`` in ``published_calls``, inserted (batched,
through the :class:`~services.gateway.writer.CallWriter`) after Kafka acknowledged the
event: in the background for a new call, awaited on the rarer paths. A call is published
when it has a receipt, or when its ``calls`` document says ``published: true`` (calls
recorded by other services, and calls of before receipts). Why receipts rather than an
update of the call: docs/architecture.md, "Publication". :func:`unpublished_cuids` is the
one definition of "not yet published" (for tests and tools too).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from callingest.logging import get_logger
from services.gateway.writer import CallWriter, WriterStopped

log = get_logger(__name__)

Document = dict[str, Any]

RECEIPTS = "published_calls"
RECENT_MAX = 50_000  # cuids whose event this process saw acknowledged
# The topic is read for an earlier copy of an event from this long before its call's
# creation (clock differences between gateway hosts); receipts are read with the same margin.
SCAN_MARGIN = timedelta(seconds=10)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# How far back every call is known published: ``{_id: "unpublished_calls", until}`` in
# ``scan_marks``, advanced by the republishers' scans (:func:`advance_scan_mark`), read by a
# starting gateway so that its first scan does not read every call ever stored.
SCAN_MARKS = "scan_marks"
_MARK_ID = "unpublished_calls"


def aware(value: Any) -> datetime:
    """``value`` as an aware datetime (naive ones are UTC; anything else is :data:`EPOCH`)."""
    if not isinstance(value, datetime):
        return EPOCH
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def unpublished_cuids(
    db: AsyncDatabase[Document], older_than: datetime | None = None,
    created_since: datetime | None = None,
) -> list[Document]:
    """``{_id, created_at, attempt, trace_context}`` of every stored call that is not published yet
    (created at or after ``created_since`` and before ``older_than`` when given).

    Without ``created_since`` it reads ``calls`` and ``published_calls`` whole: call it
    rarely. With it, the calls created since then and the receipts written since then
    (a receipt is written after its call's creation; :data:`SCAN_MARGIN` covers clocks).
    """
    calls_query: Document = {"published": False}
    receipts_query: Document = {}
    if created_since is not None:
        calls_query["created_at"] = {"$gte": created_since}
        receipts_query["at"] = {"$gte": created_since - SCAN_MARGIN}
    receipts = {doc["_id"] async for doc in db[RECEIPTS].find(receipts_query, {"_id": 1})}
    pending = []
    async for doc in db.calls.find(calls_query, {"_id": 1, "created_at": 1, "attempt": 1,
                                                 "trace_context": 1}):
        if doc["_id"] in receipts:
            continue
        if older_than is not None and aware(doc.get("created_at")) >= older_than:
            continue
        pending.append(doc)
    return pending


async def scan_mark(db: AsyncDatabase[Document]) -> datetime | None:
    """The time before which every stored call is published (None: no scan has finished yet,
    so nothing is known and a scan reads every call)."""
    mark = await db[SCAN_MARKS].find_one({"_id": _MARK_ID})
    return None if mark is None else aware(mark.get("until"))


async def advance_scan_mark(db: AsyncDatabase[Document], until: datetime) -> None:
    """Record that every call created before ``until`` is published. The mark only moves
    forward (``$max``): gateways scan concurrently, and each one's ``until`` holds on its own."""
    mark, advance = {"_id": _MARK_ID}, {"$max": {"until": until}}
    try:
        await db[SCAN_MARKS].update_one(mark, advance, upsert=True)
    except DuplicateKeyError:  # another gateway's first upsert won the insert: the mark exists now
        await db[SCAN_MARKS].update_one(mark, advance)


class Receipts:
    """The receipts this process writes, and what it knows to be published.

    ``written(cuid)`` is awaited once a receipt is written (the publisher drops the call's
    claims, which are moot then).
    """

    def __init__(self, db: AsyncDatabase[Document], writer: CallWriter,
                 written: Callable[[str], Awaitable[None]]) -> None:
        self._receipts = db[RECEIPTS]
        self._writer = writer
        self._written = written
        self._recent: OrderedDict[str, None] = OrderedDict()
        #: Receipts the store refused (or that a shutdown left): written by :meth:`write_unwritten`.
        self.unwritten: dict[str, Document] = {}

    def remember(self, cuid: str) -> None:
        """Note that this process saw the event of ``cuid`` acknowledged (bounded memory)."""
        self._recent[cuid] = None
        if len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    def seen(self, cuid: str) -> bool:
        """True if this process saw the event of ``cuid`` acknowledged (recently)."""
        return cuid in self._recent

    async def is_published(self, call: Document) -> bool:
        """True if the call has a receipt (or its document says it is published)."""
        if call.get("published") or call["_id"] in self._recent:
            return True
        return await self._receipts.find_one({"_id": call["_id"]}, {"_id": 1}) is not None

    async def record(self, cuid: str) -> None:
        """Insert the receipt of ``cuid`` (store errors propagate)."""
        await self._writer.insert(RECEIPTS, {"_id": cuid, "at": datetime.now(UTC)})
        await self._written(cuid)

    async def record_or_keep(self, cuid: str) -> None:
        """:meth:`record`; a receipt the store refuses is kept for the republisher loop."""
        try:
            await self.record(cuid)
        except PyMongoError:  # WriterStopped included
            self.unwritten[cuid] = {"_id": cuid, "at": datetime.now(UTC)}

    def write_later(self, cuid: str) -> None:
        """Write the receipt of a new call in the background, batched with others (the
        event is acknowledged; a lost receipt only means a read of the topic before the
        call would be published again)."""
        receipt = {"_id": cuid, "at": datetime.now(UTC)}

        def written(future: asyncio.Future[bool]) -> None:
            if future.cancelled() or future.exception() is not None:
                self.unwritten[cuid] = receipt
                log.warning("receipt not written yet", extra={"cuid": cuid})

        try:
            self._writer.enqueue(RECEIPTS, receipt, background=True).add_done_callback(written)
        except WriterStopped:  # shutdown: the republisher loop or the next start writes it
            self.unwritten[cuid] = receipt

    async def write_unwritten(self) -> None:
        """Write the receipts kept by :meth:`record_or_keep` and :meth:`write_later`."""
        for cuid, receipt in list(self.unwritten.items()):
            await self._writer.insert(RECEIPTS, receipt)
            del self.unwritten[cuid]
