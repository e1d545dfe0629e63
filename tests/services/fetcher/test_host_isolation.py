"""Dead recording hosts on loopback: black hole, 1 byte/s drip, refused connections; the
per-host circuit breaker (opens, half-opens, closes) and concurrency cap.

Each download uses the service's own policy (:meth:`FetchPolicy.from_settings`) so the
defaults are what is tested: one download per processing attempt (no in-place retry that
would hold the consumer slot), then the delayed retry tiers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callingest import metrics
from callingest.errors import Deferred, Refused, TransientError
from callingest.settings import Settings
from services.fetcher.budget import ByteBudget
from services.fetcher.download import FetchPolicy, fetch_recording
from services.fetcher.hosts import CLOSED, HALF_OPEN, OPEN, CircuitOpen, HostGuard
from tests.conftest import free_port, make_settings
from tests.helpers import BlackHole, black_hole
from tests.services.fetcher.conftest import LOOPBACK_OK, RecordingServer, Store, serve, trickle, wav_bytes

pytestmark = [pytest.mark.s3]


def policy(servers: Any, **overrides: Any) -> FetchPolicy:
    """The service's policy from settings with the defaults under test, short waits."""
    settings: Settings = make_settings(servers, **overrides)
    return FetchPolicy.from_settings(settings)


async def fetch(url: str, http: aiohttp.ClientSession, store: Store, key: str, pol: FetchPolicy,
                hosts: HostGuard | None = None) -> Any:
    return await fetch_recording(url, auth=None, http=http, s3=store.client, bucket=store.bucket,
                                 key=key, policy=pol, address_policy=LOOPBACK_OK, hosts=hosts)


@pytest.fixture
async def hole() -> AsyncIterator[BlackHole]:
    async with black_hole() as listener:
        yield listener


async def test_black_hole_host_is_cut_after_the_first_byte_timeout_with_one_connection(
        servers: Any, http: aiohttp.ClientSession, store: Store, key: str,
        hole: BlackHole) -> None:
    """Accepts the connection, never answers: the first-byte timeout ends it (the read
    timeout is far longer), and there is one connection, not one per in-place retry."""
    pol = policy(servers, fetch_first_byte_timeout_seconds=1.0, fetch_read_timeout_seconds=60.0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TransientError) as info:
        await asyncio.wait_for(fetch(f"{hole.url}/call.wav", http, store, key, pol), 30)
    assert info.value.failure_class == "RecordingTimeout"
    assert asyncio.get_running_loop().time() - started < 30
    assert hole.accepted == 1
    assert await store.get(key) is None


async def test_drip_of_one_byte_per_second_is_cut_by_the_minimum_rate(
        servers: Any, server: RecordingServer, http: aiohttp.ClientSession, store: Store,
        key: str) -> None:
    """Headers at once, then a byte a second: under the minimum rate over one read window."""
    url = server.route("/drip.wav", trickle(1.0))
    pol = policy(servers, fetch_read_timeout_seconds=2.0)
    with pytest.raises(TransientError) as info:
        await asyncio.wait_for(fetch(url, http, store, key, pol), 30)
    assert info.value.failure_class == "RecordingTimeout"
    assert len(server.hits_for("/drip.wav")) == 1


async def test_slow_but_steady_host_below_the_minimum_rate_is_cut(
        servers: Any, server: RecordingServer, http: aiohttp.ClientSession, store: Store,
        key: str) -> None:
    """512 bytes/s never stalls a read, yet is under the default 1 KiB/s minimum."""

    async def slow(request: web.Request) -> web.StreamResponse:
        body = wav_bytes(64_000)
        resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        for i in range(0, len(body), 128):
            await resp.write(body[i:i + 128])
            await asyncio.sleep(0.25)
        return resp

    url = server.route("/slow.wav", slow)
    pol = policy(servers, fetch_read_timeout_seconds=2.0)
    assert pol.min_bytes_per_second == 1024
    with pytest.raises(TransientError) as info:
        await asyncio.wait_for(fetch(url, http, store, key, pol), 30)
    assert info.value.failure_class == "RecordingTimeout"


