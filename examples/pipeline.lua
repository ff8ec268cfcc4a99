-- The demo pipeline: for each customer's topic, write a script (chat), a title
-- and two shot prompts, render a still (Replicate) and a thumbnail (fal), make
-- a video (an async job with a deadline) and record narration (text to
-- speech). Every call goes through policies.ai and the model registry
-- (examples/models.lua): aliases, fallbacks, a retired model routed to its
-- replacement, a canary migration that rolls back by itself. The providers
-- are the in-process mock, with faults: a 429 burst with Retry-After, an
-- Anthropic outage that trips its breaker, garbage output, a hung job.
--
--   resil-lua examples/pipeline.lua [items] [seed]
--   resil-lua --fresh examples/pipeline.lua [items] [seed]     (start over)
local resil = require "resil"
local ai = require "policies.ai"
local jobs = require "policies.jobs"
local registry = require "policies.registry"

local ITEMS = tonumber(arg and arg[1]) or 12
local SEED = tonumber(arg and arg[2]) or 7
local here = (arg and arg[0] or "examples/pipeline.lua"):match("^(.*)/[^/]*$") or "."
registry.load(here .. "/models.lua")
resil.log.level(os.getenv("RESIL_LOG_LEVEL") or "warn")

local mock = resil.mock.start({
  seed = SEED,
  latency = { min = 0.005, max = 0.03 },
  sequence = { chat = { { status = 429, retry_after = 0.2 }, { status = 429, retry_after = 0.2 },
                        { status = 429, retry_after = 0.2 } } },                         -- a 429 burst
  faults = {
    { route = "messages", status = 529 },                                                -- Anthropic is down
    { route = "chat", model = "gpt-4.1-mini-2025-04-14", kind = "garbage" },             -- the canary is broken
    { route = "chat", probability = 0.05, kind = "garbage" },
  },
  jobs = { polls = 1, fates = { "succeeded", "succeeded", "stuck" } },                   -- one job hangs
})

