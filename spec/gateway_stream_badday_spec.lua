-- Streams through the gateway on a bad day (policies/gateway.lua's stream
-- functions): upstreams that end oddly, clients that leave at every point,
-- many streams at once. A real mock provider on loopback, a fresh SQLite
-- store, clients reading with resil.http.stream as an SDK reads.
local resil = require "resil"
local helpers = require "spec.helpers"
local json = resil.json

local fresh_gateway = helpers.fresh_gateway
local CLAUDE = "anthropic/claude-sonnet-4-5-20250929"

-- a mock, a gateway in front of it (keys on), a fresh store -> the gateway's url, the mock, a key
-- with a budget
local function start(scenario)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start(scenario))
  local gateway, ai = fresh_gateway()
  local keys = require "resil.keys"
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  local fast = { base = 0.001, cap = 0.005 }
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = fast })
  ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-test-123456", retry = fast })
  gateway.configure({ models = {}, auth = true, key_cache = 0 })
  local key = assert(keys.add({ name = "streams", budget = "100/day" }))
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    s:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), m, key
end

local function path_of(api) return api == "openai" and "/v1/chat/completions" or "/v1/messages" end

-- a streamed request -> the stream (a 200's), as an SDK opens it
local function open(url, key, api, body)
  body.stream, body.max_tokens = true, body.max_tokens or 200
  body.messages = body.messages or { { role = "user", content = "hi" } }
  local s, err = resil.http.stream({ method = "POST", url = url .. path_of(api), timeout = 60, body = json.encode(body),
    headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json",
      ["anthropic-version"] = "2023-06-01" } })
  assert(s, err and err.message)
  assert.are.equal(200, s.status)
  return s
end

