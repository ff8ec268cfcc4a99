-- A gateway's config that waits (resil.sleep, a store's read, an HTTP call
-- at its top level). A policy reload runs the config again as
-- policies.gateway loads, outside any task, and a reload never yields (no
-- request may see half a set of policies): such a config started, then
-- failed every SIGHUP, the old version serving on with the reload's error
-- logged each time. The two paths agree now: it is refused at start, at its
-- file:line, saying why and what to do instead (a task it starts may wait,
-- at start as after a reload). Real processes, a real SIGHUP.
local helpers = require "spec.helpers"

local function start(config) return helpers.gateway_with_config(config, finally) end

local reloads = helpers.reloads

describe("gateway: a config that waits", function()
  it("is refused at start with its file:line and why (it used to start, then fail every SIGHUP)", function()
    local pid, _, log, path = start([[
      local resil = require "resil"
      resil.sleep(0.05) -- (line 2)
      return { auth = false }
    ]])
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 20), helpers.slurp(log))
    local out = helpers.slurp(log)
    assert.matches(path:gsub("%p", "%%%0") .. ":2: resil.sleep must be called from a task", out)
    assert.matches("a gateway's config runs again at each policy reload, where nothing may wait", out, 1, true)
    assert.is_nil(out:match("gateway listening"), out)
  end)

  it("a task the config starts may wait: it starts, and reloads on SIGHUP, each time", function()
    local marker = helpers.tmpname(".waited")
    local pid, port, log = start(([[
      local resil = require "resil"
      resil.spawn(function()
        resil.sleep(0.05)
        local f = io.open(%q, "a"); f:write("w\n"); f:close()
      end)
      return { auth = false }
    ]]):format(marker))
    -- (a reload cancels what the version before started: each waits for its version's task)
    local function waited(n) return helpers.wait_until(function() return helpers.slurp(marker) == ("w\n"):rep(n) end, 10) end
    assert.is_true(waited(1), helpers.slurp(log))
    for round = 1, 2 do
      os.execute("kill -HUP " .. pid)
      assert.is_true(helpers.wait_until(function() return reloads(port, "ok") == round end, 10), helpers.slurp(log))
      assert.is_true(waited(1 + round), helpers.slurp(marker))
    end
    assert.are.equal(0, reloads(port, "failed"))
    assert.is_nil(helpers.slurp(log):match("reload failed"), helpers.slurp(log))
  end)
end)
