local helpers = require "spec.helpers"
local R = helpers.resil

-- the embedding API's side is tests/call_test.c (each refusal from C); this
-- is the command's: off by default for its own scripts, --sandbox turns it on
describe("resil-lua --sandbox", function()
  it("is off by default: the command's scripts get the whole standard library", function()
    local r = helpers.run(R .. [[ -e "print(type(os.execute), type(io.popen), type(debug.getinfo))"]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("function\tfunction\tfunction\n", r.stdout)
  end)

  it("refuses os.execute, io.popen and debug, naming the function and the script's line", function()
    for _, case in ipairs({
      { "os.execute('true')", "os.execute is not allowed in the sandbox" },
      { "io.popen('ls')", "io.popen is not allowed in the sandbox" },
      { "debug.getinfo(1)", "debug.getinfo is not allowed in the sandbox" },
      { "require 'lfs'", 'require "lfs" is not allowed in the sandbox' },
      -- (before: its unwatched(fn) ran a loop the watchdog never stopped, --max-task-seconds or not)
      { "require('resil.core.watchdog').unwatched(function() while true do end end)",
        'require "resil.core.watchdog" is not allowed in the sandbox' },
      -- (before: its methods table was every local breaker's, an isolated one let through)
      { "require('resil.core.breaker').methods.allow = function() return true end",
        'require "resil.core.breaker" is not allowed in the sandbox' },
    }) do
      local script = helpers.tmpname(".lua")
      helpers.write(script, "local x = 1\n" .. case[1] .. "\n")
      local r = helpers.run("timeout -s KILL 20 " .. R .. " --sandbox --max-task-seconds 1 " .. script)
      os.remove(script)
      assert.are.equal(1, r.code, case[1])
      assert.matches(script:gsub("%p", "%%%0") .. ":2: " .. case[2]:gsub("%p", "%%%0"), r.stderr)
    end
  end)

  -- (before: "[resil prelude]:1186: module 'policies.retyr' not found", the sandbox's require's own
  -- line, where the script's or the policy's was meant; without --sandbox the line was right)
  it("names the script's or the policy's line for a module that is not there", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/uses.lua", "local x = 1\nlocal nowhere = require 'policies.nowhere'\nreturn nowhere\n")
    local script = helpers.tmpname(".lua")
    for _, case in ipairs({
      { "require 'policies.retyr'", script .. ":2: module 'policies.retyr' not found" },
      { "require 'resil.nowhere'", script .. ":2: module 'resil.nowhere' not found" },
      { "require 'policies.uses'", dir .. "/uses.lua:2: module 'policies.nowhere' not found" },
    }) do
      helpers.write(script, "local x = 1\n" .. case[1] .. "\n")
      for _, sandbox in ipairs({ "--sandbox", "" }) do
        local r = helpers.run(("timeout -s KILL 20 %s %s --policies %s %s"):format(R, sandbox, dir, script))
        assert.are.equal(1, r.code, case[1])
        assert.matches(case[2]:gsub("%p", "%%%0"), r.stderr, nil, sandbox .. " " .. case[1])
      end
    end
    os.remove(script)
  end)

  it("still runs resil, the safe libraries and the shipped policies", function()
    local r = helpers.run(R .. [[ --sandbox -e "local retry = require 'policies.retry' print(type(retry), ]]
      .. [[require('resil').version ~= nil, string.rep('a', 2), math.max(1, 2))"]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("table\ttrue\taa\t2\n", r.stdout)
  end)

  it("makes no SQLite file outside its folders: not by a store URL, resil.sqlite nor SQL's ATTACH", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local own = dir .. "/own.db"
    local function run(code)
      local script = helpers.write(helpers.tmpname(".lua"), "local resil = require 'resil'\n" .. code .. "\n")
      local r = helpers.run(("%s --sandbox --store %s %s"):format(R, own, script))
      os.remove(script)
      return r, script
    end
    -- (before: each made the file, and its folders, where the script said, with rows of the script's text:
    -- a line for cron, or a shell's profile, in a file it could name)
    for _, case in ipairs({
      { ("resil.store_config({ url = %q })"):format(dir .. "/away/x.db"), dir .. "/away" },
      { ("resil.store(%q)"):format("sqlite://" .. dir .. "/y.db?timeout=1"), dir .. "/y.db" },
      { ("resil.sqlite.open(%q)"):format(dir .. "/z.db"), dir .. "/z.db" },
      { ("resil.sqlite.open(%q)"):format("file:" .. dir .. "/u.db?mode=rwc"), dir .. "/u.db" },
    }) do
      local r, script = run(case[1])
      assert.are.equal(1, r.code, case[1])
      assert.matches(script:gsub("%p", "%%%0") .. ":2: store: %S*" .. dir:gsub("%p", "%%%0") ..
        "/%S+ is outside the folders the sandbox may write in", r.stderr)
      assert.is_nil(io.open(case[2]), case[2] .. " was made")
    end
    -- the host's own store is the script's to use through resil.store, never by its SQL (the
    -- store object carries no backend); SQL the script may run (a database of its own, here
    -- :memory:, the one it may open without sandbox_dirs) has no ATTACH
    local r = run(([[
assert(resil.store():set("k", "v"))
print(resil.store().backend)
local db = assert(resil.sqlite.open(":memory:"))
local ok, err = pcall(db.now, db, function(tx) tx:exec(("ATTACH DATABASE %%q AS e"):format(%q)) end)
print(ok, tostring(err):match("too many attached databases") ~= nil or tostring(err))
print(resil.store():get("k"))]]):format(dir .. "/evil.db"))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("nil\nfalse\ttrue\nv\n", r.stdout)
    assert.is_nil(io.open(dir .. "/evil.db"), "ATTACH made a file")
    os.execute("rm -rf " .. dir)
  end)

  -- (before: getmetatable(resil.store()) gave the store's methods, which the host's own modules
  -- call: a script that replaced get had the gateway's key lookups read its answers)
  it("keeps the store's methods out of a script's reach", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local store = resil.store()
print(getmetatable(store), (pcall(setmetatable, store, {})))
assert(store:set("k", "v"))
print(store:get("k"))]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, helpers.tmpname(".db"), script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\tfalse\nv\n", r.stdout)
  end)

  -- (before: a method set on the store object, which every caller shares, was what the host's
  -- own modules called: the gateway's key lookup read a forged record for any key)
  it("keeps a method set on the store object from the host's own modules", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local store = resil.store()
print((pcall(function() store.get = function() return '{"name":"forged"}' end end)))
print(require("resil.keys").lookup(("0"):rep(64)))]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, helpers.tmpname(".db"), script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\nnil\n", r.stdout)
  end)

  it("writes no other file a script names: the metrics file, the run report", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
print(pcall(resil.metrics.write_file, %q))
print(pcall(resil.metrics.export, { file = %q }))
print(pcall(require, "resil.report"))
]]):format(dir .. "/a.prom", dir .. "/b.prom"))
    -- the operator's --metrics-file is written all the same
    local r = helpers.run(("%s --sandbox --metrics-file %s/given.prom %s"):format(R, dir, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    -- (before: each file written, renamed over whatever was at the path; the report's writer reachable)
    assert.matches("^false\tresil%.metrics%.write_file: %S+/a%.prom is outside the folders the sandbox may write in",
      lines[1])
    assert.matches("^false\tresil%.metrics%.export: %S+/b%.prom is outside the folders", lines[2])
    assert.matches('^false\trequire "resil.report" is not allowed in the sandbox', lines[3])
    assert.is_nil(io.open(dir .. "/a.prom"))
    assert.is_nil(io.open(dir .. "/b.prom"))
    assert.matches("resil_", helpers.slurp(dir .. "/given.prom"))
    os.execute("rm -rf " .. dir)
  end)

  it("writes its log lines to no file outside its folders: resil.log.output is io.open's", function()
    local dir, allowed = helpers.tmpname(".d"), helpers.tmpname(".ok")
    assert(os.execute("mkdir -p " .. dir .. " " .. allowed))
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
print(pcall(resil.log.output, %q))
resil.log.warn("a line of the script's choosing")
print(pcall(resil.log.output, %q))
resil.log.warn("in its folder")
print(pcall(resil.log.output, "stderr"))
]]):format(dir .. "/escape.log", allowed .. "/own.log"))
    local r = helpers.run(("%s --sandbox --sandbox-dir %s %s"):format(R, allowed, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    -- (before: true, and the file made, 0644, anywhere the process may write, and appended to: a
    -- shell's profile, a cron folder, another program's data)
    assert.matches("^false\tresil%.log%.output: %S+/escape%.log is outside the folders the sandbox may write in",
      lines[1])
    assert.is_nil(io.open(dir .. "/escape.log"))
    assert.matches("a line of the script's choosing", r.stderr, 1, true)
    assert.are.equal("true\ttrue", lines[2])
    assert.matches('"msg":"in its folder"', helpers.slurp(allowed .. "/own.log"), 1, true)
    assert.are.equal("true\ttrue", lines[3])
    os.execute("rm -rf " .. dir .. " " .. allowed)
  end)

  it("never lets a script write the host's own store but through the store: the ledger stays", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local store = dir .. "/state.db"
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true })
print(pcall(resil.metrics.write_file, %q))
print(pcall(io.open, %q, "w"))
print(pcall(io.open, %q, "a"))
]]):format(store, store, store .. "-wal"))
    -- (before: the store's path, let through for the store, was let through for any file: the
    -- metrics written over state.db, and `resil-lua costs` said "file is not a database")
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.matches("^false\tresil%.metrics%.write_file: %S+state%.db is the host's own store", lines[1])
    assert.matches("^false\t[^\n]*io%.open: %S+state%.db is the host's own store", lines[2])
    assert.matches("^false\t[^\n]*io%.open: %S+state%.db%-wal is the host's own store", lines[3])
    local costs = helpers.run(("%s costs --store %s"):format(R, store))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("%$1%.500000", costs.stdout)
    os.execute("rm -rf " .. dir)
  end)

  -- (before: resil.sqlite.open was let through for the host's own store's path, as the store's
  -- own open was: a sandboxed script opened it so and ran its own SQL there, the ledger's rows
  -- deleted. The store's own open is the host's private table's now, src/resil.c)
  it("never lets a script open the host's own store with resil.sqlite: the ledger stays", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local store = dir .. "/state.db"
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true })
print(pcall(function()
  local db = assert(resil.sqlite.open(%q))
  return db:tx(function(tx) tx:exec("DELETE FROM costs") return "deleted" end)
end))
]]):format(store))
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^false\t[^\n]*state%.db is the host's own store", r.stdout)
    local costs = helpers.run(("%s costs --store %s"):format(R, store))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("%$1%.500000", costs.stdout)
    os.execute("rm -rf " .. dir)
  end)

  -- Every way a script had to the host's store's raw db (SQLite) or connection (Redis), each
  -- tried, and what it got used as a script would (DELETE FROM costs, FLUSHDB). Before: the store
  -- object carried its backend (resil.store().backend.db, .conn); require "resil.store_sqlite"
  -- gave the backend's open (the store's path let through) and the methods table every backend
  -- calls; the host's modules handed backends, at the time of the call, to resil.background,
  -- resil.spawn, resil.owner's and resil.costs' functions, which a script may replace; and
  -- resil.redis.connect reached the store's Redis server by any of its names.
  local ROUTES = [[
local resil = require "resil"
local got = {} -- the raw dbs and connections the script laid hands on
-- (anywhere in what it holds: fields, keys and metatables, a few tables deep)
local function take(v, how, seen, depth)
  seen, depth = seen or {}, depth or 0
  if type(v) ~= "table" or seen[v] or depth > 5 then return end
  seen[v] = true
  local raw = rawget(v, "db") or rawget(v, "conn")
  if raw ~= nil and not got[how] then got[how], got[#got + 1] = true, { raw = raw, how = how } end
  for k, x in next, v do
    take(k, how, seen, depth + 1)
    take(x, how, seen, depth + 1)
  end
  take(getmetatable(v), how, seen, depth + 1)
end
local function spy(t, name, how)
  local real = t[name]
  pcall(function() -- (a host module's table is read only: refused)
    t[name] = function(...)
      for i = 1, select("#", ...) do take(select(i, ...), how) end
      return real(...)
    end
  end)
end
spy(resil, "background", "resil.background")
spy(resil, "spawn", "resil.spawn")
local owner = require "resil.owner"
for _, name in ipairs({ "keep", "drop", "lease_due", "lease_written" }) do spy(owner, name, "resil.owner." .. name) end
spy(require "resil.costs", "write_later", "resil.costs.write_later")
local backends = {}
for _, name in ipairs({ "store_sqlite", "store_redis" }) do
  local m = require("resil." .. name)
  backends[name] = m
  if type(m) == "table" then -- (its methods: every backend's)
    for k, f in pairs(m) do if type(f) == "function" and k ~= "open" then spy(m, k, "resil." .. name) end end
  end
end
-- the store used as a script may: once, a step, a budget, shared limits, the ledger (a row waited
-- for and one not); then what it was handed
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true })
assert(resil.once("k", function() return 1 end))
assert(resil.step("s", function(...) take({ ... }, "a step's arguments") return 1 end))
local budget = resil.budget("b", { limit = 10 })
local ticket = assert(budget:reserve(0.1))
ticket:settle(0.05, { provider = "openai", model = "gpt-4o-mini", wait = false })
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 0.25, wait = false })
local bucket = resil.bucket("rpm", { rate = 10, per = 60, burst = 5, shared = true })
assert(bucket:acquire(1))
local breaker = resil.breaker("cb", { shared = true })
breaker:call(function() return 1 end)
resil.sleep(0.2)
for how, v in pairs({ ["resil.store()"] = resil.store(), ["resil.budget"] = budget, ticket = ticket,
  ["shared bucket"] = bucket, ["shared breaker"] = breaker, resil = resil }) do
  take(v, how)
end
for _, name in ipairs({ "store", "once", "runs", "costs", "budgets", "limits", "owner", "keys", "trace", "metrics" }) do
  local ok, m = pcall(require, "resil." .. name) -- (resil.budgets, `budgets set`'s, is refused)
  if ok then take(m, "require 'resil." .. name .. "'") end
end
local name = STORE:match("^redis") and "store_redis" or "store_sqlite"
local m = backends[name]
if type(m) == "table" and m.open then take(m.open(STORE), "require 'resil." .. name .. "'") end
if not STORE:match("^redis") then
  local ok, db = pcall(resil.sqlite.open, STORE)
  if ok and db then got[#got + 1] = { raw = db, how = "resil.sqlite.open" } end
else
  local ok, c = pcall(resil.redis.connect, { host = "localhost", port = tonumber(STORE:match(":(%d+)/")),
    db = tonumber(STORE:match("/(%d+)$")) })
  if ok and c then got[#got + 1] = { raw = c, how = "resil.redis.connect" } end
end
for _, g in ipairs(got) do
  local raw = g.raw
  local ok = pcall(function()
    if raw.tx then return raw:tx(function(tx) tx:exec("DELETE FROM costs") end) end
    return raw:call("FLUSHDB")
  end)
  print("got", g.how, ok)
end
print(resil.cost.total())
]]

  local function routes_closed(store)
    local script = helpers.write(helpers.tmpname(".lua"), ("local STORE = %q\n"):format(store) .. ROUTES)
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1.8\n", r.stdout) -- (nothing got: no line before the total)
    local costs = helpers.run(("%s costs --store %s"):format(R, store))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("%$1%.800000", costs.stdout)
  end

  it("gives a script no route to the host's store's SQL (SQLite): the ledger stays", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    routes_closed(dir .. "/state.db")
    os.execute("rm -rf " .. dir)
  end)

  it("gives a script no route to the host's store's connection (Redis): the ledger stays", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    routes_closed(redis.url())
  end)

  -- (before: getmetatable("") gave the strings' own metatable, whose __index is the string
  -- table the host's modules call too: a script that replaced string.format there had the host's
  -- metrics writer open, truncate and move away a file outside every folder it may use)
  it("strings' metatable is the script's own: the host's modules never run a script's string functions", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local victim = helpers.write(dir .. "/victim.txt", "precious")
    local store = dir .. "/own.db"
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
local mt = getmetatable("")
local format = mt.__index.format
mt.__index.format = function(f, ...)
  if f == "%%s.%%s.tmp" then return %q end
  return format(f, ...)
end
print(("%%d-%%s"):format(1, "x"), string.format("%%d", 2))
print(pcall(resil.metrics.write_file, %q))
local ok, err = pcall(function() mt.__index = { format = function() return "mine" end } end)
print(ok, err, ("%%d"):format(3))
]]):format(victim, store))
    -- (the operator's --metrics-file is written at the end by the host's writer, past the script's format)
    local r = helpers.run(("%s --sandbox --store %s --metrics-file %s/given.prom %s"):format(R, store, dir, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("precious", helpers.slurp(victim))
    assert.matches("resil_", helpers.slurp(dir .. "/given.prom"))
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("1-x\t2", lines[1])
    assert.matches("^false\tresil%.metrics%.write_file: %S+own%.db is the host's own store", lines[2])
    -- (its view is read only: what the string methods are is not the script's to change)
    assert.matches("^false\t.-strings' metatable cannot be changed in the sandbox\t3$", lines[3])
    os.execute("rm -rf " .. dir)
  end)
end)

-- The store's kv namespace is the scripts' and the host's: the gateway's virtual keys are records
-- "gateway:key:<sha256>" there (src/lua/keys.lua), listed in "gateway:keys". Before: a sandboxed
-- script wrote one with store:set, or called require("resil.keys").add, and minted a key every
-- gateway on the store accepted; it read the index, and `budgets set`'s functions were its to call.
describe("resil-lua --sandbox: the host's own records in the store", function()
  local resil = require "resil"
  local http, json = resil.http, resil.json
  local FORGE = [[
local resil = require "resil"
local store = resil.store()
local hash = resil.crypto.sha256("sk-resil-forged")
local rec = resil.json.encode({ id = "key_forged", name = "forged", hash = hash })
local keys = require "resil.keys"
local function try(what, ok, v) print(what, ok, ok and tostring(v) or v) end
try("get", pcall(store.get, store, "gateway:keys"))
try("incr", pcall(store.incr, store, "gateway:keys:lock", 1))
try("del", pcall(store.del, store, "gateway:keys"))
try("add", pcall(keys.add, { name = "minted" }))
try("list", pcall(keys.list))
try("revoke", pcall(keys.revoke, "alice"))
try("budgets", pcall(require, "resil.budgets"))
print("own", store:set("mine", "v"), store:get("mine"), store:incr("n"), store:del("mine"))
store:set("gateway:key:" .. hash, rec)
]]

  -- the gateway in this process (not sandboxed: the host) on the store; -> its URL
  local function gateway_on(url)
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = url })
    local m = assert(resil.mock.start({ strict = true, reply = "served" }))
    local gateway, ai = helpers.fresh_gateway()
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
      retry = { base = 0.001, cap = 0.005 } })
    gateway.configure({ auth = true, key_cache = 0, models = {} })
    local srv = gateway.serve({ listen = "127.0.0.1:0" })
    finally(function()
      srv:close()
      m:stop()
      resil.store_config({ url = helpers.tmpname(".db") })
      resil.log.level("info")
    end)
    return ("http://127.0.0.1:%d/v1/chat/completions"):format(srv:port())
  end

  local function status(url, key)
    local res = assert(http.request({ method = "POST", url = url, timeout = 10,
      body = json.encode({ model = "gpt-4o-mini", messages = { { role = "user", content = "hi" } } }),
      headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } }))
    return res.status
  end

  local function no_forged_key(store)
    local gw = gateway_on(store)
    local alice = assert(require("resil.keys").add({ name = "alice" })) -- the operator's
    local script = helpers.write(helpers.tmpname(".lua"), FORGE)
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    -- the gateway refuses the forged key, the operator's works; `keys list` lists it alone
    assert.are.equal(401, status(gw, "sk-resil-forged"))
    assert.are.equal(200, status(gw, alice))
    local list = assert(require("resil.keys").list())
    assert.are.equal(1, #list)
    assert.are.equal("alice", list[1].name)
    assert.is_nil(list[1].revoked)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    -- refused, each naming the key (or the function) and why; the script's own keys are its own
    local function refused(call, key)
      return ("^%s\tfalse\t.-store:%s: key \"%s\" is the host's own (keys under \"gateway:\" are reserved): " ..
        "a sandboxed script cannot read or write it"):format(call, call, key):gsub("[%(%)]", "%%%0")
    end
    assert.matches(refused("get", "gateway:keys"), lines[1])
    assert.matches(refused("incr", "gateway:keys:lock"), lines[2])
    assert.matches(refused("del", "gateway:keys"), lines[3])
    assert.matches("^add\tfalse\t.-resil%.keys%.add is not allowed in the sandbox", lines[4])
    assert.matches("^list\tfalse\t.-resil%.keys%.list is not allowed in the sandbox", lines[5])
    assert.matches("^revoke\tfalse\t.-resil%.keys%.revoke is not allowed in the sandbox", lines[6])
    assert.matches('^budgets\tfalse\t.-require "resil.budgets" is not allowed in the sandbox', lines[7])
    assert.are.equal("own\ttrue\tv\t1\ttrue", lines[8])
    -- the forging line fails the script at its line
    assert.are.equal(1, r.code, r.stderr)
    assert.matches(script:gsub("%p", "%%%0") .. ":15: store:set: key \"gateway:key:%x+\" is the host's own", r.stderr)
    -- outside the sandbox a script is the operator's: the host's keys are its to read
    local host = helpers.run(("%s --store %s -e %q"):format(R, store,
      "local resil = require 'resil' print(#resil.json.decode(resil.store():get('gateway:keys')))"))
    assert.are.equal(0, host.code, host.stderr)
    assert.are.equal("1\n", host.stdout)
  end

  it("a script cannot mint a gateway key nor read the host's key records (SQLite)", function()
    no_forged_key(helpers.tmpname(".db"))
  end)

  it("a script cannot mint a gateway key nor read the host's key records (Redis)", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    no_forged_key(redis.url())
  end)
end)

