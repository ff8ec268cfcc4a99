-- Shared by the specs: run the resil-lua binary (or any command) as a real
-- process and collect what a user would see.
local helpers = {}

helpers.resil = os.getenv("RESIL") or "./resil-lua"

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
helpers.slurp = slurp

-- Every name handed out is removed (a file, a folder, a store with its -wal
-- and -shm) when the suite's process ends: busted closes the Lua state, and
-- this table's __gc runs. Before, each full run left some 2,000 in /tmp.
local made = {}
function helpers.tmpname(suffix)
  local name = os.tmpname()
  os.remove(name)
  name = name .. (suffix or "")
  made[#made + 1] = name
  return name
end

local function remove_made()
  local args = {}
  for _, name in ipairs(made) do
    for _, sibling in ipairs({ "", "-wal", "-shm", "-journal" }) do
      args[#args + 1] = "'" .. (name .. sibling):gsub("'", "'\\''") .. "'"
    end
    if #args >= 2000 then
      os.execute("rm -rf -- " .. table.concat(args, " "))
      args = {}
    end
  end
  if #args > 0 then os.execute("rm -rf -- " .. table.concat(args, " ")) end
end
setmetatable(helpers, { __gc = remove_made })

-- The gateway, policies.ai and policies.call loaded anew (each spec's own
-- config and providers): -> gateway, ai
function helpers.fresh_gateway()
  for _, name in ipairs({ "policies.gateway", "policies.ai", "policies.call" }) do package.loaded[name] = nil end
  return require "policies.gateway", require "policies.ai"
end

-- A fresh gateway in this process in front of the mock m: OpenAI and Anthropic pointed at it
-- (retries without waiting), the config's defaults cleared and `config` set; served on a free
-- port, and it and m stopped after the test (`finally`, the spec's: the log's level back to info)
-- -> its URL, gateway, ai
function helpers.gateway_for_mock(m, config, finally)
  local gateway, ai = helpers.fresh_gateway()
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  local fast = { base = 0.001, cap = 0.005 }
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = fast })
  ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-test-123456", retry = fast })
  gateway.configure(config)
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    s:close()
    m:stop()
    require("resil").log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), gateway, ai
end

function helpers.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

-- {name = text} -> a new folder holding those files (a policy folder for a reload spec)
function helpers.policy_dir(files)
  local dir = helpers.tmpname("-policies")
  assert(os.execute("mkdir -p " .. dir))
  for name, text in pairs(files) do helpers.write(dir .. "/" .. name, text) end
  return dir
end

-- sh command -> {stdout=, stderr=, code=}
function helpers.run(cmd, stdin)
  local out, err = helpers.tmpname(".out"), helpers.tmpname(".err")
  local input = ""
  if stdin then input = " < " .. helpers.write(helpers.tmpname(".in"), stdin) end
  local ok, how, code = os.execute(("%s%s > %s 2> %s"):format(cmd, input, out, err))
  local result = { stdout = slurp(out), stderr = slurp(err), code = how == "exit" and code or 128 + code }
  os.remove(out)
  os.remove(err)
  return result
end

-- Another process (sqlite3) takes the write lock of the SQLite store at
-- `db` and keeps it until the file whose path this returns exists. It waits
-- for a writer that has the lock now (.timeout) and gives up rather than go
-- on without the lock (-bail): a spec's own process may be mid-commit.
function helpers.hold_write_lock(db)
  local locked, release = helpers.tmpname(".locked"), helpers.tmpname(".release")
  os.execute(("printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell touch %s\\n" ..
    ".shell while [ ! -e %s ]; do sleep 0.02; done\\nCOMMIT;\\n' | sqlite3 -bail %s > /dev/null 2>&1 &")
    :format(locked, release, db))
  local took = helpers.wait_until(function()
    local f = io.open(locked)
    if f then f:close() end
    return f ~= nil
  end, 15)
  -- (given up: released now, so that a shell that takes the lock later does not hold it for good)
  if not took then helpers.write(release, "") end
  assert(took, "sqlite3 did not take the store's write lock")
  return release
