-- The embedded HTTP server (resil.server.listen): handlers under the host's
-- caps, request limits, and what goes on the wire.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http

-- A server script in a process of its own: prints its port, serves until
-- SIGTERM. -> pid, port, path of its output
local function start_server(handler_source, opts, listen_opts)
  local pid, out = helpers.start(([[
local resil = require "resil"
local s = resil.server.listen({ port = 0, handler = %s %s })
print(s:port()); io.stdout:flush()
resil.sleep(3600)
]]):format(handler_source, listen_opts and (", " .. listen_opts) or ""), opts)
  finally(function() -- whatever the outcome
    if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
  end)
  resil.clock.real()
  local port
  assert(helpers.wait_until(function()
    port = helpers.slurp(out):match("^(%d+)\n")
    return port ~= nil
  end, 10), "the server did not start: " .. helpers.slurp(out))
  return pid, port, out
end

-- helpers.run_script, stopped after 10 s if it hangs (the bugs these specs
-- guard against made it spin forever)
local function run_script(source, opts)
  local path = helpers.write(helpers.tmpname(".lua"), source)
  local r = helpers.run(("timeout -s KILL 10 %s %s %s"):format(helpers.resil, opts or "", path))
  os.remove(path)
  return r
end

local function stop(pid)
  os.execute("kill -TERM " .. pid)
  return helpers.wait_until(function() return not helpers.alive(pid) end, 10)
end

-- a request from the curl command (blocking: only for servers in another
-- process); -> status line, body
local function curl(url, args)
  local r = helpers.run(("curl -si --max-time 10 %s '%s'"):format(args or "", url))
  local out = r.stdout:gsub("^HTTP/1%.1 1%d%d [^\r\n]*\r\n\r\n", "") -- 100 Continue
  return out:match("^(HTTP/1%.1 [^\r\n]*)"), out:match("\r\n\r\n(.*)$")
end

