-- A key revoked while one of its requests waits in the queue for a permit (its --concurrency,
-- max_concurrent): the request had been let in as the key was checked before its wait, and was
-- served once a permit came, up to queue_timeout (10 s) after the revoke, where the README says
-- a revoke takes at most key_cache seconds. A wait longer than key_cache checks the key again.
-- Real HTTP on loopback to the mock, a real SQLite store, the real clock.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local BODY = json.encode({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } })

describe("the gateway's queue and a revoked key", function()
  for _, case in ipairs({
    { what = "its key's permit", conf = {}, concurrency = 1 },
    { what = "the gateway's permit", conf = { max_concurrent = 1 } },
  }) do
    it("a request queued for " .. case.what .. " when its key is revoked is refused 401 once let in, " ..
       "not sent upstream", function()
      resil.clock.real()
      resil.log.level("off")
      resil.store_config({ url = helpers.tmpname(".db") })
      local m = assert(resil.mock.start({ strict = true, latency = 1.5 }))
      local gateway, ai = helpers.fresh_gateway()
      for k in pairs(gateway.config) do gateway.config[k] = nil end
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456" })
      local conf = { auth = true, key_cache = 0.2, models = {}, queue_timeout = 30 }
      for k, v in pairs(case.conf) do conf[k] = v end
      gateway.configure(conf)
      local s = gateway.serve({ listen = "127.0.0.1:0" })
      finally(function()
        s:close()
        m:stop()
        resil.log.level("info")
      end)
      local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(s:port())
      local keys = require "resil.keys"
      local name = "revoked-in-queue-" .. (case.concurrency and "key" or "total")
      local key = assert(keys.add({ name = name, concurrency = case.concurrency }))
      local function post()
        return http.request({ method = "POST", url = url, body = BODY, timeout = 30,
          headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } })
      end
      local first = resil.spawn(post) -- the one permit, 1.5 s upstream
      assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10))
      local queued = resil.spawn(post)
      local sem = case.concurrency and "gateway:key:" .. keys.list()[1].id or "gateway:total"
      assert.is_true(helpers.wait_until(function() return resil.semaphore(sem):state().waiting == 1 end, 10))
      assert(keys.revoke(name))
      local ok, res = first:join()
      assert.is_true(ok)
      assert.are.equal(200, res.status, res.body) -- (in flight as the key was revoked: served)
      ok, res = queued:join()
      assert.is_true(ok)
      -- (before: 200, sent upstream more than a second after the revoke, past key_cache)
      assert.are.equal(401, res.status, res.body)
      assert.are.equal("invalid_api_key", json.decode(res.body).error.code)
      assert.are.equal(1, m:stats().routes.chat)
      assert.are.equal(0, resil.semaphore(sem):state().in_use) -- (its permit given back)
    end)
  end
end)
