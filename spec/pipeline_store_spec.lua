-- A pipeline as a user runs it (`resil-lua pipeline.lua`), its store on a bad
-- day: what `resil-lua runs` says of the run afterwards. Real processes, a
-- real SQLite file whose write lock another process (sqlite3) holds.
local helpers = require "spec.helpers"

describe("a pipeline whose first step could not take the run (the store locked past its timeout)", function()
  it("ends done_with_failures, not done, when later items take the run and finish", function()
    local db = helpers.tmpname(".db")
    assert.are.equal(0, helpers.run_script('assert(require("resil").store():set("made", "1"))',
      "--store " .. db .. " --log-level off").code)
    local release = helpers.hold_write_lock(db)
    local r = helpers.run_script([[
local resil = require "resil"
local release = arg[1]
local out, failures = resil.map({ 1, 2, 3 }, function(i)
  if i == 2 then -- the lock given back: the next steps take the run
    local f = assert(io.open(release, "w")); f:close()
    while not resil.store():set("probe", "x") do resil.sleep(0.05) end
  end
  return resil.step("render", function() return i * 10 end)
end, { concurrency = 1 })
print(out[1], out[2], out[3], failures and failures[1].kind)
]], ("--store '%s?timeout=0.5' --run locked --log-level off"):format(db), release)
    assert.are.equal(0, r.code, r.stderr)
    -- item 1's fn never ran: the run is not done, and resuming it runs item 1
    assert.are.equal("nil\t20\t30\tstore_unavailable\n", r.stdout)
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db))
    -- (before: "done", as if every item had been made; nobody resumed it)
    assert.matches("locked%s+done_with_failures", runs.stdout)
    -- and runs show says which item, and why (recorded once the run was taken)
    local show = helpers.run(("%s runs show locked --store %s"):format(helpers.resil, db)).stdout
    assert.matches("\n1%s+1%s+render%s+failed%s+0%s+[%d%- :]+store_unavailable: [^\n]*locked", show)
    assert.matches("3 items: 2 done, 1 failed, 0 pending", show)
    local again = helpers.run_script([[
local resil = require "resil"
local out = resil.map({ 1, 2, 3 }, function(i)
  return resil.step("render", function() print("ran " .. i) return i * 10 end)
end, { concurrency = 1 })
print(out[1], out[2], out[3])
]], ("--store '%s' --run locked --log-level off"):format(db))
    assert.are.equal("ran 1\n10\t20\t30\n", again.stdout)
    assert.matches("locked%s+done%s", helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout)
  end)
end)

describe("a step whose caller gives up (resil.timeout) while the store has its result (the write lock held)", function()
  it("still checkpoints the result fn paid for: the step is done, and a resume replays it", function()
    local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
    local script = [[
local resil = require "resil"
local db, rel = arg[1], arg[2]
assert(resil.step("first", function() return 0 end)) -- (the run taken)
print(resil.timeout(0.3, function()
  return resil.step("pay", function()
    print("paid")
    if not io.open(rel .. ".locked") then -- another process takes the store's write lock for 1 s
      os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s.locked\\n.shell sleep 1\\nCOMMIT;\\n' " ..
        "| sqlite3 -bail %s >/dev/null 2>&1 &)"):format(rel, db))
      while not io.open(rel .. ".locked") do resil.sleep(0.02) end
    end
    return "answer"
  end)
end))
]]
    local r = helpers.run_script(script, ("--store '%s?timeout=5' --run gaveup --log-level off"):format(db), db .. " " .. rel)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^paid\nnil\ttimeout", r.stdout)
    local show = helpers.run(("%s runs show gaveup --store %s"):format(helpers.resil, db)).stdout
    -- (before: no trace of "pay", not even pending, and the run "done": resumed, it paid again)
    assert.matches("\n%-%s+2%s+pay%s+done%s", show)
    r = helpers.run_script(script, ("--store '%s?timeout=5' --run gaveup --log-level off"):format(db), db .. " " .. rel)
    assert.are.equal("answer\n", r.stdout) -- replayed, nothing paid
  end)
end)

