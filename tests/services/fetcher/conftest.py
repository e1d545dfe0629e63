"""Fixtures for the fetcher tests: local recording servers on 127.0.0.1, a tripwire that fails
any test whose code tries to open a connection to a non-loopback address, the S3 store.

Nothing here ever sends a packet off loopback: refusals are decided by the SSRF guard
before aiohttp opens a socket, and the tripwire checks that (it raises instead of
connecting if the guard ever let a foreign address through).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from callingest import s3
from callingest.ssrf import AddressPolicy, guarded_session
from services.fetcher.download import FetchPolicy
from tests.conftest import make_settings
from tests.helpers import serve_recordings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wav_bytes(payload_len: int = 8000, seed: int = 1) -> bytes:
    """A valid 8 kHz 16-bit stereo PCM WAV whose data chunk is ``payload_len`` bytes."""
    block = bytes((i * 31 + seed) & 0xFF for i in range(4099))  # not a divisor of any part size
    data = (block * (payload_len // len(block) + 1))[:payload_len]
    fmt = struct.pack("<HHIIHH", 1, 2, 8000, 8000 * 4, 4, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack(
        "<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


# -- tripwire ------------------------------------------------------------------------------

@dataclass
class Tripwire:
    """Every (address, port) aiohttp tried to connect to during a test."""

    attempts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def attempted(self) -> list[str]:
        return [host for host, _ in self.attempts]

    def attempted_except(self, port: int) -> list[str]:
        """Addresses tried on any port but ``port`` (the S3 store's, in download tests)."""
        return [host for host, p in self.attempts if p != port]

    @property
    def foreign(self) -> list[str]:
        return [a for a in self.attempted if not ipaddress.ip_address(a.split("%")[0]).is_loopback]


@pytest.fixture(autouse=True)
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tripwire]:
    """Refuses (and records) any aiohttp connection attempt to a non-loopback address."""
    wire = Tripwire()
    original = aiohttp.TCPConnector._wrap_create_connection

    async def guarded(self: aiohttp.TCPConnector, *args: Any, **kwargs: Any) -> Any:
        infos = kwargs.get("addr_infos") or []
        hosts = [info[4][0] for info in infos]
        wire.attempts.extend((info[4][0], info[4][1]) for info in infos)
        if any(not ipaddress.ip_address(h.split("%")[0]).is_loopback for h in hosts):
            raise AssertionError(f"test tried to connect off loopback: {hosts}")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "_wrap_create_connection", guarded)
    yield wire
    assert not wire.foreign, f"connection attempted to non-loopback addresses: {wire.foreign}"


# -- resolver stub -------------------------------------------------------------------------

class StubResolver(AbstractResolver):
    """Answers from a fixed table (a list of answers per host is served in turn)."""

    def __init__(self, table: dict[str, list[list[str]] | list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.calls.append(host)
        entry = self.table.get(host)
        if entry is None:
            raise OSError(f"stub resolver: unknown host {host}")
        answer: list[str]
        if entry and isinstance(entry[0], list):
            turns: list[list[str]] = entry  # type: ignore[assignment]
            answer = turns.pop(0) if len(turns) > 1 else turns[0]
        else:
            answer = entry  # type: ignore[assignment]
        return [
            {"hostname": host, "host": a,
             "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
             "proto": 0, "flags": 0}
            for a in answer
        ]

    async def close(self) -> None:
        return None


# -- recording server ----------------------------------------------------------------------

@dataclass
class Hit:
    path: str
    raw_path: str
    query: str
    headers: dict[str, str]
    at: float
    peer: str


class RecordingServer:
    """An aiohttp server on 127.0.0.1 (random port); tests register handlers per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: list[Hit] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def url(self, path_and_query: str) -> str:
        return f"http://127.0.0.1:{self.port}{path_and_query}"

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername")[0] if request.transport else "?"
        self.hits.append(Hit(request.path, request.raw_path, request.query_string,
                             dict(request.headers), time.monotonic(), peer))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404)
        return await handler(request)

    async def start(self) -> None:
        self._runner, base = await serve_recordings(self._dispatch, 0.1, prefix="", method="*")
        self.port = URL(base).port or 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[RecordingServer]:
    srv = RecordingServer()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def other_server() -> AsyncIterator[RecordingServer]:
    """A second server: a different origin (port) than :func:`server`."""
    srv = RecordingServer()
    await srv.start()
    yield srv
    await srv.stop()


# -- handlers ------------------------------------------------------------------------------

def serve(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers=headers)
    return handler


def serve_chunked(body: bytes, chunk: int = 64 * 1024) -> Handler:
    """The body without Content-Length (chunked transfer encoding)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), chunk):
            await resp.write(body[i:i + chunk])
        await resp.write_eof()
        return resp
    return handler