-- The host's modules looked functions up on the resil table when they ran, and a script may
-- replace what it holds. Before: a script that replaced resil.store had the gateway's key lookup
-- read its records, and every ledger row and budget settle of its process written where it said
-- (here an in-memory store: nothing reached the host's); one that replaced resil.now moved the time
-- the host writes with (a settle counted in a period three days on: today's budget showed nothing
-- spent). The host's modules take them at load now (private.store_open, private.store_now).
describe("resil-lua --sandbox: what the host's modules call", function()
  it("is the host's own, whatever a script puts in the resil table: key lookups, the ledger, budgets' days", function()
    local store = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local store, now = resil.store, resil.now
local hash = resil.crypto.sha256("sk-resil-forged")
local forged = resil.json.encode({ id = "key_forged", name = "forged", hash = hash })
resil.store = function() return setmetatable({}, { __index = { get = function() return forged end } }) end
print("lookup", require("resil.keys").lookup(hash))
resil.store = store
resil.now = function() return now() + 3 * 86400 end
resil.store_now = function() return os.time() + 3 * 86400 end
local b = resil.budget("b", { limit = 10, per = "day" })
assert(b:reserve(1)):settle(1, { provider = "openai", model = "gpt-4o-mini", wait = true })
resil.store = function(url, ...) return store(url or ":memory:", ...) end
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true })
]])
    local today = os.date("!%Y-%m-%d")
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("lookup\tnil\n", r.stdout)
    local costs = helpers.run(("%s costs --store %s"):format(R, store))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("total %$2%.500000", costs.stdout)
    local budgets = helpers.run(("%s budgets --store %s"):format(R, store))
    assert.are.equal(0, budgets.code, budgets.stderr)
    local period, spent = budgets.stdout:match("\nb +%$10%.000000 +day +(%S+) +(%S+)")
    assert.is_true(period == today or period == os.date("!%Y-%m-%d"), budgets.stdout) -- (the day the run began or ended)
    assert.are.equal("$1.000000", spent)
  end)

  -- (before: a host module's table was the script's to change, and the host's modules call what it
  -- holds when they run: a script that replaced resil.owner.verdict had its process's store judge
  -- every other process dead, take a live one's once key over and run its paid call again, and the
  -- process that held it lost its result; resil.keys.lookup is the gateway's)
  local function no_takeover(store)
    local release = helpers.tmpname(".release")
    local pid, out = helpers.start(([[
local resil = require "resil"
print(resil.once("pay", function()
  print("started") io.stdout:flush()
  while not io.open(%q) do resil.sleep(0.01) end
  return "paid once"
end))]]):format(release), "--store " .. store)
    finally(function() helpers.write(release, "") os.execute("kill -9 " .. pid .. " 2>/dev/null") end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("started") end, 30), helpers.slurp(out))
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local owner = require "resil.owner"
print(pcall(function() owner.verdict = function() return "dead" end end))
print(pcall(function() require("resil.keys").lookup = function() return { name = "forged" } end end))
print(pcall(function() package.loaded["resil.owner"].verdict = function() return "dead" end end))
print(resil.once({ key = "pay", wait = 0 }, function() return "paid twice" end))]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    helpers.write(release, "")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("nil\tin_progress", (lines[4] or ""):match("^nil\t[%w_]+"), r.stdout)
    assert.matches("paid once", helpers.slurp(out))
    assert.is_nil(helpers.slurp(out):find("lease", 1, true), helpers.slurp(out))
    assert.matches("^false\t.-resil%.owner%.verdict cannot be set in the sandbox: the host's module$", lines[1])
    assert.matches("^false\t.-resil%.keys%.lookup cannot be set in the sandbox", lines[2])
    assert.matches("^false\t.-resil%.owner%.verdict cannot be set in the sandbox", lines[3])
  end

  it("keeps the host's modules' tables out of a script's reach: no live process's once key taken (SQLite)", function()
    no_takeover(helpers.tmpname(".db"))
  end)

  it("keeps the host's modules' tables out of a script's reach: no live process's once key taken (Redis)", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    no_takeover(redis.url())
  end)

  -- (before: getmetatable(budget) gave the methods every budget shares: a script that replaced
  -- reserve there let every budget of its process through, those it never named too (a gateway
  -- key's, in a process that serves both); a budget's own field, resil.budget(name) being every
  -- caller's by that name, did it for that budget; rawset set a store's get past its __newindex;
  -- getmetatable(bucket) gave every local bucket's methods, a shared one's every shared bucket's)
  it("keeps the methods every budget, ticket, store and bucket share out of a script's reach", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local other = resil.budget("other", { limit = 1 })
local mine = resil.budget("mine", { limit = 100 })
local ticket = assert(mine:reserve(1))
local function forged() return ticket end
print(getmetatable(mine), getmetatable(ticket))
pcall(function() getmetatable(mine).reserve = forged end)
print(pcall(function() resil.budget("other").reserve = forged end))
print(pcall(rawset, resil.budget("other"), "reserve", forged))
local t, err = other:reserve(5)
print(t, err and err.kind)
local store = resil.store()
assert(store:set("k", "v"))
print(pcall(rawset, store, "get", function() return "forged" end))
print(store:get("k"))
local mine_bucket = resil.bucket("mine", { rate = 1, per = 60, burst = 1 })
local shared = resil.bucket("shared", { rate = 1, per = 60, burst = 1, shared = true })
print(getmetatable(mine_bucket), getmetatable(resil.breaker("cb", {})), getmetatable(shared))
local others = resil.bucket("others", { rate = 1, per = 60, burst = 1 })
print(others:try(), others:try())
]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, helpers.tmpname(".db"), script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("false\tfalse", lines[1])
    assert.matches("^false\t.-a budget's methods are the host's: reserve cannot be set$", lines[2])
    assert.matches("^false\t.-rawset: the host's objects cannot be changed in the sandbox %(reserve%)$", lines[3])
    assert.are.equal("nil\tbudget_exceeded", lines[4])
    assert.matches("^false\t.-rawset: the host's objects cannot be changed in the sandbox %(get%)$", lines[5])
    assert.are.equal("v", lines[6])
    assert.are.equal("false\tfalse\tfalse", lines[7])
    assert.matches("^true\tfalse", lines[8])
  end)
end)

