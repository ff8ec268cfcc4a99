-- resil.once: idempotency. fn runs at most once per key across tasks,
-- processes and restarts; its result is stored and replayed. The record
-- names its holder (src/lua/owner.lua): a holder that died is taken over.
local resil, private = ...
local S = require "resil.store"
local owner = require "resil.owner"
local backend_of = private.backend_of -- (a store's backend: never on the store object, a script's)
-- (taken now, before any script runs: these are handed a store's backend, and a script may replace
-- what the resil table and resil.owner's table hold)
local spawn = resil.spawn
local task_running, isyieldable = resil.running, coroutine.isyieldable
local owner_keep, owner_drop, lease_due, lease_written = owner.keep, owner.drop, owner.lease_due, owner.lease_written
local store_now, store_or_fail, shown = S.now, S.open, S.shown
local encode_values, decode_values = S.encode_values, S.decode_values
local pack, unpack = table.pack, table.unpack
local getinfo = debug.getinfo -- (taken at load, as runs.lua does)
local json = private.json
local journal = require "resil.journal"

local inflight = {} -- key -> the child task running fn in this process
-- that task -> the fingerprint it runs fn with: a call with other arguments
-- is refused at once, as the store refuses it for another process, rather
-- than after waiting for the run (up to `wait`: a gateway request with
-- another body under the key held its client and its key's permit)
local running_fingerprint = setmetatable({}, { __mode = "k" })
local replays_total = resil.metrics.counter("resil_once_replays_total",
  "resil.once calls answered with a stored result (fn not run again)")

-- A failure is stored (and replayed) only when it says it is permanent,
-- err.retryable == false (policies.classify sets it); anything else frees the
-- key for another try. The store does not depend on the policy library. A
-- rate limit's refusal never is, not even a bucket's "can never be granted"
-- (retryable = false, so that no retry waits for it): its operator may raise
-- the burst, and the request's retry under its key must then be served.
-- Nor is a refusal that says how things stood, not what the request was, though no retry cures
-- it now: a breaker open or a bulkhead full (a provider's outage), a deadline or a cancel (the
-- call's own time), a key refused, a quota or a budget spent, a certificate, a redirect (a base_url
-- that moved: the configuration's), a budget's model without a price (the price table's), a model
-- the provider does not serve (a 404, billed nothing: its catalogue, or the pin of a gateway's
-- alias, which the operator moves), a stream cut. Kept,
-- a pipeline resumed after its provider's outage, its key fixed or its credit added, replayed
-- circuit_open (auth, quota) at every step for a day and called nothing.
local PASSING = { rate_limited = true, circuit_open = true, bulkhead_full = true, deadline = true, timeout = true,
  canceled = true, given_up = true, auth = true, missing_secret = true, quota = true, quota_exceeded = true,
  budget_exceeded = true, tls = true, redirect = true, stream_interrupted = true, store_unavailable = true,
  unpriced = true, not_found = true }
-- Nor is one its call stopped at because its caller gave up (err.gave_up, policies.retry and
-- .fallback: a gateway's client that left): the fallback it did not try may have served it. Kept,
-- the client's retry under its key got the first provider's context overflow for a day, never the
-- fallback's answer.
local function is_permanent(err)
  return type(err) == "table" and err.retryable == false and not PASSING[err.kind] and not PASSING[err.class]
    and err.gave_up == nil
end

local drop_mt = { __close = function(d) owner_drop(d[1], d[2]) end }
-- key -> { key, store, holder [, result, retention, now] } while fn runs here or its record is
-- being written (the result: fn has ended, and was paid for), for resil_close (below)
local running = {}
local running_mt = { __close = function(r) if running[r[1]] == r then running[r[1]] = nil end end }

-- The record of a key whose fn has ended could not be written (the store
-- was unavailable: SQLite's lock held past the timeout, a frozen Redis). It
-- still names this process, alive, as running fn: every caller, here and in
-- other processes, saw the key in progress for as long as this process
-- lived. The write is retried until the store takes it (a minute at most);
-- callers in this process wait for that as for fn itself; a record still
-- unwritten then is kept in the ledger's journal (src/lua/journal.lua), and
-- written when the store answers, by this process or the next to open the
-- store: it was written only if the key is still this holder's, so a key
-- taken over meanwhile keeps its new holder's. -> the task
-- record: { key, store, holder, result, retention, now, fingerprint } -> the journal's file | nil
local function keep_record(s, record)
  return journal.keep(backend_of[s], { k = "once", t = record[1], e = { holder = record[3], result = record[4],
    retention = record[5], fingerprint = record[7] } })
end

local function write_later(s, key, write, record)
  local token = "once-pending:" .. key -- renews our lease (another host must not take the key over)
  owner_keep(backend_of[s], token)
  local task
  if record then running[key] = record end -- (resil_close writes it, if still due)
  task = resil.spawn(function()
    local ok, err = S.retry_write(write)
    owner_drop(backend_of[s], token)
    if inflight[key] == task then inflight[key] = nil end
    if record and running[key] == record then running[key] = nil end
    local path = ok == nil and record and keep_record(s, record)
    if path then
      resil.log.warn("once: the record is kept in the ledger's journal: it is written to the store when the " ..
        "store answers", { key = key, error = tostring(err), journal = path })
    elseif ok == nil then
      resil.log.error("once: the record could not be written; the key stays held until this process ends",
        { key = key, error = tostring(err) })
    end
  end)
  inflight[key] = task
  return task
end

local function release(s, key, holder)
  if backend_of[s]:once_release(key, holder) == nil then
    write_later(s, key, function() return backend_of[s]:once_release(key, holder) end)
  end
end

-- fn's results cannot be stored: raised by resil.once at its caller's line (run_once runs in a task
-- of its own, where the message named no place of the script's)
-- (its message as a string too: a caller canceled before fn ended leaves the task unjoined, whose
-- report said "(error object is a table value)")
local unstorable_mt = { __tostring = function(e) return e[1] end }
-- resil.once's caller (caller_where's caller's), as file:line; one that called it as a tail call
-- (`return resil.once(...)` in a step's fn) has lost its frame: then fn's own line
local function caller_where(fn)
  if not getinfo(2, "t").istailcall then
    local info = getinfo(3, "Sl")
    if info and info.currentline > 0 then return ("%s:%d"):format(info.short_src, info.currentline) end
  end
  local info = getinfo(fn, "S")
  return info.linedefined > 0 and ("%s:%d"):format(info.short_src, info.linedefined) or "?"
end

-- The places steps took while fn ran (steps inside resil.once: a helper that checkpoints): kept
-- with the record, as a step's record keeps its nested steps' (runs.lua), and taken by a replay,
-- which runs none of them. Without them a resumed run whose once replayed gave the steps after it
-- the places fn's steps had: a divergence at the first, for good.
-- a record's places (the steps its fn ran: scope -> their last seq), written first in its object,
-- where no value of fn's can be (readers of the record ignore them); a step's record has them too
-- (runs.lua)
local function with_places(text, places)
  if not (text and next(places)) then return text end
  return '{"nested":' .. json.encode(places) .. "," .. text:sub(2)
end
private.record_places = with_places
local function replay_places(data)
  local places = type(data) == "string" and data:match('^{"nested":(%b{}),')
  if places and private.take_places then private.take_places(json.decode(places)) end
end

local function run_once(s, holder, key, lease, retention, fingerprint, fn, ...)
  resil.context({ idempotency_key = key })
  -- (this task's own context: the steps fn runs take places here, then the caller's step has them)
  local ctx = resil.context()
  local outer_places, places = ctx._step_places, {}
  ctx._step_places = places
  owner_keep(backend_of[s], "once:" .. key) -- renew this process's lease while fn runs
  local _ <close> = setmetatable({ backend_of[s], "once:" .. key }, drop_mt)
  local mine <close> = setmetatable({ key, s, holder }, running_mt)
  running[key] = mine
  local r = pack(pcall(fn, ...))
  ctx._step_places = outer_places
  if outer_places then
    for scope, seq in pairs(places) do
      if (outer_places[scope] or 0) < seq then outer_places[scope] = seq end
    end
  end
  local now = store_now()
  if not r[1] then
    release(s, key, holder)
    error(r[2], 0)
  end
  if r[2] == nil and r[3] ~= nil and not is_permanent(r[3]) then
    release(s, key, holder) -- a retryable failure: someone may try again
    return unpack(r, 2, r.n)
  end
  -- (a replay takes at most 250, store.lua's MAX_VALUES: more were stored, and every later call
  -- of the key, in every process, got "unreadable" until the record's retention ran out)
  local text, err = nil, "more than 250 of them"
  if r.n - 1 <= 250 then text, err = encode_values(r, 2) end
  if not text then
    release(s, key, holder)
    error(setmetatable({ "resil.once: cannot store the results: " .. err }, unstorable_mt), 0)
  end
  text = with_places(text, places)
  -- (fn ran and was paid for: a host closed from here on writes its record, not give the key up,
  -- which made the next caller run fn and pay again)
  mine[4], mine[5], mine[6], mine[7] = text, retention, now, fingerprint
  local ok = backend_of[s]:once_finish(key, holder, text, retention, now, fingerprint)
  if ok == nil then
    -- fn ran (and was paid for): its caller gets the results, and the record
    -- is written when the store takes it, so a second copy replays them
    write_later(s, key, function() return backend_of[s]:once_finish(key, holder, text, retention, store_now(),
      fingerprint) end, { key, s, holder, text, retention, now, fingerprint })
    return unpack(r, 2, r.n)
  end
  if not ok then
    -- another process took the key over (it found this one dead or its
    -- lease lapsed) and runs fn itself: its result is the one that counts
    local lost = resil.error("lease_lost", ("once %s: the result was not recorded: another process took the key " ..
      "over; ask again for the result it records"):format(key), { key = key, retryable = true })
    resil.log.error("once: lease lost", { key = key })
    return nil, lost
  end
  return unpack(r, 2, r.n)
end

-- The arguments' fingerprint must be the same in every process: cjson
-- writes a table's keys in hash order, which Lua randomises per process, so
-- a resumed run would find its own key "reused". Keys are sorted here
-- (numbers first, in order; then strings). Keys of other types come by their type's name
-- (a string and a boolean were neither before the other: their order, and the fingerprint, was
-- each process's hash order).
local function key_before(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then
    if ta == "number" or tb == "number" then return ta == "number" end
    return ta < tb
  end
  if ta == "number" or ta == "string" then return a < b end
  return tostring(a) < tostring(b)
end

-- A table met again on its own path (a node that refers back to its parent) is written
-- "(cycle)": walked, each cycle was a path per way round to the depth of 32 (8 such nodes
-- as arguments: hours). A table without cycles is written as before.
-- A table met again elsewhere (shared: x = { a = y, b = y }) whose text, written before at
-- this depth or nearer the top, came to SHARED bytes or more is written "#n": the same
-- table as the n-th table written. Walked again each time, a table sharing its parts at each
-- of 30 levels was 2^30 walks (the loop blocked for an hour). Smaller texts are written
-- again: an input with no large shared part keeps the fingerprint it had (stored ones still
-- match). seen: table -> true while on the path, then n * 32 + depth if its text was large;
-- seen[1]: the tables written so far. -> the length of v's text
-- Only where the text written in full would be large (seen.refs): a first pass writes it as it
-- always was, and gives up (seen.stop) once it has met a large part again and passed FULL pieces
-- of text. So every input the fingerprint took in reasonable time before keeps its fingerprint (a
-- large table met first near the top and again deeper, { a = L, b = { c = L } }, was written #n:
-- a once key stored before was key_reused, a run resumed across the upgrade diverged), and an
-- input that shares its parts at many levels is walked once more, to FULL pieces, at most.
local SHARED, FULL = 1024, 100000
local function canonical(v, out, depth, seen)
  local t = type(v)
  if t == "table" and depth < 32 then
    local was = seen[v]
    if was == true then
      out[#out + 1] = '"(cycle)"'
      return 9
    elseif was and was % 32 <= depth then -- (its text there is as deep as here)
      if seen.refs then
        local ref = "#" .. was // 32
        out[#out + 1] = ref
        return #ref
      end
      seen.met = true -- (written in full, as before, unless the text is large already)
    end
    if seen.met and #out > FULL then
      seen.stop = true
      return 0
    end
    local nth = seen[1] + 1
    seen[1], seen[v] = nth, true
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, key_before)
    out[#out + 1] = "{"
    local len = 2
    for _, k in ipairs(keys) do
      len = len + canonical(k, out, depth + 1, seen)
      out[#out + 1] = "="
      len = len + canonical(v[k], out, depth + 1, seen) + 2
      out[#out + 1] = ","
      if seen.stop then return 0 end
    end
    out[#out + 1] = "}"
    seen[v] = len >= SHARED and nth * 32 + depth or was
    return len
  end
  local s
  if t == "string" then
    s = ("%q"):format(v)
  elseif t == "number" then
    s = math.type(v) == "integer" and ("%d"):format(v) or ("%.17g"):format(v)
  else
    s = t == "boolean" and tostring(v) or t -- functions and the like: their type only
  end
  out[#out + 1] = s
  return #s
end

local function fingerprint_of(...)
  local args, out, seen = pack(...), {}, { 0 }
  canonical(args, out, 0, seen)
  if seen.stop then -- (a large part shared, its text in full past FULL pieces: written #n where met again)
    out = {}
    canonical(args, out, 0, { 0, refs = true })
  end
  return resil.hash(table.concat(out))
end

-- A claim whose outcome its caller did not see (the store unavailable, or
-- the caller canceled while it waited) may still have been made, or be on
-- its way (a frozen Redis runs it when it thaws): it is given up, in a task
-- of its own, as a reservation is (budgets.lua). Left, its record named this
-- live process as the holder, and every retry of the key was "in progress"
-- for a day.
local function abandon_claim(g)
  local function write() return g.backend:once_abandon(g.key, g.me, g.claim) end
  local ok, err = write()
  if ok == nil then ok, err = S.retry_write(write) end
  if ok == nil then
    resil.log.error("once: a claim whose outcome was not seen could not be given up; its key stays held " ..
      "while this process lives", { key = g.key, error = tostring(err) })
  end
end
-- the claims sent whose callers have not resumed with the answer yet, for resil_close (below)
local unseen = setmetatable({}, { __mode = "k" })
local claim_guard = { __close = function(g)
  unseen[g] = nil
  if not g.seen then spawn(abandon_claim, g) end
end }
local claim_seq = 0

-- resil.once(key | {key=, fingerprint=, lease=, wait=, retention=}, fn, ...)
-- -> fn's results, run at most once per key across processes and restarts.
function resil.once(spec, fn, ...)
  local o = type(spec) == "table" and spec or { key = spec }
  local key = o.key
  if type(key) ~= "string" or key == "" then error("resil.once: key must be a non-empty string", 2) end
  if type(fn) ~= "function" then error("resil.once: fn must be a function", 2) end
  -- (as a step's name: the key is the store's, kept a day, and was written there whole, an API
  -- key or a user's token a script keyed its calls by)
  if S.holds_secret(key) then
    error("resil.once: the key contains a value read through resil.secret (secrets are never written to the store)", 2)
  end
  local lease, retention = o.lease or 300, o.retention or 86400
  -- (a NaN or a string reached the store: an error from inside it, or a Redis store_error)
  for name, v in pairs({ lease = lease, retention = retention }) do
    if type(v) ~= "number" or not (v >= 0 and v < math.huge) then
      error(("resil.once: %s must be a number of seconds >= 0, not %s"):format(name, shown(v)), 2)
    end
  end
  if o.wait ~= nil and (type(o.wait) ~= "number" or not (o.wait >= 0)) then
    error(("resil.once: wait must be a number of seconds >= 0, not %s"):format(shown(o.wait)), 2)
  end
  if o.give_up ~= nil and type(o.give_up) ~= "function" then
    error(("resil.once: give_up must be a function, not %s"):format(shown(o.give_up)), 2)
  end
  -- (inside the script's own coroutine.wrap: the error named "store operations" at a line of the host's)
  if not (task_running() and isyieldable()) then
    error(caller_where(fn) .. ": resil.once must be called from a task (resil.spawn), not from a plain coroutine, a "
      .. "metamethod or a C callback", 0)
  end
  local s, serr = store_or_fail()
  if not s then return nil, serr end
  local fingerprint = o.fingerprint or fingerprint_of(...)
  -- the record names this process; a holder that died is taken over (on this
  -- machine at once, elsewhere when its lease lapses); `lease` only ages
  -- records that name no process (written by older versions)
  local holder_id = owner.me().id
  local deadline = resil.now() + (o.wait or 30)
  local poll = 0.05
  -- give_up() -> a reason once nobody waits for the result any more (a gateway's client that
  -- left): a caller waiting for another's run stops, instead of holding what it holds (its
  -- key's concurrency) for up to `wait`; it never stops a run of its own
  local give_up = o.give_up
  local function gave_up()
    local why = give_up and give_up()
    if why then
      return resil.error("given_up", ("once %s: gave up waiting: %s"):format(key, tostring(why)),
        { key = key, retryable = true })
    end
  end
  while true do
    local holder = inflight[key]
    local running = holder and running_fingerprint[holder]
    if running and running ~= fingerprint then
      return nil, resil.error("key_reused", ("once %s: the key was used with different arguments"):format(key),
        { key = key })
    end
    if holder then -- the same process: wait for it, then read what it stored
      local done = false
      repeat
        local gone = gave_up()
        if gone then return nil, gone end
        local left = deadline - resil.now()
        if left <= 0 then break end
        -- (in slices of a second while someone may give up)
        done = holder:join(give_up and math.min(left, 1) or left) ~= nil
      until done
      if not done then
        return nil, resil.error("in_progress", ("once %s: still running in this process"):format(key), { key = key })
      end
    end
    -- (what a process before this one kept for the store written first: a record its dead holder
    -- kept is found, not its claim taken over and fn run, and paid, again: src/lua/journal.lua)
    journal.settled(backend_of[s])
    local now = store_now()
    local lease_until = lease_due(backend_of[s], now)
    claim_seq = claim_seq + 1
    local claim = ("%s:%d"):format(holder_id, claim_seq)
    local guard <close> = setmetatable({ backend = backend_of[s], key = key, me = holder_id, claim = claim }, claim_guard)
    unseen[guard] = true
    local state, data, held_by = backend_of[s]:once_claim(key, fingerprint, holder_id, lease, retention, now,
      lease_until, claim)
    unseen[guard] = nil
    -- (never sent, err.sent = false: a Redis store that is down refuses at once; nothing to give up)
    guard.seen = state ~= nil or (type(data) == "table" and data.sent == false)
    if state == nil then return nil, data end -- the store is unavailable
    lease_written(backend_of[s], lease_until)
    if state == "done" then
      replays_total:inc()
      local r, why = decode_values(data)
      if not r then
        return nil, resil.error("store_unavailable", ("store: the record of once %s is unreadable (%s)"):format(key, why),
          { key = key })
      end
      replay_places(data)
      return unpack(r, 1, r.n)
    elseif state == "key_reused" then
      return nil, resil.error("key_reused", ("once %s: the key was used with different arguments"):format(key),
        { key = key })
    elseif state == "claimed" then
      -- the run forgets itself when it ends: its caller may be canceled
      -- meanwhile (a client that left), and the run goes on without it
      local child
      child = resil.spawn(function(...)
        local _ <close> = setmetatable({}, { __close = function()
          if inflight[key] == child then inflight[key] = nil end
        end })
        return run_once(...)
      end, s, holder_id, key, lease, retention, fingerprint, fn, ...)
      inflight[key], running_fingerprint[child] = child, fingerprint
      local r = pack(child:join())
      if inflight[key] == child then inflight[key] = nil end
      if not r[1] then
        if getmetatable(r[2]) == unstorable_mt then error(caller_where(fn) .. ": " .. r[2][1], 0) end
        error(r[2], 0)
      end
      return unpack(r, 2, r.n)
    elseif not inflight[key] then -- in progress in another process (or a task here is about to run it)
      local gone = gave_up()
      if gone then return nil, gone end
      if resil.now() + poll > deadline then
        return nil, resil.error("in_progress", ("once %s: held by %s"):format(key, owner.format(held_by, data)),
          { key = key, locked_at = data, holder = owner.describe(held_by) })
      end
      resil.sleep(poll)
      poll = math.min(poll * 2, 1)
    end
  end
end

-- resil.once_replay(key | {key=, fingerprint=}, ...) -> true, the stored results | false.
-- A read, claiming nothing: the results of a key whose fn has ended with these
-- arguments (counted as a replay, as resil.once's). Anything else (no record,
-- one still running, other arguments, an unreadable record, the store
-- unavailable) is false, for resil.once itself to answer: a caller asks
-- before work a replay does not need (the gateway: before a key's rate limits).
function resil.once_replay(spec, ...)
  local o = type(spec) == "table" and spec or { key = spec }
  local key = o.key
  if type(key) ~= "string" or key == "" then error("resil.once_replay: key must be a non-empty string", 2) end
  local s = store_or_fail()
  if not s then return false end
  local state, data = backend_of[s]:once_peek(key, o.fingerprint or fingerprint_of(...), store_now())
  if state ~= "done" then return false end
  local r = decode_values(data)
  if not r then return false end
  replays_total:inc()
  return true, unpack(r, 1, r.n)
end

-- Drop idempotency records past their retention.
function resil.once_reap()
  return backend_of[S.open_or_raise(2)]:once_reap(store_now())
end

-- resil_close (embed_give_up): the keys whose fn the host was running (or whose claim its task
-- never resumed to see) are given up, as a fn
-- that raised gives its key up; those whose fn ended have their record written. Kept, they were
-- held by this live process: every caller, in it or another process, was told in_progress for as
-- long as it lived. -> true | nil, err (the first)
debug.getregistry()["resil.once.close"] = function()
  local first, failed = nil, {}
  for key, r in pairs(running) do
    local b = backend_of[r[2]]
    local err
    if r[4] then
      err = S.at_close(failed, b, "once_finish_now", key, r[3], r[4], r[5], r[6], r[7])
      -- (fn ran and was paid for: its record kept for the store, not lost with the key handed over)
      local path = failed[b] and keep_record(r[2], r)
      if path then
        resil.log.warn("once: the record is kept in the ledger's journal: it is written to the store when the " ..
          "store answers", { key = key, error = tostring(err), journal = path })
        err = nil
      end
    else
      err = S.at_close(failed, b, "once_release_now", key, r[3])
    end
    first = first or err
  end
  -- a claim sent whose task never resumed (the store's answer in, or still on its way): nobody
  -- runs its fn; given up as a canceled caller's is (on Redis one that arrives after this is refused)
  for g in pairs(unseen) do
    first = first or S.at_close(failed, g.backend, "once_abandon_now", g.key, g.me, g.claim)
  end
  if first then return nil, first end
  return true
end

-- for specs that seed a record as another process would
return { fingerprint = fingerprint_of }
