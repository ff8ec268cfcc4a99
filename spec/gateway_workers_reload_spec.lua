-- gateway --workers: every worker serves one version of the policies and config. A worker
-- started again (a crash, the OOM killer, kill -9) reads the files as they are now; files
-- edited since the last reload, not signalled yet, were served by it alone while the others
-- served the version before, each request answered by one or the other until the next SIGHUP.
-- Real processes, a real kill -9.
local helpers = require "spec.helpers"

describe("gateway --workers: a worker started again", function()
  it("has the other workers reload once it listens, so all serve the files as they are now", function()
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    local path = helpers.write(helpers.tmpname(".lua"),
      "return { auth = false, models = { before_edit = 'openai/gpt-4o-mini' } }")
    os.execute(("%s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, path, helpers.tmpname(".db"), log, pidfile))
    local pid, seen = helpers.slurp(pidfile):match("%d+"), {}
    finally(function()
      for _, p in ipairs({ pid, table.unpack(seen) }) do if helpers.alive(p) then os.execute("kill -KILL " .. p) end end
    end)
    local function listening() return select(2, helpers.slurp(log):gsub("gateway listening", "")) end
    assert.is_true(helpers.wait_until(function() return listening() == 2 end, 20), helpers.slurp(log))
    seen = helpers.workers_of(pid)
    -- an edit not reloaded yet, then a worker dies
    helpers.write(path, "return { auth = false, models = { after_edit = 'openai/gpt-4o-mini' } }")
    os.execute("kill -KILL " .. seen[1])
    assert.is_true(helpers.wait_until(function() return listening() == 3 end, 20), helpers.slurp(log))
    for _, p in ipairs(helpers.workers_of(pid)) do seen[#seen + 1] = p end
    -- each request on a connection of its own: the kernel spreads them over both workers
    local function served()
      local names = {}
      for _ = 1, 16 do
        local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/v1/models"):format(port))
        names[r.stdout:match('"before_edit"') and "before_edit" or r.stdout:match('"after_edit"') and "after_edit"
          or r.stdout] = true
      end
      return names
    end
    -- the names the gateway serves, as requests see them ("before_edit", "after_edit": both while
    -- the workers disagree)
    local seen_names
    local agreed = helpers.wait_until(function()
      local names, n = served(), 0
      seen_names = {}
      for name in pairs(names) do n, seen_names[#seen_names + 1] = n + 1, name end
      return n == 1 and names.after_edit
    end, 10)
    assert.is_true(agreed, "served: " .. table.concat(seen_names, ", ") .. "\n" .. helpers.slurp(log))
  end)
end)
