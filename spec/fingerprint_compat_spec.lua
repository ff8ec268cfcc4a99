-- A stored fingerprint (a once key in flight, a run's items) must match after an upgrade. The
-- fingerprint writes a large table met again as #n (e6e2fa5: a structure sharing its parts at
-- many levels was walked once per path); done for every input, it changed the fingerprint of
-- ordinary ones that share a large part only once or twice, met first nearer the top: a once key
-- stored before was key_reused, a run resumed across the upgrade diverged at that item. These are
-- the values the fingerprint gave before e6e2fa5.
describe("resil.once's fingerprint across the upgrade", function()
  it("is the one it was for inputs that share a large part a few times", function()
    local fp = require("resil.once").fingerprint
    local L = { text = ("y"):rep(2000), n = 1 }
    local item = { doc = L, ctx = { source = L, model = "m" } }
    assert.are.same({ "4e43971d4df99b5f", "3da7120c752d459c" }, { fp({ a = L, b = { inner = L } }), fp(item, 3) })
  end)

  it("still takes a structure that shares its parts at 40 levels at once", function()
    local fp = require("resil.once").fingerprint
    local function dag(note)
      local x = {}
      for i = 1, 40 do x = { a = x, b = x, level = i, note = i == 20 and note or nil } end
      return x
    end
    local a, b, c = fp(dag("leaf")), fp(dag("leaf")), fp(dag("other leaf"))
    assert.are.equal(a, b)
    assert.are_not.equal(a, c)
  end)
end)
