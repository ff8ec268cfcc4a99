-- Overhead of policies.ai over a plain resil.http.request to the same mock
-- route (the mock runs in a process of its own), one call at a time.
--   resil-lua bench/ai.lua URL N MODE   MODE: plain | ai | ai_ledger
-- prints "MODE calls seconds us_per_call errors"
--   plain      resil.http.request with the body ai.chat would send, JSON decoded
--   ai         ai.chat (adapter, policies.call, parse, pricing) with its ledger row in an in-memory
--              SQLite store: the policy's own cost, without a disk's fsync
--   ai_ledger  ai.chat with each call's ledger row durable (SQLite file, synced before the call returns)
--   ai_shared  ai_ledger, the provider's request and token limits shared (kept in the same SQLite file)
local resil = require "resil"
local ai = require "policies.ai"
local url, n, mode = arg[1], tonumber(arg[2]), arg[3]
if mode == "ai" then resil.store_config({ url = ":memory:" }) end
local KEY = "sk-bench-0123456789"
resil.log.level("error")
ai.configure("openai", { base_url = url .. "/v1", api_key = KEY,
  rate = mode == "ai_shared" and { rate = 1e6, per = 1, shared = true } or nil,
  tokens = mode == "ai_shared" and { rate = 1e9, per = 60, shared = true } or nil })
local msgs = { { role = "user", content = "Say hello" } }
local req = { model = "openai/gpt-4o-mini", messages = msgs,
  max_tokens = 50 }
local plain = { method = "POST", url = url .. "/v1/chat/completions",
  headers = { authorization = "Bearer " .. KEY, ["content-type"] = "application/json", accept = "application/json" },
  json = { model = "bench-unpriced", messages = msgs, max_tokens = 50 } }

local function once()
  if mode == "plain" then
    local res = resil.http.request(plain)
    return res and res.status == 200 and resil.json.decode(res.body).choices[1].message.content
  end
  local r = ai.chat(req)
  return r and r.text
end
for _ = 1, 200 do assert(once(), "warm-up call failed") end
local errors = 0
local t0 = resil.clock.wall()
for _ = 1, n do
  if not once() then errors = errors + 1 end
end
local s = resil.clock.wall() - t0
print(("%s %d %.3f %.2f %d"):format(mode, n, s, s / n * 1e6, errors))