-- (before: the store's backends, loaded on a store's first use, called what the resil table held
-- then: a sandboxed script's resil.json.encode zeroed the ledger's rows it sent to Redis, its
-- resil.store_options was handed the store's URL (a Redis password in it), and its resil.running
-- and resil.sleep ran in the SQLite backend's open)
describe("resil-lua --sandbox: what the store's backends call", function()
  local function replaced_before_first_use(store)
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local encode, options, running = resil.json.encode, resil.store_options, resil.running
resil.json.encode = function(v, ...)
  if type(v) == "table" and v.micro_usd then v.micro_usd = 0 end
  return encode(v, ...)
end
resil.store_options = function(query, url, kind) print("store_options got " .. url) return options(query, url, kind) end
resil.running = function() print("running called") return running() end
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true })
]])
    local r = helpers.run(("%s --sandbox --store '%s' %s"):format(R, store, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("", r.stdout)
    local costs = helpers.run(("%s costs --store '%s'"):format(R, store))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("total %$1%.500000", costs.stdout)
  end

  it("are the host's, whatever a script put in the resil table before the store's first use (SQLite)", function()
    replaced_before_first_use(helpers.tmpname(".db"))
  end)

  it("are the host's, whatever a script put in the resil table before the store's first use (Redis)", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    replaced_before_first_use(redis.url())
  end)
end)

-- (before: a sandboxed script's resil.store_config{url=} moved its process's ledger rows and
-- budget holds to a store it chose (here :memory:: the operator's store never saw the spend),
-- and {lease=} of a year kept whatever it held from every other machine for a year after it died)
describe("resil-lua --sandbox: resil.store_config", function()
  it("refuses another store URL and a lease out of bounds at the script's line; the host's store keeps the rows",
    function()
    local store = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
resil.store_config({ url = %q, wait = true, lease = 60 })
print(pcall(function() resil.store_config({ url = ":memory:" }) end))
print(pcall(function() resil.store_config({ lease = 365 * 86400 }) end))
print(pcall(function() resil.store_config({ lease = 0.001 }) end))
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true })
]]):format(store))
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, store, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    local at = "^false\t" .. script:gsub("%p", "%%%0")
    assert.matches(at .. ":3: resil%.store_config: url is not allowed in the sandbox: the store is the host's",
      lines[1] or "", 1)
    assert.matches(at .. ":4: resil%.store_config: lease must be 5 to 300 seconds in the sandbox", lines[2] or "")
    assert.matches(at .. ":5: resil%.store_config: lease must be 5 to 300 seconds in the sandbox", lines[3] or "")
    local costs = helpers.run(("%s costs --store %s"):format(R, store))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("total %$1%.500000", costs.stdout)
  end)
