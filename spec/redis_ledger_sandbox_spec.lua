local helpers = require "spec.helpers"

-- The Redis backend loads when a store first uses it, after a script may have run, and encoded
-- each ledger row and step record with resil.json, looked up as each was written: a sandboxed
-- script that replaced resil.json.encode rewrote the rows of its process (the costs of the calls
-- made for it written as $0). A real redis-server.
describe("a sandboxed script and the ledger on Redis", function()
  it("does not rewrite the rows its process records", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local encode = resil.json.encode
pcall(function()
  resil.json.encode = function(v)
    if type(v) == "table" and v.micro_usd then v.micro_usd = 0 end
    return encode(v)
  end
end)
assert(resil.cost.record({ provider = "openai", model = "m", usd = 1.5 }))
print(resil.cost.total({}))
]])
    local r = helpers.run(("%s --sandbox --log-level off --store %s %s"):format(helpers.resil, redis.url(), script))
    os.remove(script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(1.5, tonumber(r.stdout))
  end)
end)
