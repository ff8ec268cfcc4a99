-- policies/jobs.lua (ai.job, ai.speech) against the mock's Replicate, fal and ElevenLabs APIs,
-- and against a capturing server for the exact requests sent.
local resil = require "resil"
local helpers = require "spec.helpers"
local jobs = require "policies.jobs"
local classify = require "policies.classify"
local json, http = resil.json, resil.http

local KEYS = { replicate = "r8_spec_token_0001", fal = "fal_spec_key_0001", elevenlabs = "xi_spec_key_0001" }
local FAST_POLL = { first = 1, factor = 2, max = 8 }

local function use(url)
  jobs.configure("replicate", { base_url = url .. "/v1", api_key = KEYS.replicate, poll = FAST_POLL })
  jobs.configure("fal", { base_url = url .. "/fal", api_key = KEYS.fal, poll = FAST_POLL })
  jobs.configure("elevenlabs", { base_url = url, api_key = KEYS.elevenlabs })
end

local function fresh_store()
  resil.store_config({ url = helpers.tmpname(".db") })
  return assert(resil.store())
end

-- the lines logged, but for the info line naming each job waited on (see "says which job it waits on")
local function capture_log(fn)
  local lines = {}
  for _, l in ipairs(helpers.logged(fn)) do
    if l.msg ~= "job: waiting for it to end" then lines[#lines + 1] = l end
  end
  return lines
end

local VIDEO = "replicate/acme/video:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
local FLUX = "replicate/black-forest-labs/flux-schnell"

describe("ai.job on Replicate", function()
  local m
  before_each(function() resil.clock.virtual(); fresh_store() end)
  after_each(function() if m then m:stop() end; m = nil end)

  it("creates a prediction, polls it with backoff on the virtual clock, and returns its output", function()
    m = resil.mock.start({ jobs = { duration = 10 } })
    use(m.url)
    local t0 = resil.now()
    local r = assert(jobs.job({ model = VIDEO, input = { prompt = "a cat", duration = 5 } }))
    assert.are.equal(15, resil.now() - t0) -- polls at 1, 3, 7, 15 s: the job is ready at 10
    assert.are.equal(4, m:stats().routes.prediction)
    assert.are.equal(1, m:stats().routes.predictions)
    assert.are.equal("replicate", r.provider)
    assert.are.equal(VIDEO, r.model)
    assert.matches("^mock", r.id)
    assert.matches("^https://", r.output[1])
    assert.are.equal(1, r.attempts)
  end)

  it("sends Prefer: wait and takes a finished prediction from the create", function()
    m = resil.mock.start({ jobs = { duration = 3 } })
    use(m.url)
    local t0 = resil.now()
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, wait = 5 }))
    assert.are.equal(3, resil.now() - t0)
    assert.is_nil(m:stats().routes.prediction) -- no poll needed
    assert.are.equal("succeeded", r.status)
  end)

  it("cancels a job at its deadline and makes a new one, which succeeds", function()
    m = resil.mock.start({ jobs = { fates = { "stuck", "succeeded" }, polls = 1 } })
    use(m.url)
    local t0 = resil.now()
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 60, key = "cat" }))
    local s = m:stats()
    assert.are.equal(1, s.routes.cancel)
    assert.are.equal(1, s.billed.canceled)
    assert.are.equal(2, s.routes.predictions)
    assert.are.equal(2, r.attempts)
    assert.are.equal(r.job_ids[2], r.id)
    assert.are_not.equal(r.job_ids[1], r.job_ids[2])
    assert.is_true(resil.now() - t0 >= 60)
  end)

  -- (before: nothing was said of the job until its deadline, 15 minutes by default: a pipeline waiting
  -- on a job the provider never ends was silent, and which job it was, unknown)
  it("says which job it waits on, and until when, as the job is made", function()
    m = resil.mock.start({ jobs = { fates = { "stuck" } } })
    use(m.url)
    local err
    local lines = helpers.logged(function()
      local t0 = resil.clock.wall()
      _, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 60, attempts = 1 })
      err.t0 = t0
    end)
    assert.are.equal("deadline", err.kind)
    local said
    for _, l in ipairs(lines) do if l.msg == "job: waiting for it to end" then said = said or l end end
    assert(said, "no line named the job before its deadline")
    assert.are.same({ "info", "replicate", err.id, FLUX }, { said.level, said.provider, said.id, said.model })
    local at = function(d) return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(err.t0) + d) end
    assert.is_true(said.deadline_at == at(60) or said.deadline_at == at(61), said.deadline_at) -- (the create's time)
  end)

  it("takes a job that finished just before its deadline's cancel: no second job, billed once", function()
    m = resil.mock.start({ jobs = { duration = 10 } }) -- polls at 1, 3, 7; ready at 10; cancel at 12
    use(m.url)
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 12, key = "late" })
    assert.is_nil(err)
    assert.are.equal(1, r.attempts)
    assert.matches("^https://", r.output[1])
    assert.are.equal(0.003, r.cost_usd)
    local s = m:stats()
    assert.are.equal(1, s.routes.predictions)
    assert.are.equal(1, s.billed.jobs)
    assert.are.equal(0.003, resil.cost.breakdown("model")[1].usd)
  end)

  it("cancels at the deadline even while a status read hangs or is told to come back in an hour", function()
    for _, scenario in ipairs({
      { jobs = { fates = { "stuck" } }, sequence = { prediction = { "hang", "hang", "hang" } } },
      { jobs = { fates = { "stuck" }, errors = { prediction = { { status = 429, retry_after = 3600 } } } } },
    }) do
      m = resil.mock.start(scenario)
      use(m.url)
      local t0 = resil.now()
      local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 30, attempts = 1 })
      assert.is_nil(r)
      assert.are.equal("deadline", err.kind)
      assert.is_true(resil.now() - t0 < 30.001) -- virtual clock: cut at the deadline, not after the read
      assert.are.equal(1, m:stats().billed.canceled)
      m:stop()
      m = nil
    end
  end)

  it("keeps reading a job while the provider's breaker is open, instead of leaving it running", function()
    m = resil.mock.start({ jobs = { polls = 6 }, sequence = { prediction = { 500, 500, 500, 500 } } })
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, poll = FAST_POLL,
      breaker = { name = "replicate-spec-open-polls", failure_rate = 0.5, min_calls = 3, window = 30, open_for = 30 } })
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 300 })
    assert.is_nil(err)
    assert.are.equal(1, r.attempts)
    assert.are.equal(0.003, r.cost_usd)
    assert.are.equal(1, m:stats().routes.predictions)
    assert.are.equal(1, m:stats().billed.jobs)
  end)

  it("does not make a new job beside one whose cancel failed; the same key cancels it, then replaces it", function()
    m = resil.mock.start({ jobs = { fates = { "stuck", "succeeded" }, polls = 1,
      errors = { cancel = { 500, 500, 500, 500 } } } })
    use(m.url)
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 60, key = "uncanceled" })
    assert.is_nil(r)
    assert.are.equal("deadline", err.kind)
    assert.is_false(err.canceled)
    assert.are.equal(1, m:stats().routes.predictions) -- no second job while the first may run
    r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 60, key = "uncanceled" }))
    local s = m:stats()
    assert.are.equal(1, s.billed.canceled)
    assert.are.equal(2, s.routes.predictions)
    assert.are.equal(2, r.attempts)
  end)

  it("replaces a job the provider no longer knows (404s for its status, or its cancel and status), with no row for it",
    function()
    local lines = capture_log(function()
      m = resil.mock.start({ jobs = { polls = 1, fates = { "lost", "succeeded" } } })
      use(m.url)
      local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, key = "lost-read" }))
      assert.are.equal(2, r.attempts)
      assert.are.equal(2, m:stats().routes.predictions)
      assert.are.equal(r.job_ids[2], r.id)
      -- called again past the deadline of a job the provider forgot meanwhile: its cancel and its
      -- read are 404s; nothing runs on beside the new job, which is made
      m:stop()
      m = resil.mock.start({ jobs = { polls = 1e9 } })
      use(m.url)
      local t = resil.spawn(jobs.job, { model = FLUX, input = { prompt = "a cat" }, deadline = 60, key = "lost-late" })
      resil.sleep(5)
      t:cancel()
      local port = m.port
      m:stop()
      resil.sleep(120)
      m = assert(resil.mock.start({ jobs = { polls = 1 } }, { port = port }))
      r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 60, key = "lost-late" }))
      assert.are.equal(2, r.attempts)
      assert.are.equal(1, m:stats().routes.predictions)
      local rows = resil.cost.breakdown("model")
      assert.are.equal(2, rows[1].calls) -- each call's new job; nothing is known of the lost ones' use
      -- on the fal queue: a request answered at its submit, then forgotten (the mock's "lost" fate)
      m:stop()
      m = resil.mock.start({ jobs = { fates = { "lost", "succeeded" }, polls = 1 } })
      use(m.url)
      r = assert(jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, key = "lost-fal" }))
      assert.are.equal(2, r.attempts)
      assert.are.equal(2, m:stats().routes.fal_submit)
    end)
    local replaced = {}
    for _, l in ipairs(lines) do
      if l.msg:match("^job did not succeed") then replaced[#replaced + 1] = l.status end
    end
    assert.are.same({ "lost", "lost", "lost" }, replaced)
  end)

  -- (before: the first 404 was taken for a lost job, replaced at once and never canceled: a proxy's or
  -- an edge's 404 for one read left the job running on beside its replacement, both paid, one row)
  it("a job whose status read answered 404 once is read again: the same job, made once, recorded once", function()
    m = resil.mock.start({ jobs = { polls = 3, errors = { prediction = { "ok", 404 } } } })
    use(m.url)
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, key = "blip" }))
    assert.are.equal(1, r.attempts)
    assert.are.equal(1, m:stats().routes.predictions)
    assert.are.equal(1, resil.cost.breakdown("model")[1].calls)
  end)

  it("a job whose status reads answer 404 but whose cancel finds it is canceled, recorded, then replaced", function()
    local pricing = require "policies.pricing_media"
    pricing.models["replicate/acme/hardware"] = { per_predict_second = 0.001 }
    finally(function() pricing.models["replicate/acme/hardware"] = nil end)
    m = resil.mock.start({ jobs = { polls = 3, errors = { prediction = { 404, 404 } } } })
    use(m.url)
    local r = assert(jobs.job({ model = "replicate/acme/hardware", input = { prompt = "a cat" }, key = "unreadable" }))
    assert.are.equal(2, r.attempts)
    assert.are.equal(2, m:stats().routes.predictions)
    assert.are.equal(1, m:stats().billed.canceled) -- (nothing runs on beside the new job)
    local rows = resil.cost.breakdown("model")
    assert.are.equal(2, rows[1].calls) -- the canceled job's time, and the new job's
    assert.is_number(rows[1].usd)
  end)

  it("a job made under another base_url (the provider's address moved before the resume) is read at the new one",
    function()
    local lines = capture_log(function()
      m = resil.mock.start({ jobs = { duration = 30 } })
      -- the address the job was made through: a proxy in front of the provider, gone by the resume
      local gone = false
      local proxy = resil.server.listen({ tasks = true, handler = function(req)
        if gone then return { status = 503, body = "{}" } end
        local res = assert(http.request({ method = req.method, url = m.url .. req.path, headers = req.headers,
          body = req.body ~= "" and req.body or nil }))
        return { status = res.status, headers = { ["content-type"] = res.headers["content-type"] }, body = res.body }
      end })
      use(("http://127.0.0.1:%d"):format(proxy:port()))
      local spec = { model = FLUX, input = { prompt = "a cat" }, key = "moved", deadline = 600 }
      local t = resil.spawn(jobs.job, spec)
      resil.sleep(5)
      t:cancel() -- (a crash while it polls)
      gone = true
      finally(function() proxy:close() end)
      use(m.url)
      local r = assert(jobs.job(spec))
      assert.are.equal("mock" .. m.instance .. "00001", r.id)
      assert.are.equal(1, m:stats().routes.predictions)
    end)
    assert.are.equal("job: made under another base_url; read and canceled under this one", lines[#lines].msg)
  end)

  describe("inside a run", function()
    after_each(function() resil.run.finish("done"); resil.store_config({ run = false }) end)
    local function variations(n)
      local ids = {}
      for i = 1, n do
        ids[i] = resil.step("variation", function()
          return assert(jobs.job({ model = FLUX, input = { prompt = "a lighthouse" } })).id
        end)
      end
      return ids
    end

    it("steps of one name with the same request (a loop) are a job each; a resumed run follows each its own",
      function()
      m = resil.mock.start({ jobs = { duration = 10 } })
      use(m.url)
      resil.store_config({ run = "variations" })
      local t = resil.spawn(variations, 3)
      for _ = 1, 100 do
        if (m:stats().routes.predictions or 0) >= 2 then break end
        resil.sleep(0.5)
      end
      resil.sleep(1)
      t:cancel() -- (a crash while the second job runs)
      resil.run.finish("interrupted")
      local ids = variations(3)
      assert.are.equal(3, m:stats().routes.predictions) -- the second job followed, not made again
      assert.are_not.equal(ids[1], ids[2])
      assert.are_not.equal(ids[2], ids[3])
      assert.are_not.equal(ids[1], ids[3])
    end)

    it("a step of the name of one inside an earlier step, resumed, follows its own job, not the inner one's",
      function()
      m = resil.mock.start({ jobs = { duration = 10 } })
      use(m.url)
      resil.store_config({ run = "namesakes" })
      local function variation()
        return resil.step("variation", function()
          return assert(jobs.job({ model = FLUX, input = { prompt = "a lighthouse" } })).id
        end)
      end
      local function pipeline()
        return resil.step("outer", variation), variation()
      end
      local t = resil.spawn(pipeline)
      for _ = 1, 100 do
        if (m:stats().routes.predictions or 0) >= 2 then break end
        resil.sleep(0.5)
      end
      resil.sleep(1)
      t:cancel() -- (a crash while the second job runs)
      resil.run.finish("interrupted")
      local inner, outer = pipeline()
      assert.are_not.equal(inner, outer)
      assert.are.equal(2, m:stats().routes.predictions)
    end)

    it("a run resumed days after it was interrupted follows the job it paid for, not a new one", function()
      m = resil.mock.start({ jobs = { duration = 100 } })
      use(m.url)
      resil.store_config({ run = "weekend" })
      local function render()
        return resil.step("render", function()
          return assert(jobs.job({ model = FLUX, input = { prompt = "a lighthouse" }, deadline = 7 * 86400 })).id
        end)
      end
      local t = resil.spawn(render)
      resil.sleep(10)
      t:cancel() -- (a crash on Friday evening)
      resil.run.finish("interrupted")
      resil.sleep(3 * 86400)
      assert.is_true(resil.once_reap() >= 0) -- (what the store's sweeper does meanwhile)
      assert.are.equal("mock" .. m.instance .. "00001", render())
      assert.are.equal(1, m:stats().routes.predictions)
    end)

    it("the first step of a name keeps the key versions before gave it: a job made under it is followed, not made again",
      function()
      m = resil.mock.start({ jobs = { duration = 10 } })
      use(m.url)
      resil.store_config({ run = "upgraded" })
      local legacy = "upgraded/variation/" .. jobs.fingerprint(FLUX, { prompt = "a lighthouse" }):sub(1, 16)
      local t = resil.spawn(jobs.job, { model = FLUX, input = { prompt = "a lighthouse" }, key = legacy })
      resil.sleep(2)
      t:cancel()
      local ids = variations(2)
      assert.are.equal(2, m:stats().routes.predictions)
      assert.are.equal("mock" .. m.instance .. "00001", ids[1])
    end)

    -- (before: the refusal was kept under the job's key as a permanent failure: every resume of the
    -- run, once the credit was added or the token fixed, failed at its step again, nothing sent)
    it("a create the provider refused (no credit, a bad token) is sent again when the run is resumed", function()
      m = resil.mock.start({ jobs = { polls = 0, errors = { predictions = { 402, 401 } } } })
      use(m.url)
      resil.store_config({ run = "refused" })
      local function render()
        return resil.step("render", function()
          local r, err = jobs.job({ model = FLUX, input = { prompt = "a lighthouse" } })
          if not r then return nil, err end
          return r.id
        end)
      end
      local _, err = render()
      assert.are.equal("quota_exceeded", err.kind)
      resil.run.finish("failed")
      _, err = render() -- (the credit added, the token now wrong)
      assert.are.equal("auth", err.kind)
      resil.run.finish("failed")
      assert.are.equal("mock" .. m.instance .. "00001", render()) -- (the token fixed)
      assert.are.equal(3, m:stats().routes.predictions)
      assert.are.equal(1, m:stats().billed.jobs)
    end)

    -- (before: a refusal an older version kept under the job's key was replayed at every resume, for
    -- good: the run failed at its step, nothing sent, whatever credit or token it had since)
    it("a refusal an older version kept under the job's key is not replayed: the create is sent", function()
      m = resil.mock.start({ jobs = { polls = 0 } })
      use(m.url)
      local input = { prompt = "a lighthouse" }
      local function seed(key)
        resil.once({ key = "ai.job:" .. key, fingerprint = jobs.fingerprint(FLUX, input), retention = 86400 },
          function()
            return nil, resil.error("quota_exceeded", "replicate: 402 Insufficient credit",
              { provider = "replicate", status = 402, retryable = false })
          end)
      end
      seed("old-402")
      local r, err = jobs.job({ model = FLUX, input = input, key = "old-402" })
      assert(r, err and tostring(err))
      assert.are.equal("mock" .. m.instance .. "00001", r.id)
      -- and again: the job made then is followed, not made a second time
      assert.are.equal(r.id, assert(jobs.job({ model = FLUX, input = input, key = "old-402" })).id)
      assert.are.equal(1, m:stats().routes.predictions)
      assert.are.equal(1, m:stats().billed.jobs)
      assert.are.equal(1, resil.cost.breakdown("provider")[1].calls) -- one row, read twice
    end)

    -- (before: the side was drawn again at each call: a resumed run that drew the other version had
    -- another job's key, and made and paid a second job beside the first, which ran on unrecorded)
    it("an alias migrating without a sticky value: a resumed run draws the side it drew, and follows its job",
      function()
      local ai = require "policies.ai"
      local registry = require "policies.registry"
      local saved = registry.random
      finally(function() registry.random = saved; registry.use() end)
      registry.use({ img = { use = FLUX, migrate = { to = "replicate/black-forest-labs/flux-dev", share = 0.5,
        sticky = false } } })
      m = resil.mock.start({ jobs = { duration = 10 } })
      use(m.url)
      resil.store_config({ run = "canary" })
      local function render()
        return resil.step("render", function()
          local r = assert(ai.job({ model = "img", input = { prompt = "a lighthouse" } }))
          return r.id .. " " .. r.model
        end)
      end
      local draws = { 0.1, 0.9 } -- the first run on one side of the share, the resumed one on the other
      registry.random = function() return table.remove(draws, 1) end
      local t = resil.spawn(render)
      resil.sleep(2)
      t:cancel() -- (a crash while the job runs)
      resil.run.finish("interrupted")
      assert.are.equal(1, m:stats().routes.predictions)
      assert.matches("^mock" .. m.instance .. "00001 ", render())
      assert.are.equal(1, m:stats().routes.predictions) -- followed, not made again
      -- with a key of its own, outside a run, likewise: the same job again, not 'key_reused'
      draws = { 0.1, 0.9 }
      local a = assert(ai.job({ model = "img", input = { prompt = "a fox" }, key = "fox-1" }))
      local b = assert(ai.job({ model = "img", input = { prompt = "a fox" }, key = "fox-1" }))
      assert.are.equal(a.id, b.id)
      assert.are.equal(a.model, b.model)
      assert.are.equal(2, m:stats().routes.predictions)
    end)

    -- (before: the job's key held the model the alias named then: a run resumed after the registry
    -- moved the alias made and paid a second job, the first one running on, never in the ledger;
    -- with `key =`, it failed as key_reused)
    it("an alias moved to another model between a run and its resume: the job made is followed, recorded at its model",
      function()
      local ai = require "policies.ai"
      local registry = require "policies.registry"
      finally(function() registry.use() end)
      local DEV = "replicate/black-forest-labs/flux-dev"
      registry.use({ img = { use = FLUX } })
      m = resil.mock.start({ jobs = { duration = 10 } })
      use(m.url)
      resil.store_config({ run = "moved" })
      local function render()
        return resil.step("render", function()
          local r = assert(ai.job({ model = "img", input = { prompt = "a lighthouse" } }))
          return r.id .. " " .. r.model .. " " .. r.cost_usd
        end)
      end
      local t = resil.spawn(render)
      resil.sleep(2)
      t:cancel() -- (a crash while the job runs)
      resil.run.finish("interrupted")
      registry.use({ img = { use = DEV } }) -- (the registry edited, a rollback, a migration ended)
      assert.are.equal(("mock%s00001 %s 0.003"):format(m.instance, FLUX), render())
      assert.are.equal(1, m:stats().routes.predictions) -- followed, not made again
      assert.are.equal(0.003, resil.cost.total())
      -- with a key of its own, outside a run, likewise: the same job again, not 'key_reused'
      registry.use({ img = { use = FLUX } })
      local a = assert(ai.job({ model = "img", input = { prompt = "a fox" }, key = "fox-2" }))
      registry.use({ img = { use = DEV } })
      local b, err = ai.job({ model = "img", input = { prompt = "a fox" }, key = "fox-2" })
      assert(b, err and tostring(err))
      assert.are.same({ a.id, FLUX }, { b.id, b.model })
      assert.are.equal(2, m:stats().routes.predictions)
      assert.are.equal(0.006, resil.cost.total())
      -- a new step of the alias is made on the model of now
      local c = assert(ai.job({ model = "img", input = { prompt = "a fox" }, key = "fox-3" }))
      assert.are.equal(DEV, c.model)
    end)

    it("an alias's job a run made before its key held the alias (it held the model) is followed, not made again",
      function()
      local ai = require "policies.ai"
      local registry = require "policies.registry"
      finally(function() registry.use() end)
      registry.use({ img = { use = FLUX } })
      m = resil.mock.start({ jobs = { duration = 10 } })
      use(m.url)
      resil.store_config({ run = "upgraded-alias" })
      local function render(model) -- (an older version sent the alias's model, as jobs.job is given it)
        return resil.step("render", function()
          local r = assert((model == FLUX and jobs.job or ai.job)({ model = model, input = { prompt = "a lighthouse" } }))
          return r.id
        end)
      end
      local t = resil.spawn(render, FLUX)
      resil.sleep(2)
      t:cancel()
      resil.run.finish("interrupted")
      assert.are.equal("mock" .. m.instance .. "00001", render("img"))
      assert.are.equal(1, m:stats().routes.predictions)
    end)
  end)

  it("records the time a job canceled at its deadline ran, for a model billed per second", function()
    local pricing = require "policies.pricing_media"
    pricing.models["replicate/acme/hardware"] = { per_predict_second = 0.001 }
    m = resil.mock.start({ jobs = { fates = { "stuck" } } })
    use(m.url)
    local _, err = jobs.job({ model = "replicate/acme/hardware", input = { prompt = "a cat" }, deadline = 30,
      attempts = 1 })
    pricing.models["replicate/acme/hardware"] = nil
    assert.are.equal("deadline", err.kind)
    assert.are.equal(1, m:stats().billed.canceled)
    local rows = resil.cost.breakdown("model")
    assert.are.equal(1, #rows)
    assert.is_true(math.abs(rows[1].usd - 0.03) < 1e-6)
  end)

  -- the mock's fate "aborted": Replicate's status for a prediction whose deadline passed before it
  -- started (never run, not billed); the one after it succeeds
  it("an aborted prediction is replaced, not billed, no row, its hold given back", function()
    local pricing = require "policies.pricing_media"
    pricing.models["replicate/acme/hardware"] = { per_predict_second = 0.001 }
    finally(function() pricing.models["replicate/acme/hardware"] = nil end)
    m = resil.mock.start({ jobs = { fates = { "aborted", "succeeded" }, predict_time = 4 } })
    use(m.url)
    local budget = resil.budget("jobs-aborted", { limit = 1 })
    local r = assert(jobs.job({ model = "replicate/acme/hardware", input = { prompt = "a cat" }, deadline = 300,
      budget = "jobs-aborted" }))
    assert.are.equal(2, r.attempts)
    local raw = http.request({ method = "GET", url = m.url .. "/v1/predictions/" .. r.job_ids[1],
      headers = { authorization = "Bearer " .. KEYS.replicate } })
    local first = json.decode(raw.body)
    assert.are.same({ "aborted", json.null }, { first.status, first.metrics.predict_time or json.null })
    local rows = resil.cost.breakdown("model")
    assert.are.same({ 1, 1 }, { #rows, rows[1].calls })
    assert.is_true(math.abs(rows[1].usd - 0.004) < 1e-9)
    local st = budget:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(math.abs(st.spent - 0.004) < 1e-9)
  end)

  -- (before: the job ran on at the provider, billed, and nothing recorded it; its hold counted until it expired)
  it("a job whose caller is canceled is canceled at the provider, what it ran recorded, its hold settled", function()
    local pricing = require "policies.pricing_media"
    pricing.models["replicate/acme/hardware"] = { per_predict_second = 0.001 }
    finally(function() pricing.models["replicate/acme/hardware"] = nil end)
    m = resil.mock.start({ jobs = { fates = { "stuck" } } })
    use(m.url)
    local budget = resil.budget("jobs-cancel", { limit = 1 })
    local t = resil.spawn(jobs.job, { model = "replicate/acme/hardware", input = { prompt = "a cat" }, deadline = 300,
      attempts = 1, budget = "jobs-cancel" })
    resil.sleep(20)
    assert.are.equal(1, #budget:state().holds)
    t:cancel()
    assert.is_true(helpers.wait_until(function() return m:stats().billed.canceled == 1 end, 10))
    assert.is_true(helpers.wait_until(function() return #resil.cost.breakdown("model") == 1 end, 10))
    local rows = resil.cost.breakdown("model")
    assert.is_true(rows[1].usd > 0.015 and rows[1].usd < 0.025, tostring(rows[1].usd)) -- about 20 s at $0.001
    local st = budget:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(math.abs(st.spent - rows[1].usd) < 1e-6)
  end)

  -- A create whose caller is canceled while its answer is on its way (the mock holds it 30 s; the job is
  -- made when the create arrives). (before: the create was aborted with its caller, and the job the
  -- provider had made ran on, billed, with no id to follow and no row)
  local HARDWARE = "replicate/acme/hardware"
  local function hardware_priced()
    local pricing = require "policies.pricing_media"
    pricing.models[HARDWARE] = { per_predict_second = 0.001 }
    finally(function() pricing.models[HARDWARE] = nil end)
  end
  local function cancel_while_creating(spec, budget)
    local job = { model = HARDWARE, input = { prompt = "a cat" }, deadline = 300, attempts = 1, budget = budget }
    for k, v in pairs(spec or {}) do job[k] = v end
    local t = resil.spawn(jobs.job, job)
    resil.sleep(5)
    assert.are.equal(1, m:stats().routes.predictions) -- sent, its answer not back
    t:cancel()
    local ok, err = t:join()
    assert.is_false(ok)
    assert.are.equal("canceled", err.kind)
    resil.sleep(30) -- the create's answer comes
  end

  it("a job whose caller is canceled while its create is in flight is canceled at the provider once it answers, " ..
     "recorded once, its hold settled", function()
    hardware_priced()
    m = resil.mock.start({ jobs = { fates = { "stuck" } }, sequence = { predictions = { { kind = "ok", latency = 30 } } } })
    use(m.url)
    local budget = resil.budget("jobs-cancel-create", { limit = 1 })
    cancel_while_creating(nil, "jobs-cancel-create")
    assert.is_true(helpers.wait_until(function() return m:stats().billed.canceled == 1 end, 10))
    assert.is_true(helpers.wait_until(function() return #resil.cost.breakdown("model") == 1 end, 10))
    assert.is_true(helpers.wait_until(function() return budget:state().reserved == 0 end, 10))
    local s = m:stats()
    assert.are.same({ 1, 1 }, { s.routes.predictions, s.routes.cancel })
    local rows = resil.cost.breakdown("model")
    assert.are.equal(1, rows[1].calls)
    assert.is_true(rows[1].usd > 0.025 and rows[1].usd < 0.035, tostring(rows[1].usd)) -- about 30 s at $0.001
    local st = budget:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(math.abs(st.spent - rows[1].usd) < 1e-6)
  end)

  it("a create that fails after its caller was canceled records what it would have: a cut 201 its estimate, " ..
     "a refusal nothing", function()
    for _, case in ipairs({ { fault = "truncate", usd = 0.006 }, { fault = 422 } }) do
      m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = {
        type(case.fault) == "number" and { status = case.fault, latency = 30 } or { kind = case.fault, latency = 30 } } } })
      use(m.url)
      fresh_store()
      local budget = resil.budget("jobs-cancel-cut", { limit = 1 })
      cancel_while_creating({ model = FLUX, input = { prompt = "a cat", num_outputs = 2 } }, "jobs-cancel-cut")
      assert.is_true(helpers.wait_until(function() return budget:state().reserved == 0 end, 10))
      assert.are.equal(case.usd or 0, resil.cost.total())
      local st = budget:state()
      assert.are.same({ 0, case.usd or 0 }, { #st.holds, st.spent })
      assert.is_nil(m:stats().routes.cancel) -- no id: nothing to cancel
      m:stop()
      m = nil
    end
  end)

  -- (resil.once makes the create in a task of its own, which its caller's cancel leaves running: the id is kept)
  it("inside a run (a key), a create in flight at its caller's cancel is the resumed run's job: none made again",
    function()
      m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = { { kind = "ok", latency = 30 } } } })
      use(m.url)
      cancel_while_creating({ model = FLUX, key = "resumed" })
      local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, deadline = 300, key = "resumed" }))
      local s = m:stats()
      assert.are.same({ 1, 1 }, { s.routes.predictions, s.billed.jobs })
      assert.is_nil(s.routes.cancel)
      assert.are.equal(0.003, r.cost_usd)
      assert.are.equal(1, resil.cost.breakdown("model")[1].calls)
    end)

  -- (before: inside a run the create is resil.once's, in a task of its own, and the guard left a keyed
  -- job to the resumed run; but a cut create is not kept (its failure frees the key): nobody recorded
  -- it, a job made and billed with no row, its hold given back)
  it("inside a run (a key), a create cut after its 201 when its caller was already canceled is recorded at its " ..
     "estimate, once; the key asked again makes a new job, recorded as its own", function()
    m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = { { kind = "truncate", latency = 30 } } } })
    use(m.url)
    local budget = resil.budget("jobs-cancel-cut-key", { limit = 1 })
    local job = { model = FLUX, input = { prompt = "a cat", num_outputs = 2 }, key = "cut-1" }
    cancel_while_creating(job, "jobs-cancel-cut-key")
    assert.is_true(helpers.wait_until(function() return budget:state().reserved == 0 end, 10))
    assert.is_true(helpers.wait_until(function() return resil.cost.total() > 0 end, 10))
    assert.are.equal(0.006, resil.cost.total())
    local st = budget:state()
    assert.are.same({ 0, 0.006 }, { #st.holds, st.spent })
    -- the resumed run: the cut job cannot be followed (no id), so the key's next call makes a new one
    job.budget, job.deadline = "jobs-cancel-cut-key", 300
    local r = assert(jobs.job(job))
    assert.are.equal(2, m:stats().routes.predictions)
    local rows = resil.cost.breakdown("model")
    assert.are.same({ 2, 0.012 }, { rows[1].calls, rows[1].usd })
    assert.are.equal(0.006, r.cost_usd)
  end)

  -- the same when the cancel comes after resil.once spawned the create's task but before that task began
  -- (its hold already given back then): the cut job is counted in the budget all the same
  it("inside a run (a key), a caller canceled before resil.once's task began: a create cut then is recorded",
    function()
      m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = { "truncate" } } })
      use(m.url)
      local budget = resil.budget("jobs-cut-early", { limit = 1 })
      local spawn, caller = resil.spawn, nil
      finally(function() resil.spawn = spawn end)
      resil.spawn = function(fn, ...)
        if select(3, ...) == "ai.job:cut-early" then -- (once's task for the create: a cancel queued before it)
          resil.spawn = spawn
          spawn(function() caller:cancel() end)
        end
        return spawn(fn, ...)
      end
      caller = spawn(jobs.job, { model = FLUX, input = { prompt = "a cat", num_outputs = 2 }, key = "cut-early",
        budget = "jobs-cut-early" })
      local ok, err = caller:join()
      assert.is_false(ok)
      assert.are.equal("canceled", err.kind)
      assert.is_true(helpers.wait_until(function() return resil.cost.total() > 0 end, 10))
      assert.are.equal(1, m:stats().routes.predictions)
      assert.are.equal(0.006, resil.cost.total())
      local st = budget:state()
      assert.are.same({ 0, 0, 0.006 }, { st.reserved, #st.holds, st.spent })
    end)

  -- (before: retried as a reset, it made a second job; the first, paid, was never followed nor recorded)
  it("a create whose answer was cut after its 201 is not made again, and is recorded at its estimate", function()
    m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = { "truncate" } } })
    use(m.url)
    resil.budget("jobs-cut-create", { limit = 1 })
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat", num_outputs = 2 }, budget = "jobs-cut-create" })
    assert.is_nil(r)
    assert.are.equal("reset", err.kind)
    assert.are.equal(1, m:stats().routes.predictions)
    assert.are.equal(0.006, err.cost_usd)
    assert.are.equal(0.006, resil.cost.total({ budget = "jobs-cut-create" }))
    local st = resil.budget("jobs-cut-create"):state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
  end)

  it("gives up after `attempts` jobs with the last job's error", function()
    m = resil.mock.start({ jobs = { fail = 1, polls = 0, error = "CUDA out of memory" } })
    use(m.url)
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, attempts = 3 })
    assert.is_nil(r)
    assert.are.equal("job_failed", err.kind)
    assert.matches("CUDA out of memory", err.message)
    assert.are.equal(3, #err.job_ids)
    assert.are.equal(3, m:stats().routes.predictions)
  end)

  it("retries a failed job as a new job under key#2, and a repeat replays both creates", function()
    m = resil.mock.start({ jobs = { fates = { "failed", "succeeded" }, polls = 0 } })
    use(m.url)
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, key = "k" }))
    assert.are.equal(2, r.attempts)
    assert.are.equal(2, m:stats().routes.predictions)
    -- the same job asked again (a resumed run): job 1 is read again (failed), key#2's job
    -- is the answer; nothing is created
    local again = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" }, key = "k" }))
    assert.are.equal(r.id, again.id)
    assert.are.equal(2, m:stats().routes.predictions)
    -- one ledger row per job, however often it is read
    assert.are.equal(1, resil.cost.breakdown("model")[1].calls)
  end)

  it("does not create again after a create timed out (the provider may have made the job)", function()
    m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = { "hang" }, prediction = { "hang" } } })
    use(m.url)
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, timeout = 5 })
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" } })
    assert.is_nil(r)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(1, m:stats().routes.predictions)
    -- a read that timed out is read again
    r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" } }))
    assert.are.equal(2, m:stats().routes.prediction)
  end)

  -- (before: outside a run the call failed with the gateway's 502, and the job it had made ran on, billed,
  -- with no row)
  it("outside a run, a create a gateway answered 502 after the job was made finds the job and follows it", function()
    m = resil.mock.start({ jobs = { polls = 1, errors = { predictions = { { status = 502, made = true } } } } })
    use(m.url)
    local r, err
    local lines = helpers.logged(function() r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" } }) end)
    assert(r, err and tostring(err))
    assert.are.equal("mock" .. m.instance .. "00001", r.id)
    assert.are.equal(1, m:stats().routes.predictions)
    assert.are.equal(1, resil.cost.breakdown("model")[1].calls)
    local said = false
    for _, l in ipairs(lines) do said = said or (l.msg or ""):match("had made the job; following it") ~= nil end
    assert.is_true(said)
  end)

  -- (the reviewer's find: the look-up took the call's own first job, failed minutes before with the
  -- same input, for the second create's: followed, it failed again, the second job ran on
  -- unrecorded, and a third was made and paid)
  it("outside a run, the look-up after a create answered 502 never takes one of the call's own earlier jobs", function()
    m = resil.mock.start({ jobs = { polls = 0, fates = { "failed", "succeeded" },
      errors = { predictions = { "ok", { status = 502, made = true } } } } })
    use(m.url)
    local r, err = jobs.job({ model = FLUX, input = { prompt = "a cat" }, attempts = 3 })
    assert(r, err and tostring(err))
    assert.are.equal("mock" .. m.instance .. "00002", r.id)
    assert.are.equal(2, m:stats().routes.predictions)
    local rows = 0
    for _, row in ipairs(resil.cost.breakdown("model")) do rows = rows + row.calls end
    assert.are.equal(1, rows) -- (the second job's outputs; the failed one made none, and is billed none)
  end)

  -- (before: a retry table's timeout became each attempt's deadline too, and a create that took
  -- longer was cut: the job made and paid, no row in the ledger, and a retry made a second)
  it("a create slower than the retry table's timeout is waited for: one job, one row", function()
    m = resil.mock.start({ jobs = { polls = 0 }, sequence = { predictions = { { kind = "ok", latency = 8 } } } })
    use(m.url)
    jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = KEYS.replicate, retry = { timeout = 5 } })
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" } }))
    assert.are.equal("succeeded", r.status)
    assert.are.equal(1, m:stats().routes.predictions)
    assert.are.equal(1, resil.cost.breakdown("model")[1].calls)
  end)

  it("takes a throttled create (429 with Replicate's detail) as rate_limited, waits and retries", function()
    m = resil.mock.start({ jobs = { polls = 0, errors = { predictions = { { status = 429, retry_after = 4 } } } } })
    use(m.url)
    local raw = http.request({ method = "POST", url = m.url .. "/v1/predictions", json = { version = "v", input = {} },
      headers = { Authorization = "Bearer " .. KEYS.replicate } })
    m:configure({ jobs = { polls = 0, errors = { predictions = { { status = 429, retry_after = 4 } } } } })
    local verdict = classify.outcome(raw)
    assert.are.equal("rate_limited", verdict.class)
    assert.matches("^429 replicate_throttled: Request was throttled", verdict.reason)
    assert.are.equal(4, verdict.retry_after)
    local t0 = resil.now()
    assert(jobs.job({ model = FLUX, input = { prompt = "a cat" } }))
    assert.is_true(resil.now() - t0 >= 4)
    assert.are.equal(2, m:stats().statuses["429"]) -- the probe and the job's first create
  end)

  -- (before: a job's outcome was never counted for its alias's migration: a canary whose every job
  -- failed was never rolled back, and went on failing its share of the calls)
  it("a job through a migrating alias counts for its side: a canary whose jobs fail is rolled back", function()
    local ai = require "policies.ai"
    local registry = require "policies.registry"
    local saved = registry.random
    finally(function() registry.random = saved; registry.use() end)
    registry.use({ video = { use = FLUX, migrate = { to = "replicate/black-forest-labs/flux-dev", share = 0.5,
      sticky = false, rollback = { error_rate = 0.05, min_calls = 4 } } } })
    local n = 0
    registry.random = function() n = n + 1 return n % 2 == 1 and 0.1 or 0.9 end -- new, old, new, old, ...
    m = resil.mock.start({ jobs = { polls = 0, fates = { "failed", "succeeded", "failed", "succeeded", "failed",
      "succeeded", "failed", "succeeded" } } })
    use(m.url)
    helpers.logged(function()
      for i = 1, 8 do
        local r, err = ai.job({ model = "video", input = { prompt = "a cat " .. i }, attempts = 1 })
        if i % 2 == 1 then assert.are.equal("job_failed", err.kind) else assert.are.equal(FLUX, r.model) end
      end
    end)
    local st = registry.migration_state("video")
    assert.are.equal(0, st.share)
    assert.are.equal("error_rate", st.rolled_back and st.rolled_back.reason)
    assert.are.equal(4, st.rolled_back.new_calls)
    -- rolled back: every job goes to the old version
    local r = assert(ai.job({ model = "video", input = { prompt = "a dog" } }))
    assert.are.equal(FLUX, r.model)
    assert.are.equal("old", r.migration.side)
  end)
