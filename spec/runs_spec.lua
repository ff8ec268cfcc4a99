-- Runs people can read: a run whose items failed ends "done_with_failures";
-- `resil-lua runs show ID` lists each item's steps in order, what failed or
-- was cut short with its error, retries and cost per item, and the command
-- that resumes the run. On SQLite and on a real redis-server.
local helpers = require "spec.helpers"

local function sh(cmd) return helpers.run(cmd) end

-- Items finish out of order (item 1 sleeps longest); item 3 fails outside a
-- step, item 5's second step fails after two retries; FIX=1 mends both.
local pipeline = [[
local resil = require "resil"
local retry = require "policies.retry"
local fix = os.getenv("FIX") == "1"
local _, failures = resil.map({ 1, 2, 3, 4, 5, 6 }, function(i)
  resil.step("fetch", function()
    resil.sleep(10 - i)
    resil.cost.record{ provider = "mock", model = "m", usd = 0.01 * i }
    return i
  end)
  if i == 3 and not fix then error("boom at item 3") end
  return resil.step("caption", function()
    return retry.call(function(attempt)
      if i == 5 and (attempt < 3 or not fix) then return nil, resil.error("timeout", "provider too slow") end
      return i * 2
    end, { provider = "mock", max_retries = 2 })
  end)
end, { concurrency = 6 })
local n = 0
for _ in pairs(failures or {}) do n = n + 1 end
print("failed items", n)
]]


for _, b in ipairs(helpers.store_backends()) do
  describe("runs show on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    local url, script
    local function run(env, extra)
      return sh(("%s %s --store '%s' --virtual-clock --log-level off --run r1 %s %s arg1 'two words'"):format(
        env or "", helpers.resil, url, extra or "", script))
    end

    before_each(function()
      url = b.url()
      script = helpers.write(helpers.tmpname(".lua"), pipeline)
    end)

    it("a run whose items failed is done_with_failures, not done", function()
      local r = run()
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("failed items\t2\n", r.stdout)
      local list = sh(("%s runs --store '%s'"):format(helpers.resil, url))
      assert.matches("r1%s+done_with_failures", list.stdout)
    end)

    it("lists items in order with their steps, errors, retries, cost and the command to resume", function()
      run()
      local show = sh(("%s runs show r1 --store '%s'"):format(helpers.resil, url))
      assert.are.equal(0, show.code, show.stderr)
      local out = show.stdout
      assert.matches("^run r1: done_with_failures", out)
      -- steps by item then sequence, not by completion time (item 6 finished first)
      local order = {}
      for item, seq, name in out:gmatch("\n(%d)%s+(%d)%s+(%S+)%s+%a+%s") do order[#order + 1] = item .. seq .. name end
      assert.are.same({ "1" .. "1fetch", "12caption", "21fetch", "22caption", "31fetch", "32(item)", "41fetch",
                        "42caption", "51fetch", "52caption", "61fetch", "62caption" }, order)
      assert.matches("\n3%s+2%s+%(item%)%s+failed%s+0%s+%S+ %S+%s+[^\n]*boom at item 3", out)
      assert.matches("\n5%s+2%s+caption%s+failed%s+2%s+%S+ %S+%s+timeout: provider too slow", out)
      -- per item: state, steps, retries, cost from the ledger
      assert.matches("\n5%s+failed%s+2%s+2%s+%$0%.050000", out)
      assert.matches("\n6%s+done%s+2%s+0%s+%$0%.060000", out)
      assert.matches("6 items: 4 done, 2 failed, 0 pending; 2 retries; cost %$0%.210000", out)
      assert.matches("resume: resil%-lua %-%-store %S+ %-%-run r1 " .. script:gsub("%p", "%%%0") ..
        " arg1 'two words'", out)
    end)

    it("a resumed run that mends its failures ends done and forgets them", function()
      run()
      local r = run("FIX=1")
      assert.are.equal("failed items\t0\n", r.stdout)
      local show = sh(("%s runs show r1 --store '%s'"):format(helpers.resil, url))
      assert.matches("^run r1: done", show.stdout)
      assert.not_matches("%sfailed%s", show.stdout)
      assert.matches("\n5%s+2%s+caption%s+done%s+2", show.stdout) -- its two retries this time
      assert.not_matches("resume:", show.stdout)
    end)

    it("steps cut short by a failing script are pending", function()
      local cut = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.step("first", function() return 1 end)
resil.spawn(function() resil.step("long", function() resil.sleep(100) end) end)
resil.sleep(1)
error("the script gave up")
]])
      local r = sh(("%s --store '%s' --virtual-clock --log-level off --run r2 %s"):format(helpers.resil, url, cut))
      assert.are.equal(1, r.code)
      local show = sh(("%s runs show r2 --store '%s'"):format(helpers.resil, url))
      assert.matches("^run r2: failed", show.stdout)
      assert.matches("\n%-%s+2%s+long%s+pending", show.stdout)
      assert.matches("1 items: 0 done, 0 failed, 1 pending", show.stdout)
      assert.matches("resume: ", show.stdout)
    end)

    -- (before: the row kept the first script's name and took the new arguments: "resume: resil-lua
    -- --run r4 old.lua new-arg", a command that ran the old script, or a file no longer there)
    it("a run resumed or started over by another script names that script in its resume command", function()
      local code = 'require("resil").step("a", function() return 1 end)\nerror("stopped")\n'
      local old = helpers.write(helpers.tmpname("-old.lua"), code)
      local new = helpers.write(helpers.tmpname("-new.lua"), code)
      local function show() return sh(("%s runs show r4 --store '%s'"):format(helpers.resil, url)).stdout end
      sh(("%s --store '%s' --log-level off --run r4 %s old-arg"):format(helpers.resil, url, old))
      assert.matches("\nresume: [^\n]* %-%-run r4 " .. old:gsub("%p", "%%%0") .. " old%-arg\n", show())
      for _, fresh in ipairs({ "", "--fresh" }) do
        sh(("%s --store '%s' --log-level off --run r4 %s %s new-arg"):format(helpers.resil, url, fresh, new))
        local out = show()
        assert.matches("^run r4: failed %(" .. new:gsub("%p", "%%%0") .. "%)", out)
        assert.matches("\nresume: [^\n]* %-%-run r4 " .. new:gsub("%p", "%%%0") .. " new%-arg\n", out)
      end
    end)
  end)
