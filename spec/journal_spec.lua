-- The ledger's journal (src/lua/journal.lua, src/journal.c): cost rows and budget settles the
-- store would not take for longer than the retry's minute, or still unwritten as the process
-- ended, are kept in a file and written to the store when it answers, once. Before, each was a
-- line in the log ("its cost is not in the ledger") and a paid call missing from the ledger and
-- its budget. A real redis-server, stopped, frozen and started again on its port; real SQLite
-- files, their write lock held by another process; real processes.
local resil = require "resil"
local helpers = require "spec.helpers"

local port, pid, dir

local function start_redis()
  local pidfile = dir .. "/redis.pid"
  os.remove(pidfile) -- (one a server killed with -9 left)
  os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
              "--pidfile %s --databases 64 --logfile %s/redis.log > /dev/null"):format(port, dir, pidfile, dir))
  assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10),
    helpers.slurp(dir .. "/redis.log"))
  pid = helpers.slurp(pidfile):match("%d+")
  assert(helpers.wait_until(function()
    return os.execute(("redis-cli -p %d ping > /dev/null 2>&1"):format(port)) == true
  end, 10))
  os.remove(dir .. "/dump.rdb")
end

-- keep: its keys saved first, for the next start to load (a server restarted with its data)
local function stop_redis(keep)
  if pid and keep then os.execute(("redis-cli -p %d save > /dev/null"):format(port)) end
  if not pid then return end
  os.execute("kill -CONT " .. pid .. "; kill -9 " .. pid)
  helpers.wait_until(function() return not helpers.alive(pid) end, 10)
  os.remove(dir .. "/redis.pid")
  pid = nil
end

local db_seq = 0
local function fresh_url()
  db_seq = db_seq + 1
  return ("redis://127.0.0.1:%d/%d"):format(port, db_seq)
end

setup(function()
  dir = helpers.tmpname("-journal-redis")
  os.execute("mkdir -p " .. dir)
  port = helpers.free_port()
  start_redis()
end)
teardown(function()
  stop_redis()
  os.execute("rm -rf " .. dir)
end)

-- a journal folder of the test's own -> its path, and the files in it now
local function new_folder()
  local d = helpers.tmpname("-journal")
  return d, function()
    local names = {}
    local p = io.popen("ls " .. d .. " 2>/dev/null")
    for name in p:lines() do names[#names + 1] = name end
    p:close()
    return names
  end
end

local function with_journal(folder)
  return "RESIL_JOURNAL=" .. folder .. " "
end

-- A process with the journal of `folder`, on the store `store`, running the script `source`
local function run_in(folder, store, source)
  return helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. store .. "' " ..
    helpers.write(helpers.tmpname(".lua"), source))
end

-- the ledger of `url` as another process reads it, once what it is waiting for is there: -> calls, usd
local function ledger(folder, url, calls)
  local r = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "' --log-level off " ..
    helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
for _ = 1, 200 do
  local by = resil.cost.breakdown("provider")
  -- (and the journal written: this process's replay runs in the background, cut if it ends first)
  if by and by[1] and by[1].calls >= %d and os.execute("test -z \"$(ls %s)\"") then break end
  resil.sleep(0.05)
end
local by = assert(resil.cost.breakdown("provider"))
print(by[1] and by[1].calls or 0, ("%%.6f"):format(assert(resil.cost.total())))
]]):format(calls, folder)))
  assert.are.equal(0, r.code, r.stderr)
  local n, usd = r.stdout:match("^(%d+)\t([%d.]+)")
  return tonumber(n), usd
end

-- A SQLite store made, its write lock held by another process while a process records the rows
-- `source` names (its body: Lua that records with wait = false), which end in the journal of
-- `folder` as that process ends: -> the store's path, that process's run
local function kept_on_sqlite(folder, source)
  local db = helpers.tmpname(".db")
  assert.are.equal(0, helpers.run(helpers.resil .. " --store " .. db .. " -e 'require(\"resil\").store()'").code)
  local release = helpers.hold_write_lock(db)
  local r = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. db .. "?timeout=0.05' " ..
    helpers.write(helpers.tmpname(".lua"), 'local resil = require "resil"\n' .. source ..
      "\nresil.sleep(0.2)\nos.exit(0)\n"))
  helpers.release_write_lock(release)
  assert.are.equal(0, r.code, r.stderr)
  return db, r
