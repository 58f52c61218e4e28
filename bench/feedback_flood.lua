-- wrk script: POST one feedback body (a JSON list of labels) back to back, then print the counts.
-- env: FLOOD_BODY (file holding the body), FLOOD_AUTH (bearer key)
local file = assert(io.open(os.getenv("FLOOD_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("FLOOD_AUTH")

done = function(summary, latency, requests)
  io.write(string.format('FLOOD_JSON {"requests": %d, "seconds": %.3f, "non_2xx": %d, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
