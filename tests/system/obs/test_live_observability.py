"""Observability on the real stack: the five services as processes, Prometheus scraping them
with the project's rules, and a loopback OTLP/HTTP receiver collecting their spans.

* traces: a submission's W3C ``traceparent`` (or a new trace) reaches every stage through
  Kafka message headers; gateway, validator, fetcher and normalizer spans share the trace id
  and are linked parent to child; every log line about the call carries the trace id;
  nothing is exported without ``OTEL_EXPORTER_OTLP_ENDPOINT``;
* Prometheus: every service is a healthy target, the rules loaded are the PrometheusRule's,
  and every Grafana panel query (and every rule and KEDA query) evaluates without error.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from callingest import mongo
from callingest.settings import Settings
from callingest.topics import Topics, ensure_topics
from tests.audiogen import write_wav
from tests.conftest import (
    TEST_LOGS,
    Services,
    delete_topics,
    free_port,
    make_settings,
    wait_until,
)
from tests.helpers import apply_config, serve_recordings
from tests.system.ops.prometheus import (
    PrometheusServer,
    alert_names,
    dashboard_expressions,
    dashboard_variable_queries,
    grafana_to_promql,
    keda_expressions,
    label_values_selector,
    record_names,
    rule_expressions,
)
from tools import prometheus

pytestmark = [pytest.mark.stack, pytest.mark.slow]

TOKEN = "demo-network-token"
TRACED = ("gateway", "validator", "fetcher", "normalizer")
SERVICES = (*TRACED, "notifier")
OTLP_DEFAULT_PORT = 4318  # where an OTLP/HTTP exporter sends when no endpoint is configured


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    """A loopback OTLP/HTTP receiver (``POST /v1/traces``, protobuf) that keeps every span."""

    spans: list[Span] = field(default_factory=list)
    runner: web.AppRunner | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Span(
                        service=resource.get("service.name", ""),
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), name=span.name,
                        kind=span.kind,
                        attributes={a.key: a.value.string_value or a.value.int_value
                                    for a in span.attributes},
                    ))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self, port: int = 0) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{bound}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


@dataclass
class Stack:
    settings: Settings
    services: Services
    receiver: OtlpReceiver
    prometheus: PrometheusServer
    recording_url: str
    http: aiohttp.ClientSession
    normalized: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return self.services.running["gateway"].url

    async def submit(self, headers: dict[str, str] | None = None, gateway: str | None = None) -> str:
        call = {
            "external_call_unique_id": uuid.uuid4().hex,
            "start_time": "2016-02-03 09:30:00 AM",
            "destination_phone_number": 2165388265,
            "calling_phone_number": 8779257383,
            "advertiser_campaign_id_from_network": 85,
            "call_direction": "inbound",
            "recording_url": self.recording_url,
        }
        async with self.http.post(f"{gateway or self.gateway}/api/2022-03-01/calls.json",
                                  json={"call": call, "oauth_token": TOKEN},
                                  headers=headers or {}) as resp:
            body = await resp.json()
            assert resp.status == 201, body
            return str(body["cuid"])

    async def settled(self, cuid: str, timeout: float = 90.0) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            async with self.http.get(f"{self.gateway}/api/2022-03-01/calls/{cuid}.json",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                call = dict(await resp.json())
            return call if call.get("status") in ("normalized", "failed") else None

        return dict(await wait_until(done, timeout=timeout, interval=0.3, what=f"{cuid} settled"))


@pytest.fixture(scope="module")
async def stack(servers: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    settings = make_settings(servers)
    topics = Topics(settings.topic_prefix, retry_tiers=2)
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(), 3, 1)
    client = mongo.open_client(settings)
    apply_config(settings)
    wav = tmp_path_factory.mktemp("rec") / "call.wav"
    write_wav(wav, seconds=1.0, rate=16000)
    body = wav.read_bytes()

    async def recording(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="audio/wav")

    runner, base = await serve_recordings(recording)
    receiver = await OtlpReceiver().start()
    log_dir = TEST_LOGS / "obs"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = Services(settings, log_dir)
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), free_port())
    http = aiohttp.ClientSession()
    try:
        for name in SERVICES:
            services.start(name, env=otel)
        prom.start({name: services.running[name].port for name in SERVICES}, interval="1s")
        yield Stack(settings, services, receiver, prom, f"{base}/call.wav", http)
    finally:
        await http.close()
        prom.stop()
        services.stop_all()
        await receiver.stop()
        await runner.cleanup()
        await client.drop_database(settings.mongodb_database)
        await client.close()
        await delete_topics(settings, topics.all())


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-01", trace_id, parent


async def _spans_of_every_stage(stack: Stack, trace_id: str,
                                stages: tuple[str, ...] = TRACED) -> dict[str, Any]:
    async def complete() -> dict[str, Any] | None:
        by_service = {s.service: s for s in stack.receiver.of_trace(trace_id)}
        wanted = {f"callingest-{name}" for name in stages}
        return by_service if wanted <= set(by_service) else None

    return dict(await wait_until(complete, timeout=30, what=f"spans of every stage in {trace_id}"))


def _log_lines(stack: Stack, cuid: str) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for name in TRACED:
        for raw in stack.services.running[name].log_text().splitlines():
            if cuid not in raw or not raw.startswith("{"):
                continue
            entry = json.loads(raw)
            if entry.get("cuid") == cuid:
                lines.setdefault(name, []).append(entry)
    return lines


async def test_a_call_is_one_trace_from_its_traceparent(stack: Stack) -> None:
    header, trace_id, parent = _traceparent()
    cuid = await stack.submit({"traceparent": header})
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    stack.normalized.append(cuid)
    spans = await _spans_of_every_stage(stack, trace_id)
    gateway, validator = spans["callingest-gateway"], spans["callingest-validator"]
    fetcher, normalizer = spans["callingest-fetcher"], spans["callingest-normalizer"]
    # One chain: the submitter's span -> gateway -> validator -> fetcher -> normalizer.
    assert gateway.parent_span_id == parent
    assert validator.parent_span_id == gateway.span_id
    assert fetcher.parent_span_id == validator.span_id
    assert normalizer.parent_span_id == fetcher.span_id
    for span in (gateway, validator, fetcher, normalizer):
        assert span.attributes.get("cuid") == cuid, span
    assert gateway.name == "POST /api/2022-03-01/calls.json"
    assert [s.name for s in (validator, fetcher, normalizer)] == ["validator", "fetcher", "normalizer"]


async def test_a_call_without_traceparent_starts_a_trace(stack: Stack) -> None:
    cuid = await stack.submit()
    call = await stack.settled(cuid)
    assert call["status"] == "normalized", call.get("failure")
    stack.normalized.append(cuid)
    accepted = next(line for line in _log_lines(stack, cuid)["gateway"]
                    if line["msg"] == "call accepted")
    trace_id = accepted["trace_id"]
    spans = await _spans_of_every_stage(stack, trace_id)
    assert spans["callingest-gateway"].parent_span_id == ""
    assert spans["callingest-normalizer"].attributes["cuid"] == cuid


async def test_every_log_line_about_a_call_carries_its_trace_id(stack: Stack) -> None:
    header, trace_id, _ = _traceparent()
    cuid = await stack.submit({"traceparent": header})
    await stack.settled(cuid)
    await _spans_of_every_stage(stack, trace_id)
    lines = _log_lines(stack, cuid)
    assert set(lines) == set(TRACED), lines.keys()
    for service, entries in lines.items():
        for entry in entries:
            assert entry.get("trace_id") == trace_id, (service, entry)
            assert re.fullmatch(r"[0-9a-f]{32}", entry["trace_id"])


async def test_no_span_is_exported_without_an_otlp_endpoint(stack: Stack, tmp_path: Path) -> None:
    """A gateway without OTEL_EXPORTER_OTLP_ENDPOINT still propagates and logs the trace id,
    but sends no span, not even to the OTLP default port (a receiver listens there)."""
    assert not any(name.startswith("OTEL_EXPORTER_OTLP") for name in os.environ)
    default = await OtlpReceiver().start(OTLP_DEFAULT_PORT)
    untraced = Services(stack.settings, tmp_path)
    try:
        gateway = await asyncio.to_thread(untraced.start, "gateway")
        header, trace_id, _ = _traceparent()
        cuid = await stack.submit({"traceparent": header}, gateway=gateway.url)
        await stack.settled(cuid)
    finally:
        # SIGTERM: a clean exit flushes whatever a span processor would hold
        await asyncio.to_thread(untraced.stop_all)
    log = tmp_path / "gateway.log"
    try:
        # the traced stages continue its trace
        await _spans_of_every_stage(stack, trace_id, ("validator", "fetcher", "normalizer"))
        assert [s for s in stack.receiver.of_trace(trace_id) if s.service == "callingest-gateway"] == []
        assert default.spans == []
        accepted = [json.loads(line) for line in log.read_text().splitlines()
                    if line.startswith("{") and '"call accepted"' in line]
        assert [entry["trace_id"] for entry in accepted] == [trace_id]
    finally:
        await default.stop()


# -- Prometheus ------------------------------------------------------------------------------------


async def test_prometheus_scrapes_every_service(stack: Stack) -> None:
    async def all_up() -> list[dict[str, Any]] | None:
        targets = (await asyncio.to_thread(stack.prometheus.api, "targets"))["activeTargets"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None

    targets = await wait_until(all_up, timeout=30, what="every target up")
    assert sorted(t["labels"]["job"] for t in targets) == sorted(f"callingest-{s}" for s in SERVICES)
    assert {t["labels"]["namespace"] for t in targets} == {prometheus.LOCAL_NAMESPACE}
    # as the Prometheus Operator labels a target with its Kubernetes Service (CallingestServiceDown)
    assert sorted(t["labels"]["service"] for t in targets) == sorted(SERVICES)


async def test_prometheus_evaluates_the_project_rules(stack: Stack) -> None:
    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await asyncio.to_thread(stack.prometheus.api, "rules"))["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        return loaded if loaded and all(r.get("lastEvaluation", "").startswith("2") and
                                        not r["lastEvaluation"].startswith("0001")
                                        for r in loaded) else None

    loaded = await wait_until(evaluated, timeout=30, what="every rule evaluated")
    assert sorted(r["name"] for r in loaded if r["type"] == "alerting") == sorted(alert_names())
    assert {r["name"] for r in loaded if r["type"] == "recording"} == record_names()
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []


async def test_every_dashboard_query_evaluates(stack: Stack) -> None:
    if not stack.normalized:  # traffic first, so that the queries have series to work on
        cuid = await stack.submit()
        await stack.settled(cuid)
    prom = stack.prometheus
    # Template variables as Grafana resolves them: label_values() over the live series.
    variables: dict[str, str] = {}

    async def resolved() -> bool:
        for name, query in dashboard_variable_queries():
            selector, label = label_values_selector(query)
            params = {"match[]": selector} if selector else {}
            values = await asyncio.to_thread(prom.api, f"label/{label}/values", **params)
            if not values:
                return False
            variables[name.split("$", 1)[1]] = values[0]
        return True

    await wait_until(resolved, timeout=30, what="dashboard variables resolvable")
    errors = {}
    queries = [(f"dashboard:{n}", grafana_to_promql(e, variables)) for n, e in dashboard_expressions()]
    queries += [(f"rule:{n}", e) for n, e in rule_expressions()]
    queries += [(f"keda:{n}", e) for n, e in keda_expressions()]
    for source, expr in queries:
        try:
            await asyncio.to_thread(prom.query, expr)
        except Exception as exc:
            errors[source] = f"{expr}: {exc}"
    assert errors == {}
    assert len([q for q in queries if q[0].startswith("dashboard:")]) >= 20


async def test_slo_error_ratios_are_recorded_from_live_series(stack: Stack) -> None:
    """After normalized calls and no 5xx, both SLIs are recorded and near 0 (no error)."""
    # A counter's series appears with its first increment: two calls some scrapes apart
    # make every rate of the ratios defined.
    for _ in range(2):
        cuid = await stack.submit()
        await stack.settled(cuid)
        await asyncio.sleep(3)

    async def recorded() -> dict[str, float] | None:
        values = {}
        for record in ("callingest:submission_error_ratio:rate5m",
                       "callingest:freshness_error_ratio:rate5m"):
            result = await asyncio.to_thread(stack.prometheus.query, record)
            if not result:
                return None
            (sample,) = result
            assert sample["metric"]["namespace"] == prometheus.LOCAL_NAMESPACE
            values[record] = float(sample["value"][1])
            if values[record] != values[record]:  # NaN: no increase seen yet
                return None
        return values

    values = await wait_until(recorded, timeout=30, what="SLO ratios recorded")
    assert values["callingest:submission_error_ratio:rate5m"] == 0.0
    # good events (normalized, on the normalizer) and valid ones (fetched, on the fetcher) are
    # scraped from two targets at different moments: their rates agree only roughly
    assert 0.0 <= values["callingest:freshness_error_ratio:rate5m"] < 0.5
