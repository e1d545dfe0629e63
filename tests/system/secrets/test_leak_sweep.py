"""Leak sweep: configured secrets appear nowhere the platform writes, in any common encoding.

On the real servers with the six services as processes: a configuration whose secrets are
unique random strings (API token, one recording auth-config token per method, a webhook
secret and a previous one being rotated out, the data key) is applied; calls run through
every auth method to ``normalized``, one fails with an email to the CSM, and their webhooks
are delivered (signed: the receiver verifies them with each secret). Then every place the
platform writes is searched for each secret, raw, base64 (standard and URL-safe, with and
without padding) and URL-encoded:

* a full dump of every collection of the test's MongoDB database;
* every record (key, value, headers) of every Kafka topic with the test's prefix;
* the metadata and headers of every object in the test's own S3 bucket;
* every file in the services' log directory and the session's in-process log;
* the SMTP sink's mail of this run; ``/metrics`` of every service;
* what the outside sees: the gateway's call views and error bodies, ``callingest calls
  show`` and ``config apply`` output, the webhook requests (headers and bodies).

The ``plaintext`` run stores the same configuration with encryption switched off (a codec
that stores secrets as they are; the fetcher and the deliverer read such legacy values): the
same sweep must then find every stored secret, in MongoDB - so this sweep can fail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from bson import json_util
from pydantic import SecretStr
from standardwebhooks import Webhook

from callingest import config_apply, config_file, mongo, s3
from callingest.secretbox import generate_key_entry
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.audiogen import write_wav
from tests.conftest import (
    ROOT,
    TEST_LOGS,
    Services,
    delete_topics,
    make_settings,
    settings_env,
    used_secret,
    wait_until,
)
from tests.helpers import mails_about, serve_recordings

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SERVICES = ("gateway", "validator", "fetcher", "normalizer", "notifier", "webhooks")
OPENERS = ("fetcher", "webhooks")  # the only services given the data keys
AUTH = {7: ("bearer_header", None), 8: ("query_param", "access_token"),
        9: ("custom_header", "X-Api-Key")}
ROUTE = {7: "bearer", 8: "query", 9: "header"}  # recordings under /rec/<route>-...


class PlaintextCodec:
    """Encryption switched off: secrets stored as they are (what main did before issue 16)."""

    def seal(self, plaintext: str, context: str) -> Any:
        return plaintext

    def open(self, stored: Any, context: str) -> str:
        return str(stored)

    def is_current(self, stored: Any) -> bool:
        return True


def _webhook_secret() -> str:
    return used_secret("whsec_" + base64.b64encode(os.urandom(24)).decode())


@dataclass
class Receiver:
    """A loopback webhook receiver that keeps every request."""

    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    def events(self) -> set[tuple[str, str]]:
        return {(json.loads(body)["data"]["cuid"], json.loads(body)["type"])
                for _, body in self.requests}


def _secret(label: str) -> str:
    # Characters that URL-encoding and base64 change, so every form differs from the raw one.
    return used_secret(f"leak-{label}-{secrets.token_hex(8)}+/~{secrets.token_hex(4)}")


def forms(value: str) -> dict[str, bytes]:
    """The encodings of ``value`` a leak could take."""
    raw = value.encode()
    out = {"raw": raw,
           "base64": base64.b64encode(raw), "base64url": base64.urlsafe_b64encode(raw),
           "url-encoded": quote(value, safe="").encode(), "url-encoded-path": quote(value).encode(),
           "form-encoded": quote_plus(value).encode()}
    out["base64 unpadded"] = out["base64"].rstrip(b"=")
    out["base64url unpadded"] = out["base64url"].rstrip(b"=")
    return out


@dataclass
class Sweep:
    """Everything the platform wrote, as (source, where, bytes)."""

    found: list[tuple[str, str, bytes]] = field(default_factory=list)

    def add(self, source: str, where: str, data: bytes | str) -> None:
        self.found.append((source, where, data.encode() if isinstance(data, str) else data))

    def hits(self, needles: dict[str, str]) -> list[str]:
        out = []
        for label, value in needles.items():
            for form, needle in forms(value).items():
                for source, where, data in self.found:
                    if needle in data:
                        out.append(f"{source} {where}: {label} ({form})")
        return out

    def sources(self) -> set[str]:
        return {source for source, _, _ in self.found}


@dataclass
class Leaky:
    settings: Settings
    db: Any
    topics: Topics
    services: Services
    http: aiohttp.ClientSession
    recordings: str
    api_token: str
    sweep: Sweep
    receiver: Receiver
    hook: dict[str, Any]

    @property
    def gateway(self) -> str:
        return self.services.running["gateway"].url

    async def post(self, recording: str, auth_config: int | None,
                   expect: int = 201) -> dict[str, Any]:
        call: dict[str, Any] = {
            "external_call_unique_id": uuid.uuid4().hex, "start_time": "2016-02-03 09:30:00 AM",
            "destination_phone_number": 2165388265, "calling_phone_number": 8779257383,
            "advertiser_campaign_id_from_network": 85, "call_direction": "inbound",
            "recording_url": f"{self.recordings}/{recording}",
        }
        if auth_config is not None:
            call["recording_auth_config_id"] = auth_config
        async with self.http.post(f"{self.gateway}/api/2022-03-01/calls.json", json={"call": call},
                                  headers={"Authorization": f"Bearer {self.api_token}"}) as resp:
            body = await resp.read()
            self.sweep.add("http", f"POST calls.json -> {resp.status}", body)
            assert resp.status == expect, body
            return dict(json.loads(body))

    async def view(self, cuid: str) -> dict[str, Any]:
        async with self.http.get(f"{self.gateway}/api/2022-03-01/calls/{cuid}.json",
                                 headers={"Authorization": f"Bearer {self.api_token}"}) as resp:
            body = await resp.read()
            assert resp.status == 200, body
            return dict(json.loads(body))

    async def settled(self, cuid: str) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            call = await self.view(cuid)
            return call if call["status"] in ("normalized", "failed") else None

        call = dict(await wait_until(done, timeout=120, interval=0.3, what=f"{cuid} settled"))
        self.sweep.add("http", f"GET calls/{cuid}.json", json.dumps(call))
        return call


def _environment(pid: int) -> set[str]:
    """The names of the environment variables process ``pid`` started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {entry.split(b"=", 1)[0].decode() for entry in raw.split(b"\0") if entry}


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/callingest"), *args],
                          env={**os.environ, **settings_env(settings)}, capture_output=True,
                          text=True, timeout=120)


