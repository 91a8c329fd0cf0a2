-- wrk script: POST fresh step events to /v1/events.
-- Environment: FLUX_BENCH_EVENTS (events per request), FLUX_BENCH_FORMAT (json | ndjson |
-- single), FLUX_BENCH_TOKEN (optional bearer token), FLUX_BENCH_TRACE (1: send traceparent).
-- Every event id is unique across threads and runs: a random 32-bit prefix per thread, the
-- thread number and a counter.

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  n = tonumber(os.getenv("FLUX_BENCH_EVENTS") or "1")
  format = os.getenv("FLUX_BENCH_FORMAT") or "json"
  math.randomseed(os.time() * 1000 + tid)
  prefix = string.format("%08x", math.random(0, 2147483646))
  counter = 0
  local ctype = "application/json"
  if format == "ndjson" then ctype = "application/x-ndjson" end
  headers = {["Content-Type"] = ctype}
  local token = os.getenv("FLUX_BENCH_TOKEN")
  if token and token ~= "" then headers["Authorization"] = "Bearer " .. token end
  trace = os.getenv("FLUX_BENCH_TRACE") == "1"
  payload = '{"items_processed": 42, "duration_ms": 12.5, "content_type": "images", ' ..
    '"use_case": "research", "note": "benchmark payload of about two hundred bytes, ' ..
    'typical of a step event with a few counters and labels"}'
end

local function event(i)
  counter = counter + 1
  local id = string.format("%s-%04x-4000-8000-%012x", prefix, tid % 65536, counter)
  return '{"event_id": "' .. id .. '", "run_id": "bench-' .. (counter % 64) ..
    '", "kind": "step.completed", "step": "load", "occurred_at": "2026-11-23T07:00:00Z", ' ..
    '"payload": ' .. payload .. '}'
end

function request()
  local body
  if format == "single" then
    body = event(1)
  else
    local parts = {}
    for i = 1, n do parts[i] = event(i) end
    if format == "ndjson" then
      body = table.concat(parts, "\n") .. "\n"
    else
      body = "[" .. table.concat(parts, ",") .. "]"
    end
  end
  if trace then
    headers["traceparent"] = string.format("00-%s%024x-%016x-01", prefix, counter, counter)
  end
  return wrk.format("POST", "/v1/events", headers, body)
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.stderr:write(string.format(
    'WRKJSON {"requests": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"timeouts": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, non2xx, summary.errors.connect, summary.errors.read,
    summary.errors.timeout, summary.duration, latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9)))
end
