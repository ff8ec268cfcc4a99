-- The strict mock against the wire the official SDKs (spec/sdk/node_modules)
-- write: it takes every body field their create params send, and its errors
-- are in the shape each API answers them.
local resil = require "resil"
local json = resil.json
local http = resil.http

local MSGS = { { role = "user", content = "hi" } }

local function openai(m, body, headers)
  local h = { authorization = "Bearer sk-test-1", ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return assert(http.request({ method = "POST", url = m.url .. "/v1/chat/completions", headers = h,
    body = json.encode(body) }))
end

local function anthropic(m, body, headers)
  local h = { ["x-api-key"] = "sk-ant-test-1", ["anthropic-version"] = "2023-06-01",
    ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return assert(http.request({ method = "POST", url = m.url .. "/v1/messages", headers = h, body = json.encode(body) }))
end

describe("the strict mock and the SDKs' request fields", function()
  local m
  before_each(function() m = assert(resil.mock.start({ strict = true })) end)
  after_each(function() m:stop() end)

  it("takes OpenAI's functions, function_call and prompt_cache_retention, still refuses an unknown field", function()
    for field, value in pairs({ functions = { { name = "f", parameters = { type = "object" } } },
      function_call = "auto", prompt_cache_retention = "24h" }) do
      local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, [field] = value })
      assert.are.equal(200, res.status, field .. ": " .. res.body) -- (was: 400 Unrecognized request argument)
    end
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, bogus = 1 })
    assert.are.equal(400, res.status)
    assert.matches("Unrecognized request argument supplied: bogus", json.decode(res.body).error.message)
  end)

  it("takes Anthropic's output_config, cache_control, inference_geo, speed and diagnostics", function()
    local fields = { output_config = { effort = "low" }, cache_control = { type = "ephemeral" },
      inference_geo = "us", speed = "standard", diagnostics = { previous_message_id = "msg_1" } }
    for field, value in pairs(fields) do
      local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS, [field] = value })
      assert.are.equal(200, res.status, field .. ": " .. res.body) -- (was: 400 Extra inputs are not permitted)
    end
  end)

  it("takes the beta's output_format only with an anthropic-beta header", function()
    local body = { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS,
      output_format = { type = "json_schema", schema = { type = "object" } } }
    local res = anthropic(m, body)
    assert.are.equal(400, res.status)
    assert.matches("output_format: Extra inputs are not permitted", json.decode(res.body).error.message)
    res = anthropic(m, body, { ["anthropic-beta"] = "structured-outputs-2025-11-13" })
    assert.are.equal(200, res.status, res.body)
  end)
end)

