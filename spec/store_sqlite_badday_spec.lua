-- A SQLite store on a bad day: a disk that fills up, a file another process holds, breaks or
-- leaves behind. What a user sees: an error naming the file, no crash, every cost row once, no
-- budget hold left behind by a write that never happened, the loop never held.
local resil = require "resil"
local helpers = require "spec.helpers"

local is_root = helpers.run("id -u").stdout == "0\n"

-- A SQLite store on a filesystem of its own (a tmpfs; root only) -> its path, and the command that
-- fills the filesystem up
local function small_disk(finally, size)
  local dir = helpers.tmpname("-disk")
  os.execute("mkdir -p " .. dir)
  assert(os.execute(("mount -t tmpfs -o size=%s tmpfs %s"):format(size, dir)), "cannot mount a tmpfs")
  finally(function() os.execute("umount " .. dir) end)
  return dir .. "/state.db", ("dd if=/dev/zero of=%s/filler bs=4k 2>/dev/null"):format(dir), dir .. "/filler"
end

describe("a SQLite store whose disk fills up, then gets room again", function()
  it("records every paid call's cost once, and leaves no hold", function()
    if not is_root then return pending("mounting a small filesystem needs root") end
    local db, fill, filler = small_disk(finally, "8m")
    local r = helpers.run_script(([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1000, per = "day" })
local calls, rows, refused = 0, 0, 0
for i = 1, 120 do
  local t = b:reserve(1)
  if i == 40 then os.execute(%q) end -- the disk full as a call runs
  if i == 80 then os.remove(%q) end  -- room again
  if t then
    calls = calls + 1 -- paid: its settle is written now, or tried again until the store takes it
    t:settle(1, { provider = "p", model = "m", id = "call-" .. i })
  else refused = refused + 1 end
  if resil.cost.record({ provider = "p", model = "m", usd = 0.5, id = "row-" .. i, user = ("u"):rep(3000) }) then
    rows = rows + 1
  end
end
resil.sleep(3) -- (the settles refused meanwhile are tried again)
local st = assert(b:state())
print(refused > 20, st.spent == calls, st.reserved, #st.holds, resil.cost.total({}) == calls + rows / 2)
]]):format(fill, filler), ("--store '%s' --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\ttrue\t0.0\t0\ttrue\n", r.stdout)
  end)
end)

describe("a SQLite store nobody has open, on a disk that fills up", function()
  -- (before: "store: PATH: disk I/O error" and nothing more, from every command: SQLite cannot make the -shm
  -- beside the file, and says no more than that)
  it("says the disk is full, in the commands that read it and in a script's writes; all of it is there once " ..
    "there is room", function()
    if not is_root then return pending("mounting a small filesystem needs root") end
    local db, fill, filler = small_disk(finally, "1m")
    local made = helpers.run_script([[
local resil = require "resil"
resil.step("one", function() assert(resil.cost.record({ provider = "p", model = "m", usd = 1.5 })) return 1 end)
]], ("--store '%s' --run full --log-level off"):format(db))
    assert.are.equal(0, made.code, made.stderr)
    os.execute(fill)
    local full = ("resil-lua: store_unavailable: store: %s: disk I/O error (no space left on the disk)\n"):format(db)
    for _, command in ipairs({ "costs", "runs", "runs show full", "budgets" }) do
      local r = helpers.run(("%s %s --store '%s'"):format(helpers.resil, command, db))
      assert.are.equal(1, r.code, command)
      assert.are.equal(full, r.stderr, command)
    end
    local r = helpers.run_script([[print(require("resil").cost.record({ provider = "p", model = "m", usd = 1 }))]],
      ("--store '%s' --log-level off"):format(db))
    assert.are.equal(("nil\tstore_unavailable: store: %s: disk I/O error (no space left on the disk)\n"):format(db),
      r.stdout)
    os.remove(filler)
    assert.are.equal("total $1.500000\n", helpers.run(("%s costs --store '%s'"):format(helpers.resil, db)).stdout)
    assert.matches("full%s+done%s+1", helpers.run(("%s runs --store '%s'"):format(helpers.resil, db)).stdout)
  end)
end)

