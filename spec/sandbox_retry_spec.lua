local helpers = require "spec.helpers"

-- policies.retry notes the attempts on a table its fn returns (rawset, past any __newindex). Under
-- the sandbox rawset refuses the host's objects (their metatables hidden): a reservation or a
-- store open retried (retry.call(function() return budget:reserve(x) end)) raised there, the
-- script failing on the policy library's line, where it ran outside the sandbox.
describe("policies.retry under --sandbox", function()
  it("returns what fn returned when it is one of the host's objects (a budget's ticket, a store)", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local retry = require "policies.retry"
local b = resil.budget("batch", { limit = 1 })
local ticket, err = retry.call(function() return b:reserve(0.1) end, { max_retries = 2 })
print(ticket ~= nil, err)
print(retry.call(function() return resil.store() end, { max_retries = 2 }) == resil.store())
print(retry.call(function() return { status = 200 } end).attempts)
]])
    for _, sandbox in ipairs({ "", "--sandbox" }) do
      local r = helpers.run(("%s %s --store %s/s.db %s"):format(helpers.resil, sandbox, dir, script))
      assert.are.equal(0, r.code, sandbox .. ": " .. r.stderr)
      assert.are.equal("true\tnil\ntrue\n1\n", r.stdout, sandbox)
    end
    os.remove(script)
  end)
end)
