"""A test that hangs in a busy event loop: run by test_hung_test_stops.py in a pytest session
of its own (the name does not start with ``test_``, so the suite never collects it)."""

from __future__ import annotations

import asyncio


async def test_hangs_while_the_event_loop_runs_callbacks() -> None:
    loop = asyncio.get_running_loop()

    def busy() -> None:  # the loop is mostly in callbacks (protocols, timers), not in select()
        sum(range(5000))
        loop.call_soon(busy)

    loop.call_soon(busy)
    await asyncio.Event().wait()
