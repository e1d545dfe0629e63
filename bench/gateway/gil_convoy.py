"""How much an exporting thread slows an event loop through the GIL, at two switch intervals.

    .venv/bin/python bench/gateway/gil_convoy.py [--rounds 5] [--seconds 2]

One process: an asyncio loop does socket round trips (each gives the GIL up twice, as a
server's sends and receives do) while a thread encodes a batch of 512 finished spans with
OpenTelemetry's OTLP encoder three times a second, as the BatchSpanProcessor's thread does
for a gateway serving 1,500 traced requests a second. Prints the loop's round trips per
second with no encoding, with encoding at CPython's default switch interval (5 ms) and at
the interval callingest.tracing sets when it exports (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callingest.tracing import EXPORT_SWITCH_INTERVAL

DEFAULT_SWITCH_INTERVAL = 0.005
BATCH = 512
BATCHES_PER_SECOND = 3


def finished_spans() -> list[ReadableSpan]:
    """A batch of spans like the gateway's (server kind, four attributes)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "callingest-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("callingest")
    for n in range(BATCH):
        span = tracer.start_span("POST /api/2022-03-01/calls.json", kind=trace.SpanKind.SERVER,
                                 attributes={"http.request.method": "POST",
                                             "http.route": "/api/2022-03-01/calls.json"})
        span.set_attribute("cuid", f"c{n:020d}")
        span.set_attribute("http.response.status_code", 201)
        span.end()
    return list(exporter.get_finished_spans())


async def round_trips(seconds: float) -> float:
    """Socket round trips per second the loop makes in ``seconds``."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    count, end = 0, time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            await loop.sock_sendall(a, b"x" * 100)
            await loop.sock_recv(b, 100)
            count += 1
    finally:
        a.close()
        b.close()
    return count / seconds


async def measure(rounds: int, seconds: float) -> dict[str, list[float]]:
    spans = finished_spans()
    encoding, stop = threading.Event(), threading.Event()

    def exporter() -> None:
        while not stop.is_set():
            if encoding.is_set():
                encode_spans(spans).SerializePartialToString()
            time.sleep(1 / BATCHES_PER_SECOND)

    thread = threading.Thread(target=exporter, daemon=True)
    thread.start()
    cases = {"no export": (False, DEFAULT_SWITCH_INTERVAL)}
    for interval in (DEFAULT_SWITCH_INTERVAL, EXPORT_SWITCH_INTERVAL):
        cases[f"export, {interval * 1000:g} ms switch interval"] = (True, interval)
    results: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(rounds):
            for name, (export, interval) in cases.items():
                sys.setswitchinterval(interval)
                (encoding.set if export else encoding.clear)()
                results[name].append(await round_trips(seconds))
    finally:
        stop.set()
        thread.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    results = asyncio.run(measure(args.rounds, args.seconds))
    base = statistics.median(results["no export"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name}: median {median:,.0f} round trips/s ({median / base:.2f} of no export); "
              f"rounds: {', '.join(f'{v:,.0f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
