-- The store when its dependency freezes or refuses rather than fails: every
-- operation has a timeout and returns nil, err{kind="store_unavailable"}
-- naming the store; waiting never blocks the loop.
local resil = require "resil"
local helpers = require "spec.helpers"

-- a task that counts real-time ticks: proof that the loop went on
local function ticker()
  local t = { n = 0 }
  t.task = resil.spawn(function() while true do t.n = t.n + 1; resil.sleep(0.01) end end)
  return t
end

-- another process takes SQLite's write lock on path and keeps it `seconds`;
-- -> its pid, once it holds it
local function hold_write_lock(path, seconds)
  local pid, out = helpers.start(([[
    local resil = require "resil"
    local db = assert(resil.sqlite.open(%q))
    db:now(function(tx)
      tx:exec("INSERT OR REPLACE INTO kv (key, value) VALUES ('holder', 'x')")
      io.stdout:write("holding\n"); io.stdout:flush()
      os.execute("sleep %s")
    end)
  ]]):format(path, seconds))
  assert(helpers.wait_until(function() return helpers.slurp(out):match("holding") end, 10))
  return pid
end

describe("a frozen Redis (SIGSTOP)", function()
  local redis
  setup(function()
    resil.clock.real()
    redis = helpers.redis_server()
  end)
  teardown(function() redis.stop() end)

  it("gives store_unavailable after the store's timeout, for every kind of operation, then recovers", function()
    resil.log.level("error")
    local url = redis.url(1, "timeout=0.3")
    resil.store_config({ url = url })
    local s = assert(resil.store(url))
    assert.are.equal(1, s:incr("n"))
    local budget = resil.budget("frozen", { limit = 5 })
    local held = assert(budget:reserve(2))
    -- frozen until the spec thaws it: without a timeout every call below
    -- would simply wait for the thaw and succeed
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local ticks = ticker()
    local n, err = s:incr("n")
    assert.is_nil(n)
    assert.are.equal("store_unavailable", err.kind)
    assert.matches("no reply within 0.3 s", err.message, 1, true)
    assert.matches(tostring(redis.port), err.message, 1, true)
    resil.sleep(1.1) -- (the store is down: its probes get no answer either)
    local _, oerr = resil.once("frozen-key", function() return 1 end)
    assert.are.equal("store_unavailable", oerr.kind)
    resil.sleep(1.1)
    local ticket, rerr = budget:reserve(1)
    assert.is_nil(ticket)
    assert.are.equal("store_unavailable", rerr.kind)
    local settled, serr = held:settle(1.5, { provider = "p" })
    assert.is_nil(settled)
    assert.are.same({ "store_unavailable", true }, { serr.kind, serr.retrying })
    assert.is_true(ticks.n > 10, "the loop was blocked while Redis was frozen")
    ticks.task:cancel()
    os.execute("kill -CONT " .. redis.pid)
    -- thawed: the store works again; the settle lands once, the refused reservation holds nothing
    assert.is_true(helpers.wait_until(function() return s:incr("n") ~= nil end, 10))
    assert.is_true(helpers.wait_until(function() return budget:state().spent > 0 end, 10))
    local st = budget:state()
    assert.are.same({ 1.5, 0, 0 }, { st.spent, st.reserved, #st.holds })
    assert.is_false(held:settle(1.5, { provider = "p" }))
    assert.are.equal(1.5, resil.cost.total())
  end)

  -- (before: the claim sent before the freeze ran when Redis thawed, its record naming this live
  -- process as the holder for a day; every retry of the key waited, then was "in progress")
  it("an Idempotency-Key's claim whose outcome was not seen is given up when Redis thaws: a retry runs", function()
    resil.log.level("off")
    local url = redis.url(2, "timeout=0.3")
    resil.store_config({ url = url })
    local s = assert(resil.store(url))
    assert.are.equal(1, s:incr("warm")) -- (connected)
    assert(resil.once("warm-claim", function() return true end)) -- (the claim's script loaded: sent at once)
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local ran = 0
    local function fn() ran = ran + 1; return "answer" end
    local _, err = resil.once({ key = "frozen-claim", wait = 1 }, fn)
    assert.are.equal("store_unavailable", err.kind)
    resil.sleep(0.5)
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function() return s:incr("warm") ~= nil end, 10))
    local r, rerr
    assert.is_true(helpers.wait_until(function()
      r, rerr = resil.once({ key = "frozen-claim", wait = 0.5 }, fn)
      return r ~= nil or rerr.kind ~= "in_progress"
    end, 10), "still held: " .. tostring(rerr))
    assert.are.same({ "answer", 1 }, { r, ran })
    assert.are.equal("answer", (resil.once({ key = "frozen-claim" }, fn))) -- and replayed, not run again
    assert.are.equal(1, ran)
  end)

  -- (before: while the store was down its give-up was refused at once, not sent, for the minute it
  -- is tried; past that the claim ran at the thaw and named this live process for good: the key was
  -- "in progress" while it lived. A minute on the virtual clock: the freeze is real time)
  it("a claim sent as Redis froze is given up at the thaw however long the freeze: its give-up reaches the " ..
     "frozen server, as the claim did", function()
    resil.log.level("off")
    local url = redis.url(6, "timeout=0.1")
    resil.store_config({ url = url })
    local s = assert(resil.store(url))
    assert.are.equal(1, s:incr("warm"))
    assert(resil.once("warm-claim", function() return true end)) -- (the scripts loaded)
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local ran = 0
    local function fn() ran = ran + 1; return "answer" end
    local _, err = resil.once({ key = "long-freeze", wait = 1 }, fn)
    assert.are.equal("store_unavailable", err.kind)
    resil.sleep(120) -- (its give-up is tried for a minute)
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function() return s:incr("warm") ~= nil end, 20))
    local r, rerr = resil.once({ key = "long-freeze", wait = 1 }, fn)
    assert.are.same({ "answer", 1 }, { r, ran }, tostring(rerr))
  end)

  -- (before: the probe went on waiting on the closed connection, holding no reference to the conn:
  -- no probe followed it, and a conn collected meanwhile had its memory written by the probe's
  -- deadline and reply, as valgrind showed)
  it("a connection closed while its probe waits for the frozen server goes on probing, then finds it", function()
    local conn = resil.redis.connect({ port = redis.port, db = 7, timeout = 0.2, down = 0.1, down_max = 0.1 })
    assert.are.equal("PONG", conn:call("PING"))
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    assert.is_nil((conn:call("PING")))
    resil.sleep(0.05) -- (the first probe is sent)
    conn:close()
    assert.is_true(helpers.wait_until(function() return conn:state().probes >= 3 end, 10), "no probe followed")
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function() return not conn:state().down end, 10))
    assert.are.equal("PONG", conn:call("PING"))
  end)

  -- (before: every operation during the freeze was sent on a new connection and waited its whole
  -- timeout, 5 s by default; a gateway request makes two, so each waited some 10 s for its 503)
  it("after a timeout the store is down: the next operations fail at once, a shared bucket admits from its " ..
     "stand-in, and a probe finds Redis again once it thaws, logged once each way", function()
    resil.log.level("info")
    local url = redis.url(3, "timeout=2")
    resil.store_config({ url = url })
    local s = assert(resil.store(url))
    assert.are.equal(1, s:incr("n"))
    local budget = resil.budget("down-fast", { limit = 5 })
    assert(budget:reserve(1)):settle(0)
    local shared = resil.bucket("down-fast", { rate = 2, per = 3600, burst = 4, shared = true, on_outage = "local" })
    assert.is_true((shared:try(1))) -- (from the store)
    assert.are.equal(1, (resil.once("down-fast-warm", function() return 1 end))) -- (its script loaded)
    -- the store's state in the metrics (read at each exposition)
    local function down_in_metrics()
      resil.metrics.text()
      return resil.metrics.gauge("resil_store_down"):value({ store = url })
    end
    assert.are.equal(0, down_in_metrics())
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local lines = helpers.logged(function()
      local n, err = s:incr("n") -- sent: it waits its timeout (and the server runs it when it thaws)
      assert.is_nil(n)
      assert.matches("no reply within 2 s", err.message, 1, true)
      -- each of these fails (or takes its fallback) without waiting for anything: no other task
      -- gets to run meanwhile, while each waited its 2 s before
      local turns = 0
      local other = resil.spawn(function() while true do turns = turns + 1; resil.yield() end end)
      local function at_once(what, ...)
        assert.are.equal(0, turns, what .. " waited")
        return ...
      end
      for i = 1, 5 do
        local m, merr = at_once("incr " .. i, s:incr("n"))
        assert.is_nil(m)
        assert.are.equal("store_unavailable", merr.kind)
        assert.matches("no reply within 2 s", merr.message, 1, true) -- (why it is down)
        assert.is_false(merr.sent) -- never sent: it will not run at the thaw
      end
      local ticket, rerr = at_once("a reservation", budget:reserve(1)) -- on_outage = "deny"
      assert.is_nil(ticket)
      assert.are.equal("store_unavailable", rerr.kind)
      local _, oerr = at_once("a claim", resil.once("down-fast-key", function() return 1 end))
      assert.are.equal("store_unavailable", oerr.kind)
      -- on_outage = "local": its stand-in's burst of 4, then no more
      for _ = 1, 4 do assert.is_true(at_once("a take", shared:try(1))) end
      assert.is_false((at_once("a take", shared:try(1))))
      assert.is_true(at_once("the store's state", s:stats().down))
      assert.are.equal(1, down_in_metrics())
      other:cancel()
      -- thawed: a probe in the background finds it, with no operation asked meanwhile
      os.execute("kill -CONT " .. redis.pid)
      assert.is_true(helpers.wait_until(function() return not s:stats().down end, 20))
      assert.are.equal(3, s:incr("n")) -- the one sent ran at the thaw; none of the five refused did
    end)
    assert.are.equal(0, down_in_metrics())
    local said = {}
    for _, l in ipairs(lines) do
      if l.msg:match("^redis: store") then said[#said + 1] = { l.msg, l.store, l.level } end
    end
    assert.are.same({
      { "redis: store down: its operations fail at once until it answers again", url, "warn" },
      { "redis: store back", url, "info" } }, said)
  end)

  -- (before: each claim refused so started a task to give it up, tried for a minute: a script whose
  -- store stayed down ended a minute late, saying each key "stays held")
  it("an Idempotency-Key's claim refused at once while the store is down, or never sent, has nothing to give up",
    function()
    local url = redis.url(5, "timeout=0.3")
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local r = helpers.run_script([[
local resil = require "resil"
print(select(2, resil.store():set("k", "v")).kind) -- no reply: the store is down
local _, err = resil.once("refused", function() return 1 end)
print(err.kind, err.sent)
]], "--store '" .. url .. "'")
    os.execute("kill -CONT " .. redis.pid)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("store_unavailable\nstore_unavailable\tfalse\n", r.stdout)
    assert.is_nil(r.stderr:find("could not be given up", 1, true), r.stderr)
    -- nor is one whose connection could not be made (nothing there): it was never sent either
    r = helpers.run_script([[
local resil = require "resil"
local _, err = resil.once("refused", function() return 1 end)
print(err.kind, err.sent)
]], ("--store redis://127.0.0.1:%d/0"):format(helpers.free_port()))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("store_unavailable\tfalse\n", r.stdout)
    assert.is_nil(r.stderr:find("could not be given up", 1, true), r.stderr)
  end)

  it("stays down while probes get no answer, probing less often up to down_max; down=0 turns it off", function()
    resil.log.level("off")
    local url = redis.url(4, "timeout=0.2&down=0.1&down_max=0.4")
    local s = assert(resil.store(url))
    assert.is_true(s:set("k", "v"))
    assert.are.same({ down = false }, { down = s:stats().down })
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    assert.is_nil((s:get("k")))
    -- probes at 0.1, 0.2, 0.4, 0.4 s apart, each waiting its 0.2 s for a reply
    assert.is_true(helpers.wait_until(function() return s:stats().probes >= 4 end, 20))
    local st = s:stats()
    assert.are.same({ true, 0.4 }, { st.down, st.probe_every })
    assert.is_nil((s:get("k")))
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function() return not s:stats().down end, 20))
    assert.are.equal("v", s:get("k"))
    assert.are.same({ false, 0 }, { s:stats().down, s:stats().probes })
    -- down=0: every operation tries the server, as before the store had a down state
    local off = assert(resil.store(redis.url(4, "timeout=0.2&down=0")))
    assert.are.equal("v", off:get("k"))
    os.execute("kill -STOP " .. redis.pid)
    assert.is_nil((off:get("k")))
    assert.is_false(off:stats().down)
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function() return off:get("k") == "v" end, 20))
  end)
