-- resil.cost: the ledger, in integer micro-dollars so that sums are exact.
-- Every record is a row; only an explicit id (or a ticket) deduplicates.
local resil, private = ...
local S = require "resil.store"
local backend_of = private.backend_of -- (a store's backend: never on the store object, a script's)
local store_now, store_or_fail = S.now, S.open
local runs = require "resil.runs"
local owner = require "resil.owner"
-- (the host's copies, taken at load: a script may replace what the resil table holds, its
-- json.encode the units of every row its process records, its spawn the rows' retries)
local json, spawn = private.json, resil.spawn
local journal = require "resil.journal"
-- a row's usual units (a flat object of names and whole numbers) as json.encode writes them, for a
-- tenth of its instructions (src/flat_json.c); nil: json.encode's to write. ledger_row: the usual
-- queued row (cost_row's), made in C; nil: cost_row's to check and make
local flat = require "resil.core.flat_json"
local flat_json, ledger_row = flat.write, flat.row

local MICRO, floor = 1e6, math.floor
local function to_micro(usd) return floor(usd * MICRO + 0.5) end
-- A limit above 0 that the ledger's millionths of a dollar hold as $0 (a budget or a key's that
-- would refuse every request, where 0 is the limit said so): refused where it is given
local function below_unit(usd) return usd > 0 and to_micro(usd) == 0 end
-- An amount of money from a caller: a number from 0 to `most` ($1e9 by
-- default; in micro-dollars far below 2^63, so every sum is an exact
-- integer on both stores). NaN passed every `< 0` check (a reservation of
-- NaN was always admitted, or failed inside the store), and inf made a
-- ledger's total inf for good, or a Redis script fail half-way.
local MAX_USD = 1e9
local function is_usd(v, most) return type(v) == "number" and v >= 0 and v <= (most or MAX_USD) end
local function from_micro(m) return m / MICRO end
resil.cost = {}

-- Spend as metrics: USD by provider and model, and tokens in the units of
-- OpenTelemetry's GenAI metric gen_ai.client.token.usage (a histogram of
-- tokens per call, by gen_ai.operation.name, gen_ai.provider.name, gen_ai.request.model,
-- gen_ai.token.type; and gen_ai.system, the provider's name before the conventions renamed it).
local usd_total = resil.metrics.counter("resil_cost_usd_total", "Recorded spend in USD, by provider and model")
local unpriced_total = resil.metrics.counter("resil_cost_unpriced_total",
  "Calls recorded without a price (usd = nil), by provider and model")
local tokens_total = resil.metrics.counter("resil_tokens_total", "Recorded tokens, by provider, model and type")
local token_usage = resil.metrics.histogram("gen_ai_client_token_usage",
  "Tokens used per call (OpenTelemetry gen_ai.client.token.usage), by operation, system, model and token type",
  { buckets = { 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864 } })

-- the series of one provider and model, each bound at its first use (a
-- label key is a sort and a concatenation: too much for every call of a
-- gateway's hot path): by operation, a row's series (src/metrics.c: a row is
-- one call there, its USD and its four token fields' counters and histograms)
local core = require "resil.core.metrics"
local row_series, row_bind, row_observe = core.row_series, core.row_bind, core.row_observe
local bound, bound_count = {}, 0
local spent_usd = 0 -- by this process, for resil.map's progress line
local function series_of(provider, model)
  local by = bound[provider]
  local b = by and by[model]
  if b then return b end
  if bound_count >= 1000 then bound, bound_count = {}, 0 end -- the metrics bound their own series anyway
  b = {}
  bound[provider] = bound[provider] or {}
  bound[provider][model] = b
  bound_count = bound_count + 1
  return b
end

-- The conventions' gen_ai.operation.name of a ledger row's operation (a row's own name when the
-- conventions have none for it; none without one)
local SEMCONV_OPERATION = { chat = "chat", stream = "chat", embed = "embeddings" }

-- a row series' slots 1-4: the units field each counts, and its token type in the metrics
local TOKEN_TYPE = { "input", "input", "output", "output" }

-- a slot of a row's series bound (row_observe asked for it)
local function bind_slot(rs, slot, provider, model, operation)
  if slot == 0 then
    return row_bind(rs, 0, usd_total:labels({ provider = provider, model = model }).inc)
  end
  local token_type = TOKEN_TYPE[slot]
  row_bind(rs, slot, tokens_total:labels({ provider = provider, model = model, type = token_type }).inc,
    token_usage:labels({ gen_ai_operation_name = operation and (SEMCONV_OPERATION[operation] or operation),
      gen_ai_provider_name = provider, gen_ai_system = provider, gen_ai_request_model = model,
      gen_ai_token_type = token_type }).observe)
end

-- a call's spend in the metrics: its USD (nil: unpriced) and the token
-- counts of its units' fields input_tokens, prompt_tokens, output_tokens
-- and completion_tokens (each a number from 0 up, or not counted)
local function observe_call(provider, model, usd, input, prompt, output, completion, operation)
  provider, model = provider or "unknown", model or "unknown"
  local by = bound[provider] -- (series_of's lookup, without its call: once a row)
  local b = by and by[model] or series_of(provider, model)
  if usd then
    spent_usd = spent_usd + usd
  else
    unpriced_total:inc({ provider = provider, model = model })
  end
  local rs = b[operation or false]
  if not rs then
    rs = row_series()
    b[operation or false] = rs
  end
  local missing = row_observe(rs, usd, input, prompt, output, completion)
  while missing do
    bind_slot(rs, missing, provider, model, operation)
    missing = row_observe(rs, usd, input, prompt, output, completion)
  end
end

local function observe_cost(e, units)
  if type(units) ~= "table" then return observe_call(e.provider, e.model, e.usd) end
  observe_call(e.provider, e.model, e.usd, units.input_tokens, units.prompt_tokens, units.output_tokens,
    units.completion_tokens, e.operation)
end

-- the UTC day of `at`, formatted once per day rather than once per row
local day_start, day_text = 0, nil
local function day_of(at)
  if at < day_start or at >= day_start + 86400 or not day_text then
    day_start = at - at % 86400
    day_text = os.date("!%Y-%m-%d", math.floor(day_start))
  end
  return day_text
end

-- The strings met as a row's provider, model, operation or user: a lookup for each then,
-- rather than a type() or tostring() call (some 400 instructions apiece, on every row).
-- Bounded: clients name any model they like.
local strings, strings_count = {}, 0
local function is_string(v) -- -> v is a string (remembered)
  if type(v) ~= "string" then return false end
  if strings_count >= 1000 then strings, strings_count = {}, 0 end
  strings[v], strings_count = true, strings_count + 1
  return true
end

-- e checked, at the line that called resil.cost.record (level 4: here, the
-- entry's maker, resil.cost.record or a settle, its caller) -> its units as
-- JSON (nil: none) and the task's context. (e is a table: resil.cost.record
-- and ticket:settle, its callers' callers, asked)
local function checked(e)
  -- usd = nil: a call without a price, recorded as such (never as a zero)
  local usd = e.usd
  if usd ~= nil and not (type(usd) == "number" and usd >= 0 and usd <= MAX_USD) then -- (is_usd)
    error("resil.cost.record: usd must be a number from 0 to 1e9, or nil for a call without a price", 4)
  end
  -- (checked here, at the caller's line: a row nobody waits for would fail only in the store's
  -- next commit, the cost lost with "the ledger refused a row")
  local provider, model, operation = e.provider, e.model, e.operation
  if provider ~= nil and not strings[provider] and not is_string(provider)
    or model ~= nil and not strings[model] and not is_string(model)
    or operation ~= nil and not strings[operation] and not is_string(operation) then
    for _, field in ipairs({ "provider", "model", "operation" }) do
      local v = e[field]
      if v ~= nil and type(v) ~= "string" then
        error(("resil.cost.record: %s must be a string or nil, not a %s"):format(field, type(v)), 4)
      end
    end
  end
  -- (the ledger's other text columns, seldom given: a table there failed the row's insert, at the
  -- store's next commit for a row nobody waits for, its cost lost with "the ledger refused a row")
  if e.run ~= nil or e.step ~= nil or e.item ~= nil or e.budget ~= nil or e.period ~= nil then
    for _, field in ipairs({ "run", "step", "item", "budget", "period" }) do
      local t = type(e[field])
      if t ~= "nil" and t ~= "string" and t ~= "number" then
        error(("resil.cost.record: %s must be a string or nil, not a %s"):format(field, t), 4)
      end
    end
  end
  -- a budget's row counts in the period it names and in no other: one without it was kept in the
  -- ledger under the budget and counted in none of its periods, the money spent past the limit
  if e.budget ~= nil and e.period == nil then
    error("resil.cost.record: budget needs its period (period = budget:state().period): a row without one " ..
      "counts in no period of the budget", 4)
  end
  local units = e.units
  if units ~= nil then
    local ok, text = false, "not a table"
    if type(units) == "table" then
      text = flat_json(units)
      if text then ok = true else ok, text = pcall(json.encode, units) end
    end
    if not ok then
      error("resil.cost.record: units must be a table JSON can hold (token counts by name): " .. tostring(text), 4)
    end
    units = text
  end
  return units, resil.context()
end

-- Only the caller knows when two records are one charge (e.g. the
-- provider's response id, the same when it replays an idempotent call).
-- A step or once that runs its fn again calls the provider again, so
-- nothing is deduplicated on where the record was made.
local function cost_entry(e, at)
  local units, ctx = checked(e)
  return { dedupe = e.id ~= nil and tostring(e.id) or nil, at = at, day = day_of(at), provider = e.provider,
           model = e.model, operation = e.operation, user = e.user and tostring(e.user),
           run = e.run or runs.current_id(), step = e.step or ctx.step or nil,
           micro_usd = e.usd and to_micro(e.usd), units = units, budget = e.budget, period = e.period,
           item = e.item or ctx._step_scope }
end

-- The same as a row queued in C (backend:cost_queue): an array, the
-- ledger's columns in the order of store_sqlite.lua's INSERT_COST (1-15), then
-- what the metrics count once it is written, copied now (the caller may
-- reuse its tables): usd (16), the units' input_tokens, prompt_tokens,
-- output_tokens and completion_tokens (17-20); and the caller's sync (21).
-- (A constructor of 21 fields by name cost three times this one.)
local NO_UNITS = {}
local function cost_row(e, at)
  local units, ctx = checked(e)
  local u, usd, user = e.units or NO_UNITS, e.usd, e.user
  if user and not strings[user] and not is_string(user) then user = tostring(user) end
  -- (micro_usd: to_micro's integer, without math.floor's call; usd is checked, at most 1e9)
  return { e.id ~= nil and tostring(e.id) or nil, at, day_of(at), e.provider, e.model, e.operation,
           user, e.run or runs.current_id(), e.step or ctx.step or nil,
           usd and (usd * MICRO + 0.5) // 1 | 0, units, e.budget, e.period, nil, e.item or ctx._step_scope,
           usd, u.input_tokens, u.prompt_tokens, u.output_tokens, u.completion_tokens, e.sync }
end

-- a queued row as the store's entry (its write tried again) and as the metrics' fields
local function row_entry(r)
  return { dedupe = r[1], at = r[2], day = r[3], provider = r[4], model = r[5], operation = r[6], user = r[7],
           run = r[8], step = r[9], micro_usd = r[10], units = r[11], budget = r[12], period = r[13], ticket = r[14],
           item = r[15], sync = r[21] }
end
local function row_metric_fields(r)
  return { provider = r[4], model = r[5], usd = r[16], operation = r[6],
           units = { input_tokens = r[17], prompt_tokens = r[18], output_tokens = r[19], completion_tokens = r[20] } }
end

-- What the metrics need of a call, copied when it is recorded: a write
-- nobody waits for counts in them once it is written, and by then the
-- caller may have changed its table (reused it for its next call).
local function metric_fields(e)
  local u = e.units
  if type(u) == "table" then -- (the fields observe_cost counts)
    u = { input_tokens = u.input_tokens, prompt_tokens = u.prompt_tokens, output_tokens = u.output_tokens,
          completion_tokens = u.completion_tokens }
  end
  return { provider = e.provider, model = e.model, usd = e.usd, operation = e.operation, units = u }
end

-- Writes nobody waits for that are not written yet: queued for SQLite's
-- next group commit, sent to Redis without their reply, or tried again
-- (the store unavailable). At most LATER_MAX: past it a caller writes as
-- with wait = true (it waits, and gets the outcome), so a store unavailable
-- for long (a write lock held, Redis down) slows the callers down instead
-- of holding every row in memory (some 4 KB each with its task: 378 MB for
-- 100,000 rows recorded while Redis was down; 1.2 GB a minute at 10,000 a
-- second). A caller that cannot wait (outside a task) is queued anyway.
local LATER_MAX = 10000
local unwritten = 0

-- A write nobody waits for (write_later below) found the store unavailable:
-- it is tried again in a task of its own, for a minute at most, since the
-- call it records was paid for. A row keyed by an id (or a ticket) is
-- written once however often it is tried. counts(ok): the write made a row
-- (observed in the metrics with `fields`).
--
-- A process that ends meanwhile (SIGTERM, the end of its script) names
-- each in its log, so that an operator can enter it, instead of dropping
-- it without a word; one whose attempt was out (sent to Redis, or
-- committed on SQLite and waiting for its sync) may have been written, and
-- says so. A settle of 0 has no row to lose (its hold expires).
local retrying = {}
local retry_ended = { __close = function(pending)
  unwritten = unwritten - 1
  retrying[pending] = nil
end }
local function say_lost(what, fields, why)
  if what == "a settle" and fields.usd == 0 then return end
  fields.error = why
  resil.log.error(what .. " was not written before the process ended; its cost is not in the ledger", fields)
end
-- A write the store would not take, kept in the ledger's journal (src/lua/journal.lua) rather than
-- dropped: keep() -> its file | nil (no key it could be written once by: said as before)
local function say_kept(what, fields, path, why)
  fields.error, fields.journal = why, path
  resil.log.warn(what .. " is kept in the ledger's journal: it is written to the store when the store answers",
    fields)
end
local function kept_or_lost(what, fields, why, keep)
  local path, unkept
  if keep then path, unkept = keep(false, fields) end
  fields.journal_error = unkept -- (why the journal could not keep it: its folder, a full disk)
  if path then say_kept(what, fields, path, why) else say_lost(what, fields, why) end
end
local function say_unknown(what, fields)
  resil.log.error(what .. " may not have been written before the process ended: look for its id or ticket " ..
    "in the ledger before entering it", fields)
end
-- (anchored in the registry: nothing else refers to it, and collected
-- early its report would never be made)
debug.getregistry()["resil.costs: rows lost at exit"] = setmetatable({}, { __gc = function()
  journal.ending()
  for r in pairs(retrying) do
    local why = r.close_error and tostring(r.close_error) or "the store was still unavailable"
    -- (a keyed write is kept even if its attempt may have landed: the ledger has it once either way)
    local path, unkept
    if r.keep then path, unkept = r.keep(r.attempting or r.sent, r.fields) end
    r.fields.journal_error = unkept
    if path then say_kept(r.what, r.fields, path, why)
    elseif r.attempting or r.sent then say_unknown(r.what, r.fields)
    else say_lost(r.what, r.fields, why) end
  end
  journal.close()
end })

-- At resil_close: backend[method](backend, ...) at once (SQLite's cost_record_now, budget_settle_now;
-- Redis has none) -> true written | false, err (S.at_close: a store that failed once is not asked again)
local function close_write(failed, backend, method, ...)
  if not (backend and backend[method]) then return false end
  local err = S.at_close(failed, backend, method, ...)
  if failed[backend] then return false, err end
  return true
end

-- sent: the failure that called for this may have reached the store (a
-- Redis command without a reply: a frozen server runs it when it thaws), as
-- may any attempt here that fails so (err.sent); such a write is never said
-- to be missing from the ledger, only perhaps (an operator entering it by
-- hand would count it twice).
-- write_now(failed, maybe_landed) -> true once written at once (resil_close, below) | false, err | nil:
-- not tried (a write that may have landed, an attempt out or sent, without a key: it would be twice)
local unkeyed = 0
local function own_key(backend, entry, always)
  if entry.dedupe ~= nil or not always and backend.kind ~= "redis" then return end
  unkeyed = unkeyed + 1
  entry.dedupe = ("row:%s:%d"):format(owner.me().tag, unkeyed)
end

-- A row's keep (retry_later) for its store's journal: keyed first, with a key of its own if it has
-- none and cannot have landed (one that may have, without a key, would be in the ledger twice).
-- store(): its backend, if one was opened (else the default store's journal).
local function row_keeper(entry, store)
  return function(maybe_landed, log_fields)
    if entry.dedupe == nil and maybe_landed then return nil end
    own_key(nil, entry, true)
    local path, err = journal.keep(store and store(), { k = "row", e = entry })
    -- (the key it is kept under named in its line: the one to look for in the ledger)
    if path and log_fields then log_fields.id = entry.dedupe end
    return path, err
  end
end

-- keep(maybe_landed) -> the journal's file it is kept in | nil (one without a key that may have
-- landed, or the journal unwritable): past the minute, or as the process ends.
local function retry_later(what, write, counts, fields, log_fields, sent, write_now, keep)
  unwritten = unwritten + 1
  local pending = { what = what, fields = log_fields, sent = sent or nil, write_now = write_now, keep = keep }
  retrying[pending] = true
  local function attempt()
    pending.attempting = true
    local ok, err = write()
    pending.attempting = false
    if ok == nil and type(err) == "table" and err.sent then pending.sent = true end
    return ok, err
  end
  spawn(function()
    local _ <close> = setmetatable(pending, retry_ended) -- however it ends
    local ok, err = S.retry_write(attempt)
    if counts(ok) then observe_cost(fields, fields.units) end
    local path, unkept
    if ok == nil and keep then path, unkept = keep(pending.sent, log_fields) end
    log_fields.journal_error = unkept
    if path then
      say_kept(what, log_fields, path, tostring(err))
    elseif ok == nil then
      log_fields.error = tostring(err)
      if pending.sent then
        resil.log.error(what .. " may not have been written: look for its id or ticket in the ledger before " ..
          "entering it", log_fields)
      else
        resil.log.error(what .. " could not be written; its cost is not in the ledger", log_fields)
      end
    end
  end)
end

-- backend:<name>_later(a [, b], done) (SQLite: the next group commit; Redis:
-- sent at once, ahead of any later command); then the metrics, or the
-- retry above. -> true, or false past LATER_MAX: the caller writes itself.
-- a, b: cost_record's entry, or budget_settle's ticket and entry. One
-- closure a row (done); the retry's are made only when it is needed.
local function write_later(backend, name, fields, log_fields, a, b)
  if unwritten >= LATER_MAX and resil.running() and coroutine.isyieldable() then return false end
  local seen = metric_fields(fields)
  local row = name == "cost_record"
  -- (its keep for the ledger's journal, made only when the store refused it)
  local function keeper(maybe_landed, log)
    if row then return row_keeper(a, function() return backend end)(maybe_landed, log) end
    return journal.keep(backend, { k = "settle", t = a, e = b })
  end
  local function done(err, ok)
    unwritten = unwritten - 1
    if err == nil then
      -- a row that was written (not one already there) counts in the metrics;
      -- a settle of 0 writes none
      if ok and (row or seen.usd > 0) then observe_cost(seen, seen.units) end
    elseif resil.is_error(err) and err.kind == "store_unavailable" and err.closing then
      -- the store closed with it unwritten (another process held the write lock): said row by row
      kept_or_lost(row and "a cost row" or "a settle", log_fields, tostring(err), keeper)
    elseif resil.is_error(err) and err.kind == "store_unavailable" then
      retry_later(row and "a cost row" or "a settle", function() return backend[name](backend, a, b) end,
        function(written) return written and (row or seen.usd > 0) end, seen, log_fields, err.sent,
        function(failed, maybe_landed)
          if maybe_landed and row and a.dedupe == nil then return nil end
          return close_write(failed, backend, name .. "_now", a, b)
        end,
        keeper)
    else
      log_fields.error = tostring(err)
      resil.log.error("the ledger refused a row; its cost is not in it", log_fields)
    end
  end
  unwritten = unwritten + 1
  if row then backend:cost_record_later(a, done) else backend:budget_settle_later(a, b, done) end
  return true
end

-- A row nobody waits for, on SQLite: queued in C (backend:cost_queue), its
-- insert run there at the group commit and its outcome told per commit, not
-- per row: the metrics of the rows written (a row whose key the ledger
-- already had counts in none); a row not written as write_later's are (the
-- retry, or said lost as the store closes). The row (cost_row) is the one
-- table a row costs: no closures.
local function rows_committed(rows, done)
  unwritten = unwritten - done
  for i = 1, #rows do
    local r = rows[i]
    observe_call(r[4], r[5], r[16], r[17], r[18], r[19], r[20], r[6])
  end
end

local queued_on -- (the backend whose queue has the rows: SQLite's, the one with cost_queue)
local function row_failed(err, row)
  unwritten = unwritten - 1
  local log_fields = { provider = row[4], model = row[5], usd = row[16], id = row[1] }
  if resil.is_error(err) and err.kind == "store_unavailable" and err.closing then
    kept_or_lost("a cost row", log_fields, tostring(err), row_keeper(row_entry(row), function() return queued_on end))
  elseif resil.is_error(err) and err.kind == "store_unavailable" then
    local entry, backend = row_entry(row), queued_on
    retry_later("a cost row", function()
      local s, oerr = S.open_for_retry()
      if not s then return nil, oerr end
      return backend_of[s]:cost_record(entry)
    end, function(ok) return ok end, row_metric_fields(row), log_fields, err.sent,
      function(failed, maybe_landed)
        if maybe_landed and entry.dedupe == nil then return nil end
        return close_write(failed, backend, "cost_record_now", entry)
      end, row_keeper(entry, function() return backend end))
  else
    log_fields.error = tostring(err)
    resil.log.error("the ledger refused a row; its cost is not in it", log_fields)
  end
end

-- resil.cost.record{provider=, model=, operation=, user=, usd=, units=, id=} -> true | nil, err
-- sync = false: return once the row is committed (it survives a crash of the
-- process) rather than once it is on the disk (a power cut may lose it);
-- SQLite only (Redis keeps to its own persistence either way).
-- wait = false: return at once; the row is written with the next group
-- commit (SQLite), or sent at once without waiting for the reply (Redis);
-- either way a read that follows sees it. A store that is unavailable
-- meanwhile is tried again for a minute (failures are logged). Past 10,000
-- such writes not yet written (LATER_MAX), it writes as without it.
-- A row without an id, written without waiting on Redis, gets one of its own
-- (this process's tag and a count): a command that timed out (a frozen
-- server) still runs when the server thaws, and the retry (retry_later)
-- wrote the row a second time. On SQLite a write that failed was not made.
-- retry = true (a paid call's row, as policies.ai records it): a write the
-- store refuses as unavailable is tried again as one nobody waits for is,
-- and the caller gets nil, err with err.retrying = true (it must not write
-- the row itself again); without it the caller decides, and a waited-for
-- row the store refused was dropped (ledger_wait = true in the gateway).

-- A paid call's row the store could not take now (not open yet, or refused
-- as unavailable): tried again for a minute, the store asked for at each try
-- (retry_later). sent: the failed write may have reached the store.
-- backend: the store that refused it, if one did (the last a try opened is asked at resil_close)
local function record_later(e, entry, err, backend)
  retry_later("a cost row", function()
    local s, oerr = S.open_for_retry()
    if not s then return nil, oerr end
    backend = backend_of[s]
    own_key(backend, entry)
    return backend:cost_record(entry)
  end, function(ok) return ok end, metric_fields(e),
    { provider = e.provider, model = e.model, usd = e.usd, id = entry.dedupe }, err.sent,
    function(failed, maybe_landed)
      if maybe_landed and entry.dedupe == nil then return nil end
      return close_write(failed, backend, "cost_record_now", entry)
    end, row_keeper(entry, function() return backend end))
end

-- (a paid call's row whose caller was canceled while the store had it: a
-- pipeline's deadline, a task canceled. Queued, SQLite drops it with the
-- cancel; it is written later instead, keyed, so that one the store took
-- meanwhile is not written twice)
local record_guard = { __close = function(w)
  if not w.seen then record_later(w.e, w.entry, { sent = true }, w.backend) end
end }

-- Rows whose caller waits for the store to take them, in flight (SQLite's group commit, waiting for
-- another process's write lock or a slow disk's sync): a process stopped meanwhile (SIGTERM) wrote
-- none of them and said nothing, its queue dropped as the store closed; a paid call's cost gone from
-- the ledger. Written as the host closes (resil.costs.close), as a settle in flight is: those with a
-- key (an id, or retry = true's own key, as ai.* records a paid call), so that one the queue
-- committed already is not written twice; a row without one is its caller's to decide, as ever.
local recording = {}
local recorded_mt = { __close = function(r) recording[r[1]] = nil end } -- (a cancel: its caller's to say)

function resil.cost.record(e)
  if type(e) ~= "table" then error("resil.cost.record: expects a table", 2) end
  -- (a row's budget is whose spend it is, on SQLite: under the sandbox a gateway key's, "key:NAME", is
  -- the host's, as resil.budget refuses it; a script spent a key's money with a row of its own)
  if private.sandbox and type(e.budget) == "string" and e.budget:sub(1, 4) == "key:" then
    error(("resil.cost.record: budget %q is a gateway key's (names under \"key:\" are reserved in the sandbox:"
      .. " resil_options.sandbox, --sandbox)"):format(e.budget), 2)
  end
  local s, serr = store_or_fail()
  if not s then
    -- a write nobody waits for, made before the store could be opened (Redis
    -- down as the gateway's first answer came, the SQLite file busy): tried
    -- again as one the store refused, not dropped
    if (e.wait == false or e.retry) and resil.running() and resil.is_error(serr)
      and serr.kind == "store_unavailable" and unwritten < LATER_MAX then
      local entry = cost_entry(e, store_now())
      entry.sync = e.sync
      record_later(e, entry, serr)
      if e.wait == false then return true end
      serr.retrying = true
    end
    return nil, serr
  end
  -- (SQLite: queued in C; past LATER_MAX written as below)
  if e.wait == false and backend_of[s].cost_queue and not (unwritten >= LATER_MAX and resil.running()
    and coroutine.isyieldable()) then
    local at = store_now()
    -- (the run and the context cost_row would take, for the row made in C; side-effect free)
    local row = ledger_row(e, at, day_of(at), e.run == nil and runs.current_id() or nil, resil.context())
      or cost_row(e, at)
    unwritten = unwritten + 1
    queued_on = backend_of[s]
    backend_of[s]:cost_queue(row, rows_committed, row_failed)
    return true
  end
  local entry = cost_entry(e, store_now())
  entry.sync = e.sync
  if e.wait == false or e.retry then own_key(backend_of[s], entry) end
  if e.wait == false then
    if write_later(backend_of[s], "cost_record", e,
      { provider = e.provider, model = e.model, usd = e.usd, id = entry.dedupe }, entry) then
      return true
    end
  end
  local guard
  if e.retry and resil.running() then
    own_key(backend_of[s], entry, true)
    guard = setmetatable({ e = e, entry = entry, backend = backend_of[s] }, record_guard)
  end
  local _ <close> = guard
  if entry.dedupe ~= nil then recording[entry] = s end -- (an id, or retry's own key: one written is not written twice)
  local unrecorded <close> = setmetatable({ entry }, recorded_mt)
  local ok, err = backend_of[s]:cost_record(entry)
  recording[entry] = nil
  if guard then guard.seen = true end
  if ok == nil and e.retry and resil.running() and resil.is_error(err) and err.kind == "store_unavailable" then
    record_later(e, entry, err, backend_of[s])
    err.retrying = true
    return nil, err
  end
  if ok == nil and err then return nil, err end
  if ok then observe_cost(e, e.units) end
  return true
end

-- resil_close (embed_give_up): the rows in flight above, written at once (SQLite), or said lost; a
-- Redis command sent has reached the server or not: said to look for. -> true | nil, err (the first)
debug.getregistry()["resil.costs.close"] = function()
  journal.ending()
  local first, failed = nil, {}
  for entry, s in pairs(recording) do
    recording[entry] = nil
    local b = backend_of[s]
    local fields = { provider = entry.provider, model = entry.model, usd = entry.micro_usd and entry.micro_usd / MICRO,
      id = entry.dedupe }
    if b.cost_record_now then
      local err = S.at_close(failed, b, "cost_record_now", entry)
      first = first or err
      if failed[b] then kept_or_lost("a cost row", fields, tostring(err or first), row_keeper(entry, function() return b end)) end
    else
      local path = entry.dedupe ~= nil and row_keeper(entry, function() return b end)(true)
      if path then say_kept("a cost row", fields, path, "its write was out as the process ended")
      else say_unknown("a cost row", fields) end
    end
  end
  -- those the store refused, waiting for their next try (retry_later) as the process ends (its script
  -- raised or called os.exit, SIGTERM): tried once more now. They were said lost without it, the
  -- store taking writes again by then (its lock let go, room on the disk): a paid call's cost and
  -- its budget's spend gone, and the resumed run replayed its resil.once result, paying nothing again
  for pending in pairs(retrying) do
    if pending.write_now then
      -- (one whose write may have landed, an attempt out or a canceled caller's, only if it has a key)
      local written, err = pending.write_now(failed, pending.attempting or pending.sent)
      if written then
        retrying[pending] = nil
        unwritten = unwritten - 1
      elseif written == false then
        first, pending.close_error = first or err, err
      end
    end
  end
  if first then return nil, first end
  return true
end

-- A filter the ledger cannot apply is the caller's mistake, raised at its line (level: the caller's).
-- (An unknown key was ignored: total{usr = "u42"} summed every user's cost; a since given as a date
-- string summed nothing on SQLite and raised in the Redis backend; a list raised in the backend.)
local FILTER_KEYS = { provider = true, model = true, operation = true, user = true, run = true, budget = true }
local BY_KEYS = { provider = true, model = true, user = true, day = true, operation = true, run = true, item = true }
local function check_filter(fname, f, level)
  if f == nil then return end
  if type(f) ~= "table" then error(("%s: the filter must be a table, got %s"):format(fname, type(f)), level + 1) end
  for k, v in pairs(f) do
    if k == "since" or k == "until" then
      if type(v) ~= "number" or v ~= v then
        error(("%s: %s must be a time in epoch seconds (resil.clock.wall()), got %s"):format(fname, k,
          type(v) == "number" and "NaN" or type(v) .. (type(v) == "string" and (" %q"):format(v) or "")), level + 1)
      end
    elseif not FILTER_KEYS[k] then
      error(("%s: unknown filter '%s' (it takes provider, model, operation, user, run, budget, since, until)")
        :format(fname, tostring(k)), level + 1)
    elseif type(v) ~= "string" and type(v) ~= "number" then
      error(("%s: filter %s must be a string, got %s"):format(fname, k, type(v)), level + 1)
    end
  end
end

-- resil.cost.total{provider=, model=, user=, run=, since=, ["until"]=} -> usd
function resil.cost.total(f)
  check_filter("resil.cost.total", f, 2)
  local s, serr = store_or_fail()
  if not s then return nil, serr end
  local rows, err = backend_of[s]:cost_query(nil, f or {})
  if not rows then return nil, err end
  return from_micro(rows[1] and rows[1].micro_usd or 0)
end

-- resil.cost.breakdown(by, filter) -> { {key=, usd=, calls=}, ... }, by "provider"|"model"|"user"|"day"
function resil.cost.breakdown(by, f)
  if by ~= nil and not BY_KEYS[by] then
    error(("resil.cost.breakdown: cannot break down by %s (by provider, model, operation, user, day, run or item)")
      :format(type(by) == "string" and ("'%s'"):format(by) or type(by)), 2)
  end
  check_filter("resil.cost.breakdown", f, 2)
  local s, serr = store_or_fail()
  if not s then return nil, serr end
  local rows, err = backend_of[s]:cost_query(by, f or {})
  if not rows then return nil, err end
  local out = {}
  for i, r in ipairs(rows) do
    -- unpriced: how many of the calls have no price (only when some have none)
    out[i] = { key = r.key, usd = from_micro(r.micro_usd), calls = r.calls,
               unpriced = (r.unpriced or 0) > 0 and r.unpriced or nil }
  end
  return out
end

-- resil.cost.unwritten() -> ledger writes nobody waited for (rows, settles)
-- not in the store yet: a process that stops waits for them (the gateway's drain)
function resil.cost.unwritten() return unwritten end

-- for budgets: ledger entries and money in micro-dollars; for the progress
-- line: what this process has recorded so far
return { entry = cost_entry, to_micro = to_micro, from_micro = from_micro, is_usd = is_usd, below_unit = below_unit,
         observe = observe_cost,
         write_later = write_later, retry_later = retry_later, close_write = close_write,
         spent = function() return spent_usd end }