local function events_of(s)
  local evs = {}
  while true do
    local ev, err = s:read_event()
    assert.is_nil(err)
    if not ev then return evs end
    evs[#evs + 1] = ev
  end
end

local function rows()
  local n = 0
  for _, g in ipairs(resil.cost.breakdown("model")) do n = n + g.calls end
  return n
end

-- the key's budget: no hold left, and its spend the ledger's
local function settled()
  local b = assert(resil.budget("key:streams"):state())
  assert.are.same({ 0, 0 }, { #b.holds, b.reserved })
  assert.is_true(math.abs(b.spent - resil.cost.total({})) <= 1e-6, b.spent .. " spent, " .. resil.cost.total({}))
end

local function chunk(delta, finish)
  return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
    choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
end

describe("gateway streams on a bad day: an upstream that ends oddly", function()
  -- (before: the OpenAI client's stream ended with neither [DONE] nor an error, as a cut one looks
  -- to a client that reads the events itself, while the ledger and an Anthropic client took it whole)
  it("an OpenAI stream closed after its finish_reason without [DONE] ends with [DONE], its usage as recorded",
    function()
    local url, _, key = start({ strict = true, routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
        chunk({ role = "assistant", content = "" }), chunk({ content = "hello " }), chunk({ content = "world" }),
        chunk({}, "stop") } }
    end } })
    local evs = events_of(open(url, key, "openai", { model = "openai/gpt-4o-mini",
      stream_options = { include_usage = true } }))
    assert.are.equal("[DONE]", evs[#evs].data)
    local usage = json.decode(evs[#evs - 1].data).usage
    assert.is_table(usage, evs[#evs - 1].data)
    assert.is_true(usage.completion_tokens > 0)
    assert.are.equal("stop", json.decode(evs[#evs - 2].data).choices[1].finish_reason)
    -- the Anthropic client of the same stream: complete too
    evs = events_of(open(url, key, "anthropic", { model = "openai/gpt-4o-mini" }))
    assert.are.equal("message_stop", evs[#evs].event)
    assert.is_true(helpers.wait_until(function() return rows() == 2 end, 10))
    settled()
  end)
end)

-- (before: an upstream that labels its stream application/json is read whole as it opens; relayed
-- to a client of its own API, its events ended with [DONE] or message_stop, then an error event
-- "the upstream's stream could not be read", which the Anthropic SDK raises on a complete answer)
describe("gateway streams on a bad day: an upstream that labels its stream application/json", function()
  it("reaches each API's own client complete, its end marker last", function()
    local function ev(name, data) return ("event: %s\ndata: %s\n\n"):format(name, json.encode(data)) end
    local url, _, key = start({ strict = true, routes = {
      ["POST /v1/chat/completions"] = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, chunks = {
          chunk({ role = "assistant", content = "" }), chunk({ content = "hello" }), chunk({}, "stop"),
          "data: [DONE]\n\n" } }
      end,
      ["POST /v1/messages"] = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, chunks = {
          ev("message_start", { type = "message_start", message = { id = "msg_1", type = "message", role = "assistant",
            model = "claude-sonnet-4-5-20250929", content = setmetatable({}, json.array_mt),
            usage = { input_tokens = 10, output_tokens = 1 } } }),
          ev("content_block_start", { type = "content_block_start", index = 0, content_block = { type = "text", text = "" } }),
          ev("content_block_delta", { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = "hello" } }),
          ev("content_block_stop", { type = "content_block_stop", index = 0 }),
          ev("message_delta", { type = "message_delta", delta = { stop_reason = "end_turn" }, usage = { output_tokens = 2 } }),
          ev("message_stop", { type = "message_stop" }) } }
      end } })
    for _, case in ipairs({ { "openai", "openai/gpt-4o-mini" }, { "anthropic", CLAUDE } }) do
      local api, model = case[1], case[2]
      local evs = events_of(open(url, key, api, { model = model }))
      local last = evs[#evs]
      assert.are.equal(api == "openai" and "[DONE]" or "message_stop", api == "openai" and last.data or last.event,
        api .. ": " .. last.data)
      for _, e in ipairs(evs) do assert.is_not.equal("error", e.event, e.data) end
    end
    assert.is_true(helpers.wait_until(function() return rows() == 2 end, 10))
    settled()
  end)
end)

-- (before: a compatible server's `event: error` whose data is the error itself, which the OpenAI SDK
-- raises on, was relayed as a chunk without choices, its event line dropped, where an SDK's
-- `chunk.choices[0]` is a TypeError; the stream then ended with "the stream ended without its end
-- marker", the provider's message lost)
describe("gateway streams on a bad day: an OpenAI-compatible upstream's `event: error`", function()
  it("ends each client's stream with its error event, saying the provider's message", function()
    local url, _, key = start({ strict = true, routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
        chunk({ role = "assistant", content = "" }), chunk({ content = "hello" }),
        'event: error\ndata: {"message":"the model is overloaded","type":"server_error"}\n\n' } }
    end } })
    for _, api in ipairs({ "openai", "anthropic" }) do
      local evs = events_of(open(url, key, api, { model = "openai/gpt-4o-mini" }))
      local last = evs[#evs]
      if api == "openai" then
        for i = 1, #evs - 1 do assert.is_table(json.decode(evs[i].data).choices, evs[i].data) end
        assert.is_table(json.decode(last.data).error, last.data)
      else
        assert.are.equal("error", last.event, last.data)
      end
      assert.matches("the model is overloaded", last.data)
    end
    assert.is_true(helpers.wait_until(function() return rows() == 2 end, 10))
    settled()
  end)
end)

describe("gateway streams on a bad day: an event that is JSON but not an object", function()
  -- (before: an OpenAI client of an OpenAI provider got `data: []` as a chunk made of the gateway's
  -- id and model alone, which the SDK's stream helper raises on (chunk.choices is not iterable);
  -- an Anthropic provider's was relayed as it came, or skipped once translated)
  for _, garbage in ipairs({ "[]", "[1]", "1", "\"x\"", "null" }) do
    for _, provider in ipairs({ "openai/gpt-4o-mini", CLAUDE }) do
      it(("`data: %s` from %s ends each client's stream with its error event"):format(garbage, provider), function()
        local function ev(name, data) return ("event: %s\ndata: %s\n\n"):format(name, json.encode(data)) end
        local url, _, key = start({ strict = true, routes = {
          ["POST /v1/chat/completions"] = function()
            return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
              chunk({ role = "assistant", content = "" }), chunk({ content = "hello " }), "data: " .. garbage .. "\n\n",
              chunk({ content = "world" }), chunk({}, "stop"), "data: [DONE]\n\n" } }
          end,
          ["POST /v1/messages"] = function()
            return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
              ev("message_start", { type = "message_start", message = { id = "msg_1", type = "message",
                role = "assistant", model = "claude-sonnet-4-5-20250929", content = setmetatable({}, json.array_mt),
                usage = { input_tokens = 10, output_tokens = 1 } } }),
              ev("content_block_start", { type = "content_block_start", index = 0,
                content_block = { type = "text", text = "" } }),
              ev("content_block_delta", { type = "content_block_delta", index = 0,
                delta = { type = "text_delta", text = "hello " } }),
              "event: content_block_delta\ndata: " .. garbage .. "\n\n",
              ev("content_block_delta", { type = "content_block_delta", index = 0,
                delta = { type = "text_delta", text = "world" } }),
              ev("content_block_stop", { type = "content_block_stop", index = 0 }),
              ev("message_delta", { type = "message_delta", delta = { stop_reason = "end_turn" },
                usage = { output_tokens = 2 } }),
              ev("message_stop", { type = "message_stop" }) } }
          end } })
        for _, api in ipairs({ "openai", "anthropic" }) do
          local evs = events_of(open(url, key, api, { model = provider }))
          local last = evs[#evs]
          for i = 1, #evs - 1 do
            local data = json.decode(evs[i].data)
            assert.is_true(type(data) == "table" and data[1] == nil and getmetatable(data) ~= json.array_mt,
              api .. " client, event " .. i .. ": " .. tostring(evs[i].data))
            if api == "openai" then assert.is_table(data.choices, evs[i].data) end
            assert.is_nil(data.error, evs[i].data)
          end
          if api == "openai" then
            assert.is_table(json.decode(last.data).error, last.data)
          else
            assert.are.equal("error", last.event, last.data)
          end
          assert.matches("hello", table.concat((function()
            local t = {}
            for _, e in ipairs(evs) do t[#t + 1] = e.data end
            return t
          end)()))
        end
        assert.is_true(helpers.wait_until(function() return rows() == 2 end, 10))
        settled()
      end)
    end
  end
end)

describe("gateway streams on a bad day: an emoji cut in two UTF-16 halves", function()
  -- (before: a provider that cuts its deltas by UTF-16 code unit, as a JavaScript server slicing a
  -- string does, sent "\ud83d" ending one delta and "\udc4b" starting the next; the SDKs' JSON.parse
  -- takes a lone surrogate and their concatenation joins the halves, but cjson refused it and the
  -- stream broke: "an event that is not JSON")
  local function ev(name, data) return ("event: %s\ndata: %s\n\n"):format(name, data) end
  for _, provider in ipairs({ "openai/gpt-4o-mini", CLAUDE }) do
    it("reaches each client whole from " .. provider .. "; a half with no other is U+FFFD", function()
      local function delta(text) -- (text: JSON string contents, escapes as written)
        return 'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":' ..
          '[{"index":0,"delta":{"content":"' .. text .. '"},"logprobs":null,"finish_reason":null}]}\n\n'
      end
      local function text_delta(text)
        return ev("content_block_delta", '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'
          .. text .. '"}}')
      end
      local TEXTS = { "hi \\ud83d", "\\udc4b there, \\\\ud83d is \\ud83d", " not \\udc4b" }
      local url, _, key = start({ strict = true, routes = {
        ["POST /v1/chat/completions"] = function()
          local chunks = { chunk({ role = "assistant", content = "" }) }
          for _, t in ipairs(TEXTS) do chunks[#chunks + 1] = delta(t) end
          chunks[#chunks + 1] = chunk({}, "stop")
          chunks[#chunks + 1] = "data: [DONE]\n\n"
          return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = chunks }
        end,
        ["POST /v1/messages"] = function()
          local chunks = { ev("message_start", json.encode({ type = "message_start", message = { id = "msg_1",
            type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
            content = setmetatable({}, json.array_mt), usage = { input_tokens = 10, output_tokens = 1 } } })),
            ev("content_block_start", '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}') }
          for _, t in ipairs(TEXTS) do chunks[#chunks + 1] = text_delta(t) end
          chunks[#chunks + 1] = ev("content_block_stop", '{"type":"content_block_stop","index":0}')
          chunks[#chunks + 1] = ev("message_delta", '{"type":"message_delta","delta":{"stop_reason":"end_turn"},' ..
            '"usage":{"output_tokens":9}}')
          chunks[#chunks + 1] = ev("message_stop", '{"type":"message_stop"}')
          return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = chunks }
        end } })
      -- (the relayed Anthropic events are the provider's text: decoded here as the SDK's JSON.parse would)
      local WANT = "hi \240\159\145\139 there, \\ud83d is \239\191\189 not \239\191\189"
      for _, api in ipairs({ "openai", "anthropic" }) do
        local text = {}
        local evs = events_of(open(url, key, api, { model = provider }))
        assert.are.equal(api == "openai" and "[DONE]" or "message_stop", api == "openai" and evs[#evs].data
          or evs[#evs].event)
        local read = {} -- (one stream's: a half carried from an event to the next)
        for i = 1, api == "openai" and #evs - 1 or #evs do
          local e = evs[i]
          local data = require("policies.event_json")(read, e.data)
          assert.is_not_nil(data, e.data)
          local piece = type(data) == "table" and (api == "openai" and type(data.choices) == "table" and data.choices[1]
            and data.choices[1].delta.content or type(data.delta) == "table" and data.delta.text)
          if type(piece) == "string" then text[#text + 1] = piece end
          assert.is_nil(type(data) == "table" and data.error or nil, e.data)
        end
        assert.are.equal(WANT, table.concat(text), api .. " client")
      end
      assert.is_true(helpers.wait_until(function() return rows() == 2 end, 10))
      settled()
    end)
  end

  it("a tool call's arguments get their halves joined too, in their own field", function()
    local event_json, read = require "policies.event_json", {}
    local one = event_json(read, '{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1",' ..
      '"function":{"name":"w","arguments":"{\\"city\\":\\"\\ud83c"}}]}}]}')
    local two = event_json(read, '{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,' ..
      '"function":{"arguments":"\\udfd4\\"}"}}]}}]}')
    assert.are.equal('{"city":"\240\159\143\148"}', one.choices[1].delta.tool_calls[1]["function"].arguments ..
      two.choices[1].delta.tool_calls[1]["function"].arguments)
    assert.are.equal("c1", two.id) -- (the half went to its own field, not the first string)
    assert.is_nil(read.surrogate)
  end)
end)

describe("gateway streams on a bad day: usage that comes twice", function()
  -- (before: a second usage chunk with counts that cannot be read replaced the provider's good one,
  -- and the row was an estimate from the bytes streamed: 8 and 3 tokens for 100 and 50)
  it("an OpenAI stream's unreadable second usage leaves the first one recorded", function()
    local function usage_chunk(u)
      return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
        choices = setmetatable({}, json.array_mt), usage = u }) .. "\n\n"
    end
    local url, _, key = start({ strict = true, routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
        chunk({ role = "assistant", content = "" }), chunk({ content = "hello" }), chunk({}, "stop"),
        usage_chunk({ prompt_tokens = 100, completion_tokens = 50, total_tokens = 150 }),
        usage_chunk({ prompt_tokens = "many", completion_tokens = -1 }), "data: [DONE]\n\n" } }
    end } })
    local evs = events_of(open(url, key, "openai", { model = "openai/gpt-4o-mini" }))
    assert.are.equal("[DONE]", evs[#evs].data)
    assert.is_true(helpers.wait_until(function() return rows() == 1 end, 10))
    -- gpt-4o-mini: $0.15 and $0.60 a million input and output tokens
    assert.are.equal(string.format("%.9f", (100 * 0.15 + 50 * 0.60) / 1e6), string.format("%.9f", resil.cost.total({})))
    settled()
  end)

  it("an Anthropic stream's unreadable message_delta usage leaves message_start's input recorded", function()
    local function ev(name, data) return ("event: %s\ndata: %s\n\n"):format(name, json.encode(data)) end
    local url, _, key = start({ strict = true, routes = { ["POST /v1/messages"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
        ev("message_start", { type = "message_start", message = { id = "msg_1", type = "message", role = "assistant",
          model = "claude-sonnet-4-5-20250929", content = setmetatable({}, json.array_mt),
          usage = { input_tokens = 100, output_tokens = 1 } } }),
        ev("content_block_start", { type = "content_block_start", index = 0, content_block = { type = "text", text = "" } }),
        ev("content_block_delta", { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = "hello" } }),
        ev("content_block_stop", { type = "content_block_stop", index = 0 }),
        ev("message_delta", { type = "message_delta", delta = { stop_reason = "end_turn" },
          usage = { output_tokens = "several" } }),
        ev("message_stop", { type = "message_stop" }) } }
    end } })
    local evs = events_of(open(url, key, "anthropic", { model = CLAUDE }))
    assert.are.equal("message_stop", evs[#evs].event)
    assert.is_true(helpers.wait_until(function() return rows() == 1 end, 10))
    -- claude-sonnet-4-5: $3 and $15 a million; the output estimated from the 5 bytes streamed (2 tokens)
    assert.are.equal(string.format("%.9f", (100 * 3 + 2 * 15) / 1e6), string.format("%.9f", resil.cost.total({})))
    settled()
  end)
end)

describe("gateway streams on a bad day: a client that stops a stream", function()
  -- (before: the stream's record was written in a task of its own, after the reply's end, and its
  -- key's tpm kept the request's estimate, all of max_tokens: two streams stopped after a few
  -- words took 8,000 of the key's 10,000 tokens a minute, and the next request was a 429)
  for _, case in ipairs({ { "openai", "openai/gpt-4o-mini" }, { "anthropic", "openai/gpt-4o-mini" },
    { "openai", CLAUDE }, { "anthropic", CLAUDE } }) do
    local api, model = case[1], case[2]
    it(("gives its key's tpm back what it did not use (%s client, %s)"):format(api, model), function()
      local url = start({ strict = true, reply = ("word "):rep(200), stream_interval = 0.01 })
      local keys = require "resil.keys"
      local key = assert(keys.add({ name = "tpm-" .. api, tpm = 10000 }))
      for _ = 1, 2 do
        local s = open(url, key, api, { model = model, max_tokens = 4000 })
        for _ = 1, 3 do assert(s:read_event()) end
        s:close() -- (the user pressed stop)
      end
      assert.is_true(helpers.wait_until(function() return rows() == 2 end, 10))
      -- a third request of the same size fits in the key's minute: the first two used a few tokens
      local served = helpers.wait_until(function()
        local s = resil.http.stream({ method = "POST", url = url .. path_of(api), timeout = 10,
          headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json",
            ["anthropic-version"] = "2023-06-01" }, body = json.encode({ model = model, max_tokens = 4000, stream = true,
            messages = { { role = "user", content = "hi" } } }) })
        local status = s and s.status
        if s then s:close() end
        return status == 200
      end, 2)
      assert.is_true(served, "the key's tpm kept the estimates of the streams its client stopped")
      -- the third stream's row, written once the gateway sees its client leave, lands in this store:
      -- after the test it went into the next test's fresh store, which then counted one row too many
      -- (3, not 2), or two with only one of its own (a pass by accident)
      assert.is_true(helpers.wait_until(function() return rows() >= 3 end, 10))
    end)
  end
end)

describe("gateway streams on a bad day: an upstream event past max_event before the first delta", function()
  -- (before: the client was answered 413, OpenAI's invalid_request_error and Anthropic's
  -- request_too_large, for a request of a few bytes: it was the upstream's answer that was too
  -- large, and an SDK does not retry a 413, taking its own request for the fault)
  it("is the gateway's 502 for each client, its request not called too large", function()
    local function ev(name, data) return ("event: %s\ndata: %s\n\n"):format(name, json.encode(data)) end
    local BIG = ("x"):rep(9 * 1024 * 1024) -- (the default max_event is 8 MiB)
    local url, _, key = start({ strict = true, routes = {
      ["POST /v1/chat/completions"] = function()
        return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
          chunk({ role = "assistant", content = "" }), chunk({ content = BIG }), chunk({}, "stop"), "data: [DONE]\n\n" } }
      end,
      ["POST /v1/messages"] = function()
        return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
          ev("message_start", { type = "message_start", message = { id = "msg_1", type = "message", role = "assistant",
            model = "claude-sonnet-4-5-20250929", content = setmetatable({}, json.array_mt),
            usage = { input_tokens = 10, output_tokens = 1 } } }),
          ev("content_block_start", { type = "content_block_start", index = 0, content_block = { type = "text", text = "" } }),
          ev("content_block_delta", { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = BIG } }) } }
      end } })
    for _, api in ipairs({ "openai", "anthropic" }) do
      for _, model in ipairs({ "openai/gpt-4o-mini", CLAUDE }) do
        local s = assert(resil.http.stream({ method = "POST", url = url .. path_of(api), timeout = 60,
          headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json",
            ["anthropic-version"] = "2023-06-01" }, body = json.encode({ model = model, max_tokens = 200, stream = true,
            messages = { { role = "user", content = "hi" } } }) }))
        local body = {}
        for piece in function() return s:read() end do body[#body + 1] = piece end
        body = json.decode(table.concat(body))
        assert.are.equal(502, s.status, api .. " client of " .. model)
        assert.are.equal("false", s.headers["x-should-retry"]) -- (not tried again by the policy: nor by the SDK)
        if api == "anthropic" then assert.are.equal("api_error", body.error.type)
        else assert.are.equal("server_error", body.error.type) end
        assert.matches("max_event", body.error.message)
      end
    end
    settled()
  end)
end)

-- a request of the client's API whose one tool must be called (the other API's stream is then
-- read whole, its tool call written whole)
local function tool_body(api, model)
  local schema = { type = "object", properties = { text = { type = "string" } } }
  if api == "anthropic" then
    return { model = model, tools = { { name = "save", input_schema = schema } }, tool_choice = { type = "any" } }
  end
  return { model = model, tools = { { type = "function", ["function"] = { name = "save", parameters = schema } } },
    tool_choice = "required" }
end

-- A stream from the other API that carries tools is read to its end before its first byte to the
-- client (its tool calls are written whole). A client that left meanwhile (an abort, a timeout)
-- left the upstream generating and billing to its end for no one.
describe("gateway streams on a bad day: a client that leaves a stream read whole", function()
  for _, case in ipairs({ { "anthropic", "openai/gpt-4o-mini" }, { "openai", CLAUDE } }) do
    local api, model = case[1], case[2]
    it(("cancels the upstream transfer (%s client, %s)"):format(api, model), function()
      local url, m, key = start({ strict = true, reply = ("word "):rep(60), stream_interval = 0.5 })
      local body = tool_body(api, model)
      local client = resil.spawn(open, url, key, api, body)
      assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10))
      client:cancel() -- (the client's SDK aborted: its connection closed)
      -- (the answer's 40-odd pieces, half a second apart, took 20 s: gone in far less)
      assert.is_true(helpers.wait_until(function() return m.server:pending() == 0 end, 5),
        "the upstream kept generating for a client that left")
    end)
  end
end)

-- The same stream, long (its 100 pieces half a second apart): its client heard nothing for the
-- whole generation, and a proxy's idle timeout in between (nginx's proxy_read_timeout, 60 s)
-- cut it. Past 15 s its status is sent, then a comment line every 15 s, then the whole answer.
describe("gateway streams read whole: a long one is kept alive", function()
  for _, case in ipairs({ { "anthropic", "openai/gpt-4o-mini" }, { "openai", CLAUDE } }) do
    local api, model = case[1], case[2]
    it(("sends its status, keep-alive comments, then the whole answer (%s client, %s)"):format(api, model), function()
      local url, m, key = start({ strict = true, reply = ("word "):rep(200), stream_interval = 0.5 })
      resil.clock.virtual()
      finally(function() resil.clock.real() end)
      local body = tool_body(api, model)
      local t0 = resil.now()
      local s = open(url, key, api, body)
      local opened_after = resil.now() - t0
      local parts = {}
      while true do
        local chunk, err = s:read()
        assert.is_nil(err)
        if not chunk then break end
        parts[#parts + 1] = chunk
      end
      local text = table.concat(parts)
      assert.is_true(opened_after >= 15 and opened_after < 20, ("status after %.1f s"):format(opened_after))
      local _, comments = text:gsub(": keep%-alive\n\n", "")
      local took = resil.now() - t0
      assert.is_true(took > 30, ("the answer took %.1f s"):format(took))
      -- one every 15 s it was still read after its status went
      assert.are.equal(math.floor((took - 15) / 15), comments, text:sub(1, 300))
      local done = api == "anthropic" and "event: message_stop" or "data: [DONE]"
      assert.truthy(text:find(done, 1, true), text:sub(-300))
      assert.truthy(text:find("save", 1, true)) -- (the tool call, written whole)
      assert.are.equal(1, m:stats().total)
      assert.is_true(helpers.wait_until(function() return rows() == 1 end, 10)) -- (its cost, once)
      settled()
    end)
  end

  it("ends with an error event, no end marker, when every attempt fails after its status went", function()
    -- (an Anthropic client served by OpenAI: each attempt answered 500 after 8 s)
    local url, m, key = start({ strict = true, latency = 8,
      faults = { { route = "chat", probability = 1, status = 500 } } })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local s = open(url, key, "anthropic", tool_body("anthropic", "openai/gpt-4o-mini"))
    local evs = events_of(s)
    local last = evs[#evs]
    assert.are.equal("error", last.event)
    assert.are.equal("error", json.decode(last.data).type)
    for _, ev in ipairs(evs) do assert.are_not.equal("message_stop", ev.event) end
    assert.is_true(m:stats().total >= 2) -- (retried as before: the status sent changed none of that)
  end)

  it("cancels the upstream when its client leaves after the status went", function()
    local url, m, key = start({ strict = true, reply = ("word "):rep(200), stream_interval = 0.5 })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local s = open(url, key, "openai", tool_body("openai", CLAUDE))
    assert.are.equal(1, m.server:pending())
    s:close() -- (the client's SDK aborted)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 0 end, 5),
      "the upstream kept generating for a client that left")
    assert.is_true(helpers.wait_until(function() return rows() == 1 end, 10)) -- (what it billed, recorded)
    settled()
  end)
end)

-- A relayed stream whose first delta is long in coming (a reasoning model's thinking, a long
-- prompt's first token): its client heard nothing until then, and a proxy's idle timeout in between
-- (nginx's proxy_read_timeout, a load balancer's 60 s) cut it, the stream paid and lost. Past 15 s
-- its status is sent, then a comment line every 15 s, then the stream as it is relayed.
describe("gateway streams relayed: a first delta long in coming is kept alive", function()
  for _, case in ipairs({ { "openai", "openai/gpt-4o-mini" }, { "anthropic", CLAUDE }, { "anthropic", "openai/gpt-4o-mini" },
    { "openai", CLAUDE } }) do
    local api, model = case[1], case[2]
    it(("sends its status, keep-alive comments, then the stream (%s client, %s)"):format(api, model), function()
      local url, m, key = start({ strict = true, reply = "one two three", latency = 40 })
      resil.clock.virtual()
      finally(function() resil.clock.real() end)
      local t0 = resil.now()
      local s = open(url, key, api, { model = model })
      local opened_after = resil.now() - t0
      local parts = {}
      while true do
        local chunk, err = s:read()
        assert.is_nil(err)
        if not chunk then break end
        parts[#parts + 1] = chunk
      end
      local text = table.concat(parts)
      assert.is_true(opened_after >= 15 and opened_after < 20, ("status after %.1f s"):format(opened_after))
      assert.is_nil(s.headers["x-resil-provider"]) -- (not known as the status went)
      local _, comments = text:gsub(": keep%-alive\n\n", "")
      assert.are.equal(1, comments, text:sub(1, 300)) -- (at 30 s: the first delta came at 40 s)
      local done = api == "anthropic" and "event: message_stop" or "data: [DONE]"
      assert.truthy(text:find(done, 1, true), text:sub(-300))
      assert.truthy(text:find("three", 1, true), text)
      assert.are.equal(1, m:stats().total)
      assert.is_true(helpers.wait_until(function() return rows() == 1 end, 10)) -- (its cost, once)
      settled()
    end)
  end

  -- (reviewer R2's cases: a client that leaves while the status went and the first delta has not,
  -- the provider's 200 at 16 s, the client gone before it or after it, or a provider that hangs)
  for _, case in ipairs({ { "openai", "openai/gpt-4o-mini" }, { "anthropic", CLAUDE } }) do
    for _, leave_at in ipairs({ 15.7, 16.5 }) do
      local api, model = case[1], case[2]
      it(("a client that leaves at %s s, the 200 at 16 s: recorded once, no hold (%s client, %s)"):format(
        leave_at, api, model), function()
        local url, m, key = start({ strict = true, latency = 16, reply = ("word "):rep(50), stream_interval = 0.5 })
        resil.clock.virtual()
        finally(function() resil.clock.real() end)
        local t0 = resil.now()
        local s = open(url, key, api, { model = model })
        resil.sleep(leave_at - (resil.now() - t0))
        s:close()
        assert.is_true(helpers.wait_until(function()
          return rows() >= 1 and #assert(resil.budget("key:streams"):state()).holds == 0 end, 30))
        assert.are.equal(1, rows())
        assert.are.equal(1, m:stats().total)
        settled()
      end)
    end
  end

  it("a client that leaves during the keep-alive from a provider that hangs: nothing recorded, no hold", function()
    local url, _, key = start({ strict = true, faults = { { route = "chat", kind = "hang" } } })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local t0 = resil.now()
    local s = open(url, key, "openai", { model = "openai/gpt-4o-mini" })
    resil.sleep(15.5 - (resil.now() - t0))
    s:close()
    resil.sleep(5)
    assert.are.equal(0, rows())
    settled()
  end)

  it("ends with an error event, no end marker, when every attempt fails after its status went", function()
    local url, m, key = start({ strict = true, latency = 8, faults = { { route = "chat", probability = 1, status = 500 } } })
    resil.clock.virtual()
    finally(function() resil.clock.real() end)
    local s = open(url, key, "openai", { model = "openai/gpt-4o-mini" })
    local text = {}
    while true do
      local chunk, err = s:read()
      assert.is_nil(err)
      if not chunk then break end
      text[#text + 1] = chunk
    end
    text = table.concat(text)
    assert.truthy(text:find(": keep-alive", 1, true), text)
    assert.truthy(text:find('"error"', 1, true), text)
    assert.is_nil(text:find("[DONE]", 1, true), text)
    assert.is_true(m:stats().total >= 2) -- (retried as before: the status sent changed none of that)
    settled()
  end)
end)
