-- The host's own metrics under the sandbox (--sandbox, gateway --sandbox), against a script that
-- runs before the policies load: one that replaced resil.metrics.counter (or the whole
-- resil.metrics, or `require`), set resil.metrics.max_series = 0, or replaced
-- resil.metrics.scrape left the host's series (resil_calls_total, the gateway's) undefined,
-- dropped, or out of what /metrics and --metrics-file answer: an operator's alerts went blind.
-- Outside the sandbox resil.metrics.max_series is still the script's to set to anything.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local function lines_of(s)
  local out = {}
  for l in s:gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

-- (a fake metric: every method does nothing)
local FAKE = [[
local fake = setmetatable({}, { __index = function() return function() return nil end end })
]]

-- the script's last lines: one chat through a mock provider of its own (a loopback server in its
-- process), then what the host's exposition holds
local CHAT_AND_REPORT = [[
local ai = require "policies.ai"
local mock = assert(resil.mock.start({ reply = "served" }))
ai.configure("openai", { base_url = mock.url .. "/v1", api_key = "sk-test-123456", retry = { max_retries = 0 } })
local res = ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } })
print(res and res.text or "no answer")
local text = resil.metrics.text()
for _, name in ipairs({ "resil_calls_total", "resil_call_seconds", "gen_ai_client_operation_duration_seconds",
  "resil_retries_total", "resil_model_not_found_total" }) do
  print(name, text:match("# TYPE " .. name .. " ") ~= nil)
end
print(text:match('resil_calls_total{[^}]*outcome="ok"[^}]*} 1\n') ~= nil)
mock:stop()
]]

local function run_sandboxed(body)
  local r = helpers.run_script(FAKE .. body .. CHAT_AND_REPORT, "--sandbox")
  os.remove(r.path)
  assert.are.equal(0, r.code, r.stdout .. r.stderr)
  return lines_of(r.stdout), r
end

local function assert_defined_and_counted(l)
  assert.are.equal("served", l[#l - 6])
  for i = #l - 5, #l - 1 do assert.matches("\ttrue$", l[i]) end
  assert.are.equal("true", l[#l])
end

describe("--sandbox and the host's own metrics", function()
  it("defines and counts the policies' metrics though a script replaced resil.metrics.counter first", function()
    local l = run_sandboxed([[
local resil = require "resil"
local real = {}
for _, kind in ipairs({ "counter", "gauge", "histogram" }) do
  real[kind] = resil.metrics[kind]
  resil.metrics[kind] = function(name, ...)
    if name:match("^resil_") or name:match("^gen_ai_") then return fake end
    return real[kind](name, ...)
  end
end
require "policies.ai"
for kind, fn in pairs(real) do resil.metrics[kind] = fn end
]])
    assert_defined_and_counted(l)
  end)

  it("and though it replaced the whole resil.metrics, or require's resil", function()
    local l = run_sandboxed([[
local resil = require "resil"
local metrics = resil.metrics
resil.metrics = setmetatable({ counter = function() return fake end, histogram = function() return fake end,
  gauge = function() return fake end }, { __index = metrics })
-- (a resil table of its own for every policy's require "resil")
local real_require = require
local forged = setmetatable({ metrics = resil.metrics }, { __index = resil })
require = function(name, ...) if name == "resil" then return forged end return real_require(name, ...) end
require "policies.ai"
resil.metrics, require = metrics, real_require
]])
    assert_defined_and_counted(l)
  end)

  it("keeps the host's metrics' 1000 series though a script set max_series lower, which bounds its own", function()
    local l, r = run_sandboxed([[
local resil = require "resil"
resil.metrics.max_series = 0
print(pcall(function() resil.metrics.max_series = "a lot" end))
resil.metrics.max_series = 1
print(resil.metrics.max_series)
-- (a script's own metrics keep the bound it set)
local mine = resil.metrics.counter("app_jobs_total", "jobs")
mine:inc({ job = "a" })
mine:inc({ job = "b" })
print(mine:value({ job = "a" }), mine:value({ job = "b" }))
]])
    local name = r.path:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches("^false\t.-" .. name .. ":4: resil%.metrics%.max_series must be a number", l[1])
    assert.are.equal("1", l[2])
    assert.are.equal("1\t0", l[3])
    assert_defined_and_counted(l)
  end)

  it("outside the sandbox max_series is the script's to set, the host's metrics' bound too", function()
    local r = helpers.run_script([[
local resil = require "resil"
resil.metrics.max_series = 0
print(resil.metrics.max_series)
local m = resil.metrics.counter("resil_calls_total")
m:inc({ provider = "x", outcome = "ok" })
print(m:value({ provider = "x", outcome = "ok" }))
]])
    os.remove(r.path)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "0", "0" }, lines_of(r.stdout))
  end)

  it("writes the host's exposition to --metrics-file though a script replaced resil.metrics.scrape", function()
    local file = helpers.tmpname(".prom")
    local r = helpers.run_script([[
local resil = require "resil"
resil.metrics.scrape = function() return "forged 1\n" end
resil.metrics.text = function() return "forged 1\n" end
]], "--sandbox --metrics-file " .. file)
    os.remove(r.path)
    assert.are.equal(0, r.code, r.stderr)
    local text = helpers.slurp(file)
    os.remove(file)
    assert.is_nil(text:match("forged"))
    assert.matches('resil_reloads_total{result="ok"} 0', text, 1, true)
  end)

  -- (before: the last write was main.c's call of resil.metrics.finish, the scripts' to replace)
  it("writes --metrics-file at the end though a script replaced resil.metrics.finish", function()
    local file = helpers.tmpname(".prom")
    local r = helpers.run_script([[
local resil = require "resil"
resil.metrics.counter("app_jobs_total", "jobs"):inc()
resil.metrics.finish = function() end
]], "--sandbox --metrics-file " .. file)
    os.remove(r.path)
    assert.are.equal(0, r.code, r.stderr)
    local text = helpers.slurp(file) or ""
    os.remove(file)
    assert.matches("app_jobs_total 1", text, 1, true)
  end)
end)

describe("gateway --sandbox and the host's own metrics", function()
  it("serves the gateway's and the calls' series on GET /metrics though its config replaced the constructors and scrape",
    function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ reply = "served" }))
    finally(function() m:stop() end)
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name team --store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    local config = helpers.write(dir .. "/gateway_conf.lua", FAKE .. ([[
local resil = require "resil"
for _, kind in ipairs({ "counter", "gauge", "histogram" }) do
  local real = resil.metrics[kind]
  resil.metrics[kind] = function(name, ...)
    if name:match("^resil_") or name:match("^gen_ai_") then return fake end
    return real(name, ...)
  end
end
resil.metrics.scrape = function() return "# all quiet\n" end
require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
return { key_cache = 0 }
]]):format(m.url .. "/v1"))
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --sandbox --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, config, db, log, pidfile))
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert(helpers.wait_until(function()
      return helpers.slurp(log):match("listening") ~= nil or not helpers.alive(pid)
    end, 10), helpers.slurp(log))
    local base = ("http://127.0.0.1:%d"):format(port)
    local res = assert(http.request({ method = "POST", url = base .. "/v1/chat/completions",
      body = json.encode({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }),
      headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } }))
    assert.are.equal(200, res.status, res.body .. helpers.slurp(log))
    res = assert(http.request({ url = base .. "/metrics" }))
    assert.are.equal(200, res.status, res.body)
    assert.matches('resil_gateway_requests_total{[^}]*status="200"[^}]*} 1\n', res.body)
    assert.matches('resil_calls_total{[^}]*outcome="ok"[^}]*} 1\n', res.body)
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)
end)
