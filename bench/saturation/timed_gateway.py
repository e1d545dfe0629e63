"""``callingest serve gateway`` with timers around a new call's two waits (bench only).

Each accepted new call prints one line to stderr (the gateway's log):
``STEPTIME <unix time> <store insert s> <Kafka publication s>``: the calls insert (queued
in the CallWriter and its batched ``insert_many``) and the CallSubmitted send until Kafka's
acknowledgement. ``bench/saturation/run.py --steps`` runs the stack's gateway this way.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from callingest.settings import load_settings
from services.gateway.main import serve
from services.gateway.publisher import CallPublisher
from services.gateway.writer import CallWriter

_started: dict[str, tuple[float, float]] = {}


def install() -> None:
    insert, publish_new = CallWriter.insert, CallPublisher.publish_new

    async def timed_insert(self: CallWriter, collection: str, doc: dict[str, Any]) -> bool:
        started = time.perf_counter()
        inserted = await insert(self, collection, doc)
        _started[doc["_id"]] = (started, time.perf_counter())
        return inserted

    async def timed_publish(self: CallPublisher, call: dict[str, Any]) -> None:
        started = time.perf_counter()
        await publish_new(self, call)
        before = _started.pop(call["_id"], None)
        if before is not None:
            print(f"STEPTIME {time.time():.3f} {before[1] - before[0]:.4f} "
                  f"{time.perf_counter() - started:.4f}", file=sys.stderr, flush=True)

    CallWriter.insert = timed_insert  # type: ignore[method-assign]
    CallPublisher.publish_new = timed_publish  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    asyncio.run(serve(load_settings()))
