-- resil.budget: reserve, then settle. A reservation (a hold) names its
-- owner (src/lua/owner.lua) and stops counting when that process dies or its
-- hold expires (ticket:extend renews it; ticket:keep, while its call runs);
-- the reserve checks and holds in one atomic store operation.
local resil, private = ...
local S = require "resil.store"
local owner = require "resil.owner"
local store_now, store_or_fail = S.now, S.open
local costs = require "resil.costs"
local journal = require "resil.journal"
local backend_of = private.backend_of -- (a store's backend: never on the store object, a script's)
-- (taken now, before any script runs: these are handed a store's backend, and a script may replace
-- what the resil table and resil.owner's and resil.costs' tables hold)
local spawn, write_later = resil.spawn, costs.write_later
local owner_keep, owner_drop, lease_due, lease_written = owner.keep, owner.drop, owner.lease_due, owner.lease_written
local cost_entry, to_micro, from_micro, is_usd = costs.entry, costs.to_micro, costs.from_micro, costs.is_usd
local spent_usd = resil.metrics.gauge("resil_budget_spent_usd", "Spent in the budget's current period, by budget")
local reserved_usd = resil.metrics.gauge("resil_budget_reserved_usd", "Held by open reservations, by budget")
local limit_usd = resil.metrics.gauge("resil_budget_limit_usd", "The budget's limit in force, by budget")
local soft_usd = resil.metrics.gauge("resil_budget_soft_limit_usd", "The budget's soft limit (limit x soft), by budget")
local remaining_usd = resil.metrics.gauge("resil_budget_remaining_usd",
  "Limit minus spent and reserved, by budget")

-- the budget's figures as the store last reported them, with this process's settles and
-- releases since (left at the last reserve, a gauge showed a hold after every call had ended)
local seen = {}
local function observe_budget(b, limit, spent, reserved, read_at)
  local f = seen[b.name]
  if not f then
    f = {}
    seen[b.name] = f
  end
  f.limit, f.spent, f.reserved = limit, spent, reserved
  if read_at then f.read_at = read_at end
  local l = { budget = b.name }
  spent_usd:set(l, spent)
  reserved_usd:set(l, reserved)
  limit_usd:set(l, limit)
  soft_usd:set(l, limit * b.soft)
  remaining_usd:set(l, math.max(0, limit - spent - reserved))
end

-- a ticket's end as this process saw it: its hold freed, `actual` spent (once per ticket)
local function observe_end(t, actual)
  local f = seen[t.budget.name]
  if not f or t.observed_end then return end
  t.observed_end = true
  observe_budget(t.budget, f.limit, f.spent + actual, math.max(0, f.reserved - (t.estimate or 0)))
  f.read_at = nil -- (a read meanwhile may have counted it already: the next exposition reads again)
end

local Budget = {}
-- (a budget's name is not a field of the object, read through __index: a sandboxed script that
-- renamed its own budget, b.name = "key:team", reserved against a gateway key's, a name it is
-- refused)
local name_of = setmetatable({}, { __mode = "k" })
Budget.__index = function(b, k)
  if k == "name" then return name_of[b] end
  return Budget[k]
