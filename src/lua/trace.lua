-- resil.trace: W3C trace context and OTLP/HTTP JSON export.
--
-- Every run has a trace: its id continues TRACEPARENT from the environment
-- when that is valid, else it is new. The run is the root span; each
-- provider attempt (policies/call.lua) is a child span whose `traceparent`
-- header goes to the provider and whose ids go on the attempt's log lines,
-- when the spans are exported or the trace is someone else's (TRACEPARENT,
-- trace.continue). Otherwise attempts make no spans, as OpenTelemetry's API
-- makes none without an SDK: nothing would ever read them.
-- With an exporter (--otlp-endpoint URL, or resil.trace.export{url=}),
-- finished spans are queued (bounded: past max_queue they are dropped and
-- counted) and posted in batches by a background task, never by the caller.
--
--   local span = resil.trace.start("chat gpt-4o", { ["gen_ai.system"] = "openai" })
--   ... span.traceparent goes in the request's headers ...
--   span:finish({ ["gen_ai.usage.input_tokens"] = 12 }, err)
local resil = ...

local trace = {}
local json = resil.json

local dropped_total = resil.metrics.counter("resil_trace_spans_dropped_total",
  "Finished spans dropped: the export queue was full, or the run ended before the collector took them")
local exported_total = resil.metrics.counter("resil_trace_spans_exported_total",
  "Spans sent to the OTLP endpoint, by result")

-- ids from the kernel's generator, read in blocks (math.random is the
-- script's, and resil.run.random journals it)
-- (one format call per id: ids are made on every provider attempt)
local pool, pool_pos = "", 1
-- 8 bytes at a time as one 64-bit integer: one conversion, not one per byte
local unpack = string.unpack
local function random_hex(bytes)
  if pool_pos + bytes - 1 > #pool then
    local f = assert(io.open("/dev/urandom", "rb"))
    pool, pool_pos = f:read(4096), 1
    f:close()
  end
  local first = pool_pos
  pool_pos = pool_pos + bytes
  if bytes == 8 then return ("%016x"):format(unpack("<i8", pool, first)) end
  return ("%016x%016x"):format(unpack("<i8i8", pool, first))
end

local function new_trace_id()
  local id
  repeat id = random_hex(16) until id ~= ("0"):rep(32)
  return id
end

local function new_span_id()
  local id
  repeat id = random_hex(8) until id ~= ("0"):rep(16)
  return id
end

-- "00-<32 hex>-<16 hex>-<2 hex>" -> trace_id, parent_id, flags | nil
-- (W3C trace context: a version above 00 may carry more fields after a '-', which a reader of
-- version 00 skips, keeping the trace; a 00 with anything more is not one)
local TRACEPARENT = "^%s*(%x%x)%-(" .. ("%x"):rep(32) .. ")%-(" .. ("%x"):rep(16) .. ")%-(%x%x)(.-)%s*$"
function trace.parse(header)
  if type(header) ~= "string" then return nil end
  local version, trace_id, parent_id, flags, more = header:lower():match(TRACEPARENT)
  if not version or version == "ff" or trace_id == ("0"):rep(32) or parent_id == ("0"):rep(16) then return nil end
  if more ~= "" and (version == "00" or more:sub(1, 1) ~= "-") then return nil end
  return trace_id, parent_id, flags
end

-- a caller's tracestate header as it goes on (W3C trace context: the vendors' entries, which a
-- participant MUST pass on with the traceparent) | nil when it is not one: at most 512
-- printable ASCII characters
local function trace_state(header)
  if type(header) ~= "string" or header == "" or #header > 512 or header:find("[^\32-\126]") then return nil end
  return header
end

-- times are kept as wall-clock seconds and written in nanoseconds at export
local wall = resil.clock.wall
local function nano(t) return t and ("%.0f"):format(t * 1e9) or nil end

local root -- the run's span, made on first use

