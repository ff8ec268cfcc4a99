-- Rate limits and circuit breakers: this module owns resil.bucket and
-- resil.breaker. A local bucket or breaker is the C primitive (src/bucket.c,
-- src/breaker.c, required as resil.core.*); {shared = true} keeps its state in
-- the store instead, so several processes respect one limit (below).
-- breaker:call and resil.acquire_all, which compose those primitives, are
-- Lua and live here too.
local resil, private = ...
local S = require "resil.store"
local owner = require "resil.owner"
local backend_of = private.backend_of -- (a store's backend: never on the store object, a script's)
local store_open = private.store_open -- (not resil.store: a script may replace it)
local core_bucket = require "resil.core.bucket"
local core_breaker = require "resil.core.breaker"
local store_now = S.now
local limit_headers = core_bucket.limit_headers
local pack, unpack = table.pack, table.unpack
local all_semaphores = resil.semaphores -- (taken now: the sandbox's leaves out the gateway's, prelude)
local spawn = resil.spawn -- (taken now, before any script runs: a script's own would be handed a bucket's give back)

-- what the bucket primitive also knows: Retry-After and duration parsing
resil.retry_after, resil.parse_duration = core_bucket.retry_after, core_bucket.parse_duration

-- breaker:call(fn, ...) -> fn's results | nil, err{kind="circuit_open"}
-- A call fails when fn raises or returns nil, err. A canceled call frees its
-- half-open probe without counting.
local probe_guard_mt = { __close = function(g)
  if not g.done then g.breaker:record(nil, nil, "probe", g.round) end
end }
local function breaker_call(self, fn, ...)
  if type(fn) ~= "function" then error("breaker:call: fn must be a function", 2) end
  local ok, probe, round = self:allow()
  if not ok then return nil, probe end
  -- only a half-open probe must be given back if the call never finishes
  local guard = probe and setmetatable({ breaker = self, round = round }, probe_guard_mt) or nil
  local _ <close> = guard
  local start = resil.now()
  local r = pack(pcall(fn, ...))
  if guard then guard.done = true end
  local elapsed = resil.now() - start
  -- (told whether it was a probe: a call let through before it opened, ending while a probe is out,
  -- is not taken for the probe's outcome)
  if not r[1] then
    self:record(false, elapsed, probe or false, round)
    error(r[2], 0)
  end
  self:record(not (r[2] == nil and r.n > 2 and r[3] ~= nil), elapsed, probe or false, round)
  return unpack(r, 2, r.n)
end
core_breaker.methods.call = breaker_call -- src/breaker.c leaves call to this module

-- br:on(event, fn) from a policy as it loads is that version's listener: taken off when a
-- reload replaces the version (the breaker is kept by name: each version's listener stayed,
-- fired, and held its old version)
local on, own_at_load = core_breaker.methods.on, resil.own_at_load
local function listen(br, event, fn)
  -- (checked here, at the caller's line: the C's own check named this file's)
  if type(event) ~= "string" and type(event) ~= "number" then
    error(("bad argument #1 to 'on' (string expected, got %s)"):format(type(event)), 3)
  end
  if type(fn) ~= "function" then error(("bad argument #2 to 'on' (function expected, got %s)"):format(type(fn)), 3) end
  on(br, event, fn)
  own_at_load(2, function()
    local list = debug.getuservalue(br, 1)[event == "close" and "closed" or event]
    for i = #list, 1, -1 do
      if list[i] == fn then return table.remove(list, i) end
    end
  end)
end
core_breaker.methods.on = function(br, event, fn) listen(br, event, fn) end

-- ---------- shared limits: {shared = true} ----------
-- A shared bucket or breaker keeps its state in the store, so several
-- processes (or machines, on Redis) respect one limit. When the store is
-- unreachable, a shared bucket falls back to a local bucket with the same
-- rate (logged once), and a shared breaker to its local window: limits
-- degrade to per-process, calls are not refused for the store's sake.

local local_bucket, local_breaker = core_bucket.bucket, core_breaker.breaker
local instrumented
local shared_buckets, shared_breakers = {}, {}

-- A shared bucket's or breaker's name (its key in the store) is not a field of the object, read
-- through __index: a sandboxed script that renamed its own, b.label = "gateway:<id>:rpm", took
-- a gateway key's rate, a name it is refused. Nor is a method set on one, every caller's by name.
local label_of = setmetatable({}, { __mode = "k" })
local function named_class(class, what)
  class.__index = function(o, k)
    if k == "label" then return label_of[o] end
    return class[k]
  end
  class.__newindex = function(o, k, v)
    if k == "label" or class[k] ~= nil then
      error(("a shared %s's methods and name are the host's: %s cannot be set"):format(what, tostring(k)), 2)
    end
    rawset(o, k, v)
  end
end

local SharedBucket = {}
named_class(SharedBucket, "bucket")

local outage_total = resil.metrics.counter("resil_store_unavailable_total",
  "Operations of shared limits that found the store unavailable, by name")

local function warn_once(obj, err)
  outage_total:inc({ name = obj.label })
  if not obj.warned then
    obj.warned = true
    resil.log.warn("store unavailable: shared limit falls back to a local one",
      { name = obj.label, error = tostring(err) })
  end
end

local OUTAGE_CHOICES = { ["local"] = true, deny = true, allow = true }

-- A try on a fast shared bucket (a gateway key's requests per minute, on
-- every request, from several workers) would be a store transaction each:
-- the workers would queue on the store's write lock. Instead a process takes
-- a lease of tokens in one call (booked in the store like any others) and
-- hands them out itself. The lease follows demand: it doubles while one lasts
-- less than LEASE_SECONDS and halves while one lasts four times that, from 2
-- up to what the rate grants in LEASE_SECONDS (at most a quarter of the
-- burst), so each process books about what it uses; tokens left after
-- LEASE_KEEP are dropped. A lease that does not fit any more gives way to
-- single tokens, exact as before. Slower buckets, where a lease would be one
-- token, ask the store every time.
local LEASE_SECONDS, LEASE_KEEP = 0.005, 1

-- an error at the script's line: the first frame not the host's (a level counted from here
-- named a wrapper of resil.bucket, or nothing under pcall)
local function user_error(msg)
  for level = 2, 40 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.currentline > 0 and info.source:sub(1, 7) ~= "=[resil" then
      error(("%s:%d: %s"):format(info.short_src, info.currentline, msg), 0)
    end
  end
  error(msg, 0)
end

-- The options each constructor takes (and those its callers put beside them: `name` and a token
-- bucket's `estimate` in policies.call's rate, tokens, breaker and concurrency tables, limit.run's
-- `timeout`). One misspelt (`failure_threshold = 5`) was ignored without a word and the object ran
-- on its defaults: refused where the object is made (never on acquire, allow or record).
local OPTIONS = {}
for kind, list in pairs({
  bucket = { "rate", "per", "burst", "unit", "shared", "on_outage", "name", "estimate" },
  breaker = { "window_type", "window", "failure_rate", "slow_call", "slow_call_rate", "min_calls", "open_for",
              "open_for_max", "backoff", "half_open_calls", "half_open_success", "shared", "probe_timeout", "name" },
  semaphore = { "size", "queue", "timeout", "name" },
}) do
  local set = {}
  for _, k in ipairs(list) do set[k] = true end
  table.sort(list)
  OPTIONS[kind] = { list = list, set = set }
end
local distance = require "resil.edit_distance"
local function check_options(kind, name, opts)
  -- (the C constructor's own check named "[resil limits]:NNN: bad argument #1 to 'local_bucket'")
  if type(name) ~= "string" and type(name) ~= "number" then
    user_error(("bad argument #1 to '%s' (string expected, got %s)"):format(kind, type(name)))
  end
  if opts ~= nil and type(opts) ~= "table" then
    user_error(("bad argument #2 to '%s' (table expected, got %s)"):format(kind, type(opts)))
  end
  if type(opts) ~= "table" or getmetatable(opts) ~= nil then return end
  local known = OPTIONS[kind]
  for k in pairs(opts) do
    if not known.set[k] then
      local near
      if type(k) == "string" then
        -- a slip of one letter (min_call), else one the name starts with (window_size: window), else
        -- a close spelling (brust; closer the shorter the name: max is not name), else one that
        -- shares its first word (failure_threshold: failure_rate)
        local lk, best, starts, word = k:lower(), math.huge, nil, nil
        local first = lk:match("^([^_]+_)")
        for _, o in ipairs(known.list) do
          local d = distance(lk, o)
          if d < best then near, best = o, d end
          if not starts and lk:sub(1, #o + 1) == o .. "_" then starts = o end
          if not word and first and o:sub(1, #first) == first then word = o end
        end
        local close = #lk <= 3 and 1 or #lk <= 7 and 2 or 3
        if best > 1 then near = starts or best <= close and near or word end
      end
      user_error(("%s '%s': unknown option '%s'%s (it takes %s)"):format(kind, tostring(name), tostring(k),
        near and (", did you mean '" .. near .. "'?") or "", table.concat(known.list, ", ")))
    end
  end
end

function SharedBucket:configure(opts)
  local outage = opts.on_outage or self.on_outage or "local"
  if not OUTAGE_CHOICES[outage] then
    user_error(("bucket '%s': on_outage must be \"local\", \"deny\" or \"allow\""):format(self.label))
  end
  local rate, per = opts.rate or self.rate, opts.per or self.per or 1
  if rate == nil then user_error(("bucket '%s': rate is required (tokens per `per` seconds)"):format(self.label)) end
  -- (refused before anything is taken: taken first, a reload that failed on them left the bucket in
  -- use refusing every try, and each reload after refused too; a NaN or infinite rate was taken)
  for _, k in ipairs({ "rate", "per", "burst" }) do
    local v = opts[k]
    if v ~= nil and not (type(v) == "number" and v > 0 and v < math.huge) then
      user_error(("bucket '%s': %s must be a positive number, got %s"):format(self.label, k, tostring(v)))
    end
  end
  -- (the range of its local stand-in, src/bucket.c: one token per 1e9 s to 1e9 a second)
  if not (per / rate >= 1e-9 and per / rate <= 1e9) then
    user_error(("bucket '%s': %g per %g s is out of range: from one token per 1e+09 s to 1e+09 tokens a second"):format(
      self.label, rate, per))
  end
  local unit = opts.unit or self.unit or "requests"
  if unit ~= "requests" and unit ~= "tokens" then
    user_error(("bucket '%s': unit must be \"requests\" or \"tokens\", got \"%s\""):format(self.label, tostring(unit)))
  end
  self.on_outage = outage
  -- (a burst never given follows the rate: a reload that lowers the rate lowers it too; one token at
  -- least, as a local bucket's)
  if opts.burst ~= nil then self.burst_given = true end
  self.rate, self.per, self.burst, self.unit = rate, per,
    opts.burst or (self.burst_given and self.burst) or math.max(rate, 1), unit
  self.interval = per / rate
  self.tolerance = self.burst * self.interval
  -- a provider's count within `slack` tokens of what this process knows moves nothing (see observe)
  self.slack = math.max(1, self.burst / 10)
  self.paused_until = self.paused_until or -math.huge
  self.waiting, self.waits, self.refusals = self.waiting or 0, self.waits or 0, self.refusals or 0
  self.fallback = local_bucket(self.label .. ":local", { rate = rate, per = per, burst = self.burst, unit = unit })
  -- a bucket fast enough to grant several tokens in LEASE_SECONDS takes them
  -- from the store that many at a time (see SharedBucket:try)
  local most = math.min(math.floor(rate / per * LEASE_SECONDS), math.floor(self.burst / 4))
  self.lease_most = most >= 2 and most or nil
  self.lease_size, self.leased, self.lease_at, self.lease_off_until = 2, 0, -math.huge, -math.huge
end

-- One call to the store: -> true, remaining, wait | false, seconds. A wait
-- up to max_wait books the caller's slot there (the GCRA's arrival time moves
-- on in the same script or transaction), so a waiter sleeps once and goes
-- ahead: waiters that slept and asked again collided and lost a fifth of
-- the rate at burst 1. Each reply's arrival time is kept (self.tat): what
-- this process knows of the store, for wait_time, remaining and observe.
-- What the store granted a caller canceled before it saw the answer (a client that left while its
-- take was on its way to a slow Redis) is given back when the answer comes (src/store_redis.c's
-- call_or_give_back), in a task of its own: kept, it was no one's, and every process's callers
-- waited a slot more for each such client. (On the loop, outside any task: no store call there.)
local function take(self, n, max_wait)
  local s, serr = store_open()
  local ok, x, wait, tat
  if s then
    ok, x, wait, tat = backend_of[s]:gcra_take("bucket:" .. self.label, self.interval, self.tolerance, n, store_now(),
      max_wait, function() spawn(self.refund, self, n) end)
  end
  if ok == nil then
    warn_once(self, s and x or serr)
    if self.on_outage == "allow" then return true, 0, 0 end
    if self.on_outage == "deny" then return false, 1 end -- look again in a second
    return self.fallback:try(n)
  end
  self.warned = false
  if ok then
    self.tat = tat or self.tat
    return true, x, wait
  end
  self.tat = wait or self.tat -- (a refusal's third value is the arrival time)
  return false, x
end

-- b:try(n) -> true, remaining | false, seconds (books nothing ahead)
function SharedBucket:try(n)
  n = n or 1
  if n > self.burst then return false, math.huge end
  local most = self.lease_most
  if most and n <= most then
    local t = resil.now()
    if self.leased >= n and t - self.lease_at < LEASE_KEEP then
      self.leased = self.leased - n
      return true, self.leased
    end
    if t >= self.lease_off_until then
      local size = self.lease_size
      local lasted = t - self.lease_at
      if lasted < LEASE_SECONDS then size = math.min(size * 2, most)
      elseif lasted > 4 * LEASE_SECONDS then size = math.max(size // 2, 2) end
      if size < n then size = n end
      local ok, x = take(self, size, 0)
      if ok then
        self.lease_size, self.leased, self.lease_at = size, size - n, t
        return true, self.leased
      end
      -- a lease does not fit: single tokens until one could again
      self.leased, self.lease_size, self.lease_off_until = 0, 2, t + (x or 0)
    end
  end
  local ok, x = take(self, n, 0)
  return ok, x
end

-- a wait in this process, counted for state() and the bucket metrics (a
-- canceled one too)
local waiting_mt = { __close = function(g) g.bucket.waiting = g.bucket.waiting - 1 end }
local function sleep_counted(self, seconds)
  self.waits, self.waiting = self.waits + 1, self.waiting + 1
  local _ <close> = setmetatable({ bucket = self }, waiting_mt)
  resil.sleep(seconds)
end

-- a slot booked for a waiter canceled before it came goes back, as a local bucket's queue gives it
-- back (it was kept: the next caller waited a slot more); in a task of its own, as a cancel's
-- <close> cannot wait on the store
local booked_mt = { __close = function(g) if g.n then resil.spawn(g.bucket.refund, g.bucket, g.n) end end }
-- the same for acquire_all's slots, booked in several buckets at once ({ {bucket, n}, ... } in g.list)
local booked_all_mt = { __close = function(g)
  for _, e in ipairs(g.list or {}) do resil.spawn(e[1].refund, e[1], e[2]) end
end }

-- b:acquire(n, {timeout=}) -> true, remaining | nil, err{kind="rate_limited"}
function SharedBucket:acquire(n, opts)
  -- (as a local bucket's: options that were no table were ignored, no timeout at all)
  if opts ~= nil and type(opts) ~= "table" then
    user_error(("bucket '%s': acquire's options must be a table {timeout=}, got %s"):format(self.label, type(opts)))
  end
  local timeout = opts and opts.timeout
  if timeout ~= nil and not (type(timeout) == "number" and timeout >= 0) then
    user_error(("bucket '%s': timeout must be a non-negative number"):format(self.label))
  end
  n = n or 1
  if n > self.burst then
    self.refusals = self.refusals + 1
    return nil, resil.error("rate_limited", ("bucket '%s': %g tokens can never be granted (burst is %g)"):format(
      self.label, n, self.burst), { bucket = self.label, retryable = false }) -- (no wait cures it)
  end
  local deadline = timeout and resil.now() + timeout
  while true do
    local asked, paused_until = resil.now(), self.paused_until
    local ok, x, wait = take(self, n, deadline and math.max(0, deadline - asked) or math.huge)
    if ok then
      -- the slot is ours (no need to ask again); it starts `wait` after we asked, not after the reply
      local left = wait and asked + wait - resil.now() or 0
      if left > 0 then
        local booked <close> = setmetatable({ bucket = self, n = n }, booked_mt)
        sleep_counted(self, left)
        booked.n = nil
      end
      -- unless this process learned of a pause meanwhile (observe): it moved the arrival time past
      -- the slot, which would go in the pause. The caller waits it out, as a local bucket's queue
      -- waits, and books again (every such waiter going at the pause's end would be a herd)
      local paused = self.paused_until - resil.now()
      if self.paused_until == paused_until or paused <= 0 then return true, x end
      x = paused
    end
    if deadline and resil.now() + x > deadline then
      self.refusals = self.refusals + 1
      return nil, resil.error("rate_limited", ("bucket '%s': %g tokens available in %.3f s"):format(self.label, n, x),
        { retry_after = x, bucket = self.label })
    end
    sleep_counted(self, x)
  end
end

local function count_of(self, n, what)
  if type(n) ~= "number" or not (n >= 0) or n == math.huge then
    error(("bucket '%s': %s: token count must be a non-negative number"):format(self.label, what), 3)
  end
  return n
end

-- Correct an estimate once the usage is known, in one store operation that
-- cannot refuse: b:charge(n) takes n more (usage above the estimate; the
-- bucket may go into debt, which later callers wait out), b:refund(n) gives
-- n back (the arrival time no further back than now: a full bucket). ->
-- remaining. (The stores keep a debt within 1e9 s, as the local bucket does:
-- a provider's garbage count, 1e17 tokens, is not a time they cannot keep.)
local function adjust(self, n, sign, what)
  count_of(self, n, what)
  local s, serr = store_open()
  local remaining, tat
  if s then
    remaining, tat = backend_of[s]:gcra_adjust("bucket:" .. self.label, self.interval, self.tolerance, sign * n, store_now())
  end
  if remaining == nil then
    warn_once(self, s and tat or serr)
    if self.on_outage ~= "local" then return 0 end
    return self.fallback[what](self.fallback, n)
  end
  self.warned = false
  self.tat = tat
  return remaining
end
function SharedBucket:charge(n) return adjust(self, n or 1, 1, "charge") end
function SharedBucket:refund(n) return adjust(self, n or 1, -1, "refund") end

-- What this process knows, without asking the store: the arrival time of
-- its last reply (others may have taken since), its lease, a pause it
-- observed. While the store is away, the local stand-in's.
local function standing_in(self) return self.warned and self.on_outage == "local" end
local function known_tat(self, t)
  local tat = self.tat
  return tat and tat > t and tat or t
end
-- tokens left at store time t by an arrival time (a microsecond's slack:
-- the store's times are seconds since 1970, their last bits are noise)
local function left_at(self, tat, t)
  return math.floor((t + self.tolerance - tat + 1e-6) / self.interval)
end
local function lease_left(self)
  if self.leased > 0 and resil.now() - self.lease_at < LEASE_KEEP then return self.leased end
  return 0
end

-- b:wait_time(n) -> seconds until n tokens could be taken, as far as this
-- process knows (no store operation: resil.acquire_all and the least-wait
-- deployment strategy ask it of every bucket on every call)
function SharedBucket:wait_time(n)
  n = count_of(self, n or 1, "wait_time")
  if n > self.burst then return math.huge end
  if standing_in(self) then return self.fallback:wait_time(n) end
  if n <= lease_left(self) then return 0 end
  local t = store_now()
  local wait = math.max(known_tat(self, t) + n * self.interval - t - self.tolerance, self.paused_until - resil.now())
  return wait > 1e-6 and wait or 0
end

-- b:remaining() -> tokens left as far as this process knows: the store's at
-- its last reply, filled since at the rate, and its own lease
function SharedBucket:remaining()
  if standing_in(self) then return self.fallback:remaining() end
  local t = store_now()
  local left = left_at(self, known_tat(self, t), t) + lease_left(self)
  return math.max(0, math.min(left, math.floor(self.burst)))
end

-- The provider's word moves the store's arrival time on to at_least, in
-- one operation, for every process; a pause (the arrival time it holds,
-- nil: none) is kept there too, so that no refund pulls the time back into
-- it (a call answered meanwhile gives back what it did not use). -> nothing
local function raise(self, at_least, t, headers, pause)
  local s, serr = store_open()
  local remaining, tat
  if s then
    remaining, tat = backend_of[s]:gcra_raise("bucket:" .. self.label, self.interval, self.tolerance, at_least, t, pause)
  end
  if remaining == nil then
    warn_once(self, s and tat or serr)
    if self.on_outage == "local" then self.fallback:observe(headers) end
    return
  end
  self.warned = false
  self.tat = tat
  if pause and pause > (self.pause_kept or -math.huge) then self.pause_kept = pause end
  self.leased = 0 -- this process's lease was taken before the provider spoke
end

-- b:observe(headers) -> seconds paused for: the provider's rate-limit
-- headers (read as a local bucket reads them, src/bucket.c), held for every
-- process sharing the bucket. A pause (Retry-After; none left, with a
-- reset) means nobody takes a token before it ends, and the bucket fills at
-- its rate from there (not all at once: every process would go together);
-- a count below ours lowers ours to it. Either is one store operation, and
-- only when it changes something: a count within a tenth of the burst of
-- what this process knows (and not near the end) or a pause the store
-- already holds (within a tenth of it) costs nothing, so the headers on
-- every answer do not cost a store round trip each.
function SharedBucket:observe(headers)
  if type(headers) ~= "table" then error(("bucket '%s': observe: headers must be a table"):format(self.label), 2) end
  local pause, left = limit_headers(headers, self.unit)
  local now, t = resil.now(), store_now()
  local known = known_tat(self, t)
  local at_least, held
  if pause > 0 then
    if now + pause > self.paused_until then self.paused_until = now + pause end
    held = t + pause + self.tolerance - self.interval
    -- asked of the store unless both the arrival time and the pause kept beside it (see raise) hold it:
    -- an arrival time already past it (a debt) is kept from refunds only by the latter
    if held > math.min(known, self.pause_kept or -math.huge) + pause / 10 then at_least = held end
  end
  if left then
    local have = left_at(self, known, t)
    if left < have and (left < self.slack or have - left > self.slack) then
      local lowered = t + self.tolerance - left * self.interval
      if not at_least or lowered > at_least then at_least = lowered end
    end
  end
  if standing_in(self) then self.fallback:observe(headers) end
  if at_least then raise(self, at_least, t, headers, held) end
  return self.paused_until > now and self.paused_until - now or 0
end

function SharedBucket:name() return self.label end
function SharedBucket:state()
  local now = resil.now()
  return { name = self.label, rate = self.rate, per = self.per, burst = self.burst, unit = self.unit, shared = true,
           remaining = self:remaining(), paused_for = self.paused_until > now and self.paused_until - now or 0,
           waiting = self.waiting, waits = self.waits, refusals = self.refusals }
end
function SharedBucket:__tostring()
  return ("bucket '%s' (%g per %g s, burst %g, shared)"):format(self.label, self.rate, self.per, self.burst)
end

-- resil.acquire_all({ {bucket, n}, ... } [, {timeout=}]) -> true | nil, err
-- Takes from every bucket or from none: a call that needs requests per
-- minute, tokens per minute and requests per day waits until all allow it.
-- Local buckets are read (wait_time) and charged with nothing in between;
-- shared ones are taken in one store operation, all or none, their slots
-- booked as acquire books them. Local ones that no longer allow once the
-- store has answered (other tasks ran meanwhile) give the shared ones back.

-- the local entries, all or none, now: -> whether taken
local function charge_all(entries)
  for _, e in ipairs(entries) do
    if e[1]:wait_time(e[2]) > 0 then return false end
  end
  for _, e in ipairs(entries) do e[1]:charge(e[2]) end
  return true
end

-- The shared entries (indexes into list) in one store operation: -> "booked",
-- seconds to the slot | false, seconds, the index that waits longest | nil, err
local function take_shared(list, shared, deadline)
  local s, serr = store_open()
  if not s then return nil, serr end
  local items = {}
  for k, i in ipairs(shared) do
    local b = list[i][1]
    items[k] = { "bucket:" .. b.label, b.interval, b.tolerance, list[i][2] or 1 }
  end
  local asked = resil.now()
  local function give_back() -- (as take's)
    for _, i in ipairs(shared) do spawn(list[i][1].refund, list[i][1], list[i][2] or 1) end
  end
  local ok, wait, x, y = backend_of[s]:gcra_take_all(items, store_now(),
    deadline and math.max(0, deadline - asked) or math.huge, give_back)
  if ok == nil then return nil, wait end
  local tats = ok and x or y
  for k, i in ipairs(shared) do
    local b = list[i][1]
    b.warned, b.tat = false, tats[k] or b.tat
  end
  if not ok then return false, wait, shared[x] end
  return "booked", asked + wait - resil.now() -- the slot starts `wait` after we asked
end

-- the longest pause one of the shared entries learned of (observe) since
-- `before` (their paused_until then) that is still on: -> seconds, its
-- index | 0; the unpaused ones' slots are given back (the paused ones' the
-- pause took: it moved their arrival times past them)
local function paused_since(list, shared, before)
  local now, most, worst = resil.now(), 0, nil
  for k, i in ipairs(shared) do
    local b = list[i][1]
    if b.paused_until ~= before[k] and b.paused_until - now > most then most, worst = b.paused_until - now, i end
  end
  if most == 0 then return 0 end
  for k, i in ipairs(shared) do
    local b = list[i][1]
    if b.paused_until == before[k] then b:refund(list[i][2] or 1) end
  end
  return most, worst
end

-- the store is away: each shared entry as its on_outage says (its local
-- stand-in joins the local entries) -> "local", 0 | false, 1, the refusing index
local function shared_stand_ins(list, shared, err, locals)
  for _, i in ipairs(shared) do
    local b = list[i][1]
    warn_once(b, err)
    if b.on_outage == "deny" then return false, 1, i end -- look again in a second
    if b.on_outage == "local" then locals[#locals + 1] = { b.fallback, list[i][2] or 1 } end
  end
  return "local", 0
end

function resil.acquire_all(list, opts)
  if type(list) ~= "table" then error("resil.acquire_all: expects a list of {bucket, n}", 2) end
  if opts ~= nil and type(opts) ~= "table" then -- (a number was "attempt to index", a string no timeout at all)
    error(("resil.acquire_all: options must be a table {timeout=}, got %s"):format(type(opts)), 2)
  end
  local timeout = opts and opts.timeout
  -- (a NaN timeout waited for good; an entry that is not {bucket, n} raised inside this file,
  -- "attempt to call a nil value (method 'wait_time')", naming no line of the caller's)
  if timeout ~= nil and not (type(timeout) == "number" and timeout >= 0) then
    error(("resil.acquire_all: timeout must be a number >= 0, got %s"):format(tostring(timeout)), 2)
  end
  for i = 1, #list do
    local e = list[i]
    local b = type(e) == "table" and e[1]
    if not ((type(b) == "userdata" or type(b) == "table") and b.wait_time) then
      error(("resil.acquire_all: entry %d must be {bucket, n}, got %s"):format(i,
        type(e) == "table" and ("{%s, ...}"):format(type(e[1])) or type(e)), 2)
    end
  end
  local deadline = timeout and resil.now() + timeout
  local shared = {}
  for i = 1, #list do
    if rawequal(getmetatable(list[i][1]), SharedBucket) then shared[#shared + 1] = i end
  end
  while true do
    local wait, worst = 0, nil
    for i = 1, #list do
      local w = list[i][1]:wait_time(list[i][2] or 1)
      if w > wait then wait, worst = w, i end
    end
    if wait == math.huge then return list[worst][1]:acquire(list[worst][2] or 1, { timeout = 0 }) end
    if wait == 0 and #shared == 0 then
      for i = 1, #list do list[i][1]:charge(list[i][2] or 1) end
      return true
    end
    if wait == 0 then
      local locals = {}
      for i = 1, #list do
        if not rawequal(getmetatable(list[i][1]), SharedBucket) then locals[#locals + 1] = { list[i][1], list[i][2] or 1 } end
      end
      local before = {}
      for k, i in ipairs(shared) do before[k] = list[i][1].paused_until end
      local took, x, i = take_shared(list, shared, deadline)
      if took == nil then took, x, i = shared_stand_ins(list, shared, x, locals) end
      if took then
        if x > 0 then
          local booked = {}
          if took == "booked" then
            for k, i in ipairs(shared) do booked[k] = { list[i][1], list[i][2] or 1 } end
          end
          local guard <close> = setmetatable({ list = booked }, booked_all_mt)
          resil.sleep(x)
          guard.list = nil
        end
        -- a pause learned of meanwhile: waited out, the slots booked again after it (as acquire does)
        local paused, which = 0, nil
        if took == "booked" then paused, which = paused_since(list, shared, before) end
        if paused > 0 then
          wait, worst = paused, which
        else
          if charge_all(locals) then return true end
          if took == "booked" then
            for _, k in ipairs(shared) do list[k][1]:refund(list[k][2] or 1) end
          end
        end
      else
        wait, worst = x, i
      end
    end
    if wait > 0 then
      if deadline and resil.now() + wait > deadline then
        return nil, resil.error("rate_limited", ("%s: tokens available in %.3f s"):format(
          list[worst][1]:name(), wait), { retry_after = wait, bucket = list[worst][1]:name() })
      end
      resil.sleep(wait)
    end
  end
end

-- the shared object of this name, made on first use (its name is in
-- `label`: a field `name` would hide the name() method), configure(obj, opts)
-- when options are given; a new one is kept by name only once they are taken
-- (one they refused stayed half made: the next lookup by name, and each
-- metrics scrape, failed inside this file)
local function shared_named(registry, mt, name, configure, opts)
  local obj = registry[name]
  if obj then
    if opts then configure(obj, opts) end
    return obj
  end
  obj = setmetatable({}, mt)
  label_of[obj] = name
  configure(obj, opts)
  registry[name] = obj
  return obj
end

function resil.bucket(name, opts)
  check_options("bucket", name, opts)
  if type(opts) == "table" and opts.shared or shared_buckets[name] then
    return shared_named(shared_buckets, SharedBucket, name, SharedBucket.configure, opts)
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
  -- (a shared breaker's refusals by the store are its own, not its local window's)
  if type(br) == "table" then br.count_reject = function() rejected:inc() end end
  return br
end

-- What is read from state at each exposition: each breaker's state (1 for
-- the state it is in, 0 for the others), each bucket's queue, waits and
-- refusals, each semaphore's permits in use, queue and refusals.
local breaker_state = resil.metrics.gauge("resil_breaker_state",
  "Circuit breaker state: 1 for the state each breaker is in, by breaker and state")
local bucket_waiting = resil.metrics.gauge("resil_bucket_waiting", "Tasks waiting for a bucket's tokens, by bucket")
local bucket_waits = resil.metrics.counter("resil_bucket_waits_total", "Acquires that had to wait, by bucket")
local bucket_refusals = resil.metrics.counter("resil_bucket_refusals_total",
  "Acquires refused (rate_limited: timeout or more than the burst), by bucket")
local sem_in_use = resil.metrics.gauge("resil_semaphore_in_use", "Permits in use, by semaphore")
local sem_waiting = resil.metrics.gauge("resil_semaphore_waiting", "Tasks queued for a permit, by semaphore")
local sem_rejected = resil.metrics.counter("resil_semaphore_rejected_total",
  "Acquires refused (bulkhead_full), by semaphore")
local STATES = { "closed", "open", "half_open", "isolated" }
resil.metrics.collect(function()
  for br in pairs(instrumented_set) do
    local name, now = br:name(), br.seen_state and br:seen_state() or br:state()
    for _, st in ipairs(STATES) do breaker_state:set({ breaker = name, state = st }, st == now and 1 or 0) end
  end
  for _, registry in ipairs({ core_bucket.buckets(), shared_buckets }) do
    for name, b in pairs(registry) do
      local st = b:state()
      bucket_waiting:set({ bucket = name }, st.waiting)
      bucket_waits:collected({ bucket = name }, st.waits)
      bucket_refusals:collected({ bucket = name }, st.refusals)
    end
  end
  for name, sem in pairs(all_semaphores()) do
    local st = sem:state()
    sem_in_use:set({ semaphore = name }, st.in_use)
    sem_waiting:set({ semaphore = name }, st.waiting)
    sem_rejected:collected({ semaphore = name }, st.rejected)
  end
end)

local SharedBreaker = {}
named_class(SharedBreaker, "breaker")
-- (the methods every shared bucket and breaker of the process calls: the sandbox's getmetatable,
-- setmetatable and rawset keep them from scripts, src/lua/prelude.lua)
private.host_metatables = private.host_metatables or {}
private.host_metatables[SharedBucket], private.host_metatables[SharedBreaker] = true, true

-- The half-open probes this process took and has not reported (and those asked for whose answer
-- its task has not resumed to read), for a canceled probe's give-back and for resil_close: kept,
-- the slot stayed taken for probe_timeout (60 s) with nobody probing, every process refused.
-- A probe is named by its id (Redis) and its end, now + probe_for (SQLite), as it was asked for.
local probes_out = {}
local probe_seq = 0
local function unprobe(p)
  local ok, err = p.backend:breaker_unprobe(p.name, p.probe_for, p.now, p.id)
  if ok == nil then
    resil.log.warn("breaker: a probe given back unrun could not be; its slot frees at its end",
      { breaker = p.name, error = tostring(err) })
  end
end

-- (a caller canceled while its probe was asked for, or before it resumed with the answer: the probe
-- given back by its id, sent behind the ask on the same connection; kept, the slot stayed taken for
-- probe_timeout with nobody probing, every process refused)
local ask_seen_mt = { __close = function(g)
  if g.seen then return end
  probes_out[g.p] = nil
  spawn(unprobe, g.p)
end }

-- A probe asked for whose answer never came (the store's timeout: a frozen Redis runs the command
-- as it thaws) may have been taken by nobody: kept, every process was refused for probe_timeout
-- after the store came back. Each is given back, by its id, at the next allow that reaches the store.
local UNSURE_MAX = 8
local function give_back_unsure(self, backend)
  local list = self.unsure
  for i = #list, 1, -1 do
    local p = list[i]
    if p.backend ~= backend or p.backend:breaker_unprobe(p.name, p.probe_for, p.now, p.id) ~= nil then
      table.remove(list, i)
    end
  end
  if #list == 0 then self.unsure = nil end
end

-- An isolated breaker is open in the store this long (past any open_for, 1e9 s at most): each
-- process reads so long a wait as isolated
local ISOLATED_FOR = 2e9
-- (a probe out as another process isolated it, or a window that opened, ended the isolation for all)
local function isolated_in(backend, label)
  local open_until = backend:breaker_get(label, store_now())
  return open_until ~= nil and open_until - store_now() > ISOLATED_FOR / 2
end

-- br:allow() -> true [, "probe"] | nil, err{kind="circuit_open"}
function SharedBreaker:allow()
  local s, serr = store_open()
  local ok, x, p
  if s and self.unsure then give_back_unsure(self, backend_of[s]) end
  if s then
    probe_seq = probe_seq + 1
    p = { backend = backend_of[s], name = self.label, probe_for = self.probe_for, now = store_now(),
      id = ("%s:%d"):format(owner.me().id, probe_seq) }
    probes_out[p] = true
    local ask <close> = setmetatable({ p = p }, ask_seen_mt)
    ok, x = p.backend:breaker_probe(p.name, p.probe_for, p.now, p.id)
    ask.seen = true
    -- (what the store said, for seen_state: open until then; half-open, a probe out; closed)
    if ok == false then self.open_until_seen = p.now + x
    elseif ok then self.open_until_seen = x == "probe" and p.now or false end
    if ok and x == "probe" then
      self.probes = self.probes or {}
      self.probes[#self.probes + 1] = p
    else
      probes_out[p] = nil
    end
  end
  if ok == nil then
    if p then
      local list = self.unsure or {}
      if #list >= UNSURE_MAX then table.remove(list, 1) end
      list[#list + 1] = p
      self.unsure = list
    end
    warn_once(self, s and x or serr)
    return self.inner:allow()
  end
  if ok and x == "probe" then
    self.probing = (self.probing or 0) + 1
    return true, "probe"
  end
  if ok then return self.inner:allow() end
  if self.count_reject then self.count_reject() end
  if x > ISOLATED_FOR / 2 then
    return nil, resil.error("circuit_open", ("breaker '%s' is isolated (shared)"):format(self.label),
      { breaker = self.label })
  end
  return nil, resil.error("circuit_open", ("breaker '%s' is open (shared) for %.3f s more"):format(self.label, x),
    { retry_after = x, breaker = self.label })
end

-- br:record(ok, seconds [, probe]); a probe's outcome closes or re-opens it for everyone (probe:
-- allow()'s second value, or false for a call let through closed, which is never taken for the probe's)
function SharedBreaker:record(ok, seconds, probe, round)
  -- (as a local breaker's do: "yes" closed it for everyone as a probe's outcome)
  if ok ~= nil and type(ok) ~= "boolean" then
    user_error(("breaker '%s': record's ok must be true, false or nil (the call did not finish), got %s"):format(
      self.label, type(ok)))
  end
  local n = seconds ~= nil and tonumber(seconds)
  if seconds ~= nil and not (n and n == n) then
    user_error(("breaker '%s': record's seconds must be a number, got %s"):format(self.label, tostring(seconds)))
  end
  if probe ~= nil and probe ~= false and probe ~= "probe" then -- (as a local breaker's: taken for a probe)
    user_error(("breaker '%s': record's probe must be allow()'s \"probe\" or false (a call let through closed), got %s")
      :format(self.label, tostring(probe)))
  end
  local s = store_open()
  if self.probing and self.probing > 0 and probe ~= false then
    self.probing = self.probing - 1
    local p = self.probes and table.remove(self.probes, 1)
    if p then probes_out[p] = nil end
    if ok == nil then -- a probe that never ran (its call canceled): its slot is free for another
      if p then resil.spawn(unprobe, p) end
      return
    end
    -- (a slow probe is a failed one, as a local breaker's: it closed it for every process)
    local slow = self.slow_call > 0 and n and n >= self.slow_call
    if ok and not slow then
      if s and not isolated_in(backend_of[s], self.label) then
        backend_of[s]:breaker_close(self.label)
        self.open_until_seen = false
      end
      self.inner:reset()
    elseif s and not isolated_in(backend_of[s], self.label) then
      -- (for longer at each failed probe in a row, as a local breaker: it was open_for each time)
      backend_of[s]:breaker_reopen(self.label, self.open_for, self.backoff, self.open_for_max, store_now())
      self.open_until_seen = store_now() + self.open_for -- (at least: the next allow reads it)
    end
    return
  end
  local before = self.inner:state()
  self.inner:record(ok, seconds, probe, round)
  if before ~= "open" and self.inner:state() == "open" and s and not isolated_in(backend_of[s], self.label) then
    backend_of[s]:breaker_open(self.label, store_now() + self.open_for, store_now())
    self.open_until_seen = store_now() + self.open_for
  end
end

-- -> the state the store holds, and the seconds to half-open | nil (closed there, or the store away)
local function stored_state(self)
  local s = store_open()
  local open_until = s and backend_of[s]:breaker_get(self.label, store_now())
  if not open_until then return nil end
  local left = open_until - store_now()
  if left > ISOLATED_FOR / 2 then return "isolated", 0 end
  if left > 0 then return "open", left end
  return "half_open", 0
end

function SharedBreaker:state()
  return stored_state(self) or self.inner:state()
end

-- The state the store held when this process last asked it (an allow, its own record, isolate,
-- reset), read without asking again: what the metrics and resil.map's progress line say, read
-- where no store call may wait (they said the local window's, closed, while the store held it open)
function SharedBreaker:seen_state()
  local until_ = self.open_until_seen
  if not until_ then return self.inner:state() end
  local left = until_ - store_now()
  if left > ISOLATED_FOR / 2 then return "isolated" end
  return left > 0 and "open" or "half_open"
end

SharedBreaker.call = breaker_call -- it only uses allow() and record()

-- resil_close (embed_give_up): the probes this host took and never reported are given back, as a
-- canceled one is. -> true | nil, err (the first)
debug.getregistry()["resil.limits.close"] = function()
  local first, failed = nil, {}
  for p in pairs(probes_out) do
    first = first or S.at_close(failed, p.backend, "breaker_unprobe_now", p.name, p.probe_for, p.now, p.id)
  end
  if first then return nil, first end
  return true
end

function SharedBreaker:name() return self.label end
function SharedBreaker:on(event, fn) listen(self.inner, event, fn) end
-- (the window is this process's; the state the store's, as state() says: it said closed, named
-- "<name>:local", while every process was refused)
function SharedBreaker:stats()
  local st = self.inner:stats()
  local state, retry_after = stored_state(self)
  if state then st.state, st.retry_after = state, retry_after end
  st.name = self.label
  return st
end
function SharedBreaker:reset()
  local s = store_open()
  if s then backend_of[s]:breaker_close(self.label) end
  self.open_until_seen = false
  self.inner:reset()
end
-- br:isolate(): open for every process until reset() (it had no isolate: a provider taken out of
-- rotation was only by the process that could not be told, "attempt to call a nil value")
function SharedBreaker:isolate()
  local s, err = store_open()
  local ok
  if s then ok, err = backend_of[s]:breaker_open(self.label, store_now() + ISOLATED_FOR, store_now()) end
  if ok then self.open_until_seen = store_now() + ISOLATED_FOR end
  if not ok then warn_once(self, err) end
  self.inner:isolate() -- (this process's own, which it falls back to while the store is away)
end
function SharedBreaker:__tostring() return ("breaker '%s' (shared)"):format(self.label) end -- (no store call here)

-- (only the class's objects as self, store.lua's genuine_only: rawequal, a metatable's own __eq said
-- yes; another process's object a spec makes with the class's metatable still is one)
private.genuine_only(SharedBucket, function(self) return rawequal(getmetatable(self), SharedBucket) end,
  "bucket", "shared bucket")
private.genuine_only(SharedBreaker, function(self) return rawequal(getmetatable(self), SharedBreaker) end,
  "breaker", "shared breaker")

-- a shared breaker's options: its local stand-in's, and those it keeps for the store
local function configure_shared_breaker(br, opts)
  local name = label_of[br]
  local probe_for = opts.probe_timeout
  if probe_for ~= nil and not (type(probe_for) == "number" and probe_for > 0 and probe_for <= 1e9) then
    user_error(("breaker '%s': probe_timeout must be a number of seconds in (0, 1e9], got %s"):format(name,
      tostring(probe_for)))
  end
  local o = {}
  for k, v in pairs(opts) do if k ~= "shared" then o[k] = v end end
  -- (the metrics are the shared breaker's, under its own name: not its local window's, "<name>:local")
  br.inner = local_breaker(name .. ":local", o)
  -- (options not given again keep their values, as the local breaker's do: a reload that set
  -- only min_calls put open_for back to 30 and probe_timeout to 60)
  br.open_for = tonumber(opts.open_for) or br.open_for or 30
  -- (an open_for_max never given follows open_for, as the local breaker's)
  if opts.open_for_max ~= nil then br.open_for_max_given = tonumber(opts.open_for_max) end
  br.open_for_max = math.max(br.open_for_max_given or br.open_for, br.open_for)
  br.backoff = tonumber(opts.backoff) or br.backoff or 2
  br.slow_call = tonumber(opts.slow_call) or br.slow_call or 0
  br.probe_for = probe_for or br.probe_for or 60 -- a probe that never reports frees its slot after this
end

function resil.breaker(name, opts)
  check_options("breaker", name, opts)
  if type(opts) == "table" and opts.shared or shared_breakers[name] then
    return instrumented(shared_named(shared_breakers, SharedBreaker, name, configure_shared_breaker, opts))
  end
  return instrumented(local_breaker(name, opts))
end

local c_semaphore = resil.semaphore
function resil.semaphore(name, opts, ...)
  check_options("semaphore", name, opts)
  return c_semaphore(name, opts, ...)
end

-- for resil.map's progress line: the breakers (seen through resil.breaker)
-- that are not closed, as {{name=, state=}, ...} sorted by name
local function breakers_not_closed()
  local out = {}
  for br in pairs(instrumented_set) do
    local state = br.seen_state and br:seen_state() or br:state()
    if state ~= "closed" then out[#out + 1] = { name = br:name(), state = state } end
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

return { breakers_not_closed = breakers_not_closed }
