-- The gateway's HTTP front against hostile framing, driven with raw bytes
-- (python3 sockets) at a real `resil-lua gateway` in front of a real
-- `resil-lua mock`, each a process of its own. A request a proxy in front
-- may frame otherwise than the gateway reads it (request smuggling) is
-- refused with the connection closed: no request after it on the
-- connection reaches a handler, and no provider is called for it.
local helpers = require "spec.helpers"
local resil = require "resil"
local json = resil.json

-- the bytes given (a Lua string, sent as they are), then the connection read to its end
local RAW = [[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
s.sendall(open(sys.argv[2], "rb").read())
sys.stdout.buffer.write(b"".join(iter(lambda: s.recv(65536), b"")))
]]

describe("the gateway's HTTP front, hostile framing", function()
  local client = helpers.write(helpers.tmpname(".py"), RAW)
  local port, mock_port, pids = nil, nil, {}

  lazy_setup(function()
    mock_port, port = helpers.free_ports(2)
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir)
    helpers.write(dir .. "/mock.lua", 'return { reply = "served" }')
    helpers.write(dir .. "/gw.lua", ([[
      require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
      return { auth = false, models = { fast = "openai/gpt-4o-mini" } }
    ]]):format(mock_port))
    for _, cmd in ipairs({
      ("%s mock %s/mock.lua --port %d > %s/mock.out 2>&1 & echo $! > %s/mock.pid"):format(helpers.resil, dir, mock_port,
        dir, dir),
      ("%s gateway --listen 127.0.0.1:%d --config %s/gw.lua --store %s/s.db --log-level error > %s/gw.out 2>&1 " ..
        "& echo $! > %s/gw.pid"):format(helpers.resil, port, dir, dir, dir, dir),
    }) do os.execute(cmd) end
    pids = { helpers.slurp(dir .. "/mock.pid"):match("%d+"), helpers.slurp(dir .. "/gw.pid"):match("%d+") }
    assert(helpers.wait_until(function() return helpers.slurp(dir .. "/gw.out"):find("listening") ~= nil end, 10),
      helpers.slurp(dir .. "/gw.out"))
    assert(helpers.wait_until(function() return helpers.slurp(dir .. "/mock.out"):find("http") ~= nil end, 10))
  end)
  lazy_teardown(function()
    for _, pid in ipairs(pids) do os.execute("kill " .. pid .. " 2>/dev/null") end
  end)

  -- -> the status lines of every answer on the connection, the first answer's JSON body, the whole text
  local function ask(bytes)
    local r = helpers.run(("python3 %s %d %s"):format(client, port, helpers.write(helpers.tmpname(".bin"), bytes)))
    local lines = {}
    for line in r.stdout:gmatch("HTTP/1%.%d %d%d%d[^\r]*") do lines[#lines + 1] = line end
    local body = r.stdout:match("^.-\r\n\r\n(.-)\n?$")
    local ok, decoded = pcall(json.decode, body or "")
    return lines, ok and decoded or nil, r.stdout
  end

  -- the chat calls the mock has answered so far
  local function chats()
    local r = helpers.run(("curl -s http://127.0.0.1:%d/__mock/stats"):format(mock_port))
    return json.decode(r.stdout).routes.chat or 0
  end

  local BODY = json.encode({ model = "fast", messages = { { role = "user", content = "hi" } } })
  local HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
  -- a request smuggled after the body, if the body's framing was read as the gateway reads it
  local SMUGGLED = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

  it("a chunked request body as RFC 9112 frames it is served, in pieces with a trailer too", function()
    local before = chats()
    local lines = ask(HEAD:gsub("\r\n\r\n$", "\r\nConnection: close\r\n\r\n") ..
      ("%x\r\n%s\r\n%X\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n"):format(10, BODY:sub(1, 10), #BODY - 10, BODY:sub(11)))
    assert.are.same({ "HTTP/1.1 200 OK" }, lines)
    assert.are.equal(before + 1, chats())
    -- a size padded with zeros is still 1*HEXDIG
    lines = ask(HEAD:gsub("\r\n\r\n$", "\r\nConnection: close\r\n\r\n") ..
      ("%s%x\r\n%s\r\n0\r\n\r\n"):format(("0"):rep(100), #BODY, BODY))
    assert.are.same({ "HTTP/1.1 200 OK" }, lines)
  end)

  -- chunk sizes libevent reads with strtoll (a 0x prefix, a sign, white space before) and a
  -- chunk's data not followed by its line end: a proxy in front that reads them as RFC 9112 does
  -- (1*HEXDIG, then CRLF after the data) finds another body end, and the bytes after it are a
  -- request it never saw. Each was served, and the request after it on the connection too.
  for _, case in ipairs({
    { "a chunk size with a 0x prefix", ("0x%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) },
    { "a chunk size with a + sign", ("+%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) },
    { "a chunk size after a space", (" %x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) },
    { "a chunk size after a tab", ("\t%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) },
    { "a last chunk of size -0", ("%x\r\n%s\r\n-0\r\n\r\n"):format(#BODY, BODY) },
    { "a chunk size followed by a space and more digits", ("%x 5\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) },
    { "a chunk's data followed by the next size, not its line end",
      ("%x\r\n%s%x\r\n%s\r\n0\r\n\r\n"):format(10, BODY:sub(1, 10), #BODY - 10, BODY:sub(11)) },
    { "a chunk's data followed by bytes before its line end",
      ("%x\r\n%sXX\r\n0\r\n\r\n"):format(#BODY, BODY) },
    { "an empty line where a chunk size is due", ("\r\n%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) },
  }) do
    it(case[1] .. " is a 400 that closes the connection: nothing is called, nothing smuggled after it", function()
      local before = chats()
      local lines, body, text = ask(HEAD .. case[2] .. SMUGGLED)
      assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
      assert.are.equal("invalid_request_error", body.error.type)
      assert.matches("malformed chunked request body", body.error.message)
      assert.matches("\r\nConnection: close\r\n", text)
      assert.are.equal(before, chats())
    end)
  end

  -- (libevent refuses both at once after the body, as "a malformed trailer")
  it("a chunked request with a Content-Length too is a 400 saying so, that closes the connection", function()
    local before = chats()
    local lines, body, text = ask(HEAD:gsub("\r\n\r\n$", "\r\nContent-Length: 4\r\n\r\n") ..
      ("%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) .. SMUGGLED)
    assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
    assert.are.equal("a request with both Transfer-Encoding and Content-Length", body.error.message)
    assert.are.equal(before, chats())
  end)

  -- RFC 9110 5.5: a NUL in a field value is refused or replaced, never read as the end of the
  -- value: libevent cut each value at its NUL, so "Content-Length: 5\0<digits>" was a length of
  -- 5, "Transfer-Encoding: chunked\0, gzip" chunked, and two Idempotency-Keys that differ after
  -- a NUL one key (the second request got the first one's answer)
  for _, case in ipairs({
    { "a Content-Length", "Content-Length: %d\0" .. "0\r\n\r\n%s" },
    { "an Idempotency-Key", "Idempotency-Key: a\0b\r\nContent-Length: %d\r\n\r\n%s" },
    { "a header name", "X-A\0b: 1\r\nContent-Length: %d\r\n\r\n%s" },
  }) do
    it("a NUL byte in " .. case[1] .. " is a 400 that closes the connection: nothing is called", function()
      local before = chats()
      local lines, body, text = ask("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" ..
        case[2]:format(#BODY, BODY) .. SMUGGLED)
      assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
      assert.are.equal("invalid_request_error", body.error.type)
      assert.matches("\r\nConnection: close\r\n", text)
      assert.are.equal(before, chats())
    end)
  end

  -- (libevent reads no body for a HEAD: the bytes of one sent with a Content-Length or in chunks
  -- were read as the next request on the connection, which a proxy in front, framing a request's
  -- body whatever its method (RFC 9112 6.3), never saw: here GET /v1/chat/completions, its answer
  -- the next client's on a proxy's shared connection)
  local INNER = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #BODY .. "\r\n\r\n" .. BODY
  for _, case in ipairs({
    { "a Content-Length", "Content-Length: " .. #INNER .. "\r\n\r\n" .. INNER },
    { "a chunked body", ("Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"):format(#INNER, INNER) },
  }) do
    it("a HEAD with a body in " .. case[1] .. " is a 400 that closes the connection: nothing smuggled in it", function()
      local before = chats()
      local lines, _, text = ask("HEAD /health HTTP/1.1\r\nHost: x\r\n" .. case[2] .. SMUGGLED)
      assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
      assert.matches("\r\nConnection: close\r\n", text)
      assert.are.equal(before, chats())
    end)
  end

  it("a HEAD with Content-Length: 0 is served as any HEAD, and the request after it too", function()
    local lines = ask("HEAD /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" .. SMUGGLED)
    assert.are.same({ "HTTP/1.1 200 OK", "HTTP/1.1 200 OK" }, lines)
  end)

  -- (RFC 9112 6.1: an HTTP/1.0 message with a Transfer-Encoding has faulty framing, and the
  -- connection closes after it. It was read as chunked and the connection kept alive: an HTTP/1.0
  -- proxy in front, which knows no chunked, read the bytes after the body as the body's, and the
  -- gateway read them as the next request: a provider call the proxy never saw)
  it("an HTTP/1.0 request with Transfer-Encoding is a 400 that closes the connection: nothing smuggled after it",
    function()
      local before = chats()
      local lines, body, text = ask("POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\n" ..
        ("Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY) ..
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: " .. #BODY .. "\r\n\r\n" .. BODY)
      assert.are.same({ "HTTP/1.0 400 Bad Request" }, lines, text)
      assert.matches("HTTP/1.0", body.error.message, 1, true)
      assert.are.equal(before, chats())
    end)
end)
