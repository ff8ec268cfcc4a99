-- The gateway's traces as an operator's collector receives them (--otlp-endpoint):
-- each request is a trace of its own. Before, every provider attempt was a child
-- of the process's root span ("run"), so all the requests a gateway served for
-- days were one trace, whose root was exported only at the process's exit (never
-- after a kill -9). Real processes: the gateway, a mock provider (resil-lua mock),
-- and the collector, a resil.server in this process.
local resil = require "resil"
local helpers = require "spec.helpers"

local CHAT = { model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } }

describe("gateway --otlp-endpoint", function()
  it("each request is a trace of its own: a server span, its attempts under it; a caller's traceparent is its " ..
     "parent", function()
    local spans = {}
    local collector = assert(resil.server.listen({ port = 0, handler = function(req)
      local doc = resil.json.decode(req.body)
      for _, s in ipairs(doc.resourceSpans[1].scopeSpans[1].spans) do spans[#spans + 1] = s end
      return { status = 200, body = "{}" }
    end }))
    local mport, port = helpers.free_ports(2)
    local mpidfile, pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".pid"), helpers.tmpname(".out")
    os.execute(("%s mock --port %d > /dev/null 2>&1 & echo $! > %s"):format(helpers.resil, mport, mpidfile))
    local mpid = helpers.slurp(mpidfile):match("%d+")
    assert.is_true(helpers.wait_listening(mport), "the mock did not start") -- (before the first request: one sent
    -- while it started was refused and tried again, an attempt more than the spec counts)
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
      return { auth = false }
    ]]):format(mport))
    os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s --otlp-endpoint http://127.0.0.1:%d " ..
      "> %s 2>&1 & echo $! > %s"):format(helpers.resil, port, config, helpers.tmpname(".db"), collector:port(), log,
      pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function()
      for _, p in ipairs({ pid, mpid }) do if helpers.alive(p) then os.execute("kill -KILL " .. p) end end
      collector:close()
    end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10),
      helpers.slurp(log))
    local url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
    local caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    for i = 1, 3 do
      local headers = i == 3 and { traceparent = ("00-%s-%s-01"):format(caller_trace, caller_span) } or nil
      local res = assert(resil.http.request({ method = "POST", url = url, json = CHAT, headers = headers }))
      assert.are.equal(200, res.status, res.body)
    end
    -- a health check and a scrape make no trace (a probe every few seconds would be most of them)
    for _, probe in ipairs({ "/health", "/metrics" }) do
      local res = assert(resil.http.request({ url = ("http://127.0.0.1:%d%s"):format(port, probe) }))
      assert.are.equal(200, res.status)
    end
    -- the export runs each second: 3 attempts and 3 requests, while the gateway serves on
    assert.is_true(helpers.wait_until(function() return #spans >= 6 end, 10), #spans .. " spans")
    local by_id, attempts = {}, {}
    for _, s in ipairs(spans) do
      by_id[s.spanId] = s
      if s.kind == 3 then attempts[#attempts + 1] = s end
    end
    assert.are.equal(3, #attempts)
    -- (none for the probes, in this export or the next)
    assert.is_false(helpers.wait_until(function() return #spans > 6 end, 2.5))
    local traces = {}
    for _, a in ipairs(attempts) do
      -- its parent is the request's server span, exported with it, in its trace
      local request = by_id[a.parentSpanId]
      assert.is_truthy(request, "the attempt's parent span was not exported")
      assert.are.equal(2, request.kind)
      assert.are.equal("POST /v1/chat/completions", request.name)
      assert.are.equal(a.traceId, request.traceId)
      traces[a.traceId] = request
    end
    local n = 0
    for _ in pairs(traces) do n = n + 1 end
    assert.are.equal(3, n) -- three requests, three traces
    assert.is_truthy(traces[caller_trace])
    assert.are.equal(caller_span, traces[caller_trace].parentSpanId)
    for id, request in pairs(traces) do
      if id ~= caller_trace then assert.is_nil(request.parentSpanId) end -- a root
    end
  end)
end)

describe("gateway and a caller's tracestate", function()
  it("goes on to the provider with the attempt's traceparent, with spans exported or not", function()
    local seen = {}
    local provider = assert(resil.server.listen({ port = 0, handler = function(req)
      seen[#seen + 1] = tostring(req.headers.tracestate) .. " " .. tostring(req.headers.traceparent)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
        id = "c-1", object = "chat.completion", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, message = { role = "assistant", content = "hi" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 1, completion_tokens = 1, total_tokens = 2 } }) }
    end }))
    local collector = assert(resil.server.listen({ port = 0, handler = function() return { status = 200, body = "{}" } end }))
    finally(function() provider:close(); collector:close() end)
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
      return { auth = false }
    ]]):format(provider:port()))
    for _, otlp in ipairs({ "", ("--otlp-endpoint http://127.0.0.1:%d"):format(collector:port()) }) do
      local port = helpers.free_ports(1)
      local pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".out")
      os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s %s > %s 2>&1 & echo $! > %s"):format(
        helpers.resil, port, config, helpers.tmpname(".db"), otlp, log, pidfile))
      local pid = helpers.slurp(pidfile):match("%d+")
      finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
      assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10),
        helpers.slurp(log))
      local res = assert(resil.http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
        json = CHAT, headers = { traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
          tracestate = "congo=t61rcWkgMzE" } }))
      assert.are.equal(200, res.status, res.body)
      os.execute("kill -KILL " .. pid)
    end
    assert.are.equal(2, #seen)
    for _, line in ipairs(seen) do
      assert.matches("^congo=t61rcWkgMzE 00%-4bf92f3577b34da6a3ce929d0e0e4736%-%x+%-01$", line)
    end
  end)
end)
