-- The Lua half of the host: what is clearer in Lua than in C, built only on
-- the C primitives. Compiled into the binary (src/blobs.c); runs once per
-- host, first of the embedded modules, and requires the others at its end.
local resil = ...
local http, log = resil.http, resil.log
local pack, unpack = table.pack, table.unpack

-- Cancel the given tasks when the enclosing scope closes: if the caller is
-- itself canceled (or times out), the work it started does not run on.
local function cancel_on_close(tasks)
  return setmetatable({}, {
    __close = function()
      for i = 1, #tasks do tasks[i]:cancel() end
    end,
  })
end

-- resil.timeout(seconds, fn, ...) -> fn's results | nil, err{kind="timeout"}
-- fn runs as a child task; on timeout it is canceled, which aborts its I/O.
-- (One small guard table per call and no packing of results: this sits
-- under every deadline of the policy library.)
local child_guard_mt = { __close = function(g) g[1]:cancel() end }

local function timeout_result(seconds, child, ok, ...)
  if ok == nil then
    child:cancel()
    return nil, resil.error("timeout", ("timed out after %g s"):format(seconds), { timeout = seconds })
  end
  if ok == false then error((...), 0) end
  return ...
end

function resil.timeout(seconds, fn, ...)
  if type(seconds) ~= "number" or seconds < 0 then
    error("resil.timeout: seconds must be a number >= 0", 2)
  end
  if type(fn) ~= "function" then error("resil.timeout: fn must be a function", 2) end
  local child = resil.spawn(fn, ...)
  local _ <close> = setmetatable({ child }, child_guard_mt) -- if we are canceled, so is the child
  return timeout_result(seconds, child, child:join(seconds))
end

local function progress_bar(label, total)
  local last = -1
  return function(done, failed, final)
    local now = resil.clock.wall()
    if not final and now - last < 0.1 then return end
    last = now
    local width = 30
    local filled = total > 0 and math.floor(width * done / total) or width
    io.stderr:write(("\r%s [%s%s] %d/%d%s"):format(label, ("#"):rep(filled), ("."):rep(width - filled),
      done, total, failed > 0 and (" (%d failed)"):format(failed) or ""))
    if final then io.stderr:write("\n") end
    io.stderr:flush()
  end
end

-- resil.map(items, fn, {concurrency=32, progress="label"}) -> results, failures
-- results[i] is fn(items[i], i); failures is nil, or {[i] = err} for the
-- items whose fn raised or returned nil, err. Order follows items.
function resil.map(items, fn, opts)
  if type(items) ~= "table" then error("resil.map: items must be a table", 2) end
  if type(fn) ~= "function" then error("resil.map: fn must be a function", 2) end
  opts = opts or {}
  local n = #items
  local concurrency = opts.concurrency or 32
  if type(concurrency) ~= "number" or concurrency < 1 then
    error("resil.map: concurrency must be a number >= 1", 2)
  end
  concurrency = math.min(math.floor(concurrency), math.max(n, 1))
  local progress = opts.progress and resil.isatty(2) and progress_bar(tostring(opts.progress), n)
  local results, failures = {}, nil
  local next_index, done, failed = 0, 0, 0
  local parent_scope = resil.context().step_scope

  local function worker()
    while next_index < n do
      next_index = next_index + 1
      local i = next_index
      -- steps inside an item are checkpointed under the item (resil.step)
      local scope = parent_scope and (parent_scope .. "/" .. i) or tostring(i)
      resil.context({ item = i, step_scope = scope })
      local ok, value, err = pcall(fn, items[i], i)
      if not ok then value, err = nil, value end
      if value == nil and err ~= nil then
        failures = failures or {}
        failures[i] = err
        failed = failed + 1
        if resil.run and resil.run.started() then resil.run.item_failed(scope, err) end
      else
        results[i] = value
      end
      done = done + 1
      if progress then progress(done, failed) end
    end
  end

  local workers = {}
  local guard <close> = cancel_on_close(workers)
  for w = 1, concurrency do workers[w] = resil.spawn(worker) end
  for w = 1, concurrency do workers[w]:join() end
  if progress then progress(done, failed, true) end
  return results, failures
end

