-- The mock AI provider: scenario logic over resil.server (evhttp in C).
--
--   local m = resil.mock.start{ seed = 1, latency = {min = 0.01, max = 0.05},
--     faults = { {route = "chat", probability = 0.2, status = 429, retry_after = 1} },
--     sequence = { chat = { 500, "ok", "hang" } } }
--   m.url, m:stats(), m:reset(), m:configure(scenario), m:stop()
-- opts: host, port, and resil.server.listen's limits (max_headers, max_body,
-- read_timeout).
--
-- Routes: chat (POST /v1/chat/completions, OpenAI shape, SSE when
-- "stream": true), messages (POST /v1/messages, Anthropic's), the job and
-- speech APIs of src/lua/mock_jobs.lua (Replicate predictions, the fal queue,
-- ElevenLabs), GET /v1/models and /v1/models/{id} (each API's shape), and GET /__mock/stats. Custom routes: routes = { ["POST /path"] = fn(req) }.
-- refuses = { "claude-fable-5-1", ... }: models that decline every request (stop_reason
-- "refusal"), which the beta's server-side `fallbacks` serve (Mock:fall_back).
-- on_request = fn(req): called as each request arrives, before it is answered.
local resil = ...
local json = resil.json
local mock_jobs = require "resil.mock_jobs" -- Replicate, fal, ElevenLabs (src/lua/mock_jobs.lua)
local job_routes = mock_jobs.route
local wire = require "resil.mock_wire" -- what each API refuses in a conversation (src/lua/mock_wire.lua)

local mock = {}
local Mock = {}
Mock.__index = Mock

-- { method, path pattern, route name }; a route's handler is HANDLERS[name].
-- Another file extends both (mock.routes, mock.handlers).
local BUILTIN_ROUTES = {
  { "POST", "^/v1/chat/completions$", "chat" },
  { "POST", "^/v1/messages$", "messages" },
  { "POST", "^/v1/messages/count_tokens$", "count_tokens" },
  { "POST", "^/v1/embeddings$", "embeddings" },
  { "GET", "^/v1/models$", "models" },
  { "GET", "^/v1/models/(.+)$", "model" },
}

local NAMED_FAULTS = { hang = true, reset = true, truncate = true, garbage = true, empty = true, stall = true,
  ok = true, slow = true, not_http = true, cut = true, error_event = true }

-- OpenAI's error types by status (its 401 and 404, a wrong key or a retired model, are
-- invalid_request_error with a code: invalid_api_key, model_not_found)
local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "invalid_request_error", [403] = "permission_error",
  [404] = "invalid_request_error", [429] = "rate_limit_exceeded", [500] = "server_error",
  [502] = "bad_gateway", [503] = "service_unavailable", [504] = "gateway_timeout",
}

-- xorshift64*: a per-mock random source, so a seed gives the same faults
-- whatever else uses math.random.
local function new_random(seed)
  local state = (seed and math.tointeger(seed) or os.time()) * 2654435761 + 1 -- (2.0: the integer 2)
  if state == 0 then state = 88172645463325252 end
  return function()
    state = state ~ (state >> 12)
    state = state ~ (state << 25)
    state = state ~ (state >> 27)
    local x = (state * 0x2545F4914F6CDD1D) >> 11
    return x / 9007199254740992.0
  end
end

-- A scenario's mistakes raise at the caller's line (level: its level from
-- check_scenario), naming the entry: a misspelt fault kind or a status given as a
-- string was served as a normal 200, so a spec of an outage passed without one.
--
-- A name the mock does not know raises too: a scenario key, a route, a fault's field misspelt
-- (`sequnce`, `chats`, `probabilty`) was ignored, and the spec passed on normal answers.
local SCENARIO_KEYS = { "faults", "sequence", "routes", "latency", "seed", "jobs", "idempotency", "on_request",
  "models", "reply", "strict", "api_keys", "rate_limits", "refuses", "prices", "cached_tokens", "dimensions",
  "service_tier", "stream_interval" }
local FAULT_FIELDS = { "route", "model", "probability", "kind", "status", "retry_after", "error_type", "error_code",
  "message", "body", "headers", "should_retry", "latency", "after" }
local function set_of(list)
  local set = {}
  for _, v in ipairs(list) do set[v] = true end
  return set
end
local IS_SCENARIO_KEY, IS_FAULT_FIELD = set_of(SCENARIO_KEYS), set_of(FAULT_FIELDS)
local IS_JOBS_KEY, IS_FATE, IS_JOB_ROUTE =
  set_of(mock_jobs.scenario_keys), set_of(mock_jobs.fate_names), set_of(mock_jobs.route_names)

-- the first key of t that the set `known` does not hold | nil (a misspelt option is said, not ignored)
local function unknown_key(t, known)
  for k in pairs(t) do
    if not known[k] then return k end
  end
end

