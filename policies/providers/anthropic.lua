-- policies/providers/anthropic.lua: Anthropic's Messages API.
--
--   ANTHROPIC_API_KEY   the key, sent as `x-api-key`
--   ANTHROPIC_BASE_URL  the base URL *without* /v1 (as the official SDK reads it),
--                       default https://api.anthropic.com
--
-- The API requires `max_tokens` and `anthropic-version`, takes the system
-- prompt as a top-level field (never as a message), and answers in content
-- blocks. Copy this file into your project's policies/providers/ to change it.
local resil = require "resil"
local json = resil.json

local anthropic = {
  name = "anthropic",
  key_env = "ANTHROPIC_API_KEY",
  base_env = "ANTHROPIC_BASE_URL",
  default_base = "https://api.anthropic.com",
  version = "2023-06-01",
  -- the API has no default: a request without max_tokens (one that fell back
  -- from OpenAI, say) gets this many
  default_max_tokens = 4096,
}

local PASSED = { "temperature", "top_p", "top_k", "metadata", "thinking", "service_tier" }

function anthropic.url(base) return base .. "/v1/messages" end

function anthropic.headers(key, conf)
  local h = { ["content-type"] = "application/json", accept = "application/json",
    ["anthropic-version"] = conf and conf.version or anthropic.version }
  if key then h["x-api-key"] = key end
  if conf and conf.beta then h["anthropic-beta"] = conf.beta end
  return h
end