end)

-- (before: the Redis backend redacted its URL for its metrics and its down/back log lines with
-- whatever resil.redact held: a sandboxed script's was handed the store's URL, password and all)
describe("resil-lua --sandbox: the store's Redis URL", function()
  it("never reaches a script's resil.redact: the metrics redact it with the host's own", function()
    local dir = helpers.tmpname("-redis")
    os.execute("mkdir -p " .. dir)
    local port, pidfile = helpers.free_port(), dir .. "/redis.pid"
    os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
      "--pidfile %s --requirepass s3cret-pw > /dev/null"):format(port, dir, pidfile))
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() os.execute("kill -9 " .. pid .. "; rm -rf " .. dir) end)
    assert(helpers.wait_until(function()
      return os.execute(("redis-cli -p %d -a s3cret-pw --no-auth-warning ping > /dev/null 2>&1"):format(port)) == true
    end, 10))
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.redact = function(s) print("redact got " .. tostring(s)) return "" end
assert(resil.store():set("k", "v"))
print(resil.metrics.text():match('resil_store_down{store="([^"]*)"}'))
]])
    local r = helpers.run(("%s --sandbox --store redis://:s3cret-pw@127.0.0.1:%d/1 %s"):format(R, port, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.is_nil(r.stdout:find("s3cret", 1, true), r.stdout)
    assert.are.equal(("redis://:[REDACTED]@127.0.0.1:%d/1\n"):format(port), r.stdout)
  end)
end)

