-- The shipped Prometheus alerting rules (examples/prometheus/alerts.yml):
-- promtool accepts them, and their unit tests (alerts_test.yml) prove each
-- alert fires on a series that should fire it and stays quiet on one that
-- should not. promtool comes with Debian's prometheus package (make deps).
local helpers = require "spec.helpers"

local dir = (os.getenv("RESIL_HOME") or ".") .. "/examples/prometheus"
local has_promtool = os.execute("command -v promtool > /dev/null 2>&1") == true

describe("examples/prometheus/alerts.yml", function()
  local rules = helpers.slurp(dir .. "/alerts.yml")
  local tests = helpers.slurp(dir .. "/alerts_test.yml")

  it("names the alerts the operator's checklist asks for, each with a summary and a runbook line", function()
    local names = {}
    for name in rules:gmatch("%- alert: (%S+)") do names[#names + 1] = name end
    assert.are.same({ "ResilBreakerOpen", "ResilRetriesHigh", "ResilProviderErrorsAboveUsual", "ResilBudgetSoftLimit",
                      "ResilSpendSpike", "ResilReloadFailing", "ResilStoreUnavailable", "ResilLedgerJournalKept" }, names)
    assert.are.equal(#names, select(2, rules:gsub("\n%s+summary: ", "")))
    assert.are.equal(#names, select(2, rules:gsub("\n%s+runbook: ", "")))
  end)

  it("has, for every alert, a test where it fires and one where it stays quiet", function()
    -- one chunk per eval_time, cut at the end of its test group
    local evals = {}
    local pos = 1
    while true do
      local a = tests:find("- eval_time:", pos, true)
      if not a then break end
      local b = tests:find("- eval_time:", a + 1, true) or #tests + 1
      local chunk = tests:sub(a, b - 1):gsub("\n\n.*", "")
      evals[#evals + 1] = chunk
      pos = a + 1
    end
    for name in rules:gmatch("%- alert: (%S+)") do
      local fires, quiet = false, false
      for _, chunk in ipairs(evals) do
        if chunk:match("alertname: " .. name .. "\n") then
          if chunk:match("exp_alerts: %[%]") then quiet = true else fires = fires or chunk:match("exp_labels") ~= nil end
        end
      end
      assert(fires and quiet, name .. " needs a firing and a quiet test in alerts_test.yml")
    end
  end)

  it("passes promtool check rules and promtool test rules", function()
    if not has_promtool then
      pending("promtool is not installed (Debian: apt-get install prometheus, or make deps)")
      return
    end
    local check = helpers.run(("cd %s && promtool check rules alerts.yml"):format(dir))
    assert.are.equal(0, check.code, check.stdout .. check.stderr)
    assert.matches("SUCCESS: 8 rules found", check.stdout .. check.stderr)
    local test = helpers.run(("cd %s && promtool test rules alerts_test.yml"):format(dir))
    assert.are.equal(0, test.code, test.stdout .. test.stderr)
    assert.matches("SUCCESS", test.stdout .. test.stderr)
  end)
end)
