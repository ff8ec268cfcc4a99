-- A Redis store on a bad day, in real processes against a real redis-server: a server that refuses
-- the process (a password missing or wrong, a database it does not have). What a user sees: an
-- error naming the server and why, nothing left held, the process not kept alive by writes that
-- can never land.
local helpers = require "spec.helpers"

-- a redis-server of the test's own, started with `args` -> its port, a function that kills it
-- (SIGKILL) and starts it again, empty
local function own_server(finally, args)
  local dir, port = helpers.tmpname("-redis-own"), helpers.free_port()
  os.execute("mkdir -p " .. dir)
  local pid
  local function start()
    os.remove(dir .. "/redis.pid")
    os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize yes " ..
      "--pidfile %s/redis.pid %s > /dev/null"):format(port, dir, dir, args or ""))
    assert(helpers.wait_until(function() return helpers.slurp(dir .. "/redis.pid"):match("%d+") ~= nil end, 10))
    pid = helpers.slurp(dir .. "/redis.pid"):match("%d+")
    assert(helpers.wait_until(function() return helpers.run(("redis-cli -p %d ping"):format(port)).stdout ~= "" end,
      10))
  end
  start()
  finally(function()
    os.execute("kill -9 " .. pid)
    os.execute("rm -rf " .. dir)
  end)
  return port, function()
    os.execute("kill -9 " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    start()
  end
end

-- a reservation, a once claim and a ledger row against `url` (on the virtual clock: a minute of
-- retries is instant) -> {stdout=, stderr=, code=}
local function refused_by(url)
  return helpers.run_script([[
local resil = require "resil"
print("reserve", resil.budget("team", { limit = 10, per = "day" }):reserve(1))
local ran = false
print("once", resil.once("job-1", function() ran = true end))
print("ran", ran)
print("record", resil.cost.record({ provider = "p", model = "m", usd = 0.5 }))
]], ("--virtual-clock --store '%s' --log-level warn"):format(url))
end

describe("a Redis server that refuses the store", function()
  it("without its password (requirepass): each operation says NOAUTH, naming the server; a once claim it " ..
    "refused is not given up for a minute", function()
    local port = own_server(finally, "--requirepass only-secret")
    for _, url in ipairs({ ("redis://127.0.0.1:%d/0?timeout=1"):format(port),
                           ("redis://:not-it@127.0.0.1:%d/0?timeout=1"):format(port) }) do
      local r = refused_by(url)
      assert.are.equal(0, r.code, r.stderr)
      local server = ("redis 127.0.0.1:%d: NOAUTH Authentication required"):format(port)
      assert.matches("reserve\tnil\tstore_error: " .. server, r.stdout, 1, true)
      -- (before: "ERR Protocol error: unauthenticated multibulk length", a script's many arguments
      -- refused before any AUTH, and the server closed the connection: nothing said a password was missing)
      assert.matches("once\tnil\tstore_error: " .. server, r.stdout, 1, true)
      assert.matches("ran\tfalse\nrecord\tnil\tstore_%a+: redis 127.0.0.1:" .. port .. ": ", r.stdout)
      -- (before: the claim, refused unrun, was given up by a task for a minute, each try refused too,
      -- which held the process's end and then logged the key held while the process lives)
      assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
    end
  end)

  it("without its password: a budget with on_outage = \"allow\" fails closed, as for a URL that names no store",
    function()
    local port = own_server(finally, "--requirepass only-secret")
    local r = helpers.run_script([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day", on_outage = "allow" })
for _ = 1, 3 do print(b:reserve(1)) end
]], ("--virtual-clock --store 'redis://:not-it@127.0.0.1:%d/0?timeout=1' --log-level warn"):format(port))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: three unchecked tickets, and so every call for as long as the password was wrong, its
    -- budget never looked at: "allow" is for an outage that ends, not for a store that refuses)
    local refused = ("nil\tstore_error: redis 127.0.0.1:%d: NOAUTH Authentication required. (AUTH refused: " ..
      "WRONGPASS"):format(port)
    local n = 0
    for line in r.stdout:gmatch("[^\n]+") do
      assert.matches(refused, line, 1, true)
      n = n + 1
    end
    assert.are.equal(3, n)
    assert.is_not.matches("allowed unchecked", r.stderr, 1, true)
  end)

  it("as a user its ACL does not let run scripts or reach the store's keys: each operation says NOPERM, naming " ..
    "the server; a once claim it refused is not given up for a minute", function()
    local port = own_server(finally, "--user default on nopass '~*' '&*' '+@all' " ..
      "--user noscripts on '>pw' '~*' '&*' '+@all' '-@scripting' --user kvonly on '>pw' '~resil:kv:*' '+@all'")
    for _, user in ipairs({ "noscripts", "kvonly" }) do
      local r = refused_by(("redis://%s:pw@127.0.0.1:%d/0?timeout=1"):format(user, port))
      assert.are.equal(0, r.code, r.stderr)
      local refused = ("store_error: redis 127.0.0.1:%d: NOPERM [^\n]*%%(the store's user needs every command and " ..
        "key under resil:%%)\n"):format(port)
      assert.matches("reserve\tnil\t" .. refused .. "once\tnil\t" .. refused .. "ran\tfalse\n", r.stdout)
      -- (before: refused before it ran, the claim was given up by a task for a minute, each try refused)
      assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
    end
  end)

  it("whose database the URL names and the server does not have, or whose SELECT it refuses: a once claim " ..
    "held behind it is not given up for a minute", function()
    local port = own_server(finally, "--requirepass only-secret --databases 4")
    for _, url in ipairs({ ("redis://:only-secret@127.0.0.1:%d/20?timeout=1"):format(port),
                           ("redis://:not-it@127.0.0.1:%d/3?timeout=1"):format(port) }) do
      local r = refused_by(url)
      assert.are.equal(0, r.code, r.stderr)
      assert.matches(("once\tnil\tstore_unavailable: redis 127.0.0.1:%d: database %%d+: "):format(port), r.stdout)
      assert.matches("ran\tfalse\n", r.stdout, 1, true)
      -- (before: a claim held for the SELECT and failed with it said it was sent, and was given up as above)
      assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
    end
  end)
end)

