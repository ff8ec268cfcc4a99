-- The gateway's HTTP front (policies/gateway.lua on resil.server) against
-- requests no SDK sends but clients and proxies do: real HTTP on loopback,
-- the mock provider upstream.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

-- a mock, a gateway in front of it (keys required), a fresh store -> gw url, mock
local function start(config)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start({ strict = true, reply = "served" }))
  local options = { auth = true, key_cache = 0, models = { fast = "openai/gpt-4o-mini" } }
  for k, v in pairs(config or {}) do options[k] = v end
  return (helpers.gateway_for_mock(m, options, finally)), m
end

local function post(url, body, headers)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return assert(http.request({ method = "POST", url = url, headers = h,
    body = type(body) == "string" and body or json.encode(body) }))
end

local MSGS = { { role = "user", content = "hi" } }

describe("the gateway's HTTP front: Authorization", function()
  local keys = require "resil.keys"

  -- (before: only "Bearer" and "bearer" were read, and "BEARER sk-..." was a 401 saying the key was missing)
  it("takes the Bearer scheme in any case (RFC 9110 11.1); another scheme is still a 401", function()
    local url, m = start()
    local key = assert(keys.add({ name = "any-case" }))
    for _, scheme in ipairs({ "Bearer", "bearer", "BEARER", "BeArEr" }) do
      local res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS },
        { authorization = scheme .. " " .. key })
      assert.are.equal(200, res.status, scheme .. ": " .. res.body)
    end
    local res = post(url .. "/v1/chat/completions", { model = "fast", messages = MSGS },
      { authorization = "Basic " .. key })
    assert.are.equal(401, res.status)
    assert.are.equal(4, m:stats().routes.chat)
  end)

  -- (before: the last of two was the key, while a proxy in front reading the first (Node, Go,
  -- nginx) had checked the other: a request its proxy refused or billed to one key used another)
  it("a key sent in two Authorization headers is a 401 whichever comes first: none is taken from two", function()
    local url, m = start()
    local key = assert(keys.add({ name = "twice" }))
    for _, pair in ipairs({ { key, "sk-resil-other" }, { "sk-resil-other", key }, { key, key } }) do
      local pid, out = helpers.start(([[
local h = io.popen("curl -s -w ' %%{http_code}' -H 'content-type: application/json' " ..
  "-H 'Authorization: Bearer %s' -H 'Authorization: Bearer %s' " ..
  "-d '{\"model\":\"fast\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}' %s/v1/chat/completions")
print("status " .. h:read("a"))
]]):format(pair[1], pair[2], url))
      assert.is_true(helpers.wait_until(function() return helpers.slurp(out):find(" %d%d%d\n?$") ~= nil end, 10))
      assert.are.equal("401", helpers.slurp(out):match(" (%d+)\n?$"), pid)
      -- (before: "missing API key", to a client that had sent one, twice)
      assert.truthy(helpers.slurp(out):find("Authorization sent more than once", 1, true), helpers.slurp(out))
    end
    assert.are.equal(0, m:stats().total)
  end)
end)

