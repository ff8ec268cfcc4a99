-- Ownership (src/lua/owner.lua): a run, a resil.once key and a budget hold
-- each have one holder, named by host, pid and process start; a holder that
-- died is taken over (on this machine at once, from another machine when its
-- heartbeat-renewed lease lapses). Real processes killed with SIGKILL, on
-- SQLite and on a real redis-server.
local resil = require "resil"
local helpers = require "spec.helpers"

local HOST = helpers.slurp("/proc/sys/kernel/hostname"):match("[^\n]+")
local function literal(s) return (s:gsub("%p", "%%%0")) end

local redis
setup(function() redis = helpers.redis_server() end)
teardown(function() if redis then redis.stop() end end)

-- a holder on another machine: its lease in the store decides
local function other_host(since)
  return ("otherhost|0123456789ab|4242|77|%.3f|zz"):format(since)
end

-- a background process that must not outlive its test, whatever the test's outcome
local function reap(pid) finally(function() os.execute("kill -KILL " .. pid .. " 2> /dev/null") end) end

-- n copies of a script started at the same wall-clock moment; each output
-- ends with "[exit N]"
local function together(n, source, opts, args)
  local go = ("%.3f"):format(resil.clock.wall() + 1) -- (an ASan start on a loaded machine)
  local prologue = "do local r = require 'resil'; while r.clock.wall() < " .. go .. " do r.sleep(0.002) end end "
  local script = helpers.write(helpers.tmpname(".lua"), prologue .. source)
  local outs = {}
  for i = 1, n do
    outs[i] = helpers.tmpname(".out")
    os.execute(("(%s %s %s %s; echo \"[exit $?]\") > %s 2>&1 &"):format(helpers.resil, opts, script, args or "",
      outs[i]))
  end
  for i = 1, n do
    assert(helpers.wait_until(function() return helpers.slurp(outs[i]):match("%[exit %d+%]") end, 60),
      "a process hung")
    outs[i] = helpers.slurp(outs[i])
  end
  return outs
end

local PIPELINE = [[
local resil = require "resil"
local log = assert(io.open(arg[1], "a"))
print("pid " .. io.open("/proc/self/stat"):read("l"):match("^%d+"))
for i = 1, 3 do
  resil.step("step " .. i, function()
    log:write("ran ", i, "\n"); log:flush()
    resil.sleep(tonumber(arg[2] or "0.1"))
    return i
  end)
end
print("finished", resil.run.resumed())
]]

