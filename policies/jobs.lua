-- policies/jobs.lua: async jobs (Replicate, fal) and speech (ElevenLabs) that survive crashes
-- and failures without paying twice.
--
--   local jobs = require "policies.jobs"       -- also ai.job / ai.speech
--   local r, err = jobs.job{ model = "replicate/owner/name:<version>", input = { prompt = "a cat" },
--     deadline = 900,          -- seconds per job: past it the job is canceled and a new one made
--     attempts = 2,            -- jobs made at most (a failed or canceled one is replaced)
--     wait = 30,               -- Replicate only: `Prefer: wait=30` on create
--     key = "cat-1",           -- names the job for resumes (inside a step one is derived)
--     budget = "daily",        -- reserve the unit price first, settle the actual
--     user = "u42" }
--   -- r = { provider =, model =, id = (the provider's job id), output =, cost_usd =, usage =,
--   --       attempts =, job_ids = {...} }
--   local mp3 = jobs.speech{ model = "elevenlabs/eleven_flash_v2_5", voice = "<voice id>", text = s }
--   -- mp3 = { audio = (bytes), content_type =, characters =, cost_usd =, provider =, model =, id = }
--
-- Per provider (jobs.configure(name, conf) or a project copy of this file): base_url, api_key
-- (a value; by default the key is read from the provider's variable), key_env, timeout,
-- deadline, attempts, poll = { first, factor, max } and the policies/call.lua options rate,
-- breaker, retry, concurrency, which apply to each HTTP request (create, poll, result, cancel).
--
-- Durability: inside resil.step (or with `key`), a job's create runs under resil.once keyed
-- on the job, so its id is stored the moment the provider answers: a resumed run polls the
-- job it already paid for. A job that fails, or is canceled at its deadline, is replaced by a
-- NEW job under the key of the next attempt (`key#2`); the first attempt's record is never
-- replayed as the answer. Each job's cost is one ledger row, deduplicated on the job id.
local resil = require "resil"
local call = require "policies.call"
local classify = require "policies.classify"
local pricing = require "policies.pricing_media"

local jobs = {}

jobs.adapters = {
  replicate = require "policies.providers.replicate",
  fal = require "policies.providers.fal",
  elevenlabs = require "policies.providers.elevenlabs",
}

jobs.defaults = {
  timeout = 60,                                -- seconds per HTTP request
  deadline = 900,                              -- seconds per job
  attempts = 2,
  poll = { first = 1, factor = 1.5, max = 15 }, -- seconds between status reads
  retry = { base = 0.5, cap = 20 },
}

-- (kept across a policy reload, as ai.configure's: a reload loaded this module afresh, and ai.job
-- asked for the key's variable, or sent the job with it to the provider's default base_url)
jobs.config = resil.keep("policies.jobs.config", function() return { replicate = {}, fal = {}, elevenlabs = {} } end)

local providers = {} -- name -> call.provider, built on first use

-- A job's deadline is a year at most, as long as its record is kept for resumes (JOB_RETENTION):
-- math.huge (or 1e300) made the job, paid, and then raised from inside, its end no date to log,
-- and a job that hangs would have been waited on for ever.
local MOST_DEADLINE = 365 * 86400

-- jobs.configure(name, conf): replace a provider's configuration
-- (a key too short to be redacted, or a base_url that is no URL, raised at each call from inside
-- jobs.lua or the HTTP client: said here, where it was written; the key itself is never shown)
local function bad_key(k)
  if k == nil then return nil end
  if type(k) ~= "string" then return type(k) end
  if #k < 6 then return ("%d bytes"):format(#k) end
end
local function bad_base(b)
  if b == nil or type(b) == "string" and b:match("^[hH][tT][tT][pP][sS]?://[^/?#%s]+[^%s]*$") then return nil end
  return type(b) == "string" and ("%q"):format(resil.redact(b):sub(1, 80)) or type(b) -- (redacted, then cut)
end
function jobs.configure(name, conf)
  if type(name) ~= "string" or type(conf) ~= "table" then error("jobs.configure(name, conf)", 2) end
  local why = bad_key(conf.api_key)
  if why then
    error(("jobs.configure: %s's api_key must be a string of 6 bytes or more, not %s"):format(name, why), 2)
  end
  why = bad_base(conf.base_url)
  if why then error(("jobs.configure: %s's base_url must be an http(s) URL, not %s"):format(name, why), 2) end
  -- (a timeout of 0, -1 or "5" was taken here and raised at every call, from inside jobs.lua; the
  -- others raised at each call's line, far from where they were written)
  local function refuse(k, what)
    local v = conf[k]
    error(("jobs.configure: %s's %s must be %s, not %s"):format(name, k, what,
      type(v) == "string" and ("%q"):format(v) or tostring(v)), 3)
  end
  local function number(k) return type(conf[k]) == "number" and conf[k] == conf[k] end
  if conf.timeout ~= nil and not (number("timeout") and conf.timeout > 0) then
    refuse("timeout", "a number of seconds > 0 (math.huge: none)")
  end
  if conf.deadline ~= nil and not (number("deadline") and conf.deadline > 0 and conf.deadline <= MOST_DEADLINE) then
    refuse("deadline", "a number of seconds > 0, a year at most")
  end
  if conf.attempts ~= nil and not (number("attempts") and math.tointeger(conf.attempts) and conf.attempts >= 1) then
    refuse("attempts", "a whole number >= 1")
  end
  if conf.poll ~= nil and type(conf.poll) ~= "table" then refuse("poll", "a table { first =, factor =, max = }") end
  local before = jobs.config[name]
  jobs.config[name] = conf
  -- (one table for every version: a reload that fails after this puts it back)
  require("resil.if_reload_fails")(function() jobs.config[name] = before end)
  providers[name] = nil
end

local function option(conf, spec, k)
  local v = spec and spec[k]
  if v == nil then v = conf[k] end
  if v == nil then v = jobs.defaults[k] end
  return v
end

local function named(t, name)
  if t == nil then return nil end
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  c.name = c.name or name
  return c
end

-- scheme://host:port of an http(s) URL, lower-cased with the default port
-- named (the host is what follows any user info: "https://api.x@evil/" is evil's)
local function origin(u)
  local scheme, authority = tostring(u):match("^(%a[%w+.-]*)://([^/?#]*)")
  if not scheme then return nil end
  scheme, authority = scheme:lower(), authority:gsub("^.*@", ""):lower()
  if not authority:match(":%d+$") then authority = authority .. (scheme == "https" and ":443" or ":80") end
  return scheme .. "://" .. authority
end

-- A URL the provider answered (where to read or cancel a job) that is not an
-- http(s) URL on the origin of the configured base_url (or that resil.http
-- could not parse) is replaced by the one the provider's API documents there
-- (`fallback`): the API key goes to no other host, and a job already paid
-- for is still read and canceled.
local warned_url = {}
local function own_url(ctx, u, fallback)
  if type(u) == "string" and u:match("^https?://[%w%-%._~:/%?#%[%]@!%$&'%(%)%*%+,;=%%]+$")
    and origin(u) == origin(ctx.base) then
    return u
  end
  if u ~= nil and not warned_url[ctx.name] then
    warned_url[ctx.name] = true
    resil.log.warn("job: the provider answered a URL off its base_url's host (or one that cannot be read); the " ..
      "documented URL on base_url is used instead",
      { provider = ctx.name, url = resil.redact(tostring(u)):sub(1, 200), base_url = ctx.base })
  end
  return fallback
end

-- A transfer that failed after the provider's 2xx (its body cut): what it asked for was made
local function answered(e)
  return type(e) == "table" and math.type(e.status) == "integer" and e.status >= 200 and e.status < 300
end

-- A create's failure after which the job may exist: its answer never came (a timeout), or a
-- gateway says its upstream had the request and did not answer in time or well (502, 504,
-- Cloudflare's 524). Another create would pay twice. (A 503 or a 429 is a refusal: retried.)
local MAY_BE_MADE = { [502] = true, [504] = true, [524] = true }

-- Two views of one provider (the same bucket, breaker and concurrency limit): creates are not
-- retried after a timeout, since the provider may have made the job (another create would
-- pay twice); reads, results and cancels are.
local function provider_for(name, conf)
  local p = providers[name]
  if not p then
    local function make(retry_opts)
      return call.provider(name, { timeout = option(conf, nil, "timeout"), retry = retry_opts,
        operation = "generate_content", rate = named(conf.rate, name .. ":requests"), breaker = named(conf.breaker, name),
        concurrency = named(conf.concurrency, name) })
    end
    local r = option(conf, nil, "retry")
    local once_sent = {}
    for k, v in pairs(r) do once_sent[k] = v end
    -- (nor after its 2xx was cut: the job was made, and a second one would be paid as well; decided
    -- here, whatever max_retries says: a number there, `retry = { max_retries = 3 }`, sent a create
    -- that timed out again, and the job was made and paid twice)
    local outcome = r.classify or classify.outcome
    once_sent.classify = function(res, err, o)
      local v = outcome(res, err, o)
      if v and v.retryable and (answered(v) or v.kind == "timeout" or MAY_BE_MADE[v.status]) then
        local made = {}
        for k, x in pairs(v) do made[k] = x end
        made.retryable = false
        return made
      end
      return v
    end
    p = { any = make(r), create = make(once_sent) }
    providers[name] = p
  end
  return p
end

-- Everything one call needs; raises at the caller's line for misuse, nil, err when the key
-- is missing (before any request is sent).
local function context(spec, what, level)
  if type(spec) ~= "table" then error(("%s: expects a table"):format(what), level) end
  if type(spec.model) ~= "string" then error(("%s: model must be a string \"provider/model\""):format(what), level) end
  local name, rest = spec.model:match("^([%w_%-]+)/(.+)$")
  local adapter = name and jobs.adapters[name]
  if not adapter or not adapter[what == "ai.speech" and "speak" or "create"] then
    error(("%s: no %s provider for model \"%s\""):format(what, what == "ai.speech" and "speech" or "job", spec.model),
      level)
  end
  local target, why = adapter.target(rest)
  if not target then error(("%s: %s"):format(what, why), level) end
  local conf = jobs.config[name] or {}
  local env = conf.key_env or adapter.key_env
  local key = conf.api_key -- a value from a vault: redacted like a secret
  local bad = bad_key(key)
  if bad then error(("%s: the %s api_key must be a string of 6 bytes or more, not %s"):format(what, name, bad), level) end
  if key then resil.log.redact(key) else key = resil.secret(env) end
  -- (fal's clients take FAL_KEY_ID and FAL_KEY_SECRET when FAL_KEY is not set: adapter.key_pair)
  local pair = not key and not conf.key_env and adapter.key_pair
  if pair then
    local id, secret = resil.secret(pair[1]), resil.secret(pair[2])
    key = id and secret and (id .. ":" .. secret) or nil
    if key then resil.log.redact(key) end
  end
  if not key then
    return nil, resil.error("missing_key", ("%s: %s is not set (the %s API key)"):format(what, env, name),
      { provider = name, variable = env, retryable = false })
  end
  local base = conf.base_url or os.getenv(adapter.base_env)
  if base == nil or base == "" then base = adapter.base_url end
  local bad_url = bad_base(base) -- (the variable's, or one set in jobs.config directly)
  if bad_url then
    error(("%s: %s must be an http(s) URL, not %s"):format(what, conf.base_url and (name .. "'s base_url")
      or adapter.base_env, bad_url), level)
  end
  local p = provider_for(name, conf)
  local ctx = { name = name, adapter = adapter, target = target, model = spec.model, conf = conf, key = key,
    base = (base:gsub("/+$", "")), input = spec.input, wait = spec.wait }
  -- a create's retries, and a speech's, end at the deadline (ctx.retries_until): a Retry-After of an
  -- hour held the call two hours for a job of a 60 s deadline. (Not its request's timeout: a create
  -- cut short may leave a job made that no one knows of, a speech an answer billed and not read.)
  local function given_up()
    if ctx.retries_until and resil.now() >= ctx.retries_until then return "deadline" end
  end
  ctx.send_create = function(req) return p.create:attempts(req, false, nil, given_up) end
  ctx.own_url = function(u, fallback) return own_url(ctx, u, fallback) end
  -- a status read keeps to the job's deadline (ctx.poll_until): a hanging read or a long
  -- Retry-After does not hold off the cancel
  ctx.send = function(req)
    if ctx.poll_until then return p.any:attempts(req, ctx.poll_until) end
    if ctx.refused then return p.any:attempts(req, false, ctx.refused, given_up) end -- (a speech's cut answers, see there)
    return p.any(req)
  end
  return ctx
end

-- A canonical text of a value (keys sorted): the same request hashes the same in every process.
local function canonical(v, out)
  local t = type(v)
  if t == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    out[#out + 1] = "{"
    for _, k in ipairs(keys) do
      out[#out + 1] = resil.json.encode(tostring(k))
      out[#out + 1] = ":"
      canonical(v[k], out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  elseif t == "string" or t == "number" or t == "boolean" then
    out[#out + 1] = resil.json.encode(v)
  else
    out[#out + 1] = "null"
  end
  return out
end
local function fingerprint(...) return resil.hash(table.concat(canonical({ ... }, {}))) end
jobs.fingerprint = fingerprint

-- The name the caller gave the model: an alias policies.ai resolved (`_alias`), else the model. A
-- job is named by it across resumes, not by the model the alias names at the time: a registry
-- edited, a rollback or a migration's end between a run and its resume moved the job's key, and
-- the resumed run made and paid a second job beside the first.
local function asked(spec)
  return type(spec._alias) == "string" and spec._alias or spec.model
end

-- The job's name for resumes: the caller's key, or (inside a step) the run, the step's name and
-- place and the request; nil outside a step without a key: nothing to resume. -> key, and the
-- {key, model} versions before gave it (read, never written: a job made under one is followed):
-- the first step of its name in its scope had no place, and an alias's job was named by its model.
local function durable_key(spec)
  local by_model = asked(spec) ~= spec.model and spec.model or nil
  if spec.key ~= nil then return tostring(spec.key), by_model and { { tostring(spec.key), by_model } } or {} end
  local c = resil.context()
  if not c.step then return nil end
  -- a run started over (--fresh) makes new jobs: its generation is in the key
  local gen = resil.run.generation()
  local function named(model)
    return ("%s%s/%s%s/%s"):format(resil.run.id(), gen > 0 and ("~" .. gen) or "", c._step_scope and
      (c._step_scope .. "/") or "", c.step, fingerprint(model, spec.input):sub(1, 16))
  end
  -- The step's place tells apart steps of one name with one request (a loop making variations):
  -- without it they were one job, each step given the first one's output.
  local key, legacy = named(asked(spec)), {}
  if by_model then legacy[#legacy + 1] = { ("%s@%d"):format(named(by_model), c._step_seq), by_model } end
  if (c._step_nth or 1) == 1 then legacy[#legacy + 1] = { named(spec.model), spec.model } end
  return ("%s@%d"):format(key, c._step_seq), legacy
end

-- The name a job keeps across resumes, for what is decided before it is made: the side of a
-- migration an alias draws (policies.ai). nil: nothing resumes it (no key, outside a step).
function jobs.resume_key(spec)
  if type(spec) ~= "table" or type(spec.model) ~= "string" then return nil end
  local ok, key = pcall(durable_key, spec) -- (an input that cannot be sent: jobs.job says so)
  return ok and key or nil
end

local warned = {}
local function warn_unpriced(model, why)
  if warned[model] then return end
  warned[model] = true
  resil.log.warn("no price for this model: its costs are recorded unpriced (add it to policies/pricing_media.lua)",
    { model = model, error = why })
end

-- One ledger row per job (id = the provider's job id); with a ticket, the reservation is settled
-- (how = "charge": counted in it beside the settle to come).
local function charge(ctx, spec, operation, job_id, usage, ticket, how)
  local usd, why = pricing.cost(ctx.name, ctx.model, usage)
  local units = {}
  for k, v in pairs(usage or {}) do units[k] = v end
  -- a duration the provider reported that cannot be read (the adapter said which), or none at all
  -- (a cancel answered without it, fal's; a status without metrics), for a job of a model billed
  -- by it: a row without a price, never a guess ($0 wrote no row: a job canceled at its deadline
  -- after 900 s on a GPU was not in the ledger, nor its budget, nor said)
  local price = usage and pricing.price(ctx.model)
  if usage and usage.unknown then
    usd = nil -- (a unit it is billed by, or what the job made: said where it was found out)
  elseif price and price.per_predict_second and (usage.unreadable or operation == "job" and usage.predict_seconds == nil)
  then
    usd = nil
    if not usage.unreadable then
      units.unknown = ctx.adapter.duration_field or "duration"
      if not usage.cut then -- (a cut create's log says so: it was never followed)
        resil.log.error("job: the provider did not say how long the job ran, which its model is billed by; " ..
          "recorded without a price", { provider = ctx.name, model = ctx.model, id = job_id, field = units.unknown })
      end
    end
  end
  if usd == nil then
    if not (units.unreadable or units.unknown) then warn_unpriced(ctx.model, why) end -- (those were said)
    units.unpriced = true
  end
  local entry = { provider = ctx.name, model = ctx.model, operation = operation, user = spec.user,
    id = job_id and (ctx.name .. ":" .. job_id) or nil, units = units,
    retry = true } -- a row the store refuses is tried again, not dropped (the job was paid)
  local ok, err
  if ticket and usd ~= nil then
    ok, err = ticket[how or "settle"](ticket, usd, entry)
  else
    if ticket and how ~= "charge" then ticket:release() end
    entry.usd = usd -- nil: a row without a price (warned once), never a zero
    if usd == nil or usd > 0 then ok, err = resil.cost.record(entry) else ok = true end
  end
  if ok == nil and err and not (type(err) == "table" and err.retrying) then
    resil.log.warn("cost not recorded", { provider = ctx.name, model = ctx.model, id = job_id, error = tostring(err) })
  end
  return usd
end

-- A model without a price is refused by a budget, as a chat call's is: nothing would be held, and
-- its cost (a row without a price) never counts, so a budget let every such job through.
local function reserve(spec, estimate, model)
  if spec.budget == nil then return nil end
  if estimate == nil then
    return nil, resil.error("unpriced", ("budget '%s' cannot hold a call without a price: no price for %s " ..
      "(add it to policies/pricing_media.lua)"):format(tostring(spec.budget), tostring(model)),
      { class = "unpriced", retryable = false })
  end
  -- (a model billed by the second is held at its deadline's worth: a deadline of math.huge, or a
  -- price of 0 times it, is no amount a budget holds; it raised out of budget:reserve)
  if not (estimate >= 0 and estimate <= 1e9) then
    return nil, resil.error("bad_option", ("budget '%s' cannot hold a job of %s whose cost is not bounded: it is " ..
      "billed by the second and held at its deadline's worth (give the job a deadline in seconds)"):format(
      tostring(spec.budget), tostring(model)), { class = "bad_request", retryable = false })
  end
  return resil.budget(spec.budget):reserve(estimate)
end

-- The seconds of video a job's input asks for (`duration`, a number or a numeric string, as
-- providers take it) -> seconds | nil, "absent" | "unreadable" (negative, past a day, not a number)
local DAY = 86400
local function input_seconds(input)
  if type(input) ~= "table" then return nil, "absent" end
  local v = input.duration
  if v == nil or v == resil.json.null then return nil, "absent" end
  local d = (type(v) == "number" or type(v) == "string") and tonumber(v) or nil
  if d and d >= 0 and d <= DAY then return d end
  return nil, "unreadable"
end

-- what a job will likely use, for a budget's reservation: a count or a duration that cannot be one
-- (negative, NaN, 1e12) is the usual one (it raised out of budget:reserve, from inside jobs.lua).
-- deadline: the job's, the most a model billed by the second runs before it is canceled (held at
-- nothing, ten such jobs at once on a $0.05 budget spent $0.20)
local function estimate_usage(ctx, input, deadline)
  input = type(input) == "table" and input or {}
  local n = tonumber(input.num_outputs or input.num_images)
  local price = pricing.price(ctx.model)
  return { outputs = n and n >= 1 and n <= 1000 and n or 1,
    video_seconds = input_seconds(input) or price and price.duration or 5, predict_seconds = deadline }
end

-- A create whose answer was cut after its 2xx: the provider made a job nobody can follow (no id), and
-- bills it; recorded at its estimate, said. -> its usd
local function charge_cut(ctx, spec, err, ticket, how)
  local usage = estimate_usage(ctx, spec.input)
  usage.estimated, usage.cut = true, 1
  resil.log.error("job: the create's answer was cut after the provider accepted it: a job was made that " ..
    "cannot be followed; recorded at its estimate, not made again", { provider = ctx.name, model = ctx.model,
    error = tostring(err.message) })
  return charge(ctx, spec, "job", nil, usage, ticket, how)
end

-- ---------- jobs ----------

-- What a job used, as its adapter reads the provider's answer; a time it says the job ran that is
-- longer than the job has existed (since its create was answered, with the create's own wait
-- and a minute's slack) is recorded at that most, said, as a chat answer's output past its
-- max_tokens is: a provider's 5 days for a 30 s job was a row of them.
local function usage_of(ctx, handle, state, input)
  local usage = ctx.adapter.usage(state.status == "deadline" and { metrics = state.metrics } or state, input)
  local ran, made = usage.predict_seconds, handle.created_wall
  if type(ran) == "number" and type(made) == "number" then
    local most = math.max(0, resil.clock.wall() - made) + (tonumber(ctx.wait) or 0) + 60
    if ran > most then
      resil.log.error("job: the provider says it ran longer than it has existed; recorded at that most",
        { provider = ctx.name, model = ctx.model, id = handle.id, reported = ran, recorded = most })
      usage.predict_seconds, usage.capped = most, true
    end
  end
  -- a video is billed by the seconds its input asked for: none is the model's default (its price's
  -- `duration`), else unknown, as one that cannot be seconds (a row without a price, said; it was
  -- $0, which writes no row, or a negative cost, or 1e12 s raised out of ai.job after the job was paid)
  local price = pricing.price(ctx.model)
  -- (one that ran to its end whose output could not be had, `completed`, is billed as well)
  if price and price.per_video_second and (state.status == "succeeded" or state.completed) then
    local d, why = input_seconds(input)
    if d == nil and why == "absent" then d = price.duration end
    usage.video_seconds = d
    if d == nil then
      usage.unknown = "input.duration"
      resil.log.error("job: the seconds of video its model is billed by are not known (the input's duration is " ..
        (why == "absent" and "absent, and the price gives no default" or "not a number of seconds") ..
        "); recorded without a price", { provider = ctx.name, model = ctx.model, id = handle.id,
        duration = type(input) == "table" and tostring(input.duration):sub(1, 40) or nil })
    end
  end
  return usage
end

-- refusals of our own side (an open breaker, a full bulkhead): the job runs on, paid for, and
-- is read again at the next poll
local LOCAL_WAIT = { circuit_open = true, bulkhead_full = true }

-- A 404 for the job itself: the provider no longer knows it (expired, lost in an outage, a
-- resumed run's job made under another account). Nothing of it runs on to be paid twice, and
-- reading it again never answers otherwise: it is replaced as a failed job is (kept, every
-- resume of its run failed at its step for good).
local function lost(err)
  return type(err) == "table" and (err.status == 404 or (err.class or err.kind) == "not_found")
end

-- Poll until the job ends or its deadline passes (then cancel it). -> state | nil, err
local CANCEL_WINDOW = 30

-- A job whose status reads answered 404 twice in a row is lost only if its cancel is a 404 too: one
-- the cancel finds was read through a route that failed (a proxy's 404, an edge that did not know it
-- yet). Taken for lost at the first 404, it ran on beside its replacement, paid twice, with no row.
-- -> its state (ended; or canceled now, recorded for the time it ran) | lost | nil (not known: read on)
local LOST_READS = 2
local function confirm_lost(ctx, handle, err)
  ctx.poll_until = resil.now() + CANCEL_WINDOW
  local _, cerr, ended = ctx.adapter.cancel(ctx, handle)
  ctx.poll_until = nil
  if ended and (ended.status == "succeeded" or ended.status == "failed") then return ended end
  if cerr and lost(cerr) then return { status = "lost", error = err.message } end
  if cerr then return nil end
  return { status = "canceled", metrics = ended and ended.metrics, error = ("its status reads answered %s: " ..
    "canceled, as it could not be followed"):format(tostring(err.message)) }
end

local function follow(ctx, handle, deadline)
  local poll = option(ctx.conf, nil, "poll")
  local elapsed = math.max(0, resil.clock.wall() - (handle.created_wall or resil.clock.wall()))
  local deadline_at = resil.now() + deadline - elapsed -- a resumed job keeps the time it already ran
  local delay = ctx.poll_first or poll.first or 1
  local state = handle.state
  local unread -- the failure of the status reads since the last one read (said at the deadline)
  local missing = 0 -- status reads in a row answered 404
  while not (state and state.status ~= "running") do
    local left = deadline_at - resil.now()
    if left <= 0 then
      -- the cancel's tries end CANCEL_WINDOW after the deadline: against a provider that hangs,
      -- four tries of 60 s each gave the caller its deadline's error four minutes late
      ctx.poll_until = resil.now() + CANCEL_WINDOW
      local _, cerr, ended = ctx.adapter.cancel(ctx, handle)
      ctx.poll_until = nil
      -- a job that ended before the cancel took is paid for: its outcome is the answer
      if ended and (ended.status == "succeeded" or ended.status == "failed") then return ended end
      -- (a 404 for the cancel alone may be its route gone: the job is lost if it cannot be read
      -- either, as for a run resumed past the deadline of a job the provider has forgotten)
      if cerr and lost(cerr) and lost(select(2, ctx.adapter.poll(ctx, handle))) then
        return { status = "lost", error = cerr.message }
      end
      if cerr then
        resil.log.warn("job: cancel failed", { provider = ctx.name, id = handle.id, error = tostring(cerr) })
        return { status = "deadline", uncanceled = cerr, unread = unread } -- it may run on: no replacement beside it
      end
      -- the time it ran, as the cancel's answer says (hardware-billed models are paid for it)
      return { status = "deadline", metrics = ended and ended.metrics, unread = unread }
    end
    resil.sleep(math.min(delay, left))
    delay = math.min(delay * (poll.factor or 1.5), poll.max or 15)
    if resil.now() < deadline_at then
      ctx.poll_until = deadline_at
      local s, err = ctx.adapter.poll(ctx, handle)
      ctx.poll_until = nil
      missing = not s and lost(err) and missing + 1 or 0
      local gone = missing >= LOST_READS and confirm_lost(ctx, handle, err)
      if gone == nil then missing = 0 end -- (its cancel failed: read on, the deadline's cancel tries again)
      if s then
        state, unread = s, nil
      elseif gone then
        return gone
      elseif resil.now() < deadline_at and not lost(err)
        and not (type(err) == "table" and (err.retryable or LOCAL_WAIT[err.class or err.kind])) then
        return nil, err -- the job cannot be read (auth, not found): another would fare no better
      elseif not unread then -- (read again at the next poll; said once, and at the deadline)
        unread = err
        resil.log.warn("job: its status could not be read; reading it again", { provider = ctx.name,
          id = handle.id, error = tostring(type(err) == "table" and err.message or err) })
      end
    end
  end
  return state
end

-- what a deadline's error adds when the job's status could not be read at the end (a proxy's
-- page, an outage): the job may have finished unseen, not run too long
local function unread_said(state)
  local e = state.unread
  if e == nil then return "" end
  return (" (its status could not be read since: %s)"):format(tostring(type(e) == "table" and e.message or e))
end

local function job_error(ctx, state, handle, n)
  if state.status == "deadline" then
    if state.uncanceled then
      return resil.error("deadline", ("%s job %s did not finish within its deadline and could not be canceled (%s): "
        .. "not replaced, it may still run%s"):format(ctx.name, handle.id, tostring(state.uncanceled), unread_said(state)),
        { provider = ctx.name, model = ctx.model, id = handle.id, attempts = n, canceled = false, retryable = true })
    end
    return resil.error("deadline", ("%s job %s did not finish within its deadline: canceled%s"):format(ctx.name,
      handle.id, unread_said(state)), { provider = ctx.name, model = ctx.model, id = handle.id, attempts = n, retryable = true })
  end
  if state.status == "lost" then
    return resil.error("job_lost", ("%s job %s is not known to the provider any more (%s)"):format(ctx.name,
      handle.id, tostring(state.error)), { provider = ctx.name, model = ctx.model, id = handle.id, attempts = n,
      retryable = true })
  end
  local why = state.error
  if type(why) == "table" then why = resil.json.encode(why) end
  return resil.error("job_" .. state.status, ("%s job %s %s%s"):format(ctx.name, handle.id, state.status,
    why and (": " .. tostring(why)) or ""), { provider = ctx.name, model = ctx.model, id = handle.id,
    attempts = n, retryable = true })
end

-- A job whose caller is canceled while it runs (a pipeline's deadline, a
-- task canceled, a stop): the provider runs it on and bills it. Without a
-- key (outside a run) nothing would read it again: in a task of its own it
-- is canceled at the provider, and what it cost (as the cancel's answer
-- says, or its result when it ended first) is recorded, its hold settled.
-- A job with a key is the resumed run's, which reads it again and records
-- it then; its hold is given back (the resumed run reserves again). One
-- whose create was in flight is abandoned so when the create ends
-- (create_apart); a create cut after its 2xx is recorded at its estimate,
-- as its caller would have (counted in the budget beside the hold when that
-- was given back before the create began: `gone`, see create).
local function abandon_job(g)
  local ctx, handle, ticket = g.ctx, g.handle, g.ticket
  if not handle and answered(g.create_err) then
    charge_cut(ctx, g.spec, g.create_err, ticket, ticket and ticket.done and "charge" or nil)
    return
  end
  if g.key or not handle then
    if ticket then ticket:release() end
    return
  end
  local _, cerr, ended = ctx.adapter.cancel(ctx, handle)
  if cerr and not ended then
    resil.log.error(("job: %s, and its cancel at the provider failed: it may run on; recorded without a price")
      :format(g.left_why or "canceled by its caller"), { provider = ctx.name, model = ctx.model, id = handle.id,
      error = tostring(cerr) })
    charge(ctx, g.spec, "job", handle.id, { unknown = "outcome" }, ticket) -- (its hold given back)
    return
  end
  local state = ended and (ended.status == "succeeded" or ended.status == "failed") and ended
    or { status = "deadline", metrics = ended and ended.metrics }
  local usage = usage_of(ctx, handle, state, g.input)
  charge(ctx, g.spec, "job", handle.id, usage, ticket)
end
-- (a create still in flight is left to its own task, which abandons the job when it ends: create_apart)
local job_guard = { __close = function(g)
  if g.done then return end
  if g.creating then
    g.left = true
  else
    g.gone = true
    resil.spawn(abandon_job, g)
  end
end }

-- The create: its result is the handle (job id, URLs).
local function make(ctx)
  local handle, err = ctx.adapter.create(ctx)
  if handle then handle.created_wall, handle.base, handle.model = resil.clock.wall(), ctx.base, ctx.model end
  return handle, err
end

-- A job made under another base_url (the provider's address changed between a run and its
-- resume: a proxy put in front or taken away, a port moved) is read and canceled under the
-- base_url of now: its URLs under the old one led nowhere, and it was read until its deadline,
-- its cancel failed, and it was never replaced ("it may still run"), at every call again.
-- A URL of the job that is not under the old base_url (on its host, off its path) is left out, for
-- the adapter's documented one on base_url: the key of now went to the old host.
local URL_FIELDS = { get = true, cancel = true, status_url = true, response_url = true, cancel_url = true }
local function rebase(ctx, handle)
  local old = handle.base
  if type(old) ~= "string" or old == ctx.base then return handle end
  local moved = {}
  for k, v in pairs(handle) do
    if k ~= "base" and type(v) == "string" then
      if v:sub(1, #old + 1) == old .. "/" then
        v = ctx.base .. v:sub(#old + 1)
      elseif URL_FIELDS[k] and origin(v) ~= origin(ctx.base) then
        v = nil
      end
    end
    moved[k] = v
  end
  moved.base = ctx.base
  resil.log.warn("job: made under another base_url; read and canceled under this one",
    { provider = ctx.name, id = handle.id, was = old, base_url = ctx.base })
  return moved
end

-- A create outside a run is made in a task of its own: one whose caller was canceled while it was
-- in flight (a resil.timeout, a task canceled) was aborted with it, and a job the provider had
-- already made ran on, billed, with no id to follow. It finishes; a caller gone by then leaves the
-- job to abandon_job (canceled at the provider, recorded as far as it ran), as one canceled while
-- it runs.
local create_ended = { __close = function(c)
  local g = c.guard
  g.creating = nil
  if g.left or g.gone and answered(g.create_err) then resil.spawn(abandon_job, g) end
end }
-- the create, in the task it runs in, its answer kept on the guard for whoever outlives it
local function make_guarded(ctx, g)
  g.creating, g.made = true, true -- (made: this call sent the create, see jobs.job)
  local _ <close> = setmetatable({ guard = g }, create_ended)
  g.handle, g.create_err = make(ctx)
  return g.handle, g.create_err
end
local function create_apart(ctx, g)
  g.creating = true -- (before the task begins: a caller canceled meanwhile leaves the job to it)
  local task = resil.spawn(make_guarded, ctx, g)
  local ok, handle, err = task:join()
  if not ok then error(handle, 0) end -- (what the create raised, raised here)
  return handle, err
end

-- Inside a run (a key), checkpointed under the attempt's key. resil.once makes it in a task of its
-- own too, which a canceled caller leaves running: the record keeps the job's id, and the resumed
-- run follows that job (abandon_job leaves it to it) instead of making another. A create cut after
-- its 2xx is not kept (its failure frees the key: no id to follow, the resumed run makes a new
-- job), so when its caller is gone by then it is recorded as create_apart's is (abandon_job). (A
-- caller canceled after resil.once spawned fn's task but before it began is `gone`: its hold was
-- given back, and a create cut then is recorded all the same.)
-- The record is the only way back to a job already paid for: it is kept as long as a run may be
-- resumed (with resil.once's 24 h, a run interrupted on a Friday and resumed on the Monday made
-- its job again, the first one paid for and never in the ledger).
local JOB_RETENTION = 365 * 86400
-- an answer that says no job was made: a status of refusal the call does not try again (not a
-- gateway's 502, 504 or 524, whose upstream may have made it, nor a timeout, which has no status)
local function refused(e)
  return type(e) == "table" and e.retryable == false and math.type(e.status) == "integer" and e.status >= 400
    and not MAY_BE_MADE[e.status]
end
-- a create's failure after which the job may exist (see MAY_BE_MADE; a 2xx cut short is charge_cut's)
local function may_be_made(e)
  return type(e) == "table" and not answered(e) and ((e.kind or e.class) == "timeout" or MAY_BE_MADE[e.status] == true)
end

-- The job an earlier create under the key may have made (its answer a proxy's 502/504 or none at all),
-- looked up at the provider (no provider here takes an idempotency key): -> its handle | false (it
-- made none: send the create) | nil, err (not known: nothing is sent, a second job would be paid too)
local function look_up(ctx, unsure)
  local when = os.date("!%Y-%m-%d %H:%M:%S UTC", math.floor(unsure.sent))
  -- (why: what keeps it unknown for good; no resume will tell better: a person's to look)
  local function for_good(why, id)
    return nil, resil.error("job_unsure", ("%s: the create of job '%s' sent at %s was answered %s, after which the " ..
      "provider may have made the job; %s: no other is made (it would be paid too): look for it in the provider's " ..
      "dashboard, and give the call another `key` to make a new one"):format(ctx.model, tostring(unsure.key), when,
      tostring(unsure.answer), why), { provider = ctx.name, model = ctx.model, id = id, sent_at = unsure.sent,
      retryable = false })
  end
  if not ctx.adapter.find then return for_good(("%s cannot be asked which jobs it made"):format(ctx.name)) end
  local fp = fingerprint(ctx.input)
  local found, err = ctx.adapter.find(ctx, unsure.sent, function(input) return fingerprint(input) == fp end,
    unsure.skip)
  if found == nil and type(err) == "table" and err.removed then return for_good(tostring(err.message), err.id) end
  if found == nil then
    return nil, resil.error("job_unsure", ("%s: the create of job '%s' sent at %s was answered %s, after which the " ..
      "provider may have made the job, and its jobs could not be listed (%s): no other is made; the run's next " ..
      "resume looks again"):format(ctx.model, tostring(unsure.key), when, tostring(unsure.answer),
      tostring(type(err) == "table" and err.message or err)), { provider = ctx.name, model = ctx.model,
      sent_at = unsure.sent, retryable = true })
  end
  if found then
    found.created_wall = found.created_wall or unsure.sent
    found.base, found.model = ctx.base, ctx.model
    resil.log.warn("job: the create answered " .. tostring(unsure.answer) .. " had made the job; following it",
      { provider = ctx.name, model = ctx.model, id = found.id, key = unsure.key })
  end
  return found
end

-- legacy: the {key, model} versions before gave the job (durable_key); a job made under one by a
-- run interrupted across the upgrade is followed, not made again (only read: nothing is written there)
-- unsure: an earlier create under the key may have made the job: it is looked up before any is sent
local function create(ctx, akey, g, legacy, unsure)
  if not akey then return create_apart(ctx, g) end
  local fp = fingerprint(ctx.asked, ctx.input)
  for _, l in ipairs(legacy or {}) do
    local found, handle, err = resil.once_replay({ key = "ai.job:" .. l[1], fingerprint = fingerprint(l[2], ctx.input) })
    if found and not (handle == nil and refused(err)) then return handle, err end
  end
  local handle, err = resil.once({ key = "ai.job:" .. akey, fingerprint = fp, retention = JOB_RETENTION },
    function()
      if unsure then
        local found, ferr = look_up(ctx, unsure)
        if found ~= false then return found, ferr end
      end
      local sent = resil.clock.wall()
      local h, e = make_guarded(ctx, g)
      -- a create the provider refused made no job: its failure is not kept under the key (a
      -- permanent one was, and every resume of the run, the credit added or the token fixed,
      -- failed at its step again with nothing sent), but given back for another try
      if h == nil and refused(e) then return nil, { refused = e, retryable = true } end
      -- one after which the job may exist is kept as such (freed, a resumed run sent the create
      -- again and a second job was paid): the next call under the key looks the job up first
      if h == nil and may_be_made(e) then
        return { unsure = { sent = unsure and math.min(unsure.sent, sent) or sent, key = unsure and unsure.key or akey,
          answer = e.status and ("HTTP " .. e.status) or "with a timeout" } }
      end
      return h, e
    end)
  if type(handle) == "table" and type(handle.unsure) == "table" then
    if g.made then return nil, g.create_err end -- (this call sent it: its own error, as before)
    if not ctx.adapter.find then return look_up(ctx, handle.unsure) end -- (its refusal: nothing sent, nothing kept)
    return create(ctx, akey .. "~found", g, nil, handle.unsure)
  end
  if handle == nil and type(err) == "table" and err.refused ~= nil then return nil, err.refused end
  -- a refusal an older version kept under the key (it made no job) was replayed at every resume,
  -- for good, nothing sent: the create is sent under a key of its own beside it, which keeps the
  -- job it makes for the resumes to come (a refusal is never kept there: see above)
  if handle == nil and refused(err) and not g.made then return create(ctx, akey .. "~resent", g) end
  return handle, err
end

-- A call under a key that ended failing (its attempts spent) leaves a mark at the attempt after its
-- last: the next call under the key (a run resumed to try the failed step again) starts its own
-- attempts there. Without it every resume read the same failed jobs again and failed at its step
-- for good. A call cut by a crash leaves none: its jobs' failures still count for the resumed
-- call, which goes on with the same attempts (a crash is not a job's failure; a failure the
-- provider reported is).
local function is_mark(handle) return type(handle) == "table" and handle.call_ended == true end
local function attempt_key(key, n) return key and (n == 1 and key or ("%s#%d"):format(key, n)) end
local function mark_end(ctx, key, n)
  local ok, err = resil.once({ key = "ai.job:" .. attempt_key(key, n), fingerprint = fingerprint(ctx.asked, ctx.input),
    retention = JOB_RETENTION }, function() return { call_ended = true } end)
  if ok == nil then
    resil.log.warn("job: the end of the call's attempts could not be recorded: a resume reads its failed jobs again",
      { provider = ctx.name, model = ctx.model, error = tostring(err) })
  end
end
local function marked(ctx, key, n)
  for _, model in ipairs({ ctx.asked, ctx.model ~= ctx.asked and ctx.model or nil }) do -- (the model's: before)
    local found, handle = resil.once_replay({ key = "ai.job:" .. attempt_key(key, n), fingerprint = fingerprint(model,
      ctx.input) })
    if found and is_mark(handle) then return true end
  end
  return false
end

-- Options that cannot be meant, refused at the caller's line before anything is sent: a deadline
-- of NaN made the job and then neither read nor canceled it, ever; one that is a string made it
-- (paid) and raised from inside; attempts = 0 raised, NaN made jobs without end; a poll of 0 s (or
-- a factor below 1) read the job in a tight loop until its deadline.
local function shown(v) return type(v) == "string" and ("%q"):format(v) or tostring(v) end
local function checked(v, ok, what, call)
  if not ok then error(("%s: %s, not %s"):format(call or "ai.job", what, shown(v)), 4) end
  return v
end
local function is_seconds(v, least) return type(v) == "number" and v >= least and v < math.huge end
local function checked_deadline(ctx, spec, call)
  local deadline = option(ctx.conf, spec, "deadline")
  if call == nil then -- a job's (a speech's bounds its retries only: math.huge is theirs)
    checked(deadline, type(deadline) == "number" and deadline > 0 and deadline <= MOST_DEADLINE,
      "deadline must be a number of seconds > 0, a year at most")
    return deadline
  end
  checked(deadline, type(deadline) == "number" and deadline > 0, "deadline must be a number of seconds > 0", call)
  return deadline -- (not a tail call: checked's level counts this frame)
end
local function options(ctx, spec)
  local attempts = option(ctx.conf, spec, "attempts")
  attempts = checked(attempts, type(attempts) == "number" and math.tointeger(attempts) and attempts >= 1,
    "attempts must be a whole number >= 1")
  checked(spec.wait, spec.wait == nil or is_seconds(spec.wait, 0), "wait must be a number of seconds >= 0")
  -- (a table, `key = item` for `item.id`, was keyed by its address, another in the resumed run,
  -- which made and paid the job again; "" was one key for every call that gave it)
  local k = spec.key
  checked(k, k == nil or type(k) == "string" and k ~= "" or type(k) == "number" and k == k and k > -math.huge
    and k < math.huge, "key must be a non-empty string or a number")
  local poll = option(ctx.conf, nil, "poll")
  checked(poll, type(poll) == "table", "poll must be a table { first =, factor =, max = }")
  checked(poll.first, poll.first == nil or is_seconds(poll.first, 0) and poll.first > 0,
    "poll.first must be a number of seconds > 0")
  checked(poll.factor, poll.factor == nil or is_seconds(poll.factor, 1), "poll.factor must be a number >= 1")
  checked(poll.max, poll.max == nil or is_seconds(poll.max, 0) and poll.max > 0, "poll.max must be a number of seconds > 0")
  checked(spec.poll_first, spec.poll_first == nil or is_seconds(spec.poll_first, 0) and spec.poll_first > 0,
    "poll_first must be a number of seconds > 0")
  return math.tointeger(attempts)
end

-- jobs.job(spec) -> result | nil, err
function jobs.job(spec)
  if type(spec) == "table" and type(spec.input) ~= "table" then error("ai.job: input must be a table", 2) end
  if type(spec) == "table" then -- (one that cannot be sent raised from inside the HTTP client)
    local ok, why = pcall(resil.json.encode, spec.input)
    if not ok then error(("ai.job: input cannot be sent as JSON (%s)"):format(tostring(why)), 2) end
  end
  local ctx, cerr = context(spec, "ai.job", 3)
  if not ctx then return nil, cerr end
  local deadline = checked_deadline(ctx, spec)
  local attempts = options(ctx, spec)
  ctx.poll_first = spec.poll_first
  ctx.asked = asked(spec)
  local key, legacy = durable_key(spec)
  local ids, last_err = {}, nil
  -- jobs this call made, or found still known to the provider, count as its attempts; a lost one
  -- an earlier process made (its record replayed) does not: kept, every resume of the run found
  -- the same lost jobs again and failed at its step for good once they were `attempts` many
  local n, counted = 0, 0
  while true do
    if counted >= attempts then
      -- (the jobs before an ended call's mark were that call's attempts: this call's start after it)
      if not (key and marked(ctx, key, n + 1)) then break end
      n, counted = n + 1, 0
    end
    n, counted = n + 1, counted + 1
    local akey = attempt_key(key, n)
    local alegacy = {}
    for i, l in ipairs(legacy or {}) do alegacy[i] = { attempt_key(l[1], n), l[2] } end
    local ticket, berr = reserve(spec, pricing.cost(ctx.name, ctx.model, estimate_usage(ctx, spec.input, deadline)), ctx.model)
    if spec.budget ~= nil and not ticket then return nil, berr end
    if ticket then ticket:keep() end -- (a video job may run past its hold)
    local guard <close> = setmetatable({ ctx = ctx, spec = spec, input = spec.input, ticket = ticket, key = akey },
      job_guard)
    ctx.retries_until = resil.now() + deadline
    local sent = resil.clock.wall()
    local handle, err = create(ctx, akey, guard, alegacy)
    -- outside a run, a create after which the job may exist (its answer timed out, a gateway's 502)
    -- is looked up at once where the provider lists its jobs: one found is followed and recorded (it
    -- ran on, billed, with no row, and the call failed); none found, the call fails with its error (the
    -- list may not show it yet: another create could pay twice)
    if handle == nil and akey == nil and may_be_made(err) and ctx.adapter.find then
      -- (not one of this call's own jobs before: an attempt that failed made one of the same input
      -- minutes ago, and followed, it was taken for this create's, whose job then ran on unrecorded)
      local own = {}
      for _, id in ipairs(ids) do own[id] = true end
      handle = look_up(ctx, { sent = sent, key = "(no key)", answer = err.status and ("HTTP " .. err.status)
        or "with a timeout", skip = own }) or nil
    end
    if is_mark(handle) then -- (an ended call's mark met before its attempts were spent: fewer, then)
      guard.done = true
      if ticket then ticket:release() end
      counted = 0
      goto next_attempt
    end
    -- a job made on the model its alias named then, which names another now (the registry edited
    -- between a run and its resume): read, canceled and recorded as that model's
    local jc = ctx
    if type(handle) == "table" and type(handle.model) == "string" and handle.model ~= ctx.model then
      local ok, other, oerr = pcall(context, { model = handle.model, input = spec.input, wait = spec.wait }, "ai.job", 1)
      if not (ok and other) then
        guard.done = true
        if ticket then ticket:release() end
        return nil, ok and oerr or resil.error("bad_option", ("ai.job: job %s was made on %s, which cannot be " ..
          "read now: %s"):format(tostring(handle.id), handle.model, tostring(other)), { retryable = false })
      end
      jc = other
      jc.poll_first, jc.retries_until, jc.asked = ctx.poll_first, ctx.retries_until, ctx.asked
      guard.ctx = jc
    end
    if handle then handle = rebase(jc, handle) end
    guard.handle = handle
    if not handle then
      guard.done = true
      if answered(err) then
        err.cost_usd = charge_cut(jc, spec, err, ticket)
        return nil, err
      end
      if ticket then ticket:release() end
      return nil, err
    end
    ids[#ids + 1] = handle.id
    -- which job the call waits on, and until when: a job the provider never ends was said only at
    -- its deadline (15 minutes by default), the pipeline silent meanwhile
    if not handle.state then
      resil.log.info("job: waiting for it to end", { provider = jc.name, model = jc.model, id = handle.id, attempt = n,
        deadline_at = os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor((handle.created_wall or resil.clock.wall()) + deadline)) })
    end
    local state, perr = follow(jc, handle, deadline)
    if not state then -- (its status could not be read: an auth error, a proxy's 4xx)
      -- outside a run nothing reads it again: the guard, as it closes, cancels it at the provider and
      -- records what it ran (it was left running, billed, with no row); a run's is the resumed run's
      if key then
        guard.done = true
        if ticket then ticket:release() end
      end
      guard.left_why = "its status could not be read"
      return nil, perr
    end
    guard.done = true
    local usage, usd
    if state.status == "lost" then -- (nothing known of what it used: no row, its hold given back)
      if ticket then ticket:release() end
      if not guard.made then counted = counted - 1 end
    elseif state.uncanceled and key then
      -- it runs on: the next call under the key cancels it and records what it ran then (a row now,
      -- of a time not known yet, would be the job's one row: that one deduplicated away)
      if ticket then ticket:release() end
    elseif state.uncanceled then -- (nothing reads it again: what it will make and cost is not known)
      usage = { unknown = "outcome" }
      usd = charge(jc, spec, "job", handle.id, usage, ticket)
    else
      usage = usage_of(jc, handle, state, spec.input)
      usd = charge(jc, spec, "job", handle.id, usage, ticket)
    end
    if state.status == "succeeded" then
      return { provider = jc.name, model = jc.model, id = handle.id, status = "succeeded", output = state.output,
        cost_usd = usd, usage = usage, attempts = n, job_ids = ids, raw = state.raw }
    end
    last_err = job_error(jc, state, handle, n)
    if state.uncanceled then -- another job beside one that runs on could pay twice
      last_err.job_ids = ids
      return nil, last_err -- (its attempts not spent: the next call under the key goes on with them)
    end
    if state.final then -- (its adapter says another job would be paid for nothing: not replaced)
      -- (its result may be read later, by the same key only: without one, a retry makes a new job,
      -- paid again, and a retry wrapper or the gateway would send it, as classify honours retryable)
      last_err.job_ids, last_err.retryable = ids, state.retryable == true and key ~= nil
      if last_err.retryable then last_err.message = last_err.message .. "; the same key reads it again" end
      return nil, last_err
    end
    resil.log.warn("job did not succeed" .. (counted < attempts and ": making a new one" or ""),
      { provider = jc.name, model = jc.model, id = handle.id, status = state.status, attempt = n })
    ::next_attempt::
  end
  if key then mark_end(ctx, key, n + 1) end
  last_err.job_ids = ids
  return nil, last_err
end

-- ---------- speech ----------

-- Answers whose audio was cut after their 200 (retried as a reset) were made and billed: each is
-- charged for its text's characters, beside the answer's own row, once. -> their usd, and whether
-- one had no price
local function charge_cuts(ctx, spec, chars, ticket)
  local cuts, unpriced = 0, false
  call.take_canceled(ctx.refused) -- (canceled after its 200: answered, billed)
  for _, res in ipairs(ctx.refused) do
    if res.cut and not res.charged then
      res.charged = true -- (a cancel while the store has it: the row's own retry writes it)
      local c = charge(ctx, spec, "speech", nil, { characters = chars, cut = 1 }, ticket, "charge")
      if c then cuts = cuts + c else unpriced = true end
    end
  end
  return cuts, unpriced
end

-- A speech whose caller is canceled (a pipeline's deadline, a task canceled) after an answer was cut:
-- that answer was billed, and is recorded; the hold is given back (in a task of its own: a cancel
-- cannot wait for the store)
local function abandon_speech(g)
  charge_cuts(g.ctx, g.spec, g.chars, g.ticket)
  if g.ticket and not g.ticket.done then g.ticket:release() end
end
local speech_guard = { __close = function(g) if not g.done then resil.spawn(abandon_speech, g) end end }

-- jobs.speech(spec) -> result | nil, err
function jobs.speech(spec)
  if type(spec) == "table" then
    if type(spec.voice) ~= "string" or spec.voice == "" then error("ai.speech: voice must be a voice id", 2) end
    if type(spec.text) ~= "string" or spec.text == "" then error("ai.speech: text must be a non-empty string", 2) end
    if spec.output_format ~= nil and type(spec.output_format) ~= "string" then
      error("ai.speech: output_format must be a string (\"mp3_44100_128\")", 2)
    end
  end
  local ctx, cerr = context(spec, "ai.speech", 3)
  if not ctx then return nil, cerr end
  ctx.retries_until = resil.now() + checked_deadline(ctx, spec, "ai.speech")
  local chars = ctx.adapter.characters(spec.text)
  local ticket, berr = reserve(spec, pricing.cost(ctx.name, ctx.model, { characters = chars }), ctx.model)
  if spec.budget ~= nil and not ticket then return nil, berr end
  ctx.refused = {} -- (the answers cut after their 200, see charge_cuts)
  local guard <close> = setmetatable({ ctx = ctx, spec = spec, chars = chars, ticket = ticket }, speech_guard)
  local r, err = ctx.adapter.speak(ctx, spec)
  local cuts, unpriced = charge_cuts(ctx, spec, chars, ticket)
  guard.done = true
  if not r then
    if ticket then ticket:release() end
    if type(err) == "table" and (cuts > 0 or unpriced) then err.cost_usd = not unpriced and cuts or nil end
    return nil, err
  end
  local usage = { characters = r.characters }
  local usd = charge(ctx, spec, "speech", r.request_id, usage, ticket)
  if usd and not unpriced then usd = usd + cuts end
  return { provider = ctx.name, model = ctx.model, audio = r.audio, content_type = r.content_type,
    characters = r.characters, id = r.request_id, cost_usd = usd, usage = usage }
end

return jobs
