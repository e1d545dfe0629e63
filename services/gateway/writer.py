"""One writer task per process for the hot-path writes to ``calls``.

The dev and test store (FerretDB on SQLite) serializes writes per database
and degrades sharply when several connections write at once (SQLite's busy
handler backs off in steps of up to 100 ms). So concurrent requests do not
write themselves: they queue their insert or "published" mark here and one
task applies them, inserts grouped into one ``insert_many(ordered=False)``.
On MongoDB proper this costs nothing and saves round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

Document = dict[str, Any]
DUPLICATE_KEY = 11000
MAX_BATCH = 256


@dataclass
class _Op:
    kind: str  # "insert" or "published"
    payload: Any
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class CallWriter:
    """Queue of call inserts and published marks, applied by one background task."""

    def __init__(self, calls: AsyncCollection[Document]) -> None:
        self._calls = calls
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def insert(self, doc: Document) -> bool:
        """Insert ``doc``: True if inserted, False if a unique key already exists.

        Other database errors propagate (PyMongoError).
        """
        return await self._submit(_Op("insert", doc))

    async def mark_published(self, cuid: str) -> None:
        """Set ``published: true`` and drop the publish claim of call ``cuid``."""
        await self._submit(_Op("published", cuid))

    async def _submit(self, op: _Op) -> bool:
        if self._task is None or self._task.done():
            raise RuntimeError("CallWriter is not running")
        self._queue.put_nowait(op)
        return await asyncio.shield(op.done)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            inserts = [op for op in batch if op.kind == "insert"]
            marks = [op for op in batch if op.kind == "published"]
            if inserts:
                await self._insert_many(inserts)
            for op in marks:
                await self._apply(op, self._mark(op.payload))

    async def _insert_many(self, ops: list[_Op]) -> None:
        duplicates: set[int] = set()
        try:
            await self._calls.insert_many([op.payload for op in ops], ordered=False)
        except BulkWriteError as exc:
            failed: dict[int, Any] = {e["index"]: e for e in exc.details.get("writeErrors", [])}
            for index, error in failed.items():
                if error.get("code") == DUPLICATE_KEY:
                    duplicates.add(index)
                else:
                    _settle(ops[index], exc)
        except Exception as exc:  # the store is unavailable: every caller gets the error
            for op in ops:
                _settle(op, exc)
            return
        for index, op in enumerate(ops):
            if not op.done.done():
                op.done.set_result(index not in duplicates)

    async def _mark(self, cuid: str) -> bool:
        await self._calls.update_one(
            {"_id": cuid}, {"$set": {"published": True}, "$unset": {"publish_claim": ""}}
        )
        return True

    async def _apply(self, op: _Op, work: Any) -> None:
        try:
            op.done.set_result(await work)
        except Exception as exc:
            _settle(op, exc)


def _settle(op: _Op, exc: BaseException) -> None:
    if not op.done.done():
        op.done.set_exception(exc)
        op.done.exception()  # the caller may have gone away: never warn about it