describe("a Redis server past its maxmemory (noeviction)", function()
  it("refuses a reservation and a once claim as unavailable, and nothing is given back for a minute", function()
    local port = own_server(finally, "--maxmemory 2mb --maxmemory-policy noeviction")
    helpers.run(("redis-cli -p %d eval \"for i = 1, 100000 do if not pcall(redis.call, 'set', 'fill' .. i, " ..
      "string.rep('x', 1000)) then return i end end\" 0"):format(port))
    local r = refused_by(("redis://127.0.0.1:%d/0?timeout=1"):format(port))
    assert.are.equal(0, r.code, r.stderr)
    local oom = ("store_unavailable: redis 127.0.0.1:%d: OOM command not allowed"):format(port)
    assert.matches("reserve\tnil\t" .. oom, r.stdout, 1, true)
    assert.matches("once\tnil\t" .. oom, r.stdout, 1, true)
    -- (before: each, refused before it wrote anything, was given back by a task for a minute, each try
    -- refused too, then logged as a hold that "counts until its hold ends" and a key held)
    assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
  end)
end)

describe("a store URL naming a node of a Redis Cluster", function()
  it("is refused as a cluster, naming the node, and a once claim it refused is not given up for a minute", function()
    local a = own_server(finally, "--cluster-enabled yes --cluster-config-file nodes.conf")
    local b = own_server(finally, "--cluster-enabled yes --cluster-config-file nodes.conf")
    assert(helpers.run(("redis-cli -p %d cluster addslotsrange 0 8191"):format(a)).stdout:match("OK"))
    assert(helpers.run(("redis-cli -p %d cluster addslotsrange 8192 16383"):format(b)).stdout:match("OK"))
    assert(helpers.run(("redis-cli -p %d cluster meet 127.0.0.1 %d"):format(a, b)).stdout:match("OK"))
    assert(helpers.wait_until(function()
      return helpers.run(("redis-cli -p %d cluster info"):format(a)).stdout:match("cluster_state:ok")
    end, 20), "the cluster did not form")
    local r = refused_by(("redis://127.0.0.1:%d/0?timeout=1"):format(a))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "MOVED 10777 127.0.0.1:PORT" and "CROSSSLOT Keys in request don't hash to the same slot",
    -- while a plain key of the node's own slots was stored: nothing said the store cannot be a cluster)
    local cluster = ("store_error: redis 127.0.0.1:%d: [^\n]*%%(a Redis Cluster: the store needs one Redis " ..
      "server"):format(a)
    assert.matches("reserve\tnil\t" .. cluster, r.stdout)
    assert.matches("once\tnil\t" .. cluster, r.stdout)
    assert.matches("ran\tfalse\nrecord\tnil\t" .. cluster, r.stdout)
    assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
  end)
end)

