-- A gateway in front of two mocks, for spec/sdk/gateway.mjs (run by
-- spec/gateway_sdk_spec.lua): prints one JSON line {url=, keys=} and serves.
local resil = require "resil"
local ai = require "policies.ai"
local gateway = require "policies.gateway"
local keys = require "resil.keys"
resil.log.level("off")
resil.store_config({ url = arg[1] })

local up = assert(resil.mock.start({ strict = true, reply = "one two three four five six", idempotency = true,
  stream_interval = 0.01, faults = { { route = "chat", model = "gpt-gone", status = 404, error_type = "invalid_request_error",
    error_code = "model_not_found", message = "The model `gpt-gone` does not exist or you do not have access to it." } } }))
-- a second Anthropic that is overloaded: a model routed there falls back
local down = assert(resil.mock.start({ strict = true, faults = { { route = "messages", probability = 1, status = 529 } } }))
-- a long, slow stream: a client that aborts it must cancel it upstream
local long = assert(resil.mock.start({ strict = true, reply = ("word "):rep(500), stream_interval = 0.02 }))
-- streams cut after their first deltas: the SDKs must raise, not return a short answer
local cut = assert(resil.mock.start({ strict = true, reply = "one two three four five six",
  faults = { { route = "chat", probability = 1, kind = "cut" }, { route = "messages", probability = 1, kind = "cut" } } }))
-- answers that call a tool (with text before it), in each API's shape, to a request not streamed
local ARGS = '{"city":"Paris","tags":[]}'
local streams = require "spec.provider_streams"
local tools = assert(resil.mock.start({ strict = true, routes = {
  ["POST /v1/chat/completions"] = function(req)
    if resil.json.decode(req.body).stream then
      return streams.reply(streams.openai({ id = "chatcmpl-tools", content = "Checking.", finish_reason = "tool_calls",
        tool_calls = { { id = "call_1", name = "get_weather", arguments = ARGS } },
        usage = { prompt_tokens = 12, completion_tokens = 7 } }))
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = "chatcmpl-tools", object = "chat.completion", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, finish_reason = "tool_calls", message = { role = "assistant", content = "Checking.",
        tool_calls = { { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = ARGS } } } } } },
      usage = { prompt_tokens = 12, completion_tokens = 7, total_tokens = 19 } }) }
  end,
  ["POST /v1/messages"] = function(req)
    if resil.json.decode(req.body).stream then
      return streams.reply(streams.anthropic({ id = "msg_tools", content = "Checking.", stop_reason = "tool_use",
        tool_calls = { { id = "toolu_1", name = "get_weather", arguments = ARGS } },
        usage = { input_tokens = 12, output_tokens = 7 } }))
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = "msg_tools", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
      content = { { type = "text", text = "Checking." },
        { type = "tool_use", id = "toolu_1", name = "get_weather", input = resil.json.decode(ARGS) } },
      stop_reason = "tool_use", stop_sequence = resil.json.null, usage = { input_tokens = 12, output_tokens = 7 } }) }
  end } }))
