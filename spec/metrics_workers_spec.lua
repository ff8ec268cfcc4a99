-- Metrics under `resil-lua gateway --workers N`: each worker writes its own
-- figures to the supervisor's folder, and every scrape (the gateway's GET
-- /metrics, --metrics-addr, --metrics-file) answers with all of them merged,
-- whichever worker answers. Before, the second worker could not bind
-- --metrics-addr and the gateway stopped; GET /metrics answered with one
-- random worker's counts (a counter going down: a reset to Prometheus); the
-- file held whichever worker wrote it last. Real processes: the gateway, a
-- mock provider (resil-lua mock), curl on a new connection each time (the
-- kernel spreads them over the workers), kill -9.
local resil = require "resil"
local helpers = require "spec.helpers"

local has_promtool = os.execute("command -v promtool > /dev/null 2>&1") == true
local CHAT = "/v1/chat/completions"
local SERIES = 'resil_gateway_requests_total{route="/v1/chat/completions",status="200"}'

-- the value of one series in an exposition (nil when absent)
local function value(text, series)
  local v = ("\n" .. text):match("\n" .. series:gsub("%p", "%%%0") .. " (%S+)\n")
  return v and tonumber(v)
end

local function sh(cmd, stdin) return helpers.run(cmd, stdin) end

-- GET url on a connection of its own -> body
local function scrape(url)
  local r = sh(("curl -s --max-time 10 %s"):format(url))
  assert(r.code == 0, "curl " .. url .. ": " .. r.stderr)
  return r.stdout
end

-- n chats through the gateway, each on a new connection; each answered 200
local function chats(port, n)
  local body = helpers.write(helpers.tmpname(".json"),
    '{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}')
  local r = sh(("for i in $(seq %d); do curl -s -o /dev/null -w '%%{http_code}\\n' --max-time 10 " ..
    "-H 'content-type: application/json' --data @%s http://127.0.0.1:%d%s; done"):format(n, body, port, CHAT))
  local _, ok = r.stdout:gsub("200\n", "")
  assert.are.equal(n, ok, r.stdout .. r.stderr)
end

local workers_of = helpers.workers_of

