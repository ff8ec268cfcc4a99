-- A chat through an alias with a fallback across providers: "chat-fast" of
-- policies/models.lua is GPT-4o mini, then Claude Haiku. On the mock, OpenAI
-- answers 503 until its retries are spent, and Anthropic answers.
--
--   resil-lua examples/chat_fallback.lua            (the in-process mock)
--   OPENAI_API_KEY=... ANTHROPIC_API_KEY=... resil-lua examples/chat_fallback.lua real
local resil = require "resil"
local ai = require "policies.ai"

local real = arg and arg[1] == "real"
local mock
if not real then
  mock = resil.mock.start({ strict = true, reply = "Tides follow the moon.",
    sequence = { chat = { 503, 503, 503, 503 } } })  -- OpenAI fails past its 3 retries
  ai.configure("openai", { base_url = mock.url .. "/v1", api_key = "sk-example-000000", retry = { base = 0.05 } })
  ai.configure("anthropic", { base_url = mock.url, api_key = "sk-ant-example-000000" })
end

local r, err = ai.chat({ model = "chat-fast", max_tokens = 100,
  messages = { { role = "user", content = "Why are there tides? One sentence." } } })
if not r then
  print("failed: " .. tostring(err))
  os.exit(1)
end
print(("%s/%s answered (alias %s, after %d fallback%s): %s"):format(r.provider, r.requested_model, r.alias,
  r.fallbacks, r.fallbacks == 1 and "" or "s", r.text))
print(("cost $%.6f"):format(r.cost_usd or 0))
if mock then mock:stop() end
