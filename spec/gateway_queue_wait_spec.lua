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
      return resil.semaphore("gateway:total"):state().waiting == 1 end, 10))
    local t0 = resil.now()
    local res = assert(post(one)) -- waits for the key's permit, then for the gateway's
    local waited = resil.now() - t0
    assert.are.equal(503, res.status)
    assert.is_true(waited <= 2 + 1e-6, ("a request waited %.1f s in a queue of queue_timeout = 2"):format(waited))
    assert.are.equal(503, select(2, x:join()).status)
    assert.are.equal(200, select(2, a:join()).status)
  end)
  -- (before: a changed max_concurrent made a new semaphore, gateway:total:N: the old one's holders
  -- and the new one's ran beside each other, and the old series stayed in /metrics)
  it("counts the permits in use against a lowered max_concurrent, in one series", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, latency = 10 }))
    local gateway, ai = helpers.fresh_gateway()
    for k in pairs(gateway.config) do gateway.config[k] = nil end
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.001, cap = 0.005 } })
    gateway.configure({ auth = true, key_cache = 0, models = {}, max_concurrent = 2, queue = 0 })
    local s = gateway.serve({ listen = "127.0.0.1:0" })
    resil.clock.virtual()
    finally(function()
      resil.clock.real()
      s:close()
      m:stop()
      resil.log.level("info")
    end)
    local base = ("http://127.0.0.1:%d"):format(s:port())
    local keys = require "resil.keys"
    local key = assert(keys.add({ name = "lowered" }))
    local function post()
      return http.request({ method = "POST", url = base .. "/v1/chat/completions", body = BODY, timeout = 60,
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
    end
    local a, b = resil.spawn(post), resil.spawn(post) -- both permits of 2, 10 s upstream
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 2 end, 10))
    gateway.configure({ max_concurrent = 1 })
    -- two still run: a third is refused at once (a new semaphore of 1 let it in beside them)
    local third = assert(post())
    assert.are.equal(503, third.status)
    assert.are.equal(2, m.server:pending())
    local metrics = assert(http.request({ url = base .. "/metrics" })).body
    local series = {}
    for sem in metrics:gmatch('resil_semaphore_in_use{semaphore="(gateway:total[^"]*)"}') do series[#series + 1] = sem end
    assert.are.same({ "gateway:total" }, series)
    assert.are.equal(200, select(2, a:join()).status)
    assert.are.equal(200, select(2, b:join()).status)
  end)
  -- (before: the semaphore was resized by the next request's admit only: with none coming, the
  -- requests queued under the old limit waited out their queue_timeout beside free permits)
  it("admits the requests already queued when a reload raises max_concurrent, or lifts it", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, latency = 10 }))
    local gateway, ai = helpers.fresh_gateway()
    for k in pairs(gateway.config) do gateway.config[k] = nil end
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.001, cap = 0.005 } })
    gateway.configure({ auth = true, key_cache = 0, models = {}, max_concurrent = 1, queue = 8, queue_timeout = 30 })
    local s = gateway.serve({ listen = "127.0.0.1:0" })
    resil.clock.virtual()
    finally(function()
      resil.clock.real()
      s:close()
      m:stop()
      resil.log.level("info")
    end)
    local base = ("http://127.0.0.1:%d"):format(s:port())
    local keys = require "resil.keys"
    local key = assert(keys.add({ name = "raised" }))
    local function post()
      return http.request({ method = "POST", url = base .. "/v1/chat/completions", body = BODY, timeout = 60,
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
    end
    local tasks = { resil.spawn(post), resil.spawn(post), resil.spawn(post) }
    assert.is_true(helpers.wait_until(function()
      return m.server:pending() == 1 and resil.semaphore("gateway:total"):state().waiting == 2 end, 10))
    gateway.configure({ max_concurrent = 3 }) -- what a reload does with the config file's table
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 3 end, 5),
      "the queued requests still wait beside the raised limit's free permits")
    for _, t in ipairs(tasks) do assert.are.equal(200, select(2, t:join()).status) end
    -- a reload whose config has no max_concurrent: no limit, for those already queued too
    gateway.configure({ max_concurrent = 1 })
    tasks = { resil.spawn(post), resil.spawn(post), resil.spawn(post) }
    assert.is_true(helpers.wait_until(function()
      return m.server:pending() == 1 and resil.semaphore("gateway:total"):state().waiting == 2 end, 10))
    gateway.config.max_concurrent = nil -- (a reload starts from the defaults, which have none)
    gateway.configure({})
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 3 end, 5),
      "the queued requests still wait for a limit the config lifted")
    for _, t in ipairs(tasks) do assert.are.equal(200, select(2, t:join()).status) end
  end)
  -- (before: a stream's client that waited out queue_timeout behind a key's streams was told "its
  -- queue is full" with one place taken in a queue of 4: the operator raised `queue`, which
  -- changed nothing; the wait was too short, or the key's concurrency too small)
  it("says why a request was refused: a full queue, or no permit within queue_timeout", function()
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ strict = true, latency = 10 }))
    local gateway, ai = helpers.fresh_gateway()
    for k in pairs(gateway.config) do gateway.config[k] = nil end
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.001, cap = 0.005 } })
    gateway.configure({ auth = true, key_cache = 0, models = {}, queue = 1, queue_timeout = 2 })
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
    local key = assert(keys.add({ name = "queue-why", concurrency = 1 }))
    local function post()
      return http.request({ method = "POST", url = url, body = BODY, timeout = 60,
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
    end
    local a = resil.spawn(post) -- the key's one permit, 10 s upstream
    assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10))
    local waiting = resil.spawn(post) -- the queue's one place, for 2 s
    assert.is_true(helpers.wait_until(function()
      return resil.semaphore("gateway:key:" .. keys.list()[1].id):state().waiting == 1 end, 10))
    local full = assert(post()) -- no place left in the queue: at once
    assert.are.equal(503, full.status)
    assert.matches("queue is full", json.decode(full.body).error.message)
    local timed_out = select(2, waiting:join())
    assert.are.equal(503, timed_out.status)
    local msg = json.decode(timed_out.body).error.message
    assert.is_nil(msg:find("queue is full", 1, true), msg)
    assert.matches("queue_timeout", msg)
    assert.are.equal("too_many_concurrent_requests", json.decode(timed_out.body).error.code)
    assert.are.equal(200, select(2, a:join()).status)
  end)
end)