end

describe("the ledger's journal on Redis", function()
  it("keeps the rows a process could not write before it ended, and the next process writes them, once",
    function()
      local folder, files = new_folder()
      local url = fresh_url()
      stop_redis()
      local r = run_in(folder, url .. "?timeout=0.1", [[
local resil = require "resil"
for i = 1, 3 do assert(resil.cost.record({ provider = "down", model = "m", usd = 0.25, id = "row-" .. i, wait = false })) end
assert(resil.cost.record({ provider = "down", model = "m", usd = 0.5, wait = false })) -- (no id of its own)
resil.sleep(0.2)
os.exit(0)
]])
      assert.are.equal(0, r.code, r.stderr)
      -- (before: "a cost row was not written before the process ended; its cost is not in the ledger", four times)
      assert.are.same({}, helpers.rows_logged_lost(r.stderr), r.stderr)
      local _, kept = r.stderr:gsub("a cost row is kept in the ledger's journal", "")
      assert.are.equal(4, kept, r.stderr)
      assert.are.equal(1, #files(), r.stderr)
      start_redis()
      -- a report reads the store and writes nothing to it, its journal's lines neither
      local report = helpers.run(with_journal(folder) .. helpers.resil .. " costs --store '" .. url .. "'")
      assert.are.equal(0, report.code, report.stderr)
      assert.matches("total %$0%.000000", report.stdout)
      assert.matches("the ledger's journal holds writes not yet in this store", report.stderr, 1, true)
      assert.are.equal(1, #files())
      -- a process that opens the store writes them; a second one finds nothing left to write
      assert.are.same({ 4, "1.250000" }, { ledger(folder, url, 4) })
      assert.are.same({}, files())
      assert.are.same({ 4, "1.250000" }, { ledger(folder, url, 4) })
    end)

  it("asks a store still down once as it opens, then after the pause, not in a loop", function()
    local folder, files = new_folder()
    local url = fresh_url()
    stop_redis()
    finally(start_redis)
    local r = run_in(folder, url .. "?timeout=0.1", [[
local resil = require "resil"
assert(resil.cost.record({ provider = "down", usd = 0.25, id = "spin-1", wait = false }))
resil.sleep(0.2)
os.exit(0)
]])
    assert.are.equal(0, r.code, r.stderr)
    local before = files()
    assert.are.equal(1, #before, r.stderr)
    -- (before: the first pass's pause of 0 doubled to 0, some 200 passes a second, each logged, the
    -- journal copied to a new file each time)
    local again = run_in(folder, url .. "?timeout=0.1", [[
local resil = require "resil"
resil.store()
resil.sleep(1)
]])
    assert.are.equal(0, again.code, again.stderr)
    local _, passes = again.stderr:gsub("the store did not take the ledger's journal: it is written to it later", "")
    assert.are.equal(1, passes, again.stderr)
    -- none of it written: the file is left as it is, not read line by line and copied to the process's
    -- own at each pass (a 100,000-line journal held the loop some 0.7 s a pass)
    assert.are.same(before, files(), again.stderr)
  end)

  it("writes a row once that the frozen server ran as it thawed and the journal kept too", function()
    local folder, files = new_folder()
    local url = fresh_url()
    assert.are.same({ 0, "0.000000" }, { ledger(folder, url, 0) }) -- (the connection's first use)
    local r = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "?timeout=0.2' " ..
      helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
assert(resil.store():set("warm", "1"))
os.execute("kill -STOP %s")
for i = 1, 2 do assert(resil.cost.record({ provider = "frozen", usd = 0.25, id = "sent-" .. i, wait = false })) end
assert(resil.cost.record({ provider = "frozen", usd = 0.25, wait = false }))
resil.sleep(0.6)
os.exit(0)
]]):format(pid)))
    os.execute("kill -CONT " .. pid)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1, #files(), r.stderr)
    assert.are.same({ 3, "0.750000" }, { ledger(folder, url, 3) })
    assert.are.same({}, files())
    assert.are.same({ 3, "0.750000" }, { ledger(folder, url, 3) })
  end)

  it("keeps a budget's settle, and the spend counts once in the budget and the ledger", function()
    local folder, files = new_folder()
    local url = fresh_url()
    local source = [[
local resil = require "resil"
local b = resil.budget("journaled", { limit = 10, per = "day" })
if arg[1] == "spend" then
  local t = assert(b:reserve(1))
  os.execute(("redis-cli -p %d save > /dev/null; kill -9 %s"):format(...))
  assert(t:settle(0.75, { provider = "p", model = "m", wait = false }))
  resil.sleep(0.2)
  os.exit(0)
end
for _ = 1, 200 do
  if assert(b:state()).spent >= 0.75 then break end
  resil.sleep(0.05)
end
local st = assert(b:state())
print(("%.6f %.6f %.6f"):format(st.spent, st.reserved, resil.cost.total()))
]]
    local script = helpers.write(helpers.tmpname(".lua"), source:gsub("%.%.%.", ("%d, %s"):format(port, pid)))
    local r = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "?timeout=0.1' " .. script ..
      " spend")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("a settle is kept in the ledger's journal", r.stderr, 1, true)
    assert.are.equal(1, #files(), r.stderr)
    pid = nil
    start_redis() -- (with what it had saved: the hold, not the settle)
    local again = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "' " .. script)
    assert.are.equal(0, again.code, again.stderr)
    assert.are.equal("0.750000 0.000000 0.750000\n", again.stdout, again.stderr)
    assert.are.same({}, files())
    local third = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "' " .. script)
    assert.are.equal("0.750000 0.000000 0.750000\n", third.stdout, third.stderr)
  end)

  it("keeps a resil.once record a process could not write as it ended: the next caller replays it, not paying again",
    function()
      local folder, files = new_folder()
      local url = fresh_url()
      local first = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "?timeout=0.2' " ..
        helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
print(resil.once("order-42", function()
  -- the store goes as the paid call ends: its claim saved, the record never written
  os.execute("redis-cli -p %d save > /dev/null; kill -9 %s")
  return "paid-1"
end))
os.exit(0)
]]):format(port, pid)))
      assert.are.equal(0, first.code, first.stderr)
      assert.are.equal("paid-1\n", first.stdout)
      assert.matches("once: the record is kept in the ledger's journal", first.stderr, 1, true)
      pid = nil
      start_redis() -- (with what it had saved: the claim of a process that is gone)
      local again = run_in(folder, url, [[
local resil = require "resil"
print(resil.once("order-42", function() return "paid-2" end))
]])
      assert.are.equal(0, again.code, again.stderr)
      -- (before: "paid-2", the dead holder's key taken over and its fn run, and paid, again)
      assert.are.equal("paid-1\n", again.stdout, again.stderr)
      assert.are.same({}, files())
    end)

  it("keeps its lines when the store refuses every command (a password set since): not one is dropped", function()
    -- (before: NOAUTH, a store_error, was taken for the line's own refusal: each line dropped with
    -- "the ledger refused a write", and the file removed, by any process opened without the password)
    local folder, files = new_folder()
    local url = fresh_url()
    stop_redis()
    local r = run_in(folder, url .. "?timeout=0.1", [[
local resil = require "resil"
for i = 1, 3 do assert(resil.cost.record({ provider = "auth", usd = 0.25, id = "auth-" .. i, wait = false })) end
resil.sleep(0.2)
os.exit(0)
]])
    assert.are.equal(0, r.code, r.stderr)
    start_redis()
    os.execute(("redis-cli -p %d config set requirepass secret > /dev/null"):format(port))
    finally(function() os.execute(("redis-cli -p %d -a secret config set requirepass '' > /dev/null 2>&1"):format(port)) end)
    local without = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "' -e " ..
      "'local resil = require \"resil\"; resil.store(); resil.sleep(0.3)'")
    assert.is_nil(without.stderr:find("the ledger refused a write from its journal", 1, true), without.stderr)
    assert.are.equal(1, #files(), without.stderr)
    os.execute(("redis-cli -p %d -a secret config set requirepass '' > /dev/null 2>&1"):format(port))
    assert.are.same({ 3, "0.750000" }, { ledger(folder, url, 3) })
    assert.are.same({}, files())
  end)

  it("a resil.once of the key in another task waits for the journal's first pass, rows ahead of the record",
    function()
      -- (before: the opener's task replayed, and another task's once, its open returned at once, took
      -- the dead holder's claim over and ran fn, paid again, while 3,000 rows went ahead of the record)
      local folder, files = new_folder()
      local url = fresh_url()
      local first = helpers.run(with_journal(folder) .. helpers.resil .. " --store '" .. url .. "?timeout=0.2' " ..
        helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
print(resil.once("order-7", function()
  os.execute("redis-cli -p %d save > /dev/null; kill -9 %s")
  return "paid-1"
end))
os.exit(0)
]]):format(port, pid)))
      assert.are.equal("paid-1\n", first.stdout, first.stderr)
      pid = nil
      start_redis()
      -- rows ahead of the record in its file
      local path = folder .. "/" .. assert(files()[1], first.stderr)
      local once_line = helpers.slurp(path)
      local lines = {}
      for i = 1, 3000 do
        lines[i] = resil.json.encode({ k = "row", e = { dedupe = "ahead-" .. i, at = 1, day = "2026-12-08",
          micro_usd = 1, provider = "p" } }) .. "\n"
      end
      helpers.write(path, table.concat(lines) .. once_line)
      local again = run_in(folder, url, [[
local resil = require "resil"
resil.spawn(function() resil.store() end)
print(resil.spawn(function() return resil.once("order-7", function() return "paid-2" end) end):join())
]])
      assert.are.equal(0, again.code, again.stderr)
      assert.are.equal("true\tpaid-1\n", again.stdout, again.stderr)
      assert.are.same({}, files())
    end)

  it("two processes that open the store at once write a journal's rows once", function()
    local folder, files = new_folder()
    local url = fresh_url()
    stop_redis()
    local r = run_in(folder, url .. "?timeout=0.1", [[
local resil = require "resil"
for i = 1, 50 do assert(resil.cost.record({ provider = "two", usd = 0.01, id = "two-" .. i, wait = false })) end
resil.sleep(0.2)
os.exit(0)
]])
    assert.are.equal(0, r.code, r.stderr)
    start_redis()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.store()
resil.sleep(1)
]])
    os.execute(("%s%s --store '%s' %s & %s%s --store '%s' %s; wait"):format(with_journal(folder), helpers.resil,
      url, script, with_journal(folder), helpers.resil, url, script))
    assert.are.same({ 50, "0.500000" }, { ledger(folder, url, 50) })
    assert.are.same({}, files())
  end)
