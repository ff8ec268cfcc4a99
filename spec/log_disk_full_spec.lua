-- A log file its disk cannot take more of (ENOSPC; here the file size limit, EFBIG, which a
-- process can set without a small filesystem): the process goes on, each line that does not fit
-- is dropped whole (no half line that the next line is glued to), the error is said once on
-- stderr rather than once a line, and the count is written once lines fit again.
local resil = require "resil"
local helpers = require "spec.helpers"

describe("a full log file", function()
  it("drops whole lines, says so once, and counts them once lines fit again", function()
    local path = helpers.tmpname(".log")
    local script = helpers.write(helpers.tmpname(".lua"), ([[
      local resil = require "resil"
      local path = %q
      for i = 1, 60 do resil.log.info("line " .. i .. " " .. ("x"):rep(100)) end
      assert(os.rename(path, path .. ".1"))   -- room again: a new file at the path
      resil.log.info("after")
    ]]):format(path))
    -- 8 blocks of 512 bytes: the 24th or so line crosses the limit (a write there is cut short)
    local r = helpers.run(("sh -c \"trap '' XFSZ; ulimit -f 8; exec %s --log-file %s %s\""):format(helpers.resil, path,
      script))
    assert.are.equal(0, r.code, r.stderr)
    local written = 0
    for line in helpers.slurp(path .. ".1"):gmatch("([^\n]*)\n?") do
      if line ~= "" then
        local ok, v = pcall(resil.json.decode, line)
        assert.is_true(ok and type(v) == "table", "not a whole JSON line: " .. line)
        written = written + 1
      end
    end
    assert.is_true(written > 0 and written < 60)
    assert.are.equal("\n", helpers.slurp(path .. ".1"):sub(-1))
    local _, said = r.stderr:gsub("log lines are dropped", "")
    assert.are.equal(1, said, r.stderr)
    local after = {}
    for line in helpers.slurp(path):gmatch("[^\n]+") do after[#after + 1] = resil.json.decode(line) end
    assert.are.equal("after", after[1].msg)
    assert.are.equal(60 - written, after[2].dropped)
    os.remove(path)
    os.remove(path .. ".1")
  end)
end)
