-- spec/run, the suite runner of `make test`
local resil = require "resil"
local helpers = require "spec.helpers"

describe("spec/run", function()
  it("fails a suite that leaves a process running, and stops that process", function()
    local leaky = helpers.write(helpers.tmpname("_spec.lua"), [[
describe("a leaky suite", function()
  it("starts a process and forgets it", function()
    local pidfile = os.getenv("LEAK_PIDFILE")
    os.execute("sleep 300 > /dev/null 2>&1 & echo $! > " .. pidfile)
  end)
end)
]])
    local pidfile = helpers.tmpname(".pid")
    local r = helpers.run(("LEAK_PIDFILE=%s RESIL_SPECS=%s EMBED_TEST=/nonexistent spec/run"):format(pidfile, leaky))
    local pid = helpers.slurp(pidfile):match("%d+")
    os.remove(leaky)
    os.remove(pidfile)
    assert.are.equal(1, r.code, r.stdout)
    assert.matches("not ok %- " .. leaky:gsub("%p", "%%%0") .. " left processes running", r.stdout)
    assert.matches("sleep 300", r.stdout)
    assert.matches("1 passed, 1 failed\n$", r.stdout)
    resil.clock.real()
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 5))
  end)
end)

-- spec/finally.lua (busted's helper, named in .busted): busted kept only a
-- test's last finally, and a setup helper's cleanup registered before it was lost
describe("a test's finally", function()
  local ran = {}
  it("may be given several functions", function()
    finally(function() ran[#ran + 1] = "first" end)
    finally(function() ran[#ran + 1] = "second" end)
  end)
  it("runs them all, the last given first", function()
    assert.are.same({ "second", "first" }, ran)
  end)
end)
