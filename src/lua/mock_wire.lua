-- src/lua/mock_wire.lua: what each provider's API refuses in a conversation,
-- for the strict mock (src/lua/mock.lua). A request that mixes the two wire
-- formats (an Anthropic `tool_use` block sent to OpenAI, an OpenAI
-- `image_url` part sent to Anthropic) is refused here as the real APIs refuse
-- it, with their messages, so a translation we got wrong fails a spec instead
-- of passing our own mock.
local resil = ...
local json = resil.json
local null = json.null

local wire = {}

local function set(words)
  local s = {}
  for w in words:gmatch("%S+") do s[w] = true end
  return s
end

-- OpenAI: the content part types each role takes
local OPENAI_PARTS = {
  user = set "text image_url input_audio file",
  system = set "text", developer = set "text", tool = set "text", ["function"] = set "text",
  assistant = set "text refusal",
}
local OPENAI_PART_LIST = "'text', 'image_url', 'input_audio', 'refusal', 'audio', and 'file'"

-- wire.openai_messages(messages) -> nil | message, param
function wire.openai_messages(messages)
  local awaiting -- tool_call_ids of the last assistant message still unanswered: id -> true
  local function unanswered()
    local ids = {}
    for id in pairs(awaiting or {}) do ids[#ids + 1] = id end
    table.sort(ids)
    return #ids > 0 and table.concat(ids, ", ") or nil
  end
  for i, m in ipairs(messages) do
    local at = ("messages[%d]"):format(i - 1)
    if type(m) ~= "table" or not OPENAI_PARTS[m.role] then
      return ("Invalid value: '%s'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', "
        .. "and 'developer'."):format(type(m) == "table" and tostring(m.role) or "?"), at .. ".role"
    end
    if m.role == "tool" then
      if type(m.tool_call_id) ~= "string" then
        return "Missing required parameter: '" .. at .. ".tool_call_id'.", at .. ".tool_call_id"
      end
      if not (awaiting and awaiting[m.tool_call_id]) then
        return "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
          .. "'tool_calls'.", at .. ".role"
      end
      awaiting[m.tool_call_id] = nil
    else
      local left = unanswered()
      if left then
        return "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
          .. "'tool_call_id'. The following tool_call_ids did not have response messages: " .. left, "messages"
      end
      awaiting = nil
    end
    local c = m.content
    local calls = m.role == "assistant" and m.tool_calls ~= nil and m.tool_calls ~= null
    if c == nil or c == null then
      if not calls then return "Missing required parameter: '" .. at .. ".content'.", at .. ".content" end
    elseif type(c) == "table" then
      if #c == 0 then
        return ("Invalid '%s.content': empty array. Expected an array with minimum length 1, but got an empty array "
          .. "instead."):format(at), at .. ".content"
      end
      for j, p in ipairs(c) do
        local where = ("%s.content[%d]"):format(at, j - 1)
        local t = type(p) == "table" and p.type
        if type(t) ~= "string" then return "Missing required parameter: '" .. where .. ".type'.", where .. ".type" end
        if not OPENAI_PARTS[m.role][t] then
          return ("Invalid value: '%s'. Supported values are: %s."):format(t, OPENAI_PART_LIST), where .. ".type"
        end
        for k in pairs(p) do
          if k ~= "type" and k ~= t then
            return ("Unrecognized request argument supplied: %s"):format(k), where .. "." .. k
          end
        end
        if t == "image_url" and (type(p.image_url) ~= "table" or type(p.image_url.url) ~= "string") then
          return "Missing required parameter: '" .. where .. ".image_url.url'.", where .. ".image_url.url"
        end
        if t == "text" and type(p.text) ~= "string" then
          return "Missing required parameter: '" .. where .. ".text'.", where .. ".text"
        end
      end
    elseif type(c) ~= "string" then
      return ("Invalid type for '%s.content': expected one of a string or array of objects."):format(at),
        at .. ".content"
    end
    if calls then
      if type(m.tool_calls) ~= "table" then return "Invalid type for '" .. at .. ".tool_calls'.", at .. ".tool_calls" end
      if #m.tool_calls == 0 then
        return ("Invalid '%s.tool_calls': empty array. Expected an array with minimum length 1, but got an empty "
          .. "array instead."):format(at), at .. ".tool_calls"
      end
      awaiting = {}
      for j, call in ipairs(m.tool_calls) do
        -- a function call {id, function = {name, arguments}}, or a custom tool's {id, custom = {name, input}}
        local f = type(call) == "table" and (call.type == "custom" and call.custom or call["function"])
        local args = type(f) == "table" and (call.type == "custom" and f.input or f.arguments)
        if type(call) ~= "table" or type(call.id) ~= "string" or type(f) ~= "table" or type(f.name) ~= "string"
          or type(args) ~= "string" then
          return ("Missing required parameter: '%s.tool_calls[%d]'."):format(at, j - 1), ("%s.tool_calls[%d]"):format(at, j - 1)
        end
        awaiting[call.id] = true
      end
    end
  end
  return nil
end

-- wire.openai_tools(tools) -> nil | message, param: a tool is a function ({type, function =
-- {name, ...}}) or a custom tool ({type, custom = {name, ...}}); another API's shape (Anthropic's
-- {name, input_schema}, with or without type = "custom") is refused as the API refuses it
function wire.openai_tools(tools)
  if tools == nil or tools == null then return nil end
  if type(tools) ~= "table" then return "Invalid type for 'tools': expected an array of objects.", "tools" end
  for i, t in ipairs(tools) do
    local at = ("tools[%d]"):format(i - 1)
    if type(t) ~= "table" or type(t.type) ~= "string" then
      return "Missing required parameter: '" .. at .. ".type'.", at .. ".type"
    end
    if t.type ~= "function" and t.type ~= "custom" then
      return ("Invalid value: '%s'. Supported values are: 'function' and 'custom'."):format(t.type), at .. ".type"
    end
    local inner = t[t.type]
    if type(inner) ~= "table" then
      return ("Missing required parameter: '%s.%s'."):format(at, t.type), ("%s.%s"):format(at, t.type)
    end
    for k in pairs(t) do
      if k ~= "type" and k ~= t.type then return ("Unknown parameter: '%s.%s'."):format(at, k), ("%s.%s"):format(at, k) end
    end
    local name = inner.name
    if type(name) ~= "string" then
      return ("Missing required parameter: '%s.%s.name'."):format(at, t.type), ("%s.%s.name"):format(at, t.type)
    end
    if not name:match("^[%w_%-]+$") or #name > 64 then
      return ("Invalid '%s.%s.name': string does not match pattern. Expected a string that matches the pattern "
        .. "'^[a-zA-Z0-9_-]+$'."):format(at, t.type), ("%s.%s.name"):format(at, t.type)
    end
  end
  return nil
