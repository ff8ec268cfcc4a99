-- The leases' clock on Redis (store_redis.lua's lease_skew: the caller's virtual lead) is the
-- host's, not a sandboxed script's: the Redis backend loads when a store first uses it, after a
-- script may have run, and took resil.clock's and resil.store_now's functions from the resil
-- table then. A script that replaced them before its first Redis store had its process judge
-- every other host's lease lapsed: a live holder's budget hold freed (the budget spent twice).
-- Real processes against a real redis-server; "another host" is a process in a pid namespace of
-- its own (judged by its lease, not its pid).
local helpers = require "spec.helpers"

local can_unshare = os.execute("unshare -p -f --mount-proc true > /dev/null 2>&1") == true
local describe_ns = can_unshare and describe or pending

describe_ns("a sandboxed script and the leases' clock on Redis", function()
  local redis
  setup(function() redis = helpers.redis_server() end)
  teardown(function() if redis then redis.stop() end end)

  it("cannot make its process take a live holder on another host for lapsed (its budget hold freed)", function()
    local url, saved = redis.url(), helpers.resil
    helpers.resil = "unshare -p -f --mount-proc --kill-child=KILL " .. saved
    local pid, out = helpers.start([[
local resil = require "resil"
assert(resil.budget("sandboxed", { limit = 1 }):reserve(0.8))
print("held"); io.stdout:flush()
while true do resil.sleep(1) end
]], ("--store %s --log-level off"):format(url))
    helpers.resil = saved
    finally(function() os.execute("kill -KILL " .. pid .. " 2> /dev/null") end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
pcall(function()
  resil.clock.is_virtual = function() return true end
  resil.store_now = function() return 4e9 end
end)
local t, err = resil.budget("sandboxed", { limit = 1 }):reserve(0.5)
print(t and "reserved" or err.kind)
]]))
    -- (the store named by the operator, opened at its first use: after the script's replacements)
    local r = helpers.run(("%s --sandbox --store %s --log-level off %s"):format(saved, url, script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("budget_exceeded\n", r.stdout)
  end)
end)
