-- policies/call.lua: one provider call wrapped in the usual order, configured
-- from one table per provider:
--
--   deadline > fallback > retry > breaker > bucket > concurrency limit > the call
--   > classification and validation
--
--   local call = require "policies.call"
--   local openai = call.provider("openai", {
--     request  = { method = "POST", url = base .. "/v1/chat/completions", headers = h },
--     timeout  = 30,                          -- per attempt
--     deadline = 120,                         -- the whole call, retries and fallbacks included
--     rate     = { rate = 500, per = 60, burst = 50 },        -- requests
--     tokens   = { rate = 90000, per = 60 },                  -- tokens, estimated then corrected
--     breaker  = { failure_rate = 0.5, min_calls = 10, window = 30, open_for = 30 },
--     concurrency = { size = 16, queue = 1000 },
--     retry    = { base = 0.5, cap = 20 },    -- options of policies.retry
--     validate = "chat",                      -- a policies.classify validator, or fn(res)
--     fallback = { anthropic_caller, placeholder = "(unavailable)" },
--     idempotency = true,                     -- inside resil.once, send its key as Idempotency-Key
--   })
--   local res, err, info = openai{ json = { model = "gpt-4o", messages = msgs } }
--
-- A request is a table merged over `request` (headers merged too), or a
-- function(attempt, seconds_left) returning res, err. `info.served_by` names
-- the provider (or "placeholder") that answered.
local resil = require "resil"
local classify = require "policies.classify"
local retry = require "policies.retry"
local pricing = require "policies.pricing"
local fallback = require "policies.fallback"

local call = {}
local now = resil.now

-- (the host's metric constructors, which prelude's owning_loader hands this chunk: resil.metrics is
-- the scripts', and under the sandbox one that ran first handed out fakes; a copy loaded otherwise
-- has resil.metrics)
local host_metrics = select(4, ...) or resil.metrics
local calls_total = host_metrics.counter("resil_calls_total", "Provider attempts, by provider and outcome")
local call_seconds = host_metrics.histogram("resil_call_seconds", "Time of one provider attempt, by provider")
-- OpenTelemetry's gen_ai.client.operation.duration, with its buckets
local operation_duration = host_metrics.histogram("gen_ai_client_operation_duration_seconds",
  "Time of one provider attempt (OpenTelemetry gen_ai.client.operation.duration), by operation, system, model and " ..
    "error type",
  { buckets = { 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92 } })

local Provider = {}
Provider.__index = Provider

-- a half-open probe must be given back if the attempt is canceled mid-call
local probe_guard_mt = { __close = function(g)
  if not g.done then g.breaker:record(nil, nil, "probe", g.round) end
end }

local function estimate_tokens(req)
  local body = req.body or (req.json and resil.json.encode(req.json)) or ""
  local out = type(req.json) == "table" and (req.json.max_tokens or req.json.max_completion_tokens) or 0
  return pricing.estimate_tokens(body) + out
end

