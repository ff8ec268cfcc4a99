-- What a policy starts as it loads (tasks, breaker listeners, metric collectors) belongs to that
-- version: a reload that replaces the version ends them, a failed one keeps them. Before, each
-- reload added a copy: after 20, 21 refreshers ran and 21 listeners fired, each holding its old
-- version, never collected.
local helpers = require "spec.helpers"

-- the state the policies report to, kept across reloads (the main script reads it)
local SEEN = [[
local st = require("resil").keep("seen", function()
  return { running = 0, closed = 0, ticks = 0, by_version = {}, fired = 0, shared_fired = 0, collected = 0,
           versions = setmetatable({}, { __mode = "k" }) }
end)
]]

-- a policy that at load starts a refresher (resil.background), a spawned task, listeners on a
-- breaker and a shared breaker (both kept by name across versions) and a metrics collector
local function pusher(version)
  return SEEN .. ([[
local resil = require "resil"
local M = { version = %d }
st.versions[M] = true
local counted = { __close = function() st.running = st.running - 1; st.closed = st.closed + 1 end }
resil.background(function()
  st.running = st.running + 1
  local _ <close> = setmetatable({}, counted)
  while true do
    resil.sleep(1)
    st.ticks = st.ticks + 1
    st.by_version[M.version] = (st.by_version[M.version] or 0) + 1
  end
end)
resil.spawn(function()
  st.running = st.running + 1
  local _ <close> = setmetatable({}, counted)
  resil.sleep(1e6)
end)
local opts = { window_type = "count", window = 2, min_calls = 2, failure_rate = 0.5, open_for = 5 }
resil.breaker("upstream", opts):on("open", function() st.fired = st.fired + 1; return M end)
resil.breaker("upstream-shared", { shared = true, window_type = "count", window = 2, min_calls = 2,
  failure_rate = 0.5, open_for = 5 }):on("open", function() st.shared_fired = st.shared_fired + 1; return M end)
resil.metrics.collect(function() st.collected = st.collected + 1; return M end)
return M
]]):format(version)
end

local policy_dir = helpers.policy_dir

local function run(dir, source, opts)
  return helpers.run_script(source, ("--policies %s %s"):format(dir, opts or "--log-level off"), dir)
end

-- the main scripts' own helpers: write a policy file, count a weak table
local MAIN = SEEN .. [[
local resil = require "resil"
local dir = arg[1]
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
local function count(t) local n = 0; for _ in pairs(t) do n = n + 1 end; return n end
]]

