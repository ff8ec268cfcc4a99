local helpers = require "spec.helpers"
local R = helpers.resil

-- the embedding API's side is tests/call_test.c (each refusal from C); this
-- is the command's: off by default for its own scripts, --sandbox turns it on
describe("resil-lua --sandbox", function()
  it("is off by default: the command's scripts get the whole standard library", function()
    local r = helpers.run(R .. [[ -e "print(type(os.execute), type(io.popen), type(debug.getinfo))"]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("function\tfunction\tfunction\n", r.stdout)
  end)

  it("refuses os.execute, io.popen and debug, naming the function and the script's line", function()
    for _, case in ipairs({
      { "os.execute('true')", "os.execute is not allowed in the sandbox" },
      { "io.popen('ls')", "io.popen is not allowed in the sandbox" },
      { "debug.getinfo(1)", "debug.getinfo is not allowed in the sandbox" },
      { "require 'lfs'", 'require "lfs" is not allowed in the sandbox' },
    }) do
      local script = helpers.tmpname(".lua")
      helpers.write(script, "local x = 1\n" .. case[1] .. "\n")
      local r = helpers.run(R .. " --sandbox " .. script)
      os.remove(script)
      assert.are.equal(1, r.code, case[1])
      assert.matches(script:gsub("%p", "%%%0") .. ":2: " .. case[2]:gsub("%p", "%%%0"), r.stderr)
    end
  end)

  it("still runs resil, the safe libraries and the shipped policies", function()
    local r = helpers.run(R .. [[ --sandbox -e "local retry = require 'policies.retry' print(type(retry), ]]
      .. [[require('resil').version ~= nil, string.rep('a', 2), math.max(1, 2))"]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("table\ttrue\taa\t2\n", r.stdout)
  end)
end)