def _config(api_token: str, tokens: dict[int, str], hook: dict[str, Any]) -> dict[str, Any]:
    return {"networks": [{
        "id": "leak", "name": "Leak Sweep", "csm_email": "csm-leak@example.com",
        "webhooks": [hook],
        "api_tokens": [{"token": api_token}],
        "recording_auth_configs": [
            {"id": cid, "method": method, "token": tokens[cid], **({"name": name} if name else {})}
            for cid, (method, name) in AUTH.items()],
        "advertisers": [{"id": "adv", "campaigns": [{"id_from_network": "85",
                                                     "signal_ai_enabled": True}]}],
    }]}


@pytest.fixture(params=["sealed", "plaintext"])
async def leaky(request: pytest.FixtureRequest, servers: Any,
                tmp_path: Path) -> AsyncIterator[tuple[Leaky, dict[str, str], str]]:
    tag = uuid.uuid4().hex[:8]
    key_entry = generate_key_entry("leak")
    settings = make_settings(servers, s3_bucket=f"leak-sweep-{tag}",
                             secret_keys=SecretStr(key_entry), max_processing_attempts=2)
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    await mongo.ensure_indexes(db)

    api_token = _secret("api-token")
    tokens = {cid: _secret(method) for cid, (method, _) in AUTH.items()}
    receiver = Receiver()
    receiver_runner, receiver_base = await serve_recordings(receiver.handle, 0.5, prefix="",
                                                            method="POST")
    receiver_url = f"{receiver_base}/hook"
    hook: dict[str, Any] = {
        "id": "wh-leak", "url": receiver_url, "events": ["call.normalized", "call.failed"],
        "secret": _webhook_secret(), "previous_secrets": [_webhook_secret()]}
    needles: dict[str, str] = {
        "api token": api_token, "data key": used_secret(key_entry.partition(":")[2]),
               **{f"{AUTH[cid][0]} token": t for cid, t in tokens.items()},
               "webhook secret": hook["secret"], "webhook key": hook["secret"][6:],
               "previous webhook secret": hook["previous_secrets"][0],
               "previous webhook key": hook["previous_secrets"][0][6:]}
    log_dir = TEST_LOGS / f"leak-sweep-{request.param}-{tag}"
    log_dir.mkdir(parents=True)
    sweep = Sweep()
    if request.param == "sealed":
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(_config(api_token, tokens, hook)))  # JSON is YAML
        applied = _cli(settings, "config", "apply", str(path))
        assert applied.returncode == 0, applied.stderr
        (log_dir / "config-apply.out").write_text(applied.stdout + applied.stderr)
    else:
        await config_apply.apply(db, config_file.ConfigFile.model_validate(
            _config(api_token, tokens, hook)), PlaintextCodec())

    wav = tmp_path / "call.wav"
    write_wav(wav, seconds=1.0, rate=16000)

    async def recording(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        route = name.split("-")[0]
        presented = {"bearer": request.headers.get("Authorization"),
                     "query": request.query.get("access_token"),
                     "header": request.headers.get("X-Api-Key")}.get(route)
        expected = {"bearer": f"Bearer {tokens[7]}", "query": tokens[8], "header": tokens[9]}.get(route)
        if presented != expected or name.endswith("-gone.wav"):
            return web.Response(status=403 if presented == expected else 401)
        return web.Response(body=wav.read_bytes(), content_type="audio/wav")

    runner, base = await serve_recordings(recording)
    services = Services(settings, log_dir)
    http = aiohttp.ClientSession()
    try:
        # Only the fetcher and the deliverer get the data keys: the others work without them.
        for name in OPENERS:
            services.start(name)
        services.settings = settings.model_copy(update={"secret_keys": None})
        for name in SERVICES:
            if name not in OPENERS:
                proc = services.start(name).proc
                assert "SECRET_KEYS" not in _environment(proc.pid)
        yield (Leaky(settings, db, topics, services, http, base, api_token, sweep, receiver,
                     hook), needles, request.param)
    finally:
        await http.close()
        services.stop_all()
        await runner.cleanup()
        await receiver_runner.cleanup()
        await client.drop_database(settings.mongodb_database)
        await client.close()
        await delete_topics(settings, topics.all())
        async with s3.s3_client(settings) as s3c:
            listed = await s3c.list_objects_v2(Bucket=settings.s3_bucket)
            for obj in listed.get("Contents", []):
                await s3c.delete_object(Bucket=settings.s3_bucket, Key=obj["Key"])
            await s3c.delete_bucket(Bucket=settings.s3_bucket)


async def test_no_configured_secret_is_stored_logged_published_or_shown_in_plain_text(
        leaky: tuple[Leaky, dict[str, str], str], mail_dir: Path) -> None:
    stack, needles, codec = leaky
    started = time.time()
    sweep = stack.sweep

    # Every auth method, to normalized.
    cuids = {cid: (await stack.post(f"{ROUTE[cid]}-{uuid.uuid4().hex}.wav", cid))["cuid"]
             for cid in AUTH}
    for cid, cuid in cuids.items():
        call = await stack.settled(cuid)
        assert call["status"] == "normalized", (AUTH[cid], call.get("failure"))
    # A failure with an email to the CSM, on the method that puts the token in the URL.
    failed = (await stack.post(f"query-{uuid.uuid4().hex}-gone.wav", 8))["cuid"]
    call = await stack.settled(failed)
    assert call["status"] == "failed" and call["failure"]["stage"] == "fetcher"
    await wait_until(lambda: mails_about(mail_dir, failed), what="the CSM's email")
    # An error body: an auth config the network does not have.
    await stack.post("bearer-x.wav", 99, expect=403)
    # Their webhooks, signed with the secret and the previous one (both opened by the deliverer).
    expected = {*((c, "call.normalized") for c in cuids.values()), (failed, "call.failed")}
    await wait_until(lambda: expected <= stack.receiver.events(), timeout=90,
                     what="the webhooks delivered")
    for headers, body in stack.receiver.requests:
        for secret in (stack.hook["secret"], *stack.hook["previous_secrets"]):
            Webhook(secret).verify(body, headers)
        sweep.add("webhook", headers["webhook-id"], json.dumps(headers).encode() + body)

    for cuid in [*cuids.values(), failed]:
        shown = _cli(stack.services.settings, "calls", "show", cuid)  # without the keys
        assert shown.returncode == 0, shown.stderr
        sweep.add("cli", f"calls show {cuid}", shown.stdout + shown.stderr)
    for name, svc in stack.services.running.items():
        async with stack.http.get(f"{svc.url}/metrics") as resp:
            sweep.add("metrics", name, await resp.read())
    await asyncio.sleep(1.0)  # let the last log lines and events land
    await _sweep_stores(stack, sweep, mail_dir, started)
    assert {"mongodb", "kafka", "s3", "log", "mail", "metrics", "http", "cli",
            "webhook"} <= sweep.sources()

    hits = sweep.hits(needles)
    if codec == "sealed":
        assert hits == []
        network = await stack.db.networks.find_one({"_id": "leak"})
        (hook,) = network["webhooks"]
        assert {c["token"]["kid"] for c in network["recording_auth_configs"]} \
            | {hook["secret"]["kid"]} | {s["kid"] for s in hook["previous_secrets"]} == {"leak"}
    else:  # encryption off: the sweep finds every stored secret, and only in the store
        stored = {label for label in needles if label not in ("api token", "data key")}
        assert {h for h in hits if h.endswith("(raw)")} == {
            f"mongodb networks: {label} (raw)" for label in stored}
        assert all(h.startswith("mongodb networks") for h in hits), hits


async def _sweep_stores(stack: Leaky, sweep: Sweep, mail_dir: Path, since: float) -> None:
    db, settings = stack.db, stack.settings
    for name in await db.list_collection_names():
        sweep.add("mongodb", name, json_util.dumps(await db[name].find().to_list(None)))

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
        partitions = [TopicPartition(d["topic"], p["partition"])
                      for d in await admin.describe_topics(names) for p in d["partitions"]]
    finally:
        await admin.close()
    assert names and len(partitions) >= len(names)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if end[tp] > 0}
        records = 0
        while pending:
            for tp, batch in (await consumer.getmany(*pending, timeout_ms=1000)).items():
                for r in batch:
                    records += 1
                    blob = (r.key or b"") + b"\n" + (r.value or b"") + b"\n" + b"\n".join(
                        k.encode() + b"=" + (v or b"") for k, v in r.headers or ())
                    sweep.add("kafka", f"{tp.topic}[{tp.partition}]@{r.offset}", blob)
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        assert records > 0
    finally:
        await consumer.stop()

    async with s3.s3_client(settings) as s3c:
        listed = await s3c.list_objects_v2(Bucket=settings.s3_bucket)
        assert listed.get("Contents")
        for obj in listed["Contents"]:
            head = await s3c.head_object(Bucket=settings.s3_bucket, Key=obj["Key"])
            sweep.add("s3", obj["Key"], json.dumps(
                {"key": obj["Key"], "metadata": head.get("Metadata"),
                 "headers": head["ResponseMetadata"].get("HTTPHeaders")}, default=str))

    _sweep_files(sweep, stack.services.log_dir, mail_dir, since)


def _sweep_files(sweep: Sweep, log_dir: Path, mail_dir: Path, since: float) -> None:
    for path in [*log_dir.rglob("*"), TEST_LOGS / "pytest.log"]:
        if path.is_file():
            sweep.add("log", str(path), path.read_bytes())
    for path in mail_dir.glob("*"):
        if path.is_file() and path.stat().st_mtime >= since - 1:
            sweep.add("mail", path.name, path.read_bytes())
