-- Store throughput. "sqlite PATH": durable checkpoints per second from 64
-- concurrent tasks on SQLite (WAL, each write synced before its task goes on), with group commit and
-- with one commit per checkpoint, in the same run. "redis URL": operations
-- per second for once (claim + finish), budget reserve and shared GCRA.
-- Prints one line per figure: "name ops seconds ops_per_s".
local resil = require "resil"
resil.log.level("error")

local mode, where = arg[1], arg[2]
local TASKS = 64

local function run_tasks(per_task, fn)
  local t0 = resil.clock.wall()
  local tasks = {}
  for t = 1, TASKS do
    tasks[t] = resil.spawn(function()
      for i = 1, per_task do fn(t, i) end
    end)
  end
  for t = 1, TASKS do assert(tasks[t]:join()) end
  return resil.clock.wall() - t0
end

local function report(name, ops, seconds)
  print(("%s %d %.3f %.0f"):format(name, ops, seconds, ops / seconds))
end

if mode == "sqlite" then
  for _, group in ipairs({ true, false }) do
    local path = ("%s-%s.db"):format(where, group and "group" or "single")
    os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
    local s = assert(resil.store(path, { group_commit = group }))
    local per_task = group and 200 or 20
    local payload = resil.json.encode({ n = 1, v = { { text = ("x"):rep(200) } } })
    local seconds = run_tasks(per_task, function(t, i)
      assert(debug.getregistry()["resil.private"].backend_of[s]:step_put("bench", tostring(t), i, "step", payload, resil.store_now()))
    end)
    report(group and "checkpoints_group_commit" or "checkpoints_one_commit_each", TASKS * per_task, seconds)
  end
  -- a budget's reserve and settle, sequential, once its period has 1,000 rows and again at 20,000:
  -- the same cost (the spend is a kept total, not the period's rows summed each time)
  local path = where .. "-budget.db"
  os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
  resil.store_config({ url = path })
  local b = resil.budget("bench-budget", { limit = 1e9, per = "day" })
  local done = 0
  for _, rows in ipairs({ 1000, 20000 }) do
    while done < rows do
      assert(b:reserve(0.001)):settle(0.0005, { provider = "bench", model = "m" })
      done = done + 1
    end
    local t0, n = resil.clock.wall(), 500
    for _ = 1, n do assert(b:reserve(0.001)):settle(0.0005, { provider = "bench", model = "m" }) end
    done = done + n
    report(("budget_reserve_settle_after_%d_rows"):format(rows), n, resil.clock.wall() - t0)
  end
elseif mode == "redis" then
  resil.store_config({ url = where })
  local s = assert(resil.store())
  local per_task = 50
  report("redis_once", TASKS * per_task, run_tasks(per_task, function(t, i)
    assert(resil.once(("bench:%d:%d:%f"):format(t, i, resil.clock.wall()), function() return i end))
  end))
  local b = resil.budget("bench-budget", { limit = 1e12 })
  report("redis_budget_reserve", TASKS * per_task, run_tasks(per_task, function() assert(b:reserve(0.01)) end))
  local g = resil.bucket("bench-gcra", { rate = 1e9, per = 1, burst = 1e9, shared = true })
  report("redis_gcra_take", TASKS * per_task, run_tasks(per_task, function() assert(g:try(1)) end))
  assert(s:stats())
end
