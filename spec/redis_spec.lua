-- The store on Redis: a real redis-server started on a free loopback port
-- for this file, several processes sharing it, and an outage in the middle.
local resil = require "resil"
local helpers = require "spec.helpers"

local port, pid, dir
local db_seq = 0

local function free_port()
  local s = resil.server.listen({ handler = function() end })
  local p = s:port()
  s:close()
  return p
end

local function start_redis()
  local pidfile = dir .. "/redis.pid"
  os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
              "--pidfile %s --databases 64 > /dev/null"):format(port, dir, pidfile))
  assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
  pid = helpers.slurp(pidfile):match("%d+")
  assert(helpers.wait_until(function()
    return os.execute(("redis-cli -p %d ping > /dev/null 2>&1"):format(port)) == true
  end, 10))
  os.remove(dir .. "/dump.rdb") -- (loaded: the next start is empty unless stop_redis(true) saves again)
end

-- keep: its keys saved first (SAVE), for the next start_redis to load: a server restarted with its data
local function stop_redis(keep)
  if pid and keep then os.execute(("redis-cli -p %d save > /dev/null"):format(port)) end
  if pid then os.execute("kill -9 " .. pid) end
  helpers.wait_until(function() return not helpers.alive(pid) end, 10)
  os.remove(dir .. "/redis.pid")
  pid = nil
end

-- a fresh database number per test, so tests do not see each other's keys
local function fresh_url()
  db_seq = db_seq + 1
  local url = ("redis://127.0.0.1:%d/%d"):format(port, db_seq)
  resil.store_config({ url = url })
  return url
end

setup(function()
  resil.clock.real() -- other processes share these keys: store time must be real time
  dir = helpers.tmpname("-redis")
  os.execute("mkdir -p " .. dir)
  port = free_port()
  start_redis()
end)

teardown(function() stop_redis() end)

-- this process's lease (30 s) made `seconds` until the returned value is closed
local function short_lease(seconds)
  local owner = require "resil.owner"
  local saved = owner.lease
  owner.lease = seconds
  return setmetatable({}, { __close = function() owner.lease = saved end })
end

-- (a sandbox wrapper between: "bad argument #1 to '?'", no file:line)
describe("resil.redis.connect given no table", function()
  it("names the caller's file:line", function()
    local r = helpers.run_script("local resil = require 'resil'\nresil.redis.connect(5)\n")
    assert.are_not.equal(0, r.code)
    assert.matches("%.lua:2: bad argument #1 to 'connect' %(table expected, got number%)", r.stderr)
  end)
end)

describe("resil.once on Redis", function()
  local calls
  local function work(x)
    calls = calls + 1
    resil.sleep(0.05)
    return x * 2
  end
  before_each(function()
    fresh_url()
    calls = 0
    resil.log.level("error")
  end)
  after_each(function() resil.log.level("info") end)

  it("replays the stored result; same-process callers wait for the holder", function()
    local tasks = {}
    for i = 1, 4 do tasks[i] = resil.spawn(resil.once, "job", work, 21) end
    for i = 1, 4 do assert.are.same({ true, 42 }, { tasks[i]:join() }) end
    assert.are.equal(42, (resil.once("job", work, 21)))
    assert.are.equal(1, calls)
    assert.are.equal("redis", resil.store().kind)
  end)

  it("keeps its connection out of the programs a script or the embedder starts", function()
    assert.are.equal(42, (resil.once("inherit", work, 21)))
    assert.are.equal("", helpers.inherited_tcp_sockets())
  end)

  it("in_progress while another holds a fresh lease; a stale lease is taken over", function()
    local s = resil.store()
    local fp = require("resil.once").fingerprint(1)
    local now = resil.store_now()
    assert.are.equal("claimed", helpers.backend(s):once_claim("held", fp, "other", 300, 86400, now, now + 30))
    local _, err = resil.once({ key = "held", wait = 0.1 }, work, 1)
    assert.are.equal("in_progress", err.kind)
    assert.are.equal("claimed", helpers.backend(s):once_claim("stale", fp, "other", 0.05, 86400, now, now + 30))
    resil.sleep(0.1)
    assert.are.equal(2, (resil.once({ key = "stale", lease = 0.05 }, work, 1)))
  end)

  it("key_reused, permanent failures replayed, retryable failures release the key", function()
    resil.once("k", work, 1)
    assert.are.equal("key_reused", select(2, resil.once("k", work, 2)).kind)
    local function refuse()
      calls = calls + 1
      return nil, resil.error("bad_request", "prompt refused", { retryable = false, status = 400 })
    end
    resil.once("perm", refuse)
    assert.are.equal(400, select(2, resil.once("perm", refuse)).status)
    -- other arguments under a key that kept a failure run (the request fixed); an answer kept refuses them
    assert.are.equal("fixed", (resil.once("perm", function() return "fixed" end, "other")))
    assert.are.equal("key_reused", select(2, resil.once("perm", refuse, "third")).kind)
    local flaky_calls = 0
    local function flaky()
      flaky_calls = flaky_calls + 1
      if flaky_calls == 1 then return nil, resil.error("server_error", "503", { retryable = true }) end
      return "ok"
    end
    assert.is_nil((resil.once("flaky", flaky)))
    assert.are.equal("ok", (resil.once("flaky", flaky)))
    assert.are.equal(2, flaky_calls)
    assert.are.equal(2, calls) -- work once, refuse once
  end)

  it("resil.once_replay reads a finished record's results, claiming nothing; a store that is down is false",
    function()
      local s = resil.store()
      local fp = require("resil.once").fingerprint
      local now = resil.store_now()
      assert.is_false(resil.once_replay("peek-none", 1))
      assert.are.equal("claimed", helpers.backend(s):once_claim("peek-none", fp(1), "other", 300, 86400, now, now + 30))
      assert.is_false(resil.once_replay("peek-none", 1)) -- running elsewhere
      assert.are.equal(42, (resil.once({ key = "peek-done", retention = 0.3 }, work, 21)))
      assert.are.same({ true, 42 }, { resil.once_replay("peek-done", 21) })
      assert.is_false(resil.once_replay("peek-done", 22)) -- other arguments: resil.once says key_reused
      resil.sleep(0.4) -- expired
      assert.is_false(resil.once_replay("peek-done", 21))
      assert.are.equal(1, calls)
      resil.store_config({ url = "redis://127.0.0.1:1" }) -- nobody there
      assert.is_false(resil.once_replay("peek-done", 21))
    end)

  it("keeps a running record past its retention while its run goes on: fn runs once", function()
    local asked = false -- the run goes on until the spec has asked (however late, on a slow machine)
    local first = resil.spawn(resil.once, { key = "long-run", fingerprint = "fp", retention = 0.2 }, function()
      calls = calls + 1
      repeat resil.sleep(0.05) until asked
      return "made"
    end)
    resil.sleep(0.4) -- past the retention, the run still going
    local s = resil.store()
    -- what a second process asking for the key is told
    assert.are.equal("in_progress", (helpers.backend(s):once_claim("long-run", "fp", "another-process", 300, 0.2,
      resil.store_now())))
    asked = true
    assert.are.equal("made", select(2, first:join()))
    assert.are.equal(1, calls)
    -- the run over, its record keeps its retention as before
    assert.is_true(helpers.wait_until(function()
      return os.execute(("redis-cli -p %d -n %d exists resil:once:long-run | grep -q '^0'"):format(port, db_seq)) == true
    end, 10))
  end)

  it("renews a running record with the heartbeat: it outlives its first lease", function()
    local _ <close> = short_lease(0.3)
    local asked = false -- the run goes on until the spec has asked
    local first = resil.spawn(resil.once, { key = "beaten", fingerprint = "fp", retention = 0.1 }, function()
      calls = calls + 1
      repeat resil.sleep(0.05) until asked
      return "made"
    end)
    resil.sleep(0.8) -- more than twice the lease: only the beats keep it
    assert.are.equal("in_progress", (helpers.backend(resil.store()):once_claim("beaten", "fp", "another-process", 300,
      0.1, resil.store_now())))
    asked = true
    assert.are.equal("made", select(2, first:join()))
    assert.are.equal(1, calls)
  end)

  -- a command takes at most 64 arguments: the beat sends the running
  -- records in batches (one EVALSHA of all 60 raised, and the heartbeat
  -- stopped for good: no lease and no record renewed after it)
  it("renews running records with the heartbeat when this process runs 60 of them at once", function()
    local _ <close> = short_lease(0.3)
    local tasks, asked = {}, false -- each run goes on until the spec has asked
    for i = 1, 60 do
      tasks[i] = resil.spawn(resil.once, { key = "many-" .. i, fingerprint = "fp", retention = 0.1 }, function()
        calls = calls + 1
        repeat resil.sleep(0.05) until asked
        return "made"
      end)
    end
    resil.sleep(0.8) -- more than twice the lease: only the beats keep them
    assert.are.equal("in_progress", (helpers.backend(resil.store()):once_claim("many-1", "fp", "another-process", 300,
      0.1, resil.store_now())))
    asked = true
    for i = 1, 60 do assert.are.equal("made", select(2, tasks[i]:join())) end
    assert.are.equal(60, calls)
  end)

  it("records expire after their retention (reaped by Redis)", function()
    resil.once({ key = "short", retention = 0.2 }, work, 1)
    assert.is_true(helpers.wait_until(function()
      return os.execute(("redis-cli -p %d -n %d exists resil:once:short | grep -q '^0'"):format(port, db_seq)) == true
    end, 10))
    resil.once({ key = "short", retention = 0.2 }, work, 1)
    assert.are.equal(2, calls)
  end)
end)

