-- Metrics wired to the command: --metrics-addr serves GET /metrics for the
-- life of a run (pipeline or mock), --metrics-file writes the textfile every
-- 15 s and at exit; the standard set over the primitives; label values
-- bounded. What promtool (Debian's prometheus package) says about it.
local resil = require "resil"
local helpers = require "spec.helpers"

local function sh(cmd) return helpers.run(cmd) end
local has_promtool = os.execute("command -v promtool > /dev/null 2>&1") == true

-- promtool check metrics on a text, and the strict check (spec/prom_strict.lua): -> ok, what they said
local function promtool_ok(text)
  local problems = require("spec.prom_strict")(text)
  if #problems > 0 then return false, table.concat(problems, "\n") end
  local path = helpers.write(helpers.tmpname(".prom"), text)
  local r = sh("promtool check metrics < " .. path)
  os.remove(path)
  return r.code == 0 and r.stdout == "" and r.stderr == "", r.stdout .. r.stderr
end

-- the value of one series in an exposition (nil when absent)
local function value(text, series)
  local v = text:match("\n" .. series:gsub("%p", "%%%0") .. " (%S+)\n")
  return v and tonumber(v)
end

-- A pipeline through policies.call against an in-process mock that answers
-- 429, 500, then ok, with a breaker, bucket and bulkhead; it writes the
-- mock's counts to arg[1] and waits for arg[2] to appear before it ends.
local pipeline = [[
local resil = require "resil"
local call = require "policies.call"
local m = resil.mock.start({ sequence = { chat = { 429, 500, "ok", 429 } } })
local p = call.provider("mockai", {
  request = { method = "POST", url = m.url .. "/v1/chat/completions" },
  retry = { base = 0, cap = 0 },
  breaker = { failure_rate = 0.9, min_calls = 100, window = 30, open_for = 30 },
  rate = { rate = 1000, per = 1, burst = 1000 },
  concurrency = { size = 4 },
})
local b = resil.budget("team", { limit = 10, per = "day" })
for i = 1, 5 do
  local t = assert(b:reserve(0.01))
  local res = assert(p{ json = { model = "mock-1", messages = { { role = "user", content = "hi " .. i } } } })
  local usage = resil.json.decode(res.body).usage
  t:settle(0.002, { provider = "mockai", model = "mock-1",
    units = { input_tokens = usage.prompt_tokens, output_tokens = usage.completion_tokens } })
end
resil.once("k", function() return 1 end)
resil.once("k", function() return 1 end)
local st = m:stats()
local f = assert(io.open(arg[1], "w"))
f:write(st.total, " ", st.statuses["200"] or 0, " ", st.statuses["429"] or 0, " ", st.statuses["500"] or 0, "\n")
f:close()
while not io.open(arg[2]) do resil.sleep(0.01) end
]]

describe("--metrics-addr and --metrics-file on a pipeline", function()
  it("a scrape during the run equals what the mock counted, and promtool passes on it and on the file", function()
    local port, counts, go = helpers.free_port(), helpers.tmpname(".counts"), helpers.tmpname(".go")
    local file = helpers.tmpname(".prom")
    local pid, out = helpers.start(pipeline, ("--store %s --log-level warn --metrics-addr 127.0.0.1:%d " ..
      "--metrics-file %s"):format(helpers.tmpname(".db"), port, file), counts .. " " .. go)
    assert(helpers.wait_until(function() return helpers.slurp(counts):match("\n") ~= nil end, 20), helpers.slurp(out))
    local total, ok200, r429, r500 = helpers.slurp(counts):match("(%d+) (%d+) (%d+) (%d+)")
    local res = assert(resil.http.request({ url = ("http://127.0.0.1:%d/metrics"):format(port) }))
    helpers.write(go, "")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
    assert.are.equal(200, res.status)
    local text = res.body
    -- attempts by outcome class equal the mock's answers
    assert.are.equal(8, tonumber(total))
    assert.are.equal(tonumber(ok200), value(text, 'resil_calls_total{outcome="ok",provider="mockai"}'))
    assert.are.equal(tonumber(r429), value(text, 'resil_calls_total{outcome="rate_limited",provider="mockai"}'))
    assert.are.equal(tonumber(r500), value(text, 'resil_calls_total{outcome="server_error",provider="mockai"}'))
    assert.are.equal(tonumber(r429) + tonumber(r500),
      value(text, 'resil_retries_total{class="rate_limited",provider="mockai"}') +
      value(text, 'resil_retries_total{class="server_error",provider="mockai"}'))
    -- the primitives' state and the spend
    assert.are.equal(1, value(text, 'resil_breaker_state{breaker="mockai",state="closed"}'))
    assert.are.equal(0, value(text, 'resil_breaker_state{breaker="mockai",state="open"}'))
    assert.are.equal(0, value(text, 'resil_semaphore_waiting{semaphore="mockai"}'))
    assert.are.equal(0, value(text, 'resil_bucket_refusals_total{bucket="mockai:requests"}'))
    assert.are.equal(1, value(text, "resil_once_replays_total"))
    assert.are.equal(0.01, value(text, 'resil_cost_usd_total{model="mock-1",provider="mockai"}'))
    assert.are.equal(5, value(text, 'gen_ai_client_token_usage_count{gen_ai_provider_name="mockai",gen_ai_request_model="mock-1",' ..
      'gen_ai_system="mockai",gen_ai_token_type="input"}'))
    assert.are.equal(tonumber(ok200), value(text, 'gen_ai_client_operation_duration_seconds_count{' ..
      'gen_ai_operation_name="chat",gen_ai_provider_name="mockai",gen_ai_request_model="mock-1",gen_ai_system="mockai"}'))
    assert.are.equal(tonumber(r429), value(text, 'gen_ai_client_operation_duration_seconds_count{' ..
      'error_type="rate_limited",gen_ai_operation_name="chat",gen_ai_provider_name="mockai",gen_ai_request_model="mock-1",gen_ai_system="mockai"}'))
    assert.are.equal(10, value(text, 'resil_budget_limit_usd{budget="team"}'))
    assert.truthy(value(text, 'resil_budget_spent_usd{budget="team"}'))
    if not has_promtool then
      pending("promtool is not installed (Debian: apt-get install prometheus, or make deps)")
      return
    end
    assert(promtool_ok(text))
    local final = helpers.slurp(file)
    assert(promtool_ok(final))
    assert.are.equal(5, value(final, 'resil_calls_total{outcome="ok",provider="mockai"}'))
    assert.are.same({}, (function()
      local left = {}
      for name in io.popen("ls " .. file .. ".*.tmp 2>/dev/null"):lines() do left[#left + 1] = name end
      return left
    end)()) -- written whole, then renamed: no temporary left behind
  end)

  it("writes the file every 15 s while the run lasts, and at exit", function()
    local file = helpers.tmpname(".prom")
    local r = helpers.run_script([[
local resil = require "resil"
local c = resil.metrics.counter("spec_ticks_total", "Ticks")
c:inc()
resil.sleep(16)
local f = io.open(arg[1]); local text = f:read("a"); f:close()
print(text:match("spec_ticks_total (%d+)"))
c:inc()
]], "--virtual-clock --metrics-file " .. file, file)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\n", r.stdout) -- written at 15 s
    assert.matches("\nspec_ticks_total 2\n", helpers.slurp(file)) -- and at exit
  end)

  it("refuses an address it cannot serve on, before the script runs", function()
    local r = sh(helpers.resil .. " --metrics-addr nonsense -e 'print(1)'")
    assert.are.equal(1, r.code)
    assert.matches("%-%-metrics%-addr: 'nonsense' is not HOST:PORT", r.stderr)
    assert.are.equal("", r.stdout)
    r = sh(helpers.resil .. " --metrics-file /nonexistent/dir/m.prom -e 'print(1)'")
    assert.are.equal(1, r.code)
    assert.matches("%-%-metrics%-file", r.stderr)
  end)

  it("serves /metrics for the life of a standalone mock", function()
    local port, mport = helpers.free_port(), helpers.free_port()
    local pidfile, out = helpers.tmpname(".pid"), helpers.tmpname(".out")
    os.execute(("%s mock --port %d --metrics-addr 127.0.0.1:%d > %s 2>&1 & echo $! > %s"):format(helpers.resil, port,
      mport, out, pidfile))
    local mock_pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") ~= nil end, 10))
    local res = resil.http.request({ url = ("http://127.0.0.1:%d/metrics"):format(mport) })
    os.execute("kill " .. mock_pid)
    assert(helpers.wait_until(function() return not helpers.alive(mock_pid) end, 10))
    assert.are.equal(200, res and res.status)
    assert.matches("# TYPE resil_metrics_series_dropped_total counter", res.body)
  end)

  -- (a mock ends only by a signal, which killed it where it stood: its file kept the counts of its
  -- last 15-s write, none of a short test's, and the README's "once more at exit" never came)
  it("a standalone mock stopped by SIGTERM or SIGINT writes its --metrics-file a last time, 143/130", function()
    local scenario = helpers.write(helpers.tmpname("-scenario.lua"), [[
local seen = require("resil").metrics.counter("scenario_requests_total", "Requests the scenario saw")
return { on_request = function() seen:inc() end }
]])
    for _, stop in ipairs({ { "TERM", 143 }, { "INT", 130 } }) do
      local file, pidfile, out = helpers.tmpname(".prom"), helpers.tmpname(".pid"), helpers.tmpname(".out")
      os.execute(("(%s mock %s --metrics-file %s > %s 2>&1; echo \"exit $?\" >> %s) & echo $! > %s"):format(
        helpers.resil, scenario, file, out, out, pidfile))
      local shell_pid = helpers.slurp(pidfile):match("%d+")
      assert(helpers.wait_until(function() return helpers.slurp(out):match("http://[%d.:]+") ~= nil end, 10))
      local url = helpers.slurp(out):match("http://[%d.:]+")
      for _ = 1, 3 do assert(resil.http.request({ url = url .. "/v1/models" })) end
      local mock_pid = helpers.run("pgrep -P " .. shell_pid).stdout:match("%d+")
      os.execute(("kill -%s %s"):format(stop[1], mock_pid))
      assert(helpers.wait_until(function() return helpers.slurp(out):match("exit %d+") ~= nil end, 10))
      assert.matches("exit " .. stop[2], helpers.slurp(out))
      assert.matches("\nscenario_requests_total 3\n", helpers.slurp(file) or "")
    end
  end)
end)

describe("label values are bounded", function()
  -- (policies.call bound each model's duration series once and kept it for good: a gateway whose
  -- clients named a million models grew by each)
  it("a provider called with thousands of made-up model names keeps its memory bounded", function()
    local r = helpers.run_script([[
local resil = require "resil"
local call = require "policies.call"
local m = resil.mock.start({ reply = "ok" })
local p = call.provider("mockai", { request = { method = "POST", url = m.url .. "/v1/chat/completions" } })
local function flood(from, to)
  for i = from, to do assert(p{ json = { model = "made-up-" .. i, messages = { { role = "user", content = "hi" } } } }) end
end
flood(1, 1200)
collectgarbage()
collectgarbage()
local before = collectgarbage("count")
flood(1201, 6200)
collectgarbage()
collectgarbage()
print(math.floor(collectgarbage("count") - before))
m:stop()
]], "--store " .. helpers.tmpname(".db") .. " --log-level error")
    assert.are.equal(0, r.code, r.stderr)
    assert.is_true(tonumber(r.stdout) < 256, r.stdout .. " KB more for 5000 more models")
  end)

  it("a flood of label values keeps at most max_series series, counts the rest and warns once", function()
    local log = helpers.tmpname(".log")
    local r = helpers.run_script([[
local resil = require "resil"
resil.metrics.max_series = 50
local c = resil.metrics.counter("spec_flood_total", "Flood")
local h = resil.metrics.histogram("spec_flood_seconds", "Flood", { max_series = 5 })
for i = 1, 5000 do
  c:inc({ user = "u" .. i })
  c:labels({ user = "v" .. i }):inc()
  h:observe({ user = "u" .. i }, 1)
end
c:inc({ user = "u1" }) -- a series already kept still counts
local text = resil.metrics.text()
local n = select(2, text:gsub("\nspec_flood_total{", ""))
local hn = select(2, text:gsub("\nspec_flood_seconds_count{", ""))
print(n, hn, text:match('spec_flood_total{user="u1"} (%d+)'),
  text:match('resil_metrics_series_dropped_total{metric="spec_flood_total"} (%d+)'),
  text:match('resil_metrics_series_dropped_total{metric="spec_flood_seconds"} (%d+)'), collectgarbage("count") < 20000)
]], "--log-file " .. log)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("50\t5\t2\t9950\t4995\ttrue\n", r.stdout)
    local warnings = select(2, helpers.slurp(log):gsub("too many label sets", ""))
    assert.are.equal(2, warnings) -- one per metric
  end)
end)

describe("label values and help that are not UTF-8", function()
  it("are written with U+FFFD, so the exposition still passes promtool", function()
    if not has_promtool then
      pending("promtool is not installed (Debian: apt-get install prometheus, or make deps)")
      return
    end
    -- a model name cut mid-character, a latin-1 user name: one such value
    -- made Prometheus refuse the whole scrape
    local c = resil.metrics.counter("spec_bad_utf8_total", "Calls by caf\xe9 model")
    c:inc({ model = "gpt-4o-\xe2\x82", user = "Jos\xe9" })
    c:inc({ model = "ol\xc3\xa9", user = "ok" })
    local text = resil.metrics.text()
    assert(promtool_ok(text))
    assert.truthy(text:find('spec_bad_utf8_total{model="gpt-4o-\u{FFFD}\u{FFFD}",user="Jos\u{FFFD}"} 1', 1, true))
    assert.truthy(text:find('spec_bad_utf8_total{model="ol\xc3\xa9",user="ok"} 1', 1, true)) -- UTF-8 kept
    assert.truthy(text:find("# HELP spec_bad_utf8_total Calls by caf\u{FFFD} model\n", 1, true))
  end)
end)

-- A budget's gauges with `gateway --workers 2`: a scrape reaches either worker (one port), and each
-- reports the store's figures for the key's budget, another process's spend included. Before, each
-- showed its own last view: two values for one budget, in turn, neither the store's. On SQLite
-- and a real redis-server.
for _, b in ipairs(helpers.store_backends()) do
  describe("gateway --workers 2 on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)

    it("every worker's budget gauges are the store's figures", function()
      local json = resil.json
      resil.clock.real()
      resil.log.level("off")
      local m = assert(resil.mock.start({ strict = true, reply = "served" }))
      local url, port, log, pidfile = b.url(), helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
      local add = sh(("%s keys add --name team --budget 50/day --store '%s'"):format(helpers.resil, url))
      assert.are.equal(0, add.code, add.stderr)
      local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
      -- (each worker names itself in its metrics: which one a scrape reached; merged over the
      -- workers as the budget gauges are, the one that read its figures last, the one answering)
      local config = helpers.write(helpers.tmpname(".lua"), ([[
        local f = assert(io.open("/proc/self/stat"))
        require("resil").metrics.gauge("spec_worker_pid", "The worker's pid", { merge = "mostrecent" })
          :set(nil, f:read("n"))
        f:close()
        require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
        return { key_cache = 0 }
      ]]):format(m.url .. "/v1"))
      os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store '%s' > %s 2>&1 & echo $! > %s")
        :format(helpers.resil, port, config, url, log, pidfile))
      local pid = helpers.slurp(pidfile):match("%d+")
      finally(function()
        local kids = helpers.slurp(("/proc/%s/task/%s/children"):format(pid, pid))
        os.execute("kill -KILL " .. pid)
        for p in kids:gmatch("%d+") do os.execute("kill -KILL " .. p) end
        m:stop()
        resil.log.level("info")
      end)
      assert.is_true(helpers.wait_until(function()
        return select(2, helpers.slurp(log):gsub("listening", "")) == 2
      end, 20), helpers.slurp(log))
      -- calls until each worker has served one (a request id's prefix is its process's)
      local served = {}
      for _ = 1, 60 do
        local res = assert(resil.http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
          headers = { ["content-type"] = "application/json", authorization = "Bearer " .. key, connection = "close" },
          body = json.encode({ model = "gpt-4o-mini", max_tokens = 10, messages = { { role = "user", content = "hi" } } }) }))
        assert.are.equal(200, res.status, res.body)
        served[res.headers["x-request-id"]:sub(1, 16)] = true
        if select(2, next(served)) and next(served, next(served)) then break end
      end
      assert.is_truthy(next(served, next(served)), "one worker served every call")
      -- another process spends in the key's budget
      local r = helpers.run_script([[
local t = assert(require("resil").budget("key:team", { limit = 50, per = "day" }):reserve(2))
assert(t:settle(1.25, { provider = "p", model = "m" }))
]], "--store '" .. url .. "'")
      assert.are.equal(0, r.code, r.stderr)
      local show = sh(("%s budgets show key:team --json --store '%s'"):format(helpers.resil, url))
      local store = json.decode(show.stdout)
      assert.is_true(store.spent > 1.25, show.stdout)
      -- scrapes (a connection each) until both workers answered one
      local by_worker = {}
      for _ = 1, 60 do
        local text = sh(("curl -s http://127.0.0.1:%d/metrics"):format(port)).stdout
        local worker = text:match("\nspec_worker_pid (%S+)\n")
        local function gauge(g) return tonumber(text:match("\n" .. g .. '{budget="key:team"} (%S+)\n')) end
        by_worker[assert(worker, text)] = { gauge("resil_budget_spent_usd"), gauge("resil_budget_reserved_usd"),
          gauge("resil_budget_remaining_usd"), gauge("resil_budget_limit_usd") }
        if select(2, next(by_worker)) and next(by_worker, next(by_worker)) then break end
      end
      assert.is_truthy(next(by_worker, next(by_worker)), "every scrape reached one worker")
      for worker, figures in pairs(by_worker) do
        assert.are.same({ store.spent, store.reserved, store.remaining, store.limit }, figures, "worker " .. worker)
      end
    end)
  end)
end
