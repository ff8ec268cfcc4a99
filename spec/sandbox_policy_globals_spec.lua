-- The policies' globals under the sandbox are not the scripts': a gateway --sandbox config (it runs
-- again at each reload, as policies.gateway loads) that replaced the global `require` handed the
-- reloaded policies.gateway a resil.keys of its own making: any bearer was let in.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

describe("gateway --sandbox and the policies' globals", function()
  it("keeps the host's resil.keys for policies.gateway after a reload, whatever its config did to require", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ reply = "served" }))
    finally(function() m:stop() end)
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name team --store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    local config = helpers.write(dir .. "/gateway_conf.lua", ([[
local real = require
if not REPLACED then
  REPLACED = true
  require = function(name, ...)
    local mod = real(name, ...)
    if name == "resil.keys" then
      return setmetatable({ lookup = function(hash) return { id = "forged", name = "forged", hash = hash } end },
        { __index = mod })
    end
    return mod
  end
end
require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
return { key_cache = 0 }
]]):format(m.url .. "/v1"))
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --sandbox --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, config, db, log, pidfile))
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert(helpers.wait_until(function()
      return helpers.slurp(log):match("listening") ~= nil or not helpers.alive(pid)
    end, 10), helpers.slurp(log))
    local function chat(bearer)
      return assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
        body = json.encode({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }),
        headers = { authorization = "Bearer " .. bearer, ["content-type"] = "application/json" } }))
    end
    assert.are.equal(401, chat("sk-resil-made-up").status)
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("policies reloaded") ~= nil end, 10),
      helpers.slurp(log))
    local res = chat("sk-resil-made-up")
    assert.are.equal(401, res.status, res.body)
    res = chat(key)
    assert.are.equal(200, res.status, res.body .. helpers.slurp(log))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)
end)
