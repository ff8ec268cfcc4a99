-- The gateway's virtual keys (resil.keys), and `resil-lua keys add | list | revoke`.
--
-- A key is shown once, when it is made, from OpenSSL's random source; the
-- store keeps only its SHA-256, under "gateway:key:<digest>", with the
-- key's name, budget, rate limits and allowed models. The gateway finds a
-- key by its digest, so no comparison of secrets depends on their bytes.
-- "gateway:keys" lists the digests, for `keys list` (`keys add`, `revoke`
-- and `budgets set key:NAME` take turns at rewriting it and the records:
-- one_at_a_time, below).
local resil, private = ...
-- (from the private table, never the resil table: this module loads when first required, maybe
-- after a sandboxed script replaced resil.store, resil.json or a store's methods, and the gateway's
-- key lookups would have read what it said)
local json, store_open, store_now, backend_of = private.json, private.store_open, private.store_now,
  private.backend_of

local keys = {}
local INDEX = "gateway:keys"

local function store()
  local s, err = store_open()
  if not s then return nil, err end
  return s
end

-- The key records are under the store's reserved "gateway:" keys (store.lua), which a sandboxed
-- script's store object refuses: this module reads and writes them through the backend.
local function kv_get(s, key) return backend_of[s]:kv_get(key, store_now()) end
local function kv_set(s, key, value) return backend_of[s]:kv_set(key, value, nil, store_now()) end

-- Making, listing and revoking keys is the operator's (`resil-lua keys`): refused to a sandboxed
-- script, which minted a key every gateway on the store accepted with keys.add. keys.lookup (the
-- gateway's, by a key's digest) is not.
local function operator_only(what)
  if private.sandbox then
    error(("resil.keys.%s is not allowed in the sandbox (resil_options.sandbox, --sandbox): keys are the "
      .. "operator's (resil-lua keys)"):format(what), 3)
  end
end

local function record_key(hash) return "gateway:key:" .. hash end

-- keys.lookup(sha256 hex) -> record | nil (unknown) | nil, err (no store)
function keys.lookup(hash)
  local s, err = store()
  if not s then return nil, err end
  local v, gerr = kv_get(s, record_key(hash))
  if v == nil and gerr ~= nil then return nil, gerr end -- the store failed: not an unknown key
  if v == nil and backend_of[s].lost_check then -- (Redis: a key not found in a store that lost its data)
    local lost = backend_of[s]:lost_check()
    if lost then return nil, lost end
  end
  local rec = type(v) == "string" and json.decode(v)
  return type(rec) == "table" and rec or nil
end

-- -> the index | nil, err (the store failed: never taken for "no keys")
local function index(s)
  local v, err = kv_get(s, INDEX)
  if v == nil and err ~= nil then return nil, err end
  if v == nil then return {} end
  -- one that cannot be read is not an empty one: `keys add` rewrote it with its
  -- key alone, and every other key went on working unlisted and unrevokable
  local list = type(v) == "string" and json.decode(v)
  if type(list) ~= "table" then
    return nil, resil.error("store_corrupt", ("the store's key index (%s) is unreadable; restore it before "
      .. "adding or revoking keys"):format(INDEX))
  end
  return list
end

