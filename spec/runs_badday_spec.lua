-- Checkpointed runs (resil.step) as production treats them: scripts that
-- nest steps, re-runs of finished and interrupted runs. Real processes, on
-- SQLite and on a real redis-server.
local helpers = require "spec.helpers"

-- A step that calls steps itself (a helper that checkpoints, resil.run.now
-- in a step); each fn run is logged. KILL=n: the process dies (SIGKILL)
-- inside the outer step after n inner steps are checkpointed.
local NESTED = [[
local resil = require "resil"
local log = assert(io.open(arg[1], "a"))
local kill = tonumber(os.getenv("KILL") or "")
local function ran(what) log:write(what, "\n"); log:flush() end
local a = resil.step("outer", function()
  ran("outer")
  local t = resil.run.now()
  local x = resil.step("inner 1", function() ran("inner 1"); return 10 end)
  if kill == 1 then os.execute("kill -KILL " .. io.open("/proc/self/stat"):read("l"):match("^%d+")) end
  local y = resil.step("inner 2", function() ran("inner 2"); return 20 end)
  return x + y + (t > 0 and 0 or 1)
end)
local b = resil.step("after", function() ran("after"); return a + 1 end)
print(a, b)
]]

-- A step that maps over items with steps of their own, then a map of the same shape after it.
local MAP_IN_STEP = [[
local resil = require "resil"
local log = assert(io.open(arg[1], "a"))
local function render(x)
  return resil.step("render", function() log:write("render ", x, "\n"); log:flush(); return "video-" .. x end)
end
local first = resil.step("batch", function() return resil.map({ "a", "b" }, render) end)
local second = resil.map({ "c", "d" }, render)
print(first[1], first[2], second[1], second[2])
]]

for _, b in ipairs(helpers.store_backends()) do
  describe("steps on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)

    local function run(url, log, env)
      return helpers.run(("%s %s --store '%s' --run nested --log-level off %s %s"):format(env or "", helpers.resil, url,
        helpers.write(helpers.tmpname(".lua"), NESTED), log))
    end

    it("a run whose steps call steps is run again without a divergence, every step replayed", function()
      local url, log = b.url(), helpers.tmpname(".log")
      local r = run(url, log)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("30\t31\n", r.stdout)
      r = run(url, log)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("30\t31\n", r.stdout)
      assert.are.equal("outer\ninner 1\ninner 2\nafter\n", helpers.slurp(log))
    end)

    it("killed inside the outer step: the resumed run replays the inner steps done and runs the rest once",
      function()
      local url, log = b.url(), helpers.tmpname(".log")
      local r = run(url, log, "KILL=1")
      assert.are_not.equal(0, r.code)
      r = run(url, log)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("30\t31\n", r.stdout)
      r = run(url, log)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("outer\ninner 1\nouter\ninner 2\nafter\n", helpers.slurp(log))
    end)

    it("a step that maps over steps: run again, the map after it gets its own items' results", function()
      local url, log = b.url(), helpers.tmpname(".log")
      local script = helpers.write(helpers.tmpname(".lua"), MAP_IN_STEP)
      for _ = 1, 2 do
        local r = helpers.run(("%s --store '%s' --run mapped --log-level off %s %s"):format(helpers.resil, url, script,
          log))
        assert.are.equal(0, r.code, r.stderr)
        assert.are.equal("video-a\tvideo-b\tvideo-c\tvideo-d\n", r.stdout)
      end
      local ran = {}
      for line in io.lines(log) do ran[#ran + 1] = line end
      table.sort(ran)
      assert.are.same({ "render a", "render b", "render c", "render d" }, ran)
    end)

    it("a step inside resil.once: resumed with the once replayed, the steps after it keep their places", function()
      local url, log = b.url(), helpers.tmpname(".log")
      local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local log = assert(io.open(arg[1], "a"))
local function ran(what) log:write(what, "\n"); log:flush() end
local a = resil.step("fetch", function() ran("fetch"); return 1 end)
local b = resil.once("upload/" .. resil.run.id(), function()
  return resil.step("upload", function() ran("upload"); return 2 end) + resil.step("notify", function() return 0 end)
end)
local c, err = resil.step("render", function()
  ran("render")
  if arg[2] == "fail" then return nil, "renderer down" end
  return 3
end)
print(a, b, c, err)
]])
      local run = "in-once-" .. tostring(math.random(1e9))
      local cmd = ("%s --store '%s' --run %s --log-level off %s %s "):format(helpers.resil, url, run, script, log)
      local r = helpers.run(cmd .. "fail")
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("1\t2\tnil\trenderer down\n", r.stdout)
      -- (before: "divergence: run ... diverged at step 2: recorded 'upload', now 'render'", for good: the
      -- once replayed, its steps did not run, and render took upload's place)
      r = helpers.run(cmd)
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("1\t2\t3\tnil\n", r.stdout)
      assert.are.equal("fetch\nupload\nrender\nrender\n", helpers.slurp(log))
    end)

    it("a step returning more results than a replay takes is refused at its line; a replay never gets garbage",
      function()
      local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local t = {}
for i = 1, 300 do t[i] = i end
print(pcall(function() return select("#", resil.step("many", function() return table.unpack(t) end)) end))
print(select("#", resil.step("some", function() return table.unpack(t, 1, 250) end)))
]])
      local url = b.url()
      for _ = 1, 2 do
        local r = helpers.run(("%s --store '%s' --run many --log-level off %s"):format(helpers.resil, url, script))
        assert.are.equal(0, r.code, r.stderr)
        assert.matches("^false\t%S+%.lua:4: resil.step: cannot checkpoint the results: more than 250 of them\n250\n$",
          r.stdout)
      end
    end)
  end)
