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
