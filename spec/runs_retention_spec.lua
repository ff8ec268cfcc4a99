-- A run's checkpoints are kept until an operator lets them go: `resil-lua runs
-- forget ID` and `resil-lua runs prune --older-than AGE`, never a run a live
-- process holds. On SQLite and on a real redis-server.
local helpers = require "spec.helpers"

local function sh(cmd) return helpers.run(cmd) end

local pipeline = [[
local resil = require "resil"
resil.step("a", function() print("paid a") return 1 end)
resil.step("b", function()
  print("paid b")
  local hold = os.getenv("HOLD")
  if hold then
    io.stdout:flush()
    while not io.open(hold) do resil.sleep(0.05) end
  end
  return 2
end)
]]

for _, b in ipairs(helpers.store_backends()) do
  describe("runs forget and prune on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)

    -- (before: no command let a run go; its results, up to 32 MB a step, stayed for good)
    it("forget a run: its next start pays every step again; a held run is refused until its holder is gone",
      function()
        local url, script = b.url(), helpers.write(helpers.tmpname(".lua"), pipeline)
        local run = ("%s --store '%s' --log-level off --run ret-1 %s"):format(helpers.resil, url, script)
        local cli = function(args) return sh(("%s runs %s --store '%s'"):format(helpers.resil, args, url)) end
        assert.are.equal(0, sh(run).code)
        assert.are_not.matches("paid", sh(run).stdout) -- replayed
        local f = cli("forget ret-1")
        assert.are.equal(0, f.code, f.stderr)
        assert.matches("forgot run ret%-1", f.stdout)
        assert.are_not.matches("ret%-1", cli("").stdout)
        assert.matches("paid a\npaid b", sh(run).stdout)
        assert.matches("no run 'nope'", cli("forget nope").stderr)

        -- held: a process in step b
        local hold = helpers.tmpname(".go")
        local pid, out = helpers.start(pipeline:gsub('os.getenv%("HOLD"%)', ("%q"):format(hold)),
          ("--store '%s' --log-level off --run ret-3"):format(url))
        helpers.wait_until(function() return helpers.slurp(out):find("paid b") ~= nil end, 30)
        local refused = cli("forget ret-3")
        assert.are.equal(1, refused.code)
        assert.matches("run 'ret%-3' is held by pid " .. pid, refused.stderr)
        local dry = cli("prune --older-than 0s --dry-run")
        assert.matches("would forget ret%-1", dry.stdout)
        assert.are_not.matches("ret%-3", dry.stdout)
        local pruned = cli("prune --older-than 0s")
        assert.matches("kept 1 %(newer, or held", pruned.stdout, pruned.stderr)
        assert.matches("ret%-3", cli("").stdout)
        assert.are_not.matches("ret%-1", cli("").stdout)
        assert.matches("kept 1", cli("prune --older-than 1d").stdout)
        os.execute("kill -KILL " .. pid)
        helpers.wait_until(function() return not helpers.alive(pid) end, 10)
        assert.matches("forgot 1 run, kept 0", cli("prune --older-than 0s").stdout)
        assert.matches("%-%-older%-than takes an age", cli("prune --older-than soon").stderr)
      end)
  end)
end

describe("runs show of a forgotten run that paid for calls", function()
  it("gives its cost without saying that its script checkpointed nothing", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("a", function()
  resil.cost.record({ provider = "openai", model = "gpt-4o", operation = "chat", usd = 0.5 })
  return 1
end)
]], ("--store %s --run paid --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(0, sh(("%s runs forget paid --store %s"):format(helpers.resil, db)).code)
    local show = sh(("%s runs show paid --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr)
    -- (before: "(its script checkpointed nothing; nothing to resume)", of a script whose step was done)
    assert.are.equal("run paid: no steps recorded (its script checkpointed nothing, or the run was forgotten; " ..
      "nothing to resume); cost $0.500000\n", show.stdout)
  end)
end)

-- (before: a run another prune or a `runs forget` let go between this prune's list and its own
-- forget was counted as kept: two prunes at once said "forgot 6 runs" and "forgot 0 runs, kept 6
-- (newer, or held by a live process)", of six runs both had seen go)
describe("runs prune beside another prune", function()
  it("counts a run another process forgot meanwhile as neither forgotten nor kept", function()
    local db = helpers.tmpname(".db")
    for _, id in ipairs({ "old-1", "old-2" }) do
      local r = helpers.run_script('require("resil").step("a", function() return 1 end)',
        ("--store %s --run %s --log-level off"):format(db, id))
      assert.are.equal(0, r.code, r.stderr)
    end
    -- the other process's forget, at the moment between this prune's list and its forget
    local r = helpers.run_script([[
local resil = require "resil"
local s = resil.store()
local backend = debug.getregistry()["resil.private"].backend_of[s]
local forget = backend.run_forget
backend.run_forget = function(self, id, now)
  if id == "old-1" then assert(forget(self, id, now)) end -- (another prune's)
  return forget(self, id, now)
end
require("resil.commands")({ [0] = "runs", "prune", "--older-than", "0s" })
]], ("--store %s --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("forgot 1 run, kept 0 (newer, or held by a live process)\n", r.stdout)
  end)
end)
