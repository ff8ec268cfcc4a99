-- Models that answer garbage rather than an error: a finish_reason / stop_reason of the wrong
-- type, text that is not UTF-8. What ai.chat returns, and what the gateway's clients get, relayed
-- (a provider of their own API) and translated, whole and streamed. A real mock provider on
-- loopback, a fresh SQLite store.
local resil = require "resil"
local helpers = require "spec.helpers"
local json = resil.json
local http = resil.http

local CLAUDE = "anthropic/claude-sonnet-4-5-20250929"
local GPT = "openai/gpt-4o-mini"

-- a mock answering with the routes given, a gateway in front of it -> the gateway's url
local function start(routes)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start({ routes = routes }))
  local url, _, ai = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
  return url, ai
end

local HEADERS = { ["content-type"] = "application/json", ["anthropic-version"] = "2023-06-01" }
local function path_of(api) return api == "openai" and "/v1/chat/completions" or "/v1/messages" end

-- a whole answer -> status, body (the bytes as sent)
local function ask(url, api, model)
  local res = assert(http.request({ method = "POST", url = url .. path_of(api), headers = HEADERS,
    body = json.encode({ model = model, max_tokens = 100, messages = { { role = "user", content = "hi" } } }) }))
  return res.status, res.body
end

-- a streamed answer -> its events' data (the bytes as sent) and their names
local function ask_stream(url, api, model)
  local s = assert(http.stream({ method = "POST", url = url .. path_of(api), headers = HEADERS,
    body = json.encode({ model = model, max_tokens = 100, stream = true,
      messages = { { role = "user", content = "hi" } } }) }))
  assert.are.equal(200, s.status)
  local datas, names = {}, {}
  while true do
    local ev, err = s:read_event()
    assert.is_nil(err)
    if not ev then return datas, names end
    datas[#datas + 1], names[#datas + 1] = ev.data, ev.event or ""
  end
end

local function openai_answer(text, finish)
  -- (json.encode copies bytes that are not UTF-8 as they are: the provider's garbage)
  return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
    id = "chatcmpl-x", object = "chat.completion", created = 1, model = "gpt-4o-mini",
    choices = { { index = 0, message = { role = "assistant", content = text }, finish_reason = finish } },
    usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }) }
end

local function anthropic_answer(text, stop)
  return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
    id = "msg_x", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
    content = { { type = "text", text = text } }, stop_reason = stop, stop_sequence = json.null,
    usage = { input_tokens = 5, output_tokens = 2 } }) }
end

local function chunk(delta, finish)
  return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
    choices = { { index = 0, delta = delta, finish_reason = finish == nil and json.null or finish } } }) .. "\n\n"
end
local function openai_stream(text, finish)
  return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
    chunk({ role = "assistant", content = "" }), chunk({ content = text }), chunk({}, finish), "data: [DONE]\n\n" } }
end

local function ev(name, data) return ("event: %s\ndata: %s\n\n"):format(name, json.encode(data)) end
local function anthropic_stream(text, stop)
  return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
    ev("message_start", { type = "message_start", message = { id = "msg_x", type = "message", role = "assistant",
      model = "claude-sonnet-4-5-20250929", content = {}, stop_reason = json.null, stop_sequence = json.null,
      usage = { input_tokens = 5, output_tokens = 1 } } }),
    ev("content_block_start", { type = "content_block_start", index = 0, content_block = { type = "text", text = "" } }),
    ev("content_block_delta", { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = text } }),
    ev("content_block_stop", { type = "content_block_stop", index = 0 }),
    ev("message_delta", { type = "message_delta", delta = { stop_reason = stop, stop_sequence = json.null },
      usage = { output_tokens = 2 } }),
    ev("message_stop", { type = "message_stop" }) } }
end

