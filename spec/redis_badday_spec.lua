-- The Redis store on a bad day, as production has them: a run ending with many steps in flight,
-- hostile bytes through the store API, a server frozen, killed, restarted or refusing (BUSY,
-- LOADING, READONLY) in the middle of a write. A real redis-server started for this file.
local resil = require "resil"
local helpers = require "spec.helpers"

local redis

setup(function()
  resil.clock.real() -- other processes share these keys: store time must be real time
  redis = helpers.redis_server()
end)

teardown(function() redis.stop() end)

describe("a run on Redis that ends with many steps in flight", function()
  -- (before: each step cut short was two arguments of one command, which takes at most 64: past 28
  -- steps the end was never recorded, the run stayed "running (gone)", and the script's end said
  -- "recording the run's end: ... redis: at most 64 arguments")
  it("is recorded as ended, each step cut short named pending", function()
    local url = redis.url()
    local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 40 do resil.spawn(resil.step, "s" .. i, function() resil.sleep(30) end) end
resil.sleep(0.2)
error("the main chunk fails with 40 steps in flight")
]], "--store " .. url .. " --run many-in-flight --log-level off")
    assert.are.equal(1, r.code)
    assert.not_matches("recording the run's end", r.stderr)
    resil.store_config({ url = url })
    local backend = helpers.backend(resil.store())
    local run = assert(backend:run_get("many-in-flight"))
    assert.are.equal("failed", run.status)
    local pending = 0
    for _, step in ipairs(assert(backend:run_steps("many-in-flight"))) do
      if step.state == "pending" then pending = pending + 1 end
    end
    assert.are.equal(40, pending)
  end)
end)

