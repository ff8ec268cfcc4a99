-- Rate accuracy: one bucket at RATE/s (burst 1), WAITERS tasks each taking a
-- token at a time, for SECONDS of real time. With a store URL the bucket is
-- shared (its GCRA state in the store), and with GO (a wall-clock moment) the
-- process waits for it, so several processes share one window. Prints
-- "rate configured admitted_per_s error_percent admitted first last"
-- (first and last admission, wall-clock seconds).
local resil = require "resil"

local rate, waiters, seconds = tonumber(arg[1] or "200"), tonumber(arg[2] or "500"), tonumber(arg[3] or "10")
local url, go = arg[4] ~= "-" and arg[4] or nil, tonumber(arg[5] or "")
local b
if url then
  resil.log.level("error")
  resil.store_config({ url = url })
  b = resil.bucket(arg[6] or "bench-rate-shared", { rate = rate, per = 1, burst = 1, shared = true })
  -- connect and load the script before the window opens; its answer may be
  -- false when an earlier run's booked slots are still ahead
  b:try(0)
else
  b = resil.bucket("bench-rate", { rate = rate, per = 1, burst = 1 })
end
if go then while resil.clock.wall() < go do resil.sleep(0.002) end end
local first, last, admitted = nil, nil, 0
local stop = false
local tasks = {}
for i = 1, waiters do
  tasks[i] = resil.spawn(function()
    while not stop do
      assert(b:acquire(1))
      if stop then return end
      local t = resil.clock.wall()
      -- the window: SECONDS from GO or from the first admission; a process
      -- counts nothing after it (the slots other processes still hold are theirs)
      if t - (go or first or t) >= seconds then stop = true return end
      first = first or t
      admitted = admitted + 1
      last = t
    end
  end)
end
for i = 1, waiters do tasks[i]:join() end
-- the first admission opens the window; count the intervals after it
local measured = (admitted - 1) / (last - first)
print(("rate %g %.3f %.3f %d %.6f %.6f"):format(rate, measured, (measured - rate) / rate * 100, admitted, first, last))
