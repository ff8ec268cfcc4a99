-- A gateway's config is checked as it loads: an option it does not know (a
-- typo: max_concurent) or a value of the wrong kind is refused at start,
-- naming the file, the option and what it must be, and a policy reload that
-- brings one fails with the same words while the config before serves on.
-- Taken as they came, a typo was a limit silently not set, and
-- max_concurrent = "lots" started fine and then answered every request a 500.
-- Real processes, a real SIGHUP.
local helpers = require "spec.helpers"

local function start(config) return helpers.gateway_with_config(config, finally) end

local function refused(config, says)
  local pid, _, log, path = start(config)
  assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 20), helpers.slurp(log))
  local out = helpers.slurp(log)
  assert.is_nil(out:match("gateway listening"), out)
  assert.matches("gateway: the config " .. path:gsub("%p", "%%%0") .. ": " .. says, out)
  assert.is_nil(out:match("stack traceback"), out)
  return out
end

local reloads = helpers.reloads

describe("gateway: the config's options", function()
  it("refuses an option it does not know, naming it and the options there are", function()
    refused("return { auth = false, max_concurent = 10 }",
      "unknown option 'max_concurent' %(the options: access_log, auth, drain_timeout, .*max_concurrent, ")
  end)

  it("starts with every option the README's config shows, and shared_limits (README: Redis keeps them per process)", function()
    local pid, _, log = start("return { auth = false, shared_limits = false, key_cache = 2, max_body = 4096, "
      .. "read_timeout = 30, ledger_wait = false, ledger_sync = false, drain_timeout = 20, "
      .. "idempotency_keep_max = 1024, max_concurrent = 8, queue = 4, queue_timeout = 10 }")
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
      helpers.slurp(log))
    assert.is_true(helpers.alive(pid))
  end)

  it("refuses a value of the wrong kind, saying what it must be", function()
    refused('return { auth = false, max_concurrent = "lots" }',
      'max_concurrent must be requests %(an integer >= 1%), not "lots"')
    refused("return { auth = 1 }", "auth must be true or false, not 1")
    refused("return { read_timeout = 0 }", "read_timeout must be seconds %(a number > 0%), not 0")
    refused("return { queue = 1.5 }", "queue must be requests %(an integer >= 0%), not 1.5")
    refused('return { metrics_key = "" }', 'metrics_key must be a non%-empty string, not ""')
    -- (its value never shown: a key written without quotes was printed whole)
    local out = refused("return { metrics_key = 8472619305 }", "metrics_key must be a non%-empty string, not a number")
    assert.is_nil(out:find("8472619305", 1, true), out)
  end)

  it("refuses a models entry that is not a model", function()
    refused("return { auth = false, models = { x = 42 } }", "models%['x'%]: a number")
    refused("return { auth = false, models = { x = { fallback = { 'openai/gpt-4o' } } } }",
      "models%['x'%]: no model")
    refused("return { auth = false, models = { x = { model = 'openai/gpt-4o', fallback = 'openai/gpt-4o-mini' } } }",
      "models%['x'%]: fallback is not a list of models")
  end)

  it("refuses a config that returns something other than a table, naming the config file", function()
    refused("return 42", "it returned a number, not a table of options")
  end)

  it("a reload that brings a bad option fails with the same words; the config before serves on", function()
    local pid, port, log, path = start("return { auth = false, models = { fast = 'openai/gpt-4o-mini' } }")
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
      helpers.slurp(log))
    helpers.write(path, "return { auth = false, modles = { fast = 'openai/gpt-4o' } }")
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return reloads(port, "failed") == 1 end, 10), helpers.slurp(log))
    assert.matches("unknown option 'modles'", helpers.slurp(log))
    -- the config's words alone, as at start (before: "reload: .../policies/gateway.lua:2314:
    -- bad_config: ...", the shipped file's line first, as if that file were what broke)
    assert.matches([["reload: bad_config: gateway: the config [^"]*lua: unknown option 'modles']], helpers.slurp(log))
    assert.is_nil(helpers.slurp(log):match('"reload: [^"]*gateway%.lua:%d+: '), helpers.slurp(log))
    -- the model the config before named is still served (routed: the provider is what answers)
    local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/v1/models"):format(port))
    assert.matches('"fast"', r.stdout)
    assert.is_true(helpers.alive(pid))
  end)

  -- (before: the gateway's own line, "policies/gateway.lua:2211: boom" at a reload, "...:2224:
  -- {"code":1}" at start: the operator was sent to the shipped file, never told which line of theirs)
  it("a raise that names no line, at start or at a reload, names the config's line it came from", function()
    for _, raise in ipairs({ "error('boom', 0)", "error({ code = 1 })" }) do
      local pid, _, log, path = start("local x = 1\n" .. raise .. "\nreturn {}")
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 20), helpers.slurp(log))
      local out = helpers.slurp(log)
      assert.matches("resil%-lua: " .. path:gsub("%p", "%%%0") .. ":2: ", out)
      assert.is_nil(out:match("resil%-lua: [^\n]*gateway%.lua:%d+: "), out)
    end
    local pid, port, log, path = start("return { auth = false, models = { fast = 'openai/gpt-4o-mini' } }")
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
      helpers.slurp(log))
    for i, raise in ipairs({ "error('boom', 0)", "error({ code = 1 })" }) do
      helpers.write(path, "local x = 1\n" .. raise .. "\nreturn {}")
      os.execute("kill -HUP " .. pid)
      assert.is_true(helpers.wait_until(function() return reloads(port, "failed") == i end, 10), helpers.slurp(log))
    end
    local out = helpers.slurp(log)
    assert.matches('"reload: ' .. path:gsub("%p", "%%%0") .. ':2: boom"', out)
    assert.matches('"reload: ' .. path:gsub("%p", "%%%0") .. ':2: {\\"code\\":1}"', out)
    assert.is_nil(out:match('"reload: [^"]*gateway%.lua:%d+: '), out)
  end)

  -- (before: "reload: .../policies/gateway.lua: not enough memory", the shipped file's name)
  it("a reload whose config allocates without end names the config; the config before serves on", function()
    local port, pidfile, log = helpers.free_port(), helpers.tmpname(".pid"), helpers.tmpname(".out")
    local path = helpers.write(helpers.tmpname(".lua"), "return { auth = false, models = { fast = 'openai/gpt-4o-mini' } }")
    os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store %s --max-memory 64M > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, port, path, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
      helpers.slurp(log))
    helpers.write(path, "local s = 'x'\nwhile true do s = s .. s end\nreturn {}")
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return reloads(port, "failed") == 1 end, 20), helpers.slurp(log))
    local out = helpers.slurp(log)
    assert.matches('"reload: ' .. path:gsub("%p", "%%%0") .. ': not enough memory"', out)
    local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/v1/models"):format(port))
    assert.matches('"fast"', r.stdout)
  end)

  -- (before: a config saved half-written, emptied by an editor's truncate before its write, or cut
  -- before its `return`, ran as a config of nothing: the defaults, auth on and no models, served
  -- every client a 401 until the next save)
  it("a reload whose config returns nothing where the config serving returned its options fails; it serves on",
    function()
      local pid, port, log, path = start("return { auth = false, models = { fast = 'openai/gpt-4o-mini' } }")
      assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
        helpers.slurp(log))
      for _, saved in ipairs({ "", "local ai = require 'policies.ai'\n" }) do
        local failed = reloads(port, "failed") or 0
        helpers.write(path, saved)
        os.execute("kill -HUP " .. pid)
        assert.is_true(helpers.wait_until(function() return reloads(port, "failed") == failed + 1 end, 10),
          helpers.slurp(log))
        assert.matches("gateway: the config " .. path:gsub("%p", "%%%0") .. ": it returned nothing", helpers.slurp(log))
        assert.is_nil(helpers.slurp(log):match('"reload: [^"]*gateway%.lua:%d+: '), helpers.slurp(log))
        local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/v1/models"):format(port))
        assert.matches('"fast"', r.stdout) -- no key asked for: auth = false still
      end
      assert.is_true(helpers.alive(pid))
    end)

  -- (before: "reload: .../policies/gateway.lua:2868: cannot open gateway.lua: ...", the shipped
  -- file's line, as if it had broken the reload)
  it("a reload whose config was moved away fails naming the config, not the shipped gateway.lua; it serves on",
    function()
      local pid, port, log, path = start("return { auth = false, models = { fast = 'openai/gpt-4o-mini' } }")
      assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
        helpers.slurp(log))
      assert(os.rename(path, path .. ".bak"))
      os.execute("kill -HUP " .. pid)
      assert.is_true(helpers.wait_until(function() return reloads(port, "failed") == 1 end, 10), helpers.slurp(log))
      local out = helpers.slurp(log)
      assert.matches('"reload: bad_config: gateway: the config ' .. path:gsub("%p", "%%%0") .. ": cannot open", out)
      assert.is_nil(out:match('"reload: [^"]*gateway%.lua:%d+: '), out)
      local r = helpers.run(("curl -s --max-time 5 http://127.0.0.1:%d/v1/models"):format(port))
      assert.matches('"fast"', r.stdout)
      assert(os.rename(path .. ".bak", path))
    end)
