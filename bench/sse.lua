-- Server-sent events framing: CPU time of on_event (framed in C, src/sse.c)
-- against the Lua parser it replaced, fed the same bytes by the same
-- transfer (on_chunk), in the same run.
--   resil-lua bench/sse.lua serve EVENTS BIG_MB   prints "port N", then serves
--     /tiny: EVENTS small events, /big: one event of BIG_MB MiB, each body at once
--   resil-lua bench/sse.lua URL NAME              prints "sse NAME events new_s old_s"
-- The server runs in a process of its own so that only the client's CPU counts.
local resil = require "resil"
local http = resil.http

if arg[1] == "serve" then
  local events, big_mb = tonumber(arg[2]), tonumber(arg[3])
  local parts = {}
  for i = 1, events do parts[i] = ("data: %06d\n\n"):format(i % 1000000) end
  local bodies = {
    ["/tiny"] = table.concat(parts),
    ["/big"] = "data: " .. ("x"):rep(big_mb * 1024 * 1024) .. "\n\n",
  }
  parts = nil
  local server = resil.server.listen({ port = 0, handler = function(req)
    return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = bodies[req.path] }
  end })
  print("port " .. server:port())
  io.stdout:flush()
  resil.sleep(math.huge) -- until killed
  return
end

-- The parser on_event used before src/sse.c (src/lua/prelude.lua), kept
-- verbatim as the baseline: each chunk is appended to a pending string and
-- the rest of it is matched again for every event.
local function sse_parser(on_event)
  local pending = ""
  return function(chunk)
    pending = pending .. chunk:gsub("\r\n", "\n")
    while true do
      local block, rest = pending:match("^(.-)\n\n(.*)$")
      if not block then return true end
      pending = rest
      local ev, data = {}, {}
      for line in block:gmatch("[^\n]+") do
        local field, value = line:match("^([^:]*):? ?(.*)$")
        if field == "data" then data[#data + 1] = value
        elseif field == "event" or field == "id" or field == "retry" then ev[field] = value end
      end
      if #data > 0 or ev.event then
        ev.data = table.concat(data, "\n")
        if on_event(ev) == false then return false end
      end
    end
  end
end

local url, name = arg[1], arg[2]
local function run(framed_in_c)
  local count, bytes = 0, 0
  local function on_event(ev)
    count = count + 1
    bytes = bytes + #ev.data
  end
  local req = { url = url, timeout = 3600, max_event = 64 * 1024 * 1024 }
  if framed_in_c then req.on_event = on_event else req.on_chunk = sse_parser(on_event) end
  collectgarbage()
  local t0 = os.clock()
  local res, err = http.request(req)
  local cpu = os.clock() - t0
  assert(res and res.status == 200, tostring(err))
  return cpu, count, bytes
end

local new_s, new_n, new_bytes = run(true)
local old_s, old_n, old_bytes = run(false)
assert(new_n == old_n and new_bytes == old_bytes,
  ("the parsers disagree: %d events of %d bytes against %d of %d"):format(new_n, new_bytes, old_n, old_bytes))
print(("sse %s %d %.4f %.4f"):format(name, new_n, new_s, old_s))
