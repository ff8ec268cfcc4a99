-- policies/limit.lua: a concurrency limit (bulkhead) per provider, so that a
-- slow provider cannot hold every task.
--
--   local res, err = limit.run("replicate", { size = 8, queue = 100, timeout = 30 }, fn, ...)
--
-- At most `size` calls run at once; up to `queue` more wait in FIFO order (for
-- at most `timeout` seconds); beyond that, nil, err{kind="bulkhead_full"}.
local resil = require "resil"

local limit = {}

-- one reusable to-be-closed releaser per semaphore: no allocation per call
local releasers = resil.keep("limit.releasers", function() return {} end)
local function releaser(sem)
  local r = releasers[sem]
  if r == nil then
    r = setmetatable({}, { __close = function() sem:release() end })
    releasers[sem] = r
  end
  return r
end

-- limit.get(name [, opts]) -> the semaphore behind a limit
function limit.get(name, opts)
  return resil.semaphore(name, opts)
end

-- limit.run(name, opts, fn, ...) -> fn's results | nil, err{kind="bulkhead_full"}
-- (options that cannot be meant, size = 0/0 or timeout = -1, raise at the caller's line: they said
-- 'policies/limit.lua:30: semaphore ...', naming none of the caller's)
local function raise_here(err) -- (the position the primitive gave, this file's line, is dropped)
  if type(err) ~= "string" then error(err, 3) end
  err = err:gsub("^[^\n]-:%d+: ", "", 1)
  -- said at the first line outside this file (a limit.run inside the fn of another is this file's own)
  local here = debug.getinfo(1, "S").source
  for level = 3, 60 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.currentline > 0 and info.source ~= here and info.source:sub(1, 7) ~= "=[resil" then
      error(("%s:%d: %s"):format(info.short_src, info.currentline, err), 0)
    end
  end
  error(err, 0)
end
function limit.run(name, opts, fn, ...)
  if type(fn) ~= "function" then error("limit.run: fn must be a function", 2) end
  local made, sem = pcall(resil.semaphore, name, opts)
  if not made then raise_here(sem) end
  local called, ok, err = pcall(sem.acquire, sem, opts)
  if not called then raise_here(ok) end
  if not ok then return nil, err end
  local _ <close> = releaser(sem)
  return fn(...)
end

return limit
