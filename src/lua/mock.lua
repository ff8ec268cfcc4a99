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
-- "stream": true), predictions (POST /v1/predictions), prediction (GET
-- /v1/predictions/{id}), cancel (POST /v1/predictions/{id}/cancel), and
-- GET /__mock/stats. Custom routes: routes = { ["POST /path"] = fn(req) }.
local resil = ...
local json = resil.json
local job_routes = require("resil.mock_jobs").route -- Replicate, fal, ElevenLabs (src/lua/mock_jobs.lua)

local mock = {}
local Mock = {}
Mock.__index = Mock

local BUILTIN_ROUTES = {
  { "POST", "^/v1/chat/completions$", "chat" },
  { "POST", "^/v1/predictions$", "predictions" },
  { "GET", "^/v1/predictions/([%w%-_]+)$", "prediction" },
  { "POST", "^/v1/predictions/([%w%-_]+)/cancel$", "cancel" },
}

local NAMED_FAULTS = { hang = true, reset = true, truncate = true, garbage = true, empty = true, stall = true,
  ok = true, slow = true, not_http = true }

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "authentication_error", [403] = "permission_error",
  [404] = "not_found_error", [429] = "rate_limit_exceeded", [500] = "server_error",
  [502] = "bad_gateway", [503] = "service_unavailable", [504] = "gateway_timeout",
}

-- xorshift64*: a per-mock random source, so a seed gives the same faults
-- whatever else uses math.random.
local function new_random(seed)
  local state = (seed or os.time()) * 2654435761 + 1
  if state == 0 then state = 88172645463325252 end
  return function()
    state = state ~ (state >> 12)
    state = state ~ (state << 25)
    state = state ~ (state >> 27)
    local x = (state * 0x2545F4914F6CDD1D) >> 11
    return x / 9007199254740992.0
  end
end

local function check_scenario(s, level)
  if type(s) ~= "table" then error("resil.mock: scenario must be a table", level) end
  for _, f in ipairs(s.faults or {}) do
    if type(f) ~= "table" then error("resil.mock: each fault must be a table", level) end
    if f.kind and not NAMED_FAULTS[f.kind] then
      error(("resil.mock: unknown fault kind '%s'"):format(tostring(f.kind)), level)
    end
    if f.probability and (type(f.probability) ~= "number" or f.probability < 0 or f.probability > 1) then
      error("resil.mock: fault probability must be between 0 and 1", level)
    end
  end
  for route, seq in pairs(s.sequence or {}) do
    if type(seq) ~= "table" then error(("resil.mock: sequence.%s must be a list"):format(route), level) end
  end
  if s.routes ~= nil and type(s.routes) ~= "table" then error("resil.mock: routes must be a table", level) end
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

local function error_body(status, fault)
  if fault.body then return fault.body end
  if status == 529 then
    return json.encode({ type = "error", error = { type = "overloaded_error", message = "Overloaded" } })
  end
  local etype = fault.error_type or ERROR_TYPES[status] or "api_error"
  return json.encode({ error = { message = fault.message or ("mock %d: %s"):format(status, etype),
    type = etype, code = fault.error_code or fault.error_type } })
end

function mock.start(scenario, opts)
  scenario = scenario or {}
  opts = opts or {}
  check_scenario(scenario, 2)
  local self = setmetatable({}, Mock)
  self:configure(scenario)
  self:reset()
  self.jobs, self.next_job = {}, 0
  -- response ids unique across mocks, as a real provider's are (costs may be recorded under them)
  self.instance = resil.hash(tostring(self) .. tostring(resil.clock.wall()) .. tostring(os.clock())):sub(1, 8)
  self.server = resil.server.listen({
    host = opts.host or "127.0.0.1",
    port = opts.port or 0,
    max_headers = opts.max_headers, max_body = opts.max_body, read_timeout = opts.read_timeout,
    handler = function(req) return self:handle(req) end,
  })
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

function Mock:reset()
  self.counts = { total = 0, routes = {}, statuses = {}, keys = {}, paid_keys = {}, faults = {}, replayed = 0,
    billed = { usd = 0, prompt_tokens = 0, completion_tokens = 0, responses = 0 } }
  self.replies = {}
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

-- The fault for this request: the route's sequence first, then faults by
-- probability; nil means a normal answer.
function Mock:pick_fault(route)
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
    if (f.route == nil or f.route == route) and self.random() < (f.probability or 1) then return f end
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

