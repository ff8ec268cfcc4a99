-- resil.policy(name): a policy that is not there, or does not load, is an
-- error at the caller's line (it named a line of the host's prelude).
local resil = require "resil"
local helpers = require "spec.helpers"

describe("resil.policy", function()
  it("a policy not found is the caller's file:line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() local p = resil.policy("no_such_policy_here"); return p end)
    assert.is_false(ok)
    -- (was "[resil prelude]:NNN: module ... not found")
    assert.matches("^spec/policy_view_spec%.lua:" .. line .. ": module 'policies%.no_such_policy_here' not found",
      tostring(err))
  end)

  -- (before: "[resil prelude]:769: attempt to concatenate a nil value (local 'name')"; resil.keep's
  -- "table index is nil", and "attempt to call a table value (local 'init')" for a default table)
  it("a name that is no string, and resil.keep's init that is no function, are the caller's line", function()
    local calls = {
      { function() local p = resil.policy(nil); return p end, "resil%.policy: name must be a string" },
      { function() local p = resil.policy({}); return p end, "resil%.policy: name must be a string" },
      { function() local t = resil.keep(nil); return t end, "resil%.keep: name must be a string, got nil" },
      { function() local t = resil.keep(0 / 0); return t end, "resil%.keep: name must be a string, got NaN" },
      { function() local t = resil.keep("spec-keep-default", { n = 0 }); return t end,
        "resil%.keep: init must be a function that returns the table to keep, got table" },
    }
    for _, c in ipairs(calls) do
      local ok, err = pcall(c[1])
      assert.is_false(ok)
      assert.matches("^spec/policy_view_spec%.lua:" .. debug.getinfo(c[1], "S").linedefined .. ": " .. c[2], tostring(err))
    end
    assert.are.same({}, resil.keep("spec-keep-default")) -- (nothing kept by the refused call)
  end)

  it("a policy that does not compile is the caller's line and the file's", function()
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir .. "/policies")
    helpers.write(dir .. "/policies/broken.lua", "return {\n")
    helpers.write(dir .. "/main.lua", 'local resil = require "resil"\n\nlocal p = resil.policy("broken")\n')
    local r = helpers.run(("cd %s && %s main.lua"):format(dir, helpers.resil))
    os.execute("rm -rf " .. dir)
    assert.are.equal(1, r.code)
    assert.matches("main%.lua:3: error loading policy 'policies%.broken':\n%s*policies/broken%.lua:2:", r.stderr)
  end)
end)

-- (before: the view was an empty table with __index: pairs() over it gave nothing and # gave 0,
-- silently, and a field set on it shadowed that field of every later version)
describe("resil.policy's view", function()
  it("iterates, counts and sets the version loaded now, across a reload", function()
    local dir = helpers.tmpname("-policies")
    os.execute("mkdir -p " .. dir)
    helpers.write(dir .. "/routes.lua", 'return { "a", "b", fast = 1 }')
    local r = helpers.run_script(([[
local resil = require "resil"
local routes = resil.policy "routes"
local function keys()
  local out = {}
  for k, v in pairs(routes) do out[#out + 1] = tostring(k) .. "=" .. tostring(v) end
  table.sort(out)
  return table.concat(out, " ")
end
routes.slow = 2
print(#routes, keys(), require("policies.routes").slow)
local f = io.open(%q, "w")
f:write('return { "a", "b", "c", fast = 3 }')
f:close()
assert(resil.reload())
print(#routes, keys(), routes.slow)
]]):format(dir .. "/routes.lua"), "--policies " .. dir .. " --log-level off")
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("2\t1=a 2=b fast=1 slow=2\t2\n3\t1=a 2=b 3=c fast=3\tnil\n", r.stdout)
  end)
end)