end)

describe("SQLite with another process holding the write lock", function()
  local path, holder
  before_each(function()
    resil.clock.real()
    path = helpers.tmpname(".db")
    assert(resil.store(path)) -- create it with its schema
    holder = hold_write_lock(path, 3) -- a second process takes BEGIN IMMEDIATE and keeps it 3 s
  end)
  after_each(function()
    helpers.wait_until(function() return not helpers.alive(holder) end, 10)
    os.remove(path)
  end)

  it("opens without waiting for the lock, and an operation gives up after the timeout", function()
    local url = path .. "?timeout=0.3"
    local s = assert(resil.store(url))
    assert.is_true(helpers.alive(holder), "opening the store waited for the other process's lock")
    local ticks = ticker()
    local ok, err = s:set("a", "b")
    assert.is_nil(ok)
    assert.are.equal("store_unavailable", err.kind)
    assert.matches("store " .. path .. ": database is locked", err.message, 1, true)
    assert.is_true(ticks.n > 5, "the loop was blocked while waiting for the lock")
    ticks.task:cancel()
    assert.is_true(helpers.alive(holder), "the operation waited longer than its timeout")
  end)
end)

describe("a read-only SQLite file", function()
  it("returns store_unavailable naming the store, and reads still work", function()
    local path = helpers.tmpname(".db")
    assert.is_true(assert(resil.store(path)):set("k", "v"))
    -- immutable even for root; a store opened after this cannot write
    if not os.execute("chattr +i " .. path .. " 2>/dev/null") then
      pending("chattr +i is not supported on this file system")
      return
    end
    local s = assert(resil.store(path .. "?timeout=1"))
    local ok, err = s:set("k", "w")
    os.execute("chattr -i " .. path)
    assert.is_nil(ok)
    assert.are.equal("store_unavailable", err.kind)
    assert.matches("store " .. path .. ": attempt to write a readonly database", err.message, 1, true)
    assert.are.equal("v", s:get("k"))
    os.remove(path)
  end)
end)

