-- policies/gateway_access.lua: the gateway's access log (policies/gateway.lua writes it).
--
-- One "access" line per request at info: an operator's record of who asked for what and what it
-- got (every line the request's work logs carries the same request_id, from its log context),
-- unless the config's access_log is false or the log's level is above info, and then nothing is
-- built. A streamed reply's line is written as its stream ends: its status was sent long before,
-- its duration is the stream's, and how it ended is known then.
local resil = require "resil"

local access = {}

local WRITES_INFO = { debug = true, info = true }
local PATH_LOGGED, MODEL_LOGGED = 512, 256

-- req -> what its line says besides the reply: { started =, key =, model = }
local of = setmetatable({}, { __mode = "k" })
-- the serving task -> the kind of error its streamed reply ended with (an error event sent)
local stream_failed = setmetatable({}, { __mode = "k" })

local function cut(s, most) return #s > most and s:sub(1, most) .. "..." or s end

-- access.start(req, config) -> the request's record | nil (no line will be written)
function access.start(req, config)
  if config.access_log == false or not WRITES_INFO[resil.log.level()] then return nil end
  local a = { started = resil.now() }
  of[req] = a
  return a
end

-- what the gateway learns of a request as it serves it: its key's name, the model it named (cut:
-- one refused as too long was written whole, a 5 MB line a request)
function access.key(req, name)
  local a = of[req]
  if a then a.key = name end
end
function access.model(req, name)
  local a = of[req]
  if a and type(name) == "string" then a.model = cut(name, MODEL_LOGGED) end
end

-- the id the provider gave the request that answered (its x-request-id or request-id): the one
-- its support asks for (cut as the model is: a provider's header, not ours)
function access.upstream(req, id)
  local a = of[req]
  if a and type(id) == "string" then a.upstream = cut(id, MODEL_LOGGED) end
end

-- what served a streamed reply whose headers went before it was known (a long stream read whole,
-- kept alive: its x-resil-provider, -model and -attempts never sent): its line says it all the same
function access.served(req, provider, model, attempts)
  local a = of[req]
  if a then a.provider, a.served_model, a.attempts = provider, model, attempts end
end

-- the running task's streamed reply ended with an error event of this kind
function access.stream_failed(kind) stream_failed[resil.running()] = kind end

-- the gateway's drain cuts the streams still running (each ends with its error event,
-- gateway_stopping): their lines say so, not that their clients left
local stopping = false
function access.stopping() stopping = true end

-- how: nil for an answer; a stream's end: "ended", "failed" (an error event ended it: failed, its
-- kind), "cut" (the reply raised mid-way) or "client_left"
function access.line(req, a, route, status, reply, how, failed)
  local h = type(reply) == "table" and type(reply.headers) == "table" and reply.headers or {}
  local attempts = h["x-resil-attempts"]
  local cost = h["x-resil-cost-usd"]
  resil.log.info("access", { method = req.method, path = cut(req.path, PATH_LOGGED), route = route, status = status,
    ms = math.floor((resil.now() - a.started) * 1e6 + 0.5) / 1e3, key = a.key, model = a.model,
    provider = h["x-resil-provider"] or a.provider, served_model = h["x-resil-model"] or a.served_model,
    upstream_request_id = a.upstream,
    attempts = attempts and math.tointeger(tonumber(attempts)) or a.attempts, cost_usd = cost and tonumber(cost),
    replayed = h["x-resil-replayed"] == "true" or nil,
    bytes = type(reply) == "table" and type(reply.body) == "string" and #reply.body or nil, stream = how,
    error = failed })
end

-- a streamed reply whose line is written as its stream ends (its client leaving cancels it: no error)
function access.at_end(req, a, route, reply)
  local stream = reply.stream
  reply.stream = function(write)
    local ended = false
    local _ <close> = setmetatable({}, { __close = function(_, err)
      local failed = stream_failed[resil.running()]
      local how = ended and (failed and "failed" or "ended") or err == nil and "client_left" or "cut"
      if not ended and stopping then how, failed = "failed", "gateway_stopping" end
      access.line(req, a, route, reply.status or 200, reply, how, failed)
    end })
    local function over(...) ended = true; return ... end
    return over(stream(write))
  end
end

return access
