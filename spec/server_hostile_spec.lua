-- Hostile tests of the host: the embedded server and --watch, driven the way
-- production drives them. Each case runs in a process of its own, since the
-- defects they show crash or hang the host.
local helpers = require "spec.helpers"
local resil = require "resil"

-- A process serving one handler; `path` asked with curl from here (the
-- server is another process: curl blocks this one's loop, never its).
-- -> curl's raw answer, whether the server is still alive after it, its output
local function serve_and_ask(handler_src, tasks, path, curl_opts, host_opts)
  local port = helpers.free_port()
  local pid, out = helpers.start(([[
local resil = require "resil"
local s
s = assert(resil.server.listen{ port = %d, tasks = %s, handler = %s })
print("listening")
io.stdout:flush()
while true do resil.sleep(3600) end
]]):format(port, tasks and "true" or "false", handler_src), "--log-level error " .. (host_opts or ""))
  assert(helpers.wait_until(function() return helpers.slurp(out):find("listening") ~= nil end, 5), "no server")
  -- "rawfile": path names a file of raw request bytes, sent as they are
  local client = curl_opts == "rawfile"
    and "python3 -c 'import socket,sys; s=socket.create_connection((\"127.0.0.1\",%d)); s.settimeout(3); " ..
        "s.sendall(open(\"%s\",\"rb\").read()); " ..
        "sys.stdout.buffer.write(b\"\".join(iter(lambda: s.recv(65536), b\"\")))'"
    or curl_opts == "raw"
    and "python3 -c 'import socket,sys; s=socket.create_connection((\"127.0.0.1\",%d)); s.settimeout(3); " ..
        "s.sendall(b\"GET %s HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n\"); " ..
        "sys.stdout.buffer.write(b\"\".join(iter(lambda: s.recv(65536), b\"\")))'"
    or "curl -s -i --max-time 3 " .. (curl_opts or "") .. " http://127.0.0.1:%d%s"
  local r = helpers.run(client:format(port, path))
  resil.sleep(0.2)
  local alive = helpers.alive(pid)
  os.execute("kill " .. pid .. " 2>/dev/null")
  return { stdout = r.stdout, alive = alive, output = helpers.slurp(out) }
end

-- Clients that send pipelined requests and hang up (a reset, or a close)
-- before the answers: the server's next write to such a socket raised
-- SIGPIPE, whose default killed the whole process (exit 141, nothing
-- logged). The gateway is started with SIGPIPE at its default, as a shell or
-- a supervisor starts it (this spec's own host ignores it, and would pass
-- that on).
local HANGUP_CLIENTS = [[
import socket, sys, threading, time
port, until = int(sys.argv[1]), time.time() + float(sys.argv[2])
ask = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 16
def client(n):
    while time.time() < until:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(ask)
            if n % 2: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            s.close()
        except OSError:
            time.sleep(0.01)
threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
for t in threads: t.start()
for t in threads: t.join()
]]

-- `resil-lua gateway` in a folder of its own, started by `sh` after `setup`
-- (a `ulimit`), through `wrapper` (an `env`); stopped after the test -> its
-- port, the folder, its pid
local function gateway_in_folder(setup, wrapper, config)
  local port = helpers.free_port()
  local dir = helpers.tmpname("")
  os.execute("mkdir -p " .. dir)
  helpers.write(dir .. "/gw.lua", config)
  os.execute(("(%s exec %s %s gateway --listen 127.0.0.1:%d --config %s/gw.lua --store %s/s.db > %s/gw.out " ..
    "2> %s/gw.err) & echo $! > %s/gw.pid"):format(setup, wrapper, helpers.resil, port, dir, dir, dir, dir, dir))
  local pid = helpers.slurp(dir .. "/gw.pid"):match("%d+")
  finally(function() os.execute("kill " .. pid .. " 2>/dev/null") end)
  assert.is_true(helpers.wait_until(function() return helpers.slurp(dir .. "/gw.out"):find("listening") ~= nil end, 10))
  return port, dir, pid
end

describe("the gateway under clients that hang up", function()
  it("survives writes to sockets their peers reset (SIGPIPE), and answers afterwards", function()
    local port, dir, pid = gateway_in_folder("", "env --default-signal=PIPE", "return { auth = true }")
    local out = dir .. "/gw.err"
    helpers.write(dir .. "/hangup.py", HANGUP_CLIENTS)
    helpers.run(("python3 %s/hangup.py %d 3"):format(dir, port))
    assert.is_true(helpers.alive(pid), "the gateway died: " .. helpers.slurp(out))
    local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/health"):format(port))
    assert.matches("ok", r.stdout)
  end)
end)

describe("the host's SIGPIPE", function()
  -- (caught, not ignored: an ignored signal stays ignored across exec, and a policy's
  -- `producer | head -1` pipeline then never ended)
  it("is at its default in the programs a script starts", function()
    local r = helpers.run(("env --default-signal=PIPE %s -e %q"):format(helpers.resil, [[
      local p = io.popen("grep SigIgn /proc/self/status")
      local mask = tonumber(p:read("a"):match("SigIgn:%s*(%x+)"), 16)
      p:close()
      print(mask & (1 << 12) == 0 and "default" or "ignored")
    ]]))
    assert.are.equal("default\n", r.stdout, r.stderr)
  end)
end)

-- At the open-files limit accept() fails with EMFILE while the listening
-- socket stays readable: libevent's listener retried at once, forever (a
-- core at 100 % and megabytes of "[warn] Error from accept() call" a second
-- on stderr). It rests and says so once, through resil.log.
local IDLE_CLIENTS = [[
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    try: held.append(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1))
    except OSError: pass
time.sleep(float(sys.argv[3]))
]]