end)

describe("ai.job on the fal queue", function()
  local m
  before_each(function() resil.clock.virtual(); fresh_store() end)
  after_each(function() if m then m:stop() end; m = nil end)

  it("submits, follows IN_QUEUE / IN_PROGRESS / COMPLETED, and fetches the result", function()
    m = resil.mock.start({ jobs = { polls = 2 } })
    use(m.url)
    local r = assert(jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" } }))
    local s = m:stats()
    assert.are.equal(1, s.routes.fal_submit)
    assert.are.equal(3, s.routes.fal_status)
    assert.are.equal(1, s.routes.fal_result)
    assert.matches("^https://", r.output.images[1].url)
    assert.are.equal(0.025, r.cost_usd)
  end)

  it("serves a namespaced app's queue under workflows/owner/app, as fal does", function()
    m = resil.mock.start({ jobs = { polls = 1 } })
    use(m.url)
    local raw = http.request({ method = "POST", url = m.url .. "/fal/workflows/acme/flow/run", json = {},
      headers = { authorization = "Key " .. KEYS.fal } })
    assert.matches("/fal/workflows/acme/flow/requests/[^/]+/status$", json.decode(raw.body).status_url)
    local r = assert(jobs.job({ model = "fal/workflows/acme/flow/run", input = { prompt = "a cat" } }))
    assert.matches("^https://", r.output.images[1].url)
    assert.are.equal(1, m:stats().billed.jobs)
    assert.is_nil(m:stats().statuses[404])
  end)

  -- fal answers an account out of balance 403 {"detail": "User is locked. Reason: Exhausted balance..."}
  -- (fal-ai/fal#1112, #1147). (before: kind "auth", as a wrong key, which a fallback chain stops at)
  it("an account out of balance is quota_exceeded, not retried, not auth", function()
    m = resil.mock.start({ jobs = { errors = { fal_submit = { { code = "exhausted_balance" } } } } })
    use(m.url)
    local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" } })
    assert.is_nil(r)
    assert.are.equal("quota_exceeded", err.kind)
    assert.is_false(err.retryable)
    assert.are.equal(1, m:stats().routes.fal_submit)
    local v = classify.outcome({ status = 403, headers = {}, body = '{"detail":"User is locked. Reason: Exhausted ' ..
      'balance. Top up your balance at fal.ai/dashboard/billing."}' })
    assert.are.same({ "quota_exceeded", true }, { v.class, v.fallback })
  end)

  -- (before: "402 replicate_insufficient_credit", "403 fal_exhausted_balance", "401
  -- elevenlabs_quota_exceeded": the name of our rule, the provider's word on what to do unsaid)
  it("a provider's error a rule names says the provider's detail too", function()
    m = resil.mock.start({ jobs = { errors = { predictions = { 402 }, fal_submit = { { code = "exhausted_balance" } },
      tts = { { code = "quota_exceeded" } } } } })
    use(m.url)
    local _, err = jobs.job({ model = FLUX, input = { prompt = "a cat" } })
    assert.matches("402 replicate_insufficient_credit: You have insufficient credit to run this model.", err.message,
      1, true)
    _, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" } })
    assert.matches("403 fal_exhausted_balance: User is locked. Reason: Exhausted balance.", err.message, 1, true)
    _, err = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = "Hi there" })
    assert.matches("401 elevenlabs_quota_exceeded: This request exceeds your quota of 10000.", err.message, 1, true)
    assert.are.same({ "quota_exceeded", "quota_exceeded" }, { err.kind, err.class })
  end)

  it("cancels through cancel_url at the deadline", function()
    m = resil.mock.start({ jobs = { fates = { "stuck", "stuck" } } })
    use(m.url)
    local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, deadline = 30 })
    assert.is_nil(r)
    assert.are.equal("deadline", err.kind)
    assert.are.equal(2, m:stats().routes.fal_cancel)
    assert.are.equal(2, m:stats().billed.canceled)
  end)

  it("takes a request that completed just before its deadline's cancel (ALREADY_COMPLETED)", function()
    m = resil.mock.start({ jobs = { duration = 10 } })
    use(m.url)
    local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, deadline = 12 })
    assert.is_nil(err)
    assert.are.equal(1, r.attempts)
    assert.are.equal(0.025, r.cost_usd)
    local s = m:stats()
    assert.are.equal(1, s.routes.fal_submit)
    assert.are.equal(1, s.billed.jobs)
  end)

  it("reads a completed request's result again after bare 5xx, instead of paying for a second request", function()
    m = resil.mock.start({ jobs = { polls = 1, errors = { fal_result = { 503, 503, 503, 503 } } } })
    use(m.url)
    local r = assert(jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, deadline = 300 }))
    assert.are.equal(1, r.attempts)
    local s = m:stats()
    assert.are.equal(1, s.routes.fal_submit)
    assert.are.equal(1, s.billed.jobs)
    assert.are.equal(0.025, resil.cost.breakdown("model")[1].usd)
  end)

  -- (before: such a request, paid at fal, had no row: the ledger said $0 for $0.05 billed, and a
  -- budget let the replacement through on money already spent)
  -- (before: taken for a result that could not be read: recorded at the outputs it asked for, and replaced by
  -- a request with the same input, refused the same way and recorded again)
  it("a request whose app refused its input (a 422 at its result) made nothing: no row, not sent again", function()
    local flagged = { status = 422, detail = { { loc = { "body", "prompt" }, type = "content_policy_violation",
      msg = "The content could not be processed because it contained material flagged by a content checker." } } }
    m = resil.mock.start({ jobs = { polls = 1, errors = { fal_result = { flagged, flagged } } } })
    use(m.url)
    local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, deadline = 300 })
    assert.is_nil(r)
    assert.are.equal("job_failed", err.kind)
    assert.is_false(err.retryable)
    assert.matches("its input was refused %(HTTP 422%).*content_policy_violation", err.message)
    assert.are.equal(1, m:stats().routes.fal_submit)
    assert.are.same({}, resil.cost.breakdown("model"))
  end)

  it("records a request fal said COMPLETED whose result cannot be read (a 404) at its outputs, estimated", function()
    m = resil.mock.start({ jobs = { polls = 1, errors = { fal_result = { 404, 404 } } } })
    use(m.url)
    resil.budget("fal-404", { limit = 1 })
    local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, budget = "fal-404",
      deadline = 300 })
    assert.is_nil(r)
    assert.matches("its result could not be read", err.message)
    local s = m:stats()
    assert.are.equal(2, s.billed.jobs)
    local rows = assert(helpers.backend(assert(resil.store())):cost_rows({}))
    assert.are.equal(2, #rows)
    for _, row in ipairs(rows) do
      local u = resil.json.decode(row.units)
      assert.are.equal(1, u.outputs)
      assert.is_true(u.estimated)
    end
    assert.are.equal(s.billed.usd, resil.cost.total({})) -- (the ledger is what the provider billed)
    local st = assert(resil.budget("fal-404"):state())
    assert.are.equal(s.billed.usd, st.spent)
    assert.are.equal(0, st.reserved)
  end)

  it("maps X-Fal-Error-Type: a runner failure is retried, a bad request is not", function()
    m = resil.mock.start({ jobs = { polls = 0, errors = { fal_submit = { { error_type = "runner_disconnected" } } } } })
    use(m.url)
    local raw = http.request({ method = "POST", url = m.url .. "/fal/fal-ai/flux/dev", json = {},
      headers = { Authorization = "Key " .. KEYS.fal } })
    assert.are.equal("runner_disconnected", raw.headers["x-fal-error-type"])
    local verdict = classify.outcome(raw)
    assert.matches("^503 fal_runner_error", verdict.reason)
    assert.is_true(verdict.retryable)
    m:configure({ jobs = { polls = 0, errors = { fal_submit = { { error_type = "runner_disconnected" } } } } })
    assert(jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" } }))
    assert.are.equal(3, m:stats().routes.fal_submit) -- the probe above, the runner failure, the retry
    m:configure({ jobs = { errors = { fal_submit = { { error_type = "bad_request" } } } } })
    local r, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" } })
    assert.is_nil(r)
    assert.are.equal("bad_request", err.class)
    assert.are.equal(4, m:stats().routes.fal_submit)
  end)
end)

