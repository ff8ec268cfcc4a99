-- What a pipeline's user reads when a step or resil.once is given what it
-- cannot keep: file:line of their own script, also from inside resil.map
-- (where a failure is a message without a traceback) and `runs show`.
local helpers = require "spec.helpers"

describe("resil.once whose fn returns what cannot be stored", function()
  it("raises at the caller's line; inside a step's fn of a map item, at fn's line, shown by runs show", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local _, failures = resil.map({ 1 }, function(i)
  return resil.step("render", function()
    return resil.once("k" .. i, function() local t = {}; t.self = t; return t end)
  end)
end)
print(failures[1])
print(pcall(resil.once, "direct", function() return print end))
local ok, err = pcall(function() local v = resil.once("mine", function() return { f = print } end); return v end)
print(ok, err)
]], ("--store %s --run unstorable --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    -- (before: "resil.once: cannot store the results: ..." with no place in the script at all)
    assert.matches("^/%S+%.lua:4: resil%.once: cannot store the results: they hold a cyclic table$", lines[1])
    assert.matches("^false\t/%S+%.lua:8: resil%.once: cannot store the results: they must be JSON values", lines[2])
    assert.matches("^false\t/%S+%.lua:9: resil%.once: cannot store the results: they must be JSON values", lines[3])
    local show = helpers.run(("%s runs show unstorable --store %s"):format(helpers.resil, db))
    assert.matches("render%s+failed[^\n]+%.lua:4: resil%.once: cannot store the results", show.stdout)
  end)
end)

describe("a step whose fn raises a plain table (error{code = 42, message = ...})", function()
  it("is stored with its fields, which runs show lists, not the table's address", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("charge", function() error({ code = 42, message = "quota" }) end)
]], ("--store %s --run tabled --log-level off"):format(db))
    assert.are.equal(1, r.code)
    local show = helpers.run(("%s runs show tabled --store %s"):format(helpers.resil, db))
    -- (before: "table: 0x55d1c2e3f4a0", which says nothing in another process)
    local text = show.stdout:match("charge%s+failed%s+0%s+[%d%- :]+%s+({[^\n]*})\n")
    assert.is_not_nil(text, show.stdout)
    assert.are.same({ code = 42, message = "quota" }, require("resil").json.decode(text))
  end)

  it("that JSON cannot hold as it is (a cycle, a sparse list, a function) is listed with its fields all the same",
    function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local _, failures = resil.map({ 1, 2 }, function(i)
  return resil.step("charge", function()
    local e = { code = 402, ids = { [1] = "a", [100] = "b" }, retry = print, items = { 1, 2 } }
    if i == 1 then e.self = e else e.ids[{}] = "c" end
    error(e)
  end)
end)
print(failures[1].code, failures[2].code)
]], ("--store %s --run odd --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("402\t402\n", r.stdout)
    local show = helpers.run(("%s runs show odd --store %s"):format(helpers.resil, db)).stdout
    local json = require("resil").json
    -- (before: "table: 0x55d1c2e3f4a0" for both: cjson refused each)
    local one = json.decode(assert(show:match("\n1%s+1%s+charge%s+failed%s+0%s+[%d%- :]+%s+({[^\n]*})\n"), show))
    assert.are.same({ code = 402, ids = { ["1"] = "a", ["100"] = "b" }, retry = "function", items = { 1, 2 },
      self = "{...}" }, one)
    local two = json.decode(assert(show:match("\n2%s+1%s+charge%s+failed%s+0%s+[%d%- :]+%s+({[^\n]*})\n"), show))
    assert.are.same({ code = 402, ids = { ["1"] = "a", ["100"] = "b", table = "c" }, retry = "function",
      items = { 1, 2 } }, two)
  end)
end)

describe("a step in a resil.map item, returned as a tail call (return resil.step(...)), whose results cannot be stored",
  function()
  it("fails at a line of the script (fn's): in the map's failure and in runs show", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local _, failures = resil.map({ 1 }, function(i)
  return resil.step("render", function() return print end)
end)
print(failures[1])
]], ("--store %s --run tail --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "resil.step: cannot checkpoint the results: ..." and no place in the script)
    assert.matches("^/%S+%.lua:3: resil%.step: cannot checkpoint the results: they must be JSON values", r.stdout)
    local show = helpers.run(("%s runs show tail --store %s"):format(helpers.resil, db)).stdout
    assert.matches("render%s+failed[^\n]+%.lua:3: resil%.step: cannot checkpoint the results", show)
  end)
end)