describe("the gateway at its open-files limit", function()
  it("rests and logs once instead of retrying accept() in a loop; it serves again when files free up", function()
    local port, dir = gateway_in_folder("ulimit -n 64;", "", "return { auth = false }")
    local err = dir .. "/gw.err"
    helpers.write(dir .. "/idle.py", IDLE_CLIENTS)
    helpers.run(("python3 %s/idle.py %d 100 2"):format(dir, port)) -- 100 connections held 2 s, past the limit
    local log = helpers.slurp(err)
    local _, said = log:gsub("cannot accept connections", "")
    assert.are.equal(1, said, log:sub(1, 300))
    assert.is_nil(log:find("Error from accept", 1, true), "libevent's own warnings: " .. #log .. " bytes")
    assert.matches("Too many open files", log)
    assert.matches('"status":"ok"', helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/health"):format(port)).stdout)
  end)
end)

describe("the embedded server, hostile handlers", function()
  -- an admin endpoint that stops its own server (a /shutdown route) is a
  -- plain use of the API; it must not crash the host
  it("a handler (tasks = false) that closes its own server does not crash the host", function()
    local r = serve_and_ask([[function(req) s:close(); return { status = 200, body = "bye" } end]], false, "/close")
    assert.is_true(r.alive, "the host died: " .. r.output)
  end)

  it("a handler (tasks = false) with a delayed reply that closes its server does not crash the host", function()
    local r = serve_and_ask([[function(req) s:close(); return { status = 200, body = "bye", delay = 0.05 } end]],
      false, "/close")
    assert.is_true(r.alive, "the host died: " .. r.output)
  end)

  -- nobody keeps the server object: a GC cycle inside the handler runs its __gc
  it("a server collected while its handler runs does not crash the host", function()
    local r = helpers.run_script([[
local resil = require "resil"
local port
do
  local s = assert(resil.server.listen{ port = 0, handler = function(req)
    collectgarbage(); collectgarbage()
    return { status = 200, body = "ok" }
  end })
  port = s:port()
end
local res, err = resil.http.request{ url = "http://127.0.0.1:" .. port .. "/", timeout = 2 }
print(res and res.status, err and err.kind)
]], "--log-level error")
    assert.are.equal(0, r.code, r.stderr)
  end)

  -- a reply table whose fields are read through a metamethod that fails:
  -- tasks = false answers 500; tasks = true must too, not leave the client hanging
  it("a task handler whose reply table errors when read answers 500 (it does not hang the client)", function()
    local r = serve_and_ask(
      [[function(req) return setmetatable({}, { __index = function(_, k) error("no field " .. k) end }) end]],
      true, "/x")
    assert.is_true(r.alive, r.output)
    assert.matches("^HTTP/1.1 500", r.stdout)
  end)

  it("a task handler whose reply runs past --max-instructions while read answers 500", function()
    local r = serve_and_ask(
      [[function(req) return setmetatable({}, { __index = function() while true do end end }) end]],
      true, "/x", nil, "--max-instructions 100000")
    assert.is_true(r.alive, r.output)
    assert.matches("^HTTP/1.1 500", r.stdout)
  end)

  it("a status outside 100..599 is not sent as a malformed status line", function()
    for _, status in ipairs({ 0, -5, 99, 1000 }) do
      local r = serve_and_ask(("function(req) return { status = %d, body = 'x' } end"):format(status), false, "/")
      assert.matches("^HTTP/1.1 [1-5]%d%d ", r.stdout, "status " .. status)
    end
  end)

  -- a header name is a token: one with ": " or "" makes a header the handler never named
  it("a header name with a colon does not inject another header: the reply is the handler's 500", function()
    local r = serve_and_ask([[function(req) return { headers = { ["Set-Cookie: admin=1; x"] = "y" }, body = "x" } end]],
      false, "/")
    assert.matches("^HTTP/1.1 500", r.stdout)
    assert.is_nil(r.stdout:lower():find("\nset%-cookie:"), r.stdout)
    assert.matches("is not a token", r.output)
  end)

  -- a 204 has no body; bytes after its head are read as the next reply on a kept-alive connection
  it("a 204 or 304 reply sends no body bytes", function()
    for _, status in ipairs({ 204, 304 }) do
      local r = serve_and_ask(("function(req) return { status = %d, body = 'smuggled' } end"):format(status), false, "/",
        "raw")
      assert.matches("^HTTP/1.1 %d", r.stdout)
      assert.is_nil(r.stdout:find("smuggled"), r.stdout)
    end
  end)

  -- a task handler that echoes what it saw, asked with these raw bytes
  local function ask_raw(bytes)
    return serve_and_ask("function(req) return { status = 200, body = 'seen ' .. req.path .. ' ' .. req.body } end",
      true, helpers.write(helpers.tmpname(".bin"), bytes), "rawfile")
  end

  -- Request smuggling: a front proxy that reads the last Content-Length
  -- forwards 40 bytes as one request's body; read by the first, those bytes
  -- held a second request that reached the handler unseen by the proxy
  it("a request with conflicting Content-Length headers is a 400 that closes the connection", function()
    local r = ask_raw("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n" ..
      "helloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.matches("^HTTP/1.1 400", r.stdout)
    assert.matches("Content%-Length", r.stdout)
    assert.is_nil(r.stdout:find("seen"), r.stdout) -- neither request reached the handler
    assert.is_true(r.alive)
    -- an API error in OpenAI's shape (the path is not Anthropic's): {error = {message, type, param, code}}
    local body = require("resil").json.decode(r.stdout:match("\r\n\r\n(.*)$"))
    assert.are.equal("invalid_request_error", body.error.type)
    assert.are.equal("conflicting Content-Length headers", body.error.message)
  end)

  -- framings a proxy in front may read otherwise than libevent does: each
  -- is refused, with the connection closed, before the bytes after it are
  -- read as a request
  for _, case in ipairs({
    { "a Content-Length that is not digits", "Content-Length: +5\r\n", "^HTTP/1.1 400" },
    { "whitespace between a header name and its colon", "Content-Length : 5\r\n", "^HTTP/1.1 400" },
    { "a Transfer-Encoding other than chunked", "Transfer-Encoding: xchunked\r\n", "^HTTP/1.1 501" },
  }) do
    it(case[1] .. " is refused and closes the connection (no request smuggled after it)", function()
      local r = ask_raw("POST /a HTTP/1.1\r\nHost: x\r\n" .. case[2] .. "\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.matches(case[3], r.stdout)
      assert.is_nil(r.stdout:find("seen"), r.stdout)
      assert.is_nil(r.stdout:find("HTTP/1.1.*HTTP/1.1"), r.stdout) -- one answer: the connection closed after it
      assert.is_true(r.alive)
    end)
  end

  it("a Content-Length after a tab (optional whitespace, RFC 9110) is its length, served as usual", function()
    -- (before: "Content-Length is not a number", a 400 to a client whose header was valid)
    local r = ask_raw("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length:\t5\r\nContent-Length: 5\r\n" ..
      "Connection: close\r\n\r\nhello")
    assert.matches("^HTTP/1.1 200", r.stdout)
    assert.matches("seen /a hello", r.stdout)
  end)

  it("repeated equal Content-Length headers are one length (RFC 9112), served as usual", function()
    local r = ask_raw("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n" ..
      "Connection: close\r\n\r\nhello")
    assert.matches("^HTTP/1.1 200", r.stdout)
    assert.matches("seen /a hello", r.stdout)
  end)
end)

describe("the embedded server, HEAD requests", function()
  -- (libevent writes a HEAD reply's body as it is given, without a Content-Length: a client
  -- that kept the connection read those bytes as the start of its next reply)
  local HEAD_THEN_GET = "HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
  for _, case in ipairs({
    { "a handler's reply", false, "function(req) return { status = 404, body = 'body of ' .. req.path } end" },
    { "a task's reply", true, "function(req) return { status = 404, body = 'body of ' .. req.path } end" },
    { "a reply in chunks", false, "function(req) return { status = 200, chunks = { 'body ', 'of ' .. req.path } } end" },
    { "a streamed reply", true, "function(req) return { status = 200, stream = function(write) " ..
      "write('body of '); write(req.path) end } end" },
  }) do
    it(case[1] .. " has no body: the next reply on the connection is read as it was sent", function()
      local r = serve_and_ask(case[3], case[2], helpers.write(helpers.tmpname(".bin"), HEAD_THEN_GET), "rawfile")
      local head, rest = r.stdout:match("^(HTTP/1.1 %d+ [^\r]*\r\n.-\r\n\r\n)(.*)$")
      assert.truthy(head, r.stdout)
      assert.is_nil(head:lower():find("transfer%-encoding"), r.stdout)
      assert.matches("^HTTP/1.1 %d+ ", rest) -- GET /b's reply, not the body of HEAD /a
      assert.is_nil(r.stdout:find("/a", 1, true), r.stdout)
      assert.truthy(rest:find("/b", 1, true), r.stdout)
      assert.is_true(r.alive)
    end)
  end
end)

-- A name sent twice (a proxy that adds its own Authorization, a client that sends two): taken
-- as the last, the handler used one credential while a proxy in front, reading the first as
-- Node, Go and nginx do, had checked the other
describe("the embedded server, a header sent twice", function()
  it("is one field of both values, joined in order (a cookie's with '; '); a name sent once is as sent", function()
    local raw = "GET /h HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nX-Once: 1\r\n" ..
      "authorization: Bearer other\r\nCookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n\r\n"
    local r = serve_and_ask("function(req) return { status = 200, body = req.headers.authorization .. '|' .. " ..
      "req.headers.cookie .. '|' .. req.headers['x-once'] } end", false,
      helpers.write(helpers.tmpname(".bin"), raw), "rawfile")
    assert.matches("\r\n\r\nBearer good, Bearer other|a=1; b=2|1$", r.stdout)
    assert.is_true(r.alive)
  end)
end)

describe("--watch as deploys change files", function()
  local function start_server(cwd, opts)
    local port = helpers.free_port()
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
local p = resil.policy("p")
local s = assert(resil.server.listen{ port = %d, handler = function(req) return p.handle(req) end })
while true do resil.sleep(3600) end
]]):format(port))
    local out = helpers.tmpname(".out")
    local pidfile = helpers.tmpname(".pid")
    os.execute(("cd %s && exec %s --watch %s %s > %s 2>&1 & echo $! > %s"):format(cwd, helpers.resil, opts, script,
      out, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    local function ask()
      local res = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(port), timeout = 2 })
      return res and res.body
    end
    assert(helpers.wait_until(function() return ask() ~= nil end, 5), "the server did not start")
    return pid, ask
  end
  local function version(dir, v)
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/p.lua", ("return { handle = function() return { body = %q } end }"):format(v))
  end

  -- capistrano & co: releases/N, and `current` swapped atomically with rename(2)
  it("follows an atomic symlink swap of the release holding --policies", function()
    local root = helpers.tmpname("-deploy")
    version(root .. "/releases/1/policies", "v1")
    version(root .. "/releases/2/policies", "v2")
    assert(os.execute(("cd %s && ln -sfn releases/1 current"):format(root)))
    local pid, ask = start_server(root, "--policies current/policies")
    assert.are.equal("v1", ask())
    assert(os.execute(("cd %s && ln -sfn releases/2 current.tmp && mv -T current.tmp current"):format(root)))
    local swapped = helpers.wait_until(function() return ask() == "v2" end, 3)
    -- and an edit of the live release is noticed
    version(root .. "/releases/2/policies", "v2-edited")
    local edited = helpers.wait_until(function() return ask() == "v2-edited" end, 3)
    os.execute("kill " .. pid)
    assert.is_true(swapped, "the swap to release 2 was not noticed")
    assert.is_true(edited, "an edit of the live release was not noticed")
  end)

  it("keeps watching a policies folder that was replaced (rm -rf; mv new into place)", function()
    local root = helpers.tmpname("-replace")
    version(root .. "/policies", "A")
    local pid, ask = start_server(root, "")
    assert.are.equal("A", ask())
    version(root .. "/policies.new", "B")
    assert(os.execute(("cd %s && rm -rf policies && mv policies.new policies"):format(root)))
    assert(helpers.wait_until(function() return ask() == "B" end, 3))
    version(root .. "/policies", "C") -- an edit after the replacement
    local edited = helpers.wait_until(function() return ask() == "C" end, 3)
    os.execute("kill " .. pid)
    assert.is_true(edited, "an edit in the new policies folder was not noticed")
  end)
