-- `resil-lua check` on the modules it loads itself to check a registry (the
-- project's provider adapters and prices): one that loops at load must not
-- hang it, and one that does not load is its own file's error, not a wrong
-- "unknown provider" or "no price" on every model.
local helpers = require "spec.helpers"

local dir
before_each(function()
  dir = helpers.tmpname("")
  os.execute("mkdir -p " .. dir .. "/policies/providers")
end)
after_each(function() os.execute("rm -rf " .. dir) end)

local function check(args)
  return helpers.run(("cd %s && timeout 60 %s check %s"):format(dir, helpers.resil, args or ""))
end

describe("resil-lua check, the modules a registry check loads", function()
  it("a provider adapter that loops at load is an error with file:line, not a hang", function()
    helpers.write(dir .. "/policies/providers/openai.lua", "local n = 0\nwhile true do n = n + 1 end\n")
    local r = check()
    assert.are.equal(1, r.code, r.stdout .. r.stderr) -- (was: hung, killed by timeout: 124)
    assert.matches("error: policies/providers/openai%.lua:2: ran more than %d+ instructions at load", r.stdout)
  end)

  it("prices that loop at load are an error with file:line, not a hang", function()
    helpers.write(dir .. "/policies/pricing.lua", "local t = {}\nwhile true do t[#t + 1] = 1 end\n")
    local r = check("policies/models.lua")
    assert.are.equal(1, r.code, r.stdout .. r.stderr) -- (was: hung)
    assert.matches("error: policies/pricing%.lua:2: ran more than %d+ instructions at load", r.stdout)
    assert.not_matches("has no price", r.stdout)
  end)

  it("checks the project's provider adapters too: a broken one is its line, not an unknown provider", function()
    helpers.write(dir .. "/policies/providers/openai.lua", "local M = {}\nlocal x = = 1\nreturn M\n")
    local r = check()
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: policies/providers/openai%.lua:2: unexpected symbol near '='\n", r.stdout)
    -- (was: only "unknown provider 'openai' (no policies/providers/openai.lua)", once per model)
    assert.not_matches("unknown provider", r.stdout)
    assert.matches("\n1 error, ", "\n" .. r.stdout)
  end)

  it("a module two policies require fails once", function()
    helpers.write(dir .. "/policies/a.lua", 'return { f = require("policies.b").f }\n')
    helpers.write(dir .. "/policies/b.lua", 'local M = {}\nM.f = nil .. "x"\nreturn M\n')
    local r = check()
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local _, n = r.stdout:gsub("policies/b%.lua:2: attempt to concatenate a nil value", "")
    assert.are.equal(1, n, r.stdout)
  end)
end)
