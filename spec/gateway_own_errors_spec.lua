-- The errors the gateway's HTTP front answers itself, before any handler runs (a body past
-- max_body, headers past the limit, a request not read in time, a malformed one): in the shape of
-- the API the request speaks, with a request id, as every answer the handler makes has. Raw
-- bytes (python3 sockets) at a real `resil-lua gateway`; what the SDKs make of them: spec/sdk/wire.mjs.
-- (before: one hybrid JSON shape for both APIs and no request id at all: an SDK's
-- error.requestID was undefined on these alone, and a support ticket had nothing to quote)
local helpers = require "spec.helpers"
local resil = require "resil"
local json = resil.json

-- the bytes given, then the connection read until the server closes it or 20 s pass
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

describe("the gateway's own errors", function()
  local client = helpers.write(helpers.tmpname(".py"), RAW)
  local port, kill

  lazy_setup(function()
    local log
    -- (no provider is called: each request here is refused before its handler)
    local _
    _, port, log = helpers.gateway_with_config(([[
      return { auth = false, max_body = %d, read_timeout = 1, models = { fast = "openai/gpt-4o-mini" } }
    ]]):format(MAX_BODY), function(fn) kill = fn end)
    assert(helpers.wait_until(function() return helpers.slurp(log):find("listening") ~= nil end, 10),
      helpers.slurp(log))
  end)
  lazy_teardown(function() if kill then kill() end end)

  -- -> the status line, the headers (lower-cased names), the JSON body, the whole text
  local function ask(bytes)
    local r = helpers.run(("python3 %s %d %s"):format(client, port, helpers.write(helpers.tmpname(".bin"), bytes)))
    local status = r.stdout:match("^(HTTP/%d%.%d %d%d%d[^\r]*)")
    local head, body = r.stdout:match("^(.-)\r\n\r\n(.*)$")
    local headers = {}
    for name, value in (head or ""):gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do headers[name:lower()] = value end
    local ok, decoded = pcall(json.decode, body or "")
    return status, headers, ok and decoded or nil, r.stdout
  end

  local function head(path, extra)
    return ("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n"):format(path, extra or "")
  end

  local CASES = {
    { "a Content-Length past max_body", 413, "request_too_large", "invalid_request_error",
      function(path) return head(path, ("Content-Length: %d\r\n"):format(MAX_BODY + 1)) end },
    { "a body past max_body, sent chunked", 413, "request_too_large", "invalid_request_error",
      function(path) return head(path, "Transfer-Encoding: chunked\r\n") .. ("%x\r\n%s\r\n0\r\n\r\n")
        :format(MAX_BODY + 10, ("x"):rep(MAX_BODY + 10)) end },
    { "headers past the limit", 431, "invalid_request_error", "invalid_request_error",
      function(path) return head(path, ("X-Pad: " .. ("p"):rep(1000) .. "\r\n"):rep(80)) end },
    { "a request not read in time", 408, "invalid_request_error", "invalid_request_error",
      function(path) return head(path, "Content-Length: 10\r\n") .. "{" end },
    { "a malformed chunk", 400, "invalid_request_error", "invalid_request_error",
      function(path) return head(path, "Transfer-Encoding: chunked\r\n") .. "zz\r\n" end },
    { "a header line folded", 400, "invalid_request_error", "invalid_request_error",
      function(path) return head(path, "X-A: 1\r\n b\r\nContent-Length: 2\r\n") .. "{}" end },
  }
  for _, case in ipairs(CASES) do
    local what, status, anthropic_type, openai_type, bytes = table.unpack(case)
    it(what .. ": Anthropic's error shape under /v1/messages, with its request id in the body and both headers",
      function()
        local line, headers, body, text = ask(bytes("/v1/messages"))
        assert.matches("^HTTP/1.1 " .. status, line or "", 1, false, text:sub(1, 400))
        assert.matches("^req_%x+$", headers["x-request-id"] or "", nil, false, text:sub(1, 400))
        assert.are.equal(headers["x-request-id"], headers["request-id"])
        assert.are.same({ type = "error", request_id = headers["x-request-id"],
          error = { type = anthropic_type, message = body.error.message } }, body)
        assert.is_string(body.error.message)
      end)
    it(what .. ": OpenAI's error shape elsewhere, with its request id in x-request-id", function()
      local line, headers, body, text = ask(bytes("/v1/chat/completions"))
      assert.matches("^HTTP/1.1 " .. status, line or "", 1, false, text:sub(1, 400))
      assert.matches("^req_%x+$", headers["x-request-id"] or "", nil, false, text:sub(1, 400))
      assert.is_nil(body.type)
      assert.are.same({ "error" }, (function() local k = {} for n in pairs(body) do k[#k + 1] = n end return k end)())
      assert.are.equal(openai_type, body.error.type)
      assert.is_string(body.error.message)
      assert.are.equal(status == 413 and "request_too_large" or json.null, body.error.code)
      assert.are.equal(json.null, body.error.param)
    end)
  end

  it("each refusal has an id of its own", function()
    local _, a = ask(CASES[1][5]("/v1/messages"))
    local _, b = ask(CASES[1][5]("/v1/messages"))
    assert.are_not.equal(a["x-request-id"], b["x-request-id"])
  end)
end)
