-- policies/retry.lua: attempts with backoff, a deadline and a retry budget.
--
--   local retry = require "policies.retry"
--   local res, err = retry.call(function(attempt) return resil.http.request(req) end, {
--     provider = "openai",        -- names the retry budget and the log lines
--     deadline = resil.now() + 60, -- or timeout = 60: no attempt or sleep crosses it
--     validate = "chat",          -- output validator (policies.classify)
--     give_up = function() return client_gone and "client_left" end, -- no attempt after it says a reason
--   })
--
-- How many retries and which backoff come from the outcome's class
-- (policies.classify); options override them. Delays are capped by `cap` and
-- floored by the provider's Retry-After / x-ratelimit-reset-*.
local resil = require "resil"
local classify = require "policies.classify"

local retry = {}

-- (the host's metric constructors, which prelude's owning_loader hands this chunk: resil.metrics is
-- the scripts', and under the sandbox one that ran first handed out fakes; a copy loaded otherwise
-- has resil.metrics)
local host_metrics = select(4, ...) or resil.metrics
local retries_total = host_metrics.counter("resil_retries_total", "Retries, by provider and outcome class")
local gave_up_total = host_metrics.counter("resil_retry_gave_up_total",
  "Calls that failed after retrying, by provider and reason (max_retries, deadline, retry_budget, retry_after)")

retry.defaults = {
  base = 0.5,             -- seconds: the first delay of a growing backoff
  cap = 30,               -- seconds: no computed delay is longer
  -- seconds: a Retry-After longer is not waited out (the provider's "not now", 429 Retry-After:
  -- 3600, held the call an hour where no deadline was set); the call ends with the provider's
  -- error, err.gave_up = "retry_after" and its err.retry_after, for a fallback or the caller
  max_retry_after = 60,
  budget = { percent = 0.2, min_per_second = 1, window = 10 },
}

local min, max, floor = math.min, math.max, math.floor

-- delay(n, base, cap, prev, random): n is the retry number from 0, prev the
-- previous delay (decorrelated jitter), random() uniform in [0, 1).
retry.strategies = {
  immediate = function() return 0 end,
  constant = function(_, base, cap) return min(cap, base) end,
  linear = function(n, base, cap) return min(cap, base * (n + 1)) end,
  exponential = function(n, base, cap) return min(cap, base * 2 ^ n) end,
  full_jitter = function(n, base, cap, _, random) return random() * min(cap, base * 2 ^ n) end,
  equal_jitter = function(n, base, cap, _, random)
    local t = min(cap, base * 2 ^ n)
    return t / 2 + random() * (t / 2)
  end,
  decorrelated_jitter = function(_, base, cap, prev, random)
    local hi = (prev or base) * 3
    return min(cap, base + random() * (hi - base))
  end,
}

