-- policies/gateway.lua: the handler of `resil-lua gateway`, an OpenAI- and
-- Anthropic-compatible HTTP API in front of policies.ai, so any app gets the
-- same retries, fallbacks, breakers, limits, budgets and cost ledger by
-- changing its base URL.
--
--   resil-lua gateway --listen 127.0.0.1:8080 --config gateway.lua
--
--   -- gateway.lua (the config, plain Lua run before serving):
--   local ai = require "policies.ai"
--   ai.configure("openai", { rate = { rate = 500, per = 60 }, breaker = { failure_rate = 0.5 } })
--   return {
--     models = {                                   -- what clients may name in `model`
--       ["chat-fast"] = { model = "openai/gpt-4o-mini", fallback = { "anthropic/claude-haiku-4-5" } },
--       ["chat-best"] = "anthropic/claude-sonnet-4-5-20250929",
--     },
--     auth = true,          -- virtual keys (resil-lua keys add); false: no key needed (development)
--   }
--
-- Endpoints: POST /v1/chat/completions (OpenAI; streaming and not), POST
-- /v1/messages (Anthropic), POST /v1/embeddings (OpenAI), GET /v1/models, GET /health, GET /metrics. A
-- `model` is an alias from the config's `models`, an alias of the model
-- registry (policies/models.lua: pins, fallbacks, deployments, migrations),
-- "provider/model", or a bare name for the endpoint's own provider (openai on
-- /v1/chat/completions, anthropic on /v1/messages). GET /v1/models lists the
-- config's and the registry's aliases. Copy this file into your project's
-- policies/ to change it.
local resil = require "resil"
-- (a key's budget, "key:NAME", buckets, "gateway:<id>:rpm"..., and permits: names reserved for the host
-- under the sandbox, which hands this chunk their constructors, prelude's owning_loader; a copy a
-- script loads itself has the resil table's, refused there under the sandbox)
local host_limits = select(3, ...) or { budget = function(...) return resil.budget(...) end,
  bucket = function(...) return resil.bucket(...) end, semaphore = function(...) return resil.semaphore(...) end }
local ai = require "policies.ai"
local pricing = require "policies.pricing"
local classify = require "policies.classify"
local access = require "policies.gateway_access"
local keys = require "resil.keys"

local json = resil.json
local null = json.null

local gateway = {}
-- sizes, counts and seconds the gateway is tuned by, each set (and said why) where it is used
-- (fields, not locals: a main chunk holds at most 200 locals, and a project's copy adds its own)
local TUNED = {}

-- the config's defaults; the config in force is kept across a policy reload (--watch, SIGHUP),
-- and the config file, when the gateway was started with one, runs again at each (the end of
-- this file)
local function config_defaults()
  return {
    models = {},
    auth = true,
    key_cache = 2,        -- seconds a key's record is kept in memory (a revoke takes at most this long)
    -- An answer does not wait for its ledger row (or its budget's settle):
    -- the row is committed with the store's next group commit, within 2 ms
    -- unless another process holds the write lock, and synced to the disk
    -- some 10 ms later. A crash of the gateway loses the rows not
    -- committed yet, as it would lose a call answered by the provider an
    -- instant before; stopping it commits them. ledger_wait = true makes
    -- answers wait for the commit, and ledger_sync = true (with it) for the
    -- disk, as pipelines do.
    ledger_wait = false,
    ledger_sync = false,
    -- SIGTERM (or SIGINT) stops the gateway gracefully: it stops accepting,
    -- answers requests on connections already open with a 503 and
    -- Connection: close, and waits this many seconds at most for the
    -- requests in flight (their answers, their ledger rows) before it ends
    drain_timeout = 20,
    -- bytes of an embeddings answer kept under its Idempotency-Key; a larger one is
    -- served once, and its retries get a 409 (never called and billed again)
    idempotency_keep_max = 8 * 1024 * 1024,
    -- a string: GET /metrics answers only a bearer of it (nil: open)
    metrics_key = nil,
    -- one "access" line per request at info (false: none): as its answer is made, or as its
    -- stream ends
    access_log = true,
  }
end
-- (path: the config file serve ran; shared_limits: set by serve for --workers)
local kept = resil.keep("policies.gateway.kept", function() return { config = config_defaults() } end)
gateway.config = kept.config

-- (the host's metric constructors and scrape, which prelude's owning_loader hands this chunk: resil.metrics is
-- the scripts', and under the sandbox one that ran first handed out fakes; a copy loaded otherwise
-- has resil.metrics)
local host_metrics = select(4, ...) or resil.metrics
local requests_total = host_metrics.counter("resil_gateway_requests_total",
  "Gateway requests, by route and status")
local request_series = {}

-- request ids: this process's random prefix and a count (unique across workers and restarts);
-- each in its request's log context, so that every line its work logs (a policy's error, a
-- stream cut, a retry) carries the x-request-id its client got (the 500's "its log says where")
local id_prefix, seq = nil, 0
local function request_id()
  id_prefix = id_prefix or resil.crypto.sha256(resil.crypto.random(16)):sub(1, 12)
  seq = seq + 1
  local id = ("req_%s%08x"):format(id_prefix, seq)
  resil.context({ request_id = id })
  return id
end

---------------------------------------------------------------------------
-- the two APIs' shapes

-- OpenAI's error types by status, and Anthropic's
local OPENAI_TYPE = { [400] = "invalid_request_error", [401] = "invalid_request_error", [403] = "permission_error",
  [404] = "invalid_request_error", [408] = "timeout", [409] = "invalid_request_error", [413] = "invalid_request_error",
  [405] = "invalid_request_error", [422] = "invalid_request_error", [429] = "rate_limit_exceeded",
  [500] = "server_error", [502] = "server_error", [503] = "server_error", [504] = "timeout", [529] = "server_error" }
local ANTHROPIC_TYPE = { [400] = "invalid_request_error", [401] = "authentication_error", [402] = "billing_error",
  [403] = "permission_error", [404] = "not_found_error", [405] = "invalid_request_error", [409] = "invalid_request_error",
  [413] = "request_too_large", [422] = "invalid_request_error", [429] = "rate_limit_error",
  [500] = "api_error", [502] = "api_error", [503] = "api_error", [504] = "timeout_error",
  [529] = "overloaded_error" }

-- err (policies' {kind, class, status, retry_after}) -> status, code
local CLASS_STATUS = { rate_limited = 429, quota = 429, quota_exceeded = 429, budget_exceeded = 429,
  overloaded = 529, timeout = 504, deadline = 504, circuit_open = 503, unavailable = 503, bulkhead_full = 503,
  auth = 502, bad_request = 400, context_length = 400, content_policy = 400, too_large = 413,
  not_found = 404, server_error = 502, protocol = 502, invalid_output = 502, tls = 502, canceled = 499 }
-- unpriced: a budgeted key asked for a model nobody priced (often a typo):
-- the client's to fix, and a 5xx would be retried by its SDK
local KIND_STATUS = { budget_exceeded = 429, missing_secret = 500, unpriced = 400, store_unavailable = 503,
  connect = 502, dns = 502, reset = 502, timeout = 504, in_progress = 409, key_reused = 422,
  -- past its sunset with no replacement: gone for good, the client's to change (a 502 was retried by
  -- the SDKs, each retry failing the same)
  model_retired = 404,
  -- the upstream's answer past max_body, or an event of its stream past max_event: the answer was
  -- too large, not the request (a 413, the client's request_too_large, is an SDK's to give up on);
  -- the upstream's own 413 keeps its status above
  too_large = 502 }

local function status_of(err)
  if type(err) ~= "table" then return 502 end
  local up = tonumber(err.status)
  -- the upstream's own answer keeps its status, except its auth trouble:
  -- the gateway's provider key is not the client's fault
  if up and up >= 400 and up ~= 401 and up ~= 403 then return math.tointeger(up) end
  return KIND_STATUS[err.kind] or CLASS_STATUS[err.class] or CLASS_STATUS[err.kind] or 502
end

local function error_reply(api, status, message, o)
  o = o or {}
  local headers = { ["content-type"] = "application/json" }
  for k, v in pairs(o.headers or {}) do headers[k] = v end
  local body
  if api == "anthropic" then
    body = { type = "error", error = { type = o.type or ANTHROPIC_TYPE[status] or "api_error", message = message,
      details = o.details } }
  else
    body = { error = { message = message, type = o.type or OPENAI_TYPE[status] or "server_error",
      param = o.param or null, code = o.code or null } }
  end
  return { status = status, headers = headers, body = json.encode(body) }
end
gateway.error_reply = error_reply

-- a wait of `seconds` as the SDKs read it: Retry-After in whole seconds (at least 1), and
-- retry-after-ms, which both official SDKs read first (a key's limit that frees a request in
-- 0.1 s had each retry wait a whole second) -> headers (a new table, or added to `into`)
local function retry_headers(seconds, into)
  local h = into or {}
  seconds = tonumber(seconds) or 1
  h["retry-after"] = tostring(math.max(1, math.ceil(seconds)))
  h["retry-after-ms"] = tostring(math.max(1, math.ceil(seconds * 1000)))
  return h
end

-- Text made UTF-8, each byte that is not part of a character as U+FFFD. A provider's text that
-- is not (a chunk "ok \xFF\xFE") reached the client as it came, and JSON is UTF-8 (RFC 8259
-- 8.1): Python's json.loads of the bytes, serde, any strict decoder refused the whole answer.
-- (cjson copies such bytes as they are.) Valid text, nearly all, is one scan in C, as it is.
local valid_utf8 = json.utf8

-- an error's message as a client may read it: secrets redacted, the
-- upstream's URL (an internal host, an Azure resource and deployment) named
-- only as "the upstream", and UTF-8
local function public_message(msg)
  -- (a transport error starts "<url>: "; a link in a provider's own message is kept)
  return valid_utf8((resil.redact(tostring(msg)):gsub("%a[%w+.%-]*://[^%s\"']-: ", "the upstream: ")))
end

-- An error ai raised that is the gateway's own failure, not the request's:
-- the host's caps (--max-memory, --max-instructions, --max-task-seconds: a
-- policy that loops) ran out serving it. Logged, with the file:line it ran
-- at: the client's 503 does not say it, and the operator must find it.
local function host_failure(err)
  local text = tostring(err)
  local failed = text:find("not enough memory", 1, true) or text:find("--max-instructions", 1, true)
    or text:find("--max-task-seconds", 1, true)
  if failed then resil.log.error("gateway: the host stopped a request's work", { error = resil.redact(text) }) end
  return failed
end

-- An error a policy raised by accident (a Lua runtime error: a nil indexed
-- or called, a bad argument to a library function), not one it raised on
-- purpose for a request that misused the API: the gateway's fault, never
-- the client's bad request (a 400 no SDK retries, that told the client the
-- policy's own Lua message).
local RUNTIME_ERRORS = { "attempt to ", "bad argument #", "stack overflow", "table index is ",
  "number has no integer representation", "invalid key to 'next'", "'for' initial value", "'for' limit",
  "'for' step", "string length overflow", "C stack overflow" }
local function policy_bug(err)
  local text = tostring(err)
  for _, phrase in ipairs(RUNTIME_ERRORS) do
    if text:find(phrase, 1, true) then return true end
  end
  return false
end

-- -> the error a client gets for it (logged here with its file:line); retryable, so that
-- resil.once keeps nothing under an Idempotency-Key and a retry after the fix is served
local function policy_error(err)
  resil.log.error("gateway: a policy raised an error serving a request", { error = tostring(err) })
  return resil.error("policy_error", "the gateway failed serving this request (a policy error; its log says where)",
    { class = "server_error", status = 500, retryable = true })
end

-- USD with six decimals, through integers (a float format is the costliest
-- conversion on the answer's path): the millionths three digits at a time
-- and whole dollars under 1,000 from tables, not string.format (some 1.8k
-- instructions an answer, for its x-resil-cost-usd)
local DIGITS3, SMALL = {}, {} -- "000" to "999"; "0" to "999"
for i = 0, 999 do DIGITS3[i], SMALL[i] = ("%03d"):format(i), tostring(i) end
local function usd_text(usd)
  local micro = math.floor(usd * 1e6 + 0.5)
  if math.type(micro) ~= "integer" then return ("%d.%06d"):format(micro // 1000000, micro % 1000000) end
  local whole, frac = micro // 1000000, micro % 1000000
  return (SMALL[whole] or whole) .. "." .. DIGITS3[frac // 1000] .. DIGITS3[frac % 1000]
end

-- The upstream's own error for a request it refused as the request's fault
-- (a context overflow, a content policy, a bad parameter, a model it does
-- not have): apps read its message and OpenAI's code and param to shorten a
-- conversation, drop a field or try another model, and the client got only
-- the rule that matched ("400 context_length"). Never for its auth trouble
-- or its limits, which are the gateway's, not the request's.
-- -> { message, code, param, details } (each a string or nil; details a table) | nil
local REQUEST_FAULTS = { [400] = true, [404] = true, [413] = true, [422] = true }
local CLASS_CODE = { context_length = "context_length_exceeded", content_policy = "content_policy_violation" }
-- Anthropic's error.details: its error_code picks the SDK's class (`400 image_dimensions_too_large`
-- is ImageDimensionsTooLargeError, its paths and limit in err.details), which apps catch to resize
-- an image or drop a tool; without it the client got a bare BadRequestError and errorCode null.
-- Kept whole when small and free of secrets, else its error_code alone | nil
local function error_details(d)
  if type(d) ~= "table" or type(d.error_code) ~= "string" or #d.error_code > 100 then return nil end
  local ok, text = pcall(json.encode, d)
  if ok and #text <= 4096 and resil.redact(text) == text and valid_utf8(text) == text then return d end
  return { error_code = valid_utf8(resil.redact(d.error_code)) }
end
local function upstream_error(err, status)
  local res = err.response
  if not REQUEST_FAULTS[status] or tonumber(err.status) ~= status then return nil end
  if res == nil and type(err.upstream_message) == "string" then -- (kept under an Idempotency-Key)
    return { message = err.upstream_message, code = err.upstream_code, param = err.upstream_param,
      details = type(err.upstream_details) == "string" and json.decode(err.upstream_details) or nil }
  end
  if type(res) ~= "table" or type(res.body) ~= "string" then return nil end
  local body = json.decode(res.body)
  local e = type(body) == "table" and body.error
  if type(e) ~= "table" then return nil end
  -- (redacted before it is cut, and the code and param too: the upstream may echo the gateway's
  -- key in any of them; one cut across it was no longer the secret, its first bytes relayed)
  local function text(v, most) return type(v) == "string" and v ~= "" and valid_utf8(resil.redact(v):sub(1, most)) or nil end
  return { message = text(e.message, 2000), code = text(e.code, 100), param = text(e.param, 200),
    details = error_details(e.details) }
end

-- an error from policies.ai as the client's API says it; one ai raised (a
-- string: the request misused the API) is the client's bad request, unless
-- it was the host's own failure
local function ai_error_reply(api, err)
  if type(err) ~= "table" and host_failure(err) then
    -- (a 400 is not retried by SDKs, and its message was the host's)
    return error_reply(api, 503, "the gateway could not serve this request right now; retry shortly",
      { headers = { ["retry-after"] = "1" }, code = "gateway_overloaded" })
  end
  if type(err) ~= "table" and policy_bug(err) then err = policy_error(err) end
  if type(err) ~= "table" then
    local text = tostring(err):gsub("^[^:]*:%d+: ", "")
    -- (a body within the levels read (resil.json.max_depth), deeper once in the other API's shape:
    -- its 400 was "http request: cannot encode 'json': Cannot serialise, excessive nesting (201)")
    if text:find("excessive nesting", 1, true) then
      text = ("the request is nested more than %d levels deep in the shape of the API that serves it")
        :format(json.max_depth or 200)
    end
    return error_reply(api, 400, public_message(text))
  end
  local status = status_of(err)
  local headers = {}
  -- answers refused as invalid output that the provider billed
  if err.cost_usd then headers["x-resil-cost-usd"] = usd_text(err.cost_usd)
  elseif err.cost_unknown then headers["x-resil-cost-usd"] = "unknown" end
  local retry_after = type(err) == "table" and tonumber(err.retry_after)
  if status == 429 or status == 503 or status == 529 then
    retry_headers(retry_after or 1, headers)
  end
  -- answers the provider gave (and billed, priced or not) that the gateway
  -- refused as invalid output, tried again by its policy already: an SDK's
  -- own retries (two by default) would pay for as many again, for answers
  -- as likely to be refused
  if err.class == "invalid_output" then headers["x-should-retry"] = "false" end
  -- an upstream answer too large (its 502 above), which the policy does not try again: an SDK's
  -- retries (a 413 had none) would each be billed for another such answer
  if err.kind == "too_large" and not tonumber(err.status) then headers["x-should-retry"] = "false" end
  -- a failure the gateway's own policy already tried again: its retries spent (or its retry
  -- budget, its deadline) or its fallbacks tried. The SDKs try a 408, 409, 429 or 5xx again, twice
  -- by default, and each of theirs ran the gateway's retries once more: 3 x 4 upstream calls for one
  -- request. Its Retry-After stays, for a client that schedules; a failure tried once (a status
  -- the policy does not retry, retries off) is the SDK's to retry as before.
  if err.gave_up or (tonumber(err.attempts) or 1) > 1 or type(err.errors) == "table" and #err.errors > 1 then
    headers["x-should-retry"] = "false"
  end
  -- the provider refused the gateway's own key (its 401/403, a 502 here): no retry of the
  -- client's changes that, and an SDK's own (two by default, on any 5xx) were each refused the same
  local up_status = tonumber(err.status)
  if up_status == 401 or up_status == 403 or err.class == "auth" then headers["x-should-retry"] = "false" end
  local code
  if type(err) == "table" and (err.kind == "budget_exceeded" or err.class == "quota") then
    headers["x-should-retry"] = "false"
    code = "insufficient_quota"
  elseif type(err) == "table" and err.kind == "unpriced" then
    code = "model_not_priced"
  elseif err.kind == "model_retired" then
    headers["x-should-retry"] = "false"
    code = "model_retired"
  elseif type(err) == "table" and err.kind == "gateway_overloaded" then
    code = "gateway_overloaded"
  elseif err.kind == "policy_error" then
    code = "internal_error"
  elseif status == 429 then
    code = "rate_limit_exceeded" -- (as OpenAI's own 429s; an SDK's error.code reads it)
  end
  local up = upstream_error(err, status) or {}
  -- (a context overflow as OpenAI's code, whichever provider refused it)
  code = code or CLASS_CODE[err.class] or up.code
  -- (a model the upstream does not serve, Anthropic's 404 not_found_error to an OpenAI client: the
  -- code OpenAI's own 404 says, which apps read to tell a retired model from other failures)
  if code == nil and err.class == "not_found" and api == "openai" then code = "model_not_found" end
  local msg = up.message or tostring(err.message or err.kind)
  if err.kind == "store_unavailable" then
    -- (its message names the store's address, or is a bare "Connection reset by peer")
    code, msg = "store_unavailable", "the gateway's store is unavailable right now; retry shortly"
  end
  -- (resil.once's own messages name the gateway's record of the key, its key id included, and
  -- "arguments": the client sent a header and a body)
  if err.kind == "key_reused" then
    msg = "this Idempotency-Key was used with another request body: a retry must send the same body"
  elseif err.kind == "in_progress" then
    msg = "a request with this Idempotency-Key is still being served; retry it shortly"
  end
  return error_reply(api, status, public_message(msg), { headers = headers, code = code, param = up.param,
    details = up.details, -- (Anthropic's shape only: OpenAI's has no place for it)
    -- (Anthropic's own type for its status: a quota's 429 rate_limit_error, its 402 billing_error, its
    -- 400 "credit balance is too low" invalid_request_error; a 400 typed rate_limit_error was backed
    -- off on and tried again by a client that reads error.type)
    type = code == "insufficient_quota" and (api == "anthropic" and (ANTHROPIC_TYPE[status] or "rate_limit_error")
      or "insufficient_quota") or nil })
end

local STOP_REASON = { stop = "end_turn", length = "max_tokens", tool_calls = "tool_use",
  content_filter = "refusal" }

-- Anthropic's own stop_reason when Anthropic answered (stop_sequence, refusal,
-- pause_turn are not all OpenAI's), else the OpenAI finish_reason's
local function stop_reason_of(r)
  if type(r.stop_reason) == "string" and r.stop_reason:match("^[%w_]+$") then return r.stop_reason end
  if type(r.refusal) == "string" and (r.text or "") == "" then return "refusal" end -- (OpenAI's refusal field)
  -- (an answer that ends in tool calls is tool_use, as Anthropic always says it, also where a compatible
  -- server said "stop" (Gemini's, some vLLM's): end_turn ended the SDK's toolRunner, and a client's
  -- loop on stop_reason, with the calls never run)
  local f = r.finish_reason
  if r.tool_calls and r.tool_calls[1] and (f == "stop" or f == nil) then return "tool_use" end
  return STOP_REASON[r.finish_reason] or "end_turn"
end

-- details: with the cached part of the prompt, as OpenAI's own usage says it (an answer
-- translated from Anthropic's cache reads); without: counts that go over a provider's own usage
local function openai_usage(u, details)
  u = u or {}
  local i, o = u.input_tokens or 0, u.output_tokens or 0
  local usage = { prompt_tokens = i, completion_tokens = o, total_tokens = i + o }
  if details and (u.cached_input_tokens or 0) > 0 then
    usage.prompt_tokens_details = { cached_tokens = u.cached_input_tokens }
  end
  return usage
end

local function anthropic_usage(u)
  u = u or {}
  return { input_tokens = (u.input_tokens or 0) - (u.cached_input_tokens or 0) - (u.cache_write_tokens or 0),
    output_tokens = u.output_tokens or 0, cache_read_input_tokens = u.cached_input_tokens or 0,
    cache_creation_input_tokens = u.cache_write_tokens or 0 }
end

local function count(v) return math.tointeger(v) or 0 end

-- the usage of an answer translated for an Anthropic client, with the fields the SDK's Usage
-- types as never absent (code that reads usage.cache_creation's breakdown met undefined)
local function translated_usage(u)
  local usage = anthropic_usage(u)
  local hour = count(u and u.cache_write_1h_tokens)
  usage.cache_creation = { ephemeral_5m_input_tokens = usage.cache_creation_input_tokens - hour,
    ephemeral_1h_input_tokens = hour }
  local searches = count(u and u.web_search_requests)
  usage.server_tool_use = searches > 0 and { web_search_requests = searches } or null
  usage.service_tier, usage.inference_geo, usage.speed, usage.output_tokens_details = null, null, null, null
  return usage
end

local function openai_tool_calls(calls)
  if not calls then return nil end
  local out = {}
  for i, c in ipairs(calls) do
    out[i] = { id = c.id, type = "function", ["function"] = { name = c.name, arguments = c.arguments or "{}" } }
  end
  return out
end

-- OpenAI's finish_reasons; another is said as the nearest of them to an OpenAI client, whose SDK
-- types know these only: Anthropic's pause_turn (normalized "pause": its server tool's loop paused,
-- the turn not done) is "length", an answer cut before its end (as "stop" it said the answer was
-- whole: a silent truncation; docs/decisions.md), a compatible server's own is "stop"
local OPENAI_FINISH = { stop = "stop", length = "length", tool_calls = "tool_calls", content_filter = "content_filter",
  function_call = "function_call", pause = "length" }
local function openai_finish(f)
  return OPENAI_FINISH[f] or "stop"
end
-- a provider's reason that is no string (5, {}, true: garbage the SDKs' enums do not have) -> true;
-- relayed, it is written as the answer translated would say it (ai.chat takes it as unknown).
-- choices: an OpenAI answer's or chunk's, each garbage finish_reason made "stop"
-- (the main chunk is at Lua's 200 locals: one function for both)
local function garbage_reason(f, choices)
  if choices ~= nil then
    if type(choices) ~= "table" then return end
    local i, c = 1, choices[1] -- (to the first nil, as ipairs: no iterator call a choice, on every answer)
    while c ~= nil do
      if type(c) == "table" and garbage_reason(c.finish_reason) then c.finish_reason = "stop" end
      i = i + 1
      c = choices[i]
    end
    return
  end
  return f ~= nil and f ~= null and not OPENAI_FINISH[f] and type(f) ~= "string"
end

-- the answer as JSON, written directly: a table built and encoded costs the
-- hot path a third of its JSON time (cjson prints every number with %.14g)
local OPENAI_ANSWER = '{"id":"chatcmpl-%s","object":"chat.completion","created":%d,"model":%s,'
  .. '"system_fingerprint":null,"choices":[{"index":0,"message":{"role":"assistant","content":%s,"refusal":%s%s},'
  .. '"logprobs":null,"finish_reason":%s}],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d%s}}'

local function openai_answer_json(r, id, model, created)
  local u = r.usage or {}
  local i, o = count(u.input_tokens), count(u.output_tokens)
  local calls = r.tool_calls and (',"tool_calls":' .. json.encode(openai_tool_calls(r.tool_calls))) or ""
  -- (as the API: no text beside a tool call or a refusal is null, not "")
  local text = ((r.text or "") == "" and (r.tool_calls or r.refusal)) and "null" or json.encode(r.text or "")
  local refusal = type(r.refusal) == "string" and json.encode(r.refusal) or "null"
  local cached = count(u.cached_input_tokens)
  return OPENAI_ANSWER:format(id, created or math.floor(resil.clock.wall()), json.encode(model), text, refusal,
    calls, json.encode(openai_finish(r.finish_reason)), i, o, i + o,
    cached > 0 and (',"prompt_tokens_details":{"cached_tokens":%d}'):format(cached) or "")
end

-- Tool-call arguments cut short (an answer that stopped at max_tokens mid-call: '{"x":"ab') ->
-- the object they began, as far as it parses (as Anthropic's own answer cut there, and its SDK
-- reading the streamed partial JSON): the open string and containers closed, else cut back to
-- one of the last whole members | nil. Only the last few places to cut are kept and tried, each
-- text made when tried: every one kept as a text (each with its closers) was a gigabyte of
-- copies for arguments of 256 KB with 10,000 commas, or as deeply nested, each decoded in turn.
local CLOSER = { ["{"] = "}", ["["] = "]" }
TUNED.PARTIAL_TRIES = 8
-- text's first `upto` bytes walked: -> the containers open there, and whether in a string and
-- after its backslash; on_cut(i): a place to cut, after an opening or before a comma
local function walk_json(text, upto, on_cut)
  local stack, in_str, esc = {}, false, false
  for i = 1, upto do
    local ch = text:sub(i, i)
    if in_str then
      if esc then esc = false elseif ch == "\\" then esc = true elseif ch == '"' then in_str = false end
    elseif ch == '"' then in_str = true
    elseif ch == "{" or ch == "[" then stack[#stack + 1] = ch; if on_cut then on_cut(i) end
    elseif ch == "}" or ch == "]" then stack[#stack] = nil
    elseif ch == "," and on_cut then on_cut(i - 1) end
  end
  return stack, in_str, esc
end
local function closers(stack) local t = {} for i = #stack, 1, -1 do t[#t + 1] = CLOSER[stack[i]] end return table.concat(t) end
local function partial_object(text)
  if type(text) ~= "string" or text:sub(1, 1) ~= "{" then return nil end
  local cuts, n = {}, 0 -- (a ring of the last TUNED.PARTIAL_TRIES places)
  local stack, in_str, esc = walk_json(text, #text, function(i) n = n + 1; cuts[(n - 1) % TUNED.PARTIAL_TRIES + 1] = i end)
  local function object(candidate)
    local v = json.decode(candidate)
    if type(v) == "table" and getmetatable(v) ~= json.array_mt and v[1] == nil then return v end
  end
  -- the whole text first, its open string closed (a dangling escape or \u left out)
  local whole = text
  if in_str then whole = (esc and whole:sub(1, -2) or whole:gsub("\\u%x*$", "")) .. '"' end
  local v = object(whole .. closers(stack))
  for k = n, math.max(1, n - TUNED.PARTIAL_TRIES + 1), -1 do
    if v then return v end
    local at = cuts[(k - 1) % TUNED.PARTIAL_TRIES + 1]
    v = object(text:sub(1, at) .. closers((walk_json(text, at))))
  end
  return v
end

local function anthropic_answer(r, id, model)
  -- (an answer without text is content [] as the API writes it: an empty text block, sent back
  -- as the assistant's turn of the next request, is refused: "text content blocks must be non-empty")
  local content = setmetatable({}, json.array_mt)
  -- (an OpenAI refusal is the text of an answer that stops for "refusal")
  local text = (r.text or "") ~= "" and r.text or type(r.refusal) == "string" and r.refusal or ""
  if text ~= "" then content[1] = { type = "text", text = text } end
  for _, c in ipairs(r.tool_calls or {}) do
    -- (an object, whatever the arguments were: a cut answer's that are whole JSON but no object,
    -- "[1, 2", cut at max_tokens as "[1, 2]" say, were its input, on which the SDK broke)
    local input = json.decode(c.arguments or "{}")
    if type(input) ~= "table" or input[1] ~= nil or getmetatable(input) == json.array_mt then
      input = partial_object(c.arguments) or {}
    end
    content[#content + 1] = { type = "tool_use", id = c.id, name = c.name, input = input }
  end
  -- (stop_details, container and diagnostics are null, not absent, as the API writes them: the
  -- SDK's types say so, and code that tests `stop_details !== null` for a refusal read an
  -- answer translated from OpenAI's as one)
  return { id = "msg_" .. id, type = "message", role = "assistant", model = model, content = content,
    stop_reason = stop_reason_of(r), stop_sequence = type(r.stop_sequence) == "string" and r.stop_sequence or null,
    stop_details = null, container = null, diagnostics = null, usage = translated_usage(r.usage) }
end

---------------------------------------------------------------------------
-- requests: the client's API -> policies.ai

local OPENAI_PASSED = {}
for _, k in ipairs({ "temperature", "top_p", "tool_choice", "n", "seed", "response_format",
  "parallel_tool_calls", "presence_penalty", "frequency_penalty", "logit_bias", "reasoning_effort" }) do
  OPENAI_PASSED[k] = true
end

-- a JSON number that is a whole number -> integer; anything else -> nil
local function whole(v) return type(v) == "number" and math.tointeger(v) or nil end

-- an OpenAI body's output limit: max_completion_tokens, else max_tokens (a null one is not
-- given: `max_completion_tokens: null, max_tokens: 100`, as a client that sets one of them
-- sends it, was sent with no limit at all, written and billed up to the model's own)
local function asked_max_tokens(b)
  local v = b.max_completion_tokens
  if v == nil or v == null then v = b.max_tokens end
  return v
end

-- the fields of a body read into the normalized request (or the gateway's
-- own: stream, n); every other field is the client's API's own
-- (logprobs, store, service_tier; thinking, top_k, metadata, ...) and goes,
-- as it is, to a provider of that API only: a fallback to the other one
-- leaves it out (sent there, top_k or thinking was a 400 that failed the fallback)
local OPENAI_READ = { model = true, messages = true, max_tokens = true, max_completion_tokens = true, stop = true,
  tools = true, stream = true, stream_options = true, n = true,
  -- (who made the request is the key's name, never what a client says: one tenant must not
  -- pin its abuse on another's identifier at the provider)
  user = true, safety_identifier = true }
local ANTHROPIC_READ = { model = true, messages = true, system = true, max_tokens = true, stop_sequences = true,
  tools = true, tool_choice = true, stream = true, temperature = true, top_p = true }

-- (made at the size it reaches: the fields complete_admitted and call_to_end set
-- are named here, nil until then; grown key by key the table was rehashed)
local function from_openai(b)
  local req = { messages = b.messages, max_tokens = whole(asked_max_tokens(b)),
    stop = b.stop ~= null and b.stop or nil, tools = b.tools, model = nil, fallback = nil, user = nil,
    ledger_sync = nil, ledger_wait = nil, budget = nil, give_up = nil, provider_options = nil,
    client_model = b.model } -- (the model the client named, before its alias: see openai.body)
  local own
  for k, v in pairs(b) do -- the body's few fields
    if OPENAI_PASSED[k] then
      if v ~= null then req[k] = v end
    elseif not OPENAI_READ[k] then
      own = own or {}
      own[k] = v
    end
  end
  if own then req.provider_options = { openai = own } end
  return req
end

local function from_anthropic(b)
  -- (client_api: its sampling numbers are Anthropic's, sent to Anthropic as they are)
  local req = { messages = b.messages, system = b.system, max_tokens = whole(b.max_tokens),
    stop = b.stop_sequences, tools = b.tools, model = nil, fallback = nil, user = nil, ledger_sync = nil,
    ledger_wait = nil, budget = nil, give_up = nil, provider_options = nil, client_api = "anthropic",
    client_model = b.model } -- (sized: see from_openai)
  if b.temperature ~= null then req.temperature = b.temperature end
  if b.top_p ~= null then req.top_p = b.top_p end
  if type(b.tool_choice) == "table" then
    local t = b.tool_choice.type
    req.tool_choice = t == "any" and "required" or t == "tool" and
      { type = "function", ["function"] = { name = b.tool_choice.name } } or t
    -- (one tool call at most, as OpenAI says it: an agent loop that runs one call a turn got several)
    if b.tool_choice.disable_parallel_tool_use == true then req.parallel_tool_calls = false end
  end
  -- (structured output, as OpenAI asks for it: a fallback there answers JSON of the schema too;
  -- the structured-outputs beta's top-level output_format as well, which older SDKs send)
  local format = type(b.output_config) == "table" and b.output_config.format
  if type(format) ~= "table" then format = b.output_format end
  if type(format) == "table" and format.type == "json_schema" and type(format.schema) == "table" then
    req.response_format = { type = "json_schema", json_schema = { name = "output", schema = format.schema } }
  end
  local own
  for k, v in pairs(b) do
    if not ANTHROPIC_READ[k] then
      own = own or {}
      own[k] = v
    end
  end
  if own then req.provider_options = { anthropic = own } end
  return req
end

-- the registry now loaded (a reload swaps it in for the next request); read where require
-- keeps it (require's own look is some 500 instructions more, on every request)
local function registry() return package.loaded["policies.registry"] or require "policies.registry" end

-- t[k], a table made on first use (caches keyed in two levels)
local function sub(t, k)
  local v = t[k]
  if v == nil then
    v = {}
    t[k] = v
  end
  return v
end

local alias_routes = setmetatable({}, { __mode = "k" }) -- registry entries -> { name -> route }
local function registry_alias(name)
  local entries = registry().entries
  local e = entries[name]
  if type(e) ~= "table" or not (e.use or e.deployments) then return nil end
  local routes = sub(alias_routes, entries)
  local route = routes[name]
  if not route then
    route = { model = name }
    routes[name] = route
  end
  return route
end

-- a bare name on an endpoint -> its route, made once per name (api -> name -> route);
-- how many each endpoint keeps is counted apart: any name is a client's to choose
local native_routes, native_counts = {}, {}
TUNED.NATIVE_ROUTES_MAX = 1000 -- a client's made-up names must not grow it without end

-- the model a client named -> the request's model and fallback, or nil, why
-- (a route is shared by the requests that name the model: read it only)
local function route_model(name, native)
  local m = gateway.config.models[name]
  if m ~= nil then -- (most names are none of the config's: no type() calls for them)
    if type(m) == "string" then return { model = m } end
    if type(m) == "table" then return { model = m.model, fallback = m.fallback } end
  end
  -- an alias of the model registry (policies/models.lua) goes to policies.ai
  -- as it is: its pin, fallbacks, deployments and migration are the registry's
  local alias = registry_alias(name)
  if alias then return alias end
  -- a bare name served before: its route, kept below only for a name without a provider (the
  -- pattern's pass is some 2.6k instructions for a short name, on every request)
  local kept = native_routes[native]
  local route = kept and kept[name]
  if route then return route end
  if name:match("^[%w_%-]+/.") then
    -- (a provider's file that does not load raises: the gateway's failure, a 500 logged, not the client's)
    if ai.provider_module(name:match("^([%w_%-]+)/")) ~= nil then return { model = name } end
    return nil, ("unknown provider in '%s'"):format(name)
  end
  local routes = sub(native_routes, native)
  route = { model = native .. "/" .. name }
  local n = native_counts[native] or 0
  if n < TUNED.NATIVE_ROUTES_MAX then routes[name], native_counts[native] = route, n + 1 end
  return route
end

-- A model name is echoed in a header (x-resil-model), logged, and becomes a
-- metric label and a key of per-model warnings: a client's name is held to
-- what real model ids look like, printable ASCII and short, so one request
-- cannot put megabytes into each of those (or a control byte into a header)
local MODEL_MAX = 256
local check_model
do
  -- (the names found to be such remembered: the pattern's pass is some 1.4k instructions for a
  -- short name, asked on every request; bounded, as a client names any model it likes)
  local model_names, model_names_count = {}, 0
  function check_model(name)
    if model_names[name] then return nil end
    if type(name) ~= "string" or name == "" then return "model is required" end
    if #name > MODEL_MAX or not name:find("^[!-~]*$") then
      return ("model must be at most %d printable ASCII characters, without spaces"):format(MODEL_MAX)
    end
    if model_names_count >= 1000 then model_names, model_names_count = {}, 0 end
    model_names[name], model_names_count = true, model_names_count + 1
  end
end

-- tool calls and tools are reshaped between the two APIs: a shape that is
-- not theirs is the client's 400, named, before any provider is called
local function check_tool_calls(calls, i)
  if calls == nil or calls == null then return end
  if type(calls) ~= "table" then return ("messages[%d].tool_calls must be an array"):format(i) end
  for j, c in ipairs(calls) do
    -- (a custom tool's call, GPT-5's free-form tools: {id, type = "custom", custom = {name, input}})
    local custom = type(c) == "table" and c.type == "custom" and c.custom
    local f = type(c) == "table" and c["function"]
    if custom then
      if type(custom) ~= "table" or type(custom.name) ~= "string" or type(custom.input) ~= "string" then
        return ("messages[%d].tool_calls[%d] must be {id, type = \"custom\", custom = {name, input}}"):format(i, j - 1)
      end
    elseif type(f) ~= "table" or type(f.name) ~= "string" or (f.arguments ~= nil and type(f.arguments) ~= "string") then
      return ("messages[%d].tool_calls[%d] must be {id, type, function = {name, arguments (a JSON string)}}")
        :format(i, j - 1)
    end
  end
end

-- A big body's work lets the loop turn: its decode, the checks of its messages (every
-- TUNED.YIELD_MESSAGES) and its translation are stretches of their own, so the worker's other requests
-- (a /health, a small chat) are served meanwhile. As one stretch a 4 MB conversation of short
-- messages held every other request about 0.3 s of CPU (2 s on a busy machine).
TUNED.BIG_BODY, TUNED.YIELD_MESSAGES = 256 * 1024, 4096
local function yieldable() return resil.running() and coroutine.isyieldable() end
local function let_others_in(body)
  if #body >= TUNED.BIG_BODY and yieldable() then resil.yield() end
end

local function check_messages(msgs)
  if type(msgs) ~= "table" or #msgs == 0 then return "messages must be a non-empty array" end
  local yielding = #msgs > TUNED.YIELD_MESSAGES and yieldable()
  local i, m = 1, msgs[1] -- (to the first nil, as ipairs: no iterator call a message)
  while m ~= nil do
    if yielding and i % TUNED.YIELD_MESSAGES == 0 then resil.yield() end
    if type(m) ~= "table" or type(m.role) ~= "string" then
      return ("messages[%d] must be an object with a role"):format(i - 1)
    end
    -- (a number was sent upstream as "", and charged; an assistant turn of tool calls may have none)
    local c = m.content
    if not (type(c) == "string" or type(c) == "table" or (m.role == "assistant" and (c == nil or c == null))) then
      return ("messages[%d].content must be a string or an array of content parts"):format(i - 1)
    end
    local bad = check_tool_calls(m.tool_calls, i - 1)
    if bad then return bad end
    i = i + 1
    m = msgs[i]
  end
end

local function check_tools(tools)
  if tools == nil or tools == null then return end
  if type(tools) ~= "table" then return "tools must be an array" end
  for i, t in ipairs(tools) do
    local f = type(t) == "table" and t["function"]
    -- a function, Anthropic's {name, input_schema}, or a tool of another type, in that type's
    -- own shape and sent as it is: a server tool's {type, name}, OpenAI's {type = "custom",
    -- custom = {...}}, Anthropic's MCP toolset {type = "mcp_toolset", mcp_server_name} (no name:
    -- it was refused, a 400 for every request of the MCP connector's beta)
    local other = type(t) == "table" and type(t.type) == "string" and t.type ~= "function"
    if type(t) ~= "table" or (f ~= nil and (type(f) ~= "table" or type(f.name) ~= "string")) or
       (f == nil and type(t.name) ~= "string" and not other) then
      return ("tools[%d] must be {type = \"function\", function = {name, ...}} or {name, input_schema}"):format(i - 1)
    end
  end
end

-- a decoded body that is not a JSON object: a scalar, or an array ([1] was "model is required")
local function not_object(b)
  return type(b) ~= "table" or b[1] ~= nil or getmetatable(b) == json.array_mt
end
-- a request's body decoded: one that starts with a UTF-8 byte order mark (a file a Windows tool wrote,
-- sent as it is by `curl --data-binary @file`) is read without it, as RFC 8259 8.1 lets a parser
-- (Python's json.loads of the bytes does; it was a 400 "invalid token at character 1" on a "{"):
-- tried only when the body failed as it came
local BOM = "\239\187\191"
local function decode_body(body)
  local b, err = json.decode(body)
  if b == nil and body:sub(1, 3) == BOM then b, err = json.decode(body:sub(4)) end
  return b, err
end

-- what its 400 says: a body nested past the decoder's depth (resil.json.max_depth) is JSON all the same (an object 1,001
-- levels deep was told it was "not a JSON object")
local function not_object_message(decode_err)
  if decode_err ~= nil and tostring(decode_err):find("too many nested", 1, true) then
    return ("the body is nested more than %d levels deep"):format(json.max_depth)
  end
  -- (and one that is no JSON, an object cut short or with a lone UTF-16 surrogate escape such as a
  -- JavaScript client's text sliced inside an emoji sends, says why and where: it was "not a JSON object")
  if decode_err ~= nil then
    local why = type(decode_err) == "table" and decode_err.message or tostring(decode_err)
    return "the request body is not valid JSON: " .. tostring(why)
  end
  return "the body is not a JSON object"
end

---------------------------------------------------------------------------
-- virtual keys

-- sha256 -> { record =, at = when it was looked up }, kept across policy reloads: emptied by each
-- one, every key's next request asked the store, and during a store outage keys looked up a
-- moment before were all 503s from the reload on. An entry is good for the key_cache in force now
-- (a reload that lowers it shortens what was cached before too: a revoke takes at most that long)
local keys_cached = resil.keep("policies.gateway.key_cache", function() return { by_hash = {}, size = 0 } end)
local keys_outage -- since when the store could not check keys (nil: it can)

local function bearer(req)
  local h = req.headers.authorization
  -- (a scheme is case-insensitive, RFC 9110 11.1: "BEARER sk-..." was "missing API key")
  local token = h and h:match("^[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)$")
  return token or req.headers["x-api-key"]
end

-- -> the key's record | nil, error reply
local function authenticate(req, api)
  if not gateway.config.auth then return {} end
  local token = bearer(req)
  if not token then
    -- (two Authorization headers are one field of both values, joined with ", ": neither is taken,
    -- and "missing API key" told a client that had sent one, twice, to send one)
    -- (an Anthropic client's SDK sends its key as x-api-key: the hint names the header it uses)
    local h = req.headers.authorization
    return nil, error_reply(api, 401, h and h:find(",", 1, true)
      and "Authorization sent more than once: send one key, Authorization: Bearer <key>"
      or api == "anthropic" and "missing API key: send x-api-key: <key> (or Authorization: Bearer <key>)"
      or "missing API key: send Authorization: Bearer <key>", { code = "invalid_api_key" })
  end
  local hash = resil.crypto.sha256(token)
  local now = resil.now()
  local c = keys_cached.by_hash[hash]
  local rec
  if c and c.at + (tonumber(gateway.config.key_cache) or 0) > now then
    rec = c.record
  else
    local err
    rec, err = keys.lookup(hash)
    if err ~= nil then
      -- the store cannot say: a 503 the client retries, never a 401 (which
      -- SDKs do not retry) and nothing cached; logged once per outage (a
      -- line per request was 131,419 lines in 3 s)
      if not keys_outage then
        keys_outage = resil.now()
        resil.log.error("gateway: keys cannot be checked until the store is back", { error = tostring(err) })
      end
      return nil, error_reply(api, 503, "the gateway cannot check API keys right now; retry shortly",
        { headers = { ["retry-after"] = "1" }, code = "store_unavailable" })
    end
    if keys_outage then
      resil.log.info("gateway: keys can be checked again", { seconds = now - keys_outage })
      keys_outage = nil
    end
    -- bounded: a flood of made-up keys cannot grow it without end
    if keys_cached.size >= 10000 then keys_cached.by_hash, keys_cached.size = {}, 0 end
    if not keys_cached.by_hash[hash] then keys_cached.size = keys_cached.size + 1 end
    keys_cached.by_hash[hash] = { record = rec or false, at = now }
  end
  -- the lookup is by digest; compared again in constant time all the same
  if not rec or rec.revoked or not resil.crypto.equal(rec.hash or "", hash) then
    return nil, error_reply(api, 401, "invalid or revoked API key", { code = "invalid_api_key" })
  end
  access.key(req, rec.name)
  return rec
end

-- a key's buckets, made once per record (a changed record makes new ones)
local buckets_of = setmetatable({}, { __mode = "k" })

local function key_buckets(rec)
  local b = buckets_of[rec]
  if b then return b end
  local shared = gateway.config.shared_limits
  if shared == nil then
    -- a Redis store is shared by gateways on several machines: a key's limits
    -- are the key's across them, not each process's (--workers or not)
    local s = resil.store()
    shared = s ~= nil and s.kind == "redis"
  end
  b = {
    shared = shared,
    rpm = rec.rpm and host_limits.bucket("gateway:" .. rec.id .. ":rpm", { rate = rec.rpm, per = 60, burst = rec.rpm,
      shared = shared }),
    tpm = rec.tpm and host_limits.bucket("gateway:" .. rec.id .. ":tpm", { rate = rec.tpm, per = 60, burst = rec.tpm,
      unit = "tokens", shared = shared }),
  }
  buckets_of[rec] = b
  return b
end

-- the key's own rate limits: nil, or a 429 reply. Its tokens: the body's
-- estimate and the most the answer may hold (counted only for a key with
-- tpm). -> nil | a 429 reply; and for a key with tpm, what its bucket was
-- charged ({bucket =, tokens =}), for correct_tpm once the answer is known
local function key_limits(rec, api, body, most)
  if not rec.rpm and not rec.tpm then return nil end
  local buckets = key_buckets(rec)
  if rec.rpm then
    local ok, wait = buckets.rpm:try(1)
    if not ok then
      return error_reply(api, 429, ("key '%s': %d requests per minute"):format(rec.name, rec.rpm),
        { headers = retry_headers(wait), code = "rate_limit_exceeded" })
    end
  end
  if rec.tpm then
    local tokens = math.min(pricing.estimate_tokens(body) + (most or 0), rec.tpm)
    local ok, wait = buckets.tpm:try(tokens)
    if not ok then
      -- (a request refused spends none of its rpm: it had, and the key's next one within both was a 429)
      if rec.rpm then buckets.rpm:refund(1) end
      return error_reply(api, 429, ("key '%s': %d tokens per minute"):format(rec.name, rec.tpm),
        { headers = retry_headers(wait), code = "rate_limit_exceeded" })
    end
    return nil, { bucket = buckets.tpm, tokens = tokens, shared = buckets.shared }
  end
end

-- A key's tpm is charged its request's estimate before the call (text at 2
-- to 4 bytes a token, and all of max_tokens); once the answer says what it
-- used, the difference is taken or given back, once: the key is limited by
-- the tokens it used. (CJK text estimated at twice its tokens, or a
-- max_tokens the answer did not reach, throttled a key at half its tpm or
-- less; an answer longer than an estimate without max_tokens, late.) A call
-- that failed without usage keeps its estimate. Only for a key with tpm.
local COUNTED = { "input_tokens", "output_tokens" }
local function correct_tpm(charged, usage)
  if not charged or charged.corrected or type(usage) ~= "table" then return end
  local used
  for _, k in ipairs(COUNTED) do
    local v = usage[k]
    if type(v) == "number" and v >= 0 and v < math.huge then used = (used or 0) + v end
  end
  if not used then return end
  charged.corrected = true
  local more, bucket = used - charged.tokens, charged.bucket
  local function apply()
    if more > 0 then bucket:charge(more) elseif more < 0 then bucket:refund(-more) end
  end
  -- (a shared bucket's is a store operation, which the answer does not wait for; a stream's end
  -- may come in its task's cancel, where nothing can wait)
  if coroutine.isyieldable() and not charged.shared then apply() else resil.spawn(apply) end
end

-- fn (ai.chat, ai.embed) with its answer's usage correcting the key's tpm, in
-- the task the call runs in to its end (a client that left does not stop it)
local function correcting_tpm(charged, fn)
  if not charged then return fn end
  return function(r)
    local res, err = fn(r)
    correct_tpm(charged, type(res) == "table" and res.usage)
    return res, err
  end
end

-- A stream whose client left is recorded in a task of its own (its close runs in the cancel,
-- which cannot wait): its usage is known once that record is written, polled here for a while
-- (it kept its estimate, all of max_tokens: two streams stopped after a few words took 8,000 of
-- a key's 10,000 tpm, and the next request was a 429)
-- (polled from 10 ms, doubling to 0.5 s: a thousand clients leaving while the store is slow to
-- take their records woke the loop 100,000 times a second)
TUNED.RECORDED_WAIT, TUNED.RECORDED_POLL, TUNED.RECORDED_POLL_MAX = 10, 0.01, 0.5
local function correct_once_recorded(charged, s)
  local waited, poll = 0, TUNED.RECORDED_POLL
  while true do
    local r, err = s:result()
    if r or err then return correct_tpm(charged, r and r.usage or type(err) == "table" and err.usage) end
    if waited >= TUNED.RECORDED_WAIT then return end
    resil.sleep(poll)
    waited, poll = waited + poll, math.min(poll * 2, TUNED.RECORDED_POLL_MAX)
  end
end

-- a streamed reply whose key's tpm is corrected by its usage once it ended
-- (its end, its break: what it streamed; a client that left: once that is recorded)
local function correcting_stream(reply, charged, s)
  if not charged then return reply end
  local stream = reply.stream
  reply.stream = function(write)
    local _ <close> = setmetatable({}, { __close = function()
      local r, err = s:result()
      if not r and not err then return resil.spawn(correct_once_recorded, charged, s) end
      correct_tpm(charged, r and r.usage or type(err) == "table" and err.usage)
    end })
    return stream(write)
  end
  return reply
end

---------------------------------------------------------------------------
-- concurrency: the gateway's total (config max_concurrent) and each key's
-- own (keys add --concurrency N), per process. A request past them waits in
-- a bounded FIFO queue (config queue, queue_timeout); past the queue it is a
-- 503 with Retry-After. The key's permit is taken first, so a busy key does
-- not sit on the gateway's permits while it waits.

-- A semaphore's permit is its taker task's (released by it, given back as it ends): those of a
-- call run in a task of its own (run_to_end) are handed over to that task.
local Permits = {}
Permits.__index = Permits
function Permits:release()
  if self.key then self.key:release(); self.key = nil end
  if self.total then self.total:release(); self.total = nil end
end
function Permits:hand_over(task)
  if self.key then self.key:hand_over(task) end
  if self.total then self.total:hand_over(task) end
end
Permits.__close = Permits.release
local NO_PERMITS
do -- (its function a block's local: the main chunk's 200 locals are a project copy's to use too)
  local function nothing() end
  NO_PERMITS = setmetatable({}, { __close = nothing, __index = { release = nothing, hand_over = nothing } })
end

-- One semaphore for the gateway and one per key, by name: a changed limit resizes it, so the
-- permits in use count against the new size (a new semaphore per size let the old one's holders
-- and the new one's run beside each other, more than either limit, and left the old series in
-- /metrics)
local total_sem -- { sem =, size =, queue = }
local key_sems = setmetatable({}, { __mode = "k" }) -- record -> { sem =, queue = }

local function semaphore(name, size)
  return host_limits.semaphore(name, { size = size, queue = gateway.config.queue or 64 })
end

-- a 503 the SDKs retry, on a new connection (another worker, the next process)
local function stopping(api)
  return error_reply(api, 503, "the gateway is stopping; retry the request", { code = "gateway_stopping",
    headers = { connection = "close", ["retry-after"] = "1" } })
end

-- (err: the semaphore's refusal, its queue full or no permit within the wait: a request that
-- waited out queue_timeout was told the queue was full, and `queue` raised changed nothing)
local function busy(api, who, n, err)
  -- (one still queued as a drain ended: its queue let go, refuse_queued, a 503 to retry elsewhere)
  if resil.stop_requested() then return stopping(api) end
  local why = tostring(type(err) == "table" and err.message or ""):find("queue full", 1, true)
    and "its queue is full" or ("none came free within queue_timeout (%g s)"):format(gateway.config.queue_timeout or 10)
  return error_reply(api, 503, ("%s: %d requests at once already, and %s"):format(who, n, why),
    { headers = { ["retry-after"] = "1" }, code = "too_many_concurrent_requests" })
end

-- The semaphores requests have queued for (every version's: a reload's module keeps them), whose
-- queues a drain lets go as it ends (refuse_queued): a request still waiting for its permit then
-- was cut with the calls still running, a connection closed without an answer, where it had not
-- started anything and a 503 sends it elsewhere
local queued_on = resil.keep("policies.gateway.queued_on", function() return setmetatable({}, { __mode = "k" }) end)
local function refuse_queued()
  local n = 0
  for sem in pairs(queued_on) do n = n + sem:refuse_waiting() end
  return n
end

-- -> permits (a to-be-closed value) | nil, a 503 reply (a 401 for a key revoked while it
-- waited: req, the request whose key is checked again after a wait past key_cache)
local function admit(rec, api, req)
  local max = gateway.config.max_concurrent
  if not max and not rec.concurrency then return NO_PERMITS end
  local p = setmetatable({}, Permits)
  local wait = { timeout = gateway.config.queue_timeout or 10 }
  local started = resil.now()
  local since = rec.concurrency and max and started
  local queue = gateway.config.queue or 64
  if rec.concurrency then
    local kept = key_sems[rec]
    -- (a key's record is read again when its cache entry lapses: a changed limit resizes; a changed
    -- queue, at once)
    if not kept or kept.queue ~= queue then
      kept = { sem = semaphore("gateway:key:" .. (rec.id or rec.name), rec.concurrency), queue = queue }
      key_sems[rec] = kept
    end
    local sem = kept.sem
    queued_on[sem] = true
    local ok, err = sem:acquire(wait)
    if not ok then return nil, busy(api, ("key '%s'"):format(rec.name), rec.concurrency, err) end
    p.key = sem
  end
  if max then
    if not total_sem or total_sem.size ~= max or total_sem.queue ~= queue then
      total_sem = { sem = semaphore("gateway:total", max), size = max, queue = queue }
    end
    -- (the queue_timeout is the request's in all: what the key's permit took of it is gone)
    if since then wait.timeout = math.max(0, wait.timeout - (resil.now() - since)) end
    queued_on[total_sem.sem] = true
    local ok, err = total_sem.sem:acquire(wait)
    if not ok then
      p:release()
      return nil, busy(api, "the gateway", max, err)
    end
    p.total = total_sem.sem
  end
  -- a wait in the queue longer than key_cache: the key is checked again, so that a revoke
  -- meanwhile takes at most key_cache here too (the request was let in up to queue_timeout after it;
  -- 10 ms at least: one let in at once is not looked up twice, key_cache = 0 or not)
  if req and gateway.config.auth and resil.now() - started > math.max(tonumber(gateway.config.key_cache) or 0, 0.01) then
    local again, refused = authenticate(req, api)
    if not again then
      p:release()
      return nil, refused
    end
  end
  return p
end

-- a streamed reply keeps its permits until its stream ends (or its client leaves)
local function hold(reply, permits)
  if permits == NO_PERMITS or not reply.stream then return reply, false end
  local stream = reply.stream
  reply.stream = function(write)
    local _ <close> = permits
    return stream(write)
  end
  return reply, true
end

local function model_allowed(rec, name)
  if not rec.models or #rec.models == 0 then return true end
  for _, m in ipairs(rec.models) do if m == name then return true end end
  return false
end

---------------------------------------------------------------------------
-- answering

-- (one constructor: the table is sized once, not grown key by key; a small
-- attempt count's text without a number conversion, 2.0 still "2.0")
local ATTEMPTS_TEXT = { "1", "2", "3", "4", "5", "6", "7", "8", "9" }
local function answer_headers(id, r)
  if not r then return { ["content-type"] = "application/json", ["x-request-id"] = id } end
  local attempts = r.attempts or 1
  attempts = math.type(attempts) == "integer" and ATTEMPTS_TEXT[attempts] or tostring(attempts)
  return { ["content-type"] = "application/json", ["x-request-id"] = id, ["x-resil-provider"] = r.provider,
    ["x-resil-model"] = r.model, ["x-resil-attempts"] = attempts,
    ["x-resil-cost-usd"] = r.cost_usd and usd_text(r.cost_usd) or "unknown" }
end

local function with_id(reply, id)
  reply.headers["x-request-id"] = id
  return reply
end

-- one SSE event (an empty list the APIs send as [] is made with json.array_mt)
local function sse(event, data)
  if event then return "event: " .. event .. "\ndata: " .. json.encode(data) .. "\n\n" end
  return "data: " .. json.encode(data) .. "\n\n"
end

-- a stream still running when a graceful stop ends (server:cut_streams):
-- its last event, without [DONE] (message_stop), so that the SDK raises
local CUT_MESSAGE = "the gateway stopped before the stream ended; retry the request"

-- the chunks of one OpenAI stream -> chunk(delta, finish), usage_chunk(usage) | nil
-- (nil: the client did not ask for stream_options.include_usage)
local function openai_chunks(id, model, b)
  local created = math.floor(resil.clock.wall())
  local function chunk(delta, finish)
    return sse(nil, { id = "chatcmpl-" .. id, object = "chat.completion.chunk", created = created, model = model,
      system_fingerprint = null, choices = { { index = 0, delta = delta, logprobs = null, finish_reason = finish or null } } })
  end
  local function usage_chunk(usage)
    return sse(nil, { id = "chatcmpl-" .. id, object = "chat.completion.chunk", created = created, model = model,
      choices = setmetatable({}, json.array_mt), usage = openai_usage(usage, true) })
  end
  return chunk, type(b.stream_options) == "table" and b.stream_options.include_usage and usage_chunk or nil
end

-- a stream's last event when it breaks, or when a graceful stop cuts it:
-- an error, without [DONE] (message_stop), so that the client's SDK raises
local function stream_error(api, message, code, etype)
  if api == "anthropic" then
    return sse("error", { type = "error", error = { type = etype or "api_error", message = message } })
  end
  return sse(nil, { error = { message = message, type = "server_error", param = null, code = code } })
end
-- the type of the provider's own error event, when it is one of Anthropic's: its SDK's
-- error.type (an overloaded_error a client backs off on was an api_error)
-- (in a block: a project's copy of this file needs room for locals of its own, Lua's 200 a chunk)
local broken
do
  local ANTHROPIC_TYPES = {}
  for _, t in pairs(ANTHROPIC_TYPE) do ANTHROPIC_TYPES[t] = true end
  function broken(api, err)
    access.stream_failed(err.kind or "stream_interrupted") -- (its access line says it)
    local cause = type(err.cause) == "table" and err.cause.error
    local etype = api == "anthropic" and type(cause) == "table" and ANTHROPIC_TYPES[cause.type] and cause.type or nil
    return stream_error(api, public_message(err.message or err.kind), err.kind or "stream_interrupted", etype)
  end
end

-- s:next() or s:next_event(), a raise (an event of the provider's that an
-- adapter could not read) as the stream's error: the client gets its error
-- event, the stream is closed and recorded, the task does not die mid-reply
local UNREADABLE = { kind = "stream_interrupted", message = "the upstream's stream could not be read" }
local function safely(s, method)
  local ok, a, b = pcall(s[method], s)
  if ok then return a, b end
  resil.log.warn("gateway: a stream could not be read", { error = tostring(a) })
  return nil, UNREADABLE
end

-- the client's stop sequences where the provider was not sent them (policies/stops.lua)
local stops = require "policies.stops"

-- An answer a compatible server ended unfinished, saying so in a finish_reason of its own: vLLM's
-- "abort" (an engine's abort, scale-down or shutdown: a 200, then [DONE]), "error". Relayed as it
-- came, or translated as "stop" / end_turn, a client took the cut answer for a whole one; its
-- stream ends with an error event instead, as one the upstream broke (the SDKs raise). (A whole
-- answer so ended is invalid output: policies/providers/openai.lua.) -> the error | nil
local function unfinished(f)
  if f ~= "abort" and f ~= "error" then return nil end
  return { kind = "stream_interrupted", message = ("the upstream ended the answer unfinished (finish_reason %q)"):format(f) }
end

local function openai_stream(s, first, id, model, b, headers, stop_list)
  local chunk, usage_chunk = openai_chunks(id, model, b)
  return { status = 200, headers = headers, cut = stream_error("openai", CUT_MESSAGE, "gateway_stopping"),
    stream = function(write)
    local _ <close> = s -- a client that leaves cancels this task: the upstream stream is closed and recorded
    local cutter, stopped = stop_list and stops.cutter(stop_list), nil
    local function send(delta)
      if cutter then delta, stopped = cutter.feed(delta) end
      if delta ~= "" then write(chunk({ content = delta })) end
    end
    write(chunk({ role = "assistant", content = "" }))
    if first then send(first) end
    while not stopped do
      local delta, err = safely(s, "next")
      if err then return write(broken("openai", err), true) end -- (no [DONE]: the client's SDK raises)
      if not delta then break end
      send(delta)
    end
    if cutter and not stopped and cutter.rest() ~= "" then write(chunk({ content = cutter.rest() })) end
    -- (at a stop the provider's stream is closed, as a client that leaves closes it: recorded as what it
    -- streamed, and nothing more is written, or paid, for an answer the client has whole)
    if stopped then s:close() end
    local r, ended = s:result()
    local cut_short = not stopped and r and unfinished(r.finish_reason)
    if cut_short then return write(broken("openai", cut_short), true) end
    -- (its ending: a stop adds nothing after it)
    write(chunk({}, stopped and "stop" or openai_finish(r and r.finish_reason)), true)
    if stopped and type(ended) == "table" then r = ended end -- (its usage as recorded)
    if usage_chunk and r then write(usage_chunk(r.usage)) end
    write("data: [DONE]\n\n")
  end }
end

local function anthropic_stream(s, first, id, model, headers, req, stop_list)
  return { status = 200, headers = headers, cut = stream_error("anthropic", CUT_MESSAGE, "gateway_stopping"),
    stream = function(write)
    local _ <close> = s
    write(sse("message_start", { type = "message_start", message = { id = "msg_" .. id, type = "message",
      role = "assistant", model = model, content = setmetatable({}, json.array_mt), stop_reason = null,
      stop_sequence = null, stop_details = null, container = null, diagnostics = null, usage = {
        input_tokens = pricing.estimate_tokens(json.encode(req.messages)), output_tokens = 0,
        -- (another API's provider: no cache writes; its reads, and the counts, come with message_delta)
        cache_creation_input_tokens = 0, cache_read_input_tokens = 0,
        cache_creation = { ephemeral_5m_input_tokens = 0, ephemeral_1h_input_tokens = 0 },
        server_tool_use = null, service_tier = null, inference_geo = null, speed = null,
        output_tokens_details = null } } }))
    -- (the text block starts with its first text: an answer without any, cut at max_tokens before
    -- it wrote any, is content [] as the API streams it and as its whole answer is; an empty text
    -- block, sent back as the assistant's turn, is refused: "text content blocks must be non-empty")
    local cutter, stopped, started = stop_list and stops.cutter(stop_list), nil, false
    local function send(text)
      if text ~= "" then
        if not started then
          started = true
          write(sse("content_block_start", { type = "content_block_start", index = 0,
            content_block = { type = "text", text = "" } }))
        end
        write(sse("content_block_delta", { type = "content_block_delta", index = 0,
          delta = { type = "text_delta", text = text } }))
      end
    end
    local delta, err = first, nil
    while true do
      if err then return write(broken("anthropic", err), true) end -- (no message_stop: the client's SDK raises)
      if not delta then break end
      if cutter then delta, stopped = cutter.feed(delta) end
      send(delta)
      if stopped then break end
      delta, err = safely(s, "next")
    end
    if cutter and not stopped then send(cutter.rest()) end
    -- (at a stop the provider's stream is closed and recorded as what it streamed: see openai_stream)
    if stopped then s:close() end
    local r, ended = s:result()
    local cut_short = not stopped and r and unfinished(r.finish_reason)
    if cut_short then return write(broken("anthropic", cut_short), true) end
    r = r or (stopped and type(ended) == "table" and { usage = ended.usage, stop_reason = "stop_sequence",
      stop_sequence = stopped }) or {}
    -- (an OpenAI refusal: the text of the answer)
    if (r.text or "") == "" and type(r.refusal) == "string" then send(r.refusal) end
    if started then write(sse("content_block_stop", { type = "content_block_stop", index = 0 }), true) end
    -- the usage as counted (message_start's input_tokens was an estimate): the SDK takes these totals
    write(sse("message_delta", { type = "message_delta", delta = { stop_reason = stop_reason_of(r),
      stop_sequence = type(r.stop_sequence) == "string" and r.stop_sequence or null, stop_details = null,
      container = null }, usage = translated_usage(r.usage) }), not started)
    write(sse("message_stop", { type = "message_stop" }))
  end }
end

-- an event's data as SSE data lines (data of several lines came as several "data:" lines)
local function one_line(data)
  data = tostring(data)
  if data:find("\n", 1, true) then data = data:gsub("\n", "\ndata: ") end
  return data
end

-- The stream of a provider of the client's own API: its events as the
-- provider sent them (thinking and its signatures, tool-call deltas,
-- logprobs, citations), with the gateway's id and the model the client named.
-- OpenAI's usage chunk (the gateway always asks for it, for the ledger) is
-- left out unless the client asked for it. The last event ([DONE],
-- message_stop) is given only to a stream that ended complete.
-- an OpenAI stream's end: a client that asked for the usage (and was not sent the provider's)
-- gets it as recorded, then [DONE]
local function relay_done(write, s, id, b, usage_due, r)
  r = usage_due and (r or s:result())
  if r then
    write(sse(nil, { id = "chatcmpl-" .. id, object = "chat.completion.chunk", created = math.floor(resil.clock.wall()),
      model = b.model, choices = setmetatable({}, json.array_mt), usage = openai_usage(r.usage, true) }))
  end
  write("data: [DONE]\n\n", true)
end

local function own_stream(s, api, id, b, headers, stop_list)
  local openai = api ~= "anthropic"
  local with_usage = type(b.stream_options) == "table" and b.stream_options.include_usage == true
  local cutter = openai and stop_list and stops.cutter(stop_list) -- (see stops.cut_raw)
  local usage_sent, done_sent = false, false
  return { status = 200, headers = headers, cut = stream_error(api, CUT_MESSAGE, "gateway_stopping"), stream = function(write)
    local _ <close> = s -- a client that leaves cancels this task: the upstream stream is closed and recorded
    while true do
      local ev, data = safely(s, "next_event")
      if not ev then
        if data then write(broken(api, data), true)
        -- an OpenAI stream that ended complete without its [DONE] (closed after its finish_reason,
        -- as ai.lua takes it): the client's ends as one (it ended with neither [DONE] nor an error)
        elseif openai and not done_sent then relay_done(write, s, id, b, with_usage and not usage_sent) end
        return
      end
      if openai then
        if ev.data:sub(1, 6) == "[DONE]" then -- (as the SDK: data that starts so, "[DONE] " too)
          done_sent = true
          relay_done(write, s, id, b, with_usage and not usage_sent)
        elseif type(data) == "table" and (with_usage or not (data.usage ~= nil and type(data.choices) == "table"
            and data.choices[1] == nil)) then
          data.id, data.model = "chatcmpl-" .. id, b.model
          garbage_reason(nil, data.choices)
          local choices = data.choices
          local c1 = type(choices) == "table" and choices[1]
          local cut_short = type(c1) == "table" and unfinished(c1.finish_reason)
          if cut_short then c1.finish_reason = null end -- (its delta relayed, then the error)
          local met = cutter and stops.through(cutter, data)
          if not with_usage then data.usage = nil end
          if type(data.usage) == "table" then usage_sent = true end
          local ok, text = pcall(json.encode, data) -- (a number JSON cannot write: the provider's own text)
          write("data: " .. (ok and text or one_line(ev.data)) .. "\n\n")
          if met then -- (closed there and recorded as what it streamed: see openai_stream)
            s:close()
            local _, ended = s:result()
            return relay_done(write, s, id, b, with_usage and not usage_sent, type(ended) == "table" and ended or nil)
          end
          if cut_short then -- (read on to its end, unrelayed: the usage chunk after it is what is recorded)
            repeat local more = safely(s, "next_event") until not more
            return write(broken(api, cut_short), true)
          end
        end
      elseif ev.event == "message_start" and type(data) == "table" and type(data.message) == "table" then
        data.message.id, data.message.model = "msg_" .. id, b.model
        if garbage_reason(data.message.stop_reason) then data.message.stop_reason = null end
        local ok, text = pcall(json.encode, data)
        write("event: message_start\ndata: " .. (ok and text or one_line(ev.data)) .. "\n\n")
      elseif ev.event == "message_delta" and type(data) == "table" and type(data.delta) == "table"
          and garbage_reason(data.delta.stop_reason) then
        data.delta.stop_reason = "end_turn" -- (as a translated stream's, its reason unknown)
        local ok, text = pcall(json.encode, data)
        write("event: message_delta\ndata: " .. (ok and text or one_line(ev.data)) .. "\n\n")
      else
        local name = ev.event or type(data) == "table" and type(data.type) == "string" and data.type or "message"
        write("event: " .. name .. "\ndata: " .. one_line(ev.data) .. "\n\n", name == "message_stop")
      end
    end
  end }
end

-- A whole answer written as the events of a stream: the client's SDK builds
-- the same message from these as from the provider's own
local function openai_answer_stream(res, id, model, b, headers)
  local chunk, usage_chunk = openai_chunks(id, model, b)
  return { status = 200, headers = headers, stream = function(write)
    write(chunk({ role = "assistant", content = "" }))
    if (res.text or "") ~= "" then write(chunk({ content = res.text })) end
    if type(res.refusal) == "string" then write(chunk({ refusal = res.refusal })) end
    if res.tool_calls then
      local calls = openai_tool_calls(res.tool_calls)
      for i, c in ipairs(calls) do c.index = i - 1 end
      write(chunk({ tool_calls = calls }))
    end
    write(chunk({}, openai_finish(res.finish_reason)), true)
    if usage_chunk then write(usage_chunk(res.usage)) end
    write("data: [DONE]\n\n")
  end }
end

local function anthropic_answer_stream(res, id, model, headers)
  local m = anthropic_answer(res, id, model)
  return { status = 200, headers = headers, stream = function(write)
    local usage = m.usage
    write(sse("message_start", { type = "message_start", message = { id = m.id, type = "message", role = "assistant",
      model = model, content = setmetatable({}, json.array_mt), stop_reason = null, stop_sequence = null,
      stop_details = null, container = null, diagnostics = null,
      usage = { input_tokens = usage.input_tokens, output_tokens = 0,
        cache_read_input_tokens = usage.cache_read_input_tokens,
        cache_creation_input_tokens = usage.cache_creation_input_tokens, cache_creation = usage.cache_creation,
        server_tool_use = usage.server_tool_use, service_tier = null, inference_geo = null, speed = null,
        output_tokens_details = null } } }))
    local calls = 0
    for i, block in ipairs(m.content) do
      local start, delta
      if block.type == "tool_use" then
        start = { type = "tool_use", id = block.id, name = block.name, input = {} }
        -- (arguments cut short are streamed as they came, as Anthropic streams them: its SDK
        -- reads what parses of them)
        calls = calls + 1
        local args = res.tool_calls[calls].arguments
        local cut = m.stop_reason == "max_tokens" and type(args) == "string" and json.decode(args) == nil
          and partial_object(args) ~= nil
        delta = { type = "input_json_delta", partial_json = cut and args or json.encode(block.input) }
      else
        start = { type = "text", text = "" }
        delta = { type = "text_delta", text = block.text }
      end
      write(sse("content_block_start", { type = "content_block_start", index = i - 1, content_block = start }))
      write(sse("content_block_delta", { type = "content_block_delta", index = i - 1, delta = delta }))
      write(sse("content_block_stop", { type = "content_block_stop", index = i - 1 }))
    end
    write(sse("message_delta", { type = "message_delta", delta = { stop_reason = m.stop_reason,
      stop_sequence = m.stop_sequence, stop_details = null, container = null }, usage = usage }), true)
    write(sse("message_stop", { type = "message_stop" }))
  end }
end

-- A stream from the other API whose request carries tools (or a JSON
-- schema, whose refusal a text stream cannot carry), read to its end
-- (req.read_whole) and written as the events of that whole answer: its tool
-- calls are not translated delta by delta
-- A stream of the other API with tools is read whole inside its attempt (still retried, fallen
-- back from) before a byte is sent: a long answer held its client's connection silent for the
-- whole generation, and a proxy's or load balancer's idle timeout (nginx's proxy_read_timeout,
-- 60 s) cut it. Past KEEPALIVE_AFTER its reply starts (`reader`: the task reading it, req): a
-- comment line (": keep-alive", which SSE readers skip) every KEEPALIVE_EVERY, then the whole
-- answer's events, or the failure as an error event (its status was sent). A failure sooner
-- keeps its own status, as before.
TUNED.KEEPALIVE_AFTER, TUNED.KEEPALIVE_EVERY = 15, 15
-- relayed(first, headers): a relayed stream whose first delta had not come within KEEPALIVE_AFTER
-- (a reasoning model's thinking): kept alive the same way, then relayed as it comes (its headers
-- gone before its provider, model and attempts were known: its access line says them; a failure
-- meanwhile, every retry and fallback spent, is its error event, no end marker, which SDKs raise)
local function whole_stream(s, api, id, b, headers, reader, req, relayed)
  return { status = 200, headers = headers, cut = stream_error(api, CUT_MESSAGE, "gateway_stopping"), stream = function(write)
    local _ <close> = s
    if reader then
      local _ <close> = setmetatable({}, { __close = function() reader:cancel() end }) -- (its client gone)
      local done, opened, first, err
      repeat
        done, opened, first, err = reader:join(TUNED.KEEPALIVE_EVERY)
        if done == nil then write(": keep-alive\n\n") end
      until done ~= nil
      if not done then error(opened, 0) end -- (the reader itself failed: the host's caps)
      if not opened then
        resil.log.warn("gateway: a stream could not be opened", { error = tostring(first) })
        return write(broken(api, UNREADABLE), true)
      end
      if err then return write(broken(api, err), true) end
      local t = s.target or {}
      access.served(req, t.provider, t.model, s.attempts or 1)
      access.upstream(req, s.provider_request_id)
      if relayed then return relayed(first, headers).stream(write) end
    end
    while true do
      local delta, err = safely(s, "next")
      if err then return write(broken(api, err), true) end
      if not delta then break end
    end
    local res = assert(s:result())
    local stop_list = stops.of(b, api) -- (an answer of the other API's: see stops)
    if stop_list then stops.cut(res, stop_list) end
    local whole = api == "anthropic" and anthropic_answer_stream(res, id, b.model, headers)
      or openai_answer_stream(res, id, b.model, b, headers)
    whole.stream(write)
  end }
end

-- a streamed reply whose events are made UTF-8 (valid_utf8): a provider's event relayed as it
-- came, or its text translated, with bytes that are not
local function utf8_stream(reply)
  local stream = reply.stream
  reply.stream = function(write)
    return stream(function(text, ...) return write(valid_utf8(text), ...) end)
  end
  return reply
end

-- POST /v1/chat/completions and POST /v1/messages
local complete_admitted

-- An answer from a provider of the client's own API is relayed as the
-- provider wrote it, with the gateway's id and the model the client named:
-- what the normalized result has no place for reaches the client (thinking
-- blocks and their signatures, which the next turn must send back; logprobs;
-- usage details; citations; service_tier). -> the body | nil (another API's)
local function own_answer(res, api, answer_id, model, stop_list)
  local kept = res.own_answer -- (kept with an Idempotency-Key's result; its type asked only then)
  if kept ~= nil and type(kept) == "string" then return kept end
  local raw = res.raw
  local adapter = type(raw) == "table" and ai.adapters[res.provider]
  if not adapter or adapter.name ~= api then return nil end
  -- the counts are the ones recorded (output capped at max_tokens), the details the provider's
  local usage = type(raw.usage) == "table" and raw.usage or {}
  if api == "anthropic" then
    if raw.type ~= "message" then return nil end
    raw.id = "msg_" .. answer_id
    if garbage_reason(raw.stop_reason) then raw.stop_reason = stop_reason_of(res) end
    for k, v in pairs(anthropic_usage(res.usage)) do usage[k] = v end
  else
    if raw.object ~= "chat.completion" then return nil end
    raw.id = "chatcmpl-" .. answer_id
    if stop_list then stops.cut_raw(raw, stop_list) end
    garbage_reason(nil, raw.choices)
    -- (openai_usage's counts, read without its table: it is made only where it is written whole)
    local recorded = res.usage or {}
    local i, o = recorded.input_tokens or 0, recorded.output_tokens or 0
    if math.type(i) == "integer" and math.type(o) == "integer" then
      -- the counts written here, the rest encoded without them: cjson writes each number
      -- through %.14g, some 2k instructions apiece, a third of the encode
      raw.model, raw.usage = model, nil
      usage.prompt_tokens, usage.completion_tokens, usage.total_tokens = nil, nil, nil
      local ok, body = pcall(json.encode, raw)
      local rest_ok, rest = true, nil
      if next(usage) ~= nil then rest_ok, rest = pcall(json.encode, usage) end
      raw.usage = usage
      -- (a number JSON cannot write, NaN or 1e999 that the provider sent: the answer as translated)
      if not (ok and rest_ok) then return nil end
      -- ("{...}" without its "}", then usage as its last field; joined with .., which writes an
      -- integer as %d does, for half of string.format's 6k instructions)
      return body:sub(1, -2) .. ',"usage":{"prompt_tokens":' .. i .. ',"completion_tokens":' .. o ..
        ',"total_tokens":' .. (i + o) .. (rest and ("," .. rest:sub(2)) or "}") .. "}"
    end
    for k, v in pairs(openai_usage(res.usage)) do usage[k] = v end
  end
  raw.model, raw.usage = model, usage
  -- (a number JSON cannot write, NaN or 1e999 that the provider sent: the answer as translated)
  local ok, body = pcall(json.encode, raw)
  return ok and body or nil
end

-- A call not streamed upstream runs in a task of its own, which a client
-- that leaves does not cancel: the provider finishes and bills such a call
-- whatever the client does, so it is finished here too and its cost
-- recorded. (Aborted, it was paid and never in the ledger or the budget: a
-- client's timeout spent past its key's budget, three times over with an
-- SDK's retries.) A stream is aborted instead: the provider stops, and what
-- was streamed is recorded. The drain waits for these (kept across a
-- policy reload: the drain is the first version's). The call holds the
-- request's permits (slot.permits) to its end: a client that left does
-- not free its key's concurrency for a call still running upstream.
-- But only the attempt under way is finished: once its client has left
-- (the handler no longer waits for it: the client hung up, or a drain cut
-- it), the call's r.give_up says "client_left", and no retry, fallback or
-- first attempt starts (policies.retry, policies.fallback) for an answer
-- nobody reads. The call then ends, and gives back its permits and its
-- budget's hold. (Before, it went on retrying and falling back, some eight
-- minutes against a frozen upstream, on the key's permits.)
-- running.tasks: the tasks running a provider call, canceled at a drain's
-- end so that what their attempts were billed is recorded.
local running = resil.keep("policies.gateway.calls_running", function() return { n = 0 } end)
running.tasks = running.tasks or setmetatable({}, { __mode = "k" })
-- fn(...) in this task, which a drain's end cancels (the task running ai.chat
-- itself: under an Idempotency-Key, resil.once's, not the one joining it)
local untrack_mt = { __close = function(t) if t[1] then running.tasks[t[1]] = nil end end }
local function cancelable(fn, ...)
  local me = resil.running()
  if me then running.tasks[me] = true end
  local _ <close> = setmetatable({ me or false }, untrack_mt)
  return fn(...)
end

-- One call run to its end: { slot, task, left }, closed in its task when the call ends, and
-- told by the handler when it no longer waits (shared metatables: no closures per call)
local call_end_mt = { __close = function(run)
  running.n = running.n - 1
  if run.task then running.tasks[run.task] = nil end
  if run.slot then run.slot.permits:release() end
end }
local handler_end_mt = { __close = function(t) t[1].left = true end }
local function run_body(run, fn, ...)
  local _ <close> = run
  local me = resil.running()
  if me then
    run.task = me
    running.tasks[me] = true
  end
  return fn(...)
end
local function run_to_end(slot, r, fn, ...)
  local run = setmetatable({ slot = slot, task = nil, left = nil }, call_end_mt) -- (sized for what is set later)
  r.give_up = function() if run.left then return "client_left" end end
  local call = resil.spawn(run_body, run, fn, ...)
  running.n = running.n + 1 -- (after the spawn: one that raised runs nothing)
  if slot then -- the call's task holds them now: its end gives them back, not this handler's
    slot.permits:hand_over(call)
    slot.handed = true
  end
  -- (closed when the join returns, the call ended, or when the handler is canceled: its client left)
  local _ <close> = setmetatable({ run }, handler_end_mt)
  return call:join()
end

-- ai.chat(r) (or ai.embed) to its end -> result | nil, err (what it raised, as an error).
-- Run in the handler's own task under resil.shield: the cancel its client's leaving brings
-- waits for the call's end, and r.give_up says "client_left" meanwhile (no retry, fallback or
-- first attempt starts). The handler holds the request's permits to its end. A drain's end
-- cancels it through the shield (running.tasks). (A task of its own per call cost ~15k
-- instructions a request.)
local shielded_end_mt = { __close = function(t)
  running.n = running.n - 1
  running.tasks[t[1]] = nil
end }
local function call_to_end(r, fn)
  local me = resil.running()
  r.give_up = function() if me:cancel_pending() then return "client_left" end end
  running.n = running.n + 1
  running.tasks[me] = true
  local _ <close> = setmetatable({ me }, shielded_end_mt)
  local ok, res, err = pcall(resil.shield, fn or ai.chat, r)
  if not ok then return nil, res end
  return res, err
end

-- fn(r) (ai.chat, ai.embed) as resil.once runs it under an Idempotency-Key: what it raised as
-- the error it answers, kept under the key only when it is the request's own fault (a 400)
local function kept_call(fn, r)
  local ok, v, e = pcall(cancelable, fn, r)
  if not ok and host_failure(v) then -- not the request's fault: nothing kept under its key
    return nil, resil.error("gateway_overloaded",
      "the gateway could not serve this request right now; retry shortly",
      { class = "overloaded", status = 503, retryable = true, retry_after = 1 })
  end
  if not ok and policy_bug(v) then return nil, policy_error(v) end
  if not ok then return nil, resil.error("bad_request", tostring(v), { class = "bad_request", status = 400 }) end
  return v, e
end

-- a failure kept under an Idempotency-Key keeps what the upstream said of it, in fields of its own:
-- the store keeps an error's own fields, not its response (a replay said "HTTP 400: ..." with the
-- upstream's code and param lost), and no table among them (the details as their JSON)
local function keep_upstream(err)
  if type(err) ~= "table" then return end
  local up = upstream_error(err, status_of(err))
  if up then
    err.upstream_message, err.upstream_code, err.upstream_param = up.message, up.code, up.param
    err.upstream_details = up.details and json.encode(up.details) or nil
  end
end

-- fn(r) under an Idempotency-Key: run to its end by resil.once, keep(v) making its answer what
-- the key keeps. -> res, err, replayed (a replay called no provider: none of the tokens its
-- key's tpm was charged were used, and they are given back)
local function once_to_end(slot, r, once_spec, tpm, fn, keep)
  local ran = false
  -- a copy waiting for the key's first call stops once its client has left (it held its key's
  -- concurrency permit up to resil.once's 30 s wait)
  once_spec.give_up = function() return r.give_up and r.give_up() end
  local joined, res, err = run_to_end(slot, r, resil.once, once_spec, function()
    ran = true
    local v, e = kept_call(correcting_tpm(tpm, fn), r)
    if v then keep(v) else keep_upstream(e) end
    return v, e
  end)
  if not joined then res, err = nil, res end
  if not ran then correct_tpm(tpm, { input_tokens = 0, output_tokens = 0 }) end
  return res, err, not ran
end

-- Anthropic's SDK reads its request id from `request-id` (err.requestID, _request_id); an error's
-- body names it too, as the API's does (the SDK's ErrorResponse types request_id as never absent)
local function anthropic_id(reply, api)
  if api == "anthropic" and reply and reply.headers then
    local id = reply.headers["x-request-id"]
    reply.headers["request-id"] = id
    local body = reply.body
    if type(id) == "string" and (reply.status or 200) >= 400 and type(body) == "string" and body:byte(1) == 123
      and body:find('"type":"error"', 1, true) and not body:find('"request_id":', 1, true) then
      reply.body = '{"request_id":' .. json.encode(id) .. "," .. body:sub(2)
    end
  end
  return reply
end

-- sampling numbers that JSON allows and no provider does (1e400 reads as inf)
local not_finite
do
  local FINITE = { "temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "seed" }
  local HUGE = math.huge
  function not_finite(b)
    for i = 1, #FINITE do
      local k = FINITE[i]
      local v = b[k]
      if v ~= nil and type(v) == "number" and (v ~= v or v == HUGE or v == -HUGE) then
        return k .. " must be a finite number"
      end
    end
    return nil
  end
end

-- A service tier is billed at its own price (OpenAI's priority about twice
-- the standard one, flex half), which the ledger knows only for some
-- (pricing.tiers: OpenAI's priority and flex, for the models listed there;
-- none of Anthropic's). The tiers that are what the request would get
-- without the field pass; another passes to an openai/ model that
-- pricing.tiers prices in it (held and recorded at that price); any other
-- is a 400 before any call.
local unpriced_tier
do
  local STANDARD_TIERS = { openai = { auto = true, default = true }, anthropic = { auto = true, standard_only = true } }
  -- Anthropic's fast mode (speed "fast": 2 to 6 times the price) and US-only inference
  -- (inference_geo "us": 1.1 times) are priced apart too, and nowhere in the ledger: passed on,
  -- they were recorded and held at the standard price
  local STANDARD_ANTHROPIC = { speed = { standard = true }, inference_geo = { global = true } }
  function unpriced_tier(b, api, route)
    if api == "anthropic" then
      for field, standard in pairs(STANDARD_ANTHROPIC) do
        local v = b[field]
        if v ~= nil and v ~= null and not standard[v] then
          return ("%s '%s' is not served: the gateway prices standard processing only"):format(field,
            tostring(v):sub(1, 40))
        end
      end
    end
    local tier = b.service_tier
    if tier == nil or tier == null or STANDARD_TIERS[api][tier] then return nil end
    if type(tier) ~= "string" then return "service_tier must be a string" end
    local model = api == "openai" and type(route.model) == "string" and route.model:match("^openai/(.+)$")
    local named = type(pricing.tiers.openai) == "table" and pricing.tiers.openai[tier]
    if model and named and pricing.price("openai", model, tier) then return nil end
    return ("service_tier '%s' is not served for model '%s': the gateway serves a tier other than the standard "
      .. "one only for an openai/ model pricing.tiers prices in it"):format(tier:sub(1, 40), tostring(route.model))
  end
end

-- What a client's API asks that the other API has no way to say: served there, the answer came
-- without it as if it were all there was (logprobs null to code that reads them, prose where
-- audio or a function_call was asked, a prefill answered anew and the client's continuation of
-- it garbled) -> the field, and why | nil. A field a provider of the other API may leave out
-- (a sampling hint, thinking) is not one of these.
local not_translated
do
  local function untranslatable(b, api)
    if api == "anthropic" then
      -- (OpenAI's API answers a last assistant message with a turn of its own, not its continuation)
      local last = type(b.messages) == "table" and b.messages[#b.messages]
      if type(last) == "table" and last.role == "assistant" then
        local content = last.content
        for _, block in ipairs(type(content) == "table" and content or { { text = content } }) do
          if type(block) == "table" and type(block.text) == "string" and block.text:find("%S") then
            return "messages", "a last assistant message (a prefill) is continued by Anthropic's API only"
          end
        end
      end
      -- (the MCP connector's tools are the servers' own: served elsewhere, answered without any)
      if type(b.mcp_servers) == "table" and next(b.mcp_servers) ~= nil then
        return "mcp_servers", "the MCP connector is Anthropic's only"
      end
      return nil
    end
    -- (each field's type asked only when the request has it: a type() call is some 300
    -- instructions, and a request seldom has any of these)
    if b.logprobs == true then return "logprobs", "Anthropic's API has no log probabilities" end
    if b.top_logprobs ~= nil and type(b.top_logprobs) == "number" and b.top_logprobs > 0 then
      return "top_logprobs", "Anthropic's API has no log probabilities"
    end
    if b.logit_bias ~= nil and type(b.logit_bias) == "table" and next(b.logit_bias) ~= nil then
      return "logit_bias", "Anthropic's API has no logit bias (token ids are OpenAI's)"
    end
    if b.modalities ~= nil and type(b.modalities) == "table" then
      for _, m in ipairs(b.modalities) do
        if m == "audio" then return "modalities", "Anthropic's API answers no audio" end
      end
    end
    if b.functions ~= nil and type(b.functions) == "table" and next(b.functions) ~= nil then
      return "functions", "the legacy functions are OpenAI's only (send them as tools)"
    end
    if b.web_search_options ~= nil and type(b.web_search_options) == "table" then
      return "web_search_options", "Anthropic's API searches with its own tool (send it in tools: "
        .. "{type = \"web_search_20250305\", name = \"web_search\"})"
    end
  end

  -- a request untranslatable(b, api) finds, for a route whose first target (the one that
  -- serves it unless it fails) speaks the other API -> the 400's message, the field | nil. A
  -- fallback to the other API leaves the field out (as it leaves out the client's own fields:
  -- README, "Fields of the client's own API"); a route that would serve it there first is
  -- refused, as the API would refuse a field it does not take.
  function not_translated(b, api, route, rec)
    local field, why = untranslatable(b, api)
    if not field then return nil end
    local ok, targets = pcall(ai.targets, { model = route.model, fallback = route.fallback, user = rec.name,
      messages = b.messages })
    local first = ok and type(targets) == "table" and targets[1]
    if not first or first.adapter.name == api then return nil end -- (no target: the call says why)
    return ("%s: not served by %s/%s, which speaks another API than this endpoint's: %s"):format(field,
      first.provider, first.model, why), field
  end
end

local function complete(req, api)
  local id = request_id()
  local rec, refused = authenticate(req, api)
  -- (refusals before the call carry Anthropic's request-id too: its SDK's error.requestID)
  if not rec then return anthropic_id(with_id(refused, id), api) end
  local permits, full = admit(rec, api, req)
  if not permits then return anthropic_id(with_id(full, id), api) end
  if permits == NO_PERMITS then return anthropic_id(complete_admitted(req, api, id, rec), api) end
  local held = false
  -- handed = true: a call run to its end in a task of its own (resil.once's) holds them; a call
  -- under resil.shield (call_to_end) runs in this task, which holds them to its end
  local slot = { permits = permits }
  local _ <close> = setmetatable({}, { __close = function()
    if not held and not slot.handed then permits:release() end
  end })
  local reply = complete_admitted(req, api, id, rec, slot)
  reply, held = hold(reply, permits)
  return anthropic_id(reply, api)
end

function complete_admitted(req, api, id, rec, slot)
  local b, bad_json = decode_body(req.body)
  if not_object(b) then
    return with_id(error_reply(api, 400, not_object_message(bad_json), { code = "invalid_json" }), id)
  end
  let_others_in(req.body)
  access.model(req, b.model)
  local bad_model = check_model(b.model)
  if bad_model then return with_id(error_reply(api, 400, bad_model, { code = "invalid_model" }), id) end
  local bad = check_messages(b.messages) or check_tools(b.tools) or not_finite(b)
  if bad then return with_id(error_reply(api, 400, bad), id) end
  if not model_allowed(rec, b.model) then
    return with_id(error_reply(api, 403, ("key '%s' may not use model '%s'"):format(rec.name, b.model),
      { code = "model_not_allowed" }), id)
  end
  local route, why = route_model(b.model, api)
  if not route then return with_id(error_reply(api, 404, why, { code = "model_not_found" }), id) end
  local unpriced = unpriced_tier(b, api, route)
  if unpriced then return with_id(error_reply(api, 400, unpriced), id) end
  local untranslated, field = not_translated(b, api, route, rec)
  if untranslated then
    return with_id(error_reply(api, 400, untranslated, { code = "unsupported_parameter", param = field }), id)
  end
  -- (the Messages API has no default: a client that relied on ours would fail on Anthropic's own)
  if api == "anthropic" and (b.max_tokens == nil or b.max_tokens == null) then
    return with_id(error_reply(api, 400, "max_tokens: Field required"), id)
  end
  -- A message thread (the beta message-threads-2026-08-12: the Anthropic SDK's toolRunner
  -- threads by default) is a conversation the provider holds under its answer's id: the
  -- gateway gives its own ids, may fall back to OpenAI or another account, and the next turn
  -- sent only its new messages (a lone tool_result, refused). Refused as the API refuses what
  -- it cannot thread, so that the SDK sends the whole conversation, unthreaded.
  if api == "anthropic" and b.thread ~= nil and b.thread ~= null then
    return with_id(error_reply(api, 400, "thread: message threads are not served by this gateway; send the whole "
      .. "conversation", { details = { error_code = "thread_unsupported_request", unsupported = { "thread" } } }), id)
  end
  local r = api == "anthropic" and from_anthropic(b) or from_openai(b)
  local asked = api == "anthropic" and b.max_tokens or asked_max_tokens(b)
  if (asked ~= nil and asked ~= null and r.max_tokens == nil) or (r.max_tokens ~= nil and r.max_tokens < 1) then
    return with_id(error_reply(api, 400, "max_tokens must be a positive integer"), id)
  end
  -- "stream": "true" is not a stream: served as one answer, a client reading events would hang
  if b.stream ~= nil and b.stream ~= null and type(b.stream) ~= "boolean" then
    return with_id(error_reply(api, 400, "stream must be true or false"), id)
  end
  -- the answer carries one choice: n > 1 would be billed n times for one
  if b.n ~= nil and b.n ~= null and b.n ~= 1 then
    return with_id(error_reply(api, 400, "n must be 1: the gateway answers with one choice",
      { code = "unsupported_value" }), id)
  end
  r.model, r.fallback = route.model, route.fallback
  r.user = rec.name
  -- the betas an Anthropic client turns on go to Anthropic only (a fallback elsewhere has none)
  local beta = api == "anthropic" and req.headers["anthropic-beta"]
  if beta and beta ~= "" then
    -- (a long context is billed at its own prices, which the ledger does not know: as service_tier)
    if beta:find("context-1m", 1, true) then
      return with_id(error_reply(api, 400, "anthropic-beta context-1m is not served: the gateway prices standard "
        .. "context only"), id)
    end
    r.provider_headers = { anthropic = { ["anthropic-beta"] = beta } }
  end
  r.ledger_sync, r.ledger_wait = gateway.config.ledger_sync, gateway.config.ledger_wait
  if rec.budget then r.budget = host_limits.budget("key:" .. rec.name, rec.budget) end
  let_others_in(req.body) -- (before the key's limits are charged: a client gone meanwhile spends none)
  local idem = req.headers["idempotency-key"]
  local once_spec, res, err, replayed
  if idem and idem ~= "" and b.stream ~= true then
    -- (an Anthropic client's betas change what is asked as its body does: the same body with
    -- another anthropic-beta under the key was the first answer again, not the 422 another body gets;
    -- added only when sent, so that the fingerprints kept before stay the same)
    once_spec = { key = ("gateway:%s:%s"):format(rec.id or "-", idem),
      fingerprint = resil.hash(api .. "\0" .. req.body .. (beta and beta ~= "" and ("\0" .. beta) or "")) }
    -- an answer already kept under the key is served before the key's rate limits: it calls no
    -- provider (an SDK's retry after a timeout, its tpm spent by that first call, got 429s)
    replayed, res, err = resil.once_replay(once_spec)
  end
  local limited, tpm
  if not replayed then
    limited, tpm = key_limits(rec, api, req.body, r.max_tokens)
    if limited then return with_id(limited, id) end
  end

  -- tools, or a JSON schema (whose refusal a text stream cannot carry)
  -- (types asked only of fields the request has: most have neither)
  local tools = r.tools ~= nil and type(r.tools) == "table" and next(r.tools) ~= nil
  local schema = b.response_format ~= nil and type(b.response_format) == "table" and
    b.response_format.type == "json_schema"
  if b.stream == true then
    -- a provider of the client's own API: its events are relayed as they come; the other
    -- API's, with tools: read to its end inside its attempt (still retried, fallen back from)
    r.raw_events, r.read_whole = api, tools or schema
    local ok, s = pcall(ai.stream, r)
    if not ok then return with_id(ai_error_reply(api, s), id) end
    -- closed here unless the reply takes it over (a client leaving before the first delta)
    local handed_over, reader = false, nil
    local _ <close> = setmetatable({}, { __close = function()
      if handed_over then return end
      if not reader then return s:close() end
      -- (once its reader has ended: closed while the reader's cancel waited for the provider's
      -- status, ai's cancel_grace, the 200 it then read was never recorded, and its hold was kept)
      reader:cancel()
      resil.spawn(function()
        reader:join()
        s:close()
      end)
    end })
    -- up to the first delta a failure is retried and fallen back from; only then does the reply start
    local opened, first, err
    -- the reply as relayed from its first delta: the provider's own events to a client of its API,
    -- else translated (the other API's with tools or a JSON schema: the whole answer's events)
    local function relayed(delta, headers)
      local t = s.target or {}
      if t.adapter and t.adapter.name == api then return own_stream(s, api, id, b, headers, stops.of(b, api))
      elseif tools or schema then return whole_stream(s, api, id, b, headers)
      elseif api == "anthropic" then return anthropic_stream(s, delta, id, b.model, headers, r, stops.of(b, api)) end
      return openai_stream(s, delta, id, b.model, b, headers, stops.of(b, api))
    end
    -- A first delta that takes long (read whole, the answer's end; relayed, a reasoning model's
    -- thinking or a long prompt's first token): past KEEPALIVE_AFTER the reply starts and is kept
    -- alive (whole_stream). Silent, a proxy in front (nginx's proxy_read_timeout,
    -- a load balancer's 60 s) cut the connection, and the stream, paid, was lost.
    reader = resil.spawn(pcall, s.next, s)
    local done, ok, delta, e = reader:join(TUNED.KEEPALIVE_AFTER)
    if done == nil then
      handed_over = true
      local headers = { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache", ["x-request-id"] = id }
      return correcting_stream(utf8_stream(whole_stream(s, api, id, b, headers, reader, req,
        not r.read_whole and relayed or nil)), tpm, s)
    end
    if not done then error(ok, 0) end -- (the reader itself failed: the host's caps)
    opened, first, err = ok, delta, e
    if not opened then
      if host_failure(first) then error(first, 0) end
      -- a body no provider can be sent is the client's 400 (as ai.chat's); anything else, a provider's
      -- event an adapter could not read, is a 502 that does not show the gateway's own error
      local text = tostring(first)
      if text:find("serialise", 1, true) or text:find("nesting", 1, true) then
        return with_id(error_reply(api, 400, public_message((text:gsub("^[^:]*:%d+: ", "")))), id)
      end
      resil.log.warn("gateway: a stream could not be opened", { error = text })
      return with_id(error_reply(api, 502, UNREADABLE.message, { code = "bad_upstream_stream" }), id)
    end
    if err then return with_id(ai_error_reply(api, err), id) end
    -- its client left as the provider answered: the cancel waited for the status (ai's
    -- cancel_grace) and is done at the next wait; a reply now would be dropped unread with the
    -- stream in it, recorded and its hold given back only when collected. Closed here instead.
    if resil.running():cancel_pending() then return with_id(error_reply(api, 499, "the client left"), id) end
    local t = s.target or {}
    access.upstream(req, s.provider_request_id)
    local headers = { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache", ["x-request-id"] = id,
      ["x-resil-provider"] = t.provider, ["x-resil-model"] = t.model, ["x-resil-attempts"] = tostring(s.attempts or 1) }
    handed_over = true
    return correcting_stream(utf8_stream(relayed(first, headers)), tpm, s)
  end

  if replayed then -- (kept: res, err)
  elseif once_spec then
    res, err, replayed = once_to_end(slot, r, once_spec, tpm, ai.chat, function(v)
      -- stored with the answer's own id and time: a replay is the same answer, not a twin of
      -- it (a same-API answer as the text relayed, its thinking blocks and all)
      v.own_answer = own_answer(v, api, id, b.model, stops.of(b, api))
      v.raw, v.answer_id, v.answer_created = nil, id, math.floor(resil.clock.wall())
    end)
  else
    res, err = call_to_end(r, correcting_tpm(tpm, ai.chat))
  end
  if not res then
    local reply = ai_error_reply(api, err)
    -- a failure kept under the key, given again (or a copy still running):
    -- nothing was spent by this request
    if replayed then reply.headers["x-resil-cost-usd"] = "0.000000" end
    return with_id(reply, id)
  end
  local headers = answer_headers(id, res)
  access.upstream(req, res.provider_request_id)
  if replayed then -- the first answer again, not billed again: adding up the header must not count it twice
    headers["x-resil-replayed"] = "true"
    headers["x-resil-cost-usd"] = "0.000000"
  end
  local answer_id = math.type(res.answer_created) and type(res.answer_id) == "string" and res.answer_id or id
  local body = own_answer(res, api, answer_id, b.model, stops.of(b, api))
  if not body then -- (an answer of the other API's, translated: cut at a stop it was not sent, see stops)
    local stop_list = stops.of(b, api)
    if stop_list then stops.cut(res, stop_list) end
    body = api == "anthropic" and json.encode(anthropic_answer(res, answer_id, b.model))
      or openai_answer_json(res, answer_id, b.model, res.answer_created)
  end
  return { status = 200, headers = headers, body = valid_utf8(body) }
end

-- A vector in the encoding its client asked for. The official SDKs ask for base64 when their
-- caller names none, and decode whatever comes back as base64: a compatible server that
-- ignores encoding_format (LM Studio, Infinity, TEI) answers floats, which the SDK decoded
-- as garbage without a word (Buffer.from([0.5, ...]) is bytes). Floats are packed here as
-- the API packs them (little-endian float32s).
local function base64_floats(v)
  local n = #v
  for i = 1, n do if type(v[i]) ~= "number" then return v end end -- (not a vector: as it came)
  local packed, f4096 = {}, "<" .. ("f"):rep(4096)
  for i = 1, n, 4096 do -- (in runs: one unpack of a whole vector is capped by the Lua stack)
    local last = math.min(i + 4095, n)
    packed[#packed + 1] = string.pack(last - i == 4095 and f4096 or "<" .. ("f"):rep(last - i + 1), table.unpack(v, i, last))
  end
  return resil.crypto.base64(table.concat(packed))
end
local function encoded(v, base64)
  if base64 and type(v) == "table" then return base64_floats(v) end
  return v
end

-- An embeddings answer as the client reads it: the vectors in C's JSON (one string kept under an
-- Idempotency-Key: kept as a table, resil.once wrote every number in Lua, 0.27 s on the loop for
-- 100 vectors of 1,536, and no byte cap counted them)
-- Written a vector at a time, the loop let in every 64k numbers: a batch of 2,048 vectors of
-- 1,536 floats is 3 million numbers, a second and a half of JSON, which in one encode held every
-- other request on the worker (and the watchdog stopped it at --max-task-seconds, a 503).
TUNED.YIELD_EVERY = 65536
local function embeddings_body(res, model, format)
  local base64 = format == "base64"
  local n = res.usage and res.usage.input_tokens or 0
  local parts, numbers = { '{"object":"list","model":', json.encode(model), ',"usage":',
    json.encode({ prompt_tokens = n, total_tokens = n }), ',"data":[' }, 0
  for i, v in ipairs(res.embeddings) do
    parts[#parts + 1] = (i > 1 and ',{"object":"embedding","index":' or '{"object":"embedding","index":') .. (i - 1)
      .. ',"embedding":' .. json.encode(encoded(v, base64)) .. "}"
    numbers = numbers + (type(v) == "table" and #v or 1)
    if numbers >= TUNED.YIELD_EVERY and resil.running() then
      numbers = 0
      resil.yield()
    end
  end
  parts[#parts + 1] = "]}"
  return table.concat(parts)
end
-- past config.idempotency_keep_max an answer is served but not kept under its key (the
-- store's own cap is 32 MB as JSON, written out twice on Redis): a retry is told so, and
-- is not called and billed again
local function keep_max() return tonumber(gateway.config.idempotency_keep_max) or 8 * 1024 * 1024 end

-- POST /v1/embeddings (OpenAI's shape; vectors, or base64 strings when the client asks, as the SDKs do)
local function embeddings(req)
  local id = request_id()
  local rec, refused = authenticate(req, "openai")
  if not rec then return with_id(refused, id) end
  local permits, full = admit(rec, "openai", req)
  if not permits then return with_id(full, id) end
  -- (held to this handler's end: its call runs shielded in it, call_to_end; or, handed, to the
  -- end of the call resil.once runs in a task of its own under an Idempotency-Key)
  local slot = { permits = permits }
  local _ <close> = setmetatable({}, { __close = function() if not slot.handed then permits:release() end end })
  local b, bad_json = decode_body(req.body)
  if not_object(b) then
    return with_id(error_reply("openai", 400, not_object_message(bad_json), { code = "invalid_json" }), id)
  end
  access.model(req, b.model)
  local bad_model = check_model(b.model)
  if bad_model then return with_id(error_reply("openai", 400, bad_model, { code = "invalid_model" }), id) end
  local input = b.input
  if type(input) ~= "string" and (type(input) ~= "table" or #input == 0) then
    return with_id(error_reply("openai", 400, "input must be a string or a non-empty array"), id)
  end
  if not model_allowed(rec, b.model) then
    return with_id(error_reply("openai", 403, ("key '%s' may not use model '%s'"):format(rec.name, b.model),
      { code = "model_not_allowed" }), id)
  end
  local route, why = route_model(b.model, "openai")
  if not route then return with_id(error_reply("openai", 404, why, { code = "model_not_found" }), id) end
  local r = { model = route.model, fallback = route.fallback, input = input, dimensions = whole(b.dimensions),
    encoding_format = type(b.encoding_format) == "string" and b.encoding_format or nil, user = rec.name,
    ledger_sync = gateway.config.ledger_sync, ledger_wait = gateway.config.ledger_wait }
  if rec.budget then r.budget = host_limits.budget("key:" .. rec.name, rec.budget) end
  -- an Idempotency-Key as on a chat (its retry after a timeout was billed again): the key's
  -- record is the chat's (one key, one request), the body told apart by its endpoint
  local idem = req.headers["idempotency-key"]
  local once_spec, replayed, res, err
  if idem and idem ~= "" then
    once_spec = { key = ("gateway:%s:%s"):format(rec.id or "-", idem), fingerprint = resil.hash("embeddings\0" .. req.body) }
    replayed, res, err = resil.once_replay(once_spec)
  end
  local limited, tpm
  if not replayed then
    limited, tpm = key_limits(rec, "openai", req.body)
    if limited then return with_id(limited, id) end
  end
  if replayed then -- (kept: res, err)
  elseif once_spec then
    local served
    res, err, replayed = once_to_end(slot, r, once_spec, tpm, ai.embed, function(v)
      local body = embeddings_body(v, b.model, r.encoding_format)
      v.embeddings = nil
      if #body > keep_max() then served, v.not_kept = body, true else v.body = body end
    end)
    if served and res then res.body = served end
  else
    -- run to its end as a chat is: the provider bills it whether or not its client stays
    res, err = call_to_end(r, correcting_tpm(tpm, ai.embed))
  end
  if not res then
    local reply = ai_error_reply("openai", err)
    if replayed then reply.headers["x-resil-cost-usd"] = "0.000000" end
    return with_id(reply, id)
  end
  if res.not_kept and not res.body then -- (a replay of an answer too large to keep)
    local reply = error_reply("openai", 409, ("the answer under this Idempotency-Key was served once and was too " ..
      "large to keep (over %d bytes): it is not served again, nor called and billed again"):format(keep_max()),
      { code = "idempotency_answer_not_kept" })
    reply.headers["x-resil-cost-usd"] = "0.000000"
    reply.headers["x-should-retry"] = "false" -- (the SDKs retry a 409, a lock's timeout: this one is for good)
    return with_id(reply, id)
  end
  local headers = answer_headers(id, res)
  access.upstream(req, res.provider_request_id)
  if replayed then -- the first answer again, not billed again
    headers["x-resil-replayed"] = "true"
    headers["x-resil-cost-usd"] = "0.000000"
  end
  return { status = 200, headers = headers, body = res.body or embeddings_body(res, b.model, r.encoding_format) }
end

-- The names GET /v1/models lists, with the provider each is pinned to: the config's models and the
-- registry's aliases a chat can be sent to (and those it cannot, `refused`), sorted by id in `all`.
-- Worked out once a second per registry and config: each alias is resolved, and a registry of
-- thousands of aliases held the loop on every list or retrieve (170 ms for 5,000), every other
-- request of the process waiting. A sunset is seen within the second, as registry.resolve's is.
local listing = {}
local function listing_now()
  local entries, models, t = registry().entries, gateway.config.models, resil.store_now()
  local l = listing
  if l.entries == entries and l.models == models and t < l.expires then return l end
  l = { entries = entries, models = models, expires = t + 1, owner = {}, refused = {}, all = {} }
  -- the provider a model is pinned to, through aliases naming aliases (an alias named as a
  -- provider's model, "openai/gpt-4o" = { use = "anthropic/..." }, is the alias: it was listed as
  -- owned by openai while anthropic served its calls)
  local function provider_of(model)
    for _ = 1, 9 do
      if type(model) ~= "string" then return nil end
      local e = entries[model]
      local next_model = type(e) == "table" and (e.use or type(e.deployments) == "table" and (e.deployments[1] or {}).use)
      if not next_model then return model:match("^([%w_%-]+)/") end
      model = next_model
    end
  end
  l.provider_of = provider_of
  -- an alias a chat can be sent to now: not one whose models passed their sunset with no
  -- replacement (a 404 model_retired), nor a job provider's (video-hq, voice: a 400 "has no chat
  -- API"), each listed before and then refused to the client that took the list's word
  local function chat_alias(name)
    local ok, plan = pcall(registry().resolve, name, {}, 2, true) -- (a listing, not a call: not counted)
    if not ok or plan.err then return false end
    local first = plan.choices and plan.choices[1]
    local p = type(first) == "table" and type(first.model) == "string" and first.model:match("^([%w_%-]+)/")
    if not p then return true end
    local found, module = pcall(ai.provider_module, p)
    return not (found and type(module) == "table" and not module.url)
  end
  local owner = l.owner
  for name, m in pairs(models) do
    owner[name] = provider_of(type(m) == "table" and m.model or m) or "resil"
  end
  for name, e in pairs(entries) do
    if type(e) == "table" and (e.use or e.deployments) and not owner[name] then
      if chat_alias(name) then owner[name] = provider_of(name) or "resil" else l.refused[name] = true end
    end
  end
  for name, by in pairs(owner) do l.all[#l.all + 1] = { id = name, owned_by = by } end
  table.sort(l.all, function(a, b) return a.id < b.id end)
  listing = l
  return l
end

-- the models a key may use: the config's, the registry's aliases (by the
-- provider each is pinned to) and the key's own list, sorted by id (shared: read it only)
local function model_list(rec)
  local l = listing_now()
  if not rec.models or #rec.models == 0 then return l.all end
  -- (a key's own list names them too: those the registry refuses left out there as well)
  local data, seen = {}, {}
  for _, m in ipairs(rec.models) do
    if not seen[m] and (l.owner[m] or not l.refused[m]) then
      seen[m] = true
      data[#data + 1] = { id = m, owned_by = l.owner[m] or l.provider_of(m) or "resil" }
    end
  end
  table.sort(data, function(a, b) return a.id < b.id end)
  return data
end

-- the provider/model ids the config's models and the registry's aliases send calls to (their
-- fallbacks, deployments and migrations too) -> a set
local function model_targets()
  local set = {}
  local function add(m)
    if type(m) == "string" then set[m:match("^([^:]+)")] = true
    elseif type(m) == "table" then for _, v in ipairs(m) do add(type(v) == "table" and v.use or v) end end
  end
  for _, m in pairs(gateway.config.models) do
    if type(m) == "table" then add(m.model) add(m.fallback) else add(m) end
  end
  for _, e in pairs(registry().entries) do
    if type(e) == "table" then
      add(e.use) add(e.fallbacks) add(e.deployments) add(e.replacement)
      if type(e.migrate) == "table" then add(e.migrate.to) end
    end
  end
  return set
end

-- a model in the asking SDK's shape: Anthropic's SDK sends anthropic-version
local function model_object(m, api)
  if api == "anthropic" then
    -- (every field of its SDK's ModelInfo, none absent: a name the gateway serves is active, and
    -- what an alias's targets may differ in is null, unknown)
    return { type = "model", id = m.id, display_name = m.id, created_at = "1970-01-01T00:00:00Z",
      capabilities = null, lifecycle = m.lifecycle or "active", deprecated_at = null, retires_at = m.retires_at or null,
      line = null, max_input_tokens = null, max_tokens = null }
  end
  return { id = m.id, object = "model", created = 0, owned_by = m.owned_by }
end

local function models_api(req) return req.headers["anthropic-version"] and "anthropic" or "openai" end

-- a models answer or refusal with its request id, as every other answer has (an SDK's
-- error.requestID, _request_id, was undefined on these routes)
local function with_request_id(reply, api)
  reply.headers = reply.headers or { ["content-type"] = "application/json" }
  reply.headers["x-request-id"] = reply.headers["x-request-id"] or request_id()
  return anthropic_id(reply, api)
end

-- GET /v1/models
local function models(req)
  local api = models_api(req)
  local rec, refused = authenticate(req, api)
  if not rec then return refused end
  local data = model_list(rec)
  if api == "anthropic" then
    -- a page of the list, sorted by id, as the API pages it (limit 1-1000, 20 by default;
    -- after_id or before_id the cursor): its SDK's list({limit}) read every model on one page
    -- whatever the limit, and a before_id got the whole list again
    local q = resil.url.query(req.query)
    local limit = q.limit == nil and 20 or tonumber(q.limit)
    if not limit or limit ~= math.floor(limit) or limit < 1 or limit > 1000 then
      return error_reply(api, 400, "limit: Input should be an integer between 1 and 1000")
    end
    local after, before = q.after_id ~= "" and q.after_id or nil, q.before_id ~= "" and q.before_id or nil
    if after and before then
      return error_reply(api, 400, "after_id and before_id cannot both be set")
    end
    local kept = {}
    for _, m in ipairs(data) do
      if (not after or m.id > after) and (not before or m.id < before) then kept[#kept + 1] = m end
    end
    local first, last = 1, math.min(#kept, limit)
    if before then first, last = math.max(1, #kept - limit + 1), #kept end -- (the models just before it)
    local page = {}
    for i = first, last do page[#page + 1] = model_object(kept[i], api) end
    local more = before and first > 1 or not before and last < #kept
    return { status = 200, body = json.encode({ data = setmetatable(page, json.array_mt), has_more = more,
      first_id = page[1] and page[1].id or null, last_id = page[#page] and page[#page].id or null }) }
  end
  local list = {}
  for i, m in ipairs(data) do list[i] = model_object(m, api) end
  return { status = 200, body = json.encode({ object = "list", data = setmetatable(list, json.array_mt) }) }
end

-- GET /v1/models/{id} (the id percent-encoded, as the SDKs send "provider/model")
local function model_by_id(req, id)
  local api = models_api(req)
  local rec, refused = authenticate(req, api)
  if not rec then return refused end
  id = resil.url.unescape(id)
  for _, m in ipairs(model_list(rec)) do
    if m.id == id then return { status = 200, body = json.encode(model_object(m, api)) } end
  end
  -- a provider's model as a chat names it ("openai/gpt-4o-mini", the SDKs' retrieve sends it
  -- "openai%2Fgpt-4o-mini"): found when the key may use it and the gateway knows the model, by
  -- its price or as a model the config or the registry sends calls to (before: a 404, while a chat
  -- naming it was served). The provider's catalog is not known here: another name is a 404.
  local provider, name = id:match("^([%w_%-]+)/(.+)$")
  if provider and not check_model(id) and model_allowed(rec, id) and (pricing.price(provider, name) or
      model_targets()[id]) and (ai.provider_module(provider) or {}).url then -- (a job provider's: no chat)
    -- (one the registry marks deprecated is so, retiring at its sunset: a client keeping the
    -- active models kept it, while the gateway routes its calls elsewhere at that date)
    local entries = registry().entries
    local d = entries[id] or entries[name]
    local deprecated = type(d) == "table" and d.deprecated == true
    -- (past its sunset with no replacement a chat naming it is a 404 model_retired: found here, a
    -- client that checked the model with retrieve before using it took it for one it could call)
    if deprecated then
      local ok, plan = pcall(registry().resolve, id, {}, 2, true)
      if ok and plan.err then
        return error_reply(api, 404, public_message(tostring(plan.err.message)), { code = "model_retired" })
      end
    end
    return { status = 200, body = json.encode(model_object({ id = id, owned_by = provider,
      lifecycle = deprecated and "deprecated" or nil,
      retires_at = deprecated and type(d.sunset) == "string" and d.sunset .. "T00:00:00Z" or nil }, api)) }
  end
  -- (the id as UTF-8: a character cut at the bound dropped, bytes that are not UTF-8 shown as "?";
  -- echoed as they came, the 404 was a body no client could read)
  local shown = id:sub(1, MODEL_MAX)
  if not utf8.len(shown) then
    -- (the bound's cut only: "a\xFFb", whole, was shown as 'a', another model's id)
    for cut = 1, #id > MODEL_MAX and 3 or 0 do
      if utf8.len(shown:sub(1, -cut - 1)) then shown = shown:sub(1, -cut - 1) break end
    end
    if not utf8.len(shown) then shown = shown:gsub("[\128-\255]", "?") end
  end
  return error_reply(api, 404, ("The model '%s' does not exist or this key may not use it"):format(
    public_message(shown)), { code = "model_not_found" })
end

-- count_tokens' own rate for a key with rpm: at the key's rpm, apart from its calls', as Anthropic
-- limits count_tokens apart from Messages (a client counting before each message would otherwise
-- get half its rpm for messages) -> nil | a 429 reply
local function count_limit(rec)
  if not rec.rpm then return nil end
  local buckets = key_buckets(rec)
  if not buckets.count_rpm then
    buckets.count_rpm = host_limits.bucket("gateway:" .. rec.id .. ":count_rpm", { rate = rec.rpm, per = 60, burst = rec.rpm,
      shared = buckets.shared })
  end
  local ok, wait = buckets.count_rpm:try(1)
  if ok then return nil end
  return error_reply("anthropic", 429, ("key '%s': %d count_tokens requests per minute"):format(rec.name, rec.rpm),
    { headers = retry_headers(wait) })
end

-- POST /v1/messages/count_tokens (Anthropic's; the SDK's messages.countTokens): asked of the
-- model's first target that speaks an API that counts (Anthropic's: exact, and free), in the
-- order a call tries them (deployments, fallbacks), passing over one whose breaker is open or
-- that fails; a model no counting API serves (OpenAI's has no count) is a 400 saying so, never
-- an estimate a client would take for a count. The API bills
-- nothing for it: no ledger row, budget or tpm of the key. It is a request to the provider all
-- the same: it holds a permit of the gateway's and the key's concurrency while it runs, is
-- limited at the key's rpm in a bucket of its own (count_limit), and is refused at once while
-- every counting target's breaker is open (a provider failing its calls would hold it to its timeout); its
-- outcome is not the breaker's to count (its own endpoint and limits: its 429 says nothing of
-- Messages, and a half-open breaker's probes are for calls).
local function count_tokens(req)
  local id = request_id()
  local rec, refused = authenticate(req, "anthropic")
  if not rec then return anthropic_id(with_id(refused, id), "anthropic") end
  local function refuse(status, message, o) return anthropic_id(with_id(error_reply("anthropic", status, message, o), id), "anthropic") end
  local permits, full = admit(rec, "anthropic", req)
  if not permits then return anthropic_id(with_id(full, id), "anthropic") end
  local _ <close> = permits
  local b, bad_json = decode_body(req.body)
  if not_object(b) then return refuse(400, not_object_message(bad_json)) end
  let_others_in(req.body)
  local bad = check_model(b.model) or check_messages(b.messages) or check_tools(b.tools)
  if bad then return refuse(400, bad) end
  if not model_allowed(rec, b.model) then
    return refuse(403, ("key '%s' may not use model '%s'"):format(rec.name, b.model))
  end
  local route, why = route_model(b.model, "anthropic")
  if not route then return refuse(404, why) end
  local ok, targets, terr = pcall(ai.targets, { model = route.model, fallback = route.fallback, user = rec.name,
    messages = b.messages })
  if not ok or not targets then
    local e = ok and terr or targets
    if resil.is_error(e) and e.kind == "missing_secret" then
      resil.log.warn("gateway: count_tokens has no key for its provider", { provider = e.provider })
      return refuse(500, ("the gateway has no key for %s"):format(tostring(e.provider)))
    end
    return refuse(404, public_message(tostring(resil.is_error(e) and e.message or e):gsub("^[^:]*:%d+: ", "")))
  end
  -- the targets that count, in the call's order, less those whose breaker is open
  local counting, open
  for _, t in ipairs(targets) do
    if t.adapter.count_tokens_url then
      local breaker = t.caller and t.caller.breaker
      local state = breaker and breaker:state()
      if state == "open" or state == "isolated" then open = open or { t, state }
      else
        counting = counting or {}
        counting[#counting + 1] = t
      end
    end
  end
  if not counting and not open then
    return refuse(400, ("count_tokens is served for models of an API that counts tokens (Anthropic's); '%s' is "
      .. "served by %s, which has none"):format(b.model, tostring(targets[1] and targets[1].provider)))
  end
  if not counting then
    local t = open[1]
    return refuse(503, ("%s is failing its calls (its breaker is %s): count_tokens is not asked of it"):format(
      t.deployment or t.provider, open[2]))
  end
  local limited = count_limit(rec)
  if limited then return anthropic_id(with_id(limited, id), "anthropic") end
  local beta = req.headers["anthropic-beta"]
  -- a target that fails as a call falls back on (policies.classify's fallback: its transport, a 5xx, a 429, a
  -- 404 for a model it does not serve) gives way to the next that counts
  local res, err, t
  for _, target in ipairs(counting) do
    t = target
    local adapter, conf = t.adapter, t.conf
    local base = (conf.base_url or os.getenv(adapter.base_env or "") or adapter.default_base):gsub("/+$", "")
    local headers = adapter.headers(t.key or nil, conf)
    if beta and beta ~= "" then headers["anthropic-beta"] = headers["anthropic-beta"] and headers["anthropic-beta"] .. "," .. beta or beta end
    res, err = resil.http.request({ method = "POST", url = adapter.count_tokens_url(base), headers = headers,
      body = json.encode(adapter.count_tokens_body(b, t.model)), timeout = conf.timeout or 60 })
    if res and res.status < 300 then break end
    local verdict = classify.outcome(res, err)
    if not (verdict and verdict.fallback) then break end
  end
  if not res then
    return refuse(err and err.kind == "timeout" and 504 or 502, public_message(tostring(err and err.message or err)))
  end
  if res.status ~= 200 then
    local e = json.decode(res.body or "")
    e = type(e) == "table" and type(e.error) == "table" and e.error or {}
    -- (the gateway's provider key refused is not the client's fault)
    local status = (res.status == 401 or res.status == 403) and 502 or res.status
    -- (a 429's or 503's Retry-After is the provider's word on when to ask again: the SDK waits for it)
    local after = (status == 429 or status == 503 or status == 529) and res.headers and res.headers["retry-after"]
    -- (and no retry of the client's changes the key refused: an SDK retries a 502)
    local headers = status ~= res.status and { ["x-should-retry"] = "false" } or nil
    if type(after) == "string" and after:find("^%d+$") then headers = { ["retry-after"] = after } end
    return refuse(status, public_message(tostring(e.message or ("the upstream answered " .. res.status))),
      { type = status == res.status and type(e.type) == "string" and e.type or nil, headers = headers,
        details = REQUEST_FAULTS[status] and error_details(e.details) or nil })
  end
  return anthropic_id(with_id({ status = 200, headers = { ["content-type"] = "application/json",
    ["x-resil-provider"] = t.provider, ["x-resil-model"] = t.model }, body = res.body }, id), "anthropic")
end

gateway.routes = {
  ["POST /v1/chat/completions"] = function(req) return complete(req, "openai") end,
  ["POST /v1/messages"] = function(req) return complete(req, "anthropic") end,
  ["POST /v1/messages/count_tokens"] = count_tokens,
  ["POST /v1/embeddings"] = embeddings,
  ["GET /v1/models"] = models,
  ["GET /health"] = function() return { status = 200, body = '{"status":"ok"}' } end,
  ["GET /metrics"] = function(req)
    -- (open by default, as Prometheus scrapes; its budget series name teams and their spend)
    local want = gateway.config.metrics_key
    if want ~= nil then
      local got = bearer(req) or ""
      -- digests compared: the same length whatever was sent, in constant time
      if not resil.crypto.equal(resil.crypto.sha256(got), resil.crypto.sha256(tostring(want))) then
        return error_reply("openai", 401, "GET /metrics needs the gateway's metrics_key as its bearer token",
          { code = "invalid_api_key", headers = { ["www-authenticate"] = "Bearer" } })
      end
    end
    -- (with --workers: every worker's figures merged, whichever answers; a 503 when this worker's
    -- could not be written for the merge, a full disk: the merge's would be old, frozen at a 200)
    local ok, text = pcall(host_metrics.scrape)
    if not ok then return error_reply("openai", 503, tostring(text), { code = "metrics_unavailable" }) end
    return { status = 200, headers = { ["content-type"] = "text/plain; version=0.0.4" }, body = text }
  end,
}

-- "METHOD /path", the key of gateway.routes, made once per method and path
-- (an unknown path is not kept: a scan of made-up paths must not grow it)
local route_keys = {}
local function route_key(method, path)
  local by_path = route_keys[method]
  local key = by_path and by_path[path]
  if key then return key end
  key = method .. " " .. path
  if gateway.routes[key] then
    if not by_path then
      by_path = {}
      route_keys[method] = by_path
    end
    by_path[path] = key
  end
  return key
end

-- by route and status, each series bound once (no label key built per request)
local function count_request(label, status)
  local by_status = sub(request_series, label)
  local series = by_status[status]
  if not series then
    series = requests_total:labels({ route = label, status = tostring(status) })
    by_status[status] = series
  end
  series:inc()
end
-- a request that ends without its reply: its client left (its task canceled), or the handler
-- raised (gateway.serve's failed_reply: a 503 for the host's trouble, else a 500)
local COUNT_UNANSWERED = { __close = function(c, err)
  if c.done then return end
  local status = err == nil and 499 or host_failure(err) and 503 or 500
  count_request(c.label, status)
  if c.access then access.line(c.req, c.access, c.label, status, nil) end
end }

-- gateway.handle(req) -> the reply; the server's handler (a task per request)
-- the API a request speaks, for its errors (Anthropic's batches, not served, are 404s its SDK
-- reads): by its path, or, on a path of neither API's own (Anthropic's Files API, /v1/models), by
-- the anthropic-version header its SDK sends (its 404 was OpenAI's invalid_request_error)
local function api_of(path, headers)
  if path == "/v1/messages" or path:find("^/v1/messages/") then return "anthropic" end
  return headers and headers["anthropic-version"] and "anthropic" or "openai"
end

-- the methods gateway.routes serves a path with (HEAD with GET), "GET, HEAD" say, or nil: a request
-- with another method is a 405 saying them in Allow (RFC 9110 15.5.6), not a 404 "no route" that
-- told a client whose GET /v1/chat/completions should have been a POST that the path was wrong
-- (only for a request no route takes: a scan of the few routes, and nothing kept)
local function allowed_methods(path)
  local got = {}
  for key in pairs(gateway.routes) do
    local m, p = key:match("^(%u+) (.*)$")
    if p == path then
      got[#got + 1] = m
      if m == "GET" then got[#got + 1] = "HEAD" end
    end
  end
  if #got == 0 and path:match("^/v1/models/.") then got = { "GET", "HEAD" } end
  if #got == 0 then return nil end
  table.sort(got)
  return table.concat(got, ", ")
end

function gateway.handle(req)
  local path = req.path
  -- "/v1/models/" is "/v1/models" (the path up to its last other byte: gsub("/+$") tried the rest of a
  -- run of slashes from each of them)
  if path:byte(-1) == 47 then path = path:match("^(.*[^/])") or "" end
  -- each request a trace of its own when spans are exported (its provider attempts the children
  -- of its server span, itself a child of the caller's when it sends its W3C trace context); not
  -- exported, a caller's context is carried on to the provider (each request is a task of its own)
  -- (not a probe's or a scraper's: GET /health and /metrics every few seconds would be most traces)
  local span = resil.trace.request(req.headers.traceparent, req.method, path == "/health" or path == "/metrics",
    req.headers.tracestate)
  -- HEAD is GET without the body (the server sends none): a monitor's HEAD /health is not a 404
  local method = req.method == "HEAD" and "GET" or req.method
  local route = gateway.routes[route_key(method, path)]
  local reply
  local one_model = not route and method == "GET" and path:match("^/v1/models/(.+)$")
  local label = route and path or one_model and "/v1/models/{id}" or "other"
  -- counted however the request ends (COUNT_UNANSWERED): a client that left was not counted at all
  -- (its access line: policies/gateway_access.lua)
  local logging = access.start(req, gateway.config)
  local counting <close> = setmetatable({ label = label, req = req, access = logging }, COUNT_UNANSWERED)
  if route == models then
    reply = with_request_id(models(req), models_api(req))
  elseif route then
    reply = route(req)
  elseif one_model then
    reply = with_request_id(model_by_id(req, one_model), models_api(req))
  else
    -- (a HEAD's message names GET, as its GET's does: its Content-Length is the GET's body's)
    -- (the path as UTF-8: bytes of a request line that are not, echoed as they came, made a body that
    -- is not JSON, RFC 8259 8.1)
    local allow, shown = allowed_methods(path), valid_utf8(req.path)
    -- (with its request id, as every other answer: the SDKs' error.requestID was null)
    local api = api_of(path, req.headers)
    if allow then
      reply = with_request_id(error_reply(api, 405, ("%s %s is not allowed: %s only"):format(method, shown, allow),
        { code = "method_not_allowed", headers = { allow = allow } }), api)
    else
      reply = with_request_id(error_reply(api, 404, ("no route %s %s"):format(method, shown),
        { code = "unknown_url" }), api)
    end
  end
  -- an answer made for a client that left meanwhile (a call run to its end under resil.shield)
  -- reaches no one: 499, as nginx counts it, not the 200 nobody got
  local status = resil.running():cancel_pending() and 499 or reply.status or 200
  count_request(label, status)
  counting.done = true
  if logging then
    if type(reply.stream) == "function" and status ~= 499 then access.at_end(req, logging, label, reply)
    else access.line(req, logging, label, status, reply) end
  end
  if span then
    span.name = req.method .. " " .. label -- (the route, not the client's path: a span name is low-cardinality)
    span:finish({ ["http.request.method"] = req.method, ["http.route"] = label,
      ["http.response.status_code"] = status }, status >= 500 and tostring(status) or nil)
  end
  return reply
end

-- gateway.configure(conf): a config file's returned table, merged over the defaults
-- What a config may set, and what each must be: a name it does not know (a typo, max_concurent)
-- or a value of the wrong kind is refused as the config loads, naming both. Taken as they came,
-- a typo was a limit silently not set, and max_concurrent = "lots" served a 500 on every request.
-- (its checks in a block of their own: the main chunk's locals are few, and a project's copy needs room)
local CONFIG_OPTIONS
do
local function is_count(min) return function(v) return math.type(v) == "integer" and v >= min end end
local function is_seconds(v) return type(v) == "number" and v >= 0 and v < math.huge end
local function is_boolean(v) return type(v) == "boolean" end
CONFIG_OPTIONS = {
  models = { "a table of names to models", function(v) return type(v) == "table" end },
  auth = { "true or false", is_boolean },
  key_cache = { "seconds (a number >= 0)", is_seconds },
  max_body = { "bytes (an integer >= 1)", is_count(1) },
  read_timeout = { "seconds (a number > 0)", function(v) return is_seconds(v) and v > 0 end },
  ledger_wait = { "true or false", is_boolean },
  ledger_sync = { "true or false", is_boolean },
  drain_timeout = { "seconds (a number >= 0)", is_seconds },
  idempotency_keep_max = { "bytes (an integer >= 0)", is_count(0) },
  metrics_key = { "a non-empty string", function(v) return type(v) == "string" and v ~= "" end },
  access_log = { "true or false", is_boolean },
  max_concurrent = { "requests (an integer >= 1)", is_count(1) },
  queue = { "requests (an integer >= 0)", is_count(0) },
  queue_timeout = { "seconds (a number >= 0)", is_seconds },
  -- (README: on a Redis store, false keeps a key's rpm/tpm per process; --workers sets it true)
  shared_limits = { "true or false", is_boolean },
}
end
local function option_names()
  local names = {}
  for k in pairs(CONFIG_OPTIONS) do names[#names + 1] = k end
  table.sort(names)
  return table.concat(names, ", ")
end

-- a models entry: "provider/model" (or an alias), or { model = ..., fallback = { ... } }
local function model_entry_problem(m)
  if type(m) == "string" then return m == "" and "an empty model name" or nil end
  if type(m) ~= "table" then return ("a %s (a model name or { model = ..., fallback = { ... } })"):format(type(m)) end
  if type(m.model) ~= "string" or m.model == "" then return "no model (model = \"provider/model\")" end
  if m.fallback ~= nil and type(m.fallback) ~= "table" then return "fallback is not a list of models" end
  for i, f in ipairs(m.fallback or {}) do
    local fm = type(f) == "table" and f.model or f
    if type(fm) ~= "string" or fm == "" then return ("fallback[%d] is not a model"):format(i) end
  end
end

-- -> nil | why the config cannot be used
local function config_problem(conf)
  if type(conf) ~= "table" then return ("it returned a %s, not a table of options"):format(type(conf)) end
  for k, v in pairs(conf) do
    local option = CONFIG_OPTIONS[k]
    if not option then
      return ("unknown option %s (the options: %s)"):format(type(k) == "string" and "'" .. k .. "'" or tostring(k),
        option_names())
    end
    if not option[2](v) then
      -- (the metrics key's value is never shown: a key written without quotes, 8472619305, was
      -- printed whole in the refusal, to a terminal or a journal)
      local shown = k == "metrics_key" and v ~= "" and ("a " .. type(v))
        or type(v) == "string" and ("%q"):format(v) or tostring(v)
      return ("%s must be %s, not %s"):format(k, option[1], shown)
    end
  end
  for name, m in pairs(conf.models or {}) do
    if type(name) ~= "string" or name == "" then return ("models: a name must be a string, not %s"):format(tostring(name)) end
    local why = model_entry_problem(m)
    if why then return ("models['%s']: %s"):format(name, why) end
  end
end

function gateway.configure(conf, where)
  local why = config_problem(conf)
  if why then
    local message = ("gateway: the config%s: %s"):format(where and " " .. where or "", why)
    if not where then error(message, 2) end
    error(resil.error("bad_config", message, { traceback = false }), 0) -- (the file named: no traceback of ours)
  end
  for k, v in pairs(conf) do gateway.config[k] = v end
  -- the metrics key is a secret as an API key is: redacted wherever the host prints text
  if type(conf.metrics_key) == "string" and #conf.metrics_key >= 6 then resil.log.redact(conf.metrics_key) end
  -- a changed max_concurrent (a reload's) applies to the requests already waiting for a permit:
  -- a raised one admits them at once (resized at the next request's admit only, with none
  -- coming they waited out their queue_timeout beside free permits, then got 503s)
  -- (one that lifts it lets them all in: new requests no longer wait, nor should they)
  local max = gateway.config.max_concurrent
  if pcall(host_limits.semaphore, "gateway:total") then
    local queue = gateway.config.queue or 64
    total_sem = { sem = semaphore("gateway:total", max or 1000000000), size = max, queue = queue }
  end
  return gateway.config
end

-- The config file, run under a cap when --max-instructions sets none: one
-- that loops never listened and said nothing (its workers neither died nor
-- served). 200,000,000 instructions, as a policy reload (src/reload.c).
TUNED.CONFIG_MAX_INSTRUCTIONS, TUNED.CONFIG_HOOK_EVERY = 200000000, 1000000
-- The hook functions the cap and the handler's catch need: debug's, or under --sandbox (where a
-- policy's debug is refused) the host's, which src/main.c hands gateway.main. Kept (across
-- reloads) as these two closures, never the functions: kept is any script's (resil.keep), and
-- debug.sethook would clear the host's --max-instructions cap.
local function hook_closures(gethook, sethook)
  local h = {}
  function h.hooked() return gethook() ~= nil end
  function h.capped(chunk, path)
    if gethook() then return chunk() end -- the host's own cap
    local left = TUNED.CONFIG_MAX_INSTRUCTIONS // TUNED.CONFIG_HOOK_EVERY
    local function cap()
      left = left - 1
      if left <= 0 then
        sethook()
        error(resil.error("max_instructions", ("gateway: the config %s ran more than %d instructions (does it " ..
          "loop?); --max-instructions sets another cap"):format(path, TUNED.CONFIG_MAX_INSTRUCTIONS), { traceback = false }), 0)
      end
    end
    sethook(cap, "", TUNED.CONFIG_HOOK_EVERY)
    local ok, conf = pcall(chunk)
    if gethook() == cap then sethook() end -- (only its own: not the watchdog's, set meanwhile)
    if not ok then error(conf, 0) end
    return conf
  end
  return h
end
local function hooks() return kept.hooks or hook_closures(debug.gethook, debug.sethook) end
local function run_capped(chunk, path) return hooks().capped(chunk, path) end
-- the config file's chunk: the host loads it under --sandbox (src/main.c: the operator's file,
-- as the main script, wherever it is; the sandbox's loadfile reads only its folders)
local function load_config(path)
  if kept.load_config then return kept.load_config() end
  return loadfile(path)
end

-- A request whose handler raised (a project's gateway.lua with a bug, a policy that loops,
-- stopped by --max-task-seconds): answered in its API's shape, as the same failure inside a
-- call is (a 503 the SDKs retry for the host's own failure, else a 500 internal_error), and
-- logged with its file:line. (The server's own 500 said "handler error" in neither API's shape.)
-- (an error object that is not a string, error({}) say, gets its traceback too)
local function with_traceback(e) return debug.traceback(tostring(e), 2) end

local function failed_reply(req, err)
  local api = api_of(req.path, req.headers)
  if host_failure(err) then
    return error_reply(api, 503, "the gateway could not serve this request right now; retry shortly",
      { headers = { ["retry-after"] = "1" }, code = "gateway_overloaded" })
  end
  local e = policy_error(err)
  return error_reply(api, 500, e.message, { code = "internal_error" })
end

-- gateway.serve{ listen = "127.0.0.1:8080", config = path } -> the server (keeps serving)
function gateway.serve(o)
  o = o or {}
  if o.gethook then kept.hooks = hook_closures(o.gethook, o.sethook) end
  if o.load_config then kept.load_config = o.load_config end
  local hooked = hooks().hooked
  if o.config then
    local chunk, err = load_config(o.config)
    if not chunk then error(err, 0) end
    -- (what it starts is this version's, as what it starts when a reload runs it again: a task it
    -- started at start ran on beside each later version's)
    local conf = require("resil.as_version")("policies.gateway", run_capped, chunk, o.config)
    if conf ~= nil then gateway.configure(conf, o.config) end
    kept.path = o.config
    kept.config_returned = conf ~= nil or nil -- (a reload's config returning nothing then: below)
  end
  -- What requests load on first use, loaded before serving: a policy file saved
  -- broken (the registry, a provider copied into the project) stops the start with
  -- its file:line, as a broken config does. Loaded lazily, it made a gateway (or a
  -- worker started again after a crash) listen, and answer each chat a 400 that
  -- showed its own syntax error; a reload keeps the loaded versions whole.
  require "policies.registry"
  for _, provider in ipairs({ "openai", "anthropic" }) do require("policies.providers." .. provider) end
  local host, port = (o.listen or "127.0.0.1:8080"):match("^%[?([^%]]*)%]?:(%d+)$")
  if not host then error(("gateway: --listen wants host:port, not '%s'"):format(tostring(o.listen)), 0) end
  local workers = o.workers or 1
  if workers > 1 then
    if tonumber(port) == 0 then error("gateway: --workers needs a fixed port in --listen", 0) end
    gateway.config.shared_limits = true -- a key's rate limits hold across the workers
    kept.shared_limits = true
  end
  -- (a copy of this file saved without them fails the reload, rather than every request after it)
  require("resil.next_versions_have")("policies.gateway", { "handle", "stopping_reply" })
  local s, err = resil.server.listen({ host = host, port = tonumber(port), tasks = true,
    reuseport = workers > 1, max_body = gateway.config.max_body, read_timeout = gateway.config.read_timeout,
    utf8 = true, -- a body that is not UTF-8: the server's 400, before a handler (RFC 8259 8.1)
    -- the current version of this module: a policy reload changes what new requests run
    handler = function(req)
      local current = package.loaded["policies.gateway"] or gateway
      if resil.stop_requested() then return current.stopping_reply(req) end
      local reply
      -- (under --max-instructions' hook no Lua runs after a catch: a loop it stopped is left to the
      -- server's own 500, whose log names the loop's file:line, not this line)
      if hooked() then reply = current.handle(req)
      else
        local ok
        ok, reply = xpcall(current.handle, with_traceback, req)
        if not ok then reply = failed_reply(req, reply) end
      end
      -- answered while stopping: the client's next request goes on a new connection, to another process
      if resil.stop_requested() and type(reply) == "table" and type(reply.headers) == "table" then
        reply.headers.connection = "close"
      end
      return reply
    end })
  if not s then error(tostring(err), 0) end
  return s
end

-- A request that comes while the gateway stops (on a connection opened
-- before): a 503 the SDKs retry, on a new connection (another worker, the
-- next process)
function gateway.stopping_reply(req) return stopping(api_of(req.path, req.headers)) end

-- The graceful stop, all within drain_timeout: the listening socket closed,
-- the requests in flight answered, their ledger rows and budget settles
-- written (another process may hold the store's write lock), the server
-- closed; then whatever still runs (a call a client left, finishing for its
-- Idempotency-Key) is stopped, so that the process ends in time. At least
-- TUNED.DRAIN_MIN: a stream cut at once must still get its error event out, and
-- the rows their tasks record be written (with 0, the server closed in the
-- same turn: a client read the truncated stream as a complete answer).
TUNED.DRAIN_MIN = 0.5
TUNED.CLOSE_MIN = 0.1
local function drain_timeout() return math.max(tonumber(gateway.config.drain_timeout) or 20, TUNED.DRAIN_MIN) end
local function drain(s, signo)
  local grace = drain_timeout()
  s:stop_accepting()
  local deadline = resil.now() + grace
  local function wait_while(busy, by) while busy() and resil.now() < by do resil.sleep(0.02) end end
  if s:pending() > 0 then
    resil.log.info("gateway: stopping; finishing the requests in flight (another signal stops at once)",
      { requests = s:pending(), drain_timeout = grace })
  end
  local function busy() return s:pending() > 0 or s:unsent() > 0 or running.n > 0 end
  -- What still runs a moment before the end (a tenth of drain_timeout, at
  -- most a second) is ended then, so that its rows are written in time:
  -- streams get their error event, what is left is cut as a client that
  -- left would be, by closing the server.
  local margin = math.min(1, grace / 10)
  wait_while(busy, deadline - margin)
  if s:pending() > 0 then
    -- a request still queued for a permit is answered a 503 (gateway_stopping), not cut below
    local queued = refuse_queued()
    if queued > 0 then
      resil.log.warn("gateway: drain_timeout is near; the requests still queued for a permit are answered 503",
        { requests = queued, drain_timeout = grace })
    end
    access.stopping()
    local streams = s:cut_streams()
    if streams > 0 then
      resil.log.warn("gateway: drain_timeout is near; the streams still running end with an error event",
        { streams = streams, drain_timeout = grace })
    end
    wait_while(busy, deadline - margin / 2)
  end
  if busy() then
    resil.log.warn("gateway: drain_timeout is near; the requests still in flight are cut",
      { requests = s:pending(), drain_timeout = grace })
  end
  s:close()
  -- the calls still running (a client that left, an answer's body on its way) are canceled as a
  -- deadline would: an answer whose 2xx came is recorded at its estimate, its hold given back.
  -- (Left to the process's end, the provider billed it and the ledger never had it.)
  for task in pairs(running.tasks) do task:cancel(true) end -- (through their shields)
  -- the rows of what was answered, and of streams cut just now (written by tasks of their own)
  resil.sleep(0)
  wait_while(function() return resil.cost.unwritten() > 0 end, deadline)
  -- the stores' last writes as the process closes end by the deadline too (a Redis connection
  -- waited for a frozen server to read what was sent, its whole timeout past drain_timeout);
  -- TUNED.CLOSE_MIN lets a server that answers read what was sent at the last moment
  resil.stop_now(signo, math.max(deadline - resil.now(), TUNED.CLOSE_MIN))
end

-- `resil-lua gateway`: serve until stopped (SIGTERM, SIGINT)
function gateway.main(o)
  -- (a --workers worker tells its supervisor it loads, then that it listens: one that fails in
  -- between dies as it starts, however long that took, and does not restart without end)
  if o.ready then o.ready("loading") end
  local s = gateway.serve(o)
  local host = (o.listen or "127.0.0.1:8080"):match("^(.*):%d+$")
  io.stdout:write(("gateway listening on http://%s:%d\n"):format(host, s:port()))
  io.stdout:flush()
  if o.ready then o.ready("listening") end
  -- the first SIGTERM or SIGINT (src/main.c); a request whose handler then runs half the
  -- drain_timeout without yielding (a policy that loops) is ended with a 500, or the drain could
  -- never run
  drain(s, resil.stop_requested(true, drain_timeout() / 2))
end

-- A policy reload (SIGHUP, --watch) runs the config file again, as a restart would: its models,
-- keys' rules, limits and providers (its ai.configure calls) change for the requests after it.
-- Its error (a syntax error, a raise, a loop past the cap) fails the reload, and the version
-- before keeps serving with its own config (each version holds its own table, and the providers
-- its ai.configure calls set are put back when the reload fails, here or in another file). What
-- the server was started with (--listen,
-- --workers, max_body, read_timeout) stays as it started.
if kept.path then
  local chunk, err = load_config(kept.path)
  -- (one that is not there, moved or deleted, named no place but the line here, as if this shipped
  -- file had broken the reload: "policies/gateway.lua:2868: cannot open gateway.lua")
  if not chunk and not tostring(err):find(":%d+: ") then
    error(resil.error("bad_config", ("gateway: the config %s: %s"):format(kept.path, tostring(err)),
      { traceback = false }), 0)
  end
  if not chunk then error(err, 0) end
  -- (its ai.configure calls are undone if this reload fails, here or in another file: ai.lua)
  local conf = run_capped(chunk, kept.path)
  -- A config that returns nothing where the one serving returned its options was saved
  -- half-written (emptied by an editor's truncate before its write, cut before its `return`):
  -- taken, the defaults served, auth on and no models, every client a 401 until the next save.
  -- (A config that returns nothing from the start still may, as a policy file may.)
  if conf == nil and kept.config_returned then
    error(resil.error("bad_config", ("gateway: the config %s: it returned nothing, where the config serving "
      .. "returned its options (a file saved half-written?); return {} for the defaults"):format(kept.path),
      { traceback = false }), 0)
  end
  if conf ~= nil and not kept.config_returned then
    kept.config_returned = true
    require("resil.if_reload_fails")(function() kept.config_returned = nil end)
  end
  gateway.config = config_defaults()
  if conf ~= nil then gateway.configure(conf, kept.path) end
  -- (--workers': as serve set it; else the config's own, shared_limits = false kept)
  if kept.shared_limits then gateway.config.shared_limits = true end
  gateway.config.max_body, gateway.config.read_timeout = kept.config.max_body, kept.config.read_timeout
end

return gateway
