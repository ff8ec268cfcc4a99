-- The gateway between the two wire formats (policies/gateway.lua, policies/messages.lua, the
-- adapters): what one API's client asks reaches the other API's provider as that API says it,
-- and what has no counterpart there is the client's 400, never an answer silently without it.
-- Real HTTP against the mock provider's routes, which keep what they were sent.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local MSGS = { { role = "user", content = "hi" } }
local OPENAI_ANSWER = { id = "chatcmpl-up", object = "chat.completion", created = 1, model = "gpt-4o-mini",
  choices = { { index = 0, message = { role = "assistant", content = "ok", refusal = json.null },
    finish_reason = "stop", logprobs = json.null } },
  usage = { prompt_tokens = 5, completion_tokens = 1, total_tokens = 6 } }
local ANTHROPIC_ANSWER = { id = "msg_up", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
  content = { { type = "text", text = "ok" } }, stop_reason = "end_turn", stop_sequence = json.null,
  usage = { input_tokens = 5, output_tokens = 1 } }

-- a gateway in front of an upstream that keeps each body it is sent (sent.openai, sent.anthropic:
-- the last one) -> its URL, sent
local function start(models)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local sent = {}
  local function answer(kind, body)
    return function(req)
      sent[kind] = json.decode(req.body)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode(body) }
    end
  end
  local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = answer("openai", OPENAI_ANSWER),
    ["POST /v1/messages"] = answer("anthropic", ANTHROPIC_ANSWER) } }))
  local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = models or {} }, finally)
  return url, sent
end

local function post(url, body)
  return assert(http.request({ method = "POST", url = url, headers = { ["content-type"] = "application/json" },
    body = type(body) == "string" and body or json.encode(body) }))
end

