-- resil.map's progress (opts.progress = label) on stderr: items done and
-- failed, the cost recorded so far, retries by class and the breakers that
-- are not closed. One line redrawn on a terminal (a real pseudo-terminal,
-- through util-linux's `script`); plain lines at each tenth elsewhere.
local helpers = require "spec.helpers"

-- Ten items on the virtual clock, finishing in order: each costs $0.001 x i;
-- items 4 and 8 retry a timeout once; item 5 fails (opening the breaker,
-- which needs one call) and item 10 fails too.
local pipeline = [[
local resil = require "resil"
local retry = require "policies.retry"
local br = resil.breaker("openai", { failure_rate = 0.5, min_calls = 1, window = 30, open_for = 300 })
resil.map({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, function(i)
  resil.sleep(i)
  resil.cost.record{ provider = "openai", model = "m", usd = 0.001 * i }
  if i == 5 then return br:call(function() return nil, resil.error("timeout", "slow") end) end
  if i == 10 then error("item 10 gave up") end
  return retry.call(function(attempt)
    if i % 4 == 0 and attempt < 2 then return nil, resil.error("timeout", "slow") end
    return i
  end, { provider = "mock", max_retries = 1 })
end, { progress = "captions", concurrency = 10 })
print("finished")
]]

local function run_script(wrap)
  local script = helpers.write(helpers.tmpname(".lua"), pipeline)
  local cmd = ("%s --virtual-clock --log-level off --store '%s' %s"):format(helpers.resil, helpers.tmpname(".db"),
    script)
  return helpers.run(wrap and wrap(cmd) or cmd)
end

describe("resil.map progress when stderr is not a terminal", function()
  it("writes a plain line at each tenth of the items with failures, cost, retries and breakers", function()
    local r = run_script()
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("finished\n", r.stdout)
    assert.are.equal(table.concat({
      "captions: 1/10, $0.0010",
      "captions: 2/10, $0.0030",
      "captions: 3/10, $0.0060",
      "captions: 4/10, $0.0100, 1 retry (timeout 1)",
      "captions: 5/10, 1 failed, $0.0150, 1 retry (timeout 1), breaker openai open",
      "captions: 6/10, 1 failed, $0.0210, 1 retry (timeout 1), breaker openai open",
      "captions: 7/10, 1 failed, $0.0280, 1 retry (timeout 1), breaker openai open",
      "captions: 8/10, 1 failed, $0.0360, 2 retries (timeout 2), breaker openai open",
      "captions: 9/10, 1 failed, $0.0450, 2 retries (timeout 2), breaker openai open",
      "captions: 10/10, 2 failed, $0.0550, 2 retries (timeout 2), breaker openai open",
    }, "\n") .. "\n", r.stderr)
  end)
end)

describe("resil.map progress on a terminal", function()
  if helpers.run("command -v script").code ~= 0 then
    it("skipped: util-linux's script is not installed", function() print("# progress_spec: no pseudo-terminal") end)
    return
  end

  it("redraws one line and ends it with the final figures", function()
    -- script gives the command a pseudo-terminal; what it wrote comes back on stdout
    local r = run_script(function(cmd) return ("script -q -e -c %q /dev/null"):format(cmd) end)
    assert.are.equal(0, r.code, r.stderr)
    local out = r.stdout:gsub("\r\n", "\n") -- the terminal turns \n into \r\n
    assert.not_matches("captions: ", out) -- no plain lines
    -- the last redraw, over the earlier ones, then the line ends
    local last = out:match("\r([^\r]*)\nfinished\n$")
    assert.are.equal("captions [##############################] 10/10, 2 failed, $0.0550, 2 retries (timeout 2), " ..
      "breaker openai open", last)
    assert.matches("^\rcaptions %[###%.+%] 1/10, %$0%.0010\r", out) -- the first drawing
  end)
end)
