-- policies/providers/replicate.lua: Replicate predictions (https://replicate.com/docs/reference/http).
--
--   ai.job{ model = "replicate/owner/name:<version id>", input = { prompt = "..." }, deadline = 900 }
--   ai.job{ model = "replicate/owner/name", input = {...} }   -- an official model, no version
--
-- Key: REPLICATE_API_TOKEN (Authorization: Bearer). Base URL: the provider's `base_url`
-- configuration, else REPLICATE_BASE_URL, else https://api.replicate.com/v1.
-- Create: POST /predictions {version, input} (or POST /models/{owner}/{name}/predictions
-- {input}), with `Prefer: wait=N` when the call asks to wait; then GET urls.get until
-- succeeded | failed | canceled | aborted; POST urls.cancel at the deadline.
-- find: GET /predictions (the account's, newest first) for a job a create may have made when its
-- answer was a proxy's 502/504 or never came (Replicate takes no idempotency key).
-- Used by policies/jobs.lua through the adapter interface: target, create, poll, cancel, usage, find.
local resil = require "resil"
local json = resil.json

local replicate = {
  name = "replicate",
  key_env = "REPLICATE_API_TOKEN",
  base_env = "REPLICATE_BASE_URL",
  base_url = "https://api.replicate.com/v1",
  duration_field = "metrics.predict_time", -- (what a model billed by the second is billed by: jobs.lua's charge)
}

-- "owner/name:version" | "owner/name" -> { owner=, name=, version= } | nil, why
-- (a name of dots only is refused: "replicate/../..:v" was a request to another path of the API)
local function segment(s) return s and not s:match("^%.+$") and s or nil end
function replicate.target(rest)
  local owner, name, version = rest:match("^([%w%-_%.]+)/([%w%-_%.]+):(%x+)$")
  if segment(owner) and segment(name) then return { owner = owner, name = name, version = version } end
  owner, name = rest:match("^([%w%-_%.]+)/([%w%-_%.]+)$")
  if segment(owner) and segment(name) then return { owner = owner, name = name } end
  return nil, ("replicate model must be \"replicate/owner/name[:version]\", got \"replicate/%s\""):format(rest)
end

function replicate.headers(key, extra)
  local h = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

-- a provider's id as one path segment: dots, "/", "?", spaces and non-ASCII bytes are escaped
local function escape(s)
  return (s:gsub("[^%w%-_~]", function(c) return ("%%%02X"):format(c:byte()) end))
end
replicate.escape = escape

local TERMINAL = { succeeded = "succeeded", failed = "failed", canceled = "canceled", aborted = "failed" }

-- a prediction -> { status = "running"|"succeeded"|"failed"|"canceled", output=, error=, aborted=, raw= }
-- (aborted: its deadline passed before it started; it ran no time and is not billed, as a canceled
-- one is for the time it ran)
local function state_of(p)
  -- succeeded, its output removed (an API prediction's input and output are, an hour after it ends): a
  -- run resumed later read it as succeeded with no output, recorded at $0 (no outputs), its step given
  -- nil. It ran and was paid: recorded at the outputs its input asked for, and replaced as a failed job.
  if p.status == "succeeded" and p.data_removed == true and (p.output == nil or p.output == json.null) then
    return { status = "failed", completed = true, raw = p, error = "it succeeded, but Replicate removed its output " ..
      "(data_removed: an hour after a prediction ends) before it was read" }
  end
  local aborted = p.status == "aborted" or nil
  local err = p.error ~= json.null and p.error or nil
  return { status = TERMINAL[p.status] or "running", output = p.output ~= json.null and p.output or nil,
    error = aborted and ("aborted before it started%s"):format(err and (": " .. tostring(err)) or "") or err,
    aborted = aborted, raw = p }
end

-- A prediction's metrics: one canceled before it started (started_at null: queued, booting) ran no
-- time, and says none (taken for a time not said, a job never run was a row without a price, logged
-- as an error, at each deadline of a long queue)
local function metrics_of(p)
  local m = p.metrics ~= json.null and p.metrics or nil
  if p.status == "canceled" and p.started_at == json.null and not (type(m) == "table" and m.predict_time ~= nil) then
    return { predict_time = 0 }
  end
  return m
end

-- (what: the answer's name in the error, which quotes the answer's start: a proxy's error page says
-- more than "not JSON")
local function decode(res, what)
  local body = json.decode(res.body or "")
  if type(body) ~= "table" then
    return nil, resil.error("invalid_output", ("replicate: the %s is not a JSON object (HTTP %s: %q)"):format(
      what or "answer", tostring(res.status), resil.redact(res.body or ""):sub(1, 80)),
      { provider = "replicate", status = res.status, retryable = true })
  end
  return body
end

-- ctx: { base=, key=, target=, input=, wait=, send=fn(req), send_create=fn(req) (no retry after
-- a timeout) } -> handle | nil, err
function replicate.create(ctx)
  local t = ctx.target
  local extra = ctx.wait and { ["Prefer"] = "wait=" .. math.max(1, math.min(60, math.ceil(ctx.wait))) } or nil
  local url, body
  if t.version then
    url, body = ctx.base .. "/predictions", { version = t.version, input = ctx.input }
  else
    url, body = ("%s/models/%s/%s/predictions"):format(ctx.base, t.owner, t.name), { input = ctx.input }
  end
  local res, err = ctx.send_create({ method = "POST", url = url, headers = replicate.headers(ctx.key, extra),
    json = body, timeout = ctx.wait and (ctx.wait + 30) or nil })
  if not res then return nil, err end
  local p, derr = decode(res, "created prediction")
  if not p then return nil, derr end
  -- a 2xx without an id made a job no one can follow: its status says so (jobs.lua records it at
  -- its estimate and makes no other, as a create cut after its 2xx; retryable, so that resil.once
  -- keeps no failure to be charged again at each replay); one with an id and no urls
  -- is followed at the documented URLs (it was refused, neither read, canceled nor recorded)
  if type(p.id) ~= "string" or p.id == "" then
    return nil, resil.error("invalid_output", "replicate: the created prediction has no id",
      { provider = "replicate", status = res.status, retryable = true })
  end
  local urls = type(p.urls) == "table" and p.urls or {}
  -- (the key goes only to base_url's host: jobs.lua's own_url)
  local get = ("%s/predictions/%s"):format(ctx.base, escape(p.id))
  local cancel = urls.cancel ~= json.null and urls.cancel or nil
  local s = state_of(p)
  return { id = p.id, get = ctx.own_url(urls.get, get), cancel = ctx.own_url(cancel, get .. "/cancel"),
    state = s.status ~= "running" and { status = s.status, output = s.output, error = s.error, aborted = s.aborted,
      metrics = metrics_of(p) } or nil }
end

function replicate.poll(ctx, handle)
  local url = handle.get or ("%s/predictions/%s"):format(ctx.base, escape(handle.id)) -- (none: jobs.lua's rebase)
  local res, err = ctx.send({ method = "GET", url = url, headers = replicate.headers(ctx.key) })
  if not res then return nil, err end
  local p, derr = decode(res, "status of prediction " .. handle.id)
  if not p then return nil, derr end
  if type(p.status) ~= "string" then -- (taken for running, it was read until the deadline, unsaid)
    return nil, resil.error("invalid_output", ("replicate: the status of prediction %s has no status field (HTTP %s: %q)")
      :format(handle.id, tostring(res.status), resil.redact(res.body or ""):sub(1, 80)),
      { provider = "replicate", status = res.status, retryable = true })
  end
  local s = state_of(p)
  s.metrics = metrics_of(p)
  return s
end

-- -> res | nil, err; and the job's state when the answer shows it ended before the cancel
-- (the cancel of an ended prediction changes nothing and answers the prediction)
function replicate.cancel(ctx, handle)
  local url = handle.cancel or (ctx.base .. "/predictions/" .. escape(handle.id) .. "/cancel")
  local res, err = ctx.send({ method = "POST", url = url, headers = replicate.headers(ctx.key) })
  if not res then return nil, err end
  local p = json.decode(res.body or "")
  local s
  if type(p) == "table" and type(p.status) == "string" then
    s = state_of(p)
    s.metrics = metrics_of(p)
  end
  -- an answer without the prediction, or with it not ended (a body left empty, a prediction still
  -- stopping): it is read once more, for how it ended (a job that succeeded before the cancel took was
  -- taken for one canceled, its output lost and a second job paid) and the time it ran, which a model
  -- billed by the second is paid for (without it, a row without a price)
  if not (s and s.status ~= "running") then
    local again, rerr = replicate.poll(ctx, handle)
    if again and (again.status ~= "running" or not s) then s = again end
    -- (neither says the prediction: a proxy's page answered the cancel, which may never have reached
    -- Replicate; taken for one that took, a new job was made beside the one that ran on. Nor is it
    -- the read's 404: the cancel was answered, so the job is not known lost, and replaced as such,
    -- it ran on beside its replacement, paid twice)
    if not s then
      return nil, resil.error("unknown", ("replicate: the cancel of prediction %s was answered HTTP %s without " ..
        "it, and it could not be read (%s): not known to be canceled"):format(handle.id, tostring(res.status),
        tostring(type(rerr) == "table" and rerr.message or rerr)), { provider = "replicate", retryable = true })
    end
  end
  return res, nil, s
end

-- "2026-01-05T03:00:01.123456Z" (UTC) -> seconds since the epoch | nil
local function iso_seconds(v)
  local y, mo, d, h, mi, sec = tostring(v):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d%.?%d*)")
  if not y then return nil end
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then y = y - 1 end -- (days from the civil date: March-based years)
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (mo + (mo > 2 and -3 or 9)) + 2) // 5 + tonumber(d) - 1
  local days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
  return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec)
end

-- The job a create sent at wall time `since` made, though its answer was lost: the oldest prediction
-- of this model (its version) created since then (a few minutes' slack for the clocks) whose input
-- `same_input(input)` says is the one sent. -> handle | false (none: the create made nothing) |
-- nil, err (the list could not be read; or err.removed: one whose input Replicate removed may be it)
local FIND_SLACK, FIND_PAGES = 300, 20
-- skip: ids not to take (the call's own earlier jobs) | nil
function replicate.find(ctx, since, same_input, skip)
  local t = ctx.target
  local url, found, complete, removed = ctx.base .. "/predictions", nil, false, nil
  for _ = 1, FIND_PAGES do
    local res, err = ctx.send({ method = "GET", url = url, headers = replicate.headers(ctx.key) })
    if not res then return nil, err end
    local page, derr = decode(res, "list of predictions")
    if not page then return nil, derr end
    if type(page.results) ~= "table" then
      return nil, resil.error("invalid_output", "replicate: the list of predictions has no results",
        { provider = "replicate", status = res.status, retryable = true })
    end
    local older
    for _, p in ipairs(page.results) do
      local at = type(p) == "table" and iso_seconds(p.created_at)
      if at and at < since - FIND_SLACK then older = true; break end
      if at and type(p.id) == "string" and p.id ~= "" and not (skip and skip[p.id]) and (t.version and p.version == t.version
        or not t.version and p.model == t.owner .. "/" .. t.name) then
        if same_input(p.input) then
          found = p -- (newest first: the last one met is the oldest)
        elseif p.data_removed == true and at <= since + FIND_SLACK then
          removed = p -- (its input gone, an hour after it ended; made when the create was sent: it may be the one)
        end
      end
    end
    complete = older or type(page.next) ~= "string"
    url = not complete and ctx.own_url(page.next, nil)
    if not url then break end
  end
  if not found and not complete then
    return nil, resil.error("unknown", ("replicate: the list of predictions did not reach back to %s"):format(
      os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(since))), { provider = "replicate", retryable = false })
  end
  -- (one whose input Replicate removed cannot be told apart: taken for none, a second was made and paid)
  if not found and removed then
    return nil, resil.error("job_unsure", ("prediction %s, made then, has had its input removed by Replicate " ..
      "(data_removed: an hour after it ended), so whether it is this job cannot be told"):format(removed.id),
      { provider = "replicate", id = removed.id, removed = true, retryable = false })
  end
  if not found then return false end
  local get = ("%s/predictions/%s"):format(ctx.base, escape(found.id))
  return { id = found.id, get = get, cancel = get .. "/cancel", created_wall = iso_seconds(found.created_at) }
end

-- A duration the provider reported, in seconds -> a finite number from 0 to a year | nil (none)
-- | nil, true (one that cannot be read: logged). A string, a negative or an infinite one raised
-- in the pricing, or was refused by the budget's settle: a job that succeeded and was paid
-- raised out of ai.job, its output lost, no row, its hold kept.
local YEAR = 365 * 86400
function replicate.seconds(v, what, provider)
  if v == nil or v == json.null then return nil end
  if math.type(v) and v >= 0 and v <= YEAR then return v end
  resil.log.error("job: the provider reported a duration that cannot be read; the job is recorded without a price",
    { provider = provider, field = what, value = tostring(v):sub(1, 80) })
  return nil, true
end

-- what the job used, for policies/pricing_media.lua
function replicate.usage(state, input)
  local out = state and state.output
  local files = 0
  -- (an object, {"image": url, "mask": url} say, is one output: counted by its length, 0, a job that
  -- succeeded and was billed per output was recorded at $0, no row)
  if type(out) == "string" then files = 1
  elseif type(out) == "table" then files = (#out == 0 and next(out) ~= nil) and 1 or #out end
  local metrics = state and state.metrics
  local u = {}
  if type(metrics) == "table" then
    local unreadable
    u.predict_seconds, unreadable = replicate.seconds(metrics.predict_time, "metrics.predict_time", "replicate")
    u.unreadable = unreadable and "metrics.predict_time" or nil -- (jobs.lua: no price, never a guess)
  elseif metrics ~= nil then
    u.unreadable = "metrics"
    resil.log.error("job: the provider reported metrics that are not an object; the job is recorded without a price",
      { provider = "replicate", value = tostring(metrics):sub(1, 80) })
  end
  if state and state.status == "succeeded" then u.outputs = files -- (a video's seconds: jobs.lua's usage_of)
  elseif state and state.completed then -- (succeeded, its output removed: the outputs its input asked for)
    local n = type(input) == "table" and math.tointeger(input.num_outputs)
    u.outputs, u.estimated = n and n >= 1 and n <= 1000 and n or 1, true
  end
  if state and state.aborted and u.predict_seconds == nil and not u.unreadable then u.predict_seconds = 0 end
  return u
end

return replicate
