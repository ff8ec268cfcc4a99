-- The mock's async-job and speech APIs, as the real ones speak them:
--   Replicate predictions  POST /v1/predictions, POST /v1/models/{owner}/{name}/predictions,
--                          GET /v1/predictions/{id}, POST /v1/predictions/{id}/cancel,
--                          GET /v1/predictions (the list, newest first, {next, previous, results})
--                          (Authorization: Bearer; `Prefer: wait[=N]`; starting -> processing ->
--                          succeeded | failed | canceled; errors as {title, detail, status})
--   fal queue              under /fal (the mock's stand-in for the queue.fal.run host):
--                          POST /fal/{endpoint}, GET /fal/{owner}/{app}/requests/{id}/status,
--                          GET /fal/{owner}/{app}/requests/{id}, PUT .../requests/{id}/cancel
--                          (Authorization: Key; IN_QUEUE -> IN_PROGRESS -> COMPLETED; request
--                          errors as {detail, error_type} with X-Fal-Error-Type)
--   ElevenLabs             POST /v1/text-to-speech/{voice_id} (xi-api-key; audio bytes;
--                          errors as {detail = {status, code, message}})
-- Scenario (the `jobs` table, shared by Replicate and fal):
--   jobs = { polls = 2 | duration = s, fail = p, stuck = p, output = v, usd = n, predict_time = s,
--            error = "why", fates = { "failed", { "succeeded", polls = 0 }, "stuck" }, cancel_takes = s,
--            errors = { [route] = { 429, "ok", { status = 401, code = "quota_exceeded" } } } }
--   (a create's scripted error with `made = true`, { status = 502, made = true }, is a proxy's answer
--   after the provider made the job: the job runs and is listed, its id never answered)
-- `fates` decides the jobs in order of creation (then `stuck` and `fail` draw; "aborted": a Replicate
-- prediction ends `aborted`, a fal request COMPLETED with error_type request_timeout, never run, no
-- time, not billed; "lost": the job is
-- answered at its create, then forgotten, as by a provider's outage: its reads and cancel are 404s); `errors` plays
-- each route's provider-shaped error replies in order (route names: predictions, prediction,
-- cancel, prediction_list, fal_submit, fal_status, fal_result, fal_cancel, tts); the mock's generic
-- `sequence` and `faults` (hang, reset, garbage, latency, ...) apply to these routes too.
-- `cancel_takes`: a fal request in progress whose cancel was accepted (202 CANCELLATION_REQUESTED)
-- ends canceled that many seconds later, unless it completes first (math.huge: its app ignores it).
-- mock.lua asks route() first; a route's handler answers like a custom route.
local resil = ...
local json = resil.json

local M = {}

local function problem(status, title, detail, extra)
  local b = { title = title, detail = detail, status = status }
  for k, v in pairs(extra or {}) do b[k] = v end
  return { status = status, headers = { ["content-type"] = "application/problem+json" }, body = json.encode(b) }
end

-- ---------- per-mock state and scripted errors ----------

local function state(m)
  local s = m.job_api
  if not s then
    s = { replicate = {}, fal = {}, seq = 0, errors_pos = setmetatable({}, { __mode = "k" }) }
    m.job_api = s
  end
  return s
end

local function billed(m, field, n)
  local b = m.counts.billed
  b[field] = (b[field] or 0) + n
end

local function cfg(m) return m.scenario.jobs or {} end

-- The next scripted error of a route: nil (answer normally) or {status=, ...}.
local function scripted_error(m, route)
  local list = cfg(m).errors and cfg(m).errors[route]
  if not list then return nil end
  local s = state(m)
  local pos = (s.errors_pos[list] or 0) + 1 -- by list: a new scenario plays its own from the start
  if pos > #list then return nil end
  s.errors_pos[list] = pos
  local e = list[pos]
  if e == "ok" then return nil end
  if type(e) == "number" then return { status = e } end
  return e
end

-- A job's fate when it is created: the next of `fates` (a string, or {fate, polls=}),
-- else drawn by `stuck` and `fail` -> fate, polls it needs (nil: the scenario's)
local function fate(m)
  local c = cfg(m)
  if c.fates then
    local s = state(m)
    s.fate_pos = (s.fate_pos or 0) + 1
    local f = c.fates[s.fate_pos]
    if type(f) == "table" then return f[1], f.polls end
    if f then return f end
  end
  local r = m.random()
  if r < (c.stuck or 0) then return "stuck" end
  if r < (c.stuck or 0) + (c.fail or 0) then return "failed" end
  return "succeeded"
end

-- Has the job run long enough? After `polls` reads, or `duration` seconds
-- on the host clock (exact under the virtual clock).
local function ready(m, job, extra_seconds)
  local c = cfg(m)
  if job.needs_polls then return job.polls > job.needs_polls end
  if c.duration then return resil.now() + (extra_seconds or 0) - job.started >= c.duration end
  return job.polls > (c.polls or 2)
end

-- ---------- Replicate ----------

local REPLICATE_THROTTLE = "Request was throttled. Expected available in %d second%s."

local function replicate_error(e)
  local status = e.status
  if status == 429 then
    local after = e.retry_after or 1
    local r = problem(429, "Request was throttled", REPLICATE_THROTTLE:format(after, after == 1 and "" or "s"))
    r.headers["retry-after"] = tostring(after)
    return r
  end
  if status == 401 then return problem(401, "Unauthenticated", "You did not pass a valid authentication token") end
  if status == 402 then
    return problem(402, "Insufficient credit", "You have insufficient credit to run this model.")
  end
  if status == 404 then return problem(404, "Not found", "The requested resource could not be found.") end
  if status == 422 then return problem(422, "Input validation failed", e.detail or "invalid input") end
  return problem(status, e.title or "Internal server error", e.detail or ("mock %d"):format(status))
end

local function replicate_auth(req)
  local h = req.headers.authorization
  return h ~= nil and (h:match("^Bearer %S+$") or h:match("^Token %S+$")) ~= nil
end

function M.replicate_view(m, job)
  local base = m.url .. "/v1/predictions/" .. job.id
  return { id = job.id, model = job.model, version = job.version, status = job.status, input = job.input,
    output = job.output or json.null, error = job.error or json.null, logs = "", data_removed = false,
    source = "api", created_at = job.created_at,
    started_at = job.status ~= "starting" and job.created_at or json.null,
    completed_at = job.completed_at or json.null,
    metrics = job.metrics or json.null,
    urls = { get = base, cancel = base .. "/cancel", stream = json.null, web = json.null } }
end

-- move a running job on: one more read, or the time that passed
local function replicate_advance(m, job, extra_seconds)
  if job.status ~= "starting" and job.status ~= "processing" then return end
  if job.fate == "stuck" or not ready(m, job, extra_seconds) then
    job.status = "processing"
    return
  end
  local c = cfg(m)
  job.completed_at = os.date("!%Y-%m-%dT%H:%M:%S.000Z", math.floor(resil.clock.wall()))
  if job.fate == "aborted" then -- (its deadline passed before it started: it never ran, not billed)
    job.status, job.metrics = "aborted", { total_time = resil.now() - job.started }
    return
  end
  job.metrics = { predict_time = c.predict_time or 1.5, total_time = (c.predict_time or 1.5) + 0.5 }
  if job.fate == "failed" then
    job.status, job.error = "failed", c.error or "mock: prediction failed"
  else
    job.status = "succeeded"
    job.output = c.output or json.null
    if job.output == json.null then -- one file per output asked for
      local n = type(job.input) == "table" and tonumber(job.input.num_outputs) or 1
      job.output = {}
      for i = 1, n do job.output[i] = ("https://replicate.delivery/mock/%s/out-%d.png"):format(job.id, i - 1) end
    end
    billed(m, "usd", c.usd or 0.01)
    billed(m, "jobs", 1)
  end
end

local function replicate_create(m, req, owner_model)
  if not replicate_auth(req) then return replicate_error({ status = 401 }) end
  local e = scripted_error(m, "predictions")
  if e and not e.made then return replicate_error(e) end
  local body = json.decode(req.body)
  if type(body) ~= "table" then return replicate_error({ status = 400, title = "Bad request",
    detail = "The request body is not valid JSON" }) end
  if owner_model == nil and type(body.version) ~= "string" then
    return problem(422, "Input validation failed", "- version: version is required",
      { invalid_fields = { { type = "required", field = "version", description = "version is required" } } })
  end
  if type(body.input) ~= "table" then
    return problem(422, "Input validation failed", "- input: input is required",
      { invalid_fields = { { type = "required", field = "input", description = "input is required" } } })
  end
  local s = state(m)
  s.seq = s.seq + 1
  local id = ("mock%s%05d"):format(m.instance, s.seq)
  local job = { id = id, status = "starting", input = body.input, polls = 0, started = resil.now(),
    model = owner_model or "mock/model", version = body.version or "hidden",
    created_at = os.date("!%Y-%m-%dT%H:%M:%S.000Z", math.floor(resil.clock.wall())) }
  job.fate, job.needs_polls = fate(m)
  if job.fate ~= "lost" then s.replicate[id] = job end -- (lost: created, then forgotten: 404s)
  s.replicate_order = s.replicate_order or {}
  if job.fate ~= "lost" then table.insert(s.replicate_order, 1, job) end
  if e then return replicate_error(e) end -- (made = true: a proxy's answer after the job was made)
  -- Prefer: wait[=N] holds the answer until the job ends or N seconds pass (60 at most)
  local prefer = req.headers.prefer
  local wait = prefer and (tonumber(prefer:match("^wait=(%d+)")) or (prefer == "wait" and 60))
  if wait then
    wait = math.min(wait, 60)
    local c = cfg(m)
    local delay = wait
    if job.fate ~= "stuck" then
      if c.duration then
        if c.duration <= wait then delay = c.duration end
      else
        job.polls = (c.polls or 2) + 1 -- a waited-for job is done when the answer comes
        delay = 0
      end
    end
    replicate_advance(m, job, delay)
    local r = { status = 201, body = json.encode(M.replicate_view(m, job)) }
    if delay > 0 then r.delay = delay end
    return r
  end
  return { status = 201, body = json.encode(M.replicate_view(m, job)) }
end

local function replicate_get(m, req, id)
  if not replicate_auth(req) then return replicate_error({ status = 401 }) end
  local e = scripted_error(m, "prediction")
  if e then return replicate_error(e) end
  local job = state(m).replicate[id]
  if not job then return replicate_error({ status = 404 }) end
  job.polls = job.polls + 1
  replicate_advance(m, job)
  return { status = 200, body = json.encode(M.replicate_view(m, job)) }
end

-- the account's predictions, newest first, 100 a page (`?cursor=N` the page after N skipped)
local function replicate_list(m, req)
  if not replicate_auth(req) then return replicate_error({ status = 401 }) end
  local e = scripted_error(m, "prediction_list")
  if e then return replicate_error(e) end
  local order = state(m).replicate_order or {}
  local from = tonumber((req.query or ""):match("cursor=(%d+)")) or 0
  local results = setmetatable({}, json.array_mt)
  for i = from + 1, math.min(#order, from + 100) do results[#results + 1] = M.replicate_view(m, order[i]) end
  local next_url = #order > from + 100 and ("%s/v1/predictions?cursor=%d"):format(m.url, from + 100) or json.null
  return { status = 200, body = json.encode({ next = next_url, previous = json.null, results = results }) }
end

local function replicate_cancel(m, req, id)
  if not replicate_auth(req) then return replicate_error({ status = 401 }) end
  local e = scripted_error(m, "cancel")
  if e then return replicate_error(e) end
  local job = state(m).replicate[id]
  if not job then return replicate_error({ status = 404 }) end
  replicate_advance(m, job) -- a job whose time has come ended before the cancel: it stays ended
  if job.status == "starting" or job.status == "processing" then
    job.status = "canceled"
    job.completed_at = os.date("!%Y-%m-%dT%H:%M:%S.000Z", math.floor(resil.clock.wall()))
    local ran = resil.now() - job.started -- billed for the time it ran
    job.metrics = { predict_time = ran, total_time = ran }
    billed(m, "canceled", 1)
  end
  return { status = 200, body = json.encode(M.replicate_view(m, job)) }
end

-- ---------- fal queue ----------

local FAL_ERROR_STATUS = { request_timeout = 504, startup_timeout = 504, runner_scheduling_failure = 503,
  runner_connection_timeout = 503, runner_disconnected = 503, runner_connection_refused = 503,
  runner_connection_error = 503, runner_incomplete_response = 502, runner_server_error = 500,
  client_disconnected = 499, client_cancelled = 499, bad_request = 400, internal_error = 500 }

local function fal_error(e)
  local status = e.status
  if e.error_type then
    status = status or FAL_ERROR_STATUS[e.error_type] or 500
    return { status = status, headers = { ["content-type"] = "application/json",
      ["x-fal-error-type"] = e.error_type },
      body = json.encode({ detail = e.detail or e.error_type:gsub("_", " "), error_type = e.error_type }) }
  end
  local detail = e.detail
  if e.code == "exhausted_balance" then -- (fal's answer to an account out of balance)
    status = status or 403
    detail = detail or "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
  end
  if status == 401 then detail = detail or "Missing authorization header" end
  if status == 404 then detail = detail or "Request not found" end
  if status == 429 then
    local r = { status = 429, headers = { ["content-type"] = "application/json",
      ["retry-after"] = tostring(e.retry_after or 1) },
      body = json.encode({ detail = detail or "Too many requests" }) }
    return r
  end
  return { status = status, headers = { ["content-type"] = "application/json" },
    body = json.encode({ detail = detail or ("mock %d"):format(status) }) }
end

local function fal_auth(req)
  local h = req.headers.authorization
  return h ~= nil and h:match("^Key %S+$") ~= nil
end

-- the queue's URLs name the app (owner/alias), not the endpoint's sub-path
local function fal_urls(m, job)
  local base = ("%s/fal/%s/requests/%s"):format(m.url, job.app, job.id)
  return base .. "/status", base, base .. "/cancel"
end

local function fal_status_view(m, job)
  local status_url, response_url, cancel_url = fal_urls(m, job)
  local v = { status = job.status, request_id = job.id, response_url = response_url, status_url = status_url,
    cancel_url = cancel_url }
  if job.status == "IN_QUEUE" then v.queue_position = job.queue_position end
  if job.status ~= "IN_QUEUE" then v.logs = json.null end
  if job.status == "COMPLETED" and job.error_type ~= "client_cancelled" and job.fate ~= "aborted" then
    v.metrics = { inference_time = cfg(m).predict_time or 1.5 }
  end
  if job.status == "COMPLETED" then
    if job.error then v.error, v.error_type = job.error, job.error_type end
  end
  return v
end

-- a request whose cancel was accepted (`cancel_takes`) ends canceled when the cancel takes, unless
-- it completed first; a canceled request's status says no time (fal_status_view)
local function fal_canceled(m, job)
  job.status, job.error, job.error_type = "COMPLETED", "Request was cancelled by the client", "client_cancelled"
  job.queue_position = nil
  billed(m, "canceled", 1)
end

local function fal_advance(m, job)
  if job.status == "COMPLETED" then return end
  if job.cancel_at and resil.now() >= job.cancel_at and (job.fate == "stuck" or not ready(m, job)) then
    return fal_canceled(m, job)
  end
  if job.fate == "stuck" or not ready(m, job) then
    if job.polls >= 1 then job.status, job.queue_position = "IN_PROGRESS", nil end
    return
  end
  local c = cfg(m)
  job.status = "COMPLETED"
  if job.fate == "aborted" then -- (fal's x-fal-request-timeout passed before it started: never run)
    job.error, job.error_type, job.queue_position = "Request timed out before processing started", "request_timeout", nil
  elseif job.fate == "failed" then
    job.error, job.error_type = c.error or "mock: request failed", "runner_server_error"
  else
    job.output = c.output or { images = { { url = ("https://v3.fal.media/files/mock/%s.png"):format(job.id),
      width = 1024, height = 768, content_type = "image/png" } }, seed = 42, has_nsfw_concepts = { false },
      prompt = type(job.input) == "table" and job.input.prompt or json.null }
    billed(m, "usd", c.usd or 0.025)
    billed(m, "jobs", 1)
  end
end

local function fal_submit(m, req, endpoint)
  if not fal_auth(req) then return fal_error({ status = 401 }) end
  local e = scripted_error(m, "fal_submit")
  if e then return fal_error(e) end
  local input = json.decode(req.body)
  if type(input) ~= "table" then
    return { status = 422, headers = { ["content-type"] = "application/json" }, body = json.encode({ detail = {
      { loc = { "body" }, msg = "Input should be a valid dictionary", type = "dict_type" } } }) }
  end
  -- (a namespaced app's queue is under namespace/owner/app, as fal's: workflows/acme/flow)
  local app = endpoint:match("^([^/]+/[^/]+)")
  if app and (app:match("^workflows/") or app:match("^comfy/")) then app = endpoint:match("^([^/]+/[^/]+/[^/]+)") end
  if not app then return fal_error({ status = 404, detail = "Application not found" }) end
  local s = state(m)
  s.seq = s.seq + 1
  local id = ("%08x-mock-%s-%04d"):format(s.seq, m.instance, s.seq)
  local queued = 0
  for _, j in pairs(s.fal) do if j.status == "IN_QUEUE" then queued = queued + 1 end end
  local job = { id = id, app = app, endpoint = endpoint, status = "IN_QUEUE", input = input,
    polls = 0, started = resil.now(), queue_position = queued }
  job.fate, job.needs_polls = fate(m)
  if job.fate ~= "lost" then s.fal[id] = job end
  return { status = 200, body = json.encode(fal_status_view(m, job)) }
end

local function fal_job(m, app, id)
  local job = state(m).fal[id]
  if job and job.app == app then return job end
  return nil
end

local function fal_status(m, req, app, id)
  if not fal_auth(req) then return fal_error({ status = 401 }) end
  local e = scripted_error(m, "fal_status")
  if e then return fal_error(e) end
  local job = fal_job(m, app, id)
  if not job then return fal_error({ status = 404 }) end
  job.polls = job.polls + 1
  fal_advance(m, job)
  -- a running request answers 202, a completed one 200
  return { status = job.status == "COMPLETED" and 200 or 202, body = json.encode(fal_status_view(m, job)) }
end

local function fal_result(m, req, app, id)
  if not fal_auth(req) then return fal_error({ status = 401 }) end
  local e = scripted_error(m, "fal_result")
  if e then return fal_error(e) end
  local job = fal_job(m, app, id)
  if not job then return fal_error({ status = 404 }) end
  if job.status ~= "COMPLETED" then
    return { status = 400, headers = { ["content-type"] = "application/json" },
      body = json.encode({ detail = "Request is still in progress" }) }
  end
  if job.error then
    return fal_error({ error_type = job.error_type, detail = job.error })
  end
  return { status = 200, headers = { ["content-type"] = "application/json", ["x-fal-request-id"] = id },
    body = json.encode(job.output) }
end

local function fal_cancel(m, req, app, id)
  if not fal_auth(req) then return fal_error({ status = 401 }) end
  local e = scripted_error(m, "fal_cancel")
  if e then return fal_error(e) end
  local job = fal_job(m, app, id)
  if not job then return fal_error({ status = 404 }) end
  fal_advance(m, job) -- a request whose time has come completed before the cancel
  if job.status == "COMPLETED" then
    return { status = 400, body = json.encode({ status = "ALREADY_COMPLETED" }) }
  end
  -- (`cancel_takes`: fal signals the runner, whose app stops when it does, or never: math.huge)
  local takes = cfg(m).cancel_takes
  if takes and job.status == "IN_PROGRESS" then
    job.cancel_at = job.cancel_at or resil.now() + takes
  else
    fal_canceled(m, job)
  end
  return { status = 202, body = json.encode({ status = "CANCELLATION_REQUESTED" }) }
end

-- ---------- ElevenLabs text-to-speech ----------

local function eleven_error(status, code, message)
  return { status = status, headers = { ["content-type"] = "application/json" },
    body = json.encode({ detail = { type = status == 429 and "rate_limit_error" or
      status >= 500 and "service_unavailable" or "invalid_request", code = code, status = code,
      message = message or code, request_id = "mock-req" } }) }
end

local ELEVEN_MESSAGES = {
  quota_exceeded = { 401, "This request exceeds your quota of 10000. You have 0 credits remaining." },
  invalid_api_key = { 401, "Invalid API key" },
  concurrent_limit_exceeded = { 429, "Too many concurrent requests for your plan" },
  too_many_concurrent_requests = { 429, "Too many concurrent requests for your plan" },
  system_busy = { 503, "Our services are experiencing high levels of traffic" },
  voice_not_found = { 404, "A voice with the voice_id was not found." },
}

-- deterministic bytes that look like an MP3 file: an ID3 tag, then frames
local function fake_mp3(text)
  local frames = { "ID3\4\0\0\0\0\0\0" }
  local h = resil.hash(text)
  for i = 1, math.max(1, math.ceil(#text / 16)) do
    frames[#frames + 1] = "\255\251\144\100" .. h:sub((i % 8) + 1, (i % 8) + 8)
  end
  return table.concat(frames)
end

local function tts(m, req, voice)
  if not req.headers["xi-api-key"] then
    return eleven_error(401, "needs_authorization",
      "Neither authorization header nor xi-api-key received, please provide one.")
  end
  local e = scripted_error(m, "tts")
  if e then
    local known = ELEVEN_MESSAGES[e.code or ""]
    local r = eleven_error(e.status or (known and known[1]) or 500, e.code or "internal_error",
      e.message or (known and known[2]))
    if e.retry_after then r.headers["retry-after"] = tostring(e.retry_after) end
    return r
  end
  local body = json.decode(req.body)
  if type(body) ~= "table" or type(body.text) ~= "string" or body.text == "" then
    return { status = 422, headers = { ["content-type"] = "application/json" }, body = json.encode({ detail = {
      { type = "missing", loc = { "body", "text" }, msg = "Field required" } } }) }
  end
  if voice == "" then return eleven_error(404, "voice_not_found", ELEVEN_MESSAGES.voice_not_found[2]) end
  local chars = utf8.len(body.text) or #body.text
  billed(m, "characters", chars)
  local s = state(m)
  s.seq = s.seq + 1
  return { status = 200, headers = { ["content-type"] = "audio/mpeg", ["x-character-count"] = tostring(chars),
    ["request-id"] = ("req-mock%s-%d"):format(m.instance, s.seq) }, body = fake_mp3(body.text) }
end

-- ---------- routing ----------

-- { method, pattern, route name, handler(m, req, captures...) }
local ROUTES = {
  { "POST", "^/v1/predictions$", "predictions", function(m, req) return replicate_create(m, req) end },
  { "POST", "^/v1/models/([%w%-_%.]+/[%w%-_%.]+)/predictions$", "predictions", replicate_create },
  { "GET", "^/v1/predictions$", "prediction_list", replicate_list },
  { "GET", "^/v1/predictions/([%w%-_]+)$", "prediction", replicate_get },
  { "POST", "^/v1/predictions/([%w%-_]+)/cancel$", "cancel", replicate_cancel },
  { "GET", "^/fal/([^/]+/[^/]+/?[^/]-)/requests/([%w%-_]+)/status$", "fal_status", fal_status },
  { "PUT", "^/fal/([^/]+/[^/]+/?[^/]-)/requests/([%w%-_]+)/cancel$", "fal_cancel", fal_cancel },
  { "GET", "^/fal/([^/]+/[^/]+/?[^/]-)/requests/([%w%-_]+)$", "fal_result", fal_result },
  { "POST", "^/fal/(.+)$", "fal_submit", fal_submit },
  { "POST", "^/v1/text%-to%-speech/([%w%-_]*)$", "tts", tts },
}

-- what a scenario's `jobs` table takes (mock.lua checks it: a misspelt one was ignored)
M.scenario_keys = { "polls", "duration", "fail", "stuck", "output", "usd", "predict_time", "error", "fates",
  "cancel_takes", "errors" }

-- the fates a scenario's `fates` names (mock.lua checks them)
M.fate_names = { "succeeded", "failed", "stuck", "aborted", "lost" }

-- the names of these routes, for a scenario's `sequence` and `faults` (mock.lua checks them)
M.route_names = {}
for _, r in ipairs(ROUTES) do
  if M.route_names[#M.route_names] ~= r[3] then M.route_names[#M.route_names + 1] = r[3] end
end

-- route(m, req) -> route name, handler(req) | nil
function M.route(m, req)
  for _, r in ipairs(ROUTES) do
    if req.method == r[1] then
      local a, b = req.path:match(r[2])
      if a then
        local handler = r[4]
        return r[3], function(q) return handler(m, q, a, b) end
      end
    end
  end
  return nil
end

return M
