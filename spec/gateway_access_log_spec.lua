-- The gateway's access log: one "access" line per request at info, naming what an operator
-- looks for (the key, the model asked for, the route, the status, what served it, what it cost,
-- how long it took, and the request_id its client got), written as the answer is made, and for
-- a streamed reply as its stream ends (ended, cut, or its client gone). None with
-- access_log = false, or at a log level above info.
local resil = require "resil"
local helpers = require "spec.helpers"
local json = resil.json

local MINI = "openai/gpt-4o-mini"

local function start(conf, scenario)
  resil.clock.real()
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start(scenario or {}))
  local options = { models = {}, auth = true, key_cache = 0 }
  for k, v in pairs(conf or {}) do options[k] = v end
  local url = helpers.gateway_for_mock(m, options, finally)
  return url, assert(require("resil.keys").add({ name = "team-a" }))
end

local function chat(url, key, body, timeout)
  body.messages = body.messages or { { role = "user", content = "hello" } }
  return { method = "POST", url = url .. "/v1/chat/completions", timeout = timeout or 20, body = json.encode(body),
    headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } }
end

local function access_lines(lines)
  local got = {}
  for _, l in ipairs(lines) do if l.msg == "access" then got[#got + 1] = l end end
  return got
end

-- the log's lines, read until fn's access lines are all there (a stream's is written as its task ends)
local function logged_until(n, fn)
  local path = helpers.tmpname(".log")
  resil.log.output(path)
  local ok, err = pcall(function()
    fn()
    helpers.wait_until(function()
      local k = 0
      for line in helpers.slurp(path):gmatch("[^\n]+") do if json.decode(line).msg == "access" then k = k + 1 end end
      return k >= n
    end, 10)
  end)
  resil.log.output("stderr")
  local lines = {}
  for line in helpers.slurp(path):gmatch("[^\n]+") do lines[#lines + 1] = json.decode(line) end
  os.remove(path)
  assert(ok, err)
  return access_lines(lines)
end

describe("the gateway's access log", function()
  it("writes one line per answer: key, model, route, status, provider, attempts, cost, duration, request_id", function()
    local url, key = start()
    local res
    local got = logged_until(1, function()
      res = assert(resil.http.request(chat(url, key, { model = MINI, max_tokens = 16 })))
    end)
    assert.are.equal(200, res.status)
    assert.are.equal(1, #got)
    local a = got[1]
    assert.are.same({ "POST", "/v1/chat/completions", "/v1/chat/completions", 200, "team-a", MINI, "openai" },
      { a.method, a.path, a.route, a.status, a.key, a.model, a.provider })
    assert.are.equal(res.headers["x-request-id"], a.request_id)
    assert.are.equal(res.headers["x-resil-model"], a.served_model)
    assert.are.equal(1, a.attempts)
    assert.are.equal(tonumber(res.headers["x-resil-cost-usd"]), a.cost_usd)
    assert.is_true(a.cost_usd > 0)
    assert.are.equal(#res.body, a.bytes)
    assert.is_true(type(a.ms) == "number" and a.ms >= 0)
    assert.is_nil(a.stream)
  end)

  it("writes a refusal's line with its status, and a request without a key has none", function()
    local url, key = start()
    local got = logged_until(3, function()
      assert(resil.http.request(chat(url, "sk-resil-not-a-key", { model = MINI })))
      assert(resil.http.request(chat(url, key, { model = "nobody/none" })))
      assert(resil.http.request({ url = url .. "/health" }))
    end)
    assert.are.same({ 401, 404, 200 }, { got[1].status, got[2].status, got[3].status })
    assert.is_nil(got[1].key)
    assert.are.same({ "team-a", "nobody/none" }, { got[2].key, got[2].model })
    assert.are.same({ "GET", "/health" }, { got[3].method, got[3].route })
  end)

  it("writes a stream's line as the stream ends", function()
    local url, key = start()
    local body
    local got = logged_until(1, function()
      local s = assert(resil.http.stream(chat(url, key, { model = MINI, stream = true })))
      local parts = {}
      while true do
        local chunk = s:read()
        if not chunk then break end
        parts[#parts + 1] = chunk
      end
      body = table.concat(parts)
    end)
    assert.truthy(body:find("[DONE]", 1, true))
    assert.are.equal(1, #got)
    assert.are.same({ 200, "ended", "team-a", MINI, "openai" }, { got[1].status, got[1].stream, got[1].key,
      got[1].model, got[1].provider })
  end)

  it("names the provider's own request id (its x-request-id), answered, streamed or embedded", function()
    -- (what the provider's support asks for: before, no log, header or row of the gateway had it)
    local url, key = start()
    local got = logged_until(3, function()
      assert.are.equal(200, assert(resil.http.request(chat(url, key, { model = MINI }))).status)
      local s = assert(resil.http.stream(chat(url, key, { model = MINI, stream = true })))
      while s:read() do end
      local e = chat(url, key, { model = "openai/text-embedding-3-small", input = "hello" })
      e.url = url .. "/v1/embeddings"
      assert.are.equal(200, assert(resil.http.request(e)).status)
    end)
    assert.are.equal(3, #got)
    local seen = {}
    for _, a in ipairs(got) do
      assert.matches("^req_mock", a.upstream_request_id) -- (the mock's, not the gateway's own request_id)
      assert.are_not.equal(a.request_id, a.upstream_request_id)
      assert.is_nil(seen[a.upstream_request_id])
      seen[a.upstream_request_id] = true
    end
  end)

  it("names what served a long stream kept alive, whose headers went before it was known", function()
    -- (an Anthropic client with a tool, served by OpenAI: read whole, its reply started at 15 s)
    local url, key = start(nil, { strict = true, reply = ("word "):rep(200), stream_interval = 0.5 })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local got = logged_until(1, function()
      local s = assert(resil.http.stream({ method = "POST", url = url .. "/v1/messages", timeout = 120,
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json",
          ["anthropic-version"] = "2023-06-01" },
        body = json.encode({ model = MINI, max_tokens = 300, stream = true,
          messages = { { role = "user", content = "hello" } }, tool_choice = { type = "any" },
          tools = { { name = "save", input_schema = { type = "object", properties = { text = { type = "string" } } } } } }) }))
      assert.is_nil(s.headers["x-resil-provider"]) -- (not known when they went)
      while s:read() do end
    end)
    assert.are.equal(1, #got)
    assert.are.same({ "ended", "openai", "gpt-4o-mini", 1 },
      { got[1].stream, got[1].provider, got[1].served_model, got[1].attempts })
  end)

  it("says failed, with the error's kind, for a stream an upstream's bad event ended", function()
    local function chunk(delta)
      return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, delta = delta, finish_reason = json.null } } }) .. "\n\n"
    end
    local url, key = start(nil, { routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        chunks = { chunk({ role = "assistant", content = "" }), chunk({ content = "hello " }), "data: []\n\n" } }
    end } })
    local body
    local got = logged_until(1, function()
      local s = assert(resil.http.stream(chat(url, key, { model = MINI, stream = true })))
      local parts = {}
      while true do
        local chunk_text = s:read()
        if not chunk_text then break end
        parts[#parts + 1] = chunk_text
      end
      body = table.concat(parts)
    end)
    assert.is_nil(body:find("[DONE]", 1, true))
    assert.are.equal(1, #got)
    assert.are.same({ 200, "failed", "stream_interrupted" }, { got[1].status, got[1].stream, got[1].error })
  end)

  it("says client_left for a stream whose client hung up mid-way", function()
    local url, key = start(nil, { faults = { { route = "chat", kind = "stall", after = 2 } } })
    local got = logged_until(1, function()
      local s = assert(resil.http.stream(chat(url, key, { model = MINI, stream = true })))
      assert(s:read())
      s:close()
    end)
    assert.are.equal(1, #got)
    assert.are.same({ 200, "client_left" }, { got[1].status, got[1].stream })
  end)

  it("writes a 499 for a client that gave up before its answer", function()
    local url, key = start(nil, { latency = 1 })
    local got = logged_until(1, function()
      local res, err = resil.http.request(chat(url, key, { model = MINI }, 0.3))
      assert.is_nil(res)
      assert.are.equal("timeout", err.kind)
    end)
    assert.are.equal(1, #got)
    assert.are.same({ 499, "team-a", MINI }, { got[1].status, got[1].key, got[1].model })
  end)

  it("cuts a hostile path to 512 bytes, and a model refused as too long to 256", function()
    local url, key = start()
    local got = logged_until(2, function()
      assert(resil.http.request({ url = url .. "/" .. ("x"):rep(4000) }))
      assert.are.equal(400, assert(resil.http.request(chat(url, key, { model = ("m"):rep(100000) }))).status)
    end)
    assert.are.equal(404, got[1].status)
    assert.are.equal(512 + 3, #got[1].path)
    assert.are.equal("other", got[1].route)
    assert.are.equal(400, got[2].status)
    assert.are.equal(256 + 3, #got[2].model)
  end)

  it("writes none with access_log = false, nor at the warn level", function()
    local url, key = start({ access_log = false })
    local lines = helpers.logged(function()
      assert.are.equal(200, assert(resil.http.request(chat(url, key, { model = MINI }))).status)
    end)
    assert.are.equal(0, #access_lines(lines))
    local gateway = require "policies.gateway"
    gateway.config.access_log = true
    lines = helpers.logged(function()
      resil.log.level("warn")
      assert.are.equal(200, assert(resil.http.request(chat(url, key, { model = MINI }))).status)
      resil.log.level("info")
    end)
    assert.are.equal(0, #access_lines(lines))
  end)

  it("refuses an access_log that is not a boolean", function()
    local gateway = helpers.fresh_gateway()
    local ok, err = pcall(gateway.configure, { access_log = "yes" }, "gw.lua")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("access_log must be true or false", 1, true))
  end)
end)
