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

-- What the README shows as commands and files to copy, taken from the README itself (a spec's
-- own copy of them stays true when the README's changes).
describe("the README's commands, as written", function()
  local resil = require "resil"
  local readme = helpers.slurp((os.getenv("RESIL_HOME") or ".") .. "/README.md")

  it("runs the demo in the sandbox with the command the option table gives", function()
    local cmd = assert(readme:match("`resil%-lua (%-%-sandbox %-%-sandbox%-dir examples examples/pipeline%.lua)`"))
    local r = run(cmd)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("12 done, 0 failed", r.stdout)
  end)

  it("serves a standalone mock's /metrics at :PORT, as the Metrics section's command does", function()
    local cmd = assert(readme:match("\n(resil%-lua mock scenario%.lua %-%-port 8080 %-%-metrics%-addr :9464)\n"))
    local port, mport = helpers.free_port(), helpers.free_port()
    local scenario = helpers.write(helpers.tmpname("-scenario.lua"), "return {}\n")
    local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    cmd = cmd:gsub("^resil%-lua", helpers.resil):gsub("scenario%.lua", scenario):gsub("8080", port):gsub("9464", mport)
    os.execute(("%s > %s 2>&1 & echo $! > %s"):format(cmd, out, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") ~= nil end, 10), helpers.slurp(out))
    local metrics = resil.http.request({ url = ("http://127.0.0.1:%d/metrics"):format(mport) })
    assert.are.equal(200, metrics and metrics.status, helpers.slurp(out))
    local models = resil.http.request({ url = ("http://127.0.0.1:%d/v1/models"):format(port) })
    assert.are.equal(200, models and models.status, helpers.slurp(out))
  end)

  it("checks the registry the README shows (policies/models.lua) without an error", function()
    local registry = assert(readme:match("```lua\n%-%- policies/models%.lua\n(.-)```"))
    local project = helpers.tmpname("-project")
    assert(os.execute("mkdir -p " .. project .. "/policies"))
    helpers.write(project .. "/policies/models.lua", registry)
    local r = helpers.run(("cd %s && %s check"):format(project, helpers.resil))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\n0 errors, %d+ warnings?\n$", "\n" .. r.stdout)
  end)

  -- the Gateway section's key and config, against the mock (the config's providers pointed at it)
  it("serves a key made by its `keys add` line through its gateway.lua, to the models the key names", function()
    local keys_add = assert(readme:match("\n(resil%-lua keys add %-%-name team%-a [^\n]-)\n"))
    local config = assert(readme:match("```lua\n(%-%- gateway%.lua: .-)```"))
    local m = assert(resil.mock.start({}))
    finally(function() m:stop() end)
    config = ('require("policies.ai").configure("anthropic", { base_url = %q, api_key = "sk-ant-test-123456" })\n')
      :format(m.url) .. config:gsub('ai%.configure%("openai", {',
        ('ai.configure("openai", { base_url = %q, api_key = "sk-test-123456",'):format(m.url .. "/v1"), 1)
    local store, path = helpers.tmpname(".db"), helpers.write(helpers.tmpname("-gateway.lua"), config)
    local made = helpers.run(("%s --store %s"):format(keys_add:gsub("^resil%-lua", helpers.resil), store))
    assert.are.equal(0, made.code, made.stderr)
    local key = assert(made.stdout:match("^(sk%-resil%-%S+)\n$"), made.stdout)
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("env -u RESIL_METRICS_KEY %s gateway --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, path, store, log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_listening(port), helpers.slurp(log))
    local function chat(model)
      return assert(resil.http.request({ url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
        headers = { authorization = "Bearer " .. key },
        json = { model = model, messages = { { role = "user", content = "hi" } } } }))
    end
    local fast, best, other = chat("team-fast"), chat("team-best"), chat("gpt-4o")
    assert.are.equal(200, fast.status, fast.body .. helpers.slurp(log))
    assert.are.equal("openai", fast.headers["x-resil-provider"])
    assert.are.equal(200, best.status, best.body)
    assert.are.equal("claude-sonnet-4-5-20250929", best.headers["x-resil-model"])
    assert.are.equal(403, other.status, other.body) -- (--models team-fast,team-best)
    local nokey = assert(resil.http.request({ url = ("http://127.0.0.1:%d/v1/models"):format(port) }))
    assert.are.equal(401, nokey.status) -- auth = true
  end)
end)
