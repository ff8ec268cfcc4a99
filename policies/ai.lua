-- policies/ai.lua: one API over the providers' own wire formats.
--
--   local ai = require "policies.ai"
--   local r, err = ai.chat{ model = "openai/gpt-4o-mini-2024-07-18", messages = msgs, max_tokens = 400,
--     fallback = { "anthropic/claude-sonnet-4-5-20250929" },  -- another wire format: translated
--     budget = "user:42",                                       -- reserve an estimate, settle the cost
--     cache = { ttl = 3600 },                                   -- answer repeats from the store
--     retry = { base = 1 }, deadline = 60 }                     -- call.provider options, for this call
--   -- r.text, r.usage {input_tokens, output_tokens, cached_input_tokens, cache_write_tokens},
--   -- r.cost_usd, r.provider, r.model (what served), r.finish_reason, r.id, r.raw,
--   -- r.fallbacks (how many targets failed before this one), and from the registry
--   -- (policies/models.lua): r.alias, r.routed {from, to, reason}, r.migration {alias, side},
--   -- r.deployment
--   -- model: an alias of the registry or "provider/model[:version]"
--   -- give_up = fn() -> a reason | nil: asked before each attempt (retry, fallback); once it says
--   -- one (the gateway's client left), the attempt under way ends and is recorded, and no other starts
--
--   local s = ai.stream{ model = "anthropic/claude-sonnet-4-5-20250929", messages = msgs, max_tokens = 800 }
--   for delta in s do io.write(delta) end     -- raises kind="stream_interrupted" (err.text) if cut
--   local r = s:result()                      -- as ai.chat's, once the stream ended
--
--   ai.configure("openai", { base_url = "http://localhost:8000/v1", rate = { rate = 500, per = 60 },
--     tokens = { rate = 90000, per = 60 }, breaker = { failure_rate = 0.5, min_calls = 10 },
--     retry = { base = 0.5 }, deadline = 120, timeout = 60, concurrency = { size = 16 } })
--
-- Providers are the adapters in policies/providers/ (openai, anthropic; a
-- model "x/..." loads policies.providers.x). Keys come from the environment
-- through resil.secret (OPENAI_API_KEY, ANTHROPIC_API_KEY): a missing one is
-- an error naming the variable before any request is sent.
local resil = require "resil"
local if_reload_fails = require "resil.if_reload_fails"
local call = require "policies.call"
local classify = require "policies.classify"
local fallback = require "policies.fallback"
local pricing = require "policies.pricing"
local stops = require "policies.stops"

local json = resil.json
local ai = {}

ai.adapters = {}
ai.config = resil.keep("policies.ai.config") -- per provider, see ai.configure; kept across a policy reload

-- the options of policies.call a provider's config or a call may set
local CALL_OPTIONS = { "timeout", "deadline", "retry", "breaker", "rate", "tokens", "concurrency", "idempotency" }
-- does a call set any of them? (CALL_OPTIONS written out: asked on every call)
local function sets_call_options(r)
  return r.timeout ~= nil or r.deadline ~= nil or r.retry ~= nil or r.breaker ~= nil or r.rate ~= nil
    or r.tokens ~= nil or r.concurrency ~= nil or r.idempotency ~= nil
end

-- ai.provider_module(name) -> the provider's module (policies/providers/NAME.lua) | nil when there
-- is no such file; a file that is there and does not load raises its own error (file:line), not
-- "unknown provider"
function ai.provider_module(provider)
  local ok, mod = pcall(require, "policies.providers." .. provider)
  if ok then return mod end
  if tostring(mod):find("^module '[^']*' not found") then return nil end
  error(mod, 0)
end

local function adapter_of(provider, level)
  local a = ai.adapters[provider]
  if a then return a end
  local mod = ai.provider_module(provider)
  if type(mod) ~= "table" then
    error(("ai: unknown provider '%s' (no policies/providers/%s.lua)"):format(provider, provider), level + 1)
  end
  ai.adapters[provider] = mod
  return mod
end

-- ai.configure(provider, conf): base_url, api_key (a string, or false for a
-- server without auth), api_key_env, the call.provider options, fallback (a
-- list of models), cache = {ttl=}, max_tokens (default for this provider),
-- idle_timeout (streams, default 60 s), stream_timeout (default 600 s),
-- service_tier (OpenAI's processing tier for a request that names none:
-- sent, and held and priced at that tier's price).
local callers = {}
local configured, CONFIG_GEN = 0, {} -- ai.configure calls so far: kept targets older than that are dropped
local served_tiers = resil.keep("policies.ai.served_tiers", function() return { n = 0, by = {} } end) -- (below)
-- (a reload from a version that kept one tier per target, as a string: each made a set, by its
-- target's provider; left a string, the next answer at another tier raised after it was billed)
for name, learned in pairs(served_tiers.by) do
  if type(learned) ~= "table" then
    served_tiers.by[name] = { provider = tostring(name):match("([^:/]+)/"), tiers = { [learned] = true } }
  end
end
local NO_CONF = {} -- a provider not configured: one stable table, so its caller is kept
-- cache = {ttl = seconds}: a TTL the store keeps (one it refuses left every answer uncached,
-- each repeat paid for, a warning logged per call)
local function cache_ok(c)
  return type(c) == "table" and type(c.ttl) == "number" and c.ttl > 0 and c.ttl < math.huge
end

-- what ai.configure reads (its own, policies.call's, the shipped adapters'); a provider file of a
-- project's own names its other options in `config_keys`
local KNOWN_CONF = {}
for k in ("base_url api_key api_key_env key_env fallback fallback_on cache max_tokens idle_timeout stream_timeout " ..
    "service_tier timeout deadline retry breaker rate tokens concurrency idempotency request validate estimate " ..
    "beta version official stream_usage max_tokens_field"):gmatch("%S+") do
  KNOWN_CONF[k] = true
end
-- An option no one reads is said, where it was given: `retrys = {...}` or a top-level
-- `max_retries` were silently ignored, the provider left on the defaults.
local function unknown_options(provider, conf)
  local adapter_keys
  for k in pairs(conf) do
    if not KNOWN_CONF[k] then
      if adapter_keys == nil then
        local ok, mod = pcall(ai.provider_module, provider)
        adapter_keys = ok and type(mod) == "table" and type(mod.config_keys) == "table" and mod.config_keys or {}
      end
      local known = false
      for _, a in ipairs(adapter_keys) do known = known or a == k end
      if not known then
        local where = select(2, pcall(error, "", 4)):gsub(":%s*$", "")
        resil.log.warn(("ai.configure: unknown option '%s' for %s, ignored (a misspelling? see README, " ..
          "Providers)"):format(tostring(k), provider), { option = tostring(k), provider = provider, where = where })
      end
    end
  end
end

function ai.configure(provider, conf)
  if type(provider) ~= "string" then error("ai.configure: provider must be a string", 2) end
  if type(conf) ~= "table" then error("ai.configure: conf must be a table", 2) end
  unknown_options(provider, conf)
  if conf.cache ~= nil and not cache_ok(conf.cache) then
    error("ai.configure: cache must be {ttl = seconds}, seconds > 0", 2)
  end
  if conf.retry ~= nil then
    local wrong = require("policies.retry").check(conf.retry)
    if wrong then error(("ai.configure '%s': %s"):format(provider, wrong), 2) end
  end
  -- (each was taken, then every call raised inside this file, "attempt to index a number value
  -- (local 'base')", or policies/call.lua's "bad url 'localhost:8080/v1/...'"; a key given as a
  -- number was "OPENAI_API_KEY is not set")
  local base = conf.base_url
  if base ~= nil and not (type(base) == "string" and base:lower():match("^https?://[^/]")) then
    error(("ai.configure '%s': base_url must be an http(s) URL (http://host:port/v1), got %s"):format(provider,
      type(base) == "string" and ("'%s'"):format(resil.redact(base)) or type(base)), 2)
  end
  if conf.api_key ~= nil and conf.api_key ~= false and not (type(conf.api_key) == "string" and conf.api_key ~= "") then
    error(("ai.configure '%s': api_key must be the key (a string), or false for none, got %s"):format(provider,
      type(conf.api_key) == "string" and "an empty string" or type(conf.api_key)), 2)
  end
  if conf.api_key_env ~= nil and not (type(conf.api_key_env) == "string" and conf.api_key_env ~= "") then
    error(("ai.configure '%s': api_key_env must be the name of an environment variable, got %s"):format(provider,
      type(conf.api_key_env)), 2)
  end
  -- (a deadline that is not a number, or a breaker, rate, tokens or concurrency that is not a table, was
  -- taken here and raised inside policies/ai.lua at every call)
  local wrong = call.check(provider, conf)
  if wrong then error(("ai.configure '%s': %s"):format(provider, (wrong:gsub("^call%.provider '[^']*': ", ""))), 2) end
  if type(conf.api_key) == "string" and #conf.api_key >= 6 then resil.log.redact(conf.api_key) end
  -- (each is every call's: 0 timed every call out at once, where curl's 0 means none, math.huge here)
  for _, k in ipairs({ "timeout", "stream_timeout", "idle_timeout" }) do
    local v = conf[k]
    if v ~= nil and not (type(v) == "number" and v > 0) then
      error(("ai.configure '%s': %s must be a number of seconds > 0 (math.huge: none), got %s"):format(provider, k,
        type(v) == "string" and ("%q"):format(v) or tostring(v)), 2)
    end
  end
  -- (taken as it came: each budgeted call given none raised inside policies/call.lua for a NaN, or was
  -- held at -1 token)
  local mt = conf.max_tokens
  if mt ~= nil and not (type(mt) == "number" and mt >= 1 and mt < 2^53 and mt == math.floor(mt)) then
    error(("ai.configure '%s': max_tokens must be a whole number >= 1, got %s"):format(provider,
      type(mt) == "string" and ("%q"):format(mt) or tostring(mt)), 2)
  end
  if conf.service_tier ~= nil and type(conf.service_tier) ~= "string" then
    error("ai.configure: service_tier must be a string (\"priority\", \"flex\", \"default\", ...)", 2)
  end
  local before = ai.config[provider]
  ai.config[provider] = conf
  -- (ai.config is one table for every version: a reload that fails after this puts it back)
  if_reload_fails(function() ai.config[provider] = before end)
  callers[provider] = nil
  configured = configured + 1
  -- (a new configuration says anew what its provider's calls ask; another provider's stand)
  for name, learned in pairs(served_tiers.by) do
    if learned.provider == provider then
      served_tiers.by[name] = nil
      served_tiers.n = served_tiers.n - 1
    end
  end
end

local function base_url(adapter, conf)
  local base = conf.base_url or os.getenv(adapter.base_env) or adapter.default_base
  if base:byte(-1) ~= 47 then return base end -- no trailing "/": nothing to strip (the common case)
  return (base:gsub("/+$", ""))
end

-- the key, false when the provider is configured without one, or nil, err
local function key_of(provider, adapter, conf, model)
  if conf.api_key == false then return false end
  if type(conf.api_key) == "string" then return conf.api_key end
  local var = conf.api_key_env or adapter.key_env
  local key = var and resil.secret(var)
  if not key then
    return nil, resil.error("missing_secret", ("%s is not set: %s/%s needs it (export %s=...)"):format(
      tostring(var), provider, model, tostring(var)), { variable = var, provider = provider, model = model,
      class = "auth", retryable = false })
  end
  return key
end

-- A call's own retry table is this call's alone: its deadline, a time on resil.now()'s clock, goes to
-- the provider made for the call as the seconds left to it (call.provider refuses a deadline in
-- options made once, which would pass for every later call)
local function call_retry(r)
  if r.deadline == nil then return r end
  local copy = {}
  for k, v in pairs(r) do copy[k] = v end
  copy.deadline, copy.timeout = nil, math.max(0, r.deadline - resil.now())
  return copy
end

-- One policies.call provider per provider name (or registry deployment), or
-- a fresh one for a call that overrides its options (buckets, breakers and
-- semaphores are shared by name).
local function caller_of(name, adapter, conf, req)
  local override = sets_call_options(req)
  local c = not override and callers[name]
  if c and c.conf == conf then return c.caller end
  local o = {}
  for _, k in ipairs(CALL_OPTIONS) do
    if req[k] ~= nil then o[k] = req[k] else o[k] = conf[k] end
  end
  if req.retry ~= nil then o.retry = call_retry(req.retry) end
  o.validate = function(res, wire)
    if res.stream then -- a stream that delivered its first delta, or ended
      if res.empty then return nil, "empty content (the stream ended before any text)" end
      if res.unusable then return nil, res.unusable end
      return true
    end
    local data, why = classify.decoded(res)
    if data == nil then return nil, why end
    return adapter.validate(data, type(wire) == "table" and type(wire.json) == "table" and wire.json or nil)
  end
  local caller = call.provider(name, o)
  if not override then callers[name] = { caller = caller, conf = conf } end
  return caller
end

local function parse_model(spec, level)
  local model = type(spec) == "table" and spec.model or spec
  if type(model) ~= "string" then error("ai: model must be a string \"provider/model\"", level + 1) end
  local provider, name = model:match("^([%w_%-]+)/(.+)$")
  if not provider then
    error(("ai: model '%s' must name its provider: \"openai/%s\""):format(model, model), level + 1)
  end
  return provider, name
end

-- the registry now loaded (a reload swaps it in for the next call)
-- (read where require keeps it: require's own look is some 500 instructions more, on every call)
local function registry() return package.loaded["policies.registry"] or require "policies.registry" end

-- a deployment's config: the provider's, then ai.configure(name), then the registry entry's
local merged_confs = setmetatable({}, { __mode = "k" })
local function deployment_conf(provider, d)
  local base, named, own = ai.config[provider] or NO_CONF, ai.config[d.name], d.config
  if not named and not own then return base end
  local key = own or named
  local m = merged_confs[key]
  if m and m.base == base and m.named == named then return m.conf end
  local conf = {}
  for _, t in ipairs({ base, named or {}, own or {} }) do
    -- a layer that names its key's variable is not sent the key a wider layer set
    if t.api_key_env ~= nil and t.api_key == nil then conf.api_key = nil end
    for k, v in pairs(t) do conf[k] = v end
  end
  merged_confs[key] = { base = base, named = named, conf = conf }
  return conf
end

local function target_of(model, req, level, spec, d)
  local p, name = parse_model(model, level + 1)
  local adapter = adapter_of(p, level + 1)
  if not adapter.url then -- a job or speech provider (replicate, fal, elevenlabs): said before its key is asked for
    error(("ai: provider '%s' has no chat API (%s is for ai.job or ai.speech)"):format(p, model), level + 1)
  end
  local conf = d and deployment_conf(p, d) or ai.config[p] or NO_CONF
  local key, err = key_of(p, adapter, conf, name)
  if key == nil then return nil, err end
  local limits = d and d.name or p
  return { provider = p, model = name, adapter = adapter, conf = conf, key = key,
    overrides = type(spec) == "table" and spec or nil, name = d and (d.name .. ":" .. p .. "/" .. name) or (p .. "/" .. name),
    deployment = d and d.name or nil, caller = caller_of(limits, adapter, conf, req) }
end

-- a deployment's state for spreading: breaker open?, seconds until its bucket admits a call
local function deployment_state(t)
  local c = t.caller
  local open = c.breaker ~= nil and c.breaker:state() == "open"
  local wait = 0
  for _, b in ipairs({ c.bucket, c.token_bucket }) do
    if b.wait_time then wait = math.max(wait, b:wait_time(1)) end
  end
  return open, wait
end

-- The targets of a call, first the model (through the registry: alias,
-- deprecation, migration, deployments), then its fallbacks, each with
-- adapter, config, key and caller. Keys are checked before anything is sent.
local targets_from

-- A call with none of the call options of its own gets the targets kept on
-- its plan (the registry keeps a plan a second; see registry.resolve), one
-- set per fallback list: the same few aliases on every request of a gateway.
-- Deployments are ordered per call, so their targets are never kept.
local NO_FALLBACK = {}
local function kept_targets(plan, req)
  if plan.migration then return nil end
  if sets_call_options(req) then return nil end
  local by = plan.targets
  if not by or by[CONFIG_GEN] ~= configured then -- ai.configure since: made again
    by = setmetatable({ [CONFIG_GEN] = configured }, { __mode = "k" })
    plan.targets = by
  end
  return by, req.fallback or NO_FALLBACK
end

-- A call made again under its resil.once key (after a failure, a crash) draws a migration's side
-- by that key: drawn again, it went to the other version's provider, which had never seen the key
-- and billed the answer the first one's would have replayed unbilled.
local function targets_of(req, level)
  if type(req.model) ~= "string" then error("ai: model must be a string: an alias or \"provider/model\"", level + 1) end
  local reg = registry()
  local plan = reg.resolve(req.model, req, level + 2, nil, resil.context().idempotency_key)
  if plan.err then return nil, plan.err end
  local kept, fb_key = kept_targets(plan, req)
  local targets = kept and kept[fb_key]
  if targets then return targets end
  local err
  targets, err = targets_from(reg, plan, req, level + 1)
  if kept and targets and not targets.deployments then kept[fb_key] = targets end
  return targets, err
end

-- ai.targets(req) -> the call's targets in the order a call tries them (model, deployments,
-- fallbacks), each { provider, model, adapter, conf, key, name, caller = { breaker, ... } } |
-- nil, err: the gateway's count_tokens asks the first that counts, as a call would
function ai.targets(req) return targets_of(req, 2) end
ai.deployment_conf = deployment_conf -- (what an older copy of policies/gateway.lua's count_tokens asks)

-- a target left out for its missing key, said once per variable a process
local warned_keyless = {}
local function warn_keyless(errs)
  for _, err in ipairs(errs) do
    -- (a provider file that names no key variable: its error has none, said once per provider)
    local said = err.variable or ("(" .. tostring(err.provider) .. ")")
    if not warned_keyless[said] then
      warned_keyless[said] = true
      resil.log.warn("ai: a target without its key is left out of calls: " .. err.message,
        { variable = err.variable, provider = err.provider, model = err.model })
    end
  end
end

function targets_from(reg, plan, req, level)
  local targets, seen = {}, {}
  local function add(t)
    if not seen[t.name] then
      seen[t.name] = true
      targets[#targets + 1] = t
    end
  end
  local left = req.deadline or plan.deadline
  -- A target whose key is missing is left out (said once per variable): a
  -- backup's expired key must not fail the calls its primary serves. Only
  -- when the model itself has no target with a key is the call refused.
  local keyless = {}
  -- (a frame more than targets_from's: what target_of raises names the line that called ai.chat,
  -- not policies/ai.lua's)
  local function add_choices(choices, spec)
    for _, c in ipairs(choices) do
      if c.deployments then
        local by, keyed = {}, {}
        for _, d in ipairs(c.deployments) do
          local t, err = target_of(d.model, req, level + 2, spec, d)
          if t then by[d] = t; keyed[#keyed + 1] = d else keyless[#keyless + 1] = err end
        end
        if keyed[1] then
          local order = #keyed == #c.deployments and c or { deployments = keyed, strategy = c.strategy }
          for _, d in ipairs(reg.order(order, function(d) return deployment_state(by[d]) end, left)) do add(by[d]) end
          targets.deployments = true -- in this call's order: not kept
        end
      else
        local t, err = target_of(c.model, req, level + 2, spec)
        if t then add(t) else keyless[#keyless + 1] = err end
      end
    end
  end
  local mig = plan.migration
  if mig and mig.side == "new" and mig.primary then
    -- (a new version none of whose targets has its key, its provider's key not set where the
    -- registry went: the call is the old version's, and counted so; it was counted as the new
    -- side's, whose figures were then the old version's, and r.migration said "new")
    add_choices({ table.unpack(plan.choices, 1, mig.primary) })
    if not targets[1] then mig.side = "old" end
    add_choices({ table.unpack(plan.choices, mig.primary + 1) })
  else
    add_choices(plan.choices)
  end
  if not targets[1] then return nil, keyless[1] end
  local fb = req.fallback
  if fb == nil then fb = (ai.config[targets[1].provider] or {}).fallback end
  if fb ~= nil and type(fb) ~= "table" then error("ai: fallback must be a list of models", level + 1) end
  for _, f in ipairs(fb or {}) do
    local m = type(f) == "table" and f.model or f
    if type(m) ~= "string" then error("ai: fallback entries must be models or {model=, ...}", level + 1) end
    -- (a copy of policies/registry.lua from before resolve_fallback resolves it as a call's own name)
    local fplan = (reg.resolve_fallback or reg.resolve)(m, req, level + 2)
    if not fplan.err then add_choices(fplan.choices, f) end
  end
  if keyless[1] then warn_keyless(keyless) end
  targets.plan = plan
  return targets
end

-- per wire format: { openai = {...}, anthropic = {...} }, each entry checked by `each(name, value)`
-- (module-level functions: made once, not per call)
local function per_format(req, field, what, each, level)
  local t = req[field]
  if type(t) ~= "table" then error(("ai: %s must be a table of {wire format = {%s}}"):format(field, what), level + 1) end
  for k, v in pairs(t) do
    if type(v) ~= "table" then error(("ai: %s.%s must be a table"):format(field, tostring(k)), level + 1) end
    for name, value in pairs(v) do
      if each and not each(name, value) then
        error(("ai: %s.%s: each %s"):format(field, tostring(k), what), level + 1)
      end
    end
  end
end
local function one_line_header(name, value)
  return type(name) == "string" and type(value) == "string" and not value:find("[\r\n%z]")
end

-- a budget a request names: its name, or what resil.budget made (a number or `true` raised
-- "attempt to index a number value (local 'budget')" from inside this file)
local function check_budget(b, who, level)
  if b ~= nil and not (type(b) == "string" or type(b) == "table" and type(b.reserve) == "function") then
    error(("%s: budget must be a budget's name or a resil.budget, not %s"):format(who, type(b)), level + 1)
  end
end

-- the call options a request may set for itself (CALL_OPTIONS), checked as call.provider checks
-- them: its error named this file's line (caller_of's), not the request's. who: "ai", "ai.embed"
local function check_call_options(req, who, level)
  if not sets_call_options(req) then return end
  for _, k in ipairs({ "timeout", "deadline" }) do
    local v = req[k]
    if v ~= nil and not (type(v) == "number" and v == v and (k == "deadline" or v > 0)) then
      error(("%s: %s must be a number of seconds%s, got %s"):format(who, k, k == "timeout" and " > 0" or "",
        type(v) == "string" and ("%q"):format(v) or tostring(v)), level + 1)
    end
  end
  for _, k in ipairs({ "rate", "tokens", "breaker", "concurrency" }) do
    local v = req[k]
    if v ~= nil and v ~= false and type(v) ~= "table" then
      error(("%s: %s must be a table, got %s"):format(who, k, type(v)), level + 1)
    end
  end
  if req.retry ~= nil then
    local wrong = require("policies.retry").check(req.retry)
    if wrong then error(who .. ": " .. wrong, level + 1) end
  end
end

-- a request's numbers the providers take as sampling options: each must be one JSON can say
local FINITE_FIELDS = { "temperature", "top_p", "top_k", "seed", "n", "frequency_penalty", "presence_penalty" }

local function check_request(req, level)
  if type(req) ~= "table" then error("ai: expects a request table", level + 1) end
  check_budget(req.budget, "ai", level + 1)
  if type(req.messages) ~= "table" or #req.messages == 0 then
    error("ai: messages must be a non-empty list of {role=, content=}", level + 1)
  end
  -- (indexed until the first nil, as ipairs walks: no iterator call a message, on every request)
  local msgs, i = req.messages, 1
  local m = msgs[1]
  while m ~= nil do
    if type(m) ~= "table" or type(m.role) ~= "string" then
      error(("ai: messages[%d] must be a table with a role"):format(i), level + 1)
    end
    i = i + 1
    m = msgs[i]
  end
  -- (-1 was sent, the provider's 400, and held against a budget below its input's cost)
  if req.max_tokens ~= nil and not (math.type(req.max_tokens) == "integer" and req.max_tokens >= 0) then
    error(("ai: max_tokens must be an integer >= 0, got %s"):format(tostring(req.max_tokens)), level + 1)
  end
  -- (a NaN or an infinite one, computed, raised at "policies/call.lua:362: ... cannot encode 'json'")
  for i = 1, #FINITE_FIELDS do
    local v = req[FINITE_FIELDS[i]]
    -- (most are absent: no type() call for them)
    if v ~= nil and type(v) == "number" and not (v == v and v > -math.huge and v < math.huge) then
      error(("ai: %s must be a finite number, got %s"):format(FINITE_FIELDS[i], tostring(v)), level + 1)
    end
  end
  check_call_options(req, "ai", level + 1)
  if req.cache ~= nil and not cache_ok(req.cache) then
    error("ai: cache must be {ttl = seconds}, seconds > 0", level + 1)
  end
  if req.give_up ~= nil and type(req.give_up) ~= "function" then
    error("ai: give_up must be a function () -> a reason | nil", level + 1)
  end
  if req.provider_headers ~= nil then
    per_format(req, "provider_headers", "header = a one-line string", one_line_header, level + 1)
  end
  if req.provider_options ~= nil then per_format(req, "provider_options", "field = value", nil, level + 1) end
end

-- the request a target gets: the call's, with a fallback entry's own fields over it
local function request_for(t, req)
  if not t.overrides then return req end
  local r = {}
  for k, v in pairs(req) do r[k] = v end
  for k, v in pairs(t.overrides) do if k ~= "model" then r[k] = v end end
  return r
end

-- a target's URL, headers and adapter config, made once per target (a target
-- lives as long as its config: see targets_of)
local function wire_parts(t)
  local w = t.wire
  if w then return w end
  local conf = t.conf
  local base = base_url(t.adapter, conf)
  w = { url = t.adapter.url(base), headers = t.adapter.headers(t.key or nil, conf),
    aconf = setmetatable({ official = base == t.adapter.default_base }, { __index = conf }) }
  t.wire = w
  return w
end

-- The most a target's answer may be, in tokens: what a budget reserves. A
-- budgeted call without max_tokens is sent this as its max_tokens, or the
-- provider writes up to the model's own limit (16,384 for gpt-4o, more for
-- reasoning) against a reservation of 4,096.
local function budget_max_tokens(conf, adapter)
  return conf and conf.max_tokens or adapter and adapter.default_max_tokens or 4096
end
local function reserved_max_tokens(t, r)
  return r.max_tokens or budget_max_tokens(t.conf, t.adapter)
end

local function wire_request(t, req, stream)
  local w = wire_parts(t)
  local r = request_for(t, req)
  local cap = req.budget ~= nil and r.max_tokens == nil
  if stream or cap then
    local s = {}
    for k, v in pairs(r) do s[k] = v end
    if stream then s.stream = true end
    if cap then s.max_tokens = reserved_max_tokens(t, r) end
    r = s
  end
  local headers = w.headers
  -- headers for this wire format only (Anthropic's anthropic-beta), beside the target's own,
  -- never instead of them (its key, its API version)
  local own = req.provider_headers and req.provider_headers[t.adapter.name]
  if own then
    headers = {}
    for k, v in pairs(w.headers) do headers[k] = v end
    for k, v in pairs(own) do
      k = k:lower()
      if headers[k] == nil then headers[k] = v
      elseif k == "anthropic-beta" then headers[k] = headers[k] .. "," .. v end
    end
  end
  return { method = "POST", url = w.url, headers = headers, json = t.adapter.body(r, t.model, w.aconf) }
end
ai.wire_request = wire_request

---------------------------------------------------------------------------
-- costs, budgets and the cache

-- What a call may cost at most, reserved from its budget: every input the
-- provider bills (messages, system in either form, tools, a response
-- format's schema, fields passed as they are; pricing.estimate_tokens) and the
-- longest answer it may write, once per choice (`n`: each is billed). Any
-- of them left out, or n = 128 counted once, let one request spend many
-- times a budget that looked unreached.
local BILLED_INPUTS = { "tools", "response_format", "extra", "provider_options" }
-- where a request may mark a prompt for the cache (cache_writes below)
local CACHE_MARKED = { "messages", "system", "tools", "provider_options", "extra" }

-- image parts anywhere in a conversation (a message's content, a tool result's): each is
-- billed as up to thousands of tokens, however few bytes its link or file id is
local IMAGE_PARTS = { image_url = true, image = true }
local function count_images(v, depth)
  local n = IMAGE_PARTS[v.type] and 1 or 0
  if depth < 16 then
    for _, x in pairs(v) do
      if type(x) == "table" then n = n + count_images(x, depth + 1) end
    end
  end
  return n
end

-- The cache writes a request asks for (Anthropic's cache_control on a
-- block, a tool, the system prompt): the input up to such a mark is billed
-- as a cache write, 1.25x the input price, 2x for the 1-hour cache.
-- -> "1h" | "5m" | nil
local function cache_writes(v, depth)
  local c = v.cache_control
  if type(c) == "table" and c.ttl == "1h" then return "1h" end
  local found = type(c) == "table" and "5m" or nil
  if depth < 16 then
    for _, x in pairs(v) do
      if type(x) == "table" then
        local inner = cache_writes(x, depth + 1)
        if inner == "1h" then return inner end
        found = found or inner
      end
    end
  end
  return found
end

-- the searches a request's web search tools may run, each billed besides its tokens: their
-- max_uses; nil when one has none (the provider runs as many as the model asks for)
local function web_searches(tools)
  local n = 0
  if type(tools) ~= "table" then return 0 end
  for _, t in ipairs(tools) do
    if type(t) == "table" and type(t.type) == "string" and t.type:find("^web_search") then
      local most = math.tointeger(t.max_uses)
      if not most or most < 0 then return nil end
      n = n + most
    end
  end
  return n
end

-- the input tokens of a request's text, as estimated before the provider
-- says: its messages (an embedding's input), system, tools and the other
-- fields billed as input (images aside)
local function text_input_tokens(req)
  local tokens = pricing.estimate_tokens(json.encode(req.messages or req.input or ""))
  local system = req.system
  if type(system) == "string" then tokens = tokens + pricing.estimate_tokens(system)
  elseif type(system) == "table" then tokens = tokens + pricing.estimate_tokens(json.encode(system)) end
  for _, field in ipairs(BILLED_INPUTS) do
    if type(req[field]) == "table" then tokens = tokens + pricing.estimate_tokens(json.encode(req[field])) end
  end
  return tokens
end

-- The processing tier a call asks a target for: its request's
-- (provider_options), else the provider's config's (service_tier); nil when
-- it names none
local function asked_tier(t, r)
  local own = type(r.provider_options) == "table" and r.provider_options[t.adapter.name]
  local tier = type(own) == "table" and own.service_tier
  if type(tier) ~= "string" then tier = t.conf.service_tier end -- (a JSON null names none)
  return tier
end
-- none, or "auto": the tier the project's settings at the provider say, which may be priority
local function unasked(tier) return tier == nil or tier == "auto" end

-- The tiers a target's answers came back at when their call asked none (a
-- project that defaults to OpenAI's priority tier: its answers say
-- service_tier "priority"), by target: a later call asking none is held at
-- the highest of their prices when it is higher than the standard one, not
-- at about half what it will cost. Every tier seen is kept (a flex answer
-- after priority ones does not make the next priority answer held at flex's
-- price). Only tiers pricing.tiers prices for the model; kept across a
-- reload until ai.configure is called again for the target's provider, up to
-- SERVED_TIERS_MAX targets.
local SERVED_TIERS_MAX = 1000
local function learn_tier(t, req, r)
  local tier = type(r.usage) == "table" and r.usage.service_tier
  if not tier or type(tier) ~= "string" or not t.adapter.service_tier then return end -- (no tier: no call)
  local learned = served_tiers.by[t.name]
  if learned and learned.tiers[tier] then return end
  if not unasked(asked_tier(t, request_for(t, req))) then return end
  local named = pricing.tiers[t.provider]
  if type(named) ~= "table" or named[tier] == nil or not pricing.price(t.provider, t.model, tier) then return end
  if not learned then
    if served_tiers.n >= SERVED_TIERS_MAX then served_tiers.by, served_tiers.n = {}, 0 end
    learned = { provider = t.provider, tiers = {} }
    served_tiers.by[t.name] = learned
    served_tiers.n = served_tiers.n + 1
  end
  learned.tiers[tier] = true
  resil.log.warn("ai: answers come from a processing tier their calls did not ask for; budgets now hold at its " ..
    "price (say it in the provider's config to hold so from the first call)", { model = t.name, service_tier = tier,
    config = ("ai.configure(%q, { service_tier = %q })"):format(t.provider, tier) })
end

-- -> usd | nil, why (the model itself has no price); and the fallbacks without one, { [t] = why }
local function estimate_usd(targets, req, searches)
  local tokens = text_input_tokens(req)
  local images = type(req.messages) == "table" and count_images(req.messages, 0) or 0
  local choices = math.tointeger(req.n) or 1
  if choices < 1 then choices = 1 end
  -- (every input token may be a cache write when one is asked for: held at that price, the
  -- 1-hour one's if any mark asks for it)
  local writes
  for _, field in ipairs(CACHE_MARKED) do
    local v = req[field]
    local w = type(v) == "table" and cache_writes(v, 0) or nil
    if w == "1h" or not writes then writes = w or writes end
  end
  local usd, unpriced = 0, nil
  for i, t in ipairs(targets) do
    local r = request_for(t, req)
    local out = reserved_max_tokens(t, r) * choices
    local input = tokens + images * pricing.image_tokens_for(t.provider, t.model)
    -- (a processing tier the request or the provider's config asks for, priority or flex, is
    -- held at its price; asked none, also at the one its answers came back at, if higher)
    local asked = t.adapter.service_tier and asked_tier(t, r)
    local tier = asked and t.adapter.service_tier(asked) or nil
    local usage = { input_tokens = input, output_tokens = out, web_search_requests = searches,
      cache_write_tokens = writes and input or nil, cache_write_1h_tokens = writes == "1h" and input or nil,
      service_tier = tier }
    local c, why = pricing.cost(t.provider, t.model, usage)
    if c == nil and i == 1 then return nil, why end
    if c == nil then
      unpriced = unpriced or {}
      unpriced[t] = why
    else
      local learned = tier == nil and unasked(asked) and served_tiers.by[t.name]
      for served in pairs(learned and learned.tiers or {}) do
        usage.service_tier = served
        c = math.max(c, pricing.cost(t.provider, t.model, usage) or c)
      end
      if c > usd then usd = c end
    end
  end
  return usd, nil, unpriced
end

-- A budgeted call's targets less the fallbacks without a price, said once per target: the budget
-- cannot hold what they would cost, and a fallback without one (a fine-tune nobody priced) refused
-- every budgeted call of a primary that had one (kind "unpriced"), as a fallback's missing key does not
local warned_unpriced = {}
-- targets less those left_out(t) gives the warn line's fields for (its message once per target:
-- warned) -> the list to try. A migration's side was drawn for the first target, and counts what that target
-- does (watched); with it left out, what serves is neither side's as drawn, and the call counts for
-- neither (reviewer R1: a migration from OpenAI with a server tool in the call credited the old side
-- with Anthropic's answers)
local function targets_without(targets, left_out, warned, message)
  local kept = { plan = targets.plan, deployments = targets.deployments }
  for _, t in ipairs(targets) do
    local fields = left_out(t)
    if not fields then
      kept[#kept + 1] = t
    elseif not warned[t.name] then
      warned[t.name] = true
      resil.log.warn(message, fields)
    end
  end
  if kept[1] ~= targets[1] and targets.plan and targets.plan.migration then
    kept.plan = setmetatable({ migration = false }, { __index = targets.plan })
  end
  return kept
end

local function priced_targets(targets, unpriced)
  return targets_without(targets, function(t)
    return unpriced[t] and { model = t.name, error = tostring(unpriced[t]) } end, warned_unpriced,
    "ai: a fallback without a price is left out of budgeted calls: the budget cannot hold what it would cost")
end

-- A request that names a provider's server-side tool (Anthropic's web_search_20250305,
-- code_execution_...: a tool whose type is neither "function" nor "custom") can be served only
-- by an adapter that runs them (adapter.server_tools). The targets that cannot are left out when
-- another can (a warn line once per target): sent there, the tool was the provider's 400, which a
-- call does not fall back from, and an Anthropic client whose primary was overloaded got that
-- 400 (not retried by its SDK) instead of the 529 (retried). -> the targets to try
local warned_server_tools = {}
local function server_tool_of(tools)
  if type(tools) ~= "table" then return nil end
  for _, t in ipairs(tools) do
    local kind = type(t) == "table" and t.type
    if type(kind) == "string" and kind ~= "function" and kind ~= "custom" then return kind end
  end
  return nil
end
local function serving_tools(targets, req)
  if #targets < 2 then return targets end
  local tool = server_tool_of(req.tools)
  if not tool then return targets end
  local kept = targets_without(targets, function(t)
    return not t.adapter.server_tools and { model = t.name, tool = tool:sub(1, 64) } end,
    warned_server_tools, "ai: a target that cannot run a provider's server tool is left out of calls that name one")
  return #kept > 0 and kept or targets
end

local function reserve(targets, req)
  if req.budget == nil then return nil end
  local budget = type(req.budget) == "string" and resil.budget(req.budget) or req.budget
  local searches = web_searches(req.tools)
  if searches == nil then
    return nil, resil.error("bad_request", ("budget '%s': a web search tool needs max_uses: each search is " ..
      "billed, and the budget holds what they may cost"):format(tostring(budget.name)),
      { class = "bad_request", status = 400, retryable = false })
  end
  local usd, why, unpriced = estimate_usd(targets, req, searches)
  if usd == nil then
    return nil, resil.error("unpriced", ("budget '%s' cannot hold a call without a price: %s"):format(
      tostring(budget.name), why), { class = "unpriced", retryable = false })
  end
  if not (usd <= 1e9) then -- (max_tokens near 2^63) more than any reservation holds: refused as the budget's
    return nil, resil.error("budget_exceeded", ("budget '%s': the call may cost up to $%.6g (max_tokens %s), " ..
      "more than a budget can hold"):format(tostring(budget.name), usd, tostring(req.max_tokens)),
      { budget = budget.name, class = "quota", retryable = false })
  end
  local ticket, err = budget:reserve(usd)
  -- held while the call runs, however long (a stream past its budget's `hold`, 10 minutes by
  -- default, freed its money for other calls, and its settle then took the budget past its limit)
  if ticket then ticket:keep() end
  return ticket, err, unpriced and priced_targets(targets, unpriced) or nil
end

-- What the provider says of its answer (its model, its id), taken only as
-- text a header, a log line and the ledger can hold: a null or an object
-- made the ledger refuse the row (the cost lost, the hold kept), a CR/LF
-- made the gateway's answer a 500 after the call was paid.
local function provider_text(v)
  -- (anchored: one pass over the text, not a match tried from each of its bytes)
  if type(v) ~= "string" or #v == 0 or #v > 256 or not v:find("^[\32-\126]*$") then return nil end
  return v
end
-- the same for a model's name, which comes back on every answer: the names found to be such text
-- are remembered (the pattern's pass is some 1k instructions for a short name; an answer's id is
-- new each time, and checked as above). Bounded: a provider may name any model it likes.
local model_texts, model_texts_count = {}, 0
local function provider_model(v)
  if model_texts[v] then return v end
  if not provider_text(v) then return nil end
  if model_texts_count >= 1000 then model_texts, model_texts_count = {}, 0 end
  model_texts[v], model_texts_count = true, model_texts_count + 1
  return v
end

-- The ledger key of an answer: the provider's response id dedupes a replay
-- only, the same answer given again for the same Idempotency-Key (a call
-- inside resil.once run again after a crash, the gateway's client retrying
-- with its key). Without a key no provider replays, so two answers with one
-- id are two calls billed: OpenAI-compatible servers reuse ids (Ollama's
-- run from chatcmpl-0 to chatcmpl-998), and keyed on the id alone every
-- answer after the first was dropped from the ledger and from its budget.
-- Nor does a provider that was not sent the key (its config without
-- `idempotency`, as the gateway's): an answer refused and the next one
-- that reused its id were kept as one charge, though billed twice.
local function ledger_key(r, req)
  local key = r.id and resil.context().idempotency_key
  if not key then return nil end
  local conf = ai.config[r.provider]
  local sent = type(req) == "table" and req.idempotency
  if sent == nil then sent = type(conf) == "table" and conf.idempotency end -- (a call's own false wins)
  if not sent then return nil end
  return ("%s:%s:%s"):format(r.provider, resil.hash(key), r.id)
end

-- Cost to the ledger: through the ticket when there is one (it writes the
-- row), else a row of its own, keyed as above. how: "settle" (the call's
-- answer: frees the hold) or "charge" (a refused attempt, see below).
-- An answer's output is at most max_tokens per choice, as the providers
-- bill it: more is the provider's garbage (1e12 tokens to a max_tokens of
-- 50 spent a day's budget 10^10 times over). Recorded at that most, and said.
-- Input has no max_tokens, but no model reads more than some millions of tokens in one call (the
-- largest contexts: 1 to 10 million): a count past that is the provider's garbage too (3e12 tokens
-- for a 5-token prompt priced $450,000, under record_cost's bound, into a $1 budget). Recorded at
-- the request's estimate, what its hold was made of, with the cache counts it cannot hold, and said.
-- a usage's copy, to record other counts in without changing the answer's own
local function copy_of(u)
  local c = {}
  for k, v in pairs(u) do c[k] = v end
  return c
end

local MOST_INPUT = 10000000
local CACHE_COUNTS = { "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens" }
local function input_capped(r, req, u) -- (u: a table, see capped_usage)
  local input = u.input_tokens
  if not (type(input) == "number" and input > MOST_INPUT) then
    -- (every answer: no iterator calls, and no type() for an absent count or the usual 0)
    local found = false
    for i = 1, #CACHE_COUNTS do
      local v = u[CACHE_COUNTS[i]]
      if v ~= nil and v ~= 0 and type(v) == "number" and v > MOST_INPUT then input, found = v, true break end
    end
    if not found then return u end
  end
  local c = copy_of(u)
  c.input_tokens = text_input_tokens(req)
  c.cached_input_tokens, c.cache_write_tokens, c.cache_write_1h_tokens = nil, nil, nil
  resil.log.error("ai: an answer reported more input tokens than any model reads; recorded at the request's estimate",
    { provider = r.provider, model = r.model or r.requested_model, input_tokens = input,
      recorded_input_tokens = c.input_tokens })
  return c
end

-- Without a max_tokens (a call with no budget that names none), an output count past what any model
-- writes in one call (MOST_INPUT again: no model's output reaches its context) is the provider's
-- garbage as well: 1e12 tokens for "hi" were a $600,000 row. Recorded at what the answer holds (its
-- text and tool calls' arguments, 4 bytes a token, as a cut stream's output is), and said.
local function answer_tokens(r)
  local bytes = type(r.text) == "string" and #r.text or 0
  for _, c in ipairs(type(r.tool_calls) == "table" and r.tool_calls or {}) do
    if type(c) == "table" and type(c.arguments) == "string" then bytes = bytes + #c.arguments end
  end
  return math.ceil(bytes / 4)
end
local function output_capped(r, u)
  local c = copy_of(u)
  c.output_tokens = answer_tokens(r)
  resil.log.error("ai: an answer reported more output tokens than any model writes; recorded at its text's estimate",
    { provider = r.provider, model = r.model or r.requested_model, output_tokens = u.output_tokens,
      recorded_output_tokens = c.output_tokens })
  return c
end

-- A usage with a main count the provider left out (`completion_tokens` without `prompt_tokens`, an
-- Anthropic answer without `input_tokens`: the adapters' input_unreported / output_unreported) has
-- that side estimated: the input from the request, at least the cache's part the answer did count,
-- the output from the answer's text and tool calls (4 bytes a token). Read as 0, a 2,000-token
-- prompt was recorded, and settled, at no input at all. The row says so: units.estimated.
local function reported_usage(r, req, u) -- (u: a table, see capped_usage)
  if not (u.input_unreported or u.output_unreported) then return u end
  local c = copy_of(u)
  if c.input_unreported then c.input_tokens = math.max(text_input_tokens(req), tonumber(c.input_tokens) or 0) end
  if c.output_unreported then c.output_tokens = math.max(answer_tokens(r), tonumber(c.output_tokens) or 0) end
  c.input_unreported, c.output_unreported, c.estimated = nil, nil, true
  return c
end

-- An answer's web searches are at most the max_uses of the request's web search tools (what the
-- budget held): more is the provider's garbage, as an output past max_tokens is (1e7 searches to a
-- max_uses of 5 spent $100,000 of a $1 budget; 1e300, a row without a price that spent nothing).
-- Recorded at that most, and said. A request whose search tool has no max_uses (a call without a
-- budget), or that names no search tool, is capped at MOST_SEARCHES: no call runs that many (the API
-- pauses its server tools' loop after 10 turns), so a count past it is the provider's garbage too
-- (1e7 searches were a $100,000 row; 1,000 is $10).
local MOST_SEARCHES = 1000
local function searches_capped(r, req, u) -- (u: a table, see capped_usage)
  local n = u.web_search_requests
  if n == nil or type(n) ~= "number" or n <= 0 then return u end
  local most, named = 0, false
  for _, t in ipairs(type(req.tools) == "table" and req.tools or {}) do
    if type(t) == "table" and type(t.type) == "string" and t.type:find("^web_search") then
      local uses = math.tointeger(t.max_uses)
      if not uses or uses < 0 then most, named = nil, false break end -- (as many as the model wants)
      most, named = most + uses, true
    end
  end
  if not named then most = MOST_SEARCHES end
  if n <= most then return u end
  resil.log.error(named and "ai: an answer reported more web searches than its request's max_uses allows; recorded at max_uses"
    or "ai: an answer reported more web searches than any call runs; recorded at that most",
    { provider = r.provider, model = r.model or r.requested_model, web_search_requests = n,
      max_uses = named and most or nil, recorded = most })
  local c = copy_of(u)
  c.web_search_requests = most > 0 and most or nil
  return c
end

local function capped_usage(r, req)
  -- a usage that is no table is recorded as it is: its type asked here once, not by each step
  -- (each step's answer is a table: the usage, or a copy)
  local u = r.usage
  if type(u) ~= "table" then return u end
  u = searches_capped(r, req, input_capped(r, req, reported_usage(r, req, u)))
  local most = math.type(req.max_tokens) == "integer" and req.max_tokens or nil
  if not most and req.budget ~= nil then -- what wire_request sent a budgeted call without one
    local conf = ai.config[r.provider]
    most = budget_max_tokens(type(conf) == "table" and conf or nil, ai.adapters[r.provider])
  end
  if type(u.output_tokens) ~= "number" then return u end
  if math.type(most) ~= "integer" then
    if u.output_tokens > MOST_INPUT and not u.estimated then return output_capped(r, u) end
    return u
  end
  if u.output_tokens <= most then return u end -- (within one choice's most: the common case)
  most = most * math.max(1, math.tointeger(req.n) or 1)
  if u.output_tokens <= most then return u end
  -- (our own estimate of a cut answer or stream, from bytes read, is capped without a word: the provider said nothing)
  if not u.estimated then
    resil.log.error("ai: an answer reported more output tokens than max_tokens allows; recorded at max_tokens",
      { provider = r.provider, model = r.model or r.requested_model, output_tokens = u.output_tokens, max_tokens = most })
  end
  local c = copy_of(u)
  c.output_tokens = most
  return c
end

-- An answer that reports no usage (some OpenAI-compatible servers), or one it cannot read (a negative
-- count, a string), is estimated as a stream without its usage is: the input from the request, the
-- output from the answer's text and tool calls (an embedding's: none), units.estimated. Recorded
-- without a price, it settled its budget at 0: a $0.001 budget let through every call of $0.0008 it
-- held for, one after another. Said once a model (bounded: a gateway's clients name any model).
-- A usage estimated: the input from the request, the output given (units.estimated)
local function estimate(req, output_tokens)
  return { input_tokens = text_input_tokens(req), output_tokens = output_tokens, cached_input_tokens = 0,
    cache_write_tokens = 0, requests = 1, estimated = true }
end

local guessed, guessed_count = {}, 0
local function estimated_usage(r, req, operation)
  local name = tostring(r.provider) .. "/" .. tostring(r.model or r.requested_model)
  if not guessed[name] and guessed_count < 100 then
    guessed[name], guessed_count = true, guessed_count + 1
    resil.log.warn("ai: an answer reported no usage it can read; its cost is estimated from the request and the answer",
      { provider = r.provider, model = r.model or r.requested_model })
  end
  return estimate(req, operation == "embed" and 0 or answer_tokens(r))
end

local function record_cost(r, req, ticket, operation, how)
  if r.usage == nil and how == nil then r.usage = estimated_usage(r, req, operation) end
  r.usage = capped_usage(r, req)
  local usd = r.usage and pricing.cost(r.provider, r.model or r.requested_model, r.usage)
  if usd == nil and r.usage and r.model ~= r.requested_model then
    usd = pricing.cost(r.provider, r.requested_model, r.usage)
  end
  if usd ~= nil and not (usd >= 0 and usd <= 1e6) then
    -- counts no provider bills (1e17 tokens): the provider's garbage, kept
    -- as its row without a price rather than raising after the call was paid
    resil.log.error("ai: the usage an answer reported prices out of range; recorded without a price",
      { provider = r.provider, model = r.model or r.requested_model, usd = usd })
    usd = nil
  end
  r.cost_usd = usd
  local entry = { provider = r.provider, model = r.model or r.requested_model, operation = operation,
    user = req.user, units = r.usage, id = r.ledger_id or ledger_key(r, req),
    sync = req.ledger_sync, -- false: the answer waits for the row's commit, not its disk sync
    wait = req.ledger_wait, -- false: nor for the commit (the gateway's default)
    retry = true } -- a row the store refuses is tried again, not dropped (the call was paid)
  local ok, err
  if ticket then
    ok, err = ticket[how or "settle"](ticket, usd or 0, entry)
    -- an answer without usage (some OpenAI-compatible servers) has no price:
    -- the hold is freed and the call still gets its row, without a price,
    -- as without a budget (it went unrecorded); a settle the store refused is
    -- tried again, but a settle of 0 writes no row: the row is this one's
    if usd == nil and (ok ~= nil or resil.is_error(err) and err.retrying) then ok, err = resil.cost.record(entry) end
  else
    entry.usd = usd -- nil: recorded without a price (pricing warned once), never as a zero
    ok, err = resil.cost.record(entry)
  end
  if ok == nil and err and resil.is_error(err) and err.retrying then
    -- the settle is tried again until the store takes it (budgets.lua): late, not lost
    resil.log.warn("ai: the cost will be recorded when the store takes it", { provider = r.provider,
      model = entry.model, usd = usd, id = entry.id, ticket = ticket and ticket.id, error = tostring(err) })
  elseif ok == nil and err then
    r.ledger_error = err
    resil.log.error("ai: the cost was not recorded", { provider = r.provider, model = entry.model, usd = usd,
      id = entry.id, ticket = ticket and ticket.id, error = tostring(err) })
  end
end

-- A stream's usage with its output at least `bytes` streamed (about 4 bytes
-- a token), the input estimated when the provider reported none: -> u
-- (the table given, changed) or a new one
local function with_streamed_output(u, req, bytes)
  u = u or { input_tokens = text_input_tokens(req), cached_input_tokens = 0, cache_write_tokens = 0 }
  local streamed = math.ceil(bytes / 4)
  if not (type(u.output_tokens) == "number" and u.output_tokens >= streamed) then
    u.output_tokens, u.estimated = streamed, true
  end
  return u
end

-- Answers a validator refused (an empty choice, tool arguments that are not
-- JSON: invalid output, retried or fallen back from) were billed all the
-- same when they say what they used: each gets a row of its own (units.refused
-- = 1) and counts in the call's budget, beyond its reservation. An answer
-- without a usage it can read is estimated (refused_usage); a body that is
-- no answer (not JSON, no choices or message) is not counted: nothing to price it by.

-- What a refused answer says it used: a body's usage, or what a stream
-- that ended empty reported; for an answer whose body was cut (its 2xx
-- read, then the connection ended, timed out, or ran past max_body) the
-- input estimated from the request and its output at least the bytes read
-- (about 4 bytes a token; units.cut = 1, units.estimated), unless a whole
-- answer came after it under the Idempotency-Key it was sent with: the
-- provider replayed it, one charge, the whole one's (res.replayed, see
-- policies.call). An embedding's has no output: its body is vectors, and
-- the provider bills the input only. -> usage, model, id | nil
-- the output a refused answer's body holds, about 4 bytes a token: the strings of its choices
-- (OpenAI) or its content (Anthropic), roles and finish reasons too (a few tokens over)
local function refused_output_tokens(data)
  local bytes = 0
  local function walk(v, depth)
    if type(v) == "string" then bytes = bytes + #v
    elseif type(v) == "table" and depth < 8 then
      for _, x in pairs(v) do walk(x, depth + 1) end
    end
  end
  walk(data.choices or data.content, 0)
  return math.ceil(bytes / 4)
end

local function refused_usage(t, res, req, operation)
  if res.cut then
    if res.replayed then return nil end
    local u = { input_tokens = text_input_tokens(req), cached_input_tokens = 0, cache_write_tokens = 0 }
    if operation == "embed" then u.estimated = true else u = with_streamed_output(u, req, res.received) end
    u.cut = 1
    return u
  end
  if res.stream then
    local st = type(res.state) == "table" and res.state or {}
    if type(st.usage) == "table" then return st.usage, st.model, st.id end
    -- a stream that ended (empty) without usage was billed all the same, as such an answer is:
    -- its input estimated, its output at least what it streamed (thinking, text)
    if not res.ended then return nil end
    local bytes = (st.extra_bytes or 0) + (type(res.text) == "string" and #res.text or 0)
    return with_streamed_output(nil, req, bytes), st.model, st.id
  end
  local data = classify.decoded(res)
  if type(data) ~= "table" or not t.adapter.usage then return nil end
  local u = t.adapter.usage(data.usage, data.service_tier)
  if u == nil and operation ~= "embed" and (type(data.choices) == "table" or data.type == "message") then
    -- an answer (OpenAI's choices, Anthropic's message) without a usage it can read was billed all the
    -- same: estimated, as such an answer the validator takes is (record_cost); not counted, a server
    -- that reports no usage had every retry on an empty answer paid and none in the budget
    u = estimate(req, refused_output_tokens(data)) -- (its requests = 1 as record_refusals sets)
  end
  return u, data.model, data.id
end

-- guard.refused: one list per target tried, of the responses its attempts
-- refused (policies.call fills it as they come: a cancel finds them there).
-- Each is taken off its list as it is recorded, so that a cancel meanwhile
-- records only the rest. One whose ledger key this call has recorded
-- already (a provider replaying the same answer for one Idempotency-Key)
-- is the same charge: the ledger keeps it once, and so does the cost.
-- The ledger keeps each row in whole micro-dollars: what they cost is
-- added up so, as the ledger will add it (a total rounded once said 1204
-- micro-dollars in the headers of 40 answers the ledger held at 1221).
-- -> what they cost, and whether one had no price
local function micro(usd) return math.floor(usd * 1e6 + 0.5) end
local function record_refusals(guard)
  local usd, unpriced = 0, false
  local seen = guard.seen or {}
  guard.seen = seen
  for _, list in ipairs(guard.refused) do
    local t = list.target
    while list[1] do
      local res = table.remove(list, 1)
      local usage, model, id = refused_usage(t, res, guard.req, guard.operation)
      if usage then
        usage.requests = 1
        if not res.cut then usage.refused = 1 end
        local a = { provider = t.provider, requested_model = t.model, usage = usage,
          model = provider_model(model) or t.model, id = provider_text(id) }
        -- (a cut answer sent with a key is one charge however often its delivery is cut: this
        -- call's retries, the same call run again)
        if res.cut and res.key then a.ledger_id = ("%s:%s:cut"):format(t.provider, resil.hash(res.key)) end
        local key = a.ledger_id or ledger_key(a, guard.req)
        if not (key and seen[key]) then
          if key then seen[key] = true end
          record_cost(a, guard.req, guard.ticket, guard.operation, "charge")
          if a.cost_usd then usd = usd + micro(a.cost_usd) else unpriced = true end
        end
      end
    end
  end
  return usd / 1e6, unpriced
end

-- the list a target's attempts fill (one per target, however often a
-- chain tries it)
-- (found by a walk of the few lists: keyed by target as well, the table grew a hash part
-- on every call)
local function refused_list(guard, t)
  local lists = guard.refused
  for i = 1, #lists do
    local list = lists[i]
    if list.target == t then return list end
  end
  local list = { target = t, sending = nil } -- (sized: policies.call adds sending)
  lists[#lists + 1] = list
  return list
end

-- (g.refused is a list without holes, grown at #lists + 1: walked by index, no iterator calls)
local function any_refused(g)
  local lists = g.refused
  for i = 1, #lists do if lists[i][1] then return true end end
  return false
end

-- A refused attempt's stream state: the usage the provider reported, its
-- output at least `bytes` read
local function billed(req, state, bytes)
  local usage -- (a copy: the state keeps the provider's word)
  if state.usage then
    usage = {}
    for k, v in pairs(state.usage) do usage[k] = v end
  end
  return { usage = with_streamed_output(usage, req, bytes), model = state.model, id = state.id }
end

-- What an attempt that failed (or was canceled) while its stream opened was
-- billed: the usage the provider reported, its output at least what was read
-- (text read to the end, thinking, tool calls' arguments; about 4 bytes a
-- token) | nil (no output read: an overloaded Anthropic stream, message_start
-- then an error event, is not a charge of its input, four times over with the
-- retries)
local function paid_while_opening(req, state, whole)
  local bytes = (state.extra_bytes or 0)
  for _, piece in ipairs(whole or {}) do bytes = bytes + #piece end
  if bytes == 0 then return nil end
  return billed(req, state, bytes)
end

-- What an attempt canceled before it read any output was billed: the input
-- (as the provider reported it in its first event, else estimated), no output
local function input_paid(req, state) return billed(req, state, 0) end

-- A stream an attempt opened (list.opened) belongs to the call until
-- open() takes it over. A cancel in between (while a migration's outcome is
-- written, or a deadline's child task hands it back) closes it upstream and
-- records what it was billed, as an attempt refused after it opened.
local function give_up_opened(g)
  for _, list in ipairs(g.refused) do
    local res = list.opened
    if res then
      list.opened = nil
      if res.stream and res.stream ~= true then res.stream:close() end
      -- (accepted, its 200: without output read, its input, as the usage it reported says, or estimated)
      local st = res.state or {}
      local paid = paid_while_opening(g.req, st, { res.first or res.text or "" }) or input_paid(g.req, st)
      list[#list + 1] = { stream = true, state = paid }
    end
  end
end

-- A retry after an attempt that was paid for and refused (invalid output, a cut answer) is held
-- against the budget as the first attempt was: the call's hold is for its answer, and each paid
-- refusal is charged beside it. Asked before each attempt and backoff (policies.retry's give_up):
-- a paid refusal not yet held for takes a hold of the call's estimate, and one the budget refuses
-- ends the retries with the last attempt's failure (err.gave_up = "budget_exceeded"). Before, the
-- retries ran with nothing held: one request on a $0.0002 budget spent $0.000363, three attempts.
-- The holds go once the refusals are recorded (release_retry_holds).
local function held_retries(guard, give_up, caller)
  -- (the provider's own retry.give_up when the call has none, as Provider:attempts takes it)
  give_up = give_up or caller.retry_opts and caller.retry_opts.give_up
  if not guard.ticket then return give_up end
  return function()
    local why = give_up and give_up()
    if why then return why end
    local paid = 0
    for _, list in ipairs(guard.refused) do paid = paid + #list end
    local holds = guard.retry_holds
    if paid <= (holds and #holds or 0) then return nil end
    local req = guard.req
    local budget = type(req.budget) == "string" and resil.budget(req.budget) or req.budget
    local more, refused = nil, nil
    if budget then more, refused = budget:reserve(guard.ticket.estimate or 0) end
    -- (the budget's refusal, or the store's outage: said as what it is)
    if not more then return type(refused) == "table" and refused.kind or "budget_exceeded" end
    more:keep()
    holds = holds or {}
    guard.retry_holds = holds
    holds[#holds + 1] = more
    return nil
  end
end

local function release_retry_holds(guard)
  local holds = guard.retry_holds
  if not holds then return end
  guard.retry_holds = nil
  for _, h in ipairs(holds) do if not h.done then h:release() end end
end

local function record_refusals_then_release(g)
  if any_refused(g) then record_refusals(g) end
  release_retry_holds(g)
end

-- A call's guard: a call canceled between its reservation and its settle (a
-- client that gave up, a deadline) must not leave its hold until it expires,
-- and records the attempts it had refused. __close runs at the cancel,
-- outside any task, so that is a task of its own (the refusals first: a
-- stopping gateway waits for rows queued, not for tasks still to run); a
-- call that ended marks the guard done. A settled or released ticket
-- ignores the release.
local function take_canceled(g)
  local lists = g.refused
  for i = 1, #lists do call.take_canceled(lists[i]) end
end

local call_guard_mt = { __close = function(g)
  if g.done then return end
  take_canceled(g)
  give_up_opened(g)
  if any_refused(g) or g.retry_holds then resil.spawn(record_refusals_then_release, g) end
  if g.ticket and not g.ticket.done then resil.spawn(g.ticket.release, g.ticket) end
end }
local function call_guard(ticket, req, operation)
  -- (refused made with room for the one list most calls have)
  return setmetatable({ ticket = ticket, req = req, operation = operation, refused = { nil } }, call_guard_mt)
end

-- The refusals recorded; their cost added to a result's, or set on a
-- failure's error. One without a price makes the whole unknown (nil; the
-- error says cost_unknown).
local function add_refusals(guard, r, err)
  if not guard then return end
  take_canceled(guard) -- (an attempt in a task canceled on its own, a deadline's)
  if not any_refused(guard) then return release_retry_holds(guard) end
  local usd, unpriced = record_refusals(guard)
  release_retry_holds(guard) -- (after: the charges are in the budget before their holds go)
  if r then
    if unpriced then r.cost_usd = nil elseif r.cost_usd then r.cost_usd = (micro(r.cost_usd) + micro(usd)) / 1e6 end
  elseif type(err) == "table" then
    if unpriced then err.cost_unknown = true else err.cost_usd = usd end
  end
end

-- The end of a call: the answer's cost (or, for a failed call, the hold
-- freed), then the refused attempts'. The guard is done only after both:
-- a cancel while either waits for the store still records the refusals.
-- -> r | nil, err, their cost_usd including the refusals
local function settle_call(guard, r, err, operation)
  local req, ticket = guard.req, guard.ticket
  if r == nil then
    if ticket then ticket:settle(0) end
  else
    if any_refused(guard) then -- (the answer's key: a refusal replayed under it is the same charge)
      local key = ledger_key(r, req)
      if key then guard.seen = { [key] = true } end
    end
    record_cost(r, req, ticket, operation)
  end
  add_refusals(guard, r, err)
  guard.done = true
  return r, err
end

-- sorted keys: the same request always hashes the same
local function canonical(v, out)
  local t = type(v)
  if t == "table" then
    if #v > 0 or next(v) == nil then
      out[#out + 1] = "["
      for i = 1, #v do canonical(v[i], out); out[#out + 1] = "," end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      out[#out + 1] = "{"
      for _, k in ipairs(keys) do
        out[#out + 1] = json.encode(k) .. ":"
        canonical(v[k] ~= nil and v[k] or v[tonumber(k)], out)
        out[#out + 1] = ","
      end
      out[#out + 1] = "}"
    end
  elseif t == "function" or t == "userdata" or t == "thread" then
    out[#out + 1] = "null"
  else
    out[#out + 1] = json.encode(v)
  end
  return out
end

local CACHE_FIELDS = { "messages", "system", "max_tokens", "temperature", "top_p", "top_k", "stop", "tools",
  "tool_choice", "n", "seed", "response_format", "extra", "provider_options", "provider_headers", "fallback" }

-- The key names what answers too: each target's provider, adapter, endpoint, model and the body
-- it would be sent (sorted: deployments' order changes per call). Keyed on the request alone, a
-- script that pointed openai at its own server and asked with cache planted its answer for every
-- caller on the store (a gateway's clients too). (v = 2: entries under the old key are misses.)
local function cache_targets(targets, req)
  local parts = {}
  for i, t in ipairs(targets) do
    local ok, w = pcall(wire_request, t, req, false) -- (a target that cannot take it: named, without a body)
    local url = ok and w.url or select(2, pcall(function() return wire_parts(t).url end))
    parts[i] = table.concat(canonical({ provider = t.provider, adapter = t.adapter.name, url = url, model = t.model,
      body = ok and w.json or false }, {}))
  end
  table.sort(parts)
  return parts
end

-- The cache's keys (ai:cache:) are the host's under the sandbox: a script's store:set of a forged
-- answer under a key it computed is refused. This module reaches them through what the host hands
-- its chunk alone at its load (private.ai_cache: open, get, set), kept here; loaded any other way
-- (a script's own loadfile of this file) it has the store object's methods.
local host_cache = select(3, ...)

local function cache_of(targets, req)
  local c = req.cache or targets[1].conf.cache
  if not c then return nil end
  local key = { v = 2, model = req.model, targets = cache_targets(targets, req) }
  for _, f in ipairs(CACHE_FIELDS) do key[f] = req[f] end
  local store, err
  if host_cache then store, err = host_cache.open() else store, err = resil.store() end
  if not store then
    resil.log.warn("ai: cache unavailable", { error = tostring(err) })
    return nil
  end
  return { store = store, ttl = c.ttl, key = "ai:cache:" .. resil.hash(table.concat(canonical(key, {}))) }
end

local function cache_get(cache)
  local v
  if host_cache then v = host_cache.get(cache.store, cache.key) else v = cache.store:get(cache.key) end
  if type(v) ~= "string" then return nil end
  local r = json.decode(v)
  if type(r) ~= "table" then return nil end
  r.cached, r.cost_usd = true, 0
  return r
end

local function cache_put(cache, r)
  local ok, err
  if host_cache then ok, err = pcall(host_cache.set, cache.store, cache.key, json.encode(r), cache.ttl)
  else ok, err = pcall(cache.store.set, cache.store, cache.key, json.encode(r), cache.ttl) end
  if not ok then resil.log.warn("ai: result not cached", { error = tostring(err) }) end
end

local function record_hit(r, req, operation)
  resil.cost.record({ provider = r.provider, model = r.model, operation = operation, user = req.user, usd = 0,
    units = { cache_hit = 1 } })
end

---------------------------------------------------------------------------
-- chat

local function finish_result(t, r, data)
  r.provider, r.requested_model, r.raw = t.provider, t.model, data
  r.model = provider_model(r.model) or t.model
  r.id = provider_text(r.id)
  r.deployment = t.deployment
  return r
end

-- what the registry did with the name asked for: the alias, a sunset's
-- routing, the migration's side
local function describe(r, targets)
  local plan = targets.plan
  r.alias, r.routed = plan.alias, plan.routed
  local m = plan.migration
  if m then r.migration = { alias = m.alias, side = m.side, from = m.from, to = m.to, rolled_back = m.rolled_back } end
  return r
end

-- A migration's first strategy reports its outcome to the registry (the
-- rollback compares the sides' outcomes, before any fallback). On the new
-- side any failure but these moves on to the old version: a canary's 400 is
-- the canary's problem, not the call's.
local CANARY_STOPS = { auth = true, canceled = true, deadline = true }
local function canary_moves_on(_, class) return not CANARY_STOPS[class] end

local function watched(strategy, targets)
  local mig = targets.plan.migration
  if not mig then return strategy end
  local fn = strategy.fn
  return { name = strategy.name, on = mig.side == "new" and canary_moves_on or strategy.on, fn = function(q, deadline)
    local start = resil.now()
    local r, err = fn(q, deadline)
    -- (given up before any attempt, a gateway's client that left: says nothing of the side)
    if type(err) == "table" and err.kind == "given_up" then return r, err end
    local class = type(err) == "table" and (err.class or err.kind) or (err ~= nil and "unknown" or nil)
    registry().record(mig, { ok = r ~= nil, class = class, seconds = resil.now() - start })
    return r, err
  end }
end

-- a target's attempts at a chat -> result | nil, err
-- A model the provider says it does not have (a 404: retired, or misspelt):
-- each call pays a round trip for it and falls back, which at info level
-- nobody sees. Warned once per process and model, counted on every call.
-- (the host's constructor, prelude's owning_loader: resil.metrics is the scripts')
local not_found_total = (select(4, ...) or resil.metrics).counter("resil_model_not_found_total",
  "Calls a provider answered 404 for the model they named (retired or misspelt), by model")
-- (one line per model for so many models, then one saying so: a gateway's clients name what they
-- like, and each model a provider does not have made a line and a key here, for good)
local not_found_warned, not_found_count, NOT_FOUND_WARN_MAX = {}, 0, 100
local function model_not_found(t, err)
  if not (err.class == "not_found" or err.status == 404) then return end
  not_found_total:inc({ model = t.provider .. "/" .. t.model })
  if not_found_warned[t.name] or not_found_count > NOT_FOUND_WARN_MAX then return end
  not_found_count = not_found_count + 1
  if not_found_count > NOT_FOUND_WARN_MAX then
    resil.log.warn("more models answered 404: not warned about one by one (see resil_model_not_found_total)",
      { model = t.provider .. "/" .. t.model, warned = NOT_FOUND_WARN_MAX })
    return
  end
  not_found_warned[t.name] = true
  resil.log.warn("the provider answered 404 for this model: retired or misspelt? every call to it fails over " ..
    "(mark it deprecated in the model registry with a replacement)", { model = t.provider .. "/" .. t.model,
    error = tostring(err.message or err) })
end

-- a target's attempts that failed -> nil, err (a table error names its model; a 404 is told)
local function target_failed(t, err)
  if type(err) == "table" then
    err.model = err.model or t.model
    model_not_found(t, err)
  end
  return nil, err
end

-- the id the provider gave its answer's request (OpenAI's x-request-id, Anthropic's request-id):
-- what its support asks for; read from the raw header lines, res.headers not built for it
local http_header = resil.http.header
local function provider_request_id(res) return http_header(res, "x-request-id", "request-id") end

-- An answer cut at the first of the request's stop sequences it holds (policies/stops.lua): one
-- the provider was not sent (a reasoning model takes none, OpenAI four) was run past, and the
-- caller got what followed it (the gateway's clients did not; ai.chat's did). Not where the
-- provider was asked to write the stop (vLLM's include_stop_str_in_output).
-- did the caller ask a server to write its stops (vLLM's include_stop_str_in_output)? in the
-- options of the adapter named, or of any (a stream's cutter, made before its target is known)
local function stops_written(req, adapter_name)
  local options = req.provider_options
  if type(options) ~= "table" then return false end
  for name, own in pairs(options) do
    if (adapter_name == nil or name == adapter_name) and type(own) == "table"
      and own.include_stop_str_in_output == true then return true end
  end
  return false
end

local function cut_at_stops(t, req, r)
  if stops_written(req, t.adapter.name) then return end
  local list = stops.list(req.stop)
  if list then stops.cut(r, list) end
end

local function chat_attempts(t, req, guard, wire, deadline)
  local res, err = t.caller:attempts(wire, deadline, refused_list(guard, t), held_retries(guard, req.give_up, t.caller))
  if res == nil then return target_failed(t, err) end
  local data = classify.decoded(res)
  local r = t.adapter.parse(data)
  if req.stop ~= nil then cut_at_stops(t, req, r) end
  if r.usage then r.usage.requests = 1 end
  r.attempts = res.attempts
  r.provider_request_id = provider_request_id(res)
  learn_tier(t, req, r)
  return finish_result(t, r, data)
end

local function chat_strategy(t, req, guard)
  local wire = wire_request(t, req, false)
  return { name = t.name, fn = function(_, deadline) return chat_attempts(t, req, guard, wire, deadline) end }
end

-- attempts made by the targets that failed before one served
local function attempts_failed(errors)
  local n = 0
  for _, e in ipairs(errors or {}) do n = n + (type(e.error) == "table" and e.error.attempts or 1) end
  return n
end

local function deadline_of(targets, req)
  local d = req.deadline or targets.plan.deadline or targets[1].conf.deadline
  return d and resil.now() + d
end

-- ai.chat(req) -> result | nil, err
function ai.chat(req)
  check_request(req, 2)
  -- (stream = true, as an SDK's request has it, asked the provider for events that ai.chat then
  -- read as one JSON body: invalid_output, retried and paid three times, then the call failed)
  if req.stream ~= nil and req.stream ~= false then
    error("ai.chat: stream = true is ai.stream's (ai.chat reads the answer whole): call ai.stream(req)", 2)
  end
  local targets, terr = targets_of(req, 2)
  if not targets then return nil, terr end
  targets = serving_tools(targets, req)
  local cache = cache_of(targets, req)
  if cache then
    local hit = cache_get(cache)
    if hit then
      record_hit(hit, req, "chat")
      return hit
    end
  end
  local ticket, berr, priced = reserve(targets, req)
  if berr then return nil, berr end
  targets = priced or targets
  local guard <close> = call_guard(ticket, req, "chat")
  local r, err
  if #targets == 1 and not targets.plan.migration then -- (the common case: no strategy made)
    local t = targets[1]
    r, err = chat_attempts(t, req, guard, wire_request(t, req, false), deadline_of(targets, req))
    if r then r.fallbacks = 0 end
  elseif #targets == 1 then
    r, err = watched(chat_strategy(targets[1], req, guard), targets).fn(req, deadline_of(targets, req))
    if r then r.fallbacks = 0 end
  else
    local strategies = {}
    for i, t in ipairs(targets) do strategies[i] = chat_strategy(t, req, guard) end
    strategies[1] = watched(strategies[1], targets)
    local info
    strategies.give_up = req.give_up
    r, err, info = fallback.chain(strategies)(req, deadline_of(targets, req))
    if r then r.fallbacks = info and info.index and info.index - 1 or 0 end
    if r and info then r.attempts = (r.attempts or 1) + attempts_failed(info.errors) end
  end
  if r then describe(r, targets) end
  r, err = settle_call(guard, r, err, "chat")
  if r == nil then return nil, err end
  if cache then cache_put(cache, r) end
  return r
end

---------------------------------------------------------------------------
-- streams

-- an error event's type as the status its API would have answered
local EVENT_STATUS = { overloaded_error = 529, rate_limit_error = 429, api_error = 500, server_error = 500,
  invalid_request_error = 400, authentication_error = 401, permission_error = 403, not_found_error = 404,
  request_too_large = 413 }

local function read_all(s)
  local parts = {}
  while true do
    local chunk = s:read()
    if not chunk then break end
    parts[#parts + 1] = chunk
  end
  return table.concat(parts)
end

-- A stream that ended while it opened: with no text, as ai.chat's empty
-- answer, invalid output (retried, fallen back from), unless it stopped at
-- max_tokens or called tools or refused (a refusal field, a content filter,
-- Anthropic's stop_reason refusal) or paused in a server tool (the caller's
-- validate reads `empty`); read to its end (req.read_whole), its text
local answered_empty = require("policies.messages").answered_empty

-- A stream's tool calls that no client can take -> why | nil: one whose name was no string (left
-- out of the answer without a word, which still said tool_use), or whose arguments, whole, are
-- not a JSON object (an Anthropic client was handed them as its tool_use input, and its SDK broke
-- on them), unless the answer was cut at max_tokens: invalid output, as such a whole answer is
-- (policies/providers/openai.lua), tried again and fallen back from
local function bad_stream_calls(state)
  local cut = state.finish_reason == "length"
  for i, c in ipairs(state.tool_calls or {}) do
    if c.custom then
      -- (a "custom" call, GPT-5's free-form tools: no function name or JSON arguments to check)
    elseif c.name == nil then
      -- (a call with neither id nor arguments is a gap the provider left in its indexes: no call)
      if c.id ~= nil or c.pieces[1] ~= nil then return ("tool call %d: its function name is not a string"):format(i) end
    elseif not cut and c.pieces[1] ~= nil then
      local args = table.concat(c.pieces)
      local v = args ~= "" and json.decode(args)
      if v ~= false and (type(v) ~= "table" or v[1] ~= nil or getmetatable(v) == json.array_mt) then
        return ("tool call %d (%s): its arguments are not a JSON object"):format(i, c.name)
      end
    end
  end
  return nil
end

-- unusable: why the answer is invalid output though it ended (its tool calls, bad_stream_calls; a
-- compatible server's stream it ended unfinished, saying so: vLLM's finish_reason "abort", an
-- engine's abort or shutdown, "error": a cut answer, as the whole one is, policies/providers/openai.lua)
local UNFINISHED = { abort = true, error = true }
local function ended_stream(s, state, events, whole)
  s:close()
  local text = whole and table.concat(whole) or ""
  local f = state.finish_reason
  return { status = 200, headers = s.headers, stream = true, state = state, ended = true, events = events,
    text = text, empty = text == "" and not answered_empty[f] and not state.tool_calls
      and not state.refusal_pieces or nil,
    unusable = UNFINISHED[f] and ("the server ended the answer unfinished (finish_reason %q)"):format(f)
      or state.tool_calls and bad_stream_calls(state) or nil }
end

-- Open a stream and read it up to its first delta: until then a failure is
-- an ordinary failed attempt (retried, fallen back from). A delta is text, a
-- tool call's or a refusal's (a stream of a tool call alone is an answer, not
-- an empty one), or, when the caller relays the provider's own events,
-- thinking: those events reach the client as they come. The caller relays
-- them (req.raw_events: true, or the wire format it relays) from a target of
-- that format; the events read so far are kept for s:next_event(), up to
-- RELAY_BACKLOG_MAX bytes (past it the stream opens: the client is sent
-- what is kept). req.read_whole: a stream not relayed is read to its end
-- inside its attempt (a caller that writes nothing before the end keeps its
-- retries and fallbacks to the last event).
local RELAY_BACKLOG_MAX = 1024 * 1024

-- A cancel that comes once the request was sent, its status not yet read,
-- waits this long for that status (resil.http.stream's cancel_grace): the
-- provider may have answered 200 already, on the wire or read but not yet
-- resumed to (a busy loop: 150 streams on one loop, half their clients'
-- cancels fell there), and bills the input of a stream it accepted. A 200
-- is then recorded as any attempt canceled after it (input_paid); a
-- provider that has not answered within it is taken as not having the
-- request, as before. (A deadline cut there is late by at most this much.)
local STATUS_GRACE = 1

-- -> opener(): one attempt. `refused`: the target's refused attempts, where
-- an attempt that fails or is canceled after the provider billed it is put
-- (recorded with the call's refusals)
local function stream_opener(t, req, refused)
  local wire = wire_request(t, req, true)
  wire.idle_timeout = t.conf.idle_timeout or 60
  local stream_timeout = t.conf.stream_timeout or 600
  wire.cancel_grace = STATUS_GRACE
  -- (a result the call will take, the guard's until open() does; an empty one is refused instead)
  local function opened(res)
    if refused and not res.empty and not res.unusable then refused.opened = res end
    return res
  end
  -- one attempt: o.state, o.whole (the text read, when read to the end) and o.handed (a stream
  -- handed on is recorded by its reader) are what the attempt's end below reads
  local function attempt(o)
    local s, err = resil.http.stream(wire)
    if not s then return nil, err end
    o.s = s
    if s.status ~= 200 then
      local body = read_all(s)
      s:close()
      return { status = s.status, headers = s.headers, body = body }
    end
    o.accepted = true
    local state = o.state
    local ctype = s.headers["content-type"]
    if type(ctype) == "string" and ctype:find("json", 1, true) then
      -- a whole answer (a server that ignores stream = true): billed as one, so recorded as one
      -- (the guard below), and no stream: not asked again of a server that answers so
      local body = read_all(s)
      s:close()
      -- (a stream labelled JSON, which its events say it is: read from the body as they come)
      if body:find("^%s*data:") or body:find("^%s*event:") or body:find("^%s*:") then
        local relay = req.raw_events == true or req.raw_events == t.adapter.name
        local events, whole = relay and {} or nil, {}
        local framed, ferr = resil.http.sse_events(body)
        if not framed then return nil, resil.error("protocol", ("%s: %s"):format(t.name, ferr)) end
        for _, ev in ipairs(framed) do
          local delta, done, eerr = t.adapter.event(state, ev)
          if events then events[#events + 1] = { ev, state.decoded } end
          if eerr then return nil, resil.error("protocol", ("%s: %s"):format(t.name, tostring(eerr))) end
          if delta then whole[#whole + 1] = delta end
          if done then break end
        end
        o.whole = whole
        if not t.adapter.complete(state, true) then
          return nil, resil.error("protocol", ("%s: the stream ended before its first delta"):format(t.name))
        end
        o.handed = true
        return opened(ended_stream(s, state, events, whole))
      end
      local data = json.decode(body)
      -- (the API's error in a 200, no answer and no usage: the provider's failure, as a 5xx is,
      -- retried and not paid; classify says the same of ai.chat's)
      if classify.only_error(data) then
        return { status = 502, headers = s.headers, body = body }
      end
      local r = type(data) == "table" and t.adapter.parse(data)
      if type(r) == "table" then state.usage, state.model, state.id = r.usage, r.model, r.id end
      o.whole = { type(r) == "table" and type(r.text) == "string" and r.text ~= "" and r.text or body }
      return nil, resil.error("protocol", ("%s: answered a stream request with a whole answer (%s), not a stream")
        :format(t.name, ctype:sub(1, 64)), { retryable = false })
    end
    local relay = req.raw_events == true or req.raw_events == t.adapter.name
    local events = relay and {} or nil
    local whole = not relay and req.read_whole and {} or nil
    o.whole = whole
    local kept = 0
    while true do
      local ev, e = s:read_event()
      if ev == nil then
        s:close()
        if e then return nil, e end
        if t.adapter.complete(state, true) then
          o.handed = true
          return opened(ended_stream(s, state, events, whole))
        end
        return nil, resil.error("protocol", ("%s: the stream ended before its first delta"):format(t.name))
      end
      local delta, done, eerr, ebody = t.adapter.event(state, ev)
      if events then
        events[#events + 1] = { ev, state.decoded }
        kept = kept + #(ev.data or "")
      end
      if eerr then
        s:close()
        local etype = type(ebody) == "table" and type(ebody.error) == "table" and ebody.error.type
        local status = EVENT_STATUS[etype] or 500
        return { status = status, headers = status == 429 and { ["retry-after"] = "1" } or {},
          body = json.encode(ebody or { error = { message = eerr } }) }
      end
      if whole then
        if delta then whole[#whole + 1] = delta end
        if done then
          if not t.adapter.complete(state, true) then
            s:close()
            return nil, resil.error("protocol", ("%s: the stream ended without its end marker"):format(t.name))
          end
          o.handed = true
          return opened(ended_stream(s, state, events, whole))
        end
      elseif delta or (not done and (state.progress or (events and (state.thinking or kept > RELAY_BACKLOG_MAX)))) then
        o.handed = true
        return opened({ status = 200, headers = s.headers, stream = s, state = state, first = delta or "",
          events = events, breaker_later = true }) -- (its outcome is its end's: see settle_breaker)
      elseif done then
        o.handed = true
        return opened(ended_stream(s, state, events))
      end
    end
  end
  -- An attempt that failed or was canceled after the provider billed it is one
  -- of the call's refused attempts: what it read (paid_while_opening); one
  -- canceled or raised on the way (a client that left, a deadline) once the
  -- provider had accepted it (its 200), at least its input, which the
  -- provider is processing and bills (clients that cut their streams before
  -- the first delta paid nothing: a key's budget did not stop them). A
  -- failure the provider answered (an error status or event) costs only what
  -- it read; one that never answered (a hung connection), nothing.
  -- left: what is left of the call's deadline as the attempt starts (policies.call's). It bounds the
  -- whole transfer, the stream read after its first delta too: bounded by its opening only, a
  -- stream that went on slowly was read to stream_timeout, minutes past a deadline of seconds.
  return function(_, left)
    wire.timeout = left and left < stream_timeout and left or stream_timeout
    local o = { state = {} }
    local returned = false
    local _ <close> = setmetatable({}, { __close = function()
      -- a stream not handed on, left on the way (its task canceled: a client that left while it was
      -- read to its end), is closed: the provider stops generating what no one will read, and bills
      -- what it wrote so far (left to the collector, it ran and billed to its end)
      if not o.handed and o.s then o.s:close() end
      if o.handed or not refused then return end
      local paid = paid_while_opening(req, o.state, o.whole)
      if not paid and not returned and o.accepted then paid = input_paid(req, o.state) end
      if paid then
        refused[#refused + 1] = { stream = true, state = paid }
        refused.answers = (refused.answers or 0) + 1 -- (the next attempt's Idempotency-Key moves on)
      end
    end })
    local res, err = attempt(o)
    returned = true
    return res, err
  end
end

local Stream = {}
Stream.__index = Stream

local function stream_result(self)
  local st = self.state or {}
  local calls
  for _, c in ipairs(st.tool_calls or {}) do
    if c.name then -- (a gap the provider left in its indexes is no call)
      local args = table.concat(c.pieces)
      calls = calls or {}
      calls[#calls + 1] = { id = c.id, name = c.name, arguments = args ~= "" and args or "{}" }
    end
  end
  local r = { id = st.id, model = st.model or self.target.model, text = table.concat(self.parts),
    finish_reason = st.finish_reason, usage = st.usage, attempts = self.attempts,
    provider_request_id = self.provider_request_id,
    stop_reason = st.stop_reason, stop_sequence = st.stop_sequence, tool_calls = calls,
    refusal = st.refusal_pieces and table.concat(st.refusal_pieces) or nil }
  r.fallbacks = self.fallbacks
  learn_tier(self.target, self.req, r)
  return describe(finish_result(self.target, r, nil), self.targets)
end

-- A stream that ended without its final usage: what it reported so far, its
-- output at least what the text streamed holds (about 4 bytes a token). An
-- Anthropic stream reports output_tokens = 1 in its message_start, and a cut
-- one was recorded as one token whatever it had streamed.
local function usage_so_far(self, r)
  -- (tool calls' arguments, a refusal and thinking are output too: a stream cut in them is paid for them)
  return with_streamed_output(r.usage, self.req, #r.text + ((self.state or {}).extra_bytes or 0))
end

local function open(self)
  local req, targets = self.req, self.targets
  if self.cache then
    local hit = cache_get(self.cache)
    if hit then
      record_hit(hit, req, "stream")
      self.done, self.final = true, hit
      return hit.text ~= "" and hit.text or nil
    end
  end
  local ticket, berr, priced = reserve(targets, req)
  if berr then return nil, berr end
  if priced then targets, self.targets = priced, priced end
  self.ticket = ticket
  -- a cancel while it opens: the hold given back, the refusals recorded;
  -- once open, the stream's ends record them (finished, interrupted, close)
  local guard <close> = call_guard(ticket, req, "stream")
  self.guard = guard
  local strategies = {}
  for i, t in ipairs(targets) do
    local opener = stream_opener(t, req, refused_list(guard, t))
    strategies[i] = { name = t.name, fn = function(_, deadline)
      local res, err = t.caller:attempts(opener, deadline, refused_list(guard, t), held_retries(guard, req.give_up, t.caller))
      if res == nil then return target_failed(t, err) end
      return { res = res, target = t }
    end }
  end
  strategies[1] = watched(strategies[1], targets) -- a migration counts a stream that opened as a success
  strategies.give_up = req.give_up
  local got, err, info = fallback.chain(strategies)(req, deadline_of(targets, req))
  if got then -- taken over below
    for _, list in ipairs(guard.refused) do list.opened = nil end
  else -- (none is left: a strategy whose stream opened answered with it)
    give_up_opened(guard)
  end
  self.fallbacks = got and info and info.index and info.index - 1 or 0
  if got then
    self.attempts = (got.res.attempts or 1) + attempts_failed(info and info.errors)
    self.provider_request_id = provider_request_id(got.res)
  end
  if got == nil then
    self.done, self.err = true, err
    return settle_call(guard, nil, err, "stream")
  end
  guard.done = true
  self.target, self.state = got.target, got.res.state
  self.backlog, self.backlog_at = got.res.events, 1
  if got.res.ended then
    -- (read to its end while it opened, req.read_whole: its text at once, then its end)
    if got.res.text ~= "" then
      self.parts[1], self.finish_pending = got.res.text, true
      return got.res.text
    end
    return nil
  end
  self.s = got.res.stream
  self.parts[1] = got.res.first
  if type(got.res.breaker_later) == "table" then self.breaker_record = got.res.breaker_later end
  return got.res.first
end

-- A stream's end recorded (its cost, then its refusals) in a task of its
-- own that a cancel of its reader does not stop, as a call the gateway runs
-- to its end: a reader canceled while the row was on its way to the store
-- (a client leaving as a stream ended) left it to land, and its close
-- recorded the call a second time.
local function record_end(self, r)
  self.recording = true
  local function record()
    record_cost(r, self.req, self.ticket, "stream")
    add_refusals(self.guard, r)
  end
  if not (resil.running() and coroutine.isyieldable()) then return record() end
  local joined, err = resil.spawn(record):join()
  if not joined then error(err, 0) end
end

-- An open stream's outcome is its end's, told to the provider's breaker once (policies.call held
-- back its opening's, a half-open probe's included, for it: res.breaker_later): a success when it
-- ends whole, or when its reader closes it (that says nothing of the provider); a failure when the
-- provider broke it (a cut, a stall, an error event), as the same failure of a call would be
-- (classify's verdict). Counted at its opening, as a success, a provider whose every stream broke
-- after its first delta stayed at half its calls failed: a breaker above 0.5 never opened, and the
-- probe's opening closed a half-open one before the break was seen.
local function settle_breaker(self, ok)
  local rec = self.breaker_record
  if not rec then return end
  self.breaker_record = nil
  local done, rerr = pcall(rec.br.record, rec.br, ok, rec.elapsed, rec.probe, rec.round)
  if not done then resil.log.warn("ai: a stream's end could not be told to its breaker", { error = tostring(rerr) }) end
end
local function interrupted(self, why, cause)
  if self.s then self.s:close() end
  self.s = nil
  settle_breaker(self, true) -- (unless the provider broke it: told already, broke_upstream)
  local r = stream_result(self)
  r.usage = usage_so_far(self, r)
  record_end(self, r)
  local t = self.target
  self.done = true
  self.err = resil.error("stream_interrupted", ("%s: the stream broke after %d bytes of text: %s"):format(
    t.name, #r.text, why), { text = r.text, provider = t.provider, model = r.model, usage = r.usage,
    cost_usd = r.cost_usd, cause = cause, class = "stream_interrupted", retryable = false })
  return nil, self.err
end

local function finished(self)
  if self.s then self.s:close() end
  self.s = nil
  settle_breaker(self, true)
  local r = stream_result(self)
  -- (no usage, or only the one a stream reports as it starts: what was streamed counts)
  if not r.usage or (self.state or {}).usage_partial then r.usage = usage_so_far(self, r) end
  record_end(self, r)
  if self.cache then cache_put(self.cache, r) end
  self.done, self.final = true, r
  return nil
end

-- A reader canceled while it waits for the next event (a resil.timeout, a task
-- canceled) closes its stream, `<close>` or not: it is recorded as what it
-- streamed and its transfer aborted. Without it, a script that held its stream
-- in a plain local (as the README's do) recorded nothing, its hold kept until
-- it lapsed, and the transfer ran on until the stream was collected.
local reading_mt = { __close = function(g)
  local self = g[1]
  if self.reading then
    self.reading = nil
    self:close()
  end
end }

local CUT = { kind = "reset", message = "the stream ended without its end marker" }
local function broke_upstream(self, err, ebody)
  if not self.breaker_record then return end
  local verdict
  if ebody ~= nil or err == nil then -- (an error event: the status its API answers it with, as an opening's)
    local etype = type(ebody) == "table" and type(ebody.error) == "table" and ebody.error.type
    verdict = classify.outcome({ status = EVENT_STATUS[etype] or 500, headers = {} })
  else
    verdict = classify.outcome(nil, err)
  end
  -- (a 429 or a too_large event says nothing of the provider's health: its opening's success stands)
  settle_breaker(self, not (verdict and verdict.breaker))
end

-- The open stream's next event, read through its adapter (its text kept):
-- -> ev, delta, done (a complete end marker) | false, the stream's end as
-- finished() or interrupted() gives it (nil | nil, err)
local function read_next(self)
  local adapter = self.target.adapter
  local guard = self.reading_guard
  if not guard then
    guard = setmetatable({ self }, reading_mt)
    self.reading_guard = guard
  end
  local _ <close> = guard
  self.reading = true
  local ev, err = self.s:read_event()
  self.reading = nil
  if ev == nil then
    if err then
      broke_upstream(self, err)
      return false, interrupted(self, tostring(err.message or err), err)
    end
    if adapter.complete(self.state, true) then return false, finished(self) end
    broke_upstream(self, CUT)
    return false, interrupted(self, CUT.message)
  end
  local delta, done, eerr, ebody = adapter.event(self.state, ev)
  if eerr then
    broke_upstream(self, nil, ebody or false)
    return false, interrupted(self, "error event: " .. eerr, ebody)
  end
  if delta then self.parts[#self.parts + 1] = delta end
  if done and not adapter.complete(self.state, true) then
    broke_upstream(self, CUT)
    return false, interrupted(self, CUT.message)
  end
  return ev, delta, done
end

-- the stream ended at the stop sequence `which` its reader's cutter met (see Stream:next): its text
-- cut there, its end the stop's, and its transfer closed (what followed was never asked for),
-- recorded as what it streamed
local function stop_at(self, which)
  local full = table.concat(self.parts)
  local at = full:find(which, 1, true)
  if at then self.parts = { full:sub(1, at - 1) } end
  local st = self.state or {}
  st.finish_reason, st.stop_reason, st.stop_sequence, st.tool_calls = "stop", "stop_sequence", which, nil
  self.state = st
  return finished(self)
end

-- s:next() -> the next delta | nil at the end | nil, err
local function next_raw(self)
  if self.done then return nil, self.err end
  if self.finish_pending then
    self.finish_pending = nil
    return finished(self)
  end
  if not self.opened then
    self.opened = true
    local first, err = open(self)
    if first or err or self.done then return first, err end
    return finished(self)
  end
  while true do
    local ev, delta, done = read_next(self)
    if ev == false then return delta, done end -- (the stream's end: nil | nil, err)
    if delta then return delta end
    if done then return finished(self) end
  end
end

-- s:next_event() -> the provider's next event {event=, data=} and its JSON,
-- once the stream is open (req.raw_events: for a relay of the provider's own
-- events), read through the adapter as s:next() reads it | nil at the end |
-- nil, err. The events read while it opened come first; the last event is
-- given only once the stream is known to be complete (a [DONE] or
-- message_stop after a stream cut short is its error instead).
-- (the request's stop sequences, ai.chat's cut for a stream: deltas through a cutter that holds
-- back what may begin a stop until the next delta says; a stop met ends the stream there)
function Stream:next()
  local c = self.cutter
  if not c then return next_raw(self) end
  if self.cut_over then return nil, self.err end
  while true do
    local delta, err = next_raw(self)
    if delta == nil then
      self.cut_over = true
      local rest = err == nil and c.rest() or ""
      if rest ~= "" then return rest end -- (the held tail: it began no stop after all)
      return nil, err
    end
    local text, met = c.feed(delta)
    if met then
      self.cut_over = true
      stop_at(self, met)
      if text ~= "" then return text end
      return nil
    end
    if text ~= "" then return text end
  end
end

function Stream:next_event()
  if not self.opened then
    local _, err = self:next()
    if err then return nil, err end
  end
  local backlog = self.backlog
  if backlog and self.backlog_at <= #backlog then
    local e = backlog[self.backlog_at]
    backlog[self.backlog_at] = false
    self.backlog_at = self.backlog_at + 1
    return e[1], e[2]
  end
  if self.done then return nil, self.err end
  -- (read to its end while it opened, a stream labelled JSON: its events were all in the backlog,
  -- and there is no transfer left to read)
  if self.finish_pending then
    self.finish_pending = nil
    return finished(self)
  end
  local ev, _, done = read_next(self)
  if ev == false then return nil, done end -- (the stream's end: nil | nil, err)
  local decoded = self.state.decoded
  if done then finished(self) end
  return ev, decoded
end

-- for delta in s do ... end: a stream that fails raises its error (a table
-- with kind, and text for the text received)
function Stream:__call()
  local delta, err = self:next()
  if err then error(err, 2) end
  return delta
end

-- s:result() -> the result, as ai.chat's, once the stream ended | nil, err
function Stream:result()
  if not self.done then return nil, resil.error("in_progress", "the stream has not ended") end
  if self.err then return nil, self.err end
  return self.final
end

-- A stream closed before its end (its reader stopped, or its task was
-- canceled) is recorded as what it streamed. A close while a task is being
-- canceled cannot wait for the store: that record is a task of its own.
function Stream:close()
  if self.s then self.s:close() end
  self.s = nil
  if self.done or self.recording then return end -- (recording: its end is being recorded)
  self.done = true
  local record
  if self.target then
    record = function() interrupted(self, "closed by its reader before the end") end
  elseif self.guard then -- (closed while it opened: the refusals first, see call_guard)
    record = function()
      add_refusals(self.guard)
      if self.ticket and not self.ticket.done then self.ticket:settle(0) end
    end
  end
  if record and coroutine.isyieldable() then record()
  elseif record then resil.spawn(record) end
end
Stream.__close = Stream.close
-- A stream dropped before its end without a close (its reader canceled in its loop's body, not
-- while it read) is recorded when collected, in a task (a finalizer cannot wait). Its transfer
-- is aborted if its own finalizer (as a rule run first, in the same cycle) has not given it back.
local function close_transfer(s) s:close() end
function Stream:__gc()
  if self.done or self.recording then return end
  if self.s then pcall(close_transfer, self.s) end -- (a stream given back raises: closed)
  self.s = nil
  pcall(self.close, self)
end

-- ai.stream(req) -> a stream; a missing key raises here, before anything is sent
-- A stream's deltas are cut at the request's stop sequences as ai.chat's answer is (cut_at_stops),
-- unless the caller asked a server to write them, or reads the provider's own events (the
-- gateway's relays, req.raw_events, which keep the stops themselves)
local function stream_cutter(req)
  if req.stop == nil or req.raw_events ~= nil or stops_written(req) then return nil end
  local list = stops.list(req.stop)
  return list and stops.cutter(list)
end

function ai.stream(req)
  check_request(req, 2)
  local targets, terr = targets_of(req, 2)
  if not targets then error(terr, 2) end
  targets = serving_tools(targets, req)
  return setmetatable({ req = req, targets = targets, parts = {}, cache = cache_of(targets, req),
    cutter = stream_cutter(req) }, Stream)
end

---------------------------------------------------------------------------
-- embeddings

-- ai.embed{ model = "openai/text-embedding-3-small", input = "text" or {"a", "b"}, dimensions =,
--   encoding_format = "float" | "base64", fallback =, budget =, user =, deadline = }
--   -> { embeddings = {vector, ...} (base64 strings when asked), usage, cost_usd, provider, model, attempts }
--   | nil, err. An adapter that embeds has embed_url, embed_body and embed_parse.
local embed_callers = {} -- provider -> { conf =, caller = }; a new ai.configure makes a new caller
local NO_CONF = {}

-- (a call's own options, timeout or retry, over its provider's, as caller_of does for a chat: they
-- were ignored, and an embed given timeout = 5 waited for the provider's 60)
local function embed_caller(provider, adapter, conf, req)
  local override = sets_call_options(req)
  local c = not override and embed_callers[provider]
  if c and c.conf == conf then return c.caller end
  local o = {}
  for _, k in ipairs(CALL_OPTIONS) do
    if req[k] ~= nil then o[k] = req[k] else o[k] = conf[k] end
  end
  if req.retry ~= nil then o.retry = call_retry(req.retry) end
  o.validate = function(res)
    local data, why = classify.decoded(res)
    if data == nil then return nil, why end
    local r, bad = adapter.embed_parse(data)
    if not r then return nil, bad end
    return true
  end
  o.operation = "embeddings" -- (whatever its URL's end)
  local caller = call.provider(provider, o)
  if not override then embed_callers[provider] = { conf = conf, caller = caller } end
  return caller
end

-- d: a registry deployment (its own config, limits and name), or nil
local function embed_strategy(spec, req, level, guard, d)
  local p, model = parse_model(spec, level + 1)
  local adapter = adapter_of(p, level + 1)
  if not adapter.embed_body then error(("ai.embed: provider '%s' has no embeddings"):format(p), level + 1) end
  local conf = d and deployment_conf(p, d) or ai.config[p] or NO_CONF
  local key, err = key_of(p, adapter, conf, model)
  if key == nil then return nil, err end
  local t = { provider = p, model = model, name = d and (d.name .. ":" .. p .. "/" .. model) or (p .. "/" .. model),
    adapter = adapter, deployment = d and d.name or nil }
  local caller = embed_caller(d and d.name or p, adapter, conf, req)
  local wire = { method = "POST", url = adapter.embed_url(base_url(adapter, conf)),
    headers = adapter.headers(key or nil, conf), json = adapter.embed_body(req, model, conf) }
  return { name = t.name, t = t, fn = function(_, deadline)
    local res, cerr = caller:attempts(wire, deadline, refused_list(guard, t), held_retries(guard, req.give_up, caller))
    if res == nil then return target_failed(t, cerr) end
    local r = adapter.embed_parse(classify.decoded(res))
    -- (as many vectors as inputs, or the answer is the provider's garbage: one short was returned as it
    -- was, and a caller that pairs them up paired them wrong. Paid for, it is recorded as refused.)
    -- (OpenAI's input may be one text's tokens, a list of integers: one input)
    local inputs = (type(req.input) == "string" or math.type(req.input[1])) and 1 or #req.input
    if #r.embeddings ~= inputs then
      local list = refused_list(guard, t)
      list[#list + 1] = res
      return target_failed(t, resil.error("invalid_output", ("%s answered %d embeddings for %d inputs"):format(
        t.name, #r.embeddings, inputs), { class = "invalid_output", retryable = false, fallback = true,
        provider = p, status = res.status, attempts = res.attempts }))
    end
    r.attempts = res.attempts
    r.provider_request_id = provider_request_id(res)
    if r.usage then r.usage.requests = 1 end
    return finish_result(t, r, nil)
  end }
end

-- An embedding's strategies, in order: its model through the registry (an alias, a deprecation past
-- its sunset, a migration, deployments), then the request's fallbacks, a target without its key
-- left out as a chat's is -> strategies, plan | nil, err. (Before, a model went to the provider as
-- named: an alias was refused, and a model past its sunset was called, a 404 on every call, where
-- its replacement served the chats.)
local function embed_strategies(req, guard, level)
  local reg = registry()
  local plan = reg.resolve(req.model, req, level + 2, nil, resil.context().idempotency_key)
  if plan.err then return nil, plan.err end
  local strategies, seen, keyless = {}, {}, {}
  local function add_choices(choices)
    for _, c in ipairs(choices) do
      -- (deployments in their weighted order: no caller is made for a breaker's or bucket's state)
      local ds = c.deployments and reg.order(c, function() return false, 0 end) or { false }
      for _, d in ipairs(ds) do
        local st, err = embed_strategy(d and d.model or c.model, req, level + 1, guard, d or nil)
        if not st then keyless[#keyless + 1] = err
        elseif not seen[st.name] then
          seen[st.name] = true
          strategies[#strategies + 1] = st
        end
      end
    end
  end
  add_choices(plan.choices)
  if not strategies[1] then return nil, keyless[1] end
  for _, f in ipairs(req.fallback or {}) do
    local m = type(f) == "table" and f.model or f
    if type(m) ~= "string" then error("ai.embed: fallback entries must be models or {model=, ...}", level + 1) end
    local fplan = (reg.resolve_fallback or reg.resolve)(m, req, level + 2)
    if not fplan.err then add_choices(fplan.choices) end
  end
  if keyless[1] then warn_keyless(keyless) end
  return strategies, plan
end

function ai.embed(req)
  if type(req) ~= "table" then error("ai.embed: expects a request table", 2) end
  if type(req.model) ~= "string" then error("ai.embed: model must be a string: an alias or \"provider/model\"", 2) end
  local input = req.input
  if type(input) ~= "string" and (type(input) ~= "table" or #input == 0) then
    error("ai.embed: input must be a string or a non-empty list", 2)
  end
  if req.give_up ~= nil and type(req.give_up) ~= "function" then
    error("ai.embed: give_up must be a function () -> a reason | nil", 2)
  end
  check_budget(req.budget, "ai.embed", 2)
  -- (a fallback given as one string was no fallback, without a word; a NaN deadline raised inside
  -- policies/call.lua, 'http request: timeout must be >= 0')
  if req.fallback ~= nil and type(req.fallback) ~= "table" then
    error("ai.embed: fallback must be a list of models", 2)
  end
  check_call_options(req, "ai.embed", 2)
  local guard = call_guard(nil, req, "embed") -- (its ticket once reserved)
  local strategies, plan = embed_strategies(req, guard, 2)
  if not strategies then return nil, plan end
  local ticket
  if req.budget ~= nil then
    local budget = type(req.budget) == "string" and resil.budget(req.budget) or req.budget
    local text = type(input) == "string" and input or json.encode(input)
    local usd, priced = 0, {}
    for i, st in ipairs(strategies) do
      local c, why = pricing.cost(st.t.provider, st.t.model, { input_tokens = pricing.estimate_tokens(text) })
      if c == nil and i == 1 then
        return nil, resil.error("unpriced", ("budget '%s' cannot hold a call without a price: %s"):format(
          tostring(budget.name), why), { class = "unpriced", retryable = false })
      end
      -- (a fallback without a price is left out, as a chat's: it refused every budgeted call)
      if c == nil then
        priced_targets({ st.t }, { [st.t] = why })
      else
        priced[#priced + 1] = st
        if c > usd then usd = c end
      end
    end
    strategies = priced
    local berr
    ticket, berr = budget:reserve(usd)
    if berr then return nil, berr end
  end
  guard.ticket = ticket
  local _ <close> = guard -- a canceled call gives its hold back, records what it refused
  local d = req.deadline or plan.deadline or (ai.config[strategies[1].t.provider] or NO_CONF).deadline
  local deadline = d and resil.now() + d
  local planned = { plan = plan }
  strategies[1] = watched(strategies[1], planned) -- (a migration's side counts its outcome)
  local r, err, info
  if #strategies == 1 then
    r, err = strategies[1].fn(req, deadline)
  else
    strategies.give_up = req.give_up
    r, err, info = fallback.chain(strategies)(req, deadline)
    if r and info then r.attempts = (r.attempts or 1) + attempts_failed(info.errors) end
  end
  if r then describe(r, planned) end
  return settle_call(guard, r, err, "embed")
end

---------------------------------------------------------------------------
-- async jobs and speech live in policies.jobs (Replicate, fal, ElevenLabs)

local function jobs_module()
  local ok, mod = pcall(require, "policies.jobs")
  if ok and type(mod) == "table" then return mod end
  return nil, ok and "policies.jobs is not a module" or mod
end

-- A job or speech call names an alias or a model: the registry picks the
-- model (its first choice: deprecations and migrations apply), and the
-- alias's deadline when the call sets none.
local function through_registry(req, level, anchor)
  if type(req) ~= "table" or type(req.model) ~= "string" then return req end
  local plan = registry().resolve(req.model, req, level + 1, nil, anchor)
  if plan.err then return nil, plan.err end
  local first = plan.choices[1]
  local model = first.model or (first.deployments and first.deployments[1].model)
  if model == req.model and not plan.deadline then return req end
  local r = {}
  for k, v in pairs(req) do r[k] = v end
  r.model = model
  r._alias = req.model -- (a job's name across resumes, whatever model the alias names then: policies.jobs)
  if r.deadline == nil then r.deadline = plan.deadline end
  return r, nil, plan
end

local function with_plan(r, err, plan)
  if r and plan then
    r.alias, r.routed = plan.alias, plan.routed
    if plan.migration then r.migration = { alias = plan.migration.alias, side = plan.migration.side } end
  end
  return r, err
end

-- ai.job and ai.speech: policies.jobs through the registry (one wrapper: the
-- levels and tail calls keep misuse pointing at the caller's line)
local function through_jobs(fname)
  return function(req)
    local jobs, why = jobs_module()
    if not jobs or type(jobs[fname]) ~= "function" then
      error(("ai.%s: not available (policies.jobs is missing: %s)"):format(fname, tostring(why)), 2)
    end
    -- (a job resumed draws a migration's side as it did: its key)
    local anchor = fname == "job" and type(jobs.resume_key) == "function" and jobs.resume_key(req) or nil
    local r, err, plan = through_registry(req, 2, anchor)
    if r == nil then return nil, err end
    if not plan then return jobs[fname](r) end -- a tail call: misuse raises at the caller's line
    local start = resil.now()
    local res, jerr = jobs[fname](r)
    -- its outcome counts for its side of a migration, as a chat's does (uncounted, a canary whose
    -- every job failed was never rolled back)
    if plan.migration then
      local class = type(jerr) == "table" and (jerr.class or jerr.kind) or (jerr ~= nil and "unknown" or nil)
      registry().record(plan.migration, { ok = res ~= nil, class = class, seconds = resil.now() - start })
    end
    return with_plan(res, jerr, plan)
  end
end
ai.job, ai.speech = through_jobs("job"), through_jobs("speech")

return ai
