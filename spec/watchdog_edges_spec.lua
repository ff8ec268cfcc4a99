-- The watchdog (--max-task-seconds) at its two edges: a task's long SQLite statement, and the
-- stuck process's last line to a stderr nobody reads.
local helpers = require "spec.helpers"

-- a real SQLite file with a table of 2,000 rows: a three-way join of it is 8e9 rows (hours)
local function make_db()
  local path = helpers.tmpname(".db")
  local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local db = assert(resil.sqlite.open(arg[1]))
db:now(function(tx)
  tx:exec("CREATE TABLE t (x INTEGER)")
  tx:exec("CREATE TABLE w (x INTEGER)")
  tx:exec("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO t SELECT i FROM n")
end)
]])
  local r = helpers.run(helpers.resil .. " " .. script .. " " .. path)
  assert.are.equal(0, r.code, r.stderr)
  return path
end

describe("--max-task-seconds and a task's SQLite statement", function()
  -- (before: the watchdog's stop is a hook, which never runs inside SQLite: the query ran on
  -- past the stop, for hours, until the stuck exit ended the process with code 70 after
  -- another max(S, 10) s; a gateway worker so ended dropped every request it held)
  it("interrupts a long query or write with the stop's error at its line; the process serves on, the " ..
     "transaction rolled back, other tasks' writes kept, the connection usable", function()
    local path = make_db()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local db = assert(resil.sqlite.open(arg[1]))
local JOIN = "FROM t a, t b, t c"
-- another task's writes, committed by the group commit around the stopped ones
local writer = resil.spawn(function()
  for i = 1, 20 do assert(db:tx(function(tx) return tx:exec("INSERT INTO w VALUES (?)", 1000 + i) end)) end
end)
local server = resil.server.listen({ port = 0, tasks = true, handler = function(req)
  if req.path == "/report" then
    local ok, err = pcall(db.read, db, function(tx) return tx:value("SELECT count(*) " .. JOIN) end)
    print("read", ok, err)
    error(err, 0)
  end
  return { status = 200, body = "up" }
end })
local url = ("http://127.0.0.1:%d"):format(server:port())
local res = resil.http.request({ url = url .. "/report", timeout = 60 })
print("report", res and res.status)
res = resil.http.request({ url = url .. "/", timeout = 60 })
print("served", res and res.status)
server:close()
-- a write: its whole transaction rolled back
print("write", pcall(db.now, db, function(tx)
  tx:exec("INSERT INTO w VALUES (1)")
  return tx:exec("INSERT INTO w SELECT a.x " .. JOIN)
end))
-- a write whose failure the function catches: nothing after it runs outside the transaction
-- (before: SQLite had rolled the transaction back, the next INSERT committed on its own, and
-- db:now answered "commit failed": row 2 was kept by a write reported as failed)
print("caught", resil.spawn(function()
  return db:now(function(tx)
    local ok = pcall(tx.exec, tx, "INSERT INTO w SELECT a.x " .. JOIN)
    tx:exec("INSERT INTO w VALUES (2)")
    return "went on", ok
  end)
end):join())
writer:join()
print("rows", db:read(function(tx) return tx:value("SELECT count(*) FROM w WHERE x > 1000"),
                                          tx:value("SELECT count(*) FROM w WHERE x <= 1000") end))
print("usable", db:now(function(tx) tx:exec("INSERT INTO w VALUES (3)"); return tx:value("SELECT count(*) FROM w") end))
]])
    local r = helpers.run("timeout -s KILL 120 " .. helpers.resil .. " --max-task-seconds 0.3 --log-level off " ..
      script .. " " .. path)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local stop = "task %d+ %([^)]*%) ran [%d.]+ s without yielding %(%-%-max%-task%-seconds=0%.3%); " ..
      "its SQLite statement was interrupted"
    assert.matches("\nread\tfalse\t[^\n]*%.lua:10: " .. stop .. "\n", "\n" .. r.stdout)
    assert.matches("\nreport\t500\nserved\t200\n", r.stdout)
    assert.matches("\nwrite\tfalse\t[^\n]*%.lua:25: " .. stop .. "\n", r.stdout)
    assert.matches("\ncaught\tfalse\t[^\n]*%.lua:33: store [^\n]*: the transaction was rolled back", r.stdout)
    assert.matches("\nrows\t20\t0\nusable\t21\n$", r.stdout)
  end)
