-- policies.ai and its adapters (policies/providers/*) against real HTTP:
-- the mock provider speaking each API strictly, or a recording server.
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"
local pricing = require "policies.pricing"
local openai = require "policies.providers.openai"
local anthropic = require "policies.providers.anthropic"

local OPENAI_KEY, ANTHROPIC_KEY = "sk-spec-openai-0123456789", "sk-ant-spec-0123456789"
local MSGS = { { role = "user", content = "Say hello" } }

local function fresh_store()
  resil.store_config({ url = helpers.tmpname(".db") })
  return assert(resil.store())
end

local function point_at(url)
  ai.configure("openai", { base_url = url .. "/v1", api_key = OPENAI_KEY })
  ai.configure("anthropic", { base_url = url, api_key = ANTHROPIC_KEY })
end

local function ledger_rows()
  local rows = 0
  for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do rows = rows + g.calls end
  return rows
end

describe("golden requests", function()
  local server, seen
  before_each(function()
    seen = nil
    server = resil.server.listen({ handler = function(req)
      seen = req
      if req.path == "/v1/messages" then
        return { status = 200, body = resil.json.encode({ id = "msg_1", type = "message", role = "assistant",
          model = "claude-sonnet-4-5-20250929", content = { { type = "text", text = "hi" } }, stop_reason = "end_turn",
          usage = { input_tokens = 10, output_tokens = 1 } }) }
      end
      return { status = 200, body = resil.json.encode({ id = "chatcmpl-1", object = "chat.completion",
        model = "gpt-4o-mini-2024-07-18", choices = { { index = 0, message = { role = "assistant", content = "hi" },
        finish_reason = "stop" } }, usage = { prompt_tokens = 10, completion_tokens = 1, total_tokens = 11 } }) }
    end })
    fresh_store()
    point_at(("http://127.0.0.1:%d"):format(server:port()))
  end)
  after_each(function() server:close() end)

  -- the headers we chose to send, keys redacted
  local function sent_headers(req)
    local h = {}
    for _, k in ipairs({ "authorization", "x-api-key", "anthropic-version", "content-type", "accept" }) do
      h[k] = req.headers[k]
    end
    local function redact(v, key)
      local at = v and v:find(key, 1, true)
      return at and v:sub(1, at - 1) .. "<key>" .. v:sub(at + #key) or v
    end
    h.authorization = redact(h.authorization, OPENAI_KEY)
    h["x-api-key"] = redact(h["x-api-key"], ANTHROPIC_KEY)
    return h
  end

  local REQUEST = {
    system = "Be brief.",
    messages = { { role = "user", content = "Say hello" } },
    max_tokens = 400, temperature = 0.5, stop = { "END" },
    tools = { { type = "function", ["function"] = { name = "get_time", description = "Now",
      parameters = { type = "object", properties = {} } } } },
  }
  local function request(model)
    local r = { model = model }
    for k, v in pairs(REQUEST) do r[k] = v end
    return r
  end

  it("openai: POST /v1/chat/completions, Bearer key, system as the first message", function()
    assert(ai.chat(request("openai/gpt-4o-mini-2024-07-18")))
    assert.are.equal("POST", seen.method)
    assert.are.equal("/v1/chat/completions", seen.path)
    assert.are.same({ authorization = "Bearer <key>", ["content-type"] = "application/json",
      accept = "application/json" }, sent_headers(seen))
    assert.are.same({
      model = "gpt-4o-mini-2024-07-18",
      messages = { { role = "system", content = "Be brief." }, { role = "user", content = "Say hello" } },
      max_tokens = 400, temperature = 0.5, stop = { "END" },
      tools = { { type = "function", ["function"] = { name = "get_time", description = "Now",
        parameters = { type = "object", properties = {} } } } },
    }, resil.json.decode(seen.body))
  end)

  it("openai: the official API gets max_completion_tokens, streams ask for usage", function()
    local body = ai.wire_request({ adapter = openai, conf = {}, key = "k", model = "gpt-4o" },
      { messages = MSGS, max_tokens = 5 }, true).json
    assert.are.same({ model = "gpt-4o", messages = MSGS, max_completion_tokens = 5, stream = true,
      stream_options = { include_usage = true } }, body)
  end)

  it("anthropic: POST /v1/messages, x-api-key, anthropic-version, system top-level, content blocks", function()
    assert(ai.chat(request("anthropic/claude-sonnet-4-5-20250929")))
    assert.are.equal("POST", seen.method)
    assert.are.equal("/v1/messages", seen.path)
    assert.are.same({ ["x-api-key"] = "<key>", ["anthropic-version"] = "2023-06-01",
      ["content-type"] = "application/json", accept = "application/json" }, sent_headers(seen))
    assert.are.same({
      model = "claude-sonnet-4-5-20250929", system = "Be brief.",
      messages = { { role = "user", content = "Say hello" } },
      max_tokens = 400, temperature = 0.5, stop_sequences = { "END" },
      tools = { { name = "get_time", description = "Now", input_schema = { type = "object", properties = {} } } },
    }, resil.json.decode(seen.body))
  end)

  it("anthropic: system messages move to `system`, a missing max_tokens gets the default", function()
    assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = {
      { role = "system", content = "Rule one." }, { role = "user", content = "hi" } } }))
    local body = resil.json.decode(seen.body)
    assert.are.equal("Rule one.", body.system)
    assert.are.same({ { role = "user", content = "hi" } }, body.messages)
    assert.are.equal(anthropic.default_max_tokens, body.max_tokens)
  end)
end)

describe("golden costs from the providers' documented usage", function()
  it("openai prompt caching: 2006 prompt tokens, 1920 cached, 300 out (gpt-4o-mini)", function()
    local usage = openai.usage({ prompt_tokens = 2006, completion_tokens = 300, total_tokens = 2306,
      prompt_tokens_details = { cached_tokens = 1920 } })
    assert.are.same({ input_tokens = 2006, output_tokens = 300, cached_input_tokens = 1920, cache_write_tokens = 0 },
      usage)
    -- 86 x 0.15 + 1920 x 0.075 + 300 x 0.60 per 1M
    assert.are.equal(0.0003369, pricing.cost("openai", "gpt-4o-mini-2024-07-18", usage))
  end)

  -- (before: xAI's reasoning tokens, outside its completion_tokens and inside its total_tokens, were
  -- not priced: a Grok answer was recorded at 1,499 output tokens of the 4,308 it was billed)
  it("reasoning tokens a compatible server reports apart from completion_tokens (xAI) are output; OpenAI's are not " ..
    "counted twice", function()
    local bodies = {
      -- xAI: prompt + completion + reasoning = total
      { prompt_tokens = 10120, completion_tokens = 1499, total_tokens = 14428,
        prompt_tokens_details = { cached_tokens = 128 }, completion_tokens_details = { reasoning_tokens = 2809 } },
      -- OpenAI: the reasoning is a part of completion_tokens
      { prompt_tokens = 10120, completion_tokens = 4308, total_tokens = 14428,
        prompt_tokens_details = { cached_tokens = 128 }, completion_tokens_details = { reasoning_tokens = 2809 } },
    }
    local n = 0
    local server = resil.server.listen({ handler = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "chatcmpl-r" .. n, object = "chat.completion", created = 1, model = "o4-mini",
        choices = { { index = 0, message = { role = "assistant", content = "42" }, finish_reason = "stop" } },
        usage = bodies[n] }) }
    end })
    finally(function() server:close() end)
    fresh_store()
    point_at(("http://127.0.0.1:%d"):format(server:port()))
    -- o4-mini: $1.10 input, $0.275 cached, $4.40 output a million
    local usd = ((10120 - 128) * 1.10 + 128 * 0.275 + 4308 * 4.40) / 1e6
    for i = 1, 2 do
      local r = assert(ai.chat({ model = "openai/o4-mini", messages = MSGS }))
      assert.are.same({ 10120, 4308, 2809 }, { r.usage.input_tokens, r.usage.output_tokens, r.usage.reasoning_tokens }, i)
      assert.is_true(math.abs(r.cost_usd - usd) < 1e-9, i .. ": " .. r.cost_usd)
    end
  end)

  it("anthropic prompt caching: a cache write, then a cache read (claude-sonnet-4-5)", function()
    local write = anthropic.usage({ input_tokens = 21, cache_creation_input_tokens = 188086,
      cache_read_input_tokens = 0, output_tokens = 393 })
    assert.are.same({ input_tokens = 188107, output_tokens = 393, cached_input_tokens = 0,
      cache_write_tokens = 188086 }, write)
    -- 21 x 3 + 188086 x 3.75 + 393 x 15 per 1M
    assert.are.equal(0.7112805, pricing.cost("anthropic", "claude-sonnet-4-5-20250929", write))
    local read = anthropic.usage({ input_tokens = 21, cache_creation_input_tokens = 0,
      cache_read_input_tokens = 188086, output_tokens = 393 })
    -- 21 x 3 + 188086 x 0.30 + 393 x 15 per 1M
    assert.are.equal(0.0623838, pricing.cost("anthropic", "claude-sonnet-4-5-20250929", read))
  end)

  -- (before: every write at the 5-minute price, 1.25x input; the 1-hour cache's are 2x)
  it("anthropic 1-hour cache writes are priced apart (claude-sonnet-4-5), in the result and the ledger", function()
    resil.clock.virtual()
    fresh_store()
    local server = resil.server.listen({ handler = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "msg_1h", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
        content = { { type = "text", text = "hi" } }, stop_reason = "end_turn", stop_sequence = resil.json.null,
        usage = { input_tokens = 20, cache_creation_input_tokens = 1500, cache_read_input_tokens = 0,
          cache_creation = { ephemeral_5m_input_tokens = 500, ephemeral_1h_input_tokens = 1000 },
          output_tokens = 100 } }) }
    end })
    finally(function() server:close() end)
    point_at(("http://127.0.0.1:%d"):format(server:port()))
    local r = assert(ai.chat({ model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS, max_tokens = 100 }))
    assert.are.equal(1500, r.usage.cache_write_tokens)
    assert.are.equal(1000, r.usage.cache_write_1h_tokens)
    -- 20 x 3 + 500 x 3.75 + 1000 x 6 + 100 x 15 per 1M
    assert.are.equal(0.009435, r.cost_usd)
    assert.are.equal(0.009435, assert(resil.cost.breakdown("provider"))[1].usd)
    -- a price table without a 1-hour price prices those writes as the others (then as input)
    pricing.models.anthropic["my-claude"] = { input = 3, cache_write = 3.75, output = 15 }
    finally(function() pricing.models.anthropic["my-claude"] = nil end)
    assert.are.equal(0.007185, pricing.cost("anthropic", "my-claude", r.usage))
    pricing.models.anthropic["my-claude"] = { input = 3, output = 15 }
    assert.are.equal(0.00606, pricing.cost("anthropic", "my-claude", r.usage))
  end)

  -- (before: the input was held at the input price; written to the 1-hour cache, as asked, it is
  -- billed at twice that: one call spent $0.06 of a $0.05 budget that had held $0.03 for it)
  it("a budget holds a prompt marked for the cache at the cache write's price, the 1-hour one when asked",
    function()
      resil.clock.virtual()
      fresh_store()
      local calls = 0
      local server = resil.server.listen({ handler = function()
        calls = calls + 1
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
          id = "msg_w" .. calls, type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
          content = { { type = "text", text = "ok" } }, stop_reason = "end_turn", stop_sequence = resil.json.null,
          usage = { input_tokens = 4, cache_creation_input_tokens = 10000, cache_read_input_tokens = 0,
            cache_creation = { ephemeral_5m_input_tokens = 0, ephemeral_1h_input_tokens = 10000 },
            output_tokens = 1 } }) }
      end })
      finally(function() server:close() end)
      point_at(("http://127.0.0.1:%d"):format(server:port()))
      local function call(budget)
        return ai.chat({ model = "anthropic/claude-sonnet-4-5-20250929", max_tokens = 1, budget = budget,
          system = { { type = "text", text = ("0123456789 abcdefghijklmnopqrstu"):rep(1250),
            cache_control = { type = "ephemeral", ttl = "1h" } } }, messages = MSGS })
      end
      -- 10,000 tokens written to the 1-hour cache: 10,000 x 6 + 4 x 3 + 1 x 15 per 1M
      resil.budget("ai-spec-cache-tight", { limit = 0.05 })
      local r, err = call("ai-spec-cache-tight")
      assert.is_nil(r)
      assert.are.equal("budget_exceeded", err.kind)
      assert.are.equal(0, calls)
      local b = resil.budget("ai-spec-cache", { limit = 0.07 })
      r = assert(call("ai-spec-cache"))
      assert.are.equal(0.060027, r.cost_usd)
      local st = assert(b:state())
      assert.are.same({ 0.060027, 0 }, { st.spent, st.reserved })
    end)

  it("a model without a price costs nil, never zero", function()
    local usd, why = pricing.cost("openai", "gpt-unknown", { input_tokens = 1, output_tokens = 1 })
    assert.is_nil(usd)
    assert.matches("no price for openai/gpt%-unknown", why)
  end)

  -- (before: a usage of completion_tokens without prompt_tokens priced the prompt at 0 tokens, an
  -- answer without completion_tokens its output at 0: a long prompt's row, and its budget, paid nothing)
  describe("a usage that leaves a main count out", function()
    local server, reply
    local PROMPT = { { role = "user", content = string.rep("word ", 400) } } -- 2,000 bytes: 500 tokens or so
    before_each(function()
      server = resil.server.listen({ handler = function(req) return reply(req) end })
      fresh_store()
      point_at(("http://127.0.0.1:%d"):format(server:port()))
    end)
    after_each(function() server:close() end)
    local function openai_body(usage)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = '{"id":"chatcmpl-' ..
        resil.hash(usage) .. '","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18",' ..
        '"choices":[{"index":0,"message":{"role":"assistant","content":"hello there, friend"},' ..
        '"finish_reason":"stop"}],"usage":' .. usage .. '}' }
    end
    local input = pricing.estimate_tokens(resil.json.encode(PROMPT))
    local function usd(i, o) return math.floor((i * 0.15 + o * 0.60) + 0.5) / 1e6 end -- gpt-4o-mini, micro-dollars

    it("openai: no prompt_tokens is the prompt estimated from the request, the row marked estimated", function()
      reply = function() return openai_body('{"completion_tokens":50}') end
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = PROMPT }))
      assert.are.same({ input, 50, true }, { r.usage.input_tokens, r.usage.output_tokens, r.usage.estimated })
      assert.is_nil(r.usage.input_unreported)
      assert.are.equal(usd(input, 50), assert(resil.cost.total()))
    end)

    it("openai: no completion_tokens is the output estimated from the answer's text", function()
      reply = function() return openai_body('{"prompt_tokens":500,"completion_tokens":null}') end
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = PROMPT }))
      assert.are.same({ 500, 5, true }, { r.usage.input_tokens, r.usage.output_tokens, r.usage.estimated })
      assert.are.equal(usd(500, 5), assert(resil.cost.total()))
    end)

    it("openai: a stream whose final usage has no prompt_tokens", function()
      reply = function()
        local chunk = '{"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body =
          "data: " .. chunk .. '"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":null}]}\n\n' ..
          "data: " .. chunk .. '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n' ..
          "data: " .. chunk .. '"choices":[],"usage":{"completion_tokens":40}}\n\n' .. "data: [DONE]\n\n" }
      end
      local s = assert(ai.stream({ model = "openai/gpt-4o-mini", messages = PROMPT }))
      for _ in s do end
      local r = assert(s:result())
      assert.are.same({ input, 40, true }, { r.usage.input_tokens, r.usage.output_tokens, r.usage.estimated })
      assert.are.equal(usd(input, 40), assert(resil.cost.total()))
    end)

    it("anthropic: no input_tokens is the prompt estimated, at least the cache's part it counted", function()
      reply = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
          id = "msg_noinput", type = "message", role = "assistant", model = "claude-haiku-4-5",
          content = { { type = "text", text = "hi" } }, stop_reason = "end_turn",
          usage = { output_tokens = 10, cache_read_input_tokens = 100 } }) }
      end
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = PROMPT }))
      assert.are.same({ input, 100, 10, true },
        { r.usage.input_tokens, r.usage.cached_input_tokens, r.usage.output_tokens, r.usage.estimated })
      -- haiku 4.5: $1 input, $0.10 cache reads, $5 output a million
      assert.are.equal(math.floor((input - 100) * 1 + 100 * 0.1 + 10 * 5 + 0.5) / 1e6, assert(resil.cost.total()))
    end)
  end)

  it("a malformed price is no price: nil and why, the same from pricing.price and pricing.cost", function()
    local u = { input_tokens = 1000000, output_tokens = 1000000, cached_input_tokens = 0, cache_write_tokens = 0 }
    local cases = {
      ["spec-typo"] = { price = { inptu = 1, output = 2 }, why = "unknown field 'inptu'" },
      ["spec-garbage"] = { price = { input = "abc" }, why = "input must be a number >= 0, not abc" },
      ["spec-nan"] = { price = { input = 0 / 0 }, why = "input must be a number >= 0" },
      ["spec-empty"] = { price = {}, why = "no price field" },
      ["spec-string"] = { price = "1.5", why = "not a table" },
    }
    for model, c in pairs(cases) do pricing.models.openai[model] = c.price end
    local ok, err = pcall(function()
      for model, c in pairs(cases) do
        local price, pwhy = pricing.price("openai", model)
        assert.is_nil(price)
        assert.truthy(pwhy:find(c.why, 1, true), pwhy)
        local usd, why = pricing.cost("openai", model, u)
        assert.is_nil(usd)
        assert.truthy(why:find("malformed price for openai/" .. model .. ": " .. c.why, 1, true), why)
      end
      -- a good one next to them: every field it has, and the cache prices it lacks at input's
      pricing.models.openai["spec-good"] = { input = 1, output = 2 }
      assert.are.equal(3, pricing.cost("openai", "spec-good", u))
      assert.are.equal(0.5 + 0.5 + 2, pricing.cost("openai", "spec-good", { input_tokens = 1000000,
        output_tokens = 1000000, cached_input_tokens = 500000, cache_write_tokens = 0 }))
    end)
    for model in pairs(cases) do pricing.models.openai[model] = nil end
    pricing.models.openai["spec-good"] = nil
    assert(ok, err)
  end)

  -- (pricing remembers the tables, names and numbers it has checked: what it met once and is
  -- garbage now is still no price)
  it("a price that priced calls and is made malformed since is no price; a provider's table made garbage too",
    function()
    local u = { input_tokens = 1000000, output_tokens = 1000000, cached_input_tokens = 0, cache_write_tokens = 0 }
    local models = pricing.models.openai
    local ok, err = pcall(function()
      models["spec-turns"] = { input = 1, output = 2 }
      assert.are.equal(3, pricing.cost("openai", "spec-turns", u))
      for _, c in ipairs({ { "abc", "input must be a number >= 0, not abc" }, { "1", "input must be a number >= 0, not 1" },
        { 0 / 0, "input must be a number >= 0, not NaN" }, { -1, "input must be a number >= 0, not -1" },
        { math.huge, "input must be a number >= 0, not inf" }, { {}, "input must be a number >= 0, not table" } }) do
        models["spec-turns"].input = c[1]
        local usd, why = pricing.cost("openai", "spec-turns", u)
        assert.is_nil(usd)
        assert.truthy(why:find(c[2], 1, true), why)
      end
      models["spec-turns"].input = 1
      models["spec-turns"].inptu = 1
      assert.is_nil(pricing.cost("openai", "spec-turns", u))
      models["spec-turns"].inptu = nil
      assert.are.equal(3, pricing.cost("openai", "spec-turns", u))
      models["spec-turns"] = "1.5"
      local usd, why = pricing.cost("openai", "spec-turns", u)
      assert.is_nil(usd)
      assert.truthy(why:find("not a table", 1, true), why)
      models["spec-turns"] = { input = 1, output = 2 }
      assert.is_nil(pricing.cost("openai", { "spec-turns" }, u))
      assert.is_nil(pricing.cost("openai", 42, u))
      pricing.models.openai = "spec"
      assert.is_nil(pricing.cost("openai", "spec-turns", u))
      pricing.models.openai = models
      assert.are.equal(3, pricing.cost("openai", "spec-turns", u))
    end)
    pricing.models.openai = models
    models["spec-turns"] = nil
    assert(ok, err)
  end)

  -- (the usual price is summed in C, src/flat_json.c's pricer; a price with a metatable, a unit a
  -- project replaced, a count that is no integer are summed in pricing.lua: the two must agree to the bit)
  it("a cost summed in C is the cost pricing.lua sums, to the bit, for any token prices and counts", function()
    local models = pricing.models.openai
    local FIELDS = { "input", "cached_input", "cache_write", "cache_write_1h", "output" }
    local VALUES = { 0, 1, 3, 0.15, 0.075, 2.5, 1e-7, 1234.5678, 0.1 + 0.2, 7 / 3 }
    local COUNTS = { 0, 1, 3, 7, 999, 1000000, 123456789, 2 ^ 53, -5 }
    math.randomseed(20261207)
    local n = 0
    local ok, err = pcall(function()
      for _ = 1, 3000 do
        local price = {}
        for _, f in ipairs(FIELDS) do
          if math.random() < 0.6 then price[f] = VALUES[math.random(#VALUES)] end
        end
        if next(price) then
          local usage = {}
          for _, k in ipairs({ "input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
            "output_tokens" }) do
            if math.random() < 0.8 then usage[k] = math.tointeger(COUNTS[math.random(#COUNTS)]) end
          end
          models["spec-c"] = price
          local in_c = pricing.cost("openai", "spec-c", usage)
          setmetatable(price, {}) -- (summed in pricing.lua: the same table, walked in the same order)
          local in_lua = pricing.cost("openai", "spec-c", usage)
          setmetatable(price, nil)
          assert.are.equal(in_lua, in_c, resil.json.encode({ price = price, usage = usage }))
          assert.are.equal(math.type(in_lua), math.type(in_c))
          assert.are.equal(string.pack("d", in_lua), string.pack("d", in_c),
            resil.json.encode({ price = price, usage = usage }))
          n = n + 1
        end
      end
      -- a unit a project replaced is its own, in pricing.lua
      models["spec-c"] = { input = 1, output = 2 }
      local output = pricing.units.output
      pricing.units.output = function(u) return 10 * (u.output_tokens or 0) / 1e6 end
      local replaced = pricing.cost("openai", "spec-c", { input_tokens = 1000000, output_tokens = 1000000 })
      pricing.units.output = output
      assert.are.equal(21, replaced)
      assert.are.equal(3, pricing.cost("openai", "spec-c", { input_tokens = 1000000, output_tokens = 1000000 }))
      -- a count that is no integer, and a flat price a call: pricing.lua's, as ever
      assert.are.equal(1.5 + 2, pricing.cost("openai", "spec-c", { input_tokens = 1500000.0, output_tokens = 1000000 }))
      models["spec-c"] = { per_request = 0.5, output = 2 }
      assert.are.equal(2.5, pricing.cost("openai", "spec-c", { output_tokens = 1000000 }))
    end)
    models["spec-c"] = nil
    assert(ok, err)
    assert.is_true(n > 2000, n)
  end)

  -- (a dated name's undated one is remembered; its price is read from the table each time)
  it("a dated model is priced as the table prices it now: its undated entry as it changes, or its own", function()
    local u = { input_tokens = 1000000, output_tokens = 1000000 }
    local ok, err = pcall(function()
      pricing.models.openai["spec-dated"] = { input = 1, output = 2 }
      assert.are.equal(3, pricing.cost("openai", "spec-dated-2025-01-31", u))
      pricing.models.openai["spec-dated"].output = 4
      assert.are.equal(5, pricing.cost("openai", "spec-dated-2025-01-31", u))
      pricing.models.openai["spec-dated-2025-01-31"] = { input = 10, output = 20 }
      assert.are.equal(30, pricing.cost("openai", "spec-dated-2025-01-31", u))
      pricing.models.openai["spec-dated-2025-01-31"] = nil
      pricing.models.openai["spec-dated"] = nil
      assert.is_nil(pricing.cost("openai", "spec-dated-2025-01-31", u))
      pricing.models.openai["spec-dated"] = { input = 1 }
      assert.are.equal(1, pricing.cost("openai", "spec-dated-20250131", u))
      assert.are.equal(1, pricing.cost("openai", "spec-dated-latest", u))
    end)
    pricing.models.openai["spec-dated"], pricing.models.openai["spec-dated-2025-01-31"] = nil, nil
    assert(ok, err)
  end)
end)

describe("chat over the strict mock", function()
  local m
  before_each(function()
    resil.clock.virtual()
    -- (past the providers' retry budget window, 10 s: the specs before retried in the same virtual seconds, and
    -- one whose retry it refused failed by how many came before it)
    resil.sleep(10)
    fresh_store()
    m = resil.mock.start({ strict = true, reply = "one two three four five six", cached_tokens = 4 })
    point_at(m.url)
  end)
  after_each(function() m:stop() end)

  it("answers both providers with one result shape, cost to the ledger under the response id", function()
    for _, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
      local r = assert(ai.chat({ model = model, messages = MSGS, max_tokens = 100 }))
      assert.are.equal("one two three four five six", r.text)
      assert.are.equal("stop", r.finish_reason)
      assert.are.equal(model:match("^(%w+)/"), r.provider)
      assert.are.equal(4, r.usage.cached_input_tokens)
      assert.are.equal(6, r.usage.output_tokens)
      assert.are.equal(pricing.cost(r.provider, r.model, r.usage), r.cost_usd)
      assert.is_true(r.cost_usd > 0)
      assert.is_table(r.raw)
    end
    assert.are.equal(2, ledger_rows())
  end)

  it("max_tokens cuts the answer: finish_reason length", function()
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 2 }))
    assert.are.equal("length", r.finish_reason)
    assert.are.equal(2, r.usage.output_tokens)
  end)

  -- A stop sequence the provider was not sent (Anthropic refuses a whitespace-only one, the adapter
  -- leaves it out) ends the answer all the same, as the gateway's clients already had it. (Before:
  -- ai.chat's caller got "Yes\n\nBecause the tide is high." for a stop at the blank line.)
  it("a stop sequence Anthropic was not sent ends the answer where it first appears; the call billed whole", function()
    local json = resil.json
    local sent = {}
    m:configure({ routes = { ["POST /v1/messages"] = function(req)
      sent[#sent + 1] = json.decode(req.body)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "msg_stop", type = "message", role = "assistant", model = "claude-haiku-4-5",
        content = { { type = "text", text = "Yes\n\nBecause the tide is high.\n\nEND of it" } },
        stop_reason = "end_turn", stop_sequence = json.null, usage = { input_tokens = 9, output_tokens = 12 } }) }
    end } })
    for _, stop in ipairs({ "\n\n", { "END", "\n\n" } }) do
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100, stop = stop }))
      assert.are.same({ "Yes", "stop", "stop_sequence", "\n\n" }, { r.text, r.finish_reason, r.stop_reason,
        r.stop_sequence })
      assert.are.same(type(stop) == "table" and { "END" } or nil, sent[#sent].stop_sequences)
      assert.are.equal(12, r.usage.output_tokens)
      assert.are.equal(pricing.cost(r.provider, r.model, r.usage), r.cost_usd)
    end
    -- a caller that asked an OpenAI-compatible server to write its stops (vLLM's
    -- include_stop_str_in_output) gets them as the server wrote them
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-stop", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = "Yes\n\n" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 9, completion_tokens = 2, total_tokens = 11 } }) }
    end } })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, stop = "\n\n",
      provider_options = { openai = { include_stop_str_in_output = true } } }))
    assert.are.equal("Yes\n\n", r.text)
  end)

  -- (before: each was "empty content", invalid output tried twice more and paid three times)
  it("an Anthropic stop without text (refusal, pause_turn, model_context_window_exceeded) is the answer, once", function()
    local streams, json = require "spec.provider_streams", resil.json
    local stop
    m:configure({ routes = { ["POST /v1/messages"] = function(req)
      if json.decode(req.body).stream then
        return streams.reply(streams.anthropic({ id = "msg_s", stop_reason = stop, usage = { input_tokens = 9, output_tokens = 2 } }))
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "msg_" .. stop, type = "message", role = "assistant", model = "claude-haiku-4-5",
        content = stop == "pause_turn" and { { type = "server_tool_use", id = "srvtoolu_1", name = "web_search",
          input = { query = "tides" } } } or setmetatable({}, json.array_mt),
        stop_reason = stop, stop_sequence = json.null, usage = { input_tokens = 9, output_tokens = 2 } }) }
    end } })
    local FINISH = { refusal = "content_filter", pause_turn = "pause", model_context_window_exceeded = "length" }
    for _, s in ipairs({ "refusal", "pause_turn", "model_context_window_exceeded" }) do
      stop = s
      local before = m:stats().total
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100 }))
      assert.are.equal(s, r.stop_reason)
      assert.are.equal(FINISH[s], r.finish_reason)
      assert.are.equal("", r.text)
      local st = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100 })
      assert.is_nil(st:next())
      assert.are.equal(s, assert(st:result()).stop_reason)
      st:close()
      assert.are.equal(before + 2, m:stats().total)
    end
  end)

  it("an OpenAI answer its content filter stopped, with no content (Azure's), is the answer, once", function()
    local streams, json = require "spec.provider_streams", resil.json
    m:configure({ routes = { ["POST /v1/chat/completions"] = function(req)
      if json.decode(req.body).stream then
        return streams.reply(streams.openai({ finish_reason = "content_filter", usage = { prompt_tokens = 9, completion_tokens = 0 } }))
      end
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode({
        id = "chatcmpl-f", object = "chat.completion", created = 1, model = "gpt-4o-mini", choices = { { index = 0,
          message = { role = "assistant", content = json.null }, finish_reason = "content_filter" } },
        usage = { prompt_tokens = 9, completion_tokens = 0, total_tokens = 9 } }) }
    end } })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS }))
    assert.are.equal("content_filter", r.finish_reason)
    local st = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_nil(st:next())
    assert.are.equal("content_filter", assert(st:result()).finish_reason)
    st:close()
    assert.are.equal(2, m:stats().total)
  end)

  it("falls back from OpenAI to Anthropic on 429, retries first", function()
    m:configure({ strict = true, sequence = { chat = { 429, 429, 429, 429, 429, 429, 429 } } })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS,
      fallback = { "anthropic/claude-haiku-4-5" } }))
    assert.are.equal("anthropic", r.provider)
    assert.are.equal("claude-haiku-4-5", r.model)
    assert.are.equal(6, m:stats().routes.chat) -- the first try and 5 retries
    assert.are.equal(1, m:stats().routes.messages)
  end)

  it("falls back from OpenAI to Anthropic on 529", function()
    m:configure({ strict = true, sequence = { chat = { 529, 529, 529, 529 } } })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS,
      fallback = { "anthropic/claude-haiku-4-5" } }))
    assert.are.equal("anthropic", r.provider)
    assert.are.equal(4, m:stats().routes.chat)
  end)

  -- (before: an Anthropic-sized max_tokens, 32000 or 64000, went as it was to a fallback that writes
  -- less, the API's 400 "max_tokens is too large": the fallback could never serve)
  it("a max_tokens past what a fallback's model writes is sent as its limit; the model named gets the API's 400", function()
    local seen = {}
    local function record(req) seen[#seen + 1] = resil.json.decode(req.body) end
    m:configure({ strict = true, sequence = { messages = { 529, 529, 529, 529 } }, on_request = record })
    local r = assert(ai.chat({ model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS, max_tokens = 64000,
      fallback = { "openai/gpt-4o-mini" } }))
    assert.are.equal("openai", r.provider)
    local last = seen[#seen]
    assert.are.equal(16384, last.max_tokens or last.max_completion_tokens)
    m:configure({ strict = true, sequence = { chat = { 529, 529, 529, 529 } }, on_request = record })
    r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 64000,
      fallback = { "anthropic/claude-opus-4-1-20250805" } }))
    assert.are.equal("anthropic", r.provider)
    assert.are.equal(32000, seen[#seen].max_tokens)
    local _, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 64000 })
    assert.are.equal("bad_request", err.class) -- (the model it named: the API's own answer)
    assert.matches("max_tokens is too large", tostring(err.message or err), 1, true)
  end)

  -- (before: each model a provider answered 404 for was a line and a key kept for good: a gateway's
  -- clients name what they like)
  it("a 404 for the model is warned about for 100 models, then once for all the others", function()
    m:configure({ faults = { { route = "chat", probability = 1, status = 404 } } })
    local lines = helpers.logged(function()
      for i = 1, 130 do ai.chat({ model = "openai/spec-missing-" .. i, messages = MSGS }) end
    end)
    local one, all = 0, 0
    for _, l in ipairs(lines) do
      if l.msg:find("answered 404 for this model", 1, true) then one = one + 1 end
      if l.msg:find("more models answered 404", 1, true) then all = all + 1 end
    end
    assert.are.same({ 100, 1 }, { one, all })
  end)

  -- (before: a misspelt option was ignored without a word, the provider left on its defaults)
  it("ai.configure says an option it does not read, where it was given", function()
    local lines = helpers.logged(function()
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY, retrys = { base = 1 } })
    end)
    point_at(m.url)
    local said
    for _, l in ipairs(lines) do if l.option == "retrys" then said = l end end
    assert.is_not_nil(said, "no warning")
    assert.are.equal("warn", said.level)
    assert.matches("ai_spec%.lua:%d+$", said.where)
    lines = helpers.logged(function() point_at(m.url) end)
    for _, l in ipairs(lines) do assert.is_nil(l.option, l.msg) end
  end)

  -- (before: the fallback's missing key failed every call, the primary's good answers too)
  it("a fallback whose key is missing is left out, said once; the primary still answers and still fails as itself", function()
    ai.configure("anthropic", { base_url = m.url, api_key_env = "RESIL_SPEC_UNSET_ANTHROPIC_KEY" })
    local r, none, err
    local lines = helpers.logged(function()
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, fallback = { "anthropic/claude-haiku-4-5" } }))
      m:configure({ strict = true, sequence = { chat = { 529, 529, 529, 529 } } })
      none, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, fallback = { "anthropic/claude-haiku-4-5" } })
    end)
    assert.are.equal("openai", r.provider)
    assert.is_nil(none)
    assert.are.equal("overloaded", err.class)
    assert.are.equal(0, m:stats().routes.messages or 0)
    local warned = 0
    for _, rec in ipairs(lines) do
      if tostring(rec.msg):find("RESIL_SPEC_UNSET_ANTHROPIC_KEY is not set", 1, true) then warned = warned + 1 end
    end
    assert.are.equal(1, warned)
    -- the model's own key missing still refuses the call, before anything is sent
    local before = m:stats().total
    local _, kerr = ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, fallback = { "openai/gpt-4o-mini" } })
    assert.are.equal("missing_secret", kerr.kind)
    assert.are.equal(before, m:stats().total)
  end)

  -- (before: its error names no variable, and the warning's once-per-variable table was indexed
  -- by nil: every call raised "table index is nil", the primary's good answers too)
  it("a fallback whose provider names no key variable is left out as a keyless one, not a raise", function()
    local adapter = {}
    for k, v in pairs(openai) do adapter[k] = v end
    adapter.name, adapter.key_env = "spec_nokeyvar", nil -- (a provider file of the project's, for a local server)
    ai.adapters.spec_nokeyvar = adapter
    local ok, r, err = pcall(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS,
      fallback = { "spec_nokeyvar/some-model" } })
    ai.adapters.spec_nokeyvar = nil
    assert.is_true(ok, tostring(r))
    assert.is_nil(err)
    assert.are.equal("openai", r.provider)
  end)

  it("insufficient_quota is never retried, and falls back", function()
    m:configure({ strict = true, sequence = { chat = { { status = 429, error_type = "insufficient_quota",
      error_code = "insufficient_quota" } } } })
    local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_nil(r)
    assert.are.equal("quota", err.class)
    assert.are.equal(1, m:stats().routes.chat)
  end)

  it("an Anthropic 429 without retry-after (a spend limit) is not retried; x-should-retry: false neither", function()
    m:configure({ strict = true, sequence = { messages = { { status = 429, retry_after = false },
      { status = 529, should_retry = false } } } })
    local _, err = ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
    assert.are.equal("quota", err.class)
    local _, err2 = ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
    assert.are.equal("overloaded", err2.class)
    assert.are.equal(2, m:stats().routes.messages)
  end)

  -- (before: the 402 a client_error, the 400 a bad_request, neither fallen back from: an account
  -- out of credit failed every call that had a fallback to serve it)
  it("Anthropic's billing_error (402) and 'credit balance is too low' (400) are quota: not retried, fallen back from",
    function()
    m:configure({ strict = true, sequence = { messages = { { status = 402 }, { status = 400,
      error_type = "invalid_request_error", message = "Your credit balance is too low to access the Anthropic API. "
        .. "Please go to Plans & Billing to upgrade or purchase credits." } } } })
    for _ = 1, 2 do
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100,
        fallback = { "openai/gpt-4.1" } }))
      assert.are.equal("gpt-4.1", r.model)
    end
    assert.are.equal(2, m:stats().routes.messages)
    m:configure({ strict = true, sequence = { messages = { { status = 402 } } } })
    local _, err = ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100 })
    assert.are.equal("quota", err.class)
  end)

  it("context_length_exceeded falls back to the next model without retrying", function()
    m:configure({ strict = true, sequence = { chat = { { status = 400, error_code = "context_length_exceeded",
      error_type = "invalid_request_error" } } } })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, fallback = { "openai/gpt-4.1" } }))
    assert.are.equal("gpt-4.1", r.model)
    assert.are.equal(2, m:stats().routes.chat)
  end)

  -- (before: a bad_request, not fallen back from; Anthropic names it in its message only)
  it("Anthropic's 'prompt is too long' is context_length: falls back to the next model without retrying", function()
    m:configure({ strict = true, sequence = { messages = { { status = 400, error_type = "invalid_request_error",
      message = "prompt is too long: 210000 tokens > 200000 maximum" } } } })
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100,
      fallback = { "openai/gpt-4.1" } }))
    assert.are.equal("gpt-4.1", r.model)
    assert.are.equal(1, m:stats().routes.messages)
  end)

  it("the rate-limit headers feed the provider's buckets", function()
    m:configure({ strict = true, rate_limits = { requests = 2 } })
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY,
      rate = { rate = 1000, per = 60, name = "ai-spec:requests" } })
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS }))
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS }))
    assert.is_true(resil.bucket("ai-spec:requests", { rate = 1000, per = 60 }):state().paused_for > 0)
  end)

  it("a budget reserves the estimate and settles the actual cost", function()
    local b = resil.budget("ai-spec", { limit = 1 })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, budget = "ai-spec" }))
    local st = b:state()
    assert.are.equal(0, st.reserved)
    assert.is_true(math.abs(st.spent - r.cost_usd) < 1e-6)
    assert.are.equal(1, ledger_rows())
  end)

  it("an upstream that reuses response ids (Ollama's): each answer is a row and counts in its budget; " ..
     "only a replay under one Idempotency-Key is kept once", function()
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "chatcmpl-1", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = "hi" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 1000, completion_tokens = 1000, total_tokens = 2000 } }) }
    end } })
    local b = resil.budget("ai-spec-sameid", { limit = 1 })
    local usd = 0
    for _ = 1, 3 do
      usd = usd + assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "ai-spec-sameid" })).cost_usd
    end
    assert.are.equal(3, ledger_rows())
    assert.is_true(math.abs(b:state().spent - usd) < 1e-6, tostring(b:state().spent))
    -- the same answer twice for one key, the key sent to the provider, is its replay: billed once
    assert(resil.once("replayed-call", function()
      for _ = 1, 2 do
        assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, idempotency = true }))
      end
      return true
    end))
    assert.are.equal(4, ledger_rows())
    -- a provider that was not sent the key cannot replay: two answers that reuse an id are two charges
    assert(resil.once("key-not-sent", function()
      for _ = 1, 2 do assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })) end
      return true
    end))
    assert.are.equal(6, ledger_rows())
  end)

  it("tool call arguments that are not JSON are the model's garbage (invalid output), unless cut at max_tokens",
    function()
      local finish, args = "tool_calls", '{"city": "Par'
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
          id = "chatcmpl-badargs", object = "chat.completion", created = 1, model = "gpt-4o-mini",
          choices = { { index = 0, finish_reason = finish, message = { role = "assistant", content = resil.json.null,
            tool_calls = { { id = "call_1", type = "function",
              ["function"] = { name = "lookup", arguments = args } } } } } },
          usage = { prompt_tokens = 5, completion_tokens = 5, total_tokens = 10 } }) }
      end } })
      local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, retry = { max_retries = 1 } })
      assert.is_nil(r)
      assert.are.equal("invalid_output", err.kind)
      assert.matches("lookup", tostring(err))
      finish = "length" -- cut by max_tokens: the client gets what there is
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
      assert.are.equal('{"city": "Par', r.tool_calls[1].arguments)
      finish = "tool_calls"
      for _, not_object in ipairs({ "[1, 2]", "[]" }) do -- JSON, not an object (`[]` was taken for `{}`)
        args = not_object
        assert.are.equal("invalid_output", select(2, ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS,
          max_tokens = 100, retry = { max_retries = 1 } })).kind, not_object)
      end
      args = "" -- what some compatible servers send for a tool without parameters: no arguments
      assert.are.equal("{}", assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS,
        max_tokens = 100 })).tool_calls[1].arguments)
    end)

  -- (before: 'attempt to index a userdata value' raised out of ai.chat, the answer paid for and never recorded)
  it("an OpenAI tool call that is null, or whose function is null or a number, is invalid output, tried again",
    function()
      local bad
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        local calls = bad and { bad } or nil
        bad = nil -- (the retry gets a good answer)
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
          id = "chatcmpl-badcall", object = "chat.completion", created = 1, model = "gpt-4o-mini",
          choices = { { index = 0, finish_reason = calls and "tool_calls" or "stop", message = { role = "assistant",
            content = calls and resil.json.null or "fine", tool_calls = calls } } },
          usage = { prompt_tokens = 5, completion_tokens = 5, total_tokens = 10 } }) }
      end } })
      for _, call in ipairs({ resil.json.null, 5, { id = "call_1", type = "function", ["function"] = resil.json.null },
                              { id = "call_1", type = "function", ["function"] = 5 } }) do
        bad = call
        local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
        assert.are.equal("fine", r.text)
        assert.are.equal(2, r.attempts)
      end
    end)

  -- (before: 'attempt to index a userdata value (local 'c')' raised out of ai.chat, the answer paid for)
  it("an OpenAI answer to n = 2 whose second choice is null or a number is the first's text, and no raise", function()
    local second
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "chatcmpl-n2", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, finish_reason = "stop", message = { role = "assistant", content = "fine" } }, second },
        usage = { prompt_tokens = 5, completion_tokens = 5, total_tokens = 10 } }) }
    end } })
    for _, c in ipairs({ resil.json.null, 5 }) do
      second = c
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, n = 2 }))
      assert.are.same({ "fine", "" }, r.choices)
    end
  end)

  -- (before: 'invalid value (at index 1) in table for concat' raised out of ai.chat, the answer paid for and
  -- never recorded; a number was taken for the text, "5.0")
  it("an Anthropic text block whose text is null, a number or an object is invalid output, tried again", function()
    local bad
    m:configure({ routes = { ["POST /v1/messages"] = function()
      local text = bad or "fine"
      bad = nil -- (the retry gets a good answer)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "msg_badtext", type = "message", role = "assistant", model = "claude-haiku-4-5",
        content = { { type = "text", text = text } }, stop_reason = "end_turn", stop_sequence = resil.json.null,
        usage = { input_tokens = 5, output_tokens = 5 } }) }
    end } })
    for _, text in ipairs({ resil.json.null, 5, { a = 1 }, true }) do
      bad = text
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 100 }))
      assert.are.equal("fine", r.text)
      assert.are.equal(2, r.attempts)
    end
  end)

  -- (before: a 3xx was taken for an answer and ai.chat, ai.embed raised 'attempt to index a nil value (local 'r')')
  it("a redirect (an http:// base_url moved to https://, a proxy's login) is the call's failure, saying where to",
    function()
      local moved = { status = 301, headers = { location = "https://api.example/v1/chat/completions" }, body = "" }
      m:configure({ strict = true, reply = "fine", sequence = { chat = { moved, moved }, embeddings = { moved } } })
      local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS })
      assert.is_nil(r)
      assert.are.equal("redirect", err.kind)
      assert.matches("HTTP 301: redirected to https://api.example/", err.message, 1, true)
      assert.are.equal(1, m:stats().routes.chat) -- not tried again: the configuration's to fix
      r, err = ai.embed({ model = "openai/text-embedding-3-small", input = "x" })
      assert.is_nil(r)
      assert.are.equal("redirect", err.kind)
      -- another provider serves
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, fallback = { "anthropic/claude-haiku-4-5" } }))
      assert.are.equal("anthropic", r.provider)
      -- without a validator a 3xx is what the caller asked for, as before
      assert.is_nil(require("policies.classify").outcome({ status = 304, headers = {} }, nil))
    end)

  it("a budgeted call without max_tokens is sent the max_tokens its budget reserved; others are not", function()
    local seen
    m:configure({ routes = { ["POST /v1/chat/completions"] = function(req)
      seen = resil.json.decode(req.body)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "chatcmpl-cap", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = "hi" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 5, completion_tokens = 1, total_tokens = 6 } }) }
    end } })
    resil.budget("ai-spec-cap", { limit = 1 })
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, budget = "ai-spec-cap" }))
    assert.are.equal(4096, seen.max_completion_tokens or seen.max_tokens)
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS }))
    assert.is_nil(seen.max_completion_tokens or seen.max_tokens)
  end)

  -- (before: its row had no price and its budget was settled at 0, so a budget let through every
  -- such call it could hold one at a time: a $0.001 budget, five calls of $0.0008)
  it("a budgeted answer without usage (some OpenAI-compatible servers) is estimated, and spends its budget",
    function()
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
          id = "chatcmpl-nousage", object = "chat.completion", created = 1, model = "gpt-4o-mini",
          choices = { { index = 0, message = { role = "assistant", content = "hi" }, finish_reason = "stop" } } }) }
      end } })
      local long = { { role = "user", content = string.rep("word ", 4000) } } -- about 5,000 tokens
      local b = resil.budget("ai-spec-nousage", { limit = 0.001 })
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = long, max_tokens = 100,
        budget = "ai-spec-nousage" }))
      local input = pricing.estimate_tokens(resil.json.encode(long))
      assert.are.same({ input, 1, true }, { r.usage.input_tokens, r.usage.output_tokens, r.usage.estimated })
      local usd = math.floor(input * 0.15 + 1 * 0.60 + 0.5) / 1e6 -- gpt-4o-mini, in whole micro-dollars
      assert.are.same({ usd, 0 }, { b:state().spent, b:state().reserved })
      local by = assert(resil.cost.breakdown("model"))
      assert.are.same({ { key = "gpt-4o-mini", usd = usd, calls = 1 } }, by)
      -- the next is refused: what is left cannot hold it
      local _, err = ai.chat({ model = "openai/gpt-4o-mini", messages = long, max_tokens = 100, budget = "ai-spec-nousage" })
      assert.are.equal("budget_exceeded", err and err.kind)
    end)

  -- (before: a count it could not read was taken as 0, so the call was priced $0 and wrote no row;
  -- then a row without a price, its budget settled at 0; now estimated, as no usage is)
  for _, case in ipairs({ { name = "negative counts", openai = '"prompt_tokens":-5,"completion_tokens":-3',
                            anthropic = '"input_tokens":-5,"output_tokens":-3' },
                          { name = "counts as strings", openai = '"prompt_tokens":"12","completion_tokens":"3"',
                            anthropic = '"input_tokens":"12","output_tokens":"3"' },
                          { name = "a count past any number", openai = '"prompt_tokens":1e400,"completion_tokens":3',
                            anthropic = '"input_tokens":1e400,"output_tokens":3' },
                          { name = "no counts", openai = '"total_tokens":15', anthropic = '"service_tier":"standard"' } }) do
    it("an answer whose usage has " .. case.name .. " has its ledger row, estimated, in its budget", function()
      m:configure({ routes = {
        ["POST /v1/chat/completions"] = function()
          return { status = 200, headers = { ["content-type"] = "application/json" }, body = '{"id":"chatcmpl-u",' ..
            '"object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":' ..
            '{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{' .. case.openai .. '}}' }
        end,
        ["POST /v1/messages"] = function()
          return { status = 200, headers = { ["content-type"] = "application/json" }, body = '{"id":"msg_u",' ..
            '"type":"message","role":"assistant","model":"claude-haiku-4-5-20251001","content":[{"type":"text",' ..
            '"text":"hi"}],"stop_reason":"end_turn","usage":{' .. case.anthropic .. '}}' }
        end } })
      local b = resil.budget("ai-spec-bad-usage", { limit = 1 })
      for _, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5-20251001" }) do
        local r = assert(ai.chat({ model = model, messages = MSGS, max_tokens = 100, budget = "ai-spec-bad-usage" }))
        assert.is_true(r.cost_usd > 0, model)
        assert.are.same({ pricing.estimate_tokens(resil.json.encode(MSGS)), 1, true },
          { r.usage.input_tokens, r.usage.output_tokens, r.usage.estimated })
      end
      assert.are.equal(2, ledger_rows())
      local unpriced, usd = 0, 0
      for _, g in ipairs(assert(resil.cost.breakdown("model"))) do unpriced, usd = unpriced + (g.unpriced or 0), usd + g.usd end
      assert.are.equal(0, unpriced)
      assert.are.same({ usd, 0 }, { b:state().spent, b:state().reserved })
    end)
  end

  -- (before: 1e7 searches to a max_uses of 5 were $100,000 in a $1 budget, and 1e300 a row without a
  -- price that spent nothing of it)
  it("an answer reporting more web searches than the request's max_uses is recorded at max_uses, said", function()
    local searches
    m:configure({ routes = { ["POST /v1/messages"] = function()
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "msg_ws_" .. tostring(searches), type = "message", role = "assistant", model = "claude-haiku-4-5",
        content = { { type = "text", text = "found it" } }, stop_reason = "end_turn",
        usage = { input_tokens = 50, output_tokens = 10, server_tool_use = { web_search_requests = searches } } }) }
    end } })
    local b = resil.budget("ai-spec-searches", { limit = 1 })
    local tools = { { type = "web_search_20250305", name = "web_search", max_uses = 5 } }
    local each = math.floor(50 * 1.00 + 10 * 5.00 + 0.5) / 1e6 -- claude-haiku-4-5's tokens
    local lines = {}
    for i, n in ipairs({ 3, 1e7, 1e300 }) do
      searches = n
      local said = helpers.logged(function()
        local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", budget = b, max_tokens = 100, tools = tools,
          messages = MSGS }))
        assert.are.equal(math.min(n, 5), r.usage.web_search_requests, i)
      end)
      for _, l in ipairs(said) do lines[#lines + 1] = l end
    end
    local usd = 3 * each + (3 + 5 + 5) * 0.01
    assert.is_true(math.abs(b:state().spent - usd) < 1e-9, tostring(b:state().spent))
    assert.is_true(math.abs(resil.cost.total() - usd) < 1e-9)
    local capped = 0
    for _, l in ipairs(lines) do if tostring(l.msg):find("more web searches", 1, true) then capped = capped + 1 end end
    assert.are.equal(2, capped)
  end)

  -- (before: a search tool without max_uses, on a call without a budget, took any count: 1e7 searches
  -- were a $100,000 row)
  it("an answer reporting more web searches than any call runs, to a tool without max_uses, is recorded at that most",
    function()
      local searches
      m:configure({ routes = { ["POST /v1/messages"] = function()
        return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
          id = "msg_wsn_" .. tostring(searches), type = "message", role = "assistant", model = "claude-haiku-4-5",
          content = { { type = "text", text = "found it" } }, stop_reason = "end_turn",
          usage = { input_tokens = 50, output_tokens = 10, server_tool_use = { web_search_requests = searches } } }) }
      end } })
      local tools = { { type = "web_search_20250305", name = "web_search" } }
      local each = math.floor(50 * 1.00 + 10 * 5.00 + 0.5) / 1e6 -- claude-haiku-4-5's tokens
      local capped = 0
      for i, n in ipairs({ 30, 1e7 }) do
        searches = n
        local said = helpers.logged(function()
          local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 100, tools = tools,
            messages = MSGS }))
          assert.are.equal(math.min(n, 1000), r.usage.web_search_requests, i)
        end)
        for _, l in ipairs(said) do if tostring(l.msg):find("more web searches", 1, true) then capped = capped + 1 end end
      end
      local usd = 2 * each + (30 + 1000) * 0.01
      assert.is_true(math.abs(resil.cost.total() - usd) < 1e-9, tostring(resil.cost.total()))
      assert.are.equal(1, capped)
    end)

  -- (before: a server that reports no usage had each of its refused answers paid and none counted:
  -- three attempts on a 2,000-token prompt, one row and one attempt in the budget)
  it("answers refused as invalid output that report no usage are estimated, each a row in the budget", function()
    local n = 0
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "chatcmpl-nousage-" .. n, object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = n <= 2 and "" or "hello" },
          finish_reason = "stop" } } }) }
    end } })
    local long = { { role = "user", content = string.rep("word ", 2000) } }
    local b = resil.budget("ai-spec-refused-nousage", { limit = 1 })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = long, max_tokens = 50,
      budget = "ai-spec-refused-nousage" }))
    assert.are.equal(3, r.attempts)
    assert.are.equal(3, ledger_rows())
    local input = pricing.estimate_tokens(resil.json.encode(long))
    assert.is_true(r.cost_usd > 3 * input * 0.15 / 1e6, tostring(r.cost_usd)) -- three prompts at least
    assert.is_true(math.abs(b:state().spent - r.cost_usd) < 1e-9)
    assert.is_true(math.abs(assert(resil.cost.total()) - r.cost_usd) < 1e-9)
  end)

  -- (before: a stream that ended empty without usage was refused, paid and never counted: three
  -- attempts on one prompt, one row in the ledger and one in the budget)
  it("streams refused as empty (invalid output) that report no usage are estimated, each a row in the budget",
    function()
      local streams, n = require "spec.provider_streams", 0
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        n = n + 1
        return { status = 200, headers = { ["content-type"] = "text/event-stream" },
          body = streams.openai({ id = "chatcmpl-s-nousage-" .. n, content = n <= 2 and "" or "hello" }) }
      end } })
      local long = { { role = "user", content = string.rep("word ", 2000) } }
      local b = resil.budget("ai-spec-refused-stream-nousage", { limit = 1 })
      local s = assert(ai.stream({ model = "openai/gpt-4o-mini", messages = long, max_tokens = 50, budget = b }))
      for _ in s do end
      local r = assert(s:result())
      assert.are.equal(3, n)
      assert.are.equal(3, ledger_rows())
      local input = pricing.estimate_tokens(resil.json.encode(long))
      assert.is_true(r.cost_usd > 3 * input * 0.15 / 1e6, tostring(r.cost_usd)) -- three prompts at least
      assert.is_true(math.abs(b:state().spent - r.cost_usd) < 1e-9)
      assert.is_true(math.abs(assert(resil.cost.total()) - r.cost_usd) < 1e-9)
    end)

  -- a 200 the validator refuses (no choices), but billed: it says what it used
  local function refused_answer(id)
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = id, object = "chat.completion", created = 1, model = "gpt-4o-mini", choices = {},
      usage = { prompt_tokens = 1000, completion_tokens = 90, total_tokens = 1090 } }) }
  end
  local function good_answer(id)
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = id, object = "chat.completion", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, message = { role = "assistant", content = "hi" }, finish_reason = "stop" } },
      usage = { prompt_tokens = 1000, completion_tokens = 10, total_tokens = 1010 } }) }
  end

  -- the call's whole cost is in the ledger and spent in its budget, nothing left held
  local function assert_all_spent(b, usd)
    assert.is_true(math.abs(resil.cost.total({}) - usd) <= 2e-6)
    local st = b:state()
    assert.are.equal(0, st.reserved)
    assert.is_true(math.abs(st.spent - usd) <= 2e-6, tostring(st.spent))
  end

  it("answers refused as invalid output were billed: each is a ledger row, in the budget and the call's cost_usd",
    function()
      local n = 0
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        n = n + 1
        if n <= 2 then return refused_answer("chatcmpl-refused-" .. n) end
        return good_answer("chatcmpl-good")
      end } })
      local b = resil.budget("ai-spec-refused", { limit = 1 })
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "ai-spec-refused" }))
      assert.are.equal(3, r.attempts)
      local each = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 90 })
      local answer = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 10 })
      assert.is_true(math.abs(r.cost_usd - (2 * each + answer)) < 1e-9, tostring(r.cost_usd))
      assert.are.equal(3, ledger_rows())
      assert_all_spent(b, r.cost_usd)
    end)

  it("a call that failed on refused answers only still records what they cost", function()
    local n = 0
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      return refused_answer("chatcmpl-refused-" .. n)
    end } })
    local b = resil.budget("ai-spec-refused-all", { limit = 1 })
    local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      budget = "ai-spec-refused-all", retry = { max_retries = 1 } })
    assert.is_nil(r)
    assert.are.equal("invalid_output", err.kind)
    local each = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 90 })
    assert.is_true(math.abs(err.cost_usd - 2 * each) < 1e-9, tostring(err.cost_usd))
    assert.are.equal(2, ledger_rows())
    assert.are.same({ 0 }, { b:state().reserved })
    assert.is_true(math.abs(b:state().spent - 2 * each) <= 2e-6)
  end)

  -- (the gateway's, for a client that left: a call nobody waits for makes no new attempt)
  it("give_up: once it says a reason, the attempt under way is the last: its refused answer is recorded (it " ..
    "was billed), no retry or fallback follows, the hold is given back", function()
    local n, gone = 0, false
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      gone = true -- (the caller left while the provider answered)
      return refused_answer("chatcmpl-refused-" .. n)
    end } })
    local b = resil.budget("ai-spec-given-up", { limit = 1 })
    local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      fallback = { "anthropic/claude-haiku-4-5" }, budget = "ai-spec-given-up",
      give_up = function() return gone and "client_left" end })
    assert.is_nil(r)
    assert.are.equal("invalid_output", err.class)
    assert.are.equal("client_left", err.gave_up)
    assert.are.equal(1, m:stats().total)
    local each = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 90 })
    assert.are.equal(1, ledger_rows())
    assert.are.same({ 0 }, { b:state().reserved })
    assert.is_true(math.abs(b:state().spent - each) <= 2e-6)
    assert.has_error(function() ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, give_up = true }) end)
  end)

  -- (before: the cut answer was retried and never recorded: the provider billed two answers, the ledger
  -- and the budget saw one)
  it("an answer whose body was cut after its 200 was billed: a row of its own, estimated, in the budget", function()
    m:configure({ sequence = { chat = { "truncate" } } })
    local b = resil.budget("ai-spec-cut", { limit = 1 })
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, budget = "ai-spec-cut" }))
    assert.are.equal(2, r.attempts)
    assert.are.equal(2, m:stats().billed.responses)
    assert.are.equal(2, ledger_rows())
    local answer = pricing.cost("openai", "gpt-4o-mini", r.usage)
    local cut = r.cost_usd - answer
    -- its input estimated from the request, its output at least the half body the mock sent (4 bytes a token)
    local least = pricing.cost("openai", "gpt-4o-mini", { input_tokens = math.ceil(#resil.json.encode(MSGS) / 4),
      output_tokens = 1 })
    assert.is_true(cut >= least, ("cut answer priced at %s"):format(cut))
    assert_all_spent(b, r.cost_usd)
  end)

  -- A 200 whose body stops half way (the rest never comes), then the caller gives up: the provider made
  -- and billed the answer.
  local function stalled_answer()
    local body = good_answer("chatcmpl-stalled").body
    return { status = 200, headers = { ["content-type"] = "application/json" },
      chunks = { body:sub(1, 60), body:sub(61) }, stall_after = 1 }
  end

  -- (before: a call canceled after its 200, while the body was read, gave its hold back and recorded
  -- nothing, though the provider billed it)
  it("a call canceled while its answer's body is read was billed: a row at its estimate, its hold given back",
    function()
      m:configure({ routes = { ["POST /v1/chat/completions"] = stalled_answer } })
      local b = resil.budget("ai-spec-cancel-body", { limit = 1 })
      local t = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "ai-spec-cancel-body" })
      assert.is_true(helpers.wait_until(function() return m:stats().total == 1 end, 10))
      helpers.wait_until(function() return false end, 0.3) -- (the 200 and the first half reach the client)
      assert.are.equal(1, #b:state().holds)
      t:cancel()
      assert.is_true(helpers.wait_until(function() return ledger_rows() == 1 and b:state().reserved == 0 end, 10))
      local usd = resil.cost.total({})
      local least = pricing.cost("openai", "gpt-4o-mini", { input_tokens = math.ceil(#resil.json.encode(MSGS) / 4),
        output_tokens = 1 })
      assert.is_true(usd >= least, ("canceled answer priced at %s"):format(usd))
      assert.is_true(math.abs(b:state().spent - usd) <= 2e-6)
      -- one canceled before its status came was not answered: nothing recorded, the hold given back
      m:configure({ sequence = { chat = { "hang" } } })
      local t2 = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "ai-spec-cancel-body" })
      assert.is_true(helpers.wait_until(function() return m:stats().total == 2 end, 10))
      t2:cancel()
      assert.is_true(helpers.wait_until(function() return b:state().reserved == 0 end, 10))
      assert.are.equal(1, ledger_rows())
    end)

  it("a deadline that cuts a call while its answer's body is read records the answer, once", function()
    m:configure({ routes = { ["POST /v1/chat/completions"] = stalled_answer } })
    local r, err = resil.timeout(5, ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
    assert.is_nil(r)
    assert.are.equal("timeout", err.kind)
    assert.is_true(helpers.wait_until(function() return ledger_rows() == 1 end, 10))
    helpers.wait_until(function() return false end, 0.2)
    assert.are.equal(1, ledger_rows())
    assert.is_true(resil.cost.total({}) > 0)
  end)

  -- (before: its input was estimated from the messages alone: a long system prompt and tools, billed, were not)
  it("a cut answer's input is estimated from its system prompt and tools too", function()
    m:configure({ sequence = { chat = { "truncate" } } })
    local system = ("Be brief and exact. "):rep(200) -- 4,000 bytes: 1,000 tokens
    local tools = { { type = "function", ["function"] = { name = "lookup", description = ("Looks it up. "):rep(160),
      parameters = { type = "object", properties = {} } } } } -- 2,000 bytes and more
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, system = system, tools = tools,
      max_tokens = 100 }))
    assert.are.equal(2, m:stats().billed.responses)
    local cut = r.cost_usd - pricing.cost("openai", "gpt-4o-mini", r.usage)
    local least = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1500 })
    assert.is_true(cut >= least, ("cut answer priced at %s, its input at least %s"):format(cut, least))
  end)

  -- (before: each such estimate past max_tokens wrote an error line, as if the provider had reported it)
  it("a cut answer's output estimated past max_tokens is recorded at max_tokens, without an error line", function()
    m:configure({ reply = ("word "):rep(20), sequence = { chat = { "truncate" } } })
    local r
    local lines = helpers.logged(function()
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 20 }))
    end)
    for _, l in ipairs(lines) do assert.are_not.equal("error", l.level, resil.json.encode(l)) end
    local cut = r.cost_usd - pricing.cost("openai", "gpt-4o-mini", r.usage)
    local most = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 100, output_tokens = 20 })
    assert.is_true(cut > 0 and cut <= most, tostring(cut))
  end)

  it("a call that fails on cut answers only still records them; one whose key the provider replays is one charge",
    function()
      m:configure({ sequence = { chat = { "truncate", "truncate" } } })
      local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        retry = { max_retries = 1 } })
      assert.is_nil(r)
      assert.are.equal("reset", err.kind)
      assert.are.equal(2, m:stats().billed.responses)
      assert.are.equal(2, ledger_rows())
      assert.is_true(err.cost_usd > 0 and math.abs(resil.cost.total({}) - err.cost_usd) <= 2e-6)
      -- a provider that honours Idempotency-Key kept the answer it made: the retry gets it again, unbilled
      m:configure({ idempotency = true, sequence = { chat = { "truncate" } } })
      assert(resil.once("ai-spec-cut-replayed", function()
        return ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, idempotency = true })
      end))
      assert.are.equal(1, m:stats().replayed)
      assert.are.equal(3, m:stats().billed.responses)
      assert.are.equal(3, ledger_rows())
    end)

  -- (before: a cut answer sent with a key was left out for its replay, which never came when the call failed
  -- on it or fell back to another provider: billed, in no ledger)
  it("a cut answer sent with a key that no replay followed (the call failed, fell back) is still its charge",
    function()
      m:configure({ idempotency = true, sequence = { chat = { "truncate" } } })
      local b = resil.budget("ai-spec-cut-keyed", { limit = 1 })
      local r, err = resil.once("ai-spec-cut-failed", function()
        return ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, idempotency = true,
          retry = { max_retries = 0 }, budget = "ai-spec-cut-keyed" })
      end)
      assert.is_nil(r)
      assert.are.equal("reset", err.kind)
      assert.are.equal(1, m:stats().billed.responses)
      assert.are.equal(1, ledger_rows())
      assert.is_true(err.cost_usd > 0 and math.abs(resil.cost.total({}) - err.cost_usd) <= 2e-6)
      assert.is_true(math.abs(b:state().spent - err.cost_usd) <= 2e-6)
      -- cut, then answered by the fallback, another provider: two answers billed, two rows
      m:configure({ idempotency = true, sequence = { chat = { "truncate" } } })
      r = assert(resil.once("ai-spec-cut-fell-back", function()
        return ai.chat({ model = "openai/gpt-4o-mini", fallback = { "anthropic/claude-haiku-4-5" }, messages = MSGS,
          max_tokens = 100, idempotency = true, retry = { max_retries = 0 } })
      end))
      assert.are.equal("anthropic", r.provider)
      assert.are.equal(3, m:stats().billed.responses)
      assert.are.equal(3, ledger_rows())
      assert.is_true(r.cost_usd > pricing.cost("anthropic", r.model, r.usage))
    end)

  it("a call canceled after a refused answer records that answer and gives its hold back", function()
    local n = 0
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      if n == 1 then return refused_answer("chatcmpl-refused-1") end
      return { action = "hang" }
    end } })
    local b = resil.budget("ai-spec-refused-cancel", { limit = 1 })
    local t = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      budget = "ai-spec-refused-cancel" })
    resil.sleep(2) -- refused once, the retry waiting for its answer
    assert.are.equal(2, n)
    t:cancel()
    resil.sleep(0.1) -- the record and the release are tasks of their own
    local each = pricing.cost("openai", "gpt-4o-mini", { input_tokens = 1000, output_tokens = 90 })
    assert.are.equal(1, ledger_rows())
    assert.are.equal(0, b:state().reserved)
    assert.is_true(math.abs(b:state().spent - each) <= 2e-6)
  end)

  -- (an input count past any model's context is recorded at the request's estimate, and said: it was
  -- a row without a price, beside a $1e6 bound a 3e12 count stayed under)
  it("a refused answer whose input count no model reads is recorded at the request's estimate: the call still answers",
    function()
      local n = 0
      m:configure({ routes = { ["POST /v1/chat/completions"] = function()
        n = n + 1
        if n == 1 then
          local res = refused_answer("chatcmpl-huge")
          res.body = res.body:gsub('"prompt_tokens":1000', '"prompt_tokens":1e17')
          return res
        end
        if n == 2 then -- more cached tokens than input ones: priced as all cached, not below zero
          local res = refused_answer("chatcmpl-cached")
          res.body = res.body:gsub('"prompt_tokens":1000', '"prompt_tokens":1000,"prompt_tokens_details":{"cached_tokens":5000}')
          return res
        end
        return good_answer("chatcmpl-good")
      end } })
      local b = resil.budget("ai-spec-refused-huge", { limit = 1 })
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "ai-spec-refused-huge" }))
      assert.is_true(r.cost_usd > 0 and r.cost_usd < 0.01, tostring(r.cost_usd)) -- (1e17 tokens were $15 billion)
      assert.are.equal(3, ledger_rows())
      local by = assert(resil.cost.breakdown("model"))
      assert.are.equal(0, by[1].unpriced or 0)
      local st = b:state()
      assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
      assert.is_true(math.abs(st.spent - resil.cost.total({})) <= 2e-6)
    end)

  it("inside resil.once, an answer replayed with the same id is one charge: in the ledger and in cost_usd", function()
    local n = 0
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      if n <= 2 then return refused_answer("chatcmpl-same") end
      return good_answer("chatcmpl-same")
    end } })
    local r = assert(resil.once("ai-spec-same-id", function()
      return ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, idempotency = true })
    end))
    assert.are.equal(3, n)
    assert.are.equal(1, ledger_rows())
    assert.is_true(math.abs(r.cost_usd - resil.cost.total({})) <= 2e-6, tostring(r.cost_usd))
    -- (before: the same without the key sent upstream, as the gateway calls, was one charge too,
    -- though a provider that never saw the key bills each answer)
    n = 0
    local before = resil.cost.total({})
    r = assert(resil.once("ai-spec-same-id-not-sent", function()
      return ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
    end))
    assert.are.equal(3, n)
    assert.are.equal(4, ledger_rows())
    assert.is_true(math.abs(r.cost_usd - (resil.cost.total({}) - before)) <= 4e-6, tostring(r.cost_usd))
  end)

  it("refused answers of a model without a price: the call's cost is unknown, never $0", function()
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      local res = refused_answer("chatcmpl-x")
      res.body = res.body:gsub('"gpt%-4o%-mini"', '"gpt-unpriced"')
      return res
    end } })
    local r, err = ai.chat({ model = "openai/gpt-unpriced", messages = MSGS, max_tokens = 100,
      retry = { max_retries = 1 } })
    assert.is_nil(r)
    assert.is_nil(err.cost_usd)
    assert.is_true(err.cost_unknown)
    assert.are.equal(2, ledger_rows())
  end)

  it("a stream canceled while it opens, without <close>, gives its hold back and records its refusals", function()
    m:configure({ strict = true, reply = "", sequence = { chat = { "ok", "hang" } } })
    local b = resil.budget("ai-spec-stream-open-cancel", { limit = 1 })
    local t = resil.spawn(function()
      local s = ai.stream({ model = "openai/gpt-4o-mini", max_tokens = 100, budget = "ai-spec-stream-open-cancel",
        messages = { { role = "user", content = ("word "):rep(8000) } } }) -- (a prompt that costs something)
      return s:next()
    end)
    resil.sleep(5) -- the first stream ended empty (refused), the retry hangs
    assert.are.equal(2, m:stats().routes.chat)
    t:cancel()
    -- (the retry's request was sent: the cancel waits its grace, 1 s, for a status that never comes)
    resil.sleep(1.1)
    assert.are.equal("canceled", t:status())
    assert.are.equal(1, ledger_rows())
    local st = b:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(st.spent > 0)
  end)

  -- a store file on the real clock, its schema made, for another process to hold its lock -> its path
  local function store_to_lock()
    resil.clock.real()
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    assert(resil.cost.record({ provider = "warm-up", usd = 0 })) -- the file and its schema
    return db
  end
  -- the ledger's rows of calls to openai
  local function rows()
    for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do
      if g.key == "openai" then return g.calls end
    end
    return 0
  end

  -- (before: the row, queued for the lock, was dropped with the cancel)
  it("a call without a budget canceled while its row waits for the store still records it, once", function()
    local db = store_to_lock()
    local n = 0
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      local res = good_answer("chatcmpl-good")
      res.delay = 1 -- (meanwhile the lock is taken)
      return res
    end } })
    local t = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
    assert.is_true(helpers.wait_until(function() return n == 1 end, 30), "the call was not sent")
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.write(release, "") end)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 0 end, 10))
    resil.sleep(0.3)
    assert.are.equal("waiting", t:status()) -- answered; its row waits for the lock
    t:cancel()
    helpers.write(release, "")
    assert.is_true(helpers.wait_until(function() return rows() == 1 end, 15), "rows: " .. rows())
    resil.sleep(0.5)
    assert.are.equal(1, rows())
  end)

  it("a call canceled while its settle waits for the store still records its answer and its refusals, " ..
     "and frees its hold", function()
    local db = store_to_lock()
    local n = 0
    m:configure({ routes = { ["POST /v1/chat/completions"] = function()
      n = n + 1
      if n == 1 then return refused_answer("chatcmpl-refused-1") end
      local res = good_answer("chatcmpl-good")
      res.delay = 2 -- (meanwhile the lock is taken)
      return res
    end } })
    local b = resil.budget("ai-spec-settle-cancel", { limit = 1 })
    -- (no retry budget: the provider's counts its seconds on the clock, and the earlier specs' virtual
    -- seconds, far past this real one, left it spent 4 runs in 10: the refused answer was not retried)
    local t = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      budget = "ai-spec-settle-cancel", retry = { budget = false } })
    assert.is_true(helpers.wait_until(function() return n == 2 end, 30), "the second attempt was not sent: " .. n)
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.write(release, "") end)
    -- answered (the mock has written it); its settle waits for the lock
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 0 end, 10))
    resil.sleep(0.3)
    assert.are.equal("waiting", t:status())
    t:cancel()
    helpers.write(release, "")
    assert.is_true(helpers.wait_until(function() return rows() == 2 end, 15), "rows: " .. rows())
    local st = b:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(math.abs(st.spent - resil.cost.total({})) <= 2e-6)
  end)

  it("a call canceled between its reservation and its answer gives the hold back", function()
    local b = resil.budget("ai-spec-cancel", { limit = 1 })
    m:configure({ strict = true, latency = { min = 5, max = 5 } })
    local t = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      budget = "ai-spec-cancel" })
    resil.sleep(1) -- reserved, waiting for the answer
    assert.is_true(b:state().reserved > 0)
    t:cancel()
    resil.sleep(0.1) -- the release is a task of its own
    assert.are.equal(0, b:state().reserved)
    assert.are.equal(0, #b:state().holds)
  end)

  -- (before: 4 bytes a token for every byte held a CJK prompt at 0.75 tokens a character; the provider
  -- bills one or more)
  it("a prompt in Chinese or Japanese is held at a token a character at least", function()
    local b = resil.budget("ai-spec-cjk", { limit = 1 })
    local text = ("日本語のテキストです。"):rep(150) -- 1,650 characters, 4,950 bytes
    local chars = utf8.len(text)
    m:configure({ strict = true, latency = { min = 5, max = 5 } })
    local t = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = { { role = "user", content = text } },
      max_tokens = 100, budget = "ai-spec-cjk" })
    resil.sleep(1) -- reserved, waiting for the answer
    local least = pricing.cost("openai", "gpt-4o-mini", { input_tokens = chars, output_tokens = 100 })
    assert.is_true(b:state().reserved >= least, ("held %s, at least %s"):format(b:state().reserved, least))
    local ok, r = t:join()
    assert.is_true(ok and r ~= nil)
    -- ASCII stays at 4 bytes a token
    assert.are.equal(3, pricing.estimate_tokens("hello world"))
    -- bytes that are not UTF-8 count as other bytes do; a NUL is ASCII
    assert.are.equal(2, pricing.estimate_tokens("ab\255\254cd")) -- 4/4 + 2/2
    assert.are.equal(2, pricing.estimate_tokens("a\0b\0c"))
    assert.are.equal(0, pricing.estimate_tokens(""))
    assert.are.equal(math.ceil(7 / 4 + 6 / 2), pricing.estimate_tokens("abc日本defg"))
  end)

  -- (before: every answer was priced at the standard tier, a priority one at about half what it cost)
  it("an answer served by another processing tier is priced at that tier's price, asked for or the project's",
    function()
      local function ledger_usd() return resil.cost.total({}) end
      -- asked for: held and priced at priority
      local b = resil.budget("ai-spec-tier", { limit = 1 })
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "ai-spec-tier", provider_options = { openai = { service_tier = "priority" } } }))
      assert.are.equal("priority", r.usage.service_tier)
      local standard = pricing.cost("openai", "gpt-4o-mini", { input_tokens = r.usage.input_tokens,
        cached_input_tokens = r.usage.cached_input_tokens, output_tokens = r.usage.output_tokens })
      local priority = pricing.cost("openai", "gpt-4o-mini", r.usage)
      assert.is_true(priority > standard)
      assert.are.equal(priority, r.cost_usd)
      assert.is_true(math.abs(b:state().spent - priority) <= 1e-6)
      -- the project's default, the request asking none; streamed too
      m:configure({ strict = true, reply = "one two three four five six", cached_tokens = 4, service_tier = "priority" })
      local before = ledger_usd()
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
      assert.are.equal(pricing.cost("openai", "gpt-4o-mini", r.usage), r.cost_usd)
      assert.is_true(math.abs(ledger_usd() - before - r.cost_usd) <= 1e-6)
      local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
      for _ in s do end
      local sr = assert(s:result())
      assert.are.equal("priority", sr.usage.service_tier)
      assert.are.equal(pricing.cost("openai", "gpt-4o-mini", sr.usage), sr.cost_usd)
      -- a tier without a price: a row without one, never the standard price
      m:configure({ strict = true, reply = "hi", service_tier = "scale" })
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
      assert.is_nil(r.cost_usd)
      assert.are.equal(4, ledger_rows())
      -- a tier the table does not know (an OpenAI-compatible server's, Groq's "on_demand"): the model's price
      m:configure({ strict = true, reply = "hi", service_tier = "on_demand" })
      r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
      assert.are.equal("on_demand", r.usage.service_tier)
      assert.are.equal(pricing.cost("openai", "gpt-4o-mini", { input_tokens = r.usage.input_tokens,
        cached_input_tokens = r.usage.cached_input_tokens, output_tokens = r.usage.output_tokens }), r.cost_usd)
    end)

  -- (before: a project's default tier was priced in its rows only: every call was held at the standard
  -- price, about half what a priority answer costs)
  it("a provider's configured service_tier is sent to requests naming none and held at its price; answers at a " ..
    "tier nobody asked for make the next calls held at its price", function()
    local function held_while(req) -- -> the budget's hold while the call runs, the result
      local b = resil.budget("ai-spec-held", { limit = 1 })
      req.budget, req.max_tokens = "ai-spec-held", 1000
      local call = resil.spawn(function()
        if not req.stream then return ai.chat(req) end
        local s = ai.stream(req)
        for _ in s do end
        return s:result()
      end)
      resil.sleep(1)
      local held = b:state().reserved
      local _, r = call:join()
      return held, assert(r)
    end
    local priority = pricing.cost("openai", "gpt-4o-mini", { output_tokens = 1000, service_tier = "priority" })
    m:configure({ strict = true, latency = 5 }) -- priority only when asked
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY, service_tier = "priority" })
    local held, r = held_while({ model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_true(held >= priority, held .. " held")
    assert.are.equal("priority", r.usage.service_tier) -- sent: the provider answered at it
    -- a request's own tier wins: "default" is standard processing, held at the standard price
    held, r = held_while({ model = "openai/gpt-4o-mini", messages = MSGS,
      provider_options = { openai = { service_tier = "default" } } })
    assert.is_true(held < priority, held .. " held")
    assert.is_nil(r.usage.service_tier)
    -- not configured, the project defaulting to priority: once an answer says so, calls asking none
    -- (streamed or not) are held at its price; a call asking "default" is not
    m:configure({ strict = true, latency = 5, service_tier = "priority" })
    point_at(m.url)
    held = held_while({ model = "openai/gpt-4o-mini", messages = MSGS, stream = true })
    assert.is_true(held < priority, held .. " held") -- (the first: nothing said yet)
    held = held_while({ model = "openai/gpt-4o-mini", messages = MSGS, stream = true })
    assert.is_true(held >= priority, held .. " held")
    held = held_while({ model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_true(held >= priority, held .. " held")
    held = held_while({ model = "openai/gpt-4o-mini", messages = MSGS,
      provider_options = { openai = { service_tier = "default" } } })
    assert.is_true(held < priority, held .. " held")
    -- (before: configuring any provider forgot it) another provider configured: still held at priority
    ai.configure("anthropic", { base_url = m.url, api_key = ANTHROPIC_KEY })
    held = held_while({ model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_true(held >= priority, held .. " held")
    -- configured again: said anew
    point_at(m.url)
    held = held_while({ model = "openai/gpt-4o-mini", messages = MSGS })
    assert.is_true(held < priority, held .. " held")
    -- (before: the last tier seen replaced the others) answers at priority then at flex: still held at priority
    local mini_priority = pricing.cost("openai", "gpt-5-mini", { output_tokens = 1000, service_tier = "priority" })
    m:configure({ strict = true, latency = 5, service_tier = "priority" })
    held_while({ model = "openai/gpt-5-mini", messages = MSGS })
    m:configure({ strict = true, latency = 5, service_tier = "flex" })
    held_while({ model = "openai/gpt-5-mini", messages = MSGS })
    held = held_while({ model = "openai/gpt-5-mini", messages = MSGS })
    assert.is_true(held >= mini_priority, held .. " held")
    local ok, err = pcall(ai.configure, "openai", { service_tier = 1 })
    assert.is_false(ok)
    assert.matches("service_tier must be a string", err)
  end)

  -- (before: a reload onto this version found the tier the previous one had learned, kept as a string,
  -- and the next answer at another tier raised after the provider billed it: no row, a policy error)
  it("a tier learned by the version before a reload (one per target) is still held, and more are learned", function()
    local kept = resil.keep("policies.ai.served_tiers")
    local was_by, was_n = kept.by, kept.n
    kept.by, kept.n = { ["openai/gpt-5-mini"] = "priority" }, 1
    package.loaded["policies.ai"] = nil
    local reloaded = require "policies.ai"
    package.loaded["policies.ai"] = ai
    local _ <close> = setmetatable({}, { __close = function() kept.by, kept.n = was_by, was_n end })
    local b = resil.budget("ai-spec-tier-reload", { limit = 1 })
    m:configure({ strict = true, latency = 5, service_tier = "flex" })
    local call = resil.spawn(reloaded.chat, { model = "openai/gpt-5-mini", messages = MSGS, max_tokens = 1000,
      budget = "ai-spec-tier-reload" })
    resil.sleep(1)
    local held = b:state().reserved
    local ok, r = call:join()
    assert.is_true(ok, tostring(r))
    assert(r, "no answer")
    assert.are.equal(1, ledger_rows())
    assert.is_true(held >= pricing.cost("openai", "gpt-5-mini", { output_tokens = 1000, service_tier = "priority" }),
      held .. " held")
  end)

  -- (before: "policies/ai.lua:644: attempt to index a number value (local 'budget')")
  it("a budget that is neither a name nor a resil.budget is said at the caller's line, nothing sent", function()
    for _, b in ipairs({ 5, true, {} }) do
      for _, call in ipairs({ function() local r = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, budget = b }) return r end,
                              function() local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, budget = b }) return s end,
                              function() local r = ai.embed({ model = "openai/text-embedding-3-small", input = "x", budget = b }) return r end }) do
        local ok, err = pcall(call)
        assert.is_false(ok)
        assert.matches("ai_spec%.lua:%d+: ai[.%a]*: budget must be a budget's name or a resil%.budget, not " .. type(b), err)
      end
    end
    assert.are.equal(0, m:stats().total)
  end)

  -- (before: "policies/ai.lua:202: call.provider 'openai': timeout must be ...", a line of the library's)
  it("a request's own call options that cannot be meant are said at the caller's line, nothing sent", function()
    local before = m:stats().total
    for _, c in ipairs({
      { function() local r = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, timeout = "30" }) return r end, "ai: timeout must be a number of seconds > 0" },
      { function() local r = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, retry = { max_retries = -1 } }) return r end, "ai: retry: max_retries must be" },
      { function() local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, breaker = true }) return s end, "ai: breaker must be a table" },
    }) do
      local ok, err = pcall(c[1])
      assert.is_false(ok)
      assert.matches("ai_spec%.lua:" .. debug.getinfo(c[1], "S").linedefined .. ": " .. c[2], err)
    end
    assert.are.equal(before, m:stats().total)
  end)

  it("a budget refuses a model without a price before sending anything", function()
    resil.budget("ai-spec-2", { limit = 1 })
    local r, err = ai.chat({ model = "openai/gpt-unpriced", messages = MSGS, budget = "ai-spec-2" })
    assert.is_nil(r)
    assert.are.equal("unpriced", err.kind)
    assert.are.equal(0, m:stats().total)
  end)

  it("a model without a price is served, with cost_usd nil and a ledger row without a price (never a zero)", function()
    local r = assert(ai.chat({ model = "openai/gpt-unpriced", messages = MSGS }))
    assert.is_nil(r.cost_usd)
    assert.are.equal(1, ledger_rows())
    local by = assert(resil.cost.breakdown("model"))
    assert.are.same({ { key = "gpt-unpriced", usd = 0, calls = 1, unpriced = 1 } }, by)
  end)

  it("cache = {ttl=} answers a repeat from the store, at zero cost", function()
    local a = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, cache = { ttl = 60 } }))
    local b = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, cache = { ttl = 60 } }))
    assert.are.equal(a.text, b.text)
    assert.is_true(b.cached)
    assert.are.equal(0, b.cost_usd)
    assert.are.equal(1, m:stats().routes.chat)
    assert.is_true(math.abs(a.cost_usd - resil.cost.total({})) <= 1e-6) -- the ledger keeps micro-dollars
  end)

  it("ai.configure's timeout, stream_timeout or idle_timeout of 0 (curl's none) raises at its line", function()
    -- (before: taken, then every call or stream timed out at once: resil.http's timeout = 0 times out now)
    for _, k in ipairs({ "timeout", "stream_timeout", "idle_timeout" }) do
      for _, v in ipairs({ 0, -1, 0 / 0, "60" }) do
        local ok, err = pcall(function()
          ai.configure("openai", { base_url = "http://127.0.0.1:1/v1", api_key = OPENAI_KEY, [k] = v })
        end)
        assert.is_false(ok, k .. " " .. tostring(v))
        assert.matches("ai_spec.lua:%d+: ai.configure 'openai': " .. k .. " must be a number of seconds > 0", err)
      end
    end
    ai.configure("openai", { base_url = "http://127.0.0.1:1/v1", api_key = OPENAI_KEY, stream_timeout = math.huge })
    point_at(m.url)
  end)

  -- (before: ai.configure took any max_tokens, and each budgeted call given none raised at
  -- "policies/call.lua:362: ... cannot encode 'json': Cannot serialise number" (NaN), or was held
  -- at -1 token, a hold below its input's; a request's max_tokens of -1 was sent, the provider's
  -- 400, and held likewise)
  it("a max_tokens that cannot be meant, ai.configure's or a request's, raises at its line", function()
    for _, v in ipairs({ 0, -1, 0 / 0, math.huge, 2.5, "60" }) do
      local ok, err = pcall(function()
        ai.configure("openai", { base_url = "http://127.0.0.1:1/v1", api_key = OPENAI_KEY, max_tokens = v })
      end)
      assert.is_false(ok, tostring(v))
      assert.matches("ai_spec.lua:%d+: ai.configure 'openai': max_tokens must be a whole number >= 1", err)
    end
    point_at(m.url)
    for _, v in ipairs({ -1, -4096 }) do
      local ok, err = pcall(function()
        local r = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = v }); return r
      end)
      assert.is_false(ok, tostring(v))
      assert.matches("ai_spec.lua:%d+: ai: max_tokens must be", err)
    end
    assert.are.equal(0, m:stats().total)
  end)

  -- (before: "policies/call.lua:362: http request: cannot encode 'json': Cannot serialise number",
  -- a line of the library's, for a temperature computed as 1 / 0)
  it("a sampling number that is NaN or infinite raises at the caller's line, nothing sent", function()
    point_at(m.url)
    for _, k in ipairs({ "temperature", "top_p", "top_k", "seed", "n", "frequency_penalty", "presence_penalty" }) do
      for _, v in ipairs({ 0 / 0, math.huge, -math.huge }) do
        local ok, err = pcall(function()
          local r = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, [k] = v }); return r
        end)
        assert.is_false(ok, k .. " " .. tostring(v))
        assert.matches("ai_spec.lua:%d+: ai: " .. k .. " must be a finite number", err)
      end
    end
    assert.are.equal(0, m:stats().total)
  end)

  it("ai.configure's deadline that is not a number, or limits that are not tables, raise at its line", function()
    -- (before: taken, then every call raised inside policies/ai.lua, 'call.provider ...' or 'attempt to index')
    for _, conf in ipairs({ { deadline = "30" }, { deadline = 0 / 0 }, { breaker = true }, { rate = 500 },
                            { tokens = "90000" }, { concurrency = 16 } }) do
      local k = next(conf)
      conf.base_url, conf.api_key = m.url .. "/v1", OPENAI_KEY
      local ok, err = pcall(function() ai.configure("openai", conf) end)
      assert.is_false(ok, k)
      assert.matches("ai_spec.lua:%d+: ai.configure 'openai': " .. k .. " must be", err)
    end
    point_at(m.url)
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS })) -- the configuration before stands
  end)

  it("ai.configure's base_url that is no http(s) URL, or api_key that is neither a key nor false, raises at its line",
    function()
    -- (before: taken; then each call raised inside policies/ai.lua, "attempt to index a number value
    -- (local 'base')", or inside policies/call.lua, "bad url 'localhost:8080/v1/chat/completions'"; a
    -- key given as a number was "OPENAI_API_KEY is not set")
    for _, conf in ipairs({ { base_url = 5 }, { base_url = "localhost:8080/v1" }, { base_url = "" },
                            { api_key = 5 }, { api_key = true }, { api_key = "" }, { api_key_env = 5 } }) do
      local k, v = next(conf)
      conf.base_url, conf.api_key = conf.base_url or m.url .. "/v1", conf.api_key or OPENAI_KEY
      local ok, err = pcall(function() ai.configure("openai", conf) end)
      assert.is_false(ok, k .. " " .. tostring(v))
      assert.matches("ai_spec.lua:%d+: ai.configure 'openai': " .. k .. " must be", err)
    end
    point_at(m.url)
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS })) -- the configuration before stands
    ai.configure("openai", { base_url = m.url .. "/v1/", api_key = false }) -- (false: no auth, as before)
    point_at(m.url)
  end)

  it("ai.configure's cache = {ttl=} that the store cannot keep raises at its line (it left every answer uncached)",
    function()
      for _, bad in ipairs({ { ttl = "60" }, { ttl = 0 }, { ttl = 0 / 0 }, { ttl = math.huge }, 60 }) do
        local ok, err = pcall(function()
          ai.configure("openai", { base_url = "http://127.0.0.1:1/v1", api_key = OPENAI_KEY, cache = bad })
        end)
        assert.is_false(ok)
        assert.matches("ai_spec.lua:%d+: ai.configure: cache must be {ttl = seconds}, seconds > 0", err)
      end
      -- (before: accepted; each answer then logged "ai: result not cached" and each repeat was paid for)
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY, cache = { ttl = 60 } })
      local _ <close> = setmetatable({}, { __close = function() point_at(m.url) end })
      assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS }))
      local b = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS }))
      assert.is_true(b.cached)
      assert.are.equal(1, m:stats().routes.chat)
    end)

  it("misuse raises at the caller's line", function()
    local ok, err = pcall(function() local r = ai.chat({ model = "gpt-4o", messages = MSGS }); return r end)
    assert.is_false(ok)
    assert.matches("ai_spec.lua:%d+: ai: model 'gpt%-4o' must name its provider", err)
    ok, err = pcall(function() local r = ai.chat({ model = "openai/gpt-4o" }); return r end)
    assert.matches("ai_spec.lua:%d+: ai: messages must be", err)
  end)

  -- (before: the provider was asked for a stream that ai.chat read as one JSON body: invalid_output,
  -- retried, three calls paid, and the call failed)
  it("ai.chat with stream = true (an SDK's habit) raises at the caller's line, nothing sent", function()
    local before = m:stats().total
    local f = function() local r = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, stream = true }); return r end
    local ok, err = pcall(f)
    assert.is_false(ok)
    assert.matches("ai_spec%.lua:" .. debug.getinfo(f, "S").linedefined .. ": ai%.chat: stream = true is ai%.stream's", err)
    assert.are.equal(before, m:stats().total)
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, stream = false }))
  end)

  it("ai.job and ai.speech say plainly when policies.jobs is absent", function()
    if package.searchpath("policies.jobs", package.path) then return end
    local ok, err = pcall(ai.job, { model = "fal/x", input = {} })
    assert.is_false(ok)
    assert.matches("ai.job: not available", err)
  end)
end)

-- A gateway client of one API whose request goes to the other provider (a
-- fallback, a route): its conversation is translated, or the strict mock
-- refuses it as the real API would.
describe("a conversation in the other API's shape", function()
  local m, seen
  local PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
  local PDF = "JVBERi0xLjQKJcfsj6IK"
  before_each(function()
    resil.clock.virtual()
    fresh_store()
    seen = nil
    m = resil.mock.start({ strict = true, reply = function(body) seen = body; return "done" end })
    point_at(m.url)
  end)
  after_each(function() m:stop() end)

  it("Anthropic's tool_use, tool_result, image and document blocks reach OpenAI as its own", function()
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 50,
      system = { { type = "text", text = "Be brief.", cache_control = { type = "ephemeral" } } },
      messages = {
        { role = "user", content = {
          { type = "text", text = "What is in these, and the weather?", cache_control = { type = "ephemeral" } },
          { type = "image", source = { type = "base64", media_type = "image/png", data = PNG } },
          { type = "image", source = { type = "url", url = "https://example.com/cat.png" } },
          { type = "document", title = "q3.pdf", source = { type = "base64", media_type = "application/pdf", data = PDF } } } },
        { role = "assistant", content = {
          { type = "thinking", thinking = "weather and time", signature = "sig" },
          { type = "text", text = "Checking." },
          { type = "tool_use", id = "toolu_1", name = "get_weather", input = { city = "Paris" } },
          { type = "tool_use", id = "toolu_2", name = "get_time", input = {} } } },
        { role = "user", content = {
          { type = "tool_result", tool_use_id = "toolu_1", content = "18C" },
          { type = "tool_result", tool_use_id = "toolu_2", is_error = true, content = { { type = "text", text = "no clock" } } },
          { type = "text", text = "Go on." } } } } }))
    assert.are.equal("done", r.text)
    local msgs = seen.messages
    assert.are.equal(6, #msgs)
    assert.are.same({ role = "system", content = "Be brief." }, msgs[1])
    assert.are.same({
      { type = "text", text = "What is in these, and the weather?" },
      { type = "image_url", image_url = { url = "data:image/png;base64," .. PNG } },
      { type = "image_url", image_url = { url = "https://example.com/cat.png" } },
      { type = "file", file = { filename = "q3.pdf", file_data = "data:application/pdf;base64," .. PDF } } }, msgs[2].content)
    assert.are.equal("assistant", msgs[3].role)
    assert.are.equal("Checking.", msgs[3].content)
    assert.are.same({ id = "toolu_1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } },
      msgs[3].tool_calls[1])
    assert.are.equal("{}", msgs[3].tool_calls[2]["function"].arguments)
    assert.are.same({ role = "tool", tool_call_id = "toolu_1", content = "18C" }, msgs[4])
    assert.are.same({ role = "tool", tool_call_id = "toolu_2", content = "Error: no clock" }, msgs[5])
    assert.are.same({ role = "user", content = { { type = "text", text = "Go on." } } }, msgs[6])
  end)

  it("OpenAI's tool_calls, tool messages, image_url and file parts reach Anthropic as its blocks", function()
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = {
      { role = "system", content = "Be brief." },
      { role = "user", content = {
        { type = "text", text = "What is in these, and the weather?" },
        { type = "image_url", image_url = { url = "data:image/jpeg;base64," .. PNG, detail = "low" } },
        { type = "image_url", image_url = { url = "https://example.com/cat.png" } },
        { type = "file", file = { filename = "q3.pdf", file_data = "data:application/pdf;base64," .. PDF } } } },
      { role = "assistant", content = resil.json.null, tool_calls = {
        { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } },
        { id = "call_2", type = "function", ["function"] = { name = "get_time", arguments = "[not json" } } } },
      { role = "tool", tool_call_id = "call_1", content = "18C" },
      { role = "tool", tool_call_id = "call_2", content = { { type = "text", text = "12:00" } } },
      { role = "user", content = "Go on." } } }))
    assert.are.equal("done", r.text)
    assert.are.equal("Be brief.", seen.system)
    local msgs = seen.messages
    assert.are.same({
      { type = "text", text = "What is in these, and the weather?" },
      -- (named image/jpeg, its bytes a PNG: Anthropic reads the bytes and refuses the mismatch)
      { type = "image", source = { type = "base64", media_type = "image/png", data = PNG } },
      { type = "image", source = { type = "url", url = "https://example.com/cat.png" } },
      { type = "document", title = "q3.pdf", source = { type = "base64", media_type = "application/pdf", data = PDF } } },
      msgs[1].content)
    assert.are.same({ type = "tool_use", id = "call_1", name = "get_weather", input = { city = "Paris" } }, msgs[2].content[1])
    assert.are.same({ type = "tool_use", id = "call_2", name = "get_time", input = {} }, msgs[2].content[2])
    -- the results of one turn's calls are one user message
    assert.are.same({ role = "user", content = {
      { type = "tool_result", tool_use_id = "call_1", content = "18C" },
      { type = "tool_result", tool_use_id = "call_2", content = "12:00" } } }, msgs[3])
    assert.are.same({ role = "user", content = "Go on." }, msgs[4])
  end)

  it("an OpenAI conversation with hints on its parts (cache_control, citations) keeps its calls and results", function()
    local call = { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } }
    assert(ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 50, messages = {
      { role = "user", content = "Weather?" },
      { role = "assistant", content = { { type = "text", text = "Checking.", cache_control = { type = "ephemeral" } } },
        tool_calls = { call } },
      { role = "tool", tool_call_id = "call_1", content = { { type = "text", text = "18C", cache_control = { type = "ephemeral" } } } },
      { role = "assistant", content = { { type = "text", text = "It is 18C.", citations = { { type = "char_location" } } } } },
      { role = "user", content = "Thanks" } } }))
    local msgs = seen.messages
    assert.are.same({ call }, msgs[2].tool_calls)
    assert.are.equal("Checking.", msgs[2].content)
    assert.are.same({ role = "tool", tool_call_id = "call_1", content = { { type = "text", text = "18C" } } }, msgs[3])
    assert.are.equal("It is 18C.", msgs[4].content)
  end)

  it("a tool_result's image reaches OpenAI after the turn's tool messages; assistant turns in a row are one", function()
    assert(ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 50, messages = {
      { role = "user", content = "Show me the chart." },
      { role = "assistant", content = { { type = "tool_use", id = "toolu_1", name = "chart", input = {} } } },
      { role = "assistant", content = { { type = "tool_use", id = "toolu_2", name = "legend", input = {} } } },
      { role = "user", content = { { type = "tool_result", tool_use_id = "toolu_1", content = {
          { type = "text", text = "the chart:" },
          { type = "image", source = { type = "base64", media_type = "image/png", data = PNG } } } },
        { type = "tool_result", tool_use_id = "toolu_2", content = { { type = "search_result", source = "s", title = "t",
          content = { { type = "text", text = "red is up" } } } } } } } } }))
    local msgs = seen.messages
    assert.are.equal(5, #msgs)
    assert.are.same({ "toolu_1", "toolu_2" }, { msgs[2].tool_calls[1].id, msgs[2].tool_calls[2].id })
    assert.are.same({ role = "tool", tool_call_id = "toolu_1", content = "the chart:" }, msgs[3])
    assert.are.same({ role = "tool", tool_call_id = "toolu_2", content = "red is up" }, msgs[4])
    assert.are.same({ role = "user", content = { { type = "image_url", image_url = { url = "data:image/png;base64," .. PNG } } } },
      msgs[5])
  end)

  it("an image/jpg data URL reaches Anthropic as image/jpeg; a data URL it cannot take is passed for its 400", function()
    local JPEG = "/9j/4AAQSkZJRgABAQAAAQABAAD"
    assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = { { role = "user", content = {
      { type = "image_url", image_url = { url = "data:image/jpg;base64," .. JPEG } } } } } }))
    assert.are.same({ type = "base64", media_type = "image/jpeg", data = JPEG }, seen.messages[1].content[1].source)
    local r, err = ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, retry = { budget = false },
      messages = { { role = "user", content = { { type = "image_url", image_url = { url = "data:image/bmp;base64,Qk0=" } } } } } })
    assert.is_nil(r)
    assert.are.equal("bad_request", err.class)
  end)

  it("an OpenAI text part that is empty is left out for Anthropic, which refuses an empty text block", function()
    -- (OpenAI takes one: a client's parts list with a blank part failed on Anthropic, a fallback's 400)
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = {
      { role = "user", content = { { type = "text", text = "" }, { type = "text", text = "What now?" } } },
      { role = "assistant", content = { { type = "text", text = "" } } },
      { role = "user", content = { { type = "text", text = "Go on." }, { type = "text", text = "" } } } } }))
    assert.are.equal("done", r.text)
    assert.are.same({ { role = "user", content = { { type = "text", text = "What now?" } } },
      { role = "user", content = { { type = "text", text = "Go on." } } } }, seen.messages)
  end)

  it("a conversation that ends in an assistant's text with trailing whitespace is served by Anthropic, trimmed", function()
    -- (OpenAI takes it; Anthropic refuses a prefill that ends in whitespace: the fallback's 400)
    for _, prefill in ipairs({ "The answer is ", { { type = "text", text = "The answer is\n" } } }) do
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = {
        { role = "user", content = "What now?" }, { role = "assistant", content = prefill } } }))
      assert.are.equal("done", r.text)
      local last = seen.messages[#seen.messages]
      assert.are.equal("The answer is", type(last.content) == "table" and last.content[1].text or last.content)
    end
  end)

  -- (before: gsub("%s+$") tried the rest of the text from every space in it: 31 s of a gateway's loop
  -- for 20,000 spaces, hours for a 4 MB body, inside one C call that no watchdog stops. The bound
  -- below is for a translation that never ends; the fixed one takes milliseconds)
  it("a prefill with long runs of spaces is trimmed in time proportional to its length", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local messages = require "policies.messages"
local text = "a" .. (" "):rep(200000) .. "b \n\t "
for _, content in ipairs({ text, { { type = "text", text = text } } }) do
  local _, out = messages.anthropic({ messages = { { role = "user", content = "hi" },
    { role = "assistant", content = content } } })
  local last = out[#out].content
  if type(last) == "table" then last = last[1].text end
  print(#last, last:sub(1, 2), last:sub(-2))
end
]])
    local r = helpers.run(("timeout -s KILL 60 %s %s"):format(helpers.resil, script))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(("200002\ta \t b\n"):rep(2), r.stdout)
  end)

  it("tool call ids another provider wrote (dots, colons, bars) reach Anthropic in its pattern, still paired", function()
    -- (OpenAI takes any id; Anthropic's 400 "tool_use.id: String should match pattern" failed every
    -- later turn of such a conversation it served)
    local calls = {}
    for i, id in ipairs({ "functions.get_weather:0", "functions.get_weather:1", "call_1|fc_2", "call_ok-1" }) do
      calls[i] = { id = id, type = "function", ["function"] = { name = "get_weather", arguments = "{}" } }
    end
    local msgs = { { role = "user", content = "Weather?" },
      { role = "assistant", content = resil.json.null, tool_calls = calls } }
    for _, c in ipairs(calls) do msgs[#msgs + 1] = { role = "tool", tool_call_id = c.id, content = "sunny" } end
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = msgs,
      tools = { { type = "function", ["function"] = { name = "get_weather", parameters = { type = "object" } } } } }))
    assert.are.equal("done", r.text)
    local uses, results = seen.messages[2].content, seen.messages[3].content
    local ids = {}
    for i = 1, 4 do
      assert.matches("^[%w_-]+$", uses[i].id)
      assert.are.equal(uses[i].id, results[i].tool_use_id)
      ids[uses[i].id] = true
    end
    assert.are.equal("call_ok-1", uses[4].id) -- (an id in the pattern is kept)
    local n = 0
    for _ in pairs(ids) do n = n + 1 end
    assert.are.equal(4, n) -- (each its own: :0 and :1 are not one id)
  end)

  it("tool_use ids another provider wrote in an Anthropic-shaped history reach Anthropic in its pattern, paired", function()
    -- (a gateway's Anthropic client whose earlier turn an OpenAI-compatible server answered, its
    -- "functions.Bash:12" sent back: every later turn Anthropic served was its 400)
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, messages = {
      { role = "user", content = "Run it." },
      { role = "assistant", content = { { type = "tool_use", id = "functions.Bash:12", name = "Bash", input = {} } } },
      { role = "user", content = { { type = "tool_result", tool_use_id = "functions.Bash:12", content = "ok" } } } },
      tools = { { name = "Bash", input_schema = { type = "object" } } } }))
    assert.are.equal("done", r.text)
    local id = seen.messages[2].content[1].id
    assert.matches("^[%w_-]+$", id)
    assert.are.equal(id, seen.messages[3].content[1].tool_use_id)
  end)

  it("a request the provider refuses is a 400 that names the part, not a retry", function()
    -- an Anthropic image from the Files API has no OpenAI counterpart: passed on, the API says what
    local r, err = ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 50, retry = { budget = false },
      messages = { { role = "user", content = { { type = "image", source = { type = "file", file_id = "file_1" } } } } } })
    assert.is_nil(r)
    assert.are.equal("bad_request", err.class)
    assert.matches("Invalid value: .image.", tostring(err.message or err))
    assert.are.equal(1, m:stats().total)
  end)
end)

describe("streams", function()
  local m
  before_each(function()
    resil.clock.virtual()
    fresh_store()
    m = resil.mock.start({ strict = true, reply = "one two three four five six" })
    point_at(m.url)
  end)
  after_each(function() m:stop() end)

  it("become one delta stream for both providers, usage and cost recorded", function()
    for _, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
      local s = ai.stream({ model = model, messages = MSGS, max_tokens = 100 })
      local deltas = {}
      for d in s do deltas[#deltas + 1] = d end
      assert.are.same({ "one ", "two ", "three ", "four ", "five ", "six" }, deltas)
      local r = assert(s:result())
      assert.are.equal("one two three four five six", r.text)
      assert.are.equal("stop", r.finish_reason)
      assert.are.equal(6, r.usage.output_tokens)
      assert.is_nil(r.usage.estimated)
      assert.is_true(r.cost_usd > 0)
    end
    assert.are.equal(2, ledger_rows())
  end)

  -- (before: the nulls replaced message_start's counts: 2,000 input tokens recorded as 0)
  it("an Anthropic message_delta whose usage has null counts keeps message_start's (as the SDKs read them)", function()
    m:configure({ routes = { ["POST /v1/messages"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = table.concat({
        'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_n","type":"message",'
          .. '"role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,'
          .. '"stop_sequence":null,"usage":{"input_tokens":200,"cache_creation_input_tokens":0,'
          .. '"cache_read_input_tokens":1800,"output_tokens":1}}}\n\n',
        'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n',
        'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
          .. '"usage":{"input_tokens":null,"cache_creation_input_tokens":null,"cache_read_input_tokens":null,'
          .. '"output_tokens":50}}\n\n',
        'event: message_stop\ndata: {"type":"message_stop"}\n\n' }) }
    end } })
    local s = ai.stream({ model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS, max_tokens = 100 })
    while s:next() do end
    local r = assert(s:result())
    assert.are.equal(2000, r.usage.input_tokens)
    assert.are.equal(1800, r.usage.cached_input_tokens)
    assert.are.equal(50, r.usage.output_tokens)
    -- 200 x 3 + 1800 x 0.30 + 50 x 15 per 1M
    assert.are.equal(0.00189, r.cost_usd)
    assert.are.equal(0.00189, assert(resil.cost.breakdown("provider"))[1].usd)
  end)

  -- (before: a compatible server's message_delta saying input_tokens 0 (sglang's, "said in message_start")
  -- replaced message_start's 2,000 input tokens: the row priced the input at nothing)
  it("an Anthropic message_delta whose input counts are below message_start's keeps message_start's; higher ones count",
    function()
    local start, delta
    m:configure({ routes = { ["POST /v1/messages"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = table.concat({
        'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_z","type":"message",'
          .. '"role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,'
          .. '"stop_sequence":null,"usage":' .. start .. '}}\n\n',
        'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n',
        'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
          .. '"usage":' .. delta .. '}\n\n',
        'event: message_stop\ndata: {"type":"message_stop"}\n\n' }) }
    end } })
    local function streamed()
      local s = ai.stream({ model = "anthropic/claude-sonnet-4-5-20250929", messages = MSGS, max_tokens = 100 })
      while s:next() do end
      return assert(s:result())
    end
    start = '{"input_tokens":200,"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,"output_tokens":1}'
    delta = '{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":50}'
    local r = streamed()
    assert.are.same({ 2000, 1800, 50 }, { r.usage.input_tokens, r.usage.cached_input_tokens, r.usage.output_tokens })
    assert.are.equal(0.00189, r.cost_usd) -- 200 x 3 + 1800 x 0.30 + 50 x 15 per 1M
    -- a relay that knows the input only at the end: message_start's 0, message_delta's total
    start = '{"input_tokens":0,"output_tokens":1}'
    delta = '{"input_tokens":200,"cache_read_input_tokens":1800,"output_tokens":50}'
    r = streamed()
    assert.are.same({ 2000, 1800, 50 }, { r.usage.input_tokens, r.usage.cached_input_tokens, r.usage.output_tokens })
    assert.are.equal(0.00189 * 2, assert(resil.cost.breakdown("provider"))[1].usd)
  end)

  -- (before: nothing was recorded, so clients that cut their streams before the first delta spent
  -- the provider's money past their budget)
  it("a stream canceled after the provider accepted it, before its first delta, is billed its input", function()
    resil.clock.real()
    local asked = 0
    local upstream = assert(resil.server.listen({ handler = function(req)
      asked = asked + 1
      local first = req.path == "/v1/messages"
        and 'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_slow","type":"message",' ..
            '"role":"assistant","model":"claude-haiku-4-5","content":[],"stop_reason":null,"stop_sequence":null,' ..
            '"usage":{"input_tokens":1234,"output_tokens":1}}}\n\n'
        or ": the model is thinking\n\n"
      -- accepted (a 200 and an event that is no delta), then nothing more: a model still on the prompt
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = { first }, stall_after = 1 }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local b = resil.budget("ai-spec-stream-cut-early", { limit = 1 })
    for i, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
      local t = resil.spawn(function()
        local s = ai.stream({ model = model, messages = MSGS, max_tokens = 100, budget = "ai-spec-stream-cut-early" })
        return s:next()
      end)
      assert.is_true(helpers.wait_until(function() return asked == i end, 5))
      resil.sleep(0.2)
      t:cancel()
    end
    assert.is_true(helpers.wait_until(function() return ledger_rows() == 2 end, 5), "rows: " .. ledger_rows())
    local st = b:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(st.spent > 0)
    local rows = assert(helpers.backend(assert(resil.store())):cost_rows({}))
    local inputs = {}
    for _, r in ipairs(rows) do inputs[r.provider] = r.units and resil.json.decode(r.units).input_tokens end
    assert.are.equal(1234, inputs.anthropic) -- as the provider reported it
    assert.is_true(inputs.openai > 0) -- estimated from the prompt
  end)

  -- (before: "the stream ended before its first delta", a protocol error tried again: each whole
  -- answer was paid and none was recorded, nor held against the budget)
  it("a 200 whose body is the API's error and no answer (an OpenAI-compatible server's) is a server_error, " ..
     "retried, and not recorded as a paid answer", function()
    -- (before: invalid output, each attempt recorded at the request's estimate as a paid answer)
    local asked = 0
    local upstream = assert(resil.server.listen({ handler = function()
      asked = asked + 1
      return { status = 200, headers = { ["content-type"] = "application/json" },
        body = '{"error":{"message":"upstream overloaded, try again","type":"server_error","code":null}}' }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local before = ledger_rows()
    local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      retry = { base = 0.001, cap = 0.002 } })
    assert.is_nil(r)
    assert.are.equal("server_error", err.class)
    assert.matches("HTTP 200 whose body is an error: upstream overloaded, try again", err.message, 1, true)
    assert.is_true(asked > 1) -- (retried as a 5xx is)
    assert.are.equal(before, ledger_rows())
  end)

  it("a stream request answered 200 with the API's error and no answer is retried, not recorded as paid", function()
    -- (before: its error text taken for a whole answer, recorded at the estimate, not retried)
    local asked = 0
    local upstream = assert(resil.server.listen({ handler = function()
      asked = asked + 1
      return { status = 200, headers = { ["content-type"] = "application/json" },
        body = '{"error":{"message":"upstream overloaded, try again","type":"server_error"}}' }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local before = ledger_rows()
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      retry = { base = 0.001, cap = 0.002 } })
    local ok, err = pcall(function() for _ in s do end end)
    assert.is_false(ok)
    assert.are.equal("server_error", err.class, err.message)
    assert.is_true(asked > 1)
    assert.are.equal(before, ledger_rows())
  end)

  it("a stream a server labels application/json is read as the stream it is, recorded once", function()
    -- (before: refused as a whole answer, its row written, not retried)
    local upstream = assert(resil.server.listen({ handler = function()
      local chunk = function(delta, finish)
        return "data: " .. resil.json.encode({ id = "c1", object = "chat.completion.chunk", model = "gpt-4o-mini",
          choices = { { index = 0, delta = delta, finish_reason = finish or resil.json.null } } }) .. "\n\n"
      end
      return { status = 200, headers = { ["content-type"] = "application/json" },
        body = chunk({ role = "assistant", content = "hi" }) .. chunk({ content = " there" }) .. chunk({}, "stop") ..
          'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],' ..
          '"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n' }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local before = ledger_rows()
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
    local parts = {}
    for delta in s do parts[#parts + 1] = delta end
    assert.are.equal("hi there", table.concat(parts))
    assert.is_true(helpers.wait_until(function() return ledger_rows() == before + 1 end, 5))
  end)

  -- (before: read by its events, as a relay reads it, the events it held were given, then
  -- next_event raised, "attempt to index a nil value (field 's')", and the stream was recorded as
  -- closed before its end; the gateway wrote an error event after the client's [DONE] or message_stop)
  it("a stream a server labels application/json, read by its events, ends after its last one, recorded once", function()
    local upstream = assert(resil.server.listen({ handler = function()
      local chunk = function(delta, finish)
        return "data: " .. resil.json.encode({ id = "c1", object = "chat.completion.chunk", model = "gpt-4o-mini",
          choices = { { index = 0, delta = delta, finish_reason = finish or resil.json.null } } }) .. "\n\n"
      end
      return { status = 200, headers = { ["content-type"] = "application/json" },
        body = chunk({ role = "assistant", content = "hi" }) .. chunk({ content = " there" }) .. chunk({}, "stop") ..
          'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],' ..
          '"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n' }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local before = ledger_rows()
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100, raw_events = "openai" })
    local events = {}
    while true do
      local ok, ev, data_or_err = pcall(s.next_event, s)
      assert(ok, ev)
      if not ev then
        assert.is_nil(data_or_err)
        break
      end
      events[#events + 1] = ev.data
    end
    assert.are.equal(5, #events)
    assert.are.equal("[DONE]", events[5])
    local r = assert(s:result())
    assert.are.equal("hi there", r.text)
    assert.are.same({ 5, 2 }, { r.usage.input_tokens, r.usage.output_tokens })
    assert.is_true(helpers.wait_until(function() return ledger_rows() == before + 1 end, 5))
    assert.are.equal(before + 1, ledger_rows())
  end)

  -- (before: each chunk was taken for an error event, "error: userdata: (nil)", and every stream
  -- of such a server failed before its first delta, 500 after the retries; the SDK reads a falsy
  -- error as none)
  it("a stream whose chunks say \"error\": null (a compatible server's) is read as the SDK reads it", function()
    local upstream = assert(resil.server.listen({ handler = function()
      local chunk = function(delta, finish)
        return "data: " .. resil.json.encode({ id = "c1", object = "chat.completion.chunk", model = "gpt-4o-mini",
          error = resil.json.null, choices = { { index = 0, delta = delta, finish_reason = finish or resil.json.null } } })
          .. "\n\n"
      end
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        body = chunk({ role = "assistant", content = "hi" }) .. chunk({ content = " there" }) .. chunk({}, "stop") ..
          "data: [DONE]\n\n" }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local before = ledger_rows()
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
    local parts = {}
    for delta in s do parts[#parts + 1] = delta end
    assert.are.equal("hi there", table.concat(parts))
    assert.is_true(helpers.wait_until(function() return ledger_rows() == before + 1 end, 5))
  end)

  -- (the SDK ends a stream at data that starts with [DONE]: a server's "[DONE] " or "[DONE]\r" was
  -- "an event that is not JSON", the whole stream a failure and retried, after it was paid)
  it("a stream whose end marker has text after it ([DONE] followed by a space) ends there, as the SDK ends it", function()
    local upstream = assert(resil.server.listen({ handler = function()
      local chunk = function(delta, finish)
        return "data: " .. resil.json.encode({ id = "c1", object = "chat.completion.chunk", model = "gpt-4o-mini",
          choices = { { index = 0, delta = delta, finish_reason = finish or resil.json.null } } }) .. "\n\n"
      end
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        body = chunk({ role = "assistant", content = "hi" }) .. chunk({}, "stop") .. "data: [DONE] \n\n" }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local before = ledger_rows()
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 })
    local parts = {}
    for delta in s do parts[#parts + 1] = delta end
    assert.are.equal("hi", table.concat(parts))
    assert.is_true(assert(s:result()).finish_reason == "stop")
    assert.is_true(helpers.wait_until(function() return ledger_rows() == before + 1 end, 5))
  end)

  it("a validator's refusal of a 200 whose error is null (JSON-RPC's) is invalid output, not a server error",
     function()
    local classify = require "policies.classify"
    local v = classify.outcome({ status = 200, data = resil.json.decode('{"result":{"rows":[]},"error":null,"id":1}') },
      nil, { validate = function() return false, "no rows" end })
    assert.are.same({ "invalid_output", "no rows" }, { v.class, v.reason })
  end)

  it("a whole JSON answer to a stream request (a server that ignores stream = true) is recorded as billed, once, " ..
     "and not asked again of that server", function()
    local asked = 0
    local upstream = assert(resil.server.listen({ handler = function(req)
      asked = asked + 1
      local body = req.path == "/v1/messages"
        and '{"id":"msg_whole","type":"message","role":"assistant","model":"claude-haiku-4-5","content":' ..
            '[{"type":"text","text":"hello there"}],"stop_reason":"end_turn","usage":{"input_tokens":1234,' ..
            '"output_tokens":56}}'
        or '{"id":"chatcmpl-whole","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,' ..
            '"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}],"usage":' ..
            '{"prompt_tokens":1234,"completion_tokens":56}}'
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = body }
    end }))
    finally(function() upstream:close() end)
    point_at(("http://127.0.0.1:%d"):format(upstream:port()))
    local b = resil.budget("ai-spec-stream-whole", { limit = 1 })
    for i, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
      local s = ai.stream({ model = model, messages = MSGS, max_tokens = 100, budget = "ai-spec-stream-whole" })
      local ok, err = pcall(function() for _ in s do end end)
      assert.is_false(ok, model)
      assert.are.equal(false, err.retryable, model)
      assert.matches("not a stream", err.message)
      assert.are.equal(i, asked, model)
      assert.are.equal(i, ledger_rows(), model)
    end
    local st = b:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    local rows = assert(helpers.backend(assert(resil.store())):cost_rows({}))
    for _, r in ipairs(rows) do
      local units = resil.json.decode(r.units)
      assert.are.same({ 1234, 56 }, { units.input_tokens, units.output_tokens }, r.provider)
    end
  end)

  for _, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
    it(model .. ": a stream that ends before any text is invalid output, retried as ai.chat's empty answer is; " ..
       "each refused answer is billed", function()
      m:configure({ strict = true, reply = "" })
      local r, cerr = ai.chat({ model = model, messages = MSGS })
      assert.is_nil(r)
      assert.are.equal("invalid_output", cerr.kind)
      local chat_calls = m:stats().total
      assert.are.equal(chat_calls, ledger_rows())
      -- (each row as the ledger keeps it, in whole micro-dollars: one under half of one is 0)
      local function micro(usd) return math.floor(usd * 1e6 + 0.5) end
      assert.are.equal(micro(resil.cost.total({})), micro(cerr.cost_usd))
      local s = ai.stream({ model = model, messages = MSGS })
      local ok, err = pcall(function() for _ in s do end end)
      assert.is_false(ok)
      assert.are.equal("invalid_output", err.kind)
      assert.are.equal(chat_calls * 2, m:stats().total) -- as many attempts as the chat made
      assert.are.equal(chat_calls * 2, ledger_rows())
      assert.are.equal(micro(resil.cost.total({})), micro(cerr.cost_usd) + micro(err.cost_usd))
    end)
  end

  for _, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
    local route = model:match("^openai") and "chat" or "messages"

    it(model .. ": a stream cut after three deltas is stream_interrupted, with the text so far", function()
      m:configure({ strict = true, reply = "one two three four five six", sequence = { [route] = { "cut" } } })
      local s = ai.stream({ model = model, messages = MSGS, fallback = { "openai/gpt-4.1" } })
      local got = {}
      local ok, err = pcall(function() for d in s do got[#got + 1] = d end end)
      assert.is_false(ok)
      assert.are.equal("stream_interrupted", err.kind)
      assert.are.equal("one two three ", err.text)
      assert.are.same({ "one ", "two ", "three " }, got)
      local r, rerr = s:result()
      assert.is_nil(r)
      assert.are.equal(err, rerr)
      assert.are.equal(1, m:stats().total) -- no fallback once text has been delivered
      assert.are.equal(1, ledger_rows())   -- what was streamed is paid for
      -- at least the three words streamed (Anthropic's message_start said 1), estimated from the text
      assert.is_true(err.usage.output_tokens >= 3, tostring(err.usage.output_tokens))
      assert.is_true(err.usage.estimated)
      assert.is_true(math.abs(pricing.cost(err.provider, err.model, err.usage) - resil.cost.total({})) <= 1e-6)
    end)

    it(model .. ": an error event after the first delta is stream_interrupted", function()
      m:configure({ strict = true, reply = "one two three", sequence = { [route] = { { kind = "error_event", after = 2 } } } })
      local s = ai.stream({ model = model, messages = MSGS })
      local d1, d2 = s:next(), s:next()
      assert.are.equal("one two ", d1 .. d2)
      local d3, err = s:next()
      assert.is_nil(d3)
      assert.are.equal("stream_interrupted", err.kind)
      assert.matches("error event", err.message)
    end)
  end

  -- (before: the stream's opening was its call's outcome, a success, and what broke it after was
  -- told to no one: a provider whose every stream was cut or failed after its first delta kept its
  -- breaker closed, and every later call went to it, never to the fallback)
  for _, kind in ipairs({ "cut", "error_event" }) do
    it("a provider whose streams break after their first delta (" .. kind .. ") opens its breaker", function()
      m:configure({ strict = true, reply = "one two three four", faults = { { route = "messages", kind = kind, after = 2 } } })
      ai.configure("anthropic", { base_url = m.url, api_key = ANTHROPIC_KEY, retry = { max_retries = 0 },
        breaker = { name = "ai-spec-streams-break-" .. kind, failure_rate = 0.6, min_calls = 4, window = 60, open_for = 60 } })
      -- (each stream one outcome, its end's: 4 broken, all failed. Counted at its opening too, as
      -- the reviewer found, a provider whose every stream broke stayed at half its calls failed,
      -- under this breaker's 0.6)
      for _ = 1, 4 do
        local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
        local _, err = pcall(function() for _ in s do end end)
        assert.are.equal("stream_interrupted", err.kind)
      end
      assert.are.equal("open", resil.breaker("ai-spec-streams-break-" .. kind):state())
      -- the next call goes to the fallback, the broken provider not asked
      local asked = m:stats().routes.messages
      local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, fallback = { "openai/gpt-4o-mini" } })
      for _ in s do end
      assert.are.equal("openai", assert(s:result()).provider)
      assert.are.equal(asked, m:stats().routes.messages)
    end)
  end

  -- a half-open breaker's probe that is a stream closes it only once the stream ended whole: its
  -- opening alone closed it, before the break that followed was seen
  it("a half-open breaker's probe stream that breaks after its first delta opens it again", function()
    ai.configure("anthropic", { base_url = m.url, api_key = ANTHROPIC_KEY, retry = { max_retries = 0 },
      breaker = { name = "ai-spec-streams-probe", failure_rate = 0.5, min_calls = 2, window = 60, open_for = 5 } })
    local br = resil.breaker("ai-spec-streams-probe")
    m:configure({ strict = true, reply = "one two three four", faults = { { route = "messages", kind = "cut", after = 2 } } })
    for _ = 1, 2 do pcall(function() for _ in ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS }) do end end) end
    assert.are.equal("open", br:state())
    resil.sleep(5)
    local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
    assert.is_string(s:next()) -- (the probe's opening)
    assert.are_not.equal("closed", br:state())
    pcall(function() for _ in s do end end)
    assert.are.equal("open", br:state())
    -- and one that ends whole closes it
    m:configure({ strict = true, reply = "one two three four" })
    resil.sleep(5)
    s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
    for _ in s do end
    assert.are.equal("closed", br:state())
  end)

  -- (the reviewer's find: ai.chat's answer was cut at a stop its provider was not sent, a stream's
  -- deltas and result were not: a reasoning model took none and wrote on past it)
  it("a stream ends at the first of the request's stop sequences, also one its provider was not sent", function()
    m:configure({ strict = true, reply = "one two three four five six" })
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY, drop_params = true })
    local before = ledger_rows()
    local s = ai.stream({ model = "openai/o3-mini", messages = MSGS, max_tokens = 100, stop = { "three" } })
    local parts = {}
    for delta in s do parts[#parts + 1] = delta end
    local r = assert(s:result())
    assert.are.same({ "one two ", "one two ", "stop", "stop_sequence", "three" },
      { table.concat(parts), r.text, r.finish_reason, r.stop_reason, r.stop_sequence })
    assert.is_true(helpers.wait_until(function() return ledger_rows() == before + 1 end, 5))
    -- a stop across two deltas ("two " then "three "): the first held back until the second says
    s = ai.stream({ model = "openai/o3-mini", messages = MSGS, max_tokens = 100, stop = { "two three" } })
    parts = {}
    for delta in s do parts[#parts + 1] = delta end
    assert.are.same({ "one ", "one ", "two three" }, { table.concat(parts), assert(s:result()).text,
      s:result().stop_sequence })
    -- a stop never met holds back nothing in the end: the whole text, its own end
    s = ai.stream({ model = "openai/o3-mini", messages = MSGS, max_tokens = 100, stop = { "six!", "sevenfold" } })
    parts = {}
    for delta in s do parts[#parts + 1] = delta end
    assert.are.equal("one two three four five six", table.concat(parts))
    assert.are.equal("one two three four five six", assert(s:result()).text)
  end)

  -- a stream its reader closes early says nothing against its provider
  it("streams closed by their reader after the first delta leave the breaker closed", function()
    ai.configure("anthropic", { base_url = m.url, api_key = ANTHROPIC_KEY,
      breaker = { name = "ai-spec-streams-closed", failure_rate = 0.5, min_calls = 4, window = 60, open_for = 60 } })
    for _ = 1, 4 do
      local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
      assert.is_string(s:next())
      s:close()
    end
    assert.are.equal("closed", resil.breaker("ai-spec-streams-closed"):state())
  end)

  it("a stream that stalls after its first delta is stream_interrupted at the idle timeout", function()
    -- message_start, content_block_start, ping, two deltas, then silence
    m:configure({ strict = true, reply = "one two three four", sequence = { messages = { { kind = "stall", after = 5 } } } })
    ai.configure("anthropic", { base_url = m.url, api_key = ANTHROPIC_KEY, idle_timeout = 30 })
    local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS })
    local ok, err = pcall(function() for _ in s do end end)
    assert.is_false(ok)
    assert.are.equal("stream_interrupted", err.kind)
    assert.are.equal("one two ", err.text)
    assert.are.equal("timeout", err.cause.kind)
  end)

  -- (before: the deadline bounded the stream's opening only; a stream that went on slowly was
  -- read to its provider's stream_timeout, ten minutes, past a deadline of seconds)
  it("a stream still going at the call's deadline is stream_interrupted then, with the text so far", function()
    m:configure({ strict = true, reply = "one two three four five six seven eight", stream_interval = 2 })
    local started = resil.now()
    local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, deadline = 7 })
    local ok, err = pcall(function() for _ in s do end end)
    assert.is_false(ok)
    assert.are.equal("stream_interrupted", err.kind)
    assert.are.equal("timeout", err.cause.kind)
    assert.truthy(#err.text > 0 and #err.text < #"one two three four five six seven eight", err.text)
    assert.is_true(resil.now() - started < 8, "read past the deadline: " .. (resil.now() - started))
  end)

  -- (reviewer R1: the deadline is what is left of it as each attempt starts)
  it("a stream whose first attempt was a 529 is still cut at the call's deadline, its hold given back", function()
    m:configure({ strict = true, reply = "one two three four five six seven eight", stream_interval = 2,
      sequence = { messages = { 529 } } })
    local b = resil.budget("ai-spec-stream-deadline", { limit = 1 })
    local started = resil.now()
    local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, deadline = 9, max_tokens = 100,
      budget = "ai-spec-stream-deadline" })
    local ok, err = pcall(function() for _ in s do end end)
    assert.is_false(ok)
    assert.are.same({ "stream_interrupted", "timeout" }, { err.kind, err.cause.kind })
    assert.is_true(resil.now() - started < 10, "read past the deadline: " .. (resil.now() - started))
    local st = assert(b:state())
    assert.are.equal(0, st.reserved)
    assert.is_true(st.spent > 0, "what was streamed is paid for")
  end)

  -- (before: the fallback was sent the tool, OpenAI's 400 ended the call, and a gateway's Anthropic
  -- client got that 400, which its SDK does not retry, instead of the overload, which it does)
  it("a fallback that cannot run the request's server tool is left out of the call", function()
    m:configure({ strict = true, reply = "one", sequence = { messages = { 529, 529, 529, 529 } } })
    local tools = { { type = "web_search_20250305", name = "web_search", max_uses = 2 } }
    local r, err = ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 16, tools = tools,
      fallback = { "openai/gpt-4o-mini" } })
    assert.is_nil(r)
    assert.are.equal("overloaded", err.class)
    assert.is_nil(m:stats().routes.chat)
    -- a call without one still falls back
    m:configure({ strict = true, reply = "one", sequence = { messages = { 529, 529, 529, 529 } } })
    r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 16,
      fallback = { "openai/gpt-4o-mini" } }))
    assert.are.equal("openai", r.provider)
  end)

  it("a stream that fails before its first delta falls back", function()
    m:configure({ strict = true, reply = "one two", sequence = { messages = { { kind = "error_event", after = 0 },
      { kind = "error_event", after = 0 }, { kind = "error_event", after = 0 }, { kind = "error_event", after = 0 } } } })
    local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, fallback = { "openai/gpt-4o-mini" } })
    local text = {}
    for d in s do text[#text + 1] = d end
    assert.are.equal("one two", table.concat(text))
    assert.are.equal("openai", assert(s:result()).provider)
    assert.are.equal(4, m:stats().routes.messages) -- overloaded: the try and 3 retries
    -- nothing streamed before each error: no output, no refused charge (the answer's row only)
    assert.are.equal(1, ledger_rows())
    assert.is_true(math.abs(assert(s:result()).cost_usd - resil.cost.total({})) < 1e-6) -- (the ledger keeps micro-USD)
  end)

  it("a stream cut before its first delta is retried", function()
    m:configure({ strict = true, reply = "one two", sequence = { chat = { { kind = "cut", after = 0 } } } })
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS })
    local text = {}
    for d in s do text[#text + 1] = d end
    assert.are.equal("one two", table.concat(text))
    assert.are.equal(2, m:stats().routes.chat)
  end)
end)

-- A budgeted call that runs longer than its budget's `hold` keeps its money held until it ends,
-- streamed or not (before: the hold stopped counting after `hold` seconds while the call ran,
-- another call reserved that money, and the long call's settle took the budget past its limit).
for _, b in ipairs(helpers.store_backends()) do
  describe("a budgeted call longer than its hold, on " .. b.name, function()
    local m
    teardown(function() if b.stop then b.stop() end end)
    before_each(function()
      resil.clock.virtual()
      resil.store_config({ url = b.url() })
      m = resil.mock.start({ strict = true, reply = ("word "):rep(20), stream_interval = 10 }) -- 10 s per delta
      point_at(m.url)
    end)
    after_each(function() m:stop() end)


    -- at t = 150 s, another reservation that fits only if the call's hold no longer counts
    local function reserve_at_150(bud, t0, held)
      return resil.spawn(function()
        resil.sleep(150 - (resil.now() - t0))
        return bud:reserve(1 - held / 2)
      end)
    end

    local function assert_refused(other)
      local joined, t, err = other:join()
      assert.is_true(joined, tostring(t))
      assert.is_nil(t, "the other call's reservation was admitted at t = 150 s")
      assert.are.equal("budget_exceeded", err.kind)
    end

    it("a stream of 200 s under hold = 60 keeps its reservation counted to its end, and is settled once", function()
      local name = "ai-spec-long-stream"
      local bud = resil.budget(name, { limit = 1, hold = 60 })
      local extensions = helpers.count_extensions(finally)
      local t0 = resil.now()
      local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 1000, budget = name })
      local deltas = { assert(s:next()) }
      local held = assert(bud:state()).reserved
      assert.is_true(held > 0)
      local other = reserve_at_150(bud, t0, held)
      for d in s do deltas[#deltas + 1] = d end
      assert.are.equal(20, #deltas)
      -- (the scenario: the stream outlived its hold 3 times; virtual seconds past earlier specs' fractions
      -- subtract to within a rounding of 200)
      assert.is_true(resil.now() - t0 >= 200 - 1e-6, tostring(resil.now() - t0))
      assert_refused(other)
      local r = assert(s:result())
      local st = assert(bud:state())
      assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
      assert.is_true(st.spent > 0 and math.abs(st.spent - r.cost_usd) <= 1e-6) -- (the ledger keeps micro-USD)
      assert.are.equal(1, ledger_rows())
      -- renewed as a third of the hold was left: a write per 40 s, not one per delta
      assert.is_true(extensions[1] >= 4 and extensions[1] <= 6, extensions[1] .. " extensions")
      resil.sleep(300) -- settled: nothing renews it any more
      assert.is_true(extensions[1] <= 6, extensions[1] .. " extensions")
    end)

    it("a call of 200 s that is not streamed keeps its reservation counted to its end", function()
      m:configure({ strict = true, reply = "slow answer", latency = { min = 200, max = 200 } })
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY, timeout = 300 })
      local name = "ai-spec-long-chat"
      local bud = resil.budget(name, { limit = 1, hold = 60 })
      local t0 = resil.now()
      local call = resil.spawn(ai.chat, { model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 1000,
        budget = name })
      resil.sleep(1)
      local held = assert(bud:state()).reserved
      assert.is_true(held > 0)
      local other = reserve_at_150(bud, t0, held)
      local joined, r, err = call:join()
      assert.is_true(joined, tostring(r))
      assert(r, tostring(err))
      assert.is_true(resil.now() - t0 >= 200 - 1e-6, tostring(resil.now() - t0))
      assert_refused(other)
      local st = assert(bud:state())
      assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
      assert.is_true(st.spent > 0 and math.abs(st.spent - r.cost_usd) <= 1e-6) -- (the ledger keeps micro-USD)
      assert.are.equal(1, ledger_rows())
    end)
  end)
end

-- (before: a provider configured with shared limits crashed every call: a shared bucket had no
-- wait_time for resil.acquire_all, nor observe for the provider's headers)
describe("a provider whose rate limits are shared (kept in the store)", function()
  local m, db
  before_each(function()
    resil.clock.virtual()
    resil.sleep(10) -- past the retry budget's window (see "chat over the strict mock")
    db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    m = resil.mock.start({ strict = true, reply = "shared limits" })
    point_at(m.url)
  end)
  after_each(function() m:stop() end)

  local function configure(tag)
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = OPENAI_KEY,
      rate = { rate = 100, per = 1, shared = true, name = tag .. ":requests" },
      tokens = { rate = 100000, per = 60, shared = true, name = tag .. ":tokens" } })
  end

  -- another process on the same store: -> whether its bucket `name` refused a token, for at least `seconds`
  local function held_elsewhere(name, seconds)
    local r = helpers.run_script(([[
local resil = require "resil"
local ok, wait = resil.bucket(%q, { rate = 100, per = 1, shared = true }):try(1)
print(ok, wait >= %g)
]]):format(name, seconds), "--store " .. db .. " --log-level off")
    return r.stdout == "false\ttrue\n", r.stdout .. r.stderr
  end

  it("ai.chat goes through them; a 429's Retry-After holds back the next call and another process", function()
    configure("ai-spec-shared")
    local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
    assert.are.equal("shared limits", r.text)
    m:configure({ strict = true, reply = "shared limits", sequence = { chat = { { status = 429, retry_after = 12 } } } })
    local res, err = ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
      retry = { max_retries = 0 } })
    local t0 = resil.now()
    assert.is_nil(res)
    assert.are.equal(429, err.status)
    -- (its clock runs behind this spec's virtual one: it waits at least the 12 s)
    assert.is_true(held_elsewhere("ai-spec-shared:requests", 11))
    r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
    assert.are.equal("shared limits", r.text)
    -- 12 s, then its estimated tokens at the tokens' rate (the bucket fills from empty after a pause)
    assert.is_true(resil.now() - t0 >= 12 - 1e-6 and resil.now() - t0 < 12.1, resil.now() - t0)
  end)

  it("an answer saying no requests are left until a reset holds back the next call and another process", function()
    configure("ai-spec-shared-reset")
    m:configure({ strict = true, reply = "shared limits", rate_limits = { requests = 1 } }) -- 1 a minute
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
    local t0 = resil.now()
    -- (the headers of an answer that went well are taken to the store by a task of their own, which
    -- the answer does not wait for: on a busy machine it was still waiting for the write lock)
    resil.sleep(0.5)
    assert.is_true(held_elsewhere("ai-spec-shared-reset:requests", 50))
    assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100 }))
    assert.is_true(math.abs(resil.now() - t0 - 60) < 1, resil.now() - t0) -- the mock's minute
  end)
end)

describe("keys and base URLs from the environment", function()
  -- a free port for a mock the child process starts
  local function free_port()
    local s = resil.server.listen({ handler = function() return { status = 200 } end })
    local port = s:port()
    s:close()
    return port
  end

  it("a missing key is an error naming the variable, before any request", function()
    local port = free_port()
    local script = helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      local ai = require "policies.ai"
      local m = resil.mock.start({ strict = true }, { port = %d })
      local r, err = ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } })
      print(r, err.kind, err.message)
      local ok, serr = pcall(ai.stream, { model = "anthropic/claude-haiku-4-5", messages = { { role = "user", content = "hi" } } })
      print(ok, serr.kind, serr.message)
      print("requests", m:stats().total)
      m:stop()
    ]]):format(port))
    local out = helpers.run(("env -u OPENAI_API_KEY -u ANTHROPIC_API_KEY OPENAI_BASE_URL=http://127.0.0.1:%d/v1 "
      .. "RESIL_STORE=%s %s %s"):format(port, helpers.tmpname(".db"), helpers.resil, script))
    assert.are.equal(0, out.code, out.stderr)
    assert.matches("nil\tmissing_secret\tOPENAI_API_KEY is not set", out.stdout)
    assert.matches("false\tmissing_secret\tANTHROPIC_API_KEY is not set", out.stdout)
    assert.matches("requests\t0", out.stdout)
  end)

  it("OPENAI_BASE_URL (with /v1), ANTHROPIC_BASE_URL (without) and the keys are read from the environment", function()
    local port = free_port()
    local script = helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      local ai = require "policies.ai"
      local m = resil.mock.start({ strict = true, reply = "pong" }, { port = %d })
      local a = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }))
      local b = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", messages = { { role = "user", content = "hi" } } }))
      print(a.text, b.text, m:stats().routes.chat, m:stats().routes.messages)
      m:stop()
    ]]):format(port))
    local out = helpers.run(("OPENAI_API_KEY=%s ANTHROPIC_API_KEY=%s OPENAI_BASE_URL=http://127.0.0.1:%d/v1 "
      .. "ANTHROPIC_BASE_URL=http://127.0.0.1:%d RESIL_STORE=%s %s %s"):format(OPENAI_KEY, ANTHROPIC_KEY, port, port,
      helpers.tmpname(".db"), helpers.resil, script))
    assert.are.equal(0, out.code, out.stderr)
    assert.are.equal("pong\tpong\t1\t1\n", out.stdout)
  end)
end)

-- (a provider copied into the project and saved with a syntax error was "ai: unknown provider
-- 'openai' (no policies/providers/openai.lua)": the file was there, and its error was lost)
describe("a provider file that does not load", function()
  it("raises its own file:line; a provider with no file is still unknown", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir .. "/providers"))
    helpers.write(dir .. "/providers/openai.lua", "return {\n  oops oops\n}\n")
    local out = helpers.run_script([[
      local ai = require "policies.ai"
      local msgs = { { role = "user", content = "hi" } }
      io.write(select(2, pcall(ai.chat, { model = "openai/gpt-4o-mini", messages = msgs })), "\n--\n")
      io.write(select(2, pcall(ai.chat, { model = "nowhere/model-1", messages = msgs })), "\n--\n")
    ]], ("--policies %s --store %s"):format(dir, helpers.tmpname(".db")))
    assert.are.equal(0, out.code, out.stderr)
    local broken, unknown = out.stdout:match("^(.-)\n%-%-\n(.-)\n%-%-\n$")
    assert.matches("providers/openai%.lua:2: '}' expected", broken)
    assert.is_nil(broken:find("unknown provider", 1, true))
    assert.matches("unknown provider 'nowhere' %(no policies/providers/nowhere%.lua%)", unknown)
  end)
end)

-- (before: a stream of a tool call alone was "empty": retried, each attempt paid, then an error)
describe("a streamed tool call", function()
  local streams = require "spec.provider_streams"
  local m, calls
  before_each(function()
    resil.clock.virtual()
    fresh_store()
    calls = 0
    m = resil.mock.start({ routes = {
      ["POST /v1/chat/completions"] = function()
        calls = calls + 1
        return streams.reply(streams.openai({ finish_reason = "tool_calls", usage = { prompt_tokens = 9, completion_tokens = 5 },
          tool_calls = { { id = "call_1", name = "get_weather", arguments = '{"city":"Paris"}' },
            { id = "call_2", name = "get_time", arguments = "" } } }))
      end,
      ["POST /v1/messages"] = function()
        calls = calls + 1
        return streams.reply(streams.anthropic({ stop_reason = "tool_use", content = "Checking.",
          thinking = { text = "weather first", signature = "sig" },
          tool_calls = { { id = "toolu_1", name = "get_weather", arguments = '{"city":"Paris"}' } } }))
      end } })
    point_at(m.url)
  end)
  after_each(function() m:stop() end)

  it("is an answer: one call, its calls gathered in the result, in both APIs", function()
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 50,
      tools = { { type = "function", ["function"] = { name = "get_weather", parameters = { type = "object" } } } } })
    local text = {}
    for delta in s do text[#text + 1] = delta end
    local r = assert(s:result())
    assert.are.equal("", table.concat(text))
    assert.are.equal("tool_calls", r.finish_reason)
    assert.are.same({ { id = "call_1", name = "get_weather", arguments = '{"city":"Paris"}' },
      { id = "call_2", name = "get_time", arguments = "{}" } }, r.tool_calls)
    assert.are.equal(5, r.usage.output_tokens)
    s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 50 })
    text = {}
    for delta in s do text[#text + 1] = delta end
    r = assert(s:result())
    assert.are.equal("Checking.", table.concat(text))
    assert.are.equal("tool_use", r.stop_reason)
    assert.are.same({ { id = "toolu_1", name = "get_weather", arguments = '{"city":"Paris"}' } }, r.tool_calls)
    assert.are.equal(2, calls)
    assert.are.equal(2, ledger_rows())
  end)

  it("with raw_events, gives the provider's own events, thinking first, the end marker last", function()
    local s = ai.stream({ model = "anthropic/claude-haiku-4-5", messages = MSGS, max_tokens = 50, raw_events = true })
    local names = {}
    while true do
      local ev, data = s:next_event()
      if not ev then
        assert.is_nil(data)
        break
      end
      names[#names + 1] = ev.event
      assert.are.equal(ev.event, data.type)
      if #names == 2 then assert.are.equal("thinking", data.content_block.type) end
    end
    assert.are.equal("message_start", names[1])
    assert.are.equal("message_stop", names[#names])
    assert.are.equal(1 + 5 + 3 + 4 + 2, #names) -- start, thinking (start, 3 deltas, stop), text, tool_use, end
    assert.are.same({ { id = "toolu_1", name = "get_weather", arguments = '{"city":"Paris"}' } }, assert(s:result()).tool_calls)
  end)
end)

describe("a streamed tool call, from a hostile or unusual provider", function()
  local m, body
  before_each(function()
    resil.clock.virtual()
    fresh_store()
    m = resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = body }
    end } })
    point_at(m.url)
  end)
  after_each(function() m:stop() end)
  local function chunk(delta, finish)
    return "data: " .. resil.json.encode({ id = "c", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, delta = delta, finish_reason = finish or resil.json.null } } }) .. "\n\n"
  end

  -- (before: deltas without an index were dropped, the stream was "empty": three paid attempts, an error)
  it("tool-call deltas without an index (Gemini's OpenAI API) are one call per id", function()
    body = chunk({ role = "assistant" }) ..
      chunk({ tool_calls = { { id = "c1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":' } } } }) ..
      chunk({ tool_calls = { { ["function"] = { arguments = '"Paris"}' } } } }) ..
      chunk({ tool_calls = { { id = "c2", type = "function", ["function"] = { name = "get_time", arguments = "{}" } } } }) ..
      chunk({}, "tool_calls") .. "data: [DONE]\n\n"
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 50 })
    for _ in s do end
    local r = assert(s:result())
    assert.are.same({ { id = "c1", name = "get_weather", arguments = '{"city":"Paris"}' },
      { id = "c2", name = "get_time", arguments = "{}" } }, r.tool_calls)
    assert.are.equal(1, m:stats().total)
  end)

  -- (before: 40 KB of arguments cut short was recorded as 0 output tokens)
  it("a stream cut in a tool call's arguments is recorded with them as output", function()
    local args = ("x"):rep(40000)
    body = chunk({ role = "assistant" }) ..
      chunk({ tool_calls = { { index = 0, id = "c1", type = "function", ["function"] = { name = "save", arguments = args } } } })
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 50000 })
    local _, err = s:next()
    assert.is_nil(err)
    repeat local delta, e = s:next() until delta == nil or e
    assert.are.equal("stream_interrupted", select(2, s:result()).kind)
    local row = assert(resil.cost.breakdown("provider"))[1]
    assert.is_true(row.usd >= require("policies.pricing").cost("openai", "gpt-4o-mini",
      { input_tokens = 0, output_tokens = 10000 }), tostring(row.usd))
  end)

  it("reasoning a compatible server streams opens a relayed stream at once (its events are not held back)", function()
    body = chunk({ role = "assistant" }) .. chunk({ reasoning_content = "thinking..." }) .. chunk({ content = "ok" }) ..
      chunk({}, "stop") .. "data: [DONE]\n\n"
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 50, raw_events = "openai" })
    assert.are.equal("", s:next()) -- (opened on the reasoning, before any text)
    local n = 0
    while s:next_event() do n = n + 1 end
    assert.are.equal(5, n)
  end)
end)

describe("a stream whose reader was canceled in its loop's body, in a script that then ends", function()
  -- (before: the stream, dropped unclosed, was to be recorded when collected; a script that ended
  -- before a collection had no ledger row for it, though the provider was paid for what it streamed)
  it("is recorded as what it streamed, once, before the process ends", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script(([[
local resil = require "resil"
local ai = require "policies.ai"
resil.store_config({ url = %q })
local m = resil.mock.start({ strict = true, reply = ("word "):rep(400) })
ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-spec-0123456789" })
local b = resil.budget("canceled-reader", { limit = 10 })
local t = resil.spawn(function()
  local s = assert(ai.stream({ model = "openai/gpt-4o-mini-2024-07-18", messages = { { role = "user", content = "hi" } },
    max_tokens = 1000, budget = b }))
  for _ in s do resil.sleep(0.05) end
end)
resil.sleep(0.5)
t:cancel()
]]):format(db), "--log-level error")
    assert.are.equal(0, r.code, r.stderr)
    resil.store_config({ url = db })
    local by = assert(resil.cost.breakdown("provider"))
    assert.are.equal(1, #by, r.stderr)
    assert.are.equal(1, by[1].calls)
    assert.is_true(by[1].usd > 0)
    local st = resil.budget("canceled-reader", { limit = 10 }):state()
    assert.are.same({ by[1].usd, 0 }, { st.spent, st.reserved })
  end)
end)

-- (before: after tool results, Anthropic's documented empty end_turn, the model having nothing to
-- add, was taken for empty output: sent again, each attempt paid, then an error)
describe("an empty end_turn from Anthropic", function()
  it("after tool results is the model's answer, sent once and recorded once; to a plain prompt it is sent again",
    function()
    local calls = 0
    local server = assert(resil.server.listen({ handler = function()
      calls = calls + 1
      return { status = 200, body = resil.json.encode({ id = "msg_" .. calls, type = "message", role = "assistant",
        model = "claude-haiku-4-5", content = setmetatable({}, resil.json.array_mt), stop_reason = "end_turn",
        usage = { input_tokens = 40, output_tokens = 2 } }) }
    end }))
    finally(function() server:close() end)
    fresh_store()
    point_at(("http://127.0.0.1:%d"):format(server:port()))
    local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, retry = { base = 0 }, messages = {
      { role = "user", content = "Weather in Paris?" },
      { role = "assistant", content = resil.json.null, tool_calls = {
        { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } } } },
      { role = "tool", tool_call_id = "call_1", content = "18C" } } }))
    assert.are.same({ "", "stop", 1, 1 }, { r.text, r.finish_reason, calls, ledger_rows() })
    local _, err = ai.chat({ model = "anthropic/claude-haiku-4-5", max_tokens = 50, retry = { base = 0 },
      messages = { { role = "user", content = "Weather in Paris?" } } })
    assert.are.equal("invalid_output", err.kind)
    assert.is_true(calls > 2, tostring(calls))
  end)
end)
