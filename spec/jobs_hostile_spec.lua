-- policies/jobs.lua and its adapters given hostile names by their caller (a voice, a format or a
-- model string from an app's user): each stays the one path segment or query value it names, so
-- the API key goes with the request asked for and with no other, from a real loopback server.
local resil = require "resil"
local helpers = require "spec.helpers"
local jobs = require "policies.jobs"

-- a server answering every request with audio, and the requests it saw ("METHOD path?query")
local function server()
  local seen = {}
  local s = assert(resil.server.listen({ handler = function(req)
    seen[#seen + 1] = req.method .. " " .. req.path .. (req.query ~= "" and ("?" .. req.query) or "")
    return { status = 200, headers = { ["content-type"] = "audio/mpeg", ["request-id"] = "rq" }, body = "ID3 audio" }
  end }))
  finally(function() s:close() end)
  local url = ("http://127.0.0.1:%d"):format(s:port())
  jobs.configure("elevenlabs", { base_url = url, api_key = "xi_hostile_key_01" })
  jobs.configure("fal", { base_url = url, api_key = "fal_hostile_key_01", poll = { first = 1 } })
  jobs.configure("replicate", { base_url = url .. "/v1", api_key = "r8_hostile_token_01", poll = { first = 1 } })
  return seen
end

describe("a hostile name in a job or a speech", function()
  before_each(function()
    resil.clock.virtual()
    resil.store_config({ url = helpers.tmpname(".db") })
  end)

  -- (before: the voice and the format went into the URL as they came: "../../v1/user" was a POST
  -- to /v1/user with the key and the text, "a?b=c" and "a#b" other requests, a line break a Lua
  -- error from inside the HTTP client)
  it("ElevenLabs: a voice or an output_format is one path segment, one query value", function()
    local seen = server()
    local asked = { { "../../v1/user", "mp3_44100_128" }, { "a?b=c", "mp3_44100_128" }, { "a#b", "mp3_44100_128" },
      { "x\r\nX-Evil: 1", "mp3_44100_128" }, { "JBFqnCBsd6RMkjVDRZzb", "mp3_44100_128&enable_logging=false" } }
    for _, a in ipairs(asked) do
      local ok, r, err = pcall(jobs.speech, { model = "elevenlabs/eleven_flash_v2_5", voice = a[1], text = "Hello",
        output_format = a[2] })
      assert.is_true(ok, r)
      assert(r, err and tostring(err))
    end
    assert.are.equal(#asked, #seen)
    for _, s in ipairs(seen) do
      assert.matches("^POST /v1/text%-to%-speech/[%w%%_%-~]+%?output_format=[%w%%_%-~]+$", s)
    end
    assert.are.equal("POST /v1/text-to-speech/%2E%2E%2F%2E%2E%2Fv1%2Fuser?output_format=mp3_44100_128", seen[1])
    assert.are.equal("POST /v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb?output_format=mp3_44100_128%26enable_logging%3Dfalse",
      seen[5])
    -- a format that is no string is the caller's mistake, said at its line
    local ok, err = pcall(function()
      local r = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v", text = "t", output_format = {} })
      return r
    end)
    assert.is_false(ok)
    assert.matches("jobs_hostile_spec.lua:%d+: ai.speech: output_format must be a string", err)
  end)

  -- (before: a 200 page, a captive portal's or a proxy's, was returned as the audio and recorded as
  -- the text's characters billed, though the provider never had the request)
  it("ElevenLabs: a 200 that is a page, not audio, is no speech: said, nothing recorded", function()
    local ctypes = { "text/html; charset=utf-8", "TEXT/PLAIN", "application/xhtml+xml" }
    local n = 0
    local s = assert(resil.server.listen({ handler = function()
      n = n + 1
      return { status = 200, headers = { ["content-type"] = ctypes[n] }, body = "<html>Sign in to the network</html>" }
    end }))
    finally(function() s:close() end)
    jobs.configure("elevenlabs", { base_url = ("http://127.0.0.1:%d"):format(s:port()), api_key = "xi_hostile_key_01" })
    for _, ctype in ipairs(ctypes) do
      local r, err = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "JBFqnCBsd6RMkjVDRZzb",
        text = "Hello there" })
      assert.is_nil(r, ctype)
      assert.are.equal("invalid_output", err.kind)
      assert.matches("not audio", err.message)
    end
    assert.are.same({}, resil.cost.breakdown("model"))
  end)

  -- (before: "fal/fal-ai/flux/../../../admin" was a POST with the key to /admin, "fal/fal-ai/flux?x=1"
  -- another request, and one with a space a Lua error from inside the HTTP client)
  it("fal and Replicate: a model whose path leaves its endpoint is refused at the caller's line, nothing sent",
    function()
      local seen = server()
      for _, model in ipairs({ "fal/fal-ai/flux/../../../admin", "fal/fal-ai/..", "fal/fal-ai/flux?x=1",
        "fal/fal-ai/flux#x", "fal/fal-ai/flux/a b", "fal/fal-ai/flux/x\r\ny", "fal/fal-ai/flux/", "fal/./flux",
        "replicate/../..:abc123", "replicate/acme/..", "replicate/./x" }) do
        local ok, err = pcall(function()
          local r = jobs.job({ model = model, input = { prompt = "x" }, attempts = 1, deadline = 2 })
          return r
        end)
        assert.is_false(ok, model)
        assert.matches("jobs_hostile_spec.lua:%d+: ai.job: %a+ model must be", err)
      end
      assert.are.same({}, seen)
      -- names with dots in them are names
      helpers.logged(function() -- (answered with audio: a submit that cannot be read, said)
        jobs.job({ model = "fal/fal-ai/flux-pro/v1.1-ultra", input = { prompt = "x" }, attempts = 1, deadline = 2 })
      end)
      assert.are.equal("POST /fal-ai/flux-pro/v1.1-ultra", seen[1])
    end)
end)

describe("job options that cannot be meant", function()
  before_each(function()
    resil.clock.virtual()
    resil.store_config({ url = helpers.tmpname(".db") })
  end)

  -- (before: a deadline of NaN made the job and then neither read nor canceled it, ever; "soon" made
  -- it, paid, and raised from inside jobs.lua; attempts = 0 raised "attempt to index a nil value",
  -- NaN made jobs without end; a poll of 0 s read the job in a tight loop until its deadline)
  it("are refused at the caller's line, before any job is made", function()
    -- (a job that runs until its 52nd status read is refused: a tight loop ends, said)
    local reads = {}
    for i = 1, 51 do reads[i] = "ok" end
    reads[52] = 401
    -- (a deadline of math.huge or 1e300 made the job, paid, then raised from inside jobs.lua: its end
    -- no date to log, and a job that hangs waited on for ever)
    local cases = { { deadline = 0 / 0 }, { deadline = "soon" }, { deadline = -5 }, { deadline = math.huge },
      { deadline = 1e300 }, { deadline = 366 * 86400 }, { attempts = 0 },
      { attempts = 0 / 0 }, { attempts = 1.5 }, { attempts = math.huge }, { attempts = "2" }, { wait = "x" },
      { wait = 0 / 0 }, { poll = { first = 0 } }, { poll = { factor = 0.5 } }, { poll = { max = 0 / 0 } },
      -- (a poll that is no table, `poll = "fast"`, is refused at jobs.configure's own line: below)
      -- (a key that is a table, `key = item` for `item.id`, was its address: another in the resumed
      -- run, which made and paid the job again; "" was one key for every such call)
      { key = { id = 1 } }, { key = "" }, { key = print }, { key = 0 / 0 } }
    for _, case in ipairs(cases) do
      local m = resil.mock.start({ jobs = { stuck = 1, errors = { prediction = reads } } })
      finally(function() m:stop() end)
      local conf = { base_url = m.url .. "/v1", api_key = "r8_hostile_token_01", poll = case.poll }
      jobs.configure("replicate", conf)
      local spec = { model = "replicate/black-forest-labs/flux-schnell", input = { prompt = "x" }, deadline = 60,
        attempts = 1 }
      for k, v in pairs(case) do if k ~= "poll" then spec[k] = v end end
      local task = resil.spawn(function()
        return pcall(function()
          local r = jobs.job(spec)
          return r
        end)
      end)
      local done, ok, err = task:join(3600) -- (virtual: a job never read nor canceled is not waited for)
      if done == nil then task:cancel() end
      local name, v = next(case)
      assert.is_true(done, ("%s = %s: still running after an hour"):format(name, tostring(v)))
      assert.is_false(ok, ("%s = %s was taken"):format(name, tostring(v)))
      assert.matches("jobs_hostile_spec.lua:%d+: ai.job: [%w_.]+ must be", err)
      assert.is_nil(m:stats().routes.predictions) -- nothing made, nothing paid
    end
    -- what can be meant is taken: a deadline, a wait and a poll of a fraction of a second
    local m = resil.mock.start({ jobs = { stuck = 1 } })
    finally(function() m:stop() end)
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = "r8_hostile_token_01",
      poll = { first = 0.05, factor = 1, max = 0.05 } })
    helpers.logged(function()
      local _, err = jobs.job({ model = "replicate/black-forest-labs/flux-schnell", input = { prompt = "x" },
        deadline = 0.5, attempts = 1, wait = 0 })
      assert.are.equal("deadline", err.kind)
    end)
  end)
end)

describe("a job input that cannot be sent", function()
  before_each(function()
    resil.clock.virtual()
    resil.store_config({ url = helpers.tmpname(".db") })
  end)

  -- (before: a Lua error from inside the HTTP client: "policies/call.lua:314: http request: cannot
  -- encode 'json'"; with a budget, "budget:reserve: estimate must be a number" from inside jobs.lua)
  it("is refused at the caller's line, nothing sent", function()
    local m = resil.mock.start({ jobs = { polls = 0 } })
    finally(function() m:stop() end)
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = "r8_hostile_token_01" })
    resil.budget("hostile-input", { limit = 10 })
    for _, input in ipairs({ { prompt = "x", duration = 1 / 0 }, { prompt = 0 / 0 }, { prompt = print } }) do
      for _, budget in ipairs({ false, "hostile-input" }) do
        local ok, err = pcall(function()
          local r = jobs.job({ model = "replicate/bytedance/seedance-1-lite", input = input, budget = budget or nil })
          return r
        end)
        assert.is_false(ok)
        assert.matches("jobs_hostile_spec.lua:%d+: ai.job: input cannot be sent as JSON", err)
      end
    end
    assert.is_nil(m:stats().routes.predictions)
  end)
end)