describe("gateway: an OpenAI client's output limit", function()
  -- (a client that sets one of the two fields and sends the other as null: read as no limit at
  -- all, the provider wrote, and billed, up to the model's own limit)
  it("max_completion_tokens null beside max_tokens is the max_tokens, whichever API serves it", function()
    local url, sent = start()
    local body = '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":null,"max_tokens":100}'
    local res = post(url .. "/v1/chat/completions", body:format("openai/gpt-4o-mini"))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(100, sent.openai.max_completion_tokens or sent.openai.max_tokens)
    res = post(url .. "/v1/chat/completions", body:format("anthropic/claude-sonnet-4-5-20250929"))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(100, sent.anthropic.max_tokens)
  end)

  it("max_completion_tokens null and max_tokens not a positive integer is a 400", function()
    local url = start()
    local res = post(url .. "/v1/chat/completions", '{"model":"openai/gpt-4o-mini","messages":[{"role":"user",'
      .. '"content":"hi"}],"max_completion_tokens":null,"max_tokens":"lots"}')
    assert.are.equal(400, res.status, res.body)
    assert.matches("max_tokens", json.decode(res.body).error.message)
  end)
end)

describe("gateway: what the other API cannot say is a 400 in the client's shape", function()
  local ROUTES = { claude = { model = "anthropic/claude-sonnet-4-5-20250929", fallback = { "openai/gpt-4o-mini" } },
    fast = { model = "openai/gpt-4o-mini", fallback = { "anthropic/claude-sonnet-4-5-20250929" } } }
  local TOOLS_FN = { { name = "now", parameters = { type = "object", properties = {} } } }

  -- (each was sent to Anthropic without the field, and answered 200 as if it were all there
  -- was: logprobs null to code that reads them, prose where audio or a function_call was asked)
  it("an OpenAI client's logprobs, logit_bias, audio, functions and web search, served by Anthropic", function()
    local url, sent = start(ROUTES)
    for field, value in pairs({ logprobs = true, top_logprobs = 2, logit_bias = { ["1734"] = -100 },
      modalities = { "text", "audio" },
      functions = TOOLS_FN, web_search_options = { search_context_size = "low" } }) do
      for _, model in ipairs({ "anthropic/claude-sonnet-4-5-20250929", "claude" }) do
        sent.anthropic = nil
        local res = post(url .. "/v1/chat/completions", { model = model, messages = MSGS, [field] = value })
        assert.are.equal(400, res.status, field .. " " .. model .. ": " .. res.body)
        local e = json.decode(res.body).error
        assert.are.same({ "invalid_request_error", "unsupported_parameter", field },
          { e.type, e.code, e.param }, res.body)
        assert.matches("anthropic/claude%-sonnet%-4%-5", e.message)
        assert.is_nil(sent.anthropic, field .. ": no call")
      end
      -- a provider of the client's own API first: served, the field sent
      local res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS, [field] = value })
      assert.are.equal(200, res.status, res.body)
      assert.is_not_nil(sent.openai[field], field)
    end
  end)

  it("an OpenAI client's logprobs false, an empty logit_bias and text modalities are served by Anthropic", function()
    local url, sent = start()
    local res = post(url .. "/v1/chat/completions", { model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS,
      logprobs = false, logit_bias = {}, modalities = { "text" } })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("hi", sent.anthropic.messages[1].content)
  end)

  -- (OpenAI's API answers a last assistant message with a turn of its own: the client, which
  -- puts its prefill before the answer, read '{' .. '{"city": ...}', JSON no more)
  it("an Anthropic client's prefill or MCP servers served by OpenAI, in Anthropic's error shape", function()
    local url, sent = start(ROUTES)
    for _, content in ipairs({ "{", { { type = "text", text = "The answer is" } } }) do
      for _, model in ipairs({ "openai/gpt-4o-mini", "fast" }) do
        local res = post(url .. "/v1/messages", { model = model, max_tokens = 50,
          messages = { MSGS[1], { role = "assistant", content = content } } })
        assert.are.equal(400, res.status, res.body)
        local b = json.decode(res.body)
        assert.are.equal("invalid_request_error", b.error.type)
        assert.matches("prefill", b.error.message)
        assert.is_nil(sent.openai)
      end
    end
    -- (the MCP connector's servers, whose tools the answer would have used)
    local mcp = { { type = "url", url = "https://mcp.example.com/sse", name = "example" } }
    for _, model in ipairs({ "openai/gpt-4o-mini", "fast" }) do
      local res = post(url .. "/v1/messages", { model = model, max_tokens = 50, messages = MSGS, mcp_servers = mcp })
      assert.are.equal(400, res.status, res.body)
      assert.matches("mcp_servers: not served by openai/gpt%-4o%-mini", json.decode(res.body).error.message)
    end
    local res = post(url .. "/v1/messages", { model = "claude", max_tokens = 50,
      messages = { MSGS[1], { role = "assistant", content = "{" } } })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("{", sent.anthropic.messages[2].content)
    -- (a last assistant message of whitespace says nothing to continue)
    res = post(url .. "/v1/messages", { model = "openai/gpt-4o-mini", max_tokens = 50,
      messages = { MSGS[1], { role = "assistant", content = " " } } })
    assert.are.equal(200, res.status, res.body)
  end)
end)

