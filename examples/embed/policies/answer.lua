-- The policy the C program calls (examples/embed/embed.c): one chat
-- completion through the shipped policy library (policies.call: timeout,
-- retries by class, breaker, validation), answering with the reply's text
-- and this file's version, which a reload (SIGHUP) makes visible.
local resil = require "resil"
local call = require "policies.call"

local answer = { version = 1 }

-- one provider per URL, kept across reloads (its breaker and limits too)
local providers = resil.keep("answer.providers")

local function provider(url)
  if not providers[url] then
    providers[url] = call.provider("mock", {
      request = { method = "POST", url = url .. "/v1/chat/completions" },
      timeout = 5,
      retry = { base = 0.01, cap = 0.05 },
      validate = "chat",
    })
  end
  return providers[url]
end

function answer.ask(url, question)
  local res, err = provider(url) { json = { model = "mock-1", messages = { { role = "user", content = question } } } }
  if not res then return nil, err end
  local body = resil.json.decode(res.body)
  return body.choices[1].message.content, answer.version
end

function answer.current_version() return answer.version end

return answer