describe("a SQLite store on a disk with less free room than its WAL takes before it is copied (about 4 MB)", function()
  it("writes until the rows themselves fill it, refuses the next ones unwritten, and writes again once there " ..
    "is room", function()
    if not is_root then return pending("mounting a small filesystem needs root") end
    local db = small_disk(finally, "6m")
    local dir = db:match("^(.*)/")
    local r = helpers.run_script(([[
local resil = require "resil"
local dir = %q
os.execute("dd if=/dev/zero of=" .. dir .. "/filler bs=1k count=3500 2>/dev/null") -- some 2.5 MB left
local written, sent = 0, {}
local function rows(n, tag)
  local ok, refused = 0, 0
  for i = 1, n do
    local r, err = resil.cost.record({ provider = "p", model = "m", usd = 0.5, id = tag .. i, user = ("u"):rep(1000) })
    if r then ok = ok + 1 else refused = refused + 1; sent[tostring(err.sent)] = true end
  end
  written = written + ok
  return ok, refused
end
print("room", rows(1000, "a"))
os.execute("dd if=/dev/zero of=" .. dir .. "/filler2 bs=4k 2>/dev/null") -- the disk full
local _, refused = rows(500, "b")
print("full", refused > 100, next(sent), next(sent, next(sent)))
os.remove(dir .. "/filler2")
print("again", rows(50, "c"))
print("ledger", resil.cost.total({}) == written * 0.5)
]]):format(dir), ("--store '%s' --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "room 231 769" and "again 0 50": the WAL, copied only at 1,000 frames, took the disk's
    -- room itself, and every write after was refused, also once 900 KB were free again)
    assert.are.equal("room\t1000\t0\nfull\ttrue\tfalse\tnil\nagain\t50\t0\nledger\ttrue\n", r.stdout)
    assert.are.equal("ok\n", helpers.run(("sqlite3 '%s' 'PRAGMA integrity_check'"):format(db)).stdout)
  end)
end)

describe("a SQLite store whose write lock another process holds past the store's timeout", function()
  it("refuses a reservation, and does not try to give back a hold the rolled-back write never made", function()
    local path = helpers.tmpname(".db")
    assert(resil.store(path)) -- (made, with its schema)
    local url = path .. "?timeout=0.3"
    resil.store_config({ url = url })
    finally(function() resil.store_config({ url = false }) end)
    local be = helpers.backend(assert(resil.store()))
    local abandoned = 0
    local abandon = be.budget_abandon
    be.budget_abandon = function(...) abandoned = abandoned + 1; return abandon(...) end
    finally(function() be.budget_abandon = nil end)
    local budget = resil.budget("locked-out", { limit = 10, per = "day" })
    assert(budget:state()) -- (its settings declared before the lock)
    local release = helpers.hold_write_lock(path)
    local t, err = budget:reserve(1)
    assert.is_nil(t)
    assert.are.equal("store_unavailable", err.kind)
    assert.matches("store " .. path .. ": database is locked", err.message, 1, true)
    resil.sleep(0.05) -- (a give-back is a task of its own)
    helpers.write(release, "")
    -- (before: a task per refusal tried to give the hold back for a minute, each try a write that
    -- waited the lock's timeout: a gateway kept a task writing for nothing per refusal during a
    -- backup, and on a full disk logged that each hold "counts until its hold ends")
    assert.are.equal(0, abandoned)
    assert(assert(budget:reserve(1)):settle(1, { provider = "p", model = "m" }))
    assert.are.same({ 1, 0 }, { budget:state().spent, budget:state().reserved })
  end)

  -- (before: budgets and budgets show waited the store's timeout and said "database is locked" while
  -- runs, costs and keys list answered: they moved and released holds, a write, to show them)
  it("answers budgets and budgets show at once, as runs, costs and keys list, a killed process's hold left out",
    function()
    local db = helpers.tmpname(".db")
    local pid, out = helpers.start([[
local resil = require "resil"
local b = resil.budget("team", { limit = 10, per = "day" })
assert(assert(b:reserve(2)):settle(1.5, { provider = "p", model = "m" }))
assert(b:reserve(3))
print("started"); io.stdout:flush()
resil.sleep(60)
]], ("--store '%s' --log-level off"):format(db))
    assert.is_true(helpers.kill_after_start(pid, out, 0), helpers.slurp(out)) -- (its $3 hold left)
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.release_write_lock(release) end)
    local url = db .. "?timeout=0.5"
    local show = helpers.run(("%s budgets show team --json --store '%s'"):format(helpers.resil, url))
    assert.are.equal(0, show.code, show.stderr)
    local b = resil.json.decode(show.stdout)
    assert.are.same({ 1.5, 0, 8.5, 0 }, { b.spent, b.reserved, b.remaining, #b.holds })
    local list = helpers.run(("%s budgets --store '%s'"):format(helpers.resil, url))
    assert.are.equal(0, list.code, list.stderr)
    assert.matches("team%s+%$10%.000000%s+day%s+%S+%s+%$1%.500000%s+%$0%.000000%s+%$8%.500000", list.stdout)
    for _, command in ipairs({ "runs", "costs", "keys list" }) do
      local r = helpers.run(("%s %s --store '%s'"):format(helpers.resil, command, url))
      assert.are.equal(0, r.code, command .. ": " .. r.stderr)
    end
  end)
end)

describe("a SQLite store whose write lock another process holds for a moment as the script ends", function()
  -- (before: the run's end, written at once after the loop, did not wait for the lock at all: "recording
  -- the run's end: store_unavailable: ... database is locked", and the run stayed "running" with its holder
  -- gone, as after a crash; with four processes on one file, another's group commit often fell there)
  for _, ending in ipairs({ "returns", "calls os.exit(0)" }) do
    it("records the run's end once the lock is let go, within the store's timeout, when the script " .. ending,
      function()
      local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
      local r = helpers.run_script(([[
local resil = require "resil"
local db, rel = arg[1], arg[2]
resil.step("one", function() return 1 end)
os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %%s.locked\\n.shell sleep 1\\nCOMMIT;\\n' " ..
  "| sqlite3 -bail %%s >/dev/null 2>&1 &)"):format(rel, db))
while not io.open(rel .. ".locked") do resil.sleep(0.02) end
%s
]]):format(ending == "returns" and "" or "os.exit(0)"), ("--store '%s?timeout=20' --run ends-locked --log-level off")
        :format(db), db .. " " .. rel)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("", r.stderr)
      local runs = helpers.run(("%s runs --store '%s'"):format(helpers.resil, db))
      assert.matches("ends%-locked%s+done", runs.stdout)
    end)
  end
end)

describe("a SQLite store whose write lock another process held past the store's timeout as paid calls were recorded",
  function()
  -- the lock another process (sqlite3) holds from now until the file `rel` exists
  local LOCK = [[
local function lock(db, rel)
  os.execute(("(printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s.locked\\n.shell while [ ! -e %s ]; " ..
    "do sleep 0.02; done\\nCOMMIT;\\n' | sqlite3 -bail %s >/dev/null 2>&1 &)"):format(rel, rel, db))
  while not io.open(rel .. ".locked") do require("resil").sleep(0.02) end
end
]]
  local ENDINGS = { { "raises", 'error("a later step failed")' }, { "calls os.exit(0)", "os.exit(0)" } }

  -- A settle and two ledger rows (one waited for with retry = true, as ai.* records a paid call; one queued with
  -- wait = false, as the gateway's) refused as unavailable, the lock then let go, and the script ends before
  -- their next try: each is written as the host closes. (Before: each was said lost, "the store was still
  -- unavailable", with the store taking writes again: their $1.75 gone from the ledger and the budget's spend,
  -- while a resumed run replays its resil.once results and pays nothing again. os.exit skipped the host's
  -- close altogether.)
  for _, e in ipairs(ENDINGS) do
    local ending, code = e[1], e[2]
    it("writes them as the script that " .. ending .. " after them ends, once the lock is let go", function()
      local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
      local r = helpers.run_script(LOCK .. ([[
local resil = require "resil"
local db, rel = arg[1], arg[2]
local b = resil.budget("team", { limit = 10, per = "day" })
local t = assert(b:reserve(1))
lock(db, rel)
local _, serr = t:settle(1, { provider = "p", model = "m", id = "call-1" })
local _, rerr = resil.cost.record({ provider = "p", model = "m", usd = 0.5, id = "call-2", retry = true })
resil.cost.record({ provider = "p", model = "m", usd = 0.25, id = "call-3", wait = false })
resil.sleep(0.5) -- (the queued row's commit refused too)
print(serr.retrying, rerr.retrying)
io.open(rel, "w"):close() -- the lock let go
resil.sleep(0.01)
%s
]]):format(code), ("--store '%s?timeout=0.2' --log-level error"):format(db), db .. " " .. rel)
      assert.are.equal(ending == "raises" and 1 or 0, r.code, r.stderr)
      assert.are.equal("true\ttrue\n", r.stdout)
      assert.is_nil(r.stderr:find("not written", 1, true), r.stderr)
      local costs = helpers.run(("%s costs --json --store '%s'"):format(helpers.resil, db))
      assert.are.equal(1.75, resil.json.decode(costs.stdout).usd)
      local budget = helpers.run(("%s budgets show team --json --store '%s'"):format(helpers.resil, db))
      assert.are.equal(1, resil.json.decode(budget.stdout).spent, budget.stdout)
    end)
  end

  -- (before: "may not have been written before the process ended: look for its id or ticket in the ledger", and
  -- it was not: a caller canceled while SQLite's queue had its write drops it, and the keyed write was not tried)
  it("writes a paid call's row and settle whose callers were canceled while the store had them (a deadline), as " ..
    "the script that raises after them ends", function()
    local db, rel = helpers.tmpname(".db"), helpers.tmpname(".rel")
    local r = helpers.run_script(LOCK .. [[
local resil = require "resil"
local db, rel = arg[1], arg[2]
local b = resil.budget("team", { limit = 10, per = "day" })
local t = assert(b:reserve(1))
lock(db, rel)
print(resil.timeout(0.05, function() return t:settle(1, { provider = "p", model = "m", id = "call-1" }) end))
print(resil.timeout(0.05, function()
  return resil.cost.record({ provider = "p", model = "m", usd = 0.5, id = "call-2", retry = true })
end))
io.open(rel, "w"):close() -- the lock let go
resil.sleep(0.01)
error("a later step failed")
]], ("--store '%s?timeout=5' --log-level error"):format(db), db .. " " .. rel)
    assert.are.equal(1, r.code, r.stderr)
    assert.are.equal("nil\ttimeout: timed out after 0.05 s\nnil\ttimeout: timed out after 0.05 s\n", r.stdout)
    assert.is_nil(r.stderr:find("written", 1, true), r.stderr)
    local costs = helpers.run(("%s costs --json --store '%s'"):format(helpers.resil, db))
    assert.are.equal(1.5, resil.json.decode(costs.stdout).usd)
    local budget = helpers.run(("%s budgets show team --json --store '%s'"):format(helpers.resil, db))
    assert.are.same({ 1, 0 }, { resil.json.decode(budget.stdout).spent, resil.json.decode(budget.stdout).reserved })
  end)

  -- (before: os.exit skipped it, and the key stayed claimed by the dead process: the next caller ran fn, and
  -- paid, again)
  it("keeps a resil.once result whose record was refused, as the script calls os.exit(0)", function()
    local db, rel, paid = helpers.tmpname(".db"), helpers.tmpname(".rel"), helpers.tmpname(".paid")
    local r = helpers.run_script(LOCK .. [[
local resil = require "resil"
local db, rel, paid = arg[1], arg[2], arg[3]
print(resil.once("job-1", function()
  lock(db, rel)
  local f = io.open(paid, "a"); f:write("paid\n"); f:close()
  return "answer"
end))
io.open(rel, "w"):close() -- the lock let go
resil.sleep(0.01)
os.exit(0)
]], ("--store '%s?timeout=0.2' --log-level error"):format(db), ("%s %s %s"):format(db, rel, paid))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("answer\n", r.stdout)
    local again = helpers.run_script([[
local resil = require "resil"
print(resil.once("job-1", function() local f = io.open(arg[1], "a"); f:write("paid\n"); f:close(); return "again" end))
]], ("--store '%s' --log-level error"):format(db), paid)
    assert.are.equal("answer\n", again.stdout, again.stderr)
    assert.are.equal("paid\n", helpers.slurp(paid))
  end)
end)

describe("a SQLite store whose -wal and -shm files are deleted under the running process (a cleanup of temporary " ..
  "files)", function()
  local CHECK = [[
local resil = require "resil"
print("ledger", resil.cost.total({}))
]]
  -- the process that loses its files: $2 settled, the files deleted, then `between` run (another
  -- process), then a reservation and a row tried
  local function losing(db, between)
    return helpers.run_script(([[
local resil = require "resil"
local db = arg[1]
local b = resil.budget("team", { limit = 10, per = "day" })
assert(assert(b:reserve(2)):settle(2, { provider = "p", model = "m" }))
os.remove(db .. "-wal"); os.remove(db .. "-shm")
os.execute(%q)
print(b:reserve(8))
print(resil.cost.record({ provider = "p", model = "m", usd = 1 }))
]]):format(between), ("--store '%s' --log-level off"):format(db), db)
  end
  local function gone(db)
    return ("nil\tstore_unavailable: store %s: its -wal or -shm file was deleted or replaced since it was opened; " ..
      "nothing is written to it any more\n"):format(db)
  end

  it("refuses every write after it, naming the file; what it wrote before is in the file once it ends", function()
    local db = helpers.tmpname(".db")
    local check = helpers.write(helpers.tmpname(".lua"), CHECK)
    helpers.run(("%s --store '%s' %s"):format(helpers.resil, db, check)) -- (the store made, its schema in the file)
    local r = losing(db, ("%s --store '%s' %s"):format(helpers.resil, db, check))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: both were written into the deleted WAL, which no other process reads: another process saw
    -- $0 in the ledger, and a budget's $0 spent let it reserve the whole budget again)
    assert.are.equal("ledger\t0.0\n" .. gone(db) .. gone(db), r.stdout)
    -- (SQLite copies the deleted WAL in as the process closes: nobody else wrote meanwhile)
    assert.are.equal("ledger\t2.0\n", helpers.run(("%s --store '%s' %s"):format(helpers.resil, db, check)).stdout)
  end)

  it("another process that wrote meanwhile keeps its writes, and the file stays whole", function()
    local db = helpers.tmpname(".db")
    local other = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
assert(resil.cost.record({ provider = "p", model = "m", usd = 5 }))
]])
    local r = losing(db, ("%s --store '%s' %s"):format(helpers.resil, db, other))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(gone(db) .. gone(db), r.stdout)
    -- (the deleted WAL is not copied in by its stale index over the other process's pages: its $2 is
    -- lost with it, which no process could read since the deletion)
    local check = helpers.write(helpers.tmpname(".lua"), CHECK)
    assert.are.equal("ledger\t5.0\n", helpers.run(("%s --store '%s' %s"):format(helpers.resil, db, check)).stdout)
    assert.are.equal("ok\n", helpers.run(("sqlite3 '%s' 'PRAGMA integrity_check'"):format(db)).stdout)
  end)
end)

describe("a SQLite store whose -shm file is deleted under the running process while another process uses the file",
  function()
  it("refuses writes in the process that lost it, and the file stays whole with both processes' spend", function()
    local db = helpers.tmpname(".db")
    local other = helpers.write(helpers.tmpname(".lua"), [[
local b = require("resil").budget("team", { limit = 1000, per = "day" })
for _ = 1, 50 do assert(assert(b:reserve(1)):settle(1, { provider = "p", model = "m" })) end
print("the other process settled 50")
]])
    local check = helpers.write(helpers.tmpname(".lua"), [[
local st = assert(require("resil").budget("team", { limit = 1000, per = "day" }):state())
print("spent", st.spent)
]])
    local r = helpers.run_script(([[
local resil = require "resil"
local db = arg[1]
local b = resil.budget("team", { limit = 1000, per = "day" })
for _ = 1, 20 do assert(assert(b:reserve(1)):settle(1, { provider = "p", model = "m" })) end
os.remove(db .. "-shm")
os.execute(%q) -- (it makes an index of its own, and its own locks)
for _ = 1, 20 do
  local t, err = b:reserve(1)
  if not t then print(err) break end
  assert(t:settle(1, { provider = "p", model = "m" }))
end
]]):format(("%s --store '%s' %s"):format(helpers.resil, db, other)), ("--store '%s' --log-level off"):format(db), db)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("the other process settled 50\nstore_unavailable: store " .. db .. ": its -wal or -shm file " ..
      "was deleted or replaced since it was opened; nothing is written to it any more\n", r.stdout)
    -- (before: both wrote the WAL, each by an index and locks of its own, and the first copied its WAL in by
    -- its index as it closed: the file was "not a database", every row of the ledger gone)
    local after = helpers.run(("%s --store '%s' %s"):format(helpers.resil, db, check))
    assert.are.equal("spent\t70.0\n", after.stdout, after.stderr)
    assert.are.equal("ok\n", helpers.run(("sqlite3 '%s' 'PRAGMA integrity_check'"):format(db)).stdout)
  end)
end)

describe("a SQLite store whose file is replaced under the running process (a backup moved over it)", function()
  local CHECK = [[
local resil = require "resil"
print("ledger", resil.cost.total({}))
assert(resil.cost.record({ provider = "p", model = "m", usd = 0.25 }))
]]
  -- the process that loses its file: rows of $1 written (pages in its WAL), `between` run, then a row tried
  local function losing(db, between)
    return helpers.run_script(([[
local resil = require "resil"
for _ = 1, 2000 do assert(resil.cost.record({ provider = "p", model = "m", usd = 1, user = ("u"):rep(200) })) end
os.execute(%q)
print(resil.cost.record({ provider = "p", model = "m", usd = 1 }))
]]):format(between), ("--store '%s' --log-level off"):format(db))
  end

  it("refuses writes, and the file now there is whole, as it was put there, for the next process", function()
    local db = helpers.tmpname(".db")
    local check = helpers.write(helpers.tmpname(".lua"), CHECK)
    helpers.run(("%s --store '%s' %s"):format(helpers.resil, db, check)) -- (a backup of $0.25)
    helpers.run(("sqlite3 '%s' '.backup %s.bak'"):format(db, db))
    local r = losing(db, ("mv '%s.bak' '%s'"):format(db, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(("nil\tstore_unavailable: store %s: its file was deleted or replaced since it was opened; " ..
      "nothing is written to it any more\n"):format(db), r.stdout)
    -- (before: the process left its WAL, of the file that went, and the next one read its pages over the
    -- backup: "database disk image is malformed", the restored ledger gone)
    local after = helpers.run(("%s --store '%s' %s"):format(helpers.resil, db, check))
    assert.are.equal("ledger\t0.25\n", after.stdout, after.stderr)
    assert.are.equal("ok\n", helpers.run(("sqlite3 '%s' 'PRAGMA integrity_check'"):format(db)).stdout)
  end)
end)

describe("a SQLite store whose -shm file is truncated or made immutable under the running process", function()
  it("refuses every operation with an error naming the file, instead of dying of SIGBUS; the file keeps its " ..
    "ledger", function()
    for _, how in ipairs({ { "truncate -s 0 %s-shm", "truncated" }, { "chattr +i %s-shm", "made immutable" } }) do
      if how[2] == "made immutable" and not is_root then return pending("chattr +i needs root") end
      local db = helpers.tmpname(".db")
      finally(function() os.execute(("chattr -i '%s-shm' 2>/dev/null"):format(db)) end)
      local r = helpers.run_script(([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1000, per = "day" })
for _ = 1, 5 do assert(assert(b:reserve(1)):settle(1, { provider = "p", model = "m" })) end
os.execute(%q)
print(b:state())
print(b:reserve(1))
print(resil.cost.record({ provider = "p", model = "m", usd = 1 }))
]]):format(how[1]:format(db)), ("--store '%s' --log-level off"):format(db))
      -- (before: killed by SIGBUS, 135, at the next transaction: SQLite reads and writes the -shm
      -- through a shared mapping)
      assert.are.equal(0, r.code, r.stderr)
      local refused = ("store_unavailable: store %s: its -shm file was %s"):format(db, how[2])
      local n = 0
      for line in r.stdout:gmatch("[^\n]+") do
        assert.matches("nil\t" .. refused, line, 1, true)
        n = n + 1
      end
      assert.are.equal(3, n)
      os.execute(("chattr -i '%s-shm' 2>/dev/null"):format(db))
      local after = helpers.run(("%s --store '%s' %s"):format(helpers.resil, db,
        helpers.write(helpers.tmpname(".lua"), 'print("ledger", require("resil").cost.total({}))')))
      assert.are.equal("ledger\t5.0\n", after.stdout, after.stderr)
    end
  end)
end)

