"""The republisher stops when the gateway stops, also when its cancellation is swallowed.

Twice in twelve full runs, and in 5 of 148 runs of the test alone,
test_gateway_durability.py::test_republisher_publishes_unpublished_calls_once hung in
``first.close()``: the gateway cancelled its republisher while that was sending a MongoDB
command; pymongo's ``asyncio.wait_for`` around the socket write (Python 3.11) returned
instead of raising ``CancelledError``, and the loop ran on for ever (callingest/tasks.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.gateway.republisher import Republisher


class SwallowingRepublisher(Republisher):
    """A republisher whose pass awaits what pymongo awaits around a socket write."""

    def __init__(self) -> None:
        super().__init__(db=None, publisher=None)  # type: ignore[arg-type]
        self.writing = asyncio.Event()
        self.write: asyncio.Future[None] | None = None
        self.passes = 0

    async def retry_failed(self) -> int:
        self.passes += 1
        self.write = asyncio.get_running_loop().create_future()
        self.writing.set()
        await asyncio.wait_for(self.write, 5.0)
        self.writing.clear()
        return 0


async def test_a_stopped_republisher_returns_even_if_its_cancellation_is_swallowed() -> None:
    republisher = SwallowingRepublisher()
    task: asyncio.Task[Any] = asyncio.create_task(
        republisher.run(0.01, 3600.0, scans=False))
    await asyncio.wait_for(republisher.writing.wait(), 5.0)
    assert republisher.write is not None
    # What the gateway's shutdown does, in the loop pass in which the write completes.
    republisher.write.set_result(None)
    republisher.stop()
    task.cancel()
    await asyncio.wait({task}, timeout=3.0)
    assert task.done()
    assert republisher.passes == 1
