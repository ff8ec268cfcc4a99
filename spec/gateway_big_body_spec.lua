-- A big request body through the gateway: its decode, checks and translation
-- let the loop turn, so the worker's other requests are served meanwhile.
-- Ordered, not timed: a /health asked as the big request's handler starts is
-- answered before the gateway hands the conversation to ai.chat.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http

-- the mock's on_request calls arrived(req) when set
local arrived
local function start()
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  arrived = nil
  local m = assert(resil.mock.start({ strict = true, reply = "served",
    on_request = function(req) if arrived then arrived(req) end end }))
  local gateway, ai = helpers.fresh_gateway()
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.001, cap = 0.005 } })
  ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-test-123456", retry = { base = 0.001, cap = 0.005 } })
  gateway.configure({ auth = false, models = { fast = "openai/gpt-4o-mini", claude = "anthropic/claude-haiku-4-5" } })
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    s:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), m, gateway, ai
end

-- 4 MB of short messages: 131,072 of them
local function conversation(model, extra)
  local n = 4 * 1024 * 1024 // 32
  return '{"model":"' .. model .. '",' .. (extra or "") .. '"messages":['
    .. ('{"role":"user","content":"hi"},'):rep(n - 1) .. '{"role":"user","content":"hi"}]}'
end

describe("the gateway with a 4 MB request body", function()
  -- (before: the body's decode, its per-message checks, its translation and the call's own
  -- preparation were one stretch without a yield, about 0.3 s of CPU here and 2 s on a busy
  -- machine: a /health or a small chat on the same worker waited for all of it)
  for _, case in ipairs({
    { "/v1/chat/completions", "fast", "" }, { "/v1/messages", "claude", '"max_tokens":16,' },
  }) do
    it(case[1] .. ": a /health asked as its handler starts is answered before its call starts", function()
      local url, m, gateway, ai = start()
      local order = {}
      local chat = ai.chat
      ai.chat = function(...)
        order[#order + 1] = "chat"
        return chat(...)
      end
      local handle = gateway.handle
      local asked = false
      gateway.handle = function(req)
        if req.path == case[1] and not asked then
          asked = true
          resil.spawn(function()
            local res = assert(http.request({ url = url .. "/health", timeout = 30 }))
            order[#order + 1] = "health " .. res.status
          end)
        end
        return handle(req)
      end
      local res = assert(http.request({ method = "POST", url = url .. case[1], timeout = 60,
        headers = { ["content-type"] = "application/json", ["anthropic-version"] = "2023-06-01" },
        body = conversation(case[2], case[3]) }))
      assert.are.equal(200, res.status, res.body)
      assert.is_true(helpers.wait_until(function() return #order == 2 end, 30))
      assert.are.same({ "health 200", "chat" }, order)
      assert.are.equal(1, m:stats().total)
    end)
  end

  it("/v1/messages/count_tokens: a /health asked as its handler starts is answered before its targets are chosen", function()
    local url, _, gateway, ai = start()
    local order = {}
    local targets = ai.targets
    ai.targets = function(...)
      order[#order + 1] = "targets"
      return targets(...)
    end
    local handle = gateway.handle
    gateway.handle = function(req)
      if req.path == "/v1/messages/count_tokens" then
        resil.spawn(function()
          local res = assert(http.request({ url = url .. "/health", timeout = 30 }))
          order[#order + 1] = "health " .. res.status
        end)
      end
      return handle(req)
    end
    local res = assert(http.request({ method = "POST", url = url .. "/v1/messages/count_tokens", timeout = 60,
      headers = { ["content-type"] = "application/json", ["anthropic-version"] = "2023-06-01" },
      body = conversation("claude") }))
    assert.are.equal(200, res.status, res.body)
    assert.is_true(helpers.wait_until(function() return #order == 2 end, 30))
    assert.are.same({ "health 200", "targets" }, order)
  end)
end)
