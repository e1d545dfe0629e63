"""The examples of call-ingestion-api-2022-03-01.txt as requests, run against a gateway process
of any checkout, with the answers normalized into a golden record.

Used by ``test_spec_examples.py`` (this checkout) and, to record the golden file from the code
before issue 13, as a script:

    git worktree add --detach /tmp/before 35be789
    .venv/bin/python -m tests.services.gateway.spec_examples /tmp/before \\
        tests/services/gateway/spec_examples.golden.json

The gateway runs as ``callingest serve gateway`` with the checkout first on PYTHONPATH (this
venv: the dependencies of the before commit are a subset at the same pins), on the session's
Kafka and MongoDB-protocol store, in its own database and topic prefix, after that checkout's
``callingest admin init`` and ``callingest config apply`` of :data:`CONFIG_YAML`.

Normalization (the only values that legitimately vary between runs):

* cuids: every cuid value (JSON ``"cuid"`` and the URL path in ``Location``) becomes
  ``<cuid-N>``, N numbered by first appearance in the run, so a 202 that must repeat the 201's
  cuid still has to repeat it;
* processing times in a call view (``"at"``, ``"next_attempt_at"``, ``"csm_notified_at"``)
  become ``<time>``; ``start_time`` is kept (it is computed from the request).
* headers: only those that carry meaning are compared (:data:`HEADERS`); ``Date`` and
  ``Server`` are not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import demo_call
from tools import devstack

API = "/api/2022-03-01"
TOKEN = "spec-example-network-token"
ADVERTISER_TOKEN = "spec-example-advertiser-token"
DISABLED_TOKEN = "spec-example-disabled-token"
TOKENS = (TOKEN, ADVERTISER_TOKEN, DISABLED_TOKEN)
#: ``<CALL RECORDING URL>`` of the spec: loopback, never fetched (no fetcher runs).
RECORDING_URL = "http://127.0.0.1:9/recordings/call.wav"
HEADERS = ("Content-Type", "Location", "Retry-After", "WWW-Authenticate", "Allow")

CONFIG_YAML = f"""
networks:
  - id: "1001"
    name: Spec Example Network
    timezone: America/Los_Angeles
    default_language_code: en-US
    multi_language_enabled: false
    call_ingestion_enabled: true
    csm_email: csm@example.com
    api_tokens:
      - token: {TOKEN}
      - token: {ADVERTISER_TOKEN}
        advertisers: ["adv-1"]
    signals: [Sale, Quote, Free Trial]
    custom_data_fields: [channel, line_of_business]
    recording_auth_configs:
      - id: 7
        method: bearer_header
        token: s3cr3t
    advertisers:
      - id: adv-1
        campaigns:
          - id_from_network: "85"
            type: ExternalOnly
            signal_ai_enabled: true
          - id_from_network: "86"
            type: ExternalOnly
            voice_signals: 2
      - id: adv-2
        campaigns:
          - id_from_network: "90"
            type: ExternalOnly
            signal_ai_enabled: true
          - id_from_network: "91"
            type: Standard
            signal_ai_enabled: true
          - id_from_network: "92"
            type: ExternalOnly
            signal_ai_enabled: false
            voice_signals: 0
  - id: "2002"
    name: Spec Example Network Without Call Ingestion
    timezone: Europe/London
    call_ingestion_enabled: false
    api_tokens:
      - token: {DISABLED_TOKEN}
"""


def call(external_id: str, **overrides: Any) -> dict[str, Any]:
    """The spec's first example (all required fields), with another external id: the tests'
    demo call (same fields, same order) with this module's recording URL."""
    return demo_call(external_id, overrides.pop("recording_url", RECORDING_URL), **overrides)


def _curl_call(external_id: str) -> dict[str, Any]:
    return call(external_id, start_time="2022-03-25 09:31:29", destination_phone_number=9093900003,
                calling_phone_number=8779257384, advertiser_campaign_id_from_network=86)


ALL_FIELDS = {
    "call": call("123ABC", start_time="2016-08-08 11:03:31 -0700", destination_phone_number=9093900003),
    "signals": [{"name": "sale", "value": 1}, {"name": "quote", "value": 1}],
    "custom_data": [{"name": "channel", "value": "Paid Search"},
                    {"name": "line_of_business", "value": "Social"}],
    "oauth_token": TOKEN,
}

#: The spec's "Timestamp Formats", every example (11 April 2016, 1 PM Pacific).
TIMESTAMPS = {
    "epoch-10": 1460404800, "epoch-13": 1460404800000, "compressed": "20160411130000000",
    "iso-plus3": "2016/04/11T23:00:00.000+03:00", "iso-minus7": "2016/04/11T13:00:00.000-07:00",
    "iso-utc": "2016/04/11T20:00:00.000Z", "iso-no-ms": "2016/04/11T13:00:00-07:00",
    "excel": "2016/04/11 13:00:00.000 PM", "excel-no-ms": "2016/04/11 13:00:00 PM",
}


