-- The demo pipeline: for each topic, write a script (chat), render images
-- (async jobs), assemble a video (async job) and record narration, against
-- the in-process mock provider with faults injected. Retries here are simple
-- and inline; the policy library (policies/) does this properly.
--
--   resil-lua examples/pipeline.lua [items] [seed]
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
local stats = { requests = 0, retries = 0, failures = {}, latencies = {} }

local function note_failure(kind)
  stats.failures[kind] = (stats.failures[kind] or 0) + 1
end

-- One HTTP call: transport errors and non-2xx come back as nil, err.
local function call(req)
  stats.requests = stats.requests + 1
  local res, err = http.request(req)
  if res then stats.latencies[#stats.latencies + 1] = res.time end
  if not res then return nil, err end
  if res.status >= 300 then
    return nil, resil.error("http_" .. res.status, res.body:sub(1, 80),
      { status = res.status, retry_after = tonumber(res.headers["retry-after"]) })
  end
  return res
end

-- Retry fn up to `attempts` times with exponential backoff (Retry-After wins).
local function with_retries(attempts, fn, ...)
  local delay = 0.05
  for attempt = 1, attempts do
    local value, err = fn(...)
    if value ~= nil then return value end
    note_failure(err.kind)
    if attempt == attempts then return nil, err end
    stats.retries = stats.retries + 1
    resil.sleep(err.retry_after or delay)
    delay = delay * 2
  end
end

local function chat(prompt)
  local res, err = call({ url = mock.url .. "/v1/chat/completions", timeout = 5,
    json = { model = "gpt-4o-mini", messages = { { role = "user", content = prompt } } } })
  if not res then return nil, err end
  local body = json.decode(res.body)
  local text = body and body.choices and body.choices[1] and body.choices[1].message.content
  if type(text) ~= "string" or text == "" then
    return nil, resil.error("invalid_output", "no content in the model's answer")
  end
  return text
end

-- Start an async job and poll it until it finishes (a hung job times out).
local function run_job(input)
  local res, err = call({ url = mock.url .. "/v1/predictions", json = { input = input }, timeout = 5 })
  if not res then return nil, err end
  local job = json.decode(res.body)
  local finished = resil.timeout(10, function()
    while job.status == "starting" or job.status == "processing" do
      resil.sleep(0.05)
      local poll = with_retries(3, call, { url = job.urls.get, timeout = 5 })
      if not poll then return nil end
      job = json.decode(poll.body)
    end
    return job
  end)
  if not finished then return nil, resil.error("job_failed", "prediction " .. job.id .. " did not finish") end
  if finished.status ~= "succeeded" then return nil, resil.error("job_failed", tostring(finished.error)) end
  return finished.output
end

local function speech(text)
  local res, err = call({ url = mock.url .. "/v1/audio/speech", json = { input = text }, timeout = 5 })
  if not res then return nil, err end
  return json.decode(res.body).audio_url
end

local function produce(topic)
  local script, err = with_retries(5, chat, "Write a 30 second video script about " .. topic)
  if not script then return nil, err end
  local images = {}
  for shot = 1, 2 do
    images[shot], err = with_retries(3, run_job, { prompt = topic .. ", shot " .. shot })
    if not images[shot] then return nil, err end
  end
  local video
  video, err = with_retries(3, run_job, { images = images, script = script })
  if not video then return nil, err end
  local narration
  narration, err = with_retries(3, speech, script)
  if not narration then return nil, err end
  return { topic = topic, video = video, narration = narration }
end

local topics = {}
local subjects = { "tides", "volcanoes", "honeybees", "comets", "glaciers", "octopuses", "auroras", "coral reefs" }
for i = 1, ITEMS do topics[i] = subjects[(i - 1) % #subjects + 1] end

local started = resil.now()
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
for kind, n in pairs(stats.failures) do kinds[#kinds + 1] = ("%s=%d"):format(kind, n) end
table.sort(kinds)
local billed = mock:stats().billed

print(("resil-lua demo pipeline: %d items x 4 steps (script, images, video, narration)"):format(ITEMS))
print(("  items      %d done, %d failed"):format(done, failed))
print(("  requests   %d (%d retries)"):format(stats.requests, stats.retries))
print(("  failures   %s"):format(#kinds > 0 and table.concat(kinds, " ") or "none"))
print(("  time       %.2f s"):format(elapsed))
print(("  latency    p50 %.3f s, p95 %.3f s"):format(percentile(stats.latencies, 0.5),
  percentile(stats.latencies, 0.95)))
print(("  billed     $%.4f by the mock provider"):format(billed.usd))
for i, err in pairs(failures or {}) do print(("  item %d (%s) failed: %s"):format(i, topics[i], tostring(err))) end
mock:stop()
