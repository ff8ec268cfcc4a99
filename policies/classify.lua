-- policies/classify.lua: what an outcome means and what to do about it.
--
-- classify.outcome(res, err, opts) turns a provider call's result into a
-- verdict: nil for success, else
--   { class, retryable, backoff, max_retries, fallback, breaker,
--     reason, status, kind, retry_after }
-- The rules are data. Change them from a project policy file (a policy reload
-- loads this module afresh and runs that file again; a change the main script
-- made is gone after the first reload) or from a pipeline that never reloads:
--   classify.status[409] = { class = "conflict", retryable = true, backoff = "constant", max_retries = 2 }
--   classify.validators.summary = function(res) ... return nil, "why" end
-- `fallback = true` marks outcomes that a fallback chain moves on from;
-- `breaker = true` marks outcomes that are the provider's fault and count
-- against its circuit breaker.
local resil = require "resil"

local classify = {}

-- By HTTP status. "5xx"/"4xx" cover the statuses not listed one by one.
classify.status = {
  [400] = { class = "bad_request", retryable = false },
  [401] = { class = "auth", retryable = false },
  [403] = { class = "auth", retryable = false },
  [404] = { class = "not_found", retryable = false, fallback = true },
  [408] = { class = "timeout", retryable = true, backoff = "immediate", max_retries = 3, breaker = true },
  [413] = { class = "too_large", retryable = false, fallback = true },
  [422] = { class = "bad_request", retryable = false },
  [429] = { class = "rate_limited", retryable = true, backoff = "exponential", max_retries = 5, fallback = true },
  [529] = { class = "overloaded", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
            breaker = true },
  ["5xx"] = { class = "server_error", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
              breaker = true },
  ["4xx"] = { class = "client_error", retryable = false },
  -- a redirect where a validated answer was wanted (an http:// base_url that moved to https://, a
  -- proxy's login page): the configuration's fault, which a retry does not cure
  ["3xx"] = { class = "redirect", retryable = false, fallback = true },
}

-- By the error kinds of resil.http and the host's own primitives.
classify.kinds = {
  timeout = { class = "timeout", retryable = true, backoff = "immediate", max_retries = 3, fallback = true,
              breaker = true },
  connect = { class = "unavailable", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
              breaker = true },
  dns = { class = "unavailable", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
          breaker = true },
  reset = { class = "unavailable", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
            breaker = true },
  protocol = { class = "protocol", retryable = true, backoff = "exponential", max_retries = 1, fallback = true,
               breaker = true },
  tls = { class = "tls", retryable = false, fallback = true },
  too_large = { class = "too_large", retryable = false, fallback = true },
  canceled = { class = "canceled", retryable = false },
  rate_limited = { class = "rate_limited", retryable = true, backoff = "exponential", max_retries = 5,
                   fallback = true },
  circuit_open = { class = "circuit_open", retryable = false, fallback = true },
  bulkhead_full = { class = "bulkhead_full", retryable = false, fallback = true },
  invalid_output = { class = "invalid_output", retryable = true, backoff = "constant", max_retries = 2,
                     fallback = true },
  invalid_json = { class = "invalid_output", retryable = true, backoff = "constant", max_retries = 2,
                   fallback = true },
  deadline = { class = "deadline", retryable = false },
  -- a stream that broke after its first delta: the text so far is on the error
  stream_interrupted = { class = "stream_interrupted", retryable = false },
  missing_secret = { class = "auth", retryable = false },
}

-- Provider error bodies, checked before the status rules, first match wins.
-- match(res, body) gets the response and its decoded JSON body (or nil).
local function error_field(body, field)
  local e = type(body) == "table" and body.error
  return type(e) == "table" and e[field] or nil
end

classify.bodies = {
  -- OpenAI: out of credit is a 429 that no wait cures
  { name = "insufficient_quota",
    match = function(_, body)
      return error_field(body, "code") == "insufficient_quota" or error_field(body, "type") == "insufficient_quota"
    end,
    verdict = { class = "quota", retryable = false, fallback = true } },
  -- a model the provider does not serve (retired, misspelt) said with a 400, not a 404: OpenAI's
  -- Responses API and OpenAI-compatible servers send {"error": {"code": "model_not_found"}} so.
  -- As a 400 it was the caller's bad request: no fallback, every call of a retired pin failed
  { name = "model_not_found",
    match = function(_, body) return error_field(body, "code") == "model_not_found" end,
    verdict = { class = "not_found", retryable = false, fallback = true } },
  -- Anthropic: a rate limit says when to come back (retry-after); a spend
  -- limit is a 429 that does not
  { name = "anthropic_spend_limit",
    match = function(res, body)
      return res.status == 429 and error_field(body, "type") == "rate_limit_error"
        and (res.headers or {})["retry-after"] == nil
    end,
    verdict = { class = "quota", retryable = false, fallback = true } },
  -- Anthropic: an account out of credit, a 402 billing_error or a 400 that says so in its
  -- message only ("Your credit balance is too low to access the Anthropic API. ..."): as OpenAI's
  -- insufficient_quota, a person's to fix, and another provider's to serve meanwhile
  { name = "anthropic_billing",
    match = function(_, body)
      local msg = error_field(body, "message")
      return error_field(body, "type") == "billing_error" or error_field(body, "type") == "invalid_request_error"
        and type(msg) == "string" and msg:find("credit balance is too low", 1, true) ~= nil
    end,
    verdict = { class = "quota", retryable = false, fallback = true } },
  -- (Anthropic says it in its message only: "prompt is too long: 210000 tokens > 200000
  -- maximum", "input length and `max_tokens` exceed context limit: ...")
  { name = "context_length",
    match = function(_, body)
      if error_field(body, "code") == "context_length_exceeded"
        or error_field(body, "type") == "context_length_exceeded" then return true end
      local msg = error_field(body, "message")
      return error_field(body, "type") == "invalid_request_error" and type(msg) == "string"
        and (msg:find("^prompt is too long") ~= nil or msg:find("exceed context limit", 1, true) ~= nil)
    end,
    verdict = { class = "context_length", retryable = false, fallback = true } },
  { name = "content_policy",
    match = function(_, body)
      local code, etype = error_field(body, "code"), error_field(body, "type")
      return code == "content_policy_violation" or code == "content_filter" or etype == "content_policy_violation"
    end,
    verdict = { class = "content_policy", retryable = false, fallback = true } },
  { name = "anthropic_overloaded",
    match = function(_, body) return error_field(body, "type") == "overloaded_error" end,
    verdict = { class = "overloaded", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
                breaker = true } },
  { name = "anthropic_rate_limit",
    match = function(_, body) return error_field(body, "type") == "rate_limit_error" end,
    verdict = { class = "rate_limited", retryable = true, backoff = "exponential", max_retries = 5,
                fallback = true } },
}

-- Async-job and speech providers (policies/providers/replicate.lua, fal.lua, elevenlabs.lua).
local function header(res, name) return type(res.headers) == "table" and res.headers[name] or nil end
local function eleven_code(body)
  local d = type(body) == "table" and body.detail
  return type(d) == "table" and (d.code or d.status) or nil
end
local FAL_RETRYABLE = { request_timeout = "timeout", startup_timeout = "timeout",
  runner_scheduling_failure = "unavailable", runner_connection_timeout = "unavailable",
  runner_disconnected = "unavailable", runner_connection_refused = "unavailable",
  runner_connection_error = "unavailable", runner_incomplete_response = "server_error",
  runner_server_error = "server_error", internal_error = "server_error" }
for _, rule in ipairs({
  -- Replicate: 429 {"title": "Request was throttled", "detail": "Request was throttled. Expected ..."}
  { name = "replicate_throttled",
    match = function(res, body)
      return res.status == 429 and type(body) == "table" and type(body.detail) == "string"
        and body.detail:find("throttled", 1, true) ~= nil
    end,
    verdict = { class = "rate_limited", retryable = true, backoff = "exponential", max_retries = 5,
                fallback = true } },
  -- Replicate: 402 Insufficient credit (adding credit is a person's job)
  { name = "replicate_insufficient_credit",
    match = function(res, body)
      return res.status == 402 and type(body) == "table" and type(body.title) == "string"
    end,
    verdict = { class = "quota_exceeded", retryable = false, fallback = true } },
  -- fal: an account out of balance, 403 {"detail": "User is locked. Reason: Exhausted balance. Top up
  -- ..."} (topping it up is a person's job; the key is good: not auth, which a fallback stops at)
  { name = "fal_exhausted_balance",
    match = function(res, body)
      return res.status == 403 and type(body) == "table" and type(body.detail) == "string"
        and body.detail:find("Exhausted balance", 1, true) ~= nil
    end,
    verdict = { class = "quota_exceeded", retryable = false, fallback = true } },
  -- fal: X-Fal-Error-Type names the infrastructure failures worth another try
  { name = "fal_runner_error",
    match = function(res) return FAL_RETRYABLE[header(res, "x-fal-error-type") or ""] ~= nil end,
    verdict = { class = "server_error", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
                breaker = true } },
  { name = "fal_client_cancelled",
    match = function(res) return header(res, "x-fal-error-type") == "client_cancelled" end,
    verdict = { class = "canceled", retryable = false } },
  { name = "fal_bad_request",
    match = function(res) return header(res, "x-fal-error-type") == "bad_request" end,
    verdict = { class = "bad_request", retryable = false } },
  -- ElevenLabs: {"detail": {"status"|"code": ...}}
  { name = "elevenlabs_quota_exceeded",
    match = function(_, body) return eleven_code(body) == "quota_exceeded" end,
    verdict = { class = "quota_exceeded", retryable = false, fallback = true } },
  { name = "elevenlabs_concurrent_limit",
    match = function(_, body)
      local code = eleven_code(body)
      return code == "concurrent_limit_exceeded" or code == "too_many_concurrent_requests"
    end,
    verdict = { class = "rate_limited", retryable = true, backoff = "exponential", max_retries = 5,
                fallback = true } },
  { name = "elevenlabs_system_busy",
    match = function(_, body) return eleven_code(body) == "system_busy" end,
    verdict = { class = "overloaded", retryable = true, backoff = "exponential", max_retries = 3, fallback = true,
                breaker = true } },
}) do classify.bodies[#classify.bodies + 1] = rule end

-- What a job or speech provider's error body says, for the error's message: Replicate's and fal's
-- `detail` (a string, or FastAPI's list of { loc =, msg = }), ElevenLabs' `detail.message`. (Without
-- it a version the provider stopped serving, an input refused or a voice gone said "HTTP 422".)
local function detail_said(body)
  local d = type(body) == "table" and body.detail
  if type(d) == "table" and type(d.message) == "string" then d = d.message end
  if type(d) == "table" and type(d[1]) == "table" and type(d[1].msg) == "string" then
    local loc = {}
    for _, part in ipairs(type(d[1].loc) == "table" and d[1].loc or {}) do
      if type(part) == "string" or math.type(part) then loc[#loc + 1] = tostring(part) end
    end
    d = (#loc > 0 and (table.concat(loc, ".") .. ": ") or "") .. d[1].msg
  end
  if type(d) ~= "string" or d == "" then return nil end
  -- (redacted before it is cut: a key the provider echoed across the cut was no longer the
  -- secret, and its first bytes were in the message)
  d = resil.redact(d)
  return #d > 200 and (d:sub(1, 200) .. "...") or d
end

-- Anything no rule names: one retry.
classify.unknown = { class = "unknown", retryable = true, backoff = "exponential", max_retries = 1 }

-- Output validators: fn(res) -> true | nil, reason. A 200 whose output fails
-- becomes a retryable invalid_output.
local function decoded(res)
  if res.data == nil then
    local data, err = resil.json.decode(res.body or "")
    if data == nil then return nil, "body is not JSON: " .. tostring(err and err.message) end
    res.data = data
  end
  return res.data
end
classify.decoded = decoded

local function looks_like_url(s)
  return type(s) == "string" and s:match("^https?://[%w%.%-_]+[:%d]*[/%?#]?") ~= nil
end
classify.looks_like_url = looks_like_url

classify.validators = {
  json = function(res)
    local data, why = decoded(res)
    if data == nil then return nil, why end
    return true
  end,
  -- OpenAI-style chat completion with a non-empty message
  chat = function(res)
    local data, why = decoded(res)
    if data == nil then return nil, why end
    local choice = type(data) == "table" and type(data.choices) == "table" and data.choices[1]
    local message = type(choice) == "table" and choice.message
    local content = type(message) == "table" and message.content
    if type(content) ~= "string" then return nil, "no choices[1].message.content" end
    if content:match("^%s*$") then return nil, "empty content" end
    return true
  end,
  -- Anthropic messages: content[1].text non-empty
  anthropic = function(res)
    local data, why = decoded(res)
    if data == nil then return nil, why end
    local block = type(data) == "table" and type(data.content) == "table" and data.content[1]
    local text = type(block) == "table" and block.text
    if type(text) ~= "string" or text:match("^%s*$") then return nil, "no content[1].text" end
    return true
  end,
  -- an async job's final state with an output URL
  prediction = function(res)
    local data, why = decoded(res)
    if data == nil then return nil, why end
    if type(data) ~= "table" or type(data.status) ~= "string" then return nil, "no status field" end
    if data.status == "succeeded" then
      local out = data.output
      if type(out) == "table" then out = out[1] end
      if not looks_like_url(out) then return nil, "output is not a URL: " .. tostring(out) end
    end
    return true
  end,
}

-- an error at the caller's line: the first frame outside the policy library and the host
local LIBRARY = { ["retry.lua"] = true, ["classify.lua"] = true, ["call.lua"] = true, ["fallback.lua"] = true,
  ["limit.lua"] = true, ["ai.lua"] = true, ["jobs.lua"] = true, ["gateway.lua"] = true }
local function raise_at_caller(msg)
  for level = 2, 60 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.currentline > 0 and info.source:sub(1, 7) ~= "=[resil" and not LIBRARY[info.source:match("[^/\\]+$")] then
      error(("%s:%d: %s"):format(info.short_src, info.currentline, msg), 0)
    end
  end
  error(msg, 0)
end

-- where a rule that is no verdict is kept, for the error that names it
local function rule_named(rule)
  for k, v in pairs(classify.status) do
    if v == rule then return ("classify.status[%s]"):format(type(k) == "string" and ("%q"):format(k) or tostring(k)) end
  end
  for k, v in pairs(classify.kinds) do
    if v == rule then return ("classify.kinds.%s"):format(tostring(k)) end
  end
  for i, b in ipairs(classify.bodies) do
    if type(b) == "table" and b.verdict == rule then return ("classify.bodies[%d] (%s)"):format(i, tostring(b.name)) end
  end
  return rule == classify.unknown and "classify.unknown" or "a classify rule"
end

-- (a rule without a class, { retryable = true }, raised 'classify.lua: bad argument #1 to 'error'', and
-- one that is no table 'bad argument #1 to 'for iterator'', naming neither the rule nor the caller)
local function verdict_of(rule, reason, status, kind, retry_after)
  if type(rule) ~= "table" then
    raise_at_caller(("classify: %s is %s, not a verdict {class = \"...\", retryable = true|false, ...}"):format(
      rule_named(rule), type(rule) == "string" and ("%q"):format(rule) or tostring(rule)))
  end
  local v = {}
  for k, x in pairs(rule) do v[k] = x end
  if type(v.class) ~= "string" then
    raise_at_caller(("classify: %s has class %s, not a name: a verdict is {class = \"...\", retryable = true|false, ...}")
      :format(rule_named(rule), tostring(v.class)))
  end
  v.reason, v.status, v.kind, v.retry_after = reason, status, kind, retry_after
  return v
end

local function status_rule(status)
  local rule = classify.status[status]
  if rule then return rule end
  if status >= 500 then return classify.status["5xx"] end
  if status >= 400 then return classify.status["4xx"] end
  return nil
end

-- a decoded 2xx body that is the API's error object and no answer (no usage, choices or content):
-- the provider's failure, not something it made and billed (ai.stream's whole-body reading asks too)
function classify.only_error(body)
  return type(body) == "table" and type(body.error) == "table" and body.usage == nil and body.choices == nil and
    body.content == nil
end

-- validate(res, req)'s two values, and how many it gave. Nothing is nil, the answer refused, as Lua
-- reads it (`if good(res) then return true end` refuses so); but a function of one's own that ends
-- without `return true` refuses every answer, each sent again and paid, then the fallback's: said
-- once per validator, in a warn line naming where it is defined. (Raised, as a first version did,
-- the first refusal failed the call after its answer was paid.)
-- (an answer taken is counted as one value: only a refusal's count is asked of select)
local function counted(...)
  local ok, why = ...
  if ok then return 1, ok, why end
  return select("#", ...), ok, why
end
local said_nothing = setmetatable({}, { __mode = "k" })
local function validated(validate, res, req)
  local n, ok, why = counted(validate(res, req))
  if n == 0 and not said_nothing[validate] then
    said_nothing[validate] = true
    local info = type(validate) == "function" and debug.getinfo(validate, "S")
    resil.log.warn("classify: a validator returned nothing: the answer is taken as refused (return true for an answer " ..
      "it takes, nil and why for one it refuses)", { validator = info and ("%s:%d"):format(info.short_src,
      info.linedefined) or tostring(validate) })
  end
  return ok, why
end

-- the validators given as functions, met before: a provider's, asked on every answer, is not
-- asked its type() again (a name is looked up in classify.validators each time)
local validator_functions = setmetatable({}, { __mode = "k" })

-- classify.outcome(res, err [, opts [, req]]) -> nil (success) | verdict
-- opts.validate: a validator name or function for 2xx responses, called as validate(res, req):
-- req the request the answer is to (a table call's), for a validator whose verdict depends on it.
function classify.outcome(res, err, opts, req)
  if err ~= nil then
    -- an error built by classify.error carries its verdict
    if type(err) == "table" and err.class ~= nil and err.retryable ~= nil then return err end
    if type(err) ~= "table" then
      return verdict_of(classify.unknown, tostring(err), nil, nil, nil)
    end
    local rule = classify.kinds[err.kind] or classify.unknown
    local v = verdict_of(rule, err.message or err.kind, err.status, err.kind, err.retry_after)
    if err.client_fault then -- libcurl lost the reply (not the provider's doing): neither breaker nor retry budget
      v.breaker, v.client_fault = nil, true
    end
    -- the error's own word that no retry cures it (a bucket asked for more than its burst: retried
    -- five times, 15 s of backoff before the fallback)
    if err.retryable == false then v.retryable = false end
    return v
  end
  -- a status that is no HTTP status (NaN, 503.5, 0, or "503" as a string) is a malformed response, a
  -- failure of class protocol: "503" counted as a success, NaN raised a format error here. A string
  -- status that is not three digits ("succeeded") is a value's own field, not HTTP's, as before.
  -- (each type asked once: a type() call is some 300 instructions, and this runs on every answer)
  local is_table = type(res) == "table"
  local st = is_table and res.status
  local st_type = st == 200 and "number" or type(st) -- (200, most answers' status, is a number: no type() call)
  -- (st % 1 == 0: a whole number, as math.type and math.floor said, without their calls; NaN and
  -- the infinities fail it or the range)
  if st_type == "number" and not (st >= 100 and st <= 599 and st % 1 == 0) or
      st_type == "string" and st:match("^%s*%d%d%d%s*$") then
    return verdict_of(classify.kinds.protocol, ("status %s is not an HTTP status (an integer from 100 to 599)"):format(
      st_type == "string" and ("%q"):format(st) or tostring(st)), nil, "protocol")
  end
  if not is_table or st_type ~= "number" then
    -- not an HTTP response: a function validator may still check the value
    local validate = opts and opts.validate
    if type(validate) ~= "function" then return nil end
    local ok, why = validated(validate, res, req)
    if ok then return nil end
    return verdict_of(classify.kinds.invalid_output, why or "output failed validation", nil, "invalid_output")
  end
  local status = res.status
  if status >= 200 and status < 300 then
    local validate = opts and opts.validate
    if validate == nil then return nil end
    if not validator_functions[validate] then
      local kind = type(validate)
      if kind == "string" then
        local name = validate
        validate = classify.validators[name]
        if validate == nil then raise_at_caller(("classify: no validator named '%s'"):format(name)) end
      elseif kind == "function" then
        validator_functions[validate] = true
      end
    end
    local ok, why = validated(validate, res, req)
    if ok then return nil end
    -- a 2xx whose body is the API's error and no answer (an OpenAI-compatible server's 200 with
    -- {"error": {...}}, no usage): the provider's failure, not an answer it made and billed; as
    -- invalid output it was recorded as a paid answer at its estimate, each attempt
    local body = res.data
    if classify.only_error(body) then
      local said = error_field(body, "message")
      said = type(said) == "string" and said:sub(1, 300) or nil
      return verdict_of(classify.status["5xx"], ("HTTP %d whose body is an error%s"):format(status,
        said and (": " .. said) or ""), status, "server_error")
    end
    return verdict_of(classify.kinds.invalid_output, why or "output failed validation", status, "invalid_output")
  end
  if status < 400 then
    -- 1xx/3xx: the caller asked for them, unless it wants an answer to validate (a 301 from an
    -- http:// base_url was taken for one, and ai.chat raised 'attempt to index a nil value')
    if opts == nil or opts.validate == nil then return nil end
    local location = type(res.headers) == "table" and res.headers.location
    return verdict_of(classify.status["3xx"], ("HTTP %d%s"):format(status,
      type(location) == "string" and (": redirected to " .. location:sub(1, 200)) or ""), status)
  end
  local headers = res.headers or {}
  local retry_after = resil.retry_after(headers)
  local body = res.body and res.body ~= "" and resil.json.decode(res.body) or nil
  local v
  for i, rule in ipairs(classify.bodies) do
    local match = rule.match
    if match == nil then -- (a rule added with its match misspelt raised 'attempt to call a nil value' here, every failure)
      raise_at_caller(("classify: classify.bodies[%d] (%s) has no match function: a rule is {name =, match = " ..
        "fn(res, body), verdict = {...}}"):format(i, tostring(rule.name)))
    end
    if match(res, body) then
      -- (with a job or speech provider's `detail`: "402 replicate_insufficient_credit" alone left
      -- unsaid what the provider said to do; a chat provider's says it in error.message: "400
      -- model_not_found" alone named no model, "429 anthropic_rate_limit" no limit, "529
      -- anthropic_overloaded" nothing a gateway's client could read)
      local said = detail_said(body)
      if said == nil then
        said = error_field(body, "message")
        if type(said) == "string" and said == "" then said = nil end
      end
      said = type(said) == "string" and said:sub(1, 300) or nil
      v = verdict_of(rule.verdict, ("%d %s%s"):format(status, rule.name, said and (": " .. said) or ""), status, nil,
        retry_after)
      break
    end
  end
  if not v then
    -- (a message that is no string was said as "table: 0x55..." or "5.0"; a proxy's {"error": "..."} or
    -- {"message": "..."} went unsaid)
    local message = error_field(body, "message")
    if type(message) ~= "string" then
      local b = type(body) == "table" and body or {}
      message = type(b.error) == "string" and b.error or type(b.message) == "string" and b.message or nil
    end
    message = message or detail_said(body)
    v = verdict_of(status_rule(status), ("HTTP %d%s"):format(status, message and (": " .. tostring(message)) or ""),
      status, nil, retry_after)
  end
  -- the provider's own word on retrying (Anthropic, OpenAI: x-should-retry)
  local should = headers["x-should-retry"]
  if should == "false" then v.retryable = false
  elseif should == "true" and not v.retryable then v.retryable, v.max_retries = true, v.max_retries or 2 end
  return v
end

-- classify.error(verdict [, extra]) -> an error value for the caller
-- The error carries the verdict's fields, so later layers (retry, fallback)
-- read the verdict from it instead of classifying again.
function classify.error(verdict, extra)
  local fields = {}
  for k, v in pairs(verdict) do fields[k] = v end
  fields.reason = nil
  for k, v in pairs(extra or {}) do fields[k] = v end
  local kind = verdict.kind or verdict.class
  return resil.error(kind, verdict.reason or verdict.class, fields)
end

return classify