for _, backend in ipairs({ "sqlite", "redis" }) do
  local function store_url() return backend == "sqlite" and helpers.tmpname(".db") or redis.url() end

  -- this process's lease as another host would read it from the store
  local function my_lease()
    local b = helpers.backend(resil.store())
    if backend == "sqlite" then
      return b.db:tx(function(tx) return tx:value("SELECT max(expires_at) FROM owners") end)
    end
    return tonumber(b.conn:call("ZRANGE", "resil:owners", -1, -1, "WITHSCORES")[2])
  end

  describe(("one owner per run (%s)"):format(backend), function()
    before_each(function() resil.clock.real() end)

    it("two copies at once: each step runs once; the other stops with an error naming the holder", function()
      local url, log = store_url(), helpers.tmpname(".log")
      local outs = together(2, PIPELINE, ("--store %s --run twice --log-level off"):format(url), log)
      local winner, loser = outs[1], outs[2]
      if not winner:match("finished") then winner, loser = loser, winner end
      assert.matches("finished\tfalse", winner)
      assert.matches("%[exit 0%]", winner)
      assert.matches("%[exit 1%]", loser)
      assert.matches(("resil%%-lua: run_held: run twice is held by pid %s on host %s since %%d+%%-%%d+%%-%%d+ " ..
        "%%d+:%%d+:%%d+ UTC %%(another process is running it; %%-%%-wait waits for it%%)"):format(
        winner:match("pid (%d+)"), literal(HOST)), loser)
      assert.is_nil(loser:match("traceback"), loser)
      assert.is_nil(loser:match("%[resil"), loser)
      assert.are.equal("ran 1\nran 2\nran 3\n", helpers.slurp(log))
      local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, url))
      assert.matches("twice%s+done%s+3", runs.stdout)
    end)

    it("a copy whose resil.map workers all meet the run held: none goes on past its step; said in one line", function()
      local url, log = store_url(), helpers.tmpname(".log")
      local opts = ("--store %s --run mapped --log-level off"):format(url)
      local pid = helpers.start(PIPELINE, opts, log .. " 3600")
      reap(pid)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("ran 1") end, 10))
      local r = helpers.run_script([[
local resil = require "resil"
resil.map({ 1, 2, 3, 4, 5, 6, 7, 8 }, function(i)
  local v = resil.step("item", function() return i end)
  print("went on past its step", i, v) -- (another process holds the run: it pays for what comes next)
end, { concurrency = 4 })
print("went on")
]], opts)
      assert.are.equal(1, r.code)
      assert.are.equal("", r.stdout)
      assert.matches("^resil%-lua: run_held: run mapped is held by pid " .. pid .. " [^\n]*\n$", r.stderr)
    end)

    it("with --wait, the second waits for the first and then resumes with nothing left to do", function()
      local url, log = store_url(), helpers.tmpname(".log")
      local outs = together(2, PIPELINE, ("--store %s --run waited --wait --log-level off"):format(url), log)
      table.sort(outs)
      for _, out in ipairs(outs) do assert.matches("%[exit 0%]", out) end
      local finished = outs[1]:match("finished\t(%a+)") .. " " .. outs[2]:match("finished\t(%a+)")
      assert.is_truthy(finished == "false true" or finished == "true false", finished)
      assert.are.equal("ran 1\nran 2\nran 3\n", helpers.slurp(log))
    end)

    it("a holder killed with SIGKILL is taken over at once; `runs` shows the holder, then that it is gone", function()
      local url, log = store_url(), helpers.tmpname(".log")
      local opts = ("--store %s --run killed --log-level off"):format(url)
      local pid = helpers.start(PIPELINE, opts, log .. " 3600")
      reap(pid)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("ran 1") end, 10))
      local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, url))
      assert.matches(("killed%%s+running%%s+0 .* pid %s on %s since [%%d%%- :]+\n"):format(pid, literal(HOST)),
        runs.stdout)
      os.execute("kill -KILL " .. pid)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      runs = helpers.run(("%s runs --store %s"):format(helpers.resil, url))
      assert.matches(("pid %s on %s since [%%d%%- :]+ %%(gone%%)"):format(pid, literal(HOST)), runs.stdout)
      local r = helpers.run_script(PIPELINE, opts, log .. " 0") -- no --wait: a live holder would refuse it
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("finished\tfalse", r.stdout)
      assert.are.equal("ran 1\nran 1\nran 2\nran 3\n", helpers.slurp(log))
      runs = helpers.run(("%s runs --store %s"):format(helpers.resil, url))
      assert.matches("killed%s+done%s+3%s", runs.stdout)
      assert.is_nil(runs.stdout:match("pid %d+"))
    end)

    -- two containers with the host's name and boot id (host networking): each reads the other's
    -- pids in its own pid namespace, where they are other processes or none
    local can_unshare = os.execute("unshare -p -f --mount-proc true > /dev/null 2>&1") == true
    local it_ns = can_unshare and it or pending
    it_ns("a holder in another pid namespace (same host name and boot) is not taken for dead", function()
      local url, log = store_url(), helpers.tmpname(".log")
      local opts = ("--store %s --run spaced --log-level off"):format(url)
      local saved = helpers.resil
      helpers.resil = "unshare -p -f --mount-proc --kill-child=KILL " .. saved
      local pid = helpers.start(PIPELINE, opts, log .. " 3600")
      helpers.resil = saved
      reap(pid)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("ran 1") end, 10))
      local r = helpers.run_script(PIPELINE, opts, log .. " 0")
      assert.are.equal(1, r.code, r.stdout)
      assert.matches("run_held: run spaced is held by pid 1 on host " .. literal(HOST), r.stderr)
      assert.are.equal("ran 1\n", helpers.slurp(log))
    end)

    it("a holder on another host: refused while its lease runs, taken over when it lapses", function()
      resil.clock.virtual()
      resil.log.level("off")
      local id = "remote-run-" .. backend
      resil.store_config({ url = store_url(), run = id })
      local s = resil.store()
      local now = resil.store_now()
      assert.are.equal(0, (helpers.backend(s):run_start(id, "x.lua", false, now, other_host(now), now + 30)))
      local ok, err = pcall(resil.step, "one", function() return 1 end)
      assert.is_false(ok)
      assert.are.equal("run_held", err.kind)
      assert.are.same({ "otherhost", 4242 }, { err.holder.host, err.holder.pid })
      assert.matches("^run remote%-run%-%a+ is held by pid 4242 on host otherhost since ", err.message)
      resil.sleep(31)
      assert.are.equal(1, resil.step("one", function() return 1 end))
      resil.run.finish("done")
      resil.log.level("info")
    end)

    it("a process whose run was taken over stops at its next step, before its fn runs (and pays)", function()
      resil.clock.virtual()
      resil.log.level("off")
      local id = "lost-run-" .. backend
      resil.store_config({ url = store_url(), run = id })
      assert.are.equal(1, resil.step("one", function() return 1 end))
      local b, now = helpers.backend(resil.store()), resil.store_now()
      if backend == "sqlite" then
        b.db:tx(function(tx) tx:exec("UPDATE runs SET owner = ?, owner_since = ? WHERE id = ?", other_host(now), now, id) end)
      else
        b.conn:call("HSET", "resil:run:" .. id, "owner", other_host(now), "owner_since", tostring(now))
      end
      local ran = false
      local ok, err = pcall(resil.step, "two", function() ran = true; return 2 end)
      assert.is_false(ok)
      assert.are.equal("run_held", err.kind)
      assert.matches("was taken over by pid 4242 on host otherhost", err.message)
      assert.is_false(ran) -- (its provider call would be paid twice: the new holder makes it too)
      resil.run.finish("done")
      resil.log.level("info")
    end)

    it("a process whose run another took over and ended meanwhile stops at its next step too", function()
      resil.clock.virtual()
      resil.log.level("off")
      local id = "ended-run-" .. backend
      resil.store_config({ url = store_url(), run = id })
      assert.are.equal(1, resil.step("one", function() return 1 end))
      local b, now = helpers.backend(resil.store()), resil.store_now()
      local other = other_host(now) -- takes the run over, runs its steps and gives it up, done
      if backend == "sqlite" then
        b.db:tx(function(tx) tx:exec("UPDATE runs SET owner = ?, owner_since = ? WHERE id = ?", other, now, id) end)
      else
        b.conn:call("HSET", "resil:run:" .. id, "owner", other, "owner_since", tostring(now))
      end
      assert.is_true(b:run_finish_now(id, "done", now, other, {}))
      local ran = false
      local ok, err = pcall(resil.step, "two", function() ran = true; return 2 end)
      assert.is_false(ok)
      assert.are.equal("run_held", err.kind)
      assert.matches("^run ended%-run%-%a+ was ended by another process %(done%) while this one ran it", err.message)
      assert.is_false(ran)
      resil.run.finish("done")
      resil.log.level("info")
    end)

    -- Process A runs a step; frozen (SIGSTOP) past its lease, as a partition or a held loop
    -- leaves it, it is taken over by B, which runs the same step and ends the run, leaving it
    -- without a holder. Then A thaws and stores its result for the same place. A runs under
    -- another host name (unshare --uts; root): B judges it by its lease, 1 s, not by its pid.
    it("two processes that ran one step (the first frozen past its lease, the second ended the run): the " ..
      "first result stored is the step's in both, never a raw SQL error", function()
      if helpers.run("id -u").stdout ~= "0\n" then return pending("unshare --uts needs root") end
      local url, dir = store_url(), helpers.tmpname("-dir")
      os.execute("mkdir -p " .. dir)
      local a_script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.store_config({ lease = 1 })
local dir = arg[1]
local function exists(p) local f = io.open(p) if f then f:close() end return f ~= nil end
print("A got", resil.step("answer", function()
  io.open(dir .. "/started", "w"):close()
  while not exists(dir .. "/go") do resil.sleep(0.02) end
  return "A's"
end))
io.stdout:flush()
resil.step("next", function() print("A's next step runs") end)
]])
      local b_script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
