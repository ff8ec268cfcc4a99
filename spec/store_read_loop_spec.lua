-- Reads of the store that may scan without bound (the ledger's sums and
-- breakdowns, its rows, the runs) run off the loop: a ledger of many rows
-- on SQLite held the event loop for the whole read (0.7-1.8 s at 1M rows),
-- every timer, transfer and gateway request of the process stood still.
-- What they answer stays exact.
local resil = require "resil"
local helpers = require "spec.helpers"

local ROWS = 300000

-- a store whose ledger holds n rows: provider p0..p6, micro_usd i % 1000 (written in one transaction)
local function big_ledger(n)
  local path = helpers.tmpname(".db")
  resil.store_config({ url = path })
  assert(resil.store())
  local db = assert(resil.sqlite.open(path, {}))
  assert(db:tx(function(tx)
    tx:exec("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) " ..
            "INSERT INTO costs (at, day, provider, model, operation, micro_usd, run) " ..
            "SELECT 1000 + i, '2026-01-01', 'p' || (i % 7), 'm', 'chat', i % 1000, 'r' || (i % 3) FROM c", n)
    tx:exec("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) " ..
            "INSERT INTO runs (id, status, created_at, updated_at) SELECT 'run' || i, 'done', i, i FROM c", n)
    return true
  end))
  db:close()
  return path
end

-- the micro-dollars of rows 1..n whose i % 7 == k (provider "p" .. k), and of all
local function expected(n, k)
  local sum, calls = 0, 0
  for i = 1, n do
    if k == nil or i % 7 == k then sum, calls = sum + i % 1000, calls + 1 end
  end
  return sum, calls
end

-- runs read(), with a timer of 10 ms set just before: -> read's results, and which ended first
local function race(read)
  local order = {}
  local t = resil.spawn(function()
    resil.sleep(0.01)
    order[#order + 1] = "timer"
  end)
  local r = table.pack(read())
  order[#order + 1] = "read"
  t:join()
  return r, order[1]
end

describe("store reads that scan (SQLite): the loop goes on meanwhile", function()
  local ledger_path
  setup(function() ledger_path = big_ledger(ROWS) end)
  before_each(function() resil.store_config({ url = ledger_path }) end)

  it("resil.cost.breakdown of a ledger of many rows: a timer set before it fires before it returns, and " ..
     "the sums are exact", function()
    local r, first = race(function() return resil.cost.breakdown("provider") end)
    assert.are.equal("timer", first)
    local rows = assert(r[1])
    assert.are.equal(7, #rows)
    for _, g in ipairs(rows) do
      local sum, calls = expected(ROWS, tonumber(g.key:sub(2)))
      assert.are.equal(calls, g.calls)
      assert.are.equal(sum, math.floor(g.usd * 1e6 + 0.5))
    end
  end)

  it("resil.cost.total: the same", function()
    local r, first = race(function() return resil.cost.total({ model = "m" }) end)
    assert.are.equal("timer", first)
    assert.are.equal(expected(ROWS), math.floor(r[1] * 1e6 + 0.5))
  end)

  it("the ledger's rows (the CLI's costs export) and the runs list: the same", function()
    local backend = helpers.backend(resil.store())
    local r, first = race(function() return backend:cost_rows({ run = "r1" }) end)
    assert.are.equal("timer", first)
    assert.are.equal(ROWS // 3, #assert(r[1]))
    local n = 0
    r, first = race(function()
      return backend:cost_rows({ run = "r2" }, function() n = n + 1 end)
    end)
    assert.are.equal("timer", first)
    assert.is_true(r[1])
    assert.are.equal(ROWS // 3, n)
    r, first = race(function() return backend:runs_list(resil.store_now()) end)
    assert.are.equal("timer", first)
    assert.are.equal(ROWS, #assert(r[1]))
    assert.are.equal("run" .. ROWS, r[1][1].id)
  end)

  it("a read right after a write nobody waited for sees it", function()
    assert(resil.cost.record({ provider = "late", model = "m", usd = 0.25, wait = false }))
    assert.are.equal(0.25, resil.cost.total({ provider = "late" }))
  end)
end)

describe("store reads that scan (SQLite), given up", function()
  it("a breakdown cut short by resil.timeout gives up its read; the next one answers, exactly", function()
    resil.store_config({ url = big_ledger(ROWS) })
    for _ = 1, 3 do
      local v, err = resil.timeout(0.005, function() return resil.cost.breakdown("provider") end)
      assert.is_nil(v)
      assert.are.equal("timeout", err.kind)
    end
    local total = assert(resil.cost.total({}))
    assert.are.equal(expected(ROWS), math.floor(total * 1e6 + 0.5))
  end)

  it("an export whose callback raises ends the read with that error; the store reads on", function()
    resil.store_config({ url = big_ledger(5000) })
    local backend = helpers.backend(resil.store())
    local n = 0
    local ok, err = pcall(backend.cost_rows, backend, {}, function()
      n = n + 1
      if n == 2500 then error("reader gave up") end
    end)
    assert.is_false(ok)
    assert.matches("reader gave up", tostring(err))
    assert.are.equal(2500, n)
    assert.are.equal(5000, #assert(backend:cost_rows({})))
  end)
end)
