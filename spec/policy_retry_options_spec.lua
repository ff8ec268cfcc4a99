-- The README names a retry's backoffs ("backoff `immediate`, `constant`, ...") and the classify
-- rules call the field `backoff`, but retry.call read only `strategy`: `backoff = "constant"` in
-- a newcomer's options was ignored without a word, and the class's own backoff ran instead.
local resil = require "resil"
local retry = require "policies.retry"
local call = require "policies.call"
local helpers = require "spec.helpers"

describe("a retry's backoff named in its options", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)

  it("is taken as `backoff`, as the README and the classify rules name it, or as `strategy`", function()
    for _, key in ipairs({ "backoff", "strategy" }) do
      local n = 0
      local t0 = resil.now()
      local r = retry.call(function()
        n = n + 1
        if n < 3 then return nil, resil.error("timeout", "slow") end -- (the class's own backoff: immediate)
        return "ok"
      end, { [key] = "constant", base = 1, budget = false })
      assert.are.equal("ok", r)
      assert.are.equal(3, n)
      assert.are.equal(2, resil.now() - t0, key) -- (was 0 for `backoff`: immediate, the class's)
    end
  end)

  it("is taken from a provider's retry table too", function()
    for backoff, waited in pairs({ linear = 1 + 2 + 3, constant = 1 + 1 + 1 }) do -- (the class's: 1 + 2 + 4)
      local m = resil.mock.start({ sequence = { chat = { 503, 503, 503 } } })
      local p = call.provider("retry-backoff-" .. backoff, {
        request = { method = "POST", url = m.url .. "/v1/chat/completions" },
        retry = { backoff = backoff, base = 1, budget = false } })
      local t0 = resil.now()
      assert(p({ json = { messages = { { role = "user", content = "hi" } } } }))
      assert.are.equal(waited, resil.now() - t0, backoff)
      m:stop()
    end
  end)

  it("an unknown one is an error naming it", function()
    local ok, err = pcall(retry.call, function() return nil, resil.error("timeout", "slow") end,
      { backoff = "fibonacci", budget = false })
    assert.is_false(ok)
    assert.matches("retry: unknown backoff strategy 'fibonacci'", err)
  end)
end)

describe("a retry budget's options", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("that cannot be meant raise at the line that gave them, before any attempt", function()
    -- (before: window = math.huge made slots until memory ran out; window 0 or 1.5 raised inside
    -- retry.lua on the first retry; percent NaN let every retry through, budget "x" was the default)
    local bad = { { window = math.huge }, { window = 0 }, { window = 1.5 }, { percent = 0 / 0 },
      { percent = -1 }, { min_per_second = "x" }, { min_per_second = math.huge }, "x" }
    for i, conf in ipairs(bad) do
      local attempts = 0
      local ok, err = pcall(function()
        return retry.call(function() attempts = attempts + 1; return { status = 503, headers = {}, body = "" } end,
          { provider = "budget-bad-" .. i, budget = conf, max_retries = 1, base = 0.01 })
      end)
      assert.is_false(ok, "taken: " .. tostring(conf))
      assert.matches("policy_retry_options_spec.lua:%d+: retry budget 'budget%-bad%-" .. i .. "': ", err)
      assert.are.equal(0, attempts)
    end
    local ok, err = pcall(retry.budget, "budget-direct", { window = -3 })
    assert.is_false(ok)
    assert.matches("window must be a whole number of seconds", err)
    local b = retry.budget("budget-good", { percent = 0, min_per_second = 0.1, window = 10 })
    assert.is_true(b:withdraw())
    assert.is_false(b:withdraw())
  end)

  -- (before: windw = 60 or precent = 0.05 was ignored and the default budget ran; a provider's
  -- budget was first looked at by its first call's retry)
  it("misspelt raise at the line that gave them, a provider's at the line that made it", function()
    local attempts = 0
    local ok, err = pcall(function()
      return retry.call(function() attempts = attempts + 1; return { status = 503, headers = {}, body = "" } end,
        { provider = "budget-misspelt", budget = { windw = 60 }, max_retries = 1, base = 0.01 })
    end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: retry budget 'budget%-misspelt': unknown option 'windw'", err)
    assert.are.equal(0, attempts)
    ok, err = pcall(function()
      local p = call.provider("budget-misspelt-provider", { request = { url = "http://127.0.0.1:9/" },
        retry = { budget = { precent = 0.05 } } })
      return p
    end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: call.provider 'budget%-misspelt%-provider': retry budget: " ..
      "unknown option 'precent'", err)
  end)

  -- (before: the window of the budget's first options stayed for good: a reload's window = 60 kept 10 s,
  -- and let a sixth of the retries it allows through)
  it("given again with another window (a reload), counts over that window", function()
    local conf = { percent = 0, min_per_second = 0.1, window = 10 }
    local b = retry.budget("budget-rewindowed", conf)
    assert.is_true(b:withdraw())
    assert.is_false(b:withdraw()) -- 0.1 a second over 10 s: one
    resil.sleep(5)
    b = retry.budget("budget-rewindowed", { percent = 0, min_per_second = 0.1, window = 60 })
    assert.are.equal(1, b:state().retries) -- (kept: it is within the new window too)
    for _ = 1, 5 do assert.is_true(b:withdraw()) end
    assert.is_false(b:withdraw()) -- 0.1 a second over 60 s: six
    assert.are.same({ calls = 0, retries = 6, allowed = 6 }, b:state())
    b = retry.budget("budget-rewindowed", conf)
    assert.are.same({ calls = 0, retries = 6, allowed = 1 }, b:state()) -- (both seconds are within 10 s)
    resil.sleep(10)
    assert.are.same({ calls = 0, retries = 0, allowed = 1 }, b:state())
    assert.is_true(b:withdraw())
  end)
end)

describe("a retry's other options", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("that cannot be meant raise at the line that gave them, before any attempt", function()
    -- (before: max_retries = NaN retried without end, -1 was taken as 0 and 1.5 as 2, "3" or an
    -- unknown backoff raised inside retry.lua after the first attempt had been made and paid)
    local bad = { { max_retries = 0 / 0 }, { max_retries = -1 }, { max_retries = 1.5 }, { max_retries = "3" },
      { max_retries = { server_error = -2 } }, { base = -1 }, { base = 0 / 0 }, { cap = 0 / 0 },
      { max_retry_after = -1 }, { timeout = 0 / 0 }, { deadline = "5" }, { random = 3 }, { backoff = "expo" },
      { on_retry = "log" } }
    for i, opts in ipairs(bad) do
      opts.budget = false
      local attempts = 0
      local ok, err = pcall(function()
        return retry.call(function()
          attempts = attempts + 1
          if attempts > 1 then return "ok" end -- (so that the NaN one ends without the check)
          return { status = 503, headers = {}, body = "" }
        end, opts)
      end)
      assert.is_false(ok, "taken: " .. i)
      assert.matches("policy_retry_options_spec.lua:%d+: retry: ", err)
      assert.are.equal(0, attempts, i)
    end
    -- (the edges that are meant: none, no end, no wait)
    for _, opts in ipairs({ { max_retries = 0 }, { max_retries = math.huge, base = 0 }, { cap = math.huge } }) do
      assert.are.equal("ok", retry.call(function() return "ok" end, opts))
    end
  end)

  it("given to a provider or ai.configure raise there, naming it", function()
    local ok, err = pcall(call.provider, "retry-bad", { retry = { max_retries = -1 } })
    assert.is_false(ok)
    assert.matches("call.provider 'retry%-bad': retry: max_retries must be a whole number", err)
    ok, err = pcall(function() require("policies.ai").configure("openai", { retry = { backoff = "expo" } }) end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: ai.configure 'openai': retry: unknown backoff strategy 'expo'", err)
  end)

  -- (before: taken as a time on resil.now()'s clock, fixed when the provider was made: once it passed
  -- (at once, `deadline = 120` on a machine up for more than two minutes), every call failed
  -- "deadline passed before attempt 1" without trying)
  it("a deadline in a provider's retry table, a point in time made once, raises there, naming the ones meant", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() call.provider("retry-deadline", { retry = { deadline = 120 } }) end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec%.lua:" .. line .. ": call%.provider 'retry%-deadline': retry%.deadline is "
      .. "a time on resil%.now%(%)'s clock", err)
    assert.matches("the provider's deadline = 120 %(seconds, each call's%) or retry%.timeout", err)
    ok, err = pcall(function() require("policies.ai").configure("openai", { retry = { deadline = 120 } }) end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: ai.configure 'openai': retry%.deadline is a time", err)
    -- (what is meant: each call's seconds, and a retry table's own timeout)
    local m = resil.mock.start({ sequence = { chat = { 503, 503, 503, 503 } } })
    local p = call.provider("retry-deadline-ok", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
      retry = { timeout = 2.5, base = 1, backoff = "constant", budget = false } })
    local t0 = resil.now()
    local _, e = p({ json = { messages = { { role = "user", content = "hi" } } } })
    assert.are.equal("deadline", e.gave_up) -- (attempts at 0, 1 and 2 s: the next would end past 2.5)
    assert.are.equal(3, e.attempts)
    assert.are.equal(2, resil.now() - t0)
    -- (a call's own retry table is that call's: its deadline is kept, as it was)
    local ai = require "policies.ai"
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456" })
    m:configure({ sequence = { chat = { 503, 503, 503, 503 } } })
    t0 = resil.now()
    local _, ce = ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } },
      retry = { deadline = resil.now() + 2.5, base = 1, backoff = "constant", budget = false } })
    assert.are.equal("deadline", ce.gave_up)
    assert.are.equal(2, resil.now() - t0)
    m:stop()
  end)

  -- (before: max_retry = 3 was ignored without a word, and the call retried as the defaults say)
  it("an option retry does not take is named at the line that gave it, before any attempt", function()
    local n = 0
    local f = function()
      local r = retry.call(function() n = n + 1; return nil, resil.error("timeout", "slow") end, { max_retry = 0 })
      return r
    end
    local ok, err = pcall(f)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec%.lua:" .. debug.getinfo(f, "S").linedefined + 1
      .. ": retry: unknown option 'max_retry' %(it takes max_retries, ", err)
    assert.are.equal(0, n)
    ok, err = pcall(call.provider, "retry-typo", { retry = { backof = "constant" } })
    assert.is_false(ok)
    assert.matches("call.provider 'retry%-typo': retry: unknown option 'backof'", err)
  end)