-- the lines a process's log has of ledger writes whose answer never came as it ended (the store's)
local function unanswered_lines(stderr)
  local lines = {}
  for line in stderr:gmatch("[^\n]+") do
    if line:find("had no answer as the process ended", 1, true) then lines[#lines + 1] = resil.json.decode(line) end
  end
  return lines
end

-- A script that warms its store up (the scripts loaded, the connection up), reserves $1, runs the
-- shell command `trouble` on its Redis, then records three rows (ids prefix .. 1..3, $0.25 each)
-- and settles the reservation at $0.50, none waiting, and prints the ticket's id as it ends
local function ending_script(budget, trouble, provider, prefix)
  return ([[
local resil = require "resil"
local budget = resil.budget(%q, { limit = 10 })
local warm = assert(budget:reserve(1))
assert(warm:settle(0.01, { provider = "warm", wait = false }))
assert(resil.cost.record({ provider = "warm", usd = 0.01, id = "warm" }))
local ticket = assert(budget:reserve(1))
os.execute(%q)
for i = 1, 3 do assert(resil.cost.record({ provider = %q, usd = 0.25, id = %q .. i, wait = false })) end
assert(ticket:settle(0.5, { provider = %q, wait = false }))
print(ticket.id)
]]):format(budget, trouble, provider, prefix, provider)
end

describe("a process that ends while its Redis is frozen, rows and a settle sent and not answered", function()
  -- (before: one line said "look for their ids or tickets in the ledger" and how many there were, not which:
  -- a server lost meanwhile, a paused VM rebooted, left the operator nothing to look for)
  it("names each in one log line (its id, or its ticket); the thawed server writes each once", function()
    local url = redis.url(nil, "timeout=0.3")
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local r = helpers.run_script(ending_script("frozen-exit", "kill -STOP " .. redis.pid, "frozen", "exit-"),
      "--store '" .. url .. "'")
    os.execute("kill -CONT " .. redis.pid)
    assert.are.equal(0, r.code, r.stderr)
    local lines = unanswered_lines(r.stderr)
    assert.are.equal(1, #lines, r.stderr)
    assert.are.same({ "exit-1", "exit-2", "exit-3", r.stdout:match("[^\n]+") }, lines[1].ids)
    assert.are.equal(4, lines[1].unanswered)
    resil.store_config({ url = url })
    assert.is_true(helpers.wait_until(function()
      local by = resil.cost.breakdown("provider")
      return by ~= nil and #by == 2 and by[1].key == "frozen" and by[1].calls == 4
    end, 10))
    assert.are.equal(1.25, resil.cost.total({ provider = "frozen" }))
  end)
end)

-- the ledger writes a process's log names as not written, or perhaps not, as it ended: { id = true }
local function named_in_log(stderr)
  local named = {}
  for line in stderr:gmatch("[^\n]+") do
    local ok, row = pcall(resil.json.decode, line)
    if ok and type(row) == "table" and row.level == "error" then
      if row.id then named[row.id] = true end
      for _, id in ipairs(row.ids or {}) do named[id] = true end
    end
  end
  return named
end

describe("a process that ends as its Redis refuses writes (past its maxmemory)", function()
  -- (before: the refusals answered a closing connection, which told nobody: the rows and the settle
  -- were lost without a word, and the script exited 0)
  it("names each row and settle it refused as not written", function()
    local url = redis.url()
    local function maxmemory(v) os.execute(("redis-cli -p %d config set maxmemory %s > /dev/null"):format(redis.port, v)) end
    finally(function() maxmemory(0) end)
    local r = helpers.run_script(ending_script("refused-exit",
      ("redis-cli -p %d config set maxmemory 1 > /dev/null"):format(redis.port), "refused", "refused-"), "--store " .. url)
    maxmemory(0)
    assert.are.equal(0, r.code, r.stderr)
    local named = named_in_log(r.stderr)
    for _, id in ipairs({ "refused-1", "refused-2", "refused-3", r.stdout:match("[^\n]+") }) do
      assert.is_true(named[id], id .. " is not named: " .. r.stderr)
    end
    resil.store_config({ url = url })
    assert.are.equal(0, resil.cost.total({ provider = "refused" }))
  end)
end)

describe("resil.acquire_all on Redis with many shared buckets", function()
  -- (before: each bucket was four arguments of one script call, which took at most 64: past 15 shared
  -- buckets it raised "redis: at most 64 arguments", where SQLite took them)
  it("takes twenty at once, all or none, as on SQLite", function()
    resil.store_config({ url = redis.url() })
    local list = {}
    for i = 1, 20 do list[i] = { resil.bucket("many:" .. i, { rate = 1, per = 60, burst = 1, shared = true }), 1 } end
    assert.is_true((resil.acquire_all(list, { timeout = 0 })))
    assert.are.equal("rate_limited", select(2, resil.acquire_all(list, { timeout = 0 })).kind) -- (each is spent)
    local fresh = { { resil.bucket("many:fresh", { rate = 1, per = 60, burst = 1, shared = true }), 1 } }
    for i = 1, 20 do fresh[i + 1] = list[i] end
    assert.are.equal("rate_limited", select(2, resil.acquire_all(fresh, { timeout = 0 })).kind)
    assert.is_true((fresh[1][1]:try())) -- (none taken: the fresh one still has its token)
  end)
end)

-- Run `source` as a script in a mount namespace of its own whose /etc/hosts is `hosts` (a file the
-- script may rewrite: a name moved to another address, as a managed Redis's DNS name is at a failover)
-- -> its run, or nil when this machine cannot make one (unshare -rm)
local function run_with_hosts(source, hosts, opts)
  if helpers.run("unshare -rm true").code ~= 0 then return nil end
  local path = helpers.write(helpers.tmpname(".lua"), source)
  return helpers.run(("unshare -rm sh -c 'mount --bind %s /etc/hosts && exec %s %s %s'"):format(hosts, helpers.resil,
    opts, path))
end

describe("a failover behind a DNS name (the old primary a replica now, the name moved to the new one)", function()
  -- (before: the connection stayed with the old primary, and every write was refused READONLY for as
  -- long as it lived: a gateway's budgets and ledger refused until its restart)
  it("the writes refused READONLY reach the new primary once the connection is made anew", function()
    local other = helpers.run(("redis-server --port %d --bind 127.0.0.2 --save '' --appendonly no --daemonize yes " ..
      "--pidfile %s > /dev/null"):format(redis.port, helpers.tmpname(".pid")))
    assert.are.equal(0, other.code)
    finally(function()
      os.execute(("redis-cli -h 127.0.0.2 -p %d shutdown nosave > /dev/null 2>&1"):format(redis.port))
      os.execute(("redis-cli -p %d replicaof no one > /dev/null"):format(redis.port))
    end)
    assert(helpers.wait_until(function()
      return os.execute(("redis-cli -h 127.0.0.2 -p %d ping > /dev/null 2>&1"):format(redis.port)) == true
    end, 10))
    local hosts = helpers.write(helpers.tmpname(".hosts"), "127.0.0.1 redis-primary\n")
    local r = run_with_hosts(([[
local resil = require "resil"
resil.log.level("off")
assert(resil.store():set("before", "1"))
-- the failover: the old primary follows the new one, and the name moves to it
os.execute("redis-cli -h 127.0.0.1 -p %d replicaof 127.0.0.2 %d > /dev/null")
local f = assert(io.open("/etc/hosts", "w"))
f:write("127.0.0.2 redis-primary\n")
f:close()
for try = 1, 5 do
  local ok, err = resil.store():set("after", "1")
  if ok then print("written at try " .. try) os.exit(0) end
  print(err.kind, err.message)
  resil.sleep(0.1)
end
]]):format(redis.port, redis.port), hosts, ("--store redis://redis-primary:%d/0"):format(redis.port))
    if not r then return pending("unshare -rm cannot run here: no mount namespace for /etc/hosts") end
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("written at try [12]\n", r.stdout)
    assert.are.equal("1\n", helpers.run(("redis-cli -h 127.0.0.2 -p %d get resil:kv:after"):format(redis.port)).stdout)
  end)
end)

describe("hostile keys and values through the store API on Redis", function()
  before_each(function() resil.store_config({ url = redis.url() }) end)

  it("keeps NUL, CR LF, protocol text and a 100 KB key apart and whole", function()
    local s = resil.store()
    local keys = { "a\0b", "a\0c", "line\nnext", "\r\n*3\r\n$3\r\nSET\r\n", "", string.rep("k", 100000), "%s%n" }
    for i, k in ipairs(keys) do assert.is_true(s:set(k, k .. "\0value\r\n" .. i)) end
    for i, k in ipairs(keys) do assert.are.equal(k .. "\0value\r\n" .. i, s:get(k)) end
    assert.are.equal(2, select(2, pcall(s.incr, s, "n\0", 2)))
    assert.are.same({ true, "r\0\n" }, { true, (resil.once("once\0\n", function() return "r\0\n" end)) })
  end)

  -- (before: a TTL past some 292 million years in milliseconds went as "1e+19", and Redis refused it
  -- as "not an integer" (store_error) where SQLite kept the value; a hold as long failed its reservation)
  it("takes a TTL of any length SQLite takes: the key is kept", function()
    local s = resil.store()
    assert.is_true(s:set("long", "v", 1e16))
    assert.are.equal("v", s:get("long"))
    assert.are.equal(1, s:incr("long-n", 1, 1e300))
    assert.are.equal(2, s:incr("long-n", 1, 1e300))
    local ticket = assert(resil.budget("long-hold", { limit = 10, hold = 1e300 }):reserve(1))
    assert.is_true(ticket:settle(0.5, { provider = "long-hold" }))
  end)
end)

describe("a key of another type under the store's prefix (another program's, on the same database)", function()
  -- (before: a settle whose ledger key was another program's string failed WRONGTYPE after the
  -- hold was freed, the ticket marked settled and its id marked recorded: Redis keeps what a script
  -- wrote before its error. Once the key was put right, the settle again answered false and the row
  -- with that id answered true, and neither was in the ledger: $0.75 paid, $0 recorded)
  it("refuses a settle and a row without writing half of them: once the key is put right, each lands once",
    function()
    local url = redis.url()
    resil.store_config({ url = url })
    local db = url:match("/(%d+)$")
    local function cli(command)
      assert(os.execute(("redis-cli -p %d -n %s %s > /dev/null"):format(redis.port, db, command)))
    end
    local budget = resil.budget("wrongtype", { limit = 10, per = "day" })
    local ticket = assert(budget:reserve(1))
    cli("set resil:costs not-a-list")
    local ok, err = ticket:settle(0.5, { provider = "p", model = "m" })
    assert.is_nil(ok)
    assert.matches("WRONGTYPE", tostring(err), 1, true)
    ok, err = resil.cost.record({ provider = "p", model = "m", usd = 0.25, id = "resp-1" })
    assert.is_nil(ok)
    assert.matches("WRONGTYPE", tostring(err), 1, true)
    cli("del resil:costs")
    assert.is_true(ticket:settle(0.5, { provider = "p", model = "m" }))
    assert.is_true(resil.cost.record({ provider = "p", model = "m", usd = 0.25, id = "resp-1" }))
    assert.is_true(resil.cost.record({ provider = "p", model = "m", usd = 0.25, id = "resp-1" }))
    assert.are.equal(0.75, resil.cost.total())
    local state = budget:state()
    assert.are.same({ 0.5, 0 }, { state.spent, state.reserved })
  end)
end)

describe("a budget's amounts or holders key of another type (another program's, on the same database)", function()
  -- (before: the reservation's script grew the reserved total and added the hold, then failed
  -- WRONGTYPE at the amounts hash, and its expiry freed nothing: $1 of a $10 budget reserved by
  -- nobody for the rest of the period; at the holders hash, a hold its caller was told it did not
  -- get counted until its end)
  for _, kind in ipairs({ "amounts", "holders" }) do
    it(("refuses a reservation without holding half of it (%s): once the key is put right, nothing is "
      .. "reserved"):format(kind), function()
      local url = redis.url()
      resil.store_config({ url = url })
      local db = url:match("/(%d+)$")
      local budget = resil.budget("wrongtype-" .. kind, { limit = 10, per = "day" })
      assert(budget:reserve(0.1)):settle(0.1)
      local day = os.date("!%Y-%m-%d", math.floor(resil.clock.wall()))
      local key = ("resil:budget:wrongtype-%s:%s:%s"):format(kind, day, kind)
      local function cli(command)
        assert(os.execute(("redis-cli -p %d -n %s %s > /dev/null"):format(redis.port, db, command:format(key))))
      end
      cli("set %s another-program")
      local ticket, err = budget:reserve(1)
      assert.is_nil(ticket)
      assert.matches("WRONGTYPE", tostring(err), 1, true)
      cli("del %s")
      local state = budget:state()
      assert.are.same({ 0.1, 0, 0 }, { state.spent, state.reserved, #state.holds })
      assert(budget:reserve(9.9)):release() -- what the budget has left, all of it
    end)
  end
end)

describe("a process that ends as its Redis is restarted refusing writes (past its maxmemory)", function()
  -- (before: the rows sent again on a new connection and refused were said to have had no answer,
  -- "a frozen server runs them when it thaws": that server never would)
  it("says the rows it sent again and the server refused were not written, naming each", function()
    local own = helpers.redis_server()
    local rdir = helpers.tmpname("-redis-restarted")
    os.execute("mkdir -p " .. rdir)
    finally(function() -- (the first server, if the script did not kill it; the one it started; their folders go at exit)
      os.execute(("kill -9 %s $(cat %s/redis.pid 2>/dev/null) 2>/dev/null"):format(own.pid, rdir))
    end)
    local restart = ("kill -9 %s; while kill -0 %s 2>/dev/null; do sleep 0.01; done; " ..
      "redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
      "--pidfile %s/redis.pid --maxmemory 1 > /dev/null; " ..
      "until redis-cli -p %d ping > /dev/null 2>&1; do sleep 0.01; done"):format(own.pid, own.pid, own.port, rdir,
      rdir, own.port)
    local r = helpers.run_script(([[
local resil = require "resil"
assert(resil.cost.record({ provider = "before", usd = 0.01, id = "r0" })) -- (loads the script)
assert(resil.cost.record({ provider = "before", usd = 0.01, id = "r00", wait = false }))
assert(resil.cost.record({ provider = "before", usd = 0.01, id = "r000" })) -- (all answered)
os.execute(%q)
for i = 1, 3 do assert(resil.cost.record({ provider = "restarted", usd = 0.25, id = "rr-" .. i, wait = false })) end
]]):format(restart), "--store " .. own.url(0))
    assert.are.equal(0, r.code, r.stderr)
    local refused, unanswered = {}, {}
    for line in r.stderr:gmatch("[^\n]+") do
      local ok, row = pcall(resil.json.decode, line)
      if ok and type(row) == "table" and row.ids then
        for _, id in ipairs(row.ids) do
          if row.refused then refused[#refused + 1] = id else unanswered[#unanswered + 1] = id end
        end
      end
    end
    assert.are.same({ "rr-1", "rr-2", "rr-3" }, refused, r.stderr)
    assert.are.same({}, unanswered, r.stderr)
  end)
end)

-- Run `source` as a script with `opts` in a user, mount and network namespace of its own whose resolver
-- (/etc/resolv.conf) is a name server on 127.0.0.1 that never answers (a UDP and a TCP socket on port 53
-- that read nothing), as a resolver down or a network losing its packets is -> its run, or nil when this
-- machine cannot make one (unshare -rmn)
local function run_with_silent_resolver(source, opts)
  if helpers.run("unshare -rmn true").code ~= 0 or helpers.run("command -v python3").code ~= 0 then return nil end
  local dir = helpers.tmpname("-dns")
  os.execute("mkdir -p " .. dir)
  local resolv = helpers.write(dir .. "/resolv.conf", "nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
  local silent = helpers.write(dir .. "/silent.py", ([[
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 53))
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 53))
t.listen(16)
open("%s/ready", "w").close()
time.sleep(60)
]]):format(dir))
  local path = helpers.write(helpers.tmpname(".lua"), source)
  local r = helpers.run(("unshare -rmn sh -c 'ip link set lo up && mount --bind %s /etc/resolv.conf && " ..
    "{ python3 %s & } && while [ ! -e %s/ready ]; do sleep 0.05; done; %s %s %s; code=$?; kill $!; exit $code'")
    :format(resolv, silent, dir, helpers.resil, opts, path))
  os.execute("rm -rf " .. dir)
  return r
end

describe("a store whose host name the resolver does not answer for", function()
  -- (before: hiredis resolved the name with getaddrinfo on the loop, at every connect and every probe: one
  -- get took 4 s and every other task stood still for up to 8 s)
  it("fails store_unavailable within about its timeout, naming the host, and other tasks keep running", function()
    local r = run_with_silent_resolver([[
local resil = require "resil"
resil.log.level("off")
local longest, last, running = 0, resil.now(), true
resil.spawn(function()
  while running do
    resil.sleep(0.01)
    local now = resil.now()
    longest = math.max(longest, now - last)
    last = now
  end
end)
resil.sleep(0.05)
local t0 = resil.now()
local value, err = resil.store():get("k")
print(("took %.2f"):format(resil.now() - t0))
print(value, err and err.kind, err and err.message)
resil.sleep(1.5) -- (the store is down: its probes go on meanwhile)
assert(not resil.store():get("k"))
running = false
print(("longest gap %.2f"):format(longest))
]], ("--store 'redis://redis.test:%d/0?timeout=1'"):format(redis.port))
    if not r then return pending("unshare -rmn (or python3) cannot run here: no namespace for a silent resolver") end
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("nil\tstore_unavailable\t[^\n]*redis%.test", r.stdout)
    assert.is_true(tonumber(r.stdout:match("took ([%d.]+)")) < 3, r.stdout)
    assert.is_true(tonumber(r.stdout:match("longest gap ([%d.]+)")) < 1.5, r.stdout)
  end)
end)

describe("a command sent on a connection that a READONLY answer then dropped", function()
  -- (before: its deadline freed the store's current connection, none or a new healthy one, not the one the
  -- command was on: an XREAD BLOCK 20000 behind a refused write waited its 20 s, a BLOCK 0 for ever)
  it("still fails at the store's timeout", function()
    local replica = helpers.redis_server()
    finally(function() replica.stop() end)
    assert.are.equal(0, helpers.run(("redis-cli -p %d replicaof 127.0.0.1 1"):format(replica.port)).code)
    local r = helpers.run_script(([[
local resil = require "resil"
resil.log.level("off")
local c = resil.redis.connect({ port = %d, timeout = 1 })
assert(c:call("PING"))
local told
assert(c:send(function(_, err) told = err end, "SET", "k", "v"))
local reply, err = c:call("XREAD", "BLOCK", "20000", "STREAMS", "s", "$")
print(reply, err and err.kind, err and err.message)
print("write", told and told.kind, told and told.message)
]]):format(replica.port))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^nil\tstore_unavailable\t[^\n]*no reply within 1 s\n", r.stdout)
    assert.matches("write\tstore_unavailable\t[^\n]*READONLY", r.stdout)
  end)
end)

describe("a store with a user whose server took only AUTH password, then moves to ACL users", function()
  -- (before: the form AUTH password was kept for the connection's life: after the move every command was
  -- refused NOAUTH until a restart; the fallback to the default user said nothing)
  it("is served again as the user, and the fallback is said once", function()
    local server = helpers.redis_server()
    finally(function() server.stop() end)
    local cli = ("redis-cli -p %d "):format(server.port)
    assert.are.equal(0, helpers.run(cli .. "config set requirepass pw").code)
    local r = helpers.run_script(([[
local resil = require "resil"
local c = resil.redis.connect({ port = %d, username = "alice", password = "pw", timeout = 2, down = 0 })
assert(c:call("SET", "k", "before"))
assert(c:call("PING"))
-- the move: alice is a user, the default user is off; the connection made anew
os.execute(%q)
for try = 1, 5 do
  local reply, err = c:call("GET", "k")
  if reply then print("served at try " .. try, reply) os.exit(0) end
  print(err.kind, err.message)
  resil.sleep(1.1)
end
]]):format(server.port, ("%s -a pw --no-auth-warning acl setuser alice on '>pw' '~*' '+@all' > /dev/null && " ..
      "%s -a pw --no-auth-warning acl setuser default off > /dev/null && " ..
      "%s --user alice --pass pw --no-auth-warning client kill type normal > /dev/null"):format(cli, cli, cli)))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("served at try %d\tbefore\n", r.stdout)
    local warned = 0
    for _ in r.stderr:gmatch("AUTH[^\n]*without the user") do warned = warned + 1 end
    assert.are.equal(1, warned, r.stderr)
  end)
end)

describe("a store at a short numeric address (127.1)", function()
  -- (before: inet_pton refused it, and it was sent to DNS as a name: not resolved, the store unavailable;
  -- getaddrinfo, and so hiredis before the resolver, took it as 127.0.0.1)
  it("connects to it as an address", function()
    local r = helpers.run_script(([[
local resil = require "resil"
resil.log.level("off")
local c = resil.redis.connect({ host = "127.1", port = %d, timeout = 1 })
print(c:call("PING"))
]]):format(redis.port))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("PONG\n", r.stdout)
  end)
end)

describe("a store URL naming an IPv6 address, bracketed as in any URL (redis://[::1]:6379/0)", function()
  -- (before: "redis: cannot read URL redis://[::1]:...", a URL every other client takes; the host
  -- resolved names to IPv6 addresses, but no address could be given)
  it("is the server at that address", function()
    local r = helpers.run(("redis-cli -p %d config set bind '127.0.0.1 ::1'"):format(redis.port))
    if not r.stdout:match("OK") then return pending("no IPv6 loopback here: " .. r.stdout .. r.stderr) end
    finally(function() os.execute(("redis-cli -p %d config set bind 127.0.0.1 > /dev/null"):format(redis.port)) end)
    local url = redis.url()
    r = helpers.run_script([[
local resil = require "resil"
local s = assert(resil.store())
print(s:set("v6", "here"))
]], ("--store '%s' --log-level off"):format(url:gsub("127%.0%.0%.1", "[::1]")))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\n", r.stdout)
    resil.store_config({ url = url })
    assert.are.equal("here", resil.store():get("v6"))
  end)
end)

describe("a command sent on a connection a READONLY answer dropped, while the name is being resolved anew", function()
  -- (before: its deadline took the resolving branch: it canceled the new connection's resolve and failed the
  -- commands held for it, none late, and the command itself waited its XREAD's 20 s)
  it("fails at the store's timeout, on its own connection", function()
    if helpers.run("unshare -rmn true").code ~= 0 or helpers.run("command -v python3").code ~= 0 then
      return pending("unshare -rmn (or python3) cannot run here")
    end
    local dir = helpers.tmpname("-dns")
    os.execute("mkdir -p " .. dir)
    local resolv = helpers.write(dir .. "/resolv.conf", "nameserver 127.0.0.1\noptions timeout:5 attempts:1\n")
    local hosts = helpers.write(dir .. "/hosts", "127.0.0.1 redis-x\n")
    local silent = helpers.write(dir .. "/silent.py", ([[
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 53))
open("%s/ready", "w").close()
time.sleep(60)
]]):format(dir))
    local path = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
resil.log.level("off")
local dir = %q
os.execute("redis-server --port 6390 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile " ..
  dir .. "/redis.pid --dir " .. dir .. " > /dev/null")
for _ = 1, 100 do
  if os.execute("redis-cli -p 6390 ping > /dev/null 2>&1") then break end
  resil.sleep(0.05)
end
os.execute("redis-cli -p 6390 replicaof 127.0.0.1 1 > /dev/null")
local c = resil.redis.connect({ host = "redis-x", port = 6390, timeout = 1 })
assert(c:call("PING"))
local f = assert(io.open("/etc/hosts", "w")) -- (the next resolve asks the resolver, which never answers)
f:write("\n")
f:close()
assert(c:send(function() end, "SET", "k", "v"))
resil.spawn(function()
  resil.sleep(0.3) -- (the READONLY answer has dropped the connection: this one resolves the name anew)
  c:call("PING")
end)
local reply, err = c:call("XREAD", "BLOCK", "20000", "STREAMS", "s", "$")
print(reply, err and err.kind, err and err.message)
]]):format(dir))
    local r = helpers.run(("unshare -rmn sh -c 'ip link set lo up && mount --bind %s /etc/resolv.conf && " ..
      "mount --bind %s /etc/hosts && { python3 %s & } && while [ ! -e %s/ready ]; do sleep 0.05; done; " ..
      "%s %s; code=$?; kill $!; kill $(cat %s/redis.pid); exit $code'")
      :format(resolv, hosts, silent, dir, helpers.resil, path, dir))
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^nil\tstore_unavailable\t[^\n]*no reply within 1 s\n", r.stdout)
  end)