-- answers that tell what they were sent and carry what the normalized result has no place for
-- (logprobs, usage details; a thinking block and its signature)
local echo = assert(resil.mock.start({ strict = true, routes = {
  ["POST /v1/chat/completions"] = function(req)
    local b = resil.json.decode(req.body)
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = "chatcmpl-echo", object = "chat.completion", created = 1, model = "gpt-4o-mini-2024-07-18",
      service_tier = "default", system_fingerprint = "fp_echo",
      choices = { { index = 0, finish_reason = "stop", logprobs = b.logprobs and { content = { { token = "seen",
        logprob = -0.25, bytes = { 115, 101, 101, 110 }, top_logprobs = setmetatable({}, resil.json.array_mt) } } } or resil.json.null,
        message = { role = "assistant", content = "seen " .. resil.json.encode({ logprobs = b.logprobs or false,
          top_logprobs = b.top_logprobs or false }), refusal = resil.json.null } } },
      usage = { prompt_tokens = 12, completion_tokens = 7, total_tokens = 19,
        prompt_tokens_details = { cached_tokens = 4, audio_tokens = 0 } } }) }
  end,
  ["POST /v1/messages"] = function(req)
    local b = resil.json.decode(req.body)
    local seen = "seen " .. resil.json.encode({ thinking = b.thinking or false, top_k = b.top_k or false })
    if b.stream then
      return streams.reply(streams.anthropic({ id = "msg_echo", thinking = { text = "Let me think.", signature = "sig_abc" },
        content = seen, usage = { input_tokens = 12, output_tokens = 7, cache_read_input_tokens = 4 } }))
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = "msg_echo", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
      content = { { type = "thinking", thinking = "Let me think.", signature = "sig_abc" },
        { type = "text", text = "seen " .. resil.json.encode({ thinking = b.thinking or false, top_k = b.top_k or false }) } },
      stop_reason = "end_turn", stop_sequence = resil.json.null,
      usage = { input_tokens = 12, output_tokens = 7, cache_read_input_tokens = 4 } }) }
  end } }))
-- Anthropic refusing: stop_reason "refusal" and no content at all, streamed or not
local refusing = assert(resil.mock.start({ strict = true, routes = {
  ["POST /v1/messages"] = function(req)
    if resil.json.decode(req.body).stream then
      return streams.reply(streams.anthropic({ id = "msg_refused", stop_reason = "refusal",
        usage = { input_tokens = 12, output_tokens = 3 } }))
    end
    return { status = 200, headers = { ["content-type"] = "application/json" }, body = resil.json.encode({
      id = "msg_refused", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
      content = setmetatable({}, resil.json.array_mt), stop_reason = "refusal", stop_sequence = resil.json.null,
      usage = { input_tokens = 12, output_tokens = 3 } }) }
  end } }))
-- streams that end in the provider's overloaded_error event after their first deltas
local broken = assert(resil.mock.start({ strict = true, reply = "one two three four five six",
  faults = { { route = "messages", probability = 1, kind = "error_event", after = 2 } } }))
-- a conversation too long for the model, in each API's words
local overflow = assert(resil.mock.start({ strict = true, faults = {
  { route = "chat", status = 400, body = resil.json.encode({ error = { type = "invalid_request_error",
    code = "context_length_exceeded", param = "messages",
    message = "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens." } }) },
  { route = "messages", status = 400, error_type = "invalid_request_error",
    message = "prompt is too long: 210000 tokens > 200000 maximum" } } }))
-- answers with no content (invalid output, billed), whatever is asked
local empty = assert(resil.mock.start({ strict = true, faults = { { route = "chat", probability = 1, kind = "empty" } } }))
-- a provider that fails whatever the gateway tries: each API's retryable statuses, and a reset
local failing = assert(resil.mock.start({ strict = true, faults = {
  { route = "chat", model = "gpt-4o-mini", status = 500 }, { route = "chat", model = "gpt-4o", status = 408 },
  { route = "chat", model = "gpt-4.1", kind = "reset" },
  { route = "messages", model = "claude-sonnet-4-5-20250929", status = 529 },
  { route = "messages", model = "claude-haiku-4-5", status = 503 } } }))
