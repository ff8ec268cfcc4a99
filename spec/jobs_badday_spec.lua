-- policies/jobs.lua and its adapters against a provider having a bad day: answers the real APIs
-- would not give but a proxy, an outage or an API change may (a duration that is not one, a
-- create's answer missing its URLs or its id), from a real loopback server.
local resil = require "resil"
local helpers = require "spec.helpers"
local jobs = require "policies.jobs"
local pricing = require "policies.pricing_media"
local json = resil.json

local KEYS = { replicate = "r8_badday_token_01", fal = "fal_badday_key_01" }
local PER_SECOND = "replicate/acme/hw:5c7d5dc6"      -- billed for the time it ran
local PER_IMAGE = "replicate/acme/img:5c7d5dc6"      -- billed per output
local FAL_PER_SECOND = "fal/acme/hw"

-- a Replicate and fal queue on loopback whose answers `answers` makes:
-- answers.create(base) -> body of the create; answers.status -> body of a status read
local function provider(answers)
  local seen = { creates = 0, reads = {}, cancels = 0 }
  local server = assert(resil.server.listen({ handler = function(req)
    local base = ("http://%s"):format(req.headers.host)
    if req.method == "POST" and (req.path == "/v1/predictions" or req.path == "/fal/acme/hw") then
      seen.creates = seen.creates + 1
      return { status = req.path == "/v1/predictions" and 201 or 200, body = answers.create(base) }
    end
    seen.reads[#seen.reads + 1] = req.method .. " " .. req.path
    if req.path:match("/cancel$") then
      seen.cancels = seen.cancels + 1
      if answers.cancel then return answers.cancel() end
      if req.path == "/v1/predictions/p1/cancel" then return { status = 200, body = '{"id":"p1","status":"canceled"}' } end
    end
    if req.path == "/fal/acme/hw/requests/r1" then
      return answers.result and answers.result() or { status = 200, body = '{"images":[{"url":"https://x/a.png"}]}' }
    end
    if req.path == "/v1/predictions/p1" or req.path == "/fal/acme/hw/requests/r1/status" then
      return { status = 200, body = answers.status }
    end
    return { status = 404, body = '{"detail":"Not found."}' }
  end }))
  local url = ("http://127.0.0.1:%d"):format(server:port())
  jobs.configure("replicate", { base_url = url .. "/v1", api_key = KEYS.replicate, poll = { first = 1 } })
  jobs.configure("fal", { base_url = url .. "/fal", api_key = KEYS.fal, poll = { first = 1 } })
  finally(function() server:close() end)
  return seen
end

local function rows()
  local n, usd, unpriced = 0, 0, 0
  for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do
    n, usd, unpriced = n + g.calls, usd + g.usd, unpriced + (g.unpriced or 0)
  end
  return n, usd, unpriced
end

local function created(base)
  return json.encode({ id = "p1", status = "starting", urls = { get = base .. "/v1/predictions/p1",
    cancel = base .. "/v1/predictions/p1/cancel" } })
end

describe("a job on a bad day", function()
  before_each(function()
    resil.clock.virtual()
    resil.store_config({ url = helpers.tmpname(".db") })
    pricing.models["replicate/acme/hw"] = { per_predict_second = 0.001 }
    pricing.models["replicate/acme/img"] = { per_output = 0.01 }
    pricing.models["fal/acme/hw"] = { per_predict_second = 0.001 }
  end)
  after_each(function()
    pricing.models["replicate/acme/hw"], pricing.models["replicate/acme/img"], pricing.models["fal/acme/hw"] = nil, nil, nil
  end)

  -- (the reviewer's find: the cancel a job's two 404 reads asked for, answered by a proxy's page and a
  -- read that 404ed again, was taken for the job lost: a second job was made while the first, never
  -- known canceled, may have run on, paid twice)
  it("Replicate: a job read 404 whose cancel a page answered is not taken for lost: no second job", function()
    local seen = provider({ create = function() return '{"id":"p2","status":"starting"}' end,
      cancel = function() return { status = 200, headers = { ["content-type"] = "text/html" }, body = "<html>edge</html>" } end })
    local r, err = jobs.job({ model = PER_SECOND, input = { prompt = "z" }, deadline = 60 })
    assert.is_nil(r)
    assert.are.equal(1, seen.creates)
    assert.are_not.equal("job_lost", err.kind)
    assert.are.equal(false, err.canceled)
  end)

  -- Replicate removes an API prediction's input and output an hour after it ends (data_removed):
  -- a run resumed later cannot tell whether the prediction made then is its own. (before: taken
  -- for none, a second prediction was made and paid beside the first)
  it("Replicate: a resumed create finds a prediction of its model whose input was removed: job_unsure, none made",
    function()
      local creates, only_later = 0, false
      local server = assert(resil.server.listen({ handler = function(req)
        if req.method == "POST" then
          creates = creates + 1
          return { status = 502, body = "<html>502 Bad Gateway</html>" }
        end
        if req.path == "/v1/predictions" then
          -- (p2, made an hour after the create was sent, cannot be its job)
          local function at(ago) return os.date("!%Y-%m-%dT%H:%M:%S.000Z", math.floor(resil.clock.wall() - ago)) end
          return { status = 200, body = json.encode({ next = json.null, previous = json.null, results = {
            { id = "p2", model = "acme/img", version = "5c7d5dc6", status = "succeeded", input = {}, output = json.null,
              data_removed = true, created_at = at(-3600) },
            not only_later and { id = "p1", model = "acme/img", version = "5c7d5dc6", status = "succeeded", input = {},
              output = json.null, data_removed = true, created_at = at(0) } or nil } }) }
        end
        return { status = 404, body = '{"detail":"Not found."}' }
      end }))
      finally(function() server:close() end)
      jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(server:port()), api_key = KEYS.replicate,
        poll = { first = 1 } })
      local spec = { model = PER_IMAGE, input = { prompt = "x" }, key = "removed-1", attempts = 1 }
      local r, err
      helpers.logged(function() r, err = jobs.job(spec) end)
      assert.is_nil(r)
      assert.are.equal(502, err.status)
      helpers.logged(function() r, err = jobs.job(spec) end)
      assert.is_nil(r)
      assert.are.equal("job_unsure", err.kind)
      assert.is_false(err.retryable)
      assert.matches("prediction p1, made then, has had its input removed by Replicate", err.message, 1, true)
      assert.are.equal(1, creates)
      -- one made an hour after the create was sent is not it: the create is sent again
      only_later = true
      spec.key = "removed-2"
      helpers.logged(function() r, err = jobs.job(spec) end)
      helpers.logged(function() r, err = jobs.job(spec) end)
      assert.are.same({ 502, 3 }, { err.status, creates })
    end)

  -- Replicate bills a canceled prediction for the time it ran, not an aborted one (its deadline
  -- passed before it started: https://replicate.com/docs/topics/predictions/lifecycle). (before:
  -- "replicate job p1 failed", a row without a price and an error that Replicate "did not say how
  -- long the job ran", for a prediction that never ran)
  it("Replicate: an aborted prediction failed, said aborted, no row and nothing logged of its duration", function()
    provider({ create = created, status = '{"id":"p1","status":"aborted","error":null,"metrics":{}}' })
    local r, err
    local lines = helpers.logged(function()
      r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, attempts = 1 })
    end)
    assert.is_nil(r)
    assert.are.equal("job_failed", err.kind)
    assert.matches("replicate job p1 failed: aborted before it started", err.message, 1, true)
    for _, l in ipairs(lines) do assert.is_nil(l.msg:match("did not say how long"), l.msg) end
    assert.are.same({ 0, 0, 0 }, { rows() })
  end)

  -- (before: a Lua error out of ai.job from the pricing or the budget's settle: a job that succeeded
  -- and was paid lost its output, wrote no row, and its hold stayed)
  for what, metrics in pairs({ ["a string"] = '{"predict_time":"1.5s"}', negative = '{"predict_time":-500}',
    infinite = '{"predict_time":1e400}', ["past a year"] = '{"predict_time":1e300}', ["not an object"] = '7' }) do
    it("Replicate: a succeeded job whose predict_time is " .. what .. " is its output and a row without a price",
      function()
        provider({ create = created, status = '{"id":"p1","status":"succeeded","output":["https://x/a.png"],' ..
          '"metrics":' .. metrics .. '}' })
        local b = resil.budget("jobs-badday-" .. what, { limit = 5 })
        local r, err
        local lines = helpers.logged(function()
          r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, budget = "jobs-badday-" .. what })
        end)
        assert(r, err and tostring(err))
        assert.are.same({ "https://x/a.png" }, r.output)
        assert.is_nil(r.cost_usd) -- unknown, never a guess nor a silent zero
        local n, _, unpriced = rows()
        assert.are.same({ 1, 1 }, { n, unpriced })
        local st = b:state()
        assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
        local said = false
        for _, l in ipairs(lines) do said = said or (l.level == "error" and l.provider == "replicate") end
        assert.is_true(said, "the unreadable duration is logged, naming the provider")
      end)
  end

  -- (before: the cancel was tried as any request, four times 60 s against a provider that hangs:
  -- a job of a 120 s deadline gave its error 360 s after it started)
  it("Replicate: a cancel at the deadline to a provider that hangs is given up 30 s after the deadline", function()
    local seen = { cancels = 0 }
    local server = assert(resil.server.listen({ tasks = true, handler = function(req)
      local base = ("http://%s"):format(req.headers.host)
      if req.method == "POST" and req.path == "/v1/predictions" then return { status = 201, body = created(base) } end
      if req.path:match("/cancel$") then
        seen.cancels = seen.cancels + 1
        resil.sleep(3600) -- (frozen)
      end
      return { status = 200, body = '{"id":"p1","status":"processing"}' }
    end }))
    finally(function() server:close() end)
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(server:port()), api_key = KEYS.replicate,
      poll = { first = 1 } })
    local started = resil.now()
    local r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, deadline = 120, attempts = 1 })
    assert.is_nil(r)
    assert.are.equal("deadline", err.kind)
    assert.matches("could not be canceled", err.message)
    assert.is_true(seen.cancels >= 1)
    local took = resil.now() - started
    assert.is_true(took >= 120 and took <= 120 + 31, "the error came after " .. took .. " s")
  end)

  -- (before: a row of the 5 days, $432 for a job that ran a second)
  it("Replicate: a predict_time longer than the job has existed is recorded at that most, said", function()
    provider({ create = created, status = '{"id":"p1","status":"succeeded","output":["https://x/a.png"],' ..
      '"metrics":{"predict_time":432000}}' })
    local r, lines
    lines = helpers.logged(function() r = assert(jobs.job({ model = PER_SECOND, input = { prompt = "x" } })) end)
    assert.is_true(r.cost_usd > 0 and r.cost_usd < 0.1, "recorded $" .. tostring(r.cost_usd))
    local _, usd = rows()
    assert.are.equal(math.floor(r.cost_usd * 1e6 + 0.5), math.floor(usd * 1e6 + 0.5))
    local said = false
    for _, l in ipairs(lines) do said = said or (l.msg:match("ran longer than it has existed") and l.reported == 432000) end
    assert.is_true(said)
  end)

  it("Replicate: a predict_time of null is none: the job is priced at what it reported, no error", function()
    provider({ create = created, status = '{"id":"p1","status":"succeeded","output":["https://x/a.png"],' ..
      '"metrics":{"predict_time":null}}' })
    local r = assert(jobs.job({ model = PER_IMAGE, input = { prompt = "x" } }))
    assert.are.equal(0.01, r.cost_usd)
  end)

  -- (before: $0, which writes no row: the job ran its deadline on a GPU the provider bills by the
  -- second, and neither the ledger nor the budget had it, nor did anything say so)
  it("fal: a request canceled at its deadline, its time not said, is a row without a price, said", function()
    local m = resil.mock.start({ jobs = { fates = { "stuck" } } })
    finally(function() m:stop() end)
    jobs.configure("fal", { base_url = m.url .. "/fal", api_key = KEYS.fal, poll = { first = 1 } })
    local b = resil.budget("jobs-badday-fal-cancel", { limit = 5 })
    local r, err
    local lines = helpers.logged(function()
      r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" }, deadline = 600, attempts = 1,
        budget = "jobs-badday-fal-cancel" })
    end)
    assert.is_nil(r)
    assert.are.equal("deadline", err.kind)
    assert.are.equal(1, m:stats().billed.canceled)
    local n, _, unpriced = rows()
    assert.are.same({ 1, 1 }, { n, unpriced })
    local st = b:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    local said
    for _, l in ipairs(lines) do said = said or (l.msg:match("did not say how long the job ran") and l.field) end
    assert.are.equal("metrics.inference_time", said)
  end)

  -- (before: fal's 202 CANCELLATION_REQUESTED was taken as the request's end: one whose app finished it
  -- all the same was paid at fal, had no row, and was replaced by a second request, paid too)
  it("fal: a request whose cancel was only accepted is followed; one that completed is its output, paid once",
    function()
      local m = resil.mock.start({ jobs = { duration = 20, cancel_takes = math.huge } })
      finally(function() m:stop() end)
      jobs.configure("fal", { base_url = m.url .. "/fal", api_key = KEYS.fal, poll = { first = 1 } })
      local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "x" }, deadline = 12 })
      assert(r, err and tostring(err))
      assert.are.equal("succeeded", r.status)
      assert.are.equal(1, r.attempts)
      assert.are.equal(0.025, r.cost_usd)
      local s = m:stats()
      assert.are.same({ 1, 1 }, { s.routes.fal_submit, s.billed.jobs })
      assert.are.same({ 1, 0.025, 0 }, { rows() })
    end)

  it("fal: a request whose cancel was accepted but that runs on past the cancel's window may run on: not replaced",
    function()
      local m = resil.mock.start({ jobs = { fates = { "stuck" }, cancel_takes = math.huge } })
      finally(function() m:stop() end)
      jobs.configure("fal", { base_url = m.url .. "/fal", api_key = KEYS.fal, poll = { first = 1 } })
      local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "x" }, deadline = 12 })
      assert.is_nil(r)
      assert.are.equal("deadline", err.kind)
      assert.is_false(err.canceled) -- (it was said canceled, and a second request made beside it)
      assert.are.equal(1, m:stats().routes.fal_submit)
      -- and one whose cancel takes a few seconds later is canceled: its end is read, nothing else made
      m:configure({ jobs = { fates = { "stuck", "stuck" }, cancel_takes = 4 } }) -- (the second of its fates)
      r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "x" }, deadline = 12, attempts = 1 })
      assert.is_nil(r)
      assert.are.equal("deadline", err.kind)
      assert.is_nil(err.canceled)
      assert.are.equal(1, m:stats().billed.canceled)
      assert.are.equal(2, m:stats().routes.fal_submit)
    end)

  it("Replicate: a job whose cancel failed is recorded by the call that cancels it, at the time it ran, once",
    function()
      local m = resil.mock.start({ jobs = { fates = { "stuck", "succeeded" }, polls = 1, predict_time = 2,
        errors = { cancel = { 500, 500, 500, 500 } } } })
      finally(function() m:stop() end)
      jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, poll = { first = 1 } })
      local r, err
      helpers.logged(function()
        r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, deadline = 60, key = "hw-uncanceled" })
      end)
      assert.is_nil(r)
      assert.is_false(err.canceled)
      assert.are.equal(0, (rows())) -- it runs on: its time is not known yet
      helpers.logged(function()
        r = assert(jobs.job({ model = PER_SECOND, input = { prompt = "x" }, deadline = 60, key = "hw-uncanceled" }))
      end)
      assert.are.equal(1, m:stats().billed.canceled)
      local n, usd, unpriced = rows()
      assert.are.same({ 2, 0 }, { n, unpriced })
      assert.is_true(usd > 0.06, "the canceled job ran past its 60 s deadline: $" .. usd)
    end)

  -- (before: $0, which writes no row, for a job that may yet make its image and be billed; or
  -- "its cost is not recorded" for one whose caller was canceled)
  it("Replicate: a job outside a run whose cancel failed may run on: a row without a price, its hold given back",
    function()
      local m = resil.mock.start({ jobs = { stuck = 1, errors = { cancel = { 500, 500, 500, 500, 500, 500, 500, 500 } } } })
      finally(function() m:stop() end)
      jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, poll = { first = 1 } })
      local b = resil.budget("jobs-badday-uncanceled", { limit = 5 })
      local r, err
      helpers.logged(function()
        r, err = jobs.job({ model = PER_IMAGE, input = { prompt = "x" }, deadline = 60, budget = "jobs-badday-uncanceled" })
      end)
      assert.is_nil(r)
      assert.is_false(err.canceled)
      local n, _, unpriced = rows()
      assert.are.same({ 1, 1 }, { n, unpriced })
      -- its caller canceled while it runs, and the cancel at the provider fails: the same
      local task = resil.spawn(function()
        return jobs.job({ model = PER_IMAGE, input = { prompt = "y" }, deadline = 600, budget = "jobs-badday-uncanceled" })
      end)
      helpers.logged(function()
        resil.sleep(30)
        task:cancel()
        resil.sleep(120) -- (the cancel's tries, in a task of their own)
      end)
      n, _, unpriced = rows()
      assert.are.same({ 2, 2 }, { n, unpriced })
      assert.are.equal(2, m:stats().routes.predictions)
      local st = b:state()
      assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    end)

  -- (before: with `retry = { max_retries = 3 }` a create that timed out was sent again, and a
  -- gateway's 502 or 504 was too: the provider had made the first job, and both were paid)
  it("Replicate: a create whose answer may have come after the job was made is not sent again", function()
    local creates, first = 0, nil
    local server = assert(resil.server.listen({ tasks = true, handler = function(req)
      if req.method ~= "POST" then return { status = 404, body = "{}" } end
      creates = creates + 1 -- (each one makes a job, paid)
      if creates == 1 then
        if first == "hang" then resil.sleep(3600) end
        if first then return { status = tonumber(first), body = "<html>gateway</html>" } end
      end
      return { status = 201, body = json.encode({ id = "p" .. creates, status = "succeeded", output = { "https://x/a" } }) }
    end }))
    finally(function() server:close() end)
    local url = ("http://127.0.0.1:%d/v1"):format(server:port())
    for _, case in ipairs({ { "hang", { max_retries = 3 }, "timeout" }, { "502", nil, "server_error" },
      { "504", nil, "server_error" }, { "524", nil, "server_error" } }) do
      creates, first = 0, case[1]
      jobs.configure("replicate", { base_url = url, api_key = KEYS.replicate, timeout = 5, retry = case[2] })
      local r, err
      helpers.logged(function() r, err = jobs.job({ model = PER_IMAGE, input = { prompt = "x" } }) end)
      assert.is_nil(r, case[1])
      assert.are.equal(case[3], err.class or err.kind, case[1])
      assert.are.equal(1, creates, case[1])
    end
    -- a refusal is retried: the job was not made
    creates, first = 0, "503"
    jobs.configure("replicate", { base_url = url, api_key = KEYS.replicate, timeout = 5 })
    local r
    helpers.logged(function() r = assert(jobs.job({ model = PER_IMAGE, input = { prompt = "x" } })) end)
    assert.are.same({ "p2", 2 }, { r.id, creates })
  end)

  -- (before: the create waited out each Retry-After: two hours for a job of a 60 s deadline; then
  -- until the deadline. A Retry-After past retry.defaults.max_retry_after, 60 s, is not waited:
  -- the create ends at once with the provider's 429)
  it("Replicate: a create told to come back in an hour is given up at once, nothing made", function()
    local m = resil.mock.start({ jobs = { polls = 0, errors = { predictions = { { status = 429, retry_after = 3600 },
      { status = 429, retry_after = 3600 } } } } })
    finally(function() m:stop() end)
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, poll = { first = 1 } })
    local started = resil.now()
    local r, err
    helpers.logged(function() r, err = jobs.job({ model = PER_IMAGE, input = { prompt = "x" }, deadline = 60 }) end)
    assert.is_nil(r)
    assert.are.equal("rate_limited", err.class)
    assert.are.equal(3600, err.retry_after)
    local took = resil.now() - started
    assert.is_true(took < 1, "the error came after " .. took .. " s")
    assert.is_nil(m:stats().billed.jobs)
  end)

  -- (before: the call returned the 403 and left the job running at the provider, billed, not
  -- canceled and not in the ledger)
  it("Replicate: a job outside a run whose status read is refused is canceled at the provider, what it ran recorded",
    function()
      local m = resil.mock.start({ jobs = { polls = 1e9, predict_time = 2,
        errors = { prediction = { "ok", { status = 403, title = "Forbidden" } } } } })
      finally(function() m:stop() end)
      jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, poll = { first = 1 } })
      local b = resil.budget("jobs-badday-refused", { limit = 5 })
      local r, err
      helpers.logged(function()
        r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, budget = "jobs-badday-refused" })
        resil.sleep(60) -- (the cancel, in a task of its own)
      end)
      assert.is_nil(r)
      assert.are.equal(403, err.status)
      assert.are.equal(1, m:stats().billed.canceled)
      local n, usd, unpriced = rows()
      assert.are.same({ 1, 0 }, { n, unpriced })
      assert.is_true(usd > 0, "what it ran is recorded")
      local st = b:state()
      assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
      -- inside a run (a key) it is the resumed run's, which reads it again: not canceled
      m:configure({ jobs = { polls = 1e9, errors = { prediction = { "ok", { status = 403, title = "Forbidden" } } } } })
      helpers.logged(function()
        r, err = jobs.job({ model = PER_SECOND, input = { prompt = "y" }, key = "refused" })
        resil.sleep(60)
      end)
      assert.is_nil(r)
      assert.are.equal(1, m:stats().billed.canceled)
    end)

  it("Replicate: a succeeded job of a model billed by the second, with no metrics, is a row without a price",
    function()
      provider({ create = created, status = '{"id":"p1","status":"succeeded","output":["https://x/a.png"]}' })
      local r
      helpers.logged(function() r = assert(jobs.job({ model = PER_SECOND, input = { prompt = "x" } })) end)
      assert.is_nil(r.cost_usd) -- unknown, never a silent zero
      local n, _, unpriced = rows()
      assert.are.same({ 1, 1 }, { n, unpriced })
    end)

  -- (before: the input's duration as it came: none was $0, which writes no row, for a video the
  -- provider billed at its default 5 s; -5 a cost_usd of -0.18; 1e12 raised out of ai.job after the
  -- job was paid, its output lost; with a budget, both raised out of the reservation)
  it("Replicate: a video is billed by its input's duration, its model's default when none; else unknown", function()
    local m = resil.mock.start({ jobs = { polls = 0 } })
    finally(function() m:stop() end)
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, poll = { first = 1 } })
    pricing.models["replicate/acme/clip"] = { per_video_second = 0.01 } -- (no default duration)
    finally(function() pricing.models["replicate/acme/clip"] = nil end)
    local b = resil.budget("jobs-badday-video", { limit = 100 })
    local function micro(usd) return usd and math.floor(usd * 1e6 + 0.5) end
    for _, case in ipairs({ { nil, 180000 }, { 10, 360000 }, { "10", 360000 }, { -5 }, { 1e12 }, { "5s" },
      { false }, { nil, nil, "replicate/acme/clip" }, { 3, 30000, "replicate/acme/clip" } }) do
      local duration, usd, model = case[1], case[2], case[3] or "replicate/bytedance/seedance-1-lite"
      local r, err
      local lines = helpers.logged(function()
        r, err = jobs.job({ model = model, input = { prompt = "x", duration = duration }, budget = "jobs-badday-video" })
      end)
      local what = ("%s, duration %s"):format(model, tostring(duration))
      assert(r, err and tostring(err))
      assert.are.equal(usd, micro(r.cost_usd), what)
      if not usd then
        local said = false
        for _, l in ipairs(lines) do said = said or (l.msg:match("seconds of video") ~= nil) end
        assert.is_true(said, what)
      end
    end
    local n, usd, unpriced = rows()
    assert.are.same({ 9, 5, 930000 }, { n, unpriced, micro(usd) })
    local st = b:state()
    assert.are.same({ 0, 0, 930000 }, { st.reserved, #st.holds, micro(st.spent) })
  end)

  -- (before: counted by its length, 0: recorded at $0, which writes no row)
  it("Replicate: a succeeded job whose output is an object is one output, billed", function()
    provider({ create = created, status = '{"id":"p1","status":"succeeded","output":{"image":"https://x/a.png",' ..
      '"mask":"https://x/m.png"}}' })
    local r = assert(jobs.job({ model = PER_IMAGE, input = { prompt = "x" } }))
    assert.are.equal("https://x/m.png", r.output.mask)
    assert.are.equal(0.01, r.cost_usd)
    local n, usd = rows()
    assert.are.same({ 1, 0.01 }, { n, usd })
  end)

  it("fal: a completed request whose inference_time cannot be read is its output and a row without a price",
    function()
      provider({ create = function(base)
        return json.encode({ request_id = "r1", status_url = base .. "/fal/acme/hw/requests/r1/status",
          response_url = base .. "/fal/acme/hw/requests/r1" })
      end, status = '{"status":"COMPLETED","metrics":{"inference_time":"fast"}}' })
      local r, err
      helpers.logged(function() r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" } }) end)
      assert(r, err and tostring(err))
      assert.are.equal("https://x/a.png", r.output.images[1].url)
      assert.is_nil(r.cost_usd)
      local n, _, unpriced = rows()
      assert.are.same({ 1, 1 }, { n, unpriced })
    end)

  -- (before: "fal job r1 failed: HTTP 404", as of a model that failed, and not the time its status
  -- reported, which a per-second model bills)
  it("fal: a completed request whose result read is refused says so, where and why, and is billed its time", function()
    provider({ create = function(base)
      return json.encode({ request_id = "r1", status_url = base .. "/fal/acme/hw/requests/r1/status",
        response_url = base .. "/fal/acme/hw/requests/r1" })
    end, status = '{"status":"COMPLETED","metrics":{"inference_time":2}}',
      result = function() return { status = 404, body = '{"detail":"Request not found"}' } end })
    local r, err
    helpers.logged(function() r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" }, attempts = 1 }) end)
    assert.is_nil(r)
    assert.are.equal("job_failed", err.kind)
    assert.matches("its result could not be read %(GET http://127%.0%.0%.1:%d+/fal/acme/hw/requests/r1%): HTTP 404: " ..
      "Request not found", err.message)
    local n, usd = rows()
    assert.are.same({ 1, 0.002 }, { n, usd })
  end)

  -- (before: taken for a status that could not be read: inside a run no row, at every resume; outside
  -- one, a row without a price and a log that it "may run on", though fal had said it completed)
  it("fal: a completed request whose result is larger than a response may be is billed once, not made again",
    function()
      local big = '{"images":[{"url":"data:image/png;base64,' .. string.rep("A", 65 * 1024 * 1024) .. '"}]}'
      local seen = provider({ create = function() return '{"request_id":"r1"}' end,
        status = '{"status":"COMPLETED","metrics":{"inference_time":2}}',
        result = function() return { status = 200, body = big } end })
      local function fails(key)
        local r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" }, key = key })
        assert.is_nil(r)
        assert.are.equal("job_failed", err.kind)
        assert.matches("its result could not be read .*larger than max_body", err.message)
      end
      fails("big-1") -- in a run, then resumed: the same request read again, recorded once
      fails("big-1")
      assert.are.equal(1, seen.creates)
      assert.are.same({ 1, 0.002, 0 }, { rows() })
      resil.store_config({ url = helpers.tmpname(".db") })
      fails(nil) -- outside a run: recorded at its time, not as one that may run on
      assert.are.equal(2, seen.creates)
      assert.are.same({ 1, 0.002, 0 }, { rows() })
    end)

  -- (before: taken for a cancel that failed, "it may still run": no row inside a run, at every resume,
  -- and outside one a row without a price, though fal had said it completed)
  it("fal: a completed request whose result cannot be read until its deadline is billed once, read again later",
    function()
      local broken = true
      local seen = provider({ create = function() return '{"request_id":"r1"}' end,
        status = '{"status":"COMPLETED","metrics":{"inference_time":2}}',
        result = function()
          if broken then return { status = 500, body = "<html>Internal Server Error</html>" } end
          return { status = 200, body = '{"images":[{"url":"https://x/a.png"}]}' }
        end,
        cancel = function() return { status = 400, body = '{"status":"ALREADY_COMPLETED"}' } end })
      local spec = { model = FAL_PER_SECOND, input = { prompt = "x" }, key = "unread-1", deadline = 30 }
      local r, err = jobs.job(spec)
      assert.is_nil(r)
      assert.are.equal("job_failed", err.kind)
      assert.is_true(err.retryable)
      assert.matches("it completed, but its result could not be read.*; the same key reads it again$", err.message)
      assert.are.same({ 1, 0.002, 0 }, { rows() })
      broken = false -- the run resumed: the same request, its result read now
      r = assert(jobs.job(spec))
      assert.are.same({ url = "https://x/a.png" }, r.output.images[1])
      assert.are.equal(1, seen.creates)
      assert.are.same({ 1, 0.002, 0 }, { rows() })
      broken = true -- outside a run: recorded at its time, not as one that may run on
      resil.store_config({ url = helpers.tmpname(".db") })
      r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" }, deadline = 30 })
      assert.are.equal("job_failed", err.kind)
      -- (without a key no call reads it again: retried, a new request is made and paid; the
      -- reviewer's find: it was retryable, and said the key would)
      assert.is_false(err.retryable)
      assert.is_nil(err.message:find("same key", 1, true))
      assert.are.equal(2, seen.creates)
      assert.are.same({ 1, 0.002, 0 }, { rows() })
    end)

  -- (before: $0, no row: only a request that succeeded was billed its video's seconds)
  it("fal: a completed video request whose result read is refused is billed its input's seconds", function()
    pricing.models["fal/acme/hw"] = { per_video_second = 0.05 }
    provider({ create = function() return '{"request_id":"r1"}' end, status = '{"status":"COMPLETED"}',
      result = function() return { status = 404, body = '{"detail":"Request not found"}' } end })
    local r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x", duration = 8 }, attempts = 1 })
    assert.is_nil(r)
    assert.are.equal("job_failed", err.kind)
    local n, usd = rows()
    assert.are.same({ 1, 0.4 }, { n, usd })
  end)

  -- (before: a cancel answered without the prediction was taken for a job canceled with no time said: a
  -- row without a price, and one that had succeeded before the cancel took lost its output, replaced)
  it("Replicate: a cancel answered without the prediction reads it: its outcome, and the time it ran", function()
    local made, fate, canceled_at = 0, {}, nil
    local server = assert(resil.server.listen({ handler = function(req)
      if req.method == "POST" and req.path == "/v1/predictions" then
        made = made + 1
        return { status = 201, body = json.encode({ id = "p" .. made, status = "starting" }) }
      end
      local id = req.path:match("^/v1/predictions/(p%d)")
      if req.path:match("/cancel$") then
        fate[id] = made == 1 and "succeeded" or "canceled" -- (the first ended as the cancel came)
        return { status = 200, body = "" }
      end
      if fate[id] == "succeeded" then
        return { status = 200, body = json.encode({ id = id, status = "succeeded", output = { "https://x/a.png" },
          metrics = { predict_time = 9 } }) }
      end
      if fate[id] then return { status = 200, body = json.encode({ id = id, status = "canceled",
        metrics = { predict_time = 30 } }) } end
      return { status = 200, body = json.encode({ id = id, status = "processing" }) }
    end }))
    finally(function() server:close() end)
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(server:port()), api_key = KEYS.replicate,
      poll = { first = 1 } })
    local r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, deadline = 30 })
    assert(r, err and tostring(err))
    assert.are.same({ "https://x/a.png" }, r.output)
    assert.are.equal(1, made)
    assert.are.same({ 1, 0.009, 0 }, { rows() })
    made = 1 -- the next one is canceled: recorded for the 30 s it ran, as its read says
    local _, derr = jobs.job({ model = PER_SECOND, input = { prompt = "y" }, deadline = 30, attempts = 1 })
    assert.are.equal("deadline", derr.kind)
    local n, usd, unpriced = rows()
    assert.are.same({ 2, 0 }, { n, unpriced })
    assert.is_true(math.abs(usd - 0.039) < 1e-9, tostring(usd))
    -- a page answered the cancel and the read after it: whether the cancel took is not known, the job
    -- may run on; it is not replaced (a second job beside it would be paid too)
    server:close()
    local portal = assert(resil.server.listen({ handler = function(req)
      if req.method == "POST" and req.path == "/v1/predictions" then
        return { status = 201, body = '{"id":"q1","status":"starting"}' }
      end
      if req.path:match("/cancel$") then canceled_at = resil.now() end
      if canceled_at then return { status = 200, headers = { ["content-type"] = "text/html" }, body = "<html>" } end
      return { status = 200, body = '{"id":"q1","status":"processing"}' }
    end }))
    finally(function() portal:close() end)
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(portal:port()), api_key = KEYS.replicate,
      poll = { first = 1 } })
    local r3, perr = jobs.job({ model = PER_SECOND, input = { prompt = "z" }, deadline = 30 })
    assert.is_nil(r3)
    assert.are.equal("deadline", perr.kind)
    assert.is_false(perr.canceled)
    assert.are.same({ "q1" }, perr.job_ids)
  end)

  -- (before: "the provider did not say how long the job ran", a row without a price, for a job that never ran)
  it("Replicate: a job canceled at its deadline before it started ran no time: no row, nothing logged", function()
    local canceled = false
    local server = assert(resil.server.listen({ handler = function(req)
      if req.method == "POST" and req.path == "/v1/predictions" then
        return { status = 201, body = '{"id":"p1","status":"starting","started_at":null}' }
      end
      if req.path:match("/cancel$") then canceled = true end
      return { status = 200, body = json.encode({ id = "p1", status = canceled and "canceled" or "starting",
        started_at = json.null, metrics = {} }) }
    end }))
    finally(function() server:close() end)
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(server:port()), api_key = KEYS.replicate,
      poll = { first = 1 } })
    local r, err
    local lines = helpers.logged(function()
      r, err = jobs.job({ model = PER_SECOND, input = { prompt = "x" }, deadline = 30, attempts = 1 })
    end)
    assert.is_nil(r)
    assert.are.equal("deadline", err.kind)
    assert.is_true(canceled)
    assert.are.same({ 0, 0, 0 }, { rows() })
    for _, l in ipairs(lines) do assert.are_not.equal("error", l.level, l.msg) end
  end)

  -- Replicate removes an API prediction's output an hour after it ends (data_removed). (before: a run
  -- resumed later read its job as succeeded with no output, its step given nil, recorded at $0: no row)
  it("Replicate: a job whose output was removed before a resumed run read it is recorded, and replaced", function()
    local made, removed = 0, false
    local server = assert(resil.server.listen({ handler = function(req)
      if req.method == "POST" and req.path == "/v1/predictions" then
        made = made + 1
        return { status = 201, body = json.encode({ id = "p" .. made, status = "starting" }) }
      end
      local id = req.path:match("^/v1/predictions/(p%d)$")
      if id == "p1" and not removed then return { status = 200, body = '{"id":"p1","status":"processing"}' } end
      if id == "p1" then
        return { status = 200, body = '{"id":"p1","status":"succeeded","output":null,"data_removed":true,' ..
          '"metrics":{"predict_time":3}}' }
      end
      if id then return { status = 200, body = json.encode({ id = id, status = "succeeded", output = { "https://x/b.png",
        "https://x/c.png" }, metrics = { predict_time = 3 } }) } end
      return { status = 404, body = '{"detail":"Not found."}' }
    end }))
    finally(function() server:close() end)
    jobs.configure("replicate", { base_url = ("http://127.0.0.1:%d/v1"):format(server:port()), api_key = KEYS.replicate,
      poll = { first = 1 } })
    local spec = { model = PER_IMAGE, input = { prompt = "x", num_outputs = 2 }, key = "weekend", deadline = 86400 * 3 }
    local t = resil.spawn(jobs.job, spec)
    resil.sleep(5)
    t:cancel() -- (the run killed while it polls; resumed after a weekend, the job long ended)
    removed = true
    resil.sleep(2 * 86400)
    local r, err
    helpers.logged(function() r, err = jobs.job(spec) end)
    assert(r, err and tostring(err))
    assert.are.same({ "https://x/b.png", "https://x/c.png" }, r.output)
    assert.are.same({ "p1", "p2" }, r.job_ids)
    local n, usd = rows()
    assert.are.same({ 2, 0.04 }, { n, usd }) -- each job's two images: the first's as its input asked
  end)

  -- (before: "the cancel was accepted, but the request had not ended": taken for one that may run on, no row)
  it("fal: a request that completed after its cancel was accepted, its result not read, is billed once", function()
    local answers = { create = function() return '{"request_id":"r1"}' end, status = '{"status":"IN_PROGRESS"}',
      result = function() return { status = 500, body = "<html>Internal Server Error</html>" } end }
    answers.cancel = function()
      answers.status = '{"status":"COMPLETED","metrics":{"inference_time":2}}' -- (it ended as the cancel came)
      return { status = 202, body = '{"status":"CANCELLATION_REQUESTED"}' }
    end
    local seen = provider(answers)
    local r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" }, key = "late", deadline = 30 })
    assert.is_nil(r)
    assert.are.equal("job_failed", err.kind)
    assert.matches("it completed, but its result could not be read", err.message)
    assert.are.equal(1, seen.creates)
    assert.are.same({ 1, 0.002, 0 }, { rows() })
  end)

  -- (before: invalid_output, and the job the provider had made, and billed, was neither read,
  -- canceled nor recorded)
  it("Replicate: a create answered with an id and no urls is followed at the documented URL, paid once", function()
    local seen = provider({ create = function() return '{"id":"p1","status":"starting"}' end,
      status = '{"id":"p1","status":"succeeded","output":["https://x/a.png"]}' })
    local r, err = jobs.job({ model = PER_IMAGE, input = { prompt = "x" } })
    assert(r, err and tostring(err))
    assert.are.same({ "https://x/a.png" }, r.output)
    assert.are.equal(1, seen.creates)
    assert.are.equal("GET /v1/predictions/p1", seen.reads[1])
    local n, usd = rows()
    assert.are.same({ 1, 0.01 }, { n, usd })
  end)

  it("fal: a submit answered with a request_id and no URLs is followed at the documented URLs", function()
    local seen = provider({ create = function() return '{"request_id":"r1","status_url":null}' end,
      status = '{"status":"COMPLETED","metrics":{"inference_time":2}}' })
    local r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" } })
    assert(r, err and tostring(err))
    assert.are.equal(1, seen.creates)
    assert.are.same({ "GET /fal/acme/hw/requests/r1/status", "GET /fal/acme/hw/requests/r1" }, seen.reads)
    assert.are.equal(0.002, r.cost_usd)
  end)

  -- fal's namespaced endpoints (workflows/, comfy/: fal-js's parseEndpointId) have their queue
  -- under namespace/owner/app. (before: read at /fal/workflows/acme/requests/r1/status, a 404:
  -- the request fal made and billed was taken for lost and made again)
  it("fal: a workflow's request without URLs is followed under workflows/owner/app, paid once", function()
    local seen = { creates = 0, reads = {} }
    local server = assert(resil.server.listen({ handler = function(req)
      if req.method == "POST" then
        seen.creates = seen.creates + 1
        return { status = 200, body = '{"request_id":"r1","status":"IN_QUEUE"}' }
      end
      seen.reads[#seen.reads + 1] = req.method .. " " .. req.path
      if req.path == "/fal/workflows/acme/flow/requests/r1/status" then
        return { status = 200, body = '{"status":"COMPLETED","metrics":{"inference_time":2}}' }
      end
      if req.path == "/fal/workflows/acme/flow/requests/r1" then
        return { status = 200, body = '{"images":[{"url":"https://x/a.png"}]}' }
      end
      return { status = 404, body = '{"detail":"Request not found"}' }
    end }))
    finally(function() server:close() end)
    jobs.configure("fal", { base_url = ("http://127.0.0.1:%d/fal"):format(server:port()), api_key = KEYS.fal,
      poll = { first = 1 } })
    pricing.models["fal/workflows/acme/flow/run"] = { per_predict_second = 0.001 }
    finally(function() pricing.models["fal/workflows/acme/flow/run"] = nil end)
    local r, err = jobs.job({ model = "fal/workflows/acme/flow/run", input = { prompt = "x" } })
    assert(r, err and tostring(err))
    assert.are.equal(1, seen.creates)
    assert.are.same({ "GET /fal/workflows/acme/flow/requests/r1/status", "GET /fal/workflows/acme/flow/requests/r1" },
      seen.reads)
    assert.are.equal(0.002, r.cost_usd)
  end)

  -- (before: "did not finish within its deadline", as of a job that ran too long, with nothing said
  -- of a status that was never read; an answer without a status was taken for a running job)
  for what, case in pairs({ ["a proxy's error page"] = { "<html>502 Bad Gateway</html>", "is not a JSON object" },
    ["JSON without a status"] = { '{"id":"p1"}', "has no status field" } }) do
    local body, says = case[1], case[2]
    it("Replicate: status reads answered with " .. what .. " until the deadline: the error and the log say so",
      function()
        local seen = provider({ create = created, status = body })
        local r, err
        local lines = helpers.logged(function()
          r, err = jobs.job({ model = PER_IMAGE, input = { prompt = "x" }, deadline = 30, attempts = 1 })
        end)
        assert.is_nil(r)
        assert.are.equal("deadline", err.kind)
        assert.matches("its status could not be read since: replicate: the status of prediction p1 ", err.message,
          1, true)
        assert.matches(says, err.message, 1, true)
        assert.are.equal(1, seen.cancels)
        local said = 0
        for _, l in ipairs(lines) do if l.msg:match("status could not be read") then said = said + 1 end end
        assert.are.equal(1, said) -- once, not at every poll
      end)
  end

  it("fal: a status answered without its status field is not taken for a request in progress", function()
    provider({ create = function(base)
      return json.encode({ request_id = "r1", status_url = base .. "/fal/acme/hw/requests/r1/status",
        response_url = base .. "/fal/acme/hw/requests/r1" })
    end, status = '{"queue_position":0}' })
    local r, err
    helpers.logged(function()
      r, err = jobs.job({ model = FAL_PER_SECOND, input = { prompt = "x" }, deadline = 30, attempts = 1 })
    end)
    assert.is_nil(r)
    assert.matches("fal: the status of request r1 has no status field", err.message, 1, true)
  end)

  -- (a 2xx without an id: a job made that no one can follow, as a create cut after its 2xx)
  it("Replicate: a create answered 201 without an id is not made again, recorded once at its estimate", function()
    local seen = provider({ create = function() return '{"status":"starting"}' end, status = "{}" })
    local r, err
    helpers.logged(function() r, err = jobs.job({ model = PER_IMAGE, input = { prompt = "x" }, key = "no-id" }) end)
    assert.is_nil(r)
    assert.are.equal("invalid_output", err.kind)
    assert.matches("no id", err.message)
    assert.are.equal(0.01, err.cost_usd)
    assert.are.equal(1, seen.creates)
    local n, usd = rows()
    assert.are.same({ 1, 0.01 }, { n, usd })
    -- the same key again (a resumed run) is not that failure replayed and charged again: a new job
    helpers.logged(function() jobs.job({ model = PER_IMAGE, input = { prompt = "x" }, key = "no-id" }) end)
    assert.are.equal(2, seen.creates)
    n, usd = rows()
    assert.are.same({ 2, 0.02 }, { n, usd })
  end)
end)

