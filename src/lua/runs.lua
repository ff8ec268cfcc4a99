-- resil.step and resil.run: checkpointed runs. A run is identified by
-- --run or by the script and its arguments; each step's result is stored
-- before the task goes on, so a re-run resumes. A run has one owner at a
-- time (src/lua/owner.lua).
local resil, private = ...
local S = require "resil.store"
local owner = require "resil.owner"
local fingerprint = require("resil.once").fingerprint
local backend_of = private.backend_of -- (a store's backend: never on the store object, a script's)
-- (taken now, before any script runs: these are handed a store's backend, and a script may replace
-- what the resil table and resil.owner's table hold)
local owner_keep, owner_drop, lease_due, lease_written = owner.keep, owner.drop, owner.lease_due, owner.lease_written
local store_now, store_or_fail = S.now, S.open
local config, encode_values, decode_values = S.config, S.encode_values, S.decode_values
local unpack, pack = table.unpack, table.pack
local json, spawn, shield = private.json, resil.spawn, resil.shield -- (the host's, taken at load: see costs.lua)
local getinfo, getregistry = debug.getinfo, debug.getregistry
local task_running, isyieldable = resil.running, coroutine.isyieldable

-- Where a plain table raised in a step's fn was raised (error{code = 402}: Lua gives a table no
-- place, and the step raises it again from here): src/error.c's report of it reads this first. It
-- said the line of the resil.step call, the raise's own line gone from the message and the
-- traceback. Weak: an error's entry goes with it. Set in the handler, on the error's way only.
local raised_at = setmetatable({}, { __mode = "k" })
getregistry()["resil.raised_at"] = raised_at
local function note_raise(e)
  if type(e) == "table" and getmetatable(e) == nil and raised_at[e] == nil then
    for level = 2, 40 do
      local info = getinfo(level, "Sl")
      if not info then break end
      if info.currentline > 0 and info.source:sub(1, 7) ~= "=[resil" then
        raised_at[e] = info.short_src .. ":" .. info.currentline
        break
      end
    end
  end
  return e
end

local steps_total = resil.metrics.counter("resil_steps_total",
  "Checkpointed steps, by result: done (run and stored), replayed (from a resumed run), failed")
local steps_done, steps_replayed, steps_failed = steps_total:labels({ result = "done" }),
  steps_total:labels({ result = "replayed" }), steps_total:labels({ result = "failed" })

local run -- the current run: { id =, seq = { [scope] = n } }, once a step has run
local MAX_LOGGED_RECORD = 1024 * 1024 -- (a record not checkpointed is logged whole up to this: checkpoint_failed)
local script_is_run = false -- whether the script (or an embedder's chunk) is a run: see name_chunk below

-- from the script's absolute path (config.script_path, set by the host) and
-- its arguments: the same command resumes the same run, another list of arguments is another run.
-- The arguments joined by NULs named no arguments and one empty one (`p.lua` and `p.lua ""`) alike,
-- and an argument holding a NUL (an embedder's) as two: such a list is named by its JSON after a
-- byte no joined list has there; every other list keeps the id earlier versions gave it (a run
-- interrupted before an upgrade resumes after it).
local function default_run_id()
  local script = config.script or "(script)"
  local name = script:match("([^/]+)$"):gsub("%.lua$", "")
  local where = config.script_path or script
  local args = config.args or {}
  local joined = table.concat(args, "\0")
  local named = where .. "\0" .. joined
  if #args > 0 and (joined == "" and #args == 1 or select(2, joined:gsub("\0", "")) ~= #args - 1) then
    named = where .. "\1" .. json.encode({ unpack(args) })
  end
  return ("%s-%s"):format(name, resil.hash(named):sub(1, 12))
end

-- Another live process holds the run. Said without a traceback: nothing is
-- wrong with the script, and the user needs only who holds it.
local function run_held(id, holder, since, lost)
  local how = lost and "was taken over by %s; this process stops" or
    "is held by %s (another process is running it; --wait waits for it)"
  return resil.error("run_held", ("run %s " .. how):format(id, owner.format(holder, since)),
    { run = id, holder = owner.describe(holder), traceback = false })
end

-- This process found its run taken over or ended by another (it was frozen, or its loop held, past
-- its lease): -> err, which every later step raises before its fn runs; the run's end is not
-- recorded by this process (its "failed" replaced the "done" of the process that ended it)
local function lost(r, err)
  r.stopped, r.lost = err, true
  return err
end

-- What `runs show` puts after the script to resume the run: its arguments; for `-e CODE` (the CLI
-- names its script "-e", its path "-e\n" .. CODE) the code, which names the run and runs it
-- again (the line said "resil-lua --run ID -e", an option without its code). Up to 8 KB of it.
local MAX_CODE_KEPT = 8192
local function resume_args()
  local code = config.script == "-e" and type(config.script_path) == "string" and config.script_path:match("^%-e\n(.*)$")
  -- (nor code holding a secret the process knows, an API key it configured: the store kept it, and
  -- runs show, another process, printed it whole; redacted, the line would run other code)
  if code then return #code <= MAX_CODE_KEPT and resil.redact(code) == code and json.encode({ code }) or nil end
  -- (an argument holding a secret the process knows, a key given on the command line and
  -- registered with resil.log.redact, is kept redacted: the store kept it whole, and runs show,
  -- another process, printed it; the line says which argument to give again)
  if config.args then
    local kept = { unpack(config.args) }
    for i, v in pairs(kept) do
      if type(v) == "string" then kept[i] = resil.redact(v, "secrets") end
    end
    return json.encode(kept)
  end
end

-- The script the run's row names: an embedder's chunk (resil_load_string: its path is its name, a
-- line break and its code, see name_chunk) as Lua names chunks, "=name", which `runs show` gives
-- no resume command (its program resumes it; the line named a file "nightly" that is none)
local function row_script()
  local script, path = config.script, config.script_path
  if type(script) == "string" and script ~= "-" and script ~= "-e" and type(path) == "string" and
      path:sub(1, #script + 1) == script .. "\n" then
    return "=" .. script
  end
  return script
end

-- A take sent whose task has not resumed with the answer yet, for resil_close (below)
local taking
-- A run has one owner at a time: take it, or wait for its holder (config.wait).
local function take_run(s, id)
  local me = owner.me().id
  local wait = config.wait == true and math.huge or config.wait or 0
  local deadline, poll, told = resil.now() + wait, 0.05, false
  while true do
    local now = store_now()
    local lease_until = lease_due(backend_of[s], now)
    local mine = { backend = backend_of[s], id = id, me = me }
    taking = mine
    local done, generation, since = backend_of[s]:run_start(id, row_script(), config.fresh, now, me, lease_until,
      resume_args())
    if taking == mine then taking = nil end
    if done == nil then error(generation, 0) end -- the store is unavailable
    lease_written(backend_of[s], lease_until)
    if done then
      owner_keep(backend_of[s], "run:" .. id)
      return done, generation
    end
    if resil.now() + poll > deadline then error(run_held(id, generation, since), 0) end
    if not told then
      told = true
      resil.log.warn("run held by another process: waiting for it", { run = id,
        holder = owner.format(generation, since) })
    end
    resil.sleep(poll)
    poll = math.min(poll * 2, 1)
  end
end

-- The run as this process counts it, made at the first step whether or not
-- the store can be reached: a step that found the store unavailable keeps
-- its position, so the steps after it keep theirs (a renumbered step would
-- be taken for another step's record: a divergence, or a wrong replay).
local function run_object()
  if run and run.url ~= S.url() then
    -- resil.store_config named another store since the run was taken: the
    -- run is given up on the old store and taken on the new one, counted
    -- from its first step, as a process started with that store would take
    -- it (steps checkpointed in a store nobody reads any more would be paid
    -- for again on resume)
    if run.held then owner_drop(backend_of[run.store], "run:" .. run.id) end
    run = nil
  end
  if not run then
    -- inflight: the steps running now, recorded as pending if the run ends
    -- before they do; failed: the items with a failed step recorded
    -- starting: the steps begun whose fn has not started yet (the run being taken, the store
    -- asked for their record)
    run = { id = config.run or default_run_id(), url = S.url(), seq = {}, resumed = false, held = false, inflight = {},
            starting = {}, failed = {}, retries = {}, notes = {}, names = {}, unrecorded = {} }
  end
  return run
end

local record_failure -- (below)
-- steps that did not run, the store unavailable, with none run or replayed after them and not in a
-- run's end this process recorded (for the command's exit status: resil.runs.not_run)
local not_run_count, not_run_run, not_run_err, not_run_url = 0, nil, nil, nil

-- -> the current run, taken on first use | nil, err{kind="store_unavailable"}
-- (taken again at the next step). A run another process holds raises: the
-- script must stop.
local function current_run()
  local r = run_object()
  if r.held then return r end
  if r.starter then -- another task is taking it: its outcome is ours
    local ok, err = true, nil
    if r.starter ~= resil.running() then ok, err = r.starter:join() end
    if r.held then return r end
    -- the run held by another process (or diverged): this task stops too, never goes on past its step
    if not ok and not (resil.is_error(err) and err.kind == "store_unavailable") then error(err, 3) end
    return nil, err or r.take_error
  end
  local s, serr = store_or_fail()
  if not s then return nil, serr end
  r.store = s
  r.starter = spawn(function()
    -- it forgets itself as it ends, even with the task that started it canceled meanwhile (a
    -- resil.timeout around the step): left, every later step was told its store_unavailable
    local me = resil.running()
    local _ <close> = setmetatable({}, { __close = function() if r.starter == me then r.starter = nil end end })
    local done, generation = take_run(s, r.id)
    r.held, r.resumed, r.generation, r.confirmed = true, done > 0, generation, store_now()
    resil.log.info(done > 0 and "run resumed" or "run started", { run = r.id, steps_done = done })
    -- the steps that found the store unavailable before the run was taken: failed, recorded now
    -- (`runs show` lists them, with why; before, nothing said their items had not run)
    local unrecorded = r.unrecorded
    r.unrecorded = {}
    if r.id == not_run_run then not_run_count = 0 end -- (the store has the run now: they are its failures)
    for _, f in ipairs(unrecorded) do pcall(record_failure, r, f.scope, f.seq, f.name, f.err, 0) end
  end)
  local starter = r.starter
  local ok, err = starter:join()
  if r.starter == starter then r.starter = nil end
  if not ok then
    if resil.is_error(err) and err.kind == "store_unavailable" then
      r.take_error = err
      return nil, err
    end
    if run == r then run = nil end
    error(err, 3)
  end
  return r
end

local function current_run_or_raise()
  local r, err = current_run()
  if not r then error(err, 3) end
  return r
end

resil.run = {}
function resil.run.id() return current_run_or_raise().id end
function resil.run.started() return run ~= nil and run.held end
function resil.run.resumed() return current_run_or_raise().resumed end
-- how many times the run was started over (--fresh): keys derived from the run include it
function resil.run.generation() return current_run_or_raise().generation or 0 end
-- Record how the run ended and give it up (the CLI does this when the
-- script ends). Works outside a task: it writes at once, without the loop.
-- A later resil.step takes the run again and resumes it. -> true | nil, err
local ended_id -- the run this process last gave up (trace.lua names it on the run's span)
local CUT_SHORT = "canceled: the step's task was canceled (a resil.timeout or t:cancel around the step) before its fn " ..
  "ended; resuming the run runs it again"
local error_text -- (below)
-- (at_end: the script's or the host's end, where the store is written to at once; from the
-- script, resil.run.finish waits for it in its task, as for any store operation)
local function finish_run(status, why, at_end)
  local r = run
  if not (r and r.held) then return end
  run, ended_id = nil, r.id
  owner_drop(backend_of[r.store], "run:" .. r.id)
  if r.lost then return true end -- (the run is another's: its end is theirs to record)
  status = status or "done"
  -- steps whose fn ended (and was paid for) with their record still on its way to the store as the
  -- loop stopped (a signal while the put waited for another process's write lock, or a sync): the
  -- record is written now, as resil.once's are at close. The step was left "pending", its result
  -- lost, and the resumed run paid for it again.
  if at_end or not task_running() then
    local refused -- (a store that failed one is not asked again: the others are pending, as before)
    for key, p in pairs(r.inflight) do
      if p.record then
        local ok, done, err = false, nil, refused
        if not refused then
          ok, done, err = pcall(backend_of[r.store].step_put_now, backend_of[r.store], r.id, p.scope, p.seq,
            p.name, p.record.text, store_now(), owner.me().id, p.record.retries, p.started, p.record.detail)
          if not ok then err = done elseif done == false then err = "the run was taken over by " .. tostring(err) end
        end
        if ok and done then
          r.inflight[key] = nil
        else -- (each said, with its record: what was paid for is in the log)
          refused = refused or tostring(err)
          resil.log.error("a step ran but its result was not checkpointed as the run ended: resuming it runs the " ..
            "step again", { run = r.id, item = p.scope ~= "" and p.scope or nil, seq = p.seq, step = p.name,
              error = tostring(err), record = #p.record.text <= MAX_LOGGED_RECORD and p.record.text or nil })
        end
      end
    end
  end
  local pending = {}
  for _, p in pairs(r.inflight) do
    local step = { scope = p.scope, seq = p.seq, name = p.name, started = p.started,
                   detail = next(p.notes) and json.encode(p.notes) or nil }
    -- a run that got to its end: a step whose task was canceled (a resil.timeout around it) never
    -- ended, and the script went on; one still running there (a background task's) is cut by the
    -- end. The run was recorded "done", the step "pending", with no resume line to run it again.
    if status == "done" and p.cut then
      step.state, step.error = "failed", CUT_SHORT
      r.failed[p.scope] = true
    elseif status == "done" then
      status = "interrupted"
    end
    pending[#pending + 1] = step
  end
  table.sort(pending, function(a, b) return a.scope < b.scope or (a.scope == b.scope and a.seq < b.seq) end)
  -- why a run failed outside its steps (an error in the script's own code, a divergence, os.exit(1)):
  -- a failed step "(run)" after its last one, as resil.map's "(item)". `runs show` said "failed" and
  -- nothing else. Not when that error is a step's failure already recorded (the step says it).
  if status == "failed" and why ~= nil then
    if type(why) == "string" then why = why:gsub("\n+stack traceback:.*$", "") end
    local text = error_text(why)
    if text ~= r.last_failure then
      local seq = (r.seq[""] or 0) + 1
      for _, p in ipairs(pending) do if p.scope == "" and p.seq >= seq then seq = p.seq + 1 end end
      pending[#pending + 1] = { scope = "", seq = seq, name = "(run)", state = "failed", error = text }
    end
  end
  -- this process saw steps fail, whether or not the store took their
  -- records (it refused some: the run said "done", its failures nowhere)
  if status == "done" and next(r.failed) then status = "done_with_failures" end
  local ok, err = backend_of[r.store]:run_finish_now(r.id, status, store_now(), owner.me().id, pending, not at_end)
  if ok == nil and err ~= nil then return nil, err end -- (the run stays "running (gone)": it resumes)
  if r.id == not_run_run then not_run_count = 0 end -- (its steps that did not run are in its end, as failures are)
  return true
end
function resil.run.finish(status, why) return finish_run(status, why, false) end

-- What a failure leaves in the store: its kind and message, short, without
-- secrets (a string error is not redacted by tostring, and `runs show` runs
-- in another process, which does not know this one's secrets). Redacted
-- before it is cut, so no part of a secret is left at the cut.
-- A field whose name says it holds a credential (a request's headers kept in the error) is the
-- redaction mark, as an uncaught table's report has it: redaction finds registered secrets and URL
-- parameters, not a JSON field's value. The names are src/error.c's (private.sensitive_field).
local sensitive_field = private.sensitive_field
-- And what JSON has no place for is said as that report says it (src/error.c): a cycle, or a
-- table past 16 levels, "{...}"; a function, a thread, NaN by their names; a table that is not a
-- list has its keys as strings (cjson refused a cycle, a sparse list or a table key, and the
-- step's error was the table's address, "table: 0x5581..."). Read raw: no metamethod runs.
local array_mt, raw_metatable = json.array_mt, debug.getmetatable
local function json_safe(v, depth, seen)
  local kind = type(v)
  if kind == "number" then return (v ~= v or v == math.huge or v == -math.huge) and tostring(v) or v end
  if kind == "string" or kind == "boolean" then return v end
  if kind ~= "table" then return kind end
  if depth > 16 or seen[v] then return "{...}" end
  seen[v] = true
  local count = 0
  for _ in next, v do count = count + 1 end
  local list = count == rawlen(v)
  local out = {}
  for k, x in next, v do
    local key = k
    if not list then key = type(k) == "string" and k or type(k) == "number" and tostring(k) or type(k) end
    out[key] = type(k) == "string" and sensitive_field(k) and "[REDACTED]" or json_safe(x, depth + 1, seen)
  end
  seen[v] = nil
  return raw_metatable(v) == array_mt and setmetatable(out, array_mt) or out
end
function error_text(err)
  -- a table raised without a __tostring (error{code = 42}) is its fields, not its address
  local encoded, plain = false, nil
  local mt = type(err) == "table" and raw_metatable(err)
  if type(err) == "table" and not (mt and rawget(mt, "__tostring") ~= nil) then
    encoded, plain = pcall(json.encode, json_safe(err, 0, {}))
  end
  -- (an error object whose __tostring raises: that raise replaced the step's error for its caller, and
  -- left the step "running", listed as its process killed)
  local shown_ok, shown = true, plain
  if not encoded then shown_ok, shown = pcall(tostring, err) end
  if not shown_ok then
    shown = ("(a %s whose __tostring raised: %s)"):format(type(err), type(shown) == "string" and shown or type(shown))
  end
  local text = resil.redact(shown)
  if #text > 2000 then text = text:sub(1, 2000) .. "..." end
  return text
end

-- Record a failed step (unless the run's store is gone: the failure is
-- then only the script's to report).
function record_failure(r, scope, seq, name, err, retries, started, detail)
  steps_failed:inc()
  r.failed[scope] = true
  local text = error_text(err)
  r.last_failure = text
  local ok, serr, since = backend_of[r.store]:step_failed(r.id, scope, seq, name, text, retries, store_now(),
    owner.me().id, started, detail)
  if ok == false then error(lost(r, run_held(r.id, serr, since, true)), 0) end
end

-- What happens inside a step, for `runs show --html`: each attempt's
-- seconds by provider, retries and fallbacks by class, stored with the step
-- as JSON. Notes made outside any step are not kept (only counted for the
-- progress line).
local MAX_LATENCIES = 64 -- per provider per step: a step that retries forever stays small
local function step_notes()
  local r = run
  if not r then return nil end
  return r.notes[resil.context()._step_scope or ""]
end

local function note_class(field, class)
  local notes = step_notes()
  if not notes then return end
  local t = notes[field] or {}
  notes[field] = t
  class = tostring(class or "unknown")
  t[class] = (t[class] or 0) + 1
end

-- the process's retries so far, by class (the progress line shows them)
local retries_seen = { total = 0, by_class = {} }

-- policies/retry.lua calls this for each retry: counted for the item (the
-- task's step scope) and shown by `resil-lua runs show`
function resil.run.retried(class)
  retries_seen.total = retries_seen.total + 1
  local c = tostring(class or "unknown")
  retries_seen.by_class[c] = (retries_seen.by_class[c] or 0) + 1
  local r = run
  if not r then return end
  local scope = resil.context()._step_scope or ""
  r.retries[scope] = (r.retries[scope] or 0) + 1
  note_class("retries", class)
end

-- policies/retry.lua: one attempt to provider took seconds
function resil.run.attempted(provider, seconds)
  local notes = step_notes()
  if not notes then return end
  local lat = notes.latency or {}
  notes.latency = lat
  local list = lat[tostring(provider)] or {}
  lat[tostring(provider)] = list
  if #list < MAX_LATENCIES then list[#list + 1] = math.floor(seconds * 1e4 + 0.5) / 1e4 end
end

-- policies/fallback.lua: the chain moved on after an error of this class
function resil.run.fell_back(class) note_class("fallbacks", class) end

-- resil.map calls this for an item that failed: one that failed outside any
-- step is recorded as a failed "(item)" step after its last one.
function resil.run.item_failed(scope, err)
  local r = run
  if not (r and r.held) or r.failed[scope] then return end
  record_failure(r, scope, (r.seq[scope] or 0) + 1, "(item)", err, 0)
end

-- The places steps take while a step's fn runs: its own steps (a helper that checkpoints,
-- resil.run.now) in its scope, and those of the items of a resil.map it runs, in theirs. A
-- replay of the step runs none of them, so its record keeps the last place taken in each
-- scope, and the replay takes them: the steps after it keep their places (the next step was
-- taken for the first nested one's record, a divergence; a map after it was given the items
-- of the map inside it, their results replayed as its own). Kept in the task's context, which
-- the tasks it spawns (a map's workers) copy.
local function took_place(scope, seq)
  local places = resil.context()._step_places
  if places and (places[scope] or 0) < seq then places[scope] = seq end
end

-- The items of a resil.map: -> the prefix of their scopes. The first map in a scope has its items
-- at "i" ("3/i" under item 3), as before; the n-th after it at "mN/i". Every map's items shared
-- "1", "2", ...: the second map's steps were numbered after the first's, so an item of the first
-- that took another count of steps in a resumed run (a step that failed, returned early, now done)
-- met the second map's records: a divergence for good, or, its step of the same name, the other
-- map's paid result replayed as its own while that map paid again. The count is a place, kept in a
-- step's record as its nested steps' are: a replay of a step whose fn ran maps runs none of them.
local MAPS = "maps:" -- (no scope has a colon)
function resil.run.map_scope(parent)
  local base = parent and (parent .. "/") or ""
  if not script_is_run then return base end -- (the gateway's maps: no run, no steps)
  local r, key = run_object(), MAPS .. (parent or "")
  local n = (r.seq[key] or 0) + 1
  r.seq[key] = n
  took_place(key, n)
  return n == 1 and base or ("%sm%d/"):format(base, n)
end

local record_places = private.record_places -- (once.lua's: a record's places, first in its object)
local function take_places(r, places)
  if type(places) ~= "table" then return end
  for scope, seq in pairs(places) do
    seq = math.tointeger(seq)
    if type(scope) == "string" and seq then
      if (r.seq[scope] or 0) < seq then r.seq[scope] = seq end
      took_place(scope, seq)
    end
  end
end
local function replay_places(r, result)
  local places = result:match('^{"nested":(%b{}),')
  take_places(r, places and json.decode(places))
end
-- (a resil.once replayed whose fn ran steps: once.lua)
function private.take_places(places)
  if run or script_is_run then take_places(run_object(), places) end
end

-- Where resil.step was called (step_where's caller), for its errors: the first caller outside
-- the host's own modules (resil.run.now is one); one called as a tail call (`return
-- resil.step(...)`, in a map's item) has lost its caller's frame: then fn's own line.
local function step_where(fn)
  if not getinfo(2, "t").istailcall then
    for level = 3, 64 do
      local info = getinfo(level, "Sl")
      if not info then break end
      if info.currentline > 0 and not info.source:find("^=%[resil") then
        return ("%s:%d"):format(info.short_src, info.currentline)
      end
    end
  end
  local info = getinfo(fn, "S")
  return info.linedefined > 0 and ("%s:%d"):format(info.short_src, info.linedefined) or "?"
end

-- A step whose fn ran but whose result the store did not take (a full disk, a read-only file,
-- Redis down): the script must stop. Going on, each later step paid its provider and lost its
-- result too, and the resumed run paid for all of them again. The error names the step and
-- its line; every later step of the run in this process raises it before its fn runs (until
-- resil.run.finish). The record is logged at error level, whole up to 1 MB: what was paid for
-- is not lost with the process (a person can enter it; resuming runs the step again).
local function checkpoint_failed(r, scope, seq, name, where, text, serr)
  resil.log.error("a step ran but its result was not checkpointed: the run stops; resuming it runs the step again",
    { run = r.id, item = scope ~= "" and scope or nil, seq = seq, step = name, at = where, error = tostring(serr),
      record = #text <= MAX_LOGGED_RECORD and text or nil,
      record_bytes = #text > MAX_LOGGED_RECORD and #text or nil })
  local err = resil.error("store_unavailable", ("run %s: step %d%s '%s' (%s) ran, but its result could not be "
    .. "checkpointed: %s; the run stops here (resuming it runs this step again)"):format(r.id, seq,
    scope ~= "" and (" of item " .. scope) or "", name, where, tostring(serr)),
    { run = r.id, item = scope, seq = seq, step = name, where = where, cause = serr, stops_run = true,
      traceback = false })
  r.stopped = err
  return err
end

-- The item each resil.map item's scope runs now (the map tells, as the item starts and ends).
-- A step's record in an item keeps the item's fingerprint ("item" after "nested", where none of
-- fn's values can be), and a replay checks it: items are keyed by their index, so a run resumed
-- with its list reordered, or an item inserted or removed, gave items each other's paid results.
-- Records without one (written before) are replayed unchecked. The map's key(item, i), when
-- given, names the item instead (items with fields that change from run to run: a timestamp).
local items_now = {}
function resil.run.item(scope, value, index, key)
  items_now[scope] = value ~= nil and { value = value, index = index, key = key } or nil
end
local function item_fingerprint(scope)
  local item = items_now[scope]
  if not item then return nil end
  if not item.fp then
    item.fp = fingerprint(item.key and item.key(item.value, item.index) or item.value) -- (its cycles named once: once.lua)
  end
  return item.fp
end
local function record_item(text, scope)
  local fp = text and scope ~= "" and item_fingerprint(scope)
  if not fp then return text end
  return '{"item":"' .. fp .. '",' .. text:sub(2)
end
local function recorded_item(result)
  return result:match('^{"item":"(%x+)",') or result:match('^{"nested":%b{},"item":"(%x+)",')
end

-- A step's place has a record: -> the values it stored, as the step returned them
-- A divergence stops the run in this process, as a result not checkpointed does (r.stopped): the
-- other workers of a map went on taking items, each paid for, after one met it (and recorded them
-- in the order now given, which the one the error asks to restore then diverged from)
local function diverged(r, err)
  local was = r.stopped -- (with concurrency the lowest item met is named: workers take items in order)
  if not (was and was.kind == "divergence" and was.item and err.item and was.item < err.item) then r.stopped = err end
  error(err, 4)
end

-- (where: the step's call, step_where's; a divergence names it, as a policy edited between runs is
-- where to look: the error said the step's name alone, and its traceback ended at the script's
-- resil.map call)
local function replay(r, scope, seq, name, recorded, result, where)
  if recorded ~= name then
    diverged(r, resil.error("divergence", ("run %s diverged at step %d%s: recorded '%s', now '%s' at %s (use --fresh "
      .. "to start over)"):format(r.id, seq, scope ~= "" and (" of item " .. scope) or "", recorded, name, where),
      { run = r.id, seq = seq, recorded = recorded, name = name, where = where }))
  end
  local was, now = recorded_item(result), item_fingerprint(scope)
  if was and now and was ~= now then
    local index = scope:match("(%d+)$")
    diverged(r, resil.error("divergence", ("run %s diverged at item %s%s: its step %d '%s' was recorded for another item "
      .. "(the list given to resil.map was reordered, or an item inserted or removed, since the run began: "
      .. "restore it, or use --fresh to start over; resil.map's key = function(item) names items whose fields change "
      .. "between runs)"):format(r.id, index, scope ~= index and (" (" .. scope .. ")") or "",
      seq, name), { run = r.id, seq = seq, item = tonumber(index), scope = scope, recorded = recorded, name = name }))
  end
  steps_replayed:inc()
  local values, why = decode_values(result)
  if not values then -- never runs fn again: the step did happen
    return nil, resil.error("store_unavailable", ("store: the record of run %s step %d is unreadable (%s)"):format(
      r.id, seq, why), { run = r.id, seq = seq })
  end
  replay_places(r, result)
  return unpack(values, 1, values.n)
end

-- Whether the run is still this process's: -> true | nil, err (the store unavailable); another
-- process holding it, or having ended it, raises run_held at resil.step's caller (level 3)
local function still_held(r, backend, scope)
  local row, gerr = backend:run_get(r.id)
  if row == nil and gerr ~= nil then
    r.failed[scope] = true
    return nil, gerr
  end
  if row and row.owner and row.owner ~= owner.me().id then
    error(lost(r, run_held(r.id, row.owner, tonumber(row.owner_since), true)), 3)
  end
  if row and not row.owner then -- (its new holder ended it: this process's steps would all run again)
    error(lost(r, resil.error("run_held", ("run %s was ended by another process (%s) while this one ran it; this "
      .. "process stops"):format(r.id, tostring(row.status)), { run = r.id, traceback = false })), 3)
  end
  r.confirmed = store_now()
  return true
end

-- A step that did not run, the store not reached or not read (the run not taken, its record not
-- read: a read-only or corrupt file, the write lock held past the timeout, Redis down): nil, err,
-- as its caller is told, and logged once per run with the step's line and the store's error (the
-- command said nothing and exited 0, every step's result nil and none of their work done)
local function not_run(r, name, where, err)
  if resil.is_error(err) and err.kind == "store_unavailable" then
    if not_run_count == 0 then not_run_err = nil end
    not_run_count, not_run_run, not_run_err, not_run_url = not_run_count + 1, r.id, not_run_err or err, r.url
  end
  if where and not r.told_unavailable then
    r.told_unavailable = true
    resil.log.error("a step did not run: the store could not be reached or read (the run's later steps that find it "
      .. "so are not logged)", { run = r.id, step = name, at = where, error = tostring(err) })
  end
  return nil, err
end

-- (a step's task closed while the step is in flight: { r.inflight, key, its entry })
local cut_when_closed = { __close = function(c) if c[1][c[2]] == c[3] then c[3].cut = true end end }

-- resil.step(name, fn, ...) -> fn's results; in a resumed run, the stored ones
function resil.step(name, fn, ...)
  if type(name) ~= "string" or name == "" then error("resil.step: name must be a non-empty string", 2) end
  if type(fn) ~= "function" then error("resil.step: fn must be a function", 2) end
  if S.holds_secret(name) then error("resil.step: the step's name contains a value read through resil.secret", 2) end
  -- (inside the script's own coroutine.wrap: the error named task:join, which the script never called, at a line of
  -- the host's)
  if not (task_running() and isyieldable()) then
    error(step_where(fn) .. ": resil.step must be called from a task (resil.spawn), not from a plain coroutine, a "
      .. "metamethod or a C callback", 0)
  end
  local scope = resil.context()._step_scope or "" -- set per resil.map item
  local counted = run_object()
  local seq = (counted.seq[scope] or 0) + 1
  counted.seq[scope] = seq -- this step's place, even if the store fails it now
  took_place(scope, seq)
  -- the how-manieth step of this name in its scope (policies/jobs.lua: the first of a name reads its job's
  -- key as versions before made it)
  local names = counted.names[scope] or {}
  counted.names[scope] = names
  local nth = (names[name] or 0) + 1
  names[name] = nth
  -- (a host closed while this task waits for the run's take or the step's record: the run was
  -- recorded "done" though this step never ran)
  local key = scope .. "|" .. seq
  counted.starting[key] = true
  local _ <close> = setmetatable({}, { __close = function() counted.starting[key] = nil end })
  local r, rerr = current_run()
  if not r then -- (the store unavailable: the run cannot end "done")
    -- also while not yet held: a later step that takes the run (the store back) ended it "done"
    -- without this step, whose fn never ran
    if run then
      run.failed[scope] = true
      run.unrecorded[#run.unrecorded + 1] = { scope = scope, seq = seq, name = name, err = rerr }
    end
    return not_run(counted, name, not counted.told_unavailable and step_where(fn), rerr)
  end
  if r.stopped then error(r.stopped, 2) end -- a step's result was not checkpointed, or the run diverged: nothing more runs
  local backend = backend_of[r.store]
  local recorded, result = backend:step_get(r.id, scope, seq)
  -- unknown is not "not done": running it again could pay twice
  if recorded == nil and result ~= nil then
    r.failed[scope] = true
    return not_run(r, name, not r.told_unavailable and step_where(fn), result)
  end
  if recorded ~= nil then
    -- a replay too, once this process may have been held up past its lease since it last saw the run
    -- its own (frozen between steps, while another host took the run over, ran its steps and ended
    -- it): it replayed the other's records to the script's end, ran the script's code outside steps
    -- a second time, and exited 0
    if store_now() - (r.confirmed or 0) > owner.lease / 3 then
      local mine, gerr = still_held(r, backend, scope)
      if not mine then return not_run(r, name, not r.told_unavailable and step_where(fn), gerr) end
    end
    not_run_count = 0 -- (a step the store let run since: the script went on, its run's end says the rest)
    return replay(r, scope, seq, name, recorded, result, recorded ~= name and step_where(fn) or nil)
  end
  -- fn is about to run (and pay): a process whose run was taken over meanwhile (its lease
  -- lapsed: a loop held, a partition) stops here, not at the step's put after paying for
  -- what the new holder runs too. (A read: on SQLite it never waits for a writer.)
  local mine, gerr = still_held(r, backend, scope)
  if not mine then return not_run(r, name, not r.told_unavailable and step_where(fn), gerr) end
  not_run_count = 0
  item_fingerprint(scope) -- (the map's key run now: one that raises fails the step before fn pays, not after)
  local ctx = resil.context() -- this task's own table (a spawned task gets a copy)
  local saved_step, saved_seq, saved_nth = ctx.step, ctx._step_seq, ctx._step_nth
  ctx.step, ctx._step_seq, ctx._step_nth = name, seq, nth
  -- retries made by policies/retry.lua inside the step (counted per item)
  local retries0 = r.retries[scope] or 0
  -- a step inside a step keeps its own notes; the outer one's come back after it
  local started, notes, outer_notes = store_now(), {}, r.notes[scope]
  r.notes[scope] = notes
  local running = { scope = scope, seq = seq, name = name, started = started, notes = notes }
  r.inflight[key] = running
  -- a cancel closes the task where it waits (in fn, or the store's put past a shield): the step is
  -- still in flight then, and never will end (finish_run records it failed)
  local _ <close> = setmetatable({ r.inflight, key, running }, cut_when_closed)
  local places, outer_places = {}, ctx._step_places
  -- the step begun, in the store: a process killed from here on leaves its step "running" there,
  -- which `runs show` lists as interrupted (it listed the item done). Its outcome replaces it. (A
  -- cancel meanwhile waits for the write, and then cuts fn at its first wait: recorded failed.)
  pcall(shield, backend.step_started, backend, r.id, scope, seq, name, started, owner.me().id) -- (only a trace)
  ctx._step_places = places
  local out = pack(xpcall(fn, note_raise, ...))
  ctx.step, ctx._step_seq, ctx._step_nth, ctx._step_places = saved_step, saved_seq, saved_nth, outer_places
  for s, n in pairs(places) do took_place(s, n) end -- (the outer step's fn ran them too)
  r.inflight[key] = nil
  r.notes[scope] = outer_notes
  local detail = next(notes) and json.encode(notes) or nil
  if not out[1] then
    if run == r then
      record_failure(r, scope, seq, name, out[2], (r.retries[scope] or 0) - retries0, started, detail)
    end
    error(out[2], 0)
  end
  if out[2] == nil and out.n >= 3 and out[3] ~= nil then -- not checkpointed
    if run == r then
      record_failure(r, scope, seq, name, out[3], (r.retries[scope] or 0) - retries0, started, detail)
    end
    return unpack(out, 2, out.n)
  end
  -- (a replay takes at most 250, store.lua's MAX_VALUES: more were stored, and every replay
  -- returned nil and the record "unreadable", never running fn again)
  local text, err = nil, "more than 250 of them"
  if out.n - 1 <= 250 then text, err = encode_values(out, 2) end
  text = record_places(record_item(text, scope), places)
  if not text then
    -- fn ran (and may have been paid for): the step is a failure `runs show` lists
    -- (at the step's line, or fn's for `return resil.step(...)`, a map item's usual tail call, whose
    -- error named no place at all; runs show lists it so too)
    local why = step_where(fn) .. ": resil.step: cannot checkpoint the results: " .. err
    if run == r then record_failure(r, scope, seq, name, why, (r.retries[scope] or 0) - retries0, started, detail) end
    error(why, 0)
  end
  -- under the shield: fn ran and may have been paid for; a cancel that comes while the store has
  -- the result (the caller's resil.timeout, its lock held) waits for it. Cut, the result was lost
  -- and the step left no trace (not even pending): the run ended "done", the step to pay again.
  -- (in flight again while the store takes it: a host closed meanwhile, resil_close, ends the run
  -- "interrupted" with the step pending, not "done" without a trace of a step that ran)
  r.inflight[key] = running
  running.record = { text = text, retries = (r.retries[scope] or 0) - retries0, detail = detail } -- (finish_run's)
  local ok, serr, since = shield(backend.step_put, backend, r.id, scope, seq, name, text, store_now(),
    owner.me().id, running.record.retries, started, detail)
  r.inflight[key] = nil
  if ok == false then error(lost(r, run_held(r.id, serr, since, true)), 2) end
  -- another process wrote this place first, while the run had no holder (its holder ended it, or
  -- this one's lease lapsed and another ran and ended the run): the first result is the step's
  -- in both processes, as a replay gives it, and this process stops at its next step (it went on
  -- replaying the other's records of the steps after it, to the script's end, exit status 0)
  if ok and serr ~= nil then
    -- (the error says who has the run now, or that it was ended, as still_held's; it marks it lost)
    local now_mine, why = pcall(still_held, r, backend, scope)
    if now_mine then
      lost(r, resil.error("run_held", ("run %s: another process ran step %d%s '%s' too and stored its result "
        .. "first; this process stops"):format(r.id, seq, scope ~= "" and (" of item " .. scope) or "", name),
        { run = r.id, traceback = false, cause = why }))
    end
    return replay(r, scope, seq, name, serr, since, serr ~= name and step_where(fn) or nil)
  end
  if not ok then -- fn ran (and was paid for), its result not checkpointed: the run stops here
    r.failed[scope] = true
    if run == r then
      pcall(record_failure, r, scope, seq, name, serr, (r.retries[scope] or 0) - retries0, started, detail)
    end
    error(checkpoint_failed(r, scope, seq, name, step_where(fn), text, serr), 2)
  end
  r.confirmed = store_now()
  steps_done:inc()
  return unpack(out, 2, out.n)
end

-- Journaled decisions: in a resumed run they return what the first run got.
function resil.run.now() return resil.step("@now", store_now) end
-- (math.random's forms: none, m for 1..m, or m and n; checked before the step: random(6) raised
-- "[resil runs]:683: bad argument #2 to 'random'" from inside it, and the run kept a failed step)
function resil.run.random(m, n)
  local lo, hi
  if m ~= nil then
    lo, hi = math.tointeger(m), math.tointeger(n)
    if n == nil then lo, hi = 1, lo end
    if type(m) ~= "number" or n ~= nil and type(n) ~= "number" or not lo or not hi or lo > hi then
      error(("resil.run.random: takes nothing, m (1 to m) or m and n, whole numbers with m <= n; got %s, %s")
        :format(tostring(m), tostring(n)), 2)
    end
  elseif n ~= nil then
    error(("resil.run.random: n without m (got nil, %s)"):format(tostring(n)), 2)
  end
  return resil.step("@random", function()
    if lo == nil then return math.random() end
    return math.random(lo, hi)
  end)
end

-- os.exit(code) ends the process from inside the script (a cron job's `os.exit(failures and 1 or 0)`):
-- the command never got to record how the run ended, which stayed "running" for good, its holder
-- gone. Recorded here first, as the command records it (a success code is "done"; with failed items
-- "done_with_failures"); os.exit(code, false), Lua's immediate exit, is a crash's.
-- The exported spans too (--otlp-endpoint) and the metrics file's last write (--metrics-file): the
-- command makes them after the script returns, and os.exit lost every span not yet posted (the
-- run's own) and the counts since the file's last write; made here, from the task that exits.
-- steps running, or begun and waiting to run (the run's take, their record): the run is not done
-- (not one whose task was canceled, the script going on: it is a failure, see finish_run)
local function unfinished(r)
  for _, p in pairs(r.inflight) do if not p.cut then return true end end
  return next(r.starting) ~= nil
end
local host_exit, metrics_finish, running = os.exit, resil.metrics.finish, resil.running
local function run_finish(status, why) return finish_run(status, why, true) end
os.exit = function(code, close)
  -- (checked first, as Lua's own os.exit checks it, at the caller's line: a code it refuses raised
  -- "[resil runs]:N: bad argument #1 to 'host_exit'" after the run was recorded as ended)
  if code ~= nil and type(code) ~= "boolean" then
    local n = math.tointeger(tonumber(code) or code)
    if n == nil then
      error(("bad argument #1 to 'exit' (%s)"):format(tonumber(code) and "number has no integer representation"
        or "number expected, got " .. (type(code) == "string" and "string" or type(code))), 2)
    end
    code = n
  end
  if close ~= false then
    local success = code == nil or code == true or code == 0
    if run and run.held then
      -- (steps still running, cut short: recorded pending, and the run is not done)
      local ok, err = run_finish(success and (unfinished(run) and "interrupted" or "done") or "failed",
        not success and ("the script called os.exit(%s)"):format(tostring(code)) or nil)
      if not ok and err ~= nil then io.stderr:write("resil-lua: recording the run's end: ", tostring(err), "\n") end
    end
    local trace = package.loaded["resil.trace"]
    if trace and running() then pcall(trace.finish, success and "done" or "failed") end
    -- and the --metrics-file's last write (main.c's finish_metrics: the function it took at start)
    local finish_metrics = getregistry()["resil.main.metrics_finish"] or metrics_finish
    if finish_metrics then pcall(finish_metrics) end
  end
  return host_exit(code, close)
end

-- resil_load_string (src/resil.c): a chunk's steps go to a run named by the chunk's name and its
-- code, as stdin's and -e's are: every chunk an embedder loaded was the run "(script)-...", and two
-- programs running different code replayed each other's paid step results. A chunk the host named
-- already (the CLI's -e: its script_path is "-e\n" .. code) keeps that name. The run this process
-- holds under another chunk's name is ended first, as `status` says the last resil_run ended (as
-- the CLI ends a script's run): the new chunk's first step takes its own. A run named by
-- resil_options.run_id (--run) is every chunk's.
-- (and resil_load_file, once it named the script: the CLI's `-e CODE script.lua` ran the script's
-- steps in the -e code's run)
-- (and the last chunk's run not taken yet, its first step having found the store unavailable: the
-- new chunk's steps and costs went to it)
local function end_other_run(status)
  if run and not config.run and run.id ~= default_run_id() then
    if not run.held then
      run = nil
      return
    end
    local ok, err = run_finish(status)
    if not ok and err ~= nil then io.stderr:write("resil-lua: recording the run's end: ", tostring(err), "\n") end
  end
end
-- A script, and an embedder's chunk, is its run from its first line, not from its first step: the
-- ledger rows it writes before it (ai.chat at the top, a script with no steps at all) carry the run's
-- id, the one its steps take (`costs --run ID` and `runs show ID` missed what they cost). Only its
-- first step takes the run (a record, a lease): a script that never checkpoints neither opens the
-- store for it nor refuses a second copy of itself. The gateway's chunk is no run: it serves.
function private.end_other_run(status)
  end_other_run(status)
  script_is_run = true
end
function private.name_chunk(name, code, status)
  local path = config.script_path
  if not (type(path) == "string" and path:sub(-#code - 1) == "\n" .. code) then
    private.store_config_host({ script = name, script_path = name .. "\n" .. code })
  end
  end_other_run(status)
  script_is_run = name ~= "[gateway]"
end

-- resil_close (embed_give_up): a host that ends gives its run up, as the command does when the
-- script ends; an embedding program that closed one held the run for as long as it lived, so
-- every later host, its own or another process's, was refused run_held
getregistry()["resil.runs.close"] = function()
  -- a take the store answered (or may still) whose task never resumed: the run, if the store gave
  -- it to this host, is given up unfinished (its steps, if any, are the next host's to resume)
  local t = taking
  taking = nil
  if t and not (run and run.held) then
    local err = S.at_close({}, t.backend, "run_give_up_now", t.id, store_now(), t.me)
    if err then return nil, err end
  end
  if not (run and run.held) then return true end
  return run_finish(unfinished(run) and "interrupted" or "done")
end

-- the command's exit status (main.c): a script whose steps did not run, the store unavailable
-- before their fn, exited 0, as one whose work was all done. -> how many, the run, the first error
-- (not those of a store the script has left since, resil.store_config naming another: it gave that run up)
getregistry()["resil.runs.not_run"] = function()
  if not_run_count == 0 or not_run_url ~= S.url() then return 0 end
  return not_run_count, not_run_run, not_run_err ~= nil and error_text(not_run_err) or nil
end

-- for the ledger: the run a cost belongs to; for the progress line: the
-- retries so far ({total=, by_class={}}, read only)
-- (before the run is taken: the id its first step will take, as the script runs)
local function current_id()
  if run then return run.id end
  if script_is_run then return config.run or default_run_id() end
end
return { current_id = current_id, retries = function() return retries_seen end,
  last_id = function() return run and run.id or ended_id end }