describe("the mock's errors in each API's shape", function()
  local m
  before_each(function() m = assert(resil.mock.start({})) end)
  after_each(function() m:stop() end)

  it("answers a path it does not serve in the shape of the client's API", function()
    -- an Anthropic client (its SDK sends anthropic-version): batches; an OpenAI one: files
    local res = assert(http.request({ method = "POST", url = m.url .. "/v1/messages/batches", body = "{}",
      headers = { ["anthropic-version"] = "2023-06-01" } }))
    assert.are.equal(404, res.status)
    local e = json.decode(res.body)
    assert.are.equal("error", e.type) -- (was OpenAI's shape, which Anthropic's SDK shows as raw JSON)
    assert.are.equal("not_found_error", e.error.type)
    res = assert(http.request({ url = m.url .. "/v1/files" }))
    assert.are.equal(404, res.status)
    e = json.decode(res.body)
    assert.are.equal("invalid_request_error", e.error.type)
    assert.are.equal("Invalid URL (GET /v1/files)", e.error.message)
  end)

  it("lists the scenario's models in each API's shape, and refuses a models that is no list of ids", function()
    m:configure({ models = { "my-model", "my-other" } })
    local res = assert(http.request({ url = m.url .. "/v1/models" }))
    local list = json.decode(res.body)
    assert.are.equal("list", list.object)
    assert.are.same({ "my-model", "my-other" }, { list.data[1].id, list.data[2].id })
    res = assert(http.request({ url = m.url .. "/v1/models?limit=1", headers = { ["x-api-key"] = "k",
      ["anthropic-version"] = "2023-06-01" } }))
    list = json.decode(res.body)
    assert.are.same({ "my-model", true, "my-model" }, { list.data[1].id, list.has_more, list.last_id })
    assert.are.equal("model", list.data[1].type)
    res = assert(http.request({ url = m.url .. "/v1/models/my-other" }))
    assert.are.equal(200, res.status)
    assert.are.equal(404, assert(http.request({ url = m.url .. "/v1/models/gpt-4o-mini" })).status)
    assert.has_error(function() m:configure({ models = { 42 } }) end,
      "resil.mock: models[1] must be a model id (a string), not 42")
    m:configure({})
  end)

  it("a 401 or 404 fault on OpenAI's route is an invalid_request_error, as the API types them", function()
    m:configure({ faults = { { route = "chat", model = "gpt-4o-2024-05-13", status = 404, error_code = "model_not_found" },
      { route = "chat", model = "gpt-4o-mini", status = 401, error_code = "invalid_api_key" } } })
    local res = openai(m, { model = "gpt-4o-2024-05-13", messages = MSGS })
    assert.are.equal(404, res.status)
    local e = json.decode(res.body).error
    assert.are.equal("invalid_request_error", e.type) -- (was not_found_error, a type OpenAI never sends)
    assert.are.equal("model_not_found", e.code)
    res = openai(m, { model = "gpt-4o-mini", messages = MSGS })
    assert.are.equal(401, res.status)
    assert.are.equal("invalid_request_error", json.decode(res.body).error.type) -- (was authentication_error)
  end)
end)

describe("the mock's answers under a schema", function()
  it("are the schema's required properties, a recursive schema's bounded", function()
    local m = assert(resil.mock.start({ strict = true, reply = "Ada" }))
    local node = { type = "object", properties = { name = { type = "string" }, note = { type = "string" },
      left = { ["$ref"] = "#" }, right = { ["$ref"] = "#" } } }
    local function ask(schema)
      local res = openai(m, { model = "gpt-4o-mini", messages = MSGS,
        response_format = { type = "json_schema", json_schema = { name = "s", schema = schema } } })
      assert.are.equal(200, res.status, res.body)
      return res, json.decode(json.decode(res.body).choices[1].message.content)
    end
    local _, v = ask({ type = "object", properties = { name = { type = "string" }, note = { type = "string" } },
      required = { "name" } })
    assert.are.equal("Ada", v.name)
    assert.is_nil(v.note) -- (optional: left out, as a model may)
    local res = ask(node) -- (a tree with two $ref children: each level doubled what it made)
    assert.is_true(#res.body < 200000, #res.body)
    -- (a minItems no answer holds: the list was made whole, 2 GB and 40 s of the mock's loop for 20,000,000)
    local list
    res, list = ask({ type = "object", properties = { a = { type = "array", minItems = 2000000, items = { type = "string" } } },
      required = { "a" } })
    assert.is_true(#res.body < 200000, #res.body)
    assert.are.equal("Ada", list.a[1])
    m:stop()
  end)
end)

describe("the strict mock's stream_options", function()
  it("are refused on a request that does not stream, as OpenAI refuses them", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, stream_options = { include_usage = true } })
    assert.are.equal(400, res.status, res.body) -- (was: 200, where the API answers this)
    local e = json.decode(res.body).error
    assert.are.same({ "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "invalid_request_error",
      "stream_options" }, { e.message, e.type, e.param })
    res = openai(m, { model = "gpt-4o-mini", messages = MSGS, stream = true, stream_options = { include_usage = true } })
    assert.are.equal(200, res.status, res.body)
    m:stop()
  end)
end)

describe("the mock's Anthropic stop sequences", function()
  it("an empty or whitespace-only one is refused, as the API refuses it", function()
    local m = assert(resil.mock.start({ strict = true }))
    for seq, why in pairs({ ["\n"] = "must contain non-whitespace", [""] = "must be non-empty" }) do
      local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS, stop_sequences = { "END", seq } })
      assert.are.equal(400, res.status)
      assert.matches(why, json.decode(res.body).error.message, 1, true)
    end
    m:stop()
  end)