end)

describe("a retry's validate", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  -- (before: an unknown name raised 'retry.lua:NNN: classify: no validator named ...' once the first
  -- answer had come, and paid for; a number 'classify.lua:NNN: attempt to call a number value')
  it("that cannot be meant raises at the line that gave it, before any attempt", function()
    for _, case in ipairs({ { "chats", "no validator named 'chats' %(one of .*chat.*, or a function%)" },
      { 42, "validate must be a validator's name or a function, got number" } }) do
      local attempts = 0
      local ok, err = pcall(function()
        local res = retry.call(function() attempts = attempts + 1; return { status = 200, headers = {}, body = "{}" } end,
          { validate = case[1] })
        return res
      end)
      assert.is_false(ok)
      assert.matches("^spec/policy_retry_options_spec.lua:%d+: retry: " .. case[2], err)
      assert.are.equal(0, attempts)
    end
  end)
end)

describe("a validator of one's own that returns nothing", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  -- (before: every answer was taken for garbage, sent again and paid each time, then the fallback's,
  -- and the call failed "output failed validation", with nothing said; raising instead failed the
  -- call after its first answer was paid, where nothing is Lua's own refusal)
  it("refuses the answer, and says so once in a warn line naming where it is defined", function()
    local m = resil.mock.start({})
    local calls = 0
    local check = function() calls = calls + 1; if calls >= 3 then return true end end
    local line = debug.getinfo(check, "S").linedefined
    local p = call.provider("validator-nothing", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
      validate = check, retry = { max_retries = 3, base = 0.01 } })
    local res, err
    resil.log.level("warn")
    local lines = helpers.logged(function() res, err = p({ json = {} }) end)
    assert(res, err and tostring(err))
    assert.are.equal(3, m:stats().routes.chat) -- (two refused, the third taken)
    local said = 0
    for _, l in ipairs(lines) do
      if (l.msg or ""):find("a validator returned nothing", 1, true) then
        said = said + 1
        assert.are.equal("spec/policy_retry_options_spec.lua:" .. line, l.validator)
      end
    end
    assert.are.equal(1, said)
    m:stop()
  end)
end)

