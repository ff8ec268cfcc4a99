local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http

describe("resil.http.request against the mock provider", function()
  local mock
  before_each(function()
    resil.clock.virtual()
    mock = resil.mock.start({ seed = 7 })
  end)
  after_each(function() mock:stop() end)

  it("posts JSON and returns status, lower-cased headers, body and time", function()
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions",
      headers = { ["X-Trace"] = "abc" },
      json = { model = "gpt-4o-mini", messages = { { role = "user", content = "hi" } } } })
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.equal("application/json", res.headers["content-type"])
    local body = resil.json.decode(res.body)
    assert.are.equal("gpt-4o-mini", body.model)
    assert.are.equal("assistant", body.choices[1].message.role)
    assert.is_number(body.usage.total_tokens)
    assert.is_number(res.time)
  end)

  it("supports any method and a raw body", function()
    local res = http.request({ method = "GET", url = mock.url .. "/nowhere" })
    assert.are.equal(404, res.status)
    res = http.request({ method = "POST", url = mock.url .. "/v1/predictions", body = '{"version":"v1","input":{}}',
      headers = { Authorization = "Bearer r8_mock_token" } })
    assert.are.equal(201, res.status)
  end)

  it("gives kind=connect for a closed port", function()
    local probe = resil.server.listen({ handler = function() end })
    local port = probe:port()
    probe:close()
    local res, err = http.request({ url = ("http://127.0.0.1:%d/"):format(port) })
    assert.is_nil(res)
    assert.are.equal("connect", err.kind)
    assert.matches("127.0.0.1", err.message)
  end)

  it("gives kind=timeout when the provider hangs, at exactly the timeout", function()
    mock:configure({ sequence = { chat = { "hang" } } })
    local t0 = resil.now()
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {}, timeout = 30 })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(30, resil.now() - t0)
  end)

  it("times out at once for timeout = 0 (a deadline's remainder used up), never waits without end", function()
    mock:configure({ sequence = { chat = { "hang" } } })
    local t0 = resil.now()
    local res, err = resil.timeout(3600, http.request, { url = mock.url .. "/v1/chat/completions", json = {}, timeout = 0 })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(0, resil.now() - t0)
  end)

  it("aborts the transfer for real when resil.timeout fires", function()
    mock:configure({ sequence = { chat = { "hang" } } })
    local r, err = resil.timeout(5, http.request, { url = mock.url .. "/v1/chat/completions", json = {} })
    assert.is_nil(r)
    assert.are.equal("timeout", err.kind)
    -- the server sees the client hang up: its pending reply is dropped
    resil.clock.real()
    for _ = 1, 100 do
      if mock.server:pending() == 0 then break end
      resil.sleep(0.01)
    end
    assert.are.equal(0, mock.server:pending())
  end)

  it("gives kind=reset when the connection is reset", function()
    mock:configure({ sequence = { chat = { "reset" } } })
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {} })
    assert.is_nil(res)
    assert.are.equal("reset", err.kind)
  end)

  it("keeps connect_timeout = 0 at once and math.huge without end, not curl's 300 s or a recycled handle's last; its expiry is kind connect", function()
    -- a listener whose backlog is full: the kernel drops the SYNs, a connect waits
    local script = helpers.write(helpers.tmpname(".py"), [[
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)
port = s.getsockname()[1]
held = []
for i in range(3):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    held.append(c)
print("port", port, flush=True)
time.sleep(30)
]])
    resil.clock.real()
    local results = helpers.with_server("timeout 30 python3 " .. script, "port (%d+)", function(port)
      local url = ("http://127.0.0.1:%s/"):format(port)
      local out = {}
      for i, ct in ipairs({ 0.2, math.huge, 0 }) do
        local _, err = http.request({ url = url, connect_timeout = ct, timeout = 1.5 })
        out[i] = (err.message:match("Failed to connect") and "connect" or err.message:match("no complete response") and "whole")
          .. " " .. err.kind -- a connect that timed out sent nothing: kind connect (retried as a refused one, never "may be made")
      end
      return out
    end)
    assert.are.same({ "connect connect", "whole timeout", "connect connect" }, results)
  end)

  it("counts no connection for a connect that timed out (resil.http.stats), over HTTP/1.1 or h2", function()
    -- a listener whose backlog is full: the kernel drops the SYNs, a connect waits
    local script = helpers.write(helpers.tmpname(".py"), [[
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)
port = s.getsockname()[1]
held = []
for i in range(3):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    held.append(c)
print("port", port, flush=True)
time.sleep(30)
]])
    resil.clock.real()
    local got = helpers.with_server("timeout 30 python3 " .. script, "port (%d+)", function(port)
      local url = ("http://127.0.0.1:%s/"):format(port)
      for i = 1, 10 do
        local _, err = http.request({ url = url, http_version = i % 2 == 0 and "2" or "1.1", connect_timeout = 0.05,
          timeout = 1 })
        assert.matches("Failed to connect", err.message)
      end
      return { counted = http.stats().connections["http://127.0.0.1:" .. port] or 0 }
    end)
    assert.are.equal(0, got.counted)
  end)

  it("gives kind=dns when the name cannot resolve", function()
    -- a label over 63 characters cannot go into a DNS query: the resolver
    -- fails at once, with no network and no resolver timeout involved
    local res, err = http.request({ url = "http://" .. ("a"):rep(70) .. ".invalid/v1", timeout = 5 })
    assert.is_nil(res)
    assert.are.equal("dns", err.kind)
  end)

  it("gives kind=protocol when the server does not speak HTTP", function()
    mock:configure({ sequence = { chat = { "not_http" } } })
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {} })
    assert.is_nil(res)
    assert.are.equal("protocol", err.kind)
  end)

  it("gives kind=reset for a truncated body", function()
    mock:configure({ sequence = { chat = { "truncate" } } })
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {} })
    assert.is_nil(res)
    assert.are.equal("reset", err.kind)
    assert.matches("remaining", err.message)
    -- the server had answered: its status and the body bytes read say so (a provider bills such an answer)
    assert.are.equal(200, err.status)
    assert.is_true(err.received > 0, tostring(err.received))
  end)

  it("gives kind=too_large for response headers past curl's limits, one line or all of them", function()
    local server = resil.server.listen({ handler = function(req)
      local h = {}
      if req.path == "/one" then h["x-big"] = ("a"):rep(200 * 1024) -- one line past 100 KB
      else for i = 1, 400 do h["x-h" .. i] = ("b"):rep(1000) end end -- 400 KB in all
      return { status = 200, headers = h, body = "ok" }
    end })
    local url = ("http://127.0.0.1:%d"):format(server:port())
    local _, one = http.request({ url = url .. "/one" })
    local _, many = http.request({ url = url .. "/many" })
    server:close()
    assert.are.equal("too_large", one.kind)
    assert.are.equal("too_large", many.kind)
  end)

  -- (libcurl asks for "Expect: 100-continue" on bodies past 1 MiB, a round trip before the body)
  it("sends no Expect: 100-continue, for a small body or one past 1 MiB", function()
    local seen = {}
    local server = resil.server.listen({ max_body = 4 * 1024 * 1024, handler = function(req)
      seen[#seen + 1] = { expect = req.headers.expect or "none", size = #req.body }
      return { status = 200, body = "ok" }
    end })
    local url = ("http://127.0.0.1:%d/up"):format(server:port())
    for _, size in ipairs({ 10, 2 * 1024 * 1024 }) do
      local res = assert(http.request({ method = "POST", url = url, body = ("x"):rep(size) }))
      assert.are.equal(200, res.status)
    end
    server:close()
    assert.are.same({ { expect = "none", size = 10 }, { expect = "none", size = 2 * 1024 * 1024 } }, seen)
  end)

  it("gives kind=too_large past max_body, without buffering the rest", function()
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {}, max_body = 10 })
    assert.is_nil(res)
    assert.are.equal("too_large", err.kind)
    -- saying so, whether the Content-Length told it (libcurl: "Maximum file size exceeded") or not
    assert.matches("response body larger than max_body %(10 bytes%)", err.message)
  end)

  it("takes a max_body past what a size can hold (math.huge: no limit) as no limit, not as 0", function()
    for _, limit in ipairs({ math.huge, 1e300, 2^63, 2^64 }) do
      -- a recycled handle that last had a small limit keeps no trace of it
      assert.are.equal("too_large", select(2, http.request({ url = mock.url .. "/v1/chat/completions", json = {},
        max_body = 10 })).kind)
      local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {}, max_body = limit })
      assert.is_nil(err, tostring(limit))
      assert.are.equal(200, res.status)
    end
  end)

  it("returns provider errors as responses with Retry-After readable", function()
    mock:configure({ sequence = { chat = { { status = 429, retry_after = 7 } } } })
    local res = http.request({ url = mock.url .. "/v1/chat/completions", json = {} })
    assert.are.equal(429, res.status)
    assert.are.equal("7", res.headers["retry-after"])
  end)

  it("frames the body itself: a caller's content-length or transfer-encoding smuggles no request onto the kept connection", function()
    local seen = {}
    local server = resil.server.listen({ port = 0, handler = function(req)
      seen[#seen + 1] = req.method .. " " .. req.path .. " " .. req.body
      return { status = 200, body = req.path }
    end })
    local base = ("http://127.0.0.1:%d"):format(server:port())
    local body = 'ab' .. "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    for _, h in ipairs({ { ["Content-Length"] = "2" }, { ["transfer-encoding"] = "chunked" } }) do
      seen = {}
      local res = http.request({ url = base .. "/one", method = "POST", body = body, headers = h })
      assert.are.equal(200, res.status)
      assert.are.equal("/one", res.body)
      res = http.request({ url = base .. "/two" }) -- on the kept connection: its own answer
      assert.are.equal("/two", res.body)
      assert.are.same({ "POST /one " .. body, "GET /two " }, seen)
    end
    server:close()
  end)

  it("reuses connections to the same host", function()
    local peers, seen = {}, 0
    local server = resil.server.listen({ handler = function(req)
      if not peers[req.peer] then seen = seen + 1 end
      peers[req.peer] = true
      return { status = 200, body = "ok" }
    end })
    local url = ("http://127.0.0.1:%d/"):format(server:port())
    for _ = 1, 5 do assert.are.equal(200, http.request({ url = url }).status) end
    server:close()
    -- five requests one after another: one keep-alive connection, one client port
    assert.are.equal(1, seen)
  end)

  it("a kept connection the server closed while idle, or one closed after each answer: the next request gets a new one", function()
    local handler = function(req) return { status = 200, body = req.path } end
    local server = resil.server.listen({ handler = handler })
    local port = server:port()
    local url = ("http://127.0.0.1:%d"):format(port)
    assert.are.equal("/a", http.request({ url = url .. "/a" }).body)
    server:close() -- the kept connection gets the server's FIN while nothing is in flight on it
    resil.sleep(0.01)
    server = resil.server.listen({ handler = handler, port = port })
    assert.are.equal("/b", http.request({ url = url .. "/b" }).body)
    -- each answer closes its connection: the next socket, often under the same number, is watched anew
    for i = 1, 5 do
      local res = http.request({ url = url .. "/c" .. i, headers = { connection = "close" } })
      assert.are.equal("/c" .. i, res.body)
    end
    server:close()
  end)

  it("keeps its connections out of the programs a script or the embedder starts", function()
    assert.are.equal(404, http.request({ url = mock.url .. "/nowhere" }).status)
    -- the keep-alive connection is open now
    assert.are.equal("", helpers.inherited_tcp_sockets())
  end)

  it("sends each request's own method and body on recycled handles", function()
    local server = resil.server.listen({ handler = function(req)
      return { status = 200, body = req.method .. ":" .. req.body }
    end })
    local url = ("http://127.0.0.1:%d/"):format(server:port())
    local sent = {}
    for _, r in ipairs({ { method = "HEAD" }, {}, { method = "DELETE" }, { body = "x" },
                         { method = "PUT", body = "y" }, { body = "x" }, { method = "PATCH", body = "x" },
                         { method = "GET" } }) do
      r.url = url
      sent[#sent + 1] = http.request(r).body
    end
    server:close()
    assert.are.same({ "", "GET:", "DELETE:", "POST:x", "PUT:y", "POST:x", "PATCH:x", "GET:" }, sent)
  end)

  it("sends several tables as one request: a later table's fields win, headers merged by name", function()
    local server = resil.server.listen({ handler = function(req)
      return { status = 200, body = resil.json.encode({ method = req.method, body = req.body, a = req.headers["a"],
        b = req.headers["b"], c = req.headers["c"], path = req.path }) }
    end })
    local url = ("http://127.0.0.1:%d/"):format(server:port())
    local base = { method = "PUT", url = url .. "base", headers = { a = "1", b = "1" }, timeout = 5 }
    local call = { url = url .. "call", headers = { b = "2" }, json = { x = 1 } }
    local seen = resil.json.decode(http.request(base, call, { headers = { c = "3" }, timeout = 10 }).body)
    assert.are.same({ method = "PUT", body = '{"x":1}', a = "1", b = "2", c = "3", path = "/call" }, seen)
    -- the callers' tables stay as they were
    assert.are.same({ method = "PUT", url = url .. "base", headers = { a = "1", b = "1" }, timeout = 5 }, base)
    assert.are.same({ url = url .. "call", headers = { b = "2" }, json = { x = 1 } }, call)
    -- one table's headers are sent as they are; a later body over an earlier json raises as in one table
    seen = resil.json.decode(http.request(base, { body = "" }).body)
    assert.are.same({ method = "PUT", body = "", a = "1", b = "1", path = "/base" }, seen)
    assert.has_error(function() http.request(call, { body = "y" }) end, "http request: give 'body' or 'json', not both")
    -- on_chunk (the prelude's reader) gets the tables as one
    local chunks = {}
    http.request(base, call, { on_chunk = function(c) chunks[#chunks + 1] = c end })
    assert.are.same({ method = "PUT", body = '{"x":1}', a = "1", b = "2", path = "/call" },
      resil.json.decode(table.concat(chunks)))
    server:close()
  end)

  it("a later table's progress = false drops an earlier one's: a cancel tells it nothing", function()
    mock:configure({ sequence = { chat = { "hang", "hang" } } })
    local url, earlier, later = mock.url .. "/v1/chat/completions", {}, {}
    local seen = mock:stats().total
    local hung = resil.spawn(http.request, { url = url, json = {}, progress = earlier }, { progress = false })
    assert.is_true(helpers.wait_until(function() return mock:stats().total > seen end, 10))
    hung:cancel()
    assert.are.same({}, earlier)
    -- a later table's own progress table is the one told
    hung = resil.spawn(http.request, { url = url, json = {}, progress = earlier }, { progress = later })
    assert.is_true(helpers.wait_until(function() return mock:stats().total > seen + 1 end, 10))
    hung:cancel()
    assert.are.same({}, earlier)
    assert.are.same({ received = 0 }, later)
    assert.are.equal(0, http.stats().open)
  end)

  it("gives every request back, however its task ends", function()
    local url = mock.url .. "/v1/chat/completions"
    assert.are.equal(200, http.request({ url = url, json = {} }).status)
    assert.are.same({ in_flight = 0, open = 0 }, { in_flight = http.stats().in_flight, open = http.stats().open })
    assert.is_true(http.stats().pooled >= 1)
    -- canceled while the provider hangs: the transfer is aborted and given back
    mock:configure({ sequence = { chat = { "hang" } } })
    local hung = resil.spawn(http.request, { url = url, json = {} })
    while http.stats().in_flight == 0 do resil.yield() end
    hung:cancel()
    assert.are.equal(0, http.stats().open)
    -- canceled after its answer arrived but before it resumed to read it
    mock:configure({ sequence = { chat = {} } })
    local answered = resil.spawn(http.request, { url = url, json = {} })
    while answered:status() ~= "waiting" do resil.yield() end
    while answered:status() ~= "ready" do resil.yield() end
    assert.are.equal(1, http.stats().open)
    answered:cancel()
    assert.are.equal("canceled", answered:status())
    assert.are.same({ in_flight = 0, open = 0 }, { in_flight = http.stats().in_flight, open = http.stats().open })
  end)

  -- (before: under the generational collector a stream that had grown old before it was dropped
  -- was never collected while the heap stayed flat, as a script's or a gateway's does: its transfer
  -- and connection were held for good, one more with each such stream)
  it("gives back a stream dropped unread while the script goes on, with no collectgarbage call", function()
    local url = mock.url .. "/v1/chat/completions"
    local s = assert(http.stream({ url = url, headers = { ["x-mock-fault"] = "stall" },
      json = { stream = true, messages = { { role = "user", content = "hi" } } } }))
    assert.is_string(s:read())
    for _ = 1, 3 do collectgarbage("step") end -- minor collections it survives, as under load: old now
    s = nil -- luacheck: ignore (dropped unread, never closed)
    assert.are.equal(1, http.stats().open)
    local give_up_at = os.time() + 15
    repeat
      assert.are.equal(200, http.request({ url = url, json = {} }).status)
    until http.stats().open == 0 or os.time() > give_up_at
    assert.are.same({ in_flight = 0, open = 0 }, { in_flight = http.stats().in_flight, open = http.stats().open })
  end)

  it("tells a canceled request's progress table how far it got: status once its headers came, body bytes read", function()
    local url = mock.url .. "/v1/chat/completions"
    -- canceled while the provider hangs: no status
    mock:configure({ sequence = { chat = { "hang" } } })
    local before = {}
    local seen = mock:stats().total
    local hung = resil.spawn(http.request, { url = url, json = {}, progress = before })
    assert.is_true(helpers.wait_until(function() return mock:stats().total > seen end, 10))
    hung:cancel()
    assert.are.same({ received = 0 }, before)
    -- canceled after its answer arrived, before it resumed to read it: the whole answer was there
    mock:configure({ sequence = { chat = {} } })
    local after = {}
    local answered = resil.spawn(http.request, { url = url, json = {}, progress = after })
    while answered:status() ~= "waiting" do resil.yield() end
    while answered:status() ~= "ready" do resil.yield() end
    answered:cancel()
    assert.are.equal(200, after.status)
    assert.is_true(after.received > 0)
    -- a request that ends is not told: its result says it all
    local done = {}
    assert.are.equal(200, http.request({ url = url, json = {}, progress = done }).status)
    assert.are.same({}, done)
    assert.are.same({ in_flight = 0, open = 0 }, { in_flight = http.stats().in_flight, open = http.stats().open })
  end)

  -- (before: told through lua_setfield on the main state, a __newindex that raised aborted the host
  -- with "PANIC: unprotected error")
  it("tells a progress table with metamethods raw, and its cancel raises nothing", function()
    mock:configure({ sequence = { chat = { "hang" } } })
    local progress = setmetatable({}, { __newindex = function() error("read-only") end })
    local seen = mock:stats().total
    local hung = resil.spawn(http.request, { url = mock.url .. "/v1/chat/completions", json = {}, progress = progress })
    assert.is_true(helpers.wait_until(function() return mock:stats().total > seen end, 10))
    assert.is_true(pcall(hung.cancel, hung))
    assert.are.equal("canceled", hung:status())
    assert.are.equal(0, rawget(progress, "received"))
    assert.are.same({ in_flight = 0, open = 0 }, { in_flight = http.stats().in_flight, open = http.stats().open })
  end)

  it("runs many requests concurrently", function()
    mock:configure({ latency = 1 })
    local items = {}
    for i = 1, 50 do items[i] = i end
    local t0 = resil.now()
    local results = resil.map(items, function()
      local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = {} })
      return res and res.status, err
    end, { concurrency = 50 })
    assert.are.equal(50, #results)
    assert.are.equal(200, results[50])
    assert.is_true(resil.now() - t0 < 10) -- 50 requests of 1 s each overlapped (not 50 s)
  end)

  it("forgets idle origins (a process calling hundreds of hosts stays bounded) but never a busy one", function()
    local port = mock.url:match(":(%d+)$")
    -- userinfo makes each URL an origin of its own, all served by the mock
    local function url(i) return ("http://u%d@127.0.0.1:%s/v1/chat/completions"):format(i, port) end
    local function origins()
      local n = 0
      for _ in pairs(http.stats().receive_buffers) do n = n + 1 end
      return n
    end
    for i = 1, 300 do assert.are.equal(200, http.request({ url = url(i), json = {} }).status) end
    assert.is_true(origins() <= 64, "origins remembered: " .. origins())
    -- 100 new origins in flight at once: each keeps its own entry until done
    mock:configure({ latency = 1 })
    local busy = {}
    for i = 1, 100 do busy[i] = resil.spawn(http.request, { url = url(1000 + i), json = {} }) end
    while http.stats().in_flight < 100 do resil.yield() end
    local in_flight = origins()
    for i = 1, 100 do assert.are.equal(200, select(2, busy[i]:join()).status) end
    assert.is_true(in_flight >= 100, "origins while 100 were in flight: " .. in_flight)
    for name, open in pairs(http.stats().connections) do assert.is_true(open > 0, name) end
    assert.are.equal(0, http.stats().in_flight)
  end)
end)

describe("streaming", function()
  local mock
  before_each(function()
    resil.clock.virtual()
    mock = resil.mock.start({ reply = "one two three four" })
  end)
  after_each(function() mock:stop() end)

  it("delivers server-sent events as they arrive", function()
    local deltas = {}
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions",
      json = { stream = true, messages = { { role = "user", content = "x" } } },
      on_event = function(ev)
        if ev.data ~= "[DONE]" then
          local chunk = resil.json.decode(ev.data)
          deltas[#deltas + 1] = chunk.choices[1].delta.content
        end
      end })
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.equal("one two three four", table.concat(deltas))
  end)

  it("aborts a stream that stalls with kind=timeout after idle_timeout", function()
    mock:configure({ reply = "a b c d e f", sequence = { chat = { { kind = "stall", after = 2 } } } })
    local got = 0
    local t0 = resil.now()
    local res, err = http.request({ url = mock.url .. "/v1/chat/completions", json = { stream = true },
      idle_timeout = 5, timeout = 600, on_chunk = function() got = got + 1 end })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.matches("idle_timeout", err.message)
    assert.is_true(got >= 1)
    assert.is_true(resil.now() - t0 < 600)
  end)

  it("reads a stream chunk by chunk with resil.http.stream", function()
    local s = assert(http.stream({ url = mock.url .. "/v1/chat/completions", method = "POST",
      body = '{"stream":true}' }))
    assert.are.equal(200, s.status)
    assert.are.equal("text/event-stream", s.headers["content-type"])
    local all = {}
    for chunk in s.read, s do all[#all + 1] = chunk end
    assert.matches("%[DONE%]", table.concat(all))
  end)

  -- The events that had come before a close were handed out after it, as if it were open: a
  -- reader that closed one of several streams (canceled, its neighbours kept) went on getting
  -- its events, and the same code said "canceled" or not by how far the stream had come.
  it("a stream read after its close says canceled, whatever had come before the close", function()
    local server = resil.server.listen({ port = 0, handler = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        body = "data: 1\n\ndata: 2\n\ndata: 3\n\n" }
    end })
    local url = ("http://127.0.0.1:%d/"):format(server:port())
    local s = assert(http.stream({ url = url }))
    assert.are.equal("1", s:read_event().data) -- (2 and 3 came with it)
    s:close()
    local ev, err = s:read_event()
    assert.is_nil(ev and ev.data)
    assert.are.equal("canceled", err and err.kind)
    -- read to its end: a close ends it all the same
    local s2 = assert(http.stream({ url = url }))
    repeat local e = s2:read_event() until not e
    s2:close()
    local chunk, err2 = s2:read_event()
    assert.is_nil(chunk)
    assert.are.equal("canceled", err2 and err2.kind)
    server:close()
  end)

  it("a stream that follows a redirect has the status and headers of the answer it reads, not the 302's", function()
    local final = resil.server.listen({ port = 0, handler = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream", ["x-hop"] = "final" },
        body = "data: final\n\n" }
    end })
    local moved = resil.server.listen({ port = 0, handler = function()
      return { status = 302, headers = { location = ("http://127.0.0.1:%d/x"):format(final:port()), ["x-hop"] = "moved" },
        body = "moved" }
    end })
    local s <close> = assert(http.stream({ url = ("http://127.0.0.1:%d/"):format(moved:port()), follow_redirects = true }))
    assert.are.equal(200, s.status)
    assert.are.equal("final", s.headers["x-hop"])
    assert.are.equal("final", s:read_event().data)
    s:close()
    -- not followed: the 302 is the answer
    local s2 <close> = assert(http.stream({ url = ("http://127.0.0.1:%d/"):format(moved:port()) }))
    assert.are.equal(302, s2.status)
    assert.are.equal("moved", s2.headers["x-hop"])
    s2:close()
    moved:close()
    final:close()
  end)
end)

-- A gzip body is decoded as it comes; libcurl 7.88 never checks that the
-- gzip stream reached its end: a body cut before its trailer (with a right
-- Content-Length) was a complete answer, part of the text missing.
describe("gzip bodies", function()
  local server, gz
  before_each(function()
    resil.clock.virtual()
    local f = assert(io.popen("printf '%s' '" .. ("hello world "):rep(500) .. "' | gzip -c"))
    gz = f:read("a")
    f:close()
    server = resil.server.listen({ port = 0, handler = function(req)
      local body = ({ ["/whole"] = gz, ["/two"] = gz .. gz, ["/cut"] = gz:sub(1, #gz - 8),
        ["/half"] = gz:sub(1, #gz // 2), ["/bad"] = gz:sub(1, 10) .. ("x"):rep(20) .. gz:sub(31),
        ["/empty"] = "" })[req.path]
      if req.path == "/raw-deflate" then -- gzip's member without its header (10 bytes) and trailer (8)
        return { status = 200, headers = { ["content-encoding"] = "deflate" }, body = gz:sub(11, #gz - 8) }
      end
      return { status = 200, headers = { ["content-encoding"] = "gzip" }, body = body }
    end })
  end)
  after_each(function() server:close() end)
  local function url(path) return ("http://127.0.0.1:%d%s"):format(server:port(), path) end

  it("decodes a whole one (or two members), an empty one is empty", function()
    local res = assert(http.request({ url = url("/whole") }))
    assert.are.equal(("hello world "):rep(500), res.body)
    res = assert(http.request({ url = url("/two") }))
    assert.are.equal(("hello world "):rep(1000), res.body)
    res = assert(http.request({ url = url("/empty") }))
    assert.are.equal("", res.body)
    res = assert(http.request({ url = url("/whole"), method = "HEAD" }))
    assert.are.equal(200, res.status)
  end)

  -- (before: "a body that is no valid deflate (incorrect header check)", where libcurl, which
  -- decoded bodies before the host did, read such a body as servers mean it)
  it("decodes a deflate body sent without zlib's header, as some servers send one", function()
    local res, err = http.request({ url = url("/raw-deflate") })
    assert.is_nil(err)
    assert.are.equal(("hello world "):rep(500), res.body)
  end)

  it("fails one cut before its end (kind protocol, the status and bytes read told), or corrupt", function()
    for _, path in ipairs({ "/cut", "/half", "/bad" }) do
      local res, err = http.request({ url = url(path) })
      assert.is_nil(res, path)
      assert.are.equal("protocol", err.kind, path)
      assert.are.equal(200, err.status, path)
    end
    local _, err = http.request({ url = url("/cut") })
    assert.matches("gzip", err.message)
  end)

  it("a stream of one cut before its end ends in an error, not a quiet end", function()
    local s <close> = assert(http.stream({ url = url("/half") }))
    local got, err = {}, nil
    while true do
      local chunk, e = s:read()
      if not chunk then err = e break end
      got[#got + 1] = chunk
    end
    assert.is_not_nil(err)
    assert.are.equal("protocol", err.kind)
    local s2 <close> = assert(http.stream({ url = url("/whole") }))
    got = {}
    for chunk in s2.read, s2 do got[#got + 1] = chunk end
    assert.are.equal(("hello world "):rep(500), table.concat(got))
  end)
end)

describe("misuse raises with the caller's file:line", function()
  it("rejects a non-table request", function()
    local ok, err = pcall(http.request, "http://x")
    assert.is_false(ok)
    assert.matches("table expected", err)
  end)

  it("rejects a bad url", function()
    local ok, err = pcall(function() return http.request({ url = "ht tp://bad url" }) end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: http request: bad url", err)
  end)

  it("rejects a header with a newline", function()
    local ok, err = pcall(function()
      return http.request({ url = "http://127.0.0.1:1/", headers = { ["x-a"] = "v\r\nInjected: 1" } })
    end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: .*line break", err)
  end)

  it("rejects a header name that is not a token: a colon or space in it would send another header", function()
    local seen
    local server = resil.server.listen({ port = 0, handler = function(req)
      seen = req.headers
      return { status = 200, body = "ok" }
    end })
    local url = ("http://127.0.0.1:%d/"):format(server:port())
    for _, name in ipairs({ "x-a: x-forwarded-for", "x a", "", "x-a\t" }) do
      seen = nil
      local ok, err = pcall(function() return http.request({ url = url, headers = { [name] = "v" } }) end)
      assert.is_false(ok, name)
      assert.matches("http_spec.lua:%d+: .*not a token", err)
      assert.is_nil(seen)
    end
    assert.are.equal(200, http.request({ url = url, headers = { ["X-Custom_1.!#$%&'*+^`|~"] = "v" } }).status)
    server:close()
  end)

  it("rejects a url with a NUL byte, not sent as the url before it", function()
    local seen
    local server = resil.server.listen({ port = 0, handler = function(req)
      seen = req.path
      return { status = 200, body = "ok" }
    end })
    local ok, err = pcall(function()
      return http.request({ url = ("http://127.0.0.1:%d/v1/files/a\0/../../admin"):format(server:port()) })
    end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: .*bad url.*NUL", err)
    assert.is_nil(seen)
    server:close()
  end)

  it("rejects a progress that is not a table", function()
    local ok, err = pcall(function() return http.request({ url = "http://127.0.0.1:1/", progress = true }) end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: http request: 'progress' must be a table", err)
  end)

  it("rejects body and json together", function()
    local ok, err = pcall(function() return http.request({ url = "http://127.0.0.1:1/", body = "x", json = {} }) end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: http request: give 'body' or 'json', not both", err)
  end)

  -- (helper K, session 36) `insecure = "false"` (a string read from a config or the environment)
  -- turned TLS verification off; an empty method went out as a request line without one, "G\0ET"
  -- as "G"; an on_chunk that is no function raised from the prelude once the request was sent
  it("rejects an option of the wrong type or value before anything is sent", function()
    local seen = 0
    local server = resil.server.listen({ port = 0, handler = function()
      seen = seen + 1
      return { status = 200, body = "ok" }
    end })
    local url = ("http://127.0.0.1:%d/"):format(server:port())
    for _, case in ipairs({
      { { insecure = "false" }, "'insecure' must be true or false" },
      { { insecure = 0 }, "'insecure' must be true or false" },
      { { follow_redirects = "no" }, "'follow_redirects' must be true or false" },
      { { method = "" }, "bad method ''" },
      { { method = "G\0ET" }, "bad method 'G'" },
      { { on_chunk = 5 }, "'on_chunk' must be a function" },
      { { on_event = "print" }, "'on_event' must be a function" },
    }) do
      case[1].url = url
      local ok, err = pcall(function() return http.request(case[1]) end)
      assert.is_false(ok, case[2])
      assert.matches("http_spec.lua:%d+: http request: " .. case[2]:gsub("%p", "%%%0"), err)
    end
    assert.are.equal(0, seen)
    -- what is allowed still is: booleans, and a callable table
    local got = {}
    local res = assert(http.request({ url = url, insecure = false, follow_redirects = true,
      on_chunk = setmetatable({}, { __call = function(_, chunk) got[#got + 1] = chunk end }) }))
    assert.are.equal(200, res.status)
    assert.are.equal("ok", table.concat(got))
    server:close()
  end)

  it("rejects json that cannot be encoded, naming why", function()
    local ok, err = pcall(function() return http.request({ url = "http://127.0.0.1:1/", json = { f = print } }) end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: http request: cannot encode 'json': .*function", err)
  end)
end)

describe("json requests", function()
  local server, seen
  before_each(function()
    server = resil.server.listen({ handler = function(req)
      seen = req
      return { status = 200, body = "{}" }
    end })
  end)
  after_each(function() server:close() end)

  it("are POSTs of the encoded table with content-type application/json", function()
    http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()), json = { a = { 1, 2 } } })
    assert.are.equal("POST", seen.method)
    assert.are.equal("application/json", seen.headers["content-type"])
    assert.are.same({ a = { 1, 2 } }, resil.json.decode(seen.body))
  end)

  it("keep the caller's method and content-type", function()
    http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()), method = "PUT", json = {},
      headers = { ["Content-Type"] = "application/vnd.api+json" } })
    assert.are.equal("PUT", seen.method)
    assert.are.equal("application/vnd.api+json", seen.headers["content-type"])
  end)

  it("stream with resil.http.stream too", function()
    local s = assert(http.stream({ url = ("http://127.0.0.1:%d/"):format(server:port()), json = { x = 1 } }))
    while s:read() do end
    assert.are.equal("POST", seen.method)
    assert.are.same({ x = 1 }, resil.json.decode(seen.body))
  end)
end)

describe("TLS", function()
  local dir, port, pid
  setup(function()
    dir = helpers.tmpname("-tls")
    os.execute("mkdir -p " .. dir)
    local r = helpers.run(("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 " ..
      "-addext subjectAltName=IP:127.0.0.1 -keyout %s/key.pem -out %s/cert.pem"):format(dir, dir))
    assert.are.equal(0, r.code, r.stderr)
    -- a free port: bind one, close it, hand it to openssl
    local probe = resil.server.listen({ handler = function() end })
    port = probe:port()
    probe:close()
    os.execute(("openssl s_server -quiet -www -accept 127.0.0.1:%d -cert %s/cert.pem -key %s/key.pem " ..
      ">/dev/null 2>&1 & echo $! > %s/pid"):format(port, dir, dir, dir))
    pid = helpers.slurp(dir .. "/pid"):match("%d+")
    resil.clock.real()
    resil.log.output("/dev/null") -- the probes' warning about insecure = true
    for _ = 1, 200 do -- wait until it accepts
      local _, err = http.request({ url = ("https://127.0.0.1:%d/"):format(port), insecure = true, timeout = 1 })
      if not err or err.kind ~= "connect" then break end
      resil.sleep(0.02)
    end
    resil.log.output("stderr")
  end)
  teardown(function()
    if pid then os.execute("kill " .. pid) end
    os.execute("rm -rf " .. dir)
  end)

  it("refuses an untrusted certificate with kind=tls", function()
    local res, err = http.request({ url = ("https://127.0.0.1:%d/"):format(port) })
    assert.is_nil(res)
    assert.are.equal("tls", err.kind)
  end)

  it("accepts it when its CA file is given", function()
    local res, err = http.request({ url = ("https://127.0.0.1:%d/"):format(port), ca_file = dir .. "/cert.pem" })
    assert.is_nil(err)
    assert.are.equal(200, res.status)
  end)

  it("never turns verification off silently: a warning, once per origin", function()
    local url = ("https://127.0.0.1:%d/"):format(port)
    local path = helpers.tmpname(".log")
    resil.log.output(path)
    for _ = 1, 3 do http.request({ url = url .. "a?b", insecure = true }) end
    resil.log.output("stderr")
    local warnings = {}
    for line in helpers.slurp(path):gmatch("[^\n]+") do
      local entry = resil.json.decode(line)
      if entry.msg:match("TLS verification is off") then warnings[#warnings + 1] = entry end
    end
    os.remove(path)
    -- the setup's probes warned already for this origin: a new host name is a new origin
    assert.are.equal(0, #warnings)
    resil.log.output(path)
    http.request({ url = ("https://localhost:%d/"):format(port), insecure = true })
    resil.log.output("stderr")
    local entry = resil.json.decode(helpers.slurp(path):match("[^\n]+"))
    os.remove(path)
    assert.are.equal("warn", entry.level)
    assert.are.equal(("https://localhost:%d"):format(port), entry.origin)
  end)

  it("verifies again after requests that turned verification off (recycled handles do not inherit it)", function()
    local url = ("https://127.0.0.1:%d/"):format(port)
    for _ = 1, 3 do
      local res, err = http.request({ url = url, insecure = true })
      assert.is_nil(err)
      assert.are.equal(200, res.status)
    end
    for _ = 1, 3 do
      local res, err = http.request({ url = url })
      assert.is_nil(res)
      assert.are.equal("tls", err.kind)
    end
  end)
end)

-- Past 64 origins, a new origin takes the slot of one with no request and no
-- connection: requests that redirect to other origins, with connections
-- closed after each answer, must keep every origin's count of connections
-- right while slots change hands (under `make check`, ASan watches the slots).
describe("many origins", function()
  it("100 origins, each request redirected to another, then 100 others: all answered, idle slots reused", function()
    resil.clock.virtual()
    local function origins()
      local n = 0
      for _ in pairs(http.stats().receive_buffers) do n = n + 1 end
      return n
    end
    local function round()
      local servers = {}
      for i = 1, 100 do
        servers[i] = resil.server.listen({ port = 0, handler = function(req)
          if req.path == "/hop" then
            local to = servers[i % #servers + 1]
            return { status = 302, headers = { location = ("http://127.0.0.1:%d/end"):format(to:port()),
              connection = "close" }, body = "" }
          end
          return { status = 200, headers = { connection = "close" }, body = tostring(i) }
        end })
      end
      local tasks = {}
      for i = 1, #servers do
        tasks[i] = resil.spawn(function()
          return http.request({ url = ("http://127.0.0.1:%d/hop"):format(servers[i]:port()), follow_redirects = true })
        end)
      end
      for i, t in ipairs(tasks) do
        local ok, res = t:join()
        assert.is_true(ok, res)
        assert(res, select(3, t:join()))
        assert.are.equal(200, res.status)
        assert.are.equal(tostring(i % #servers + 1), res.body)
      end
      for _, s in ipairs(servers) do s:close() end
    end
    round()
    local first = origins()
    round()
    -- the first hundred had no request and no connection left: their slots went to the others
    assert.are.equal(first, origins())
    for origin, n in pairs(http.stats().connections) do assert.is_true(n >= 0 and n <= 2, origin .. ": " .. n) end
  end)
end)

-- libcurl 7.88 follows any number of redirects: a loop was followed until the
-- response headers of all the hops together passed curl's limit (some 2,300
-- requests, a POST's body sent again with each 307, then "Too large response
-- headers", kind too_large) or the timeout.
describe("a redirect loop", function()
  it("is followed 30 times, then fails as protocol, saying so", function()
    resil.clock.virtual()
    local hops = 0
    local server = resil.server.listen({ port = 0, handler = function(req)
      hops = hops + 1
      return { status = 307, headers = { location = "/again" .. hops }, body = "" }
    end })
    local res, err = http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()), method = "POST", body = "pay",
      follow_redirects = true })
    assert.is_nil(res)
    assert.are.equal("protocol", err.kind)
    assert.matches("redirects", err.message)
    assert.are.equal(31, hops)
    server:close()
  end)
end)

-- (before: libcurl 7.88 took the last of two Content-Lengths that differ, a body of 7 where the
-- server may have meant 5, the rest read as the next answer; RFC 9110 makes it an error)
describe("a response with Content-Length headers that differ", function()
  it("fails as protocol, saying so; the same length twice, or once, is read", function()
    local heads = {
      conflict = "Content-Length: 5\r\nContent-Length: 7\r\n",
      list = "Content-Length: 5, 7\r\n",
      same = "Content-Length: 7\r\nContent-Length: 7\r\n",
      one = "Content-Length: 7\r\n",
    }
    local server = resil.server.listen({ port = 0, handler = function(req)
      return { action = "raw", body = "HTTP/1.1 200 OK\r\n" .. heads[req.path:sub(2)] ..
        "Connection: close\r\n\r\nhello, world" }
    end })
    for _, name in ipairs({ "conflict", "list" }) do
      local res, err = http.request({ url = ("http://127.0.0.1:%d/%s"):format(server:port(), name) })
      assert.is_nil(res, name)
      assert.are.equal("protocol", err.kind, name)
      assert.matches("Content%-Length headers that differ", err.message)
    end
    for _, name in ipairs({ "same", "one" }) do
      local res = assert(http.request({ url = ("http://127.0.0.1:%d/%s"):format(server:port(), name) }))
      assert.are.equal("hello, ", res.body, name)
    end
    server:close()
  end)
end)

-- A URL is parsed once and the parse handed to libcurl (CURLOPT_CURLU), shared
-- by the requests to that URL: each request must still reach its own URL, a
-- parse must outlive every transfer using it when the next URL replaces it,
-- and a relative redirect resolves against the request's URL.
describe("request URLs", function()
  local server
  before_each(function()
    resil.clock.virtual()
    server = resil.server.listen({ port = 0, tasks = true, handler = function(req)
      if req.path == "/slow" then resil.sleep(0.05) end
      if req.path == "/hop/start" then
        return { status = 302, headers = { location = "../end?from=hop" }, body = "" }
      end
      return { status = 200, body = req.method .. " " .. req.path .. "?" .. (req.query or "") }
    end })
  end)
  after_each(function() server:close() end)

  it("requests to URLs that alternate, some in flight while the next URL is parsed, each reach their own", function()
    local base = ("http://127.0.0.1:%d"):format(server:port())
    local tasks = {}
    for i = 1, 12 do
      local path = i % 3 == 0 and "/slow" or ("/p" .. i % 2)
      tasks[i] = resil.spawn(function()
        return http.request({ url = base .. path .. "?i=" .. (i % 2), method = i % 2 == 0 and "GET" or "PUT" })
      end)
    end
    for i, t in ipairs(tasks) do
      local ok, res, err = t:join()
      assert.is_true(ok, res)
      assert(res, err and err.message)
      local path = i % 3 == 0 and "/slow" or ("/p" .. i % 2)
      assert.are.equal((i % 2 == 0 and "GET " or "PUT ") .. path .. "?i=" .. (i % 2), res.body)
    end
    local res = http.request({ url = base .. "/hop/start?x=1", follow_redirects = true })
    assert.are.equal(200, res.status)
    assert.are.equal("GET /end?from=hop", res.body)
    res = http.request({ url = base .. "/hop/start?x=1" })
    assert.are.equal(302, res.status)
  end)
end)

describe("proxies", function()
  it("a proxy named in http_proxy carries the requests, as libcurl's variables say", function()
    local port = helpers.free_port()
    local script = helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      local proxy = resil.server.listen({ port = %d, handler = function(req)
        return { status = 200, body = "via proxy for " .. tostring(req.headers.host) }
      end })
      local res, err = resil.http.request({ url = "http://upstream.invalid/v1/x", timeout = 5 })
      print(res and res.status, res and res.body or err.message)
      proxy:close()
    ]]):format(port))
    local r = helpers.run(("http_proxy=http://127.0.0.1:%d %s %s"):format(port, helpers.resil, script))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("200\tvia proxy for upstream.invalid\n", r.stdout)
  end)
end)

-- follow_redirects: a hop to another origin (scheme, host or port) is sent
-- without the caller's credential headers; libcurl alone strips only
-- Authorization and Cookie, and an x-api-key went to whatever host the
-- Location named.
describe("redirects to another origin", function()
  it("drop the caller's credential headers; a hop on the same origin keeps them", function()
    resil.clock.virtual()
    local seen = {}
    local other = resil.server.listen({ port = 0, handler = function(req)
      seen[#seen + 1] = req.headers
      return { status = 200, body = "other" }
    end })
    local first
    first = resil.server.listen({ port = 0, handler = function(req)
      if req.path == "/same" then
        return { status = 302, headers = { location = "/here" }, body = "" }
      elseif req.path == "/here" then
        seen[#seen + 1] = req.headers
        return { status = 307, headers = { location = ("http://127.0.0.1:%d/there"):format(other:port()) }, body = "" }
      end
      return { status = 200, body = "?" }
    end })
    local headers = {
      ["x-api-key"] = "k1", ["api-key"] = "k2", ["x-goog-api-key"] = "k3", authorization = "Bearer k4",
      cookie = "s=k5", ["proxy-authorization"] = "Basic k6", ["x-auth-token"] = "k7", ["x-client-secret"] = "k8",
      ["x-amz-security-token"] = "k9", ["x-session-id"] = "k10",
      ["anthropic-version"] = "2023-06-01", ["x-trace"] = "t1", accept = "application/json",
    }
    local res, err = http.request({ url = ("http://127.0.0.1:%d/same"):format(first:port()), headers = headers,
      follow_redirects = true })
    assert(res, err and err.message)
    assert.are.equal("other", res.body)
    assert.are.equal(2, #seen)
    -- the same origin: everything the caller gave
    for name, value in pairs(headers) do assert.are.equal(value, seen[1][name], name) end
    -- another origin (another port): no credential, the rest as given
    for _, name in ipairs({ "x-api-key", "api-key", "x-goog-api-key", "authorization", "cookie", "proxy-authorization",
      "x-auth-token", "x-client-secret", "x-amz-security-token", "x-session-id" }) do
      assert.is_nil(seen[2][name], name)
    end
    assert.are.equal("2023-06-01", seen[2]["anthropic-version"])
    assert.are.equal("t1", seen[2]["x-trace"])
    assert.are.equal("application/json", seen[2].accept)
    -- the next request on the same (recycled) handle sends its credentials again
    seen = {}
    res = assert(http.request({ url = ("http://127.0.0.1:%d/x"):format(other:port()), headers = headers }))
    assert.are.equal("k1", seen[1]["x-api-key"])
    assert.are.equal("Bearer k4", seen[1].authorization)
    -- a stream follows the same rule
    seen = {}
    local s <close> = assert(http.stream({ url = ("http://127.0.0.1:%d/same"):format(first:port()), headers = headers,
      follow_redirects = true }))
    assert.are.equal(200, s.status)
    assert.are.equal("k1", seen[1]["x-api-key"])
    assert.is_nil(seen[2]["x-api-key"])
    assert.is_nil(seen[2]["x-goog-api-key"])
    s:close()
    first:close()
    other:close()
  end)

  -- an Idempotency-Key names a call, it opens nothing: dropped at a 307 to another origin, the
  -- provider there could not tell a retried POST from a new one, and made (and billed) it twice
  it("keep the Idempotency-Key on a hop to another origin", function()
    resil.clock.virtual()
    local seen
    local other = resil.server.listen({ port = 0, handler = function(req)
      seen = req.headers
      return { status = 200, body = "made" }
    end })
    local first = resil.server.listen({ port = 0, handler = function()
      return { status = 307, headers = { location = ("http://127.0.0.1:%d/v1/x"):format(other:port()) }, body = "" }
    end })
    local res, err = http.request({ url = ("http://127.0.0.1:%d/v1/x"):format(first:port()), method = "POST",
      body = "{}", headers = { ["Idempotency-Key"] = "job-7", ["x-api-key"] = "k1" }, follow_redirects = true })
    assert(res, err and err.message)
    assert.are.equal("made", res.body)
    assert.are.equal("job-7", seen["idempotency-key"])
    assert.is_nil(seen["x-api-key"])
    first:close()
    other:close()
  end)
end)

-- (helper K, session 36) libcurl 7.88 reuses a kept HTTP/1.1 connection with bytes waiting on it:
-- bytes a server sent past its Content-Length (or after its answer) were read as the next
-- request's answer, and each later answer on the connection was the one before it.
describe("a kept HTTP/1.1 connection that a server sent more on than its answer", function()
  -- /short: 5 bytes of body as its Content-Length says, and an answer nobody asked for in the
  -- same write; /late: its answer, then that other one 50 ms later; others: the method, the path and
  -- how many requests for a path other than those two the server has read
  local script = [[
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(16)
print("port", s.getsockname()[1], flush=True)
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
count = 0
def answer(body):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
def serve(c):
    global count
    buf = b""
    while True:
        d = c.recv(65536)
        if not d: return
        buf += d
        while b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"): n = int(line.split(b":")[1])
            if len(rest) < n: break
            body, buf = rest[:n], rest[n:]
            method, path = head.split(b" ")[:2]
            if path == b"/short": # (the head read first, alone, as most servers write it)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                time.sleep(0.01)
                c.sendall(b"hello" + STRAY)
            elif path == b"/late":
                c.sendall(answer(b"late"))
                time.sleep(0.05)
                c.sendall(STRAY)
            else:
                count += 1
                c.sendall(answer(b"%s %s %s %d" % (method, path, body, count)))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]
  local function with_server(fn)
    resil.clock.real()
    local got, log = helpers.with_server("timeout 60 python3 " .. helpers.write(helpers.tmpname(".py"), script),
      "port (%d+)", function(port) return fn("http://127.0.0.1:" .. port) end)
    assert(got, log)
    return got
  end

  it("is not reused: the next requests, GET or POST, get their own answers, each sent once", function()
    local r = with_server(function(base)
      local got, want = {}, {}
      for i = 1, 30 do
        local a, e = http.request({ url = base .. "/short", timeout = 5 })
        got[#got + 1] = a and a.body or e.message
        want[#want + 1] = "hello"
        local method = i % 2 == 0 and "POST" or "GET"
        local b, e2 = http.request({ url = base .. "/next" .. i, method = method,
          body = method == "POST" and "pay" or nil, timeout = 5 })
        got[#got + 1] = b and b.body or e2.message
        want[#want + 1] = ("%s /next%d %s %d"):format(method, i, method == "POST" and "pay" or "", i)
      end
      return { got = got, want = want }
    end)
    assert.are.same(r.want, r.got)
  end)

  it("nor when the stray bytes come a while after the answer, the connection idle", function()
    local got = with_server(function(base)
      local out = {}
      for i = 1, 5 do
        local a, e = http.request({ url = base .. "/late", timeout = 5 })
        resil.sleep(0.3)
        local b, e2 = http.request({ url = base .. "/next", method = "POST", body = "pay", timeout = 5 })
        out[i] = (a and a.body or e.message) .. ", " .. (b and b.body or e2.message)
      end
      return out
    end)
    assert.are.same({ "late, POST /next pay 1", "late, POST /next pay 2", "late, POST /next pay 3",
      "late, POST /next pay 4", "late, POST /next pay 5" }, got)
  end)
end)

-- (before: libcurl keeps the first failure's words in the error buffer: a request whose kept
-- connection the server reset as it went, which libcurl sent again on a new one that then failed
-- otherwise, said "Recv failure: Connection reset by peer" as a too_large or a protocol error)
describe("a request sent again after its kept connection was reset", function()
  -- each connection: its first request answered ("ok", kept alive); the next one not read, the
  -- connection closed on it (a reset); /huge answers a header line past libcurl's limit, /zero a
  -- status of 000
  local script = [[
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(16)
print("port", s.getsockname()[1], flush=True)
resets = 0
def serve(c):
    global resets
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d: c.close(); return
        buf += d
    path = buf.split(b" ")[1]
    if path == b"/resets": # how many connections were closed on a request sent on them, unread
        body = str(resets).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        c.close()
        return
    if path == b"/huge":
        c.sendall(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * (200 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok")
    elif path == b"/zero":
        c.sendall(b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok")
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    c.settimeout(5) # the next request comes, unread: the connection is closed on it
    try:
        if c.recv(1, socket.MSG_PEEK): resets += 1
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]
  it("fails saying why the request sent again failed, not the reset libcurl got past", function()
    resil.clock.real()
    local got, log = helpers.with_server("timeout 60 python3 " .. helpers.write(helpers.tmpname(".py"), script),
      "port (%d+)", function(port)
        local base, out = "http://127.0.0.1:" .. port, {}
        for _, path in ipairs({ "/huge", "/zero" }) do
          assert(http.request({ url = base .. "/ok", timeout = 5 })) -- the connection kept
          resil.sleep(0.05)
          local res, err = http.request({ url = base .. path, timeout = 5 })
          out[path] = res and res.status or err
        end
        -- (each was sent on the kept connection first, which the server closed on it: a resend)
        helpers.wait_until(function()
          local r = http.request({ url = base .. "/resets", timeout = 5, headers = { connection = "close" } })
          out.resets = r and tonumber(r.body)
          return (out.resets or 0) >= 2
        end, 5)
        return out
      end)
    assert(got, log)
    assert.are.equal("too_large", got["/huge"].kind)
    assert.matches("header line longer than libcurl's limit", got["/huge"].message)
    assert.are.equal("protocol", got["/zero"].kind)
    assert.not_matches("reset", got["/zero"].message)
    assert.is_true((got.resets or 0) >= 2, tostring(got.resets)) -- (one that passed without a reset tested nothing)
  end)
end)

-- (helper K, session 36) libcurl 7.88 refuses a header line over 100 KiB as out of memory: the
-- call failed saying "Out of memory" and a user looked for a leak. Thousands of small headers
-- (within libcurl's 300 KiB for all of them) arrive.
describe("a response with a huge header line, or thousands of headers, over HTTP/1.1", function()
  it("fails as too_large saying what was too large; thousands of small ones arrive", function()
    local server = resil.server.listen({ port = 0, handler = function(req)
      local head = {}
      if req.path == "/huge" then
        head[1] = "X-Huge: " .. ("a"):rep(200 * 1024)
      else
        for i = 1, 5000 do head[i] = ("X-H%d: v%d"):format(i, i) end
      end
      return { action = "raw", body = "HTTP/1.1 200 OK\r\n" .. table.concat(head, "\r\n") ..
        "\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" }
    end })
    local base = ("http://127.0.0.1:%d"):format(server:port())
    local res, err = http.request({ url = base .. "/huge", timeout = 5 })
    assert.is_nil(res)
    assert.are.equal("too_large", err.kind)
    assert.matches("header line longer than libcurl's limit", err.message)
    local s, serr = http.stream({ url = base .. "/huge", timeout = 5 })
    assert.is_nil(s)
    assert.matches("header line longer than libcurl's limit", serr.message)
    res = assert(http.request({ url = base .. "/many", timeout = 5 }))
    assert.are.equal("ok", res.body)
    assert.are.equal("v1", res.headers["x-h1"])
    assert.are.equal("v5000", res.headers["x-h5000"])
    server:close()
  end)
end)

describe("resil.http.header", function()
  it("reads one header of a response in any case, the first of two names, without building res.headers", function()
    resil.clock.real()
    local s = resil.server.listen({ port = 0, handler = function()
      return { status = 200, headers = { ["X-Request-Id"] = "req_1", ["request-id"] = "r2" }, body = "x" }
    end })
    finally(function() s:close() end)
    local res = assert(resil.http.request({ url = ("http://127.0.0.1:%d/"):format(s:port()) }))
    assert.are.equal("req_1", resil.http.header(res, "x-request-id"))
    assert.are.equal("r2", resil.http.header(res, "REQUEST-ID"))
    assert.are.equal("r2", resil.http.header(res, "x-nothing", "request-id"))
    assert.is_nil(resil.http.header(res, "x-nothing"))
    assert.are.equal("req_1", res.headers["x-request-id"]) -- (built after: the same answer)
    assert.are.equal("req_1", resil.http.header(res, "x-request-id", "request-id"))
    -- a table that is no response: its headers field's
    assert.are.equal("t", resil.http.header({ headers = { ["request-id"] = "t" } }, "x-request-id", "request-id"))
    assert.is_nil(resil.http.header({}, "a"))
    assert.has_error(function() resil.http.header(res) end)
  end)
end)

-- (before: libcurl 7.88 bounds a response's headers, not a chunked body's trailers, and the host
-- kept each trailer line: a server that sent trailers without end grew the process by some 80 MB a
-- second until the request's timeout)
describe("a chunked response's trailers", function()
  it("past 300 KiB fail the request as too_large, saying so; a few arrive", function()
    local server = resil.server.listen({ port = 0, handler = function(req)
      local n = req.path == "/endless" and 20000 or 3 -- 20,000 lines of 108 bytes: 2 MiB
      local trailer = ("X-T: %s\r\n"):format(("a"):rep(100))
      return { action = "raw", body = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" ..
        "2\r\nok\r\n0\r\n" .. trailer:rep(n) .. "\r\n" }
    end })
    local base = ("http://127.0.0.1:%d"):format(server:port())
    local res, err = http.request({ url = base .. "/endless", timeout = 5 })
    assert.is_nil(res)
    assert.are.equal("too_large", err.kind)
    assert.matches("trailers", err.message)
    local s = assert(http.stream({ url = base .. "/endless", timeout = 5 }))
    local chunk, serr
    repeat chunk, serr = s:read() until not chunk
    s:close()
    assert.are.equal("too_large", serr and serr.kind)
    res = assert(http.request({ url = base .. "/few", timeout = 5 }))
    assert.are.equal("ok", res.body)
    server:close()
  end)
end)

-- (before: idle_timeout counted the bytes received only: a request still sending a large body
-- (a prompt with images, up a slow link) that the server read as it came was cut as "no data for
-- N s" while its bytes went, and tried again the same way)
describe("idle_timeout while the request's body is still being sent", function()
  -- /slow reads the body 64 KiB at a time, 10 ms apart (6 MiB a second), then answers "ok";
  -- /stall reads nothing
  local script = [[
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.bind(("127.0.0.1", 0)); s.listen(16)
print("port", s.getsockname()[1], flush=True)
def serve(c):
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d: c.close(); return
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    if head.split(b" ")[1] == b"/stall":
        time.sleep(30); c.close(); return
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"): n = int(line.split(b":")[1])
    got = len(rest)
    while got < n:
        d = c.recv(65536)
        if not d: c.close(); return
        got += len(d)
        time.sleep(0.01)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]
  it("does not cut it while the server reads it; a server that reads nothing is cut", function()
    local got, log = helpers.with_server("timeout 60 python3 " .. helpers.write(helpers.tmpname(".py"), script),
      "port (%d+)", function(port)
        -- (the kernel's buffers take some MiB at once: what is left of the body takes seconds more)
        local base, body = "http://127.0.0.1:" .. port, ("x"):rep(24 * 1024 * 1024)
        local t0 = resil.now()
        local res, err = http.request({ url = base .. "/slow", method = "POST", body = body, timeout = 50,
          idle_timeout = 2 })
        local slow = { res and res.body or err.message, resil.now() - t0 }
        local _, serr = http.request({ url = base .. "/stall", method = "POST", body = body, timeout = 30,
          idle_timeout = 0.3 })
        return { slow = slow, stall = serr }
      end)
    assert(got, log)
    assert.are.equal("ok", got.slow[1])
    assert.is_true(got.slow[2] > 2.5, "the body went in " .. got.slow[2] .. " s: the server read it too fast")
    assert.are.equal("timeout", got.stall and got.stall.kind)
    assert.matches("idle_timeout", got.stall.message)
  end)
end)

-- (before: a repeated header's values were joined a line at a time, a string per line: 35,000
-- lines of one name, within libcurl's 300 KiB, made strings of 1.8 GB in all and held the loop
-- 0.4 s when res.headers was read (each stream's is), or a bucket observed the response)
describe("a header repeated thousands of times", function()
  it("is joined once, its values in order, empty ones left out", function()
    local server = resil.server.listen({ port = 0, handler = function()
      return { action = "raw", body = "HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Empty: \r\nX-Late:\r\nX-Late: b\r\nX-Late:\r\n" ..
        "X-Late: c\r\n" .. ("X-T: a\r\nRetry-After: 7\r\n"):rep(8000) .. "Content-Length: 2\r\nConnection: close\r\n\r\nok" }
    end })
    local res = assert(http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()), timeout = 5 }))
    server:close()
    collectgarbage()
    collectgarbage("stop")
    local before = collectgarbage("count")
    local h = res.headers
    local b = resil.bucket("http-spec-repeated", { rate = 10, per = 1, burst = 10 })
    b:observe(res)
    local grown = collectgarbage("count") - before
    collectgarbage("restart")
    assert.are.equal(("a, "):rep(7999) .. "a", h["x-t"])
    assert.are.equal("", h["x-empty"])
    assert.are.equal("b, c", h["x-late"])
    -- (a line at a time: some 96 MB of strings for each of the two)
    assert.is_true(grown < 8 * 1024, ("%.0f KB allocated"):format(grown))
  end)
end)

describe("resil.http.sse_events", function()
  it("frames events held in a string as read_event frames them: comments, CRLF, data lines joined", function()
    local evs = assert(resil.http.sse_events(": hi\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\ndata: [DONE]\n\n"))
    assert.are.same({ { event = "x", data = "a\nb" }, { data = "[DONE]" } }, evs)
  end)
end)
