#!/usr/bin/env bash
# Cost of tracing per request, isolated from the store and Kafka: wrk against a traced route
# that needs neither (GET /api/2000-01-01/calls.json, answered 400 by the gateway itself) on
# one gateway process, with tracing off (OTEL_SDK_DISABLED=true: no spans) and on (a server
# span per request, exported over OTLP/HTTP to bench/gateway/otlp_sink.py on loopback),
# alternating ROUNDS times. The per-request difference is then compared with the per-call
# cost of a submission. SAMPLER=parentbased_traceidratio SAMPLER_ARG=0.1 measures "on" with
# head sampling. Needs the dev stack's servers and wrk.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
PORT=${PORT:-18490}
SINK_PORT=${SINK_PORT:-18491}
URL="http://127.0.0.1:$PORT/api/2000-01-01/calls.json"
export HTTP_PORT=$PORT MONGODB_DATABASE=bench_tracing TOPIC_PREFIX=bench-tracing.
.venv/bin/python bench/gateway/otlp_sink.py "$SINK_PORT" > /tmp/otlp-sink-$$.log 2>&1 &
sink=$!
trap 'kill -TERM $sink; wait $sink 2>/dev/null || true; cat /tmp/otlp-sink-$$.log; rm -f /tmp/otlp-sink-$$.log' EXIT
run() {
  env "$@" .venv/bin/python bench/gateway/serve_gateway.py >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
  wrk -t1 -c16 -d2s "$URL" >/dev/null
  wrk -t1 -c16 -d${DURATION}s "$URL" | awk '/Requests\/sec/ {print $2}'
  kill -TERM $pid; wait $pid 2>/dev/null || true
}
for round in $(seq "$ROUNDS"); do
  off=$(run OTEL_SDK_DISABLED=true)
  on=$(run OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT" \
        OTEL_TRACES_SAMPLER="${SAMPLER:-parentbased_always_on}" OTEL_TRACES_SAMPLER_ARG="${SAMPLER_ARG:-1}")
  python3 -c "on,off=$on,$off; print(f'round $round: tracing on {on:.0f} req/s, off {off:.0f} req/s, tracing cost {1e6/on-1e6/off:.1f} us/request')"
done