end
-- (getmetatable(budget) is not the methods every budget shares, nor a ticket's: a script that
-- replaced reserve there changed every budget of its process, those it never named too)
Budget.__metatable = false
-- (nor a method set on the budget itself: resil.budget(name) is every caller's by that name)
Budget.__newindex = function(b, k, v)
  if Budget[k] ~= nil or k == "name" then
    error(("a budget's %s are the host's: %s cannot be set"):format(k == "name" and "name and methods" or "methods",
      tostring(k)), 2)
  end
  rawset(b, k, v)
end
local soft_total = resil.metrics.counter("resil_budget_soft_limit_total",
  "Reservations that took a budget past its soft share, by budget")
local unchecked_total = resil.metrics.counter("resil_budget_unchecked_total",
  "Reservations allowed unchecked while the store was unavailable (on_outage = \"allow\"), by budget")
-- (a hold is an estimate: a settle past it spends what no reservation checked, and requests held
-- at once near the limit may end the period past it by their sum; nothing said so)
local overrun_total = resil.metrics.counter("resil_budget_overrun_usd_total",
  "USD settled past what its reservation held (its estimate was low), by budget")
-- a call's charges (ticket:charge, its refused attempts') count with its settle: the hold covers
-- them all (weak: the host's, not fields a script could set on its ticket)
local charge_parent, charged = setmetatable({}, { __mode = "k" }), setmetatable({}, { __mode = "k" })
local function count_overrun(t, actual)
  local parent = charge_parent[t]
  if parent and not parent.done then
    charged[parent] = (charged[parent] or 0) + actual
    return
  end
  -- (a charge after its call's settle is all past the hold, which the settle freed)
  local over = actual + (charged[t] or 0) - (t.estimate or 0)
  if over >= 0.5e-6 then overrun_total:inc({ budget = t.budget.name }, over) end
end
local Ticket = {}
-- (nor are a ticket's id and budget fields: a sandboxed script that set its own ticket's
-- budget = { name = "key:team" } settled into a gateway key's budget, and one that set its id to
-- another's, ids being name:tag:seq, settled or released that hold)
local ticket_id, ticket_budget = setmetatable({}, { __mode = "k" }), setmetatable({}, { __mode = "k" })
Ticket.__index = function(t, k)
  if k == "id" then return ticket_id[t] end
  if k == "budget" then return ticket_budget[t] end
  return Ticket[k]
end
Ticket.__newindex = function(t, k, v)
  if k == "id" or k == "budget" or Ticket[k] ~= nil then
    error(("a ticket's budget and id are the host's: %s cannot be set"):format(tostring(k)), 2)
  end
  rawset(t, k, v)
end
Ticket.__metatable = false
-- the tickets made on a store, and those whose settle the store is taking (-> {store, entry}),
-- for resil_close (below)
local on_store = setmetatable({}, { __mode = "k" })
local settling = setmetatable({}, { __mode = "k" })
local function new_ticket(id, budget, fields)
  local t = setmetatable(fields, Ticket)
  ticket_id[t], ticket_budget[t] = id, budget
  if fields.store then on_store[t] = true end
  return t
end
-- (the sandbox's rawset refuses the host's objects by their metatables: src/lua/prelude.lua)
private.host_metatables = private.host_metatables or {}
private.host_metatables[Budget], private.host_metatables[Ticket] = true, true
local stop_keeping -- (ticket:keep, below)
local budgets = {}
local ticket_seq = 0

-- The gauges are the store's figures, read again as the metrics are exposed
-- (a scrape, a --metrics-file write) when the last read is a second old or
-- more: every process that uses a budget (each gateway worker) shows the
-- same figures for it, those `resil-lua budgets` shows, with other
-- processes' spend and a new period's start. Before, each showed its own
-- last view (a worker idle since its last call kept its spend then, for
-- good). A budget's gauges are one value in every process: aggregate them
-- with max, never sum. Outside a task (the file's last write at exit) they
-- stay as last read; a store that fails is not asked again in that exposition.
local REFRESH = 1
local read_figures -- (below: the budget's figures, read without writing)
local function refresh_gauges()
  if not (resil.running() and coroutine.isyieldable()) then return end
  local due = {}
  for name, f in pairs(seen) do
    if budgets[name] and not (f.read_at and resil.now() - f.read_at < REFRESH) then due[#due + 1] = name end
  end
  for _, name in ipairs(due) do
    seen[name].read_at = resil.now() -- (one read at a time, however many scrapes come)
    if not read_figures(budgets[name]) then return end
  end
end
resil.metrics.collect(refresh_gauges)

local function period_of(per, now)
  if per == "day" then return os.date("!%Y-%m-%d", math.floor(now)) end
  if per == "month" then return os.date("!%Y-%m", math.floor(now)) end
  return "all"
end

-- when a period kind ("day", "month", "none") starts, in UTC
local function period_start(per, now)
  if per == "none" then return nil end
  local day = math.floor(now) - math.floor(now) % 86400
  if per == "day" then return day end
  return day - (os.date("!*t", math.floor(now)).day - 1) * 86400
end

-- A period kind changed from `was` to `per` (`budgets set --per`, or a script's own while no
-- limit is set: a policy reload): what the switch carries into the new period, the ledger's spend
-- since its start and the open holds of the old kind's current and previous period (a hold taken
-- at 23:55 may still be open) -> {period=, since=, from = {...}}
local function carry_of(was, per, now)
  local start = period_start(was, now)
  return { period = period_of(per, now), since = period_start(per, now),
    from = { period_of(was, now), start and period_of(was, start - 1) or nil } }
end

-- budget -> the backend its limit was last written to (not on the budget: a script holds it, and the
-- backend holds the raw db or connection)
local declared_in = setmetatable({}, { __mode = "k" })

-- resil.budget(name, {limit=, per="day"|"month"|nil, hold=600, soft=0.8})
local function budget(name, opts)
  if type(name) ~= "string" or name == "" then error("resil.budget: name must be a non-empty string", 2) end
  -- (a function or a number as options of a budget that exists indexed it, at this file's line)
  if opts ~= nil and type(opts) ~= "table" then
    error(("resil.budget: options must be a table {limit=, ...}, got %s"):format(type(opts)), 2)
  end
  local b = budgets[name]
  if not b then
    if type(opts) ~= "table" then error(("resil.budget: budget '%s' needs its options {limit=}"):format(name), 2) end
    b = setmetatable({}, Budget)
    name_of[b] = name
    budgets[name] = b
  end
  if opts then
    if not is_usd(opts.limit, 1e12) then error("resil.budget: limit must be a number from 0 to 1e12", 2) end
    -- (a limit the ledger held as $0: every reservation refused, or one of less than a millionth
    -- granted at $0)
    if costs.below_unit(opts.limit) then
      error(("resil.budget: limit %s is below the ledger's unit, $0.000001 (0 is a limit that lets nothing " ..
        "through)"):format(tostring(opts.limit)), 2)
    end
    if opts.hold ~= nil and not (type(opts.hold) == "number" and opts.hold > 0 and opts.hold < math.huge) then
      error("resil.budget: hold must be a number of seconds > 0", 2)
    end
    if opts.per ~= nil and opts.per ~= "day" and opts.per ~= "month" then
      error("resil.budget: per must be \"day\", \"month\" or nil", 2)
    end
    if opts.soft ~= nil and not (type(opts.soft) == "number" and opts.soft >= 0 and opts.soft <= 1) then
      error("resil.budget: soft must be a share from 0 to 1 (of the limit, where a warning is logged)", 2)
    end
    if opts.on_outage ~= nil and opts.on_outage ~= "deny" and opts.on_outage ~= "allow" then
      error("resil.budget: on_outage must be \"deny\" (the default) or \"allow\"", 2)
    end
    b.limit, b.per, b.hold, b.soft = opts.limit, opts.per, opts.hold or 600, opts.soft or 0.8
    b.on_outage = opts.on_outage or "deny"
    declared_in[b] = nil -- written to the store again at the next reservation
  end
  return b
end
-- A budget is every process's by its name: under the sandbox "key:NAME", a gateway key's
-- (policies/gateway.lua, `resil-lua keys add --budget`), is the host's: a script reserved the
-- key's money away (or set the budget's limit in its process). The gateway gets its keys'
-- budgets through private.gateway_limits (prelude), never resil.budget.
function resil.budget(name, opts)
  if private.sandbox and type(name) == "string" and name:sub(1, 4) == "key:" then
    error(("resil.budget: budget %q is a gateway key's (names under \"key:\" are reserved in the sandbox:"
      .. " resil_options.sandbox, --sandbox)"):format(name), 2)
  end
  return budget(name, opts)
end
private.host_budget = budget

-- The limit in force: one set with `resil-lua budgets set` (in the store,
-- read at every reservation, so every process sees a change at once) over
-- the script's. The script's is written to the store when it changes, for
-- `resil-lua budgets`. -> limit, per
-- A limit that cannot be read is not guessed at: the script's may be far
-- above one an admin set (a stalled Redis let reservations through against
-- it). -> limit, per | nil, nil, err
local function limit_in_force(b, backend, now)
  local cfg, err = backend:budget_config(b.name)
  if cfg == nil and err then return nil, nil, err end
  cfg = cfg or {}
  local declared_micro, declared_per = to_micro(b.limit), b.per or "none"
  if declared_in[b] ~= backend and (cfg.declared_micro ~= declared_micro or cfg.declared_per ~= declared_per) then
    -- the script's own period kind changed (a policy reload, per = nil made "day") while no limit
    -- is set: the switch carries the spend and open holds as `budgets set --per` does (before,
    -- the new period started at zero with the old holds uncounted, their settles in the old one:
    -- a $1 budget with $0.60 held let another $0.60 through). A carry not written is not guessed
    -- past: nothing is reserved until it is.
    local carry = not cfg.limit_micro and cfg.declared_per and cfg.declared_per ~= declared_per and
      carry_of(cfg.declared_per, declared_per, now) or nil
    local ok, err = backend:budget_declare(b.name, declared_micro, declared_per, now, carry)
    if ok then
      declared_in[b] = backend
    elseif carry then
      return nil, nil, err or resil.error("store_unavailable", ("budget '%s': its new period could not be written")
        :format(b.name), { budget = b.name })
    end
  elseif cfg.declared_micro then
    declared_in[b] = backend
  end
  if cfg.limit_micro then
    local per = cfg.per
    return from_micro(cfg.limit_micro), per ~= "none" and per or nil, nil, cfg.per
  end
  return b.limit, b.per, nil, ""
end

-- A reservation whose outcome its caller did not see (its task canceled
-- while the store had it: a client that gave up; or the store did not
-- answer in time) may still have been made, or be on its way: it is
-- abandoned, in a task of its own (a cancel cannot wait) and tried again as
-- a settle is, rather than held for `hold` seconds with nobody to settle it
-- (on Redis a gateway's clients that timed out locked their key out of its
-- budget for ten minutes).
local function abandon(g)
  local function write() return g.backend:budget_abandon(g.budget, g.period, g.id, g.expires_at, store_now()) end
  local ok, err = write()
  if ok == nil then ok, err = S.retry_write(write) end
  if ok == nil then
    resil.log.error("budget: a reservation whose outcome was not seen could not be given back; it counts until " ..
      "its hold ends", { budget = g.budget, ticket = g.id, error = tostring(err) })
  end
end
-- the reservations sent whose callers have not resumed with the answer yet, for resil_close (below)
local unseen = setmetatable({}, { __mode = "k" })
local outcome_guard = { __close = function(g)
  unseen[g] = nil
  if not g.seen then spawn(abandon, g) end
end }

local RESERVE_TRIES = 3 -- against settings that change under it (budgets set --per)

-- on_outage = "allow" lets an outage pass (store_unavailable), not a store that answers with an
-- error (store_error: a Redis refusing the password, a Redis Cluster, a script's error): no wait
-- mends that, and it let every call through unchecked until someone did; nor a Redis store that lost
-- its data (err.lost: every budget's spend gone, until an operator says so, store_redis.lua)
local function outage_passes(self, err)
  return self.on_outage == "allow" and type(err) == "table" and err.kind == "store_unavailable" and not err.lost
end

-- on_outage = "allow": the store unavailable, a ticket that holds nothing; its settle records the cost
local function unchecked(self, ticket, err, now)
  unchecked_total:inc({ budget = self.name })
  if not self.outage then -- one line per outage, however many reservations it lets through
    self.outage = { since = now, unchecked = 0 }
    resil.log.warn("budget: store unavailable, reservations allowed unchecked until it is back",
      { budget = self.name, error = tostring(err) })
  end
  self.outage.unchecked = self.outage.unchecked + 1
  ticket.unchecked = true
  return ticket
end

-- budget:reserve(estimate_usd [, {hold=}]) -> ticket | nil, err{kind="budget_exceeded"|"store_unavailable"}
function Budget:reserve(estimate, o)
  if not is_usd(estimate) then error("budget:reserve: estimate must be a number from 0 to 1e9", 2) end
  if o ~= nil and type(o) ~= "table" then -- (reserve(1, 600): "attempt to index a number value" at this file's line)
    error(("budget:reserve: options must be a table {hold=}, got %s"):format(type(o)), 2)
  end
  local hold = o and o.hold or self.hold
  if not (type(hold) == "number" and hold > 0 and hold < math.huge) then
    error("budget:reserve: hold must be a number of seconds > 0", 2)
  end
  local s, serr = store_or_fail()
  if not s then
    -- A store whose file is busy past the timeout (at a worker's first request) is an outage as any:
    -- on_outage = "allow" hands out a ticket that gets the store at its settle. One that is not a
    -- store (a bad URL, /dev/null, another program's database, a newer schema) fails closed: no
    -- waiting fixes it, and "allow" would let every call through unchecked until someone does.
    if self.on_outage ~= "allow" or not (type(serr) == "table" and serr.busy) then return nil, serr end
    local now = store_now()
    ticket_seq = ticket_seq + 1
    return unchecked(self, new_ticket(("%s:%s:%d"):format(self.name, owner.me().tag, ticket_seq), self,
      { period = period_of(self.per, now), per = self.per, estimate = estimate, hold = hold }), serr, now)
  end
  local now, limit, per, period, id, ok, spent, reserved, stale
  -- (the settings read, then the hold written: a period switch in between, `budgets set --per`,
  -- makes the store refuse the hold as made against stale settings, and it is made again)
  for _ = 1, RESERVE_TRIES do
    now = store_now()
    local lerr, set_per
    limit, per, lerr, set_per = limit_in_force(self, backend_of[s], now)
    if lerr then per = self.per end
    period = period_of(per, now)
    ticket_seq = ticket_seq + 1
    local me = owner.me()
    id = ("%s:%s:%d"):format(self.name, me.tag, ticket_seq)
    ok, spent, reserved = nil, lerr, nil
    if lerr then break end
    -- the hold names this process: it stops counting when the process dies
    local lease_until = lease_due(backend_of[s], now)
    local outcome <close> = setmetatable({ backend = backend_of[s], budget = self.name, period = period, id = id,
      expires_at = now + hold }, outcome_guard)
    unseen[outcome] = true
    ok, spent, reserved, stale = backend_of[s]:budget_reserve(self.name, period, to_micro(limit), to_micro(estimate), id,
      now + hold, now, me.id, lease_until, set_per)
    unseen[outcome] = nil
    -- seen: made or refused, or (allowed unchecked) the ticket's settle or release will say, or
    -- never sent (a Redis store that is down refuses at once, err.sent = false): nothing to give back
    outcome.seen = ok ~= nil or outage_passes(self, spent) or
      (type(spent) == "table" and spent.sent == false)
    if ok ~= nil then lease_written(backend_of[s], lease_until) end
    if not stale then break end
  end
  if stale then -- the settings changed under each try: nothing is held, and the limit was never the reason
    return nil, resil.error("store_unavailable", ("budget '%s': its settings changed during %d reservations in a " ..
      "row; try again"):format(self.name, RESERVE_TRIES), { budget = self.name })
  end
  -- (a ticket only for a hold made, or let through unchecked: one made for a refusal held nothing,
  -- yet the close gave it up as an open hold, a write per refusal)
  local function made()
    return new_ticket(id, self, { period = period, per = per, estimate = estimate, store = s, hold = hold,
      expires_at = now + hold })
  end
  if ok == nil then -- the store is unavailable
    if not outage_passes(self, spent) then return nil, spent end -- fail closed
    return unchecked(self, made(), spent, now)
  end
  if self.outage then
    resil.log.info("budget: store available again", { budget = self.name, unchecked = self.outage.unchecked,
      seconds = now - self.outage.since })
    self.outage = nil
  end
  observe_budget(self, limit, from_micro(spent), from_micro(reserved), resil.now())
  if not ok then
    return nil, resil.error("budget_exceeded", ("budget '%s': $%.6f spent + $%.6f reserved + $%.6f > $%.6f"):format(
      self.name, from_micro(spent), from_micro(reserved), estimate, limit),
      { budget = self.name, limit = limit, spent = from_micro(spent), reserved = from_micro(reserved),
        period = period })
  end
  local ticket = made()
  owner_keep(backend_of[s], id, now + hold)
  local used = from_micro(spent + reserved)
  if used >= self.soft * limit then
    soft_total:inc({ budget = self.name })
    if self.warned_period ~= period then
      self.warned_period = period -- once per period and process: a warning, not a flood
      resil.log.warn("budget soft limit reached", { budget = self.name, limit = limit, period = period,
        used = used, share = limit > 0 and used / limit or 1 })
    end
  end
  return ticket
end

-- budget:state() -> {spent=, reserved=, limit=, period=, holds = { {ticket=, usd=,
-- owner = {host=, pid=, since=}, expires_at=}, ... }}; holds of dead owners are released first
function Budget:state()
  local now = store_now()
  local s, serr = store_or_fail()
  if not s then return nil, serr end
  local limit, per, lerr = limit_in_force(self, backend_of[s], now)
  if lerr then return nil, lerr end
  local period = period_of(per, now)
  local spent, reserved, rows, in_period = backend_of[s]:budget_usage(self.name, period, now, owner.me().id)
  if spent == nil then return nil, reserved end
  period = in_period or period -- (Redis: the server's clock's period, store_redis.lua's server_period)
  local holds = {}
  for i, h in ipairs(rows) do
    holds[i] = { ticket = h.ticket, usd = from_micro(h.micro_usd), owner = h.owner and owner.describe(h.owner),
                 expires_at = h.expires_at, created_at = h.created_at }
  end
  observe_budget(self, limit, from_micro(spent), from_micro(reserved), resil.now())
  return { spent = from_micro(spent), reserved = from_micro(reserved), limit = limit, period = period,
           holds = holds }
end

-- The budget's figures for its gauges, read as state's are, without writing (a scrape waits for
-- no writer on SQLite) -> true | nil, err
read_figures = function(self)
  local now = store_now()
  local s, serr = store_or_fail()
  if not s then return nil, serr end
  local limit, per, lerr = limit_in_force(self, backend_of[s], now)
  if lerr then return nil, lerr end
  local spent, reserved = backend_of[s]:budget_figures(self.name, period_of(per, now), now)
  if spent == nil then return nil, reserved end
  observe_budget(self, limit, from_micro(spent), from_micro(reserved), resil.now())
  return true
end

-- ticket:extend([seconds]) -> true | nil, err{kind="hold_ended"|"store_unavailable"}
-- The hold counts until now + seconds (default: its `hold`), never less long
-- than it did: a call still running keeps its money held. A hold that
-- stopped counting (settled, released, past its end, its owner found dead)
-- is never counted again: other calls may have reserved that money since.
-- An unchecked ticket (on_outage = "allow") holds nothing to extend.
local function hold_ended(t, why)
  return resil.error("hold_ended", ("budget '%s': the hold of ticket %s has ended (%s): it is not extended"):format(
    t.budget.name, t.id, why), { budget = t.budget.name, ticket = t.id })
end

function Ticket:extend(seconds)
  if seconds == nil then seconds = self.hold end
  if not (type(seconds) == "number" and seconds > 0 and seconds < math.huge) then
    error("ticket:extend: seconds must be a number of seconds > 0", 2)
  end
  if self.done then return nil, hold_ended(self, "it was settled or released") end
  if self.unchecked then return true end
  local backend, now = backend_of[self.store], store_now()
  local lease_until = lease_due(backend, now)
  local ok, err = backend:budget_extend(self.budget.name, self.period, self.id, now + seconds, now, owner.me().id,
    lease_until)
  if ok == nil then return nil, err end
  if not ok then
    owner_drop(backend, self.id)
    return nil, hold_ended(self, self.done and "it was settled or released" or
      "its end passed, or it was released as its owner's")
  end
  lease_written(backend, lease_until)
  self.expires_at = math.max(self.expires_at, now + seconds)
  -- (the heartbeat renews this process's lease while it holds the ticket; a settle meanwhile dropped it)
  if not self.done then owner_keep(backend, self.id, self.expires_at) end
  return true
end

-- A running call's hold kept counting (ticket:keep): extended by its `hold`
-- when a third of it is left (one store write per two thirds of a hold), in
-- a task of its own, so that no caller or stream reader waits for the store.
-- It stops at the ticket's settle or release, and once nothing refers to the
-- ticket (a stream dropped unread and never closed): the task holds it
-- weakly, and never across a sleep. -> seconds until the next look | nil: stop
local function keep_step(ref)
  local t = ref.ticket
  if not t or t.done then return nil end
  local left = t.expires_at - store_now()
  if left > t.hold / 3 then return left - t.hold / 3 end
  local ok, err = t:extend()
  if t.done then return nil end
  if ok then return math.max(0, t.expires_at - store_now() - t.hold / 3) end
  left = t.expires_at - store_now()
  if resil.is_error(err) and err.kind == "store_unavailable" and left > 0 then
    return math.min(1, left / 2) -- tried again while the hold still counts
  end
  resil.log.warn("budget: a hold ended while its call ran; its settle may take the budget past its limit",
    { budget = t.budget.name, ticket = t.id, error = tostring(err) })
  return nil
end

local function keep_running(ref)
  local wait = keep_step(ref)
  while wait do
    resil.sleep(wait)
    wait = keep_step(ref)
  end
end

stop_keeping = function(t)
  local keeper = t.keeper
  t.keeper = nil
  if keeper and keeper ~= resil.running() then keeper:cancel() end
end

-- ticket:keep() -> ticket: its hold extended while the call runs, as above
function Ticket:keep()
  if self.keeper or self.done or self.unchecked then return self end
  self.keeper = resil.background(keep_running, setmetatable({ ticket = self }, { __mode = "v" }))
  return self
end

-- A settle that found the store unavailable (SQLite's lock held past the
-- timeout, a frozen Redis) is tried again until the store takes it, for a
-- minute at most: the call was paid, and its hold would otherwise stop
-- counting at its expiry with nothing spent (a caller such as policies.ai
-- logs the error and goes on). A settle is kept once per ticket (its state
-- in the store, its ticket in the ledger), so a retry that meets one that
-- did land, or the caller's own retry, changes nothing.
-- The ticket's store (an unchecked ticket handed out while it could not be opened gets it here): -> the
-- store | nil, err
local function store_of(ticket)
  if ticket.store then return ticket.store end
  local s, err = S.open_for_retry()
  ticket.store = s
  return s, err
end

local function settle_later(ticket, entry, fields, sent)
  costs.retry_later("a settle", function()
    local s, err = store_of(ticket)
    if not s then return nil, err end
    return backend_of[s]:budget_settle(ticket.id, entry)
  end,
    function(ok) return ok and fields.usd > 0 end, fields,
    { budget = ticket.budget.name, ticket = ticket.id, usd = fields.usd }, sent,
    -- (at resil_close: once more, at once, if its store is open; kept once per ticket)
    function(failed)
      return costs.close_write(failed, ticket.store and backend_of[ticket.store], "budget_settle_now", ticket.id, entry)
    end,
    -- (past the minute, or at the end: in the ledger's journal, kept once per ticket too)
    function()
      return journal.keep(ticket.store and backend_of[ticket.store], { k = "settle", t = ticket.id, e = entry })
    end)
end

-- (canceled while the store had it: it may have been written)
local settle_guard = { __close = function(w)
  if not w.seen then settle_later(w.ticket, w.entry, w.fields, true) end
end }

-- ticket:settle(actual_usd [, cost fields]) -> true (first time) | false (already settled)
-- | nil, err{kind="store_unavailable", retrying=true} (tried again meanwhile, see above)
-- settle(0) frees the hold and writes no ledger row (a call that failed cost nothing).
-- With wait = false in the cost fields it returns true at once: the settle is
-- written with the next group commit (SQLite) or sent at once without
-- waiting for the reply (Redis), tried again as above when the store is
-- unavailable; past 10,000 such writes not yet written it waits, as
-- without it (costs.lua, LATER_MAX).
function Ticket:settle(actual, e)
  if not is_usd(actual) then error("ticket:settle: actual must be a number from 0 to 1e9", 2) end
  -- (the fields checked before the ticket is done: a string here raised inside this file, and a
  -- field the ledger refuses at the caller's line, each with the hold left open and no longer kept)
  if e ~= nil and type(e) ~= "table" then error("ticket:settle: cost fields must be a table or nil", 2) end
  local fields = {}
  for k, v in pairs(e or {}) do fields[k] = v end
  -- the cost counts in the period the settle falls in, its ledger row's (a call across midnight is
  -- today's in the budget as in `costs`); the store keeps to the kind its hold is in now
  local now = store_now()
  fields.usd, fields.budget, fields.period = actual, self.budget.name, period_of(self.per, now)
  local entry = cost_entry(fields, now)
  entry.ticket = self.id
  entry.dedupe = entry.dedupe or ("ticket:" .. self.id)
  -- a call that cost something, however little (under half a micro-dollar
  -- rounds to 0): its row is written; settle(0) writes none
  entry.charged = actual > 0
  self.done = true -- (a guard that would release it on a cancel has nothing left to do)
  stop_keeping(self)
  if self.store then owner_drop(backend_of[self.store], self.id) end
  local s, serr = store_of(self)
  if not s and actual == 0 then return true end -- (unchecked, no store yet: no hold, no row to undo)
  if not s then -- (unchecked: the store still cannot be opened) tried again as one it refused
    settle_later(self, entry, fields)
    if fields.wait == false then return true end
    serr.retrying = true
    return nil, serr
  end
  if fields.wait == false and write_later(backend_of[s], "budget_settle", fields,
    { budget = self.budget.name, ticket = self.id, usd = actual }, self.id, entry) then
    observe_end(self, actual)
    count_overrun(self, actual)
    return true
  end
  -- a caller canceled while the store has it (a client that left, a
  -- deadline) may have been answered or not: the settle is tried again in a
  -- task of its own, kept once per ticket (the row and the hold both lost
  -- before)
  local write <close> = setmetatable({ ticket = self, entry = entry, fields = fields }, settle_guard)
  settling[self] = { s, entry }
  local ok, err = backend_of[s]:budget_settle(self.id, entry)
  settling[self] = nil
  write.seen = true
  if ok and actual > 0 then costs.observe(fields, fields.units) end
  if ok == nil and resil.is_error(err) and err.kind == "store_unavailable" then
    settle_later(self, entry, fields, err.sent)
    err.retrying = true
  end
  if ok or (err and err.retrying) then
    observe_end(self, actual)
    count_overrun(self, actual)
  end
  return ok, err
end

-- ticket:charge(actual_usd [, cost fields]) -> as settle: a further cost of
-- the same call, in the same budget and period, with a row of its own (an
-- attempt the provider billed whose answer was refused as invalid output).
-- It is settled as a ticket that was never held: nothing to free, spent
-- grows by `actual` whether or not the budget has room left (it was paid).
function Ticket:charge(actual, e)
  if not is_usd(actual) then error("ticket:charge: actual must be a number from 0 to 1e9", 2) end
  if e ~= nil and type(e) ~= "table" then error("ticket:charge: cost fields must be a table or nil", 2) end
  ticket_seq = ticket_seq + 1
  -- (named after the call's ticket: the store counts it in the period that ticket is in, which a
  -- period switch may have changed since it was reserved)
  local extra = new_ticket(("%s:charge:%d"):format(self.id, ticket_seq), self.budget,
    { period = self.period, per = self.per, estimate = 0, store = self.store, hold = self.hold })
  charge_parent[extra] = self
  return extra:settle(actual, e)
end

-- A release the store did not take (unavailable: a frozen or restarting Redis, SQLite's lock held
-- past the timeout; or its caller canceled while the store had it) is tried again in a task of
-- its own, for a minute at most, as a settle is: a call that ended costing nothing (a gateway
-- client that left, a job that failed, a retry's hold) kept its money held until the hold's end,
-- ten minutes by default, with nobody left to free it. Kept once: a held ticket only.
local function release_later(backend, t)
  local ok, err = S.retry_write(function() return backend:budget_release(t.id) end)
  if ok ~= nil then
    t.releasing = nil
    if ok then observe_end(t, 0) end
    return
  end
  resil.log.error("budget: a hold given back could not be released; it counts until its end",
    { budget = t.budget.name, ticket = t.id, error = tostring(err) })
end
local release_guard = { __close = function(w)
  if not w.seen then spawn(release_later, w.backend, w.ticket) end
end }

-- ticket:release() -> true | false (nothing held) | nil, err{retrying = true} (tried again, above)
function Ticket:release()
  self.done = true
  stop_keeping(self)
  if not self.store then return false end -- (unchecked before the store could be opened: nothing held)
  local backend = backend_of[self.store]
  owner_drop(backend, self.id)
  self.releasing = true -- (for resil_close, below, until the store has taken it)
  local write <close> = setmetatable({ backend = backend, ticket = self }, release_guard)
  local ok, err = backend:budget_release(self.id)
  write.seen = ok ~= nil or not (resil.is_error(err) and err.kind == "store_unavailable")
  if ok ~= nil then self.releasing = nil end
  if ok then observe_end(self, 0) end
  if not write.seen then err.retrying = true end
  return ok, err
end

-- (only the host's objects as self: the weak tables name them, store.lua's genuine_only)
private.genuine_only(Budget, function(self) return name_of[self] ~= nil end, "budget", "budget")
private.genuine_only(Ticket, function(self) return ticket_id[self] ~= nil end, "ticket", "ticket")

-- For `resil-lua budgets`: the budgets a store knows, their limits (set from
-- the command line, else the script's) and usage in the current period.
local admin = {}

local function describe(backend, cfg, now)
  local limit_micro, per, source = cfg.limit_micro, cfg.per, "set"
  if not limit_micro then limit_micro, per, source = cfg.declared_micro, cfg.declared_per, cfg.source or "script" end
  if per == "none" then per = nil end
  local period = period_of(per, now)
  -- (a look: read where the store can, SQLite's budget_view, waiting for no other process's writer)
  local spent, reserved, rows, in_period
  if backend.budget_view then spent, reserved, rows = backend:budget_view(cfg.name, period, now)
  else spent, reserved, rows, in_period = backend:budget_usage(cfg.name, period, now, owner.me().id) end
  if spent == nil then return nil, reserved end
  period = in_period or period -- (Redis: the server's clock's period)
  local holds = {}
  for i, h in ipairs(rows) do
    holds[i] = { ticket = h.ticket, usd = from_micro(h.micro_usd), owner = h.owner and owner.describe(h.owner),
                 expires_at = h.expires_at, age = h.created_at and now - h.created_at or nil }
  end
  local limit = limit_micro and from_micro(limit_micro)
  return { name = cfg.name, limit = limit, per = per or "none", period = period, source = limit and source or nil,
           spent = from_micro(spent), reserved = from_micro(reserved),
           -- (in micro-dollars, as the store keeps them: $0.01 - $0.00972 read 0.00028000000000000073)
           remaining = limit and from_micro(math.max(0, limit_micro - spent - reserved)) or nil, holds = holds }
end

-- -> { {name=, limit=, per=, period=, spent=, reserved=, remaining=, holds = {...}}, ... } | nil, err
function admin.list(s)
  local now = store_now()
  local rows, err = backend_of[s]:budget_list()
  if not rows then return nil, err end
  local out = {}
  for _, cfg in ipairs(rows) do
    local d, derr = describe(backend_of[s], cfg, now)
    if not d then return nil, derr end
    out[#out + 1] = d
  end
  return out
end

-- (cfg: its settings when the caller read them, a key's budget from the key's record among them)
function admin.show(s, name, cfg)
  local err
  if not cfg then cfg, err = backend_of[s]:budget_config(name) end
  if cfg == nil and err then return nil, err end
  cfg = cfg or {}
  cfg.name = name
  return describe(backend_of[s], cfg, store_now())
end

-- release a budget's holds in its current period (stale: only those whose owner is gone) -> how many
-- the period kind a budget's stored settings put in force: the command line's, else the script's
local function per_in_force(s, name)
  local cfg = backend_of[s]:budget_config(name) or {}
  return cfg.limit_micro and cfg.per or cfg.declared_per or "none"
end

function admin.release(s, name, stale)
  local now = store_now()
  return backend_of[s]:budget_release_holds(name, period_of(per_in_force(s, name), now), stale, now, owner.me().id)
end

-- Set a budget's limit and period. A new period kind counts what the ledger
-- holds for it so far, whatever period each cost was charged under: a
-- budget of 50/day made 500/month on the 20th starts at the month's spend,
-- not at zero (it let the month spend 500 on top of what the days had).
function admin.set(s, name, limit, per)
  per = per or "none"
  local now = store_now()
  local was = per_in_force(s, name)
  local carry = was ~= per and carry_of(was, per, now) or nil
  local ok, err = backend_of[s]:budget_set(name, to_micro(limit), per, now, carry)
  -- a gateway key's budget: its record says it too (a key made without --budget had none, and
  -- the gateway reserved nothing for it: the limit set went unenforced)
  local key = ok and name:match("^key:(.+)$")
  if key then
    local n, kerr = require("resil.keys").set_budget(key, limit, per, s)
    if not n then return nil, kerr end
  end
  return ok, err
end

-- resil_close (embed_give_up): the holds of tickets neither settled nor released (and of
-- reservations whose tasks never resumed with their tickets) are given up,
-- as a process's stop counting when it dies. Kept, a closed host's counted against the budget
-- until their end (`hold`, 600 s by default) in this live process. -> true | nil, err (the first)
debug.getregistry()["resil.budgets.close"] = function()
  local first, failed = nil, {}
  -- a settle the store was taking (SQLite's queue, freed at its close): written now, as the paid
  -- call's cost it is (it was lost: the spend never counted, its hold did until its end)
  for t, w in pairs(settling) do
    local b = backend_of[w[1]]
    local err = b.budget_settle_now and S.at_close(failed, b, "budget_settle_now", t.id, w[2])
    first = first or err or nil
  end
  for t in pairs(on_store) do
    local err = (not t.done or t.releasing) and S.at_close(failed, backend_of[t.store], "budget_release_now", t.id)
    first = first or err or nil
  end
  -- a reservation sent whose task never resumed (the store's answer in, or still on its way): its
  -- caller never had the ticket to settle or release; abandoned as a canceled caller's is (on Redis
  -- one that arrives after this is refused)
  local now = store_now()
  for g in pairs(unseen) do
    local err = S.at_close(failed, g.backend, "budget_abandon_now", g.budget, g.period, g.id, g.expires_at, now)
    first = first or err or nil
  end
  if first then return nil, first end
  return true
end

return admin
