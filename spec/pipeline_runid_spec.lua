-- The run a script without a file checkpoints into (`resil-lua - < x.lua`,
-- `resil-lua -e 'code'`): named by its code, as a file's is by its path.
local helpers = require "spec.helpers"

describe("scripts without a file (stdin, -e)", function()
  it("are runs of their own: another script's steps are not replayed as theirs; the same script resumes", function()
    local db = helpers.tmpname(".db")
    local function piped(result)
      return helpers.run(("%s --store %s --log-level off -"):format(helpers.resil, db),
        ('print(require("resil").step("fetch", function() return %q end))\n'):format(result)).stdout
    end
    local function given(result)
      return helpers.run(("%s --store %s --log-level off -e 'print(require(\"resil\").step(\"fetch\", " ..
        "function() return \"%s\" end))'"):format(helpers.resil, db, result)).stdout
    end
    assert.are.equal("A\n", piped("A"))
    -- (before: "A", script A's paid result, as B's; and C's as D's)
    assert.are.equal("B\n", piped("B"))
    assert.are.equal("C\n", given("C"))
    assert.are.equal("D\n", given("D"))
    -- the same code again is the same run: replayed, as a file run again is
    local r = helpers.run(("%s --store %s --log-level info -"):format(helpers.resil, db),
      'print(require("resil").step("fetch", function() return "B" end))\n')
    assert.are.equal("B\n", r.stdout)
    assert.matches('"msg":"run resumed"', r.stderr)
  end)

  it("from stdin keep their #! line skipped and their line numbers", function()
    local r = helpers.run(helpers.resil .. " - x", "#!/usr/bin/env resil-lua\nprint(arg[1])\nlocal y = = 1\n")
    assert.are.equal(1, r.code)
    assert.matches("stdin:3: unexpected symbol near '='", r.stderr)
    r = helpers.run(helpers.resil .. " - x", "\239\187\191#!/usr/bin/env resil-lua\nprint(arg[1])\n")
    assert.are.equal("x\n", r.stdout, r.stderr)
  end)
end)
