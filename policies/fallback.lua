-- policies/fallback.lua: ordered strategies, each with a condition to move on.
--
--   local answer = fallback.chain{
--     { name = "gpt-4o", fn = function(req) return openai(req) end },
--     { name = "claude", fn = function(req) return anthropic(req) end,
--       on = { "server_error", "overloaded", "unavailable" } },
--     placeholder = { text = "(summary unavailable)" },
--   }
--   local value, err, info = answer(req)   -- info.served_by == "gpt-4o" | "claude" | "placeholder" (read-only)
--
-- A strategy returns value or nil, err. The chain moves on from a failure when
-- the strategy's `on` allows it: a list of classes, or fn(err) -> bool; by
-- default, when the error's class is marked `fallback` in policies.classify
-- (an outage, a content-policy refusal, a context too long; not a 401 or a
-- 400, which another model would refuse as well).
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

-- chain(...) -> value, nil, info | nil, err (err.errors lists every failure)
function Chain:__call(...)
  local errors
  for i = 1, #self.strategies do
    local s = self.strategies[i]
    local value, err = s.fn(...)
    if value ~= nil or err == nil then
      if errors == nil then return value, nil, s.info end -- shared: treat info as read-only
      return value, nil, { served_by = s.name, index = i, errors = errors }
    end
    errors = errors or {}
    errors[#errors + 1] = { strategy = s.name, error = err }
    local last = i == #self.strategies
    if not moves_on(s, err) or (last and self.placeholder == nil) then
      if last and #errors == 1 then return nil, err end
      local fields = { errors = errors, strategy = s.name }
      if type(err) == "table" then
        for k, v in pairs(err) do if fields[k] == nil then fields[k] = v end end
      end
      local kind = type(err) == "table" and err.kind or "unknown"
      local stopped = last and "" or " (its class does not move on)"
      return nil, resil.error(kind, ("%s failed%s: %s"):format(s.name, stopped, tostring(err)), fields)
    end
    if resil.run then resil.run.fell_back(class_of(err)) end -- for the run report
    resil.log.info("fallback", { from = s.name, to = self.strategies[i + 1] and self.strategies[i + 1].name
                                 or "placeholder", class = class_of(err), reason = tostring(err) })
  end
  local p = self.placeholder
  if type(p) == "function" then p = p(errors, ...) end
  return p, nil, { served_by = "placeholder", index = #self.strategies + 1, errors = errors, placeholder = true }
end

-- fallback.chain{ strategy, ..., placeholder = value | fn(errors, ...) }
-- A strategy is { name =, fn =, on = } or just a function.
function fallback.chain(spec)
  if type(spec) ~= "table" then error("fallback.chain: expects a table of strategies", 2) end
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
  return setmetatable({ strategies = strategies, placeholder = spec.placeholder }, Chain)
end

return fallback
