-- resil.policy(name): a policy that is not there, or does not load, is an
-- error at the caller's line (it named a line of the host's prelude).
local resil = require "resil"
local helpers = require "spec.helpers"

describe("resil.policy", function()
  it("a policy not found is the caller's file:line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() local p = resil.policy("no_such_policy_here"); return p end)
    assert.is_false(ok)
    -- (was "[resil prelude]:NNN: module ... not found")
    assert.matches("^spec/policy_view_spec%.lua:" .. line .. ": module 'policies%.no_such_policy_here' not found",
      tostring(err))
  end)

  it("a policy that does not compile is the caller's line and the file's", function()
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir .. "/policies")
    helpers.write(dir .. "/policies/broken.lua", "return {\n")
    helpers.write(dir .. "/main.lua", 'local resil = require "resil"\n\nlocal p = resil.policy("broken")\n')
    local r = helpers.run(("cd %s && %s main.lua"):format(dir, helpers.resil))
    os.execute("rm -rf " .. dir)
    assert.are.equal(1, r.code)
    assert.matches("main%.lua:3: error loading policy 'policies%.broken':\n%s*policies/broken%.lua:2:", r.stderr)
  end)
end)
