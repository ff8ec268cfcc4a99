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