@pytest.mark.parametrize(("host", "shown"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
async def test_refused_connections_fail_fast_once_then_open_the_circuit(
        servers: Any, http: aiohttp.ClientSession, store: Store, key: str, host: str,
        shown: str) -> None:
    """An IPv6 host is named as a URL writes it: http://[::1]:port, not http://::1:port."""
    port = free_port()  # nothing listens: connections are refused
    url = f"http://{shown}:{port}/call.wav"
    hosts = HostGuard(max_per_host=8, failure_threshold=3, cooldown=60)
    pol = policy(servers)
    for _ in range(3):
        with pytest.raises(TransientError) as info:
            await asyncio.wait_for(fetch(url, http, store, key, pol, hosts), 10)
        assert info.value.failure_class == "RecordingConnectionError"
    assert hosts.state(("http", host, port)) == OPEN
    with pytest.raises(Refused) as refused:
        await fetch(url, http, store, key, pol, hosts)
    # the cause that opened the circuit, the host named once, bracket-free of any path
    assert refused.value.failure_class == "RecordingConnectionError"
    assert refused.value.message == (f"ClientConnectorError fetching http://{shown}:{port} "
                                     "(host not contacted again: circuit open)")


def _gauge(state: str) -> float:
    value: float = metrics.FETCH_CIRCUITS.labels(state)._value.get()
    return value


async def test_circuit_opens_half_opens_and_closes(
        servers: Any, server: RecordingServer, http: aiohttp.ClientSession, store: Store,
        key: str) -> None:
    """Closed -> open after N dead tries (no connection while open) -> half-open after the
    cool-down with a single probe (others refused meanwhile) -> closed on the probe's
    success; a failed probe opens it again."""
    healthy = wav_bytes()
    mode = {"now": "reset"}

    async def flaky(request: web.Request) -> web.StreamResponse:
        if mode["now"] == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("test server down")
        if mode["now"] == "slow":
            await asyncio.sleep(1.0)
        return web.Response(body=healthy, content_type="audio/wav")

    url = server.route("/c.wav", flaky)
    host = ("http", "127.0.0.1", server.port)
    hosts = HostGuard(max_per_host=8, failure_threshold=2, cooldown=1.0)
    pol = policy(servers)
    for _ in range(2):
        with pytest.raises(TransientError):
            await fetch(url, http, store, key, pol, hosts)
    assert hosts.state(host) == OPEN
    assert hosts.counts()[OPEN] == 1 and _gauge(OPEN) >= 1
    tried = len(server.hits_for("/c.wav"))
    with pytest.raises(Refused):
        await fetch(url, http, store, key, pol, hosts)
    assert len(server.hits_for("/c.wav")) == tried  # not contacted while open
    with pytest.raises(CircuitOpen):  # the step's early check, before any S3/database read
        hosts.check(host, "x")

    # Cool-down over, host still dead: the single probe fails and the circuit opens again.
    await asyncio.sleep(1.1)
    assert hosts.state(host) == HALF_OPEN
    with pytest.raises(TransientError) as info:
        await fetch(url, http, store, key, pol, hosts)
    assert not isinstance(info.value, Refused)  # the probe went out
    assert len(server.hits_for("/c.wav")) > tried
    assert hosts.state(host) == OPEN

    # Cool-down over, host back: one probe goes out, a concurrent call is refused, the
    # probe's success closes the circuit and calls flow again.
    await asyncio.sleep(1.1)
    mode["now"] = "slow"
    probe = asyncio.create_task(fetch(url, http, store, key, pol, hosts))
    await asyncio.sleep(0.3)
    with pytest.raises(Refused) as refused:
        await fetch(url, http, store, f"{key}-2", pol, hosts)
    assert refused.value.failure_class == "RecordingConnectionError"  # the probe's cause
    assert "circuit half-open, probe under way" in refused.value.message
    stored = await probe
    assert stored.size_bytes == len(healthy)
    assert hosts.state(host) == CLOSED
    assert hosts.counts() == {CLOSED: 0, OPEN: 0, HALF_OPEN: 0}  # closed and idle: forgotten
    await fetch(url, http, store, key, pol, hosts)


async def test_host_at_its_cap_defers_without_connecting_and_other_hosts_go_ahead(
        servers: Any, server: RecordingServer, other_server: RecordingServer,
        http: aiohttp.ClientSession, store: Store, key: str) -> None:
    release = asyncio.Event()
    both_in = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        if len(server.hits_for("/held.wav")) >= 2:
            both_in.set()
        await release.wait()
        return web.Response(body=wav_bytes(), content_type="audio/wav")

    url = server.route("/held.wav", held)
    other = other_server.route("/ok.wav", serve(wav_bytes()))
    hosts = HostGuard(max_per_host=2, failure_threshold=5, cooldown=30)
    pol = policy(servers, fetch_first_byte_timeout_seconds=20.0)
    running = [asyncio.create_task(fetch(url, http, store, f"{key}-{i}", pol, hosts))
               for i in range(2)]
    try:
        await asyncio.wait_for(both_in.wait(), 10)
        with pytest.raises(Deferred) as info:
            await fetch(url, http, store, f"{key}-3", pol, hosts)
        assert info.value.failure_class == "RecordingHostBusy"
        assert len(server.hits_for("/held.wav")) == 2
        stored = await asyncio.wait_for(fetch(other, http, store, key, pol, hosts), 10)
        assert stored.format == "wav"
    finally:
        release.set()
        for task in running:
            with contextlib.suppress(Exception):
                await task
        for i in range(2):
            with contextlib.suppress(Exception):
                await store.client.delete_object(Bucket=store.bucket, Key=f"{key}-{i}")



async def test_memory_budget_bounds_bodies_in_memory_not_calls_in_flight() -> None:
    """Reservations beyond the budget wait, in order, until memory is given back."""
    budget = ByteBudget(100)
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def hold(name: str, size: int) -> None:
        async with budget.reserve(size):
            order.append(name)
            first_in.set()
            await release.wait()

    first = asyncio.create_task(hold("first", 80))
    await first_in.wait()
    second = asyncio.create_task(hold("second", 60))
    small = asyncio.create_task(hold("small", 20))
    await asyncio.sleep(0.1)
    assert order == ["first", "small"] and budget.reserved == 100
    release.set()
    await asyncio.gather(first, second, small)
    assert order == ["first", "small", "second"] and budget.reserved == 0


async def test_a_call_for_a_busy_healthy_host_waits_briefly_for_a_place_instead_of_deferring(
        servers: Any, server: RecordingServer, http: aiohttp.ClientSession, store: Store,
        key: str) -> None:
    """Cap 1: the second call waits (bounded) for the first to finish, then downloads; with
    no wait allowed it would have been deferred."""
    from services.fetcher.hosts import check_host

    async def slowish(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.Response(body=wav_bytes(), content_type="audio/wav")

    url = server.route("/busy.wav", slowish)
    hosts = HostGuard(max_per_host=1, failure_threshold=5, cooldown=30)
    pol = policy(servers)
    first = asyncio.create_task(fetch(url, http, store, f"{key}-a", pol, hosts))
    await asyncio.sleep(0.1)
    with pytest.raises(Deferred):
        await check_host(url, hosts, wait=0.0)
    await check_host(url, hosts, wait=10.0)  # returns once the first download is done
    stored = await fetch(url, http, store, key, pol, hosts)
    assert stored.format == "wav"
    await first
    await store.client.delete_object(Bucket=store.bucket, Key=f"{key}-a")


async def test_calls_waiting_for_a_place_are_released_at_once_when_the_circuit_opens() -> None:
    """Cap 1, two calls waiting for the host (the wait is long: a busy healthy host serves its
    backlog in order); the download under way fails and opens the circuit: both waiters
    return at once, to be refused without connecting, instead of holding their slots until
    their wait runs out (the release of a place wakes only one of them)."""
    hosts = HostGuard(max_per_host=1, failure_threshold=1, cooldown=30)
    host = ("http", "rec.example", 80)
    with hosts.admit(host, "http://rec.example") as outcome:
        waiting = [asyncio.create_task(hosts.wait_for_room(host, 30.0)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)
        outcome.dead("RecordingTimeout", "timed out fetching http://rec.example")
    assert hosts.state(host) == OPEN
    await asyncio.wait_for(asyncio.gather(*waiting), 2.0)
    with pytest.raises(CircuitOpen):
        hosts.check(host, "http://rec.example")


async def test_with_the_default_wait_a_call_behind_a_slow_healthy_download_is_not_deferred(
        servers: Any, server: RecordingServer, http: aiohttp.ClientSession, store: Store,
        key: str) -> None:
    """Cap 1 and the service's default wait: a call behind a download that takes 3 s waits
    for the place and downloads. Each deferral costs a round trip through Kafka and a read
    of the call (in the 1,000-call benchmark six deferrals per call with a 2 s wait, 16 % of
    the CPU of a call: docs/benchmarks.md)."""
    from services.fetcher.hosts import check_host

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3.0)
        return web.Response(body=wav_bytes(), content_type="audio/wav")

    url = server.route("/slow.wav", slow)
    settings = make_settings(servers)
    hosts = HostGuard(settings.fetch_max_per_host, settings.fetch_circuit_failure_threshold,
                      settings.fetch_circuit_cooldown_seconds)
    hosts.max_per_host = 1
    pol = policy(servers, fetch_first_byte_timeout_seconds=20.0, fetch_read_timeout_seconds=20.0)
    first = asyncio.create_task(fetch(url, http, store, f"{key}-a", pol, hosts))
    await asyncio.sleep(0.2)
    await check_host(url, hosts, settings.fetch_host_wait_seconds)  # not Deferred
    stored = await fetch(url, http, store, key, pol, hosts)
    assert stored.format == "wav"
    await first
    await store.client.delete_object(Bucket=store.bucket, Key=f"{key}-a")