def _examples() -> Iterator[tuple[str, str, str, dict[str, str], bytes | None]]:
    """(name, method, path, headers, body) in order; the order matters (202 and 409 follow
    their 201)."""
    js = {"Content-Type": "application/json"}

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    calls = f"{API}/calls.json"
    # Examples: all required fields, then all fields (signals, custom data); POST and PUT.
    yield "required-fields", "POST", calls, js, body({"call": call("100002"), "oauth_token": TOKEN})
    yield "all-fields", "POST", calls, js, body(ALL_FIELDS)
    yield "put-required-fields", "PUT", calls, js, body({"call": call("100003"), "oauth_token": TOKEN})
    # 202: already received; 409: the external id used with other content.
    yield "resubmitted-202", "POST", calls, js, body({"call": call("100002"), "oauth_token": TOKEN})
    yield "resubmitted-put-202", "PUT", calls, js, body(ALL_FIELDS)
    yield "conflict-409", "POST", calls, js, body(
        {"call": call("100002", calling_phone_number=8779257384), "oauth_token": TOKEN})
    # Timestamp formats, and the stored start_time of each.
    for name, value in TIMESTAMPS.items():
        yield f"timestamp-{name}", "POST", calls, js, body(
            {"call": call(f"ts-{name}", start_time=value), "oauth_token": TOKEN})
    # The cURL examples: token in the query string, token in the body.
    yield "curl-query-token", "POST", f"{calls}?oauth_token={TOKEN}", js, body({"call": _curl_call("10002")})
    yield "curl-body-token", "POST", calls, js, body({"call": _curl_call("10001"), "oauth_token": TOKEN})
    # The token in a header, both forms of interfaces.md.
    yield "bearer-header", "POST", calls, {**js, "Authorization": f"Bearer {TOKEN}"}, body(
        {"call": call("hdr-bearer")})
    yield "token-header", "POST", calls, {**js, "Authorization": f"Token token={TOKEN}"}, body(
        {"call": call("hdr-token")})
    # Errors of the spec.
    yield "error-call-required", "POST", calls, js, body({"oauth_token": TOKEN})
    yield "error-fields-missing", "POST", calls, js, body(
        {"call": {"external_call_unique_id": "missing-1"}, "oauth_token": TOKEN})
    yield "error-unauthorized-operation", "POST", calls, js, body(
        {"call": call("disabled-1"), "oauth_token": DISABLED_TOKEN})
    yield "error-unauthorized-advertiser", "POST", calls, js, body(
        {"call": call("adv-1", advertiser_campaign_id_from_network=90), "oauth_token": ADVERTISER_TOKEN})
    yield "error-campaign-external-only", "POST", calls, js, body(
        {"call": call("camp-91", advertiser_campaign_id_from_network=91), "oauth_token": TOKEN})
    yield "error-campaign-transcription", "POST", calls, js, body(
        {"call": call("camp-92", advertiser_campaign_id_from_network=92), "oauth_token": TOKEN})
    yield "error-unknown-campaign", "POST", calls, js, body(
        {"call": call("camp-404", advertiser_campaign_id_from_network=404), "oauth_token": TOKEN})
    yield "error-api-version-400", "POST", "/api/2020-01-01/calls.json", js, body(
        {"call": call("v-1"), "oauth_token": TOKEN})
    yield "error-no-token-401", "POST", calls, js, body({"call": call("401-a")})
    yield "error-bad-token-401", "POST", calls, js, body({"call": call("401-b"), "oauth_token": "no-such"})
    yield "error-bad-direction", "POST", calls, js, body(
        {"call": call("dir-1", call_direction="sideways"), "oauth_token": TOKEN})
    yield "error-bad-phone", "POST", calls, js, body(
        {"call": call("phone-1", calling_phone_number="12"), "oauth_token": TOKEN})
    yield "error-bad-start-time", "POST", calls, js, body(
        {"call": call("time-1", start_time="yesterday"), "oauth_token": TOKEN})
    yield "error-not-json", "POST", calls, js, b'{"call": '
    # The configuration rules (language, signals, custom data, auth config): issue 13 made the
    # gateway's texts the validator's.
    yield "rule-language-not-enabled", "POST", calls, js, body(
        {"call": call("lang-1", language_code="fr-FR"), "oauth_token": TOKEN})
    yield "rule-language-unknown", "POST", calls, js, body(
        {"call": call("lang-2", language_code="xx-XX"), "oauth_token": TOKEN})
    yield "rule-signal-unknown", "POST", calls, js, body(
        {"call": call("sig-1"), "signals": [{"name": "Refund"}, {"name": "Upsell"}], "oauth_token": TOKEN})
    yield "rule-signal-bad-value", "POST", calls, js, body(
        {"call": call("sig-2"), "signals": [{"name": "Sale", "value": "maybe"}], "oauth_token": TOKEN})
    yield "rule-custom-data-unknown", "POST", calls, js, body(
        {"call": call("cd-1"), "custom_data": [{"name": "region", "value": "W"}], "oauth_token": TOKEN})
    yield "rule-auth-config-unknown", "POST", calls, js, body(
        {"call": call("auth-1", recording_auth_config_id=99), "oauth_token": TOKEN})
    yield "rule-several", "POST", calls, js, body(
        {"call": call("many-1", language_code="xx-XX", recording_auth_config_id=99),
         "signals": [{"name": "Refund"}], "custom_data": [{"name": "region", "value": "W"}],
         "oauth_token": TOKEN})


