-- A pipeline's async jobs across its resumes: the provider is our mock in a
-- process of its own (it outlives each run of the pipeline), the pipeline a
-- real process run again as a user resumes it.
local resil = require "resil"
local helpers = require "spec.helpers"

local PIPELINE = [[
local resil = require "resil"
local jobs = require "policies.jobs"
jobs.configure("replicate", { base_url = arg[1] .. "/v1", api_key = "r8_test_000000",
  poll = { first = 0.01, max = 0.05 } })
local out, err = resil.step("still", function()
  return jobs.job({ model = "replicate/black-forest-labs/flux-schnell", input = { prompt = "a lighthouse" } })
end)
print(out and out.status, err and err.kind)
]]

describe("a step whose jobs the provider lost, every attempt of them", function()
  local mock_pid, url

  setup(function()
    -- the provider forgets the first two jobs it makes (an outage), then works
    local scenario = helpers.write(helpers.tmpname(".lua"),
      'return { jobs = { polls = 1, fates = { "lost", "lost", "succeeded" } } }')
    local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, scenario, out, pidfile))
    mock_pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") end, 10))
    url = helpers.slurp(out):match("(http://%S+)")
  end)

  teardown(function()
    if mock_pid then os.execute("kill " .. mock_pid) end
  end)

  local function mock_stats()
    local r = helpers.run(("%s -e 'print(require(\"resil\").http.request({ url = \"%s/__mock/stats\" }).body)'")
      :format(helpers.resil, url))
    return resil.json.decode(r.stdout)
  end

  it("fails its run, and the resumed run makes a new job instead of failing on the lost ones for good", function()
    local db = helpers.tmpname(".db")
    local opts = ("--store %s --run lost --log-level off"):format(db)
    local first = helpers.run_script(PIPELINE, opts, url)
    assert.are.equal("nil\tjob_lost\n", first.stdout, first.stderr)
    -- (before: "nil job_lost" at every resume, the lost jobs' records read again and nothing else tried)
    local resumed = helpers.run_script(PIPELINE, opts, url)
    assert.are.equal("succeeded\tnil\n", resumed.stdout, resumed.stderr)
    assert.are.equal(3, mock_stats().routes.predictions) -- two lost, one made by the resumed run
    assert.matches("lost%s+done%s", helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout)
    -- a third run replays the step: no job made
    assert.are.equal("succeeded\tnil\n", helpers.run_script(PIPELINE, opts, url).stdout)
    assert.are.equal(3, mock_stats().routes.predictions)
  end)
end)

-- The provider fails jobs: the first two made, then (with `slow`) the second only after some reads
local function mock_with(fates)
  local scenario = helpers.write(helpers.tmpname(".lua"), ("return { jobs = { polls = 1, fates = %s } }"):format(fates))
  local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
  os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, scenario, out, pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") end, 10))
  local url = helpers.slurp(out):match("(http://%S+)")
  local function predictions()
    local r = helpers.run(("%s -e 'print(require(\"resil\").http.request({ url = \"%s/__mock/stats\" }).body)'")
      :format(helpers.resil, url))
    return resil.json.decode(r.stdout).routes.predictions or 0
  end
  return url, function() os.execute("kill " .. pid) end, predictions
end

describe("a step whose jobs all failed (the provider said so), resumed", function()
  local url, stop, predictions
  setup(function() url, stop, predictions = mock_with('{ "failed", "failed", "succeeded" }') end)
  teardown(function() if stop then stop() end end)

  it("makes jobs of its own: the earlier call's failed jobs are not its attempts", function()
    local db = helpers.tmpname(".db")
    local opts = ("--store %s --run failed --log-level off"):format(db)
    local first = helpers.run_script(PIPELINE, opts, url)
    assert.are.equal("nil\tjob_failed\n", first.stdout, first.stderr)
    assert.are.equal(2, predictions())
    -- (before: "nil job_failed" at every resume, the two failed jobs read again as its attempts and none made)
    local resumed = helpers.run_script(PIPELINE, opts, url)
    assert.are.equal("succeeded\tnil\n", resumed.stdout, resumed.stderr)
    assert.are.equal(3, predictions())
    assert.are.equal("succeeded\tnil\n", helpers.run_script(PIPELINE, opts, url).stdout) -- replayed
    assert.are.equal(3, predictions())
  end)
end)