describe("what a policy starts at load", function()
  it("is ended when a reload replaces its version: after 20 reloads, one copy runs and one version is left",
    function()
      local r = run(policy_dir({ ["pusher.lua"] = pusher(1) }), MAIN .. ([[
resil.clock.virtual()
require "policies.pusher"
local text = %q
for v = 2, 21 do
  write("pusher.lua", (text:gsub("version = 21", "version = " .. v)))
  assert(resil.reload())
end
resil.sleep(0.5) -- (the old versions' tasks are canceled in a task of their own, at once)
collectgarbage(); collectgarbage()
print("running", st.running, "closed", st.closed, "versions", count(st.versions))
st.ticks, st.by_version = 0, {}
resil.sleep(10)
print("ticks", st.ticks, "by", count(st.by_version), st.by_version[require("policies.pusher").version])
for _ = 1, 2 do resil.breaker("upstream"):record(false, 0) end
for _ = 1, 2 do resil.breaker("upstream-shared"):record(false, 0) end
print("fired", st.fired, st.shared_fired)
local exposition = resil.metrics.text()
print("collected", st.collected)
-- the breaker's own metrics (the host's listeners, made as the first version loaded) still count
print(exposition:match('resil_breaker_transitions_total{breaker="upstream",to="open"} %%d+'))
]]):format(pusher(21)))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("running\t2\tclosed\t40\tversions\t1\n" ..
        "ticks\t10\tby\t1\t10\n" ..
        "fired\t1\t1\n" ..
        "collected\t1\n" ..
        'resil_breaker_transitions_total{breaker="upstream",to="open"} 1\n', r.stdout)
      assert.are.equal("", r.stderr)
    end)

  -- (children were not owned: a load-time task's children ran on, one generation per reload)
  it("so is what a task started at load starts, and theirs: after 20 reloads, one generation runs", function()
    local spawner = SEEN .. [[
local resil = require "resil"
local counted = { __close = function() st.running = st.running - 1; st.closed = st.closed + 1 end }
local function child(depth)
  st.running = st.running + 1
  local _ <close> = setmetatable({}, counted)
  if depth < 2 then resil.spawn(child, depth + 1) end -- a grandchild
  resil.sleep(1e6)
end
-- a task that starts a child and a ticker, and ends
resil.spawn(function()
  resil.spawn(child, 1)
  resil.background(function() while true do resil.sleep(1); st.ticks = st.ticks + 1 end end)
  -- what resil.keep's init starts, from such a task too, is kept
  resil.keep("kept ticker", function()
    return { resil.background(function() while true do resil.sleep(1); st.fired = st.fired + 1 end end) }
  end)
end)
return {}
]]
    local r = run(policy_dir({ ["spawner.lua"] = spawner }), MAIN .. [[
resil.clock.virtual()
require "policies.spawner"
for _ = 1, 20 do
  resil.sleep(0.5) -- (the load's task runs, and starts its children)
  assert(resil.reload())
end
resil.sleep(0.5)
collectgarbage(); collectgarbage()
st.ticks, st.fired = 0, 0
resil.sleep(10)
print("running", st.running, "closed", st.closed, "ticks", st.ticks, "kept", st.fired)
os.exit(0) -- (the last version's children would keep the host running)
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("running\t2\tclosed\t40\tticks\t10\tkept\t10\n", r.stdout)
  end)

  it("keeps running when the reload fails; what the failed set started is ended", function()
    local dir = policy_dir({ ["a.lua"] = pusher(1), ["b.lua"] = "return {}" })
    local r = run(dir, MAIN .. ([[
resil.clock.virtual()
require "policies.a"
require "policies.b"
write("a.lua", %q)       -- loads, and starts its tasks
write("b.lua", "return {") -- then this breaks the reload
print(resil.reload())
resil.sleep(0.5)
st.ticks, st.by_version = 0, {}
resil.sleep(3)
print("running", st.running, "closed", st.closed, "ticks", st.by_version[1], st.by_version[2])
for _ = 1, 2 do resil.breaker("upstream"):record(false, 0) end
print("fired", st.fired, "serving", require("policies.a").version)
]]):format(pusher(2)))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^false\treload: .-b%.lua:1:", r.stdout)
    assert.is_nil(r.stdout:find("prelude", 1, true))
    assert.matches("\nrunning\t2\tclosed\t2\tticks\t3\tnil\nfired\t1\tserving\t1\n$", r.stdout)
  end)

  -- SIGHUP's reload runs outside any task, and a cap that stops it leaves its Lua no way to
  -- clean up: C puts the old set back
  it("a reload on SIGHUP that --max-instructions stops keeps the old version's, ends the new one's", function()
    local dir = policy_dir({ ["a.lua"] = pusher(1), ["b.lua"] = "return {}" })
    local log = helpers.tmpname(".log")
    local r = run(dir, MAIN .. ([[
require "policies.a"
require "policies.b"
local pid = io.open("/proc/self/stat"):read("a"):match("^(%%d+)")
write("a.lua", %q)
os.execute("kill -HUP " .. pid)
for _ = 1, 500 do
  if resil.metrics.counter("resil_reloads_total"):value({ result = "ok" }) == 1 then break end
  resil.sleep(0.01)
end
write("b.lua", (%q):gsub("return M\n$", "while true do end\n")) -- starts its tasks, then loops
os.execute("kill -HUP " .. pid)
for _ = 1, 500 do
  if resil.metrics.counter("resil_reloads_total"):value({ result = "failed" }) == 1 then break end
  resil.sleep(0.01)
end
resil.sleep(0.05)
print("running", st.running, "closed", st.closed, "serving", require("policies.a").version)
os.exit(0) -- (version 2's spawned task would keep the host running)
]]):format(pusher(2), pusher(3)), "--max-instructions 1000000 --log-file " .. log)
    assert.are.equal(0, r.code, r.stderr)
    -- the first reload ended version 1's two tasks; the failed one, the two its a.lua started and
    -- the two of b.lua, which looped after starting them
    assert.are.equal("running\t2\tclosed\t6\tserving\t2\n", r.stdout)
    assert.matches("b%.lua:%d+: policy reload ran more than %-%-max%-instructions", helpers.slurp(log))
  end)

  it("leaves calls running on the old version, and the tasks a call starts, to finish", function()
    local handler = function(version)
      return SEEN .. ([[
local resil = require "resil"
local V = %d
resil.background(function() while true do resil.sleep(1) end end)
return {
  handle = function()
    -- started by a call, not at load: no version's
    resil.background(function() while true do resil.sleep(1); st.ticks = st.ticks + 1 end end)
    local child = resil.spawn(function() resil.sleep(2); return "child v" .. V end)
    resil.sleep(1)
    return "v" .. V, select(2, child:join())
  end,
}
]]):format(version)
    end
    local r = run(policy_dir({ ["h.lua"] = handler(1) }), MAIN .. ([[
resil.clock.virtual()
local h = resil.policy "h"
local call = resil.spawn(h.handle)
resil.sleep(0.5)
write("h.lua", %q)
assert(resil.reload())
print(call:join())
st.ticks = 0
resil.sleep(5)
print("ticks", st.ticks)
print(select(2, resil.spawn(h.handle):join()))
]]):format(handler(2)))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\tv1\tchild v1\nticks\t5\nv2\tchild v2\n", r.stdout)
  end)

  it("what resil.keep's init starts is kept, as its table is: one copy across reloads", function()
    local poller = SEEN .. [[
local resil = require "resil"
resil.keep("poller", function()
  return { task = resil.background(function() while true do resil.sleep(1); st.ticks = st.ticks + 1 end end) }
end)
return {}
]]
    local r = run(policy_dir({ ["poller.lua"] = poller }), MAIN .. [[
resil.clock.virtual()
require "policies.poller"
for _ = 1, 5 do assert(resil.reload()) end
resil.sleep(0.5)
st.ticks = 0
resil.sleep(10)
print("ticks", st.ticks)
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("ticks\t10\n", r.stdout)
  end)

  -- (the config ran at start outside any load: what it started there ran on beside each later
  -- version's)
  it("in a gateway, what the config file starts is its version's, from the start on", function()
    local out, log, pidfile = helpers.tmpname(".copies"), helpers.tmpname(".out"), helpers.tmpname(".pid")
    local config = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
local st = resil.keep("spec.copies", function() return { running = 0 } end)
local counted = { __close = function() st.running = st.running - 1 end }
resil.background(function()
  st.running = st.running + 1
  local _ <close> = setmetatable({}, counted)
  while true do
    local f = io.open(%q, "w"); f:write(st.running); f:close()
    resil.sleep(0.02)
  end
end)
return { auth = false }
]]):format(out))
    os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s"):format(
      helpers.resil, helpers.free_port(), config, helpers.tmpname(".db"), log, pidfile))
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10),
      helpers.slurp(log))
    for n = 1, 3 do
      os.execute("kill -HUP " .. pid)
      assert(helpers.wait_until(function()
        local _, reloads = helpers.slurp(log):gsub("policies reloaded", "")
        return reloads == n
      end, 10), helpers.slurp(log))
    end
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out) == "1" end, 10), helpers.slurp(out))
  end)

  -- (a cap leaves no <close> to run: the load it stopped stayed the one under way, and what it
  -- started ran on for good)
  it("a call's first load that --max-instructions stops has what it started ended", function()
    local looping = pusher(1):gsub("return M\n$", "while true do end\n")
    local r = run(policy_dir({ ["looping.lua"] = looping, ["other.lua"] = "return {}" }), MAIN .. [[
resil.clock.virtual()
print(resil.spawn(require, "policies.looping"):join())
require "policies.other" -- (any load after it, or a reload)
resil.sleep(0.5)
print("running", st.running, "closed", st.closed)
]], "--log-level off --max-instructions 1000000")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^false\t[^\n]*looping%.lua:%d+: task %d+ [^\n]*ran more than %-%-max%-instructions", r.stdout)
    assert.matches("\nrunning\t0\tclosed\t2\n$", r.stdout)
  end)

  it("a policy loaded first by a call is its version's too", function()
    local r = run(policy_dir({ ["pusher.lua"] = pusher(1) }), MAIN .. [[
resil.clock.virtual()
-- first loaded inside a task (a request's), then reloaded
resil.spawn(function() return require("policies.pusher").version end):join()
for _ = 1, 3 do assert(resil.reload()) end
resil.sleep(0.5)
print("running", st.running, "closed", st.closed)
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("running\t2\tclosed\t6\n", r.stdout)
  end)
end)