describe("a task's coroutine", function()
  -- (before: coroutine.resume on another task's coroutine, waiting on a store write, ran the
  -- host's continuation early, which freed the write's record; the write's commit then read
  -- freed memory and the process died, SIGSEGV; on Redis the reply did)
  local function resumed_by_a_script(flags)
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local s = resil.store()
local victim
local t = resil.spawn(function()
  victim = coroutine.running()
  for i = 1, 3 do assert(s:set("k" .. i, "v" .. i)) end
end)
resil.spawn(function()
  while coroutine.status(victim) ~= "suspended" do resil.yield() end
  print(coroutine.resume(victim, "forged"))
  print(pcall(function() coroutine.close(victim) end))
end)
t:join()
print(s:get("k1"), s:get("k2"), s:get("k3"))
local mine = coroutine.create(function(a) return a + coroutine.yield(a) end)
print(coroutine.resume(mine, 1)) print(coroutine.resume(mine, 2)) print(coroutine.close(mine))
print(coroutine.wrap(function(a) return a * 2 end)(21))
print(pcall(function() coroutine.resume(1) end))
]])
    local r = helpers.run(("timeout -s KILL 20 %s %s --store %s %s"):format(R, flags, helpers.tmpname(".db"), script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("false\tcoroutine.resume: a task's coroutine is resumed by its loop only (join the task, or "
      .. "cancel it)", lines[1])
    assert.matches("^false\t.-:11: coroutine.close: a task's coroutine is resumed by its loop only", lines[2])
    assert.are.equal("v1\tv2\tv3", lines[3])
    assert.are.same({ "true\t1", "true\t3", "true", "42" }, { lines[4], lines[5], lines[6], lines[7] })
    assert.matches("^false\t.-:18: bad argument #1 to 'resume' %(thread expected, got number%)$", lines[8])
  end

  -- (the loop's own check, in C: outside the sandbox a script crashed its own process so)
  it("is resumed by the loop only: a script's resume or close is refused, the task's writes land", function()
    resumed_by_a_script("")
  end)

  it("is resumed by the loop only under the sandbox too", function()
    resumed_by_a_script("--sandbox")
  end)
end)

describe("resil-lua --sandbox: an error object's __tostring", function()
  -- (before: the host described a failed task's error after the task ended, outside every task
  -- and cap: a __tostring that looped hung the process for good, past the watchdog's exit 70)
  it("that loops gives the placeholder: the failed task, the server's 500 and the process go on", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local evil = setmetatable({}, { __tostring = function() while true do pcall(function() while true do end end) end end })
local t = resil.spawn(function() error(evil) end)
local ok, joined = pcall(t.join, t) -- (its error, evil, not printed: the script's own print would loop)
print("joined", ok, joined)
local s = resil.server.listen({ tasks = true, handler = function() error(evil) end })
local r = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(s:port()), timeout = 30 })
print("server", r and r.status)
]])
    local r = helpers.run(("timeout -s KILL 20 %s --sandbox --max-task-seconds 1 %s"):format(R, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("joined\ttrue\tfalse\nserver\t500\n", r.stdout)
    assert.matches("its __tostring failed", r.stderr)
  end)

  -- (before: the cap was not passed on to a coroutine the __tostring resumes, which looped on)
  it("that loops in a coroutine it resumes gives the placeholder too", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local w = coroutine.wrap(function() while true do end end)
local evil = setmetatable({}, { __tostring = function() return w() end })
local t = resil.spawn(function() error(evil) end)
local ok, joined = pcall(t.join, t) -- (its error, evil, not printed)
print("joined", ok, joined)
]])
    local r = helpers.run(("timeout -s KILL 20 %s --sandbox %s"):format(R, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("joined\ttrue\tfalse\n", r.stdout)
  end)
end)