end

-- Steps whose fn pays (each run of one is logged, as a provider bills it); BREAK (a shell
-- command) runs inside the step named BREAK_AT, after it paid and before its result is stored:
-- it fills the store's disk, or stops or kills its redis-server. That step's answer is then
-- larger than the WAL's own room: a SQLite WAL kept short on a small disk is written again from
-- its top, and a full disk still takes a result that fits in the room it already has.
local PAYING = [[
local resil = require "resil"
local log = arg[1]
local function paid(what) local f = assert(io.open(log, "a")); f:write(what, "\n"); f:close() end
local function call(what, answer)
  paid(what)
  if what == os.getenv("BREAK_AT") then
    os.execute(os.getenv("BREAK"))
    answer = answer .. (" "):rep(600000)
  end
  return answer
end
for i = 1, 3 do
  resil.step("call " .. i, function() return call("call " .. i, "answer " .. i .. (" "):rep(8000)) end)
end
resil.map({ "a", "b", "c" }, function(x)
  return resil.step("render", function() return call("render " .. x, "video-" .. x .. (" "):rep(8000)) end)
end, { concurrency = 1 })
print("finished")
]]

-- A SQLite store on a filesystem of its own, 1 MB (a tmpfs; root only) -> path, the
-- command that fills it up, and the one that frees it again
local function small_disk(finally)
  local dir = helpers.tmpname("-disk")
  os.execute("mkdir -p " .. dir)
  assert(os.execute("mount -t tmpfs -o size=1m tmpfs " .. dir), "cannot mount a tmpfs")
  finally(function() os.execute("umount " .. dir) end)
  return dir .. "/state.db", ("dd if=/dev/zero of=%s/filler bs=4k count=1000 2>/dev/null"):format(dir),
    ("rm -f %s/filler"):format(dir)
end

local function paying(url, log, break_at, break_cmd)
  local env = break_at and ("BREAK_AT='%s' BREAK='%s' "):format(break_at, break_cmd) or ""
  return helpers.run(("%s%s --store '%s' --run paying --log-level error %s %s"):format(env, helpers.resil, url,
    helpers.write(helpers.tmpname(".lua"), PAYING), log))
end

