-- policies/messages.lua: a conversation in either wire format, translated
-- for the provider that serves it. policies.ai takes messages in OpenAI's
-- shape or Anthropic's (a gateway client of /v1/messages, a fallback across
-- providers); each adapter asks for its own:
--
--   messages.openai(req)    -> OpenAI's chat messages (system first)
--   messages.anthropic(req) -> system, Anthropic's messages
--
-- A message already in the wanted shape is passed as it is (the hot path).
-- What has no counterpart is left out where it is a hint (cache_control,
-- citations, thinking blocks, which OpenAI has no place for) and passed as it
-- is otherwise, so that the provider's 400 names it (an image from
-- Anthropic's Files API).
local resil = require "resil"
local json = resil.json
local null = json.null

local messages = {}

local function is_text(v) return type(v) == "string" end

-- the text of a content (a string, or blocks/parts with text), joined by sep
local function text_of(content, sep)
  if type(content) == "string" then return content end
  local parts = {}
  for _, b in ipairs(type(content) == "table" and content or {}) do
    if type(b) == "table" and is_text(b.text) then parts[#parts + 1] = b.text end
  end
  return table.concat(parts, sep or "\n")
end

---------------------------------------------------------------------------
-- to OpenAI

-- the fields of each OpenAI content part type (others are refused by the API)
local OPENAI_PART = { text = "text", image_url = "image_url", input_audio = "input_audio", file = "file",
  refusal = "refusal" }

-- an Anthropic image or PDF -> the part OpenAI takes (base64 as a data URL),
-- or nil when it has no counterpart
local function media_part(b)
  local src = type(b.source) == "table" and b.source or {}
  if b.type == "image" and src.type == "base64" and is_text(src.data) and is_text(src.media_type) then
    return { type = "image_url", image_url = { url = ("data:%s;base64,%s"):format(src.media_type, src.data) } }
  elseif b.type == "image" and src.type == "url" and is_text(src.url) then
    return { type = "image_url", image_url = { url = src.url } }
  elseif b.type == "document" and src.type == "base64" and is_text(src.data) and is_text(src.media_type) then
    return { type = "file", file = { filename = is_text(b.title) and b.title or "document.pdf",
      file_data = ("data:%s;base64,%s"):format(src.media_type, src.data) } }
  elseif b.type == "document" and src.type == "text" and is_text(src.data) then
    return { type = "text", text = src.data }
  elseif b.type == "document" and src.type == "content" then
    return { type = "text", text = text_of(src.content) }
  elseif b.type == "search_result" then
    return { type = "text", text = text_of(b.content) }
  end
end

-- a block or part -> OpenAI's part with only OpenAI's fields | the block as
-- it is (no counterpart) | nil (a hint OpenAI has no place for)
local function openai_part(b)
  if type(b) ~= "table" then return b end
  local field = OPENAI_PART[b.type]
  if field then return { type = b.type, [field] = b[field] } end -- (no cache_control, citations)
  if b.type == "thinking" or b.type == "redacted_thinking" then return nil end
  return media_part(b) or b
end

-- does OpenAI take this content as it is? (its own part types, its own fields)
local function openai_ready(content)
  if type(content) ~= "table" then return true end
  for _, p in ipairs(content) do
    if type(p) == "table" then
      local field = OPENAI_PART[p.type]
      if not field then return false end
      for k in pairs(p) do if k ~= "type" and k ~= field then return false end end
    end
  end
  return true
end

local function copy(m)
  local c = {}
  for k, v in pairs(m) do c[k] = v end
  return c
end

-- an assistant message: text, tool_use blocks as tool_calls (with any
-- tool_calls it had), thinking left out
local function assistant_to_openai(m)
  local out = copy(m)
  local texts, calls = {}, nil
  if type(m.tool_calls) == "table" and #m.tool_calls > 0 then calls = table.move(m.tool_calls, 1, #m.tool_calls, 1, {}) end
  for _, b in ipairs(m.content) do
    if type(b) == "table" and b.type == "tool_use" then
      calls = calls or {}
      local input = b.input
      calls[#calls + 1] = { id = b.id, type = "function", ["function"] = { name = b.name,
        arguments = json.encode(type(input) == "table" and input or {}) } }
    elseif type(b) == "table" and is_text(b.text) then
      texts[#texts + 1] = b.text
    end
  end
  local text = table.concat(texts)
  out.content = (text ~= "" or not calls) and text or nil
  out.tool_calls = calls
  return out
end

-- a user message: each tool_result becomes a tool message (first: OpenAI wants
-- them right after the assistant's calls; a tool message holds text only, so
-- a result's images and PDFs follow in the user message), the rest one user
-- message of parts
local function user_to_openai(m, out)
  local parts, media = {}, {}
  for _, b in ipairs(m.content) do
    if type(b) == "table" and b.type == "tool_result" then
      local texts = {}
      for _, inner in ipairs(type(b.content) == "table" and b.content or { b.content }) do
        local p = openai_part(inner)
        if type(p) == "string" then texts[#texts + 1] = p
        elseif type(p) == "table" and p.type == "text" and is_text(p.text) then texts[#texts + 1] = p.text
        elseif p ~= nil then media[#media + 1] = p end
      end
      local text = table.concat(texts, "\n")
      if b.is_error == true then text = "Error: " .. text end
      out[#out + 1] = { role = "tool", tool_call_id = b.tool_use_id, content = text }
    else
      parts[#parts + 1] = openai_part(b)
    end
  end
  table.move(parts, 1, #parts, #media + 1, media)
  if #media > 0 then
    local msg = copy(m)
    msg.content = media
    out[#out + 1] = msg
  end
end

-- an assistant turn merged by messages.openai gets its texts, joined once
local function close_turn(merged, texts)
  local text = table.concat(texts)
  merged.content = (text ~= "" or not merged.tool_calls) and text or nil
end

-- messages.openai(req) -> the messages of an OpenAI chat completion
function messages.openai(req)
  local out = {}
  if req.system then out[1] = { role = "system", content = text_of(req.system) } end
  -- the last assistant message translated here and its texts: a next one joins it (one turn,
  -- as Anthropic reads it; the texts joined once, not one concatenation per message)
  local merged, texts
  local msgs = req.messages
  local i, m = 1, msgs[1] -- (to the first nil, as ipairs: no iterator call a message, on every request)
  while m ~= nil do
    local content = m.content
    if type(content) ~= "table" or openai_ready(content) then -- (text: the usual message, no call)
      if merged then close_turn(merged, texts); merged, texts = nil, nil end
      out[#out + 1] = m
    elseif m.role == "assistant" then
      local a = assistant_to_openai(m)
      if not merged then
        out[#out + 1] = a
        merged, texts = a, {}
      end
      if is_text(a.content) and a.content ~= "" then texts[#texts + 1] = a.content end
      if merged ~= a then
        for _, c in ipairs(a.tool_calls or {}) do
          merged.tool_calls = merged.tool_calls or {}
          merged.tool_calls[#merged.tool_calls + 1] = c
        end
      end
    else
      if merged then close_turn(merged, texts); merged, texts = nil, nil end
      user_to_openai(m, out)
    end
    i = i + 1
    m = msgs[i]
  end
  if merged then close_turn(merged, texts) end
  return out
end

---------------------------------------------------------------------------
-- to Anthropic

-- the media types Anthropic's base64 sources take
local IMAGE_TYPES = { ["image/jpeg"] = true, ["image/png"] = true, ["image/gif"] = true, ["image/webp"] = true }
local IMAGE_ALIASES = { ["image/jpg"] = "image/jpeg" }
-- an image's type by its first bytes, as base64 writes them: OpenAI reads the bytes and takes
-- a data URL that names another type (image/jpeg for a PNG, as many clients hard-code it),
-- Anthropic refuses it ("Image does not match the provided media type")
local IMAGE_MAGIC = { { "iVBORw0KGgo", "image/png" }, { "/9j/", "image/jpeg" }, { "R0lGOD", "image/gif" },
  { "UklGR", "image/webp" } }
local function sniffed(data)
  for _, m in ipairs(IMAGE_MAGIC) do
    if data:sub(1, #m[1]) == m[1] then return m[2] end
  end
end

-- a tool call's id as Anthropic takes it (^[a-zA-Z0-9_-]+$): OpenAI takes any, and another
-- provider's ("functions.get_weather:0", "call_1|fc_2") was the API's 400 for every later turn.
-- Mapped the same for the call and its result (still paired), with a hash of the id so that
-- two ids one character apart stay two
local function tool_id(id)
  if not is_text(id) or id:find("^[%w_-]+$") then return id end
  return id:gsub("[^%w_-]", "_") .. "_" .. resil.hash(id):sub(1, 8)
end

-- an OpenAI part that Anthropic names otherwise -> its block: an image_url (a
-- base64 data URL or a link) -> an image, a base64 PDF file -> a document.
-- Anthropic's own blocks, and text parts (one shape in both), pass as they are.
local function anthropic_block(p)
  if type(p) ~= "table" then return p end
  if p.type == "image_url" then
    local url = type(p.image_url) == "table" and p.image_url.url or p.image_url
    if not is_text(url) then return p end
    if url:match("^https?://") then return { type = "image", source = { type = "url", url = url } } end
    local media, data = url:match("^data:([^;,]+);base64,(.*)$")
    media = media and (IMAGE_ALIASES[media:lower()] or media:lower())
    if media and IMAGE_TYPES[media] then
      media = sniffed(data) or media
      return { type = "image", source = { type = "base64", media_type = media, data = data } }
    end
  elseif p.type == "file" and type(p.file) == "table" and is_text(p.file.file_data) then
    local data = p.file.file_data:match("^data:application/pdf;base64,(.*)$")
    if data then
      return { type = "document", source = { type = "base64", media_type = "application/pdf", data = data },
        title = is_text(p.file.filename) and p.file.filename or nil }
    end
  elseif p.type == "refusal" and is_text(p.refusal) then
    return { type = "text", text = p.refusal }
  elseif p.type == "tool_use" and tool_id(p.id) ~= p.id then -- (Anthropic's own shape, another provider's id)
    local b = copy(p)
    b.id = tool_id(p.id)
    return b
  elseif p.type == "tool_result" and tool_id(p.tool_use_id) ~= p.tool_use_id then
    local b = copy(p)
    b.tool_use_id = tool_id(p.tool_use_id)
    return b
  end
  return p
end

-- (an empty text part, which OpenAI takes, is left out: Anthropic refuses an empty text block;
-- parts that are all empty are "", a message with nothing to say)
local function content_to_anthropic(content)
  if type(content) ~= "table" then return content end
  local out
  for i, p in ipairs(content) do
    local b = anthropic_block(p)
    if type(b) == "table" and b.type == "text" and b.text == "" and b.cache_control == nil then b = nil end
    if b ~= p and not out then out = table.move(content, 1, i - 1, 1, {}) end
    if out then out[#out + 1] = b end
  end
  if out and #out == 0 and #content > 0 then return "" end
  return out or content
end

-- a tool call's arguments (a JSON string) -> the object a tool_use block's
-- input must be; arguments that are not one (a cut answer's) are {}
local function object_of(arguments)
  local v = is_text(arguments) and json.decode(arguments)
  if type(v) ~= "table" or v[1] ~= nil or getmetatable(v) == json.array_mt then return {} end
  return v
end

-- messages.anthropic(req) -> system, messages. System messages go to the
-- top-level `system`; tool calls and results become content blocks (the
-- results of one turn's parallel calls in one user message, as the API wants
-- them); image_url and PDF file parts become image and document blocks.
-- the system prompt as Anthropic's text blocks, when a system message's parts mark a
-- cache breakpoint (cache_control, as LiteLLM's users send it in OpenAI's shape): joined
-- into one string, the breakpoint was lost and the prompt never cached | nil
local function system_blocks(req, contents)
  local marked = false
  for _, c in ipairs(contents) do
    for _, p in ipairs(type(c) == "table" and c or {}) do
      if type(p) == "table" and p.cache_control ~= nil then marked = true end
    end
  end
  if not marked then return nil end
  local blocks = {}
  local function add(content)
    if type(content) == "string" then
      blocks[#blocks + 1] = { type = "text", text = content }
      return
    end
    for _, p in ipairs(type(content) == "table" and content or {}) do
      if type(p) == "table" and is_text(p.text) then
        blocks[#blocks + 1] = { type = "text", text = p.text, cache_control = p.cache_control }
      end
    end
  end
  if req.system then add(req.system) end
  for _, c in ipairs(contents) do add(c) end
  return blocks
end

function messages.anthropic(req)
  local system = { req.system and text_of(req.system) or nil }
  local system_contents -- the system messages' contents
  local out = {}
  local results -- the user message the last tool messages went into
  for _, m in ipairs(req.messages) do
    local last_results = results
    results = nil
    local calls = m.role == "assistant" and type(m.tool_calls) == "table" and #m.tool_calls > 0
    if m.role == "system" or m.role == "developer" then
      system[#system + 1] = text_of(m.content)
      system_contents = system_contents or {}
      system_contents[#system_contents + 1] = m.content
    elseif m.role == "tool" then
      local block = { type = "tool_result", tool_use_id = tool_id(m.tool_call_id), content = text_of(m.content) }
      for _, p in ipairs(type(m.content) == "table" and m.content or {}) do -- (a part's cache breakpoint)
        if type(p) == "table" and p.cache_control ~= nil then block.cache_control = p.cache_control end
      end
      if last_results then
        last_results.content[#last_results.content + 1] = block
        results = last_results
      else
        results = { role = "user", content = { block } }
        out[#out + 1] = results
      end
    elseif calls then
      local blocks = {}
      local text = m.content ~= null and text_of(m.content, "") or ""
      if text ~= "" then blocks[1] = { type = "text", text = text } end
      for _, c in ipairs(m.tool_calls) do
        local f = type(c) == "table" and c["function"] or {}
        blocks[#blocks + 1] = { type = "tool_use", id = tool_id(c.id), name = f.name, input = object_of(f.arguments) }
      end
      out[#out + 1] = { role = "assistant", content = blocks }
    else
      local content = m.content
      if content == nil or content == null then content = "" end
      content = content_to_anthropic(content)
      -- an assistant turn that said nothing (an OpenAI refusal: its text in `refusal`) is its
      -- refusal, else left out: the API refuses empty content but in the last message, and an
      -- app that sends back the SDK's message as it came got a 400
      if content == "" and m.role == "assistant" and is_text(m.refusal) then content = m.refusal end
      if content ~= "" or m.role ~= "assistant" or m == req.messages[#req.messages] then
        out[#out + 1] = { role = m.role, content = content }
      end
    end
  end
  -- a last assistant message (a prefill) ends without whitespace: OpenAI takes one, Anthropic
  -- refuses it ("final assistant content cannot end with trailing whitespace"). Cut by one
  -- anchored match: gsub("%s+$") tried the rest of the text from every space in it, 31 s of a
  -- gateway's loop for "a", 20,000 spaces, "b" (one C call: no watchdog can stop it)
  local function trim_end(text) return text:match("^(.*%S)") or "" end
  local last = out[#out]
  if last and last.role == "assistant" then
    if type(last.content) == "string" then
      last.content = trim_end(last.content)
    elseif type(last.content) == "table" then
      local b = last.content[#last.content]
      if type(b) == "table" and b.type == "text" and is_text(b.text) and b.text:find("%s$") then
        local trimmed = copy(b)
        trimmed.text = trim_end(b.text)
        local content = table.move(last.content, 1, #last.content - 1, 1, {})
        if trimmed.text ~= "" then content[#content + 1] = trimmed end
        last.content = #content > 0 and content or ""
      end
    end
  end
  -- a system given as content blocks (prompt caching) is kept as blocks
  if type(req.system) == "table" and #system == 1 then return req.system, out end
  local blocks = system_contents and system_blocks(req, system_contents)
  if blocks then return blocks, out end
  return #system > 0 and table.concat(system, "\n\n") or nil, out
end

-- Stops (normalized finish reasons) that are the model's answer without
-- text: its limit, a refusal or content filter (often with no content at
-- all), a turn paused in a server tool (its blocks are the content). Taken
-- as empty output, each was retried, paid again, and its caller got none.
messages.answered_empty = { length = true, content_filter = true, pause = true }

return messages
