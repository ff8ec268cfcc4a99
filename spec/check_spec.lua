-- `resil-lua check [files...]`: policy files and the registry, checked
-- without running anything; file:line in every message; exit 1 on errors.
local helpers = require "spec.helpers"

local dir
before_each(function()
  dir = helpers.tmpname("")
  os.execute("mkdir -p " .. dir .. "/policies")
end)
after_each(function() os.execute("rm -rf " .. dir) end)

local function check(args)
  return helpers.run(("cd %s && %s check %s"):format(dir, helpers.resil, args or ""))
end

local function lines_of(text)
  local out = {}
  for l in text:gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

describe("resil-lua check", function()
  it("passes the shipped registry and policies: exit 0, warnings printed", function()
    local r = helpers.run(helpers.resil .. " check policies/*.lua policies/providers/*.lua")
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\n0 errors, %d+ warnings?\n$", "\n" .. r.stdout)
  end)

  -- (before: exit 0 with the report lost, where costs --csv > FILE on a full disk exits 1 saying so)
  it("a report that cannot be written whole (> /dev/full) exits 1 saying so, not 0", function()
    local r = helpers.run("(" .. helpers.resil .. " check policies/*.lua > /dev/full)")
    assert.are.equal(1, r.code)
    assert.are.equal("resil-lua: check: its report could not be written: No space left on device\n", r.stderr)
  end)

  -- (before: "unknown option '--policies'", exit 2; a project whose policies live elsewhere
  -- could not check them the way its pipeline and gateway load them)
  it("checks the policy folder --policies names, as a pipeline loads it: its modules and its registry", function()
    os.execute("mkdir -p " .. dir .. "/conf/providers")
    helpers.write(dir .. "/conf/limits.lua", "local n = nil\nreturn { x = n.y }\n")
    helpers.write(dir .. "/conf/ok.lua", "return { ok = true }\n")
    helpers.write(dir .. "/conf/models.lua", 'return { fast = { use = "openai/gpt-nope-2024-01-01" } }\n')
    local r = check("--policies conf/")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: conf/limits%.lua:2: attempt to index a nil value %(local 'n'%)", r.stdout)
    assert.matches("conf/models%.lua", r.stdout) -- (the registry in effect is the folder's)
    assert.matches("gpt%-nope", r.stdout)
    assert.is_nil(r.stdout:find("conf/ok.lua", 1, true))
    r = check("--policies")
    assert.are.equal(1, r.code)
    assert.matches("check: %-%-policies needs a folder", r.stderr)
  end)

  -- (before: check --policies conf read conf only, "0 errors", exit 0; the pipeline run with
  -- --policies conf loaded the project's broken ./policies/retry.lua, which conf lacks)
  it("checks ./policies after --policies DIR, as require searches them: a module in both is DIR's", function()
    os.execute("mkdir -p " .. dir .. "/conf " .. dir .. "/policies/providers")
    helpers.write(dir .. "/conf/ok.lua", "return { ok = true }\n")
    helpers.write(dir .. "/policies/retry.lua", "local retry = {}\nfunction retry.call(\n  return retry\n")
    helpers.write(dir .. "/policies/providers/acme.lua", "return {\n")
    helpers.write(dir .. "/policies/limits.lua", "return {\n") -- (shadowed by conf's: never loaded)
    helpers.write(dir .. "/conf/limits.lua", "return {}\n")
    local r = check("--policies conf")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: policies/retry%.lua:3: <name> or '%.%.%.' expected near 'return'", r.stdout)
    assert.matches("error: policies/providers/acme%.lua:2: unexpected symbol near <eof>", r.stdout)
    assert.matches("warning: policies/limits%.lua: never loaded: conf/limits%.lua is found first", r.stdout)
    assert.is_nil(r.stdout:find("error: policies/limits.lua", 1, true))
    -- what the run itself meets
    local run = helpers.run(("cd %s && %s --policies conf -e 'require \"policies.retry\"'"):format(dir, helpers.resil))
    assert.are.equal(1, run.code)
    assert.matches("policies/retry%.lua:3: <name> or '%.%.%.' expected near 'return'", run.stderr)
    -- the project's own folder named as --policies is checked once, not as a second copy of itself
    for _, same in ipairs({ "./policies", "policies/", dir .. "/policies" }) do
      r = check("--policies " .. same)
      assert.are.equal(1, r.code, r.stdout .. r.stderr)
      assert.is_nil(r.stdout:find("never loaded", 1, true), r.stdout)
      assert.matches("retry%.lua:3: ", r.stdout)
      assert.matches("\n3 errors", r.stdout) -- (its limits.lua is the one loaded now)
    end
  end)

  it("reports a syntax error with file:line and exits 1", function()
    helpers.write(dir .. "/policies/retry.lua", "local retry = {}\n\nfunction retry.call(\n  return retry\n")
    local r = check()
    assert.are.equal(1, r.code)
    assert.matches("error: policies/retry%.lua:4: <name> or '%.%.%.' expected near 'return'", r.stdout)
  end)

  it("does not hang on a registry or a policy that loops at load: an error with file:line", function()
    helpers.write(dir .. "/policies/models.lua", "local t = {}\nwhile true do end\nreturn t\n")
    helpers.write(dir .. "/policies/spin.lua", "local n = 0\nwhile true do n = n + 1 end\n")
    local r = helpers.run(("cd %s && timeout 60 %s check policies/models.lua policies/spin.lua"):format(dir,
      helpers.resil))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: policies/models%.lua:2: ran more than %d+ instructions at load", r.stdout)
    assert.matches("error: policies/spin%.lua:2: ran more than %d+ instructions at load", r.stdout)
  end)

  it("reports an error raised while a policy module loads", function()
    helpers.write(dir .. "/policies/mine.lua", "local x = {}\nerror('mine: bad config')\nreturn x\n")
    local r = check("policies/mine.lua")
    assert.are.equal(1, r.code)
    assert.matches("error: policies/mine%.lua:2: mine: bad config", r.stdout)
  end)

  it("names the file and line of an error that is not a string or has no position, and of a binary chunk",
    function()
    helpers.write(dir .. "/policies/tbl.lua", "local t = {}\nerror({ code = 5 })\n")
    helpers.write(dir .. "/policies/bare.lua", "local t = {}\n\nerror('bad config', 0)\n")
    helpers.write(dir .. "/policies/bin.lua", string.dump(function() return {} end))
    local r = check("policies/tbl.lua policies/bare.lua policies/bin.lua")
    assert.are.equal(1, r.code)
    assert.matches("error: policies/tbl%.lua:2: %(error object is a table value%)\n", r.stdout) -- (was "table: 0x...")
    assert.matches("error: policies/bare%.lua:3: bad config\n", r.stdout)
    assert.matches("error: policies/bin%.lua: attempt to load a binary chunk", r.stdout)
  end)

  it("does not hang on an error object whose __tostring loops: an error with file:line", function()
    helpers.write(dir .. "/policies/loopy.lua",
      "local e = setmetatable({}, { __tostring = function() while true do end end })\nerror(e)\n")
    helpers.write(dir .. "/policies/yields.lua",
      "error(setmetatable({}, { __tostring = function() coroutine.yield('said') return 'x' end }))\n")
    local r = helpers.run(("cd %s && timeout 60 %s check policies/loopy.lua policies/yields.lua"):format(dir,
      helpers.resil))
    assert.are.equal(1, r.code, r.stdout .. r.stderr) -- (was: check hung, killed by timeout: 124)
    assert.matches("error: policies/loopy%.lua:2: %(error object is a table value%)\n", r.stdout)
    assert.matches("error: policies/yields%.lua:1: %(error object is a table value%)\n", r.stdout)
  end)

  it("a registry in effect that does not compile is an error naming its line, not a traceback of the command",
    function()
    helpers.write(dir .. "/policies/models.lua", "return {}\n\nerror(42)\n")
    helpers.write(dir .. "/policies/mine.lua", "return {}\n")
    local r = check("policies/mine.lua")
    assert.are.equal(1, r.code)
    assert.are.equal("", r.stderr)
    assert.matches("error: policies/models%.lua:3: <eof> expected near 'error'\n", r.stdout)
  end)

  it("finds what is wrong in a registry, each with its file:line", function()
    helpers.write(dir .. "/policies/models.lua", [[
return {
  ["ok"] = { use = "openai/gpt-4o-mini-2024-07-18" },
  ["typo-provider"] = { use = "opena/gpt-4o-mini-2024-07-18" },
  ["ping"] = { use = "pong" },
  ["pong"] = { use = "ping" },
  ["bad-fallback"] = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "claude-fast" } },
  ["unpriced"] = { use = "openai/my-finetune-2025-01-01" },
  ["openai/gpt-4-0613"] = { deprecated = true, sunset = "2025-01-01" },
  ["canary"] = { use = "openai/gpt-4o-mini-2024-07-18", migrate = { to = "openai/gpt-4o", share = 0.1 } },
  ["floating"] = { use = "openai/gpt-4o" },
}
]])
    local r = check()
    assert.are.equal(1, r.code)
    local out = r.stdout
    -- cycles are refused before anything else is looked at: the registry would not load
    assert.matches("error: policies/models%.lua:4: model 'ping': alias cycle ping %-> pong %-> ping", out)
    helpers.write(dir .. "/policies/models.lua", (helpers.slurp(dir .. "/policies/models.lua")
      :gsub('  %["ping"%][^\n]*\n  %["pong"%][^\n]*\n', '')))
    r = check()
    assert.are.equal(1, r.code)
    local l = lines_of(r.stdout)
    out = r.stdout
    assert.matches("error: policies/models%.lua:3: model 'typo%-provider': use 'opena/gpt%-4o%-mini%-2024%-07%-18': "
      .. "unknown provider 'opena'", out)
    assert.matches("error: policies/models%.lua:4: model 'bad%-fallback': fallback 'claude%-fast' is neither an "
      .. "alias nor \"provider/model\"", out)
    assert.matches("error: policies/models%.lua:5: model 'unpriced': use 'openai/my%-finetune%-2025%-01%-01' has no "
      .. "price", out)
    assert.matches("error: policies/models%.lua:6: model 'openai/gpt%-4%-0613': passed its sunset %(2025%-01%-01%) "
      .. "and has no replacement", out)
    assert.matches("error: policies/models%.lua:7: model 'canary': migrate%.to 'openai/gpt%-4o' is not pinned", out)
    assert.matches("warning: policies/models%.lua:8: model 'floating': use 'openai/gpt%-4o' is not pinned", out)
    assert.are.equal("5 errors, 1 warning", l[#l])
  end)

  -- (before: "has no price (policies/pricing.lua)" for a price that is written there, only wrong: the
  -- reader looked for a missing entry and found it)
  it("a model whose price is no price (NaN, negative, a field misspelt) says why, at the price's file:line", function()
    local shipped = helpers.slurp("policies/pricing.lua")
    local own, n = shipped:gsub("pricing%.models = {\n  openai = {\n", "pricing.models = {\n  openai = {\n" ..
      '    ["my-nan-2025-01-01"] = { input = 0/0, output = 1 },\n' ..
      '    ["my-neg"] = { input = -1, output = 1 },\n' ..
      '    ["my-typo-2025-01-01"] = { inptu = 1, output = 1 },\n', 1)
    assert.are.equal(1, n)
    helpers.write(dir .. "/policies/pricing.lua", own)
    local line = select(2, shipped:sub(1, shipped:find("pricing.models = {", 1, true)):gsub("\n", "")) + 3
    helpers.write(dir .. "/policies/models.lua", [[
return {
  ["nan"] = { use = "openai/my-nan-2025-01-01" },
  ["neg"] = { use = "openai/my-neg-2025-01-01" },
  ["typo"] = { use = "openai/my-typo-2025-01-01" },
}
]])
    local r = check()
    assert.are.equal(1, r.code, r.stdout)
    local out = r.stdout
    assert.matches(("error: policies/models%%.lua:2: model 'nan': use 'openai/my%%-nan%%-2025%%-01%%-01': its price in " ..
      "policies/pricing%%.lua:%d is no price: input must be a number >= 0, not NaN"):format(line), out)
    assert.matches(("model 'neg': use 'openai/my%%-neg%%-2025%%-01%%-01': its price in policies/pricing%%.lua:%d is no " ..
      "price: input must be a number >= 0, not %%-1"):format(line + 1), out)
    assert.matches(("model 'typo': use 'openai/my%%-typo%%-2025%%-01%%-01': its price in policies/pricing%%.lua:%d is " ..
      "no price: unknown field 'inptu'"):format(line + 2), out)
  end)

  -- (before: nothing said; a call naming openai/gpt-4o-mini, as a gateway's client does, was served
  -- by Anthropic without a word)
  it("warns of an alias named as one provider's model whose calls go to another's, at its line", function()
    helpers.write(dir .. "/policies/models.lua", [[
return {
  ["openai/gpt-4o-mini"] = { use = "anthropic/claude-haiku-4-5-20251001" },
  ["openai/gpt-4o"] = { use = "openai/gpt-4o-2024-08-06" },
}
]])
    local r = check()
    assert.are.equal(0, r.code, r.stdout)
    assert.matches("warning: policies/models%.lua:2: model 'openai/gpt%-4o%-mini': is named as a model of 'openai', "
      .. "but its calls go to anthropic/claude%-haiku%-4%-5%-20251001", r.stdout)
    assert.matches("\n0 errors, 1 warning\n$", "\n" .. r.stdout)
  end)

  it("a migration's sticky, window and rollback margins of the wrong kind are errors at their line", function()
    helpers.write(dir .. "/policies/models.lua", [[
return {
  ["a"] = { use = "openai/gpt-4o-mini-2024-07-18",
            migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0.1, sticky = 3 } },
  ["b"] = { use = "openai/gpt-4o-mini-2024-07-18",
            migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0.1, window = -1 } },
  ["c"] = { use = "openai/gpt-4o-mini-2024-07-18",
            migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0.1, rollback = { error_rate = "5%" } } },
}
]])
    local r = check()
    assert.are.equal(1, r.code)
    assert.matches("error: policies/models%.lua:2: model 'a': migrate%.sticky must name a request field", r.stdout)
    assert.matches("error: policies/models%.lua:4: model 'b': migrate%.window must be seconds > 0", r.stdout)
    assert.matches("error: policies/models%.lua:6: model 'c': migrate%.rollback%.error_rate must be a number >= 0",
      r.stdout)
  end)

  -- (before: a deployment's cache TTL the store refuses, "60" read from the environment, left each
  -- answer uncached, every repeat paid for, a warning per call)
  it("a deployment's cache of the wrong kind is an error at its line", function()
    helpers.write(dir .. "/policies/models.lua", [[
return {
  ["spread"] = { deployments = { { use = "openai/gpt-4o-mini-2024-07-18", config = { cache = { ttl = "60" } } } } },
}
]])
    local r = check()
    assert.are.equal(1, r.code)
    assert.matches("error: policies/models%.lua:2: model 'spread': deployments%[1%]%.config%.cache must be {ttl = "
      .. "seconds}, seconds > 0", r.stdout)
  end)

  -- (before: 0 errors, and every call of the alias raised "must name its provider": the name is a
  -- deprecation's key, which names a model without its provider)
  it("an alias or fallback naming a deprecation by its key without a provider is an error", function()
    helpers.write(dir .. "/policies/models.lua", [[
return {
  ["chat-old"] = { use = "gpt-4o-2024-05-13" },
  ["chat-safe"] = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "gpt-4o-2024-05-13" } },
  ["gpt-4o-2024-05-13"] = { deprecated = true, replacement = "openai/gpt-4o-2024-08-06", sunset = "2099-06-30" },
}
]])
    local r = check()
    assert.are.equal(1, r.code, r.stdout)
    assert.matches("error: policies/models%.lua:2: model 'chat%-old': use 'gpt%-4o%-2024%-05%-13' is neither an "
      .. "alias nor \"provider/model\"", r.stdout)
    assert.matches("error: policies/models%.lua:3: model 'chat%-safe': fallback 'gpt%-4o%-2024%-05%-13' is neither "
      .. "an alias nor \"provider/model\"", r.stdout)
  end)

  it("checks the registry file given, and exits 0 when it only warns", function()
    helpers.write(dir .. "/staging-models.lua", 'return { fast = { use = "openai/gpt-4o" } }\n')
    os.rename(dir .. "/staging-models.lua", dir .. "/models.lua")
    local r = check("models.lua")
    assert.are.equal(0, r.code, r.stdout)
    assert.matches("warning: models%.lua:1: model 'fast': use 'openai/gpt%-4o' is not pinned", r.stdout)
  end)

  -- (before: os.exit at load ended check with the status the file gave, 0, and nothing printed: a
  -- CI step passed without checking the files after it; a task a policy started at load kept check
  -- running when it had printed its verdict, for good for one that loops, and a yield named no file;
  -- one that cleared check's budget with debug.sethook() and looped hung it)
  it("a policy that exits, starts a task, yields or unhooks at load: an error with file:line, the others checked",
    function()
    helpers.write(dir .. "/policies/a_exits.lua", "local resil = require 'resil'\nos.exit(0)\nreturn {}\n")
    helpers.write(dir .. "/policies/b_ticks.lua", "local resil = require 'resil'\n" ..
      "resil.spawn(function() while true do resil.sleep(0.01) end end)\nreturn {}\n")
    helpers.write(dir .. "/policies/c_yields.lua", "local x = 1\ncoroutine.yield()\nreturn {}\n")
    helpers.write(dir .. "/policies/d_broken.lua", "return {\n  oops oops\n}\n")
    helpers.write(dir .. "/policies/e_unhooks.lua", "local n = 0\ndebug.sethook()\nwhile true do n = n + 1 end\n")
    local r = helpers.run(("cd %s && timeout -s KILL 30 %s check"):format(dir, helpers.resil))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: policies/a_exits%.lua:2: os%.exit at load", r.stdout)
    assert.matches("error: policies/c_yields%.lua:2: it yielded at load", r.stdout)
    assert.matches("error: policies/d_broken%.lua:2:", r.stdout)
    assert.matches("error: policies/e_unhooks%.lua:2: debug%.sethook at load", r.stdout)
    assert.is_nil(r.stdout:find("b_ticks", 1, true))
    assert.matches("\n4 errors, %d+ warnings?\n$", r.stdout)
    -- a project whose only file starts a task: its verdict, then the exit
    os.execute("rm " .. dir .. "/policies/a_exits.lua " .. dir .. "/policies/c_yields.lua " .. dir ..
      "/policies/d_broken.lua " .. dir .. "/policies/e_unhooks.lua")
    r = helpers.run(("cd %s && timeout -s KILL 30 %s check"):format(dir, helpers.resil))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\n0 errors, %d+ warnings?\n$", "\n" .. r.stdout)
  end)

  -- (before: `ls policies/*.lua` listed a folder named x.lua by its files, each an error
  -- "a.lua: no such file", and a name with a line break as two files, neither checked)
  it("checks the folder's files by their names, whatever is in them: a folder named x.lua is one error", function()
    os.execute("mkdir -p " .. dir .. "/policies/old.lua")
    helpers.write(dir .. "/policies/old.lua/a.lua", "return {}\n")
    helpers.write(dir .. "/policies/two\nlines.lua", "return {\n")
    helpers.write(dir .. "/policies/ok.lua", "return {}\n")
    local r = check()
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    local errors = {}
    for l in r.stdout:gmatch("error: [^\n]*") do errors[#errors + 1] = l end
    assert.are.equal(2, #errors, r.stdout)
    assert.matches("^error: policies/old%.lua: cannot read", errors[1])
    assert.matches("^error: policies/two$", errors[2])
    assert.matches("\nlines%.lua:2: unexpected symbol near <eof>\n", r.stdout)
  end)

  -- (before: a FIFO named x.lua was opened to be read: check waited for a writer, a CI step for good)
  it("a FIFO named x.lua in the folder is an error, not a wait for a writer", function()
    os.execute("mkfifo " .. dir .. "/policies/pipe.lua")
    helpers.write(dir .. "/policies/ok.lua", "return {}\n")
    local r = helpers.run(("cd %s && timeout -s KILL 30 %s check"):format(dir, helpers.resil))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("\nerror: policies/pipe%.lua: not a file %(a FIFO, a socket or a device%): not read\n", "\n" .. r.stdout)
    assert.matches("\n1 error, ", "\n" .. r.stdout)
  end)

  -- (reviewer R2: a find without GNU's -printf (busybox, BSD) listed nothing, and a broken policy
  -- passed as "0 errors")
  it("a folder find cannot list is an error, not an empty folder", function()
    helpers.write(dir .. "/policies/bad.lua", "local x =\n")
    local bin = dir .. "/bin"
    os.execute("mkdir -p " .. bin)
    helpers.write(bin .. "/find", '#!/bin/sh\nfor a in "$@"; do [ "$a" = -printf ] && { echo "find: unknown predicate" >&2; ' ..
      'exit 1; }; done\nexec /usr/bin/find "$@"\n')
    os.execute("chmod +x " .. bin .. "/find")
    local r = helpers.run(("cd %s && PATH=%s:$PATH %s check"):format(dir, bin, helpers.resil))
    assert.are_not.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("cannot list policies: find failed", r.stdout .. r.stderr, 1, true)
  end)

  -- (before: find, as ls before it, read it as an option: nothing checked, "0 errors")
  -- (before: both passed, and `resil-lua gateway` refused to start: "policies.gateway has no function 'main'")
  it("a project's policies/gateway.lua without the functions the gateway calls (a config named so) is an error",
    function()
      helpers.write(dir .. "/policies/gateway.lua", "return { auth = false }\n")
      local r = check()
      assert.are.equal(1, r.code, r.stdout)
      assert.matches("\nerror: policies/gateway%.lua: policies%.gateway has no function 'main' %(the gateway calls it: " ..
        "a copy of policies/gateway%.lua keeps the shipped file's; a gateway config is named otherwise%)\n", "\n" .. r.stdout)
      local text = helpers.slurp((os.getenv("RESIL_HOME") or ".") .. "/policies/gateway.lua")
      helpers.write(dir .. "/policies/gateway.lua", (text:gsub("\nfunction gateway%.handle%(", "\nlocal function dropped(")))
      r = check()
      assert.are.equal(1, r.code, r.stdout)
      assert.matches("policies%.gateway has no function 'handle'", r.stdout)
      -- a copy from before the gateway's drain (no stopping_reply) runs, as the README says: it passes
      helpers.write(dir .. "/policies/gateway.lua",
        (text:gsub("\nfunction gateway%.stopping_reply%(", "\nlocal function dropped(")))
      r = check()
      assert.are.equal(0, r.code, r.stdout)
      helpers.write(dir .. "/policies/gateway.lua", text)
      r = check()
      assert.are.equal(0, r.code, r.stdout)
    end)

  it("checks a policy folder whose name starts with '-'", function()
    os.execute("mkdir -p " .. dir .. "/-delete")
    helpers.write(dir .. "/-delete/x.lua", "return {\n")
    local r = check("--policies -delete")
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: %-delete/x%.lua:2: unexpected symbol near <eof>", r.stdout)
  end)

  it("runs nothing: a registry that calls out cannot reach os or io", function()
    helpers.write(dir .. "/policies/models.lua", 'os.exit(0)\nreturn {}\n')
    local r = check()
    assert.are.equal(1, r.code)
    assert.matches("error: policies/models%.lua:1: attempt to index a nil value %(global 'os'%)", r.stdout)
  end)
end)