end

-- wire.openai_tool_choice(choice, tools) -> nil | message, param: a choice that names a function
-- (or a custom tool) names one of the request's tools
function wire.openai_tool_choice(choice, tools)
  if type(choice) ~= "table" or (choice.type ~= "function" and choice.type ~= "custom") then return nil end
  local inner = choice[choice.type]
  local name = type(inner) == "table" and inner.name
  if type(name) ~= "string" then return nil end
  for _, t in ipairs(type(tools) == "table" and tools or {}) do
    local f = type(t) == "table" and t[t.type]
    if type(f) == "table" and f.name == name then return nil end
  end
  return ("Invalid value for 'tool_choice': %s '%s' not found in 'tools'."):format(choice.type, name), "tool_choice"
end

-- wire.anthropic_tool_choice(choice, tools) -> nil | message: a choice of type tool names one of
-- the request's tools
function wire.anthropic_tool_choice(choice, tools)
  if type(choice) ~= "table" or choice.type ~= "tool" or type(choice.name) ~= "string" then return nil end
  for _, t in ipairs(type(tools) == "table" and tools or {}) do
    if type(t) == "table" and t.name == choice.name then return nil end
  end
  return ("tool_choice: tool '%s' not found in the request's tools"):format(choice.name)
end

-- wire.anthropic_tools(tools) -> nil | message: a custom tool (no type, or type "custom") has a
-- name and an input_schema of type object; a server tool names its versioned type
-- ("web_search_20250305"); OpenAI's shape ({type = "function", function = {...}}) is refused
function wire.anthropic_tools(tools)
  if tools == nil or tools == null then return nil end
  if type(tools) ~= "table" then return "tools: Input should be a valid list" end
  local names = {}
  for _, t in ipairs(tools) do
    local name = type(t) == "table" and t.name
    if type(name) == "string" then
      if names[name] then return "tools: Tool names must be unique." end
      names[name] = true
    end
  end
  for i, t in ipairs(tools) do
    local at = ("tools.%d"):format(i - 1)
    if type(t) ~= "table" then return at .. ": Input should be a valid dictionary" end
    local kind = t.type
    if kind == nil or kind == null or kind == "custom" then
      if type(t.name) ~= "string" then return at .. ".custom.name: Field required" end
      if not t.name:match("^[%w_%-]+$") or #t.name > 128 then
        return at .. ".custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'"
      end
      if type(t.input_schema) ~= "table" then return at .. ".custom.input_schema: Field required" end
      if t.input_schema.type ~= "object" then return at .. ".custom.input_schema.type: Input should be 'object'" end
    elseif type(kind) ~= "string" or not kind:match("_%d%d%d%d%d%d%d%d$") and kind ~= "mcp_toolset" then
      return ("%s: Input tag '%s' found using 'type' does not match any of the expected tags: 'custom', "
        .. "'bash_20250124', 'code_execution_20250825', 'text_editor_20250728', 'web_search_20250305', "
        .. "'web_fetch_20250910', 'mcp_toolset'"):format(at, tostring(kind))
    end
  end
  return nil
