-- The model registry on a bad day: a registry file with hostile values, references nested too
-- deep, migrations inside migrations, keys written twice; shares over many calls and a reload
-- while calls are in flight. Against the strict mock and a real SQLite store.
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"
local registry = require "policies.registry"

local MSGS = { { role = "user", content = "Say hello" } }
local shipped = registry.entries
local OLD, NEW = "openai/gpt-4o-mini-2024-07-18", "openai/gpt-4.1-mini-2025-04-14"

local m
before_each(function()
  resil.clock.virtual()
  resil.store_config({ url = helpers.tmpname(".db") })
  m = resil.mock.start({ strict = true, reply = "one two three" })
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-spec-openai-0123456789", retry = { base = 0.01 } })
  registry.reset_warnings()
end)
after_each(function()
  m:stop()
  registry.use(shipped, "policies/models.lua")
  registry.random = math.random
end)

-- a registry file holding these lines -> its path
local function registry_file(body)
  local path = helpers.tmpname("-models.lua")
  helpers.write(path, "return {\n" .. body .. "\n}\n")
  return path
end

-- registry.load(file) refused: the message, after checking the registry before still serves
local function refused(body)
  registry.use({ ["chat-x"] = { use = OLD } })
  local before = registry.entries
  local path = registry_file(body)
  local ok, err = pcall(registry.load, path)
  assert.is_false(ok, "loaded: " .. body)
  assert.are.equal(before, registry.entries) -- the registry before keeps serving
  assert(ai.chat({ model = "chat-x", messages = MSGS }))
  return tostring(err), path
end

