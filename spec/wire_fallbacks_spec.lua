-- Anthropic's server-side fallback (the beta's `fallbacks`): a model that declines hands the
-- request to the next, and the answer is priced at the model that served it, which the answer's
-- usage.iterations and fallback blocks name (a stream's message_start names the model asked
-- for). The strict mock declines as the API does (scenario.refuses).
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"
local pricing = require "policies.pricing"

local MSGS = { { role = "user", content = "Say hello" } }
local BETA = { anthropic = { ["anthropic-beta"] = "server-side-fallback-2026-07-01" } }

describe("Anthropic's server-side fallback", function()
  local m
  before_each(function()
    resil.clock.virtual()
    resil.sleep(10)
    resil.store_config({ url = helpers.tmpname(".db") })
    m = resil.mock.start({ strict = true, reply = "one two three four five six",
      refuses = { "claude-fable-5-1", "claude-opus-5-5" } })
    ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-spec-0123456789" })
  end)
  after_each(function() m:stop() end)

  local function req(fallbacks, stream)
    return { model = "anthropic/claude-fable-5-1", messages = MSGS, max_tokens = 100, provider_headers = BETA,
      provider_options = { anthropic = { fallbacks = fallbacks } } }
  end

  it("prices an answer a fallback served at the model that served it, whole and streamed", function()
    local fallbacks = { { model = "claude-opus-5-5" }, { model = "claude-haiku-4-5" } }
    local r = assert(ai.chat(req(fallbacks)))
    assert.are.equal("one two three four five six", r.text)
    assert.are.equal("claude-haiku-4-5", r.model)
    assert.are.equal(pricing.cost("anthropic", "claude-haiku-4-5", r.usage), r.cost_usd)
    local st = ai.stream(req(fallbacks))
    local text = {}
    for delta in st do text[#text + 1] = delta end
    local s = assert(st:result())
    assert.are.equal("one two three four five six", table.concat(text))
    assert.are.equal("claude-haiku-4-5", s.model) -- (its message_start names claude-fable-5-1)
    assert.are.equal(pricing.cost("anthropic", "claude-haiku-4-5", s.usage), s.cost_usd)
  end)

  -- (before: the declined hops' input, a part of the top-level usage, was priced at the serving
  -- model's rate: Fable's and Opus's input at Haiku's $1, a third of the row's true cost)
  it("prices each hop at its own model's rate: the declined hops' input at theirs, whole and streamed", function()
    local fallbacks = { { model = "claude-opus-5-5" }, { model = "claude-haiku-4-5" } }
    local r = assert(ai.chat(req(fallbacks)))
    local hop = r.usage.input_tokens / 3 -- (each hop read the same prompt; the declined ones wrote nothing)
    assert.is_true(hop > 0 and r.usage.output_tokens > 0)
    -- claude-fable-5-1 $10, claude-opus-5-5 $4, claude-haiku-4-5 $1 a million input; Haiku $5 output
    local want = (hop * 10 + hop * 4 + hop * 1 + r.usage.output_tokens * 5) / 1e6
    assert.are.equal(string.format("%.9f", want), string.format("%.9f", r.cost_usd))
    assert.are.equal(string.format("%.9f", want), string.format("%.9f", resil.cost.total({})))
    local st = ai.stream(req(fallbacks))
    for _ in st do end
    local s = assert(st:result())
    assert.are.equal(string.format("%.9f", want), string.format("%.9f", s.cost_usd))
    assert.are.equal(string.format("%.9f", 2 * want), string.format("%.9f", resil.cost.total({})))
  end)

  it("a usage whose hops do not add up to it is priced whole at the serving model", function()
    local usage = { input_tokens = 300, output_tokens = 20, cached_input_tokens = 0, cache_write_tokens = 0 }
    local anthropic = require "policies.providers.anthropic"
    local u = anthropic.usage({ input_tokens = 300, output_tokens = 20, iterations = {
      { type = "message", model = "claude-fable-5-1", input_tokens = 100, output_tokens = 0 },
      { type = "fallback_message", model = "claude-haiku-4-5", input_tokens = 100, output_tokens = 20 } } })
    assert.are.equal(2, #u.parts) -- (200 of the 300 accounted for: not the usage's breakdown)
    assert.are.equal(pricing.cost("anthropic", "claude-haiku-4-5", usage), pricing.cost("anthropic", "claude-haiku-4-5", u))
    -- the same hops adding up: each at its own rate (Fable's $10 input, Haiku's $1 input and $5 output)
    u = anthropic.usage({ input_tokens = 200, output_tokens = 20, iterations = {
      { type = "message", model = "claude-fable-5-1", input_tokens = 100, output_tokens = 0 },
      { type = "fallback_message", model = "claude-haiku-4-5", input_tokens = 100, output_tokens = 20 } } })
    assert.are.equal((100 * 10 + 100 * 1 + 20 * 5) / 1e6, pricing.cost("anthropic", "claude-haiku-4-5", u))
    -- a tool loop's iterations, no fallback: no parts
    assert.is_nil(anthropic.usage({ input_tokens = 200, output_tokens = 20, iterations = {
      { type = "message", model = "claude-haiku-4-5", input_tokens = 100, output_tokens = 5 },
      { type = "message", model = "claude-haiku-4-5", input_tokens = 100, output_tokens = 15 } } }).parts)
  end)

  it("a model that declines, without a fallback that serves, is a refusal priced at its own model", function()
    local r = assert(ai.chat(req({ { model = "claude-opus-5-5" } })))
    assert.are.equal("content_filter", r.finish_reason)
    assert.are.equal("refusal", r.stop_reason)
    assert.are.equal("claude-fable-5-1", r.model)
    assert.are.equal(pricing.cost("anthropic", "claude-fable-5-1", r.usage), r.cost_usd)
  end)
end)
