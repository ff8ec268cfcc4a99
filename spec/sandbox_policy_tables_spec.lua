-- The policies' tables under the sandbox are not the scripts': the policies call what their own and
-- each other's module tables hold when they run (pricing.cost's prices, the gateway's ai.chat,
-- classify's rules). A sandboxed script that set a price to 0 had every call of its process
-- recorded at $0 (a gateway key's budget never spent), and one that replaced ai.chat was called
-- for every caller; one that replaced resil.http.request saw every provider request the policies
-- made (their resil is their own now). A script reads them as before; a policy file of the
-- project's sets them.
local helpers = require "spec.helpers"
local resil = require "resil"

local SCRIPT = [[
local resil = require "resil"
local ai = require "policies.ai"
local pricing = require "policies.pricing"
local classify = require "policies.classify"
local function try(f) print(pcall(f)) end
try(function() pricing.models.openai["gpt-4o-mini"].input = 0 end)
try(function() pricing.models.openai["gpt-4o-mini"] = { input = 0, output = 0 } end)
try(function() ai.chat = function() return { text = "mine" } end end)
try(function() classify.status[429] = nil end)
try(function() resil.policy("pricing").models = {} end)
try(function() package.loaded["policies.ai"].chat = print end)
try(function() rawset(ai, "chat", print) end)
try(function() resil.keep("policies.ai.config").openai = { base_url = "http://127.0.0.1:9" } end)
-- what their functions return of their state: a price, a target's conf (every caller's URL), a provider
try(function() pricing.price("openai", "gpt-4o-mini").input = 0 end)
ai.configure("openai", { base_url = "http://127.0.0.1:9/v1", api_key = "sk-test-123456" })
try(function() ai.targets({ model = "openai/gpt-4o-mini", messages = {} })[1].conf.base_url = "http://127.0.0.1:7" end)
try(function() ai.provider_module("openai").build = print end)
if arg[1] == "writes" then return end -- (outside the sandbox they went through: pricing.models is {})
-- read as before
local n = 0
for _, price in pairs(pricing.models.openai) do n = n + (price.input and 1 or 0) end
print(n > 5, pricing.models.openai["gpt-4o-mini"].output, resil.policy("pricing").models.openai["gpt-4o"].input,
  classify.status[429].max_retries, require("policies.prices").set)
-- (a view holds nothing itself: resil.json.encode wrote {} for it)
local encoded = resil.json.decode(resil.json.encode({ mini = pricing.models.openai["gpt-4o-mini"] }))
print(encoded.mini.output, #resil.json.encode(classify.status) > 10)
resil.log.warn("prices", { mini = pricing.models.openai["gpt-4o-mini"] })
local m = assert(resil.mock.start({ reply = "served" }))
ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456" })
-- the resil table is the script's; what the policies call from it is not (a spy on every request)
local seen, request = 0, resil.http.request
resil.http.request = function(...) seen = seen + 1 return request(...) end
resil.now = function() return 0 end
local res = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }))
print(res.text, resil.cost.total() > 0, m:stats().routes.chat, seen)
m:stop()
]]

-- a policy file of the project's own: the policies' tables are its to set
local PRICES = [[
local pricing = require "policies.pricing"
pricing.models.openai["my-model"] = { input = 1, output = 2 }
return { set = pricing.models.openai["my-model"].output }
]]

describe("--sandbox and the policies' tables", function()
  it("refuses a script's writes with its file:line; reads, a project's policy file and the calls are as before",
    function()
    local dir = helpers.policy_dir({ ["prices.lua"] = PRICES })
    local script = helpers.write(helpers.tmpname(".lua"), SCRIPT)
    local db = helpers.tmpname(".db")
    local r = helpers.run(("timeout 60 %s --sandbox --store %s --policies %s %s"):format(helpers.resil, db, dir, script))
    assert.are.equal(0, r.code, r.stderr)
    local l = {}
    for line in r.stdout:gmatch("[^\n]+") do l[#l + 1] = line end
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    local function refused(i, lineno, field)
      assert.matches("^false\t.-" .. name .. ":" .. lineno .. ": " .. field .. " cannot be set in the sandbox: the"
        .. " policies' tables are read only to a script", l[i])
    end
    refused(1, 6, 'policies%.pricing%.models%.openai%["gpt%-4o%-mini"%]%.input')
    refused(2, 7, 'policies%.pricing%.models%.openai%["gpt%-4o%-mini"%]')
    refused(3, 8, "policies%.ai%.chat")
    refused(4, 9, "policies%.classify%.status%[429%]")
    refused(5, 10, "policies%.pricing%.models")
    refused(6, 11, "policies%.ai%.chat")
    assert.matches("^false\t.-" .. name .. ":12: rawset: the host's objects cannot be changed in the sandbox", l[7])
    assert.matches("^false\t.-" .. name .. ':13: resil%.keep: "policies%.ai%.config" is the policies\' state', l[8])
    refused(9, 15, 'policies%.pricing%.models%.openai%["gpt%-4o%-mini"%]%.input') -- (the same table, named as first seen)
    refused(10, 17, 'policies%.ai%.targets%(%.%.%.%)%[1%]%.conf%.base_url')
    refused(11, 18, 'policies%.ai%.provider_module%(%.%.%.%)%.build')
    assert.are.equal("true\t0.6\t2.5\t5\t2", l[12])
    assert.are.equal("0.6\ttrue", l[13])
    local logged = r.stderr:match('\n?({[^\n]*"msg":"prices"[^\n]*})')
    assert.are.equal(0.6, resil.json.decode(logged).mini.output, r.stderr)
    assert.are.equal("served\ttrue\t1\t0", l[14]) -- (its price not 0, its call the policy's, unseen)
    -- outside the sandbox the script is the operator's: its writes go through
    r = helpers.run(("timeout 60 %s --store %s --policies %s %s writes"):format(helpers.resil, db, dir, script))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^" .. ("true\n"):rep(8), r.stdout)
    os.remove(script)
  end)

  it("gateway --sandbox: a config that writes into them stops the start with its file:line; a policy file sets them",
    function()
    local dir = helpers.policy_dir({ ["prices.lua"] = PRICES })
    local db = helpers.tmpname(".db")
    local config = helpers.write(helpers.tmpname(".lua"), 'local pricing = require "policies.pricing"\n' ..
      'pricing.models.openai["gpt-4o-mini"].input = 0\nreturn {}\n')
    local r = helpers.run(("timeout 60 %s gateway --sandbox --listen 127.0.0.1:0 --config %s --store %s"):format(
      helpers.resil, config, db))
    assert.are.equal(1, r.code, r.stderr)
    assert.matches(config:match("[^/]+$"):gsub("%p", "%%%0") .. ':2: policies%.pricing%.models%.openai%["gpt%-4o%-mini"%]'
      .. "%.input cannot be set in the sandbox", r.stderr)
    -- the way that is left: the config requires a policy file of the project's, which sets it
    helpers.write(config, 'require "policies.prices"\nassert(require("policies.pricing").models.openai["my-model"])\n' ..
      'return {}\n')
    local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --sandbox --listen 127.0.0.1:0 --config %s --store %s --policies %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, config, db, dir, out, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function()
      return helpers.slurp(out):match("listening") ~= nil or not helpers.alive(pid)
    end, 20), helpers.slurp(out))
    assert.matches("listening", helpers.slurp(out))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)
end)