describe("gateway: a conversation with tool calls, sent without tools", function()
  -- (OpenAI takes it, and agents send it so: a last turn that sums up what the tools said, its
  -- tools left out so that none is called. Anthropic's API refuses it, "Requests which include
  -- tool_use or tool_result blocks must define tools": a 400 for every such turn it served)
  it("an OpenAI client's is served by Anthropic, no tool to be called", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, reply = "It is sunny in Paris and Rome." }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
    local conversation = { { role = "user", content = "Weather in Paris and Rome?" },
      { role = "assistant", content = json.null, tool_calls = {
        { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } },
        { id = "call_2", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Rome"}' } } } },
      { role = "tool", tool_call_id = "call_1", content = "sunny" },
      { role = "tool", tool_call_id = "call_2", content = "sunny" },
      { role = "user", content = "Sum it up." } }
    for _, stream in ipairs({ false, true }) do
      local res = post(url .. "/v1/chat/completions", { model = "anthropic/claude-sonnet-4-5-20250929",
        messages = conversation, stream = stream })
      assert.are.equal(200, res.status, res.body)
      assert.matches(stream and "data: %[DONE%]" or "sunny in Paris", res.body)
    end
    -- the tools its calls named, once each, none to be called (as none could be without tools)
    local body = require("policies.providers.anthropic").body({ messages = conversation }, "claude-sonnet-4-5", {})
    assert.are.same({ { name = "get_weather", input_schema = { type = "object" } } }, body.tools)
    assert.are.same({ type = "none" }, body.tool_choice)
  end)
end)

describe("gateway: an Anthropic client's structured output served by OpenAI", function()
  -- (output_config.format was translated; the beta's output_format, which older SDKs send with
  -- the structured-outputs beta header, was left out, and the answer was prose)
  it("output_config.format or the beta's output_format is OpenAI's response_format", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, reply = "Paris" }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
    local format = { type = "json_schema", schema = { type = "object", properties = { city = { type = "string" } },
      required = { "city" }, additionalProperties = false } }
    for _, field in ipairs({ "output_config", "output_format" }) do
      local res = post(url .. "/v1/messages", { model = "openai/gpt-4o-mini", max_tokens = 50, messages = MSGS,
        [field] = field == "output_config" and { format = format } or format })
      assert.are.equal(200, res.status, res.body)
      local answer = json.decode(json.decode(res.body).content[1].text)
      assert.are.equal("Paris", type(answer) == "table" and answer.city, field .. ": " .. res.body)
      -- to Anthropic, as the client wrote it: one of the two, never both (the API takes one)
      local body = require("policies.providers.anthropic").body({ messages = MSGS, client_api = "anthropic",
        response_format = { type = "json_schema", json_schema = { name = "output", schema = format.schema } },
        provider_options = { anthropic = { [field] = field == "output_config" and { format = format } or format } } },
        "claude-sonnet-4-5", {})
      assert.are.same({ field == "output_config", field == "output_format" },
        { body.output_config ~= nil, body.output_format ~= nil })
    end
  end)
end)

describe("gateway: an OpenAI client's whitespace stop sequence, served by Anthropic", function()
  local streams = require "spec.provider_streams"
  -- an Anthropic upstream answering a first line, a blank line and more, its stream's deltas cut
  -- inside the "\n\n" -> scenario, the bodies it was sent
  local function upstream()
    local sent = {}
    local text = "Yes\n\nBecause the tide is high."
    return { routes = { ["POST /v1/messages"] = function(req)
      local b = json.decode(req.body)
      sent[#sent + 1] = b
      if not b.stream then
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({ id = "msg_1",
          type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929", content = { { type = "text",
          text = text } }, stop_reason = "end_turn", stop_sequence = json.null, usage = { input_tokens = 5,
          output_tokens = 9 } }) }
      end
      -- (its deltas "Yes", "\n", "\nBecause ...": the stop is seen across two of them)
      local deltas = {}
      for _, piece in ipairs({ "Yes", "\n", "\nBecause the tide is high." }) do
        deltas[#deltas + 1] = "event: content_block_delta\ndata: " .. json.encode({ type = "content_block_delta",
          index = 0, delta = { type = "text_delta", text = piece } }) .. "\n\n"
      end
      local body = streams.anthropic({ content = "PIECES" })
      local at, stop = body:find("event: content_block_delta\n[^\n]*PIECES[^\n]*\n\n")
      return streams.reply(body:sub(1, at - 1) .. table.concat(deltas) .. body:sub(stop + 1))
    end } }, sent
  end

  -- (the stop is left out of what Anthropic is sent, which refuses it: the answer went on past it,
  -- a paragraph where the client asked for a line)
  it("is where the answer ends, streamed or not, with tools or not", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local scenario, sent = upstream()
    local url = helpers.gateway_for_mock(assert(resil.mock.start(scenario)),
      { auth = false, key_cache = 0, models = {} }, finally)
    local tools = { { type = "function", ["function"] = { name = "now", parameters = { type = "object" } } } }
    for _, stop in ipairs({ "\n\n", { "END", "\n\n" } }) do
      local req = { model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS, stop = stop }
      local res = post(url .. "/v1/chat/completions", req)
      assert.are.equal(200, res.status, res.body)
      local choice = json.decode(res.body).choices[1]
      assert.are.same({ "Yes", "stop" }, { choice.message.content, choice.finish_reason })
      assert.are.same(type(stop) == "table" and { "END" } or nil, sent[#sent].stop_sequences)
      for _, with_tools in ipairs({ false, true }) do
        req.stream, req.stream_options, req.tools = true, { include_usage = true }, with_tools and tools or nil
        res = post(url .. "/v1/chat/completions", req)
        assert.are.equal(200, res.status, res.body)
        local text, finish, usage = {}, nil, nil
        for data in res.body:gmatch("data: ([^\n]+)") do
          local c = data ~= "[DONE]" and json.decode(data)
          local choice1 = c and c.choices[1]
          if choice1 and choice1.delta.content then text[#text + 1] = choice1.delta.content end
          if choice1 and choice1.finish_reason ~= json.null then finish = choice1.finish_reason end
          if c and c.usage then usage = c.usage end
        end
        assert.are.same({ "Yes", "stop" }, { table.concat(text), finish }, res.body)
        assert.is_true(usage.completion_tokens > 0, res.body)
        assert.matches("data: %[DONE%]\n\n$", res.body)
      end
    end
    -- each call in the ledger once, a stream closed at its stop as what it streamed
    assert.is_true(helpers.wait_until(function()
      local rows = resil.cost.breakdown("model")[1]
      return rows and rows.calls == 6
    end, 5))
  end)
end)

describe("gateway: an Anthropic client's stop sequences OpenAI was not sent", function()
  local streams = require "spec.provider_streams"
  local TEXT = "The answer is 4.</answer> And then some more."
  local function upstream()
    local sent = {}
    return { routes = { ["POST /v1/chat/completions"] = function(req)
      local b = json.decode(req.body)
      sent[#sent + 1] = b
      if b.stream then return streams.reply(streams.openai({ content = TEXT, model = b.model,
        usage = { prompt_tokens = 5, completion_tokens = 12 } })) end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-1", object = "chat.completion", created = 1, model = b.model, choices = { { index = 0,
          message = { role = "assistant", content = TEXT }, finish_reason = "stop" } },
        usage = { prompt_tokens = 5, completion_tokens = 12, total_tokens = 17 } }) }
    end } }, sent
  end

  -- (past OpenAI's four, or any for a reasoning model, an alias's target is not sent them: the
  -- answer went on past "</answer>", and said end_turn)
  it("end the answer where the first of them is, stop_reason stop_sequence, streamed or not", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local scenario, sent = upstream()
    local url = helpers.gateway_for_mock(assert(resil.mock.start(scenario)), { auth = false, key_cache = 0,
      models = { fast = "openai/gpt-4o-mini", smart = "openai/gpt-5" } }, finally)
    local tools = { { name = "now", input_schema = { type = "object" } } }
    for model, stop_sequences in pairs({ fast = { "A:", "B:", "C:", "D:", "</answer>" }, smart = { "</answer>" } }) do
      local req = { model = model, max_tokens = 100, messages = MSGS, stop_sequences = stop_sequences }
      local res = post(url .. "/v1/messages", req)
      assert.are.equal(200, res.status, res.body)
      local m = json.decode(res.body)
      assert.are.same({ "The answer is 4.", "stop_sequence", "</answer>" },
        { m.content[1].text, m.stop_reason, m.stop_sequence }, res.body)
      local up_stop = sent[#sent].stop
      assert.is_true(up_stop == nil or #up_stop < #stop_sequences, model) -- (not sent it)
      for _, with_tools in ipairs({ false, true }) do
        req.stream, req.tools = true, with_tools and tools or nil
        res = post(url .. "/v1/messages", req)
        assert.are.equal(200, res.status, res.body)
        local text, stop, seq = {}, nil, nil
        for data in res.body:gmatch("data: ([^\n]+)") do
          local ev = json.decode(data)
          if ev.type == "content_block_delta" and ev.delta.type == "text_delta" then text[#text + 1] = ev.delta.text end
          if ev.type == "message_delta" then stop, seq = ev.delta.stop_reason, ev.delta.stop_sequence end
        end
        assert.are.same({ "The answer is 4.", "stop_sequence", "</answer>" }, { table.concat(text), stop, seq },
          res.body)
        assert.matches("event: message_stop", res.body)
      end
    end
    assert.is_true(helpers.wait_until(function()
      local rows = resil.cost.breakdown("model")
      local calls = 0
      for _, row in ipairs(rows or {}) do calls = calls + row.calls end
      return calls == 6
    end, 5))
  end)
end)

describe("gateway: an OpenAI client's stop sequences its alias's reasoning model was not sent", function()
  local streams = require "spec.provider_streams"
  local TEXT = "The answer is 4.</answer> And then some more."
  -- (the relayed answer, OpenAI's own, went on past "</answer>": a reasoning model takes no stop,
  -- and one the client did not name is not sent it)
  it("end the relayed answer where the first of them is, streamed or not", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local sent = {}
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function(req)
      local b = json.decode(req.body)
      sent[#sent + 1] = b
      if b.stream then return streams.reply(streams.openai({ content = TEXT, model = b.model,
        usage = { prompt_tokens = 5, completion_tokens = 12 } })) end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-1", object = "chat.completion", created = 1, model = b.model, choices = { { index = 0,
          message = { role = "assistant", content = TEXT, refusal = json.null }, finish_reason = "stop",
          logprobs = json.null } }, usage = { prompt_tokens = 5, completion_tokens = 12, total_tokens = 17 } }) }
    end } }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = { smart = "openai/gpt-5" } },
      finally)
    local req = { model = "smart", messages = MSGS, stop = { "</answer>" } }
    local res = post(url .. "/v1/chat/completions", req)
    assert.are.equal(200, res.status, res.body)
    local choice = json.decode(res.body).choices[1]
    assert.are.same({ "The answer is 4.", "stop" }, { choice.message.content, choice.finish_reason })
    assert.is_nil(sent[1].stop)
    -- (vLLM's include_stop_str_in_output: the client asked for the stop in its answer, not cut)
    res = post(url .. "/v1/chat/completions", { model = "smart", messages = MSGS, stop = { "</answer>" },
      include_stop_str_in_output = true })
    assert.are.equal(TEXT, json.decode(res.body).choices[1].message.content)
    req.stream, req.stream_options = true, { include_usage = true }
    res = post(url .. "/v1/chat/completions", req)
    assert.are.equal(200, res.status, res.body)
    local text, finish, usage = {}, nil, nil
    for data in res.body:gmatch("data: ([^\n]+)") do
      local c = data ~= "[DONE]" and json.decode(data)
      local choice1 = c and c.choices[1]
      if choice1 and type(choice1.delta.content) == "string" then text[#text + 1] = choice1.delta.content end
      if choice1 and choice1.finish_reason ~= json.null then finish = choice1.finish_reason end
      if c and c.usage and c.usage ~= json.null then usage = c.usage end
    end
    assert.are.same({ "The answer is 4.", "stop" }, { table.concat(text), finish }, res.body)
    assert.is_true(usage.prompt_tokens > 0, res.body)
    assert.matches("data: %[DONE%]\n\n$", res.body)
    assert.is_true(helpers.wait_until(function()
      local rows = resil.cost.breakdown("model")[1]
      return rows and rows.calls == 3
    end, 5))
  end)
end)