describe("a job made under another base_url", function()
  before_each(function()
    resil.clock.virtual()
    resil.store_config({ url = helpers.tmpname(".db") })
  end)

  -- (before: a URL the old host answered on itself but off base_url's path was kept as it was:
  -- the resumed call sent the key of now to the old host)
  it("is read under the base_url of now, none of its URLs left on the old host", function()
    local json = resil.json
    local old_seen, new_seen = {}, {}
    local old = assert(resil.server.listen({ handler = function(req)
      old_seen[#old_seen + 1] = req.method .. " " .. req.path
      local here = "http://" .. req.headers.host
      if req.method == "POST" then
        return { status = 201, body = json.encode({ id = "p1", status = "starting",
          urls = { get = here .. "/elsewhere/p1", cancel = here .. "/elsewhere/p1/cancel" } }) }
      end
      return { status = 403, body = '{"detail":"forbidden"}' } -- (the call ends; the job is the run's)
    end }))
    finally(function() old:close() end)
    local new = assert(resil.server.listen({ handler = function(req)
      new_seen[#new_seen + 1] = req.method .. " " .. req.path
      return { status = 200, body = '{"id":"p1","status":"succeeded","output":["https://x/a.png"]}' }
    end }))
    finally(function() new:close() end)
    local spec = { model = "replicate/acme/video:abc123", input = { prompt = "x" }, key = "moved-elsewhere" }
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(old:port()),
      api_key = "r8_hostile_token_01", poll = { first = 1 } })
    local r, err = jobs.job(spec)
    assert.is_nil(r)
    assert.are.equal(403, err.status)
    assert.are.same({ "POST /v1/predictions", "GET /elsewhere/p1" }, old_seen)
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(new:port()),
      api_key = "r8_hostile_token_01", poll = { first = 1 } })
    helpers.logged(function() r = assert(jobs.job(spec)) end)
    assert.are.equal("p1", r.id)
    assert.are.same({ "GET /v1/predictions/p1" }, new_seen)
    assert.are.equal(2, #old_seen) -- nothing more went to the old host
  end)
end)