describe("garbage answers: a finish_reason or stop_reason that is not a string", function()
  -- (before: 5, {"a":1} or true was ai.chat's r.finish_reason / r.stop_reason, and a client of the
  -- provider's own API got it relayed: an SDK's `switch (finish_reason)` matched nothing, Python's
  -- pydantic model refused the answer)
  for _, garbage in ipairs({ 5, { a = 1 }, true }) do
    local shown = json.encode(garbage)
    it(("%s is no reason in ai.chat's result, and each client gets one of its API's reasons"):format(shown), function()
      local url, ai = start({
        ["POST /v1/chat/completions"] = function(req)
          local b = json.decode(req.body)
          if b.stream then return openai_stream("ok", garbage) end
          return openai_answer("ok", garbage)
        end,
        ["POST /v1/messages"] = function(req)
          local b = json.decode(req.body)
          if b.stream then return anthropic_stream("ok", garbage) end
          return anthropic_answer("ok", garbage)
        end })
      local r = assert(ai.chat({ model = GPT, messages = { { role = "user", content = "hi" } } }))
      assert.is_nil(r.finish_reason)
      r = assert(ai.chat({ model = CLAUDE, messages = { { role = "user", content = "hi" } }, max_tokens = 100 }))
      assert.is_nil(r.finish_reason)
      assert.is_nil(r.stop_reason)
      for _, model in ipairs({ GPT, CLAUDE }) do
        local status, body = ask(url, "openai", model)
        assert.are.equal(200, status, body)
        assert.are.equal("stop", json.decode(body).choices[1].finish_reason, model)
        status, body = ask(url, "anthropic", model)
        assert.are.equal(200, status, body)
        assert.are.equal("end_turn", json.decode(body).stop_reason, model)
        -- streamed: the reason given is a string (or null, on the chunks before it), and the stream ends whole
        local datas = ask_stream(url, "openai", model)
        assert.are.equal("[DONE]", datas[#datas], model)
        local finishes = {}
        for i = 1, #datas - 1 do
          local c = json.decode(datas[i])
          local f = type(c.choices) == "table" and c.choices[1] and c.choices[1].finish_reason
          if f and f ~= json.null then finishes[#finishes + 1] = f end
        end
        assert.are.same({ "stop" }, finishes, model)
        local names
        datas, names = ask_stream(url, "anthropic", model)
        assert.are.equal("message_stop", names[#names], model)
        local stops = {}
        for i, name in ipairs(names) do
          if name == "message_delta" then stops[#stops + 1] = json.decode(datas[i]).delta.stop_reason end
        end
        assert.are.same({ "end_turn" }, stops, model)
      end
    end)
  end
end)

describe("garbage answers: text that is not UTF-8", function()
  -- (before: "ok \255\254" reached the client as those bytes, in a JSON body: Python's
  -- json.loads(bytes), serde and any strict decoder refused the whole answer; RFC 8259 8.1)
  local BAD, SHOWN = "ok \255\254", "ok \u{FFFD}\u{FFFD}"
  it("reaches each client as U+FFFD for each byte, relayed and translated, whole and streamed", function()
    local url = start({
      ["POST /v1/chat/completions"] = function(req)
        if json.decode(req.body).stream then return openai_stream(BAD, "stop") end
        return openai_answer(BAD, "stop")
      end,
      ["POST /v1/messages"] = function(req)
        if json.decode(req.body).stream then return anthropic_stream(BAD, "end_turn") end
        return anthropic_answer(BAD, "end_turn")
      end })
    for _, model in ipairs({ GPT, CLAUDE }) do
      local status, body = ask(url, "openai", model)
      assert.are.equal(200, status, body)
      assert.is_truthy(utf8.len(body), model .. ": " .. body)
      assert.are.equal(SHOWN, json.decode(body).choices[1].message.content)
      status, body = ask(url, "anthropic", model)
      assert.are.equal(200, status, body)
      assert.is_truthy(utf8.len(body), model .. ": " .. body)
      assert.are.equal(SHOWN, json.decode(body).content[1].text)
      for _, api in ipairs({ "openai", "anthropic" }) do
        local datas = ask_stream(url, api, model)
        local text = {}
        for _, d in ipairs(datas) do
          assert.is_truthy(utf8.len(d), api .. " client of " .. model .. ": " .. d)
          local c = d ~= "[DONE]" and json.decode(d) or {}
          local delta = type(c.choices) == "table" and c.choices[1] and c.choices[1].delta or c.delta
          if type(delta) == "table" and type(delta.content or delta.text) == "string" then
            text[#text + 1] = delta.content or delta.text
          end
        end
        assert.are.equal(SHOWN, table.concat(text), api .. " client of " .. model)
      end
    end
  end)
end)

describe("garbage answers: tool call arguments that are not their JSON text", function()
  -- (a compatible server's arguments as the object itself: the gateway raised translating them
  -- for an Anthropic client, a 500 its SDK tried twice more, each answer billed; streamed, they
  -- were lost; relayed, an OpenAI client's code parsed an object)
  local TOOLS = {
    openai = { { type = "function", ["function"] = { name = "get_weather", parameters = { type = "object" } } } },
    anthropic = { { name = "get_weather", input_schema = { type = "object" } } } }
  local function with_tools(url, api, stream)
    local body = json.encode({ model = GPT, max_tokens = 100, stream = stream or nil, tools = TOOLS[api],
      messages = { { role = "user", content = "weather?" } } })
    if not stream then
      local res = assert(http.request({ method = "POST", url = url .. path_of(api), headers = HEADERS, body = body }))
      return res.status, res.body
    end
    local s = assert(http.stream({ method = "POST", url = url .. path_of(api), headers = HEADERS, body = body }))
    local datas = {}
    while true do
      local e, err = s:read_event()
      assert.is_nil(err)
      if not e then return s.status, datas end
      datas[#datas + 1] = json.decode(e.data) or e.data
    end
  end
  local arguments
  local function call(args, finish)
    return { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = args } }, finish
  end
  local function upstream(req)
    local b = json.decode(req.body)
    local c = call(arguments)
    if b.stream then
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
        chunk({ role = "assistant", content = json.null, tool_calls = { { index = 0, id = c.id, type = "function",
          ["function"] = c["function"] } } }), chunk({}, "tool_calls"), "data: [DONE]\n\n" } }
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
      id = "chatcmpl-x", object = "chat.completion", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, message = { role = "assistant", content = json.null, tool_calls = { c } },
        finish_reason = "tool_calls" } }, usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }) }
  end

  it("an object is its text, null none, for either API's client, whole and streamed; a list is invalid output", function()
    local url = start({ ["POST /v1/chat/completions"] = upstream })
    for _, case in ipairs({ { { city = "Paris" }, "Paris" }, { json.null, nil } }) do
      arguments = case[1]
      local status, body = with_tools(url, "anthropic")
      assert.are.equal(200, status, body) -- (was: a 500, "bad argument #1 to 'decode'")
      local use = json.decode(body).content[1]
      assert.are.equal("tool_use", use.type)
      assert.are.equal(case[2], use.input.city)
      status, body = with_tools(url, "openai")
      assert.are.equal(200, status, body)
      local args = json.decode(body).choices[1].message.tool_calls[1]["function"].arguments
      assert.is_string(args, body) -- (was: the object, relayed)
      assert.are.equal(case[2], json.decode(args).city)
      if case[2] then
        local datas
        status, datas = with_tools(url, "anthropic", true)
        local partial = ""
        for _, d in ipairs(datas) do
          if type(d) == "table" and d.type == "content_block_delta" then partial = partial .. d.delta.partial_json end
        end
        assert.are.equal("Paris", (json.decode(partial) or {}).city, json.encode(datas)) -- (was: lost, input {})
        status, datas = with_tools(url, "openai", true)
        local streamed = ""
        for _, d in ipairs(datas) do
          local delta = type(d) == "table" and d.choices and d.choices[1] and d.choices[1].delta
          for _, tc in ipairs(delta and delta.tool_calls or {}) do streamed = streamed .. tc["function"].arguments end
        end
        assert.are.equal("Paris", json.decode(streamed).city, json.encode(datas))
      end
    end
    -- (arguments that are a list, or a number, are the model's garbage: invalid output, not the gateway's 500)
    for _, garbage in ipairs({ json.decode("[1]"), 5 }) do
      arguments = garbage
      local status, body = with_tools(url, "anthropic")
      assert.are.equal(502, status, body)
      assert.matches("not a JSON object", json.decode(body).error.message)
    end
  end)
end)

describe("compatible answers: content as a list of parts (Mistral's reasoning models)", function()
  -- (read as no text, each answer was "empty content": refused as invalid output and bought again,
  -- three answers paid for a 502)
  it("is the text of its text parts, whole and streamed, for ai.chat and either API's client, each bought once", function()
    local calls = 0
    local parts = { { type = "thinking", thinking = { { type = "text", text = "The user greets." } } },
      { type = "text", text = "Hello " }, { type = "text", text = "there." } }
    local url, ai = start({ ["POST /v1/chat/completions"] = function(req)
      calls = calls + 1
      if json.decode(req.body).stream then
        return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
          chunk({ role = "assistant", content = "" }), chunk({ content = { parts[1] } }),
          chunk({ content = { parts[2] } }), chunk({ content = { parts[3] } }), chunk({}, "stop"), "data: [DONE]\n\n" } }
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-x", object = "chat.completion", created = 1, model = "magistral-medium",
        choices = { { index = 0, message = { role = "assistant", content = parts }, finish_reason = "stop" } },
        usage = { prompt_tokens = 5, completion_tokens = 9, total_tokens = 14 } }) }
    end })
    local r = assert(ai.chat({ model = GPT, messages = { { role = "user", content = "hi" } } }))
    assert.are.equal("Hello there.", r.text)
    local s = ai.stream({ model = GPT, messages = { { role = "user", content = "hi" } } })
    local text = {}
    for delta in s do text[#text + 1] = delta end
    assert.are.equal("Hello there.", table.concat(text))
    assert.are.equal(2, calls) -- (was: 6, each refused and tried again)
    local status, body = ask(url, "anthropic", GPT)
    assert.are.equal(200, status, body)
    assert.are.equal("Hello there.", json.decode(body).content[1].text)
    local datas, names = ask_stream(url, "anthropic", GPT)
    local streamed = {}
    for i, name in ipairs(names) do
      if name == "content_block_delta" then streamed[#streamed + 1] = json.decode(datas[i]).delta.text end
    end
    assert.are.equal("Hello there.", table.concat(streamed))
    assert.are.equal(4, calls)
  end)
end)