describe("a corrupt SQLite file", function()
  it("gives nil, err{kind='store_unavailable'} from every operation, never a raise", function()
    local path = helpers.tmpname(".db")
    helpers.write(path, ("not a database "):rep(400))
    resil.store_config({ url = path })
    local budget = resil.budget("corrupt", { limit = 1 })
    local calls = 0
    local results = {
      once = { resil.once("k", function() calls = calls + 1 end) },
      step = { resil.step("s", function() calls = calls + 1 end) },
      record = { resil.cost.record({ usd = 0.01 }) },
      total = { resil.cost.total() },
      breakdown = { resil.cost.breakdown("model") },
      reserve = { budget:reserve(0.1) },
      state = { budget:state() },
    }
    resil.store_config({ url = false })
    for what, r in pairs(results) do
      assert.is_nil(r[1], what); assert(r[2], what .. ": " .. tostring(r[1]) .. " " .. tostring(r[2]))
      assert.are.equal("store_unavailable", r[2].kind, what)
      assert.matches(path, r[2].message, 1, true)
    end
    assert.are.equal(0, calls)
    os.remove(path)
  end)
end)

describe("a run whose store is changed with resil.store_config", function()
  it("is taken on the new store: later steps are checkpointed there, never in the store it left", function()
    local first, second = helpers.tmpname(".db"), helpers.tmpname(".db")
    resil.store_config({ url = first })
    local calls = 0
    assert.are.equal(1, resil.step("one", function() calls = calls + 1; return calls end))
    local id = resil.run.id()
    resil.store_config({ url = second })
    assert.are.equal(2, resil.step("two", function() calls = calls + 1; return calls end))
    assert.are.equal(id, resil.run.id())
    -- what a process started on each store finds: "two" is the run's first step on the new one
    assert.are.equal("two", (helpers.backend(resil.store(second)):step_get(id, "", 1)))
    assert.are.equal("one", (helpers.backend(resil.store(first)):step_get(id, "", 1)))
    assert.is_nil((helpers.backend(resil.store(first)):step_get(id, "", 2)))
    -- and a store that cannot be opened fails the step instead of running it against the old one
    local corrupt = helpers.write(helpers.tmpname(".db"), ("not a database "):rep(400))
    resil.store_config({ url = corrupt })
    local ok, err = resil.step("three", function() calls = calls + 1 end)
    assert.is_nil(ok)
    assert.are.equal("store_unavailable", err.kind)
    assert.are.equal(2, calls)
    resil.store_config({ url = false })
    os.remove(first); os.remove(second); os.remove(corrupt)
  end)
end)

