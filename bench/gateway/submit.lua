-- wrk script: every request submits a new call (unique external_call_unique_id).
-- Env: BENCH_TOKEN (API token), BENCH_RUN (prefix making ids unique across runs),
-- BENCH_RECORDINGS (base URL of the recordings; default a closed loopback port),
-- BENCH_MAX_REQUESTS (each thread stops after that many responses; default: the duration).
-- done() prints one JSON line: requests, non-2xx, socket errors, p50/p90/p99 (microseconds).

local token = os.getenv("BENCH_TOKEN") or "demo-network-token"
local run = os.getenv("BENCH_RUN") or tostring(os.time())
local recordings = os.getenv("BENCH_RECORDINGS") or "http://127.0.0.1:9/recordings"
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "")
local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
   counter = counter + 1
   local body = string.format(
      '{"call":{"external_call_unique_id":"%s-%d-%d","start_time":"2016/04/11T13:00:00.000-07:00",' ..
      '"destination_phone_number":9093900003,"calling_phone_number":8779257383,' ..
      '"advertiser_campaign_id_from_network":85,"call_direction":"inbound",' ..
      '"recording_url":"%s/%d.wav"},' ..
      '"signals":[{"name":"sale","value":1}],"custom_data":[{"name":"channel","value":"Paid Search"}]}',
      run, tid or 0, counter, recordings, counter)
   return wrk.format(nil, nil, nil, body)
end

if max_requests then
   local responses = 0
   function response(status, headers, body)
      responses = responses + 1
      if responses == max_requests then
         wrk.thread:stop()
         -- wrk's main thread sleeps for the whole duration unless a signal interrupts that
         -- sleep: SIGINT (its own handler) ends the run now, and done() reports what was
         -- measured. Sent a few times: one that arrives before the main thread sleeps is lost.
         io.popen('(for i in 1 2 3 4 5 6; do [ "$(cat /proc/' .. "$PPID" ..
                  '/comm 2>/dev/null)" = wrk ] && kill -INT $PPID; sleep 0.25; done) &'):close()
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
      summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