-- A count of an answer's usage as the token bucket takes it: a number from 0 to MOST_TOKENS (no
-- model reads or writes more in one call, as policies.ai records it) | nil (absent) | false (the
-- provider's garbage). A string or a boolean count raised out of the call after the provider was
-- paid (its cost never recorded), and a total_tokens of 1e300 for an 8-token answer charged the
-- bucket that much: every later call waited.
local MOST_TOKENS = 10000000
local function count(v)
  if v == nil or v == resil.json.null then return nil end
  return math.type(v) ~= nil and v >= 0 and v <= MOST_TOKENS and v or false -- (NaN fails v >= 0)
end
local function either(a, b)
  if a == nil then return b end
  return a
end

-- the tokens an answer used: its input and output counts (a total_tokens past them only as far as
-- its reasoning tokens go, which some compatible servers count outside completion_tokens), else its
-- total_tokens | nil: none, or a count that cannot be read (the estimate charged stays, as
-- policies.ai records such an answer at its estimate)
local function used_tokens(res)
  local data = res and res.status == 200 and classify.decoded(res)
  local usage = type(data) == "table" and data.usage
  if type(usage) ~= "table" then return nil end
  local i = either(count(usage.prompt_tokens), count(usage.input_tokens))
  local o = either(count(usage.completion_tokens), count(usage.output_tokens))
  local total = count(usage.total_tokens) or nil -- (garbage beside readable counts: left out)
  if i == false or o == false then return nil end
  if not (i or o) then return total end
  local n = (i or 0) + (o or 0)
  local details = usage.completion_tokens_details
  local reasoning = type(details) == "table" and count(details.reasoning_tokens) or 0
  if total and total > n and total <= n + reasoning then n = total end
  return n
end

-- The Idempotency-Key an attempt sends | nil
local function sent_key(self, req, refused)
  if type(req) ~= "table" then return nil end
  local key = req.idempotency_key
  if key == nil and self.idempotency then key = resil.context().idempotency_key end -- inside resil.once
  -- after an answer it refused, the same key would get that answer again
  -- (the provider replays it): each refusal moves to a key of its own,
  -- the same one again when the call is run again (a resumed job)
  -- (a cut answer does not move it: the provider replays the whole answer, one charge)
  local moved = refused and refused.answers
  if key and moved and moved > 0 then key = key .. "." .. moved end
  return key
end

-- An attempt's own fields, over the provider's `request` and the call's
-- (resil.http.request(self.request, req, these) merges the three in C, by
-- the rules a copy followed: a later table's field wins, headers merged by
-- name): the timeout cut at the deadline, its progress (false: none, not
-- the call's), Idempotency-Key and traceparent headers. key: the key the
-- attempt sends (sent_key) | nil; progress: the table a cancel tells how far
-- the transfer got | nil
local function attempt_fields(self, req, left, span, key, progress)
  local timeout = req.timeout
  if timeout == nil then timeout = self.request.timeout end
  timeout = timeout or self.timeout
  if left and (timeout == nil or left < timeout) then timeout = left end
  local headers
  if key or span then
    headers = {}
    if key then headers["Idempotency-Key"] = key end
    if span then -- W3C trace context: the attempt's span, and the caller's tracestate passed on
      headers["traceparent"] = span.traceparent
      headers["tracestate"] = span.tracestate
    end
  end
  return { timeout = timeout, progress = progress or false, headers = headers }
end

local function send(self, req, attempt, left, span, key, progress)
  if type(req) == "function" then
    if left then return resil.timeout(left, req, attempt, left) end
    return req(attempt, left)
  end
  return resil.http.request(self.request, req, attempt_fields(self, req, left, span, key, progress))
end

-- Each attempt is a span (src/lua/trace.lua) with OpenTelemetry's GenAI
-- attributes; its ids are on the log lines written while it runs. Without
-- an exporter a span is made only to carry a caller's trace on to the
-- provider (a request table in a followed trace): as OpenTelemetry's API
-- without an SDK, no new trace nobody collects (it was a tenth of a
-- gateway request, most of it libcurl writing the header byte by byte).
-- A process that neither exports nor follows a trace reads one field
-- (resil.trace.spans) for it.
-- The GenAI conventions' operation of a request (gen_ai.operation.name, on its span and its
-- duration's series): the provider's `operation` (the job and speech providers' generate_content),
-- else by its URL: an embeddings request's URL ends so, OpenAI's API and those that copy it;
-- every other request is a chat. Remembered by URL, at most OPERATION_URLS_MAX of them.
local OPERATION_URLS_MAX = 1000
local operation_of_url, operation_urls = {}, 0
local function operation_of(self, is_table, req)
  if self.operation then return self.operation end
  local url = is_table and (req.url or self.request.url)
  if type(url) ~= "string" then return "chat" end
  local op = operation_of_url[url]
  if op then return op end
  op = url:find("/embeddings$") and "embeddings" or "chat"
  if operation_urls >= OPERATION_URLS_MAX then operation_of_url, operation_urls = {}, 0 end
  operation_of_url[url], operation_urls = op, operation_urls + 1
  return op
end

local function start_span(self, is_table, model, n, op)
  local exporting = resil.trace.exporting()
  if not exporting and not (is_table and resil.trace.followed()) then return nil end
  local span = resil.trace.start(exporting and ("%s %s"):format(op, model or self.name) or op, exporting and {
    -- (gen_ai.provider.name is the conventions' name for what gen_ai.system was; both are said,
    -- gen_ai.system for the dashboards made before)
    ["gen_ai.provider.name"] = self.name, ["gen_ai.system"] = self.name, ["gen_ai.operation.name"] = op, ["gen_ai.request.model"] = model,
    ["resil.attempt"] = n } or nil)
  local ctx = resil.context()
  span.saved = { ctx.trace_id, ctx.span_id }
  ctx.trace_id, ctx.span_id = span.trace_id, span.span_id
  return span
end

local function finish_span(span, res, err)
  local ctx = resil.context()
  ctx.trace_id, ctx.span_id = span.saved[1], span.saved[2]
  if not resil.trace.exporting() then return end -- nothing reads a span that is not exported
  local attrs = {}
  if type(res) == "table" and res.status then
    attrs["http.response.status_code"] = res.status
    local data = res.status == 200 and classify.decoded(res)
    if type(data) == "table" then
      attrs["gen_ai.response.model"] = type(data.model) == "string" and data.model or nil
      attrs["gen_ai.response.id"] = type(data.id) == "string" and data.id or nil
      local usage = type(data.usage) == "table" and data.usage or {}
      attrs["gen_ai.usage.input_tokens"] = math.tointeger(usage.prompt_tokens or usage.input_tokens)
      attrs["gen_ai.usage.output_tokens"] = math.tointeger(usage.completion_tokens or usage.output_tokens)
    end
  end
  span:finish(attrs, err)
end

-- gen_ai.client.operation.duration's series for (model, error type), bound
-- once per provider: label sets are not sorted and formatted on every attempt.
-- At most OPERATION_MODELS_MAX models are kept (a gateway's clients name any
-- model they like: a scan of made-up names grew it by each); past that it
-- starts over, as the metric keeps only so many label sets anyway
local OPERATION_MODELS_MAX = 1000
local function operation_series(self, model, error_type, op)
  model = model or "unknown" -- (kept by the model as given: no tostring per attempt)
  if model ~= model then model = tostring(model) end -- (NaN is no table key)
  local by_model = self.operation_series
  if not by_model or self.operation_models >= OPERATION_MODELS_MAX then
    by_model = {}
    self.operation_series, self.operation_models = by_model, 0
  end
  local by_op = by_model[model]
  if not by_op then
    by_op = {}
    by_model[model] = by_op
    self.operation_models = self.operation_models + 1
  end
  local by_error = by_op[op]
  if not by_error then
    by_error = {}
    by_op[op] = by_error
  end
  local series = by_error[error_type]
  if not series then
    -- (error_type false: the attempt went well, and the conventions' error.type is absent, no
    -- label; "none" made every query for an error_type count the successes as errors)
    series = operation_duration:labels({ gen_ai_operation_name = op, gen_ai_provider_name = self.name,
                                         gen_ai_system = self.name, gen_ai_request_model = tostring(model),
                                         error_type = error_type or nil })
    by_error[error_type] = series
  end
  return series
end

-- refused.sending: the progress table of the attempt under way, or a SENDING set of them when
-- several are (an attempt's progress is made and let go on every attempt: one table, no set)
local SENDING = {}
local function sends(refused)
  local list = refused.sending
  if list == nil or getmetatable(list) == SENDING then return list end
  return { [list] = true }
end

-- A whole answer under the key a cut one was sent with is that answer
-- replayed (the provider keeps what it made for its key): one charge, the
-- whole one's. A cut answer no whole one followed under its key (the call
-- failed, fell back elsewhere or was canceled) is its own charge.
local function mark_replayed(refused, key)
  for _, r in ipairs(refused) do
    if r.cut and r.key == key then r.replayed = true end
  end
  for progress in pairs(sends(refused) or {}) do
    if progress.key == key then progress.replayed = true end
  end
end

-- An attempt whose task is canceled never returns here: the transfer tells
-- its `progress` table how far it got (resil.http.request). A 2xx canceled
-- while its body was read (or before its task resumed with all of it) was
-- answered, and the provider bills it. call.take_canceled(refused) moves
-- each such attempt of the list into it as a cut answer, for the caller's
-- cleanup to record (its sends still running stay).
local function sending(refused, key)
  local progress = { key = key }
  local list = refused.sending
  if list == nil then refused.sending = progress
  elseif getmetatable(list) == SENDING then list[progress] = true
  else refused.sending = setmetatable({ [list] = true, [progress] = true }, SENDING) end
  return progress
end

local function sent(refused, progress)
  local list = refused.sending
  if list == progress then refused.sending = nil else list[progress] = nil end
end

function call.take_canceled(refused)
  local list = sends(refused)
  if not list then return end
  for progress in pairs(list) do
    if progress.received then -- (told at the cancel)
      sent(refused, progress)
      local status = progress.status
      if math.type(status) == "integer" and status >= 200 and status < 300 then
        refused[#refused + 1] = { cut = true, status = status, received = progress.received, key = progress.key,
                                  replayed = progress.replayed }
      end
    end
  end
end

-- After an answer: the token bucket's estimate corrected by the usage (more
-- tokens taken, or given back), then the provider's word on its limits: a
-- count it gives is what is left after this call's real usage, and a refund
-- must not shorten the pause a shared bucket keeps in its state. For shared
-- buckets these are store operations: after an answer that succeeded they
-- run in a task of their own, in that order (a correction cannot refuse, and
-- the answer need not wait for it: on SQLite a commit, about 0.4 ms a call);
-- after a failure (a 429 and its pause) before the attempt returns, so that
-- the retry and every other process find the pause. headers: a headers
-- table, or the response they came with (b:observe reads either).
local function correct_buckets(self, more, headers)
  local tb = self.token_bucket
  if more > 0 then tb:charge(more) elseif more < 0 then tb:refund(-more) end
  if headers then
    if self.bucket then self.bucket:observe(headers) end
    if tb then tb:observe(headers) end
  end
end

-- One attempt through breaker, buckets and the concurrency limit. refused:
-- a list that collects the 2xx responses the validator turned down, and
-- those whose body was cut ({cut = true, status=, received=, key=}, key:
-- the Idempotency-Key it was sent with; replayed = true once a whole answer
-- came under it): the provider billed them, policies.ai records their cost.
-- An attempt that ends before it sends (its permit's wait failed, the caller gave up, the
-- deadline passed): what its buckets took for it goes back, nothing having reached the provider
-- (the estimate stayed charged, and a later call was refused for a rate it never used)
local function unsent(bucket, token_bucket, tokens)
  if token_bucket and tokens > 0 then token_bucket:refund(tokens) end
  if bucket then bucket:refund(1) end
end

-- A pause the provider asked for (an exhausted limit's reset, a 429's Retry-After) longer than the
-- retry's max_retry_after is its "not now" to the calls after the one it answered too: not waited out
-- in the bucket (the call that got it gave up at once, err.gave_up = "retry_after", and the next one,
-- with no deadline, held an hour there, its fallback unasked). -> the error | nil. Asked only when
-- the bucket's wait is that long (its own pacing may be: a pipeline's calls queue for minutes).
local function paused_past(b, most)
  local paused = b:state().paused_for
  if not (paused > most) then return nil end
  return resil.error("rate_limited", ("bucket '%s' is paused for %.3f s more, as the provider said (past " ..
    "max_retry_after, %g s)"):format(b:name(), paused, most), { retry_after = paused, bucket = b:name() })
end

local function attempt(n, self, req, deadline, refused, give_up)
  local bucket, token_bucket, sem = self.bucket, self.token_bucket, self.semaphore
  if bucket or token_bucket then
    local most = self.retry_opts.max_retry_after or retry.defaults.max_retry_after
    if not deadline or deadline - now() > most then -- (a deadline nearer cuts the wait itself)
      -- (paused_past asked only of a bucket whose wait is that long: most never are)
      local paused = bucket and bucket:wait_time(1) > most and paused_past(bucket, most)
        or token_bucket and token_bucket:wait_time(1) > most and paused_past(token_bucket, most)
      if paused then return nil, paused end
    end
  end
  local br = self.breaker
  local guard, probe, round
  if br then
    local ok
    ok, probe, round = br:allow()
    if not ok then return nil, probe end
    if probe then guard = setmetatable({ breaker = br, round = round }, probe_guard_mt) end
  end
  local _ <close> = guard -- an attempt that ends before record() gives its probe back
  local is_table = type(req) == "table"
  local wait = deadline and (bucket or token_bucket or sem) and { timeout = math.max(0, deadline - now()) } or nil
  local tokens = 0
  if token_bucket then
    tokens = (self.estimate or estimate_tokens)(is_table and req or {})
    local ok, err
    if bucket then
      ok, err = resil.acquire_all({ { bucket, 1 }, { token_bucket, tokens } }, wait)
    else
      ok, err = token_bucket:acquire(tokens, wait)
    end
    if not ok then return nil, err end
  elseif bucket then
    local ok, err = bucket:acquire(1, wait)
    if not ok then return nil, err end
  end
  if sem then
    -- (what is left of the deadline once a bucket's wait is over, not what was before it)
    if wait and (bucket or token_bucket) then wait.timeout = math.max(0, deadline - now()) end
    -- (the concurrency table's own timeout, limit.run's, bounds the wait too: taken and ignored, a
    -- call without a deadline queued as long as the calls holding the permits ran)
    local most = self.permit_timeout
    if most and not (wait and wait.timeout <= most) then wait = { timeout = most } end
    local ok, err = sem:acquire(wait)
    if not ok then
      unsent(bucket, token_bucket, tokens)
      return nil, err
    end
  end
  -- (a wait for a bucket or a permit may outlast the client: asked again before anything is sent)
  local why = give_up and (bucket or token_bucket or sem) and give_up()
  if why then
    if sem then sem:release() end
    unsent(bucket, token_bucket, tokens)
    return nil, resil.error("given_up", ("gave up before attempt %d was sent: %s"):format(n, tostring(why)),
      { provider = self.name, class = "canceled", retryable = true, gave_up = tostring(why) })
  end
  local start = now()
  -- (a wait above, or a shared breaker's store call, may have reached the deadline: nothing is
  -- sent past it, and no wait or request is given a timeout below zero, which they raise on)
  if deadline and start >= deadline then
    if sem then sem:release() end
    unsent(bucket, token_bucket, tokens)
    return nil, resil.error("deadline", ("deadline passed before attempt %d was sent"):format(n),
      { provider = self.name, class = "deadline", retryable = false })
  end
  local res, err
  local json = is_table and req.json
  local model = json and type(json) == "table" and json.model or nil
  local key = is_table and (self.idempotency or req.idempotency_key ~= nil) and sent_key(self, req, refused) or nil
  local op = self.operation
  if not op then -- (a URL met before: found here, no call)
    local url = is_table and (req.url or self.request.url)
    op = url and operation_of_url[url] or operation_of(self, is_table, req)
  end
  local span = resil.trace.spans and start_span(self, is_table, model, n, op) or nil
  local progress
  if refused and is_table then -- (the one attempt under way, the common case: no call)
    if refused.sending == nil then
      progress = { key = key }
      refused.sending = progress
    else
      progress = sending(refused, key)
    end
  end
  do
    local _ <close> = sem and self.releaser or nil
    if is_table then
      res, err = resil.http.request(self.request, req,
        attempt_fields(self, req, deadline and deadline - start, span, key, progress))
    else
      res, err = send(self, req, n, deadline and deadline - start, span, key, progress)
    end
  end
  if progress then
    if refused.sending == progress then refused.sending = nil else sent(refused, progress) end
  end
  local elapsed = now() - start

  local verdict = classify.outcome(res, err, self, is_table and req or nil)
  local outcome = verdict and verdict.class or "ok"
  local series = self.outcomes[outcome]
  if not series then
    series = calls_total:labels({ provider = self.name, outcome = outcome })
    self.outcomes[outcome] = series
  end
  series:inc()
  self.call_time:observe(elapsed)
  -- (the series of a model, operation and error type seen before: found here, no call)
  local error_type = verdict and outcome or false
  local by_op = self.operation_series
  by_op = by_op and by_op[model or "unknown"]
  local by_error = by_op and by_op[op]
  series = by_error and by_error[error_type] or operation_series(self, model, error_type, op)
  series:observe(elapsed)
  local res_table = type(res) == "table"
  if bucket or token_bucket then
    local more = token_bucket and (used_tokens(res) or (verdict and 0) or tokens) - tokens or 0
    -- resil.http.request's response itself (a table request's): a bucket reads its raw header
    -- lines, and res.headers is not built for it; a request function's answer: its headers
    local headers = res_table and (is_table and res or res.headers) or nil
    if self.shared_limits and not verdict and (more ~= 0 or headers) then
      resil.spawn(correct_buckets, self, more, headers) -- (store operations: the answer does not wait for them)
    elseif more == 0 and not token_bucket then -- (correct_buckets' one step here: no call)
      if headers then bucket:observe(headers) end
    else
      correct_buckets(self, more, headers)
    end
  end
  if br then
    if guard then guard.done = true end
    -- (whether it was a probe: one let through before the breaker opened is not taken for it)
    if verdict and verdict.client_fault then
      br:record(nil, elapsed, probe or false, round) -- says nothing of the provider
    elseif not verdict and res_table and res.breaker_later == true then
      -- an open stream (a request function's answer that says so, policies.ai's): its outcome is its
      -- end's, told by its reader with these (a probe's slot held till then, probe_timeout bounding it)
      res.breaker_later = { br = br, elapsed = elapsed, probe = probe or false, round = round }
    else
      br:record(not (verdict and verdict.breaker), elapsed, probe or false, round)
    end
  end
  if key and refused and type(res) == "table" and type(res.status) == "number" and res.status >= 200
    and res.status < 300 then
    mark_replayed(refused, key)
  end
  if verdict then
    if refused and verdict.class == "invalid_output" and type(res) == "table" and type(res.status) == "number" then
      refused[#refused + 1] = res
      refused.answers = (refused.answers or 0) + 1
    elseif refused and res == nil and type(err) == "table" and math.type(err.received) == "integer" then
      -- a 2xx whose body was cut (or timed out, or ran past max_body): answered, so billed
      refused[#refused + 1] = { cut = true, status = err.status, received = err.received, key = key }
    end
    local e = classify.error(verdict, { provider = self.name, response = type(res) == "table" and res or nil })
    if span then
      e.trace_id, e.span_id = span.trace_id, span.span_id -- for the retry's log line
      finish_span(span, res, e)
    end
    return nil, e
  end
  if span then finish_span(span, res) end
  return res
end

-- An attempt classifies its own outcome (and validates its answer): an
-- answer it returns is a success, and an error it returns carries its
-- verdict. The retry need not validate the answer again.
local function classified(res, err, opts)
  if err == nil then return nil end
  return classify.outcome(res, err, opts)
end

-- provider:attempts(req, deadline [, refused [, give_up]]) -> res | nil,
-- err: retries, no fallback; `refused` (a list) gets each answer the
-- validator refused; give_up (fn() -> a reason | nil): policies.retry's,
-- no attempt starts once it says one
-- deadline false: no attempt is cut by a deadline, the retries still end at the retry options'
-- (a job's create or a speech: cut short, a job was made that no one knows of, or an answer billed
-- and not read)
function Provider:attempts(req, deadline, refused, give_up)
  local opts = self.retry_opts
  if not refused and (self.idempotency or type(req) == "table" and req.idempotency_key) then
    refused = {} -- (counted for the key, see sent_key)
  end
  -- (the retry options' own deadline, timeout and give_up when the call has none: each attempt's too,
  -- as r.bounded says; given the retries only, an attempt under way ran its own timeout past it)
  local retries_until = deadline or opts.deadline or (opts.timeout and now() + opts.timeout)
  if deadline == nil then deadline = retries_until elseif deadline == false then deadline = nil end
  give_up = give_up or opts.give_up
  return retry.attempts(attempt, opts, retries_until, give_up, self, req, deadline, refused, give_up)
end

local function invoke(self, req)
  local deadline = self.deadline and now() + self.deadline
  if self.chain then return self.chain(req, deadline) end
  local res, err = Provider.attempts(self, req, deadline)
  if res == nil then return nil, err end
  return res, nil, self.info
end
call.invoke = invoke

-- what resil.http.request reads of a request (README, HTTP), and the key a call sends
local REQUEST_LIST = "url, method, headers, body, json, timeout, connect_timeout, idle_timeout, max_body, " ..
  "http_version, ca_file, insecure, follow_redirects, on_chunk, on_event, max_event, progress, cancel_grace, " ..
  "idempotency_key"
local REQUEST_KEYS = {}
for k in REQUEST_LIST:gmatch("[%w_]+") do REQUEST_KEYS[k] = true end

-- A call's request field that is a slip of one resil.http.request reads (header, timout, jsn) | nil, and
-- that field. (It was ignored: `header = {authorization = ...}` sent none, `timout = 5` left the 60 s
-- default. A field of the caller's own, which its validator reads with the request, is let be.)
local distance = require "resil.edit_distance"
local function misspelt_field(req)
  for k in pairs(req) do
    if type(k) == "string" and not REQUEST_KEYS[k] then
      for known in pairs(REQUEST_KEYS) do
        if distance(k, known) <= (#k <= 5 and 1 or 2) then return k, known end
      end
    end
  end
end

-- provider(req) -> res, nil, info | nil, err
-- After a reload, providers made by the old version run the new code.
function Provider:__call(req)
  -- (a request that was neither raised "attempt to index a number value (local 'req')", and one
  -- without a url "http request: 'url' is required", each at a line of this file, at every attempt)
  local kind = type(req)
  if kind ~= "table" and kind ~= "function" then
    error(("provider '%s': the request must be a table or a function (attempt, seconds_left), got %s"):format(
      self.name, kind), 2)
  end
  if kind == "table" and req.url == nil and self.request.url == nil then
    error(("provider '%s': no url, in the call's request or the provider's `request`"):format(self.name), 2)
  end
  local slip, meant
  if kind == "table" then slip, meant = misspelt_field(req) end
  if slip then
    error(("provider '%s': request: unknown field '%s', did you mean '%s'? (a request takes %s)"):format(self.name,
      slip, meant, REQUEST_LIST), 2)
  end
  local current = package.loaded["policies.call"]
  if current ~= call and type(current) == "table" and current.invoke then return current.invoke(self, req) end
  return invoke(self, req)
end

-- call.check(name, conf) -> nil | what is wrong with a provider's options, said for the line that
-- gave them (call.provider's, ai.configure's)
-- (a rate, tokens, breaker or concurrency that is not a table raised inside this file or the limits
-- module, 'attempt to index a boolean value'; given to ai.configure, at every call)
local LIMIT_TABLES = { "rate", "tokens", "breaker", "concurrency" }
function call.check(name, conf)
  for _, k in ipairs({ "timeout", "deadline" }) do
    local v = conf[k]
    if v ~= nil and not (type(v) == "number" and v == v and (k == "deadline" or v > 0)) then
      return ("call.provider '%s': %s must be a number of seconds%s, got %s"):format(name, k,
        k == "timeout" and " > 0 (math.huge: none)" or "", type(v) == "string" and ("%q"):format(v) or tostring(v))
    end
  end
  -- (a retry table's deadline is a time on resil.now()'s clock: in options made once it passed for
  -- good, at once on a machine up longer than it, and every call failed "deadline passed before attempt 1")
  if type(conf.retry) == "table" and conf.retry.deadline ~= nil then
    return ("call.provider '%s': retry.deadline is a time on resil.now()'s clock, passed for every call made after "
      .. "it; give the provider's deadline = %s (seconds, each call's) or retry.timeout"):format(name,
      type(conf.retry.deadline) == "number" and ("%g"):format(conf.retry.deadline) or "N")
  end
  for _, k in ipairs(LIMIT_TABLES) do
    local v = conf[k]
    if v ~= nil and v ~= false and type(v) ~= "table" then
      return ("call.provider '%s': %s must be a table of its options (or false: none), got %s"):format(name, k,
        type(v))
    end
  end
  return nil
end

-- call.provider(name, conf) -> a callable provider
local CONF_LIST = "request, timeout, deadline, validate, estimate, idempotency, rate, tokens, breaker, concurrency, " ..
  "retry, fallback, fallback_on, operation"
local CONF_KEYS = {}
for k in CONF_LIST:gmatch("[%w_]+") do CONF_KEYS[k] = true end
function call.provider(name, conf)
  if type(name) ~= "string" then error("call.provider: name must be a string", 2) end
  if type(conf) ~= "table" then error("call.provider: conf must be a table", 2) end
  -- (an option misspelt, retries = 3, was ignored; a table option given otherwise, rate = 500 or
  -- breaker = true, raised inside this file, and fallback = provider, not a list, fell back to nothing)
  for k in pairs(conf) do
    if not CONF_KEYS[k] then
      error(("call.provider '%s': unknown option '%s' (it takes %s)"):format(name, tostring(k), CONF_LIST), 2)
    end
  end
  if conf.operation ~= nil and (type(conf.operation) ~= "string" or conf.operation == "") then
    error(("call.provider '%s': operation must be a name (OpenTelemetry's gen_ai.operation.name: chat, " ..
      "embeddings, generate_content, ...), got %s"):format(name, type(conf.operation)), 2)
  end
  -- (rate, tokens, breaker and concurrency: call.check, with ai.configure's words)
  for _, k in ipairs({ "request", "fallback" }) do
    local v = conf[k]
    if v ~= nil and v ~= false and type(v) ~= "table" then
      error(("call.provider '%s': %s must be a table, got %s"):format(name, k, type(v)), 2)
    end
  end
  -- (a field resil.http.request does not read was ignored: `header = {authorization = ...}` sent none,
  -- which a spec's mock let by and the provider answered 401; `timout = 5` left the 60 s default)
  if type(conf.request) == "table" then
    for k in pairs(conf.request) do
      if not REQUEST_KEYS[k] then
        error(("call.provider '%s': request: unknown field '%s' (a request takes %s)"):format(name, tostring(k),
          REQUEST_LIST), 2)
      end
    end
  end
  if getmetatable(conf.fallback) == Provider then
    error(("call.provider '%s': fallback is a list, { provider, ..., placeholder = v }, not a provider"):format(name), 2)
  end
  -- (placeholdr = "..." was ignored: the call failed where a placeholder was meant)
  for k in pairs(type(conf.fallback) == "table" and conf.fallback or {}) do
    if not (k == "placeholder" or k == "on" or math.type(k) == "integer") then
      error(("call.provider '%s': fallback: unknown field '%s' (a fallback list takes providers, functions, " ..
        "{name=, fn=, on=}, placeholder and on)"):format(name, tostring(k)), 2)
    end
  end
  local on = conf.fallback_on
  if on ~= nil and type(on) ~= "table" and type(on) ~= "function" then
    error(("call.provider '%s': fallback_on must be a list of classes or a function, got %s"):format(name, type(on)), 2)
  end
  -- (a NaN or string timeout or deadline, or a negative timeout, raised 'http request: ...' inside
  -- this file at every call; an unknown validator raised once the request had been made and paid
  -- for, a number 'attempt to call a number value' inside classify.lua. A deadline of 0 or less,
  -- time already spent, is the call's "deadline passed", as it was)
  -- A timeout of 0 set here is every attempt's (resil.http: 0 times out at once), so every call
  -- failed: as curl's option, 0 was likely meant as none, which is math.huge
  local wrong = call.check(name, conf)
  if wrong then error(wrong, 2) end
  local validate = conf.validate
  if validate ~= nil and type(validate) ~= "function" then
    local mt = getmetatable(validate)
    if type(validate) == "string" then
      if classify.validators[validate] == nil then
        local names = {}
        for n in pairs(classify.validators) do names[#names + 1] = n end
        table.sort(names)
        error(("call.provider '%s': no validator named '%s' (one of %s, or a function)"):format(name, validate,
          table.concat(names, ", ")), 2)
      end
    elseif not (type(mt) == "table" and mt.__call) then
      error(("call.provider '%s': validate must be a validator's name or a function, got %s"):format(name,
        type(validate)), 2)
    end
  end
  local self = setmetatable({ name = name, request = conf.request or {}, timeout = conf.timeout,
                              deadline = conf.deadline, validate = conf.validate, estimate = conf.estimate,
                              idempotency = conf.idempotency, operation = conf.operation,
                              outcomes = {}, call_time = call_seconds:labels({ provider = name }),
                              info = { served_by = name } }, Provider)
  if conf.rate then
    local o = {}
    for k, v in pairs(conf.rate) do o[k] = v end
    o.unit = "requests"
    self.bucket = resil.bucket(conf.rate.name or (name .. ":requests"), o)
  end
  if conf.tokens then
    local o = {}
    for k, v in pairs(conf.tokens) do o[k] = v end
    o.unit = "tokens"
    self.token_bucket = resil.bucket(conf.tokens.name or (name .. ":tokens"), o)
    self.estimate = conf.tokens.estimate or conf.estimate
  end
  for _, b in ipairs({ self.bucket or false, self.token_bucket or false }) do
    if b and b:state().shared then self.shared_limits = true end
  end
  if conf.breaker then self.breaker = resil.breaker(conf.breaker.name or name, conf.breaker) end
  if conf.concurrency then
    local sem = resil.semaphore(conf.concurrency.name or name, conf.concurrency)
    self.semaphore = sem
    self.permit_timeout = conf.concurrency.timeout
    self.releaser = setmetatable({}, { __close = function() sem:release() end })
  end
  if conf.retry ~= nil then
    local wrong = retry.check(conf.retry)
    if wrong then error(("call.provider '%s': %s"):format(name, wrong), 2) end
  end
  local r = {}
  for k, v in pairs(conf.retry or {}) do r[k] = v end
  r.provider = name
  r.validate = conf.validate
  r.bounded = true -- every wait in an attempt is cut at the deadline
  r.classify = r.classify or classified
  self.retry_opts = r

  if conf.fallback then
    local strategies = { { name = name, on = conf.fallback.on,
                           fn = function(req, deadline) return self:attempts(req, deadline) end } }
    for i, f in ipairs(conf.fallback) do
      if getmetatable(f) == Provider then
        -- (its own deadline bounds its part, within what is left of the chain's: it was ignored, and a
        -- fallback whose deadline was 10 s held the call four attempts of a minute each)
        strategies[i + 1] = { name = f.name, on = f.fallback_on, fn = function(req, deadline)
          local own = f.deadline and now() + f.deadline
          if own and (deadline == nil or own < deadline) then deadline = own end
          return f:attempts(req, deadline)
        end }
      elseif type(f) == "function" then
        strategies[i + 1] = { name = "fallback " .. i, fn = f }
      elseif type(f) == "table" and type(f.fn) == "function" then
        strategies[i + 1] = f
      else
        error(("call.provider '%s': fallback %d must be a provider, a function or {name=, fn=}"):format(name, i), 2)
      end
    end
    strategies.placeholder = conf.fallback.placeholder
    -- (its mistakes, a strategy's `on` that is a string, said at this line: they named call.lua's)
    local made, chain = pcall(fallback.chain, strategies)
    if not made then
      error(("call.provider '%s': %s"):format(name, tostring(chain):gsub("^[^\n]-:%d+: ", "", 1)), 2)
    end
    self.chain = chain
  end
  self.fallback_on = conf.fallback_on
  return self
end

return call