-- Retry budget (Finagle's): over a sliding window, retries may add at most
-- `percent` of the calls, plus `min_per_second` so that a quiet service can
-- still retry. During an outage the calls keep failing; the budget keeps the
-- retries from multiplying the load.
local Budget = {}
Budget.__index = Budget

local function budget_slot(b, now)
  local second = floor(now)
  local i = second % b.window + 1
  local slot = b.slots[i]
  if slot.second ~= second then slot.second, slot.calls, slot.retries = second, 0, 0 end
  return slot, second
end

function Budget:deposit()
  local t = resil.now()
  local slot, second = self.current, self.current_second
  -- (within the current slot's second: no floor call, one a call)
  if not (second and t >= second and t < second + 1) then
    second = floor(t)
    slot = budget_slot(self, second)
    self.current, self.current_second = slot, second
  end
  slot.calls = slot.calls + 1
end

-- calls and retries over the window that ends at `second`
local function window_totals(b, second)
  local calls, retries = 0, 0
  for i = 1, b.window do
    local s = b.slots[i]
    if second - s.second < b.window then calls, retries = calls + s.calls, retries + s.retries end
  end
  return calls, retries
end

local function allowed(b, calls) return b.min_per_second * b.window + b.percent * calls end

-- Take one retry from the budget: true, or false when it is spent.
function Budget:withdraw()
  local slot, second = budget_slot(self, resil.now())
  local calls, retries = window_totals(self, second)
  if retries + 1 > allowed(self, calls) then return false end
  slot.retries = slot.retries + 1
  return true
end

function Budget:state()
  local calls, retries = window_totals(self, floor(resil.now()))
  return { calls = calls, retries = retries, allowed = floor(allowed(self, calls)) }
end

-- an error at the line that gave the options: the first frame outside the policy library and the
-- host (a classify rule's mistake met in a provider made by policies.call, or by ai.chat, named
-- call.lua's line, none of the caller's), else the first outside this file
local LIBRARY = { ["retry.lua"] = true, ["classify.lua"] = true, ["call.lua"] = true, ["fallback.lua"] = true,
  ["limit.lua"] = true, ["ai.lua"] = true, ["jobs.lua"] = true, ["gateway.lua"] = true }
local function raise_at_caller(msg)
  local here = debug.getinfo(1, "S").source
  local outside -- the first frame outside this file and the host
  for level = 2, 60 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.currentline > 0 and info.source ~= here and info.source:sub(1, 7) ~= "=[resil" then
      local at = ("%s:%d: "):format(info.short_src, info.currentline)
      if not LIBRARY[info.source:match("[^/\\]+$")] then error(at .. msg, 0) end
      outside = outside or at
    end
  end
  error((outside or "") .. msg, 0)
end

-- (a window of math.huge made slots until memory ran out, 0 or 1.5 raised inside withdraw on
-- a later call, a NaN percent let every retry through: each is refused where it is given)
-- (a name misspelt, windw = 60 or precent = 0.05, was ignored: the default budget ran)
-- -> nil | what is wrong with a budget's options
local BUDGET_RULES = {
  window = { function(v) return v >= 1 and v <= 3600 and v == floor(v) end, "a whole number of seconds, 1 to 3600" },
  percent = { function(v) return v >= 0 and v < math.huge end, "a non-negative share of the calls" },
  min_per_second = { function(v) return v >= 0 and v < math.huge end, "a non-negative number" },
}
local function budget_wrong(name, conf)
  name = name and ("retry budget '%s'"):format(name) or "retry budget"
  if type(conf) ~= "table" then
    return ("%s: budget must be false or {percent=, min_per_second=, window=}, got %s")
      :format(name, type(conf))
  end
  for k, v in pairs(conf) do
    local rule = BUDGET_RULES[k]
    if not rule then
      return ("%s: unknown option '%s' (a budget takes percent, min_per_second, window)"):format(name,
        tostring(k))
    end
    if not (type(v) == "number" and rule[1](v)) then
      return ("%s: %s must be %s, got %s"):format(name, k, rule[2], tostring(v))
    end
  end
end
local function check_budget(name, conf)
  local wrong = budget_wrong(name, conf)
  if wrong then raise_at_caller(wrong) end
end

-- retry.check(opts) -> nil | what is wrong with retry options, for the line that gave them (a NaN
-- max_retries retried without end, a string one or an unknown backoff raised inside this file
-- after the first attempt had been made and paid for, a negative one was taken as 0)
local function nonneg(v, finite) return v >= 0 and (not finite or v < math.huge) end
local OPTION_NUMBERS = { -- name -> finite, what it must be
  base = { true, "a number of seconds >= 0" }, cap = { false, "a number of seconds >= 0" },
  max_retry_after = { false, "a number of seconds >= 0" }, attempt_time = { true, "a number of seconds >= 0" },
  timeout = { false, "a number of seconds >= 0" },
}
local OPTION_FUNCTIONS = { "random", "on_retry", "sleep", "classify", "give_up" }
local function shown(v) return type(v) == "string" and ("%q"):format(v) or tostring(v) end
local function retries_ok(v) return type(v) == "number" and v >= 0 and (v == floor(v) or v == math.huge) end
-- (an option misspelt, max_retry = 3 or backof = "constant", was ignored: the call retried as the
-- defaults say. provider, validate and bounded are what policies.call adds for its own calls.)
local KNOWN_LIST = "max_retries, base, cap, backoff, strategy, max_retry_after, deadline, timeout, attempt_time, " ..
  "budget, random, on_retry, give_up, sleep, classify"
local KNOWN = { provider = true, validate = true, bounded = true }
for k in KNOWN_LIST:gmatch("[%w_]+") do KNOWN[k] = true end
function retry.check(opts)
  if type(opts) ~= "table" then return ("retry options must be a table, got %s"):format(type(opts)) end
  for k in pairs(opts) do
    if not KNOWN[k] then return ("retry: unknown option '%s' (it takes %s)"):format(tostring(k), KNOWN_LIST) end
  end
  local m = opts.max_retries
  if type(m) == "table" then
    for class, n in pairs(m) do
      if not retries_ok(n) then
        return ("retry: max_retries.%s must be a whole number >= 0 (or math.huge), got %s"):format(
          tostring(class), shown(n))
      end
    end
  elseif m ~= nil and not retries_ok(m) then
    return ("retry: max_retries must be a whole number >= 0 (or math.huge), or {class = n}, got %s"):format(shown(m))
  end
  for k, rule in pairs(OPTION_NUMBERS) do
    local v = opts[k]
    if v ~= nil and not (type(v) == "number" and nonneg(v, rule[1])) then
      return ("retry: %s must be %s, got %s"):format(k, rule[2], shown(v))
    end
  end
  if opts.deadline ~= nil and not (type(opts.deadline) == "number" and opts.deadline == opts.deadline) then
    return ("retry: deadline must be a number (resil.now()'s scale), got %s"):format(shown(opts.deadline))
  end
  for _, k in ipairs({ "backoff", "strategy" }) do
    local v = opts[k]
    if v ~= nil and retry.strategies[v] == nil then
      local names = {}
      for name in pairs(retry.strategies) do names[#names + 1] = name end
      table.sort(names)
      return ("retry: unknown backoff strategy '%s' (one of %s)"):format(tostring(v), table.concat(names, ", "))
    end
  end
  for _, k in ipairs(OPTION_FUNCTIONS) do
    local v = opts[k]
    local mt = v ~= nil and type(v) ~= "function" and getmetatable(v)
    if v ~= nil and type(v) ~= "function" and not (type(mt) == "table" and mt.__call) then
      return ("retry: %s must be a function, got %s"):format(k, type(v))
    end
  end
  -- (an unknown validator's name raised after the first answer had been paid for, at a line of this
  -- file; a number, 'attempt to call a number value' inside classify.lua)
  local v = opts.validate
  if v ~= nil and type(v) ~= "function" then
    local mt = getmetatable(v)
    if type(v) == "string" and classify.validators[v] == nil then
      local names = {}
      for name in pairs(classify.validators) do names[#names + 1] = name end
      table.sort(names)
      return ("retry: no validator named '%s' (one of %s, or a function)"):format(v, table.concat(names, ", "))
    elseif type(v) ~= "string" and not (type(mt) == "table" and mt.__call) then
      return ("retry: validate must be a validator's name or a function, got %s"):format(type(v))
    end
  end
  -- (a provider's budget was first checked at its first call's retry, at that call's line)
  if opts.budget ~= nil and opts.budget ~= false then
    return budget_wrong(opts.provider and tostring(opts.provider), opts.budget)
  end
  return nil
end

-- retry.budget(name [, conf]) -> the budget of a provider; it survives reloads.
local budgets = resil.keep("retry.budgets")
function retry.budget(name, conf)
  local b = budgets[name]
  if b and (conf == nil or b.conf == conf) then return b end
  if conf ~= nil then check_budget(name, conf) end
  local d = retry.defaults.budget
  local c = type(conf) == "table" and conf or d
  local window = c.window or d.window
  if b == nil or b.window ~= window then
    -- (a window given again, a reload's, is taken: the first options' stayed for good) the seconds
    -- counted so far move to their slots in it, the latest where two meet
    local slots = {}
    for i = 1, window do slots[i] = { second = -math.huge, calls = 0, retries = 0 } end
    for _, slot in ipairs(b and b.slots or {}) do
      local i = slot.second > -math.huge and slot.second % window + 1
      if i and slot.second > slots[i].second then slots[i] = slot end
    end
    b = b or setmetatable({}, Budget)
    b.slots, b.window, b.current, b.current_second = slots, window, nil, nil
    budgets[name] = b
  end
  b.conf, b.percent, b.min_per_second = conf, c.percent or d.percent, c.min_per_second or d.min_per_second
  return b
end

local function max_retries_for(opts, verdict)
  local m = opts.max_retries
  if type(m) == "table" then m = m[verdict.class] end
  if m == nil then m = verdict.max_retries end
  if m ~= nil and type(m) ~= "number" then -- (a classify rule's "3" raised 'attempt to compare' in here)
    raise_at_caller(("retry: the verdict of class '%s' has max_retries %q, not a number"):format(
      verdict.class, tostring(m)))
  end
  return m or 0
end

local function final_error(res, err, verdict, attempt, provider, gave_up)
  if gave_up then gave_up_total:inc({ provider = provider, reason = gave_up }) end
  if type(err) ~= "table" or err.class == nil then
    err = classify.error(verdict, { response = res })
  end
  err.attempts, err.provider, err.gave_up = attempt, err.provider or provider, gave_up
  return err
end

local function default_random() return math.random() end

-- seconds between two questions to opts.give_up during a backoff
local GIVE_UP_EVERY = 1

-- opts.give_up's reason (a string) | nil
local function given_up(give_up)
  local why = give_up and give_up()
  return why and tostring(why) or nil
end

local EMPTY = {}

-- a classifier's answer that is neither nil (a success) nor a verdict with a class: said with
-- where the classifier is defined (it raised inside this file, 'table index is nil', or inside
-- classify.lua, and a string was taken for a verdict)
local function bad_verdict(classify_fn, verdict)
  local info = type(classify_fn) == "function" and debug.getinfo(classify_fn, "S")
  local where = info and info.what ~= "C" and ("%s:%d"):format(info.short_src, info.linedefined) or tostring(classify_fn)
  local got = type(verdict) == "table" and "a table without a string class" or
    ("%s %s"):format(type(verdict), type(verdict) == "string" and ("%q"):format(verdict) or tostring(verdict))
  raise_at_caller(("retry: the classifier defined at %s returned %s; it must return nil (a success) or a " ..
    "verdict {class = \"...\", retryable = true|false, ...}"):format(where, got))
end

-- retry.call(fn, opts, ...) -> fn's result | nil, err (err.attempts, err.class)
-- fn(attempt, ...) returns res, err like resil.http.request; anything that is not
-- an HTTP response and not an error is a success.
-- opts: provider, deadline (absolute, resil.now() scale) or timeout (seconds
-- from now), attempt_time (seconds an attempt is expected to take: a retry
-- that would end past the deadline is not started), max_retries (number or
-- {class = n}), backoff (or strategy: overrides the class's backoff), base, cap,
-- budget (false, or {percent=, min_per_second=, window=}), random, validate,
-- classify (fn(res, err, opts) -> verdict | nil), on_retry(info), sleep,
-- bounded (fn keeps to the deadline itself: no task per attempt), give_up
-- (fn() -> a reason once nobody wants the outcome any more, a gateway's
-- client that left: asked before each attempt and each backoff, and each
-- second of a backoff, it lets the attempt under way end and starts no
-- other, cutting a backoff short; the call ends with that
-- attempt's failure, err.gave_up = the reason, or before any attempt with
-- kind "given_up", retryable so that resil.once keeps nothing).
-- (its loop: retry.call and retry.attempts below)
local function attempts(fn, opts, deadline, give_up, ...)
  if opts == nil then opts = EMPTY end -- (retry.attempts' opts may be nil)
  local now = resil.now
  local provider = opts.provider or "default"
  local conf = opts.budget
  -- (a budget given no options is the one kept under its name, as retry.budget returns it)
  local budget = conf ~= false and (conf == nil and budgets[provider] or retry.budget(provider, conf)) or nil
  if budget then budget:deposit() end
  local classify_fn = opts.classify or classify.outcome
  local attempt, prev_delay, retries_of = 0, nil, nil
  local res, err, verdict -- the attempt before this one, when it failed

  while true do
    attempt = attempt + 1
    local why = give_up and give_up() -- (given_up's, inline: asked before every attempt)
    if why then why = tostring(why) else why = nil end
    if why and verdict then return nil, final_error(res, err, verdict, attempt - 1, provider, why) end
    if why then
      return nil, resil.error("given_up", ("gave up before attempt %d: %s"):format(attempt, why),
        { attempts = attempt - 1, provider = provider, class = "canceled", retryable = true, gave_up = why })
    end
    if deadline and not opts.bounded then
      local left = deadline - now()
      if left <= 0 then
        return nil, resil.error("deadline", ("deadline passed before attempt %d"):format(attempt),
          { attempts = attempt - 1, provider = provider, class = "deadline", retryable = false })
      end
      local t0 = now()
      res, err = resil.timeout(left, fn, attempt, ...)
      if resil.run then resil.run.attempted(provider, now() - t0) end -- for the run report
      if res == nil and type(err) == "table" and err.kind == "timeout" and now() >= deadline then
        err = resil.error("deadline", ("attempt %d cut at the deadline"):format(attempt),
          { provider = provider, class = "deadline", retryable = false })
      end
    else
      local t0 = now()
      if deadline and t0 >= deadline then
        return nil, resil.error("deadline", ("deadline passed before attempt %d"):format(attempt),
          { attempts = attempt - 1, provider = provider, class = "deadline", retryable = false })
      end
      res, err = fn(attempt, ...)
      if resil.run then resil.run.attempted(provider, now() - t0) end
    end
    verdict = classify_fn(res, err, opts)
    if verdict ~= nil and (type(verdict) ~= "table" or type(verdict.class) ~= "string") then
      bad_verdict(classify_fn, verdict)
    end
    if verdict == nil then
      -- a response table says how many attempts it took (as res.time says how long); not an object
      -- of the host's (a budget's ticket, a store: their metatables hidden), which the sandbox's
      -- rawset refuses
      if type(res) == "table" and rawget(res, "attempts") == nil and getmetatable(res) ~= false then
        rawset(res, "attempts", attempt)
      end
      return res
    end

    retries_of = retries_of or {}
    local class = verdict.class
    local done = retries_of[class] or 0
    if not verdict.retryable or done >= max_retries_for(opts, verdict) then
      return nil, final_error(res, err, verdict, attempt, provider, verdict.retryable and "max_retries" or nil)
    end
    why = give_up and given_up(give_up) -- (before a backoff that would hold on to what the call holds)
    if why then return nil, final_error(res, err, verdict, attempt, provider, why) end
    -- (`backoff`, as the classify rules and the README name it: read only `strategy`, it was ignored)
    local strategy = opts.strategy or opts.backoff or verdict.backoff or "exponential"
    local delay_fn = retry.strategies[strategy]
    if delay_fn == nil then -- (a classify rule's: the options' are refused by retry.check)
      raise_at_caller(("retry: unknown backoff strategy '%s' (the verdict of class '%s')"):format(
        tostring(strategy), class))
    end
    -- (the backoff's options are read when a retry needs them: most calls take one attempt)
    local base, cap = opts.base or retry.defaults.base, opts.cap or retry.defaults.cap
    local random = opts.random
    if random then
      local own = random
      random = function()
        local r = own()
        if not (type(r) == "number" and r >= 0 and r <= 1) then
          raise_at_caller(("retry: random must return a number in [0, 1), got %s"):format(tostring(r)))
        end
        return r
      end
    end
    local delay = delay_fn(attempt - 1, base, cap, prev_delay, random or default_random)
    -- (a `random` outside [0, 1) gave delays past the cap, negative ones that retried at once, or NaN,
    -- which retried at once too: it is refused above; a strategy of one's own is kept to 0..cap)
    if type(delay) ~= "number" or delay ~= delay then
      raise_at_caller(("retry: backoff '%s' gave a delay of %s"):format(tostring(strategy), tostring(delay)))
    elseif delay < 0 then delay = 0
    elseif delay > cap then delay = cap end
    prev_delay = delay
    local floor_delay = verdict.retry_after
    if floor_delay ~= nil and type(floor_delay) ~= "number" then
      raise_at_caller(("retry: the verdict of class '%s' has retry_after %q, not a number"):format(
        class, tostring(floor_delay)))
    end
    if floor_delay and floor_delay > delay then
      if floor_delay > (opts.max_retry_after or retry.defaults.max_retry_after) then
        return nil, final_error(res, err, verdict, attempt, provider, "retry_after")
      end
      delay = floor_delay
    end
    if deadline and now() + delay + (opts.attempt_time or 0) >= deadline then
      return nil, final_error(res, err, verdict, attempt, provider, "deadline")
    end
    -- the budget keeps retries from piling onto a provider in trouble; a
    -- client fault (libcurl lost a reply) is not that
    if budget and not verdict.client_fault and not budget:withdraw() then
      return nil, final_error(res, err, verdict, attempt, provider, "retry_budget")
    end
    retries_of[class] = done + 1
    retries_total:inc({ provider = provider, class = class })
    if resil.run then resil.run.retried(class) end -- per item and step, for `resil-lua runs show`
    local reason = verdict.reason or verdict.message
    local failed = type(err) == "table" and err or {}
    resil.log.info("retry", { provider = provider, attempt = attempt, class = class, delay = delay,
                              reason = reason, trace_id = failed.trace_id, span_id = failed.span_id })
    if opts.on_retry then
      opts.on_retry({ attempt = attempt, class = class, delay = delay, reason = reason, error = err,
                      response = res, provider = provider })
    end
    local sleep = opts.sleep or resil.sleep
    if delay > 0 and give_up then
      -- (slept a second at a time, give_up asked after each: a caller that leaves during a
      -- backoff, up to its cap or a Retry-After, ends it, and what the call holds with it)
      local left = delay
      repeat
        local step = math.min(left, GIVE_UP_EVERY)
        sleep(step)
        left = left - step
        why = given_up(give_up)
        if why then return nil, final_error(res, err, verdict, attempt, provider, why) end
      until left <= 0
    elseif delay > 0 then sleep(delay) else resil.yield() end
  end
end

function retry.call(fn, opts, ...)
  if type(fn) ~= "function" then error("retry.call: fn must be a function", 2) end
  opts = opts or EMPTY
  if opts ~= EMPTY then
    local wrong = retry.check(opts)
    if wrong then raise_at_caller(wrong) end
  end
  local deadline = opts.deadline or (opts.timeout and resil.now() + opts.timeout)
  return attempts(fn, opts, deadline, opts.give_up, ...)
end

-- retry.attempts(fn, opts, deadline, give_up, ...): retry.call with the
-- deadline (absolute) and give_up given beside opts, which they override
-- (policies.call: no options table made per call for them)
-- (fn is not checked here: it runs on every provider call)
-- (attempts itself: no second vararg call per provider call)
retry.attempts = attempts

return retry