-- -> nil when the scenario `s` serves a route so named (a built-in one, a job API's, a custom
-- route's "METHOD /path"), else the message naming those it serves
local function unknown_route(s, route)
  if type(route) == "string" and type(s.routes) == "table" and s.routes[route] ~= nil then return nil end
  local names = {}
  for _, r in ipairs(BUILTIN_ROUTES) do
    if r[3] == route then return nil end
    names[#names + 1] = r[3]
  end
  for _, name in ipairs(mock_jobs.route_names) do
    if name == route then return nil end
    names[#names + 1] = name
  end
  return ("unknown route '%s' (routes: %s, or a custom route's \"METHOD /path\")"):format(tostring(route),
    table.concat(names, ", "))
end

local function shown(v)
  if type(v) == "string" then return ("'%s'"):format(v) end
  return type(v) == "table" and "a table of other fields" or tostring(v)
end

-- a latency: seconds (a number >= 0), { min =, max = } (uniform) or { mean =, stddev = } (normal)
-- -> the message when `v` is none of them
local LATENCY_FIELDS = { min = true, max = true, mean = true, stddev = true }
local function latency_wrong(v)
  local function seconds(x) return type(x) == "number" and x >= 0 and x < math.huge end -- (NaN too)
  local ok
  if type(v) == "number" then
    ok = seconds(v)
  elseif type(v) == "table" then
    ok = true
    for k in pairs(v) do ok = ok and LATENCY_FIELDS[k] == true end
    if v.min ~= nil or v.max ~= nil then
      ok = ok and v.mean == nil and v.stddev == nil and (v.min == nil or seconds(v.min))
        and (v.max == nil or seconds(v.max)) and (v.min or 0) <= (v.max or v.min or 0)
    else
      ok = ok and seconds(v.mean) and (v.stddev == nil or seconds(v.stddev))
    end
  end
  if ok then return nil end
  return ("latency must be seconds >= 0, { min =, max = } or { mean =, stddev = }, not %s"):format(shown(v))
end

local function check_fault(f, where, level, named)
  local at = where and where .. ": " or "" -- (a fault of `faults` keeps the message it always had)
  if type(f) ~= "table" then error(("resil.mock: %seach fault must be a table"):format(at), level) end
  local k = unknown_key(f, IS_FAULT_FIELD)
  if k ~= nil then
    error(("resil.mock: %s: unknown field '%s' (a fault takes %s)"):format(named, tostring(k),
      table.concat(FAULT_FIELDS, ", ")), level)
  end
  if f.kind ~= nil and not NAMED_FAULTS[f.kind] then
    error(("resil.mock: %sunknown fault kind '%s'"):format(at, tostring(f.kind)), level)
  end
  if f.status ~= nil and not (type(f.status) == "number" and math.tointeger(f.status) and f.status >= 100
    and f.status <= 599) then
    error(("resil.mock: %sstatus must be an HTTP status number (100-599), not %s"):format(at,
      type(f.status) == "string" and ("'%s'"):format(f.status) or tostring(f.status)), level)
  end
  if f.probability and (type(f.probability) ~= "number" or f.probability < 0 or f.probability > 1) then
    error(("resil.mock: %sfault probability must be between 0 and 1"):format(at), level)
  end
  local wrong = f.latency ~= nil and latency_wrong(f.latency)
  if wrong then error(("resil.mock: %s: %s"):format(named, wrong), level) end
  -- (after = "2" or 2.5 never matched a delta's number, and a negative one never came: the stream
  -- was served whole, and a spec of a cut stream passed on a whole one; retry_after = "2s" was sent
  -- as Retry-After: 2s, which no client reads)
  if f.after ~= nil and not (type(f.after) == "number" and math.tointeger(f.after) and f.after >= 0) then -- (4 / 2 too)
    error(("resil.mock: %s: after must be a whole number of chunks >= 0, not %s"):format(named, shown(f.after)), level)
  end
  local ra = f.retry_after
  if ra ~= nil and ra ~= false and not (type(ra) == "number" and ra >= 0 and ra < math.huge) then
    error(("resil.mock: %s: retry_after must be seconds >= 0 (or false: none), not %s"):format(named, shown(ra)), level)
  end
end

local function check_scenario(s, level)
  if type(s) ~= "table" then error("resil.mock: scenario must be a table", level) end
  local k = unknown_key(s, IS_SCENARIO_KEY)
  if k ~= nil then
    error(("resil.mock: unknown scenario key '%s' (a scenario takes %s)"):format(tostring(k),
      table.concat(SCENARIO_KEYS, ", ")), level)
  end
  if s.seed ~= nil and not (type(s.seed) == "number" and math.tointeger(s.seed)) then
    error(("resil.mock: seed must be a whole number, not %s"):format(shown(s.seed)), level)
  end
  local wrong = s.latency ~= nil and latency_wrong(s.latency)
  if wrong then error("resil.mock: " .. wrong, level) end
  if s.faults ~= nil and type(s.faults) ~= "table" then error("resil.mock: faults must be a list", level) end
  for i, f in ipairs(s.faults or {}) do
    local named = ("faults[%d]"):format(i)
    check_fault(f, nil, level + 1, named)
    local wrong = f.route ~= nil and unknown_route(s, f.route)
    if wrong then error(("resil.mock: %s: %s"):format(named, wrong), level) end
  end
  if s.sequence ~= nil and type(s.sequence) ~= "table" then error("resil.mock: sequence must be a table", level) end
  for route, seq in pairs(s.sequence or {}) do
    local wrong = route ~= "*" and unknown_route(s, route)
    if wrong then error(("resil.mock: sequence.%s: %s"):format(tostring(route), wrong), level) end
    if type(seq) ~= "table" then error(("resil.mock: sequence.%s must be a list"):format(route), level) end
    for i, entry in ipairs(seq) do
      local where = ("sequence.%s[%d]"):format(route, i)
      if type(entry) == "number" then check_fault({ status = entry }, where, level + 1, where)
      elseif type(entry) == "string" then check_fault({ kind = entry }, where, level + 1, where)
      else check_fault(entry, where, level + 1, where) end
      -- (taken and ignored: { status = 500, model = "gpt-4o" } failed whichever model's request came
      -- first, and a probability of 0.1 failed every time)
      for _, field in ipairs({ "route", "model", "probability" }) do
        if type(entry) == "table" and entry[field] ~= nil then
          error(("resil.mock: %s: %s is a field of faults = {...}: a sequence plays its entries in order, to "
            .. "whatever request of its route comes next"):format(where, field), level)
        end
      end
    end
  end
  if s.jobs ~= nil then
    if type(s.jobs) ~= "table" then error("resil.mock: jobs must be a table", level) end
    local jk = unknown_key(s.jobs, IS_JOBS_KEY)
    if jk ~= nil then
      error(("resil.mock: jobs: unknown key '%s' (jobs takes %s)"):format(tostring(jk),
        table.concat(mock_jobs.scenario_keys, ", ")), level)
    end
    -- (a misspelt fate, "faild", made a job that succeeded: the failure rehearsed never happened)
    for i, f in ipairs(type(s.jobs.fates) == "table" and s.jobs.fates or {}) do
      local name = type(f) == "table" and f[1] or f
      if not IS_FATE[name] then
        error(("resil.mock: jobs.fates[%d]: unknown fate '%s' (fates: %s)"):format(i, tostring(name),
          table.concat(mock_jobs.fate_names, ", ")), level)
      end
    end
    local route = unknown_key(type(s.jobs.errors) == "table" and s.jobs.errors or {}, IS_JOB_ROUTE)
    if route ~= nil then
      error(("resil.mock: jobs.errors.%s: unknown route '%s' (routes: %s)"):format(tostring(route), tostring(route),
        table.concat(mock_jobs.route_names, ", ")), level)
    end
  end
  if s.routes ~= nil and type(s.routes) ~= "table" then error("resil.mock: routes must be a table", level) end
  -- (one without its method, or in lower case, was never matched; a handler that was no function
  -- failed at its request, a 500 "handler error")
  for pattern, fn in pairs(s.routes or {}) do
    if type(pattern) ~= "string" or not pattern:match("^%u+%s+/") then
      error(("resil.mock: routes['%s']: a custom route is \"METHOD /path\" (\"POST /v1/audio/speech\")")
        :format(tostring(pattern)), level)
    end
    local mt = getmetatable(fn)
    if type(fn) ~= "function" and not (type(mt) == "table" and mt.__call) then
      error(("resil.mock: routes['%s']: its handler must be a function, not %s"):format(pattern, type(fn)), level)
    end
  end
  if s.models ~= nil then
    if type(s.models) ~= "table" then error("resil.mock: models must be a list of model ids", level) end
    for i, id in ipairs(s.models) do
      if type(id) ~= "string" or id == "" then
        error(("resil.mock: models[%d] must be a model id (a string), not %s"):format(i, tostring(id)), level)
      end
    end
  end
  if s.on_request ~= nil and type(s.on_request) ~= "function" then
    error("resil.mock: on_request must be a function", level)
  end
end

local function sample_latency(spec, random)
  if spec == nil then return 0 end
  if type(spec) == "number" then return spec end
  if spec.min or spec.max then
    local lo, hi = spec.min or 0, spec.max or spec.min or 0
    return lo + (hi - lo) * random()
  end
  if spec.mean then -- normal (Box-Muller), never negative
    local u1, u2 = math.max(random(), 1e-12), random()
    local z = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    return math.max(0, spec.mean + (spec.stddev or 0) * z)
  end
  return 0
end

local function estimate_tokens(text) return math.max(1, math.ceil(#text / 4)) end

-- Error bodies as each API documents them. OpenAI: {error={message, type,
-- param, code}}; Anthropic: {type="error", error={type, message}}.
local ANTHROPIC_ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "authentication_error", [402] = "billing_error", [403] = "permission_error",
  [404] = "not_found_error", [413] = "request_too_large", [429] = "rate_limit_error", [500] = "api_error",
  [504] = "timeout_error", [529] = "overloaded_error",
}

local function anthropic_error(status, etype, message)
  etype = etype or ANTHROPIC_ERROR_TYPES[status] or "api_error"
  return json.encode({ type = "error", error = { type = etype, message = message or ("mock %d: %s"):format(status, etype) } })
end

local function openai_error(status, message, etype, code, param)
  return json.encode({ error = { message = message, type = etype or ERROR_TYPES[status] or "api_error",
    param = param or json.null, code = code or json.null } })
end

local function error_body(status, fault, flavor)
  if fault.body then return fault.body end
  if flavor == "anthropic" then return anthropic_error(status, fault.error_type, fault.message) end
  if status == 529 then
    return json.encode({ type = "error", error = { type = "overloaded_error", message = "Overloaded" } })
  end
  if status == 429 and not fault.error_type and not fault.error_code then
    -- as the API writes a rate limit: the limit hit as the type, the code an SDK's error.code reads
    return json.encode({ error = { message = fault.message or "Rate limit reached for requests per min (RPM). "
      .. "Please try again in 1s.", type = "requests", param = json.null, code = "rate_limit_exceeded" } })
  end
  local etype = fault.error_type or ERROR_TYPES[status] or "api_error"
  return json.encode({ error = { message = fault.message or ("mock %d: %s"):format(status, etype),
    type = etype, param = json.null, code = fault.error_code or fault.error_type or json.null } })
end

local START_OPTIONS = { "host", "port", "max_headers", "max_body", "read_timeout" }
local IS_START_OPTION = set_of(START_OPTIONS)

function mock.start(scenario, opts)
  scenario = scenario or {}
  opts = opts or {}
  -- (a misspelt one, { prot = 8080 }, was ignored; a number failed inside this file)
  if type(opts) ~= "table" then error("resil.mock.start: options must be a table", 2) end
  local unknown = unknown_key(opts, IS_START_OPTION)
  if unknown ~= nil then
    error(("resil.mock.start: unknown option '%s' (it takes %s)"):format(tostring(unknown),
      table.concat(START_OPTIONS, ", ")), 2)
  end
  check_scenario(scenario, 3) -- (3: the caller of mock.start; 2 named mock.start's own line)
  local self = setmetatable({}, Mock)
  self:configure(scenario)
  self:reset()
  self.replies = {}
  self.threads, self.thread_count = {}, 0 -- (message threads: Mock:thread)
  self.prompt_cache_entries = {} -- (prompt caching: Mock:prompt_cache)
  -- response ids unique across mocks, as a real provider's are (costs may be recorded under them)
  self.instance = resil.hash(tostring(self) .. tostring(resil.clock.wall()) .. tostring(os.clock())):sub(1, 8)
  local server, err = resil.server.listen({
    host = opts.host or "127.0.0.1",
    port = opts.port or 0,
    max_headers = opts.max_headers, max_body = opts.max_body, read_timeout = opts.read_timeout,
    handler = function(req) return self:handle(req) end,
  })
  if not server then return nil, err end
  self.server = server
  self.port = self.server:port()
  self.url = ("http://%s:%d"):format(opts.host or "127.0.0.1", self.port)
  return self
end

-- Replace the scenario of a running mock (e.g. to end an outage mid-test).
function Mock:configure(scenario)
  check_scenario(scenario, 3)
  self.scenario = scenario
  self.random = new_random(scenario.seed)
  self.sequence_pos = {}
end

-- The counters only: what the provider holds (the answers kept under Idempotency-Keys, message
-- threads, the prompt cache) stays, as a provider's does. (It was forgotten too: a spec that reset
-- the counters to measure a retry alone saw the retry under its key billed anew, not replayed.)
function Mock:reset()
  self.counts = { total = 0, routes = {}, statuses = {}, keys = {}, paid_keys = {}, faults = {}, replayed = 0,
    billed = { usd = 0, prompt_tokens = 0, completion_tokens = 0, responses = 0 } }
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = deep_copy(x) end
  return out
end

function Mock:stats() return deep_copy(self.counts) end

function Mock:stop()
  if self.server then self.server:close() end
  self.server = nil
end
Mock.__close = Mock.stop

-- the model a request's JSON body names, for faults with `model =`
local function body_model(req)
  local body = req and req.body and json.decode(req.body)
  return type(body) == "table" and body.model or nil
end

-- The fault for this request: the route's sequence first, then faults by
-- probability (a fault with `model = "x"` only for requests naming model x);
-- nil means a normal answer.
function Mock:pick_fault(route, req)
  local s = self.scenario
  local seq = s.sequence and (s.sequence[route] or s.sequence["*"])
  if seq then
    local key = s.sequence[route] and route or "*"
    local pos = (self.sequence_pos[key] or 0) + 1
    if pos <= #seq then
      self.sequence_pos[key] = pos
      local entry = seq[pos]
      if type(entry) == "number" then return { status = entry } end
      if type(entry) == "string" then return entry ~= "ok" and { kind = entry } or nil end
      return entry
    end
  end
  for _, f in ipairs(s.faults or {}) do
    if (f.route == nil or f.route == route) and (f.model == nil or f.model == body_model(req))
      and self.random() < (f.probability or 1) then return f end
  end
  return nil
end

function Mock:count(route, req, status)
  local c = self.counts
  c.total = c.total + 1
  c.routes[route] = (c.routes[route] or 0) + 1
  c.statuses[tostring(status)] = (c.statuses[tostring(status)] or 0) + 1
  local key = req.headers["idempotency-key"]
  if key then c.keys[key] = (c.keys[key] or 0) + 1 end
end

function Mock:bill(req, usage)
  local prices = self.scenario.prices or { input = 0.0005, output = 0.0015 } -- USD per 1K tokens
  local usd = (usage.prompt_tokens * prices.input + usage.completion_tokens * prices.output) / 1000
  local b = self.counts.billed
  b.usd = b.usd + usd
  b.prompt_tokens = b.prompt_tokens + usage.prompt_tokens
  b.completion_tokens = b.completion_tokens + usage.completion_tokens
  b.responses = b.responses + 1
  local key = req.headers["idempotency-key"]
  if key then self.counts.paid_keys[key] = (self.counts.paid_keys[key] or 0) + 1 end
end

-- cjson writes an empty table as {}; the APIs send [] where a list is empty
local EMPTY = "\0empty-list\0"
local function encode(t) return (json.encode(t):gsub('"\\u0000empty%-list\\u0000"', "[]")) end

-- request numbers arrive as floats: an integer field is an integral number
local function int(v) return type(v) == "number" and math.tointeger(v) or nil end

local function content_text(content)
  if type(content) == "string" then return content end
  local parts = {}
  for _, block in ipairs(type(content) == "table" and content or {}) do
    if type(block) == "table" and type(block.text) == "string" then parts[#parts + 1] = block.text end
  end
  return table.concat(parts, "\n")
end

local function last_user_text(body)
  local text = ""
  for _, m in ipairs(type(body) == "table" and type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and m.content ~= nil then text = content_text(m.content) end
  end
  return text
end

local function prompt_text(body)
  local parts = { type(body) == "table" and body.system and content_text(body.system) or nil }
  for _, m in ipairs(type(body) == "table" and type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and m.content ~= nil then parts[#parts + 1] = content_text(m.content) end
  end
  return table.concat(parts, "\n")
end

-- The reply's words, cut at max_tokens (one word is one token here):
-- words, completion tokens, and whether the limit cut it.
local function reply_words(reply, max_tokens)
  local words = {}
  for word in reply:gmatch("%S+%s*") do words[#words + 1] = word end
  max_tokens = int(max_tokens)
  if max_tokens and max_tokens >= 0 and #words > max_tokens then
    for i = #words, max_tokens + 1, -1 do words[i] = nil end
    return words, max_tokens, true
  end
  return words, #words, false
end

-- The words before the first stop sequence the text holds (the APIs stop before it, and
-- leave it out) -> words, the sequence | nil
local function stop_at(words, stops)
  if type(stops) == "string" then stops = { stops } end
  if type(stops) ~= "table" then return words, nil end
  local text = table.concat(words)
  local at, seq
  for _, s in ipairs(stops) do
    local i = type(s) == "string" and s ~= "" and text:find(s, 1, true)
    if i and (not at or i < at) then at, seq = i, s end
  end
  if not at then return words, nil end
  local kept, len = {}, 0
  for _, w in ipairs(words) do
    if len + #w >= at then
      if at - 1 - len > 0 then kept[#kept + 1] = w:sub(1, at - 1 - len) end
      break
    end
    kept[#kept + 1], len = w, len + #w
  end
  return kept, seq
end

-- A string a schema takes: a value of its format (the API's strict structured output keeps to
-- these, and an app's validator, zod's .email() say, refused the reply's text where an email
-- goes), else the reply's text within minLength and maxLength (characters, not bytes)
local FORMATS = { ["date-time"] = "2025-01-01T00:00:00Z", date = "2025-01-01", time = "00:00:00Z",
  duration = "P1D", email = "mock@example.com", hostname = "example.com", ipv4 = "192.0.2.1",
  ipv6 = "2001:db8::1", uuid = "00000000-0000-4000-8000-000000000000", uri = "https://example.com/" }
local function string_of(schema, text)
  if FORMATS[schema.format] then return FORMATS[schema.format] end
  local least, most = math.tointeger(schema.minLength), math.tointeger(schema.maxLength)
  if not utf8.len(text) then return text end -- (not UTF-8: as it is)
  if least and utf8.len(text) < least then -- (the text again, as many times as it takes: one rep)
    local pad = text ~= "" and text or "x"
    local n = utf8.len(pad) + 1
    text = (pad .. " "):rep(math.ceil((math.min(least, 1000000) - n + 1) / n)) .. pad
  end
  if most and most >= 0 and utf8.len(text) > most then text = text:sub(1, (utf8.offset(text, most + 1) or #text + 1) - 1) end
  return text
end

-- A number a schema takes: 0 where its bounds allow it, else the bound nearest 0 (one past an
-- exclusive one; the middle between two bounds, exclusive both), a multipleOf's multiple
local function number_of(schema, integer)
  local lo, hi = tonumber(schema.minimum), tonumber(schema.maximum)
  local xlo, xhi = tonumber(schema.exclusiveMinimum), tonumber(schema.exclusiveMaximum)
  if schema.exclusiveMinimum == true then xlo, lo = lo, nil end -- (draft 4: a flag on minimum)
  if schema.exclusiveMaximum == true then xhi, hi = hi, nil end
  local function fits(v)
    return not (lo and v < lo or xlo and v <= xlo or hi and v > hi or xhi and v >= xhi)
  end
  local step = tonumber(schema.multipleOf)
  step = step and step > 0 and (not integer or math.tointeger(step)) and step or (integer and 1 or nil)
  local v = 0
  if not fits(v) then
    local above = lo and lo > 0 or xlo and xlo >= 0
    if step then -- the first multiple past the bound, toward 0
      local bound = above and math.max(lo or -math.huge, xlo or -math.huge) or math.min(hi or math.huge, xhi or math.huge)
      v = (above and math.ceil(bound / step) or math.floor(bound / step)) * step
      if not fits(v) then v = v + (above and step or -step) end
    elseif above then
      v = lo and (not xlo or lo > xlo) and lo or (xhi and (xlo + xhi) / 2 or hi and math.min(xlo + 1, hi) or xlo + 1)
    else
      v = hi and (not xhi or hi < xhi) and hi or (xlo and (xlo + xhi) / 2 or lo and math.max(xhi - 1, lo) or xhi - 1)
    end
  end
  if integer then return math.tointeger(v) or math.floor(v) end
  return math.tointeger(v) or v
end

-- The least value a JSON schema takes, its strings the reply's text: what a model held
-- to a schema answers (structured output, a tool call its request forces). A reply that
-- is JSON already is the scenario's own answer, kept.
local function instance_of(schema, text, root, depth, budget)
  depth = (depth or 0) + 1
  budget = budget or { 1000 } -- (values made: a recursive schema, a tree's $ref "#", ends)
  budget[1] = budget[1] - 1
  if type(schema) ~= "table" or depth > 16 or budget[1] < 0 then return {} end -- (no schema: any object)
  root = root or schema
  if type(schema["$ref"]) == "string" then -- ("#/$defs/x": a path in the root)
    local t = root
    for part in schema["$ref"]:gmatch("[^/#]+") do t = type(t) == "table" and t[part] or nil end
    return instance_of(t, text, root, depth, budget)
  end
  if schema.const ~= nil then return schema.const end
  if type(schema.enum) == "table" and schema.enum[1] ~= nil then return schema.enum[1] end
  local alt = schema.anyOf or schema.oneOf or schema.allOf
  if type(alt) == "table" and alt[1] ~= nil then return instance_of(alt[1], text, root, depth, budget) end
  local t = schema.type
  if type(t) == "table" then -- (["string", "null"]: the first that is not null)
    local first = "null"
    for _, x in ipairs(t) do if x ~= "null" then first = x break end end
    t = first
  end
  if t == "string" then return string_of(schema, text) end
  if t == "integer" or t == "number" then return number_of(schema, t == "integer") end
  if t == "boolean" then return true end
  if t == "null" then return json.null end
  if t == "array" then
    local n = math.tointeger(schema.minItems) or 1
    if math.tointeger(schema.maxItems) and schema.maxItems < n then n = schema.maxItems end
    -- (within the values left to make: a minItems of millions was a list made whole, 2 GB and
    -- 40 s of the mock's loop for one request's schema)
    n = math.max(0, math.min(n, budget[1]))
    local out = {}
    for i = 1, n do out[i] = instance_of(schema.items, text, root, depth, budget) end
    return #out > 0 and out or EMPTY
  end
  -- (the required properties when the schema names them, as a model leaves optional ones out)
  local out, props = {}, type(schema.properties) == "table" and schema.properties or {}
  if type(schema.required) == "table" then
    for _, k in ipairs(schema.required) do out[k] = instance_of(props[k], text, root, depth, budget) end
  else
    for k, sub in pairs(props) do out[k] = instance_of(sub, text, root, depth, budget) end
  end
  return out
end

-- the JSON a reply is under a schema (json_object: any object)
local function json_reply(schema, reply)
  local kept = json.decode(reply)
  if type(kept) == "table" then return reply end
  if schema == nil then return encode({ reply = reply }) end
  return encode(instance_of(schema, reply))
end

-- The tool a request makes the model call: OpenAI's tool_choice "required" or
-- a function named, Anthropic's "any" or a tool named -> name, input schema | nil
local function forced_tool(body)
  local choice, tools = body.tool_choice, type(body.tools) == "table" and body.tools or {}
  local name
  if choice == "required" or type(choice) == "table" and choice.type == "any" then
    local t = tools[1]
    name = type(t) == "table" and (type(t["function"]) == "table" and t["function"].name or t.name) or nil
  elseif type(choice) == "table" and choice.type == "function" and type(choice["function"]) == "table" then
    name = choice["function"].name
  elseif type(choice) == "table" and choice.type == "tool" then
    name = choice.name
  elseif type(choice) == "table" and choice.type == "allowed_tools" and type(choice.allowed_tools) == "table"
    and choice.allowed_tools.mode == "required" then -- (one of the tools it allows: the first)
    local t = type(choice.allowed_tools.tools) == "table" and choice.allowed_tools.tools[1]
    name = type(t) == "table" and type(t["function"]) == "table" and t["function"].name or nil
  end
  if type(name) ~= "string" then return nil end
  for _, t in ipairs(tools) do
    local f = type(t) == "table" and (type(t["function"]) == "table" and t["function"] or t) or {}
    if f.name == name then return name, f.parameters or f.input_schema end
  end
  return nil
end

-- a tool call's arguments in the pieces a stream sends them in
local function pieces_of(s)
  local out = {}
  for i = 1, #s, 8 do out[#out + 1] = s:sub(i, i + 7) end
  return out
end

-- A tool call's arguments cut at max_tokens, as the APIs cut one that runs past it (its tokens
-- the text's estimate, four bytes each; never inside a UTF-8 character) -> text, tokens, cut
local function cut_call(text, room)
  local tokens = estimate_tokens(text)
  if not room or tokens <= room then return text, tokens, false end
  local n = math.max(0, room) * 4
  while n > 0 and (text:byte(n + 1) or 0) & 0xC0 == 0x80 do n = n - 1 end
  return text:sub(1, n), math.max(0, room), true
end

-- the members an object's text cut short holds whole (those before its last top-level comma),
-- as the input of a tool_use block cut at max_tokens
local function whole_members(text)
  local depth, in_string, escaped, last = 0, false, false, nil
  for i = 1, #text do
    local c = text:sub(i, i)
    if in_string then
      if escaped then escaped = false elseif c == "\\" then escaped = true elseif c == '"' then in_string = false end
    elseif c == '"' then in_string = true
    elseif c == "{" or c == "[" then depth = depth + 1
    elseif c == "}" or c == "]" then depth = depth - 1
    elseif c == "," and depth == 1 then last = i end
  end
  return last and json.decode(text:sub(1, last - 1) .. "}") or {}
end

-- logprobs of a choice's tokens (words here), and top_logprobs alternatives of each
local function logprobs_of(words, top)
  local content = {}
  for i, w in ipairs(words) do
    local alts = {}
    for j = 1, top do
      local tok = j == 1 and w or ("%s~%d"):format(w, j)
      alts[j] = { token = tok, logprob = -0.01 * j, bytes = { tok:byte(1, -1) } }
    end
    content[i] = { token = w, logprob = -0.01, bytes = { w:byte(1, -1) }, top_logprobs = top > 0 and alts or EMPTY }
  end
  return { content = #content > 0 and content or EMPTY, refusal = json.null }
end

-- Go-style duration, as in OpenAI's x-ratelimit-reset-* ("6m0s", "12ms", "1s")
local function go_duration(seconds)
  if seconds < 1 then return ("%dms"):format(math.max(1, math.floor(seconds * 1000 + 0.5))) end
  local m = math.floor(seconds / 60)
  local s = seconds - m * 60
  if m > 0 then return ("%dm%ds"):format(m, math.floor(s)) end
  return ("%gs"):format(math.floor(s * 1000 + 0.5) / 1000)
end

-- The window of the rate-limit headers: one minute on the host clock.
function Mock:window()
  local now = resil.now()
  local w = self.rate_window
  if not w or now - w.start >= 60 - 0.001 then -- (a client that waited the reset header's ms is in the next one)
    w = { start = now, requests = 0, tokens = 0 }
    self.rate_window = w
  end
  return w, 60 - (now - w.start)
end

function Mock:rate_headers(flavor, tokens, uncounted)
  local limits = self.scenario.rate_limits or {}
  local rl, tl = limits.requests or 10000, limits.tokens or 10000000
  local w, left = self:window()
  if not uncounted then w.requests, w.tokens = w.requests + 1, w.tokens + (tokens or 0) end
  local rr, tr = math.max(0, rl - w.requests), math.max(0, tl - w.tokens)
  if flavor == "anthropic" then
    local reset = os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(resil.clock.wall() + left + 0.999))
    return { ["anthropic-ratelimit-requests-limit"] = tostring(rl),
      ["anthropic-ratelimit-requests-remaining"] = tostring(rr), ["anthropic-ratelimit-requests-reset"] = reset,
      ["anthropic-ratelimit-tokens-limit"] = tostring(tl),
      ["anthropic-ratelimit-tokens-remaining"] = tostring(tr), ["anthropic-ratelimit-tokens-reset"] = reset }
  end
  -- a request-limit resets one request's share at a time; tokens the same
  return { ["x-ratelimit-limit-requests"] = tostring(rl), ["x-ratelimit-remaining-requests"] = tostring(rr),
    ["x-ratelimit-reset-requests"] = go_duration(rr > 0 and 60 / rl or left),
    ["x-ratelimit-limit-tokens"] = tostring(tl), ["x-ratelimit-remaining-tokens"] = tostring(tr),
    ["x-ratelimit-reset-tokens"] = go_duration(tr > 0 and 60 * math.max(1, tokens or 1) / tl or left) }
end

-- scenario.rate_limits, when given, are enforced as the APIs enforce theirs: a
-- request once the minute's requests or tokens are spent is a 429 (OpenAI's type
-- "requests" / "tokens", Anthropic's rate_limit_error with retry-after), its
-- headers saying when the window resets; refused requests do not count. (The
-- headers alone said "0 remaining" while the mock went on answering 200, so a
-- policy that ignored them passed its spec and met 429s in production.)
function Mock:rate_refusal(flavor)
  local limits = self.scenario.rate_limits
  if type(limits) ~= "table" then return nil end
  local rl, tl = limits.requests or 10000, limits.tokens or 10000000
  local w, left = self:window()
  local which = (w.requests >= rl and "requests") or (w.tokens >= tl and "tokens") or nil
  if not which then return nil end
  local headers = self:rate_headers(flavor, 0, true)
  headers["content-type"] = "application/json"
  local wait = math.max(1, math.ceil(left))
  if flavor == "anthropic" then
    headers["retry-after"] = tostring(wait)
    return { status = 429, headers = headers, body = anthropic_error(429, "rate_limit_error",
      ("This request would exceed the rate limit for your organization of %d %s per minute."):format(
        which == "requests" and rl or tl, which == "requests" and "requests" or "input tokens")) }
  end
  local used, limit = which == "requests" and w.requests or w.tokens, which == "requests" and rl or tl
  return { status = 429, headers = headers, body = json.encode({ error = {
    message = ("Rate limit reached for %s per min (%s): Limit %d, Used %d, Requested 1. Please try again in %s.")
      :format(which, which == "requests" and "RPM" or "TPM", limit, used, go_duration(left)),
    type = which, param = json.null, code = "rate_limit_exceeded" } }) }
end

local function sse(data, event)
  if event then return ("event: %s\ndata: %s\n\n"):format(event, data) end
  return ("data: %s\n\n"):format(data)
end

-- Fields of a chat completions request (strict mode rejects others, as the API does).
local OPENAI_FIELDS = {}
for f in ([[model messages max_tokens max_completion_tokens temperature top_p n stream stream_options stop
  presence_penalty frequency_penalty logit_bias logprobs top_logprobs user seed tools tool_choice
  parallel_tool_calls response_format service_tier store metadata reasoning_effort modalities audio
  prediction web_search_options verbosity prompt_cache_key prompt_cache_retention safety_identifier
  functions function_call]]):gmatch("%S+") do
  OPENAI_FIELDS[f] = true
end

-- the ranges each API takes a sampling number in
local OPENAI_RANGES = { temperature = { 0, 2 }, top_p = { 0, 1 }, presence_penalty = { -2, 2 },
  frequency_penalty = { -2, 2 } }
local ANTHROPIC_RANGES = { temperature = { 0, 1 }, top_p = { 0, 1 } }
local OPENAI_INT_RANGES = { n = { 1, 128 }, top_logprobs = { 0, 20 } }

-- OpenAI's reasoning models, by name (first match): "reasoning" takes max_completion_tokens only
-- and no temperature or top_p but the default 1; "effort" (gpt-5.1 on, whose default effort is
-- none) takes them while its reasoning_effort is none; false is a chat model of the family;
-- "chat" a chat model that takes no reasoning_effort
local OPENAI_REASONING = { { "^gpt%-4", "chat" }, { "^gpt%-3%.5", "chat" }, { "^chatgpt%-4o", "chat" },
  { "^gpt%-5[%.%d]*%-chat", false }, { "^gpt%-5%.%d+%-pro", "reasoning" },
  { "^gpt%-5%.%d", "effort" }, { "^gpt%-5", "reasoning" }, { "^o%d", "reasoning" } }
local function openai_reasoning(model)
  for _, r in ipairs(OPENAI_REASONING) do
    if tostring(model):find(r[1]) then return r[2] end
  end
  return false
end

-- what the API answers a reasoning model's request for a parameter it does not take | nil
local function reasoning_refusal(body)
  local kind = openai_reasoning(body.model)
  if kind == "chat" then -- (a chat model of the API's: it takes no reasoning_effort)
    if body.reasoning_effort ~= nil and body.reasoning_effort ~= json.null then
      return openai_error(400, "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
        "invalid_request_error", "unsupported_parameter", "reasoning_effort")
    end
    return nil
  end
  if not kind then return nil end
  if body.max_tokens ~= nil and body.max_tokens ~= json.null then
    return openai_error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
      .. "'max_completion_tokens' instead.", "invalid_request_error", "unsupported_parameter", "max_tokens")
  end
  if kind == "reasoning" and body.stop ~= nil and body.stop ~= json.null then
    return openai_error(400, "Unsupported parameter: 'stop' is not supported with this model.",
      "invalid_request_error", "unsupported_parameter", "stop")
  end
  if kind == "effort" and (body.reasoning_effort == nil or body.reasoning_effort == "none") then return nil end
  local t = body.temperature
  if type(t) == "number" and t ~= 1 then
    return openai_error(400, ("Unsupported value: 'temperature' does not support %s with this model. Only the "
      .. "default (1) value is supported."):format(tostring(t)), "invalid_request_error", "unsupported_value",
      "temperature")
  end
  if type(body.top_p) == "number" and body.top_p ~= 1 then
    return openai_error(400, "Unsupported parameter: 'top_p' is not supported with this model.",
      "invalid_request_error", "unsupported_parameter", "top_p")
  end
end

-- the reasoning tokens a request's answer spends, by its effort (none for a chat model, or at
-- effort none): a fixed number each, so that specs can count on them
local REASONING_TOKENS = { none = 0, minimal = 8, low = 16, medium = 64, high = 256, xhigh = 512 }
local function reasoning_tokens(body)
  local kind = openai_reasoning(body.model)
  local effort = body.reasoning_effort
  if not kind or kind == "chat" or (kind == "effort" and (effort == nil or effort == "none")) then return 0 end
  return REASONING_TOKENS[effort] or REASONING_TOKENS.medium
end

-- scenario.api_keys: the keys the mock accepts (any, when not set)
function Mock:key_ok(key)
  local keys = self.scenario.api_keys
  if keys == nil then return true end
  for _, k in ipairs(keys) do if k == key then return true end end
  return false
end

-- A strict request check: nil when acceptable, else the reply the API would send.
-- the most output tokens a known model writes (the APIs refuse a max_tokens past it: an Anthropic
-- client's 32000 falling back to gpt-4o-mini, an OpenAI client's 64000 to Opus 4.1), first match
-- by name; a model not here takes any
local OUTPUT_LIMITS = {
  { "^gpt%-4o%-2024%-05%-13", 4096 }, { "^gpt%-4o", 16384 }, { "^gpt%-4%.1", 32768 }, { "^gpt%-4%-turbo", 4096 },
  { "^gpt%-3%.5%-turbo", 4096 }, { "^o1%-mini", 65536 }, { "^o%d", 100000 }, { "^gpt%-5[%.%d]*%-chat", 16384 },
  { "^gpt%-5", 128000 },
  { "^claude%-opus%-4%-5", 64000 }, { "^claude%-opus%-4%-1", 32000 }, { "^claude%-opus%-4$", 32000 },
  { "^claude%-opus%-4%-0", 32000 }, { "^claude%-opus%-4%-20", 32000 }, { "^claude%-sonnet%-4", 64000 },
  { "^claude%-haiku%-4%-5", 64000 }, { "^claude%-3%-7%-sonnet", 64000 }, { "^claude%-3%-5%-", 8192 },
  { "^claude%-3%-haiku", 4096 }, { "^claude%-3%-opus", 4096 } }
local function output_limit(model)
  for _, l in ipairs(OUTPUT_LIMITS) do
    if tostring(model):find(l[1]) then return l[2] end
  end
end

local TOOL_CHOICE_MODES = { none = true, auto = true, required = true }
local TOOL_CHOICE_TYPES = { ["function"] = true, allowed_tools = true, custom = true }

function Mock:openai_check(req, body)
  local auth = req.headers["authorization"]
  if not auth or not auth:match("^Bearer %S") then
    return { status = 401, body = openai_error(401, "You didn't provide an API key. You need to provide your API key "
      .. "in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
      "invalid_request_error") }
  end
  if not self:key_ok(auth:match("^Bearer (.+)$")) then
    return { status = 401, body = openai_error(401, "Incorrect API key provided. You can find your API key at "
      .. "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key") }
  end
  for k in pairs(body) do
    if not OPENAI_FIELDS[k] then
      return { status = 400, body = openai_error(400, "Unrecognized request argument supplied: " .. tostring(k),
        "invalid_request_error") }
    end
  end
  if type(body.model) ~= "string" then
    return { status = 400, body = openai_error(400, "you must provide a model parameter", "invalid_request_error") }
  end
  if type(body.messages) ~= "table" or #body.messages == 0 then
    return { status = 400, body = openai_error(400, "[] is too short - 'messages'", "invalid_request_error", nil,
      "messages") }
  end
  -- sampling numbers past the API's ranges
  for field, range in pairs(OPENAI_RANGES) do
    local v = body[field]
    if type(v) == "number" and (v < range[1] or v > range[2]) then
      local above = v > range[2]
      return { status = 400, body = openai_error(400, ("Invalid '%s': decimal %s %s value. Expected a value %s %g, but "
        .. "got %g instead."):format(field, above and "above" or "below", above and "maximum" or "minimum",
        above and "<=" or ">=", above and range[2] or range[1], v), "invalid_request_error",
        above and "decimal_above_max_value" or "decimal_below_min_value", field) }
    end
  end
  -- integers in the API's ranges (n: 1 to 128 choices, top_logprobs: 0 to 20 alternatives)
  for field, range in pairs(OPENAI_INT_RANGES) do
    local v = body[field]
    if v ~= nil and v ~= json.null then
      if not int(v) then
        return { status = 400, body = openai_error(400, ("Invalid type for '%s': expected an integer, but got %s instead.")
          :format(field, type(v) == "number" and "a decimal number" or "a " .. type(v)), "invalid_request_error",
          "invalid_type", field) }
      end
      if v < range[1] or v > range[2] then
        local above = v > range[2]
        return { status = 400, body = openai_error(400, ("Invalid '%s': integer %s %s value. Expected a value %s %d, but "
          .. "got %d instead."):format(field, above and "above" or "below", above and "maximum" or "minimum",
          above and "<=" or ">=", above and range[2] or range[1], v), "invalid_request_error",
          above and "integer_above_max_value" or "integer_below_min_value", field) }
      end
    end
  end
  local refused = reasoning_refusal(body)
  if refused then return { status = 400, body = refused } end
  if body.parallel_tool_calls ~= nil and body.parallel_tool_calls ~= json.null
    and (type(body.tools) ~= "table" or #body.tools == 0) then
    return { status = 400, body = openai_error(400, "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' "
      .. "is only allowed when 'tools' are specified.", "invalid_request_error", nil, "parallel_tool_calls") }
  end
  if body.tool_choice ~= nil and body.tool_choice ~= json.null and (type(body.tools) ~= "table" or #body.tools == 0) then
    return { status = 400, body = openai_error(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed "
      .. "when 'tools' are specified.", "invalid_request_error", nil, "tool_choice") }
  end
  local limit = output_limit(body.model)
  for _, field in ipairs({ "max_tokens", "max_completion_tokens" }) do
    local n = int(body[field])
    if n and n < 1 then -- (an answer of no tokens is not one the API makes)
      return { status = 400, body = openai_error(400, ("Invalid '%s': integer below minimum value. Expected a value >= 1, "
        .. "but got %d instead."):format(field, n), "invalid_request_error", "integer_below_min_value", field) }
    end
    if limit and n and n > limit then
      return { status = 400, body = openai_error(400, ("%s is too large: %d. This model supports at most %d completion "
        .. "tokens, whereas you provided %d."):format(field, n, limit, n), "invalid_request_error", "invalid_value", field) }
    end
  end
  -- JSON mode needs the word in the prompt (without it a model may write whitespace until its limit)
  if type(body.response_format) == "table" and body.response_format.type == "json_object" then
    local said = false
    for _, msg in ipairs(body.messages) do
      if type(msg) == "table" and content_text(msg.content):lower():find("json", 1, true) then said = true; break end
    end
    if not said then
      return { status = 400, body = openai_error(400, "'messages' must contain the word 'json' in some form, to use "
        .. "'response_format' of type 'json_object'.", "invalid_request_error", nil, "messages") }
    end
  end
  -- (Anthropic's shapes, { type = "any" } or { type = "tool", name }, are not OpenAI's)
  local choice = body.tool_choice
  if type(choice) == "string" and not TOOL_CHOICE_MODES[choice] then
    return { status = 400, body = openai_error(400, ("Invalid value: '%s'. Supported values are: 'none', 'auto', and "
      .. "'required'."):format(choice), "invalid_request_error", "invalid_value", "tool_choice") }
  elseif type(choice) == "table" and not TOOL_CHOICE_TYPES[choice.type] then
    return { status = 400, body = openai_error(400, ("Invalid value: '%s'. Supported values are: 'function', "
      .. "'allowed_tools', and 'custom'."):format(tostring(choice.type)), "invalid_request_error", "invalid_value",
      "tool_choice.type") }
  end
  -- (metadata is kept with a stored completion only: sent alone, the API's 400)
  if body.metadata ~= nil and body.metadata ~= json.null and body.store ~= true then
    return { status = 400, body = openai_error(400, "The 'metadata' parameter is only allowed when 'store' is enabled.",
      "invalid_request_error", nil, "metadata") }
  end
  -- (a client that sends them on a call that does not stream, as a "fake streaming" proxy does)
  if body.stream_options ~= nil and body.stream_options ~= json.null and body.stream ~= true then
    return { status = 400, body = openai_error(400, "The 'stream_options' parameter is only allowed when 'stream' is "
      .. "enabled.", "invalid_request_error", nil, "stream_options") }
  end
  -- (Anthropic takes many stop sequences, OpenAI four: a fallback with more failed there)
  if type(body.stop) == "table" and #body.stop > 4 then
    return { status = 400, body = openai_error(400, ("Invalid 'stop': array too long. Expected an array with maximum "
      .. "length 4, but got an array with length %d instead."):format(#body.stop), "invalid_request_error",
      "array_above_max_length", "stop") }
  end
  local bad, param = wire.openai_messages(body.messages)
  if not bad then bad, param = wire.openai_tools(body.tools) end
  if not bad then bad, param = wire.openai_tool_choice(body.tool_choice, body.tools) end
  if bad then return { status = 400, body = openai_error(400, bad, "invalid_request_error", nil, param) } end
  return nil
end

function Mock:chat(req, fault)
  local body = json.decode(req.body)
  if type(body) ~= "table" then
    return { status = 400, body = error_body(400, { message = "request body is not valid JSON" }) }
  end
  if self.scenario.strict then
    local refused = self:openai_check(req, body)
    if refused then return refused end
  end
  local limited = self:rate_refusal("openai")
  if limited then return limited end
  local reply = self.scenario.reply
  if type(reply) == "function" then reply = reply(body) end
  if fault and fault.kind == "empty" then reply = "" end
  reply = reply or ("Mock reply to: " .. last_user_text(body):sub(1, 80))
  local n = int(body.n) and int(body.n) > 0 and math.min(int(body.n), 128) or 1 -- (the API's most)
  -- as the API answers: JSON under a response_format, a tool call when tool_choice forces one
  local empty = fault and fault.kind == "empty"
  local format = not empty and type(body.response_format) == "table" and body.response_format or {}
  if format.type == "json_schema" and type(format.json_schema) == "table" then
    reply = json_reply(format.json_schema.schema or {}, reply)
  elseif format.type == "json_object" then
    reply = json_reply(nil, reply)
  end
  local tool, schema = forced_tool(body)
  local call -- { id, name, arguments }
  -- choice i's call: an id of its own (an app that keys tool results by id, each choice's answer
  -- sent back, mixed them up when every choice's call had one)
  local function call_id(c, i) return i == 1 and c.id or ("%s_%d"):format(c.id, i) end
  if tool and not empty then
    call = { id = ("call_mock%s%d"):format(self.instance, self.counts.total), name = tool,
      arguments = encode(instance_of(schema, reply)) }
    reply = call.arguments
  end
  -- a reasoning model thinks before it answers: its reasoning tokens are output, billed, and
  -- within max_completion_tokens (one too small for them answers nothing, finish_reason length)
  local reasoning = reasoning_tokens(body)
  local limit = int(body.max_completion_tokens or body.max_tokens)
  if limit and reasoning > limit then reasoning = limit end
  local words, completion, cut = reply_words(reply, limit and limit - reasoning)
  if limit and reasoning == limit and reasoning > 0 then call = nil end -- (no room left to call a tool)
  if call then -- (its arguments are one piece of JSON, cut at max_tokens: finish_reason length)
    call.arguments, completion, cut = cut_call(call.arguments, limit and limit - reasoning)
    words = pieces_of(call.arguments)
  else
    local seq
    words, seq = stop_at(words, body.stop)
    if seq then completion, cut = #words, false end -- (finish_reason "stop", as at the reply's end)
  end
  local text = table.concat(words)
  local finish = cut and "length" or call and "tool_calls" or "stop"
  local top = body.logprobs == true and math.max(0, math.min(int(body.top_logprobs) or 0, 20)) or nil -- (the API's most)
  local cached = self.scenario.cached_tokens or 0
  local usage = { prompt_tokens = estimate_tokens(prompt_text(body)) + cached, completion_tokens = (completion + reasoning) * n }
  usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
  usage.prompt_tokens_details = { cached_tokens = cached, audio_tokens = 0 }
  usage.completion_tokens_details = { reasoning_tokens = reasoning * n, audio_tokens = 0, accepted_prediction_tokens = 0,
    rejected_prediction_tokens = 0 }
  local id = ("chatcmpl-mock%s-%d"):format(self.instance, self.counts.total)
  local model = type(body.model) == "string" and body.model or "mock-model"
  local created = math.floor(resil.clock.wall())
  self:bill(req, usage)
  -- the tier that served it: the one asked for, else the project's default (scenario.service_tier)
  local tier = (body.service_tier == "priority" or body.service_tier == "flex") and body.service_tier
    or self.scenario.service_tier or "default"
  local headers = self:rate_headers("openai", usage.total_tokens)
  if body.stream then
    headers["content-type"] = "text/event-stream"
    local include_usage = type(body.stream_options) == "table" and body.stream_options.include_usage == true
    local function chunk(choices, u)
      local c = { id = id, object = "chat.completion.chunk", created = created, model = model,
        service_tier = tier, system_fingerprint = "fp_mock", choices = choices }
      if include_usage then c.usage = u or json.null end
      return sse(encode(c))
    end
    local chunks = {}
    -- the API's first chunk of each choice carries the role (and a tool call's id and name)
    for i = 0, n - 1 do
      local first = { role = "assistant", content = "", refusal = json.null }
      if call then
        first.content = json.null
        first.tool_calls = { { index = 0, id = call_id(call, i + 1), type = "function", ["function"] = { name = call.name,
          arguments = "" } } }
      end
      chunks[#chunks + 1] = chunk({ { index = i, delta = first, logprobs = json.null, finish_reason = json.null } })
    end
    local cut_after = fault and fault.kind == "cut" and (fault.after or 3) or nil
    local error_after = fault and fault.kind == "error_event" and (fault.after or 0) or nil
    local interval = self.scenario.stream_interval or 0.005
    if cut_after == 0 then return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval } end
    if error_after == 0 then
      chunks[#chunks + 1] = sse(openai_error(500, fault.message or "The server had an error while processing your request.",
        "server_error"))
      return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval }
    end
    for w, word in ipairs(words) do
      local delta = call and { tool_calls = { { index = 0, ["function"] = { arguments = word } } } } or { content = word }
      local logprobs = top and not call and logprobs_of({ word }, top) or json.null
      for i = 0, n - 1 do
        chunks[#chunks + 1] = chunk({ { index = i, delta = delta, logprobs = logprobs, finish_reason = json.null } })
      end
      if w == cut_after then
        -- the transfer ends cleanly here, without a finish_reason or [DONE]: a gateway that lost its upstream
        return { status = 200, headers = headers, chunks = chunks, chunk_interval = self.scenario.stream_interval or 0.005 }
      end
      if w == error_after then
        chunks[#chunks + 1] = sse(openai_error(500, fault.message or "The server had an error while processing your request.",
          "server_error"))
        return { status = 200, headers = headers, chunks = chunks, chunk_interval = self.scenario.stream_interval or 0.005 }
      end
    end
    for i = 0, n - 1 do
      chunks[#chunks + 1] = chunk({ { index = i, delta = {}, logprobs = json.null, finish_reason = finish } })
    end
    if include_usage then chunks[#chunks + 1] = chunk(EMPTY, usage) end
    chunks[#chunks + 1] = "data: [DONE]\n\n"
    return { status = 200, headers = headers, chunks = chunks,
      chunk_interval = self.scenario.stream_interval or 0.005,
      stall_after = fault and fault.kind == "stall" and (fault.after or 2) or nil }
  end
  local choices = {}
  for i = 1, n do
    local message = { role = "assistant", content = text, refusal = json.null, annotations = EMPTY }
    if call then
      message.content = json.null
      message.tool_calls = { { id = call_id(call, i), type = "function", ["function"] = { name = call.name,
        arguments = call.arguments } } }
    end
    choices[i] = { index = i - 1, message = message, logprobs = top and not call and logprobs_of(words, top) or json.null,
      finish_reason = finish }
  end
  headers["content-type"] = "application/json"
  return { status = 200, headers = headers, body = encode({
    id = id, object = "chat.completion", created = created, model = model, choices = choices,
    usage = usage, service_tier = tier, system_fingerprint = "fp_mock",
  }) }
end

local EMBEDDING_FIELDS = { input = true, model = true, encoding_format = true, dimensions = true, user = true }

-- Anthropic messages: what the API requires and accepts (the body params of
-- the official SDK's MessageCreateParams; a strict mock that refused one the
-- API takes, output_config say, failed a request that works in production)
local ANTHROPIC_FIELDS = {}
for f in ([[model messages max_tokens system metadata stop_sequences stream temperature top_k top_p tools
  tool_choice thinking service_tier container mcp_servers context_management cache_control diagnostics
  inference_geo output_config speed]]):gmatch("%S+") do
  ANTHROPIC_FIELDS[f] = true
end
-- ...and those of its beta (client.beta.messages), which sends an anthropic-beta header
local ANTHROPIC_BETA_FIELDS = {}
for f in ([[output_format compaction billing_policy fallbacks fallback_credit_token thread]]):gmatch("%S+") do
  ANTHROPIC_BETA_FIELDS[f] = true
end

-- the models that take temperature or top_p, not both (Opus 4.1, Sonnet 4.5, Haiku 4.5 and later:
-- "claude-<family>-<major>-<minor>", a minor of one or two digits, from 4.1 on; a date is eight)
local function one_sampler(model)
  local major, minor = tostring(model):match("^claude%-%a+%-(%d+)%-(%d%d?)%f[^%d]")
  major, minor = tonumber(major), tonumber(minor)
  return major ~= nil and (major > 4 or major == 4 and minor >= 1)
end

-- count_tokens takes the prompt's fields of a message, not the answer's (max_tokens, stream, sampling)
local COUNT_FIELDS = {}
for f in ([[model messages system tools tool_choice thinking cache_control output_config speed]]):gmatch("%S+") do
  COUNT_FIELDS[f] = true
end
local COUNT_BETA_FIELDS = { mcp_servers = true, context_management = true }

local ANTHROPIC_TOOL_CHOICES = { auto = true, any = true, tool = true, none = true }

-- The key and version every Anthropic request needs -> nil | the refusal. An API key as
-- x-api-key, or as a bearer token (the API takes both; newer SDKs send the latter).
local function anthropic_auth_refusal(self, req)
  local key = req.headers["x-api-key"] or (req.headers["authorization"] or ""):match("^Bearer (%S+)$")
  if not key or key == "" then
    return { status = 401, body = anthropic_error(401, "authentication_error", "x-api-key header is required") }
  end
  if not self:key_ok(key) then
    return { status = 401, body = anthropic_error(401, "authentication_error", "invalid x-api-key") }
  end
  if not req.headers["anthropic-version"] then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", "anthropic-version: header is required") }
  end
end

-- (count: a count_tokens request's, which takes COUNT_FIELDS and no max_tokens)
local function anthropic_refusal(self, req, body, count)
  local refused = anthropic_auth_refusal(self, req)
  if refused then return refused end
  if type(body) ~= "table" then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", "There was an error parsing the body") }
  end
  local beta = req.headers["anthropic-beta"] ~= nil
  local fields, beta_fields = count and COUNT_FIELDS or ANTHROPIC_FIELDS, count and COUNT_BETA_FIELDS or ANTHROPIC_BETA_FIELDS
  for k in pairs(body) do
    if not fields[k] and not (beta and beta_fields[k]) then
      return { status = 400, body = anthropic_error(400, "invalid_request_error",
        tostring(k) .. ": Extra inputs are not permitted") }
    end
  end
  if type(body.model) ~= "string" then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", "model: Field required") }
  end
  if not count and not int(body.max_tokens) then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", "max_tokens: Field required") }
  end
  if not count and int(body.max_tokens) < 1 then
    return { status = 400, body = anthropic_error(400, "invalid_request_error",
      "max_tokens: Input should be greater than or equal to 1") }
  end
  local limit = not count and output_limit(body.model)
  if limit and int(body.max_tokens) > limit then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", ("max_tokens: %d > %d, which is the "
      .. "maximum allowed number of output tokens for %s"):format(int(body.max_tokens), limit, body.model)) }
  end
  if type(body.messages) ~= "table" or #body.messages == 0 then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", "messages: Field required") }
  end
  for i, m in ipairs(body.messages) do
    if type(m) ~= "table" or (m.role ~= "user" and m.role ~= "assistant") then
      return { status = 400, body = anthropic_error(400, "invalid_request_error",
        ("messages.%d.role: Input should be 'user' or 'assistant'"):format(i - 1)) }
    end
    local c = m.content
    if type(c) ~= "string" and type(c) ~= "table" then
      return { status = 400, body = anthropic_error(400, "invalid_request_error",
        ("messages.%d.content: Field required"):format(i - 1)) }
    end
    if type(c) == "table" then
      for j, block in ipairs(c) do
        if type(block) ~= "table" or type(block.type) ~= "string" then
          return { status = 400, body = anthropic_error(400, "invalid_request_error",
            ("messages.%d.content.%d.type: Field required"):format(i - 1, j - 1)) }
        end
      end
    end
  end
  if body.system ~= nil and type(body.system) ~= "string" and type(body.system) ~= "table" then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", "system: Input should be a valid list") }
  end
  for field, range in pairs(ANTHROPIC_RANGES) do
    local v = body[field]
    if type(v) == "number" and (v < range[1] or v > range[2]) then
      return { status = 400, body = anthropic_error(400, "invalid_request_error", ("%s: Input should be %s %g")
        :format(field, v > range[2] and "less than or equal to" or "greater than or equal to",
          v > range[2] and range[2] or range[1])) }
    end
  end
  if body.temperature ~= nil and body.top_p ~= nil and one_sampler(body.model) then
    return { status = 400, body = anthropic_error(400, "invalid_request_error",
      "`temperature` and `top_p` cannot both be specified for this model. Please use only one.") }
  end
  for _, seq in ipairs(type(body.stop_sequences) == "table" and body.stop_sequences or {}) do
    if type(seq) == "string" and not seq:find("%S") then
      return { status = 400, body = anthropic_error(400, "invalid_request_error", seq == ""
        and "stop_sequences: each stop sequence must be non-empty"
        or "stop_sequences: each stop sequence must contain non-whitespace") }
    end
  end
  -- extended thinking: the budget the API takes, and a turn it leaves the model free in
  local thinking = type(body.thinking) == "table" and body.thinking.type == "enabled" and body.thinking
  if thinking then
    local budget = int(thinking.budget_tokens)
    local why = (not budget or budget < 1024) and "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
      -- (count_tokens has no max_tokens: its thinking is the prompt's, taken)
      or not count and budget >= int(body.max_tokens) and "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
        .. "documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
      or forced_tool(body) and "Thinking may not be enabled when tool_choice forces tool use."
      -- (a spec that set both passed here and failed in production)
      or type(body.temperature) == "number" and body.temperature ~= 1 and "`temperature` may only be set to 1 when "
        .. "thinking is enabled. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/"
        .. "extended-thinking#important-considerations-when-using-extended-thinking"
    if why then return { status = 400, body = anthropic_error(400, "invalid_request_error", why) } end
  end
  -- (another API's tool_choice sent as it was: OpenAI's allowed_tools, function)
  local tc = body.tool_choice
  if self.scenario.strict and type(tc) == "table" and not ANTHROPIC_TOOL_CHOICES[tc.type] then
    return { status = 400, body = anthropic_error(400, "invalid_request_error", ("tool_choice: Input tag '%s' found "
      .. "using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"):format(tostring(tc.type))) }
  end
  local bad = self.scenario.strict and (wire.anthropic_messages(body.messages) or wire.anthropic_tools(body.tools)
    or wire.anthropic_tool_choice(tc, body.tools) or wire.anthropic_tools_defined(body.messages, body.tools)
    or thinking and wire.anthropic_thinking_turn(body.messages))
  if bad then return { status = 400, body = anthropic_error(400, "invalid_request_error", bad) } end
  return nil
end

-- POST /v1/messages/count_tokens: the prompt's input_tokens, as a message's usage counts them
-- (the API bills nothing for it: not billed here either)
function Mock:count_tokens(req)
  local body = json.decode(req.body)
  local refused = anthropic_refusal(self, req, body, true)
  if refused then return refused end
  return { status = 200, headers = { ["content-type"] = "application/json" },
    body = json.encode({ input_tokens = estimate_tokens(prompt_text(body)) }) }
end

-- Message threads (the beta message-threads-2026-08-12; the Anthropic SDK's toolRunner uses
-- them by default): `thread = {type = "create"}` has the API hold the conversation (its
-- system, tools and messages, the answer last) under the answer's id, and `{type = "continue",
-- previous_message_id}` sends only the new turn's messages, served after the held ones, with the
-- held system and tools (a continue that repeats them is refused). A thread goes on from an
-- answer once. Errors name their case in error.details.error_code, which the SDK reads to send
-- the whole history again. (Ignored, the toolRunner's second turn was its tool_result alone.)
local THREADS_MAX = 10000 -- (held conversations per mock: past it, the oldest are forgotten)
local function thread_error(status, etype, code, message)
  return { status = status, headers = { ["content-type"] = "application/json" }, body = json.encode({ type = "error",
    error = { type = etype, message = message, details = { error_code = code } } }) }
end

-- -> the body as served (a continue's with the held conversation), nil, what it continues |
-- nil, the API's refusal
function Mock:thread(req, body)
  local t = type(body) == "table" and body.thread
  if type(t) ~= "table" or t.type ~= "continue" then return body end
  local id = t.previous_message_id
  local held = type(id) == "string" and self.threads[id]
  if not held then
    return nil, thread_error(404, "not_found_error", "thread_not_found",
      ("thread.previous_message_id: no thread holds a message with id '%s'"):format(tostring(id)))
  end
  if held.continued then
    return nil, thread_error(400, "invalid_request_error", "thread_already_continued",
      ("thread.previous_message_id: the thread was already continued from '%s'"):format(id))
  end
  for _, k in ipairs({ "system", "tools" }) do
    if body[k] ~= nil then
      return nil, thread_error(400, "invalid_request_error", "thread_create_only_field",
        ("%s: the thread holds it; a continue may not set it"):format(k))
    end
  end
  local full = {}
  for k, v in pairs(body) do full[k] = v end
  full.system, full.tools = held.system, held.tools
  full.messages = table.move(held.messages, 1, #held.messages, 1, {})
  table.move(type(body.messages) == "table" and body.messages or {}, 1, #(body.messages or {}), #full.messages + 1,
    full.messages)
  return full, nil, held
end

-- hold a threaded request's conversation, its answer last, under the answer's id
function Mock:hold_thread(body, continues, id, content)
  if type(body.thread) ~= "table" then return end
  if continues then continues.continued = true end
  if self.thread_count >= THREADS_MAX then self.threads, self.thread_count = {}, 0 end
  local messages = table.move(body.messages, 1, #body.messages, 1, {})
  messages[#messages + 1] = { role = "assistant", content = content }
  self.threads[id] = { system = body.system, tools = body.tools, messages = messages }
  self.thread_count = self.thread_count + 1
end

-- Prompt caching, as the API bills it: the prompt up to its last cache_control mark (in tools,
-- system, messages; a top-level cache_control marks it all), in that order, is written to the
-- cache the first time (cache_creation_input_tokens; a "1h" ttl's apart) and read from it while
-- it lives (cache_read_input_tokens), per model; a prefix under the model's minimum is not
-- cached, as the API leaves a short one. (The mock reported no cache use, so a spec of what
-- caching costs never met a cache write.) -> tokens of the whole prompt, written, read, written
-- for 1 hour | nil when nothing is marked
-- The minimum cacheable prompt by model (Anthropic's prompt caching page; the names as Bedrock
-- and Vertex spell them too), first match; 1,024 for the others (Sonnet 4.x and 5, Opus 4, 4.1, 4.8)
local CACHE_MINS = {
  { "claude%-opus%-4%-[56]%f[^%d]", 4096 }, { "claude%-haiku%-4%-5%f[^%d]", 4096 },
  { "claude%-opus%-4%-7%f[^%d]", 2048 }, { "claude%-3%-5%-haiku", 2048 }, { "claude%-3%-haiku", 2048 },
  { "claude%-opus%-5%f[^%d%.]", 512 }, { "claude%-fable%-5%f[^%d%.]", 512 }, { "claude%-mythos%-5%f[^%d%.]", 512 },
}
local function cache_min(model)
  model = tostring(model)
  for _, m in ipairs(CACHE_MINS) do
    if model:find(m[1]) then return m[2] end
  end
  return 1024
end
function Mock:prompt_cache(body)
  local pieces, mark, ttl = {}, nil, nil
  local function add(text, cc)
    pieces[#pieces + 1] = text
    if type(cc) == "table" then mark, ttl = #pieces, cc.ttl end
  end
  for _, t in ipairs(type(body.tools) == "table" and body.tools or {}) do
    add(json.encode(t), type(t) == "table" and t.cache_control)
  end
  local function blocks(content)
    if type(content) == "string" then return add(content) end
    for _, b in ipairs(type(content) == "table" and content or {}) do
      if type(b) == "table" then add(type(b.text) == "string" and b.text or json.encode(b), b.cache_control) end
    end
  end
  blocks(body.system)
  for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" then blocks(m.content) end
  end
  if type(body.cache_control) == "table" then mark, ttl = #pieces, body.cache_control.ttl end
  if not mark then return nil end
  local all = estimate_tokens(table.concat(pieces, "\n"))
  local prefix = table.concat(pieces, "\n", 1, mark)
  local tokens = estimate_tokens(prefix)
  if tokens < cache_min(body.model) then return all, 0, 0, 0 end
  local life = ttl == "1h" and 3600 or 300
  local key = resil.hash(tostring(body.model) .. "\0" .. prefix)
  local now = resil.now()
  self.prompt_cache_entries = self.prompt_cache_entries or {}
  local entry = self.prompt_cache_entries[key]
  if entry and entry > now then
    self.prompt_cache_entries[key] = math.max(entry, now + life) -- (a read refreshes its life)
    return all, 0, tokens, 0
  end
  self.prompt_cache_entries[key] = now + life
  return all, tokens, 0, life == 3600 and tokens or 0
end

-- scenario.refuses: the models that decline every request -> the models that declined this one,
-- in order (the request's, then its beta fallbacks'), and the one that served it | nil
function Mock:declined(body)
  local refuses = self.scenario.refuses
  if type(refuses) ~= "table" then return nil end
  local set = {}
  for _, m in ipairs(refuses) do set[m] = true end
  if not set[body.model] then return nil end
  local declined = { body.model }
  for _, f in ipairs(type(body.fallbacks) == "table" and body.fallbacks or {}) do
    local m = type(f) == "table" and f.model
    if type(m) == "string" then
      if not set[m] then return declined, m end
      declined[#declined + 1] = m
    end
  end
  return declined, nil
end

-- A message whose model declined, as the API answers it: a refusal (stop_details saying why), or
-- with a fallback that served it a `fallback` block at each seam, and usage.iterations a
-- `message` entry per declined hop (its input paid) and a `fallback_message` one for the hop that
-- served; the top-level usage their sum. A whole message's `model` is relabeled the model that
-- served; a stream's message_start, sent before any refusal, names the model asked for (the
-- SDK's stream helper relabels it from the last seam) -> the seams | nil
local TRIGGER = { type = "refusal", category = "cyber" }
function Mock:fall_back(message, declined, served)
  local u = message.usage
  if not served then
    message.stop_details = { type = "refusal", category = "cyber",
      explanation = "This request was declined because it could enable cyber harm." }
    return nil
  end
  local seams, iterations = {}, {}
  for i, m in ipairs(declined) do
    seams[i] = { type = "fallback", from = { model = m }, to = { model = declined[i + 1] or served }, trigger = TRIGGER }
    iterations[i] = { type = "message", model = m, input_tokens = u.input_tokens, output_tokens = 0,
      cache_creation_input_tokens = 0, cache_read_input_tokens = 0, cache_creation = json.null }
  end
  iterations[#iterations + 1] = { type = "fallback_message", model = served, input_tokens = u.input_tokens,
    output_tokens = u.output_tokens, cache_creation_input_tokens = u.cache_creation_input_tokens,
    cache_read_input_tokens = u.cache_read_input_tokens, cache_creation = u.cache_creation }
  u.input_tokens = u.input_tokens * (#declined + 1)
  u.iterations = iterations
  message.model = served
  table.move(message.content, 1, #message.content, #seams + 1, seams)
  message.content = seams
  return table.move(seams, 1, #declined, 1, {})
end

-- POST /v1/messages, as Anthropic's Messages API answers it.
function Mock:messages(req, fault)
  local body, refused, continues = self:thread(req, json.decode(req.body))
  if refused then return refused end
  refused = anthropic_refusal(self, req, body)
  if refused then return refused end
  local limited = self:rate_refusal("anthropic")
  if limited then return limited end
  local reply = self.scenario.reply
  if type(reply) == "function" then reply = reply(body) end
  if fault and fault.kind == "empty" then reply = "" end
  reply = reply or ("Mock reply to: " .. last_user_text(body):sub(1, 80))
  -- as the API answers: JSON under output_config.format (the beta's output_format), a
  -- tool_use block when tool_choice forces one
  local empty = fault and fault.kind == "empty"
  local format = type(body.output_config) == "table" and body.output_config.format or body.output_format
  if not empty and type(format) == "table" and format.type == "json_schema" then
    reply = json_reply(format.schema or {}, reply)
  end
  local tool, schema = forced_tool(body)
  local use -- a tool_use block
  if tool and not empty then
    use = { type = "tool_use", id = ("toolu_mock%s%d"):format(self.instance, self.counts.total), name = tool,
      input = instance_of(schema, reply) }
  end
  -- extended thinking (enabled, or adaptive): a thinking block with its signature first, its
  -- tokens part of the output and of max_tokens
  local mode = type(body.thinking) == "table" and body.thinking.type
  local think
  if (mode == "enabled" or mode == "adaptive") and not empty then
    local text = "The user asks: " .. last_user_text(body):sub(1, 80)
    think = { type = "thinking", thinking = text, signature = "EqMock" .. resil.hash(text .. self.instance) }
  end
  local thought = think and estimate_tokens(think.thinking) or 0
  local words, output, cut = reply_words(reply, int(body.max_tokens) and math.max(0, body.max_tokens - thought))
  local stop_reason, stop_sequence = cut and "max_tokens" or "end_turn", json.null
  if use then -- (its input is one piece of JSON, cut at max_tokens: its members written whole)
    local text
    text, output, cut = cut_call(encode(use.input), int(body.max_tokens) and math.max(0, body.max_tokens - thought))
    words, stop_reason = pieces_of(text), cut and "max_tokens" or "tool_use"
    if cut then use.input = whole_members(text) end
  end
  local seq
  if not use then words, seq = stop_at(words, body.stop_sequences) end
  if seq then output, stop_reason, stop_sequence = #words, "stop_sequence", seq end
  output = output + thought
  -- scenario.refuses: models that decline (a safety classifier's refusal); the beta's `fallbacks`
  -- are tried in order, the first that does not decline serving (server-side fallback)
  local declined, served = self:declined(body)
  if declined and not served then
    words, output, stop_reason, stop_sequence, use, think, thought = {}, 0, "refusal", json.null, nil, nil, 0
  end
  local all, written, read, hour = self:prompt_cache(body)
  written, read, hour = written or 0, read or 0, hour or 0
  local cached = (self.scenario.cached_tokens or 0) + read
  local usage = { input_tokens = (all or estimate_tokens(prompt_text(body))) - written - read, output_tokens = output,
    cache_creation_input_tokens = written, cache_read_input_tokens = cached,
    cache_creation = { ephemeral_5m_input_tokens = written - hour, ephemeral_1h_input_tokens = hour },
    service_tier = "standard",
    -- (null, not absent, as the SDK's Usage types them: code that tests `usage.server_tool_use
    -- !== null` before reading its counts met undefined; where it ran, how fast, its thinking)
    server_tool_use = json.null, inference_geo = type(body.inference_geo) == "string" and body.inference_geo or "global",
    speed = body.speed == "fast" and "fast" or "standard",
    output_tokens_details = think and { thinking_tokens = thought } or json.null }
  local id = ("msg_mock%s%d"):format(self.instance, self.counts.total)
  self:bill(req, { prompt_tokens = usage.input_tokens + cached + written, completion_tokens = output })
  local headers = self:rate_headers("anthropic", usage.input_tokens + output)
  -- (stop_details, container and diagnostics are null, not absent: the SDK's types say so, and
  -- code that tests `message.stop_details !== null` for a refusal read an absent one as one)
  local message = { id = id, type = "message", role = "assistant", model = body.model,
    content = { use or { type = "text", text = table.concat(words) } }, stop_reason = stop_reason,
    stop_sequence = stop_sequence, stop_details = json.null, container = json.null, diagnostics = json.null,
    usage = usage }
  if think then table.insert(message.content, 1, think) end
  local seams = declined and self:fall_back(message, declined, served)
  if declined and not served then message.content = EMPTY end
  -- (a stream cut or broken is held by the API whole or not at all: here, not at all)
  if not (body.stream and fault and (fault.kind == "cut" or fault.kind == "error_event")) then
    self:hold_thread(body, continues, id, message.content)
  end
  if not body.stream then
    headers["content-type"] = "application/json"
    return { status = 200, headers = headers, body = encode(message) }
  end
  headers["content-type"] = "text/event-stream"
  local start = { id = id, type = "message", role = "assistant", model = body.model, content = EMPTY,
    stop_reason = json.null, stop_sequence = json.null, stop_details = json.null, container = json.null,
    diagnostics = json.null,
    usage = { input_tokens = usage.input_tokens, output_tokens = 1, cache_creation_input_tokens = written,
      cache_read_input_tokens = cached, cache_creation = usage.cache_creation, service_tier = "standard",
      server_tool_use = json.null, inference_geo = usage.inference_geo, speed = usage.speed,
      output_tokens_details = json.null } }
  local chunks = { sse(encode({ type = "message_start", message = start }), "message_start") }
  local at = 0 -- the answer's block: after the thinking block, when there is one
  -- (a fallback's seams first: a start and a stop each, no deltas)
  for _, seam in ipairs(seams or {}) do
    chunks[#chunks + 1] = sse(encode({ type = "content_block_start", index = at, content_block = seam }),
      "content_block_start")
    chunks[#chunks + 1] = sse(encode({ type = "content_block_stop", index = at }), "content_block_stop")
    at = at + 1
  end
  if think then
    local half = #think.thinking // 2
    for _, e in ipairs({
      { type = "content_block_start", index = at, content_block = { type = "thinking", thinking = "", signature = "" } },
      { type = "content_block_delta", index = at, delta = { type = "thinking_delta", thinking = think.thinking:sub(1, half) } },
      { type = "content_block_delta", index = at, delta = { type = "thinking_delta", thinking = think.thinking:sub(half + 1) } },
      { type = "content_block_delta", index = at, delta = { type = "signature_delta", signature = think.signature } },
      { type = "content_block_stop", index = at } }) do
      chunks[#chunks + 1] = sse(json.encode(e), e.type)
    end
    at = at + 1
  end
  local cut_after = fault and fault.kind == "cut" and (fault.after or 3) or nil
  local error_after = fault and fault.kind == "error_event" and (fault.after or 0) or nil
  local interval = self.scenario.stream_interval or 0.005
  if not (declined and not served) then -- (a refusal streams no block)
    chunks[#chunks + 1] = sse(json.encode({ type = "content_block_start", index = at, content_block = use and {
      type = "tool_use", id = use.id, name = use.name, input = {} } or { type = "text", text = "" } }), "content_block_start")
    chunks[#chunks + 1] = sse('{"type": "ping"}', "ping")
    if cut_after == 0 then return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval } end
    if error_after == 0 then
      chunks[#chunks + 1] = sse(anthropic_error(529, fault.error_type or "overloaded_error", fault.message or "Overloaded"),
        "error")
      return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval }
    end
    for w, word in ipairs(words) do
      chunks[#chunks + 1] = sse(json.encode({ type = "content_block_delta", index = at,
        delta = use and { type = "input_json_delta", partial_json = word } or { type = "text_delta", text = word } }),
        "content_block_delta")
      if w == cut_after then return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval } end
      if w == error_after then
        chunks[#chunks + 1] = sse(anthropic_error(529, fault.error_type or "overloaded_error",
          fault.message or "Overloaded"), "error")
        return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval }
      end
    end
    chunks[#chunks + 1] = sse(json.encode({ type = "content_block_stop", index = at }), "content_block_stop")
  end
  -- message_delta's usage is cumulative: the totals so far, not an increment
  chunks[#chunks + 1] = sse(encode({ type = "message_delta",
    delta = { stop_reason = stop_reason, stop_sequence = stop_sequence, stop_details = message.stop_details,
      container = json.null },
    usage = { input_tokens = usage.input_tokens, output_tokens = usage.output_tokens, cache_creation_input_tokens = written,
      cache_read_input_tokens = cached, server_tool_use = json.null,
      output_tokens_details = usage.output_tokens_details, iterations = usage.iterations } }), "message_delta")
  chunks[#chunks + 1] = sse('{"type":"message_stop"}', "message_stop")
  return { status = 200, headers = headers, chunks = chunks, chunk_interval = interval,
    stall_after = fault and fault.kind == "stall" and (fault.after or 2) or nil }
end

-- OpenAI embeddings: one vector per input, the same text always the same
-- vector; encoding_format "base64" (the official SDKs' default) packs float32s.
local base64 = resil.crypto.base64

-- Each value a float32, as the API's are, in the float32's digits (at most 9: 0.017291732,
-- -0.0044424757): the API writes its float32s so, never a double's 17 digits, whose text is
-- twice as long and many times slower to read and write again.
local pack, unpack, format = string.pack, string.unpack, string.format
local function vector_of(text, dims)
  local seed = tonumber(resil.hash(text):sub(1, 8), 16) or 1
  local v, norm = {}, 0
  for i = 1, dims do
    seed = (seed * 1103515245 + 12345) % 2147483648
    v[i] = seed / 1073741824 - 1
    norm = norm + v[i] * v[i]
  end
  norm = math.sqrt(norm)
  for i = 1, dims do v[i] = tonumber(format("%.9g", (unpack("<f", pack("<f", v[i] / norm))))) end
  return v
end

-- the embedding models' sizes, and those that take `dimensions` (OpenAI's: v3 shortens)
local EMBEDDING_SIZES = { ["text-embedding-3-small"] = 1536, ["text-embedding-3-large"] = 3072,
  ["text-embedding-ada-002"] = 1536 }
local SHORTENED = { ["text-embedding-3-small"] = true, ["text-embedding-3-large"] = true }

function Mock:embeddings(req)
  local body = json.decode(req.body)
  if type(body) ~= "table" then
    return { status = 400, body = error_body(400, { message = "request body is not valid JSON" }) }
  end
  if self.scenario.strict then
    local auth = req.headers["authorization"]
    if not auth or not self:key_ok(auth:match("^Bearer (.+)$") or "") then
      return { status = 401, body = openai_error(401, "Incorrect API key provided.", "invalid_request_error",
        "invalid_api_key") }
    end
    for k in pairs(body) do
      if not EMBEDDING_FIELDS[k] then
        return { status = 400, body = openai_error(400, "Unrecognized request argument supplied: " .. tostring(k),
          "invalid_request_error") }
      end
    end
    -- (another, "base64 " or "binary", was answered floats: the client's decode passed its spec here)
    local f = body.encoding_format
    if f ~= nil and f ~= json.null and f ~= "float" and f ~= "base64" then
      return { status = 400, body = openai_error(400, ("Invalid value: '%s'. Supported values are: 'float' and "
        .. "'base64'."):format(tostring(f)), "invalid_request_error", "invalid_value", "encoding_format") }
    end
  end
  local input = body.input
  -- (a list of token ids is one input, as a string is: LangChain sends its texts tokenized)
  if type(input) == "string" or type(input) == "table" and type(input[1]) == "number" then input = { input } end
  if type(input) ~= "table" or #input == 0 or type(body.model) ~= "string" then
    return { status = 400, body = openai_error(400, "'input' and 'model' are required", "invalid_request_error",
      nil, "input") }
  end
  if self.scenario.strict then
    -- what the API refuses of a batch: an empty text or token list (a pipeline's blank chunk),
    -- more than 2048 inputs, one past the model's 8192 tokens. (Embedded by the mock, each
    -- passed its spec and failed the whole batch in production.)
    local INVALID = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
    if #input > 2048 then
      return { status = 400, body = openai_error(400, INVALID .. " (array length must be 2048 or less)",
        "invalid_request_error") }
    end
    for _, x in ipairs(input) do
      if x == "" or type(x) == "table" and #x == 0 then
        return { status = 400, body = openai_error(400, INVALID, "invalid_request_error") }
      end
      local n = type(x) == "string" and estimate_tokens(x) or type(x) == "table" and #x or 0
      if n > 8192 then
        return { status = 400, body = openai_error(400, ("This model's maximum context length is 8192 tokens, however "
          .. "you requested %d tokens (%d in your prompt; 0 for the completion). Please reduce your prompt; or "
          .. "completion length."):format(n, n), "invalid_request_error") }
      end
    end
  end
  -- a vector of the model's own size (scenario.dimensions: another default), or `dimensions`
  -- long where the model takes it: text-embedding-3's up to its size, ada-002's not at all
  local native = EMBEDDING_SIZES[body.model:match("([^/]+)$")]
  local dims = int(body.dimensions)
  if body.dimensions ~= nil and body.dimensions ~= json.null then
    if native and not SHORTENED[body.model:match("([^/]+)$")] then
      return { status = 400, body = openai_error(400, "This model does not support specifying dimensions.",
        "invalid_request_error", nil, "dimensions") }
    end
    -- (a model it does not know at most 65536, as its message says: any was a vector made that long)
    if not dims or dims < 1 or dims > (native or 65536) then
      return { status = 400, body = openai_error(400, ("Invalid value for 'dimensions' = %s. Must be between 1 and %d.")
        :format(tostring(body.dimensions), native or 65536), "invalid_request_error", nil, "dimensions") }
    end
  end
  local limited = self:rate_refusal("openai")
  if limited then return limited end
  dims = dims or self.scenario.dimensions or native or 1536
  local data, tokens = {}, 0
  for i, text in ipairs(input) do
    -- (token ids are as many tokens as there are ids, not their JSON text's estimate)
    tokens = tokens + (type(text) == "table" and #text or estimate_tokens(tostring(text)))
    text = type(text) == "string" and text or json.encode(text)
    local v = vector_of(text, dims)
    local e = v
    if body.encoding_format == "base64" then
      local packed = {}
      for j, x in ipairs(v) do packed[j] = string.pack("<f", x) end
      e = base64(table.concat(packed))
    end
    data[i] = { object = "embedding", index = i - 1, embedding = e }
  end
  local usage = { prompt_tokens = tokens, completion_tokens = 0 }
  self:bill(req, usage)
  local headers = self:rate_headers("openai", tokens)
  headers["content-type"] = "application/json"
  return { status = 200, headers = headers, body = json.encode({ object = "list", data = data, model = body.model,
    usage = { prompt_tokens = tokens, total_tokens = tokens } }) }
end

-- GET /v1/models and /v1/models/{id}, in each API's shape: Anthropic's for a request that carries
-- anthropic-version or x-api-key (its SDK's), OpenAI's otherwise. scenario.models = { "id", ... }:
-- the models listed, in both shapes (else each API's own, below).
local OPENAI_MODELS = {
  { "gpt-5", 1754425777 }, { "gpt-4.1", 1744316542 }, { "gpt-4.1-mini", 1744318173 }, { "o4-mini", 1744225351 },
  { "o3", 1744225308 }, { "gpt-4o-mini", 1721172741 }, { "gpt-4o", 1715367049 },
  { "text-embedding-3-large", 1705953180 }, { "text-embedding-3-small", 1705948997 },
  { "text-embedding-ada-002", 1671217299, "openai-internal" } }
local ANTHROPIC_MODELS = { -- newest first, as the API lists them
  { "claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z" },
  { "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z" },
  { "claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z" },
  { "claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z" },
  { "claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z" },
  { "claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "2025-02-24T00:00:00Z" },
  { "claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z" } }

local function models_flavor(req)
  return (req.headers["anthropic-version"] or req.headers["x-api-key"]) and "anthropic" or nil
end

-- the catalog a flavor lists -> { { id, object in its shape }, ... } in the API's order
function Mock:catalog(flavor)
  local list = {}
  for i, m in ipairs(self.scenario.models or (flavor == "anthropic" and ANTHROPIC_MODELS or OPENAI_MODELS)) do
    local id = type(m) == "table" and m[1] or m
    if flavor == "anthropic" then
      -- (every field of the SDK's ModelInfo, as the API writes them: its types have none absent,
      -- null where not known; a Claude model's window is 200k, its output limit the model's)
      local claude = id:find("^claude%-") ~= nil
      list[i] = { id = id, type = "model", display_name = type(m) == "table" and m[2] or id,
        created_at = type(m) == "table" and m[3] or "2025-01-01T00:00:00Z", capabilities = json.null,
        lifecycle = "active", deprecated_at = json.null, retires_at = json.null,
        line = claude and (id:match("%-(haiku)") or id:match("%-(sonnet)") or id:match("%-(opus)")) or json.null,
        max_input_tokens = claude and 200000 or json.null, max_tokens = output_limit(id) or json.null }
    else
      list[i] = { id = id, object = "model", created = type(m) == "table" and m[2] or 1735689600,
        owned_by = type(m) == "table" and m[3] or "system" }
    end
  end
  return list
end

-- the key and version a models request needs, as each API checks them -> nil | the refusal
function Mock:models_refusal(req, flavor)
  if flavor == "anthropic" then return anthropic_auth_refusal(self, req) end
  if not self.scenario.strict then return nil end
  local key = (req.headers["authorization"] or ""):match("^Bearer (%S+)$")
  if not key then
    return { status = 401, body = openai_error(401, "You didn't provide an API key. You need to provide your API key "
      .. "in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", "invalid_request_error") }
  end
  if not self:key_ok(key) then
    return { status = 401, body = openai_error(401, "Incorrect API key provided. You can find your API key at "
      .. "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key") }
  end
end


function Mock:models(req)
  local flavor = models_flavor(req)
  local refused = self:models_refusal(req, flavor)
  if refused then refused.headers = { ["content-type"] = "application/json" } return refused end
  local list = self:catalog(flavor)
  local headers = { ["content-type"] = "application/json" }
  if flavor ~= "anthropic" then
    return { status = 200, headers = headers, body = encode({ object = "list", data = #list > 0 and list or EMPTY }) }
  end
  -- Anthropic's pages: limit (1-1000, 20 by default), after_id or before_id, has_more
  local q = resil.url.query(req.query)
  local limit = q.limit == nil and 20 or tonumber(q.limit)
  if not limit or limit ~= math.floor(limit) or limit < 1 or limit > 1000 then
    return { status = 400, headers = headers, body = anthropic_error(400, "invalid_request_error",
      "limit: Input should be less than or equal to 1000 and greater than or equal to 1") }
  end
  if q.after_id == "" then q.after_id = nil end
  if q.before_id == "" then q.before_id = nil end
  if q.after_id and q.before_id then
    return { status = 400, headers = headers, body = anthropic_error(400, "invalid_request_error",
      "after_id and before_id cannot both be set") }
  end
  local at
  for i, m in ipairs(list) do if m.id == (q.after_id or q.before_id) then at = i end end
  local first, last
  if q.after_id then first = (at or #list) + 1 last = math.min(#list, first + limit - 1)
  elseif q.before_id then last = (at or 1) - 1 first = math.max(1, last - limit + 1)
  else first, last = 1, math.min(#list, limit) end
  local page = {}
  for i = first, last do page[#page + 1] = list[i] end
  local more = q.before_id and first > 1 or not q.before_id and last < #list
  return { status = 200, headers = headers, body = encode({ data = #page > 0 and page or EMPTY, has_more = more,
    first_id = page[1] and page[1].id or json.null, last_id = page[#page] and page[#page].id or json.null }) }
end

-- GET /v1/models/{id} (percent-encoded); Anthropic's takes an alias too (claude-sonnet-4-5)
function Mock:model(req, _, id)
  local flavor = models_flavor(req)
  local refused = self:models_refusal(req, flavor)
  if refused then refused.headers = { ["content-type"] = "application/json" } return refused end
  id = resil.url.unescape(id)
  local headers = { ["content-type"] = "application/json" }
  for _, m in ipairs(self:catalog(flavor)) do
    if m.id == id or flavor == "anthropic" and m.id:match("^(.+)%-%d%d%d%d%d%d%d%d$") == id then
      return { status = 200, headers = headers, body = json.encode(m) }
    end
  end
  if flavor == "anthropic" then
    return { status = 404, headers = headers, body = anthropic_error(404, "not_found_error", "model: " .. id) }
  end
  return { status = 404, headers = headers, body = openai_error(404, ("The model '%s' does not exist"):format(id),
    "invalid_request_error", "model_not_found", "model") }
end

-- handler(self, req, fault, capture) -> reply; the flavor names the API whose
-- error bodies a status fault on the route sends (a function: the request's)
local HANDLERS = {
  chat = { fn = Mock.chat },
  messages = { fn = Mock.messages, flavor = "anthropic" },
  count_tokens = { fn = Mock.count_tokens, flavor = "anthropic" },
  embeddings = { fn = Mock.embeddings },
  models = { fn = Mock.models, flavor = models_flavor },
  model = { fn = Mock.model, flavor = models_flavor },
}
mock.routes, mock.handlers = BUILTIN_ROUTES, HANDLERS

function Mock:route(req)
  for pattern, fn in pairs(self.scenario.routes or {}) do
    local method, path = pattern:match("^(%u+)%s+(.+)$")
    if method == req.method and path == req.path then return pattern, fn end
  end
  local job_route, job_handler = job_routes(self, req)
  if job_route then return job_route, job_handler end
  for _, r in ipairs(BUILTIN_ROUTES) do
    if req.method == r[1] then
      local capture = req.path:match(r[2])
      if capture then return r[3], nil, capture end
    end
  end
  return "unknown"
end

-- Turn a fault into a reply, or nil when the normal answer should be sent
-- (possibly changed: empty content, a stalled stream, extra latency).
local function fault_reply(fault, normal, flavor)
  local kind = fault.kind
  if kind == "hang" then return { action = "hang" } end
  if kind == "reset" then return { action = "reset" } end
  if kind == "not_http" then return { action = "raw", body = fault.body or "SSH-2.0-OpenSSH_9.2p1\r\n" } end
  if kind == "garbage" then
    return { status = 200, headers = { ["content-type"] = "application/json" },
      body = fault.body or "<html><body><h1>502 Bad Gateway</h1></body></html>\0\255garbage" }
  end
  if kind == "truncate" then
    local r = normal()
    r.action = "truncate"
    return r
  end
  if fault.status then
    local headers = {}
    for k, v in pairs(fault.headers or {}) do headers[k] = v end
    if fault.retry_after then headers["retry-after"] = tostring(fault.retry_after) end
    if flavor == "anthropic" and fault.status == 429 and fault.retry_after == nil then
      headers["retry-after"] = "1" -- its rate limits say when to come back; retry_after = false: a spend limit
    end
    -- (both SDKs read it first: false is not retried whatever the status, true always is)
    if fault.should_retry ~= nil then headers["x-should-retry"] = tostring(fault.should_retry) end
    headers["content-type"] = "application/json"
    return { status = fault.status, headers = headers, body = error_body(fault.status, fault, flavor) }
  end
  return nil
end

function Mock:handle(req)
  if req.method == "GET" and req.path == "/__mock/stats" then
    return { status = 200, body = json.encode(self.counts) }
  end
  -- its own id from its arrival: one taken from the count as the answer is made was also the
  -- next request's when this one was refused uncounted, or counted after its headers were made
  self.requests_seen = (self.requests_seen or 0) + 1
  local request_id = ("req_mock%s%d"):format(self.instance, self.requests_seen)
  -- scenario.on_request(req): told of each request as it arrives, before its answer (a spec's
  -- client that leaves just as the provider answers)
  if self.scenario.on_request then self.scenario.on_request(req) end
  local route, custom, capture = self:route(req)
  -- scenario.idempotency: like providers that honour Idempotency-Key, a
  -- repeated key gets the first successful answer again, unbilled
  local key = self.scenario.idempotency and req.headers["idempotency-key"]
  if key and self.replies[route .. " " .. key] then
    self:count(route, req, self.replies[route .. " " .. key].status)
    self.counts.replayed = self.counts.replayed + 1
    return deep_copy(self.replies[route .. " " .. key])
  end
  -- x-mock-fault: a status or a fault kind for this one request (clients
  -- that cannot follow a sequence: the official SDKs in spec/sdk)
  local flavor = HANDLERS[route] and HANDLERS[route].flavor
  if type(flavor) == "function" then flavor = flavor(req) end
  local asked = req.headers["x-mock-fault"]
  local fault = asked and (tonumber(asked) and { status = tonumber(asked) } or { kind = asked })
    or route ~= "unknown" and self:pick_fault(route, req) or nil
  if asked and not pcall(check_fault, fault, "x-mock-fault", 1, "x-mock-fault") then
    -- a misspelt one was served as a normal answer: the client's spec of a fault passed without it
    local h = HANDLERS[route]
    local status = 400
    self:count(route, req, status)
    return { status = status, headers = { ["content-type"] = "application/json" },
      body = error_body(status, { message = ("x-mock-fault: '%s' is neither a status (100-599) nor a fault kind")
        :format(asked) }, flavor) }
  end
  if fault then self.counts.faults[route] = (self.counts.faults[route] or 0) + 1 end
  local function normal()
    if custom then
      local r = custom(req) or { status = 204 }
      if r.json ~= nil then r.body = json.encode(r.json) end
      return r
    end
    local h = HANDLERS[route]
    if h then return h.fn(self, req, fault, capture) end
    -- as each API answers a path it does not serve: an Anthropic client (its SDK sends
    -- anthropic-version) reads Anthropic's shape, an OpenAI one OpenAI's "Invalid URL"
    if req.headers["anthropic-version"] then
      return { status = 404, headers = { ["content-type"] = "application/json" },
        body = anthropic_error(404, "not_found_error", ("Not Found: %s %s"):format(req.method, req.path)) }
    end
    return { status = 404, headers = { ["content-type"] = "application/json" },
      body = openai_error(404, ("Invalid URL (%s %s)"):format(req.method, req.path), "invalid_request_error") }
  end
  local h = HANDLERS[route]
  local reply = fault and fault_reply(fault, normal, flavor) or normal()
  self:count(route, req, reply.action and reply.action or reply.status or 200)
  if h and not reply.action then
    -- every answer of the API carries its request id, its errors too (the SDKs' error.requestID)
    local name = flavor == "anthropic" and "request-id" or "x-request-id"
    reply.headers = reply.headers or {}
    reply.headers[name] = reply.headers[name] or request_id
    -- (and Anthropic's error body names it: the SDK's ErrorResponse types request_id as never absent)
    local body = reply.body
    if flavor == "anthropic" and (reply.status or 200) >= 400 and type(body) == "string" and body:byte(1) == 123
      and body:find('"type":"error"', 1, true) and not body:find('"request_id":', 1, true) then
      reply.body = '{"request_id":' .. json.encode(reply.headers[name]) .. "," .. body:sub(2)
    end
  end
  -- (a truncated answer too: the provider kept the answer it made, only its delivery was cut)
  if key and (not reply.action or reply.action == "truncate") and (reply.status or 200) < 300 then
    local kept = deep_copy(reply)
    kept.action = nil
    self.replies[route .. " " .. key] = kept
  end
  local latency = sample_latency(fault and fault.latency or self.scenario.latency, self.random)
  if latency > 0 then reply.delay = latency end
  return reply
end

return mock
