-- The store across real processes sharing one SQLite file: resumed runs,
-- budgets reserved from four processes at once, a holder killed with
-- SIGKILL, idempotency held by another process.
local resil = require "resil"
local helpers = require "spec.helpers"

local function sh(cmd) return helpers.run(cmd) end

describe("checkpointed runs (resil.step) in real processes", function()
  local pipeline = [[
local resil = require "resil"
local log = assert(io.open(arg[1], "a"))
for i = 1, 5 do
  resil.step("step " .. i, function()
    log:write("ran ", i, "\n"); log:flush()
    if os.getenv("FAIL_AT") == tostring(i) then error("step " .. i .. " failed") end
    return i * 10
  end)
end
local items = resil.map({ "a", "b", "c" }, function(x)
  return resil.step("item", function() log:write("item ", x, "\n"); log:flush(); return x:upper() end)
end)
print("done", table.concat(items, ","), resil.run.resumed())
]]

  it("a re-run of a failed command resumes: done steps are skipped and return their results", function()
    local db, log = helpers.tmpname(".db"), helpers.tmpname(".log")
    local script = helpers.write(helpers.tmpname(".lua"), pipeline)
    local first = sh(("FAIL_AT=3 %s --store %s --log-level off %s %s"):format(helpers.resil, db, script, log))
    assert.are.equal(1, first.code)
    assert.matches("step 3 failed", first.stderr)
    local second = sh(("%s --store %s --log-level off %s %s"):format(helpers.resil, db, script, log))
    assert.are.equal(0, second.code, second.stderr)
    assert.are.equal("done\tA,B,C\ttrue\n", second.stdout)
    assert.are.equal("ran 1\nran 2\nran 3\nran 3\nran 4\nran 5\nitem a\nitem b\nitem c\n", helpers.slurp(log))
    local again = sh(("%s --store %s --log-level off %s %s"):format(helpers.resil, db, script, log))
    assert.are.equal("done\tA,B,C\ttrue\n", again.stdout)
    assert.are.equal(9, select(2, helpers.slurp(log):gsub("\n", ""))) -- nothing ran again

    local runs = sh(("%s runs --store %s"):format(helpers.resil, db))
    assert.are.equal(0, runs.code, runs.stderr)
    assert.matches("done%s+8", runs.stdout)
    local id = runs.stdout:match("\n(%S+)%s+done")
    local show = sh(("%s runs show %s --store %s"):format(helpers.resil, id, db))
    assert.matches("step 5", show.stdout)
    assert.matches("\n3%s+1%s+item", show.stdout)
  end)

  it("stops with a divergence error when the script changed under a run; --fresh starts over", function()
    local db, log = helpers.tmpname(".db"), helpers.tmpname(".log")
    local script = helpers.write(helpers.tmpname(".lua"), pipeline)
    assert.are.equal(0, sh(("%s --store %s --run r1 --log-level off %s %s"):format(helpers.resil, db, script, log)).code)
    local changed = helpers.write(helpers.tmpname(".lua"), pipeline:gsub('"step " %.%. i', '"stage " .. i'))
    local r = sh(("%s --store %s --run r1 --log-level off %s %s"):format(helpers.resil, db, changed, log))
    assert.are.equal(1, r.code)
    assert.matches("divergence: run r1 diverged at step 1: recorded 'step 1', now 'stage 1'", r.stderr)
    r = sh(("%s --store %s --run r1 --fresh --log-level off %s %s"):format(helpers.resil, db, changed, log))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("done\tA,B,C\tfalse\n", r.stdout)
  end)

  it("names where the step that diverged is called (a policy module's line, inside resil.map)", function()
    -- (the message named the step and the run, not the line: its traceback ended at the script's
    -- resil.map call, and `runs show` had the message alone; a policy edited between runs was to be
    -- searched for the step)
    local db = helpers.tmpname(".db")
    local flow = [[
local resil = require "resil"
return { run = function(x)
  local a = resil.step("draft", function() return x .. "-draft" end)
  local b = resil.step("%s", function() return a .. "-done" end)
  return b
end }
]]
    local dir = helpers.policy_dir({ ["flow.lua"] = flow:format("polish") })
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local flow = require "policies.flow"
print(table.concat((resil.map({ "a", "b" }, flow.run)), ","))
]])
    local cmd = ("%s --policies %s --store %s --run moved --log-level off %s"):format(helpers.resil, dir, db, script)
    assert.are.equal(0, sh(cmd).code)
    helpers.write(dir .. "/flow.lua", flow:format("review"))
    local r = sh(cmd)
    assert.are.equal(1, r.code)
    local line = "divergence: run moved diverged at step 2 of item 1: recorded 'polish', now 'review' at " .. dir ..
      "/flow.lua:4 (use --fresh to start over)"
    assert.matches(line, r.stderr, 1, true)
    local show = sh(("%s runs show moved --store %s"):format(helpers.resil, db))
    assert.matches("\nwhy: " .. line, show.stdout, 1, true)
  end)
