-- The store on SQLite, in one process: key/value, idempotency, costs and
-- budgets, on the virtual clock. Multi-process and crash behaviour are in
-- store_process_spec.lua.
local resil = require "resil"
local helpers = require "spec.helpers"

local function fresh_store()
  local path = helpers.tmpname(".db")
  resil.store_config({ url = path })
  return assert(resil.store()), path
end

describe("resil.store (SQLite)", function()
  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
  end)
  after_each(function() resil.log.level("info") end)

  it("creates its file on first use, with WAL, and checks out as intact", function()
    local s, path = fresh_store()
    assert.are.equal("sqlite", s.kind)
    assert.is_true(s:set("x", "1"))
    assert.is_not_nil(io.open(path .. "-wal"))
    assert.are.equal("ok", helpers.backend(s):integrity_check())
  end)

  it("is the store the config names now: another URL set is another store, and back again", function()
    local a = fresh_store()
    assert.are.equal(a, resil.store()) -- (the default, asked for again)
    assert.is_true(a:set("which", "a"))
    local b = fresh_store()
    assert.are_not.equal(a, b)
    assert.are.equal(b, resil.store())
    assert.is_nil(resil.store():get("which"))
    resil.cost.record({ provider = "b", usd = 1 })
    resil.store_config({ url = a.url })
    assert.are.equal(a, resil.store())
    assert.are.equal("a", resil.store():get("which"))
    assert.are.equal(0, resil.cost.total({ provider = "b" }))
  end)

  it("keeps its WAL short under steady sync = false writes (it is checkpointed and started again)", function()
    resil.clock.real()
    local _, path = fresh_store()
    for i = 1, 10000 do
      assert(resil.cost.record({ provider = "wal", usd = 0.001, sync = false, id = "w" .. i }))
    end
    local wal = assert(io.open(path .. "-wal", "rb"))
    local size = wal:seek("end")
    wal:close()
    -- a checkpoint every 1,000 frames (4 MB of 4 KiB pages), plus what the writes add while the
    -- syncer copies them (a few MB, more on a slow disk): not a frame per write for ever (80 MB)
    assert.is_true(size < 24 * 1024 * 1024, ("the WAL is %.1f MB"):format(size / 1048576))
    assert.are.equal(10, resil.cost.total({ provider = "wal" }))
  end)

  it("sweeps what has expired once a minute (up to an hour while it finds nothing): kv keys past their TTL, " ..
     "once records past their retention, budget holds a day past their end", function()
    local s = fresh_store()
    local function count(tbl)
      return helpers.backend(s).db:read(function(tx) return tx:value("SELECT count(*) FROM " .. tbl) end)
    end
    assert(s:set("short", "x", 10))
    assert(s:set("kept", "y"))
    assert.are.equal(1, resil.once({ key = "o", retention = 30 }, function() return 1 end))
    local budget = resil.budget("swept", { limit = 10, hold = 60 })
    assert.is_true(assert(budget:reserve(1)):settle(0.5))
    assert(budget:reserve(2)) -- never settled: it stops counting at its end
    resil.sleep(61)
    assert.are.equal(1, count("kv"))
    assert.are.equal(0, count("idempotency"))
    assert.are.equal(2, count("reservations"))
    resil.sleep(86400 + 3600)
    assert.are.equal(0, count("reservations"))
    assert.are.equal("y", s:get("kept"))
    local st = assert(budget:state())
    assert.are.equal(0.5, st.spent)
    assert.are.equal(0, st.reserved)
  end)

  it("sweeps no once record of a run still in progress, however long it runs past its retention; a dead " ..
     "holder's is swept", function()
    local s = fresh_store()
    local runs = 0
    local function slow() runs = runs + 1; resil.sleep(90); return "made" end
    -- the sweep at 60 s found the record running, its holder (this process) alive
    local r, err = resil.once({ key = "long", retention = 30 }, slow)
    assert.are.equal("made", r, tostring(err))
    assert.are.equal("made", (resil.once({ key = "long", retention = 30 }, slow)))
    assert.are.equal(1, runs)
    -- a record left running by a process that is gone
    local now = resil.store_now()
    assert(helpers.backend(s).db:tx(function(tx)
      return tx:exec("INSERT INTO idempotency (key, fingerprint, state, owner, locked_at, created_at, expires_at) " ..
        "VALUES ('orphan', 'f', 'running', 'gone', ?, ?, ?)", now, now, now + 1)
    end))
    resil.sleep(3600)
    assert.are.equal(0, helpers.backend(s).db:read(function(tx)
      return tx:value("SELECT count(*) FROM idempotency WHERE key = 'orphan'")
    end))
  end)

  it("runs fn once when it runs past its retention: another caller finds it in progress, not a free key", function()
    local s = fresh_store()
    local runs = 0
    local first = resil.spawn(resil.once, { key = "long-run", fingerprint = "fp", retention = 30 }, function()
      runs = runs + 1
      resil.sleep(90)
      return "made"
    end)
    resil.sleep(60) -- past the retention, the run still going
    -- what a second process asking for the key is told (it is not this process, so no in-flight shortcut)
    assert.are.equal("in_progress", (helpers.backend(s):once_claim("long-run", "fp", "another-process", 300, 30,
      resil.store_now())))
    resil.once_reap() -- reaping leaves it too
    assert.are.equal("in_progress", (helpers.backend(s):once_claim("long-run", "fp", "another-process", 300, 30,
      resil.store_now())))
    assert.are.equal("made", select(2, first:join()))
    assert.are.equal("made", (resil.once({ key = "long-run", fingerprint = "fp", retention = 30 }, function()
      runs = runs + 1
    end)))
    assert.are.equal(1, runs)
  end)

  -- the reap and the sweep judge a holder on this machine by its pid, as
  -- the claim does: one whose lease lapsed while it lives (its loop held
  -- past a lease by a blocking call in fn, SIGSTOP) keeps its record (by
  -- the lease alone, the reap deleted it and a second caller ran fn again)
  it("reaps no running record whose holder on this machine lives (its pid runs), even with its lease lapsed: " ..
     "reap and claim agree", function()
    local s = fresh_store()
    local owner = require "resil.owner"
    local me = owner.me()
    local f = assert(io.popen("sleep 60 > /dev/null 2>&1 & echo $!"))
    local pid = f:read("l")
    f:close()
    local _ <close> = setmetatable({}, { __close = function() os.execute("kill " .. pid) end })
    local stat = helpers.slurp("/proc/" .. pid .. "/stat")
    local fields = {}
    for field in stat:match("^.*%)%s(.*)$"):gmatch("%S+") do fields[#fields + 1] = field end
    local holder = ("%s|%s|%s|%s|%.3f|abcdef"):format(me.host, me.boot, pid, fields[20], resil.store_now())
    assert.are.equal("alive", owner.verdict(holder))
    local now = resil.store_now()
    assert(helpers.backend(s).db:tx(function(tx)
      return tx:exec("INSERT INTO idempotency (key, fingerprint, state, owner, locked_at, created_at, expires_at) " ..
        "VALUES ('blocked', 'fp', 'running', ?, ?, ?, ?)", holder, now - 100, now - 100, now - 70)
    end))
    -- past its retention, its holder alive (no lease row): a second caller finds it in progress
    assert.are.equal("in_progress", (helpers.backend(s):once_claim("blocked", "fp", "another-process", 300, 30, now)))
    resil.once_reap() -- reaping must leave it as the claim does
    assert.are.equal("in_progress", (helpers.backend(s):once_claim("blocked", "fp", "another-process", 300, 30,
      resil.store_now())))
  end)

  it("sweeps a backlog in small commits with pauses between: other tasks' writes go in meanwhile (1,000 rows " ..
     "of 2 KB a commit, back to back, held the loop 12-29 ms at a time)", function()
    local s = fresh_store()
    local now = resil.store_now()
    assert(helpers.backend(s).db:tx(function(tx)
      for i = 1, 1000 do
        tx:exec("INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?)", "old:" .. i, ("x"):rep(2000), now)
      end
      return true
    end))
    local left_at_probe
    local probe = resil.spawn(function()
      resil.sleep(60.001) -- just after the first sweep began
      assert(s:set("probe", "1"))
      left_at_probe = helpers.backend(s).db:read(function(tx)
        return tx:value("SELECT count(*) FROM kv WHERE key LIKE 'old:%'")
      end)
    end)
    resil.sleep(61)
    assert(probe:join())
    assert.is_true(left_at_probe > 0 and left_at_probe < 1000, tostring(left_at_probe))
    assert.are.equal(0, helpers.backend(s).db:read(function(tx)
      return tx:value("SELECT count(*) FROM kv WHERE key LIKE 'old:%'")
    end))
  end)

  it("on the virtual clock, a month's sleep costs the sweeper a commit an hour at most while it finds nothing " ..
     "(one a minute made a year's sleep take seconds)", function()
    resil.clock.real()
    local r = helpers.run_script([[
local resil = require "resil"
resil.clock.virtual()
local s = assert(resil.store())
local before = s:stats().commits
resil.sleep(30 * 86400)
print(s:stats().commits - before)
]], "--store " .. helpers.tmpname(".db"))
    assert.are.equal(0, r.code, r.stderr)
    local commits = tonumber(r.stdout)
    assert.is_true(commits <= 30 * 24 + 10, r.stdout)
  end)

  -- A file a newer resil-lua wrote: the open raised, its message at a line
  -- of the host's own Lua, and each failed open (each of a gateway's
  -- requests asks again) left its connection to the collector: two files
  -- and a sync thread each, 61 and 30 after 30 requests.
  it("a file of a newer schema is store_unavailable naming it, and each failed open lets the file go", function()
    local path = helpers.tmpname(".db")
    assert.is_true(os.execute(("sqlite3 %s 'PRAGMA user_version = 99; CREATE TABLE t (a);'"):format(path)))
    collectgarbage("stop")
    for _ = 1, 10 do
      local s, err = resil.store(path)
      assert.is_nil(s)
      assert.are.equal("store_unavailable", err.kind)
      assert.are.equal("store " .. path .. " has schema version 99; this resil-lua knows up to 11 " ..
        "(a newer resil-lua wrote it)", err.message)
    end
    -- (the shell's parent is this process)
    local fds = io.popen("ls -l /proc/$PPID/fd | grep -c -F " .. path):read("a")
    collectgarbage("restart")
    assert.are.equal("0\n", fds)
  end)

  it("refuses a URL of an unknown scheme instead of making a file of it", function()
    local ok, err = pcall(function() local s = resil.store("ftp://example.com/x"); return s end)
    assert.is_false(ok)
    assert.matches("store_spec%.lua:%d+: store: unknown URL scheme 'ftp'", err)
    assert.has_error(function() resil.store_config({ url = "s3://bucket/x" }) end)
    assert.is_nil(io.open("ftp:"))
  end)

  -- (before: "[resil store]:67: attempt to index a boolean value (local 'url')", from inside the host)
  it("resil.store with a URL that is no string raises at the caller's line", function()
    for _, bad in ipairs({ true, 5, {} }) do
      local f = function() local s = resil.store(bad); return s end
      local ok, err = pcall(f)
      assert.is_false(ok)
      assert.matches("store_spec%.lua:" .. debug.getinfo(f, "S").linedefined .. ": store: the URL must be a string", err)
    end
  end)

  -- (before: "[resil store]:126: attempt to index a nil value (local 'c')", from inside the host)
  it("resil.store_config without a table raises at the caller's line", function()
    for _, bad in ipairs({ "x.db", 5 }) do
      local ok, err = pcall(function() local r = resil.store_config(bad); return r end)
      assert.is_false(ok)
      assert.matches("store_spec%.lua:%d+: resil%.store_config: expects a table", err)
    end
    local ok, err = pcall(function() local r = resil.store_config(); return r end)
    assert.is_false(ok)
    assert.matches("store_spec%.lua:%d+: resil%.store_config: expects a table", err)
  end)

  -- (before: "[resil store]:67: attempt to index a number value (local 'url')", "[resil runs]:57:
  -- bad argument #1 to 'concat'", "[resil store_sqlite]:494: store: cannot bind a table", from inside
  -- the host, some at the first step)
  it("resil.store_config with a store or run named by a wrong type raises at the caller's line", function()
    for _, c in ipairs({ { url = 5 }, { run = {} }, { script = 5 }, { script_path = {} }, { args = "x" },
                         { args = { "a", {} } } }) do
      local k = next(c)
      local ok, err = pcall(function() local r = resil.store_config(c); return r end)
      assert.is_false(ok)
      assert.matches("store_spec%.lua:%d+: resil%.store_config: " .. k .. " must be a", err)
    end
  end)

  -- SQLite takes an empty name for a temporary database, deleted at exit: a
  -- store URL that named no file (--store "", sqlite://, an empty
  -- RESIL_STORE as a compose file's ${STORE} leaves it) lost every step,
  -- once record and ledger row without a word.
  it("refuses a URL that names no file; an empty RESIL_STORE is unset, not a temporary database", function()
    for _, url in ipairs({ "", "sqlite://", "?timeout=1" }) do
      local ok, err = pcall(function() local s = resil.store(url); return s end)
      assert.is_false(ok)
      assert.matches("store_spec.lua:%d+: store: '" .. url:gsub("%p", "%%%0") .. "' names no file", err)
    end
    assert.has_error(function() resil.store_config({ url = "" }) end, "store: '' names no file " ..
      "(a SQLite store is a path, by default .resil/state.db)")
    local r = helpers.run(helpers.resil .. " --store '' -e 'print(1)'")
    assert.are.equal(1, r.code)
    assert.matches("store: '' names no file", r.stderr, 1, true)
    local dir = helpers.tmpname("")
    assert.is_true(os.execute("mkdir " .. dir))
    local script = helpers.write(helpers.tmpname(".lua"), [[
local s = assert(require("resil").store())
print(s.url, s:get("k"))
assert(s:set("k", "kept"))
]])
    r = helpers.run(("cd %s && RESIL_STORE= %s %s"):format(dir, helpers.resil, script))
    assert.are.equal(".resil/state.db\tnil\n", r.stdout, r.stderr)
    r = helpers.run(("cd %s && RESIL_STORE= %s %s"):format(dir, helpers.resil, script))
    assert.are.equal(".resil/state.db\tkept\n", r.stdout, r.stderr)
  end)

  -- An option without '=' (?timeout, a typo ?tiemout) was passed over: the
  -- store waited its default 5 s; hiredis took port 99999 as 34463 and
  -- every command said "Connection refused".
  it("a store URL's option without a value, or a Redis port out of range, is named with the URL", function()
    local path = helpers.tmpname(".db")
    for query, why in pairs({
      ["?timeout"] = "option 'timeout' has no value (timeout=SECONDS)",
      ["?tiemout"] = "option 'tiemout' has no value (timeout=SECONDS)",
      ["?timeout=1&wait"] = "option 'wait' has no value (timeout=SECONDS)",
      ["?timeout=abc"] = "timeout must be a number of seconds in (0, 86400], got 'abc'",
    }) do
      local s, err = resil.store(path .. query)
      assert.is_nil(s)
      assert.are.equal("store_unavailable", err.kind)
      assert.are.equal(("store %s%s: %s"):format(path, query, why), err.message)
      s, err = resil.store("redis://127.0.0.1:1/0" .. query)
      assert.is_nil(s)
      assert.are.equal(("store redis://127.0.0.1:1/0%s: %s"):format(query, why), err.message)
    end
    assert.is_nil(io.open(path))
    local s, err = resil.store("redis://127.0.0.1:99999/0")
    assert.is_nil(s)
    assert.are.equal("redis: port 99999 in URL redis://127.0.0.1:99999/0 is not one (1 to 65535)", err.message)
    assert(resil.store(path .. "?timeout=1&"))
  end)

  it("a Redis URL's down options are checked and named with the URL; a SQLite store has none", function()
    local redis = "redis://127.0.0.1:1/0"
    for query, why in pairs({
      ["?down=-1"] = "down must be a number of seconds in [0, 86400], got '-1'",
      ["?down_max=x"] = "down_max must be a number of seconds in [0, 86400], got 'x'",
      ["?down=5&down_max=2"] = "down_max must be at least down",
      ["?down_max=0.5"] = "down_max must be at least down", -- (down is 1 s unless the URL says)
      ["?down"] = "option 'down' has no value (down=SECONDS)",
      ["?probe=1"] = "unknown option 'probe' (known: timeout, down, down_max)",
    }) do
      local s, err = resil.store(redis .. query)
      assert.is_nil(s)
      assert.are.equal(("store %s%s: %s"):format(redis, query, why), err.message)
    end
    assert(resil.store(redis .. "?timeout=1&down=0.5&down_max=30"))
    local path = helpers.tmpname(".db")
    local s, err = resil.store(path .. "?down=1")
    assert.is_nil(s)
    assert.are.equal(("store %s?down=1: unknown option 'down' (known: timeout)"):format(path), err.message)
  end)

  -- SQLite's "unable to open database file" alone did not say why: now the
  -- system's reason follows. A file that is not a store is left as it was.
  it("a path that cannot be a store says why, naming it, and changes nothing there", function()
    local dir = helpers.tmpname("")
    assert.is_true(os.execute("mkdir " .. dir))
    helpers.write(dir .. "/file", "a file, not a folder")
    helpers.write(dir .. "/notes.txt", "not a store\n")
    assert.is_true(os.execute("mkfifo " .. dir .. "/pipe"))
    for path, why in pairs({
      [dir .. "/file/state.db"] = "store: cannot open %s: unable to open database file (Not a directory)",
      [dir] = "store: cannot open %s: unable to open database file (Is a directory)",
      [dir .. "/notes.txt"] = "store: %s: file is not a database",
      -- (as /dev/null, "for no store": "disk I/O error", and a /dev/null-journal made beside it)
      [dir .. "/pipe"] = "store: %s is not a regular file (a device, a pipe or a socket); a SQLite store is a file",
    }) do
      local s, err = resil.store(path)
      assert.is_nil(s)
      assert.are.equal("store_unavailable", err.kind)
      assert.are.equal(why:format(path), err.message)
    end
    assert.are.equal("not a store\n", helpers.slurp(dir .. "/notes.txt"))
    assert.are.equal("a file, not a folder", helpers.slurp(dir .. "/file"))
    assert.is_nil(io.open(dir .. "/notes.txt-wal"))
    assert.is_nil(io.open(dir .. "/pipe-journal"))
  end)

  -- A store path naming another program's database (a --store typo) made
  -- it a store: switched to WAL, which that program may not expect, and
  -- given ten tables; one with a table named as one of ours (kv) raised
  -- "table kv already exists" at a line of the host's own Lua.
  it("another program's SQLite database is refused, naming it, and left as it was", function()
    for _, schema in ipairs({ "CREATE TABLE users (id, name); INSERT INTO users VALUES (1, 'ann');",
                              "CREATE TABLE kv (id, name); INSERT INTO kv VALUES (1, 'ann');" }) do
      local path = helpers.tmpname(".db")
      assert.is_true(os.execute(("sqlite3 %s %q"):format(path, schema)))
      local s, err = resil.store(path)
      assert.is_nil(s)
      assert.are.equal("store_unavailable", err.kind)
      assert.are.equal("store: " .. path .. " is another program's SQLite database (it has tables and no store " ..
        "schema); not made a store", err.message)
      local r = helpers.run(("sqlite3 %s 'PRAGMA journal_mode' 'SELECT group_concat(name) FROM sqlite_master' " ..
        "'SELECT count(*) FROM %s'"):format(path, schema:match("TABLE (%w+)")))
      assert.are.equal("delete\n" .. schema:match("TABLE (%w+)") .. "\n1\n", r.stdout)
    end
    -- an empty file is a new store
    local empty = helpers.write(helpers.tmpname(".db"), "")
    assert.is_true(assert(resil.store(empty)):set("k", "v"))
  end)

  -- SQLite's errno there is its read-only retry's: "No such file or directory" for a store in a folder
  -- it may not write in. The folder is named with its own reason.
  it("a store in a folder it may not write in names the folder and why, and changes nothing there", function()
    local dir = helpers.tmpname("")
    assert.is_true(os.execute("mkdir " .. dir))
    local old = dir .. "/old.db"
    assert.is_true(assert(resil.store(old)):set("k", "v"))
    os.execute("cp " .. old .. " " .. dir .. "/copy.db") -- (a closed store: no -wal, no -shm)
    -- immutable even for root
    if not os.execute("chattr +i " .. dir .. " 2>/dev/null") then
      pending("chattr +i is not supported on this file system")
      return
    end
    finally(function() os.execute("chattr -i " .. dir) end)
    local s, err = resil.store(dir .. "/new.db")
    assert.is_nil(s)
    assert.are.equal(("store: cannot open %s/new.db: unable to open database file (folder %s: Operation not " ..
      "permitted)"):format(dir, dir), err.message)
    s, err = resil.store(dir .. "/copy.db")
    assert.is_nil(s)
    assert.are.equal(("store: %s/copy.db: unable to open database file (folder %s: Operation not permitted)"):format(
      dir, dir), err.message)
    assert.is_nil(io.open(dir .. "/new.db"))
  end)

  it("get/set/del/incr with TTL", function()
    local s = fresh_store()
    assert.is_true(s:set("greeting", "hello", 10))
    assert.are.equal("hello", s:get("greeting"))
    assert.are.equal(3, s:incr("hits", 3, 5))
    assert.are.equal(4, s:incr("hits"))
    resil.sleep(6)
    assert.are.equal(1, s:incr("hits")) -- expired, started over
    resil.sleep(5)
    assert.is_nil(s:get("greeting"))
    assert.is_true(s:set("k", "v"))
    assert.is_true(s:del("k"))
    assert.is_nil(s:get("k"))
    assert.has_error(function() s:set("t", {}) end)
  end)

  -- (before: SQLite took the text for 0, answered 1 and wrote "1" over it; Redis refuses it, "value is not a
  -- valid float", and keeps it)
  it("incr of a key whose value is text that is no number refuses, as on Redis, and leaves the text", function()
    local s = fresh_store()
    assert.is_true(s:set("name", "gpt-4o"))
    local n, err = s:incr("name")
    assert.is_nil(n)
    assert.are.equal("store_error", err.kind)
    assert.matches("not a number", err.message, 1, true)
    assert.are.equal("gpt-4o", s:get("name"))
    assert.is_true(s:set("count", "41"))
    assert.are.equal(42, s:incr("count"))
  end)

  it("a TTL, an increment or a key that cannot be one raises at the caller's line, and nothing is written", function()
    local s = fresh_store()
    local function raises(fn, pattern)
      local ok, err = pcall(fn)
      assert.is_false(ok)
      assert.matches("^spec/store_spec%.lua:%d+: " .. pattern, err)
    end
    -- (NaN was a key kept for good on SQLite, a store_error on Redis; a string an error from inside the store)
    for _, ttl in ipairs({ 0 / 0, -1, 0, math.huge, "10" }) do
      raises(function() s:set("t", "v", ttl) end, "store:set: ttl must be a number of seconds > 0")
      raises(function() s:incr("n", 1, ttl) end, "store:incr: ttl must be a number of seconds > 0")
    end
    raises(function() s:incr("n", 0 / 0) end, "store:incr: n must be a finite number")
    raises(function() s:incr("n", "x") end, "store:incr: n must be a finite number")
    -- (the string "10" named as a string: "not 10" read as if 10 were refused)
    raises(function() s:set("t", "v", "10") end, 'store:set: ttl must be .-, not the string "10"')
    raises(function() s:get(nil) end, "store:get: key must be a string")
    assert.is_nil(s:get("t"))
    assert.is_nil(s:get("n"))
    assert.are.equal(2, s:incr("n", 2, 10))
  end)

  it("group commit: what many tasks write in one turn is one transaction", function()
    local s = fresh_store()
    local before = s:stats().commits
    local tasks = {}
    for i = 1, 50 do tasks[i] = resil.spawn(function() return s:set("k" .. i, tostring(i)) end) end
    for i = 1, 50 do assert.are.same({ true, true }, { tasks[i]:join() }) end
    assert.are.equal(1, s:stats().commits - before)
    assert.are.equal("50", s:get("k50"))
  end)

  -- Stores were kept by their URL as written: x.db, ./x.db, sqlite://x.db and the absolute path
  -- opened a connection each to one file, each with its own group commit (taking the file's write
  -- lock from the others), sweeper and sync thread.
  it("is one per file, whatever URL names it (sqlite://, ./, .., a symlinked folder)", function()
    local dir, link = helpers.tmpname(""), helpers.tmpname("")
    assert.is_true(os.execute(("mkdir %s && ln -s %s %s"):format(dir, dir, link)))
    local s = assert(resil.store(dir .. "/x.db"))
    for _, url in ipairs({ "sqlite://" .. dir .. "/x.db", dir .. "/./x.db", dir .. "//x.db", link .. "/x.db",
                           dir .. "/missing/../x.db", "sqlite://" .. link .. "/x.db?" }) do
      assert.are.equal(s, resil.store(url), url)
    end
    assert.are.equal(dir .. "/x.db", s.url) -- (the URL of its first open, for messages)
    -- other options: a store of its own
    local quick = assert(resil.store("sqlite://" .. link .. "/x.db?timeout=1"))
    assert.are_not.equal(s, quick)
    assert.are.equal(quick, resil.store(dir .. "/x.db?timeout=1"))
    -- a file in folders not made yet: the same store once they are
    local new = assert(resil.store(link .. "/a/./b/../b/y.db"))
    assert.are.equal(new, resil.store(dir .. "/a/b/y.db"))
    assert.are_not.equal(s, new)
    assert.is_true(new:set("k", "v"))
    -- relative paths, from the working directory (a process of its own, started there)
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
local s = assert(resil.store("z.db"))
local same = 0
for _, url in ipairs({ "./z.db", "sqlite://z.db", "sqlite://./z.db", %q }) do
  if resil.store(url) == s then same = same + 1 end
end
assert(s:set("k", "v"))
print(same, io.popen("ls -l /proc/$PPID/fd | grep -c -e '/z.db$'"):read("a"))
]]):format(dir .. "/z.db"))
    local r = helpers.run(("cd %s && %s %s"):format(dir, helpers.resil, script))
    assert.are.equal("4\t1\n\n", r.stdout, r.stderr)
  end)

  it("on Redis, is one per server and database (the default port and database written or not)", function()
    local s = assert(resil.store("redis://127.0.0.1:1"))
    assert.are.equal(s, resil.store("redis://127.0.0.1:1/0"))
    assert.are.equal(s, resil.store("redis://127.0.0.1:1/"))
    assert.are_not.equal(s, resil.store("redis://127.0.0.1:1/1"))
    -- (127.0.0.2: no server of anyone's there, whose maxmemory the store would ask)
    local default = assert(resil.store("redis://127.0.0.2"))
    assert.are.equal(default, resil.store("redis://127.0.0.2:6379/0"))
    assert.are.equal("redis://127.0.0.2", default.url)
    assert.are_not.equal(default, resil.store("redis://127.0.0.2:6379/0?timeout=1"))
  end)
end)

