-- The gateway's concurrency permits (max_concurrent, a key's --concurrency) are semaphore
-- permits its handler takes: held by the handler's task, or handed over to the task that runs
-- a call to its end under an Idempotency-Key (resil.once's). Real HTTP on loopback to the mock,
-- a real SQLite store, the virtual clock.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local BODY = { model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }

-- a mock answering after `latency` s, a gateway in front of it -> gw url, mock
local function start(latency, config)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start({ strict = true, latency = latency }))
  local gateway, ai = helpers.fresh_gateway()
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.001, cap = 0.005 } })
  gateway.configure({ auth = false, key_cache = 0, models = {} })
  for k, v in pairs(config) do gateway.config[k] = v end
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  resil.clock.virtual()
  finally(function()
    resil.clock.real()
    s:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d/v1/chat/completions"):format(s:port()), m
end

local function post(url, headers, timeout)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return http.request({ method = "POST", url = url, headers = h, body = json.encode(BODY), timeout = timeout })
end

describe("gateway permits", function()
  -- (before: any script could release them: two requests ran under max_concurrent = 1)
  it("are the gateway's own: a script's release of one is refused, and the limit holds", function()
    local url, m = start(5, { max_concurrent = 1, queue = 0 })
    local first = resil.spawn(post, url)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10)) -- upstream
    local total = resil.semaphore("gateway:total")
    local ok, err = pcall(total.release, total)
    assert.are.equal(503, assert(post(url)).status, "a second request ran beside the first")
    assert.is_false(ok)
    assert.matches("holds none of its permits", err)
    assert.are.equal(200, select(2, first:join()).status)
    assert.are.equal(0, total:state().in_use)
    assert.are.equal(200, assert(post(url)).status)
  end)

  it("of a call under an Idempotency-Key whose client left stay with the call until it ends, then come back once",
    function()
      local url, m = start(5, { max_concurrent = 1, queue = 0 })
      local total = resil.semaphore("gateway:total")
      local res, err = post(url, { ["idempotency-key"] = "left-1" }, 1)
      assert.is_nil(res)
      assert.are.equal("timeout", err.kind)
      -- the client is gone, its handler ended; the call, upstream, holds the permit
      assert.are.equal(1, m.server:pending())
      assert.are.equal(1, total:state().in_use)
      assert.are.equal(503, assert(post(url)).status)
      assert.is_true(helpers.wait_until(function() return m.server:pending() == 0 end, 10))
      assert.is_true(helpers.wait_until(function() return total:state().in_use == 0 end, 10))
      assert.are.equal(200, assert(post(url)).status)
      assert.are.equal(0, total:state().in_use)
      -- the answer was kept under the key: the client's retry gets it without a call
      local again = assert(post(url, { ["idempotency-key"] = "left-1" }))
      assert.are.equal("true", again.headers["x-resil-replayed"])
      assert.are.equal(0, total:state().in_use)
    end)

  -- (before: the key's permit, taken while the request then waited for the gateway's, was in no
  -- <close> yet: a client that left there took one of its key's permits away for good)
  it("of a key come back when its client leaves while it waits for the gateway's", function()
    local url, m = start(5, { max_concurrent = 1, queue = 4, queue_timeout = 30 })
    local keys = require "resil.keys"
    local gateway = require "policies.gateway"
    gateway.config.auth = true
    local key = assert(keys.add({ name = "permits-two", concurrency = 2 }))
    local bearer = { authorization = "Bearer " .. key }
    local first = resil.spawn(post, url, bearer)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10)) -- upstream
    local res, err = post(url, bearer, 1) -- the key's second permit, then the gateway's queue
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(200, select(2, first:join()).status)
    -- the gateway's own limit lifted: the key's two permits are both free again
    gateway.config.max_concurrent, gateway.config.queue = nil, 0
    local a, b = resil.spawn(post, url, bearer), resil.spawn(post, url, bearer)
    assert.are.same({ 200, 200 }, { select(2, a:join()).status, select(2, b:join()).status })
  end)

  it("of a key and of the gateway come back when the call's task is canceled", function()
    local url, m = start(5, { max_concurrent = 2, queue = 0 })
    local keys = require "resil.keys"
    local gateway = require "policies.gateway"
    gateway.config.auth = true
    local key = assert(keys.add({ name = "permits-one", concurrency = 1 }))
    local bearer = { authorization = "Bearer " .. key, ["idempotency-key"] = "canceled-1" }
    local client = resil.spawn(post, url, bearer)
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10))
    local running = resil.keep("policies.gateway.calls_running")
    local total = resil.semaphore("gateway:total")
    assert.are.equal(1, total:state().in_use)
    for t in pairs(running.tasks) do t:cancel() end -- as a drain's end does (the call's, resil.once's)
    assert.are.equal(0, total:state().in_use)
    local _, res = client:join()
    assert.are_not.equal(200, res.status)
    assert.are.equal(200, assert(post(url, { authorization = "Bearer " .. key })).status)
    assert.are.equal(0, total:state().in_use)
  end)
end)
