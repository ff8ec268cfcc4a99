-- TLS handshake cost as the client sees it: N sequential requests, each on a
-- new connection (the server closes it after the reply). Against a server
-- that resumes TLS sessions, every connection after the first resumes the
-- shared session; against one that refuses resumption, each is a full
-- handshake. Prints "requests seconds ms_per_request resumed_connections".
--   resil-lua bench/tls.lua URL N CA_FILE
local resil = require "resil"
local url, n, ca_file = arg[1], tonumber(arg[2]), arg[3]
local req = { url = url, ca_file = ca_file, http_version = "1.1" }
assert(resil.http.request(req)) -- the first connection: a full handshake either way
local t0 = resil.now()
for _ = 1, n do
  local res, err = resil.http.request(req)
  assert(res and res.status == 200, err)
end
local secs = resil.now() - t0
print(("%d %.3f %.3f"):format(n, secs, secs / n * 1000))