end)

describe("resil.once across processes", function()
  it("fingerprints table arguments the same way in every process (a resumed run is not 'key_reused')", function()
    local path = helpers.tmpname(".db")
    local script = [[
      local resil = require "resil"
      local req = { model = "m", messages = { { role = "user", content = "x" } }, max_tokens = 20,
                    temperature = 1, user = "u", extra = { a = 1, b = 2, c = 3, d = 4 } }
      print(resil.once({ key = "fp" }, function() return "ran" end, req))
    ]]
    for _ = 1, 4 do -- Lua randomises table order per process: four chances to differ
      local r = helpers.run_script(script, ("--store %s --log-level off"):format(path))
      assert.are.equal("ran\n", r.stdout, r.stderr)
    end
    os.remove(path)
  end)
end)

describe("a run started over with --fresh", function()
  it("records its costs again: a new generation is not taken for the old one", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.step("pay", function() return assert(resil.cost.record({ provider = "p", usd = 1 })) end)
print(resil.cost.total())
]])
    local function run(opts)
      return sh(("%s --store %s --run paid %s --log-level off %s"):format(helpers.resil, db, opts, script)).stdout
    end
    assert.are.equal("1.0\n", run(""))
    assert.are.equal("1.0\n", run("")) -- resumed: the step is not paid again
    assert.are.equal("2.0\n", run("--fresh")) -- started over: paid again, and the ledger says so
  end)
end)

describe("budgets across processes", function()
  it("1000 reservations of $0.10 from 4 processes against $5 admit exactly 50", function()
    local db = helpers.tmpname(".db")
    local source = [[
local resil = require "resil"
local b = resil.budget("shared-5", { limit = 5 })
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
    assert.are.equal(50, helpers.sum_of(helpers.run_together(4, source, "--store " .. db .. " --log-level off")))
  end)
end)

describe("idempotency across processes", function()
  it("another process sees in_progress while the holder runs, then its stored result", function()
    local db, go = helpers.tmpname(".db"), helpers.tmpname(".go")
    -- A holds its claim until B has seen it in progress (a file B's script writes), however slow B's start
    local pid, out = helpers.start(([[
local resil = require "resil"
print(resil.once("shared-job", function()
  print("claimed"); io.stdout:flush()
  local deadline = resil.clock.wall() + 30
  while not io.open(%q) and resil.clock.wall() < deadline do resil.sleep(0.02) end
  return "made by A"
end))
]]):format(go), "--store " .. db .. " --log-level off")
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("claimed") end, 10))
    local r = helpers.run_script([[
local resil = require "resil"
local v, err = resil.once({ key = "shared-job", wait = 0.2 }, function() return "made by B" end)
print(v, err and err.kind)
io.open(arg[1], "w"):close()
print(resil.once({ key = "shared-job", wait = 10 }, function() return "made by B" end))
]], "--store " .. db .. " --log-level off", go)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("nil\tin_progress\nmade by A\n", r.stdout)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)
end)

describe("SQLite's write lock held by another process", function()
  it("is waited for without blocking the loop: other tasks run, then the write lands", function()
    -- the real clock: the virtual one stands still while a store write is pending
    resil.clock.real()
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    assert(resil.store():set("before", "1")) -- creates the file and schema
    local pid, out = helpers.start([[
local resil = require "resil"
local db = assert(resil.sqlite.open(arg[1]))
db:now(function(tx)
  tx:exec("INSERT OR REPLACE INTO kv (key, value) VALUES ('holder', '1')")
  print("locked"); io.stdout:flush()
  local t = os.clock()
  while os.clock() - t < 0.6 do end -- hold the write lock for 0.6 s of CPU
end)
print("released"); io.stdout:flush()
]], "--log-level off", db)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("locked") end, 10))
    local ticks, writing = 0, true
    local ticker = resil.spawn(function()
      while writing do ticks = ticks + 1; resil.sleep(0.01) end
    end)
    local ok = resil.store():set("during", "2")
    writing = false
    ticker:join()
    assert.is_true(ok)
    assert.matches("released", helpers.slurp(out))
    -- a loop blocked in the write would tick once (twice at most)
    assert.is_true(ticks >= 3, "the loop ran other tasks while waiting for the lock: " .. ticks)
    assert.are.equal("1", resil.store():get("holder"))
    helpers.wait_until(function() return not helpers.alive(pid) end, 10)
  end)