-- a mock provider, and `resil-lua gateway --workers 2 [extra]` routing to it with TMPDIR a
-- folder of the test's -> gateway port, supervisor pid, log, tmpdir, seen (workers to kill after)
local function start_gateway(extra, config_lines, before)
  local mport, port = helpers.free_ports(2)
  local mpidfile, pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".pid"), helpers.tmpname(".out")
  os.execute(("%s mock --port %d > /dev/null 2>&1 & echo $! > %s"):format(helpers.resil, mport, mpidfile))
  local mpid = helpers.slurp(mpidfile):match("%d+")
  assert.is_true(helpers.wait_listening(mport), "the mock did not start") -- (before the first request: one sent
  -- while it started was refused and tried again, an attempt more than the spec counts)
  local config = helpers.write(helpers.tmpname(".lua"), ([[
    require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
    %s
    return { auth = false }
  ]]):format(mport, config_lines or ""))
  local tmpdir = helpers.tmpname(".d")
  os.execute("mkdir -p " .. tmpdir)
  if before then before(tmpdir) end
  os.execute(("TMPDIR=%s %s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s %s > %s 2>&1 & " ..
    "echo $! > %s"):format(tmpdir, helpers.resil, port, config, helpers.tmpname(".db"), extra or "", log, pidfile))
  local pid, seen = helpers.slurp(pidfile):match("%d+"), {}
  finally(function()
    for _, p in ipairs({ pid, mpid, table.unpack(seen) }) do
      if helpers.alive(p) then os.execute("kill -KILL " .. p) end
    end
  end)
  assert.is_true(helpers.wait_until(function()
    return sh(("curl -s -o /dev/null http://127.0.0.1:%d/health"):format(mport)).code == 0 and
      select(2, helpers.slurp(log):gsub("listening", "")) >= 2
  end, 10), helpers.slurp(log))
  for _, w in ipairs(workers_of(pid)) do seen[#seen + 1] = w end
  return port, pid, log, tmpdir, seen
end

-- the supervisor's folder under tmpdir, and its workers' files in it
local function folder_files(tmpdir)
  local r = sh(("(ls -d %s/resil-lua-metrics-* && ls %s/resil-lua-metrics-*/) 2>/dev/null")
    :format(tmpdir, tmpdir))
  return r.stdout
end

describe("gateway --workers 2: metrics merged over the workers", function()
  it("with --metrics-addr: it starts and stays up; every scrape (there and on the gateway's port) counts all K " ..
     "chats, served by both workers; a worker killed with -9 is replaced and the count never goes down; " ..
     "promtool passes", function()
    local mport = helpers.free_port()
    local port, pid, log, tmpdir, seen = start_gateway(("--metrics-addr 127.0.0.1:%d"):format(mport))
    local K = 16
    chats(port, K)
    -- each worker's figures are at most a second old in another's scrape
    local maddr = ("http://127.0.0.1:%d/metrics"):format(mport)
    assert.is_true(helpers.wait_until(function() return value(scrape(maddr), SERIES) == K end, 10),
      scrape(maddr) .. helpers.slurp(log))
    -- both workers served some of them (each one's own file in the supervisor's folder)
    local files = folder_files(tmpdir)
    local own = {}
    for name in files:gmatch("(w%-%d+%-%d+%.prom)") do
      own[#own + 1] = value(helpers.slurp(files:match("^(%S+)") .. "/" .. name), SERIES) or 0
    end
    assert.are.equal(2, #own, files)
    assert.is_true(own[1] > 0 and own[2] > 0 and own[1] + own[2] == K, own[1] .. " + " .. own[2])
    for _ = 1, 10 do
      assert.are.equal(K, value(scrape(maddr), SERIES))
      assert.are.equal(K, value(scrape(("http://127.0.0.1:%d/metrics"):format(port)), SERIES))
    end
    assert.is_true(helpers.alive(pid), helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):match("in use"), helpers.slurp(log))
    if has_promtool then
      local r = sh("promtool check metrics", scrape(maddr))
      assert.is_true(r.code == 0 and r.stdout == "" and r.stderr == "", r.stdout .. r.stderr)
    end
    -- a worker killed: another takes its place, and its counts stay in the sums
    local before = workers_of(pid)
    os.execute("kill -KILL " .. before[1])
    assert.is_true(helpers.wait_until(function()
      local now = workers_of(pid)
      return #now == 2 and now[1] ~= before[1] and now[2] ~= before[1] and
        select(2, helpers.slurp(log):gsub("listening", "")) >= 3
    end, 10), helpers.slurp(log))
    for _, w in ipairs(workers_of(pid)) do seen[#seen + 1] = w end
    for _ = 1, 10 do
      local text = scrape(maddr)
      assert.is_true((value(text, SERIES) or 0) >= K, text)
    end
    chats(port, K)
    assert.is_true(helpers.wait_until(function() return value(scrape(maddr), SERIES) == 2 * K end, 10),
      scrape(maddr))
    for _ = 1, 10 do assert.are.equal(2 * K, value(scrape(maddr), SERIES)) end
  end)

  it("with --metrics-file: stopped, the file holds every worker's counts merged; the folder is removed", function()
    local file = helpers.tmpname(".prom")
    local port, pid, log, tmpdir, seen = start_gateway("--metrics-file " .. file)
    local K = 16
    chats(port, K)
    -- each worker writes its own figures a last time, then the merge: the last to stop has them all
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function()
      for _, p in ipairs({ pid, table.unpack(seen) }) do if helpers.alive(p) then return false end end
      return true
    end, 15), helpers.slurp(log))
    local text = helpers.slurp(file)
    assert.are.equal(K, value(text, SERIES), text)
    if has_promtool then
      local r = sh("promtool check metrics < " .. file)
      assert.is_true(r.code == 0 and r.stdout == "" and r.stderr == "", r.stdout .. r.stderr)
    end
    assert.are.equal("", folder_files(tmpdir))
  end)

  it("without --metrics-addr: GET /metrics on the gateway's port counts every worker's requests, " ..
     "whichever answers", function()
    local port, pid, log = start_gateway()
    local K = 12
    chats(port, K)
    local url = ("http://127.0.0.1:%d/metrics"):format(port)
    assert.is_true(helpers.wait_until(function() return value(scrape(url), SERIES) == K end, 10),
      scrape(url) .. helpers.slurp(log))
    for _ = 1, 10 do assert.are.equal(K, value(scrape(url), SERIES)) end
    assert.is_true(helpers.alive(pid))
  end)

  it("hostile model names, merged over the workers: every scrape passes the strict exposition check " ..
     "and promtool, with the version=0.0.4 Content-Type", function()
    local port, pid, log = start_gateway("--metrics-file " .. helpers.tmpname(".prom"))
    local strict = require "spec.prom_strict"
    -- (the gateway refuses a model that is not printable ASCII without spaces: those are 400s, and
    -- the quotes, backslashes and braces of the first reach the labels)
    local names = { 'q"b\\c{le="1"}', 'a"b', "back\\slash", "new\nline", "caf\xc3", 'x} 1\n# TYPE y counter', "le",
      "sp ace", "\xff\xfe" }
    for _, model in ipairs(names) do
      for _ = 1, 2 do -- (two connections: both workers, most often)
        local body = helpers.write(helpers.tmpname(".json"), resil.json.encode({ model = "openai/" .. model,
          messages = { { role = "user", content = "hi" } } }))
        sh(("curl -s -o /dev/null --max-time 10 -H 'content-type: application/json' --data-binary @%s " ..
          "http://127.0.0.1:%d%s"):format(body, port, CHAT))
      end
    end
    local url = ("http://127.0.0.1:%d/metrics"):format(port)
    local hostile = 'gen_ai_request_model="q\\"b\\\\c{le=\\"1\\"}"'
    -- (a worker's counts reach the merge at its next write: waited for, as the other specs here do)
    assert.is_true(helpers.wait_until(function() return scrape(url):find(hostile, 1, true) ~= nil end, 10),
      scrape(url) .. helpers.slurp(log))
    for _ = 1, 6 do
      local r = sh(("curl -s -D %s --max-time 10 %s"):format(helpers.tmpname(".h"), url))
      local text = r.stdout
      assert.are.same({}, strict(text), text)
      assert.truthy(text:find(hostile, 1, true), text)
      if has_promtool then
        local p = sh("promtool check metrics", text)
        assert.are.equal(0, p.code, p.stdout .. p.stderr)
      end
    end
    local headers = sh(("curl -s -o /dev/null -D - --max-time 10 %s"):format(url)).stdout
    assert.matches("\n[Cc]ontent%-[Tt]ype: text/plain; version=0%.0%.4", headers)
    assert.is_true(helpers.alive(pid), helpers.slurp(log))
  end)

  it("a folder left by a supervisor killed with -9 is removed at the next start; a running one's is kept",
     function()
    local gone = sh("sh -c 'echo $$'").stdout:match("%d+") -- (a pid that ran and ended)
    local function own_pid()
      local f = assert(io.open("/proc/self/stat"))
      local pid = f:read("n")
      f:close()
      return pid
    end
    local stale, running
    local _, pid = start_gateway(nil, nil, function(tmpdir)
      stale = ("%s/resil-lua-metrics-%s-abcdef"):format(tmpdir, gone)
      running = ("%s/resil-lua-metrics-%d-abcdef"):format(tmpdir, own_pid())
      os.execute(("mkdir -m 700 %s %s && touch %s/d-0-1.prom %s/d-0-1.prom"):format(stale, running, stale, running))
    end)
    assert.is_nil(io.open(stale .. "/d-0-1.prom"))
    assert.is_true(sh("test -d " .. stale).code ~= 0)
    assert.is_truthy(io.open(running .. "/d-0-1.prom"))
    assert.is_true(helpers.alive(pid))
  end)

  it("a config's own resil.metrics.serve{port =}: each worker listens there too, and answers with the merge",
     function()
    local sport = helpers.free_port()
    -- (kept in a global: a server nothing refers to is closed when collected)
    local port, pid, log = start_gateway(nil,
      ("METRICS_SERVER = require('resil').metrics.serve({ port = %d })"):format(sport))
    local K = 12
    chats(port, K)
    local url = ("http://127.0.0.1:%d/metrics"):format(sport)
    assert.is_true(helpers.wait_until(function() return value(scrape(url), SERIES) == K end, 10),
      scrape(url) .. helpers.slurp(log))
    for _ = 1, 10 do assert.are.equal(K, value(scrape(url), SERIES)) end
    assert.is_true(helpers.alive(pid), helpers.slurp(log))
  end)

  it("--metrics-addr another process listens on with SO_REUSEPORT (another gateway's): refused at the start, " ..
     "not split with it", function()
    local resil = require "resil"
    local other = resil.server.listen({ host = "127.0.0.1", port = 0, reuseport = true, handler = function()
      return { status = 200, body = "the other one\n" }
    end })
    finally(function() other:close() end)
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }")
    local r = sh(("timeout 20 %s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s " ..
      "--metrics-addr 127.0.0.1:%d"):format(helpers.resil, helpers.free_port(), config, helpers.tmpname(".db"),
      other:port()))
    assert.are.equal(1, r.code, r.stderr)
    assert.matches("cannot listen on 127.0.0.1:" .. other:port() .. ": the address is in use", r.stderr)
    assert.matches("choose another %-%-metrics%-addr", r.stderr)
  end)

  it("without --workers: no folder, no files", function()
    local port, mport = helpers.free_ports(2)
    local tmpdir, pidfile, log = helpers.tmpname(".d"), helpers.tmpname(".pid"), helpers.tmpname(".out")
    os.execute("mkdir -p " .. tmpdir)
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }")
    os.execute(("TMPDIR=%s %s gateway --listen 127.0.0.1:%d --config %s --store %s --metrics-addr 127.0.0.1:%d " ..
      "> %s 2>&1 & echo $! > %s"):format(tmpdir, helpers.resil, port, config, helpers.tmpname(".db"), mport, log,
      pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10))
    sh(("curl -s -o /dev/null http://127.0.0.1:%d/health"):format(port))
    assert.are.equal(1, value(scrape(("http://127.0.0.1:%d/metrics"):format(mport)),
      'resil_gateway_requests_total{route="/health",status="200"}'))
    assert.are.equal("", sh("ls -A " .. tmpdir).stdout)
  end)
end)

