-- The persistent store: resil.store() (key/value with TTL), resil.once
-- (idempotency), resil.step and resil.run (checkpointed runs), resil.cost
-- (the ledger) and resil.budget (reserve, then settle). The backend is chosen
-- by URL: a file path for SQLite (default .resil/state.db), redis://host:port/db
-- for Redis. Each backend implements the same compound operations
-- atomically (src/lua/store_sqlite.lua, src/lua/store_redis.lua).
local resil, sqlite_source, redis_source = ...
local json = resil.json
local pack, unpack = table.pack, table.unpack

-- each backend is compiled when a store first uses it, not at start-up
local backend_sources = { sqlite = sqlite_source, redis = redis_source }
local backends = setmetatable({}, { __index = function(t, name)
  local b = assert(load(backend_sources[name], "=[resil store_" .. name .. "]"))(resil)
  t[name] = b
  return b
end })

local config = { url = nil, run = nil, fresh = false, script = nil, args = nil }

-- Time on the store is epoch seconds that follow the host clock (so the
-- virtual clock drives expiries in specs, and processes agree in real use).
local wall0, mono0 = resil.clock.wall(), resil.now()
local function store_now() return wall0 + (resil.now() - mono0) end
resil.store_now = store_now

-- This process's name on leases and tickets, made when first needed (not
-- at every host's start-up: most scripts never touch the store).
local owner_id
local function owner()
  if not owner_id then
    local f = io.open("/proc/self/stat")
    local pid = f and f:read("l"):match("^(%d+)") or "0"
    if f then f:close() end
    owner_id = ("%s-%s"):format(pid, resil.hash(tostring(os.time()) .. tostring({}) .. tostring(os.clock())))
  end
  return owner_id
end

local opened = {}

-- A store URL is a file path (SQLite), sqlite://PATH, redis:// or
-- rediss://; anything else that looks like a URL is a mistake, not a file
-- name (`ftp://x` would make a folder `ftp:`).
local function check_url(url, level)
  local scheme = url:match("^(%a[%w+.-]*)://")
  if scheme and scheme ~= "sqlite" and scheme ~= "redis" and scheme ~= "rediss" then
    error(("store: unknown URL scheme '%s' in '%s' (use a file path, sqlite://PATH or redis://host:port/db)"):format(
      scheme, url), level + 1)
  end
end

-- resil.store_config{url=, run=, fresh=, script=, args=}: set by the CLI and embedders
function resil.store_config(c)
  local ok, err = pcall(check_url, c.url or "", 3)
  for k, v in pairs(c) do
    if ok or k ~= "url" then config[k] = v end
  end
  if not ok then error(err, 0) end
end

local function default_url()
  return config.url or os.getenv("RESIL_STORE") or ".resil/state.db"
end

-- resil.store([url]) -> the store (one per URL per host)
local Store = {}
Store.__index = Store

-- opts (first open only): group_commit = false commits each operation alone
function resil.store(url, opts)
  url = url or default_url()
  local s = opened[url]
  if s then return s end
  check_url(url, 2)
  local backend, err
  if url:match("^redis://") or url:match("^rediss://") then
    backend, err = backends.redis.open(url)
  else
    backend, err = backends.sqlite.open((url:gsub("^sqlite://", "")), opts)
  end
  if not backend then return nil, err end
  s = setmetatable({ backend = backend, url = url, kind = backend.kind }, Store)
  opened[url] = s
  return s
end

local function store_or_raise(level)
  local s, err = resil.store()
  if not s then error(tostring(err), level + 1) end
  return s
end

-- key/value for policies' own state
function Store:get(key) return self.backend:kv_get(key, store_now()) end
function Store:set(key, value, ttl)
  if type(value) ~= "string" then error("store:set: value must be a string (encode tables with resil.json)", 2) end
  return self.backend:kv_set(key, value, ttl, store_now())
end
function Store:del(key) return self.backend:kv_del(key) end
function Store:incr(key, n, ttl) return self.backend:kv_incr(key, n or 1, ttl, store_now()) end
function Store:stats() return self.backend:stats() end