describe("gateway: an Anthropic client's whitespace stop sequence, to Anthropic", function()
  -- (left out for an OpenAI client, whose answer the gateway cuts there; an Anthropic client's
  -- was left out too, and its answer, relayed as Anthropic wrote it, went on past its "\n")
  it("is sent as it came: the API's 400 names it", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, reply = "one\ntwo" }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
    local res = post(url .. "/v1/messages", { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 50,
      messages = MSGS, stop_sequences = { "\n" } })
    assert.are.equal(400, res.status, res.body)
    assert.matches("stop_sequences", json.decode(res.body).error.message)
    res = post(url .. "/v1/chat/completions", { model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS,
      stop = { "\n" } })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("one", json.decode(res.body).choices[1].message.content)
  end)
end)

describe("gateway: who asked, at Anthropic", function()
  -- (OpenAI is sent the key's name as `user`, a client's own user and safety_identifier left out;
  -- Anthropic was sent none, and an Anthropic client's metadata.user_id as it came: one tenant
  -- could name another as the one who asked)
  it("is the key's name in metadata.user_id, whichever API's client, a client's own user_id left out", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local keys = require "resil.keys"
    local sent = {}
    local m = assert(resil.mock.start({ routes = { ["POST /v1/messages"] = function(req)
      sent[#sent + 1] = json.decode(req.body)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode(ANTHROPIC_ANSWER) }
    end } }))
    local url = helpers.gateway_for_mock(m, { auth = true, key_cache = 0, models = {} }, finally)
    local key = assert(keys.add({ name = "alice" }))
    local function post_as(path, body)
      return assert(http.request({ method = "POST", url = url .. path, headers = { ["content-type"] = "application/json",
        authorization = "Bearer " .. key }, body = json.encode(body) }))
    end
    local res = post_as("/v1/messages", { model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 10,
      messages = MSGS, metadata = { user_id = "bob" } })
    assert.are.equal(200, res.status, res.body)
    res = post_as("/v1/chat/completions", { model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS,
      user = "bob" })
    assert.are.equal(200, res.status, res.body)
    assert.are.same({ "alice", "alice" }, { sent[1].metadata.user_id, sent[2].metadata and sent[2].metadata.user_id })
  end)
end)

describe("gateway: stop sequences in an answer whose content is a list of parts", function()
  -- (a compatible server's reasoning model, Mistral's Magistral, answers with content as a list of
  -- thinking and text parts, whole and in each delta: the stop sequences the gateway applies looked
  -- at content strings only, and the relayed answer went on past "</answer>")
  local THOUGHT = { type = "thinking", thinking = { { type = "text", text = "not here: </answer>" } } }
  local function chunk(delta, finish)
    return "data: " .. json.encode({ id = "chatcmpl-1", object = "chat.completion.chunk", created = 1,
      model = "gpt-5", choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
  end
  it("end the relayed answer at the first stop in its text parts (not its thinking), streamed or not", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function(req)
      if json.decode(req.body).stream then
        return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = table.concat({
          chunk({ role = "assistant", content = { THOUGHT } }),
          chunk({ content = { { type = "text", text = "The answer is 4.</ans" } } }),
          chunk({ content = { { type = "text", text = "wer> And" }, { type = "text", text = " more." } } }),
          chunk({ content = { { type = "text", text = " Still more." } } }),
          chunk({}, "stop"),
          "data: " .. json.encode({ id = "chatcmpl-1", object = "chat.completion.chunk", created = 1,
            model = "gpt-5", choices = setmetatable({}, json.array_mt),
            usage = { prompt_tokens = 5, completion_tokens = 12, total_tokens = 17 } }) .. "\n\n",
          "data: [DONE]\n\n" }) }
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-1", object = "chat.completion", created = 1, model = "gpt-5", choices = { { index = 0,
          message = { role = "assistant", content = { THOUGHT, { type = "text", text = "The answer is 4.</ans" },
            { type = "text", text = "wer> And more." }, { type = "text", text = " Still more." } } },
          finish_reason = "length" } }, usage = { prompt_tokens = 5, completion_tokens = 12, total_tokens = 17 } }) }
    end } }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = { smart = "openai/gpt-5" } },
      finally)
    local req = { model = "smart", messages = MSGS, stop = { "</answer>" } }
    local res = post(url .. "/v1/chat/completions", req)
    assert.are.equal(200, res.status, res.body)
    local choice = json.decode(res.body).choices[1]
    assert.are.same({ THOUGHT, { type = "text", text = "The answer is 4." } }, choice.message.content)
    assert.are.equal("stop", choice.finish_reason)
    req.stream = true
    res = post(url .. "/v1/chat/completions", req)
    assert.are.equal(200, res.status, res.body)
    local text, finish = {}, nil
    for data in res.body:gmatch("data: ([^\n]+)") do
      local c = data ~= "[DONE]" and json.decode(data)
      local choice1 = c and c.choices[1]
      local content = choice1 and choice1.delta.content
      if type(content) == "string" then text[#text + 1] = content end
      for _, part in ipairs(type(content) == "table" and content or {}) do
        if part.type == "text" then text[#text + 1] = part.text end
      end
      if choice1 and choice1.finish_reason ~= json.null then finish = choice1.finish_reason end
    end
    assert.are.same({ "The answer is 4.", "stop" }, { table.concat(text), finish }, res.body)
    assert.matches('"text":"not here: <\\/answer>"', res.body, 1, true) -- (the thinking relayed as it came)
    assert.matches("data: %[DONE%]\n\n$", res.body)
  end)
end)