end

-- Each step's result and each journaled decision printed exactly (numbers
-- with 17 digits, keys with their types): a resumed run must print the same.
local exact_script = [[
local resil = require "resil"
local function show(v)
  if type(v) ~= "table" then
    return (math.type(v) or type(v)) .. ":" .. (math.type(v) == "float" and ("%.17g"):format(v) or tostring(v))
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return show(a) < show(b) end)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = "[" .. show(k) .. "]=" .. show(v[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end
print(show(resil.run.now()), show(resil.run.random()), show(resil.run.random(1, 2^62)))
local values = { 123456789012345678, math.mininteger, 1.0, -0.0, 0.1, 1 / 3, 2^70, { 1, 2, x = 3 },
  { ["1"] = "s", [1] = "n" }, { [1] = "a", [4] = "d" }, { [2] = "b", [3] = "c" }, { [1] = 1, [100] = 2 },
  { ["@i"] = "not a tag" }, { [true] = "yes" }, {}, { a = { b = { 1.5, { "deep" } } } },
  { 1, nil, 3, [5] = 5 }, { nil, 2, 3, [0] = 0 }, { ["@error"] = { kind = "x", message = "m" } },
  { ["@error"] = "not a table" }, { ["@e"] = 1 } }
for i, v in ipairs(values) do print(i, show(resil.step("v" .. i, function() return v end))) end
if os.getenv("FAIL") then error("stopped after the steps") end
]]

-- Items paid for one by one (each fn run logged), from the command line's comma-separated
-- list; KILL=x: the process dies (SIGKILL) in item x's step, the items before it checkpointed.
local ITEMS = [[
local resil = require "resil"
local log, list = arg[1], arg[2]
local items = {}
for x in list:gmatch("[^,]+") do -- VOLATILE: each item has a field that differs in every process
  items[#items + 1] = { name = x, size = #x, drawn = os.getenv("VOLATILE") and tostring({}) .. os.clock() or nil }
end
local out = resil.map(items, function(item)
  return resil.step("render", function()
    if item.name == os.getenv("KILL") then os.execute("kill -KILL " .. io.open("/proc/self/stat"):read("l"):match("^%d+")) end
    local f = assert(io.open(log, "a")); f:write("paid ", item.name, "\n"); f:close()
    return "video of " .. item.name
  end)
end, { concurrency = 1, key = os.getenv("KEYED") and function(item) return item.name end or nil })
for i, item in ipairs(items) do print(item.name, out[i]) end
]]

for _, b in ipairs(helpers.store_backends()) do
  describe("step results on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)

    it("come back exactly as the first run got them: numbers to the last digit, tables with their key types",
      function()
        local url, script = b.url(), helpers.write(helpers.tmpname(".lua"), exact_script)
        local first = sh(("FAIL=1 %s --store '%s' --log-level off --run exact %s"):format(helpers.resil, url, script))
        assert.are_not.equal(0, first.code)
        local again = sh(("%s --store '%s' --log-level off --run exact %s"):format(helpers.resil, url, script))
        assert.are.equal(0, again.code, again.stderr)
        assert.are.equal(first.stdout, again.stdout)
        assert.matches("1\tinteger:123456789012345678\n", again.stdout, 1, true)
        assert.matches("4\tfloat:-0\n", again.stdout, 1, true)
        assert.matches("8\t{[integer:1]=integer:1,[integer:2]=integer:2,[string:x]=integer:3}\n", again.stdout, 1, true)
        assert.matches("17\t{[integer:1]=integer:1,[integer:3]=integer:3,[integer:5]=integer:5}\n", again.stdout, 1, true)
        assert.matches("19\t{[string:@error]={[string:kind]=string:x,[string:message]=string:m}}\n", again.stdout, 1, true)
        assert.matches("20\t{[string:@error]=string:not a table}\n", again.stdout, 1, true)
      end)

    -- (before: an object was stored as its fields, and a resumed run's first method call on it
    -- failed, after the crash; an empty JSON array came back {}, which a provider refuses)
    it("an object (a table with a metatable) is refused at the step; an empty JSON array comes back one", function()
      local url = b.url()
      local script = helpers.write(helpers.tmpname(".lua"), [==[
        local resil = require "resil"
        local json = resil.json
        local Video = { __index = { url = function(self) return "u/" .. self.id end } }
        local ok, err = pcall(resil.step, "object", function() return setmetatable({ id = "v1" }, Video) end)
        print(ok, err)
        local r = resil.step("schema", function() return { required = setmetatable({}, json.array_mt) } end)
        print(json.encode(r))
        -- (an error inside a result, a fallback chain's, is its fields: stored as before)
        local e = resil.step("nested error", function() return { errors = { resil.error("timeout", "slow") } } end)
        print("nested", e.errors[1].kind, e.errors[1].message)
      ]==])
      for _ = 1, 2 do
        local r = sh(("%s --store '%s' --log-level off --run objects %s"):format(helpers.resil, url, script))
        assert.are.equal(0, r.code, r.stderr)
        assert.matches("false\t[^\n]*%.lua:4: resil.step: cannot checkpoint the results: they hold a table with a " ..
          "metatable", r.stdout)
        assert.matches('{"required":[]}', r.stdout, 1, true)
        assert.matches("nested\ttimeout\tslow", r.stdout)
      end
    end)

    it("a result past 32 MB as JSON (strings, numbers) is refused at the step with file:line, not a crash", function()
      local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local ok, err = pcall(function()
  local v = resil.step("huge", function() return { ("x"):rep(40 * 1024 * 1024), ("y"):rep(30 * 1024 * 1024) } end)
  return v
end)
print(ok, err)
print(pcall(function()
  local v = resil.step("huge key", function() return { [("k"):rep(40 * 1024 * 1024)] = 1 } end)
  return v
end))
print(pcall(function() -- (numbers count too: before, 3 million of them were taken whole)
  local v = resil.step("numbers", function() local t = {} for i = 1, 3000000 do t[i] = i + 0.5 end return t end)
  return v
end))
print(pcall(function() -- (bytes JSON writes as \u0001: 8 MB of them are 48 MB as JSON, stored before)
  local v = resil.step("escaped", function() return ("\1"):rep(8 * 1024 * 1024) end)
  return v
end))
]])
      local r = sh(("%s --store '%s' --log-level off --run huge %s"):format(helpers.resil, b.url(), script))
      assert.are.equal(0, r.code, r.stderr)
      assert.matches("^false\t%S+%.lua:3: resil.step: cannot checkpoint the results: they hold more than 32 MB as JSON\n" ..
        "false\t%S+%.lua:8: resil.step: cannot checkpoint the results: they hold more than 32 MB as JSON\n" ..
        "false\t%S+%.lua:12: resil.step: cannot checkpoint the results: they hold more than 32 MB as JSON\n" ..
        "false\t%S+%.lua:16: resil.step: cannot checkpoint the results: they hold more than 32 MB as JSON\n$", r.stdout)
    end)

    it("a run resumed with its items reordered or one inserted is refused at the item whose record is " ..
      "another's, naming the run and its index: no item gets another's paid result", function()
      local url, log, script = b.url(), helpers.tmpname(".log"), helpers.write(helpers.tmpname(".lua"), ITEMS)
      local function items(list, env)
        return sh(("%s %s --store '%s' --log-level off --run items %s %s %s"):format(env or "", helpers.resil, url,
          script, log, list))
      end
      assert.are_not.equal(0, items("a,b,c,d", "KILL=c").code)
      assert.are.equal("paid a\npaid b\n", helpers.slurp(log))
      for _, list in ipairs({ "b,a,c,d", "x,a,b,c,d" }) do
        local r = items(list)
        -- (before: "b  video of a" and "a  video of b"; with x inserted, x got a's video, a got b's)
        assert.are.equal(1, r.code, r.stdout)
        assert.matches("divergence: run items diverged at item 1: its step 1 'render' was recorded for another item " ..
          "(the list given to resil.map was reordered, or an item inserted or removed, since the run began", r.stderr,
          1, true)
        assert.are.equal("", r.stdout)
      end
      assert.are.equal("paid a\npaid b\n", helpers.slurp(log)) -- nothing paid meanwhile
      -- the same list, with an item appended: the run resumes
      local r = items("a,b,c,d,e")
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("a\tvideo of a\nb\tvideo of b\nc\tvideo of c\nd\tvideo of d\ne\tvideo of e\n", r.stdout)
      assert.are.equal("paid a\npaid b\npaid c\npaid d\npaid e\n", helpers.slurp(log))
    end)

    it("resil.map's key names items whose fields change between runs: resumed, each keeps its own result", function()
      local url, log, script = b.url(), helpers.tmpname(".log"), helpers.write(helpers.tmpname(".lua"), ITEMS)
      local function items(run, env)
        return sh(("VOLATILE=1 %s %s --store '%s' --log-level off --run %s %s %s a,b,c"):format(env or "", helpers.resil,
          url, run, script, log))
      end
      assert.are_not.equal(0, items("unkeyed", "KILL=b").code)
      local r = items("unkeyed")
      assert.matches("divergence: run unkeyed diverged at item 1", r.stderr, 1, true) -- (the item is not the same)
      assert.are_not.equal(0, items("keyed", "KEYED=1 KILL=b").code)
      r = items("keyed", "KEYED=1")
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("a\tvideo of a\nb\tvideo of b\nc\tvideo of c\n", r.stdout)
      assert.are.equal("paid a\npaid a\npaid b\npaid c\n", helpers.slurp(log))
    end)

    if b.name == "SQLite" then
      it("records written before items were fingerprinted are replayed as they were", function()
        local url, log, script = b.url(), helpers.tmpname(".log"), helpers.write(helpers.tmpname(".lua"), ITEMS)
        local cmd = ("%s --store '%s' --log-level off --run old %s %s a,b"):format(helpers.resil, url, script, log)
        assert.are.equal(0, sh(cmd).code)
        -- the records as versions before this one wrote them: without the item's fingerprint
        local strip = sh(("sqlite3 %s %q"):format(url, [[UPDATE steps SET result = '{' || substr(result, 28)
          WHERE result LIKE '{"item":"%' AND substr(result, 26, 2) = '",';
          SELECT count(*) FROM steps WHERE result LIKE '%"item"%';]]))
        assert.are.equal("0\n", strip.stdout, strip.stderr)
        local r = sh(cmd)
        assert.are.equal(0, r.code, r.stderr)
        assert.are.equal("a\tvideo of a\nb\tvideo of b\n", r.stdout)
        assert.are.equal("paid a\npaid b\n", helpers.slurp(log))
      end)
    end
  end)