describe("resil.once whose fn returns more results than a replay takes (250)", function()
  it("is refused at the caller's line, and the key stays free: never a record every later call finds unreadable",
    function()
    local db = helpers.tmpname(".db")
    local script = [[
local resil = require "resil"
local t = {}
for i = 1, 300 do t[i] = i end
print(pcall(function() return select("#", resil.once("many", function() return table.unpack(t) end)) end))
print(select("#", resil.once("many", function() return table.unpack(t, 1, 3) end)))
]]
    local r = helpers.run_script(script, ("--store %s --log-level off"):format(db))
    -- (before: "true 300", then "2": nil and store_unavailable "the record of once many is unreadable", in every
    -- process, for the record's retention)
    assert.matches("^false\t/%S+%.lua:4: resil%.once: cannot store the results: more than 250 of them\n3\n$", r.stdout)
    r = helpers.run_script(script, ("--store %s --log-level off"):format(db))
    assert.matches("^true\t3\n3\n$", r.stdout) -- (replayed: the three stored)
  end)
end)

describe("resil.once whose results cannot be stored, its caller gone (canceled) before fn ends", function()
  it("the run's own task reports why, not '(error object is a table value)'", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local started, go = false, false
local caller = resil.spawn(function()
  return resil.once("gone", function()
    started = true
    while not go do resil.sleep(0.01) end
    return print
  end)
end)
while not started do resil.sleep(0.01) end
caller:cancel()
go = true
]], ("--store %s --log-level off"):format(db))
    -- (before: "task N (...) failed and was never joined: (error object is a table value)")
    assert.matches("never joined: resil%.once: cannot store the results: they must be JSON values", r.stderr)
  end)
end)

describe("an uncaught error that is a plain table (error{code = 1})", function()
  it("prints its fields as JSON, bounded, credentials redacted, at the line it was raised at", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("charge", function()
  error({ code = 402, why = "quota", detail = { plan = "free" }, usage = { max_tokens = 50 },
    request = { headers = { Authorization = "Bearer sk-live-123" } } })
end)
]], ("--store %s --run charge --log-level off"):format(db))
    assert.are.equal(1, r.code)
    -- (before: "resil-lua: (error object is a table value)", nothing of what it held nor where)
    local first = r.stderr:match("^[^\n]+")
    -- the line of its raise in the step's fn (helper R: it said the step's line, 2, the raise's gone)
    assert.matches("^resil%-lua: /%S+%.lua:3: {", first)
    assert.matches('"code":402', first, 1, true)
    assert.matches('"why":"quota"', first, 1, true)
    assert.matches('"detail":{"plan":"free"}', first, 1, true)
    -- a field named for a credential is not written out, here nor in what runs show lists
    assert.matches('"Authorization":"[REDACTED]"', first, 1, true)
    assert.matches('"usage":{"max_tokens":50}', first, 1, true) -- (a count, not a token)
    assert.is_nil(r.stderr:find("sk-live-123", 1, true), r.stderr)
    local show = helpers.run(("%s runs show charge --store %s"):format(helpers.resil, db)).stdout
    assert.matches('"Authorization":"[REDACTED]"', show, 1, true)
    assert.is_nil(show:find("sk-live-123", 1, true), show)
    -- a large or cyclic one is cut, and a task's, never joined, says its own line
    r = helpers.run_script([[
local resil = require "resil"
local big = { name = string.rep("x", 5000) }
for i = 1, 1000 do big[i] = i end
big.self = big
resil.spawn(function()
  error(big)
end)
]], "--log-level off")
    first = r.stderr:match("^[^\n]+")
    assert.matches("never joined: /%S+%.lua:6: {", first)
    assert.is_true(#first < 1400, #first)
    assert.matches("...", first, 1, true)
  end)
end)

-- (found in review, helper R: a service account's private_key, a client's auth = "user:pass", a
-- credentials field and a key's passphrase went out whole, to the terminal and the store)
describe("an uncaught error table holding a private key, an auth pair, credentials or a passphrase", function()
  it("writes none of them, here nor in what runs show lists; an author or a passage is not one", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
resil.step("sign", function()
  error({ private_key = "-----BEGIN PRIVATE KEY-----MIIEvQ", auth = "alice:hunter2", credentials = "c2VjcmV0Zm9v",
    passphrase = "open-sesame", author = "bob", passage = "ch. 2" })
end)
]], ("--store %s --run sign --log-level off"):format(db))
    assert.are.equal(1, r.code)
    local show = helpers.run(("%s runs show sign --store %s"):format(helpers.resil, db)).stdout
    for _, out in ipairs({ r.stderr:match("^[^\n]+"), show }) do
      for _, secret in ipairs({ "MIIEvQ", "hunter2", "c2VjcmV0Zm9v", "open-sesame" }) do
        assert.is_nil(out:find(secret, 1, true), out)
      end
      assert.matches('"private_key":"[REDACTED]"', out, 1, true)
      assert.matches('"auth":"[REDACTED]"', out, 1, true)
      assert.matches('"author":"bob"', out, 1, true)
      assert.matches('"passage":"ch. 2"', out, 1, true)
    end
  end)
end)

