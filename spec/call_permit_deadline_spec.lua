-- policies.call's waits in an attempt are cut at the call's deadline (retry's bounded = true):
-- the wait for a concurrency permit too, when a wait for a rate token came first. Real HTTP on
-- loopback to the mock, the virtual clock.
local resil = require "resil"
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
end)