end

-- (before: resil.run.random(6), math.random's one-argument form, raised "[resil runs]:683: bad
-- argument #2 to 'random'" from inside its step, and the run ended done_with_failures)
describe("resil.run.random", function()
  it("takes math.random's forms, refuses others at the caller's line, and records no failed step", function()
    local db = helpers.tmpname(".db")
    local script = [[
local resil = require "resil"
local die, pick = resil.run.random(6), resil.run.random(3, 4)
print(math.type(die), die >= 1 and die <= 6, pick >= 3 and pick <= 4)
for _, args in ipairs({ { "6" }, { 1.5 }, { 4, 3 }, { 0 }, { nil, 5 }, { 1, 0 / 0 } }) do
  print((select(2, pcall(function() local v = resil.run.random(args[1], args[2]); return v end))))
end
]]
    local r = helpers.run_script(script, "--log-level off --store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("integer\ttrue\ttrue", lines[1])
    assert.are.equal(7, #lines, r.stdout)
    for i = 2, 7 do assert.matches("%.lua:5: resil%.run%.random: ", lines[i]) end
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db))
    assert.matches(" done ", runs.stdout)
    assert.is_nil(runs.stdout:find("failures", 1, true), runs.stdout)
  end)
end)

-- A step's error is a provider's or a model's text: what the terminal tables
-- print of it (and of step names, providers, models) must not act on the
-- operator's terminal.
describe("runs show and costs on a terminal", function()
  it("print control characters from the store as escapes, never as they are", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
pcall(resil.step, "name\27[2J", function() error("model said \27[31mRED\27]0;title\7 and \194\155 C1", 0) end)
resil.cost.record({ provider = "p\27[8m", model = "m\27]8;;http://x\7link", usd = 0.01 })
]])
    local r = sh(("%s --store %s --log-level off --run esc-run %s"):format(helpers.resil, db, script))
    assert.are.equal(0, r.code, r.stderr)
    local outputs = {}
    for _, cmd in ipairs({ "runs show esc-run", "runs", "costs --by model", "costs --by provider" }) do
      local out = sh(("%s %s --store %s"):format(helpers.resil, cmd, db))
      assert.are.equal(0, out.code, out.stderr)
      local lines = out.stdout:gsub("\n", "")
      assert.is_nil(lines:find("[%c\127]"), cmd .. " printed a control character:\n" .. out.stdout)
      assert.is_nil(out.stdout:find("\194[\128-\159]"), cmd .. " printed a C1 control:\n" .. out.stdout)
      outputs[#outputs + 1] = out.stdout
    end
    local all = table.concat(outputs)
    assert.matches("name\\x1b[2J", all, 1, true)
    assert.matches("model said \\x1b[31mRED\\x1b]0;title\\x07 and \\u009b C1", all, 1, true)
    assert.matches("m\\x1b]8;;http://x\\x07link", all, 1, true)
    assert.matches("p\\x1b[8m", all, 1, true)
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(db .. suffix) end
  end)

  -- Unicode's bidirectional controls (U+202A-U+202E, U+2066-U+2069, LRM, RLM, ALM) reorder
  -- the rest of the line on a terminal: an error reading "paid \u{202E}0.01$" showed its
  -- text backwards and its columns out of place ("Trojan Source"). Shown as escapes.
  it("prints Unicode's bidirectional controls as escapes, not as they are", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
pcall(resil.step, "bidi\u{202E}eman", function() error("refund \u{2067}done\u{2069} \u{200F}x \u{61C}y", 0) end)
]])
    local r = sh(("%s --store %s --log-level off --run bidi-run %s"):format(helpers.resil, db, script))
    assert.are.equal(0, r.code, r.stderr)
    local outputs = {}
    for _, cmd in ipairs({ "runs show bidi-run", "runs" }) do
      local out = sh(("%s %s --store %s"):format(helpers.resil, cmd, db))
      assert.are.equal(0, out.code, out.stderr)
      for _, c in ipairs({ "\u{202E}", "\u{2067}", "\u{2069}", "\u{200F}", "\u{61C}" }) do
        assert.is_nil(out.stdout:find(c, 1, true), cmd .. " printed a bidirectional control:\n" .. out.stdout)
      end
      outputs[#outputs + 1] = out.stdout
    end
    -- the page too: a browser reorders its text as a terminal does
    local page = helpers.tmpname(".html")
    local out = sh(("%s runs show bidi-run --html %s --store %s"):format(helpers.resil, page, db))
    assert.are.equal(0, out.code, out.stderr)
    outputs[#outputs + 1] = helpers.slurp(page)
    os.remove(page)
    for _, c in ipairs({ "\u{202E}", "\u{2067}", "\u{2069}", "\u{200F}", "\u{61C}" }) do
      assert.is_nil(outputs[#outputs]:find(c, 1, true), "the page holds a bidirectional control")
    end
    local all = table.concat(outputs)
    assert.matches("bidi\\u202eeman", all, 1, true)
    assert.matches("refund \\u2067done\\u2069 \\u200fx \\u061cy", all, 1, true)
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(db .. suffix) end
  end)
end)

-- What a run cost is every call its script paid for, also those made before its first step (an
-- ai.chat at the top of the script) and in a script with no steps at all: the ledger's rows carry
-- the run's id from the script's first line. On SQLite and on a real redis-server.
local early_calls = [[
local resil = require "resil"
local ai = require "policies.ai"
local mock = resil.mock.start({ strict = true, reply = "ok" })
ai.configure("openai", { base_url = mock.url .. "/v1", api_key = "sk-example-000000" })
local function chat()
  assert(ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 10, messages = { { role = "user", content = "hi" } } }))
  return true
end
chat()
if arg[1] == "steps" then
  resil.step("answer", chat)
  print(resil.run.id())
end
mock:stop()
]]

