-- A gateway in front of the strict mock (both APIs), for spec/sdk/wire_sdk.mjs
-- (run by spec/wire_sdk_spec.lua): prints one JSON line {url=, key=, mock=}
-- and serves. The checks reach the mock directly too (its url).
local resil = require "resil"
local ai = require "policies.ai"
local gateway = require "policies.gateway"
local keys = require "resil.keys"
local json = resil.json
resil.log.level("off")
resil.store_config({ url = arg[1] })

local up = assert(resil.mock.start({ strict = true, reply = "one two three four five six", refuses = { "claude-fable-5-1" },
  faults = { { route = "chat", model = "gpt-noretry", status = 500, should_retry = false },
    { route = "messages", model = "claude-down", status = 500, should_retry = false },
    { route = "chat", model = "o3-down", status = 500, should_retry = false } } }))
local fast = { base = 0.001, cap = 0.005 }
ai.configure("openai", { base_url = up.url .. "/v1", api_key = "sk-test-123456", retry = fast })
ai.configure("anthropic", { base_url = up.url, api_key = "sk-ant-test-123456", retry = fast })
gateway.configure({ auth = true, key_cache = 0, models = {
  ["gpt"] = "openai/gpt-4o-mini", ["claude"] = "anthropic/claude-haiku-4-5",
  ["emb"] = "openai/text-embedding-3-small",
  ["o3"] = "openai/o3", ["gpt52"] = "openai/gpt-5.2",
  -- (an Anthropic client's request, falling back to a reasoning model)
  ["claude-or-o3"] = { model = "anthropic/claude-down", fallback = { "openai/o3" } },
  ["claude-or-gpt"] = { model = "anthropic/claude-down", fallback = { "openai/gpt-4o-mini" } },
  ["o3-or-gpt"] = { model = "openai/o3-down", fallback = { "openai/gpt-4.1" } },
} })
local good = assert(keys.add({ name = "good" }))
local s = gateway.serve({ listen = "127.0.0.1:0" })
print(json.encode({ url = ("http://127.0.0.1:%d"):format(s:port()), key = good, mock = up.url }))
io.stdout:flush()
resil.sleep(math.huge)
