-- `gateway --workers N` told to stop twice: the first SIGTERM drains (the
-- requests in flight finish), the second stops at once. Two sent close
-- together to the supervisor were one: it passed on a single signal for
-- both (its count had moved by two when it looked), and a worker took a
-- second signal within a second of the first for the same stop told twice
-- (systemd signals the whole group), so the workers drained on, for up to
-- drain_timeout. Real processes: a mock provider that answers after a
-- minute, chats in flight, the signals sent by kill.
local helpers = require "spec.helpers"

-- the gateway (drain_timeout 120) before a mock that answers in 120 s, chats in flight on each
-- worker -> supervisor pid, log, its workers
local function start_busy()
  local mport, port = helpers.free_ports(2)
  local mpidfile, pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".pid"), helpers.tmpname(".out")
  local scenario = helpers.write(helpers.tmpname(".lua"), "return { latency = { min = 120, max = 120 } }")
  os.execute(("%s mock %s --port %d > /dev/null 2>&1 & echo $! > %s"):format(helpers.resil, scenario, mport, mpidfile))
  local mpid = helpers.slurp(mpidfile):match("%d+")
  local config = helpers.write(helpers.tmpname(".lua"), ([[
    require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
    return { auth = false, drain_timeout = 120 }
  ]]):format(mport))
  os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 & echo $! > %s")
    :format(helpers.resil, port, config, helpers.tmpname(".db"), log, pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  local workers = {}
  finally(function()
    for _, p in ipairs({ pid, mpid, table.unpack(workers) }) do
      if helpers.alive(p) then os.execute("kill -KILL " .. p) end
    end
  end)
  assert.is_true(helpers.wait_until(function()
    -- (the mock listens: its every answer takes two minutes, a connection refused is curl's 7)
    return helpers.run(("curl -s -o /dev/null -m 0.5 http://127.0.0.1:%d/health"):format(mport)).code ~= 7 and
      select(2, helpers.slurp(log):gsub("gateway listening", "")) >= 2
  end, 20), helpers.slurp(log))
  workers = helpers.workers_of(pid)
  -- (the kernel spreads new connections over both workers by a hash of each: each its own, not one shared
  -- call. Six left both workers' share to chance: all six went to one in about 3 % of runs, and the
  -- other worker, with nothing in flight, never said it drained; sixteen leave one in 30,000)
  for i = 1, 16 do
    local body = helpers.write(helpers.tmpname(".json"),
      ('{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi %d"}]}'):format(i))
    os.execute(("curl -s -o /dev/null --max-time 150 -H 'content-type: application/json' --data @%s " ..
      "http://127.0.0.1:%d/v1/chat/completions > /dev/null 2>&1 &"):format(body, port))
  end
  -- each worker has its chats in flight: the mock has them all
  assert.is_true(helpers.wait_until(function()
    local r = helpers.run(("curl -s http://127.0.0.1:%d/__mock/stats"):format(mport))
    return (tonumber(r.stdout:match('"total":(%d+)')) or 0) >= 16
  end, 20), helpers.slurp(log))
  return pid, log, workers
end

describe("gateway --workers: stop signals", function()
  it("the first drains, the second stops at once: the gateway ends with its chats still in flight", function()
    local pid, log, workers = start_busy()
    os.execute("kill -TERM " .. pid)
    -- the second as soon as the first has reached the workers: well within their second (two sent
    -- before the supervisor ran at all are one to the kernel, a signal that does not queue)
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.slurp(log):gsub("finishing the requests in flight", "")) == 2
    end, 10), helpers.slurp(log))
    os.execute("kill -TERM " .. pid)
    -- (before: both workers drained on until the mock answered, two minutes on)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30), helpers.slurp(log))
    for _, w in ipairs(workers) do assert.is_false(helpers.alive(w)) end
  end)

  it("a worker killed with -9 as it drains: said on stderr, not replaced; the other drains on, a second " ..
     "signal stops it", function()
    local pid, log, workers = start_busy()
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.slurp(log):gsub("finishing the requests in flight", "")) == 2
    end, 10), helpers.slurp(log))
    os.execute("kill -KILL " .. workers[1])
    assert.is_true(helpers.wait_until(function()
      return helpers.slurp(log):find("worker " .. workers[1] .. " killed by signal 9 as the gateway stopped", 1, true)
    end, 10), helpers.slurp(log))
    assert.are.same({ workers[2] }, helpers.workers_of(pid))
    assert.is_nil(helpers.slurp(log):match("starting another"), helpers.slurp(log))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30), helpers.slurp(log))
  end)

  it("the supervisor killed with -9 as the workers drain: they drain on (its death is no second signal)",
     function()
    local pid, log, workers = start_busy()
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.slurp(log):gsub("finishing the requests in flight", "")) == 2
    end, 10), helpers.slurp(log))
    -- (a second past the first signal: a repeat within it was taken for the same stop anyway)
    local resil = require "resil"
    resil.sleep(1.2)
    os.execute("kill -KILL " .. pid)
    -- (before: the signal its death sends them, PR_SET_PDEATHSIG, stopped them at once)
    assert.is_false(helpers.wait_until(function()
      return not helpers.alive(workers[1]) or not helpers.alive(workers[2])
    end, 3), helpers.slurp(log))
  end)

  it("one signal to the whole group (systemd's) still drains: the workers do not count it twice", function()
    local pid, log, workers = start_busy()
    -- the workers get it from the sender and again from the supervisor
    os.execute(("kill -TERM %s %s"):format(pid, table.concat(workers, " ")))
    assert.is_false(helpers.wait_until(function() return not helpers.alive(pid) end, 3), helpers.slurp(log))
    for _, w in ipairs(workers) do assert.is_true(helpers.alive(w), helpers.slurp(log)) end
    os.execute("kill -TERM " .. pid) -- (then a second one stops them at once)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30), helpers.slurp(log))
  end)
end)