end)

describe("the mock's Anthropic conversations", function()
  it("refuse empty content but in the last message, a string's as a list's", function()
    local m = assert(resil.mock.start({ strict = true }))
    for _, empty in ipairs({ "", setmetatable({}, json.array_mt) }) do
      local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = { MSGS[1],
        { role = "assistant", content = empty }, { role = "user", content = "and?" } } })
      assert.are.equal(400, res.status)
      assert.matches("must have non-empty content", json.decode(res.body).error.message, 1, true)
    end
    local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = { MSGS[1],
      { role = "assistant", content = "" } } })
    assert.are.equal(200, res.status, res.body) -- (the final assistant message may be empty)
    m:stop()
  end)

  it("refuse a final assistant message that ends in whitespace, a string's as a text block's", function()
    local m = assert(resil.mock.start({ strict = true }))
    for _, prefill in ipairs({ "The answer is ", { { type = "text", text = "The answer is\n" } } }) do
      local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = { MSGS[1],
        { role = "assistant", content = prefill } } })
      assert.are.equal(400, res.status, res.body) -- (was: 200)
      assert.are.equal("messages: final assistant content cannot end with trailing whitespace",
        json.decode(res.body).error.message)
    end
    local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = { MSGS[1],
      { role = "assistant", content = "The answer is " }, { role = "user", content = "go on" } } })
    assert.are.equal(200, res.status, res.body) -- (an earlier one may)
    m:stop()
  end)

  it("refuse a tool_use id outside the API's pattern (another provider's, with dots or colons)", function()
    local m = assert(resil.mock.start({ strict = true }))
    local function thread(id)
      return { MSGS[1], { role = "assistant", content = { { type = "tool_use", id = id, name = "a", input = {} } } },
        { role = "user", content = { { type = "tool_result", tool_use_id = id, content = "ok" } } } }
    end
    local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = thread("functions.a:0") })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    assert.are.equal("messages.1.content.0.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'",
      json.decode(res.body).error.message)
    res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = thread("toolu_01A-b_9"),
      tools = { { name = "a", input_schema = { type = "object" } } } })
    assert.are.equal(200, res.status, res.body)
    m:stop()
  end)

  -- (as the API: an OpenAI client's last turn that sums up, its tools left out, passed here and
  -- was a 400 from Anthropic)
  it("refuse a conversation with tool calls and results sent without tools", function()
    local m = assert(resil.mock.start({ strict = true }))
    local thread = { MSGS[1], { role = "assistant", content = { { type = "tool_use", id = "toolu_1", name = "a",
      input = {} } } }, { role = "user", content = { { type = "tool_result", tool_use_id = "toolu_1", content = "ok" } } } }
    local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = thread })
    assert.are.equal(400, res.status, res.body)
    assert.are.equal("Requests which include tool_use or tool_result blocks must define tools.",
      json.decode(res.body).error.message)
    res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = thread,
      tools = { { name = "a", input_schema = { type = "object" } } }, tool_choice = { type = "none" } })
    assert.are.equal(200, res.status, res.body)
    m:stop()
  end)

  it("refuse a final user message that is empty: only an assistant's may be", function()
    local m = assert(resil.mock.start({ strict = true }))
    for _, empty in ipairs({ "", setmetatable({}, json.array_mt) }) do
      for _, messages in ipairs({ { { role = "user", content = empty } },
        { MSGS[1], { role = "assistant", content = "ok" }, { role = "user", content = empty } } }) do
        local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = messages })
        assert.are.equal(400, res.status, res.body) -- (was: 200, an answer to nothing)
        assert.are.equal(("messages.%d: all messages must have non-empty content except for the optional final "
          .. "assistant message"):format(#messages - 1), json.decode(res.body).error.message)
      end
    end
    m:stop()
  end)
end)