describe("garbage answers: a tool call whose name is no string, or whose arguments are not a JSON object", function()
  -- (an OpenAI-compatible server's: its name 5 reached an Anthropic client as the tool_use's name,
  -- and, streamed, the call was left out without a word (stop_reason still tool_use); arguments
  -- streamed as "[1,2]" reached it as its input, on which its SDK broke. Invalid output now,
  -- whole and streamed: each answer billed, tried again, then the model's fallback serves.)
  local streams = require "spec.provider_streams"
  local TOOLS = { { name = "get_weather", input_schema = { type = "object" } } }
  local garbage, asked
  local function openai_upstream(req)
    asked = asked + 1
    local b = json.decode(req.body)
    local f = { name = garbage.name, arguments = garbage.arguments }
    if b.stream then
      return streams.reply(chunk({ role = "assistant", content = json.null, tool_calls = { { index = 0, id = "call_1",
        type = "function", ["function"] = f } } }) .. chunk({}, "tool_calls") .. "data: " .. json.encode({ id = "c1",
        object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini", choices = setmetatable({}, json.array_mt),
        usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }) .. "\n\ndata: [DONE]\n\n")
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
      id = "chatcmpl-x", object = "chat.completion", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, message = { role = "assistant", content = json.null, tool_calls = { { id = "call_1",
        type = "function", ["function"] = f } } }, finish_reason = "tool_calls" } },
      usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }) }
  end
  local function anthropic_upstream(req)
    local call = { id = "toolu_1", name = "get_weather", arguments = '{"city":"Paris"}' }
    if json.decode(req.body).stream then
      return streams.reply(streams.anthropic({ tool_calls = { call }, stop_reason = "tool_use" }))
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
      id = "msg_x", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
      content = { { type = "tool_use", id = call.id, name = call.name, input = { city = "Paris" } } },
      stop_reason = "tool_use", stop_sequence = json.null, usage = { input_tokens = 5, output_tokens = 2 } }) }
  end

  -- (an answer cut at max_tokens is passed on, its arguments as far as they parse: whole JSON but no
  -- object, "[1,2]", was its input as it came)
  it("cut at max_tokens, its arguments not an object: the tool_use input is {}, whole and streamed", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function(req)
      local f = { name = "get_weather", arguments = "[1,2]" }
      if json.decode(req.body).stream then
        return streams.reply(chunk({ role = "assistant", content = json.null, tool_calls = { { index = 0,
          id = "call_1", type = "function", ["function"] = f } } }) .. chunk({}, "length") .. "data: [DONE]\n\n")
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-x", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = json.null, tool_calls = { { id = "call_1",
          type = "function", ["function"] = f } } }, finish_reason = "length" } },
        usage = { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 } }) }
    end } }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
    for _, stream in ipairs({ false, true }) do
      local res = assert(http.request({ method = "POST", url = url .. "/v1/messages", headers = HEADERS,
        body = json.encode({ model = GPT, max_tokens = 100, stream = stream or nil, tools = TOOLS,
          messages = { { role = "user", content = "weather?" } } }) }))
      assert.are.equal(200, res.status, res.body)
      local input, stop
      if stream then
        local partial = ""
        for data in res.body:gmatch("data: ([^\n]+)") do
          local d = json.decode(data)
          if d.type == "content_block_delta" then partial = partial .. d.delta.partial_json end
          if d.type == "message_delta" then stop = d.delta.stop_reason end
        end
        input = partial
      else
        local msg = json.decode(res.body)
        input, stop = json.encode(msg.content[1].input), msg.stop_reason
      end
      assert.are.same({ "{}", "max_tokens" }, { input, stop }, res.body)
    end
  end)

  it("is invalid output, whole and streamed: billed, tried again, then the fallback's answer", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = openai_upstream,
      ["POST /v1/messages"] = anthropic_upstream } }))
    local url, _, ai = helpers.gateway_for_mock(m, { auth = false, key_cache = 0,
      models = { tools = { model = GPT, fallback = { CLAUDE } } } }, finally)
    -- (no retry budget: its share of this spec's sixteen retries in a second would end some early)
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
      retry = { base = 0.001, cap = 0.005, budget = false } })
    local rows = 0
    for _, g in ipairs({ { name = 5, arguments = '{"city":"Paris"}' }, { name = json.null, arguments = "{}" },
      { name = "get_weather", arguments = "[1,2]" }, { name = "get_weather", arguments = '"Paris"' } }) do
      garbage = g
      for _, stream in ipairs({ false, true }) do
        asked = 0
        local res = assert(http.request({ method = "POST", url = url .. "/v1/messages", headers = HEADERS,
          body = json.encode({ model = "tools", max_tokens = 100, stream = stream or nil, tools = TOOLS,
            messages = { { role = "user", content = "weather?" } } }) }))
        local what = json.encode(g) .. (stream and " streamed" or "")
        assert.are.equal(200, res.status, what .. ": " .. res.body)
        local use, stop
        if stream then
          local partial = ""
          for data in res.body:gmatch("data: ([^\n]+)") do
            local d = json.decode(data)
            if d.type == "content_block_start" and d.content_block.type == "tool_use" then use = d.content_block end
            if d.type == "content_block_delta" and d.delta.type == "input_json_delta" then
              partial = partial .. d.delta.partial_json
            end
            if d.type == "message_delta" then stop = d.delta.stop_reason end
          end
          if use then use.input = json.decode(partial) end
        else
          local msg = json.decode(res.body)
          use, stop = msg.content[1], msg.stop_reason
        end
        -- (the fallback's call, whole: a name, an object for its input)
        assert.are.same({ "tool_use", "get_weather", { city = "Paris" }, "tool_use" },
          { use and use.type, use and use.name, use and use.input, stop }, what .. ": " .. res.body)
        assert.are.equal(3, asked, what) -- (the primary tried again, as for any invalid output)
        rows = rows + 4
        -- each garbage answer billed once, and the fallback's
        assert.is_true(helpers.wait_until(function()
          local n = 0
          for _, r in ipairs(resil.cost.breakdown("model")) do n = n + r.calls end
          return n == rows
        end, 5), what)
      end
    end
  end)
