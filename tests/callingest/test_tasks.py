"""Stopping background tasks whose cancellation is swallowed (callingest/tasks.py)."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from callingest.tasks import cancel_and_wait


async def waiting_on(fut: asyncio.Future[None]) -> str:
    """What pymongo does around every socket write: ``asyncio.wait_for`` with a timeout."""
    await asyncio.wait_for(fut, 5.0)
    return "carried on"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for was fixed in 3.12")
async def test_wait_for_of_python_3_11_swallows_a_cancellation_that_comes_with_the_result() -> None:
    """Why the gateway's shutdown hung: the task was cancelled in the loop pass in which the
    operation it waited for completed, and went on as if it had not been cancelled."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(waiting_on(fut))
    await asyncio.sleep(0)  # the task waits in wait_for
    fut.set_result(None)
    task.cancel()
    assert await task == "carried on"
    assert task.cancelling() == 1  # asked to stop, and running on


async def loop_swallowing_the_first_cancellation(passes: list[int]) -> None:
    """A background loop whose first cancellation some library swallowed."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
        passes.append(1)


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_its_cancellation(
    caplog: pytest.LogCaptureFixture
) -> None:
    passes: list[int] = []
    task = asyncio.create_task(loop_swallowing_the_first_cancellation(passes))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await cancel_and_wait(task, "test loop", recancel_seconds=0.2)
    assert task.cancelled()
    assert 0.15 < time.monotonic() - started < 2.0
    assert "swallowed its cancellation" in caplog.text


async def test_cancel_and_wait_gives_up_on_a_task_that_never_stops(
    caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await cancel_and_wait(task, "stubborn", recancel_seconds=0.1, give_up_seconds=0.5)
    assert 0.4 < time.monotonic() - started < 2.0
    assert not task.done() and "left running" in caplog.text
    stop.set()
    await task


async def test_cancel_and_wait_raises_what_the_task_failed_with_and_keeps_our_cancellation() -> None:
    async def failing() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await cancel_and_wait(task, "failing")

    # Cancelling the caller is not swallowed (as ``suppress(CancelledError): await task`` did).
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    inner = asyncio.create_task(waiting_on(never))
    stopper = asyncio.create_task(cancel_and_wait(inner, "inner", recancel_seconds=5.0))
    await asyncio.sleep(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await asyncio.wait({inner}, timeout=1.0)
    assert inner.cancelled()