describe("resil.once", function()
  local calls
  local function work(x)
    calls = calls + 1
    resil.sleep(1)
    return x * 2, { note = "ok" }
  end

  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
    fresh_store()
    calls = 0
  end)
  after_each(function() resil.log.level("info") end)

  it("runs fn once and replays its stored result", function()
    assert.are.same({ 42, { note = "ok" } }, { resil.once("job-1", work, 21) })
    assert.are.same({ 42, { note = "ok" } }, { resil.once("job-1", work, 21) })
    assert.are.equal(1, calls)
    assert.are.equal("integer", math.type((resil.once("job-1", work, 21))))
  end)

  -- (before: the arguments' fingerprint walked each cycle to a depth of 32, a path per way round:
  -- a tree's node that refers back to its batch never got past its fingerprint)
  it("takes arguments that refer back to themselves (a tree's nodes), in a process of its own", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run("timeout -s KILL 60 " .. helpers.resil .. " --store " .. db .. " " ..
      helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local batch = { items = {} }
for i = 1, 8 do batch.items[i] = { name = "n" .. i, batch = batch } end
print(resil.once("node", function(n) return "ran " .. n.name end, batch.items[1]))
print(resil.once("node", function(n) return "again " .. n.name end, batch.items[1]))
print(resil.once("node", function(n) return "other " .. n.name end, batch.items[2]))
]]))
    assert.are.equal(0, r.code, r.stderr)
    -- replayed for the same arguments; another node's are other arguments under the same key
    assert.matches("^ran n1\nran n1\nnil\tkey_reused", r.stdout)
  end)

  -- (before: each shared part was walked once per path to it: a DAG 40 deep, x = { a = x, b = x } at each level,
  -- 2^40 walks, the loop blocked for days; --max-instructions stops the process that still walks them)
  it("takes arguments that share their parts (a DAG 40 deep), in processes of their own", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local x = {}
for i = 1, 40 do x = { a = x, b = x, level = i, note = i == 20 and arg[1] or nil } end
print(require("resil.once").fingerprint(x))
print(resil.once("dag", function(t) return arg[2] .. " " .. t.a.a.level end, x))
]])
    local function once(leaf, word)
      local r = helpers.run(("timeout -s KILL 60 %s --max-instructions 10000000 --store %s %s %s %s"):format(
        helpers.resil, db, script, leaf, word))
      assert.are.equal(0, r.code, r.stderr)
      return r.stdout:match("^(%x+)\n(.*)$")
    end
    local fp1, out1 = once("leaf", "ran")
    local fp2, out2 = once("leaf", "again")
    local fp3, out3 = once("other leaf", "other")
    assert.are.equal("ran 38\n", out1)
    assert.are.equal(fp1, fp2) -- the same in every process: replayed
    assert.are.equal("ran 38\n", out2)
    assert.are_not.equal(fp1, fp3) -- a note 20 levels down (2^20 paths to it) is part of it
    assert.matches("^nil\tkey_reused", out3)
  end)

  -- A stored fingerprint must still match after an upgrade (a key in flight, a run resumed): these
  -- are the values it gave before shared parts were written once (for inputs without cycles, since 695f801)
  it("gives ordinary arguments the fingerprints they always had", function()
    local fp = require("resil.once").fingerprint
    local cases = {}
    local function case(name, ...) cases[name] = fp(...) end
    case("none")
    case("7", 7)
    case("scalars", 21, 2.5, -0.1, 1e300, true, false, "a\nb\0c\"", nil, print)
    local req = { model = "gpt-4o-mini", temperature = 0.2, max_tokens = 256,
      messages = { { role = "system", content = "You are terse." },
        { role = "user", content = "Summarise: " .. ("lorem ipsum "):rep(20) } } }
    case("request", req, "k", 3)
    case("item", { id = 1, name = "item 1", prompt = "describe picture 1", tags = { "a", "b" } })
    case("mixed keys", { [1] = "x", [2.5] = "y", [-3] = { z = true }, k = { 1, 2, { 3 } } })
    case("boolean keys", { [true] = 1, [false] = 0 })
    local batch = { items = {}, blob = ("x"):rep(2000) }
    for i = 1, 8 do batch.items[i] = { name = "n" .. i, batch = batch } end
    case("cycle", batch.items[1])
    local c = { x = 1, y = { "small" } }
    case("small shared", { a = c, b = c, c = { c, c } }) -- (shared parts under 1 KB are written each time)
    case("large equal copies", { doc = { text = ("x"):rep(2000) }, other = { text = ("x"):rep(2000) } })
    local L = { text = ("y"):rep(2000), n = 1 }
    case("large deeper then shallower", { a = { inner = L }, b = L }) -- (met nearer the top: written again)
    local list = { 0 }
    local node = list
    for j = 1, 100 do node.next = { j }; node = node.next end
    case("deep list", list)
    local dag = { v = 1 }
    for _ = 1, 6 do dag = { a = dag, b = dag } end -- (shared, each part under 1 KB)
    case("small dag", dag)
    local big = {}
    for i = 1, 3000 do big[i] = { id = i, name = "n" .. i } end
    case("large tree", { rows = big })
    assert.are.same({
      ["none"] = "096e60fea6b77e42",
      ["7"] = "03b8bf122330fe86",
      ["scalars"] = "35b966b7e961971f",
      ["request"] = "703f8f0e802e3284",
      ["item"] = "c524318bafd6e0dd",
      ["mixed keys"] = "b35a85b5e664502d",
      ["boolean keys"] = "6cd4e85d3b73fbed",
      ["cycle"] = "102980bdcf562118",
      ["small shared"] = "bd313a2c35f0d1b7",
      ["large equal copies"] = "ffb6460c2f91bced",
      ["large deeper then shallower"] = "4861fec0e45bb27b",
      ["deep list"] = "e2130b30e07c4e63",
      ["small dag"] = "e0d7764944e90c34",
      ["large tree"] = "7fbcd45c69a96bf2",
    }, cases)
  end)

  -- (before: a string key and a boolean one were neither before the other, so they came in each
  -- process's hash order: another process found its own key "reused", a resumed run diverged)
  it("gives arguments keyed by strings and booleans the same fingerprint in every process", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local flags = { [true] = "on", [false] = "off" }
for i = 1, 50 do flags["k" .. i] = i end
print(resil.once("flags", function() return arg[1] end, flags))
]])
    local outs = {}
    for i, word in ipairs({ "ran", "again", "once more" }) do
      local r = helpers.run(("%s --store %s %s '%s'"):format(helpers.resil, db, script, word))
      assert.are.equal(0, r.code, r.stderr)
      outs[i] = r.stdout
    end
    assert.are.same({ "ran\n", "ran\n", "ran\n" }, outs)
  end)

  it("callers in the same process wait for the one running it", function()
    local tasks = {}
    for i = 1, 5 do tasks[i] = resil.spawn(resil.once, "job-2", work, 5) end
    for i = 1, 5 do assert.are.same({ true, 10, { note = "ok" } }, { tasks[i]:join() }) end
    assert.are.equal(1, calls)
  end)

  it("says in_progress after a bounded wait when another process holds a fresh lease", function()
    local s = resil.store()
    assert.are.equal("claimed", helpers.backend(s):once_claim("job-3", resil.hash("[]"), "other-process", 300, 86400,
      resil.store_now(), resil.store_now() + 30))
    local t0 = resil.now()
    local res, err = resil.once({ key = "job-3", wait = 5, fingerprint = resil.hash("[]") }, work)
    assert.is_nil(res)
    assert.are.equal("in_progress", err.kind)
    assert.is_true(resil.now() - t0 <= 5)
    assert.are.equal(0, calls)
  end)

  it("takes over a stale lease", function()
    local s = resil.store()
    helpers.backend(s):once_claim("job-4", require("resil.once").fingerprint(7), "dead-process", 2, 86400,
      resil.store_now(), resil.store_now() + 30)
    resil.sleep(3)
    assert.are.equal(14, (resil.once({ key = "job-4", lease = 2 }, work, 7)))
    assert.are.equal(1, calls)
  end)

  it("refuses the same key with different arguments: key_reused", function()
    resil.once("job-5", work, 1)
    local res, err = resil.once("job-5", work, 2)
    assert.is_nil(res)
    assert.are.equal("key_reused", err.kind)
    assert.are.equal(1, calls)
  end)

  it("stores and replays a permanent failure; releases the key after a retryable one", function()
    local function refuse()
      calls = calls + 1
      return nil, resil.error("bad_request", "prompt refused", { status = 400, retryable = false })
    end
    local _, e1 = resil.once("job-6", refuse)
    local _, e2 = resil.once("job-6", refuse)
    assert.are.equal(1, calls)
    assert.are.equal("bad_request", e2.kind)
    assert.are.equal(400, e2.status)
    assert.are.equal(tostring(e1), tostring(e2))

    local function flaky()
      calls = calls + 1
      if calls < 2 then return nil, resil.error("server_error", "503", { retryable = true }) end
      return "finally"
    end
    calls = 0
    assert.is_nil((resil.once("job-7", flaky)))
    assert.are.equal("finally", (resil.once("job-7", flaky)))
    assert.are.equal("finally", (resil.once("job-7", flaky)))
    assert.are.equal(2, calls)
  end)

  -- (before: a bucket's "can never be granted" says retryable = false, so that no retry waits for
  -- it; kept as permanent, an Idempotency-Key's retry got the 429 for a day after its operator
  -- raised the burst)
  it("keeps no rate limit's refusal, not even one no wait cures (more than a bucket's burst)", function()
    local tiny = resil.bucket("once-tiny", { rate = 1, per = 1, burst = 10 })
    local function over()
      calls = calls + 1
      local ok, err = tiny:acquire(100)
      if not ok then return nil, err end
      return "granted"
    end
    local _, e1 = resil.once("job-8", over)
    assert.are.same({ "rate_limited", false }, { e1.kind, e1.retryable })
    resil.once("job-8", over)
    assert.are.equal(2, calls)
  end)

  -- (the gateway asks it before a key's rate limits: a claim there would hold the key for a request
  -- the limits then refuse)
  it("resil.once_replay reads a finished record's results, claiming nothing; anything else is false", function()
    local s = resil.store()
    local fp = require("resil.once").fingerprint
    assert.is_false(resil.once_replay("peek-none", 1))
    assert.are.equal("claimed", helpers.backend(s):once_claim("peek-none", fp(1), "other-process", 300, 86400,
      resil.store_now(), resil.store_now() + 30)) -- the read left the key free
    assert.is_false(resil.once_replay("peek-none", 1)) -- running elsewhere
    resil.once({ key = "peek-done", retention = 5 }, work, 1)
    assert.are.same({ true, 2, { note = "ok" } }, { resil.once_replay("peek-done", 1) })
    assert.is_false(resil.once_replay("peek-done", 2)) -- other arguments: resil.once says key_reused
    local refused = resil.error("bad_request", "prompt refused", { status = 400, retryable = false })
    resil.once({ key = "peek-failed", fingerprint = "f" }, function() return nil, refused end)
    local found, res, err = resil.once_replay({ key = "peek-failed", fingerprint = "f" })
    assert.are.same({ true, nil, 400 }, { found, res, err.status })
    resil.sleep(6) -- past the record's retention (kept until swept or claimed)
    assert.is_false(resil.once_replay("peek-done", 1))
    assert.are.equal(1, calls)
  end)

  it("releases the key when fn raises", function()
    assert.has_error(function() resil.once("job-8", function() calls = calls + 1; error("bug") end) end)
    assert.are.equal("fine", (resil.once("job-8", function() calls = calls + 1; return "fine" end)))
    assert.are.equal(2, calls)
  end)

  it("forgets a run whose caller was canceled once the run ends (nothing kept for good)", function()
    local seen = setmetatable({}, { __mode = "v" })
    local caller = resil.spawn(resil.once, "job-left", function()
      resil.sleep(1)
      local result = { text = ("x"):rep(1000) }
      seen[1] = result
      return result
    end)
    resil.sleep(0.5)
    caller:cancel()
    resil.sleep(1) -- the run goes on without its caller and stores its result
    collectgarbage()
    collectgarbage()
    assert.is_nil(seen[1])
    assert.are.equal(1000, #resil.once("job-left", function() error("run again") end).text)
  end)

  it("a retention, lease or wait that is no number of seconds raises at the caller's line; fn does not run", function()
    for _, o in ipairs({ { retention = 0 / 0 }, { retention = "1" }, { retention = math.huge }, { lease = -1 },
                         { wait = 0 / 0 } }) do
      o.key = "bad-options"
      local ok, err = pcall(function() local r = resil.once(o, work, 1) return r end)
      assert.is_false(ok)
      assert.matches("^spec/store_spec%.lua:%d+: resil%.once: %a+ must be a number of seconds >= 0", err)
    end
    assert.are.equal(0, calls)
    assert.are.same({ 2, { note = "ok" } }, { resil.once({ key = "bad-options", retention = 0 }, work, 1) })
  end)

  it("reaps records past their retention", function()
    resil.once({ key = "job-9", retention = 10 }, work, 1)
    resil.sleep(11)
    assert.are.equal(1, resil.once_reap())
    resil.once({ key = "job-9", retention = 10 }, work, 1)
    assert.are.equal(2, calls)
  end)

  it("sends its key as Idempotency-Key through a provider that asks for it", function()
    local call = require "policies.call"
    local m = resil.mock.start({})
    local p = call.provider("once-spec", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
                                           idempotency = true })
    assert(resil.once("order-77", function() return (assert(p({ json = { messages = {} } })).status) end))
    assert.are.equal(1, m:stats().keys["order-77"])
    m:stop()
  end)
