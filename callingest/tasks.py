"""Stopping background tasks whose cancellation a library may swallow.

On Python 3.11, ``asyncio.wait_for`` returns its operation's result instead of raising
``CancelledError`` when the cancellation arrives in the loop pass in which the operation
completed (fixed in 3.12, where it is built on ``asyncio.timeout``). pymongo wraps every
socket write in ``asyncio.wait_for`` (``network_layer.async_sendall``), so a task cancelled
while a MongoDB command is being sent can carry on as if nothing happened: a background loop
then runs for ever, and whoever awaits it after ``cancel()`` waits for ever. That hung the
gateway's shutdown (its republisher loop) in 5 of 148 runs of the republisher test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from callingest.logging import get_logger

log = get_logger(__name__)

RECANCEL_SECONDS = 1.0
GIVE_UP_SECONDS = 10.0


async def cancel_and_wait(task: asyncio.Task[Any], what: str,
                          recancel_seconds: float = RECANCEL_SECONDS,
                          give_up_seconds: float = GIVE_UP_SECONDS) -> None:
    """Cancel ``task`` and wait until it ends, cancelling it again every ``recancel_seconds``
    while it runs on (a swallowed cancellation, logged); after ``give_up_seconds`` it is left
    running (logged as an error) so that a shutdown never hangs on it.

    Unlike ``with suppress(CancelledError): await task``, a cancellation of the caller is not
    swallowed. An exception the task ended with (other than its cancellation) is raised.
    """
    give_up = time.monotonic() + give_up_seconds
    while True:
        task.cancel()
        await asyncio.wait({task}, timeout=max(0.0, min(recancel_seconds,
                                                        give_up - time.monotonic())))
        if task.done():
            break
        if time.monotonic() >= give_up:
            log.error("a background task did not stop when cancelled; left running",
                      extra={"task": what})
            return
        log.warning("a background task swallowed its cancellation; cancelling it again",
                    extra={"task": what})
    error = None if task.cancelled() else task.exception()
    if error is not None:
        raise error
