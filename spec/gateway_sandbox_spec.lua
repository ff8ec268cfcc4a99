-- `resil-lua gateway --sandbox`: a real gateway process, its --config file the operator's
-- (loaded by the host wherever it is, run in the sandbox's environment), answering real
-- HTTP clients on loopback with the mock provider behind it.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local MSGS = { { role = "user", content = "hi" } }

describe("gateway --sandbox", function()
  -- -> its pid, port and log; nil, the log when it did not start (it ended)
  -- (config nil: none; env: the command's environment, "NAME=value ...")
  local function start_gateway(config, db, env)
    local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s %s gateway --sandbox --listen 127.0.0.1:%d %s --store %s > %s 2>&1 & echo $! > %s")
      :format(env or "", helpers.resil, port, config and "--config " .. config or "", db, log, pidfile))
    assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function() if helpers.alive(pid) then os.execute("kill -KILL " .. pid) end end)
    local up = helpers.wait_until(function()
      return helpers.slurp(log):match("listening") ~= nil or not helpers.alive(pid)
    end, 10)
    assert(up, helpers.slurp(log))
    return pid, port, log
  end

  local function new_key(db)
    local add = helpers.run(("%s keys add --name team --store %s"):format(helpers.resil, db))
    assert.are.equal(0, add.code, add.stderr)
    return add.stdout:match("^(sk%-resil%-%S+)\n$")
  end

  -- (a config in a folder of its own, outside every sandbox folder: the operator's file)
  local function config_file(text)
    local dir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. dir)
    return helpers.write(dir .. "/gateway_conf.lua", text)
  end

  it("without --config answers a chat with 200 (the provider from the environment)", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ reply = "served" }))
    finally(function() m:stop() end)
    local db = helpers.tmpname(".db")
    local key = new_key(db)
    local _, port, log = start_gateway(nil, db, ("OPENAI_BASE_URL=%s/v1 OPENAI_API_KEY=sk-test-123456"):format(m.url))
    local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS }),
      headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } }))
    assert.are.equal(200, res.status, res.body .. helpers.slurp(log))
    assert.are.equal("served", json.decode(res.body).choices[1].message.content)
  end)

  it("answers a chat, a stream and an Anthropic message with 200, and a reload runs the config again", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ reply = "served" }))
    finally(function() m:stop() end)
    local db = helpers.tmpname(".db")
    local key = new_key(db)
    local config = config_file(([[
      require("policies.ai").configure("openai", { base_url = %q, api_key = "sk-test-123456" })
      return { key_cache = 0, models = { fast = "openai/gpt-4o-mini" } }
    ]]):format(m.url .. "/v1"))
    local pid, port, log = start_gateway(config, db)
    local base = ("http://127.0.0.1:%d/v1"):format(port)
    local function chat(model, extra)
      local body = { model = model, messages = MSGS }
      for k, v in pairs(extra or {}) do body[k] = v end
      return assert(http.request({ method = "POST", url = base .. "/chat/completions", body = json.encode(body),
        headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json" } }))
    end
    local res = chat("fast")
    assert.are.equal(200, res.status, res.body .. helpers.slurp(log))
    assert.are.equal("served", json.decode(res.body).choices[1].message.content)
    res = chat("fast", { stream = true })
    assert.are.equal(200, res.status, res.body)
    assert.matches("data: %[DONE%]", res.body)
    res = assert(http.request({ method = "POST", url = base .. "/messages",
      body = json.encode({ model = "fast", max_tokens = 16, messages = MSGS }),
      headers = { ["x-api-key"] = key, ["anthropic-version"] = "2023-06-01", ["content-type"] = "application/json" } }))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("served", json.decode(res.body).content[1].text)

    -- a reload (SIGHUP) loads the config again: its new model name serves
    helpers.write(config, helpers.slurp(config):gsub("fast =", "quick ="))
    os.execute("kill -HUP " .. pid)
    assert.is_true(helpers.wait_until(function() return helpers.slurp(log):match("policies reloaded") ~= nil end, 10),
      helpers.slurp(log))
    res = chat("quick")
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("served", json.decode(res.body).choices[1].message.content)
    os.execute("kill -TERM " .. pid)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
  end)

  it("refuses to start with a config that does what the sandbox refuses, naming its file:line", function()
    local made = helpers.tmpname(".made")
    local config = config_file(("local models = {}\nos.execute('touch %s')\nreturn { models = models }\n"):format(made))
    local r = helpers.run(("timeout -s KILL 20 %s gateway --sandbox --listen 127.0.0.1:0 --config %s --store %s")
      :format(helpers.resil, config, helpers.tmpname(".db")))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.is_nil(r.stdout:match("listening"))
    assert.matches(config:gsub("%p", "%%%0") .. ":2: os%.execute is not allowed in the sandbox", r.stderr)
    assert.is_nil(io.open(made))
  end)

  it("stops a config that loops at start, saying so (the cap runs under the sandbox)", function()
    local config = config_file("local n = 0\nwhile true do n = n + 1 end\n")
    local r = helpers.run(("timeout -s KILL 60 %s gateway --sandbox --listen 127.0.0.1:0 --config %s --store %s")
      :format(helpers.resil, config, helpers.tmpname(".db")))
    assert.are.equal(1, r.code, r.stdout .. r.stderr)
    assert.matches("the config .*gateway_conf%.lua ran more than 200000000 instructions", r.stderr)
  end)

  -- (before: a sandboxed script on the gateway's store read a client's answer with resil.once_replay,
  -- and its resil.once planted the answer the gateway served a client's request with that key)
  it("keeps its Idempotency-Key answers from a sandboxed script on its store: resil.once of gateway: keys raises", function()
    resil.clock.real()
    resil.log.level("off")
    local m = assert(resil.mock.start({ reply = "the client's private answer" }))
    finally(function() m:stop() end)
    local db = helpers.tmpname(".db")
    local key = new_key(db)
    local id = json.decode(helpers.run(("%s keys list --json --store %s"):format(helpers.resil, db)).stdout)[1].id
    local _, port, log = start_gateway(nil, db, ("OPENAI_BASE_URL=%s/v1 OPENAI_API_KEY=sk-test-123456"):format(m.url))
    local body = json.encode({ model = "openai/gpt-4o-mini", messages = MSGS })
    local res = assert(http.request({ method = "POST", url = ("http://127.0.0.1:%d/v1/chat/completions"):format(port),
      body = body, headers = { authorization = "Bearer " .. key, ["content-type"] = "application/json",
        ["idempotency-key"] = "order-7" } }))
    assert.are.equal(200, res.status, res.body .. helpers.slurp(log))
    local script = helpers.write(helpers.tmpname(".lua"), ([[
local resil = require "resil"
local fingerprint = resil.hash("openai\0" .. %q)
print("replay", pcall(function()
  local found, answer = resil.once_replay({ key = %q, fingerprint = fingerprint })
  return found, resil.json.encode(answer)
end))
print("plant", pcall(function()
  local planted = resil.once({ key = %q, fingerprint = fingerprint }, function() return { forged = true } end)
  return planted
end))
]]):format(body, "gateway:" .. id .. ":order-7", "gateway:" .. id .. ":order-8"))
    local r = helpers.run(("timeout -s KILL 60 %s --sandbox --store %s %s"):format(helpers.resil, db, script))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.not_matches("private answer", r.stdout, nil, true)
    assert.matches("replay\tfalse\t[^\n]*:4: resil.once_replay: key \"gateway:" .. id .. ":order%-7\" is the gateway's",
      r.stdout)
    assert.matches("plant\tfalse\t[^\n]*:8: resil.once: key \"gateway:" .. id .. ":order%-8\" is the gateway's", r.stdout)
  end)

  -- (before: the kernel spread the gateway's connections to a sandboxed script that listened on its port
  -- with reuseport: resil.server.listen's handler was handed a share of the clients' bearer keys, and
  -- resil.metrics.serve answered a share of their requests with a 404)
  for _, case in ipairs({
    { "resil.server.listen", "resil.server.listen({ host = \"127.0.0.1\", port = %d, reuseport = true,\n" ..
      "  handler = function(req) print(\"stolen\", req.headers.authorization) return { status = 200, body = \"stolen\" } end })" },
    { "resil.metrics.serve", "resil.metrics.serve({ host = \"127.0.0.1\", port = %d, reuseport = true })" },
  }) do
    local fn, listen = case[1], case[2]
    it("with --workers keeps its port from a sandboxed script: " .. fn .. " with reuseport raises", function()
      resil.clock.real()
      resil.log.level("off")
      local db = helpers.tmpname(".db")
      local key = new_key(db)
      local port, log, pidfile = helpers.free_port(), helpers.tmpname(".out"), helpers.tmpname(".pid")
      os.execute(("%s gateway --sandbox --workers 2 --listen 127.0.0.1:%d --store %s > %s 2>&1 & echo $! > %s")
        :format(helpers.resil, port, db, log, pidfile))
      assert(helpers.wait_until(function() return helpers.slurp(pidfile):match("%d+") ~= nil end, 10))
      local pid = helpers.slurp(pidfile):match("%d+")
      finally(function() if helpers.alive(pid) then os.execute("kill -TERM " .. pid) end end)
      local url = ("http://127.0.0.1:%d/v1/models"):format(port)
      assert(helpers.wait_until(function()
        local res = http.request({ url = url, headers = { authorization = "Bearer " .. key } })
        return res and res.status == 200
      end, 20), helpers.slurp(log))
      local script, out, spid = helpers.tmpname(".lua"), helpers.tmpname(".out"), helpers.tmpname(".pid")
      helpers.write(script, ("local resil = require \"resil\"\nlocal server = assert(" .. listen .. ")\n" ..
        "print(\"listening\")\nresil.sleep(30)\n"):format(port))
      os.execute(("timeout -s KILL 40 %s --sandbox %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, script, out, spid))
      finally(function()
        local p = helpers.slurp(spid):match("%d+")
        if p and helpers.alive(p) then os.execute("kill -KILL " .. p) end
      end)
      assert(helpers.wait_until(function()
        local text = helpers.slurp(out)
        return text:find("listening", 1, true) or text:find(fn, 1, true)
      end, 20), helpers.slurp(out))
      local served = 0
      for _ = 1, 30 do -- (a connection each: the kernel spreads connections, not requests)
        local res = assert(http.request({ url = url, headers = { authorization = "Bearer " .. key, connection = "close" } }))
        assert.are_not.equal("stolen", res.body)
        if res.status == 200 then served = served + 1 end
      end
      assert.are.equal(30, served)
      assert.matches("%.lua:2: " .. fn:gsub("%.", "%%.") .. ": reuseport is not allowed in the sandbox", helpers.slurp(out))
    end)
  end
end)