describe("resil.metrics: the merge of the workers' files", function()
  it("counters and histograms summed over live and dead workers; gauges over the live ones by their merge; " ..
     "promtool passes", function()
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    -- worker 1, alive, and worker 2, dead (the supervisor renamed its file), as their scrapes wrote them
    helpers.write(dir .. "/w-1-11.prom", table.concat({
      "# AT 1000.5",
      "# HELP t_total Things", "# TYPE t_total counter", 't_total{k="a"} 4',
      "# HELP t_seconds Time", "# TYPE t_seconds histogram",
      't_seconds_bucket{le="0.1"} 1', 't_seconds_bucket{le="1"} 2', 't_seconds_bucket{le="+Inf"} 2',
      "t_seconds_sum 0.55", "t_seconds_count 2",
      "# HELP g_summed Queue", "# TYPE g_summed gauge", "g_summed 3",
      "# HELP g_max Store figure", "# TYPE g_max gauge", "# MERGE g_max max", 'g_max{b="x"} 7',
      "# HELP g_min Days", "# TYPE g_min gauge", "# MERGE g_min min", "g_min 4",
      "# HELP g_w Own", "# TYPE g_w gauge", "# MERGE g_w worker", 'g_w{a="x"} 2',
      "# HELP only_1_total Defined in worker 1 only", "# TYPE only_1_total counter", "only_1_total 9",
      "# HELP g_recent Read", "# TYPE g_recent gauge", "# MERGE g_recent mostrecent", 'g_recent{z="0"} 9',
      'g_recent{z="1"} 3', "" }, "\n"))
    -- worker 3 wrote after this scrape's worker (the clock's word for it)
    helpers.write(dir .. "/w-3-13.prom", table.concat({ "# AT 99999999999",
      "# HELP g_recent Read", "# TYPE g_recent gauge", "# MERGE g_recent mostrecent", 'g_recent{z="2"} 7', "" }, "\n"))
    helpers.write(dir .. "/d-2-12.prom", table.concat({
      "# HELP t_total Things", "# TYPE t_total counter", 't_total{k="a"} 10', 't_total{k="b"} 1',
      "# HELP g_summed Queue", "# TYPE g_summed gauge", "g_summed 100",
      "# HELP g_max Store figure", "# TYPE g_max gauge", "# MERGE g_max max", 'g_max{b="x"} 100', "" }, "\n"))
    helpers.write(dir .. "/w-1-11.prom.11.tmp", "t_total{k=\"a\"} 1000\n") -- (half written: not read)
    local r = helpers.run_script([[
      local m = require("resil").metrics
      m.counter("t_total", "Things"):inc({ k = "a" }, 3)
      local h = m.histogram("t_seconds", "Time", { buckets = { 0.1, 1 } })
      h:observe(nil, 0.05)
      m.gauge("g_summed", "Queue"):set(nil, 2)
      m.gauge("g_max", "Store figure", { merge = "max" }):set({ b = "x" }, 5)
      m.gauge("g_min", "Days", { merge = "min" }):set(nil, 6)
      m.gauge("g_w", "Own", { merge = "worker" }):set({ a = "x" }, 1)
      local recent = m.gauge("g_recent", "Read", { merge = "mostrecent" })
      recent:set({ z = "0" }, 8)
      recent:set({ z = "2" }, 6)
      assert(not pcall(m.gauge, "g_bad", "Bad", { merge = "avg" }))
      m.shard({ dir = arg[1], slot = 0 })
      io.write(m.scrape())
    ]], "--store " .. helpers.tmpname(".db"), dir)
    assert.are.equal(0, r.code, r.stderr)
    local text = r.stdout
    assert.are.equal(17, value(text, 't_total{k="a"}'), text)
    assert.are.equal(1, value(text, 't_total{k="b"}'), text)
    assert.are.equal(9, value(text, "only_1_total"), text)
    assert.are.equal(2, value(text, 't_seconds_bucket{le="0.1"}'), text)
    assert.are.equal(3, value(text, 't_seconds_bucket{le="+Inf"}'), text)
    assert.are.equal(3, value(text, "t_seconds_count"), text)
    assert.are.equal(0.6, value(text, "t_seconds_sum"), text)
    assert.are.equal(5, value(text, "g_summed"), text) -- (the dead worker's 100 left out)
    assert.are.equal(7, value(text, 'g_max{b="x"}'), text)
    assert.are.equal(4, value(text, "g_min"), text)
    assert.are.equal(1, value(text, 'g_w{a="x",worker="0"}'), text)
    assert.are.equal(2, value(text, 'g_w{a="x",worker="1"}'), text)
    assert.are.equal(8, value(text, 'g_recent{z="0"}'), text) -- (this worker's, written last)
    assert.are.equal(3, value(text, 'g_recent{z="1"}'), text) -- (only worker 1 has it)
    assert.are.equal(7, value(text, 'g_recent{z="2"}'), text) -- (worker 3's, written after)
    assert.is_nil(text:match("MERGE"), text)
    assert.is_nil(text:match("# AT"), text)
    local _, helps = text:gsub("# HELP t_total ", "")
    assert.are.equal(1, helps, text)
    assert.are.same({}, require("spec.prom_strict")(text), text)
    if has_promtool then
      local p = sh("promtool check metrics", text)
      assert.is_true(p.code == 0 and p.stdout == "" and p.stderr == "", p.stdout .. p.stderr)
    end
  end)

  it("dead workers' files past 8 are merged into one by worker 0; the counts stay; a merge cut short " ..
     "(its inputs still there) counts them once", function()
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    local function counter_file(name, n, extra)
      helpers.write(dir .. "/" .. name, (extra or "") .. "# HELP t_total Things\n# TYPE t_total counter\n" ..
        ('t_total{k="a"} %d\n'):format(n) .. "# HELP g Queue\n# TYPE g gauge\ng 50\n")
    end
    -- a compaction cut short: the merged file is in, two of its inputs not yet removed
    counter_file("d-0-500n1.prom", 100, "# REPLACES d-1-501.prom\n# REPLACES d-1-502.prom\n")
    counter_file("d-1-501.prom", 60)
    counter_file("d-1-502.prom", 40)
    for i = 1, 10 do counter_file(("d-1-%d.prom"):format(600 + i), i) end -- 55 in all
    local r = helpers.run_script([[
      local resil = require "resil"
      local m = resil.metrics
      m.counter("t_total", "Things"):inc({ k = "a" }, 1000)
      m.shard({ dir = arg[1], slot = 0, interval = 0.1 })
      io.write(m.scrape(), "\n--\n")
      resil.sleep(60) -- (on the virtual clock: some ticks past the 10th, when the compaction runs)
      io.write(m.scrape())
    ]], "--virtual-clock --store " .. helpers.tmpname(".db"), dir)
    assert.are.equal(0, r.code, r.stderr)
    local before, after = r.stdout:match("^(.-)\n%-%-\n(.*)$")
    assert.are.equal(1155, value(before, 't_total{k="a"}'), before)
    assert.are.equal(1155, value(after, 't_total{k="a"}'), after)
    assert.are.equal(0, value(after, "g") or 0, after) -- (dead workers' gauges left out)
    local left = sh("ls " .. dir).stdout
    local _, dead = left:gsub("d%-", "")
    assert.are.equal(1, dead, left)
  end)

  it("worker 0 merges them as it starts: a worker 0 that dies before its 10th write (a crash at a request, " ..
     "again and again) left one file a death, for good", function()
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    for i = 1, 12 do
      helpers.write(dir .. ("/d-0-%d.prom"):format(700 + i), "# HELP t_total Things\n# TYPE t_total counter\n" ..
        ('t_total{k="a"} %d\n'):format(i) .. "# HELP g Queue\n# TYPE g gauge\ng 50\n")
    end
    local r = helpers.run_script([[
      local m = require("resil").metrics
      m.counter("t_total", "Things"):inc({ k = "a" }, 1000)
      m.shard({ dir = arg[1], slot = 0 })
      io.write(m.scrape())
      os.exit(0, false) -- (it dies before its first tick)
    ]], "--store " .. helpers.tmpname(".db"), dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1078, value(r.stdout, 't_total{k="a"}'), r.stdout) -- (1000 and 1 + ... + 12)
    assert.is_nil(value(r.stdout, "g"), r.stdout)
    local left = sh("ls " .. dir).stdout
    local _, dead = left:gsub("d%-", "")
    assert.are.equal(1, dead, left)
  end)
end)
