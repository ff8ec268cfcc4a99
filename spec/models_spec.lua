-- The model registry (policies/registry.lua over policies/models.lua):
-- aliases, pinned versions, deprecations, migrations with their rollback,
-- deployments; against the strict mock and a real store.
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"
local registry = require "policies.registry"

local MSGS = { { role = "user", content = "Say hello" } }
local shipped = registry.entries

local function point_at(url)
  ai.configure("openai", { base_url = url .. "/v1", api_key = "sk-spec-openai-0123456789", retry = { base = 0.01 } })
  ai.configure("anthropic", { base_url = url, api_key = "sk-ant-spec-0123456789", retry = { base = 0.01 } })
end

local logged = helpers.logged

local function with_msg(lines, pattern)
  local out = {}
  for _, l in ipairs(lines) do if l.msg:find(pattern) then out[#out + 1] = l end end
  return out
end

local function date_in(days)
  return os.date("!%Y-%m-%d", math.floor(resil.store_now() + days * 86400))
end

local m, store_path
before_each(function()
  resil.clock.virtual()
  store_path = helpers.tmpname(".db")
  resil.store_config({ url = store_path })
  m = resil.mock.start({ strict = true, reply = "one two three" })
  point_at(m.url)
  registry.reset_warnings()
end)
after_each(function()
  m:stop()
  registry.use(shipped, "policies/models.lua")
  registry.random = math.random
end)

describe("aliases", function()
  it("an alias calls its pinned model and says so in the result", function()
    local r = assert(ai.chat({ model = "chat-fast", messages = MSGS }))
    assert.are.equal("openai", r.provider)
    assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
    assert.are.equal("chat-fast", r.alias)
  end)

  it("an alias falls back across providers to its fallbacks", function()
    m:configure({ strict = true, reply = "one two three", sequence = { chat = { 500, 500, 500, 500 } } })
    local r = assert(ai.chat({ model = "chat-fast", messages = MSGS }))
    assert.are.equal("anthropic", r.provider)
    assert.are.equal("claude-haiku-4-5-20251001", r.requested_model)
  end)

  it("a fallback that cannot be used is warned about once, not on every call", function()
    registry.use({ broken = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "zz-unknown" } } })
    local lines = logged(function()
      for _ = 1, 20 do assert(ai.chat({ model = "broken", messages = MSGS })) end
    end)
    assert.are.equal(1, #with_msg(lines, "a fallback cannot be used"))
  end)

  it("an alias may name another alias, and the alias's deadline applies", function()
    registry.use({ inner = { use = "openai/gpt-4o-mini-2024-07-18" }, outer = { use = "inner", deadline = 5 } })
    local r = assert(ai.chat({ model = "outer", messages = MSGS }))
    assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
    assert.are.equal("outer", r.alias)
  end)

  -- (before: the fallback's deadline was the whole call's: a primary answering in 8 s was cut at 5 s,
  -- and the call failed, because the alias it falls back to says 5 s)
  it("a fallback alias's deadline is not the call's: the primary, with none, is not cut by it", function()
    registry.use({ main = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "quick" } },
      quick = { use = "anthropic/claude-haiku-4-5-20251001", deadline = 5 },
      front = { use = "quick" } })
    m:configure({ strict = true, reply = "one two three", latency = 8 })
    local r = assert(ai.chat({ model = "main", messages = MSGS }))
    assert.are.equal("openai", r.provider)
    assert.is_nil(registry.resolve("main", {}).deadline)
    assert.are.equal(5, registry.resolve("front", {}).deadline) -- (an alias naming it: its deadline applies)
  end)

  it("an unknown alias raises at the caller's line, naming the closest known names", function()
    local ok, err = pcall(function()
      local r = ai.chat({ model = "chat-fsat", messages = MSGS }) -- not a tail call: this line is in the message
      return r
    end)
    assert.is_false(ok)
    assert.matches("models_spec.lua:%d+: ai: model 'chat%-fsat' must name its provider", err)
    assert.matches("closest: chat%-fast", err)
    ok, err = pcall(function() return ai.chat({ model = "gpt-4o", messages = MSGS }) end)
    assert.matches("closest: openai/gpt%-4o,", err)
  end)

  it("an unpinned model warns once per process and counts every call in a metric", function()
    local unpinned = resil.metrics.counter("resil_model_unpinned_total")
    local before = unpinned:value({ model = "openai/gpt-4o-mini" })
    local lines = logged(function()
      for _ = 1, 3 do assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS })) end
      assert(ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = MSGS }))
    end)
    local warned = with_msg(lines, "not pinned")
    assert.are.equal(1, #warned)
    assert.are.equal("openai/gpt-4o-mini", warned[1].model)
    assert.are.equal(before + 3, unpinned:value({ model = "openai/gpt-4o-mini" }))
  end)

  it("pinned means a date or a version", function()
    assert.is_true(registry.is_pinned("openai/gpt-4o-mini-2024-07-18"))
    assert.is_true(registry.is_pinned("anthropic/claude-haiku-4-5-20251001"))
    assert.is_true(registry.is_pinned("replicate/bytedance/seedance-1-lite:5f1e2d3c"))
    assert.is_true(registry.is_pinned("elevenlabs/eleven_flash_v2_5"))
    assert.is_false(registry.is_pinned("openai/gpt-4o"))
    assert.is_false(registry.is_pinned("replicate/bytedance/seedance-1-lite"))
  end)

  -- (before: a rule that is no Lua pattern, "[%d", raised "policies/registry.lua:625: malformed
  -- pattern" from every call of an unpinned model of that provider: a warning's rule failed the calls)
  it("a pinning rule that is no pattern is skipped, said once naming it; the calls serve", function()
    local rules = registry.pinned.openai
    registry.pinned.openai = { "[%d", "-%d%d%d%d%-%d%d%-%d%d$" }
    finally(function() registry.pinned.openai = rules end)
    local lines = logged(function()
      for _ = 1, 2 do assert(ai.chat({ model = "openai/gpt-4o", messages = MSGS })) end
      assert(ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = MSGS }))
    end)
    local said = with_msg(lines, "pinning rule")
    assert.are.equal(1, #said)
    assert.are.equal("[%d", said[1].rule)
    assert.are.equal("openai", said[1].provider)
    assert.matches("malformed pattern", said[1].error)
    assert.is_true(registry.is_pinned("openai/gpt-4o-mini-2024-07-18"))
    assert.is_false(registry.is_pinned("openai/gpt-4o"))
  end)

  -- (before: the shipped chat-best named claude-sonnet-4-5-20250929, which Anthropic retired, and
  -- a migration to a current Claude failed `check` twice: no price, and "not pinned")
  it("Anthropic's undated ids from Claude 4.6 on are snapshots; the shipped chat-best is one, and priced", function()
    for _, m in ipairs({ "claude-sonnet-4-6", "claude-sonnet-5", "claude-sonnet-5-5", "claude-opus-5-5" }) do
      assert.is_true(registry.is_pinned("anthropic/" .. m), m)
    end
    assert.is_false(registry.is_pinned("anthropic/claude-sonnet-4-5")) -- (an alias that moved)
    assert.is_false(registry.is_pinned("anthropic/claude-haiku-4-5"))
    local shipped = dofile("policies/models.lua") -- (specs run at the top of the repository)
    local best = shipped["chat-best"].use
    assert.are.equal("anthropic/claude-sonnet-5-5", best)
    assert.is_true(registry.is_pinned(best))
    local pricing = require "policies.pricing"
    -- $2 / $10 per million, cache writes $2.50 (5 min) and $4 (1 h), reads $0.20
    local usd = pricing.cost("anthropic", "claude-sonnet-5-5", { input_tokens = 100, output_tokens = 500 })
    assert.is_true(math.abs(usd - 0.0052) < 1e-12, tostring(usd))
  end)
