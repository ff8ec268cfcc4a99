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
resil.keep("policies.registry.migrations")[key .. ":rolled_back"] = '{"reason":"forged"}'
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
    assert.are.equal("0.5", l[4])
    assert.are.equal("0\terror_rate", l[5])
    -- and a process outside the sandbox on the same store reads the rollback the registry wrote
    local out = helpers.run_script([[
local resil = require "resil"
local st = require("policies.registry").migration_state("canary")
print(st.share, st.rolled_back and st.rolled_back.reason, resil.store():get(st.key .. ":rolled_back") ~= nil)
]], ("--store %s --policies %s"):format(db, dir))
    assert.are.equal("0\terror_rate\ttrue\n", out.stdout, out.stderr)
  end)
end)