describe("a provider's configuration that cannot be used", function()
  -- (before: a key too short to be redacted raised "bad argument #1 to 'redact'" from inside
  -- jobs.lua at each call; a base_url that is no URL, from inside the HTTP client or not at all)
  it("is refused where it is written, the key itself never shown", function()
    for _, key in ipairs({ "abc", "", 12345678, true }) do
      local ok, err = pcall(function()
        jobs.configure("replicate", { base_url = "http://127.0.0.1:1/v1", api_key = key })
      end)
      assert.is_false(ok)
      assert.matches("jobs_hostile_spec.lua:%d+: jobs.configure: replicate's api_key must be a string of 6 bytes or more",
        err)
      if type(key) == "string" and key ~= "" then assert.is_nil(err:find(key, 1, true)) end
    end
    for _, base in ipairs({ "127.0.0.1:8080", "ftp://x", "http://", "http://x y", 5 }) do
      local ok, err = pcall(function() jobs.configure("fal", { base_url = base, api_key = "fal_hostile_key_01" }) end)
      assert.is_false(ok)
      assert.matches("jobs_hostile_spec.lua:%d+: jobs.configure: fal's base_url must be an http%(s%) URL", err)
    end
    -- (before: a timeout of 0, -1 or "5" was taken, then raised at every call from inside jobs.lua)
    for _, case in ipairs({ { "timeout", 0 }, { "timeout", -1 }, { "timeout", "5" }, { "timeout", 0 / 0 },
      { "deadline", 0 }, { "deadline", "60" }, { "deadline", math.huge }, { "attempts", 0 }, { "attempts", 1.5 }, { "poll", 5 } }) do
      local ok, err = pcall(function()
        jobs.configure("fal", { base_url = "http://127.0.0.1:1/fal", api_key = "fal_hostile_key_01", [case[1]] = case[2] })
      end)
      assert.is_false(ok, case[1])
      assert.matches("jobs_hostile_spec.lua:%d+: jobs.configure: fal's " .. case[1] .. " must be ", err)
    end
    assert.is_nil(jobs.config.fal.timeout) -- (nothing taken from a refused configure)
    jobs.configure("fal", { base_url = "http://127.0.0.1:1/fal", api_key = "fal_hostile_key_01", timeout = math.huge })
    jobs.config.fal = {}
    -- one set without configure: said at the call's line
    jobs.config.replicate = { api_key = "abc" }
    finally(function() jobs.config.replicate = {} end)
    local ok, err = pcall(function()
      local r = jobs.job({ model = "replicate/acme/video:abc123", input = {}, attempts = 1 })
      return r
    end)
    assert.is_false(ok)
    assert.matches("jobs_hostile_spec.lua:%d+: ai.job: the replicate api_key must be a string of 6 bytes or more", err)
    -- a base URL from the provider's variable, said at the call's line too
    local saved = helpers.resil
    helpers.resil = "REPLICATE_API_TOKEN=r8_hostile_token_01 REPLICATE_BASE_URL='127.0.0.1:9/v1' " .. saved
    local r = helpers.run_script([[
local jobs = require "policies.jobs"
print(pcall(function() local r = jobs.job({ model = "replicate/acme/video:abc123", input = {} }) return r end))
]], "--log-level off")
    helpers.resil = saved
    assert.matches('^false\t[^\n]+%.lua:2: ai.job: REPLICATE_BASE_URL must be an http%(s%) URL, not "127%.0%.0%.1:9/v1"',
      r.stdout)
  end)
end)
