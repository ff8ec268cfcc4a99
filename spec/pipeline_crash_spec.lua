-- A pipeline as its user writes it (ai.chat under a budget, in resil.once in
-- resil.step, in resil.map items) killed with SIGKILL mid-call, again and
-- again, then run to its end: on SQLite and on a real redis-server, with the
-- mock provider in a process of its own that honours Idempotency-Key. Every
-- step's answer is paid once, the ledger and the budget's spend are what was
-- recorded for each answer, no hold outlives its owner, and a step that was
-- done never runs again.
local resil = require "resil"
local helpers = require "spec.helpers"

local SEED = tonumber(os.getenv("RESIL_SPEC_SEED") or "") or os.time()

local PIPELINE = [[
local resil = require "resil"
local ai = require "policies.ai"
local url, logpath = arg[1], arg[2]
resil.log.level("off")
ai.configure("openai", { base_url = url .. "/v1", api_key = "sk-test-123456", idempotency = true, retry = { base = 0.01 } })
local log = assert(io.open(logpath, "a"))
resil.budget("team", { limit = 10, per = "day", hold = 3600 })
io.stdout:write("started\n"); io.stdout:flush()
local items = {}
for i = 1, 4 do items[i] = i end
local _, failures = resil.map(items, function(i)
  for s = 1, 3 do
    resil.step("chat " .. s, function()
      log:write("start ", i, "/", s, "\n"); log:flush()
      return resil.once(("%s/%d/%d"):format(resil.run.id(), i, s), function()
        return assert(ai.chat({ model = "openai/gpt-4o-mini", budget = "team", max_tokens = 50,
          messages = { { role = "user", content = ("item %d step %d"):format(i, s) } } })).text
      end)
    end)
    log:write("done ", i, "/", s, "\n"); log:flush()
  end
end, { concurrency = 2 })
assert(not failures, failures and tostring(select(2, next(failures))))
print("finished")
]]

describe("a pipeline of ai.chat calls under a budget, killed (kill -9) mid-call and resumed", function()
  local mock_pid, url, redis

  setup(function()
    redis = helpers.redis_server()
    local scenario = helpers.write(helpers.tmpname(".lua"),
      "return { idempotency = true, latency = { min = 0.03, max = 0.08 }, seed = 5 }")
    local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, scenario, out, pidfile))
    mock_pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") end, 10))
    url = helpers.slurp(out):match("(http://%S+)")
  end)

  teardown(function()
    if mock_pid then os.execute("kill " .. mock_pid) end
    if redis then redis.stop() end
  end)

  local function mock_stats()
    local r = helpers.run(("%s -e 'print(require(\"resil\").http.request({ url = \"%s/__mock/stats\" }).body)'")
      :format(helpers.resil, url))
    return resil.json.decode(r.stdout)
  end

  for _, backend in ipairs({ "SQLite", "Redis" }) do
    it(("on %s: each answer paid and recorded once, the budget's spend the ledger's, no hold left (RESIL_SPEC_SEED=%d)")
      :format(backend, SEED), function()
      math.randomseed(SEED)
      local store = backend == "SQLite" and helpers.tmpname(".db") or redis.url()
      local run = "crash-" .. backend:lower()
      local log = helpers.tmpname(".log")
      local kills, finished = 0, false
      for launch = 1, 30 do
        local pid, out = helpers.start(PIPELINE, ("--store '%s' --run %s --log-level off"):format(store, run),
          url .. " " .. log)
        if helpers.kill_after_start(pid, out, launch <= 8 and 0.03 + math.random() * 0.2 or nil) then
          kills = kills + 1
        end
        local output = helpers.slurp(out)
        if output:match("finished") then finished = true break end
        if output:match("resil%-lua:") then error("the pipeline failed on its own: " .. output) end
      end
      assert.is_true(finished, "the pipeline never finished")
      assert.is_true(kills >= 1, "the test must actually kill runs")
      -- a step that was done never started again; every step was done
      local done = {}
      for line in io.lines(log) do
        local what, step = line:match("^(%a+) (%S+)$")
        if what == "done" then done[step] = true
        else assert.is_nil(done[step], "step " .. step .. " ran again after it was done") end
      end
      local steps = 0
      for _ in pairs(done) do steps = steps + 1 end
      assert.are.equal(12, steps)
      -- the provider billed each step's key once; the mock's other keys are other tests'
      local s = mock_stats()
      for i = 1, 4 do
        for step = 1, 3 do
          local key = ("%s/%d/%d"):format(run, i, step)
          assert.are.equal(1, s.paid_keys[key], "key " .. key .. " paid " .. tostring(s.paid_keys[key]) .. " times")
        end
      end
      -- the ledger has the 12 answers once each, and the budget spent just that and holds nothing
      local rows = resil.json.decode(helpers.run(("%s costs --run %s --by model --json --store '%s'")
        :format(helpers.resil, run, store)).stdout)
      assert.are.equal(1, #rows)
      assert.are.equal(12, rows[1].calls)
      local team = resil.json.decode(helpers.run(("%s budgets --json --store '%s'"):format(helpers.resil, store)).stdout)[1]
      assert.are.equal("team", team.name)
      assert.are.equal(0, team.reserved)
      assert.are.same({}, team.holds)
      assert.is_true(math.abs(team.spent - rows[1].usd) < 1e-9, ("spent %s, ledger %s"):format(team.spent, rows[1].usd))
    end)
  end
end)