def sequence(*handlers: Handler) -> Handler:
    """Each request answered by the next handler; the last one repeats."""
    queue = list(handlers)

    async def handler(request: web.Request) -> web.StreamResponse:
        current = queue.pop(0) if len(queue) > 1 else queue[0]
        return await current(request)
    return handler


def reset_connection() -> Handler:
    """Accepts the request, then drops the TCP connection without an answer."""
    async def handler(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:  # RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await asyncio.sleep(0.05)
        raise ConnectionResetError("reset by test server")
    return handler


def hang(seconds: float = 30.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=204)
    return handler


def trickle(interval: float, head: bytes = b"RIFF", total: int = 100_000) -> Handler:
    """Headers at once, then one byte every ``interval`` seconds."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(total)})
        await resp.prepare(request)
        data = head + b"\0" * (total - len(head))
        for i in range(total):
            await resp.write(data[i:i + 1])
            await asyncio.sleep(interval)
        return resp
    return handler


# -- policies, sessions, S3 ----------------------------------------------------------------

def fast_policy(**overrides: Any) -> FetchPolicy:
    """Small timeouts and backoff so failure tests finish in well under a second each."""
    values: dict[str, Any] = {
        "max_bytes": 64 * 1024 * 1024,
        "connect_timeout": 1.0,
        "read_timeout": 0.5,
        "max_attempts": 3,
        "max_redirects": 3,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "max_retry_after": 5.0,
    }
    values.update(overrides)
    return FetchPolicy(**values)


LOOPBACK_OK = AddressPolicy(allow_loopback=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A guarded session as the service builds it, loopback allowed (dev stack)."""
    async with guarded_session(LOOPBACK_OK) as session:
        yield session


@dataclass
class Store:
    client: Any
    bucket: str
    port: int

    async def get(self, key: str) -> bytes | None:
        if await s3.head(self.client, self.bucket, key) is None:
            return None
        obj = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with obj["Body"] as body:
            data: bytes = await body.read()
            return data

    async def open_uploads(self, key: str) -> list[dict[str, Any]]:
        listing = await self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        uploads: list[dict[str, Any]] = listing.get("Uploads", [])
        return uploads


@pytest.fixture(scope="session")
async def store(servers: Any) -> AsyncIterator[Store]:
    """The real S3 store (versitygw on loopback, started by tests/conftest.py), dev bucket.

    One client for the whole session: creating an aiobotocore client costs about a second.
    """
    settings = make_settings(servers)
    async with s3.s3_client(settings) as client:
        await s3.ensure_bucket(client, settings.s3_bucket)
        yield Store(client, settings.s3_bucket, URL(settings.s3_endpoint_url or "").port or 0)


@pytest.fixture
async def key(store: Store) -> AsyncIterator[str]:
    """A fresh object key; the object and any unfinished upload under it are removed after."""
    name = f"raw/test-{uuid.uuid4().hex}/1"
    yield name
    for upload in await store.open_uploads(name):
        await store.client.abort_multipart_upload(Bucket=store.bucket, Key=upload["Key"],
                                                  UploadId=upload["UploadId"])
    await store.client.delete_object(Bucket=store.bucket, Key=name)