end

-- Gives hold_write_lock's lock back and waits for its sqlite3 and shell to end (a spec file that
-- ended first left them running, a failure of its own)
function helpers.release_write_lock(release)
  helpers.write(release, "")
  helpers.wait_until(function()
    -- (its last letter in brackets: the shell that runs pgrep, whose command line holds the
    -- pattern, is not found by it)
    local p = io.popen(("pgrep -f '%s[%s]'"):format(release:sub(1, -2), release:sub(-1)))
    local running = p:read("l")
    p:close()
    return running == nil
  end, 10)
end

-- kill -9 the process `pid` `delay` seconds after it printed "started" to
-- its output file `out` (timed from its start-up, on a slow machine a good
-- part of a short delay, its kills would all land before it did anything);
-- delay nil: let it run to its end. -> true if it was killed
function helpers.kill_after_start(pid, out, delay)
  local resil = require "resil"
  helpers.wait_until(function() return not helpers.alive(pid) or helpers.slurp(out):match("started") end, 30)
  local deadline = resil.clock.wall() + (delay or 60)
  helpers.wait_until(function() return not helpers.alive(pid) or resil.clock.wall() >= deadline end, 60)
  if not helpers.alive(pid) then return false end
  os.execute("kill -KILL " .. pid)
  helpers.wait_until(function() return not helpers.alive(pid) end, 10)
  return true
end

-- Run a script file through the host: args is a string appended to the command line.
function helpers.run_script(source, opts, args)
  local path = helpers.write(helpers.tmpname(".lua"), source)
  local r = helpers.run(("%s %s %s %s"):format(helpers.resil, opts or "", path, args or ""))
  r.path = path
  return r
end

