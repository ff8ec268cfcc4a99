-- The Redis backend: each compound operation is one server-side script, so
-- it is atomic across processes and machines; scripts are loaded once and
-- run by SHA. Times come from the caller (store time); the scripts keep and judge them on the
-- server's clock (clock_lib). Money is integer micro-dollars. The scripts run in Redis's own Lua
-- (5.1): numbers that may be fractional go back as strings.
local resil, private = ... -- (private: what the host's modules alone hold, src/resil.c)
local owner = require "resil.owner"
-- (the host's, from the private table: loaded on a store's first use, a script may have replaced
-- what resil holds by then: its json.encode zeroed the ledger's rows, its store_options and
-- redact read the store's URL, password and all)
local json, store_options, redact = private.json, private.store_options, private.redact

local R = {}
R.__index = R

local P = "resil:"

local scripts = {}

scripts.kv_get = [[
return redis.call('GET', KEYS[1])
]]

-- ARGV: n, the TTL in milliseconds ('' for none)
scripts.kv_incr = [[
local v = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
]]

-- Ownership (src/lua/owner.lua): the owners zset scores each process's
-- lease, written by operations that take something and by the heartbeat. A
-- holder on the caller's machine ("host|boot|" = same_host) is judged by the
-- caller, from its pid: the script reports such holders, and the caller runs
-- it again naming the dead ones (a dead process stays dead, so the second run
-- needs no compare-and-set).
-- Leases are on the server's clock (TIME): the caller sends a lease's length, never its end, and
-- a lease is judged against the server's time, so hosts whose clocks differ agree on whose lease
-- lapsed (by their own clocks a host a minute ahead took every live holder for dead: their runs
-- run twice, their budget holds freed). `skew` is the caller's virtual clock's lead on its real
-- one, 0 outside specs: the server's clock does not follow a virtual one, which stands for time
-- passing everywhere. (Redis before 5 replicated scripts by their text: TIME needs effects.)
-- Budget holds' ends and the shared buckets' arrival times keep the same clock (`server_clock`):
-- the caller sends its store time `now` with the times it names, and a script takes each to the
-- server's clock by their difference (a hold's end is its length past the server's now) and each
-- it answers back to the caller's, so the callers' code and their data keep the caller's clock.
-- Times written by the version before (on its host's clock) are judged on the server's: right as
-- far as that host's clock was.
local clock_lib = [[
if redis.replicate_commands then redis.replicate_commands() end
local time_now -- (read once a script: each TIME is a command, a budget reserve asked it twice or more)
local function lease_clock(skew)
  if not time_now then
    local t = redis.call('TIME')
    time_now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  end
  return time_now + (tonumber(skew) or 0)
end
-- -> the server's now, what to add to a time of the caller's (now: its store time) to have it on
-- the server's clock. A caller on a virtual clock (a spec's; its lead `skew` is sent with decimals,
-- '0' on a real clock) is taken at its word: its now stands for time passing everywhere, and is
-- the server's TIME plus the lead but for the real time the call took to get here, noise that
-- broke a bucket's exact arithmetic on the virtual clock.
local function server_clock(now, skew)
  if skew ~= '0' then return tonumber(now), 0 end
  local t = lease_clock(0)
  return t, t - tonumber(now)
end
-- (a time as text: a number answered would be cut to an integer; a number given to redis.call goes
-- whole, as '%.17g', with no string.format's cost, about 0.5 us a call here)
local function fmt(t) return string.format('%.6f', t) end
]]
local holders_lib = clock_lib .. [[
local function holder_alive(owners, id, dead, same_host, skew)
  if dead[id] then return false end
  if not string.find(id, '|', 1, true) then return nil end
  if same_host ~= '' and string.sub(id, 1, #same_host) == same_host then return true end
  local lease = redis.call('ZSCORE', owners, id)
  return lease ~= false and tonumber(lease) > lease_clock(skew)
end
local function dead_set(list)
  local set = {}
  for id in string.gmatch(list, '[^\n]+') do set[id] = true end
  return set
end
-- lease_for: the lease's length in seconds ('' for none)
local function renew(owners, me, lease_for, skew)
  if lease_for == '' then return end
  local lease_until = lease_clock(skew) + tonumber(lease_for)
  local lease = redis.call('ZSCORE', owners, me)
  if not lease or tonumber(lease) < lease_until then
    redis.call('ZADD', owners, string.format('%.6f', lease_until), me)
  end
end
]]

-- KEYS: owners, then the once records this process is running; ARGV: me,
-- the lease's length, now, lease (ms), skew. A running record lives at least a lease
-- past each beat: its retention counts from the end of the run, so fn
-- running longer than the retention is not run a second time
scripts.owner_beat = holders_lib .. [[
renew(KEYS[1], ARGV[1], ARGV[2], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', lease_clock(ARGV[5])))
local lease = tonumber(ARGV[4])
for i = 2, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 'owner', 'state')
  if r[1] == ARGV[1] and r[2] == 'running' and redis.call('PTTL', KEYS[i]) < lease then
    redis.call('PEXPIRE', KEYS[i], lease)
  end
end
return 1
]]

-- KEYS: the record, owners, the claim's abandoned marker; ARGV: fingerprint, me, lease, retention,
-- now, dead, same_host, the lease's length, the claim (one given up by its caller before it arrived,
-- once_abandon, is not made), skew
scripts.once_claim = holders_lib .. [[
if redis.call('EXISTS', KEYS[3]) == 1 then return {'abandoned'} end
local fp, me, lease, retention, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
renew(KEYS[2], me, ARGV[8], ARGV[10])
local r = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'owner', 'locked_at', 'result')
if not r[2] then
  redis.call('HSET', KEYS[1], 'fingerprint', fp, 'state', 'running', 'owner', me, 'locked_at', ARGV[5],
    'created_at', ARGV[5], 'claim', ARGV[9])
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(retention * 1000)))
  return {'claimed'}
end
if r[1] ~= fp then
  -- a failure kept under the key, asked with other arguments (the request fixed): run, as SQLite does
  local ok, t = pcall(cjson.decode, r[5] or '')
  if not (r[2] == 'done' and ok and type(t) == 'table' and type(t.v) == 'table' and t.v[1] == cjson.null and
      t.v[2] ~= nil and t.v[2] ~= cjson.null) then
    return {'key_reused'}
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'fingerprint', fp, 'state', 'running', 'owner', me, 'locked_at', ARGV[5],
    'created_at', ARGV[5], 'claim', ARGV[9])
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(retention * 1000)))
  return {'claimed'}
end
if r[2] == 'done' then return {'done', r[5]} end
local alive = r[3] == me or holder_alive(KEYS[2], r[3], dead_set(ARGV[6]), ARGV[7], ARGV[10])
if alive == false or (alive == nil and tonumber(r[4]) + lease <= now) then
  redis.call('HSET', KEYS[1], 'owner', me, 'locked_at', ARGV[5], 'claim', ARGV[9])
  if redis.call('PTTL', KEYS[1]) < retention * 1000 then redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(retention * 1000))) end
  return {'claimed', 'takeover'}
end
return {'in_progress', r[4], r[3]}
]]

-- (ARGV[4], the fingerprint: a record gone as fn ended, the store's data lost (flushed, restarted
-- empty) and no other process's claim since, is written again, done: fn ran and was paid for here.
-- Refused as taken over, its caller was told to ask again, and fn ran and was paid for a second time)
scripts.once_finish = [[
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[1] and (owner or (ARGV[4] or '') == '') then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[2], 'owner', ARGV[1])
if not owner then redis.call('HSET', KEYS[1], 'fingerprint', ARGV[4]) end
redis.call('HDEL', KEYS[1], 'locked_at')
redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(tonumber(ARGV[3]) * 1000)))
return owner and 1 or 2
]]

-- A claim whose outcome its caller did not see: the record it made is dropped; not made (yet),
-- a marker that once_claim refuses, since a claim sent on a connection that timed out may still
-- arrive (a frozen Redis runs it when it thaws). KEYS: the record, the marker; ARGV: me, the
-- claim, the marker's TTL (ms)
scripts.once_abandon = [[
local r = redis.call('HMGET', KEYS[1], 'owner', 'state', 'claim')
if r[1] == ARGV[1] and r[2] == 'running' and r[3] == ARGV[2] then redis.call('DEL', KEYS[1]) return 1 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return 0
]]

scripts.once_release = [[
local r = redis.call('HMGET', KEYS[1], 'owner', 'state')
if r[1] == ARGV[1] and r[2] == 'running' then redis.call('DEL', KEYS[1]) return 1 end
return 0
]]

-- KEYS: run hash, steps hash, runs index, owners, unfinished steps hash; ARGV: id, script, fresh, now,
-- me, dead, same_host, the lease's length, args, skew -> {steps done, generation} | {'held', holder,
-- since}; --fresh forgets the steps and starts a new generation; what failed or was cut short last
-- time runs again
scripts.run_start = holders_lib .. [[
renew(KEYS[4], ARGV[5], ARGV[8], ARGV[10])
local holder = redis.call('HMGET', KEYS[1], 'owner', 'owner_since')
if holder[1] and holder[1] ~= ARGV[5] and
    holder_alive(KEYS[4], holder[1], dead_set(ARGV[6]), ARGV[7], ARGV[10]) then
  return {'held', holder[1], holder[2] or ''}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[5], 'owner_since', ARGV[4], 'failed', '0')
redis.call('DEL', KEYS[5])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'args', ARGV[9]) end
local steps = redis.call('HGET', KEYS[1], 'steps')
if steps and ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'script', ARGV[2]) end -- (the script that runs it now)
if steps and ARGV[3] == '1' then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'steps', '0', 'created_at', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'generation', 1)
  steps = '0'
end
if steps then
  redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  return {tonumber(steps), tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')}
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'script', ARGV[2], 'status', 'running', 'steps', '0',
  'generation', '0', 'created_at', ARGV[4], 'updated_at', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return {0, 0}
]]

-- A run's record gone while its holder runs it (the server lost its data: flushed, restarted
-- empty): made again, held by it, so that its steps from here on count and its end is recorded
-- (those before went with the data). A step's record had made a hash of its own, with neither
-- holder nor status, read as a run another process had ended: the holder stopped, and a resume
-- ran, and paid for, every step again. -> 1 when made again
local remake_run = [[
local function remake_run(run, runs, id, script, args, generation, now, me)
  if redis.call('EXISTS', run) == 1 then return 0 end
  redis.call('HSET', run, 'id', id, 'script', script, 'status', 'running', 'steps', '0', 'generation', generation,
    'failed', '0', 'created_at', now, 'updated_at', now, 'owner', me, 'owner_since', now)
  if args ~= '' then redis.call('HSET', run, 'args', args) end
  redis.call('ZADD', runs, now, id)
  return 1
end
]]

