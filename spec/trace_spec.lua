-- W3C trace context and OTLP/HTTP JSON export: a run continues TRACEPARENT,
-- each provider attempt is a span whose traceparent header the provider
-- receives, and --otlp-endpoint sends the spans, received here on a local
-- resil.server, with their parent/child links and GenAI attributes.
local resil = require "resil"
local helpers = require "spec.helpers"

-- A provider that answers 429 once, then a chat completion; it writes the
-- traceparent headers it received to arg[1].
local pipeline = [[
local resil = require "resil"
local call = require "policies.call"
local seen, n = {}, 0
local provider = resil.server.listen({ port = 0, handler = function(req)
  n = n + 1
  seen[#seen + 1] = req.headers.traceparent or "-"
  if n == 1 then return { status = 429, headers = { ["retry-after"] = "0" }, body = "{}" } end
  return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
    id = "resp-1", model = "mock-1-2026", choices = { { message = { role = "assistant", content = "hi" } } },
    usage = { prompt_tokens = 7, completion_tokens = 3, total_tokens = 10 } }) }
end })
local p = call.provider("mockai", { request = { method = "POST",
  url = ("http://127.0.0.1:%d/v1/chat/completions"):format(provider:port()) }, retry = { base = 0, cap = 0 } })
assert(p{ json = { model = "mock-1", messages = { { role = "user", content = "hi" } } } })
local f = assert(io.open(arg[1], "w")); f:write(table.concat(seen, "\n"), "\n"); f:close()
provider:close()
]]

local function attrs_of(span)
  local out = {}
  for _, a in ipairs(span.attributes or {}) do
    local v = a.value
    out[a.key] = v.stringValue or (v.intValue and tonumber(v.intValue)) or v.doubleValue or v.boolValue
  end
  return out
end

