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

  -- (before: "conf//bad.lua:2: ..." in every message, the path as the searcher joined it, for the
  -- `--policies conf/` a shell's completion writes)
  it("names a policy file conf/x.lua, not conf//x.lua, for a --policies given with a trailing slash", function()
    local dir = helpers.policy_dir({ ["bad.lua"] = "local M = {}\nfunction M.f( return 1 end\nreturn M\n" })
    local r = helpers.run(("%s --log-level off --policies %s/ -e 'require \"policies.bad\"'"):format(R, dir))
    assert.are.equal(1, r.code)
    assert.truthy(r.stderr:find("\n\t" .. dir .. "/bad.lua:2: ", 1, true), r.stderr)
    assert.is_nil(r.stderr:find("//", 1, true), r.stderr)
  end)

  -- (before: "unknown option '--store=x.db'" and the usage; the value's password was redacted already)
  it("says an option's value comes after a space for --option=value, its secret redacted", function()
    local r = helpers.run(R .. " --store=x.db -e 1")
    assert.are.equal(1, r.code)
    assert.are.equal("resil-lua: an option's value comes after a space: --store x.db\n", r.stderr)
    r = helpers.run(R .. " gateway --listen=:8080")
    assert.are.equal("resil-lua: an option's value comes after a space: --listen :8080\n", r.stderr)
    r = helpers.run(R .. " --store=redis://:hunter2secret@127.0.0.1:1/0 -e 1")
    assert.are.equal(1, r.code)
    assert.is_nil(r.stderr:find("hunter2secret", 1, true), r.stderr)
    assert.matches("^resil%-lua: an option's value comes after a space: %-%-store redis://", r.stderr)
  end)

  it("prints the usage for a subcommand's --help or -h, exit status 0", function()
    for _, cmd in ipairs({ "check --help", "check -h", "mock --help", "mock -h", "costs --by model --help",
      "runs --help", "budgets -h", "keys --help" }) do
      local r = helpers.run(("%s %s"):format(R, cmd))
      assert.are.equal(0, r.code, cmd .. ": " .. r.stdout .. r.stderr)
      assert.matches("usage: resil%-lua", r.stdout, cmd)
      assert.matches("resil%-lua check %[%-%-policies DIR%]", r.stdout, cmd)
      assert.are.equal("", r.stderr, cmd) -- (was: "unknown option '--help' (try --help)", exit 1)
    end
  end)

  it("says a subcommand goes first when options come before it, instead of 'cannot open costs'", function()
    for _, cmd in ipairs({ "--store x.db costs", "--virtual-clock check", "--log-level off runs show x" }) do
      local r = helpers.run(("cd %s && %s %s"):format(helpers.policy_dir({}), R, cmd))
      local name = cmd:match("(%a+)$") == "x" and "runs" or cmd:match("(%a+)$")
      assert.are.equal(1, r.code, cmd)
      assert.matches("'" .. name .. "' is a subcommand: name it first", r.stderr, cmd)
    end
    -- (before: "unknown option '--listen'" and the usage, where --help lists --listen)
    for _, cmd in ipairs({ "--listen :8080 gateway", "--workers 2 gateway", "--config g.lua gateway",
                           "--worker-timeout 5 gateway --workers 2" }) do
      local r = helpers.run(("%s %s"):format(R, cmd))
      assert.are.equal(1, r.code, cmd)
      assert.are.equal(("resil-lua: '%s' is an option of the gateway: name the subcommand first, its options " ..
        "after it (resil-lua gateway %s ...)\n"):format(cmd:match("^(%S+)"), cmd:match("^(%S+)")), r.stderr, cmd)
    end
    -- a script that happens to have such a name still runs
    local dir = helpers.policy_dir({ check = "print('a script named check')\n" })
    local r = helpers.run(("cd %s && %s --log-level off check"):format(dir, R))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("a script named check\n", r.stdout)
  end)

  it("refuses a gateway --listen that is no host:port on one line, without the gateway's traceback", function()
    for _, listen in ipairs({ "foo", "127.0.0.1:99999", "127.0.0.1:", "localhost:http" }) do
      local r = helpers.run(("%s gateway --listen '%s' --store %s"):format(R, listen, helpers.tmpname(".db")))
      assert.are.equal(1, r.code, listen)
      assert.are.equal(("resil-lua: gateway: --listen wants host:port (a port from 0 to 65535), not '%s'\n")
        :format(listen), r.stderr) -- (was: the gateway's error, then "stack traceback:" and its frames)
    end
  end)

  it("says a mock scenario's mistake on one line, without the driver's traceback", function()
    local cases = {
      { "return {\n", ":2: unexpected symbol near <eof>" },
      { "local x = nil\nreturn { y = x.z }\n", ":2: attempt to index a nil value %(local 'x'%)" },
      { 'return { faults = { { route = "chat", kind = "garbagee", probability = 1 } } }',
        ": resil%.mock: unknown fault kind 'garbagee'" },
    }
    for _, c in ipairs(cases) do
      local scenario = helpers.write(helpers.tmpname(".lua"), c[1])
      local r = helpers.run(("timeout 10 %s mock %s"):format(R, scenario))
      assert.are.equal(1, r.code, r.stderr)
      assert.matches("^resil%-lua: " .. scenario:gsub("%p", "%%%0") .. c[2] .. "\n$", r.stderr)
    end
    local r = helpers.run(("timeout 10 %s mock /no/such/scenario.lua"):format(R))
    assert.are.equal("resil-lua: cannot open /no/such/scenario.lua: No such file or directory\n", r.stderr)
  end)

  it("check: an unknown option is bad usage, exit status 1 as for the other commands", function()
    local r = helpers.run(("%s check --strict"):format(R))
    assert.are.equal(1, r.code) -- (was 2)
    assert.matches("check: unknown option '%-%-strict'", r.stderr)
  end)
end)
