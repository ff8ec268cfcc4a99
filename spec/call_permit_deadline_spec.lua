-- policies.call's waits in an attempt are cut at the call's deadline (retry's bounded = true):
-- the wait for a concurrency permit too, when a wait for a rate token came first. Real HTTP on
-- loopback to the mock, the virtual clock.
local resil = require "resil"
local helpers = require "spec.helpers"
local call = require "policies.call"

describe("policies.call's permit wait", function()
  -- (before: the wait's timeout was the deadline's distance taken before the bucket's wait, and the
  -- permit was then awaited for all of it again: a call with deadline = 10 ended after 18 s)
  it("after a wait for a rate token, ends at the call's deadline", function()
    resil.clock.virtual()
    local m = assert(resil.mock.start({ strict = true, latency = 30 }))
    finally(function() m:stop(); resil.clock.real() end)
    local req = { method = "POST", url = m.url .. "/v1/chat/completions",
      headers = { authorization = "Bearer sk-test-123456", ["content-type"] = "application/json" } }
    local body = { json = { model = "gpt-4o-mini", messages = { { role = "user", content = "a" } } } }
    -- one permit, shared by name: a slow call without a deadline holds it for 30 s
    local slow = call.provider("permit-deadline-slow", { request = req, timeout = 100, retry = { max_retries = 0 },
      concurrency = { name = "permit-deadline", size = 1, queue = 10 } })
    local p = call.provider("permit-deadline", { request = req, timeout = 100, deadline = 10, retry = { max_retries = 0 },
      rate = { rate = 1, per = 8, burst = 1 }, concurrency = { name = "permit-deadline", size = 1, queue = 10 } })
    assert(p.bucket:try()) -- the next token comes 8 s from now
    local holder = resil.spawn(function() return slow(body) end)
    resil.sleep(0.001)
    local t0 = resil.now()
    local res, err = p(body)
    local took = resil.now() - t0
    assert.is_nil(res)
    assert.is_true(took <= 10 + 1e-6, ("a call with deadline = 10 ended after %.1f s"):format(took))
    local ok, slow_res = holder:join()
    assert.is_true(ok)
    assert.are.equal(200, slow_res.status)
  end)

  -- (before: a shared breaker's allow() waited on a Redis that held its writes past the deadline,
  -- and the attempt raised "bucket '...': timeout must be a non-negative number", then, with that
  -- wait's timeout kept at 0, "http request: 'timeout' must be >= 0": a raise out of the call,
  -- where its deadline's error was due)
  it("after a shared breaker's store call that outlasted the deadline, is the deadline's error, not a raise", function()
    resil.clock.real()
    local redis = helpers.redis_server()
    finally(function() redis.stop() end)
    resil.store_config({ url = redis.url() })
    local m = assert(resil.mock.start({ strict = true, latency = 0.01 }))
    finally(function() m:stop() end)
    local p = call.provider("deadline-shared", { timeout = 5, deadline = 0.3, retry = { max_retries = 0 },
      request = { method = "POST", url = m.url .. "/v1/chat/completions",
        headers = { authorization = "Bearer sk-test-123456", ["content-type"] = "application/json" } },
      breaker = { shared = true, min_calls = 5 }, rate = { rate = 100, per = 1 } })
    local body = { json = { model = "gpt-4o-mini", messages = { { role = "user", content = "a" } } } }
    assert.are.equal(200, assert(p(body)).status) -- the breaker's scripts loaded
    -- Redis holds its writes (the breaker's probe script) for 1 s, past the call's deadline
    os.execute(("redis-cli -p %d client pause 1000 write > /dev/null"):format(redis.port))
    local ok, res, err = pcall(p, body)
    assert.is_true(ok, tostring(res))
    assert.is_nil(res)
    assert.are.equal("deadline", err.kind)
    assert.are.equal(1, m:stats().routes.chat) -- nothing sent past the deadline
  end)
end)
