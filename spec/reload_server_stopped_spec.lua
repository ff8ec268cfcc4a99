-- A server a policy opened at load whose listening socket the policy closed (stop_accepting: a
-- drain begun, then called off) is not taken over by the next version: its listen returned that
-- same server, with nothing accepting on its port (before the handover, it listened anew).
-- Real loopback HTTP.
local helpers = require "spec.helpers"

local function web(v, port)
  return ([[
local resil = require "resil"
local M = {}
M.server = assert(resil.server.listen({ port = %d, handler = function() return { status = 200, body = "v%d" } end }))
return M
]]):format(port, v)
end

for _, fixed in ipairs({ false, true }) do
  it("a reload after the policy's server stopped accepting serves the new version (" ..
    (fixed and "a fixed port" or "port 0") .. ")", function()
    local port = fixed and helpers.free_port() or 0
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/web.lua", web(1, port))
    local r = helpers.run_script(([[
local resil = require "resil"
local dir = arg[1]
local function get(p)
  local r, err = resil.http.request({ url = ("http://127.0.0.1:%%d/"):format(p), timeout = 5 })
  return r and (r.status .. " " .. r.body) or ("error " .. tostring(err.kind))
end
local s1 = require("policies.web").server
s1:stop_accepting() -- (no request before: a kept-alive connection would reach the old server still)
local f = assert(io.open(dir .. "/web.lua", "w"))
f:write(%q)
f:close()
assert(resil.reload())
print(get(require("policies.web").server:port()))
]]):format(web(2, port)), ("--policies %s --log-level off"):format(dir), dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("200 v2\n", r.stdout)
  end)
end