describe("resil-lua --sandbox: a script's own settings", function()
  -- (before: require gave a read-only view of every resil.* module, resil.metrics too, though the
  -- resil table holds that one as it is: the README's metrics.max_series raised when set through
  -- require's table)
  it("are set through require as through the resil table: resil.metrics.max_series", function()
    local r = helpers.run(R .. [[ --sandbox -e "local metrics = require 'resil.metrics' ]]
      .. [[metrics.max_series = 50 print(require('resil').metrics.max_series)"]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("50\n", r.stdout)
  end)
end)

-- (before: costs.lua and runs.lua called resil.json's functions as each row was written: a
-- sandboxed script that replaced resil.json.encode wrote its process's ledger rows' units)
describe("resil-lua --sandbox: the ledger's rows", function()
  it("are written with the host's JSON, whatever a script put in resil.json", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.json.encode = function() return '{"input_tokens":0}' end
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, units = { input_tokens = 100 },
  wait = true })
]])
    local r = helpers.run(("%s --sandbox --store %s %s"):format(R, db, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local units = helpers.run(("sqlite3 %s 'SELECT units FROM costs'"):format(db))
    assert.are.equal(0, units.code, units.stderr)
    assert.are.equal('{"input_tokens":100}\n', units.stdout)
  end)
end)
-- (before: a sandboxed script's resil.store_config{run=, fresh=} named another pipeline's run on
-- the store: here it wiped the nightly run's checkpoints and planted its own step result, which
-- the nightly pipeline's resume then replayed. The host sets its run's script, args and
-- script_path through the private table: src/resil.c's start_main.)
describe("resil-lua --sandbox: the run a script's steps go to", function()
  it("is the host's: store_config{run=, fresh=, script=, args=, script_path=} raise at the script's line", function()
    local store = helpers.tmpname(".db")
    local nightly = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print(resil.step("fetch", function() return "real" end), resil.run.resumed())
if not resil.run.resumed() then error("stopped after fetch") end
]])
    local function run_nightly()
      return helpers.run(("%s --log-level off --store %s --run nightly %s"):format(R, store, nightly))
    end
    local first = run_nightly()
    assert.are.equal(1, first.code, first.stderr)
    assert.are.equal("real\tfalse\n", first.stdout)
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
for _, k in ipairs({ "run", "fresh", "script", "args", "script_path" }) do
  local ok, err = pcall(function() resil.store_config({ [k] = k == "fresh" or (k == "args" and {}) or "nightly" }) end)
  print(k, ok, err)
end
resil.store_config({ run = "nightly", fresh = true })
print(resil.step("fetch", function() return "planted" end))
]])
    local r = helpers.run(("%s --sandbox --log-level off --store %s %s"):format(R, store, script))
    os.remove(script)
    -- the nightly pipeline resumes its own run: its checkpoint is what it recorded
    local again = run_nightly()
    assert.are.equal(0, again.code, again.stderr)
    assert.are.equal("real\ttrue\n", again.stdout)
    assert.are.equal(1, r.code, r.stderr)
    local at = script:gsub("%p", "%%%0")
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    for i, k in ipairs({ "run", "fresh", "script", "args", "script_path" }) do
      assert.matches(("^%s\tfalse\t%s:3: resil%%.store_config: %s is not allowed in the sandbox: the run is the host's")
        :format(k, at, k), lines[i] or "")
    end
    assert.matches(at .. ":6: resil%.store_config: run is not allowed in the sandbox", r.stderr)
    -- the script's own steps still go to its own run (its script and arguments)
    local own = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print(resil.step("n", function() return #arg end), resil.run.resumed(), resil.run.id():match("^[^-]+"))
error("once")
]])
    local o1 = helpers.run(("%s --sandbox --log-level off --store %s %s a b"):format(R, store, own))
    local o2 = helpers.run(("%s --sandbox --log-level off --store %s %s a b"):format(R, store, own))
    os.remove(own)
    assert.are.equal(1, o1.code, o1.stderr)
    local name = own:match("([^/]+)%.lua$")
    assert.are.equal(("2\tfalse\t%s\n"):format(name), o1.stdout)
    assert.are.equal(("2\ttrue\t%s\n"):format(name), o2.stdout)
  end)
