-- The OpenAI adapter's body for a reasoning model (the o-series, gpt-5): what it takes, by the
-- model's name, and a project's own names for one (an Azure deployment's)
local resil = require "resil"
resil.log.level("off")
local openai = require "policies.providers.openai"

local MSGS = { { role = "user", content = "hi" } }

describe("the OpenAI adapter and reasoning models", function()
  it("sends max_completion_tokens and leaves out sampling but the default, to a compatible server too", function()
    local b = openai.body({ messages = MSGS, max_tokens = 50, temperature = 0.3, top_p = 0.9, presence_penalty = 0.5 },
      "o3", {})
    assert.are.equal(50, b.max_completion_tokens)
    assert.is_nil(b.max_tokens)
    assert.is_nil(b.temperature)
    assert.is_nil(b.top_p)
    assert.is_nil(b.presence_penalty)
    b = openai.body({ messages = MSGS, max_tokens = 50, temperature = 1 }, "gpt-5-mini", {})
    assert.are.equal(1, b.temperature) -- (the default is taken)
    -- a chat model is sent what it was
    b = openai.body({ messages = MSGS, max_tokens = 50, temperature = 0.3 }, "gpt-4o-mini", {})
    assert.are.same({ 50, 0.3 }, { b.max_tokens, b.temperature })
    b = openai.body({ messages = MSGS, max_tokens = 50, temperature = 0.3 }, "gpt-5-chat-latest", {})
    assert.are.same({ 50, 0.3 }, { b.max_tokens, b.temperature })
  end)

  it("sends four stop sequences of more, and none to a model that takes none", function()
    local b = openai.body({ messages = MSGS, stop = { "a", "b", "c", "d", "e", "f" } }, "gpt-4o-mini", {})
    assert.are.same({ "a", "b", "c", "d" }, b.stop)
    b = openai.body({ messages = MSGS, stop = { "a", "b" } }, "gpt-4o-mini", {})
    assert.are.same({ "a", "b" }, b.stop)
    b = openai.body({ messages = MSGS, stop = "a" }, "o4-mini", {})
    assert.is_nil(b.stop)
  end)

  it("keeps gpt-5.1's sampling at its default effort (none), not at another", function()
    local b = openai.body({ messages = MSGS, temperature = 0.3 }, "gpt-5.2", {})
    assert.are.equal(0.3, b.temperature)
    b = openai.body({ messages = MSGS, temperature = 0.3, reasoning_effort = "high" }, "gpt-5.2", {})
    assert.is_nil(b.temperature)
    b = openai.body({ messages = MSGS, temperature = 0.3, provider_options = { openai = { reasoning_effort = "low" } } },
      "gpt-5.1", {})
    assert.is_nil(b.temperature)
  end)

  it("leaves reasoning_effort out for a chat model that refuses it (a fallback from a reasoning model)", function()
    local b = openai.body({ messages = MSGS, max_tokens = 50, reasoning_effort = "high", temperature = 0.3 }, "gpt-4o", {})
    assert.are.same({ 50, 0.3 }, { b.max_tokens, b.temperature })
    assert.is_nil(b.reasoning_effort)
    b = openai.body({ messages = MSGS, reasoning_effort = "high" }, "o3", {})
    assert.are.equal("high", b.reasoning_effort)
    b = openai.body({ messages = MSGS, reasoning_effort = "high" }, "gpt-oss-120b", {}) -- (a compatible server's)
    assert.are.equal("high", b.reasoning_effort)
  end)

  it("takes a project's own names for reasoning models (ai.configure's reasoning_models)", function()
    local conf = { reasoning_models = { "^my%-reasoner" } }
    local b = openai.body({ messages = MSGS, max_tokens = 50, temperature = 0.3 }, "my-reasoner-eu", conf)
    assert.are.same({ 50, nil, nil }, { b.max_completion_tokens, b.max_tokens, b.temperature })
    b = openai.body({ messages = MSGS, max_tokens = 50, temperature = 0.3 }, "my-chat", conf)
    assert.are.same({ 50, 0.3 }, { b.max_tokens, b.temperature })
    -- an option ai.configure knows (not warned about as a misspelling)
    local ai = require "policies.ai"
    local warned = {}
    local warn = resil.log.warn
    resil.log.warn = function(msg) warned[#warned + 1] = msg end
    ai.configure("openai", { api_key = "sk-x", reasoning_models = { "^my%-reasoner" } })
    resil.log.warn = warn
    assert.are.same({}, warned)
  end)

  -- (found in review, helper R: the kind was kept per target conf, and a deployment's target, with
  -- its conf, is made for every call: each request matched its model's name again, 0.6 us more)
  it("matches a model's name once, not on every request to a deployment", function()
    local ai = require "policies.ai"
    local registry = require "policies.registry"
    local looked = 0 -- (each pattern list walked: ipairs reads its first entry through __index)
    local own = setmetatable({}, { __index = function(_, i) if i == 1 then looked = looked + 1 end end })
    ai.configure("openai", { api_key = "sk-x", reasoning_models = own })
    registry.use({ spread = { deployments = {
      { name = "dep-r1", use = "openai/o3-mini" }, { name = "dep-r2", use = "openai/o3-mini" } } } })
    for _ = 1, 20 do
      local targets = assert(ai.targets({ model = "spread", messages = MSGS }))
      local w = ai.wire_request(targets[1], { messages = MSGS, max_tokens = 50, temperature = 0.3 })
      assert.are.same({ 50, nil, nil }, { w.json.max_completion_tokens, w.json.max_tokens, w.json.temperature })
    end
    assert.are.equal(1, looked)
    registry.use() -- (the shipped registry back: an empty one broke the spec files after this one)
  end)
end)

-- A field the model refuses is left out only for a model the request did not name: the one it
-- named is sent it, and its 400 says what is wrong, as the API itself would (left out, the
-- client's temperature or fifth stop sequence was dropped without a word to it)
describe("the OpenAI adapter and a model the request named", function()
  it("sends a named model the fields it refuses; leaves them out for a fallback's or an alias's", function()
    local asked = { messages = MSGS, temperature = 0.3, stop = { "a", "b", "c", "d", "e" } }
    for _, named in ipairs({ "o3", "openai/o3", "azure/o3" }) do
      asked.model = named
      local b = openai.body(asked, "o3", {})
      assert.are.same({ 0.3, 5 }, { b.temperature, #b.stop }, named)
    end
    for _, other in ipairs({ "anthropic/claude-sonnet-4-5", "fast", "openai/o3-mini", "xo3" }) do
      asked.model = other
      local b = openai.body(asked, "o3", {})
      assert.are.same({}, { b.temperature, b.stop }, other)
    end
    -- a gateway's client: the name it sent, not its alias's model
    asked.model, asked.client_model = "openai/o3", "fast"
    assert.is_nil(openai.body(asked, "o3", {}).temperature)
    asked.client_model = nil
    -- a chat model named with more than four stop sequences, and a reasoning_effort it refuses
    local b = openai.body({ model = "gpt-4o-mini", messages = MSGS, stop = { "a", "b", "c", "d", "e" },
      reasoning_effort = "high" }, "gpt-4o-mini", {})
    assert.are.same({ 5, "high" }, { #b.stop, b.reasoning_effort })
  end)

  it("leaves them out for every model with drop_params", function()
    local b = openai.body({ model = "openai/o3", messages = MSGS, temperature = 0.3 }, "o3", { drop_params = true })
    assert.is_nil(b.temperature)
    local ai = require "policies.ai"
    assert.are.equal(0, #select(2, pcall(function() -- (an option the adapter reads: no warning)
      local warned = {}
      local level = resil.log.level()
      resil.log.level("warn")
      local old = resil.log.warn
      resil.log.warn = function(msg) warned[#warned + 1] = msg end
      ai.configure("openai", { drop_params = true })
      resil.log.warn = old
      resil.log.level(level)
      return warned
    end)))
  end)
end)
