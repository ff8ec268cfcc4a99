local resil = require "resil"
local helpers = require "spec.helpers"
local http, json = resil.http, resil.json

local function chat(m, headers, body)
  return http.request({ url = m.url .. "/v1/chat/completions", headers = headers,
    json = body or { model = "m", messages = { { role = "user", content = "hello" } } } })
end

describe("the mock provider", function()
  local m
  before_each(function() resil.clock.virtual() end)
  after_each(function() if m then m:stop() end end)

  it("serves OpenAI-compatible chat with usage from an empty scenario", function()
    m = resil.mock.start({})
    local res = chat(m)
    local body = json.decode(res.body)
    assert.are.equal("chat.completion", body.object)
    assert.are.equal("stop", body.choices[1].finish_reason)
    assert.are.equal(body.usage.prompt_tokens + body.usage.completion_tokens, body.usage.total_tokens)
  end)

  it("plays a sequence of faults per route, then answers normally", function()
    m = resil.mock.start({ sequence = { chat = { 500, { status = 429, retry_after = 3 }, "ok", 503 } } })
    local statuses = {}
    for i = 1, 6 do statuses[i] = chat(m).status end
    assert.are.same({ 500, 429, 200, 503, 200, 200 }, statuses)
  end)

  it("injects faults by probability, reproducibly for a seed", function()
    local function run()
      m = resil.mock.start({ seed = 42, faults = { { route = "chat", probability = 0.3, status = 503 } } })
      local failures = 0
      for _ = 1, 200 do if chat(m).status == 503 then failures = failures + 1 end end
      m:stop()
      return failures
    end
    local first = run()
    assert.are.equal(first, run())
    assert.is_true(first > 40 and first < 80, "about 30% of 200, got " .. first)
    m = nil
  end)

  it("adds latency on the host clock, exactly under the virtual clock", function()
    m = resil.mock.start({ latency = 2.5 })
    local t0 = resil.now()
    chat(m)
    assert.are.equal(2.5, resil.now() - t0)
  end)

  it("keeps many slow requests in flight at once", function()
    m = resil.mock.start({ latency = { min = 1, max = 2 }, seed = 3 })
    local items = {}
    for i = 1, 100 do items[i] = i end
    local t0 = resil.now()
    local statuses = resil.map(items, function() return chat(m).status end, { concurrency = 100 })
    assert.are.equal(100, #statuses)
    assert.is_true(resil.now() - t0 < 10) -- 100 sequential would take 150 s
  end)

  it("answers errors in the providers' shapes", function()
    m = resil.mock.start({ sequence = { chat = { 529, { status = 400, error_type = "context_length_exceeded" } } } })
    local overloaded = json.decode(chat(m).body)
    assert.are.equal("overloaded_error", overloaded.error.type)
    local ctx = json.decode(chat(m).body)
    assert.are.equal("context_length_exceeded", ctx.error.code)
  end)

  it("when strict, refuses a conversation in the other API's shape as that API does", function()
    m = resil.mock.start({ strict = true })
    local auth = { authorization = "Bearer sk-x" }
    local function refused(res)
      assert.are.equal(400, res.status)
      return json.decode(res.body).error
    end
    -- Anthropic's blocks sent to OpenAI
    local e = refused(chat(m, auth, { model = "m", messages = { { role = "user", content = {
      { type = "image", source = { type = "url", url = "https://example.com/a.png" } } } } } }))
    assert.are.equal("messages[0].content[0].type", e.param)
    assert.matches("Invalid value: 'image'", e.message)
    -- a tool message with no call before it; a call with no answer after it
    e = refused(chat(m, auth, { model = "m", messages = { { role = "user", content = "hi" },
      { role = "tool", tool_call_id = "call_1", content = "18C" } } }))
    assert.matches("must be a response to a preceeding message with 'tool_calls'", e.message)
    e = refused(chat(m, auth, { model = "m", messages = { { role = "user", content = "hi" },
      { role = "assistant", tool_calls = { { id = "call_1", type = "function", ["function"] = { name = "f", arguments = "{}" } } } },
      { role = "user", content = "and?" } } }))
    assert.matches("did not have response messages: call_1", e.message)
    -- OpenAI's parts and tool messages sent to Anthropic
    local function messages(body)
      return http.request({ url = m.url .. "/v1/messages", json = body,
        headers = { ["x-api-key"] = "sk-ant-x", ["anthropic-version"] = "2023-06-01" } })
    end
    e = refused(messages({ model = "c", max_tokens = 10, messages = { { role = "user", content = {
      { type = "image_url", image_url = { url = "https://example.com/a.png" } } } } } }))
    assert.matches("messages.0.content.0: Input tag 'image_url'", e.message)
    e = refused(messages({ model = "c", max_tokens = 10, messages = { { role = "user", content = "hi" },
      { role = "assistant", content = { { type = "tool_use", id = "toolu_1", name = "f", input = {} } } },
      { role = "user", content = { { type = "tool_result", tool_use_id = "toolu_2", content = "x" } } } } }))
    assert.matches("unexpected `tool_use_id` found in `tool_result` blocks: toolu_2", e.message)
    -- both APIs' own conversations pass
    assert.are.equal(200, messages({ model = "c", max_tokens = 10, messages = { { role = "user", content = "hi" },
      { role = "assistant", content = { { type = "tool_use", id = "toolu_1", name = "f", input = {} } } },
      { role = "user", content = { { type = "tool_result", tool_use_id = "toolu_1", content = "x" } } } },
      tools = { { name = "f", input_schema = { type = "object" } } } }).status)
    assert.are.equal(200, chat(m, auth, { model = "m", messages = { { role = "user", content = "hi" },
      { role = "assistant", content = json.null,
        tool_calls = { { id = "call_1", type = "function", ["function"] = { name = "f", arguments = "{}" } } } },
      { role = "tool", tool_call_id = "call_1", content = "18C" } } }).status)
  end)

  it("serves garbage and empty content as 200s", function()
    m = resil.mock.start({ sequence = { chat = { "garbage", "empty" } } })
    local garbage = chat(m)
    assert.are.equal(200, garbage.status)
    assert.is_nil(json.decode(garbage.body))
    local empty = json.decode(chat(m).body)
    assert.are.equal("", empty.choices[1].message.content)
  end)

  -- (before: a streamed answer's truncate was a whole 200 with Content-Length: 0, which every
  -- client read as a stream that ended cleanly with nothing in it)
  it("truncates a streamed answer as a whole one: some of it, then the connection cut", function()
    m = resil.mock.start({ sequence = { chat = { "truncate" }, messages = { "truncate" } } })
    local msgs = { { role = "user", content = "one two three four five six" } }
    for _, case in ipairs({
      { "/v1/chat/completions", {}, { model = "gpt-4o-mini", stream = true, messages = msgs } },
      { "/v1/messages", { ["x-api-key"] = "k", ["anthropic-version"] = "2023-06-01" },
        { model = "claude-sonnet-4-5", max_tokens = 50, stream = true, messages = msgs } },
    }) do
      local s = assert(http.stream({ url = m.url .. case[1], method = "POST", headers = case[2], json = case[3] }))
      assert.are.equal(200, s.status)
      local events, ev, err = 0, s:read_event()
      while ev do events = events + 1; ev, err = s:read_event() end
      assert.is_true(events > 0, case[1])
      assert.are.equal("reset", err and err.kind, case[1])
    end
  end)

  -- (before: after = "2", 2.5 or -1 never matched a chunk's number and the stream was served whole,
  -- a spec of a cut stream passing on a whole one; retry_after = "2s" was sent as Retry-After: 2s;
  -- a stall after 0 chunks was taken for none)
  it("refuses a fault's after or retry_after that cannot be meant, a sequence entry's model, and stalls after 0 chunks", function()
    for _, f in ipairs({ { kind = "cut", after = "2" }, { kind = "cut", after = 2.5 }, { kind = "stall", after = -1 },
      { status = 429, retry_after = "2s" }, { status = 429, retry_after = -5 } }) do
      local ok, err = pcall(function()
        local mock = resil.mock.start({ sequence = { chat = { f } } })
        return mock
      end)
      assert.is_false(ok)
      assert.matches("^spec/mock_spec.lua:%d+: resil.mock: sequence.chat%[1%]: " .. (f.after and "after" or "retry_after")
        .. " must be", err)
    end
    -- a whole number that is a float (4 / 2 is 2.0 in Lua 5.4) is that number
    resil.mock.start({ sequence = { chat = { { kind = "cut", after = 4 / 2 } } } }):stop()
    -- (before: a sequence entry's route, model and probability were taken and ignored)
    for _, field in ipairs({ "model", "probability", "route" }) do
      local entry = { status = 500, [field] = field == "probability" and 0.1 or "gpt-4o" }
      local ok, err = pcall(function()
        local mock = resil.mock.start({ sequence = { chat = { "ok", entry } } })
        return mock
      end)
      assert.is_false(ok)
      assert.matches("^spec/mock_spec.lua:%d+: resil.mock: sequence.chat%[2%]: " .. field .. " is a field of faults", err)
    end
    m = resil.mock.start({ sequence = { chat = { { kind = "stall", after = 0 }, { status = 429, retry_after = false } } } })
    local s = assert(http.stream({ url = m.url .. "/v1/chat/completions", method = "POST", idle_timeout = 5,
      json = { model = "m", stream = true, messages = { { role = "user", content = "a b c" } } } }))
    assert.are.equal(200, s.status)
    local ev, err = s:read_event()
    assert.is_nil(ev)
    assert.are.equal("timeout", err.kind)
    assert.is_nil(chat(m).headers["retry-after"])
  end)

  -- (before: a 0 s interval was a timer between each two events, a virtual-clock jump each, made once
  -- the client's transfer had gone quiet: a 400-word stream took 5 s of real time in a spec)
  it("sends a stream's events back to back with stream_interval = 0", function()
    m = resil.mock.start({ reply = ("word "):rep(400), stream_interval = 0 })
    local arrivals, got = 0, {}
    local res = assert(http.request({ url = m.url .. "/v1/chat/completions", method = "POST",
      json = { model = "m", stream = true, max_tokens = 1000, messages = { { role = "user", content = "x" } } },
      on_chunk = function(bytes)
        arrivals = arrivals + 1
        got[#got + 1] = bytes
      end }))
    assert.are.equal(200, res.status)
    local events = 0
    for _ in table.concat(got):gmatch("data: ") do events = events + 1 end
    assert.are.equal(403, events) -- the role, 400 words, the finish, [DONE]
    assert.is_true(arrivals < 100, ("%d arrivals: one per event"):format(arrivals))
  end)

  it("counts calls per route, status and Idempotency-Key, and what it billed", function()
    m = resil.mock.start({ sequence = { chat = { 500 } } })
    chat(m, { ["Idempotency-Key"] = "k1" })
    chat(m, { ["Idempotency-Key"] = "k1" })
    chat(m, { ["Idempotency-Key"] = "k2" })
    local s = m:stats()
    assert.are.equal(3, s.routes.chat)
    assert.are.equal(2, s.keys.k1)
    assert.are.equal(1, s.paid_keys.k1) -- the 500 was not billed
    assert.are.equal(1, s.statuses["500"])
    assert.are.equal(2, s.billed.responses)
    assert.is_true(s.billed.usd > 0)
    local over_http = json.decode(http.request({ url = m.url .. "/__mock/stats" }).body)
    assert.are.equal(3, over_http.total)
    m:reset()
    assert.are.equal(0, m:stats().total)
  end)

  -- (before: reset forgot the answers kept under Idempotency-Keys too: a spec that reset the counters
  -- to measure a retry alone saw it billed anew, where the provider replays it)
  it("reset clears the counters, not the answers it keeps under their Idempotency-Keys", function()
    m = resil.mock.start({ idempotency = true })
    assert.are.equal(200, chat(m, { ["Idempotency-Key"] = "kept" }).status)
    m:reset()
    assert.are.equal(200, chat(m, { ["Idempotency-Key"] = "kept" }).status)
    local s = m:stats()
    assert.are.equal(1, s.replayed)
    assert.are.equal(0, s.billed.responses)
  end)

  local auth = { Authorization = "Bearer r8_mock_token" }
  local function create(body) return http.request({ url = m.url .. "/v1/predictions", headers = auth, json = body }) end
  local function get(url) return http.request({ url = url, headers = auth }) end

  it("runs Replicate-style async jobs to success", function()
    m = resil.mock.start({ jobs = { polls = 2 } })
    local created = json.decode(create({ version = "v1", input = { prompt = "a cat" } }).body)
    assert.are.equal("starting", created.status)
    local seen = {}
    local job
    repeat
      job = json.decode(get(created.urls.get).body)
      seen[#seen + 1] = job.status
    until job.status ~= "processing" and job.status ~= "starting"
    assert.are.same({ "processing", "processing", "succeeded" }, seen)
    assert.matches("^https://", job.output[1])
  end)

  it("can leave jobs stuck or failed", function()
    m = resil.mock.start({ jobs = { stuck = 1 } })
    local created = json.decode(create({ version = "v1", input = { prompt = "x" } }).body)
    for _ = 1, 10 do get(created.urls.get) end
    assert.are.equal("processing", json.decode(get(created.urls.get).body).status)
    m:configure({ jobs = { fail = 1 } })
    created = json.decode(create({ version = "v1", input = { prompt = "x" } }).body)
    local job
    for _ = 1, 4 do job = json.decode(get(created.urls.get).body) end
    assert.are.equal("failed", job.status)
  end)

  it("serves custom routes", function()
    m = resil.mock.start({ routes = { ["POST /v1/audio/speech"] = function(req)
      return { status = 200, json = { bytes = #req.body } }
    end } })
    local res = http.request({ url = m.url .. "/v1/audio/speech", body = "12345" })
    assert.are.equal(5, json.decode(res.body).bytes)
  end)

  it("takes the server's request limits", function()
    m = resil.mock.start({}, { max_body = 100 })
    local res = chat(m, nil, { model = "m", messages = { { role = "user", content = ("x"):rep(1000) } } })
    assert.are.equal(413, res.status)
    assert.are.equal(0, m:stats().total)
  end)

  it("rejects a malformed scenario at the caller's line", function()
    assert.has_error(function() resil.mock.start({ faults = { { kind = "explode" } } }) end,
      "resil.mock: unknown fault kind 'explode'")
    assert.has_error(function() resil.mock.start({ faults = { { probability = 2 } } }) end)
  end)

  -- a refused request's id was the next answered one's too (the rate-limit headers took the id
  -- before the request was counted): two requests, one id, in a user's support ticket
  it("gives every request its own request id, a refused one and the answer after it too", function()
    m = resil.mock.start({})
    local ids = {}
    local function note(res, name) ids[#ids + 1] = assert(res.headers[name], name) end
    local anthropic = { ["anthropic-version"] = "2023-06-01" }
    local msg = { model = "claude-sonnet-4-5", messages = { { role = "user", content = "hi" } } }
    note(http.request({ url = m.url .. "/v1/messages", headers = anthropic, json = msg }), "request-id")
    msg.max_tokens = 16
    note(http.request({ url = m.url .. "/v1/messages", headers = anthropic, json = msg }), "request-id")
    note(chat(m), "x-request-id")
    note(chat(m, { ["x-mock-fault"] = "503" }), "x-request-id")
    note(chat(m), "x-request-id")
    local seen = {}
    for i, id in ipairs(ids) do
      assert.is_nil(seen[id], ("request %d has request %s's id %s"):format(i, tostring(seen[id]), id))
      seen[id] = i
    end
  end)
end)

describe("the standalone mock (resil-lua mock)", function()
  it("serves a scenario file on a port until stopped", function()
    local scenario = helpers.write(helpers.tmpname(".lua"), "return { sequence = { chat = { 418 } } }")
    local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, scenario, out, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    resil.clock.real()
    local url
    for _ = 1, 300 do
      url = helpers.slurp(out):match("(http://[%d%.:]+)")
      if url then break end
      resil.sleep(0.01)
    end
    assert.is_string(url)
    local first = http.request({ url = url .. "/v1/chat/completions", json = {} })
    local second = http.request({ url = url .. "/v1/chat/completions", json = {} })
    -- SIGTERM: a background job of sh ignores SIGINT
    os.execute("kill -TERM " .. pid)
    assert.are.equal(418, first.status)
    assert.are.equal(200, second.status)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), "the mock is still running")
  end)

  it("names a scenario file that does not return a table", function()
    local scenario = helpers.write(helpers.tmpname(".lua"), "return 42")
    local r = helpers.run(helpers.resil .. " mock " .. scenario)
    assert.are.equal(1, r.code)
    assert.matches("a scenario file must return a table", r.stderr)
  end)

  -- (before: "mock:10: resil.mock: ...", the command's own driver, not the file with the mistake)
  it("names the scenario file in a scenario's mistake", function()
    local scenario = helpers.write(helpers.tmpname(".lua"), 'return { sequence = { chat = { "hnag" } } }')
    local r = helpers.run(helpers.resil .. " mock " .. scenario)
    assert.are.equal(1, r.code)
    assert.are.equal("", r.stdout)
    assert.matches("^resil%-lua: " .. scenario:gsub("%p", "%%%0") ..
      ": resil%.mock: sequence%.chat%[1%]: unknown fault kind 'hnag'\n", r.stderr)
  end)

  -- (before: "mock: unknown option '--port' (try --help)", for an option it knows)
  it("says which option needs a value, rather than calling it unknown", function()
    for _, opt in ipairs({ "--port", "--host", "--metrics-addr", "--metrics-file" }) do
      local r = helpers.run(helpers.resil .. " mock " .. opt)
      assert.are.equal(1, r.code, opt)
      assert.are.equal("", r.stdout, opt)
      assert.are.equal(("resil-lua: mock: option '%s' needs an argument\n"):format(opt), r.stderr)
    end
  end)
end)
