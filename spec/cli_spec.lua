local helpers = require "spec.helpers"
local resil = require "resil"
local R = helpers.resil

describe("the resil-lua command", function()
  it("runs a script with arg and ... like lua, exit status 0", function()
    local r = helpers.run_script([[print(arg[0] ~= nil, arg[1], arg[2], select('#', ...), ...)]], nil, "one two")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("true\tone\ttwo\t2\tone\ttwo\n", r.stdout)
  end)

  it("runs -e code, and reads a script from stdin with -", function()
    local r = helpers.run(R .. " -e 'print(1 + 1)'")
    assert.are.equal("2\n", r.stdout)
    r = helpers.run(R .. " - a b", "print(...)")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("a\tb\n", r.stdout)
  end)

  it("prints its version and help", function()
    assert.matches("^resil%-lua %d+%.%d+%.%d+ %(Lua 5%.4", helpers.run(R .. " -v").stdout)
    local h = helpers.run(R .. " --help")
    assert.are.equal(0, h.code)
    assert.matches("usage: resil%-lua", h.stdout)
  end)

  it("rejects an unknown option with exit status 1", function()
    local r = helpers.run(R .. " --frobnicate x.lua")
    assert.are.equal(1, r.code)
    assert.matches("unknown option '%-%-frobnicate'", r.stderr)
  end)

  it("names a missing script", function()
    local r = helpers.run(R .. " /no/such/script.lua")
    assert.are.equal(1, r.code)
    assert.matches("cannot open /no/such/script.lua: No such file", r.stderr)
  end)

  it("reports a syntax error on one line with file:line", function()
    local r = helpers.run_script("local x = = 1\n")
    assert.are.equal(1, r.code)
    assert.matches("%.lua:1: unexpected symbol near '='", r.stderr)
    assert.are.equal(1, select(2, r.stderr:gsub("\n", "")))
  end)

  it("reports an uncaught error with file:line and a traceback, exit status 1", function()
    local r = helpers.run_script("local function f()\n  error('bad thing')\nend\nf()\n")
    assert.are.equal(1, r.code)
    assert.matches("%.lua:2: bad thing", r.stderr)
    assert.matches("stack traceback:", r.stderr)
    assert.matches("in local 'f'", r.stderr)
  end)

  it("exits once the last task is done, not before", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      resil.spawn(function() resil.sleep(0.05); print("child done") end)
      print("main done")
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("main done\nchild done\n", r.stdout)
  end)

  it("reports a failed task nobody joined, without failing the run", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      resil.spawn(function() error("lost failure") end)
    ]])
    assert.are.equal(0, r.code)
    assert.matches("never joined: .*lost failure", r.stderr)
  end)

  it("rejects bad option values", function()
    assert.matches("bad size", helpers.run(R .. " --max-memory lots x.lua").stderr)
    assert.matches("bad count", helpers.run(R .. " --max-instructions -3 x.lua").stderr)
    assert.matches("unknown level", helpers.run(R .. " --log-level loud x.lua").stderr)
    assert.matches("needs an argument", helpers.run(R .. " -e").stderr)
  end)

  it("rejects sizes and counts that do not fit, with exit status 1", function()
    for _, bad in ipairs({ "99999999999999999999G", "nan", "inf", "0.5", "2000000G" }) do
      local r = helpers.run(R .. " --max-memory " .. bad .. " -e 'print(1)'")
      assert.are.equal(1, r.code, bad)
      assert.matches("%-%-max%-memory: bad size", r.stderr)
    end
    local r = helpers.run(R .. " --max-instructions 99999999999 -e 'print(1)'")
    assert.are.equal(1, r.code)
    assert.matches("%-%-max%-instructions: bad count '99999999999' %(1 to 2147483647%)", r.stderr)
  end)

  it("names a --log-file it cannot open, with exit status 1", function()
    local r = helpers.run(R .. " --log-file /nonexistent-dir/x.log -e 'print(1)'")
    assert.are.equal(1, r.code)
    assert.are.equal("", r.stdout)
    assert.matches("%-%-log%-file: cannot open /nonexistent%-dir/x%.log: No such file or directory", r.stderr)
  end)

  -- (before: a sandboxed script could read no file beside it, and the refusal named
  -- resil_options.sandbox_dirs, a C option no command line reaches: the demo could not run sandboxed)
  it("--sandbox-dir gives a sandboxed script a folder of its own; without it the refusal names the option", function()
    local dir = helpers.tmpname("-sbx")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/data.txt", "beside\n")
    local script = helpers.write(dir .. "/read.lua", ([[
      local f = assert(io.open(%q)); print(f:read("l")); f:close()
      local out = assert(io.open(%q, "w")); out:write("written"); out:close()
    ]]):format(dir .. "/data.txt", dir .. "/out.txt"))
    local r = helpers.run(R .. " --sandbox " .. script)
    assert.are.equal(1, r.code)
    assert.matches("is not allowed in the sandbox: outside the folders it may use %(%-%-sandbox%-dir DIR, or "
      .. "resil_options.sandbox_dirs when embedding%)", r.stderr)
    r = helpers.run(R .. " --sandbox --sandbox-dir " .. dir .. " " .. script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("beside\n", r.stdout)
    assert.are.equal("written", helpers.slurp(dir .. "/out.txt"))
    r = helpers.run(R .. " --sandbox-dir " .. dir .. " " .. script)
    assert.are.same({ 1, "resil-lua: --sandbox-dir goes with --sandbox\n" }, { r.code, r.stderr })
    r = helpers.run(R .. " --sandbox --sandbox-dir " .. dir .. "/nope " .. script)
    assert.are.equal(1, r.code)
    assert.matches("%-%-sandbox%-dir: .*/nope is not a folder", r.stderr)
    os.execute("rm -rf " .. dir)
  end)

  -- (before: the gateway's own options were in its synopsis line only, never said what they do)
  it("--help says what each of the gateway's options does", function()
    local r = helpers.run(R .. " gateway --help")
    for _, option in ipairs({ "--listen HOST:PORT", "--config FILE", "--workers N", "--worker-timeout S" }) do
      assert.matches("\n  " .. option:gsub("%p", "%%%0") .. " +gateway", r.stdout .. r.stderr, nil, false)
    end
  end)

  it("refuses a --store URL of an unknown scheme, naming the accepted forms", function()
    local dir = helpers.tmpname("-cwd")
    assert(os.execute("mkdir -p " .. dir))
    for _, cmd in ipairs({ " --store ftp://x -e 'print(1)'", " runs --store ftp://x" }) do
      local r = helpers.run("cd " .. dir .. " && " .. R .. cmd)
      assert.are.equal(1, r.code, cmd)
      assert.are.equal("", r.stdout)
      assert.matches("unknown URL scheme 'ftp' in 'ftp://x' %(use a file path, sqlite://PATH or redis://", r.stderr)
    end
    assert.is_nil(io.open(dir .. "/ftp:"), "a folder named after the URL")
    os.execute("rm -rf " .. dir)
  end)

  -- (before: the hint's own "[[user]:password@]" was taken for a URL's password and printed
  -- as "[[user]:[REDACTED]@]")
  it("names the form of a redis URL it cannot read, the hint not redacted", function()
    local r = helpers.run(R .. " runs --store redis://h:1/0/x")
    assert.are.equal(1, r.code)
    assert.are.equal("resil-lua: store_unavailable: redis: cannot read URL redis://h:1/0/x (the form is "
      .. "redis://host:port/db[?timeout=seconds], with [user]:password@ before host when the server needs one)\n",
      r.stderr)
    -- a password in the URL itself still is
    r = helpers.run(R .. " runs --store redis://u:hunter2@h:1/0/x")
    assert.are.equal(1, r.code)
    assert.not_matches("hunter2", r.stderr)
    assert.matches("REDACTED", r.stderr)
  end)

  -- (before: a command printed the store module's traceback, and a pipeline ran on, its steps
  -- unrecorded, each returning the error)
  it("refuses a RESIL_STORE of an unknown scheme as it refuses --store: one line, exit 1, nothing run", function()
    local dir = helpers.tmpname("-cwd")
    assert(os.execute("mkdir -p " .. dir))
    for _, cmd in ipairs({ " -e 'print(1)'", " runs", " costs", " keys list", " budgets set b --limit 1" }) do
      local r = helpers.run("cd " .. dir .. " && RESIL_STORE=ftp://x " .. R .. cmd)
      assert.are.equal(1, r.code, cmd)
      assert.are.equal("", r.stdout, cmd)
      assert.are.equal("resil-lua: store: unknown URL scheme 'ftp' in 'ftp://x' (use a file path, sqlite://PATH or "
        .. "redis://host:port/db)\n", r.stderr, cmd)
    end
    os.execute("rm -rf " .. dir)
  end)

  -- (before: --workers started its workers, each of which printed the same refusal with a traceback of
  -- policies/gateway.lua, three times over, then "workers keep dying as they start"; a --config that
  -- cannot be opened came with the same traceback, or the same three deaths with --workers)
  it("gateway: --workers on port 0, or a --config it cannot open, is one line before anything starts", function()
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }\n")
    local missing = helpers.tmpname("-missing.lua")
    local port = helpers.free_port()
    for _, case in ipairs({
      { ("--listen 127.0.0.1:0 --workers 2 --config %s"):format(config),
        "resil-lua: gateway: --workers needs a fixed port in --listen, not '127.0.0.1:0'\n" },
      { ("--listen 127.0.0.1:%d --config %s"):format(port, missing),
        ("resil-lua: gateway: --config: cannot open %s: No such file or directory\n"):format(missing) },
      { ("--listen 127.0.0.1:%d --workers 2 --config %s"):format(port, missing),
        ("resil-lua: gateway: --config: cannot open %s: No such file or directory\n"):format(missing) },
      { ("--listen 127.0.0.1:%d --config %s"):format(port, "/tmp"),
        ("resil-lua: gateway: --config: cannot open %s: Is a directory\n"):format("/tmp") },
    }) do
      local r = helpers.run(("timeout -s KILL 20 %s gateway %s --store %s"):format(R, case[1], helpers.tmpname(".db")))
      assert.are.equal(1, r.code, case[1])
      assert.are.equal("", r.stdout, case[1])
      assert.are.equal(case[2], r.stderr, case[1])
    end
  end)

  -- (before: `keys list --bogus` listed, exit 0; `keys revoke a b` revoked a and said nothing of b; an
  -- add refused said "keys: bad_option: --budget wants ..." and "keys: exists: ...", the error's kind)
  it("keys: an argument list or revoke does not take is refused, nothing revoked; add's refusals name no kind",
    function()
    local db = helpers.tmpname(".db")
    assert.are.equal(0, helpers.run(("%s keys add --name a --store %s"):format(R, db)).code)
    for _, args in ipairs({ "list --bogus", "list --json --bogus", "list extra", "revoke a b", "revoke a --json" }) do
      local r = helpers.run(("%s keys %s --store %s"):format(R, args, db))
      assert.are.equal(1, r.code, args)
      assert.are.equal("", r.stdout, args)
      assert.matches("^resil%-lua: keys: unexpected argument '[^']+'\nusage: resil%-lua keys add", r.stderr)
    end
    assert.matches("a%s+active", helpers.run(("%s keys list --store %s"):format(R, db)).stdout)
    local r = helpers.run(("%s keys add --name b --budget 50/week --store %s"):format(R, db))
    assert.are.equal(1, r.code)
    assert.are.equal("resil-lua: keys: --budget wants USD (up to 1e12), USD/day or USD/month, not '50/week'\n", r.stderr)
    r = helpers.run(("%s keys add --name a --store %s"):format(R, db))
    assert.are.equal(1, r.code)
    assert.are.equal("resil-lua: keys: a live key is named 'a' already (revoke it first)\n", r.stderr)
  end)

  -- (before: a key printed to a full disk stayed live, its secret held by nobody, and the next
  -- `keys add --name` of its name was "a live key is named 'a' already (revoke it first)")
  it("keys add: a key that cannot be written (> /dev/full) is revoked, saying so; the name can be added again",
    function()
    local db = helpers.tmpname(".db")
    local r = helpers.run(("(%s keys add --name a --store %s > /dev/full)"):format(R, db))
    assert.are.equal(1, r.code)
    assert.matches("^resil%-lua: keys: the key could not be written %(No space left on device%); key key_%x+ %(a%) " ..
      "was revoked: add it again\n$", r.stderr)
    assert.matches("\nkey_%x+%s+a%s+revoked%s", helpers.run(("%s keys list --store %s"):format(R, db)).stdout)
    r = helpers.run(("%s keys add --name a --store %s"):format(R, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^sk%-resil%-%S+\n$", r.stdout)
  end)

  -- (before: a name past 16 characters pushed its row's columns out of line, --tpm 20000000 was listed
  -- as 2e+07 and a budget of $1234567.5 as $1.23457e+06; a model's escape sequence reached the terminal)
  it("keys list: columns in line whatever the name's length, limits as typed, control characters escaped",
    function()
    local db = helpers.tmpname(".db")
    assert.are.equal(0, helpers.run(("%s keys add --name platform-team-production-east --budget 1234567.5/month " ..
      "--rpm 1000000 --tpm 20000000 --concurrency 64 --models \"$(printf 'chat-fast,red\\033[31m')\" --store %s"):format(R, db)).code)
    assert.are.equal(0, helpers.run(("%s keys add --name b --budget 0.25 --store %s"):format(R, db)).code)
    local r = helpers.run(("%s keys list --store %s"):format(R, db))
    assert.are.equal(0, r.code, r.stderr)
    local lines = {}
    for line in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.equal(3, #lines, r.stdout)
    -- each column starts where its header does, on every line
    for _, h in ipairs({ "NAME", "STATUS", "BUDGET", "RPM", "TPM", "CONC", "MODELS" }) do
      local at = lines[1]:find(h, 1, true)
      for k = 2, 3 do
        assert.are.equal(" ", lines[k]:sub(at - 1, at - 1), h .. ": " .. lines[k])
        assert.are_not.equal(" ", lines[k]:sub(at, at), h .. ": " .. lines[k])
      end
    end
    assert.matches("platform%-team%-production%-east%s+active%s+%$1234567%.5/month%s+1000000%s+20000000%s+64%s+" ..
      "chat%-fast,red\\x1b%[31m$", lines[2])
    assert.matches("b%s+active%s+%$0%.25%s+%-%s+%-%s+%-%s+%*$", lines[3])
    assert.is_nil(r.stdout:find("\27", 1, true))
    -- a C1 control in UTF-8 (CSI, U+009B) and DEL are escaped too, as runs and costs escape them
    assert.are.equal(0, helpers.run(("%s keys add --name c --models \"$(printf 'csi\\302\\2332J,del\\177')\" " ..
      "--store %s"):format(R, db)).code)
    r = helpers.run(("%s keys list --store %s"):format(R, db))
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("csi\\u009b2J,del\\x7f", r.stdout, 1, true)
    assert.is_nil(r.stdout:find("\194\155", 1, true))
    assert.is_nil(r.stdout:find("\127", 1, true))
  end)

  -- (before: "listen: server: cannot listen on localhost:8080 (No such file or directory)" and a traceback
  -- of policies/gateway.lua, for a host name, and the same for :PORT, which --metrics-addr takes as loopback)
  it("gateway --listen: a host name is refused in one line naming the forms; :PORT is loopback", function()
    local port = helpers.free_port()
    for _, at in ipairs({ "localhost:" .. port, "gw.example:" .. port }) do
      local r = helpers.run(("timeout -s KILL 20 %s gateway --listen %s --store %s"):format(R, at, helpers.tmpname(".db")))
      assert.are.equal(1, r.code, at)
      assert.are.equal("", r.stdout, at)
      assert.are.equal(("resil-lua: gateway: --listen wants a numeric address and a port (127.0.0.1:8080, " ..
        "0.0.0.0:8080, [::1]:8080, :8080 for loopback), not '%s'\n"):format(at), r.stderr)
    end
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }\n")
    local log, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s gateway --listen :%d --config %s --store %s > %s 2>&1 & echo $! > %s")
      :format(R, port, config, helpers.tmpname(".db"), log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(helpers.wait_until(function()
      return helpers.slurp(log):match("listening") ~= nil or not helpers.alive(pid)
    end, 15))
    assert.are.equal(("gateway listening on http://127.0.0.1:%d\n"):format(port), helpers.slurp(log))
    local res = assert(resil.http.request({ url = ("http://127.0.0.1:%d/health"):format(port) }))
    assert.are.equal(200, res.status)
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 15))
  end)

  -- (before: 'bad argument #-1 to 'connect' (number has no integer representation)' and a traceback;
  -- 4294967296 was cut to database 0, another store's keys)
  it("refuses a Redis --store URL whose database is no number Redis takes, naming the URL", function()
    for _, db in ipairs({ "99999999999999999999", "4294967296" }) do
      local url = "redis://127.0.0.1:6379/" .. db
      local r = helpers.run(R .. " runs --store " .. url)
      assert.are.equal(1, r.code, db)
      assert.are.equal("", r.stdout)
      assert.are.equal(("resil-lua: store_unavailable: redis: database %s in URL %s is not one (0 to 2147483647)\n")
        :format(db, url), r.stderr)
    end
  end)

  it("refuses a --since that is not a date", function()
    for _, bad in ipairs({ "2026-13-45", "2026-02-29", "2026-00-10" }) do
      local r = helpers.run(R .. " costs --since " .. bad .. " --store " .. helpers.tmpname(".db"))
      assert.are.equal(1, r.code, bad)
      assert.matches("%-%-since " .. bad:gsub("%p", "%%%0") .. " is not a date %(YYYY%-MM%-DD%)", r.stderr)
    end
  end)
end)

describe("runaway scripts", function()
  -- (a policy that loops held the loop for good unless --max-instructions, which costs on every
  -- instruction, was set: a gateway worker then served nobody)
  it("--max-task-seconds stops a task that runs that much CPU without yielding, where it loops; pcall cannot " ..
     "swallow it; <close> handlers run; a task that yields in time runs on", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      local function closes(name) return setmetatable({}, { __close = function() print(name .. " closed") end }) end
      local busy = resil.spawn(function() -- yields after each 0.05 s of CPU: never stopped
        for _ = 1, 10 do
          local s = os.clock()
          while os.clock() - s < 0.05 do end
          resil.yield()
        end
        return "done"
      end)
      local t = resil.spawn(function()
        local _ <close> = closes("task")
        while true do end
      end)
      print("joined", t:join())
      local swallowed = resil.spawn(function()
        while true do pcall(function() for _ = 1, 100 do end end) end
      end)
      print("joined", swallowed:join())
      local wrapped = resil.spawn(function()
        coroutine.wrap(function()
          local _ <close> = closes("wrapped")
          while true do end
        end)()
      end)
      print("joined", wrapped:join())
      print("busy", busy:join())
    ]])
    local r = helpers.run(R .. " --max-task-seconds 0.3 " .. script)
    assert.are.equal(0, r.code, r.stderr)
    local limit = "ran %d+%.%d s without yielding %(%-%-max%-task%-seconds=0%.3%)"
    assert.matches("^task closed\njoined\tfalse\t[^\n]-%.lua:13: task 3 %([^\n]-%.lua:11%) " .. limit .. "\n" ..
      "joined\tfalse\t[^\n]*\n" ..
      "wrapped closed\njoined\tfalse\t[^\n]-%.lua:21: [^\n]-%.lua:23: task 5 %([^\n]-%.lua:20%) " .. limit .. "\n" ..
      "busy\ttrue\tdone\n$", r.stdout)
    -- the loop that catches: stopped where its error was not caught, or cut where it was, with the
    -- stop's error all the same (before: "canceled: task 4 was canceled", no line, no word of why)
    local swallowed = r.stdout:match("\njoined\tfalse\t([^\n]*)\nwrapped")
    assert.is_truthy(swallowed:match("%.lua:17: task 4 %([^\n]-%.lua:16%) " .. limit .. "$"), swallowed)
    for _, bad in ipairs({ "-1", "abc", "nan", "1e9" }) do
      r = helpers.run(R .. " --max-task-seconds " .. bad .. " -e 'print(1)'")
      assert.are.equal(1, r.code, bad)
      assert.are.equal("", r.stdout)
      assert.matches("%-%-max%-task%-seconds: bad number of seconds '" .. bad:gsub("%p", "%%%0") .. "' %(0 to 1000000; 0: off%)", r.stderr)
    end
  end)

  -- (before: the error reached the task as coroutine.resume's false, err, and the task was cut at
  -- its next instruction: it ended "canceled" with the loop's file:line lost, where the same loop
  -- under pcall, or under --max-instructions, let the task see the error and go on)
  -- (before: no hook fires inside a string pattern's matcher or a finalizer (Lua runs those with
  -- hooks off), so the watchdog's stop never came: the process held its loop for hours, a gateway
  -- worker serving nobody, its supervisor seeing nothing wrong)
  it("--max-task-seconds: a loop stuck outside Lua code (a pattern that backtracks, a finalizer that " ..
     "loops) ends the process with code 70 and a line naming the task, for its supervisor to restart", function()
    local cases = {
      { [[
local resil = require "resil"
local t = resil.spawn(function()
  return (("a"):rep(200)):find(("a-"):rep(40) .. "c")
end)
print(t:join())
]], "task 2 %([^\n]-%.lua:2%)" },
      -- (before: the host's own full collection between loop turns, outside every task, ran it:
      -- the process hung for good)
      { [[
local resil = require "resil"
local keep = setmetatable({}, { __gc = function() while true do end end })
local junk = {}
for i = 1, 20000 do junk[i] = { i } end
keep, junk = nil, nil
for _ = 1, 200 do resil.sleep(0.01) end
]], "the host's full garbage collection %(a __gc finalizer%)" },
    }
    for _, case in ipairs(cases) do
      local script = helpers.write(helpers.tmpname(".lua"), case[1])
      local r = helpers.run("timeout -s KILL 120 " .. R .. " --max-task-seconds 0.3 " .. script)
      os.remove(script)
      assert.are.equal(70, r.code, r.stdout .. r.stderr)
      assert.are.equal("", r.stdout)
      local line = r.stderr:match('[^\n]*"level":"error"[^\n]*')
      assert.is_truthy(line, r.stderr)
      local entry = resil.json.decode(line)
      assert.matches("^" .. case[2] .. " ran %d+%.%d s without yielding and did not stop at " ..
        "%-%-max%-task%-seconds=0%.3: it is stuck outside Lua code", entry.msg)
      assert.are.equal(70, entry.exit_code)
    end
  end)

  it("--max-task-seconds: a finalizer that loops in a task's collection is stopped at its line, and the task " ..
     "goes on", function()
    -- (it ended the process with code 70 once: Lua runs a finalizer with its hooks off, so the watchdog's
    -- stop never came; they are turned back on for it: src/watchdog.c)
    local script = helpers.write(helpers.tmpname(".lua"), [[
setmetatable({}, { __gc = function() while true do end end })
collectgarbage()
print("went on")
]])
    local r = helpers.run("timeout -s KILL 120 " .. R .. " --max-task-seconds 0.3 " .. script)
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal("went on\n", r.stdout)
    local entry = resil.json.decode(r.stderr:match('[^\n]*"level":"error"[^\n]*') or "null")
    assert.are.equal("a __gc finalizer raised an error; what it had left to do was not done", entry and entry.msg)
    assert.matches(script:gsub("%p", "%%%0") .. ":1: task 1 %(.-%) ran %d+%.%d s without yielding", entry.error)
  end)

  it("--max-task-seconds: a loop in a coroutine the task resumes is stopped with its file:line, which " ..
     "coroutine.resume returns as it would any error; a task that loops on is then ended with that error", function()
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      print("joined", resil.spawn(function()
        local ok, err = coroutine.resume(coroutine.create(function() while true do end end))
        print("resumed", ok, err)
        return "went on"
      end):join())
      print("joined", resil.spawn(function()
        while true do coroutine.resume(coroutine.create(function() while true do end end)) end
      end):join())
    ]])
    local r = helpers.run(R .. " --max-task-seconds 0.3 " .. script)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^resumed\tfalse\t[^\n]-%.lua:3: task 2 %([^\n]-%.lua:2%) ran %d+%.%d s without yielding " ..
      "%(%-%-max%-task%-seconds=0%.3%)\njoined\ttrue\twent on\njoined\tfalse\t[^\n]-%.lua:8: task 3 %([^\n]-%.lua:7%) " ..
      "ran %d+%.%d s without yielding %(%-%-max%-task%-seconds=0%.3%)\n$", r.stdout)
  end)

  -- (before: the watchdog's thread wrote the resume it stopped, and read the nested coroutines'
  -- links, with plain loads and stores the loop's thread raced with; seen by ThreadSanitizer: on
  -- a weakly ordered CPU the hook could read an older resume's number, take itself off, and the
  -- loop ran on for good). Runs with a ThreadSanitizer build only:
  -- make BUILD=build/tsan OPT=-O1 SAN=-fsanitize=thread CC=clang all; RESIL_TSAN=$PWD/build/tsan/resil-lua
  it("--max-task-seconds: the watchdog's thread and the loop's meet only through atomics (ThreadSanitizer)", function()
    local tsan = os.getenv("RESIL_TSAN")
    if not tsan then return pending("RESIL_TSAN: a resil-lua built with -fsanitize=thread") end
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      local function deep(n) if n == 0 then return {} end return deep(n - 1) end
      for i = 1, 3 do -- a loop in a coroutine it wraps, then in one it resumes
        print(i, resil.spawn(function()
          local g = coroutine.wrap(function() while true do deep(20); coroutine.yield() end end)
          while true do g() end
        end):join())
        print(i, resil.spawn(function()
          while true do coroutine.resume(coroutine.create(function() for _ = 1, 1000 do deep(10) end end)) end
        end):join())
      end
    ]])
    local r = helpers.run("TSAN_OPTIONS='halt_on_error=0 report_signal_unsafe=0' " .. tsan ..
      " --max-task-seconds 0.2 " .. script)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal(6, select(2, r.stdout:gsub("\tfalse\t", "")), r.stdout)
    assert.is_nil(r.stderr:find("ThreadSanitizer", 1, true), r.stderr)
  end)

  it("--max-instructions stops a task stuck in a loop, naming it; pcall cannot swallow it", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local t = resil.spawn(function()
        while true do pcall(function() for _ = 1, 100 do end end) end
      end)
      local ok, err = t:join()
      print("joined", ok, err)
      local n = 0
      for _ = 1, 10 do n = n + 1; resil.yield() end
      print("main survived", n)
    ]], "--max-instructions 100000")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("joined\tfalse\t.*task 2 %(.*%.lua:2%) ran more than %-%-max%-instructions=100000", r.stdout)
    assert.matches("main survived\t10", r.stdout)
  end)

  -- (before: the count hook was on the task's own thread; a coroutine it resumed kept its own count,
  -- and a stopped one was left with its <close> handlers pending)
  it("--max-instructions stops a loop in a coroutine the task resumes, naming the task; its <close> " ..
     "handlers run", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local function closes(name) return setmetatable({}, { __close = function() print(name .. " closed") end }) end
      local t = resil.spawn(function()
        local _ <close> = closes("task")
        local co = coroutine.create(function()
          local _ <close> = closes("coroutine")
          while true do end
        end)
        print("resumed", coroutine.resume(co))
        print("then", coroutine.status(co))
        while true do end
      end)
      print("joined", t:join())
      local wrapped = resil.spawn(function()
        coroutine.wrap(function()
          local _ <close> = closes("wrapped")
          while true do end
        end)()
      end)
      print("joined", wrapped:join())
    ]], "--max-instructions 100000")
    assert.are.equal(0, r.code, r.stderr)
    local limit = "ran more than %-%-max%-instructions=100000 without yielding"
    -- each located at the loop it stopped (7, 11, 17), the wrap's caller (15) before it
    assert.matches("^coroutine closed\nresumed\tfalse\t[^\n]-%.lua:7: task 2 %(.-%.lua:3%) " .. limit .. "\nthen\tdead\n" ..
      "task closed\njoined\tfalse\t[^\n]-%.lua:11: task 2 %(.-%.lua:3%) " .. limit .. "\n" ..
      "wrapped closed\njoined\tfalse\t[^\n]-%.lua:15: [^\n]-%.lua:17: task 3 %(.-%.lua:14%) " .. limit .. "\n$", r.stdout)
  end)

  -- (before: an error raised from a hook left the thread's hooks off, and the <close> handlers ran
  -- unhooked: one that looped, in a task or a coroutine the cap ended, ran for good)
  it("--max-instructions stops a <close> handler that loops in a task it ended, and in a coroutine", function()
    local path = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      local function loops(name) return setmetatable({}, { __close = function() print(name .. " handler runs")
        while true do end end }) end
      local t = resil.spawn(function()
        local _ <close> = loops("task")
        while true do end
      end)
      print("joined", t:join())
      local c = resil.spawn(function()
        local co = coroutine.create(function() local _ <close> = loops("coroutine"); while true do end end)
        print("resumed", coroutine.resume(co))
      end)
      print("joined", c:join())
    ]])
    -- (a kill after 60 s: without the fix the process never ends)
    local r = helpers.run("timeout -s KILL 60 " .. helpers.resil .. " --max-instructions 100000 " .. path)
    assert.are.equal(0, r.code, r.stderr)
    local limit = "ran more than %-%-max%-instructions=100000 without yielding"
    assert.matches("^task handler runs\njoined\tfalse\t[^\n]-%.lua:6: task 2 %(.-%.lua:4%) " .. limit ..
      "\ncoroutine handler runs\nresumed\tfalse\t[^\n]-%.lua:3: task 3 %(.-%.lua:9%) " .. limit ..
      "\njoined\ttrue\n$", r.stdout)
    -- the handler the cap cut is said, with its line
    assert.matches("a task's <close> handler failed as the task ended.-%.lua:3: task 2", r.stderr)
  end)

  -- (before: a coroutine resumed after the stop was caught (the task ran on) is cut, and its <close>
  -- handlers ran with its hook off: one that looped ran for good, and the process ended with 70)
  it("--max-task-seconds stops a <close> handler that loops in a coroutine cut after a pcall caught the stop",
    function()
    local path = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      local t = resil.spawn(function()
        print("caught", (pcall(function() while true do end end)))
        local co = coroutine.create(function()
          local _ <close> = setmetatable({}, { __close = function() print("handler runs") while true do end end })
          while true do end
        end)
        coroutine.resume(co)
      end)
      print("joined", t:join())
      print("main goes on")
    ]])
    local r = helpers.run("timeout -s KILL 60 " .. helpers.resil .. " --max-task-seconds 0.3 " .. path)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^caught\tfalse\nhandler runs\njoined\tfalse\t[^\n]-%.lua:%d+: task 2 %(.-%.lua:2%) ran " ..
      "[%d.]+ s without yielding %(%-%-max%-task%-seconds=0%.3%)\nmain goes on\n$", r.stdout)
  end)

  -- (before: the watchdog's stop could not reach the handler either, and the process ended as a stuck one, 70)
  it("--max-task-seconds stops a <close> handler that loops in a task it ended; the process goes on", function()
    local path = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      local t = resil.spawn(function()
        local _ <close> = setmetatable({}, { __close = function() print("handler runs") while true do end end })
        while true do end
      end)
      print("joined", t:join())
      print("main goes on")
    ]])
    local r = helpers.run("timeout -s KILL 60 " .. helpers.resil .. " --max-task-seconds 0.3 " .. path)
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("^handler runs\njoined\tfalse\t[^\n]-%.lua:4: task 2 %(.-%.lua:2%) ran [%d.]+ s without " ..
      "yielding %(%-%-max%-task%-seconds=0%.3%)\nmain goes on\n$", r.stdout)
    assert.matches("a task's <close> handler failed as the task ended.-%.lua:3: task 2", r.stderr)
  end)

  -- one budget for all a task runs: the coroutines it resumes count to it, each run from where it was
  it("--max-instructions charges a task for the coroutines it runs, fresh ones too", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local runs = 0
      local t = resil.spawn(function()
        while true do
          runs = runs + 1
          coroutine.wrap(function() for _ = 1, 20000 do end end)()
        end
      end)
      print("joined", t:join())
      print("runs", runs)
    ]], "--max-instructions 100000")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("joined\tfalse\t.-task 2 %(.-%) ran more than %-%-max%-instructions=100000", r.stdout)
    local runs = tonumber(r.stdout:match("runs\t(%d+)"))
    assert.is_true(runs <= 10, "a coroutine's instructions went uncounted: " .. runs .. " runs of 20000")
  end)

  -- (before: each thread charged the task only when its hook fired, a part at a time: a fresh coroutine
  -- that ran less than a part was never charged, and a loop of them ran on far past the budget)
  it("--max-instructions charges a task for fresh coroutines that each run less than a part", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local runs = 0
      local t = resil.spawn(function()
        for _ = 1, 5000 do
          runs = runs + 1
          coroutine.wrap(function() for _ = 1, 1000 do end end)()
        end
        return "ran 5000 coroutines of 1000 iterations"
      end)
      print("joined", t:join())
      print("runs", runs)
    ]], "--max-instructions 100000")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("joined\tfalse\t.-task 2 %(.-%) ran more than %-%-max%-instructions=100000", r.stdout)
    local runs = tonumber(r.stdout:match("runs\t(%d+)"))
    assert.is_true(runs <= 100, "a coroutine's instructions went uncounted: " .. runs .. " runs of 1000 iterations")
  end)

  -- (before: a coroutine's count ran on from one task turn to the next, and a generator that a task
  -- used a little on each turn failed it in the end)
  it("--max-instructions does not charge a task for what a coroutine it resumes ran before it yielded", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local gen = coroutine.wrap(function()
        while true do
          for _ = 1, 1000 do end
          coroutine.yield()
        end
      end)
      local t = resil.spawn(function()
        for _ = 1, 300 do gen(); resil.yield() end
        return "done"
      end)
      print("joined", t:join())
    ]], "--max-instructions 100000")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("joined\ttrue\tdone\n", r.stdout)
  end)

  it("--max-memory fails the allocating task, not the host", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local t = resil.spawn(function()
        local t = {}
        for i = 1, 1e8 do t[i] = ("x"):rep(100) .. i end
      end)
      local ok, err = t:join()
      print("joined", ok, err)
    ]], "--max-memory 32M")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("joined\tfalse\tnot enough memory", r.stdout)
  end)

  it("a task that failed under --max-memory gives its memory back, though its handle is kept", function()
    local r = helpers.run_script([[
      local resil = require "resil"
      local hog = resil.spawn(function()
        local t = {}
        for i = 1, 1e8 do t[i] = ("x"):rep(100) .. i end
      end)
      print("first", hog:join())
      local next = resil.spawn(function()
        local t = {}
        for i = 1, 1e5 do t[i] = ("y"):rep(100) .. i end
        return #t
      end)
      print("next", next:join())
      print(hog:status())
    ]], "--max-memory 32M")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("first\tfalse\tnot enough memory\nnext\ttrue\t100000\nfailed\n", r.stdout)
  end)

  it("the main task hitting the memory cap exits 1 with a message", function()
    local r = helpers.run_script("local s = {} for i = 1, 1e8 do s[i] = {} end", "--max-memory 16M")
    assert.are.equal(1, r.code)
    assert.matches("not enough memory", r.stderr)
  end)
