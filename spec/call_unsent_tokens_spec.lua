-- policies.call's attempt that ends before it sends anything (its wait for a concurrency permit
-- reached the call's deadline) gives back the tokens its token bucket took for it: nothing went
-- to the provider, and a later call must not be refused for a rate it never used. Real HTTP on
-- loopback to the mock, the virtual clock.
local resil = require "resil"
local call = require "policies.call"

describe("policies.call's attempt that sent nothing", function()
  -- (before: the estimate stayed charged, and the next call, once the permit was free, was
  -- refused rate_limited with nothing sent to the provider but the slow call)
  it("gives its token estimate back", function()
    resil.clock.virtual()
    local m = assert(resil.mock.start({ strict = true, latency = 30 }))
    finally(function() m:stop(); resil.clock.real() end)
    local req = { method = "POST", url = m.url .. "/v1/chat/completions",
      headers = { authorization = "Bearer sk-test-123456", ["content-type"] = "application/json" } }
    local body = { json = { model = "gpt-4o-mini", messages = { { role = "user", content = "a" } } } }
    -- one permit, shared by name: a slow call without a deadline holds it for 30 s
    local slow = call.provider("unsent-tokens-slow", { request = req, timeout = 100, retry = { max_retries = 0 },
      concurrency = { name = "unsent-tokens", size = 1, queue = 10 } })
    -- 500 tokens, refilled at 1 an hour; a call is estimated at 400
    local p = call.provider("unsent-tokens", { request = req, timeout = 100, deadline = 5, retry = { max_retries = 0 },
      tokens = { rate = 1, per = 3600, burst = 500, estimate = function() return 400 end },
      concurrency = { name = "unsent-tokens", size = 1, queue = 10 } })
    local holder = resil.spawn(function() return slow(body) end)
    resil.sleep(0.001)
    local res, err = p(body)
    assert.is_nil(res) -- its permit never came within the deadline: nothing sent
    assert.is_not_nil(err)
    local ok, slow_res = holder:join()
    assert.is_true(ok)
    assert.are.equal(200, slow_res.status)
    assert.are.equal(1, m:stats().routes.chat) -- the slow call's only
    -- the next call on the same tokens (a deadline of 100 s: the mock answers in 30 s)
    local next_call = call.provider("unsent-tokens-next", { request = req, timeout = 100, deadline = 100, retry = { max_retries = 0 },
      tokens = { name = "unsent-tokens:tokens", rate = 1, per = 3600, burst = 500, estimate = function() return 400 end } })
    local second, err2 = next_call(body)
    assert.is_not_nil(second, "the next call, with the permit free: " .. tostring(err2 and err2.message or err2))
    assert.are.equal(200, second.status)
  end)
end)