describe("a step whose record cannot be read", function()
  it("does not run again: it returns store_unavailable and fn is not called", function()
    local path = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      print("a", resil.step("a", function() print("a runs") return 1 end))
      if ... == "lock" then
        local holder = io.popen(%q .. " " .. %q)
        assert(holder:read("l") == "holding")
      end
      print("b", resil.step("b", function() print("b runs (pays)") return 2 end))
    ]]):format(helpers.resil, helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      local db = assert(resil.sqlite.open(%q))
      db:now(function(tx) io.stdout:write("holding\n"); io.stdout:flush(); os.execute("sleep 1") end)
    ]]):format(path))))
    local opts = ("--store '%s?timeout=0.3' --run r1 %s"):format(path, script)
    local first = helpers.run(helpers.resil .. " " .. opts)
    assert.are.equal("a runs\na\t1\nb runs (pays)\nb\t2\n", first.stdout)
    local again = helpers.run(helpers.resil .. " " .. opts .. " lock")
    assert.matches("^a\t1\nb\tnil\tstore_unavailable: store " .. path:gsub("%p", "%%%0") .. ": database is locked",
      again.stdout)
    assert.not_matches("b runs", again.stdout)
    os.remove(path)
  end)
end)

describe("a stored record the store did not write (a corrupt file, a hand-edited row)", function()
  it("is refused as store_unavailable: the step is not run again, once does not replay garbage", function()
    local path = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      print("step", resil.step("paid", function() print("paid runs") return { url = "https://x/1.png" } end))
      print("once", resil.once("job-1", function() print("once runs") return 7 end))
    ]])
    local cmd = ("%s --store '%s' --run r1 %s"):format(helpers.resil, path, script)
    local first = helpers.run(cmd)
    assert.are.equal(0, first.code, first.stderr)
    assert.matches("paid runs", first.stdout)
    -- the stored results become bytes the store never wrote
    local corrupt = helpers.run(("%s -e %q"):format(helpers.resil, ([[
      local resil = require "resil"
      local db = assert(resil.sqlite.open(%q))
      db:now(function(tx)
        tx:exec("UPDATE steps SET result = '{\"n\":\"x\"}'")
        tx:exec("UPDATE idempotency SET result = 'not json at all'")
      end)
    ]]):format(path)))
    assert.are.equal(0, corrupt.code, corrupt.stderr)
    local again = helpers.run(cmd)
    assert.not_matches("paid runs", again.stdout)
    assert.not_matches("once runs", again.stdout)
    assert.matches("step\tnil\tstore_unavailable: store: the record of run r1 step 1 is unreadable", again.stdout, 1, true)
    assert.matches("once\tnil\tstore_unavailable: store: the record of once job%-1 is unreadable", again.stdout)
    os.remove(path)
  end)
