-- Hot reload of policy files: resil.reload(), SIGHUP and --watch, in real
-- processes with their own policy folders.
local helpers = require "spec.helpers"

local function policy_dir(version)
  local dir = helpers.tmpname("-policies")
  assert(os.execute("mkdir -p " .. dir))
  helpers.write(dir .. "/greet.lua", ("return { version = %d, hello = function() return 'v%d' end }"):format(
    version, version))
  helpers.write(dir .. "/uses_greet.lua", [[
local greet = require "policies.greet"
return { which = function() return greet.version end }
]])
  return dir
end

local function run(dir, source, opts)
  return helpers.run_script(source, ("--policies %s %s"):format(dir, opts or ""), dir)
end

describe("policy reload", function()
  it("swaps in new versions, and a module gets the new version of what it requires", function()
    local r = run(policy_dir(1), [[
local resil = require "resil"
local dir = arg[1]
local greet = resil.policy "greet"
local uses = require "policies.uses_greet"
local held = require "policies.greet"          -- a call already running holds the old table
print(greet.version, uses.which())
local f = io.open(dir .. "/greet.lua", "w")
f:write("return { version = 2 }")
f:close()
assert(resil.reload())
print(greet.version, require("policies.uses_greet").which(), held.version)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\t1\n2\t2\t1\n", r.stdout)
  end)

  it("keeps the old version serving when a file is broken, and names file:line", function()
    local r = run(policy_dir(1), [[
local resil = require "resil"
local dir = arg[1]
require "policies.uses_greet"
local f = io.open(dir .. "/greet.lua", "w")
f:write("return {\n  version = 2,\n  oops oops\n}")
f:close()
local ok, err = resil.reload()
print(ok, require("policies.greet").version, require("policies.uses_greet").which())
io.stderr:write(err, "\n")
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\t1\t1\n", r.stdout)
    assert.matches("greet%.lua:3:", r.stderr)
  end)

  -- (a table raised, or a message raised at level 0, was logged as "reload: table: 0x55d0c0" or
  -- "reload: boom": nothing said which file broke the reload, let alone its line)
  it("names file:line when a policy raises a table, or a message without a position, at load", function()
    local r = run(policy_dir(1), [[
local resil = require "resil"
local dir = arg[1]
require "policies.uses_greet"
for _, raise in ipairs({ "error({ code = 'bad_config' })", "error('boom', 0)",
                         "error(setmetatable({}, { __tostring = function() return 'config: no region' end }))",
                         "oops oops" }) do
  local f = io.open(dir .. "/greet.lua", "w")
  f:write("local version = 2\n" .. raise .. "\nreturn { version = version }")
  f:close()
  local ok, err = resil.reload()
  print(ok, require("policies.greet").version)
  io.stderr:write(err, "\n--\n")
end
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(("false\t1\n"):rep(4), r.stdout)
    local errs = {}
    for text in r.stderr:gmatch("(.-)\n%-%-\n") do errs[#errs + 1] = text end
    -- (its fields, as the command reports a script's: "table: 0x55d0c0" said nothing of what it held)
    assert.matches('^reload: [^\n]*greet%.lua:2: {"code":"bad_config"}$', errs[1])
    assert.matches("^reload: [^\n]*greet%.lua:2: boom$", errs[2])
    assert.matches("^reload: [^\n]*greet%.lua:2: config: no region$", errs[3])
    -- a syntax error names its file:line as it did, and nothing of the host's own
    assert.matches("greet%.lua:2:", errs[4])
    assert.is_nil(errs[4]:find("prelude", 1, true))
  end)

  -- (before: the reload a policy asked for at load ran inside the one loading it, and took its
  -- record of the old set; a file broken after it was left unloaded, the log said "the old version
  -- keeps serving", and every call after raised that file's syntax error)
  it("a policy that calls resil.reload() at load leaves a failed reload's old set serving", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/a_reloads.lua", "local ok, err = require('resil').reload()\n" ..
      "return { nested = tostring(ok) .. ' ' .. tostring(err) }\n")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
require "policies.a_reloads"
require "policies.uses_greet"
local f = io.open(dir .. "/greet.lua", "w")
f:write("return {\n  version = 2,\n  oops oops\n}")
f:close()
local ok, err = resil.reload()
print(ok, err:match("greet%.lua:%d+:") ~= nil)
print(pcall(function() return require("policies.greet").version, require("policies.uses_greet").which() end))
f = io.open(dir .. "/greet.lua", "w")
f:write("return { version = 3 }")
f:close()
print(resil.reload())
print(require("policies.greet").version, require("policies.a_reloads").nested)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^false\ttrue\ntrue\t1\t1\ntrue\t", r.stdout)
    assert.matches("\n3\tfalse reload: a reload is under way", r.stdout)
  end)

  -- (before: ai.config is one table for every version; a reload whose provider file loaded, with
  -- another file broken, left the failed set's base_url in force under the old version)
  it("a failed reload puts back the providers its files' ai.configure calls set", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/providers.lua", [[
require("policies.ai").configure("openai", { base_url = "http://first.example/v1" })
return {}
]])
    helpers.write(dir .. "/zz_other.lua", "return {}")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local ai = require "policies.ai"
require "policies.providers"
require "policies.zz_other"
local function save(name, text) local f = assert(io.open(dir .. "/" .. name, "w")) f:write(text) f:close() end
save("providers.lua", 'require("policies.ai").configure("openai", { base_url = "http://second.example/v1" })\n' ..
  'require("policies.ai").configure("anthropic", { base_url = "http://new.example" })\nreturn {}')
save("zz_other.lua", "return {") -- (broken: the reload fails after providers.lua loaded)
print(resil.reload())
print(ai.config.openai.base_url, ai.config.anthropic)
save("zz_other.lua", "return {}")
print((resil.reload()))
print(ai.config.openai.base_url, ai.config.anthropic and ai.config.anthropic.base_url)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^false\treload: [^\n]*\n[^\n]*zz_other%.lua:1:[^\n]*\n" ..
      "http://first%.example/v1\tnil\ntrue\nhttp://second%.example/v1\thttp://new%.example\n$", r.stdout)
  end)

  it("keeps buckets, breakers and resil.keep state across a reload", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/counter.lua", [[
local resil = require "resil"
local state = resil.keep("counter", function() return { n = 0 } end)
return { bump = function() state.n = state.n + 1; return state.n end,
         bucket = resil.bucket("reload-bucket", { rate = 1, per = 3600, burst = 2 }) }
]])
    local r = run(dir, [[
local resil = require "resil"
local c = resil.policy "counter"
c.bump(); c.bump()
assert(c.bucket:try(2))
assert(resil.reload())
print(c.bump(), (c.bucket:try(1)))
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("3\tfalse\n", r.stdout)
  end)

  it("refuses a policy that returns something other than a table, naming the file", function()
    local r = run(policy_dir(1), [[
local resil = require "resil"
local greet = resil.policy "greet"
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write("return 42")
f:close()
local ok, err = resil.reload()
print(ok, greet.version)
io.stderr:write(err, "\n")
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\t1\n", r.stdout)
    assert.matches("greet%.lua: policies%.greet returned number, not a table", r.stderr)
  end)

  -- the two below wait for a real signal or a real file event; each waits at
  -- most 10 s and stops as soon as the reload is seen
  local waiter = [[
local resil = require "resil"
local greet = resil.policy "greet"
local function wait_for(v)
  for _ = 1, 1000 do
    if greet.version == v then return true end
    resil.sleep(0.01)
  end
  return false
end
]]

  -- (a series born at 1 has no increase() in Prometheus: ResilReloadFailing missed a process's first failure)
  it("exports resil_reloads_total's series at 0 before the first reload, then counts the failure", function()
    local r = run(policy_dir(1), [[
local resil = require "resil"
local dir = arg[1]
require "policies.greet"
local function series() return (resil.metrics.text():match('resil_reloads_total{result="failed"} %d+') or "none") end
print(series())
local f = io.open(dir .. "/greet.lua", "w")
f:write("return {")
f:close()
resil.reload()
print(series())
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal('resil_reloads_total{result="failed"} 0\nresil_reloads_total{result="failed"} 1\n', r.stdout)
  end)

  -- (before: the deleted module's "not found" failed that reload and every one after, until a restart)
  it("a module whose file was deleted keeps its loaded version, and the others reload", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/canary.lua", "return { share = 0.1 }")
    helpers.write(dir .. "/router.lua", "local canary = require 'policies.canary'\nreturn { v = 1 }")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local router, canary = resil.policy "router", resil.policy "canary"
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
-- the canary is over: the router stops using it and its file is removed
write("router.lua", "return { v = 2 }")
os.remove(dir .. "/canary.lua")
print(resil.reload(), router.v, canary.share)
write("greet.lua", "return { version = 3 }")
print(resil.reload(), router.v, require("policies.greet").version)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\t2\t0.1\ntrue\t2\t3\n", r.stdout)
  end)

  -- (before: every module ever loaded was loaded again at each reload, one no policy required any
  -- more too, so its server answered, its task ran and its rule held until a restart; deleting its
  -- file kept its loaded version, server and task with it)
  it("unloads a module no policy requires any more: its server closes, its task ends, its rule goes", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/extra.lua", [[
local resil = require "resil"
require("policies.classify").status[418] = "retryable"
local ticks = resil.keep("extra.ticks", function() return { n = 0 } end)
resil.spawn(function() while true do ticks.n = ticks.n + 1; resil.sleep(0.01) end end)
local s = resil.server.listen({ port = 0, handler = function() return { status = 200, body = "extra" } end })
return { port = s:port() }
]])
    helpers.write(dir .. "/router.lua", "require 'policies.extra'\nreturn { v = 1 }")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local router = resil.policy "router"
local port = package.loaded["policies.extra"].port
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
local function seen()
  local res = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(port), timeout = 2 })
  local ticks = resil.keep("extra.ticks").n
  resil.sleep(0.05)
  return ("%s %s %s %s"):format(res and res.body or "closed", tostring(require("policies.classify").status[418]),
    package.loaded["policies.extra"] ~= nil and "loaded" or "unloaded",
    resil.keep("extra.ticks").n > ticks and "ticking" or "ended")
end
print(seen())
write("router.lua", "return { v = 2 }") -- the router stops using it
print(resil.reload(), router.v, seen())
os.remove(dir .. "/extra.lua")
print(resil.reload(), seen())
os.exit(0) -- (its task, ticking, would hold the script)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("extra retryable loaded ticking\ntrue\t2\tclosed nil unloaded ended\n" ..
      "true\tclosed nil unloaded ended\n", r.stdout)
  end)

  -- (as the README says: a script that uses a module a policy requires too requires it first, and the
  -- module stays its own when the policy drops it)
  it("keeps loading a module the script required before a policy did, once the policy drops it", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/extra.lua", [[
local resil = require "resil"
local s = resil.server.listen({ port = 0, handler = function() return { status = 200, body = "extra" } end })
return { port = s:port() }
]])
    helpers.write(dir .. "/router.lua", "require 'policies.extra'\nreturn { v = 1 }")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local extra = require "policies.extra"
local router = require "policies.router"
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
write("router.lua", "return { v = 2 }")
local ok = resil.reload()
local state = package.loaded["policies.extra"] ~= nil and "loaded" or "unloaded"
-- (the script's own table: its server the one it found, ended if the module was unloaded)
local res = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(extra.port), timeout = 2 })
print(ok, require("policies.router").v, state, res and res.body or "closed")
os.exit(0)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\t2\tloaded\textra\n", r.stdout)
  end)

  it("keeps loading a module a resil.keep init required, though the init ran during a reload", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/helper.lua", "return { n = 1 }")
    helpers.write(dir .. "/p.lua", "return { v = 1 }")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local p = resil.policy "p"
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
write("p.lua", [=[
local kept = require("resil").keep("p.kept", function() return { helper = require "policies.helper" } end)
return { v = 2, helper = kept.helper }
]=])
assert(resil.reload())
write("p.lua", "return { v = 3, helper = require('resil').keep('p.kept').helper }")
assert(resil.reload())
print(p.v, package.loaded["policies.helper"] ~= nil)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("3\ttrue\n", r.stdout)
  end)

  it("reloads on SIGHUP", function()
    local r = run(policy_dir(1), waiter .. [[
local pid = io.open("/proc/self/stat"):read("a"):match("^(%d+)")
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write("return { version = 2 }")
f:close()
os.execute("kill -HUP " .. pid)
print(wait_for(2))
]], "--log-level info")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\n", r.stdout)
    assert.matches('"msg":"policies reloaded"', r.stderr)
  end)

  -- (before: one full reload per signal caught, back to back, the loop held all the while)
  it("SIGHUPs that come at once make one reload", function()
    local r = run(policy_dir(1), [[
local resil = require "resil"
require "policies.greet"
local pid = io.open("/proc/self/stat"):read("a"):match("^(%d+)")
-- each kill its own process, each signal caught: the loop sees them all at its next turn
os.execute(("for i in $(seq 20); do kill -HUP %s; done"):format(pid))
resil.sleep(0.05)
local ok = resil.metrics.counter("resil_reloads_total"):value({ result = "ok" })
os.execute("kill -HUP " .. pid) -- a later one reloads again
resil.sleep(0.05)
print(ok, resil.metrics.counter("resil_reloads_total"):value({ result = "ok" }))
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\t2\n", r.stdout)
  end)

  -- (before: each file was compiled twice per reload, once to see that it still exists and again
  -- to load it: the loop, every gateway request with it, was held twice as long, 35 ms a SIGHUP
  -- for the shipped policies. Seen here as the bytes the process reads during the reload.)
  it("reads and compiles each policy file once per reload", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/big.lua", ("-- %s\n"):format(("x"):rep(100)):rep(20000) .. "return { big = true }\n")
    local r = run(dir, [[
local resil = require "resil"
require "policies.big"
local function read_bytes() return tonumber(io.open("/proc/self/io"):read("a"):match("rchar: (%d+)")) end
local before = read_bytes()
assert(resil.reload())
print(read_bytes() - before)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    local size = 20000 * 104 + 22
    local read = tonumber(r.stdout)
    assert.is_true(read >= size and read < size * 1.5, ("the reload read %s bytes of a %d-byte file"):format(r.stdout, size))
  end)

  -- (a reload takes a file whose bytes it compiled before in its compiled form: each reload
  -- compiled every file, 24 ms of CPU a SIGHUP for the gateway's, the loop held all the while)
  it("loads each file as it is now: one edited to the same size at once, one put back, a #! line", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/script.lua", "#!/usr/bin/env resil-lua\nreturn {\n  v = 1,\n}\n")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local function write(name, text) local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text); f:close() end
local greet = resil.policy "greet"
require "policies.script"
local out = { greet.version }
for _, v in ipairs({ 2, 1, 3 }) do -- (the same size each time, within the same second)
  write("greet.lua", ("return { version = %d, hello = function() return 'v%d' end }"):format(v, v))
  assert(resil.reload())
  out[#out + 1] = greet.version .. greet.hello()
end
write("script.lua", "#!/usr/bin/env resil-lua\nreturn {\n  v = oops oops,\n}\n")
local ok, err = resil.reload()
out[#out + 1] = tostring(ok) .. " " .. require("policies.script").v
print(table.concat(out, " "))
io.stderr:write(err, "\n")
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1 2v2 1v1 3v3 false 1\n", r.stdout)
    assert.matches("script.lua:3: ", r.stderr, 1, true)
  end)

  it("reloads when a file changes with --watch", function()
    local r = run(policy_dir(1), waiter .. [[
resil.sleep(0.05)
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write("return { version = 3 }")
f:close()
print(wait_for(3))
]], "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\n", r.stdout)
  end)

  -- (before: `rm` reloaded, `mv` out of the folder (or to x.lua.bak) did not: the project's copy of
  -- the registry moved away kept serving until the next edit of any other file)
  it("reloads when a file is moved out of the folder, as when it is deleted", function()
    local dir = policy_dir(1)
    local attic = helpers.tmpname("-attic")
    assert(os.execute("mkdir -p " .. attic))
    helpers.write(dir .. "/models.lua", 'return { mine = { use = "openai/gpt-4o-mini-2024-07-18" } }')
    local r = run(dir, ([[
local resil = require "resil"
local registry = resil.policy "models"
print(registry.mine ~= nil)
resil.sleep(0.05)
assert(os.execute(%q))
for _ = 1, 1000 do
  if registry.mine == nil then break end
  resil.sleep(0.01)
end
print(registry.mine ~= nil, registry["chat-fast"] ~= nil) -- the shipped registry now
]]):format(("mv %s/models.lua %s/"):format(dir, attic)), "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\nfalse\ttrue\n", r.stdout)
  end)
end)

describe("policy reload with --watch, an editor's files beside the policies", function()
  -- (before: Emacs's lock file `.#x.lua`, a dangling link it makes at the first change of a buffer
  -- and takes away at the save, ended in .lua: each reloaded every policy, before the file was saved,
  -- each a version's tasks canceled and a gateway's config run again)
  it("a file whose name starts with a dot (never a module: .#counted.lua) reloads nothing", function()
    local dir = policy_dir(1)
    helpers.write(dir .. "/counted.lua", [[
local loads = require("resil").keep("counted.loads", function() return { n = 0 } end)
loads.n = loads.n + 1
return { loads = loads }
]])
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local counted = require "policies.counted"
resil.sleep(0.05)
assert(os.execute(("ln -s 'me@host.1234:1700000000' '%s/.#counted.lua'"):format(dir)))
resil.sleep(0.5)
assert(os.execute(("rm '%s/.#counted.lua'"):format(dir)))
resil.sleep(0.5)
print(counted.loads.n)
local f = assert(io.open(dir .. "/counted.lua", "a"))
f:write("-- saved\n")
f:close()
for _ = 1, 1000 do
  if counted.loads.n > 1 then break end
  resil.sleep(0.01)
end
print(counted.loads.n)
]], "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1\n2\n", r.stdout)
  end)
end)

describe("policy reload with --watch, when folders change", function()
  it("watches a subfolder replaced by mv or made after start", function()
    local dir = policy_dir(1)
    assert(os.execute("mkdir -p " .. dir .. "/sub"))
    helpers.write(dir .. "/sub/m.lua", "return { v = 1 }")
    local r = run(dir, [[
local resil = require "resil"
local dir = arg[1]
local m = resil.policy "sub.m"
local function wait_for(p, v)
  for _ = 1, 1000 do
    if p.v == v then return true end
    resil.sleep(0.01)
  end
  return false
end
local function write(path, text) local f = assert(io.open(path, "w")); f:write(text); f:close() end
resil.sleep(0.05)
-- a deploy that replaces policies/sub: the new folder's own files are watched
assert(os.execute(("mkdir %s/sub.new && mv %s/sub %s/sub.old"):format(dir, dir, dir)))
write(dir .. "/sub.new/m.lua", "return { v = 2 }")
assert(os.execute(("mv %s/sub.new %s/sub"):format(dir, dir)))
print(wait_for(m, 2))
write(dir .. "/sub/m.lua", "return { v = 3 }")
print(wait_for(m, 3))
-- a folder made after start
assert(os.execute(("mkdir %s/fresh"):format(dir)))
write(dir .. "/fresh/n.lua", "return { v = 1 }")
local n = resil.policy "fresh.n"
resil.sleep(0.3)
write(dir .. "/fresh/n.lua", "return { v = 2 }")
print(wait_for(n, 2))
]], "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\ntrue\ntrue\n", r.stdout)
  end)
end)

describe("policy reload with --watch, a module deep in its folder", function()
  -- (before: folders were watched two below the policy folder only: an edit of
  -- policies.team.shared.lib.x (pol/team/shared/lib/x.lua) reloaded nothing, an edit one folder up did)
  it("reloads on an edit of a module four folders down, loaded before the watch started or after", function()
    local dir = policy_dir(1)
    assert(os.execute(("mkdir -p %s/team/shared/lib %s/team/other/deep/er"):format(dir, dir)))
    helpers.write(dir .. "/team/shared/lib/x.lua", "return { v = 1 }")
    helpers.write(dir .. "/team/other/deep/er/y.lua", "return { v = 1 }")
    local r = run(dir, [[
local resil = require "resil"
local x = resil.policy "team.shared.lib.x"
assert(x.v == 1)
resil.watch(true)
local y = resil.policy "team.other.deep.er.y"
assert(y.v == 1)
resil.sleep(0.05)
local function edit(path)
  local f = assert(io.open(arg[1] .. path, "w"))
  f:write("return { v = 2 }")
  f:close()
end
local function wait_for(p)
  for _ = 1, 500 do
    if p.v == 2 then return p.v end
    resil.sleep(0.01)
  end
  return p.v
end
edit("/team/shared/lib/x.lua")
print(wait_for(x))
edit("/team/other/deep/er/y.lua")
print(wait_for(y))
os.exit(0)
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("2\n2\n", r.stdout)
  end)
end)

describe("policy reload with --watch, when inotify's queue overflows", function()
  it("reloads all the same", function()
    local max = tonumber(helpers.slurp("/proc/sys/fs/inotify/max_queued_events"):match("%d+") or "")
    if not max or max > 100000 then return pending("max_queued_events too large to overflow here") end
    local dir = policy_dir(1)
    local r = run(dir, ([[
local resil = require "resil"
local greet = resil.policy "greet"
resil.sleep(0.05)
-- while the loop is busy, a deploy writes more files than the kernel queues events for, the policy last
assert(os.execute("cd " .. arg[1] .. " && for i in $(seq %d); do : > f$i.txt; done && " ..
  "echo 'return { version = 2 }' > greet.lua"))
for _ = 1, 1000 do
  if greet.version == 2 then break end
  resil.sleep(0.01)
end
print(greet.version)
]]):format(max // 2 + 100), "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("2\n", r.stdout)
  end)
end)

describe("policy reload with --watch, when a policy file is a symlink", function()
  it("reloads when the file a policy links to is edited, or a link further along is swapped", function()
    local dir = policy_dir(1)
    local real = helpers.tmpname("-real")
    assert(os.execute(("mkdir -p %s/v1 %s/v2"):format(real, real)))
    helpers.write(real .. "/v1/linked.lua", "return { v = 1 }")
    helpers.write(real .. "/v2/linked.lua", "return { v = 3 }")
    -- as a Kubernetes ConfigMap mounts it: linked.lua -> current/linked.lua, current -> v1
    assert(os.execute(("ln -s %s/v1 %s/current && ln -s %s/current/linked.lua %s/linked.lua"):format(
      real, real, real, dir)))
    local r = run(dir, ([[
local resil = require "resil"
local m = resil.policy "linked"
local function wait_for(v)
  for _ = 1, 1000 do
    if m.v == v then return true end
    resil.sleep(0.01)
  end
  return false
end
resil.sleep(0.05)
local f = assert(io.open(%q, "w"))
f:write("return { v = 2 }")
f:close()
print(wait_for(2))
assert(os.execute(%q))
print(wait_for(3))
]]):format(real .. "/v1/linked.lua", ("ln -s %s/v2 %s/tmp && mv -T %s/tmp %s/current"):format(real, real, real, real)),
      "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\ntrue\n", r.stdout)
  end)

  -- (before: only the links there at start were followed; a file a deploy replaced by a link
  -- (`ln -s ... tmp && mv tmp x.lua`) was reloaded once, and the edits of its target never)
  it("follows a link that came after start: its target's edits reload", function()
    local dir = policy_dir(1)
    local real = helpers.tmpname("-real")
    assert(os.execute("mkdir -p " .. real))
    helpers.write(dir .. "/linked.lua", "return { v = 0 }")
    helpers.write(real .. "/linked.lua", "return { v = 1 }")
    local r = run(dir, ([[
local resil = require "resil"
local m = resil.policy "linked"
local function wait_for(v)
  for _ = 1, 1000 do
    if m.v == v then return true end
    resil.sleep(0.01)
  end
  return false
end
resil.sleep(0.05)
assert(os.execute(%q))
print(wait_for(1))
local f = assert(io.open(%q, "w"))
f:write("return { v = 2 }")
f:close()
print(wait_for(2))
]]):format(("ln -s %s/linked.lua %s/tmp.lua && mv -T %s/tmp.lua %s/linked.lua"):format(real, dir, dir, dir),
      real .. "/linked.lua"), "--watch --log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\ntrue\n", r.stdout)
  end)
end)

describe("policy reload under the host's caps", function()
  -- stopped after 60 s of CPU time (ulimit -t): without the caps these spin forever. (Not 10 s of
  -- wall time: the reload's own cap, 200,000,000 instructions, took longer than that on a busy
  -- machine under ASan, and the run was killed with its cap working.) 120 s of wall time for one
  -- that hangs without spinning.
  local function run_capped(dir, source, opts)
    local path = helpers.write(helpers.tmpname(".lua"), source)
    return helpers.run(("ulimit -t 60; timeout -s KILL 120 %s --policies %s %s %s %s"):format(helpers.resil, dir, opts,
      path, dir))
  end

  -- the script replaces greet.lua with `body`, reloads (through resil.reload()
  -- or SIGHUP, whose reload runs outside any task) and prints the version
  -- that serves then
  local function reload_with(body, how, opts)
    local dir = policy_dir(1)
    local log = helpers.tmpname(".log")
    local r = run_capped(dir, ([[
local resil = require "resil"
local greet = resil.policy "greet"
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write(%q)
f:close()
if %q == "sighup" then
  local pid = io.open("/proc/self/stat"):read("a"):match("^(%%d+)")
  os.execute("kill -HUP " .. pid)
  for _ = 1, 500 do
    local l = io.open(%q)
    if l and l:read("a"):match("policy reload failed") then break end
    resil.sleep(0.01)
  end
else
  local ok, err = resil.reload()
  print(ok, err)
end
print("serving", greet.version, greet.hello())
]]):format(body, how, log), opts .. " --log-file " .. log)
    r.log = helpers.slurp(log)
    os.remove(log)
    return r
  end

  for _, how in ipairs({ "resil.reload", "sighup" }) do
    -- under --max-instructions, and without it under the reload's own cap
    for _, cap in ipairs({ "1000000", "200000000" }) do
      local opts = cap == "1000000" and "--max-instructions " .. cap or ""
      it(how .. " " .. opts .. ": a policy that loops at load fails the reload with file:line; the old version " ..
         "serves", function()
        local r = reload_with("local n = 0\nwhile true do n = n + 1 end\n", how, opts)
        assert.are.equal(0, r.code, r.stderr)
        assert.matches("serving\t1\tv1\n$", r.stdout)
        -- (the reload's own cap is named as such: --max-instructions was never given)
        assert.matches(cap == "1000000" and "greet%.lua:2: policy reload ran more than %-%-max%-instructions=1000000"
          or "greet%.lua:2: policy reload ran more than 200000000 instructions as it loaded", r.log)
      end)
    end

    it(how .. ": a policy that allocates without end at load fails the reload; the old version serves", function()
      local r = reload_with("local t = {}\nfor i = 1, 1e9 do t[i] = {} end\n", how, "--max-memory 32M")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("serving\t1\tv1\n$", r.stdout)
      -- the file that allocated is named (the log said "reload: not enough memory", which of a
      -- project's files it was not)
      assert.matches("reload: [^\n]*greet%.lua: not enough memory", r.log)
    end)
  end

  it("counts a reload a cap stopped as failed in resil_reloads_total", function()
    for _, case in ipairs({ { "local n = 0\nwhile true do n = n + 1 end\n", "--max-instructions 1000000" },
                            { "local t = {}\nfor i = 1, 1e9 do t[i] = {} end\n", "--max-memory 32M" } }) do
      local dir = policy_dir(1)
      local r = run_capped(dir, ([[
local resil = require "resil"
local greet = resil.policy "greet"
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write(%q)
f:close()
print(resil.reload())
print(greet.version, resil.metrics.counter("resil_reloads_total"):value({ result = "failed" }))
]]):format(case[1]), case[2] .. " --log-level off")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("\n1\t1\n$", r.stdout)
    end
  end)

  it("collects what a failed reload allocated at once", function()
    for _, body in ipairs({ "local t = {}\nfor i = 1, 1e9 do t[i] = {} end\n",           -- stopped by the cap
                            "local t = {}\nfor i = 1, 1e6 do t[i] = {} end\nerror('late')\n" }) do -- its own error
      local dir = policy_dir(1)
      local r = run_capped(dir, ([[
local resil = require "resil"
local greet = resil.policy "greet"
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write(%q)
f:close()
local before = collectgarbage("count")
print(resil.reload())
print(greet.version, collectgarbage("count") - before < 8 * 1024)
]]):format(body), "--max-instructions 10000000 --log-level off")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("\n1\ttrue\n$", r.stdout)
    end
  end)

  -- (before: without --max-memory it ran on to the reload's instruction cap, holding the loop for
  -- half a minute and taking gigabytes; here 3 GB, a cap of 200M instructions)
  it("without --max-memory, a reload that allocates without end stops at its own memory cap", function()
    local dir = policy_dir(1)
    local r = run_capped(dir, [[
local resil = require "resil"
local greet = resil.policy "greet"
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write("local big, t = ('x'):rep(65536):rep(16), {}\nfor i = 1, 1e9 do for _ = 1, 20000 do end t[i] = big .. i end\n")
f:close()
print(resil.reload())
print(greet.version)
for line in io.lines("/proc/self/status") do
  local kb = line:match("^VmRSS:%s*(%d+) kB")
  if kb then print("rss_mb", tonumber(kb) // 1024) end
end
]], "--log-level off")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^false\treload: [^\n]*greet%.lua: not enough memory", r.stdout)
    assert.matches("\n1\n", r.stdout)
    -- ...and gives the memory back to the machine: the process held the 1 GiB it reached (mimalloc
    -- keeps freed pages; a gateway stayed at 1.3 GB, each of its --workers, after one broken save).
    -- (sanitizer builds bring their own allocator, which keeps freed memory in quarantine)
    if not (os.getenv("SAN_FLAGS") or ""):find("address", 1, true) then
      local rss = tonumber(r.stdout:match("rss_mb\t(%d+)"))
      assert.is_true(rss < 512, r.stdout)
    end
  end)

  it("the first SIGTERM stops a host whose reload loops", function()
    local dir = policy_dir(1)
    local pid, out = helpers.start([[
local resil = require "resil"
require "policies.greet"
local f = io.open(arg[1] .. "/greet.lua", "w")
f:write("print('loading'); io.stdout:flush(); while true do end")
f:close()
os.execute("kill -HUP " .. io.open("/proc/self/stat"):read("a"):match("^(%d+)"))
resil.sleep(3600)
]], "--policies " .. dir, dir)
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    require("resil").clock.real()
    assert.is_true(helpers.wait_until(function() return helpers.slurp(out):match("loading") ~= nil end, 10))
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10), "still running")
    assert.matches("interrupted by signal 15", helpers.slurp(out))
  end)
end)

describe("a SIGHUP while the host opens", function()
  -- (before: the reload's handler was set once the host was open; a SIGHUP before, a deploy's reload
  -- right after a start, killed the process: exit 129)
  it("is ignored: the script runs to its end", function()
    local script = helpers.write(helpers.tmpname(".sh"), [[
R=$1
$R -e 'require("resil").sleep(0.3) print("ran")' 2>/dev/null & P=$!
for _ in $(seq 2000); do ls -l /proc/$P/fd 2>/dev/null | grep -q eventpoll && break; done
for _ in $(seq 200); do kill -HUP $P 2>/dev/null || break; sleep 0.001; done
wait $P; echo "exit $?"
]])
    for _ = 1, 3 do -- (the open lasts milliseconds: HUPs from its epoll's making on, each start)
      local r = helpers.run(("bash %s %s"):format(script, helpers.resil))
      assert.are.equal("ran\nexit 0\n", r.stdout)
    end
    os.remove(script)
  end)
end)