end)

describe("the ledger's journal on SQLite, written by hand or cut short", function()
  it("writes its good lines, names each line that is not a ledger write, and leaves nothing behind", function()
    local folder, files = new_folder()
    local db, r = kept_on_sqlite(folder,
      'assert(resil.cost.record({ provider = "hand", model = "m", usd = 0.25, id = "hand-1", wait = false }))')
    assert.are.same({ "hand-1 0.25" }, helpers.rows_logged_kept(r.stderr), r.stderr)
    local name = assert(files()[1], r.stderr)
    local f = assert(io.open(folder .. "/" .. name, "a"))
    -- a line that is no JSON, one with a price that is not one, and the last cut by a power cut
    f:write('not json\n{"k":"row","e":{"dedupe":"bad-1","micro_usd":"lots","at":1,"day":"x"}}\n{"k":"row","e":{"de')
    f:close()
    -- and a file of garbage: its first lines named, then their count (before: a log line each)
    helpers.write(folder .. "/" .. name:gsub("%-1%.jsonl$", "-8.jsonl"), ("garbage\n"):rep(5000))
    -- a folder named like a journal is no journal (before: "could not be read", each pass for good)
    os.execute("mkdir " .. folder .. "/" .. name:gsub("%-1%.jsonl$", "-9.jsonl"))
    local again = helpers.run(with_journal(folder) .. helpers.resil .. " --store " .. db .. " " ..
      helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.store()
resil.sleep(0.3)
print(resil.cost.total())
]]))
    assert.are.equal(0, again.code, again.stderr)
    assert.are.equal("0.25\n", again.stdout, again.stderr)
    local _, named = again.stderr:gsub("a line of a ledger journal that is not a ledger write was left out", "")
    assert.are.equal(3 + 10, named, again.stderr)
    assert.matches('"lines":4990', again.stderr, 1, true)
    assert.is_nil(again.stderr:find("could not be read", 1, true), again.stderr)
    assert.are.same({ (name:gsub("%-1%.jsonl$", "-9.jsonl")) }, files())
  end)