end)

describe("a step that found the store unavailable", function()
  it("keeps its place: the steps after it keep theirs, and a re-run neither diverges nor replays the wrong one",
    function()
      local path = helpers.tmpname(".db")
      local holder = helpers.write(helpers.tmpname(".lua"), ([[
        local resil = require "resil"
        local db = assert(resil.sqlite.open(%q))
        db:now(function(tx) io.stdout:write("holding\n"); io.stdout:flush(); os.execute("sleep 1") end)
      ]]):format(path))
      assert(resil.store(path)) -- the schema, before anyone holds the lock
      local script = helpers.write(helpers.tmpname(".lua"), ([[
        local resil = require "resil"
        if ... == "lock" then
          local h = io.popen(%q .. " " .. %q)
          assert(h:read("l") == "holding")
          print("a", resil.step("a", function() print("a runs") return 1 end))
          while resil.store():set("probe", "x") == nil do resil.sleep(0.1) end -- the lock is free again
        else
          print("a", resil.step("a", function() print("a runs") return 1 end))
        end
        print("b", resil.step("b", function() print("b runs") return 2 end))
      ]]):format(helpers.resil, holder))
      local cmd = ("%s --store '%s?timeout=0.3' --run r1 %s"):format(helpers.resil, path, script)
      local first = helpers.run(cmd .. " lock")
      assert.are.equal(0, first.code, first.stderr)
      assert.matches("a\tnil\tstore_unavailable", first.stdout)
      assert.matches("b runs\nb\t2\n", first.stdout, 1, true)
      local again = helpers.run(cmd)
      assert.are.equal(0, again.code, again.stderr)
      assert.are.equal("a runs\na\t1\nb\t2\n", again.stdout) -- a runs now; b is its own record
      os.remove(path)
    end)
end)

