-- The commands a pipeline's user runs after a crash (`resil-lua runs show`),
-- against a real process killed with SIGKILL mid-run.
local helpers = require "spec.helpers"

describe("runs show, for a run whose process was killed (kill -9) mid-step", function()
  for _, b in ipairs(helpers.store_backends()) do
    it("on " .. b.name .. ": names its holder, gone, and the command that resumes it (text and --html); a live " ..
      "one's holder alone", function()
      if b.stop then finally(b.stop) end
      local db = b.url()
      local pid, out = helpers.start([[
local resil = require "resil"
resil.step("fetch", function() return 1 end)
io.stdout:write("started\n"); io.stdout:flush()
resil.step("render", function() resil.sleep(60) return 2 end)
]], ("--store '%s' --run crashed --log-level off"):format(db))
      assert(helpers.wait_until(function() return helpers.slurp(out):match("started") end, 10), helpers.slurp(out))
      local live = helpers.run(("%s runs show crashed --store '%s'"):format(helpers.resil, db))
      assert.matches("^run crashed: running %(%S+%.lua%), held by pid " .. pid .. " on %S+ since [%d%- :]+\n", live.stdout)
      assert.is_not.matches("resume:", live.stdout) -- (it runs: a resume now would stop with run_held)
      os.execute("kill -9 " .. pid)
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      local r = helpers.run(("%s runs show crashed --store '%s'"):format(helpers.resil, db))
      assert.are.equal(0, r.code, r.stderr)
      -- (before: "run crashed: running (...)" and no resume line: a run going on, for good)
      assert.matches("^run crashed: running %(%S+%.lua%), held by pid " .. pid .. " on %S+ since [%d%- :]+ %(gone%)\n",
        r.stdout)
      assert.matches("\nresume: resil%-lua %-%-store %S+ %-%-run crashed %S+%.lua\n$", r.stdout)
      local html = helpers.tmpname(".html")
      assert.are.equal(0, helpers.run(("%s runs show crashed --store '%s' --html %s"):format(helpers.resil, db, html)).code)
      local page = helpers.slurp(html)
      assert.matches('<code id="resume">resil%-lua %-%-store %S+ %-%-run crashed %S+%.lua</code>', page)
      assert.matches('<span id="run%-holder">pid ' .. pid .. ' on %S+ since [%d%- :]+ %(gone%)</span>', page)
    end)
  end
end)

describe("a pipeline that ends with os.exit(code) (a cron job's exit status)", function()
  for _, b in ipairs(helpers.store_backends()) do
    it("on " .. b.name .. ": its run ends done, done_with_failures or failed, not running for good", function()
      if b.stop then finally(b.stop) end
      local url = b.url()
      local function run(id, ending)
        local r = helpers.run_script(([[
local resil = require "resil"
local _, failures = resil.map({ 1, 2 }, function(i)
  return resil.step("render", function() if i == %s then error("no") end return i end)
end)
%s
]]):format(id == "some-failed" and "2" or "0", ending), ("--store '%s' --run %s --log-level off"):format(url, id))
        return r.code
      end
      assert.are.equal(0, run("ok", "os.exit(0)"))
      assert.are.equal(0, run("some-failed", "os.exit(true)"))
      assert.are.equal(3, run("failing", "os.exit(3)"))
      assert.are.equal(0, run("immediate", "os.exit(0, false)"))
      local runs = helpers.run(("%s runs --store '%s'"):format(helpers.resil, url)).stdout
      -- (before: each "running", its holder gone, as after a kill -9)
      assert.matches("\nok%s+done%s", runs)
      assert.matches("\nsome%-failed%s+done_with_failures%s", runs)
      assert.matches("\nfailing%s+failed%s", runs)
      assert.matches("\nimmediate%s+running%s[^\n]+%(gone%)", runs) -- Lua's immediate exit is a crash's
      -- os.exit(0) from inside a step, another item's step still running: both cut short
      local cut = helpers.run_script([[
local resil = require "resil"
resil.map({ 1, 2 }, function(i)
  return resil.step("render", function() if i == 1 then resil.sleep(5) end os.exit(0) end)
end)
]], ("--store '%s' --run cut --log-level off"):format(url))
      assert.are.equal(0, cut.code, cut.stderr)
      local show = helpers.run(("%s runs show cut --store '%s'"):format(helpers.resil, url)).stdout
      assert.matches("^run cut: interrupted", show)
      assert.matches("2 items: 0 done, 0 failed, 2 pending", show)
    end)
  end
end)

describe("os.exit with a code it cannot take", function()
  -- (before: "[resil runs]:749: bad argument #1 to 'host_exit' (...)", a host frame and name, raised
  -- after the run was recorded as ended: under a pcall the script went on, and its next step failed
  -- as a divergence of the run it no longer held)
  it("raises at the caller's line as Lua's os.exit does, before anything is recorded", function()
    local store = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("fetch", function() return 1 end)
print(pcall(os.exit, 2.5))
print(resil.step("render", function() return 2 end))
os.exit({})
]], ("--store %s --run bad-exit --log-level off"):format(store))
    assert.are.equal("false\tbad argument #1 to 'exit' (number has no integer representation)\n2\n", r.stdout)
    assert.are.equal(1, r.code)
    assert.matches("^resil%-lua: [^\n]*%.lua:5: bad argument #1 to 'exit' %(number expected, got table%)\n", r.stderr)
    assert.is_nil(r.stderr:find("host_exit", 1, true), r.stderr)
    local show = helpers.run(("%s runs show bad-exit --store %s"):format(helpers.resil, store)).stdout
    assert.matches("\n%-%s+2%s+render%s+done%s", show)
    -- (a number in a string, or a float with an integer value, is a code, as in Lua)
    assert.are.equal(3, helpers.run_script('os.exit("3")', "--log-level off").code)
    assert.are.equal(4, helpers.run_script("os.exit(4.0)", "--log-level off").code)
  end)
end)

describe("a pipeline that ends with os.exit(code), with --metrics-file", function()
  it("writes the file a last time, with the counts of its whole run", function()
    local prom = helpers.tmpname(".prom")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("fetch", function() return 1 end)
os.exit(0)
]], ("--store %s --log-level off --metrics-file %s"):format(helpers.tmpname(".db"), prom))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: the file as written at start, 0 steps; the command's last write never came)
    assert.matches('resil_steps_total{result="done"} 1\n', helpers.slurp(prom))
  end)
end)