describe("the key/value store on Redis", function()
  -- (before: no TCP keepalive: a connection a NAT or a load balancer dropped while idle, or a server host
  -- powered off, looked up until a command waited its whole timeout on it)
  it("keeps its connection with TCP keepalive on", function()
    fresh_url()
    assert.is_true(resil.store():set("keepalive", "1"))
    local me = helpers.slurp("/proc/self/stat"):match("^%d+")
    local ss = io.popen(("ss -tnop state established '( dport = :%d )'"):format(port))
    local listed = ss:read("a")
    ss:close()
    local mine = 0
    for line in listed:gmatch("[^\n]+") do
      if line:find("pid=" .. me .. ",", 1, true) then
        mine = mine + 1
        assert.matches("timer:%(keepalive", line)
      end
    end
    assert.is_true(mine > 0, listed)
  end)

  -- (before: "store_error: ERR invalid expire time": the TTL became PX 0)
  it("takes a TTL under a millisecond as SQLite does: kept that long, not refused", function()
    for _, url in ipairs({ fresh_url(), helpers.tmpname(".db") }) do
      local s = assert(resil.store(url))
      assert.is_true(s:set("brief", "v", 0.0001), url)
      assert.are.equal(2, s:incr("brief-n", 2, 0.0001), url)
      resil.sleep(0.05)
      assert.is_nil(s:get("brief"), url)
      assert.is_true(s:set("kept", "v", 30), url)
      assert.are.equal("v", s:get("kept"), url)
    end
  end)

  -- (before: a Redis that took more than 10 ms to answer, as on a loaded machine, was taken for
  -- a frozen one, and the virtual clock jumped to the next timer while the command was on its
  -- way: a hold's expiry read a minute off, a spec that failed under load)
  it("a command that takes 100 ms does not move the virtual clock", function()
    local s = assert(resil.store(fresh_url()))
    assert.is_true(s:set("slow", "v"))
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local timer = resil.spawn(function() resil.sleep(60) end) -- the next virtual timer: 60 s away
    local t0 = resil.now()
    os.execute("kill -STOP " .. pid .. "; (sleep 0.1; kill -CONT " .. pid .. ") &")
    finally(function() os.execute("kill -CONT " .. pid) end)
    assert.are.equal("v", s:get("slow"))
    assert.are.equal(t0, resil.now())
    timer:cancel()
  end)
end)

describe("budgets on Redis", function()
  before_each(function() fresh_url() end)

  it("1000 concurrent reservations of $0.10 against $5 admit exactly 50 (one process)", function()
    local b = resil.budget("r5", { limit = 5 })
    local items = {}
    for i = 1, 1000 do items[i] = i end
    local admitted = 0
    resil.map(items, function() if b:reserve(0.10) then admitted = admitted + 1 end return true end,
      { concurrency = 1000 })
    assert.are.equal(50, admitted)
    local t = assert(resil.budget("r5b", { limit = 1 }):reserve(0.5))
    assert.is_true(t:settle(0.25))
    assert.is_false(t:settle(0.25))
    assert.are.equal(0.25, resil.budget("r5b"):state().spent)
    assert.are.equal(0.25, resil.cost.total({ budget = "r5b" }))
  end)

  it("across 4 processes: exactly 50 of 1000", function()
    local url = resil.store().url
    local source = [[
local resil = require "resil"
local b = resil.budget("shared-r5", { limit = 5 })
local items = {}
for i = 1, 250 do items[i] = i end
local admitted = 0
resil.map(items, function()
  local t = b:reserve(0.10)
  if t then admitted = admitted + 1; t:settle(0.10) end -- a process that exits holding nothing back
  return true
end, { concurrency = 250 })
print(admitted)
]]
    assert.are.equal(50, helpers.sum_of(helpers.run_together(4, source, "--store " .. url .. " --log-level off")))
  end)

  -- (before: each refusal read the owner of every live hold to look for dead ones, 606 us of the shared
  -- server's time with 1,000 holds against 15 us for a reserve: a client hammering a full budget held it)
  it("a full budget hammered: each refusal refuses, dead owners' holds are looked for at most once a second, " ..
    "and a killed owner's hold is still released", function()
    local url = resil.store().url
    local b = resil.budget("hammered", { limit = 5 })
    for _ = 1, 100 do assert(b:reserve(0.03)) end -- $3 in 100 live holds
    local pid_file, go = helpers.tmpname(".pid"), helpers.tmpname(".go")
    local holder = helpers.start(([[
local resil = require "resil"
assert(resil.budget("hammered", { limit = 5 }):reserve(1.5))
local f = io.open(%q, "w") f:write("held") f:close()
resil.sleep(600)
]]):format(go), "--store " .. url .. " --log-level off")
    finally(function() os.execute("kill -9 " .. holder .. " 2>/dev/null") end)
    assert(helpers.wait_until(function() return helpers.slurp(go) == "held" end, 20))
    local function hgets()
      local info = helpers.run(("redis-cli -p %d info commandstats"):format(port)).stdout
      return tonumber(info:match("cmdstat_hget:calls=(%d+)") or "0")
    end
    os.execute(("redis-cli -p %d config resetstat > /dev/null"):format(port))
    for _ = 1, 300 do
      local t, err = b:reserve(1)
      assert.is_nil(t)
      assert.are.equal("budget_exceeded", err.kind)
    end
    -- each look reads 101 holds' owners: 300 looks before
    assert.is_true(hgets() < 101 * 30, "HGET calls: " .. hgets())
    os.execute("kill -9 " .. holder)
    assert(helpers.wait_until(function() return not helpers.alive(holder) end, 10))
    assert.is_true(helpers.wait_until(function() return b:reserve(1) ~= nil end, 10))
    assert.is_nil((b:reserve(1.01))) -- ($3 + $1 held: only the dead one's $1.5 was released)
  end)

  -- Each reservation wrote a key (its ticket's state) that Redis kept for ever: a gateway
  -- left one per request behind.
  it("a ticket's record is kept a day past its hold, then Redis drops it; the ledger still dedupes", function()
    local conn = helpers.backend(resil.store()).conn
    local b = resil.budget("ttl", { limit = 10, hold = 600 })
    local settled, released, held = assert(b:reserve(1)), assert(b:reserve(1)), assert(b:reserve(1))
    local swept = assert(b:reserve(1, { hold = 60 }))
    assert.is_true(settled:settle(0.5, { provider = "p" }))
    assert.is_true(released:release())
    assert.are.equal(2, require("resil.budgets").release(resil.store(), "ttl")) -- `budgets release`
    local function ttl(t) return conn:call("PTTL", "resil:ticket:" .. t.id) / 1000 end
    for _, t in ipairs({ settled, released, held }) do
      local left = ttl(t)
      assert.is_true(left > 86400 - 5 and left <= 86400 + 600, t.id .. ": " .. left)
    end
    assert.is_true(ttl(swept) > 86400 - 5)
    -- the record gone (a day later), a second settle finds the ticket in the ledger: nothing spent twice
    conn:call("DEL", "resil:ticket:" .. settled.id)
    assert.is_false(settled:settle(0.5, { provider = "p" }))
    assert.are.equal(0.5, b:state().spent)
    assert.are.equal(0.5, resil.cost.total())
  end)
end)

describe("the ledger on Redis, large", function()
  before_each(function() fresh_url() end)

  it("reports read it a page at a time: a server's client-output-buffer-limit below the whole ledger's size " ..
     "does not cut the report off (one LRANGE of it all did)", function()
    for i = 1, 3500 do
      assert(resil.cost.record({ provider = i % 2 == 0 and "even" or "odd", model = "m", usd = 0.001,
        user = "a-user-name-of-some-length", id = "row-" .. i, wait = false }))
    end
    assert.are.equal(3.5, resil.cost.total()) -- (every row written)
    local function limit(v)
      os.execute(("redis-cli -p %d config set client-output-buffer-limit '%s' > /dev/null"):format(port, v))
    end
    limit("normal 512kb 512kb 0") -- the ledger's rows are some 900 KB
    finally(function() limit("normal 0 0 0") end)
    assert.are.equal(3.5, resil.cost.total())
    local calls = {}
    for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do calls[g.key] = g.calls end
    assert.are.same({ even = 1750, odd = 1750 }, calls)
    assert.are.equal(3500, #assert(helpers.backend(resil.store()):cost_rows({})))
  end)
end)

describe("the ledger on Redis with wait = false", function()
  before_each(function() fresh_url() end)

  -- a script on a database of its own: a budget's two tickets (t1, t2), rows and a settle that load
  -- the scripts, the server's scripts flushed, then `after` -> its run
  local function run_flushed(after)
    return helpers.run_script(([[
local resil = require "resil"
local budget = resil.budget("flushed", { limit = 1 })
local t1, t2 = assert(budget:reserve(0.1)), assert(budget:reserve(0.1))
assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f1", wait = false })) -- (loads the script)
assert(t1:settle(0.01, { provider = "flushed", wait = false })) -- (and this one)
assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f2" })) -- (its reply after the loads')
os.execute("redis-cli -p %d script flush > /dev/null")
]]):format(port) .. after, "--store " .. fresh_url())
  end
  -- each of its rows written once (0.01 each), both settles counted, nothing held
  local function assert_flushed(r, rows)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(rows, resil.cost.breakdown("provider")[1].calls)
    assert.are.equal(rows / 100, resil.cost.total({ provider = "flushed" }))
    local state = resil.budget("flushed", { limit = 1 }):state()
    assert.are.same({ 0.02, 0 }, { state.spent, state.reserved })
  end

  it("a read right after a record or a settle that did not wait sees it", function()
    assert(resil.cost.total()) -- connected, as a gateway's store is
    assert(resil.cost.record({ provider = "later", usd = 0.25, wait = false }))
    assert.are.equal(0.25, resil.cost.total({ provider = "later" }))
    local b = resil.budget("later", { limit = 10 })
    local ticket = assert(b:reserve(1))
    assert.is_true(ticket:settle(0.5, { provider = "later", wait = false }))
    assert.are.equal(0.75, resil.cost.total({ provider = "later" }))
    assert.are.same({ 0.5, 0 }, { b:state().spent, b:state().reserved })
  end)

  it("rows recorded just before the host closes its Lua state are written (os.exit(0, true), as resil_close)",
    function()
      local url = resil.store().url
      local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 5 do assert(resil.cost.record({ provider = "closing", usd = 0.01, wait = false })) end
os.exit(0, true)
]], "--store " .. url)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal(0.05, resil.cost.total({ provider = "closing" }))
      assert.are.equal(5, resil.cost.breakdown("provider")[1].calls)
    end)

  it("a burst of rows as a script ends, before the server knows the script: every row is written (the closing " ..
     "connection was reset with 116 of 200 unread), and the script is loaded once, not once a row", function()
    local url = fresh_url()
    local function script_loads()
      local f = assert(io.popen(("redis-cli -p %d info commandstats"):format(port)))
      local text = f:read("a")
      f:close()
      return tonumber(text:match("cmdstat_script|load:calls=(%d+)") or text:match("cmdstat_script:calls=(%d+)") or 0)
    end
    os.execute(("redis-cli -p %d script flush > /dev/null"):format(port))
    local before = script_loads()
    local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 200 do assert(resil.cost.record({ provider = "burst", usd = 0.01, id = "b" .. i, wait = false })) end
]], "--store " .. url)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(200, resil.cost.breakdown("provider")[1].calls)
    assert.is_true(script_loads() - before <= 2, ("%d SCRIPT calls for 200 rows"):format(script_loads() - before))
  end)

  it("a row nobody waits for, sent by SHA after the server's scripts were flushed (NOSCRIPT): written whole, once",
    function()
    assert_flushed(run_flushed([[
assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f3", wait = false }))
assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f3", wait = false }))
assert(t2:settle(0.01, { provider = "flushed", wait = false }))
-- (waited for: f3's answers came before it, so each was sent again whole before the script ends)
assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f4" }))
]]), 6)
  end)

  it("rows nobody waits for, sent by SHA just after the server's scripts were flushed, as the script ends: " ..
     "each written once (their NOSCRIPT answers came to a closing connection, and the rows were lost)", function()
    assert_flushed(run_flushed([[
for i = 3, 7 do assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f" .. i, wait = false })) end
assert(resil.cost.record({ provider = "flushed", usd = 0.01, id = "f7", wait = false })) -- (a retry: once)
assert(t2:settle(0.01, { provider = "flushed", wait = false }))
]]), 9)
  end)

  it("rows sent as the script ends to a server restarted meanwhile (kill -9, started again empty): each " ..
     "written once, on a new connection (the closing connection's were lost without a word)", function()
    local url = fresh_url()
    local restart = ("kill -9 %s; while kill -0 %s 2>/dev/null; do sleep 0.01; done; " ..
      "redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
      "--pidfile %s/redis.pid --databases 64 > /dev/null; " ..
      "until redis-cli -p %d ping > /dev/null 2>&1; do sleep 0.01; done"):format(pid, pid, port, dir, dir, port)
    local r = helpers.run_script(([[
local resil = require "resil"
local budget = resil.budget("restarted", { limit = 1 })
assert(resil.cost.record({ provider = "before", usd = 0.01, id = "r0" })) -- (loads the scripts)
local ticket = assert(budget:reserve(0.1))
assert(resil.cost.record({ provider = "before", usd = 0.01, id = "r00", wait = false }))
assert(ticket:settle(0, { provider = "before" })) -- (all answered)
os.execute(%q)
for i = 1, 40 do assert(resil.cost.record({ provider = "restarted", usd = 0.01, id = "r" .. i, wait = false })) end
for i = 1, 40 do assert(resil.cost.record({ provider = "restarted", usd = 0.01, wait = false })) end
]]):format(restart), "--store " .. url)
    helpers.wait_until(function() return helpers.slurp(dir .. "/redis.pid"):match("%d+") ~= nil end, 5)
    pid = helpers.slurp(dir .. "/redis.pid"):match("%d+")
    assert.are.equal(0, r.code, r.stderr)
    local by = assert(resil.cost.breakdown("provider"))
    assert.are.equal(1, #by, r.stderr) -- (the rows before went with the old server's memory)
    assert.are.same({ "restarted", 80 }, { by[1].key, by[1].calls })
    assert.are.equal(0.8, resil.cost.total({ provider = "restarted" }))
  end)

  it("a frozen Redis (SIGSTOP past the timeout): the rows are tried again once it thaws, each written once",
    function()
      local url = fresh_url():gsub("$", "?timeout=0.3")
      local r = helpers.run_script(([[
local resil = require "resil"
resil.log.level("off")
local ticket = assert(resil.budget("frozen", { limit = 1 }):reserve(0.5))
os.execute("kill -STOP %s; (sleep 0.6; kill -CONT %s) &")
for i = 1, 5 do assert(resil.cost.record({ provider = "frozen", usd = 0.01, wait = false })) end
assert(resil.cost.record({ provider = "frozen", usd = 0.01, id = "keyed", wait = false }))
assert(ticket:settle(0.01, { provider = "frozen", wait = false }))
resil.sleep(1) -- their commands time out (and are tried again) meanwhile
]]):format(pid, pid), "--store '" .. url .. "'")
      assert.are.equal(0, r.code, r.stderr)
      resil.store_config({ url = url })
      local by = assert(resil.cost.breakdown("provider"))
      assert.are.equal(7, by[1] and by[1].calls, r.stderr)
    end)
end)

describe("the ledger on Redis with wait = false, Redis down", function()
  it("past 10,000 rows not yet written (each tried again), the next caller writes as with wait = true and gets " ..
     "its error: memory stays bounded", function()
    local r = helpers.run_script([[
local resil = require "resil"
resil.log.level("off")
for i = 1, 10000 do assert(resil.cost.record({ provider = "down", usd = 0.01, wait = false })) end
local ok, err = resil.cost.record({ provider = "down", usd = 0.01, wait = false })
print(ok, err and err.kind)
os.exit(0)
]], ("--store redis://127.0.0.1:%d/0"):format(free_port()))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("nil\tstore_unavailable\n", r.stdout)
  end)
end)

describe("the ledger on Redis with wait = false, Redis down as the process ends", function()
  it("keeps each row still being tried again in the ledger's journal, named in its log", function()
    local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 3 do assert(resil.cost.record({ provider = "down", usd = 0.25, id = "row-" .. i, wait = false })) end
resil.sleep(0.2)
os.exit(0)
]], ("--store redis://127.0.0.1:%d/0?timeout=0.1"):format(free_port()))
    assert.are.equal(0, r.code, r.stderr)
    -- (dropped without a word once; then each said lost: "its cost is not in the ledger")
    assert.are.same({}, helpers.rows_logged_lost(r.stderr), r.stderr)
    assert.are.same({ "row-1 0.25", "row-2 0.25", "row-3 0.25" }, helpers.rows_logged_kept(r.stderr), r.stderr)
  end)