for _, b in ipairs(helpers.store_backends()) do
  describe("a run's cost on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)

    -- -> the calls and dollars `costs --run ID` says the run made, and the store's whole ledger's
    local function costs(url, id)
      local r = sh(("%s costs --store '%s' --run %s --by model --json"):format(helpers.resil, url, id))
      assert.are.equal(0, r.code, r.stderr)
      local run = require("resil").json.decode(r.stdout)
      local all = require("resil").json.decode(sh(("%s costs --store '%s' --by model --json"):format(
        helpers.resil, url)).stdout)
      return run[1] and run[1].calls or 0, all[1] and all[1].calls or 0
    end

    it("counts the calls made before its first step", function()
      local url = b.url()
      local script = helpers.write(helpers.tmpname(".lua"), early_calls)
      local r = sh(("%s --store '%s' --log-level off %s steps"):format(helpers.resil, url, script))
      assert.are.equal(0, r.code, r.stderr)
      local id = r.stdout:match("^(%S+)\n$")
      assert.matches("%s" .. id:gsub("%p", "%%%0") .. "%s+done%s+1%s",
        sh(("%s runs --store '%s'"):format(helpers.resil, url)).stdout)
      -- (before: 1 of the 2 calls the ledger has, the one inside the step)
      assert.are.same({ 2, 2 }, { costs(url, id) })
      local show = sh(("%s runs show %s --store '%s'"):format(helpers.resil, id, url))
      assert.are.equal(0, show.code, show.stderr)
      local total = sh(("%s costs --store '%s'"):format(helpers.resil, url)).stdout:match("total (%$[%d.]+)")
      assert.matches("; cost " .. total:gsub("%p", "%%%0") .. "\n", show.stdout)
    end)

    it("counts the calls of a script with no steps, under its default id or --run", function()
      local url = b.url()
      local script = helpers.write(helpers.tmpname(".lua"), early_calls)
      local r = sh(("%s --store '%s' --log-level off %s"):format(helpers.resil, url, script))
      assert.are.same({ 0, "" }, { r.code, r.stdout }, r.stderr)
      -- (the default id: the script's name and a hash of its path, pipeline_runid_spec)
      local path = sh("realpath " .. script).stdout:gsub("\n$", "")
      local id = path:match("([^/]+)%.lua$") .. "-" .. require("resil").hash(path .. "\0"):sub(1, 12)
      -- (before: "no run ... and no ledger rows for it")
      assert.are.same({ 1, 1 }, { costs(url, id) })
      r = sh(("%s --store '%s' --log-level off --run named %s"):format(helpers.resil, url, script))
      assert.are.same({ 0, "" }, { r.code, r.stdout }, r.stderr)
      assert.are.same({ 1, 2 }, { costs(url, "named") })
      -- runs show gives its cost; it holds no run record (nothing to resume), so runs lists none
      local show = sh(("%s runs show named --store '%s'"):format(helpers.resil, url))
      assert.are.equal(0, show.code, show.stderr)
      assert.matches("^run named: no steps recorded %(.*%); cost %$0%.%d+\n$", show.stdout)
      assert.matches("no runs recorded", sh(("%s runs --store '%s'"):format(helpers.resil, url)).stdout)
    end)
  end)
end

-- A step named by a long text (a prompt) makes a wide column: the tables are printed in time
-- linear in their size (before, `runs show` of 200 steps, one named by 4 KB, took minutes).
describe("runs show of a run with a wide column", function()
  it("prints every step, padded, without trailing spaces, however wide a step's name", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.step("caption: " .. ("a long prompt "):rep(4000), function() return 0 end)
for i = 1, 40 do resil.step("s" .. i, function() return i end) end
]])
    local r = sh(("%s --store %s --log-level off --run wide %s"):format(helpers.resil, db, script))
    assert.are.equal(0, r.code, r.stderr)
    -- (the bound only keeps a regression from holding the suite: the quadratic strip took hours)
    local show = sh(("timeout 120 %s runs show wide --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr)
    local steps, trailing = 0, 0
    for line in show.stdout:gmatch("[^\n]*") do
      if line:match("^%-%s+%d+%s+[%w:]") and line:match("%sdone%s") then steps = steps + 1 end
      if line:match(" $") then trailing = trailing + 1 end
    end
    assert.are.same({ 41, 0 }, { steps, trailing })
    assert.matches("\n%-%s+41%s+s40%s+done%s+0%s+%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d\n", show.stdout)
  end)
end)

