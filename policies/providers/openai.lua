-- policies/providers/openai.lua: OpenAI chat completions (and any server that
-- speaks them: vLLM, Ollama, Together, Groq, OpenRouter, Azure's v1 API).
--
--   OPENAI_API_KEY    the key, sent as `Authorization: Bearer ...`
--   OPENAI_BASE_URL   the base URL *with* /v1 (as the official SDK reads it),
--                     default https://api.openai.com/v1
--
-- An adapter turns the normalized request of policies.ai into the wire body
-- and the provider's answers (a body, a stream of events) back into the
-- normalized result. Copy this file into your project's policies/providers/
-- to change it.
local resil = require "resil"
local json = resil.json
local messages = require "policies.messages"
local event_json = require "policies.event_json"

local openai = {
  name = "openai",
  key_env = "OPENAI_API_KEY",
  base_env = "OPENAI_BASE_URL",
  default_base = "https://api.openai.com/v1",
}

-- (options of ai.configure this adapter reads besides the shared ones)
openai.config_keys = { "reasoning_models", "drop_params" }

function openai.url(base) return base .. "/chat/completions" end

-- OpenAI's reasoning models refuse max_tokens (they take max_completion_tokens) and any
-- temperature or top_p but the default (a 400 that failed every request, or fallback, that set
-- one: an Anthropic client's temperature, a policy's). By name, the first pattern that matches:
-- "reasoning" takes no sampling; "effort" (gpt-5.1 on, whose default effort is none) takes it
-- unless the request sets a reasoning_effort other than "none"; false is a chat model. A project
-- names its own (an Azure deployment's name) with ai.configure("openai", { reasoning_models =
-- { "^my%-deployment" } }), patterns of "reasoning" models tried before these.
openai.reasoning_models = {
  -- chat models that refuse reasoning_effort too (a request for a reasoning model falling back
  -- to one): "chat"
  { "^gpt%-4", "chat" }, { "^gpt%-3%.5", "chat" }, { "^chatgpt%-4o", "chat" },
  { "^gpt%-5[%.%d]*%-chat", false }, -- gpt-5-chat-latest
  { "^gpt%-5%.%d+%-pro", "reasoning" },
  { "^gpt%-5%.%d", "effort" },
  { "^gpt%-5", "reasoning" },
  { "^o%d", "reasoning" },
}
-- the sampling fields such a model takes at their defaults only, and those defaults
local FIXED_SAMPLING = { temperature = 1, top_p = 1, presence_penalty = 0, frequency_penalty = 0 }

-- a project's reasoning_models (or NONE) -> { model -> kind | false }: a name is matched once (the
-- table is bounded: any name is a gateway client's to choose). Keyed by the list, not by the conf
-- body is given: a deployment's target, and so its conf, is made anew for every call, and each
-- call matched its name again (0.6 us more a request, a table more for the collector)
local kinds = setmetatable({}, { __mode = "k" })
local NONE = {}
local KINDS_MAX = 1000
local function reasoning_kind(own, model)
  local known = kinds[own]
  if not known then
    known = { n = 0 }
    kinds[own] = known
  end
  local kind = known[model]
  if kind ~= nil then return kind end
  kind = false
  local name = tostring(model)
  for _, p in ipairs(type(own) == "table" and own or NONE) do
    if type(p) == "string" and name:find(p) then kind = "reasoning" break end
  end
  if not kind then
    for _, r in ipairs(openai.reasoning_models) do
      if name:find(r[1]) then kind = r[2] break end
    end
  end
  if known.n >= KINDS_MAX then known = { n = 0 }; kinds[own] = known end
  known.n = known.n + 1
  known[model] = kind
  return kind
end

-- a field left out, said once per model and field (not once per request)
local said = { n = 0 }
local function left_out(model, field, message)
  local key = tostring(model) .. "\0" .. field
  if said[key] or said.n >= KINDS_MAX then return end
  said[key], said.n = true, said.n + 1
  resil.log.warn(("openai: %s %s"):format(tostring(model), message), { model = tostring(model), field = field })
end

