-- The gateway on a bad production day (policies/gateway.lua, the default
-- SQLite store): Idempotency-Key copies and misuse while a call is upstream,
-- with a real mock provider on loopback.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local fresh_gateway = helpers.fresh_gateway

-- a mock, a gateway in front of it (no keys), a fresh store; -> the gateway's url, the mock
local function start(scenario)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start(scenario))
  local gateway, ai = fresh_gateway()
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  local fast = { base = 0.001, cap = 0.005 } -- retries without waiting
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = fast })
  gateway.configure({ models = {}, auth = false, key_cache = 0 })
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    s:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), m
end

local function post(url, body, headers, timeout)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return http.request({ method = "POST", url = url, headers = h, body = json.encode(body), timeout = timeout })
end

describe("gateway on a bad day: Idempotency-Key", function()
  -- (before: the other body waited in this process for the first call's end, up to 30 s, holding
  -- its client and its key's permit, then got the 422; another worker answered it at once)
  it("another body under a key whose first call is still upstream is a 422 at once, calling no one", function()
    -- the first call's answer takes long: the second is answered while it is upstream
    local url, m = start({ strict = true, faults = { { route = "chat", model = "gpt-4o", latency = 30 } } })
    local h = { ["idempotency-key"] = "same-key" }
    local first = resil.spawn(post, url .. "/v1/chat/completions",
      { model = "openai/gpt-4o", messages = { { role = "user", content = "first" } } }, h, 60)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10)) -- the first is upstream
    local other = post(url .. "/v1/chat/completions",
      { model = "openai/gpt-4o-mini", messages = { { role = "user", content = "other" } } }, h, 20)
    assert.is_truthy(other, "no answer while the first call was upstream")
    assert.are.equal(422, other.status, other.body)
    local e = json.decode(other.body).error
    assert.are.equal("invalid_request_error", e.type)
    -- in the client's words: its header and its body, not the gateway's record of the key (its key id)
    assert.matches("Idempotency-Key", e.message, 1, true)
    assert.is_nil(e.message:find("gateway:", 1, true), e.message)
    assert.are.equal(1, m.server:pending()) -- the first is still upstream
    assert.are.equal(1, m:stats().routes.chat) -- the other called no one
    first:cancel()
  end)
end)