describe("the strict mock's sampling ranges", function()
  it("are each API's: a temperature past 2 for OpenAI, past 1 for Anthropic, is the API's 400", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, temperature = 2.5 })
    assert.are.equal(400, res.status)
    local e = json.decode(res.body).error
    assert.are.equal("temperature", e.param)
    assert.are.equal("decimal_above_max_value", e.code)
    assert.are.equal(200, openai(m, { model = "gpt-4o-mini", messages = MSGS, temperature = 1.5 }).status)
    res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS, temperature = 1.5 })
    assert.are.equal(400, res.status)
    assert.are.equal("temperature: Input should be less than or equal to 1", json.decode(res.body).error.message)
    m:stop()
  end)
end)

describe("the mock's Anthropic errors, typed as the API types them", function()
  it("a 504 is a timeout_error", function()
    local m = assert(resil.mock.start({ faults = { { route = "messages", status = 504 } } }))
    local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS })
    assert.are.equal(504, res.status)
    assert.are.equal("timeout_error", json.decode(res.body).error.type) -- (was api_error)
    m:stop()
  end)
end)

describe("the mock's Anthropic message, as the SDK's types have it", function()
  it("says stop_details, container and diagnostics are null, not absent, whole and streamed", function()
    local m = assert(resil.mock.start({ strict = true }))
    local body = { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS }
    local msg = json.decode(anthropic(m, body).body)
    -- (absent, `message.stop_details !== null` read every answer as a refusal)
    for _, field in ipairs({ "stop_details", "container", "diagnostics" }) do
      assert.are.equal(json.null, msg[field], field)
    end
    assert.are.equal(0, msg.usage.cache_creation.ephemeral_5m_input_tokens)
    body.stream = true
    local events = {}
    for event, data in anthropic(m, body).body:gmatch("event: (%S+)\ndata: ([^\n]+)") do
      events[event] = json.decode(data)
    end
    assert.are.equal(json.null, events.message_start.message.stop_details)
    assert.are.equal(json.null, events.message_start.message.container)
    assert.are.equal(json.null, events.message_delta.delta.stop_details)
    m:stop()
  end)
end)

describe("the mock's rate_limits", function()
  before_each(function() resil.clock.virtual() end)

  local function chat(m)
    return assert(http.request({ method = "POST", url = m.url .. "/v1/chat/completions",
      json = { model = "gpt-4o-mini", messages = MSGS } }))
  end

  it("are enforced: past the minute's requests a 429 as OpenAI and Anthropic answer it, unbilled", function()
    local m = assert(resil.mock.start({ rate_limits = { requests = 2 } }))
    assert.are.equal(200, chat(m).status)
    assert.are.equal("0", chat(m).headers["x-ratelimit-remaining-requests"])
    local res = chat(m)
    assert.are.equal(429, res.status) -- (was: 200, its headers saying 0 left)
    local e = json.decode(res.body).error
    assert.are.equal("requests", e.type)
    assert.are.equal("rate_limit_exceeded", e.code)
    assert.are.equal("0", res.headers["x-ratelimit-remaining-requests"])
    res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS })
    assert.are.equal(429, res.status)
    assert.are.equal("rate_limit_error", json.decode(res.body).error.type)
    assert.is_true(tonumber(res.headers["retry-after"]) >= 1)
    assert.are.equal(2, m:stats().billed.responses)
    -- the next minute serves again
    resil.sleep(60)
    assert.are.equal(200, chat(m).status)
    m:stop()
  end)

  it("of tokens too", function()
    local m = assert(resil.mock.start({ rate_limits = { tokens = 5 } }))
    assert.are.equal(200, chat(m).status) -- (its answer spends the minute's 5 tokens and more)
    local res = chat(m)
    assert.are.equal(429, res.status)
    assert.are.equal("tokens", json.decode(res.body).error.type)
    m:stop()
  end)

  it("without rate_limits, nothing is refused", function()
    local m = assert(resil.mock.start({}))
    for _ = 1, 20 do assert.are.equal(200, chat(m).status) end
    m:stop()
  end)
end)