-- What the first process paid for, and what a resumed one did
local function lines(path)
  local t = {}
  for line in io.lines(path) do t[#t + 1] = line end
  return t
end

describe("a step whose result the store cannot take as its fn ends", function()
  local is_root = helpers.run("id -u").stdout == "0\n"

  local function stops_there(r, log, step, store_error)
    assert.are.equal(1, r.code, r.stderr)                 -- (before: 0, every later step paid and lost too)
    assert.is_not.matches("finished", r.stdout)
    assert.matches("resil%-lua: store_unavailable: run paying: " .. step .. " %(%S+%.lua:%d+%) ran, but its "
      .. "result could not be checkpointed: store_unavailable: " .. store_error .. "; the run stops here", r.stderr)
    -- what it paid for is in the log, whole (the record as the store keeps it)
    assert.matches('"msg":"a step ran but its result was not checkpointed[^\n]*"record":"[^\n]*' ..
      step:match("'(.-)'"):gsub("call ", "answer "):gsub("render", "video%%-"), r.stderr)
    return lines(log)
  end

  it("on SQLite, its disk full: the run stops at that step, status 1; no later step runs; resumed, it completes",
    function()
      if not is_root then return pending("mounting a small filesystem needs root") end
      local db, fill, free = small_disk(finally)
      local log = helpers.tmpname(".log")
      local r = paying(db, log, "call 2", fill)
      assert.are.same({ "call 1", "call 2" },
        stops_there(r, log, "step 2 'call 2'", "store %S+: commit failed: database or disk is full"))
      os.execute(free)
      r = paying(db, log)
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("finished", r.stdout)
      assert.are.same({ "call 1", "call 2", "call 2", "call 3", "render a", "render b", "render c" }, lines(log))
    end)

  it("on SQLite, its disk full in a resil.map item: the map and the script stop; no later item runs", function()
    if not is_root then return pending("mounting a small filesystem needs root") end
    local db, fill = small_disk(finally)
    local log = helpers.tmpname(".log")
    local r = paying(db, log, "render b", fill)
    assert.are.same({ "call 1", "call 2", "call 3", "render a", "render b" },
      stops_there(r, log, "step 1 of item 2 'render'", "store %S+: commit failed: database or disk is full"))
  end)

  it("on Redis, its server stopped (SIGSTOP) or killed: the run stops at that step, status 1", function()
    for _, signal in ipairs({ "STOP", "KILL" }) do
      local redis = helpers.redis_server()
      finally(redis.stop)
      local log = helpers.tmpname(".log")
      local r = paying(redis.url(1, "timeout=0.5"), log, "call 2", "kill -" .. signal .. " " .. redis.pid)
      assert.are.same({ "call 1", "call 2" }, stops_there(r, log, "step 2 'call 2'", "[^;]+"))
    end
  end)
end)

-- resil.map items as scripts build them: records with a back-reference to their parent (a
-- tree read from a file), and a key function that fails on an item it does not expect
local ITEMS_AS_BUILT = [[
local resil = require "resil"
local log = arg[1]
local batch = { items = {} }
for i = 1, 8 do batch.items[i] = { name = "n" .. i, batch = batch } end
if os.getenv("DEEP") then -- each item a list 100,000 links long
  for i = 1, 8 do
    local node = batch.items[i]
    for j = 1, 100000 do node.next = { j }; node = node.next end
  end
end
local key = os.getenv("KEY") and function(item) return assert(item.id, "the item has no id") end or nil
local out, failures = resil.map(batch.items, function(item)
  return resil.step("render", function()
    local f = assert(io.open(log, "a")); f:write("paid ", item.name, "\n"); f:close()
    return "video of " .. item.name
  end)
end, { concurrency = 2, key = key })
print(out[1], out[8], failures and failures[1])
]]

describe("resil.map items in a run", function()
  local function items(log, env)
    return helpers.run(("%s timeout 20 %s --store '%s' --log-level off --run built %s %s"):format(env or "",
      helpers.resil, helpers.tmpname(".db"), helpers.write(helpers.tmpname(".lua"), ITEMS_AS_BUILT), log))
  end

  it("that refer back to their parent are checkpointed and named (the fingerprint walks no cycle)", function()
    local log = helpers.tmpname(".log")
    local r = items(log)
    -- (before: the first item's record walked batch -> items -> batch... to a depth of 32, a path per item
    -- each time round: it never ended, the first items paid and their results never recorded)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("video of n1\tvideo of n8\tnil\n", r.stdout)
  end)

  it("that are lists deeper than the fingerprint reads are checkpointed", function()
    local r = items(helpers.tmpname(".log"), "DEEP=1")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("video of n1\tvideo of n8\tnil\n", r.stdout)
  end)

  it("whose key raises fail before their step's fn runs: nothing is paid for a result that is lost", function()
    local log = helpers.tmpname(".log")
    local r = items(log, "KEY=1")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^nil\tnil\t%S+: the item has no id\n$", r.stdout)
    assert.are.equal("", helpers.slurp(log) or "") -- (before: each item paid, then its result was lost)
  end)
end)

-- resil.map items of which the second shares its parts, a DAG 40 deep (x = { a = x, b = x } at each
-- level), the note at its 20th level from the command line; each item's step logs what it paid
local ITEMS_SHARING = [[
local resil = require "resil"
local log, leaf = arg[1], arg[2]
local dag = {}
for i = 1, 40 do dag = { a = dag, b = dag, level = i, note = i == 20 and leaf or nil } end
dag.name = "dag"
local out = resil.map({ { name = "first" }, dag, { name = "last" } }, function(item)
  return resil.step("render", function()
    local f = assert(io.open(log, "a")); f:write("paid ", item.name, "\n"); f:close()
    return "video of " .. item.name
  end)
end, { concurrency = 1 })
print(out[1], out[2], out[3])
]]

describe("resil.map items that share their parts (a DAG 40 deep)", function()
  it("are checkpointed, replayed in a process of their own, and told apart by a note 20 levels down", function()
    local db, log = helpers.tmpname(".db"), helpers.tmpname(".log")
    local script = helpers.write(helpers.tmpname(".lua"), ITEMS_SHARING)
    local function items(leaf)
      -- (before: the item's fingerprint walked each part once per path to it, 2^40 walks: the worker
      -- never got past it; --max-instructions stops the process that still walks them)
      return helpers.run(("timeout -s KILL 60 %s --max-instructions 10000000 --store '%s' --log-level off "
        .. "--run shared %s %s '%s'"):format(helpers.resil, db, script, log, leaf))
    end
    local r = items("leaf")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("video of first\tvideo of dag\tvideo of last\n", r.stdout)
    r = items("leaf") -- every step replayed: the item's fingerprint is the same in another process
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("video of first\tvideo of dag\tvideo of last\n", r.stdout)
    assert.are.equal("paid first\npaid dag\npaid last\n", helpers.slurp(log))
    r = items("other leaf")
    assert.are.equal(1, r.code, r.stdout)
    assert.matches("divergence: run shared diverged at item 2:", r.stderr, 1, true)
  end)
end)

-- Items paid for three at a time (each fn run logged) from the command line's list; KILL=x: the
-- process dies (SIGKILL) as item x's step starts
local ITEMS_CONCURRENT = [[
local resil = require "resil"
local log, list = arg[1], arg[2]
local items = {}
for x in list:gmatch("[^,]+") do items[#items + 1] = { name = x } end
local out = resil.map(items, function(item)
  return resil.step("render", function()
    if item.name == os.getenv("KILL") then
      -- (once the items before it are paid and their steps recorded: on a loaded machine the
      -- kill came while two of them were still in flight)
      local function logged() local f = io.open(log); local n = f and select(2, f:read("a"):gsub("\n", "")) or 0; if f then f:close() end; return n end
      while logged() < 3 do resil.sleep(0.01) end
      resil.sleep(0.3)
      os.execute("kill -KILL " .. io.open("/proc/self/stat"):read("l"):match("^%d+"))
    elseif os.getenv("KILL") and item.name > os.getenv("KILL") then
      resil.sleep(60) -- (the items after it wait for the kill: paid are a, b and c only)
    end
    resil.sleep(0.05)
    local f = assert(io.open(log, "a")); f:write(item.name, "\n"); f:close()
    return "video of " .. item.name
  end)
end, { concurrency = 3 })
for i, item in ipairs(items) do print(item.name, out[i]) end
]]

describe("a run resumed with its list reordered, its items mapped three at a time", function()
  it("stops at the divergence: the other workers take no further item (each paid for)", function()
    local db, log = helpers.tmpname(".db"), helpers.tmpname(".log")
    local script = helpers.write(helpers.tmpname(".lua"), ITEMS_CONCURRENT)
    local function items(list, env)
      return helpers.run(("%s %s --store '%s' --log-level off --run three %s %s %s"):format(env or "", helpers.resil,
        db, script, log, list))
    end
    assert.are_not.equal(0, items("a,b,c,d,e,f,g,h", "KILL=d").code)
    local function paid() return select(2, (helpers.slurp(log) or ""):gsub("\n", "")) end
    assert.are.equal(3, paid()) -- a, b, c
    local r = items("a,c,b,d,e,f,g,h")
    assert.are.equal(1, r.code, r.stdout)
    assert.matches("divergence: run three diverged at item 2:", r.stderr, 1, true) -- (the lowest met)
    -- (before: the workers not at items 2 and 3 went on to the end of the list, each item paid: e, f, g, h
    -- too; an item in flight as the divergence was met (d) still finishes)
    assert.is_true(paid() <= 3 + 2, helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):find("h\n"), helpers.slurp(log))
    r = items("a,b,c,d,e,f,g,h")
    assert.are.equal(0, r.code, r.stderr)
    for _, x in ipairs({ "a", "b", "c", "d", "e", "f", "g", "h" }) do
      assert.matches("\n?" .. x .. "\tvideo of " .. x .. "\n", r.stdout)
    end
  end)
end)

-- Items of two steps, one at a time; KILL=x: the process dies (SIGKILL) inside item x's second step.
local HALF_DONE = [[
local resil = require "resil"
resil.map({ "a", "b", "c" }, function(x)
  resil.step("fetch", function() return x end)
  resil.step("caption", function()
    if x == os.getenv("KILL") then os.execute("kill -KILL " .. io.open("/proc/self/stat"):read("l"):match("^%d+")) end
    return "caption of " .. x
  end)
end, { concurrency = 1 })
]]

for _, b in ipairs(helpers.store_backends()) do
  describe("runs show of a run killed (kill -9) mid-step, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)

    it("lists the step it was in as interrupted and its item as not done; resumed, all done", function()
      local url, id = b.url(), "half-" .. b.name
      local script = helpers.write(helpers.tmpname(".lua"), HALF_DONE)
      local function run(env)
        return helpers.run(("%s %s --store '%s' --run %s --log-level off %s"):format(env, helpers.resil, url, id, script))
      end
      local function show(html)
        return helpers.run(("%s runs show %s --store '%s'%s"):format(helpers.resil, id, url,
          html and (" --html " .. html) or ""))
      end
      assert.are.equal(137, run("KILL=b").code)
      local r = show()
      assert.are.equal(0, r.code, r.stderr)
      -- (before: item b "done", with its fetch only, and "2 items: 2 done")
      assert.matches("\n2%s+2%s+caption%s+interrupted%s+0%s+[%d%- :]+its process ended", r.stdout)
      assert.matches("\n2%s+interrupted%s+2%s", r.stdout)
      assert.matches("\n1%s+done%s+2%s", r.stdout)
      assert.matches("2 items: 1 done, 0 failed, 0 pending, 1 interrupted;", r.stdout, 1, true)
      assert.matches("resume: resil%-lua", r.stdout)
      local page = helpers.tmpname(".html")
      assert.are.equal(0, show(page).code)
      assert.matches('id="sum-interrupted"><b>1</b>', helpers.slurp(page), 1, true)
      assert.matches('id="sum-done"><b>1</b>', helpers.slurp(page), 1, true)
      -- resumed to its end: nothing left interrupted
      assert.are.equal(0, run("").code)
      r = show()
      assert.matches("3 items: 3 done, 0 failed, 0 pending;", r.stdout, 1, true)
      assert.is_nil(r.stdout:find("interrupted"), r.stdout)
    end)
  end)
end

describe("runs show of a run whose holder is in a step now", function()
  it("lists that step as running, not interrupted", function()
    local db, go = helpers.tmpname(".db"), helpers.tmpname(".go")
    local pid, out = helpers.start(([[
local resil = require "resil"
resil.step("fetch", function() return 1 end)
resil.step("caption", function()
  while not io.open(%q) do resil.sleep(0.02) end
  return 2
end)
]]):format(go), ("--store %s --run live --log-level off"):format(db))
    local show
    assert(helpers.wait_until(function()
      show = helpers.run(("%s runs show live --store %s"):format(helpers.resil, db)).stdout
      return show:find("caption") ~= nil
    end, 30), helpers.slurp(out))
    assert.matches("\n%-%s+2%s+caption%s+running%s", show)
    assert.matches("1 items: 0 done, 0 failed, 0 pending, 1 running;", show, 1, true)
    assert.is_nil(show:find("interrupted"), show)
    helpers.write(go, "")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    show = helpers.run(("%s runs show live --store %s"):format(helpers.resil, db)).stdout
    assert.matches("1 items: 1 done, 0 failed, 0 pending;", show, 1, true)
  end)
end)

-- (before: `runs show` read every step's record, results and all, in one HVALS: a run of a few
-- large checkpoints (up to 32 MB a step) needed one reply of all of them, past a server's
-- client-output-buffer-limit (the connection cut: store_unavailable) or, larger, its timeout)
describe("runs show on Redis of a run whose checkpoints are large together", function()
  local redis = helpers.redis_server()
  teardown(function() redis.stop() end)
  it("reads them a few at a time: each reply fits where one of them fits", function()
    local url = redis.url()
    local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 4 do resil.step("render " .. i, function() return string.rep("v", 3 * 1024 * 1024) end) end
]], ("--store '%s' --run large --log-level off"):format(url))
    assert.are.equal(0, r.code, r.stderr)
    -- a reply over 8 MB cuts the connection; each record is 3 MB, the four 12 MB
    assert.is_true(os.execute(("redis-cli -p %d config set client-output-buffer-limit 'normal 8mb 8mb 0' > /dev/null")
      :format(redis.port)))
    local show = helpers.run(("%s runs show large --store '%s'"):format(helpers.resil, url))
    assert.are.equal(0, show.code, show.stderr)
    assert.matches("\n%-%s+4%s+render 4%s+done%s", show.stdout)
    assert.matches("1 items: 1 done, 0 failed, 0 pending;", show.stdout, 1, true)
  end)
