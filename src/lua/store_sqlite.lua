-- The SQLite backend: every compound operation is one function run inside
-- the group transaction (src/store_sqlite.c), so it is atomic across tasks
-- and, through BEGIN IMMEDIATE, across processes sharing the file.
-- Money is integer micro-dollars so that sums are exact.
local resil, private = ... -- (private: what the host's modules alone hold, src/resil.c)
local owner = require "resil.owner"
local unwatched = require("resil.core.watchdog").unwatched
-- (the host's, from the private table: loaded on a store's first use, not what a script left in resil)
local now, sleep, running = private.store_now, private.sleep, private.running
local json = private.json

local migrations = {
  [[
  CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT, expires_at REAL);
  CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, state TEXT NOT NULL,
    owner TEXT, locked_at REAL, result TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL);
  CREATE INDEX idempotency_expiry ON idempotency(expires_at);
  CREATE TABLE runs (id TEXT PRIMARY KEY, script TEXT, status TEXT NOT NULL, steps INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
  CREATE TABLE steps (run TEXT NOT NULL, scope TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL,
    result TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (run, scope, seq));
  CREATE TABLE costs (id INTEGER PRIMARY KEY, dedupe TEXT UNIQUE, at REAL NOT NULL, day TEXT NOT NULL,
    provider TEXT, model TEXT, operation TEXT, user TEXT, run TEXT, step TEXT,
    micro_usd INTEGER NOT NULL, units TEXT, budget TEXT, period TEXT, ticket TEXT UNIQUE);
  CREATE INDEX costs_budget ON costs(budget, period);
  CREATE INDEX costs_day ON costs(day);
  CREATE TABLE reservations (ticket TEXT PRIMARY KEY, budget TEXT NOT NULL, period TEXT NOT NULL,
    micro_usd INTEGER NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL);
  CREATE INDEX reservations_budget ON reservations(budget, period, state, expires_at);
  CREATE TABLE gcra (key TEXT PRIMARY KEY, tat REAL NOT NULL);
  CREATE TABLE breakers (name TEXT PRIMARY KEY, open_until REAL, probe_until REAL, opened INTEGER NOT NULL DEFAULT 0);
  ]],
  -- 2: a run started over with --fresh is a new generation: what it records
  -- (costs inside steps) must not be taken for the earlier generation's
  [[
  ALTER TABLE runs ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
  ]],
  -- 3: ownership (src/lua/owner.lua): each process's heartbeat-renewed lease;
  -- the holder of a run and of a budget hold
  [[
  CREATE TABLE owners (id TEXT PRIMARY KEY, expires_at REAL NOT NULL);
  ALTER TABLE runs ADD COLUMN owner TEXT;
  ALTER TABLE runs ADD COLUMN owner_since REAL;
  ALTER TABLE reservations ADD COLUMN owner TEXT;
  ]],
  -- 4: runs people can read: the steps that failed (with their error) or
  -- were cut short in the run's last attempt, retries per step, the item a
  -- cost belongs to, and the arguments that resume the run
  [[
  CREATE TABLE unfinished_steps (run TEXT NOT NULL, scope TEXT NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL,
    state TEXT NOT NULL, error TEXT, retries INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL,
    PRIMARY KEY (run, scope, seq));
  ALTER TABLE steps ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
  ALTER TABLE costs ADD COLUMN item TEXT;
  ALTER TABLE runs ADD COLUMN args TEXT;
  ]],
  -- 5: budgets people can manage: a limit set from the command line (seen by
  -- every process) over the one the script declares, and each hold's start
  [[
  CREATE TABLE budgets (name TEXT PRIMARY KEY, limit_micro INTEGER, per TEXT, set_at REAL,
    declared_micro INTEGER, declared_per TEXT, declared_at REAL);
  ALTER TABLE reservations ADD COLUMN created_at REAL;
  ]],
  -- 6: a call without a price is a row with micro_usd NULL (SQLite cannot
  -- drop a NOT NULL constraint: the table is rebuilt, rows and ids kept)
  [[
  CREATE TABLE costs_v6 (id INTEGER PRIMARY KEY, dedupe TEXT UNIQUE, at REAL NOT NULL, day TEXT NOT NULL,
    provider TEXT, model TEXT, operation TEXT, user TEXT, run TEXT, step TEXT,
    micro_usd INTEGER, units TEXT, budget TEXT, period TEXT, ticket TEXT UNIQUE, item TEXT);
  INSERT INTO costs_v6 (id, dedupe, at, day, provider, model, operation, user, run, step, micro_usd, units, budget,
    period, ticket, item) SELECT id, dedupe, at, day, provider, model, operation, user, run, step, micro_usd, units,
    budget, period, ticket, item FROM costs;
  DROP TABLE costs;
  ALTER TABLE costs_v6 RENAME TO costs;
  CREATE INDEX costs_budget ON costs(budget, period);
  CREATE INDEX costs_day ON costs(day);
  ]],
  -- 7: run reports (`runs show --html`): when each step started, and what
  -- happened inside it (attempt latencies by provider, retries and fallbacks
  -- by class) as JSON
  [[
  ALTER TABLE steps ADD COLUMN started REAL;
  ALTER TABLE steps ADD COLUMN detail TEXT;
  ALTER TABLE unfinished_steps ADD COLUMN started REAL;
  ALTER TABLE unfinished_steps ADD COLUMN detail TEXT;
  ]],
  -- 8: an insert into the ledger wrote five B-trees (the table, two UNIQUE
  -- keys, the budget index and an index on day no query reads). The keys
  -- and the budget index now hold only the rows that have them (most rows
  -- have no ticket and no budget) and the day index is gone: a gateway's row
  -- writes two. SQLite cannot drop a UNIQUE constraint: the table is rebuilt.
  [[
  CREATE TABLE costs_v8 (id INTEGER PRIMARY KEY, dedupe TEXT, at REAL NOT NULL, day TEXT NOT NULL,
    provider TEXT, model TEXT, operation TEXT, user TEXT, run TEXT, step TEXT,
    micro_usd INTEGER, units TEXT, budget TEXT, period TEXT, ticket TEXT, item TEXT);
  INSERT INTO costs_v8 (id, dedupe, at, day, provider, model, operation, user, run, step, micro_usd, units, budget,
    period, ticket, item) SELECT id, dedupe, at, day, provider, model, operation, user, run, step, micro_usd, units,
    budget, period, ticket, item FROM costs;
  DROP TABLE costs;
  ALTER TABLE costs_v8 RENAME TO costs;
  CREATE UNIQUE INDEX costs_dedupe ON costs(dedupe) WHERE dedupe IS NOT NULL;
  CREATE UNIQUE INDEX costs_ticket ON costs(ticket) WHERE ticket IS NOT NULL;
  CREATE INDEX costs_budget ON costs(budget, period) WHERE budget IS NOT NULL;
  ]],
  -- 9: what B:sweep deletes is found by an index: kv keys past their TTL
  -- and reservations past their hold
  [[
  CREATE INDEX IF NOT EXISTS kv_expiry ON kv(expires_at) WHERE expires_at IS NOT NULL;
  CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations(expires_at);
  ]],
  -- 10: a budget's spend in a period is kept as a total, by triggers on every
  -- write to the ledger (the queued rows' inserts included). Each reservation
  -- summed the period's rows: 0.5 ms a reserve and settle after 1,000 rows of a
  -- day, 4.4 ms after 20,000, on the loop (a gateway key with a budget slowed
  -- down all day). (A list: trigger bodies hold ';'.)
  {
    [[CREATE TABLE IF NOT EXISTS budget_spent (budget TEXT NOT NULL, period TEXT NOT NULL, micro_usd INTEGER NOT NULL,
      PRIMARY KEY (budget, period)) WITHOUT ROWID]],
    "DELETE FROM budget_spent",
    [[INSERT INTO budget_spent (budget, period, micro_usd) SELECT budget, period, coalesce(sum(micro_usd), 0)
      FROM costs WHERE budget IS NOT NULL AND period IS NOT NULL GROUP BY budget, period]],
    [[CREATE TRIGGER IF NOT EXISTS costs_spent_insert AFTER INSERT ON costs
      WHEN NEW.budget IS NOT NULL AND NEW.period IS NOT NULL BEGIN
        INSERT INTO budget_spent (budget, period, micro_usd) VALUES (NEW.budget, NEW.period, coalesce(NEW.micro_usd, 0))
          ON CONFLICT (budget, period) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd;
      END]],
    [[CREATE TRIGGER IF NOT EXISTS costs_spent_update AFTER UPDATE OF budget, period, micro_usd ON costs BEGIN
        UPDATE budget_spent SET micro_usd = micro_usd - coalesce(OLD.micro_usd, 0)
          WHERE budget = OLD.budget AND period = OLD.period;
        INSERT INTO budget_spent (budget, period, micro_usd)
          SELECT NEW.budget, NEW.period, coalesce(NEW.micro_usd, 0) WHERE NEW.budget IS NOT NULL AND NEW.period IS NOT NULL
          ON CONFLICT (budget, period) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd;
      END]],
    [[CREATE TRIGGER IF NOT EXISTS costs_spent_delete AFTER DELETE ON costs
      WHEN OLD.budget IS NOT NULL AND OLD.period IS NOT NULL BEGIN
        UPDATE budget_spent SET micro_usd = micro_usd - coalesce(OLD.micro_usd, 0)
          WHERE budget = OLD.budget AND period = OLD.period;
      END]],
  },
  -- 11: a shared bucket's arrival time with the store time it was written at (gcra_take's
  -- tat_of): a clock stepped back since then is told, and the arrival time is moved back with
  -- it (NULL, a row written before: taken as it is). (A function: SQLite has no ADD COLUMN IF
  -- NOT EXISTS, and a migration may run again over its own work, as the ones before can.)
  function(tx)
    if tx:value("SELECT count(*) FROM pragma_table_info('gcra') WHERE name = 'at'") == 0 then
      tx:exec("ALTER TABLE gcra ADD COLUMN at REAL")
    end
  end,
}