-- whether a provider attempt may want a span, a field read on every
-- attempt: false until spans are exported (trace.export) or a trace is
-- someone else's (TRACEPARENT, trace.continue); then trace.exporting() and
-- trace.followed() say it for each attempt. Nothing else costs a process
-- that neither exports nor is ever in a caller's trace.
trace.spans = trace.parse(os.getenv("TRACEPARENT")) ~= nil
local queue, exporter = {}, nil
local in_flight = 0 -- spans in a post now

local Span = {}
Span.__index = Span

local function root_span()
  if not root then
    local trace_id, parent_id, flags = trace.parse(os.getenv("TRACEPARENT"))
    root = setmetatable({ trace_id = trace_id or new_trace_id(), span_id = new_span_id(), parent_id = parent_id,
                          flags = flags or "01", name = "run", kind = 1, start = wall(), attributes = {},
                          tracestate = trace_id and trace_state(os.getenv("TRACESTATE")) or nil }, Span)
    root.traceparent = ("00-%s-%s-%s"):format(root.trace_id, root.span_id, root.flags)
  end
  return root
end

-- the run's trace id and root span id (for logs and reports)
function trace.root() return root_span() end

-- the span the running task is in: the innermost started in it, else the run's
local function current_parent()
  local ctx = resil.running() and resil.context() or {}
  return ctx.span_id and ctx or root_span()
end