local function b64url(bytes)
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
  local out = {}
  for i = 1, #bytes, 3 do
    local a, b, c = bytes:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    local chars = #bytes - i + 2 -- 2, 3 or 4 characters
    for k = 1, math.min(4, chars) do
      local v = (n >> (18 - 6 * (k - 1))) & 63
      out[#out + 1] = alphabet:sub(v + 1, v + 1)
    end
  end
  return table.concat(out)
end

-- "50/day" | "10/month" | "5" -> {limit=, per=}
local function parse_budget(v)
  -- (a number as the message writes its most, 1e12, too: tonumber decides what is one)
  local limit, per = tostring(v):match("^%$?([%d.eE+-]+)/(%a+)$")
  if not limit then limit = tostring(v):match("^%$?([%d.eE+-]+)$") end
  limit = tonumber(limit)
  -- (past 1e12, what a budget holds, the key was made and every request it sent was a 500)
  if not limit or limit <= 0 or limit > 1e12 or (per and per ~= "day" and per ~= "month") then
    return nil, ("--budget wants USD (up to 1e12), USD/day or USD/month, not '%s'"):format(tostring(v))
  end
  -- (a limit the ledger holds as $0 was kept so, and every request of the key refused as over it)
  if require("resil.costs").below_unit(limit) then
    return nil, ("--budget %s is below the ledger's unit, $0.000001: a key with it could spend nothing"):format(
      tostring(v))
  end
  return { limit = limit, per = per }
end
keys.parse_budget = parse_budget

-- `keys add` rewrites the index (read, then written whole), revoke and
-- set_budget a key's record: two at once each
-- wrote its own entry over the other's, and the lost one was a key that
-- works and that `keys list` and `keys revoke` cannot find (four of ten
-- made at once by a provisioning script); two of one name both found none
-- live. So they take turns, on a counter in the store (the first to count 1
-- has it, until it deletes it; one that died holding it lets go after
-- LOCK_TTL seconds). -> fn's results | nil, err
local LOCK, LOCK_TTL, LOCK_WAIT = INDEX .. ":lock", 10, 20
local holding -- the task that has the turn (its fn's own one_at_a_time: `budgets set` from add_listed)
local function one_at_a_time(s, fn, ...)
  local me = resil.running() or "outside any task"
  if holding == me then return fn(...) end
  local deadline = resil.now() + LOCK_WAIT
  while true do
    local n, err = backend_of[s]:kv_incr(LOCK, 1, LOCK_TTL, store_now())
    if n == nil then return nil, err end
    if n == 1 then break end
    if resil.now() >= deadline then
      return nil, resil.error("store_unavailable", ("another `keys` command held the key index (%s) for %d s; try again")
        :format(LOCK, LOCK_WAIT))
    end
    resil.sleep(0.005 + math.random() * 0.02)
  end
  holding = me
  local r = table.pack(pcall(fn, ...))
  holding = nil
  backend_of[s]:kv_del(LOCK)
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

-- (one_at_a_time) the key made and listed, its name checked against the live keys; set_limit:
-- its --budget set in place of the name's limit, once the name is known free (set before, a
-- refused add changed the live key's limit)
local function add_listed(s, o, budget, set_limit)
  local list, lerr = index(s)
  if not list then return nil, lerr end
  for _, e in ipairs(list) do
    -- the record says whether it was revoked (the index entry does not), so a
    -- name can be used again once its key is revoked: rotating a key
    local live, gerr = nil, nil
    if e.name == o.name then live, gerr = keys.lookup(e.hash) end
    if gerr then return nil, gerr end
    if live and not live.revoked then
      return nil, resil.error("exists", ("a live key is named '%s' already (revoke it first)"):format(o.name))
    end
  end
  if set_limit then
    local ok, serr = require("resil.budgets").set(s, "key:" .. o.name, budget.limit, budget.per)
    if not ok then return nil, serr end
  end
  local key = "sk-resil-" .. b64url(resil.crypto.random(32))
  local hash = resil.crypto.sha256(key)
  local rec = { id = "key_" .. hash:sub(1, 12), name = o.name, hash = hash, budget = budget,
    rpm = o.rpm, tpm = o.tpm, concurrency = o.concurrency, models = o.models, created = resil.clock.wall() }
  -- the index first: a record written without its entry would be a key
  -- that works and that `keys list` and `keys revoke` cannot find; an entry
  -- without its record is skipped (and its key was never shown)
  list[#list + 1] = { id = rec.id, name = rec.name, hash = hash }
  local ok, serr = kv_set(s, INDEX, json.encode(list))
  if not ok then return nil, serr end
  ok, serr = kv_set(s, record_key(hash), json.encode(rec))
  if not ok then return nil, serr end
  return key, rec
end

-- A key's name is in every list of keys (one record the gateway reads and each add rewrites), its
-- budget's name, its error messages and `keys list`'s column: a name of megabytes (a file's
-- content given by mistake, `--name "$(cat ...)"`) was taken, and made each of them that large.
local NAME_MAX = 64

-- keys.add{name=, budget="50/day" | {limit=, per=}, rpm=, tpm=, concurrency=, models={...}} -> key, record | nil, err
function keys.add(o)
  operator_only("add")
  if type(o) ~= "table" or type(o.name) ~= "string" or not o.name:match("^[%w_.:%-]+$") then
    error("keys.add: name must be letters, digits, _ . : -", 2)
  end
  if #o.name > NAME_MAX then
    error(("keys.add: name must be at most %d characters, not %d"):format(NAME_MAX, #o.name), 2)
  end
  -- (a revoke takes a name or an id: a key named like another's id was revoked with it)
  if o.name:match("^[Kk][Ee][Yy]_" .. ("%x"):rep(12) .. "$") then
    error("keys.add: name must not have the form of a key's id (key_ and 12 hex digits)", 2)
  end
  if o.concurrency ~= nil and (math.type(o.concurrency) ~= "integer" or o.concurrency < 1) then
    error("keys.add: concurrency must be a positive integer", 2)
  end
  -- (an empty list is a key no request may use: a typo's, `--models "$UNSET"`)
  if o.models ~= nil and (type(o.models) ~= "table" or o.models[1] == nil) then
    error("keys.add: models must list at least one model (leave it out for any)", 2)
  end
  -- ('*' is no model's name: `--models '*'` made a key every request was refused with, which `keys
  -- list` showed as "*", as it shows a key that may use any)
  for _, m in ipairs(o.models or {}) do
    if m == "*" then
      return nil, resil.error("bad_option", "models: '*' is no model's name: leave models out (--models) for a key "
        .. "that may use any")
    end
  end
  -- (the budget read before the store is opened: one refused left an empty store made where it
  -- was typed)
  local budget, err = o.budget, nil
  if type(budget) == "string" or type(budget) == "number" then
    budget, err = parse_budget(budget)
    if not budget then return nil, resil.error("bad_option", err) end
  end
  local s
  s, err = store()
  if not s then return nil, err end
  -- A limit set for the name's budget already (`budgets set key:NAME` before the key, or for a
  -- key revoked since) is the key's when it is made without --budget: without one in its record
  -- the gateway reserved nothing and the limit went unenforced. Made with --budget, the key's is
  -- set in its place: the old one overrode it (a key listed at $100/day was held at $0).
  local cfg, cerr = backend_of[s]:budget_config("key:" .. o.name)
  if cfg == nil and cerr ~= nil then return nil, cerr end
  local set_limit = false
  if cfg and cfg.limit_micro then
    if budget == nil then
      budget = { limit = cfg.limit_micro / 1e6, per = cfg.per ~= "none" and cfg.per or nil }
    elseif math.floor(budget.limit * 1e6 + 0.5) ~= cfg.limit_micro or (budget.per or "none") ~= cfg.per then
      set_limit = true
    end
  end
  return one_at_a_time(s, add_listed, s, o, budget, set_limit)
end

-- each live key of the index match(entry) names: its record changed by change(rec) and written
-- -> how many | nil, err (the store failed: those before the failure are written)
local function update_live(s, match, change)
  local list, lerr = index(s)
  if not list then return nil, lerr end
  local n = 0
  for _, e in ipairs(list) do
    if match(e) then
      local rec, gerr = keys.lookup(e.hash)
      if gerr then return nil, gerr end
      if rec and not rec.revoked then
        change(rec)
        local ok, serr = kv_set(s, record_key(e.hash), json.encode(rec))
        if not ok then return nil, serr end
        n = n + 1
      end
    end
  end
  return n
end

-- keys.set_budget(name, limit, per [, store]) -> how many live keys named so now carry
-- that budget | nil, err. `budgets set key:NAME` on a key made without
-- --budget set a limit the gateway never reserved against (it reserves only
-- for a key whose record has a budget); the record now says it, and `keys
-- list` shows the limit in force.
local function set_budget(s, name, limit, per)
  return update_live(s, function(e) return e.name == name end,
    function(rec) rec.budget = { limit = limit, per = per ~= "none" and per or nil } end)
end
-- (in turn with revoke: a record read before a revoke and written after it made the key live again)
function keys.set_budget(name, limit, per, st)
  operator_only("set_budget")
  local s, err = st, nil
  if not s then s, err = store() end
  if not s then return nil, err end
  return one_at_a_time(s, set_budget, s, name, limit, per)
end

-- keys.list() -> records (revoked ones too), oldest first
function keys.list()
  operator_only("list")
  local s, err = store()
  if not s then return nil, err end
  local list, lerr = index(s)
  if not list then return nil, lerr end
  local out = {}
  for _, e in ipairs(list) do
    local rec, gerr = keys.lookup(e.hash)
    if gerr then return nil, gerr end
    if rec then out[#out + 1] = rec end
  end
  return out
end

-- keys.revoke(name or id) -> how many keys were revoked | nil, err (the
-- store failed: a key said to be revoked must be; those before the failure are)
local function revoke(s, which)
  return update_live(s, function(e) return e.name == which or e.id == which end,
    function(rec) rec.revoked = resil.clock.wall() end)
end
function keys.revoke(which)
  operator_only("revoke")
  local s, err = store()
  if not s then return nil, err end
  return one_at_a_time(s, revoke, s, which)
end

---------------------------------------------------------------------------
-- the command

local function fail(fmt, ...)
  io.stderr:write("resil-lua: keys: ", resil.redact(fmt:format(...)), "\n")
  os.exit(1)
end

local function count(v, flag)
  -- (decimal digits only: tonumber read 0x10 as 16 and 1e3 as 1000)
  local n = type(v) == "string" and v:match("^%d+$") and math.tointeger(tonumber(v))
  if not n or n <= 0 then fail("%s wants a positive whole number, not '%s'", flag, tostring(v)) end
  return n
end

local USAGE = "usage: resil-lua keys add --name NAME [--budget USD[/day|/month]] [--rpm N] [--tpm N] "
  .. "[--concurrency N] [--models a,b]\n       resil-lua keys list [--json]\n       resil-lua keys revoke NAME|ID"

function keys.main(args)
  local cmd = args[1]
  -- (list took anything after it, and revoke a second name, silently: `revoke a b` revoked a alone)
  local takes = cmd == "list" and (args[2] == "--json" and 2 or 1) or cmd == "revoke" and 2 or nil
  if takes and args[takes + 1] ~= nil then fail("unexpected argument '%s'\n%s", args[takes + 1], USAGE) end
  if cmd == "list" or cmd == "revoke" then
    -- a SQLite path with no store there (a typo, another working directory) is named, not made
    -- there and read as "no keys" (add makes the store: the first key may come before the gateway)
    local _, err = store_open(nil, { existing = true })
    if err then fail("%s", tostring(err)) end
  end
  if cmd == "add" then
    local o, i = {}, 2
    while args[i] do
      local a, v = args[i], args[i + 1]
      if v == nil then fail("%s needs a value", a) end
      if a == "--name" then o.name = v
      elseif a == "--budget" then o.budget = v
      elseif a == "--rpm" then o.rpm = count(v, a)
      elseif a == "--tpm" then o.tpm = count(v, a)
      elseif a == "--concurrency" then o.concurrency = count(v, a)
      elseif a == "--models" then
        o.models = {}
        for m in v:gmatch("[^,%s]+") do o.models[#o.models + 1] = m end
        if not o.models[1] then fail("--models wants the models the key may use, a,b (leave it out for any)") end
      else fail("unknown option '%s'\n%s", a, USAGE) end
      i = i + 2
    end
    if not o.name or not o.name:match("^[%w_.:%-]+$") then fail("add needs --name (letters, digits, _ . : -)") end
    if #o.name > NAME_MAX then fail("--name is %d characters long: a key's name is at most %d", #o.name, NAME_MAX) end
    if o.name:match("^[Kk][Ee][Yy]_" .. ("%x"):rep(12) .. "$") then
      fail("--name '%s' has the form of a key's id: `keys revoke` would take it for one", o.name)
    end
    local key, rec = keys.add(o)
    -- (a refusal of what was typed is its message; the store's trouble keeps its kind)
    if not key then fail("%s", (rec.kind == "bad_option" or rec.kind == "exists") and rec.message or tostring(rec)) end
    -- the only time the key is shown; the store keeps its digest
    -- one that could not be shown (keys add > FILE on a full disk) is revoked: it stayed live, its
    -- secret held by nobody, and its name refused to the next add ("a live key is named ... already")
    local shown, werr = io.stdout:write(key, "\n")
    if shown then shown, werr = io.stdout:flush() end -- (print's own flush hid its failure from a later one)
    if not shown then
      local revoked, rerr = keys.revoke(rec.id)
      fail("the key could not be written (%s); %s", tostring(werr), revoked and
        ("key %s (%s) was revoked: add it again"):format(rec.id, rec.name) or
        ("revoke key %s (%s): %s"):format(rec.id, rec.name, tostring(rerr)))
    end
    io.stderr:write(("key %s (%s) made; it is not shown again\n"):format(rec.id, rec.name))
  elseif cmd == "list" then
    local list, err = keys.list()
    if not list then fail("%s", tostring(err)) end
    if args[2] == "--json" then
      for _, r in ipairs(list) do r.hash = nil end
      print(#list > 0 and json.encode(list) or "[]")
      return
    end
    if #list == 0 then print("no keys") return end
    -- Columns as wide as their widest cell (a name is up to 64 characters: fixed widths pushed a long
    -- one's row out of line), numbers as typed (%g wrote 20000000 as 2e+07), and a control
    -- character in a model's name written as an escape, as `runs` and `costs` print theirs.
    local function number(v) return (("%.6f"):format(v):gsub("%.?0+$", "")) end
    local printable = private.printable -- (C1 controls too: a CSI in UTF-8 acted as ESC [)
    local rows = { { "ID", "NAME", "STATUS", "BUDGET", "RPM", "TPM", "CONC", "MODELS" } }
    for _, r in ipairs(list) do
      local b = r.budget and ("$%s%s"):format(number(r.budget.limit), r.budget.per and ("/" .. r.budget.per) or "") or "-"
      rows[#rows + 1] = { r.id, r.name, r.revoked and "revoked" or "active", b, r.rpm and number(r.rpm) or "-",
        r.tpm and number(r.tpm) or "-", r.concurrency and ("%d"):format(r.concurrency) or "-",
        r.models and printable(table.concat(r.models, ",")) or "*" }
    end
    local widths = {}
    for _, row in ipairs(rows) do
      for i, v in ipairs(row) do widths[i] = math.max(widths[i] or 0, #v) end
    end
    for _, row in ipairs(rows) do
      for i = 1, #row - 1 do row[i] = row[i] .. (" "):rep(widths[i] - #row[i]) end
      print(table.concat(row, "  "))
    end
  elseif cmd == "revoke" then
    local which = args[2] or fail("revoke needs a key's name or id")
    local n, err = keys.revoke(which)
    if not n then fail("%s", tostring(err)) end
    if n == 0 then fail("no live key named '%s'", which) end
    print(("revoked %d key%s"):format(n, n == 1 and "" or "s"))
  else
    fail("%s", USAGE)
  end
end

return keys