end)

describe("--max-task-seconds and the group commit's functions", function()
  -- (before: a db:tx, db:commit_only or db:enqueue function runs in the store's group commit, on
  -- the loop outside any task, and the watchdog never timed it: one that looped, or ran a long
  -- query, held the loop for good, no error and no exit)
  it("stops a function that loops or reads long with the stop's error naming it; its own writes " ..
     "rolled back, the same batch's other writes and queued rows committed, the connection usable", function()
    local path = make_db()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local db = assert(resil.sqlite.open(arg[1]))
local function add(x) return function(tx) return tx:exec("INSERT INTO w VALUES (?)", x) end end
-- one batch: a queued row and two other tasks' writes around the stopped function
local function batch(name, stopped)
  local done, commits = {}, db:stats().commits
  db:enqueue(function(err, n) done[#done + 1] = tostring(err or n) end, add(100))
  local tasks = {
    resil.spawn(function() return db:tx(add(1)) end),
    resil.spawn(function() return db:tx(stopped) end),
    resil.spawn(function() return db:commit_only(add(2)) end),
  }
  local got = {}
  for i, t in ipairs(tasks) do got[i] = table.concat({ tostring(select(2, t:join())) }, " ") end
  print(name, got[1], got[2], got[3], table.concat(done, ","), db:stats().commits - commits)
end
batch("loop", function(tx)
  tx:exec("INSERT INTO w VALUES (-1)")
  while true do end
end)
batch("pcall", function(tx) -- a pcall that swallows the stop is cut too
  tx:exec("INSERT INTO w VALUES (-1)")
  while true do pcall(function() while true do end end) end
end)
batch("read", function(tx)
  tx:exec("INSERT INTO w VALUES (-1)")
  return tx:value("SELECT count(*) FROM t a, t b, t c")
end)
batch("coroutine", function(tx)
  tx:exec("INSERT INTO w VALUES (-1)")
  return coroutine.wrap(function() while true do end end)()
end)
-- a queued function nobody waits for: its done gets the error
local got
db:enqueue(function(err) got = err end, function(tx) tx:exec("INSERT INTO w VALUES (-1)"); while true do end end)
print("next", resil.spawn(function() return db:tx(add(3)) end):join())
print("enqueue", got)
-- a done callback that loops (it runs on the loop after the commit, outside any task too)
db:enqueue(function() while true do end end, add(5))
print("after done", resil.spawn(function() return db:tx(add(6)) end):join())
print("rows", db:read(function(tx) return tx:value("SELECT count(*) FROM w WHERE x < 0"),
                                          tx:value("SELECT count(*) FROM w WHERE x > 0") end))
print("usable", db:now(function(tx) tx:exec("INSERT INTO w VALUES (4)"); return tx:value("SELECT count(*) FROM w") end))
]])
    local r = helpers.run("timeout -s KILL 120 " .. helpers.resil .. " --max-task-seconds 0.3 " .. script .. " " .. path)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local function stop(line, defined, kind)
      return ("%%.lua:%d: a %s %%([^)]*%%.lua:%d%%) ran [%%d.]+ s without yielding " ..
        "%%(%%-%%-max%%-task%%-seconds=0%%.3%%)"):format(line, kind or "db:tx function", defined)
    end
    assert.matches("\nloop\t1\t[^\t]*" .. stop(19, 17) .. "\t1\t1\t1\n", "\n" .. r.stdout)
    assert.matches("\npcall\t1\t[^\t]*" .. stop(23, 21) .. "\t1\t1\t1\n", r.stdout)
    assert.matches("\nread\t1\t[^\t]*" .. stop(27, 25) .. "; its SQLite statement was interrupted\t1\t1\t1\n",
      r.stdout)
    assert.matches("\ncoroutine\t1\t[^\t]*" .. stop(31, 29) .. "\t1\t1\t1\n", r.stdout)
    assert.matches("\nnext\ttrue\t1\nenqueue\t[^\n]*" .. stop(35, 35, "db:enqueue function") .. "\n", r.stdout)
    assert.matches("\nafter done\ttrue\t1\n", r.stdout)
    assert.matches('"msg":"store: a write\'s done callback raised"[^\n]*' .. stop(39, 39, "db:enqueue done callback"),
      r.stderr)
    assert.matches("\nrows\t0\t15\nusable\t16\n$", r.stdout)
  end)
