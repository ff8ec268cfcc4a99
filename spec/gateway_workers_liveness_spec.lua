-- `gateway --workers N`: a worker whose loop stands still. One frozen by
-- SIGSTOP, or blocked in a C call (the watchdog counts CPU time and sees
-- none), still holds its SO_REUSEPORT socket: the kernel goes on queueing
-- about half the new connections on it, and they waited for good, the
-- supervisor seeing nothing wrong. Each worker's loop now says it lives over
-- its pipe to the supervisor, which kills one silent past --worker-timeout
-- (SIGKILL, a line saying so) and starts another. Real processes, curl on a
-- new connection each time (the kernel spreads them over the workers).
local helpers = require "spec.helpers"

-- `resil-lua gateway --workers 2 [extra]` -> pid of the supervisor, port, log
local function start(extra, config)
  local port = helpers.free_port()
  local pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".out")
  config = helpers.write(helpers.tmpname(".lua"), config or "return { auth = false }")
  os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s %s > %s 2>&1 & echo $! > %s")
    :format(helpers.resil, port, config, helpers.tmpname(".db"), extra or "", log, pidfile))
  local pid, seen = helpers.slurp(pidfile):match("%d+"), {}
  finally(function()
    for _, p in ipairs(seen) do os.execute("kill -CONT " .. p .. " 2>/dev/null") end
    for _, p in ipairs({ pid, table.unpack(seen) }) do
      if helpers.alive(p) then os.execute("kill -KILL " .. p) end
    end
  end)
  assert.is_true(helpers.wait_until(function()
    return select(2, helpers.slurp(log):gsub("gateway listening", "")) >= 2
  end, 20), helpers.slurp(log))
  for _, w in ipairs(helpers.workers_of(pid)) do seen[#seen + 1] = w end
  return pid, port, log, seen
end

-- n GET /health, each on a new connection -> how many were answered 200 within 3 s
local function health(port, n)
  local r = helpers.run(("for i in $(seq %d); do curl -s -o /dev/null -w '%%{http_code}\\n' --max-time 3 " ..
    "http://127.0.0.1:%d/health; done"):format(n, port))
  return select(2, r.stdout:gsub("200\n", ""))
end

local function listening(log) return select(2, helpers.slurp(log):gsub("gateway listening", "")) end

describe("gateway --workers: a worker whose loop stands still", function()
  it("frozen by SIGSTOP: killed past --worker-timeout, with a line, and replaced; every new connection is " ..
     "answered", function()
    local pid, port, log, seen = start("--worker-timeout 1")
    local frozen = seen[1]
    os.execute("kill -STOP " .. frozen)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(frozen) and listening(log) >= 3 end, 20),
      helpers.slurp(log))
    local out = helpers.slurp(log)
    assert.matches("worker " .. frozen .. " said nothing for [%d.]+ s %(%-%-worker%-timeout=1: stopped, or stuck", out)
    assert.matches("worker " .. frozen .. " killed by signal 9; starting another", out, 1, true)
    assert.are.equal(8, health(port, 8)) -- (before: about half waited in the frozen one's queue)
    assert.is_true(helpers.alive(pid))
    assert.are.equal(2, #helpers.workers_of(pid))
  end)

  it("frozen by SIGSTOP when the gateway is told to stop: killed past --worker-timeout, the stop ends", function()
    -- (before: a frozen worker never said it drains, and the supervisor waited for it for good:
    -- systemd's or a deploy's SIGTERM hung until its own SIGKILL of the whole group)
    local pid, _, log, seen = start("--worker-timeout 1")
    local frozen, other = seen[1], seen[2]
    os.execute("kill -STOP " .. frozen)
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 20), helpers.slurp(log))
    local out = helpers.slurp(log)
    assert.matches("worker " .. frozen .. " said nothing for [%d.]+ s %(%-%-worker%-timeout=1: stopped, or stuck", out)
    assert.matches("worker " .. frozen .. " killed by signal 9 as the gateway stopped", out, 1, true)
    assert.is_nil(out:match("worker " .. other .. " said nothing"), out) -- (the live one drained, not judged)
    assert.is_nil(out:match("starting another"), out)
    assert.is_false(helpers.alive(frozen))
    assert.is_false(helpers.alive(other))
  end)

  it("the host's own long work that holds the loop (a store's migration: unwatched) is not silence", function()
    -- os.execute("sleep") under unwatched stands for a migration on a large ledger: the loop
    -- makes no turn for 3 s, the worker is busy, not stuck (killed, its replacement would
    -- run the same migration again, without end)
    local marker = helpers.tmpname(".done")
    local pid, port, log = start("--worker-timeout 1", ([[
      local resil = require "resil"
      resil.spawn(function()
        resil.sleep(0.5)
        require("resil.core.watchdog").unwatched(function() os.execute("sleep 3") end)
        io.open(%q .. "." .. io.open("/proc/self/stat"):read("n"), "w"):close() -- (one file a worker)
      end)
      return { auth = false }
    ]]):format(marker))
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.run("ls " .. marker .. ".* 2>/dev/null").stdout:gsub("\n", "")) >= 2
    end, 20), helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):match("said nothing"), helpers.slurp(log))
    assert.are.equal(2, listening(log))
    assert.are.equal(4, health(port, 4))
    assert.is_true(helpers.alive(pid))
  end)

  it("the host's own long work is not silence with the watchdog off (--max-task-seconds 0) either", function()
    -- (the heartbeat during unwatched work came from the watchdog's thread, which runs only with a
    -- task cap: without one the worker was killed mid-migration, and its replacement ran it again)
    local marker = helpers.tmpname(".done")
    local pid, port, log = start("--worker-timeout 1 --max-task-seconds 0", ([[
      local resil = require "resil"
      resil.spawn(function()
        resil.sleep(0.5)
        require("resil.core.watchdog").unwatched(function() os.execute("sleep 3") end)
        io.open(%q .. "." .. io.open("/proc/self/stat"):read("n"), "w"):close() -- (one file a worker)
      end)
      return { auth = false }
    ]]):format(marker))
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.run("ls " .. marker .. ".* 2>/dev/null").stdout:gsub("\n", "")) >= 2
    end, 20), helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):match("said nothing"), helpers.slurp(log))
    assert.are.equal(2, listening(log))
    assert.are.equal(4, health(port, 4))
    assert.is_true(helpers.alive(pid))
  end)

  -- (before: the supervisor judged a worker's silence in wall time, the watchdog a stuck loop in
  -- CPU time: on a busy machine, or under a container's CPU quota, a worker stuck in a pattern got
  -- a fifth of a core, was killed as silent at --worker-timeout ("said nothing for 30.8 s ...
  -- SIGKILL"), and the log never said where it was stuck. Here its CPU is halved by stopping and
  -- continuing it.)
  it("a worker stuck outside Lua code that gets half a core ends with the watchdog's code 70, not killed as " ..
     "silent", function()
    -- (--worker-timeout 12: past the watchdog's stuck exit, 10.3 s of CPU, which half a core uses in 20 s)
    local pid, port, log, seen = start("--worker-timeout 12 --max-task-seconds 0.3", [[
      local gateway = require "policies.gateway"
      local handle = gateway.handle
      gateway.handle = function(req)
        if req.path == "/stuck" then return (("a"):rep(200)):find(("a-"):rep(40) .. "c") end
        return handle(req)
      end
      return { auth = false }
    ]])
    local all = table.concat(seen, " ")
    local throttle = helpers.write(helpers.tmpname(".sh"),
      ("while kill -STOP %s 2>/dev/null; do sleep 0.2; kill -CONT %s; sleep 0.2; done; kill -CONT %s 2>/dev/null")
        :format(all, all, all))
    os.execute(("timeout 200 sh %s >/dev/null 2>&1 &"):format(throttle))
    finally(function() os.execute("kill -CONT " .. all .. " 2>/dev/null") end)
    os.execute(("curl -s -o /dev/null --max-time 200 http://127.0.0.1:%d/stuck"):format(port))
    local ended
    assert.is_true(helpers.wait_until(function()
      local text = helpers.slurp(log)
      ended = text:match("worker %d+ exited with code 70; starting another") or text:match("said nothing for [^\n]*")
      return ended ~= nil
    end, 200), helpers.slurp(log))
    assert.matches("exited with code 70", ended)
    assert.matches("it is stuck outside Lua code", helpers.slurp(log), 1, true)
    assert.is_true(helpers.alive(pid))
  end)

  it("a worker that drains (SIGTERM) is not killed for its silence; the stop ends as usual", function()
    -- a request in flight keeps the drain going; each worker has said it drains (its handler's
    -- word, before the "stopping" line) when both are stopped: the stores' last writes, say
    local arrived = helpers.tmpname(".arrived")
    local pid, port, log, seen = start("--worker-timeout 1", ([[
      local resil = require "resil"
      local gateway = require "policies.gateway"
      local handle = gateway.handle
      gateway.handle = function(req)
        if req.path == "/slow" then
          io.open(%q, "w"):close()
          resil.sleep(4)
          return { status = 200, body = "slow" }
        end
        return handle(req)
      end
      return { auth = false }
    ]]):format(arrived))
    os.execute(("curl -s -o /dev/null --max-time 30 http://127.0.0.1:%d/slow &"):format(port))
    assert.is_true(helpers.wait_until(function() return io.open(arrived) ~= nil end, 10))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function()
      return helpers.slurp(log):match("finishing the requests in flight") ~= nil
    end, 10), helpers.slurp(log))
    local all = table.concat(seen, " ")
    os.execute(("kill -STOP %s 2>/dev/null"):format(all))
    -- the supervisor waits for them, longer than its --worker-timeout
    assert.is_false(helpers.wait_until(function() return not helpers.alive(pid) end, 3), helpers.slurp(log))
    os.execute(("kill -CONT %s 2>/dev/null"):format(all))
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 20), helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):match("said nothing"), helpers.slurp(log))
  end)

  it("--worker-timeout is checked: a bad value is refused before anything starts", function()
    local r = helpers.run(helpers.resil .. " gateway --workers 2 --worker-timeout soon")
    assert.are.equal(1, r.code)
    assert.matches("--worker-timeout: bad number of seconds 'soon'", r.stderr, 1, true)
  end)
end)