describe("a Redis server that lost its data (restarted without persistence, flushed)", function()
  -- A budget of $1 a day, spent whole; then the server loses every key. What a user sees: the process
  -- that was running refuses to reserve (not a second dollar), logs why, and so do processes started
  -- after; an operator's `redis-cli SET resil:store ok` lets budgets reserve again.
  local function reserve(url, pre)
    return helpers.run_script(([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day", on_outage = "allow" })
%s
local t, err = b:reserve(0.5)
print("after", t and "ticket" or err)
]]):format(pre or ""), ("--virtual-clock --store '%s' --log-level warn"):format(url))
  end

  it("refuses reservations in the process that saw it and in those started after, until an operator acknowledges",
    function()
    local port = own_server(finally)
    local url = ("redis://127.0.0.1:%d/0?timeout=1"):format(port)
    local r = reserve(url, ([[
local t = assert(b:reserve(1))
assert(t:settle(1))
print("full", b:reserve(0.5))
os.execute("redis-cli -p %d flushall > /dev/null")
]]):format(port))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("full\tnil\tbudget_exceeded", r.stdout, 1, true)
    -- (before: "after  <ticket>": the dollar spent was gone, and the budget paid out again)
    assert.matches("after\tstore_unavailable: redis 127.0.0.1:" .. port .. ": the store lost its data",
      r.stdout, 1, true)
    assert.matches("redis: the store lost its data", r.stderr, 1, true)
    -- a process started after the loss
    r = reserve(url)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("after\tstore_unavailable: [^\n]*the store lost its data %(its marker resil:store is 'lost ", r.stdout)
    -- the operator restores the spend, or accepts its loss
    helpers.run(("redis-cli -p %d set resil:store ok"):format(port))
    r = reserve(url)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("after\tticket", r.stdout, 1, true)
  end)

  it("is seen by a process whose server restarted empty while it ran, though a process started first after the " ..
    "restart made the store anew", function()
    local port, restart = own_server(finally)
    local url = ("redis://127.0.0.1:%d/0?timeout=1"):format(port)
    local go = helpers.tmpname("-go")
    finally(function() os.remove(go) end)
    local pid, out = helpers.start(([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day" })
assert(assert(b:reserve(1)):settle(1))
print("started") io.stdout:flush()
while not io.open(%q) do os.execute("sleep 0.02") end
local answered = 0
for _ = 1, 500 do -- (the connection the restart closed, and the store down until its probe is answered)
  local t, err = b:reserve(0.5)
  if t or err.lost then
    print("after", t and "ticket" or err)
    answered = answered + 1
    if answered == 2 then break end
  else os.execute("sleep 0.01") end
end
]]):format(go), ("--virtual-clock --store '%s' --log-level warn"):format(url))
    finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("started") end, 30))
    restart()
    -- a process that starts on the empty server cannot know: it makes the store anew, and spends
    local r = reserve(url)
    assert.matches("after\tticket", r.stdout, 1, true)
    helpers.write(go, "")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    local text = helpers.slurp(out)
    -- (before: a second dollar reserved, "after  team:...": the restart took every cent spent)
    assert.matches("after\tstore_unavailable: [^\n]*the store lost its data %(its marker resil:store is 'n:", text)
    assert.matches("after\tstore_unavailable: [^\n]*the store lost its data %(its marker resil:store is 'lost ", text)
    assert.matches("redis: the store lost its data", text, 1, true)
    -- and the one that made it anew refuses now too
    r = reserve(url)
    assert.matches("after\tstore_unavailable: [^\n]*its marker resil:store is 'lost ", r.stdout)
  end)
