"""A byte budget for recording bodies held in memory by the fetcher.

A download buffers up to one multipart part (``PART_SIZE``) of its recording; the buffer's
growth, the copy sent with a single PUT and the upload's own handling make that about four
times ``min(size, PART_SIZE)`` bytes at the peak (measured in the end-to-end benchmark).
With hundreds of calls in flight (most of them waiting on
a host, holding nothing) the fetcher's memory is bounded by this budget instead of by the
number of calls: a download reserves its share before it reads the body and waits while
the budget is spent (a smaller reservation that fits may pass a larger one). Downloads
that wait here are behind transfers that move at the minimum rate at least, so the wait
is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """At most ``capacity`` bytes reserved at once; one reservation larger than the whole
    budget is let through alone (it is clamped to the capacity)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reserved = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        size = max(0, min(size, self.capacity))
        async with self._changed:
            await self._changed.wait_for(lambda: self.reserved + size <= self.capacity)
            self.reserved += size
        try:
            yield
        finally:
            async with self._changed:
                self.reserved -= size
                self._changed.notify_all()