-- what the summary counts, by step and provider
local rows, order = {}, {}
local function row(step, provider)
  local k = step .. "\0" .. provider
  if not rows[k] then
    rows[k] = { step = step, provider = provider, calls = 0, retries = {}, fallbacks = 0, micro_usd = 0 }
    order[#order + 1] = k
  end
  return rows[k]
end
local function step_name() return (resil.context().step or "-"):gsub(" %d+$", "") end
local function on_retry(info)
  local r = row(step_name(), info.provider)
  r.retries[info.class] = (r.retries[info.class] or 0) + 1
end
local function served(r)
  local x = row(step_name(), r.provider)
  x.calls = x.calls + 1
  x.fallbacks = x.fallbacks + (r.fallbacks or 0)
  x.remade = (x.remade or 0) + (r.job_ids and #r.job_ids - 1 or 0) -- jobs canceled at their deadline (or failed), made again
  x.micro_usd = (x.micro_usd or 0) + math.floor((r.cost_usd or 0) * 1e6 + 0.5) -- as the ledger counts
  if r.routed then x.note = ("%s -> %s (%s)"):format(r.routed.from, r.routed.to, r.reason or r.routed.reason) end
  return r
end

-- Providers, all on the mock. Real ones: drop base_url and api_key, export
-- OPENAI_API_KEY, ANTHROPIC_API_KEY, REPLICATE_API_TOKEN, FAL_KEY, ELEVENLABS_API_KEY.
local retry = { base = 0.02, cap = 0.5, on_retry = on_retry }
ai.configure("openai", { base_url = mock.url .. "/v1", api_key = "sk-demo-000000", retry = retry })
ai.configure("anthropic", { base_url = mock.url, api_key = "sk-ant-demo-000000", retry = retry,
  breaker = { window_type = "count", window = 10, min_calls = 4, failure_rate = 0.5, open_for = 30 } })
local poll = { first = 0.05, factor = 1.5, max = 0.2 }
jobs.configure("replicate", { base_url = mock.url .. "/v1", api_key = "r8_demo_000000", poll = poll, retry = retry })
jobs.configure("fal", { base_url = mock.url .. "/fal", api_key = "fal_demo_000000", poll = poll, retry = retry })
jobs.configure("elevenlabs", { base_url = mock.url, api_key = "xi_demo_000000", retry = retry })

local function chat(model, customer, prompt)
  local r, err = ai.chat({ model = model, user = customer, budget = customer, max_tokens = 300,
    messages = { { role = "user", content = prompt } } })
  if not r then return nil, err end
  return served(r).text
end

local function image(model, customer, prompt)
  local r, err = ai.job({ model = model, user = customer, budget = customer, input = { prompt = prompt } })
  if not r then return nil, err end
  return served(r).output
end

-- Each stage is a checkpointed step (resil.step): run the demo again and it
-- resumes, skipping what is done, paying nothing twice. --fresh starts over.
local function produce(item)
  local customer, topic = item.customer, item.topic
  local script, err = resil.step("script", chat, "writer", customer, "Write a 30 second video script about " .. topic)
  if not script then return nil, err end
  local title
  title, err = resil.step("title", chat, "openai/gpt-4o-2024-05-13", customer, "A title for: " .. script)
  if not title then return nil, err end
  local prompts = {}
  for shot = 1, 2 do
    prompts[shot], err = resil.step("prompt " .. shot, chat, "prompter", customer,
      ("Shot %d of a video about %s: describe the image"):format(shot, topic))
    if not prompts[shot] then return nil, err end
  end
  local still, thumb
  still, err = resil.step("still", image, "still", customer, prompts[1])
  if not still then return nil, err end
  thumb, err = resil.step("thumbnail", image, "thumbnail", customer, prompts[2])
  if not thumb then return nil, err end
  local video
  video, err = resil.step("video", function()
    local r, verr = ai.job({ model = "video", user = customer, budget = customer,
      input = { prompt = script, image = still[1] or still, duration = 5 } })
    if not r then return nil, verr end
    return served(r).output
  end)
  if not video then return nil, err end
  local narration
  narration, err = resil.step("narration", function()
    local r, serr = ai.speech({ model = "voice", voice = "21m00Tcm4TlvDq8ikWAM", text = script, user = customer,
      budget = customer })
    if not r then return nil, serr end
    return served(r).characters
  end)
  if not narration then return nil, err end
  return { topic = topic, title = title, video = video }
end

local subjects = { "tides", "volcanoes", "honeybees", "comets", "glaciers", "octopuses", "auroras", "coral reefs" }
local items = {}
local names = { "ada", "grace", "alan", "edsger", "barbara", "donald", "ken", "dennis", "margaret", "linus",
  "guido", "bjarne" }
for i = 1, ITEMS do
  local customer = names[(i - 1) % #names + 1] .. (i > #names and tostring(i) or "")
  resil.budget(customer, { limit = 1.00, per = "day" }) -- a budget per customer
  items[i] = { customer = customer, topic = subjects[(i - 1) % #subjects + 1] }
end

local started, since = resil.now(), resil.store_now()
local results, failures = resil.map(items, produce, { concurrency = 4, progress = "videos" })
local elapsed = resil.now() - started

-- the summary
local done = 0
for i = 1, ITEMS do if results[i] then done = done + 1 end end
local run = resil.run.id()
local paid = 0
print(("resil-lua demo: %d videos (script, title, 2 prompts, still, thumbnail, video, narration), %d done, "
  .. "%d failed in %.2f s%s"):format(ITEMS, done, ITEMS - done, elapsed, resil.run.resumed() and ", resumed" or ""))
print()
print(("%-10s %-11s %5s  %-32s %9s %10s"):format("STEP", "PROVIDER", "CALLS", "RETRIES", "FALLBACKS", "COST"))
table.sort(order)
local calls, retried, fell, remade = 0, 0, 0, {}
for _, k in ipairs(order) do
  local r = rows[k]
  local retries = {}
  for class, n in pairs(r.retries) do
    retries[#retries + 1] = ("%s=%d"):format(class, n)
    retried = retried + n
  end
  table.sort(retries)
  calls, fell = calls + r.calls, fell + r.fallbacks
  if (r.remade or 0) > 0 then remade[#remade + 1] = ("%s %s: %d"):format(r.step, r.provider, r.remade) end
  paid = paid + r.micro_usd
  print(("%-10s %-11s %5d  %-32s %9d %10s"):format(r.step, r.provider, r.calls,
    #retries > 0 and table.concat(retries, " ") or "-", r.fallbacks, ("$%.6f"):format(r.micro_usd / 1e6)))
end
if #order == 0 then print("(every step replayed from its checkpoint: no provider was called)") end
print(("%-10s %-11s %5d  %-32s %9d %10s"):format("TOTAL", "", calls, retried, fell, ("$%.6f"):format(paid / 1e6)))
print()
if #remade > 0 then print(("hung jobs  canceled at their deadline and made again: %s"):format(table.concat(remade, ", "))) end
local transitions = resil.metrics.counter("resil_breaker_transitions_total")
for _, p in ipairs({ "anthropic", "openai", "replicate", "fal", "elevenlabs" }) do
  local trips = transitions:value({ breaker = p, to = "open" })
  if trips > 0 then print(("breaker    %s opened %d time%s"):format(p, trips, trips == 1 and "" or "s")) end
end
for _, k in ipairs(order) do
  if rows[k].note then print(("sunset     %s"):format(rows[k].note)) break end
end
local st = registry.migration_state("prompter")
if st.rolled_back then
  local f = st.rolled_back
  print(("migration  prompter %s -> %s: ROLLED BACK (%s: invalid %.0f%% vs %.0f%%, errors %.0f%% vs %.0f%%, "
    .. "new side %d calls, old %d); share 0 until examples/models.lua changes"):format(st.from, st.to, f.reason,
    100 * f.new_invalid_rate, 100 * f.old_invalid_rate, 100 * f.new_error_rate, 100 * f.old_error_rate,
    f.new_calls, f.old_calls))
else
  print(("migration  prompter %s -> %s: holding at %.0f%%"):format(st.from, st.to, 100 * st.share))
end
print(("paid       $%.6f in this process; ledger $%.6f for run %s since it started (resil-lua costs --run %s); "
  .. "$%.6f in all"):format(paid / 1e6, resil.cost.total({ run = run, since = since }), run, run,
  resil.cost.total({ run = run })))
for i, err in pairs(failures or {}) do print(("item %d (%s) failed: %s"):format(i, items[i].topic, tostring(err))) end
mock:stop()