describe("a SQLite store past the process's file-size limit (ulimit -f, a service's LimitFSIZE)", function()
  it("refuses the writes past it unwritten, saying why, instead of the process dying of SIGXFSZ; each row once",
    function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local b = resil.budget("team", { limit = 1000, per = "day" })
local written, refused, why = 0, 0, {}
for i = 1, 400 do
  local t = b:reserve(1)
  if t then t:release() end
  local ok, err = resil.cost.record({ provider = "p", model = "m", usd = 0.5, id = "row-" .. i, user = ("u"):rep(3000) })
  if ok then written = written + 1 else
    refused = refused + 1
    why[("%s sent=%s %s"):format(err.kind, tostring(err.sent), err.message:match("file%-size limit") or "?")] = true
  end
end
print(written > 0, refused > 100, next(why), next(why, next(why)))
print("ledger", resil.cost.total({}) == written * 0.5, b:state().reserved)
]])
    -- (dash counts the limit in blocks of 512 bytes: the file and its WAL may grow to 1 MB)
    local r = helpers.run(("ulimit -f 2000; %s --store '%s' --log-level off %s"):format(helpers.resil, db, script))
    -- (before: killed by SIGXFSZ, 153, at the first write past the limit, with nothing said)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\ttrue\tstore_unavailable sent=false file-size limit\tnil\nledger\ttrue\t0.0\n", r.stdout)
    -- every row once, in a file whole: the refused ones written by a run without the limit
    local after = helpers.run(("%s --store '%s' --log-level off %s"):format(helpers.resil, db, script))
    assert.are.equal("true\tfalse\tnil\tnil\nledger\ttrue\t0.0\n", after.stdout, after.stderr)
    assert.are.equal("ok\n", helpers.run(("sqlite3 '%s' 'PRAGMA integrity_check'"):format(db)).stdout)
    local rows = helpers.run(("sqlite3 '%s' 'SELECT count(*), count(DISTINCT dedupe) FROM costs'"):format(db))
    assert.are.equal("400|400\n", rows.stdout, rows.stderr)
  end)

  it("keeps its WAL short under a limit that a WAL copied only at 1,000 frames would reach: the rows fill the file",
    function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local written = 0
for i = 1, 400 do
  if resil.cost.record({ provider = "p", model = "m", usd = 0.5, id = "row-" .. i, user = ("u"):rep(3000) }) then
    written = written + 1
  end
end
print(written > 200, resil.cost.total({}) == written * 0.5)
]])
    local r = helpers.run(("ulimit -f 2000; %s --store '%s' --log-level off %s"):format(helpers.resil, db, script))
    -- (before: "false": some 60 rows of 3 KB in a file of 250 KB, then the WAL at the limit refused
    -- every write after, though the file had room for three times as many)
    assert.are.equal("true\ttrue\n", r.stdout, r.stderr)
  end)
end)
