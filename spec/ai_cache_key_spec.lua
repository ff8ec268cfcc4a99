-- ai.chat's cache = {ttl=}: an answer is kept under what determined it (the provider, its
-- endpoint, the model, the body sent), so a caller pointed at another server never gets
-- that server's answers. Real mock servers on loopback, a real SQLite store, a real
-- sandboxed process beside the spec's.
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"

local MSGS = { { role = "user", content = "What is the capital of France?" } }
local KEY = "sk-spec-openai-0123456789"

describe("ai.chat's cache", function()
  local honest, planted, db
  before_each(function()
    resil.clock.real()
    resil.log.level("off")
    honest = assert(resil.mock.start({ reply = "Paris" }))
    planted = assert(resil.mock.start({ reply = "Lyon, visit evil.example" }))
    db = helpers.tmpname(".db")
    resil.store_config({ url = db })
  end)
  after_each(function()
    honest:stop()
    planted:stop()
    resil.log.level("info")
  end)

  local function ask(url)
    ai.configure("openai", { base_url = url .. "/v1", api_key = KEY })
    return assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, cache = { ttl = 600 } }))
  end

  it("two configurations of one provider at different base_url do not share answers", function()
    local a = ask(planted.url)
    assert.are.equal("Lyon, visit evil.example", a.text)
    local b = ask(honest.url)
    assert.are.equal("Paris", b.text)
    assert.is_falsy(b.cached)
    assert.are.equal(1, honest:stats().routes.chat)
    -- each endpoint's own repeat is still a hit
    local c = ask(honest.url)
    assert.are.equal("Paris", c.text)
    assert.is_true(c.cached)
    assert.are.equal(1, honest:stats().routes.chat)
    local d = ask(planted.url)
    assert.is_true(d.cached)
    assert.are.equal("Lyon, visit evil.example", d.text)
    assert.are.equal(1, planted:stats().routes.chat)
  end)

  it("a sandboxed script pointing openai at its own server plants nothing another process is served", function()
    -- (in the background: the mocks are this process's, served while it waits)
    local pid, out = helpers.start(([[
      local ai = require "policies.ai"
      ai.configure("openai", { base_url = %q, api_key = %q })
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user",
        content = "What is the capital of France?" } }, cache = { ttl = 600 } }))
      print(r.text)
    ]]):format(planted.url .. "/v1", KEY), "--sandbox --log-level off --store " .. db)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    assert.are.equal("Lyon, visit evil.example\n", helpers.slurp(out))
    local r = ask(honest.url)
    assert.are.equal("Paris", r.text)
    assert.is_falsy(r.cached)
    assert.are.equal(1, honest:stats().routes.chat)
  end)

  it("one base_url with another model, or a body the target changes, is another answer", function()
    ask(honest.url)
    ai.configure("openai", { base_url = honest.url .. "/v1", api_key = KEY })
    local r = assert(ai.chat({ model = "openai/gpt-4o", messages = MSGS, cache = { ttl = 600 } }))
    assert.is_falsy(r.cached)
    assert.are.equal(2, honest:stats().routes.chat)
  end)
end)
