-- A SQLite store read by a user who may not write it: an operator's `runs`, `costs`, `budgets`
-- and `keys list` as another user than the pipeline's (or on a read-only mount). They failed,
-- "attempt to write a readonly database": opened for writing, SQLite could not make the -shm
-- beside the file. Run as the real command, as the user `nobody`.
local helpers = require "spec.helpers"

local bin = helpers.resil:sub(1, 1) == "/" and helpers.resil or (os.getenv("PWD") .. "/" .. helpers.resil)

local function as_nobody(cmd)
  return helpers.run(("su nobody -s /bin/sh -c %q"):format(cmd))
end

local function sha(path)
  local p = io.popen("sha256sum " .. path)
  local s = p:read("l")
  p:close()
  return s
end

describe("a store its reader may not write", function()
  local dir, db, usable
  setup(function()
    dir = helpers.tmpname("-ro")
    db = dir .. "/state.db"
    os.execute("mkdir -p " .. dir .. " && chmod 755 " .. dir)
    local script = helpers.write(dir .. "/p.lua", [[
local resil = require "resil"
resil.step("fetch", function() return 1 end)
resil.cost.record({ provider = "openai", model = "gpt-4o-mini", usd = 0.25, budget = "team", period = "day" })
]])
    assert.are.equal(0, helpers.run(("%s --store %s --run nightly --log-level off %s"):format(bin, db, script)).code)
    assert.are.equal(0, helpers.run(("%s keys add --name team-a --store %s"):format(bin, db)).code)
    assert.are.equal(0, helpers.run(("%s budgets set team --limit 5 --per day --store %s"):format(bin, db)).code)
    os.execute("chmod 644 " .. db)
    usable = as_nobody(("test -x %s && test -r %s && ! test -w %s"):format(bin, db, db)).code == 0
  end)
  teardown(function() if dir then os.execute("rm -rf " .. dir) end end)

  local function check_usable()
    if not usable then
      pending("the user nobody cannot run " .. bin .. " or read the store here (su, or the checkout's folder)")
      return false
    end
    return true
  end

  it("is listed by runs, runs show, costs, budgets and keys list, and left as it was", function()
    if not check_usable() then return end
    local before = sha(db)
    local runs = as_nobody(("%s runs --store %s"):format(bin, db))
    assert.are.equal(0, runs.code, runs.stderr)
    assert.matches("nightly%s+done", runs.stdout)
    local show = as_nobody(("%s runs show nightly --store %s"):format(bin, db))
    assert.are.equal(0, show.code, show.stderr)
    assert.matches("fetch%s+done", show.stdout)
    local costs = as_nobody(("%s costs --store %s"):format(bin, db))
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("total $0.250000", costs.stdout, 1, true)
    local budgets = as_nobody(("%s budgets --store %s"):format(bin, db))
    assert.are.equal(0, budgets.code, budgets.stderr)
    assert.matches("team", budgets.stdout, 1, true)
    local listed = require("resil").json.decode(as_nobody(("%s budgets --json --store %s"):format(bin, db)).stdout)
    assert.are.equal("team", listed[1].name)
    assert.are.equal(0.25, listed[1].spent)
    assert.are.equal(5, listed[1].limit)
    local keys = as_nobody(("%s keys list --store %s"):format(bin, db))
    assert.are.equal(0, keys.code, keys.stderr)
    assert.matches("team%-a%s+active", keys.stdout)
    assert.are.equal(before, sha(db))
    assert.is_nil(io.open(db .. "-wal"), "a -wal was made")
  end)

  it("is listed while a writer has it open (its WAL and -shm beside it)", function()
    if not check_usable() then return end
    local release = helpers.hold_write_lock(db)
    local runs = as_nobody(("%s runs --store %s"):format(bin, db))
    local costs = as_nobody(("%s costs --store %s"):format(bin, db))
    helpers.release_write_lock(release)
    assert.are.equal(0, runs.code, runs.stderr)
    assert.matches("nightly%s+done", runs.stdout)
    assert.are.equal(0, costs.code, costs.stderr)
    assert.matches("total $0.250000", costs.stdout, 1, true)
  end)

  it("refuses a change, saying the store, and changes nothing", function()
    if not check_usable() then return end
    local before = sha(db)
    local set = as_nobody(("%s budgets set team --limit 50 --store %s"):format(bin, db))
    assert.are.equal(1, set.code)
    assert.matches(db, set.stderr, 1, true)
    assert.matches("readonly", set.stderr, 1, true)
    assert.are.equal(before, sha(db))
    local budgets = helpers.run(("%s budgets --json --store %s"):format(bin, db))
    assert.matches('"limit":5', budgets.stdout, 1, true)
  end)

  -- (before: its holds were listed and reserved until their end, ten minutes by default, where a
  -- writer's `budgets show` had them gone at once)
  it("shows no hold of a process that was killed, as a writer's look does", function()
    if not check_usable() then return end
    local pid, out = helpers.start([[
local resil = require "resil"
assert(resil.budget("team", { limit = 5, per = "day" }):reserve(3))
print("held"); io.stdout:flush()
while true do resil.sleep(1) end
]], ("--store %s --log-level off"):format(db))
    finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
    os.execute("kill -9 " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    os.execute(("chmod 644 %s*"):format(db))
    local shown = as_nobody(("%s budgets show team --json --store %s"):format(bin, db))
    assert.are.equal(0, shown.code, shown.stderr)
    local b = require("resil").json.decode(shown.stdout)
    assert.are.same({ 0, 0 }, { b.reserved, #b.holds })
  end)

  -- (before: "unable to open database file", from every command)
  it("whose writer was killed, its -shm deleted since, says why it cannot be read, and is read once its owner " ..
    "has opened it", function()
    if not check_usable() then return end
    local left = dir .. "/left.db"
    local pid, out = helpers.start([[
local resil = require "resil"
assert(resil.cost.record({ provider = "p", model = "m", usd = 2 }))
print("started"); io.stdout:flush()
resil.sleep(60)
]], ("--store %s --log-level off"):format(left))
    assert.is_true(helpers.kill_after_start(pid, out, 0), helpers.slurp(out)) -- (its row in the -wal only)
    os.remove(left .. "-shm")
    os.execute(("chmod 644 %s*"):format(left))
    local r = as_nobody(("%s costs --store %s"):format(bin, left))
    assert.are.equal(1, r.code)
    assert.matches("SQLite needs the -shm beside it, gone, to read that; this process may read the file, not make " ..
      "the -shm: open it once as a user who may write it", r.stderr, 1, true)
    assert.are.equal("total $2.000000\n", helpers.run(("%s costs --store %s"):format(bin, left)).stdout)
    assert.are.equal("total $2.000000\n", as_nobody(("%s costs --store %s"):format(bin, left)).stdout)
  end)

  -- (before: "attempt to write a readonly database (this process may read the file, not write it: opened
  -- read-only)" from every command, costs and runs too, which said nothing of the schema it meant to write)
  it("an older resil-lua's (schema 9) says that it must be opened once by a user who may write it", function()
    if not check_usable() then return end
    local old = dir .. "/old.db"
    assert.are.equal(0, helpers.run(("%s --store %s --log-level off -e %q"):format(bin, old,
      'require("resil").cost.record({ provider = "p", model = "m", usd = 1 })')).code)
    assert.are.equal(0, helpers.run(("sqlite3 %s 'DROP TRIGGER costs_spent_insert; DROP TRIGGER costs_spent_update; " ..
      "DROP TRIGGER costs_spent_delete; DROP TABLE budget_spent; PRAGMA user_version = 9'"):format(old)).code)
    os.execute("chmod 644 " .. old)
    local before = sha(old)
    for _, command in ipairs({ "costs", "runs" }) do
      local r = as_nobody(("%s %s --store %s"):format(bin, command, old))
      assert.are.equal(1, r.code, command)
      assert.matches(("store %s has schema version 9, an older resil-lua's; this one needs"):format(old), r.stderr, 1,
        true)
      assert.matches("brings it up to date at its first open, which this process cannot do: it may read the file, " ..
        "not write it", r.stderr, 1, true)
    end
    assert.are.equal(before, sha(old))
    -- (its owner's first command brings it up to date; then the reader reads it)
    assert.are.equal("total $1.000000\n", helpers.run(("%s costs --store %s"):format(bin, old)).stdout)
    assert.are.equal("total $1.000000\n", as_nobody(("%s costs --store %s"):format(bin, old)).stdout)
  end)
end)