print("B got", resil.step("answer", function() return "B's" end))
]])
      local opts = ("--store %s --run shared --log-level off"):format(url)
      local out, pidfile = dir .. "/a.out", dir .. "/a.pid"
      os.execute(("unshare --uts sh -c 'hostname resil-other-host; exec %s %s %s %s' > %s 2>&1 & echo $! > %s")
        :format(helpers.resil, opts, a_script, dir, out, pidfile))
      local pid = helpers.slurp(pidfile):match("%d+")
      reap(pid)
      assert(helpers.wait_until(function()
        local f = io.open(dir .. "/started")
        if f then f:close() end
        return f ~= nil
      end, 20), helpers.slurp(out))
      os.execute("kill -STOP " .. pid)
      finally(function() os.execute("kill -CONT " .. pid .. " 2> /dev/null") end)
      -- B waits for A's lease to lapse, takes the run, runs the step and ends the run
      local b = helpers.run(("timeout 60 %s --wait %s %s"):format(helpers.resil, opts, b_script))
      assert.are.equal(0, b.code, b.stderr)
      assert.are.equal("B got\tB's\n", b.stdout)
      helpers.write(dir .. "/go", "")
      os.execute("kill -CONT " .. pid)
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
      local a = helpers.slurp(out)
      -- (before: SQLite raised "UNIQUE constraint failed: steps.run, steps.scope, steps.seq"; Redis
      -- kept B's record and A went on with its own result)
      assert.is_not.matches("UNIQUE", a)
      assert.matches("^A got\tB's\n", a)
      -- and A stops at its next step: the run was ended by another process
      assert.matches("run_held: run shared was ended by another process", a, 1, true)
      assert.is_not.matches("next step runs", a)
      -- and leaves the run as B ended it (before: A's "failed" was written over B's "done")
      assert.matches("\nshared%s+done%s", helpers.run(("%s runs --store %s"):format(helpers.resil, url)).stdout)
      local again = helpers.run(("%s %s %s"):format(helpers.resil, opts, b_script))
      assert.are.equal("B got\tB's\n", again.stdout)
    end)

    -- The same script in both, as two copies of a cron job are: B, having taken the run over from A
    -- (frozen past its lease, in a step or between two), runs every step and ends the run. A thaws:
    -- it stops at its next step, though B's records would replay there, and leaves B's "done".
    -- (Before: A replayed B's records to its script's end, ran its code outside steps again, exited
    -- 0, and, frozen in a step, wrote "failed" over B's "done".)
    for _, where in ipairs({ "in a step", "between steps" }) do
      it("a process frozen past its lease " .. where .. ", its run taken over and ended running the same " ..
        "script, stops at its next step and leaves the run done", function()
        if helpers.run("id -u").stdout ~= "0\n" then return pending("unshare --uts needs root") end
        local url, dir = store_url(), helpers.tmpname("-dir")
        os.execute("mkdir -p " .. dir)
        local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
resil.store_config({ lease = 1 })
local dir, held = arg[1], arg[2] == "held"
local function exists(p) local f = io.open(p) if f then f:close() end return f ~= nil end
local function wait_here() -- (A only: until the spec has frozen it and let it go)
  if not held then return end
  io.open(dir .. "/started", "w"):close()
  while not exists(dir .. "/go") do resil.sleep(0.02) end
end
for i = 1, 3 do
  resil.step("step " .. i, function()
    if i == 1 and %q == "in a step" then wait_here() end
    return i
  end)
  if i == 1 and %q == "between steps" then wait_here() end
end
print(held and "A" or "B", "reached the end")
]]):format(where, where))
        local opts = ("--store %s --run shared-%s --log-level off"):format(url, where:gsub(" ", "-"))
        local out, pidfile = dir .. "/a.out", dir .. "/a.pid"
        os.execute(("unshare --uts sh -c 'hostname resil-other-host; exec %s %s %s %s held' > %s 2>&1 & echo $! > %s")
          :format(helpers.resil, opts, script, dir, out, pidfile))
        local pid = helpers.slurp(pidfile):match("%d+")
        reap(pid)
        assert(helpers.wait_until(function()
          local f = io.open(dir .. "/started")
          if f then f:close() end
          return f ~= nil
        end, 20), helpers.slurp(out))
        os.execute("kill -STOP " .. pid)
        finally(function() os.execute("kill -CONT " .. pid .. " 2> /dev/null") end)
        local b = helpers.run(("timeout 60 %s --wait %s %s %s"):format(helpers.resil, opts, script, dir))
        assert.are.same({ 0, "B\treached the end\n" }, { b.code, b.stdout }, b.stderr)
        helpers.write(dir .. "/go", "")
        os.execute("kill -CONT " .. pid)
        assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
        local a = helpers.slurp(out)
        assert.matches("run_held: run shared%-[%w-]+ was ended by another process %(done%)", a)
        assert.is_not.matches("A\treached the end", a)
        local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, url)).stdout
        assert.matches("shared%-" .. where:gsub(" ", "%%-") .. "%s+done%s+3%s", runs)
      end)
    end
  end)

  describe(("resil.once holders (%s)"):format(backend), function()
    before_each(function() resil.clock.real() end)

    local HOLDER = [[
local resil = require "resil"
print(resil.once(arg[1], function()
  print("claimed"); io.stdout:flush()
  while not io.open(arg[2]) do resil.sleep(0.01) end -- until the spec says go
  return "made by A"
end))
]]

    it("a live holder is waited for (up to wait) and named; a killed one is taken over at once", function()
      local url = store_url()
      local opts = "--store " .. url .. " --log-level off"
      local go = helpers.tmpname(".go")
      local pid, out = helpers.start(HOLDER, opts, "live " .. go)
      reap(pid)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("claimed") end, 10))
      local caller = [[
local resil = require "resil"
local v, err = resil.once({ key = arg[1], wait = tonumber(arg[2]) }, function() return "made by B" end)
print(v, err and err.kind, err and err.holder and err.holder.pid, err and err.holder and err.holder.host)
]]
      local r = helpers.run_script(caller, opts, "live 0.1")
      assert.are.equal(("nil\tin_progress\t%s\t%s\n"):format(pid, HOST), r.stdout)
      helpers.write(go, "")
      r = helpers.run_script(caller, opts, "live 10")
      assert.are.equal("made by A\tnil\tnil\tnil\n", r.stdout)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))

      pid, out = helpers.start(HOLDER, opts, "killed " .. helpers.tmpname(".never"))
      reap(pid)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("claimed") end, 10))
      os.execute("kill -KILL " .. pid)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      r = helpers.run_script(caller, opts, "killed 0") -- no waiting: the dead holder's claim is taken over
      assert.are.equal("made by B\tnil\tnil\tnil\n", r.stdout)
    end)

    it("a holder on another host is waited for until its lease lapses, then taken over", function()
      resil.clock.virtual()
      resil.store_config({ url = store_url() })
      local s, now = resil.store(), resil.store_now()
      local fp = require("resil.once").fingerprint()
      assert.are.equal("claimed",
        helpers.backend(s):once_claim("remote-key", fp, other_host(now), 300, 86400, now, now + 30))
      local v, err = resil.once({ key = "remote-key", wait = 5 }, function() return "mine" end)
      assert.is_nil(v)
      assert.are.equal("in_progress", err.kind)
      assert.are.same({ "otherhost", 4242 }, { err.holder.host, err.holder.pid })
      resil.sleep(31)
      assert.are.equal("mine", (resil.once({ key = "remote-key", wait = 5 }, function() return "mine" end)))
    end)
  end)

  describe(("budget holds and their owners (%s)"):format(backend), function()
    before_each(function() resil.clock.real() end)

    it("holds of a killed process stop counting at once; state() lists holds with their owners", function()
      local url = store_url()
      local opts = "--store " .. url .. " --log-level off"
      local pid, out = helpers.start([[
local resil = require "resil"
assert(resil.budget("team", { limit = 0.15 }):reserve(0.12)):settle(0.12, { provider = "p" })
assert(resil.budget("team"):reserve(0.02)) -- default hold: 600 s
print("reserved"); io.stdout:flush()
resil.sleep(3600)
]], opts)
      reap(pid)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("reserved") end, 10))
      local check = [[
local resil = require "resil"
local b = resil.budget("team", { limit = 0.15 })
local st = b:state()
local h = st.holds[1] or { owner = {} }
print(#st.holds, h.usd, h.owner.pid, h.owner.host, type(h.owner.since), type(h.expires_at), st.reserved)
local t, err = b:reserve(0.02)
print(t ~= nil, err and err.kind)
]]
      local r = helpers.run_script(check, opts)
      assert.are.equal(("1\t0.02\t%s\t%s\tnumber\tnumber\t0.02\nfalse\tbudget_exceeded\n"):format(pid, HOST),
        r.stdout)
      os.execute("kill -KILL " .. pid)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      r = helpers.run_script(check, opts)
      assert.are.equal("0\tnil\tnil\tnil\tnil\tnil\t0.0\ntrue\tnil\n", r.stdout)
    end)

    it("a hold of another host counts until its owner's lease lapses; state() shows it", function()
      resil.clock.virtual()
      resil.log.level("error")
      resil.store_config({ url = store_url() })
      local b = resil.budget("remote-holds", { limit = 1 })
      local s, now = resil.store(), resil.store_now()
      assert.is_true((helpers.backend(s):budget_reserve("remote-holds", "all", 1000000, 800000, "remote-ticket",
        now + 600, now, other_host(now - 5), now + 30)))
      local mine = assert(b:reserve(0.1))
      local st = b:state()
      assert.are.equal(2, #st.holds)
      local remote = st.holds[1].ticket == "remote-ticket" and st.holds[1] or st.holds[2]
      assert.are.same({ "remote-ticket", 0.8, "otherhost", 4242 },
        { remote.ticket, remote.usd, remote.owner.host, remote.owner.pid })
      assert.near(now - 5, remote.owner.since, 0.01)
      assert.near(now + 600, remote.expires_at, 0.01)
      assert.is_nil((b:reserve(0.5)))
      resil.sleep(31)
      assert.is_truthy(b:reserve(0.5))
      st = b:state()
      assert.are.same({ 2, 0.6 }, { #st.holds, st.reserved })
      mine:release()
      resil.log.level("info")
    end)

    it("settle(0) frees the hold and writes no ledger row", function()
      resil.clock.virtual()
      resil.log.level("error")
      resil.store_config({ url = store_url() })
      local b = resil.budget("failed-calls", { limit = 1 })
      local t = assert(b:reserve(0.6))
      assert.is_true(t:settle(0, { provider = "openai" }))
      assert.is_false(t:settle(0))
      assert.are.equal(0, b:state().reserved)
      assert.are.same({}, resil.cost.breakdown("provider"))
      assert.are.equal(0, resil.cost.total())
      assert.is_truthy(b:reserve(1))
      resil.log.level("info")
    end)

    it("a live holder's lease is renewed by its heartbeat, so other hosts go on counting its holds", function()
      resil.clock.virtual()
      resil.store_config({ url = store_url(), lease = 3 })
      local t = assert(resil.budget("beat", { limit = 1 }):reserve(0.5))
      -- (a second at a time: a beat's reply from Redis a little late costs the clock one jump, not ten seconds)
      for _ = 1, 10 do resil.sleep(1) end
      assert.is_true(my_lease() > resil.store_now())
      t:release()
      resil.store_config({ lease = 30 })
    end)
  end)
end
