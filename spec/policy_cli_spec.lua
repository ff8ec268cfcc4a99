-- The command as a newcomer meets it while writing policies: a --policies
-- folder misspelt, asking a subcommand for help, options put before a
-- subcommand. What is asserted is what the user sees: the exit status and
-- the one line that says what to do.
local helpers = require "spec.helpers"
local R = helpers.resil

describe("the command, for a policy's author", function()
  it("refuses a --policies folder that does not exist or is a file, instead of running on the shipped policies",
    function()
    local missing = helpers.tmpname("-polices") -- (a typo: no such folder)
    local file = helpers.write(helpers.tmpname(".lua"), "return {}\n")
    for _, dir in ipairs({ missing, file }) do
      -- a pipeline: it ran, with the shipped registry and policies, and said nothing
      local r = helpers.run(("%s --policies %s -e 'print(\"ran\")'"):format(R, dir))
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.are.equal("", r.stdout)
      assert.matches("%-%-policies: " .. dir:gsub("%p", "%%%0") .. " is not a folder", r.stderr)
      -- check: it checked the shipped files and passed, a CI step green over nothing
      r = helpers.run(("%s check --policies %s"):format(R, dir))
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.matches("%-%-policies: " .. dir:gsub("%p", "%%%0") .. " is not a folder", r.stderr)
      assert.is_nil(r.stdout:match("0 errors"))
      -- the gateway, before it listens
      r = helpers.run(("%s gateway --listen 127.0.0.1:0 --policies %s"):format(R, dir))
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.matches("%-%-policies: " .. dir:gsub("%p", "%%%0") .. " is not a folder", r.stderr)
    end
    -- a folder that is there runs as before
    local dir = helpers.policy_dir({ ["mine.lua"] = "return { v = 7 }\n" })
    local r = helpers.run(("%s --policies %s -e 'print(require(\"policies.mine\").v)'"):format(R, dir))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("7\n", r.stdout)
  end)
end)