describe("gateway: Anthropic's pause_turn to an OpenAI client", function()
  -- (a server tool's loop that Anthropic paused, its turn not done: "stop" told the OpenAI client
  -- the answer was whole, a silent truncation; "length" is the SDK's word for an answer cut short)
  local streams = require "spec.provider_streams"
  local TEXT = "Let me search for that."
  it("is finish_reason length, whole and streamed, with tools or without", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/messages"] = function(req)
      if json.decode(req.body).stream then
        return streams.reply(streams.anthropic({ content = TEXT, stop_reason = "pause_turn" }))
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "msg_up", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
        content = { { type = "text", text = TEXT }, { type = "server_tool_use", id = "srvtoolu_1", name = "web_search",
          input = { query = "weather" } } }, stop_reason = "pause_turn", stop_sequence = json.null,
        usage = { input_tokens = 5, output_tokens = 7, server_tool_use = { web_search_requests = 1 } } }) }
    end } }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
    for _, tools in ipairs({ false, true }) do
      local req = { model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS,
        tools = tools and { { type = "web_search_20250305", name = "web_search", max_uses = 3 } } or nil }
      local res = post(url .. "/v1/chat/completions", req)
      assert.are.equal(200, res.status, res.body)
      local choice = json.decode(res.body).choices[1]
      assert.are.same({ TEXT, "length" }, { choice.message.content, choice.finish_reason }, res.body)
      req.stream = true
      res = post(url .. "/v1/chat/completions", req)
      assert.are.equal(200, res.status, res.body)
      local text, finish = {}, nil
      for data in res.body:gmatch("data: ([^\n]+)") do
        local c = data ~= "[DONE]" and json.decode(data)
        local choice1 = c and c.choices[1]
        if choice1 and type(choice1.delta.content) == "string" then text[#text + 1] = choice1.delta.content end
        if choice1 and choice1.finish_reason ~= json.null then finish = choice1.finish_reason end
      end
      assert.are.same({ TEXT, "length" }, { table.concat(text), finish }, res.body)
    end
  end)
end)
