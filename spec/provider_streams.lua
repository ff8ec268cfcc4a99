-- spec/provider_streams.lua: an answer written as each provider's API
-- streams it, for the upstreams of specs (spec/gateway_spec.lua,
-- spec/sdk/gateway_server.lua). Text goes a word a delta; a refusal and each
-- tool call's arguments in two pieces, as the APIs split them.
local resil = require "resil"
local json = resil.json

local streams = {}

local function halves(s)
  local half = #s // 2
  return s:sub(1, half), s:sub(half + 1)
end

-- streams.openai{ id, model, content, refusal, tool_calls = {{id, name, arguments}}, finish_reason,
--   usage = {prompt_tokens, completion_tokens} } -> the body of a chat completion stream
function streams.openai(a)
  local out = {}
  local function chunk(delta, finish)
    out[#out + 1] = "data: " .. json.encode({ id = a.id or "chatcmpl-stream", object = "chat.completion.chunk",
      created = 1, model = a.model or "gpt-4o-mini", system_fingerprint = "fp_spec",
      choices = { { index = 0, delta = delta, logprobs = json.null, finish_reason = finish or json.null } } }) .. "\n\n"
  end
  chunk({ role = "assistant", content = "" })
  for word in (a.content or ""):gmatch("%S+%s*") do chunk({ content = word }) end
  if a.refusal then
    local one, two = halves(a.refusal)
    chunk({ refusal = one })
    chunk({ refusal = two })
  end
  for i, c in ipairs(a.tool_calls or {}) do
    local one, two = halves(c.arguments)
    chunk({ tool_calls = { { index = i - 1, id = c.id, type = "function", ["function"] = { name = c.name, arguments = one } } } })
    chunk({ tool_calls = { { index = i - 1, ["function"] = { arguments = two } } } })
  end
  chunk({}, a.finish_reason or "stop")
  if a.usage then
    local u = a.usage
    out[#out + 1] = "data: " .. json.encode({ id = a.id or "chatcmpl-stream", object = "chat.completion.chunk",
      created = 1, model = a.model or "gpt-4o-mini", choices = setmetatable({}, json.array_mt),
      usage = { prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens,
        total_tokens = u.prompt_tokens + u.completion_tokens } }) .. "\n\n"
  end
  out[#out + 1] = "data: [DONE]\n\n"
  return table.concat(out)
end

-- streams.anthropic{ id, model, thinking = {text, signature}, content, tool_calls = {{id, name, arguments}},
--   stop_reason, usage = {input_tokens, output_tokens, cache_read_input_tokens} } -> the body of a message stream
function streams.anthropic(a)
  local out = {}
  local function event(name, data)
    data.type = name
    out[#out + 1] = ("event: %s\ndata: %s\n\n"):format(name, json.encode(data))
  end
  local usage = a.usage or { input_tokens = 10, output_tokens = 5 }
  event("message_start", { message = { id = a.id or "msg_stream", type = "message", role = "assistant",
    model = a.model or "claude-sonnet-4-5-20250929", content = setmetatable({}, json.array_mt),
    stop_reason = json.null, stop_sequence = json.null, usage = { input_tokens = usage.input_tokens, output_tokens = 1,
      cache_read_input_tokens = usage.cache_read_input_tokens } } })
  local index = 0
  local function block(start, deltas)
    event("content_block_start", { index = index, content_block = start })
    for _, d in ipairs(deltas) do event("content_block_delta", { index = index, delta = d }) end
    event("content_block_stop", { index = index })
    index = index + 1
  end
  if a.thinking then
    local one, two = halves(a.thinking.text)
    block({ type = "thinking", thinking = "" }, { { type = "thinking_delta", thinking = one },
      { type = "thinking_delta", thinking = two }, { type = "signature_delta", signature = a.thinking.signature } })
  end
  if a.content then
    local deltas = {}
    for word in a.content:gmatch("%S+%s*") do deltas[#deltas + 1] = { type = "text_delta", text = word } end
    block({ type = "text", text = "" }, deltas)
  end
  for _, c in ipairs(a.tool_calls or {}) do
    local one, two = halves(c.arguments)
    block({ type = "tool_use", id = c.id, name = c.name, input = {} }, { { type = "input_json_delta", partial_json = one },
      { type = "input_json_delta", partial_json = two } })
  end
  event("message_delta", { delta = { stop_reason = a.stop_reason or "end_turn", stop_sequence = json.null },
    usage = { output_tokens = usage.output_tokens } })
  event("message_stop", {})
  return table.concat(out)
end

-- a custom route's reply: the stream, as an SSE response
function streams.reply(body)
  return { status = 200, headers = { ["content-type"] = "text/event-stream" }, body = body }
end

return streams
