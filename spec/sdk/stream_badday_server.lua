-- A gateway in front of mocks whose streams have a bad day, for
-- spec/sdk/stream_badday.mjs (run by spec/gateway_stream_sdk_spec.lua):
-- prints one JSON line {url=, key=} and serves. GET /__test/state tells the
-- ledger, the key's budget and what the providers billed.
local resil = require "resil"
local ai = require "policies.ai"
local gateway = require "policies.gateway"
local keys = require "resil.keys"
resil.log.level("off")
resil.store_config({ url = arg[1] })
local json = resil.json

-- each API's stream of a tool call whose arguments (a JSON object) come in 20 pieces and its two
-- ends: a client can leave midway
local PIECE = ("x"):rep(200)
local function openai_tool_stream()
  local function chunk(delta, finish)
    return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
  end
  local c = { chunk({ role = "assistant", content = "Saving." }),
    chunk({ tool_calls = { { index = 0, id = "call_1", type = "function", ["function"] = { name = "save", arguments = '{"data":"' } } } }) }
  for _ = 1, 20 do c[#c + 1] = chunk({ tool_calls = { { index = 0, ["function"] = { arguments = PIECE } } } }) end
  c[#c + 1] = chunk({ tool_calls = { { index = 0, ["function"] = { arguments = '"}' } } } })
  c[#c + 1] = chunk({}, "tool_calls")
  c[#c + 1] = "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
    choices = setmetatable({}, json.array_mt), usage = { prompt_tokens = 20, completion_tokens = 1000,
    total_tokens = 1020 } }) .. "\n\n"
  c[#c + 1] = "data: [DONE]\n\n"
  return c
end
local function anthropic_tool_stream()
  local c = {}
  local function ev(name, d)
    d.type = name
    c[#c + 1] = "event: " .. name .. "\ndata: " .. json.encode(d) .. "\n\n"
  end
  ev("message_start", { message = { id = "m1", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
    content = setmetatable({}, json.array_mt), usage = { input_tokens = 20, output_tokens = 1 } } })
  ev("content_block_start", { index = 0, content_block = { type = "tool_use", id = "toolu_1", name = "save", input = {} } })
  ev("content_block_delta", { index = 0, delta = { type = "input_json_delta", partial_json = '{"data":"' } })
  for _ = 1, 20 do ev("content_block_delta", { index = 0, delta = { type = "input_json_delta", partial_json = PIECE } }) end
  ev("content_block_delta", { index = 0, delta = { type = "input_json_delta", partial_json = '"}' } })
  ev("content_block_stop", { index = 0 })
  ev("message_delta", { delta = { stop_reason = "tool_use" }, usage = { output_tokens = 1000 } })
  ev("message_stop", {})
  return c
end
local tools = assert(resil.mock.start({ strict = true, routes = {
  ["POST /v1/chat/completions"] = function()
    return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = openai_tool_stream(),
      chunk_interval = 0.01 }
  end,
  ["POST /v1/messages"] = function()
    return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = anthropic_tool_stream(),
      chunk_interval = 0.01 }
  end } }))
-- plain streams, a word a delta
local up = assert(resil.mock.start({ strict = true, reply = ("word "):rep(30), stream_interval = 0.005 }))
-- a primary whose streams end before their first delta (a 200, then nothing)
local cut = assert(resil.mock.start({ strict = true, faults = { { route = "chat", probability = 1, kind = "cut", after = 0 } } }))

-- the streams the gateway saw a provider start (its 200 read): a client that leaves after the
-- provider sent its 200 but before the gateway read it leaves no row (an attempt never answered, as
-- the gateway saw it, costs nothing), and the providers' own counts include those
local opened = 0
local http_stream = resil.http.stream
resil.http.stream = function(o)
  local st, err = http_stream(o)
  if st and st.status == 200 and not o.url:find(cut.url, 1, true) then opened = opened + 1 end
  return st, err
end

-- a provider whose streams break after their first delta, each as the last user message names it
-- (stall, cut, error, notjson, nomarker), or come whole in a stream labelled application/json (json)
local function oa(delta, finish)
  return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
    choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
end
local function an(name, data) return "event: " .. name .. "\ndata: " .. json.encode(data) .. "\n\n" end
local HOSTILE = {
  openai = { start = { oa({ role = "assistant", content = "" }), oa({ content = "one " }) },
    tail = { oa({ content = "two" }), oa({}, "stop"), "data: [DONE]\n\n" },
    error = 'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n' },
  anthropic = { start = { an("message_start", { type = "message_start", message = { id = "msg_1", type = "message",
      role = "assistant", model = "claude-sonnet-4-5-20250929", content = setmetatable({}, json.array_mt),
      usage = { input_tokens = 10, output_tokens = 1 } } }),
      an("content_block_start", { type = "content_block_start", index = 0, content_block = { type = "text", text = "" } }),
      an("content_block_delta", { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = "one " } }) },
    tail = { an("content_block_delta", { type = "content_block_delta", index = 0, delta = { type = "text_delta", text = "two" } }),
      an("content_block_stop", { type = "content_block_stop", index = 0 }),
      an("message_delta", { type = "message_delta", delta = { stop_reason = "end_turn" }, usage = { output_tokens = 2 } }),
      an("message_stop", { type = "message_stop" }) },
    error = an("error", { type = "error", error = { type = "overloaded_error", message = "Overloaded" } }) },
}
local hostile = assert(resil.server.listen({ port = 0, tasks = true, handler = function(req)
  local b = json.decode(req.body)
  local case = b.messages[#b.messages].content
  local h = HOSTILE[req.path:find("chat/completions", 1, true) and "openai" or "anthropic"]
  return { status = 200, headers = { ["content-type"] = case == "json" and "application/json" or "text/event-stream" },
    stream = function(write)
      for _, c in ipairs(h.start) do write(c) end
      if case == "stall" then resil.sleep(math.huge)
      elseif case == "cut" then error("the upstream dies") -- (its connection closed without the last chunk)
      elseif case == "error" then write(h.error)
      elseif case == "notjson" then write("data: {not json\n\n")
      elseif case == "nomarker" then write(h.tail[1]) -- (and the body's clean end)
      else for _, c in ipairs(h.tail) do write(c) end end
    end }
end }))
ai.adapters.hostileopenai = require "policies.providers.openai"
ai.adapters.hostileanthropic = require "policies.providers.anthropic"
local hostile_url = ("http://127.0.0.1:%d"):format(hostile:port())

local fast = { base = 0.001, cap = 0.005 }
ai.configure("hostileopenai", { base_url = hostile_url .. "/v1", api_key = "sk-test-123456", retry = fast, idle_timeout = 1 })
ai.configure("hostileanthropic", { base_url = hostile_url, api_key = "sk-ant-test-123456", retry = fast,
  idle_timeout = 1 })
ai.configure("openai", { base_url = up.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.configure("anthropic", { base_url = up.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.toolsopenai = require "policies.providers.openai"
ai.configure("toolsopenai", { base_url = tools.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.toolsanthropic = require "policies.providers.anthropic"
ai.configure("toolsanthropic", { base_url = tools.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.cutopenai = require "policies.providers.openai"
ai.configure("cutopenai", { base_url = cut.url .. "/v1", api_key = "sk-test-123456", retry = fast })
-- (priced as the providers they stand for: the key has a budget)
local pricing = require "policies.pricing"
pricing.models.toolsopenai, pricing.models.cutopenai = pricing.models.openai, pricing.models.openai
pricing.models.toolsanthropic = pricing.models.anthropic
pricing.models.hostileopenai, pricing.models.hostileanthropic = pricing.models.openai, pricing.models.anthropic
gateway.configure({ key_cache = 0, models = {
  ["chat"] = "openai/gpt-4o-mini",
  ["claude"] = "anthropic/claude-sonnet-4-5-20250929",
  ["chat-tools"] = "toolsopenai/gpt-4o-mini",
  ["claude-tools"] = "toolsanthropic/claude-sonnet-4-5-20250929",
  ["chat-cut-first"] = { model = "cutopenai/gpt-4o-mini", fallback = { "anthropic/claude-sonnet-4-5-20250929" } },
  ["hostile-openai"] = "hostileopenai/gpt-4o-mini",
  ["hostile-anthropic"] = "hostileanthropic/claude-sonnet-4-5-20250929",
} })

gateway.routes["GET /__test/state"] = function()
  local rows = 0
  for _, g in ipairs(resil.cost.breakdown("model")) do rows = rows + g.calls end
  local b = assert(resil.budget("key:streams"):state())
  -- (the streams the providers started: each of tools' answers a 200; the cut primary's, which ended before
  -- any delta, are not rows: a failure the provider answered costs what it read)
  local billed = up:stats().billed.responses + tools:stats().total
  return { status = 200, body = json.encode({ rows = rows, opened = opened, holds = #b.holds, reserved = b.reserved, spent = b.spent,
    total = resil.cost.total({}), billed = billed, cut = cut:stats().total,
    pending = tools.server:pending() + up.server:pending() }) }
end

local key = assert(keys.add({ name = "streams", budget = "100/day" }))
local s = gateway.serve({ listen = "127.0.0.1:0" })
print(json.encode({ url = ("http://127.0.0.1:%d"):format(s:port()), key = key }))
io.stdout:flush()
resil.sleep(math.huge)
