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

  -- (before: summed and said in doubles, which past $8e9 have no room for micro-dollars: --json said
  -- "usd":10000000000, the table's TOTAL $9999999999.999998)
  it("costs: totals past a double's micro-dollars are the ledger's, to the micro-dollar", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
      local resil = require "resil"
      for i = 1, 10 do
        assert(resil.cost.record({ provider = "p" .. i % 2, model = "m" .. i % 3, usd = 999999999.999999 }))
      end
      assert(resil.cost.record({ provider = "p", model = "m", usd = 0.000007 }))
    ]], ("--store %s --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local function costs(args) return helpers.run(("%s costs %s --store %s"):format(helpers.resil, args, db)).stdout end
    assert.are.equal('{"usd":9999999999.999997}\n', costs("--json"))
    assert.are.equal("total $9999999999.999997\n", costs(""))
    assert.matches("TOTAL +%$9999999999%.999997\n", costs("--by model"))
    assert.matches('"usd":3999999999.999996,', costs("--by model --json"), 1, true)
    assert.matches("p1,5,4999999999.999995,0\n", costs("--by provider --csv"), 1, true)
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

  it("runs show ID --html on a full disk: exit 1 naming the error; no cut page, and one there before is kept",
     function()
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    -- a real full disk: a small tmpfs (root); elsewhere there is no such disk to fill
    if os.execute(("mount -t tmpfs -o size=64k tmpfs %s 2>/dev/null"):format(dir)) ~= true then
      return pending("mounting a tmpfs needs root")
    end
    finally(function() os.execute("umount -l " .. dir) end)
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
      local resil = require "resil"
      for i = 1, 20 do
        resil.step("step " .. i, function() resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 0.01 }) end)
      end
    ]], ("--store %s --run nightly --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    local page = dir .. "/report.html"
    r = helpers.run(("%s runs show nightly --html %s --store %s"):format(helpers.resil, page, db))
    assert.are.equal(0, r.code, r.stderr)
    local whole = helpers.slurp(page)
    assert.matches("</html>\n$", whole)
    -- the disk filled but for the page's whole 4 KiB blocks (a tmpfs counts in them): the writes go
    -- through, and the last part fails as the file is closed (its buffer flushed)
    assert.is_true(#whole % 4096 ~= 0 and #whole > 4096, #whole)
    local held, room = -(-#whole // 4096), #whole // 4096
    os.execute(("dd if=/dev/zero of=%s/fill bs=4k count=%d > /dev/null 2>&1"):format(dir, 16 - held - room))
    r = helpers.run(("%s runs show nightly --html %s --store %s"):format(helpers.resil, page, db))
    assert.are.equal(1, r.code, r.stdout)
    assert.matches("cannot write " .. page, r.stderr, 1, true)
    assert.matches("No space left", r.stderr, 1, true)
    assert.is_nil(r.stdout:match("wrote"))
    assert.are.equal(whole, helpers.slurp(page)) -- the page before, whole
    assert.are.equal("", helpers.run("ls " .. dir .. " | grep tmp").stdout)
  end)

  -- (before: the page went to FILE.tmp, renamed over FILE: `--html /dev/stdout` replaced the
  -- system's /dev/stdout with a regular file as root, and failed on /dev/stdout.tmp as anyone else;
  -- a symlinked page was replaced by a file, its target left as it was)
  it("runs show ID --html onto what is not a plain file (/dev/stdout, a symlink) writes through it, leaving it",
     function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[require("resil").step("fetch", function() return 1 end)]],
      ("--store %s --run nightly --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    -- a name for this process's stdout, as /dev/stdout is one (a symlink to /proc/self/fd/1)
    local out, page, real = dir .. "/stdout", dir .. "/page.html", dir .. "/real.html"
    os.execute(("ln -s /proc/self/fd/1 %s && ln -s %s %s && echo old > %s"):format(out, real, page, real))
    r = helpers.run(("%s runs show nightly --html %s --store %s"):format(helpers.resil, out, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^<!DOCTYPE html>.*</html>\n", r.stdout)
    assert.are.equal(0, helpers.run("test -L " .. out).code)
    r = helpers.run(("%s runs show nightly --html %s --store %s"):format(helpers.resil, page, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(0, helpers.run("test -L " .. page).code)
    assert.matches("</html>\n$", helpers.slurp(real))
    -- (before: `--html -` made a file named '-' in the working directory, "wrote -")
    r = helpers.run(("cd %s && %s runs show nightly --html - --store %s"):format(dir, helpers.resil, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^<!DOCTYPE html>.*</html>\n$", r.stdout)
    assert.are.equal(1, helpers.run(("test -e %s/-"):format(dir)).code)
    -- (reviewer R2: it opened /dev/stdout again, which truncated a file appended to with >>)
    local appended = dir .. "/appended.log"
    os.execute(("echo PREVIOUS > %s"):format(appended))
    r = helpers.run(("(%s runs show nightly --html - --store %s >> %s)"):format(helpers.resil, db, appended))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^PREVIOUS\n<!DOCTYPE html>.*</html>\n$", helpers.slurp(appended))
  end)

  it("costs --csv (and the other commands) whose output cannot be written (a full disk: /dev/full) exit 1, " ..
     "saying so, not 0 over a cut file", function()
    local db = ledger()
    for _, args in ipairs({ "costs --csv", "costs --by model --csv", "costs --by model", "budgets --json", "runs" }) do
      local r = helpers.run(("(%s %s --store %s > /dev/full)"):format(helpers.resil, args, db))
      assert.are.equal(1, r.code, args)
      assert.matches("its output could not be written", r.stderr, 1, true)
    end
    -- (written whole: 0, as before)
    assert.are.equal(0, helpers.run(("%s costs --csv --store %s > /dev/null"):format(helpers.resil, db)).code)
  end)

  -- (before: `costs --run nigthly` said "total $0.000000", exit 0: a typo read as a run that spent nothing)
  it("costs --run ID of a run the store has never seen, with no ledger rows, is an error naming it; a run " ..
     "that spent nothing is $0, and a forgotten one's rows are still its costs", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
      local resil = require "resil"
      resil.step("one", function() return 1 end)
    ]], ("--store %s --run idle --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    r = helpers.run_script([[
      local resil = require "resil"
      resil.step("one", function() assert(resil.cost.record({ provider = "openai", model = "m", usd = 0.5 })) end)
    ]], ("--store %s --run paid --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(0, helpers.run(("%s runs forget paid --store %s"):format(helpers.resil, db)).code)
    for _, args in ipairs({ "", " --json", " --csv", " --by model" }) do
      r = helpers.run(("%s costs --run nightly%s --store %s"):format(helpers.resil, args, db))
      assert.are.equal(1, r.code, args)
      assert.are.equal("", r.stdout, args)
      assert.are.equal("resil-lua: costs: no run 'nightly' in the store, and no ledger rows for it " ..
        "(resil-lua runs lists the runs)\n", r.stderr, args)
    end
    r = helpers.run(("%s costs --run idle --store %s"):format(helpers.resil, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("total $0.000000\n", r.stdout)
    r = helpers.run(("%s costs --run paid --store %s"):format(helpers.resil, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("total $0.500000\n", r.stdout)
  end)

  -- (before: --json printed names as they were stored, where the table and --csv redact them: a budget
  -- or user named by a URL with its credentials was printed whole; and a byte that is no UTF-8
  -- (a model name made from a provider's bytes) made output no JSON parser reads)
  it("--json of costs --by and budgets is redacted as the table is, and JSON a strict parser reads", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
      local resil = require "resil"
      assert(resil.cost.record({ provider = "openai", model = "m\255\254x", operation = "chat",
        user = "https://api.example.com/v1?api_key=sk-abcdefghijklmnop1234", usd = 0.5 }))
      local t = assert(resil.budget("https://ops:hunter2secret@example.com/b\255", { limit = 10, per = "day" }):reserve(1))
      t:settle(0.25)
    ]], ("--store %s --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local names = {}
    for _, args in ipairs({ "costs --by user --json", "costs --by model --json", "budgets --json" }) do
      r = helpers.run(("%s %s --store %s"):format(helpers.resil, args, db))
      assert.are.equal(0, r.code, r.stderr)
      assert.is_nil(r.stdout:find("sk-abcdefghijklmnop1234", 1, true), args .. ": " .. r.stdout)
      assert.is_nil(r.stdout:find("hunter2secret", 1, true), args .. ": " .. r.stdout)
      assert.is_truthy(utf8.len(r.stdout), args .. ": no UTF-8: " .. r.stdout)
      local list = assert(require("resil").json.decode(r.stdout), args)
      for _, row in ipairs(list) do
        local name = row.key or row.name
        if name ~= require("resil").json.null then names[#names + 1] = name end -- (the calls with none)
      end
    end
    table.sort(names)
    assert.are.same({ "https://api.example.com/v1?api_key=[REDACTED]", "https://ops:[REDACTED]@example.com/b\u{FFFD}",
      "m\u{FFFD}\u{FFFD}x" }, names)
    r = helpers.run(("%s budgets show %q --json --store %s"):format(helpers.resil,
      "https://ops:hunter2secret@example.com/b\255", db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("https://ops:[REDACTED]@example.com/b\u{FFFD}", require("resil").json.decode(r.stdout).name)
  end)

  -- (before: a row of calls without a user, a model or a provider had no "key" at all, where the others
  -- had one: a script's row["key"] failed on it)
  it("costs --by --json gives every row a key, null for the calls without one", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
      local resil = require "resil"
      assert(resil.cost.record({ provider = "openai", model = "gpt-4o", user = "u1", usd = 0.5 }))
      assert(resil.cost.record({ provider = "openai", model = "gpt-4o", usd = 0.25 }))
    ]], ("--store %s --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    r = helpers.run(("%s costs --by user --json --store %s"):format(helpers.resil, db))
    assert.are.equal(0, r.code, r.stderr)
    local rows = assert(require("resil").json.decode(r.stdout))
    assert.are.equal(2, #rows)
    local keys = {}
    for _, row in ipairs(rows) do
      keys[#keys + 1] = row.key == require("resil").json.null and "null" or row.key
    end
    table.sort(keys)
    assert.are.same({ "null", "u1" }, keys)
    assert.matches('"key":null', r.stdout, 1, true)
  end)

  it("a reader that left (| head) ends the command as SIGPIPE would, 141, and silently, however long its output " ..
     "(runs show of 3000 steps: the pipe's buffer filled mid-run, not at the last flush)", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
      local resil = require "resil"
      for i = 1, 3000 do
        resil.step("step " .. i, function()
          assert(resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 0.01, wait = false }))
          return i
        end)
      end
    ]], ("--store %s --run long --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    -- (more than a pipe holds and head reads: a write after head left fails, whatever the timing)
    for _, args in ipairs({ "runs show long", "costs --csv" }) do
      r = helpers.run(("bash -c '%s %s --store %s | head -1; exit ${PIPESTATUS[0]}'"):format(helpers.resil, args, db))
      assert.are.equal(141, r.code, args .. ": " .. r.stderr)
      assert.are.equal("", r.stderr, args)
    end
  end)
end)