class _Normalizer:
    def __init__(self) -> None:
        self.cuids: dict[str, str] = {}

    def cuid(self, value: str) -> str:
        return self.cuids.setdefault(value, f"<cuid-{len(self.cuids) + 1}>")

    def text(self, text: str) -> str:
        text = re.sub(r'("cuid": ?")([^"]+)(")', lambda m: m[1] + self.cuid(m[2]) + m[3], text)
        text = re.sub(r'/calls/([^/"?]+?)(\.json|/)', lambda m: f"/calls/{self.cuid(m[1])}{m[2]}", text)
        return re.sub(r'("(?:at|next_attempt_at|csm_notified_at)": ?)"[^"]+"', r'\1"<time>"', text)


def _request(base_url: str, method: str, path: str, headers: dict[str, str],
             data: bytes | None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(base_url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def run_examples(base_url: str) -> dict[str, dict[str, Any]]:
    """Every example against the gateway at ``base_url``; each answer normalized, and for each
    accepted call its view (``GET calls/{cuid}.json``) after the submissions."""
    norm = _Normalizer()
    answers: dict[str, dict[str, Any]] = {}
    accepted: dict[str, str] = {}
    for name, method, path, headers, data in _examples():
        status, got_headers, text = _request(base_url, method, path, headers, data)
        if status == 201:
            accepted[name] = json.loads(text)["cuid"]
        answers[name] = {
            "status": status,
            "headers": {h: norm.text(got_headers[h]) for h in HEADERS if h in got_headers},
            "body": norm.text(text),
        }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for name, cuid in accepted.items():
        status, got_headers, text = _request(base_url, "GET", f"{API}/calls/{cuid}.json", auth, None)
        answers[f"view-{name}"] = {
            "status": status,
            "headers": {h: norm.text(got_headers[h]) for h in HEADERS if h in got_headers},
            "body": norm.text(text),
        }
    return answers


@contextmanager
def gateway_of(checkout: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """``callingest serve gateway`` of ``checkout`` with ``env`` (its own database and topic
    prefix), after that checkout's ``admin init`` and ``config apply`` of :data:`CONFIG_YAML`;
    yields its base URL and stops it afterwards."""
    cli = str(Path(sys.executable).with_name("callingest"))
    port = devstack.free_port()
    full = {**os.environ, **env, "PYTHONPATH": str(checkout), "CALLINGEST_ENV": "dev",
            "GATEWAY_PORT": str(port), "HTTP_PORT": str(port)}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "spec-examples.yaml"
        config.write_text(CONFIG_YAML)
        for args in (["admin", "init"], ["config", "apply", str(config)]):
            subprocess.run([cli, *args], env=full, cwd=checkout, check=True, capture_output=True,
                           timeout=120)
    with open(log, "ab") as out:
        proc = subprocess.Popen([cli, "serve", "gateway"], env=full, cwd=checkout, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)


def _clean_up(env: dict[str, str]) -> None:
    """Drop the recording run's database and topics (the session's servers stay clean)."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient
    from pymongo import MongoClient

    ports = devstack.Ports()
    MongoClient(f"mongodb://127.0.0.1:{ports.mongodb}/").drop_database(env["MONGODB_DATABASE"])

    async def delete_topics() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{ports.kafka}")
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(env["TOPIC_PREFIX"])]
            if names:
                await admin.delete_topics(names)
        finally:
            await admin.close()

    asyncio.run(delete_topics())


def _main() -> None:
    """Record the golden answers of the gateway of the checkout given as first argument on the
    dev servers (127.0.0.1, the ports of tools/devstack.py) into the file given as second."""
    checkout, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    tag = uuid.uuid4().hex[:10]
    env = {"TOPIC_PREFIX": f"spec{tag}.", "MONGODB_DATABASE": f"spec_{tag}",
           "ALLOW_LOOPBACK_RECORDINGS": "true"}
    try:
        with gateway_of(checkout, env, Path(tempfile.gettempdir()) / f"spec-examples-{tag}.log") as base:
            answers = run_examples(base)
    finally:
        _clean_up(env)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    out.write_text(json.dumps({"recorded_from": commit, "answers": answers}, indent=1) + "\n")
    print(f"{len(answers)} answers of {commit} -> {out}")


if __name__ == "__main__":
    _main()
