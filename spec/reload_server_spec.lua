-- A server a policy opens as it loads (resil.server.listen) across reloads, seen by a client over
-- real loopback HTTP. The new version serves on the same address, on the same connections: the
-- requests under way finish on the old handler, a failed reload leaves the old one serving, and
-- no reload leaves a socket behind. Before, each reload's listen opened one more socket (port
-- 0), or got address_in_use (a fixed port) and failed the reload, the first version's server,
-- its old handler, serving on.
local helpers = require "spec.helpers"

-- version v of a policy that serves at load: GET / answers "v<n> <the client's address>",
-- GET /slow the same after 2 s (virtual); `extra` is more of its text
local function web(v, port, extra)
  return ([[
local resil = require "resil"
local V = %d
local seen = resil.keep("seen", function() return { versions = setmetatable({}, { __mode = "k" }) } end)
local M = { version = V }
seen.versions[M] = true
M.server = assert(resil.server.listen({ port = %d, tasks = true, %s
  handler = function(req)
    if req.path == "/slow" then resil.sleep(2) end
    return { status = 200, body = ("v%%d %%s"):format(M.version, req.peer) } -- (it holds its version, as handlers do)
  end }))
return M
]]):format(v, port, extra or "")
end

local policy_dir = helpers.policy_dir

