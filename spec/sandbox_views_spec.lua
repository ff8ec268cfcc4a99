local helpers = require "spec.helpers"

-- Under the sandbox, require gives a host module's table as a read-only view (the host's modules
-- call what it holds). A module the resil table holds itself (resil.metrics) is the scripts' as
-- that table is: its view refused `require("resil.metrics").max_series = N` while
-- `resil.metrics.max_series = N` (the README's) set the same field.
describe("--sandbox and the modules the resil table holds", function()
  it("lets a script set resil.metrics' settings through require as through resil.metrics; resil.owner stays read only",
    function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local metrics = require "resil.metrics"
metrics.max_series = 5000
print(resil.metrics.max_series, metrics == resil.metrics)
print(pcall(function() require("resil.owner").verdict = function() return "dead" end end))
]])
    local r = helpers.run(("%s --sandbox %s"):format(helpers.resil, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^5000\ttrue\nfalse\t.-resil%.owner%.verdict cannot be set in the sandbox", r.stdout)
  end)
end)

-- The sandbox's rawset refuses the host's objects (a store, a budget, a ticket: rawset went past
-- their __newindex). It told them by a hidden metatable (__metatable = false), which refused a
-- script's own read-only table that its code fills with rawset.
describe("--sandbox's rawset", function()
  it("refuses the host's objects and a module's view, not a script's own table with a hidden metatable", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local function readonly(t)
  local proxy = setmetatable({}, { __metatable = false, __newindex = function(_, k) error("read only: " .. k, 2) end })
  for k, v in pairs(t) do rawset(proxy, k, v) end
  return proxy
end
local conf = readonly({ model = "m", retries = 3 })
print(conf.model, conf.retries, pcall(function() conf.x = 1 end))
local b = resil.budget("b", { limit = 1 })
for _, o in ipairs({ resil.store(), b, (b:reserve(0.1)), require("resil.owner"), getmetatable("") }) do
  print((select(2, pcall(rawset, o, "get", print)):match("rawset: the host's objects cannot be changed")))
end
]])
    local r = helpers.run(("%s --sandbox --store %s/s.db %s"):format(helpers.resil, dir, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.matches("^m\t3\tfalse\t.-read only: x$", lines[1])
    for i = 2, 6 do assert.are.equal("rawset: the host's objects cannot be changed", lines[i], r.stdout) end
  end)
end)