end)

describe("the command line, hostile", function()
  it("--metrics-addr on a port in use names the reason", function()
    local port = helpers.free_port()
    local r = helpers.run_script(([[
local resil = require "resil"
local s = assert(resil.server.listen{ port = %d, handler = function() return {} end })
local f = io.popen(%q)
io.write(f:read("a"))
f:close()
]]):format(port, ("%s --metrics-addr 127.0.0.1:%d -e 'print(1)' 2>&1"):format(helpers.resil, port)), "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("in use", r.stdout)
  end)
end)

-- The server's own refusals (libevent's 413, rewritten as an API error typed by the request's
-- path) to clients whose request line comes in pieces: a proxy or a TLS terminator that writes
-- it in more than one TCP segment, or one that comes behind a reply on a kept-alive connection
describe("the server's own refusals, to a request line sent in pieces", function()
  -- each argument after the port is sent as a TCP segment of its own, 0.2 s apart -> what came back
  local PIECES = [[
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(5)
for piece in sys.argv[2:]:
    s.sendall(piece.encode().decode("unicode_escape").encode("latin1"))
    time.sleep(0.2)
sys.stdout.buffer.write(b"".join(iter(lambda: s.recv(65536), b"")))
]]
  local client = helpers.write(helpers.tmpname(".py"), PIECES)
  local BODY = "Host: x\\r\\nContent-Length: 500\\r\\n\\r\\n" .. ("x"):rep(500)

  for _, case in ipairs({
    { "split inside its path", { "POST /v1/mes", "sages HTTP/1.1\\r\\n" .. BODY } },
    { "split after its method", { "POST ", "/v1/messages/count_tokens HTTP/1.1\\r\\n" .. BODY } },
    { "behind a reply, split", { "GET /a HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nPOST /v1/m", "essages HTTP/1.1\\r\\n" .. BODY } },
  }) do
    it(case[1] .. ": a 413 typed as Anthropic's API types it, under /v1/messages", function()
      local port = helpers.free_port()
      local pid, out = helpers.start(([[
local resil = require "resil"
local s = assert(resil.server.listen{ port = %d, max_body = 100, handler = function(req) return { body = "ok" } end })
print("listening")
io.stdout:flush()
while true do resil.sleep(3600) end
]]):format(port), "--log-level error")
      finally(function() os.execute("kill " .. pid .. " 2>/dev/null") end)
      assert(helpers.wait_until(function() return helpers.slurp(out):find("listening") ~= nil end, 5), "no server")
      local args = {}
      for i, piece in ipairs(case[2]) do args[i] = ("'%s'"):format(piece) end
      local r = helpers.run(("python3 %s %d %s"):format(client, port, table.concat(args, " ")))
      local head, body = r.stdout:match("(HTTP/1.1 413 [^\r]*\r\n.-\r\n\r\n)(.*)$")
      assert.is_not_nil(head, r.stdout .. r.stderr)
      assert.are.equal(#body, tonumber(head:match("Content%-Length: (%d+)")))
      -- (before: "invalid_request_error", OpenAI's type: the path was read from the first segment only)
      -- (and in Anthropic's shape: no code, its request id in the body as in its header)
      local decoded = resil.json.decode(body)
      assert.are.equal("request_too_large", decoded.error.type)
      assert.is_nil(decoded.error.code)
      assert.are.equal(head:match("\r\nrequest%-id: (req_%x+)\r\n"), decoded.request_id)
    end)
  end
end)

-- What libevent 2.1 refuses with one status for two reasons (its 400 for headers past max_headers
-- and for malformed ones; its 413 for a body past max_body and for a malformed chunk), what it
-- leaves waiting (an Expect: 100-continue past max_body: it reads the body the client holds back
-- until the 100 Continue), and the HTTP version it refuses an HTTP/1.0 request in
describe("the server's own refusals, where libevent's status does not say why", function()
  -- the raw bytes given (\r\n written as such) sent, the connection then read to its end (10 s
  -- at most: the server's read_timeout, 3 s, answers a request it waits on with a 408 first)
  local RAW = [[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
s.sendall(sys.argv[2].encode().decode("unicode_escape").encode("latin1"))
sys.stdout.buffer.write(b"".join(iter(lambda: s.recv(65536), b"")))
]]
  local client = helpers.write(helpers.tmpname(".py"), RAW)
  local port, pid
  lazy_setup(function()
    port = helpers.free_port()
    local out
    pid, out = helpers.start(([[
local resil = require "resil"
local s = assert(resil.server.listen{ port = %d, max_body = 100, max_headers = 300, read_timeout = 3,
  handler = function(req) return { body = "seen " .. req.body } end })
print("listening")
io.stdout:flush()
while true do resil.sleep(3600) end
]]):format(port), "--log-level error")
    assert(helpers.wait_until(function() return helpers.slurp(out):find("listening") ~= nil end, 5), "no server")
  end)
  lazy_teardown(function() os.execute("kill " .. pid .. " 2>/dev/null") end)

  -- -> the status line, the JSON error (or the body), the whole answer
  local function ask(bytes)
    local r = helpers.run(("python3 %s %d '%s'"):format(client, port, bytes))
    local line, body = r.stdout:match("^([^\r]*)\r\n.-\r\n\r\n(.*)$")
    assert.is_not_nil(line, r.stdout .. r.stderr)
    local ok, decoded = pcall(resil.json.decode, body)
    return line, ok and decoded or body, r.stdout
  end
  local CHUNKED = "POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n"

  it("a malformed chunk size is a 400 saying so, not a 413 (the body is 5 bytes)", function()
    local line, body = ask(CHUNKED .. "zz\\r\\nhello\\r\\n0\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 400 Bad Request", line)
    assert.are.equal("invalid_request_error", body.error.type)
    assert.matches("malformed chunked request body", body.error.message)
  end)

  it("a chunk size line that does not end is a 400 once past 4 KB, not buffered to the deadline", function()
    -- (before: libevent buffered the line and searched all of it for its end at each read, until
    -- the read deadline's 408: one client sending 1s held the loop's CPU and tens of MB)
    local line, body = ask(CHUNKED .. ("1"):rep(64 * 1024))
    assert.are.equal("HTTP/1.1 400 Bad Request", line)
    assert.matches("chunk size line longer than 4096 bytes", body.error.message)
    -- one at the limit, ended, is libevent's to read (a size that long: its 413)
    line = ask(CHUNKED .. ("0"):rep(4095) .. "5\\r\\nhello\\r\\n0\\r\\n\\r\\n")
    assert.are_not.equal("HTTP/1.1 400 Bad Request", line)
  end)

  it("a chunked body past max_body is still a 413; one within it is served", function()
    local line, body = ask(CHUNKED .. "5\\r\\nhello\\r\\nff\\r\\n" .. ("x"):rep(255) .. "\\r\\n0\\r\\n\\r\\n")
    assert.matches("^HTTP/1.1 413", line)
    assert.are.equal("request_too_large", body.error.code)
    local ok_line, seen = ask(CHUNKED:gsub("\\r\\n\\r\\n$", "\\r\\nConnection: close\\r\\n\\r\\n")
      .. "5\\r\\nhello\\r\\n3\\r\\n, a\\r\\n0\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 200 OK", ok_line)
    assert.are.equal("seen hello, a", seen)
  end)

  it("headers past max_headers are a 431; a malformed header line within it stays a 400", function()
    local line, body = ask("GET /a HTTP/1.1\\r\\nHost: x\\r\\nX-Big: " .. ("a"):rep(400) .. "\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 431 Request Header Fields Too Large", line)
    assert.are.equal("invalid_request_error", body.error.type)
    assert.matches("headers are larger than this server accepts %(300 bytes%)", body.error.message)
    -- a head whose end has not come (libevent counts what is there)
    line = ask("GET /a HTTP/1.1\\r\\nHost: x\\r\\nX-Big: " .. ("a"):rep(400))
    assert.are.equal("HTTP/1.1 431 Request Header Fields Too Large", line)
    line, body = ask("GET /a HTTP/1.1\\r\\nHost: x\\r\\nnot a header\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 400 Bad Request", line)
    assert.matches("malformed request line or header", body.error.message)
  end)

  it("Expect: 100-continue with a Content-Length past max_body: the 413 at once, no body awaited", function()
    -- (before: no answer until the read timeout's 408: libevent waited for the body)
    local line, body = ask("POST /v1/messages HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 500\\r\\n" ..
      "Expect: 100-continue\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 413 Request Entity Too Large", line)
    assert.are.equal("request_too_large", body.error.type)
    -- curl waits for the 100 Continue (here up to 30 s) before it sends a body that large
    local big = helpers.write(helpers.tmpname(".json"), ("x"):rep(500))
    local r = helpers.run(("curl -s -i --expect100-timeout 30 --max-time 20 -H 'Expect: 100-continue' " ..
      "--data-binary @%s http://127.0.0.1:%d/v1/chat/completions"):format(big, port))
    assert.matches("^HTTP/1.1 413", r.stdout)
    assert.matches('"code":"request_too_large"', r.stdout)
    -- a client that sends the body anyway gets the one 413, and the connection closes after it
    local _, _, whole = ask("POST /a HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 500\\r\\nExpect: 100-continue\\r\\n\\r\\n"
      .. ("x"):rep(500) .. "GET /smuggled HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    assert.matches("^HTTP/1.1 413", whole)
    assert.is_nil(whole:find("HTTP/1.1.*HTTP/1.1"), whole)
    -- within max_body: the 100 Continue, then the reply
    local r2 = helpers.run(("curl -s -i --expect100-timeout 30 --max-time 20 -H 'Expect: 100-continue' " ..
      "--data-binary 'hello' http://127.0.0.1:%d/a"):format(port))
    assert.matches("^HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK", r2.stdout)
    assert.matches("seen hello$", r2.stdout)
  end)

  it("Expect: 100-continue with a Content-Length within max_body in many digits is served, not refused", function()
    -- (before: a length in more than 18 digits was taken for one past max_body: the 413 went out
    -- and the connection was shut, yet libevent read the length as 5 and ran the handler on the
    -- body sent with the head: a request served, a gateway's call billed, that its client saw refused)
    local line, seen = ask("POST /a HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0000000000000000000005\\r\\n" ..
      "Expect: 100-continue\\r\\nConnection: close\\r\\n\\r\\nhello")
    assert.are.equal("HTTP/1.1 200 OK", line)
    assert.are.equal("seen hello", seen)
    -- one that many digits long and past max_body is still the 413 at once
    line = ask("POST /a HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0000000000000000000500\\r\\n" ..
      "Expect: 100-continue\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 413 Request Entity Too Large", line)
  end)

  it("an HTTP/1.0 request is refused in HTTP/1.0, as it is answered", function()
    for _, case in ipairs({
      { "POST /a HTTP/1.0\\r\\nContent-Length: 500\\r\\n\\r\\n" .. ("x"):rep(500), "^HTTP/1.0 413 " },
      { "GET /a HTTP/1.0\\r\\nX-Big: " .. ("a"):rep(400) .. "\\r\\n\\r\\n", "^HTTP/1.0 431 " },
      { "GET /a HTTP/1.0\\r\\nnot a header\\r\\n\\r\\n", "^HTTP/1.0 400 " },
      { "POST /a HTTP/1.0\\r\\nContent-Length: 50\\r\\n\\r\\nx", "^HTTP/1.0 408 " }, -- (the body never whole)
      { "GET /a HTTP/1.0\\r\\n\\r\\n", "^HTTP/1.0 200 " },
    }) do
      local line = ask(case[1])
      assert.matches(case[2], line)
    end
  end)

  -- RFC 9112 3.2: a server answers a 400 to an HTTP/1.1 request without Host, and to any with two
  -- (before: served; which host a request is for is what a proxy in front may read otherwise)
  it("an HTTP/1.1 request without Host, with two, or with one that is not a host, is a 400 saying so; HTTP/1.0 needs none", function()
    for _, version in ipairs({ "1.1", "1.2" }) do
      local line, body = ask("GET /a HTTP/" .. version .. "\\r\\nConnection: close\\r\\n\\r\\n")
      assert.are.equal("HTTP/1.1 400 Bad Request", line)
      assert.are.equal("an HTTP/1.1 request without a Host header (RFC 9112 3.2)", body.error.message)
    end
    local line, body = ask("GET /a HTTP/1.1\\r\\nHost: x\\r\\nhost: y\\r\\nConnection: close\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 400 Bad Request", line)
    assert.are.equal("more than one Host header (RFC 9112 3.2)", body.error.message)
    line, body = ask("GET /a HTTP/1.0\\r\\nHost: x\\r\\nHost: y\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.0 400 Bad Request", line)
    line, body = ask("GET /a HTTP/1.0\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.0 200 OK", line)
    assert.are.equal("seen ", body)
    -- (an empty Host is the one a request for a target without an authority sends)
    line, body = ask("GET /a HTTP/1.1\\r\\nHost:\\r\\nConnection: close\\r\\n\\r\\n")
    assert.are.equal("HTTP/1.1 200 OK", line)
    -- (a tab before the value is its optional whitespace, RFC 9112 5.1: libevent drops spaces alone)
    for _, host in ipairs({ "[::1]:8080", "api.example.com", "127.0.0.1:80", "\\tapi.example.com" }) do
      line = ask("GET /a HTTP/1.1\\r\\nHost: " .. host .. "\\r\\nConnection: close\\r\\n\\r\\n")
      assert.are.equal("HTTP/1.1 200 OK", line, host)
    end
    for _, host in ipairs({ "a b", "evil.com/x", "user@evil.com", "x\\ty" }) do
      line, body = ask("GET /a HTTP/1.1\\r\\nHost: " .. host .. "\\r\\nConnection: close\\r\\n\\r\\n")
      assert.are.equal("HTTP/1.1 400 Bad Request", line, host)
      assert.are.equal("a Host header that is not a host and port (RFC 9112 3.2)", body.error.message)
    end
  end)

  -- RFC 9112 2.3: a later HTTP/1 minor version is answered in HTTP/1.1, its 100 Continue too (before:
  -- "HTTP/1.2 100 Continue", then "HTTP/1.1 200 OK")
  it("the 100 Continue to an HTTP/1.2 request says HTTP/1.1, as the reply after it does", function()
    local script = helpers.write(helpers.tmpname(".py"), [[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
s.sendall(b"POST /a HTTP/1.2\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
interim = s.recv(65536)
s.sendall(b"hello")
sys.stdout.buffer.write(interim + b"".join(iter(lambda: s.recv(65536), b"")))
]])
    local r = helpers.run(("python3 %s %d"):format(script, port))
    assert.matches("^HTTP/1%.1 100 Continue\r\n\r\nHTTP/1%.1 200 OK\r\n", r.stdout)
    assert.matches("seen hello$", r.stdout)
  end)
end)
