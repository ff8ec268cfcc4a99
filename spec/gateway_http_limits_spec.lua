-- The gateway's HTTP front at its limits and its version: raw bytes (python3 sockets) at a real
-- `resil-lua gateway` in front of a real `resil-lua mock`, each a process of its own. What the
-- front refuses is refused at once, in the API's JSON error shape, and no provider is called.
local helpers = require "spec.helpers"
local resil = require "resil"
local json = resil.json

-- the bytes given, then (the write side kept open, as a client waiting for its answer does) the
-- connection read until the server closes it or 20 s pass ("TIMEOUT" then)
local RAW = [[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(20)
s.sendall(open(sys.argv[2], "rb").read())
out = b""
try:
    for part in iter(lambda: s.recv(65536), b""): out += part
except socket.timeout:
    out += b"TIMEOUT"
sys.stdout.buffer.write(out)
]]

local MAX_BODY = 1000

describe("the gateway's HTTP front, limits and versions", function()
  local client = helpers.write(helpers.tmpname(".py"), RAW)
  local port, mock_port, pids = nil, nil, {}

  lazy_setup(function()
    mock_port, port = helpers.free_ports(2)
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir)
    helpers.write(dir .. "/mock.lua", 'return { reply = "served" }')
    -- (read_timeout: the 408 a request not read in time got, well before RAW's 20 s)
    helpers.write(dir .. "/gw.lua", ([[
      require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
      require("policies.ai").configure("anthropic", { base_url = "http://127.0.0.1:%d", api_key = "sk-ant-test-123456" })
      return { auth = false, max_body = %d, read_timeout = 8, models = { fast = "openai/gpt-4o-mini" } }
    ]]):format(mock_port, mock_port, MAX_BODY))
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
    for line in r.stdout:gmatch("HTTP/%d%.%d %d%d%d[^\r]*") do lines[#lines + 1] = line end
    local body = r.stdout:match("^.-\r\n\r\n(.-)\n?$")
    local ok, decoded = pcall(json.decode, body or "")
    return lines, ok and decoded or nil, r.stdout
  end

  -- the chat calls the mock has answered so far (Messages calls too: route "messages")
  local function chats(route)
    local r = helpers.run(("curl -s http://127.0.0.1:%d/__mock/stats"):format(mock_port))
    return json.decode(r.stdout).routes[route or "chat"] or 0
  end

  local BODY = json.encode({ model = "fast", messages = { { role = "user", content = "hi" } } })
  local function head(path, version, extra)
    return ("POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n"):format(path, version, extra or "")
  end

  -- (before: libevent reads and drops a body past max_body before its 413: a client that held its
  -- body back, or sent less than it said, waited for the read deadline and got a 408; only an
  -- Expect: 100-continue got its 413 at once)
  for _, case in ipairs({
    { "a client that sends its headers and waits", "" },
    { "a client that sends less than it said", ("x"):rep(300) },
    { "a client that waits after an Expect: 100-continue (no 100 Continue for it)", "",
      "Expect: 100-continue\r\n" },
  }) do
    for _, api in ipairs({ { "/v1/chat/completions", "invalid_request_error", "request_too_large" },
      { "/v1/messages", "request_too_large" } }) do -- (Anthropic's errors have no code)
      it(api[1] .. ": a Content-Length past max_body is a 413 as its headers are read: " .. case[1], function()
        local before = chats()
        local lines, body, text = ask(head(api[1], "HTTP/1.1", ("Content-Length: %d\r\n%s"):format(MAX_BODY + 1,
          case[3] or "")) .. case[2])
        assert.are.same({ "HTTP/1.1 413 Request Entity Too Large" }, lines, text)
        assert.are.equal(api[2], body.error.type)
        assert.are.equal(api[3], body.error.code)
        assert.matches("larger than this server accepts %(1000 bytes%)", body.error.message)
        assert.matches("\r\nConnection: close\r\n", text)
        assert.are.equal(before, chats())
      end)
    end
  end

  it("a body past max_body sent whole is still a 413 (read to its end, so the client reads the 413, not a reset)", function()
    local lines, body, text = ask(head("/v1/chat/completions", "HTTP/1.1", ("Content-Length: %d\r\n"):format(50000)) ..
      ("x"):rep(50000))
    assert.are.same({ "HTTP/1.1 413 Request Entity Too Large" }, lines, text)
    assert.are.equal("request_too_large", body.error.code)
    -- an HTTP/1.0 client's, in its version
    lines = ask(head("/v1/chat/completions", "HTTP/1.0", ("Content-Length: %d\r\n"):format(MAX_BODY + 1)))
    assert.are.same({ "HTTP/1.0 413 Request Entity Too Large" }, lines)
    -- at max_body exactly, served
    local exact = BODY .. (" "):rep(MAX_BODY - #BODY)
    lines = ask(head("/v1/chat/completions", "HTTP/1.1", ("Content-Length: %d\r\nConnection: close\r\n"):format(#exact))
      .. exact)
    assert.are.same({ "HTTP/1.1 200 OK" }, lines)
  end)

  -- RFC 9110 2.5: a later HTTP/1 minor version is processed as the highest one the server speaks,
  -- and RFC 9112 2.3: the answer says that version. (before: "HTTP/1.2 200 OK", a version the
  -- gateway does not speak, and keep-alive read as HTTP/1.2's)
  for _, version in ipairs({ "HTTP/1.2", "HTTP/1.9" }) do
    it(version .. " is served as HTTP/1.1, and its answer says HTTP/1.1", function()
      local before = chats()
      local lines, body, text = ask(head("/v1/chat/completions", version,
        ("Content-Length: %d\r\nConnection: close\r\n"):format(#BODY)) .. BODY)
      assert.are.same({ "HTTP/1.1 200 OK" }, lines, text)
      assert.are.equal("served", body.choices[1].message.content)
      assert.are.equal(before + 1, chats())
    end)
  end

  -- RFC 9110 15.6.6: another major version is a 505 (before: libevent answered HTTP/2.0 a 400
  -- saying the request line was malformed, and took HTTP/0.9 for HTTP/1.0)
  for _, case in ipairs({
    { "HTTP/2.0", "GET /health HTTP/2.0\r\nHost: x\r\n\r\n" },
    { "HTTP/3.0", "GET /health HTTP/3.0\r\nHost: x\r\n\r\n" },
    { "HTTP/2.0", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" }, -- an h2c client's preface, over plain TCP
    { "HTTP/0.9", "GET /health HTTP/0.9\r\nHost: x\r\n\r\n" },
    { "HTTP/2.0", head("/v1/chat/completions", "HTTP/2.0", ("Content-Length: %d\r\n"):format(#BODY)) .. BODY },
  }) do
    it(case[2]:match("^[^\r]*") .. " is a 505 that closes the connection", function()
      local before = chats()
      local lines, body, text = ask(case[2] .. "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.are.same({ "HTTP/1.1 505 HTTP Version Not Supported" }, lines, text)
      assert.are.equal("invalid_request_error", body.error.type)
      assert.are.equal("HTTP version " .. case[1] .. " is not supported: this server speaks HTTP/1.1 (and HTTP/1.0)",
        body.error.message)
      assert.matches("\r\nConnection: close\r\n", text)
      assert.are.equal(before, chats())
    end)
  end

  -- RFC 9112 2.3: HTTP-version is "HTTP/" DIGIT "." DIGIT; libevent's sscanf took a sign, a second
  -- digit, a space (and answered "HTTP/1.-1 200 OK")
  for _, version in ipairs({ "HTTP/1.-1", "HTTP/+1.1", "HTTP/1.01", "HTTP/01.1", "HTTP/ 1.1", "http/1.1", "HTTP/1.1x" }) do
    it("a request line whose version is " .. version .. " is a 400 saying so", function()
      local before = chats()
      local lines, body, text = ask(head("/v1/chat/completions", version, ("Content-Length: %d\r\n"):format(#BODY)) ..
        BODY)
      assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
      assert.are.equal("a malformed request line: not method, target and HTTP/1.1, one space apart (RFC 9112 3)", body.error.message)
      assert.are.equal(before, chats())
    end)
  end

  -- (before: libevent refuses a second Transfer-Encoding as the head ends, and the 400 said "a
  -- malformed trailer after a chunked request body")
  for _, second in ipairs({ "chunked", "gzip" }) do
    it("Transfer-Encoding twice (chunked, then " .. second .. ") is a 400 that says so", function()
      local before = chats()
      local lines, body, text = ask(head("/v1/chat/completions", "HTTP/1.1",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: " .. second .. "\r\n") ..
        ("%x\r\n%s\r\n0\r\n\r\n"):format(#BODY, BODY))
      assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
      assert.are.equal("more than one Transfer-Encoding header (a request body is chunked once)", body.error.message)
      assert.matches("\r\nConnection: close\r\n", text)
      assert.are.equal(before, chats())
    end)
  end

  -- RFC 8259 8.1: JSON between systems is UTF-8, and OpenAI and Anthropic answer a body that is
  -- not a 400 invalid_request_error ("Your request contained invalid JSON: 'utf-8' codec can't
  -- decode byte ...", "The request body is not valid JSON: ..."). (before: cjson takes any byte in
  -- a string, and the body went upstream as it came, a provider call for the provider's 400)
  local function chat_body(api, content)
    return api == "openai" and ('{"model":"fast","messages":[{"role":"user","content":"%s"}]}'):format(content)
      or ('{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"user","content":"%s"}]}'):format(content)
  end
  for _, case in ipairs({
    { "a byte that is never UTF-8", "h\255i", 0xFF },
    { "a continuation byte alone", "h\128i", 0x80 },
    { "an overlong form of /", "h\192\175i", 0xC0 },
    { "an overlong three-byte form", "h\224\128\175i", 0xE0 },
    { "a surrogate (U+D800)", "h\237\160\128i", 0xED },
    { "a code point past U+10FFFF", "h\244\144\128\128i", 0xF4 },
    { "a sequence cut short", "h\230\151i", 0xE6 },
    { "a Latin-1 body (caf, then 0xE9)", "caf\233", 0xE9 },
  }) do
    for _, api in ipairs({ { "/v1/chat/completions", "openai", "chat" }, { "/v1/messages", "anthropic", "messages" } }) do
      it(api[1] .. ": " .. case[1] .. " in a string is a 400 before any provider is called", function()
        local before = chats(api[3])
        -- (past a run of ASCII longer than the check's 32-byte steps too)
        local body = chat_body(api[2], ("x"):rep(100) .. case[2])
        local lines, reply, text = ask(head(api[1], "HTTP/1.1", ("Content-Length: %d\r\n"):format(#body)) .. body)
        assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
        assert.are.equal("invalid_request_error", reply.error.type)
        local at = body:find("[\128-\255]") - 1 -- (the first byte past ASCII, offsets from 0)
        assert.are.equal(("the request body is not valid JSON: it is not UTF-8 (byte 0x%02X at offset %d)"):format(
          case[3], at), reply.error.message)
        assert.are.equal(before, chats(api[3]))
      end)
    end
  end

  it("UTF-8 of every length, U+FFFF and U+10FFFF too, is served as it came", function()
    local before = chats()
    local content = "caf\195\169 \230\151\165\230\156\172 \240\159\152\128 \239\191\191 \244\143\191\191"
    local body = chat_body("openai", content)
    local lines, reply, text = ask(head("/v1/chat/completions", "HTTP/1.1",
      ("Content-Length: %d\r\nConnection: close\r\n"):format(#body)) .. body)
    assert.are.same({ "HTTP/1.1 200 OK" }, lines, text)
    assert.are.equal("served", reply.choices[1].message.content)
    assert.are.equal(before + 1, chats())
  end)

  -- The front attacked (this session's own findings)

  -- (before: libevent answered CONNECT its 501 saying Connection: close, kept the connection open
  -- for CONNECT alone, and served what followed it, the tunnel's bytes, as requests)
  it("CONNECT is a 501 that closes the connection: nothing sent after it is served", function()
    local before = chats()
    local lines, body, text = ask("CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n" ..
      head("/v1/chat/completions", "HTTP/1.1", ("Content-Length: %d\r\nConnection: close\r\n"):format(#BODY)) .. BODY)
    assert.are.same({ "HTTP/1.1 501 Not Implemented" }, lines, text)
    assert.are.equal("a method this server does not serve", body.error.message)
    assert.matches("\r\nConnection: close\r\n", text)
    assert.are.equal(before, chats())
  end)

  -- (before: a request line's bytes that are not UTF-8 were echoed in the 404's message as
  -- they came, a body no strict JSON reader (RFC 8259 8.1) takes; and a model id's, "a\xFFb", was
  -- shown as 'a', another model's id)
  it("a path or a model id that is not UTF-8 is shown as UTF-8 in the 404 that names it", function()
    for _, case in ipairs({
      { "POST /v1/\xFF\xFE HTTP/1.1", "^no route POST /v1/\u{FFFD}\u{FFFD}$" },
      { "GET /v1/models/a\xFFb HTTP/1.1", "^The model 'a%?b' does not exist" },
      { "GET /v1/models/a%FFb HTTP/1.1", "^The model 'a%?b' does not exist" },
      { "PUT /v1/chat/completions\xFF HTTP/1.1", "^no route PUT /v1/chat/completions\u{FFFD}$" },
    }) do
      local lines, body, text = ask(case[1] .. "\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
      assert.are.same({ "HTTP/1.1 404 Not Found" }, lines, text)
      assert.is_table(body, text)
      assert.matches(case[2], body.error.message)
      assert.is_truthy(utf8.len(text:match("\r\n\r\n(.*)$")), text)
    end
  end)

  -- (before: libevent read "//x/metrics" as an authority x and the path /metrics, so a proxy in
  -- front that refused /metrics, or allowed /v1/ only, passed on what the gateway served as such)
  it("a request-target starting with // is that path (RFC 9112 3.2.1), not an authority and the rest", function()
    local lines, body, text = ask("GET //x/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.are.same({ "HTTP/1.1 404 Not Found" }, lines, text)
    assert.are.equal("no route GET //x/metrics", body.error.message)
    local before = chats()
    lines, body, text = ask(head("//x/v1/chat/completions", "HTTP/1.1",
      ("Content-Length: %d\r\nConnection: close\r\n"):format(#BODY)) .. BODY)
    assert.are.same({ "HTTP/1.1 404 Not Found" }, lines, text)
    assert.are.equal(before, chats())
    -- the absolute-form, which a server must accept (RFC 9112 3.2.2): its path
    lines = ask("GET http://x/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.are.same({ "HTTP/1.1 200 OK" }, lines)
  end)

  -- RFC 9112 5.2: an obs-fold is refused (400) or replaced by spaces. (before: replaced by
  -- libevent, where the scan for framing read the line before it alone: "Transfer-Encoding:
  -- chunked" folded onto ", gzip" was a 400 about a trailer; any other fold was served, read one
  -- way here and maybe another by a proxy in front)
  for _, case in ipairs({
    { "a header", "X-Note: a\r\n b\r\n" },
    { "Transfer-Encoding", "Transfer-Encoding: chunked\r\n\t, identity\r\n" },
    { "the first header line", " X-Note: a\r\n" },
  }) do
    it("a folded header line (" .. case[1] .. ") is a 400 saying so: nothing is called", function()
      local before = chats()
      local lines, body, text = ask(("POST /v1/chat/completions HTTP/1.1\r\n%sHost: x\r\nContent-Length: %d\r\n\r\n%s")
        :format(case[2], #BODY, BODY))
      assert.are.same({ "HTTP/1.1 400 Bad Request" }, lines, text)
      assert.are.equal("a header line folded onto the one before (obs-fold, RFC 9112 5.2)", body.error.message)
      assert.are.equal(before, chats())
    end)
  end

  -- RFC 9112 3: a request-target longer than the server parses MUST be a 414 (before: a 431, the
  -- headers' status)
  it("a request line of 1 MB is a 414 at once; headers past the limit are still a 431", function()
    local lines, body, text = ask("GET /" .. ("a"):rep(1024 * 1024) .. " HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.are.same({ "HTTP/1.1 414 URI Too Long" }, lines, text:sub(1, 300))
    assert.are.equal("the request line is longer than this server accepts (65536 bytes)", body.error.message)
    lines = ask("GET /health HTTP/1.1\r\nHost: x\r\n" .. ("X-Pad: " .. ("p"):rep(1000) .. "\r\n"):rep(80) .. "\r\n")
    assert.are.same({ "HTTP/1.1 431 Request Header Fields Too Large" }, lines)
  end)
end)