describe("a step whose record waits for another process's write lock as the pipeline is stopped (SIGTERM)", function()
  it("still checkpoints the result fn paid for: the step is done, and a resume replays it", function()
    local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
    local script = [[
local resil = require "resil"
local db, rel = arg[1], arg[2]
assert(resil.step("first", function() return 0 end)) -- (the run taken)
print(resil.step("pay", function()
  print("paid")
  if not io.open(rel .. ".locked") then -- another process takes the store's write lock for 2 s
    os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s.locked\\n.shell sleep 2\\nCOMMIT;\\n' " ..
      "| sqlite3 -bail %s >/dev/null 2>&1 &)"):format(rel, db))
    while not io.open(rel .. ".locked") do resil.sleep(0.02) end
    resil.spawn(function() -- the stop comes while the record waits for the lock
      resil.sleep(0.3)
      os.execute("kill -TERM " .. io.open("/proc/self/stat"):read("l"):match("^%d+"))
    end)
  end
  return "answer"
end))
]]
    local r = helpers.run_script(script, ("--store '%s?timeout=5' --run stopped --log-level off"):format(db),
      db .. " " .. rel)
    assert.are.equal(143, r.code, r.stderr)
    assert.are.equal("paid\n", r.stdout)
    local show = helpers.run(("%s runs show stopped --store %s"):format(helpers.resil, db)).stdout
    -- (before: "pay" pending, its result lost: resumed, it paid again)
    assert.matches("\n%-%s+2%s+pay%s+done%s", show)
    r = helpers.run_script(script, ("--store '%s?timeout=5' --run stopped --log-level off"):format(db), db .. " " .. rel)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("answer\n", r.stdout) -- replayed, nothing paid
  end)
end)

describe("a pipeline stopped (SIGTERM) while the cost rows it waits for wait for another process's write lock", function()
  it("has each row in the ledger once the lock is free, as the host closes: the paid calls' costs are not lost", function()
    local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
    assert.are.equal(0, helpers.run_script('assert(require("resil").store():set("made", "1"))',
      "--store " .. db .. " --log-level off").code)
    local r = helpers.run_script([[
local resil = require "resil"
local db, rel = arg[1], arg[2]
os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s.locked\\n.shell sleep 2\\nCOMMIT;\\n' " ..
  "| sqlite3 -bail %s >/dev/null 2>&1 &)"):format(rel, db))
while not io.open(rel .. ".locked") do resil.sleep(0.02) end
resil.spawn(function() -- the stop comes while the rows wait for the lock
  resil.sleep(0.3)
  os.execute("kill -TERM " .. io.open("/proc/self/stat"):read("l"):match("^%d+"))
end)
local plain = resil.spawn(resil.cost.record, { provider = "openai", model = "plain", usd = 1, id = "chatcmpl-1" })
local paid = resil.spawn(resil.cost.record, { provider = "openai", model = "paid", usd = 2, retry = true })
print(plain:join(), paid:join())
]], ("--store '%s?timeout=5' --run costly --log-level off"):format(db), db .. " " .. rel)
    assert.are.equal(143, r.code, r.stderr)
    -- (before: no row at all, and not a word said: both calls' costs gone from the ledger)
    local rows = require("resil").json.decode(helpers.run(("%s costs --by model --json --store %s"):format(
      helpers.resil, db)).stdout)
    table.sort(rows, function(a, b) return a.key < b.key end)
    assert.are.same({ { "paid", 1, 2 }, { "plain", 1, 1 } },
      { { rows[1].key, rows[1].calls, rows[1].usd }, { rows[2].key, rows[2].calls, rows[2].usd } })
  end)
end)

describe("a pipeline whose store stays locked past its timeout through every step", function()
  it("says on stderr, once, that a step did not run, naming the store and the step's line", function()
    -- (it printed nothing at all and exited 0: every step's result nil, none of their work done)
    local db = helpers.tmpname(".db")
    assert.are.equal(0, helpers.run_script('assert(require("resil").store():set("made", "1"))',
      "--store " .. db .. " --log-level off").code)
    local release = helpers.hold_write_lock(db)
    local r = helpers.run_script([[
local resil = require "resil"
local a = resil.step("script", function() print("ran script") return "s" end)
local b = resil.step("render", function() print("ran render") return "r" end)
print(a, b)
]], ("--store '%s?timeout=0.3' --run stuck"):format(db))
    helpers.release_write_lock(release)
    assert.are.equal("nil\tnil\n", r.stdout)
    -- (before: exit status 0, as a run whose work was all done: a cron job's failure went unseen)
    assert.are.equal(1, r.code, r.stderr)
    local said, exit_line = r.stderr:match("^([^\n]*)\n([^\n]*)\n$")
    assert(said, r.stderr) -- one line, not one a step, and the command's own last one
    assert.matches("^resil%-lua: run stuck: 2 steps did not run, the store unavailable %(.*database is locked", exit_line)
    local line = assert(require("cjson").decode(said))
    assert.are.equal("error", line.level)
    assert.matches("a step did not run", line.msg, 1, true)
    assert.are.equal("script", line.step)
    assert.are.equal("stuck", line.run)
    assert.matches("%.lua:2$", line.at)
    assert.matches(db, line.error, 1, true)
  end)
end)
