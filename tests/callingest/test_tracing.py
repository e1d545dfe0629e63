"""callingest.tracing in one process: W3C context into and out of Kafka headers and HTTP
headers (OpenTelemetry's TraceContext propagator), consumer spans as children, trace ids in
the JSON log lines."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk import resources
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from callingest import tracing
from callingest.logging import JsonFormatter


@pytest.fixture(scope="module")
def exported() -> Iterator[InMemorySpanExporter]:
    tracing.configure("tests")
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_kafka_headers_carry_the_current_span(exported: InMemorySpanExporter) -> None:
    with tracing.tracer().start_as_current_span("producer") as span:
        headers = tracing.kafka_headers([("callingest-retry", b"1")])
        context = span.get_span_context()
    names = [name for name, _ in headers]
    assert names[0] == "callingest-retry" and "traceparent" in names
    traceparent = dict(headers)["traceparent"].decode()
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert (version, trace_id, span_id) == ("00", trace.format_trace_id(context.trace_id),
                                            trace.format_span_id(context.span_id))
    # headers that carry a context already are kept as they are
    assert tracing.kafka_headers(headers) == headers


def test_no_context_outside_a_trace() -> None:
    assert tracing.kafka_headers() == []
    assert tracing.current_trace_id() is None
    assert tracing.current_carrier() == {}


def test_consumer_span_continues_the_trace_in_kafka_headers(exported: InMemorySpanExporter) -> None:
    header, trace_id, parent = _traceparent()
    with tracing.consumer_span("fetcher", "t.calls.validated", [("traceparent", header.encode())]):
        tracing.set_cuid("c0ffee")
        assert tracing.current_trace_id() == trace_id
    (span,) = [s for s in exported.get_finished_spans()
               if trace.format_trace_id(s.context.trace_id) == trace_id]
    assert span.name == "fetcher" and span.kind == trace.SpanKind.CONSUMER
    assert span.parent is not None and trace.format_span_id(span.parent.span_id) == parent
    assert span.attributes is not None and span.attributes["cuid"] == "c0ffee"
    assert span.attributes["messaging.destination.name"] == "t.calls.validated"


def test_consumer_span_without_context_starts_a_trace(exported: InMemorySpanExporter) -> None:
    with tracing.consumer_span("validator", "t.calls.submitted", None) as span:
        assert span.get_span_context().is_valid
        assert span.parent is None  # type: ignore[attr-defined]


def test_inject_http_from_a_stored_carrier_or_the_current_span(exported: InMemorySpanExporter) -> None:
    header, trace_id, _ = _traceparent()
    headers: dict[str, str] = {"Content-Type": "application/json"}
    tracing.inject_http(headers, {"traceparent": header})
    assert headers["traceparent"] == header
    with tracing.attached({"traceparent": header}):
        assert tracing.current_trace_id() == trace_id
        with tracing.tracer().start_as_current_span("deliver webhook") as span:
            current: dict[str, str] = {}
            tracing.inject_http(current)
    assert current["traceparent"].split("-")[1] == trace_id
    assert current["traceparent"].split("-")[2] == trace.format_span_id(span.get_span_context().span_id)
    assert tracing.current_trace_id() is None  # detached after the block


def test_json_log_lines_inside_a_trace_carry_its_id(exported: InMemorySpanExporter) -> None:
    formatter = JsonFormatter("tests")
    record = logging.makeLogRecord({"msg": "step done", "cuid": "c0ffee", "levelname": "INFO"})
    assert "trace_id" not in json.loads(formatter.format(record))
    header, trace_id, _ = _traceparent()
    with tracing.attached({"traceparent": header}):
        line = json.loads(formatter.format(record))
    assert line["trace_id"] == trace_id and line["cuid"] == "c0ffee"


def test_a_span_records_the_exception_that_escapes_it(exported: InMemorySpanExporter) -> None:
    header, trace_id, _ = _traceparent()
    with pytest.raises(ValueError), tracing.consumer_span("fetcher", "t.calls.validated",
                                                          [("traceparent", header.encode())]):
        assert tracing.current_trace_id() == trace_id
        raise ValueError("bad recording")
    assert tracing.current_trace_id() is None  # detached although the block raised
    (span,) = [s for s in exported.get_finished_spans()
               if trace.format_trace_id(s.context.trace_id) == trace_id]
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.status.description == "ValueError: bad recording"
    assert [event.name for event in span.events] == ["exception"]


def test_exporting_a_batch_serialises_the_resource_once(exported: InMemorySpanExporter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The OTLP encoder groups spans by resource (a dict key); the SDK's Resource hashes its
    attributes as sorted JSON each time, ours once (docs/benchmarks.md, cost of tracing)."""
    for n in range(5):
        with tracing.consumer_span("fetcher", "t.calls.validated", None, cuid=f"c{n}"):
            pass
    spans = exported.get_finished_spans()[-5:]
    assert {span.resource.attributes["service.namespace"] for span in spans} == {"callingest"}
    serialised: list[object] = []
    real_dumps = resources.dumps

    def dumps(*args: Any, **kwargs: Any) -> str:
        serialised.append(args)
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(resources, "dumps", dumps)
    request = encode_spans(spans)
    assert len(request.resource_spans) == 1 and len(request.resource_spans[0].scope_spans[0].spans) == 5
    assert serialised == []
