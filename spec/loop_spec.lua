local resil = require "resil"
local helpers = require "spec.helpers"

describe("tasks", function()
  before_each(function() resil.clock.virtual() end)

  it("start in spawn order and run until they wait", function()
    local order = {}
    local a = resil.spawn(function() order[#order + 1] = "a1"; resil.yield(); order[#order + 1] = "a2" end)
    local b = resil.spawn(function() order[#order + 1] = "b1"; resil.yield(); order[#order + 1] = "b2" end)
    a:join(); b:join()
    assert.are.same({ "a1", "b1", "a2", "b2" }, order)
  end)

  it("that spawn one another without end still let I/O in", function()
    local server = resil.server.listen({ handler = function() return { status = 200, body = "up" } end })
    local stop = false
    local function chain() if not stop then resil.spawn(chain) end end
    resil.spawn(chain)
    local res = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()), timeout = 5 })
    stop = true
    server:close()
    assert.are.equal("up", res.body)
  end)

  it("pass arguments and return results through join", function()
    local t = resil.spawn(function(x, y) return x + y, "sum" end, 40, 2)
    assert.are.same({ true, 42, "sum" }, { t:join() })
    assert.are.equal("done", t:status())
    assert.are.same({ true, 42, "sum" }, { t:join() }) -- joining again gives the same answer
  end)

  it("are refused a function that is not one at the caller's line", function()
    for _, name in ipairs({ "spawn", "background" }) do
      local ok, err = pcall(function() resil[name](5) end)
      assert.is_false(ok)
      assert.matches("loop_spec.lua:%d+: bad argument #1 to '" .. name .. "' %(function expected, got number%)", err)
      ok, err = pcall(function() resil[name]() end)
      assert.matches("loop_spec.lua:%d+: bad argument #1 to '" .. name .. "' %(function expected, got no value%)", err)
    end
  end)

  it("keep an error inside the failing task; join returns it", function()
    local other_ran = false
    local bad = resil.spawn(function() error("boom") end)
    local good = resil.spawn(function() resil.sleep(1); other_ran = true; return "fine" end)
    local ok, err = bad:join()
    assert.is_false(ok)
    assert.matches("boom", err)
    assert.are.same({ true, "fine" }, { good:join() })
    assert.is_true(other_ran)
    assert.are.equal("failed", bad:status())
  end)

  it("join with a timeout returns a timeout error and leaves the task running", function()
    local t = resil.spawn(function() resil.sleep(10); return "late" end)
    local ok, err = t:join(1)
    assert.is_nil(ok)
    assert.are.equal("timeout", err.kind)
    assert.are.equal("waiting", t:status())
    assert.are.same({ true, "late" }, { t:join() })
  end)

  it("cancel stops a waiting task, closes its to-be-closed variables and wakes joiners", function()
    local closed = false
    local t = resil.spawn(function()
      local guard <close> = setmetatable({}, { __close = function() closed = true end })
      resil.sleep(100)
      return "never"
    end)
    resil.sleep(1)
    assert.is_true(t:cancel())
    local ok, err = t:join()
    assert.is_false(ok)
    assert.are.equal("canceled", err.kind)
    assert.is_true(closed)
    assert.are.equal("canceled", t:status())
    assert.is_false(t:cancel()) -- already finished
  end)

  it("a task that fails closes its to-be-closed variables and keeps only its error", function()
    local closed = false
    local t = resil.spawn(function()
      local guard <close> = setmetatable({}, { __close = function() closed = true end })
      local big = ("x"):rep(1e6) -- referenced from the failed stack only
      error({ kind = "boom", size = #big })
    end)
    resil.yield()
    assert.is_true(closed)
    local ok, err = t:join()
    assert.is_false(ok)
    assert.are.same({ kind = "boom", size = 1e6 }, err)
  end)

  it("cancel before a task ever ran means it never runs", function()
    local ran = false
    local t = resil.spawn(function() ran = true end)
    t:cancel()
    resil.sleep(1)
    assert.is_false(ran)
  end)

  it("a task cannot join or cancel itself", function()
    local me
    me = resil.spawn(function()
      local ok1, e1 = pcall(function() return me:join() end)
      local ok2, e2 = pcall(function() return me:cancel() end)
      return ok1, e1, ok2, e2
    end)
    local _, ok1, e1, ok2, e2 = me:join()
    assert.is_false(ok1)
    assert.matches("cannot join itself", e1)
    assert.is_false(ok2)
    assert.matches("cannot cancel itself", e2)
  end)

  it("primitives refuse to run inside a plain coroutine, with a clear message", function()
    local co = coroutine.wrap(function() return pcall(resil.sleep, 1) end)
    local ok, err = co()
    assert.is_false(ok)
    assert.matches("must be called from a task", err)
  end)

  -- (before: "[resil prelude]:40: task:join must be called from a task ...", a call the script
  -- never made, after resil.map had spawned its workers)
  it("resil.timeout and resil.map inside a plain coroutine name the caller's line and start nothing", function()
    local ran = false
    local calls = {
      function() resil.timeout(1, function() ran = true end) end,
      function() resil.map({ 1, 2 }, function() ran = true end) end,
    }
    for _, f in ipairs(calls) do
      local ok, err = coroutine.wrap(function() return pcall(f) end)()
      assert.is_false(ok)
      assert.matches("loop_spec%.lua:" .. debug.getinfo(f, "S").linedefined .. ": resil%.%a+ must be called from a task", err)
    end
    resil.sleep(0)
    assert.is_false(ran)
  end)

  it("spawned tasks inherit the log context, and extend it privately", function()
    resil.context({ run = "r1" })
    local child_ctx = resil.spawn(function()
      resil.context({ step = "s1" })
      return resil.context()
    end)
    local _, ctx = child_ctx:join()
    assert.are.equal("r1", ctx.run)
    assert.are.equal("s1", ctx.step)
    assert.is_nil(resil.context().step)
  end)
end)

describe("the virtual clock", function()
  before_each(function() resil.clock.virtual() end)

  it("makes sleeps exact and instant", function()
    local t0 = resil.now()
    resil.sleep(3600)
    assert.are.equal(3600, resil.now() - t0)
  end)

  it("wakes sleepers in deadline order, ties in start order", function()
    local woke = {}
    local t0 = resil.now()
    local tasks = {}
    for _, spec in ipairs({ { "c", 3 }, { "a", 1 }, { "b", 2 }, { "a2", 1 } }) do
      tasks[#tasks + 1] = resil.spawn(function()
        resil.sleep(spec[2])
        woke[#woke + 1] = { spec[1], resil.now() - t0 }
      end)
    end
    for _, t in ipairs(tasks) do t:join() end
    assert.are.same({ { "a", 1 }, { "a2", 1 }, { "b", 2 }, { "c", 3 } }, woke)
  end)

  -- A process stopped (SIGSTOP, or not scheduled on a loaded machine) wakes
  -- with its grace timer expired and the I/O that arrived meanwhile not yet
  -- read: that grace proves nothing, and time must not jump past the reply.
  it("does not time out a call whose reply arrived while the process stood stopped", function()
    local pid, out = helpers.start([[
      local resil = require "resil"
      resil.clock.virtual()
      local m = resil.mock.start({})
      local failed = 0
      for _ = 1, 3000 do
        local res = resil.http.request({ method = "POST", url = m.url .. "/v1/chat/completions", timeout = 30,
          json = { model = "gpt-4o", messages = { { role = "user", content = "hi" } } } })
        if not res then failed = failed + 1 end
      end
      print(("%d failed, mock saw %d"):format(failed, m:stats().routes.chat))
    ]])
    finally(function()
      if helpers.alive(pid) then os.execute("kill -s CONT " .. pid .. "; kill -s KILL " .. pid) end
    end)
    resil.clock.real()
    local stops = 0
    while helpers.alive(pid) and stops < 4000 do
      os.execute("kill -s STOP " .. pid)
      resil.sleep(0.02)
      os.execute("kill -s CONT " .. pid)
      resil.sleep(0.005)
      stops = stops + 1
    end
    resil.clock.virtual()
    assert.are.equal("0 failed, mock saw 3000", helpers.slurp(out):match("[^\n]*"))
  end)

  it("keeps a finite time when a sleep of math.huge ends on it, as the real clock does (31 years)", function()
    -- (before: the clock jumped to inf; a bucket of burst 1 then handed out 9,223,358,967 tokens and
    -- a breaker never opened, for the rest of the process: the busted run's other specs too)
    local t0 = resil.now()
    local sleeper = resil.spawn(function() resil.sleep(math.huge); return "woke" end)
    assert.are.same({ true, "woke" }, { sleeper:join() })
    assert.are.equal(1e9, resil.now() - t0)
    local b = resil.bucket("virtual-huge-sleep", { rate = 1, per = 1, burst = 1 })
    assert.are.same({ true, 0 }, { b:try() })
    assert.is_false((b:try()))
    local br = resil.breaker("virtual-huge-sleep", { window_type = "time", window = 10, min_calls = 1,
      failure_rate = 0.5, open_for = 1 })
    br:call(function() return nil, resil.error("server_error", "503") end)
    assert.are.equal("open", br:state())
  end)

  it("never goes back when switched to real time and back: a breaker opened on it stays open for its open_for", function()
    -- (before: switched back to real time, resil.now() went back by the virtual time slept, an hour
    -- here, and the breaker stayed open that hour of real time; switched to virtual again, it went back again)
    resil.log.level("error")
    resil.sleep(3600)
    local br = resil.breaker("virtual-to-real", { window_type = "count", window = 4, min_calls = 2,
      failure_rate = 0.5, open_for = 1 })
    for _ = 1, 2 do br:call(function() return nil, resil.error("server_error", "503") end) end
    local before = resil.now()
    resil.clock.real()
    local real_now = resil.now()
    local _, err = br:call(function() return "ok" end)
    resil.clock.virtual()
    resil.log.level("info")
    assert.is_true(real_now >= before, ("went back %.1f s"):format(before - real_now))
    assert.are.equal("circuit_open", err.kind)
    assert.is_true(err.retry_after <= 1, "open for " .. err.retry_after .. " s more")
    assert.is_true(resil.now() >= real_now)
  end)

  it("can be switched back to real time", function()
    assert.is_true(resil.clock.is_virtual())
    resil.clock.real()
    assert.is_false(resil.clock.is_virtual())
    local t0 = resil.now()
    resil.sleep(0.01)
    assert.is_true(resil.now() - t0 >= 0.009)
    resil.clock.virtual()
  end)
end)

describe("resil.timeout", function()
  before_each(function() resil.clock.virtual() end)

  it("returns fn's results when it finishes in time", function()
    assert.are.same({ 1, 2 }, { resil.timeout(5, function(a) resil.sleep(1); return a, 2 end, 1) })
  end)

  it("returns nil, timeout and cancels fn after exactly the limit", function()
    local finished = false
    local t0 = resil.now()
    local r, err = resil.timeout(2, function() resil.sleep(10); finished = true end)
    assert.is_nil(r)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(2, resil.now() - t0)
    resil.sleep(20)
    assert.is_false(finished)
  end)

  it("re-raises fn's error", function()
    assert.has_error(function() resil.timeout(1, function() error("inner", 0) end) end, "inner")
  end)

  it("refuses a NaN limit at the caller's line, and a join's limit already passed is up at once", function()
    -- (before: resil.timeout(0/0, fn), a deadline computed from a NaN, ran fn with no limit at all;
    -- t:join(deadline - resil.now()) once the deadline had passed waited for good)
    local ran = false
    local ok, err = pcall(function()
      local v = resil.timeout(0 / 0, function() ran = true; resil.sleep(1e6) end)
      return v
    end)
    assert.is_false(ok)
    assert.matches("loop_spec.lua:%d+: resil.timeout: seconds must be a number >= 0, got %-?nan", err)
    assert.is_false(ran)
    local slow = resil.spawn(resil.sleep, 60)
    local t0 = resil.now()
    local r, e = slow:join(-1)
    assert.is_nil(r)
    assert.matches("did not finish in time", tostring(e))
    assert.are.equal(0, resil.now() - t0)
    assert.has_error(function() slow:join(0 / 0) end)
    slow:cancel()
  end)
end)

describe("resil.map", function()
  before_each(function() resil.clock.virtual() end)

  it("returns results in item order whatever the finishing order", function()
    local items = { 5, 1, 4, 2, 3 }
    local results, failures = resil.map(items, function(x) resil.sleep(x); return x * 10 end, { concurrency = 5 })
    assert.are.same({ 50, 10, 40, 20, 30 }, results)
    assert.is_nil(failures)
  end)

  it("counts an item that raised nil as failed, saying where, and refuses a NaN concurrency", function()
    -- (before: error() with no value was a success with a nil result; concurrency = 0/0 ran no item
    -- and returned an empty result with no failures)
    local results, failures = resil.map({ 1, 2, 3 }, function(x)
      if x == 2 then error() end
      return x
    end)
    assert.are.same({ [1] = 1, [3] = 3 }, results)
    assert.is_table(failures)
    assert.matches("loop_spec.lua:%d+: raised nil", failures[2])
    local ok, err = pcall(function()
      local r = resil.map({ 1, 2, 3 }, function(x) return x end, { concurrency = 0 / 0 })
      return r
    end)
    assert.is_false(ok)
    assert.matches("loop_spec.lua:%d+: resil.map: concurrency must be a number >= 1", err)
  end)

  it("never runs more than `concurrency` items at once", function()
    local running, peak = 0, 0
    local items = {}
    for i = 1, 20 do items[i] = i end
    resil.map(items, function()
      running = running + 1
      peak = math.max(peak, running)
      resil.sleep(1)
      running = running - 1
      return true
    end, { concurrency = 3 })
    assert.are.equal(3, peak)
  end)

  it("takes concurrency * time as the virtual clock says", function()
    local items = {}
    for i = 1, 10 do items[i] = i end
    local t0 = resil.now()
    resil.map(items, function() resil.sleep(1); return 1 end, { concurrency = 2 })
    assert.are.equal(5, resil.now() - t0)
  end)

  it("collects failures (raised or nil, err) by index without stopping the rest", function()
    local results, failures = resil.map({ 1, 2, 3, 4 }, function(x)
      if x == 2 then error("two", 0) end
      if x == 3 then return nil, resil.error("invalid_output", "three") end
      return x
    end)
    assert.are.same({ [1] = 1, [4] = 4 }, results)
    assert.are.equal("two", failures[2])
    assert.are.equal("invalid_output", failures[3].kind)
  end)

  it("rejects bad arguments", function()
    assert.has_error(function() resil.map("x", print) end, "resil.map: items must be a table")
    assert.has_error(function() resil.map({}, print, { concurrency = 0 }) end)
  end)
end)

describe("error values", function()
  it("have a kind, a message and a readable tostring", function()
    local e = resil.error("rate_limited", "slow down", { status = 429, retry_after = 2 })
    assert.are.equal("rate_limited", e.kind)
    assert.are.equal(2, e.retry_after)
    assert.are.equal("rate_limited: slow down (status 429)", tostring(e))
    assert.is_true(resil.is_error(e))
    assert.is_false(resil.is_error({ kind = "x" }))
  end)

  -- (before: the fields table itself became the error: two errors made from one kept table were one,
  -- the second's kind and message the first's too; fields that were no table were ignored)
  it("are made of a copy of the fields given, which must be a table", function()
    local RETRY_LATER = { retryable = true }
    local first = resil.error("overloaded", "busy", RETRY_LATER)
    local second = resil.error("timeout", "slow", RETRY_LATER)
    assert.are.equal("overloaded: busy", tostring(first))
    assert.are.equal("timeout: slow", tostring(second))
    assert.is_true(first.retryable)
    assert.is_nil(RETRY_LATER.kind)
    assert.is_false(resil.is_error(RETRY_LATER))
    local ok, err = pcall(function() return resil.error("x", "m", "retryable") end)
    assert.is_false(ok)
    assert.matches("loop_spec.lua:%d+: resil.error: fields must be a table, got string", err)
  end)
end)

describe("resil.background", function()
  local helpers = require "spec.helpers"

  it("runs alongside the script and does not keep the host running", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local beats = 0
      resil.background(function() while true do beats = beats + 1; resil.sleep(0.01) end end)
      resil.sleep(0.05)
      print("beats", beats > 1)
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("beats\ttrue\n", r.stdout)
  end)

  it("is a task like any other: it can be joined and canceled", function()
    resil.clock.virtual()
    local t = resil.background(function(x) resil.sleep(1); return x * 2 end, 21)
    assert.are.same({ true, 42 }, { t:join() })
    local forever = resil.background(function() resil.sleep(1e6) end)
    assert.is_true(forever:cancel())
    assert.are.equal("canceled", forever:status())
  end)
end)

describe("an error value whose __tostring fails", function()
  local helpers = require "spec.helpers"

  it("cannot abort the host: the task fails, the script exits 1 with a message", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local raises = setmetatable({}, { __tostring = function() error("tostring boom") end })
      local yields = setmetatable({}, { __tostring = function() coroutine.yield() end })
      local nonstring = setmetatable({}, { __tostring = function() return {} end })
      for _, v in ipairs({ raises, yields, nonstring }) do
        local t = resil.spawn(function() error(v) end)
        io.write(tostring((t:join())), " ")
      end
      error(raises)
    ]])
    assert.are.equal("false false false ", r.stdout)
    assert.are.equal(1, r.code, r.stderr)
    assert.matches("error object is a table value; its __tostring failed", r.stderr, 1, true)
    assert.not_matches("PANIC", r.stderr)
  end)
end)

describe("the return convention", function()
  local helpers = require "spec.helpers"

  it("try: true and what is left, or false (and the wait when known), for buckets and semaphores", function()
    resil.clock.virtual()
    local s = resil.semaphore("convention", { size = 2 })
    assert.are.same({ true, 1 }, { s:try() })
    assert.are.same({ true, 0 }, { s:try() })
    assert.are.same({ false }, { s:try() })
    local b = resil.bucket("convention", { rate = 1, per = 1, burst = 1 })
    assert.are.same({ true, 0 }, { b:try() })
    local ok, wait = b:try()
    assert.is_false(ok)
    assert.is_true(wait > 0.99 and wait <= 1)
  end)

  it("a port in use is nil, err from server.listen, not a raise", function()
    local first = assert(resil.server.listen({ handler = function() return { status = 204 } end }))
    local again, err = resil.server.listen({ port = first:port(), handler = function() end })
    assert.is_nil(again)
    assert.are.equal("address_in_use", err.kind)
    assert.matches("cannot listen on 127.0.0.1:" .. first:port(), err.message, 1, true)
    local mock, merr = resil.mock.start({}, { port = first:port() })
    assert.is_nil(mock)
    assert.are.equal("address_in_use", merr.kind)
    first:close()
  end)

  -- (before: "(No such file or directory)", whatever errno a call before had left)
  it("a host that is a name, not an address, is nil, err from server.listen saying so", function()
    local s, err = resil.server.listen({ host = "localhost", port = 0, handler = function() end })
    assert.is_nil(s)
    assert.are.equal("listen", err.kind)
    assert.are.equal("server: cannot listen on localhost:0 (localhost is not a numeric address: an IP address such "
      .. "as 127.0.0.1 or ::1, never a name)", err.message)
  end)

  it("a log file that cannot be opened is nil, err from log.output, and logging goes on", function()
    local ok, err = resil.log.output("/nonexistent-dir/x.log")
    assert.is_nil(ok)
    assert.are.equal("io", err.kind)
    assert.matches("/nonexistent%-dir/x.log", err.message)
    assert.is_true(resil.log.output(helpers.tmpname(".log")))
    assert.is_true(resil.log.output("stderr"))
  end)
end)