-- Start a script in the background: -> pid, path of its combined output.
function helpers.start(source, opts, args)
  local script = helpers.write(helpers.tmpname(".lua"), source)
  local out = helpers.tmpname(".out")
  local pidfile = helpers.tmpname(".pid")
  os.execute(("%s %s %s %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, opts or "", script, args or "", out,
    pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  os.remove(pidfile)
  return pid, out
end

-- Wait (real time, inside the host) until cond() holds; false after `seconds`.
function helpers.wait_until(cond, seconds)
  local resil = require "resil"
  local deadline = resil.clock.wall() + (seconds or 10)
  while resil.clock.wall() < deadline do
    if cond() then return true end
    resil.sleep(0.01)
  end
  return cond() and true or false
end

-- Wait until something answers HTTP on the loopback port (a mock or gateway started in the
-- background: a request sent before it listens is refused, and a gateway tries it again);
-- false after `seconds`.
function helpers.wait_listening(port, seconds)
  local resil = require "resil"
  return helpers.wait_until(function()
    return resil.http.request({ url = ("http://127.0.0.1:%d/health"):format(port), timeout = 1 }) ~= nil
  end, seconds or 20)
end

-- Run n copies of a script at once: each waits for the same wall-clock
-- moment (`delay` seconds from now, 1 by default) before its first line.
-- -> their outputs, in order.
function helpers.run_together(n, source, opts, delay)
  local resil = require "resil"
  local go = ("%.3f"):format(resil.clock.wall() + (delay or 1)) -- (an ASan start on a loaded machine)
  local start = "do local r = require 'resil'; while r.clock.wall() < " .. go .. " do r.sleep(0.002) end end "
  local procs = {}
  for i = 1, n do procs[i] = { helpers.start(start .. source, opts) } end
  local outputs = {}
  for i = 1, n do
    assert(helpers.wait_until(function() return not helpers.alive(procs[i][1]) end, 60), "a process hung")
    outputs[i] = helpers.slurp(procs[i][2])
  end
  return outputs
end

-- the sum of the numbers that start each output
function helpers.sum_of(outputs)
  local total = 0
  for _, out in ipairs(outputs) do total = total + assert(tonumber(out:match("^(%d+)")), out) end
  return total
end

-- A process that exited but is not reaped yet (a zombie) counts as gone.
-- the pids of a `gateway --workers` supervisor's workers (its children), as they are now
function helpers.workers_of(pid)
  local list = {}
  for p in helpers.slurp(("/proc/%s/task/%s/children"):format(pid, pid)):gmatch("%d+") do list[#list + 1] = p end
  return list
end

function helpers.alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  if not stat then return false end -- (it ended between the open and the read: ESRCH)
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- A bucket of 1,000 tokens a second (burst 1,000), shared or not, counts what is left exactly
-- through takes, refunds and charges at times that are no round number: an arrival time's
-- rounding is no token missing.
function helpers.counts_exactly(b)
  local resil, assert = require "resil", require "luassert"
  for _ = 1, 50 do
    assert.are.same({ true, 600 }, { b:acquire(400) })
    assert.are.same({ true, 300 }, { b:acquire(300) })
    assert.are.equal(700, b:refund(400))
    assert.are.equal(400, b:charge(300))
    assert.are.equal(1000, b:refund(1000))
    resil.sleep(0.0137)
  end
end

-- The JSON log lines fn() writes, decoded (fn's error is raised after).
function helpers.logged(fn)
  local resil = require "resil"
  local path = helpers.tmpname(".log")
  resil.log.output(path)
  local ok, err = pcall(fn)
  resil.log.output("stderr")
  local lines = {}
  for line in helpers.slurp(path):gmatch("[^\n]+") do lines[#lines + 1] = resil.json.decode(line) end
  os.remove(path)
  assert(ok, err)
  return lines
end

-- The TAP-like lines a node check script prints ("ok NAME" or "not ok NAME
-- -- reason") -> { [name] = true | reason }
function helpers.sdk_results(stdout)
  local results = {}
  for line in stdout:gmatch("[^\n]+") do
    local ok, name, reason = line:match("^(ok) (.-)$")
    if not ok then ok, name, reason = line:match("^(not ok) (.-) %-%- (.*)$") end
    if ok then results[name] = ok == "ok" or reason end
  end
  return results
end

-- Run cmd (a server) in the background until its output shows pattern, then
-- fn(the match); the server is stopped (SIGTERM) after. -> fn's result, and
-- the server's output when the pattern never showed (nil result).
function helpers.with_server(cmd, pattern, fn)
  local log, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
  os.execute(("%s > %s 2>&1 & echo $! > %s"):format(cmd, log, pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  local resil = require "resil"
  resil.clock.real()
  local found
  helpers.wait_until(function()
    found = helpers.slurp(log):match(pattern)
    return found ~= nil
  end, 10)
  local result = found and fn(found)
  os.execute("kill -TERM " .. pid)
  helpers.wait_until(function() return not helpers.alive(pid) end, 10)
  return result, not found and helpers.slurp(log) or nil
end

-- Why the official SDKs (spec/sdk, installed by `make deps`) cannot run
-- here, or nil when they can.
-- The official SDKs' script `mjs` (in spec/sdk) run against the gateway `server` (a script in
-- spec/sdk that prints its environment as a JSON line once it serves) -> the checks' results
-- (helpers.sdk_results), and the script's run
function helpers.sdk_against_gateway(server, mjs)
  local out, log = helpers.with_server(("%s %s %s"):format(helpers.resil, server, helpers.tmpname(".db")),
    "(%b{})", function(line)
      local env = helpers.write(helpers.tmpname(".json"), line)
      return helpers.run(("cd spec/sdk && GATEWAY=\"$(cat %s)\" node %s"):format(env, mjs))
    end)
  assert(out, "the gateway did not start: " .. tostring(log))
  return helpers.sdk_results(out.stdout), out
end

-- One `it` per named check an SDK script reported (got() -> its results and its run, known once
-- the describe's setup ran): each must have run and passed
function helpers.sdk_checks(it, names, got) -- (busted's it: the spec file's, not a global here)
  for _, name in ipairs(names) do
    it(name, function()
      local results, out = got()
      local r = results[name]
      assert(r ~= nil, "the check did not run: " .. out.stdout .. out.stderr)
      assert(r == true, tostring(r))
    end)
  end
end

function helpers.sdk_skip_reason()
  if helpers.run("command -v node").code ~= 0 then return "node is not installed" end
  local f = io.open("spec/sdk/node_modules/openai/package.json")
  if not f then return "the SDKs are not installed (make deps runs npm ci in spec/sdk)" end
  f:close()
  return nil
end

-- The store backends a spec runs on: a fresh SQLite file, and a database of
-- a real redis-server started for the spec file ({name=, url(), stop()}).
function helpers.store_backends()
  local redis = helpers.redis_server()
  return {
    { name = "SQLite", url = function() return helpers.tmpname(".db") end },
    { name = "Redis", url = function() return redis.url() end, stop = redis.stop },
  }
end

-- A free loopback TCP port.
function helpers.free_port()
  local resil = require "resil"
  local s = resil.server.listen({ handler = function() end })
  local p = s:port()
  s:close()
  return p
end

-- n free loopback ports, all different (each held open until all are
-- found: one at a time, the system may hand out the same port twice)
function helpers.free_ports(n)
  local resil = require "resil"
  local servers, ports = {}, {}
  for i = 1, n do
    servers[i] = resil.server.listen({ handler = function() end })
    ports[i] = servers[i]:port()
  end
  for _, s in ipairs(servers) do s:close() end
  return table.unpack(ports, 1, n)
end

-- A real redis-server on a free loopback port, in a folder of its own, for
-- one spec file: -> {port=, pid=, url([db] [, query]) (a fresh database's
-- URL without db), stop()}. Always stop it.
-- (The port is free when picked, and another spec file's redis-server may take it first: this one
-- then fails to bind, and the one that answers on it, with the same database numbers, is the
-- other file's, whose cleanup empties them. The server that answers is checked to be this one.)
function helpers.redis_server()
  local dir = helpers.tmpname("-redis")
  os.execute("mkdir -p " .. dir)
  local pidfile = dir .. "/redis.pid"
  local port, pid
  for _ = 1, 10 do
    port = helpers.free_port()
    os.remove(pidfile)
    os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
                "--pidfile %s --databases 64 > /dev/null"):format(port, dir, pidfile))
    -- (none written when it could not bind: it has exited)
    helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 3)
    pid = helpers.slurp(pidfile):match("%d+") or "0"
    local answered = pid ~= "0" and helpers.wait_until(function()
      return os.execute(("redis-cli -p %d ping > /dev/null 2>&1"):format(port)) == true or not helpers.alive(pid)
    end, 10) and helpers.alive(pid)
    local info = answered and io.popen(("redis-cli -p %d info server 2>/dev/null"):format(port)):read("a") or ""
    if info:match("process_id:(%d+)") == pid then break end
    if pid ~= "0" then os.execute("kill -9 " .. pid .. " 2>/dev/null") end
    pid = nil
  end
  assert(pid, "no redis-server of this spec's own could be started")
  local server = { port = port, pid = pid }
  local fresh = 0
  function server.url(db, query)
    if not db then
      fresh = fresh + 1
      db = fresh
    end
    return ("redis://127.0.0.1:%d/%d%s"):format(port, db, query and ("?" .. query) or "")
  end
  function server.stop()
    os.execute("kill -CONT " .. server.pid .. "; kill -9 " .. server.pid)
    helpers.wait_until(function() return not helpers.alive(server.pid) end, 10)
    os.execute("rm -rf " .. dir)
  end
  return server
end

-- The TCP sockets a program started now (io.popen) inherits from this
-- process -> "" when none; one line per socket otherwise
function helpers.inherited_tcp_sockets()
  local child = io.popen([[for s in $(ls -l /proc/self/fd/ | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p'); do
    awk -v s="$s" '$10 == s { print "inherited tcp socket " s }' /proc/net/tcp /proc/net/tcp6; done; echo listed]])
  local listed = child:read("a")
  child:close()
  return (listed:gsub("listed\n$", ""))
end

-- A store's backend (its db or connection, and the operations the host's modules call): never on
-- the store object, which a sandboxed script holds too; out of the sandbox, in the host's private
-- table (src/resil.c)
function helpers.backend(s)
  return debug.getregistry()["resil.private"].backend_of[s]
end

-- The store's extensions of budget holds (ticket:extend, ticket:keep), counted
-- until the test ends (`finally`, the test's own, undoes it): -> { n }
function helpers.count_extensions(finally)
  local be, n = helpers.backend(assert(require("resil").store())), { 0 }
  local extend = be.budget_extend
  be.budget_extend = function(...) n[1] = n[1] + 1; return extend(...) end
  finally(function() be.budget_extend = nil end)
  return n
end

-- the ledger rows a process's log says were lost as it ended -> sorted { "id usd", ... }
function helpers.rows_logged_lost(stderr)
  local named = {}
  for line in stderr:gmatch("[^\n]+") do
    if line:find("was not written before the process ended", 1, true) then
      local row = require("resil").json.decode(line)
      named[#named + 1] = row.id .. " " .. row.usd
    end
  end
  table.sort(named)
  return named
end

-- the ledger writes a process's log says it kept in the ledger's journal (src/lua/journal.lua) ->
-- sorted { "id usd", ... }
function helpers.rows_logged_kept(stderr)
  local named = {}
  for line in stderr:gmatch("[^\n]+") do
    if line:find("is kept in the ledger's journal", 1, true) then
      local row = require("resil").json.decode(line)
      named[#named + 1] = tostring(row.id or row.ticket) .. " " .. row.usd
    end
  end
  table.sort(named)
  return named
end

-- A shared library for LD_PRELOAD that sets a process's wall clock CLOCK_SKEW seconds off (another
-- host's, not synchronised), or the seconds the file CLOCK_SKEW_FILE holds, read at each look (a
-- clock stepped while the process runs): built with cc, -> its path
function helpers.clock_skew_shim()
  local src = helpers.write(helpers.tmpname(".c"), [[
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/time.h>
/* this process's wall clock, CLOCK_SKEW seconds off (another host's, not synchronised) */
static long long skew_ns(void) {
  const char *s = getenv("CLOCK_SKEW"), *path = getenv("CLOCK_SKEW_FILE");
  double skew = s ? atof(s) : 0;
  FILE *f = path ? fopen(path, "r") : NULL;
  if (f) {
    if (fscanf(f, "%lf", &skew) != 1) skew = 0;
    fclose(f);
  }
  return (long long)(skew * 1e9);
}
int clock_gettime(clockid_t id, struct timespec *ts) {
  static int (*real)(clockid_t, struct timespec *);
  if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
  int r = real(id, ts);
  if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + skew_ns();
    ts->tv_sec = ns / 1000000000LL, ts->tv_nsec = ns % 1000000000LL;
  }
  return r;
}
int gettimeofday(struct timeval *tv, void *tz) {
  struct timespec ts;
  (void)tz;
  if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
  if (tv) tv->tv_sec = ts.tv_sec, tv->tv_usec = ts.tv_nsec / 1000;
  return 0;
}
time_t time(time_t *t) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  if (t) *t = ts.tv_sec;
  return ts.tv_sec;
}
]])
  local shim = helpers.tmpname(".so")
  assert(os.execute(("cc -shared -fPIC -o %s %s -ldl"):format(shim, src)), "cc could not build the shim")
  return shim
end

-- `resil-lua gateway` with this config text, in the background, on a free port and a fresh
-- store; killed when the spec ends (finally: the spec file's, handed in) -> pid, port, log, path
function helpers.gateway_with_config(config, finally)
  local port = helpers.free_port()
  local pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".out")
  local path = helpers.write(helpers.tmpname(".lua"), config)
  os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s")
    :format(helpers.resil, port, path, helpers.tmpname(".db"), log, pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
  return pid, port, log, path
end

-- a gateway's count of policy reloads with this result ("ok", "failed"), from its /metrics
function helpers.reloads(port, result)
  local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/metrics"):format(port))
  return tonumber(r.stdout:match('resil_reloads_total{result="' .. result .. '"} (%d+)'))
end

return helpers
