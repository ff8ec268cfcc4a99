-- The gateway between the two wire formats (policies/gateway.lua, policies/messages.lua, the
-- adapters): what one API's client asks reaches the other API's provider as that API says it,
-- and what has no counterpart there is the client's 400, never an answer silently without it.
-- Real HTTP against the mock provider's routes, which keep what they were sent.
local resil = require "resil"
local helpers = require "spec.helpers"
local http = resil.http
local json = resil.json

local MSGS = { { role = "user", content = "hi" } }
local OPENAI_ANSWER = { id = "chatcmpl-up", object = "chat.completion", created = 1, model = "gpt-4o-mini",
  choices = { { index = 0, message = { role = "assistant", content = "ok", refusal = json.null },
    finish_reason = "stop", logprobs = json.null } },
  usage = { prompt_tokens = 5, completion_tokens = 1, total_tokens = 6 } }
local ANTHROPIC_ANSWER = { id = "msg_up", type = "message", role = "assistant", model = "claude-sonnet-4-5-20250929",
  content = { { type = "text", text = "ok" } }, stop_reason = "end_turn", stop_sequence = json.null,
  usage = { input_tokens = 5, output_tokens = 1 } }

-- a gateway in front of an upstream that keeps each body it is sent (sent.openai, sent.anthropic:
-- the last one) -> its URL, sent
local function start(models)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = helpers.tmpname(".db") })
  local sent = {}
  local function answer(kind, body)
    return function(req)
      sent[kind] = json.decode(req.body)
      return { status = 200, headers = { ["content-type"] = "application/json" }, body = json.encode(body) }
    end
  end
  local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = answer("openai", OPENAI_ANSWER),
    ["POST /v1/messages"] = answer("anthropic", ANTHROPIC_ANSWER) } }))
  local url = helpers.gateway_for_mock(m, { auth = false, key_cache = 0, models = models or {} }, finally)
  return url, sent
end

local function post(url, body)
  return assert(http.request({ method = "POST", url = url, headers = { ["content-type"] = "application/json" },
    body = type(body) == "string" and body or json.encode(body) }))
end

describe("gateway: an OpenAI client's output limit", function()
  -- (a client that sets one of the two fields and sends the other as null: read as no limit at
  -- all, the provider wrote, and billed, up to the model's own limit)
  it("max_completion_tokens null beside max_tokens is the max_tokens, whichever API serves it", function()
    local url, sent = start()
    local body = '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":null,"max_tokens":100}'
    local res = post(url .. "/v1/chat/completions", body:format("openai/gpt-4o-mini"))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(100, sent.openai.max_completion_tokens or sent.openai.max_tokens)
    res = post(url .. "/v1/chat/completions", body:format("anthropic/claude-sonnet-4-5-20250929"))
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(100, sent.anthropic.max_tokens)
  end)

  it("max_completion_tokens null and max_tokens not a positive integer is a 400", function()
    local url = start()
    local res = post(url .. "/v1/chat/completions", '{"model":"openai/gpt-4o-mini","messages":[{"role":"user",'
      .. '"content":"hi"}],"max_completion_tokens":null,"max_tokens":"lots"}')
    assert.are.equal(400, res.status, res.body)
    assert.matches("max_tokens", json.decode(res.body).error.message)
  end)
end)