end)

describe("a once claim running as its Redis server loses its data (flushed, restarted without persistence)", function()
  it("keeps fn's result: its caller gets it, and the key's next call replays it rather than run fn again",
    function()
    local port = own_server(finally)
    local r = helpers.run_script(([[
local resil = require "resil"
local ran = 0
print("once", resil.once("paid-job", function()
  ran = ran + 1
  os.execute("redis-cli -p %d flushall > /dev/null")
  return "paid"
end))
print("again", resil.once("paid-job", function() ran = ran + 1 return "again" end))
print("ran", ran)
]]):format(port), ("--virtual-clock --store 'redis://127.0.0.1:%d/0?timeout=1' --log-level warn"):format(port))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "once  nil  lease_lost: ... another process took the key over; ask again", there being no
    -- other, and the next call ran fn, paid for, a second time)
    assert.matches("once\tpaid\nagain\tpaid\nran\t1\n", r.stdout)
    assert.matches("the key's record was gone as fn ended", r.stderr, 1, true)
  end)
end)

describe("a run whose Redis server loses its data as a step runs (flushed, restarted without persistence)", function()
  it("goes on: the record of the run is made again, held by its process, and the run ends done, each step run once",
    function()
    local port = own_server(finally)
    local url = ("redis://127.0.0.1:%d/0?timeout=1"):format(port)
    local r = helpers.run_script(([[
local resil = require "resil"
local ran = 0
for i = 1, 5 do
  print(i, resil.step("s" .. i, function()
    ran = ran + 1
    if i == 3 then os.execute("redis-cli -p %d flushall > /dev/null") end
    return i * 10
  end))
end
print("ran", ran)
]]):format(port), ("--virtual-clock --store '%s' --run lost-run --log-level warn"):format(url))
    -- (before: exit 1, "run_held: run lost-run was ended by another process (nil) while this one ran it": no
    -- other process had it; step 3's record had made a run record of its own, with neither holder nor status, and a
    -- resume ran every step again, each paid again)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\t10\n2\t20\n3\t30\n4\t40\n5\t50\nran\t5\n", r.stdout)
    assert.matches("run: the run's record was gone from the store as a step ended (the store lost its data?): " ..
      "made again, held by this process", r.stderr, 1, true)
    local runs = helpers.run(("%s runs --store '%s'"):format(helpers.resil, url))
    -- (the steps from the loss on: those before it went with the data)
    assert.matches("lost%-run%s+done%s+3 ", runs.stdout)
  end)
end)

describe("a Redis store on a database other than 0 that lost its data", function()
  -- (found in review, helper R: the error said `redis-cli SET resil:store ok`, which an operator ran
  -- against localhost:6379's database 0: the budgets of the store's own database refused on)
  local function reserve(url, pre)
    return helpers.run_script(([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day" })
%s
local t, err = b:reserve(0.5)
print("after", t and "ticket" or err)
]]):format(pre or ""), ("--virtual-clock --store '%s' --log-level warn"):format(url))
  end

  it("names the command that acknowledges it on its own server and database; another database's flush is no loss",
    function()
    local port = own_server(finally)
    local url = ("redis://127.0.0.1:%d/3?timeout=1"):format(port)
    local r = reserve(url, ([[
assert(assert(b:reserve(1)):settle(1))
os.execute("redis-cli -p %d -n 0 flushdb > /dev/null") -- another database's: nothing of this store's
local t, err = b:reserve(0.5)
print("other", t and "ticket" or err)
os.execute("redis-cli -p %d -n 3 flushdb > /dev/null")
]]):format(port, port))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("other\tbudget_exceeded", r.stdout, 1, true)
    local command = r.stdout:match("%((redis%-cli [^)]*)%)")
    assert.is_truthy(command, r.stdout)
    assert.matches("the store lost its data", r.stdout, 1, true)
    -- the operator runs what it says, from anywhere (not sent to a default server: someone else's)
    assert.matches("-p " .. port .. " -n 3 ", command, 1, true)
    local cli = helpers.run(command)
    assert.matches("OK", cli.stdout, 1, true)
    r = reserve(url)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("after\tticket", r.stdout, 1, true)
  end)
end)

