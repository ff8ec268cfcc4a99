-- Secrets never leave the host in text: values read through resil.secret,
-- and URL query parameters named like credentials, are redacted wherever the
-- host formats a message (stderr, tostring of errors, logs, metrics, the
-- store, `runs show`). Most of these run a real process with the secret in
-- its environment, as a user would.
local resil = require "resil"
local helpers = require "spec.helpers"

local KEY = "sk-live-Zq8f3kP2xV"
local ENV = "RESIL_TEST_KEY=" .. KEY .. " "

-- run source as a script with the secret in the environment
local function run(source, opts)
  local path = helpers.write(helpers.tmpname(".lua"), source)
  local r = helpers.run(("%s%s %s %s"):format(ENV, helpers.resil, opts or "", path))
  os.remove(path)
  return r
end

local function refute_key(text)
  assert.is_nil(text:find(KEY, 1, true), "the secret was printed:\n" .. text)
end

describe("resil.redact", function()
  it("replaces registered secrets and credential query parameters, nothing else", function()
    resil.log.redact("vault-value-123456")
    assert.are.equal("token [REDACTED] used", resil.redact("token vault-value-123456 used"))
    assert.are.equal("https://x/v1?key=[REDACTED]&model=m#top", resil.redact("https://x/v1?key=abc123&model=m#top"))
    assert.are.equal("GET /a?API_KEY=[REDACTED] failed", resil.redact("GET /a?API_KEY=abc failed"))
    assert.are.equal("/a?x=1&access_token=[REDACTED]&sig=[REDACTED]",
      resil.redact("/a?x=1&access_token=t0k&sig=s1g"))
    assert.are.equal("/a?monkey=1&keys=2&key=", resil.redact("/a?monkey=1&keys=2&key="))
    -- GitLab's private_token, the auth_token many APIs take, a header's name used as a parameter
    assert.are.equal("/a?private_token=[REDACTED]&authToken=[REDACTED]&x-api-key=[REDACTED]&pwd=[REDACTED]&sort=k",
      resil.redact("/a?private_token=glpat-1&authToken=t2&x-api-key=k3&pwd=p4&sort=k"))
    assert.are.equal("redis://:[REDACTED]@127.0.0.1:6379/0 and https://me:[REDACTED]@x/",
      resil.redact("redis://:hunter22@127.0.0.1:6379/0 and https://me:pw@x/"))
    assert.are.equal("http://127.0.0.1:8080/a@b", resil.redact("http://127.0.0.1:8080/a@b"))
    -- a user name without a password is the credential: GitHub's token, Stripe's key with an empty password
    assert.are.equal("https://[REDACTED]@github.com/o/r.git https://[REDACTED]:@api.stripe.com/v1",
      resil.redact("https://ghp_Tok3n123456@github.com/o/r.git https://sk_test_4eC39Hq:@api.stripe.com/v1"))
    assert.are.equal("https://[REDACTED]@o1.ingest.sentry.io/5",
      resil.redact("https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/5"))
    -- a plain user name is no credential: kept (it was redacted, mangling every ssh and database URL)
    for _, plain in ipairs({ "ssh://git@github.com/org/repo.git", "git+ssh://git@github.com/o/r",
      "postgres://app@db.internal:5432/x", "https://jane.doe@example.com/" }) do
      assert.are.equal(plain, resil.redact(plain))
    end
    -- a redis URL's password runs to its last "@", as the store reads it
    assert.are.equal("redis://:[REDACTED]@h:6379/0 redis://u:[REDACTED]@h redis://[REDACTED]@h/1",
      resil.redact("redis://:a/b?c#d@e@h:6379/0 redis://u:p@w@h redis://only@h/1"))
    assert.are.equal("plain text", resil.redact("plain text"))
  end)

  it("with \"secrets\", leaves query parameters alone", function()
    resil.log.redact("vault-value-123456")
    assert.are.equal("?sig=abc [REDACTED]", resil.redact("?sig=abc vault-value-123456", "secrets"))
  end)

  it("finds a secret in its JSON-escaped form too", function()
    resil.log.redact("tok/en\"value+1")
    local json = resil.json.encode({ t = "tok/en\"value+1" })
    assert.are.equal('{"t":"[REDACTED]"}', resil.redact(json, "secrets"))
  end)

  it("finds a secret percent-encoded in a URL, as an error names it", function()
    -- a base64 key (AWS, Azure) holds "/", "+" and "=": a URL carries it encoded
    resil.log.redact("aK3/x+Yz9w==")
    assert.are.equal("/v1/[REDACTED]/a /v1/[REDACTED]/b", resil.redact("/v1/aK3%2Fx%2BYz9w%3D%3D/a /v1/aK3%2fx%2bYz9w%3d%3d/b"))
    local _, err = resil.http.request({ url = "http://127.0.0.1:1/v1/files/aK3%2Fx%2BYz9w%3D%3D", timeout = 5 })
    assert.matches("^connect: http://127.0.0.1:1/v1/files/%[REDACTED%]: ", tostring(err))
  end)

  it("finds a secret written with escapes: JSON's, a URL's in part, twice over", function()
    resil.log.redact("sk-esc-Qw3Er5Ty7")
    resil.log.redact("aK3/x+Yz9w==")
    resil.log.redact("cl\u{e9}-secr\u{e8}te-\u{1F600}")
    for _, written in ipairs({
      [[{"error":"bad key \u0073k-esc-Qw3Er5Ty7"}]], -- any character may be escaped in JSON
      [[\u0073\u006b\u002d\u0065\u0073\u0063\u002d\u0051\u0077\u0033\u0045\u0072\u0035\u0054\u0079\u0037]],
      [[{"body":"{\"error\":\"bad key \\u0073k-esc-Qw3Er5Ty7\"}"}]], -- a JSON body quoted in JSON
      "/v1/files/aK3/x%2BYz9w%3D%3D", -- Python's quote() leaves "/" as it is
      "/v1/files/%61K3%2fx%2bYz9w==", -- a character that needs none encoded all the same
      "/v1/files/aK3%252Fx%252BYz9w%253D%253D", -- encoded twice
      [[{"u":"cl\u00e9-secr\u00E8te-\ud83d\ude00"}]], -- not ASCII, a surrogate pair
    }) do
      local redacted = resil.redact(written, "secrets")
      assert.matches("[REDACTED]", redacted, 1, true)
      for _, part in ipairs({ "Qw3Er5Ty7", "Yz9w", "secr" }) do
        assert.is_nil(redacted:find(part, 1, true), written .. " -> " .. redacted)
      end
    end
    assert.are.equal([[{"error":"bad key [REDACTED]"} and \u0041 %41 %zz \q \]],
      resil.redact([[{"error":"bad key \u0073k-esc-Qw3Er5Ty7"} and \u0041 %41 %zz \q \]], "secrets"))
    assert.are.equal("/a/[REDACTED]?x=%2F", resil.redact("/a/aK3/x%2BYz9w%3D%3D?x=%2F", "secrets"))
  end)

  it("reads a megabyte of backslashes that start no escape once, not again from each of them", function()
    -- (read again from each backslash of a run, a log line of such a body held its process for
    -- minutes; bounded here by timeout(1), not timed: it takes milliseconds)
    local r = helpers.run("timeout -s KILL 60 " .. helpers.resil .. " -e '"
      .. [[local r = require "resil"; r.log.redact("sk-live-123456")
        local s = ("\\"):rep(1000000) .. "x" .. ("\\"):rep(1000) .. "u0073k-live-123456"
        io.write(#r.redact(s), " ", r.redact(s):sub(-20))]] .. "'")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("1000011 " .. ("\\"):rep(9) .. "x[REDACTED]", r.stdout) -- (the escape's backslashes with it)
  end)

  it("finds a secret read with whitespace around it as it is sent: without it", function()
    -- (a .env line's trailing space, a mounted file's newline: a header's value reaches the
    -- provider trimmed, and the key its 401 echoed was printed whole)
    resil.log.redact(" sk-ws-Qz7Key123456 \t")
    resil.log.redact("vault-nl-Key987654\n")
    assert.are.equal("key: [REDACTED], [REDACTED].", resil.redact("key: sk-ws-Qz7Key123456, vault-nl-Key987654.", "secrets"))
  end)

  it("redacts overlapping and repeated secrets whole", function()
    resil.log.redact("abcdef-111111")
    resil.log.redact("111111-ghijkl")
    assert.are.equal("<[REDACTED]> [REDACTED]", resil.redact("<abcdef-111111-ghijkl> abcdef-111111"))
  end)

  it("ignores secrets shorter than 6 bytes, and refuses to register them by hand", function()
    assert.has_error(function() resil.log.redact("abcde") end)
    local r = helpers.run("RESIL_SHORT=abcde " .. helpers.resil .. " -e '"
      .. [[local r = require "resil"; print(r.secret("RESIL_SHORT")); print(r.redact("x abcde y"))]] .. "'")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("abcde\nx abcde y\n", r.stdout)
    assert.matches("shorter than 6", r.stderr)
  end)
end)

describe("secrets read through resil.secret", function()
  it("stay usable in the URL and headers sent to the provider", function()
    local seen
    local server = resil.server.listen({ port = 0, handler = function(req)
      seen = { query = req.query, auth = req.headers.authorization }
      return { status = 200, body = "ok" }
    end })
    resil.log.redact(KEY)
    local url = ("http://127.0.0.1:%d/v1?key=%s"):format(server:port(), KEY)
    local res = assert(resil.http.request({ url = url,
      headers = { authorization = "Bearer " .. KEY } }))
    server:close()
    assert.are.equal(200, res.status)
    assert.are.equal("key=" .. KEY, seen.query)
    assert.are.equal("Bearer " .. KEY, seen.auth)
  end)

  it("are not printed on stderr when a script fails", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      error("boom " .. KEY)
    ]])
    assert.are.equal(1, r.code)
    assert.matches("boom [REDACTED]", r.stderr, 1, true)
    assert.matches("stack traceback", r.stderr, 1, true)
    refute_key(r.stderr)
  end)

  it("are not printed in the message of a task that failed and was never joined", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      resil.spawn(function() error("task boom " .. KEY) end)
      resil.sleep(0)
      collectgarbage()
      collectgarbage()
    ]])
    assert.matches("never joined", r.stderr, 1, true)
    assert.matches("task boom [REDACTED]", r.stderr, 1, true)
    refute_key(r.stderr)
  end)

  it("are not in tostring(err) of a request whose URL carries them, nor in assert(res, err)", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      local res, err = resil.http.request({ url = "http://127.0.0.1:1/v1/models?key=" .. KEY, connect_timeout = 2 })
      print(tostring(err))
      print(err.message)
      assert(res, err)
    ]])
    assert.are.equal(1, r.code)
    assert.matches("connect: http://127.0.0.1:1/v1/models?key=[REDACTED]", r.stdout, 1, true)
    assert.matches("?key=[REDACTED]", r.stderr, 1, true)
    refute_key(r.stdout)
    refute_key(r.stderr)
  end)

  it("are not in the message of a misuse error naming the URL", function()
    local ok, err = pcall(resil.http.request, { url = "http://bad host/?key=" .. KEY })
    assert.is_false(ok)
    assert.matches("bad url 'http://bad host/?key=[REDACTED]'", err, 1, true)
  end)

  it("are not in tostring of error values made by scripts", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      print(tostring(resil.error("auth", "rejected key " .. KEY, { status = 401 })))
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("auth: rejected key [REDACTED] (status 401)\n", r.stdout)
  end)

  it("are not in log lines, nor are credential query parameters", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      resil.log.info("GET https://api.example.com/v1?api_key=plain-value-1&n=2", { url = "/x?token=" .. KEY })
    ]])
    assert.are.equal(0, r.code, r.stderr)
    local line = assert(resil.json.decode(r.stderr:match("[^\n]+")))
    assert.are.equal("GET https://api.example.com/v1?api_key=[REDACTED]&n=2", line.msg)
    assert.are.equal("/x?token=[REDACTED]", line.url)
    refute_key(r.stderr)
  end)

  it("are not exported in metric labels or help", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      local c = resil.metrics.counter("calls_total", "Calls made with " .. KEY)
      c:inc({ key = KEY })
      c:inc({ key = KEY })
      c:labels({ url = "https://x/?sig=abcdef" }):inc()
      io.write(resil.metrics.text())
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('calls_total{key="[REDACTED]"} 2', r.stdout, 1, true)
    assert.matches('calls_total{url="https://x/?sig=[REDACTED]"} 1', r.stdout, 1, true)
    assert.matches("# HELP calls_total Calls made with [REDACTED]", r.stdout, 1, true)
    refute_key(r.stdout)
  end)

  it("are not printed as log field names, and are refused as metric or label names", function()
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      resil.log.info("m", { [KEY] = 1, nested = { [KEY] = 2 } })
      local NAME = KEY:gsub("%W", "_") -- a secret that is a valid metric and label name
      resil.log.redact(NAME)
      local c = resil.metrics.counter("calls_total", "h")
      print(pcall(c.inc, c, { [NAME] = "v" }))
      print(pcall(resil.metrics.counter, NAME, "h"))
    ]])
    assert.are.equal(0, r.code, r.stderr)
    assert.matches('"[REDACTED]":1', r.stderr, 1, true)
    assert.matches("false\t.-a label name holds a secret", r.stdout)
    assert.matches("false\t.-a metric name holds a secret", r.stdout)
    refute_key(r.stderr)
    refute_key(r.stdout)
  end)

  it("are refused as step results and once keys: the SQLite file and runs show never hold them", function()
    local db = helpers.tmpname(".db")
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      resil.step("fetch https://x/v1?token=plain-token-9", function() return { ok = true } end)
      local ok, err = pcall(function()
        resil.step("request", function() return { headers = { authorization = "Bearer " .. KEY } } end)
      end)
      print(ok, err)
      print(pcall(resil.step, "named " .. KEY, function() return 1 end))
      print(pcall(resil.once, "once-key", function() return "echo " .. KEY end))
      print(pcall(resil.once, "user:" .. KEY, function() return 1 end)) -- (a call keyed by a token)
    ]], "--store " .. db .. " --run secret-run")
    assert.are.equal(0, r.code, r.stderr)
    assert.matches("false\t%S+:5: resil.step: cannot checkpoint the results: they contain a value read through "
      .. "resil.secret", r.stdout)
    assert.matches("false\t.*resil.step: the step's name contains a value read through resil.secret", r.stdout)
    assert.matches("false\t.*resil.once: cannot store the results: they contain a value read through resil.secret",
      r.stdout)
    assert.matches("false\t.*resil.once: the key contains a value read through resil.secret", r.stdout)
    refute_key(r.stdout)
    refute_key(r.stderr)
    local dump = helpers.run(("sqlite3 %s .dump"):format(db))
    assert.are.equal(0, dump.code, dump.stderr)
    assert.matches("plain-token-9", dump.stdout, 1, true) -- the store holds what it was given
    refute_key(dump.stdout)
    local show = helpers.run(("%s runs show secret-run --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr)
    assert.matches("fetch https://x/v1?token=[REDACTED]", show.stdout, 1, true)
    assert.is_nil(show.stdout:find("plain-token-9", 1, true))
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(db .. suffix) end
  end)

  it("a Redis URL's password, with / or @ in it, is not printed by runs, runs show or budgets", function()
    local server = helpers.redis_server()
    local password = "pw/with+slash@and=at"
    assert(os.execute(("redis-cli -p %d CONFIG SET requirepass '%s' > /dev/null"):format(server.port, password)))
    local function store(db) return ("redis://:%s@127.0.0.1:%d/%d"):format(password, server.port, db) end
    local function refute_password(text) assert.is_nil(text:find("with+slash", 1, true), text) end
    local r = run([[
      local resil = require "resil"
      resil.step("one", function() return 1 end)
      error("stopped before the end") -- a run that did not finish: runs show prints how to resume it
    ]], ("--store '%s' --run redis-secret-run"):format(store(1)))
    assert.are.equal(1, r.code, r.stderr)
    refute_password(r.stderr)
    local outputs = {}
    for _, cmd in ipairs({ "runs show redis-secret-run --store '%s'", "runs --store '%s'", "budgets --store '%s'" }) do
      for _, db in ipairs({ 1, 2 }) do -- (2: empty, "no runs recorded in <store>")
        local out = helpers.run(helpers.resil .. " " .. cmd:format(store(db)))
        outputs[#outputs + 1] = out.stdout .. out.stderr
        refute_password(out.stdout)
        refute_password(out.stderr)
      end
    end
    server.stop()
    local all = table.concat(outputs, "\n")
    assert.matches("resume: resil-lua --store redis://:[REDACTED]@127.0.0.1:", all, 1, true)
    assert.matches("no runs recorded in redis://:[REDACTED]@127.0.0.1:", all, 1, true)
    assert.matches("no budgets recorded in redis://:[REDACTED]@127.0.0.1:", all, 1, true)
  end)

  it("are not stored with a failed step's error, nor printed by runs show in another process", function()
    local db = helpers.tmpname(".db")
    local r = run([[
      local resil = require "resil"
      local KEY = assert(resil.secret("RESIL_TEST_KEY"))
      -- a plain string error (tostring leaves it as it is), and one whose
      -- secret straddles the 2000 bytes the store keeps of an error
      assert(not pcall(resil.step, "short", function() error("401 for key " .. KEY, 0) end))
      assert(not pcall(resil.step, "long", function() error(("x"):rep(1995) .. KEY, 0) end))
    ]], "--store " .. db .. " --run failed-secret-run")
    assert.are.equal(0, r.code, r.stderr)
    refute_key(r.stderr)
    local dump = helpers.run(("sqlite3 %s .dump"):format(db))
    assert.are.equal(0, dump.code, dump.stderr)
    assert.matches("401 for key [REDACTED]", dump.stdout, 1, true)
    assert.is_nil(dump.stdout:find(KEY:sub(1, 5), 1, true), "part of the secret was stored:\n" .. dump.stdout)
    local show = helpers.run(("%s runs show failed-secret-run --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr)
    assert.matches("401 for key [REDACTED]", show.stdout, 1, true)
    assert.is_nil(show.stdout:find(KEY:sub(1, 5), 1, true), "part of the secret was printed:\n" .. show.stdout)
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(db .. suffix) end
  end)
end)

-- A provider that echoes the key it was sent in its error (a proxy's 401, a FastAPI detail):
-- the text is cut to an excerpt for the error's message and the gateway's client. Cut before it
-- was redacted, a key straddling the cut was no longer the secret, and its first bytes were shown.
describe("a provider's error that echoes the key", function()
  local PROVIDER_KEY = "sk-proj-Echo7Kq2Wm9Xv4Lp8Rt3Zy6"
  local PREFIX = PROVIDER_KEY:sub(1, 12)

  -- a mock whose chat route answers status with body(key); ai configured on it with the key
  local function start(status, body)
    resil.clock.real()
    resil.store_config({ url = helpers.tmpname(".db") })
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function(req)
      local key = (req.headers.authorization or ""):gsub("^Bearer ", "")
      return { status = status, headers = { ["content-type"] = "application/json" }, body = body(key) }
    end } }))
    local gateway, ai = helpers.fresh_gateway()
    for k in pairs(gateway.config) do gateway.config[k] = nil end
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = PROVIDER_KEY, retry = { max_retries = 0 } })
    finally(function() m:stop() end)
    return gateway, ai
  end

  local function refute_prefix(text)
    assert.is_nil(text:find(PREFIX, 1, true), "part of the key was shown:\n" .. text)
  end

  it("is not shown in part by the error's message where the excerpt cuts it", function()
    local _, ai = start(401, function(key) return resil.json.encode({ detail = ("x"):rep(180) .. key }) end)
    local _, err = ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = { { role = "user", content = "hi" } } })
    assert.are.equal("auth", err.kind)
    refute_prefix(err.message)
    refute_prefix(tostring(err))
  end)

  it("is not shown in part by a stream's error naming an event that is not JSON", function()
    local _, ai = start(200, function() return "" end)
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function(req)
      local key = (req.headers.authorization or ""):gsub("^Bearer ", "")
      return { status = 200, headers = { ["content-type"] = "text/event-stream" },
        body = "data: " .. ("x"):rep(50) .. " rejected key " .. key .. "\n\n" }
    end } }))
    finally(function() m:stop() end)
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = PROVIDER_KEY, retry = { max_retries = 0 } })
    local s = assert(ai.stream({ model = "openai/gpt-4o-mini-2024-07-18", messages = { { role = "user", content = "hi" } } }))
    local chunk, err = s:next()
    assert.is_nil(chunk)
    assert.matches("an event that is not JSON", err.message, 1, true)
    refute_prefix(err.message)
  end)

  it("is not shown in part by jobs.configure's refusal of a base_url with credentials", function()
    local jobs = require "policies.jobs"
    local ok, err = pcall(jobs.configure, "fal", { base_url = ("https://h.example/" .. ("x"):rep(30)
      .. " https://user:" .. PROVIDER_KEY .. "@h"), api_key = "fal-key-123456" })
    assert.is_false(ok)
    refute_prefix(tostring(err))
  end)

  it("is not shown, whole or in part, to the gateway's client in its error's message, code or param", function()
    -- (a 400: the upstream's own message, code and param are relayed)
    local gateway = start(400, function(key)
      return resil.json.encode({ error = { message = ("x"):rep(1990) .. key, code = "bad_key:" .. key,
        param = "key=" .. key .. "&" } })
    end)
    resil.log.level("off")
    gateway.configure({ auth = false, key_cache = 0, models = {} })
    local s = gateway.serve({ listen = "127.0.0.1:0" })
    finally(function() s:close() resil.log.level("info") end)
    local res = assert(resil.http.request({ method = "POST",
      url = ("http://127.0.0.1:%d/v1/chat/completions"):format(s:port()),
      headers = { ["content-type"] = "application/json" },
      body = resil.json.encode({ model = "openai/gpt-4o-mini-2024-07-18", messages = { { role = "user", content = "hi" } } }) }))
    assert.are.equal(400, res.status, res.body)
    refute_prefix(res.body)
    assert.matches("bad_key:[REDACTED]", res.body, 1, true)
  end)
end)

