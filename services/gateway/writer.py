"""One writer task per process for the hot-path writes: batched inserts.

Concurrent requests do not write themselves: they queue their documents here and one task
applies them, grouped per collection into one ``insert_many(ordered=False)`` each. A busy
database is retried briefly (:data:`BUSY_RETRY_DELAYS`); after that the error reaches the
caller (the gateway answers 503 with Retry-After). A batch the store refuses as a whole
(one document it cannot hold fails the whole statement on FerretDB) is tried again one
document at a time, so the refusal reaches only the callers whose documents it concerns.
Why batches (FerretDB on SQLite scans on every read or update and serializes writers):
docs/architecture.md, "Publication".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bson.errors import BSONError
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError, WriteConcernError

from callingest.tasks import cancel_and_wait

Document = dict[str, Any]
T = TypeVar("T")
DUPLICATE_KEY = 11000
MAX_BATCH = 256
# Pauses before each retry of a write refused because the SQLite database is locked.
BUSY_RETRY_DELAYS = (0.01, 0.03, 0.1, 0.2, 0.4)


class WriterStopped(PyMongoError):
    """The writer is not running (the process is stopping): the store cannot take writes now."""


def is_busy(error: Any) -> bool:
    """True for the store's "database is locked" refusal (an exception or a write error)."""
    if isinstance(error, OperationFailure) and not isinstance(error, BulkWriteError):
        message = str(error.details.get("errmsg", "")) if error.details else str(error)
        message = message or str(error)
    elif isinstance(error, dict):
        message = str(error.get("errmsg", ""))
    else:
        return False
    return "database is locked" in message or "SQLITE_BUSY" in message