end)

describe("gateway: a project's copy of policies/gateway.lua", function()
  -- (before: a copy saved without what the server calls, `return {}` or an edit that dropped
  -- gateway.handle, reloaded "ok", and every request after was a 500 "attempt to call a nil value")
  it("without gateway.main stops the start with a line saying so (not 'attempt to call a nil value')", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/gateway.lua", "return {}\n")
    local r = helpers.run(("%s gateway --policies %s --listen 127.0.0.1:0 --store %s"):format(helpers.resil, dir,
      helpers.tmpname(".db")))
    assert.are.equal(1, r.code)
    assert.matches("bad_config: policies.gateway has no function 'main'", r.stderr, 1, true)
    assert.is_nil(r.stderr:find("traceback", 1, true), r.stderr)
  end)

  -- (the README names the config gateway.lua and says --watch follows the policy folders: kept
  -- there under that name it is policies.gateway too, loaded as the handler, and the start said
  -- "a project's copy of policies/gateway.lua must keep the shipped file's", of a copy never made)
  it("a --config FILE that is itself policies.gateway (gateway.lua in a policy folder) is refused, saying so",
    function()
      for _, where in ipairs({ "--policies", "./policies" }) do
        local project = helpers.tmpname("-project")
        local dir = where == "--policies" and project .. "/conf" or project .. "/policies"
        assert(os.execute("mkdir -p " .. dir))
        helpers.write(dir .. "/gateway.lua", "return { auth = false }\n")
        local r = helpers.run(("cd %s && %s gateway %s --listen 127.0.0.1:0 --config %s/gateway.lua --store %s")
          :format(project, helpers.resil, where == "--policies" and "--policies conf" or "",
            where == "--policies" and "conf" or "policies", helpers.tmpname(".db")))
        assert.are.equal(1, r.code, r.stderr)
        assert.matches("gateway: --config " .. (where == "--policies" and "conf" or "policies") ..
          "/gateway.lua is policies.gateway too", r.stderr, 1, true)
        assert.matches("name the config otherwise", r.stderr, 1, true)
        assert.is_nil(r.stderr:find("has no function 'main'", 1, true), r.stderr)
      end
    end)

  it("saved without the functions the server calls fails the reload, naming the file; it serves on", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/gateway.lua", helpers.slurp("policies/gateway.lua"))
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }")
    os.execute(("%s gateway --policies %s --listen 127.0.0.1:%d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(helpers.resil, dir, port, config, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("gateway listening") end, 20),
      helpers.slurp(log))
    helpers.write(dir .. "/gateway.lua", "return {}\n")
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return reloads(port, "failed") == 1 end, 10), helpers.slurp(log))
    assert.matches("gateway%.lua: policies%.gateway has no function 'handle'", helpers.slurp(log))
    local r = helpers.run(("curl -s -o /dev/null -w '%%{http_code}' --max-time 5 http://127.0.0.1:%d/v1/models"):format(port))
    assert.are.equal("200", r.stdout)
  end)

  -- (Lua's main chunk holds at most 200 locals: the shipped file had room for 5 more, and a copy
  -- with a few rules of its own would not load, "too many local variables")
  it("has room for 20 locals of the project's own", function()
    local text = helpers.slurp("policies/gateway.lua")
    local at = text:find("return gateway%s*$")
    assert.truthy(at)
    local extra = {}
    for i = 1, 20 do extra[#extra + 1] = ("local project_rule_%d = %d\n"):format(i, i) end
    local f, err = load(text:sub(1, at - 1) .. table.concat(extra) .. text:sub(at), "=gateway copy")
    assert.is_not_nil(f, err)
  end)
end)
