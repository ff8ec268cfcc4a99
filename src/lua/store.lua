-- The persistent store: resil.store() (key/value with TTL) and
-- resil.store_config. The backend is chosen by URL: a file path for SQLite
-- (default .resil/state.db), redis://host:port/db for Redis; each implements
-- the same compound operations atomically (src/lua/store_sqlite.lua,
-- src/lua/store_redis.lua). What is built on the store has a module each:
-- once.lua, runs.lua, costs.lua, budgets.lua, limits.lua (shared limits);
-- this module returns what they share.
local resil, private = ... -- (private: what the host's modules alone hold, src/resil.c)
local json = resil.json
-- (a copy of its functions for the host's modules loaded later, keys.lua's lookups among them: by
-- then a script may have replaced what resil.json holds)
private.json = {}
for k, v in pairs(json) do private.json[k] = v end
json = private.json -- (this module's own calls too)
-- (taken now, before any script runs: a script may replace what the resil table holds, and
-- one that replaced resil.background was handed each store's backend)
local background = resil.background
local sleep, running, resolve = resil.sleep, resil.running, resil.sqlite.resolve

-- who holds a run, a once key or a budget hold, and whether they are alive
local owner = require "resil.owner"

-- each backend is compiled when a store first uses it, not at start-up; its open is left in the
-- private table (what its module returns, a script may require and change)
local backends = setmetatable({}, { __index = function(t, name)
  require("resil.store_" .. name)
  local open = private["open_" .. name]
  t[name] = open
  return open
end })

-- A store's backend, by store: the host's modules' only way to it. The backend holds the raw db
-- (SQLite) or connection (Redis), and the store object is a script's (resil.store()): carried
-- on it, a sandboxed script ran its own SQL in the host's store, deleting the ledger's rows, or
-- sent its Redis any command. Outside the sandbox (specs, tools) it is the registry's
-- "resil.private".backend_of.
local backend_of = setmetatable({}, { __mode = "k" })
private.backend_of = backend_of

local config = { url = nil, run = nil, fresh = false, script = nil, args = nil, wait = false }

-- Time on the store is epoch seconds that follow the host clock (so the
-- virtual clock drives expiries in specs, and processes agree in real use).
-- (resil.now taken now: a script that replaced it moved the time every host record is written
-- with, other processes' too: a lease, a budget's period, a key's expiry)
-- (private.store_clock: resil.now() but for the lead a virtual clock leaves on the real one, which
-- keeps resil.now() from going back; the store's time is the wall clock's again on real time, as
-- other processes sharing the store have it)
-- On real time it is the wall clock itself, read each time: anchored at the start and carried on
-- the monotonic clock, a process started before the machine's clock was stepped (NTP at boot, a
-- VM resumed) kept the old time for good, and on a SQLite store the holds of a gateway worker an
-- hour behind had ended for every process started after the step (a $1 budget let $1.30 in).
local mono = private.store_clock or resil.now
local is_virtual, wall = resil.clock.is_virtual, resil.clock.wall
local wall0, mono0 = wall(), mono()
local function store_now()
  if not is_virtual() then return wall() end
  return wall0 + (mono() - mono0)
end
resil.store_now = store_now
private.store_now = store_now -- (for owner.lua, loaded before it, and keys.lua, loaded later)
-- the virtual clock's lead over the real one (a spec's; nil on a real clock), for the Redis backend's
-- leases' clock: that backend loads after scripts may run, and a script that replaced resil.clock's
-- functions or resil.store_now had its process judge every other host's lease lapsed
function private.clock_lead() if is_virtual() then return store_now() - wall() end end

-- The stores open, by URL as given and by the key of what it names (store_key)
local opened = {}

-- A store URL is a file path (SQLite), sqlite://PATH, redis:// or
-- rediss://; anything else that looks like a URL is a mistake, not a file
-- name (`ftp://x` would make a folder `ftp:`).
local function check_url(url, level)
  if type(url) ~= "string" then -- (resil.store(true) raised "attempt to index a boolean value" at a line of the host's)
    error(("store: the URL must be a string (a file path, sqlite://PATH or redis://host:port/db), got %s"):format(
      type(url)), level + 1)
  end
  local scheme = url:match("^(%a[%w+.-]*)://")
  if scheme and scheme ~= "sqlite" and scheme ~= "redis" and scheme ~= "rediss" then
    error(("store: unknown URL scheme '%s' in '%s' (use a file path, sqlite://PATH or redis://host:port/db)"):format(
      scheme, url), level + 1)
  end
  -- SQLite takes an empty name for a temporary database, deleted at exit: every step, once record
  -- and ledger row written there was lost without a word
  if (not scheme or scheme == "sqlite") and url:gsub("^sqlite://", ""):match("^[^?]*") == "" then
    error(("store: '%s' names no file (a SQLite store is a path, by default .resil/state.db)"):format(url),
      level + 1)
  end
end

-- Under the sandbox, a script names no SQLite file outside the folders it may
-- write in (the host's own store excepted): said at its line. (Kept here:
-- a script may replace what the resil table holds.)
local sandbox_check = resil.sqlite.check_store_file
local function check_file(url, level)
  if url:match("^rediss?://") then return end
  sandbox_check(url:gsub("^sqlite://", ""):match("^[^?]*"), "store", level + 1)
end

-- One store per file in a process, whatever URL names it: x.db, ./x.db, sqlite://x.db and its
-- absolute path (or one through a symlinked folder) each opened a connection to one file, each with
-- its own group commit (taking the file's write lock from the others), sweeper and sync thread. A
-- SQLite store's key is its file, resolved (resil.sqlite.resolve: the file may not be there yet); a
-- Redis store's its URL with the default port and database written out. Options (?timeout=) are
-- part of the key: a URL that asks for others is a store of its own, as it was.
local function store_key(url)
  local scheme, rest = url:match("^(rediss?)://(.*)$")
  if scheme then
    local userinfo, server = rest:match("^(.*@)(.*)$") -- (a password may hold '@': the last one ends it)
    local host, port, db, query = (server or rest):match("^([^:/?]+):?(%d*)/?(%d*)(.*)$")
    if not host or not (query == "" or query:match("^%?")) then return url end -- (its open says why)
    return ("%s://%s%s:%s/%s%s"):format(scheme, userinfo or "", host, port ~= "" and port or "6379",
      db ~= "" and db or "0", query ~= "?" and query or "")
  end
  local path, query = url:gsub("^sqlite://", ""):match("^([^?]*)%??(.*)$")
  if path == ":memory:" or path:match("^file:") then return url end -- (no file, or SQLite's own URI)
  local file = resolve(path)
  if not file then return url end
  return query ~= "" and file .. "?" .. query or file
end

local SANDBOX_LEASE = { 5, 300 }
-- The run a script's steps go to is the host's: src/resil.c's start_main sets script, args and
-- script_path after the sandbox is on, through private.store_config_host (no script reaches it);
-- the CLI's --run and --fresh and resil_options' run_id and fresh are set before it. A sandboxed
-- script's store_config naming them named another pipeline's run on the store, its step results
-- replayed or planted (run=), or wiped (fresh=).
local HOST_FIELDS = { "run", "fresh", "script", "args", "script_path", "journal" }
function private.store_config_host(c)
  for k, v in pairs(c) do config[k] = v end
  -- (a copy: the table is the script's arg, and the run's default id is made from it later)
  if type(c.args) == "table" then config.args = table.move(c.args, 1, #c.args, 1, {}) end
end

-- resil.store_config{url=, run=, fresh=, script=, args=, wait=, lease=}: set by the CLI and
-- embedders. wait: when another live process holds the run, wait for it (true, or at most
-- that many seconds) instead of stopping. lease: seconds a holder on another machine is
-- trusted without a heartbeat (renewed every third of it).
function resil.store_config(c)
  if type(c) ~= "table" then error("resil.store_config: expects a table", 2) end
  if c.wait ~= nil and type(c.wait) ~= "boolean" and not (type(c.wait) == "number" and c.wait >= 0) then
    error("resil.store_config: wait must be true, false or a number of seconds >= 0", 2)
  end
  if c.lease ~= nil and not (type(c.lease) == "number" and c.lease > 0) then
    error("resil.store_config: lease must be a number of seconds > 0", 2)
  end
  -- Under the sandbox the lease is bounded: a holder's lease of a year kept its once keys, runs and
  -- budget holds from every other machine for a year after it died (and one of a millisecond
  -- renewed it in a busy loop)
  if private.sandbox and c.lease and (c.lease < SANDBOX_LEASE[1] or c.lease > SANDBOX_LEASE[2]) then
    error(("resil.store_config: lease must be %d to %d seconds in the sandbox"):format(SANDBOX_LEASE[1],
      SANDBOX_LEASE[2]), 2)
  end
  if private.sandbox then
    for _, k in ipairs(HOST_FIELDS) do
      if c[k] ~= nil then
        error(("resil.store_config: %s is not allowed in the sandbox: the run is the host's (--run, --fresh, " ..
          "resil_options.run_id and fresh)"):format(k), 2)
      end
    end
  end
  -- (what names the store and the run, checked here: a table or a number raised later inside the
  -- host, "[resil store]:67: attempt to index a number value", at the store's open or the first step)
  for _, k in ipairs({ "url", "run", "script", "script_path", "journal" }) do
    local v = c[k]
    if v ~= nil and v ~= false and type(v) ~= "string" and not (k == "run" and type(v) == "number") then
      error(("resil.store_config: %s must be a string, not a %s"):format(k, type(v)), 2)
    end
  end
  -- (an empty run id, `--run "$ID"` with ID unset, named one run for every command given it: each
  -- replayed the step results of the one that ran first, another job's, as its own)
  if c.run == "" then
    error("resil.store_config: the run id is empty (--run, resil_options.run_id): every command given it would "
      .. "share one run, each replaying another's step results", 2)
  end
  if c.args ~= nil then
    local ok = type(c.args) == "table"
    for _, a in ipairs(ok and c.args or {}) do ok = ok and (type(a) == "string" or type(a) == "number") end
    if not ok then error("resil.store_config: args must be a list of strings (the script's arguments)", 2) end
  end
  local ok, err = true, nil
  if c.url then ok, err = pcall(check_url, c.url, 3) end
  if ok and c.url then ok, err = pcall(check_file, c.url, 3) end
  -- ... and the store is the host's (opts.store, --store): pointed elsewhere, the process's ledger
  -- rows and budget holds went to a store the script chose (the operator's limits not read, its
  -- spend not seen) and a gateway in the process took keys from it
  if ok and c.url and private.sandbox and c.url ~= config.url then
    error(("resil.store_config: url is not allowed in the sandbox: the store is the host's " ..
      "(resil_options.store, --store); resil.store(url) opens another"), 2)
  end
  for k, v in pairs(c) do
    if ok or k ~= "url" then config[k] = v end
  end
  if c.lease then owner.lease = c.lease end
  if not ok then error(err, 0) end
end

-- The store URL's query -> {timeout=, down=, down_max=} | nil, message.
-- ?timeout=SECONDS: how long any operation may wait (a frozen Redis,
-- another process's SQLite write lock) before it returns nil,
-- err{kind="store_unavailable"}. Redis only, for the store's down state
-- (its operations fail at once after one timed out, or a connection could
-- not be made, until a probe is answered; src/store_redis.c): ?down=SECONDS
-- from the first probe to the next, doubling while probes get no answer up
-- to ?down_max=SECONDS (down=0: never down).
local DEFAULT_TIMEOUT = 5
local OPTIONS = { sqlite = { "timeout" }, redis = { "timeout", "down", "down_max" } } -- (in the order errors name them)
for _, names in pairs(OPTIONS) do
  for _, name in ipairs(names) do names[name] = true end
end
local function store_options(query, url, kind)
  local o, known = { timeout = DEFAULT_TIMEOUT }, OPTIONS[kind]
  -- (each part: one without '=', ?timeout or ?tiemout, was passed over, and the store waited 5 s)
  for part in (query or ""):gmatch("[^&]+") do
    local k, v = part:match("^([^=]*)=(.*)$")
    if not k then
      return nil, ("store %s: option '%s' has no value (%s=SECONDS)"):format(url, part,
        known[part] and part or "timeout")
    end
    if not known[k] then
      return nil, ("store %s: unknown option '%s' (known: %s)"):format(url, k, table.concat(known, ", "))
    end
    local n = tonumber(v)
    if k == "timeout" and not (n and n > 0 and n <= 86400) then
      return nil, ("store %s: timeout must be a number of seconds in (0, 86400], got '%s'"):format(url, v)
    elseif not (n and n >= 0 and n <= 86400) then
      return nil, ("store %s: %s must be a number of seconds in [0, 86400], got '%s'"):format(url, k, v)
    end
    o[k] = n
  end
  if o.down_max and o.down ~= 0 and o.down_max < (o.down or 1) then -- (1: the C side's default down)
    return nil, ("store %s: down_max must be at least down"):format(url)
  end
  return o
end
resil.store_options = store_options
-- (the backends, loaded on a store's first use, take these here: not what a script left in resil)
private.store_options, private.sleep, private.running = store_options, sleep, running
private.redact = resil.redact -- (a script's was handed the Redis store's URL, its password in it)

-- (an empty RESIL_STORE, as a compose file's ${STORE} leaves it, is unset, as the sandbox reads it)
local function default_url()
  local env = os.getenv("RESIL_STORE")
  return config.url or (env ~= "" and env) or ".resil/state.db"
end

-- resil.store([url]) -> the store (one per URL per host)
local Store = {}
Store.__index = Store
-- (getmetatable(store) is not its methods: a script that replaced one had the host's own modules
-- call it, the gateway's key records read through it)
Store.__metatable = false
-- (the sandbox's rawset refuses the host's objects by their metatables: src/lua/prelude.lua)
private.host_metatables = private.host_metatables or {}
private.host_metatables[Store] = true
-- (nor is a method set on the object itself, which is every caller's: `store.get = f` had the
-- host's own modules call f as the metatable's did)
Store.__newindex = function(_, k)
  error(("a store object's fields are the host's: %s cannot be set"):format(tostring(k)), 2)
end

-- A SQLite store sweeps what has expired (its backend's sweep: kv keys past
-- their TTL, once records, old budget holds) once a minute while the process
-- runs, as Redis expires its keys itself: a gateway's file grew for good
-- with every cached answer, Idempotency-Key and budgeted request. A task
-- that does not keep the process running. A backlog goes in chunks of 100
-- rows of each table, a commit each, with a pause between: the loop runs
-- SQLite's deletes (1.5 ms a chunk of 2 KB rows; chunks of 1,000 back to
-- back held it 12-29 ms each until the backlog was gone). While a sweep
-- finds nothing the next comes twice as late, up to an hour (what has
-- expired is not read meanwhile, only kept): on the virtual clock a sleep
-- of a year was 525,600 commits of nothing, seconds of real time.
local SWEEP_EVERY, SWEEP_IDLE_EVERY, SWEEP_ROWS, SWEEP_PAUSE = 60, 3600, 100, 0.01
local function sweeper(backend)
  local pause = SWEEP_EVERY
  while true do
    sleep(pause)
    local swept = 0
    while true do
      local n = backend:sweep(store_now(), SWEEP_ROWS)
      swept = swept + (n or 0)
      if not n or n < SWEEP_ROWS then break end
      sleep(SWEEP_PAUSE)
    end
    pause = swept > 0 and SWEEP_EVERY or math.min(pause * 2, SWEEP_IDLE_EVERY)
  end
end

-- A Redis that evicts keys when it reaches its maxmemory drops what the
-- store must keep: a gateway's keys (a valid key answered 401), a budget's
-- spend (reset) and holds (a reserved total left with no hold to free it),
-- once records (a call run and billed twice). Said once, at the store's
-- first use, when the server answers (a server down then is not asked again).
local function check_eviction(backend)
  backend:eviction_policy(function(max, policy)
    if max > 0 and policy ~= "noeviction" then
      resil.log.warn("redis: the server evicts keys at its maxmemory (maxmemory-policy " .. policy .. "): keys, " ..
        "budgets' spend and holds and idempotency records may vanish; set maxmemory-policy noeviction",
        { store = resil.redact(backend.url), maxmemory = max, policy = policy })
    end
  end)
end

-- A store being opened, by URL: { done = true, err = } once its open has ended. Opening a
-- SQLite file waits for another process's lock in a task (migrate's sleeps), and a second
-- task asking meanwhile (a gateway's first requests, all at once) opened a connection of its
-- own: two group commits of one process fighting for the file's write lock, two sweepers,
-- and a read on one connection that did not see what the other had queued. The others wait
-- for the first instead (its pauses, as migrate's), and get its store or its error.
local opening = {}
local opening_ended = { __close = function(o)
  o.done = true
  if opening[o.key] == o then opening[o.key] = nil end
end }

-- Each waiter gets an error of its own, with the same fields: a caller marks the one it got (costs'
-- and budgets' err.retrying = true for a write tried again later), and a waiter handed that same
-- table read another's row as tried again when its own was dropped.
local function own_error(err)
  if type(err) ~= "table" then return err end
  local copy = {}
  for k, v in pairs(err) do copy[k] = v end
  return setmetatable(copy, getmetatable(err))
end

local function open_store(url, key, opts)
  local reading = opts and opts.existing -- (a command that reads the store: it writes no journal to it)
  local backend, err
  if url:match("^redis://") or url:match("^rediss://") then
    backend, err = backends.redis(url)
    if backend then check_eviction(backend) end
  else
    local path, query = url:gsub("^sqlite://", ""):match("^([^?]*)%??(.*)$")
    local o, terr = store_options(query, url, "sqlite")
    if not o then return nil, resil.error("store_unavailable", terr) end
    for k, v in pairs(opts or {}) do o[k] = v end
    if o.existing then
      o.existing = nil
      local f = io.open(path, "rb")
      if not f then
        return nil, resil.error("store_unavailable", ("no store at %s (nothing was recorded there; --store or " ..
          "RESIL_STORE names the store, by default .resil/state.db in the working directory)"):format(path))
      end
      f:close()
    end
    backend, err = backends.sqlite(path, o)
    if backend then background(sweeper, backend) end
  end
  if not backend then return nil, err end
  local s = setmetatable({ url = url, kind = backend.kind }, Store)
  backend_of[s] = backend
  opened[key] = s
  opened[url] = s
  -- (what a process before this one kept for it, written to it first: src/lua/journal.lua)
  if reading then require("resil.journal").reading(key, url)
  else require("resil.journal").opened(backend, key, url) end
  return s
end

-- opts (first open only): group_commit = false commits each operation alone; existing = true
-- opens a SQLite file only if it is there (the commands that read the store: a mistyped path
-- is named, not made into an empty store that reads as "nothing spent"). A store named by several
-- URLs (store_key) has its first open's (s.url, in its messages).
-- The store resil.store() without a URL opened, under the config.url it was asked with: every
-- ledger row and budget asks for it (a getenv each, some 900 instructions). RESIL_STORE
-- is the process's from its start, as the sandbox reads it (src/resil.c); a store_config with
-- another URL is a new default.
local default_store, default_store_config
local function open(url, opts)
  local by_default = url == nil
  if by_default then
    if default_store and default_store_config == config.url then return default_store end
    url = default_url()
  end
  local s = opened[url]
  if s then
    if by_default then default_store, default_store_config = s, config.url end
    return s
  end
  check_url(url, 2)
  check_file(url, 2)
  local key = store_key(url)
  s = opened[key]
  if s then
    opened[url] = s
    return s
  end
  -- (a loop: when the first is canceled, one of its waiters opens it and the others wait for that one)
  while opening[key] and running() and coroutine.isyieldable() do
    local first, pause = opening[key], 0.001
    while not first.done do
      sleep(pause)
      pause = math.min(pause * 2, 0.05)
    end
    if opened[key] then return opened[key] end
    if first.err then return nil, own_error(first.err) end
  end
  local o <close> = setmetatable({ key = key }, opening_ended)
  opening[key] = o
  local err
  s, err = open_store(url, key, opts)
  o.err = own_error(err) -- (kept as it was made: the first caller may mark its own before the waiters wake)
  return s, err
end
-- (the host's modules open the store with this one, never resil.store: a script that replaced
-- that had every ledger row, budget hold and once record of its process written where it said,
-- and the gateway's keys looked up there)
resil.store = open
private.store_open = open

local function store_or_raise(level)
  local s, err = open()
  if not s then error(tostring(err), level + 1) end
  return s
end

-- The store, or nil, err{kind="store_unavailable"}: a store that cannot be
-- opened (a corrupt file, a bad URL) is trouble from the world, not misuse.
local function store_or_fail()
  local s, err = open()
  if s then return s end
  if not resil.is_error(err) then err = resil.error("store_unavailable", tostring(err)) end
  return nil, err
end

-- The store for a write tried again (costs' and budgets' retries of what was recorded before it
-- could be opened): an open that failed is not tried again within a second, since each such
-- write tries on its own (2,000 rows made 14,000 open attempts in 5 s of a refused open)
local failed_open = {}
local function store_for_retry()
  local url = default_url()
  local failed = failed_open[url]
  if failed and mono() < failed.till then return nil, failed.err end
  local s, err = store_or_fail()
  failed_open[url] = not s and { till = mono() + 1, err = err } or nil
  return s, err
end

-- key/value for policies' own state. Misuse raises at the caller's line: a
-- NaN TTL was a key kept for good on SQLite and a store_error on Redis, a
-- string one an error from inside the backend
-- a bad value as the message shows it: the string "60" is not the number 60
local function shown(v)
  if type(v) == "string" then return ("the string %q"):format(#v > 40 and v:sub(1, 40) .. "..." or v) end
  return tostring(v)
end

local function check_key(what, key)
  if type(key) ~= "string" and type(key) ~= "number" then
    error(("store:%s: key must be a string, not %s"):format(what, type(key)), 3)
  end
end
local function check_ttl(what, ttl)
  if ttl ~= nil and (type(ttl) ~= "number" or not (ttl > 0 and ttl < math.huge)) then
    error(("store:%s: ttl must be a number of seconds > 0, or nil for none, not %s"):format(what, shown(ttl)), 3)
  end
end

-- The kv keys the host keeps its own records under, in every store: a sandboxed script neither
-- reads nor writes them through a store object (it wrote "gateway:key:<sha256>" and minted a
-- virtual key every gateway on the store accepted, or read the key index). The host's modules
-- reach them through the backend (private.backend_of); outside the sandbox the script is the
-- operator's, as `resil-lua keys` is. What else is in a store (once records, runs, the ledger,
-- budgets, shared limits, owners' leases) is in tables (SQLite) or keys (Redis: resil:once:...)
-- of its own, never reached through kv (Redis's are "resil:kv:" .. key).
--   gateway:  the gateway's virtual keys (keys.lua): gateway:key:<sha256>, gateway:keys (the
--             index), gateway:keys:lock
--   ai:cache: policies.ai's cached answers: a script computed a key (ai.wire_request is exported,
--             the hash reproducible) and set a forged answer every caller on the store was served.
--             policies.ai reaches them through private.ai_cache, which the host hands it alone at
--             its load (prelude's owning_loader), not through a store object
--   models:migration: the model registry's migrations (policies/registry.lua): each call's
--             outcome per side and the rollback; a script set `<key>:rolled_back` and every process
--             on the store sent the alias to its old model (or deleted it: a rollback undone).
--             policies.registry reaches them through private.migrations, handed as ai's is
local RESERVED = { "gateway:", "ai:cache:", "models:migration:" }
local function check_reserved(what, key)
  if type(key) ~= "string" then return end
  for i = 1, #RESERVED do
    local prefix = RESERVED[i]
    if key:sub(1, #prefix) == prefix then
      error(("store:%s: key %q is the host's own (keys under %q are reserved): a sandboxed script cannot "
        .. "read or write it (resil_options.sandbox, --sandbox)"):format(what, #key > 80 and key:sub(1, 80) .. "..." or key,
        prefix), 3)
    end
  end
end

function Store:get(key)
  check_key("get", key)
  if private.sandbox then check_reserved("get", key) end
  return backend_of[self]:kv_get(key, store_now())
end
function Store:set(key, value, ttl)
  check_key("set", key)
  if private.sandbox then check_reserved("set", key) end
  if type(value) ~= "string" then error("store:set: value must be a string (encode tables with resil.json)", 2) end
  check_ttl("set", ttl)
  return backend_of[self]:kv_set(key, value, ttl, store_now())
end
function Store:del(key)
  check_key("del", key)
  if private.sandbox then check_reserved("del", key) end
  return backend_of[self]:kv_del(key)
end
function Store:incr(key, n, ttl)
  check_key("incr", key)
  if private.sandbox then check_reserved("incr", key) end
  if n ~= nil and (type(n) ~= "number" or n ~= n or n == math.huge or n == -math.huge) then
    error(("store:incr: n must be a finite number, not %s"):format(shown(n)), 2)
  end
  check_ttl("incr", ttl)
  return backend_of[self]:kv_incr(key, n or 1, ttl, store_now())
end
function Store:stats() return backend_of[self]:stats() end

-- policies.ai's cache (the reserved ai:cache: keys): the third argument of its chunk, kept there
-- as an upvalue. open is the host's (a script may replace resil.store); the value and TTL are
-- policies.ai's own (a string, a TTL cache_ok checked).
local function host_kv_get(s, key) return backend_of[s]:kv_get(key, store_now()) end
local function host_kv_set(s, key, value, ttl) return backend_of[s]:kv_set(key, value, ttl, store_now()) end
private.ai_cache = { open = store_or_fail, get = host_kv_get, set = host_kv_set }

-- policies.registry's migrations (the reserved models:migration: keys): the third argument of its
-- chunk, as ai's cache. memory: its copy while the store is down, kept across reloads here (a
-- resil.keep table is any script's); host_only(what) raises under the sandbox (a rollback undone)
private.migrations = {
  open = store_or_fail,
  get = host_kv_get,
  set = host_kv_set,
  incr = function(s, key, n, ttl) return backend_of[s]:kv_incr(key, n or 1, ttl, store_now()) end,
  del = function(s, key) return backend_of[s]:kv_del(key) end,
  memory = {},
  host_only = function(what)
    if private.sandbox then
      error(("%s is not allowed in the sandbox: the host's (resil_options.sandbox, --sandbox)"):format(what), 3)
    end
  end,
}

-- private.genuine_only(class, is_ours, prefix, noun): each method of the host's class refuses a
-- self that is_ours(self) says is not the host's object. The methods of budgets, tickets and
-- shared limits take the store's names from `self`: one called with a table of a script's own as
-- self ({ name = "key:team" } with its budget as __index, or b.reserve(t)) reserved, settled or
-- took in a gateway key's budget or rate past the reserved names. (A tail call keeps the caller's
-- levels for the methods' errors.)
function private.genuine_only(class, is_ours, prefix, noun)
  for k, f in pairs(class) do
    if type(f) == "function" and not (type(k) == "string" and k:sub(1, 2) == "__") then
      class[k] = function(self, ...)
        if not is_ours(self) then error(("%s:%s: self is not a %s of the host's"):format(prefix, k, noun), 2) end
        return f(self, ...)
      end
    end
  end
end

-- ---------- values in and out of the store ----------

local null = json.null

-- Secrets are never written to the store: a result holding a value read
-- through resil.secret is refused, not redacted (a redacted copy would be
-- replayed as if it were the result). resil.redact(s, "secrets") returns s
-- itself when s holds none, so this is one scan per stored value.
local SECRET_STORED = "they contain a value read through resil.secret (secrets are never written to the store)"
local function holds_secret(text) return resil.redact(text, "secrets") ~= text end

-- Values are stored exactly (record format x = 1): a resumed run gets what
-- the first run got. cjson alone wrote every number with 14 digits (a
-- journaled random or clock, an id past 2^47 came back changed) and every
-- table as an array or an object (integer keys came back strings, holes
-- null). So numbers JSON would change are tagged ({"@i": "digits"} for
-- integers past 1e14, {"@f": "%a"} for floats %.14g does not give back, or
-- that are whole), and a table that is neither a sequence nor string-keyed
-- is its pairs ({"@t": [[k, v], ...]}). Strings are capped: cjson's buffer
-- overflows (a crash) near 358 MB.
local MAX_STORED_BYTES = 32 * 1024 * 1024 -- (written as JSON twice on Redis: up to 6x each time)
local TAGS = { ["@i"] = true, ["@f"] = true, ["@t"] = true, ["@e"] = true, ["@error"] = true }

-- (numbers and tables count too, at about their JSON: 16 bytes a number, 2 a table; a step's
-- array of 16 million numbers was taken whole, for cjson to overflow writing it)
local NUMBER_BYTES, TABLE_BYTES = 16, 2
local function count_bytes(budget, n)
  budget.bytes = budget.bytes + n
  if budget.bytes > MAX_STORED_BYTES then
    error(("more than %d MB as JSON"):format(MAX_STORED_BYTES // (1024 * 1024)), 0)
  end
end

local function exact(v, depth, path, budget)
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then error("a number that is NaN or infinite", 0) end
    count_bytes(budget, NUMBER_BYTES)
    if math.type(v) == "integer" then
      if v > -1e14 and v < 1e14 then return v end
      return { ["@i"] = tostring(v) }
    end
    if v ~= math.floor(v) and tonumber(("%.14g"):format(v)) == v then return v end
    return { ["@f"] = ("%a"):format(v) }
  elseif t == "string" then
    count_bytes(budget, #v)
    return v
  elseif t ~= "table" then
    return v -- (booleans, json.null; anything else cjson refuses with its own words)
  end
  if path[v] then error("a cyclic table", 0) end
  if depth > 200 then error("tables nested more than 200 deep", 0) end
  -- (an object's methods come back on the first run only: a resumed run got a plain table,
  -- and its first method call failed there, after a crash; a JSON array's mark is kept)
  local mt = getmetatable(v)
  if mt ~= nil and mt ~= json.array_mt and not resil.is_error(v) then -- (an error is its fields, as it was)
    error("a table with a metatable (an object's methods are not stored: return its plain data)", 0)
  end
  count_bytes(budget, TABLE_BYTES)
  if mt and next(v) == nil then return setmetatable({}, json.array_mt) end
  path[v] = true
  local n, strings, others, top = 0, true, false, 0
  for k in pairs(v) do
    n = n + 1
    if type(k) ~= "string" or TAGS[k] then strings = false end
    if math.type(k) ~= "integer" or k < 1 then others = true
    elseif k > top then top = k end
  end
  local out
  if n > 0 and not others and top == n then -- a sequence: the keys are 1..n, no hole
    out = {}
    for i = 1, n do out[i] = exact(v[i], depth + 1, path, budget) end
  elseif strings then -- string keys (or empty): an object
    out = {}
    for k, x in pairs(v) do
      count_bytes(budget, #k)
      out[k] = exact(x, depth + 1, path, budget)
    end
  else
    local pairs_of = {}
    for k, x in pairs(v) do
      pairs_of[#pairs_of + 1] = { exact(k, depth + 1, path, budget), exact(x, depth + 1, path, budget) }
    end
    out = { ["@t"] = pairs_of }
  end
  path[v] = nil
  return out
end

-- -> JSON text | nil, why
-- (a memory cap reached as they are copied or encoded: said so, not as a value JSON cannot hold,
-- "they must be JSON values: not enough memory", of a string that is one)
local OUT_OF_MEMORY = "not enough memory"
local OUT_OF_MEMORY_WHY = "the process's memory cap (--max-memory) was reached as they were encoded"
local function encode_values(r, first)
  local values = {}
  local budget = { bytes = 0 }
  for i = first, r.n do
    local v = r[i]
    local is_error = resil.is_error(v)
    if is_error then
      local fields = {}
      for k, x in pairs(v) do if type(x) ~= "table" and type(x) ~= "function" then fields[k] = x end end
      v = fields
    end
    local ok, e = pcall(exact, v, 0, {}, budget)
    if not ok and e == OUT_OF_MEMORY then return nil, OUT_OF_MEMORY_WHY end
    if not ok then return nil, "they hold " .. tostring(e) end
    if is_error then e = { ["@e"] = e } end -- (a user's own "@e" key is escaped by exact)
    if e == nil then e = null end
    values[#values + 1] = e
  end
  local ok, text = pcall(json.encode, { n = r.n - first + 1, v = values, x = 1 })
  if not ok and text == OUT_OF_MEMORY then return nil, OUT_OF_MEMORY_WHY end
  if not ok then return nil, "they must be JSON values: " .. tostring(text) end
  -- (the count above is the values' own bytes: a control byte is six as JSON, \u0001, and 8 MB
  -- of them were a 48 MB record; the limit is the text's)
  if #text > MAX_STORED_BYTES then
    return nil, ("they hold more than %d MB as JSON"):format(MAX_STORED_BYTES // (1024 * 1024))
  end
  if holds_secret(text) then return nil, SECRET_STORED end
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

-- A stored record back into values: -> {n=, ...} | nil, why. A record that
-- is not one this module wrote (a corrupt file, a hand-edited key) is refused
-- rather than half read: the caller reports the store unavailable.
-- the exact format's tags back into values (and cjson's floats into the
-- integers they were)
local function unexact(v, depth)
  if type(v) == "number" then return math.tointeger(v) or v end
  if type(v) ~= "table" or depth > 256 then return v end
  local i, f, t = v["@i"], v["@f"], v["@t"]
  if type(i) == "string" and next(v, next(v)) == nil then return math.tointeger(tonumber(i)) end
  if type(f) == "string" and next(v, next(v)) == nil then return tonumber(f) end
  if type(t) == "table" and next(v, next(v)) == nil then
    local out = {}
    for _, kv in ipairs(t) do
      local k = type(kv) == "table" and unexact(kv[1], depth + 1)
      if k ~= nil and k ~= null then out[k] = unexact(kv[2], depth + 1) end
    end
    return out
  end
  for k, x in pairs(v) do v[k] = unexact(x, depth + 1) end
  return v
end

local MAX_VALUES = 250 -- more results than Lua's stack could return
local function decode_values(text)
  local t, jerr
  if type(text) == "string" then t, jerr = json.decode(text) end
  if type(t) ~= "table" then
    -- (a record a version before the limit wrote deeper: said so, not "not JSON")
    if jerr and tostring(jerr):find("too many nested", 1, true) then
      return nil, ("nested more than %d levels deep (resil.json.max_depth; a version before the limit wrote it)")
        :format(json.max_depth or 200)
    end
    return nil, "not JSON"
  end
  local exact_format = t.x == 1
  if exact_format then t.n = math.tointeger(t.n) else t = integers(t, 0) end -- (records from before it)
  if math.type(t.n) ~= "integer" or t.n < 0 or t.n > MAX_VALUES or type(t.v) ~= "table" then
    return nil, "not a record of values"
  end
  local out = { n = t.n }
  for i = 1, t.n do
    local v = t.v[i]
    if v == null then v = nil end
    local e = exact_format and type(v) == "table" and v["@e"]
    if type(e) == "table" and next(v, next(v)) == nil then
      v = unexact(e, 0)
      v = resil.error(type(v.kind) == "string" and v.kind or "error",
        type(v.message) == "string" and v.message or "stored error", v)
    elseif exact_format then
      v = unexact(v, 0)
    elseif type(v) == "table" and v["@error"] ~= nil then
      local f = v["@error"]
      if type(f) ~= "table" then return nil, "a stored error that is not a table" end
      v = resil.error(type(f.kind) == "string" and f.kind or "error",
        type(f.message) == "string" and f.message or "stored error", f)
    end
    out[i] = v
  end
  return out
end

-- A write the store refused (unavailable: SQLite's lock held past the
-- timeout, a frozen Redis) that must not be lost (a paid call's settle, a
-- once record): write() tried again, backing off from 50 ms to 2 s, until the
-- store answers or a minute has gone. In a task of the caller's; -> write()'s
-- last results (nil, err when the store never took it).
-- Its attempts are sent to a Redis store that is down too (src/store_redis.c, sends_when_down), each
-- waiting its timeout: a frozen server runs them as it thaws, after what they follow.
local RETRY_FOR = 60
local sends_when_down = setmetatable({}, { __mode = "k" })
debug.getregistry()["resil.redis.sends_when_down"] = sends_when_down
local sending_ended = { __close = function(o) sends_when_down[o.co] = nil end }
local function retry_write(write)
  local pause, deadline = 0.05, mono() + RETRY_FOR
  local ok, err
  local co = coroutine.running()
  sends_when_down[co] = true
  local _ <close> = setmetatable({ co = co }, sending_ended)
  repeat
    sleep(pause)
    pause = math.min(pause * 2, 2)
    ok, err = write()
  until ok ~= nil or mono() + pause > deadline
  return ok, err
end

-- resil_close's writes (once.lua, budgets.lua): backend[method](backend, ...) at once, without the
-- loop, unless that store failed one already this close (each try on a frozen Redis waits a second
-- or two: 40 keys and holds took 40 s). -> the failure (the store marked in `failed`) | nil
local function at_close(failed, backend, method, ...)
  if failed[backend] then return nil end
  local ok, done, err = pcall(backend[method], backend, ...)
  if ok and (done ~= nil or err == nil) then return nil end
  failed[backend] = true
  return ok and err or done
end

-- (runs.lua reads the settings here; a script's require gives this table too, and the settings
-- themselves were writable there under the sandbox: run= and lease= past store_config's checks)
local config_view = setmetatable({}, {
  __index = config,
  __newindex = function(_, k, v)
    if private.sandbox then
      error(("resil.store.config.%s cannot be set in the sandbox: use resil.store_config"):format(tostring(k)), 2)
    end
    config[k] = v
  end,
  __pairs = function() return next, config, nil end,
  __metatable = false,
})

-- what the modules built on the store share (not a public API)
return {
  retry_write = retry_write,
  at_close = at_close,
  config = config_view,
  now = store_now,
  open = store_or_fail,
  open_for_retry = store_for_retry,
  url = default_url,
  key = store_key,
  open_or_raise = store_or_raise,
  encode_values = encode_values,
  decode_values = decode_values,
  holds_secret = holds_secret,
  shown = shown,
}
