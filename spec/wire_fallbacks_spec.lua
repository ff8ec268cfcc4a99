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

  it("a model that declines, without a fallback that serves, is a refusal priced at its own model", function()
    local r = assert(ai.chat(req({ { model = "claude-opus-5-5" } })))
    assert.are.equal("content_filter", r.finish_reason)
    assert.are.equal("refusal", r.stop_reason)
    assert.are.equal("claude-fable-5-1", r.model)
    assert.are.equal(pricing.cost("anthropic", "claude-fable-5-1", r.usage), r.cost_usd)
  end)
end)
