"""The deliverer's HTTP side: pending deliveries POSTed, each receiver in its own lane.

A delivery is due when its ``next_attempt_at`` has passed. The dispatcher claims a due
delivery by moving ``next_attempt_at`` past the attempt's timeout (a lease: if this process
dies mid-attempt, the delivery becomes due again), POSTs it, and records the attempt:
delivered on a 2xx within ``WEBHOOK_TIMEOUT_SECONDS`` (10 s), otherwise scheduled again
(:func:`callingest.webhooks.retry_delay`: first retry within 60 s, then doubling with
jitter) until ``WEBHOOK_RETRY_FOR_SECONDS`` after the event, then given up.

Isolation: each endpoint (network + webhook id) has at most
``WEBHOOK_CONCURRENCY_PER_ENDPOINT`` attempts in flight, each network (all its endpoints
together) at most ``WEBHOOK_MAX_IN_FLIGHT_PER_NETWORK`` of the process's
``WEBHOOK_MAX_IN_FLIGHT``, and the query for due deliveries skips endpoints and networks at
their cap, so a receiver that hangs or is down holds only its own lane for at most the
timeout, and a network with many such receivers only its own share; other networks go on.
No Kafka consumer waits on a receiver (the intake only writes deliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import metrics, tracing
from callingest.logging import get_logger, register_secret
from callingest.secretbox import WEBHOOKS, SecretInvalid, SecretUnavailable, load_keyring, open_item
from callingest.settings import Settings
from callingest.ssrf import AddressPolicy, AddressRefused, guarded_session
from callingest.webhooks import EVENT_TYPES, check_webhook_url, next_retry_in, signature_header

log = get_logger(__name__)

LEASE_MARGIN_SECONDS = 30.0
DELIVERY_OUTCOMES = ("delivered", "abandoned", "cancelled")
"""How a delivery ends (``callingest_webhook_deliveries_total{outcome}``)."""
USER_AGENT = "callingest-webhooks/1"
# How long the dispatcher remembers that an endpoint or network left its cap (the largest
# bucket of callingest_webhook_dispatch_delay_seconds below +Inf).
FREED_KEPT_SECONDS = 900.0


class Dispatcher:
    """Sends due deliveries; :meth:`run` until :meth:`stop`."""

    def __init__(self, settings: Settings, db: AsyncDatabase[dict[str, Any]],
                 wake: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.db = db
        self.wake = wake or asyncio.Event()
        self.policy = AddressPolicy(allow_loopback=settings.allow_loopback_webhooks)
        self.keyring = load_keyring(settings)
        self.in_flight: dict[str, int] = defaultdict(int)  # per endpoint
        self.in_flight_by_network: dict[str, int] = defaultdict(int)
        # When an endpoint or network last left its cap: what waited before waited for itself.
        self._freed_at: dict[tuple[str, str], datetime] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._last_gauges = 0.0
        for event in EVENT_TYPES:
            for outcome in DELIVERY_OUTCOMES:
                # Exported at 0 from the start: the alert's increase() sees the first one.
                metrics.WEBHOOK_DELIVERIES.labels(event, outcome)

    def stop(self) -> None:
        self._stopping.set()
        self.wake.set()

    async def run(self) -> None:
        self._session = guarded_session(self.policy, limit=self.settings.webhook_max_in_flight)
        try:
            while not self._stopping.is_set():
                try:
                    await self.dispatch_due()
                    await self._update_gauges()
                except PyMongoError as exc:
                    log.warning("MongoDB unavailable; dispatch paused",
                                extra={"error": type(exc).__name__})
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(),
                                           self.settings.webhook_poll_interval_seconds)
        finally:
            if self._tasks:
                # Attempts still running finish within their timeout; past the grace period
                # they are cancelled and their lease makes them due again (at-least-once).
                _done, pending = await asyncio.wait(set(self._tasks),
                                                    timeout=self.settings.shutdown_grace_seconds)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=2.0)
            await self._session.close()

    async def dispatch_due(self) -> int:
        """Claim and start the due deliveries there is room for; returns how many started.

        A round that fills an endpoint's or a network's cap looks again without them, so the
        deliveries of other networks queued behind theirs start now, not at the next poll.
        """
        started = 0
        while (free := self.settings.webhook_max_in_flight - len(self._tasks)) > 0:
            started_now, capped = await self._dispatch_round(free)
            started += started_now
            if not capped:
                break
        return started

    async def _dispatch_round(self, free: int) -> tuple[int, bool]:
        """(started, whether a due delivery was skipped for a cap reached in this round)."""
        endpoint_cap = self.settings.webhook_concurrency_per_endpoint
        network_cap = self.settings.webhook_max_in_flight_per_network
        now = datetime.now(UTC)
        query: dict[str, Any] = {"status": "pending", "next_attempt_at": {"$lte": now}}
        if busy := [endpoint for endpoint, n in self.in_flight.items() if n >= endpoint_cap]:
            query["endpoint"] = {"$nin": busy}
        if busy := [net for net, n in self.in_flight_by_network.items() if n >= network_cap]:
            query["network_id"] = {"$nin": busy}
        started, capped = 0, False
        cursor = self.db.webhook_deliveries.find(
            query, {"body": 0, "attempts": 0}).sort("next_attempt_at", 1).limit(free)
        lease = now + timedelta(seconds=self.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS)
        async for doc in cursor:
            endpoint, network = doc["endpoint"], doc["network_id"]
            if (self.in_flight[endpoint] >= endpoint_cap
                    or self.in_flight_by_network[network] >= network_cap):
                capped = True
                continue
            claimed = await self.db.webhook_deliveries.find_one_and_update(
                {"_id": doc["_id"], "status": "pending", "next_attempt_at": doc["next_attempt_at"]},
                {"$set": {"next_attempt_at": lease}},
                return_document=ReturnDocument.AFTER,
            )
            if claimed is None:
                continue  # another replica took it
            metrics.WEBHOOK_DISPATCH_DELAY.observe(self._dispatch_delay(doc, now))
            self.in_flight[endpoint] += 1
            self.in_flight_by_network[network] += 1
            task = asyncio.create_task(self._attempt(claimed))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, endpoint=endpoint,
                                                     network=network))
            started += 1
        return started, capped

    def _dispatch_delay(self, doc: dict[str, Any], now: datetime) -> float:
        """Seconds a due delivery waited for the dispatcher, not counting the time its own
        endpoint or network was at its cap (one client's hanging endpoint is not lag)."""
        freed = (self._freed_at.get(("endpoint", doc["endpoint"])),
                 self._freed_at.get(("network", doc["network_id"])))
        waited_from = max([doc["next_attempt_at"], *(at for at in freed if at is not None)])
        return max(0.0, (now - waited_from).total_seconds())

    def _finished(self, task: asyncio.Task[None], *, endpoint: str, network: str) -> None:
        self._tasks.discard(task)
        caps = {"endpoint": self.settings.webhook_concurrency_per_endpoint,
                "network": self.settings.webhook_max_in_flight_per_network}
        for kind, counts, key in (("endpoint", self.in_flight, endpoint),
                                  ("network", self.in_flight_by_network, network)):
            if counts[key] >= caps[kind]:
                self._freed_at[(kind, key)] = _now()
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]
        self.wake.set()

    async def _attempt(self, delivery: dict[str, Any]) -> None:
        """One attempt inside the call's trace (stored with the delivery by the intake), so
        every log line about it carries the call's ``trace_id``."""
        with tracing.attached(delivery.get("trace_context")):
            try:
                await self._deliver(delivery)
            except Exception as exc:
                log.error("webhook attempt crashed; it will be retried after its lease",
                          extra={**_about(delivery), "error": type(exc).__name__})

    async def _deliver(self, delivery: dict[str, Any]) -> None:
        network = await self.db.networks.find_one({"_id": delivery["network_id"]}, {"webhooks": 1})
        endpoint = next((w for w in (network or {}).get("webhooks") or []
                         if w["id"] == delivery["webhook_id"]), None)
        if endpoint is None or delivery["type"] not in endpoint["events"]:
            await self.db.webhook_deliveries.update_one(
                {"_id": delivery["_id"]}, {"$set": {"status": "cancelled", "ended_at": _now()}})
            metrics.WEBHOOK_DELIVERIES.labels(delivery["type"], "cancelled").inc()
            log.info("webhook no longer configured; delivery cancelled",
                     extra=_about(delivery))
            return
        started = time.monotonic()
        status_code, outcome, error = await self._post(delivery, endpoint)
        await self._record(delivery, status_code, outcome, error, time.monotonic() - started)

    async def _post(self, delivery: dict[str, Any],
                    endpoint: dict[str, Any]) -> tuple[int | None, str, str | None]:
        """(answer code, outcome, error) of one POST; the error names no URL and no secret."""
        assert self._session is not None
        try:
            url = check_webhook_url(endpoint["url"], self.settings.allow_loopback_webhooks)
        except ValueError as exc:
            return None, "refused", str(exc)
        try:  # opened for this attempt only
            opened = open_item(self.keyring, WEBHOOKS, delivery["network_id"], endpoint)
        except (SecretUnavailable, SecretInvalid) as exc:
            return None, "secret_unavailable", str(exc)
        secrets = [opened["secret"], *opened.get("previous_secrets", [])]
        for secret in secrets:
            register_secret(secret)  # masked should any log line ever carry it
        body = delivery["body"].encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": delivery["event_id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(secrets, delivery["event_id"], timestamp, body),
        }
        tracing.inject_http(headers, delivery.get("trace_context"))
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds)
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                          timeout=timeout) as response:
                code = response.status
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await response.content.read(4096)  # drained a little; never stored or logged
        except AddressRefused as exc:
            return None, "refused", f"address refused: {exc}"
        except TimeoutError:
            return None, "timeout", f"no answer within {self.settings.webhook_timeout_seconds:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, "connection_error", type(exc).__name__
        if 200 <= code < 300:
            return code, "delivered", None
        return code, "http_error", f"answered {code}"

    async def _record(self, delivery: dict[str, Any], status_code: int | None, outcome: str,
                      error: str | None, duration: float) -> None:
        now = _now()
        attempt = int(delivery.get("attempts_made", 0)) + 1
        entry = {"attempt": attempt, "at": now, "status_code": status_code, "outcome": outcome,
                 "error": error, "duration_seconds": round(duration, 3)}
        update: dict[str, Any] = {"$push": {"attempts": entry}, "$inc": {"attempts_made": 1}}
        extra = {**_about(delivery), "attempt": attempt, "outcome": outcome,
                 "status_code": status_code}
        metrics.WEBHOOK_ATTEMPTS.labels(delivery["type"], outcome).inc()
        if outcome == "delivered":
            update["$set"] = {"status": "delivered", "ended_at": now}
            metrics.WEBHOOK_DELIVERIES.labels(delivery["type"], "delivered").inc()
            metrics.WEBHOOK_DELIVERY_LAG.observe(
                max(0.0, (now - delivery["occurred_at"]).total_seconds()))
            log.info("webhook delivered", extra=extra)
        elif (delay := next_retry_in(attempt, (now - delivery["created_at"]).total_seconds(),
                                     self.settings)) is None:
            update["$set"] = {"status": "failed", "ended_at": now}
            metrics.WEBHOOK_DELIVERIES.labels(delivery["type"], "abandoned").inc()
            log.error("webhook delivery given up after the retry period", extra={**extra,
                      "error": error})
        else:
            update["$set"] = {"next_attempt_at": now + timedelta(seconds=delay)}
            log.warning("webhook attempt failed; retry scheduled",
                        extra={**extra, "error": error, "retry_in_seconds": round(delay, 1)})
        await self.db.webhook_deliveries.update_one({"_id": delivery["_id"]}, update)

    async def _update_gauges(self) -> None:
        """Pending deliveries and the age of the oldest one, at most every 5 s."""
        if time.monotonic() - self._last_gauges < 5.0:
            return
        self._last_gauges = time.monotonic()
        forgotten = _now() - timedelta(seconds=FREED_KEPT_SECONDS)
        self._freed_at = {key: at for key, at in self._freed_at.items() if at > forgotten}
        pending = await self.db.webhook_deliveries.count_documents({"status": "pending"})
        metrics.WEBHOOK_PENDING.set(pending)
        oldest = await self.db.webhook_deliveries.find_one(
            {"status": "pending"}, {"created_at": 1}, sort=[("created_at", 1)])
        age = (_now() - oldest["created_at"]).total_seconds() if oldest else 0.0
        metrics.WEBHOOK_OLDEST_PENDING.set(max(0.0, age))


def _about(delivery: dict[str, Any]) -> dict[str, Any]:
    """What a log line about ``delivery`` names (its ``trace_id`` comes from :meth:`Dispatcher._attempt`)."""
    return {"cuid": delivery["cuid"], "event_id": delivery["event_id"],
            "webhook_id": delivery["webhook_id"]}


def _now() -> datetime:
    return datetime.now(UTC)