describe("a registry file with hostile values", function()
  -- (before: each of these loaded; the call then went wrong without a word, or raised inside)
  local cases = {
    -- a share of NaN passed `share < 0 or share > 1`: every call went to the old side, none said why
    { ('a = { use = %q, migrate = { to = %q, share = 0/0 } },'):format(OLD, NEW),
      "model 'a': migrate%.share must be a number from 0 to 1, not NaN" },
    { ('a = { use = %q, migrate = { to = %q, share = 1.5 } },'):format(OLD, NEW),
      "model 'a': migrate%.share must be a number from 0 to 1, not 1%.5" },
    { ('a = { use = %q, migrate = { to = %q, share = -0.1 } },'):format(OLD, NEW),
      "model 'a': migrate%.share must be a number from 0 to 1, not %-0%.1" },
    { ('a = { use = %q, migrate = { to = %q, share = 0.1, window = 1/0 } },'):format(OLD, NEW),
      "model 'a': migrate%.window must be seconds > 0" },
    -- (a window under 2e-10 s passed "> 0": each call, answered and paid for, then raised "bad argument
    -- #4 to 'format' (number has no integer representation)" as its outcome was counted)
    { ('a = { use = %q, migrate = { to = %q, share = 0.1, window = 1e-300 } },'):format(OLD, NEW),
      "model 'a': migrate%.window must be at least 1 second %(its calls are counted per window%), not 1e%-300" },
    { ('a = { use = %q, migrate = { to = %q, share = 0.1, rollback = { min_calls = 0/0 } } },'):format(OLD, NEW),
      "model 'a': migrate%.rollback%.min_calls must be a number >= 0" },
    -- a margin written as a percent never rolled back; a latency ratio under 1 nearly always did
    { ('a = { use = %q, migrate = { to = %q, share = 0.1, rollback = { error_rate = 5 } } },'):format(OLD, NEW),
      "model 'a': migrate%.rollback%.error_rate is a difference of rates, from 0 to 1 %(0%.05: 5 points%), not 5" },
    { ('a = { use = %q, migrate = { to = %q, share = 0.1, rollback = { latency = 0.5 } } },'):format(OLD, NEW),
      "model 'a': migrate%.rollback%.latency is a ratio of the sides' mean latencies, 1 or more" },
    -- a deadline of NaN raised inside each call ("'timeout' must be >= 0"); -1 failed each one
    { ('a = { use = %q, deadline = 0/0 },'):format(OLD), "model 'a': deadline must be seconds > 0" },
    { ('a = { use = %q, deadline = -1 },'):format(OLD), "model 'a': deadline must be seconds > 0" },
    { ('a = { deployments = { { use = %q, weight = 0/0 }, { use = %q } } },'):format(OLD, OLD),
      "model 'a': deployments%[1%]%.weight must be a number >= 0" },
    { ('a = { deployments = { { use = %q, weight = 1/0 } } },'):format(OLD),
      "model 'a': deployments%[1%]%.weight must be a number >= 0" },
    -- (read as 2027-02-14)
    { '["gpt-4o-2024-05-13"] = { deprecated = true, replacement = "openai/gpt-4o-2024-08-06", sunset = "2026-13-45" },',
      "model 'gpt%-4o%-2024%-05%-13': sunset must be a date \"YYYY%-MM%-DD\", not 2026%-13%-45" },
    -- names a gateway's client cannot send (listed by GET /v1/models, then a 400), or that write a
    -- header of their own
    { ('[""] = { use = %q },'):format(OLD), "model '': a model's name must be 1 to 256 printable ASCII" },
    { ('["chat fast"] = { use = %q },'):format(OLD), "model 'chat fast': a model's name must be" },
    { ('["chat-r\u{E1}pido"] = { use = %q },'):format(OLD), "model 'chat%-r\\xC3\\xA1pido': a model's name must be" },
    { 'a = { use = "openai/gpt-4o\\r\\nX-Injected: 1" },',
      "model 'a': use must be \"provider/model\" or an alias %(1 to 256 printable ASCII characters, no spaces%), " ..
      "not 'openai/gpt%-4o\\x0D\\x0AX%-Injected: 1'" },
    { ('a = { use = %q, fallbacks = { "openai/gpt-4.1 2025-04-14" } },'):format(OLD), "model 'a': fallbacks%[1%] must be" },
    -- (read by ipairs: a map gave no fallback, a hole every one after it, without a word)
    { ('a = { use = %q, fallbacks = { x = "anthropic/claude-haiku-4-5-20251001" } },'):format(OLD),
      "model 'a': fallbacks must be a list of models: it has the key x %(a list has positions 1, 2, %.%.%.%)" },
    { ('a = { use = %q, fallbacks = { %q, nil, "anthropic/claude-haiku-4-5-20251001" } },'):format(OLD, NEW),
      "model 'a': fallbacks must be a list of models: it has a hole at position 2" },
    { ('a = { deployments = { { use = %q }, nil, { use = %q } } },'):format(OLD, NEW),
      "model 'a': deployments must be a list of { use =, weight = }: it has a hole at position 2" },
    -- a misspelt field was dropped without a word: no fallbacks, no split
    { ('a = { use = %q, fallback = { "anthropic/claude-haiku-4-5-20251001" } },'):format(OLD),
      "model 'a': the entry: unknown field 'fallback', did you mean 'fallbacks'%?" },
    { ('a = { use = %q, migrate = { to = %q, percent = 10, share = 0.1 } },'):format(OLD, NEW),
      "model 'a': migrate: unknown field 'percent'" },
    { ('a = { use = %q, migrate = { to = %q, share = 0.1, rollback = { error_rat = 0.05 } } },'):format(OLD, NEW),
      "model 'a': migrate%.rollback: unknown field 'error_rat', did you mean 'error_rate'%?" },
    -- an alias's sunset was never read: its calls kept going to its use past the date
    { ('a = { use = %q, deprecated = true, replacement = %q, sunset = "2020-01-01" },'):format(OLD, NEW),
      "model 'a': deprecated = true marks a model's name, not an alias" },
    { ('a = { use = %q, sunset = "2020-01-01" },'):format(OLD), "model 'a': replacement and sunset go with deprecated = true" },
    -- a deployment is sent as it is named: an alias there failed every call ("must name its provider")
    { ('inner = { use = %q },\n  a = { deployments = { { use = "inner" } } },'):format(OLD),
      "model 'a': deployments%[1%]%.use 'inner' must be \"provider/model\", not an alias" },
  }
  for _, case in ipairs(cases) do
    it("refuses at its line, the registry before serving: " .. case[1]:gsub("%s+", " "), function()
      local err, path = refused(case[1])
      local line = case[1]:find("\n") and 3 or 2
      assert.matches(path:gsub("%p", "%%%0") .. ":" .. line .. ": " .. case[2], err)
      assert.is_nil(err:find("[\r\n]"), "one line, control bytes escaped: " .. err)
    end)
  end

  it("refuses every hostile value of one file at once, each at its line", function()
    local err, path = refused(([[
  a = { use = %q, migrate = { to = %q, share = 0/0 } },
  b = { use = %q, fallback = { %q } },
  ["c d"] = { use = %q },]]):format(OLD, NEW, OLD, NEW, OLD))
    local p = path:gsub("%p", "%%%0")
    assert.matches(p .. ":2: model 'a': migrate%.share", err)
    assert.matches(p .. ":3: model 'b': the entry: unknown field 'fallback'", err)
    assert.matches(p .. ":4: model 'c d': a model's name", err)
  end)
end)

describe("a registry naming a provider that does not exist (misspelt)", function()
  -- (before: each of these loaded, as the README says they do (check's errors, "a primary still
  -- serves"), and then every call of the alias raised "ai: unknown provider 'antrhopic'", named at
  -- policies/ai.lua: a gateway answered each one 400 invalid_request_error, blaming its client; a
  -- 5 % canary so misspelt failed 5 % of the calls)
  -- the warnings fn logs, as "msg|where|error" lines
  local function warned(fn)
    local lines = {}
    for i, l in ipairs(helpers.logged(fn)) do lines[i] = ("%s|%s|%s"):format(l.msg, l.where, l.error) end
    return table.concat(lines, "\n")
  end

  it("a fallback so misspelt is left out, said once at its line; the primary serves", function()
    local path = registry_file(('  a = { use = %q, fallbacks = { "antrhopic/claude-haiku-4-5-20251001" } },'):format(OLD))
    registry.load(path)
    local log = warned(function()
      for _ = 1, 3 do
        local r = assert(ai.chat({ model = "a", messages = MSGS }))
        assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
      end
    end)
    assert.matches("a fallback cannot be used", log)
    assert.matches("unknown provider 'antrhopic'", log)
    assert.matches(path:gsub("%p", "%%%0") .. ":2", log)
    local _, n = log:gsub("a fallback cannot be used", "")
    assert.are.equal(1, n)
  end)

  it("a migration's target so misspelt: its calls go to the old version, counted there", function()
    registry.load(registry_file(('  a = { use = %q, migrate = { to = "opnai/gpt-4.1-2025-04-14", share = 1 } },')
      :format(OLD)))
    local r = assert(ai.chat({ model = "a", messages = MSGS, user = "u1" }))
    assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
    assert.are.equal("old", r.migration.side)
  end)

  it("a deployment so misspelt is left out; the others serve", function()
    registry.load(registry_file(('  a = { deployments = { { use = "opnai/gpt-4o-mini-2024-07-18" }, { use = %q } } },')
      :format(OLD)))
    for _ = 1, 4 do
      local r = assert(ai.chat({ model = "a", messages = MSGS }))
      assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
    end
  end)

  -- (and the operator is told once, at the entry's line: a gateway's client got a 400 for each call,
  -- and nothing in the log said what to fix, nor where)
  it("an alias whose only model is so misspelt raises at the caller's line, naming the alias; warned once", function()
    local path = registry_file('  a = { use = "opnai/gpt-4o-mini-2024-07-18" },')
    registry.load(path)
    local err
    local log = warned(function()
      for _ = 1, 3 do
        local ok
        ok, err = pcall(function()
          local r, e = ai.chat({ model = "a", messages = MSGS })
          return r, e
        end)
        assert.is_false(ok)
      end
    end)
    assert.matches("registry_badday_spec%.lua:%d+: ai: unknown provider 'opnai' in 'opnai/gpt%-4o%-mini%-2024%-07%-18' "
      .. "%(model registry, alias 'a'", tostring(err))
    assert.are.equal(0, m:stats().total)
    local _, n = log:gsub("names a provider with no adapter", "")
    assert.are.equal(1, n, log)
    assert.matches(path:gsub("%p", "%%%0") .. ":2", log)
  end)
end)

describe("aliases nested deeper than a call resolves", function()
  local function chain(n) -- l1 -> l2 -> ... -> ln -> OLD
    local lines = {}
    for i = 1, n do lines[i] = ('  l%d = { use = %q },'):format(i, i < n and ("l" .. (i + 1)) or OLD) end
    return table.concat(lines, "\n")
  end

  it("nine names (eight aliases and the model) serve", function()
    registry.load(registry_file(chain(8)))
    local r = assert(ai.chat({ model = "l1", messages = MSGS }))
    assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
  end)

  -- (before: it loaded, and every call to l1 raised "aliases nest too deep", naming no file)
  it("one more is refused when the registry loads, naming the chain at the first alias's line", function()
    local err, path = refused(chain(9))
    assert.matches(path:gsub("%p", "%%%0") .. ":2: model 'l1': resolves through 10 names %(l1 %-> l2 %-> .* %-> l9 %-> "
      .. "openai/gpt%-4o%-mini%-2024%-07%-18%), more than 9", err)
  end)

  -- (before: each chain was copied whole into the one above it: 20,000 aliases each falling back
  -- to the next took 45 s of the loop to refuse, with a message of gigabytes, each line naming
  -- thousands of aliases)
  it("a chain of thousands is refused with a message of a few lines, each chain cut short", function()
    local t = {}
    for i = 1, 3000 do t["c" .. i] = { use = OLD, fallbacks = { "c" .. (i + 1) } } end
    t.c3001 = { use = OLD }
    local ok, err = pcall(registry.use, t)
    assert.is_false(ok)
    assert.is_true(#err < 8000, #err)
    assert.matches("model 'c1': resolves through 3002 names %(c1 %-> c2 %-> .* %-> c10 %-> %.%.%.%), more than 9", err)
    assert.matches("%d+ more models resolve through more than 9 names", err)
  end)
end)

describe("fallbacks naming the same aliases at each level", function()
  -- (before: each alias was expanded again each time it was met: 8 levels of 8 aliases, each
  -- falling back to the next level's 8, resolved into 2.4 million choices, seconds of the loop's
  -- time per resolve, once a second on a gateway, as a plan is kept a second)
  it("resolve each alias once: a plan holds a choice per alias, in the order first met", function()
    local t = {}
    for d = 1, 8 do
      for w = 1, 8 do
        local fb = {}
        if d < 8 then for k = 1, 8 do fb[k] = ("l%d_%d"):format(d + 1, k) end end
        t[("l%d_%d"):format(d, w)] = { use = ("openai/gpt-4o-mini-2024-07-18:l%d_%d"):format(d, w), fallbacks = fb }
      end
    end
    registry.use(t)
    local plan = registry.resolve("l1_1", {})
    local models = {}
    for i, c in ipairs(plan.choices) do models[i] = c.model:match(":(.*)$") end
    assert.are.equal(1 + 7 * 8, #models)
    assert.are.same({ "l1_1", "l2_1", "l3_1", "l4_1" }, { models[1], models[2], models[3], models[4] })
    assert.are.equal("l2_8", models[#models]) -- (depth first, as a call tries them)
    assert(ai.chat({ model = "l1_1", messages = MSGS }))
  end)
end)

describe("migrations inside migrations", function()
  -- (before: it loaded; a call through 'a' took a's migration and never b's, nor counted for b's rollback)
  it("a migration reaching an alias that is migrating itself is refused", function()
    local err, path = refused(([[
  b = { use = %q, migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0.3 } },
  a = { use = "b", migrate = { to = %q, share = 0.1 } },]]):format(OLD, NEW))
    assert.matches(path:gsub("%p", "%%%0") .. ":3: model 'a': migrates through 'b', which has a migration of its own",
      err)
  end)

  -- (before: a completed migration served its target to its own calls only: through another
  -- alias or as a fallback, calls still went to the old version, which may be retired by then)
  it("a completed migration (share = 1) serves its target wherever it is met: below an alias, as a fallback", function()
    registry.use({
      ["chat-fast"] = { use = OLD, migrate = { to = NEW, share = 1 } },
      team = { use = "chat-fast" },
      canary = { use = "chat-fast", migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0 } },
      cheap = { use = "openai/gpt-4.1-nano-2025-04-14", fallbacks = { "chat-fast" } },
    })
    for _, alias in ipairs({ "chat-fast", "team", "canary" }) do
      local r = assert(ai.chat({ model = alias, messages = MSGS, user = "u1" }))
      assert.are.equal("gpt-4.1-mini-2025-04-14", r.requested_model, alias)
    end
    m:configure({ strict = true, reply = "one two three",
      faults = { { route = "chat", model = "gpt-4.1-nano-2025-04-14", status = 500 } } })
    local r = assert(ai.chat({ model = "cheap", messages = MSGS }))
    assert.are.equal("gpt-4.1-mini-2025-04-14", r.requested_model)
  end)
end)

describe("keys written twice in a registry file", function()
  -- (before: Lua kept the last of each without a word: the first migrate's share, the first
  -- chat-fast, edited and reloaded, changed nothing)
  it("are refused with both lines: an alias written twice, two migrations in one entry", function()
    local err, path = refused(([[
  ["chat-fast"] = { use = %q,
                    migrate = { to = %q, share = 0.05 },
                    migrate = { to = "openai/gpt-4.1-2025-04-14", share = 0.5 } },
  other = { use = %q, fallbacks = { "chat-fast" } }, -- ["other"] = in a comment is not a key
  ["chat-fast"] = { use = "openai/gpt-4o-2024-08-06" },]]):format(OLD, NEW, OLD))
    local p = path:gsub("%p", "%%%0")
    assert.matches(p .. ":4: model 'chat%-fast': 'migrate' is written twice in one table %(lines 3 and 4%)", err)
    assert.matches(p .. ":6: model 'chat%-fast' is written twice %(lines 2 and 6%)", err)
    assert.not_matches("'other'", err)
  end)

  it("the same key in different tables, in strings and in comments is not a duplicate", function()
    registry.load(registry_file(([[
  a = { use = %q, migrate = { to = %q, share = 0.1 } }, --[==[ a = { } ]==]
  b = { use = %q, migrate = { to = %q, share = 0.1 } }, -- use = "x"
  c = { use = %q, fallbacks = { "a", "b" } },]]):format(OLD, NEW, OLD, NEW, "openai/gpt-4o-2024-08-06")))
    assert(ai.chat({ model = "c", messages = MSGS }))
  end)
end)

describe("a migration's share over many calls", function()
  it("10 % of 10,000 keys move, within statistical bounds; raising the share keeps those moved", function()
    registry.use({ canary = { use = OLD, migrate = { to = NEW, share = 0.1, sticky = "user" } } })
    local moved = {}
    local n = 0
    for i = 1, 10000 do
      if registry.resolve("canary", { user = "sk-user-" .. i }).migration.side == "new" then
        moved[i], n = true, n + 1
      end
    end
    -- binomial(10000, 0.1): sd 30; 4 sd either side
    assert.is_true(n > 880 and n < 1120, "new side: " .. n)
    registry.use({ canary = { use = OLD, migrate = { to = NEW, share = 0.2, sticky = "user" } } })
    local now_new = 0
    for i = 1, 10000 do
      local side = registry.resolve("canary", { user = "sk-user-" .. i }).migration.side
      if moved[i] then assert.are.equal("new", side, "user " .. i .. " went back") end
      if side == "new" then now_new = now_new + 1 end
    end
    assert.is_true(now_new > 1880 and now_new < 2120, "new side: " .. now_new)
  end)
end)

describe("a migration edited while its calls are in flight", function()
  it("each call is served and priced by the version it was resolved with, whole", function()
    m:configure({ strict = true, reply = "one two three", latency = 1 })
    registry.use({ canary = { use = OLD, migrate = { to = NEW, share = 0 } } })
    local tasks = {}
    for i = 1, 20 do
      tasks[i] = resil.spawn(function() return ai.chat({ model = "canary", messages = MSGS, user = "u" .. i }) end)
    end
    resil.sleep(0.5) -- every call sent, none answered
    registry.use({ canary = { use = OLD, migrate = { to = NEW, share = 1 } } })
    for _, t in ipairs(tasks) do
      local ok, r = t:join()
      assert(ok and r, tostring(r))
      assert.are.equal("gpt-4o-mini-2024-07-18", r.requested_model)
      assert.are.equal("old", r.migration.side)
    end
    for i = 1, 5 do
      assert.are.equal("gpt-4.1-mini-2025-04-14",
        assert(ai.chat({ model = "canary", messages = MSGS, user = "u" .. i })).requested_model)
    end
    local by_model = {}
    for _, g in ipairs(assert(resil.cost.breakdown("model"))) do by_model[g.key] = g.calls end
    assert.are.same({ ["gpt-4o-mini-2024-07-18"] = 20, ["gpt-4.1-mini-2025-04-14"] = 5 }, by_model)
    assert.are.equal(25, m:stats().routes.chat)
  end)
end)

describe("a model past its sunset with no replacement", function()
  -- (before: the message named the registry's path on the server, which a gateway hands its client)
  it("fails the call before anything is sent, the registry's file in a field and not in the message", function()
    local path = registry_file('  ["gpt-x-2024-01-01"] = { deprecated = true, sunset = "2020-01-01" },\n' ..
      '  gone = { use = "openai/gpt-x-2024-01-01" },')
    registry.load(path)
    local r, err = ai.chat({ model = "gone", messages = MSGS })
    assert.is_nil(r)
    assert.are.equal("model_retired", err.kind)
    assert.are.equal("model openai/gpt-x-2024-01-01 passed its sunset (2020-01-01) and the model registry names no "
      .. "replacement", err.message)
    assert.are.equal(path, err.file)
    assert.are.equal(0, m:stats().total)
  end)
end)

describe("a registry under the sandbox", function()
  -- (before: the sandbox hides package.searchers, so the registry guessed its file was the working
  -- folder's policies/models.lua: keys written twice there refused the --policies DIR registry, and
  -- messages named lines of the wrong file)
  it("is read from the policy folder it was loaded from, not the working folder's", function()
    local dir = helpers.tmpname("")
    os.execute(("mkdir -p %s/pol %s/cwd/policies"):format(dir, dir))
    helpers.write(dir .. "/pol/models.lua", ('return {\n  x = { use = %q },\n}\n'):format(OLD))
    helpers.write(dir .. "/cwd/policies/models.lua", 'return {\n  x = { use = "a" },\n  x = { use = "b" },\n}\n')
    local script = helpers.write(dir .. "/s.lua", [[
      local registry = require "policies.registry"
      print(registry.file, registry.entries.x.use)
    ]])
    local run = ("cd %s/cwd && %s --sandbox --policies %s/pol %s"):format(dir, helpers.resil, dir, script)
    local r = helpers.run(run)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(("%s/pol/models.lua\t%s\n"):format(dir, OLD), r.stdout)
    -- and its own keys written twice are refused at their lines
    helpers.write(dir .. "/pol/models.lua", ('return {\n  x = { use = %q },\n  x = { use = %q },\n}\n'):format(OLD, NEW))
    r = helpers.run(run)
    assert.are.equal(1, r.code)
    assert.matches(("%s/pol/models%%.lua:3: model 'x' is written twice %%(lines 2 and 3%%)"):format(
      dir:gsub("%p", "%%%0")), r.stderr)
  end)
end)

describe("a migration through a gateway's few keys", function()
  -- (before: sticky had to name a field, and a gateway's `user` is the key's name: one key's calls
  -- were all on one side, so a 10 % canary for an app with one key moved none or all of them)
  it("sticky = false splits the calls of one caller by the share, each call drawing", function()
    registry.use({ canary = { use = OLD, migrate = { to = NEW, share = 0.1, sticky = false } } })
    math.randomseed(7)
    registry.random = math.random
    local new = 0
    for _ = 1, 10000 do
      if registry.resolve("canary", { user = "team-a" }).migration.side == "new" then new = new + 1 end
    end
    assert.is_true(new > 880 and new < 1120, "new side: " .. new)
    -- sticky by default: one key, one side
    registry.use({ canary = { use = OLD, migrate = { to = NEW, share = 0.1 } } })
    local sides = {}
    for _ = 1, 100 do sides[registry.resolve("canary", { user = "team-a" }).migration.side] = true end
    assert.are.equal(1, (sides.new and 1 or 0) + (sides.old and 1 or 0))
  end)
end)

describe("a sunset on a host in another time zone", function()
  -- (before: os.time's local time, corrected by the zone's offset of 1970: in New York in summer
  -- a sunset came at 23:00 UTC the day before, in London in winter an hour late)
  it("begins at midnight UTC of its day wherever the host is", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local registry = require "policies.registry"
      print(registry.day_of("2026-06-30"), registry.day_of("2026-01-15"), registry.day_of("2000-02-29"))
    ]])
    for _, tz in ipairs({ "UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe" }) do
      local r = helpers.run(("TZ=%s %s %s"):format(tz, helpers.resil, script))
      assert.are.equal("1782777600\t1768435200\t951782400\n", r.stdout, tz)
    end
  end)
end)
