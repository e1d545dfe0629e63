"""Distributed tracing with OpenTelemetry: one trace per call, across HTTP and Kafka.

The trace context is W3C Trace Context (``traceparent``/``tracestate``), read and
written only by OpenTelemetry's :class:`TraceContextTextMapPropagator`:

* the gateway continues the trace of a submission's ``traceparent`` header (or
  starts one) in a server span (:func:`http_server_middleware`), and stores the
  context with the call (:func:`current_carrier`) so that a later publication
  of its event (the republisher) carries it too;
* every Kafka message gets the current context in its headers
  (:func:`kafka_headers`, called by :class:`callingest.kafka.Producer`); each
  pipeline stage continues it in a consumer span (:func:`consumer_span`);
* outgoing HTTP requests about a call (webhook deliveries) carry it through
  :func:`inject_http`;
* every JSON log line written inside a span carries its ``trace_id``
  (:mod:`callingest.logging` reads :func:`current_trace_id`).

:func:`configure` installs the SDK once per process. Spans are exported over
OTLP/HTTP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-only
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; the other standard ``OTEL_*``
variables apply (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``; ``OTEL_SDK_DISABLED=true`` makes no spans,
though a received context is still passed on). A process that exports runs at a 0.5 ms GIL
switch interval (:data:`EXPORT_SWITCH_INTERVAL`); the cost of tracing is measured in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = frozenset(PROPAGATOR.fields)  # a new set at every read of ``fields``
CUID_ATTRIBUTE = "cuid"
TRACER_NAME = "callingest"
# Requests that are not about a call get no span (probes and scrapes would drown the traces).
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_configured: str | None = None
_lock = threading.Lock()
# With spans exported, a thread (the BatchSpanProcessor's) encodes and posts them while the event
# loop serves; at CPython's default switch interval (5 ms) the loop, whenever it gives the GIL up
# for a system call during an export, waits up to 5 ms to get it back (the GIL "convoy"), which
# cost the gateway more throughput than the export's own CPU (docs/benchmarks.md).
EXPORT_SWITCH_INTERVAL = 0.0005
# The process's tracer, kept by :func:`configure`: ``trace.get_tracer`` builds a scope and edits
# the warnings filters on every call (about 5 us a request).
_tracer: trace.Tracer | None = None


def configure(service: str) -> None:
    """Install the SDK tracer provider for ``service`` (once per process; later calls do
    nothing), with an OTLP/HTTP exporter when an OTLP endpoint is configured."""
    global _configured, _tracer
    with _lock:
        if _configured is not None:
            return
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE
        from opentelemetry.sdk.trace import TracerProvider

        attributes: dict[str, str] = {SERVICE_NAMESPACE: "callingest"}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = f"callingest-{service}"
        provider = TracerProvider(resource=_HashedOnceResource(Resource.create(attributes)))
        if exporting():
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            sys.setswitchinterval(min(sys.getswitchinterval(), EXPORT_SWITCH_INTERVAL))
        trace.set_tracer_provider(provider)
        _tracer = trace.get_tracer(TRACER_NAME)
        _configured = service


class _HashedOnceResource(Resource):
    """A :class:`Resource` that computes its hash once.

    The OTLP encoder groups every exported span by its resource (a dict key), and
    ``Resource.__hash__`` serialises the attributes to sorted JSON at every call: 3 us a span
    on the exporter's thread (docs/benchmarks.md). A resource's attributes cannot change.
    """

    def __init__(self, resource: Resource) -> None:
        attributes: Any = resource.attributes  # the same mapping type, spelt twice by the SDK
        super().__init__(attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def exporting() -> bool:
    """True when spans are exported (an OTLP endpoint is configured)."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def shutdown() -> None:
    """Export the spans still buffered and stop the exporter (call before the process exits)."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if callable(stop):
        stop()


def tracer() -> trace.Tracer:
    return _tracer if _tracer is not None else trace.get_tracer(TRACER_NAME)


# -- the current context -------------------------------------------------------------------------


def current_trace_id() -> str | None:
    """The current trace id as 32 lowercase hex digits, or None outside any trace."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return trace.format_trace_id(span_context.trace_id)


