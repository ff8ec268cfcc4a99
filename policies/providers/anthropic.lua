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
local messages = require "policies.messages"
local event_json = require "policies.event_json"

local anthropic = {
  name = "anthropic",
  key_env = "ANTHROPIC_API_KEY",
  base_env = "ANTHROPIC_BASE_URL",
  default_base = "https://api.anthropic.com",
  version = "2023-06-01",
  -- the API has no default: a request without max_tokens (one that fell back
  -- from OpenAI, say) gets this many
  default_max_tokens = 4096,
  -- the API runs its own tools (web_search_20250305, code_execution_...): policies.ai leaves a
  -- target whose adapter does not say this out of a call that names one
  server_tools = true,
}

local PASSED = { "temperature", "top_p", "top_k", "metadata", "thinking", "service_tier" }

function anthropic.url(base) return base .. "/v1/messages" end

-- Token counting (free, exact, rate-limited apart from messages): the gateway asks it for an
-- Anthropic client's messages.countTokens, whose body is already this API's (its model swapped in)
function anthropic.count_tokens_url(base) return base .. "/v1/messages/count_tokens" end
local without_unthought -- (below: a tool loop a fallback served is counted as it is sent)
function anthropic.count_tokens_body(b, model)
  b.model = model
  without_unthought(b)
  return b
end

function anthropic.headers(key, conf)
  local h = { ["content-type"] = "application/json", accept = "application/json",
    ["anthropic-version"] = conf and conf.version or anthropic.version }
  if key then h["x-api-key"] = key end
  if conf and conf.beta then h["anthropic-beta"] = conf.beta end
  return h
end

-- OpenAI-shaped tools ({type="function", function={...}}) become Anthropic's
local function tools_of(tools)
  if type(tools) ~= "table" or #tools == 0 then return nil end
  local out = {}
  for i, t in ipairs(tools) do
    local f = type(t) == "table" and t["function"]
    if f then
      -- (a cache breakpoint on the tool, as LiteLLM's users mark one in OpenAI's shape, is kept)
      out[i] = { name = f.name, description = f.description, input_schema = f.parameters or { type = "object" },
        cache_control = t.cache_control }
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
  -- OpenAI's allowed_tools: its mode over the tools it allows (anthropic.body sends those only)
  if type(choice) == "table" and choice.type == "allowed_tools" and type(choice.allowed_tools) == "table" then
    return { type = choice.allowed_tools.mode == "required" and "any" or "auto" }
  end
  return choice
end