describe("a step killed (kill -9) while its second job runs, the first failed", function()
  local url, stop, predictions
  setup(function() url, stop, predictions = mock_with('{ "failed", { "failed", polls = 60 }, "succeeded" }') end)
  teardown(function() if stop then stop() end end)

  it("resumed, follows that job as the call's last attempt: the crash is no attempt, the failure is", function()
    local db = helpers.tmpname(".db")
    local opts = ("--store %s --run killed --log-level off"):format(db)
    local pid, out = helpers.start(PIPELINE, opts, url)
    assert(helpers.wait_until(function() return predictions() == 2 end, 30), helpers.slurp(out))
    os.execute("kill -KILL " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    local resumed = helpers.run_script(PIPELINE, opts, url)
    assert.are.equal("nil\tjob_failed\n", resumed.stdout, resumed.stderr)
    assert.are.equal(2, predictions()) -- the second job followed to its end, no third beside it
    -- its call ended failing: the next resume tries again
    assert.are.equal("succeeded\tnil\n", helpers.run_script(PIPELINE, opts, url).stdout)
    assert.are.equal(3, predictions())
  end)
end)

describe("two copies of a pipeline making the same job (one key) at the same moment", function()
  local url, stop, predictions
  setup(function() url, stop, predictions = mock_with('{ { "succeeded", polls = 4 } }') end)
  teardown(function() if stop then stop() end end)

  it("make it once, follow it both, and record it once, in the ledger and the budget", function()
    local db = helpers.tmpname(".db")
    local outputs = helpers.run_together(2, ([[
local resil = require "resil"
local jobs = require "policies.jobs"
jobs.configure("replicate", { base_url = %q .. "/v1", api_key = "r8_test_000000", poll = { first = 0.01, max = 0.05 } })
resil.budget("posters", { limit = 10 })
local r, err = jobs.job({ model = "replicate/black-forest-labs/flux-schnell", input = { prompt = "a lighthouse" },
  key = "poster-1", budget = "posters" })
print(r and r.id, err)
]]):format(url), ("--store %s --log-level off"):format(db))
    assert.are.equal(outputs[1], outputs[2])
    assert.matches("^mock%w+\t", outputs[1])
    assert.are.equal(1, predictions())
    resil.store_config({ url = db })
    local rows = resil.cost.breakdown("model")
    assert.are.same({ 1, 0.003 }, { rows[1].calls, rows[1].usd })
    local st = resil.budget("posters", { limit = 10 }):state()
    assert.are.same({ 0.003, 0, 0 }, { st.spent, st.reserved, #st.holds })
  end)
end)

-- A proxy in front of the provider answers a create 502 after the provider made the job (the mock's
-- `made = true`), and the run is resumed
local function mock_scenario(text)
  local scenario = helpers.write(helpers.tmpname(".lua"), text)
  local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
  os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, scenario, out, pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") end, 10))
  local url = helpers.slurp(out):match("(http://%S+)")
  local function stats()
    local r = helpers.run(("%s -e 'print(require(\"resil\").http.request({ url = \"%s/__mock/stats\" }).body)'")
      :format(helpers.resil, url))
    return resil.json.decode(r.stdout)
  end
  return url, function() os.execute("kill " .. pid) end, stats
end

describe("a job's create answered 502 or 504 by a proxy after the provider made the job, resumed", function()
  local stops = {}
  teardown(function() for _, stop in ipairs(stops) do stop() end end)

  -- (before: the create was sent again at the resume, and a second job was made and paid)
  for _, status in ipairs({ 502, 504 }) do
    it(("Replicate (%d): the resumed run finds the job made and follows it, no second one made"):format(status),
      function()
        local url, stop, stats = mock_scenario(("return { jobs = { polls = 1, errors = { predictions = " ..
          "{ { status = %d, made = true } } } } }"):format(status))
        stops[#stops + 1] = stop
        local db = helpers.tmpname(".db")
        local opts = ("--store %s --run proxy%d --log-level off"):format(db, status)
        local script = PIPELINE:gsub("print%(out and out.status, err and err.kind%)",
          "print(out and out.status, out and out.id, err and err.status)")
        local first = helpers.run_script(script, opts, url)
        assert.are.equal(("nil\tnil\t%d\n"):format(status), first.stdout, first.stderr)
        local resumed = helpers.run_script(script, opts, url)
        assert.matches("^succeeded\tmock%w+00001\tnil\n$", resumed.stdout, resumed.stderr)
        local st = stats()
        assert.are.same({ 1, 1 }, { st.routes.predictions, st.billed.jobs })
        -- a third run replays the step: nothing sent
        assert.are.equal(resumed.stdout, helpers.run_script(script, opts, url).stdout)
        assert.are.equal(1, stats().routes.predictions)
      end)
  end

  it("Replicate: a create the proxy answered 502 without the job made is sent again at the resume, once", function()
    local url, stop, stats = mock_scenario("return { jobs = { polls = 1, errors = { predictions = { 502 } } } }")
    stops[#stops + 1] = stop
    local db = helpers.tmpname(".db")
    local opts = ("--store %s --run proxy-none --log-level off"):format(db)
    assert.are.equal("nil\tserver_error\n", helpers.run_script(PIPELINE, opts, url).stdout)
    local resumed = helpers.run_script(PIPELINE, opts, url)
    assert.are.equal("succeeded\tnil\n", resumed.stdout, resumed.stderr)
    assert.are.same({ 2, 1 }, { stats().routes.predictions, stats().billed.jobs })
  end)

  it("fal (no way to list its jobs): the resumed run makes no second job and says why", function()
    local url, stop, stats = mock_scenario("return { jobs = { polls = 1, errors = { fal_submit = { 504 } } } }")
    stops[#stops + 1] = stop
    local db = helpers.tmpname(".db")
    local opts = ("--store %s --run proxy-fal"):format(db)
    local script = [[
local resil = require "resil"
local jobs = require "policies.jobs"
jobs.configure("fal", { base_url = arg[1] .. "/fal", api_key = "fal_test_000000", poll = { first = 0.01, max = 0.05 } })
local out, err = resil.step("still", function()
  return jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a lighthouse" } })
end)
print(out and out.status, err and (err.kind or err.class))
if err and err.kind == "job_unsure" then print(err.message) end
]]
    assert.are.equal("nil\tserver_error\n", helpers.run_script(script, opts .. " --log-level off", url).stdout)
    local resumed = helpers.run_script(script, opts .. " --log-level off", url)
    assert.matches("^nil\tjob_unsure\n", resumed.stdout, resumed.stderr)
    assert.matches("answered HTTP 504, after which the provider may have made the job", resumed.stdout)
    assert.are.equal(1, stats().routes.fal_submit)
  end)
end)