def set_cuid(cuid: str) -> None:
    """Name the call the current span is about."""
    trace.get_current_span().set_attribute(CUID_ATTRIBUTE, cuid)


def current_carrier() -> dict[str, str]:
    """The current context as W3C headers (``traceparent``, maybe ``tracestate``): store it
    with a record to continue the trace later (:func:`attached`, :func:`inject_http`)."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier


@contextlib.contextmanager
def attached(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Make the context stored in ``carrier`` current for the block (no-op without one).

    Inside a span already (a request), the current context is kept: it is the same trace.
    """
    if not carrier or trace.get_current_span().get_span_context().is_valid:
        yield
        return
    token = otel_context.attach(PROPAGATOR.extract(dict(carrier)))
    try:
        yield
    finally:
        otel_context.detach(token)


def inject_http(headers: MutableMapping[str, str], carrier: Mapping[str, str] | None = None) -> None:
    """Add ``traceparent`` (and ``tracestate``) to outgoing HTTP ``headers``: from the
    current context, or from ``carrier`` (a context stored with a record) when given.

    For webhook deliveries and any other request made on behalf of a call.
    """
    if carrier:
        PROPAGATOR.inject(headers, context=PROPAGATOR.extract(dict(carrier)))
    else:
        PROPAGATOR.inject(headers)


# -- Kafka -----------------------------------------------------------------------------------------


class _KafkaHeaders(Getter[Sequence[tuple[str, bytes]]]):
    """Reads W3C fields from aiokafka's header list ``[(name, bytes), ...]``."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [bytes(v).decode("latin-1") for k, v in carrier if k == key and v is not None]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_KAFKA_GETTER = _KafkaHeaders()


def kafka_headers(headers: Iterable[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    """``headers`` plus the current context's W3C fields (unless they carry some already)."""
    out = list(headers)
    if any(name in _FIELDS for name, _ in out):
        return out
    carrier = current_carrier()
    out.extend((name, value.encode("latin-1")) for name, value in carrier.items())
    return out


class _Current:
    """Makes a started span current for a block, then ends it, recording an exception that
    escapes the block as the span's error: ``start_as_current_span`` without its two generator
    context managers, which cost half as much as the span itself (a third of the gateway's
    tracing cost per request, docs/benchmarks.md)."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.token: object = None

    def __enter__(self) -> trace.Span:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        otel_context.detach(self.token)  # type: ignore[arg-type]
        if isinstance(exc, Exception) and self.span.is_recording():
            self.span.record_exception(exc)
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.span.end()


def consumer_span(stage: str, topic: str, headers: Sequence[tuple[str, bytes]] | None,
                  **attributes: Any) -> contextlib.AbstractContextManager[trace.Span]:
    """A consumer span for one Kafka message, child of the context in its headers (current
    inside the ``with`` block)."""
    parent = PROPAGATOR.extract(list(headers or ()), getter=_KAFKA_GETTER)
    return _Current(tracer().start_span(
        stage, context=parent, kind=trace.SpanKind.CONSUMER,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                    "messaging.operation.type": "process", **attributes},
    ))


# -- HTTP server -----------------------------------------------------------------------------------


def http_server_middleware(route_of: Any) -> Any:
    """An aiohttp middleware: one server span per request (except probes and scrapes),
    continuing the request's ``traceparent``; ``route_of(request)`` names the route."""

    @web.middleware
    async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNTRACED_PATHS:
            return await handler(request)
        route = route_of(request)
        parent = PROPAGATOR.extract(request.headers)
        with _Current(tracer().start_span(
            f"{request.method} {route}", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
        )) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(trace.StatusCode.ERROR)
            return response

    return tracing_middleware