async def retry_busy(operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation``, retrying it while the store answers "database is locked" (bounded)."""
    for delay in BUSY_RETRY_DELAYS:
        try:
            return await operation()
        except OperationFailure as exc:
            if not is_busy(exc):
                raise
        await asyncio.sleep(delay)
    return await operation()


BACKGROUND_MAX_DELAY_SECONDS = 0.25


@dataclass
class _Op:
    collection: str
    doc: Document
    background: bool = False
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class CallWriter:
    """Queue of inserts into the database's collections, applied in batches by one task."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._db = db
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._background: list[_Op] = []
        self._background_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._getter: asyncio.Task[_Op] | None = None  # kept across waits: a timed-out wait loses nothing
        self._busy = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def _idle(self) -> bool:
        """Nothing queued, held back, taken off the queue or being written."""
        getter = self._getter
        return (self._queue.empty() and not self._background and not self._busy
                and (getter is None or not getter.done()))

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Apply what is queued (for at most ``drain_seconds``), then stop the task."""
        if self._task is not None:
            deadline = asyncio.get_running_loop().time() + drain_seconds
            while not self._idle() and not self._task.done():
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.01)
            await cancel_and_wait(self._task, "gateway call writer")

    async def insert(self, collection: str, doc: Document) -> bool:
        """Insert ``doc`` into ``collection``: True if inserted, False if a unique key exists.

        Other database errors propagate (PyMongoError), after the bounded
        retries of a locked database.
        """
        return await asyncio.shield(self.enqueue(collection, doc))

    def enqueue(self, collection: str, doc: Document, *, background: bool = False) -> asyncio.Future[bool]:
        """Queue the insert of ``doc``; the future is :meth:`insert`'s outcome.

        ``background`` inserts nobody waits for are held back while other
        inserts are queued (at most :data:`BACKGROUND_MAX_DELAY_SECONDS` or
        :data:`MAX_BATCH` documents), so they do not add a commit to the
        path of the requests waiting for theirs.
        """
        if self._task is None or self._task.done():
            raise WriterStopped("the call writer is not running")
        op = _Op(collection, doc, background)
        self._queue.put_nowait(op)
        return op.done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._getter is None:
                    self._getter = asyncio.ensure_future(self._queue.get())
                getter = self._getter
                if self._background:
                    # Held-back inserts are written by age or size only, not whenever the queue
                    # is empty: at low concurrency it nearly always is, and a commit of them
                    # every time made the next call's insert wait behind it.
                    timeout = self._background_since + BACKGROUND_MAX_DELAY_SECONDS - loop.time()
                    if timeout > 0:
                        await asyncio.wait({getter}, timeout=timeout)
                    if not getter.done():
                        self._busy = True
                        await self._write(self._background)
                        self._background = []
                        self._busy = False
                        continue
                first = await getter
                self._busy, self._getter = True, None
                await self._take(loop, first)
                self._busy = False
        finally:
            taken = self._getter
            if taken is not None:
                if taken.done() and not taken.cancelled():  # taken off the queue, never written
                    _fail(taken.result(), WriterStopped("the call writer stopped"))
                taken.cancel()

    async def _take(self, loop: asyncio.AbstractEventLoop, first: _Op) -> None:
        """Write ``first`` and whatever else is queued; hold background inserts back."""
        batch = [first]
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        urgent = [op for op in batch if not op.background]
        held = [op for op in batch if op.background]
        if held and not self._background:
            self._background_since = loop.time()
        self._background.extend(held)
        await self._write(urgent)
        if self._background and (
            len(self._background) >= MAX_BATCH
            or loop.time() - self._background_since > BACKGROUND_MAX_DELAY_SECONDS
        ):
            await self._write(self._background)
            self._background = []

    async def _write(self, batch: list[_Op]) -> None:
        groups: dict[str, list[_Op]] = {}
        for op in batch:
            groups.setdefault(op.collection, []).append(op)
        for collection, ops in groups.items():
            await self._insert_many(collection, ops)

    async def _insert_many(self, collection: str, ops: list[_Op]) -> None:
        pending = ops
        for delay in (*BUSY_RETRY_DELAYS, None):
            pending = await self._attempt(collection, pending, final=delay is None)
            if not pending or delay is None:
                return
            await asyncio.sleep(delay)

    async def _attempt(self, collection: str, ops: list[_Op], final: bool) -> list[_Op]:
        """One ``insert_many``; settles every op except those refused as busy (returned)."""
        retry: list[_Op] = []
        try:
            await self._db[collection].insert_many([op.doc for op in ops], ordered=False)
        except BulkWriteError as exc:
            failed: dict[int, Any] = {e["index"]: e for e in exc.details.get("writeErrors", [])}
            for index, op in enumerate(ops):
                error = failed.get(index)
                if error is None:
                    _settle(op, True)
                elif error.get("code") == DUPLICATE_KEY:
                    _settle(op, False)
                elif is_busy(error) and not final:
                    retry.append(op)
                else:
                    _fail(op, exc)
            return retry
        except (OperationFailure, BSONError, UnicodeError) as exc:  # the store refused the batch
            if is_busy(exc) and not final:
                return ops
            if len(ops) > 1 and _maybe_one_documents(exc):  # try each alone, so only it fails
                return [op for one in ops for op in await self._attempt(collection, [one], final)]
            for op in ops:
                _fail(op, exc)
            return []
        except Exception as exc:  # the store is unavailable: every caller gets the error
            for op in ops:
                _fail(op, exc)
            return []
        for op in ops:
            _settle(op, True)
        return []


def _maybe_one_documents(exc: Exception) -> bool:
    """Whether a refused batch may be refused for one document's sake: not a timeout, nor a
    write concern left unsatisfied (the batch was written), each of which would recur (and
    last) once per document."""
    return not (isinstance(exc, WriteConcernError) or getattr(exc, "timeout", False))


def _settle(op: _Op, inserted: bool) -> None:
    if not op.done.done():
        op.done.set_result(inserted)


def _fail(op: _Op, exc: BaseException) -> None:
    if not op.done.done():
        op.done.set_exception(exc)
        op.done.exception()  # the caller may have gone away: never warn about it
