-- `resil-lua costs --csv` writes the ledger's rows as SQLite reads them, one at a time: a
-- ledger of a year is not held in memory at once.
local helpers = require "spec.helpers"

describe("costs --csv on SQLite", function()
  -- (before: every row was a Lua table at once, then every line: 280 MB for 300k rows, and the
  -- export failed under a 100 MB address-space limit at 150k. The limit is 130 MB since the read
  -- runs on a thread of the store's own, off the loop (src/sql_reader.c): mimalloc reserves a
  -- 32 MB segment for each thread that allocates, mapping twice that for a moment to align it,
  -- address space that is never touched)
  it("exports 150,000 rows in time order within 130 MB of address space", function()
    -- (AddressSanitizer reserves terabytes of address space for its shadow: no limit can hold)
    if (os.getenv("SAN_FLAGS") or ""):find("address", 1, true) then
      return pending("under AddressSanitizer: address space is not a measure")
    end
    local db = helpers.tmpname(".db")
    local fill = helpers.run_script([[
      local resil = require "resil"
      for i = 1, 150000 do
        resil.cost.record({ provider = "mock", model = i % 3 == 0 and 'm,"x' or "m" .. i % 7, usd = 0.000001 * i,
          wait = false })
        if i % 5000 == 0 then resil.sleep(0) end
      end
    ]], "--log-level error --store " .. db)
    assert.are.equal(0, fill.code, fill.stderr)
    local out = helpers.tmpname(".csv")
    local r = helpers.run(("bash -c 'ulimit -v 130000; %s costs --csv --store %s > %s'"):format(helpers.resil, db, out))
    assert.are.equal(0, r.code, r.stderr)
    local n, last, ordered, quoted = 0, nil, true, 0
    for line in io.lines(out) do
      n = n + 1
      if n > 1 then
        local at = line:match("^([^,]+),")
        if last and at < last then ordered = false end
        last = at
        if line:find(',"\'?m,""x",', 1, true) or line:find(',"m,""x",', 1, true) then quoted = quoted + 1 end
      end
    end
    assert.are.equal(150001, n)
    assert.is_true(ordered)
    assert.are.equal(50000, quoted)
    os.remove(out)
  end)
end)