end)

describe("a streamed call of a custom tool (GPT-5's free-form tools: no function, its input text)", function()
  it("is relayed, not refused for a function name, whether or not the stream is read to its end first", function()
    -- (a stream a server labels application/json is read to its end: its calls were checked as
    -- function calls, and the answer was refused after 3 paid tries, a 502; relayed as it came, or
    -- whole, the same call passed)
    for _, ctype in ipairs({ "text/event-stream", "application/json" }) do
      local asked = 0
      resil.clock.real()
      resil.log.level("off")
      resil.store_config({ url = helpers.tmpname(".db") })
      local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function()
        asked = asked + 1
        return { status = 200, headers = { ["content-type"] = ctype }, body =
          chunk({ role = "assistant", content = json.null }) ..
          chunk({ tool_calls = { { index = 0, id = "call_1", type = "custom", custom = { name = "run", input = "" } } } }) ..
          chunk({ tool_calls = { { index = 0, custom = { input = "print(1)" } } } }) .. chunk({}, "tool_calls") ..
          "data: [DONE]\n\n" }
      end } }))
      local url, _, ai = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
        retry = { base = 0.001, cap = 0.005, budget = false } })
      local res = assert(http.request({ method = "POST", url = url .. "/v1/chat/completions", headers = HEADERS,
        body = json.encode({ model = GPT, stream = true, tools = { { type = "custom", custom = { name = "run" } } },
          messages = { { role = "user", content = "hi" } } }) }))
      assert.are.equal(200, res.status, ctype .. ": " .. res.body)
      assert.matches("print(1)", res.body, 1, true)
      assert.are.equal(1, asked, ctype)
    end
  end)