-- the main scripts' helpers: write a policy file, GET from the policy's server, count this
-- process's listening TCP sockets
local MAIN = [[
local resil = require "resil"
local dir = arg[1]
resil.clock.virtual()
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
local function get(port, path)
  local r, err = resil.http.request({ url = ("http://127.0.0.1:%d%s"):format(port, path or "/"), timeout = 30 })
  if not r then return "error " .. tostring(err.kind) end
  return r.status .. " " .. r.body
end
local pid = io.open("/proc/self/stat"):read("a"):match("^(%d+)")
local function listening()
  local p = io.popen(([=[for s in $(ls -l /proc/%s/fd/ | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p'); do
    awk -v s="$s" '$10 == s && $4 == "0A" { print s }' /proc/net/tcp /proc/net/tcp6; done]=]):format(pid))
  local n = select(2, p:read("a"):gsub("\n", ""))
  p:close()
  return n
end
local function count(t) local n = 0; for _ in pairs(t) do n = n + 1 end; return n end
-- (until the server has read the request: its handler runs)
local function under_way(s) repeat resil.sleep(0.01) until s:pending() > 0 end
]]

local function run(dir, source)
  return helpers.run_script(MAIN .. source, ("--policies %s --log-level off"):format(dir), dir)
end

for _, fixed in ipairs({ false, true }) do
  local on = fixed and "a fixed port" or "port 0"
  describe("a server a policy opens at load, on " .. on, function()
    local port = fixed and helpers.free_port() or 0

    it("is the new version's after a reload: same address, same connections; what was under way " ..
      "finishes on the old handler", function()
      local r = run(policy_dir({ ["web.lua"] = web(1, port) }), ([[
local port = require("policies.web").server:port()
local before = get(port)
local peer = before:match(" (%%S+)$")
print(before:match("^%%S+ %%S+"), listening())
local slow = resil.spawn(get, port, "/slow") -- (on the connection the first request opened)
under_way(require("policies.web").server)
write("web.lua", %q)
print(resil.reload())
local during = get(port) -- (a connection of its own: the first one is busy)
print(during:match("^%%S+ %%S+"), listening(), require("policies.web").server:port() == port)
local _, answer = slow:join()
print("slow", answer:match("^%%S+ %%S+"), answer:match(" (%%S+)$") == peer)
-- both connections kept alive, and answered by the new version
local after = get(port)
print(after:match("^%%S+ %%S+"), after:match(" (%%S+)$") == peer or after:match(" (%%S+)$") == during:match(" (%%S+)$"))
]]):format(web(2, port)))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("200 v1\t1\ntrue\tpolicies.web\n200 v2\t1\ttrue\nslow\t200 v1\ttrue\n200 v2\ttrue\n",
        (r.stdout:gsub("table: 0x%x+", "policies.web")))
    end)

    it("leaves one socket and one version after 20 reloads", function()
      local r = run(policy_dir({ ["web.lua"] = web(1, port) }), ([[
local port = require("policies.web").server:port()
local text = %q
for v = 2, 21 do
  write("web.lua", (text:gsub("local V = 21", "local V = " .. v)))
  assert(resil.reload())
  assert(get(port):match("^200 v" .. v .. " "))
end
resil.sleep(1)
collectgarbage(); collectgarbage()
local seen = resil.keep("seen")
print(get(port):match("^%%S+ %%S+"), listening(), require("policies.web").server:port() == port, count(seen.versions))
]]):format(web(21, port)))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("200 v21\t1\ttrue\t1\n", r.stdout)
    end)

    -- (before, on a fixed port: b's listen got address_in_use at every reload, a's old server
    -- holding the port and serving a's old handler)
    if fixed then it("moves to another file's new version that listens there, when its own no longer does", function()
      local r = run(policy_dir({ ["a.lua"] = web(1, port), ["b.lua"] = "return {}" }), ([[
local port = require("policies.a").server:port()
require "policies.b"
print(get(port):match("^%%S+ %%S+"))
write("a.lua", "return {}")
write("b.lua", (%q):gsub("port = 0,", "port = " .. port .. ","))
print((resil.reload()))
local b = require("policies.b").server
print(get(port):match("^%%S+ %%S+"), listening(), b:port() == port)
]]):format(web(2, 0)))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("200 v1\ntrue\n200 v2\t1\ttrue\n", r.stdout)
    end) end

    it("keeps the old version serving, untouched, when the reload fails after the new one listened", function()
      local r = run(policy_dir({ ["a.lua"] = web(1, port), ["b.lua"] = "return {}" }), ([[
local port = require("policies.a").server:port()
require "policies.b"
local slow = resil.spawn(get, port, "/slow")
under_way(require("policies.a").server)
write("a.lua", %q)          -- loads, and listens
write("b.lua", "return {") -- then this breaks the reload
print((resil.reload()))
print(get(port):match("^%%S+ %%S+"), listening(), require("policies.a").server:port() == port)
print("slow", (select(2, slow:join()):match("^%%S+ %%S+")))
-- and the next reload that works takes it over as usual
write("b.lua", "return {}")
print((resil.reload()))
print(get(port):match("^%%S+ %%S+"), listening(), require("policies.a").server:port() == port)
]]):format(web(2, port)))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("false\n200 v1\t1\ttrue\nslow\t200 v1\ntrue\n200 v2\t1\ttrue\n", r.stdout)
    end)

    -- (other settings: a server of its own, on the listening socket the old one had)
    it("with other settings, the new server takes the socket over; the old one answers what it had, " ..
      "then closes", function()
      local r = run(policy_dir({ ["a.lua"] = web(1, port), ["b.lua"] = "return {}" }), ([[
local port = require("policies.a").server:port()
require "policies.b"
local old = require("policies.a").server
local slow = resil.spawn(get, port, "/slow")
under_way(require("policies.a").server)
write("a.lua", %q)
write("b.lua", "return {")
print((resil.reload()))     -- fails: the new version's server (on the same socket) is closed
print(get(port):match("^%%S+ %%S+"), listening())
write("b.lua", "return {}")
print((resil.reload()))
print(get(port):match("^%%S+ %%S+"), listening(), require("policies.a").server:port() == port,
  require("policies.a").server ~= old)
print("slow", (select(2, slow:join()):match("^%%S+ %%S+")))
resil.sleep(0.5)
print("old closed", not pcall(old.port, old))
]]):format(web(2, port, "max_body = 1000,")))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("false\n200 v1\t1\ntrue\n200 v2\t1\ttrue\ttrue\nslow\t200 v1\nold closed\ttrue\n", r.stdout)
    end)

    -- (before: a server still draining kept the handler of the version that took its address
    -- over; under steady keep-alive traffic, with a setting changed at each reload, its clients
    -- were answered by v3 after v11 was in)
    it("still draining, runs each later version's handler on what it answers", function()
      local r = run(policy_dir({ ["web.lua"] = web(1, port) }), ([[
local port = require("policies.web").server:port()
local text = %q
local slow = resil.spawn(get, port, "/slow") -- (keeps the first server busy, on a connection of its own)
under_way(require("policies.web").server)
for v = 2, 4 do -- (max_body changes each time: a server of its own each)
  write("web.lua", (text:gsub("local V = 2", "local V = " .. v):gsub("max_body = 1000", "max_body = " .. v * 1000)))
  assert(resil.reload())
  collectgarbage(); collectgarbage() -- (the servers in between, closed at once)
  print(get(port):match("^%%S+ %%S+"))
end
print("slow", (select(2, slow:join()):match("^%%S+ %%S+")))
]]):format(web(2, port, "max_body = 1000,")))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("200 v2\n200 v3\n200 v4\nslow\t200 v1\n", r.stdout)
    end)

    -- (before: a kept-alive client stayed on the old server, its old settings (here max_body)
    -- and, with `tasks` changed, its old handler, for as long as it kept sending)
    it("still draining, closes each connection after its reply: the client's next request " ..
      "is the new server's, with its settings", function()
      local r = run(policy_dir({ ["web.lua"] = web(1, port) }), ([[
local port = require("policies.web").server:port()
local function post(n)
  local r, err = resil.http.request({ url = ("http://127.0.0.1:%%d/"):format(port), method = "POST",
    body = ("x"):rep(n), timeout = 30 })
  if not r then return "error " .. tostring(err.kind) end
  return r.status .. " " .. tostring(r.headers.connection)
end
local slow = resil.spawn(get, port, "/slow") -- (keeps the first server busy, on a connection of its own)
under_way(require("policies.web").server)
print(post(2000))                            -- a kept-alive connection to the first server
write("web.lua", %q)
assert(resil.reload())
print(post(2000))                            -- its reply closes the connection
print(post(2000))                            -- the new server's: past its max_body
print("slow", (select(2, slow:join()):match("^%%S+ %%S+")))
]]):format(web(2, port, "max_body = 1000,")))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("200 nil\n200 close\n413 close\nslow\t200 v1\n", r.stdout)
    end)

    it("is closed when the new version no longer listens", function()
      local r = run(policy_dir({ ["web.lua"] = web(1, port) }), [[
local port = require("policies.web").server:port()
write("web.lua", "return {}")
print((resil.reload()))
print(get(port), listening())
]])
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("true\nerror connect\t0\n", r.stdout)
    end)
  end)
end

-- (a task the version owns listens after the reload: no handover, the old server closed first)
describe("a server a task started at load opens", function()
  it("is closed with its version: after 5 reloads, one socket, and the last version answers", function()
    local port = helpers.free_port()
    local opener = ([[
local resil = require "resil"
local M = { version = 1 }
resil.spawn(function()
  M.server = assert(resil.server.listen({ port = %d, handler = function() return { status = 200, body = "v" .. M.version } end }))
end)
return M
]]):format(port)
    local r = run(policy_dir({ ["opener.lua"] = opener }), ([[
require "policies.opener"
resil.sleep(0.1)
local text = %q
for v = 2, 6 do
  write("opener.lua", (text:gsub("version = 1", "version = " .. v)))
  assert(resil.reload())
  resil.sleep(0.1) -- (its task listens)
end
print(get(%d), listening())
]]):format(opener, port))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("200 v6\t1\n", r.stdout)
  end)
end)

describe("a server opened outside a policy's load", function()
  it("is left alone by reloads (the main script's, resil.keep's)", function()
    local r = run(policy_dir({ ["kept.lua"] = [[
local resil = require "resil"
local kept = resil.keep("kept", function()
  return { server = resil.server.listen({ handler = function() return { status = 200, body = "kept" } end }) }
end)
return { port = kept.server:port() }
]] }), [[
local mine = resil.server.listen({ handler = function() return { status = 200, body = "main" } end })
local kept = require("policies.kept").port
for _ = 1, 3 do assert(resil.reload()) end
resil.sleep(1)
collectgarbage(); collectgarbage()
print(get(mine:port()), get(kept), listening())
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("200 main\t200 kept\t2\n", r.stdout)
  end)
end)
