-- Rate accuracy: one bucket at RATE/s (burst 1), WAITERS tasks each taking a
-- token at a time, for SECONDS of real time. Prints
-- "rate configured admitted_per_s error_percent".
local resil = require "resil"

local rate, waiters, seconds = tonumber(arg[1] or "200"), tonumber(arg[2] or "500"), tonumber(arg[3] or "10")
local b = resil.bucket("bench-rate", { rate = rate, per = 1, burst = 1 })
local first, last, admitted = nil, nil, 0
local stop = false
local tasks = {}
for i = 1, waiters do
  tasks[i] = resil.spawn(function()
    while not stop do
      b:acquire(1)
      if stop then return end
      local t = resil.clock.wall()
      first = first or t
      admitted = admitted + 1
      last = t
      if t - first >= seconds then stop = true end
    end
  end)
end
for i = 1, waiters do tasks[i]:join() end
-- the first admission opens the window; count the intervals after it
local measured = (admitted - 1) / (last - first)
print(("rate %g %.3f %.3f"):format(rate, measured, (measured - rate) / rate * 100))
