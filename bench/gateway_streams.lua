-- bench/gateway_streams.lua URL N: N concurrent streamed chat completions
-- against URL (the mock directly, or the gateway in front of it); prints
-- "streams done failed seconds chunks_per_stream mean_chunk_gap_ms".
local resil = require "resil"
local json = resil.json
local url, n = arg[1], tonumber(arg[2] or "1000")
local body = json.encode({ model = "gpt-4o-mini", messages = { { role = "user", content = "hi" } }, stream = true })
local t0 = resil.now()
local chunks, gaps, failed = 0, 0, 0
local gap_sum = 0
resil.map((function() local t = {} for i = 1, n do t[i] = i end return t end)(), function()
  local s, err = resil.http.stream({ method = "POST", url = url, body = body, timeout = 120,
    headers = { ["content-type"] = "application/json", authorization = "Bearer " .. (os.getenv("GW_KEY") or "x") } })
  if not s or s.status ~= 200 then failed = failed + 1 return end
  local last
  while true do
    local ev = s:read_event()
    if not ev then break end
    local now = resil.now()
    if last then gap_sum, gaps = gap_sum + (now - last), gaps + 1 end
    last = now
    chunks = chunks + 1
  end
end, { concurrency = n })
print(("%d %d %d %.2f %.0f %.2f"):format(n, n - failed, failed, resil.now() - t0, chunks / math.max(1, n - failed),
  1000 * gap_sum / math.max(1, gaps)))
