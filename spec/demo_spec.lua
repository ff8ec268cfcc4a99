-- The demo (examples/pipeline.lua, `make demo`): what it prints agrees with
-- the ledger (`resil-lua costs`) and the checkpoints (`resil-lua runs`); a
-- re-run resumes and pays nothing.
local resil = require "resil"
local helpers = require "spec.helpers"

local ITEMS = 6

describe("the demo pipeline", function()
  local store, first, second, fresh, costs, runs
  setup(function()
    store = helpers.tmpname(".db")
    local cmd = ("%s --store %s %%s examples/pipeline.lua %d"):format(helpers.resil, store, ITEMS)
    first = helpers.run(cmd:format(""))
    -- what the commands say after the first run
    costs = helpers.run(("%s costs --json --store %s"):format(helpers.resil, store))
    local run = first.stdout:match("for run (%S+) since")
    runs = helpers.run(("%s runs show %s --store %s"):format(helpers.resil, tostring(run), store))
    second = helpers.run(cmd:format(""))
    fresh = helpers.run(cmd:format("--fresh"))
  end)
  teardown(function() os.execute(("rm -f %s %s-wal %s-shm"):format(store, store, store)) end)

  local function paid_line(out)
    local paid, ledger, run = out:match("paid%s+%$([%d.]+) in this process; ledger %$([%d.]+) for run (%S+) since")
    return tonumber(paid), tonumber(ledger), run
  end

  it("finishes every item and shows the faults it met", function()
    assert.are.equal(0, first.code, first.stderr)
    assert.matches(("%d done, 0 failed"):format(ITEMS), first.stdout)
    assert.matches("script%s+anthropic%s+0%s+overloaded=%d", first.stdout)      -- the outage
    assert.matches("breaker%s+anthropic opened 1 time", first.stdout)
    assert.matches("rate_limited=3", first.stdout)                               -- the 429 burst
    assert.matches("hung jobs%s+canceled at their deadline and made again: %S+ %S+: 1", first.stdout)
    assert.matches("sunset%s+openai/gpt%-4o%-2024%-05%-13 %-> openai/gpt%-4o%-2024%-08%-06", first.stdout)
    assert.matches("migration%s+prompter .*: ROLLED BACK %(invalid_output", first.stdout)
  end)

  it("prints totals equal to the ledger's, per row and in all", function()
    local paid, ledger = paid_line(first.stdout)
    local micro = 0
    for line in first.stdout:gmatch("[^\n]+") do
      local usd = line:match("%$([%d.]+)$")
      if usd and not line:match("^TOTAL") then micro = micro + math.floor(tonumber(usd) * 1e6 + 0.5) end
    end
    assert.are.equal(math.floor(paid * 1e6 + 0.5), micro)
    assert.are.equal(paid, ledger)
    assert.are.equal(ledger, tonumber(("%.6f"):format(resil.json.decode(costs.stdout).usd)))
    -- and `resil-lua runs show`: every step done, the same retries and cost
    local steps = select(2, runs.stdout:gsub("\n%d+%s+%d+%s+[^\n]-%s+done%s", ""))
    assert.are.equal(ITEMS * 8, steps, runs.stdout) -- script, title, 2 prompts, still, thumbnail, video, narration
    local retries, cost = runs.stdout:match("; (%d+) retries; cost %$([%d.]+)")
    local total_retries, total_usd = first.stdout:match("TOTAL%s+%d+%s+(%d+)%s+%d+%s+%$([%d.]+)")
    assert.are.equal(tonumber(retries), tonumber(total_retries), runs.stdout .. first.stdout)
    assert.are.equal(tonumber(cost), tonumber(total_usd))
  end)

  it("resumes when run again and pays nothing", function()
    assert.are.equal(0, second.code, second.stderr)
    assert.matches("resumed", second.stdout)
    local paid, ledger = paid_line(second.stdout)
    assert.are.equal(0, paid)
    assert.are.equal(0, ledger) -- since this process started
    assert.matches("; %$" .. ("%.6f"):format(select(2, paid_line(first.stdout))):gsub("%.", "%%.") .. " in all",
      second.stdout)
  end)

  it("starts over with --fresh: new jobs (not the first run's, which the mock no longer knows), paid again", function()
    assert.are.equal(0, fresh.code, fresh.stderr)
    assert.matches(("%d done, 0 failed"):format(ITEMS), fresh.stdout)
    local paid, ledger = paid_line(fresh.stdout)
    assert.is_true(paid > 0)
    assert.are.equal(paid, ledger)
  end)
end)
