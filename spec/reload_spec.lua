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
end)
