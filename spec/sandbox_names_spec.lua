-- The names a sandboxed script shares with the host (--sandbox, gateway --sandbox): the host's
-- metrics (resil_*, gen_ai_*), the model registry's migration records in the store
-- (models:migration:*), a gateway key's budget (key:NAME) and its rate buckets (gateway:*).
-- Each was the host's object or record, got by its name: a script set resil_store_down (a false
-- alarm, or a real outage hidden), forced a migration's rollback on every process on the store,
-- reserved a key's budget away. Outside the sandbox nothing changes.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local function lines_of(s)
  local out = {}
  for l in s:gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

describe("--sandbox and the host's metrics", function()
  it("gives a script the host's metrics to read only, refuses new resil_*/gen_ai_* names, keeps policies' own",
    function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local ai = require "policies.ai" -- (policies define their resil_* metrics as they load, under the sandbox)
local function try(f) local ok, err = pcall(f) print(ok, ok and "" or tostring(err)) end
try(function() resil.metrics.gauge("resil_store_down"):set({ store = "forged" }, 1) end)
try(function() resil.metrics.counter("resil_calls_total"):inc({ provider = "forged", outcome = "error" }, 100) end)
try(function() resil.metrics.counter("resil_reloads_total"):labels({ result = "ok" }).inc(5) end)
try(function() resil.metrics.histogram("gen_ai_client_operation_duration_seconds"):observe({}, 99) end)
try(function() resil.metrics.counter("resil_made_up_total") end)
-- reading the host's figures (examples/pipeline.lua does): a value, no change
print(resil.metrics.counter("resil_reloads_total"):value({ result = "ok" }),
  resil.metrics.counter("resil_breaker_transitions_total"):value({ breaker = "none", to = "open" }))
-- the script's own names are its own; the metatable every metric shares is not
local mine = resil.metrics.counter("app_jobs_total", "jobs")
mine:inc({ kind = "x" }, 2)
print(mine:value({ kind = "x" }), getmetatable(mine))
local text = resil.metrics.text()
print(text:match('resil_store_down{store="forged"}') ~= nil, text:match('provider="forged"') ~= nil,
  text:match("app_jobs_total{kind=\"x\"} 2") ~= nil)
]])
    local r = helpers.run(("%s --sandbox %s"):format(helpers.resil, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":4: .-resil_store_down.- the host's", l[1])
    assert.matches("^false\t.-" .. name .. ":5: .-resil_calls_total.- the host's", l[2])
    assert.matches("^false\t.-" .. name .. ":6: .-resil_reloads_total.- the host's", l[3])
    assert.matches("^false\t.-" .. name .. ":7: .-gen_ai_client_operation_duration_seconds.- the host's", l[4])
    assert.matches("^false\t.-" .. name .. ":8: .-resil_made_up_total.-reserved", l[5])
    assert.are.equal("0\t0", l[6])
    assert.are.equal("2\tfalse", l[7])
    assert.are.equal("false\tfalse\ttrue", l[8])
  end)

  it("does not take a script's wrapper, tail-calling from a policy's load, for the policy", function()
    -- (a policy file of the operator's that defines its metric through resil.metrics: the shipped
    -- ones take the host's constructors from their chunk's arguments, sandbox_metrics_spec)
    local dir = helpers.policy_dir({ ["mine.lua"] = [[
local resil = require "resil"
local mine_total = resil.metrics.counter("resil_mine_total", "mine")
return {}
]] })
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
-- (a tail call leaves no frame of its own: the policy chunk would be metrics.counter's caller)
local counter = resil.metrics.counter
resil.metrics.counter = function(name, help) return counter("resil_store_down_refused_total", help) end
print(pcall(require, "policies.mine"))
print(resil.metrics.text():match("resil_store_down_refused_total") ~= nil)
]])
    local r = helpers.run(("%s --sandbox --policies %s %s"):format(helpers.resil, dir, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    assert.matches("^false\t.-resil_store_down_refused_total.-reserved", l[1])
    assert.are.equal("false", l[2])
  end)

  it("outside the sandbox a script still gets the host's metric objects", function()
    local r = helpers.run_script([[
local resil = require "resil"
local m = resil.metrics.gauge("resil_store_down")
m:set({ store = "x" }, 1)
print(m:value({ store = "x" }), getmetatable(m) ~= nil)
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\ttrue\n", r.stdout)
  end)
end)

describe("--sandbox and the model registry's migrations", function()
  local MODELS = [[
return { canary = { use = "openai/gpt-4o-mini-2024-07-18", migrate = { to = "openai/gpt-4.1-mini-2025-04-14",
  share = 0.5, sticky = "user", rollback = { error_rate = 0.05, min_calls = 10 } } } }]]

  it("refuses a script the models:migration: keys; the registry still counts and rolls back through the store",
    function()
    local dir = helpers.policy_dir({ ["models.lua"] = MODELS })
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local registry = require "policies.registry"
local s = resil.store()
local key = registry.migration_state("canary").key
print(pcall(function() s:set(key .. ":rolled_back", '{"reason":"forged"}') end))
print(pcall(function() s:get(key .. ":rolled_back") end))
print(pcall(registry.reset_migration, "canary"))
-- the registry's in-process copy (kept across reloads) is not the script's either
print(pcall(function() resil.keep("policies.registry.migrations")[key .. ":rolled_back"] = '{"reason":"forged"}' end))
print(registry.migration_state("canary").share)
-- the registry's own writes go through: ten failures on the new side roll it back
for _ = 1, 10 do registry.record({ alias = "canary", side = "new" }, { ok = false, seconds = 0.1 }) end
for _ = 1, 10 do registry.record({ alias = "canary", side = "old" }, { ok = true, seconds = 0.1 }) end
local st = registry.migration_state("canary")
print(st.share, st.rolled_back and st.rolled_back.reason)
]])
    local r = helpers.run(("%s --sandbox --store %s --policies %s %s"):format(helpers.resil, db, dir, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":5: store:set: key \"models:migration:.-reserved", l[1])
    assert.matches("^false\t.-" .. name .. ":6: store:get: key \"models:migration:", l[2])
    assert.matches("^false\t.-registry%.reset_migration is not allowed in the sandbox", l[3])
    assert.matches("^false\t.-" .. name .. ":9: resil%.keep: \"policies%.registry%.migrations\" is the policies' state",
      l[4])
    assert.are.equal("0.5", l[5])
    assert.are.equal("0\terror_rate", l[6])
    -- and a process outside the sandbox on the same store reads the rollback the registry wrote
    local out = helpers.run_script([[
local resil = require "resil"
local st = require("policies.registry").migration_state("canary")
print(st.share, st.rolled_back and st.rolled_back.reason, resil.store():get(st.key .. ":rolled_back") ~= nil)
]], ("--store %s --policies %s"):format(db, dir))
    assert.are.equal("0\terror_rate\ttrue\n", out.stdout, out.stderr)
  end)
end)

describe("--sandbox and a gateway key's budget and buckets", function()
  it("refuses a script key:NAME budgets and gateway:* buckets; its own names stay its own", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local function try(f) local ok, err = pcall(f) print(ok, ok and "" or tostring(err)) end
try(function() resil.budget("key:team", { limit = 100 }):reserve(100) end)
try(function() resil.budget("key:team") end)
try(function() resil.bucket("gateway:key_0123456789ab:rpm", { rate = 1, per = 60, burst = 1, shared = true }):try(1) end)
try(function() resil.bucket("gateway:key_0123456789ab:tpm") end)
local b = resil.budget("team", { limit = 1 })
local t = assert(b:reserve(0.5))
t:settle(0.25)
print(resil.bucket("mine", { rate = 1, per = 60, burst = 1 }):try(1))
-- nor by renaming one of its own (the name is the key in the store)
local sb = resil.bucket("mine-shared", { rate = 1, per = 60, burst = 1, shared = true })
try(function() b.name = "key:team" end)
try(function() sb.label = "gateway:key_0123456789ab:rpm" end)
try(function() sb.try = function() return true end end)
print(b.name, sb:name(), resil.budget("team").name)
]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(helpers.resil, db, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":3: resil%.budget: .-key:team.-reserved", l[1])
    assert.matches("^false\t.-" .. name .. ":4: resil%.budget: .-key:team", l[2])
    assert.matches("^false\t.-" .. name .. ":5: resil%.bucket: .-gateway:key_0123456789ab:rpm.-reserved", l[3])
    assert.matches("^false\t.-" .. name .. ":6: resil%.bucket: ", l[4])
    assert.matches("^true", l[5])
    assert.matches("^false\t.-" .. name .. ":13: a budget's name and methods are the host's: name cannot be set", l[6])
    assert.matches("^false\t.-" .. name .. ":14: a shared bucket's methods and name are the host's: label", l[7])
    assert.matches("^false\t.-" .. name .. ":15: a shared bucket's methods and name are the host's: try", l[8])
    assert.are.equal("team\tmine-shared\tteam", l[9])
  end)

  -- (a ticket's budget and id were fields: a script settled its own ticket as a key's budget's, or
  -- as another ticket, and spent the key's money or freed its hold)
  it("refuses a script's ticket renamed to a key's budget, or to another ticket", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local function try(f) local ok, err = pcall(f) print(ok, ok and "" or tostring(err)) end
local t = assert(resil.budget("mine", { limit = 100, per = "day" }):reserve(0.01))
try(function() t.budget = { name = "key:team" } end)
try(function() t.id = "key:team:x:1" end)
print(t:settle(4.5), t.budget.name, t.id:match("^mine:") ~= nil)
]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(helpers.resil, db, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":4: a ticket's budget and id are the host's: budget cannot be set", l[1])
    assert.matches("^false\t.-" .. name .. ":5: a ticket's budget and id are the host's: id cannot be set", l[2])
    assert.are.equal("true\tmine\ttrue", l[3])
    -- the key's budget spent nothing; the script's own budget the 4.5
    local out = helpers.run_script([[
local resil = require "resil"
print(("%g %g"):format(resil.budget("key:team", { limit = 5, per = "day" }):state().spent,
  resil.budget("mine", { limit = 100, per = "day" }):state().spent))
]], ("--store %s"):format(db))
    assert.are.equal("0 4.5\n", out.stdout, out.stderr)
  end)

  -- (the methods read the name off `self`: a script's own table, with a name of its choosing and its
  -- budget or bucket as __index, passed as self reserved and settled in a key's budget and took a
  -- key's rpm; a table whose metatable's __eq said yes passed acquire_all's check as a shared bucket)
  it("refuses a script's own table passed to a budget's, ticket's or shared limit's methods as self", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local function try(f) local ok, err = pcall(f) print(ok, ok and "" or tostring(err)) end
local b = resil.budget("mine", { limit = 100, per = "day" })
local t = assert(b:reserve(0.01))
local sb = resil.bucket("mine-shared", { rate = 1, per = 60, burst = 1, shared = true })
local br = resil.breaker("mine-breaker", { shared = true, open_for = 600 })
local KEY_RPM = "gateway:key_0123456789ab:rpm"
try(function() local fake = setmetatable({ name = "key:team" }, { __index = b }); fake:reserve(4.5) end)
try(function() b.state({ name = "key:team" }) end)
try(function() t.settle(setmetatable({ budget = { name = "key:team" } }, { __index = t }), 3) end)
try(function() sb.try(setmetatable({ label = KEY_RPM }, { __index = sb }), 1) end)
try(function() br.record(setmetatable({ label = "gateway:x" }, { __index = br }), false) end)
local liar = setmetatable({}, { __eq = function() return true end })
try(function() resil.acquire_all({ { setmetatable({ label = KEY_RPM }, setmetatable({ __index = sb }, liar)), 1 } },
  { timeout = 0 }) end)
print(b:reserve(1) ~= nil, t:settle(0.01), sb:try(1), br:state())
]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(helpers.resil, db, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":8: budget:reserve: self is not a budget of the host's", l[1])
    assert.matches("^false\t.-" .. name .. ":9: budget:state: self is not a budget of the host's", l[2])
    assert.matches("^false\t.-" .. name .. ":10: ticket:settle: self is not a ticket of the host's", l[3])
    assert.matches("^false\t.-" .. name .. ":11: bucket:try: self is not a shared bucket of the host's", l[4])
    assert.matches("^false\t.-" .. name .. ":12: breaker:record: self is not a shared breaker of the host's", l[5])
    assert.matches("^false\t.-self is not a shared bucket of the host's", l[6])
    assert.are.equal("true\ttrue\ttrue\tclosed", l[7])
    -- the key's budget holds and spent nothing, its rpm bucket is full
    local out = helpers.run_script([[
local resil = require "resil"
local st = resil.budget("key:team", { limit = 5, per = "day" }):state()
print(("%g %g"):format(st.spent, st.reserved),
  (resil.bucket("gateway:key_0123456789ab:rpm", { rate = 1, per = 60, burst = 1, shared = true }):try(1)))
]], ("--store %s"):format(db))
    assert.are.equal("0 0\ttrue\n", out.stdout, out.stderr)
  end)

  -- (on SQLite a ledger row's cost counts in its budget's spend: a row of a script's own spent a key's)
  it("refuses a script's cost row in a key's budget", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print(pcall(function() resil.cost.record({ provider = "openai", model = "m", usd = 4.5, budget = "key:team",
  period = os.date("!%Y-%m-%d") }) end))
print(resil.cost.record({ provider = "openai", model = "m", usd = 1, budget = "mine", period = os.date("!%Y-%m-%d") }))
]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(helpers.resil, db, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    local name = script:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":2: resil%.cost%.record: budget \"key:team\" is a gateway key's", l[1])
    assert.are.equal("true", l[2])
    local out = helpers.run_script([[
local resil = require "resil"
print(("%g %g"):format(resil.budget("key:team", { limit = 5, per = "day" }):state().spent,
  resil.budget("mine", { limit = 100, per = "day" }):state().spent))
]], ("--store %s"):format(db))
    assert.are.equal("0 1\n", out.stdout, out.stderr)
  end)

  it("gateway --sandbox still keeps a key's budget and rpm, and its config cannot take them", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ reply = "served" }))
    finally(function() m:stop() end)
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name team --budget 5/day --rpm 2 --concurrency 1 --store %s")
      :format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    local config = helpers.write(dir .. "/gateway_conf.lua", ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      print("config", pcall(function() local b = require("resil").budget("key:team", { limit = 0 }) return b end))
      print("semaphore", pcall(function() local s = require("resil").semaphore("gateway:total:4", { size = 4 }) return s end))
      -- (the gateway's permits are not listed to it either: it could release those it never took)
      require("resil").background(function()
        for n = 1, math.huge do
          local seen = {}
          for name in pairs(require("resil").semaphores()) do seen[#seen + 1] = name end
          io.stderr:write(("scan %%d [%%s]\n"):format(n, table.concat(seen, ",")))
          require("resil").sleep(0.05)
        end
      end)
      return { key_cache = 0, models = { fast = "openai/gpt-4o-mini" } }
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
    assert.matches("config\tfalse\t.-gateway_conf%.lua:2: resil%.budget: .-key:team", helpers.slurp(log))
    local function chat()
      return assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
        body = json.encode({ model = "fast", messages = { { role = "user", content = "hi" } } }),
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } }))
    end
    local statuses = {}
    for i = 1, 3 do
      local res = chat()
      statuses[i] = res.status
      if i == 1 then assert.are.equal(200, res.status, res.body .. helpers.slurp(log)) end
    end
    assert.are.same({ 200, 200, 429 }, statuses)
    -- (two scans after the calls: the key's permits' semaphore exists by then)
    local function last_scan() return tonumber(helpers.slurp(log):match(".*scan (%d+)")) or 0 end
    local after = last_scan()
    assert(helpers.wait_until(function() return last_scan() >= after + 2 end, 10), helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):match("scan %d+ %[[^%]]-gateway:"), helpers.slurp(log))
    assert.matches("semaphore\tfalse\t.-gateway_conf%.lua:3: resil%.semaphore: .-gateway:total:4", helpers.slurp(log))
    -- the key's budget was reserved against and settled by the gateway, under its name
    local out = helpers.run(("%s budgets show key:team --store %s --json"):format(helpers.resil, db))
    assert.are.equal(0, out.code, out.stderr)
    assert.are.equal("key:team", json.decode(out.stdout).name)
  end)
end)

-- Each of the host's Lua classes was its own __index (Budget.__index = Budget): `obj.__index` gave
-- a script the methods table every object of the class shares, past the hidden metatables.
describe("--sandbox and the host's classes", function()
  it("does not give a script their methods table through an object's __index", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local b = resil.budget("b", { limit = 1 })
local objs = { resil.store(), b, (b:reserve(0.1)), resil.metrics.counter("app_z_total"),
  resil.bucket("sb", { rate = 1, per = 60, burst = 1, shared = true }), resil.breaker("sbr", { shared = true }) }
for _, o in ipairs(objs) do print(type(o.__index) ~= "table") end
print(pcall(function() b.__index.reserve = function() return "forged" end end))
print(resil.budget("other", { limit = 0 }):reserve(5))
]])
    local r = helpers.run(("%s --sandbox --store %s/s.db %s"):format(helpers.resil, dir, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local l = lines_of(r.stdout)
    for i = 1, 6 do assert.are.equal("true", l[i], r.stdout) end
    assert.matches("^false\t.-attempt to index a %a+ value", l[7])
    assert.matches("^nil\t.-budget", l[8])
  end)
end)
