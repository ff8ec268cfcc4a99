-- `resil-lua check` loads a project's files under the memory cap a reload
-- has without --max-memory (1 GiB more than the process holds): a policy
-- file that allocated without end at load took the machine's memory
-- (7 GB in 35 s under an 8 GB ulimit, all of it without one) before the
-- instruction cap came.
local helpers = require "spec.helpers"

describe("resil-lua check and a file that allocates without end at load", function()
  it("loads under a reload's memory cap: an allocation past 1 GiB more fails, the cap lifted after", function()
    local load_capped = require "resil.load_capped" -- (what check runs each file's load in)
    local ok, err = load_capped(function()
      local t = {}
      for i = 1, 1536 do t[i] = ("x"):rep(1024 * 1024) .. i end -- 1.5 GiB, bounded
      return #t
    end)
    assert.is_false(ok)
    assert.matches("not enough memory", tostring(err))
    -- lifted: the same allocation outside is not refused (a smaller one, the machine's sake)
    local t = {}
    for i = 1, 16 do t[i] = ("y"):rep(1024 * 1024) .. i end
    assert.are.equal(16, #t)
    assert.are.same({ true, 1, 2 }, { load_capped(function(a, b) return a, b end, 1, 2) })
  end)

  it("says which file and line allocated, and goes on with the others", function()
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir .. "/policies")
    helpers.write(dir .. "/policies/hog.lua", 'local t = {}\nwhile true do t[#t + 1] = ("x"):rep(1e6) end\n')
    helpers.write(dir .. "/policies/fine.lua", "return {}\n")
    -- (under a ulimit, so that a check without the cap cannot take the machine; not under
    -- AddressSanitizer, which reserves terabytes of address space for its shadow and then aborts)
    local ulimit = (os.getenv("SAN_FLAGS") or ""):find("address", 1, true) and "" or "ulimit -v 6000000 && "
    local r = helpers.run(("cd %s && %stimeout 120 %s check policies/hog.lua policies/fine.lua")
      :format(dir, ulimit, helpers.resil))
    os.execute("rm -rf " .. dir)
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("error: policies/hog%.lua:2: not enough memory\n", r.stdout)
    assert.matches("\n1 error, ", "\n" .. r.stdout)
  end)
end)