-- KEYS: run hash, unfinished steps hash, runs index; ARGV: field, json, now, me, run id, script,
-- args, generation -> {1, made again} | {0, holder, since}
scripts.step_failed = remake_run .. [[
local holder = redis.call('HMGET', KEYS[1], 'owner', 'owner_since')
if holder[1] and holder[1] ~= ARGV[4] then return {0, holder[1], holder[2] or ''} end
local remade = remake_run(KEYS[1], KEYS[3], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'failed', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
return {1, remade}
]]

-- KEYS: run hash, unfinished steps hash; ARGV: field, json, me -> {1} | {0} (taken over)
scripts.step_started = [[
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[3] then return {0} end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return {1}
]]

-- KEYS: run hash, steps hash, unfinished steps hash, runs index; ARGV: field, json, now, me, run
-- id, script, args, generation -> {1, made again} | {2, the record there already} | {0, holder, since} (taken
-- over). The step's "running" record goes.
scripts.step_put = remake_run .. [[
local holder = redis.call('HMGET', KEYS[1], 'owner', 'owner_since')
if holder[1] and holder[1] ~= ARGV[4] then return {0, holder[1], holder[2] or ''} end
local remade = remake_run(KEYS[1], KEYS[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[3], ARGV[4])
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'steps', 1)
  local u = redis.call('HGET', KEYS[3], ARGV[1])
  if u and cjson.decode(u).state == 'running' then redis.call('HDEL', KEYS[3], ARGV[1]) end
else
  return {2, redis.call('HGET', KEYS[2], ARGV[1])}
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
return {1, remade}
]]

-- KEYS: run hash, unfinished steps hash; ARGV: status, now, me, the steps cut short as one JSON
-- array of field, json pairs (an argument each, past 28 steps the command's 64 arguments raised and
-- the run's end was never recorded). The holder gives the run up (unless another took it over);
-- "done" with failed steps is "done_with_failures".
scripts.run_finish = [[
local holder = redis.call('HGET', KEYS[1], 'owner')
if holder and holder ~= ARGV[3] then return 0 end
local pending = cjson.decode(ARGV[4])
for i = 1, #pending, 2 do redis.call('HSET', KEYS[2], pending[i], pending[i + 1]) end
local status = ARGV[1]
if status == 'done' and tonumber(redis.call('HGET', KEYS[1], 'failed') or '0') > 0 then
  status = 'done_with_failures'
end
redis.call('HSET', KEYS[1], 'status', status, 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner', 'owner_since')
return 1
]]

-- KEYS: ledger list, dedupe set; ARGV: dedupe ('' for none), json
local insert_cost = [[
-- (the row before its id: Redis keeps what a script wrote before a command of it failed, and an id
-- marked recorded with its RPUSH refused, a key of another type under resil:, dropped the row's
-- retry as a duplicate)
local function insert_cost(ledger, dedupe_set, dedupe, entry)
  if dedupe ~= '' and redis.call('SISMEMBER', dedupe_set, dedupe) == 1 then return 0 end
  redis.call('RPUSH', ledger, entry)
  if dedupe ~= '' then redis.call('SADD', dedupe_set, dedupe) end
  return 1
end
]]
-- A row with a budget and a period spends in it (KEYS[3], that period's spent; ARGV[3], its
-- micro-dollars) once the ledger took it, as on SQLite, whose spend is the ledger's sum: before,
-- only a settle added to the spent key, and `budget`/`period` rows counted on SQLite alone.
scripts.cost_record = insert_cost .. [[
if KEYS[3] then redis.call('GET', KEYS[3]) end -- (a read: a spent key of another type refuses before any write)
if insert_cost(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
if KEYS[3] then redis.call('INCRBY', KEYS[3], ARGV[3]) end
return 1
]]

-- The budget scripts' keys: spent, reserved total, holds zset (ticket -> expires_at, on the server's
-- clock), amounts hash, ticket hash, holders hash (ticket -> owner), owners zset [, ledger, dedupe set]
local budget_lib = holders_lib .. ("local TICKETS = %q\n"):format(P .. "ticket:") .. [[
local function unhold(t)
  local a = redis.call('HGET', KEYS[4], t)
  if a then redis.call('DECRBY', KEYS[2], a); redis.call('HDEL', KEYS[4], t) end
  redis.call('ZREM', KEYS[3], t)
  redis.call('HDEL', KEYS[6], t)
end
local function usage()
  return tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')
end
-- A ticket carried into another period (budgets set --per) while its call ran is kept there: the
-- keys become that period's (prefix: the budget's, "resil:budget:NAME:") when its hash (`ticket`,
-- a key) names another than `known`, the one its caller reserved in. -> the ticket's period if it
-- moved
local function follow(ticket, known, prefix)
  local period = redis.call('HGET', ticket, 'period')
  if not period or period == known then return nil end
  local b = prefix .. period
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6] = b .. ':spent', b .. ':reserved', b .. ':holds', b .. ':amounts',
    b .. ':holders'
  return period
end
-- A call across a period's end (a hold made at 23:59, settled at 00:01) settles in the new period,
-- so its hold, still open, counts there: the holds of an earlier period of the same kind move into
-- this one (KEYS[1..4, 6]) at its first reservation or look, their tickets saying so. KEYS[9], a set
-- ("resil:budget:NAME:periods"), names the periods a reservation made holds in; the budget's key
-- prefix is its name's. KEYS[10], the period before's holds: the version before the set made holds
-- without naming their period there (a rolling upgrade across midnight), so that period is looked
-- at too (one EXISTS).
local function roll()
  -- (reads: an amounts or holders key of another type refuses before any write, here or in a
  -- reservation. Refused at its HSET, the reserved total had grown and the hold was in the zset
  -- without its amount: its expiry freed nothing, the total that much higher for the period)
  redis.call('HLEN', KEYS[4])
  redis.call('HLEN', KEYS[6])
  local prefix = string.sub(KEYS[9], 1, #KEYS[9] - #'periods')
  local period = string.sub(KEYS[1], #prefix + 1, #KEYS[1] - #':spent')
  if KEYS[10] and redis.call('EXISTS', KEYS[10]) == 1 then
    redis.call('SADD', KEYS[9], string.sub(KEYS[10], #prefix + 1, #KEYS[10] - #':holds'))
  end
  for _, p in ipairs(redis.call('SMEMBERS', KEYS[9])) do
    local b = prefix .. p
    if p ~= period and #p == #period and p < period then
      local z = redis.call('ZRANGE', b .. ':holds', 0, -1, 'WITHSCORES')
      for i = 1, #z, 2 do
        local t = z[i]
        local a, o = redis.call('HGET', b .. ':amounts', t), redis.call('HGET', b .. ':holders', t)
        redis.call('ZADD', KEYS[3], z[i + 1], t)
        redis.call('ZREM', b .. ':holds', t)
        if a then
          redis.call('INCRBY', KEYS[2], a)
          redis.call('DECRBY', b .. ':reserved', a)
          redis.call('HSET', KEYS[4], t, a)
          redis.call('HDEL', b .. ':amounts', t)
        end
        if o then
          redis.call('HSET', KEYS[6], t, o)
          redis.call('HDEL', b .. ':holders', t)
        end
        if redis.call('EXISTS', TICKETS .. t) == 1 then redis.call('HSET', TICKETS .. t, 'period', period) end
      end
      redis.call('SREM', KEYS[9], p)
    elseif p ~= period and redis.call('ZCARD', b .. ':holds') == 0 then
      redis.call('SREM', KEYS[9], p) -- (another kind's, left by budgets set --per: nothing to move)
    end
  end
end
-- The period of time `at` (seconds) of the kind `like` is: 'all', 'YYYY-MM' or 'YYYY-MM-DD', UTC (H.
-- Hinnant's civil_from_days; Redis's Lua has no os.date)
local function period_at(like, at)
  if like == 'all' then return like end
  local z = math.floor(tonumber(at) / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  if #like == 7 then return string.format('%04d-%02d', y, m) end
  return string.format('%04d-%02d-%02d', y, m, doy - math.floor((153 * mp + 2) / 5) + 1)
end
-- The period a reservation or a look falls in is the server's (now, off: server_clock's), of the kind
-- of the caller's (KEYS[1]'s, KEYS[9] the periods set): KEYS[1..4, 6] become its. A caller whose
-- clock was past midnight took the day before's open holds into its day (roll), and one not yet
-- past it then reserved in a day whose holds had gone, the money they held free again. (A period
-- the caller names that is not its clock's, one before, is read as named.) -> the period, nil for
-- the caller's
local function server_period(now, off)
  -- (the same day by both clocks, as almost always: the same period, without period_at's string.format)
  if math.floor(now / 86400) == math.floor((now - off) / 86400) then return nil end
  local prefix = string.sub(KEYS[9], 1, #KEYS[9] - #'periods')
  local period = string.sub(KEYS[1], #prefix + 1, #KEYS[1] - #':spent')
  local p = period_at(period, now)
  if p == period or period_at(period, now - off) ~= period then return nil end
  local b = prefix .. p
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6] = b .. ':spent', b .. ':reserved', b .. ':holds', b .. ':amounts',
    b .. ':holders'
  return p
end
-- expired holds stop counting (now: the server's, server_clock)
local function sweep(now)
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do unhold(t) end
end
-- holds of dead owners stop counting: -> how many were released, and the
-- live-looking holders on the caller's machine, for the caller to judge (now: the server's, for
-- the holds' ends; skew: for the leases' clock)
local function sweep_dead(me, dead, same_host, now, skew)
  local verdicts, released, to_judge = {}, 0, {}
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. fmt(now), '+inf')) do
    local o = redis.call('HGET', KEYS[6], t)
    if o and o ~= me then
      local alive = verdicts[o]
      if alive == nil then
        alive = holder_alive(KEYS[7], o, dead, same_host, skew) ~= false
        verdicts[o] = alive
        if alive and same_host ~= '' and string.sub(o, 1, #same_host) == same_host then
          to_judge[#to_judge + 1] = o
        end
      end
      if not alive then unhold(t); released = released + 1 end
    end
  end
  return released, to_judge
end
]]

-- ARGV: limit, estimate, ticket, expires_at, now, budget, period, me, dead, same_host, the lease's
-- length, the ticket's time to live (ms), skew -> {1, spent, reserved} | {0, spent, reserved, holders
-- to judge...}
-- Dead owners' holds are looked for only when the reservation does not fit.
scripts.budget_reserve = budget_lib .. ("local MARK = %q\n"):format(P .. "store") .. [[
-- (the store's marker, ARGV[14], as this process saw it, '' before it has: another, or none, -> {3,
-- the marker}, nothing written; none where none was seen is a new store's, ARGV[15])
local mark = redis.call('GET', MARK)
if mark ~= ARGV[14] then
  if not mark and ARGV[14] == '' then
    mark = ARGV[15]
    redis.call('SET', MARK, mark)
  end
  return {3, mark or false}
end
-- (KEYS[8], the settings; ARGV[16], the period kind set from the command line that the caller's
-- period comes from, '' for none, or no ARGV[16]: another one now, a switch since it read them -> {2})
if ARGV[16] then
  local set = redis.call('HMGET', KEYS[8], 'limit', 'per')
  if (set[1] and set[2] or '') ~= ARGV[16] then return {2, 0, 0} end
end
local now, off = server_clock(ARGV[5], ARGV[13])
local period = server_period(now, off)
roll()
sweep(now)
local spent, reserved = usage()
-- a ticket already known was given up by its caller (budget_abandon) before this arrived
if redis.call('EXISTS', KEYS[5]) == 1 then return {0, spent, reserved} end
local est, limit, to_judge = tonumber(ARGV[2]), tonumber(ARGV[1]), {}
-- Dead owners' holds are looked for at most once a second per budget (by the server's clock; a
-- stamp ahead of it, written by the version before, looks): each reads every live hold's owner,
-- 40 times a reserve's time with 1,000 holds, and a client hammering a full budget held the shared
-- server. A refusal between answers from the totals as they are; one that brings the holders its
-- caller found dead (ARGV[9]) looks.
if spent + reserved + est > limit then
  local last = tonumber(redis.call('GET', KEYS[3] .. ':swept'))
  if ARGV[9] ~= '' or not last or now < last or now >= last + 1 then
    redis.call('SET', KEYS[3] .. ':swept', fmt(now), 'PX', 60000)
    local released
    released, to_judge = sweep_dead(ARGV[8], dead_set(ARGV[9]), ARGV[10], now, ARGV[13])
    if released > 0 then spent, reserved = usage() end
  end
end
if spent + reserved + est > limit then
  local r = {0, spent, reserved}
  for _, o in ipairs(to_judge) do r[#r + 1] = o end
  return r
end
renew(KEYS[7], ARGV[8], ARGV[11], ARGV[13])
redis.call('INCRBY', KEYS[2], est)
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + off, ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], est)
redis.call('HSET', KEYS[6], ARGV[3], ARGV[8])
redis.call('SADD', KEYS[9], period or ARGV[7])
redis.call('HSET', KEYS[5], 'state', 'held', 'budget', ARGV[6], 'period', period or ARGV[7], 'at', now)
redis.call('PEXPIRE', KEYS[5], ARGV[12])
return {1, spent, reserved + est}
]]

-- ARGV: now, me, dead, same_host, the ticket prefix, skew -> {spent, reserved, {holders to judge},
-- {{ticket, usd, owner, expires_at, created_at}}, the period} (the times on the caller's clock)
scripts.budget_usage = budget_lib .. [[
local now, off = server_clock(ARGV[1], ARGV[6])
local period = server_period(now, off)
roll()
sweep(now)
local _, to_judge = sweep_dead(ARGV[2], dead_set(ARGV[3]), ARGV[4], now, ARGV[6])
local spent, reserved = usage()
local holds, z = {}, redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. fmt(now), '+inf', 'WITHSCORES')
for i = 1, #z, 2 do
  local at = tonumber(redis.call('HGET', ARGV[5] .. z[i], 'at'))
  holds[#holds + 1] = {z[i], tonumber(redis.call('HGET', KEYS[4], z[i]) or '0'), redis.call('HGET', KEYS[6], z[i]) or '',
    fmt(tonumber(z[i + 1]) - off), at and fmt(at - off) or ''}
end
return {spent, reserved, to_judge, holds, period or false}
]]

-- ARGV: ticket, micro_usd, dedupe, entry json, the ticket's time to live (ms), '1' when the call
-- cost something (a row even under half a micro-dollar); a settle of $0 writes no ledger row.
-- The spent total grows with the ledger: a row the ledger already has (the same id, a
-- provider's replayed answer) is not spent twice, as on SQLite, where spent is the ledger's sum.
-- The hold is freed in the period it is in now (ARGV[7] is the entry's, ARGV[8] the budget's key
-- prefix); the cost counts in the period the settle falls in (ARGV[9], the ledger row's time, taken to
-- the server's clock by ARGV[10], the caller's time as it sent this, and ARGV[11], skew), of the
-- kind the hold is in: a call across midnight is the new day's, and a hold carried into another kind
-- (budgets set --per) while its call ran settles under it, its ledger row labelled so. A charge (no
-- hold of its own: a refused attempt's cost) counts under its call's ticket's, KEYS[10].
scripts.budget_settle = budget_lib .. insert_cost .. [[
if redis.call('HGET', KEYS[5], 'state') == 'settled' then return 0 end
local entry, held = ARGV[4], follow(KEYS[5], ARGV[7], ARGV[8])
if not held and KEYS[10] and redis.call('EXISTS', KEYS[5]) == 0 then held = follow(KEYS[10], ARGV[7], ARGV[8]) end
local _, off = server_clock(ARGV[10], ARGV[11])
local period = period_at(held or ARGV[7], tonumber(ARGV[9]) + off)
KEYS[1] = ARGV[8] .. period .. ':spent'
if period == ARGV[7] then period = nil end
if period then
  local label = '"period":' .. cjson.encode(ARGV[7])
  local at = string.find(entry, label, 1, true)
  if at then entry = string.sub(entry, 1, at - 1) .. '"period":' .. cjson.encode(period) .. string.sub(entry, at + #label) end
end
local function settled()
  unhold(ARGV[1])
  redis.call('HSET', KEYS[5], 'state', 'settled')
  redis.call('PEXPIRE', KEYS[5], ARGV[5])
end
-- the row and its spend before the ticket is marked settled: a command refused midway (a key of
-- another type under resil:) left a ticket settled without its row, and the settle again wrote none
if ARGV[6] == '1' then
  redis.call('GET', KEYS[1]) -- (a read: a spent key of another type refuses before any write)
  if insert_cost(KEYS[8], KEYS[9], ARGV[3], entry) == 0 then settled(); return 0 end
  redis.call('INCRBY', KEYS[1], ARGV[2])
end
settled()
return 1
]]

-- ARGV: stale ('1': only holds whose owner is not alive), now, me, dead, same_host, ticket prefix,
-- the tickets' time to live (ms), skew -> {released, holders to judge...}
scripts.budget_release_holds = budget_lib .. [[
local now, off = server_clock(ARGV[2], ARGV[8])
server_period(now, off)
roll()
sweep(now)
local released, to_judge
if ARGV[1] == '1' then
  released, to_judge = sweep_dead(ARGV[3], dead_set(ARGV[4]), ARGV[5], now, ARGV[8])
else
  released, to_judge = 0, {}
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. fmt(now), '+inf')) do
    unhold(t)
    redis.call('HSET', ARGV[6] .. t, 'state', 'released')
    redis.call('PEXPIRE', ARGV[6] .. t, ARGV[7])
    released = released + 1
  end
end
local r = {released}
for _, o in ipairs(to_judge) do r[#r + 1] = o end
return r
]]

-- ARGV: ticket, the ticket's time to live (ms), the period its caller read from the ticket, the
-- budget's key prefix. A hold carried into the new period between that read and this script (the
-- new day's first reservation or look, another task's or host's) is given back there: given back
-- in the period read, it stayed reserved in the new one, for nobody, until its end.
scripts.budget_release = budget_lib .. [[
if redis.call('HGET', KEYS[5], 'state') ~= 'held' then return 0 end
follow(KEYS[5], ARGV[3], ARGV[4])
unhold(ARGV[1])
redis.call('HSET', KEYS[5], 'state', 'released')
redis.call('PEXPIRE', KEYS[5], ARGV[2])
return 1
]]

-- A hold its owner still has (held, not yet past its expiry) now ends at
-- expires_at, never earlier than it did; the owner's lease is written with
-- it, and the ticket's record kept a day past the new end. ARGV: ticket,
-- expires_at, now, me, the lease's length, the record's time to live (ms), the period it was reserved
-- in, the budget's key prefix (a hold carried into another period is renewed there), skew -> 1 | 0
-- (settled, released, expired, another's, or unknown: a hold that stopped counting is never counted
-- again)
scripts.budget_extend = budget_lib .. [[
if redis.call('HGET', KEYS[5], 'state') ~= 'held' then return 0 end
follow(KEYS[5], ARGV[7], ARGV[8])
local now, off = server_clock(ARGV[3], ARGV[9])
local at, until_ = redis.call('ZSCORE', KEYS[3], ARGV[1]), tonumber(ARGV[2]) + off
if not at or tonumber(at) <= now or redis.call('HGET', KEYS[6], ARGV[1]) ~= ARGV[4] then return 0 end
if until_ > tonumber(at) then redis.call('ZADD', KEYS[3], fmt(until_), ARGV[1]) end
renew(KEYS[7], ARGV[4], ARGV[5], ARGV[9])
if redis.call('PTTL', KEYS[5]) < tonumber(ARGV[6]) then redis.call('PEXPIRE', KEYS[5], ARGV[6]) end
return 1
]]

-- A reservation whose caller gave up before its outcome came back: released
-- if it was made; if not (yet), a marker that the reserve script refuses,
-- since a reserve sent on a connection that timed out may still arrive
-- after this. ARGV: ticket, the marker's TTL (ms), the period it was reserved in, the budget's
-- key prefix (a hold carried into another period is given back there)
scripts.budget_abandon = budget_lib .. [[
local state = redis.call('HGET', KEYS[5], 'state')
if state == 'held' then
  follow(KEYS[5], ARGV[3], ARGV[4])
  unhold(ARGV[1])
  redis.call('HSET', KEYS[5], 'state', 'released')
  redis.call('PEXPIRE', KEYS[5], ARGV[2])
  return 1
end
if not state then
  redis.call('HSET', KEYS[5], 'state', 'abandoned')
  redis.call('PEXPIRE', KEYS[5], ARGV[2])
end
return 0
]]

-- What every GCRA script does with an arrival time: read it (none, or one past: now, a full
-- bucket), keep it a minute past itself (an expired one reads as now), and count the tokens left
-- at a moment by it (a microsecond's slack: times are seconds since 1970 to the microsecond, and
-- that rounding is no token missing). Arrival times are kept on the server's clock (clock_lib: the
-- caller's now and the times it names taken to it, the ones answered taken back), so hosts whose
-- clocks differ share one bucket: one ahead found a bucket another had just emptied full again.
local GCRA = clock_lib .. [[
local function tat_of(key, now)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  return tat
end
local function keep(key, tat, now)
  redis.call('SET', key, string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 60000)
end
local function left(tat, now, interval, tolerance)
  return tostring(math.max(0, math.floor((tolerance - (tat - now) + 1e-6) / interval)))
end
]]

-- GCRA: KEYS[1] tat; ARGV: interval, tolerance, n, now, max_wait (-1: unbounded), skew
-- -> {1, remaining, wait, tat} | {0, retry_after, tat}; a wait that fits max_wait books the slot
scripts.gcra_take = GCRA .. [[
local interval, tolerance, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, off = server_clock(ARGV[4], ARGV[6])
local max_wait = tonumber(ARGV[5])
local tat = tat_of(KEYS[1], now)
local new_tat = tat + n * interval
local wait = new_tat - now - tolerance
if max_wait >= 0 and wait > max_wait + 1e-6 then return {0, tostring(wait), fmt(tat - off)} end
if wait <= 1e-6 then wait = 0 end
keep(KEYS[1], new_tat, now)
return {1, left(new_tat, now + wait, interval, tolerance), tostring(wait), fmt(new_tat - off)}
]]

-- Several GCRAs at once, all or none: KEYS their tats; ARGV: now, max_wait (-1: unbounded),
-- then interval, tolerance, n for each key, then skew -> {1, wait, tat...} | {0, retry_after, worst,
-- tat...}; a wait that fits max_wait books every key's slot
scripts.gcra_take_all = GCRA .. [[
local now, off = server_clock(ARGV[1], ARGV[3 * #KEYS + 3])
local max_wait = tonumber(ARGV[2])
local tats, wait, worst = {}, 0, 1
for i = 1, #KEYS do
  local interval, tolerance, n = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  tats[i] = tat_of(KEYS[i], now)
  local w = tats[i] + n * interval - now - tolerance
  if w > wait then wait, worst = w, i end
end
if max_wait >= 0 and wait > max_wait + 1e-6 then
  local r = {0, tostring(wait), worst}
  for i = 1, #KEYS do r[i + 3] = fmt(tats[i] - off) end
  return r
end
if wait <= 1e-6 then wait = 0 end
local r = {1, tostring(wait)}
for i = 1, #KEYS do
  local new_tat = tats[i] + tonumber(ARGV[3 * i + 2]) * tonumber(ARGV[3 * i])
  keep(KEYS[i], new_tat, now)
  r[i + 2] = fmt(new_tat - off)
end
return r
]]

-- GCRA correction: KEYS[1] tat, KEYS[2] its pause (gcra_raise); ARGV: interval, tolerance, n (> 0
-- taken without limit, at most 1e9 s of debt; < 0 given back, the arrival time no further back than
-- now, nor than a pause the provider asked for), now, skew -> {remaining, tat}.
scripts.gcra_adjust = GCRA .. [[
local interval, tolerance, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, off = server_clock(ARGV[4], ARGV[5])
local tat = tat_of(KEYS[1], now)
local new_tat = math.min(math.max(now, tat + n * interval), now + 1e9)
if n < 0 then
  local pause = tat_of(KEYS[2], now)
  if new_tat < pause then new_tat = math.min(pause, tat) end
end
keep(KEYS[1], new_tat, now)
return {left(new_tat, now, interval, tolerance), fmt(new_tat - off)}
]]

-- A provider's word on a limit: KEYS[1] tat, KEYS[2] its pause; ARGV: interval, tolerance, at_least,
-- now, pause ('': none), skew -> {remaining, tat}. The arrival time moves on to at_least (at most 1e9 s
-- ahead), never back; a pause (the arrival time it holds) is also kept in KEYS[2], as long as an
-- arrival time would be, so that no refund (gcra_adjust) pulls the arrival time back into it.
scripts.gcra_raise = GCRA .. [[
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, off = server_clock(ARGV[4], ARGV[6])
local at_least = tonumber(ARGV[3]) + off
local tat = tat_of(KEYS[1], now)
if at_least > tat then
  tat = math.min(at_least, now + 1e9)
  keep(KEYS[1], tat, now)
end
if ARGV[5] ~= '' then
  local pause = math.min(tonumber(ARGV[5]) + off, now + 1e9)
  if pause > tat_of(KEYS[2], now) then keep(KEYS[2], pause, now) end
end
return {left(tat, now, interval, tolerance), fmt(tat - off)}
]]

-- A shared breaker's times are on the server's clock too (clock_lib): a breaker opened by a host a
-- minute ahead stayed open a minute more for the others; by one behind, it was half-open at once.
-- KEYS[1] breaker hash; ARGV: probe_for, now, skew
scripts.breaker_probe = clock_lib .. [[
local r = redis.call('HMGET', KEYS[1], 'open_until', 'probe_until')
if not r[1] then return {1, ''} end
local now = server_clock(ARGV[2], ARGV[3])
if tonumber(r[1]) > now then return {0, tostring(tonumber(r[1]) - now)} end
if r[2] and tonumber(r[2]) > now then return {0, tostring(tonumber(r[2]) - now)} end
redis.call('HSET', KEYS[1], 'probe_until', fmt(now + tonumber(ARGV[1])), 'prober', ARGV[4] or '')
return {1, 'probe'}
]]

-- KEYS[1] breaker hash; ARGV: the probe's id -> 1 | 0: the probe given back unrun, its slot free now
scripts.breaker_unprobe = [[
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'prober') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'probe_until', 'prober')
  return 1
end
return 0
]]

-- KEYS[1] breaker hash; ARGV: open_until, now, skew. Kept an hour past its end.
scripts.breaker_open = clock_lib .. [[
local now, off = server_clock(ARGV[2], ARGV[3])
local open_until = tonumber(ARGV[1]) + off
redis.call('HSET', KEYS[1], 'open_until', fmt(open_until), 'opened', 1)
redis.call('HDEL', KEYS[1], 'probe_until')
redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor((open_until - now + 3600) * 1000)))
return 1
]]

-- A failed probe opens it again for longer: open_for times backoff for each open in a row so far
-- ('opened'; a close deletes the key), up to open_for_max.
-- KEYS[1] breaker hash; ARGV: open_for, backoff, open_for_max, now, skew -> its end on the caller's clock
scripts.breaker_reopen = clock_lib .. [[
local now, off = server_clock(ARGV[4], ARGV[5])
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened') or '0') or 0
local open_until = now + math.min(tonumber(ARGV[1]) * tonumber(ARGV[2]) ^ opened, tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'open_until', fmt(open_until), 'opened', opened + 1)
redis.call('HDEL', KEYS[1], 'probe_until')
redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor((open_until - now + 3600) * 1000)))
return fmt(open_until - off)
]]

-- KEYS[1] breaker hash; ARGV: now, skew -> its end on the caller's clock | false
scripts.breaker_get = clock_lib .. [[
local open_until = redis.call('HGET', KEYS[1], 'open_until')
if not open_until then return false end
local _, off = server_clock(ARGV[1], ARGV[2])
return fmt(tonumber(open_until) - off)
]]

-- ---------- plumbing ----------

-- seconds as the milliseconds of a PX or PEXPIRE, at least 1: a TTL under a millisecond was 0,
-- which SET refuses ("invalid expire time") and PEXPIRE takes as "delete now"; SQLite keeps it.
-- At most MAX_TTL: a longer one (1e16 s, "for ever") went as "1e+19", refused ("not an integer"),
-- where SQLite kept it; 1e15 s is some 30 million years
local MAX_TTL = 1e15
local function ms(seconds) return math.max(1, math.floor(math.min(seconds, MAX_TTL) * 1000)) end

local function parse_url(url)
  local scheme, rest = url:match("^(rediss?)://(.*)$")
  if scheme == "rediss" then return nil, "redis: TLS (rediss://) needs hiredis >= 1.0; this build has no TLS" end
  local username, password
  local userinfo, hostpart = rest:match("^(.*)@(.*)$")
  if userinfo then
    -- redis://alice:pw@host: AUTH alice pw (Redis 6's ACL users), AUTH pw where the server refuses
    -- that (src/store_redis.c); redis://:pw@host and redis://pw@host: AUTH pw
    username, password = userinfo:match("^([^:]*):(.*)$")
    if not username then password = userinfo end
    -- percent-encoded as a URL's userinfo is (redis://:p%40ss@host is AUTH p@ss; a password with
    -- an @, : or / has no other way in); a % not followed by two hex digits stays as written
    local function decode(s) return s and resil.url.unescape(s) end
    username, password = decode(username), decode(password)
    rest = hostpart
  end
  local query
  rest, query = rest:match("^([^?]*)%??(.*)$")
  local o, qerr = store_options(query, url, "redis")
  if not o then return nil, qerr end
  local host, port, db = rest:match("^([^:/]+):?(%d*)/?(%d*)$")
  -- an IPv6 address, bracketed as in any URL (redis://[::1]:6379/0)
  if not host then host, port, db = rest:match("^%[([%x:.]+)%]:?(%d*)/?(%d*)$") end
  if not host then
    -- (the form's "user:password@" apart from its "redis://": the redaction of a URL's password
    -- ate the hint's own)
    return nil, "redis: cannot read URL " .. url
      .. " (the form is redis://host:port/db[?timeout=seconds], with [user]:password@ before host when the server needs one)"
  end
  port = tonumber(port) or 6379
  if port < 1 or port > 65535 then -- (hiredis took 99999 as 34463, and each command said "Connection refused")
    return nil, ("redis: port %d in URL %s is not one (1 to 65535)"):format(port, url)
  end
  -- (a number past 2^63 raised inside connect with a traceback; one past 2^31 was cut to another database)
  local dbn = db == "" and 0 or math.tointeger(tonumber(db))
  if not dbn or dbn > 2147483647 then
    return nil, ("redis: database %s in URL %s is not one (0 to 2147483647)"):format(db, url)
  end
  o.host, o.port, o.db, o.username, o.password = host, port, dbn, username ~= "" and username or nil, password
  return o
end

-- Down (src/store_redis.c): after a command's timeout, or a connection that
-- could not be made, the store's operations fail at once with
-- store_unavailable, not sent, until a probe in the background gets an
-- answer; each caller's own outage choice (on_outage, a settle tried again)
-- applies at once instead of after a timeout per operation. Said once each
-- way, and in the metrics.
local stores = setmetatable({}, { __mode = "k" })
-- (private.metrics: this module loads after scripts may run, and resil_* names are the host's)
local store_down = private.metrics.gauge("resil_store_down",
  "1 while a Redis store is down: its operations fail at once until a probe is answered, by store")
local store_refused = private.metrics.counter("resil_store_down_refused_total",
  "Operations a Redis store failed at once, not sent, while down, by store")
resil.metrics.collect(function()
  for backend in pairs(stores) do
    local st, label = backend.conn:state(), { store = redact(backend.url) }
    store_down:set(label, st.down and 1 or 0)
    store_refused:collected(label, st.refused)
  end
end)

local function on_state(url)
  local refused_before = 0
  return function(down, st)
    local fields = { store = redact(url) }
    if down then
      refused_before = st.refused
      fields.error = st.error
      resil.log.warn("redis: store down: its operations fail at once until it answers again", fields)
    else
      fields.down_for, fields.refused = st.down_for, st.refused - refused_before
      resil.log.info("redis: store back", fields)
    end
  end
end

local function open(url)
  local o, err = parse_url(url)
  if not o then return nil, resil.error("store_unavailable", err) end
  o.on_state = on_state(url)
  local conn = private.redis_connect(o) -- (resil.redis.connect is refused in the sandbox)
  local backend = setmetatable({ conn = conn, url = url, kind = "redis", shas = {}, loading = {}, commits = 0,
                                 ops = 0, where = o.host .. ":" .. o.port,
                                 -- (the command that acknowledges a loss names its server and database: a bare
                                 -- redis-cli went to localhost:6379's database 0, and budgets refused on)
                                 cli = ("redis-cli -h %s -p %d%s"):format(o.host, o.port,
                                   o.db ~= 0 and (" -n %d"):format(o.db) or "") }, R)
  stores[backend] = true
  return backend
end

-- (down: its operations fail at once; probes: probes without an answer this time; probe_every: from
-- this probe to the next)
function R:stats()
  local st = self.conn:state()
  return { commits = self.commits, ops = self.ops, connected = self.conn:connected(), down = st.down,
           probes = st.probes, probe_every = st.probe_every, refused = st.refused }
end

-- A write refused READONLY is a failover's (the primary a replica now, store_unavailable: the
-- connection is made anew, src/store_redis.c) once this process has had a script's write taken on
-- the store; before, it is a URL that names a replica, which no wait mends: store_error, not sent
-- (said an outage, a budget with on_outage = "allow" handed out unchecked tickets for as long as
-- the URL was wrong). -> reply | nil, err
-- The scripts whose reply says a write was taken, by the reply: a replica runs the others (a closed
-- breaker's probe, a page of runs, a budget refused: reads only), so that they said nothing of a
-- replica, and one of them run first let a budget's reservation refused READONLY be an outage again
local function first_is(v) return function(r) return type(r) == "table" and r[1] == v end end
local WROTE = {
  kv_incr = function() return true end, breaker_open = function() return true end,
  breaker_reopen = function() return true end,
  gcra_adjust = function() return true end, cost_record = function(r) return r == 1 end,
  budget_settle = function(r) return r == 1 end, budget_reserve = first_is(1),
  run_start = function(r) return type(r) == "table" and r[1] ~= "held" end,
  step_put = first_is(1), step_failed = first_is(1), once_finish = function(r) return r == 1 or r == 2 end,
}
local function judged(self, name, reply, err)
  if reply ~= nil then
    local wrote = WROTE[name]
    if wrote and wrote(reply) then self.written = true end
    return reply
  end
  if not self.written and resil.is_error(err) and err.kind == "store_unavailable" and
    tostring(err.message):find("READONLY", 1, true) then
    return nil, resil.error("store_error", ("%s (the store's URL names a replica: it takes no writes)"):format(
      err.message), { sent = false })
  end
  return nil, err
end

-- run a named script by SHA, loading it on first use or after a flush; give_back(reply): what the
-- server granted a caller canceled before it saw the reply (conn:call_or_give_back), or nil
local function run_script(self, give_back, name, keys, ...)
  local args = { "EVALSHA", false, #keys }
  for i = 1, #keys do args[#args + 1] = keys[i] end
  for i = 1, select("#", ...) do args[#args + 1] = (select(i, ...)) end
  self.ops = self.ops + 1
  local conn = self.conn
  local function call()
    if give_back then return conn:call_or_give_back(give_back, table.unpack(args)) end
    return conn:call(table.unpack(args))
  end
  local sha = self.shas[name]
  if sha then
    args[2] = sha
    local reply, err = call()
    if reply ~= nil or not (err and tostring(err.message):match("NOSCRIPT")) then return judged(self, name, reply, err) end
    self.shas[name] = nil -- (the server's scripts were flushed)
  end
  -- A script not loaded yet goes whole (EVAL), in one round trip, and is
  -- loaded for the next call. (A SCRIPT LOAD first waited for its answer: a
  -- write retried through an outage never reached a frozen server, which
  -- then ran the claim it was to give up as it thawed.)
  args[1], args[2] = "EVAL", scripts[name]
  local reply, err = call()
  self:load_later(name)
  return judged(self, name, reply, err)
end

function R:script(name, keys, ...) return run_script(self, nil, name, keys, ...) end

-- one SCRIPT LOAD at a time per script, its answer not waited for
function R:load_later(name)
  if self.shas[name] or self.loading[name] then return end
  self.loading[name] = true
  local ok = self.conn:send(function(loaded)
    self.loading[name] = nil
    if type(loaded) == "string" then
      self.shas[name] = loaded
      -- (so that a send by SHA answered NOSCRIPT is sent again whole by the connection, at the close too)
      self.conn:script_source(loaded, scripts[name])
    end
  end, "SCRIPT", "LOAD", scripts[name])
  if not ok then self.loading[name] = nil end
end

-- the script whole (EVAL) without waiting, loaded for the next (a burst
-- before the load's reply sent one SCRIPT LOAD per row): as script_later
local function eval_later(self, name, argv, done)
  argv[1], argv[2] = "EVAL", scripts[name]
  local ok, err = self.conn:send(function(reply, rerr)
    if reply == nil then return done(rerr) end
    done(nil, reply == 1)
  end, table.unpack(argv))
  if not ok then return done(err) end
  self:load_later(name)
end

-- The same without waiting (wait = false writes), for a script that answers
-- 1 or 0: sent now, before any command this process sends after it (a read
-- that follows sees it), from a task or not; done(nil, reply == 1) |
-- done(err) on the loop, outside any task. A script not loaded yet goes
-- whole (EVAL) and is loaded for the next. (One closure a write: a row
-- nobody waits for is written on every gateway request.)
function R:script_later(name, keys, args, done)
  self.ops = self.ops + 1
  local nkeys = #keys
  local argv = { false, false, nkeys }
  for i = 1, nkeys do argv[3 + i] = keys[i] end
  for i = 1, args.n do argv[3 + nkeys + i] = args[i] end
  local sha = self.shas[name]
  if not sha then return eval_later(self, name, argv, done) end
  argv[1], argv[2] = "EVALSHA", sha
  local ok, err = self.conn:send(function(reply, rerr)
    if reply == nil then
      -- the server's scripts were flushed and the connection could not send it again whole
      if tostring(rerr.message):match("NOSCRIPT") then
        self.shas[name] = nil
        return eval_later(self, name, argv, done)
      end
      return done(rerr)
    end
    done(nil, reply == 1)
  end, table.unpack(argv))
  if not ok then return done(err) end
end

local function ok_or(reply, err)
  if reply == nil then return nil, err end
  return reply
end

local function fmt_time(t) return string.format("%.6f", t) end

-- The lead of this process's virtual clock (a spec's) over its real one, for the leases' clock
-- (holders_lib) and the others (clock_lib): "0" on a real clock, a number with decimals on a virtual one.
-- Store time is the wall clock on a real clock; on a virtual one, wall time at start plus its time since.
-- (store.lua's, taken at its load: this module loads after scripts may have changed the resil table)
local clock_lead, store_now = private.clock_lead, private.store_now
local function lease_skew()
  local lead = clock_lead()
  return lead and fmt_time(lead) or "0"
end

-- ---------- ownership ----------

local OWNERS = P .. "owners"

-- held: owner.lua's tokens (what this process holds here); "once:<key>" are
-- running once records, renewed BEAT_KEYS to a script (a command takes at
-- most 64 arguments: with 57 running records the beat raised and stopped)
local BEAT_KEYS = 48
function R:owner_beat(me, lease_until, now, held)
  local records = {}
  for token in pairs(held or {}) do
    if token:sub(1, 5) == "once:" then records[#records + 1] = P .. token end
  end
  local lease_ms = ms(owner.lease)
  local from = 1
  repeat
    local keys = { OWNERS, table.unpack(records, from, math.min(from + BEAT_KEYS - 1, #records)) }
    local ok, err = self:script("owner_beat", keys, me, fmt_time(lease_until - now), fmt_time(now), lease_ms,
      lease_skew())
    if ok == nil then return nil, err end
    from = from + BEAT_KEYS
  until from > #records
  return true
end

-- Of the holders a script reported (on this machine), the dead ones, as the
-- scripts take them ("\n"-separated), or nil when all are alive.
local function dead_among(holders)
  local dead = {}
  for _, id in ipairs(holders) do
    if owner.verdict(id) == "dead" then dead[#dead + 1] = id end
  end
  return #dead > 0 and table.concat(dead, "\n") or nil
end

local function same_host() return owner.me().local_prefix end
-- a lease until lease_until (store time), as the scripts take it: its length from now
local function lease_arg(lease_until, now) return lease_until and fmt_time(lease_until - now) or "" end

-- for `resil-lua runs`: on this machine the pid decides, elsewhere the lease (on the server's clock)
function R:holder_alive(id)
  local verdict = owner.verdict(id)
  if verdict == "remote" then
    local lease = self.conn:call("ZSCORE", OWNERS, id)
    local t = lease and self.conn:call("TIME")
    return t and tonumber(lease) > tonumber(t[1]) + tonumber(t[2]) / 1e6 + lease_skew() or false
  end
  return verdict == "me" or verdict == "alive"
end

-- ---------- key/value ----------

function R:kv_get(key)
  local v, err = self.conn:call("GET", P .. "kv:" .. key)
  if v == nil then return nil, err end
  return v or nil
end

function R:kv_set(key, value, ttl)
  local reply, err
  if ttl then reply, err = self.conn:call("SET", P .. "kv:" .. key, value, "PX", ms(ttl))
  else reply, err = self.conn:call("SET", P .. "kv:" .. key, value) end
  if reply == nil then return nil, err end
  return true
end

function R:kv_del(key)
  local n, err = self.conn:call("DEL", P .. "kv:" .. key)
  if n == nil then return nil, err end
  return n > 0
end

function R:kv_incr(key, n, ttl)
  local v, err = self:script("kv_incr", { P .. "kv:" .. key }, n, ttl and ms(ttl) or "")
  if v == nil then return nil, err end
  local x = tonumber(v)
  return math.tointeger(x) or x
end

-- ---------- idempotency ----------

-- a claim given up (once_abandon) and not arrived yet: refused when it does, within the hour (a
-- frozen Redis runs what it had received as it thaws, as the abandon is written)
local function abandoned_marker(claim) return P .. "once:abandoned:" .. claim end
local ABANDONED_TTL_MS = 3600 * 1000

function R:once_claim(key, fingerprint, me, lease, retention, now, lease_until, claim)
  local dead = ""
  while true do
    -- a running record lives at least a lease (the heartbeat extends it while fn runs)
    local r, err = self:script("once_claim", { P .. "once:" .. key, OWNERS, abandoned_marker(claim or "") },
      fingerprint, me, lease, math.max(retention, owner.lease),
      fmt_time(now), dead, same_host(), lease_arg(lease_until, now), claim or "", lease_skew())
    if r == nil then return nil, err end
    local data = r[2]
    if data == false then data = nil end
    if r[1] ~= "in_progress" then return r[1], data end
    local holder_dead = dead == "" and dead_among({ r[3] })
    if not holder_dead then return r[1], tonumber(data), r[3] end
    dead = holder_dead -- its pid is gone: take it over
  end
end

-- A read of the key's record, claiming nothing (one past its retention has expired):
-- -> "done", result | "key_reused" | "running" | "none"
function R:once_peek(key, fingerprint)
  local r, err = self.conn:call("HMGET", P .. "once:" .. key, "fingerprint", "state", "result")
  if r == nil then return nil, err end
  if not r[2] then return "none" end
  if r[1] ~= fingerprint and r[2] == "done" then -- (a failure kept: other arguments run, once_claim)
    local t = type(r[3]) == "string" and json.decode(r[3])
    if type(t) == "table" and type(t.v) == "table" and t.v[1] == json.null and t.v[2] ~= nil and t.v[2] ~= json.null then
      return "none"
    end
  end
  if r[1] ~= fingerprint then return "key_reused" end
  if r[2] == "done" then return "done", r[3] or nil end
  return "running"
end

local function once_rewritten(self, key, n)
  if n == 2 then
    resil.log.warn("once: the key's record was gone as fn ended (the store lost its data?): written again with " ..
      "fn's result", { key = key, store = redact(self.url) })
  end
  return n >= 1
end

function R:once_finish(key, owner, result, retention, _, fingerprint)
  local n, err = self:script("once_finish", { P .. "once:" .. key }, owner, result, retention, fingerprint or "")
  if n == nil then return nil, err end
  return once_rewritten(self, key, n)
end

-- -> true (given up: its record dropped, or never to be made)
function R:once_abandon(key, me, claim)
  local n, err = self:script("once_abandon", { P .. "once:" .. key, abandoned_marker(claim) }, me, claim,
    ABANDONED_TTL_MS)
  if n == nil then return nil, err end
  return true
end

-- the same at once, without the loop (resil_close: a claim whose task never resumed, its answer
-- in or its command still on its way: written as the connection closes, and refused then)
function R:once_abandon_now(key, me, claim)
  local n, err = self.conn:call_now("EVAL", scripts.once_abandon, 2, P .. "once:" .. key, abandoned_marker(claim), me,
    claim, ABANDONED_TTL_MS)
  if n == nil then error(err, 0) end
  return n == 1
end

function R:once_release(key, owner)
  local n, err = self:script("once_release", { P .. "once:" .. key }, owner)
  if n == nil then return nil, err end
  return n == 1
end

-- once_finish at once, without the loop (resil_close: fn ended, its record not yet written)
function R:once_finish_now(key, owner, result, retention, _, fingerprint)
  local n, err = self.conn:call_now("EVAL", scripts.once_finish, 1, P .. "once:" .. key, owner, result, retention,
    fingerprint or "")
  if n == nil then error(err, 0) end
  return once_rewritten(self, key, n)
end

-- the same at once, without the loop (resil_close): one blocking command
function R:once_release_now(key, owner)
  local n, err = self.conn:call_now("EVAL", scripts.once_release, 1, P .. "once:" .. key, owner)
  if n == nil then error(err, 0) end
  return n == 1
end

function R:once_reap() return 0 end -- records expire by themselves (PEXPIRE)

-- ---------- runs and steps ----------

local function run_keys(id) return { P .. "run:" .. id, P .. "steps:" .. id, P .. "runs" } end
local function unfinished_key(id) return P .. "unfinished:" .. id end

-- -> steps done, generation | false, holder, since
function R:run_start(id, script, fresh, now, me, lease_until, args)
  local keys = run_keys(id)
  keys[4], keys[5] = OWNERS, unfinished_key(id)
  local dead = ""
  while true do
    local r, err = self:script("run_start", keys, id, script or "", fresh and "1" or "0", fmt_time(now), me, dead,
      same_host(), lease_arg(lease_until, now), args or "", lease_skew())
    if r == nil then return nil, err end
    if r[1] ~= "held" then
      self.taken_runs = self.taken_runs or {}
      -- (its record made again from these: remake_run)
      self.taken_runs[id] = { script = script or "", args = args or "", generation = tostring(r[2] or 0) }
      return r[1], r[2]
    end
    local holder_dead = dead == "" and dead_among({ r[2] })
    if not holder_dead then return false, r[2], tonumber(r[3]) end
    dead = holder_dead
  end
end

-- after the last task: the loop has stopped, so one blocking command; from a task (on_loop:
-- resil.run.finish called by the script, not its end), the script waits for it as for any
-- other: a blocking command held every task of the process while a frozen server timed it out.
-- -> true | false (another holds the run) | nil, err
function R:run_finish_now(id, status, now, me, pending, on_loop)
  local extra = {}
  for _, p in ipairs(pending or {}) do
    extra[#extra + 1] = p.scope .. "|" .. p.seq
    extra[#extra + 1] = json.encode({ scope = p.scope, seq = p.seq, name = p.name, state = p.state or "pending",
      error = p.error, retries = p.retries or 0, at = now, started = p.started, detail = p.detail })
  end
  local args = { status, fmt_time(now), me, #extra > 0 and json.encode(extra) or "[]" }
  local keys = { P .. "run:" .. id, unfinished_key(id) }
  local n, err
  if on_loop and private.running() and coroutine.isyieldable() then
    n, err = self:script("run_finish", keys, table.unpack(args))
  else
    n, err = self.conn:call_now("EVAL", scripts.run_finish, 2, keys[1], keys[2], table.unpack(args))
  end
  if n == nil then return nil, err end -- (the run stays "running (gone)": it resumes)
  if self.taken_runs then self.taken_runs[id] = nil end -- (an embedder's process runs many)
  return n == 1
end

-- resil_close: a take of the run whose task never resumed: the run, if `me` holds it, is given up
-- "interrupted" (a later host resumes it); one another holds, or nobody, is left as it is
local run_give_up = [[
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'interrupted', 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'owner', 'owner_since')
return 1
]]
function R:run_give_up_now(id, now, me)
  local n, err = self.conn:call_now("EVAL", run_give_up, 1, P .. "run:" .. id, fmt_time(now), me)
  if n == nil then error(err, 0) end
  if self.taken_runs then self.taken_runs[id] = nil end
  return n == 1
end

-- A step's fn is about to run: a "running" record, so that a process that dies before the step's
-- end leaves a trace of it. Its step_put or step_failed replaces it.
function R:step_started(run, scope, seq, name, started, me)
  local rec = json.encode({ scope = scope, seq = seq, name = name, state = "running", retries = 0, at = started,
    started = started })
  local r, err = self:script("step_started", { P .. "run:" .. run, unfinished_key(run) }, scope .. "|" .. seq, rec, me)
  if r == nil then return nil, err end
  return r[1] == 1
end

function R:step_get(run, scope, seq)
  local v, err = self.conn:call("HGET", P .. "steps:" .. run, scope .. "|" .. seq)
  if v == nil then return nil, err end
  if v == false then return nil end
  local rec = json.decode(v)
  return rec.name, rec.result
end

-- the run's record was made again by a step's record (remake_run): said
local function run_remade(self, run, r)
  if r[2] == 1 then
    resil.log.warn("run: the run's record was gone from the store as a step ended (the store lost its data?): made "
      .. "again, held by this process; its steps before this one went with it", { run = run, store = redact(self.url) })
  end
end

-- what a step's record makes the run's record again from (remake_run): its id, script, args and generation
local function taken_run(self, run)
  local t = self.taken_runs and self.taken_runs[run] or {}
  return run, t.script or "", t.args or "", t.generation or "0"
end

-- -> true | true, name, result (a record there already: the first is kept) | false, holder, since
-- (the run was taken over)
-- a step's record for the step_put script: its keys and its arguments
local function step_put_args(self, run, scope, seq, name, result, now, me, retries, started, detail)
  local keys = run_keys(run)
  local rec = json.encode({ name = name, result = result, at = now, scope = scope, seq = seq,
    retries = retries or 0, started = started, detail = detail })
  return { keys[1], keys[2], unfinished_key(run), keys[3] }, scope .. "|" .. seq, rec, fmt_time(now), me,
    taken_run(self, run)
end

function R:step_put(run, ...)
  local r, err = self:script("step_put", step_put_args(self, run, ...))
  if r == nil then return nil, err end
  run_remade(self, run, r)
  if r[1] == 1 then return true end
  if r[1] == 2 then -- the place has a record already (written while the run had no holder): the first is kept
    local stored = json.decode(r[2])
    return true, stored.name, stored.result
  end
  return false, r[2], tonumber(r[3])
end

-- the same at once, without the loop (the run's end after a signal, resil_close: fn ended, its
-- record not yet written): one blocking command -> as step_put
function R:step_put_now(run, ...)
  local keys, place, rec, at, me, taken = step_put_args(self, run, ...)
  local r, err = self.conn:call_now("EVAL", scripts.step_put, #keys, keys[1], keys[2], keys[3], keys[4], place, rec,
    at, me, taken)
  if r == nil then return nil, err end
  if r[1] == 0 then return false, r[2], tonumber(r[3]) end
  return true
end

-- A page of the runs, newest first, with their records: KEYS: runs index; ARGV: the highest score
-- to list (inclusive), how many runs of that score are listed already, how many, the records'
-- prefix -> { id, score, { field, value, ... }, ... }
scripts.runs_page = [[
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'WITHSCORES', 'LIMIT', ARGV[2], ARGV[3])
local out = {}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGETALL', ARGV[4] .. ids[i])
end
return out
]]

-- The runs, newest first, RUNS_PAGE at a time: one ZREVRANGE of the whole index was a reply as
-- large as a million runs, then a round trip per run (100,000 runs: 20 s). Paged by score, not by
-- rank: a run updated meanwhile moves to the top, which shifted ranks and listed a run twice.
local RUNS_PAGE = 500
function R:runs_list(now)
  local out, max, at_max = {}, "+inf", 0
  while true do
    local page, err = self:script("runs_page", { P .. "runs" }, max, tostring(at_max), tostring(RUNS_PAGE),
      P .. "run:")
    if not page then return nil, err end
    for i = 1, #page, 3 do
      local id, score, h = page[i], page[i + 1], page[i + 2]
      local row = {}
      for j = 1, #h, 2 do row[h[j]] = tonumber(h[j + 1]) or h[j + 1] end
      row.id = id
      if row.owner then row.holder, row.holder_alive = owner.describe(row.owner), self:holder_alive(row.owner) end
      out[#out + 1] = row
      if score == max then at_max = at_max + 1 else max, at_max = score, 1 end
    end
    if #page < 3 * RUNS_PAGE then return out end
  end
end

-- A run and its steps forgotten: -> true | false, "unknown" | false, "held", holder. The run is
-- deleted only if its holder is still the one judged gone (one that took it meanwhile keeps it).
local run_forget = [[
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
]]
function R:run_forget(id)
  local holder, err = self.conn:call("HGET", P .. "run:" .. id, "owner")
  if holder == nil then return nil, err end
  if holder and self:holder_alive(holder) then return false, "held", holder end
  local keys = run_keys(id)
  local n, cerr = self.conn:call("EVAL", run_forget, 4, keys[1], keys[2], unfinished_key(id), keys[3], holder or "", id)
  if n == nil then return nil, cerr end
  if n == 0 then return false, "unknown" end
  if n == -1 then return false, "held", self.conn:call("HGET", P .. "run:" .. id, "owner") end
  return true
end

-- A step that failed, with its error: -> true | false, holder, since
function R:step_failed(run, scope, seq, name, err_text, retries, now, me, started, detail)
  local rec = json.encode({ scope = scope, seq = seq, name = name, state = "failed", error = err_text,
    retries = retries or 0, at = now, started = started, detail = detail })
  local r, err = self:script("step_failed", { P .. "run:" .. run, unfinished_key(run), P .. "runs" }, scope .. "|" .. seq,
    rec, fmt_time(now), me, taken_run(self, run))
  if r == nil then return nil, err end
  run_remade(self, run, r)
  if r[1] == 1 then return true end
  return false, r[2], tonumber(r[3])
end

function R:run_get(id)
  local h, err = self.conn:call("HGETALL", P .. "run:" .. id)
  if not h then return nil, err end
  if #h == 0 then return nil end
  local row = { id = id }
  for i = 1, #h, 2 do row[h[i]] = tonumber(h[i + 1]) or h[i + 1] end
  return row
end

-- -> { {scope=, seq=, name=, at=, bytes=, retries=, state="done"|"failed"|"pending", error=}, ... }
-- KEYS: steps hash -> { field, bytes, field, bytes, ... }
scripts.step_sizes = [[
local out = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  out[#out + 1] = f
  out[#out + 1] = redis.call('HSTRLEN', KEYS[1], f)
end
return out
]]

-- The records are read a few at a time, up to about 4 MB a reply (one larger record alone): all in
-- one HVALS, a run of a few large checkpoints (up to 32 MB a step) needed a reply past a server's
-- client-output-buffer-limit (the connection cut) or its timeout, and `runs show` failed
local STEPS_READ_BYTES, STEPS_READ_FIELDS = 4 * 1024 * 1024, 500
function R:run_steps(run)
  local key = P .. "steps:" .. run
  local sizes, err = self:script("step_sizes", { key })
  if not sizes then return nil, err end
  local out = {}
  local i = 1
  while i < #sizes do
    local batch, bytes = { "HMGET", key }, 0
    repeat
      batch[#batch + 1], bytes, i = sizes[i], bytes + sizes[i + 1], i + 2
    until i >= #sizes or #batch - 2 >= STEPS_READ_FIELDS or bytes + sizes[i + 1] > STEPS_READ_BYTES
    local h, herr = self.conn:call(table.unpack(batch))
    if not h then return nil, herr end
    for _, v in ipairs(h) do
      if v then -- (false: forgotten since)
        local rec = json.decode(v)
        out[#out + 1] = { scope = rec.scope, seq = math.tointeger(rec.seq), name = rec.name, at = rec.at,
                          started = rec.started, detail = rec.detail, bytes = #rec.result,
                          retries = math.tointeger(rec.retries or 0), state = "done" }
      end
    end
  end
  table.sort(out, function(a, b) return a.at < b.at end)
  for _, v in ipairs(self.conn:call("HVALS", unfinished_key(run)) or {}) do
    local rec = json.decode(v)
    if rec.error == json.null then rec.error = nil end
    rec.seq, rec.retries = math.tointeger(rec.seq), math.tointeger(rec.retries or 0)
    out[#out + 1] = rec
  end
  return out
end

-- ---------- costs ----------

local COST_KEYS = { P .. "costs", P .. "costs:dedupe" }

-- the keys and arguments of a row (scripts.cost_record): one with a budget and a period names
-- that period's spent key (budget_keys' first), as SQLite's trigger counts it in budget_spent
local function cost_call(e)
  if e.budget == nil or e.period == nil then return COST_KEYS, { e.dedupe or "", json.encode(e), n = 2 } end
  local spent = P .. "budget:" .. tostring(e.budget) .. ":" .. tostring(e.period) .. ":spent"
  return { COST_KEYS[1], COST_KEYS[2], spent },
    { e.dedupe or "", json.encode(e), string.format("%d", e.micro_usd or 0), n = 3 }
end

function R:cost_record(e)
  local keys, args = cost_call(e)
  local n, err = self:script("cost_record", keys, table.unpack(args, 1, args.n))
  if n == nil then return nil, err end
  return n == 1
end

-- the same, without waiting (R:script_later): done(nil, inserted) | done(err)
function R:cost_record_later(e, done)
  local keys, args = cost_call(e)
  self:script_later("cost_record", keys, args, done)
end

local FILTERS = { "provider", "model", "operation", "user", "run", "budget" }

-- The ledger's rows, oldest first, LEDGER_PAGE at a time: one LRANGE of a
-- whole ledger held Redis (single-threaded: every budget and limit of every
-- gateway behind it) for as long as it took to send millions of rows, and
-- was as large a reply (past a server's client-output-buffer-limit, the
-- connection was closed and the report failed). The list is only appended
-- to, so a row's index is fixed and the pages join up. each(text) ->
-- nothing | nil, err
-- (up to the row before `upto`, when given: -> true, how many rows were read)
local LEDGER_PAGE = 1000
local function each_ledger_row(self, each, upto)
  local from = 0
  while true do
    local last = from + LEDGER_PAGE - 1
    if upto and last >= upto then last = upto - 1 end
    if last < from then return true, from end
    local page, err = self.conn:call("LRANGE", P .. "costs", from, last)
    if not page then return nil, err end
    for _, text in ipairs(page) do each(text) end
    if #page < last - from + 1 then return true, from + #page end
    from = last + 1
  end
end

R.each_ledger_row = each_ledger_row

function R:cost_query(by, filter)
  local groups, order = {}, {}
  local ok, err = each_ledger_row(self, function(text)
    local e = json.decode(text)
    local keep = true
    for _, f in ipairs(FILTERS) do
      if filter[f] ~= nil and e[f] ~= filter[f] then keep = false end
    end
    if filter.since and e.at < filter.since then keep = false end
    if filter["until"] and e.at >= filter["until"] then keep = false end
    if keep then
      local k = by and e[by]
      if k == json.null then k = nil end
      local gk = k == nil and "\0" or k
      local g = groups[gk]
      if not g then
        g = { key = k, micro_usd = 0, calls = 0, unpriced = 0 }
        groups[gk] = g
        order[#order + 1] = g
      end
      -- nil: a call without a price (an integer: a sum of floats past 2^53 micro-dollars is not whole)
      local micro = e.micro_usd ~= json.null and (math.tointeger(e.micro_usd) or e.micro_usd) or nil
      g.micro_usd, g.calls = g.micro_usd + (micro or 0), g.calls + 1
      if not micro then g.unpriced = g.unpriced + 1 end
    end
  end)
  if not ok then return nil, err end
  if not by and #order == 0 then order[1] = { micro_usd = 0, calls = 0, unpriced = 0 } end
  table.sort(order, function(a, b) return a.micro_usd > b.micro_usd end)
  return order
end

-- a ledger row that passes the filter, as cost_rows hands it -> row | nil
local function kept_row(filter, text)
  local e = json.decode(text)
  if filter.since and e.at < filter.since then return nil end
  for _, f in ipairs(FILTERS) do
    if filter[f] ~= nil and e[f] ~= filter[f] then return nil end
  end
  for k, v in pairs(e) do if v == json.null then e[k] = nil end end
  e.micro_usd = math.tointeger(e.micro_usd) or e.micro_usd
  return e
end

-- A binary heap of {at, i[, row]}, least (at, then place in the ledger) first; or of numbers
local function earlier(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function less(a, b) return a < b end
local function heap_push(h, e, earlier)
  local k = #h + 1
  h[k] = e
  while k > 1 do
    local up = k // 2
    if not earlier(h[k], h[up]) then break end
    h[k], h[up] = h[up], h[k]
    k = up
  end
end
local function heap_pop(h, earlier)
  local top, n = h[1], #h
  h[1] = h[n]
  h[n] = nil
  n = n - 1
  local k = 1
  while true do
    local l, least = 2 * k, k
    if l <= n and earlier(h[l], h[least]) then least = l end
    if l + 1 <= n and earlier(h[l + 1], h[least]) then least = l + 1 end
    if least == k then return top end
    h[k], h[least] = h[least], h[k]
    k = least
  end
end

-- The ledger's rows that pass the filter, oldest first (by `at`, then as recorded), as SQLite's.
-- The list is in the order the rows reached Redis: nearly by time, a row late by as much as its
-- process took to write it (a queue through an outage: minutes). each(row) gets them SORT_WINDOW
-- rows behind the read, in order when no row came later than that: a first pass checks it, on the
-- rows' times alone. Each was read whole first and sorted: `costs --csv` of a million rows held
-- them all (525 MB, where SQLite's streamed). A ledger whose rows came later still is sorted whole.
local SORT_WINDOW = 10000
function R:cost_rows(filter, each)
  if each then
    -- (sorted: each row as it is read; in_order: each SORT_WINDOW rows behind)
    local h, last, latest, i, in_order, sorted = {}, -math.huge, -math.huge, 0, true, true
    local ok, n = each_ledger_row(self, function(text)
      if not in_order then return end
      local e = kept_row(filter, text)
      if not e then return end
      local at = e.at
      if at < latest then sorted = false else latest = at end
      if at < last then in_order = false return end
      heap_push(h, at, less)
      if #h > SORT_WINDOW then last = heap_pop(h, less) end
    end)
    if not ok then return nil, n end
    if in_order then
      h = {}
      local rok, err = each_ledger_row(self, function(text)
        local e = kept_row(filter, text)
        if not e then return end
        if sorted then return each(e) end
        i = i + 1
        heap_push(h, { e.at, i, e }, earlier)
        if #h > SORT_WINDOW then each(heap_pop(h, earlier)[3]) end
      end, n) -- (not the rows recorded since the first pass: those were not checked)
      if not rok then return nil, err end
      while #h > 0 do each(heap_pop(h, earlier)[3]) end
      return true
    end
  end
  local out = {}
  local ok, err = each_ledger_row(self, function(text)
    local e = kept_row(filter, text)
    if e then out[#out + 1] = { e.at, #out + 1, e } end
  end)
  if not ok then return nil, err end
  table.sort(out, earlier)
  for k, e in ipairs(out) do out[k] = e[3] end
  if each then
    for _, r in ipairs(out) do each(r) end
    return true
  end
  return out
end

-- ---------- budgets ----------

-- A ticket's record (its state: held, settled, released) is kept a day past
-- its hold, so that a settle retried after a timeout finds it settled; then
-- Redis drops it (one key per reservation, kept for ever, was a leak). The
-- ledger's row keeps its ticket, so a settle later still is not recorded twice.
local TICKET_KEPT = 86400
local function ticket_ttl(seconds) return tostring(ms(math.ceil((seconds or 0) + TICKET_KEPT))) end

-- A budget's settings live in a hash: limit, per (set from the command line), declared_limit,
-- declared_per (the script's); the names in a set.
local BUDGETS = P .. "budgets"
-- the prefix of a budget's keys, one set per period: "resil:budget:NAME:"
local function budget_prefix(budget) return P .. "budget:" .. budget .. ":" end
local function budget_keys(budget, period, ticket)
  local b = budget_prefix(budget) .. period
  return { b .. ":spent", b .. ":reserved", b .. ":holds", b .. ":amounts", P .. "ticket:" .. (ticket or ""),
           b .. ":holders", OWNERS }
end

-- the period before `period` (of its kind, `now` in it), as on SQLite -> nil for none
local function period_before(period, now)
  local fmt = #period == 7 and "!%Y-%m" or #period == 10 and "!%Y-%m-%d"
  if not fmt or os.date(fmt, math.floor(now)) ~= period then return nil end
  local start = math.floor(now) - math.floor(now) % 86400
  if #period == 7 then start = start - (os.date("!*t", start).day - 1) * 86400 end
  return os.date(fmt, start - 1)
end

-- the keys of a script that rolls the holds of earlier periods into `period` (budget_lib's roll),
-- to the ticket's key (`ticket`) for a reservation
local function rolling_keys(budget, period, now, ticket)
  local keys = budget_keys(budget, period, ticket)
  keys[8], keys[9] = BUDGETS .. ":" .. budget, budget_prefix(budget) .. "periods"
  local before = period_before(period, now)
  keys[10] = before and budget_prefix(budget) .. before .. ":holds" or nil
  return keys
end

-- A store that lost its data (a server restarted without persistence, flushed, or failed over to an
-- empty replica) has lost every budget's spend: its next reservations would spend them again. Its
-- marker ("resil:store", written by the first reservation on a store without one) is checked by
-- each reservation's own script; one gone, or another process's new one where this process saw
-- another, marks the store lost ("lost ..." in the marker, for every process, those started since
-- too), and reservations fail closed (store_unavailable, err.lost, not sent: on_outage = "allow"
-- too; a gateway's client gets its 503) until an operator sets the marker to anything else
-- (docs/decisions.md).
local MARK = P .. "store"
-- (a marker this process may take: its own, the first it sees, or an operator's)
local function marker_ok(seen, mark)
  return mark ~= nil and (mark == seen or not mark:match("^lost ") and (seen == nil or not mark:match("^n:")))
end

scripts.store_lost = [[
if (redis.call('GET', KEYS[1]) or '') == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) end
return 1
]]

-- the marker `mark` a reservation found (nil: none) -> true to try again (adopted) | nil, err
local function marker_found(self, mark)
  if marker_ok(self.mark, mark) then
    if self.lost then
      resil.log.warn("redis: the store's loss was acknowledged (its marker set): budgets reserve again",
        { store = redact(self.url), marker = mark })
    end
    self.mark, self.lost = mark, nil
    return true
  end
  if not (mark and mark:match("^lost ")) then -- (seen here first: said in the store, for every process)
    self:script("store_lost", { MARK }, mark or "", ("lost %s (marker %s, was %s)"):format(
      os.date("!%Y-%m-%dT%H:%M:%SZ"), mark or "gone", self.mark or "not seen"))
  end
  if not self.lost then
    self.lost = true
    resil.log.error("redis: the store lost its data (a server restarted without persistence, flushed, or failed " ..
      "over to an empty replica): every budget's spend and gateway key is gone, and budgets refuse to reserve (a " ..
      "gateway's keys not found are 503s) until an operator " ..
      "restores it or accepts the loss: " .. self.cli .. " SET " .. MARK .. " ok", { store = redact(self.url),
      marker = mark or "gone" })
  end
  return nil, resil.error("store_unavailable", ("redis %s: the store lost its data (its marker %s is %s): budgets " ..
    "refuse until an operator sets it (%s SET %s ok)"):format(self.where, MARK,
    mark and ("'" .. mark .. "'") or "gone", self.cli, MARK), { sent = false, lost = true })
end

-- A key the gateway looked up and did not find: a store that lost its data lost every key too, and
-- nothing but a reservation read the marker, so each client's valid key was a 401 "invalid or revoked"
-- with nothing said (no reservation follows a 401). Read as a reservation reads it, at most once a
-- second, not judged before this process has seen one (a store whose budgets never reserved has none).
-- -> nil | err (the store lost its data, as marker_found says it)
function R:lost_check()
  local now = resil.clock.now()
  if self.lost_checked and now >= self.lost_checked and now - self.lost_checked < 1 then return self.lost_err end
  self.lost_checked = now
  local mark = self.conn:call("GET", MARK)
  if mark == nil then return self.lost_err end -- (unavailable: judged at the next)
  if not mark and self.mark == nil then return nil end
  local _, err = marker_found(self, mark or nil)
  self.lost_err = err
  return err
end

-- -> true, spent, reserved | false, spent, reserved
-- set_per: as on SQLite (-> false, 0, 0, "stale")
function R:budget_reserve(budget, period, limit, estimate, ticket, expires_at, now, me, lease_until, set_per)
  local dead = ""
  local keys = rolling_keys(budget, period, now, ticket)
  while true do
    local r, err = self:script("budget_reserve", keys, limit, estimate, ticket,
      fmt_time(expires_at), fmt_time(now), budget, period, me, dead, same_host(), lease_arg(lease_until, now),
      ticket_ttl(expires_at - now), lease_skew(), self.mark or "", self.mark and "" or "n:" .. me, set_per)
    if r == nil then return nil, err end
    if r[1] == 2 then return false, 0, 0, "stale" end
    if r[1] == 3 then
      local again, lerr = marker_found(self, r[2] or nil)
      if not again then return nil, lerr end
      goto continue
    end
    local holders_dead = r[1] == 0 and dead == "" and dead_among({ table.unpack(r, 4) })
    if not holders_dead then return r[1] == 1, r[2], r[3] end
    dead = holders_dead -- their pids are gone: release their holds and try again
    ::continue::
  end
end

-- -> spent, reserved, { {ticket=, micro_usd=, owner=, expires_at=, created_at=}, ... }, the period (the
-- server's: budget_lib's server_period)
function R:budget_usage(budget, period, now, me)
  local dead = ""
  while true do
    local r, err = self:script("budget_usage", rolling_keys(budget, period, now), fmt_time(now), me, dead, same_host(),
      P .. "ticket:", lease_skew())
    if r == nil then return nil, err end
    local holders_dead = dead == "" and dead_among(r[3])
    if not holders_dead then
      local holds = {}
      for i, h in ipairs(r[4]) do
        holds[i] = { ticket = h[1], micro_usd = h[2], owner = h[3] ~= "" and h[3] or nil, expires_at = tonumber(h[4]),
                     created_at = tonumber(h[5]) }
      end
      return r[1], r[2], holds, r[5] or nil
    end
    dead = holders_dead
  end
end

-- for a budget's gauges: spent, reserved (the usage script: it waits for no one)
function R:budget_figures(budget, period, now)
  local spent, reserved = self:budget_usage(budget, period, now, owner.me().id)
  return spent, reserved
end

-- the keys and arguments of a settle (scripts.budget_settle)
local function settle_call(ticket, entry)
  local keys = budget_keys(entry.budget, entry.period, ticket)
  keys[8], keys[9] = P .. "costs", P .. "costs:dedupe"
  local parent = ticket:match("^(.+):charge:%d+$") -- (Ticket:charge's ids)
  if parent then keys[10] = P .. "ticket:" .. parent end
  return keys, { ticket, entry.micro_usd, entry.dedupe or "", json.encode(entry), ticket_ttl(),
    entry.charged and "1" or "0", entry.period, budget_prefix(entry.budget), fmt_time(entry.at),
    fmt_time(store_now()), lease_skew(), n = 11 }
end

function R:budget_settle(ticket, entry)
  local keys, args = settle_call(ticket, entry)
  local n, err = self:script("budget_settle", keys, table.unpack(args, 1, args.n))
  if n == nil then return nil, err end
  return n == 1
end

-- the same, without waiting (R:script_later): done(nil, first) | done(err)
function R:budget_settle_later(ticket, entry, done)
  local keys, args = settle_call(ticket, entry)
  self:script_later("budget_settle", keys, args, done)
end

-- Release a budget's live holds in a period: all, or (stale) those whose owner is not alive. -> how many
function R:budget_release_holds(budget, period, stale, now, me)
  local dead = ""
  while true do
    local r, err = self:script("budget_release_holds", rolling_keys(budget, period, now), stale and "1" or "0",
      fmt_time(now), me, dead, same_host(), P .. "ticket:", ticket_ttl(), lease_skew())
    if r == nil then return nil, err end
    local holders_dead = stale and dead == "" and dead_among({ table.unpack(r, 2) })
    if not holders_dead then return r[1] end
    dead = holders_dead
  end
end

local function budget_config_of(h)
  if not h or #h == 0 then return nil end
  local row = {}
  for i = 1, #h, 2 do row[h[i]] = h[i + 1] end
  return { limit_micro = tonumber(row.limit), per = row.per, declared_micro = tonumber(row.declared_limit),
           declared_per = row.declared_per }
end

function R:budget_config(name)
  local h, err = self.conn:call("HGETALL", BUDGETS .. ":" .. name)
  if h == nil then return nil, err end
  return budget_config_of(h)
end

function R:budget_declare(name, micro, per, now, carry)
  -- (its period kind changed while it is the one in force: carried in one script, as budget_set's)
  if carry then return self:budget_set(name, micro, per, now, carry, true) end
  local ok, err = self.conn:call("HSET", BUDGETS .. ":" .. name, "declared_limit", micro, "declared_per", per,
    "declared_at", fmt_time(now))
  if ok == nil then return nil, err end
  self.conn:call("SADD", BUDGETS, name)
  return true
end

-- The settings, with a period kind changed written in the same script.
-- KEYS: the settings hash, the names set [, the ledger, the new period's spent, reserved, holds,
-- amounts, holders, then the same four (reserved to holders) of each period to carry the holds
-- from]; ARGV: name, limit, per, now, the new period's spend in the ledger's first `n` rows, n,
-- since, the ticket prefix, the new period. The spend is what the ledger holds for the new period
-- (summed by the caller, plus the rows settled since: a settle that landed meanwhile went to the
-- old period's counter), and the open holds move to the new period, their tickets saying so
-- (their settle counts there), as on SQLite.
scripts.budget_set = [[
if ARGV[10] == 'declared' then
  redis.call('HSET', KEYS[1], 'declared_limit', ARGV[2], 'declared_per', ARGV[3], 'declared_at', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'limit', ARGV[2], 'per', ARGV[3], 'set_at', ARGV[4])
end
redis.call('SADD', KEYS[2], ARGV[1])
if not KEYS[3] then return 1 end
local spent, since = tonumber(ARGV[5]), tonumber(ARGV[7])
for _, text in ipairs(redis.call('LRANGE', KEYS[3], ARGV[6], -1)) do
  local e = cjson.decode(text)
  if e.budget == ARGV[1] and type(e.micro_usd) == 'number' and (since == nil or e.at >= since) then
    spent = spent + e.micro_usd
  end
end
redis.call('SET', KEYS[4], string.format('%d', spent))
for g = 9, #KEYS, 4 do
  local z = redis.call('ZRANGE', KEYS[g + 1], 0, -1, 'WITHSCORES')
  for i = 1, #z, 2 do
    local t = z[i]
    local a, o = redis.call('HGET', KEYS[g + 2], t), redis.call('HGET', KEYS[g + 3], t)
    redis.call('ZADD', KEYS[6], z[i + 1], t)
    redis.call('ZREM', KEYS[g + 1], t)
    if a then
      redis.call('INCRBY', KEYS[5], a)
      redis.call('DECRBY', KEYS[g], a)
      redis.call('HSET', KEYS[7], t, a)
      redis.call('HDEL', KEYS[g + 2], t)
    end
    if o then
      redis.call('HSET', KEYS[8], t, o)
      redis.call('HDEL', KEYS[g + 3], t)
    end
    -- (a ticket whose hash is gone keeps none: no key left without its expiry)
    if redis.call('EXISTS', ARGV[8] .. t) == 1 then redis.call('HSET', ARGV[8] .. t, 'period', ARGV[9]) end
  end
end
-- (the new period has holds: the next one's first reservation moves them on, budget_lib's roll)
redis.call('SADD', string.sub(KEYS[4], 1, #KEYS[4] - #ARGV[9] - #':spent') .. 'periods', ARGV[9])
return 1
]]
-- carry: {period = the new one, since = its start (nil: all), from = {the periods whose open holds
-- move to it}}; declared: the script's limit and period kind (budget_declare's), not the command line's
function R:budget_set(name, micro, per, now, carry, declared)
  local keys, args = { BUDGETS .. ":" .. name, BUDGETS }, { name, micro, per, fmt_time(now) }
  if carry then
    -- the new period's spend in the ledger so far, and how many rows that read (a settle that lands
    -- before the script runs is after them)
    local spent, n = 0, 0
    local ok, err = self:each_ledger_row(function(text)
      n = n + 1
      local e = json.decode(text)
      if e.budget == name and math.type(e.micro_usd) and not (carry.since and e.at < carry.since) then
        spent = spent + e.micro_usd
      end
    end)
    if not ok then return nil, err end
    local new = budget_keys(name, carry.period)
    keys[3], keys[4], keys[5], keys[6], keys[7], keys[8] = P .. "costs", new[1], new[2], new[3], new[4], new[6]
    for _, from in ipairs(carry.from or {}) do
      if from ~= carry.period then
        local old = budget_keys(name, from)
        for _, k in ipairs({ old[2], old[3], old[4], old[6] }) do keys[#keys + 1] = k end
      end
    end
    args[5], args[6], args[7] = ("%d"):format(spent), n, carry.since and fmt_time(carry.since) or ""
    args[8], args[9] = P .. "ticket:", carry.period
  end
  if declared then args[10] = "declared" end
  local ok, err = self:script("budget_set", keys, table.unpack(args, 1, declared and 10 or carry and 9 or 4))
  if ok == nil then return nil, err end
  return true
end

function R:budget_list()
  local names, err = self.conn:call("SMEMBERS", BUDGETS)
  if not names then return nil, err end
  table.sort(names)
  local out = {}
  for _, name in ipairs(names) do
    local c = budget_config_of(self.conn:call("HGETALL", BUDGETS .. ":" .. name)) or {}
    c.name = name
    out[#out + 1] = c
  end
  return out
end

function R:budget_release(ticket)
  local state, serr = self.conn:call("HMGET", P .. "ticket:" .. ticket, "budget", "period")
  if state == nil then return nil, serr end
  if not state[1] then return false end
  local n, err = self:script("budget_release", budget_keys(state[1], state[2], ticket), ticket, ticket_ttl(),
    state[2], budget_prefix(state[1]))
  if n == nil then return nil, err end
  return n == 1
end

-- the same at once, without the loop (resil_close): blocking commands
function R:budget_release_now(ticket)
  local state, serr = self.conn:call_now("HMGET", P .. "ticket:" .. ticket, "budget", "period")
  if state == nil then error(serr, 0) end
  if not state[1] then return false end
  local keys = budget_keys(state[1], state[2], ticket)
  local args = { "EVAL", scripts.budget_release, #keys, table.unpack(keys) }
  args[#args + 1], args[#args + 2], args[#args + 3], args[#args + 4] = ticket, ticket_ttl(), state[2],
    budget_prefix(state[1])
  local n, err = self.conn:call_now(table.unpack(args))
  if n == nil then error(err, 0) end
  return n == 1
end

-- the hold `ticket` (reserved in budget, period) renewed until expires_at: -> true | false (it
-- stopped counting) | nil, err
function R:budget_extend(budget, period, ticket, expires_at, now, me, lease_until)
  local n, err = self:script("budget_extend", budget_keys(budget, period, ticket), ticket, fmt_time(expires_at),
    fmt_time(now), me, lease_arg(lease_until, now), ticket_ttl(expires_at - now), period, budget_prefix(budget),
    lease_skew())
  if n == nil then return nil, err end
  return n == 1
end

-- the reservation `ticket` (of budget, period, held until expires_at) whose
-- outcome its caller did not see: -> true (released) | false (never made,
-- and now never will be) | nil, err
function R:budget_abandon(budget, period, ticket, expires_at, now)
  local n, err = self:script("budget_abandon", budget_keys(budget, period, ticket), ticket,
    ticket_ttl(expires_at - now), period, budget_prefix(budget))
  if n == nil then return nil, err end
  return n == 1
end

-- the same at once, without the loop (resil_close: a reservation whose task never resumed, its
-- answer in or its command still on its way: written as the connection closes, and refused then)
function R:budget_abandon_now(budget, period, ticket, expires_at, now)
  local keys = budget_keys(budget, period, ticket)
  local args = { "EVAL", scripts.budget_abandon, #keys, table.unpack(keys) }
  args[#args + 1], args[#args + 2] = ticket, ticket_ttl(expires_at - now)
  args[#args + 1], args[#args + 2] = period, budget_prefix(budget)
  local n, err = self.conn:call_now(table.unpack(args))
  if n == nil then error(err, 0) end
  return n == 1
end

-- ---------- shared limits ----------

-- max_wait: 0 (the default) admits only now; math.huge books however far ahead
-- give_back() (optional): called on the loop, outside any task, when the take granted (a token, or a
-- slot booked ahead) went to a caller canceled before it saw it
local function granted(give_back)
  return give_back and function(r) if type(r) == "table" and r[1] == 1 then give_back() end end
end

function R:gcra_take(key, interval, tolerance, n, now, max_wait, give_back)
  max_wait = max_wait or 0
  local r, err = run_script(self, granted(give_back), "gcra_take", { P .. "gcra:" .. key }, interval, tolerance, n,
    string.format("%.6f", now), max_wait == math.huge and -1 or max_wait, lease_skew())
  if r == nil then return nil, err end
  if r[1] ~= 1 then return false, tonumber(r[2]), tonumber(r[3]) end
  return true, tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
end

function R:gcra_take_all(items, now, max_wait, give_back)
  max_wait = max_wait or 0
  local keys, args = {}, { string.format("%.6f", now), max_wait == math.huge and -1 or max_wait }
  for i, it in ipairs(items) do
    keys[i] = P .. "gcra:" .. it[1]
    args[#args + 1], args[#args + 2], args[#args + 3] = it[2], it[3], it[4]
  end
  args[#args + 1] = lease_skew()
  local r, err = run_script(self, granted(give_back), "gcra_take_all", keys, table.unpack(args))
  if r == nil then return nil, err end
  local ok = r[1] == 1
  local first = ok and 3 or 4
  local tats = {}
  for i = 1, #items do tats[i] = tonumber(r[first + i - 1]) end
  if not ok then return false, tonumber(r[2]), r[3], tats end
  return true, tonumber(r[2]), tats
end

-- (a key's pause is under "gcra:pause:": a key is "bucket:NAME", so none has its name there)
function R:gcra_adjust(key, interval, tolerance, n, now)
  local r, err = self:script("gcra_adjust", { P .. "gcra:" .. key, P .. "gcra:pause:" .. key }, interval, tolerance, n,
    string.format("%.6f", now), lease_skew())
  if r == nil then return nil, err end
  return tonumber(r[1]), tonumber(r[2])
end

function R:gcra_raise(key, interval, tolerance, at_least, now, pause)
  local r, err = self:script("gcra_raise", { P .. "gcra:" .. key, P .. "gcra:pause:" .. key }, interval, tolerance,
    string.format("%.6f", at_least), string.format("%.6f", now), pause and string.format("%.6f", pause) or "",
    lease_skew())
  if r == nil then return nil, err end
  return tonumber(r[1]), tonumber(r[2])
end

function R:breaker_get(name, now)
  local v, err = self:script("breaker_get", { P .. "breaker:" .. name }, fmt_time(now), lease_skew())
  if v == nil then return nil, err end
  return v and tonumber(v) or nil
end

-- (one script: it was three commands, each waited for)
function R:breaker_open(name, open_until, now)
  local ok, err = self:script("breaker_open", { P .. "breaker:" .. name }, fmt_time(open_until),
    fmt_time(now or open_until), lease_skew())
  if ok == nil then return nil, err end
  return true
end

function R:breaker_reopen(name, open_for, backoff, open_for_max, now)
  local v, err = self:script("breaker_reopen", { P .. "breaker:" .. name }, open_for, backoff, open_for_max,
    fmt_time(now), lease_skew())
  if v == nil then return nil, err end
  return tonumber(v)
end

function R:breaker_probe(name, probe_for, now, id)
  local r, err = self:script("breaker_probe", { P .. "breaker:" .. name }, probe_for, string.format("%.6f", now),
    lease_skew(), id or "")
  if r == nil then return nil, err end
  if r[1] == 1 then return true, r[2] ~= "" and r[2] or nil end
  return false, tonumber(r[2])
end

-- a half-open probe given back unrun (its call canceled, its host closed): -> true | false
function R:breaker_unprobe(name, _, _, id)
  local n, err = self:script("breaker_unprobe", { P .. "breaker:" .. name }, id)
  if n == nil then return nil, err end
  return n == 1
end

-- the same at once, without the loop (resil_close): a probe whose command is still on its way
-- lands after it, and its slot ends at probe_for as before
function R:breaker_unprobe_now(name, _, _, id)
  local n, err = self.conn:call_now("EVAL", scripts.breaker_unprobe, 1, P .. "breaker:" .. name, id)
  if n == nil then error(err, 0) end
  return n == 1
end

function R:breaker_close(name)
  return ok_or(self.conn:call("DEL", P .. "breaker:" .. name))
end

function R:integrity_check() return "ok" end

-- backend:eviction_policy(done): done(maxmemory, policy) once the server says (maxmemory in bytes,
-- 0: none), nothing if it
-- cannot. Sent without a task waiting: a task still waiting for it at exit (a script that ends
-- at once) would hold its command for good.
function R:eviction_policy(done)
  self.conn:send(function(info)
    if type(info) ~= "string" then return end
    local max, policy = info:match("\nmaxmemory:(%d+)"), info:match("\nmaxmemory_policy:([%w%-]+)")
    if max and policy then done(tonumber(max), policy) end
  end, "INFO", "memory")
end

-- the open is resil.store's alone: what require returns here is a script's to have, and to change
-- (a method replaced there was handed the backend, and with it the connection)
private.open_redis = open
return true