describe("gateway on a bad day: embeddings", function()
  -- (before: the key was not read on /v1/embeddings; each retry was called and billed again)
  it("an SDK's retry with the same Idempotency-Key gets the first vectors again, billed once", function()
    local url, m = start({ strict = true })
    local body = { model = "openai/text-embedding-3-small", input = { ("tides "):rep(2000), "moon" }, dimensions = 4 }
    -- (long enough to cost a micro-dollar or more)
    local h = { ["idempotency-key"] = "emb-1" }
    local a = assert(post(url .. "/v1/embeddings", body, h))
    local b = assert(post(url .. "/v1/embeddings", body, h))
    assert.are.equal(200, a.status, a.body)
    assert.are.equal(200, b.status, b.body)
    assert.are.same(json.decode(a.body).data, json.decode(b.body).data)
    assert.are.equal("true", b.headers["x-resil-replayed"])
    assert.are.equal(1, m:stats().routes.embeddings)
    -- the headers add up to the ledger: one row, the first answer's cost
    assert.is_true(tonumber(a.headers["x-resil-cost-usd"]) > 0)
    assert.are.equal("0.000000", b.headers["x-resil-cost-usd"])
    local by = assert(resil.cost.breakdown("model"))
    assert.are.equal(1, #by)
    assert.are.equal(1, by[1].calls)
    assert.are.equal(a.headers["x-resil-cost-usd"], ("%.6f"):format(resil.cost.total()))
    -- another body under the key is refused, calling no one; a chat under it too (one key, one request)
    body.input = "other"
    assert.are.equal(422, assert(post(url .. "/v1/embeddings", body, h)).status)
    local chat = assert(post(url .. "/v1/chat/completions",
      { model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }, h))
    assert.are.equal(422, chat.status, chat.body)
    assert.are.equal(1, m:stats().routes.embeddings)
    assert.is_nil(m:stats().routes.chat)
  end)
end)

describe("gateway on a bad day: a project's gateway.lua with a bug", function()
  -- `resil-lua gateway` with a config whose handler (a project's own) loops or raises
  -- -> the chat completions URL, the messages URL, the log file, the pid
  local function start_process(m, options)
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      local gateway = require "policies.gateway"
      local handle = gateway.handle
      gateway.handle = function(req)
        local t = req.headers["x-test"]
        if t == "loop" then while true do end end
        if t == "stuck" then return (("a"):rep(200)):find(("a-"):rep(40) .. "c") end
        if t == "nil" then local route = nil; return route.reply end
        return handle(req)
      end
      return { auth = false }
    ]]):format(m.url .. "/v1"))
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s %s > %s 2>&1 & echo $! > %s"):format(
      helpers.resil, port, config, helpers.tmpname(".db"), options or "", log, pidfile))
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    assert(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10), helpers.slurp(log))
    local base = ("http://127.0.0.1:%d"):format(port)
    return base .. "/v1/chat/completions", base .. "/v1/messages", log, pid, config
  end

  local BODY = { model = "openai/gpt-4o-mini", max_tokens = 10, messages = { { role = "user", content = "hi" } } }

  -- (before: the server's own 500, {"type": "error", "error": {"type": "api_error", "message":
  -- "handler error"}} on either API: no code, no Retry-After for a loop the host stopped)
  it("answers each request it fails in its API's shape: a loop stopped by --max-task-seconds is a 503 with " ..
     "Retry-After, a runtime error a 500 internal_error; the log says where; the gateway serves on", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ strict = true, reply = "served" }))
    local chat, messages, log, pid = start_process(m, "--max-task-seconds 0.3")
    local res = assert(post(chat, BODY, { ["x-test"] = "loop" }, 20))
    assert.are.equal(503, res.status, res.body)
    local e = json.decode(res.body).error
    assert.are.equal("gateway_overloaded", e.code)
    assert.are.equal("server_error", e.type)
    assert.are.equal("1", res.headers["retry-after"])
    res = assert(post(chat, BODY, { ["x-test"] = "nil" }))
    assert.are.equal(500, res.status, res.body)
    local b = json.decode(res.body)
    assert.is_nil(b.type) -- OpenAI's shape: {error = {message, type, param, code}}
    assert.are.equal("internal_error", b.error.code)
    assert.are.equal("server_error", b.error.type)
    assert.is_nil(b.error.message:find("nil", 1, true), b.error.message) -- (no Lua in it)
    res = assert(post(messages, BODY, { ["x-test"] = "nil" }))
    assert.are.equal(500, res.status, res.body)
    b = json.decode(res.body)
    assert.are.equal("error", b.type) -- Anthropic's shape
    assert.are.equal("api_error", b.error.type)
    assert.are.equal(200, assert(post(chat, BODY)).status)
    assert.is_true(helpers.alive(pid))
    local text = helpers.slurp(log)
    assert.matches("%.lua:%d+: task %d+ %(.-%) ran %d+%.%d s without yielding", text)
    assert.matches("%.lua:%d+: attempt to index a nil value", text)
    assert.are.equal(1, m:stats().routes.chat)
  end)

  -- (before: the watchdog's hook never fires inside a pattern's matcher, so the worker held its
  -- loop for hours, serving nobody, and its supervisor saw nothing wrong)
  it("a worker stuck outside Lua code (a pattern that backtracks) ends with code 70 and is started again", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ strict = true, reply = "served" }))
    local chat, _, log = start_process(m, "--workers 2 --max-task-seconds 0.3")
    local res = post(chat, BODY, { ["x-test"] = "stuck" }, 120)
    assert.is_true(res == nil or res.status >= 500, res and res.body) -- its connection closed with the worker
    assert(helpers.wait_until(function()
      return helpers.slurp(log):match("worker %d+ exited with code 70; starting another") ~= nil
    end, 120), helpers.slurp(log)) -- (10 s of CPU stuck, on a machine that may be shared)
    local ok
    assert(helpers.wait_until(function()
      local again = post(chat, BODY, nil, 5)
      ok = again and again.status == 200
      return ok
    end, 30), helpers.slurp(log))
    -- (named by the handler it runs, not "[C]": the task's function is the server's own)
    assert.matches('"msg":"task %d+ %([^)]-gateway%.lua:%d+%) ran %d+%.%d s without yielding and did not stop at ' ..
      "%-%-max%-task%-seconds=0%.3: it is stuck outside Lua code", helpers.slurp(log))
  end)

  -- (its hook fires again at each instruction after a catch: the log named the gateway's line
  -- after its catch, not the loop's)
  it("under --max-instructions a loop is the server's 500, logged at the loop's file:line", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ strict = true, reply = "served" }))
    local chat, _, log, pid, config = start_process(m, "--max-instructions 5000000")
    local res = assert(post(chat, BODY, { ["x-test"] = "loop" }, 20))
    assert.are.equal(500, res.status, res.body)
    assert.are.equal(200, assert(post(chat, BODY)).status)
    assert.is_true(helpers.alive(pid))
    local name = config:match("[^/]+$"):gsub("%p", "%%%0")
    assert.matches(name .. ":%d+: task %d+ %(.-%) ran more than %-%-max%-instructions", helpers.slurp(log))
  end)