local function text_of(content)
  if type(content) == "string" then return content end
  local parts = {}
  for _, b in ipairs(type(content) == "table" and content or {}) do
    if type(b) == "table" and type(b.text) == "string" then parts[#parts + 1] = b.text end
  end
  return table.concat(parts, "\n")
end

-- OpenAI-shaped tools ({type="function", function={...}}) become Anthropic's
local function tools_of(tools)
  if type(tools) ~= "table" or #tools == 0 then return nil end
  local out = {}
  for i, t in ipairs(tools) do
    local f = type(t) == "table" and t["function"]
    if f then
      out[i] = { name = f.name, description = f.description, input_schema = f.parameters or { type = "object" } }
    else
      out[i] = t
    end
  end
  return out
end

local function tool_choice_of(choice)
  if choice == nil then return nil end
  if choice == "auto" then return { type = "auto" } end
  if choice == "required" then return { type = "any" } end
  if choice == "none" then return { type = "none" } end
  if type(choice) == "table" and choice.type == "function" and type(choice["function"]) == "table" then
    return { type = "tool", name = choice["function"].name }
  end
  return choice
end

-- An OpenAI content part that Anthropic names otherwise -> its block: an
-- image_url (a data URL or a link) -> an image, a PDF file -> a document.
-- Anthropic's own blocks, and text parts (one shape in both), pass as they are.
local function block_of(p)
  if type(p) ~= "table" then return p end
  if p.type == "image_url" then
    local url = type(p.image_url) == "table" and p.image_url.url or p.image_url
    if type(url) ~= "string" then return p end
    local media, data = url:match("^data:([^;,]+);base64,(.*)$")
    if media then return { type = "image", source = { type = "base64", media_type = media, data = data } } end
    return { type = "image", source = { type = "url", url = url } }
  elseif p.type == "file" and type(p.file) == "table" and type(p.file.file_data) == "string" then
    local media, data = p.file.file_data:match("^data:([^;,]+);base64,(.*)$")
    if media then
      return { type = "document", source = { type = "base64", media_type = media, data = data },
        title = type(p.file.filename) == "string" and p.file.filename or nil }
    end
  end
  return p
end

local function content_of(content)
  if type(content) ~= "table" then return content end
  local out
  for i, p in ipairs(content) do
    local b = block_of(p)
    if b ~= p and not out then out = table.move(content, 1, i - 1, 1, {}) end
    if out then out[i] = b end
  end
  return out or content
end

-- a tool call's arguments (a JSON string) -> the object a tool_use block's
-- input must be; arguments that are not one (a cut answer's) are {}
local function object_of(arguments)
  local v = type(arguments) == "string" and json.decode(arguments)
  if type(v) ~= "table" or v[1] ~= nil or getmetatable(v) == json.array_mt then return {} end
  return v
end

-- An OpenAI-shaped conversation in Anthropic's terms: system messages go to
-- the top-level `system`, tool calls and results become content blocks (the
-- results of one turn's parallel calls in one user message, as the API
-- wants them), image_url and file parts become image and document blocks.
local function messages_of(req)
  local system = { req.system and text_of(req.system) or nil }
  local out = {}
  local results -- the user message the last tool messages went into
  for _, m in ipairs(req.messages) do
    local last_results = results
    results = nil
    if m.role == "system" or m.role == "developer" then
      system[#system + 1] = text_of(m.content)
    elseif m.role == "tool" then
      local block = { type = "tool_result", tool_use_id = m.tool_call_id, content = text_of(m.content) }
      if last_results then
        last_results.content[#last_results.content + 1] = block
        results = last_results
      else
        results = { role = "user", content = { block } }
        out[#out + 1] = results
      end
    elseif m.role == "assistant" and type(m.tool_calls) == "table" then
      local blocks = {}
      local text = m.content and text_of(m.content) or ""
      if text ~= "" then blocks[1] = { type = "text", text = text } end
      for _, c in ipairs(m.tool_calls) do
        local f = c["function"] or {}
        blocks[#blocks + 1] = { type = "tool_use", id = c.id, name = f.name, input = object_of(f.arguments) }
      end
      out[#out + 1] = { role = "assistant", content = blocks }
    else
      out[#out + 1] = { role = m.role, content = content_of(m.content) }
    end
  end
  -- a system given as content blocks (prompt caching) is kept as blocks
  if type(req.system) == "table" and #system == 1 then return req.system, out end
  return #system > 0 and table.concat(system, "\n\n") or nil, out
end

-- anthropic.body(req, model, conf) -> the JSON body of a message
function anthropic.body(req, model, conf)
  local system, messages = messages_of(req)
  local body = { model = model, messages = messages, system = system,
    max_tokens = req.max_tokens or conf.max_tokens or anthropic.default_max_tokens }
  for _, k in ipairs(PASSED) do body[k] = req[k] end
  if req.stop ~= nil then body.stop_sequences = type(req.stop) == "string" and { req.stop } or req.stop end
  body.tools = tools_of(req.tools)
  body.tool_choice = tool_choice_of(req.tool_choice)
  if req.stream then body.stream = true end
  for k, v in pairs(req.extra or {}) do body[k] = v end
  return body
end

-- a count the provider sent: a finite number >= 0, else absent (an infinite or
-- negative count cannot be priced, stored or settled)
local function num(v)
  return type(v) == "number" and v >= 0 and v < math.huge and (math.tointeger(v) or v) or nil
end

-- anthropic.usage(u) -> normalized usage. Anthropic's input_tokens leaves out
-- cache reads and writes; the normalized input_tokens counts them.
function anthropic.usage(u)
  if type(u) ~= "table" then return nil end
  local read, write = num(u.cache_read_input_tokens) or 0, num(u.cache_creation_input_tokens) or 0
  return { input_tokens = (num(u.input_tokens) or 0) + read + write, output_tokens = num(u.output_tokens) or 0,
    cached_input_tokens = read, cache_write_tokens = write }
end

local FINISH = { end_turn = "stop", stop_sequence = "stop", max_tokens = "length", tool_use = "tool_calls",
  refusal = "content_filter", pause_turn = "pause" }

-- anthropic.parse(data) -> normalized result | nil, why
function anthropic.parse(data)
  if type(data) ~= "table" or type(data.content) ~= "table" then return nil, "no content in the response" end
  local texts, calls = {}, nil
  for _, b in ipairs(data.content) do
    if type(b) == "table" and b.type == "text" then
      texts[#texts + 1] = b.text
    elseif type(b) == "table" and b.type == "tool_use" then
      calls = calls or {}
      calls[#calls + 1] = { id = b.id, name = b.name, arguments = json.encode(b.input or {}) }
    end
  end
  local stop = data.stop_reason ~= json.null and data.stop_reason or nil
  return { id = data.id, model = data.model, text = table.concat(texts), finish_reason = FINISH[stop] or stop,
    stop_reason = stop, stop_sequence = type(data.stop_sequence) == "string" and data.stop_sequence or nil,
    tool_calls = calls, usage = anthropic.usage(data.usage) }
end

-- anthropic.event(state, ev) -> delta text | nil, done?, err, body
function anthropic.event(state, ev)
  local t = ev.event
  if t == "ping" then return nil, false end
  local data = json.decode(ev.data or "")
  if type(data) ~= "table" then return nil, false, "an event that is not JSON: " .. tostring(ev.data):sub(1, 80) end
  t = t or data.type
  if t == "content_block_delta" then
    local d = data.delta
    if type(d) == "table" and d.type == "text_delta" and type(d.text) == "string" and d.text ~= "" then
      return d.text, false
    end
  elseif t == "message_start" then
    -- (a usage or a message that is not an object is the provider's garbage: it raised here,
    -- and the stream ended without its error event)
    local m = type(data.message) == "table" and data.message or {}
    state.id, state.model = m.id, m.model
    state.raw_usage = type(m.usage) == "table" and m.usage or nil
    state.usage = anthropic.usage(state.raw_usage)
  elseif t == "message_delta" then
    -- its usage is cumulative: the totals so far replace, never add
    local u = state.raw_usage or {}
    for k, v in pairs(type(data.usage) == "table" and data.usage or {}) do u[k] = v end
    state.raw_usage = u
    state.usage = anthropic.usage(u)
    local stop = type(data.delta) == "table" and data.delta.stop_reason
    if stop and stop ~= json.null then state.finish_reason, state.stop_reason = FINISH[stop] or stop, stop end
    local seq = type(data.delta) == "table" and data.delta.stop_sequence
    if type(seq) == "string" then state.stop_sequence = seq end
  elseif t == "message_stop" then
    state.stopped = true
    return nil, true
  elseif t == "error" then
    local e = data.error or {}
    return nil, false, tostring(e.message or e.type or "error event"), data
  end
  return nil, false
end

function anthropic.complete(state) return state.stopped == true end

function anthropic.validate(data)
  local r, why = anthropic.parse(data)
  if not r then return nil, why end
  if r.text:match("^%s*$") and not r.tool_calls and r.finish_reason ~= "length" then
    return nil, "empty content"
  end
  return true
end

return anthropic