describe("a store URL whose port is not a Redis server's (an HTTP server's)", function()
  it("is refused as not Redis: a budget with on_outage = \"allow\" fails closed, and a once claim is not " ..
    "given up for a minute", function()
    local got = helpers.with_server("timeout 60 python3 -u -m http.server 0 --bind 127.0.0.1", "port (%d+)",
      function(port)
        return { refused_by(("redis://127.0.0.1:%d/0?timeout=1"):format(port)), helpers.run_script([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day", on_outage = "allow" })
for _ = 1, 2 do print(b:reserve(1)) end
]], ("--virtual-clock --store 'redis://:pw@127.0.0.1:%d/3?timeout=1' --log-level warn"):format(port)), port }
      end)
    assert.is_truthy(got)
    local r, allow, port = table.unpack(got)
    assert.are.equal(0, r.code, r.stderr)
    local refused = ("store_error: redis 127.0.0.1:%d: not a Redis server (Protocol error"):format(port)
    assert.matches("reserve\tnil\t" .. refused, r.stdout, 1, true)
    assert.matches("once\tnil\t" .. refused, r.stdout, 1, true)
    assert.matches("ran\tfalse\n", r.stdout, 1, true)
    -- (before: store_unavailable, sent: the claim given up by a task for a minute, each try refused,
    -- which held the process's end and then logged the key held while the process lives)
    assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
    -- (before: "<ticket>" twice, each unchecked: $2 paid out on a $1 budget, for as long as the URL was wrong)
    assert.are.equal(0, allow.code, allow.stderr)
    local n = 0
    for line in allow.stdout:gmatch("[^\n]+") do
      assert.matches("nil\t" .. refused, line, 1, true)
      n = n + 1
    end
    assert.are.equal(2, n)
    assert.is_not.matches("allowed unchecked", allow.stderr, 1, true)
  end)
end)

