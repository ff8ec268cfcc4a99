-- The store's commands as an operator reads them, over a ledger and budgets
-- with hostile names (a comma, a quote, a line break, a formula, accented
-- letters): `costs --by model --csv` read back by a CSV parser as RFC 4180
-- has it, and the `budgets` table's columns. A real SQLite file, the real CLI.
local helpers = require "spec.helpers"

-- RFC 4180: text -> rows of fields (quoted fields may hold , " and line breaks)
local function parse_csv(text)
  local rows, row, field, i, n = {}, {}, {}, 1, #text
  local quoted = false
  while i <= n do
    local c = text:sub(i, i)
    if quoted then
      if c == '"' and text:sub(i + 1, i + 1) == '"' then field[#field + 1] = '"'; i = i + 1
      elseif c == '"' then quoted = false
      else field[#field + 1] = c end
    elseif c == '"' then quoted = true
    elseif c == "," then row[#row + 1] = table.concat(field); field = {}
    elseif c == "\n" then
      row[#row + 1] = table.concat(field); field = {}
      rows[#rows + 1] = row; row = {}
    else field[#field + 1] = c end
    i = i + 1
  end
  assert(not quoted and #field == 0 and #row == 0, "the CSV ends inside a row")
  return rows
end

local HOSTILE = 'weird,"model"\nx'

local function ledger()
  local db = helpers.tmpname(".db")
  local r = helpers.run_script(([[
    local resil = require "resil"
    assert(resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 0.25 }))
    assert(resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 0.5 }))
    -- a model nobody priced: recorded without a cost
    assert(resil.cost.record({ provider = "openai", model = %q, units = { input_tokens = 10 } }))
    assert(resil.cost.record({ provider = "openai", model = '=HYPERLINK("http://x")', usd = 1 }))
    for _, name in ipairs({ "équipe", "team" }) do assert(resil.budget(name, { limit = 5, per = "day" }):reserve(1)) end
  ]]):format(HOSTILE), ("--store %s --log-level off"):format(db))
  assert.are.equal(0, r.code, r.stdout .. r.stderr)
  return db
end

describe("resil-lua costs and budgets, as an operator reads them", function()
  it("costs --by model --csv: each name read back whole by a CSV parser; a model whose calls had no price " ..
     "says so (unpriced), not a silent 0", function()
    local db = ledger()
    local r = helpers.run(("%s costs --by model --csv --store %s"):format(helpers.resil, db))
    assert.are.equal(0, r.code, r.stderr)
    local rows = parse_csv(r.stdout)
    assert.are.same({ "model", "calls", "usd", "unpriced" }, rows[1])
    local by = {}
    for k = 2, #rows do
      assert.are.equal(4, #rows[k], r.stdout)
      by[rows[k][1]] = rows[k]
    end
    assert.are.same({ "gpt-4o-mini", "2", "0.750000", "0" }, by["gpt-4o-mini"])
    assert.are.same({ HOSTILE, "1", "0.000000", "1" }, by[HOSTILE])
    -- a formula is kept as text for a spreadsheet
    assert.are.same({ "'" .. '=HYPERLINK("http://x")', "1", "1.000000", "0" }, by["'" .. '=HYPERLINK("http://x")'])
    -- the same counts as the table and --json give
    local j = helpers.run(("%s costs --by model --json --store %s"):format(helpers.resil, db))
    assert.matches('"unpriced":1', j.stdout, 1, true)
  end)

  it("budgets: the columns line up after a name with accented letters", function()
    local db = ledger()
    local r = helpers.run(("%s budgets --store %s"):format(helpers.resil, db))
    assert.are.equal(0, r.code, r.stderr)
    local at = {}
    for line in r.stdout:gmatch("[^\n]+") do
      -- the column where LIMIT (or its value) starts, counted in characters
      local name_end = select(2, line:find("%s%s+%S"))
      at[#at + 1] = utf8.len(line:sub(1, name_end))
    end
    assert.are.equal(3, #at, r.stdout)
    assert.are.equal(at[1], at[2], r.stdout)
    assert.are.equal(at[1], at[3], r.stdout)
  end)
end)
