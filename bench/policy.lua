-- Overhead of the composed policy (policies.call) on a call that succeeds at
-- once, without I/O: fallback, retry (with its budget), breaker, bucket,
-- concurrency limit, classification and output validation around a no-op
-- function. Prints "policy N seconds calls_per_s us_per_call".
-- 2nd argument "deadline": adds a deadline (each attempt of a function
-- request then runs as a child task so that it can be cut).
-- 2nd argument "chat": the function returns a chat completion body and the
-- validator decodes its JSON (the cost of real validation, not of the policy).
local resil = require "resil"
local call = require "policies.call"

local n = tonumber(arg[1] or "200000")
local variant = arg[2] or "plain"
local body = '{"id":"c1","choices":[{"index":0,"message":{"role":"assistant","content":"hello"}}],' ..
             '"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
local headers = {}
local output = { text = "hello" }
local function noop() return output end
local function valid(out) return type(out.text) == "string" and out.text ~= "", "empty output" end
if variant == "chat" then noop = function() return { status = 200, headers = headers, body = body } end end

resil.log.level("warn")
local backup = call.provider("bench-backup", { retry = { max_retries = 0 } })
local p = call.provider("bench", {
  deadline = variant == "deadline" and 60 or nil,
  rate = { rate = 1e9, per = 1, burst = 1e9 },
  breaker = { failure_rate = 0.5, min_calls = 20, window = 30, open_for = 30 },
  concurrency = { size = 64, queue = 1000 },
  retry = { base = 0.5, cap = 20 },
  validate = variant == "chat" and "chat" or valid,
  fallback = { backup, placeholder = false },
})
for _ = 1, 1000 do assert(p(noop)) end -- warm up
local t0 = resil.clock.wall()
for _ = 1, n do
  local res = p(noop)
  if not res then error("a call failed") end
end
local s = resil.clock.wall() - t0
print(("policy %d %.3f %.0f %.3f"):format(n, s, n / s, s / n * 1e6))
