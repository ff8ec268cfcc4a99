-- A request past the gateway's limits waits in their queue for up to queue_timeout seconds in
-- all: the key's permit, then the gateway's, take their waits out of that one. Real HTTP on
-- loopback to the mock, a real SQLite store, the virtual clock.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local BODY = json.encode({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } })

describe("the gateway's queue", function()
  -- (before: each permit was awaited for the whole queue_timeout: a request waited 4 s of a
  -- queue_timeout of 2, 2 s for its key's permit and 2 s more for the gateway's)
  it("keeps a request at most queue_timeout, its key's permit and the gateway's together", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, latency = 10 }))
    local gateway, ai = helpers.fresh_gateway()
    for k in pairs(gateway.config) do gateway.config[k] = nil end
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.001, cap = 0.005 } })
    gateway.configure({ auth = true, key_cache = 0, models = {}, max_concurrent = 1, queue = 4, queue_timeout = 2 })
    local s = gateway.serve({ listen = "127.0.0.1:0" })
    resil.clock.virtual()
    finally(function()
      resil.clock.real()
      s:close()
      m:stop()
      resil.log.level("info")
    end)
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(s:port())
    local keys = require "resil.keys"
    local one = assert(keys.add({ name = "queue-one", concurrency = 1 }))
    local other = assert(keys.add({ name = "queue-other" }))
    local function post(key)
      return http.request({ method = "POST", url = url, body = BODY, timeout = 60,
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
    end
    local a = resil.spawn(post, other) -- the gateway's one permit, 10 s upstream
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10))
    local x = resil.spawn(post, one) -- the key's one permit, then waits for the gateway's
    assert.is_true(helpers.wait_until(function()
      return resil.semaphore("gateway:total:1"):state().waiting == 1 end, 10))
    local t0 = resil.now()
    local res = assert(post(one)) -- waits for the key's permit, then for the gateway's
    local waited = resil.now() - t0
    assert.are.equal(503, res.status)
    assert.is_true(waited <= 2 + 1e-6, ("a request waited %.1f s in a queue of queue_timeout = 2"):format(waited))
    assert.are.equal(503, select(2, x:join()).status)
    assert.are.equal(200, select(2, a:join()).status)
  end)
end)
