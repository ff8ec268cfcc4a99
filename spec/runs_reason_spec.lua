-- `runs show` of a run that failed outside its steps: it says why. It said "failed" and listed
-- every step done, nothing saying what went wrong (an error in the script's own code between two
-- steps, a divergence on resume, os.exit(1)). Real processes, on SQLite and a real redis-server.
local helpers = require "spec.helpers"

local SCRIPT = [[
local resil = require "resil"
resil.step("fetch", function() return 1 end)
resil.step(arg[1], function()
  if arg[2] == "step" then error("the provider said no") end
  return 2
end)
if arg[2] == "script" then error("the script's own code broke") end
if arg[2] == "exit" then os.exit(3) end
]]

for _, b in ipairs(helpers.store_backends()) do
  describe("runs show of a run that failed outside its steps, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    local script = helpers.write(helpers.tmpname(".lua"), SCRIPT)
    local function run(url, id, ...)
      return helpers.run(("%s --store '%s' --run %s --log-level off %s %s"):format(helpers.resil, url, id, script,
        table.concat({ ... }, " ")))
    end
    local function show(url, id)
      local r = helpers.run(("%s runs show %s --store '%s'"):format(helpers.resil, id, url))
      assert.are.equal(0, r.code, r.stderr)
      return r.stdout
    end

    it("an error in the script's code: its message, under the run's status; the items as they were", function()
      local url = b.url()
      assert.are.equal(1, run(url, "broke", "send", "script").code)
      local out = show(url, "broke")
      assert.matches("^run broke: failed %([^\n]*%)\nwhy: %S+:7: the script's own code broke\n", out)
      assert.is_nil(out:find("stack traceback"), out)
      assert.is_nil(out:find("(run)", 1, true), out)
      assert.matches("1 items: 1 done, 0 failed", out, 1, true)
      local page = helpers.tmpname(".html")
      assert.are.equal(0, helpers.run(("%s runs show broke --store '%s' --html %s"):format(helpers.resil, url, page)).code)
      assert.matches('id="run%-reason">%S+:7: the script&#39;s own code broke<', helpers.slurp(page))
      -- resumed to its end: the reason goes with the failure
      assert.are.equal(0, run(url, "broke", "send").code)
      out = show(url, "broke")
      assert.matches("run broke: done", out, 1, true)
      assert.is_nil(out:find("why:", 1, true), out)
    end)

    it("a divergence on resume: the divergence", function()
      local url = b.url()
      assert.are.equal(0, run(url, "div", "send").code)
      assert.are.equal(1, run(url, "div", "mail").code)
      local out = show(url, "div")
      assert.matches("run div: failed", out, 1, true)
      assert.matches("\nwhy: divergence: run div diverged at step 2: recorded 'send', now 'mail'", out)
    end)

    it("os.exit(3): that the script exited so", function()
      local url = b.url()
      assert.are.equal(3, run(url, "quit", "send", "exit").code)
      assert.matches("\nwhy: the script called os.exit%(3%)\n", show(url, "quit"))
    end)

    it("a step's own failure: said once, by the step", function()
      local url = b.url()
      assert.are.equal(1, run(url, "stepfail", "send", "step").code)
      local out = show(url, "stepfail")
      assert.matches("\n%-%s+2%s+send%s+failed%s+0%s+[%d%- :]+%S+:4: the provider said no\n", out)
      assert.is_nil(out:find("why:", 1, true), out)
    end)
  end)
end