end)

describe("a command in flight when its connection is closed (conn:close)", function()
  -- (before: the close left the connection to end after its replies, and the command's deadline freed the
  -- store's current connection, none: an XREAD BLOCK 20000 waited its 20 s)
  it("still fails at the store's timeout", function()
    local r = helpers.run_script(([[
local resil = require "resil"
resil.log.level("off")
local c = resil.redis.connect({ port = %d, timeout = 1 })
assert(c:call("PING"))
resil.spawn(function()
  resil.sleep(0.3)
  c:close()
end)
local reply, err = c:call("XREAD", "BLOCK", "20000", "STREAMS", "s", "$")
print(reply, err and err.kind, err and err.message)
]]):format(redis.port))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^nil\tstore_unavailable\t[^\n]*no reply within 1 s\n", r.stdout)
  end)
end)

describe("a connection closed (conn:close) while it was still being made", function()
  -- (before: its connect, completed after, set the store connected, with no connection of its own)
  it("leaves the store not connected until its next command makes one", function()
    local r = helpers.run_script(([[
local resil = require "resil"
resil.log.level("off")
local c = resil.redis.connect({ port = %d, timeout = 1 })
local answered = false
assert(c:send(function() answered = true end, "PING"))
c:close()
resil.sleep(0.2)
print(answered, c:connected())
assert(c:call("PING"))
print(c:connected())
]]):format(redis.port))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\tfalse\ntrue\n", r.stdout)
  end)
end)

describe("a connection closed (conn:close) before the server answered its AUTH and SELECT", function()
  -- (before: the closed connection's late answers were taken for the next connection's: its held
  -- commands were sent on the closed one and failed with an empty message, and the next connection
  -- was never selected: the command after ran in database 0, another app's keys)
  it("leaves the next connection its own setup: its commands run in the store's database", function()
    local server = helpers.redis_server()
    finally(function() server.stop() end)
    local cli = ("redis-cli -p %d "):format(server.port)
    assert.are.equal(0, helpers.run(cli .. "acl setuser alice on '>pw' '~*' '+@all'").code)
    assert.are.equal(0, helpers.run(cli .. "config set requirepass pw").code)
    for _, auth in ipairs({ 'username = "alice", password = "pw", ', 'password = "pw", ' }) do
      local r = helpers.run_script(([[
local resil = require "resil"
resil.log.level("off")
local c = resil.redis.connect({ port = %d, %sdb = 2, timeout = 2 })
local first
assert(c:send(function(reply, err) first = reply or err.message end, "SET", "k1", "v1"))
c:close() -- (its AUTH and SELECT are on their way)
print("second", c:call("SET", "k2", "v2"))
print("first", first)
print("third", c:call("SET", "k3", "v3"))
]]):format(server.port, auth))
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("^second\tOK\nfirst\t[^\n]*closed before the server answered its AUTH or SELECT\nthird\tOK\n$",
        r.stdout)
      local keys = cli .. "-a pw --no-auth-warning -n %d --raw keys 'k*' | sort | tr '\\n' ' '"
      assert.are.equal("k2 k3 ", helpers.run(keys:format(2)).stdout)
      assert.are.equal("0\n", helpers.run(cli .. "-a pw --no-auth-warning -n 0 dbsize").stdout)
      assert.are.equal(0, helpers.run(cli .. "-a pw --no-auth-warning flushall").code)
    end
  end)
end)

describe("resil.run.finish called from a task while its Redis is frozen", function()
  -- (before: the script died at `resil.run.finish`, "store_unavailable: redis ...: Resource temporarily
  -- unavailable" with a traceback into the host's store code, and every other task stood still while
  -- it waited: the end was one blocking command on the loop)
  it("returns nil, err at the store's timeout while the other tasks run on; the run resumes later", function()
    local url = redis.url(nil, "timeout=0.5")
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local r = helpers.run_script(([[
local resil = require "resil"
resil.step("a", function() return 1 end)
local ticks, gap, last = 0, 0, resil.now()
local ticker = resil.spawn(function()
  while true do resil.sleep(0.02); gap = math.max(gap, resil.now() - last); last = resil.now(); ticks = ticks + 1 end
end)
resil.sleep(0.1)
os.execute("kill -STOP %s")
local before = ticks
local ok, err = resil.run.finish("done")
os.execute("kill -CONT %s")
print(ok, err and err.kind, ticks - before > 10, gap < 0.3)
ticker:cancel()
]]):format(redis.pid, redis.pid), ("--store '%s' --run frozen-finish --log-level off"):format(url))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("nil\tstore_unavailable\ttrue\ttrue\n", r.stdout)
  end)
end)