end)

describe("a run with two resil.map calls one after the other (a loop over batches)", function()
  local SCRIPT = [[
local resil = require "resil"
local first = arg[1] == "first"
local a, fa = resil.map({ "x", "y" }, function(item)
  local got, err = resil.step("fetch", function()
    if first and item == "x" then return nil, "fetch failed" end
    return "fetched " .. item
  end)
  if not got then return nil, err end
  return resil.step("render", function() print("render A " .. item) return "A:" .. got end)
end)
local b = resil.map({ "x", "y" }, function(item)
  return resil.step("render", function() print("render B " .. item) return "B:" .. item end)
end)
print(a[1], a[2], b[1], b[2], fa and fa[1])
]]

  it("resumed after an item of the first failed: each map's items get their own results, nothing paid twice", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script(SCRIPT, ("--store %s --run batches --log-level off"):format(db), "first")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("render A y\nrender B x\nrender B y\nnil\tA:fetched y\tB:x\tB:y\tfetch failed\n", r.stdout)
    r = helpers.run_script(SCRIPT, ("--store %s --run batches --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "render B x" ran again, paid twice, and the first map's item x was given "B:x", the second
    -- map's result recorded where its render now stood: both maps' items were "1" and "2")
    assert.are.equal("render A x\nA:fetched x\tA:fetched y\tB:x\tB:y\tnil\n", r.stdout)
    local show = helpers.run(("%s runs show batches --store %s"):format(helpers.resil, db)).stdout
    assert.matches("\nm2/1%s+1%s+render%s+done", show)
    assert.matches("4 items: 4 done, 0 failed, 0 pending", show, 1, true)
  end)
end)
