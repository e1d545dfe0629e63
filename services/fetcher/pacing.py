"""The timing of a download: the server's Retry-After, backoff between attempts, and the
minimum transfer rate that cuts a source trickling bytes."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import AsyncIterator


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff before attempt ``attempt + 1`` (attempt counts from 1)."""
    return random.uniform(0.0, min(cap, base * (2 ** (attempt - 1))))


async def watchdog(chunks: AsyncIterator[bytes], window: float,
                   min_bytes_per_second: float) -> AsyncIterator[bytes]:
    """``chunks``, but raise TimeoutError when ``window`` seconds of waiting brought fewer
    than ``min_bytes_per_second * window`` bytes (a trickle that per-read timeouts miss).
    Only time spent waiting for the source counts, not time spent uploading."""
    least = min_bytes_per_second * window
    waited = 0.0
    received = 0
    while True:
        started = time.monotonic()
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        waited += time.monotonic() - started
        received += len(chunk)
        if waited >= window:
            if received < least:
                raise TimeoutError("source too slow")
            waited, received = 0.0, 0
        yield chunk