end)

describe("gateway on a bad day: cost headers", function()
  -- (before: an answer made of several ledger rows, refused attempts and the answer, said their
  -- total rounded once, while the ledger holds each row rounded to a micro-dollar: 40 requests
  -- with half the answers empty said 1204 micro-dollars in their headers, the ledger 1221)
  it("the x-resil-cost-usd headers add up to the ledger, micro-dollar for micro-dollar", function()
    local url, m = start({ strict = true, seed = 7, faults = { { route = "chat", kind = "empty", probability = 0.5 } } })
    local said, multi = 0, 0
    for i = 1, 40 do
      -- prompts of many lengths: rows whose costs have every fraction of a micro-dollar
      local res = assert(post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", max_tokens = 5 + i % 7,
        messages = { { role = "user", content = ("w%d "):format(i):rep(i) } } }))
      local header = res.headers["x-resil-cost-usd"]
      assert.is_truthy(header, res.body)
      said = said + math.floor(tonumber(header) * 1e6 + 0.5)
    end
    local stats = m:stats()
    multi = stats.routes.chat - 40 -- attempts refused as empty: each a row of its own
    assert.is_true(multi > 5, "too few refused attempts to say anything: " .. multi)
    assert.are.equal(math.floor(resil.cost.total() * 1e6 + 0.5), said)
  end)
end)