-- resil.trace.start(name, attributes) -> span (a child of the task's current span)
-- (a task that continues a caller's trace, a gateway request with its
-- `traceparent`, carries that trace's id and flags in its context)
function trace.start(name, attributes)
  local parent = current_parent()
  local r = root or root_span()
  local trace_id, span_id, flags = parent.trace_id or r.trace_id, new_span_id(), parent.trace_flags or r.flags
  local state = parent.trace_state
  if parent == r or not parent.trace_id then state = r.tracestate end
  return setmetatable({ trace_id = trace_id, span_id = span_id, parent_id = parent.span_id, flags = flags,
                        name = name, kind = 3, start = wall(), attributes = attributes or {}, tracestate = state,
                        traceparent = "00-" .. trace_id .. "-" .. span_id .. "-" .. flags }, Span)
end

-- whether a span's trace is sampled: the W3C trace-flags' lowest bit. A caller's 00 says it
-- records nothing of the trace, and OpenTelemetry's default sampler (parent-based) then exports no
-- span of it either; the 00 is still carried on in each traceparent.
local function sampled(flags)
  local n = tonumber(flags, 16)
  return n == nil or n % 2 == 1
end

local function enqueue(span)
  if not exporter or not sampled(span.flags) then return end
  if #queue >= exporter.max_queue then
    dropped_total:inc()
    return
  end
  queue[#queue + 1] = span
  -- a whole batch is sent now, not at the next interval: a burst of more than max_queue spans
  -- within one interval was dropped with the collector well (not while one is being sent or
  -- the collector asked for a pause: the background task sends it then)
  if #queue >= exporter.batch and not exporter.sending and not (exporter.retry_at and exporter.retry_at > resil.now()) then
    exporter.sending = true
    resil.background(function()
      local _ <close> = exporter.done_sending
      trace.flush()
    end)
  end
end

-- span:finish([attributes], [err]): ends the span; an err marks it failed
function Span:finish(attributes, err)
  if self.finished then return end
  self.finished = wall()
  for k, v in pairs(attributes or {}) do self.attributes[k] = v end
  if err ~= nil then
    self.error = tostring(err)
    if type(err) == "table" and err.kind then self.attributes["error.type"] = err.kind end
  end
  enqueue(self)
end

-- (JSON has no NaN or infinity, and cjson raises on them: one such
-- attribute killed the export task for the rest of the run. Protobuf's JSON
-- mapping writes them as these strings.)
local function double(v)
  if v ~= v then return "NaN" end
  return v == math.huge and "Infinity" or v == -math.huge and "-Infinity" or v
end

-- Text redacted and made UTF-8, each byte that is not as U+FFFD: the collector's OTLP JSON
-- decoder (protojson) refuses a whole batch over one string that is not (a provider's error
-- or model name cut mid-character), and the 256 spans in it were lost.
local valid_utf8 = debug.getregistry()["resil.private"].valid_utf8
local function text(v) return valid_utf8(resil.redact(tostring(v))) end
-- (an attribute named like a credential, OpenTelemetry's http.request.header.authorization or an
-- api_key, is exported as the redaction mark, as a log line's field of that name is written; a
-- number or a boolean is none: a per_token price)
local sensitive_field = debug.getregistry()["resil.private"].sensitive_field

-- a list's length, or nil when the table is not one (keys 1..n only)
local function list_length(t)
  local n = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 then return nil end
    n = n + 1
  end
  return n == #t and n or nil
end

-- a Lua value as OTLP's AnyValue. A list is an arrayValue (OpenTelemetry's array attributes,
-- tags = {"a", "b"}), its items' lists and other tables as their JSON text; another table is its
-- JSON text: each was exported as 'table: 0x55d0c...', its address.
local function any_value(v, nested)
  if math.type(v) == "integer" then return { intValue = tostring(v) } end
  if type(v) == "number" then return { doubleValue = double(v) } end
  if type(v) == "boolean" then return { boolValue = v } end
  if type(v) == "table" then
    local n = not nested and list_length(v)
    if n then
      local values = {}
      for i = 1, n do values[i] = any_value(v[i], true) end
      -- (no values field for an empty list: cjson writes an empty table as {}, which is no array)
      return { arrayValue = n > 0 and { values = values } or {} }
    end
    local ok, encoded = pcall(json.encode, v)
    if ok then return { stringValue = text(encoded) } end
  end
  return { stringValue = text(v) }
end

local function attribute(key, v)
  if type(key) == "string" and type(v) ~= "number" and type(v) ~= "boolean" and sensitive_field(key) then
    return { key = text(key), value = { stringValue = "[REDACTED]" } }
  end
  return { key = text(key), value = any_value(v) }
end

local function otlp_span(s)
  local attrs = {}
  local keys = {}
  for k in pairs(s.attributes) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do attrs[i] = attribute(k, s.attributes[k]) end
  -- the name and keys as the values: a name is often a request's URL
  local out = { traceId = s.trace_id, spanId = s.span_id, parentSpanId = s.parent_id,
                name = text(s.name), kind = s.kind,
                startTimeUnixNano = nano(s.start), endTimeUnixNano = nano(s.finished),
                -- (a span that went well is Unset, {}: the trace API's instrumentation "SHOULD NOT
                -- set the status code to Ok", which is the application's to say)
                status = s.error and { code = 2, message = text(s.error) } or {} }
  if #attrs > 0 then out.attributes = attrs end
  return out
end

-- The resource's attributes, as OpenTelemetry's SDKs read them from the environment:
-- OTEL_RESOURCE_ATTRIBUTES (key=value,... its values percent-encoded), and service.name from
-- resil.trace.export{service=}, else OTEL_SERVICE_NAME, else that list's, else resil-lua. Every
-- process's spans were resil-lua's, a gateway's and each pipeline's alike, with no way to tell them.
local function resource_attributes(service)
  local pairs_of, names = {}, {}
  for item in (os.getenv("OTEL_RESOURCE_ATTRIBUTES") or ""):gmatch("[^,]+") do
    local k, v = item:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
    if k and k ~= "" then
      v = v:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
      if pairs_of[k] == nil then names[#names + 1] = k end
      pairs_of[k] = v
    end
  end
  local env_service = os.getenv("OTEL_SERVICE_NAME")
  service = service or (env_service ~= "" and env_service) or pairs_of["service.name"] or "resil-lua"
  local out = { attribute("service.name", service) }
  for _, k in ipairs(names) do
    if k ~= "service.name" then out[#out + 1] = attribute(k, pairs_of[k]) end
  end
  return out
end
local resource -- (read once: the environment does not change under a running process)

-- the OTLP/HTTP JSON body for a batch of spans
function trace.otlp_body(spans)
  local list = {}
  for i, s in ipairs(spans) do list[i] = otlp_span(s) end
  resource = resource or resource_attributes(exporter and exporter.service)
  return json.encode({ resourceSpans = { {
    resource = { attributes = resource },
    scopeSpans = { { scope = { name = "resil-lua", version = resil.version or "" }, spans = list } },
  } } })
end

-- OTLP/HTTP: a 429, 502, 503 or 504, or no answer at all (refused, timed out), is the collector
-- busy or away, and the batch is sent again later; any other status is the batch refused for good
local RETRYABLE = { [429] = true, [502] = true, [503] = true, [504] = true }
local TRANSIENT = { timeout = true, connect = true, dns = true, reset = true }
local BACKOFF_CAP, RETRY_AFTER_CAP = 30, 60
-- OTLP/HTTP: "the client MUST limit the size of the response body ... RECOMMENDED 4 MiB", and one
-- past it is a non-retryable error (a collector, or whatever answers at its address, that sends
-- megabytes cost as much memory per post, up to resil.http's default of 64 MiB)
local MAX_ANSWER = 4 * 1024 * 1024

-- the seconds a retryable answer asks us to wait: its Retry-After (delta seconds), else a backoff
-- that doubles with each failure in a row, from the export's interval up to BACKOFF_CAP
local function retry_wait(res)
  local after = res and res.headers and tonumber(res.headers["retry-after"])
  if after and after >= 0 then return math.min(after, RETRY_AFTER_CAP) end
  return math.min(exporter.interval * 2 ^ (exporter.failures - 1), BACKOFF_CAP)
end

-- a 200 with partialSuccess.rejectedSpans: the collector took the batch but not all of it
-- (the spec's "MUST NOT retry"): -> the count rejected, the collector's reason
local function rejected(res)
  local ok, doc = pcall(json.decode, res.body or "")
  local partial = ok and type(doc) == "table" and type(doc.partialSuccess) == "table" and doc.partialSuccess
  local n = partial and math.tointeger(tonumber(partial.rejectedSpans))
  if not n or n <= 0 then return 0 end
  return n, type(partial.errorMessage) == "string" and partial.errorMessage or nil
end

-- what a collector's failed answer says: its status, and the message of the Status its body is
-- (OTLP/HTTP), else the body's first line: 'status 400' alone left the cause to guess
local function refusal(res)
  local ok, doc = pcall(json.decode, res.body or "")
  local why = ok and type(doc) == "table" and type(doc.message) == "string" and doc.message
    or (res.body or ""):match("^[^\n]*")
  why = text(why:sub(1, 300))
  return why ~= "" and ("status %d: %s"):format(res.status, why) or ("status %d"):format(res.status)
end

-- -> ok, retry (the seconds to wait before sending the batch again; nil: it is not to be sent again),
-- why it failed. final: the run's last flush, which says itself what it dropped
local function post(batch, timeout, final)
  -- a batch that cannot be written is that batch's failure, not the exporter's end
  local encoded, body = pcall(trace.otlp_body, batch)
  local res, err
  if encoded then
    res, err = resil.http.request({ method = "POST", url = exporter.url, body = body,
      headers = { ["content-type"] = "application/json" }, timeout = timeout, max_body = MAX_ANSWER })
  else
    err = body
  end
  -- (a post the exit abandoned, counted dropped there: counted again here, its spans were twice)
  if exporter.abandoned then return false end
  local ok = res and res.status >= 200 and res.status < 300
  local retry
  if ok then
    exporter.failures = 0
    local n, why = rejected(res)
    n = math.min(n, #batch)
    exported_total:inc({ result = "ok" }, #batch - n)
    if n > 0 then
      exported_total:inc({ result = "rejected" }, n)
      -- (said once while batches keep having spans rejected, as a failing export is)
      if not exporter.rejecting then
        resil.log.warn("trace export: the collector rejected spans", { url = exporter.url, rejected = n,
          error = why and text(why) or nil })
      end
    end
    exporter.rejecting = n > 0
  elseif encoded and (res and RETRYABLE[res.status] or
      not res and type(err) == "table" and TRANSIENT[err.kind] and not err.status) then
    exporter.failures = exporter.failures + 1
    retry = retry_wait(res)
  else
    exported_total:inc({ result = "failed" }, #batch)
  end
  -- said once while it keeps failing (an unreachable collector must not flood the log), and once
  -- as it ends: said once for the run, a collector that failed again days into a gateway's life
  -- was never said
  local why = not ok and (err and tostring(err) or res and refusal(res)) or nil
  if not ok and not exporter.failing and not final then
    resil.log.warn(retry and "trace export failed; spans are kept and sent again" or
      "trace export failed; spans are dropped", { url = exporter.url, error = why, retry_in = retry })
  elseif ok and exporter.failing then
    resil.log.info("trace export works again", { url = exporter.url })
  end
  exporter.failing = not ok
  return ok, retry, why
end

-- A batch the collector is to get again goes back to the queue's head; the queue stays within
-- max_queue, the newest spans past it dropped and counted (a collector away for hours costs
-- max_queue spans of memory, no more).
local function requeue(batch)
  local k, n = #batch, #queue
  table.move(queue, 1, n, k + 1)
  table.move(batch, 1, k, 1, queue)
  local over = #queue - exporter.max_queue
  if over > 0 then
    dropped_total:inc(nil, over)
    for i = #queue, exporter.max_queue + 1, -1 do queue[i] = nil end
  end
end

-- Send what is queued, in batches. -> nothing. With a deadline (the run's
-- end), the posts share what is left of it and the first that fails ends
-- the flush: a collector that accepts and never answers held the exit up a
-- whole timeout per batch (16 of them for a full queue). What is not sent
-- is dropped and counted. Without one, a batch the collector is busy or away
-- for goes back to the queue and the flush ends: the background task sends
-- it again after the collector's Retry-After, or a backoff (exporter.retry_at).
function trace.flush(deadline)
  if not exporter then return end
  local failed, why = 0, nil -- (the last flush's: said once, with what it dropped)
  while #queue > 0 do
    local timeout = deadline and math.min(exporter.timeout, deadline - resil.now()) or exporter.timeout
    if timeout <= 0 then break end
    local n, k = #queue, math.min(exporter.batch, #queue)
    local batch = table.move(queue, 1, k, 1, {})
    table.move(queue, k + 1, n, 1)
    for i = n - k + 1, n do queue[i] = nil end
    in_flight = in_flight + k
    local ok, retry, err = post(batch, timeout, deadline ~= nil)
    in_flight = in_flight - k
    if exporter.abandoned then break end
    if not ok and deadline then
      if retry then exported_total:inc({ result = "failed" }, k) end
      failed, why = k, err
      break
    end
    if retry then
      requeue(batch)
      exporter.retry_at = resil.now() + retry
      break
    end
    exporter.retry_at = nil
  end
  -- (a failure here was said "spans are kept and sent again", and the process ended: never sent)
  if deadline and failed > 0 then
    resil.log.warn("trace export failed as the run ended; its spans are dropped", { url = exporter.url,
      error = why, dropped = failed + #queue })
  end
  if deadline and #queue > 0 then
    dropped_total:inc(nil, #queue)
    for i = #queue, 1, -1 do queue[i] = nil end
  end
end

-- opts[name], or default: a whole number >= least, or (whole false) a number
-- > least. Checked here, not where it is used: a batch of 0 posted empty
-- batches without end, and "10" failed at the first span.
local function option(opts, name, default, least, whole)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or not (whole and math.type(v) == "integer" and v >= least or not whole and v > least) then
    error(("resil.trace.export: %s must be %s %d"):format(name, whole and "a whole number >=" or "a number >",
      least), 3)
  end
  return v
end

-- resil.trace.export{url=, batch=256, max_queue=4096, interval=1, timeout=5, service="resil-lua"}
-- url: the collector's base (http://host:4318) or its /v1/traces
function trace.export(opts)
  if type(opts) ~= "table" or type(opts.url) ~= "string" or not opts.url:match("^https?://") then
    error("resil.trace.export: url must be an http(s) URL", 2)
  end
  local url = opts.url
  if not url:match("/v1/traces$") then url = url:gsub("/$", "") .. "/v1/traces" end
  local e
  e = { url = url, batch = option(opts, "batch", 256, 1, true),
        max_queue = option(opts, "max_queue", 4096, 0, true), interval = option(opts, "interval", 1, 0),
        timeout = option(opts, "timeout", 5, 0), service = opts.service, failures = 0,
        -- (sending is over however the flush ends: a post that raised, the task canceled)
        done_sending = setmetatable({}, { __close = function() e.sending = false end }) }
  exporter = e
  resource = nil -- (its service may be another)
  trace.spans = true
  root_span()
  resil.background(function()
    while true do
      -- (a collector that asked for a pause, or is away: not before retry_at)
      resil.sleep(math.max(exporter.interval, (exporter.retry_at or 0) - resil.now()))
      -- (a pause asked for while this task slept, by a post a full batch started: kept too)
      if not (exporter.retry_at and exporter.retry_at > resil.now()) then trace.flush() end
    end
  end)
end

-- resil.trace.continue(header, [tracestate]): the running task joins the caller's trace
-- (a W3C traceparent, and its tracestate, passed on with it) -> true | false when the header is not one
function trace.continue(header, state)
  local trace_id, parent_id, flags = trace.parse(header)
  if not trace_id then return false end
  trace.spans = true
  resil.context({ trace_id = trace_id, span_id = parent_id, trace_flags = flags, trace_state = trace_state(state) })
  return true
end

-- resil.trace.request(traceparent, name) -> span | nil: the running task
-- serves one request of a server that runs for days (the gateway). With an
-- exporter, the request is a server span of its own, the child of the
-- caller's when its header is valid, else the root of a new trace: as
-- children of the run's root span, every request the process ever served was
-- one trace whose root is exported only at its exit (never after a kill -9).
-- Without one, a valid header is continued (trace.continue) and no span made.
-- The caller finishes the span when the request ends. untraced: no span (a
-- health check, a scrape), a caller's header continued all the same.
function trace.request(header, name, untraced, state)
  if not exporter or untraced then
    if header then trace.continue(header, state) end
    return nil
  end
  local trace_id, parent_id, flags = trace.parse(header)
  state = trace_id and trace_state(state) or nil
  local span_id = new_span_id()
  trace_id, flags = trace_id or new_trace_id(), flags or "01"
  local span = setmetatable({ trace_id = trace_id, span_id = span_id, parent_id = parent_id, flags = flags,
                              name = name or "request", kind = 2, start = wall(), attributes = {},
                              traceparent = "00-" .. trace_id .. "-" .. span_id .. "-" .. flags }, Span)
  resil.context({ trace_id = trace_id, span_id = span_id, trace_flags = flags, trace_state = state })
  return span
end

-- whether finished spans go anywhere: attributes only the export reads
-- need not be gathered otherwise
function trace.exporting() return exporter ~= nil end

-- whether the running task is in someone else's trace: a caller's
-- traceparent (trace.continue) or the run's TRACEPARENT. Its attempts then
-- carry it on to the provider even when nothing is exported.
function trace.followed()
  -- (outside a task resil.context() is a new empty table: asked on every
  -- provider attempt, this is not preceded by a resil.running())
  if resil.context().span_id then return true end
  return (root or root_span()).parent_id ~= nil
end

-- At the end of the run: the root span is finished and everything sent (the
-- CLI runs this as a last task).
function trace.finish(status)
  if not (exporter and root) then return end
  -- (the run's id, as `resil-lua runs show ID` takes it, when the script checkpoints)
  local runs = package.loaded["resil.runs"]
  root:finish({ ["resil.run.status"] = status or "done", ["resil.run.id"] = runs and runs.last_id() or nil },
    status and status ~= "done" and status or nil)
  trace.flush(resil.now() + exporter.timeout)
  -- a batch the background task is still posting: the exit abandons it
  if in_flight > 0 then dropped_total:inc(nil, in_flight) end
  exporter.abandoned = true
end

resil.trace = trace
return trace
