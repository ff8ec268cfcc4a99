-- kill -9 during a 20-step pipeline, at random points, many times: every
-- resumed run completes, done steps never run again, the provider is paid
-- once per step, the ledger equals what the provider billed, and the
-- database checks out intact. Real processes; the mock provider runs in its
-- own process and honours Idempotency-Key, as the providers that close the
-- crash window do.
local resil = require "resil"
local helpers = require "spec.helpers"

local TRIALS = tonumber(os.getenv("CRASH_TRIALS") or "8")
-- the kill points are random; RESIL_SPEC_SEED=n replays a failing sequence
local SEED = tonumber(os.getenv("RESIL_SPEC_SEED") or "") or os.time()

local pipeline = [[
local resil = require "resil"
local call = require "policies.call"
local url, logpath = arg[1], arg[2]
io.stdout:write("started\n"); io.stdout:flush()
local log = assert(io.open(logpath, "a"))
local provider = call.provider("crash-mock", {
  request = { method = "POST", url = url .. "/v1/chat/completions" },
  timeout = 5, validate = "chat", idempotency = true, retry = { base = 0.01 },
})
for i = 1, 20 do
  resil.step("call " .. i, function()
    log:write("start ", i, "\n"); log:flush()
    return resil.once(resil.run.id() .. "/" .. i, function()
      local res = assert(provider({ json = { model = "m", messages = { { role = "user", content = "step " .. i } } } }))
      local body = resil.json.decode(res.body)
      local usage = body.usage
      -- the response id: an answer the provider replays after a crash is not a second cost
      resil.cost.record({ provider = "mock", model = "m", id = body.id,
        usd = (usage.prompt_tokens * 0.0005 + usage.completion_tokens * 0.0015) / 1000 })
      return usage.total_tokens
    end)
  end)
  log:write("done ", i, "\n"); log:flush()
end
print("finished")
]]

describe("crash safety (kill -9)", function()
  local mock_pid, url, db

  setup(function()
    local scenario = helpers.write(helpers.tmpname(".lua"),
      "return { idempotency = true, latency = { min = 0.02, max = 0.04 }, seed = 11 }")
    local out
    mock_pid, out = nil, helpers.tmpname(".out")
    local pidfile = helpers.tmpname(".pid")
    os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, scenario, out, pidfile))
    mock_pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") end, 10))
    url = helpers.slurp(out):match("(http://%S+)")
    db = helpers.tmpname(".db")
  end)

  teardown(function()
    if mock_pid then os.execute("kill " .. mock_pid) end
  end)

  it(("every resumed run completes and nothing is paid twice (%d trials, RESIL_SPEC_SEED=%d)"):format(TRIALS, SEED),
    function()
    local kills = 0
    math.randomseed(SEED)
    for trial = 1, TRIALS do
      local log = helpers.tmpname(".log")
      local finished = false
      for launch = 1, 40 do
        local pid, out = helpers.start(pipeline, ("--store %s --run trial-%d --log-level off"):format(db, trial),
          url .. " " .. log)
        -- (the last launches run to the end: the kills are the first 30)
        local delay = launch <= 30 and 0.03 + math.random() * 0.3 or nil
        if helpers.kill_after_start(pid, out, delay) then kills = kills + 1 end
        local output = helpers.slurp(out)
        if output:match("finished") then
          finished = true
          break
        end
        if output:match("resil%-lua:") then error("the pipeline failed on its own: " .. output) end
      end
      assert.is_true(finished, "trial " .. trial .. " did not finish in 40 launches")
      -- a step that was done never started again
      local done_at = {}
      local n = 0
      for line in io.lines(log) do
        n = n + 1
        local what, i = line:match("^(%a+) (%d+)$")
        if what == "done" then done_at[i] = done_at[i] or n
        elseif what == "start" then assert.is_nil(done_at[i], "step " .. i .. " ran again after it was done") end
      end
      for i = 1, 20 do assert.is_not_nil(done_at[tostring(i)], "step " .. i .. " never completed") end
    end
    assert.is_true(kills >= TRIALS, "the test must actually kill runs")

    -- what the provider saw and billed
    local stats = helpers.run(("%s -e 'local r = require(\"resil\"); local res = r.http.request({ url = \"%s/__mock/stats\" }); print(res.body)'")
      :format(helpers.resil, url))
    local s = resil.json.decode(stats.stdout)
    local keys = 0
    for key, paid in pairs(s.paid_keys) do
      keys = keys + 1
      assert.are.equal(1, paid, "key " .. key .. " was paid " .. paid .. " times")
    end
    assert.are.equal(20 * TRIALS, keys)

    local costs = helpers.run(("%s costs --json --store %s"):format(helpers.resil, db))
    local ledger = resil.json.decode(costs.stdout).usd
    assert.is_true(math.abs(ledger - s.billed.usd) < 1e-6 * 20 * TRIALS,
      ("ledger $%.6f, billed $%.6f"):format(ledger, s.billed.usd))

    local check = helpers.run_script("print(debug.getregistry()['resil.private'].backend_of[require('resil').store()]" ..
      ":integrity_check())",
      "--store " .. db .. " --log-level off")
    assert.are.equal("ok\n", check.stdout)
  end)
end)