-- resil.once whose record could not be written at the end (another process
-- held SQLite's write lock past the timeout): the record went on naming this
-- live process as running fn, so the key was "in progress" for as long as
-- the process lived, here and everywhere, and the caller lost fn's result.
describe("resil.once and settles when the store is unavailable as they end", function()
  local path
  before_each(function()
    resil.clock.real()
    path = helpers.tmpname(".db")
    resil.store_config({ url = path .. "?timeout=0.1" })
    assert(resil.store())
  end)
  after_each(function() os.remove(path) end)

  local function lock_for_a_while() return hold_write_lock(path, 0.4) end

  it("returns fn's results and stores them once the store is back: nobody runs fn again", function()
    local runs = 0
    local function job()
      runs = runs + 1
      lock_for_a_while()
      return "paid", runs
    end
    assert.are.same({ "paid", 1 }, { resil.once("job", job) })
    -- a second copy in another process, and this one, get the stored result
    local pid, out = helpers.start([[
local resil = require "resil"
print(resil.once({ key = "job", wait = 3 }, function() return "ran again" end))
]], ("--store %s --log-level off"):format(path))
    assert.are.same({ "paid", 1 }, { resil.once({ key = "job", wait = 3 }, job) })
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.are.equal("paid\t1\n", helpers.slurp(out))
    assert.are.equal(1, runs)
  end)

  -- (policies.ai logs a settle that failed and goes on: the call was paid, and
  -- its hold stopped counting at its expiry with nothing spent)
  it("a ticket's settle is written when the store is back, once", function()
    local budget = resil.budget("settle-later", { limit = 1 })
    local t = assert(budget:reserve(0.5))
    local holder = lock_for_a_while()
    local ok, err = t:settle(0.4, { provider = "p" })
    assert.is_nil(ok)
    assert.are.same({ "store_unavailable", true }, { err.kind, err.retrying })
    assert.is_true(helpers.wait_until(function() return not helpers.alive(holder) end, 10))
    assert.is_true(helpers.wait_until(function() return budget:state().spent > 0 end, 5))
    assert.is_false(t:settle(0.4, { provider = "p" })) -- the caller's own retry: kept once
    local st = budget:state()
    assert.are.same({ 0.4, 0 }, { st.spent, st.reserved })
    assert.are.equal(0.4, resil.cost.total())
  end)

  it("a failed fn frees its key once the store is back", function()
    local holder
    local ok = pcall(resil.once, "failing", function()
      holder = lock_for_a_while()
      error("provider down")
    end)
    assert.is_false(ok)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(holder) end, 10))
    assert.are.equal("second try", resil.once({ key = "failing", wait = 3 }, function() return "second try" end))
  end)
end)