describe("the gateway's HTTP front: bodies that are JSON but not an object", function()
  -- (before: an array was taken for an object without fields: "model is required", code invalid_model)
  for _, case in ipairs({
    { "/v1/chat/completions", "openai" }, { "/v1/messages", "anthropic" }, { "/v1/embeddings", "openai" },
    { "/v1/messages/count_tokens", "anthropic" },
  }) do
    it(case[1] .. ": an array, empty or not, is a 400 saying the body is not a JSON object", function()
      local url, m = start({ auth = false })
      for _, body in ipairs({ "[]", "[1,2]", '[{"model":"fast"}]', "5", '"x"' }) do
        local res = post(url .. case[1], body)
        assert.are.equal(400, res.status, body)
        local err = json.decode(res.body).error
        assert.are.equal("the body is not a JSON object", err.message, body)
        if case[2] == "openai" then assert.are.equal("invalid_json", err.code, body) end
      end
      assert.are.equal(0, m:stats().total)
    end)
    -- (before: an object nested past the decoder's levels was told it was "not a JSON object")
    it(case[1] .. ": an object nested past 200 levels is a 400 saying so, not that it is no object", function()
      local url, m = start({ auth = false })
      local body = '{"model":"fast","messages":[],"x":' .. ("["):rep(1001) .. ("]"):rep(1001) .. "}"
      local res = post(url .. case[1], body)
      assert.are.equal(400, res.status)
      local err = json.decode(res.body).error
      assert.are.equal("the body is nested more than 200 levels deep", err.message)
      if case[2] == "openai" then assert.are.equal("invalid_json", err.code) end
      assert.are.equal(0, m:stats().total)
    end)
    -- (before: "http request: cannot encode 'json': Cannot serialise, excessive nesting (201)", the
    -- encoder's words: a body within the 200 levels read, one level deeper in the other API's shape)
    if case[1] == "/v1/messages" then
      it(case[1] .. ": a body nested past 200 levels once in the other API's shape is a 400 saying so", function()
        local url, m = start({ auth = false })
        local schema = ('{"a":'):rep(197) .. "1" .. ("}"):rep(197)
        local res = post(url .. case[1], '{"model":"fast","max_tokens":10,"messages":[{"role":"user","content":"hi"}],'
          .. '"tools":[{"name":"f","input_schema":' .. schema .. "}]}")
        assert.are.equal(400, res.status, res.body)
        assert.are.equal("the request is nested more than 200 levels deep in the shape of the API that serves it",
          json.decode(res.body).error.message)
        assert.are.equal(0, m:stats().total)
      end)
    end
    -- (before: an object cut short, or one whose string holds a lone UTF-16 surrogate escape, as a
    -- JavaScript client's text sliced inside an emoji is sent, was told "the body is not a JSON object")
    it(case[1] .. ": an object that is not valid JSON is a 400 saying so, and where", function()
      local url, m = start({ auth = false })
      for _, c in ipairs({
        { '{"model":"fast","messages":[{"role":"user","content":"hi"}]', "found T_END at character" },
        { '{"model":"fast","messages":[{"role":"user","content":"cut \\ud83d"}]}', "invalid unicode escape code at character" },
        -- (a raw NUL byte: inside a string it was "unexpected end of string"; after the object, it and
        -- what followed it were dropped unread, and the request served)
        { '{"model":"fast","messages":[{"role":"user","content":"a\0b"}]}', "a NUL byte at character 56" },
        { '{"model":"fast","messages":[{"role":"user","content":"hi"}]}\0{"model":"other"}', "a NUL byte at character 61" },
      }) do
        local res = post(url .. case[1], c[1])
        assert.are.equal(400, res.status, c[1])
        local err = json.decode(res.body).error
        assert.matches("^the request body is not valid JSON: ", err.message, 1)
        assert.is_truthy(err.message:find(c[2], 1, true), err.message)
        if case[2] == "openai" then assert.are.equal("invalid_json", err.code) end
      end
      assert.are.equal(0, m:stats().total)
    end)
  end
end)

describe("the gateway's HTTP front: a method a path is not served with", function()
  -- (before: GET /v1/chat/completions, a browser's or a misconfigured client's, was a 404 "no route":
  -- the path looked wrong when the method was)
  for _, case in ipairs({
    { "GET", "/v1/chat/completions", "POST", "openai" }, { "GET", "/v1/messages", "POST", "anthropic" },
    { "PUT", "/v1/embeddings", "POST", "openai" }, { "DELETE", "/v1/messages/count_tokens", "POST", "anthropic" },
    { "POST", "/v1/models", "GET, HEAD", "openai" }, { "POST", "/v1/models/fast", "GET, HEAD", "openai" },
    { "POST", "/health", "GET, HEAD", "openai" }, { "GET", "/v1/chat/completions/", "POST", "openai" },
  }) do
    it(case[1] .. " " .. case[2] .. " is a 405 with Allow: " .. case[3] .. ", in the " .. case[4] .. " shape",
      function()
        local url, m = start()
        local res = assert(http.request({ method = case[1], url = url .. case[2] }))
        assert.are.equal(405, res.status, res.body)
        assert.are.equal(case[3], res.headers["allow"])
        local body = json.decode(res.body)
        if case[4] == "anthropic" then
          assert.are.equal("error", body.type)
          assert.are.equal("invalid_request_error", body.error.type)
        else
          assert.are.equal("method_not_allowed", body.error.code)
          assert.are.equal("invalid_request_error", body.error.type)
        end
        assert.matches(case[3], body.error.message, 1, true)
        assert.are.equal(0, m:stats().total)
      end)
  end

  it("a HEAD of a POST-only path is a 405 too, with the GET's Content-Length and no body", function()
    local url = start()
    local get = assert(http.request({ url = url .. "/v1/chat/completions" }))
    local head = assert(http.request({ method = "HEAD", url = url .. "/v1/chat/completions" }))
    assert.are.equal(405, head.status)
    assert.are.equal("POST", head.headers["allow"])
    assert.are.equal("", head.body)
    assert.are.equal(tostring(#get.body), head.headers["content-length"])
  end)

  it("a path served with no method is still a 404 no route", function()
    local url = start()
    local res = assert(http.request({ method = "GET", url = url .. "/v1/completions" }))
    assert.are.equal(404, res.status)
    assert.is_nil(res.headers["allow"])
    assert.are.equal("unknown_url", json.decode(res.body).error.code)
  end)
end)

describe("the gateway's HTTP front: a body that starts with a UTF-8 byte order mark", function()
  -- (before: a 400 "not valid JSON: ... invalid token at character 1" for a file a Windows tool wrote
  -- with a BOM, sent as it is by curl --data-binary @file: the client saw a "{" at character 1)
  local BOM = "\239\187\191"
  for _, case in ipairs({
    { "/v1/chat/completions", '{"model":"fast","messages":[{"role":"user","content":"hi"}]}', "chat" },
    { "/v1/messages", '{"model":"claude-sonnet-4-5-20250929","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}',
      "messages" },
    { "/v1/embeddings", '{"model":"text-embedding-3-small","input":"hi","encoding_format":"float"}', "embeddings" },
    { "/v1/messages/count_tokens", '{"model":"claude-sonnet-4-5-20250929","messages":[{"role":"user","content":"hi"}]}',
      "count_tokens" },
  }) do
    it(case[1] .. ": is read without it, as RFC 8259 lets a parser, and served", function()
      local url, m = start({ auth = false })
      local res = post(url .. case[1], BOM .. case[2])
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(1, m:stats().total)
    end)
  end

  it("a BOM before a body that is no JSON still says why, not the BOM", function()
    local url = start({ auth = false })
    local res = post(url .. "/v1/chat/completions", BOM .. '{"model":')
    assert.are.equal(400, res.status)
    assert.are.equal("invalid_json", json.decode(res.body).error.code)
  end)
end)

describe("the gateway's HTTP front: a compressed request body", function()
  -- (before: a gzip body, as a client that compresses its uploads sends one, was a 400 "the request
  -- body is not valid JSON: it is not UTF-8 (byte 0x8B at offset 1)": the JSON was fine, its
  -- encoding was not read)
  local function gzip(text)
    local path = helpers.write(helpers.tmpname(".json"), text)
    local f = assert(io.popen("gzip -c " .. path))
    local bytes = f:read("a")
    f:close()
    return bytes
  end

  for _, case in ipairs({ { "/v1/chat/completions", "openai" }, { "/v1/messages", "anthropic" } }) do
    it(case[1] .. ": is a 415 naming its Content-Encoding, with Accept-Encoding: identity", function()
      local url, m = start({ auth = false })
      local body = gzip(json.encode({ model = "fast", max_tokens = 16, messages = MSGS }))
      local res = post(url .. case[1], body, { ["content-encoding"] = "gzip" })
      assert.are.equal(415, res.status, res.body)
      assert.are.equal("identity", res.headers["accept-encoding"])
      local err = json.decode(res.body).error
      assert.matches("Content-Encoding: gzip", err.message, 1, true)
      assert.are.equal("invalid_request_error", err.type)
      assert.are.equal(0, m:stats().total)
    end)
  end

  it("a body not UTF-8 without a Content-Encoding is still the 400 naming the byte", function()
    local url = start({ auth = false })
    local res = post(url .. "/v1/chat/completions", '{"model":"fast","x":"\255"}')
    assert.are.equal(400, res.status)
    assert.matches("not UTF-8", json.decode(res.body).error.message, 1, true)
  end)
end)