-- OpenAI takes four stop sequences, Anthropic (whose clients' requests fall back here) many
local MAX_STOP = 4

-- the most output tokens a model writes, first match by name (the API refuses a max_tokens past
-- it: an Anthropic client's 32000, falling back to gpt-4o-mini, failed there); a model not here
-- is sent any. Past it, a model the request did not name is sent its limit.
openai.output_limits = {
  { "^gpt%-4o%-2024%-05%-13", 4096 }, { "^gpt%-4o", 16384 }, { "^gpt%-4%.1", 32768 }, { "^gpt%-4%-turbo", 4096 },
  { "^gpt%-3%.5%-turbo", 4096 }, { "^o1%-mini", 65536 }, { "^o%d", 100000 }, { "^gpt%-5[%.%d]*%-chat", 16384 },
  { "^gpt%-5", 128000 } }
local function output_limit(model)
  for _, l in ipairs(openai.output_limits) do
    if tostring(model):find(l[1]) then return l[2] end
  end
end

-- A field the model refuses is left out for a model the request did not name (a fallback, an
-- alias's, a migration's target: the call must not fail for what the client wrote for another
-- model), and sent as it came to the one it named, whose 400 then says what is wrong, as the API
-- itself would (left out, a client's temperature or fifth stop sequence was dropped without a
-- word to it). ai.configure("openai", { drop_params = true }) leaves them out for every model.
-- (asked only where a field would be left out: nothing on the usual request)
local function keeps_fields(req, model, conf)
  if conf.drop_params then return false end
  local m = req.client_model or req.model -- (a gateway's client: the name it sent, not its alias's model)
  return m == model or type(m) == "string" and #m > #model and m:sub(-#model - 1) == "/" .. model
end

function openai.headers(key)
  local h = { ["content-type"] = "application/json", accept = "application/json" }
  if key then h.authorization = "Bearer " .. key end
  return h
end

-- tools in Anthropic's shape ({name, description, input_schema}) become functions. Its
-- custom tool may say so (type = "custom": the Anthropic SDK's betaTool and betaZodTool, the
-- tools its toolRunner sends): passed as it was, OpenAI refused every such request (400).
-- a tool_choice in Anthropic's shape -> OpenAI's ({ type = "any" } is "required", { type = "tool",
-- name } a function named; sent as it came, the API's 400); OpenAI's own pass as they are
local function tool_choice_of(v)
  if type(v) ~= "table" or v["function"] ~= nil then return v end
  if v.type == "any" then return "required" end
  if v.type == "auto" or v.type == "none" then return v.type end
  if v.type == "tool" and type(v.name) == "string" then return { type = "function", ["function"] = { name = v.name } } end
  return v
end

local function tools_of(tools)
  if type(tools) ~= "table" or #tools == 0 then return nil end
  local out = {}
  for i, t in ipairs(tools) do
    if type(t) == "table" and (t.type == nil or t.type == "custom") and t.input_schema ~= nil then
      out[i] = { type = "function", ["function"] = { name = t.name, description = t.description,
        parameters = t.input_schema } }
    elseif type(t) == "table" and t.cache_control ~= nil then -- (Anthropic's hint: OpenAI has no such field)
      out[i] = { type = t.type, ["function"] = t["function"] }
    else
      out[i] = t
    end
  end
  return out
end

-- openai.body(req, model, conf) -> the JSON body of a chat completion.
-- Messages in Anthropic's shape (a client of the gateway's /v1/messages
-- falling back to OpenAI) are translated (policies/messages.lua).
function openai.body(req, model, conf)
  -- fields for this wire format only (logprobs, store, ...) first: a fallback
  -- to another provider does not send them, and what is set below wins
  local own = req.provider_options and req.provider_options[openai.name]
  local body
  if own then
    body = {}
    for k, v in pairs(own) do body[k] = v end
    body.model = model
  else -- (made at the size of a usual body: grown key by key it rehashed three times)
    body = { model = model, messages = false, max_tokens = nil, user = nil }
  end
  -- the provider's config's processing tier, for a request that names none (null names none)
  if conf.service_tier ~= nil and (body.service_tier == nil or body.service_tier == json.null) then
    body.service_tier = conf.service_tier
  end
  body.messages = messages.openai(req)
  local own = conf.reasoning_models or NONE
  local known = kinds[own] -- (the name's kind as matched before: a few reads a request, no call)
  local kind = known and known[model]
  if kind == nil then kind = reasoning_kind(own, model) end
  if req.max_tokens then
    -- the official API names it max_completion_tokens (o-series and later refuse max_tokens);
    -- compatible servers document max_tokens, but serving a reasoning model (Azure's) refuse it too
    local field = conf.max_tokens_field
      or ((conf.official or (kind and kind ~= "chat")) and "max_completion_tokens" or "max_tokens")
    body[field] = req.max_tokens
    -- (past 4096, the least limit: the usual request looks nothing up)
    local limit = type(req.max_tokens) == "number" and req.max_tokens > 4096 and output_limit(model)
    if limit and req.max_tokens > limit and not keeps_fields(req, model, conf) then
      left_out(model, field, ("writes at most %d tokens; %s asked, %d sent"):format(limit, req.max_tokens, limit))
      body[field] = limit
    end
  end
  -- the fields of the normalized request sent as they are, each read by its name (walking a
  -- list of their names, each read by a key from it, cost some 5k instructions a call)
  local v = req.temperature
  if v ~= nil then body.temperature = v end
  v = req.top_p
  if v ~= nil then body.top_p = v end
  v = req.tool_choice
  if v ~= nil then body.tool_choice = tool_choice_of(v) end
  v = req.n
  if v ~= nil then body.n = v end
  v = req.seed
  if v ~= nil then body.seed = v end
  v = req.user
  if v ~= nil then body.user = v end
  v = req.response_format
  if v ~= nil then body.response_format = v end
  v = req.presence_penalty
  if v ~= nil then body.presence_penalty = v end
  v = req.frequency_penalty
  if v ~= nil then body.frequency_penalty = v end
  v = req.logit_bias
  if v ~= nil then body.logit_bias = v end
  v = req.reasoning_effort
  if v ~= nil then body.reasoning_effort = v end
  v = req.stop
  if v ~= nil then
    -- past four, a 400 that failed the request (an Anthropic client's, falling back here): the
    -- first four are sent, as a target that took none would have failed the call for good
    if type(v) == "table" and #v > MAX_STOP and not keeps_fields(req, model, conf) then
      left_out(model, "stop", ("takes %d stop sequences; %d left out: %s"):format(MAX_STOP, #v - MAX_STOP,
        json.encode(table.move(v, MAX_STOP + 1, #v, 1, {})):sub(1, 200)))
      v = table.move(v, 1, MAX_STOP, 1, {})
    end
    body.stop = v
  end
  if kind == "chat" then
    if body.reasoning_effort ~= nil and not keeps_fields(req, model, conf) then
      left_out(model, "reasoning_effort", ("takes no reasoning_effort; %s left out"):format(tostring(body.reasoning_effort)))
      body.reasoning_effort = nil
    end
  elseif kind and (kind == "reasoning" or (body.reasoning_effort ~= nil and body.reasoning_effort ~= "none")) then
    local keep -- (asked once, at the first field it would leave out)
    for field, default in pairs(FIXED_SAMPLING) do
      v = body[field]
      if v ~= nil and v ~= default then
        if keep == nil then keep = keeps_fields(req, model, conf) end
        if not keep then
          body[field] = nil
          left_out(model, field, ("takes no %s but the default; %s left out"):format(field, tostring(v)))
        end
      end
    end
    if kind == "reasoning" and body.stop ~= nil and not keeps_fields(req, model, conf) then -- (o3, o4-mini, gpt-5 refuse any)
      body.stop = nil
      left_out(model, "stop", "takes no stop sequences; left out")
    end
    if body.max_tokens ~= nil and body.max_completion_tokens == nil then -- (a client's own, in provider_options)
      body.max_completion_tokens, body.max_tokens = body.max_tokens, nil
    end
  end
  body.tools = tools_of(req.tools)
  -- (with tools only: the API refuses them without, and a policy's or a fallback's request may set them
  -- for none: an Anthropic client's tool_choice { type = "auto" } with no tools)
  if not body.tools then body.tool_choice = nil end
  v = req.parallel_tool_calls
  if v ~= nil and body.tools then body.parallel_tool_calls = v end
  if req.stream then
    body.stream = true
    if conf.stream_usage ~= false then body.stream_options = { include_usage = true } end
  end
  if req.extra then for k, v in pairs(req.extra) do body[k] = v end end
  return body
end

-- a count the provider sent: a finite number >= 0, else absent (an infinite or
-- negative count cannot be priced, stored or settled)
local HUGE, tointeger, math_type = math.huge, math.tointeger, math.type
local function num(v)
  local t = math_type(v) -- (one call for the usual integer, not three)
  if t == "integer" then return v >= 0 and v or nil end
  return t == "float" and v >= 0 and v < HUGE and (tointeger(v) or v) or nil
end

-- the main counts of a usage: a usage that has neither, or one the provider
-- sent that cannot be read (negative, a string, 1e400), is unknown: priced at
-- nothing known, its call is a ledger row without a price, never a $0 one
-- (which wrote no row at all, and settled the budget at 0)
local function absent(v) return v == nil or v == json.null end

-- the tiers an answer names (its service_tier) that are standard processing; any other
-- (priority, flex, scale) is billed at its own price: usage.service_tier says which
local STANDARD_TIERS = { default = true, auto = true, standard = true }

-- openai.service_tier(tier) -> the tier when it is not standard processing, else nil
function openai.service_tier(tier)
  return type(tier) == "string" and not STANDARD_TIERS[tier] and tier:sub(1, 40) or nil
end

-- openai.usage(u [, service_tier]) -> normalized usage (input_tokens counts cached ones too) | nil (unknown)
function openai.usage(u, tier)
  if type(u) ~= "table" then return nil end
  local prompt, completion = u.prompt_tokens, u.completion_tokens
  local input, output = num(prompt), num(completion) -- (each read once: this runs on every answer)
  if (input == nil and not absent(prompt)) or (output == nil and not absent(completion))
    or (input == nil and output == nil) then
    return nil
  end
  local details, out_details = u.prompt_tokens_details, u.completion_tokens_details
  -- (cached ones are a part of the input: more would price the rest below zero)
  -- (each optional part looked at only when the answer has it)
  local cached = details ~= nil and type(details) == "table" and num(details.cached_tokens)
  cached = cached and (input and math.min(cached, input) or cached) or 0
  local reasoning = out_details ~= nil and type(out_details) == "table" and num(out_details.reasoning_tokens) or nil
  -- OpenAI's completion_tokens include the reasoning ones; xAI's (and other compatible servers') leave
  -- them out, billed as output all the same, and say so in a total_tokens of the three: priced at
  -- completion_tokens alone, a Grok reasoning answer was recorded at a third of its output
  if reasoning and reasoning > 0 and input and output and u.total_tokens == input + output + reasoning then
    output = output + reasoning
  end
  -- (a main count the answer left out is not a zero: input_unreported / output_unreported, and ai.lua
  -- records the row with that side estimated, as LiteLLM counts a prompt it was not told; the count
  -- here is only its floor, the cached part)
  return { input_tokens = input or cached, output_tokens = output or 0,
    cached_input_tokens = cached, cache_write_tokens = 0,
    input_unreported = input == nil or nil, output_unreported = output == nil or nil,
    reasoning_tokens = reasoning,
    service_tier = tier ~= nil and openai.service_tier(tier) or nil }
end

-- a decoded JSON object (a table that is not an array: [] decodes with json.array_mt)
local function is_object(v) return type(v) == "table" and v[1] == nil and getmetatable(v) ~= json.array_mt end

-- A tool call's id where the server sent none (DeepSeek's through some hosts, streamed): the
-- client answers the call by its id (an OpenAI tool message's tool_call_id, Anthropic's
-- tool_use_id, which it requires), and the SDK's stream helper refused a call without one
-- ("missing choices[0].tool_calls[0].id"). Random: ids must differ across a conversation's turns.
local function new_call_id() return "call_" .. resil.crypto.sha256(resil.crypto.random(12)):sub(1, 24) end

-- A call's arguments as the object itself, not its JSON text (what some compatible servers send):
-- its text, as the API sends it, in the answer or delta too. Relayed as they came, the client's
-- SDK and code parsed an object; translated for Anthropic, the gateway raised (a 500 its SDK tried
-- twice more, each answer billed) or, streamed, lost them.
local function arguments_text(f)
  local args = f.arguments
  if type(args) == "table" and is_object(args) then
    local ok, text = pcall(json.encode, args)
    if ok then f.arguments = text end
  end
  return f.arguments
end

-- -> the calls | nil | nil, why. Arguments that are not a JSON object are
-- the model's garbage (invalid output, tried again), unless the answer was
-- cut at max_tokens: passed on, an Anthropic client got them as input = {}
local function tool_calls_of(calls, cut)
  if type(calls) ~= "table" or #calls == 0 then return nil end
  local out = {}
  for i, c in ipairs(calls) do
    -- (a call that is null, or whose function is null or a number, is garbage: it raised 'attempt
    -- to index' out of the call, after the answer had been paid for)
    local f = type(c) == "table" and c["function"]
    if f == nil and type(c) == "table" then f = {} -- (a call of another type: "custom")
    elseif type(f) ~= "table" then
      return nil, ("tool call %d: not an object with a function {name, arguments}"):format(i)
    -- (a name that is no string, 5 or null, reached an Anthropic client as its tool_use's name)
    elseif type(f.name) ~= "string" or f.name == "" then
      return nil, ("tool call %d: its function name is not a string"):format(i)
    end
    local args = arguments_text(f)
    -- (what some compatible servers send for a tool without parameters: "{}", as the API sends it,
    -- relayed too)
    if args == "" or args == json.null then args, f.arguments = "{}", "{}" end
    -- (arguments that are no text, a list say, are garbage too: the gateway raised on them)
    if args ~= nil and type(args) ~= "string"
      or type(args) == "string" and not cut and not is_object(json.decode(args)) then
      return nil, ("tool call %d (%s): its arguments are not a JSON object"):format(i, tostring(f.name))
    end
    -- (given one in the answer too, which an OpenAI client is relayed)
    if type(c) == "table" and (type(c.id) ~= "string" or c.id == "") then c.id = new_call_id() end
    out[i] = { id = c.id, name = f.name, arguments = args }
  end
  return out
end

-- A message's or delta's content -> its text, and the bytes of its thinking. A compatible server
-- may send it as a list of parts, as Mistral's reasoning models do ({type = "text", text = ...} and
-- {type = "thinking", thinking = {{type = "text", text = ...}}}): read as no text, each such answer
-- was "empty content", refused and bought again, two more times, before a 502.
local function content_text(content)
  if type(content) == "string" then return content, 0 end
  if type(content) ~= "table" or content[1] == nil then return nil, 0 end
  local texts, thought = {}, 0
  for _, part in ipairs(content) do
    if type(part) == "table" then
      if type(part.text) == "string" and (part.type == "text" or part.type == nil) then texts[#texts + 1] = part.text
      elseif part.type == "thinking" and type(part.thinking) == "table" then
        for _, t in ipairs(part.thinking) do
          if type(t) == "table" and type(t.text) == "string" then thought = thought + #t.text end
        end
      end
    end
  end
  return table.concat(texts), thought
end

-- a body validate() parsed, for the parse that follows it (one parse per answer)
local parsed = setmetatable({}, { __mode = "k" })

-- the usual answer (one choice, its text or none, no tool calls) parsed in C, as below, while
-- openai.usage and openai.service_tier are this file's (src/flat_json.c's chat_parser); nil for
-- the rest, parsed below. A host without it parses them all here.
local core_ok, core = pcall(require, "resil.core.flat_json")
core = core_ok and type(core) == "table" and core or {}
local parse_usual = core.chat_parser and core.chat_parser(json.null) or nil
local own_usage, own_tier = openai.usage, openai.service_tier

-- openai.parse(data) -> normalized result | nil, why
function openai.parse(data)
  local done = parsed[data]
  if done then
    parsed[data] = nil
    return done
  end
  if parse_usual and openai.usage == own_usage and openai.service_tier == own_tier then
    done = parse_usual(data)
    if done then return done end
  end
  if type(data) ~= "table" or type(data.choices) ~= "table" or type(data.choices[1]) ~= "table" then
    return nil, "no choices in the response"
  end
  local first = data.choices[1]
  local message = type(first.message) == "table" and first.message or {}
  -- (a field an answer seldom has is looked at only when it is there: a type() call is some 400
  -- instructions, and this runs on every answer)
  local calls, bad_calls
  if message.tool_calls ~= nil then
    calls, bad_calls = tool_calls_of(message.tool_calls, first.finish_reason == "length")
    if bad_calls then return nil, bad_calls end
  end
  -- (made at the size it reaches: the fields policies.ai adds to a result are named, nil until
  -- then; grown key by key the table was rehashed on every answer)
  local r = { id = data.id, model = data.model, text = content_text(message.content) or "",
    -- (a finish_reason that is no string, 5 or {} or true, is none the SDKs' enum has: unknown, not
    -- passed on as it came)
    finish_reason = type(first.finish_reason) == "string" and first.finish_reason or nil,
    tool_calls = calls, usage = openai.usage(data.usage, data.service_tier), refusal = nil,
    attempts = nil, provider = nil, requested_model = nil, raw = nil, fallbacks = nil, cost_usd = nil }
  if message.refusal and message.refusal ~= json.null then r.refusal = message.refusal end
  -- an answer in a field of its own (a legacy function_call, audio): relayed whole to an
  -- OpenAI client, never "empty" (retried and paid again)
  local function_call, audio = message.function_call, message.audio
  if function_call ~= nil and type(function_call) == "table" or audio ~= nil and type(audio) == "table" then
    r.other_output = true
  end
  if #data.choices > 1 then
    r.choices = {}
    for i, c in ipairs(data.choices) do
      -- (a choice that is null or a number: 'attempt to index' raised out of the call, the answer paid for)
      local msg = type(c) == "table" and c.message
      r.choices[i] = type(msg) == "table" and type(msg.content) == "string" and msg.content or ""
    end
  end
  return r
end

-- a streamed tool call's pieces, gathered: {index, id, function = {name,
-- arguments}} deltas -> state.tool_calls { {id=, name=, pieces = {...}} }
-- (policies.ai joins the pieces once the stream ends). A delta without an
-- index (Gemini's OpenAI-compatible API sends none) is its id's call, a new
-- one when the id is new, else the last one. An index one past any sane
-- number of calls is garbage, dropped; the name is sent whole, not in pieces.
local MAX_STREAMED_CALLS = 128
local function call_for(state, d)
  local calls = state.tool_calls or {}
  state.tool_calls = calls
  local i = math.tointeger(d.index)
  if i then
    if i < 0 or i >= MAX_STREAMED_CALLS then return nil end
    if not calls[i + 1] then
      for j = #calls + 1, i + 1 do calls[j] = { pieces = {} } end
    end
    return calls[i + 1], i
  end
  if d.index ~= nil then return nil end
  if type(d.id) == "string" and d.id ~= "" then
    for j, c in ipairs(calls) do if c.id == d.id then return c, j - 1 end end
    if #calls >= MAX_STREAMED_CALLS then return nil end
    calls[#calls + 1] = { pieces = {} }
    return calls[#calls], #calls - 1
  end
  if #calls == 0 then calls[1] = { pieces = {} } end
  return calls[#calls], #calls - 1
end

local function gather_calls(state, deltas)
  for _, d in ipairs(deltas) do
    local c, at
    if type(d) == "table" then c, at = call_for(state, d) end
    if c then
      -- (the delta, relayed to an OpenAI client, says its call's index, and with its id its type,
      -- as the API does: Gemini sends no index, some vLLM versions no type, and the SDKs'
      -- stream helpers failed on either)
      if d.index == nil then d.index = at end
      -- (a call's first delta without an id gets one, relayed and recorded alike)
      if c.id == nil and (type(d.id) ~= "string" or d.id == "") then d.id = new_call_id() end
      if type(d.id) == "string" and d.id ~= "" and d.type == nil then d.type = "function" end
      local f = type(d["function"]) == "table" and d["function"] or {}
      arguments_text(f)
      if type(d.id) == "string" and d.id ~= "" then c.id = d.id end
      if type(f.name) == "string" and f.name ~= "" then c.name = f.name end
      -- (a call of another type, "custom" (GPT-5's free-form tools), has no function: taken as
      -- tool_calls_of takes it whole, not refused for a function name it never has)
      if d.type == "custom" or type(d.custom) == "table" then c.custom = true end
      if type(f.arguments) == "string" and f.arguments ~= "" then
        c.pieces[#c.pieces + 1] = f.arguments
        state.extra_bytes = (state.extra_bytes or 0) + #f.arguments
      end
      state.progress = true
    end
  end
end

-- openai.event(state, ev) -> delta text | nil, done?, err
-- state starts as {}; it keeps id, model, finish_reason, usage, the tool
-- calls and refusal streamed so far, progress (a delta that is not text),
-- and decoded (this event's JSON).
function openai.event(state, ev)
  local data = ev.data
  -- (the end, as the SDK takes it: data that starts with [DONE], a server's "[DONE] " too; a chunk
  -- starts with "{", and is asked one byte)
  if data:byte(1) == 91 and data:sub(1, 6) == "[DONE]" then
    state.decoded = nil
    return nil, true
  end
  local chunk = event_json(state, data)
  state.decoded = chunk
  if type(chunk) ~= "table" then return nil, false, "an event that is not JSON: " .. resil.redact(data):sub(1, 80) end
  -- (`data: []`, `data: 1`: JSON, but no chunk; the SDK yields it, and its stream helper raises on
  -- .choices: relayed, it was a chunk made of the gateway's id and model)
  if not is_object(chunk) then return nil, false, "an event that is not a JSON object: " .. resil.redact(data):sub(1, 80) end
  -- (an error as the SDK takes one: `"error": null`, some compatible servers' on every chunk, is none;
  -- taken for an error event, each of their streams failed before its first delta)
  if chunk.error and chunk.error ~= json.null then
    -- an error after the 200: the API sends it as a data event
    local e = chunk.error
    return nil, false, type(e) == "table" and tostring(e.message or e.type) or tostring(e), chunk
  end
  -- a compatible server's `event: error`, its data the error itself (the SDK raises on it): relayed
  -- as a chunk, it had no choices and no event line, and the provider's message was lost
  if ev.event == "error" then
    return nil, false, tostring(chunk.message or chunk.type or "error event"), { error = chunk }
  end
  state.id = state.id or chunk.id
  state.model = state.model or chunk.model
  if type(chunk.service_tier) == "string" then state.service_tier = chunk.service_tier end
  if type(chunk.usage) == "table" then
    -- (a second usage whose counts cannot be read leaves the good one: replaced, the row was an
    -- estimate from the bytes streamed)
    state.usage = openai.usage(chunk.usage, state.service_tier) or state.usage
  end
  local choice = type(chunk.choices) == "table" and chunk.choices[1]
  if type(choice) ~= "table" or (choice.index or 0) ~= 0 then return nil, false end
  local finish = choice.finish_reason
  if type(finish) == "string" then state.finish_reason = finish
  -- (one that is no string, 5 or {} or true, still ends the stream, its reason unknown)
  elseif finish ~= nil and finish ~= json.null then state.finish_unknown = true end
  local delta = type(choice.delta) == "table" and choice.delta or {}
  if type(delta.tool_calls) == "table" then gather_calls(state, delta.tool_calls) end
  if type(delta.refusal) == "string" and delta.refusal ~= "" then
    local r = state.refusal_pieces or {}
    state.refusal_pieces = r
    r[#r + 1] = delta.refusal
    state.extra_bytes = (state.extra_bytes or 0) + #delta.refusal
    state.progress = true
  end
  -- reasoning some compatible servers stream (DeepSeek, vLLM, Qwen): thinking, paid as output
  local reasoning = delta.reasoning_content or delta.reasoning
  if type(reasoning) == "string" and reasoning ~= "" then
    state.thinking = true
    state.extra_bytes = (state.extra_bytes or 0) + #reasoning
  end
  local content = delta.content
  if type(content) == "string" then
    if content ~= "" then return content, false end
  elseif content ~= nil and type(content) == "table" then -- (a list of parts: see content_text)
    local text, thought = content_text(content)
    if thought > 0 then
      state.thinking = true
      state.extra_bytes = (state.extra_bytes or 0) + thought
    end
    if text and text ~= "" then return text, false end
  end
  return nil, false
end

-- The stream ended as the API ends one: [DONE] after a finish_reason.
function openai.complete(state, done) return done and (state.finish_reason ~= nil or state.finish_unknown == true) end

-- a 200 whose body is not a usable completion is invalid output (retried)
-- (so is one a compatible server ended unfinished, saying so: vLLM's finish_reason "abort", an
-- engine's abort or shutdown, "error"; passed on, it was a cut answer taken for a whole one)
local UNFINISHED = { abort = true, error = true }
function openai.validate(data)
  local r, why = openai.parse(data)
  if not r then return nil, why end
  if UNFINISHED[r.finish_reason] then
    return nil, ("the server ended the answer unfinished (finish_reason %q)"):format(r.finish_reason)
  end
  if r.text:match("^%s*$") and not r.tool_calls and not messages.answered_empty[r.finish_reason] and not r.refusal
    and not r.other_output then
    return nil, "empty content"
  end
  parsed[data] = r
  return true
end

---------------------------------------------------------------------------
-- embeddings (POST /embeddings)

function openai.embed_url(base) return base .. "/embeddings" end

-- openai.embed_body(req, model) -> the JSON body; encoding_format "base64"
-- answers each vector as a base64 string of little-endian float32s
function openai.embed_body(req, model)
  return { model = model, input = req.input, dimensions = req.dimensions, encoding_format = req.encoding_format,
    user = req.user }
end

-- raises at an element of v that is not a number (a string, null, a boolean, a list): compared,
-- not type()d, as a call an element took 2.5 times as long
local HUGE = math.huge
local function numbers(v)
  for j = 1, #v do local _ = v[j] <= HUGE end
end

-- openai.embed_parse(data) -> { embeddings = {vector or base64 string, ...}, usage, model, id } | nil, why
function openai.embed_parse(data)
  if type(data) ~= "table" or type(data.data) ~= "table" or #data.data == 0 then
    return nil, "no embeddings in the response"
  end
  local out, n = {}, #data.data
  for i, e in ipairs(data.data) do
    local v = type(e) == "table" and e.embedding
    if type(v) ~= "table" and type(v) ~= "string" then return nil, ("embedding %d is missing"):format(i - 1) end
    -- (a vector of strings, nulls, booleans or lists was returned as one, and relayed: garbage where
    -- the caller reads floats. One pass, nothing made: 2,048 vectors of 1,536 are 3M checks.
    -- A base64 vector is a string.)
    if type(v) == "table" and (#v == 0 or not pcall(numbers, v)) then
      for j = 1, #v do
        if type(v[j]) ~= "number" then
          return nil, ("embedding %d: element %d is %s, not a number"):format(i - 1, j - 1,
            v[j] == json.null and "null" or "a " .. type(v[j]))
        end
      end
      return nil, ("embedding %d has no numbers"):format(i - 1)
    end
    -- (an index given twice or past the list left a vector out, or a hole: inputs and vectors no longer
    -- matched, and the caller was not told)
    local at = math.tointeger(e.index) or (i - 1)
    if at < 0 or at >= n or out[at + 1] ~= nil then
      return nil, ("embedding %d: index %s is taken or outside 0..%d"):format(i - 1, tostring(e.index), n - 1)
    end
    out[at + 1] = v
  end
  -- a usage without a readable count (none, a negative one, a string) is unknown, as a chat answer's:
  -- its call a ledger row without a price, never a $0 one (which wrote no row and settled at 0)
  local u = type(data.usage) == "table" and data.usage or {}
  local input = num(u.prompt_tokens)
  if input == nil and absent(u.prompt_tokens) then input = num(u.total_tokens) end
  return { embeddings = out, model = type(data.model) == "string" and data.model or nil,
    usage = input and { input_tokens = input, output_tokens = 0, cached_input_tokens = 0, cache_write_tokens = 0 } }
end

return openai