describe("server handlers under the host's caps", function()
  it("sends a reply's chunks byte for byte, NUL bytes too (each was cut at its first NUL)", function()
    local s = resil.server.listen({ handler = function()
      return { status = 200, chunks = { "a\0b", "\0", "c" } }
    end })
    local res = assert(http.request({ url = ("http://127.0.0.1:%d/"):format(s:port()) }))
    s:close()
    assert.are.equal("a\0b\0c", res.body)
  end)

  it("a handler that loops under --max-instructions: the client gets a 500, the next request is served", function()
    local r = run_script([[
      local resil = require "resil"
      local s = resil.server.listen({ port = 0, handler = function(req)
        if req.path == "/loop" then while true do end end
        return { status = 200, body = "fine" }
      end })
      local url = ("http://127.0.0.1:%d"):format(s:port())
      local failed = resil.http.request({ url = url .. "/loop" })
      print(failed.status, failed.headers["x-request-id"])
      local res = resil.http.request({ url = url .. "/" })
      print(res.status, res.body)
      s:close()
    ]], "--max-instructions 100000")
    assert.are.equal(0, r.code, r.stderr)
    local id = r.stdout:match("^500\t(req_%x+)\n")
    assert.is_not_nil(id, r.stdout)
    assert.matches("\n200\tfine\n$", r.stdout)
    assert.matches('"msg":"server handler failed; answered 500"', r.stderr)
    -- (the 500's request id in its log line: what its client quotes finds it)
    assert.matches('"request_id":"' .. id .. '"', r.stderr, 1, true)
    assert.matches("%.lua:3: server handler ran more than %-%-max%-instructions=100000", r.stderr)
    assert.matches('"request":"GET /loop"', r.stderr)
  end)

  it("a handler that allocates without end under --max-memory: a 500, then its memory is back", function()
    local r = run_script([[
      local resil = require "resil"
      local s = resil.server.listen({ port = 0, handler = function(req)
        if req.path == "/hog" then
          local t = {}
          for i = 1, 1e8 do t[i] = ("x"):rep(64) .. i end
        end
        collectgarbage()
        return { status = 200, body = tostring(math.floor(collectgarbage("count") / 1024)) }
      end })
      local url = ("http://127.0.0.1:%d"):format(s:port())
      print(resil.http.request({ url = url .. "/hog" }).status)
      print(resil.http.request({ url = url .. "/" }).body)
      s:close()
    ]], "--max-memory 32M")
    assert.are.equal(0, r.code, r.stderr)
    local status, mib = r.stdout:match("^(%d+)\n(%d+)\n$")
    assert.are.equal("500", status, r.stdout)
    assert.is_true(tonumber(mib) < 8, "MiB still held: " .. mib)
    assert.matches('"error":"not enough memory"', r.stderr)
  end)

  it("a handler that returns something other than a table: a 500 and a logged error, not a 404", function()
    local r = run_script([[
      local resil = require "resil"
      local s = resil.server.listen({ port = 0, handler = function() return "oops" end })
      local res = resil.http.request({ url = ("http://127.0.0.1:%d/x"):format(s:port()) })
      print(res.status)
      s:close()
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("500\n", r.stdout)
    assert.matches("the handler returned string, not a response table", r.stderr)
  end)

  it("a reply table whose fields raise: a 500, the host keeps serving", function()
    local r = run_script([[
      local resil = require "resil"
      local s = resil.server.listen({ port = 0, handler = function(req)
        if req.path == "/bad" then return setmetatable({}, { __index = function() error("no field") end }) end
        return { status = 204 }
      end })
      local url = ("http://127.0.0.1:%d"):format(s:port())
      print(resil.http.request({ url = url .. "/bad" }).status, resil.http.request({ url = url }).status)
      s:close()
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("500\t204\n", r.stdout)
  end)

  it("the first SIGTERM stops a host whose handler loops", function()
    local pid, port, out = start_server([[function(req)
      if req.path == "/loop" then print("spinning"); io.stdout:flush(); while true do end end
      return { status = 200 }
    end]])
    os.execute(("curl -s --max-time 5 http://127.0.0.1:%s/loop > /dev/null 2>&1 &"):format(port))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("spinning") ~= nil end, 10))
    assert.is_true(stop(pid), "still running after SIGTERM")
    assert.matches("interrupted by signal 15", helpers.slurp(out))
  end)
end)

describe("server request limits", function()
  local server, calls
  before_each(function()
    resil.clock.real()
    calls = 0
  end)
  after_each(function()
    if server then server:close() end
    server = nil
  end)

  local function listen(opts)
    opts.handler = function(req)
      calls = calls + 1
      return { status = 200, body = tostring(#req.body) }
    end
    server = resil.server.listen(opts)
    return ("http://127.0.0.1:%d/"):format(server:port())
  end

  it("refuses a body larger than max_body with a 413, without calling the handler", function()
    local url = listen({ max_body = 1000 })
    assert.are.equal("1000", http.request({ url = url, body = ("x"):rep(1000) }).body)
    local res = assert(http.request({ url = url, body = ("x"):rep(100000) }))
    assert.are.equal(413, res.status)
    assert.are.equal(1, calls)
  end)

  it("refuses headers larger than max_headers with a 431 (libevent answers 400, rewritten)", function()
    local url = listen({ max_headers = 4096 })
    local res = assert(http.request({ url = url, headers = { ["x-big"] = ("a"):rep(8000) } }))
    assert.are.equal(431, res.status)
    assert.are.equal(0, calls)
  end)

  it("answers 408 to a request not read within read_timeout", function()
    local url = listen({ read_timeout = 0.2 })
    local out = helpers.tmpname(".out")
    -- a client that sends half a request, then waits for what the server says
    os.execute(([[bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; printf "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab" >&3; timeout 5 cat <&3' > %s 2>&1 &]]):format(
      server:port(), out))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("\r\n\r\n.") ~= nil end, 10))
    assert.matches("^HTTP/1%.1 408 Request Timeout\r\n", helpers.slurp(out))
    assert.are.equal(0, calls)
    -- and the server still serves
    assert.are.equal(200, http.request({ url = url }).status)
  end)

  it("utf8 = true: a body that is not UTF-8 is a 400 naming the byte, without calling the handler", function()
    local url = listen({ utf8 = true })
    assert.are.equal("7", http.request({ url = url, body = "caf\195\169 !" }).body)
    local res = assert(http.request({ url = url, body = "caf\233 !" }))
    assert.are.equal(400, res.status)
    assert.are.equal("the request body is not valid JSON: it is not UTF-8 (byte 0xE9 at offset 3)",
      resil.json.decode(res.body).error.message)
    assert.are.equal(1, calls)
    -- (not asked for: any bytes, as before)
    server:close()
    url = listen({})
    assert.are.equal("5", http.request({ url = url, body = "caf\233 " }).body)
  end)

  it("rejects bad limits at the caller's line", function()
    local ok, err = pcall(function() resil.server.listen({ handler = print, max_body = -1 }) end)
    assert.is_false(ok)
    assert.matches("server_spec%.lua:%d+: resil%.server%.listen: max_body must be a number >= 0", err)
    assert.has_error(function() resil.server.listen({ handler = print, read_timeout = "soon" }) end)
  end)

  -- (before: "[resil prelude]:431: bad argument #-1 to 'listen' (function expected, got nil)" for a
  -- handler misspelt, a line of the host's and an argument of none; metrics.serve(9464) "attempt to index")
  it("rejects options without a handler, a port out of range or no table at the caller's line", function()
    local cases = {
      { function() local s = resil.server.listen({ port = 0, hander = print }); return s end, "resil%.server%.listen: handler must be a function, got nil" },
      { function() local s = resil.server.listen({ port = 70000, handler = print }); return s end, "resil%.server%.listen: port must be a whole number from 0 to 65535, got 70000" },
      { function() local s = resil.server.listen({ port = 80.5, handler = print }); return s end, "resil%.server%.listen: port must be a whole number" },
      { function() local s = resil.server.listen({ host = 127, handler = print }); return s end, "resil%.server%.listen: host must be a string" },
      { function() local s = resil.server.listen(print); return s end, "resil%.server%.listen: expects a table" },
      { function() local s = resil.metrics.serve({ port = "x" }); return s end, "resil%.server%.listen: port must be a whole number" },
      { function() local s = resil.metrics.serve(9464); return s end, "resil%.metrics%.serve: expects a table" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(c[1])
      assert.is_false(ok)
      assert.matches("server_spec%.lua:" .. debug.getinfo(c[1], "S").linedefined .. ": " .. c[2], err)
    end
  end)
end)

describe("server memory under --max-memory", function()
  it("a 64 MB POST gets a 413 and never reaches Lua", function()
    local big = helpers.tmpname(".bin")
    assert(os.execute("head -c 67108864 /dev/zero > " .. big))
    local pid, port = start_server([[function(req)
      collectgarbage()
      return { status = 200, body = #req.body .. " " .. math.floor(collectgarbage("count") / 1024) }
    end]], "--max-memory 32M")
    local status = curl(("http://127.0.0.1:%s/upload"):format(port), "--data-binary @" .. big)
    local chunked = curl(("http://127.0.0.1:%s/upload"):format(port),
      "-H 'Transfer-Encoding: chunked' --data-binary @" .. big)
    local _, after = curl(("http://127.0.0.1:%s/"):format(port))
    os.remove(big)
    assert.is_true(stop(pid))
    assert.are.equal("HTTP/1.1 413 Request Entity Too Large", status)
    assert.are.equal("HTTP/1.1 413 Request Entity Too Large", chunked)
    local body_len, lua_mib = after:match("^(%d+) (%d+)$")
    assert.are.equal("0", body_len)
    assert.is_true(tonumber(lua_mib) < 4, "Lua holds MiB: " .. lua_mib)
  end)
end)

describe("server requests", function()
  it("carry header names lower-cased, whatever their length, and the peer as address:port", function()
    local seen
    local s = resil.server.listen({ handler = function(req)
      seen = req
      return { status = 200, body = "" }
    end })
    local long = "X-Long-" .. ("AbC"):rep(60)
    assert(http.request({ url = ("http://127.0.0.1:%d/p?q=1"):format(s:port()),
      headers = { ["X-Mixed-Case"] = "Value", [long] = "v" } }))
    s:close()
    assert.are.equal("Value", seen.headers["x-mixed-case"])
    assert.are.equal("v", seen.headers[long:lower()])
    assert.is_nil(seen.headers["X-Mixed-Case"])
    assert.matches("^127%.0%.0%.1:%d+$", seen.peer)
    assert.are.same({ "GET", "/p", "q=1" }, { seen.method, seen.path, seen.query })
  end)
end)

describe("server replies", function()
  it("carry the standard reason phrase in the status line", function()
    local pid, port = start_server([[function(req)
      return { status = tonumber(req.path:sub(2)), body = "" }
    end]])
    local lines = {}
    for _, code in ipairs({ 200, 400, 404, 429, 500, 503, 529, 599 }) do
      lines[#lines + 1] = (curl(("http://127.0.0.1:%s/%d"):format(port, code)))
    end
    assert.is_true(stop(pid))
    assert.are.same({ "HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request", "HTTP/1.1 404 Not Found",
      "HTTP/1.1 429 Too Many Requests", "HTTP/1.1 500 Internal Server Error", "HTTP/1.1 503 Service Unavailable",
      "HTTP/1.1 529 Overloaded", "HTTP/1.1 599 Server Error" }, lines)
  end)
end)

  -- (the Date line is the server's own, made once a second: libevent's cost a gmtime and a printf each reply)
  it("carry one Date header in RFC 1123 form on HTTP/1.1 (a handler's own kept), none on HTTP/1.0", function()
    for _, tasks in ipairs({ "false", "true" }) do
      local pid, port = start_server([[function(req)
        if req.path == "/own" then return { status = 200, headers = { date = "Mon, 01 Jan 2024 00:00:00 GMT" } } end
        if req.path == "/chunks" then return { status = 200, chunks = { "a", "b" } } end
        if req.path == "/stream" then return { status = 200, stream = function(write) write("a") end } end
        return { status = tonumber(req.path:sub(2)) or 200, body = "x" }
      end]], nil, "tasks = " .. tasks)
      local function dates(path, args)
        local r = helpers.run(("curl -si --max-time 10 %s 'http://127.0.0.1:%s%s'"):format(args or "", port, path))
        local found = {}
        for v in r.stdout:gmatch("\r\n[Dd]ate: ([^\r]*)") do found[#found + 1] = v end
        return found, r.stdout
      end
      local rfc1123 = "^%u%l%l, %d%d %u%l%l %d%d%d%d %d%d:%d%d:%d%d GMT$"
      for _, path in ipairs({ "/200", "/404", "/204", "/chunks", tasks == "true" and "/stream" or "/500" }) do
        local found, raw = dates(path)
        assert.are.equal(1, #found, raw)
        assert.matches(rfc1123, found[1])
      end
      -- where libevent wrote its own: before the Content-Length, after a chunked reply's Transfer-Encoding
      local _, whole = dates("/200")
      assert.truthy(whole:find("\r\n[Dd]ate: [^\r]*\r\nContent%-Length: 1\r\n"), whole)
      local _, chunked = dates("/chunks")
      assert.truthy(chunked:find("\r\nTransfer%-Encoding: chunked\r\n[Dd]ate: "), chunked)
      local found, raw = dates("/200", "-I") -- HEAD
      assert.are.equal(1, #found, raw)
      assert.are.same({ "Mon, 01 Jan 2024 00:00:00 GMT" }, (dates("/own")))
      found, raw = dates("/200", "--http1.0")
      assert.matches("^HTTP/1.0 200", raw)
      assert.are.same({}, found)
      assert.is_true(stop(pid))
    end
  end)

  -- (read_reply compares a header's name only where its first letter may start one it treats apart)
  it("frame a body themselves (a handler's Content-Length and Transfer-Encoding dropped, any case) and keep " ..
     "its own Content-Type and Date once, with the rest of its headers", function()
    local pid, port = start_server([[function(req)
      return { status = 200, body = "hello", headers = { ["Content-LENGTH"] = "999", ["transfer-Encoding"] = "chunked",
        ["CONTENT-type"] = "text/plain", DATE = "Mon, 01 Jan 2024 00:00:00 GMT", ["x-resil-cost-usd"] = "0.000001",
        ["Connection-Note"] = "c", ["Date-Of-Birth"] = "d", ["Trailer-Note"] = "t", ["x-content-type"] = "x" } }
    end]])
    local r = helpers.run(("curl -si --max-time 10 'http://127.0.0.1:%s/'"):format(port))
    assert.is_true(stop(pid))
    local head, body = r.stdout:match("^(.-)\r\n\r\n(.*)$")
    assert.are.equal("hello", body)
    local names = {}
    for name, value in head:gmatch("\r\n([^:\r]+): ([^\r]*)") do
      names[#names + 1] = name:lower() .. "=" .. value
    end
    table.sort(names)
    assert.are.same({ "connection-note=c", "content-length=5", "content-type=text/plain",
      "date-of-birth=d", "date=Mon, 01 Jan 2024 00:00:00 GMT", "trailer-note=t", "x-content-type=x",
      "x-resil-cost-usd=0.000001" }, names)
  end)

describe("server replies to an HTTP/1.0 client", function()
  -- (no chunked framing there: the close ends the body, and libevent closed the connection inside
  -- the reply's end, freeing the reply the server then unlinked and freed again: a segfault, or a
  -- freed connection written. nginx speaks HTTP/1.0 to its upstreams by default)
  it("end a chunked or streamed reply with the close (a keep-alive not granted), and the server lives on", function()
    for _, tasks in ipairs({ "false", "true" }) do
      local pid, port = start_server([[function(req)
        if req.path == "/chunks" then return { status = 200, chunks = { "a", "b" } } end
        if req.path == "/stream" then -- (its last bytes written before it ends)
          return { status = 200, stream = function(write) write("a"); resil.sleep(0.05); write("b"); resil.sleep(0.05) end }
        end
        return { status = 200, body = "ok" }
      end]], nil, "tasks = " .. tasks)
      for _ = 1, 3 do
        for _, path in ipairs({ "/chunks", tasks == "true" and "/stream" or nil }) do
          local r = helpers.run(("curl -si --max-time 10 --http1.0 'http://127.0.0.1:%s%s'"):format(port, path))
          assert.matches("^HTTP/1.0 200", r.stdout)
          assert.are.equal("ab", r.stdout:match("\r\n\r\n(.*)$"))
          -- a keep-alive asked for is not granted: the close is the only end such a reply has
          -- (it was framed as Content-Length: 0, its body read as the next reply's start)
          r = helpers.run(("curl -si --max-time 10 --http1.0 -H 'Connection: keep-alive' 'http://127.0.0.1:%s%s'")
            :format(port, path))
          assert.is_nil(r.stdout:lower():find("content%-length"), r.stdout)
          assert.is_nil(r.stdout:lower():find("keep%-alive"), r.stdout)
          assert.are.equal("ab", r.stdout:match("\r\n\r\n(.*)$"))
        end
      end
      local _, body = curl(("http://127.0.0.1:%s/"):format(port))
      assert.are.equal("ok", body)
      assert.is_true(stop(pid))
    end
  end)
end)

describe("server handlers as tasks (tasks = true)", function()
  local function listen(handler, opts)
    resil.clock.real()
    local o = { port = 0, tasks = true, handler = handler }
    for k, v in pairs(opts or {}) do o[k] = v end
    local s = assert(resil.server.listen(o))
    return s, ("http://127.0.0.1:%d"):format(s:port())
  end

  it("a handler may wait (sleep, an upstream request) before it answers", function()
    local up <close> = assert(resil.server.listen({ port = 0, handler = function(req)
      return { status = 200, body = "upstream saw " .. req.path }
    end }))
    local s <close>, url = listen(function(req)
      resil.sleep(0.01)
      local r = assert(http.request({ url = ("http://127.0.0.1:%d%s"):format(up:port(), req.path) }))
      return { status = 201, headers = { ["x-via"] = "task" }, body = r.body }
    end)
    local res = assert(http.request({ url = url .. "/a" }))
    assert.are.equal(201, res.status)
    assert.are.equal("task", res.headers["x-via"])
    assert.are.equal("upstream saw /a", res.body)
  end)

  it("serves many waiting requests at once", function()
    local s <close>, url = listen(function(req)
      resil.sleep(0.05)
      return { status = 200, body = req.path }
    end)
    local got = resil.map({ 1, 2, 3, 4, 5, 6, 7, 8 }, function(i)
      return assert(http.request({ url = url .. "/" .. i })).body
    end, { concurrency = 8 })
    assert.are.same({ "/1", "/2", "/3", "/4", "/5", "/6", "/7", "/8" }, got)
  end)

  it("streams a reply chunk by chunk: the client reads each chunk before the handler writes the next", function()
    local s <close>, url = listen(function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
        for i = 1, 3 do
          assert(write("data: " .. i .. "\n\n"))
          resil.sleep(0.02)
        end
      end }
    end)
    local st = assert(http.stream({ url = url .. "/s" }))
    assert.are.equal(200, st.status)
    assert.are.equal("text/event-stream", st.headers["content-type"])
    local events = {}
    while true do
      local ev = st:read_event()
      if not ev then break end
      events[#events + 1] = ev.data
    end
    assert.are.same({ "1", "2", "3" }, events)
  end)

  -- (Nagle's algorithm held a chunk until the client acknowledged the one before, which a client
  -- with nothing to send delays by 40 ms on Linux: on the virtual clock, I/O that does not come
  -- within its 10 ms grace lets time jump to the next timer)
  it("a stream's chunks leave as written on a kept-alive connection: none waits for the client's delayed ACK", function()
    local read_a = false
    local s <close>, url = listen(function(req)
      if req.path == "/warm" then return { status = 200, body = "ok" } end
      return { status = 200, stream = function(write)
        write("a")
        while not read_a do resil.yield() end
        write("b")
      end }
    end)
    -- the connection past its first exchanges (Linux acknowledges at once on a new one)
    for _ = 1, 3 do assert(http.request({ url = url .. "/warm" })) end
    resil.clock.virtual()
    for _ = 1, 3 do
      read_a = false
      local st = assert(http.stream({ url = url .. "/s", idle_timeout = 60 }))
      assert.are.equal("a", st:read())
      read_a = true
      local t0 = resil.now()
      assert.are.equal("b", st:read())
      assert.are.equal(t0, resil.now())
      assert.is_nil(st:read())
    end
  end)

  -- (libevent timed the connection's reading while it wrote a reply, and a client reading a stream
  -- sends nothing: a stream that paused read_timeout + 1 s between two writes, an upstream slow
  -- between its deltas, was cut without its end; so was a reply's `chunks` sent that far apart)
  it("a streamed reply may pause longer than read_timeout between writes: it reaches its end", function()
    local s <close>, url = listen(function(req)
      if req.path == "/chunks" then return { status = 200, chunks = { "data: 1\n\n", "data: 2\n\n" }, chunk_interval = 1.5 } end
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
        write("data: 1\n\n")
        resil.sleep(1.5) -- past read_timeout and libevent's own idle timeout (read_timeout + 1 s)
        write("data: 2\n\n")
      end }
    end, { read_timeout = 0.2 })
    local got = resil.map({ "/stream", "/chunks" }, function(path)
      local st = assert(http.stream({ url = url .. path }))
      local events = {}
      while true do
        local ev, err = st:read_event()
        if not ev then return { events = events, err = err and tostring(err) } end
        events[#events + 1] = ev.data
      end
    end, { concurrency = 2 })
    for i, path in ipairs({ "/stream", "/chunks" }) do
      assert.is_nil(got[i].err, path)
      assert.are.same({ "1", "2" }, got[i].events, path)
    end
  end)

  it("cut_streams ends each stream that named its last words with them, cleanly, and cancels its task", function()
    local closed = 0
    local s <close>, url = listen(function(req)
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        cut = req.path ~= "/plain" and "event: error\ndata: stopping\n\n" or nil,
        stream = function(write)
          local _ <close> = setmetatable({}, { __close = function() closed = closed + 1 end })
          if req.path == "/ending" then -- its ending written: nothing may follow it
            write("data: 1\n\n")
            write("data: end\n\n", true)
            resil.sleep(1000)
          end
          for i = 1, 1000 do
            write("data: " .. i .. "\n\n")
            resil.sleep(0.02)
          end
        end }
    end)
    local named = assert(http.stream({ url = url .. "/named" }))
    local plain = assert(http.stream({ url = url .. "/plain" }))
    local ending = assert(http.stream({ url = url .. "/ending" }))
    assert.are.equal("1", named:read_event().data)
    assert.are.equal("1", plain:read_event().data)
    assert.are.equal("1", ending:read_event().data)
    assert.are.equal(3, s:pending())
    assert.are.equal(1, s:cut_streams())
    assert.are.equal(2, s:pending()) -- the stream without last words goes on, and the one ending
    assert.are.equal(1, closed) -- the task of the one cut was canceled (its <close> ran)
    local events, err = {}, nil
    while true do
      local ev, e = named:read_event()
      if not ev then err = e break end
      events[#events + 1] = (ev.event or "") .. ":" .. ev.data
    end
    assert.is_nil(err) -- ended, not cut
    assert.are.equal("error:stopping", events[#events])
    assert.is_true(#events < 10)
    assert.are.equal("2", plain:read_event().data)
    assert.are.equal("end", ending:read_event().data)
    plain:close()
    ending:close()
  end)

  it("a handler that raises answers 500; one that raises mid-stream cuts the reply, never ends it", function()
    resil.log.level("off")
    local s <close>, url = listen(function(req)
      if req.path == "/raise" then error("broken handler") end
      return { status = 200, stream = function(write)
        write("partial")
        error("broken stream")
      end }
    end)
    local res = assert(http.request({ url = url .. "/raise" }))
    assert.are.equal(500, res.status)
    local st = assert(http.stream({ url = url .. "/cut" }))
    assert.are.equal(200, st.status)
    assert.are.equal("partial", st:read())
    local chunk, err = st:read()
    assert.is_nil(chunk)
    assert.is_table(err) -- a cut body, not a normal end
    resil.log.level("info")
  end)

  it("a client that leaves cancels the task: its upstream transfer is aborted and its permit given back", function()
    local up <close> = assert(resil.server.listen({ port = 0, handler = function()
      return { action = "hang" }
    end }))
    local sem = resil.semaphore("server-spec-leave", { size = 1 })
    local closed = false
    local s <close>, url = listen(function()
      local _ <close> = setmetatable({}, { __close = function() closed = true end })
      assert(sem:acquire())
      local _ <close> = setmetatable({}, { __close = function() sem:release() end }) -- as policies.call does
      local r = http.request({ url = ("http://127.0.0.1:%d/"):format(up:port()), timeout = 30 })
      return { status = 200, body = tostring(r) }
    end)
    local res, err = http.request({ url = url .. "/", timeout = 0.3 })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
    assert.is_true(helpers.wait_until(function() return closed end, 5), "the handler's task was not canceled")
    assert.is_true(helpers.wait_until(function() return up:pending() == 0 end, 5), "the upstream still waits")
    assert.are.equal(0, s:pending())
    assert.is_true(sem:try()) -- the permit came back
  end)

  it("a request that finds the server's memory spent (--max-memory) by those in flight: a 503 with " ..
     "Retry-After, not a 500", function()
    -- (before: "server handler not started; answered 500": a load balancer took the server for
    -- broken, and the client was told of a bug, not of a busy server to retry)
    -- what the requests in flight hold stands in memory all but some 1 MB of --max-memory: a body
    -- of 4 MB cannot be taken in, a small one can
    local _, port, out = start_server([[(function()
      local held = {}
      local piece = ("x"):rep(256 * 1024 - 64)
      pcall(function() while true do held[#held + 1] = piece .. #held end end)
      for _ = 1, 4 do held[#held] = nil end
      collectgarbage()
      return function(req) return { status = 200, body = #held .. " " .. #req.body } end
    end)()]], "--max-memory 40M", "tasks = true")
    local big = helpers.write(helpers.tmpname(".txt"), ("x"):rep(4 * 1024 * 1024))
    local r = helpers.run(("curl -s -H 'Expect:' -w ' %%{http_code}:%%header{retry-after}:%%header{retry-after-ms}' " ..
      "--max-time 30 --data-binary @%s http://127.0.0.1:%s/"):format(big, port))
    assert.matches(" 503:1:1000$", r.stdout)
    assert.matches('"message":"the server is out of memory for now; retry shortly","type":"api_error"', r.stdout, 1, true)
    assert.matches('"msg":"server handler not started (out of memory); answered 503"', helpers.slurp(out), 1, true)
    local res = http.request({ url = ("http://127.0.0.1:%s/"):format(port), body = "after" })
    assert.are.equal(200, res.status, res.body) -- (it serves on: a request that fits)
    assert.matches(" 5$", res.body)
  end)

  it("a curl client that hangs up mid-stream cancels the task", function()
    local pid, port, out = start_server([[function(req)
      return { status = 200, stream = function(write)
        local _ <close> = setmetatable({}, { __close = function() print("canceled"); io.stdout:flush() end })
        for i = 1, 1000 do write("data: " .. i .. "\n\n"); resil.sleep(0.01) end
        print("finished"); io.stdout:flush()
      end }
    end]], nil, "tasks = true")
    -- it hangs up once it has read a few events (its pipe closed), however long its start took
    helpers.run(("curl -sN --max-time 5 http://127.0.0.1:%s/ | head -c 20 >/dev/null"):format(port))
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("canceled") ~= nil end, 5),
      helpers.slurp(out))
    assert.is_true(stop(pid))
    assert.is_nil(helpers.slurp(out):match("finished"))
  end)
end)
