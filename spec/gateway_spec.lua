-- The gateway (policies/gateway.lua on resil.server with tasks = true): the
-- OpenAI and Anthropic HTTP APIs in front of policies.ai, driven here by real
-- HTTP clients on loopback against the mock provider.
local resil = require "resil"
local helpers = require "spec.helpers"
local streams = require "spec.provider_streams"
local http = resil.http
local json = resil.json

local fresh_gateway = helpers.fresh_gateway

-- a mock, a gateway in front of it, a fresh store; -> gw url, mock, gateway module
local function start(scenario, config)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start(scenario))
  local gateway, ai = fresh_gateway()
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  gateway.configure({ models = {}, auth = true, key_cache = 2 })
  local fast = { base = 0.001, cap = 0.005 } -- retries without waiting
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = fast })
  ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-test-123456", retry = fast })
  gateway.configure({ auth = false, key_cache = 0, models = {
    fast = { model = "openai/gpt-4o-mini", fallback = { "anthropic/claude-sonnet-4-5-20250929" } },
    claude = { model = "anthropic/claude-sonnet-4-5-20250929", fallback = { "openai/gpt-4o-mini" } },
  } })
  for k, v in pairs(config or {}) do gateway.config[k] = v end
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    s:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), m, gateway
end

local MSGS = { { role = "user", content = "hi" } }

local function post(url, body, headers)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return assert(http.request({ method = "POST", url = url, headers = h,
    body = type(body) == "string" and body or json.encode(body) }))
end