describe("speech on a bad day", function()
  before_each(function()
    resil.clock.virtual()
    resil.store_config({ url = helpers.tmpname(".db") })
  end)

  -- (before: each Retry-After was waited out: two hours for a sentence; then until the deadline. A
  -- Retry-After past retry.defaults.max_retry_after, 60 s, is not waited)
  it("a speech told to come back in an hour is given up at once; a deadline that is none is refused",
    function()
      local busy = { status = 429, code = "concurrent_limit_exceeded", retry_after = 3600 }
      local m = resil.mock.start({ jobs = { errors = { tts = { busy, busy } } } })
      finally(function() m:stop() end)
      jobs.configure("elevenlabs", { base_url = m.url, api_key = "xi_badday_key_01" })
      local started = resil.now()
      local r, err
      helpers.logged(function()
        r, err = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = "Hello", deadline = 120 })
      end)
      assert.is_nil(r)
      assert.are.equal("rate_limited", err.class)
      local took = resil.now() - started
      assert.is_true(took < 1, "the error came after " .. took .. " s")
      assert.is_nil(m:stats().billed.characters)
      local ok, why = pcall(function()
        local a = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = "Hello", deadline = "2m" })
        return a
      end)
      assert.is_false(ok)
      assert.matches("jobs_badday_spec.lua:%d+: ai.speech: deadline must be a number of seconds > 0", why)
    end)

  -- (before: a negative or infinite count raised out of ai.speech from the budget's settle, its hold
  -- kept; "1e12" recorded $50,000,000 for an 11-character text, past any budget)
  for header, billed in pairs({ ["-5"] = 11, ["1e400"] = 11, ["1e12"] = 11, ["2.5"] = 11, ["x"] = 11, ["7"] = 7 }) do
    it("an x-character-count of " .. header .. " is recorded as " .. billed .. " characters", function()
      local server = assert(resil.server.listen({ handler = function()
        return { status = 200, headers = { ["content-type"] = "audio/mpeg", ["x-character-count"] = header,
          ["request-id"] = "rq-" .. header }, body = "ID3 audio" }
      end }))
      finally(function() server:close() end)
      jobs.configure("elevenlabs", { base_url = ("http://127.0.0.1:%d"):format(server:port()),
        api_key = "xi_badday_key_01" })
      local b = resil.budget("speech-badday-" .. header, { limit = 5 })
      local r, err
      helpers.logged(function()
        r, err = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = "Hello there",
          budget = "speech-badday-" .. header })
      end)
      assert(r, err and tostring(err))
      local function micro(usd) return math.floor(usd * 1e6 + 0.5) end
      assert.are.equal(billed, r.characters)
      assert.are.equal(micro(billed * 0.05 / 1000), micro(r.cost_usd))
      local st = b:state()
      assert.are.same({ 0, 0, micro(billed * 0.05 / 1000) }, { st.reserved, #st.holds, micro(st.spent) })
    end)
  end
end)
