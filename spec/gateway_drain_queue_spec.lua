-- A SIGTERM whose drain_timeout ends while a request still waits in the gateway's queue for a
-- permit (max_concurrent, a key's --concurrency): that request had started nothing, yet it was
-- cut with the calls still running, its connection closed without an answer. It is answered a
-- 503 gateway_stopping, as a request that comes during the drain is. Real processes: the
-- gateway in its own, a mock provider whose answers take 30 s, a SQLite store.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

describe("gateway: a drain that ends with requests still queued", function()
  for _, case in ipairs({
    { what = "for the gateway's permit (max_concurrent)", conf = "max_concurrent = 1", key = false },
    { what = "for its key's permit (--concurrency)", conf = "key_cache = 0", key = true },
  }) do
    it("answers the one queued " .. case.what .. " a 503 gateway_stopping, not a cut connection", function()
      resil.clock.real()
      resil.log.level("off")
      local m = assert(resil.mock.start({ strict = true, reply = "served", latency = 30 }))
      local db = helpers.tmpname(".db")
      local key
      if case.key then
        local add = helpers.run(("%s keys add --name one-at-once --concurrency 1 --store %s"):format(helpers.resil, db))
        assert.are.equal(0, add.code, add.stderr)
        key = add.stdout:match("^(sk%-resil%-%S+)\n$")
      end
      local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
      local config = helpers.write(helpers.tmpname(".lua"), ([[
        require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
        return { auth = %s, drain_timeout = 1, queue_timeout = 30, %s }
      ]]):format(m.url .. "/v1", tostring(case.key), case.conf))
      os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s"):format(
        helpers.resil, port, config, db, log, pidfile))
      assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
      local pid = helpers.slurp(pidfile):match("%d+")
      finally(function()
        if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
        m:stop()
        resil.log.level("info")
      end)
      assert(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10),
        helpers.slurp(log))
      local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
      local headers = { ["content-type"] = "application/json", authorization = key and ("Bearer " .. key) or nil }
      local function post(i)
        return http.request({ method = "POST", url = url, timeout = 20, headers = headers,
          body = json.encode({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi " .. i } } }) })
      end
      local first = resil.spawn(post, 1) -- holds the one permit: its answer takes 30 s
      assert.is_true(helpers.wait_until(function() return m.server:pending() == 1 end, 10))
      local queued = resil.spawn(post, 2)
      assert.is_true(helpers.wait_until(function()
        local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/metrics"):format(port))
        return r.stdout:match('resil_semaphore_waiting{semaphore="gateway:[^"]*"} 1') ~= nil
      end, 10), "the second request never queued")
      os.execute("kill -TERM " .. pid)
      local ok, res, err = queued:join()
      assert.is_true(ok)
      -- (before: nil, a connection closed without an answer, as the call still running was cut)
      assert(res, "no answer: " .. tostring(err and err.message or err))
      assert.are.equal(503, res.status, res.body)
      local body = json.decode(res.body)
      assert.are.equal("gateway_stopping", body.error.code)
      assert.are.equal("1", res.headers["retry-after"])
      assert.are.equal("close", res.headers["connection"])
      first:join() -- (the call still running is cut, as the README says)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), helpers.slurp(log))
      assert.are.equal(1, m:stats().routes.chat) -- (only the first request's call reached the provider)
    end)
  end
end)