end)

describe("the ledger on Redis with wait = false, Redis frozen as the process ends", function()
  it("a row sent to the frozen server is said to be perhaps written, not lost: the server runs it as it thaws",
    function()
      local url = fresh_url()
      local r = helpers.run_script(([[
local resil = require "resil"
assert(resil.store():set("warm", "1")) -- the connection is up
os.execute("kill -STOP %s")
assert(resil.cost.record({ provider = "frozen", usd = 0.25, id = "sent-1", wait = false }))
resil.sleep(0.6) -- no reply within the timeout: tried again meanwhile
os.exit(0)
]]):format(pid), "--store '" .. url .. "?timeout=0.2'")
      os.execute("kill -CONT " .. pid)
      assert.are.equal(0, r.code, r.stderr)
      -- (before: "a cost row was not written before the process ended; its cost is not in the
      -- ledger", for a row the thawed server then wrote: an operator entering it counted it twice)
      assert.are.same({}, helpers.rows_logged_lost(r.stderr), r.stderr)
      -- (then "may not have been written before the process ended": now kept, written once by its id)
      assert.are.same({ "sent-1 0.25" }, helpers.rows_logged_kept(r.stderr), r.stderr)
      assert.is_true(helpers.wait_until(function()
        local by = resil.cost.breakdown("provider")
        return by ~= nil and by[1] ~= nil and by[1].calls == 1
      end, 10))
    end)
end)

describe("runs on Redis", function()
  before_each(fresh_url)

  it("record how they ended, after their last task: done or failed", function()
    local url = resil.store().url
    local source = [[
local resil = require "resil"
resil.step("one", function() return 1 end)
if arg[1] == "fail" then error("step two broke") end
resil.step("two", function() return 2 end)
]]
    local ok = helpers.run_script(source, "--store " .. url .. " --run good-run --log-level off")
    assert.are.equal(0, ok.code, ok.stderr)
    local bad = helpers.run_script(source, "--store " .. url .. " --run bad-run --log-level off", "fail")
    assert.are.equal(1, bad.code)
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, url))
    assert.are.equal(0, runs.code, runs.stderr)
    assert.matches("good%-run%s+done%s+2", runs.stdout)
    assert.matches("bad%-run%s+failed%s+1", runs.stdout)
  end)
