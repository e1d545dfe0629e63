"""The process pool that runs transcodes: CPU-bound work off the event loop, bounded.

One worker process per core (``NORMALIZER_WORKERS``, 0 = ``os.cpu_count()``), started
with ``spawn`` (never ``fork`` from a process with an event loop and Kafka threads).
:meth:`TranscodePool.slot` bounds how many calls hold a temp file and wait for a worker
at once (twice the workers), so a busy pool pauses the consumer instead of filling the
disk. A worker that dies (OOM kill, segfault in a decoder) breaks the executor: the
pool is rebuilt and the call fails transiently, to be retried.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager

from callingest.errors import TransientError
from services.normalizer.transcode import NormalizedInfo, transcode_file

# A worker is replaced after this many transcodes, so a slow leak in a decoder cannot grow.
_MAX_TASKS_PER_WORKER = 200


def _worker_init() -> None:
    """Workers leave Ctrl-C to the service, which drains them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TranscodePool:
    """Runs :func:`~services.normalizer.transcode.transcode_file` in worker processes."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._slots = asyncio.Semaphore(self.workers * 2)
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        """A pool with every worker started now (a spawn-context pool otherwise starts them
        one by one as transcodes first overlap: the service's memory would step up under load
        and the first overlapping calls would wait for a Python start-up). Never blocks."""
        executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            max_tasks_per_child=_MAX_TASKS_PER_WORKER,
        )
        for _ in range(self.workers):  # each submit with no idle worker starts one
            executor.submit(os.getpid)
        return executor

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of ``2 x workers`` slots (waits while all are taken)."""
        async with self._slots:
            yield

    async def transcode(self, src_path: str, dst_path: str, call_direction: str) -> NormalizedInfo:
        """Transcode in a worker. Raises RecordingError (permanent) as the transcoder does,
        TransientError ``NormalizerWorkerCrashed`` if the worker died."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            return await loop.run_in_executor(executor, transcode_file, src_path, dst_path, call_direction)
        except BrokenProcessPool:
            if self._executor is executor:
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
            raise TransientError(
                "a normalizer worker process died while transcoding", "NormalizerWorkerCrashed"
            ) from None

    def close(self) -> None:
        """Stop the workers (waits for running transcodes; queued ones are dropped)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