local function last_user_text(body)
  local text = ""
  for _, m in ipairs(type(body) == "table" and type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and type(m.content) == "string" then text = m.content end
  end
  return text
end

local function prompt_text(body)
  local parts = {}
  for _, m in ipairs(type(body) == "table" and type(body.messages) == "table" and body.messages or {}) do
    if type(m) == "table" and type(m.content) == "string" then parts[#parts + 1] = m.content end
  end
  return table.concat(parts, "\n")
end

function Mock:chat(req, fault)
  local body = json.decode(req.body)
  if type(body) ~= "table" then
    return { status = 400, body = error_body(400, { message = "request body is not valid JSON" }) }
  end
  local reply = self.scenario.reply
  if type(reply) == "function" then reply = reply(body) end
  if fault and fault.kind == "empty" then reply = "" end
  reply = reply or ("Mock reply to: " .. last_user_text(body):sub(1, 80))
  local usage = { prompt_tokens = estimate_tokens(prompt_text(body)), completion_tokens = estimate_tokens(reply) }
  usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
  local id = ("chatcmpl-mock%s-%d"):format(self.instance, self.counts.total)
  local model = type(body.model) == "string" and body.model or "mock-model"
  local created = math.floor(resil.clock.wall())
  self:bill(req, usage)
  if body.stream then
    local chunks = {}
    for word in reply:gmatch("%S+%s*") do
      chunks[#chunks + 1] = "data: " .. json.encode({ id = id, object = "chat.completion.chunk", created = created,
        model = model, choices = { { index = 0, delta = { content = word } } } }) .. "\n\n"
    end
    chunks[#chunks + 1] = "data: " .. json.encode({ id = id, object = "chat.completion.chunk", created = created,
      model = model, choices = { { index = 0, delta = {}, finish_reason = "stop" } }, usage = usage }) .. "\n\n"
    chunks[#chunks + 1] = "data: [DONE]\n\n"
    return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = chunks,
      chunk_interval = self.scenario.stream_interval or 0.005,
      stall_after = fault and fault.kind == "stall" and (fault.after or 2) or nil }
  end
  return { status = 200, body = json.encode({
    id = id, object = "chat.completion", created = created, model = model,
    choices = { { index = 0, message = { role = "assistant", content = reply }, finish_reason = "stop" } },
    usage = usage,
  }) }
end

function Mock:job_view(job)
  return { id = job.id, status = job.status, input = job.input, output = job.output, error = job.error,
    created_at = job.created_at, metrics = job.usd and { cost_usd = job.usd } or nil, urls = { get = self.url .. "/v1/predictions/" .. job.id,
      cancel = self.url .. "/v1/predictions/" .. job.id .. "/cancel" } }
end

function Mock:create_job(req)
  local body = json.decode(req.body)
  if type(body) ~= "table" then
    return { status = 400, body = error_body(400, { message = "request body is not valid JSON" }) }
  end
  local cfg = self.scenario.jobs or {}
  self.next_job = self.next_job + 1
  local id = ("p%d"):format(self.next_job)
  local r = self.random()
  local job = { id = id, status = "starting", input = body.input or json.null, polls = 0,
    started = resil.now(), created_at = math.floor(resil.clock.wall()),
    fate = r < (cfg.stuck or 0) and "stuck" or r < (cfg.stuck or 0) + (cfg.fail or 0) and "failed" or "succeeded" }
  self.jobs[id] = job
  return { status = 201, body = json.encode(self:job_view(job)) }
end

-- A job succeeds after `polls` reads or `duration` seconds (host clock).
function Mock:poll_job(id)
  local job = self.jobs[id]
  if not job then return { status = 404, body = error_body(404, { message = "no prediction " .. id }) } end
  local cfg = self.scenario.jobs or {}
  job.polls = job.polls + 1
  if job.status == "starting" or job.status == "processing" then
    local ready
    if cfg.duration then ready = resil.now() - job.started >= cfg.duration
    else ready = job.polls > (cfg.polls or 2) end
    if job.fate == "stuck" or not ready then
      job.status = "processing"
    elseif job.fate == "failed" then
      job.status, job.error = "failed", cfg.error or "mock: prediction failed"
    else
      job.status = "succeeded"
      job.output = cfg.output or ("https://mock.invalid/outputs/%s.png"):format(id)
      local cost = cfg.usd or 0.01
      job.usd = cost
      self.counts.billed.usd = self.counts.billed.usd + cost
    end
  end
  return { status = 200, body = json.encode(self:job_view(job)) }
end

function Mock:cancel_job(id)
  local job = self.jobs[id]
  if not job then return { status = 404, body = error_body(404, { message = "no prediction " .. id }) } end
  if job.status == "starting" or job.status == "processing" then job.status = "canceled" end
  return { status = 200, body = json.encode(self:job_view(job)) }
end

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
local function fault_reply(fault, normal)
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
    return { status = fault.status, headers = headers, body = error_body(fault.status, fault) }
  end
  return nil
end

function Mock:handle(req)
  if req.method == "GET" and req.path == "/__mock/stats" then
    return { status = 200, body = json.encode(self.counts) }
  end
  local route, custom, capture = self:route(req)
  -- scenario.idempotency: like providers that honour Idempotency-Key, a
  -- repeated key gets the first successful answer again, unbilled
  local key = self.scenario.idempotency and req.headers["idempotency-key"]
  if key and self.replies[route .. " " .. key] then
    self:count(route, req, self.replies[route .. " " .. key].status)
    self.counts.replayed = self.counts.replayed + 1
    return deep_copy(self.replies[route .. " " .. key])
  end
  local fault = route ~= "unknown" and self:pick_fault(route) or nil
  if fault then self.counts.faults[route] = (self.counts.faults[route] or 0) + 1 end
  local function normal()
    if custom then
      local r = custom(req) or { status = 204 }
      if r.json ~= nil then r.body = json.encode(r.json) end
      return r
    end
    if route == "chat" then return self:chat(req, fault) end
    if route == "predictions" then return self:create_job(req) end
    if route == "prediction" then return self:poll_job(capture) end
    if route == "cancel" then return self:cancel_job(capture) end
    return { status = 404, body = error_body(404, { message = ("no route for %s %s"):format(req.method, req.path) }) }
  end
  local reply = fault and fault_reply(fault, normal) or normal()
  self:count(route, req, reply.action and reply.action or reply.status or 200)
  if key and not reply.action and (reply.status or 200) < 300 then self.replies[route .. " " .. key] = deep_copy(reply) end
  local latency = sample_latency(fault and fault.latency or self.scenario.latency, self.random)
  if latency > 0 then reply.delay = latency end
  return reply
end

return mock