end)

describe("deprecations", function()
  -- (before: a pinned model the provider retired fell back on every call at info level only: each
  -- call paid a round trip for the 404 and nobody was told)
  it("a model the provider answers 404 for is warned about once and counted on every call; calls fall back", function()
    m:configure({ strict = true, reply = "one two three", sequence = { chat = {
      { status = 404, error_type = "invalid_request_error", error_code = "model_not_found" },
      { status = 404, error_type = "invalid_request_error", error_code = "model_not_found" },
      { status = 404, error_type = "invalid_request_error", error_code = "model_not_found" } } } })
    local gone = resil.metrics.counter("resil_model_not_found_total")
    local before = gone:value({ model = "openai/gpt-4o-2024-11-20" })
    local lines = logged(function()
      for _ = 1, 3 do
        local r = assert(ai.chat({ model = "openai/gpt-4o-2024-11-20", messages = MSGS,
          fallback = { "anthropic/claude-haiku-4-5-20251001" } }))
        assert.are.equal("anthropic", r.provider)
      end
    end)
    local warned = with_msg(lines, "answered 404 for this model")
    assert.are.equal(1, #warned)
    assert.are.equal("openai/gpt-4o-2024-11-20", warned[1].model)
    assert.are.equal(before + 3, gone:value({ model = "openai/gpt-4o-2024-11-20" }))
    assert.are.equal(3, m:stats().routes.chat) -- (a 404 is not retried)
  end)

  -- (before: only ai.chat's calls were: a stream's, as a chat UI's or a gateway's stream = true
  -- request makes, fell back from the 404 with no warning and no count)
  it("a model the provider answers 404 for in a stream or an embedding is warned about and counted as in a chat", function()
    m:configure({ strict = true, reply = "one two three", sequence = { chat = {
      { status = 404, error_type = "invalid_request_error", error_code = "model_not_found" },
      { status = 404, error_type = "invalid_request_error", error_code = "model_not_found" } } } })
    local gone = resil.metrics.counter("resil_model_not_found_total")
    local before = gone:value({ model = "openai/gpt-4o-2024-08-06" })
    local lines = logged(function()
      for _ = 1, 2 do
        local s = ai.stream({ model = "openai/gpt-4o-2024-08-06", messages = MSGS,
          fallback = { "anthropic/claude-haiku-4-5-20251001" } })
        local text = {}
        for piece in function() return s:next() end do text[#text + 1] = piece end
        assert.are.equal("anthropic", assert(s:result()).provider)
        s:close()
      end
    end)
    local warned = with_msg(lines, "answered 404 for this model")
    assert.are.equal(1, #warned)
    assert.are.equal("openai/gpt-4o-2024-08-06", warned[1].model)
    assert.are.equal(before + 2, gone:value({ model = "openai/gpt-4o-2024-08-06" }))
    -- and an embedding's
    m:configure({ strict = true, sequence = { embeddings = {
      { status = 404, error_type = "invalid_request_error", error_code = "model_not_found" } } } })
    before = gone:value({ model = "openai/text-embedding-2" })
    lines = logged(function()
      assert.is_nil((ai.embed({ model = "openai/text-embedding-2", input = "hello" })))
    end)
    assert.are.equal(1, #with_msg(lines, "answered 404 for this model"))
    assert.are.equal(before + 1, gone:value({ model = "openai/text-embedding-2" }))
  end)

  -- (before: a 400, the caller's bad request: no fallback, so every call of a retired pin failed
  -- where an OpenAI-compatible server or OpenAI's Responses API says model_not_found with a 400)
  it("a model the provider answers 400 model_not_found for falls back, is counted, and its error names it", function()
    local retired = { status = 400, body = '{"error":{"message":"The model `gpt-4o-2024-11-20` does not exist or ' ..
      'you do not have access to it.","type":"invalid_request_error","param":"model","code":"model_not_found"}}' }
    m:configure({ strict = true, reply = "one two three", sequence = { chat = { retired, retired } } })
    local gone = resil.metrics.counter("resil_model_not_found_total")
    local before = gone:value({ model = "openai/gpt-4o-2024-11-20" })
    local r = assert(ai.chat({ model = "openai/gpt-4o-2024-11-20", messages = MSGS,
      fallback = { "anthropic/claude-haiku-4-5-20251001" } }))
    assert.are.same({ "anthropic", "claude-haiku-4-5-20251001" }, { r.provider, r.requested_model })
    local _, err = ai.chat({ model = "openai/gpt-4o-2024-11-20", messages = MSGS })
    assert.are.equal("not_found", err.class)
    assert.matches("does not exist", err.message, 1, true)
    assert.are.equal(before + 2, gone:value({ model = "openai/gpt-4o-2024-11-20" }))
    assert.are.equal(2, m:stats().routes.chat) -- (not retried)
  end)

  it("warn with the days left before the sunset, then route to the replacement on and after it", function()
    registry.use({ ["openai/gpt-4o-2024-05-13"] = { deprecated = true, replacement = "openai/gpt-4o-2024-08-06",
      sunset = date_in(2.5) } })
    local days = resil.metrics.gauge("resil_model_sunset_days")
    local lines = logged(function()
      for _ = 1, 2 do
        local r = assert(ai.chat({ model = "openai/gpt-4o-2024-05-13", messages = MSGS }))
        assert.are.equal("gpt-4o-2024-05-13", r.requested_model)
        assert.is_nil(r.routed)
      end
    end)
    local warned = with_msg(lines, "deprecated")
    assert.are.equal(1, #warned)
    assert.is_true(warned[1].days_left == 2 or warned[1].days_left == 3)
    assert.is_true(days:value({ model = "openai/gpt-4o-2024-05-13" }) > 1)

    resil.sleep(3 * 86400) -- the virtual clock moves the store's wall time
    lines = logged(function()
      for _ = 1, 2 do
        local r = assert(ai.chat({ model = "openai/gpt-4o-2024-05-13", messages = MSGS }))
        assert.are.equal("gpt-4o-2024-08-06", r.requested_model)
        assert.are.same({ from = "openai/gpt-4o-2024-05-13", to = "openai/gpt-4o-2024-08-06", reason = "sunset",
          sunset = date_in(-0.5) }, r.routed)
      end
    end)
    assert.are.equal(1, #with_msg(lines, "past its sunset"))
    assert.are.equal(0, days:value({ model = "openai/gpt-4o-2024-05-13" }))
  end)

  -- (before: r.routed said the call went to a replacement for a sunset where its primary served it,
  -- the routing being its fallback's)
  it("a fallback's routing past its sunset is not the call's: r.routed is nil when the primary serves", function()
    registry.use({ main = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "openai/gpt-4o-2024-05-13" } },
      ["openai/gpt-4o-2024-05-13"] = { deprecated = true, replacement = "openai/gpt-4o-2024-08-06",
        sunset = date_in(-1) } })
    local r = assert(ai.chat({ model = "main", messages = MSGS }))
    assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
    assert.is_nil(r.routed)
  end)

  it("a sunset passed with no replacement fails the call before anything is sent", function()
    registry.use({ ["openai/gpt-4o-2024-05-13"] = { deprecated = true, sunset = date_in(-1) } })
    local r, err = ai.chat({ model = "openai/gpt-4o-2024-05-13", messages = MSGS })
    assert.is_nil(r)
    assert.are.equal("model_retired", err.kind)
    assert.are.equal(0, m:stats().total)
  end)
end)

local MIGRATION = { use = "openai/gpt-4o-mini-2024-07-18",
  migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 0.2, sticky = "user",
              rollback = { error_rate = 0.05, invalid_output = 0.02, min_calls = 10 } } }

describe("migrations", function()
  it("send the share of keys to the new version, within statistical bounds, sticky per key", function()
    registry.use({ canary = MIGRATION })
    local new = 0
    for i = 1, 4000 do
      if registry.resolve("canary", { user = "u" .. i }).migration.side == "new" then new = new + 1 end
    end
    -- binomial(4000, 0.2): sd 25; 4 sd either side
    assert.is_true(new > 700 and new < 900, "new side: " .. new)
    for i = 1, 50 do
      local side = registry.resolve("canary", { user = "u" .. i }).migration.side
      for _ = 1, 5 do assert.are.equal(side, registry.resolve("canary", { user = "u" .. i }).migration.side) end
    end
  end)

  it("calls without a sticky key draw from the random source: seeded, within bounds", function()
    registry.use({ canary = MIGRATION })
    math.randomseed(42)
    registry.random = math.random
    local new = 0
    for _ = 1, 4000 do
      if registry.resolve("canary", {}).migration.side == "new" then new = new + 1 end
    end
    assert.is_true(new > 700 and new < 900, "new side: " .. new)
  end)

  -- (before: the new version was left out for its missing key and the old one served, yet the call
  -- said and was counted "new": the canary's figures were the old version's, and never rolled back)
  it("a new version whose key is missing: the old one serves, said and counted as the old side", function()
    ai.configure("anthropic", { base_url = m.url, api_key_env = "RESIL_SPEC_NO_SUCH_KEY" })
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = "anthropic/claude-haiku-4-5-20251001",
      share = 0.5, sticky = false } } })
    registry.random = function() return 0 end -- (every draw: the new side)
    local calls = resil.metrics.counter("resil_model_migration_calls_total")
    local before = calls:value({ alias = "canary", side = "new", outcome = "ok" })
    local r = assert(ai.chat({ model = "canary", messages = MSGS }))
    assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
    assert.are.equal("old", r.migration.side)
    assert.are.equal(before, calls:value({ alias = "canary", side = "new", outcome = "ok" }))
  end)

  -- (reviewer R1: before, the drawn side's target left out for the call's server tool, the other
  -- version's answer was counted as the drawn side's)
  it("a call whose drawn side cannot serve it (a server tool) counts for neither side", function()
    registry.use({ canary = { use = "openai/gpt-4o-mini-2024-07-18",
      migrate = { to = "anthropic/claude-haiku-4-5-20251001", share = 0.5, sticky = false } } })
    registry.random = function() return 0.99 end -- (every draw: the old side, OpenAI)
    local calls = resil.metrics.counter("resil_model_migration_calls_total")
    local before = calls:value({ alias = "canary", side = "old", outcome = "ok" })
    local tools = { { type = "web_search_20250305", name = "web_search", max_uses = 1 } }
    local r = assert(ai.chat({ model = "canary", messages = MSGS, max_tokens = 16, tools = tools }))
    assert.are.equal("anthropic", r.provider)
    assert.is_nil(r.migration)
    assert.are.equal(before, calls:value({ alias = "canary", side = "old", outcome = "ok" }))
  end)

  it("share = 1 completes the migration: every call to the new version", function()
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = MIGRATION.migrate.to, share = 1 } } })
    for i = 1, 20 do
      local r = assert(ai.chat({ model = "canary", messages = MSGS, user = "u" .. i }))
      assert.are.equal("gpt-4.1-mini-2025-04-14", r.requested_model)
    end
  end)

  local function run_users(n, from)
    local sides = { old = 0, new = 0 }
    for i = from or 1, (from or 1) + n - 1 do
      local r = assert(ai.chat({ model = "canary", messages = MSGS, user = "u" .. i }))
      sides[r.migration.side] = sides[r.migration.side] + 1
    end
    return sides
  end

  it("roll back by themselves when the new version returns garbage, and say so with the figures", function()
    registry.use({ canary = MIGRATION })
    m:configure({ strict = true, reply = "one two three",
      faults = { { route = "chat", model = "gpt-4.1-mini-2025-04-14", kind = "garbage" } } })
    local rollbacks = resil.metrics.counter("resil_model_rollbacks_total")
    local before = rollbacks:value({ alias = "canary" })
    local lines = logged(function() run_users(120) end) -- every call answered: the new side falls back to the old
    local warned = with_msg(lines, "rolled back")
    assert.are.equal(1, #warned)
    assert.are.equal("invalid_output", warned[1].reason)
    assert.are.equal(10, warned[1].new_calls)
    assert.are.equal(1, warned[1].new_invalid_rate)
    assert.are.equal(0, warned[1].old_invalid_rate)
    assert.are.equal(before + 1, rollbacks:value({ alias = "canary" }))
    local st = registry.migration_state("canary")
    assert.are.equal(0, st.share)
    -- rolled back: every later call takes the old side, those that were new included
    assert.are.same({ old = 200, new = 0 }, run_users(200))

    -- a second process sharing the store sees the rollback
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir .. "/policies")
    helpers.write(dir .. "/policies/models.lua", ([[
      return { canary = { use = %q, migrate = { to = %q, share = 0.2, sticky = "user",
        rollback = { error_rate = 0.05, invalid_output = 0.02, min_calls = 10 } } } }]]):format(
      MIGRATION.use, MIGRATION.migrate.to))
    local out = helpers.run_script([[
      local registry = require "policies.registry"
      local st = registry.migration_state("canary")
      local new = 0
      for i = 1, 500 do
        if registry.resolve("canary", { user = "u" .. i }).migration.side == "new" then new = new + 1 end
      end
      print(st.share, st.rolled_back and st.rolled_back.reason, new)
    ]], ("--store %s --policies %s/policies"):format(store_path, dir))
    assert.are.equal("0\tinvalid_output\t0\n", out.stdout, out.stderr)

    -- an edited entry is a new migration: it starts again
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = MIGRATION.migrate.to, share = 0.3,
      sticky = "user", rollback = MIGRATION.migrate.rollback } } })
    assert.are.equal(0.3, registry.migration_state("canary").share)
    os.execute("rm -rf " .. dir)
  end)

  it("roll back for every machine sharing a Redis store", function()
    local redis = helpers.redis_server()
    local url = redis.url()
    local ok, err = pcall(function()
      resil.store_config({ url = url })
      registry.use({ canary = MIGRATION })
      m:configure({ strict = true, reply = "one two three",
        faults = { { route = "chat", model = "gpt-4.1-mini-2025-04-14", kind = "garbage" } } })
      logged(function() run_users(120) end)
      assert.are.equal("invalid_output", registry.migration_state("canary").rolled_back.reason)
      local dir = helpers.tmpname("")
      os.execute("mkdir -p " .. dir .. "/policies")
      helpers.write(dir .. "/policies/models.lua", ([[
        return { canary = { use = %q, migrate = { to = %q, share = 0.2, sticky = "user",
          rollback = { error_rate = 0.05, invalid_output = 0.02, min_calls = 10 } } } }]]):format(
        MIGRATION.use, MIGRATION.migrate.to))
      local out = helpers.run_script([[
        local st = require("policies.registry").migration_state("canary")
        print(st.share, st.rolled_back and st.rolled_back.new_calls)
      ]], ("--store %s --policies %s/policies"):format(url, dir))
      os.execute("rm -rf " .. dir)
      assert.matches("^0\t%d+", out.stdout, out.stderr)
    end)
    resil.store_config({ url = store_path })
    redis.stop()
    assert(ok, err)
  end)

  -- (before: the reset kept the counts that rolled it back, and the next call on the new side, an
  -- answer as good as the old side's, read them and rolled it back again: its fix never tried)
  it("reset_migration gives a fixed new version a fresh start, not the figures that rolled it back", function()
    registry.use({ canary = MIGRATION })
    m:configure({ strict = true, reply = "one two three",
      faults = { { route = "chat", model = "gpt-4.1-mini-2025-04-14", kind = "garbage" } } })
    logged(function() run_users(120) end)
    assert.is_table(registry.migration_state("canary").rolled_back)
    m:configure({ strict = true, reply = "one two three" }) -- the new version fixed
    registry.reset_migration("canary")
    local sides = run_users(100)
    assert.is_nil(registry.migration_state("canary").rolled_back)
    assert.is_true(sides.new > 5, resil.json.encode(sides))
  end)

  it("do not roll back when the new version does as well", function()
    registry.use({ canary = MIGRATION })
    m:configure({ strict = true, reply = "one two three",
      faults = { { route = "chat", probability = 0.03, status = 500 } } })
    local lines = logged(function() run_users(300) end)
    assert.are.equal(0, #with_msg(lines, "rolled back"))
    assert.is_nil(registry.migration_state("canary").rolled_back)
    local sides = run_users(100, 301)
    assert.is_true(sides.new > 0)
  end)
end)

describe("deployments", function()
  local function group(strategy)
    return { strategy = strategy, deployments = {
      { name = "east", weight = 3, model = "openai/gpt-4o-mini-2024-07-18" },
      { name = "west", weight = 1, model = "openai/gpt-4o-mini-2024-07-18" } } }
  end

  it("spread calls by weight, skipping an open breaker or a bucket that cannot admit in time", function()
    math.randomseed(7)
    registry.random = math.random
    local east = 0
    for _ = 1, 4000 do
      if registry.order(group(), function() return false, 0 end)[1].name == "east" then east = east + 1 end
    end
    assert.is_true(east > 2880 and east < 3120, "east: " .. east) -- 3/4 of 4000, 4 sd
    local function state(d) return d.name == "east", 0 end
    assert.are.equal("west", registry.order(group(), state)[1].name)
    state = function(d) return false, d.name == "east" and 30 or 0 end
    assert.are.equal("west", registry.order(group(), state, 5)[1].name)
    assert.are.equal("east", registry.order(group(), state, 5)[2].name) -- still a fallback
  end)

  it("least-wait goes where the expected wait is shortest", function()
    local state = function(d) return false, d.name == "east" and 2 or 0.5 end
    assert.are.equal("west", registry.order(group("least-wait"), state)[1].name)
  end)

  it("each deployment has its own limits and config, and the result names it", function()
    registry.use({ spread = { strategy = "least-wait", deployments = {
      { name = "dep-a", use = "openai/gpt-4o-mini-2024-07-18", config = { rate = { rate = 1, per = 60, burst = 1 } } },
      { name = "dep-b", use = "openai/gpt-4o-mini-2024-07-18", config = { rate = { rate = 1, per = 60, burst = 1 } } },
    } } })
    local first = assert(ai.chat({ model = "spread", messages = MSGS }))
    local second = assert(ai.chat({ model = "spread", messages = MSGS }))
    assert.are_not.equal(first.deployment, second.deployment) -- the first one's bucket is empty now
    assert.are.same({ "dep-a", "dep-b" }, (function()
      local t = { first.deployment, second.deployment }
      table.sort(t)
      return t
    end)())
  end)
  -- (before: one deployment's missing key failed every call to the alias)
  -- (before: one deployment's model past its sunset failed every call of the alias, model_retired,
  -- its other deployments healthy)
  it("a deployment whose model passed its sunset with no replacement is left out; the others serve", function()
    registry.use({ spread = { deployments = { { name = "old", use = "openai/gpt-4o-2024-05-13" },
        { name = "new", use = "openai/gpt-4o-2024-08-06" } } },
      ["openai/gpt-4o-2024-05-13"] = { deprecated = true, sunset = date_in(-1) } })
    local lines = logged(function()
      for _ = 1, 4 do
        local r = assert(ai.chat({ model = "spread", messages = MSGS }))
        assert.are.equal("new", r.deployment)
      end
    end)
    assert.are.equal(1, #with_msg(lines, "a deployment cannot be used"))
  end)

  it("a deployment whose key is missing is left out; the others serve", function()
    registry.use({ spread = { deployments = {
      { name = "dep-keyed", use = "openai/gpt-4o-mini-2024-07-18" },
      { name = "dep-keyless", use = "openai/gpt-4o-mini-2024-07-18", config = { api_key_env = "RESIL_SPEC_UNSET_DEP_KEY" } },
    } } })
    for _ = 1, 6 do
      assert.are.equal("dep-keyed", assert(ai.chat({ model = "spread", messages = MSGS })).deployment)
    end
    registry.use({ spread = { deployments = {
      { name = "dep-keyless", use = "openai/gpt-4o-mini-2024-07-18", config = { api_key_env = "RESIL_SPEC_UNSET_DEP_KEY" } },
    } } })
    local _, err = ai.chat({ model = "spread", messages = MSGS })
    assert.are.equal("missing_secret", err.kind)
  end)
end)

describe("reload", function()
  it("applies an edited registry to the next call; a broken one keeps the old serving, with file:line", function()
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir .. "/policies")
    local file = dir .. "/policies/models.lua"
    helpers.write(file, 'return { chat = { use = "openai/gpt-4o-mini-2024-07-18" } }\n')
    local out = helpers.run_script(([[
      local resil = require "resil"
      local ai = require "policies.ai"
      local m = resil.mock.start({ strict = true })
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-spec-openai-0123456789" })
      local msgs = { { role = "user", content = "hi" } }
      local function write(text) local f = assert(io.open(%q, "w")) f:write(text) f:close() end
      print(ai.chat({ model = "chat", messages = msgs }).requested_model)
      write('return { chat = { use = "openai/gpt-4.1-mini-2025-04-14" } }\n')
      print(resil.reload())
      print(ai.chat({ model = "chat", messages = msgs }).requested_model)
      write('return {\n  chat = { use = "openai/gpt-4o-2024-08-06" },\n  loop = { use = "loop" },\n}\n')
      local ok, err = resil.reload()
      print(ok, err)
      print(ai.chat({ model = "chat", messages = msgs }).requested_model)
      m:stop()
    ]]):format(file), ("--store %s --policies %s/policies --log-level off"):format(helpers.tmpname(".db"), dir))
    local lines = {}
    for l in out.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("gpt-4o-mini-2024-07-18", lines[1], out.stderr)
    assert.matches("^true", lines[2])
    assert.are.equal("gpt-4.1-mini-2025-04-14", lines[3])
    assert.matches("^false\treload: .*models%.lua:3: model 'loop': alias cycle loop %-> loop", lines[4])
    assert.are.equal("gpt-4.1-mini-2025-04-14", lines[5])
    os.execute("rm -rf " .. dir)
  end)
end)

describe("streams", function()
  it("take aliases and count for a migration's sides", function()
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = MIGRATION.migrate.to, share = 0.5, sticky = "user",
      rollback = { error_rate = 0.05, min_calls = 5 } } } })
    m:configure({ strict = true, reply = "one two three", faults = { { route = "chat", model = "gpt-4.1-mini-2025-04-14",
      status = 400 } } })
    local lines = logged(function()
      for i = 1, 40 do
        local s = ai.stream({ model = "canary", messages = MSGS, user = "s" .. i })
        local text = {}
        for d in s do text[#text + 1] = d end
        local r = assert(s:result())
        assert.are.equal("canary", r.alias)
        assert.are.equal("one two three", table.concat(text))
      end
    end)
    assert.are.equal(1, #with_msg(lines, "rolled back"))
    assert.are.equal("error_rate", registry.migration_state("canary").rolled_back.reason)
  end)

  local function openai_calls()
    for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do
      if g.key == "openai" then return g.calls end
    end
    return 0
  end

  -- A stream on a migration's old side, opened upstream, its task canceled while the migration's
  -- outcome waits for the store's write lock (held by another process): between the stream's
  -- opening and open() taking it over. (No budget: its reservation would wait for the lock before
  -- the stream opened.)
  local function cancel_while_outcome_waits(max_tokens)
    resil.clock.real()
    assert(resil.cost.record({ provider = "warm-up", usd = 0 })) -- the file and its schema
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = MIGRATION.migrate.to, share = 0.2 } } })
    local release = helpers.hold_write_lock(store_path)
    finally(function() helpers.write(release, "") end)
    local t = resil.spawn(function()
      local s = ai.stream({ model = "canary", messages = MSGS, max_tokens = max_tokens })
      return s:next()
    end)
    assert.is_true(helpers.wait_until(function() return m:stats().total == 1 end, 10))
    resil.sleep(0.3)
    assert.are.equal("waiting", t:status())
    t:cancel()
    helpers.write(release, "")
  end

  it("a stream canceled while its migration's outcome waits for the store is closed and recorded", function()
    cancel_while_outcome_waits(100)
    assert.is_true(helpers.wait_until(function() return openai_calls() == 1 end, 15), "rows: " .. openai_calls())
    assert.is_true(resil.cost.total({ provider = "openai" }) > 0)
  end)

  it("a stream canceled so is closed upstream: the provider stops generating", function()
    local opened = {}
    local real_stream = resil.http.stream
    resil.http.stream = function(w)
      local s, e = real_stream(w)
      if s then opened[#opened + 1] = s end
      return s, e
    end
    finally(function() resil.http.stream = real_stream end)
    -- a long answer, streamed slowly: still streaming upstream when the call is canceled
    local words = {}
    for i = 1, 60 do words[i] = "w" .. i end
    m:configure({ strict = true, reply = table.concat(words, " "), stream_interval = 0.1 })
    cancel_while_outcome_waits(1000)
    assert.are.equal(1, #opened)
    local s = opened[1]
    -- (a stream is a userdata: a check for a table had closed none)
    -- a stream given up must be closed: what curl had buffered may still be read, then an error;
    -- open, it goes on streaming (and the provider on generating, and billing) for seconds
    local n = 0
    local ok = resil.timeout(1.5, function()
      while s:read_event() do n = n + 1 end
      return true
    end)
    assert.is_true(ok == true and n < 5, ("still streaming after the cancel: %d more events in 1.5 s"):format(n))
  end)

  -- (max_tokens = 0 stands for a reasoning model that spent max_tokens thinking: no text, finish_reason
  -- "length", the provider's usage reported: a charge, canceled or not; the mock not strict, which
  -- refuses a max_tokens under 1 as the APIs do)
  it("one that ended while it opened, without text, is recorded: not canceled", function()
    resil.clock.real()
    m:configure({ reply = "one two three" })
    local s = ai.stream({ model = "openai/gpt-4o-mini-2024-07-18", messages = MSGS, max_tokens = 0 })
    assert.is_nil(s:next())
    local r = assert(s:result())
    assert.are.equal("length", r.finish_reason)
    assert.is_true(helpers.wait_until(function() return openai_calls() == 1 end, 5))
  end)

  it("one that ended while it opened, without text, is recorded: canceled while the outcome waits", function()
    m:configure({ reply = "one two three" })
    cancel_while_outcome_waits(0)
    assert.is_true(helpers.wait_until(function() return openai_calls() == 1 end, 5), "rows: " .. openai_calls())
  end)
end)

-- (before: ai.embed sent the model as named: an alias raised "must name its provider" (a gateway's
-- client that took GET /v1/models' word got a 500), and a model past its sunset was called, a 404
-- on every call, while its replacement served the chats)
describe("embeddings through the registry", function()
  it("take aliases, go to a replacement past the sunset, and fail a retired model before sending", function()
    registry.use({ ["embed-small"] = { use = "openai/text-embedding-3-small" },
      ["openai/text-embedding-ada-002"] = { deprecated = true, replacement = "openai/text-embedding-3-small",
        sunset = date_in(-1) },
      ["openai/text-embedding-old"] = { deprecated = true, sunset = date_in(-1) } })
    local r = assert(ai.embed({ model = "embed-small", input = "hello" }))
    assert.are.same({ "embed-small", "text-embedding-3-small" }, { r.alias, r.requested_model })
    r = assert(ai.embed({ model = "openai/text-embedding-ada-002", input = { "a", "b" } }))
    assert.are.equal("text-embedding-3-small", r.requested_model)
    assert.are.equal("sunset", r.routed.reason)
    assert.are.equal(2, #r.embeddings)
    local before = m:stats().total
    local _, err = ai.embed({ model = "openai/text-embedding-old", input = "hello" })
    assert.are.equal("model_retired", err.kind)
    assert.are.equal(before, m:stats().total)
  end)

  it("through the gateway, an alias GET /v1/models lists is served", function()
    registry.use({ ["embed-small"] = { use = "openai/text-embedding-3-small" } })
    local url = helpers.gateway_for_mock(m, { auth = false, models = {} }, finally)
    local listed = resil.json.decode(assert(resil.http.request({ url = url .. "/v1/models" })).body)
    local ids = {}
    for _, e in ipairs(listed.data) do ids[e.id] = true end
    assert.is_true(ids["embed-small"])
    local res = assert(resil.http.request({ method = "POST", url = url .. "/v1/embeddings",
      headers = { ["content-type"] = "application/json" }, json = { model = "embed-small", input = "hello" } }))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("text-embedding-3-small", res.headers["x-resil-model"])
  end)
end)

-- (before: each GET /v1/models and each retrieve resolved every alias again, holding the loop, and
-- every request of the process with it, some 170 ms for a registry of 5,000)
describe("GET /v1/models of a registry of thousands of aliases", function()
  it("resolves each alias once, not on every list or retrieve; a sunset passed since is seen", function()
    local entries = { ["openai/gpt-x-2024-01-01"] = { deprecated = true, sunset = date_in(1) },
      soon = { use = "openai/gpt-x-2024-01-01" } }
    for i = 1, 2000 do entries["alias-" .. i] = { use = "openai/gpt-4o-mini-2024-07-18" } end
    registry.use(entries)
    local url = helpers.gateway_for_mock(m, { auth = false, models = {} }, finally)
    local resolve, resolved = registry.resolve, 0
    registry.resolve = function(...) resolved = resolved + 1 return resolve(...) end
    finally(function() registry.resolve = resolve end)
    local function listed()
      local res = assert(resil.http.request({ url = url .. "/v1/models" }))
      local ids = {}
      for _, e in ipairs(resil.json.decode(res.body).data) do ids[e.id] = true end
      return ids
    end
    for _ = 1, 3 do
      local ids = listed()
      assert.is_true(ids["alias-2000"] and ids.soon)
      assert.are.equal(200, assert(resil.http.request({ url = url .. "/v1/models/alias-7" })).status)
    end
    assert.is_true(resolved <= 2001 + 5, "resolved " .. resolved)
    resil.sleep(2 * 86400)
    assert.is_nil(listed().soon)
  end)
end)

-- (before: a chat under resil.once without a sticky value drew its side again when the key ran
-- again after a failure or a crash, so it went to the other provider, which had never seen the key:
-- billed twice, where the same side replays its answer unbilled)
describe("a migration's chat run again under its resil.once key", function()
  it("takes the side it took, so the provider replays the answer it billed once", function()
    m:configure({ strict = true, reply = "one two three", idempotency = true })
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-spec-openai-0123456789", idempotency = true })
    ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-spec-0123456789", idempotency = true })
    registry.use({ canary = { use = "openai/gpt-4o-mini-2024-07-18",
      migrate = { to = "anthropic/claude-haiku-4-5-20251001", share = 0.5, sticky = false } } })
    local draws = { 0.1, 0.9, 0.1, 0.9 }
    registry.random = function() return table.remove(draws, 1) end
    local served = {}
    local function caption(fail)
      return resil.once("caption:7", function()
        local r = assert(ai.chat({ model = "canary", messages = MSGS }))
        served[#served + 1] = r.provider
        if fail then return nil, resil.error("timeout", "the step after the answer timed out", { retryable = true }) end
        return r.text
      end)
    end
    assert.is_nil((caption(true))) -- released: a retryable failure
    assert.are.equal("one two three", caption(false))
    assert.are.equal(2, #served)
    assert.are.equal(served[1], served[2])
    assert.are.equal(1, m:stats().billed.responses)
    assert.are.equal(1, m:stats().replayed)
  end)
end)

describe("migrations behind another alias", function()
  it("apply on the way to the first target, not in a fallback", function()
    -- (a share under 1: a completed migration serves its target in a fallback too, see
    -- registry_badday_spec)
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = MIGRATION.migrate.to, share = 0.5 } },
      front = { use = "canary" }, other = { use = "anthropic/claude-haiku-4-5-20251001", fallbacks = { "canary" } } })
    registry.random = function() return 0 end -- (no sticky key: every call draws the new side)
    local plan = registry.resolve("front", {})
    assert.are.equal("new", plan.migration.side)
    assert.are.equal("openai/gpt-4.1-mini-2025-04-14", plan.choices[1].model)
    plan = registry.resolve("other", {})
    assert.is_nil(plan.migration)
    assert.are.equal("openai/gpt-4o-mini-2024-07-18", plan.choices[2].model)
  end)

  -- (before: a call's own fallback list (or its provider's, or a gateway model's) naming the alias
  -- drew the canary's side as a call naming it does: a share of the fallback's calls went to the
  -- new version, none of them counted for its rollback)
  it("take their old version in a call's own fallback list, as in the registry's fallbacks", function()
    registry.use({ canary = { use = MIGRATION.use, migrate = { to = MIGRATION.migrate.to, share = 0.5 } } })
    registry.random = function() return 0 end -- (every draw: the new side)
    m:configure({ strict = true, reply = "one two three",
      faults = { { route = "messages", model = "claude-haiku-4-5-20251001", status = 500 } } })
    for _ = 1, 3 do
      local r = assert(ai.chat({ model = "anthropic/claude-haiku-4-5-20251001", messages = MSGS,
        fallback = { "canary" } }))
      assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
      assert.is_nil(r.migration)
    end
    assert.are.equal(3, m:stats().routes.chat)
  end)
end)

describe("prices gone wrong", function()
  local pricing = require "policies.pricing"
  after_each(function()
    for _, k in ipairs({ "ft-typo-2025-01-01", "ft-garbage-2025-01-01", "ft-nan-2025-01-01", "ft-empty-2025-01-01" }) do
      pricing.models.openai[k] = nil
    end
  end)

  it("a price table with a typo, garbage or nothing in it is no price: never a silent $0, never a raise", function()
    pricing.models.openai["ft-typo-2025-01-01"] = { inptu = 0.15, outptu = 0.60 }
    pricing.models.openai["ft-garbage-2025-01-01"] = { input = "abc", output = 0.60 }
    pricing.models.openai["ft-nan-2025-01-01"] = { input = 0 / 0, output = 0.60 }
    pricing.models.openai["ft-empty-2025-01-01"] = {}
    registry.use({ ft = { use = "openai/ft-typo-2025-01-01" } })
    for _, name in ipairs({ "typo", "garbage", "nan", "empty" }) do
      local model = "openai/ft-" .. name .. "-2025-01-01"
      local lines = logged(function()
        local ok, r = pcall(ai.chat, { model = model, messages = MSGS })
        assert.is_true(ok, tostring(r))
        assert.is_nil(r.cost_usd, name) -- recorded without a price
      end)
      assert.are.equal(1, #with_msg(lines, "price for model"), name)
    end
    local found = false
    for _, p in ipairs(registry.problems({ ft = { use = "openai/ft-typo-2025-01-01" } },
      { price = function(p, m) return pricing.price(p, m) ~= nil end })) do
      if p.message:find("has no price") then found = true end
    end
    assert.is_true(found)
  end)

  -- (before: every budgeted call of the alias was refused "unpriced", its priced primary healthy,
  -- for a fallback nobody priced: a backup's missing price failed the calls its primary serves)
  it("a fallback without a price is left out of budgeted calls, said once; the primary serves and is held", function()
    registry.use({ fast = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "openai/ft-nan-2025-01-01" } } })
    pricing.models.openai["ft-nan-2025-01-01"] = { input = 0 / 0, output = 0.60 }
    resil.budget("spec-unpriced-fallback", { limit = 10, per = "day" })
    local lines = logged(function()
      for _ = 1, 2 do
        local r = assert(ai.chat({ model = "fast", messages = MSGS, budget = "spec-unpriced-fallback" }))
        assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
        assert.is_true(r.cost_usd > 0)
        local s = ai.stream({ model = "fast", messages = MSGS, budget = "spec-unpriced-fallback" })
        for _ in s do end
        assert.are.equal("gpt-4o-mini-2024-07-18", s:result().requested_model)
      end
    end)
    assert.are.equal(1, #with_msg(lines, "fallback without a price is left out"))
    -- the primary failing, the call fails rather than reach a model the budget cannot hold
    m:configure({ strict = true, reply = "x", faults = { { route = "chat", kind = "garbage" } } })
    local _, err = ai.chat({ model = "fast", messages = MSGS, budget = "spec-unpriced-fallback" })
    assert.are.equal("invalid_output", err.class)
    assert.are.equal("gpt-4o-mini-2024-07-18", err.model)
    assert.is_nil(err.errors) -- (one target tried)
    -- an embedding's fallback too
    m:configure({ strict = true, reply = "x" })
    local e = assert(ai.embed({ model = "openai/text-embedding-3-small", input = "hi", budget = "spec-unpriced-fallback",
      fallback = { "openai/ft-nan-2025-01-01" } }))
    assert.are.equal("text-embedding-3-small", e.requested_model)
    -- the model itself without a price is refused, as before
    registry.use({ bare = { use = "openai/ft-nan-2025-01-01" } })
    _, err = ai.chat({ model = "bare", messages = MSGS, budget = "spec-unpriced-fallback" })
    assert.are.equal("unpriced", err.kind)
  end)
end)

describe("cycles through deprecations", function()
  it("a replacement leading back through a deprecation keyed by the bare name is refused at load and by check", function()
    local cyclic = {
      a = { use = "openai/gpt-x-2024-01-01" },
      ["gpt-x-2024-01-01"] = { deprecated = true, replacement = "a", sunset = "2020-01-01" },
    }
    local ok, err = pcall(registry.use, cyclic)
    assert.is_false(ok)
    assert.matches("alias cycle a %-> gpt%-x%-2024%-01%-01 %-> a", err)
    local two = {
      ["gpt-x-2024-01-01"] = { deprecated = true, replacement = "openai/gpt-y-2024-01-01", sunset = "2020-01-01" },
      ["gpt-y-2024-01-01"] = { deprecated = true, replacement = "openai/gpt-x-2024-01-01", sunset = "2020-01-01" },
    }
    local errors = 0
    for _, p in ipairs(registry.problems(two, {})) do
      if p.level == "error" and p.message:find("alias cycle") then errors = errors + 1 end
    end
    assert.are.equal(1, errors)
    assert.has_error(function() registry.use(two) end)
  end)
end)

describe("migrations while the store is down", function()
  it("a Redis refusing connections neither raises into the call nor loses the rollback", function()
    resil.store_config({ url = "redis://127.0.0.1:1/0?timeout=0.2" }) -- nothing listens on port 1
    finally(function() resil.store_config({ url = store_path }) end)
    m:configure({ strict = true, reply = "one two three",
      faults = { { route = "chat", model = "gpt-4.1-mini-2025-04-14", probability = 1, kind = "garbage" } } })
    registry.use({ canary = { use = "openai/gpt-4o-mini-2024-07-18",
      migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 0.5,
                  rollback = { error_rate = 0.05, invalid_output = 0.02, min_calls = 5 } } } })
    local later_new = 0
    local lines = logged(function()
      for i = 1, 120 do
        local ok, r = pcall(ai.chat, { model = "canary", messages = MSGS, user = "user-" .. i })
        assert.is_true(ok, tostring(r))
        assert(r, "the old side answers")
        if i > 60 and r.migration.side == "new" then later_new = later_new + 1 end
      end
    end)
    assert.are.equal(1, #with_msg(lines, "store is unavailable"))
    assert.are.equal(1, #with_msg(lines, "migration rolled back"))
    assert.are.equal(0, later_new)
    assert.are.equal(0, registry.migration_state("canary").share)
  end)
end)

describe("a chat naming a job provider's model", function()
  it("raises that the provider has no chat API, before its key is asked for or a nil is indexed", function()
    registry.use({ ["video-hq"] = { use = "replicate/bytedance/seedance-1-lite:c4d7a4b9" } })
    for _, model in ipairs({ "replicate/owner/model:abc123", "fal/fal-ai/flux/schnell", "video-hq" }) do
      local ok, err = pcall(ai.chat, { model = model, messages = MSGS })
      assert.is_false(ok)
      assert.matches("has no chat API", tostring(err))
      assert.not_matches("index a nil", tostring(err))
    end
    assert.are.equal(0, m:stats().total)
  end)

  -- (before: the error named policies/ai.lua:1393 (ai.chat's own line, or ai.stream's), one level
  -- short: nothing said which call of the script named the model)
  it("names the caller's line, for ai.chat and ai.stream, as model and as fallback", function()
    local calls = {
      function() local r, e = ai.chat({ model = "replicate/owner/model:abc123", messages = MSGS }); return r, e end,
      function() local r, e = ai.stream({ model = "fal/fal-ai/flux/schnell", messages = MSGS }); return r, e end,
      function()
        local r, e = ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = MSGS,
          fallback = { "replicate/owner/model:abc123" } })
        return r, e
      end,
    }
    for i, call in ipairs(calls) do
      local ok, err = pcall(call)
      assert.is_false(ok, i)
      assert.matches("^spec/models_spec%.lua:%d+: ai: provider '%a+' has no chat API", tostring(err))
    end
  end)
end)

describe("a registry reloaded while a migration's calls are in flight", function()
  it("records their outcomes under the entry they were resolved by, not the edited one", function()
    -- the first canary's target fails every call, slowly; the edited entry migrates to another target
    m:configure({ strict = true, reply = "one two three", latency = 1,
      faults = { { route = "chat", model = "gpt-4.1-mini-2025-04-14", status = 500 } } })
    local rollback = { error_rate = 0.05, min_calls = 3 }
    registry.use({ canary = { use = "openai/gpt-4o-mini-2024-07-18",
      migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 0.5, rollback = rollback } } })
    local tasks = {}
    for i = 1, 40 do
      tasks[i] = resil.spawn(function() return ai.chat({ model = "canary", messages = MSGS, user = "u" .. i }) end)
    end
    resil.sleep(0.5) -- every call sent, none answered
    registry.use({ canary = { use = "openai/gpt-4o-mini-2024-07-18",
      migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0.5, rollback = rollback } } })
    for _, t in ipairs(tasks) do assert(t:join()) end
    local st = registry.migration_state("canary")
    assert.is_nil(st.rolled_back) -- the edited migration has not served a call yet
    assert.are.equal(0.5, st.share)
  end)