-- The stream is given back when this returns, raises or its task is
-- canceled (<close>), not when the collector gets to it.
local function stream_request(req)
  local s <close>, err = http.stream(req)
  if not s then return nil, err end
  local on_event, on_chunk = req.on_event, req.on_chunk
  local body = {}
  if on_event then
    while true do -- events are framed in C (stream:read_event), one per call
      local ev, read_err = s:read_event()
      if ev == nil then
        if read_err then return nil, read_err end
        break
      end
      if on_event(ev) == false then break end
    end
  else
    while true do
      local chunk, read_err = s:read()
      if chunk == nil then
        if read_err then return nil, read_err end
        break
      end
      if on_chunk(chunk) == false then break end
      if req.keep_body then body[#body + 1] = chunk end
    end
  end
  local res = s.response
  res.body = table.concat(body)
  return res
end

-- resil.http.request{...} -> res | nil, err is C (json included); a request
-- with on_chunk = function(chunk) or on_event = function(sse_event) comes here
-- to read its stream. Either callback may return false to stop reading.
http.set_request_extras(stream_request)
http.set_request_extras = nil

-- resil.reload() (C, src/reload.c): re-load every loaded policy module into
-- a fresh set and swap it in only when all load. Modules are required afresh,
-- so a module that requires another gets the new version of it. Loading
-- never yields, so no task sees a half-swapped set; calls already running
-- finish on the old version. State that must outlive a reload belongs in
-- resil.keep or the named primitives (buckets, breakers, semaphores), which
-- are never reset. C runs reload_policies under the host's caps; when a cap
-- or a signal stops it midway (after that, none of its Lua can run), C calls
-- restore_policies itself.
local function policy_names()
  local names = {}
  for name in pairs(package.loaded) do
    if type(name) == "string" and name:match("^policies%.") then names[#names + 1] = name end
  end
  table.sort(names)
  return names
end

local replaced -- the set a reload in progress took out of package.loaded

local function restore_policies()
  if not replaced then return end
  for _, n in ipairs(policy_names()) do package.loaded[n] = nil end
  for n, mod in pairs(replaced) do package.loaded[n] = mod end
  replaced = nil
end

-- the file a module comes from, for messages
local function module_file(name)
  for _, searcher in ipairs(package.searchers) do
    local loader, where = searcher(name)
    if type(loader) == "function" then return where end
  end
  return name
end

local reloads_total
local function reload_policies()
  reloads_total = reloads_total or resil.metrics.counter("resil_reloads_total", "Policy reloads, by result")
  local names = policy_names()
  replaced = {}
  for _, name in ipairs(names) do
    replaced[name] = package.loaded[name]
    package.loaded[name] = nil
  end
  for _, name in ipairs(names) do
    local ok, mod = pcall(require, name)
    if ok and type(mod) ~= "table" then -- it would fail every call that uses it
      ok, mod = false, ("%s: %s returned %s, not a table"):format(module_file(name), name,
        mod == true and "nothing" or type(mod))
    end
    if not ok then
      restore_policies()
      local message = ("reload: %s"):format(tostring(mod))
      log.error("policy reload failed; the old version keeps serving", { error = message })
      reloads_total:inc({ result = "failed" })
      return false, message
    end
  end
  replaced = nil
  log.info("policies reloaded", { modules = names })
  reloads_total:inc({ result = "ok" })
  return true, names
end

resil.set_reload_steps(reload_policies, restore_policies)
resil.set_reload_steps = nil

-- resil.keep(name, init) -> a table that lives as long as the host, so a
-- policy's own state (a retry budget, a canary's counts) survives reloads.
local kept = {}
function resil.keep(name, init)
  local t = kept[name]
  if t == nil then
    t = init and init() or {}
    kept[name] = t
  end
  return t
end

-- resil.policy(name) -> a view of policies.<name> that always reads the
-- version loaded now, so new calls use a reloaded policy while calls that
-- already started finish on the old one.
function resil.policy(name)
  local modname = "policies." .. name
  require(modname)
  return setmetatable({}, {
    __index = function(_, k) return require(modname)[k] end,
    __call = function(_, ...) return require(modname)(...) end,
    __tostring = function() return "policy " .. name end,
  })
end

-- each of these adds its part of the API to resil
resil.metrics = require "resil.metrics"
resil.mock = require "resil.mock"
for _, name in ipairs({ "store", "once", "runs", "costs", "budgets", "limits", "trace" }) do require("resil." .. name) end
