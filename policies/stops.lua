-- policies/stops.lua: stop sequences kept where the provider was not sent them.
--
-- A whitespace-only one ("\n", common in OpenAI clients) that Anthropic refuses, those past
-- OpenAI's four, any for a reasoning model that takes none (an alias's or a fallback's: the
-- adapters leave them out, policies/providers/*.lua). Served on past them, a caller that asked
-- for a line got a paragraph, one that stops at "</answer>" what followed it. A provider that was
-- sent a stop ends before it and never writes it, so an answer is cut at the first one it holds,
-- whichever was left out: policies.ai cuts a chat's answer (ai.chat), the gateway what it relays
-- or translates, streams included.
local stops = {}
-- The first MAX, each at most BYTES, are kept (each delta of a stream is looked at for each: a
-- client's thousand stops of 100 KB were seconds of the loop per delta).
stops.MAX, stops.BYTES = 16, 256

-- a stop field (a string or a list) -> the first MAX non-empty strings of at most BYTES | nil
function stops.list(stop)
  if type(stop) == "string" then stop = { stop } end
  if type(stop) ~= "table" then return nil end
  local out
  for i, s in ipairs(stop) do
    if i > stops.MAX then break end
    if type(s) == "string" and s ~= "" and #s <= stops.BYTES then
      out = out or {}
      out[#out + 1] = s
    end
  end
  return out
end

-- the stop sequences a client's body gives (OpenAI's stop, a string or a list; Anthropic's
-- stop_sequences), as stops.list keeps them | nil
function stops.of(b, api)
  -- (vLLM's include_stop_str_in_output: the client asked for the stop in its answer)
  if api ~= "anthropic" and b.include_stop_str_in_output == true then return nil end
  local stop = api == "anthropic" and b.stop_sequences or b.stop
  if stop == nil then return nil end -- (the usual request: no type() calls)
  return stops.list(stop)
end

-- where text holds the first of list, and which | nil
function stops.find(text, list)
  local at, which
  for _, s in ipairs(list) do
    local i = text:find(s, 1, true)
    if i and (not at or i < at) then at, which = i, s end
  end
  return at, which
end
-- a whole answer cut at the first stop: what followed it (text, tool calls) was never asked for
function stops.cut(res, list)
  local at, which = stops.find(res.text or "", list)
  if at then
    res.text, res.finish_reason, res.tool_calls = res.text:sub(1, at - 1), "stop", nil
    res.stop_reason, res.stop_sequence, res.refusal = "stop_sequence", which, nil
  end
end
-- content given as a list of parts (Mistral's reasoning models: text and thinking parts; OpenAI's
-- content parts): its text is that of its text parts (a thinking part's is not the answer)
local function is_text_part(part)
  return type(part) == "table" and type(part.text) == "string" and (part.type == "text" or part.type == nil)
end
-- such a list cut where its text parts, joined, hold the first stop -> true if it held one
local function cut_parts(parts, list)
  local texts = {}
  for _, part in ipairs(parts) do
    if is_text_part(part) then texts[#texts + 1] = part.text end
  end
  local at = texts[1] and stops.find(table.concat(texts), list)
  if not at then return false end
  local before, n = 0, #parts -- (the text bytes in the parts before; the parts past the stop left out)
  for i = 1, n do
    local part = parts[i]
    if is_text_part(part) then
      if before + #part.text >= at then
        part.text = part.text:sub(1, at - 1 - before)
        for j = n, i + 1, -1 do parts[j] = nil end
        break
      end
      before = before + #part.text
    end
  end
  return true
end

-- a relayed OpenAI answer (a reasoning model an alias serves, which was sent no stop) cut as
-- stops.cut; its content a string, or a list of parts (Mistral's: a stop in them was missed)
function stops.cut_raw(raw, list)
  local choice = type(raw.choices) == "table" and raw.choices[1]
  local message = type(choice) == "table" and type(choice.message) == "table" and choice.message
  local content = message and message.content
  local met = false
  if type(content) == "string" then
    local at = stops.find(content, list)
    if at then message.content, met = content:sub(1, at - 1), true end
  elseif type(content) == "table" then
    met = cut_parts(content, list)
  end
  if met then choice.finish_reason, message.tool_calls = "stop", nil end
end
-- a relayed OpenAI chunk's text through a cutter -> the stop it met | nil (the chunk then ends the
-- answer); the last chunk (its finish_reason) carries what the cutter held. A delta's content may
-- be a list of parts (see cut_parts): each text part through the cutter, the parts after a stop
-- left out.
function stops.through(cutter, data)
  local choice = type(data.choices) == "table" and data.choices[1]
  local delta = type(choice) == "table" and type(choice.delta) == "table" and choice.delta
  if not delta then return nil end
  local parts = type(delta.content) == "table" and delta.content or nil
  local text, met = "", nil
  if parts then
    local n = #parts
    for i = 1, n do
      local part = parts[i]
      if is_text_part(part) then
        part.text, met = cutter.feed(part.text)
        if met then
          for j = n, i + 1, -1 do parts[j] = nil end
          break
        end
      end
    end
  else
    text, met = cutter.feed(type(delta.content) == "string" and delta.content or "")
  end
  if met then
    choice.finish_reason, delta.tool_calls = "stop", nil
  elseif type(choice.finish_reason) == "string" then
    text = text .. cutter.rest()
  end
  if parts then
    if text ~= "" then parts[#parts + 1] = { type = "text", text = text } end
  elseif type(delta.content) == "string" or text ~= "" then
    delta.content = text
  end
  return met
end
-- a stream's deltas through the stops: feed(delta) -> the text to send now, the stop it met | nil;
-- the tail that may begin a stop is held until the next delta says (rest() at the end)
function stops.cutter(list)
  local held = ""
  local c = {}
  function c.feed(delta)
    local text = held .. delta
    local at, which = stops.find(text, list)
    if at then
      held = ""
      return text:sub(1, at - 1), which
    end
    -- (the longest tail that begins a stop: tried only where the stop's first byte is, in its last
    -- #s - 1 bytes, the longest first)
    local keep = 0
    for _, s in ipairs(list) do
      local first = s:sub(1, 1)
      local p = text:find(first, math.max(1, #text - #s + 2), true)
      while p and #text - p + 1 > keep do
        if text:sub(p) == s:sub(1, #text - p + 1) then keep = #text - p + 1 break end
        p = text:find(first, p + 1, true)
      end
    end
    held = text:sub(#text - keep + 1)
    return text:sub(1, #text - keep), nil
  end
  function c.rest() return held end
  return c
end

return stops
