"""Per-host protection for recording downloads: a concurrency cap and a circuit breaker.

A recording host is ``(scheme, host, port)`` of the first URL. For each host the fetcher
process keeps, in memory:

* how many downloads from it run now; past ``max_per_host`` a download is not started
  (:class:`HostBusy`: the consumer loop defers the call untried, without using up an
  attempt), so one slow host cannot take every slot of the fetcher;
* a circuit breaker. **Closed**: downloads go ahead; ``failure_threshold`` consecutive
  connection failures or timeouts open it. **Open** for ``cooldown`` seconds: downloads
  are refused without connecting (:class:`CircuitOpen`: the call is refused untried, no
  attempt used, until its retry deadline; see :class:`callingest.errors.Refused`), with
  the class and message of the host's last real failure ("timed out fetching
  http://host (host not contacted again: circuit open)"): what the call reports if it
  gives up, so the CSM email names the cause, not the breaker.
  **Half-open** after the cool-down: one download is let through as a probe while the
  others are still refused; its answer closes the circuit at once (the calls due while
  its body streams go ahead), its failure opens it for another cool-down. A call never
  tried whose retry deadline has passed is let through whatever the circuit
  (``last_chance``): no call fails without its own URL tried.

Any HTTP answer (even a 404 or a 503) proves the host alive and counts as a success: the
breaker is about dead hosts, the retry policy about bad answers. State is per process (each
fetcher replica learns on its own, within ``failure_threshold`` calls); hosts that are
closed, with no failure counted and nothing in flight, are forgotten, so memory follows the
hosts in use. The states are exported as counts per state
(``callingest_fetch_circuits{state}``), never labelled by host.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from callingest import metrics
from callingest.errors import Deferred, Refused
from callingest.logging import get_logger
from services.fetcher.urls import origin, parse_url, redact_origin

log = get_logger(__name__)

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
STATES: Final = (CLOSED, OPEN, HALF_OPEN)

HostKey = tuple[str, str, int | None]
#: Past this many hosts tracked at once, idle hosts not seen for ten cool-downs are forgotten.
MAX_TRACKED_HOSTS: Final = 10_000


class HostRefused(Exception):
    """A download was not started; ``str(exc)`` names the host only (safe to log)."""


class CircuitOpen(HostRefused):
    """The host's circuit is open (or half-open with its probe under way); ``str(exc)`` and
    ``failure_class`` are the host's last real failure, which opened it."""

    def __init__(self, message: str, failure_class: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.failure_class = failure_class
        #: The rest of the cool-down (None: a probe is under way, its end is unknown).
        self.retry_after = retry_after


class HostBusy(HostRefused):
    """The host already has ``max_per_host`` downloads running."""


@dataclass
class _Host:
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    in_flight: int = 0
    probe: Outcome | None = None
    #: The last real failure (class, message naming the host only): what refusals report.
    cause: tuple[str, str] = ("RecordingHostUnavailable", "host unavailable")
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class Outcome:
    """Handed to the caller of :meth:`HostGuard.admit`: say what the download showed. The
    circuit takes it at once (a probe's response headers close it, not the end of its body)."""

    def __init__(self, guard: HostGuard | None = None, host: _Host | None = None,
                 shown: str = "") -> None:
        self._guard, self._host, self._shown = guard, host, shown

    def alive(self) -> None:
        """The host answered (any HTTP status)."""
        if self._guard is not None and self._host is not None:
            self._guard._alive(self._host, self._shown)

    def dead(self, failure_class: str, message: str) -> None:
        """Connection refused or reset, DNS failure, or a timeout: ``failure_class`` and
        ``message`` (naming the host, not the URL: the calls refused for it are others')
        are what the calls refused by the circuit it may open report."""
        if self._guard is not None and self._host is not None:
            self._host.cause = (failure_class, message)
            self._guard._dead(self._host, self._shown, self)


class HostGuard:
    """Concurrency caps and circuit breakers of the recording hosts of one process."""

    def __init__(self, max_per_host: int, failure_threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_per_host = max_per_host
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.clock = clock
        self._hosts: dict[HostKey, _Host] = {}
        self._counts = {state: 0 for state in STATES}
        self._export()

    def state(self, key: HostKey) -> str:
        """The host's circuit state now (an open circuit past its cool-down reads half-open)."""
        host = self._hosts.get(key)
        if host is None:
            return CLOSED
        if host.state == OPEN and self.clock() - host.opened_at >= self.cooldown:
            return HALF_OPEN
        return host.state

    def counts(self) -> dict[str, int]:
        """Hosts per state (what the gauge exports)."""
        return dict(self._counts)

    async def wait_for_room(self, key: HostKey, timeout: float) -> None:
        """Wait (first come, first served) up to ``timeout`` seconds while the host is at
        its cap, so a busy but healthy host serves its backlog in order instead of
        deferring it; returns early when the host has room or its circuit opens (every
        waiter is released then, to be refused at once). Bounded: past it :meth:`admit`
        defers the call."""
        host = self._hosts.get(key)
        if (host is None or host.state != CLOSED or timeout <= 0
                or (host.in_flight < self.max_per_host and not host.waiters)):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        host.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                host.waiters.remove(waiter)

    def check(self, key: HostKey, shown: str, last_chance: bool = False) -> None:
        """Raise what :meth:`admit` would raise now, without starting anything: lets the
        caller skip its own preparation (object-store and database reads) for a host that
        would be refused anyway."""
        host = self._hosts.get(key)
        if host is None:
            return
        self._refuse(host, self.state(key), shown, last_chance)

    def _refuse(self, host: _Host, state: str, shown: str, last_chance: bool) -> None:
        """Raise :class:`CircuitOpen` (unless ``last_chance``) or :class:`HostBusy` if a
        download from ``host``, its circuit in ``state``, may not start now."""
        if not last_chance:
            self._refuse_if_open(host, state)
        if (host.state == CLOSED or last_chance) and host.in_flight >= self.max_per_host:
            metrics.FETCH_REJECTIONS.labels("host_busy").inc()
            raise HostBusy(f"{shown} already has {host.in_flight} downloads running")

    def _refuse_if_open(self, host: _Host, state: str) -> None:
        """Refused with the cause of the open circuit: the host's last real failure."""
        failure_class, cause = host.cause
        if state == OPEN:
            metrics.FETCH_REJECTIONS.labels("circuit_open").inc()
            rest = self.cooldown - (self.clock() - host.opened_at)
            raise CircuitOpen(f"{cause} (host not contacted again: circuit open)",
                              failure_class, max(rest, 0.0))
        if state == HALF_OPEN and host.probe is not None:
            metrics.FETCH_REJECTIONS.labels("circuit_open").inc()
            raise CircuitOpen(f"{cause} (host not contacted again: circuit half-open, "
                              "probe under way)", failure_class)

    @contextmanager
    def admit(self, key: HostKey, shown: str, last_chance: bool = False) -> Iterator[Outcome]:
        """Run one download from ``key``, or raise :class:`HostRefused` without starting it.

        The caller marks the :class:`Outcome` alive or dead; left unmarked (the download
        ended some other way, say a refused redirect) it changes no circuit. ``last_chance``
        (a call whose retry deadline passed before it was ever tried): whatever the
        circuit, the download goes ahead if the host is under its cap.
        """
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= MAX_TRACKED_HOSTS:
                self._forget_stale()
            host = self._hosts[key] = _Host()
            self._move(None, CLOSED)
        state = self.state(key)
        self._refuse(host, state, shown, last_chance)
        outcome = Outcome(self, host, shown)
        if state == HALF_OPEN and host.probe is None:
            if host.state == OPEN:
                self._set(host, HALF_OPEN, shown)
            host.probe = outcome
        host.in_flight += 1
        try:
            yield outcome
        finally:
            host.in_flight -= 1
            while host.waiters:  # hand the freed place to the longest waiting call
                waiter = host.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
            if host.probe is outcome:  # ended undecided: probe again next
                host.probe = None
                host.opened_at = self.clock() - self.cooldown
                self._set(host, OPEN, shown)
            if host.state == CLOSED and host.failures == 0 and host.in_flight == 0:
                del self._hosts[key]
                self._move(CLOSED, None)

    def _alive(self, host: _Host, shown: str) -> None:
        host.failures = 0
        host.probe = None
        if host.state != CLOSED:
            self._set(host, CLOSED, shown)

    def _dead(self, host: _Host, shown: str, outcome: Outcome) -> None:
        host.failures += 1
        was_probe = host.probe is outcome
        if was_probe:
            host.probe = None
        if was_probe or host.state == HALF_OPEN or (
                host.state == CLOSED and host.failures >= self.failure_threshold):
            host.opened_at = self.clock()
            self._set(host, OPEN, shown)
            # the calls waiting for a place are refused now, not after their wait
            while host.waiters:
                waiter = host.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    def _forget_stale(self) -> None:
        """Forget idle hosts whose circuit has not been used for ten cool-downs."""
        cutoff = self.clock() - 10 * self.cooldown
        for key, host in list(self._hosts.items()):
            if host.in_flight == 0 and host.opened_at < cutoff:
                del self._hosts[key]
                self._move(host.state, None)

    def _set(self, host: _Host, state: str, shown: str) -> None:
        self._move(host.state, state)
        host.state = state
        metrics.FETCH_CIRCUIT_TRANSITIONS.labels(state).inc()
        level = log.warning if state == OPEN else log.info
        level(f"recording host circuit {'opened' if state == OPEN else state.replace('_', '-')}",
              extra={"host": shown, "circuit": state, "consecutive_failures": host.failures})

    def _move(self, old: str | None, new: str | None) -> None:
        if old is not None:
            self._counts[old] -= 1
        if new is not None:
            self._counts[new] += 1
        self._export()

    def _export(self) -> None:
        for state, count in self._counts.items():
            metrics.FETCH_CIRCUITS.labels(state).set(count)


@contextlib.contextmanager
def refusals_as_step_errors() -> Iterator[None]:
    """Host refusals as the consumer loop knows them: an open circuit refuses the call
    untried until its retry deadline (then it fails), a busy host defers it untried."""
    try:
        yield
    except CircuitOpen as exc:
        raise Refused(str(exc), exc.failure_class, exc.retry_after) from None
    except HostBusy as exc:
        raise Deferred(str(exc), "RecordingHostBusy") from None


async def check_host(recording_url: str, hosts: HostGuard | None, wait: float = 0.0,
                     last_chance: bool = False) -> None:
    """Raise at once (as :func:`fetch_recording` would) if the recording's host is refused
    now, before any other work is spent on the call; a host at its cap is first waited for
    up to ``wait`` seconds. Does nothing for ``s3://`` URLs."""
    if hosts is None or recording_url[:5].lower() == "s3://":
        return
    first = parse_url(recording_url)
    await hosts.wait_for_room(origin(first), wait)
    with refusals_as_step_errors():
        hosts.check(origin(first), redact_origin(first), last_chance)