end)

describe("the ledger's journal replayed by short-lived processes", function()
  it("keeps only what is left of a file a process ended in the middle of, and all of it is written once", function()
    local folder, files = new_folder()
    local db, r = kept_on_sqlite(folder,
      'assert(resil.cost.record({ provider = "short", model = "m", usd = 0.01, id = "short-0", wait = false }))')
    local path = folder .. "/" .. assert(files()[1], r.stderr)
    local line = helpers.slurp(path)
    local many = { line }
    for i = 1, 5000 do many[#many + 1] = (line:gsub('"short%-0"', '"short-' .. i .. '"')) end
    helpers.write(path, table.concat(many))
    -- a process that ends a moment into its open's replay (a script's os.exit, SIGTERM): it wrote some of the file
    local short = helpers.run(with_journal(folder) .. helpers.resil .. " --store " .. db .. " --log-level off -e " ..
      "'local resil = require \"resil\"; resil.spawn(function() resil.sleep(0.05) os.exit(0) end); resil.store()'")
    assert.are.equal(0, short.code, short.stderr)
    -- (before: the file left whole, its first part written again by the next, and the next)
    local _, left = helpers.slurp(folder .. "/" .. assert(files()[1])):gsub("\n", "")
    assert.is_true(left > 0 and left < 5001, left)
    assert.are.same({ 5001, "50.010000" }, { ledger(folder, db, 5001) })
    assert.are.same({}, files())
  end)
end)

