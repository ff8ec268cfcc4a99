-- The demo (examples/pipeline.lua, `make demo`): what it prints agrees with
-- the ledger (`resil-lua costs`) and the checkpoints (`resil-lua runs`); a
-- re-run resumes and pays nothing.
local resil = require "resil"
local helpers = require "spec.helpers"

local ITEMS = 6

describe("the demo pipeline", function()
  local store, first, second
  setup(function()
    store = helpers.tmpname(".db")
    local cmd = ("%s --store %s examples/pipeline.lua %d"):format(helpers.resil, store, ITEMS)
    first = helpers.run(cmd)
    second = helpers.run(cmd)
  end)
  teardown(function() os.execute(("rm -f %s %s-wal %s-shm"):format(store, store, store)) end)

  local function paid_line(out)
    local paid, ledger, run = out:match("paid%s+%$([%d.]+) in this process; ledger %$([%d.]+) for run (%S+)")
    return tonumber(paid), tonumber(ledger), run
  end

  it("finishes every item and shows the faults it met", function()
    assert.are.equal(0, first.code, first.stderr)
    assert.matches(("%d done, 0 failed"):format(ITEMS), first.stdout)
    assert.matches("script%s+anthropic%s+0%s+overloaded=%d", first.stdout)      -- the outage
    assert.matches("breaker%s+anthropic opened 1 time", first.stdout)
    assert.matches("rate_limited=3", first.stdout)                               -- the 429 burst
    assert.matches("job_remade=1", first.stdout)                                 -- the hung job
    assert.matches("sunset%s+openai/gpt%-4o%-2024%-05%-13 %-> openai/gpt%-4o%-2024%-08%-06", first.stdout)
    assert.matches("migration%s+prompter .*: ROLLED BACK %(invalid_output", first.stdout)
  end)

  it("prints totals equal to the ledger's, per row and in all", function()
    local paid, ledger, run = paid_line(first.stdout)
    local micro = 0
    for usd in first.stdout:gmatch("%$([%d.]+)\n") do micro = micro + math.floor(tonumber(usd) * 1e6 + 0.5) end
    assert.are.equal(math.floor(paid * 1e6 + 0.5), micro)
    assert.are.equal(paid, ledger)
    local costs = helpers.run(("%s costs --json --store %s"):format(helpers.resil, store))
    assert.are.equal(ledger, tonumber(("%.6f"):format(resil.json.decode(costs.stdout).usd)))
    local runs = helpers.run(("%s runs show %s --store %s"):format(helpers.resil, run, store))
    local steps = select(2, runs.stdout:gsub("\n", "")) - 1
    assert.are.equal(ITEMS * 8, steps) -- script, title, 2 prompts, still, thumbnail, video, narration
  end)

  it("resumes when run again and pays nothing", function()
    assert.are.equal(0, second.code, second.stderr)
    assert.matches("resumed", second.stdout)
    local paid, ledger = paid_line(second.stdout)
    assert.are.equal(0, paid)
    assert.are.equal(select(2, paid_line(first.stdout)), ledger)
  end)
end)