describe("gateway on a bad day: large embeddings under an Idempotency-Key", function()
  -- (before: the vectors were kept as a table, which resil.once wrote number by number in Lua on
  -- the loop, 0.27 s for 100 vectors of 1,536, with no byte cap counting them)
  it("an answer kept as its text is replayed byte for byte; one over the keep limit is served once, " ..
     "its retry a 409, neither called nor billed again", function()
    local url, m = start({ strict = true })
    local gateway = require "policies.gateway"
    local body = { model = "openai/text-embedding-3-small", input = { "tides", "moon", "sea" }, dimensions = 64 }
    local a = assert(post(url .. "/v1/embeddings", body, { ["idempotency-key"] = "small" }))
    local b = assert(post(url .. "/v1/embeddings", body, { ["idempotency-key"] = "small" }))
    assert.are.equal(200, a.status, a.body)
    assert.are.equal(a.body, b.body)
    assert.are.equal("true", b.headers["x-resil-replayed"])
    -- the record holds the answer's text, not 192 numbers each its own JSON value
    local kept = helpers.backend(assert(resil.store())).db:tx(function(tx)
      return tx:value("SELECT result FROM idempotency WHERE key LIKE '%small'")
    end)
    assert.is_truthy(kept, "no record under the key")
    assert.is_nil(kept:find('"@f"', 1, true), kept:sub(1, 200))

    gateway.config.idempotency_keep_max = #a.body // 2
    local h = { ["idempotency-key"] = "large" }
    local first = assert(post(url .. "/v1/embeddings", body, h))
    assert.are.equal(200, first.status, first.body)
    assert.are.equal(#a.body, #first.body)
    local cost = first.headers["x-resil-cost-usd"]
    local again = assert(post(url .. "/v1/embeddings", body, h))
    assert.are.equal(409, again.status, again.body)
    assert.are.equal("idempotency_answer_not_kept", json.decode(again.body).error.code)
    assert.are.equal("0.000000", again.headers["x-resil-cost-usd"])
    assert.are.equal(2, m:stats().routes.embeddings) -- "small" once, "large" once
    assert.are.equal(("%.6f"):format(resil.cost.total()), ("%.6f"):format(2 * tonumber(cost)))
  end)
end)

describe("gateway on a bad day: /metrics", function()
  -- (its budget series name each key's team and spend: open to anyone who reaches the gateway)
  it("with metrics_key set, GET /metrics answers only its bearer; without, it stays open", function()
    local url = start({ strict = true })
    local gateway = require "policies.gateway"
    local open = assert(http.request({ url = url .. "/metrics" }))
    assert.are.equal(200, open.status)
    gateway.config.metrics_key = "scrape-secret"
    for _, h in ipairs({ {}, { authorization = "Bearer wrong" }, { authorization = "Bearer scrape-secre" } }) do
      local res = assert(http.request({ url = url .. "/metrics", headers = h }))
      assert.are.equal(401, res.status, res.body)
      assert.are.equal("invalid_api_key", json.decode(res.body).error.code)
      assert.is_nil(res.body:find("resil_", 1, true))
    end
    local res = assert(http.request({ url = url .. "/metrics", headers = { authorization = "Bearer scrape-secret" } }))
    assert.are.equal(200, res.status)
    assert.matches("resil_gateway_requests_total", res.body, 1, true)
    gateway.config.metrics_key = nil
  end)
end)

describe("gateway on a bad day: a copy whose client left", function()
  -- (before: a copy waiting for its key's first call, still upstream, held its key's concurrency
  -- permit for resil.once's whole wait, 30 s, after its client had hung up)
  it("gives its key's concurrency permit back once its client has left", function()
    local url, m = start({ strict = true, faults = { { route = "chat", model = "gpt-4o", latency = 30 } } })
    local gateway = require "policies.gateway"
    local keys = require "resil.keys"
    gateway.config.auth, gateway.config.queue = true, 0
    local key = assert(keys.add({ name = "two-at-a-time", concurrency = 2 }))
    local h = { authorization = "Bearer " .. key, ["idempotency-key"] = "slow-one" }
    local slow = { model = "openai/gpt-4o", messages = { { role = "user", content = "slow" } } }
    local first = resil.spawn(post, url .. "/v1/chat/completions", slow, h, 60)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10)) -- the first is upstream
    -- the copy's client gives up after half a second (its SDK's timeout)
    local copy, err = post(url .. "/v1/chat/completions", slow, h, 0.5)
    assert.is_nil(copy)
    assert.are.equal("timeout", err.kind)
    -- the key's second permit is free again: another request of the key is served
    local fast = { model = "openai/gpt-4o-mini", messages = { { role = "user", content = "fast" } } }
    local served = helpers.wait_until(function()
      local res = post(url .. "/v1/chat/completions", fast, { authorization = "Bearer " .. key }, 5)
      return res and res.status == 200
    end, 10)
    assert.is_true(served, "the key's permits stayed held by the copy whose client left")
    assert.are.equal(1, m.server:pending()) -- the first call still upstream, on its own permit
    first:cancel()
  end)
end)