end)

-- Processes creating one store file at once (a gateway's workers on a new
-- deployment, copies of a cron job): one that had begun reading the new
-- file when another took its write lock was refused at once ("database is
-- locked"; SQLite does not wait there, to avoid a deadlock), not after the
-- timeout: 2 of 80 processes opening a new store together failed. Here the
-- sqlite3 shell holds the new file's write lock for 0.3 s.
describe("a new SQLite store whose write lock another process holds as it is opened", function()
  it("opens once the lock is free, within the store's timeout", function()
    local db = helpers.tmpname(".db")
    os.execute(("printf 'BEGIN IMMEDIATE;\\n.shell echo locked > %s.locked\\n.shell sleep 0.3\\nCOMMIT;\\n' " ..
      "| sqlite3 -bail %s &"):format(db, db))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(db .. ".locked") ~= "" end, 10))
    local r = helpers.run_script([[
local s, err = require("resil").store()
print(s and "opened" or tostring(err))
]], "--store " .. db .. " --log-level off")
    assert.are.equal("opened\n", r.stdout, r.stderr)
    os.execute("rm -f " .. db .. "*")
  end)
end)

-- Tasks of one process asking for a store while the first is still opening
-- it (its schema waits for another process's write lock): each opened a
-- connection of its own, two group commits of one process taking the
-- file's write lock from each other, two sweepers, and a read on one that
-- did not see what the other had queued. Here the sqlite3 shell holds the
-- new file's write lock for 0.5 s, before its schema is written.
-- a new file (WAL, no schema yet) whose write lock the sqlite3 shell holds `seconds` (0.5) -> its path
-- (no table of its own: a file with tables and no store schema is another program's, refused)
local function held_new_file(seconds)
  local db = helpers.tmpname(".db")
  os.execute(("printf 'PRAGMA journal_mode=WAL;\\nBEGIN IMMEDIATE;\\n" ..
    ".shell echo locked > %s.locked\\n.shell sleep %s\\nCOMMIT;\\n' | sqlite3 -bail %s > /dev/null & " ..
    "echo $! > %s.pid"):format(db, seconds or 0.5, db, db))
  assert.is_true(helpers.wait_until(function() return helpers.slurp(db .. ".locked") ~= "" end, 10))
  local shell = helpers.slurp(db .. ".pid"):match("%d+")
  finally(function() helpers.wait_until(function() return not helpers.alive(shell) end, 10) end)
  return db
end

describe("tasks asking for a SQLite store while its first open waits for the file's lock", function()
  it("get the one store the first opens: one connection", function()
    resil.clock.real()
    local db = held_new_file()
    local got = {}
    local tasks = {}
    for i = 1, 3 do tasks[i] = resil.spawn(function() got[i] = assert(resil.store(db)) end) end
    for i = 1, 3 do assert(tasks[i]:join()) end
    assert.are.equal(got[1], got[2])
    assert.are.equal(got[1], got[3])
    assert.is_true(got[2]:set("k", "v"))
    os.execute("rm -f " .. db .. "*")
  end)

  -- (the canceled one's connection was left to the collector: a file and a sync thread)
  it("open it themselves when the first is canceled while it waits, whose connection is closed", function()
    resil.clock.real()
    local db = held_new_file()
    collectgarbage("stop")
    finally(function() collectgarbage("restart") end)
    local first = resil.spawn(function() return resil.store(db) end)
    -- (two waiters: one opens it, the other waits for that one; both opened one of their own)
    local second = resil.spawn(function() return resil.store(db) end)
    local third = resil.spawn(function() return resil.store(db) end)
    resil.sleep(0.05)
    first:cancel()
    local ok, s, err = second:join()
    assert.is_true(ok)
    assert(s, tostring(err))
    assert.are.equal(s, resil.store(db))
    assert.are.same({ true, s }, { third:join() })
    -- (the shell's parent is this process; one line per connection's file)
    local connections = io.popen("ls -l /proc/$PPID/fd | grep -c -e ' " .. db .. "$'"):read("a")
    collectgarbage("restart")
    assert.are.equal("1\n", connections)
    os.execute("rm -f " .. db .. "*")
  end)

  -- (before: all had the first's one error table, and a row recorded with retry = true marked it
  -- `retrying` for the others: a row nobody would write was reported tried again)
  it("each get an error of their own when it fails: a flag one caller sets on it is not the others'", function()
    resil.clock.real()
    resil.log.level("off")
    finally(function() resil.log.level("info") end)
    local db = held_new_file(3) -- (held past every open try of 0.2 s)
    local url = db .. "?timeout=0.2"
    resil.store_config({ url = url })
    local paid, other, errs = {}, {}, {}
    local tasks = {
      resil.spawn(function() paid.ok, paid.err = resil.cost.record({ provider = "p", usd = 0.5, retry = true }) end),
      resil.spawn(function() other.ok, other.err = resil.cost.record({ provider = "p", usd = 0.25 }) end),
      resil.spawn(function() errs[1] = select(2, resil.store(url)) end),
      resil.spawn(function() errs[2] = select(2, resil.store(url)) end),
    }
    for _, t in ipairs(tasks) do assert(t:join()) end
    assert.are.same({ "store_unavailable", true }, { paid.err.kind, paid.err.retrying })
    assert.is_nil(other.ok)
    assert.are.equal("store_unavailable", other.err.kind)
    assert.is_nil(other.err.retrying) -- its row is not tried again
    assert.are.equal(paid.err.message, other.err.message)
    assert.is_true(resil.is_error(errs[1]))
    assert.are_not.equal(errs[1], errs[2])
    assert.are.same({ errs[1].kind, errs[1].message }, { errs[2].kind, errs[2].message })
    -- the lock let go: the paid row is written, once
    assert.is_true(helpers.wait_until(function() return resil.cost.total() == 0.5 end, 10))
    os.execute("rm -f " .. db .. "*")
  end)
end)

-- A store that cannot be opened (here: its new file's lock held past the
-- store's timeout) is an outage as one that fails later; a budget with
-- on_outage = "allow" failed closed there.
describe("a budget with on_outage = \"allow\" whose store cannot be opened yet", function()
  it("hands out an unchecked ticket, whose settle lands once the store opens", function()
    resil.clock.real()
    resil.log.level("off")
    finally(function() resil.log.level("info") end)
    local db = held_new_file(3) -- (its three open tries, 0.2 s each, all inside it on a slow machine too)
    local url = db .. "?timeout=0.2"
    resil.store_config({ url = url })
    local budget = resil.budget("allow-at-open", { limit = 5, on_outage = "allow" })
    local ticket, err = budget:reserve(1)
    assert(ticket, tostring(err))
    assert.is_true(ticket.unchecked)
    local ok, serr = ticket:settle(0.5, { provider = "p" })
    assert.is_nil(ok)
    assert.are.same({ "store_unavailable", true }, { serr.kind, serr.retrying })
    assert.is_false(budget:reserve(1):release())
    -- the lock let go: the store opens, and the settle is written once, nothing left held
    assert.is_true(helpers.wait_until(function() return resil.store(url) ~= nil end, 10))
    assert.is_true(helpers.wait_until(function() return (budget:state() or {}).spent == 0.5 end, 10))
    local st = budget:state()
    assert.are.same({ 0.5, 0, 0 }, { st.spent, st.reserved, #st.holds })
    assert.are.equal(0.5, resil.cost.total())
    os.execute("rm -f " .. db .. "*")
  end)

  -- ("allow" let every call through unchecked, for as long as nobody fixed the store's path)
  it("fails closed when the store is not one (a path under a file): that outage does not pass", function()
    local blocker = helpers.write(helpers.tmpname(".file"), "")
    resil.store_config({ url = blocker .. "/state.db" })
    local budget = resil.budget("allow-no-store", { limit = 5, on_outage = "allow" })
    local ticket, err = budget:reserve(1)
    assert.is_nil(ticket)
    assert.are.equal("store_unavailable", err.kind)
    assert.matches("Not a directory", err.message, 1, true)
  end)
end)

-- A statement that finds the file busy (a read transaction's first read
-- while another process recovers the WAL it has just opened, or checkpoints
-- it as it closes) failed as for good: the store's open did not try its
-- schema read again, and a gateway worker that opened the store at its
-- first answer lost that answer's ledger row (1 in 70 runs of two workers
-- stopped together). Here a write inside a read transaction meets the
-- sqlite3 shell's write lock at once, as such a read does.
describe("a SQLite statement that finds the file busy", function()
  it("fails with busy = true (tried again, as a BEGIN that found it busy is)", function()
    local path = helpers.tmpname(".db")
    resil.store_config({ url = path })
    assert(resil.store():set("before", "1")) -- the file and its schema
    local db = assert(resil.sqlite.open(path))
    os.execute(("printf 'BEGIN IMMEDIATE;\\n.shell echo locked > %s.locked\\n.shell sleep 0.5\\nCOMMIT;\\n" ..
      "' | sqlite3 -bail %s & echo $! > %s.pid"):format(path, path, path))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(path .. ".locked") ~= "" end, 10))
    local v, err = db:read(function(tx) return tx:exec("INSERT INTO kv (key, value) VALUES ('k', 'v')") end)
    assert.is_nil(v)
    assert.are.equal("store_unavailable", err.kind)
    assert.matches("database is locked", err.message, 1, true)
    assert.is_true(err.busy)
    db:close()
    local shell = helpers.slurp(path .. ".pid"):match("%d+")
    assert.is_true(helpers.wait_until(function() return not helpers.alive(shell) end, 10))
    os.execute("rm -f " .. path .. "*")
  end)
end)

-- A store path naming another program's database is refused (store_spec). The check read the file
-- before the store's write lock was taken: a file busy then (its program holding it) read as no
-- tables, and one whose tables that program was writing read as the empty file it was a moment
-- before; either way the open went on to switch it to WAL and write the store's schema into it.
describe("another program's SQLite database, busy as the store opens it", function()
  -- the database at a new path, with a table users; its program holds it as `hold` says (sqlite3's
  -- lines) until the file `path`.release exists, or for `seconds`
  local function held_database(hold, seconds)
    local path = helpers.tmpname(".db")
    local wait = seconds and ("sleep " .. seconds) or ("while [ ! -e %s.release ]; do sleep 0.02; done"):format(path)
    os.execute(("printf '%s\\n.shell echo locked > %s.locked\\n.shell %s\\nCOMMIT;\\n' | sqlite3 -bail %s " ..
      "> /dev/null & echo $! > %s.pid"):format(hold, path, wait, path, path))
    local shell = helpers.slurp(path .. ".pid"):match("%d+")
    finally(function()
      helpers.write(path .. ".release", "")
      helpers.wait_until(function() return not helpers.alive(shell) end, 10)
      os.execute("rm -f " .. path .. "*")
    end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(path .. ".locked") ~= "" end, 10))
    return path, function() return helpers.wait_until(function() return not helpers.alive(shell) end, 10) end
  end
  local function left_as_it_was(path, journal)
    local r = helpers.run(("sqlite3 %s 'PRAGMA journal_mode' 'PRAGMA user_version' " ..
      "'SELECT group_concat(name) FROM sqlite_master'"):format(path))
    assert.are.equal(journal .. "\n0\nusers\n", r.stdout)
  end
  local REFUSED = "store: %s is another program's SQLite database (it has tables and no store schema); " ..
    "not made a store"

  it("held past the store's timeout: the open fails busy, the file left as it was; refused once free", function()
    resil.clock.real()
    local path, ended = held_database("CREATE TABLE users (id, name);\\nBEGIN EXCLUSIVE;") -- (readers wait)
    local s, err = resil.store(path .. "?timeout=0.3")
    assert.is_nil(s)
    assert.are.same({ "store_unavailable", true }, { err.kind, err.busy })
    assert.are.equal("store: " .. path .. ": database is locked", err.message)
    helpers.write(path .. ".release", "")
    assert.is_true(ended())
    s, err = resil.store(path)
    assert.is_nil(s)
    assert.are.equal(REFUSED:format(path), err.message)
    left_as_it_was(path, "delete")
  end)

  -- Outside a task (set-up) the open waits in SQLite: 0.5 s for the check, which then read nothing,
  -- and 0.5 s for the switch to WAL, as the lock is let go (0.8 s on).
  it("outside a task, held past the store's timeout then let go: the open fails busy, the file left as it was",
     function()
    resil.clock.real()
    local path, ended = held_database("CREATE TABLE users (id, name);\\nBEGIN EXCLUSIVE;", 0.8)
    local s, err = coroutine.wrap(function() return resil.store(path .. "?timeout=0.5") end)()
    assert.is_nil(s)
    assert.are.same({ "store_unavailable", true }, { err.kind, err.busy })
    assert.is_true(ended())
    left_as_it_was(path, "delete")
    s, err = resil.store(path)
    assert.is_nil(s)
    assert.are.equal(REFUSED:format(path), err.message)
  end)

  it("its tables written as the store opens it (WAL): refused under the store's write lock", function()
    resil.clock.real()
    local path = held_database("PRAGMA journal_mode=WAL;\\nBEGIN IMMEDIATE;\\nCREATE TABLE users (id, name);")
    local opening = resil.spawn(function() return resil.store(path) end)
    assert.is_true(helpers.wait_until(function() return opening:status() == "waiting" end, 10))
    helpers.write(path .. ".release", "")
    local ok, s, err = opening:join()
    assert.is_true(ok)
    assert.is_nil(s)
    assert.are.equal(REFUSED:format(path), err.message)
    left_as_it_was(path, "wal")
  end)
end)

-- Switching a new file to WAL waited inside SQLite (its busy handler, then its sleeps) for as long
-- as another process held the file, up to the store's timeout: every task of the process stood
-- still meanwhile. Here the sqlite3 shell holds the new file 1 s.
describe("a new SQLite store whose file another process holds as it is opened", function()
  it("is waited for on timers: the process's other tasks run meanwhile, then it opens", function()
    resil.clock.real()
    local db = helpers.tmpname(".db")
    os.execute(("printf 'BEGIN IMMEDIATE;\\n.shell echo locked > %s.locked\\n.shell sleep 1\\n" ..
      ".shell echo letting > %s.letting\\nCOMMIT;\\n' | sqlite3 -bail %s > /dev/null & echo $! > %s.pid"):format(
      db, db, db, db))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(db .. ".locked") ~= "" end, 10))
    local shell = helpers.slurp(db .. ".pid"):match("%d+")
    finally(function()
      helpers.wait_until(function() return not helpers.alive(shell) end, 10)
      os.execute("rm -f " .. db .. "*")
    end)
    local ticks, opening = 0, true
    local ticker = resil.spawn(function()
      while opening do ticks = ticks + 1; resil.sleep(0.01) end
    end)
    local s, err = resil.store(db)
    opening = false
    ticker:join()
    assert(s, tostring(err))
    assert.is_not_nil(io.open(db .. ".letting")) -- (it opened once the shell let go: it waited)
    -- a loop blocked in the open would tick once
    assert.is_true(ticks >= 3, "the loop ran other tasks while the open waited for the file: " .. ticks)
    assert.is_true(s:set("k", "v"))
  end)
end)
