-- Scale: N requests in flight at once against an upstream that delays each
-- by about 1 s. Prints "requests seconds peak_rss_mb errors peak_connections".
--   resil-lua bench/scale.lua URL N [CA_FILE [HTTP_VERSION]]
local resil = require "resil"
local url, n, ca_file, http_version = arg[1], tonumber(arg[2]), arg[3], arg[4]
local errors, finished, peak = 0, 0, 0
local t0 = resil.now()
local watcher = resil.spawn(function() -- connections open at once, sampled
  while finished < n do
    local open = 0
    for _, c in pairs(resil.http.stats().connections) do open = open + c end
    if open > peak then peak = open end
    resil.sleep(0.02)
  end
end)
local tasks = {}
for i = 1, n do
  tasks[i] = resil.spawn(function()
    local res, err = resil.http.request({ url = url, method = "POST", body = "{}", timeout = 30, connect_timeout = 20,
      ca_file = ca_file, http_version = http_version })
    finished = finished + 1
    if not res or res.status ~= 200 then
      errors = errors + 1
      if errors <= 3 then io.stderr:write(tostring(err or res.status), "\n") end
    end
  end)
end
for i = 1, n do tasks[i]:join() end
local secs = resil.now() - t0
watcher:join()
local rss_kb = 0
for line in io.lines("/proc/self/status") do
  local kb = line:match("^VmHWM:%s+(%d+)")
  if kb then rss_kb = tonumber(kb) end
end
print(("%d %.3f %.1f %d %d"):format(n, secs, rss_kb / 1024, errors, peak))
