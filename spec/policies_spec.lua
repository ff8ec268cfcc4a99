local resil = require "resil"
local classify = require "policies.classify"
local retry = require "policies.retry"
local fallback = require "policies.fallback"
local limit = require "policies.limit"

local function response(status, body, headers)
  return { status = status, body = body or "", headers = headers or {} }
end

local function near(expected, actual)
  assert.is_true(math.abs(expected - actual) < 1e-9, ("expected %.12f, got %.12f"):format(expected, actual))
end

-- a seeded source both the policy and the spec can replay
local function lcg(seed)
  local state = seed
  return function()
    state = (state * 1103515245 + 12345) % 2147483648
    return state / 2147483648
  end
end

local seq = 0
local function name(prefix)
  seq = seq + 1
  return prefix .. "-" .. seq
end

describe("policies.classify", function()
  local cases = {
    { "429", response(429), { class = "rate_limited", retryable = true, backoff = "exponential", max_retries = 5 } },
    { "timeout", resil.error("timeout", "slow"), { class = "timeout", retryable = true, backoff = "immediate",
                                                   max_retries = 3 } },
    { "500", response(500), { class = "server_error", retryable = true, backoff = "exponential", max_retries = 3 } },
    { "503", response(503), { class = "server_error", retryable = true, backoff = "exponential", max_retries = 3 } },
    { "400", response(400), { class = "bad_request", retryable = false } },
    { "401", response(401), { class = "auth", retryable = false } },
    { "403", response(403), { class = "auth", retryable = false } },
    { "418 (unknown 4xx)", response(418), { class = "client_error", retryable = false } },
    { "connect", resil.error("connect", "refused"), { class = "unavailable", retryable = true } },
    { "dns", resil.error("dns", "no such host"), { class = "unavailable", retryable = true } },
    { "reset", resil.error("reset", "reset by peer"), { class = "unavailable", retryable = true } },
    { "tls", resil.error("tls", "bad certificate"), { class = "tls", retryable = false } },
    { "an unknown error", resil.error("weird", "?"), { class = "unknown", retryable = true, max_retries = 1 } },
    { "OpenAI context_length_exceeded",
      response(400, '{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}'),
      { class = "context_length", retryable = false, fallback = true } },
    { "OpenAI content policy",
      response(400, '{"error":{"message":"no","type":"invalid_request_error","code":"content_policy_violation"}}'),
      { class = "content_policy", retryable = false, fallback = true } },
    { "Anthropic 529 overloaded_error", response(529, '{"type":"error","error":{"type":"overloaded_error"}}'),
      { class = "overloaded", retryable = true, backoff = "exponential", max_retries = 3 } },
  }
  for _, case in ipairs(cases) do
    it("classifies " .. case[1], function()
      local res, err
      if case[2].status then res = case[2] else err = case[2] end
      local v = classify.outcome(res, err)
      for k, expected in pairs(case[3]) do assert.are.equal(expected, v[k], k) end
    end)
  end

  -- (found by helper H2: only model_not_found's message was kept; a gateway's client read "429
  -- anthropic_rate_limit" and no word of which limit, or when)
  it("says the provider's own message after a rule's name", function()
    local json = resil.json
    local limit = json.encode({ type = "error", error = { type = "rate_limit_error",
      message = "Number of request tokens has exceeded your per-minute rate limit" } })
    local v = classify.outcome(response(429, limit, { ["retry-after"] = "3" }))
    assert.are.equal("429 anthropic_rate_limit: Number of request tokens has exceeded your per-minute rate limit",
      v.reason)
    v = classify.outcome(response(529, json.encode({ type = "error", error = { type = "overloaded_error", message = "" } })))
    assert.are.equal("529 anthropic_overloaded", v.reason) -- (an empty one says nothing)
  end)

  it("treats a 2xx as success, and a 2xx that fails its validator as a retryable invalid_output", function()
    assert.is_nil(classify.outcome(response(200, "{}")))
    local v = classify.outcome(response(200, "<html>oops"), nil, { validate = "chat" })
    assert.are.equal("invalid_output", v.class)
    assert.is_true(v.retryable)
    assert.matches("not JSON", v.reason)
    v = classify.outcome(response(200, '{"choices":[{"message":{"content":"  "}}]}'), nil, { validate = "chat" })
    assert.are.equal("empty content", v.reason)
    assert.is_nil(classify.outcome(response(200, '{"choices":[{"message":{"content":"hi"}}]}'), nil,
      { validate = "chat" }))
    v = classify.outcome(response(200, '{"status":"succeeded","output":"not a url"}'), nil, { validate = "prediction" })
    assert.matches("not a URL", v.reason)
    assert.is_nil(classify.outcome(response(200, '{"status":"succeeded","output":["https://cdn.example/x.png"]}'), nil,
      { validate = "prediction" }))
  end)

  -- (before: "HTTP 503: table: 0x55..." or "HTTP 503: 5.0"; a proxy's own words went unsaid)
  it("says what an error body's message is when it is a string, wherever it is", function()
    local said = {
      ['{"error":{"type":"x","message":{"a":1}}}'] = "HTTP 503", ['{"error":{"message":5}}'] = "HTTP 503",
      ['{"error":"Rate limited, slow down"}'] = "HTTP 503: Rate limited, slow down",
      ['{"message":"Too Many Requests"}'] = "HTTP 503: Too Many Requests",
      ['{"error":{"message":"fine"}}'] = "HTTP 503: fine",
    }
    for body, reason in pairs(said) do assert.are.equal(reason, classify.outcome(response(503, body)).reason, body) end
  end)

  it("carries Retry-After into the verdict", function()
    local v = classify.outcome(response(429, "", { ["retry-after"] = "7" }))
    assert.are.equal(7, v.retry_after)
  end)

  it("lets users extend the rules without touching the module", function()
    local saved = classify.status[409]
    classify.status[409] = { class = "conflict", retryable = true, backoff = "constant", max_retries = 2 }
    local v = classify.outcome(response(409))
    classify.status[409] = saved
    assert.are.equal("conflict", v.class)
    assert.are.equal(2, v.max_retries)
    local ok = classify.outcome(response(200, "x"), nil, { validate = function(res) return res.body == "x" end })
    assert.is_nil(ok)
  end)
end)

describe("policies.retry", function()
  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
  end)
  after_each(function() resil.log.level("info") end)

  -- fail `n` times with `outcome`, then succeed; records when each attempt started
  local function flaky(n, outcome)
    local starts = {}
    return function()
      starts[#starts + 1] = resil.now()
      if #starts <= n then
        if outcome.status then return outcome end
        return nil, outcome
      end
      return "done"
    end, starts
  end

  local function delays(starts)
    local d = {}
    for i = 2, #starts do d[i - 1] = starts[i] - starts[i - 1] end
    return d
  end

  local strategies = {
    constant = function() return 0.5 end,
    linear = function(n) return 0.5 * (n + 1) end,
    exponential = function(n) return 0.5 * 2 ^ n end,
  }
  for strategy, formula in pairs(strategies) do
    it(strategy .. " backoff follows its formula", function()
      local fn, starts = flaky(3, response(500))
      assert.are.equal("done", retry.call(fn, { strategy = strategy, base = 0.5, cap = 30, budget = false }))
      local d = delays(starts)
      assert.are.equal(3, #d)
      for n = 0, 2 do near(formula(n), d[n + 1]) end
    end)
  end

  it("jitter strategies follow the AWS formulas with a seeded random source", function()
    local base, cap = 0.5, 3
    for _, strategy in ipairs({ "full_jitter", "equal_jitter", "decorrelated_jitter" }) do
      local fn, starts = flaky(4, response(503, "", {}))
      assert.are.equal("done", retry.call(fn, { strategy = strategy, base = base, cap = cap, random = lcg(42),
                                                max_retries = 4, budget = false }))
      local r, prev = lcg(42), base
      local d = delays(starts)
      for n = 0, 3 do
        local expected
        if strategy == "full_jitter" then
          expected = r() * math.min(cap, base * 2 ^ n)
        elseif strategy == "equal_jitter" then
          local t = math.min(cap, base * 2 ^ n)
          expected = t / 2 + r() * (t / 2)
        else
          expected = math.min(cap, base + r() * (prev * 3 - base))
          prev = expected
        end
        near(expected, d[n + 1])
      end
    end
  end)

  it("caps delays", function()
    local fn, starts = flaky(5, response(429))
    retry.call(fn, { strategy = "exponential", base = 1, cap = 4, budget = false })
    assert.are.same({ 1, 2, 4, 4, 4 }, delays(starts))
  end)

  it("uses the class's max_retries: 429 five times, 5xx three, 400 never, unknown once", function()
    local function attempts(outcome)
      local fn, starts = flaky(100, outcome)
      local res, err = retry.call(fn, { base = 0.01, budget = false })
      assert.is_nil(res)
      return #starts, err
    end
    assert.are.equal(6, attempts(response(429)))
    assert.are.equal(4, attempts(response(502)))
    assert.are.equal(4, attempts(resil.error("timeout", "t")))
    local n, err = attempts(response(400))
    assert.are.equal(1, n)
    assert.are.equal("bad_request", err.class)
    assert.are.equal(400, err.status)
    assert.are.equal(2, attempts(resil.error("weird", "?")))
  end)

  it("honours Retry-After as a floor on the delay", function()
    local fn, starts = flaky(1, response(429, "", { ["retry-after"] = "5" }))
    retry.call(fn, { base = 0.5, budget = false })
    assert.are.same({ 5 }, delays(starts))
    fn, starts = flaky(1, response(429, "", { ["x-ratelimit-remaining-requests"] = "0",
                                              ["x-ratelimit-reset-requests"] = "2.5s" }))
    retry.call(fn, { base = 0.5, budget = false })
    assert.are.same({ 2.5 }, delays(starts))
  end)

  it("never crosses the deadline: no sleep past it, and a running attempt is cut at it", function()
    local t0 = resil.now()
    local fn, starts = flaky(100, response(500))
    local res, err = retry.call(fn, { strategy = "constant", base = 3, timeout = 10, max_retries = 100,
                                      budget = false })
    assert.is_nil(res)
    assert.are.equal("deadline", err.gave_up)
    assert.are.equal(4, #starts) -- at 0, 3, 6, 9; a retry at 12 would cross
    assert.is_true(resil.now() - t0 <= 10)
    local t1 = resil.now()
    res, err = retry.call(function() resil.sleep(100) end, { timeout = 5, budget = false })
    assert.is_nil(res)
    assert.are.equal("deadline", err.kind)
    near(5, resil.now() - t1)
  end)

  it("does not start a retry that would end after the deadline (attempt_time)", function()
    local fn, starts = flaky(100, response(500))
    retry.call(fn, { strategy = "constant", base = 1, timeout = 10, attempt_time = 4, max_retries = 100,
                     budget = false })
    assert.are.equal(6, #starts) -- at 0..5; one at 6 would need until 10
  end)

  it("the retry budget caps retries during an outage", function()
    local provider = name("outage")
    local budget = { percent = 0.2, min_per_second = 0.5, window = 10 }
    local calls, attempts = 0, 0
    for _ = 1, 100 do
      calls = calls + 1
      retry.call(function() attempts = attempts + 1; return response(503) end,
        { provider = provider, budget = budget, strategy = "immediate" })
    end
    -- allowed retries in the window: 0.5 * 10 + 0.2 * 100 = 25
    assert.are.equal(25, attempts - calls)
    assert.are.equal(25, retry.budget(provider, budget):state().retries)
  end)

  it("calls on_retry and logs every attempt with attempt, class, delay and reason", function()
    local log = os.tmpname()
    resil.log.output(log)
    resil.log.level("info")
    local seen = {}
    local fn = flaky(2, response(503))
    retry.call(fn, { provider = "p-log", budget = false, base = 0.25,
                     on_retry = function(info) seen[#seen + 1] = info.attempt .. ":" .. info.class end })
    resil.log.output("stderr")
    assert.are.same({ "1:server_error", "2:server_error" }, seen)
    local lines = {}
    for line in io.lines(log) do lines[#lines + 1] = resil.json.decode(line) end
    os.remove(log)
    assert.are.equal(2, #lines)
    assert.are.equal("retry", lines[2].msg)
    assert.are.equal(2, lines[2].attempt)
    assert.are.equal(0.5, lines[2].delay)
    assert.are.equal("server_error", lines[2].class)
    assert.matches("HTTP 503", lines[2].reason)
  end)

  it("give_up: the attempt under way ends, and no other starts (nor its backoff); its failure is the call's, " ..
    "retryable; given up before the first, nothing is attempted", function()
    local gone = false
    local attempts = 0
    local t0 = resil.now()
    local res, err = retry.call(function()
      attempts = attempts + 1
      resil.sleep(5)
      gone = true -- (the caller leaves while the attempt is under way)
      return response(500)
    end, { base = 10, budget = false, give_up = function() return gone and "client_left" end })
    assert.is_nil(res)
    assert.are.equal(1, attempts)
    assert.are.equal("server_error", err.class)
    assert.is_true(err.retryable) -- (resil.once keeps nothing for it)
    assert.are.equal("client_left", err.gave_up)
    assert.are.equal(1, err.attempts)
    near(5, resil.now() - t0) -- no backoff slept
    -- left during the backoff: no second attempt
    attempts, gone = 0, false
    res, err = retry.call(function()
      attempts = attempts + 1
      return response(503)
    end, { base = 1, budget = false, give_up = function() return gone and "client_left" end,
           sleep = function(d) gone = true; resil.sleep(d) end })
    assert.are.equal(1, attempts)
    assert.are.equal("client_left", err.gave_up)
    -- an answer is an answer; nothing is attempted for a caller gone already
    assert.are.equal("done", (retry.call(function() return "done" end, { give_up = function() return nil end })))
    attempts = 0
    res, err = retry.call(function() attempts = attempts + 1 end, { give_up = function() return "client_left" end })
    assert.is_nil(res)
    assert.are.equal(0, attempts)
    assert.are.same({ "given_up", "canceled", true, 0 }, { err.kind, err.class, err.retryable, err.attempts })
  end)
end)

describe("policies.retry's give_up during a backoff", function()
  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
  end)
  after_each(function() resil.log.level("info") end)

  -- (before: the backoff was slept to its end, up to its cap or a Retry-After, for a caller gone: a
  -- gateway's call held its key's permits all that time)
  it("a caller that leaves during a backoff ends it: no attempt, the call returns then", function()
    local gone, attempts = false, 0
    local t0 = resil.now()
    resil.spawn(function() resil.sleep(2.5); gone = true end)
    local res, err = retry.call(function()
      attempts = attempts + 1
      return response(429, "", { ["retry-after"] = "40" })
    end, { budget = false, give_up = function() return gone and "client_left" end })
    assert.is_nil(res)
    assert.are.equal(1, attempts)
    assert.are.equal("client_left", err.gave_up)
    assert.are.equal("rate_limited", err.class)
    assert.is_true(resil.now() - t0 <= 3.5, ("returned after %g s"):format(resil.now() - t0))
  end)
end)

describe("policies.fallback", function()
  before_each(function() resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  local function fails(kind, class)
    return function() return nil, resil.error(kind, kind, { class = class }) end
  end

  it("moves on in order on fallback classes and says who served", function()
    local order = {}
    local chain = fallback.chain {
      { name = "a", fn = function() order[#order + 1] = "a"; return nil, classify.error(classify.status["5xx"]) end },
      { name = "b", fn = function() order[#order + 1] = "b"; return nil, classify.error(classify.bodies[1].verdict) end },
      { name = "c", fn = function(x) order[#order + 1] = "c"; return x * 2 end },
    }
    local value, err, info = chain(21)
    assert.are.equal(42, value)
    assert.is_nil(err)
    assert.are.equal("c", info.served_by)
    assert.are.same({ "a", "b", "c" }, order)
    assert.are.equal(2, #info.errors)
  end)

  it("does not move on from a 401 or a 400 (another model would refuse as well)", function()
    local called = false
    local chain = fallback.chain {
      { name = "a", fn = function() return nil, classify.error(classify.status[401]) end },
      { name = "b", fn = function() called = true; return "b" end },
    }
    local value, err = chain()
    assert.is_nil(value)
    assert.are.equal("auth", err.class)
    assert.is_false(called)
  end)

  it("follows a strategy's own condition", function()
    local chain = fallback.chain {
      { name = "a", fn = fails("timeout"), on = { "context_length" } },
      { name = "b", fn = function() return "b" end },
    }
    local value, err = chain()
    assert.is_nil(value)
    assert.are.equal("timeout", err.kind)
    chain = fallback.chain {
      { name = "a", fn = fails("timeout"), on = function(e) return e.kind == "timeout" end },
      { name = "b", fn = function() return "b" end },
    }
    assert.are.equal("b", (chain()))
  end)

  it("ends in a placeholder when every strategy failed", function()
    local chain = fallback.chain {
      { name = "a", fn = fails("connect") },
      placeholder = function(errors) return "placeholder after " .. #errors end,
    }
    local value, err, info = chain()
    assert.are.equal("placeholder after 1", value)
    assert.is_nil(err)
    assert.are.equal("placeholder", info.served_by)
  end)

  it("without a placeholder returns the last error with every failure listed", function()
    local chain = fallback.chain { { name = "a", fn = fails("connect") }, { name = "b", fn = fails("reset") } }
    local value, err = chain()
    assert.is_nil(value)
    assert.are.equal("reset", err.kind)
    assert.are.equal(2, #err.errors)
    assert.are.equal("a", err.errors[1].strategy)
  end)

  it("give_up: no strategy starts once it says a reason, nor the placeholder; the failure so far is the " ..
    "chain's", function()
    local gone, order = false, {}
    local chain = fallback.chain {
      { name = "a", fn = function() order[#order + 1] = "a"; gone = true; return nil, classify.error(classify.status["5xx"]) end },
      { name = "b", fn = function() order[#order + 1] = "b"; return "b" end },
      placeholder = "placeholder",
      give_up = function() return gone and "client_left" end,
    }
    local value, err = chain()
    assert.is_nil(value)
    assert.are.same({ "a" }, order)
    assert.are.equal("server_error", err.class)
    assert.is_true(err.retryable)
    assert.are.equal("client_left", err.gave_up)
    assert.are.equal(1, #err.errors)
    -- the last strategy failed: not the placeholder either
    gone, order = false, {}
    chain = fallback.chain {
      { name = "a", fn = function() gone = true; return nil, classify.error(classify.status["5xx"]) end },
      placeholder = "placeholder", give_up = function() return gone and "client_left" end,
    }
    value, err = chain()
    assert.is_nil(value)
    assert.are.equal("client_left", err.gave_up)
    -- gone before the first: nothing runs
    value, err = fallback.chain { { name = "a", fn = function() order[#order + 1] = "a" end },
      give_up = function() return "client_left" end } ()
    assert.is_nil(value)
    assert.are.same({}, order)
    assert.are.same({ "given_up", true }, { err.kind, err.retryable })
    assert.has_error(function() fallback.chain { function() end, give_up = "yes" } end)
  end)
end)

describe("policies.fallback, a strategy that returns nothing", function()
  before_each(function() resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("is no answer: the chain moves on, or ends with an error naming it, never nil without err", function()
    -- (before: the chain returned nil, nil as served by it; `err.kind` in the caller raised)
    local chain = fallback.chain {
      { name = "cache", fn = function() end },
      { name = "model", fn = function(x) return x .. "!" end },
    }
    local value, err, info = chain("hi")
    assert.are.equal("hi!", value)
    assert.is_nil(err)
    assert.are.equal("model", info.served_by)
    assert.matches("cache returned nothing", info.errors[1].error.message)
    value, err = fallback.chain { { name = "only", fn = function() return nil end } } ()
    assert.is_nil(value)
    assert.are.equal("invalid_output", err.kind)
    assert.matches("only returned nothing", err.message)
    value, err, info = fallback.chain { { name = "a", fn = function() end }, placeholder = "p" } ()
    assert.are.same({ "p", "placeholder" }, { value, info.served_by })
    -- a false value is a value
    assert.is_false((fallback.chain { function() return false end } ()))
    -- (before: a placeholder function that returned nothing was the chain's nil, nil)
    value, err = fallback.chain { { name = "a", fn = function() return nil, resil.error("timeout", "t") end },
      placeholder = function() end } ()
    assert.is_nil(value)
    assert.are.equal("timeout", err.kind)
    assert.matches("a failed %(its placeholder returned nothing%): ", err.message)
  end)
end)

describe("policies.fallback, a name misspelt", function()
  -- (before: placeholdr = "..." was ignored and the chain ended with the failure; a hole in the
  -- list dropped the strategies after it)
  it("is said at the line that made the chain, naming it", function()
    local function failing() return nil, resil.error("server_error", "503", { class = "auth" }) end
    local cases = {
      { { failing, placeholdr = "p" }, "unknown field 'placeholdr'" },
      { { failing, nil, failing }, "strategy 2 is nil" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(function()
        local chain = fallback.chain(case[1])
        return chain
      end)
      assert.is_false(ok)
      assert.matches("^spec/policies_spec.lua:%d+: fallback.chain: " .. case[2], err)
    end
  end)

  it("in a provider's fallback list is said at the line that made the provider", function()
    local call = require "policies.call"
    local cases = {
      { { fallback = { function() end, placeholdr = "p" } }, "fallback: unknown field 'placeholdr'" },
      { { fallback = { { name = "b", fn = function() end, on = "server_error" } } },
        "fallback.chain: strategy 2: `on` must be a list" },
      { { fallback_on = "server_error" }, "fallback_on must be a list of classes or a function" },
    }
    for i, case in ipairs(cases) do
      case[1].request = { url = "http://127.0.0.1:9/" }
      local ok, err = pcall(function()
        local p = call.provider("misspelt-" .. i, case[1])
        return p
      end)
      assert.is_false(ok)
      assert.matches("^spec/policies_spec.lua:%d+: call.provider 'misspelt%-" .. i .. "': " .. case[2], err)
    end
  end)
end)

describe("policies.limit", function()
  before_each(function() resil.clock.virtual() end)

  it("runs at most `size` at once, queues in order, refuses past the queue bound", function()
    local lname = name("limit")
    local running, peak, order = 0, 0, {}
    local function work(i)
      running = running + 1
      peak = math.max(peak, running)
      resil.sleep(1)
      running = running - 1
      order[#order + 1] = i
      return i
    end
    local tasks = {}
    for i = 1, 6 do tasks[i] = resil.spawn(limit.run, lname, { size = 2, queue = 3 }, work, i) end
    local results = {}
    for i = 1, 6 do results[i] = { select(2, tasks[i]:join()) } end
    assert.are.equal(2, peak)
    assert.are.same({ 1, 2, 3, 4, 5 }, order)
    assert.are.equal("bulkhead_full", results[6][2].kind)
    assert.are.equal(0, limit.get(lname):state().in_use)
  end)

  it("a wait past its timeout is refused; a permit is released even when fn raises", function()
    local lname = name("limit")
    local holder = resil.spawn(limit.run, lname, { size = 1 }, resil.sleep, 10)
    resil.yield()
    local ok, err = limit.run(lname, { size = 1, timeout = 2 }, function() return "never" end)
    assert.is_nil(ok)
    assert.are.equal("bulkhead_full", err.kind)
    holder:join()
    assert.has_error(function() limit.run(lname, { size = 1 }, error, "boom") end)
    assert.are.equal(0, limit.get(lname):state().in_use)
  end)

  it("raises at the caller's line for options that cannot be meant", function()
    -- (before: 'policies/limit.lua:30: semaphore ...: size must be an integer >= 1', naming the library)
    for _, opts in ipairs({ { size = 0 / 0 }, { size = 1, timeout = -1 } }) do
      local ok, err = pcall(function()
        local r = limit.run(name("limit"), opts, function() return 1 end)
        return r
      end)
      assert.is_false(ok)
      assert.matches("^spec/policies_spec.lua:%d+: semaphore '", err)
    end
  end)

  -- (before: the inner limit.run waited for ever for a permit its own task held, and the spec hung)
  it("inside itself, with every permit held by its task, raises rather than wait for ever", function()
    local lname = name("limit")
    local ok, err = pcall(resil.timeout, 60, function() -- (the timeout: a spec that fails, not one that hangs)
      local r = limit.run(lname, { size = 1 }, function()
        local inner = limit.run(lname, { size = 1 }, function() return "inner" end)
        return inner
      end)
      return r
    end)
    assert.is_false(ok)
    assert.matches("^spec/policies_spec.lua:%d+: semaphore '" .. lname:gsub("%-", "%%-") .. "': task %d+ holds all 1 of its permits", err)
    assert.are.equal(0, limit.get(lname):state().in_use)
    -- another task's permit is not its own: the wait is for it, as ever
    local holder = resil.spawn(limit.run, lname, { size = 2 }, resil.sleep, 1)
    resil.yield()
    assert.are.equal("nested", limit.run(lname, { size = 2 }, function()
      return limit.run(lname, { size = 2 }, function() return "nested" end)
    end))
    holder:join()
  end)
end)

describe("classify.outcome of a status that is no HTTP status", function()
  it("is a protocol failure: a string \"503\", NaN, 503.5 or 0", function()
    for _, st in ipairs({ "503", "200", 0 / 0, 503.5, 0 }) do
      local v = classify.outcome({ status = st })
      assert.is_table(v)
      assert.are.equal("protocol", v.class)
      assert.matches("is not an HTTP status", v.reason)
    end
  end)

  it("leaves a value's own string status and real statuses as they were", function()
    assert.is_nil(classify.outcome({ status = "succeeded" }))
    assert.is_nil(classify.outcome({ status = 200 }))
    assert.are.equal("server_error", classify.outcome({ status = 503 }).class)
  end)
end)