describe("trace context and OTLP export", function()
  it("sends each attempt as a span under the run's, with GenAI attributes and the traceparent the provider got", function()
    local bodies = {}
    local collector = resil.server.listen({ port = 0, handler = function(req)
      bodies[#bodies + 1] = { path = req.path, type = req.headers["content-type"], body = req.body }
      return { status = 200, body = "{}" }
    end })
    local headers, log = helpers.tmpname(".tp"), helpers.tmpname(".log")
    local parent_trace, parent_span = ("4bf92f3577b34da6a3ce929d0e0e4736"), "00f067aa0ba902b7"
    local script = helpers.write(helpers.tmpname(".lua"), pipeline)
    local pidfile = helpers.tmpname(".pid")
    os.execute(("TRACEPARENT=00-%s-%s-01 %s --store %s --log-level info --log-file %s --otlp-endpoint " ..
      "http://127.0.0.1:%d %s %s > /dev/null 2>&1 & echo $! > %s"):format(parent_trace, parent_span, helpers.resil,
      helpers.tmpname(".db"), log, collector:port(), script, headers, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
    collector:close()

    assert.is_true(#bodies >= 1)
    local spans = {}
    for _, b in ipairs(bodies) do
      assert.are.equal("/v1/traces", b.path)
      assert.matches("application/json", b.type)
      local doc = assert(resil.json.decode(b.body))
      local rs = doc.resourceSpans[1]
      assert.are.equal("service.name", rs.resource.attributes[1].key)
      for _, s in ipairs(rs.scopeSpans[1].spans) do spans[#spans + 1] = s end
    end
    assert.are.equal(3, #spans) -- the run and its two attempts
    local run, attempts = nil, {}
    for _, s in ipairs(spans) do
      if s.name == "run" then run = s else attempts[#attempts + 1] = s end
      assert.are.equal(parent_trace, s.traceId) -- the trace TRACEPARENT began
      assert.matches("^%d+$", s.startTimeUnixNano)
      assert.is_true(tonumber(s.endTimeUnixNano) >= tonumber(s.startTimeUnixNano))
    end
    assert.are.equal(parent_span, run.parentSpanId)
    table.sort(attempts, function(a, b) return attrs_of(a)["resil.attempt"] < attrs_of(b)["resil.attempt"] end)
    local received = {}
    for line in helpers.slurp(headers):gmatch("[^\n]+") do received[#received + 1] = line end
    for i, a in ipairs(attempts) do
      assert.are.equal(run.spanId, a.parentSpanId)
      assert.are.equal(3, a.kind) -- client
      assert.are.equal(("00-%s-%s-01"):format(parent_trace, a.spanId), received[i]) -- what the provider got
      local at = attrs_of(a)
      assert.are.equal("mockai", at["gen_ai.system"]) -- (deprecated, kept for the dashboards that read it)
      assert.are.equal("mockai", at["gen_ai.provider.name"]) -- the conventions' name since gen_ai.system
      assert.are.equal("mock-1", at["gen_ai.request.model"])
      assert.are.equal("chat", at["gen_ai.operation.name"])
    end
    local first, second = attrs_of(attempts[1]), attrs_of(attempts[2])
    assert.are.equal(429, first["http.response.status_code"])
    assert.are.equal("rate_limited", first["error.type"])
    assert.are.equal(2, attempts[1].status.code)
    assert.are.equal("mock-1-2026", second["gen_ai.response.model"])
    assert.are.equal(7, second["gen_ai.usage.input_tokens"])
    assert.are.equal(3, second["gen_ai.usage.output_tokens"])
    -- a span that went well is left Unset (code 0, omitted in JSON), not Ok: the trace API's
    -- "instrumentation libraries SHOULD NOT set the status code to Ok"; Ok is the application's to say
    assert.are.same({}, attempts[2].status)
    assert.are.same({}, run.status)
    -- the attempt's ids are on its log lines
    local retry_line = helpers.slurp(log):match('[^\n]*"msg":"retry"[^\n]*')
    assert.matches('"span_id":"' .. attempts[1].spanId .. '"', retry_line or "", 1, true)
  end)

  it("starts a new trace without TRACEPARENT, and ignores a malformed one", function()
    for _, env in ipairs({ "", "TRACEPARENT=00-zz-00-01" }) do
      local r = helpers.run(("%s %s -e 'local t = require(\"resil\").trace.root(); print(t.trace_id, t.parent_id)'")
        :format(env, helpers.resil))
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("^%x+\tnil\n$", r.stdout)
      assert.are.equal(32, #r.stdout:match("^%x+"))
    end
    assert.are.same({ "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01" },
      { resil.trace.parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01") })
    assert.is_nil(resil.trace.parse("00-" .. ("0"):rep(32) .. "-00f067aa0ba902b7-01"))
    -- a later version's header, with a field more, is read as a 00 (W3C trace context, versioning);
    -- a 00 with anything more is no traceparent
    assert.are.same({ "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01" },
      { resil.trace.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next") })
    assert.is_nil(resil.trace.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"))
    assert.is_nil(resil.trace.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"))
  end)

  it("drops spans past a full queue and counts them; the caller never waits", function()
    local r = helpers.run_script([[
local resil = require "resil"
resil.trace.export({ url = "http://127.0.0.1:9/v1/traces", max_queue = 10, interval = 3600 })
for i = 1, 25 do resil.trace.start("s" .. i):finish() end
print(resil.metrics.counter("resil_trace_spans_dropped_total"):value())
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("15.0\n", r.stdout:gsub("^15\n$", "15.0\n"))
  end)

  it("exports span names and attribute keys redacted, as it does attribute values", function()
    local r = helpers.run_script([[
local resil = require "resil"
local body
local collector = resil.server.listen({ port = 0, handler = function(req)
  body = req.body
  return { status = 200, body = "{}" }
end })
resil.log.redact("vault-token-123456")
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 3600 })
resil.trace.start("GET https://x.example/v1/files?key=plain-key-42&n=1"):finish({
  ["token vault-token-123456"] = 1, url = "https://x.example/?sig=plain-sig-7" })
resil.trace.start("upload vault-token-123456"):finish()
-- (named like a credential, as OpenTelemetry names a header's attribute: never registered)
resil.trace.start("call", { ["http.request.header.authorization"] = "Bearer plain-bearer-8",
  ["http.request.header.x-api-key"] = "plain-xkey-9", api_key = "plain-apikey-10" }):finish()
resil.trace.flush()
collector:close()
io.write(body)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    for _, leaked in ipairs({ "plain-key-42", "vault-token-123456", "plain-sig-7", "plain-bearer-8", "plain-xkey-9",
      "plain-apikey-10" }) do
      assert.is_nil(r.stdout:find(leaked, 1, true), leaked .. " was exported:\n" .. r.stdout)
    end
    local names = {}
    for _, s in ipairs(resil.json.decode(r.stdout).resourceSpans[1].scopeSpans[1].spans) do names[#names + 1] = s.name end
    assert.are.same({ "GET https://x.example/v1/files?key=[REDACTED]&n=1", "upload [REDACTED]", "call" }, names)
  end)

  it("names the service and the resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.trace.export({ url = "http://127.0.0.1:9", interval = 3600 })
local s = resil.trace.start("x")
s:finish()
for _, a in ipairs(resil.json.decode(resil.trace.otlp_body({ s })).resourceSpans[1].resource.attributes) do
  io.write(a.key, "=", a.value.stringValue, ";")
end
]])
    local r = helpers.run(("OTEL_SERVICE_NAME=gateway-eu OTEL_RESOURCE_ATTRIBUTES='deployment.environment=prod," ..
      "service.name=other,team=a%%2Cb' %s --log-level off %s"):format(helpers.resil, script))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("service.name=gateway-eu;deployment.environment=prod;team=a,b;", r.stdout)
    r = helpers.run(("env -u OTEL_SERVICE_NAME OTEL_RESOURCE_ATTRIBUTES=service.name=batch %s --log-level off %s")
      :format(helpers.resil, script))
    assert.are.equal("service.name=batch;", r.stdout)
  end)

  it("refuses export options that do not fit, naming the option and the caller's line", function()
    local r = helpers.run_script([[
local resil = require "resil"
for _, o in ipairs({ { batch = 0 }, { batch = "10" }, { max_queue = 1.5 }, { interval = 0 }, { timeout = -1 } }) do
  o.url = "http://127.0.0.1:9"
  print(select(2, pcall(function() resil.trace.export(o) end)))
end
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do
      assert.matches("^%S+%.lua:4: ", line) -- the script's pcall line, not the library's
      lines[#lines + 1] = line:gsub("^%S+:%d+: ", "")
    end
    assert.are.same({ "resil.trace.export: batch must be a whole number >= 1",
      "resil.trace.export: batch must be a whole number >= 1", "resil.trace.export: max_queue must be a whole number >= 0",
      "resil.trace.export: interval must be a number > 0", "resil.trace.export: timeout must be a number > 0" }, lines)
  end)

  it("exports a NaN or infinite attribute as OTLP's string, and keeps exporting the spans after it", function()
    local r = helpers.run_script([[
local resil = require "resil"
local spans = {}
local collector = resil.server.listen({ port = 0, handler = function(req)
  local doc = resil.json.decode(req.body)
  for _, s in ipairs(doc.resourceSpans[1].scopeSpans[1].spans) do spans[#spans + 1] = s end
  return { status = 200, body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 0.05 })
-- a ratio over zero tokens, say
resil.trace.start("bad"):finish({ per_token = 0 / 0, rate = 1 / 0, low = -1 / 0 })
local deadline = resil.now() + 10
while #spans < 1 and resil.now() < deadline do resil.sleep(0.05) end
resil.trace.start("after"):finish({ per_token = 0.5 })
while #spans < 2 and resil.now() < deadline do resil.sleep(0.05) end
collector:close()
for _, s in ipairs(spans) do
  local values = {}
  for _, a in ipairs(s.attributes) do values[#values + 1] = a.key .. "=" .. tostring(a.value.doubleValue) end
  print(s.name, table.concat(values, " "))
end
]], "--log-level warn")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("", r.stderr)
    assert.are.equal("bad\tlow=-Infinity per_token=NaN rate=Infinity\nafter\tper_token=0.5\n", r.stdout)
  end)

  it("exports text that is not UTF-8 (a provider's error cut mid-character) as U+FFFD: the batch is not refused", function()
    local r = helpers.run_script([[
local resil = require "resil"
local got = {}
-- as the OpenTelemetry Collector's OTLP JSON decoder (protojson): a body that is not UTF-8 is a 400
local collector = resil.server.listen({ port = 0, handler = function(req)
  if not utf8.len(req.body) then return { status = 400, body = "invalid UTF-8 in string" } end
  for _, s in ipairs(resil.json.decode(req.body).resourceSpans[1].scopeSpans[1].spans) do got[#got + 1] = s end
  return { status = 200, body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 100 })
resil.trace.start("chat caf\195"):finish({ ["gen_ai.response.model"] = "gpt-\226\130", ["k\254"] = 1 },
  "provider said: \255")
resil.trace.start("whole"):finish()
resil.trace.flush()
collector:close()
for _, s in ipairs(got) do
  local a = s.attributes and s.attributes[1]
  print(s.name, s.status.message, a and a.key .. "=" .. a.value.stringValue, s.attributes and s.attributes[2].key)
end
]], "--log-level warn")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("", r.stderr)
    assert.are.equal("chat caf\u{FFFD}\tprovider said: \u{FFFD}\tgen_ai.response.model=gpt-\u{FFFD}\u{FFFD}\tk\u{FFFD}\n" ..
      "whole\tnil\tnil\tnil\n", r.stdout)
  end)

  it("says a failing export once while it fails, and again after it worked in between", function()
    local r = helpers.run_script([[
local resil = require "resil"
local answers, n = { 503, 503, 200, 200, 503, 200 }, 0
local collector = resil.server.listen({ port = 0, handler = function()
  n = n + 1
  return { status = answers[n], body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 100 })
for _ = 1, #answers do
  resil.trace.start("s"):finish()
  resil.trace.flush()
end
collector:close()
]], "--log-level info")
    assert.are.equal(0, r.code, r.stderr)
    local said = {}
    for line in r.stderr:gmatch("[^\n]+") do
      local msg = resil.json.decode(line).msg
      if msg:find("^trace export") then said[#said + 1] = msg end
    end
    assert.are.same({ "trace export failed; spans are kept and sent again", "trace export works again",
      "trace export failed; spans are kept and sent again", "trace export works again" }, said)
  end)

  -- OTLP/HTTP's rules (opentelemetry-proto, docs/specification.md): a 429, 502, 503 or 504 is
  -- retried, after the Retry-After the collector gave, else a backoff; before, the batch was
  -- dropped at the first 503 of a collector that was restarting, and spans were lost for nothing.
  it("sends a batch again after a 503's Retry-After and a 429's backoff, and drops it on a 400", function()
    local r = helpers.run_script([[
local resil = require "resil"
local posts = {}
local answers = { { status = 503, headers = { ["retry-after"] = "30" }, body = "{}" },
                  { status = 429, body = "{}" }, { status = 200, body = "{}" }, { status = 400, body = "{}" } }
local collector = resil.server.listen({ port = 0, handler = function(req)
  local names = {}
  for _, s in ipairs(resil.json.decode(req.body).resourceSpans[1].scopeSpans[1].spans) do names[#names + 1] = s.name end
  posts[#posts + 1] = { at = resil.now(), names = table.concat(names, ",") }
  return answers[#posts] or { status = 200, body = "{}" }
end })
local t0 = resil.now()
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 1 })
resil.trace.start("a"):finish()
resil.trace.start("b"):finish()
while #posts < 3 and resil.now() < t0 + 600 do resil.sleep(0.5) end
resil.trace.start("c"):finish() -- refused with a 400: not sent again
local t3 = resil.now()
while resil.now() < t3 + 100 do resil.sleep(1) end
collector:close()
for _, p in ipairs(posts) do print(("%.0f %s"):format(p.at - t0, p.names)) end
local m = resil.metrics.counter("resil_trace_spans_exported_total")
print(m:value({ result = "ok" }), m:value({ result = "failed" }))
]], "--virtual-clock --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    -- posted at 1 s (503, come back in 30), 31 s (429: the backoff, 2 s), 33 s (taken), then c once
    assert.are.equal("1 a,b\n31 a,b\n33 a,b\n34 c\n", r.stdout:match("^(.-)%d+%.?%d*\t"))
    assert.matches("\n2%.?0?\t1%.?0?\n$", r.stdout)
  end)

  it("keeps a collector's Retry-After asked of a post a full batch started", function()
    local r = helpers.run_script([[
local resil = require "resil"
local posts = {}
local collector = resil.server.listen({ port = 0, handler = function()
  posts[#posts + 1] = resil.now()
  if #posts == 1 then return { status = 503, headers = { ["retry-after"] = "30" }, body = "{}" } end
  return { status = 200, body = "{}" }
end })
local t0 = resil.now()
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 1, batch = 2 })
resil.trace.start("a"):finish()
resil.trace.start("b"):finish() -- a whole batch: sent at once
resil.sleep(100)
collector:close()
for _, p in ipairs(posts) do io.write(("%.0f "):format(p - t0)) end
]], "--virtual-clock --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("0 30 ", r.stdout)
  end)

  it("keeps at most max_queue spans while the collector is away, and sends them when it is back", function()
    local r = helpers.run_script([[
local resil = require "resil"
local got, up = 0, false
local collector = resil.server.listen({ port = 0, handler = function(req)
  if not up then return { status = 503, body = "{}" } end
  got = got + #resil.json.decode(req.body).resourceSpans[1].scopeSpans[1].spans
  return { status = 200, body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 1, max_queue = 10, batch = 4 })
for i = 1, 25 do
  resil.trace.start("s" .. i):finish()
  resil.sleep(10)
end
up = true
resil.sleep(60)
collector:close()
print(got, resil.metrics.counter("resil_trace_spans_dropped_total"):value())
]], "--virtual-clock --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    local got, dropped = r.stdout:match("^(%d+)%.?0?\t(%d+)")
    assert.are.equal("10", got)
    assert.are.equal("15", dropped)
  end)

  it("counts the spans a 200 with partialSuccess rejected, says why, and does not send them again", function()
    local r = helpers.run_script([[
local resil = require "resil"
local posts = 0
local collector = resil.server.listen({ port = 0, handler = function()
  posts = posts + 1
  return { status = 200, headers = { ["content-type"] = "application/json" },
    body = '{"partialSuccess":{"rejectedSpans":"2","errorMessage":"span name too long"}}' }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 1 })
for i = 1, 5 do resil.trace.start("s" .. i):finish() end
resil.sleep(30)
resil.trace.start("again"):finish() -- rejected too: not said again
resil.sleep(30)
collector:close()
local m = resil.metrics.counter("resil_trace_spans_exported_total")
print(posts, m:value({ result = "ok" }), m:value({ result = "rejected" }))
]], "--virtual-clock --log-level warn")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^2\t3%.?0?\t3%.?0?\n$", r.stdout) -- (the second batch: 1 span, 1 rejected)
    local _, said = r.stderr:gsub("the collector rejected spans", "")
    assert.are.equal(1, said, r.stderr)
    assert.matches('"msg":"trace export: the collector rejected spans"', r.stderr)
    assert.matches('"error":"span name too long"', r.stderr)
    assert.matches('"rejected":2', r.stderr)
  end)

  -- W3C trace context: a caller whose traceparent says not sampled (flags 00) records nothing of
  -- that trace, and OpenTelemetry's default sampler (parent-based) exports no span of it; before,
  -- every span of it was sent, as fragments of traces the caller's backend had chosen not to keep.
  it("exports no span of a trace its caller did not sample (flags 00), and carries the 00 on", function()
    local r = helpers.run_script([[
local resil = require "resil"
local names = {}
local collector = resil.server.listen({ port = 0, handler = function(req)
  for _, s in ipairs(resil.json.decode(req.body).resourceSpans[1].scopeSpans[1].spans) do names[#names + 1] = s.name end
  return { status = 200, body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 3600 })
local carried
for _, flags in ipairs({ "00", "01" }) do
  resil.spawn(function()
    assert(resil.trace.continue("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-" .. flags))
    local span = resil.trace.start("under " .. flags)
    if flags == "00" then carried = span.traceparent end
    span:finish()
  end):join()
  local req = resil.trace.request("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-" .. flags, "request " .. flags)
  req:finish()
end
resil.trace.flush()
collector:close()
table.sort(names)
print(table.concat(names, ","), carried:sub(-3))
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("request 01,under 01\t-00\n", r.stdout)
  end)

  -- GenAI conventions: gen_ai.operation.name is "embeddings" for an embeddings call, and the span's
  -- name "{operation} {model}"; an embeddings call (ai.embed, the gateway's /v1/embeddings) was
  -- exported as a "chat", mixed with the chats in every backend's GenAI view.
  it("names an embeddings attempt's span and operation embeddings, a chat's chat", function()
    local r = helpers.run_script([[
local resil = require "resil"
local call = require "policies.call"
local got = {}
local collector = resil.server.listen({ port = 0, handler = function(req)
  for _, s in ipairs(resil.json.decode(req.body).resourceSpans[1].scopeSpans[1].spans) do
    for _, a in ipairs(s.attributes or {}) do
      if a.key == "gen_ai.operation.name" then got[#got + 1] = s.name .. "=" .. a.value.stringValue end
    end
  end
  return { status = 200, body = "{}" }
end })
local provider = resil.server.listen({ port = 0, handler = function()
  return { status = 200, headers = { ["content-type"] = "application/json" }, body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 3600 })
local base = ("http://127.0.0.1:%d/v1"):format(provider:port())
local p = call.provider("optrace", { request = { method = "POST", url = base .. "/chat/completions" } })
assert(p({ json = { model = "m-chat", messages = {} } }))
assert(p({ url = base .. "/embeddings", json = { model = "m-embed", input = "hi" } }))
resil.trace.flush()
collector:close()
provider:close()
table.sort(got)
print(table.concat(got, ","))
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("chat m-chat=chat,embeddings m-embed=embeddings\n", r.stdout)
  end)

  it("exports a list attribute as OTLP's arrayValue and another table as its JSON, not its address", function()
    local r = helpers.run_script([[
local resil = require "resil"
resil.trace.export({ url = "http://127.0.0.1:9", interval = 3600 })
local s = resil.trace.start("x", { tags = { "a", "b" }, ids = { 1, 2.5 }, none = {}, map = { k = "v" } })
s:finish()
io.write(resil.trace.otlp_body({ s }))
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    local values = {}
    for _, a in ipairs(resil.json.decode(r.stdout).resourceSpans[1].scopeSpans[1].spans[1].attributes) do
      values[a.key] = a.value
    end
    assert.are.same({ arrayValue = { values = { { stringValue = "a" }, { stringValue = "b" } } } }, values.tags)
    assert.are.same({ arrayValue = { values = { { intValue = "1" }, { doubleValue = 2.5 } } } }, values.ids)
    assert.are.same({ arrayValue = {} }, values.none)
    assert.are.same({ stringValue = '{"k":"v"}' }, values.map)
  end)

  it("reads at most 4 MiB of a collector's answer, and a longer one is a failure not sent again", function()
    local r = helpers.run_script([[
local resil = require "resil"
local posts = 0
local big = ("x"):rep(5 * 1024 * 1024)
local collector = resil.server.listen({ port = 0, handler = function()
  posts = posts + 1
  return { status = 200, headers = { ["content-type"] = "application/json" }, body = big }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 1 })
resil.trace.start("s"):finish()
resil.sleep(120)
collector:close()
local m = resil.metrics.counter("resil_trace_spans_exported_total")
print(posts, m:value({ result = "ok" }), m:value({ result = "failed" }))
]], "--virtual-clock --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^1\t0%.?0?\t1%.?0?\n$", r.stdout)
  end)

  it("says the message of a collector's refusal (its Status), not only its status code", function()
    local r = helpers.run_script([[
local resil = require "resil"
local collector = resil.server.listen({ port = 0, handler = function()
  return { status = 400, headers = { ["content-type"] = "application/json" },
    body = '{"code":3,"message":"invalid trace id: \\"zz\\""}' }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 3600 })
resil.trace.start("s"):finish()
resil.trace.flush()
collector:close()
]], "--log-level warn")
    assert.are.equal(0, r.code, r.stderr)
    local line = resil.json.decode(r.stderr:match("[^\n]*trace export failed[^\n]*"))
    assert.are.equal('status 400: invalid trace id: "zz"', line.error)
  end)

  it("sends a whole batch as soon as it is queued: a burst past max_queue within an interval is not dropped", function()
    local r = helpers.run_script([[
local resil = require "resil"
local got = 0
local collector = resil.server.listen({ port = 0, handler = function(req)
  got = got + #resil.json.decode(req.body).resourceSpans[1].scopeSpans[1].spans
  return { status = 200, body = "{}" }
end })
resil.trace.export({ url = ("http://127.0.0.1:%d"):format(collector:port()), interval = 3600, max_queue = 10, batch = 4 })
for i = 1, 40 do
  resil.trace.start("s" .. i):finish()
  if i % 4 == 0 then resil.sleep(0.01) end -- (the work between the spans)
end
resil.sleep(1)
collector:close()
print(got, resil.metrics.counter("resil_trace_spans_dropped_total"):value())
]], "--virtual-clock --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^40%.?0?\t0%.?0?\n$", r.stdout)
  end)

  it("gives a collector that accepts and never answers one timeout at exit, not one per batch", function()
    -- a collector that reads each post and never answers it (tasks = true: a handler that is no
    -- task cannot wait, and answered each post at once with a 500)
    local posts = 0
    local collector = resil.server.listen({ port = 0, tasks = true, handler = function()
      posts = posts + 1
      resil.sleep(3600)
    end })
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
for i = 1, 2000 do resil.trace.start("s" .. i):finish() end -- 8 batches of 256
]])
    local prom, pidfile = helpers.tmpname(".prom"), helpers.tmpname(".pid")
    os.execute(("%s --virtual-clock --log-level off --metrics-file %s --otlp-endpoint http://127.0.0.1:%d %s " ..
      "> /dev/null 2>&1 & echo $! > %s"):format(helpers.resil, prom, collector:port(), script, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
    collector:close()
    -- the first post that timed out ended the export (the background task's own post, and the one
    -- a full batch started, may be the others, at the same time); the rest are dropped and counted
    assert.is_true(posts >= 1 and posts <= 3, "posts the collector got: " .. posts)
    local text = helpers.slurp(prom)
    local failed = tonumber(text:match('resil_trace_spans_exported_total{result="failed"} (%d+)')) or 0
    local dropped = tonumber(text:match("resil_trace_spans_dropped_total (%d+)")) or 0
    assert.are.equal(2001, failed + dropped, text) -- every span, and the run's
  end)
end)

describe("--otlp-endpoint, a collector away as the run ends", function()
  -- (before: "trace export failed; spans are kept and sent again" with retry_in, and the process
  -- ended: they were dropped, as the README says, and the log's last word said otherwise; a
  -- collector that failed before the end said nothing at the end at all)
  it("says the spans are dropped, how many and why, not that they are sent again", function()
    local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 3 do resil.trace.start("s" .. i):finish() end
]], "--log-level info --otlp-endpoint http://127.0.0.1:1")
    assert.are.equal(0, r.code, r.stderr)
    local said = {}
    for line in r.stderr:gmatch("[^\n]+") do
      local l = resil.json.decode(line)
      if l.msg:find("^trace export") then said[#said + 1] = l end
    end
    -- (the background task's post may have failed first, on a loaded machine: the last word is the end's)
    local last = said[#said]
    assert.are.equal("trace export failed as the run ended; its spans are dropped", last and last.msg, r.stderr)
    assert.are.equal(4, last.dropped) -- (three, and the run's)
    assert.matches("^connect: ", last.error)
    assert.is_nil(last.retry_in)
  end)
end)

describe("a task that continues a caller's trace (resil.trace.continue)", function()
  it("sends its attempts as children of the caller's span, in the caller's trace", function()
    local seen = {}
    local provider = resil.server.listen({ port = 0, handler = function(req)
      seen[#seen + 1] = req.headers.traceparent
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = "{}" }
    end })
    local call = require "policies.call"
    local p = call.provider("trace-continue", { request = { method = "POST",
      url = ("http://127.0.0.1:%d/v1/x"):format(provider:port()) } })
    local caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    local t = resil.spawn(function()
      assert.is_true(resil.trace.continue(("00-%s-%s-01"):format(caller_trace, caller_span)))
      return p({ json = {} })
    end)
    assert.is_truthy(select(2, t:join()))
    local other = resil.spawn(function() return p({ json = {} }) end)
    assert.is_truthy(select(2, other:join()))
    provider:close()
    local trace_id, span_id = seen[1]:match("^00%-(%x+)%-(%x+)%-01$")
    assert.are.equal(caller_trace, trace_id)
    assert.are_not.equal(caller_span, span_id) -- the attempt is a span of its own under the caller's
    -- a task in no one's trace, with nothing exported, starts none (OpenTelemetry's API without an SDK)
    assert.is_nil(seen[2])
    assert.is_false(resil.trace.continue("not a traceparent"))
  end)

  -- W3C trace context: the caller's tracestate (its vendors' entries) goes on with the traceparent;
  -- it was dropped, and a vendor's sampling or routing state was lost at the first hop
  it("passes the caller's tracestate on to the provider with the traceparent", function()
    local seen = {}
    local provider = resil.server.listen({ port = 0, handler = function(req)
      seen[#seen + 1] = tostring(req.headers.tracestate)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = "{}" }
    end })
    local call = require "policies.call"
    local p = call.provider("trace-state", { request = { method = "POST",
      url = ("http://127.0.0.1:%d/v1/x"):format(provider:port()) } })
    local header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for _, state in ipairs({ "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "bad\nstate" }) do
      assert.is_truthy(select(2, resil.spawn(function()
        assert.is_true(resil.trace.continue(header, state))
        return p({ json = {} })
      end):join()))
    end
    provider:close()
    assert.are.same({ "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "nil" }, seen)
  end)

  it("says with resil.trace.spans whether an attempt may need a span: not until a trace is continued", function()
    -- (a process of its own: this one's spans were turned on by the specs above)
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local call = require "policies.call"
local seen = {}
local provider = resil.server.listen({ port = 0, handler = function(req)
  seen[#seen + 1] = req.headers.traceparent or "-"
  return { status = 200, headers = { ["content-type"] = "application/json" }, body = "{}" }
end })
local p = call.provider("trace-spans", { request = { method = "POST",
  url = ("http://127.0.0.1:%d/v1/x"):format(provider:port()) } })
local before = resil.trace.spans
assert(p({ json = {} }))
assert(not resil.trace.continue("00-zz"))
local after_bad = resil.trace.spans
assert(resil.spawn(function()
  assert(resil.trace.continue("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
  return p({ json = {} })
end):join())
print(tostring(before), tostring(after_bad), tostring(resil.trace.spans), table.concat(seen, " "))
provider:close()
]])
    local r = helpers.run(("env -u TRACEPARENT %s --store %s %s"):format(helpers.resil, helpers.tmpname(".db"), script))
    assert.are.equal(0, r.code, r.stderr)
    local before, after_bad, after, first, second = r.stdout:match("^(%S+)\t(%S+)\t(%S+)\t(%S+) (%S+)")
    assert.are.equal("false", before)
    assert.are.equal("false", after_bad) -- a header that is not a traceparent follows nothing
    assert.are.equal("true", after)
    assert.are.equal("-", first) -- nothing exported, no one's trace: no traceparent sent
    assert.matches("^00%-0af7651916cd43dd8448eb211c80319c%-%x+%-01$", second)
  end)
end)