end

-- Anthropic: the block types the Messages API knows
local ANTHROPIC_BLOCKS = set [[text image document search_result thinking redacted_thinking tool_use
  tool_result server_tool_use web_search_tool_result web_fetch_tool_result code_execution_tool_result
  bash_code_execution_tool_result text_editor_code_execution_tool_result tool_search_tool_result
  container_upload mcp_tool_use mcp_tool_result]]
local TOOL_RESULT_BLOCKS = set "text image document search_result tool_reference"
local IMAGE_TYPES = set "image/jpeg image/png image/gif image/webp"
local ANTHROPIC_BLOCK_LIST = "'text', 'image', 'document', 'search_result', 'thinking', 'redacted_thinking', "
  .. "'tool_use', 'tool_result', 'server_tool_use', 'web_search_tool_result'"

local function blocks_of(content)
  if type(content) == "table" then return content end
  return {}
end

-- an image's type by its first bytes, as base64 writes them (PNG, JPEG, GIF, WebP) | nil
local IMAGE_MAGIC = { { "iVBORw0KGgo", "image/png" }, { "/9j/", "image/jpeg" }, { "R0lGOD", "image/gif" },
  { "UklGR", "image/webp" } }
local function sniffed(data)
  for _, m in ipairs(IMAGE_MAGIC) do
    if data:sub(1, #m[1]) == m[1] then return m[2] end
  end
end

local function check_source(b, where)
  local s = b.source
  if type(s) ~= "table" then return where .. ".source: Field required" end
  if s.type == "base64" then
    if type(s.media_type) ~= "string" or type(s.data) ~= "string" then
      return where .. ".source.base64: media_type and data are required"
    end
    if b.type == "image" and not IMAGE_TYPES[s.media_type] then
      return where .. ".source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
    end
    -- (the API reads the image's bytes: a PNG named image/jpeg, which OpenAI takes, is refused)
    local actual = b.type == "image" and sniffed(s.data)
    if actual and actual ~= s.media_type then
      return ("%s.source.base64: Image does not match the provided media type %s"):format(where, s.media_type)
    end
    if b.type == "document" and s.media_type ~= "application/pdf" then
      return where .. ".source.base64.media_type: Input should be 'application/pdf'"
    end
  elseif s.type == "url" then
    if type(s.url) ~= "string" then return where .. ".source.url.url: Field required" end
  elseif not (b.type == "document" and (s.type == "text" or s.type == "content")) and s.type ~= "file" then
    return ("%s.source: Input tag '%s' found using 'type' does not match any of the expected tags: 'base64', "
      .. "'url', 'file'"):format(where, tostring(s.type))
  end
end

-- a tool_use of the turn before (at index `turn`) that this turn did not answer -> the API's message | nil
local function unanswered_use(uses, answered, turn)
  for id in pairs(uses) do
    if not answered[id] then
      return ("messages.%d: `tool_use` ids were found without `tool_result` blocks immediately after: %s. "
        .. "Each `tool_use` block must have a corresponding `tool_result` block in the next message.")
        :format(turn - 1, id)
    end
  end
end

-- wire.anthropic_tools_defined(messages, tools) -> nil | message: a conversation holding tool
-- calls or results is sent with its tools (the API refuses it without, even where none is to be
-- called: a last turn that sums up)
function wire.anthropic_tools_defined(messages, tools)
  if type(tools) == "table" and #tools > 0 then return nil end
  for _, m in ipairs(type(messages) == "table" and messages or {}) do
    for _, b in ipairs(type(m) == "table" and type(m.content) == "table" and m.content or {}) do
      if type(b) == "table" and (b.type == "tool_use" or b.type == "tool_result") then
        return "Requests which include tool_use or tool_result blocks must define tools."
      end
    end
  end
  return nil
end

-- wire.anthropic_thinking_turn(messages) -> nil | message: with extended thinking enabled, the
-- last assistant turn of a tool loop (the conversation ends in its tool results) starts with its
-- thinking, as the API answered it: one without (written by another API's model, which thinks
-- nothing back) is refused
function wire.anthropic_thinking_turn(messages)
  if type(messages) ~= "table" then return nil end
  local i = #messages
  local results = false
  while i >= 1 and type(messages[i]) == "table" and messages[i].role == "user" do
    for _, b in ipairs(blocks_of(messages[i].content)) do
      if type(b) == "table" and b.type == "tool_result" then results = true end
    end
    i = i - 1
  end
  if not results then return nil end
  local first = i -- (the assistant turn: its consecutive messages are one)
  while first > 1 and type(messages[first - 1]) == "table" and messages[first - 1].role == "assistant" do
    first = first - 1
  end
  local uses, lead = false, nil
  for k = first, i do
    for _, b in ipairs(blocks_of(type(messages[k]) == "table" and messages[k].content)) do
      if type(b) == "table" then
        lead = lead or b
        if b.type == "tool_use" then uses = true end
      end
    end
  end
  if not uses or lead.type == "thinking" or lead.type == "redacted_thinking" then return nil end
  return ("messages.%d.content.0.type: Expected `thinking` or `redacted_thinking`, but found `%s`. When "
    .. "`thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the "
    .. "lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from "
    .. "previous turns. To avoid this requirement, disable `thinking`. Please consult our documentation at "
    .. "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"):format(first - 1, tostring(lead.type))
end

-- wire.anthropic_messages(messages) -> nil | message. Consecutive messages of
-- one role are one turn, as the API combines them.
function wire.anthropic_messages(messages)
  local prev_uses, prev_turn = {}, nil -- the tool_use ids of the previous turn
  local uses, role, turn_start = {}, nil, nil
  local answered = {}
  local before_results -- a user turn's first block that is not a tool_result, where results are due
  local function close_turn()
    if role == "assistant" then prev_uses, prev_turn = uses, turn_start else prev_uses, prev_turn = {}, nil end
  end
  for i, m in ipairs(messages) do
    if m.role ~= role then
      -- a turn that follows tool_use must answer each of them
      local bad = role == "user" and unanswered_use(prev_uses, answered, prev_turn)
      if bad then return bad end
      close_turn()
      role, uses, turn_start, answered, before_results = m.role, {}, i, {}, nil
    end
    -- (the last message may be empty when it is the assistant's, a prefill of nothing; a user's never)
    if (m.content == "" or type(m.content) == "table" and #m.content == 0) and (i < #messages or m.role ~= "assistant") then
      return ("messages.%d: all messages must have non-empty content except for the optional final assistant "
        .. "message"):format(i - 1)
    end
    for j, b in ipairs(blocks_of(m.content)) do
      local where = ("messages.%d.content.%d"):format(i - 1, j - 1)
      if m.role == "user" and next(prev_uses) and type(b) == "table" and b.type ~= "tool_result" then
        before_results = before_results or j
      end
      if not ANTHROPIC_BLOCKS[b.type] then
        return ("%s: Input tag '%s' found using 'type' does not match any of the expected tags: %s")
          :format(where, tostring(b.type), ANTHROPIC_BLOCK_LIST)
      end
      if b.type == "text" and type(b.text) ~= "string" then return where .. ".text.text: Field required" end
      -- (an answer translated from another API with no text, sent back as it came, is one)
      if b.type == "text" and b.text == "" then return "messages: text content blocks must be non-empty" end
      if b.type == "image" or b.type == "document" then
        local bad = check_source(b, where .. "." .. b.type)
        if bad then return bad end
      elseif b.type == "tool_use" then
        if m.role ~= "assistant" then return where .. ": tool_use blocks are only allowed in assistant messages" end
        if type(b.id) ~= "string" or type(b.name) ~= "string" or type(b.input) ~= "table" or b.input[1] ~= nil
          or getmetatable(b.input) == json.array_mt then
          return where .. ".tool_use: id, name and input (an object) are required"
        end
        -- (OpenAI takes any id: another provider's "functions.get:0" is refused here)
        if not b.id:find("^[%w_-]+$") then
          return where .. ".tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
        end
        if uses[b.id] then return where .. ": `tool_use` ids must be unique" end
        uses[b.id] = true
      elseif b.type == "tool_result" then
        if m.role ~= "user" then return where .. ": tool_result blocks are only allowed in user messages" end
        -- (the results come first in the turn that answers tool calls: a text before them is the
        -- API's 400, its tool_use unanswered "immediately after")
        local early = before_results and unanswered_use(prev_uses, answered, prev_turn)
        if early then return early end
        if not prev_uses[b.tool_use_id] then
          return ("messages.%d.content.%d: unexpected `tool_use_id` found in `tool_result` blocks: %s. Each "
            .. "`tool_result` block must have a corresponding `tool_use` block in the previous message.")
            :format(i - 1, j - 1, tostring(b.tool_use_id))
        end
        answered[b.tool_use_id] = true
        if type(b.content) == "table" then
          for k, inner in ipairs(b.content) do
            if type(inner) ~= "table" or not TOOL_RESULT_BLOCKS[inner.type] then
              return ("%s.tool_result.content.%d: Input tag '%s' found using 'type' does not match any of the "
                .. "expected tags: 'text', 'image', 'document', 'search_result', 'tool_reference'")
                :format(where, k - 1, tostring(type(inner) == "table" and inner.type))
            end
            if inner.type == "image" or inner.type == "document" then
              local bad = check_source(inner, ("%s.tool_result.content.%d.%s"):format(where, k - 1, inner.type))
              if bad then return bad end
            end
          end
        end
      end
    end
  end
  -- a prefill that ends in whitespace (OpenAI takes one) is refused
  local last = messages[#messages]
  if type(last) == "table" and last.role == "assistant" then
    local text = last.content
    if type(text) == "table" then
      local b = text[#text]
      text = type(b) == "table" and b.type == "text" and b.text or nil
    end
    if type(text) == "string" and text:find("%s$") then
      return "messages: final assistant content cannot end with trailing whitespace"
    end
  end
  return role == "user" and unanswered_use(prev_uses, answered, prev_turn) or nil
end

return wire