-- the tools an OpenAI allowed_tools choice allows, of those translated | tools
local function allowed_of(tools, choice)
  local allowed = type(choice) == "table" and choice.type == "allowed_tools" and type(choice.allowed_tools) == "table"
    and type(choice.allowed_tools.tools) == "table" and choice.allowed_tools.tools
  if not allowed or not tools then return tools end
  local names = {}
  for _, a in ipairs(allowed) do
    local f = type(a) == "table" and (type(a["function"]) == "table" and a["function"] or a) or {}
    if type(f.name) == "string" then names[f.name] = true end
  end
  local out = {}
  for _, t in ipairs(tools) do
    if type(t) ~= "table" or t.name == nil or names[t.name] then out[#out + 1] = t end
  end
  return out[1] and out or nil -- (none: nil, never "tools": {}, an object the API refuses)
end

-- OpenAI's stop (a string or a list) as stop_sequences, without the empty or
-- whitespace-only ones the API refuses ("\n" is a common one of OpenAI clients:
-- a 400 that failed every such request served by, or falling back to, Anthropic) | nil
local function stop_sequences_of(stop)
  if type(stop) == "string" then stop = { stop } end
  if type(stop) ~= "table" then return nil end
  local out = {}
  for _, s in ipairs(stop) do
    if type(s) ~= "string" or s:find("%S") then out[#out + 1] = s end
  end
  return #out > 0 and out or nil
end

-- the most output tokens a model writes, first match by name (the API refuses a max_tokens past
-- it: an OpenAI client's 64000, falling back to Opus 4.1, failed there); a model not here is sent
-- any. Past it, a model the request did not name (a fallback, an alias's target) is sent its
-- limit, said once per model; the one it named gets the API's 400, as the API itself would.
anthropic.output_limits = {
  { "^claude%-opus%-4%-5", 64000 }, { "^claude%-opus%-4%-1", 32000 }, { "^claude%-opus%-4$", 32000 },
  { "^claude%-opus%-4%-0", 32000 }, { "^claude%-opus%-4%-20", 32000 }, { "^claude%-sonnet%-4", 64000 },
  { "^claude%-haiku%-4%-5", 64000 }, { "^claude%-3%-7%-sonnet", 64000 }, { "^claude%-3%-5%-", 8192 },
  { "^claude%-3%-haiku", 4096 }, { "^claude%-3%-opus", 4096 } }
local capped = { n = 0 }
local function output_cap(req, model, conf, n)
  if type(n) ~= "number" or n <= 4096 then return n end -- (the least limit: the usual request looks nothing up)
  local limit
  for _, l in ipairs(anthropic.output_limits) do
    if tostring(model):find(l[1]) then limit = l[2] break end
  end
  if not limit or n <= limit then return n end
  local m = req.client_model or req.model -- (a gateway's client: the name it sent, not its alias's model)
  local named = m == model or type(m) == "string" and #m > #model and m:sub(-#model - 1) == "/" .. model
  if named and not conf.drop_params then return n end
  if not capped[model] and capped.n < 1000 then
    capped[model], capped.n = true, capped.n + 1
    resil.log.warn(("anthropic: %s writes at most %d tokens; %d asked, %d sent"):format(model, limit, n, limit),
      { model = model, field = "max_tokens" })
  end
  return limit
end

-- A conversation holding tool calls or results is refused without tools ("Requests which include
-- tool_use or tool_result blocks must define tools"), which OpenAI takes: an agent's last turn that
-- sums up, its tools left out so that none is called, was a 400 for every such turn Anthropic
-- served. -> the tools its calls named, once each (one placeholder for results alone) | nil
local function tools_called(msgs)
  local tools, named, any
  for _, m in ipairs(msgs) do
    local content = m.content
    for _, b in ipairs(type(content) == "table" and content or {}) do
      local kind = type(b) == "table" and b.type
      if kind == "tool_use" or kind == "tool_result" then
        any = true
        if kind == "tool_use" and type(b.name) == "string" and not (named and named[b.name]) then
          named, tools = named or {}, tools or {}
          named[b.name] = true
          tools[#tools + 1] = { name = b.name, input_schema = { type = "object" } }
        end
      end
    end
  end
  return any and (tools or { { name = "tool", input_schema = { type = "object" } } }) or nil
end

-- Extended thinking with tool use: the API refuses a conversation in a tool loop (it ends in
-- tool results) whose last assistant turn does not start with its thinking ("a final `assistant`
-- message must start with a thinking block ... To avoid this requirement, disable `thinking`").
-- That turn is one another provider answered (a fallback to OpenAI, whose model writes no
-- thinking to send back): every next turn of the loop was a 400, even once Anthropic served again.
-- -> whether the messages end so
local function unthought_tool_turn(msgs)
  local i, results = #msgs, false
  while i >= 1 and type(msgs[i]) == "table" and msgs[i].role == "user" do
    for _, b in ipairs(type(msgs[i].content) == "table" and msgs[i].content or {}) do
      if type(b) == "table" and b.type == "tool_result" then results = true end
    end
    i = i - 1
  end
  if not results then return false end
  local first = i -- (the assistant turn: consecutive messages are one)
  while first > 1 and type(msgs[first - 1]) == "table" and msgs[first - 1].role == "assistant" do first = first - 1 end
  local uses, lead = false, nil
  for k = first, i do
    local content = type(msgs[k]) == "table" and msgs[k].content
    for _, b in ipairs(type(content) == "table" and content or {}) do
      if type(b) == "table" then
        lead = lead or b
        if b.type == "tool_use" then uses = true end
      end
    end
  end
  return uses and lead.type ~= "thinking" and lead.type ~= "redacted_thinking"
end
local unthought_said = false
-- a body's thinking left out when its messages end so (said once)
function without_unthought(body)
  if type(body.thinking) == "table" and body.thinking.type == "enabled" and type(body.messages) == "table"
    and unthought_tool_turn(body.messages) then
    body.thinking = nil
    if not unthought_said then
      unthought_said = true
      resil.log.warn("anthropic: a tool loop's last assistant turn has no thinking (another provider answered it): "
        .. "sent without thinking, as the API requires", { model = body.model })
    end
  end
end

-- anthropic.body(req, model, conf) -> the JSON body of a message
function anthropic.body(req, model, conf)
  local system, msgs = messages.anthropic(req) -- (translated from OpenAI's shape: policies/messages.lua)
  -- fields for this wire format only (thinking, top_k, ...) first: a fallback
  -- to another provider does not send them, and what is set below wins
  local body = {}
  local own = req.provider_options and req.provider_options[anthropic.name]
  if own then for k, v in pairs(own) do body[k] = v end end
  body.model, body.messages, body.system = model, msgs, system
  body.max_tokens = output_cap(req, model, conf, req.max_tokens or conf.max_tokens or anthropic.default_max_tokens)
  for _, k in ipairs(PASSED) do if req[k] ~= nil then body[k] = req[k] end end
  -- who asked, as the OpenAI adapter sends it in `user` (a gateway's key name): a client's own
  -- metadata.user_id does not replace it, or one tenant pinned its abuse on another's id
  if type(req.user) == "string" then body.metadata = { user_id = req.user } end
  -- sampling in OpenAI's terms (an OpenAI client's, a policy's): Anthropic's temperature runs
  -- 0..1, not 0..2 (past 1 is sent as 1), and its models from Opus 4.1 and the 4.5s on refuse
  -- temperature and top_p together (top_p is left out, temperature kept, as the Vercel AI SDK
  -- does): either was a 400 on every such request. An Anthropic client's is sent as it is.
  local t = body.temperature
  if type(t) == "number" and req.client_api ~= "anthropic" then
    if t > 1 then body.temperature = 1 end
    body.top_p = nil
  end
  -- (an Anthropic client's are its own, sent as they are: left out, its answer went on past its "\n"
  -- without a word, where the API answers a 400 that names it)
  if req.stop ~= nil then
    body.stop_sequences = req.client_api == "anthropic" and req.stop or stop_sequences_of(req.stop)
  end
  body.tools = tools_of(req.tools)
  body.tool_choice = tool_choice_of(req.tool_choice)
  if body.tool_choice ~= req.tool_choice and type(req.tool_choice) == "table" then
    -- none of the request's tools allowed: all of them sent, and none to be called (without
    -- them, a conversation holding tool_use blocks is refused; "tools": {} was refused as well)
    local allowed = allowed_of(body.tools, req.tool_choice)
    if allowed or not body.tools then body.tools = allowed else body.tool_choice = { type = "none" } end
  end
  -- (without tools none can be called: tool_choice none, as the request could call none)
  if not body.tools then
    local called = tools_called(msgs)
    if called then body.tools, body.tool_choice = called, { type = "none" } end
  end
  -- OpenAI's parallel_tool_calls = false is a flag of Anthropic's tool_choice (none has no calls)
  if req.parallel_tool_calls == false and body.tools then
    local choice = {}
    for k, v in pairs(type(body.tool_choice) == "table" and body.tool_choice or { type = "auto" }) do choice[k] = v end
    if choice.type ~= "none" then choice.disable_parallel_tool_use = true end
    body.tool_choice = choice
  end
  -- OpenAI's structured output is Anthropic's output_config.format (one an Anthropic client
  -- gave is its own, kept): dropped, the answer was prose that the client's parse() refused
  -- (nor beside the beta's output_format an Anthropic client gave: the API takes one of the two)
  local rf = req.response_format
  if type(rf) == "table" and rf.type == "json_schema" and type(rf.json_schema) == "table"
    and type(rf.json_schema.schema) == "table" and body.output_format == nil then
    local config = {}
    for k, v in pairs(type(body.output_config) == "table" and body.output_config or {}) do config[k] = v end
    config.format = config.format or { type = "json_schema", schema = rf.json_schema.schema }
    body.output_config = config
  end
  -- (as the API's message advises: this turn is sent without thinking, the loop's next ones think again)
  without_unthought(body)
  if req.stream then body.stream = true end
  for k, v in pairs(req.extra or {}) do body[k] = v end
  return body
end

-- a count the provider sent: a finite number >= 0, else absent (an infinite or
-- negative count cannot be priced, stored or settled)
local function num(v)
  return type(v) == "number" and v >= 0 and v < math.huge and (math.tointeger(v) or v) or nil
end
-- the counts of a usage that are its input (message_delta restates them, cumulative)
local INPUT_COUNTS = { input_tokens = true, cache_read_input_tokens = true, cache_creation_input_tokens = true }

-- the main counts of a usage: a usage that has neither, or one the provider
-- sent that cannot be read (negative, a string, 1e400), is unknown: priced at
-- nothing known, its call is a ledger row without a price, never a $0 one
-- (which wrote no row at all, and settled the budget at 0)
local function absent(v) return v == nil or v == json.null end
local function bad(v) return not absent(v) and num(v) == nil end
local function unreadable(a, b) return bad(a) or bad(b) or (absent(a) and absent(b)) end

-- A server-side fallback's hops (usage.iterations: a `message` entry per model that declined,
-- its tokens paid, and the `fallback_message` of the one that served), each a usage of its own
-- model, for pricing.cost to price each at its model's rate (priced at the serving model's, a
-- declined Fable hop's input was billed at Haiku's) -> the parts | nil: no fallback served, or
-- an entry without its model
local function hop_parts(its)
  if type(its) ~= "table" then return nil end
  local parts, served = {}, false
  for _, it in ipairs(its) do
    if type(it) == "table" and (it.type == "message" or it.type == "fallback_message") then
      local part = type(it.model) == "string" and it.iterations == nil and anthropic.usage(it)
      if not part then return nil end
      part.model = it.model
      parts[#parts + 1] = part
      served = served or it.type == "fallback_message"
    end
  end
  return served and parts or nil
end

-- anthropic.usage(u) -> normalized usage | nil (unknown). Anthropic's input_tokens leaves out
-- cache reads and writes; the normalized input_tokens counts them. The writes to the 1-hour
-- cache (usage.cache_creation's breakdown), a part of them, cost twice the input price, not
-- the 5-minute cache's 1.25 times: cache_write_1h_tokens, priced apart. A server-side
-- fallback's usage has its hops as usage.parts (hop_parts).
function anthropic.usage(u)
  if type(u) ~= "table" or unreadable(u.input_tokens, u.output_tokens) then return nil end
  local read, write = num(u.cache_read_input_tokens) or 0, num(u.cache_creation_input_tokens) or 0
  -- searches its web search tool ran: billed per search besides the tokens
  local searches = type(u.server_tool_use) == "table" and num(u.server_tool_use.web_search_requests) or 0
  -- (a main count the answer left out is not a zero: input_unreported / output_unreported, and ai.lua
  -- records the row with that side estimated; the input here is only its floor, the cache's part)
  local input, output = num(u.input_tokens), num(u.output_tokens)
  local usage = { input_tokens = (input or 0) + read + write, output_tokens = output or 0,
    cached_input_tokens = read, cache_write_tokens = write, web_search_requests = searches > 0 and searches or nil,
    input_unreported = input == nil or nil, output_unreported = output == nil or nil }
  local breakdown = type(u.cache_creation) == "table" and u.cache_creation or nil
  local hour = breakdown and num(breakdown.ephemeral_1h_input_tokens) or 0
  if hour > 0 then usage.cache_write_1h_tokens = math.min(hour, write) end -- (more is no part of the writes)
  if u.iterations ~= nil then usage.parts = hop_parts(u.iterations) end
  return usage
end

-- (model_context_window_exceeded: the output stopped where the context ends, as at max_tokens)
local FINISH = { end_turn = "stop", stop_sequence = "stop", max_tokens = "length", tool_use = "tool_calls",
  refusal = "content_filter", pause_turn = "pause", model_context_window_exceeded = "length" }

-- The model that served an answer: with the beta's server-side `fallbacks`, a model that
-- declined hands over to the next, and the one that served is named by usage.iterations'
-- `fallback_message` entry (the API's signal for it) and by the last `fallback` block's `to`; a
-- stream's message_start, sent before any refusal, names the model asked for: priced as that one,
-- an answer from a cheaper or dearer fallback was billed wrong -> that model | nil
local function served_by(u)
  local its = type(u) == "table" and u.iterations
  if type(its) ~= "table" then return nil end
  for i = #its, 1, -1 do
    local it = its[i]
    if type(it) == "table" and it.type == "fallback_message" and type(it.model) == "string" then return it.model end
  end
end

-- anthropic.parse(data) -> normalized result | nil, why
function anthropic.parse(data)
  if type(data) ~= "table" or type(data.content) ~= "table" then return nil, "no content in the response" end
  local texts, calls = {}, nil
  for i, b in ipairs(data.content) do
    if type(b) == "table" and b.type == "text" then
      -- (a text that is null, a number or an object is garbage: it raised 'invalid value ... for
      -- concat' out of the call, after the answer had been paid for)
      if type(b.text) ~= "string" then return nil, ("content[%d]: a text block without a string text"):format(i) end
      texts[#texts + 1] = b.text
    elseif type(b) == "table" and b.type == "tool_use" then
      calls = calls or {}
      calls[#calls + 1] = { id = b.id, name = b.name, arguments = json.encode(b.input or {}) }
    end
  end
  -- (a stop_reason that is no string, 5 or {} or true, is none the SDK's enum has: unknown, not
  -- passed on as it came)
  local stop = type(data.stop_reason) == "string" and data.stop_reason or nil
  local u = data.usage -- (iterations looked at only when the answer has them: this runs on every answer)
  return { id = data.id, model = type(u) == "table" and u.iterations ~= nil and served_by(u) or data.model, text = table.concat(texts), finish_reason = FINISH[stop] or stop,
    stop_reason = stop, stop_sequence = type(data.stop_sequence) == "string" and data.stop_sequence or nil,
    tool_calls = calls, usage = anthropic.usage(data.usage) }
end

-- anthropic.event(state, ev) -> delta text | nil, done?, err, body
-- state keeps id, model, usage, finish_reason, stop_reason, the tool calls
-- streamed so far, progress (a delta that is not text: a tool call's, or
-- thinking), and decoded (this event's JSON).
local MAX_STREAMED_BLOCKS = 1024 -- (a block index past it is garbage: no call kept for it)
function anthropic.event(state, ev)
  local t = ev.event
  state.decoded = nil
  if t == "ping" then return nil, false end
  local data = event_json(state, ev.data or "")
  state.decoded = data
  if type(data) ~= "table" then return nil, false, "an event that is not JSON: " .. resil.redact(tostring(ev.data)):sub(1, 80) end
  -- (`data: []`: JSON, but no event; the SDK's stream helper raises on it)
  if data[1] ~= nil or getmetatable(data) == json.array_mt then
    return nil, false, "an event that is not a JSON object: " .. resil.redact(tostring(ev.data)):sub(1, 80)
  end
  t = t or data.type
  if t == "content_block_delta" then
    local d = data.delta
    if type(d) == "table" and d.type == "text_delta" and type(d.text) == "string" and d.text ~= "" then
      return d.text, false
    end
    local call = type(d) == "table" and state.blocks and state.blocks[math.tointeger(data.index) or -1]
    if call and d.type == "input_json_delta" and type(d.partial_json) == "string" then
      call.pieces[#call.pieces + 1] = d.partial_json -- (joined once the stream ends)
      state.extra_bytes = (state.extra_bytes or 0) + #d.partial_json
      state.progress = true
    elseif type(d) == "table" and (d.type == "thinking_delta" or d.type == "signature_delta") then
      state.thinking = true
      -- (thinking is paid as output: a stream cut in it is recorded with it)
      if type(d.thinking) == "string" then state.extra_bytes = (state.extra_bytes or 0) + #d.thinking end
    end
  elseif t == "content_block_start" then
    local b, i = data.content_block, math.tointeger(data.index)
    if type(b) == "table" and b.type == "tool_use" and i and i >= 0 and i < MAX_STREAMED_BLOCKS then
      local call = { id = type(b.id) == "string" and b.id or nil, name = type(b.name) == "string" and b.name or nil,
        pieces = {} }
      state.blocks = state.blocks or {}
      state.blocks[i] = call
      state.tool_calls = state.tool_calls or {}
      state.tool_calls[#state.tool_calls + 1] = call
      state.progress = true
    elseif type(b) == "table" and (b.type == "thinking" or b.type == "redacted_thinking") then
      state.thinking = true
    elseif type(b) == "table" and b.type == "fallback" and type(b.to) == "table" and type(b.to.model) == "string" then
      state.model = b.to.model -- (a seam: the model after it serves, as the SDK's stream helper reads it)
    end
  elseif t == "message_start" then
    -- (a usage or a message that is not an object is the provider's garbage: it raised here,
    -- and the stream ended without its error event)
    local m = type(data.message) == "table" and data.message or {}
    state.id, state.model = m.id, m.model
    state.raw_usage = type(m.usage) == "table" and m.usage or nil
    state.usage = anthropic.usage(state.raw_usage)
    state.usage_partial = true -- (its output count is a placeholder until message_delta's)
  elseif t == "message_delta" then
    -- its usage is cumulative: the totals so far replace, never add; a null count is one it
    -- does not restate (as the SDKs read it), not a zero (message_start's input went unpaid)
    -- (counts that cannot be read leave the ones read so far: merged, message_start's good input
    -- made the usage unknown, and the row an estimate from the bytes streamed)
    -- (a cumulative input count never goes down: one below message_start's is not a total but a
    -- compatible server's 0 for "said already", sglang's and others': taken, it priced the input at 0)
    local u = {}
    for k, v in pairs(state.raw_usage or {}) do u[k] = v end
    for k, v in pairs(type(data.usage) == "table" and data.usage or {}) do
      if v ~= json.null and not (INPUT_COUNTS[k] and num(v) and num(u[k]) and v < u[k]) then u[k] = v end
    end
    local readable = anthropic.usage(u)
    if readable or not state.usage then state.raw_usage, state.usage = u, readable end
    state.model = served_by(u) or state.model
    -- (an unreadable one leaves the output a placeholder: estimated from the bytes streamed)
    if type(data.usage) == "table" and readable then state.usage_partial = nil end
    local stop = type(data.delta) == "table" and data.delta.stop_reason
    if type(stop) == "string" then state.finish_reason, state.stop_reason = FINISH[stop] or stop, stop end
    local seq = type(data.delta) == "table" and data.delta.stop_sequence
    if type(seq) == "string" then state.stop_sequence = seq end
  elseif t == "message_stop" then
    state.stopped = true
    return nil, true
  elseif t == "error" then
    local e = type(data.error) == "table" and data.error or {}
    return nil, false, tostring(e.message or e.type or "error event"), data
  end
  return nil, false
end

function anthropic.complete(state) return state.stopped == true end

-- the request's last message gives tool results (body: the request sent)
local function after_tool_results(body)
  local msgs = type(body) == "table" and body.messages
  local last = type(msgs) == "table" and msgs[#msgs]
  if type(last) ~= "table" or last.role ~= "user" or type(last.content) ~= "table" then return false end
  for _, block in ipairs(last.content) do
    if type(block) == "table" and block.type == "tool_result" then return true end
  end
  return false
end

-- data: the answer; body: the request it answers, when known
function anthropic.validate(data, body)
  local r, why = anthropic.parse(data)
  if not r then return nil, why end
  if r.text:match("^%s*$") and not r.tool_calls and not messages.answered_empty[r.finish_reason] then
    -- (after tool results an empty end_turn is the model's answer, as Anthropic documents: it has
    -- nothing to add. Taken for empty output, it was sent again, paid each time, and failed)
    if r.finish_reason == "stop" and after_tool_results(body) then return true end
    return nil, "empty content"
  end
  return true
end

return anthropic
