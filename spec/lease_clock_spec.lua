-- Leases on Redis follow the server's clock, not each host's: two hosts sharing a Redis store
-- whose clocks are a minute apart agree on whose lease has lapsed. Real processes against a real
-- redis-server; "another host" is a process in a pid namespace of its own (judged by its lease,
-- not its pid), and a host's clock is its process's wall clock set off by an LD_PRELOAD shim
-- (clock_gettime, gettimeofday and time: Linux's time namespaces do not move the wall clock).
-- Before, a host a minute ahead took every live holder's lease (30 s) for lapsed: it took over
-- their runs (the step ran twice) and freed their budget holds (the budget spent twice); a host
-- a minute behind waited a minute more for a killed holder.
local helpers = require "spec.helpers"

local can_unshare = os.execute("unshare -p -f --mount-proc true > /dev/null 2>&1") == true
local describe_ns = can_unshare and describe or pending

describe_ns("leases on Redis between hosts whose clocks differ", function()
  local redis, shim
  setup(function()
    redis = helpers.redis_server()
    shim = helpers.clock_skew_shim()
  end)
  teardown(function() if redis then redis.stop() end end)

  -- host A: a process in a pid namespace of its own, its clock right -> pid (of unshare: a KILL
  -- kills the script too), output
  local function host_a(source, opts, args)
    local saved = helpers.resil
    helpers.resil = "unshare -p -f --mount-proc --kill-child=KILL " .. saved
    local pid, out = helpers.start(source, opts, args)
    helpers.resil = saved
    finally(function() os.execute("kill -KILL " .. pid .. " 2> /dev/null") end)
    return pid, out
  end
  -- host B: a script run to its end with its clock `skew` seconds off
  local function host_b(skew, source, opts, args)
    return helpers.run(("CLOCK_SKEW=%s ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s %s %s %s"):format(
      skew, shim, helpers.resil, opts, helpers.write(helpers.tmpname(".lua"), source), args or ""))
  end
  local function started(out, what)
    assert(helpers.wait_until(function() return helpers.slurp(out):match(what) ~= nil end, 20), helpers.slurp(out))
  end

  it("a host a minute ahead does not take over a live holder's run (its step would run twice)", function()
    local log, go = helpers.tmpname(".log"), helpers.tmpname(".go")
    local opts = ("--store %s --run skewed --log-level off"):format(redis.url())
    local script = [[
local resil = require "resil"
local log, go = arg[1], arg[2]
resil.step("pay", function()
  local f = io.open(log, "a"); f:write("ran by ", arg[3], "\n"); f:close()
  print("started"); io.stdout:flush()
  while go ~= "" and not io.open(go) do resil.sleep(0.01) end
  return arg[3]
end)
print("done")
]]
    local _, out = host_a(script, opts, ("%s %s A"):format(log, go))
    started(out, "started")
    local b = host_b(60, script, opts, ("%s '' B"):format(log))
    assert.are.equal(1, b.code, b.stdout)
    assert.matches("run_held: run skewed is held by pid 1 on host ", b.stderr, 1, true)
    assert.are.equal("ran by A\n", helpers.slurp(log))
    helpers.write(go, "")
    started(out, "done")
  end)

  it("a host a minute ahead does not free a live holder's budget hold (the budget spent twice)", function()
    local opts = ("--store %s --log-level off"):format(redis.url())
    local _, out = host_a([[
local resil = require "resil"
assert(resil.budget("skewed", { limit = 1 }):reserve(0.8)) -- (a hold of 600 s: far from its end by either clock)
print("held"); io.stdout:flush()
while true do resil.sleep(1) end
]], opts)
    started(out, "held")
    local b = host_b(60, [[
local resil = require "resil"
local t, err = resil.budget("skewed", { limit = 1 }):reserve(0.5)
print(t and "reserved" or err.kind)
]], opts)
    assert.are.equal(0, b.code, b.stderr)
    assert.are.equal("budget_exceeded\n", b.stdout)
  end)

  it("a host a minute behind takes over a killed holder's run once its lease has lapsed, not a minute later",
    function()
    local log = helpers.tmpname(".log")
    local opts = ("--store %s --run behind --log-level off"):format(redis.url())
    local script = [[
local resil = require "resil"
resil.store_config({ lease = 1 })
resil.step("pay", function()
  local f = io.open(arg[1], "a"); f:write("ran by ", arg[2], "\n"); f:close()
  print("started"); io.stdout:flush()
  if arg[2] == "A" then while true do resil.sleep(1) end end
  return arg[2]
end)
]]
    local pid, out = host_a(script, opts, log .. " A")
    started(out, "started")
    os.execute("kill -KILL " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    -- B tries until it takes the run: a second or so (its lease, on the server's clock) after
    -- the kill; by B's own clock it would be a minute
    local b
    assert(helpers.wait_until(function()
      b = host_b(-60, script, opts, log .. " B")
      return b.code == 0
    end, 20), b.stderr)
    assert.are.equal("ran by A\nran by B\n", helpers.slurp(log))
  end)
end)
