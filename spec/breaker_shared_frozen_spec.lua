-- A shared breaker on a Redis that freezes (SIGSTOP) while a caller asks for the half-open probe:
-- the caller fails at the store's timeout (the loop goes on) and falls back to its local window,
-- as the store section says. The probe command it sent runs when Redis thaws, and takes the slot
-- for a caller that will never report. (Before: every process was refused for probe_timeout, an
-- hour here, after the store came back; now the next allow that reaches the store gives it back.)
local resil = require "resil"
local helpers = require "spec.helpers"

describe("a shared breaker whose Redis froze while a probe was asked for", function()
  it("does not block the loop, and once Redis thaws the slot nobody took is given back", function()
    resil.clock.real()
    resil.log.level("error")
    local redis = helpers.redis_server()
    finally(function()
      redis.stop()
      resil.log.level("info")
    end)
    resil.store_config({ url = redis.url(nil, "timeout=0.3") })
    local br = resil.breaker("frozen-probe", { shared = true, window_type = "count", window = 1, min_calls = 1,
      failure_rate = 0.5, open_for = 0.2, probe_timeout = 3600 })
    br:record(false, 0.01)
    assert.is_nil((br:allow())) -- open, for everyone
    resil.sleep(0.25) -- half-open in the store
    os.execute("kill -STOP " .. redis.pid)
    local ticks = 0
    local ticker = resil.spawn(function() while true do resil.sleep(0.01); ticks = ticks + 1 end end)
    br:allow() -- the probe asked for; the answer never comes (the local window decides)
    assert.is_true(ticks > 0, "the loop stood still while the store was frozen")
    ticker:cancel()
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function()
      return os.execute(("redis-cli -p %d ping > /dev/null 2>&1"):format(redis.port)) == true
    end, 10))
    local ok, probe, err
    assert.is_true(helpers.wait_until(function()
      ok, probe = br:allow()
      if not ok then err = probe end
      return ok == true
    end, 2), "refused after the thaw: " .. tostring(err and err.message))
    assert.are.equal("probe", probe)
    br:record(true, 0.01)
    assert.are.equal("closed", br:state())
  end)
end)
