-- An async job with a deadline: the first prediction hangs, is canceled at
-- its deadline, and a new one is made, which succeeds. The ledger has the
-- one that succeeded, and the canceled one too when its model is billed for
-- the time it ran (a model priced per output costs nothing canceled).
--
--   resil-lua examples/job_deadline.lua             (the in-process mock)
--   REPLICATE_API_TOKEN=... resil-lua examples/job_deadline.lua real
local resil = require "resil"
local ai = require "policies.ai"
local jobs = require "policies.jobs"

local real = arg and arg[1] == "real"
local mock
if not real then
  mock = resil.mock.start({ jobs = { fates = { "stuck", "succeeded" }, polls = 1 } })
  jobs.configure("replicate", { base_url = mock.url .. "/v1", api_key = "r8_example_000000",
    poll = { first = 0.05, factor = 1.5, max = 0.2 } })
end

local r, err = ai.job({ model = "replicate/black-forest-labs/flux-schnell",
  input = { prompt = "a lighthouse at dusk" },
  deadline = real and 120 or 1, attempts = 2 })
if not r then
  print("failed: " .. tostring(err))
  os.exit(1)
end
print(("job %s succeeded after %d attempt%s (made: %s)"):format(r.id, r.attempts, r.attempts == 1 and "" or "s",
  table.concat(r.job_ids, ", ")))
print(("output %s"):format(type(r.output) == "table" and tostring(r.output[1]) or tostring(r.output)))
print(("cost $%.6f"):format(r.cost_usd or 0))
if mock then mock:stop() end
