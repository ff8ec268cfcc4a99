-- policies/providers/fal.lua: the fal queue (https://docs.fal.ai/model-apis/model-endpoints/queue).
--
--   ai.job{ model = "fal/fal-ai/flux/dev", input = { prompt = "..." }, deadline = 300 }
--
-- Key: FAL_KEY, else FAL_KEY_ID and FAL_KEY_SECRET as "id:secret" (Authorization: Key). Base URL: the provider's `base_url` configuration, else
-- FAL_BASE_URL, else https://queue.fal.run.
-- Submit: POST {base}/{endpoint} with the input as the body -> {request_id, status_url,
-- response_url, cancel_url}; GET status_url through IN_QUEUE / IN_PROGRESS / COMPLETED; GET
-- response_url for the output; PUT cancel_url at the deadline. Request errors carry
-- X-Fal-Error-Type (policies/classify.lua maps it).
local resil = require "resil"
local json = resil.json

local fal = {
  name = "fal",
  key_env = "FAL_KEY",
  key_pair = { "FAL_KEY_ID", "FAL_KEY_SECRET" }, -- (else "id:secret", as fal's clients read them)
  base_env = "FAL_BASE_URL",
  base_url = "https://queue.fal.run",
  duration_field = "metrics.inference_time", -- (what a model billed by the second is billed by: jobs.lua's charge)
}

local NAMESPACES = { workflows = true, comfy = true }

-- "owner/app[/path]" | "workflows/owner/app[/path]" -> { endpoint=, app= } | nil, why
-- Each segment a name (letters, digits, "-", "_", "."), none of dots only: the endpoint is the
-- submit's path, and "fal-ai/flux/../../../admin" was a POST with the key to /admin, "fal-ai/flux?x"
-- another request, one with a space or a line break a Lua error from inside the HTTP client.
function fal.target(rest)
  local parts = {}
  for part in (rest .. "/"):gmatch("(.-)/") do
    if not part:match("^[%w%-_%.]+$") or part:match("^%.+$") then parts = nil; break end
    parts[#parts + 1] = part
  end
  -- (a namespaced app, workflows/owner/app, has its queue under all three: fal-js's parseEndpointId)
  local n = parts and NAMESPACES[parts[1]] and 3 or 2
  if not parts or #parts < n then
    return nil, ("fal model must be \"fal/owner/app[/path]\", got \"fal/%s\""):format(rest)
  end
  return { endpoint = rest, app = table.concat(parts, "/", 1, n) }
end

function fal.headers(key, json_body)
  local h = { ["Authorization"] = "Key " .. key }
  if json_body then h["Content-Type"] = "application/json" end
  return h
end

local escape = require("policies.providers.replicate").escape -- an id as one path segment
local seconds = require("policies.providers.replicate").seconds -- a reported duration, checked

local function decode(res, what)
  local body = json.decode(res.body or "")
  if type(body) ~= "table" then
    return nil, resil.error("invalid_output", ("fal: the %s is not a JSON object (HTTP %s: %q)"):format(what,
      tostring(res.status), resil.redact(res.body or ""):sub(1, 80)),
      { provider = "fal", status = res.status, retryable = true })
  end
  return body
end

function fal.create(ctx)
  local res, err = ctx.send_create({ method = "POST", url = ctx.base .. "/" .. ctx.target.endpoint,
    headers = fal.headers(ctx.key, true), json = ctx.input })
  if not res then return nil, err end
  local q, derr = decode(res, "submit answer")
  if not q then return nil, derr end
  -- (no request_id: a request made that no one can follow, recorded at its estimate by jobs.lua from
  -- the status; one with an id and no URLs is followed at the documented ones, as replicate.create)
  if type(q.request_id) ~= "string" or q.request_id == "" then
    return nil, resil.error("invalid_output", "fal: the submit answer has no request_id",
      { provider = "fal", status = res.status, retryable = true })
  end
  for _, k in ipairs({ "status_url", "response_url", "cancel_url" }) do
    if q[k] == json.null then q[k] = nil end
  end
  -- (the key goes only to base_url's host: jobs.lua's own_url; fal's documented queue URLs)
  local at = fal.documented(ctx, q.request_id)
  return { id = q.request_id, status_url = ctx.own_url(q.status_url, at .. "/status"),
    response_url = ctx.own_url(q.response_url, at), cancel_url = ctx.own_url(q.cancel_url, at .. "/cancel") }
end

-- the request's URL as fal's API documents it on base_url (its status and cancel under it)
function fal.documented(ctx, id) return ("%s/%s/requests/%s"):format(ctx.base, ctx.target.app, escape(id)) end

-- a handle's URLs, the documented ones for those it has not (jobs.lua's rebase leaves out one
-- that was off the host of base_url)
local function urls(ctx, handle)
  local at = fal.documented(ctx, handle.id)
  return handle.status_url or (at .. "/status"), handle.response_url or at, handle.cancel_url or (at .. "/cancel")
end

-- a result read that failed in a way read again (a bare 5xx, a page that is no JSON), of a request fal
-- said COMPLETED: marked so (fal.cancel, at the deadline: it ran and is billed, not one that may run on)
local function unread_result(err, s)
  if type(err) == "table" then err.completed, err.metrics = true, s.metrics ~= json.null and s.metrics or nil end
  return err
end

-- COMPLETED -> fetch the output from response_url
local function completed(ctx, handle, s)
  if s.error ~= nil and s.error ~= json.null then
    return { status = "failed", error = s.error, error_type = s.error_type, metrics = s.metrics }
  end
  local _, response_url = urls(ctx, handle)
  local res, err = ctx.send({ method = "GET", url = response_url, headers = fal.headers(ctx.key) })
  if not res then
    -- a result larger than the response may be (sync_mode's data URIs, say): the request ran and fal
    -- bills it, and it is as large read again (taken for a status that could not be read, it had no row
    -- inside a run, at every resume, and outside one a row without a price, said to "run on")
    if type(err) == "table" and (err.kind or err.class) == "too_large" then
      return { status = "failed", error = ("its result could not be read (GET %s): %s; another request would " ..
        "be as large, none is made"):format(response_url, tostring(err.message)),
        metrics = s.metrics ~= json.null and s.metrics or nil, completed = true, final = true }
    end
    -- a request that failed on fal's side answers its result with the error: fal names it
    -- (X-Fal-Error-Type) or refuses the input (4xx). A bare 5xx (a proxy, an outage) says
    -- nothing of the request, which may have succeeded and been paid: it is read again.
    local status = type(err) == "table" and err.status
    local headers = status and type(err.response) == "table" and err.response.headers
    local error_type = type(headers) == "table" and headers["x-fal-error-type"] or nil
    if status and (error_type or (status >= 400 and status < 500 and status ~= 429)) then
      -- (said as what it is, the result's read, with fal's detail: "failed: HTTP 404" sent a user to
      -- look for a failed model; and the time its status reported, which a per-second model bills)
      local body = type(err.response) == "table" and json.decode(err.response.body or "")
      local detail = type(body) == "table" and (type(body.detail) == "string" and body.detail
        or type(body.detail) == "table" and json.encode(body.detail)) or nil
      -- its app refused its input (a 422: a field out of range, content flagged; or fal says another
      -- try of it is no use, X-Fal-Retryable: false): that is its answer, not a result that could not
      -- be read. It made no outputs, and the same input fails again: not replaced (it was recorded at
      -- the outputs it asked for, and a second request sent with it, the same way)
      if status == 422 or type(headers) == "table" and headers["x-fal-retryable"] == "false" then
        return { status = "failed", error = ("its input was refused (HTTP %d)%s"):format(status,
          detail and (": " .. resil.redact(detail):sub(1, 300)) or ""), error_type = error_type,
          metrics = s.metrics ~= json.null and s.metrics or nil, final = true }
      end
      -- (a request fal said COMPLETED without an error ran, and fal bills it: without the result
      -- its outputs are estimated (fal.usage); it had no row at all, and its replacement was paid too)
      return { status = "failed", error = ("its result could not be read (GET %s): %s%s"):format(response_url,
        tostring(err.message), detail and (": " .. resil.redact(detail):sub(1, 200)) or ""), error_type = error_type,
        metrics = s.metrics ~= json.null and s.metrics or nil, completed = not error_type or nil }
    end
    return nil, unread_result(err, s)
  end
  local out, derr = decode(res, "result of request " .. handle.id)
  if not out then return nil, unread_result(derr, s) end
  return { status = "succeeded", output = out, metrics = s.metrics ~= json.null and s.metrics or nil }
end

function fal.poll(ctx, handle)
  local status_url = urls(ctx, handle)
  local res, err = ctx.send({ method = "GET", url = status_url, headers = fal.headers(ctx.key) })
  if not res then return nil, err end
  local s, derr = decode(res, "status of request " .. handle.id)
  if not s then return nil, derr end
  if type(s.status) ~= "string" then -- (taken for running, it was read until the deadline, unsaid)
    return nil, resil.error("invalid_output", ("fal: the status of request %s has no status field (HTTP %s: %q)")
      :format(handle.id, tostring(res.status), resil.redact(res.body or ""):sub(1, 80)),
      { provider = "fal", status = res.status, retryable = true })
  end
  if s.status == "COMPLETED" then return completed(ctx, handle, s) end
  return { status = "running", queue_position = s.queue_position, raw = s }
end

-- A request that completed and whose result could still not be read at the cancel (unread_result's
-- error): it ran and fal bills it; another beside it would be paid too (a call with a key reads it
-- again, jobs.lua)
local function unread_state(err)
  return { status = "failed", completed = true, final = true, retryable = true, metrics = err.metrics,
    error = ("it completed, but its result could not be read (%s): recorded, no other request made"):format(
      tostring(err.message)) }
end

-- A cancel fal accepted (202 CANCELLATION_REQUESTED) is a signal sent to the request's runner, whose
-- app stops when it does, or not at all: the request may still complete, and be billed. It is read
-- until it ends, within the cancel's window (ctx.poll_until, else CANCEL_WINDOW): canceled (its
-- error client_cancelled; a 404, gone) -> res, nil, { status = "canceled", metrics = }; completed
-- or failed meanwhile -> res, nil, its state (taken as a request that ended before the cancel);
-- still running -> nil, err: it may run on (jobs.lua: not replaced, said `canceled = false`).
local CANCEL_WINDOW = 30
local function until_ended(ctx, handle, res)
  local own = ctx.poll_until == nil
  if own then ctx.poll_until = resil.now() + CANCEL_WINDOW end
  local last_until, delay, last = ctx.poll_until, 0.5, nil
  while resil.now() < last_until do
    local s, err = fal.poll(ctx, handle)
    if s and s.status ~= "running" then
      if own then ctx.poll_until = nil end
      if s.status == "failed" and s.error_type == "client_cancelled" then
        return res, nil, { status = "canceled", metrics = s.metrics }
      end
      return res, nil, s
    end
    if not s and type(err) == "table" and err.status == 404 then
      if own then ctx.poll_until = nil end
      return res, nil, { status = "canceled" }
    end
    last = not s and err or last
    local left = last_until - resil.now()
    if left <= 0 then break end
    resil.sleep(math.min(delay, left))
    delay = math.min(delay * 2, 5)
  end
  if own then ctx.poll_until = nil end
  -- (completed meanwhile, its result not read: taken for a request that ran on, it had no row in a run)
  if type(last) == "table" and last.completed then return res, nil, unread_state(last) end
  return nil, resil.error("cancel_pending", ("fal: the cancel of request %s was accepted, but the request had " ..
    "not ended %d s later%s"):format(handle.id, CANCEL_WINDOW, last and (" (its status: %s)"):format(
    tostring(type(last) == "table" and last.message or last)) or ""), { provider = "fal", id = handle.id,
    retryable = true })
end

-- -> res | nil, err; and the request's state when it completed before the cancel (fal answers
-- 400 ALREADY_COMPLETED: the request is read once more) or after it was accepted (until_ended)
function fal.cancel(ctx, handle)
  local _, _, url = urls(ctx, handle)
  local res, err = ctx.send({ method = "PUT", url = url, headers = fal.headers(ctx.key) })
  if not res and type(err) == "table" and err.status == 400 then
    local s, serr = fal.poll(ctx, handle)
    if s and s.status ~= "running" then return nil, err, s end
    -- completed, its result still not read at the deadline: it ran, and fal bills it (taken for a
    -- cancel that failed, it had no row inside a run, at every resume, and a row without a price
    -- outside one, said to "run on"); another request beside it would be paid too
    if not s and type(serr) == "table" and serr.completed then return nil, err, unread_state(serr) end
  end
  if res then return until_ended(ctx, handle, res) end
  return res, err
end

function fal.usage(state, input)
  local u = {}
  if state and state.status == "succeeded" then
    local out = state.output
    local images = type(out) == "table" and type(out.images) == "table" and #out.images or nil
    u.outputs = images or 1 -- (a video's seconds: jobs.lua's usage_of)
  elseif state and state.completed then -- (COMPLETED, its result unreadable: the outputs it asked for)
    local n = type(input) == "table" and math.tointeger(input.num_images)
    u.outputs, u.estimated = n and n >= 1 and n <= 100 and n or 1, true
  end
  local metrics = state and state.metrics
  if type(metrics) == "table" then
    local unreadable
    u.predict_seconds, unreadable = seconds(metrics.inference_time, "metrics.inference_time", "fal")
    u.unreadable = unreadable and "metrics.inference_time" or nil -- (jobs.lua: no price, never a guess)
  end
  return u
end

return fal