describe("the strict mock's Anthropic sampling", function()
  it("refuses temperature and top_p together on the models the API refuses them on (Opus 4.1, the 4.5s, later)", function()
    local m = assert(resil.mock.start({ strict = true }))
    for _, model in ipairs({ "claude-sonnet-4-5-20250929", "claude-haiku-4-5", "claude-opus-4-1-20250805", "claude-opus-4-6" }) do
      local res = anthropic(m, { model = model, max_tokens = 20, messages = MSGS, temperature = 0.5, top_p = 0.9 })
      assert.are.equal(400, res.status, model)
      local e = json.decode(res.body).error
      assert.are.equal("invalid_request_error", e.type)
      assert.matches("`temperature` and `top_p` cannot both be specified for this model", e.message, 1, true)
      assert.are.equal(200, anthropic(m, { model = model, max_tokens = 20, messages = MSGS, top_p = 0.9 }).status)
    end
    for _, model in ipairs({ "claude-sonnet-4-20250514", "claude-3-5-haiku-20241022" }) do
      local res = anthropic(m, { model = model, max_tokens = 20, messages = MSGS, temperature = 0.5, top_p = 0.9 })
      assert.are.equal(200, res.status, model .. ": " .. res.body)
    end
    m:stop()
  end)
end)

describe("the strict mock's OpenAI metadata", function()
  it("takes metadata with store only, as the API does", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, metadata = { run = "r1" } })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    assert.are.equal("The 'metadata' parameter is only allowed when 'store' is enabled.", json.decode(res.body).error.message)
    assert.are.equal(200, openai(m, { model = "gpt-4o-mini", messages = MSGS, metadata = { run = "r1" }, store = true }).status)
    m:stop()
  end)
end)

describe("the strict mock's parallel_tool_calls", function()
  it("takes parallel_tool_calls with tools only, as the API does; the adapter sends it so", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, parallel_tool_calls = false })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    assert.matches("'parallel_tool_calls' is only allowed when 'tools' are specified", json.decode(res.body).error.message,
      1, true)
    local ai = require "policies.ai"
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-1" })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, parallel_tool_calls = false }))
    assert.is_true(#r.text > 0)
    m:stop()
  end)
end)

describe("the mock's output limits", function()
  it("refuse a max_tokens past a known model's output, as each API refuses it; an unknown model takes any", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini-2024-07-18", messages = MSGS, max_tokens = 32000 })
    assert.are.equal(400, res.status, res.body) -- (was: 200; an Anthropic client's max_tokens, falling back here)
    local e = json.decode(res.body).error
    assert.are.same({ "max_tokens is too large: 32000. This model supports at most 16384 completion tokens, whereas "
      .. "you provided 32000.", "max_tokens", "invalid_value" }, { e.message, e.param, e.code })
    res = openai(m, { model = "gpt-4.1-mini", messages = MSGS, max_completion_tokens = 40000 })
    assert.are.equal(400, res.status, res.body)
    assert.are.equal("max_completion_tokens", json.decode(res.body).error.param)
    for model, n in pairs({ ["gpt-4o-mini"] = 16384, ["gpt-4.1-nano"] = 32768, ["o3"] = 100000, ["gpt-9"] = 500000 }) do
      local field = model:find("^o") and "max_completion_tokens" or "max_tokens"
      res = openai(m, { model = model, messages = MSGS, [field] = n })
      assert.are.equal(200, res.status, model .. ": " .. res.body)
    end
    res = anthropic(m, { model = "claude-opus-4-1-20250805", max_tokens = 64000, messages = MSGS })
    assert.are.equal(400, res.status, res.body) -- (was: 200; an OpenAI client's max_tokens, falling back here)
    assert.are.equal("max_tokens: 64000 > 32000, which is the maximum allowed number of output tokens for "
      .. "claude-opus-4-1-20250805", json.decode(res.body).error.message)
    for model, n in pairs({ ["claude-sonnet-4-5"] = 64000, ["claude-haiku-4-5-20251001"] = 64000,
      ["claude-sonnet-5-5"] = 200000 }) do
      res = anthropic(m, { model = model, max_tokens = n, messages = MSGS })
      assert.are.equal(200, res.status, model .. ": " .. res.body)
    end
    m:stop()
  end)
end)

describe("the strict mock's json_object", function()
  it("is refused when no message says json, as OpenAI refuses it; answered when one does", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, response_format = { type = "json_object" } })
    assert.are.equal(400, res.status, res.body) -- (was: 200, where the API answers this)
    local e = json.decode(res.body).error
    assert.are.same({ "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
      .. "'json_object'.", "messages" }, { e.message, e.param })
    for _, messages in ipairs({ { { role = "system", content = "Answer in JSON." }, MSGS[1] },
      { { role = "user", content = { { type = "text", text = "hi, as json" } } } } }) do
      res = openai(m, { model = "gpt-4o-mini", messages = messages, response_format = { type = "json_object" } })
      assert.are.equal(200, res.status, res.body)
      assert.is_table(json.decode(json.decode(res.body).choices[1].message.content))
    end
    m:stop()
  end)
end)