describe("a provider's error that echoes the key JSON-escaped", function()
  it("is not printed by a log line of the error, its response's body held as it came", function()
    local KEY = "sk-proj-Esc4Kq2Wm9Xv4Lp8Rt3Zy6"
    resil.clock.real()
    local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function(req)
      local key = (req.headers.authorization or ""):gsub("^Bearer ", "")
      -- (the "s" written \u0073, as an encoder that escapes more than it must may write it)
      return { status = 401, headers = { ["content-type"] = "application/json" },
        body = '{"error":{"message":"Incorrect API key provided: \\u0073' .. key:sub(2) .. '"}}' }
    end } }))
    finally(function() m:stop() end)
    local _, ai = helpers.fresh_gateway()
    ai.configure("openai", { base_url = m.url .. "/v1", api_key = KEY, retry = { max_retries = 0 } })
    local _, err = ai.chat({ model = "openai/gpt-4o-mini-2024-07-18", messages = { { role = "user", content = "hi" } } })
    assert.are.equal("auth", err.kind)
    local path = helpers.tmpname(".log")
    resil.log.output(path)
    resil.log.error("chat failed", { err = err })
    resil.log.output("stderr")
    local text = helpers.slurp(path)
    os.remove(path)
    assert.matches("Incorrect API key provided: [REDACTED]", text, 1, true)
    assert.is_nil(text:find(KEY:sub(2, 13), 1, true), "the key was logged:\n" .. text)
    assert.is_nil(tostring(err):find(KEY:sub(2, 13), 1, true), tostring(err))
  end)
