-- The watchdog (--max-task-seconds) times the loop's turns, not only the resumes: Lua that the
-- host runs outside every task (a server handler without tasks, a __gc finalizer that a
-- collection step in a C callback runs) looped there unseen, the process held for good. Real
-- processes; one that hangs is killed after a bound.
local helpers = require "spec.helpers"
local resil = require "resil"

describe("--max-task-seconds between resumes", function()
  -- (before: a finalizer runs with hooks off, and the step that ran it came from the server's
  -- C callback pushing a request, outside every resume: the process hung with no line)
  it("a __gc that loops in a collection step of the host's C code ends the process with code 70 and a line",
    function()
      local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
collectgarbage("incremental", 100, 400) -- (the host's full collection then never runs: only the steps)
local mt = {}
mt.__gc = function()
  if resil.running() then setmetatable({}, mt) return end -- in a task's resume: armed again
  while true do end
end
local server = resil.server.listen({ port = 0, tasks = true, handler = function(req)
  return { status = 200, body = "ok" }
end })
resil.spawn(function() setmetatable({}, mt) end)
local url = ("http://127.0.0.1:%d/"):format(server:port())
for _ = 1, 20000 do resil.http.request({ url = url, body = ("x"):rep(2000) }) end
print("went on")
]])
      local r = helpers.run("timeout -s KILL 90 " .. helpers.resil .. " --max-task-seconds 0.3 " .. script)
      os.remove(script)
      assert.are.equal(70, r.code, r.stdout .. r.stderr)
      assert.are.equal("", r.stdout)
      local line = r.stderr:match('[^\n]*"level":"error"[^\n]*')
      assert.is_truthy(line, r.stderr)
      local entry = resil.json.decode(line)
      -- (named by the host call it ran in: the server's start of the handler's task; elsewhere the
      -- loop outside every task)
      local what = entry.msg:match("^(.-) ran %d+%.%d s without yielding and did not stop at " ..
        "%-%-max%-task%-seconds=0%.3: it is stuck outside Lua code")
      assert.is_truthy(what, entry.msg)
      assert.is_truthy(what == "server handler" or what:match("^the loop outside every task"), what)
      assert.are.equal(70, entry.exit_code)
    end)

  -- (before: a redis connection's on_state runs on the loop outside every task, in a plain pcall
  -- (no host call: nothing can stop it there); one that looped hung the process with no line)
  it("a Lua callback the host runs outside every task that loops (a redis on_state) ends the process with " ..
     "code 70 and a line", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local s = resil.server.listen({ handler = function() end })
local port = s:port() -- (closed: the connection goes down)
s:close()
local c = resil.redis.connect({ host = "127.0.0.1", port = port, on_state = function(down)
  if down then while true do end end
end })
pcall(c.call, c, "PING")
for _ = 1, 300 do resil.sleep(0.01) end
print("went on")
]])
    local r = helpers.run("timeout -s KILL 90 " .. helpers.resil .. " --max-task-seconds 0.3 " .. script)
    os.remove(script)
    assert.are.equal(70, r.code, r.stdout .. r.stderr)
    assert.are.equal("", r.stdout)
    local line = r.stderr:match('[^\n]*"level":"error"[^\n]*')
    assert.is_truthy(line, r.stderr)
    local entry = resil.json.decode(line)
    assert.matches("^the loop outside every task %(a Lua callback the host runs there, such as a redis store's " ..
      "on_state, a __gc finalizer that a collection step in a C callback ran, or a C function%) ran %d+%.%d s " ..
      "without yielding and did not stop at %-%-max%-task%-seconds=0%.3: it is stuck outside Lua code", entry.msg)
    assert.are.equal(70, entry.exit_code)
  end)

  -- (before: resil_close stopped the watchdog before lua_close ran the finalizers left: a __gc that
  -- looped there held the process at its exit for good, a stopping gateway worker never ending; then
  -- it ended the process with code 70, the finalizers after it never run, an embedder held for good)
  it("a __gc that loops as the host closes at exit is stopped at its line, said, and the others run", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
later = setmetatable({}, { __gc = function() io.stdout:write("the finalizer made before ran\n") end })
kept = setmetatable({}, { __gc = function() while true do end end })
print("done")
]])
    local r = helpers.run("timeout -s KILL 90 " .. helpers.resil .. " --max-task-seconds 0.3 " .. script)
    os.remove(script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("done\nthe finalizer made before ran\n", r.stdout)
    local line = r.stderr:match('[^\n]*"level":"error"[^\n]*')
    assert.is_truthy(line, r.stderr)
    local entry = resil.json.decode(line)
    assert.are.equal("a __gc finalizer raised an error; what it had left to do was not done", entry.msg)
    assert.matches(":2: the host's close: a __gc finalizer ran %d+%.%d s without yielding " ..
      "%(%-%-max%-task%-seconds=0%.3%)$", entry.error)
  end)

  -- (before: a handler of a server without tasks runs in a host call outside every resume, and
  -- only --max-instructions stopped it: the process held its loop for good, no line)
  it("stops a server handler without tasks that loops, at its line; its request gets a 500, the server " ..
     "serves on", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local n = 0
local server = resil.server.listen({ port = 0, handler = function(req)
  n = n + 1
  if n == 1 then while true do end end
  if n == 2 then pcall(function() while true do end end); while true do end end
  return { status = 200, body = "ok" }
end })
local url = ("http://127.0.0.1:%d/"):format(server:port())
for _ = 1, 3 do
  local res = resil.http.request({ url = url, timeout = 60 })
  print(res.status)
end
server:close()
]])
    local r = helpers.run("timeout -s KILL 60 " .. helpers.resil .. " --max-task-seconds 0.3 " .. script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("500\n500\n200\n", r.stdout)
    local errors = {}
    for line in r.stderr:gmatch('[^\n]*"level":"error"[^\n]*') do
      local entry = resil.json.decode(line)
      assert.are.equal("server handler failed; answered 500", entry.msg)
      errors[#errors + 1] = entry.error
    end
    assert.are.equal(2, #errors, r.stderr)
    -- (the pcall that swallowed the first raise is cut: raised again until the host call returns)
    for i, at in ipairs({ 5, 6 }) do
      assert.matches("^[^\n]-%.lua:" .. at .. ": server handler ran %d+%.%d s without yielding " ..
        "%(%-%-max%-task%-seconds=0%.3%)", errors[i])
    end
    os.remove(script)
  end)
end)

describe("--max-task-seconds and the coroutines a stopped task resumes", function()
  -- (before: once stopped, the task's hooks came at the stop watch's pace, each thread counting
  -- its own instructions; a task that went on resuming a fresh coroutine each time round its loop,
  -- each shorter than the pace, was never cut, and the process ended with code 70 as if stuck
  -- outside Lua)
  -- (and then: it ended "canceled: task N was canceled", the stop's file:line and the watchdog's word lost)
  it("ends a task that, stopped, loops on resuming fresh coroutines, with the stop's error; the process goes on", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local function deep(n) if n == 0 then return {} end return deep(n - 1) end
print(resil.spawn(function()
  while true do coroutine.resume(coroutine.create(function() for _ = 1, 1000 do deep(10) end end)) end
end):join())
print(resil.spawn(function()
  while true do pcall(coroutine.wrap(function() for _ = 1, 1000 do deep(10) end end)) end
end):join())
print("went on")
]])
    local r = helpers.run("timeout -s KILL 90 " .. helpers.resil .. " --max-task-seconds 0.2 " .. script)
    os.remove(script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local stop = "[^\n]-%.lua:%d+: task %d+ %([^\n]-%.lua:%d+%) ran %d+%.%d s without yielding %(%-%-max%-task%-seconds=0%.2%)"
    assert.matches("^false\t" .. stop .. "\nfalse\t" .. stop .. "\nwent on\n$", r.stdout)
  end)
end)