describe("the mock's forced tool call with n > 1", function()
  -- every choice's call had one id: an app that sends each choice's tool results back keyed by
  -- id (as the API's ids allow) could not tell them apart
  it("gives each choice's call an id of its own, in one answer and in a stream", function()
    local m = assert(resil.mock.start({}))
    local body = { model = "gpt-4o-mini", messages = MSGS, n = 3, tool_choice = "required",
      tools = { { type = "function", ["function"] = { name = "lookup",
        parameters = { type = "object", properties = { q = { type = "string" } } } } } } }
    local res = openai(m, body)
    assert.are.equal(200, res.status, res.body)
    local ids = {}
    for _, c in ipairs(json.decode(res.body).choices) do ids[#ids + 1] = c.message.tool_calls[1].id end
    body.stream = true
    local streamed = {}
    for line in openai(m, body).body:gmatch("data: ([^\n]+)") do
      local ev = line ~= "[DONE]" and json.decode(line)
      local d = ev and ev.choices[1] and ev.choices[1].delta
      if d and d.tool_calls and d.tool_calls[1].id then streamed[ev.choices[1].index + 1] = d.tool_calls[1].id end
    end
    m:stop()
    for _, list in ipairs({ ids, streamed }) do
      assert.are.equal(3, #list)
      assert.are_not.equal(list[1], list[2], json.encode(list))
      assert.are_not.equal(list[2], list[3], json.encode(list))
      assert.are_not.equal(list[1], list[3], json.encode(list))
    end
  end)
end)

describe("the strict mock's tool_choice", function()
  it("takes tool_choice with tools only, as the API does; the adapter sends it so", function()
    local m = assert(resil.mock.start({ strict = true }))
    local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, tool_choice = "auto" })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    local e = json.decode(res.body).error
    assert.are.same({ "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
      "tool_choice" }, { e.message, e.param })
    -- a request with no tools and a tool_choice (an Anthropic client's { type = "auto" }, say, falling
    -- back to OpenAI) was that 400 from the API, a fallback that could never serve
    local ai = require "policies.ai"
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-1" })
    for _, choice in ipairs({ "auto", "none", { type = "auto" } }) do
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, tool_choice = choice }))
      assert.is_true(#r.text > 0)
    end
    m:stop()
  end)
end)

