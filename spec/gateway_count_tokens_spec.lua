-- The gateway's POST /v1/messages/count_tokens asks the model's targets in a call's order and
-- gives way to the next on what a call falls back on (policies.classify's `fallback`): real
-- HTTP on loopback to the mock and to a loopback upstream whose model is gone (a 404, as
-- Anthropic answers a model it does not serve), a real SQLite store.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local MSGS = { { role = "user", content = "Name a city" } }

-- an Anthropic upstream that refuses every request with `status` (404 not_found_error: Anthropic's
-- for a model it does not have; 401 authentication_error: the gateway's key refused), counting
-- how often it was asked
local TYPES = { [401] = "authentication_error", [404] = "not_found_error", [429] = "rate_limit_error" }
local function refusing_upstream(status)
  local asked = { messages = 0, count = 0 }
  local s = assert(resil.server.listen({ port = 0, tasks = true, handler = function(req)
    if req.path == "/v1/messages/count_tokens" then asked.count = asked.count + 1
    else asked.messages = asked.messages + 1 end
    return { status = status, headers = { ["content-type"] = "application/json", ["retry-after"] = "7" },
      body = json.encode({ type = "error", error = { type = TYPES[status], message = "model: claude-haiku-4-5" } }) }
  end }))
  return ("http://127.0.0.1:%d"):format(s:port()), asked, s
end

-- a gateway whose "gone" provider (Anthropic's API) refuses with `status`, "anthropic" the mock's
-- -> its url, what "gone" was asked, the mock
local function start(status, models)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local m = assert(resil.mock.start({ strict = true, reply = "Paris" }))
  local gone_url, asked, gone = refusing_upstream(status)
  local gateway, ai = helpers.fresh_gateway()
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  local fast = { base = 0.001, cap = 0.005 }
  ai.adapters.goneanthropic = require "policies.providers.anthropic"
  ai.configure("goneanthropic", { base_url = gone_url, api_key = "sk-ant-test-123456", retry = fast })
  ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-test-123456", retry = fast })
  gateway.configure({ auth = false, key_cache = 0, models = models })
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    s:close()
    gone:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), asked, m
end

local function post(url, body)
  return assert(http.request({ method = "POST", url = url, body = json.encode(body),
    headers = { ["content-type"] = "application/json", ["anthropic-version"] = "2023-06-01" } }))
end

describe("gateway count_tokens", function()
  -- (before: the count relayed the first target's 404 while a chat on the same model fell back and
  -- was answered)
  it("falls back from a target whose model is gone (404), as a chat does", function()
    local url, asked = start(404, {
      moved = { model = "goneanthropic/claude-haiku-4-5", fallback = { "anthropic/claude-haiku-4-5" } },
    })
    local chat = post(url .. "/v1/messages", { model = "moved", max_tokens = 16, messages = MSGS })
    assert.are.equal(200, chat.status, chat.body)
    assert.are.equal("anthropic", chat.headers["x-resil-provider"])
    local count = post(url .. "/v1/messages/count_tokens", { model = "moved", messages = MSGS })
    assert.are.equal(200, count.status, count.body)
    assert.are.equal("anthropic", count.headers["x-resil-provider"])
    assert.is_true(json.decode(count.body).input_tokens > 0)
    assert.are.equal(1, asked.count)
  end)

  it("relays a refusal a call does not fall back on (the gateway's key, a 401: a 502) without asking the next",
    function()
      local url, asked, m = start(401, {
        keyless = { model = "goneanthropic/claude-haiku-4-5", fallback = { "anthropic/claude-haiku-4-5" } },
      })
      local chat = post(url .. "/v1/messages", { model = "keyless", max_tokens = 16, messages = MSGS })
      assert.are_not.equal(200, chat.status, chat.body)
      local count = post(url .. "/v1/messages/count_tokens", { model = "keyless", messages = MSGS })
      assert.are.equal(502, count.status, count.body)
      -- (an SDK retried it twice more, each refused the same)
      assert.are.equal("false", count.headers["x-should-retry"])
      assert.are.equal(1, asked.count)
      assert.is_nil(m:stats().routes.count_tokens)
    end)
  -- (before: the upstream's Retry-After was dropped: the SDK retried at once, and again)
  it("relays an upstream's 429 with its Retry-After when no target is left", function()
    local url, asked = start(429, { limited = "goneanthropic/claude-haiku-4-5" })
    local count = post(url .. "/v1/messages/count_tokens", { model = "limited", messages = MSGS })
    assert.are.equal(429, count.status, count.body)
    assert.are.equal("7", count.headers["retry-after"])
    assert.are.equal("rate_limit_error", json.decode(count.body).error.type)
    assert.are.equal(1, asked.count)
  end)
end)
