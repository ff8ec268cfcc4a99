-- policies/fallback.lua: ordered strategies, each with a condition to move on.
--
--   local answer = fallback.chain{
--     { name = "gpt-4o", fn = function(req) return openai(req) end },
--     { name = "claude", fn = function(req) return anthropic(req) end,
--       on = { "server_error", "overloaded", "unavailable" } },
--     placeholder = { text = "(summary unavailable)" },
--     give_up = function() return client_gone and "client_left" end, -- optional: no strategy after it says
--   }
--   local value, err, info = answer(req)   -- info.served_by == "gpt-4o" | "claude" | "placeholder" (read-only)
--
-- A strategy returns value or nil, err (nothing at all is an invalid_output
-- failure, which moves on by default). The chain moves on from a failure when
-- the strategy's `on` allows it: a list of classes, or fn(err) -> bool; by
-- default, when the error's class is marked `fallback` in policies.classify
-- (an outage, a content-policy refusal, a context too long; not a 401 or a
-- 400, which another model would refuse as well). give_up (fn() -> a
-- reason once nobody wants the outcome any more, a gateway's client that
-- left) is asked before each strategy: once it says one, no other starts
-- (nor the placeholder), and the chain ends with the failure so far
-- (err.gave_up = the reason), or kind "given_up" before the first.
local resil = require "resil"
local classify = require "policies.classify"

local fallback = {}

local function class_of(err)
  if type(err) ~= "table" then return "unknown", false end
  local verdict = classify.outcome(nil, err)
  return verdict.class, verdict.fallback
end

local function moves_on(strategy, err)
  local on = strategy.on
  local class, default = class_of(err)
  if on == nil then return default == true end
  if type(on) == "function" then return on(err, class) and true or false end
  for i = 1, #on do
    if on[i] == class or (type(err) == "table" and on[i] == err.kind) then return true end
  end
  return false
end

local Chain = {}
Chain.__index = Chain

-- the failure a chain ends with: the strategy s's error err, with every
-- failure so far (errors); stopped: why it did not move on
local function failure(s, err, errors, stopped)
  if #errors == 1 and not stopped then return err end
  local fields = { errors = errors, strategy = s.name }
  if type(err) == "table" then
    for k, v in pairs(err) do if fields[k] == nil then fields[k] = v end end
  end
  local kind = type(err) == "table" and err.kind or "unknown"
  return resil.error(kind, ("%s failed%s: %s"):format(s.name, stopped or "", tostring(err)), fields)
end

-- the failure a chain whose give_up says a reason ends with, before the
-- strategy `next` (its name, or "placeholder") | nil: it goes on
local function given_up(chain, errors, next)
  local why = chain.give_up()
  if not why then return nil end
  why = tostring(why)
  if not errors then
    return resil.error("given_up", ("gave up before %s: %s"):format(next, why),
      { class = "canceled", retryable = true, gave_up = why })
  end
  local last = errors[#errors]
  local err = failure({ name = last.strategy }, last.error, errors, (" (no fallback: %s)"):format(why))
  if type(err) == "table" then err.gave_up = why end
  return err
end

-- moving on from the last failure to `next` (a name, or "placeholder"):
-- nil, or the failure the chain ends with when its give_up said a reason
local function move_on(chain, errors, next)
  local stopped = chain.give_up and given_up(chain, errors, next)
  if stopped then return stopped end
  if not errors then return nil end
  local last = errors[#errors]
  local class = class_of(last.error)
  if resil.run then resil.run.fell_back(class) end -- for the run report
  resil.log.info("fallback", { from = last.strategy, to = next, class = class, reason = tostring(last.error) })
  return nil
end

-- chain(...) -> value, nil, info | nil, err (err.errors lists every failure)
function Chain:__call(...)
  local errors
  for i = 1, #self.strategies do
    local s = self.strategies[i]
    local stopped = move_on(self, errors, s.name)
    if stopped then return nil, stopped end
    local value, err = s.fn(...)
    -- nothing at all (a strategy without a return, a cache that missed) is no answer: the chain
    -- returned nil, nil as served by it, and a caller reading err.kind raised
    if value == nil and err == nil then
      err = resil.error("invalid_output", ("%s returned nothing (neither a value nor nil, err)"):format(s.name))
    end
    if value ~= nil then
      if errors == nil then return value, nil, s.info end -- shared: treat info as read-only
      return value, nil, { served_by = s.name, index = i, errors = errors }
    end
    errors = errors or {}
    errors[#errors + 1] = { strategy = s.name, error = err }
    local last = i == #self.strategies
    if not moves_on(s, err) or (last and self.placeholder == nil) then
      return nil, failure(s, err, errors, not last and " (its class does not move on)" or nil)
    end
  end
  local stopped = move_on(self, errors, "placeholder")
  if stopped then return nil, stopped end
  local p = self.placeholder
  if type(p) == "function" then p = p(errors, ...) end
  if p == nil then -- (a placeholder function that returned nothing: the chain returned nil, nil, and a
    -- caller reading err.kind raised) the chain ends with the failure so far
    local last = errors[#errors]
    return nil, failure({ name = last.strategy }, last.error, errors, " (its placeholder returned nothing)")
  end
  return p, nil, { served_by = "placeholder", index = #self.strategies + 1, errors = errors, placeholder = true }
end

-- fallback.chain{ strategy, ..., placeholder = value | fn(errors, ...), give_up = fn() -> reason | nil }
-- A strategy is { name =, fn =, on = } or just a function.
-- (a name misspelt, placeholdr = "...", was ignored: the chain ended with the failure where a
-- placeholder was meant; a hole in the list, { a, nil, c }, dropped the strategies after it.
-- A strategy's own fields are its caller's: policies.ai keeps its target there)
local CHAIN_FIELDS = { placeholder = true, give_up = true }
function fallback.chain(spec)
  if type(spec) ~= "table" then error("fallback.chain: expects a table of strategies", 2) end
  local count = 0
  for _ in ipairs(spec) do count = count + 1 end
  for k in pairs(spec) do
    if math.type(k) == "integer" and k > count then
      error(("fallback.chain: strategy %d is nil: the ones after it would never run"):format(count + 1), 2)
    elseif not (CHAIN_FIELDS[k] or math.type(k) == "integer" and k >= 1) then
      error(("fallback.chain: unknown field '%s' (a chain takes its strategies, placeholder and give_up)"):format(
        tostring(k)), 2)
    end
  end
  local strategies = {}
  for i, s in ipairs(spec) do
    if type(s) == "function" then s = { fn = s } end
    if type(s) ~= "table" or type(s.fn) ~= "function" then
      error(("fallback.chain: strategy %d needs fn"):format(i), 2)
    end
    local on = s.on
    if on ~= nil and type(on) ~= "table" and type(on) ~= "function" then
      error(("fallback.chain: strategy %d: `on` must be a list of classes or a function"):format(i), 2)
    end
    local sname = s.name or ("strategy " .. i)
    strategies[i] = { name = sname, fn = s.fn, on = on, info = { served_by = sname, index = i } }
  end
  if #strategies == 0 then error("fallback.chain: needs at least one strategy", 2) end
  if spec.give_up ~= nil and type(spec.give_up) ~= "function" then
    error("fallback.chain: give_up must be a function", 2)
  end
  return setmetatable({ strategies = strategies, placeholder = spec.placeholder, give_up = spec.give_up }, Chain)
end

return fallback
