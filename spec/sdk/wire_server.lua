-- A gateway in front of upstreams that answer as real servers do at the
-- edges of the wire formats, for spec/sdk/wire.mjs (run by
-- spec/gateway_wire_spec.lua): prints one JSON line {url=, key=} and serves.
-- /__test/last tells what each upstream was last sent.
local resil = require "resil"
local ai = require "policies.ai"
local gateway = require "policies.gateway"
local keys = require "resil.keys"
local json = resil.json
resil.log.level("off")
resil.store_config({ url = arg[1] })

local streams = require "spec.provider_streams"
local last = {}
local function answer(t) return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode(t) } end
local up = assert(resil.mock.start({ routes = {
  -- a compatible embeddings server that ignores encoding_format (LM Studio, Infinity, TEI): floats always
  ["POST /v1/embeddings"] = function(req)
    local b = json.decode(req.body)
    last.embeddings = b
    local data = {}
    for i = 1, type(b.input) == "table" and #b.input or 1 do
      data[i] = { object = "embedding", index = i - 1, embedding = { 0.5, -0.25, 0.125 * i, 1.0 } }
    end
    return answer({ object = "list", data = data, model = b.model, usage = { prompt_tokens = 3, total_tokens = 3 } })
  end,
  ["POST /v1/chat/completions"] = function(req)
    last.openai = json.decode(req.body)
    if last.openai.model == "gemini-compat" and last.openai.stream then
      -- tool calls as Gemini's OpenAI-compatible API streams them: no index, and (as some vLLM
      -- versions) no type
      local function chunk(delta, finish)
        return "data: " .. json.encode({ id = "chatcmpl-g", object = "chat.completion.chunk", created = 1,
          model = "gemini-2.5-flash", choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
      end
      return streams.reply(chunk({ role = "assistant", tool_calls = {
          { id = "call_a", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } } } })
        .. chunk({ tool_calls = { { id = "call_b", ["function"] = { name = "get_weather", arguments = '{"city":"Rome"}' } } } })
        .. chunk({}, "tool_calls")
        .. "data: " .. json.encode({ id = "chatcmpl-g", object = "chat.completion.chunk", created = 1, model = "gemini-2.5-flash",
          choices = setmetatable({}, json.array_mt), usage = { prompt_tokens = 12, completion_tokens = 9, total_tokens = 21 } })
        .. "\n\ndata: [DONE]\n\n")
    end
    -- a compatible server whose tool calls have no id (DeepSeek's through some hosts, streamed or not)
    if last.openai.model == "noid-compat" then
      local calls = { { name = "get_weather", arguments = '{"city":"Paris"}' }, { name = "get_weather", arguments = '{"city":"Rome"}' } }
      if last.openai.stream then
        return streams.reply(streams.openai({ tool_calls = calls, finish_reason = "tool_calls",
          usage = { prompt_tokens = 12, completion_tokens = 9 } }))
      end
      local out = {}
      for i, c in ipairs(calls) do out[i] = { type = "function", ["function"] = { name = c.name, arguments = c.arguments } } end
      return answer({ id = "chatcmpl-n", object = "chat.completion", created = 1, model = "noid-compat",
        choices = { { index = 0, finish_reason = "tool_calls", logprobs = json.null, message = { role = "assistant",
          content = json.null, refusal = json.null, tool_calls = out } } },
        usage = { prompt_tokens = 12, completion_tokens = 9, total_tokens = 21 } })
    end
    -- a compatible server that ends tool calls with finish_reason "stop" (Gemini's, some vLLM versions)
    if last.openai.model == "stop-compat" then
      local call = { id = "call_s", name = "get_weather", arguments = '{"city":"Paris"}' }
      if last.openai.stream then
        return streams.reply(streams.openai({ content = "Checking.", tool_calls = { call }, finish_reason = "stop",
          usage = { prompt_tokens = 12, completion_tokens = 9 } }))
      end
      return answer({ id = "chatcmpl-s", object = "chat.completion", created = 1, model = "stop-compat",
        choices = { { index = 0, finish_reason = "stop", logprobs = json.null, message = { role = "assistant",
          content = "Checking.", refusal = json.null, tool_calls = { { id = call.id, type = "function",
            ["function"] = { name = call.name, arguments = call.arguments } } } } } },
        usage = { prompt_tokens = 12, completion_tokens = 9, total_tokens = 21 } })
    end
    if last.openai.stream then
      return streams.reply(streams.openai({ content = "ok", usage = { prompt_tokens = 12, completion_tokens = 1 } }))
    end
    return answer({ id = "chatcmpl-up", object = "chat.completion", created = 1, model = "gpt-4o-mini",
      choices = { { index = 0, finish_reason = "stop", logprobs = json.null,
        message = { role = "assistant", content = "ok", refusal = json.null } } },
      usage = { prompt_tokens = 12, completion_tokens = 1, total_tokens = 13 } })
  end,
  ["POST /v1/messages"] = function(req)
    last.anthropic = json.decode(req.body)
    if last.anthropic.stream then
      return streams.reply(streams.anthropic({ content = "ok", usage = { input_tokens = 12, output_tokens = 1 } }))
    end
    return answer({ id = "msg_up", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
      content = { { type = "text", text = "ok" } }, stop_reason = "end_turn", stop_sequence = json.null,
      stop_details = json.null, container = json.null, usage = { input_tokens = 12, output_tokens = 1 } })
  end,
} }))

-- the strict mock: it answers a schema's JSON, and refuses fields its API does not take
local strict = assert(resil.mock.start({ strict = true, reply = "Paris" }))

-- count_tokens under a key's limits (wire.mjs): an Anthropic upstream whose calls wait until
-- POST /__test/release (one holds a key's one permit), and one whose calls fail (its breaker
-- opens); both count tokens
local ERROR = { status = 500, headers = { ["content-type"] = "application/json" },
  body = '{"type":"error","error":{"type":"api_error","message":"down"}}' }
local released = false
local held = assert(resil.server.listen({ port = 0, tasks = true, handler = function(req)
  if req.path == "/v1/messages/count_tokens" then return answer({ input_tokens = 9 }) end
  last.held = true
  while not released do resil.sleep(0.02) end
  return answer({ id = "msg_held", type = "message", role = "assistant", model = "claude-haiku-4-5",
    content = { { type = "text", text = "ok" } }, stop_reason = "end_turn", stop_sequence = json.null,
    usage = { input_tokens = 9, output_tokens = 1 } })
end }))
local broken = assert(resil.mock.start({ routes = { ["POST /v1/messages"] = function() return ERROR end } }))
-- an Anthropic upstream that refuses an image too large, with the error details its SDK reads
local IMAGE_TOO_LARGE = { status = 400, headers = { ["content-type"] = "application/json" }, body = json.encode({
  type = "error", request_id = "req_up", error = { type = "invalid_request_error",
    message = "messages.0.content.1.image: image dimensions exceed max allowed size: 8000 pixels",
    details = { error_code = "image_dimensions_too_large", max_side_length_pixels = 8000, paths = { "messages.0.content.1" } } } }) }
-- an Anthropic upstream whose account is out of credit, as the API says it: a 402, or a 400
local function out_of_credit(req)
  local status = json.decode(req.body).model == "claude-haiku-4-5" and 402 or 400
  return { status = status, headers = { ["content-type"] = "application/json" }, body = json.encode({ type = "error",
    error = { type = status == 402 and "billing_error" or "invalid_request_error",
      message = "Your credit balance is too low to access the Anthropic API." } }) }
end
local broke = assert(resil.mock.start({ routes = { ["POST /v1/messages"] = out_of_credit } }))
local images = assert(resil.mock.start({ routes = { ["POST /v1/messages"] = function() return IMAGE_TOO_LARGE end,
  ["POST /v1/messages/count_tokens"] = function() return IMAGE_TOO_LARGE end } }))

local fast = { base = 0.001, cap = 0.005 }
ai.configure("openai", { base_url = up.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.configure("anthropic", { base_url = up.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.strictopenai = require "policies.providers.openai"
ai.configure("strictopenai", { base_url = strict.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.adapters.strictanthropic = require "policies.providers.anthropic"
ai.configure("strictanthropic", { base_url = strict.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.heldanthropic = require "policies.providers.anthropic"
ai.configure("heldanthropic", { base_url = ("http://127.0.0.1:%d"):format(held:port()), api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.brokeanthropic = require "policies.providers.anthropic"
ai.configure("brokeanthropic", { base_url = broke.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.imagesanthropic = require "policies.providers.anthropic"
ai.configure("imagesanthropic", { base_url = images.url, api_key = "sk-ant-test-123456", retry = fast })
ai.adapters.brokenanthropic = require "policies.providers.anthropic"
ai.configure("brokenanthropic", { base_url = broken.url, api_key = "sk-ant-test-123456", retry = fast,
  breaker = { min_calls = 2, failure_rate = 0.5, window = 60, open_for = 600 } })
-- (queue = 0: a request past a key's concurrency is a 503 at once, not one that waits)
gateway.configure({ auth = true, queue = 0, key_cache = 0, idempotency_keep_max = 64, max_body = 200000, read_timeout = 2, models = {
  ["embed-compat"] = "openai/text-embedding-3-small",
  ["gpt-strict"] = "strictopenai/gpt-4o-mini",
  ["claude-strict"] = "strictanthropic/claude-haiku-4-5",
  ["claude-held"] = "heldanthropic/claude-haiku-4-5",
  ["claude-broken"] = "brokenanthropic/claude-haiku-4-5",
  ["claude-images"] = "imagesanthropic/claude-haiku-4-5",
  ["claude-402"] = "brokeanthropic/claude-haiku-4-5",
  ["claude-400-credit"] = "brokeanthropic/claude-sonnet-4-5",
  -- (a chat falls back from the broken target: so does a count)
  ["claude-fallback"] = { model = "brokenanthropic/claude-haiku-4-5", fallback = { "strictanthropic/claude-haiku-4-5" } },
} })
gateway.routes["GET /__test/last"] = function() return { status = 200, body = json.encode(last) } end
gateway.routes["POST /__test/release"] = function() released = true; return { status = 200, body = "{}" } end

local good = assert(keys.add({ name = "good" }))
local limited = assert(keys.add({ name = "limited", rpm = 2, concurrency = 1 }))
local s = gateway.serve({ listen = "127.0.0.1:0" })
print(json.encode({ url = ("http://127.0.0.1:%d"):format(s:port()), key = good, limited = limited }))
io.stdout:flush()
resil.sleep(math.huge)
