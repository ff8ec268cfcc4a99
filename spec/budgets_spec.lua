-- Budgets people can manage, from the command line: `resil-lua budgets`
-- lists them, `budgets show` their open holds with owner and age, `budgets
-- release` frees holds (or only those of dead owners), `budgets set` changes
-- a limit in the store that every process, even a running one, reserves
-- against. And `costs --run ID`, `costs --csv`. On SQLite and a real redis-server.
local helpers = require "spec.helpers"

local function sh(cmd) return helpers.run(cmd) end

-- Reserves $2 and holds it until the file arg[1] appears; then tries $5 and prints the verdict.
local holder = [[
local resil = require "resil"
local b = resil.budget("team", { limit = 4, per = "day" })
local t = assert(b:reserve(2))
io.stdout:write("held\n"); io.stdout:flush()
while not io.open(arg[1]) do resil.sleep(0.01) end
local t2, err = b:reserve(5)
print(t2 and "reserved 5" or tostring(err))
t:settle(1.5, { provider = "mock", model = "m" })
if t2 then t2:release() end
]]


for _, b in ipairs(helpers.store_backends()) do
  describe("budgets on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    local url, go, pid, out
    local function cli(args) return sh(("%s %s --store '%s'"):format(helpers.resil, args, url)) end

    before_each(function()
      url, go = b.url(), helpers.tmpname(".go")
      pid, out = helpers.start(holder, ("--store '%s' --log-level off"):format(url), go)
      assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
    end)
    after_each(function()
      if helpers.alive(pid) then os.execute("kill -9 " .. pid) end
      helpers.wait_until(function() return not helpers.alive(pid) end, 10)
    end)

    it("lists budgets with limit, period, spent, reserved, remaining and holds", function()
      local r = cli("budgets")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("BUDGET%s+LIMIT%s+PER%s+PERIOD%s+SPENT%s+RESERVED%s+REMAINING%s+HOLDS", r.stdout)
      assert.matches("\nteam%s+%$4%.000000%s+day%s+%d+%-%d+%-%d+%s+%$0%.000000%s+%$2%.000000%s+%$2%.000000%s+1%s+script",
        r.stdout)
      local j = require("resil").json.decode(cli("budgets --json").stdout)
      assert.are.equal("team", j[1].name)
      assert.are.same({ 4, 2, 2, 0, 1 }, { j[1].limit, j[1].reserved, j[1].remaining, j[1].spent, #j[1].holds })
      assert.are.equal(tonumber(pid), j[1].holds[1].owner.pid)
    end)

    it("shows the open holds with their owner and age", function()
      local r = cli("budgets show team")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("budget team: limit %$4%.000000 per day %(set by script%)", r.stdout)
      assert.matches("spent %$0%.000000, reserved %$2%.000000, remaining %$2%.000000", r.stdout)
      assert.matches("\nteam:%S+%s+%$2%.000000%s+pid " .. pid .. " on %S+%s+%d+s%s+%d", r.stdout)
    end)

    it("show or release of a name the store has no budget for is an error, naming a key's budget", function()
      -- (before: "limit - per none (not known to the store)", $0 spent, exit 0, for a mistyped name)
      for _, sub in ipairs({ "show", "release" }) do
        local r = cli("budgets " .. sub .. " teem")
        assert.are.equal(1, r.code, sub)
        assert.matches("budgets " .. sub .. ": no budget 'teem' in ", r.stderr, 1, true)
        assert.are.equal("", r.stdout)
      end
      -- a key's budget before its first request lives in the key's record: shown with its limit
      local r = cli("keys add --name crew --budget 7/day")
      assert.are.equal(0, r.code, r.stderr)
      r = cli("budgets show key:crew")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("budget key:crew: limit $7.000000 per day (set by keys add)", r.stdout, 1, true)
      assert.matches("remaining $7.000000", r.stdout, 1, true)
      r = cli("budgets show crew")
      assert.are.equal(1, r.code)
      assert.matches("the gateway key crew's budget is 'key:crew'", r.stderr, 1, true)
      -- a limit set from the command line says so
      assert.are.equal(0, cli("budgets set team --limit 9").code)
      assert.matches("limit $9.000000 per day (set by budgets set)", cli("budgets show team").stdout, 1, true)
    end)

    it("release frees every hold; --stale only those whose owner is gone", function()
      local r = cli("budgets release team --stale")
      assert.are.equal("released 0 stale holds of budget team\n", r.stdout)
      os.execute("kill -9 " .. pid)
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      r = cli("budgets release team --stale")
      assert.are.equal("released 1 stale hold of budget team\n", r.stdout)
      assert.matches("no open holds", cli("budgets show team").stdout)
    end)

    it("release without --stale frees a live process's holds", function()
      assert.are.equal("released 1 hold of budget team\n", cli("budgets release team").stdout)
      assert.matches("reserved %$0%.000000, remaining %$4%.000000", cli("budgets show team").stdout)
    end)

    it("set changes the limit for every process, a running one included", function()
      local r = cli("budgets set team --limit 50")
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("budget team: limit %$50%.000000 per day", r.stdout) -- the period kept
      helpers.write(go, "")
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
      assert.matches("reserved 5", helpers.slurp(out))
      assert.matches("\nteam%s+%$50%.000000%s+day%s+%S+%s+%$1%.500000%s+%$0%.000000%s+%$48%.500000%s+0%s+set",
        cli("budgets").stdout)
      -- and back down: the running script's own limit no longer counts
      cli("budgets set team --limit 1 --per month")
      local again = helpers.run_script([[
local resil = require "resil"
local t, err = resil.budget("team", { limit = 100, per = "day" }):reserve(2)
print(t and "reserved" or err.kind, err and ("%g"):format(err.limit))
]], ("--store '%s' --log-level off"):format(url))
      assert.are.equal("budget_exceeded\t1\n", again.stdout)
    end)

    -- (before: the new period started from zero, so a day budget made monthly could spend the
    -- month's limit again on top of what the days had)
    it("set to another period counts what the ledger holds for the new period so far", function()
      helpers.write(go, "")
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
      assert.matches("\nteam%s+%$4%.000000%s+day%s+%S+%s+%$1%.500000", cli("budgets").stdout) -- (the script's $1.5 today)
      assert.are.equal(0, cli("budgets set team --limit 10 --per month").code)
      assert.matches("\nteam%s+%$10%.000000%s+month%s+%S+%s+%$1%.500000%s+%$0%.000000%s+%$8%.500000", cli("budgets").stdout)
      assert.are.equal(0, cli("budgets set team --limit 10 --per none").code)
      assert.matches("\nteam%s+%$10%.000000%s+none%s+%S+%s+%$1%.500000", cli("budgets").stdout)
      assert.are.equal(0, cli("budgets set team --limit 2 --per day").code)
      local again = helpers.run_script([[
local resil = require "resil"
local t, err = resil.budget("team", { limit = 100, per = "day" }):reserve(1)
print(t and "reserved" or err.kind)
]], ("--store '%s' --log-level off"):format(url))
      assert.are.equal("budget_exceeded\n", again.stdout) -- $1.5 spent today + $1 > $2
    end)

    -- (before, on Redis: a hold open at the switch stayed under the old period, uncounted in the new
    -- one, and its settle went to the old period's spend)
    it("set to another period carries the open holds: they count, and settle, in the new period", function()
      assert.are.equal(0, cli("budgets set team --limit 10 --per month").code)
      assert.matches("\nteam%s+%$10%.000000%s+month%s+%S+%s+%$0%.000000%s+%$2%.000000%s+%$8%.000000%s+1%s",
        cli("budgets").stdout)
      helpers.write(go, "")
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
      assert.matches("reserved 5", helpers.slurp(out))
      assert.matches("\nteam%s+%$10%.000000%s+month%s+%S+%s+%$1%.500000%s+%$0%.000000%s+%$8%.500000%s+0%s",
        cli("budgets").stdout)
    end)

    -- (before: `budgets set gw --limit 0.5` made a budget "gw" nothing reserves against, said it
    -- was in force, and the key went on spending to its old limit)
    it("set with a gateway key's name, not its budget's (key:NAME), is refused with the name to use", function()
      local key = helpers.run(("%s keys add --name gw --budget 5/day --store '%s'"):format(helpers.resil, url))
      assert.are.equal(0, key.code, key.stderr)
      local r = cli("budgets set gw --limit 0.5")
      assert.are.equal(1, r.code, r.stdout)
      assert.matches("the gateway key gw's budget is 'key:gw'", r.stderr, 1, true)
      assert.is_nil(cli("budgets").stdout:match("\ngw%s"))
      r = cli("budgets set key:gw --limit 0.5")
      assert.are.equal(0, r.code, r.stderr)
      -- the key's period, though no request has declared its budget yet (before: per none)
      assert.matches("budget key:gw: limit $0.500000 per day", r.stdout, 1, true)
    end)

    it("refuses a bad limit or period with a message", function()
      local r = cli("budgets set team --limit lots")
      assert.are.equal(1, r.code)
      assert.matches("%-%-limit takes an amount in USD from 0 to 1e12, not 'lots'", r.stderr)
      -- (before: 1e13 was set, stored as 1e19 micro-dollars, past what an integer holds)
      -- (and 0x10 was $16, read by Lua's tonumber as hexadecimal)
      for _, v in ipairs({ "1e13", "1e999", "-1", "nan", "0x10", "1_000", "5usd" }) do
        r = cli("budgets set team --limit " .. v)
        assert.are.equal(1, r.code, v)
        assert.matches("--limit takes an amount in USD from 0 to 1e12, not '" .. v .. "'", r.stderr, 1, true)
      end
      assert.are.equal(0, cli("budgets set team --limit 1e12").code)
      -- (before: a limit below the ledger's millionth of a dollar was set as $0, as was a key's
      -- --budget, whose every request was then refused over its budget)
      r = cli("budgets set team --limit 1e-7")
      assert.are.equal(1, r.code)
      assert.matches("--limit 1e-7 is below the ledger's unit, $0.000001", r.stderr, 1, true)
      r = cli("keys add --name tiny --budget 4e-7/day")
      assert.are.equal(1, r.code)
      assert.matches("--budget 4e-7/day is below the ledger's unit, $0.000001", r.stderr, 1, true)
      assert.are.equal(0, cli("budgets set team --limit 0.000001").code)
      r = cli("budgets set team --limit 5 --per week")
      assert.matches("%-%-per takes day, month or none, not 'week'", r.stderr)
      assert.matches("which budget", cli("budgets show").stderr)
      -- (before: the name left out, the budget was named '--limit': "unknown argument '5'")
      r = cli("budgets set --limit 5")
      assert.are.equal(1, r.code)
      assert.are.equal("resil-lua: budgets set: which budget? (budgets set NAME --limit USD [--per day|month|none])\n",
        r.stderr)
      -- (before: "not 'nil'" for an option given without its value)
      for _, opt in ipairs({ "--limit", "--per" }) do
        r = cli("budgets set team --limit 5 " .. opt)
        assert.are.equal(1, r.code, opt)
        assert.are.equal(("resil-lua: budgets set: %s needs a value\n"):format(opt), r.stderr)
      end
      -- a period typed into the limit, as keys add takes it (--budget 50/day): the option to use
      r = cli("budgets set team --limit 50/day")
      assert.are.equal(1, r.code)
      assert.matches("not '50/day' (a period is --per day)", r.stderr, 1, true)
    end)

    it("costs --run ID keeps one run's costs; --csv writes rows a spreadsheet reads", function()
      helpers.write(go, "")
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
      local r = helpers.run_script([[
local resil = require "resil"
resil.step("one", function() resil.cost.record{ provider = "mock", model = "a,b", usd = 0.25, user = 'say "hi"' } end)
]], ("--store '%s' --log-level off --run r9"):format(url))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("total $0.250000\n", cli("costs --run r9").stdout)
      assert.are.equal("total $1.750000\n", cli("costs").stdout)
      local csv = cli("costs --run r9 --csv").stdout
      assert.matches('^at,provider,model,operation,user,run,item,step,budget,usd,units\n', csv)
      assert.matches('\n%d+%-%d+%-%d+T[%d:]+Z,mock,"a,b",,"say ""hi""",r9,,one,,0%.250000,\n$', csv)
      assert.are.equal("provider,calls,usd,unpriced\nmock,2,1.750000,0\n", cli("costs --by provider --csv").stdout)
      assert.matches("both", cli("costs --csv --json").stderr)
    end)
  end)
end

-- Money that is not money (NaN, inf, a billion dollars and up) is misuse:
-- before, NaN passed every `< 0` check (a reservation of NaN was admitted on
-- a full budget, or failed inside the store), inf made the ledger's total
-- inf for good, and on Redis a settle of 1e300 freed the hold and charged
-- nothing. And a settle whose row the ledger already has (the same id: a
-- provider's replayed answer) is not spent twice: on Redis it was.
for _, b in ipairs(helpers.store_backends()) do
  describe("money in and out of budgets on " .. b.name, function()
    local resil = require "resil"
    teardown(function() if b.stop then b.stop() end end)
    before_each(function()
      resil.clock.virtual()
      resil.store_config({ url = b.url() })
    end)

    local function misuse(fn, message)
      local ok, err = pcall(fn)
      assert.is_false(ok, "accepted")
      assert.matches("budgets_spec.lua:%d+: " .. message, err)
    end

    it("NaN, inf and huge amounts raise at the caller's line; nothing is held or charged", function()
      local nan, inf = 0 / 0, math.huge
      local budget = resil.budget("money-in", { limit = 1 })
      local t = assert(budget:reserve(1))
      for _, v in ipairs({ nan, inf, -inf, -1, 1e300, 2e9 }) do
        misuse(function() local _ = budget:reserve(v) end, "budget:reserve: estimate must be a number from 0 to 1e9")
        misuse(function() local _ = t:settle(v) end, "ticket:settle: actual must be a number from 0 to 1e9")
        misuse(function() local _ = resil.cost.record({ provider = "p", usd = v }) end,
          "resil.cost.record: usd must be a number from 0 to 1e9, or nil")
        misuse(function() local _ = resil.budget("money-limit", { limit = v * 1e3 }) end,
          "resil.budget: limit must be a number from 0 to 1e12")
      end
      misuse(function() local _ = resil.budget("money-tiny", { limit = 1e-7 }) end,
        "resil.budget: limit 1e%-07 is below the ledger's unit, %$0%.000001")
      misuse(function() local _ = budget:reserve(0.1, { hold = nan }) end, "budget:reserve: hold must be a number")
      -- (a hold given as a number: "[resil budgets]:294: attempt to index a number value (local 'o')")
      misuse(function() local _ = budget:reserve(0.1, 600) end, "budget:reserve: options must be a table {hold=}, got number")
      -- (a function or a number as the options of a budget that exists: "[resil budgets]:172: attempt to index")
      misuse(function() local _ = resil.budget("money-in", function() end) end, "resil.budget: options must be a table")
      misuse(function() local _ = resil.budget("money-in", 5) end, "resil.budget: options must be a table")
      for _, soft in ipairs({ nan, -0.1, 1.5, "0.8" }) do -- (NaN: the soft limit's warning never came)
        misuse(function() local _ = resil.budget("money-soft", { limit = 1, soft = soft }) end,
          "resil.budget: soft must be a share from 0 to 1")
      end
      local st = assert(budget:state())
      assert.are.same({ 0, 1, 1 }, { st.spent, st.reserved, #st.holds })
      assert.is_true(t:settle(0.25, { provider = "p" }))
      st = assert(budget:state())
      assert.are.same({ 0.25, 0 }, { st.spent, st.reserved })
      assert.are.equal(0.25, resil.cost.total())
      assert.is_truthy(budget:reserve(0.75))
      assert.is_nil((budget:reserve(0.01)))
    end)

    -- (before: a string raised inside budgets.lua, and a field the ledger refuses raised after the ticket was
    -- done: either way its hold was no longer kept nor given up at the close, ticket:extend said hold_ended)
    it("a settle with cost fields of the wrong type raises at the caller's line; the hold is still the ticket's",
      function()
      local budget = resil.budget("money-fields", { limit = 1 })
      local t = assert(budget:reserve(0.5))
      misuse(function() local _ = t:settle(0.1, "openai") end, "ticket:settle: cost fields must be a table or nil")
      misuse(function() local _ = t:settle(0.1, { provider = 5 }) end, "resil.cost.record: provider must be a string")
      misuse(function() local _ = t:charge(0.1, "openai") end, "ticket:charge: cost fields must be a table or nil")
      assert.is_true(t:extend())
      assert.are.same({ 0, 0.5 }, { assert(budget:state()).spent, assert(budget:state()).reserved })
      assert.is_true(t:settle(0.1, { provider = "p" }))
      assert.are.same({ 0.1, 0 }, { assert(budget:state()).spent, assert(budget:state()).reserved })
    end)

    it("a call that cost less than a micro-dollar still has its ledger row; a settle of 0 has none", function()
      local budget = resil.budget("money-tiny", { limit = 1 })
      assert.is_true(assert(budget:reserve(0.01)):settle(0.0000004, { provider = "tiny", units = { input_tokens = 20 } }))
      assert.is_true(assert(budget:reserve(0.01)):settle(0, { provider = "failed" }))
      local calls = {}
      for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do calls[g.key] = g.calls end
      assert.are.same({ tiny = 1 }, calls)
      assert.are.equal(0, assert(budget:state()).reserved)
    end)

    it("a settle with an id the ledger already has is kept once, in the ledger and in the budget", function()
      local budget = resil.budget("money-dedupe", { limit = 1 })
      local first, again = assert(budget:reserve(0.5)), assert(budget:reserve(0.5))
      assert.is_true(first:settle(0.4, { provider = "p", id = "p:resp-1" }))
      assert.is_false(again:settle(0.4, { provider = "p", id = "p:resp-1" })) -- the provider replayed it
      local st = assert(budget:state())
      assert.are.same({ 0.4, 0, 0 }, { st.spent, st.reserved, #st.holds })
      assert.are.equal(0.4, resil.cost.total())
      assert.is_truthy(budget:reserve(0.6))
    end)

    it("a ticket's charge (a further cost of its call) is a row of its own, spent even past the limit", function()
      local budget = resil.budget("money-charge", { limit = 1 })
      local t = assert(budget:reserve(0.6))
      assert.is_true(t:charge(0.3, { provider = "p", units = { refused = 1 } }))
      assert.is_true(t:charge(0.5, { provider = "p", units = { refused = 1 } })) -- paid: the limit does not refuse it
      assert.is_true(t:settle(0.2, { provider = "p" }))
      local st = assert(budget:state())
      assert.are.same({ 1, 0, 0 }, { st.spent, st.reserved, #st.holds })
      assert.are.equal(1, resil.cost.total())
      assert.are.equal(3, assert(resil.cost.breakdown("provider"))[1].calls)
      assert.is_nil((budget:reserve(0.01)))
      misuse(function() local _ = t:charge(0 / 0) end, "ticket:charge: actual must be a number from 0 to 1e9")
    end)

    -- (before: a settle past its hold, an estimate too low, spent what no reservation checked, and
    -- nothing said so: requests held at once near the limit ended the period past it unseen)
    it("what a settle or a charge spends past its hold is counted, by budget", function()
      local budget = resil.budget("money-over-" .. b.name, { limit = 1 })
      local function over()
        local v = resil.metrics.text():match('resil_budget_overrun_usd_total{budget="money%-over%-' .. b.name ..
          '"} (%S+)\n')
        return v and tonumber(v) or 0
      end
      assert(assert(budget:reserve(0.01)):settle(0.004, { provider = "p" }))
      assert.are.equal(0, over())
      -- a call's charges count with its settle: 0.002 + 0.004 is within its hold of 0.01
      local t = assert(budget:reserve(0.01))
      assert(t:charge(0.002, { provider = "p" }))
      assert(t:settle(0.004, { provider = "p" }))
      assert.are.equal(0, over())
      t = assert(budget:reserve(0.01))
      assert(t:charge(0.002, { provider = "p" }))
      assert(t:settle(0.015, { provider = "p" }))
      assert.is_true(math.abs(over() - 0.007) < 1e-9, tostring(over()))
      assert(t:charge(0.001, { provider = "p" })) -- (after the settle: all of it)
      assert.is_true(math.abs(over() - 0.008) < 1e-9, tostring(over()))
      assert(assert(budget:reserve(0.01)):settle(0.02, { provider = "p", wait = false }))
      assert.is_true(math.abs(over() - 0.018) < 1e-9, tostring(over()))
    end)

    -- (before: on Redis only a settle added to a budget's spend, so such rows, which SQLite's spend
    -- (the ledger's sum) counts, were not counted there: the budget reserved its whole limit on top)
    it("a cost row recorded with a budget and period counts in that period's spend, once per id", function()
      local budget = resil.budget("money-row", { limit = 1, per = "day" })
      local today = assert(budget:state()).period
      local function row(usd, extra)
        local e = { provider = "p", usd = usd, budget = "money-row", period = today }
        for k, v in pairs(extra or {}) do e[k] = v end
        assert.is_true(resil.cost.record(e))
      end
      row(0.1)
      row(0.2, { id = "p:row-1" })
      row(0.2, { id = "p:row-1" }) -- the provider replayed it: kept once
      row(0.3, { id = "p:row-2", wait = false })
      row(0.3, { id = "p:row-2", wait = false })
      row(nil) -- a call without a price spends nothing
      row(0.5, { period = "2000-01-01" }) -- another period's spend, not today's
      resil.cost.record({ provider = "p", usd = 0.25 }) -- a row of no budget
      local st = assert(budget:state())
      assert.are.same({ 0.6, 0 }, { st.spent, st.reserved })
      assert.is_truthy(budget:reserve(0.4))
      assert.is_nil((budget:reserve(0.000001)))
      -- a period named ahead of the budget's counts when the budget reaches it
      local tomorrow = os.date("!%Y-%m-%d", math.floor(resil.store_now()) + 86400)
      row(0.7, { period = tomorrow })
      assert.are.equal(0.6, assert(budget:state()).spent)
      resil.sleep(86400)
      st = assert(budget:state())
      assert.are.same({ tomorrow, 0.7 }, { st.period, st.spent })
    end)

    -- (before: kept under the budget in the ledger and counted in none of its periods, the
    -- reservation after it granted as if nothing were spent)
    it("a cost row naming a budget without its period is refused at the caller's line, nothing recorded", function()
      local budget = resil.budget("money-no-period", { limit = 1 })
      local line = debug.getinfo(1, "l").currentline + 1
      local ok, err = pcall(function() resil.cost.record({ provider = "p", usd = 0.7, budget = "money-no-period" }) end)
      assert.is_false(ok)
      assert.matches("budgets_spec%.lua:" .. line .. ": resil%.cost%.record: budget needs its period", err)
      assert.are.equal(0, assert(budget:state()).spent)
      assert.are.equal(0, resil.cost.total())
      assert.is_truthy(budget:reserve(0.9))
    end)
  end)
end

-- In-process: the switch carries the holds open at it, and what their calls
-- settle or charge later counts in the new period (before: a call running
-- across the switch was lost from the new period's spend; on Redis a switch
-- over a ledger with rows stopped every later settle from counting).
local resil = require "resil"
local admin = require "resil.budgets"
local seq = 0
local function fresh_name() seq = seq + 1; return ("switch%d_%d"):format(seq, os.time()) end
local E = { provider = "mock", model = "m" }

for _, b in ipairs(helpers.store_backends()) do
  describe("a period switch (budgets set --per) with holds open, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    before_each(function()
      resil.clock.virtual()
      resil.store_config({ url = b.url() })
    end)

    -- policies.ai records a call's refused attempts with ticket:charge, after its settle or at its end
    it("a refused attempt's charge made after the switch counts in the new period, as its call's settle", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local t = assert(bud:reserve(2))
      assert(admin.set(resil.store(), name, 10, "month"))
      assert(t:charge(0.5, E))
      assert(t:settle(1, E))
      local st = assert(bud:state())
      assert.are.equal(0, st.reserved)
      assert.are.equal(1.5, st.spent) -- the charge went to the day's period: 1.0
    end)

    -- a hold taken yesterday (hold = 1 h at 23:55 UTC) is still open at 00:05 when the switch comes
    it("a hold still open from the previous period of the old kind is carried too", function()
      local now = resil.store_now()
      local to_2355 = (86400 - now % 86400) - 300
      resil.sleep(to_2355)
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local t = assert(bud:reserve(2, { hold = 3600 }))
      resil.sleep(600) -- 00:05 the next day
      assert(admin.set(resil.store(), name, 10, "month"))
      local st = assert(bud:state())
      assert.are.equal(2, st.reserved, "the open hold does not count in the new period")
      assert(t:settle(1, E))
      st = assert(bud:state())
      assert.are.equal(1, st.spent, "its settle is not in the new period's spend")
    end)

    -- a hold released while the new day's first look carries it over (its release read the
    -- ticket's period, yesterday, before the carry, and gave the hold back there: today kept it
    -- reserved, for nobody, until its hour ran out)
    it("a hold released as the new day's first look carries it is given back in the new day", function()
      local now = resil.store_now()
      resil.sleep((86400 - now % 86400) - 300) -- 23:55 UTC
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local t = assert(bud:reserve(2, { hold = 3600 }))
      resil.sleep(600) -- 00:05 the next day, no reservation made yet
      -- (the look reads the budget's config first: its carry reaches the store after the release's
      -- read of the ticket and before the release itself)
      local looking = resil.spawn(function() return bud:state() end)
      local releasing = resil.spawn(function() return t:release() end)
      assert.are.same({ true, true }, { releasing:join() })
      assert(looking:join())
      local st = assert(bud:state())
      assert.are.equal(0, st.reserved, "the released hold still counts in the new day")
    end)

    -- a policy reload that changes the script's own period kind, with no limit set from the command
    -- line (before: the new period started at $0 with the open hold uncounted, and its settle went to
    -- the old period: $1.40 committed against a $1 budget, today's spend $0 after both calls)
    it("a script's own period changed by a reload carries the spend and the open holds, as set --per does",
      function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 1 })
      assert(assert(bud:reserve(0.3)):settle(0.3, E))
      local held = assert(bud:reserve(0.5))
      resil.budget(name, { limit = 1, per = "day" }) -- (the reloaded policy)
      local t, err = bud:reserve(0.5)
      assert.is_nil(t, "$0.30 spent + $0.50 held + $0.50 let through a $1 budget")
      assert.are.equal("budget_exceeded", err.kind)
      assert(held:settle(0.5, E))
      local st = assert(bud:state())
      assert.are.same({ 0.8, 0 }, { st.spent, st.reserved })
      assert.is_nil(bud:reserve(0.5))
      -- and back: the lifetime period counts what the days spent
      resil.budget(name, { limit = 1 })
      st = assert(bud:state())
      assert.are.same({ "all", 0.8 }, { st.period, st.spent })
    end)

    -- a settle that lands while the switch runs (on Redis: between the ledger's sum and the script;
    -- SQLite does both in one transaction)
    if b.name == "Redis" then it("a settle landing while the switch sums the ledger is in the new period's spend", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local t = assert(bud:reserve(2))
      local be = helpers.backend(resil.store())
      local read, landed = be.each_ledger_row, false
      be.each_ledger_row = function(self, ...)
        local ok, e = read(self, ...)
        be.each_ledger_row, landed = nil, true
        assert(t:settle(1, E)) -- (another process's settle, meanwhile)
        return ok, e
      end
      finally(function() be.each_ledger_row = nil end)
      assert(admin.set(resil.store(), name, 10, "month"))
      assert.is_true(landed)
      local st = assert(bud:state())
      assert.are.equal(1, st.spent)
    end) end

    -- the ledger already holds a cost of the budget in the new period when the switch comes
    it("a settle after a switch over a ledger with rows succeeds and counts", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      assert(assert(bud:reserve(1)):settle(1, E)) -- $1 today, in the ledger
      local held = assert(bud:reserve(2)) -- open at the switch
      assert(admin.set(resil.store(), name, 10, "month"))
      local ok, err = held:settle(0.5, E)
      assert.is_true(ok, tostring(err))
      ok, err = assert(bud:reserve(1)):settle(0.25, E) -- a new call in the new period
      assert.is_true(ok, tostring(err))
      local st = assert(bud:state())
      assert.are.same({ 1.75, 0 }, { st.spent, st.reserved })
    end)

    -- a reservation that read the settings just before the switch and reached the store just after it
    it("a hold made against the old settings as the switch lands counts in the new period", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      assert(bud:state()) -- (the script's settings declared)
      local be = helpers.backend(resil.store())
      local cfg = be.budget_config
      be.budget_config = function(self, n)
        local c, e = cfg(self, n)
        be.budget_config = nil
        assert(admin.set(resil.store(), name, 10, "month")) -- (the CLI, meanwhile)
        return c, e
      end
      finally(function() be.budget_config = nil end)
      local t = assert(bud:reserve(2))
      local st = assert(bud:state())
      assert.are.equal(2, st.reserved, "the hold is under " .. t.period .. ", the budget's period is " .. st.period)
    end)

    -- settings that change under every try (a script flipping --per in a loop): the reservation is
    -- refused as the store being busy, retryable, not as a budget exhausted with $0 spent
    it("a reservation stale three times in a row is refused as retryable, not as budget_exceeded", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      assert(bud:state())
      local be = helpers.backend(resil.store())
      local cfg = be.budget_config
      local pers, flips = { "month", "day" }, 0
      local inside = false
      be.budget_config = function(self, n)
        local c, e = cfg(self, n)
        if inside then return c, e end -- (admin.set reads the settings too)
        inside = true
        flips = flips + 1
        assert(admin.set(resil.store(), name, 10, pers[flips % 2 + 1]))
        inside = false
        return c, e
      end
      finally(function() be.budget_config = nil end)
      local t, err = bud:reserve(2)
      be.budget_config = nil
      assert.is_nil(t)
      assert.are.equal(3, flips)
      assert.are.equal("store_unavailable", err.kind, tostring(err))
      assert.matches("settings changed", tostring(err))
      local st = assert(bud:state())
      assert.are.equal(0, st.reserved)
    end)

    if b.name == "Redis" then
      it("a reservation abandoned (its outcome unseen) across the switch is given back in the new period", function()
        local name = fresh_name()
        local bud = resil.budget(name, { limit = 10, per = "day" })
        local t = assert(bud:reserve(2))
        assert(admin.set(resil.store(), name, 10, "month"))
        local now = resil.store_now()
        helpers.backend(resil.store()):budget_abandon(name, t.period, t.id, now + 600, now) -- (budgets.lua abandon())
        local st = assert(bud:state())
        assert.are.equal(0, st.reserved)
      end)

      it("a settle after the switch, waited for or not, counts in the new period, its row labelled so", function()
        local name = fresh_name()
        local bud = resil.budget(name, { limit = 10, per = "day" })
        local t1, t2 = assert(bud:reserve(2)), assert(bud:reserve(2))
        local day = t1.period
        assert(admin.set(resil.store(), name, 10, "month"))
        assert(t1:settle(1, E))
        assert(t2:settle(0.25, { provider = "mock", model = "m", wait = false }))
        resil.sleep(0.1)
        local st = assert(bud:state())
        assert.are.same({ 1.25, 0 }, { st.spent, st.reserved })
        local conn = helpers.backend(resil.store()).conn
        for _, row in ipairs(conn:call("LRANGE", "resil:costs", 0, -1)) do
          local e = resil.json.decode(row)
          if e.budget == name then assert.are.equal(st.period, e.period, row) end
        end
        assert.are.equal("0", tostring(conn:call("GET", "resil:budget:" .. name .. ":" .. day .. ":spent") or "0"))
        -- and a second switch back the same day: the holds' settles keep following
        local t3 = assert(bud:reserve(1))
        assert(admin.set(resil.store(), name, 10, "day"))
        assert(t3:settle(0.5, E))
        st = assert(bud:state())
        assert.are.same({ day, 1.75, 0 }, { st.period, st.spent, st.reserved })
      end)

      it("moving a hold whose ticket hash is gone leaves no key without a TTL", function()
        local name = fresh_name()
        local bud = resil.budget(name, { limit = 10, per = "day" })
        local t = assert(bud:reserve(2))
        local conn = helpers.backend(resil.store()).conn
        conn:call("DEL", "resil:ticket:" .. t.id) -- (its ticket kept hold + 1 day; a hold never swept since)
        assert(admin.set(resil.store(), name, 10, "month"))
        assert.are.equal(0, conn:call("EXISTS", "resil:ticket:" .. t.id), "ttl " ..
          tostring(conn:call("PTTL", "resil:ticket:" .. t.id)))
      end)
    end
  end)
end

-- A call across midnight (its hold made at 23:59 UTC, its settle at 00:01): its cost counts in the
-- period its ledger row is in, the one its settle falls in, so that a budget's spend for a period is
-- the ledger's sum for that period (`budgets` and `costs --since`); and its hold, open at midnight,
-- counts against the new period, where its cost will land. Before, the cost went to yesterday's
-- budget and today's ledger, and today's budget let its whole limit be reserved on top of it.
for _, b in ipairs(helpers.store_backends()) do
  describe("a call across a period boundary, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    before_each(function()
      resil.clock.virtual()
      resil.store_config({ url = b.url() })
    end)

    local function to_2359() -- -> the next day's start
      local now = resil.store_now()
      resil.sleep(86400 - now % 86400 - 60)
      return resil.store_now() + 60
    end
    -- the budget's spent and reserved in a period, as the store keeps them
    local function usage(name, period)
      local spent, reserved = helpers.backend(resil.store()):budget_usage(name, period, resil.store_now(),
        require("resil.owner").me().id)
      return { spent / 1e6, reserved / 1e6 }
    end
    local function ledger(name, since, till)
      return assert(resil.cost.total({ budget = name, since = since, ["until"] = till }))
    end

    it("its cost counts in the period of its ledger row, once; its hold counts in the new period", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local midnight = to_2359()
      local yesterday, today = os.date("!%Y-%m-%d", midnight - 1), os.date("!%Y-%m-%d", midnight)
      local t = assert(bud:reserve(4, { hold = 3600 }))
      assert(assert(bud:reserve(1)):settle(0.5, E)) -- yesterday's own
      resil.sleep(120) -- 00:01
      local st = assert(bud:state())
      assert.are.same({ today, 0, 4 }, { st.period, st.spent, st.reserved }, "the open hold is not today's")
      assert.is_nil((bud:reserve(7)), "today's limit let the hold's cost in on top of a full day")
      assert.is_true(t:extend()) -- (renewed where it is now)
      assert.are.same({ 0, 4 }, { assert(bud:state()).spent, assert(bud:state()).reserved })
      assert(t:settle(3, E))
      assert(assert(bud:reserve(2)):settle(1, { provider = "mock", model = "m", wait = false }))
      assert(t:charge(0.25, E)) -- (a refused attempt of the call, after its settle)
      resil.sleep(0.1)
      st = assert(bud:state())
      assert.are.same({ 4.25, 0 }, { st.spent, st.reserved })
      assert.are.equal(4.25, ledger(name, midnight))
      assert.are.same({ 0.5, 0 }, usage(name, yesterday))
      assert.are.equal(0.5, ledger(name, midnight - 86400, midnight))
      -- the command line's view: `budgets` for today is `costs --since` today
      for _, d in ipairs(assert(admin.list(resil.store()))) do
        if d.name == name then assert.are.same({ today, 4.25, 0 }, { d.period, d.spent, d.reserved }) end
      end
      assert.is_truthy(bud:reserve(5.75))
      assert.is_nil((bud:reserve(0.01)))
    end)

    -- A hold longer than a whole period (a batch job, a provider stuck past two midnights), with no
    -- reservation in the day between: it counts in today's budget, where its cost will land. (On
    -- SQLite only the day before's holds moved: today let its whole limit be reserved on top.)
    it("a hold open across two midnights, no reservation the day between, counts in today's budget", function()
      resil.store_config({ lease = 3600 }) -- (a beat an hour while it is held, not 8,640 over the two days)
      finally(function() resil.store_config({ lease = 30 }) end)
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local midnight = to_2359()
      local t = assert(bud:reserve(4, { hold = 3 * 86400 }))
      resil.sleep(86400 + 120) -- 00:01, the day after the next
      local today = os.date("!%Y-%m-%d", midnight + 86400)
      local figures = { helpers.backend(resil.store()):budget_figures(name, today, resil.store_now()) }
      assert.are.same({ 0, 4e6 }, figures, "the gauges' read") -- (a read: it moves nothing)
      assert.is_nil((bud:reserve(7)), "today's limit let the hold's cost in on top of a full day")
      local st = assert(bud:state())
      assert.are.same({ today, 0, 4 }, { st.period, st.spent, st.reserved }, "the open hold is not today's")
      assert.are.same({ 0, 4 }, usage(name, today))
      assert(t:settle(3, E))
      st = assert(bud:state())
      assert.are.same({ 3, 0 }, { st.spent, st.reserved })
      assert.are.equal(3, ledger(name, midnight + 86400))
      assert.is_truthy(bud:reserve(7))
      assert.is_nil((bud:reserve(0.01)))
    end)

    if b.name == "Redis" then
      -- A hold made at 23:59 by the version before the set of periods with holds (a rolling
      -- upgrade: it wrote no `resil:budget:NAME:periods`) moves into the new day too.
      it("a hold made by a version that kept no set of periods moves into the new period", function()
        local name = fresh_name()
        local bud = resil.budget(name, { limit = 10, per = "day" })
        local midnight = to_2359()
        local t = assert(bud:reserve(4, { hold = 3600 }))
        helpers.backend(resil.store()).conn:call("DEL", "resil:budget:" .. name .. ":periods")
        resil.sleep(120)
        assert.is_nil((bud:reserve(7)), "today's limit let the hold's cost in on top of a full day")
        local st = assert(bud:state())
        assert.are.same({ os.date("!%Y-%m-%d", midnight), 0, 4 }, { st.period, st.spent, st.reserved })
        assert(t:settle(3, E))
        st = assert(bud:state())
        assert.are.same({ 3, 0 }, { st.spent, st.reserved })
        assert.are.equal(3, ledger(name, midnight))
      end)
    end

    it("the same at a month's end, per = month", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "month" })
      local now = resil.store_now()
      local first = now - now % 86400
      local month = os.date("!%m", first)
      while os.date("!%m", first) == month do first = first + 86400 end -- the next month's first day
      resil.sleep(first - 60 - now)
      local t = assert(bud:reserve(4, { hold = 3600 }))
      resil.sleep(120)
      local st = assert(bud:state())
      assert.are.same({ os.date("!%Y-%m", first), 0, 4 }, { st.period, st.spent, st.reserved })
      assert(t:settle(3, E))
      st = assert(bud:state())
      assert.are.same({ 3, 0 }, { st.spent, st.reserved })
      assert.are.equal(3, ledger(name, first))
      assert.are.equal(0, ledger(name, first - 40 * 86400, first))
    end)

    -- (another process: reserves at 23:59 before midnight arg[2] on its own virtual clock, says so,
    -- and waits to be killed)
    local holder_2359 = [[
local resil = require "resil"
resil.clock.virtual()
resil.sleep(tonumber(arg[2]) - 60 - resil.store_now())
assert(resil.budget(arg[1], { limit = 10, per = "day" }):reserve(4, { hold = 3600 }))
io.stdout:write("held\n"); io.stdout:flush()
while true do resil.sleep(60) end
]]

    -- (the same, its hold three days long; then on the real clock, so its heartbeat does not spin)
    local holder_long = [[
local resil = require "resil"
resil.clock.virtual()
resil.sleep(tonumber(arg[2]) - 60 - resil.store_now())
assert(resil.budget(arg[1], { limit = 10, per = "day" }):reserve(4, { hold = 3 * 86400 }))
resil.clock.real()
io.stdout:write("held\n"); io.stdout:flush()
while true do resil.sleep(60) end
]]

    it("a hold open across two midnights still ends with its owner (killed: budgets release --stale)", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local midnight = to_2359()
      local pid, out = helpers.start(holder_long, ("--store '%s' --log-level off"):format(resil.store().url),
        name .. " " .. midnight)
      finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
      assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
      resil.sleep(86400 + 120) -- 00:01, the day after the next
      assert.are.equal(0, assert(admin.release(resil.store(), name, true)))
      assert.are.equal(4, assert(bud:state()).reserved)
      os.execute("kill -9 " .. pid)
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      assert.are.equal(1, assert(admin.release(resil.store(), name, true)))
      assert.are.same({ 0, 0 }, { assert(bud:state()).spent, assert(bud:state()).reserved })
      assert.is_truthy(bud:reserve(10))
    end)

    it("a hold open at midnight still ends with its owner, and its settle counts once", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 10, per = "day" })
      local midnight = to_2359()
      local pid, out = helpers.start(holder_2359, ("--store '%s' --log-level off"):format(resil.store().url),
        name .. " " .. midnight)
      finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
      assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
      local mine = assert(bud:reserve(2, { hold = 3600 }))
      resil.sleep(120)
      assert.are.equal(6, assert(bud:state()).reserved)
      assert.are.equal(0, assert(admin.release(resil.store(), name, true)))
      os.execute("kill -9 " .. pid)
      assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
      -- `budgets release --stale` after midnight finds the dead process's hold
      assert.are.equal(1, assert(admin.release(resil.store(), name, true)))
      assert.are.same({ 0, 2 }, { assert(bud:state()).spent, assert(bud:state()).reserved })
      assert.is_true(mine:settle(3, E))
      assert.is_false(mine:settle(3, E)) -- a second settle changes nothing
      local st = assert(bud:state())
      assert.are.same({ 3, 0 }, { st.spent, st.reserved })
      assert.are.equal(3, ledger(name, midnight))
      assert.are.equal(0, ledger(name, midnight - 86400, midnight))
    end)
  end)
end

-- A hold renewed by its ticket (ticket:extend, and ticket:keep, which policies.ai uses for a call
-- in flight): a hold that stopped counting is never counted again, and a settled call's hold is
-- never renewed (before: a hold stopped counting `hold` seconds after its reservation, however
-- long its call ran).
for _, b in ipairs(helpers.store_backends()) do
  describe("a hold renewed while its call runs, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    before_each(function()
      resil.clock.virtual()
      resil.store_config({ url = b.url() })
    end)


    it("ticket:extend keeps a hold counting past its hold; it never shortens it", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 1, hold = 60 })
      local t = assert(bud:reserve(0.6))
      resil.sleep(50)
      assert.is_true(t:extend())       -- now + 60
      assert.is_true(t:extend(5))      -- (shorter: kept as it was)
      local st = assert(bud:state())
      assert.is_true(math.abs(resil.store_now() + 60 - st.holds[1].expires_at) < 1e-3, -- (Redis keeps micro-seconds)
        tostring(st.holds[1].expires_at - resil.store_now()))
      resil.sleep(50) -- 100 s after the reservation
      local other, err = bud:reserve(0.6)
      assert.is_nil(other, "the hold stopped counting at its first end")
      assert.are.equal("budget_exceeded", err.kind)
      assert.are.equal(0.6, assert(bud:state()).reserved)
      resil.sleep(11) -- past its new end: it stops counting, and stays stopped
      assert.are.equal(0, assert(bud:state()).reserved)
      local ok, eerr = t:extend()
      assert.is_nil(ok)
      assert.are.equal("hold_ended", eerr.kind)
      assert.are.equal(0, assert(bud:state()).reserved)
      assert.is_truthy(bud:reserve(0.6))
    end)

    it("ticket:extend after settle or release is hold_ended and writes nothing", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 1, hold = 60 })
      local settled, released = assert(bud:reserve(0.5)), assert(bud:reserve(0.5))
      assert.is_true(settled:settle(0.25, E))
      assert.is_true(released:release())
      local extensions = helpers.count_extensions(finally)
      for _, t in ipairs({ settled, released }) do
        local ok, err = t:extend(600)
        assert.is_nil(ok)
        assert.are.equal("hold_ended", err.kind)
        assert.matches("settled or released", err.message)
      end
      assert.are.equal(0, extensions[1]) -- (the ticket knows it ended: the store is not asked)
      -- nor does the store renew them, asked directly (a renewal that was on its way at the settle)
      local be, now = helpers.backend(resil.store()), resil.store_now()
      for _, t in ipairs({ settled, released }) do
        assert.is_false(be:budget_extend(name, t.period, t.id, now + 600, now, require("resil.owner").me().id))
      end
      local st = assert(bud:state())
      assert.are.same({ 0.25, 0, 0 }, { st.spent, st.reserved, #st.holds })
      assert.are.equal(1, assert(resil.cost.breakdown("provider"))[1].calls)
      assert.is_truthy(bud:reserve(0.75))
    end)

    it("ticket:keep renews the hold every two thirds of it until the settle, then never again", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 1, hold = 60 })
      local extensions = helpers.count_extensions(finally)
      local t = assert(bud:reserve(0.6)):keep()
      resil.sleep(190)
      assert.are.equal(0.6, assert(bud:state()).reserved)
      assert.is_nil((bud:reserve(0.6)))
      assert.are.equal(4, extensions[1]) -- at 40, 80, 120 and 160 s
      assert.is_true(t:settle(0.5, E))
      resil.sleep(300)
      assert.are.equal(4, extensions[1])
      local st = assert(bud:state())
      assert.are.same({ 0.5, 0 }, { st.spent, st.reserved })
    end)

    -- (a stream opened with a budget, dropped unread and never closed: nothing will settle it)
    it("ticket:keep stops once nothing refers to the ticket: its hold ends as without it", function()
      local name = fresh_name()
      local bud = resil.budget(name, { limit = 1, hold = 60 })
      local extensions = helpers.count_extensions(finally)
      local call = {}
      local function reserve() call.ticket = assert(bud:reserve(0.6)):keep() end
      reserve()
      resil.sleep(45)
      assert.are.equal(1, extensions[1]) -- (renewed once, at 40 s, to 100 s)
      call.ticket = nil
      collectgarbage()
      collectgarbage()
      resil.sleep(56)
      assert.are.equal(1, extensions[1])
      assert.are.equal(0, assert(bud:state()).reserved)
    end)
  end)
end

describe("budgets set against a frozen Redis (SIGSTOP)", function()
  local redis
  setup(function() redis = helpers.redis_server() end)
  teardown(function() redis.stop() end)

  local function connections()
    local info = sh(("redis-cli -p %d INFO stats"):format(redis.port)).stdout
    return tonumber(info:match("total_connections_received:(%d+)"))
  end

  -- (before: each read that failed was taken for "none" and the next tried: six operations, each
  -- on a connection of its own with ?down=0, each waiting its timeout; and the last, the limit's
  -- write, ran as Redis thawed, after the command had said it failed)
  it("fails with the first read's error, after one timeout, and changes nothing", function()
    local url = redis.url(nil, "timeout=1&down=0")
    local function cli(args) return sh(("%s budgets %s --store '%s'"):format(helpers.resil, args, url)) end
    local r = cli("set frozen --limit 5")
    assert.are.equal(0, r.code, r.stderr)
    local before = connections()
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    r = cli("set frozen --limit 6")
    os.execute("kill -CONT " .. redis.pid)
    assert.are.equal(1, r.code)
    assert.are.equal(("resil-lua: budgets set: store_unavailable: redis 127.0.0.1:%d: no reply within 1 s\n")
      :format(redis.port), r.stderr)
    -- one connection, for the one operation sent (and one for the INFO that counts them)
    assert.are.equal(2, connections() - before)
    assert.matches("limit %$5%.000000", cli("show frozen").stdout)
  end)
end)

-- A ticket released (a gateway client that left, a job that failed, a retry's hold) while the
-- store cannot take it. (before: the release failed once and was never tried again: the hold
-- counted until its end, ten minutes by default, in a process still running, and a gateway key
-- whose client left during a Redis blip had that much of its budget locked away)
describe("a ticket released while Redis is frozen (SIGSTOP)", function()
  local redis
  setup(function() redis = helpers.redis_server() end)
  teardown(function() redis.stop() end)

  it("is given back once the store answers again, while its process lives", function()
    resil.clock.real()
    resil.store_config({ url = redis.url(nil, "timeout=0.5") })
    local bud = resil.budget("frozen-release", { limit = 1 })
    local t = assert(bud:reserve(0.9))
    os.execute("kill -STOP " .. redis.pid)
    finally(function() os.execute("kill -CONT " .. redis.pid) end)
    local ok, err = t:release()
    os.execute("kill -CONT " .. redis.pid)
    assert.is_true(helpers.wait_until(function()
      local st = bud:state()
      return st ~= nil and st.reserved == 0
    end, 30), "the hold still counts")
    assert.is_nil(ok) -- (as a settle's: tried again meanwhile)
    assert.are.same({ "store_unavailable", true }, { err.kind, err.retrying })
    assert(assert(bud:reserve(0.9)):release())
  end)
end)

-- A reservation the budget refused holds nothing, so its process has nothing to give up as it
-- closes. (before: each refusal made a ticket the close released, a write per refusal; with
-- another process holding the store's write lock then, a process that never held a cent said
-- "resil_close: giving up the host's budget holds: ... database is locked")
describe("a refused reservation at the process's close", function()
  it("gives nothing up, and says nothing, with the store's write lock held by another process", function()
    local db, go = helpers.tmpname(".db"), helpers.tmpname(".go")
    local pid, out = helpers.start([[
local resil = require "resil"
local b = resil.budget("nothing-left", { limit = 0.01 })
for _ = 1, 5 do assert(not b:reserve(1)) end
io.stdout:write("refused\n"); io.stdout:flush()
while not io.open(arg[1]) do resil.sleep(0.01) end
]], ("--store '%s'"):format(db), go)
    finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("refused") ~= nil end, 20), helpers.slurp(out))
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.write(release, "") end)
    helpers.write(go, "")
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    helpers.write(release, "")
    assert.are.equal("refused\n", helpers.slurp(out))
  end)
end)

-- The machine's clock stepped while a process runs (NTP's first sync after boot, a VM resumed):
-- every process on the machine reads the new time, the one started before too. (Before, a
-- process kept the wall time it started with, carried on the monotonic clock: a gateway worker
-- started an hour before the step wrote its holds' ends an hour early, and every process started
-- after it took them for ended: a $1 budget with $0.80 held let $0.50 more in.)
describe("a process started before its machine's clock was stepped, on SQLite", function()
  it("holds what it reserves after the step, for every other process on the machine", function()
    local db, go, skew = helpers.tmpname(".db"), helpers.tmpname(".go"), helpers.tmpname(".skew")
    helpers.write(skew, "-3600") -- (an hour behind as it starts)
    local saved = helpers.resil
    helpers.resil = ("CLOCK_SKEW_FILE=%s ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s"):format(skew,
      helpers.clock_skew_shim(), saved)
    local pid, out = helpers.start([[
local resil = require "resil"
print("started"); io.stdout:flush()
while not io.open(arg[1]) do resil.sleep(0.01) end
assert(resil.budget("stepped", { limit = 1 }):reserve(0.8))
print("held"); io.stdout:flush()
while true do resil.sleep(1) end
]], ("--store '%s' --log-level off"):format(db), go)
    helpers.resil = saved
    finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("started") ~= nil end, 20), helpers.slurp(out))
    helpers.write(skew, "0") -- the step: its clock is right from now on
    helpers.write(go, "")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
    local r = helpers.run_script([[
local resil = require "resil"
local t, err = resil.budget("stepped", { limit = 1 }):reserve(0.5)
print(t and "reserved" or err.kind, resil.budget("stepped"):state().reserved)
]], ("--store '%s' --log-level off"):format(db))
    assert.are.equal("budget_exceeded\t0.8\n", r.stdout, r.stderr)
  end)
end)
