-- The further examples each run with one command against the mock.
local helpers = require "spec.helpers"

local function run(args)
  return helpers.run(("%s --store %s --log-level off %s"):format(helpers.resil, helpers.tmpname(".db"), args))
end

describe("examples", function()
  it("chat_fallback: the alias falls back from OpenAI to Anthropic", function()
    local r = run("examples/chat_fallback.lua")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("^anthropic/claude%-haiku%-4%-5%-20251001 answered %(alias chat%-fast, after 1 fallback%)", r.stdout)
  end)

  it("job_deadline: a hung job is canceled at its deadline and made again", function()
    local r = run("examples/job_deadline.lua")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("succeeded after 2 attempts", r.stdout)
  end)

  it("migration_watch: editing the share under --watch moves the split", function()
    local dir = helpers.tmpname("")
    os.execute(("mkdir -p %s && cp examples/watch/models.lua %s/"):format(dir, dir))
    local pidfile, out = helpers.tmpname(".pid"), helpers.tmpname(".out")
    os.execute(("%s --store %s --watch --policies %s examples/migration_watch.lua 20 > %s 2>&1 & echo $! > %s"):format(
      helpers.resil, helpers.tmpname(".db"), dir, out, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    local ok, err = pcall(function()
      assert(helpers.wait_until(function() return helpers.slurp(out):match("new %d+%%") end, 10), helpers.slurp(out))
      assert.matches("^%s*1 s%s+old%s+%d+%s+new%s+%d+%s+%(new 2%d%%%)", helpers.slurp(out))
      helpers.write(dir .. "/models.lua", 'return { writer = { use = "openai/gpt-4o-mini-2024-07-18",\n' ..
        '  migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 1, sticky = "user" } } }\n')
      assert(helpers.wait_until(function() return helpers.slurp(out):match("old   0  new 200") end, 10),
        helpers.slurp(out))
    end)
    os.execute("kill " .. pid)
    helpers.wait_until(function() return not helpers.alive(pid) end, 5)
    os.execute("rm -rf " .. dir)
    assert(ok, err)
  end)
end)
