-- The composed policy against the mock provider over real HTTP on loopback.
local resil = require "resil"
local call = require "policies.call"

local seq = 0
local function provider(m, conf)
  seq = seq + 1
  conf.request = conf.request or { method = "POST", url = m.url .. "/v1/chat/completions" }
  return call.provider("call-spec-" .. seq, conf)
end

local chat = { json = { model = "gpt-test", messages = { { role = "user", content = "hello" } } } }

describe("policies.call against the mock provider", function()
  local m
  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
  end)
  after_each(function()
    if m then m:stop() end
    m = nil
    resil.log.level("info")
  end)

  it("rides out a 429 burst, waiting as long as Retry-After says", function()
    m = resil.mock.start { sequence = { chat = { { status = 429, retry_after = 2 }, { status = 429, retry_after = 3 },
                                                 "ok" } } }
    local p = provider(m, { timeout = 10, retry = { base = 0.1 } })
    local t0 = resil.now()
    local res, err, info = p(chat)
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.equal(p.name, info.served_by)
    assert.is_true(resil.now() - t0 >= 5)
    assert.are.equal(3, m:stats().routes.chat)
  end)

  -- (before: a 429 with Retry-After: 3600 held a call without a deadline an hour, its fallback unused)
  it("does not wait out a Retry-After past max_retry_after: the call ends at once, its fallback serves", function()
    m = resil.mock.start { sequence = { chat = { { status = 429, retry_after = 3600 }, "ok" } } }
    local p = provider(m, { retry = { base = 0.1 } })
    local t0 = resil.now()
    local res, err = p(chat)
    assert.is_nil(res)
    assert.are.same({ "rate_limited", "retry_after", 3600, 1 }, { err.class, err.gave_up, err.retry_after, err.attempts })
    assert.is_true(resil.now() - t0 < 1)
    -- a fallback is tried at once; a caller's own max_retry_after waits it out
    m:stop()
    m = resil.mock.start { sequence = { chat = { { status = 429, retry_after = 3600 }, "ok" } } }
    local other = provider(m, {})
    local q = provider(m, { retry = { base = 0.1 }, fallback = { other } })
    local res2, err2, info = q(chat)
    assert.is_nil(err2)
    assert.are.equal(other.name, info.served_by)
    assert.is_true(resil.now() - t0 < 1)
    m:stop()
    m = resil.mock.start { sequence = { chat = { { status = 429, retry_after = 90 }, "ok" } } }
    local patient = provider(m, { retry = { base = 0.1, max_retry_after = 120 } })
    local t1 = resil.now()
    assert.are.equal(200, assert(patient(chat)).status)
    assert.is_true(resil.now() - t1 >= 90)
  end)

  it("a 5xx outage opens the breaker, which stops the calls, then recovers through half-open", function()
    m = resil.mock.start { faults = { { route = "chat", status = 503 } } }
    local p = provider(m, { timeout = 10, retry = { max_retries = 0 },
                            breaker = { window_type = "count", window = 4, min_calls = 4, failure_rate = 0.5,
                                        open_for = 30 } })
    for _ = 1, 4 do
      local res, err = p(chat)
      assert.is_nil(res)
      assert.are.equal(503, err.status)
    end
    assert.are.equal("open", p.breaker:state())
    local res, err = p(chat)
    assert.is_nil(res)
    assert.are.equal("circuit_open", err.kind)
    assert.are.equal(4, m:stats().routes.chat) -- the open breaker kept the call off the wire
    m:configure {} -- the outage ends
    resil.sleep(30)
    res, err = p(chat)
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.equal("closed", p.breaker:state())
  end)

  it("retries garbage output and accepts the valid answer", function()
    m = resil.mock.start { sequence = { chat = { "garbage", "empty", "ok" } } }
    local p = provider(m, { timeout = 10, validate = "chat", retry = { base = 0.1 } })
    local res, err = p(chat)
    assert.is_nil(err)
    assert.matches("Mock reply", resil.json.decode(res.body).choices[1].message.content)
    assert.are.equal(3, m:stats().routes.chat)
  end)

  it("cuts a hung provider at the deadline", function()
    m = resil.mock.start { sequence = { chat = { "hang" } } }
    local p = provider(m, { timeout = 60, deadline = 3 })
    local t0 = resil.now()
    local res, err = p(chat)
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.is_true(resil.now() - t0 <= 3 + 1e-6)
    assert.are.equal(1, m:stats().routes.chat)
  end)

  -- (before: the call after the one that gave up sat in its bucket's pause for the hour, with no deadline, and
  -- its fallback was not asked)
  it("a provider's pause past max_retry_after is not waited out by the calls after it either", function()
    m = resil.mock.start {}
    local backup = provider(m, { timeout = 10 })
    for i, limits in ipairs({ { rate = { rate = 100, per = 1, name = "call-spec-paused-r" } },
                              { tokens = { rate = 100000, per = 60, name = "call-spec-paused-t" } } }) do
      m:configure({ sequence = { chat = { { status = 429, retry_after = 3600 } } } })
      local p = provider(m, { timeout = 10, rate = limits.rate, tokens = limits.tokens })
      local t0 = resil.now()
      local res, err = p(chat)
      assert.are.same({ "rate_limited", "retry_after" }, { err.kind, err.gave_up }, i)
      local sent = m:stats().routes.chat
      res, err = p(chat) -- no deadline
      assert.is_nil(res)
      assert.are.same({ "rate_limited", "retry_after" }, { err.kind, err.gave_up }, i)
      assert.is_true(err.retry_after > 3500, tostring(err.retry_after))
      assert.are.equal(sent, m:stats().routes.chat) -- nothing sent meanwhile
      local _, _, info = assert(provider(m, { timeout = 10, rate = limits.rate, tokens = limits.tokens,
        fallback = { backup } })(chat))
      assert.are.equal(backup.name, info.served_by)
      assert.are.equal(0, resil.now() - t0)
    end
  end)

  it("falls back to another provider on a context-length refusal and says who served", function()
    m = resil.mock.start { sequence = { chat = { { status = 400, error_code = "context_length_exceeded" } } } }
    local big = provider(m, { timeout = 10 })
    local p = provider(m, { timeout = 10, fallback = { big, placeholder = "n/a" } })
    local res, err, info = p(chat)
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.equal(big.name, info.served_by)
  end)

  -- (before: a fallback provider's deadline was ignored: its part ran four attempts of a minute each)
  it("a fallback provider's own deadline bounds its part of the call", function()
    m = resil.mock.start { sequence = { chat = { 503, "hang", "hang", "hang", "hang" } } }
    local backup = provider(m, { deadline = 10, retry = { budget = false } })
    local p = provider(m, { retry = { max_retries = 0, budget = false }, fallback = { backup } })
    local t0 = resil.now()
    local res, err = p(chat)
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(10, resil.now() - t0)
    assert.are.equal(2, m:stats().routes.chat)
  end)

  it("keeps to its rate limit: 6 calls at 5/s with burst 1 take exactly 1 s", function()
    m = resil.mock.start {}
    local p = provider(m, { timeout = 10, rate = { rate = 5, per = 1, burst = 1 } })
    local t0 = resil.now()
    local results = resil.map({ 1, 2, 3, 4, 5, 6 }, function() return p(chat) end, { concurrency = 6 })
    assert.are.equal(6, #results)
    assert.is_true(math.abs(resil.now() - t0 - 1) < 0.05)
  end)

  -- (before: a shared bucket had no wait_time nor observe: every call crashed)
  it("keeps to a shared rate limit with local tokens beside it: 6 calls at 5/s with burst 1 take exactly 1 s",
    function()
      resil.store_config({ url = require("spec.helpers").tmpname(".db") })
      m = resil.mock.start {}
      local p = provider(m, { timeout = 10, rate = { rate = 5, per = 1, burst = 1, shared = true },
                              tokens = { rate = 100000, per = 60 } })
      local t0 = resil.now()
      local results = resil.map({ 1, 2, 3, 4, 5, 6 }, function() return p(chat) end, { concurrency = 6 })
      assert.are.equal(6, #results)
      for _, r in ipairs(results) do assert.are.equal(200, r.status) end
      assert.is_true(math.abs(resil.now() - t0 - 1) < 0.05, resil.now() - t0)
      assert.are.equal(6, m:stats().routes.chat)
    end)

  -- (before: the count was observed first, then the estimate's excess refunded on top of it: the bucket
  -- granted what the provider said was left plus the excess, and a refund pulled a shared pause back)
  it("after an answer, its tokens bucket holds what the provider says is left, local or shared", function()
    resil.store_config({ url = require("spec.helpers").tmpname(".db") })
    m = resil.mock.start { rate_limits = { tokens = 5000 } }
    for _, shared in ipairs({ false, true }) do
      local p = provider(m, { timeout = 10, tokens = { rate = 10000, per = 60, shared = shared } })
      local res = assert(p({ json = { model = "gpt-test", max_tokens = 1000, messages = chat.json.messages } }))
      local left = tonumber(res.headers["x-ratelimit-remaining-tokens"])
      assert.is_true(left < 5000 and left > 4000, left)
      -- (a shared bucket is corrected in a task of its own, the answer not waiting for the store: its
      -- operations done, no virtual time passed; turns up to a wall-clock bound: SQLite's take thousands of
      -- them on a busy machine, and a count of 1000 failed one run in two)
      local until_wall = resil.clock.wall() + 10
      while p.token_bucket:remaining() ~= left and resil.clock.wall() < until_wall do resil.yield() end
      assert.are.equal(left, p.token_bucket:remaining())
    end
  end)

  -- (before: "can never be granted" was a rate_limited like any other, retried five times: 15.5 s of backoff
  -- before the call failed, or before its fallback served)
  it("a request its tokens bucket can never grant (more than the burst) is not retried: the fallback serves at once",
    function()
      resil.store_config({ url = require("spec.helpers").tmpname(".db") })
      m = resil.mock.start {}
      local big = { json = { model = "gpt-test", max_tokens = 5000, messages = chat.json.messages } }
      for _, shared in ipairs({ false, true }) do
        local backup = provider(m, { timeout = 10 })
        local p = provider(m, { timeout = 10, tokens = { rate = 1000, per = 60, shared = shared },
          rate = { rate = 100, per = 1 }, fallback = { backup } })
        local t0 = resil.now()
        local res, _, info = p(big)
        assert.are.equal(200, res.status)
        assert.are.equal(backup.name, info.served_by)
        assert.are.equal(0, resil.now() - t0)
        p = provider(m, { timeout = 10, tokens = { rate = 1000, per = 60, shared = shared } })
        local err
        res, err = p(big)
        assert.is_nil(res)
        assert.are.same({ "rate_limited", 1 }, { err.kind, err.attempts })
        assert.matches("can never be granted", err.message)
      end
    end)

  -- (before: "policies/call.lua:65: attempt to add a 'string' with a 'number'" out of a paid call, and a
  -- total_tokens of 1e300 for an 8-token answer charged the bucket that much: every later call waited)
  it("a tokens bucket takes an answer's usage as far as it can be read: garbage neither raises nor starves it",
    function()
      local usage
      local server = resil.server.listen({ handler = function()
        return { status = 200, headers = { ["content-type"] = "application/json" },
                 body = '{"choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":' .. usage .. '}' }
      end })
      finally(function() server:close() end)
      local p = call.provider("call-spec-usage-garbage", { tokens = { rate = 10000, per = 60 },
        request = { method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(server:port()) } })
      local cases = { -- usage, the tokens the bucket is charged (1: the request's estimate stays)
        { '{"prompt_tokens":"abc","completion_tokens":3}', 1 },
        { '{"prompt_tokens":true,"completion_tokens":{}}', 1 },
        { '{"prompt_tokens":1e300,"completion_tokens":3}', 1 },
        { '{"prompt_tokens":5,"completion_tokens":3,"total_tokens":"abc"}', 8 },
        { '{"prompt_tokens":5,"completion_tokens":3,"total_tokens":1e300}', 8 },
        { '{"prompt_tokens":5,"completion_tokens":3,"total_tokens":-1e300}', 8 },
        { '{"prompt_tokens":5,"completion_tokens":null,"total_tokens":5}', 5 },
        -- xAI's reasoning, outside completion_tokens, in total_tokens
        { '{"prompt_tokens":5,"completion_tokens":3,"total_tokens":20,"completion_tokens_details":{"reasoning_tokens":12}}', 20 },
        { '{"total_tokens":7}', 7 },
      }
      for i, c in ipairs(cases) do
        usage = c[1]
        p.token_bucket:refund(10000) -- full
        local ok, res = pcall(p, { body = "{}" }) -- an estimate of 1 token
        assert.is_true(ok, tostring(res))
        assert.are.equal(200, res.status, i)
        assert.are.equal(10000 - c[2], p.token_bucket:remaining(), i .. ": " .. c[1])
      end
    end)

  it("sends the provider's request under the call's fields and the attempt's headers; its bucket learns from the answer's headers, left unbuilt", function()
    local seen
    local server = resil.server.listen({ handler = function(req)
      seen = { method = req.method, path = req.path, auth = req.headers["authorization"], mine = req.headers["x-mine"],
               key = req.headers["idempotency-key"], body = req.body }
      return { status = 200, headers = { ["X-RateLimit-Remaining-Requests"] = "3" },
               body = '{"choices":[{"message":{"role":"assistant","content":"hi"}}]}' }
    end })
    local base = { method = "POST", url = ("http://127.0.0.1:%d/base"):format(server:port()),
                   headers = { authorization = "Bearer sk-base" }, timeout = 5 }
    local p = call.provider("call-spec-layers", { request = base, rate = { rate = 100, per = 1 } })
    local req = { url = base.url:gsub("/base$", "/call"), headers = { ["x-mine"] = "1" }, idempotency_key = "k1",
                  body = "{}" }
    local res = assert(p(req))
    server:close()
    assert.are.same({ method = "POST", path = "/call", auth = "Bearer sk-base", mine = "1", key = "k1", body = "{}" },
      seen)
    assert.are.equal(3, p.bucket:remaining())
    assert.is_nil(rawget(res, "headers"))
    assert.are.equal("3", res.headers["x-ratelimit-remaining-requests"])
    -- the provider's and the call's tables are as they were
    assert.are.same({ authorization = "Bearer sk-base" }, base.headers)
    assert.are.same({ ["x-mine"] = "1" }, req.headers)
    assert.are.equal("k1", req.idempotency_key)
  end)

  it("bounds concurrency per provider", function()
    m = resil.mock.start { latency = 1 }
    local p = provider(m, { timeout = 10, concurrency = { size = 2, queue = 10 } })
    local peak = 0
    local watcher = resil.spawn(function()
      for _ = 1, 40 do
        peak = math.max(peak, p.semaphore:state().in_use)
        resil.sleep(0.1)
      end
    end)
    resil.map({ 1, 2, 3, 4, 5 }, function() return p(chat) end, { concurrency = 5 })
    watcher:cancel()
    assert.are.equal(2, peak)
    assert.are.equal(5, m:stats().routes.chat)
  end)

  it("sends the idempotency key when asked, the same on every attempt", function()
    m = resil.mock.start { sequence = { chat = { 500, "ok" } } }
    local p = provider(m, { timeout = 10, retry = { base = 0.1 } })
    local req = { json = chat.json, idempotency_key = "job-42" }
    assert.is_nil(select(2, p(req)))
    assert.are.equal(2, m:stats().keys["job-42"])
  end)

  it("after an answer it refused, the next attempt sends a key of its own (the provider would replay it)", function()
    m = resil.mock.start { idempotency = true, sequence = { chat = { "empty", "ok" } } }
    local p = provider(m, { timeout = 10, retry = { base = 0.1 }, validate = "chat" })
    local req = { json = chat.json, idempotency_key = "job-43" }
    local res, err = p(req)
    assert.is_nil(err)
    assert.matches("Mock reply", resil.json.decode(res.body).choices[1].message.content)
    assert.are.same({ 1, 1 }, { m:stats().keys["job-43"], m:stats().keys["job-43.1"] })
  end)

  -- (before: the concurrency table's timeout, limit.run's, was taken and ignored: a call without a
  -- deadline queued for the permit as long as the call holding it ran)
  it("waits for a concurrency permit no longer than the concurrency table's timeout", function()
    m = resil.mock.start { sequence = { chat = { { status = 200, latency = 10 }, "ok" } } }
    local p = provider(m, { timeout = 30, concurrency = { size = 1, queue = 10, timeout = 2 } })
    local first = resil.spawn(function() return p(chat) end)
    resil.sleep(0.1)
    local t0 = resil.now()
    local res, err = p(chat)
    assert.is_nil(res)
    assert.are.equal("bulkhead_full", err.kind, tostring(err))
    assert.is_true(math.abs(resil.now() - t0 - 2) < 1e-6, tostring(resil.now() - t0))
    assert.are.equal(200, select(2, first:join()).status)
  end)

  -- (before: retry.timeout bounded the retries only: an attempt under way ran its own timeout, 30 s,
  -- past the call's 5)
  it("a retry table's timeout is the call's deadline: no attempt runs past it", function()
    m = resil.mock.start { sequence = { chat = { "hang", "ok" } } }
    local p = provider(m, { timeout = 30, retry = { timeout = 5 } })
    local t0 = resil.now()
    local res, err = p(chat)
    assert.is_nil(res)
    assert.is_true(math.abs(resil.now() - t0 - 5) < 1e-6, tostring(resil.now() - t0))
    assert.are.equal("deadline", err.gave_up, tostring(err)) -- (as with the provider's deadline = 5)
    assert.are.equal(1, m:stats().routes.chat)
  end)

  -- (before: the call sent as the outage began, answering its 503 late, re-opened the half-open breaker,
  -- and the probe that came back 200 was dropped: open again for open_for with the provider back)
  it("a call sent before its breaker opened, failing while the probe is out, does not re-open it", function()
    m = resil.mock.start { sequence = { chat = { { status = 503, latency = 6 }, 503, 503, { status = 200, latency = 2 } } } }
    local p = provider(m, { timeout = 30, retry = { max_retries = 0 },
      breaker = { window_type = "count", window = 2, min_calls = 2, open_for = 5 } })
    local br = resil.breaker(p.name)
    local late = resil.spawn(function() return p(chat) end)
    resil.sleep(0.1)
    assert.is_nil((p(chat)))
    assert.is_nil((p(chat)))
    assert.are.equal("open", br:state())
    resil.sleep(5)
    local probe = resil.spawn(function() return p(chat) end)
    resil.sleep(0.5)
    assert.are.equal(503, select(3, late:join()).status)
    assert.are.equal("half_open", br:state())
    assert.are.equal(200, select(2, probe:join()).status)
    assert.are.equal("closed", br:state())
  end)
end)

describe("call.provider's options", function()
  before_each(function() resil.clock.virtual(); resil.log.level("error") end)
  after_each(function() resil.log.level("info") end)

  it("that cannot be meant raise at the line that made the provider, before any call is sent", function()
    -- (before: a NaN or "30" timeout raised 'call.lua:...: http request: ...' at every call; an
    -- unknown validator raised at call.lua once the request had been sent, and paid for; validate = 5
    -- 'attempt to call a number value' inside classify.lua)
    local m = resil.mock.start({})
    -- (timeout = 0: every attempt timed out at once, after resil.http's 0 came to mean that; curl's 0 is none)
    local bad = { { timeout = 0 / 0 }, { timeout = -1 }, { timeout = "30" }, { deadline = 0 / 0 },
      { deadline = "10" }, { validate = "chatt" }, { validate = 5 }, { timeout = 0 },
      -- (before: 'attempt to index a boolean value (field 'breaker')' inside call.lua, or the limits module's)
      { breaker = true }, { rate = 5 }, { tokens = "90000" }, { concurrency = 4 } }
    for i, conf in ipairs(bad) do
      conf.request = { method = "POST", url = m.url .. "/v1/chat/completions" }
      local ok, err = pcall(function()
        local p = call.provider("call-bad-" .. i, conf)
        return p
      end)
      assert.is_false(ok, "taken: " .. i)
      assert.matches("call_spec.lua:%d+: call.provider 'call%-bad%-" .. i .. "': ", err)
    end
    assert.is_nil(m:stats().routes.chat)
    -- a deadline already spent is the call's failure, as before
    local p = call.provider("call-spent", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
      deadline = -1 })
    local res, err = p(chat)
    assert.is_nil(res)
    assert.are.equal("deadline", err.kind)
    m:stop()
  end)

  -- (before: retries = 3 was ignored; rate = 500 raised "call.lua:479: bad argument #1 to 'for iterator'",
  -- breaker = true "attempt to index a boolean value", inside this library; fallback = other (no list)
  -- fell back to nothing; a call with a number, or with no url anywhere, raised inside it at each attempt)
  it("an unknown option, a table option given otherwise, or a call without a request raise at the caller's line",
    function()
    local m = resil.mock.start({})
    local request = { method = "POST", url = m.url .. "/v1/chat/completions" }
    local other = call.provider("call-other", { request = request })
    local nourl = call.provider("call-no-url", {})
    local cases = {
      { function() local p = call.provider("call-x1", { request = request, retries = 3 }); return p end, "unknown option 'retries'" },
      { function() local p = call.provider("call-x2", { request = request, rate = 500 }); return p end, "rate must be a table of its options (or false: none), got number" },
      { function() local p = call.provider("call-x3", { request = request, breaker = true }); return p end, "breaker must be a table of its options (or false: none), got boolean" },
      { function() local p = call.provider("call-x4", { request = "http://x" }); return p end, "request must be a table, got string" },
      { function() local p = call.provider("call-x5", { request = request, fallback = other }); return p end, "fallback is a list" },
      -- (before: ignored: `header` sent no authorization, which the mock let by and the provider answered 401;
      -- `timout` left every attempt the 60 s default)
      { function() local p = call.provider("call-x7", { request = { url = request.url, header = {} } }); return p end, "request: unknown field 'header' (a request takes url, method, headers, " },
      { function() local p = call.provider("call-x8", { request = { url = request.url, timout = 5 } }); return p end, "request: unknown field 'timout'" },
      -- (before: a call's own request fields misspelt were ignored as well; a field of the caller's
      -- own, which its validator reads, is let be)
      { function() local r = other({ json = {}, header = { authorization = "Bearer k" } }); return r end, "request: unknown field 'header', did you mean 'headers'?" },
      { function() local r = other({ jsn = {}, timout = 5 }); return r end, "request: unknown field '" },
      { function() local r = other(5); return r end, "the request must be a table or a function" },
      { function() local r = nourl(chat); return r end, "no url" },
    }
    for i, c in ipairs(cases) do
      local ok, err = pcall(c[1])
      assert.is_false(ok, i)
      assert.matches("call_spec%.lua:" .. debug.getinfo(c[1], "S").linedefined .. ": [%w%.]*provider '[%w%-]+': " .. c[2]:gsub("%p", "%%%0"), err)
    end
    assert.is_nil(m:stats().routes.chat)
    assert.are.equal(200, assert(call.provider("call-x6", { request = request, rate = false })(chat)).status)
    assert.are.equal(200, assert(other({ json = chat.json, schema = "summary" })).status)
    m:stop()
  end)
end)