end)

describe("Ctrl-C and a task's SQLite statement", function()
  -- (before: SIGINT waited for the statement to end, for hours here)
  it("interrupts a long query; the process ends with the signal's message", function()
    local path = make_db()
    local pid, out = helpers.start([[
local resil = require "resil"
local db = assert(resil.sqlite.open(arg[1]))
print(resil.spawn(function()
  print("reading"); io.stdout:flush()
  return db:read(function(tx) return tx:value("SELECT count(*) FROM t a, t b, t c") end)
end):join())
]], "", path)
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("reading") ~= nil end, 30))
    os.execute("kill -INT " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30), "SIGINT did not stop it")
    assert.matches("^reading\n[^\n]*interrupted by signal 2\n$", helpers.slurp(out))
  end)

  -- (before: a db:tx function runs in the group commit, outside every task, and the first SIGINT
  -- never reached it: the process looped on until a second signal killed it)
  it("stops a db:tx function that loops, the first time; the process ends with the signal's message", function()
    -- (its task, woken with the op's error, is never resumed once the signal stops the loop: the
    -- op's 72 bytes are left at exit, which LeakSanitizer reports under `make check`; an exit-time
    -- leak, noted in docs/decisions.md, not what this checks)
    local saved = helpers.resil
    helpers.resil = "env ASAN_OPTIONS=detect_leaks=0 " .. saved
    local pid, out = helpers.start([[
local resil = require "resil"
local db = assert(resil.sqlite.open(arg[1]))
print("looping"); io.stdout:flush()
print(resil.spawn(function() return db:tx(function(tx) while true do end end) end):join())
]], "", helpers.tmpname(".db"))
    helpers.resil = saved
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("looping") ~= nil end, 30))
    require("resil").sleep(0.3) -- (in the loop by now, most likely: one before the batch is seen as it begins)
    os.execute("kill -INT " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30), "SIGINT did not stop it")
    assert.matches("^looping\n[^\n]*interrupted by signal 2\n$", helpers.slurp(out))
  end)
end)

describe("a process stuck outside Lua", function()
  -- (before: its last line was a plain write(2): with the pipe full, the process waited there
  -- for good, neither stuck loop nor exit ended; its supervisor never started another)
  it("ends with code 70 when its stderr is a pipe kept full that nobody reads", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print(resil.spawn(function() return (("a"):rep(200)):find(("a-"):rep(40) .. "c") end):join())
]])
    local dir = helpers.tmpname(".d")
    -- the pipe's only reader is the shell's fd 3, which never reads; `yes` keeps it full
    local sh = helpers.write(helpers.tmpname(".sh"), ([[
mkdir -p %s && mkfifo %s/f || exit 99
exec 3<>%s/f
yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx >&3 2>/dev/null &
filler=$!
(exec timeout -s KILL 90 %s --max-task-seconds 0.3 %s 2>&3 3>&-)
code=$?
kill $filler
echo "code=$code"
]]):format(dir, dir, dir, helpers.resil, script))
    local r = helpers.run("sh " .. sh)
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("code=70\n", r.stdout)
  end)
end)
