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