describe("resil.step and resil.once called inside the script's own coroutine.wrap", function()
  it("raise at the caller's line naming themselves, as resil.sleep does; the run goes on after", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
print(pcall(coroutine.wrap(function() return resil.step("inside", function() return 1 end) end)))
print(pcall(coroutine.wrap(function() return resil.once("k", function() return 1 end) end)))
print(resil.step("after", function() return 2 end))
]], ("--store %s --run wrapped --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    -- (before: "[resil runs]:195: task:join must be called from a task ...", a call the script never
    -- made at a line of the host's; resil.once's named "store operations" at one of store_sqlite's)
    assert.matches("^false\t/%S+%.lua:2: resil%.step must be called from a task %(resil%.spawn%), not from a plain "
      .. "coroutine", lines[1])
    assert.matches("^false\t/%S+%.lua:3: resil%.once must be called from a task %(resil%.spawn%), not from a plain "
      .. "coroutine", lines[2])
    assert.are.equal("2", lines[3])
  end)
end)

describe("a step whose fn raises an error object whose __tostring itself raises", function()
  it("raises that object to its caller, and runs show lists the step failed, not its process killed", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local ok, err = pcall(resil.step, "s", function()
  error(setmetatable({ code = 7 }, { __tostring = function(e) return e.detail.text end }))
end)
print(ok, type(err) == "table" and err.code or err)
print(resil.step("next", function() return "went on" end))
]], ("--store %s --run shown --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "false  p.lua:3: attempt to index a nil value (field 'detail')", the __tostring's own error, and
    -- the step left "running": interrupted, "its process ended (killed, crashed)")
    assert.are.equal("false\t7\nwent on\n", r.stdout)
    local show = helpers.run(("%s runs show shown --store %s"):format(helpers.resil, db)).stdout
    assert.matches("\n%-%s+1%s+s%s+failed%s", show)
    assert.matches("1 items: 0 done, 1 failed", show, 1, true)
  end)
end)

describe("a step whose task is canceled mid-fn (a resil.timeout around it, t:cancel) while the script goes on", function()
  local backends = helpers.store_backends()
  teardown(function() for _, b in ipairs(backends) do if b.stop then b.stop() end end end)

  for _, backend in ipairs(backends) do
    it(("on %s: the run ends done_with_failures, the step failed saying so; resumed, it runs again"):format(backend.name),
      function()
        local store = backend.url()
        local script = [[
local resil = require "resil"
local slow = arg[1] == "slow"
resil.step("prepare", function() return true end) -- (the run taken: the deadline below is fn's alone)
local v, err = resil.timeout(1, resil.step, "render", function()
  print("render ran"); resil.sleep(slow and 30 or 0); return "video"
end)
print(v, err and err.kind)
local began = false
local t = resil.spawn(resil.step, "upload", function()
  print("upload ran"); began = true; resil.sleep(slow and 30 or 0); return "url"
end)
while not began do resil.sleep(0.01) end
if slow then t:cancel() end
print(t:join())
print(resil.step("notify", function() return "sent" end))
if arg[2] == "exit" then os.exit(0) end
]]
        local run = "cut-" .. backend.name:lower() .. "-" .. tostring(math.random(1e9))
        for _, exit in ipairs({ "", "exit" }) do
          local id = run .. exit
          local r = helpers.run_script(script, ("--store '%s' --run %s --log-level off"):format(store, id), "slow " .. exit)
          assert.are.equal(0, r.code, r.stderr)
          assert.matches("^render ran\nnil\ttimeout\nupload ran\nfalse\tcanceled: [^\n]*\nsent\n$", r.stdout)
          -- (before: "done", the steps "pending", and no resume line: nothing said the video was never made)
          local show = helpers.run(("%s runs show %s --store '%s'"):format(helpers.resil, id, store)).stdout
          assert.matches("^run " .. id:gsub("%-", "%%-") .. ": done_with_failures", show)
          assert.matches("\n%-%s+2%s+render%s+failed%s[^\n]+canceled: the step's task was canceled", show)
          assert.matches("\n%-%s+3%s+upload%s+failed%s[^\n]+canceled: the step's task was canceled", show)
          assert.matches("\n%-%s+4%s+notify%s+done%s", show)
          assert.matches("\nresume: ", show)
          r = helpers.run_script(script, ("--store '%s' --run %s --log-level off"):format(store, id), "fast " .. exit)
          assert.are.equal(0, r.code, r.stderr)
          assert.are.equal("render ran\nvideo\tnil\nupload ran\ntrue\turl\nsent\n", r.stdout)
          assert.matches(id:gsub("%-", "%%-") .. "%s+done%s",
            helpers.run(("%s runs --store '%s'"):format(helpers.resil, store)).stdout)
        end
      end)
  end
end)

describe("a step whose results reach the process's memory cap as they are encoded (--max-memory)", function()
  it("says so, not that they are no JSON values; the run goes on", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
print(pcall(resil.step, "big", function() return ("x"):rep(25 * 1024 * 1024) end))
print(resil.step("after", function() return "went on" end))
]], ("--store %s --run capped --max-memory 64M --log-level off"):format(db))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "cannot checkpoint the results: they must be JSON values: not enough memory", of a string)
    assert.matches("^false\t%S+%.lua:2: resil%.step: cannot checkpoint the results: the process's memory cap " ..
      "%(%-%-max%-memory%) was reached as they were encoded\nwent on\n$", r.stdout)
  end)
end)