-- (before: "runs show: no steps recorded for run 'nightly'", and no word of the runs nightly.lua
-- made, whose ids are its name and a hash of its arguments: nightly-<12 hex digits>)
describe("a run named as its script is (runs show nightly for nightly.lua's runs)", function()
  it("runs show, runs forget and costs --run name the runs named after the script", function()
    local dir, db = helpers.tmpname("-project"), helpers.tmpname(".db")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/nightly.lua", 'require("resil").step("fetch", function() return 1 end)\n')
    for _, a in ipairs({ "", "x" }) do
      local r = sh(("cd %s && %s --store %s --log-level off nightly.lua %s"):format(dir, helpers.resil, db, a))
      assert.are.equal(0, r.code, r.stderr)
    end
    local ids = {}
    for id in sh(("%s runs --store %s"):format(helpers.resil, db)).stdout:gmatch("\n(nightly%-%x+)") do ids[#ids + 1] = id end
    assert.are.equal(2, #ids)
    for cmd, says in pairs({ ["runs show nightly"] = "runs show: no steps recorded for run 'nightly'",
                             ["runs forget nightly"] = "runs forget: no run 'nightly'",
                             ["costs --run nightly"] = "costs: no run 'nightly' in the store" }) do
      local r = sh(("%s %s --store %s"):format(helpers.resil, cmd, db))
      assert.are.equal(1, r.code, cmd)
      assert.matches("^resil%-lua: " .. says:gsub("%p", "%%%0"), r.stderr, 1, false, cmd)
      assert.matches("; the runs named after nightly%.lua and its arguments: nightly%-%x+, nightly%-%x+\n$", r.stderr)
      for _, id in ipairs(ids) do assert.truthy(r.stderr:find(id, 1, true), cmd) end
    end
    -- a name no script's runs start with: as before
    assert.are.equal("resil-lua: runs show: no steps recorded for run 'night'\n",
      sh(("%s runs show night --store %s"):format(helpers.resil, db)).stderr)
  end)
end)
