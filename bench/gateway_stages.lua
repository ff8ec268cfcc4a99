-- bench/gateway_stages.lua: the gateway's handler replaced by one that does
-- only the first GW_STAGE pieces of a request's work, so that
-- bench/gateway_stages.sh can say what each piece costs (same run, same
-- upstream, same wrk). Loaded by that script's gateway config, with UP (the
-- upstream's port) defined before it.
--
--   0  the request's body sent upstream with resil.http.request, the answer relayed
--   1  + the virtual key: SHA-256 of the bearer token, its record looked up (cached 2 s)
--   2  + the request's JSON decoded
--   3  + policies.call instead of the plain request: bucket, breaker, retry, metrics,
--        the body encoded from a table, the answer decoded and validated
--   4  + a ledger row per answer (pricing, resil.cost.record{wait = false}), without an id
--        as the full policy writes one (a row is keyed only under an Idempotency-Key: keyed by
--        the answer's random id, each row's index entry dirtied a page of its own, some three
--        WAL writes a request, and the stage read 74 us where the full policy's row costs less)
-- The full policy (policies/gateway.lua through policies.ai) is the script's last line.
local resil = require "resil"
local keys = require "resil.keys"
local call = require "policies.call"
local classify = require "policies.classify"
local pricing = require "policies.pricing"
local gateway = require "policies.gateway"

local json = resil.json
local STAGE = tonumber(os.getenv("GW_STAGE") or "0")
local url = ("http://127.0.0.1:%s/v1/chat/completions"):format(UP)
local headers = { ["content-type"] = "application/json", authorization = "Bearer sk-bench-123456" }
local provider = call.provider("openai", { request = { method = "POST", url = url, headers = headers },
  rate = { rate = 1e9, per = 1 }, breaker = { failure_rate = 0.5, min_calls = 20 }, retry = { base = 0.1 },
  validate = function(res)
    local data, why = classify.decoded(res)
    if data == nil then return nil, why end
    return true
  end })
local key_cache = {}
local REPLY_HEADERS = { ["content-type"] = "application/json" }

gateway.handle = function(req)
  if STAGE >= 1 then
    local token = (req.headers.authorization or ""):match("^[Bb]earer%s+(%S+)$") or ""
    local hash = resil.crypto.sha256(token)
    local c = key_cache[hash]
    if not c or c.expires < resil.now() then
      c = { record = keys.lookup(hash), expires = resil.now() + 2 }
      key_cache[hash] = c
    end
    if not c.record then return { status = 401, body = '{"error":{"message":"invalid key"}}' } end
  end
  local body = STAGE >= 2 and json.decode(req.body)
  local res, err
  if STAGE >= 3 then
    res, err = provider:attempts({ json = { model = body.model, messages = body.messages,
      max_tokens = body.max_tokens } })
  else
    res, err = resil.http.request({ method = "POST", url = url, body = req.body, headers = headers })
  end
  if not res then return { status = 502, body = json.encode({ error = { message = tostring(err) } }) } end
  if STAGE >= 4 then
    local data = classify.decoded(res)
    local usage = { input_tokens = data.usage.prompt_tokens, output_tokens = data.usage.completion_tokens }
    resil.cost.record({ provider = "openai", model = data.model, operation = "chat", user = "bench",
      units = usage, usd = pricing.cost("openai", data.model, usage),
      wait = false, sync = false })
  end
  return { status = 200, headers = REPLY_HEADERS, body = res.body }
end