end)

describe("warnings a gateway's clients could multiply", function()
  it("unpinned models made up by the hundred are warned about one by one up to a bound, then once", function()
    local unpinned = resil.metrics.counter("resil_model_unpinned_total")
    local lines = logged(function()
      for i = 1, 300 do registry.resolve("openai/made-up-" .. i, {}) end
    end)
    assert.are.equal(100, #with_msg(lines, "^model is not pinned"))
    assert.are.equal(1, #with_msg(lines, "^more models are not pinned"))
    assert.are.equal(1, unpinned:value({ model = "openai/made-up-250" })) -- still counted
  end)
end)

describe("a migration whose target is retired", function()
  it("sends the new side's calls to the old version, warned once, instead of failing them", function()
    registry.use({ canary = { use = "openai/gpt-4o-mini-2024-07-18",
        migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 0.5 } },
      ["gpt-4.1-mini-2025-04-14"] = { deprecated = true, sunset = date_in(-1) } })
    local lines = logged(function()
      for i = 1, 60 do
        local r, err = ai.chat({ model = "canary", messages = MSGS, user = "user-" .. i })
        assert(r, tostring(err))
        assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
      end
    end)
    assert.are.equal(1, #with_msg(lines, "migration's target cannot be used"))
  end)
end)

-- (before: the old version past its sunset failed every call of the alias, the new side's too
-- (model_retired), and one its provider retired (a 404) failed every call of the old side, the
-- new version, healthy, never tried: the migration was there for exactly that)
describe("a migration whose old version is retired", function()
  local CANARY = { use = "openai/gpt-4o-mini-2024-07-18",
    migrate = { to = "anthropic/claude-haiku-4-5-20251001", share = 0.2, sticky = false } }

  it("by the registry (its sunset passed): every call goes to the new version, warned once", function()
    registry.use({ canary = CANARY, ["gpt-4o-mini-2024-07-18"] = { deprecated = true, sunset = date_in(-1) } })
    local lines = logged(function()
      for _ = 1, 10 do
        local r = assert(ai.chat({ model = "canary", messages = MSGS }))
        assert.are.same({ "claude-haiku-4-5-20251001", "new" }, { r.requested_model, r.migration.side })
      end
    end)
    assert.are.equal(1, #with_msg(lines, "old version cannot be used"))
    assert.are.equal(0, m:stats().routes.chat or 0)
  end)

  it("by its provider (a 404): the old side's calls go on to the new version, counted as the old side's failures", function()
    registry.use({ canary = CANARY })
    m:configure({ strict = true, reply = "one two three", faults = { { route = "chat", status = 404,
      body = '{"error":{"message":"The model `gpt-4o-mini-2024-07-18` does not exist","type":"invalid_request_error",' ..
        '"param":null,"code":"model_not_found"}}' } } })
    local draws = { 0.9, 0.1 }
    registry.random = function() return table.remove(draws, 1) end
    local calls = resil.metrics.counter("resil_model_migration_calls_total")
    local before = calls:value({ alias = "canary", side = "old", outcome = "not_found" })
    local r = assert(ai.chat({ model = "canary", messages = MSGS }))
    assert.are.same({ "claude-haiku-4-5-20251001", "old", 1 }, { r.requested_model, r.migration.side, r.fallbacks })
    assert.are.equal(before + 1, calls:value({ alias = "canary", side = "old", outcome = "not_found" }))
    r = assert(ai.chat({ model = "canary", messages = MSGS }))
    assert.are.same({ "claude-haiku-4-5-20251001", "new", 0 }, { r.requested_model, r.migration.side, r.fallbacks })
    -- paused (share 0): the old version's calls stay there
    registry.use({ canary = { use = CANARY.use, migrate = { to = CANARY.migrate.to, share = 0 } } })
    local _, err = ai.chat({ model = "canary", messages = MSGS })
    assert.are.equal("not_found", err.class)
  end)
end)
