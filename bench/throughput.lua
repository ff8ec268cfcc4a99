-- Throughput: N POSTs at concurrency C against URL, through resil.http.
--   resil-lua bench/throughput.lua URL N C [CA_FILE]  -> prints "requests seconds rps errors"
local resil = require "resil"
local url, n, c, ca_file = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4]
local body = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
local headers = { ["content-type"] = "application/json" }
local errors, next_i = 0, 0
local t0 = resil.now()
local workers = {}
for w = 1, c do
  workers[w] = resil.spawn(function()
    while next_i < n do
      next_i = next_i + 1
      local res = resil.http.request({ method = "POST", url = url, body = body, headers = headers, ca_file = ca_file })
      if not res or res.status ~= 200 then errors = errors + 1 end
    end
  end)
end
for w = 1, c do workers[w]:join() end
local secs = resil.now() - t0
print(("%d %.3f %.0f %d"):format(n, secs, n / secs, errors))