describe("the ledger's journal replayed by a process killed with SIGKILL", function()
  it("is replayed whole by the next process, every row once", function()
    local folder, files = new_folder()
    local db, r = kept_on_sqlite(folder,
      'assert(resil.cost.record({ provider = "killed", model = "m", usd = 0.01, id = "killed-0", wait = false }))')
    local path = folder .. "/" .. assert(files()[1], r.stderr)
    local line = helpers.slurp(path)
    local many = { line }
    for i = 1, 5000 do many[#many + 1] = (line:gsub('"killed%-0"', '"killed-' .. i .. '"')) end
    helpers.write(path, table.concat(many))
    -- a process killed in the middle of its first pass: its lock goes with it, its file stays whole
    local pid_file = helpers.tmpname(".pid")
    os.execute(("%s%s --store %s --log-level off -e 'require(\"resil\").store(); " ..
      "require(\"resil\").sleep(30)' & echo $! > %s; sleep 0.15; kill -9 $(cat %s); wait"):format(
      with_journal(folder), helpers.resil, db, pid_file, pid_file))
    assert.are.equal(1, #files())
    assert.are.same({ 5001, "50.010000" }, { ledger(folder, db, 5001) })
    assert.are.same({}, files())
  end)
end)

describe("the ledger's journal in a folder others may write in", function()
  it("writes no line of a file another user planted there", function()
    local folder, files = new_folder()
    local db, r = kept_on_sqlite(folder,
      'assert(resil.cost.record({ provider = "mine", model = "m", usd = 0.25, id = "mine-1", wait = false }))')
    local name = assert(files()[1], r.stderr)
    -- another user's file, named as the store's journals are (RESIL_JOURNAL=/tmp, a shared folder)
    local planted = folder .. "/" .. name:gsub("%-1%.jsonl$", "-666.jsonl")
    helpers.write(planted, '{"k":"row","e":{"dedupe":"planted-1","micro_usd":1000000000,"at":1,"day":"2026-01-01",' ..
      '"provider":"planted"}}\n')
    if os.execute("chown nobody " .. planted .. " 2>/dev/null") ~= true then
      return pending("giving a file to another user needs root")
    end
    os.execute("chmod 644 " .. planted)
    local again = helpers.run(with_journal(folder) .. helpers.resil .. " --store " .. db .. " --log-level off -e '" ..
      "local resil = require \"resil\"; resil.store(); resil.sleep(0.5); print(resil.cost.total())'")
    assert.are.equal("0.25\n", again.stdout, again.stderr)
    assert.are.same({ (planted:match("[^/]+$")) }, files())
  end)
end)

describe("the ledger's journal on a full disk", function()
  it("keeps what fits whole in one file, names the rest as lost with the disk's error, and all kept is written once",
    function()
      local folder, files = new_folder()
      os.execute("mkdir -p " .. folder)
      -- a real full disk: a small tmpfs (root); elsewhere there is no such disk to fill
      if os.execute(("mount -t tmpfs -o size=64k tmpfs %s 2>/dev/null"):format(folder)) ~= true then
        return pending("mounting a tmpfs needs root")
      end
      finally(function() os.execute("umount -l " .. folder) end)
      local db, r = kept_on_sqlite(folder, 'for i = 1, 800 do assert(resil.cost.record({ provider = "full", ' ..
        'model = "m", usd = 0.01, id = "full-" .. i, wait = false })) end')
      local kept, lost = #helpers.rows_logged_kept(r.stderr), #helpers.rows_logged_lost(r.stderr)
      assert.are.equal(800, kept + lost, r.stderr)
      assert.is_true(kept > 0 and lost > 0, r.stderr)
      local _, full = r.stderr:gsub('"journal_error":"cannot write to the journal: No space left on device"', "")
      assert.are.equal(lost, full)
      -- (before: a file a refused write, each empty, and the first ended in half a line)
      assert.are.equal(1, #files())
      local text = helpers.slurp(folder .. "/" .. files()[1])
      assert.matches("\n$", text)
      local _, lines = text:gsub("\n", "")
      assert.are.equal(kept, lines)
      assert.are.same({ kept, ("%.6f"):format(kept * 0.01) }, { ledger(folder, db, kept) })
      assert.are.same({}, files())
    end)
end)

describe("the ledger's journal, in a process that goes on", function()
  local journal_dir
  before_each(function()
    resil.clock.virtual()
    journal_dir = helpers.tmpname("-journal")
  end)
  after_each(function() resil.store_config({ journal = false }) end)

  -- Until cond() holds: the virtual clock moved on `step` seconds at a time (the retry's minute, the
  -- journal's pauses), and some real time let pass for what the virtual clock does not move: another
  -- process letting go of SQLite's lock, Redis's reconnection. -> whether it held
  local function until_true(cond, step)
    for _ = 1, 300 do
      if cond() then return true end
      resil.sleep(step)
      os.execute("sleep 0.02")
    end
    return cond()
  end
  local function kept() return helpers.run("ls " .. journal_dir).stdout:match("%.jsonl") ~= nil end
  local function ledger_has(provider, usd)
    local by = resil.cost.breakdown("provider")
    return by ~= nil and by[1] ~= nil and by[1].key == provider and by[1].calls == 1 and by[1].usd == usd
      and not kept()
  end

  it("keeps a row the Redis store refused for longer than the minute, and writes it when Redis is back", function()
    local url = fresh_url()
    resil.store_config({ url = url .. "?timeout=0.1&down=0.05&down_max=0.1", journal = journal_dir })
    assert(resil.store():set("warm", "1"))
    stop_redis()
    assert(resil.cost.record({ provider = "long", model = "m", usd = 0.5, id = "long-1", wait = false }))
    -- (before: "a cost row could not be written; its cost is not in the ledger", after the minute)
    assert.is_true(until_true(kept, 5))
    start_redis()
    assert.is_true(until_true(function() return ledger_has("long", 0.5) end, 5))
  end)

  it("makes its file again when it is removed while the process holds it, and writes every row kept", function()
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db .. "?timeout=0.05", journal = journal_dir })
    assert(resil.store():set("made", "1"))
    local release = helpers.hold_write_lock(db)
    local held = true
    finally(function() if held then helpers.release_write_lock(release) end end)
    assert(resil.cost.record({ provider = "removed", model = "m", usd = 0.25, id = "removed-1", wait = false }))
    assert.is_true(until_true(kept, 5))
    -- (a cleaner of old files, or a hand; before: this row and every one after went with it)
    os.execute("rm -f " .. journal_dir .. "/*.jsonl")
    assert(resil.cost.record({ provider = "removed", model = "m", usd = 0.5, id = "removed-2", wait = false }))
    assert.is_true(until_true(function()
      return helpers.run("cat " .. journal_dir .. "/*.jsonl").stdout:find("removed-2", 1, true) ~= nil
    end, 5))
    helpers.release_write_lock(release)
    held = false
    assert.is_true(until_true(function()
      local by = resil.cost.breakdown("provider")
      return by ~= nil and by[1] ~= nil and by[1].calls == 2 and by[1].usd == 0.75 and not kept()
    end, 5))
  end)

  it("goes on in a new file past a file's size, every file small enough to be replayed whole", function()
    local journal = require "resil.journal"
    local size = journal.file_bytes
    journal.file_bytes = 2000 -- (64 MB: an hour's outage under a busy gateway kept 300 MB in one file,
    finally(function() journal.file_bytes = size end) -- which no replay would read)
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db .. "?timeout=0.05", journal = journal_dir })
    assert(resil.store():set("made", "1"))
    local release = helpers.hold_write_lock(db)
    local held = true
    finally(function() if held then helpers.release_write_lock(release) end end)
    for i = 1, 40 do
      assert(resil.cost.record({ provider = "big", model = "m", usd = 0.25, id = "big-" .. i, wait = false }))
    end
    assert.is_true(until_true(function()
      return select(2, helpers.run("cat " .. journal_dir .. "/*.jsonl").stdout:gsub("\n", "")) == 40
    end, 5))
    local sizes = helpers.run("stat -c %s " .. journal_dir .. "/*.jsonl").stdout
    local files = 0
    for bytes in sizes:gmatch("%d+") do
      files = files + 1
      assert.is_true(tonumber(bytes) < 2000 + 400, sizes)
    end
    assert.is_true(files > 1, sizes)
    helpers.release_write_lock(release)
    held = false
    assert.is_true(until_true(function()
      local by = resil.cost.breakdown("provider")
      return by ~= nil and by[1] ~= nil and by[1].calls == 40 and by[1].usd == 10 and not kept()
    end, 5))
  end)

  it("keeps a row the SQLite store refused for longer than the minute (its lock held), and writes it after",
    function()
      local db = helpers.tmpname(".db")
      resil.store_config({ url = db .. "?timeout=0.05", journal = journal_dir })
      assert(resil.store():set("made", "1"))
      local release = helpers.hold_write_lock(db)
      local held = true
      finally(function() if held then helpers.release_write_lock(release) end end)
      -- (as policies.ai records a paid call: refused at once, and tried again; a row written without
      -- waiting would wait its minute for the lock in SQLite's queue first, in real time)
      local ok, err = resil.cost.record({ provider = "locked", model = "m", usd = 0.25, retry = true })
      assert.is_nil(ok)
      assert.is_true(err.retrying)
      assert.is_true(until_true(kept, 5))
      helpers.release_write_lock(release)
      held = false
      assert.is_true(until_true(function() return ledger_has("locked", 0.25) end, 5))
    end)
end)
