-- A log file rotated while the process runs: logrotate's rename (or a delete) is followed by a
-- new file at the path, written from the next line; copytruncate's truncation is written from
-- its start (O_APPEND), with no hole of the old length.
local resil = require "resil"
local helpers = require "spec.helpers"

local function lines_of(path)
  local lines = {}
  for line in (helpers.slurp(path) or ""):gmatch("[^\n]+") do lines[#lines + 1] = assert(resil.json.decode(line)).msg end
  return lines
end

describe("a rotated log file", function()
  it("--log-file: after a rename or a delete, the next line makes a new file at the path", function()
    local path = helpers.tmpname(".log")
    local r = helpers.run_script(([[
      local resil = require "resil"
      local path = %q
      resil.log.info("one")
      assert(os.rename(path, path .. ".1"))          -- logrotate's rename
      resil.log.info("two")
      assert(os.rename(path, path .. ".2"))
      assert(os.remove(path .. ".2"))                -- an operator's rm
      resil.log.info("three")
    ]]):format(path), ("--log-file %s"):format(path))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.same({ "one" }, lines_of(path .. ".1"))
    assert.are.same({ "three" }, lines_of(path))
    os.remove(path)
    os.remove(path .. ".1")
  end)

  it("resil.log.output(path): copytruncate's truncation is written from the start", function()
    local path = helpers.tmpname(".log")
    resil.log.output(path)
    resil.log.info("before the truncation, a long line " .. ("x"):rep(200))
    local f = assert(io.open(path, "w")) -- truncated as copytruncate does
    f:close()
    resil.log.info("after")
    os.rename(path, path .. ".1")
    resil.log.info("renamed")
    resil.log.output("stderr")
    local raw = helpers.slurp(path .. ".1")
    assert.are.equal("{", raw:sub(1, 1)) -- no NULs where the old lines were
    assert.are.same({ "after" }, lines_of(path .. ".1"))
    assert.are.same({ "renamed" }, lines_of(path))
    os.remove(path)
    os.remove(path .. ".1")
  end)
end)