local fast = { base = 0.001, cap = 0.005 }
ai.configure("openai", { base_url = up.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.configure("anthropic", { base_url = up.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.overloaded = ai.adapters.anthropic or require "policies.providers.anthropic"
ai.adapters.slow = require "policies.providers.openai"
ai.configure("slow", { base_url = long.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.cutopenai = require "policies.providers.openai"
ai.configure("cutopenai", { base_url = cut.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.cutanthropic = require "policies.providers.anthropic"
ai.configure("cutanthropic", { base_url = cut.url, api_key = "sk-ant-test-123456", retry = fast })
ai.configure("overloaded", { base_url = down.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.toolsopenai = require "policies.providers.openai"
ai.configure("toolsopenai", { base_url = tools.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.echoopenai = require "policies.providers.openai"
ai.configure("echoopenai", { base_url = echo.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.echoanthropic = require "policies.providers.anthropic"
ai.configure("echoanthropic", { base_url = echo.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.overflowopenai = require "policies.providers.openai"
ai.configure("overflowopenai", { base_url = overflow.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.overflowanthropic = require "policies.providers.anthropic"
ai.configure("overflowanthropic", { base_url = overflow.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.brokenanthropic = require "policies.providers.anthropic"
ai.configure("brokenanthropic", { base_url = broken.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.refusing = require "policies.providers.anthropic"
ai.configure("refusing", { base_url = refusing.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.emptyopenai = require "policies.providers.openai"
ai.configure("emptyopenai", { base_url = empty.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.failingopenai = require "policies.providers.openai"
ai.configure("failingopenai", { base_url = failing.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.failinganthropic = require "policies.providers.anthropic"
ai.configure("failinganthropic", { base_url = failing.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.toolsanthropic = require "policies.providers.anthropic"
ai.configure("toolsanthropic", { base_url = tools.url, api_key = "sk-ant-test-123456", retry = fast })

gateway.configure({ auth = true, key_cache = 0, models = {
  ["chat-fast"] = "openai/gpt-4o-mini",
  ["chat-long"] = "slow/gpt-4o-mini",
  ["chat-cut"] = "cutopenai/gpt-4o-mini",
  ["claude-cut"] = "cutanthropic/claude-sonnet-4-5-20250929",
  ["chat-tools"] = "toolsopenai/gpt-4o-mini",
  ["claude-tools"] = "toolsanthropic/claude-sonnet-4-5-20250929",
  ["chat-echo"] = "echoopenai/gpt-4o-mini",
  ["claude-echo"] = "echoanthropic/claude-sonnet-4-5-20250929",
  ["claude-refusing"] = "refusing/claude-sonnet-4-5-20250929",
  ["chat-empty"] = "emptyopenai/gpt-4o-mini",
  ["claude-broken"] = "brokenanthropic/claude-sonnet-4-5-20250929",
  ["chat-overflow"] = "overflowopenai/gpt-4o-mini",
  ["claude-overflow"] = "overflowanthropic/claude-sonnet-4-5-20250929",
  ["chat-failing-500"] = "failingopenai/gpt-4o-mini",
  ["chat-failing-408"] = "failingopenai/gpt-4o",
  ["chat-failing-reset"] = "failingopenai/gpt-4.1",
  ["claude-failing-529"] = "failinganthropic/claude-sonnet-4-5-20250929",
  ["claude-failing-503"] = { model = "failinganthropic/claude-haiku-4-5", fallback = { "failingopenai/gpt-4o-mini" } },
  ["claude-busy"] = { model = "overloaded/claude-sonnet-4-5-20250929", fallback = { "openai/gpt-4o-mini" } },
} })
-- what the checks read of the upstream: its counts, and transfers still open
gateway.routes["GET /__test/upstream"] = function()
  return { status = 200, body = resil.json.encode({ total = up:stats().total, pending = up.server:pending(),
    down = down:stats().total, long_pending = long.server:pending(), refusing = refusing:stats().total, empty = empty:stats().total, failing = failing:stats().total }) }
end

local good = assert(keys.add({ name = "good" }))
local revoked = assert(keys.add({ name = "gone" }))
keys.revoke("gone")
local broke = assert(keys.add({ name = "broke", budget = "0.000001/day" }))
local slow = assert(keys.add({ name = "slow", rpm = 1 }))
local slowant = assert(keys.add({ name = "slowant", rpm = 1 }))
local brisk = assert(keys.add({ name = "brisk", rpm = 120 }))
local s = gateway.serve({ listen = "127.0.0.1:0" })
print(resil.json.encode({ url = ("http://127.0.0.1:%d"):format(s:port()),
  keys = { good = good, revoked = revoked, broke = broke, slow = slow, slowant = slowant, brisk = brisk } }))
io.stdout:flush()
resil.sleep(math.huge)
