-- wrk script: POST validation texts round-robin, then print latency percentiles as JSON.
-- env: BENCH_TEXTS (one text per line), BENCH_AUTH (optional bearer key),
--      BENCH_THINK_MS (optional mean pause before each request, exponentially distributed: paced load),
--      BENCH_BODY ("text": text/plain bodies, the default; "json": {"text": ...} JSON bodies;
--                  "list": {"texts": [...]} JSON bodies of BENCH_LIST_SIZE texts each)
local body = os.getenv("BENCH_BODY") or "text"
local as_json = body == "json" or body == "list"
local list_size = tonumber(os.getenv("BENCH_LIST_SIZE") or "64")

local function json_string(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. s .. '"'
end

local texts = {}
local lines = {}
for line in io.lines(os.getenv("BENCH_TEXTS")) do
  lines[#lines + 1] = line
  texts[#texts + 1] = as_json and ('{"text": ' .. json_string(line) .. "}") or line
end
if body == "list" then
  -- as many lists as texts, each of list_size consecutive texts (wrapping round)
  texts = {}
  for first = 1, #lines do
    local items = {}
    for k = 0, list_size - 1 do
      items[#items + 1] = json_string(lines[((first + k - 1) % #lines) + 1])
    end
    texts[#texts + 1] = '{"texts": [' .. table.concat(items, ", ") .. "]}"
  end
end
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = as_json and "application/json" or "text/plain"
local key = os.getenv("BENCH_AUTH")
if key and #key > 0 then wrk.headers["Authorization"] = "Bearer " .. key end

local think = tonumber(os.getenv("BENCH_THINK_MS") or "0")
if think > 0 then
  math.randomseed(os.time())
  delay = function()
    return -think * math.log(1 - math.random())
  end
end

request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, texts[(counter % #texts) + 1])
end

done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "seconds": %.3f, "errors": %d, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, errors,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