describe("a Redis server without scripts (EVAL and EVALSHA renamed away, as some managed Redis do)", function()
  it("refuses each operation naming the server and what the store needs; nothing is given back for a minute",
    function()
    local port = own_server(finally, "--rename-command EVAL '' --rename-command EVALSHA ''")
    local r = refused_by(("redis://127.0.0.1:%d/0?timeout=1"):format(port))
    assert.are.equal(0, r.code, r.stderr)
    local refused = ("store_error: redis 127.0.0.1:%d: ERR unknown command 'EVAL' (the store needs the server's " ..
      "scripts: EVAL, EVALSHA and SCRIPT)"):format(port)
    -- (before: "store_error: ERR unknown command 'EVAL', with args beginning with: 'if redis.replicate_commands
    -- ...": the script's first bytes, and not which server)
    assert.matches("reserve\tnil\t" .. refused .. "\n", r.stdout, 1, true)
    assert.matches("once\tnil\t" .. refused .. "\n", r.stdout, 1, true)
    assert.matches("ran\tfalse\n", r.stdout, 1, true)
    -- (before: each, refused unrun, was given back by a task for a minute, each try refused too, then
    -- logged as "a reservation ... counts until its hold ends" and "its key stays held")
    assert.is_not.matches("outcome was not seen", r.stderr, 1, true)
  end)
end)

-- a budget with on_outage = "allow" on `url`: two reservations -> the run
local function allow_run(url, opts)
  return helpers.run_script([[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day", on_outage = "allow" })
for _ = 1, 2 do print(b:reserve(1)) end
]], ("--virtual-clock --store '%s' --log-level warn %s"):format(url, opts or ""))
end

-- both reservations refused store_error with `refused` in its message, nothing let through unchecked
local function failed_closed(allow, refused)
  assert.are.equal(0, allow.code, allow.stderr)
  local n = 0
  for line in allow.stdout:gmatch("[^\n]+") do
    assert.matches("^nil\tstore_error: [^\n]*" .. refused, line)
    n = n + 1
  end
  assert.are.equal(2, n, allow.stdout)
  assert.is_not.matches("allowed unchecked", allow.stderr, 1, true)
end

describe("a store URL that is wrong, not down", function()
  -- (before: store_unavailable, an outage: a budget with on_outage = "allow" handed out "<ticket>" twice,
  -- $2 on a $1 budget, unchecked for as long as the URL was wrong)
  it("a host name the resolver says does not exist (NXDOMAIN) is store_error: on_outage = \"allow\" fails closed",
    function()
      if helpers.run("unshare -rmn true").code ~= 0 or helpers.run("command -v python3").code ~= 0 then
        return pending("unshare -rmn (or python3) cannot run here")
      end
      local dir = helpers.tmpname("-nxdomain")
      os.execute("mkdir -p " .. dir)
      finally(function() os.execute("rm -rf " .. dir) end)
      local resolv = helpers.write(dir .. "/resolv.conf", "nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
      local nx = helpers.write(dir .. "/nx.py", ([[
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 53))
open("%s/ready", "w").close()
u.settimeout(30)
while True:
    d, a = u.recvfrom(512)
    i = 12
    while d[i] != 0: i += d[i] + 1
    # the question again, answered NXDOMAIN (rcode 3), nothing else
    u.sendto(d[:2] + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + d[12:i + 5], a)
]]):format(dir))
      local path = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local b = resil.budget("team", { limit = 1, per = "day", on_outage = "allow" })
for _ = 1, 2 do print(b:reserve(1)) end
]])
      local r = helpers.run(("unshare -rmn sh -c 'ip link set lo up && mount --bind %s /etc/resolv.conf && " ..
        "{ python3 %s & } && while [ ! -e %s/ready ]; do sleep 0.05; done; %s --virtual-clock --log-level warn " ..
        "--store redis://no-such-redis.example:6379/0?timeout=1 %s; code=$?; kill $!; exit $code'")
        :format(resolv, nx, dir, helpers.resil, path))
      failed_closed(r, "cannot resolve the host name no%-such%-redis%.example")
    end)

  it("a replica (writes refused READONLY) this process never wrote to is store_error: on_outage = \"allow\" " ..
    "fails closed", function()
      local port = own_server(finally)
      local replica = own_server(finally)
      assert.are.equal(0, helpers.run(("redis-cli -p %d replicaof 127.0.0.1 %d"):format(replica, port)).code)
      failed_closed(allow_run(("redis://127.0.0.1:%d/0?timeout=1"):format(replica)), "READONLY")
    end)

  it("a replica stays store_error after reads it ran (a read is no write taken)", function()
    -- (before: the first script the replica ran, a read, counted as a write taken: the reservations
    -- after it were an outage again, and on_outage = "allow" let $2 through on a $1 budget)
    local port = own_server(finally)
    local replica = own_server(finally)
    assert.are.equal(0, helpers.run(("redis-cli -p %d replicaof 127.0.0.1 %d"):format(replica, port)).code)
    local r = helpers.run_script([[
local resil = require "resil"
assert(resil.store():get("anything") == nil)
local open = resil.breaker("upstream", { shared = true })
assert(open:allow())
local b = resil.budget("team", { limit = 1, per = "day", on_outage = "allow" })
for _ = 1, 2 do print(b:reserve(1)) end
]], ("--virtual-clock --store 'redis://127.0.0.1:%d/0?timeout=1' --log-level warn"):format(replica))
    failed_closed(r, "READONLY")
  end)
end)
