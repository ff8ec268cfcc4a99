-- `gateway --workers N`'s supervisor, as an operator meets it: a config that
-- fails only after a while (a store's or a service's connect timeout, a slow
-- load on a busy machine). Workers that die within a second of starting three
-- times in a row stop the gateway; one whose config took longer than a second
-- to fail never counted, and the supervisor started another at once, without
-- end: the gateway never served, never stopped, and printed a traceback per
-- worker every second and a half. Now a worker that dies before it listens
-- died as it started, however long its load took. Real processes, a real
-- sleep in the config (its time is the point; os.execute's: a config cannot wait on the loop).
local helpers = require "spec.helpers"

-- -> the supervisor's pid, the port, the file its exit code is written to when it ends
local function start(config, log)
  local port = helpers.free_port()
  local pidfile, codefile = helpers.tmpname(".pid"), helpers.tmpname(".code")
  local script = helpers.write(helpers.tmpname(".sh"), ([[
%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 &
echo $! > %s
wait $!
echo $? > %s
]]):format(helpers.resil, port, helpers.write(helpers.tmpname(".lua"), config), helpers.tmpname(".db"), log,
    pidfile, codefile))
  os.execute(("sh %s > /dev/null 2>&1 &"):format(script))
  assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+\n") ~= nil end, 10))
  local pid = helpers.slurp(pidfile):match("%d+")
  finally(function()
    -- (the workers' own children too: a config's `sleep` a reload runs, left by a worker killed with -9)
    local all = {}
    local function with_descendants(p)
      all[#all + 1] = p
      for _, c in ipairs(helpers.workers_of(p)) do with_descendants(c) end
    end
    with_descendants(pid)
    for _, p in ipairs(all) do
      if helpers.alive(p) then os.execute("kill -KILL " .. p) end
    end
  end)
  return pid, port, codefile
end

describe("gateway --workers: a config that fails after a while", function()
  it("stops the gateway as workers that die as they start do (exit 1, one line saying so), not restarted " ..
     "without end", function()
    local log = helpers.tmpname(".out")
    local pid, _, codefile = start([[
      os.execute("sleep 1.2") -- (a connect timeout, say: a config cannot wait on the loop, it runs at reloads too)
      error("the config could not reach its service")
    ]], log)
    -- three deaths of 1.2 s each, two at a time: before the fix it never ended
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30), helpers.slurp(log))
    local out = helpers.slurp(log)
    assert.matches("workers keep dying as they start; stopping", out, 1, true)
    local _, tracebacks = out:gsub("could not reach its service", "")
    assert.is_true(tracebacks >= 3 and tracebacks <= 4, out) -- (the third's, and one still loading)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(codefile) ~= "" end, 10))
    assert.are.equal("1", helpers.slurp(codefile):match("%d+"))
  end)

  it("a config that loads slowly and serves: a worker killed with -9 is started again, the gateway serves on",
     function()
    local log = helpers.tmpname(".out")
    local pid, port = start([[
      os.execute("sleep 1.2")
      return { auth = false }
    ]], log)
    local function listening() return select(2, helpers.slurp(log):gsub("gateway listening", "")) end
    assert.is_true(helpers.wait_until(function() return listening() >= 2 end, 20), helpers.slurp(log))
    for round = 1, 3 do
      local workers = helpers.workers_of(pid)
      os.execute("kill -KILL " .. workers[1])
      assert.is_true(helpers.wait_until(function() return listening() >= 2 + round end, 20), helpers.slurp(log))
    end
    assert.is_true(helpers.alive(pid), helpers.slurp(log))
    local r = helpers.run(("curl -s -o /dev/null -w '%%{http_code}' http://127.0.0.1:%d/health"):format(port))
    assert.are.equal("200", r.stdout)
    assert.is_nil(helpers.slurp(log):match("keep dying"))
  end)
  it("its stderr's reader gone (a log shipper that died): a worker killed with -9 is still started again, " ..
     "the gateway serves on", function()
    -- (SIGPIPE, at its default, killed the supervisor at its line about the dead worker, exit 141, and
    -- with it every worker: one crash took the whole gateway down)
    local port = helpers.free_port()
    local fifo, out, pidfile = helpers.tmpname(".fifo"), helpers.tmpname(".out"), helpers.tmpname(".pid")
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }")
    local script = helpers.write(helpers.tmpname(".sh"), ([[
mkfifo %s
%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2> %s &
echo $! > %s
exec 3< %s
while [ "$(grep -c 'gateway listening' %s)" -lt 2 ]; do sleep 0.1; done
exec 3<&-
]]):format(fifo, helpers.resil, port, config, helpers.tmpname(".db"), out, fifo, pidfile, fifo, out))
    assert.are.equal(0, helpers.run("timeout 30 sh " .. script).code)
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function()
      for _, p in ipairs({ pid, table.unpack(helpers.workers_of(pid)) }) do
        if helpers.alive(p) then os.execute("kill -KILL " .. p) end
      end
      os.remove(fifo)
    end)
    os.execute("kill -KILL " .. helpers.workers_of(pid)[1])
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.slurp(out):gsub("gateway listening", "")) >= 3 end, 20), helpers.slurp(out))
    assert.is_true(helpers.alive(pid))
    local r = helpers.run(("curl -s -o /dev/null -w '%%{http_code}' http://127.0.0.1:%d/health"):format(port))
    assert.are.equal("200", r.stdout)
  end)
end)