-- ---------- values in and out of the store ----------

local null = json.null

local function encode_values(r, first)
  local values = {}
  for i = first, r.n do
    local v = r[i]
    if v == nil then v = null end
    if resil.is_error(v) then
      local fields = {}
      for k, x in pairs(v) do if type(x) ~= "table" and type(x) ~= "function" then fields[k] = x end end
      v = { ["@error"] = fields }
    end
    values[#values + 1] = v
  end
  local ok, text = pcall(json.encode, { n = r.n - first + 1, v = values })
  if not ok then return nil, text end
  return text
end

-- cjson reads every number as a float; a whole number comes back an integer
local function integers(v, depth)
  if type(v) == "number" then return math.tointeger(v) or v end
  if type(v) == "table" and depth < 64 then
    for k, x in pairs(v) do v[k] = integers(x, depth + 1) end
  end
  return v
end

local function decode_values(text)
  local t = integers(json.decode(text), 0)
  local out = { n = t.n }
  for i = 1, t.n do
    local v = t.v[i]
    if v == null then v = nil end
    if type(v) == "table" and v["@error"] then
      local f = v["@error"]
      v = resil.error(f.kind or "error", f.message or "stored error", f)
    end
    out[i] = v
  end
  return out
end

local run -- the current run: { id =, seq = { [scope] = n } }, once a step has run

-- ---------- idempotency ----------

local inflight = {} -- key -> the child task running fn in this process

local function is_permanent(err)
  if type(err) ~= "table" then return false end
  if err.retryable ~= nil then return not err.retryable end
  local ok, classify = pcall(require, "policies.classify")
  if ok and type(classify) == "table" and classify.outcome then
    local v = classify.outcome(nil, err)
    return v ~= nil and not v.retryable
  end
  return false
end

local function run_once(s, holder, key, lease, retention, fn, ...)
  resil.context({ idempotency_key = key })
  local r = pack(pcall(fn, ...))
  local now = store_now()
  if not r[1] then
    s.backend:once_release(key, holder)
    error(r[2], 0)
  end
  if r[2] == nil and r[3] ~= nil and not is_permanent(r[3]) then
    s.backend:once_release(key, holder) -- a retryable failure: someone may try again
    return unpack(r, 2, r.n)
  end
  local text, err = encode_values(r, 2)
  if not text then
    s.backend:once_release(key, holder)
    error("resil.once: fn's results must be JSON values to be stored: " .. tostring(err), 0)
  end
  local ok, serr = s.backend:once_finish(key, holder, text, retention, now)
  if ok == nil and serr then return nil, serr end
  return unpack(r, 2, r.n)
end

local function fingerprint_of(...)
  local ok, text = pcall(json.encode, pack(...))
  return resil.hash(ok and text or "")
end

-- resil.once(key | {key=, fingerprint=, lease=, wait=, retention=}, fn, ...)
-- -> fn's results, run at most once per key across processes and restarts.
function resil.once(spec, fn, ...)
  local o = type(spec) == "table" and spec or { key = spec }
  local key = o.key
  if type(key) ~= "string" or key == "" then error("resil.once: key must be a non-empty string", 2) end
  if type(fn) ~= "function" then error("resil.once: fn must be a function", 2) end
  local s = store_or_raise(2)
  local fingerprint = o.fingerprint or fingerprint_of(...)
  -- inside a checkpointed run the run owns the lease: a re-run after a crash
  -- takes over its dead predecessor's lease at once instead of waiting it out
  local run_prefix = run and ("run:" .. run.id .. ":")
  local holder_id = run_prefix and (run_prefix .. owner()) or owner()
  local lease, retention = o.lease or 300, o.retention or 86400
  local deadline = resil.now() + (o.wait or 30)
  local poll = 0.05
  while true do
    local holder = inflight[key]
    if holder then -- the same process: wait for it, then read what it stored
      local left = deadline - resil.now()
      if left <= 0 or holder:join(left) == nil then
        return nil, resil.error("in_progress", ("once %s: still running in this process"):format(key), { key = key })
      end
    end
    local state, data = s.backend:once_claim(key, fingerprint, holder_id, lease, retention, store_now(), run_prefix)
    if state == nil then return nil, data end -- the store is unavailable
    if state == "done" then
      local r = decode_values(data)
      return unpack(r, 1, r.n)
    elseif state == "key_reused" then
      return nil, resil.error("key_reused", ("once %s: the key was used with different arguments"):format(key),
        { key = key })
    elseif state == "claimed" then
      local child = resil.spawn(run_once, s, holder_id, key, lease, retention, fn, ...)
      inflight[key] = child
      local r = pack(child:join())
      if inflight[key] == child then inflight[key] = nil end
      if not r[1] then error(r[2], 0) end
      return unpack(r, 2, r.n)
    elseif not inflight[key] then -- in progress in another process
      if resil.now() + poll > deadline then
        return nil, resil.error("in_progress", ("once %s: another process holds it"):format(key),
          { key = key, locked_at = data })
      end
      resil.sleep(poll)
      poll = math.min(poll * 2, 1)
    end
  end
end

-- Drop idempotency records past their retention.
function resil.once_reap()
  return store_or_raise(2).backend:once_reap(store_now())
end

-- ---------- runs and steps ----------

-- from the script's absolute path (config.script_path, set by the host) and
-- its arguments: the same command resumes the same run
local function default_run_id()
  local script = config.script or "(script)"
  local name = script:match("([^/]+)$"):gsub("%.lua$", "")
  local where = config.script_path or script
  return ("%s-%s"):format(name, resil.hash(where .. "\0" .. table.concat(config.args or {}, "\0")):sub(1, 12))
end

local function current_run()
  if run then
    -- another task is still recording the run's start: wait for it
    if run.starter and run.starter ~= resil.running() then run.starter:join() end
    return run
  end
  local s = store_or_raise(3)
  local id = config.run or default_run_id()
  run = { id = id, seq = {}, store = s, resumed = false }
  run.starter = resil.spawn(function()
    local done, generation = s.backend:run_start(id, config.script, config.fresh, store_now())
    if done == nil then error(tostring(generation), 0) end
    run.resumed, run.generation = done > 0, generation
    resil.log.info(done > 0 and "run resumed" or "run started", { run = id, steps_done = done })
  end)
  local ok, err = run.starter:join()
  run.starter = nil
  if not ok then
    run = nil
    error(err, 3)
  end
  return run
end

resil.run = {}
function resil.run.id() return current_run().id end
function resil.run.started() return run ~= nil end
function resil.run.resumed() return current_run().resumed end
-- Record how the run ended (the CLI does this when the script ends). Works
-- outside a task: it writes at once, without the loop.
function resil.run.finish(status)
  if run then run.store.backend:run_finish_now(run.id, status or "done", store_now()) end
end

-- resil.step(name, fn, ...) -> fn's results; in a resumed run, the stored ones
function resil.step(name, fn, ...)
  if type(name) ~= "string" or name == "" then error("resil.step: name must be a non-empty string", 2) end
  if type(fn) ~= "function" then error("resil.step: fn must be a function", 2) end
  local r = current_run()
  local scope = resil.context().step_scope or "" -- set per resil.map item
  local seq = (r.seq[scope] or 0) + 1
  r.seq[scope] = seq
  local backend = r.store.backend
  local recorded, result = backend:step_get(r.id, scope, seq)
  if recorded ~= nil then
    if recorded ~= name then
      error(resil.error("divergence", ("run %s diverged at step %d%s: recorded '%s', now '%s' (use --fresh to "
        .. "start over)"):format(r.id, seq, scope ~= "" and (" of item " .. scope) or "", recorded, name),
        { run = r.id, seq = seq, recorded = recorded, name = name }), 2)
    end
    local values = decode_values(result)
    return unpack(values, 1, values.n)
  end
  local at = ("%s#%d/%s/%d/%s"):format(r.id, r.generation, scope, seq, name)
  local ctx = resil.context() -- this task's own table (a spawned task gets a copy)
  local saved_step, saved_key, saved_costs = ctx.step, ctx.step_key, ctx.step_costs
  ctx.step, ctx.step_key, ctx.step_costs = name, at, 0
  local out = pack(pcall(fn, ...))
  ctx.step, ctx.step_key, ctx.step_costs = saved_step, saved_key, saved_costs
  if not out[1] then error(out[2], 0) end
  if out[2] == nil and out.n >= 3 and out[3] ~= nil then return unpack(out, 2, out.n) end -- not checkpointed
  local text, err = encode_values(out, 2)
  if not text then error("resil.step: results must be JSON values to be checkpointed: " .. tostring(err), 2) end
  local ok, serr = backend:step_put(r.id, scope, seq, name, text, store_now())
  if not ok then error(serr or "resil.step: checkpoint failed", 2) end
  return unpack(out, 2, out.n)
end

-- Journaled decisions: in a resumed run they return what the first run got.
function resil.run.now() return resil.step("@now", store_now) end
function resil.run.random(m, n)
  return resil.step("@random", function()
    if m == nil then return math.random() end
    return math.random(m, n)
  end)
end

-- ---------- costs ----------

local MICRO = 1e6
local function to_micro(usd) return math.floor(usd * MICRO + 0.5) end
local function from_micro(m) return m / MICRO end
resil.cost = {}

local function cost_entry(e, at)
  if type(e) ~= "table" then error("resil.cost.record: expects a table", 3) end
  if type(e.usd) ~= "number" or e.usd < 0 or e.usd ~= e.usd then
    error("resil.cost.record: usd must be a number >= 0", 3)
  end
  local ctx = resil.context()
  local dedupe = e.id
  if dedupe == nil and ctx.step_key then
    -- inside a step: a re-run after a crash does not record twice
    local n = (ctx.step_costs or 0) + 1
    ctx.step_costs = n
    dedupe = ctx.step_key .. "#" .. n
  end
  local units = e.units
  if units ~= nil then units = json.encode(units) end
  return { dedupe = dedupe, at = at, day = os.date("!%Y-%m-%d", math.floor(at)), provider = e.provider,
           model = e.model, operation = e.operation, user = e.user and tostring(e.user),
           run = e.run or (run and run.id) or nil, step = e.step or ctx.step or nil,
           micro_usd = to_micro(e.usd), units = units, budget = e.budget, period = e.period }
end

-- resil.cost.record{provider=, model=, operation=, user=, usd=, units=, id=} -> true | nil, err
function resil.cost.record(e)
  local s = store_or_raise(2)
  local entry = cost_entry(e, store_now())
  local ok, err = s.backend:cost_record(entry)
  if ok == nil and err then return nil, err end
  return true
end

-- resil.cost.total{provider=, model=, user=, run=, since=, ["until"]=} -> usd
function resil.cost.total(f)
  local rows, err = store_or_raise(2).backend:cost_query(nil, f or {})
  if not rows then return nil, err end
  return from_micro(rows[1] and rows[1].micro_usd or 0)
end

-- resil.cost.breakdown(by, filter) -> { {key=, usd=, calls=}, ... }, by "provider"|"model"|"user"|"day"
function resil.cost.breakdown(by, f)
  local rows, err = store_or_raise(2).backend:cost_query(by, f or {})
  if not rows then return nil, err end
  local out = {}
  for i, r in ipairs(rows) do out[i] = { key = r.key, usd = from_micro(r.micro_usd), calls = r.calls } end
  return out
end

-- ---------- budgets ----------

local Budget = {}
Budget.__index = Budget
local soft_total = resil.metrics.counter("resil_budget_soft_limit_total",
  "Reservations that took a budget past its soft share, by budget")
local Ticket = {}
Ticket.__index = Ticket
local budgets = {}
local ticket_seq = 0

local function period_of(per, now)
  if per == "day" then return os.date("!%Y-%m-%d", math.floor(now)) end
  if per == "month" then return os.date("!%Y-%m", math.floor(now)) end
  return "all"
end

-- resil.budget(name, {limit=, per="day"|"month"|nil, hold=600, soft=0.8})
function resil.budget(name, opts)
  if type(name) ~= "string" or name == "" then error("resil.budget: name must be a non-empty string", 2) end
  local b = budgets[name]
  if not b then
    if type(opts) ~= "table" then error(("resil.budget: budget '%s' needs its options {limit=}"):format(name), 2) end
    b = setmetatable({ name = name }, Budget)
    budgets[name] = b
  end
  if opts then
    if type(opts.limit) ~= "number" or opts.limit < 0 then error("resil.budget: limit must be a number >= 0", 2) end
    if opts.per ~= nil and opts.per ~= "day" and opts.per ~= "month" then
      error("resil.budget: per must be \"day\", \"month\" or nil", 2)
    end
    if opts.on_outage ~= nil and opts.on_outage ~= "deny" and opts.on_outage ~= "allow" then
      error("resil.budget: on_outage must be \"deny\" (the default) or \"allow\"", 2)
    end
    b.limit, b.per, b.hold, b.soft = opts.limit, opts.per, opts.hold or 600, opts.soft or 0.8
    b.on_outage = opts.on_outage or "deny"
  end
  return b
end

-- budget:reserve(estimate_usd [, {hold=}]) -> ticket | nil, err{kind="budget_exceeded"|"store_unavailable"}
function Budget:reserve(estimate, o)
  if type(estimate) ~= "number" or estimate < 0 then error("budget:reserve: estimate must be a number >= 0", 2) end
  local s = store_or_raise(2)
  local now = store_now()
  local period = period_of(self.per, now)
  ticket_seq = ticket_seq + 1
  local id = ("%s:%s:%d"):format(self.name, owner(), ticket_seq)
  local est = to_micro(estimate)
  local hold = o and o.hold or self.hold
  local ok, spent, reserved = s.backend:budget_reserve(self.name, period, to_micro(self.limit), est, id, now + hold,
    now)
  local ticket = setmetatable({ id = id, budget = self, period = period, estimate = estimate, store = s }, Ticket)
  if ok == nil then -- the store is unavailable
    if self.on_outage ~= "allow" then return nil, spent end -- fail closed
    resil.log.warn("budget: store unavailable, reservation allowed unchecked", { budget = self.name,
      estimate = estimate, error = tostring(spent) })
    ticket.unchecked = true
    return ticket
  end
  if not ok then
    return nil, resil.error("budget_exceeded", ("budget '%s': $%.6f spent + $%.6f reserved + $%.6f > $%.6f"):format(
      self.name, from_micro(spent), from_micro(reserved), estimate, self.limit),
      { budget = self.name, limit = self.limit, spent = from_micro(spent), reserved = from_micro(reserved),
        period = period })
  end
  local used = from_micro(spent + reserved)
  if used >= self.soft * self.limit then
    soft_total:inc({ budget = self.name })
    if self.warned_period ~= period then
      self.warned_period = period -- once per period and process: a warning, not a flood
      resil.log.warn("budget soft limit reached", { budget = self.name, limit = self.limit, period = period,
        used = used, share = used / self.limit })
    end
  end
  return ticket
end

-- budget:state() -> {spent=, reserved=, limit=, period=}
function Budget:state()
  local now = store_now()
  local period = period_of(self.per, now)
  local spent, reserved = store_or_raise(2).backend:budget_usage(self.name, period, now)
  if spent == nil then return nil, reserved end
  return { spent = from_micro(spent), reserved = from_micro(reserved), limit = self.limit, period = period }
end

-- ticket:settle(actual_usd [, cost fields]) -> true (first time) | false (already settled)
function Ticket:settle(actual, e)
  if type(actual) ~= "number" or actual < 0 then error("ticket:settle: actual must be a number >= 0", 2) end
  local fields = {}
  for k, v in pairs(e or {}) do fields[k] = v end
  fields.usd, fields.budget, fields.period = actual, self.budget.name, self.period
  local entry = cost_entry(fields, store_now())
  entry.ticket = self.id
  entry.dedupe = entry.dedupe or ("ticket:" .. self.id)
  return self.store.backend:budget_settle(self.id, entry)
end

function Ticket:release()
  return self.store.backend:budget_release(self.id)
end

-- ---------- shared limits: {shared = true} ----------
-- A shared bucket or breaker keeps its state in the store, so several
-- processes (or machines, on Redis) respect one limit. When the store is
-- unreachable, a shared bucket falls back to a local bucket with the same
-- rate (logged once), and a shared breaker to its local window: limits
-- degrade to per-process, calls are not refused for the store's sake.

local local_bucket, local_breaker = resil.bucket, resil.breaker
local instrumented
local shared_buckets, shared_breakers = {}, {}

local SharedBucket = {}
SharedBucket.__index = SharedBucket

local outage_total = resil.metrics.counter("resil_store_unavailable_total",
  "Operations of shared limits that found the store unavailable, by name")

local function warn_once(obj, err)
  outage_total:inc({ name = obj.name })
  if not obj.warned then
    obj.warned = true
    resil.log.warn("store unavailable: shared limit falls back to a local one",
      { name = obj.name, error = tostring(err) })
  end
end

local OUTAGE_CHOICES = { ["local"] = true, deny = true, allow = true }

function SharedBucket:configure(opts)
  local outage = opts.on_outage or self.on_outage or "local"
  if not OUTAGE_CHOICES[outage] then
    error(("bucket '%s': on_outage must be \"local\", \"deny\" or \"allow\""):format(self.name), 3)
  end
  self.on_outage = outage
  local rate, per = opts.rate or self.rate, opts.per or self.per or 1
  if type(rate) ~= "number" or rate <= 0 then error(("bucket '%s': rate must be a positive number"):format(self.name), 3) end
  self.rate, self.per, self.burst = rate, per, opts.burst or self.burst or rate
  self.interval = per / rate
  self.tolerance = self.burst * self.interval
  self.fallback = local_bucket(self.name .. ":local", { rate = rate, per = per, burst = self.burst })
end

-- b:try(n) -> true, remaining | false, seconds
function SharedBucket:try(n)
  n = n or 1
  if n > self.burst then return false, math.huge end
  local s, serr = resil.store()
  local ok, x
  if s then ok, x = s.backend:gcra_take("bucket:" .. self.name, self.interval, self.tolerance, n, store_now()) end
  if ok == nil then
    warn_once(self, s and x or serr)
    if self.on_outage == "allow" then return true, 0 end
    if self.on_outage == "deny" then return false, 1 end -- look again in a second
    return self.fallback:try(n)
  end
  self.warned = false
  return ok, x
end

-- b:acquire(n, {timeout=}) -> true, remaining | nil, err{kind="rate_limited"}
function SharedBucket:acquire(n, opts)
  n = n or 1
  if n > self.burst then
    return nil, resil.error("rate_limited", ("bucket '%s': %g tokens can never be granted (burst is %g)"):format(
      self.name, n, self.burst), { bucket = self.name })
  end
  local timeout = opts and opts.timeout
  local deadline = timeout and resil.now() + timeout
  while true do
    local ok, x = self:try(n)
    if ok then return true, x end
    if deadline and resil.now() + x > deadline then
      return nil, resil.error("rate_limited", ("bucket '%s': %g tokens available in %.3f s"):format(self.name, n, x),
        { retry_after = x, bucket = self.name })
    end
    resil.sleep(x)
  end
end

function SharedBucket:name() return self.name end
function SharedBucket:state()
  return { name = self.name, rate = self.rate, per = self.per, burst = self.burst, shared = true }
end

-- the shared object of this name, made on first use
local function shared_named(registry, mt, name)
  local obj = registry[name]
  if not obj then
    obj = setmetatable({ name = name }, mt)
    registry[name] = obj
  end
  return obj
end

function resil.bucket(name, opts)
  if type(opts) == "table" and opts.shared or shared_buckets[name] then
    local b = shared_named(shared_buckets, SharedBucket, name)
    if opts then b:configure(opts) end
    return b
  end
  return local_bucket(name, opts)
end

-- every breaker counts its transitions and rejections
local transitions_total = resil.metrics.counter("resil_breaker_transitions_total",
  "Circuit breaker transitions, by breaker and new state")
local rejected_total = resil.metrics.counter("resil_breaker_rejected_total", "Calls a breaker refused, by breaker")
local instrumented_set = setmetatable({}, { __mode = "k" })
instrumented = function(br)
  if instrumented_set[br] then return br end
  instrumented_set[br] = true
  local name = br:name()
  for _, state in ipairs({ "open", "half_open", "closed", "isolated" }) do
    local series = transitions_total:labels({ breaker = name, to = state })
    br:on(state, function() series:inc() end)
  end
  local rejected = rejected_total:labels({ breaker = name })
  br:on("reject", function() rejected:inc() end)
  return br
end

local SharedBreaker = {}
SharedBreaker.__index = SharedBreaker

-- br:allow() -> true [, "probe"] | nil, err{kind="circuit_open"}
function SharedBreaker:allow()
  local s, serr = resil.store()
  local ok, x
  if s then ok, x = s.backend:breaker_probe(self.name, self.probe_for, store_now()) end
  if ok == nil then
    warn_once(self, s and x or serr)
    return self.inner:allow()
  end
  if ok and x == "probe" then
    self.probing = (self.probing or 0) + 1
    return true, "probe"
  end
  if ok then return self.inner:allow() end
  return nil, resil.error("circuit_open", ("breaker '%s' is open (shared) for %.3f s more"):format(self.name, x),
    { retry_after = x, breaker = self.name })
end

-- br:record(ok, seconds); a probe's outcome closes or re-opens it for everyone
function SharedBreaker:record(ok, seconds)
  local s = resil.store()
  if self.probing and self.probing > 0 then
    self.probing = self.probing - 1
    if ok == nil then return end
    if ok then
      if s then s.backend:breaker_close(self.name) end
      self.inner:reset()
    elseif s then
      s.backend:breaker_open(self.name, store_now() + self.open_for, store_now())
    end
    return
  end
  local before = self.inner:state()
  self.inner:record(ok, seconds)
  if before ~= "open" and self.inner:state() == "open" and s then
    s.backend:breaker_open(self.name, store_now() + self.open_for, store_now())
  end
end

function SharedBreaker:state()
  local s = resil.store()
  local open_until = s and s.backend:breaker_get(self.name, store_now())
  if open_until then return open_until > store_now() and "open" or "half_open" end
  return self.inner:state()
end

-- the same call as a local breaker's: it only uses allow() and record()
SharedBreaker.call = debug.getregistry()["resil.Breaker"].__index.call

function SharedBreaker:name() return self.name end
function SharedBreaker:on(...) return self.inner:on(...) end
function SharedBreaker:stats() return self.inner:stats() end
function SharedBreaker:reset()
  local s = resil.store()
  if s then s.backend:breaker_close(self.name) end
  self.inner:reset()
end

function resil.breaker(name, opts)
  if type(opts) == "table" and opts.shared or shared_breakers[name] then
    local br = shared_named(shared_breakers, SharedBreaker, name)
    if opts then
      local o = {}
      for k, v in pairs(opts) do if k ~= "shared" then o[k] = v end end
      br.inner = instrumented(local_breaker(name .. ":local", o))
      br.open_for = opts.open_for or 30
      br.probe_for = opts.probe_timeout or 60 -- a probe that never reports frees its slot after this
    end
    return br
  end
  return instrumented(local_breaker(name, opts))
end