end)

-- (before: the read-only views' inner tables were writable. require("resil.store").config.run named
-- another pipeline's run past store_config's checks; resil.metrics.merges.resil_store_down = "x"
-- failed the Redis backend's load, where the host defines that gauge: the process's store would
-- not open, and its ledger rows were lost)
describe("resil-lua --sandbox: the host's settings inside module tables", function()
  it("are read only: the store's config, metrics.merges; README's metrics.max_series is still set (Redis)", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    local url = redis.url()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print(pcall(function() require("resil.store").config.run = "nightly" end))
print(pcall(function() resil.metrics.merges.resil_store_down = "bogus" end))
resil.metrics.max_series = 50
print(resil.run.id() ~= "nightly", resil.metrics.max_series, resil.metrics.merges.resil_store_down)
print(resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 1.5, wait = true }))
]])
    local r = helpers.run(("%s --sandbox --log-level off --store %s %s"):format(R, url, script))
    os.remove(script)
    local costs = helpers.run(("%s costs --store %s"):format(R, url))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("total %$1%.500000", costs.stdout)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    local at = "^false\t" .. script:gsub("%p", "%%%0")
    assert.matches(at .. ":2: resil%.store%.config%.run cannot be set in the sandbox", lines[1] or "")
    assert.matches(at .. ":3: resil%.metrics%.merges%.resil_store_down cannot be set in the sandbox", lines[2] or "")
    assert.are.equal("true\t50\tmax", lines[3])
  end)
end)

-- (before: cjson writes its text with malloc, past the cap, and exits the process when that fails:
-- "Out of memory", exit 255, the script's pcall never reached; a gigabyte first without a ulimit)
describe("resil-lua --sandbox --max-memory: resil.json.encode of a table that holds one table twice, deep", function()
  it("fails the script's call with the cap's error, and the process goes on", function()
    local script = helpers.tmpname(".lua")
    helpers.write(script, [[
local json = require("resil").json
local t = { ("x"):rep(1000) }
for _ = 1, 19 do t = { t, t } end -- (a text of 2^19 copies: half a gigabyte)
print("twice", pcall(json.encode, t))
print("small", json.encode({ a = { 1, 2 }, b = "x" }))
]])
    -- (under a ulimit, so that cjson's half gigabyte fails as it would past the machine's; not under
    -- AddressSanitizer, which reserves terabytes of address space)
    local ulimit = (os.getenv("SAN_FLAGS") or ""):find("address", 1, true) and "" or "ulimit -v 400000 && "
    local r = helpers.run(("%stimeout -s KILL 60 %s --sandbox --max-memory 32M %s"):format(ulimit, R, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("twice\tfalse\tnot enough memory\n", r.stdout, nil, true)
    assert.matches('small\t{"', r.stdout, nil, true)
  end)
end)

-- (before: the sandbox's encode, after cjson refused, walked every path of the value for views of the
-- policies' tables: 2^100 of them for a cycle held twice, and a log line's fields were walked so always)
describe("resil-lua --sandbox: a table that holds itself twice", function()
  it("is cjson's nesting error in resil.json.encode, and a log line's fields, at once", function()
    local script = helpers.tmpname(".lua")
    helpers.write(script, [[
local resil = require "resil"
local cycle = {}
cycle[1], cycle[2] = cycle, cycle
print("encode", select(2, pcall(resil.json.encode, cycle)))
local pricing = require "policies.pricing"
print("with a view", select(2, pcall(resil.json.encode, { cycle, pricing = pricing.models })))
resil.log.info("fields", { cycle = cycle })
print("logged")
]])
    local r = helpers.run(("timeout -s KILL 60 %s --sandbox %s"):format(R, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("encode\t[^\n]*excessive nesting", r.stdout)
    assert.matches("with a view\t[^\n]*excessive nesting", r.stdout)
    assert.matches("logged\n", r.stdout, nil, true)
  end)
end)

-- (before: only the folder of a path was resolved, and the link itself was read or written where it pointed)
describe("resil-lua --sandbox: a symbolic link in an allowed folder (a policy repository's)", function()
  it("is checked where it points: one out of the folders is refused, to read and to write; one in them is not", function()
    local base = helpers.tmpname("-links")
    assert(os.execute(("mkdir -p %s/box %s/policies %s/outside"):format(base, base, base)))
    helpers.write(base .. "/outside/secret.txt", "secret\n")
    helpers.write(base .. "/box/mine.txt", "mine\n")
    assert(os.execute(("cd %s && ln -s ../outside/secret.txt policies/data.txt && ln -s ../outside/made.txt box/notes.txt"
      .. " && ln -s ../outside/made.db box/state.db && ln -s mine.txt box/alias.txt"):format(base)))
    helpers.write(base .. "/links.lua", [[
print("read", pcall(function() return assert(io.open("policies/data.txt")):read("a") end))
print("lines", pcall(function() return io.lines("policies/data.txt")() end))
print("write", pcall(function() local f = assert(io.open("box/notes.txt", "w")) f:write("x") f:close() end))
print("sqlite", pcall(require("resil").sqlite.open, "box/state.db"))
print("alias", assert(io.open("box/alias.txt")):read("a"))
]])
    local r = helpers.run(("cd %s && timeout -s KILL 20 %s --sandbox --sandbox-dir box --policies policies links.lua")
      :format(base, R))
    local made = io.open(base .. "/outside/made.txt") or io.open(base .. "/outside/made.db")
    if made then made:close() end
    os.execute("rm -rf " .. base)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('read\tfalse\t[^\n]*io.open%("policies/data.txt"%) is not allowed in the sandbox', r.stdout)
    assert.matches('lines\tfalse\t[^\n]*io.lines%("policies/data.txt"%) is not allowed in the sandbox', r.stdout)
    assert.matches("write\tfalse\t[^\n]*box/notes.txt is outside the folders", r.stdout)
    assert.matches("sqlite\tfalse\t[^\n]*box/state.db is outside the folders", r.stdout)
    assert.matches("alias\tmine\n", r.stdout, nil, true)
    assert.is_nil(made, "a file was made outside the folders")
  end)
end)

-- (before: io.open refused the host's store to write only, and read as bytes it held what a script's
-- store:get is refused: the gateway's keys, its clients' Idempotency-Key answers, the AI cache)
describe("resil-lua --sandbox: the host's own store in a folder the script may read", function()
  it("is not read as bytes by io.open, io.lines or loadfile (nor its -wal); the script's own files are", function()
    local dir = helpers.tmpname("-box")
    assert(os.execute("mkdir -p " .. dir))
    local store = dir .. "/state.db"
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
resil.store():set("note", "A-VALUE-IN-THE-STORE")
for _, path in ipairs({ %q, %q }) do
  print("open", pcall(function() local f = assert(io.open(path, "rb")) return f:read("a"):find("A-VALUE", 1, true) end))
  print("lines", pcall(function() return io.lines(path, 4096)() end))
  print("loadfile", pcall(loadfile, path))
end
local f = assert(io.open(%q, "w")) f:write("mine") f:close()
print("mine", assert(io.open(%q)):read("a"))
]]):format(store, store .. "-wal", dir .. "/mine.txt", dir .. "/mine.txt"))
    local r = helpers.run(("timeout -s KILL 30 %s --sandbox --sandbox-dir %s --store %s %s"):format(R, dir, store, script))
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stderr)
    local refused = 0
    for line in r.stdout:gmatch("[^\n]+") do
      if line:match("^open") or line:match("^lines") or line:match("^loadfile") then
        assert.matches("^%a+\tfalse\t[^\t]*is the host's own store: a sandboxed script reads it only through resil%.store",
          line)
        refused = refused + 1
      end
    end
    assert.are.equal(6, refused)
    assert.matches("mine\tmine\n", r.stdout, nil, true)
  end)
end)