end)

describe("signals", function()
  local start = helpers.start
  local function wait_exit(pid)
    return helpers.wait_until(function() return not helpers.alive(pid) end, 5)
  end
  local function wait_for_output(out, pattern)
    return helpers.wait_until(function() return helpers.slurp(out):match(pattern) ~= nil end, 5)
  end

  it("SIGTERM stops a waiting script cleanly", function()
    local pid, out = start([[
      local resil = require "resil"
      print("ready"); io.stdout:flush()
      resil.sleep(3600)
    ]])
    assert.is_true(wait_for_output(out, "ready"))
    os.execute("kill -TERM " .. pid)
    assert.is_true(wait_exit(pid))
    assert.matches("interrupted by signal 15", helpers.slurp(out))
  end)

  it("SIGINT stops a task spinning in a coroutine it resumed; their <close> handlers run", function()
    local pid, out = start([[
      local _ <close> = setmetatable({}, { __close = function() print("task closed") end })
      coroutine.wrap(function()
        local _ <close> = setmetatable({}, { __close = function() print("coroutine closed") end })
        print("ready"); io.stdout:flush()
        local x = 0
        while true do x = x + 1 end
      end)()
    ]])
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(wait_for_output(out, "ready"))
    os.execute("kill -INT " .. pid)
    assert.is_true(wait_exit(pid), "SIGINT did not stop it")
    local output = helpers.slurp(out)
    assert.matches("interrupted by signal 2", output)
    assert.matches("coroutine closed", output)
    assert.matches("task closed", output)
  end)

  it("SIGTERM stopping a spawned task that spins is said once: not again as its failure nobody joined", function()
    local pid, out = start([[
      local resil = require "resil"
      resil.map({ 1, 2 }, function(i)
        if i == 1 then print("ready"); io.stdout:flush() end
        local x = 0
        while true do x = x + 1 end
      end)
    ]])
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    assert.is_true(wait_for_output(out, "ready"))
    os.execute("kill -TERM " .. pid)
    assert.is_true(wait_exit(pid), "SIGTERM did not stop it")
    assert.matches("^ready\nresil%-lua: [^\n]*%.lua:5: interrupted by signal 15\n$", helpers.slurp(out))
  end)

  -- (before: "resil-lua: interrupted by signal 2" and nothing more, where --max-task-seconds names
  -- the line: a Ctrl-C was how a user found a policy that loops, and it never said which)
  it("SIGINT or SIGTERM to a policy that loops says where it looped, file:line", function()
    local dir = helpers.tmpname("-policies")
    assert(os.execute("mkdir -p " .. dir))
    -- ("ready" from inside the policy, as its loop begins: the signal lands in it, no sleep needed)
    helpers.write(dir .. "/spin.lua", "local M = {}\nfunction M.spin()\n  local n = 0 print('ready') io.stdout:flush()\n" ..
      "  while true do n = n + 1 end\nend\nreturn M\n")
    for _, stop in ipairs({ { "INT", 130, 2 }, { "TERM", 143, 15 } }) do
      local pid, out = start([[
require("policies.spin").spin()
]], "--policies " .. dir)
      finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
      assert.is_true(wait_for_output(out, "ready"))
      os.execute(("kill -%s %s"):format(stop[1], pid))
      assert.is_true(wait_exit(pid), "the signal did not stop it")
      -- (line 4, the loop; 3 if the signal came as its flush returned)
      local said = helpers.slurp(out)
      assert.matches(("^ready\nresil%%-lua: %s/spin%%.lua:[34]: interrupted by signal %d\n$"):format(
        dir:gsub("%p", "%%%0"), stop[3]), said)
    end
  end)

  it("SIGINT stops a task spinning in a Lua loop", function()
    local pid, out = start([[
      print("ready"); io.stdout:flush()
      local x = 0
      while true do x = x + 1 end
    ]])
    assert.is_true(wait_for_output(out, "ready"))
    os.execute("kill -INT " .. pid)
    assert.is_true(wait_exit(pid))
    assert.matches("interrupted", helpers.slurp(out))
  end)
end)