end)

describe("a database the server does not have", function()
  it("fails every operation naming it, and writes nothing to database 0 meanwhile", function()
    -- (the server has 64 databases: 0 to 63)
    local r = helpers.run_script([[
local resil = require "resil"
print(select(2, resil.cost.record({ provider = "p", model = "m", usd = 1 })))
print(select(2, resil.step("one", function() return 1 end)))
print(select(2, resil.store():set("k", "v")))
print(resil.cost.record({ provider = "p", model = "m", usd = 2, wait = false }))
]], ("--store redis://127.0.0.1:%d/64 --run other-db --log-level off"):format(port))
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    for i = 1, 3 do
      assert.matches("store_unavailable: redis 127.0.0.1:%d+: database 64: ERR DB index is out of range", lines[i])
    end
    local keys = helpers.run(("redis-cli -p %d -n 0 dbsize"):format(port))
    assert.are.equal("0", keys.stdout:match("%d+"), "database 0 got the keys: " ..
      helpers.run(("redis-cli -p %d -n 0 keys '*'"):format(port)).stdout)
  end)
end)

describe("a server restarted with fewer databases", function()
  -- (before: once this database had been selected on the server, every write retried through an
  -- outage went behind a new connection's SELECT, and a server back with fewer databases ran each
  -- of them in database 0, another app's keys: a second settle's row and spend landed there too)
  it("gets at most the retried write that found it out in database 0, no other", function()
    local rdir = helpers.tmpname("-redis-fewer")
    os.execute("mkdir -p " .. rdir)
    local rport, pidfile = free_port(), rdir .. "/redis.pid"
    local start = ("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
      "--pidfile %s > /dev/null; until redis-cli -p %d ping > /dev/null 2>&1; do sleep 0.05; done"):format(rport, rdir,
      pidfile, rport)
    os.execute(start:gsub("> /dev/null;", "--databases 16 > /dev/null;", 1))
    finally(function() os.execute("kill -9 $(cat " .. pidfile .. "); rm -rf " .. rdir) end)
    local restart = ("kill -9 $(cat %s); while redis-cli -p %d ping > /dev/null 2>&1; do sleep 0.05; done; %s"):format(
      pidfile, rport, start:gsub("> /dev/null;", "--databases 4 > /dev/null;", 1))
    local r = helpers.run_script(([[
local resil = require "resil"
local b = resil.budget("fewer", { limit = 100 })
local first, second = assert(b:reserve(1, { hold = 600 })), assert(b:reserve(1, { hold = 600 }))
os.execute(%q)
first:settle(0.5) -- (on the connection the restart closed: tried again)
second:settle(0.25)
resil.sleep(120) -- (their retries, for a minute)
]]):format(restart), ("--virtual-clock --store 'redis://127.0.0.1:%d/10?timeout=1' --log-level off"):format(rport))
    assert.are.equal(0, r.code, r.stderr)
    local rows = helpers.run(("redis-cli -p %d -n 0 lrange resil:costs 0 -1"):format(rport)).stdout
    local n = select(2, rows:gsub("micro_usd", ""))
    assert.is_true(n <= 1, rows)
  end)
end)

