-- The Redis store on a bad day, as production has them: a run ending with many steps in flight,
-- hostile bytes through the store API, a server frozen, killed, restarted or refusing (BUSY,
-- LOADING, READONLY) in the middle of a write. A real redis-server started for this file.
local resil = require "resil"
local helpers = require "spec.helpers"

local redis

setup(function()
  resil.clock.real() -- other processes share these keys: store time must be real time
  redis = helpers.redis_server()
end)

teardown(function() redis.stop() end)

describe("a run on Redis that ends with many steps in flight", function()
  -- (before: each step cut short was two arguments of one command, which takes at most 64: past 28
  -- steps the end was never recorded, the run stayed "running (gone)", and the script's end said
  -- "recording the run's end: ... redis: at most 64 arguments")
  it("is recorded as ended, each step cut short named pending", function()
    local url = redis.url()
    local r = helpers.run_script([[
local resil = require "resil"
for i = 1, 40 do resil.spawn(resil.step, "s" .. i, function() resil.sleep(30) end) end
resil.sleep(0.2)
error("the main chunk fails with 40 steps in flight")
]], "--store " .. url .. " --run many-in-flight --log-level off")
    assert.are.equal(1, r.code)
    assert.not_matches("recording the run's end", r.stderr)
    resil.store_config({ url = url })
    local backend = resil.store().backend
    local run = assert(backend:run_get("many-in-flight"))
    assert.are.equal("failed", run.status)
    local pending = 0
    for _, step in ipairs(assert(backend:run_steps("many-in-flight"))) do
      if step.state == "pending" then pending = pending + 1 end
    end
    assert.are.equal(40, pending)
  end)
end)
