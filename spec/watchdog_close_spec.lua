-- The watchdog (--max-task-seconds) times a task's <close> handlers where they run: at its
-- cancel (by another task, or by the server when its client left) and as it fails. One that
-- looped there held the loop for good: the watchdog saw no resume (or the canceling task's,
-- whose thread it hooked), and neither the first nor the second SIGTERM stopped it.
local helpers = require "spec.helpers"

describe("--max-task-seconds and <close> handlers", function()
  it("stops a <close> handler that loops at a cancel, a failure, or a server client that left", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local function looping() return setmetatable({}, { __close = function() while true do end end }) end
local t = resil.spawn(function() local _ <close> = looping(); resil.sleep(60) end)
resil.sleep(0.01)
t:cancel()
print("canceled", t:join())
t = resil.spawn(function() local _ <close> = looping(); error("boom", 0) end)
print("failed", t:join())
local server = resil.server.listen({ port = 0, tasks = true, handler = function(req)
  if req.path == "/leave" then local _ <close> = looping(); resil.sleep(60) end
  return { status = 200, body = "up" }
end })
local url = ("http://127.0.0.1:%d"):format(server:port())
print(resil.http.request({ url = url .. "/leave", timeout = 0.2 }))
local res = resil.http.request({ url = url .. "/", timeout = 30 })
print("served", res and res.status)
server:close()
]])
    local r = helpers.run("timeout -s KILL 30 " .. helpers.resil .. " --max-task-seconds 0.3 --log-level off " .. script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("^canceled\tfalse\tcanceled: task %d+ was canceled\nfailed\tfalse\tboom\n", r.stdout)
    assert.matches("\nserved\t200\n$", r.stdout)
  end)

  it("logs a <close> handler that raised as its task ended, at its file:line, and nothing for a task's own error", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local t = resil.spawn(function()
  local _ <close> = setmetatable({}, { __close = function() error("the handler's own") end })
  error("the task's", 0)
end)
print(t:join())
print(resil.spawn(function() error("only the task's", 0) end):join())
]])
    local r = helpers.run(helpers.resil .. " " .. script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\tthe task's\nfalse\tonly the task's\n", r.stdout)
    local _, lines = r.stderr:gsub("<close> handler failed", "")
    assert.are.equal(1, lines, r.stderr)
    assert.matches('"error":"[^"]*%.lua:3: the handler\'s own"', r.stderr)
  end)

  -- A task that cancels others (each cancel runs their <close> handlers as a resume of
  -- their own) and never yields: the resume count moved at each cancel, and the watchdog,
  -- which times one resume, never saw the same one twice. It ran unstopped (3 s here,
  -- for ever in a real loop); before the cancels were timed, it was stopped at 0.3 s.
  it("still stops a task that loops canceling other tasks", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local t = resil.spawn(function()
  local t0 = os.clock()
  -- (a short sleep: the stop may land between a spawn and its cancel, and the process waits for that task)
  while os.clock() - t0 < 3 do resil.spawn(function() resil.sleep(1) end):cancel() end
  return "never stopped"
end)
print(t:join())
]])
    local r = helpers.run("timeout -s KILL 30 " .. helpers.resil .. " --max-task-seconds 0.3 --log-level off " .. script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("^false\t[^\n]*ran [%d.]+ s without yielding %(%-%-max%-task%-seconds=0.3%)\n$", r.stdout)
  end)
end)
