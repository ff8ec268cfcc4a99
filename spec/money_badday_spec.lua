-- Money on a bad day: the gateway's keys, budgets and ledger driven as a
-- user drives them (`resil-lua keys`, `resil-lua budgets`, `resil-lua
-- gateway` as a process) against the mock provider, on SQLite and a real
-- redis-server: a limit said to be in force is enforced, and a key the
-- gateway cannot serve is not made.
local resil = require "resil"
local helpers = require "spec.helpers"
local http, json = resil.http, resil.json

local MSGS = { { role = "user", content = "hi" } }

-- `resil-lua gateway` in front of a mock, on the store at url, stopped after the test -> chat URL
local function gateway(url)
  resil.clock.real()
  resil.log.level("off")
  local m = assert(resil.mock.start({ strict = true, reply = "served" }))
  local config = helpers.write(helpers.tmpname(".lua"), ([[
    require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
    return { key_cache = 0 }
  ]]):format(m.url .. "/v1"))
  local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
  os.execute(("%s gateway --listen 127.0.0.1:%d --config %s --store '%s' > %s 2>&1 & echo $! > %s"):format(
    helpers.resil, port, config, url, log, pidfile))
  assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
  local pid = helpers.slurp(pidfile):match("%d+")
  finally(function()
    if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end
    helpers.wait_until(function() return not helpers.alive(pid) end, 10)
    m:stop()
    resil.log.level("info")
  end)
  assert(helpers.wait_until(function() return helpers.slurp(log):match("listening") ~= nil end, 10), helpers.slurp(log))
  return ("http://127.0.0.1:%d/v1/chat/completions"):format(port)
end

local function chat(url, key)
  return assert(http.request({ method = "POST", url = url, headers = { authorization = "Bearer " .. key },
    body = json.encode({ model = "openai/gpt-4o-mini", max_tokens = 50, messages = MSGS }) }))
end

for _, b in ipairs(helpers.store_backends()) do
  describe("money on a bad day, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    local url
    local function cli(args) return helpers.run(("%s %s --store '%s'"):format(helpers.resil, args, url)) end
    before_each(function() url = b.url() end)

    -- (before: the set said "every process reserves against it from now on", and the key, whose
    -- record had no budget, was never held against it: it spent on, 12 times the limit in a minute)
    it("budgets set key:NAME limits a key made without --budget", function()
      local add = cli("keys add --name nob")
      assert.are.equal(0, add.code, add.stderr)
      local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
      local set = cli("budgets set key:nob --limit 0 --per day")
      assert.are.equal(0, set.code, set.stderr)
      local gw = gateway(url)
      local res = chat(gw, key)
      assert.are.equal(429, res.status, res.body)
      assert.are.equal("insufficient_quota", json.decode(res.body).error.code)
      assert.matches("nob%s+active%s+%$0/day", cli("keys list").stdout)
      -- raised again: the key is served, and its call spent in the budget
      assert.are.equal(0, cli("budgets set key:nob --limit 5").code)
      res = chat(gw, key)
      assert.are.equal(200, res.status, res.body)
      assert.is_true(helpers.wait_until(function()
        return (json.decode(cli("budgets show key:nob --json").stdout) or {}).spent > 0
      end, 5))
    end)

    it("a key made again under a name whose budget was set (budgets set key:NAME, a key revoked) keeps that limit",
      function()
        assert.are.equal(0, cli("budgets set key:later --limit 0 --per day").code)
        local add = cli("keys add --name later")
        assert.are.equal(0, add.code, add.stderr)
        local key = add.stdout:match("^(sk%-resil%-%S+)\n$")
        local res = chat(gateway(url), key)
        assert.are.equal(429, res.status, res.body)
        assert.are.equal("insufficient_quota", json.decode(res.body).error.code)
      end)

    -- (before: made, and every request it sent was a 500: resil.budget refused the limit)
    it("keys add refuses a budget past what a budget holds (1e12), and makes no key", function()
      local add = cli("keys add --name big --budget 99999999999999/day")
      assert.are.equal(1, add.code, add.stdout)
      assert.are.equal("", add.stdout)
      assert.matches("--budget wants USD (up to 1e12), USD/day or USD/month, not '99999999999999/day'", add.stderr, 1,
        true)
      assert.are.equal("no keys\n", cli("keys list").stdout)
      assert.are.equal(0, cli("keys add --name most --budget 1000000000000/month").code)
    end)
  end)
end