describe("the strict mock's tool_choice shapes", function()
  it("refuses Anthropic's on the OpenAI route; the adapter sends Anthropic's shape as OpenAI's", function()
    local m = assert(resil.mock.start({ strict = true }))
    local tools = { { type = "function", ["function"] = { name = "a", parameters = { type = "object" } } } }
    for _, choice in ipairs({ { type = "any" }, { type = "tool", name = "a" }, "any" }) do
      local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, tools = tools, tool_choice = choice })
      assert.are.equal(400, res.status, res.body) -- (was: 200)
      assert.matches("^Invalid value: '%w+'%. Supported values are: ", json.decode(res.body).error.message)
    end
    for _, choice in ipairs({ "none", "auto", "required", { type = "function", ["function"] = { name = "a" } },
      { type = "allowed_tools", allowed_tools = { mode = "auto", tools = { { type = "function", ["function"] = { name = "a" } } } } } }) do
      local res = openai(m, { model = "gpt-4o-mini", messages = MSGS, tools = tools, tool_choice = choice })
      assert.are.equal(200, res.status, res.body)
    end
    -- README: tools and tool_choice in either API's shape, translated (a call with Anthropic's
    -- { type = "any" }, or falling back to OpenAI with it, was the API's 400)
    local ai = require "policies.ai"
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-1" })
    local atools = { { name = "a", input_schema = { type = "object", properties = {} } } }
    for _, choice in ipairs({ { type = "any" }, { type = "tool", name = "a" } }) do
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, tools = atools, tool_choice = choice }))
      assert.are.equal("a", r.tool_calls[1].name) -- (forced: the call the choice asks for)
    end
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, tools = atools, tool_choice = { type = "auto" } }))
    assert.is_nil(r.tool_calls)
    m:stop()
  end)
end)

describe("the strict mock's Anthropic text blocks", function()
  it("refuses an empty text block in a message, as the API does", function()
    local m = assert(resil.mock.start({ strict = true }))
    local thread = { MSGS[1], { role = "assistant", content = { { type = "text", text = "" } } },
      { role = "user", content = "go on" } }
    local res = anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = thread })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    assert.are.equal("messages: text content blocks must be non-empty", json.decode(res.body).error.message)
    thread[2].content[1].text = "ok"
    assert.are.equal(200, anthropic(m, { model = "claude-haiku-4-5", max_tokens = 20, messages = thread }).status)
    m:stop()
  end)
end)

describe("the strict mock's extended thinking", function()
  it("refuses a temperature other than 1 with thinking enabled, as the API does", function()
    local m = assert(resil.mock.start({ strict = true }))
    local thinking = { type = "enabled", budget_tokens = 1024 }
    local res = anthropic(m, { model = "claude-sonnet-4-5", max_tokens = 2000, messages = MSGS, thinking = thinking,
      temperature = 0.7 })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    local e = json.decode(res.body).error
    assert.are.equal("invalid_request_error", e.type)
    assert.matches("`temperature` may only be set to 1 when thinking is enabled", e.message, 1, true)
    assert.are.equal(200, anthropic(m, { model = "claude-sonnet-4-5", max_tokens = 2000, messages = MSGS,
      thinking = thinking, temperature = 1 }).status)
    assert.are.equal(200, anthropic(m, { model = "claude-sonnet-4-5", max_tokens = 2000, messages = MSGS,
      temperature = 0.7 }).status)
    m:stop()
  end)

  -- (a tool loop whose last call another API's model made, without thinking: the mock served it,
  -- the API refuses it, and every next turn of such a loop failed in production only)
  it("refuses a tool loop whose last assistant turn does not start with its thinking, as the API does", function()
    local m = assert(resil.mock.start({ strict = true }))
    local thinking = { type = "enabled", budget_tokens = 1024 }
    local tools = { { name = "get_weather", input_schema = { type = "object" } } }
    local function loop(assistant, last)
      return { { role = "user", content = "Weather in Paris?" }, { role = "assistant", content = assistant },
        last or { role = "user", content = { { type = "tool_result", tool_use_id = "toolu_1", content = "18C" } } } }
    end
    local use = { type = "tool_use", id = "toolu_1", name = "get_weather", input = { city = "Paris" } }
    local res = anthropic(m, { model = "claude-sonnet-4-5", max_tokens = 2000, thinking = thinking, tools = tools,
      messages = loop({ { type = "text", text = "Checking." }, use }) })
    assert.are.equal(400, res.status, res.body) -- (was: 200)
    assert.matches("messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `text`",
      json.decode(res.body).error.message, 1, true)
    for _, served in ipairs({
      { thinking = thinking, messages = loop({ { type = "thinking", thinking = "Hm.", signature = "sig" }, use }) },
      { thinking = thinking, messages = loop({ { type = "redacted_thinking", data = "x" }, use }) },
      { messages = loop({ use }) }, -- (thinking off: no thinking is due)
      -- (the loop over: a new question after its results)
      { thinking = thinking, messages = { loop({ use })[1], loop({ use })[2], loop({ use })[3],
        { role = "assistant", content = "18C in Paris." }, { role = "user", content = "And Rome?" } } },
    }) do
      served.model, served.max_tokens, served.tools = "claude-sonnet-4-5", 2000, tools
      res = anthropic(m, served)
      assert.are.equal(200, res.status, res.body)
    end
    m:stop()
  end)
end)