end)

describe("compatible answers: one the server ended unfinished (vLLM's finish_reason abort)", function()
  -- (vLLM ends a request its engine aborts, scales down or shuts down under with a 200,
  -- finish_reason "abort" and [DONE]: relayed as it came, or translated as "stop" / end_turn, each
  -- client took the cut answer for a whole one. Whole, or read to its end, it is invalid output,
  -- tried again, then the fallback's; streamed past its first delta, an error event, no end.)
  local streams = require "spec.provider_streams"
  local asked
  local function vllm(req)
    asked = asked + 1
    if json.decode(req.body).stream then
      return streams.reply(chunk({ role = "assistant", content = "" }) .. chunk({ content = "The answer is" }) ..
        chunk({}, "abort") .. "data: [DONE]\n\n")
    end
    return openai_answer("The answer is", "abort")
  end
  local function claude(req)
    if json.decode(req.body).stream then
      return streams.reply(streams.anthropic({ content = "whole", stop_reason = "end_turn" }))
    end
    return anthropic_answer("whole", "end_turn")
  end

  local function post(url, api, model, stream, tools)
    return assert(http.request({ method = "POST", url = url .. path_of(api), headers = HEADERS,
      body = json.encode({ model = model, max_tokens = 100, stream = stream or nil,
        tools = tools and (api == "openai" and { { type = "function", ["function"] = { name = "f",
          parameters = { type = "object" } } } } or { { name = "f", input_schema = { type = "object" } } }) or nil,
        messages = { { role = "user", content = "hi" } } }) }))
  end

  it("whole, or read to its end: invalid output, tried again, then the fallback's answer", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = vllm, ["POST /v1/messages"] = claude } }))
    local url, _, ai = helpers.gateway_for_mock(m, { auth = false, key_cache = 0,
      models = { local_llm = { model = GPT, fallback = { CLAUDE } } } }, finally)
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
      retry = { base = 0.001, cap = 0.005, budget = false } })
    -- (an Anthropic client's stream with tools is read to its end before a byte is sent)
    for _, case in ipairs({ { "openai" }, { "anthropic" }, { "anthropic", true, true } }) do
      local api, stream, tools = case[1], case[2], case[3]
      asked = 0
      local res = post(url, api, "local_llm", stream, tools)
      local what = api .. (stream and " streamed" or "")
      assert.are.equal(200, res.status, what .. ": " .. res.body)
      assert.matches("whole", res.body, 1, true)
      assert.is_nil(res.body:find("The answer is", 1, true), what .. ": " .. res.body)
      assert.are.equal(3, asked, what)
    end
  end)

  it("streamed past its first delta: the client's stream ends with an error event, relayed or translated", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = vllm } }))
    local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
    for _, api in ipairs({ "openai", "anthropic" }) do
      asked = 0
      local res = post(url, api, GPT, true)
      assert.are.equal(200, res.status, res.body)
      assert.matches("The answer is", res.body, 1, true) -- (what it streamed, as it came)
      assert.matches('finish_reason \\"abort\\"', res.body, 1, true) -- (the error saying why)
      if api == "openai" then
        assert.matches('data: {"error":', res.body, 1, true)
        assert.is_nil(res.body:find("[DONE]", 1, true), res.body)
        assert.is_nil(res.body:find('"finish_reason":"abort"', 1, true), res.body)
      else
        assert.matches("event: error\n", res.body, 1, true)
        assert.is_nil(res.body:find("message_stop", 1, true), res.body)
        assert.is_nil(res.body:find("end_turn", 1, true), res.body)
      end
      assert.are.equal(1, asked)
    end
    -- (each recorded once, as what it streamed)
    assert.is_true(helpers.wait_until(function()
      local rows = resil.cost.breakdown("model")[1]
      return rows and rows.calls == 2
    end, 5))
  end)

  it("streamed past its first delta: recorded at the usage the provider sent after it, for either client", function()
    -- (the usage chunk comes after the finish's, as asked with include_usage: an OpenAI client's
    -- relay ended at the abort, the stream closed before it, and the call was priced from an
    -- estimate of what streamed, $0.000004 for what the provider billed $0.015)
    local streams = require "spec.provider_streams"
    local usd = {}
    for _, finish in ipairs({ "stop", "abort" }) do
      for _, api in ipairs({ "openai", "anthropic" }) do
        resil.clock.real()
        resil.log.level("off")
        resil.store_config({ url = helpers.tmpname(".db") })
        local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function()
          return streams.reply(streams.openai({ content = "The answer is", finish_reason = finish,
            usage = { prompt_tokens = 100000, completion_tokens = 100000 } }))
        end } }))
        local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = {} }, finally)
        local res = post(url, api, GPT, true)
        assert.are.equal(200, res.status, res.body)
        assert.is_true(helpers.wait_until(function()
          local rows = resil.cost.breakdown("model")[1]
          return rows and rows.calls == 1
        end, 5))
        usd[#usd + 1] = resil.cost.breakdown("model")[1].usd
      end
    end
    -- (gpt-4o-mini's 100,000 tokens in at $0.15/M, and its output at most max_tokens' 100 at $0.60/M)
    assert.are.same({ 0.01506, 0.01506, 0.01506, 0.01506 }, usd)
  end)
end)
