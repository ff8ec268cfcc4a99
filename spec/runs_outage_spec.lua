-- What a run says about itself on a bad day, its steps in resil.map: a
-- store that refuses a failure's record, a second copy of the run, a settle
-- the store takes late. Real processes.
local resil = require "resil"
local helpers = require "spec.helpers"

-- For the scripts below (run by with_lock: a SQLite store whose lock is
-- waited for 0.5 s): take_lock has another process (sqlite3) take the
-- store's write lock and keep it for `seconds`; it returns once it holds it.
local TAKE_LOCK = [[
local resil = require "resil"
local db, rel = arg[1], arg[2]
local function take_lock(db, rel, seconds)
  os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s.locked\\n.shell sleep %s\\nCOMMIT;\\n' | sqlite3 -bail %s >/dev/null 2>&1 &)")
    :format(rel, seconds, db))
  while not io.open(rel .. ".locked") do resil.sleep(0.02) end
end
]]

-- -> the script's outcome, its store's path
local function with_lock(source, run)
  local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
  return helpers.run_script(TAKE_LOCK .. source, ("--store '%s?timeout=0.5' --run %s --log-level off"):format(db, run),
    db .. " " .. rel), db
end

describe("runs in resil.map on a bad day", function()
  it("a run whose failed item could not be recorded (store locked) does not end 'done'", function()
    local r, db = with_lock([[
local _, failures = resil.map({ 1, 2, 3 }, function(i)
  return resil.step("s", function()
    if i == 2 then -- it fails as the store is locked: its failure's record cannot be written
      take_lock(db, rel, 1.5)
      error("item 2 failed")
    end
    return i
  end)
end, { concurrency = 1 })
resil.sleep(2) -- the lock is gone before the run ends
print("failed items: " .. (failures and failures[2] and 1 or 0))
]], "lk")
    assert.matches("failed items: 1", r.stdout)          -- the script saw item 2 fail
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db))
    -- (before: "lk   done    2 ...", and `runs show lk` listed 2 items, both done)
    assert.matches("lk%s+done_with_failures", runs.stdout)
  end)

  it("a run whose end cannot be recorded (the store's write lock held) says why on stderr", function()
    local r = with_lock([[
resil.step("s", function() return 1 end)
take_lock(db, rel, 3) -- past the run's end
]], "end")
    -- (before: "recording the run's end: (null)")
    assert.matches("recording the run's end: store_unavailable: ", r.stderr, 1, true)
  end)

  it("a run whose end cannot be recorded (a file size limit: a full disk) says why, not what the rollback said",
    function()
      local db = helpers.tmpname(".db")
      local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
for i = 1, 1000 do -- until the file is full (a step not checkpointed raises: the run stops)
  if not pcall(resil.step, "s" .. i, function() return ("x"):rep(8000) end) then break end
end
for _ = 1, 1000 do -- and small writes too
  if not resil.cost.record({ provider = "p", model = "m", usd = 1 }) then break end
end
]])
      -- (writes past 1 MB fail with EFBIG, as on a full disk; SIGXFSZ ignored)
      local r = helpers.run(("sh -c \"trap '' XFSZ; ulimit -f 1024; exec %s --store '%s' --run full --log-level off %s\"")
        :format(helpers.resil, db, script))
      -- (before: "commit failed: cannot rollback - no transaction is active": SQLite had rolled it back itself)
      assert.is_not.matches("cannot rollback", r.stderr, 1, true)
      assert.matches("recording the run's end: store_unavailable: store %S+: commit failed: disk I/O error", r.stderr)
    end)

  it("a store whose file is deleted mid-run refuses every write after it, instead of writing to a file gone",
    function()
      local db = helpers.tmpname(".db")
      local r = helpers.run_script([[
local resil = require "resil"
local db = arg[1]
for i = 1, 3 do
  print(i, resil.step("s" .. i, function() return i end))
  if i == 1 then os.remove(db); os.remove(db .. "-wal"); os.remove(db .. "-shm") end
end
]], ("--store '%s' --run gone --log-level off"):format(db), db)
      assert.matches("^1\t1\n2\tnil\tstore_unavailable: store %S+: its file was deleted or replaced since it was " ..
        "opened; nothing is written to it any more\n3\tnil\tstore_unavailable", r.stdout)
      assert.matches("recording the run's end: store_unavailable", r.stderr, 1, true)
    end)

  it("a step whose results cannot be checkpointed (its fn ran, maybe paid) is a failed step in runs show", function()
    local db = helpers.tmpname(".db")
    helpers.run_script([[
local resil = require "resil"
resil.step("ok", function() return 1 end)
print(pcall(function() local v = resil.step("bad", function() return function() end end) return v end))
]], ("--store '%s' --run unser --log-level off"):format(db))
    local show = helpers.run(("%s runs show unser --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr) -- (its long error message made a column string.format refused)
    assert.matches("bad%s+failed%s+0%s+%S+ %S+%s+%S+%.lua:%d+: resil.step: cannot checkpoint the results", show.stdout)
    assert.matches("1 items: 0 done, 1 failed", show.stdout, 1, true)
  end)

  it("a step the store could not checkpoint (a nil, err the script went past) keeps its run from ending done",
    function()
      local r, db = with_lock([[
resil.step("s1", function() return 1 end)
take_lock(db, rel, 1.5) -- as the next step ends
print(resil.step("s2", function() return 2 end))
resil.sleep(2) -- the lock is gone before the run ends
]], "unsaved")
      assert.matches("^nil\tstore_unavailable", r.stdout)
      local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db))
      assert.matches("unsaved%s+done_with_failures", runs.stdout) -- (before: done)
    end)

  it("a step whose caller gave up while the run was being taken (store locked) leaves the next steps to take it",
    function()
      local r, db = with_lock([[
assert(resil.store())
take_lock(db, rel, 1.5)
-- the first step's caller is canceled while its take of the run waits for the lock, then fails
print(resil.timeout(0.1, function() return resil.step("a", function() return 1 end) end))
resil.sleep(2.5) -- the lock is gone
print(resil.step("b", function() return 2 end))
print(resil.step("c", function() return 3 end))
]], "gaveup")
      -- (before: "nil store_unavailable ... database is locked" at every later step, the store back or not)
      assert.matches("^nil\ttimeout[^\n]*\n2\n3\n$", r.stdout)
      local runs = helpers.run(("%s runs show gaveup --store %s"):format(helpers.resil, db))
      assert.matches("b%s+done", runs.stdout)
    end)

  it("a second copy of a run whose steps are in resil.map stops with run_held and status 1", function()
    local db = helpers.tmpname(".db")
    local script = [[
local resil = require "resil"
resil.map({ 1, 2, 3 }, function(i) return resil.step("x", function() resil.sleep(1.5); return i end) end)
print("after map")
]]
    local pid = helpers.start(script, ("--store %s --run same --log-level off"):format(db))
    assert(helpers.wait_until(function()
      return helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout:match("same%s+running") ~= nil
    end, 10))
    local r = helpers.run_script(script, ("--store %s --run same --log-level off"):format(db))
    helpers.wait_until(function() return not helpers.alive(pid) end, 10)
    -- (before: "after map", exit status 0, nothing said: cron saw a success)
    assert.is_not.matches("after map", r.stdout)
    assert.matches("run_held", r.stdout .. r.stderr)
    assert.are.equal(1, r.code)
  end)

  it("a settle the store took late is not logged as a cost that was not recorded", function()
    local db = helpers.tmpname(".db")
    local rel = helpers.tmpname(".rel")
    local r = helpers.run_script([[
local resil = require "resil"
local ai = require "policies.ai"
local db, rel = arg[1], arg[2]
local mock = resil.mock.start({ latency = { min = 1, max = 1 } })
ai.configure("openai", { base_url = mock.url .. "/v1", api_key = "sk-x" })
resil.budget("team", { limit = 10, per = "day" })
local t = resil.spawn(function()
  return ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", budget = "team", max_tokens = 20,
    messages = { { role = "user", content = "hi" } } })
end)
-- reserved once the call is at the provider; while it answers, another process takes the write lock for 1.5 s
while (mock:stats().routes.chat or 0) < 1 do resil.sleep(0.01) end
os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s.locked\\n.shell sleep 1.5\\nCOMMIT;\\n' | sqlite3 -bail %s >/dev/null 2>&1 &)"):format(rel, db))
while not io.open(rel .. ".locked") do resil.sleep(0.02) end
local ok, res = t:join()
print("answered", ok and res and res.id ~= nil)
-- the lock is gone; the settle is tried again
local deadline = resil.clock.wall() + 10
while not resil.cost.breakdown("model")[1] and resil.clock.wall() < deadline do resil.sleep(0.05) end
print("ledger calls", (resil.cost.breakdown("model")[1] or {}).calls)
]], ("--store '%s?timeout=0.3'"):format(db), db .. " " .. rel)
    assert.matches("answered\ttrue", r.stdout)
    assert.matches("ledger calls\t1", r.stdout)  -- the row was written, once
    -- (before: an error line "ai: the cost was not recorded", without the row's id or ticket: an operator
    -- who entered it by hand counted it twice)
    assert.is_not.matches("the cost was not recorded", r.stderr, 1, true)
    assert.matches("the cost will be recorded when the store takes it", r.stderr, 1, true)
  end)
