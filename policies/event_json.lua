-- policies/event_json.lua: a streamed event's JSON, read as the SDKs read it.
--
--   local event_json = require "policies.event_json"
--   local chunk = event_json(state, ev.data)   -- state: the stream's, kept across its events
--
-- A provider that cuts its text into deltas by UTF-16 code unit (a JavaScript
-- server slicing a string, JSON.stringify escaping each half) sends an emoji
-- as two events: "\ud83d" ending one delta, "\udc4b" starting the next. The
-- SDKs' JSON.parse takes a lone surrogate and their concatenation joins the
-- halves; cjson refuses one, and the stream broke ("an event that is not
-- JSON") where the client of the provider itself saw the emoji. A high half
-- ending a field's string is carried to the next event's string of the same
-- field (content, text, partial_json, arguments): joined with the low half
-- that starts it, or U+FFFD where it does not (where the broken character
-- stood in the text the deltas make). Any other lone surrogate reads as
-- U+FFFD, as a lenient UTF-8 decoder reads a broken character. Only an event
-- cjson refuses is looked at (and the one after a carried half).
local resil = require "resil"
local json = resil.json

local QUOTE, BACKSLASH, U = 34, 92, 117

-- the surrogate whose escape starts at i (its 4 hex digits) | nil
local function surrogate_at(data, i)
  if data:byte(i + 1) ~= U then return nil end
  local v = tonumber(data:sub(i + 2, i + 5), 16)
  return v and v >= 0xD800 and v <= 0xDFFF and v or nil
end

-- the name of the field whose string holds position i | nil: the last `"name":"` before it,
-- with no quote of its own between (escapes aside)
local function field_at(data, i)
  local name, from
  for n, at in data:gmatch('"([%w_]+)"%s*:%s*"()') do
    if at > i then break end
    name, from = n, at
  end
  if name and not data:sub(from, i - 1):gsub("\\.", ""):find('"', 1, true) then return name end
end

-- data with the high half the last event carried (pending = {field, half}) put at the start of
-- its field's string -> data
local function carry_in(data, pending)
  local at = data:match('"' .. pending.field .. '"%s*:%s*"()')
  if not at then return data end -- (its field's text did not go on: the half is lost with it)
  local v = data:byte(at) == BACKSLASH and surrogate_at(data, at)
  return data:sub(1, at - 1) .. (v and v >= 0xDC00 and pending.half or "\\ufffd") .. data:sub(at)
end

-- data with its surrogate pairs whole -> the mended text, and the high half a field's string
-- ends with (carried to the next event) | nil
local function mend(data)
  local out, at, carried = {}, 1, nil
  local i = data:find("\\", 1, true)
  while i do
    local step, v = 2, surrogate_at(data, i)
    if v then
      step = 6
      local low = data:byte(i + 6) == BACKSLASH and surrogate_at(data, i + 6)
      local field = v <= 0xDBFF and not low and data:byte(i + 6) == QUOTE and field_at(data, i)
      if v <= 0xDBFF and low and low >= 0xDC00 then
        step = 12 -- a pair, whole
      elseif field then -- a high half ending its field's string: carried
        out[#out + 1] = data:sub(at, i - 1)
        at, carried = i + 6, { field = field, half = data:sub(i, i + 5) }
      else
        out[#out + 1] = data:sub(at, i - 1) .. "\\ufffd"
        at = i + 6
      end
    end
    i = data:find("\\", i + step, true)
  end
  out[#out + 1] = data:sub(at)
  return table.concat(out), carried
end

-- event_json(state, data) -> the decoded value | nil (not JSON)
return function(state, data)
  local pending = state.surrogate
  if pending == nil then
    local v = json.decode(data)
    if v ~= nil or type(data) ~= "string" then return v end
  else
    state.surrogate = nil
    data = carry_in(data, pending)
  end
  if not data:find("\\u[dD]%x%x%x") then return json.decode(data) end
  local mended, carried = mend(data)
  state.surrogate = carried
  return json.decode(mended)
end