end)

describe("resil.cost", function()
  before_each(function()
    resil.clock.virtual()
    fresh_store()
  end)

  it("records a durable ledger with totals and breakdowns", function()
    resil.cost.record({ provider = "openai", model = "gpt-4o", operation = "chat", user = "u1", usd = 0.25,
                        units = { input_tokens = 100, output_tokens = 50 } })
    resil.cost.record({ provider = "openai", model = "gpt-4o-mini", user = "u2", usd = 0.05 })
    resil.cost.record({ provider = "replicate", model = "flux", user = "u1", usd = 1.1 })
    assert.are.equal(1.4, resil.cost.total())
    assert.are.equal(1.35, resil.cost.total({ user = "u1" }))
    local by = resil.cost.breakdown("provider")
    assert.are.same({ key = "replicate", usd = 1.1, calls = 1 }, by[1])
    assert.are.same({ key = "openai", usd = 0.3, calls = 2 }, by[2])
    assert.are.equal(1, #resil.cost.breakdown("day"))
    assert.has_error(function() resil.cost.record({ usd = -1 }) end)
  end)

  it("a record with the same id is kept once", function()
    resil.cost.record({ provider = "p", usd = 1, id = "charge-1" })
    resil.cost.record({ provider = "p", usd = 1, id = "charge-1" })
    assert.are.equal(1, resil.cost.total())
  end)
end)

-- (before: a spec's `resil.store_config({ url = ":memory:" })` took steps, once and budgets, then
-- failed at its first sum of the ledger, "[resil store_sqlite]:325: store :memory:: no such table:
-- costs": those reads ran on a connection of their own, another, empty database)
describe("a store in memory (:memory:)", function()
  before_each(function() resil.clock.virtual() end)
  after_each(function() resil.store_config({ url = helpers.tmpname(".db") }) end)

  for _, url in ipairs({ ":memory:", "file::memory:", "sqlite://:memory:" }) do
  it("reads what it holds: the ledger's sums and budgets (" .. url .. ")", function()
    resil.store_config({ url = url })
    local t = assert(resil.budget("user:mem", { limit = 1, per = "day" }):reserve(0.6))
    t:settle(0.25)
    assert(resil.cost.record({ provider = "openai", model = "gpt-4o", user = "u1", usd = 0.5 }))
    assert.are.equal(0.75, resil.cost.total())
    assert.are.same({ key = "gpt-4o", usd = 0.5, calls = 1 }, resil.cost.breakdown("model")[1])
    assert.are.equal(0.25, resil.budget("user:mem"):state().spent)
    local ran = 0
    resil.step("mem step", function() ran = ran + 1 end)
    assert.are.equal(1, ran)
  end)
  end
end)

describe("resil.cost with wait = false (db:enqueue), against another process's write lock", function()
  -- a store with its schema, and another process (sqlite3) that takes its
  -- write lock and keeps it until the file `release` exists
  local function locked_store()
    local db = helpers.tmpname(".db")
    assert.are.equal(0, helpers.run_script('assert(require("resil").cost.total())', "--store " .. db).code)
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.write(release, "") end)
    return db, release
  end
  local function total(db)
    return helpers.run_script('print(require("resil").cost.total({ provider = "later" }))', "--store " .. db).stdout
  end

  -- a script that records 20 rows without waiting, then runs `after`
  -- (RELEASE in it: the file that makes the other process let go) -> its result
  local function record_then(db, release, after, timeout)
    local store = timeout and ("'sqlite://%s?timeout=%s'"):format(db, timeout) or db
    return helpers.run_script([[
local resil = require "resil"
resil.log.level("off")
for i = 1, 20 do assert(resil.cost.record({ provider = "later", usd = 0.01, id = "L" .. i, wait = false })) end
]] .. after:gsub("RELEASE", release), "--store " .. store)
  end

  it("returns at once while the lock is held; the rows are written once it is let go", function()
    resil.clock.real()
    local db, release = locked_store()
    local r = record_then(db, release, [[
print("returned")
io.open("RELEASE", "w"):close() -- the other process lets go
print(resil.cost.total({ provider = "later" })) -- a read, queued after the rows
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("returned\n0.2\n", r.stdout)
  end)

  it("past 10,000 rows queued, the next caller waits for its own write instead of queueing more", function()
    resil.clock.real()
    local db, release = locked_store()
    local r = record_then(db, release, [[
for i = 1, 9980 do assert(resil.cost.record({ provider = "later", usd = 0.01, wait = false })) end
os.execute("(sleep 0.3; touch RELEASE) &")
assert(resil.cost.record({ provider = "later", usd = 0.01, wait = false })) -- the lock is let go meanwhile
local f = io.open("RELEASE")
print(f ~= nil)
print(resil.cost.breakdown("provider")[1].calls)
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\n10001\n", r.stdout)
  end)

  it("past 10,000 rows queued, a caller outside a task (a plain coroutine) has its row written by a task of its " ..
     "own; it does not raise", function()
    resil.clock.real()
    local db, release = locked_store()
    local r = record_then(db, release, [[
for i = 1, 9980 do assert(resil.cost.record({ provider = "later", usd = 0.01, wait = false })) end
print(pcall(coroutine.wrap(function() return resil.cost.record({ provider = "later", usd = 0.01, wait = false }) end)))
io.open("RELEASE", "w"):close() -- the other process lets go
local deadline = resil.clock.wall() + 10
repeat resil.sleep(0.02) until resil.cost.breakdown("provider")[1].calls == 10001 or resil.clock.wall() > deadline
print(resil.cost.breakdown("provider")[1].calls)
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\ttrue\n10001\n", r.stdout)
  end)

  it("rows still queued when the process ends are written as it closes the store, once the lock is free", function()
    resil.clock.real()
    local db, release = locked_store()
    local r = record_then(db, release, [[os.execute("(sleep 0.3; touch RELEASE) &")]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("0.2\n", total(db))
  end)

  it("a lock held past the store's timeout: the rows are tried again until they are written", function()
    resil.clock.real()
    local db, release = locked_store()
    local r = record_then(db, release, [[
os.execute("(sleep 1; touch RELEASE) &") -- past the timeout of 0.2 s
local deadline = resil.clock.wall() + 20
repeat resil.sleep(0.1) until (resil.cost.total({ provider = "later" }) or 0) >= 0.2 or resil.clock.wall() > deadline
print(resil.cost.total({ provider = "later" }))
]], 0.2)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("0.2\n", r.stdout)
    assert.are.equal("0.2\n", total(db))
  end)

  it("a lock held past the store's timeout, then SIGTERM: the rows waiting for it are written as it stops", function()
    resil.clock.real()
    local db, release = locked_store()
    local r = record_then(db, release, [[
resil.sleep(0.5) -- past the timeout of 0.2 s: the rows wait on
io.open("RELEASE", "w"):close() -- the other process lets go, while this one is stopped
os.execute("kill -TERM " .. io.open("/proc/self/stat"):read("l"):match("^(%d+)"))
resil.sleep(10)
]], 0.2)
    assert.are.equal(143, r.code, r.stderr)
    assert.are.equal("0.2\n", total(db))
  end)
  it("os.exit(0) right after rows recorded without waiting: they are written (the host closes its state first)",
    function()
      resil.clock.real()
      local db = helpers.tmpname(".db")
      local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 3 do assert(resil.cost.record({ provider = "later", usd = 0.25, id = "exit-" .. i, wait = false })) end
os.exit(0)
]], "--store " .. db)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("0.75\n", total(db))
    end)

  it("the lock held past SIGTERM: each row it could not write is kept in the ledger's journal, named in the log",
    function()
      resil.clock.real()
      local db = locked_store()
      local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 3 do assert(resil.cost.record({ provider = "later", usd = 0.25, id = "held-" .. i, wait = false })) end
resil.sleep(0.3)
os.execute("kill -TERM " .. io.open("/proc/self/stat"):read("l"):match("^(%d+)"))
resil.sleep(10)
]], ("--store 'sqlite://%s?timeout=0.2'"):format(db))
      assert.are.equal(143, r.code, r.stderr)
      -- (before the journal: each "was not written before the process ended; its cost is not in the ledger")
      assert.are.same({}, helpers.rows_logged_lost(r.stderr), r.stderr)
      assert.are.same({ "held-1 0.25", "held-2 0.25", "held-3 0.25" }, helpers.rows_logged_kept(r.stderr), r.stderr)
    end)
end)

describe("resil.cost with wait = false on the virtual clock", function()
  it("a row recorded without waiting is in the store before time moves on", function()
    resil.clock.real()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script(([[
local resil = require "resil"
resil.clock.virtual()
assert(resil.cost.record({ provider = "later", usd = 0.25, wait = false }))
resil.sleep(10)
local f = io.popen("sqlite3 %s 'SELECT count(*) FROM costs'") -- another process
print(f:read("a"))
f:close()
]]):format(db), "--store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\n\n", r.stdout)
  end)
end)

describe("db:enqueue misused", function()
  it("raises, and keeps nothing of the call (its done is collected)", function()
    local db = assert(resil.sqlite.open(helpers.tmpname(".db")))
    local alive = setmetatable({}, { __mode = "k" })
    do
      local done = function() end
      alive[done] = true
      assert.has_error(function() db:enqueue(done, "not a function") end)
    end
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(alive), "the done callback is still referenced")
    db:close()
  end)
end)

describe("a group commit whose transaction SQLite ends early (disk full, an I/O error)", function()
  it("fails every op of the batch and writes none: an op after the end is not committed on its own", function()
    local db = assert(resil.sqlite.open(helpers.tmpname(".db")))
    assert(db:tx(function(tx) tx:exec("CREATE TABLE t (x INTEGER)") return true end))
    local outcomes = {}
    local function done(i) return function(err) outcomes[i] = err and err.kind or "written" end end
    -- one batch: queued in the same turn
    db:enqueue(done(1), function(tx) tx:exec("INSERT INTO t VALUES (1)") end)
    -- what SQLite does itself after SQLITE_FULL or SQLITE_IOERR: the whole transaction rolled back
    db:enqueue(done(2), function(tx) tx:exec("ROLLBACK") end)
    db:enqueue(done(3), function(tx) tx:exec("INSERT INTO t VALUES (3)") end)
    assert.is_true(helpers.wait_until(function() return outcomes[3] ~= nil end, 5))
    assert.are.same({ "store_unavailable", "store_unavailable", "store_unavailable" }, outcomes)
    assert.are.same({}, assert(db:tx(function(tx) return tx:rows("SELECT x FROM t") end)))
    -- and the store goes on: the next batch is written
    db:enqueue(done(4), function(tx) tx:exec("INSERT INTO t VALUES (4)") end)
    assert.is_true(helpers.wait_until(function() return outcomes[4] ~= nil end, 5))
    assert.are.equal("written", outcomes[4])
    db:close()
  end)
end)

describe("resil.budget", function()
  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
    fresh_store()
  end)
  after_each(function() resil.log.level("info") end)

  it("1000 concurrent reservations of $0.10 against $5 admit exactly 50", function()
    local b = resil.budget("concurrent", { limit = 5 })
    local admitted, refused = 0, 0
    resil.map(resil.spawn and (function()
      local t = {}
      for i = 1, 1000 do t[i] = i end
      return t
    end)(), function()
      local ticket, err = b:reserve(0.10)
      if ticket then admitted = admitted + 1 else
        assert.are.equal("budget_exceeded", err.kind)
        refused = refused + 1
      end
      return true
    end, { concurrency = 1000 })
    assert.are.equal(50, admitted)
    assert.are.equal(950, refused)
    local state = b:state()
    assert.are.same({ 0, 5, 5, "all", 50 }, { state.spent, state.reserved, state.limit, state.period, #state.holds })
  end)

  it("settle replaces the reservation by the actual cost, once", function()
    local b = resil.budget("settle", { limit = 1 })
    local t = assert(b:reserve(0.6))
    assert.is_true(t:settle(0.4, { provider = "openai" }))
    assert.is_false(t:settle(0.4))
    assert.are.same({ spent = 0.4, reserved = 0, limit = 1, period = "all", holds = {} }, b:state())
    assert.are.equal(0.4, resil.cost.total({ budget = "settle" }))
    assert.is_truthy(b:reserve(0.6))
  end)

  it("release frees the reservation; an expired one stops counting", function()
    local b = resil.budget("expiry", { limit = 1, hold = 10 })
    local t = assert(b:reserve(1))
    assert.is_nil((b:reserve(0.5)))
    assert.is_true(t:release())
    assert.is_truthy(b:reserve(0.9))
    resil.sleep(11)
    assert.is_truthy(b:reserve(1))
  end)

  it("per day: a new day starts a new period", function()
    local b = resil.budget("daily", { limit = 1, per = "day" })
    assert(b:reserve(1)):settle(1)
    assert.is_nil((b:reserve(0.01)))
    resil.sleep(86400)
    assert.is_truthy(b:reserve(1))
  end)
end)

describe("a store on a slow disk (fdatasync made slow by an LD_PRELOAD shim)", function()
  local shim
  setup(function()
    local src = helpers.write(helpers.tmpname(".c"), [[
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
#include <errno.h>
#include <stdio.h>
/* counted (a byte per sync appended to SYNC_LOG), slow, and failing (EIO) while the file SYNC_FAIL_FILE names exists */
static int slow(void) {
  const char *ms = getenv("SLOW_SYNC_MS"), *fail = getenv("SYNC_FAIL_FILE"), *log = getenv("SYNC_LOG");
  if (log) { FILE *f = fopen(log, "a"); if (f) { fputs("s", f); fclose(f); } }
  if (ms) usleep(atoi(ms) * 1000);
  if (fail && access(fail, F_OK) == 0) { errno = EIO; return -1; }
  return 0;
}
int fdatasync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fdatasync"); return slow() ? -1 : real(fd); }
int fsync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fsync"); return slow() ? -1 : real(fd); }
]])
    shim = helpers.tmpname(".so")
    assert(os.execute(("cc -shared -fPIC -o %s %s -ldl"):format(shim, src)), "cc could not build the shim")
  end)

  -- a new store, opened (and its migrations synced) before the disk turns slow -> its path
  local function store_before_slow()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script('assert(require("resil").store())', "--store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    return db
  end

  -- source run on db with every sync taking 500 ms (ASAN_OPTIONS: under
  -- `make check` the sanitizer runtime would insist on coming first)
  local function slow_run(db, source, env)
    return helpers.run(("%s SLOW_SYNC_MS=500 ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s --store %s %s")
      :format(env or "", shim, helpers.resil, db, helpers.write(helpers.tmpname(".lua"), source)))
  end

  it("does not stop the loop while a commit is made durable; the writer continues only once it is", function()
    local r = slow_run(store_before_slow(), [[
local resil = require "resil"
local order = {}
local server = resil.server.listen({ port = 0, handler = function() return { status = 200, body = "ok" } end })
local writer = resil.spawn(function()
  assert(resil.cost.record({ provider = "slow-disk", usd = 0.25 }))
  order[#order + 1] = "durable"
end)
local reader = resil.spawn(function()
  assert(resil.http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()) }))
  order[#order + 1] = "http"
end)
writer:join()
reader:join()
print(table.concat(order, " "))
print(resil.cost.total({ provider = "slow-disk" }))
]])
    assert.are.equal(0, r.code, r.stderr)
    -- the HTTP round trip went on during the half-second sync; the record returned after it
    assert.are.equal("http durable\n0.25\n", r.stdout)
  end)

  -- (a tester's find: the cancel, held for the settling write, was then held by a shield the task
  -- entered without waiting in between, as if it had come during the shield)
  it("a task canceled while its write is made durable is canceled at its next wait, a resil.shield entered " ..
     "after the write included: the shield holds off only cancels that come while it runs", function()
    local r = slow_run(store_before_slow(), [[
local resil = require "resil"
local order = {}
local writer = resil.spawn(function()
  assert(resil.cost.record({ provider = "slow-disk", usd = 0.25 }))
  order[#order + 1] = "durable"
  resil.shield(function()
    resil.sleep(0.01)
    order[#order + 1] = "shielded work"
  end)
end)
resil.sleep(0.1) -- (the commit is made; its sync takes 500 ms)
assert(writer:cancel())
local ok, err = writer:join()
print(ok, err.kind, table.concat(order, " "))
]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\tcanceled\tdurable\n", r.stdout)
  end)

  it("a cost recorded with sync = false continues at the commit, and survives a kill -9 before the sync", function()
    local db = store_before_slow()
    local r = slow_run(db, [[
local resil = require "resil"
local order = {}
local server = resil.server.listen({ port = 0, handler = function() return { status = 200, body = "ok" } end })
local fast = resil.spawn(function()
  assert(resil.cost.record({ provider = "committed", usd = 0.5, sync = false }))
  order[#order + 1] = "committed"
  assert(resil.http.request({ url = ("http://127.0.0.1:%d/"):format(server:port()) }))
  order[#order + 1] = "http"
end)
local durable = resil.spawn(function()
  assert(resil.cost.record({ provider = "durable", usd = 0.25 }))
  order[#order + 1] = "durable"
end)
fast:join()
durable:join()
print(table.concat(order, " "))
]])
    assert.are.equal(0, r.code, r.stderr)
    -- in one batch: the sync = false row's caller went on (an HTTP round trip) while the other waited
    assert.are.equal("committed http durable\n", r.stdout)
    -- killed before the committed row is synced: the row is there
    r = slow_run(db, [[
local resil = require "resil"
assert(resil.cost.record({ provider = "killed", usd = 0.125, sync = false }))
os.execute("kill -9 " .. io.open("/proc/self/stat"):read("l"):match("^(%d+)")) -- this process
os.exit(3) -- (not reached)
]])
    assert.are.equal(137, r.code)
    r = helpers.run_script('print(require("resil").cost.total({ provider = "killed" }))', "--store " .. db)
    assert.are.equal("0.125\n", r.stdout)
  end)

  it("sync = false writes go on during another write's sync, and share a sync of their own, not one each", function()
    local db = store_before_slow()
    -- a durable row and n sync = false rows at once -> output, syncs made
    local function run(n)
      local log = helpers.tmpname(".log")
      -- (a sync long enough for 20 commits one after another on a slow, loaded machine)
      local out = helpers.run(("SYNC_LOG=%s SLOW_SYNC_MS=1500 ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s " ..
        "--store %s %s"):format(log, shim, helpers.resil, db, helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
local order = {}
local durable = resil.spawn(function()
  assert(resil.cost.record({ provider = "durable", usd = 0.25 }))
  order[#order + 1] = "durable"
end)
local ledger = resil.spawn(function()
  for i = 1, N do assert(resil.cost.record({ provider = "ledger", usd = 0.01, sync = false, id = "N" .. i })) end
  order[#order + 1] = N .. " ledger rows"
end)
durable:join()
ledger:join()
print(table.concat(order, ", "))
]]):gsub("N", tostring(n)))))
      assert.are.equal(0, out.code, out.stderr)
      return out.stdout, #helpers.slurp(log)
    end
    local _, baseline = run(0)
    local out, syncs = run(20)
    -- one after another, the 20 rows committed while the durable one's sync ran
    assert.are.equal("20 ledger rows, durable\n", out)
    -- the same syncs as the durable row alone, plus one or two for the 20 rows (not 20)
    assert.is_true(syncs - baseline <= 2, ("syncs: %d, %d for the durable row alone"):format(syncs, baseline))
    local r = helpers.run_script('print(require("resil").cost.total({ provider = "ledger" }))', "--store " .. db)
    assert.are.equal("0.2\n", r.stdout)
  end)

  it("sync = false writes that make the WAL due for a checkpoint during another write's sync: both go on", function()
    local db = store_before_slow()
    local r = slow_run(db, [[
local resil = require "resil"
local durable = resil.spawn(function()
  assert(resil.cost.record({ provider = "durable", usd = 0.25 }))
  return "durable"
end)
local ledger = resil.spawn(function()
  for i = 1, 6000 do assert(resil.cost.record({ provider = "ledger", usd = 0.001, sync = false, id = "l" .. i })) end
  return "ledger"
end)
print(select(2, ledger:join()), select(2, durable:join()))
]], "timeout 30 env")
    -- (a second sync asked for while one was under way took its batch's place: the durable write never returned)
    assert.are.equal(0, r.code, "exit " .. tostring(r.code) .. " " .. r.stderr)
    assert.are.equal("ledger\tdurable\n", r.stdout)
  end)

  it("a task canceled while its write is made durable gets the result first: its <close> gives the hold back",
    function()
      local db, log = store_before_slow(), helpers.tmpname(".log")
      local r = slow_run(db, [[
local resil = require "resil"
local function syncs() local f = io.open(os.getenv("SYNC_LOG")); local n = f and #f:read("a") or 0; if f then f:close() end; return n end
local b = resil.budget("cancel-sync", { limit = 1, hold = 600 })
assert(b:reserve(0.05)):release() -- the budget declared, the owner's lease written
local released
local before = syncs()
local t = resil.spawn(function()
  local ticket = assert(b:reserve(0.9))
  local _ <close> = setmetatable({}, { __close = function() released = resil.spawn(ticket.release, ticket) end })
  resil.sleep(60)
end)
repeat resil.sleep(0.005) until syncs() > before -- the reservation is committed; its half-second sync is under way
t:cancel()
t:join()
assert(released, "the task got its ticket and gave it back")
released:join()
local st = b:state()
print(st.reserved, #st.holds)
]], "SYNC_LOG=" .. log)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("0.0\t0\n", r.stdout)
    end)

  it("a task canceled during its write's sync that ends before waiting again ends canceled, once", function()
    local db, log = store_before_slow(), helpers.tmpname(".log")
    local r = slow_run(db, [[
local resil = require "resil"
local function syncs() local f = io.open(os.getenv("SYNC_LOG")); local n = f and #f:read("a") or 0; if f then f:close() end; return n end
local before = syncs()
local t = resil.spawn(function() assert(resil.store():set("k", "v")); return "done" end)
repeat resil.sleep(0.005) until syncs() > before -- its write committed, the sync under way
print(t:cancel(), t:cancel())
print(t:join())
print(t:status(), resil.store():get("k"))
]], "SYNC_LOG=" .. log)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\tfalse\nfalse\tcanceled: task 2 was canceled\ncanceled\tv\n", r.stdout)
    assert.are.equal("", r.stderr)
  end)

  it("a failed sync keeps the committed write's result (a retry would charge twice) and refuses later writes",
    function()
      local db, fail = helpers.tmpname(".db"), helpers.tmpname(".fail")
      assert.are.equal(0, helpers.run_script('assert(require("resil").store())', "--store " .. db).code)
      local r = slow_run(db, ([[
local resil = require "resil"
assert(resil.cost.record({ provider = "eio", usd = 0.25 }))
io.open(%q, "w"):close()
print(resil.cost.record({ provider = "eio", usd = 0.25 }))
os.remove(%q)
local ok, err = resil.cost.record({ provider = "eio", usd = 0.25 })
print(ok, err.kind)
]]):format(fail, fail), "SYNC_FAIL_FILE=" .. fail)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("true\nnil\tstore_unavailable\n", r.stdout)
      assert.matches("the disk failed a sync", r.stderr)
      r = helpers.run_script('print(require("resil").cost.total({ provider = "eio" }))', "--store " .. db)
      assert.are.equal("0.5\n", r.stdout)
    end)

  -- A write that found another process's write lock during a sync under way
  -- waited for the sync, and the end of the sync did not flush it (the lock
  -- wait was still marked): it never ran, nor any write after it.
  it("a sync = false write that finds another process's write lock during a sync under way still commits",
    function()
      local db, locked = helpers.tmpname(".db"), helpers.tmpname(".locked")
      local r = slow_run(db, ([[
local resil = require "resil"
local db = resil.sqlite.open(%q)
db:now(function(tx) tx:exec("CREATE TABLE IF NOT EXISTS t (x)") end)
db:commit_only(function(tx) tx:exec("INSERT INTO t VALUES (1)") end)
resil.sleep(0.05) -- its sync, 10 ms later, is under way (half a second)
-- another process takes the write lock for 0.1 s (the shell says so once it has it)
os.execute(("printf '.timeout 10000\\nBEGIN IMMEDIATE;\\n.shell echo locked > %%s\\n.shell sleep 0.1\\nCOMMIT;\\n' | env -u LD_PRELOAD sqlite3 -bail %%s &")
  :format(%q, %q))
while not io.open(%q) do resil.sleep(0.005) end
local t = resil.spawn(function()
  db:commit_only(function(tx) tx:exec("INSERT INTO t VALUES (2)") end)
  db:tx(function(tx) tx:exec("INSERT INTO t VALUES (3)") end)
end)
local deadline = resil.clock.wall() + 5
while t:status() ~= "done" and resil.clock.wall() < deadline do resil.sleep(0.01) end
print(t:status(), db:read(function(tx) return tx:value("SELECT count(*) FROM t") end))
os.exit(0)
]]):format(db, locked, db, locked))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("done\t3\n", r.stdout)
    end)

  -- close syncs the sync = false writes not yet synced, but skipped that when
  -- a sync was under way: one that committed during it was left unsynced
  -- (another process keeping the store open, SQLite does not checkpoint)
  it("closing makes a sync = false write durable that committed during another write's sync", function()
    local db, log = helpers.tmpname(".db"), helpers.tmpname(".log")
    local r = slow_run(db, ([[
local resil = require "resil"
local keep = resil.sqlite.open(%q) -- as another process would
local db = resil.sqlite.open(%q)
db:now(function(tx) tx:exec("CREATE TABLE IF NOT EXISTS t (x)") end)
keep:read(function(tx) return tx:value("SELECT count(*) FROM t") end) -- it has the store open
local durable = resil.spawn(function() db:tx(function(tx) tx:exec("INSERT INTO t VALUES (1)") end) end)
resil.sleep(0.05) -- its sync is under way
db:commit_only(function(tx) tx:exec("INSERT INTO t VALUES (2)") end)
local function syncs() local f = io.open(%q); local n = #f:read("a"); f:close(); return n end
local before = syncs()
db:close()
durable:join()
print(syncs() - before)
keep:close()
]]):format(db, db, log), "SYNC_LOG=" .. log)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\n", r.stdout)
  end)

  it("a store collected or closed with a sync under way: the virtual clock goes on, close does not refuse", function()
    local path = helpers.tmpname(".db")
    local r = helpers.run(("timeout 20 %s --virtual-clock %s"):format(helpers.resil, helpers.write(helpers.tmpname(".lua"),
      ([[
local resil = require "resil"
resil.spawn(function()
  local db = resil.sqlite.open(%q)
  db:now(function(tx) tx:exec("CREATE TABLE IF NOT EXISTS t (x)") end)
  db:commit_only(function(tx) tx:exec("INSERT INTO t VALUES (1)") end)
  db = nil
  collectgarbage()
  collectgarbage()
  local other = resil.sqlite.open(%q)
  other:commit_only(function(tx) tx:exec("INSERT INTO t VALUES (2)") end)
  print(pcall(other.close, other))
end):join()
resil.sleep(10)
print("slept")
]]):format(path, path))))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\nslept\n", r.stdout)
  end)
end)

-- (before: a get was a write transaction, so another process's long one made every gateway key
-- lookup wait for it, then fail as store_unavailable)
describe("store:get against another process's write lock", function()
  it("reads at once; an expired key reads as nil and its row is dropped once the lock is let go", function()
    resil.clock.real()
    local s, path = fresh_store()
    assert(s:set("kept", "v1"))
    assert(s:set("short", "v2", 0.05))
    resil.sleep(0.1)
    local release = helpers.hold_write_lock(path)
    finally(function() helpers.write(release, "") end)
    local t0 = resil.now()
    assert.are.equal("v1", s:get("kept"))
    assert.is_nil(s:get("short"))
    assert.is_nil(s:get("missing"))
    assert.is_true(resil.now() - t0 < 1, "a get waited for the writer: " .. (resil.now() - t0))
    helpers.write(release, "")
    assert.is_true(helpers.wait_until(function()
      local out = helpers.run(("sqlite3 %s \"SELECT count(*) FROM kv WHERE key = 'short'\""):format(path)).stdout
      return out:match("^0") ~= nil
    end, 10))
    assert.are.equal("v1", s:get("kept"))
  end)
end)

describe("a shared breaker's half-open probe (SQLite)", function()
  it("canceled before it reports gives its slot back at once, not at probe_timeout", function()
    resil.clock.virtual()
    fresh_store()
    local br = resil.breaker("probe-cancel", { shared = true, window_type = "count", window = 1, min_calls = 1,
      failure_rate = 0.5, open_for = 5, probe_timeout = 3600 })
    br:record(false, 0.01)
    assert.is_nil((br:allow()))
    resil.sleep(6)
    local caller = resil.spawn(function() return br:call(function() resil.sleep(100) end) end)
    resil.sleep(1)
    assert.is_nil((br:allow())) -- (the probe runs: its slot is taken, in every process)
    caller:cancel()
    resil.sleep(0.01)
    -- (it stayed taken for probe_timeout, an hour here, every process refused with nobody probing)
    local ok, probe = br:allow()
    assert.is_true(ok)
    assert.are.equal("probe", probe)
    br:record(true, 0.01)
    assert.are.equal("closed", br:state())
  end)
end)

describe("a shared breaker's half-open probe and a call from before it opened (SQLite)", function()
  it("a call let through closed that ends while the probe is out is not taken for the probe's outcome", function()
    -- (before: its late failure re-opened it for every process, and the probe's success was dropped)
    resil.clock.virtual()
    fresh_store()
    local br = resil.breaker("probe-late", { shared = true, window_type = "count", window = 1, min_calls = 1,
      failure_rate = 0.5, open_for = 5 })
    local late = resil.spawn(function()
      return br:call(function() resil.sleep(6); return nil, resil.error("timeout", "sent before the outage") end)
    end)
    resil.sleep(0.1) -- (its allow asks the store)
    br:record(false, 0.01)
    assert.are.equal("open", br:state())
    resil.sleep(5)
    local probe = resil.spawn(function() return br:call(function() resil.sleep(2); return "back" end) end)
    resil.sleep(0.5)
    assert.is_nil((br:allow())) -- (the probe is out, in every process)
    late:join()
    assert.are.equal("half_open", br:state())
    assert.are.same({ true, "back" }, { probe:join() })
    assert.are.equal("closed", br:state())
  end)
end)

describe("a shared breaker whose probes fail in a row (SQLite)", function()
  -- (before: each failed probe opened it for open_for again, open_for_max and backoff taken and ignored)
  it("opens for longer each time, by its backoff, up to open_for_max, as a local one does", function()
    resil.clock.virtual()
    fresh_store()
    local br = resil.breaker("shared-backoff", { shared = true, window_type = "count", window = 1, min_calls = 1,
      open_for = 5, open_for_max = 12, backoff = 2 })
    local function open_for()
      local _, err = br:allow()
      return err.retry_after
    end
    br:record(false, 0.01)
    local waits = { open_for() }
    for _ = 1, 3 do
      resil.sleep(waits[#waits])
      assert.are.equal("probe", select(2, br:allow()))
      br:record(false, 0.01, "probe")
      waits[#waits + 1] = open_for()
    end
    assert.are.same({ 5, 10, 12, 12 }, waits)
    resil.sleep(12)
    assert.are.equal("probe", select(2, br:allow()))
    br:record(true, 0.01, "probe")
    assert.are.equal("closed", br:state())
    br:record(false, 0.01) -- (a new outage starts from open_for)
    assert.are.equal(5, open_for())
  end)
end)

describe("a shared breaker's slow probe (SQLite)", function()
  -- (before: a probe that succeeded past slow_call closed it for every process; a local breaker counts
  -- it as a failed probe, and opens again)
  it("is a failed probe: the breaker opens again, as a local one does", function()
    resil.clock.virtual()
    fresh_store()
    local br = resil.breaker("shared-slow", { shared = true, window_type = "count", window = 1, min_calls = 1,
      open_for = 5, slow_call = 10, slow_call_rate = 1 })
    br:record(false, 0.01)
    resil.sleep(5)
    assert.are.same({ "slow" }, { br:call(function() resil.sleep(12); return "slow" end) })
    assert.are.equal("open", br:state())
    resil.sleep(10)
    assert.are.same({ "quick" }, { br:call(function() resil.sleep(1); return "quick" end) })
    assert.are.equal("closed", br:state())
  end)
end)

describe("a shared breaker's stats (SQLite)", function()
  -- (before: its local window's, state closed and named "<name>:local", while the store held it open)
  it("say the state the store holds, as state() does, under its own name", function()
    resil.clock.real() -- (another process shares the store: its time must be real time)
    finally(function() resil.clock.virtual() end)
    fresh_store()
    local br = resil.breaker("shared-stats", { shared = true, open_for = 5 })
    assert.are.equal("closed", br:stats().state)
    local other = helpers.run_script([[
local resil = require "resil"
local br = resil.breaker("shared-stats", { shared = true, window_type = "count", window = 1, min_calls = 1 })
br:record(false, 0.01)
print(br:state())
]], "--store " .. resil.store().url .. " --log-level off")
    assert.are.equal("open\n", other.stdout, other.stderr)
    local st = br:stats()
    assert.are.same({ "shared-stats", "open" }, { st.name, st.state })
    assert.is_true(st.retry_after > 0 and st.retry_after <= 30, tostring(st.retry_after))
    assert.are.equal(0, st.calls) -- (the window is this process's)
  end)
end)

describe("a shared breaker's metrics (SQLite)", function()
  -- (before: resil_breaker_state and resil_breaker_rejected_total were its local window's, named
  -- "<name>:local", closed and never counting the store's refusals, while every process was refused)
  it("say the state the store held at this process's last look, under its own name, and count its refusals",
    function()
    resil.clock.real() -- (another process shares the store: its time must be real time)
    finally(function() resil.clock.virtual() end)
    fresh_store()
    local br = resil.breaker("shared-metrics", { shared = true, open_for = 30 })
    assert(br:allow())
    br:record(true, 0.01, false)
    local function gauge(state)
      return tonumber(resil.metrics.text():match('resil_breaker_state{breaker="shared%-metrics",state="' .. state ..
        '"} (%d+)'))
    end
    assert.are.same({ 1, 0 }, { gauge("closed"), gauge("open") })
    local other = helpers.run_script([[
local resil = require "resil"
local br = resil.breaker("shared-metrics", { shared = true, window_type = "count", window = 1, min_calls = 1 })
br:record(false, 0.01, false)
print(br:state())
]], "--store " .. resil.store().url .. " --log-level off")
    assert.are.equal("open\n", other.stdout, other.stderr)
    for _ = 1, 3 do assert.is_nil((br:allow())) end
    assert.are.same({ 0, 1 }, { gauge("closed"), gauge("open") })
    local text = resil.metrics.text()
    assert.matches('resil_breaker_rejected_total{breaker="shared-metrics"} 3\n', text, 1, true)
    assert.is_nil(text:find("shared-metrics:local", 1, true))
    br:reset()
    assert.are.same({ 1, 0 }, { gauge("closed"), gauge("open") })
  end)
end)

describe("a shared breaker isolated (SQLite)", function()
  -- (before: a shared breaker had no isolate, "attempt to call a nil value (method 'isolate')")
  it("is isolated for every process until reset, as a local one is for its own", function()
    resil.clock.virtual()
    local _, path = fresh_store()
    local br = resil.breaker("iso-shared", { shared = true, open_for = 5 })
    br:isolate()
    assert.are.equal("isolated", br:state())
    local _, err = br:allow()
    assert.are.equal("circuit_open", err.kind)
    resil.sleep(86400) -- (no open_for ends it)
    assert.are.equal("isolated", br:state())
    local source = [[
local resil = require "resil"
local br = resil.breaker("iso-shared", { shared = true, open_for = 5 })
local ok, err = br:allow()
print(br:state(), ok, err and err.message)
]]
    local other = helpers.run_script(source, "--store " .. path .. " --log-level off")
    assert.are.equal("isolated\tnil\tbreaker 'iso-shared' is isolated (shared)\n", other.stdout, other.stderr)
    br:reset()
    assert.are.equal("closed", br:state())
    other = helpers.run_script(source, "--store " .. path .. " --log-level off")
    assert.are.equal("closed\ttrue\tnil\n", other.stdout, other.stderr)
    -- isolated by another process while this one's probe was out, or as its window opened: it stays so
    local isolate = [[require("resil").breaker("iso-shared", { shared = true }):isolate()]]
    br = resil.breaker("iso-shared", { window_type = "count", window = 1, min_calls = 1 })
    br:record(false, 0.01)
    resil.sleep(5)
    assert.are.equal("probe", select(2, br:allow()))
    other = helpers.run_script(isolate, "--store " .. path .. " --log-level off")
    assert.are.equal(0, other.code, other.stderr)
    br:record(true, 0.01, "probe")
    assert.are.equal("isolated", br:state())
    br:reset()
    other = helpers.run_script(isolate, "--store " .. path .. " --log-level off")
    assert.are.equal(0, other.code, other.stderr)
    br:record(false, 0.01)
    assert.are.equal("isolated", br:state())
  end)
end)

describe("a shared breaker's probe reported with an ok that is not a boolean", function()
  it("raises at the caller's line and leaves it open for everyone, as a local one does", function()
    -- (before: record("yes") closed it for every process sharing the store)
    resil.clock.virtual()
    fresh_store()
    local br = resil.breaker("probe-yes", { shared = true, window_type = "count", window = 1, min_calls = 1,
      failure_rate = 0.5, open_for = 5 })
    br:record(false, 0.01)
    resil.sleep(6)
    local ok, probe = br:allow()
    assert.is_true(ok)
    assert.are.equal("probe", probe)
    local called, err = pcall(br.record, br, "yes", 0.01)
    assert.is_false(called)
    assert.matches("store_spec.lua:%d+: breaker 'probe%-yes': record's ok must be true, false or nil", err)
    called, err = pcall(br.record, br, true, 0.01, "yes")
    assert.is_false(called)
    assert.matches("store_spec.lua:%d+: breaker 'probe%-yes': record's probe must be allow%(%)'s \"probe\" or false", err)
    assert.are_not.equal("closed", br:state())
  end)
end)

describe("a shared breaker asked again (a reload)", function()
  it("keeps open_for and probe_timeout not given again, and refuses a probe_timeout that is not one", function()
    -- (before: a reload that set only min_calls put open_for back to 30 and probe_timeout to 60;
    -- a probe_timeout of -1, NaN or "x" was taken, and the store read it)
    resil.clock.virtual()
    fresh_store()
    local br = resil.breaker("shared-reload", { shared = true, window_type = "count", window = 1, min_calls = 1,
      failure_rate = 0.5, open_for = 5, probe_timeout = 600 })
    for _, bad in ipairs({ -1, 0 / 0, "x", math.huge }) do
      local ok, err = pcall(function() return resil.breaker("shared-reload", { shared = true, probe_timeout = bad }) end)
      assert.is_false(ok)
      assert.matches("store_spec.lua:%d+: breaker 'shared%-reload': probe_timeout must be", err)
    end
    resil.breaker("shared-reload", { shared = true, min_calls = 1 })
    br:record(false, 0.01)
    local _, err = br:allow()
    assert.are.equal("circuit_open", err.kind)
    assert.is_true(err.retry_after <= 5, "open for " .. err.retry_after)
    resil.sleep(5)
    assert.are.equal("probe", select(2, br:allow()))
    assert.are.equal(600, br.probe_for)
    br:record(true, 0.01)
    assert.are.equal("closed", br:state())
  end)
end)
