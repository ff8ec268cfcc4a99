local resil = require "resil"
local helpers = require "spec.helpers"
local log = resil.log

local function capture(fn)
  local path = helpers.tmpname(".log")
  log.output(path)
  local ok, err = pcall(fn)
  log.output("stderr")
  local lines = {}
  for line in helpers.slurp(path):gmatch("[^\n]+") do lines[#lines + 1] = assert(resil.json.decode(line)) end
  os.remove(path)
  assert(ok, err)
  return lines
end

describe("resil.log", function()
  it("writes one JSON object per line with ts, level, msg and fields", function()
    local lines = capture(function() log.info("request done", { status = 200, provider = "openai" }) end)
    assert.are.equal(1, #lines)
    assert.are.equal("info", lines[1].level)
    assert.are.equal("request done", lines[1].msg)
    assert.are.equal(200, lines[1].status)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", lines[1].ts)
  end)

  -- (before: Lua caught a finalizer's error to go on collecting, and with no warn function set
  -- dropped it: a __gc that was to release a hold or write a row failed without a word)
  it("says a __gc finalizer's error, with its message, and what a script warn()s", function()
    local lines = capture(function()
      setmetatable({}, { __gc = function() error("the hold was not released") end })
      collectgarbage()
      collectgarbage()
      warn("disk ", "almost full")
    end)
    local gc, warned
    for _, l in ipairs(lines) do
      if l.msg:find("__gc finalizer", 1, true) then gc = l end
      if l.msg == "disk almost full" then warned = l end
    end
    assert.is_table(gc, "no line for the finalizer")
    assert.are.equal("error", gc.level)
    assert.matches("log_spec.lua:%d+: the hold was not released$", gc.error)
    assert.is_table(warned, "no line for warn()")
    assert.are.equal("warn", warned.level)
  end)

  -- (before: "@off" was swallowed and the warnings after it logged all the same)
  it("keeps a script's warnings out of the log from warn('@off') to warn('@on'), a finalizer's error not", function()
    local lines = capture(function()
      warn("@off")
      warn("not said")
      setmetatable({}, { __gc = function() error("said still") end })
      collectgarbage()
      collectgarbage()
      warn("@on")
      warn("said again")
    end)
    local msgs = {}
    for _, l in ipairs(lines) do msgs[#msgs + 1] = l.error or l.msg end
    assert.is_nil(table.concat(msgs, "\n"):find("not said", 1, true), table.concat(msgs, "\n"))
    assert.matches("said still", table.concat(msgs, "\n"), 1, true)
    assert.are.equal("said again", msgs[#msgs])
  end)

  -- (names and short values are remembered as written, for speed: a secret registered after one
  -- was first written must still be redacted from it)
  it("redacts a secret registered after a field's name or value was first written", function()
    local name = "tenant-" .. os.time() .. "-zq9x7w"
    local before = capture(function() log.info("first", { [name] = 1, owner = name }) end)
    assert.are.equal(1, before[1][name])
    assert.are.equal(name, before[1].owner)
    log.redact(name:sub(8))
    local after = capture(function() log.info("again", { [name] = 1, owner = name }) end)
    assert.is_nil(after[1][name])
    for k in pairs(after[1]) do assert.is_nil(k:find(name:sub(8), 1, true), k) end
    assert.are.equal("tenant-[REDACTED]", after[1].owner)
  end)

  it("writes URLs as they are (no \\/ escapes) and round-trips backslashes", function()
    local tricky = "a\\/b\\\\c\"d"
    local path = helpers.tmpname(".log")
    log.output(path)
    log.info("GET https://api.example.com/v1", { url = "http://a/b", tricky = tricky })
    log.output("stderr")
    local raw = helpers.slurp(path)
    os.remove(path)
    assert.matches('"msg":"GET https://api.example.com/v1"', raw, 1, true)
    assert.matches('"url":"http://a/b"', raw, 1, true)
    local entry = resil.json.decode(raw)
    assert.are.equal(tricky, entry.tricky)
  end)

  it("filters by level", function()
    local lines = capture(function()
      log.level("warn")
      log.debug("d"); log.info("i"); log.warn("w"); log.error("e")
      log.level("info")
    end)
    assert.are.same({ "w", "e" }, { lines[1].msg, lines[2].msg })
  end)

  it("rejects an unknown level", function()
    assert.has_error(function() log.level("loud") end)
  end)

  it("adds the task id and the task's context, inherited by spawned tasks", function()
    local lines = capture(function()
      resil.context({ run = "run-1" })
      resil.spawn(function()
        resil.context({ step = "captions" })
        log.info("inside")
      end):join()
    end)
    assert.are.equal("run-1", lines[1].run)
    assert.are.equal("captions", lines[1].step)
    assert.is_number(lines[1].task)
  end)

  -- (before: every line inside a step carried step_seq, step_nth, step_scope and "step_places":{})
  it("writes a step's name and item, not the host's bookkeeping of its place (context fields named _*)", function()
    local lines = capture(function()
      resil.context({ _mine = "kept", shown = "yes" })
      resil.spawn(function()
        assert.are.equal("kept", resil.context()._mine)
        log.info("child")
      end):join()
    end)
    assert.are.equal("yes", lines[1].shown)
    assert.is_nil(lines[1]._mine)
    local out = helpers.run_script([[
      local resil = require "resil"
      resil.map({ "a" }, function(x)
        return resil.step("fetch", function() resil.log.info("in step") return x end)
      end)
    ]], ("--store %s"):format(helpers.tmpname(".db")))
    local line = assert(out.stderr:match('[^\n]*"msg":"in step"[^\n]*'), out.stderr)
    local l = resil.json.decode(line)
    assert.are.equal("fetch", l.step)
    assert.are.equal(1, l.item)
    for k in pairs(l) do assert.is_nil(k:find("^_?step_"), "written: " .. k) end
  end)

  it("redacts sensitive headers and registered secrets, without touching the caller's table", function()
    local headers = { Authorization = "Bearer sk-live-123456", ["x-api-key"] = "k-abcdef", accept = "json",
      ["xi-api-key"] = "el-abcdef" } -- (ElevenLabs's)
    local lines = capture(function()
      log.redact("sk-live-123456")
      log.info("calling with sk-live-123456", { headers = headers, note = "key=sk-live-123456" })
    end)
    local l = lines[1]
    assert.are.equal("[REDACTED]", l.headers.Authorization)
    assert.are.equal("[REDACTED]", l.headers["x-api-key"])
    assert.are.equal("[REDACTED]", l.headers["xi-api-key"])
    assert.are.equal("json", l.headers.accept)
    assert.are.equal("key=[REDACTED]", l.note)
    assert.are.equal("calling with [REDACTED]", l.msg)
    assert.are.equal("Bearer sk-live-123456", headers.Authorization)
  end)

  it("redacts what an error report redacts: a private key, a client secret, a vault token", function()
    -- (the log's own list was shorter: a table an uncaught error reported redacted was printed
    -- whole by a log line of it)
    local conf = { client_secret = "cs-9f8e7d", private_key = "-----BEGIN PRIVATE KEY-----",
      passphrase = "correct horse", db_password = "pw-123456", auth = "user:pass",
      headers = { ["X-Vault-Token"] = "hvs.abcdef", ["Private-Token"] = "glpat-abc", accept = "json" },
      key = "team-a", max_tokens = 100, author = "me", tokens = 5, usd_per_token = 0.5, use_token = true }
    local lines = capture(function()
      log.info("config", conf)
      log.info("again", conf) -- (a name's verdict is remembered: the same the second time)
    end)
    for _, l in ipairs(lines) do
      for _, k in ipairs({ "client_secret", "private_key", "passphrase", "db_password", "auth" }) do
        assert.are.equal("[REDACTED]", l[k], k)
      end
      assert.are.equal("[REDACTED]", l.headers["X-Vault-Token"])
      assert.are.equal("[REDACTED]", l.headers["Private-Token"])
      assert.are.equal("json", l.headers.accept)
      assert.are.equal("team-a", l.key)
      assert.are.equal(100, l.max_tokens)
      assert.are.equal("me", l.author)
      assert.are.equal(5, l.tokens)
      assert.are.equal(0.5, l.usd_per_token) -- (a number or a boolean is no credential)
      assert.are.equal(true, l.use_token)
    end
  end)

  it("registers environment secrets through resil.secret", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      local key = assert(resil.secret("RESIL_TEST_KEY"))
      resil.log.info("using " .. key)
      print(resil.secret("RESIL_MISSING_KEY_XYZ"))
    ]])
    local r = helpers.run("RESIL_TEST_KEY=sk-test-abcdef " .. helpers.resil .. " " .. script)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('"msg":"using %[REDACTED%]"', r.stderr)
    assert.not_matches("sk%-test%-abcdef", r.stderr)
    assert.matches("missing_secret: RESIL_MISSING_KEY_XYZ is not set", r.stdout)
  end)

  it("renames fields that would repeat a key the logger writes (ts, level, msg, task, context)", function()
    local path = helpers.tmpname(".log")
    log.output(path)
    local ok, err = pcall(function()
      resil.spawn(function()
        resil.context({ run = "nightly", level = "ctx" })
        log.error("failed", { level = "debug", msg = "ok", ts = 1, task = "mine", run = "other", status = 500 })
      end):join()
      log.info("outside a task", { "first", "second" })
    end)
    log.output("stderr")
    assert(ok, err)
    local raw = helpers.slurp(path)
    os.remove(path)
    local lines = {}
    for line in raw:gmatch("[^\n]+") do
      local seen = {}
      for key in line:gmatch('[{,]"([%w_]+)":') do
        assert.is_nil(seen[key], "key " .. key .. " repeated in " .. line)
        seen[key] = true
      end
      lines[#lines + 1] = assert(resil.json.decode(line))
    end
    local l = lines[1]
    assert.are.equal("error", l.level)
    assert.are.equal("failed", l.msg)
    assert.is_string(l.ts)
    assert.is_number(l.task)
    assert.are.equal("nightly", l.run)
    assert.are.same({ "debug", "ok", 1, "mine", "other", 500 },
      { l.field_level, l.field_msg, l.field_ts, l.field_task, l.field_run, l.status })
    assert.are.same({ "info", "outside a task", "first", "second" }, { lines[2].level, lines[2].msg, lines[2]["1"],
      lines[2]["2"] })
  end)

  it("logs error values and nested tables readably", function()
    local lines = capture(function()
      log.error("failed", { err = resil.error("timeout", "too slow"), deep = { a = { b = { c = 1 } } } })
    end)
    assert.are.equal("timeout", lines[1].err.kind)
    assert.are.equal(1, lines[1].deep.a.b.c)
  end)

  it("writes values JSON cannot hold as text instead of raising in the caller", function()
    -- a rate over zero calls, a table keyed by booleans: the log call must
    -- not fail the task that makes it
    local lines = capture(function()
      log.warn("stats", { rate = 0 / 0, over = 1 / 0, under = -1 / 0, ok = 0.25, n = 3,
        seen = { [true] = 1, [1 / 0] = 2, [7] = 3 } })
    end)
    assert.are.equal(1, #lines)
    local l = lines[1]
    assert.are.same({ "NaN", "Infinity", "-Infinity", 0.25, 3 }, { l.rate, l.over, l.under, l.ok, l.n })
    assert.are.same({ ["true"] = 1, inf = 2, ["7"] = 3 }, l.seen)
  end)

  it("writes every number exactly, as resil.json does: an id or a count past 14 digits is not changed", function()
    -- cjson writes %.14g: an order id 1234567890123456789 was logged as 1.2345678901235e+18, a
    -- byte count 123456789012345 as 1.2345678901234e+14 (another number), math.mininteger as a float
    local lines = capture(function()
      log.info("ids", { id = 1234567890123456789, bytes = 123456789012345, low = math.mininteger,
        ratio = 0.1 + 0.2, nested = { ns = 1765100000123456789 } })
    end)
    local l = lines[1]
    assert.are.same({ 1234567890123456789, 123456789012345, math.mininteger, 0.1 + 0.2, 1765100000123456789 },
      { l.id, l.bytes, l.low, l.ratio, l.nested.ns })
    assert.are.equal(math.type(l.id), "integer")
  end)

  -- (a line of flat fields is written by the logger itself, one past 16 KB or with a table in it by
  -- json.encode: both the same text)
  it("writes a short line of flat fields as json.encode writes a long one: numbers exact, text escaped", function()
    local fields = { id = 1234567890123456789, low = math.mininteger, ratio = 0.1 + 0.2, whole = 3.0, zero = -0.0,
      big = 2 ^ 53, tiny = 1e-7, huge = 1e300, text = "a/b \"q\" \\ \127\1\n\t", yes = true, no = false }
    local lines = capture(function()
      log.info("short \"/\"", fields)
      local long = {}
      for k, v in pairs(fields) do long[k] = v end
      long.padding = ("p"):rep(20000)
      log.info("short \"/\"", long)
    end)
    for _, l in ipairs(lines) do
      assert.are.same({ "short \"/\"", 1234567890123456789, math.mininteger, 0.1 + 0.2, 3, -0.0, 2 ^ 53, 1e-7, 1e300,
        "a/b \"q\" \\ \127\1\n\t", true, false }, { l.msg, l.id, l.low, l.ratio, l.whole, l.zero, l.big, l.tiny,
        l.huge, l.text, l.yes, l.no })
      assert.are.equal("integer", math.type(l.id))
    end
    assert.are.equal(1 / -0.0, 1 / lines[1].zero) -- (-0 kept as -0)
    -- and the text itself, as json.encode writes it (the order of the fields aside)
    local path = helpers.tmpname(".log")
    log.output(path)
    log.info("short", fields)
    log.output("stderr")
    local raw = helpers.slurp(path)
    for _, member in ipairs({ '"id":1234567890123456789', '"low":-9223372036854775808', '"ratio":0.30000000000000004',
      '"whole":3', '"zero":-0', '"big":9007199254740992', '"tiny":1e-07', '"huge":1e+300', '"yes":true', '"no":false',
      '"text":"a/b \\"q\\" \\\\ \\u007f\\u0001\\n\\t"' }) do
      local at = raw:find(member, 1, true)
      assert.is_truthy(at and raw:sub(at + #member, at + #member):match("[,}]"), member .. " in " .. raw)
    end
  end)

  it("keeps each line valid UTF-8 JSON whatever bytes it is given, and a message whole past a NUL", function()
    -- a provider's body cut mid-character, a latin-1 file name, a binary
    -- answer: each bad byte is written as U+FFFD, the rest as it is
    local path = helpers.tmpname(".log")
    log.output(path)
    log.warn("HTTP 500: caf\xe9\0 then \27[31mred\n", { body = "ab\xe2\x82", ["name\xff"] = "\xed\xa0\x80",
      ok = "\xe2\x80\xa8 ol\xc3\xa9" })
    log.output("stderr")
    local raw = helpers.slurp(path)
    os.remove(path)
    local line = raw:match("^([^\n]*)\n$")
    assert.is_truthy(line, raw)
    assert.is_truthy(utf8.len(line), "the line is not UTF-8: " .. line)
    local entry = assert(resil.json.decode(line))
    assert.are.equal("HTTP 500: caf\u{FFFD}\0 then \27[31mred\n", entry.msg)
    assert.are.equal("ab\u{FFFD}\u{FFFD}", entry.body)
    assert.are.equal(("\u{FFFD}"):rep(3), entry["name\u{FFFD}"])
    assert.are.equal("\xe2\x80\xa8 ol\xc3\xa9", entry.ok) -- valid UTF-8 is kept as it is
  end)
end)

describe("resil.json", function()
  it("utf8 makes text UTF-8: each byte not part of a character U+FFFD, valid text as it is", function()
    local json = resil.json
    assert.are.equal("ok h\u{e9} \u{1F600}", json.utf8("ok h\u{e9} \u{1F600}"))
    assert.are.equal("ok \u{FFFD}\u{FFFD}", json.utf8("ok \255\254"))
    -- a cut sequence, an overlong form, a surrogate, past U+10FFFF: each byte its own U+FFFD
    assert.are.equal("a\u{FFFD}\u{FFFD}b", json.utf8("a\xE2\x82b"))
    assert.are.equal("\u{FFFD}\u{FFFD}", json.utf8("\xC0\xAF"))
    assert.are.equal("\u{FFFD}\u{FFFD}\u{FFFD}", json.utf8("\xED\xA0\x80"))
    assert.are.equal("\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}", json.utf8("\xF4\x90\x80\x80"))
    assert.are.equal("a\0b", json.utf8("a\0b"))
    local long = ("x"):rep(100000) .. "\255"
    assert.are.equal(("x"):rep(100000) .. "\u{FFFD}", json.utf8(long))
    assert.has_error(function() json.utf8({}) end)
  end)

  it("round-trips tables", function()
    local t = resil.json.decode(resil.json.encode({ a = { 1, 2, 3 }, b = "x", c = true }))
    assert.are.same({ a = { 1, 2, 3 }, b = "x", c = true }, t)
  end)

  it("returns nil, err on bad input instead of raising", function()
    local v, err = resil.json.decode("{not json")
    assert.is_nil(v)
    assert.are.equal("invalid_json", err.kind)
    assert.is_string(err.message)
  end)

  -- (cjson reads a NUL as the text's end: '{"a":1}' and anything after a NUL decoded as that
  -- object, what followed dropped unread; one inside a string was "unexpected end of string")
  it("refuses a NUL byte anywhere in the text, saying where", function()
    for _, text in ipairs({ '{"a":1}\0{"b":2}', '[1,2]\0', '"a\0b"' }) do
      local v, err = resil.json.decode(text)
      assert.is_nil(v, text)
      assert.are.equal("invalid_json", err.kind)
      assert.matches("a NUL byte at character " .. text:find("\0", 1, true), err.message, 1, true)
    end
    assert.are.equal("a\0b", resil.json.decode('"a\\u0000b"')) -- (written as JSON writes it: read)
  end)

  it("has a null sentinel", function()
    local t = resil.json.decode('{"a":null}')
    assert.are.equal(resil.json.null, t.a)
    assert.are.equal('{"a":null}', resil.json.encode({ a = resil.json.null }))
  end)

  it("raises when asked to encode what JSON cannot hold", function()
    assert.has_error(function() resil.json.encode({ f = print }) end)
    -- a table that holds itself, twice over: cjson's nesting error, at once (not 2^1000 visits)
    local t = {}
    t.a, t.b = t, t
    assert.has_error(function() resil.json.encode(t) end)
    t.c = setmetatable({}, resil.json.array_mt) -- (one that needs the exact layer's copy too)
    assert.has_error(function() resil.json.encode(t) end)
  end)

  -- (it said "Cannot serialise number: must not be NaN or Inf" and no more: cjson raises from
  -- under the host's C function, which named no line)
  it("names the caller's line when it cannot encode, whichever way the value is written", function()
    local json = resil.json
    local cases = {
      function() json.encode({ score = 0 / 0 }) end,
      function() json.encode({ f = print }) end,
      function() json.encode({ 0.1 + 0.2, 1 / 0 }) end, -- (written exactly: the swap's path)
      function() json.encode({ tags = setmetatable({}, json.array_mt), f = print }) end,
    }
    for i, f in ipairs(cases) do
      local ok, err = pcall(f)
      assert.is_false(ok, i)
      assert.matches("log_spec%.lua:" .. debug.getinfo(f, "S").linedefined .. ": Cannot serialise", err)
    end
  end)

  -- (before: a long run of number characters that is no number was taken in, and its
  -- marker, with the host's tag, came back as a string)
  it("refuses a long number that is not one, as cjson does", function()
    for _, text in ipairs({ "[1234567890123456-]", "[1.2.3.4.5.6.7.8.9.0.1.2.3.4.5]", '{"a":123456789012345e}' }) do
      local v, err = resil.json.decode(text)
      assert.is_nil(v, text)
      assert.are.equal("invalid_json", err.kind)
    end
  end)

  -- (Debian's cjson wrote every empty array as {} and every number with 14 digits)
  it("gives back an empty array as [] and every number exactly, through decode and encode", function()
    local json = resil.json
    local function again(text) return json.encode(json.decode(text)) end
    assert.are.equal('{"required":[]}', again('{"required":[]}'))
    assert.are.equal('[[],[[]],{}]', again('[ [ ], [[\n]], {} ]'))
    assert.are.equal("[]", again("[]"))
    assert.are.equal('{"seed":1234567890123456789}', again('{"seed":1234567890123456789}'))
    assert.are.equal(1234567890123456789, json.decode('{"seed":1234567890123456789}').seed)
    assert.are.equal("12345678901234567", again("12345678901234567"))
    assert.are.equal("[0.30000000000000004,3.141592653589793,-0.000123456789012345]",
      again("[0.30000000000000004,3.141592653589793,-0.000123456789012345]"))
    assert.are.equal("100000000000000000", again("100000000000000000"))
    -- what cjson wrote exactly before is written as before
    assert.are.equal('[1,0.5,12345678901234,"[]","a]b[c","q\\"[]"]', again('[1,0.5,12345678901234,"[]","a]b[c","q\\"[]"]'))
    assert.are.equal('["a\\\\",[]]', again('["a\\\\",[]]')) -- (the string ends in a backslash)
    -- values made in Lua: a list marked as one, integers and floats
    assert.are.equal("{}", json.encode({}))
    assert.are.equal('{"tags":[]}', json.encode({ tags = setmetatable({}, json.array_mt) }))
    assert.are.equal("[9223372036854775807,100000000000000,0.1,0.3333333333333333]",
      json.encode({ math.maxinteger, 100000000000000, 0.1, 1 / 3 }))
    -- a string that looks like the host's markers is only a string
    assert.are.equal('"\\u0000rj0123abcd["', again('"\\u0000rj0123abcd["'))
    assert.are.equal('["\\u0000rj"]', again('["\\u0000rj"]'))
  end)

  -- (floats with a fraction or an exponent are read by cjson's strtod, not marked and read by
  -- Lua one by one: an embeddings answer of 3 million of them took 4 s on the loop)
  it("reads every float to the nearest double, as Lua does, and integers past 14 digits as integers", function()
    local json = resil.json
    math.randomseed(11)
    local texts = {}
    for i = 1, 3000 do
      local x = (math.random() - 0.5) * 10 ^ math.random(-30, 30)
      texts[i] = i % 3 == 0 and ("%.17e"):format(x) or ("%.17g"):format(x)
    end
    texts[#texts + 1] = "123456789012345.5"
    texts[#texts + 1] = "1234567890123456e2"
    texts[#texts + 1] = "-12345678901234567"
    texts[#texts + 1] = "1e400"
    local got = json.decode("[" .. table.concat(texts, ",") .. "]")
    for i, t in ipairs(texts) do
      local want = tonumber(t)
      assert.are.equal(want, got[i], t)
      assert.are.equal(math.type(want), math.type(got[i]), t)
    end
    assert.are.equal(-12345678901234567, got[#texts - 1])
  end)

  -- (whole numbers are written by the layer, swapped in the caller's tables for markers while
  -- cjson writes: the text is cjson's own, and the tables are given back as they were, also
  -- when cjson raises)
  it("writes whole numbers as cjson does and leaves the value as it was", function()
    local json = resil.json
    local row = { 0, -0.0, 3, 4.0, -17, 99999999999999, -99999999999999.0, 1e14, 0.5, 0.25, 1e15,
      { n = 16 }, { 1733380000, { 7 } }, "x" }
    assert.are.equal("[0,-0,3,4,-17,99999999999999,-99999999999999,1e+14,0.5,0.25,1e+15,"
      .. '{"n":16},[1733380000,[7]],"x"]', json.encode(row))
    assert.are.equal("integer", math.type(row[1]))
    assert.are.equal("float", math.type(row[2]))
    assert.are.equal(-math.huge, 1 / row[2])
    assert.are.equal("float", math.type(row[4]))
    assert.are.equal(16, row[12].n)
    assert.are.equal(7, row[13][2][1])
    local shared = { 1, 2 }
    assert.are.equal('[[1,2],[1,2],{"a":[1,2]}]', json.encode({ shared, shared, { a = shared } }))
    assert.are.same({ 1, 2 }, shared)
    for _, bad in ipairs({ { 1, 2, 0 / 0 }, { 1, 2, { f = print } } }) do
      local ok, err = pcall(json.encode, bad)
      assert.is_false(ok)
      assert.matches("Cannot serialise", err)
      assert.are.equal(1, bad[1])
      assert.are.equal(2, bad[2])
      assert.are.equal("integer", math.type(bad[2]))
    end
    -- what cjson would change (a float %.14g cuts, an integer from 1e14, an empty array) is
    -- swapped the same way, even alone: written exactly, the tables given back as they were
    local tags = setmetatable({}, json.array_mt)
    local entry = { at = 1733380000.1234567, v = { tags = tags, id = 123456789012345678, n = 7 } }
    assert.are.equal('{"at":1733380000.1234567}', json.encode({ at = entry.at }))
    assert.are.equal('[[],{"id":123456789012345678}]', json.encode({ tags, { id = entry.v.id } }))
    local text = json.encode(entry)
    assert.are.same({ at = 1733380000.1234567, v = { tags = {}, id = 123456789012345678, n = 7 } },
      json.decode(text))
    assert.matches('"tags":%[%]', text)
    assert.are.equal(tags, entry.v.tags)
    assert.are.equal(json.array_mt, getmetatable(entry.v.tags))
    assert.are.equal("integer", math.type(entry.v.id))
    local bad = { 1 / 3, tags, { f = print } }
    assert.is_false(pcall(json.encode, bad))
    assert.are.equal(1 / 3, bad[1])
    assert.are.equal(tags, bad[2])
  end)

  -- (a collection step inside cjson's encode, at its text's allocation, ran finalizers while the
  -- caller's tables held the layer's markers: one read a marker string for a number or an empty
  -- array, its own encode wrote the host's tag, and what it wrote there was undone by the swap back)
  it("a finalizer that runs during an encode sees the caller's values, and what it writes stays", function()
    local r = helpers.run_script([==[
local json = require("resil").json
local t = { at = 1733380000.1234567, tags = setmetatable({}, json.array_mt), n = 1, m = 2 }
local ran, odd, kept, lost, wrote = 0, 0, 0, 0, nil
for i = 1, 300 do
  t.at = 1733380000.1234567
  setmetatable({}, { __gc = function()
    ran = ran + 1
    local at = t.at
    if math.type(at) ~= "float" or getmetatable(t.tags) ~= json.array_mt or math.type(t.n) ~= "integer"
      or json.encode({ at, t.tags }) ~= json.encode({ at }):sub(1, -2) .. ",[]]" then odd = odd + 1 end
    wrote = i + 0.5
    t.at = wrote -- (a finalizer's write)
  end })
  local before = ran
  json.encode({ t, string.rep("x", 20000) }) -- (its text's allocation is a collection's step)
  if ran > before then
    if t.at == wrote then kept = kept + 1 else lost = lost + 1 end
  end
end
print(ran > 0 and "ran" or "never ran", "odd " .. odd, "lost " .. lost)
]==])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("ran\todd 0\tlost 0", r.stdout:match("[^\n]*"))
  end)

  it("sends a json = body to a server exactly (the HTTP client's encode)", function()
    local got
    local s <close> = assert(resil.server.listen({ port = 0, handler = function(req)
      got = req.body
      return { status = 200, body = "ok" }
    end }))
    local body = resil.json.decode('{"tools":[{"parameters":{"required":[]}}],"seed":1234567890123456789}')
    assert(resil.http.request({ url = ("http://127.0.0.1:%d/"):format(s:port()), json = body, timeout = 5 }))
    assert.matches('"required":[]', got, 1, true)
    assert.matches('"seed":1234567890123456789', got, 1, true)
  end)
end)

-- stderr is a pipe whose reader stalls (journald, a container runtime, `| tee` stopped): a blocking
-- write stopped the whole process (a gateway's /health included) once 64 KB were unread
describe("resil.log to a stderr pipe whose reader stalls", function()
  local driver = [[
import os, sys, subprocess, time
resil, script, d, n, how = sys.argv[1:6]
fifo = d + "/f"
os.mkfifo(fifo)
r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
if how == "stderr":
    w = os.open(fifo, os.O_WRONLY)
    p = subprocess.Popen([resil, script, d, n], stderr=w, stdout=subprocess.PIPE)
    os.close(w)
else: # --log-file naming the FIFO
    p = subprocess.Popen([resil, "--log-file", fifo, script, d, n], stdout=subprocess.PIPE)
t0 = time.time()
while not os.path.exists(d + "/logged"):
    if time.time() - t0 > 30:
        print("blocked in a log write")
        p.kill()
        sys.exit(0)
    time.sleep(0.01)
open(d + "/reading", "w").close()
os.set_blocking(r, True)
data = b""
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(p.communicate()[0].decode())
sys.stdout.write(data.decode())
]]
  local script = [[
local resil = require "resil"
local dir, n = arg[1], tonumber(arg[2])
local pad = ("x"):rep(100)
for i = 1, n do resil.log.warn("line", { i = i, pad = pad }) end
io.open(dir .. "/logged", "w"):close()
while not io.open(dir .. "/reading") do resil.sleep(0.01) end -- (the loop runs: the pipe drains meanwhile)
print("alive")
]]
  -- -> the script's stdout, and the log lines the reader got (decoded)
  local function stalled(n, how)
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local py = helpers.write(dir .. "/driver.py", driver)
    local lua = helpers.write(dir .. "/script.lua", script)
    local r = helpers.run(("timeout 120 python3 %s %s %s %s %d %s"):format(py, helpers.resil, lua, dir, n,
      how or "stderr"))
    local out, lines = {}, {}
    for line in r.stdout:gmatch("[^\n]+") do
      if line:sub(1, 1) == "{" then lines[#lines + 1] = assert(resil.json.decode(line), line)
      else out[#out + 1] = line end
    end
    return table.concat(out, "\n"), lines, r
  end

  it("does not block the process; every line reaches the reader, in order, once it reads", function()
    local out, lines, r = stalled(3000) -- ~500 KB: eight times the pipe
    assert.are.equal("alive", out, r.stderr)
    assert.are.equal(3000, #lines)
    for i, l in ipairs(lines) do assert.are.equal(i, l.i) end
  end)

  -- (before: --log-file opened a FIFO as a file, and each line waited for its reader)
  it("the same for a FIFO named by --log-file", function()
    local out, lines, r = stalled(3000, "file")
    assert.are.equal("alive", out, r.stderr)
    assert.are.equal(3000, #lines)
    for i, l in ipairs(lines) do assert.are.equal(i, l.i) end
  end)

  -- (before: the start waited for a reader, for good)
  it("--log-file naming a FIFO that nothing reads is refused at once, saying so", function()
    local fifo = helpers.tmpname(".fifo")
    assert(os.execute("mkfifo " .. fifo))
    local r = helpers.run(("timeout 20 %s --log-file %s -e 'print(1)'"):format(helpers.resil, fifo))
    os.remove(fifo)
    assert.are.equal(1, r.code, r.stderr)
    assert.matches("%-%-log%-file: cannot open .*: it is a FIFO that no process reads", r.stderr)
  end)

  -- (before: the check of --log-file opened the FIFO and closed it: a reader that stops at the end of its
  -- input, as `cat` does, read that as the end and left, and the log was then refused as a FIFO nobody reads)
  it("--log-file naming a FIFO read as `cat` reads it (up to the end): the lines reach it", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local reader = helpers.write(dir .. "/reader.py", [[
import os, select, sys
d = sys.argv[1]
r = os.open(d + "/f", os.O_RDONLY | os.O_NONBLOCK) # (open now: the writer finds its reader)
open(d + "/ready", "w").close()
got = b""
while True:
    select.select([r], [], [], 20)
    chunk = os.read(r, 65536)
    if not chunk: break # the end: every writer closed it
    got += chunk
open(d + "/got", "wb").write(got)
]])
    assert(os.execute("mkfifo " .. dir .. "/f"))
    os.execute(("timeout 30 python3 %s %s &"):format(reader, dir))
    assert.is_true(helpers.wait_until(function() return io.open(dir .. "/ready") ~= nil end, 20))
    local r = helpers.run(("timeout 20 %s --log-file %s/f -e 'require(\"resil\").log.info(\"to the fifo\")'")
      :format(helpers.resil, dir))
    assert.is_true(helpers.wait_until(function() return io.open(dir .. "/got") ~= nil end, 20))
    local got = helpers.slurp(dir .. "/got")
    os.execute("rm -rf " .. dir)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('"msg":"to the fifo"', got, 1, true)
  end)

  it("drops whole lines past its bound, in order, and says how many once the reader catches up", function()
    local n = 40000 -- ~7 MB: past the 4 MiB kept for a stalled reader
    local out, lines, r = stalled(n)
    assert.are.equal("alive", out, r.stderr)
    local last = table.remove(lines)
    assert.are.equal("log lines dropped: the log's reader did not keep up", last.msg)
    assert.is_true(#lines > 1000 and #lines < n)
    assert.are.equal(n - #lines, last.dropped)
    for i, l in ipairs(lines) do assert.are.equal(i, l.i) end -- the first ones kept, none glued or cut
  end)
end)

-- two processes on one stderr pipe (the gateway's workers, its supervisor): each line went out in one
-- write of at most PIPE_BUF, which a pipe never splits; what a stalled reader left pending went out in
-- writes of any size, cut anywhere, and the other process's lines landed inside ours
describe("resil.log to a stderr pipe that two processes share", function()
  local driver = [[
import os, sys, subprocess, time
resil, script, d, n = sys.argv[1:5]
r, w = os.pipe()
ps = [subprocess.Popen([resil, script, d, n, str(k)], stderr=w, stdout=subprocess.DEVNULL) for k in range(2)]
os.close(w)
t0 = time.time()
while not (os.path.exists(d + "/logged0") and os.path.exists(d + "/logged1")):
    if time.time() - t0 > 30:
        print("blocked in a log write")
        for p in ps: p.kill()
        sys.exit(0)
    time.sleep(0.01)
open(d + "/reading", "w").close()
data = b""
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    data += chunk
for p in ps: p.wait()
sys.stdout.write(data.decode())
]]
  local script = [[
local resil = require "resil"
local dir, n, k = arg[1], tonumber(arg[2]), arg[3]
local pad = ("x"):rep(100)
for i = 1, n do resil.log.warn("line", { i = i, k = k, pad = pad }) end
io.open(dir .. "/logged" .. k, "w"):close()
while not io.open(dir .. "/reading") do resil.sleep(0.01) end
resil.sleep(0.5) -- (the loop runs: both drain at once)
]]
  it("keeps each line whole: none cut, none glued to another's", function()
    local dir = helpers.tmpname(".d")
    assert(os.execute("mkdir -p " .. dir))
    local py = helpers.write(dir .. "/driver.py", driver)
    local lua = helpers.write(dir .. "/script.lua", script)
    for _ = 1, 3 do
      local r = helpers.run(("timeout 120 python3 %s %s %s %s %d"):format(py, helpers.resil, lua, dir, 3000))
      local count = { ["0"] = 0, ["1"] = 0 }
      for line in r.stdout:gmatch("[^\n]+") do
        local l = resil.json.decode(line)
        assert(l and l.msg == "line" and count[l.k], "a line cut or glued: " .. line:sub(1, 300))
        count[l.k] = count[l.k] + 1
        assert.are.equal(count[l.k], l.i)
      end
      assert.are.same({ ["0"] = 3000, ["1"] = 3000 }, count, r.stderr)
      os.remove(dir .. "/logged0"); os.remove(dir .. "/logged1"); os.remove(dir .. "/reading")
    end
  end)
end)

describe("resil.log with stderr closed", function()
  -- fd 2 is then what the host opened first (its wake pipe's read end): the sink reopened it for writing
  -- through /proc/self/fd/2, and the log lines went into the host's own pipe
  it("does not reopen a read-only fd 2 for writing", function()
    local script = helpers.write(helpers.tmpname(".lua"), [==[
local resil = require "resil"
local pid = io.open("/proc/self/stat"):read("l"):match("^(%d+)")
local function same_as_fd2()
  local p = io.popen("cd /proc/" .. pid .. "/fd && t=$(readlink 2) && for f in *; do [ \"$(readlink $f)\" = \"$t\" ] && echo $f; done")
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end
local before = same_as_fd2()
resil.log.warn("nobody reads this")
print(before, same_as_fd2())
]==])
    local r = helpers.run(("(%s %s 2>&-)"):format(helpers.resil, script))
    local before, after = r.stdout:match("(%d+)\t(%d+)")
    assert.is_truthy(before, r.stdout .. r.stderr)
    assert.are.equal(before, after)
  end)
end)

-- (found by reviewer R1, forty-first session: the cases of the names remembered by the logger)
describe("resil.log: field names remembered", function()
  it("names of every kind, reserved and credential ones, the same on each line (names remembered)", function()
    local tk = setmetatable({}, { __tostring = function() return "tkey" end })
    local lines = capture(function()
      for i = 1, 3 do
        log.info("x", { [1] = "one", [2.5] = "two", [true] = "t", [tk] = "tab", api_key = 5, id_token = i == 2 and "s" or 7, ts = 1, level = 2 })
      end
    end)
    for i = 1, 3 do
      local l = lines[i]
      assert.are.equal("one", l["1"]); assert.are.equal("two", l["2.5"]); assert.are.equal("t", l["true"])
      assert.are.equal("tab", l.tkey)
      assert.are.equal("[REDACTED]", l.api_key)
      if i == 2 then assert.are.equal("[REDACTED]", l.id_token) else assert.are.equal(7, l.id_token) end
      assert.are.equal(1, l.field_ts); assert.are.equal(2, l.field_level); assert.are.equal("info", l.level)
    end
  end)
  it("a name the context takes on between two lines is renamed on the second only", function()
    local lines = capture(function()
      resil.spawn(function()
        log.info("a", { zone_r1 = "mine", step = 1 })
        resil.context({ zone_r1 = "ctx" })
        log.info("b", { zone_r1 = "mine", step = 2 })
      end):join()
      resil.spawn(function() log.info("c", { zone_r1 = "mine", step = 3 }) end):join()
    end)
    assert.are.equal("mine", lines[1].zone_r1)
    assert.are.equal("ctx", lines[2].zone_r1); assert.are.equal("mine", lines[2].field_zone_r1)
    assert.are.equal("mine", lines[3].zone_r1)
  end)
  it("a long name, a secret registered later, and more names than are remembered", function()
    local sec = "zzsecret" .. os.time() .. "qq"
    local long = ("L"):rep(200) .. sec
    local short = "s_" .. sec
    local l1 = capture(function() log.info("x", { [long] = 1, [short] = 2 }) end)[1]
    assert.are.equal(1, l1[long]); assert.are.equal(2, l1[short])
    log.redact(sec)
    local l2 = capture(function() log.info("x", { [long] = 1, [short] = 2 }) end)[1]
    for k in pairs(l2) do assert.is_nil(k:find(sec, 1, true), k) end
    local lines = capture(function()
      for j = 1, 30 do
        local f = {}
        for i = 1, 100 do f["n" .. j .. "_" .. i] = i end
        f[short] = 3
        log.info("m", f)
      end
      local big = {}
      for i = 1, 5000 do big["big" .. i] = i end
      log.info("big", big)
    end)
    for j = 1, 30 do assert.are.equal(100, lines[j]["n" .. j .. "_100"]); assert.are.equal(3, lines[j]["s_[REDACTED]"]) end
    assert.are.equal(5000, lines[31].big5000)
  end)
end)