describe("a retry's classifier", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("that answers something other than nil or a verdict with a class is named, with where it is defined", function()
    -- (before: 'retry.lua:...: attempt to index a number value (local 'verdict')', 'table index is
    -- nil' or 'classify.lua:...: bad argument #1 to 'for iterator'', naming nothing of the user's)
    for _, answer in ipairs({ "retry", 42, true, { retryable = true, max_retries = 1 } }) do
      local classifier = function() return answer end
      local line = debug.getinfo(classifier, "S").linedefined
      local ok, err = pcall(retry.call, function() return nil, resil.error("server_error", "503") end,
        { budget = false, classify = classifier })
      assert.is_false(ok)
      assert.matches("retry: the classifier defined at spec/policy_retry_options_spec.lua:" .. line .. " returned ", err)
    end
    -- an unknown class is a class like another: not retried unless its verdict says so
    local n = 0
    local _, err = retry.call(function() n = n + 1; return nil, resil.error("server_error", "503") end,
      { budget = false, base = 0, classify = function() return { class = "weird", retryable = true, max_retries = 2 } end })
    assert.are.equal("weird", err.class)
    assert.are.equal(3, n)
  end)

  it("whose verdict names an unknown backoff is said with the class, at the caller's line", function()
    local ok, err = pcall(function()
      return retry.call(function() return nil, resil.error("server_error", "503") end,
        { budget = false, classify = function() return { class = "x", retryable = true, max_retries = 1, backoff = "nope" } end })
    end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: retry: unknown backoff strategy 'nope' %(the verdict of class 'x'%)", err)
  end)
end)

describe("a retry's verdict", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("whose max_retries or retry_after is not a number is said with its class at the caller's line", function()
    -- (before: 'retry.lua:...: attempt to compare number with string', naming neither)
    local classify = require "policies.classify"
    classify.status[409] = { class = "conflict", retryable = true, max_retries = "2" }
    local ok, err = pcall(function()
      local v = retry.call(function() return { status = 409, headers = {}, body = "" } end, { budget = false })
      return v
    end)
    classify.status[409] = nil
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: retry: the verdict of class 'conflict' has max_retries \"2\"", err)
    ok, err = pcall(function()
      local v = retry.call(function() return nil, resil.error("server_error", "503") end, { budget = false,
        classify = function() return { class = "x", retryable = true, max_retries = 1, retry_after = "5" } end })
      return v
    end)
    assert.is_false(ok)
    assert.matches("policy_retry_options_spec.lua:%d+: retry: the verdict of class 'x' has retry_after \"5\"", err)
  end)
end)

describe("a classify rule's mistake met in a provider's call", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  -- (before: 'policies/call.lua:NNN: retry: ...' and 'classify.lua:NNN: bad argument #1 to 'error'
  -- (string expected, got nil)': the user's call named nowhere, the rule not at all)
  it("is said at the line of the call, naming the rule", function()
    local classify = require "policies.classify"
    local m = resil.mock.start({ sequence = { chat = { 409, 409, 409, 409, 409 } } })
    local p = call.provider("rule-mistake", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
      retry = { budget = false } })
    local cases = {
      { { class = "conflict", retryable = true, max_retries = "2" }, "retry: the verdict of class 'conflict' has max_retries \"2\"" },
      { { class = "conflict", retryable = true, max_retries = 1, backoff = "expo" }, "retry: unknown backoff strategy 'expo'" },
      { { retryable = true }, "classify: classify.status%[409%] has class nil, not a name" },
      { "retry", "classify: classify.status%[409%] is \"retry\", not a verdict" },
    }
    -- (before: a body rule without its match raised 'classify.lua:NNN: attempt to call a nil value')
    local rule = { name = "ours", matches = function() return true end, verdict = { class = "x", retryable = false } }
    table.insert(classify.bodies, 1, rule)
    local ok, err = pcall(function()
      local res = p({ json = {} })
      return res
    end)
    table.remove(classify.bodies, 1)
    assert.is_false(ok)
    assert.matches("^spec/policy_retry_options_spec.lua:%d+: classify: classify.bodies%[1%] %(ours%) has no match function", err)
    for _, case in ipairs(cases) do
      classify.status[409] = case[1]
      local ok, err = pcall(function()
        local res = p({ json = {} })
        return res
      end)
      classify.status[409] = nil
      assert.is_false(ok)
      assert.matches("^spec/policy_retry_options_spec.lua:%d+: " .. case[2], err)
    end
    m:stop()
  end)
end)

describe("a retry's jitter", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("refuses a random outside [0, 1] at the caller's line, and no delay passes the cap", function()
    -- (before: random = 5 made full_jitter wait 5, 10, 20 s with cap = 2; -1 or NaN retried at once)
    for _, r in ipairs({ 5, -1, 0 / 0 }) do
      local n = 0
      local ok, err = pcall(function()
        local v = retry.call(function() n = n + 1; return nil, resil.error("server_error", "503") end, { budget = false,
          backoff = "full_jitter", base = 1, cap = 2, max_retries = 3, random = function() return r end })
        return v
      end)
      assert.is_false(ok, tostring(r))
      assert.matches("policy_retry_options_spec.lua:%d+: retry: random must return a number in %[0, 1%), got ", err)
      assert.are.equal(1, n)
    end
    retry.strategies.too_long = function() return 100 end
    local delays = {}
    retry.call(function() return nil, resil.error("server_error", "503") end, { budget = false, backoff = "too_long",
      cap = 2, max_retries = 2, on_retry = function(info) delays[#delays + 1] = info.delay end })
    retry.strategies.too_long = nil
    assert.are.same({ 2, 2 }, delays)
  end)
end)
