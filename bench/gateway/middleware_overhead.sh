#!/usr/bin/env bash
# Cost of the metrics middleware per request, isolated from the store and Kafka:
# wrk against GET /healthz (served through the same middleware stack) on one gateway
# process, with and without the metrics middleware, alternating ROUNDS times.
# The per-request difference is then compared with the per-call cost of a submission.
# Needs the dev stack's servers (make up, or python -m tools.devstack servers-up) and wrk.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
PORT=${PORT:-18480}
export HTTP_PORT=$PORT MONGODB_DATABASE=bench_mw TOPIC_PREFIX=bench-mw.
run() {
  .venv/bin/python bench/gateway/serve_gateway.py "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
  wrk -t1 -c16 -d2s "http://127.0.0.1:$PORT/healthz" >/dev/null
  wrk -t1 -c16 -d${DURATION}s "http://127.0.0.1:$PORT/healthz" | awk '/Requests\/sec/ {print $2}'
  kill -TERM $pid; wait $pid 2>/dev/null || true
}
for round in $(seq "$ROUNDS"); do
  on=$(run)
  off=$(run --no-metrics)
  python3 -c "on,off=$on,$off; print(f'round $round: metrics on {on:.0f} req/s, off {off:.0f} req/s, middleware cost {1e6/on-1e6/off:.1f} us/request')"
done