describe("the mock's Anthropic errors", function()
  -- (the API's error body names its request id; the SDK types ErrorResponse.request_id as never absent)
  it("name their request id in their body, as their request-id header does", function()
    local m = assert(resil.mock.start({ strict = true, faults = { { route = "messages", model = "claude-busy", status = 529 } } }))
    for _, case in ipairs({
      { 529, { model = "claude-busy", max_tokens = 20, messages = MSGS } },
      { 400, { model = "claude-haiku-4-5", messages = MSGS } },
      { 401, { model = "claude-haiku-4-5", max_tokens = 20, messages = MSGS }, { ["x-api-key"] = "" } },
    }) do
      local res = anthropic(m, case[2], case[3])
      assert.are.equal(case[1], res.status, res.body)
      local body = json.decode(res.body)
      assert.are.equal("error", body.type)
      assert.is_string(res.headers["request-id"])
      assert.are.equal(res.headers["request-id"], body.request_id, res.body)
    end
    m:stop()
  end)
end)

describe("the mock's Anthropic count_tokens", function()
  it("counts a prompt as a message's usage counts it, takes no answer's field, bills nothing", function()
    local m = assert(resil.mock.start({ strict = true }))
    local function count(body, headers)
      local h = { ["x-api-key"] = "sk-ant-test-1", ["anthropic-version"] = "2023-06-01", ["content-type"] = "application/json" }
      for k, v in pairs(headers or {}) do h[k] = v end
      return assert(http.request({ method = "POST", url = m.url .. "/v1/messages/count_tokens", headers = h,
        body = json.encode(body) }))
    end
    local prompt = { model = "claude-haiku-4-5", system = "Be brief.", messages = { { role = "user", content = "Name a city" } } }
    local res = count(prompt)
    assert.are.equal(200, res.status, res.body) -- (was: 404)
    local n = json.decode(res.body).input_tokens
    prompt.max_tokens = 20
    assert.are.equal(n, json.decode(anthropic(m, prompt).body).usage.input_tokens)
    res = count(prompt)
    assert.are.equal(400, res.status)
    assert.are.equal("max_tokens: Extra inputs are not permitted", json.decode(res.body).error.message)
    prompt.max_tokens = nil
    assert.are.equal(401, count(prompt, { ["x-api-key"] = "" }).status)
    prompt.messages = nil
    assert.are.equal("messages: Field required", json.decode(count(prompt).body).error.message)
    assert.are.equal(1, m:stats().routes.messages)
    m:stop()
  end)

  -- (the SDK's countTokens takes thinking, as the API does: the mock compared its budget with
  -- the max_tokens a count has none of, and answered 500 "handler error")
  it("counts a prompt with extended thinking, and refuses its budget as the API does", function()
    local m = assert(resil.mock.start({ strict = true }))
    local h = { ["x-api-key"] = "sk-ant-test-1", ["anthropic-version"] = "2023-06-01", ["content-type"] = "application/json" }
    local function count(budget)
      return assert(http.request({ method = "POST", url = m.url .. "/v1/messages/count_tokens", headers = h,
        body = json.encode({ model = "claude-sonnet-4-5", messages = MSGS,
          thinking = { type = "enabled", budget_tokens = budget } }) }))
    end
    local res = count(1024)
    assert.are.equal(200, res.status, res.body)
    assert.is_true(json.decode(res.body).input_tokens > 0)
    res = count(1000)
    assert.are.equal(400, res.status, res.body)
    assert.matches("budget_tokens: Input should be greater than or equal to 1024", json.decode(res.body).error.message)
    m:stop()
  end)
end)