end)


describe("the commands that read the store, on a bad day", function()
  -- a store with one run of two steps, and a ledger row
  local function store_with_run(run)
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("one", function() return 1 end)
resil.step("two", function() return 2 end)
resil.cost.record({ provider = "p", model = "m", usd = 0.5 })
]], ("--store '%s' --run %s --log-level off"):format(db, run))
    assert.are.equal(0, r.code, r.stderr)
    return db
  end

  it("a store whose write lock another process holds: each answers from what is committed, at once", function()
    local db = store_with_run("locked")
    local release = helpers.hold_write_lock(db)
    finally(function() -- (and wait until the holder let go: it never outlives the test)
      helpers.write(release, "")
      helpers.run(("sqlite3 -cmd '.timeout 10000' '%s' 'BEGIN IMMEDIATE; COMMIT;'"):format(db))
    end)
    -- (before: each waited for the lock up to the store's timeout, then exited 1 with "database is locked":
    -- a writer that stopped mid-commit, or a long transaction, left an operator with no way to read the ledger)
    local want = { runs = "locked%s+done", ["runs show locked"] = "two", costs = "total %$0%.500000",
      ["costs --by model"] = "m%s+1%s+%$0%.500000", ["costs --run locked --csv"] = ",p,m,", budgets = "no budgets" }
    for cmd, pattern in pairs(want) do
      local r = helpers.run(("%s %s --store '%s?timeout=0.2'"):format(helpers.resil, cmd, db))
      assert.are.equal(0, r.code, cmd .. ": " .. r.stderr)
      assert.matches(pattern, r.stdout, 1, false, cmd)
    end
  end)

  it("a store path with nothing there (a typo): each names it and exits 1, and no store is made", function()
    local db = helpers.tmpname(".db")
    for _, cmd in ipairs({ "runs", "runs show r", "costs", "costs --by model", "costs --run r --csv", "budgets",
                           "budgets show team", "budgets release team" }) do
      local r = helpers.run(("%s %s --store '%s'"):format(helpers.resil, cmd, db))
      -- (before: "total $0.000000", "no runs recorded in ...", a budget "not known to the store", exit 0, and an
      -- empty store made at the path)
      assert.are.equal(1, r.code, cmd .. ": " .. r.stdout)
      assert.are.equal("resil-lua: store_unavailable: no store at " .. db .. " (nothing was recorded there; " ..
        "--store or RESIL_STORE names the store, by default .resil/state.db in the working directory)\n", r.stderr)
      assert.is_nil(io.open(db), cmd .. " made a store")
    end
    -- a limit may be set before the first run
    local set = helpers.run(("%s budgets set team --limit 5 --store '%s'"):format(helpers.resil, db))
    assert.are.equal(0, set.code, set.stderr)
    assert.matches("team%s+%$5%.000000", helpers.run(("%s budgets --store '%s'"):format(helpers.resil, db)).stdout)
  end)

  -- (before: a `budgets set` refused for its usage made the store all the same, and `budgets` there then
  -- listed "no budgets" where it had said no store is there; a subcommand misspelt was "no store at")
  it("a command refused for its usage says why, and makes no store at a path with nothing there", function()
    local db = helpers.tmpname(".db")
    local refused = {
      ["budgets set team --limit abc"] = "budgets set: %-%-limit takes an amount in USD",
      ["budgets set team --limit 5 --per week"] = "budgets set: %-%-per takes day, month or none, not 'week'",
      ["budgets set team"] = "budgets set: %-%-limit USD is needed",
      ["budgets set"] = "budgets set: which budget%?",
      ["budgets sett team"] = "budgets: unknown argument 'sett'",
      ["runs lsit"] = "runs: unknown argument 'lsit'",
      ["keys add --name team --budget abc"] = "keys: %-%-budget wants USD",
      ["keys add --name team --budget 1e-7"] = "keys: %-%-budget 1e%-7 is below the ledger's unit",
    }
    for cmd, says in pairs(refused) do
      local r = helpers.run(("%s %s --store '%s'"):format(helpers.resil, cmd, db))
      assert.are.equal(1, r.code, cmd .. ": " .. r.stdout)
      assert.matches("^resil%-lua: " .. says, r.stderr, 1, false, cmd)
      assert.is_nil(io.open(db), cmd .. " made a store")
    end
  end)

  it("runs show: a run whose record cannot be read is an error, not a run of unknown state", function()
    local db = store_with_run("damaged")
    -- the runs table's page overwritten (the steps table's intact)
    local function sql(q) return helpers.run(("sqlite3 '%s' \"%s\""):format(db, q)).stdout:match("%d+") end
    sql("PRAGMA wal_checkpoint(TRUNCATE)")
    local page, root = tonumber(sql("PRAGMA page_size")), tonumber(sql("SELECT rootpage FROM sqlite_master WHERE name = 'runs'"))
    local f = assert(io.open(db, "r+b"))
    f:seek("set", (root - 1) * page)
    f:write(("\255"):rep(page))
    f:close()
    local r = helpers.run(("%s runs show damaged --store '%s'"):format(helpers.resil, db))
    -- (before: "run damaged: ?", its steps, and "resume: resil-lua --store ... --run damaged SCRIPT")
    assert.are.equal(1, r.code, r.stdout)
    assert.are.equal("", r.stdout)
    assert.matches("^resil%-lua: store_unavailable: store %S+: .*malformed", r.stderr)
  end)
end)
