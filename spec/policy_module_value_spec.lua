-- A policy module that returns a function (Lua's own idiom; resil.policy's view calls it) loads
-- at start, and was refused by every reload after: "returned function, not a table", whatever
-- file had changed, so no edit of any policy was ever applied again, and `check` called it an
-- error. What a reload refuses is what would fail every call: nothing, a number, a string.
local helpers = require "spec.helpers"

describe("a policy module that returns a function", function()
  it("reloads as one that returns a table does; one that returns nothing is still refused", function()
    local dir = helpers.policy_dir({
      ["double.lua"] = "return function(x) return x * 2 end\n",
      ["other.lua"] = "return { v = 1 }\n",
    })
    local r = helpers.run_script(([[
      local resil = require "resil"
      local double, other = resil.policy("double"), resil.policy("other")
      local function write(name, text) local f = assert(io.open(%q .. "/" .. name, "w")) f:write(text) f:close() end
      print(double(21), other.v)
      write("other.lua", "return { v = 2 }\n")
      print((resil.reload()))                 -- (was: false, "policies.double returned function, not a table")
      print(double(21), other.v)
      write("double.lua", "return function(x) return x * 3 end\n")
      print((resil.reload()))
      print(double(21), other.v)
      write("double.lua", "local x = 1\n")    -- returns nothing: every call would fail
      print(resil.reload())
      print(double(21))
    ]]):format(dir), ("--policies %s --log-level off"):format(dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.same({ "42\t1", "true", "42\t2", "true", "63\t2" }, { table.unpack(lines, 1, 5) })
    assert.matches("^false\treload: [^\n]*double%.lua: policies%.double returned nothing, not a table or a function",
      lines[6])
    assert.are.equal("63", lines[7])
    -- and check says the same of a number
    helpers.write(dir .. "/double.lua", "return 42\n")
    local c = helpers.run(("cd %s/.. && %s check --policies %s"):format(dir, helpers.resil, dir))
    assert.matches("double%.lua: a policy module must return a table or a function; it returned number", c.stdout)
    helpers.write(dir .. "/double.lua", "return function(x) return x * 2 end\n")
    c = helpers.run(("cd %s/.. && %s check --policies %s"):format(dir, helpers.resil, dir))
    assert.is_nil(c.stdout:find("double.lua", 1, true), c.stdout)
  end)

  it("a file required for what it does as it loads, returning nothing, reloads; a table module cut before its " ..
    "return is still refused", function()
    local dir = helpers.policy_dir({
      ["rules.lua"] = 'local classify = require "policies.classify"\nclassify.status[409] = { class = "conflict", ' ..
        'retryable = true, backoff = "constant", max_retries = 2 }\n',
      ["other.lua"] = "local M = { v = 1 }\nreturn M\n",
    })
    local r = helpers.run_script(([[
      local resil = require "resil"
      require "policies.rules"
      local other = resil.policy("other")
      local function write(name, text) local f = assert(io.open(%q .. "/" .. name, "w")) f:write(text) f:close() end
      write("other.lua", "local M = { v = 2 }\nreturn M\n")
      print((resil.reload()), other.v)        -- (was: false, "policies.rules returned nothing, not a table")
      print(require("policies.classify").status[409].class)
      write("other.lua", "local M = { v = 3 }\n") -- a save cut before its return
      print(resil.reload())
      print(other.v)
    ]]):format(dir), ("--policies %s --log-level off"):format(dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("true\t2", lines[1])
    assert.are.equal("conflict", lines[2])
    assert.matches("^false\treload: [^\n]*other%.lua: policies%.other returned nothing, not a table or a function", lines[3])
    assert.are.equal("2", lines[4])
    local c = helpers.run(("cd %s/.. && %s check --policies %s"):format(dir, helpers.resil, dir))
    assert.is_nil(c.stdout:find("rules.lua", 1, true), c.stdout)
  end)
end)
