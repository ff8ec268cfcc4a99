-- Server-sent events: on_event and stream:read_event frame the stream by the
-- specification's line rules
-- (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation),
-- whatever the reads the bytes arrive in.
local resil = require "resil"
local http = resil.http

local SSE = { ["content-type"] = "text/event-stream" }

-- A server whose every reply is `reply`; chunks go out one per host-clock
-- tick, so the client reads each before the next is sent.
local function serve(reply)
  local server = resil.server.listen({ handler = function() return reply end })
  return server, ("http://127.0.0.1:%d/events"):format(server:port())
end

local function chunked(chunks, extra)
  local reply = { status = 200, headers = SSE, chunks = chunks, chunk_interval = 0.01 }
  for k, v in pairs(extra or {}) do reply[k] = v end
  return reply
end

-- The events of one request on_event sees, and the request's results.
local function events_of(reply, opts)
  local server, url = serve(reply)
  local got = {}
  local req = { url = url, on_event = function(ev) got[#got + 1] = ev end }
  for k, v in pairs(opts or {}) do req[k] = v end
  local res, err = http.request(req)
  server:close()
  return got, res, err
end

local function data_of(events)
  local out = {}
  for i, ev in ipairs(events) do out[i] = ev.data end
  return out
end

local function assert_all_given_back()
  local stats = http.stats()
  assert.are.equal(0, stats.in_flight)
  assert.are.equal(0, stats.open)
end

before_each(function()
  resil.clock.virtual()
  collectgarbage() -- streams other specs left to the collector
end)

describe("the test server", function()
  it("delivers each chunk in a read of its own", function()
    local chunks = { "data: a\r\n\r", "\ndata: b\r\n\r\n", "data: c\r\rdata: d\r\r" }
    local server, url = serve(chunked(chunks))
    local s <close> = assert(http.stream({ url = url }))
    local reads = {}
    for chunk in s.read, s do reads[#reads + 1] = chunk end
    server:close()
    assert.are.same(chunks, reads)
  end)
end)

describe("line ends", function()
  it("end at CRLF, LF or CR, a CR ending one read and an LF starting the next being one", function()
    local got, res, err = events_of(chunked({ "data: a\r\n\r", "\ndata: b\r\n\r\n", "data: c\r\rdata: d\r\r" }))
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.same({ "a", "b", "c", "d" }, data_of(got))
  end)

  it("keep a CRLF split across two reads one line end", function()
    local got = events_of(chunked({ "data: a\r", "\n\r", "\ndata: b\r\n", "\r\n" }))
    assert.are.same({ "a", "b" }, data_of(got))
  end)

  it("take a CR ending a read as a line end when the next read does not start with LF", function()
    local got = events_of(chunked({ "data: a\r", "\rdata: b\n", "\n" }))
    assert.are.same({ "a", "b" }, data_of(got))
  end)

  it("may be bare CRs throughout", function()
    local got = events_of(chunked({ "event: x\rdata: 1\rdata: 2\r\r", ": note\rdata: 3\r\r" }))
    assert.are.same({ "1\n2", "3" }, data_of(got))
    assert.are.equal("x", got[1].event)
  end)

  it("may mix within one stream", function()
    local got = events_of(chunked({ "data: 1\n\ndata: 2\r\n\r\ndata: 3\r\rdata: 4\r\n\n" }))
    assert.are.same({ "1", "2", "3", "4" }, data_of(got))
  end)

  it("give the same events however the reads cut the stream, down to a byte per read", function()
    local stream = "\xEF\xBB\xBFevent: a\r\ndata: 1\r\n\r\n: note\rdata: 2\rdata:3\r\r" ..
      "id: 9\nretry: 10\ndata\n\ndata: 4\r\n\r"
    local expected = { { event = "a", data = "1" }, { data = "2\n3" }, { id = "9", retry = "10", data = "" },
      { data = "4" } }
    assert.are.same(expected, events_of({ status = 200, headers = SSE, body = stream }))
    local bytes = {}
    for i = 1, #stream do bytes[i] = stream:sub(i, i) end
    resil.clock.real() -- a millisecond between reads: enough for each byte to be read alone
    assert.are.same(expected, events_of(chunked(bytes, { chunk_interval = 0.001 })))
  end)
end)

describe("fields", function()
  it("join data lines with newlines, removing one leading space at most", function()
    local got = events_of(chunked({ "data: first\ndata:second\ndata\ndata:  third\ndata: a: b\n\n" }))
    assert.are.same({ "first\nsecond\n\n third\na: b" }, data_of(got))
  end)

  it("give event, id and retry to the event they belong to", function()
    local got = events_of(chunked({ "event: update\nid: 42\nretry: 3000\ndata: x\n\n", "data: y\n\n" }))
    assert.are.same({ event = "update", id = "42", retry = "3000", data = "x" }, got[1])
    assert.are.same({ data = "y" }, got[2])
  end)

  it("ignore comments, also between CR line ends", function()
    local got = events_of(chunked({ ": keep-alive\r", ": another\r\ndata: x\r", ":\r\r" }))
    assert.are.same({ { data = "x" } }, got)
  end)

  it("ignore a retry that is not all digits", function()
    local got = events_of(chunked({ "retry: 3s\ndata: x\n\n", "retry: \ndata: y\n\n" }))
    assert.are.same({ { data = "x" }, { data = "y" } }, got)
  end)

  it("ignore an id that contains NUL", function()
    local got = events_of({ status = 200, headers = SSE, body = "id: a\0b\ndata: x\n\nid: ok\ndata: y\n\n" })
    assert.are.same({ { data = "x" }, { id = "ok", data = "y" } }, got)
  end)

  it("take a field name without a colon as the whole line, with an empty value", function()
    local got = events_of(chunked({ "event\ndata\n\n" }))
    assert.are.same({ { event = "", data = "" } }, got)
  end)

  it("ignore unknown fields and dispatch nothing for an event without data", function()
    local got = events_of(chunked({ "event: ping\n\n", "id: 7\nfoo: bar\n\n", "data: x\n\n" }))
    assert.are.same({ { data = "x" } }, got)
  end)

  it("drop an event the stream ends in the middle of", function()
    local got, res, err = events_of(chunked({ "data: x\n\n", "data: y\n" }))
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.same({ "x" }, data_of(got))
  end)

  it("keep every one of thousands of events arriving at once, in order", function()
    local lines = {}
    for i = 1, 10000 do lines[i] = ("id: %d\ndata: %d\n\n"):format(i, i) end
    local got = events_of({ status = 200, headers = SSE, body = table.concat(lines) })
    assert.are.equal(10000, #got)
    for i = 1, 10000 do assert.are.equal(tostring(i), got[i].data) end
  end)
end)

describe("a byte order mark", function()
  it("is dropped at the start of the stream, even split across reads", function()
    assert.are.same({ "a" }, data_of(events_of(chunked({ "\xEF\xBB\xBFdata: a\n\n" }))))
    assert.are.same({ "a" }, data_of(events_of(chunked({ "\xEF\xBB", "\xBFdata: a\n\n" }))))
  end)

  it("is part of the field name anywhere else", function()
    assert.are.same({ "a" }, data_of(events_of(chunked({ "data: a\n\n\xEF\xBB\xBFdata: b\n\n" }))))
  end)
end)

describe("the size of an event", function()
  it("is bounded by max_event: a larger one fails the stream with kind=too_large and frees it", function()
    local got, res, err = events_of(chunked({ "data: small\n\n", "data: " .. ("x"):rep(600),
      ("y"):rep(600) .. "\n\n", "data: after\n\n" }), { max_event = 1000 })
    assert.is_nil(res)
    assert.are.equal("too_large", err.kind)
    assert.matches("max_event %(1000 bytes%)", err.message)
    assert.are.same({ "small" }, data_of(got))
    assert_all_given_back()
  end)

  it("counts one event, not the stream", function()
    local lines = {}
    for i = 1, 100 do lines[i] = "data: " .. ("z"):rep(100) .. "\n\n" end
    local got, _, err = events_of({ status = 200, headers = SSE, body = table.concat(lines) }, { max_event = 200 })
    assert.is_nil(err)
    assert.are.equal(100, #got)
  end)

  it("is 8 MiB unless told otherwise", function()
    local body = "data: " .. ("x"):rep(8 * 1024 * 1024 + 1) .. "\n\n"
    local got, res, err = events_of({ status = 200, headers = SSE, body = body })
    assert.is_nil(res)
    assert.are.equal("too_large", err.kind)
    assert.are.same({}, got)
    got, res = events_of({ status = 200, headers = SSE, body = body }, { max_event = 9 * 1024 * 1024 })
    assert.are.equal(200, res.status)
    assert.are.equal(8 * 1024 * 1024 + 1, #got[1].data)
  end)

  it("must be given as a number of bytes", function()
    local ok, err = pcall(function() return http.request({ url = "http://127.0.0.1:1/", max_event = "1k",
      on_event = print }) end)
    assert.is_false(ok)
    assert.matches("sse_spec.lua:%d+: http request: 'max_event' must be a number of bytes", err)
  end)
end)

describe("a stream", function()
  it("canceled in the middle of an event is given back at once", function()
    local server, url = serve(chunked({ "data: par", "tial\n\n" }, { stall_after = 1 }))
    local got = {}
    local t = resil.spawn(http.request, { url = url, on_event = function(ev) got[#got + 1] = ev end })
    resil.sleep(1) -- the first chunk arrives, the second never does
    assert.are.equal(1, http.stats().open)
    t:cancel()
    assert_all_given_back()
    assert.are.same({}, got)
    server:close()
  end)

  it("that on_event stops by returning false is given back at once", function()
    local calls = 0
    local _, res, err = events_of(chunked({ "data: 1\n\ndata: 2\n\n", "data: 3\n\n" }),
      { on_event = function() calls = calls + 1; return false end })
    assert.is_nil(err)
    assert.are.equal(200, res.status)
    assert.are.equal(1, calls)
    assert_all_given_back()
  end)

  it("is given back when on_event raises", function()
    local ok, err = pcall(events_of, chunked({ "data: 1\n\n" }), { on_event = function() error("boom", 0) end })
    assert.is_false(ok)
    assert.are.equal("boom", err)
    assert_all_given_back()
  end)

  it("can be read event by event with stream:read_event()", function()
    local server, url = serve(chunked({ "data: 1\n\nevent: e\nda", "ta: 2\n\n" }))
    local s <close> = assert(http.stream({ url = url }))
    assert.are.same({ data = "1" }, s:read_event())
    assert.are.same({ event = "e", data = "2" }, s:read_event())
    assert.is_nil(s:read_event())
    server:close()
    local ok, err = pcall(s.read, s)
    assert.is_false(ok)
    assert.matches("read_event", err)
  end)
end)