describe("shared limits across processes on Redis", function()
  before_each(function() fresh_url() end)

  it("a shared bucket admits no more than its limit across 4 processes", function()
    local url = resil.store().url
    local source = [[
local resil = require "resil"
local b = resil.bucket("shared-gcra", { rate = 10, per = 3600, burst = 10, shared = true })
local admitted = 0
for _ = 1, 20 do if b:try(1) then admitted = admitted + 1 end end
print(admitted)
]]
    assert.are.equal(10, helpers.sum_of(helpers.run_together(4, source, "--store " .. url .. " --log-level off")))
  end)

  it("a shared bucket at burst 1 paces exactly: each waiter books its slot in one script call", function()
    resil.clock.virtual() -- one process: the script takes the times it is given
    finally(function() resil.clock.real() end)
    local b = resil.bucket("redis-pace", { rate = 200, per = 1, burst = 1, shared = true })
    local s = resil.store()
    local ops0, t0 = s:stats().ops, resil.now()
    local times, per_task, tasks = {}, {}, {}
    for i = 1, 100 do
      per_task[i] = 0
      tasks[i] = resil.spawn(function()
        while true do
          assert(b:acquire(1))
          local t = resil.now() - t0
          if t >= 10 then return end
          times[#times + 1], per_task[i] = t, per_task[i] + 1
        end
      end)
    end
    for i = 1, 100 do assert(tasks[i]:join()) end
    assert.is_true(math.abs(#times - 2000) <= 20, #times .. " admitted")
    for i = 2, #times do
      assert.is_true(math.abs(times[i] - times[i - 1] - 0.005) < 1e-5, ("gap %.6f at %d"):format(times[i] - times[i - 1], i))
    end
    for i = 1, 100 do assert.is_true(math.abs(per_task[i] - 20) <= 1, "task " .. i .. ": " .. per_task[i]) end
    assert.is_true(s:stats().ops - ops0 <= #times + 100, "asked again")
  end)

  it("try, asked again after the wait it gives, admits no more than the rate on a virtual clock", function()
    -- the arrival time must outlive its TTL on the server's clock, which does not follow the virtual one
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local b = resil.bucket("redis-try", { rate = 200, per = 1, burst = 1, shared = true })
    -- (10 tasks: each refused try sleeps the same 5 ms, so every slot is asked for by every task, one
    -- script call each: 100 tasks made 200,000 calls, past the suite's 300 s on a loaded machine)
    local t0, admitted, tasks = resil.now(), 0, {}
    for i = 1, 10 do
      tasks[i] = resil.spawn(function()
        while true do
          local ok, wait = b:try(1)
          if resil.now() - t0 >= 10 then return end
          if ok then admitted = admitted + 1 else resil.sleep(wait) end
        end
      end)
    end
    for i = 1, 10 do assert(tasks[i]:join()) end
    assert.is_true(math.abs(admitted - 2000) <= 20, admitted .. " admitted")
  end)

  -- (before: a shared bucket had no refund or charge: a gateway key's tokens per minute on Redis could
  -- not be corrected by the usage an answer reported)
  it("refund and charge correct an estimate in one script each; the key's expiry follows its arrival time",
    function()
      resil.clock.virtual() -- one process: the script takes the times it is given
      finally(function() resil.clock.real() end)
      local b = resil.bucket("redis-adjust", { rate = 10, per = 1, burst = 10, shared = true })
      local function pttl()
        local r = helpers.run(("redis-cli -p %d -n %d pttl resil:gcra:bucket:redis-adjust"):format(port, db_seq))
        return tonumber(r.stdout:match("%-?%d+"))
      end
      assert.is_true((b:acquire(10)))
      assert.are.equal(4, b:refund(4)) -- the answer used 6 of the 10 estimated
      assert.are.same({ true, 0 }, { b:try(4) })
      assert.are.equal(0, b:charge(6)) -- one used 6 more than its estimate: in debt
      local ok, wait = b:try(1)
      assert.is_false(ok)
      assert.is_true(math.abs(wait - 0.7) < 1e-6, wait)
      -- more given back than was taken: full, no fuller; kept a minute as gcra_take keeps it
      assert.are.equal(10, b:refund(100))
      assert.is_true(pttl() <= 60000, pttl())
      assert.is_true((b:try(10)))
      assert.is_false((b:try(1)))
      -- a garbage count: a long debt, its key kept as long (not expired into a full bucket)
      assert.are.equal(0, b:charge(1e17))
      ok, wait = b:try(1)
      assert.is_false(ok)
      assert.is_true(wait > 86400 * 365, wait)
      assert.is_true(pttl() > wait * 1000, pttl())
    end)

  -- (before: one short, now and then, at a fine interval: the arrival times are seconds since 1970 to the
  -- microsecond, and that rounding was taken for a token missing)
  it("counts what is left exactly at a fine interval", function()
    resil.clock.virtual() -- one process: the script takes the times it is given
    finally(function() resil.clock.real() end)
    local b = resil.bucket("redis-fine", { rate = 1000, per = 1, burst = 1000, shared = true })
    helpers.counts_exactly(b)
  end)

  -- (before: a shared bucket had no observe nor wait_time: a provider with shared limits crashed every call)
  it("a provider's pause observed by one process holds back another: one script call, none for plenty left",
    function()
      local url = resil.store().url
      local b = resil.bucket("redis-observe", { rate = 100, per = 60, burst = 100, shared = true })
      local s = resil.store()
      assert.is_true((b:acquire(1)))
      local ops = s:stats().ops
      b:observe({ ["x-ratelimit-remaining-requests"] = "97", ["x-ratelimit-reset-requests"] = "1s" })
      assert.are.equal(ops, s:stats().ops) -- near what we know: no script call
      assert.is_true(b:observe({ ["x-ratelimit-remaining-requests"] = "0", ["x-ratelimit-reset-requests"] = "30s" }) > 29)
      assert.are.equal(ops + 1, s:stats().ops)
      local r = helpers.run_script([[
local resil = require "resil"
local b = resil.bucket("redis-observe", { rate = 100, per = 60, burst = 100, shared = true })
local ok, wait = b:try(1)
print(ok, wait > 25 and wait <= 30)
]], "--store " .. url .. " --log-level off")
      assert.are.equal("false\ttrue\n", r.stdout, r.stderr)
    end)

  -- (before: another process's calls, answered during the pause, gave back what they did not use of
  -- their estimates, and that pulled the arrival time back into the pause)
  it("a provider's pause holds though another process gives back what its calls did not use", function()
    local url = resil.store().url
    local b = resil.bucket("redis-pause-refund", { rate = 30000, per = 60, unit = "tokens", shared = true })
    assert.is_true((b:acquire(4000)))
    assert.is_true(b:observe({ ["retry-after"] = "20" }) > 19)
    local r = helpers.run_script([[
local resil = require "resil"
local b = resil.bucket("redis-pause-refund", { rate = 30000, per = 60, unit = "tokens", shared = true })
for _ = 1, 10 do b:refund(3500) end
local ok, wait = b:try(1)
print(ok, wait > 15 and wait <= 20)
]], "--store " .. url .. " --log-level off")
    assert.are.equal("false\ttrue\n", r.stdout, r.stderr)
    -- kept as long as an arrival time there would be: a minute past it
    r = helpers.run(("redis-cli -p %d -n %d pttl resil:gcra:pause:bucket:redis-pause-refund"):format(port, db_seq))
    local pttl = tonumber(r.stdout:match("%-?%d+"))
    assert.is_true(pttl > 60000 + 60000 and pttl <= 20000 + 60000 + 60000, pttl)
  end)

  it("resil.acquire_all takes a provider's shared requests and tokens in one script call, all or none", function()
    resil.clock.virtual() -- one process: the script takes the times it is given
    finally(function() resil.clock.real() end)
    local rpm = resil.bucket("redis-all-rpm", { rate = 10, per = 1, burst = 2, shared = true })
    local tpm = resil.bucket("redis-all-tpm", { rate = 100, per = 1, burst = 100, unit = "tokens", shared = true })
    local s = resil.store()
    local ops = s:stats().ops
    assert.is_true(resil.acquire_all({ { rpm, 1 }, { tpm, 60 } }))
    assert.are.equal(ops + 1, s:stats().ops)
    local ok, err = resil.acquire_all({ { rpm, 1 }, { tpm, 60 } }, { timeout = 0.1 })
    assert.is_nil(ok)
    assert.are.same({ "rate_limited", "redis-all-tpm" }, { err.kind, err.bucket })
    assert.is_true(math.abs(err.retry_after - 0.2) < 1e-6, err.retry_after)
    assert.are.same({ true, 0 }, { rpm:try(1) }) -- the refused call took none of rpm's
    assert.is_true((rpm:refund(1) == 1))
    local t0 = resil.now()
    assert.is_true(resil.acquire_all({ { rpm, 1 }, { tpm, 60 } })) -- books both: one call, one sleep
    assert.is_true(math.abs(resil.now() - t0 - 0.2) < 1e-6, resil.now() - t0)
    assert.is_false((tpm:try(1)))
  end)

  it("four processes waiting on one shared bucket: one script call per admission", function()
    local url = resil.store().url
    local source = [[
local resil = require "resil"
local b = resil.bucket("redis-pace-4", { rate = 200, per = 1, burst = 1, shared = true })
local admitted = 0
resil.map({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25 }, function()
  assert(b:acquire(1))
  admitted = admitted + 1
  return true
end, { concurrency = 25 })
print(admitted, resil.store():stats().ops)
]]
    local admitted, ops = 0, 0
    for _, out in ipairs(helpers.run_together(4, source, "--store " .. url .. " --log-level off")) do
      local a, o = out:match("^(%d+)%s+(%d+)")
      assert(a, out)
      admitted, ops = admitted + tonumber(a), ops + tonumber(o)
    end
    assert.are.equal(100, admitted)
    assert.are.equal(100, ops)
  end)

  -- (before: the script ran and its reply was dropped: the token, or the slot booked ahead, was
  -- no one's, and every process's callers waited that much more for each client gone so)
  it("a caller canceled while its take is on its way to the server gets nothing, and the store gives it back",
    function()
    local s = resil.store()
    finally(function() os.execute(("redis-cli -p %d client unpause > /dev/null"):format(port)) end)
    -- -> whether the store was asked something more once the take had run (the give back)
    local function canceled_in_flight(b)
      os.execute(("redis-cli -p %d client pause 5000 write > /dev/null"):format(port))
      local t = resil.spawn(function() return b:acquire(1, { timeout = 7200 }) end)
      resil.sleep(0.1) -- sent: the script waits behind the pause
      t:cancel()
      local ops = s:stats().ops
      os.execute(("redis-cli -p %d client unpause > /dev/null"):format(port))
      return helpers.wait_until(function() return s:stats().ops > ops end, 5)
    end
    -- a token there now: taken by the script, and given back
    local now = resil.bucket("redis-canceled-now", { rate = 1, per = 3600, burst = 2, shared = true })
    assert(now:acquire(1))
    assert.is_true(canceled_in_flight(now), "nothing given back")
    assert.is_true(now:try(1))
    -- none left: the slot an hour ahead, booked by the script, given back
    local ahead = resil.bucket("redis-canceled-ahead", { rate = 1, per = 3600, burst = 1, shared = true })
    assert(ahead:acquire(1))
    assert.is_true(canceled_in_flight(ahead), "nothing given back")
    local ok, wait = ahead:try(1)
    assert.is_false(ok)
    assert.is_true(wait < 3601, wait) -- (kept, 7200: the next caller waited an hour more)
    -- the answer in, its caller canceled before it resumed (by a task the same read of replies woke
    -- first): given back as well
    local late = resil.bucket("redis-canceled-late", { rate = 1, per = 3600, burst = 2, shared = true })
    assert(late:acquire(1))
    assert(s:incr("late"))
    os.execute(("redis-cli -p %d client pause 5000 write > /dev/null"):format(port))
    local taker
    local canceler = resil.spawn(function() s:incr("late"); taker:cancel() end)
    resil.sleep(0.05)
    taker = resil.spawn(function() return late:acquire(1, { timeout = 7200 }) end)
    resil.sleep(0.05)
    local ops = s:stats().ops
    os.execute(("redis-cli -p %d client unpause > /dev/null"):format(port))
    assert(canceler:join())
    assert.is_false((taker:join()))
    assert.is_true(helpers.wait_until(function() return s:stats().ops > ops end, 5), "nothing given back")
    assert.is_true(late:try(1))
  end)

  -- (before: the probe's script ran and its reply was dropped: the slot stayed taken for
  -- probe_timeout, every process refused "open (shared)" with nobody probing)
  it("a shared breaker's caller canceled while its half-open probe is asked for gives the probe back", function()
    finally(function() os.execute(("redis-cli -p %d client unpause > /dev/null"):format(port)) end)
    local br = resil.breaker("redis-canceled-probe", { shared = true, window_type = "count", window = 1,
      min_calls = 1, failure_rate = 0.5, open_for = 0.2, probe_timeout = 3600 })
    br:record(false, 0.01)
    assert.is_nil((br:allow())) -- open, for everyone
    resil.sleep(0.25) -- half-open in the store
    os.execute(("redis-cli -p %d client pause 5000 write > /dev/null"):format(port))
    local asker = resil.spawn(function() return br:allow() end)
    resil.sleep(0.1) -- sent: the probe's script waits behind the pause
    asker:cancel()
    os.execute(("redis-cli -p %d client unpause > /dev/null"):format(port))
    local ok, probe
    assert.is_true(helpers.wait_until(function()
      ok, probe = br:allow()
      return ok == true
    end, 5), tostring(probe))
    assert.are.equal("probe", probe)
    br:record(true, 0.01, probe)
    assert.are.equal("closed", br:state())
  end)

  it("a shared breaker lets exactly one half-open probe through across processes", function()
    local url = resil.store().url
    local br = resil.breaker("shared-br", { shared = true, window_type = "count", window = 2, min_calls = 2,
                                            open_for = 0.5 })
    br:record(false, 0.01)
    br:record(false, 0.01)
    assert.are.equal("open", br:state())
    local source = [[
local resil = require "resil"
local br = resil.breaker("shared-br", { shared = true, window_type = "count", window = 2, min_calls = 2, open_for = 0.5 })
local ok, probe = br:allow()
-- (the probe reports, as a call does: one that never reports is given back as its host closes)
if probe then br:record(false, 0.01) end
print(ok and 1 or 0)
]]
    -- all four ask at the same moment, after open_for has passed
    assert.are.equal(1, helpers.sum_of(helpers.run_together(4, source, "--store " .. url .. " --log-level off", 1.0)))
  end)

  -- (before: each failed probe opened it for open_for again, open_for_max and backoff taken and ignored)
  it("a shared breaker whose probes fail in a row opens for longer each time, up to open_for_max", function()
    resil.clock.virtual() -- one process: the script takes the times it is given
    finally(function() resil.clock.real() end)
    local br = resil.breaker("shared-backoff", { shared = true, window_type = "count", window = 1, min_calls = 1,
      open_for = 5, open_for_max = 12, backoff = 2 })
    local function open_for()
      local _, err = br:allow()
      return err.retry_after
    end
    br:record(false, 0.01)
    local waits = { open_for() }
    for _ = 1, 3 do
      resil.sleep(waits[#waits])
      assert.are.equal("probe", select(2, br:allow()))
      br:record(false, 0.01, "probe")
      waits[#waits + 1] = open_for()
    end
    assert.are.same({ 5, 10, 12, 12 }, waits)
    resil.sleep(12)
    assert.are.equal("probe", select(2, br:allow()))
    br:record(true, 0.01, "probe")
    assert.are.equal("closed", br:state())
    br:record(false, 0.01) -- (a new outage starts from open_for)
    assert.are.equal(5, open_for())
  end)

  -- (before: a shared breaker had no isolate, "attempt to call a nil value (method 'isolate')")
  it("a shared breaker isolated in one process is isolated in every other until reset", function()
    local url = resil.store().url
    local br = resil.breaker("shared-iso", { shared = true, open_for = 5 })
    br:isolate()
    assert.are.equal("isolated", br:state())
    local source = [[
local resil = require "resil"
local br = resil.breaker("shared-iso", { shared = true, open_for = 5 })
local ok, err = br:allow()
print(br:state(), ok, err and err.message)
]]
    local other = helpers.run_script(source, "--store " .. url .. " --log-level off")
    assert.are.equal("isolated\tnil\tbreaker 'shared-iso' is isolated (shared)\n", other.stdout, other.stderr)
    br:reset()
    other = helpers.run_script(source, "--store " .. url .. " --log-level off")
    assert.are.equal("closed\ttrue\tnil\n", other.stdout, other.stderr)
  end)
end)

describe("a Redis outage", function()
  local logged = helpers.logged
  local function count(lines, msg)
    local n = 0
    for _, l in ipairs(lines) do if l.msg:find(msg, 1, true) then n = n + 1 end end
    return n
  end
  local UNCHECKED = "budget: store unavailable"

  it("on_outage = \"allow\": one warning per outage, every unchecked reservation counted", function()
    fresh_url()
    finally(function() if not pid then start_redis() end end)
    local unchecked = resil.metrics.counter("resil_budget_unchecked_total")
    local b = resil.budget("allow-once", { limit = 1000, on_outage = "allow" })
    assert.is_nil(assert(b:reserve(1)).unchecked)
    stop_redis(true) -- (a server restarted with its data: an outage, not a loss)
    local lines = logged(function()
      for _ = 1, 50 do assert.is_true(assert(b:reserve(1)).unchecked) end
    end)
    assert.are.equal(1, count(lines, UNCHECKED))
    assert.are.equal(50, unchecked:value({ budget = "allow-once" }))
    -- back: reservations are checked again (meanwhile, unchecked and not logged again)
    start_redis()
    local during = 0
    lines = logged(function()
      assert.is_true(helpers.wait_until(function()
        if assert(b:reserve(1)).unchecked then during = during + 1 return false end
        return true
      end, 10))
    end)
    assert.are.equal(0, count(lines, UNCHECKED))
    assert.are.equal(1, count(lines, "budget: store available again"))
    assert.are.equal(50 + during, unchecked:value({ budget = "allow-once" }))
    -- and gone again: a new outage, a new warning
    stop_redis()
    lines = logged(function()
      for _ = 1, 10 do assert.is_true(assert(b:reserve(1)).unchecked) end
    end)
    assert.are.equal(1, count(lines, UNCHECKED))
    assert.are.equal(60 + during, unchecked:value({ budget = "allow-once" }))
  end)

  it("on_outage = \"allow\" against a closed port: one warning for 200 reservations", function()
    resil.store_config({ url = ("redis://127.0.0.1:%d/0"):format(free_port()) })
    local b = resil.budget("allow-closed", { limit = 1, on_outage = "allow" })
    local lines = logged(function()
      resil.map({ 1, 2, 3, 4 }, function()
        for _ = 1, 50 do assert.is_true(assert(b:reserve(1)).unchecked) end
        return true
      end)
    end)
    assert.are.equal(1, count(lines, UNCHECKED))
    assert.are.equal(200, resil.metrics.counter("resil_budget_unchecked_total"):value({ budget = "allow-closed" }))
  end)

  it("gives store_unavailable, budgets fail closed, shared buckets fall back to local limits, then it reconnects",
    function()
      fresh_url()
      resil.log.level("error")
      local b = resil.budget("outage", { limit = 5 })
      local shared = resil.bucket("outage-bucket", { rate = 2, per = 3600, burst = 2, shared = true })
      assert.is_truthy(b:reserve(1))
      stop_redis()
      local t, err = b:reserve(1)
      assert.is_nil(t)
      assert.are.equal("store_unavailable", err.kind)
      local _, oerr = resil.once("during-outage", function() return 1 end)
      assert.are.equal("store_unavailable", oerr.kind)
      assert.is_true((shared:try(1))) -- the local fallback has its own 2
      assert.is_true((shared:try(1)))
      assert.is_false((shared:try(1)))
      -- the other choices, per primitive
      local strict = resil.bucket("outage-strict", { rate = 2, per = 3600, shared = true, on_outage = "deny" })
      assert.is_false((strict:try(1)))
      -- resil.acquire_all with the store away: each shared bucket as its on_outage says, all or none
      local tokens = resil.bucket("outage-local-tokens", { rate = 10, per = 3600, burst = 10, unit = "tokens" })
      local ok, aerr = resil.acquire_all({ { strict, 1 }, { tokens, 5 } }, { timeout = 0 })
      assert.is_nil(ok)
      assert.are.same({ "rate_limited", "outage-strict" }, { aerr.kind, aerr.bucket })
      assert.are.equal(10, tokens:remaining()) -- the local one gave nothing to a call refused
      local open = resil.bucket("outage-allow", { rate = 1, per = 3600, burst = 1, shared = true, on_outage = "allow" })
      assert.is_true(resil.acquire_all({ { open, 1 }, { tokens, 5 } }))
      assert.is_true(resil.acquire_all({ { open, 1 }, { tokens, 5 } })) -- unchecked: past its burst of 1
      assert.are.equal(0, tokens:remaining())
      local standing = resil.bucket("outage-stand-in", { rate = 1, per = 3600, burst = 1, shared = true })
      local more = resil.bucket("outage-more-tokens", { rate = 10, per = 3600, burst = 10, unit = "tokens" })
      assert.is_true(resil.acquire_all({ { standing, 1 }, { more, 5 } })) -- its local stand-in's one token
      ok = resil.acquire_all({ { standing, 1 }, { more, 5 } }, { timeout = 0 })
      assert.is_nil(ok)
      assert.are.equal(5, more:remaining()) -- the stand-in refused: nothing taken beside it
      local lenient = resil.budget("outage-lenient", { limit = 5, on_outage = "allow" })
      local unchecked = assert(lenient:reserve(1))
      assert.is_true(unchecked.unchecked)
      assert.is_true(unchecked:extend()) -- (it holds nothing: nothing to renew, and no error for its call)
      start_redis() -- empty: the server kept nothing
      -- it lost the budget's spend: reservations fail closed until an operator says so (the store's marker)
      local lost
      assert.is_true(helpers.wait_until(function()
        t, lost = b:reserve(1)
        return lost.lost
      end, 10))
      assert.are.equal("store_unavailable", lost.kind) -- (a gateway's client gets its 503)
      assert.matches("the store lost its data", lost.message, 1, true)
      assert.is_false(lost.sent)
      helpers.run(("redis-cli -p %d -n %d set resil:store ok"):format(port, db_seq))
      assert.is_truthy(b:reserve(1))
      assert.are.equal(1, resil.budget("outage"):state().reserved)
      resil.log.level("info")
    end)
end)

describe("a Redis URL with a user and a password", function()
  -- a redis-server of its own started with `args` (a user of Redis 6's ACL, a requirepass) -> its port; stopped
  -- at the test's end
  local function own_server(args)
    local own_dir, own_port = helpers.tmpname("-redis-auth"), free_port()
    os.execute("mkdir -p " .. own_dir)
    os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
      "--pidfile %s/redis.pid %s > /dev/null"):format(own_port, own_dir, own_dir, args))
    assert(helpers.wait_until(function() return helpers.slurp(own_dir .. "/redis.pid"):match("%d+") ~= nil end, 10))
    local own_pid = helpers.slurp(own_dir .. "/redis.pid"):match("%d+")
    finally(function()
      os.execute("kill -9 " .. own_pid)
      os.execute("rm -rf " .. own_dir)
    end)
    assert(helpers.wait_until(function()
      return helpers.run(("redis-cli -p %d ping"):format(own_port)).stdout ~= ""
    end, 10))
    return own_port
  end

  -- the store at url: a key written and read, a budget's reservation settled (its scripts), and a run
  -- recorded by another process (its end on a blocking connection of its own, as the process ends)
  local function works(url)
    resil.store_config({ url = url })
    assert.is_true(resil.store():set("auth", "1"))
    assert.are.equal("1", resil.store():get("auth"))
    local ticket = assert(resil.budget("auth-budget", { limit = 5 }):reserve(1))
    assert.is_true(ticket:settle(0.5, { provider = "auth" }))
    local r = helpers.run_script('require("resil").step("one", function() return 1 end)',
      "--store '" .. url .. "' --run auth-run --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("done", helpers.backend(resil.store()):run_get("auth-run").status)
  end

  -- (before: the user was dropped and AUTH sent the password alone, as the default user: every command
  -- was refused NOAUTH, store_error)
  it("authenticates as that user of the server's ACL", function()
    local p = own_server("--user default off --user alice on '>alice-secret' '~*' '&*' '+@all'")
    works(("redis://alice:alice-secret@127.0.0.1:%d/1"):format(p))
    works(("redis://alice:alice-secret@127.0.0.1:%d/0"):format(p)) -- (no SELECT: the commands wait for the AUTH alone)
  end)

  it("authenticates with the password alone where the server knows no such user (requirepass only, a " ..
    "Heroku-style redis://h:password@host)", function()
    local p = own_server("--requirepass only-secret")
    works(("redis://h:only-secret@127.0.0.1:%d/2"):format(p))
    works(("redis://:only-secret@127.0.0.1:%d/3"):format(p))
  end)

  -- (before: the percent-encoded password went as it was spelled, p%40ss: AUTH refused, every command NOAUTH)
  it("decodes a percent-encoded user and password, as a URL's userinfo is written", function()
    local p = own_server("--requirepass 'p@ss:w/rd%'")
    works(("redis://:p%%40ss%%3Aw%%2Frd%%25@127.0.0.1:%d/4"):format(p))
    works(("redis://h:p%%40ss%%3aw%%2frd%%25@127.0.0.1:%d/5"):format(p))
    local q = own_server("--user default off --user 'al@ce' on '>s3:cr@t' '~*' '&*' '+@all'")
    works(("redis://al%%40ce:s3%%3Acr%%40t@127.0.0.1:%d/1"):format(q))
  end)

  it("a wrong password is refused, naming why", function()
    local p = own_server("--user default off --user alice on '>alice-secret' '~*' '&*' '+@all'")
    resil.store_config({ url = ("redis://alice:not-it@127.0.0.1:%d/1"):format(p) })
    local ok, err = resil.store():set("auth", "1")
    assert.is_nil(ok)
    assert.matches("AUTH refused: WRONGPASS", err.message, 1, true)
    resil.store_config({ url = ("redis://alice:not-it@127.0.0.1:%d/0"):format(p) }) -- (no SELECT)
    ok, err = resil.store():set("auth", "1")
    assert.is_nil(ok)
    assert.matches("NOAUTH .*AUTH refused: WRONGPASS", err.message)
  end)
end)