describe("ai.speech on ElevenLabs", function()
  local m
  before_each(function() resil.clock.virtual(); fresh_store() end)
  after_each(function() if m then m:stop() end; m = nil end)

  it("returns the audio bytes and bills per character", function()
    m = resil.mock.start({})
    use(m.url)
    local text = ("Hello, world. "):rep(100) -- 1400 characters
    local r = assert(jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "JBFqnCBsd6RMkjVDRZzb",
      text = text }))
    assert.are.equal("ID3", r.audio:sub(1, 3))
    assert.are.equal("audio/mpeg", r.content_type)
    assert.are.equal(1400, r.characters)
    assert.is_true(math.abs(r.cost_usd - 1.4 * 0.05) < 1e-9)
    assert.are.equal(1400, m:stats().billed.characters)
    assert.is_true(math.abs(resil.cost.total({ provider = "elevenlabs" }) - 0.07) < 1e-9)
  end)

  -- (before: the cut answer was retried and only the second recorded: 2,800 characters billed, 1,400 in the
  -- ledger and the budget)
  it("an answer whose audio was cut after its 200 was billed: its characters in the ledger and the budget", function()
    m = resil.mock.start({ sequence = { tts = { "truncate" } } })
    use(m.url)
    local b = resil.budget("speech-cut", { limit = 1 })
    local text = ("Hello, world. "):rep(100) -- 1400 characters
    local r = assert(jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = text,
      budget = "speech-cut" }))
    assert.are.equal(2800, m:stats().billed.characters)
    assert.is_true(math.abs(r.cost_usd - 2 * 1.4 * 0.05) < 1e-9, tostring(r.cost_usd))
    assert.is_true(math.abs(resil.cost.total({ provider = "elevenlabs" }) - r.cost_usd) < 1e-9)
    assert.is_true(math.abs(b:state().spent - r.cost_usd) < 1e-6)
    assert.are.equal(0, b:state().reserved)
    -- cut every time: the call fails, what it was billed is still recorded
    jobs.configure("elevenlabs", { base_url = m.url, api_key = KEYS.elevenlabs, retry = { max_retries = 1 } })
    m:configure({ sequence = { tts = { "truncate", "truncate" } } })
    local _, err = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = text })
    assert.are.equal("reset", err.kind)
    assert.is_true(math.abs(err.cost_usd - 2 * 1.4 * 0.05) < 1e-9)
    assert.are.equal(5600, m:stats().billed.characters)
    assert.is_true(math.abs(resil.cost.total({ provider = "elevenlabs" }) - 4 * 1.4 * 0.05) < 1e-9)
  end)

  -- (before: its caller canceled while it retried, the cut answer, billed, was never recorded, and its hold
  -- counted until it expired)
  it("a speech canceled after an answer cut after its 200: the cut one recorded, its hold given back", function()
    m = resil.mock.start({ sequence = { tts = { "truncate", "hang" } } })
    use(m.url)
    local b = resil.budget("speech-cut-cancel", { limit = 1 })
    local text = ("Hello, world. "):rep(100) -- 1400 characters
    local t = resil.spawn(jobs.speech, { model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = text,
      budget = "speech-cut-cancel" })
    assert.is_true(helpers.wait_until(function() return m:stats().routes.tts == 2 end, 10))
    assert.are.equal(1, #b:state().holds)
    t:cancel()
    assert.is_true(helpers.wait_until(function() return b:state().reserved == 0 end, 10))
    assert.is_true(helpers.wait_until(function() return resil.cost.total({ provider = "elevenlabs" }) > 0 end, 10))
    assert.is_true(math.abs(resil.cost.total({ provider = "elevenlabs" }) - 1.4 * 0.05) < 1e-9)
    local st = b:state()
    assert.are.same({ 0, 0 }, { st.reserved, #st.holds })
    assert.is_true(math.abs(st.spent - 1.4 * 0.05) < 1e-6)
  end)

  -- (before: canceled after its 200 while the audio was read, it gave its hold back and recorded nothing,
  -- though the provider billed it)
  it("a speech canceled while its audio is read was billed: its characters recorded, its hold given back", function()
    m = resil.mock.start({ routes = { ["POST /v1/text-to-speech/v1"] = function()
      return { status = 200, headers = { ["content-type"] = "audio/mpeg" }, chunks = { "ID3" .. ("\0"):rep(500), "rest" },
        stall_after = 1 }
    end } })
    use(m.url)
    local b = resil.budget("speech-cancel-body", { limit = 1 })
    local text = ("Hello, world. "):rep(100) -- 1400 characters
    local t = resil.spawn(jobs.speech, { model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = text,
      budget = "speech-cancel-body" })
    assert.is_true(helpers.wait_until(function() return m:stats().total == 1 end, 10))
    helpers.wait_until(function() return false end, 0.3) -- (the 200 and the first chunk reach the client)
    t:cancel()
    assert.is_true(helpers.wait_until(function() return b:state().reserved == 0 end, 10))
    assert.is_true(helpers.wait_until(function() return resil.cost.total({ provider = "elevenlabs" }) > 0 end, 10))
    assert.is_true(math.abs(resil.cost.total({ provider = "elevenlabs" }) - 1.4 * 0.05) < 1e-9)
    assert.is_true(math.abs(b:state().spent - 1.4 * 0.05) < 1e-6)
  end)

  it("does not retry quota_exceeded; retries concurrent_limit_exceeded", function()
    m = resil.mock.start({ jobs = { errors = { tts = { { code = "quota_exceeded" } } } } })
    use(m.url)
    local spec = { model = "elevenlabs/eleven_flash_v2_5", voice = "v1", text = "Hi there" }
    local r, err = jobs.speech(spec)
    assert.is_nil(r)
    assert.are.equal("quota_exceeded", err.class)
    assert.is_false(err.retryable)
    assert.are.equal(1, m:stats().routes.tts)
    m:configure({ jobs = { errors = { tts = { { code = "concurrent_limit_exceeded" } } } } })
    assert(jobs.speech(spec))
    assert.are.equal(3, m:stats().routes.tts)
  end)
end)

describe("costs and budgets of jobs", function()
  local m
  before_each(function() resil.clock.virtual(); fresh_store() end)
  after_each(function() if m then m:stop() end; m = nil end)

  it("prices per output, per second of video and per 1,000 characters", function()
    local pricing = require "policies.pricing_media"
    assert.are.equal(0.006, pricing.cost("replicate", FLUX, { outputs = 2 }))
    assert.is_true(math.abs(pricing.cost("replicate", "replicate/bytedance/seedance-1-lite:abc123",
      { video_seconds = 5 }) - 0.18) < 1e-9) -- a version pin finds the unpinned price
    assert.is_true(math.abs(pricing.cost("elevenlabs", "elevenlabs/eleven_multilingual_v2",
      { characters = 2500 }) - 0.25) < 1e-9)
    assert.is_nil(pricing.cost("replicate", "replicate/acme/unknown", { outputs = 1 }))
  end)

  it("reserves against a budget first and settles the job's actual cost", function()
    m = resil.mock.start({ jobs = { polls = 0 } })
    use(m.url)
    resil.budget("media", { limit = 0.01 })
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat", num_outputs = 2 }, budget = "media" }))
    assert.are.equal(0.006, r.cost_usd)
    assert.are.equal(0.006, resil.cost.total({ budget = "media" }))
    -- the next estimate (0.006) does not fit in what is left: refused before any create
    local again, err = jobs.job({ model = FLUX, input = { prompt = "a dog", num_outputs = 2 }, budget = "media" })
    assert.is_nil(again)
    assert.are.equal("budget_exceeded", err.kind)
    assert.are.equal(1, m:stats().routes.predictions)
  end)

  it("records a model without a price unpriced, with one warning, never a silent zero", function()
    m = resil.mock.start({ jobs = { polls = 0 } })
    use(m.url)
    local results = {}
    local lines = capture_log(function()
      for i = 1, 2 do results[i] = assert(jobs.job({ model = "replicate/acme/unpriced:abc", input = { n = i } })) end
    end)
    assert.is_nil(results[1].cost_usd)
    local warnings = 0
    for _, l in ipairs(lines) do if l.msg:match("no price") then warnings = warnings + 1 end end
    assert.are.equal(1, warnings)
    local rows = resil.cost.breakdown("model")
    assert.are.equal(2, rows[1].calls)
  end)

  -- (before: a model billed by the second was held at $0, whatever it might run: ten such jobs at once on a
  -- $0.05 budget spent $0.20)
  it("holds a job billed by the second at its deadline's worth: jobs at once spend no more than the budget", function()
    local pricing = require "policies.pricing_media"
    pricing.models["replicate/acme/gpu"] = { per_predict_second = 0.001 }
    finally(function() pricing.models["replicate/acme/gpu"] = nil end)
    m = resil.mock.start({ jobs = { duration = 20, predict_time = 20 } })
    use(m.url)
    local b = resil.budget("media-gpu", { limit = 0.05 })
    local tasks, served = {}, 0
    for i = 1, 5 do
      tasks[i] = resil.spawn(jobs.job, { model = "replicate/acme/gpu", input = { prompt = "cat " .. i }, attempts = 1,
        deadline = 40, budget = "media-gpu" })
    end
    for i = 1, 5 do
      local _, r, err = tasks[i]:join()
      if r then served = served + 1 else assert.are.equal("budget_exceeded", err.kind) end
    end
    assert.is_true(served >= 1)
    local st = b:state()
    assert.is_true(st.spent <= 0.05, tostring(st.spent))
    assert.are.equal(0, st.reserved)
  end)

  -- (before: deadline = math.huge raised "budget:reserve: estimate must be a number from 0 to 1e9" out of
  -- jobs.lua, and a price of 0 a second gave NaN the same way; a job's deadline is now a year at most,
  -- refused at the caller's line)
  it("a budgeted job billed by the second with no bound on its cost is refused before any request", function()
    local pricing = require "policies.pricing_media"
    pricing.models["replicate/acme/gpu"] = { per_predict_second = 0.001 }
    pricing.models["replicate/acme/free"] = { per_predict_second = 0 }
    finally(function() pricing.models["replicate/acme/gpu"], pricing.models["replicate/acme/free"] = nil, nil end)
    m = resil.mock.start({ jobs = { polls = 0 } })
    use(m.url)
    resil.budget("media-unbounded", { limit = 5 })
    for _, model in ipairs({ "replicate/acme/gpu", "replicate/acme/free" }) do
      local ok, err = pcall(function()
        local r = jobs.job({ model = model, input = { prompt = "a cat" }, attempts = 1, deadline = math.huge,
          budget = "media-unbounded" })
        return r
      end)
      assert.is_false(ok, model)
      assert.matches("jobs_spec.lua:%d+: ai.job: deadline must be a number of seconds > 0, a year at most", err)
    end
    assert.is_nil(m:stats().routes.predictions) -- (no create sent)
    assert.are.equal(0, resil.budget("media-unbounded"):state().reserved)
  end)

  -- (before: a typo priced every job at $0, which wrote no ledger row, NaN the same, and "abc" raised out of
  -- ai.job; pricing.lua's tables were checked so, pricing_media.lua's not)
  it("a malformed price (a typo, a string, NaN) is no price: the job's row is written without one, and said", function()
    local pricing = require "policies.pricing_media"
    local bad = { ["replicate/acme/typo"] = { per_outptu = 0.003 }, ["replicate/acme/text"] = { per_output = "abc" },
      ["replicate/acme/nan"] = { per_output = 0 / 0 } }
    for model, price in pairs(bad) do pricing.models[model] = price end
    finally(function() for model in pairs(bad) do pricing.models[model] = nil end end)
    m = resil.mock.start({ jobs = { polls = 0 } })
    use(m.url)
    local lines = capture_log(function()
      for model in pairs(bad) do
        local r = assert(jobs.job({ model = model, input = { prompt = "a cat" }, attempts = 1 }))
        assert.is_nil(r.cost_usd, model)
      end
    end)
    local said = 0
    for _, l in ipairs(lines) do if tostring(l.error):match("^malformed price for replicate/acme/") then said = said + 1 end end
    assert.are.equal(3, said)
    local rows = resil.cost.breakdown("model")
    assert.are.equal(3, #rows)
    for _, row in ipairs(rows) do assert.are.same({ 1, 1 }, { row.calls, row.unpriced }) end
  end)

  -- (before: nothing was held for it and its row had no price, so a budget of $0.01 let every such
  -- job and speech through, paid and never counted against it)
  it("refuses a budgeted job or speech of a model without a price, before any request, as a chat call's", function()
    m = resil.mock.start({ jobs = { polls = 0 } })
    use(m.url)
    resil.budget("media-unpriced", { limit = 0.01 })
    local r, err = jobs.job({ model = "replicate/acme/unpriced:abc", input = { prompt = "a cat" },
      budget = "media-unpriced" })
    assert.is_nil(r)
    assert.are.equal("unpriced", err.kind)
    assert.matches("media%-unpriced", err.message)
    local s, serr = jobs.speech({ model = "elevenlabs/eleven_unknown_v9", voice = "v1", text = "hello",
      budget = "media-unpriced" })
    assert.is_nil(s)
    assert.are.equal("unpriced", serr.kind)
    assert.is_nil(m:stats().routes.predictions)
    assert.are.equal(0, #resil.cost.breakdown("model"))
  end)
end)

describe("the mock's job APIs reject what the real ones reject", function()
  local m
  before_each(function() resil.clock.virtual() end)
  after_each(function() if m then m:stop() end; m = nil end)

  it("answers a request without its key with the provider's error body", function()
    m = resil.mock.start({})
    local rep = http.request({ method = "POST", url = m.url .. "/v1/predictions",
      json = { version = "v", input = {} } })
    assert.are.equal(401, rep.status)
    assert.are.equal("Unauthenticated", json.decode(rep.body).title)
    local fal = http.request({ method = "POST", url = m.url .. "/fal/fal-ai/flux/dev", json = {} })
    assert.are.equal(401, fal.status)
    assert.is_string(json.decode(fal.body).detail)
    local tts = http.request({ method = "POST", url = m.url .. "/v1/text-to-speech/v1", json = { text = "hi" } })
    assert.are.equal(401, tts.status)
    assert.are.equal("needs_authorization", json.decode(tts.body).detail.status)
    assert.are.equal(1, m:stats().routes.tts)
  end)

  it("requires a version (or a model path) and an input for a prediction, a text for speech", function()
    m = resil.mock.start({})
    local auth = { Authorization = "Bearer " .. KEYS.replicate }
    local no_version = http.request({ method = "POST", url = m.url .. "/v1/predictions", headers = auth,
      json = { input = {} } })
    assert.are.equal(422, no_version.status)
    assert.are.equal("version", json.decode(no_version.body).invalid_fields[1].field)
    local by_model = http.request({ method = "POST", url = m.url .. "/v1/models/acme/img/predictions", headers = auth,
      json = { input = {} } })
    assert.are.equal(201, by_model.status)
    local no_text = http.request({ method = "POST", url = m.url .. "/v1/text-to-speech/v1",
      headers = { ["xi-api-key"] = KEYS.elevenlabs }, json = { model_id = "eleven_flash_v2_5" } })
    assert.are.equal(422, no_text.status)
    assert.are.equal("Field required", json.decode(no_text.body).detail[1].msg)
  end)
end)

-- (before: "HTTP 422", "HTTP 404": a version the provider stopped serving, an input it refused, a
-- voice that is gone said nothing more, what the provider's body said dropped)
describe("a job or speech the provider refuses", function()
  local m
  before_each(function() resil.clock.virtual(); fresh_store() end)
  after_each(function() if m then m:stop() end; m = nil end)

  it("says what the provider said, sent once", function()
    m = resil.mock.start({ jobs = { polls = 0, errors = {
      predictions = { { status = 422, detail = "Invalid version or not permitted" } },
      fal_submit = { { status = 422, detail = { { loc = { "body", "prompt" }, msg = "Field required",
        type = "missing" } } } },
      tts = { { code = "voice_not_found" } } } } })
    use(m.url)
    local _, err = jobs.job({ model = FLUX .. ":5c7d5dc6", input = { prompt = "a cat" } })
    assert.are.equal("bad_request", err.kind)
    assert.matches("HTTP 422: Invalid version or not permitted", err.message, 1, true)
    _, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { image_size = "square" } })
    assert.are.equal("bad_request", err.kind)
    assert.matches("HTTP 422: body.prompt: Field required", err.message, 1, true)
    _, err = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "gone", text = "hello" })
    assert.are.equal("not_found", err.kind)
    assert.matches("HTTP 404: A voice with the voice_id was not found.", err.message, 1, true)
    local routes = m:stats().routes
    assert.are.same({ 1, 1, 1 }, { routes.predictions, routes.fal_submit, routes.tts })
  end)
end)

describe("ai.job and ai.speech keys", function()
  it("name the missing variable before any request is sent", function()
    local m = resil.mock.start({})
    local r = helpers.run(("env -u REPLICATE_API_TOKEN -u FAL_KEY -u ELEVENLABS_API_KEY %s -e '%s'"):format(
      helpers.resil, [[
local jobs = require "policies.jobs"
local _, e1 = jobs.job({ model = "replicate/acme/x:abc", input = {} })
local _, e2 = jobs.job({ model = "fal/fal-ai/flux/dev", input = {} })
local _, e3 = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v", text = "hi" })
print(e1.kind, e1.variable, e2.variable, e3.variable)
print(e1.message)]]))
    assert.matches("missing_key%s+REPLICATE_API_TOKEN%s+FAL_KEY%s+ELEVENLABS_API_KEY", r.stdout)
    assert.matches("REPLICATE_API_TOKEN is not set", r.stdout)
    m:stop()
  end)

  -- fal's clients take FAL_KEY, else FAL_KEY_ID and FAL_KEY_SECRET as "id:secret" (fal-js config.ts).
  -- (before: "FAL_KEY is not set" with both of those set, as fal's docs had them)
  it("fal: FAL_KEY_ID and FAL_KEY_SECRET are the key id:secret when FAL_KEY is not set", function()
    local r = helpers.run(("env -u FAL_KEY FAL_KEY_ID=kid-0001 FAL_KEY_SECRET=s3cr3t-0001 %s -e '%s'"):format(
      helpers.resil, [[
local resil = require "resil"
local jobs = require "policies.jobs"
local seen
local server = assert(resil.server.listen({ handler = function(req)
  if req.method == "POST" then seen = req.headers.authorization; return { status = 200, body = [=[{"request_id":"r1"}]=] } end
  if req.path:match("/status$") then return { status = 200, body = [=[{"status":"COMPLETED"}]=] } end
  return { status = 200, body = [=[{"images":[{"url":"https://x/a.png"}]}]=] }
end }))
jobs.configure("fal", { base_url = ("http://127.0.0.1:%d/fal"):format(server:port()), poll = { first = 0.01 } })
local r, e = jobs.job({ model = "fal/fal-ai/flux/dev", input = {} })
print(r and r.status, e, seen)]]))
    assert.are.equal("succeeded\tnil\tKey kid-0001:s3cr3t-0001\n", r.stdout, r.stderr)
  end)

  -- (before: a reload loaded policies.jobs afresh, its configuration empty: ai.job asked for the
  -- variable (missing_key), or sent the job with it to the provider's default base_url)
  it("given by jobs.configure are kept across a policy reload, as ai.configure's", function()
    local r = helpers.run(("env -u REPLICATE_API_TOKEN %s --log-level off -e '%s'"):format(helpers.resil, [[
local resil = require "resil"
local ai = require "policies.ai"
local jobs = require "policies.jobs"
resil.clock.virtual()
local m = resil.mock.start({ jobs = { polls = 0 } })
jobs.configure("replicate", { base_url = m.url .. "/v1", api_key = "r8_spec_token_0001" })
local function job()
  local r, err = ai.job({ model = "replicate/black-forest-labs/flux-schnell", input = { prompt = "a" } })
  return r and "made" or tostring(err)
end
print(job())
assert(resil.reload())
print(job())
print(m:stats().routes.predictions)
m:stop()]]))
    assert.are.equal("made\nmade\n2\n", r.stdout, r.stderr)
  end)

  it("raise at the caller's line for misuse: a model no provider serves, no input, no text", function()
    local ok, err = pcall(function() local r = jobs.job({ model = "nobody/x", input = {} }); return r end)
    assert.is_false(ok)
    assert.matches("jobs_spec.lua:%d+: ai.job: no job provider", err)
    ok, err = pcall(function() local r = jobs.job({ model = "replicate/not a model", input = {} }); return r end)
    assert.matches("jobs_spec.lua:%d+: ai.job: replicate model must be \"replicate/owner/name", err)
    ok, err = pcall(function() local r = jobs.job({ model = FLUX }); return r end)
    assert.matches("jobs_spec.lua:%d+: ai.job: input must be a table", err)
    ok, err = pcall(function()
      local r = jobs.speech({ model = "elevenlabs/eleven_flash_v2_5", voice = "v" }); return r
    end)
    assert.matches("jobs_spec.lua:%d+: ai.speech: text must be", err)
    ok, err = pcall(function()
      local r = jobs.speech({ model = "fal/fal-ai/flux/dev", voice = "v", text = "t" }); return r
    end)
    assert.matches("jobs_spec.lua:%d+: ai.speech: no speech provider", err)
  end)
end)

-- A server that records each request and answers from a table by "METHOD path".
local function recorder(answers)
  local rec = { requests = {} }
  rec.server = resil.server.listen({ handler = function(req)
    rec.requests[#rec.requests + 1] = req
    local a = answers[req.method .. " " .. req.path]
    if type(a) == "function" then a = a(req, rec) end
    return a or { status = 404, body = "{}" }
  end })
  rec.url = ("http://127.0.0.1:%d"):format(rec.server:port())
  return rec
end

-- what a request sent, keys redacted, transport headers left out
local TRANSPORT = { host = true, ["content-length"] = true, ["user-agent"] = true, ["accept-encoding"] = true,
  expect = true, connection = true }
local function golden(req)
  local h = {}
  for k, v in pairs(req.headers) do
    if k == "traceparent" then
      -- each attempt is a span (src/lua/trace.lua): its id changes, its shape does not
      assert(v:match("^00%-%x+%-%x+%-0[01]$"), "traceparent " .. v)
    elseif not TRANSPORT[k] then
      for _, key in pairs(KEYS) do v = v:gsub(key:gsub("%p", "%%%0"), "<key>") end
      h[k] = v
    end
  end
  local body = req.body ~= "" and (json.decode(req.body) or req.body) or nil
  return { method = req.method, path = req.path, query = req.query ~= "" and req.query or nil, headers = h,
    body = body }
end

describe("golden requests", function()
  local rec
  before_each(function() resil.clock.virtual(); fresh_store() end)
  after_each(function() if rec then rec.server:close() end; rec = nil end)

  it("Replicate: create with Prefer: wait, poll urls.get, cancel urls.cancel at the deadline", function()
    local function prediction(status)
      return { status = status == "starting" and 201 or 200, body = json.encode({ id = "p1", status = status,
        urls = { get = rec.url .. "/v1/predictions/p1", cancel = rec.url .. "/v1/predictions/p1/cancel" } }) }
    end
    rec = recorder({ ["POST /v1/predictions"] = function() return prediction("starting") end,
      ["GET /v1/predictions/p1"] = function() return prediction("processing") end,
      ["POST /v1/predictions/p1/cancel"] = function() return prediction("canceled") end })
    use(rec.url)
    local _, err = jobs.job({ model = "replicate/acme/video:abc123", input = { prompt = "a cat", duration = 5 },
      wait = 5, deadline = 2, attempts = 1 })
    assert.are.equal("deadline", err.kind)
    assert.are.same({
      { method = "POST", path = "/v1/predictions", headers = { authorization = "Bearer <key>",
        ["content-type"] = "application/json", prefer = "wait=5", accept = "*/*" },
        body = { version = "abc123", input = { prompt = "a cat", duration = 5 } } },
      { method = "GET", path = "/v1/predictions/p1", headers = { authorization = "Bearer <key>",
        ["content-type"] = "application/json", accept = "*/*" } },
      { method = "POST", path = "/v1/predictions/p1/cancel", headers = { authorization = "Bearer <key>",
        ["content-type"] = "application/json", accept = "*/*" } },
    }, { golden(rec.requests[1]), golden(rec.requests[2]), golden(rec.requests[3]) })
    assert.are.equal(3, #rec.requests)
  end)

  it("Replicate: a hostile job id stays one path segment of the cancel; a URL that cannot be read is refused", function()
    local id
    rec = recorder({
      ["POST /v1/predictions"] = function()
        return { status = 201, body = json.encode({ id = id, status = "starting",
          urls = { get = rec.url .. "/v1/predictions/p1" } }) }
      end,
      ["GET /v1/predictions/p1"] = function()
        return { status = 200, body = json.encode({ id = id, status = "processing" }) }
      end })
    use(rec.url)
    for _, hostile in ipairs({ "../../../admin", "é ✓?x=1" }) do
      id = hostile
      local ok, r, err = pcall(jobs.job, { model = "replicate/acme/video:abc123", input = { prompt = "a cat" },
        deadline = 2, attempts = 1 })
      assert.is_true(ok, r)
      assert.are.equal("deadline", err.kind)
      -- (the cancel's 404 is followed by a read: a job that can still be read is not lost)
      local cancel = rec.requests[#rec.requests - 1]
      assert.are.equal("POST", cancel.method)
      assert.are.equal("GET", rec.requests[#rec.requests].method)
      assert.matches("^/v1/predictions/[^/]+/cancel$", cancel.path)
    end
    -- a URL that cannot be read: the job, already paid for, is read where the API documents it
    id = "p1"
    rec.server:close()
    rec = recorder({ ["POST /v1/predictions"] = { status = 201, body = json.encode({ id = "p1", status = "starting",
      urls = { get = "http://127.0.0.1:1/v1/predictions/é p1" } }) },
      ["GET /v1/predictions/p1"] = { status = 200, body = json.encode({ id = "p1", status = "succeeded",
        output = "ok" }) } })
    use(rec.url)
    local ok, r, err = pcall(jobs.job, { model = "replicate/acme/video:abc123", input = { prompt = "a cat" } })
    assert.is_true(ok, r)
    assert.is_nil(err)
    assert.are.equal("ok", r.output)
  end)

  it("sends the key only to base_url's host: job URLs elsewhere are read and canceled where the API documents them",
    function()
    -- another host (here another port) the provider's answer names, as a compromised or
    -- misrouted answer would: it must never see a request, let alone the key
    local elsewhere = recorder({})
    local ok, res = pcall(function()
      local away = elsewhere.url .. "/v1/predictions/p1"
      rec = recorder({ ["POST /v1/predictions"] = { status = 201, body = json.encode({ id = "p1",
          status = "starting", urls = { get = away, cancel = away .. "/cancel" } }) },
        ["GET /v1/predictions/p1"] = { status = 200, body = json.encode({ id = "p1", status = "processing" }) },
        ["POST /v1/predictions/p1/cancel"] = { status = 200, body = json.encode({ id = "p1", status = "canceled" }) },
        ["POST /fal-ai/flux/dev"] = { status = 200, body = json.encode({ request_id = "r1", status = "IN_QUEUE",
          status_url = elsewhere.url .. "/fal-ai/flux/requests/r1/status",
          response_url = "http://user@" .. elsewhere.url:sub(8) .. "/fal-ai/flux/requests/r1",
          cancel_url = elsewhere.url:upper() .. "/fal-ai/flux/requests/r1/cancel" }) },
        ["GET /fal-ai/flux/requests/r1/status"] = { status = 200, body = '{"status":"COMPLETED"}' },
        ["GET /fal-ai/flux/requests/r1"] = { status = 200, body = '{"images":[]}' } })
      use(rec.url)
      jobs.configure("fal", { base_url = rec.url, api_key = KEYS.fal, poll = FAST_POLL })
      local _, err = jobs.job({ model = "replicate/acme/video:abc123", input = { prompt = "a cat" }, deadline = 2,
        attempts = 1 })
      assert.are.equal("deadline", err.kind)
      local r = assert(jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" } }))
      assert.are.same({ images = {} }, r.output)
      local paths = {}
      for i, req in ipairs(rec.requests) do paths[i] = req.method .. " " .. req.path end
      assert.are.same({ "POST /v1/predictions", "GET /v1/predictions/p1", "POST /v1/predictions/p1/cancel",
        "POST /fal-ai/flux/dev", "GET /fal-ai/flux/requests/r1/status", "GET /fal-ai/flux/requests/r1" }, paths)
      return #elsewhere.requests
    end)
    elsewhere.server:close()
    assert.is_true(ok, res)
    assert.are.equal(0, res)
  end)

  it("Replicate: an official model without a version is created on its model path", function()
    rec = recorder({ ["POST /v1/models/black-forest-labs/flux-schnell/predictions"] = { status = 201,
      body = json.encode({ id = "p2", status = "succeeded", output = { "https://x.invalid/a.webp" },
        urls = { get = "http://127.0.0.1:1/unused", cancel = "http://127.0.0.1:1/unused" } }) } })
    use(rec.url)
    local r = assert(jobs.job({ model = FLUX, input = { prompt = "a cat" } }))
    assert.are.equal("p2", r.id)
    assert.are.same({ input = { prompt = "a cat" } }, golden(rec.requests[1]).body)
  end)

  it("fal: submit to the endpoint, status_url, response_url, and cancel_url with PUT", function()
    local app = "/fal-ai/flux/requests/r1"
    local urls = function()
      return { request_id = "r1", status_url = rec.url .. app .. "/status", response_url = rec.url .. app,
        cancel_url = rec.url .. app .. "/cancel" }
    end
    local polls = 0
    rec = recorder({ ["POST /fal-ai/flux/dev"] = function()
        local q = urls(); q.status = "IN_QUEUE"; q.queue_position = 0
        return { status = 200, body = json.encode(q) }
      end,
      ["GET " .. app .. "/status"] = function()
        polls = polls + 1
        local q = urls(); q.status = polls < 2 and "IN_PROGRESS" or "COMPLETED"
        return { status = 200, body = json.encode(q) }
      end,
      ["GET " .. app] = { status = 200, body = json.encode({ images = { { url = "https://x.invalid/1.png" } } }) } })
    use(rec.url)
    jobs.configure("fal", { base_url = rec.url, api_key = KEYS.fal, poll = FAST_POLL })
    local r = assert(jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat", image_size = "square" } }))
    assert.are.equal("r1", r.id)
    assert.are.same({
      { method = "POST", path = "/fal-ai/flux/dev", headers = { authorization = "Key <key>",
        ["content-type"] = "application/json", accept = "*/*" }, body = { prompt = "a cat", image_size = "square" } },
      { method = "GET", path = app .. "/status", headers = { authorization = "Key <key>", accept = "*/*" } },
      { method = "GET", path = app .. "/status", headers = { authorization = "Key <key>", accept = "*/*" } },
      { method = "GET", path = app, headers = { authorization = "Key <key>", accept = "*/*" } },
    }, { golden(rec.requests[1]), golden(rec.requests[2]), golden(rec.requests[3]), golden(rec.requests[4]) })
    rec.requests = {}
    rec.server:close()
    rec = recorder({ ["POST /fal-ai/flux/dev"] = function()
        local q = urls(); q.status = "IN_QUEUE"
        return { status = 200, body = json.encode(q) }
      end,
      ["GET " .. app .. "/status"] = function()
        local q = urls(); q.status = "IN_QUEUE"
        return { status = 202, body = json.encode(q) }
      end,
      ["PUT " .. app .. "/cancel"] = { status = 202, body = '{"status":"CANCELLATION_REQUESTED"}' } })
    jobs.configure("fal", { base_url = rec.url, api_key = KEYS.fal, poll = FAST_POLL })
    local _, err = jobs.job({ model = "fal/fal-ai/flux/dev", input = { prompt = "a cat" }, deadline = 2,
      attempts = 1 })
    assert.are.equal("deadline", err.kind)
    local put -- (then its status read again: a cancel accepted is followed until the request ends)
    for _, q in ipairs(rec.requests) do if q.method == "PUT" then put = put or q end end
    assert.are.same({ method = "PUT", path = app .. "/cancel", headers = { authorization = "Key <key>",
      accept = "*/*" } }, golden(put))
    assert.are.same({ method = "GET", path = app .. "/status", headers = { authorization = "Key <key>",
      accept = "*/*" } }, golden(rec.requests[#rec.requests]))
  end)

  it("ElevenLabs: text-to-speech with xi-api-key, model_id and output_format", function()
    rec = recorder({ ["POST /v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb"] = { status = 200,
      headers = { ["content-type"] = "audio/mpeg", ["request-id"] = "req-1" }, body = "ID3\4\0\0mp3bytes" } })
    use(rec.url)
    local r = assert(jobs.speech({ model = "elevenlabs/eleven_multilingual_v2", voice = "JBFqnCBsd6RMkjVDRZzb",
      text = "Héllo", voice_settings = { stability = 0.5 } }))
    assert.are.equal("ID3\4\0\0mp3bytes", r.audio)
    assert.are.equal(5, r.characters) -- code points, not bytes
    assert.are.same({ method = "POST", path = "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb",
      query = "output_format=mp3_44100_128",
      headers = { ["xi-api-key"] = "<key>", ["content-type"] = "application/json", accept = "audio/mpeg" },
      body = { text = "Héllo", model_id = "eleven_multilingual_v2", voice_settings = { stability = 0.5 } } },
      golden(rec.requests[1]))
  end)
end)

describe("a job survives its process (kill -9 mid-poll, then the run resumed)", function()
  local m, pid
  before_each(function() resil.clock.real() end)
  after_each(function()
    if pid and helpers.alive(pid) then os.execute("kill -9 " .. pid) end
    if m then m:stop() end
    m, pid = nil, nil
  end)

  local SCRIPT = [[
local resil = require "resil"
local jobs = require "policies.jobs"
jobs.configure("replicate", { poll = { first = 0.02, factor = 1, max = 0.02 } })
local id = resil.step("render", function()
  local r, err = jobs.job({ model = "replicate/black-forest-labs/flux-schnell", input = { prompt = "a cat" } })
  if not r then return nil, err end
  return r.id
end)
print("done", id)
]]

  -- run the script in the background until it exits, serving the mock meanwhile
  local function run(db)
    local out
    pid, out = helpers.start(SCRIPT, ("--store %s --run render-1 --log-level off"):format(db))
    return out
  end
  local function env(url)
    return ("REPLICATE_API_TOKEN=%s REPLICATE_BASE_URL=%s/v1 "):format(KEYS.replicate, url)
  end
  local function start(db, url)
    local saved = helpers.resil
    helpers.resil = env(url) .. saved
    local out = run(db)
    helpers.resil = saved
    return out
  end
  local function finish(out)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20), "the run hung")
    return helpers.slurp(out)
  end

  it("polls the job it already paid for: one create per job", function()
    m = resil.mock.start({ jobs = { polls = 1e9 } }) -- runs until told otherwise
    local db = helpers.tmpname(".db")
    start(db, m.url)
    assert(helpers.wait_until(function() return (m:stats().routes.prediction or 0) >= 3 end, 20))
    os.execute("kill -9 " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert.are.equal(1, m:stats().routes.predictions)
    m:configure({ jobs = { polls = 0 } }) -- the job finishes at its next read
    local out = finish(start(db, m.url))
    local s = m:stats()
    assert.are.equal(1, s.routes.predictions, out) -- the resumed run created nothing
    assert.matches("done%s+mock%w+00001", out)
    assert.are.equal(1, s.billed.jobs)
    resil.store_config({ url = db })
    local rows = resil.cost.breakdown("model")
    assert.are.equal(1, rows[1].calls)
    assert.are.equal(0.003, rows[1].usd)
  end)

  it("a job the provider lost while the run was down (a 404 for it) is replaced by a new job, once", function()
    m = resil.mock.start({ jobs = { polls = 1e9 } })
    local db = helpers.tmpname(".db")
    start(db, m.url)
    assert(helpers.wait_until(function() return (m:stats().routes.prediction or 0) >= 2 end, 20))
    os.execute("kill -9 " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    local port = m.port
    m:stop() -- the provider, back on the same address, knows nothing of the job
    m = assert(resil.mock.start({ jobs = { polls = 0 } }, { port = port }))
    local out = finish(start(db, m.url))
    assert.are.equal(1, m:stats().routes.predictions, out)
    assert.matches("done%s+mock%w+00001", out)
    -- resumed again: the run is done, nothing made or read
    out = finish(start(db, m.url))
    assert.matches("done%s+mock%w+00001", out)
    assert.are.equal(1, m:stats().routes.predictions, out)
    resil.store_config({ url = db })
    local rows = resil.cost.breakdown("model")
    assert.are.equal(1, rows[1].calls) -- the new job; nothing known of the lost one's use
  end)

  it("a job that failed before the kill is read again and its replacement (key#2) is polled, not made again", function()
    m = resil.mock.start({ jobs = { polls = 1e9, fates = { { "failed", polls = 0 }, "succeeded" } } })
    local db = helpers.tmpname(".db")
    start(db, m.url)
    assert(helpers.wait_until(function()
      local s = m:stats()
      return s.routes.predictions == 2 and (s.routes.prediction or 0) >= 4
    end, 20))
    os.execute("kill -9 " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    m:configure({ jobs = { polls = 0 } })
    local out = finish(start(db, m.url))
    assert.are.equal(2, m:stats().routes.predictions, out)
    assert.matches("done%s+mock%w+00002", out)
    resil.store_config({ url = db })
    assert.are.equal(1, resil.cost.breakdown("model")[1].calls) -- the failed job cost nothing
  end)
end)