-- (before: a policy folder inside an allowed one was written like any other folder, and a file a script
-- wrote there was required as a policy: the policies' own state, resil.keep "policies.ai.config", its)
describe("resil-lua --sandbox: a policy folder inside a folder the script may write (--sandbox-dir .)", function()
  it("is read only: io.open to write there raises at the script's line, and no policy file is made", function()
    local dir = helpers.tmpname("-proj")
    assert(os.execute(("mkdir -p %s/policies"):format(dir)))
    helpers.write(dir .. "/policies/mine.lua", "return { mine = true }\n")
    helpers.write(dir .. "/esc.lua", [[
local resil = require "resil"
print("write", pcall(function()
  local f = assert(io.open("policies/evil.lua", "w"))
  f:write("return { kept = require('resil').keep('policies.ai.config') }\n")
  f:close()
end))
print("append", pcall(function() assert(io.open("policies/mine.lua", "a")) end))
print("read", require("policies.mine").mine)
local f = assert(io.open("notes.txt", "w")) f:write("ok") f:close()
print("beside", assert(io.open("notes.txt")):read("a"))
]])
    local r = helpers.run(("cd %s && timeout -s KILL 20 %s --sandbox --sandbox-dir . --policies policies esc.lua")
      :format(dir, R))
    local made = io.open(dir .. "/policies/evil.lua")
    if made then made:close() end
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('write\tfalse\tesc.lua:3: io.open("policies/evil.lua") is not allowed in the sandbox: the policy '
      .. "folders are read only to a script", r.stdout, nil, true)
    assert.matches('append\tfalse\tesc.lua:7: io.open("policies/mine.lua") is not allowed', r.stdout, nil, true)
    assert.matches("read\ttrue\nbeside\tok\n", r.stdout, nil, true)
    assert.is_nil(made)
  end)
end)

-- (before: ./policies, where require looks for policies.*, was no policy folder of the sandbox's when it
-- was not there at start: a script made it with a store there, which makes its folders, and wrote a policy)
describe("resil-lua --sandbox: ./policies not there at start, in a folder the script may write", function()
  it("is a policy folder all the same: a file written there raises, and no policy is required from it", function()
    local dir = helpers.tmpname("-proj")
    assert(os.execute(("mkdir -p %s/pol"):format(dir)))
    helpers.write(dir .. "/esc.lua", [[
local resil = require "resil"
assert(resil.store("policies/made.db"))
print("write", pcall(function()
  local f = assert(io.open("policies/evil.lua", "w"))
  f:write("return { kept = type(require('resil').keep('policies.ai.config')) }\n")
  f:close()
end))
print("required", pcall(function() return require("policies.evil").kept end))
]])
    local r = helpers.run(("cd %s && timeout -s KILL 20 %s --sandbox --sandbox-dir . --policies pol esc.lua"):format(dir, R))
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('write\tfalse\tesc.lua:4: io.open("policies/evil.lua") is not allowed in the sandbox: the policy '
      .. "folders are read only to a script", r.stdout, nil, true)
    assert.matches("required\tfalse\t[^\n]*module 'policies.evil' not found", r.stdout)
  end)
end)

-- (before: the refusal read the spec's key, and resil.once read it again: a table whose __index said
-- another key the second time planted an answer under the gateway's key all the same)
describe("resil-lua --sandbox: resil.once with a spec whose key changes as it is read", function()
  it("runs under the key checked: nothing is kept under the gateway's key", function()
    local db = helpers.tmpname(".db")
    local plant = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local reads = 0
local spec = setmetatable({ fingerprint = "f" }, { __index = function(_, k)
  if k == "key" then reads = reads + 1 return reads == 1 and "harmless" or "gateway:key_1:order-9" end
end })
print("plant", pcall(resil.once, spec, function() return "forged" end))
]])
    local check = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print("gateway", resil.once_replay({ key = "gateway:key_1:order-9", fingerprint = "f" }))
print("checked", resil.once_replay({ key = "harmless", fingerprint = "f" }))
]])
    local r1 = helpers.run(("timeout -s KILL 20 %s --sandbox --store %s %s"):format(R, db, plant))
    local r2 = helpers.run(("timeout -s KILL 20 %s --store %s %s"):format(R, db, check))
    assert.are.equal(0, r1.code, r1.stderr)
    assert.are.equal(0, r2.code, r2.stderr)
    assert.matches("gateway\tfalse\n", r2.stdout, nil, true)
    assert.matches("checked\ttrue\tforged\n", r2.stdout, nil, true)
  end)
end)