-- an SSE reply's events -> list of {event=, data=}, and the error that ended it (nil: a clean end)
local function events_of(url, body, headers)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  local s = assert(http.stream({ method = "POST", url = url, headers = h, body = json.encode(body) }))
  local out = {}
  while true do
    local ev, err = s:read_event()
    if not ev then return out, err, s end
    out[#out + 1] = { event = ev.event, data = ev.data }
  end
end

describe("gateway: OpenAI chat completions", function()
  it("answers in OpenAI's shape with the resil headers", function()
    local url = start({ strict = true, reply = "Tides follow the moon." })
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
    assert.are.equal(200, res.status)
    local b = json.decode(res.body)
    assert.are.equal("chat.completion", b.object)
    assert.are.equal("Tides follow the moon.", b.choices[1].message.content)
    assert.are.equal("stop", b.choices[1].finish_reason)
    assert.is_true(b.usage.total_tokens > 0)
    assert.are.equal("openai", res.headers["x-resil-provider"])
    assert.are.equal("gpt-4o-mini", res.headers["x-resil-model"])
    assert.are.equal("1", res.headers["x-resil-attempts"])
    assert.is_true(tonumber(res.headers["x-resil-cost-usd"]) > 0)
    assert.matches("^req_", res.headers["x-request-id"])
  end)

  it("a client's traceparent continues into the provider call (the attempt is a child of the client's span)",
    function()
      local seen = {}
      local url = start({ routes = { ["POST /v1/chat/completions"] = function(req)
        seen[#seen + 1] = req.headers.traceparent or "-"
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
          id = "chatcmpl-t", object = "chat.completion", created = 1, model = "gpt-4o-mini",
          choices = { { index = 0, message = { role = "assistant", content = "ok" }, finish_reason = "stop" } },
          usage = { prompt_tokens = 1, completion_tokens = 1, total_tokens = 2 } }) }
      end } })
      local client_trace, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
      local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS },
        { traceparent = ("00-%s-%s-01"):format(client_trace, client_span) })
      assert.are.equal(200, res.status, res.body)
      local trace_id, span_id = seen[1]:match("^00%-(%x+)%-(%x+)%-01$")
      assert.are.equal(client_trace, trace_id)
      assert.are_not.equal(client_span, span_id)
    end)

  -- (cjson alone turned a parameterless tool's "required": [] into {}, which the provider refuses,
  -- and wrote a seed with 14 digits)
  it("the provider gets the client's empty arrays as [] and its numbers exactly, in both APIs", function()
    local bodies = {}
    local answers = {
      ["/v1/chat/completions"] = { id = "chatcmpl-x", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = "ok" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 1, completion_tokens = 1, total_tokens = 2 } },
      ["/v1/messages"] = { id = "msg_x", type = "message", role = "assistant", model = "claude-3-5-haiku-20241022",
        content = { { type = "text", text = "ok" } }, stop_reason = "end_turn", stop_sequence = json.null,
        usage = { input_tokens = 1, output_tokens = 1 } } }
    local function capture(req)
      bodies[#bodies + 1] = req.body
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode(answers[req.path]) }
    end
    local url = start({ strict = true, routes = { ["POST /v1/chat/completions"] = capture, ["POST /v1/messages"] = capture } })
    local params = '{"type":"object","properties":{"tags":{"type":"array","default":[]}},"required":[]}'
    local res = post(url .. "/v1/chat/completions", '{"model":"openai/gpt-4o-mini","messages":[{"role":"user",' ..
      '"content":"hi"}],"seed":1234567890123456789,"temperature":0.30000000000000004,"tools":[{"type":"function",' ..
      '"function":{"name":"now","parameters":' .. params .. '}}]}')
    assert.are.equal(200, res.status, res.body)
    res = post(url .. "/v1/messages", '{"model":"anthropic/claude-3-5-haiku-20241022","max_tokens":10,' ..
      '"messages":[{"role":"user","content":"hi"}],"tools":[{"name":"now","input_schema":' .. params .. '}]}')
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(2, #bodies)
    for _, body in ipairs(bodies) do
      assert.matches('"required":[]', body, 1, true)
      assert.matches('"default":[]', body, 1, true)
    end
    assert.matches('"seed":1234567890123456789', bodies[1], 1, true)
    assert.matches('"temperature":0.30000000000000004', bodies[1], 1, true)
  end)

  -- (before: "refusal": null and content "", streamed a 502 after three paid attempts)
  it("a refusal reaches the client as the API's refusal, streamed (with a JSON schema) or not", function()
    local calls = 0
    local url = start({ routes = { ["POST /v1/chat/completions"] = function(req)
      calls = calls + 1
      if json.decode(req.body).stream then
        return streams.reply(streams.openai({ id = "chatcmpl-r", refusal = "I can't help with that.",
          usage = { prompt_tokens = 5, completion_tokens = 6 } }))
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-r", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, finish_reason = "stop", message = { role = "assistant", content = json.null,
          refusal = "I can't help with that." } } },
        usage = { prompt_tokens = 5, completion_tokens = 6, total_tokens = 11 } }) }
    end } })
    local body = { model = "openai/gpt-4o-mini", messages = MSGS, response_format = { type = "json_schema",
      json_schema = { name = "x", strict = true, schema = { type = "object", properties = {},
        required = setmetatable({}, json.array_mt), additionalProperties = false } } } }
    local res = post(url .. "/v1/chat/completions", body)
    assert.are.equal(200, res.status, res.body)
    local message = json.decode(res.body).choices[1].message
    assert.are.equal("I can't help with that.", message.refusal)
    assert.are.equal(json.null, message.content)
    body.stream = true
    local refusal = {}
    for _, ev in ipairs(events_of(url .. "/v1/chat/completions", body)) do
      local chunk = ev.data ~= "[DONE]" and json.decode(ev.data)
      local delta = chunk and chunk.choices[1] and chunk.choices[1].delta
      if delta and type(delta.refusal) == "string" then refusal[#refusal + 1] = delta.refusal end
    end
    assert.are.equal("I can't help with that.", table.concat(refusal))
    assert.are.equal(2, calls) -- one call each: a refusal is an answer, not invalid output tried again
  end)

  it("an OpenAI client served by Anthropic when OpenAI fails gets an OpenAI-shaped answer", function()
    local url, m = start({ strict = true, reply = "from claude", sequence = { chat = { 500, 500, 500, 500 } } })
    local res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS })
    assert.are.equal(200, res.status)
    assert.are.equal("from claude", json.decode(res.body).choices[1].message.content)
    assert.are.equal("anthropic", res.headers["x-resil-provider"])
    assert.are.equal(5, tonumber(res.headers["x-resil-attempts"])) -- 4 to OpenAI, then Anthropic
    assert.are.equal(1, m:stats().routes.messages)
  end)

  it("any bare model name routes to the endpoint's provider, even one the gateway uses as a word itself", function()
    local url = start({ strict = true })
    for _, name in ipairs({ "size", "__index", "gpt-4o-mini" }) do
      local res = post(url .. "/v1/chat/completions", { model = name, messages = MSGS })
      assert.are.equal(200, res.status, name .. ": " .. res.body)
      assert.are.equal("openai", res.headers["x-resil-provider"])
    end
  end)

  it("malformed JSON is a 400 in OpenAI's error shape", function()
    local url, m = start({ strict = true })
    local res = post(url .. "/v1/chat/completions", '{"model":')
    assert.are.equal(400, res.status)
    local e = json.decode(res.body).error
    assert.are.equal("invalid_request_error", e.type)
    assert.are.equal("invalid_json", e.code)
    assert.are.equal(0, m:stats().total)
  end)

  it("numbers JSON allows but a provider cannot take (NaN, Infinity) are a 400, not a 500", function()
    local url, m = start({ strict = true })
    for _, bad in ipairs({ "NaN", "Infinity", "1e999" }) do
      local res = post(url .. "/v1/chat/completions",
        '{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"x"}],"temperature":' .. bad .. '}')
      assert.are.equal(400, res.status, bad .. ": " .. res.body)
      assert.are.equal("invalid_request_error", json.decode(res.body).error.type)
    end
    assert.are.equal(0, m:stats().total)
  end)

  it("a request policies.ai refuses (max_tokens not an integer) is a 400, not a 500", function()
    local url, m = start({ strict = true })
    local res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS, max_tokens = 1.5 })
    assert.are.equal(400, res.status)
    res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS, max_tokens = "lots" })
    assert.are.equal(400, res.status)
    assert.is_string(json.decode(res.body).error.message)
    assert.are.equal(0, m:stats().total)
  end)

  it("a body past the server's limit is a 413", function()
    local url = start({ strict = true }, { max_body = 1024 })
    local res = post(url .. "/v1/chat/completions", { model = "fast", messages = { { role = "user",
      content = ("x"):rep(4096) } } })
    assert.are.equal(413, res.status)
  end)

  it("an upstream failure after every retry and fallback keeps its status, in the client's error shape", function()
    local url = start({ strict = true, sequence = { chat = { 400 }, messages = { 400 } } })
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
    assert.are.equal(400, res.status)
    assert.is_string(json.decode(res.body).error.message)
    res = post(url .. "/v1/messages", { model = "claude-sonnet-4-5-20250929", max_tokens = 10, messages = MSGS })
    assert.are.equal(400, res.status)
    local b = json.decode(res.body)
    assert.are.equal("error", b.type)
    assert.are.equal("invalid_request_error", b.error.type)
  end)

  it("the host's own failure serving a request (--max-memory ran out) is a 503 the SDKs retry, never a 400; " ..
     "under an Idempotency-Key nothing is kept, so the retry is served", function()
    local url, m = start({ strict = true, reply = "served" })
    local ai = require "policies.ai"
    local chat = ai.chat
    ai.chat = function() error("not enough memory") end
    local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS },
      { ["idempotency-key"] = "k-oom" })
    ai.chat = chat
    assert.are.equal(503, res.status, res.body)
    assert.are.equal("1", res.headers["retry-after"])
    local e = json.decode(res.body).error
    assert.are.equal("gateway_overloaded", e.code)
    assert.is_nil(e.message:find("memory", 1, true))
    res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS }, { ["idempotency-key"] = "k-oom" })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(1, m:stats().routes.chat)
  end)

  it("a policy's own runtime error is a 500 in the API's shape that names no Lua, logged with its file:line; " ..
     "an error a policy raises on purpose stays the request's 400", function()
    local url, m = start({ strict = true })
    local ai = require "policies.ai"
    local chat = ai.chat
    local lines = helpers.logged(function()
      resil.log.level("error")
      ai.chat = function() local route = nil; return route.model end
      local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS })
      assert.are.equal(500, res.status, res.body)
      local e = json.decode(res.body).error
      assert.are.equal("server_error", e.type)
      assert.are.equal("internal_error", e.code)
      assert.is_nil(e.message:find("attempt to", 1, true))
      res = post(url .. "/v1/messages", { model = "claude-sonnet-4-5-20250929", max_tokens = 10, messages = MSGS })
      assert.are.equal(500, res.status, res.body)
      assert.are.equal("api_error", json.decode(res.body).error.type)
      -- under an Idempotency-Key nothing is kept: the same request after the fix is served
      res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS }, { ["idempotency-key"] = "k-bug" })
      assert.are.equal(500, res.status, res.body)
      assert.are.equal("internal_error", json.decode(res.body).error.code)
      ai.chat = chat
      res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS }, { ["idempotency-key"] = "k-bug" })
      assert.are.equal(200, res.status, res.body)
      ai.chat = function() error("ai.chat: messages must hold at least one message", 2) end
      res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS })
      assert.are.equal(400, res.status, res.body)
      assert.matches("messages must hold", json.decode(res.body).error.message)
    end)
    resil.log.level("off")
    ai.chat = chat
    local said
    for _, l in ipairs(lines) do
      if l.msg:find("a policy raised", 1, true) then said = l.error end
    end
    assert.matches("gateway_spec%.lua:%d+: attempt to index a nil value", said)
    assert.are.equal(1, m:stats().total) -- (the request served after the fix)
  end)

  it("the lines a request's work logs carry its x-request-id (an operator finds the 500 a client names)", function()
    local url = start({ strict = true })
    local ai = require "policies.ai"
    local chat = ai.chat
    local ids = {}
    -- (and counted, as 500s)
    local function raised()
      local body = assert(http.request({ url = url .. "/metrics" })).body
      return tonumber(body:match('resil_gateway_requests_total{route="/v1/chat/completions",status="500"} (%d+)')) or 0
    end
    local before = raised()
    local lines = helpers.logged(function()
      resil.log.level("error")
      ai.chat = function() local route = nil; return route.model end
      for i = 1, 2 do
        local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS })
        assert.are.equal(500, res.status, res.body)
        ids[i] = res.headers["x-request-id"]
      end
    end)
    resil.log.level("off")
    ai.chat = chat
    assert.are.equal(before + 2, raised())
    local said = {}
    for _, l in ipairs(lines) do
      if l.msg:find("a policy raised", 1, true) then said[#said + 1] = l.request_id or "(none)" end
    end
    assert.are.same(ids, said)
  end)

  it("stream given as anything but true or false is a 400, not a silent answer of another kind", function()
    local url, m = start({ strict = true })
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, stream = "true" })
    assert.are.equal(400, res.status, res.body)
    assert.matches("stream", json.decode(res.body).error.message)
    assert.are.equal(0, m:stats().total)
  end)

  it("unknown routes are 404s; /health, /v1/models and /metrics answer", function()
    local url = start({ strict = true })
    assert.are.equal(404, assert(http.request({ url = url .. "/v2/nothing" })).status)
    -- Anthropic's routes the gateway does not serve are 404s in Anthropic's shape
    local res = assert(http.request({ method = "POST", url = url .. "/v1/messages/batches", body = "{}" }))
    assert.are.equal(404, res.status)
    assert.are.equal("not_found_error", json.decode(res.body).error.type)
    assert.are.equal("error", json.decode(res.body).type)
    assert.are.equal(200, assert(http.request({ url = url .. "/health" })).status)
    local models = json.decode(assert(http.request({ url = url .. "/v1/models" })).body)
    assert.are.equal("list", models.object)
    local ids = {}
    for i, m in ipairs(models.data) do ids[i] = m.id end
    -- the config's aliases and the shipped registry's (policies/models.lua)
    assert.are.same({ "chat-best", "chat-cheap", "chat-fast", "claude", "fast" }, ids)
    assert.matches("resil_gateway_requests_total", assert(http.request({ url = url .. "/metrics" })).body)
  end)

  -- (HEAD /health was a 404: a monitor that checks with HEAD saw the gateway down)
  it("HEAD is answered as GET is, without the body", function()
    local url = start({ strict = true })
    for path, status in pairs({ ["/health"] = 200, ["/v1/models"] = 200, ["/v1/models/fast"] = 200,
                                ["/v1/models/nope"] = 404, ["/v2/nothing"] = 404 }) do
      local res = assert(http.request({ method = "HEAD", url = url .. path }))
      assert.are.equal(status, res.status, path)
      assert.are.equal("", res.body)
    end
  end)

  -- (a HEAD reply had no Content-Length: RFC 9110 9.3.2 has it carry the GET's, and a monitor or
  -- `curl -I` that reads it to size a download saw none)
  it("HEAD carries the Content-Length the GET's body has", function()
    local url = start({ strict = true })
    for _, path in ipairs({ "/health", "/v1/models", "/v1/models/fast", "/v1/models/nope", "/v2/nothing" }) do
      local get = assert(http.request({ url = url .. path }))
      local head = assert(http.request({ method = "HEAD", url = url .. path }))
      assert.are.equal(get.status, head.status, path)
      assert.are.equal(tostring(#get.body), head.headers["content-length"], path)
    end
  end)
end)

describe("gateway: hostile requests", function()
  it("a model name that is huge, or holds control bytes, spaces or non-ASCII, is a 400 in the client's shape; " ..
    "nothing of it reaches a header, the metrics or a provider", function()
    local url, m = start({ strict = true })
    local huge = "gpt-" .. ("x"):rep(100000)
    -- (non-ASCII as UTF-8: a body that is not UTF-8 is refused before the model is read)
    for _, name in ipairs({ huge, "gpt-4o-mini\0x", "gpt\r\nx-injected: 1", "gpt 4o", "gpt-\xc3\xa9\xe2\x80\x8b" }) do
      local res = post(url .. "/v1/chat/completions", { model = name, messages = MSGS })
      assert.are.equal(400, res.status, res.body)
      local e = json.decode(res.body).error
      assert.are.equal("invalid_request_error", e.type)
      assert.are.equal("invalid_model", e.code)
      assert.is_nil(res.headers["x-resil-model"])
      res = post(url .. "/v1/messages", { model = name, max_tokens = 10, messages = MSGS })
      assert.are.equal(400, res.status)
      assert.are.equal("invalid_request_error", json.decode(res.body).error.type)
      res = post(url .. "/v1/embeddings", { model = name, input = "x" })
      assert.are.equal(400, res.status)
    end
    assert.are.equal(0, m:stats().total)
    local metrics = assert(http.request({ url = url .. "/metrics" })).body
    assert.is_nil(metrics:find("xxxxxxxxxx", 1, true))
    -- real ids pass: a fine-tune's colons, a dated pin's dots and dashes
    local res = post(url .. "/v1/chat/completions", { model = "ft:gpt-4o-mini-2024-07-18:acme:v1.2:abc", messages = MSGS })
    assert.are.equal(200, res.status, res.body)
  end)

  -- (it was the client's 404 "unknown provider in 'acme/...'", model_not_found, as if it had a typo)
  it("a provider whose policy file does not load is the gateway's 500, logged; an unknown one is a 404",
    function()
      local url, m = start({ strict = true })
      package.preload["policies.providers.acme"] = function() error("policies/providers/acme.lua:3: oops", 0) end
      finally(function() package.preload["policies.providers.acme"] = nil end)
      local res
      local logged = helpers.logged(function()
        resil.log.level("error")
        res = post(url .. "/v1/chat/completions", { model = "acme/model-1", messages = MSGS })
        resil.log.level("off")
      end)
      assert.are.equal(500, res.status, res.body)
      assert.is_nil(res.body:find("oops", 1, true))
      assert.matches("acme%.lua:3: oops", logged[1] and logged[1].error or "(nothing logged)")
      res = post(url .. "/v1/chat/completions", { model = "nowhere/model-1", messages = MSGS })
      assert.are.equal(404, res.status, res.body)
      assert.are.equal("model_not_found", json.decode(res.body).error.code)
      assert.are.equal(0, m:stats().total)
    end)

  it("malformed tools, tool calls and contents are a 400 naming the field, never an internal error's text", function()
    local url, m = start({ strict = true })
    local openai = { model = "openai/gpt-4o-mini", messages = MSGS }
    local claude = { model = "anthropic/claude-3-5-haiku-latest", max_tokens = 10, messages = MSGS }
    local function with(base, fields)
      local b = {}
      for k, v in pairs(base) do b[k] = v end
      for k, v in pairs(fields) do b[k] = v end
      return b
    end
    local calls = { { role = "user", content = "hi" }, { role = "assistant", content = "", tool_calls = "X" } }
    local cases = {
      { "tools", { tools = { 1 } } },
      { "tools", { tools = { { type = "function", ["function"] = 5 } } } },
      { "tools", { tools = "all of them" } },
      { "tool_calls", { messages = { calls[1], with(calls[2], { tool_calls = { 7 } }) } } },
      { "tool_calls", { messages = { calls[1], with(calls[2], { tool_calls = { { id = "c1", ["function"] = "f" } } }) } } },
      { "tool_calls", { messages = { calls[1], with(calls[2], { tool_calls = { { id = "c1", type = "function",
        ["function"] = { name = "f", arguments = { 1 } } } } }) } } },
      -- (before: sent upstream as "" and charged)
      { "content", { messages = { { role = "user", content = 5 } } } },
      { "content", { messages = { { role = "user", content = json.null } } } },
      { "content", { messages = { { role = "user" } } } },
    }
    for _, case in ipairs(cases) do
      for _, req in ipairs({ { "/v1/chat/completions", openai }, { "/v1/messages", claude } }) do
        local res = post(url .. req[1], with(req[2], case[2]))
        assert.are.equal(400, res.status, res.body)
        local msg = json.decode(res.body).error.message
        assert.matches(case[1], msg)
        assert.is_nil(msg:find("attempt to", 1, true), msg)
        assert.is_nil(msg:find(".lua", 1, true), msg)
      end
    end
    assert.are.equal(0, m:stats().total)
  end)
end)

describe("gateway: made-up model names", function()
  -- (each name unpriced was a log line and an entry kept for good: a client naming a million
  -- models flooded the log and grew the gateway without end)
  it("by the hundred are each answered; the no-price warning comes one by one up to a bound, then once", function()
    local url = start({ reply = "ok" })
    resil.log.level("warn")
    local lines = helpers.logged(function()
      for i = 1, 300 do
        local res = post(url .. "/v1/chat/completions", { model = "gpt-made-up-" .. i, messages = MSGS })
        assert.are.equal(200, res.status, res.body)
      end
    end)
    local unpriced, said_once = 0, 0
    for _, l in ipairs(lines) do
      if l.msg:find("^no price for model") then unpriced = unpriced + 1 end
      if l.msg:find("^more models have no price") then said_once = said_once + 1 end
    end
    assert.is_true(unpriced <= 100, unpriced .. " no-price lines")
    assert.is_true(said_once <= 1)
  end)
end)

describe("gateway: a hostile upstream", function()
  local keys = require "resil.keys"

  -- an OpenAI-shaped answer whose usage is `usage` (raw JSON)
  local function answering(usage)
    return { routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = '{"id":"up-1",' ..
        '"object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant",' ..
        '"content":"ok"},"finish_reason":"stop"}],"usage":' .. usage .. '}' }
    end } }
  end

  it("one that hangs is a 504 (and a stalled stream an error event) that does not name the upstream's URL; " ..
    "/health answers meanwhile", function()
    resil.clock.real()
    local url, m = start({ strict = true, reply = "one two three", sequence = { chat = { "hang", "hang", "hang", "hang",
      "stall" } } })
    require("policies.ai").configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
      retry = { base = 0.001, cap = 0.005 }, timeout = 0.1, idle_timeout = 0.1 })
    local hung = resil.spawn(post, url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 5))
    assert.are.equal(200, assert(http.request({ url = url .. "/health", timeout = 1 })).status)
    local _, res = hung:join()
    assert.are.equal(504, res.status, res.body)
    local upstream = m.url:match("//(.*)$")
    assert.is_nil(res.body:find(upstream, 1, true), res.body)
    assert.matches("the upstream", json.decode(res.body).error.message)
    local evs = events_of(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, stream = true })
    local last = evs[#evs].data
    assert.is_table(json.decode(last).error, last)
    assert.is_nil(last:find(upstream, 1, true), last)
    -- a link in the provider's own message is the provider's, and kept (timeouts a stalled machine cannot hit)
    require("policies.ai").configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
      retry = { base = 0.001, cap = 0.005 } })
    m:configure({ strict = true, sequence = { chat = { { status = 400, body = json.encode({ error = {
      message = "Bad thing. Read the docs: https://platform.example/docs/errors.", type = "invalid_request_error" } }) } } } })
    res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
    assert.are.equal(400, res.status)
    assert.matches("https://platform.example/docs/errors.", json.decode(res.body).error.message, 1, true)
  end)

  it("a model or id that is not a short line of text (null, an object, CR/LF, 100 KB) is not taken: the client " ..
     "gets its answer, the ledger its row under the model asked for, and the hold is given back", function()
    local shapes = { "null", '{"a":1}', '"gpt-4o\r\nx-evil: 1"', '"' .. ("m"):rep(100000) .. '"' }
    local n = 0
    local url = start({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = '{"id":' .. shapes[n] ..
        ',"object":"chat.completion","model":' .. shapes[n] .. ',"choices":[{"index":0,"message":{"role":' ..
        '"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}' }
    end } }, { auth = true })
    local key = assert(keys.add({ name = "odd-model", budget = "10/day" }))
    for i = 1, #shapes do
      local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS },
        { authorization = "Bearer " .. key })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("gpt-4o-mini", res.headers["x-resil-model"])
      assert.is_nil(res.headers["x-evil"])
      assert.are.equal(i, assert(resil.cost.breakdown("model"))[1].calls, "answer " .. i)
    end
    assert.are.equal("gpt-4o-mini", assert(resil.cost.breakdown("model"))[1].key)
    local state = assert(resil.budget("key:odd-model"):state())
    assert.are.same({ 0, 0 }, { #state.holds, state.reserved })
    assert.is_true(state.spent > 0)
  end)

  it("more output tokens than max_tokens allows are recorded at max_tokens: one answer cannot spend a budget " ..
     "10^10 times over", function()
    local url = start(answering('{"prompt_tokens":1000,"completion_tokens":1e12}'), { auth = true })
    local key = assert(keys.add({ name = "capped", budget = "1/day" }))
    for _ = 1, 2 do
      local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS, max_tokens = 50 },
        { authorization = "Bearer " .. key })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(50, json.decode(res.body).usage.completion_tokens)
    end
    local one = require("policies.pricing").cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 50 })
    assert.is_true(math.abs(resil.cost.total({}) - 2 * one) < 1e-6, tostring(resil.cost.total({})))
    local state = assert(resil.budget("key:capped"):state())
    assert.is_true(math.abs(state.spent - 2 * one) < 2e-6, tostring(state.spent))
    -- without max_tokens, a budgeted call is sent the budget's (4096): the most it is recorded at
    local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS },
      { authorization = "Bearer " .. key })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(4096, json.decode(res.body).usage.completion_tokens)
  end)

  -- (before: with no max_tokens to cap it, 1e12 output tokens for "ok" were a $600,000 ledger row, said nowhere)
  it("an output count past what any model writes, with no max_tokens, is recorded at the answer's text", function()
    local url = start(answering('{"prompt_tokens":1000,"completion_tokens":1e12}'))
    resil.log.level("error")
    finally(function() resil.log.level("off") end)
    local lines = helpers.logged(function()
      local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS })
      assert.are.equal(200, res.status, res.body)
      assert(helpers.wait_until(function() return #assert(resil.cost.breakdown("model")) == 1 end, 10))
    end)
    local one = require("policies.pricing").cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 1 })
    assert.is_true(math.abs(resil.cost.total({}) - one) < 1e-6, tostring(resil.cost.total({})))
    local said = false
    for _, l in ipairs(lines) do said = said or l.msg:match("more output tokens than any model writes") ~= nil end
    assert.is_true(said)
  end)

  it("a stream whose usage is not an object (Anthropic's message_start, message_delta) is still relayed to its " ..
     "end and recorded", function()
    local sse_body = table.concat({
      'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":' ..
        '"assistant","model":"claude-sonnet-4-5-20250929","content":[],"usage":null}}\n\n',
      'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
      'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hello"}}\n\n',
      'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
      'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":"lots"}\n\n',
      'event: message_stop\ndata: {"type":"message_stop"}\n\n' })
    local url = start({ routes = { ["POST /v1/messages"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = sse_body }
    end } })
    local evs = events_of(url .. "/v1/messages", { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 50,
      messages = MSGS, stream = true })
    local text = {}
    for _, ev in ipairs(evs) do
      local d = json.decode(ev.data)
      if d and d.type == "content_block_delta" then text[#text + 1] = d.delta.text end
    end
    assert.are.equal("hello", table.concat(text))
    assert.are.equal("message_stop", evs[#evs].event)
    assert.is_true(helpers.wait_until(function()
      local rows = resil.cost.breakdown("model")[1]
      return rows and rows.calls == 1
    end, 5))
  end)

  it("token counts that are infinite or negative are the provider's garbage: the client still gets its answer, " ..
    "the hold is given back and the call is in the ledger once", function()
    for i, usage in ipairs({ '{"prompt_tokens":1e999,"completion_tokens":3}', '{"prompt_tokens":2000,"completion_tokens":-1e300}' }) do
      local url = start(answering(usage), { auth = true })
      local key = assert(keys.add({ name = "team-" .. i, budget = "10/day" }))
      local res = post(url .. "/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS },
        { authorization = "Bearer " .. key, ["idempotency-key"] = "k" })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("ok", json.decode(res.body).choices[1].message.content)
      local state = assert(resil.budget("key:team-" .. i):state())
      assert.are.equal(0, #state.holds)
      assert.are.equal(1, assert(resil.cost.breakdown("model"))[1].calls)
    end
  end)
end)

describe("gateway: answers refused as invalid output", function()
  it("are billed: the client's x-resil-cost-usd and the ledger count them, on an answer and on a failure",
    function()
      -- (invalid output is tried three times)
      local url = start({ strict = true, sequence = { chat = { "empty", "empty", "ok", "empty", "empty", "empty" } } })
      local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("3", res.headers["x-resil-attempts"])
      assert.are.equal(3, assert(resil.cost.breakdown("model"))[1].calls)
      local total = resil.cost.total({})
      assert.are.equal(("%.6f"):format(total), res.headers["x-resil-cost-usd"])
      res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
      assert.are.equal(502, res.status, res.body)
      assert.are.equal(6, assert(resil.cost.breakdown("model"))[1].calls)
      assert.are.equal(("%.6f"):format(resil.cost.total({}) - total), res.headers["x-resil-cost-usd"])
      -- paid for and tried again already: the SDKs must not pay for as many again
      assert.are.equal("false", res.headers["x-should-retry"])
    end)
end)

-- (found by helper J: an upstream 401/403, the gateway's own key refused, was a 502 the SDKs
-- retried twice more, each refused the same)
describe("gateway: the provider refusing the gateway's key", function()
  it("an upstream 401/403 is a 502 with x-should-retry: false on either route, asked once", function()
    for _, status in ipairs({ 401, 403 }) do
      local url, m = start({ strict = true, sequence = { chat = { status }, messages = { status } } })
      local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
      assert.are.equal(502, res.status, res.body)
      assert.are.equal("false", res.headers["x-should-retry"], status)
      res = post(url .. "/v1/messages", { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 10,
        messages = MSGS })
      assert.are.equal(502, res.status, res.body)
      assert.are.equal("false", res.headers["x-should-retry"], status)
      assert.are.equal(1, m:stats().routes.chat)
      assert.are.equal(1, m:stats().routes.messages)
    end
  end)
end)

describe("gateway: the model registry", function()
  local registry = require "policies.registry"
  local function use_registry(entries)
    local saved, file = registry.entries, registry.file
    registry.use(entries)
    finally(function() registry.entries, registry.file = saved, file end)
  end

  it("a registry alias is served by its pinned model, falls back by the registry's list, and is listed", function()
    use_registry({ ["team-chat"] = { use = "openai/gpt-4o-mini-2024-07-18",
      fallbacks = { "anthropic/claude-haiku-4-5-20251001" } } })
    local url, m = start({ strict = true, reply = "pinned", sequence = { chat = { "ok", 500, 500, 500, 500 } } })
    local res = post(url .. "/v1/chat/completions", { model = "team-chat", messages = MSGS })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("openai", res.headers["x-resil-provider"])
    assert.are.equal("gpt-4o-mini-2024-07-18", res.headers["x-resil-model"])
    -- OpenAI fails every attempt: the registry's fallback serves, in the client's shape
    res = post(url .. "/v1/chat/completions", { model = "team-chat", messages = MSGS })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("anthropic", res.headers["x-resil-provider"])
    assert.are.equal("claude-haiku-4-5-20251001", res.headers["x-resil-model"])
    assert.are.equal(1, m:stats().routes.messages)
    local models = json.decode(assert(http.request({ url = url .. "/v1/models" })).body)
    local owner = {}
    for _, d in ipairs(models.data) do owner[d.id] = d.owned_by end
    assert.are.equal("openai", owner["team-chat"])
  end)

  it("/v1/models says the provider an alias naming an alias is pinned to", function()
    use_registry({ inner = { use = "anthropic/claude-haiku-4-5-20251001" }, outer = { use = "inner" } })
    local url = start({ strict = true, reply = "x" }, { models = { team = "outer" } })
    local models = json.decode(assert(http.request({ url = url .. "/v1/models" })).body)
    local owner = {}
    for _, d in ipairs(models.data) do owner[d.id] = d.owned_by end
    assert.are.equal("anthropic", owner.inner)
    assert.are.equal("anthropic", owner.outer)
    assert.are.equal("anthropic", owner.team)
  end)

  -- (before: code null, where OpenAI's own 404 says model_not_found, which apps read)
  it("an OpenAI client whose model Anthropic does not serve (its 404) gets code model_not_found", function()
    local url = start({ strict = true, reply = "x", faults = { { route = "messages", status = 404,
      body = '{"type":"error","error":{"type":"not_found_error","message":"model: claude-3-opus-20240229"}}' } } })
    local res = post(url .. "/v1/chat/completions", { model = "anthropic/claude-3-opus-20240229", messages = MSGS })
    assert.are.equal(404, res.status, res.body)
    local e = json.decode(res.body).error
    assert.are.same({ "model_not_found", "model: claude-3-opus-20240229" }, { e.code, e.message })
  end)

  -- (before: owned by the provider its name began with, openai, while anthropic served its calls)
  it("/v1/models says the provider an alias named as a provider's model is pinned to", function()
    use_registry({ ["openai/gpt-4o"] = { use = "anthropic/claude-haiku-4-5-20251001" } })
    local url = start({ strict = true, reply = "x" })
    local models = json.decode(assert(http.request({ url = url .. "/v1/models" })).body)
    local owner = {}
    for _, d in ipairs(models.data) do owner[d.id] = d.owned_by end
    assert.are.equal("anthropic", owner["openai/gpt-4o"])
    local one = json.decode(assert(http.request({ url = url .. "/v1/models/openai%2Fgpt-4o" })).body)
    assert.are.equal("anthropic", one.owned_by)
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o", messages = MSGS })
    assert.are.equal("anthropic", res.headers["x-resil-provider"])
  end)

  -- (found by helper G: both were listed, then refused to the client that took the list's word; the
  -- retired one as a 502 the SDKs retried, each retry failing the same)
  it("/v1/models leaves out a retired alias and a job provider's; a chat to the retired one is a 404", function()
    use_registry({ gone = { use = "openai/gpt-x-2020-01-01" },
      ["openai/gpt-x-2020-01-01"] = { deprecated = true, sunset = "2020-01-01" },
      ["video-hq"] = { use = "replicate/bytedance/seedance-1-lite:c4d7a4b9" },
      here = { use = "openai/gpt-4o-mini-2024-07-18" } })
    local url = start({ strict = true, reply = "x" })
    local models = json.decode(assert(http.request({ url = url .. "/v1/models" })).body)
    local ids = {}
    for _, d in ipairs(models.data) do ids[d.id] = true end
    assert.is_true(ids.here)
    assert.is_nil(ids.gone)
    assert.is_nil(ids["video-hq"])
    for _, id in ipairs({ "gone", "video-hq", "replicate%2Fbytedance%2Fseedance-1-lite" }) do
      assert.are.equal(404, assert(http.request({ url = url .. "/v1/models/" .. id })).status, id)
    end
    local res = post(url .. "/v1/chat/completions", { model = "gone", messages = MSGS })
    assert.are.equal(404, res.status, res.body)
    assert.are.equal("false", res.headers["x-should-retry"])
    assert.are.equal("model_retired", json.decode(res.body).error.code)
  end)

  -- (a key limited to some models listed its own list as it was: the retired alias and the job
  -- provider's came back through it, and were refused to the client that took the list's word)
  it("/v1/models of a key with --models leaves out the retired alias and the job provider's it names", function()
    use_registry({ gone = { use = "openai/gpt-x-2020-01-01" },
      ["openai/gpt-x-2020-01-01"] = { deprecated = true, sunset = "2020-01-01" },
      ["video-hq"] = { use = "replicate/bytedance/seedance-1-lite:c4d7a4b9" },
      here = { use = "openai/gpt-4o-mini-2024-07-18" } })
    local url = start({ strict = true, reply = "x" }, { auth = true })
    local key = assert(require("resil.keys").add({ name = "some-models", models = { "gone", "video-hq", "here" } }))
    local res = http.request({ url = url .. "/v1/models", headers = { authorization = "Bearer " .. key } })
    assert.are.equal(200, res.status, res.body)
    local ids = {}
    for _, d in ipairs(json.decode(res.body).data) do ids[d.id] = true end
    assert.is_true(ids.here)
    assert.is_nil(ids.gone)
    assert.is_nil(ids["video-hq"])
  end)

  -- (/v1/models resolved each alias as a call does, to leave out the retired: each listing counted
  -- as a call to an unpinned model, and an SDK or a UI polling the list raised the metric alone)
  it("/v1/models is not a call: resil_model_unpinned_total counts calls, not listings", function()
    use_registry({ loose = { use = "openai/gpt-4o-mini" }, here = { use = "openai/gpt-4o-mini-2024-07-18" } })
    local url = start({ strict = true, reply = "x" })
    local unpinned = resil.metrics.counter("resil_model_unpinned_total")
    local before = unpinned:value({ model = "openai/gpt-4o-mini" })
    for _ = 1, 3 do
      local models = json.decode(assert(http.request({ url = url .. "/v1/models" })).body)
      local ids = {}
      for _, d in ipairs(models.data) do ids[d.id] = true end
      assert.is_true(ids.loose and ids.here)
    end
    assert.are.equal(before, unpinned:value({ model = "openai/gpt-4o-mini" }))
    assert.are.equal(200, post(url .. "/v1/chat/completions", { model = "loose", messages = MSGS }).status)
    assert.are.equal(before + 1, unpinned:value({ model = "openai/gpt-4o-mini" }))
  end)

  it("an alias the config does not name is not taken for a bare model of the endpoint's provider", function()
    use_registry({ ["team-chat"] = { use = "anthropic/claude-haiku-4-5-20251001" } })
    local url = start({ strict = true, reply = "from the registry" })
    -- on OpenAI's endpoint, yet served by Anthropic: the alias, not "openai/team-chat"
    local res = post(url .. "/v1/chat/completions", { model = "team-chat", messages = MSGS })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("anthropic", res.headers["x-resil-provider"])
  end)
end)

describe("gateway: policy reload", function()
  it("keeps the config file's settings and the providers' configuration", function()
    local url = start({ strict = true, reply = "after reload" })
    assert(resil.reload())
    local res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("after reload", json.decode(res.body).choices[1].message.content)
  end)
end)

describe("gateway: policy reload of a config file", function()
  -- (README: on a Redis store, shared_limits = false keeps a key's rpm/tpm per process; a reload
  -- put back what serve had set, nothing without --workers, and the limits went shared)
  it("keeps the config's shared_limits = false", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local kept = resil.keep("policies.gateway.kept", function() return { config = {} } end)
    local saved = {}
    for k, v in pairs(kept.config) do saved[k] = v end
    local gateway = fresh_gateway()
    local path = helpers.write(helpers.tmpname(".lua"), "return { auth = false, shared_limits = false }")
    local s = gateway.serve({ listen = "127.0.0.1:0", config = path })
    finally(function()
      s:close()
      kept.path = nil
      for k in pairs(kept.config) do kept.config[k] = nil end
      for k, v in pairs(saved) do kept.config[k] = v end
      resil.log.level("info")
    end)
    assert.is_false(package.loaded["policies.gateway"].config.shared_limits)
    assert(resil.reload())
    assert.is_false(package.loaded["policies.gateway"].config.shared_limits)
  end)
end)

describe("gateway: a config that loops", function()
  it("stops the gateway with a message naming the file, instead of never listening", function()
    local config = helpers.write(helpers.tmpname(".lua"), "local n = 0\nwhile true do n = n + 1 end\n")
    -- (the bound is for a gateway that never stops: 120 s, not 20; the config's 200,000,000 instructions
    -- took past 20 s of wall time on 2 cores at a load of 10)
    local r = helpers.run(("timeout -s KILL 120 %s gateway --listen 127.0.0.1:%d --config %s --store %s"):format(
      helpers.resil, helpers.free_port(), config, helpers.tmpname(".db")))
    assert.are.equal(1, r.code, r.stderr)
    assert.matches("the config " .. config:gsub("%p", "%%%0") .. " ran more than 200000000 instructions", r.stderr)
    assert.is_nil(r.stderr:match("stack traceback"))
  end)
end)

describe("gateway: Anthropic messages", function()
  it("answers in Anthropic's shape; a 529 on the primary falls back to OpenAI", function()
    local url, m = start({ strict = true, reply = "from gpt", sequence = { messages = { 529, 529, 529, 529, 529 } } })
    local res = post(url .. "/v1/messages", { model = "claude", max_tokens = 50, messages = MSGS })
    assert.are.equal(200, res.status)
    local b = json.decode(res.body)
    assert.are.equal("message", b.type)
    assert.are.equal("from gpt", b.content[1].text)
    assert.are.equal("end_turn", b.stop_reason)
    assert.are.equal("openai", res.headers["x-resil-provider"])
    assert.are.equal(1, m:stats().routes.chat)
  end)

  -- (before: stop_sequence came back end_turn and null; a stream's message_delta had output_tokens only,
  -- so the SDK kept message_start's estimate of the input; no request-id header for the SDK)
  it("keeps Anthropic's stop_sequence and, streamed, gives the counted usage in message_delta", function()
    local url = start({ strict = true, reply = "alpha beta END gamma" })
    local body = { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 50, stop_sequences = { "END" },
      system = ("a long system prompt "):rep(50), messages = MSGS }
    local res = post(url .. "/v1/messages", body)
    assert.are.equal(200, res.status, res.body)
    local b = json.decode(res.body)
    assert.are.same({ "stop_sequence", "END" }, { b.stop_reason, b.stop_sequence })
    assert.matches("^req_", res.headers["request-id"])
    body.stream = true
    local evs = events_of(url .. "/v1/messages", body)
    local delta
    for _, ev in ipairs(evs) do if ev.event == "message_delta" then delta = json.decode(ev.data) end end
    assert.are.same({ "stop_sequence", "END" }, { delta.delta.stop_reason, delta.delta.stop_sequence })
    assert.are.equal(b.usage.input_tokens, delta.usage.input_tokens)
    assert.are.equal(b.usage.output_tokens, delta.usage.output_tokens)
  end)

  it("a sampling number past what a double holds (1e400) is a 400, streamed or not", function()
    local url, m = start({ strict = true })
    for _, stream in ipairs({ "false", "true" }) do
      local res = post(url .. "/v1/chat/completions", '{"model":"openai/gpt-4o-mini","stream":' .. stream ..
        ',"temperature":1e400,"messages":[{"role":"user","content":"hi"}]}')
      assert.are.equal(400, res.status, res.body)
      assert.matches("temperature must be a finite number", json.decode(res.body).error.message)
    end
    assert.are.equal(0, m:stats().total)
  end)
end)

describe("gateway: streams", function()
  it("relays OpenAI deltas and ends with [DONE]", function()
    local url = start({ strict = true, reply = "one two three" })
    local evs, err = events_of(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS,
      stream = true, stream_options = { include_usage = true } })
    assert.is_nil(err)
    local text = {}
    for _, e in ipairs(evs) do
      local d = e.data ~= "[DONE]" and json.decode(e.data)
      if d and d.choices[1] and d.choices[1].delta.content then text[#text + 1] = d.choices[1].delta.content end
    end
    assert.are.equal("one two three", table.concat(text))
    assert.are.equal("[DONE]", evs[#evs].data)
    assert.is_true(json.decode(evs[#evs - 1].data).usage.completion_tokens > 0)
  end)

  it("a failure before the first delta falls back, across wire formats", function()
    local url = start({ strict = true, reply = "one two", sequence = { messages = { 529, 529, 529, 529, 529 } } })
    local evs, err, s = events_of(url .. "/v1/messages", { model = "claude", max_tokens = 20, messages = MSGS,
      stream = true })
    assert.is_nil(err)
    assert.are.equal("openai", s.headers["x-resil-provider"])
    assert.are.equal("message_stop", evs[#evs].event)
  end)

  it("a stream cut after its first delta ends with an error event, never [DONE] or message_stop", function()
    local url = start({ strict = true, reply = "one two three four five", sequence = { chat = { "cut" },
      messages = { "cut" } } })
    local evs = events_of(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS,
      stream = true })
    local last = json.decode(evs[#evs].data)
    assert.is_table(last.error)
    for _, e in ipairs(evs) do assert.are_not.equal("[DONE]", e.data) end
    evs = events_of(url .. "/v1/messages", { model = "claude-sonnet-4-5-20250929", max_tokens = 20,
      messages = MSGS, stream = true })
    assert.are.equal("error", evs[#evs].event)
    for _, e in ipairs(evs) do assert.are_not.equal("message_stop", e.event) end
  end)

  it("a client that leaves mid-stream cancels the upstream transfer", function()
    local url, m = start({ strict = true, reply = ("word "):rep(200), stream_interval = 0.02 })
    local s = assert(http.stream({ method = "POST", url = url .. "/v1/chat/completions",
      headers = { ["content-type"] = "application/json" },
      body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS, stream = true }) }))
    assert(s:read_event())
    assert.are.equal(1, m.server:pending()) -- the upstream is still streaming
    s:close()
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 0 end, 2),
      "the upstream stream was not canceled")
  end)

  -- (found by helper J: the event had no param, which OpenAI's error schema has)
  it("a stream's error event in OpenAI's shape has param null, as OpenAI's schema has it", function()
    local url = start({ strict = true, reply = "one two three",
      sequence = { chat = { { kind = "error_event", after = 2 } } } })
    local evs = events_of(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, stream = true })
    local last = evs[#evs].data
    local e = assert(json.decode(last).error, last)
    assert.is_truthy(last:find('"param":null', 1, true), last)
    assert.are.equal("server_error", e.type)
  end)
end)

describe("gateway: Idempotency-Key", function()
  it("a retry with the same key gets the first answer again and is not billed twice", function()
    local url, m = start({ strict = true })
    local body = { model = "openai/gpt-4o-mini", messages = MSGS }
    local a = post(url .. "/v1/chat/completions", body, { ["idempotency-key"] = "retry-1" })
    local b = post(url .. "/v1/chat/completions", body, { ["idempotency-key"] = "retry-1" })
    assert.are.equal(200, b.status)
    assert.are.equal(json.decode(a.body).choices[1].message.content, json.decode(b.body).choices[1].message.content)
    assert.are.equal("true", b.headers["x-resil-replayed"])
    assert.are.equal(1, m:stats().routes.chat)
    -- billed once: the replay's own cost is 0 (a client adding up the header counts the call once)
    assert.is_true(tonumber(a.headers["x-resil-cost-usd"]) > 0)
    assert.are.equal(0, tonumber(b.headers["x-resil-cost-usd"]))
    -- the same answer, not a twin: a client that keeps answers by id sees one
    assert.are.equal(json.decode(a.body).id, json.decode(b.body).id)
    assert.are.equal(json.decode(a.body).created, json.decode(b.body).created)
    assert.are_not.equal(a.headers["x-request-id"], b.headers["x-request-id"]) -- two HTTP requests all the same
  end)

  it("two copies sent at once are answered the same and billed once; another body under the key is a 422",
    function()
      local url, m = start({ strict = true, latency = 0.05 })
      for _, api in ipairs({ { "/v1/chat/completions", "openai/gpt-4o-mini" }, { "/v1/messages", "claude" } }) do
        local body = { model = api[2], max_tokens = 20, messages = MSGS }
        local h = { ["idempotency-key"] = "at-once" .. api[1] }
        local tasks = { resil.spawn(post, url .. api[1], body, h), resil.spawn(post, url .. api[1], body, h) }
        assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 5)) -- the first is upstream
        local other = post(url .. api[1], { model = api[2], max_tokens = 21, messages = MSGS }, h)
        local _, a = tasks[1]:join()
        local _, b = tasks[2]:join()
        assert.are.equal(200, a.status, a.body)
        assert.are.equal(200, b.status, b.body)
        assert.are.equal(json.decode(a.body).id, json.decode(b.body).id)
        assert.are.equal(422, other.status, other.body)
      end
      assert.are.equal(1, m:stats().routes.chat)
      assert.are.equal(1, m:stats().routes.messages)
      local calls = 0
      for _, row in ipairs(assert(resil.cost.breakdown("model"))) do calls = calls + row.calls end
      assert.are.equal(2, calls) -- one ledger row per answer
    end)

  it("the same key with another body is a 422 invalid_request_error, in both APIs' shapes, calling no one",
    function()
      local url, m = start({ strict = true })
      post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS }, { ["idempotency-key"] = "k-2" })
      local other = { model = "openai/gpt-4o-mini", messages = { { role = "user", content = "something else" } } }
      local res = post(url .. "/v1/chat/completions", other, { ["idempotency-key"] = "k-2" })
      assert.are.equal(422, res.status)
      assert.are.equal("invalid_request_error", json.decode(res.body).error.type)
      local amsg = { model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = MSGS }
      post(url .. "/v1/messages", amsg, { ["idempotency-key"] = "k-3" })
      amsg.max_tokens = 60
      res = post(url .. "/v1/messages", amsg, { ["idempotency-key"] = "k-3" })
      assert.are.equal(422, res.status)
      local b = json.decode(res.body)
      assert.are.equal("error", b.type)
      assert.are.equal("invalid_request_error", b.error.type)
      assert.are.equal(1, m:stats().routes.chat)
      assert.are.equal(1, m:stats().routes.messages)
    end)

  -- (found by helper H1: the betas were not in the fingerprint, and the first answer was replayed)
  it("the same key and body with another anthropic-beta is a 422; the same beta again is the replay", function()
    local url, m = start({ strict = true })
    local amsg = { model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = MSGS }
    assert.are.equal(200, post(url .. "/v1/messages", amsg, { ["idempotency-key"] = "k-beta" }).status)
    local res = post(url .. "/v1/messages", amsg, { ["idempotency-key"] = "k-beta",
      ["anthropic-beta"] = "token-efficient-tools-2025-02-19" })
    assert.are.equal(422, res.status, res.body)
    assert.are.equal(1, m:stats().routes.messages)
    post(url .. "/v1/messages", amsg, { ["idempotency-key"] = "k-beta-2", ["anthropic-beta"] = "a-2025-01-01" })
    res = post(url .. "/v1/messages", amsg, { ["idempotency-key"] = "k-beta-2", ["anthropic-beta"] = "a-2025-01-01" })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("true", res.headers["x-resil-replayed"])
    assert.are.equal(2, m:stats().routes.messages)
  end)

  -- (before: the store keeps an error's own fields, not the upstream's response: the replay said
  -- "HTTP 400: ..." with its code and param null, which an app reading error.code acts on)
  it("a 400 kept under the key is replayed as the upstream said it: its message, code and param", function()
    local refusal = json.encode({ error = { message = "Invalid value for 'temperature': 7 is above 2.",
      type = "invalid_request_error", param = "temperature", code = "invalid_value" } })
    local url, m = start({ strict = true, faults = { { route = "chat", probability = 1, status = 400, body = refusal } } })
    local body = { model = "openai/gpt-4o-mini", messages = MSGS, temperature = 7 }
    local a = post(url .. "/v1/chat/completions", body, { ["idempotency-key"] = "refused-1" })
    local b = post(url .. "/v1/chat/completions", body, { ["idempotency-key"] = "refused-1" })
    assert.are.equal(400, a.status, a.body)
    assert.are.equal(400, b.status, b.body)
    assert.are.equal(1, m:stats().routes.chat) -- kept: the replay called no one
    local ea, eb = json.decode(a.body).error, json.decode(b.body).error
    assert.are.same({ "Invalid value for 'temperature': 7 is above 2.", "invalid_value", "temperature" },
      { ea.message, ea.code, ea.param })
    assert.are.same({ ea.message, ea.code, ea.param, ea.type }, { eb.message, eb.code, eb.param, eb.type })
  end)
end)

describe("gateway: embeddings", function()
  it("answers POST /v1/embeddings in OpenAI's shape, priced per input token, through the ledger", function()
    local url, m = start({ strict = true })
    local res = post(url .. "/v1/embeddings", { model = "openai/text-embedding-3-small",
      input = { "tides", "moon" }, dimensions = 4 })
    assert.are.equal(200, res.status, res.body)
    local b = json.decode(res.body)
    assert.are.equal("list", b.object)
    assert.are.equal(2, #b.data)
    assert.are.equal("embedding", b.data[2].object)
    assert.are.equal(1, b.data[2].index)
    assert.are.equal(4, #b.data[1].embedding)
    assert.is_true(b.usage.prompt_tokens > 0)
    assert.are.equal(b.usage.prompt_tokens, b.usage.total_tokens)
    assert.are.equal("openai", res.headers["x-resil-provider"])
    -- $0.02 per 1M input tokens
    assert.are.equal(("%.6f"):format(b.usage.prompt_tokens * 0.02 / 1e6), res.headers["x-resil-cost-usd"])
    assert.are.equal(1, m:stats().routes.embeddings)
    -- the same text, the same vector; base64 (the SDKs' default) passes through as a string
    local again = json.decode(post(url .. "/v1/embeddings", { model = "text-embedding-3-small", input = "tides",
      dimensions = 4 }).body)
    assert.are.same(b.data[1].embedding, again.data[1].embedding)
    local b64 = json.decode(post(url .. "/v1/embeddings", { model = "text-embedding-3-small", input = "tides",
      dimensions = 4, encoding_format = "base64" }).body)
    assert.are.equal("string", type(b64.data[1].embedding))
    assert.are.equal(24, #b64.data[1].embedding) -- 4 float32s
  end)

  it("a bad request is a 400 and an upstream failure keeps its status, in OpenAI's error shape", function()
    local url = start({ strict = true, sequence = { embeddings = { 500, 500, 500, 500 } } })
    local res = post(url .. "/v1/embeddings", { model = "openai/text-embedding-3-small" })
    assert.are.equal(400, res.status)
    assert.is_string(json.decode(res.body).error.message)
    res = post(url .. "/v1/embeddings", { model = "openai/text-embedding-3-small", input = "x" })
    assert.are.equal(500, res.status)
    assert.are.equal("server_error", json.decode(res.body).error.type)
  end)

  it("ai.embed records its cost in the ledger under operation 'embed'", function()
    start({ strict = true })
    local ai = require "policies.ai"
    local r = assert(ai.embed({ model = "openai/text-embedding-3-large", input = "hello there", user = "u1" }))
    assert.are.equal(1, #r.embeddings)
    assert.are.equal(3072, #r.embeddings[1]) -- (text-embedding-3-large's size)
    assert.are.equal(r.usage.input_tokens * 0.13 / 1e6, r.cost_usd)
    local by = assert(resil.cost.breakdown("model"))
    assert.are.equal("text-embedding-3-large", by[1].key)
    assert.are.equal(1, by[1].calls)
    assert.has_error(function() ai.embed({ model = "openai/text-embedding-3-large" }) end)
    -- (before: a fallback given as one string was no fallback, without a word; a NaN deadline raised
    -- inside policies/call.lua)
    for _, bad in ipairs({ { fallback = "openai/text-embedding-3-small" }, { deadline = 0 / 0 }, { deadline = "5" } }) do
      local ok, err = pcall(function()
        local r = ai.embed({ model = "openai/text-embedding-3-large", input = "x", fallback = bad.fallback,
          deadline = bad.deadline })
        return r
      end)
      assert.is_false(ok)
      assert.matches("gateway_spec.lua:%d+: ai.embed: %a+ must be", err)
    end
  end)

  -- (before: ai.embed ignored a call's own timeout and retry: an embed given timeout = 0.3 waited
  -- for the provider's own, and was answered after the mock's 2 s)
  it("ai.embed takes a call's own timeout and retry over its provider's", function()
    local _, m = start({ strict = true, latency = 2 })
    local ai = require "policies.ai"
    local t0 = resil.now()
    local r, err = ai.embed({ model = "openai/text-embedding-3-small", input = "x", timeout = 0.3,
      retry = { max_retries = 0 } })
    assert.is_nil(r)
    assert.are.equal("timeout", err.kind)
    assert.is_true(resil.now() - t0 < 1.5, "waited for the provider's own timeout")
    assert.are.equal(1, m:stats().routes.embeddings)
    local ok, bad = pcall(function()
      local x = ai.embed({ model = "openai/text-embedding-3-small", input = "x", retry = { max_retry = 1 } })
      return x
    end)
    assert.is_false(ok)
    assert.matches("gateway_spec.lua:%d+: ai.embed: .*max_retry", bad)
  end)

  it("ai.embed: an answer refused (no vectors) but billed is in the ledger, the budget and cost_usd", function()
    local _, m = start({ strict = true })
    local n = 0
    m:configure({ routes = { ["POST /v1/embeddings"] = function()
      n = n + 1
      local data = n == 1 and {} or { { object = "embedding", index = 0, embedding = { 0.5, 0.25 } } }
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        object = "list", model = "text-embedding-3-large", data = data, usage = { prompt_tokens = 1000, total_tokens = 1000 } }) }
    end } })
    local ai = require "policies.ai"
    local b = resil.budget("embed-refused", { limit = 1 })
    local r = assert(ai.embed({ model = "openai/text-embedding-3-large", input = "hello there", budget = "embed-refused" }))
    assert.are.equal(2, n)
    assert.is_true(math.abs(r.cost_usd - 2 * 1000 * 0.13 / 1e6) < 1e-12, tostring(r.cost_usd))
    assert.are.equal(2, assert(resil.cost.breakdown("model"))[1].calls)
    assert.is_true(math.abs(b:state().spent - r.cost_usd) <= 2e-6)
    assert.are.equal(0, b:state().reserved)
  end)

  -- (before: an index given twice or past the list gave one vector for two inputs, or a list with a hole
  -- (#r.embeddings 0), as a success: a caller pairing inputs with vectors paired them wrong)
  it("ai.embed: vectors that do not match the inputs one for one are invalid output, billed", function()
    local _, m = start({ strict = true })
    local datas = {
      { { index = 0, embedding = { 1 } }, { index = 0, embedding = { 2 } } }, -- an index twice: retried
      { { index = 0, embedding = { 1 } }, { index = 5, embedding = { 2 } } }, -- past the list: retried
      { { index = 0, embedding = { 1 } }, { index = 1, embedding = { 2 } } },
      { { index = 0, embedding = { 1 } } }, -- one vector for two inputs, again: the call's failure
    }
    local n = 0
    m:configure({ routes = { ["POST /v1/embeddings"] = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        object = "list", model = "text-embedding-3-large", data = datas[n], usage = { prompt_tokens = 1000 } }) }
    end } })
    local ai = require "policies.ai"
    local r = assert(ai.embed({ model = "openai/text-embedding-3-large", input = { "a", "b" } }))
    assert.are.same({ { 1 }, { 2 } }, r.embeddings)
    assert.are.equal(3, r.attempts)
    local r2, err = ai.embed({ model = "openai/text-embedding-3-large", input = { "a", "b" } })
    assert.is_nil(r2)
    assert.are.equal("invalid_output", err.kind)
    assert.matches("1 embeddings for 2 inputs", err.message)
    assert.are.equal(4, assert(resil.cost.breakdown("model"))[1].calls) -- each answer was billed
    datas[5] = { { index = 0, embedding = { 3 } } }
    r = assert(ai.embed({ model = "openai/text-embedding-3-large", input = { 15339, 1917 } })) -- one text's tokens
    assert.are.same({ { 3 } }, r.embeddings)
  end)

  -- (before: ai.embed returned { "x", null, true } or a nested list as a vector, and the gateway
  -- relayed it with a 200: a client's array of strings, or a crash far from the cause)
  it("ai.embed: a vector holding what is not a number is invalid output, retried; a base64 string is one", function()
    local url, m = start({ strict = true })
    local datas = {
      { { object = "embedding", index = 0, embedding = { "x", json.null, true } } },
      { { object = "embedding", index = 0, embedding = { { 1, 2 }, { 3 } } } },
      { { object = "embedding", index = 0, embedding = { 0.5, 0.25 } } },
      { { object = "embedding", index = 0, embedding = "AAAAPwAAgD4=" } },
    }
    local n = 0
    m:configure({ routes = { ["POST /v1/embeddings"] = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        object = "list", model = "text-embedding-3-small", data = datas[math.min(n, #datas)],
        usage = { prompt_tokens = 3, total_tokens = 3 } }) }
    end } })
    local ai = require "policies.ai"
    local r = assert(ai.embed({ model = "openai/text-embedding-3-small", input = "tides" }))
    assert.are.same({ { 0.5, 0.25 } }, r.embeddings)
    assert.are.equal(3, r.attempts)
    r = assert(ai.embed({ model = "openai/text-embedding-3-small", input = "tides", encoding_format = "base64" }))
    assert.are.same({ "AAAAPwAAgD4=" }, r.embeddings)
    -- the gateway's client of an upstream that answers only garbage: an error, not the garbage
    n, datas = 0, { datas[1] }
    local res = post(url .. "/v1/embeddings", { model = "openai/text-embedding-3-small", input = "tides",
      encoding_format = "float" })
    assert.are_not.equal(200, res.status, res.body)
    assert.is_table(json.decode(res.body).error, res.body)
  end)

  -- (before: a usage it could not read was 0 tokens, priced $0: cost_usd 0 and no ledger row at all;
  -- then a row without a price, its budget settled at 0)
  it("ai.embed: an answer without a usage it can read is a ledger row at the input's estimate, never a $0", function()
    local _, m = start({ strict = true })
    local usages = { false, { prompt_tokens = -5, total_tokens = 1 }, { prompt_tokens = "1000" } }
    local n = 0
    m:configure({ routes = { ["POST /v1/embeddings"] = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        object = "list", model = "text-embedding-3-large", usage = usages[n] or nil,
        data = { { object = "embedding", index = 0, embedding = { 0.5, 0.25 } } } }) }
    end } })
    local ai = require "policies.ai"
    resil.budget("embed-no-usage", { limit = 1 })
    for i = 1, #usages do
      local r = assert(ai.embed({ model = "openai/text-embedding-3-large", input = "hello", budget = "embed-no-usage" }))
      assert.are.same({ 2, 0, true }, { r.usage.input_tokens, r.usage.output_tokens, r.usage.estimated }, i) -- '"hello"'
    end
    local by = assert(resil.cost.breakdown("model"))
    assert.are.same({ 3, nil }, { by[1].calls, by[1].unpriced })
    assert.are.equal(by[1].usd, resil.budget("embed-no-usage"):state().spent)
  end)

  -- (before: its vectors' bytes were counted as output, 4 a token: 52,417 output tokens in the ledger and the
  -- token metrics for an embedding, said in an error line as more than max_tokens allows)
  it("ai.embed: an answer cut after its 200 is its input's charge, without output", function()
    -- (vectors of 16: at the models' 1536 the in-process mock spent 14 s of CPU making 2,000 of them,
    -- the loop it shares with the client stood still, and under load an attempt outlived its 60 s
    -- timeout before its status was read: billed by the mock, never seen by the client)
    local _, m = start({ strict = true, dimensions = 16, sequence = { embeddings = { "truncate" } } })
    local ai = require "policies.ai"
    local input = {}
    for i = 1, 2000 do input[i] = "some text number " .. i end
    resil.budget("embed-cut", { limit = 1 })
    local r = assert(ai.embed({ model = "openai/text-embedding-3-small", input = input, budget = "embed-cut" }))
    assert.are.equal(2, m:stats().billed.responses)
    -- (the cut attempt's row is written by the task that recorded it, which may not have run yet when
    -- ai.embed returns the retry's answer: wait for it, a bounded while)
    local rows
    helpers.wait_until(function()
      rows = assert(helpers.backend(assert(resil.store())):cost_rows({}))
      return #rows >= 2
    end, 10)
    assert.are.equal(2, #rows)
    local cut
    for _, row in ipairs(rows) do
      local u = json.decode(row.units)
      if u.cut then cut = u end
    end
    assert.is_table(cut)
    assert.is_true((cut.output_tokens or 0) == 0, json.encode(cut))
    assert.is_true(cut.input_tokens >= r.usage.input_tokens) -- (estimated, at least what it was)
  end)
end)

describe("gateway: concurrency", function()
  local keys = require "resil.keys"

  -- n requests at once (the mock answers each after `latency`); -> their replies
  local function at_once(n, url, body, headers)
    local tasks, out = {}, {}
    for i = 1, n do tasks[i] = resil.spawn(post, url, body, headers) end
    for i, t in ipairs(tasks) do
      local ok, res = t:join()
      assert(ok, tostring(res))
      out[i] = res
    end
    return out
  end

  local function statuses(replies)
    local n = {}
    for _, r in ipairs(replies) do n[r.status] = (n[r.status] or 0) + 1 end
    return n
  end

  local BODY = { model = "openai/gpt-4o-mini", messages = MSGS }

  it("past max_concurrent and its queue a request is a 503 with Retry-After, in OpenAI's shape", function()
    local url, m = start({ strict = true, latency = 1 }, { max_concurrent = 2, queue = 0 })
    local replies = at_once(3, url .. "/v1/chat/completions", BODY)
    assert.are.same({ [200] = 2, [503] = 1 }, statuses(replies))
    for _, r in ipairs(replies) do
      if r.status == 503 then
        assert.are.equal("1", r.headers["retry-after"])
        local e = json.decode(r.body).error
        assert.are.equal("too_many_concurrent_requests", e.code)
        assert.are.equal("server_error", e.type)
      end
    end
    assert.are.equal(2, m:stats().total)
    -- the permits came back
    assert.are.same({ [200] = 2 }, statuses(at_once(2, url .. "/v1/chat/completions", BODY)))
  end)

  it("a request within the queue waits for a permit instead", function()
    local url = start({ strict = true, latency = 0.05 }, { max_concurrent = 1, queue = 4 })
    assert.are.same({ [200] = 3 }, statuses(at_once(3, url .. "/v1/chat/completions", BODY)))
  end)

  it("keys add --concurrency N: the key's own limit; other keys are not held up", function()
    local url = start({ strict = true, latency = 1 }, { auth = true, queue = 0 })
    local one = assert(keys.add({ name = "one-at-a-time", concurrency = 1 }))
    local other = assert(keys.add({ name = "other" }))
    local tasks = {
      resil.spawn(post, url .. "/v1/chat/completions", BODY, { authorization = "Bearer " .. one }),
      resil.spawn(post, url .. "/v1/chat/completions", BODY, { authorization = "Bearer " .. one }),
      resil.spawn(post, url .. "/v1/chat/completions", BODY, { authorization = "Bearer " .. other }),
      resil.spawn(post, url .. "/v1/embeddings", { model = "openai/text-embedding-3-small", input = "x" },
        { authorization = "Bearer " .. other }),
    }
    local got = {}
    for i, t in ipairs(tasks) do got[i] = select(2, t:join()).status end
    table.sort(got, function(a, b) return a > b end)
    assert.are.same({ 503, 200, 200, 200 }, got)
    assert.has_error(function() keys.add({ name = "bad", concurrency = 0 }) end)
  end)

  -- (before: the call went on upstream while its permit was given back: five clients that gave up
  -- one after another had five calls running at once under a limit of one)
  it("a call whose client gave up keeps its permit until it ends", function()
    local url, m = start({ strict = true, latency = 1 }, { max_concurrent = 1, queue = 0 })
    local res, err = http.request({ method = "POST", url = url .. "/v1/chat/completions", timeout = 0.2,
      body = json.encode(BODY), headers = { ["content-type"] = "application/json" } })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(503, post(url .. "/v1/chat/completions", BODY).status) -- its call still runs upstream
    assert.is_true(helpers.wait_until(function() return resil.cost.breakdown("model")[1] ~= nil end, 5))
    -- (its row can be read a moment before its task has ended and given the permit back: a
    -- loaded machine saw a 503 here; each such try is refused before any call upstream)
    assert.is_true(helpers.wait_until(function() return post(url .. "/v1/chat/completions", BODY).status == 200 end, 5))
    assert.are.equal(2, m:stats().routes.chat)
  end)

  it("a stream keeps its permit until it ends", function()
    local url, m = start({ strict = true, reply = ("w "):rep(100), stream_interval = 0.02 },
      { max_concurrent = 1, queue = 0 })
    local streaming = resil.spawn(events_of, url .. "/v1/chat/completions",
      { model = "openai/gpt-4o-mini", messages = MSGS, stream = true })
    -- the stream is under way upstream (it lasts 2 s)
    assert.is_true(helpers.wait_until(function() return m:stats().total == 1 end, 5))
    assert.are.equal(503, post(url .. "/v1/chat/completions", BODY).status)
    local ok, evs = streaming:join()
    assert.is_true(ok)
    assert.are.equal("[DONE]", evs[#evs].data)
    assert.are.equal(200, post(url .. "/v1/chat/completions", BODY).status)
  end)
end)

describe("gateway: slow clients", function()
  -- a client that sends part of a request and waits: raw bytes over bash's /dev/tcp
  local function half_request(port, bytes, out)
    os.execute(([[bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; printf "%s" >&3; timeout 5 cat <&3' > %s 2>&1 &]]):format(
      port, bytes, out))
  end

  it("one that stalls in its headers or its body is a 408 at read_timeout; the gateway serves others meanwhile",
    function()
      local url, m = start({ strict = true }, { read_timeout = 0.2 })
      local port = tonumber(url:match(":(%d+)$"))
      local slow_headers, slow_body = helpers.tmpname(".out"), helpers.tmpname(".out")
      half_request(port, [[POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le]], slow_headers)
      half_request(port, [[POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mo]],
        slow_body)
      -- served while both are stalled
      assert.are.equal(200, post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS }).status)
      for _, out in ipairs({ slow_headers, slow_body }) do
        assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("\r\n\r\n.") ~= nil end, 10))
        assert.matches("^HTTP/1%.1 408 Request Timeout\r\n", helpers.slurp(out))
      end
      assert.are.equal(1, m:stats().total) -- neither reached a handler task
    end)
end)

describe("gateway: virtual keys", function()
  local keys = require "resil.keys"

  local function bearer(k) return { authorization = "Bearer " .. k } end

  it("an unknown key, a missing one and a revoked one are 401s in OpenAI's shape", function()
    local url, m = start({ strict = true }, { auth = true })
    local key = assert(keys.add({ name = "team-a" }))
    local body = { model = "openai/gpt-4o-mini", messages = MSGS }
    assert.are.equal(200, post(url .. "/v1/chat/completions", body, bearer(key)).status)
    local res = post(url .. "/v1/chat/completions", body, bearer("sk-resil-nope"))
    assert.are.equal(401, res.status)
    assert.are.equal("invalid_api_key", json.decode(res.body).error.code)
    assert.are.equal(401, post(url .. "/v1/chat/completions", body).status)
    assert.are.equal(1, keys.revoke("team-a"))
    assert.are.equal(401, post(url .. "/v1/chat/completions", body, bearer(key)).status)
    assert.are.equal(1, m:stats().total)
    -- rotating: the name is free again once its key is revoked; a live one is not
    local rotated = assert(keys.add({ name = "team-a" }))
    assert.are_not.equal(key, rotated)
    assert.are.equal("exists", select(2, keys.add({ name = "team-a" })).kind)
  end)

  -- (before: the Messages route told an Anthropic client, whose SDK sends x-api-key, to send
  -- Authorization: Bearer)
  it("a missing key's 401 names the header each API's clients send", function()
    local url = start({ strict = true }, { auth = true })
    local chat = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
    assert.matches("send Authorization: Bearer <key>", json.decode(chat.body).error.message, 1, true)
    local msgs = post(url .. "/v1/messages", { model = "anthropic/claude-haiku-4-5", max_tokens = 16, messages = MSGS },
      { ["anthropic-version"] = "2023-06-01" })
    assert.are.equal(401, msgs.status)
    assert.are.equal("authentication_error", json.decode(msgs.body).error.type)
    assert.matches("send x-api-key: <key>", json.decode(msgs.body).error.message, 1, true)
  end)

  it("the key's models only; its own rate limit is a 429 with Retry-After", function()
    local url = start({ strict = true }, { auth = true })
    local key = assert(keys.add({ name = "team-b", rpm = 1, models = { "fast" } }))
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o", messages = MSGS }, bearer(key))
    assert.are.equal(403, res.status)
    assert.are.equal(200, post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS }, bearer(key)).status)
    res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS }, bearer(key))
    assert.are.equal(429, res.status)
    assert.is_true(tonumber(res.headers["retry-after"]) >= 1)
    assert.are.equal("rate_limit_exceeded", json.decode(res.body).error.code)
  end)

  it("the key's tokens per minute count the body and max_tokens while its call runs, CJK text at 2 bytes a token",
    function()
      local url = start({ strict = true, latency = 5 }, { auth = true })
      resil.clock.virtual()
      finally(function() resil.clock.real() end)
      local function ask(key, content, most)
        return post(url .. "/v1/chat/completions", { model = "fast", max_tokens = most,
          messages = { { role = "user", content = content } } }, bearer(key))
      end
      -- about 60 tokens of body and 600 of answer, counted while the call runs: the next 660 do not fit
      local key = assert(keys.add({ name = "team-t", tpm = 1000 }))
      local first = resil.spawn(ask, key, "hi", 600)
      resil.sleep(1)
      local res = ask(key, "hi", 600)
      assert.are.equal(429, res.status)
      assert.is_true(tonumber(res.headers["retry-after"]) >= 1)
      assert.matches("1000 tokens per minute", json.decode(res.body).error.message, 1, true)
      assert.are.equal(200, select(2, first:join()).status)
      -- another key: 300 CJK characters (900 bytes) are 450 tokens or more, not 225
      local cjk = assert(keys.add({ name = "team-cjk", tpm = 500 }))
      first = resil.spawn(ask, cjk, ("日本語"):rep(100), 40)
      resil.sleep(1)
      assert.are.equal(429, ask(cjk, "hi", 40).status)
      assert.are.equal(200, select(2, first:join()).status)
    end)

  -- (before: a request its tpm refused had spent a token of its rpm all the same: a key's next request,
  -- within both of its limits, was a 429, "2 requests per minute", for requests never served)
  it("a request the key's tokens per minute refuse spends none of its requests per minute", function()
    local url = start({ strict = true, latency = 5 }, { auth = true })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local function ask(key) return post(url .. "/v1/chat/completions", { model = "fast", max_tokens = 600,
      messages = { { role = "user", content = "hi" } } }, bearer(key)) end
    local key = assert(keys.add({ name = "team-rt", rpm = 2, tpm = 1000 }))
    local first = resil.spawn(ask, key)
    resil.sleep(1)
    for _ = 1, 3 do
      local res = ask(key)
      assert.are.equal(429, res.status)
      assert.matches("1000 tokens per minute", json.decode(res.body).error.message, 1, true)
    end
    assert.are.equal(200, select(2, first:join()).status) -- (its answer used few: its estimate goes back)
    local res = ask(key)
    assert.are.equal(200, res.status, res.body)
    res = ask(key)
    assert.are.equal(429, res.status)
    assert.matches("2 requests per minute", json.decode(res.body).error.message, 1, true)
  end)

  -- (before: the estimate stayed charged whatever the answer used: a key asking in Japanese with a
  -- max_tokens its answers did not reach was refused at about a third of its tpm, and one whose
  -- answers were longer than an estimate without max_tokens was let through five times its tpm)
  -- (On the real clock: the virtual one jumps a minute at the gateway's first stream here, which
  -- fills a per-minute bucket again. Time only gives tokens back: each bound a slow run could
  -- pass is seconds of the rate away.)
  it("the key's tokens per minute are corrected by the usage each answer reports, streamed or not, both ways",
    function()
      local url, m = start({ strict = true, reply = "ok" }, { auth = true })
      local function used_by(res) -- an answer's tokens, from its body or its stream's usage chunk
        if not res.headers["content-type"]:find("event-stream", 1, true) then return json.decode(res.body).usage.total_tokens end
        local usage
        for data in res.body:gmatch("data: ([^\n]+)") do
          local d = json.decode(data)
          if type(d) == "table" and type(d.usage) == "table" then usage = d.usage end
        end
        return usage.total_tokens
      end
      -- requests, every other one streamed, until the key's tpm refuses one -> how many were served,
      -- the tokens their answers used
      local function served_until_refused(key, content, most)
        local used = 0
        for i = 1, 30 do
          local stream = i % 2 == 0 or nil
          local res = post(url .. "/v1/chat/completions", { model = "fast", max_tokens = most, stream = stream,
            stream_options = stream and { include_usage = true }, messages = { { role = "user", content = content } } },
            bearer(key))
          if res.status == 429 then return i - 1, used end
          assert.are.equal(200, res.status, res.body)
          used = used + used_by(res)
        end
        error("never refused")
      end
      -- about 570 tokens estimated (Japanese at 2 bytes a token, and max_tokens), 226 used: the rest
      -- given back after each answer
      local ja = assert(keys.add({ name = "team-ja", tpm = 1400 }))
      local served, used = served_until_refused(ja, ("日本語"):rep(100), 100)
      -- (before: 2, the third's estimate past 1,400 by 300; 5 when a slow run got 70 back meanwhile)
      assert.is_true(served == 4 or served == 5, served .. " served")
      assert.are.equal(served * 226, used)
      -- about 20 tokens estimated (no max_tokens), 101 used: the rest taken after each answer
      m:configure({ strict = true, reply = ("word "):rep(100) })
      local long = assert(keys.add({ name = "team-long", tpm = 280 }))
      served, used = served_until_refused(long, "hi", nil)
      -- (before: 13; 4 when a slow run got 43 back meanwhile)
      assert.is_true(served == 3 or served == 4, served .. " served")
      assert.are.equal(served * 101, used)
    end)

  -- (before: a replay kept its whole estimate on the key, though it called no provider: an SDK's
  -- retries under one Idempotency-Key used up the key's tpm)
  it("an Idempotency-Key replay takes nothing from its key's tokens per minute", function()
    local url, m = start({ strict = true, reply = "ok" }, { auth = true })
    local key = assert(keys.add({ name = "team-replay", tpm = 500 }))
    local body = { model = "fast", max_tokens = 200, messages = { { role = "user", content = "hi" } } }
    local headers = bearer(key)
    headers["idempotency-key"] = "replayed-often"
    for _ = 1, 6 do -- about 210 tokens estimated each: the third would not fit if replays were charged
      local res = post(url .. "/v1/chat/completions", body, headers)
      assert.are.equal(200, res.status, res.body)
    end
    assert.are.equal(1, m:stats().routes.chat)
  end)

  -- (before: the key's rate limits came before the lookup: an SDK retrying after a timeout, its
  -- key's tpm spent by that very first call, got 429s instead of the answer it had paid for)
  it("an Idempotency-Key replay is served while its key's tpm or rpm is spent; a new request is still a 429",
    function()
      local url, m = start({ strict = true, reply = ("word "):rep(100) }, { auth = true })
      local function replays()
        local text = assert(http.request({ url = url .. "/metrics" })).body
        return tonumber(text:match("\nresil_once_replays_total (%S+)")) or 0
      end
      -- about 20 tokens estimated, 101 used: the first answer leaves the key's 60 a minute in debt
      local spent_tpm = assert(keys.add({ name = "team-tpm", tpm = 60 }))
      local spent_rpm = assert(keys.add({ name = "team-rpm", rpm = 1 }))
      local body = { model = "fast", messages = { { role = "user", content = "hi" } } }
      for i, key in ipairs({ spent_tpm, spent_rpm }) do
        local h = bearer(key)
        h["idempotency-key"] = "timed-out-" .. i
        local first = post(url .. "/v1/chat/completions", body, h)
        assert.are.equal(200, first.status, first.body)
        local before = replays()
        local again = post(url .. "/v1/chat/completions", body, h)
        assert.are.equal(200, again.status, again.body)
        assert.are.equal("true", again.headers["x-resil-replayed"])
        assert.are.equal("0.000000", again.headers["x-resil-cost-usd"])
        assert.are.equal(json.decode(first.body).id, json.decode(again.body).id)
        assert.are.equal(before + 1, replays())
        -- the key's limits still hold for anything else: a request without the key, and another
        -- body under it (not a replay: refused as before, by the limit)
        assert.are.equal(429, post(url .. "/v1/chat/completions", body, bearer(key)).status)
        local other = { model = "fast", messages = { { role = "user", content = "something else" } } }
        assert.are.equal(429, post(url .. "/v1/chat/completions", other, h).status)
      end
      assert.are.equal(2, m:stats().routes.chat)
    end)

  -- Three clients that give up on a call of `path` before its answer (a key with a budget): the
  -- calls are finished and recorded, their cost in the key's budget, no hold left behind
  local function clients_give_up(path, body, route, mock)
    local url, m = start(mock, { auth = true })
    local name = "impatient-" .. route
    local key = assert(keys.add({ name = name, budget = "10/day" }))
    for _ = 1, 3 do
      local res, err = http.request({ method = "POST", url = url .. path, timeout = 0.2, body = json.encode(body),
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
      assert.is_nil(res)
      assert.are.equal("timeout", err.kind)
    end
    assert.is_true(helpers.wait_until(function()
      local rows = resil.cost.breakdown("model")[1]
      return rows and rows.calls == 3
    end, 10), "the three calls were not recorded")
    assert.are.equal(3, m:stats().routes[route])
    assert.are.equal(3, m:stats().billed.responses)
    local state = assert(resil.budget("key:" .. name):state())
    assert.are.same({ 0, 0 }, { #state.holds, state.reserved })
    assert.is_true(math.abs(state.spent - resil.cost.total({})) <= 3e-6, state.spent .. " spent")
    assert.is_true(state.spent > 0)
  end

  -- (before: the upstream transfer was aborted and the hold given back, though the provider bills a
  -- call its client left: 30 such calls spent 3.6 times a key's budget with nothing in its ledger)
  it("a call whose client gives up is finished and recorded, its cost in the key's budget", function()
    clients_give_up("/v1/chat/completions", { model = "gpt-4o-mini", messages = MSGS }, "chat",
      { strict = true, reply = "a slow answer", latency = 0.5 })
  end)

  -- (before: an embeddings call was aborted when its client left, its hold given back: the provider
  -- billed it, and neither the ledger nor the key's budget knew)
  it("an embeddings call whose client gives up is finished and recorded, its cost in the key's budget", function()
    clients_give_up("/v1/embeddings", { model = "openai/text-embedding-3-small", input = ("tides and moons "):rep(200) },
      "embeddings", { strict = true, latency = 0.5 })
  end)

  -- A client that gives up on a call of `path` (its SDK's timeout) while the call's first attempt
  -- is upstream, the upstream answering after 5 s
  local function give_up_on(url, path, body, headers)
    local h = { ["content-type"] = "application/json" }
    for k, v in pairs(headers or {}) do h[k] = v end
    local res, err = http.request({ method = "POST", url = url .. path, timeout = 1, body = json.encode(body),
      headers = h })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
  end

  -- (before: the call went on for a client that was gone, retried three times and fell back to
  -- Anthropic, all the while on the key's one permit: a frozen upstream held it some eight minutes,
  -- and an SDK that timed out and retried filled its key's concurrency with calls nobody read)
  for _, case in ipairs({
    { what = "a chat with a fallback", path = "/v1/chat/completions", route = "chat",
      body = { model = "fast", messages = MSGS } },
    { what = "an embeddings call", path = "/v1/embeddings", route = "embeddings",
      body = { model = "openai/text-embedding-3-small", input = "tides" } },
  }) do
    it(case.what .. " whose client left makes no new attempt: its attempt upstream fails (a 500), and no retry " ..
      "or fallback follows; its key's permit and hold are given back, nothing recorded", function()
      local url, m = start({ strict = true, latency = 5, faults = { { route = case.route, status = 500 } } },
        { auth = true, queue = 0 })
      resil.clock.virtual()
      finally(function() resil.clock.real() end)
      local name = "left-" .. case.route
      local key = assert(keys.add({ name = name, budget = "10/day", concurrency = 1 }))
      give_up_on(url, case.path, case.body, bearer(key))
      -- the key's one permit is the call's while its attempt is upstream, and free once that failed
      -- (the probe, of the other route, reaches the mock only once it has the permit)
      local probe = case.route == "chat" and { "/v1/embeddings", { model = "text-embedding-3-small", input = "x" } }
        or { "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS } }
      assert.are.equal(503, post(url .. probe[1], probe[2], bearer(key)).status)
      local status
      for _ = 1, 200 do
        status = post(url .. probe[1], probe[2], bearer(key)).status
        if status ~= 503 then break end
        resil.sleep(0.5)
      end
      assert.are.equal(200, status)
      -- the attempt its client left, and no other (no fallback to Anthropic); and the probe
      local other = case.route == "chat" and "embeddings" or "chat"
      assert.are.same({ [case.route] = 1, [other] = 1 }, m:stats().routes)
      local state = assert(resil.budget("key:" .. name):state())
      assert.are.same({ 0, 0 }, { #state.holds, state.reserved })
      -- the 500 was not billed: the only row is the probe's
      local rows = assert(resil.cost.breakdown("model"))
      assert.are.equal(1, #rows)
      assert.are.equal(case.route == "chat" and "text-embedding-3-small" or "gpt-4o-mini", rows[1].key)
    end)
  end

  -- (before: the attempt started once the provider's permit came, for a client long gone: billed,
  -- read by nobody, on the key's permit and budget all that while)
  it("a call whose client left while it waited in its provider's queue (concurrency) sends no attempt " ..
    "once the permit comes; its hold is given back, nothing recorded", function()
    local url, m = start({ strict = true, reply = "a slow answer", latency = 5 }, { auth = true })
    local m_url = m.url
    require("policies.ai").configure("openai", { base_url = m_url .. "/v1", api_key = "sk-test-123456",
      retry = { base = 0.001, cap = 0.005 }, concurrency = { size = 1, queue = 10 } })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local key = assert(keys.add({ name = "left-queued", budget = "10/day" }))
    local body = { model = "openai/gpt-4o-mini", messages = MSGS }
    -- the provider's one permit, held by a call upstream for 5 s
    local first = resil.spawn(post, url .. "/v1/chat/completions", body, bearer(key))
    resil.sleep(0.5)
    give_up_on(url, "/v1/chat/completions", body, bearer(key)) -- queued behind it, gone after 1 s
    local _, res = first:join()
    assert.are.equal(200, res.status, res.body)
    resil.sleep(10)
    assert.are.same({ chat = 1 }, m:stats().routes) -- the first call's; none for the client that left
    assert.are.equal(1, assert(resil.cost.breakdown("model"))[1].calls)
    local state = assert(resil.budget("key:left-queued"):state())
    assert.are.same({ 0, 0 }, { #state.holds, state.reserved })
  end)

  -- (before: the call its client left retried and kept the answer of the retry under the key)
  it("with an Idempotency-Key: the failure of the attempt its client left is not kept, so the client's retry " ..
    "with the key is served anew; an answer that comes after its client left is kept and replayed", function()
    local url, m = start({ strict = true, latency = 5, sequence = { chat = { 500 } } }, { auth = true })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local key = assert(keys.add({ name = "left-keyed", budget = "10/day" }))
    local body = { model = "fast", messages = MSGS }
    local headers = bearer(key)
    headers["idempotency-key"] = "left-then-retried"
    give_up_on(url, "/v1/chat/completions", body, headers)
    -- the retry waits for the call still running under the key, then runs its own
    local res = post(url .. "/v1/chat/completions", body, headers)
    assert.are.equal(200, res.status, res.body)
    assert.is_nil(res.headers["x-resil-replayed"])
    assert.are.equal("1", res.headers["x-resil-attempts"])
    assert.are.same({ chat = 2 }, m:stats().routes) -- the 500 its client left, and the retry's
    -- an answer that comes after its client left: kept under its key, recorded once
    headers["idempotency-key"] = "left-then-answered"
    give_up_on(url, "/v1/chat/completions", body, headers)
    res = post(url .. "/v1/chat/completions", body, headers)
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("true", res.headers["x-resil-replayed"])
    assert.are.same({ chat = 3 }, m:stats().routes)
    assert.are.equal(2, assert(resil.cost.breakdown("model"))[1].calls)
    local state = assert(resil.budget("key:left-keyed"):state())
    assert.are.same({ 0, 0 }, { #state.holds, state.reserved })
    assert.is_true(math.abs(state.spent - resil.cost.total({})) <= 2e-6, state.spent .. " spent")
  end)

  -- (before: the fallback not tried for a client gone ended the call with the first provider's
  -- context overflow, which, permanent, was kept under the key: the client's retry got that 400 for
  -- a day, though the fallback's longer context serves it)
  it("with an Idempotency-Key: a permanent failure the fallback would have moved on from, which came after its " ..
    "client left, is not kept; the client's retry with the key is served by the fallback", function()
    local url, m = start({ strict = true, latency = 5,
      faults = { { route = "chat", probability = 1, status = 400, error_code = "context_length_exceeded" } } },
      { auth = true })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local key = assert(keys.add({ name = "left-overflow", budget = "10/day" }))
    local body = { model = "fast", messages = MSGS }
    local headers = bearer(key)
    headers["idempotency-key"] = "left-before-overflow"
    give_up_on(url, "/v1/chat/completions", body, headers)
    local res = post(url .. "/v1/chat/completions", body, headers)
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("anthropic", res.headers["x-resil-provider"])
    assert.is_nil(res.headers["x-resil-replayed"])
    assert.are.same({ chat = 2, messages = 1 }, m:stats().routes) -- the 400 its client left, then the retry's
    local state = assert(resil.budget("key:left-overflow"):state())
    assert.are.same({ 0, 0 }, { #state.holds, state.reserved })
  end)

  it("an exhausted budget is refused before any provider is called, with x-should-retry: false", function()
    local url, m = start({ strict = true }, { auth = true })
    local key = assert(keys.add({ name = "team-c", budget = "0.000001/day" }))
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS,
      max_tokens = 1000 }, bearer(key))
    assert.are.equal(429, res.status)
    assert.are.equal("false", res.headers["x-should-retry"])
    assert.are.equal("insufficient_quota", json.decode(res.body).error.code)
    assert.are.equal(0, m:stats().total)
  end)

  -- (before: a call was held at the standard price, then recorded at priority's, about twice it:
  -- calls at once on a key near its budget spent past it)
  it("a project that defaults to OpenAI's priority tier: its calls are held at the priority price, once its " ..
    "answers said so or from the first when the provider's config says service_tier", function()
    local pricing = require "policies.pricing"
    local url, m = start({ strict = true, service_tier = "priority", latency = 5 }, { auth = true })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local key = assert(keys.add({ name = "team-priority", budget = "1/day" }))
    local function ask(k, model) -- -> the key's hold while the call runs, its status, the answer
      local call = resil.spawn(post, url .. "/v1/chat/completions", { model = model, max_tokens = 1000,
        messages = MSGS }, bearer(k))
      resil.sleep(1)
      local held = assert(resil.budget("key:team-priority"):state()).reserved
      local _, res = call:join()
      return held, res.status, res
    end
    local output_at = function(model, tier)
      return pricing.cost("openai", model, { output_tokens = 1000, service_tier = tier })
    end
    -- the first answer says priority, though the request asked none: the next are held at its price
    local _, status = ask(key, "openai/gpt-4o-mini")
    assert.are.equal(200, status)
    local held
    held, status = ask(key, "openai/gpt-4o-mini")
    assert.are.equal(200, status)
    assert.is_true(held >= output_at("gpt-4o-mini", "priority"), held .. " held")
    -- said in the provider's config: sent (this provider answers priority only when asked now), and
    -- held at its price from the first call; a budget with room for the standard price only is
    -- refused before any call
    m:configure({ strict = true, latency = 5 })
    require("policies.ai").configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
      service_tier = "priority" })
    local calls = m:stats().total
    local between = (output_at("gpt-4.1-mini") + output_at("gpt-4.1-mini", "priority")) / 2
    local tight = assert(keys.add({ name = "team-tight", budget = ("%.6f/day"):format(between) }))
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4.1-mini", max_tokens = 1000, messages = MSGS },
      bearer(tight))
    assert.are.equal(429, res.status, res.body)
    assert.are.equal("insufficient_quota", json.decode(res.body).error.code)
    assert.are.equal(calls, m:stats().total)
    held, status, res = ask(key, "openai/gpt-4.1-mini")
    assert.are.equal(200, status)
    assert.is_true(held >= output_at("gpt-4.1-mini", "priority"), held .. " held")
    assert.are.equal("priority", json.decode(res.body).service_tier)
  end)

  -- (an image sent by link is a few bytes of the request, estimated as that many tokens, and
  -- billed as thousands: four such requests at once spent $0.31 of a $0.2 budget)
  it("a budget holds what a request's images may cost: a burst of requests with images by link does not " ..
    "spend past the limit", function()
    local function billed(req) -- as OpenAI bills gpt-4o-mini: 25,501 tokens a high-detail 2048x512 image
      local images = 0
      for _, msg in ipairs(json.decode(req.body).messages) do
        if type(msg.content) == "table" then
          for _, part in ipairs(msg.content) do if part.type == "image_url" then images = images + 1 end end
        end
      end
      local prompt = 10 + images * 25501
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-img", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = "ok" }, finish_reason = "stop" } },
        usage = { prompt_tokens = prompt, completion_tokens = 1, total_tokens = prompt + 1 } }) }
    end
    local url, m = start({ latency = 0.2, routes = { ["POST /v1/chat/completions"] = billed } }, { auth = true })
    local key = assert(keys.add({ name = "vision", budget = "0.2/day" }))
    local parts = { { type = "text", text = "describe these" } }
    for i = 1, 20 do
      parts[#parts + 1] = { type = "image_url", image_url = { url = "https://img.example/" .. i .. ".png", detail = "high" } }
    end
    local clients = {}
    for i = 1, 4 do
      clients[i] = resil.spawn(function()
        return post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", max_tokens = 16,
          messages = { { role = "user", content = parts } } }, bearer(key)).status
      end)
    end
    local answered = 0
    for _, c in ipairs(clients) do
      local _, status = c:join()
      assert.is_true(status == 200 or status == 429, tostring(status))
      if status == 200 then answered = answered + 1 end
    end
    assert.is_true(answered >= 1)
    assert.are.equal(answered, m:stats().total)
    local state = assert(resil.budget("key:vision"):state())
    assert.is_true(state.spent <= 0.2, state.spent .. " spent of 0.2")
    assert.are.equal(0, state.reserved)
  end)

  -- (Anthropic bills each search of its web search tool, $10 per 1,000, besides the tokens: the
  -- ledger and the key's budget counted the tokens only, and a budget reserved no search)
  it("Anthropic's web search tool: each search is in the ledger and the budget; a budget reserves max_uses " ..
    "searches, and one without max_uses is a 400", function()
    local function searched(req)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "msg_s", type = "message", role = "assistant", model = "claude-haiku-4-5",
        content = { { type = "text", text = "found it" } }, stop_reason = "end_turn", stop_sequence = json.null,
        usage = { input_tokens = 1000, output_tokens = 100, server_tool_use = { web_search_requests = 3 } } }) }
    end
    local url, m = start({ routes = { ["POST /v1/messages"] = searched } }, { auth = true })
    local key = assert(keys.add({ name = "searcher", budget = "0.5/day" }))
    local function ask(max_uses)
      return post(url .. "/v1/messages", { model = "anthropic/claude-haiku-4-5", max_tokens = 200, messages = MSGS,
        tools = { { type = "web_search_20250305", name = "web_search", max_uses = max_uses } } }, bearer(key))
    end
    local res = ask(5)
    assert.are.equal(200, res.status, res.body)
    local usd = 1000 * 1.00 / 1e6 + 100 * 5.00 / 1e6 + 3 * 0.01 -- claude-haiku-4-5's tokens and 3 searches
    assert.are.equal(("%.6f"):format(usd), res.headers["x-resil-cost-usd"])
    assert.is_true(helpers.wait_until(function()
      return math.abs(resil.budget("key:searcher"):state().spent - usd) < 1e-9
    end, 10))
    assert.is_true(math.abs(resil.cost.total({ budget = "key:searcher" }) - usd) < 1e-9)
    res = ask(nil) -- as many searches as the model wants: nothing a budget can hold
    assert.are.equal(400, res.status)
    assert.matches("max_uses", json.decode(res.body).error.message)
    res = ask(100) -- $1 of searches on a $0.5 budget
    assert.are.equal(429, res.status)
    assert.are.equal(1, m:stats().total)
  end)

  it("a budget holds what a request may cost: tools, system blocks and a response format count, a max_tokens " ..
     "past any budget is " ..
     "refused as the budget's, and n other than 1 is a 400", function()
    local url, m = start({ strict = true }, { auth = true })
    local key = assert(keys.add({ name = "team-big", budget = "0.01/day" }))
    local long = ("x"):rep(400000) -- some 100,000 tokens: $0.015 of gpt-4o-mini's input, more of haiku's
    local cases = {
      { "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 16,
        tools = { { type = "function", ["function"] = { name = "f", description = long,
          parameters = { type = "object", properties = {} } } } } } },
      { "/v1/messages", { model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 16,
        system = { { type = "text", text = long } } } },
      { "/v1/messages", { model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 16,
        tools = { { name = "f", description = long, input_schema = { type = "object" } } } } },
      { "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 16,
        response_format = { type = "json_schema", json_schema = { name = "s", schema = { type = "object",
          description = long } } } } },
      { "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 1 << 62 } },
    }
    for i, c in ipairs(cases) do
      local res = post(url .. c[1], c[2], bearer(key))
      assert.are.equal(429, res.status, i .. ": " .. res.body)
      assert.are.equal("false", res.headers["x-should-retry"], i)
    end
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 16,
      n = 3 }, bearer(key))
    assert.are.equal(400, res.status, res.body)
    assert.are.equal("unsupported_value", json.decode(res.body).error.code)
    assert.are.equal(0, m:stats().total)
    -- what fits is served
    assert.are.equal(200, post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS,
      max_tokens = 16, n = 1 }, bearer(key)).status)
  end)

  it("a model without a price on a budgeted key is the client's 400 (model_not_priced), not a 500 an SDK retries",
     function()
    local url, m = start({ strict = true }, { auth = true })
    local key = assert(keys.add({ name = "team-typo", budget = "10/day" }))
    for _, path in ipairs({ "/v1/chat/completions", "/v1/messages" }) do
      local res = post(url .. path, { model = "openai/gpt-4o-minni", messages = MSGS, max_tokens = 16 }, bearer(key))
      assert.are.equal(400, res.status, res.body)
      local b = json.decode(res.body)
      if path == "/v1/messages" then assert.are.equal("invalid_request_error", b.error.type)
      else assert.are.equal("model_not_priced", b.error.code) end
      assert.matches("gpt%-4o%-minni", b.error.message)
    end
    assert.are.equal(0, m:stats().total)
  end)

  -- (before: the refusal was kept under the key, and the client's retry with it got the 400 for a
  -- day after the operator priced the model)
  it("with an Idempotency-Key: model_not_priced is not kept; once the model has a price, the retry is served",
    function()
      local url, m = start({ strict = true }, { auth = true })
      local key = assert(keys.add({ name = "team-new-model", budget = "10/day" }))
      local headers = bearer(key)
      headers["idempotency-key"] = "before-the-price"
      local body = { model = "openai/gpt-4o-mini-new", messages = MSGS, max_tokens = 16 }
      local res = post(url .. "/v1/chat/completions", body, headers)
      assert.are.equal(400, res.status, res.body)
      assert.are.equal("model_not_priced", json.decode(res.body).error.code)
      local prices = require("policies.pricing").models.openai
      prices["gpt-4o-mini-new"] = { input = 0.15, output = 0.60 }
      finally(function() prices["gpt-4o-mini-new"] = nil end)
      res = post(url .. "/v1/chat/completions", body, headers)
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(1, m:stats().total)
    end)

  -- (before: the 404 was kept under the key, and the client's retry with it got the 404 for a day
  -- after the operator pinned the alias to a model the provider serves)
  it("with an Idempotency-Key: the upstream's 404 for a model it does not serve is not kept; once the alias is " ..
    "pinned again, the retry is served", function()
      local url, m, gateway = start({ strict = true,
        faults = { { route = "chat", model = "gpt-4o-retired", probability = 1, status = 404,
          error_code = "model_not_found" } } }, { auth = true })
      gateway.configure({ models = { team = "openai/gpt-4o-retired" } })
      local key = assert(keys.add({ name = "team-repinned" }))
      local headers = bearer(key)
      headers["idempotency-key"] = "before-the-repin"
      local body = { model = "team", messages = MSGS }
      local res = post(url .. "/v1/chat/completions", body, headers)
      assert.are.equal(404, res.status, res.body)
      gateway.configure({ models = { team = "openai/gpt-4o-mini" } })
      res = post(url .. "/v1/chat/completions", body, headers)
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("gpt-4o-mini", res.headers["x-resil-model"])
      assert.are.equal(2, m:stats().routes.chat)
    end)

  it("a store that cannot be read is a 503 with Retry-After, never a 401 that is then cached", function()
    local url, m = start({ strict = true }, { auth = true, key_cache = 60 })
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    local key = assert(keys.add({ name = "team-outage" }))
    local body = { model = "openai/gpt-4o-mini", messages = MSGS }
    resil.store_config({ url = helpers.write(helpers.tmpname(".file"), "") .. "/state.db" }) -- cannot be opened
    for _, path in ipairs({ "/v1/chat/completions", "/v1/messages" }) do
      local res = post(url .. path, body, bearer(key))
      assert.are.equal(503, res.status, res.body)
      assert.are.equal("1", res.headers["retry-after"])
      local b = json.decode(res.body)
      if path == "/v1/messages" then assert.are.equal("api_error", b.error.type)
      else assert.are.equal("store_unavailable", b.error.code) end
    end
    resil.store_config({ url = db }) -- back: the key is served at once, whatever key_cache says
    assert.are.equal(200, post(url .. "/v1/chat/completions", body, bearer(key)).status)
    assert.are.equal(1, m:stats().total)
  end)

  it("a key index that cannot be read is an error for keys add and revoke, not an empty list to overwrite", function()
    start({ strict = true }, { auth = true })
    assert(keys.add({ name = "first" }))
    local s = resil.store()
    local text = assert(s:get("gateway:keys"))
    assert(s:set("gateway:keys", text:sub(1, -2))) -- cut by a bad restore
    local key, err = keys.add({ name = "second" })
    assert.is_nil(key)
    assert.are.equal("store_corrupt", err.kind)
    assert.is_nil((keys.revoke("first")))
    assert(s:set("gateway:keys", text))
    assert.are.equal(1, #assert(keys.list()))
  end)

  it("keys are kept as SHA-256 digests only", function()
    start({ strict = true })
    local key, rec = assert(keys.add({ name = "team-d" }))
    assert.are.equal(resil.crypto.sha256(key), rec.hash)
    assert.matches("^sk%-resil%-[%w_%-]+$", key)
    assert.is_true(#key >= 50)
    for _, r in ipairs(keys.list()) do
      for _, v in pairs(r) do assert.are_not.equal(key, v) end
    end
  end)
end)

describe("resil-lua gateway and resil-lua keys", function()
  -- `resil-lua gateway` in the background on a free port, once it listens -> pid, port
  -- for a gateway in a process of its own: the real clock, the log quiet, a mock upstream
  local function mock_upstream()
    resil.clock.real()
    resil.log.level("off")
    return assert(resil.mock.start({ strict = true, reply = "served" }))
  end

  -- a config that routes OpenAI to the mock m, without keys; extra: more fields of its table
  local function mock_config(m, extra)
    return helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      return { auth = false%s }
    ]]):format(m.url .. "/v1", extra and (", " .. extra) or ""))
  end

  -- the ledger's calls by provider as another process reads them: "openai\t6\n"
  local function ledger_by_provider(db)
    return helpers.run_script('for _, g in ipairs(require("resil").cost.breakdown("provider")) do ' ..
      'print(g.key, g.calls) end', "--store " .. db).stdout
  end

  -- the key's budget as another process reads it after the stop: every hold given back, the paid call spent
  local function assert_settled(db, budget)
    local show = helpers.run(("%s budgets show %s --json --store %s"):format(helpers.resil, budget, db))
    local b = json.decode(show.stdout)
    assert.are.equal(0, b.reserved, show.stdout)
    assert.is_true(b.spent > 0, show.stdout)
  end

  -- -> its pid and port; codefile: a file its exit status is written to; options: more of the command line
  local function start_gateway(config, db, codefile, options)
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    local command = ("%s gateway --listen 127.0.0.1:%d --config %s --store %s %s > %s 2>&1 & echo $! > %s"):format(
      helpers.resil, port, config, db, options or "", log, pidfile)
    os.execute(codefile and ("(%s; wait $!; echo $? > %s) &"):format(command, codefile) or command)
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    local up = helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10)
    if not up and helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
    assert(up, helpers.slurp(log))
    return pid, port, log
  end

  -- `resil-lua gateway` routing to the mock m, its config returning `conf`
  -- (Lua source); it and the mock are stopped after the test -> the chat
  -- completions URL, its pid
  local function gateway_for(m, db, conf)
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      return %s
    ]]):format(m.url .. "/v1", conf))
    local pid, port = start_gateway(config, db)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    return ("http://127.0.0.1:%d/v1/chat/completions"):format(port), pid
  end

  it("keys add prints a key once; the gateway process serves it; keys revoke shuts it out", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name team-a --budget 50/day --rpm 600 --tpm 200000 --concurrency 4 --models fast,x " ..
      "--store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
    assert.is_string(key)
    local list = helpers.run(("%s keys list --store %s"):format(helpers.resil, db))
    assert.matches("team%-a%s+active%s+%$50/day%s+600%s+200000%s+4%s+fast,x", list.stdout)
    assert.is_nil(list.stdout:find(key, 1, true))
    assert.is_nil(helpers.slurp(db):find(key, 1, true)) -- only its digest is stored

    local url, pid = gateway_for(m, db, '{ key_cache = 0, models = { fast = "openai/gpt-4o-mini" } }')
    local body = json.encode({ model = "fast", messages = MSGS })
    local res = assert(http.request({ method = "POST", url = url, body = body,
      headers = { authorization = "Bearer " .. key } }))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("served", json.decode(res.body).choices[1].message.content)
    local rev = helpers.run(("%s keys revoke team-a --store %s"):format(helpers.resil, db))
    assert.are.equal(0, rev.code, rev.stderr)
    res = assert(http.request({ method = "POST", url = url, body = body, headers = { authorization = "Bearer " .. key } }))
    assert.are.equal(401, res.status)
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)

  it("keys list and keys revoke at a SQLite path with no store there name it, exit 1, and make nothing there",
    function()
    local dir = helpers.tmpname(".d")
    for _, cmd in ipairs({ "list", "list --json", "revoke team-a" }) do
      local r = helpers.run(("%s keys %s --store %s/typo.db"):format(helpers.resil, cmd, dir))
      assert.are.equal(1, r.code, r.stdout)
      assert.are.equal("", r.stdout) -- (was "no keys", from a store made there)
      assert.matches("no store at " .. dir:gsub("%p", "%%%0") .. "/typo%.db", r.stderr)
      assert.is_nil(io.open(dir .. "/typo.db"))
    end
  end)

  -- (before: "revoked 1 key", exit 0, and the key still served; keys add printed a key it had not stored)
  it("keys revoke and keys add that the store cannot write fail, exit 1, and say so", function()
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name leaked --store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.write(release, "") end)
    local slow = ("'%s?timeout=0.3'"):format(db)
    local rev = helpers.run(("%s keys revoke leaked --store %s"):format(helpers.resil, slow))
    assert.are.equal(1, rev.code, rev.stdout)
    assert.are.equal("", rev.stdout)
    assert.matches("store_unavailable", rev.stderr)
    local add2 = helpers.run(("%s keys add --name other --store %s"):format(helpers.resil, slow))
    assert.are.equal(1, add2.code)
    assert.are.equal("", add2.stdout) -- no key shown that was not stored
    helpers.write(release, "")
    local list = helpers.run(("%s keys list --json --store %s"):format(helpers.resil, db))
    assert.are.equal(0, list.code, list.stderr)
    local rows = json.decode(list.stdout)
    assert.are.equal(1, #rows)
    assert.are.equal("leaked", rows[1].name)
    assert.is_nil(rows[1].revoked) -- not revoked: and the command said so
    rev = helpers.run(("%s keys revoke leaked --store %s"):format(helpers.resil, db))
    assert.are.equal(0, rev.code, rev.stderr)
    assert.are.equal("revoked 1 key\n", rev.stdout)
  end)

  it("answers without waiting for its ledger rows: while another process holds the store's write lock, and " ..
     "rows still queued when it is stopped are written as it exits", function()
    local m = mock_upstream()
    local db, release = helpers.tmpname(".db"), nil
    local config = mock_config(m)
    local pid, port = start_gateway(config, db)
    finally(function()
      if release then helpers.write(release, "") end
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
    local body = json.encode({ model = "gpt-4o-mini", messages = MSGS })
    assert.are.equal(200, post(url, body).status) -- (the store's file and schema exist now)
    release = helpers.hold_write_lock(db) -- another process takes the store's write lock
    -- answered at once, within a timeout far below the store's own (5 s) that each waited for before
    for _ = 1, 5 do
      local res = assert(http.request({ method = "POST", url = url, body = body, timeout = 2,
        headers = { ["content-type"] = "application/json" } }))
      assert.are.equal(200, res.status, res.body)
    end
    os.execute("kill -TERM " .. pid)
    resil.sleep(0.3) -- stopping: it waits for the lock to write its queued rows
    assert.is_true(helpers.alive(pid))
    helpers.write(release, "")
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.are.equal("openai\t6\n", ledger_by_provider(db))
    assert.are.equal(6, m:stats().routes.chat)
  end)

  -- (before: ledger_wait = true gave up on a row the store refused for its timeout: the answer was
  -- paid and never in the ledger, where without it the row is tried again for a minute)
  it("ledger_wait = true: a row the store refuses (another process held its write lock past the timeout) is " ..
     "tried again and written once, not dropped", function()
    local m = mock_upstream()
    local db, release = helpers.tmpname(".db"), nil
    local pid, port = start_gateway(mock_config(m, "ledger_wait = true"), db)
    finally(function()
      if release then helpers.write(release, "") end
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
    local body = json.encode({ model = "gpt-4o-mini", messages = MSGS })
    assert.are.equal(200, post(url, body).status) -- (the store's file and schema exist now)
    release = helpers.hold_write_lock(db)
    local res = assert(http.request({ method = "POST", url = url, body = body, timeout = 30,
      headers = { ["content-type"] = "application/json" } }))
    assert.are.equal(200, res.status, res.body) -- answered once the store gave up waiting
    helpers.write(release, "")
    assert.is_true(helpers.wait_until(function() return ledger_by_provider(db) == "openai\t2\n" end, 20),
      ledger_by_provider(db))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.are.equal("openai\t2\n", ledger_by_provider(db))
    assert.are.equal(2, m:stats().billed.responses)
  end)

  it("SIGTERM stops it gracefully: requests in flight are answered and recorded, one on a connection opened " ..
     "before is a 503 to retry elsewhere, new connections are refused; it exits with 143", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local config = mock_config(m)
    local codefile = helpers.tmpname(".code")
    local pid, port, log = start_gateway(config, db, codefile)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
    local body = json.encode({ model = "gpt-4o-mini", messages = MSGS })
    local function send()
      local res = assert(http.request({ method = "POST", url = url, body = body, timeout = 10,
        headers = { ["content-type"] = "application/json" } }))
      return res.status, res.body
    end
    -- five connections, left open and idle: the four below take four of them
    m:configure({ strict = true, reply = "served", latency = 0.2 })
    local warm = {}
    for i = 1, 5 do warm[i] = resil.spawn(send) end
    for i = 1, 5 do assert.are.equal(200, select(2, warm[i]:join())) end
    m:configure({ strict = true, reply = "served", latency = 1 })
    local inflight = {}
    for i = 1, 4 do inflight[i] = resil.spawn(send) end
    -- all four at the mock (five warm-up calls before them)
    assert(helpers.wait_until(function() return (m:stats().routes.chat or 0) >= 9 end, 10))
    os.execute("kill -TERM " .. pid)
    assert(helpers.wait_until(function() return helpers.slurp(log):match("gateway: stopping") ~= nil end, 10))
    local res = assert(http.request({ method = "POST", url = url, body = body, timeout = 5,
      headers = { ["content-type"] = "application/json" } }))
    assert.are.equal(503, res.status, res.body)
    assert.are.equal("gateway_stopping", json.decode(res.body).error.code)
    assert.are.equal("close", res.headers["connection"])
    local refused, err = http.request({ method = "POST", url = url, body = body, timeout = 5,
      headers = { ["content-type"] = "application/json" } })
    assert.is_nil(refused)
    assert.are.equal("connect", err.kind)
    for i = 1, 4 do
      local ok, status, answer = inflight[i]:join()
      assert.is_true(ok)
      assert.are.equal(200, status, answer)
      assert.matches("served", answer)
    end
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(codefile):match("%d+") ~= nil end, 5))
    assert.are.equal("143", helpers.slurp(codefile):match("%d+"))
    assert.are.equal("openai\t9\n", ledger_by_provider(db))
    assert.are.equal(9, m:stats().routes.chat)
  end)

  -- (before: a policy that looped at call time held its worker for good: that request never
  -- returned, and every other one the worker took waited behind it, with nothing in the log)
  it("stops a request whose provider adapter loops after --max-task-seconds of CPU: a 503 the SDKs retry, " ..
     "the file:line in the log, and the gateway serves on", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      local openai = require "policies.providers.openai"
      local body = openai.body
      openai.body = function(req, model, conf)
        if model == "loop-model" then
          local n = 0
          while true do n = n + 1 end
        end
        return body(req, model, conf)
      end
      return { auth = false }
    ]]):format(m.url .. "/v1"))
    local pid, port, log = start_gateway(config, db, nil, "--max-task-seconds 0.3")
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
    end)
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
    local looping = resil.spawn(http.request, { method = "POST", url = url, timeout = 20,
      headers = { ["content-type"] = "application/json" },
      body = json.encode({ model = "openai/loop-model", messages = MSGS }) })
    resil.sleep(0.1)
    local served = post(url, { model = "openai/gpt-4o-mini", messages = MSGS })
    local ok, res, err = looping:join()
    assert.is_true(ok)
    res = assert(res, tostring(err))
    assert.are.equal(503, res.status, res.body)
    assert.are.equal("gateway_overloaded", json.decode(res.body).error.code)
    assert.are.equal("1", res.headers["retry-after"])
    assert.are.equal(200, served.status, served.body) -- (it waited behind the loop, then was served)
    assert.are.equal(200, post(url, { model = "openai/gpt-4o-mini", messages = MSGS }).status)
    assert.is_true(helpers.alive(pid))
    assert.matches("the host stopped a request's work", helpers.slurp(log))
    assert.matches("%.lua:%d+: task %d+ %(.-%) ran %d+%.%d s without yielding %(%-%-max%-task%-seconds=0%.3%)",
      helpers.slurp(log))
    assert.are.equal(2, m:stats().routes.chat) -- (the stopped one was never sent)
  end)

  -- (before: the loop never turned again, so the drain never ran; the first SIGTERM did nothing and
  -- the gateway served nobody until a second one)
  it("SIGTERM ends a request whose policy loops (a 500 after half drain_timeout, its <close> handlers run) " ..
     "and then stops", function()
    local m = mock_upstream()
    local db, mark = helpers.tmpname(".db"), helpers.tmpname(".closed")
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      local gateway = require "policies.gateway"
      local handle = gateway.handle
      gateway.handle = function(req)
        if req.headers["x-loop"] then
          -- (what a call's guard does as its task ends: give back its hold)
          local _ <close> = setmetatable({}, { __close = function()
            local f = io.open(%q, "w"); f:write("closed"); f:close()
          end })
          while true do end
        end
        return handle(req)
      end
      return { auth = false, drain_timeout = 2 }
    ]]):format(m.url .. "/v1", mark))
    local codefile = helpers.tmpname(".code")
    local pid, port, log = start_gateway(config, db, codefile)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
    end)
    local looping = resil.spawn(http.request, { url = ("http://127.0.0.1:%d/health"):format(port), timeout = 20,
      headers = { ["x-loop"] = "1" } })
    resil.sleep(0.5) -- (it loops now)
    os.execute("kill -TERM " .. pid)
    local ok, res, err = looping:join()
    assert.is_true(ok)
    assert.are.equal(500, assert(res, tostring(err)).status)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), "still running")
    assert.is_true(helpers.wait_until(function() return helpers.slurp(codefile):match("%d+") ~= nil end, 5))
    assert.are.equal("143", helpers.slurp(codefile):match("%d+"))
    -- at the line that loops (before: its caller's, the gateway's, or none)
    assert.matches("%.lua:10: task %d+ %([^\n]*%) ran %d+%.%d s without yielding while the host stops", helpers.slurp(log))
    assert.are.equal("closed", helpers.slurp(mark))
  end)

  -- (before: the watch's hook was on the request task's own thread; a coroutine it ran had none,
  -- and the first SIGTERM did nothing)
  for _, case in ipairs({
    { what = "in a generator made at load", status = 500, logged = true, code = [[
        local spin <const> = coroutine.wrap(function()
          local _ <close> = closes(%q)
          while true do end
        end)
        run = function() spin() end
      ]] },
    { what = "in a coroutine it resumes again and again, catching its error (the task is cut, as canceled)",
      code = [[
        run = function()
          local co = coroutine.create(function()
            local _ <close> = closes(%q)
            while true do pcall(function() for _ = 1, 1e5 do end end) end
          end)
          while true do coroutine.resume(co) end
        end
      ]] },
  }) do
    it("SIGTERM ends a request whose policy loops " .. case.what .. "; the <close> handlers run", function()
      local m = mock_upstream()
      local db, mark, inner = helpers.tmpname(".db"), helpers.tmpname(".closed"), helpers.tmpname(".closed")
      local config = helpers.write(helpers.tmpname(".lua"), ([[
        require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
        local gateway = require "policies.gateway"
        local handle = gateway.handle
        local function closes(path)
          return setmetatable({}, { __close = function() local f = io.open(path, "w"); f:write("closed"); f:close() end })
        end
        local run
        ]] .. case.code .. [[
        gateway.handle = function(req)
          if req.headers["x-loop"] then
            local _ <close> = closes(%q)
            run()
          end
          return handle(req)
        end
        return { auth = false, drain_timeout = 0.4 }
      ]]):format(m.url .. "/v1", inner, mark))
      local codefile = helpers.tmpname(".code")
      local pid, port, log = start_gateway(config, db, codefile)
      finally(function()
        if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
        m:stop()
      end)
      local looping = resil.spawn(http.request, { url = ("http://127.0.0.1:%d/health"):format(port), timeout = 20,
        headers = { ["x-loop"] = "1" } })
      resil.sleep(0.5) -- (it loops now)
      os.execute("kill -TERM " .. pid)
      local ok, res, err = looping:join()
      assert.is_true(ok)
      if case.status then assert.are.equal(case.status, assert(res, tostring(err)).status) end
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), "still running")
      assert.is_true(helpers.wait_until(function() return helpers.slurp(codefile):match("%d+") ~= nil end, 5))
      assert.are.equal("143", helpers.slurp(codefile):match("%d+"))
      if case.logged then assert.matches("without yielding while the host stops", helpers.slurp(log)) end
      assert.are.equal("closed", helpers.slurp(inner))
      assert.are.equal("closed", helpers.slurp(mark))
    end)
  end

  for _, api in ipairs({ { path = "/v1/chat/completions", last = "[DONE]", grace = 1 },
                         { path = "/v1/messages", last = "message_stop", grace = 1 },
                         { path = "/v1/chat/completions", last = "[DONE]", grace = 0 } }) do
  it(api.path .. ": a stream cut at drain_timeout = " .. api.grace .. " ends with an error event, no " .. api.last ..
     ", and is in the ledger as what it streamed", function()
      local m = mock_upstream()
      local db = helpers.tmpname(".db")
      local pid, port, log = start_gateway(mock_config(m, "drain_timeout = " .. api.grace), db)
      finally(function()
        if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
        m:stop()
        resil.log.level("info")
      end)
      m:configure({ strict = true, reply = ("word "):rep(100), stream_interval = 0.1 }) -- 10 s of deltas
      local url = ("http://127.0.0.1:%d%s"):format(port, api.path)
      local s = assert(http.stream({ method = "POST", url = url, timeout = 30,
        headers = { ["content-type"] = "application/json" },
        body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS, stream = true, max_tokens = 500 }) }))
      local events = {}
      local first, ferr = s:read_event()
      assert(first, s.status .. " " .. tostring(ferr))
      os.execute("kill -TERM " .. pid)
      local err
      while true do
        local ev, e = s:read_event()
        if not ev then err = e break end
        events[#events + 1] = ev.data
      end
      s:close()
      assert.is_true(#events >= (api.grace > 0 and 3 or 1) and #events < 60, #events .. " events")
      for _, data in ipairs(events) do assert.is_nil(data:find(api.last, 1, true)) end
      assert.is_table(json.decode(events[#events]).error, events[#events] .. " " .. tostring(err))
      assert.is_nil(err) -- an error event, then the reply's clean end: not a connection cut mid-chunk
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      assert.are.equal("openai\t1\n", ledger_by_provider(db))
      -- its access line says how it ended (before: "client_left", as if its client had hung up)
      local line = helpers.slurp(log):match('[^\n]*"msg":"access"[^\n]*')
      assert.matches('"stream":"failed"', line)
      assert.matches('"error":"gateway_stopping"', line)
    end)
  end

  it("a long stream read whole, kept alive, that the drain cuts ends with its error event, in the ledger once", function()
    -- (an Anthropic client with a tool served by OpenAI: read whole inside its attempt, its reply
    -- started at 15 s with keep-alive comments; the stop comes while it is still read)
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local pid, port, log = start_gateway(mock_config(m, "drain_timeout = 2"), db)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    m:configure({ strict = true, reply = ("word "):rep(200), stream_interval = 0.25 }) -- 50 s of deltas
    local s = assert(http.stream({ method = "POST", url = ("http://127.0.0.1:%d/v1/messages"):format(port), timeout = 60,
      headers = { ["content-type"] = "application/json", ["anthropic-version"] = "2023-06-01" },
      body = json.encode({ model = "openai/gpt-4o-mini", max_tokens = 500, stream = true, messages = MSGS,
        tools = { { name = "save", input_schema = { type = "object", properties = { text = { type = "string" } } } } },
        tool_choice = { type = "any" } }) }))
    assert.are.equal(200, s.status)
    os.execute("kill -TERM " .. pid)
    local events = {}
    while true do
      local ev, e = s:read_event()
      if not ev then
        assert.is_nil(e) -- an error event, then the reply's clean end
        break
      end
      events[#events + 1] = ev
    end
    s:close()
    local last = events[#events]
    assert.are.equal("error", last and last.event)
    assert.matches("gateway stopped", last.data, 1, true)
    for _, ev in ipairs(events) do assert.are_not.equal("message_stop", ev.event) end
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.are.equal("openai\t1\n", ledger_by_provider(db))
    local line = helpers.slurp(log):match('[^\n]*"msg":"access"[^\n]*')
    assert.matches('"error":"gateway_stopping"', line)
  end)

  it("a stream still opening at drain_timeout (its first answer refused, its retry hanging) has the refused " ..
     "answer in the ledger", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name opening --budget 10/day --store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
    local url, pid = gateway_for(m, db, "{ drain_timeout = 1, key_cache = 0 }")
    m:configure({ strict = true, reply = "", sequence = { chat = { "ok", "hang" } } })
    local stream = resil.spawn(http.request, { method = "POST", url = url, timeout = 30,
      headers = { ["content-type"] = "application/json", authorization = "Bearer " .. key },
      body = json.encode({ model = "gpt-4o-mini", stream = true, max_tokens = 100,
        messages = { { role = "user", content = ("word "):rep(4000) } } }) })
    assert.is_true(helpers.wait_until(function() return m:stats().routes.chat == 2 end, 10))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    stream:join()
    assert.are.equal("openai\t1\n", ledger_by_provider(db))
    assert_settled(db, "key:opening")
  end)

  -- (before: the call was left running as the process ended: the provider billed the answer, the ledger and the
  -- key's budget never had it)
  for _, case in ipairs({ { what = "", headers = {} }, { what = " under an Idempotency-Key",
    headers = { ["idempotency-key"] = "drained-mid-body" } } }) do
    it("an answer whose body is still on its way at drain_timeout" .. case.what .. " is recorded at its estimate, " ..
       "its hold given back", function()
      local m = mock_upstream()
      local body = json.encode({ id = "chatcmpl-stalled", object = "chat.completion", created = 1,
        model = "gpt-4o-mini", usage = { prompt_tokens = 10, completion_tokens = 3, total_tokens = 13 },
        choices = { { index = 0, message = { role = "assistant", content = "one two three" }, finish_reason = "stop" } } })
      -- a 200 and half its body, then nothing (the provider made and billed the answer)
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        return { status = 200, headers = { ["content-type"] = "application/json" },
          chunks = { body:sub(1, 60), body:sub(61) }, stall_after = 1 }
      end } })
      local db = helpers.tmpname(".db")
      local add = helpers.run(("%s keys add --name drained --budget 10/day --store %s"):format(helpers.resil, db))
      assert.are.equal(0, add.code, add.stderr)
      local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
      local url, pid = gateway_for(m, db, "{ drain_timeout = 1 }")
      local headers = { ["content-type"] = "application/json", authorization = "Bearer " .. key }
      for k, v in pairs(case.headers) do headers[k] = v end
      local call = resil.spawn(http.request, { method = "POST", url = url, timeout = 30, headers = headers,
        body = json.encode({ model = "gpt-4o-mini", max_tokens = 50, messages = MSGS }) })
      assert.is_true(helpers.wait_until(function() return m:stats().total == 1 end, 10))
      resil.sleep(0.3) -- (the 200 and the first half reach the gateway)
      os.execute("kill -TERM " .. pid)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      call:join()
      assert.are.equal("openai\t1\n", ledger_by_provider(db))
      assert_settled(db, "key:drained")
    end)
  end

  it("a drain waits for the ledger rows of what it answered (the store's write lock held past its timeout), " ..
     "and ends at drain_timeout whatever still runs", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local config = mock_config(m, "drain_timeout = 9")
    local codefile = helpers.tmpname(".code")
    local pid, port = start_gateway(config, db, codefile)
    local release
    finally(function()
      if release then helpers.write(release, "") end
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
    local body = json.encode({ model = "gpt-4o-mini", messages = MSGS })
    assert.are.equal(200, post(url, body).status) -- (the store's file and schema exist now)
    m:configure({ strict = true, reply = "served", latency = 0.5 })
    local calls = {}
    for i = 1, 3 do
      calls[i] = resil.spawn(function() return post(url, body).status end)
    end
    assert(helpers.wait_until(function() return (m:stats().routes.chat or 0) >= 4 end, 10)) -- the three at the mock
    -- a call under an Idempotency-Key that outlives the drain: it finishes for the key, not for its client
    m:configure({ strict = true, reply = "served", latency = 30 })
    local long = resil.spawn(function()
      return http.request({ method = "POST", url = url, body = body, timeout = 30,
        headers = { ["content-type"] = "application/json", ["idempotency-key"] = "outlives-the-drain" } })
    end)
    assert(helpers.wait_until(function() return (m:stats().routes.chat or 0) >= 5 end, 10)) -- and it too
    release = helpers.hold_write_lock(db)
    local t0 = resil.now()
    os.execute("kill -TERM " .. pid)
    for i = 1, 3 do assert.are.same({ true, 200 }, { calls[i]:join() }) end
    -- past the store's own 5 s timeout: its rows are still queued, not dropped
    resil.sleep(math.max(0, t0 + 6.2 - resil.now()))
    assert.is_true(helpers.alive(pid))
    helpers.write(release, "")
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.is_true(resil.now() - t0 < 12, "it outlived drain_timeout: " .. (resil.now() - t0))
    local _, cut = long:join()
    assert.is_nil(cut) -- its client was cut at drain_timeout, not kept for the 30 s call
    assert.are.equal("openai\t4\n", ledger_by_provider(db)) -- the warm-up and the three; the long call was never answered
  end)

  -- (before: the config file ran once, at start: a SIGHUP reloaded the policies, never the models,
  -- keys' rules or providers it set)
  it("a policy reload runs the config file again; a broken one fails the reload and the config before serves", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local function config_routing_to(model)
      return ([[
        require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
        return { auth = false, models = { team = { model = %q } } }
      ]]):format(m.url .. "/v1", model)
    end
    local config = helpers.write(helpers.tmpname(".lua"), config_routing_to("openai/model-a"))
    local pid, port, log = start_gateway(config, db)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
    end)
    local function served_model()
      local res = http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
        body = json.encode({ model = "team", messages = MSGS }), headers = { ["content-type"] = "application/json" } })
      return res and res.status == 200 and res.headers["x-resil-model"]
    end
    assert.are.equal("model-a", served_model())
    helpers.write(config, config_routing_to("openai/model-b"))
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return served_model() == "model-b" end, 10), helpers.slurp(log))
    helpers.write(config, "return { auth = false, models = { team = { model = 'openai/model-c' } }") -- (no brace)
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function()
      return helpers.slurp(log):match("policy reload failed[^\n]*" .. config:match("[^/]+$"):gsub("%p", "%%%0") .. ":1:")
    end, 10), helpers.slurp(log))
    assert.are.equal("model-b", served_model())
  end)

  -- A config that fails as it runs (a raise after its ai.configure calls, not a syntax error) fails
  -- the reload too: the config before serves, its providers as they were. (ai.config is kept across
  -- versions: the failed run's ai.configure stayed, and each call not cached before went to the
  -- address it named, a 502.)
  it("a config that raises at a reload after its ai.configure leaves the providers as they were", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      return { auth = false }
    ]]):format(m.url .. "/v1"))
    local pid, port, log = start_gateway(config, db)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
    end)
    local function status(model)
      local res = http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
        body = json.encode({ model = model, messages = MSGS }), headers = { ["content-type"] = "application/json" } })
      return res and res.status
    end
    assert.are.equal(200, status("openai/model-a"))
    helpers.write(config, [[
      require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:9/v1", api_key = "sk-test-123456" })
      error("the config's own error")
    ]])
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function()
      return helpers.slurp(log):match("policy reload failed[^\n]*the config's own error") ~= nil
    end, 10), helpers.slurp(log))
    assert.are.equal(200, status("openai/model-a"))
    assert.are.equal(200, status("openai/model-b"), helpers.slurp(log))
  end)

  -- (before: the count of such calls was the first version's, and after a reload the drain did not
  -- wait: the provider billed the call and the ledger never had it)
  it("after a policy reload, a SIGTERM still waits for a call whose client left, and records it", function()
    local m = mock_upstream()
    local db = helpers.tmpname(".db")
    local pid, port, log = start_gateway(mock_config(m), db)
    finally(function()
      if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
      m:stop()
      resil.log.level("info")
    end)
    os.execute("kill -HUP " .. pid)
    assert(helpers.wait_until(function() return helpers.slurp(log):match("policies reloaded") ~= nil end, 10))
    m:configure({ strict = true, reply = "served", latency = 2 })
    local res, err = http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      timeout = 0.3, body = json.encode({ model = "gpt-4o-mini", messages = MSGS }),
      headers = { ["content-type"] = "application/json" } })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert(helpers.wait_until(function() return (m:stats().routes.chat or 0) >= 1 end, 10))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 15))
    assert.are.equal("openai\t1\n", ledger_by_provider(db))
  end)

  it("a project's gateway.lua from before the graceful stop still stops at the first SIGTERM", function()
    resil.clock.real()
    local dir = helpers.tmpname(".policies")
    os.execute("mkdir -p " .. dir)
    local source = helpers.slurp("policies/gateway.lua")
    local old, n = source:gsub("drain%(s, resil%.stop_requested%(true[^\n]*", "resil.sleep(math.huge)")
    assert.are.equal(1, n)
    helpers.write(dir .. "/gateway.lua", old)
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }")
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --policies %s --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, dir, port, config, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 5), "still running")
  end)

  it("kill -9 under load, a budgeted key: no hold of the dead gateway counts, the budget's spend is its ledger's " ..
     "sum, and no row is for a call the provider did not answer", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ strict = true, reply = "served", latency = { min = 0.002, max = 0.01 } }))
    local db = helpers.tmpname(".db")
    local add = helpers.run(("%s keys add --name crashy --budget 1000/day --store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
    local url, pid = gateway_for(m, db, "{ key_cache = 0 }")
    local body = json.encode({ model = "gpt-4o-mini", messages = MSGS })
    local answered, stop = 0, false
    local clients = {}
    for i = 1, 32 do
      clients[i] = resil.spawn(function()
        while not stop do
          local res = http.request({ method = "POST", url = url, body = body, timeout = 5,
            headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
          if res and res.status == 200 then answered = answered + 1 elseif not res then return end
        end
      end)
    end
    -- under load (a slow machine waits longer for it, not a fixed time), then the rate just before the kill
    assert.is_true(helpers.wait_until(function() return answered > 40 end, 60), "answered " .. answered)
    local before, started = answered, resil.clock.wall()
    resil.sleep(0.2)
    local rate = (answered - before) / (resil.clock.wall() - started)
    os.execute("kill -KILL " .. pid) -- mid-call: requests in flight, rows queued, holds taken
    stop = true
    for _, c in ipairs(clients) do c:join() end
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))

    local show = helpers.run(("%s budgets show key:crashy --json --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr)
    local b = json.decode(show.stdout)
    assert.are.equal(0, b.reserved, show.stdout) -- the dead gateway's holds count no more
    local r = helpers.run_script([[
local resil = require "resil"
local by = resil.cost.breakdown("provider", { budget = "key:crashy" })[1]
print(string.format("%.6f %d", resil.cost.total({ budget = "key:crashy" }), by and by.calls or 0))
]], "--store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    local ledger_usd, rows = r.stdout:match("^(%S+) (%d+)")
    -- each settle wrote its spend and its row in one transaction: a kill between them left neither
    assert.are.equal(("%.6f"):format(b.spent), ledger_usd)
    -- rows only for calls the provider answered, each once; lost at most those of the last group commit
    -- and the one held behind its sync (answered 2-20 ms before the kill): well under 50 ms of answers,
    -- besides one per connection that the gateway wrote and its client read only after the kill
    assert.is_true(tonumber(rows) <= m:stats().routes.chat, rows .. " rows, " .. m:stats().routes.chat .. " calls")
    assert.is_true(tonumber(rows) >= answered - #clients - rate * 0.05, rows .. " rows for " .. answered .. " answers")
  end)

  -- for a gateway with --workers: a mock upstream and a config routing to it
  -- -> mock, config, port, log file, pid file
  local function workers_setup()
    local m = mock_upstream()
    local config = mock_config(m)
    return m, config, helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
  end

  local workers_of = helpers.workers_of

  -- after a test: the gateway and every worker it had, gone for sure
  local function stop_all(pid, seen, m)
    for _, p in ipairs({ pid, table.unpack(seen) }) do if helpers.alive(p) then os.execute("kill -KILL " .. p) end end
    m:stop()
    resil.log.level("info")
  end

  -- a gateway with --workers n whose config raises while the file `broken` exists, stopped after
  -- the test with every worker the caller puts in `seen`
  -- -> broken, mock, port, log file, supervisor's pid, seen
  local function breakable_workers(n)
    local broken = helpers.tmpname(".broken")
    local m, _, port, log, pidfile = workers_setup()
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      if io.open(%q) then error("config broken") end
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      return { auth = false }
    ]]):format(broken, m.url .. "/v1"))
    os.execute(("%s gateway --listen 127.0.0.1:%d --workers %d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, n, config, helpers.tmpname(".db"), log, pidfile))
    local pid, seen = helpers.slurp(pidfile):match("%d+"), {}
    finally(function()
      os.remove(broken)
      stop_all(pid, seen, m)
    end)
    return broken, m, port, log, pid, seen
  end

  it("--workers 2: two processes serve one port, a worker killed with -9 is replaced, stopping the gateway " ..
     "stops them all", function()
    local m, config, port, log, pidfile = workers_setup()
    os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, config, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    local function workers() return workers_of(pid) end
    local seen = {}
    finally(function() stop_all(pid, seen, m) end)
    local function listening(n)
      return helpers.wait_until(function()
        local _, k = helpers.slurp(log):gsub("listening", "")
        return k == n
      end, 10)
    end
    local function serves()
      for _ = 1, 4 do
        local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
          body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }) }))
        assert.are.equal(200, res.status)
      end
    end
    assert.is_true(listening(2), helpers.slurp(log))
    local first = workers()
    assert.are.equal(2, #first)
    seen = { first[1], first[2] }
    serves()
    os.execute("kill -KILL " .. first[1])
    assert.is_true(listening(3), helpers.slurp(log)) -- another took its place
    local now = workers()
    assert.are.equal(2, #now)
    seen[3] = now[1] ~= first[2] and now[1] or now[2]
    assert.are_not.equal(first[1], seen[3])
    assert.matches("worker " .. first[1] .. " killed by signal 9; starting another", helpers.slurp(log))
    serves()
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function()
      for _, p in ipairs({ pid, table.unpack(seen) }) do if helpers.alive(p) then return false end end
      return true
    end, 10))
  end)

  -- (before: a provider configured with shared limits crashed every call: a shared bucket had no
  -- wait_time nor observe)
  it("--workers 2 with a provider's limits shared: the workers serve chats and streams, booking in the store",
    function()
      local m, _, port, log, pidfile = workers_setup()
      local db = helpers.tmpname(".db")
      local config = helpers.write(helpers.tmpname(".lua"), ([[
        require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456",
          rate = { rate = 4, per = 3600, shared = true }, tokens = { rate = 1000000, per = 60, shared = true } })
        return { auth = false }
      ]]):format(m.url .. "/v1"))
      os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 & echo $! > %s")
        :format(helpers.resil, port, config, db, log, pidfile))
      local pid = helpers.slurp(pidfile):match("%d+")
      local seen = {}
      finally(function() stop_all(pid, seen, m) end)
      assert.is_true(helpers.wait_until(function()
        local _, k = helpers.slurp(log):gsub("listening", "")
        return k == 2
      end, 10), helpers.slurp(log))
      seen = workers_of(pid)
      for _, stream in ipairs({ false, true, false }) do
        local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
          body = json.encode({ model = "openai/gpt-4o-mini", stream = stream, messages = MSGS }) }))
        assert.are.equal(200, res.status, res.body)
        assert.matches("served", res.body)
      end
      -- 3 of the 4 requests an hour are booked in the store: one left for another process
      local r = helpers.run_script([[
local b = require("resil").bucket("openai:requests", { rate = 4, per = 3600, shared = true })
local ok, left = b:try(1)
print(ok, left, (b:try(1)))
]], "--store " .. db .. " --log-level off")
      assert.are.equal("true\t0\tfalse\n", r.stdout, r.stderr)
    end)

  -- SIGHUP (reload) is passed on to the workers: one just started, that had
  -- not yet set its handler, was killed by it (the default action), and a
  -- reload in the gateway's first second counted as workers dying as they
  -- start: the gateway stopped.
  it("--workers 2: SIGTERM to the whole process group (systemd's way) drains the workers as one SIGTERM does",
    function()
      local m, config, port, log, pidfile = workers_setup()
      local db = helpers.tmpname(".db")
      -- its own process group, as under systemd: every worker gets the signal and the supervisor passes it on
      os.execute(("setsid %s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 & " ..
        "echo $! > %s"):format(helpers.resil, port, config, db, log, pidfile))
      local pid = helpers.slurp(pidfile):match("%d+")
      local seen = {}
      finally(function() stop_all(pid, seen, m) end)
      assert.is_true(helpers.wait_until(function() return select(2, helpers.slurp(log):gsub("listening", "")) == 2 end,
        10), helpers.slurp(log))
      seen = workers_of(pid)
      m:configure({ strict = true, reply = "served", latency = 1 })
      local calls = {}
      for i = 1, 6 do
        calls[i] = resil.spawn(function()
          local res, err = http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
            body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }), timeout = 10 })
          return res and res.status or tostring(err)
        end)
      end
      assert(helpers.wait_until(function() return (m:stats().routes.chat or 0) >= 6 end, 10)) -- all six at the mock
      os.execute("/bin/kill -s TERM -- -" .. pid) -- (procps kill: a negative pid is the group)
      for i = 1, 6 do
        local ok, status = calls[i]:join()
        assert.are.same({ true, 200 }, { ok, status }, tostring(status) .. "\n" .. helpers.slurp(log))
      end
      assert.is_true(helpers.wait_until(function()
        for _, p in ipairs({ pid, table.unpack(seen) }) do if helpers.alive(p) then return false end end
        return true
      end, 10))
      assert.are.equal("openai\t6\n", ledger_by_provider(db))
    end)

  it("--workers 2: a worker that exits on its own with status 0 (a policy's os.exit) is replaced too", function()
    local trigger = helpers.tmpname(".exit") -- a folder (removed with what is in it)
    os.execute("mkdir " .. trigger)
    local m, _, port, log, pidfile = workers_setup()
    -- each worker ends with status 0 once a file named after its pid exists
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      local mine = %q .. "/" .. io.open("/proc/self/stat"):read("l"):match("^(%%d+)")
      resil.spawn(function()
        while not io.open(mine) do resil.sleep(0.02) end
        os.exit(0)
      end)
      return { auth = false }
    ]]):format(m.url .. "/v1", trigger))
    os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, config, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    local seen = {}
    finally(function() stop_all(pid, seen, m) end)
    assert.is_true(helpers.wait_until(function() return #workers_of(pid) == 2 end, 10), helpers.slurp(log))
    assert.is_true(helpers.wait_until(function() return select(2, helpers.slurp(log):gsub("listening", "")) == 2 end))
    local first = workers_of(pid)
    seen = { first[1], first[2] }
    helpers.write(trigger .. "/" .. first[1], "")
    assert.is_true(helpers.wait_until(function() return select(2, helpers.slurp(log):gsub("listening", "")) == 3 end),
      helpers.slurp(log))
    local now = workers_of(pid)
    assert.are.equal(2, #now)
    seen[3] = now[1] ~= first[2] and now[1] or now[2]
    assert.are_not.equal(first[1], seen[3])
    assert.matches("worker " .. first[1] .. " exited with code 0; starting another", helpers.slurp(log))
    local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }) }))
    assert.are.equal(200, res.status)
  end)

  -- (a policy file saved broken: the workers running refuse the reload and serve on; a worker then
  -- killed, as by the OOM killer, had replacements that died at start, and the gateway stopped the
  -- worker still serving)
  it("--workers 2: a replacement that cannot start does not stop a worker still serving; a SIGHUP tries it at once", function()
    local broken, m, port, log, pid, seen = breakable_workers(2)
    local function listening(n)
      return helpers.wait_until(function() return select(2, helpers.slurp(log):gsub("listening", "")) == n end, 10)
    end
    assert.is_true(listening(2), helpers.slurp(log))
    local first = workers_of(pid)
    table.move(first, 1, 2, #seen + 1, seen)
    resil.sleep(1.1) -- (both serving for a second: the gateway has started)
    helpers.write(broken, "")
    os.execute("kill -KILL " .. first[1])
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("starting another in a second") ~= nil end,
      10), helpers.slurp(log))
    -- (before: tried again each second, its traceback printed each time, for as long as the file
    -- stayed broken) each try that dies again waits twice as long
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("starting another in 4 seconds") ~= nil end,
      15), helpers.slurp(log))
    assert.matches("starting another in a second\n.*starting another in 2 seconds\n.*starting another in 4 seconds\n",
      helpers.slurp(log))
    assert.is_true(helpers.alive(pid), helpers.slurp(log))
    assert.is_true(helpers.alive(first[2]), helpers.slurp(log))
    local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }) }))
    assert.are.equal(200, res.status)
    -- (before: a SIGHUP, the file fixed, left the gateway a worker short until the backoff ran out,
    -- up to a minute) the reload starts the missing worker at once
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("starting another in 8 seconds") ~= nil end,
      15), helpers.slurp(log))
    os.remove(broken)
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return select(2, helpers.slurp(log):gsub("listening", "")) == 3 end, 5),
      helpers.slurp(log))
    assert.is_true(helpers.wait_until(function() return #workers_of(pid) == 2 end, 10))
    for _, p in ipairs(workers_of(pid)) do seen[#seen + 1] = p end
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)

  -- (one alarm for all the slots: a worker waiting out its backoff was started again when another
  -- slot set its own, early, printing its traceback again, or late, the gateway a worker short longer
  -- than the log said; and the slots shared one count of deaths as they start)
  it("--workers 3: a worker waiting out its backoff is started again when the log said, whatever another does",
    function()
    local broken, m, port, log, pid, seen = breakable_workers(3)
    local function said(text) return select(2, helpers.slurp(log):gsub(text, "")) end
    assert.is_true(helpers.wait_until(function() return said("listening") == 3 end, 10), helpers.slurp(log))
    local first = workers_of(pid)
    table.move(first, 1, 3, #seen + 1, seen)
    resil.sleep(1.1) -- (serving for a second: the gateway has started)
    helpers.write(broken, "")
    os.execute("kill -KILL " .. first[1])
    assert.is_true(helpers.wait_until(function() return said("starting another in 4 seconds") == 1 end, 15),
      helpers.slurp(log))
    local announced = resil.clock.wall()
    -- another slot's worker killed: its replacements die as they start too, until its own wait of a second
    os.execute("kill -KILL " .. first[2])
    assert.is_true(helpers.wait_until(function() return said("starting another in a second") == 2 end, 10),
      helpers.slurp(log))
    os.remove(broken)
    -- both slots start a worker that listens: the second after its second, the first not before its 4
    assert.is_true(helpers.wait_until(function() return said("listening") == 5 end, 15), helpers.slurp(log))
    local waited = resil.clock.wall() - announced
    assert.is_true(waited >= 3.5, ("restarted %.1f s after \"in 4 seconds\"\n%s"):format(waited, helpers.slurp(log)))
    assert.is_true(helpers.alive(first[3]), helpers.slurp(log))
    assert.is_true(helpers.wait_until(function() return #workers_of(pid) == 3 end, 10))
    for _, p in ipairs(workers_of(pid)) do seen[#seen + 1] = p end
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)

  it("--workers 3: a SIGHUP as the workers start reloads them, it does not kill them", function()
    local m, config, port, log, pidfile = workers_setup()
    -- SIGHUP the moment the first worker exists
    os.execute(("%s gateway --listen 127.0.0.1:%d --workers 3 --config %s --store %s > %s 2>&1 & P=$!; echo $P > %s; " ..
      "while [ -z \"$(cat /proc/$P/task/$P/children 2>/dev/null)\" ]; do :; done; kill -HUP $P")
      :format(helpers.resil, port, config, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    local function workers() return workers_of(pid) end
    local seen = {}
    finally(function() stop_all(pid, seen, m) end)
    assert.is_true(helpers.wait_until(function()
      local _, k = helpers.slurp(log):gsub("listening", "")
      return k >= 3
    end, 10), helpers.slurp(log))
    seen = workers()
    assert.is_nil(helpers.slurp(log):match("killed by signal"), helpers.slurp(log))
    assert.are.equal(3, #seen)
    os.execute("kill -HUP " .. pid) -- once they serve: each reloads
    assert.is_true(helpers.wait_until(function()
      local _, k = helpers.slurp(log):gsub("reload", "")
      return k >= 3
    end, 10), helpers.slurp(log))
    assert.are.same(seen, workers())
    local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }) }))
    assert.are.equal(200, res.status)
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)

  -- (the registry and the providers load on a request's first use: a gateway started, or a worker
  -- started again after a crash, with a policy file saved broken listened, and answered each chat
  -- a 400 invalid_request_error showing its own syntax error, which the client's SDK never retries)
  it("a policy file a request would load, saved broken, stops the start with its file:line, as a broken config does",
    function()
      local m = mock_upstream()
      finally(function() m:stop(); resil.log.level("info") end)
      for _, case in ipairs({ { file = "models.lua", line = 2 }, { file = "providers/openai.lua", line = 2 } }) do
        local dir = helpers.tmpname("-policies")
        assert(os.execute("mkdir -p " .. dir .. "/providers"))
        helpers.write(dir .. "/" .. case.file, "return {\n  oops oops\n}\n")
        -- (the bound is for a start that listens instead of failing: 60 s, not 5; an ASan build took
        -- 1.7 s of wall time for 0.15 s of CPU to start and fail at a load of 17 on 2 cores)
        local r = helpers.run(("timeout -s KILL 60 %s gateway --listen 127.0.0.1:%d --policies %s --config %s " ..
          "--store %s")
          :format(helpers.resil, helpers.free_port(), dir, mock_config(m), helpers.tmpname(".db")))
        assert.are.equal(1, r.code, case.file .. ": " .. r.stdout .. r.stderr)
        assert.is_nil(r.stdout:match("listening"), case.file)
        assert.matches(case.file:gsub("%p", "%%%0") .. ":" .. case.line .. ":", r.stderr)
      end
    end)

  it("--workers 2: workers that die as they start stop the gateway with their exit code", function()
    local config = helpers.write(helpers.tmpname(".lua"), 'error("config broken")')
    local r = helpers.run(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s")
      :format(helpers.resil, helpers.free_port(), config, helpers.tmpname(".db")))
    assert.are_not.equal(0, r.code)
    assert.matches("config broken", r.stderr)
    assert.matches("workers keep dying as they start; stopping", r.stderr)
  end)

  -- a gateway on `port` with `workers` workers, in the background, once all of them listen
  -- -> its pid and log (its pid and its workers' added to `pids`, for the spec's finally)
  local function listening_gateway(port, workers, m, pids, what)
    local log, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --listen 127.0.0.1:%d --workers %d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, workers, mock_config(m), helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    pids[#pids + 1] = pid
    assert.is_true(helpers.wait_until(function()
      return select(2, helpers.slurp(log):gsub("listening", "")) == workers
    end, 10), (what or "") .. helpers.slurp(log))
    for _, p in ipairs(workers_of(pid)) do pids[#pids + 1] = p end
    return pid, log
  end

  -- a chat through the gateway on `port`, on a connection of its own (the gateway closes it)
  local function chat_closed(port)
    local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      headers = { connection = "close" }, body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }) }))
    assert.are.equal(200, res.status, res.body)
  end

  -- (the workers' SO_REUSEPORT let a second `--workers` gateway, with another config, other keys
  -- and budgets, listen on a port a first one had: the kernel split the connections between them
  -- without a word; a second without --workers, or a first without, was refused with a traceback)
  it("a second gateway on a port a gateway listens on exits 1 naming the address; the first serves on", function()
    local m = mock_upstream()
    local pids = {}
    finally(function()
      for _, p in ipairs(pids) do if helpers.alive(p) then os.execute("kill -KILL " .. p) end end
      m:stop()
      resil.log.level("info")
    end)
    for _, first in ipairs({ 1, 2 }) do
      local port = helpers.free_port()
      local pid, log = listening_gateway(port, first, m, pids)
      for _, second in ipairs({ 1, 2 }) do
        -- (60 s, not 10: the bound is for a second gateway that would serve instead of failing; an ASan
        -- build's start, wall time, grows with the machine's load)
        local r = helpers.run(("timeout -s KILL 60 %s gateway --listen 127.0.0.1:%d --workers %d --config %s " ..
          "--store %s")
          :format(helpers.resil, port, second, mock_config(m), helpers.tmpname(".db")))
        local case = ("first --workers %d, second --workers %d: "):format(first, second)
        assert.are.equal(1, r.code, case .. r.stdout .. r.stderr)
        assert.is_nil(r.stdout:match("listening"), case .. r.stdout)
        assert.matches("cannot listen on 127%.0%.0%.1:" .. port .. ": the address is in use", r.stderr, 1, false)
        assert.is_nil(r.stderr:match("traceback"), case .. r.stderr)
      end
      -- the first still has the port, all of it: each new connection is its own
      for _ = 1, 6 do chat_closed(port) end
      assert.is_true(helpers.alive(pid))
      assert.are.equal(first, select(2, helpers.slurp(log):gsub("listening", "")), helpers.slurp(log))
      os.execute("kill -TERM " .. pid)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), helpers.slurp(log))
    end
  end)

  it("a gateway starts on the port of one just stopped (its connections in TIME_WAIT), and on port 0", function()
    local m = mock_upstream()
    local pids = {}
    finally(function()
      for _, p in ipairs(pids) do if helpers.alive(p) then os.execute("kill -KILL " .. p) end end
      m:stop()
      resil.log.level("info")
    end)
    local port = helpers.free_port()
    for round = 1, 2 do
      local pid, log = listening_gateway(port, 2, m, pids, "round " .. round .. ": ")
      -- connections the gateway closes first (connection: close): their ends wait in TIME_WAIT on its port
      for _ = 1, 3 do chat_closed(port) end
      os.execute("kill -TERM " .. pid)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), helpers.slurp(log))
    end
    local out = helpers.with_server(("%s gateway --listen 127.0.0.1:0 --config %s --store %s")
      :format(helpers.resil, mock_config(m), helpers.tmpname(".db")), "listening on http://127.0.0.1:(%d+)",
      function(p) return p end)
    assert.is_truthy(tonumber(out))
  end)
