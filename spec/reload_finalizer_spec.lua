-- A policy reload (SIGHUP, --watch) runs outside every task: what the watchdog times there.
-- Real processes with their own policy folders.
local helpers = require "spec.helpers"
local resil = require "resil"

describe("policy reload and the watchdog", function()
  -- (before: a finalizer runs with hooks off, so neither the reload's instruction cap nor the
  -- watchdog (which times resumes, and a reload is none) saw one that looped while a reload ran
  -- it: `collectgarbage()` in a policy file, or any collection step the reload's own allocation
  -- made; the process held its loop for good, a gateway serving nobody)
  it("a __gc that loops while a --watch reload runs ends the process with code 70 naming the reload", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/held.lua", "return { version = 1 }")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local held = resil.policy "held"
print(held.version)
io.stdout:flush()
resil.sleep(0.05)
local f = io.open(arg[1] .. "/held.lua", "w")
f:write("setmetatable({}, { __gc = function() while true do end end }); collectgarbage(); return { version = 2 }")
f:close()
for _ = 1, 3000 do resil.sleep(0.01) end
print("went on")
]])
    local r = helpers.run(("timeout -s KILL 60 %s --policies %s --watch --max-task-seconds 0.3 %s %s"):format(
      helpers.resil, dir, script, dir))
    assert.are.equal(70, r.code, r.stdout .. r.stderr)
    assert.are.equal("1\n", r.stdout)
    local line = r.stderr:match('[^\n]*"level":"error"[^\n]*')
    assert.is_truthy(line, r.stderr)
    local entry = resil.json.decode(line)
    assert.matches("^a policy reload %(its code, or a __gc finalizer it ran%) ran %d+%.%d s without yielding " ..
      "and did not stop at %-%-max%-task%-seconds=0%.3: it is stuck outside Lua code", entry.msg)
    assert.are.equal(70, entry.exit_code)
  end)
end)
