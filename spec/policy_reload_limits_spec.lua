-- A reload that fails puts the old set back, and with it the options a
-- policy gives its named limits as it loads. Buckets, breakers, semaphores
-- and budgets are one object per name for every version; a load of the
-- broken set that named them with new options (a budget cut from $10 to $1,
-- a rate from 10/s to 1/s) set those for the version the log said "keeps
-- serving", and for good: a budget's limit is written to the store.
local helpers = require "spec.helpers"

local V1 = [[
local resil = require "resil"
return {
  budget = resil.budget("proj", { limit = 10, per = "day" }),
  bucket = resil.bucket("proj:rpm", { rate = 10, per = 1, burst = 10 }),
  shared = resil.bucket("proj:shared", { rate = 20, per = 1, burst = 20, shared = true }),
  breaker = resil.breaker("proj:br", { failure_rate = 0.5, min_calls = 10, window = 30, open_for = 30 }),
  sem = resil.semaphore("proj:sem", { size = 4 }),
}
]]
local V2 = V1:gsub("limit = 10", "limit = 1"):gsub("rate = 10, per = 1, burst = 10", "rate = 1, per = 1, burst = 1")
  :gsub("rate = 20, per = 1, burst = 20", "rate = 2, per = 1, burst = 2")
  :gsub("failure_rate = 0.5, min_calls = 10", "failure_rate = 0.1, min_calls = 1"):gsub("size = 4", "size = 1")

describe("a reload that fails", function()
  it("leaves the named limits with the options the old version gave them", function()
    local dir = helpers.policy_dir({ ["limits.lua"] = V1, ["other.lua"] = "return { ok = true }\n" })
    local db = helpers.tmpname(".db")
    local r = helpers.run_script(([[
      local resil = require "resil"
      local limits = resil.policy("limits")
      require "policies.other"
      local function write(name, text) local f = assert(io.open(%q .. "/" .. name, "w")) f:write(text) f:close() end
      local function show()
        local b, s, m = limits.bucket:state(), limits.shared:state(), limits.sem:state()
        print(limits.budget:state().limit, b.rate, b.burst, s.rate, s.burst, m.size)
      end
      show()
      write("limits.lua", %q)
      write("other.lua", "return { ok =\n")                   -- broken: the reload fails
      print(resil.reload())
      show()
      for _ = 1, 3 do limits.breaker:record(false) end        -- v2's breaker opened at the first
      print(limits.breaker:state())
      write("other.lua", "return { ok = true }\n")            -- fixed: v2 goes in
      assert(resil.reload())
      show()
    ]]):format(dir, V2), ("--store %s --policies %s --log-level off"):format(db, dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("10\t10\t10\t20\t20\t4", lines[1])
    assert.matches("^false\treload: ", lines[2])
    assert.are.equal("10\t10\t10\t20\t20\t4", lines[4]) -- (was: 1 1 1 2 2 1, the broken set's)
    assert.are.equal("closed", lines[5])
    assert.are.equal("1\t1\t1\t2\t2\t1", lines[6])
    -- what the store says of the budget: the old version's limit
    local shown = helpers.run(("%s budgets show proj --store %s"):format(helpers.resil, db))
    assert.matches("limit %$1%.000000", shown.stdout) -- (the last successful reload's)
  end)

  it("keeps the limits' options the old version gave them in the store too (budgets show)", function()
    local dir = helpers.policy_dir({ ["limits.lua"] = V1, ["other.lua"] = "return { ok = true }\n" })
    local db = helpers.tmpname(".db")
    local r = helpers.run_script(([[
      local resil = require "resil"
      local limits = resil.policy("limits")
      require "policies.other"
      local function write(name, text) local f = assert(io.open(%q .. "/" .. name, "w")) f:write(text) f:close() end
      assert(limits.budget:reserve(0.5)):settle(0.5)
      write("limits.lua", %q)
      write("other.lua", "return { ok =\n")
      print(resil.reload())
      local t, err = limits.budget:reserve(2)                 -- under $10, over $1
      print(t ~= nil, err and err.kind)
    ]]):format(dir, V2), ("--store %s --policies %s --log-level off"):format(db, dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("\ntrue\tnil\n$", r.stdout)
    local shown = helpers.run(("%s budgets show proj --store %s"):format(helpers.resil, db))
    assert.matches("limit %$10%.000000", shown.stdout)
  end)

  it("(the constructors' own errors still name the caller's line)", function()
    local r = helpers.run_script('local resil = require "resil"\nresil.semaphore("s", 5)\n')
    assert.matches(":2: bad argument #2 to 'semaphore' %(table expected, got number%)", r.stderr)
    r = helpers.run_script('local resil = require "resil"\nresil.semaphore("s", { size = 0 })\n')
    assert.matches(":2: semaphore 's': size must be an integer >= 1, got 0", r.stderr)
    r = helpers.run_script('local resil = require "resil"\n\nresil.budget("b", { limit = -1 })\n', "--store " .. helpers.tmpname(".db"))
    assert.matches(":3: resil.budget: limit must be a number", r.stderr)
    r = helpers.run_script('local resil = require "resil"\nresil.bucket("b", { rate = 0 })\n')
    assert.matches(":2: bucket 'b': rate must be a positive number", r.stderr)
  end)
end)

describe("a policy file that loops as a reload loads it", function()
  it("is stopped at the load's own cap, named as such: not as --max-instructions, which was never given", function()
    local dir = helpers.policy_dir({ ["p.lua"] = "return { ok = true }\n" })
    local r = helpers.run_script(([[
      local resil = require "resil"
      require "policies.p"
      local f = assert(io.open(%q .. "/p.lua", "w")) f:write("while true do end\nreturn {}\n") f:close()
      print(resil.reload())
      print(require("policies.p").ok)                      -- the old version keeps serving
    ]]):format(dir), ("--policies %s --log-level off"):format(dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("p%.lua:1: policy reload ran more than 200000000 instructions as it loaded", r.stdout)
    assert.is_nil(r.stdout:find("--max-instructions", 1, true))
    assert.matches("\ntrue\n$", r.stdout)
  end)
end)
