-- --max-task-seconds and the host's calls between resumes (a server handler without tasks, a
-- reload): each is timed from its own start, as a resume is. Real processes; one that hangs is
-- killed after a bound.
local helpers = require "spec.helpers"
local resil = require "resil"

describe("--max-task-seconds and host calls in one pass of the event base", function()
  -- (before: the loop's turn was timed as one piece, and libevent runs every request that came
  -- together in one pass: 40 handlers of 40 ms, each a tenth of the limit, added up to 1.6 s, and
  -- the one running at 0.5 s was stopped with "server handler ran 0.5 s without yielding", its
  -- client answered 500)
  it("does not stop a short handler of a server without tasks for the handlers that ran before it " ..
     "in the same turn", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local server = resil.server.listen({ port = 0, handler = function(req)
  local t = os.clock()
  while os.clock() - t < 0.04 do end -- 40 ms of CPU: a tenth of the limit
  return { status = 200, body = "ok" }
end })
local url = ("http://127.0.0.1:%d/"):format(server:port())
local statuses = {}
for _ = 1, 4 do
  local tasks = {}
  for i = 1, 40 do
    tasks[i] = resil.spawn(function()
      local res, err = resil.http.request({ url = url, timeout = 60 })
      return res and tostring(res.status) or tostring(err)
    end)
  end
  for i = 1, 40 do
    local _, status = tasks[i]:join()
    statuses[status] = (statuses[status] or 0) + 1
  end
end
for status, n in pairs(statuses) do print(status, n) end
server:close()
]])
    local r = helpers.run("timeout -s KILL 120 " .. helpers.resil .. " --max-task-seconds 0.5 " .. script)
    os.remove(script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("200\t160\n", r.stdout, r.stderr)
    assert.are.equal("", r.stderr)
  end)

  -- (the stop itself, for a handler that loops, stays: watchdog_turns_spec)
end)