end)

describe("gateway: the client's own API's fields and answers", function()
  local keys = require "resil.keys"
  -- an upstream that keeps what it was sent and answers with `message` (a table) or a body of text
  local function upstream(answer)
    local sent = {}
    return { routes = { ["POST /v1/chat/completions"] = function(req)
      sent[#sent + 1] = json.decode(req.body)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = type(answer) == "string" and answer
        or json.encode({ id = "up-1", object = "chat.completion", created = 1, model = "gpt-4o-mini",
          choices = { { index = 0, message = answer, finish_reason = "stop", logprobs = json.null } },
          usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }) }
    end } }, sent
  end

  it("an answer with a number JSON cannot write back (-Infinity) is still answered, translated, once", function()
    local scenario, sent = upstream('{"id":"up-1","object":"chat.completion","created":1,"model":"gpt-4o-mini",' ..
      '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop",' ..
      '"logprobs":{"content":[{"token":"ok","logprob":-Infinity,"bytes":[111,107],"top_logprobs":[]}]}}],' ..
      '"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}')
    local url = start(scenario)
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, logprobs = true })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("ok", json.decode(res.body).choices[1].message.content)
    assert.are.equal(1, #sent)
    assert.is_true(sent[1].logprobs)
  end)

  it("a legacy function_call is an answer, relayed whole: not 'empty', not retried", function()
    local scenario, sent = upstream({ role = "assistant", content = json.null,
      function_call = { name = "now", arguments = "{}" } })
    local url = start(scenario)
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS,
      functions = { { name = "now", parameters = { type = "object", properties = {} } } } })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("now", json.decode(res.body).choices[1].message.function_call.name)
    assert.are.equal(1, #sent)
    assert.are.equal("now", sent[1].functions[1].name)
  end)

  it("a service tier the ledger cannot price is a 400 before any call; the standard ones pass, and a priced one", function()
    local scenario, sent = upstream({ role = "assistant", content = "ok" })
    local url = start(scenario)
    -- scale (no price a token), priority for a model pricing.tiers does not price in it, an Anthropic tier
    for _, case in ipairs({ { "openai/gpt-4o-mini", "scale" }, { "openai/gpt-5-nano", "priority" },
                            { "anthropic/claude-haiku-4-5", "priority" } }) do
      local res = post(url .. "/v1/chat/completions", { model = case[1], messages = MSGS, service_tier = case[2] })
      assert.are.equal(400, res.status, case[1])
      assert.matches("service_tier '" .. case[2] .. "'", json.decode(res.body).error.message, 1, true)
    end
    assert.are.equal(0, #sent)
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, service_tier = "auto" })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("auto", sent[1].service_tier)
    -- priced in its tier: sent, and its cost is the tier's (the answer says which tier served it)
    local priced, priced_sent = upstream('{"id":"up-2","object":"chat.completion","created":1,"model":"gpt-4o-mini",' ..
      '"service_tier":"priority","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},' ..
      '"finish_reason":"stop"}],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"total_tokens":2000}}')
    url = start(priced)
    res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, service_tier = "priority" })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("priority", priced_sent[1].service_tier)
    local pricing = require "policies.pricing"
    assert.are.equal(pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 1000,
      service_tier = "priority" }), tonumber(res.headers["x-resil-cost-usd"]))
  end)

  it("who asked is the key's name upstream: a client's user or safety_identifier does not replace it", function()
    local scenario, sent = upstream({ role = "assistant", content = "ok" })
    local url = start(scenario, { auth = true })
    local key = assert(keys.add({ name = "alice" }))
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, user = "bob",
      safety_identifier = "bob", store = false }, { authorization = "Bearer " .. key })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("alice", sent[1].user)
    assert.is_nil(sent[1].safety_identifier)
    assert.is_false(sent[1].store) -- (the client's own API's other fields do pass)
  end)

  it("an Idempotency-Key's first answer and its replay are the provider's whole answer, the same", function()
    local scenario, sent = upstream({ role = "assistant", content = "ok", annotations = { { type = "url_citation",
      url_citation = { url = "https://example.com", title = "t", start_index = 0, end_index = 2 } } } })
    local url = start(scenario)
    local body = { model = "openai/gpt-4o-mini", messages = MSGS }
    local a = post(url .. "/v1/chat/completions", body, { ["idempotency-key"] = "whole-1" })
    local b = post(url .. "/v1/chat/completions", body, { ["idempotency-key"] = "whole-1" })
    assert.are.equal(200, b.status, b.body)
    assert.are.equal("https://example.com", json.decode(a.body).choices[1].message.annotations[1].url_citation.url)
    assert.are.equal(a.body, b.body)
    assert.are.equal(1, #sent)
  end)

  it("an Anthropic client's anthropic-beta header reaches Anthropic beside the gateway's own, and no one else", function()
    local seen, to_openai = {}, {}
    local url = start({ strict = true, routes = {
      ["POST /v1/messages"] = function(req)
        seen[#seen + 1] = req.headers["anthropic-beta"] or "none"
        return { status = 529, headers = { ["content-type"] = "application/json" },
          body = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}' }
      end,
      ["POST /v1/chat/completions"] = function(req)
        to_openai[#to_openai + 1] = req.headers["anthropic-beta"] or "none"
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
          id = "c-1", object = "chat.completion", created = 1, model = "gpt-4o-mini", choices = { { index = 0,
          message = { role = "assistant", content = "ok" }, finish_reason = "stop" } },
          usage = { prompt_tokens = 3, completion_tokens = 1, total_tokens = 4 } }) }
      end } })
    local res = post(url .. "/v1/messages", { model = "claude", max_tokens = 20, messages = MSGS },
      { ["anthropic-beta"] = "interleaved-thinking-2025-05-14" })
    assert.are.equal(200, res.status, res.body) -- (fallen back to OpenAI)
    assert.is_true(#seen > 0)
    for _, h in ipairs(seen) do assert.are.equal("interleaved-thinking-2025-05-14", h) end
    assert.are.same({ "none" }, to_openai)
    -- a beta billed at prices the ledger does not know is refused before any call
    local n = #seen
    res = post(url .. "/v1/messages", { model = "claude", max_tokens = 20, messages = MSGS },
      { ["anthropic-beta"] = "context-1m-2025-08-07" })
    assert.are.equal(400, res.status)
    assert.matches("context-1m", json.decode(res.body).error.message, 1, true)
    assert.are.equal(n, #seen)
  end)

  it("a streamed request with a body no provider can be sent is a 400, not a 500", function()
    local scenario, sent = upstream({ role = "assistant", content = "ok" })
    local url = start(scenario)
    local res = post(url .. "/v1/chat/completions", '{"model":"openai/gpt-4o-mini","stream":true,' ..
      '"messages":[{"role":"user","content":"hi"}],"metadata":{"x":1e999}}')
    assert.are.equal(400, res.status, res.body)
    assert.are.equal(0, #sent)
  end)
end)

describe("gateway: upstream errors", function()
  it("a provider's 429 after every retry is a 429 with rate_limit_exceeded as its code, and Retry-After", function()
    local url = start({ strict = true, sequence = { chat = { 429, 429, 429, 429, 429, 429, 429, 429 },
      messages = { 429, 429, 429, 429, 429, 429, 429, 429 } } })
    local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
    assert.are.equal(429, res.status, res.body)
    assert.are.equal("rate_limit_exceeded", json.decode(res.body).error.code)
    assert.is_truthy(res.headers["retry-after"])
  end)

  -- (found by helper J: an OpenAI client got not_found_error, a type OpenAI never sends)
  it("a provider's 404 is typed as each API types it: invalid_request_error for OpenAI, not_found_error for Anthropic",
    function()
      local url = start({ strict = true, sequence = { chat = { 404 }, messages = { 404 } } })
      local res = post(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS })
      assert.are.equal(404, res.status, res.body)
      assert.are.equal("invalid_request_error", json.decode(res.body).error.type)
      res = post(url .. "/v1/messages", { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 10,
        messages = MSGS })
      assert.are.equal(404, res.status, res.body)
      assert.are.equal("not_found_error", json.decode(res.body).error.type)
    end)
end)

describe("gateway: streams across APIs and from unusual providers", function()
  -- an Anthropic upstream whose first answer is cut after `cut_after` (a tool call's first piece,
  -- thinking), the next ones whole
  local function flaky_anthropic(whole, cut_after)
    local calls = 0
    return { routes = { ["POST /v1/messages"] = function()
      calls = calls + 1
      local body = streams.anthropic(whole)
      if calls == 1 then body = body:sub(1, (body:find(cut_after, 1, true))) end
      return streams.reply(body)
    end } }, function() return calls end
  end

  -- (before: the stream opened on the first tool delta; a cut after it was a 200 with only an error event)
  it("an OpenAI client's stream with tools served by Anthropic is retried when cut before its end", function()
    local scenario, calls = flaky_anthropic({ content = "Checking.", stop_reason = "tool_use",
      tool_calls = { { id = "toolu_1", name = "get_weather", arguments = '{"city":"Paris"}' } } }, "input_json_delta")
    local url = start(scenario)
    local evs, err = events_of(url .. "/v1/chat/completions", { model = "anthropic/claude-sonnet-4-5-20250929",
      messages = MSGS, stream = true, tools = { { type = "function", ["function"] = { name = "get_weather",
        parameters = { type = "object" } } } } })
    assert.is_nil(err)
    assert.are.equal("[DONE]", evs[#evs].data)
    local args = {}
    for _, ev in ipairs(evs) do
      local c = ev.data ~= "[DONE]" and json.decode(ev.data)
      local d = c and c.choices and c.choices[1] and c.choices[1].delta
      for _, t in ipairs(d and d.tool_calls or {}) do args[#args + 1] = t["function"].arguments end
    end
    assert.are.equal('{"city":"Paris"}', table.concat(args))
    assert.are.equal(2, calls())
  end)

  -- (before: thinking opened a stream being translated, so a cut in it was not retried)
  it("an OpenAI client's stream served by Anthropic is retried when cut in its thinking", function()
    local scenario, calls = flaky_anthropic({ thinking = { text = "Let me think about it.", signature = "s" },
      content = "The answer." }, "thinking_delta")
    local url = start(scenario)
    local evs, err = events_of(url .. "/v1/chat/completions", { model = "anthropic/claude-sonnet-4-5-20250929",
      messages = MSGS, stream = true })
    assert.is_nil(err)
    local text = {}
    for _, ev in ipairs(evs) do
      local c = ev.data ~= "[DONE]" and json.decode(ev.data)
      local d = c and c.choices and c.choices[1] and c.choices[1].delta
      if d and type(d.content) == "string" then text[#text + 1] = d.content end
    end
    assert.are.equal("The answer.", table.concat(text))
    assert.are.equal(2, calls())
  end)

  it("an event whose data came in several lines is relayed as several data lines", function()
    local url = start({ routes = { ["POST /v1/messages"] = function()
      local body = streams.anthropic({ content = "hello" })
      -- the same JSON, split over two data lines (SSE joins them with a newline)
      body = body:gsub('event: content_block_delta\ndata: {"', 'event: content_block_delta\ndata: {\ndata: "', 1)
      return streams.reply(body)
    end } })
    local evs, err = events_of(url .. "/v1/messages", { model = "claude", max_tokens = 20, messages = MSGS, stream = true })
    assert.is_nil(err)
    for _, ev in ipairs(evs) do assert.is_table(json.decode(ev.data), ev.data) end
    assert.are.equal("message_stop", evs[#evs].event)
  end)

  it("a client that asked for the usage gets a usage chunk though the provider sent none", function()
    local url = start({ routes = { ["POST /v1/chat/completions"] = function()
      return streams.reply(streams.openai({ content = "one two three" })) -- (no usage chunk)
    end } })
    local evs = events_of(url .. "/v1/chat/completions", { model = "openai/gpt-4o-mini", messages = MSGS, stream = true,
      stream_options = { include_usage = true } })
    local usage
    for _, ev in ipairs(evs) do
      local c = ev.data ~= "[DONE]" and json.decode(ev.data)
      if c and type(c.usage) == "table" then usage = c.usage end
    end
    assert.is_table(usage)
    assert.is_true(usage.completion_tokens > 0)
  end)

  it("an Anthropic pause_turn reaches an OpenAI client as finish_reason length, one of OpenAI's, whole and streamed", function()
    -- (the adapter's normalized "pause" was written as it was: a finish_reason the OpenAI API never
    -- sends, outside the SDKs' types, that an app's switch on it did not know; then "stop", which
    -- said the turn was whole: "length", an answer that ended before its end, docs/decisions.md)
    local url = start({ routes = { ["POST /v1/messages"] = function(req)
      if json.decode(req.body).stream then
        return streams.reply(streams.anthropic({ content = "Searching now.", stop_reason = "pause_turn" }))
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "msg_p", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
        content = { { type = "text", text = "Searching now." } }, stop_reason = "pause_turn", stop_sequence = json.null,
        usage = { input_tokens = 3, output_tokens = 5 } }) }
    end } })
    local body = { model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS }
    local res = post(url .. "/v1/chat/completions", body)
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("length", json.decode(res.body).choices[1].finish_reason)
    assert.are.equal("Searching now.", json.decode(res.body).choices[1].message.content)
    local tools = { { type = "function", ["function"] = { name = "a", parameters = { type = "object" } } } }
    for _, extra in ipairs({ {}, { tools = tools } }) do -- (a text stream, and one read whole for its tools)
      local b = { model = body.model, messages = MSGS, stream = true, tools = extra.tools }
      local evs = events_of(url .. "/v1/chat/completions", b)
      local finish
      for _, ev in ipairs(evs) do
        local c = ev.data ~= "[DONE]" and json.decode(ev.data)
        if c and c.choices and c.choices[1] and c.choices[1].finish_reason ~= json.null then finish = c.choices[1].finish_reason end
      end
      assert.are.equal("length", finish)
      assert.are.equal("[DONE]", evs[#evs].data)
    end
  end)

  it("an OpenAI refusal reaches an Anthropic client as its text, stopping for refusal", function()
    local url = start({ routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "c", object = "chat.completion", created = 1, model = "gpt-4o-mini", choices = { { index = 0,
          message = { role = "assistant", content = json.null, refusal = "I can't help with that." }, finish_reason = "stop" } },
        usage = { prompt_tokens = 3, completion_tokens = 5, total_tokens = 8 } }) }
    end } })
    local res = post(url .. "/v1/messages", { model = "openai/gpt-4o-mini", max_tokens = 20, messages = MSGS })
    assert.are.equal(200, res.status, res.body)
    local m = json.decode(res.body)
    assert.are.equal("refusal", m.stop_reason)
    assert.are.equal("I can't help with that.", m.content[1].text)
  end)
end)

describe("gateway: what a stream read while it opens was billed", function()
  local ledger = function() return assert(resil.cost.breakdown("provider")) end
  local function rows()
    local n = 0
    for _, g in ipairs(ledger()) do n = n + g.calls end
    return n
  end

  -- (before: a stream read to its end while it opened and cut, or left by its client, had no row)
  it("a translated stream with tools whose client leaves is recorded, with what it streamed", function()
    -- 1,500 words streamed, then nothing: the stream is still being read to its end when the client leaves
    local url, m = start({ strict = true, reply = ("word "):rep(2000), stream_interval = 0,
      sequence = { chat = { { kind = "stall", after = 1500 } } } })
    local res = http.request({ method = "POST", url = url .. "/v1/messages", timeout = 1,
      headers = { ["content-type"] = "application/json" }, body = json.encode({ model = "openai/gpt-4o-mini",
        max_tokens = 4000, messages = MSGS, stream = true, tools = { { name = "save", input_schema = { type = "object" } } } }) })
    assert.is_nil(res) -- (the client gave up)
    assert.are.equal(1, m:stats().routes.chat)
    assert.is_true(helpers.wait_until(function() return rows() >= 1 end, 10))
    local usd = ledger()[1].usd
    assert.is_true(usd >= require("policies.pricing").cost("openai", "gpt-4o-mini", { input_tokens = 0,
      output_tokens = 1500 }), tostring(usd))
  end)

  it("an attempt cut while it was read to its end is recorded, then retried", function()
    local calls = 0
    local url = start({ routes = { ["POST /v1/chat/completions"] = function()
      calls = calls + 1
      local body = streams.openai({ content = ("word "):rep(400), usage = { prompt_tokens = 5, completion_tokens = 400 } })
      if calls == 1 then body = body:sub(1, #body // 2) end
      return streams.reply(body)
    end } })
    local evs, err = events_of(url .. "/v1/messages", { model = "openai/gpt-4o-mini", max_tokens = 2000, messages = MSGS,
      stream = true, tools = { { name = "save", input_schema = { type = "object" } } } })
    assert.is_nil(err)
    assert.are.equal("message_stop", evs[#evs].event)
    assert.are.equal(2, calls)
    assert.is_true(helpers.wait_until(function() return rows() >= 2 end, 10), tostring(rows()))
  end)

  it("an Anthropic error event the adapter did not expect is retried and fallen back from, not a 400", function()
    local url = start({ routes = { ["POST /v1/messages"] = function()
      return streams.reply('event: error\ndata: {"type":"error","error":true}\n\n')
    end } })
    local evs, err = events_of(url .. "/v1/messages", { model = "claude", max_tokens = 20, messages = MSGS, stream = true })
    assert.is_nil(err)
    assert.are.equal("message_stop", evs[#evs].event) -- (served by the fallback, OpenAI)
  end)

  it("an OpenAI refusal streamed to an Anthropic client is its text", function()
    local url = start({ routes = { ["POST /v1/chat/completions"] = function()
      return streams.reply(streams.openai({ refusal = "I can't help with that." }))
    end } })
    local evs = events_of(url .. "/v1/messages", { model = "openai/gpt-4o-mini", max_tokens = 20, messages = MSGS,
      stream = true })
    local text, stop = {}, nil
    for _, ev in ipairs(evs) do
      local d = json.decode(ev.data)
      if d.type == "content_block_delta" then text[#text + 1] = d.delta.text end
      if d.type == "message_delta" then stop = d.delta.stop_reason end
    end
    assert.are.equal("I can't help with that.", table.concat(text))
    assert.are.equal("refusal", stop)
  end)

  it("an Anthropic stream that ends without message_delta is recorded with what it streamed", function()
    local url = start({ routes = { ["POST /v1/messages"] = function()
      local body = streams.anthropic({ content = ("word "):rep(400) })
      return streams.reply((body:gsub("event: message_delta\ndata: [^\n]*\n\n", "")))
    end } })
    local evs = events_of(url .. "/v1/messages", { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 2000,
      messages = MSGS, stream = true })
    assert.are.equal("message_stop", evs[#evs].event)
    assert.is_true(helpers.wait_until(function() return rows() >= 1 end, 10))
    local usd = ledger()[1].usd
    assert.is_true(usd >= require("policies.pricing").cost("anthropic", "claude-sonnet-4-5-20250929",
      { input_tokens = 0, output_tokens = 400 }), tostring(usd))
  end)
end)

-- (found by helper J: an Anthropic client got input {} (streamed: partial_json "{}"), the arguments
-- the OpenAI upstream had written before max_tokens lost)
describe("gateway: a tool call cut at max_tokens, from OpenAI to an Anthropic client", function()
  local ARGS = '{"x":"ab'
  local function cut_call(req)
    local call = { index = 0, id = "call_1", type = "function", ["function"] = { name = "f", arguments = ARGS } }
    if (json.decode(req.body) or {}).stream then
      local function chunk(delta, finish)
        return "data: " .. json.encode({ id = "up-1", object = "chat.completion.chunk", model = "gpt-4o-mini",
          choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
      end
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        body = chunk({ role = "assistant", tool_calls = { call } }) .. chunk({}, "length") .. "data: [DONE]\n\n" }
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({ id = "up-1",
      object = "chat.completion", model = "gpt-4o-mini", choices = { { index = 0, finish_reason = "length",
        message = { role = "assistant", content = json.null, tool_calls = { call } } } },
      usage = { prompt_tokens = 5, completion_tokens = 3 } }) }
  end
  local BODY = { model = "openai/gpt-4o-mini", max_tokens = 3, messages = MSGS,
    tools = { { name = "f", input_schema = { type = "object", properties = { x = { type = "string" } } } } } }

  it("keeps what the arguments held: input as far as it parses, streamed as the partial JSON it was", function()
    local url = start({ routes = { ["POST /v1/chat/completions"] = cut_call } })
    local res = post(url .. "/v1/messages", BODY)
    assert.are.equal(200, res.status, res.body)
    local m = json.decode(res.body)
    assert.are.equal("max_tokens", m.stop_reason)
    assert.are.equal("tool_use", m.content[1].type)
    assert.are.equal("ab", m.content[1].input.x, res.body)
    local streamed = {}
    for k, v in pairs(BODY) do streamed[k] = v end
    streamed.stream = true
    local evs = events_of(url .. "/v1/messages", streamed)
    local partial, stop
    for _, ev in ipairs(evs) do
      local d = json.decode(ev.data)
      if d.type == "content_block_delta" and d.delta.type == "input_json_delta" then
        partial = (partial or "") .. d.delta.partial_json
      elseif d.type == "message_delta" then stop = d.delta.stop_reason end
    end
    assert.are.equal(ARGS, partial)
    assert.are.equal("max_tokens", stop)
  end)
end)
