"""The dev stack's demo server (loopback only): sample recordings and a webhook receiver.

* ``GET /call.wav``, ``GET /call.mp3``: a dual-channel recording (3 s; the caller, channel 0,
  a 440 Hz tone, the agent, channel 1, a 1 kHz tone), generated at start-up. Any other
  path answers 404 (the README tour breaks a call with ``/missing.wav``).
* ``POST /webhooks``: stores each delivery (headers and raw body) as one JSON file under
  ``--dir`` (``.run/webhooks/``) and answers 204; ``GET /webhooks`` lists them.
* ``GET /healthz``, ``/readyz``, ``/metrics``: as on every service.

Usage: ``python -m tools.demo_server --port 8000 --dir .run/webhooks``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import wave
from pathlib import Path

import av
import numpy as np
from aiohttp import web

from callingest.http import add_ops_routes

SECONDS = 3.0
CALLER_HZ = 440.0
AGENT_HZ = 1000.0
WAV_RATE = 16000
MP3_RATE = 44100
RECORDINGS = web.AppKey("recordings", dict)
WEBHOOK_DIR = web.AppKey("webhook_dir", Path)


def tones(rate: int) -> np.ndarray:
    """int16 samples of shape (n, 2): the caller's tone on channel 0, the agent's on channel 1."""
    t = np.arange(round(SECONDS * rate), dtype=np.float64) / rate
    stereo = np.stack([np.sin(2 * np.pi * CALLER_HZ * t), np.sin(2 * np.pi * AGENT_HZ * t)], axis=1)
    return (0.5 * 32767 * stereo).astype("<i2")


def wav_bytes() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(WAV_RATE)
        out.writeframes(tones(WAV_RATE).tobytes())
    return buffer.getvalue()


def mp3_bytes() -> bytes:
    buffer = io.BytesIO()
    samples = tones(MP3_RATE)
    with av.open(buffer, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=MP3_RATE, layout="stereo")
        for start in range(0, len(samples), 1152):
            block = np.ascontiguousarray(samples[start:start + 1152].T)  # planar: (channels, n)
            frame = av.AudioFrame.from_ndarray(block, format="s16p", layout="stereo")
            frame.sample_rate = MP3_RATE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


async def recording(request: web.Request) -> web.Response:
    body = request.app[RECORDINGS].get(request.match_info["name"])
    if body is None:
        raise web.HTTPNotFound(text="no such recording")
    kind = "audio/wav" if request.match_info["name"].endswith(".wav") else "audio/mpeg"
    return web.Response(body=body, content_type=kind)


async def receive_webhook(request: web.Request) -> web.Response:
    """Store one delivery: ``<unix ms>-<webhook-id>.json`` with its headers and raw body."""
    body = await request.read()
    directory = request.app[WEBHOOK_DIR]
    directory.mkdir(parents=True, exist_ok=True)
    webhook_id = "".join(c for c in request.headers.get("webhook-id", "no-id")
                         if c.isalnum() or c in "-_")[:100]
    path = directory / f"{time.time_ns() // 1_000_000}-{webhook_id}.json"
    path.write_text(json.dumps({"received_at": time.time(), "headers": dict(request.headers),
                                "body": body.decode(errors="replace")}, indent=2))
    return web.Response(status=204)


async def list_webhooks(request: web.Request) -> web.Response:
    directory = request.app[WEBHOOK_DIR]
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    return web.json_response([json.loads(p.read_text()) for p in files])


async def nothing_to_check() -> dict[str, bool]:
    """Readiness: the recordings are in memory, the webhook directory is created on write."""
    return {}


def make_app(webhook_dir: Path) -> web.Application:
    app = web.Application()
    app[RECORDINGS] = {"call.wav": wav_bytes(), "call.mp3": mp3_bytes()}
    app[WEBHOOK_DIR] = webhook_dir
    add_ops_routes(app, nothing_to_check)  # /healthz, /readyz, /metrics as on every service
    app.router.add_post("/webhooks", receive_webhook)
    app.router.add_get("/webhooks", list_webhooks)
    app.router.add_get("/{name}", recording)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="demo_server", description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dir", type=Path, default=Path(".run/webhooks"))
    args = parser.parse_args(argv)
    web.run_app(make_app(args.dir), host="127.0.0.1", port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
