-- The CLI's reads of a large Redis store: the ledger's rows (`costs --csv`) and the runs (`runs`)
-- in pages, as SQLite streams them, never the whole store in one reply or in memory at once.
-- A real redis-server; the rows written straight into it, as many processes would have.
local helpers = require "spec.helpers"

local function cli(redis, port, cmd)
  return helpers.run(("redis-cli -p %d %s"):format(port, cmd))
end

-- n ledger rows, one a second from T, run "r" .. i % 100; `late` rows after them, each `by` seconds
-- before the last (a row its process wrote late: a queue through an outage)
local T = 1796620000
local function fill_ledger(redis, db, n)
  local r = cli(redis, redis.port, ("-n %d EVAL \"for i = 1, %d do redis.call('RPUSH', 'resil:costs', cjson.encode({ " ..
    "day = '2026-12-07', provider = 'mock', model = 'm', operation = 'chat', run = 'r' .. (i %% 100), step = 'a', " ..
    "micro_usd = 1000, at = %d + i })) end return 1\" 0"):format(db, n, T))
  assert.are.equal(0, r.code, r.stderr)
end
local function push_row(redis, db, at, run)
  local r = cli(redis, redis.port, ("-n %d RPUSH resil:costs '{\"day\":\"2026-12-07\",\"provider\":\"mock\",\"model\":" ..
    "\"late\",\"operation\":\"chat\",\"run\":\"%s\",\"micro_usd\":7,\"at\":%s}'"):format(db, run, at))
  assert.are.equal(0, r.code, r.stderr)
end

describe("costs --csv on Redis", function()
  local redis = helpers.redis_server()
  teardown(function() redis.stop() end)

  -- (before: every row was read into a table and the table sorted, then written: 200,000 rows
  -- held 125 MB, a million 525 MB, where SQLite's export streams)
  it("writes a large ledger without holding it: memory stays flat, the rows in time order", function()
    if helpers.run("test -x /usr/bin/time").code ~= 0 then return pending("/usr/bin/time is not installed") end
    fill_ledger(redis, 1, 200000)
    push_row(redis, 1, T + 199500.5, "late") -- 500 rows late
    local out = helpers.tmpname(".csv")
    local r = helpers.run(("{ /usr/bin/time -f 'peak %%M KB' %s costs --csv --store '%s' > %s; }"):format(
      helpers.resil, redis.url(1), out))
    assert.are.equal(0, r.code, r.stderr)
    local kb = tonumber(r.stderr:match("peak (%d+) KB"))
    -- (AddressSanitizer keeps what is freed in its quarantine, some 256 MB: its peak is not the
    -- program's; the order below is checked all the same)
    if not (os.getenv("SAN_FLAGS") or ""):find("address", 1, true) then
      assert.is_true(kb < 60 * 1024, ("peak %d KB"):format(kb))
    end
    local lines, prev, n = {}, "", 0
    for line in io.lines(out) do
      n = n + 1
      if n > 1 then
        assert.is_true(line:sub(1, 20) >= prev, line) -- (at, to the second: in order)
        prev = line:sub(1, 20)
      end
      if line:find(",late,", 1, true) then lines[#lines + 1] = n end
    end
    assert.are.equal(200002, n)
    -- its place: after the row of T + 199500, before T + 199501's (row 199500 is line 199501)
    assert.are.same({ 199502 }, lines)
  end)

  it("a row later than the window: still in its place (the ledger sorted whole)", function()
    fill_ledger(redis, 2, 12000)
    push_row(redis, 2, T + 0.5, "late")
    local r = helpers.run(("%s costs --csv --store '%s'"):format(helpers.resil, redis.url(2)))
    assert.are.equal(0, r.code, r.stderr)
    local second, third = r.stdout:match("^[^\n]*\n([^\n]*)\n([^\n]*)\n")
    assert.matches(",mock,late,chat,,late,", second, 1, true) -- (T + 0.5: before the first row, T + 1)
    assert.matches(",mock,m,chat,,r1,", third, 1, true)
    local _, rows = r.stdout:gsub("\n", "")
    assert.are.equal(12002, rows)
  end)

  it("--run: that run's rows only, in order, the late one in its place", function()
    fill_ledger(redis, 3, 300)
    push_row(redis, 3, T + 150.5, "r50")
    local r = helpers.run(("%s costs --csv --run r50 --store '%s'"):format(helpers.resil, redis.url(3)))
    assert.are.equal(0, r.code, r.stderr)
    local models = {}
    for model in r.stdout:gmatch("\n[^,]*,mock,(%w+),") do models[#models + 1] = model end
    assert.are.same({ "m", "m", "late", "m" }, models) -- r50: rows 50, 150, 250 and the late one at 150.5
  end)
end)

-- (before: one ZREVRANGE of the whole index, a reply as large as all the run ids, then a round trip
-- per run: a server whose client-output-buffer-limit the ids passed cut the connection, and
-- `runs` failed; 100,000 runs took 20 s)
describe("runs on Redis with many runs", function()
  local redis = helpers.redis_server()
  teardown(function() redis.stop() end)

  it("reads them a page at a time: every run listed once, newest first, each reply small", function()
    -- 30,000 runs whose ids are 64 bytes: 2 MB of ids; the last two share a time
    local r = cli(redis, redis.port, ("-n 1 EVAL \"for i = 1, 30000 do local id = string.format('%%064d', i) " ..
      "local t = %d + math.min(i, 29999) redis.call('HSET', 'resil:run:' .. id, 'id', id, 'script', 'x.lua', " ..
      "'status', 'done', 'steps', '3', 'generation', '0', 'created_at', t, 'updated_at', t) " ..
      "redis.call('ZADD', 'resil:runs', t, id) end return 1\" 0"):format(1700000000))
    assert.are.equal(0, r.code, r.stderr)
    -- a reply over 1 MB cuts the connection
    assert.are.equal(0, cli(redis, redis.port, "config set client-output-buffer-limit 'normal 1mb 1mb 0'").code)
    r = helpers.run(("%s runs --store '%s'"):format(helpers.resil, redis.url(1)))
    assert.are.equal(0, r.code, r.stderr)
    local ids, seen = {}, {}
    for id in r.stdout:gmatch("\n(%d+)%s+done%s") do
      assert.is_nil(seen[id], id)
      seen[id] = true
      ids[#ids + 1] = tonumber(id)
    end
    assert.are.equal(30000, #ids)
    assert.are.same({ 30000, 29999, 29998 }, { ids[1], ids[2], ids[3] }) -- (a time shared: by id, descending)
    assert.are.equal(1, ids[30000])
    -- `runs prune` reads the same list
    r = helpers.run(("%s runs prune --older-than 0s --dry-run --store '%s'"):format(helpers.resil, redis.url(1)))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("would forget 30000 runs", r.stdout, 1, true)
  end)
end)