local B = {}
B.__index = B

-- Another program's database (a --store typo): tables, and the schema version 0 that no store has once
-- it has any (the first migration sets 1 in the transaction that makes them). Decided here, under the
-- write lock: the open's look before it (src/store_sqlite.c, foreign_database) could find the file busy,
-- or empty as its program was writing its first tables, and the schema went into that program's file.
local FOREIGN = "store: %s is another program's SQLite database (it has tables and no store schema); " ..
  "not made a store"

local function apply_migrations(tx, path)
  local version = tx:value("PRAGMA user_version")
  if version > #migrations then -- (a newer resil-lua's file: trouble from the world, said without our line)
    error(resil.error("store_unavailable", ("store %s has schema version %d; this resil-lua knows up to %d " ..
      "(a newer resil-lua wrote it)"):format(path, version, #migrations)))
  end
  if version == 0 and tx:value("SELECT EXISTS (SELECT 1 FROM sqlite_master)") == 1 then
    error(resil.error("store_unavailable", FOREIGN:format(path)))
  end
  for v = version + 1, #migrations do
    local m = migrations[v]
    if type(m) == "function" then
      m(tx)
    elseif type(m) == "table" then
      for _, statement in ipairs(m) do tx:exec(statement) end
    else
      for statement in m:gmatch("[^;]+") do
        if statement:match("%S") then tx:exec(statement) end
      end
    end
    tx:exec(("PRAGMA user_version = %d"):format(v))
  end
  return true
end

-- Opening a store whose schema is current takes no lock; a migration takes
-- the write lock, waiting for another process's writer up to the store's
-- timeout (on a timer inside a task, so the loop goes on).
local function read_version(tx) return tx:value("PRAGMA user_version") end

-- (Even a read can find the file busy for a moment, while another process
-- recovers its WAL at open: both steps wait the same way.)
local function migrate(db, path, retry)
  local version, err
  repeat version, err = db:read(read_version) until version ~= nil or not retry(err)
  local ok = version == #migrations
  -- (a file this process may only read, an older resil-lua's: its schema cannot be brought up to
  -- date here, and every command, `costs` and `runs` too, said only "attempt to write a readonly
  -- database")
  if version ~= nil and version > 0 and version < #migrations and db:readonly() then
    return nil, resil.error("store_unavailable", ("store %s has schema version %d, an older resil-lua's; this one " ..
      "needs %d and brings it up to date at its first open, which this process cannot do: it may read the file, " ..
      "not write it (open it once as a user who may write it)"):format(path, version, #migrations))
  end
  if version ~= nil and not ok then
    -- (not timed by the watchdog: rewriting a large ledger's rows takes seconds of SQLite)
    repeat ok, err = unwatched(db.now, db, apply_migrations, path) until ok or not retry(err)
  end
  if version == nil then return nil, err end
  return ok, err
end

-- A store that cannot be read, or whose opener is canceled while it waits for the file's lock, is let
-- go at once: each of a gateway's requests asks again, and each connection left for the collector kept
-- two files and a sync thread (30 failed opens, 61 and 30).
local close_unless_kept = { __close = function(o) if not o.kept then o.db:close() end end }

-- The open waits for another process holding the file (a new file's switch to WAL, the schema's
-- write lock, a read while that process recovers its WAL) up to the store's timeout: in a task on
-- timers, each try returning at once when the file is busy (a new file's switch to WAL waited in
-- SQLite, the loop stopped, for as long as another process held it); outside one (set-up, the CLI)
-- inside SQLite, as nothing else runs.
local function open(path, opts)
  local timeout = opts and opts.timeout or 5
  local in_task = running() ~= nil and coroutine.isyieldable()
  local deadline, pause = now() + timeout, 0.001
  local function retry(err)
    if not (err and err.busy and in_task and now() + pause < deadline) then return false end
    sleep(pause)
    pause = math.min(pause * 2, 0.05)
    return true
  end
  local o = { store = true, wait = in_task and 0 or timeout }
  for k, v in pairs(opts or {}) do o[k] = v end
  local db, err
  -- (the host's own opener: resil.sqlite.open refuses the host's store to a sandboxed script)
  repeat db, err = private.sqlite_open(path, o) until db or not retry(err)
  if not db then return nil, err end
  local opening <close> = setmetatable({ db = db }, close_unless_kept)
  if not in_task then db:blocking(true) end
  local ok, merr = migrate(db, path, retry)
  if not in_task then db:blocking(false) end
  if not ok then return nil, merr end
  opening.kept = true
  return setmetatable({ db = db, path = path, kind = "sqlite", timeout = timeout,
    in_memory = db:in_memory() }, B)
end

function B:stats() return self.db:stats() end

-- A write at once, without the loop's group commit (db:now): the run's end, and what resil_close
-- gives up or writes. Another process's write lock (its group commit, a moment) is waited for up to
-- the store's timeout, as the queue's writes are: outside a task inside SQLite, as nothing else runs
-- (the command's end, resil_close); in a task (os.exit, resil.run.finish) on timers. It failed at
-- once, "database is locked": the run stayed "running" with its holder gone, a hold or a settle
-- resil_close had to write was not.
local function write_now(self, ...)
  local db = self.db
  if running() == nil or not coroutine.isyieldable() then
    db:blocking(true)
    local r = table.pack(pcall(db.now, db, ...))
    db:blocking(false)
    if not r[1] then error(r[2], 0) end
    return table.unpack(r, 2, r.n)
  end
  local deadline, pause = now() + self.timeout, 0.001
  while true do
    local r = table.pack(db:now(...))
    if not (r[1] == nil and type(r[2]) == "table" and r[2].busy and now() + pause < deadline) then
      return table.unpack(r, 1, r.n)
    end
    sleep(pause)
    pause = math.min(pause * 2, 0.05)
  end
end

-- ---------- ownership ----------

-- This process is alive until lease_until (written by operations that take
-- something, when due, and by the heartbeat); lapsed leases are dropped.
local function renew(tx, me, lease_until)
  if not lease_until then return end
  tx:exec("INSERT INTO owners (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET " ..
          "expires_at = max(expires_at, excluded.expires_at)", me, lease_until)
end

function B:owner_beat(me, lease_until, now)
  return self.db:tx(function(tx)
    renew(tx, me, lease_until)
    tx:exec("DELETE FROM owners WHERE expires_at <= ?", now)
    return true
  end)
end

-- Is the holder alive? On this machine its pid decides (checked here, in
-- the transaction), elsewhere its lease. nil: a holder without identity.
-- (lease: a function that gives the owner's lease, read only for a holder in another process)
local function alive_by(id, lease, now)
  local verdict = owner.verdict(id)
  if verdict == "remote" then
    local expires_at = lease()
    return expires_at ~= nil and expires_at > now
  end
  if verdict == nil then return nil end
  return verdict ~= "dead"
end

local function alive(tx, id, now)
  return alive_by(id, function() return tx:value("SELECT expires_at FROM owners WHERE id = ?", id) end, now)
end

-- A read of what any process wrote: at once, in a read transaction, which in
-- WAL mode never waits for another process's writer (`runs`, `costs` and
-- `budgets` answered "database is locked" after 5 s while a process held the
-- write lock: a long transaction, or one stopped mid-commit). Writes this
-- process queued and has not committed come first (a read that follows a
-- write nobody waited for sees it): then it is read in the next group
-- commit, as is one that finds the file busy (another process recovering
-- its WAL at open).
local function read(self, fn, ...)
  if not self.db:queued() then
    local v, err = self.db:read(fn, ...)
    if not (err and err.busy) then return v, err end
  end
  return self.db:tx(fn, ...)
end

-- A read that may scan without bound (the ledger's sums and rows, the runs): one SELECT, each(row)
-- for its rows. In a task it runs off the loop (db:scan: a thread with a connection of its own,
-- src/sql_reader.c), the task waiting: on the loop, a ledger of 1M rows held every timer, transfer
-- and gateway request of the process for 0.7-1.8 s. Writes this process queued come first, as for
-- read (an empty operation after them). Outside a task (the CLI before its loop), as read.
-- each cannot yield. -> true | nil, err
-- A database in memory (":memory:") is its connection's alone: the thread's would read another, empty
-- one ("no such table: costs"), so its scans run on the loop, as outside a task.
local function scan(self, sql, each, ...)
  if running() == nil or not coroutine.isyieldable() or self.in_memory then
    local args = table.pack(...)
    return read(self, function(tx)
      tx:each(sql, each, table.unpack(args, 1, args.n))
      return true
    end)
  end
  if self.db:queued() then
    local ok, err = self.db:tx(function() return true end)
    if not ok then return nil, err end
  end
  return self.db:scan(sql, each, ...)
end

-- the same, its rows in a table -> rows | nil, err
local function scan_rows(self, sql, ...)
  local rows = {}
  local ok, err = scan(self, sql, function(r) rows[#rows + 1] = r end, ...)
  if not ok then return nil, err end
  return rows
end

-- ---------- key/value ----------

-- A read: it never waits for a writer (another process's long transaction
-- made every gateway key lookup a 503). An expired row is dropped by a write
-- nobody waits for, one that keeps a row set again since.
local function drop_expired(tx, key, now) tx:exec("DELETE FROM kv WHERE key = ? AND expires_at <= ?", key, now) end

function B:kv_get(key, now)
  local row, err = self.db:read(function(tx) return tx:row("SELECT value, expires_at FROM kv WHERE key = ?", key) end)
  if err then return nil, err end
  if row and row.expires_at and row.expires_at <= now then
    self.db:enqueue(nil, drop_expired, key, now)
    return nil
  end
  return row and row.value
end

function B:kv_set(key, value, ttl, now)
  return self.db:tx(function(tx)
    tx:exec("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)", key, value, ttl and now + ttl)
    return true
  end)
end

function B:kv_del(key)
  return self.db:tx(function(tx) return tx:exec("DELETE FROM kv WHERE key = ?", key) > 0 end)
end

function B:kv_incr(key, n, ttl, now)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT value, expires_at FROM kv WHERE key = ?", key)
    local v = 0
    if row and not (row.expires_at and row.expires_at <= now) then
      -- (text that is no number was taken for 0 and written over, where Redis refuses it)
      v = tonumber(row.value)
      if v == nil then
        local k = tostring(key)
        return nil, resil.error("store_error", ("store %s: incr: the value of key %q is not a number"):format(
          self.path, #k > 80 and k:sub(1, 80) .. "..." or k), { key = key })
      end
    end
    v = v + n
    local expires = row and row.expires_at and row.expires_at > now and row.expires_at or (ttl and now + ttl)
    tx:exec("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)", key, tostring(v), expires)
    return v
  end)
end

-- ---------- idempotency ----------

-- Is a running record's holder alive (for one without identity: is the
-- record's own lease fresh)?
local function holder_lives(tx, row, me, lease, now)
  local verdict = row.owner == me or alive(tx, row.owner, now)
  if verdict == nil then return row.locked_at + lease > now end
  return verdict
end

-- -> "claimed" | "done", result | "in_progress", locked_at, holder | "key_reused"
-- A running record is taken over when its holder is dead or, for a holder
-- without identity, when its lease is stale. One held by this very host is
-- in progress: its task is about to run it (store.lua waits for that task).
-- A record that is a failure kept under its key (nil and a permanent error, once.lua): asked with
-- other arguments (the request fixed: a prompt too long made shorter), it is no answer to them and
-- nothing was paid for; they are run. Refused key_reused, the fixed request could not run under its
-- key until the record's retention ran out (a day): a pipeline resumed with it failed at each step.
local function kept_failure(result)
  local t = type(result) == "string" and json.decode(result)
  return type(t) == "table" and type(t.v) == "table" and t.v[1] == json.null and t.v[2] ~= nil and
    t.v[2] ~= json.null
end

function B:once_claim(key, fingerprint, me, lease, retention, now, lease_until)
  return self.db:tx(function(tx)
    renew(tx, me, lease_until)
    local row = tx:row("SELECT * FROM idempotency WHERE key = ?", key)
    if row and row.fingerprint ~= fingerprint and row.state == "done" and kept_failure(row.result) then
      tx:exec("DELETE FROM idempotency WHERE key = ?", key)
      row = nil
    end
    -- a record past its retention is gone, unless its run is still going:
    -- fn running longer than the retention must not run a second time
    if row and row.expires_at <= now and (row.state ~= "running" or not holder_lives(tx, row, me, lease, now)) then
      tx:exec("DELETE FROM idempotency WHERE key = ?", key)
      row = nil
    end
    if row == nil then
      tx:exec("INSERT INTO idempotency (key, fingerprint, state, owner, locked_at, created_at, expires_at) " ..
              "VALUES (?, ?, 'running', ?, ?, ?, ?)", key, fingerprint, me, now, now, now + retention)
      return "claimed"
    end
    if row.fingerprint ~= fingerprint then return "key_reused" end
    if row.state == "done" then return "done", row.result end
    if not holder_lives(tx, row, me, lease, now) then
      tx:exec("UPDATE idempotency SET owner = ?, locked_at = ?, expires_at = max(expires_at, ?) WHERE key = ?",
              me, now, now + retention, key)
      return "claimed", "takeover"
    end
    return "in_progress", row.locked_at, row.owner
  end)
end

-- A read of the key's record, claiming nothing (it never waits for a writer):
-- -> "done", result | "key_reused" | "running" | "none" (none, or one past its retention)
function B:once_peek(key, fingerprint, now)
  local row, err = read(self, function(tx)
    return tx:row("SELECT fingerprint, state, result, expires_at FROM idempotency WHERE key = ?", key)
  end)
  if err then return nil, err end
  if row == nil or (row.state == "done" and row.expires_at <= now) then return "none" end
  if row.fingerprint ~= fingerprint and row.state == "done" and kept_failure(row.result) then return "none" end
  if row.fingerprint ~= fingerprint then return "key_reused" end
  if row.state == "done" then return "done", row.result end
  return "running"
end

function B:once_finish(key, owner, result, retention, now)
  return self.db:tx(function(tx)
    return tx:exec("UPDATE idempotency SET state = 'done', result = ?, locked_at = NULL, expires_at = ? " ..
                   "WHERE key = ? AND owner = ?", result, now + retention, key, owner) > 0
  end)
end

-- A claim whose outcome its caller did not see: nothing to give up here (a
-- transaction that failed did not commit, and a canceled one never runs)
function B:once_abandon() return true end

function B:once_release(key, owner)
  return self.db:tx(function(tx)
    return tx:exec("DELETE FROM idempotency WHERE key = ? AND owner = ? AND state = 'running'", key, owner) > 0
  end)
end

-- resil_close: a claim whose task never resumed (committed, or dropped unwritten with the ops
-- still queued): the running record it may have made, the holder's, given up
function B:once_abandon_now(key, me) return self:once_release_now(key, me) end

-- once_finish at once, without the loop (resil_close: fn ended, its record not yet written)
function B:once_finish_now(key, owner, result, retention, now)
  return write_now(self, function(tx)
    return tx:exec("UPDATE idempotency SET state = 'done', result = ?, locked_at = NULL, expires_at = ? " ..
                   "WHERE key = ? AND owner = ?", result, now + retention, key, owner) > 0
  end)
end

-- the same at once, without the loop (resil_close: a key its closed host ran stayed held for as
-- long as the process lived)
function B:once_release_now(key, owner)
  return write_now(self, function(tx)
    return tx:exec("DELETE FROM idempotency WHERE key = ? AND owner = ? AND state = 'running'", key, owner) > 0
  end)
end

-- What has expired, at most `limit` rows of each table per call (a long
-- backlog goes over several calls, never one long transaction): kv keys
-- past their TTL (otherwise deleted only if read again: a cache's answers
-- stayed for good), once records past their retention, and reservations a
-- day past their hold, whatever their state (none counts any more; a late
-- settle of one finds its ticket in the ledger, or writes it: it is charged
-- either way). A once record still running stays while its holder lives:
-- on this machine by its pid, as once_claim judges it (a holder whose loop
-- was held past a lease by fn still runs fn), elsewhere by its lease; one
-- whose holder has no identity (written by versions before holders were
-- named) goes once past its retention. Swept, a run longer than its
-- retention lost its result and a second caller ran fn again. -> rows
-- deleted | nil, err
local SWEEP_KV = "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_at <= ? LIMIT ?)"
local SWEEP_ONCE = "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency WHERE expires_at <= ? AND " ..
  "state <> 'running' LIMIT ?)"
-- (in no order: the first `limit` could all be live holders' for good)
local EXPIRED_RUNS = "SELECT key, owner FROM idempotency WHERE expires_at <= ? AND state = 'running' " ..
  "ORDER BY random() LIMIT ?"
local SWEEP_HOLDS = "DELETE FROM reservations WHERE ticket IN (SELECT ticket FROM reservations WHERE expires_at <= ? " ..
  "LIMIT ?)"
local HOLDS_KEPT = 86400

-- running records past their retention whose holder is gone (or has no identity) -> how many
local function sweep_runs(tx, now, limit)
  local n = 0
  for _, r in ipairs(tx:rows(EXPIRED_RUNS, now, limit)) do
    if alive(tx, r.owner, now) ~= true then
      n = n + tx:exec("DELETE FROM idempotency WHERE key = ? AND state = 'running' AND owner IS ?", r.key, r.owner)
    end
  end
  return n
end

local function sweep(tx, now, limit)
  return tx:exec(SWEEP_KV, now, limit) + tx:exec(SWEEP_ONCE, now, limit) + sweep_runs(tx, now, limit) +
    tx:exec(SWEEP_HOLDS, now - HOLDS_KEPT, limit)
end
function B:sweep(now, limit) return self.db:commit_only(sweep, now, limit) end

-- as the sweep, all at once
function B:once_reap(now)
  return self.db:tx(function(tx)
    return tx:exec("DELETE FROM idempotency WHERE expires_at <= ? AND state <> 'running'", now) +
      sweep_runs(tx, now, -1)
  end)
end

-- ---------- runs and steps ----------

-- -> steps done, generation | false, holder, since (another live process holds the run)
function B:run_start(id, script, fresh, now, me, lease_until, args)
  return self.db:tx(function(tx)
    renew(tx, me, lease_until)
    local row = tx:row("SELECT * FROM runs WHERE id = ?", id)
    if row and row.owner and row.owner ~= me and alive(tx, row.owner, now) then
      return false, row.owner, row.owner_since
    end
    -- what failed or was cut short last time runs again now
    if row then tx:exec("DELETE FROM unfinished_steps WHERE run = ?", id) end
    if row and fresh then
      tx:exec("DELETE FROM steps WHERE run = ?", id)
      tx:exec("UPDATE runs SET steps = 0, generation = generation + 1, created_at = ? WHERE id = ?", now, id)
      row.steps, row.generation = 0, row.generation + 1
    end
    if row then
      -- (the script that runs it now, with its arguments: the resume command named the first script
      -- with these arguments)
      tx:exec("UPDATE runs SET status = 'running', updated_at = ?, owner = ?, owner_since = ?, " ..
              "script = coalesce(?, script), args = coalesce(?, args) WHERE id = ?", now, me, now, script, args, id)
      return row.steps, row.generation
    end
    tx:exec("INSERT INTO runs (id, script, status, steps, created_at, updated_at, owner, owner_since, args) " ..
            "VALUES (?, ?, 'running', 0, ?, ?, ?, ?, ?)", id, script, now, now, me, now, args)
    return 0, 0
  end)
end

-- the run's end, and its holder gives it up (unless another took it over).
-- pending: the steps cut short, { {scope=, seq=, name=, retries=}, ... } (and why a failed run failed
-- outside its steps: { scope=, seq=, name="(run)", state="failed", error= }). A run
-- that ends "done" with failed steps is "done_with_failures".
function B:run_finish_now(id, status, now, me, pending)
  return write_now(self, function(tx)
    local holder = tx:value("SELECT owner FROM runs WHERE id = ?", id)
    if holder ~= nil and holder ~= me then return false end
    for _, p in ipairs(pending or {}) do
      tx:exec("INSERT OR REPLACE INTO unfinished_steps (run, scope, seq, name, state, error, retries, at, started, " ..
              "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", id, p.scope, p.seq, p.name, p.state or "pending",
              p.error, p.retries or 0, now, p.started, p.detail)
    end
    if status == "done" and tx:value("SELECT count(*) FROM unfinished_steps WHERE run = ? AND state = 'failed'",
        id) > 0 then
      status = "done_with_failures"
    end
    return tx:exec("UPDATE runs SET status = ?, updated_at = ?, owner = NULL, owner_since = NULL " ..
                   "WHERE id = ?", status, now, id) > 0
  end)
end

-- resil_close: a take of the run whose task never resumed: the run, if `me` holds it, is given up
-- "interrupted" (a later host resumes it); one another holds, or nobody, is left as it is
function B:run_give_up_now(id, now, me)
  return write_now(self, function(tx)
    return tx:exec("UPDATE runs SET status = 'interrupted', updated_at = ?, owner = NULL, owner_since = NULL " ..
                   "WHERE id = ? AND owner = ?", now, id, me) > 0
  end)
end

-- A step's fn is about to run: a "running" row, so that a process that dies (kill -9) before the
-- step's end leaves a trace of it (`runs show` listed the item done). Its step_put or step_failed
-- replaces it. Committed, not synced: a process's death keeps it; a machine's may not.
function B:step_started(run, scope, seq, name, started, me)
  return self.db:commit_only(function(tx)
    local holder = tx:value("SELECT owner FROM runs WHERE id = ?", run)
    if holder ~= nil and holder ~= me then return false end
    tx:exec("INSERT OR IGNORE INTO unfinished_steps (run, scope, seq, name, state, retries, at, started) " ..
            "VALUES (?, ?, ?, ?, 'running', 0, ?, ?)", run, scope, seq, name, started, started)
    return true
  end)
end

function B:step_get(run, scope, seq)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT name, result FROM steps WHERE run = ? AND scope = ? AND seq = ?", run, scope, seq)
    if row then return row.name, row.result end
    return nil
  end)
end

-- -> true | true, name, result (the place has a record already: the first one is kept) | false,
-- holder, since (the run was taken over: this process lost it)
-- a step's record in tx, once: -> true [, the name and result stored first] | false, owner, since
-- (another process holds the run)
local function put_step(tx, run, scope, seq, name, result, now, me, retries, started, detail)
  local row = tx:row("SELECT owner, owner_since FROM runs WHERE id = ?", run)
  if row and row.owner and row.owner ~= me then return false, row.owner, row.owner_since end
  -- another process wrote it while the run had no holder (it ended it): the first is kept (a
  -- plain insert raised SQLite's own "UNIQUE constraint failed")
  local stored
  if tx:exec("INSERT INTO steps (run, scope, seq, name, result, at, retries, started, detail) " ..
      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run, scope, seq) DO NOTHING", run, scope, seq, name, result,
      now, retries or 0, started, detail) == 0 then
    stored = tx:row("SELECT name, result FROM steps WHERE run = ? AND scope = ? AND seq = ?", run, scope, seq)
  else
    tx:exec("UPDATE runs SET steps = steps + 1, updated_at = ? WHERE id = ?", now, run)
  end
  tx:exec("DELETE FROM unfinished_steps WHERE run = ? AND scope = ? AND seq = ? AND state = 'running'", run, scope, seq)
  if stored then return true, stored.name, stored.result end
  return true
end

function B:step_put(...)
  local args = table.pack(...)
  return self.db:tx(function(tx) return put_step(tx, table.unpack(args, 1, args.n)) end)
end

-- the same at once, without the loop (the run's end after a signal, resil_close: fn ended, its
-- record not yet written; one the queue committed already is kept) -> as step_put
function B:step_put_now(...)
  local args = table.pack(...)
  return write_now(self, function(tx) return put_step(tx, table.unpack(args, 1, args.n)) end)
end

-- each run with its holder, if any: holder = {host=, pid=, since=}, holder_alive
function B:runs_list(now)
  -- (the holders' leases in the same read: scan_rows off the loop, a read with no transaction after)
  local rows, err = scan_rows(self, "SELECT runs.*, owners.expires_at AS owner_lease__ FROM runs LEFT JOIN owners " ..
                                    "ON owners.id = runs.owner ORDER BY runs.updated_at DESC")
  if not rows then return nil, err end
  for _, r in ipairs(rows) do
    local lease = r.owner_lease__
    r.owner_lease__ = nil
    if r.owner then
      r.holder, r.holder_alive = owner.describe(r.owner), alive_by(r.owner, function() return lease end, now) == true
    end
  end
  return rows
end

-- A step that failed (state "failed", with its error): -> true | false, holder, since
function B:step_failed(run, scope, seq, name, err, retries, now, me, started, detail)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT owner, owner_since FROM runs WHERE id = ?", run)
    if row and row.owner and row.owner ~= me then return false, row.owner, row.owner_since end
    tx:exec("INSERT OR REPLACE INTO unfinished_steps (run, scope, seq, name, state, error, retries, at, started, " ..
            "detail) VALUES (?, ?, ?, ?, 'failed', ?, ?, ?, ?, ?)", run, scope, seq, name, err, retries or 0, now,
            started, detail)
    return true
  end)
end

-- A run and its steps forgotten (`runs forget`, `runs prune`): -> true | false, "unknown" |
-- false, "held", holder (a live process runs it). Its ledger rows stay: they are money.
function B:run_forget(id, now)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT owner FROM runs WHERE id = ?", id)
    if not row then return false, "unknown" end
    if row.owner and alive(tx, row.owner, now) == true then return false, "held", row.owner end
    tx:exec("DELETE FROM steps WHERE run = ?", id)
    tx:exec("DELETE FROM unfinished_steps WHERE run = ?", id)
    tx:exec("DELETE FROM runs WHERE id = ?", id)
    return true
  end)
end

-- the run's row (nil when unknown)
function B:run_get(id)
  return read(self, function(tx) return tx:row("SELECT * FROM runs WHERE id = ?", id) end)
end

-- -> { {scope=, seq=, name=, at=, started=, detail=, bytes=, retries=,
--       state="done"|"failed"|"pending"|"running", error=}, ... } (started and detail: nil for steps
--       recorded before schema 7; running: begun and not ended, by a live holder or a dead one)
function B:run_steps(run)
  return read(self, function(tx)
    local rows = tx:rows("SELECT scope, seq, name, at, started, detail, length(result) AS bytes, retries, " ..
                         "'done' AS state FROM steps WHERE run = ? ORDER BY at, scope, seq", run)
    for _, r in ipairs(tx:rows("SELECT scope, seq, name, at, started, detail, state, error, retries " ..
                               "FROM unfinished_steps " ..
                               "WHERE run = ?", run)) do
      rows[#rows + 1] = r
    end
    return rows
  end)
end

-- ---------- costs ----------

-- one string, made once: the statement cache finds it by its hash, kept in the string
local INSERT_COST = "INSERT OR IGNORE INTO costs (dedupe, at, day, provider, model, operation, user, run, step, " ..
  "micro_usd, units, budget, period, ticket, item) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
local function insert_cost(tx, e)
  return tx:exec(INSERT_COST, e.dedupe, e.at, e.day, e.provider, e.model, e.operation, e.user, e.run, e.step, e.micro_usd, e.units,
    e.budget, e.period, e.ticket, e.item) > 0
end

function B:cost_record(e)
  -- sync = false: continue once committed (crash-safe), the disk sync follows (src/wal_sync.c)
  if e.sync == false then return self.db:commit_only(insert_cost, e) end
  return self.db:tx(insert_cost, e)
end

-- the same in the next group commit, without waiting: done(nil, inserted) | done(err)
function B:cost_record_later(e, done) return self.db:enqueue(done, insert_cost, e) end

-- the same at once, without the loop (resil_close: a row its caller waited for, in the queue as the
-- host closed)
function B:cost_record_now(e) return write_now(self, insert_cost, e) end

-- The same again, the insert run in C (src/store_sqlite.c, db:insert_later:
-- no Lua function, savepoint or done closure per row) and its outcome told
-- per group commit: committed(rows written, rows done) | failed(err, row)
-- for each row not written. A row is an array: INSERT_COST's parameters in
-- order (dedupe, at, day, provider, model, operation, user, run, step,
-- micro_usd, units, budget, period, ticket, item), then anything the
-- handlers want back. The handlers are this backend's from its first row on
-- (the ledger's own, src/lua/costs.lua).
function B:cost_queue(row, committed, failed)
  local n = self.cost_statement
  if not n then
    n = self.db:row_statement(INSERT_COST, committed, failed)
    self.cost_statement = n
  end
  self.db:insert_later(n, row)
end

local FILTERS = { "provider", "model", "operation", "user", "run", "budget" }
local BY = { provider = "provider", model = "model", user = "user", day = "day", operation = "operation",
             run = "run", item = "item" }

-- -> { {key=, micro_usd=, calls=}, ... } (one row with key=nil when by is nil)
function B:cost_query(by, filter)
  local where, args = { "1 = 1" }, {}
  for _, f in ipairs(FILTERS) do
    if filter[f] ~= nil then where[#where + 1] = f .. " = ?"; args[#args + 1] = filter[f] end
  end
  if filter.since then where[#where + 1] = "at >= ?"; args[#args + 1] = filter.since end
  if filter["until"] then where[#where + 1] = "at < ?"; args[#args + 1] = filter["until"] end
  local column = by and assert(BY[by], "cost: cannot break down by " .. tostring(by))
  local sql = ("SELECT %s AS key, coalesce(sum(micro_usd), 0) AS micro_usd, count(*) AS calls, " ..
               "sum(micro_usd IS NULL) AS unpriced FROM costs " ..
               "WHERE %s %s ORDER BY %s"):format(column or "NULL", table.concat(where, " AND "),
               column and ("GROUP BY " .. column) or "", column and "micro_usd DESC" or "1")
  return scan_rows(self, sql, table.unpack(args))
end

-- the ledger's rows that pass the filter, oldest first
-- -> the rows, in time order | with each: each(row) for every row as SQLite steps, in one read
-- (the ledger's CSV export held every row at once: 529 MB for 605k rows) -> true. each cannot
-- yield.
function B:cost_rows(filter, each)
  local where, args = { "1 = 1" }, {}
  for _, f in ipairs(FILTERS) do
    if filter[f] ~= nil then where[#where + 1] = f .. " = ?"; args[#args + 1] = filter[f] end
  end
  if filter.since then where[#where + 1] = "at >= ?"; args[#args + 1] = filter.since end
  local sql = "SELECT at, provider, model, operation, user, run, item, step, budget, micro_usd, units FROM costs " ..
              "WHERE " .. table.concat(where, " AND ") .. " ORDER BY at, id"
  if each then return scan(self, sql, each, table.unpack(args)) end
  return scan_rows(self, sql, table.unpack(args))
end

-- ---------- budgets ----------

local function spent_in(tx, budget, period)
  return tx:value("SELECT micro_usd FROM budget_spent WHERE budget = ? AND period = ?", budget, period) or 0
end
local function budget_usage(tx, budget, period, now)
  local spent = spent_in(tx, budget, period)
  local reserved = tx:value("SELECT coalesce(sum(micro_usd), 0) FROM reservations WHERE budget = ? AND " ..
                            "period = ? AND state = 'held' AND expires_at > ?", budget, period, now)
  return spent, reserved
end

-- the period of time `at` of the kind `like` is ("all", "YYYY-MM" or "YYYY-MM-DD", UTC)
local function period_at(like, at)
  if like == "all" then return like end
  return os.date(#like == 7 and "!%Y-%m" or "!%Y-%m-%d", math.floor(at))
end

-- the period before `period`, of its kind (`now` in it) -> nil for none
local function period_before(period, now)
  if period == "all" or period_at(period, now) ~= period then return nil end
  local start = math.floor(now) - math.floor(now) % 86400
  if #period == 7 then start = start - (os.date("!*t", start).day - 1) * 86400 end
  return period_at(period, start - 1)
end

-- A call across a period's end (a hold made at 23:59, settled at 00:01) settles in the new
-- period, so its hold, still open, counts there: a budget's holds from the period before
-- `period` (of its kind; `now` is in it) move into it at its first reservation or look (they
-- kept counting in the old one only, and the new one let its whole limit be reserved on top of
-- their costs). At each reservation the period before's (a seek on the budget index: a range over
-- earlier periods read every reservation of the day before, kept a day, HOLDS_KEPT, at each
-- reserve); at the period's first (no row in it yet) every earlier period's of its kind, once: a
-- hold longer than a whole period with no reservation in the period between (a batch job, a
-- provider stuck past two midnights) was never moved, and today let its limit in on top of it.
-- -> the SQL that names the holds to move (or count), and its arguments after budget
local function earlier(tx, budget, period, now)
  local before = period_before(period, now)
  if not before then return nil end
  if tx:value("SELECT EXISTS (SELECT 1 FROM reservations WHERE budget = ? AND period = ?)", budget, period) == 1 then
    return "budget = ? AND period = ? AND state = 'held' AND expires_at > ?", before, now
  end
  return "budget = ? AND period < ? AND length(period) = ? AND state = 'held' AND expires_at > ?", period, #period, now
end

local function roll(tx, budget, period, now)
  local where, a, b, c = earlier(tx, budget, period, now)
  if not where then return end
  tx:exec("UPDATE reservations SET period = ? WHERE " .. where, period, budget, a, b, c)
end

-- Holds whose owner died stop counting: -> how many were released.
local function release_dead(tx, budget, period, me, now)
  local released = 0
  for _, r in ipairs(tx:rows("SELECT DISTINCT owner FROM reservations WHERE budget = ? AND period = ? AND " ..
                             "state = 'held' AND expires_at > ? AND owner IS NOT NULL AND owner <> ?",
                             budget, period, now, me)) do
    if alive(tx, r.owner, now) == false then
      released = released + tx:exec("UPDATE reservations SET state = 'released' WHERE budget = ? AND " ..
                                    "period = ? AND owner = ? AND state = 'held'", budget, period, r.owner)
    end
  end
  return released
end

-- -> true, spent, reserved | false, spent, reserved
-- Dead owners' holds are looked for only when the reservation does not fit.
-- set_per: the period kind set from the command line that the caller's
-- period comes from ("" for none): another one now (a switch since it read
-- the settings) -> false, 0, 0, "stale", the hold not made
function B:budget_reserve(budget, period, limit, estimate, ticket, expires_at, now, me, lease_until, set_per)
  return self.db:tx(function(tx)
    if set_per then
      local set = tx:row("SELECT limit_micro, per FROM budgets WHERE name = ?", budget)
      if (set and set.limit_micro and set.per or "") ~= set_per then return false, 0, 0, "stale" end
    end
    roll(tx, budget, period, now)
    local spent, reserved = budget_usage(tx, budget, period, now)
    if spent + reserved + estimate > limit and release_dead(tx, budget, period, me, now) > 0 then
      spent, reserved = budget_usage(tx, budget, period, now)
    end
    if spent + reserved + estimate > limit then return false, spent, reserved end
    renew(tx, me, lease_until)
    tx:exec("INSERT INTO reservations (ticket, budget, period, micro_usd, expires_at, state, owner, created_at) " ..
            "VALUES (?, ?, ?, ?, ?, 'held', ?, ?)", ticket, budget, period, estimate, expires_at, me, now)
    return true, spent, reserved + estimate
  end)
end

-- The money the holds `where` names hold, but for those of owners known dead: a read marks
-- nothing released (the next reservation or look does), and leaves them out as that would (a
-- scrape showed a killed worker's holds as reserved until their end, `budgets show` not)
local function live_held(tx, where, now, ...)
  local held = 0
  for _, r in ipairs(tx:rows("SELECT owner, sum(micro_usd) AS micro_usd FROM reservations WHERE " .. where ..
                             " GROUP BY owner", ...)) do
    if r.owner == nil or alive(tx, r.owner, now) ~= false then held = held + r.micro_usd end
  end
  return held
end

-- A budget's spent and reserved in `period` as a read finds them: the earlier periods' open holds
-- counted, as roll would move them, dead owners' not, as release_dead would free them -> spent, reserved
local function figures(tx, budget, period, now)
  local spent = spent_in(tx, budget, period)
  local reserved = live_held(tx, "budget = ? AND period = ? AND state = 'held' AND expires_at > ?", now,
    budget, period, now)
  local where, a, b, c = earlier(tx, budget, period, now)
  if where then reserved = reserved + live_held(tx, where, now, budget, a, b, c) end
  return spent, reserved
end

-- What budget_usage's writes would find, read (as budget_figures; the holds listed in the periods
-- they are in, but for those of owners known dead) -> as budget_usage
local function usage_read(self, budget, period, now)
  local r, err = read(self, function(tx)
    local spent, reserved = figures(tx, budget, period, now)
    local holds, dead = {}, {} -- (each owner judged once)
    for _, h in ipairs(tx:rows("SELECT ticket, micro_usd, owner, expires_at, created_at FROM reservations " ..
      "WHERE budget = ? AND state = 'held' AND expires_at > ? ORDER BY expires_at, ticket", budget, now)) do
      if h.owner ~= nil and dead[h.owner] == nil then dead[h.owner] = alive(tx, h.owner, now) == false end
      if not (h.owner and dead[h.owner]) then holds[#holds + 1] = h end
    end
    return { spent, reserved, holds }
  end)
  if not r then return nil, err end
  return r[1], r[2], r[3]
end

-- -> spent, reserved, { {ticket=, micro_usd=, owner=, expires_at=}, ... }
function B:budget_usage(budget, period, now, me)
  -- (a store this process may only read, another user's file: read)
  if self.db:readonly() then return usage_read(self, budget, period, now) end
  return self.db:tx(function(tx)
    roll(tx, budget, period, now)
    release_dead(tx, budget, period, me, now)
    local spent, reserved = budget_usage(tx, budget, period, now)
    return spent, reserved, tx:rows("SELECT ticket, micro_usd, owner, expires_at, created_at FROM reservations WHERE " ..
      "budget = ? AND period = ? AND state = 'held' AND expires_at > ? ORDER BY expires_at, ticket",
      budget, period, now)
  end)
end

-- The same for a look (`resil-lua budgets`, `budgets show`): a read, which never waits for another
-- process's write lock (they waited the store's timeout, then said "database is locked", while
-- runs, costs and keys list answered at once) -> as budget_usage
function B:budget_view(budget, period, now) return usage_read(self, budget, period, now) end

-- A budget's spent and reserved in `period`, for its gauges: a read, so a scrape never waits
-- for another process's write lock (budget_usage writes: it moves and releases holds). The
-- earlier periods' open holds count, as roll would move them. -> spent, reserved
function B:budget_figures(budget, period, now)
  -- (one value: a read's second is its error)
  local r, err = read(self, function(tx) return { figures(tx, budget, period, now) } end)
  if not r then return nil, err end
  return r[1], r[2]
end

-- Replace the reservation by the actual cost; a second settle changes nothing.
-- The cost counts in the period its settle falls in (its ledger row's `at`), of
-- the kind its hold is in now: one carried into another kind (budgets set
-- --per) while its call ran settles under that kind; a charge (a refused
-- attempt's cost, no hold of its own) under its call's ticket's. A call across
-- midnight is today's, in the budget as in the ledger.
local function settle(tx, ticket, entry)
  local row = tx:row("SELECT state, period FROM reservations WHERE ticket = ?", ticket)
  if row and row.state == "settled" then return false end
  local parent = not row and ticket:match("^(.+):charge:%d+$") -- (Ticket:charge's ids)
  local held = row or parent and tx:row("SELECT period FROM reservations WHERE ticket = ?", parent)
  if held then entry.period = period_at(held.period, entry.at) end
  tx:exec("UPDATE reservations SET state = 'settled' WHERE ticket = ?", ticket)
  if not entry.charged then return true end -- settle(0): nothing spent, no ledger row
  return insert_cost(tx, entry)
end

function B:budget_settle(ticket, entry) return self.db:tx(settle, ticket, entry) end

-- the same at once, without the loop (resil_close: a settle queued when the host closed; Redis
-- has none, its command sent as the settle began)
function B:budget_settle_now(ticket, entry) return write_now(self, settle, ticket, entry) end

-- the same in the next group commit, without waiting: done(nil, first) | done(err)
function B:budget_settle_later(ticket, entry, done) return self.db:enqueue(done, settle, ticket, entry) end

function B:budget_release(ticket)
  return self.db:tx(function(tx)
    return tx:exec("UPDATE reservations SET state = 'released' WHERE ticket = ? AND state = 'held'", ticket) > 0
  end)
end

-- the same at once, without the loop (resil_close)
function B:budget_release_now(ticket)
  return write_now(self, function(tx)
    return tx:exec("UPDATE reservations SET state = 'released' WHERE ticket = ? AND state = 'held'", ticket) > 0
  end)
end

-- A hold its owner `me` still has (held, not yet past its expiry) now ends
-- at expires_at, never earlier than it did; `me`'s lease is written with it.
-- -> true | false (settled, released, expired, another's, or unknown: a hold
-- that stopped counting is never counted again)
function B:budget_extend(_, _, ticket, expires_at, now, me, lease_until)
  return self.db:tx(function(tx)
    if tx:exec("UPDATE reservations SET expires_at = max(expires_at, ?) WHERE ticket = ? AND state = 'held' AND " ..
               "expires_at > ? AND owner = ?", expires_at, ticket, now, me) == 0 then
      return false
    end
    renew(tx, me, lease_until)
    return true
  end)
end

-- the reservation `ticket` whose outcome its caller did not see (the store
-- failed): -> true (released) | false (never made). A transaction either
-- committed or not, and a canceled one never runs (store_sqlite.c,
-- op_canceled): nothing can arrive after this.
function B:budget_abandon(_, _, ticket) return self:budget_release(ticket) end
-- the same at once, without the loop (resil_close: a reservation whose task never resumed; an op
-- still queued then is dropped unwritten, store_sqlite.c's db_close_all)
function B:budget_abandon_now(_, _, ticket) return self:budget_release_now(ticket) end

-- A budget's stored settings: -> {limit_micro=, per=, declared_micro=, declared_per=} | nil
-- (per: "day", "month" or "none"). A read: it never waits for a writer.
function B:budget_config(name)
  return self.db:read(function(tx)
    return tx:row("SELECT limit_micro, per, declared_micro, declared_per FROM budgets WHERE name = ?", name)
  end)
end

-- a period kind switched (carry, below): the budget's costs since `since` and its open holds
-- count in `period` from now on
local function carry_into(tx, name, carry)
  tx:exec("UPDATE costs SET period = ? WHERE budget = ? AND at >= ? AND period IS NOT ?", carry.period, name,
    carry.since or -math.huge, carry.period)
  tx:exec("UPDATE reservations SET period = ? WHERE budget = ? AND state = 'held'", carry.period, name)
end

-- the limit a script declares (resil.budget), for `resil-lua budgets`; carry: its period kind
-- changed while it is the one in force (no limit set), as budget_set's
function B:budget_declare(name, micro, per, now, carry)
  return self.db:tx(function(tx)
    tx:exec("INSERT INTO budgets (name, declared_micro, declared_per, declared_at) VALUES (?, ?, ?, ?) " ..
            "ON CONFLICT (name) DO UPDATE SET declared_micro = excluded.declared_micro, " ..
            "declared_per = excluded.declared_per, declared_at = excluded.declared_at", name, micro, per, now)
    if carry then carry_into(tx, name, carry) end
    return true
  end)
end

-- the limit set from the command line: every process reserves against it
-- (carry: the period kind changed; {period=, since=}: the budget's costs
-- since `since`, nil for all, and its open holds count in `period` from now
-- on: in the same transaction, so a process killed between the two cannot
-- leave the new period without the spend it carries)
function B:budget_set(name, micro, per, now, carry)
  return self.db:tx(function(tx)
    tx:exec("INSERT INTO budgets (name, limit_micro, per, set_at) VALUES (?, ?, ?, ?) " ..
            "ON CONFLICT (name) DO UPDATE SET limit_micro = excluded.limit_micro, per = excluded.per, " ..
            "set_at = excluded.set_at", name, micro, per, now)
    if carry then carry_into(tx, name, carry) end
    return true
  end)
end

-- every budget known: declared, set, or with reservations -> { {name=, limit_micro=, per=, ...}, ... }
function B:budget_list()
  return read(self, function(tx)
    return tx:rows("SELECT n.name, b.limit_micro, b.per, b.declared_micro, b.declared_per FROM " ..
                   "(SELECT name FROM budgets UNION SELECT budget FROM reservations) AS n " ..
                   "LEFT JOIN budgets b ON b.name = n.name ORDER BY n.name")
  end)
end

-- Release a budget's live holds in a period: all of them, or (stale) those
-- whose owner is not alive. -> how many
function B:budget_release_holds(budget, period, stale, now, me)
  return self.db:tx(function(tx)
    roll(tx, budget, period, now)
    if stale then return release_dead(tx, budget, period, me, now) end
    return tx:exec("UPDATE reservations SET state = 'released' WHERE budget = ? AND period = ? AND " ..
                   "state = 'held' AND expires_at > ?", budget, period, now)
  end)
end

-- ---------- shared limits ----------

-- A GCRA key's arrival time, no earlier than now (a bucket full since), its
-- writing, and the tokens left at now by an arrival time (a microsecond's
-- slack: times are seconds since 1970, their last bits noise).
-- An arrival time is kept with the store time it was written at. A now before that is the wall
-- clock stepped back since (NTP's first sync, a VM resumed), in every process of the machine at
-- once: the arrival time is read as lying as far ahead of now as it lay ahead of its writing, no
-- time counted as passed. Read as it is, every caller of the bucket waited for the step on top (a
-- minute stepped back refused a gateway key's every request for a minute). The row moved back is
-- written at once, a refusal's too: time counts for the bucket from now on, not from when the
-- clock is back at `at`.
-- A virtual clock's time (a spec's) is no reading of the machine's clock, behind or ahead of the
-- others by design: its rows say no time (NULL), and it moves no row back.
local is_virtual = resil.clock.is_virtual
local function set_tat(tx, key, tat, now)
  tx:exec("INSERT OR REPLACE INTO gcra (key, tat, at) VALUES (?, ?, ?)", key, tat, not is_virtual() and now or nil)
end
-- A now behind `at` because the caller read its clock, then waited for the write lock while
-- another process wrote, is no clock stepped back: the machine's clock, read here inside the
-- transaction, is past `at` (every process reads the same clock, and the writer wrote before this
-- transaction began). The arrival time is then taken as it is (the caller waits the difference
-- more, the safe side); moved back by it, each contended take gave that much of the rate away. An
-- `at` ahead of the clock read now is the clock stepped back.
local wall = resil.clock.wall
local STEP_SLACK = 0.05 -- (seconds: clock reads' granularity, nothing more)
local function tat_of(tx, key, now)
  local row = tx:row("SELECT tat, at FROM gcra WHERE key = ?", key)
  if not row then return now end
  local tat, at = row.tat, row.at
  if at and now < at and not is_virtual() and at - wall() > STEP_SLACK then
    tat = tat - (at - now)
    set_tat(tx, key, tat, now)
  end
  return tat < now and now or tat
end
local function left(tat, now, interval, tolerance)
  return math.max(0, math.floor((tolerance - (tat - now) + 1e-6) / interval))
end

-- GCRA in one transaction: -> true, remaining, wait, tat | false,
-- retry_after, tat (tat: the arrival time it leaves, for the caller's own
-- estimate). A wait up to max_wait (default 0: only now) books the caller's
-- slot: the TAT moves on at once and the caller goes ahead after `wait`,
-- asking no more.
function B:gcra_take(key, interval, tolerance, n, now, max_wait)
  return self.db:tx(function(tx)
    local tat = tat_of(tx, key, now)
    local new_tat = tat + n * interval
    local wait = new_tat - now - tolerance
    if wait > (max_wait or 0) + 1e-6 then return false, wait, tat end
    if wait <= 1e-6 then wait = 0 end
    set_tat(tx, key, new_tat, now)
    return true, left(new_tat, now + wait, interval, tolerance), wait, new_tat
  end)
end

-- Several GCRAs in one transaction, all or none (resil.acquire_all):
-- items { {key, interval, tolerance, n}, ... } -> true, wait, tats | false,
-- retry_after, worst (the item that waits longest), tats. A wait up to
-- max_wait books every item's slot, as gcra_take does.
function B:gcra_take_all(items, now, max_wait)
  return self.db:tx(function(tx)
    local tats, wait, worst = {}, 0, 1
    for i, it in ipairs(items) do
      local tat = tat_of(tx, it[1], now)
      tats[i] = tat
      local w = tat + it[4] * it[2] - now - it[3]
      if w > wait then wait, worst = w, i end
    end
    if wait > (max_wait or 0) + 1e-6 then return false, wait, worst, tats end
    if wait <= 1e-6 then wait = 0 end
    for i, it in ipairs(items) do
      tats[i] = tats[i] + it[4] * it[2]
      set_tat(tx, it[1], tats[i], now)
    end
    return true, wait, tats
  end)
end

-- A GCRA correction in one transaction: n tokens taken (n > 0: without
-- limit, the bucket may go into debt, at most 1e9 s of it) or given back
-- (n < 0: the arrival time no further back than now, a full bucket, nor
-- than a pause the provider asked for, see gcra_raise). -> remaining, tat
function B:gcra_adjust(key, interval, tolerance, n, now)
  return self.db:tx(function(tx)
    local tat = tat_of(tx, key, now)
    local new_tat = math.min(math.max(now, tat + n * interval), now + 1e9)
    if n < 0 then
      local pause = tat_of(tx, "pause:" .. key, now)
      if new_tat < pause then new_tat = math.min(pause, tat) end
    end
    set_tat(tx, key, new_tat, now)
    return left(new_tat, now, interval, tolerance), new_tat
  end)
end

-- A provider's word on a limit, in one transaction: the arrival time moves
-- on to at_least (at most 1e9 s ahead), never back; a pause (the arrival
-- time it holds; nil: none) is also kept, in the row "pause:KEY" (a key is
-- "bucket:NAME": none has that name), so that no refund (gcra_adjust)
-- pulls the arrival time back into it. -> remaining, tat
function B:gcra_raise(key, interval, tolerance, at_least, now, pause)
  return self.db:tx(function(tx)
    local tat = tat_of(tx, key, now)
    if at_least > tat then
      tat = math.min(at_least, now + 1e9)
      set_tat(tx, key, tat, now)
    end
    if pause then
      pause = math.min(pause, now + 1e9)
      if pause > tat_of(tx, "pause:" .. key, now) then set_tat(tx, "pause:" .. key, pause, now) end
    end
    return left(tat, now, interval, tolerance), tat
  end)
end

-- -> open_until | nil
function B:breaker_get(name, now)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT open_until FROM breakers WHERE name = ?", name)
    return row and row.open_until
  end)
end

function B:breaker_open(name, open_until)
  return self.db:tx(function(tx)
    tx:exec("INSERT OR REPLACE INTO breakers (name, open_until, probe_until, opened) VALUES (?, ?, NULL, 1)",
      name, open_until)
    return true
  end)
end

-- A failed probe opens it again for longer: open_for times backoff for each open in a row so far
-- (`opened`; a close deletes the row), up to open_for_max. -> its end
function B:breaker_reopen(name, open_for, backoff, open_for_max, now)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT opened FROM breakers WHERE name = ?", name)
    local opened = row and row.opened or 0
    local open_until = now + math.min(open_for * backoff ^ opened, open_for_max)
    tx:exec("INSERT OR REPLACE INTO breakers (name, open_until, probe_until, opened) VALUES (?, ?, NULL, ?)",
      name, open_until, opened + 1)
    return open_until
  end)
end

-- Exactly one caller across processes gets the half-open probe.
function B:breaker_probe(name, probe_for, now)
  return self.db:tx(function(tx)
    local row = tx:row("SELECT open_until, probe_until FROM breakers WHERE name = ?", name)
    if not row or not row.open_until then return true end -- closed
    if row.open_until > now then return false, row.open_until - now end
    if row.probe_until and row.probe_until > now then return false, row.probe_until - now end
    tx:exec("UPDATE breakers SET probe_until = ? WHERE name = ?", now + probe_for, name)
    return true, "probe"
  end)
end

-- A half-open probe given back unrun (its call canceled, its host closed): the slot is free at
-- once, not after probe_for. The probe is the one whose end is `now + probe_for` as it was taken
-- (another's since is left alone). -> true | false (none such)
local function unprobe(tx, name, probe_until)
  return tx:exec("UPDATE breakers SET probe_until = NULL WHERE name = ? AND probe_until = ?", name, probe_until) > 0
end
function B:breaker_unprobe(name, probe_for, now) return self.db:tx(unprobe, name, now + probe_for) end
-- the same at once, without the loop (resil_close)
function B:breaker_unprobe_now(name, probe_for, now) return write_now(self, unprobe, name, now + probe_for) end

function B:breaker_close(name)
  return self.db:tx(function(tx) return tx:exec("DELETE FROM breakers WHERE name = ?", name) > 0 end)
end

function B:integrity_check()
  return self.db:tx(function(tx) return tx:value("PRAGMA integrity_check") end)
end

-- the open is resil.store's alone: what require returns here is a script's to have, and to change
-- (a method replaced there was handed the backend, and with it the db)
private.open_sqlite = open
return true