end)

describe("a command line refused", function()
  it("does not print the password of a URL given as --store=URL (or as an argument too many)", function()
    local url = "redis://:cli-Pa55w0rd-9@127.0.0.1:1/0"
    for _, cmd in ipairs({ "--store=%s x.lua", "check --store=%s", "mock --store=%s", "gateway --store=%s",
      "gateway --listen 127.0.0.1:0 %s", "--log-level 'x?token=cli-Pa55w0rd-9'" }) do
      local r = helpers.run(helpers.resil .. " " .. cmd:format(url))
      assert.are_not.equal(0, r.code, cmd)
      assert.matches("[REDACTED]", r.stderr, 1, true)
      assert.is_nil(r.stderr:find("Pa55w0rd", 1, true), cmd .. " printed the password:\n" .. r.stderr)
    end
  end)
end)

describe("a key given as a script's argument and registered", function()
  it("is not kept in the run's row, nor printed by runs show's resume line in another process", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
      local resil = require "resil"
      resil.log.redact(arg[1])
      resil.step("a", function() return 1 end)
      error("stop")
    ]])
    local r = helpers.run(("%s --log-level off --store %s --run arg-secret-run %s %s plain-arg"):format(helpers.resil, db,
      script, KEY))
    assert.are.equal(1, r.code, r.stderr)
    local dump = helpers.run(("sqlite3 %s .dump"):format(db))
    assert.are.equal(0, dump.code, dump.stderr)
    assert.is_nil(dump.stdout:find(KEY, 1, true), "the store kept the key:\n" .. dump.stdout)
    local show = helpers.run(("%s runs show arg-secret-run --store %s"):format(helpers.resil, db))
    assert.are.equal(0, show.code, show.stderr)
    refute_key(show.stdout)
    assert.matches("resume: [^\n]* %-%-run arg%-secret%-run [^\n]* '?%[REDACTED%]'? plain%-arg\n", show.stdout)
    os.remove(script)
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(db .. suffix) end
  end)
end)
