-- What a Redis store keeps in time follows the server's clock, not each host's: budget holds' ends,
-- a budget's day, the shared buckets' arrival times and the shared breakers' ends, as leases do
-- (spec/lease_clock_spec.lua). Real processes against a real redis-server, a host's clock its
-- process's wall clock set off by an LD_PRELOAD shim. Before, each process wrote and judged these
-- times by its own clock: a host 15 minutes ahead took another's live 600 s hold for ended (the
-- budget spent twice) and found a shared bucket another host had just emptied full again; a host
-- behind saw ended holds count on and waited its lag more for a bucket's next token; a breaker
-- opened by one stayed open its skew more for the others, or was half-open at once.
local helpers = require "spec.helpers"

describe("Redis budget holds and periods, shared buckets and breakers between hosts whose clocks differ", function()
  local redis, shim
  setup(function()
    redis = helpers.redis_server()
    shim = helpers.clock_skew_shim()
  end)
  teardown(function() if redis then redis.stop() end end)

  local function skewed(skew)
    return ("CLOCK_SKEW=%s ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s"):format(skew, shim, helpers.resil)
  end
  -- a process left running, its clock `skew` seconds off -> its output's file
  local function host_live(skew, source, opts)
    local saved = helpers.resil
    helpers.resil = skewed(skew)
    local pid, out = helpers.start(source, opts)
    helpers.resil = saved
    finally(function() os.execute("kill -KILL " .. pid .. " 2> /dev/null") end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("held\n") ~= nil end, 20), helpers.slurp(out))
    return out
  end
  -- a script run to its end with its clock `skew` seconds off
  local function host(skew, source, opts)
    return helpers.run(("%s %s %s"):format(skewed(skew), opts, helpers.write(helpers.tmpname(".lua"), source)))
  end
  local function opts() return ("--store %s --log-level off"):format(redis.url()) end

  local holder = [[
local resil = require "resil"
assert(resil.budget("b", { limit = 1 }):reserve(0.8, { hold = tonumber(arg[1]) }))
print("held"); io.stdout:flush()
while true do resil.sleep(1) end
]]
  local reserver = [[
local resil = require "resil"
local b = resil.budget("b", { limit = 1 })
local st = assert(b:state())
for _, h in ipairs(st.holds) do print(("held for %.0f s more"):format(h.expires_at - resil.store_now())) end
local t, err = b:reserve(0.5)
print(t and "reserved" or err.kind)
]]

  it("a host 15 minutes ahead does not take a live 600 s hold for ended (the budget spent twice)", function()
    local o = opts()
    host_live(0, holder:gsub("tonumber%(arg%[1%]%)", "600"), o)
    local b = host(900, reserver, o)
    assert.are.equal(0, b.code, b.stderr)
    assert.matches("^held for %d+ s more\nbudget_exceeded\n$", b.stdout)
    -- (its end is told in the reader's clock: some 600 s from its now, not 1,500)
    local left = tonumber(b.stdout:match("%d+"))
    assert(left > 500 and left <= 600, b.stdout)
  end)

  it("a host 15 minutes behind takes an ended hold for ended, not 15 minutes later", function()
    local o = opts()
    host_live(0, holder:gsub("tonumber%(arg%[1%]%)", "1"), o)
    local b
    assert(helpers.wait_until(function()
      b = host(-900, reserver, o)
      return b.stdout:match("reserved") ~= nil
    end, 20), b.stdout .. b.stderr)
  end)

  it("a hold made by a host 15 minutes ahead ends on time for the others", function()
    local o = opts()
    host_live(900, holder:gsub("tonumber%(arg%[1%]%)", "1"), o)
    local b
    assert(helpers.wait_until(function()
      b = host(0, reserver, o)
      return b.stdout:match("reserved") ~= nil
    end, 20), b.stdout .. b.stderr)
  end)

  local taker = [[
local resil = require "resil"
local ok, x = resil.bucket("per-minute", { rate = 1, per = 60, burst = 1, shared = true }):try()
print(ok and "taken" or ("refused, %d s"):format(math.ceil(x / 10) * 10)) -- (to the 10 s: the runs take time)
]]

  it("a shared bucket another host emptied is empty for a host 15 minutes ahead (the limit not held)", function()
    local o = opts()
    local a = host(0, taker, o)
    assert.are.equal("taken\n", a.stdout, a.stderr)
    local b = host(900, taker, o)
    assert.are.equal(0, b.code, b.stderr)
    assert.matches("^refused, 60 s\n$", b.stdout)
  end)

  it("a host 15 minutes behind waits the bucket's minute for its next token, not 16", function()
    local o = opts()
    local a = host(0, taker, o)
    assert.are.equal("taken\n", a.stdout, a.stderr)
    local b = host(-900, taker, o)
    assert.are.equal(0, b.code, b.stderr)
    assert.matches("^refused, 60 s\n$", b.stdout)
  end)

  it("a provider's pause a host 15 minutes ahead observed holds the others for the pause, not 15 minutes more",
    function()
    local o = opts()
    local source = [[
local resil = require "resil"
local b = resil.bucket("observed", { rate = 100, per = 60, burst = 100, shared = true })
local rpm = resil.bucket("all-rpm", { rate = 10, per = 60, burst = 2, shared = true })
if arg[1] == "pause" then
  print(("paused for %.0f s"):format(b:observe({ ["retry-after"] = "30" })))
  print(resil.acquire_all({ { rpm, 2 } }) and "took 2" or "refused")
else
  local ok, wait = b:try(1)
  local all, err = resil.acquire_all({ { rpm, 1 } }, { timeout = 0 })
  local function s(x) return ("%d s"):format(math.ceil(x / 10) * 10) end -- (to the 10 s: the runs take time)
  print(ok, s(wait), s(b:wait_time(1)), all, s(err.retry_after))
end
]]
    local a = helpers.run(("%s %s %s pause"):format(skewed(900), o, helpers.write(helpers.tmpname(".lua"), source)))
    assert.are.equal("paused for 30 s\ntook 2\n", a.stdout, a.stderr)
    local b = host(0, source, o)
    assert.are.equal("false\t30 s\t30 s\tnil\t10 s\n", b.stdout, b.stderr)
  end)

  local breaker = [[
local resil = require "resil"
local br = resil.breaker("skewed", { shared = true, window_type = "count", window = 2, min_calls = 2, open_for = 30 })
if arg[1] == "open" then
  br:record(false, 0.01)
  br:record(false, 0.01)
end
local ok, err = br:allow()
-- (to the 10 s: the runs take time)
print(ok and "allowed" or ("refused, open %d s more"):format(math.ceil(err.retry_after / 10) * 10), br:state())
]]

  for _, skew in ipairs({ 900, -900 }) do
    it(("a shared breaker opened by a host 15 minutes %s is open for its open_for for the others")
        :format(skew > 0 and "ahead" or "behind"), function()
      local o = opts()
      local a = helpers.run(("%s %s %s open"):format(skewed(skew), o, helpers.write(helpers.tmpname(".lua"), breaker)))
      assert.are.equal("refused, open 30 s more\topen\n", a.stdout, a.stderr)
      local b = host(0, breaker, o)
      assert.are.equal("refused, open 30 s more\topen\n", b.stdout, b.stderr)
    end)
  end

  -- A day's budget: the day is the server's. Before, each host's clock chose the period: one past
  -- midnight moved the open holds of the day before into its day (a call across midnight settles
  -- there), and a host not yet past it reserved in a day whose holds had gone: $1.60 spent in a
  -- day of a $1 budget.
  it("a host past midnight while another is not does not free the day's money (one day, the server's)", function()
    local o, go = opts(), helpers.tmpname(".go")
    local to_midnight = 86400 - math.floor(require("resil").clock.wall()) % 86400
    local out = host_live(to_midnight - 300, ([[
local resil = require "resil"
local b = resil.budget("daily", { limit = 1, per = "day" })
local t1 = assert(b:reserve(0.8))
print("held"); io.stdout:flush()
while not io.open(%q) do resil.sleep(0.01) end
local t2, err = b:reserve(0.8)
print(t2 and "reserved" or err.kind)
assert(t1:settle(0.8))
if t2 then assert(t2:settle(0.8)) end
print(("spent %%.2f"):format(b:state().spent))
print("done")
]]):format(go), o)
    local a = host(to_midnight + 300, [[
local resil = require "resil"
print(resil.budget("daily", { limit = 1, per = "day" }):reserve(0.1) and "reserved" or "refused")
]], o)
    assert.are.equal("reserved\n", a.stdout, a.stderr)
    helpers.write(go, "")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("done\n") ~= nil end, 20), helpers.slurp(out))
    assert.are.equal("held\nbudget_exceeded\nspent 0.80\ndone\n", helpers.slurp(out))
  end)

  -- (a rolling upgrade: what the version before wrote is times on its host's clock, a right one here)
  it("a hold and a bucket's arrival time written by the version before are judged on the server's clock", function()
    local url = redis.url()
    local o = ("--store %s --log-level off"):format(url)
    local now = require("resil").clock.wall()
    local function cli(...)
      local r = helpers.run(("redis-cli -p %d -n %s %s"):format(redis.port, url:match("/(%d+)$"),
        table.concat({ ... }, " ")))
      assert(not r.stdout:match("ERR"), r.stdout)
    end
    cli("ZADD resil:budget:b:all:holds", ("%.6f"):format(now + 600), "t-old")
    cli("HSET resil:budget:b:all:amounts t-old 800000")
    cli("HSET resil:budget:b:all:holders t-old 'elsewhere|boot|1|1'")
    cli("SET resil:budget:b:all:reserved 800000")
    cli("SADD resil:budget:b:periods all")
    cli("HSET resil:ticket:t-old state held budget b period all at", ("%.6f"):format(now))
    cli("ZADD resil:owners", ("%.6f"):format(now + 3600), "'elsewhere|boot|1|1'")
    cli("SET resil:gcra:bucket:per-minute", ("%.6f"):format(now + 60), "PX 120000")
    local b = host(900, reserver, o)
    assert.are.equal(0, b.code, b.stderr)
    assert.matches("^held for %d+ s more\nbudget_exceeded\n$", b.stdout)
    local left = tonumber(b.stdout:match("%d+"))
    assert(left > 500 and left <= 600, b.stdout)
    b = host(900, taker, o)
    assert.matches("^refused, 60 s\n$", b.stdout, nil, nil, b.stderr)
  end)
end)
