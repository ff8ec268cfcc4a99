-- The demo pipeline: for each topic, write a script (chat), render images
-- (async jobs), assemble a video (async job) and record narration, against
-- the in-process mock provider with faults injected. Every provider call goes
-- through the policy library (policies/call.lua): retries by class, breakers,
-- rate and concurrency limits, output validation.
--
--   resil-lua examples/pipeline.lua [items] [seed]
--   resil-lua --fresh examples/pipeline.lua [items] [seed]     (start over)
local resil = require "resil"
local json, http = resil.json, resil.http

local ITEMS = tonumber(arg and arg[1]) or 8
local SEED = tonumber(arg and arg[2]) or 7

local mock = resil.mock.start({
  seed = SEED,
  latency = { min = 0.01, max = 0.08 },
  jobs = { polls = 2 },
  faults = {
    { route = "chat", probability = 0.12, status = 429, retry_after = 0.2 },
    { route = "chat", probability = 0.06, kind = "garbage" },
    { route = "chat", probability = 0.04, kind = "empty" },
    { route = "predictions", probability = 0.10, status = 503 },
    { route = "prediction", probability = 0.04, kind = "reset" },
    { route = "POST /v1/audio/speech", probability = 0.08, status = 500 },
  },
  routes = {
    ["POST /v1/audio/speech"] = function(req)
      local body = json.decode(req.body) or {}
      return { status = 200, json = { audio_url = "https://mock.invalid/audio/" .. #(body.input or "") .. ".mp3" } }
    end,
  },
})

-- what the summary reports
local stats = { retries = 0, failures = {}, latencies = {} }
local function note_retry(info)
  stats.retries = stats.retries + 1
  stats.failures[info.class] = (stats.failures[info.class] or 0) + 1
end

-- One provider per API, each wrapped the same way (policies/call.lua):
-- deadline > retry > breaker > rate limit > concurrency > classify/validate.
local call = require "policies.call"
local function provider(name, conf)
  conf.retry = { base = 0.05, cap = 2, on_retry = note_retry }
  conf.breaker = { window_type = "count", window = 20, min_calls = 10, failure_rate = 0.5, open_for = 2 }
  conf.timeout = conf.timeout or 5
  conf.deadline = conf.deadline or 30
  return call.provider(name, conf)
end

local openai = provider("openai", {
  request = { method = "POST", url = mock.url .. "/v1/chat/completions" },
  rate = { rate = 50, per = 1, burst = 10 },
  concurrency = { size = 4, queue = 100 },
  validate = "chat",
})
-- the mock checks auth as Replicate does; any token passes
local replicate_auth = { Authorization = "Bearer r8_mock_token" }
local jobs = provider("jobs", {
  request = { method = "POST", url = mock.url .. "/v1/predictions", headers = replicate_auth },
  concurrency = { size = 8, queue = 100 }, validate = "prediction" })
local polls = provider("polls", { request = { method = "GET", headers = replicate_auth }, validate = "prediction" })
local tts = provider("tts", { request = { method = "POST", url = mock.url .. "/v1/audio/speech" }, validate = "json" })

local function timed(res)
  stats.latencies[#stats.latencies + 1] = res.time
  return res
end

-- what the mock charges per 1K tokens (its default price list)
local PRICE = { input = 0.0005, output = 0.0015 }

local function chat(prompt)
  local res, err = openai({ json = { model = "gpt-4o-mini", messages = { { role = "user", content = prompt } } } })
  if not res then return nil, err end
  local body = json.decode(timed(res).body)
  local u = body.usage
  resil.cost.record({ provider = "openai", model = "gpt-4o-mini", operation = "chat",
    usd = (u.prompt_tokens * PRICE.input + u.completion_tokens * PRICE.output) / 1000,
    units = { input_tokens = u.prompt_tokens, output_tokens = u.completion_tokens } })
  return body.choices[1].message.content
end

-- Start an async job and poll it until it finishes (a hung job times out).
local function run_job(input)
  local res, err = jobs({ json = { version = "mock-version", input = input } })
  if not res then return nil, err end
  local job = json.decode(timed(res).body)
  local finished, ferr = resil.timeout(10, function()
    while job.status == "starting" or job.status == "processing" do
      resil.sleep(0.05)
      local poll, perr = polls({ url = job.urls.get })
      if not poll then return nil, perr end
      job = json.decode(timed(poll).body)
    end
    return job
  end)
  if not finished then return nil, ferr or resil.error("job_failed", "prediction " .. job.id .. " did not finish") end
  if finished.status ~= "succeeded" then return nil, resil.error("job_failed", tostring(finished.error)) end
  resil.cost.record({ provider = "replicate", model = "mock-model", operation = "prediction",
    usd = 0.01 }) -- the mock's price per prediction (Replicate's answer carries no cost)
  return finished.output
end

local function speech(text)
  local res, err = tts({ json = { input = text } })
  if not res then return nil, err end
  return json.decode(timed(res).body).audio_url
end

-- Each stage is a checkpointed step (resil.step): run the demo again and it
-- resumes, skipping what is done, paying nothing twice. --fresh starts over.
local function produce(topic)
  local script, err = resil.step("script", chat, "Write a 30 second video script about " .. topic)
  if not script then return nil, err end
  local images = {}
  for shot = 1, 2 do
    images[shot], err = resil.step("image " .. shot, run_job, { prompt = topic .. ", shot " .. shot })
    if not images[shot] then return nil, err end
  end
  local video
  video, err = resil.step("video", run_job, { images = images, script = script })
  if not video then return nil, err end
  local narration
  narration, err = resil.step("narration", speech, script)
  if not narration then return nil, err end
  return { topic = topic, video = video, narration = narration }
end

local topics = {}
local subjects = { "tides", "volcanoes", "honeybees", "comets", "glaciers", "octopuses", "auroras", "coral reefs" }
for i = 1, ITEMS do topics[i] = subjects[(i - 1) % #subjects + 1] end

local started = resil.now()
resil.log.level(os.getenv("RESIL_LOG_LEVEL") or "warn")
local results, failures = resil.map(topics, produce, { concurrency = 4, progress = "videos" })
local elapsed = resil.now() - started

local function percentile(values, p)
  if #values == 0 then return 0 end
  table.sort(values)
  return values[math.max(1, math.ceil(#values * p))]
end

local done, failed = 0, 0
for i = 1, ITEMS do
  if results[i] then done = done + 1 else failed = failed + 1 end
end
local kinds = {}
for class, n in pairs(stats.failures) do kinds[#kinds + 1] = ("%s=%d"):format(class, n) end
table.sort(kinds)
local billed = mock:stats().billed

print(("resil-lua demo pipeline: %d items x 4 steps (script, images, video, narration)"):format(ITEMS))
print(("  items      %d done, %d failed"):format(done, failed))
print(("  requests   %d (%d retries)"):format(mock:stats().total, stats.retries))
print(("  retried    %s"):format(#kinds > 0 and table.concat(kinds, " ") or "none"))
print(("  time       %.2f s"):format(elapsed))
print(("  latency    p50 %.3f s, p95 %.3f s"):format(percentile(stats.latencies, 0.5),
  percentile(stats.latencies, 0.95)))
print(("  billed     $%.4f by the mock provider in this run"):format(billed.usd))
print(("  ledger     $%.4f for run %s (resil-lua costs --by model)%s"):format(
  resil.cost.total({ run = resil.run.id() }), resil.run.id(), resil.run.resumed() and ", resumed" or ""))
for i, err in pairs(failures or {}) do print(("  item %d (%s) failed: %s"):format(i, topics[i], tostring(err))) end
mock:stop()
