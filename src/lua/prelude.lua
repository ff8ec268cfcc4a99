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

-- (inside the script's own coroutine.wrap: the join's error named "[resil prelude]:40:", a line of
-- the host's, and resil.map had spawned its workers)
local task_running, isyieldable = resil.running, coroutine.isyieldable
local function in_task(what)
  if not (task_running() and isyieldable()) then
    error(what .. " must be called from a task (resil.spawn), not from a plain coroutine, a metamethod or a C callback", 3)
  end
end

local function timeout_result(seconds, child, ok, ...)
  if ok == nil then
    child:cancel()
    return nil, resil.error("timeout", ("timed out after %g s"):format(seconds), { timeout = seconds })
  end
  if ok == false then error((...), 0) end
  return ...
end

function resil.timeout(seconds, fn, ...)
  if type(seconds) ~= "number" or not (seconds >= 0) then -- (NaN: no deadline at all, before)
    error(("resil.timeout: seconds must be a number >= 0, got %s"):format(tostring(seconds)), 2)
  end
  if type(fn) ~= "function" then error("resil.timeout: fn must be a function", 2) end
  in_task("resil.timeout")
  local child = resil.spawn(fn, ...)
  local _ <close> = setmetatable({ child }, child_guard_mt) -- if we are canceled, so is the child
  return timeout_result(seconds, child, child:join(seconds))
end

-- What the progress line adds to the count: the cost this process has
-- recorded, its retries by class, and the breakers that are not closed.
-- Read from the modules that keep them (loaded after this one).
local function progress_situation()
  local parts = {}
  local costs, runs, limits = package.loaded["resil.costs"], package.loaded["resil.runs"],
    package.loaded["resil.limits"]
  if type(costs) == "table" then parts[#parts + 1] = ("$%.4f"):format(costs.spent()) end
  local retries = type(runs) == "table" and runs.retries()
  if retries and retries.total > 0 then
    local classes = {}
    for class, n in pairs(retries.by_class) do classes[#classes + 1] = { class, n } end
    table.sort(classes, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] < b[1]) end)
    local shown = {}
    for i = 1, math.min(#classes, 3) do shown[i] = classes[i][1] .. " " .. classes[i][2] end
    parts[#parts + 1] = ("%d retr%s (%s%s)"):format(retries.total, retries.total == 1 and "y" or "ies",
      table.concat(shown, ", "), #classes > 3 and ", ..." or "")
  end
  local open = type(limits) == "table" and limits.breakers_not_closed() or {}
  if #open > 0 then
    local shown = {}
    for i = 1, math.min(#open, 3) do shown[i] = open[i].name .. " " .. open[i].state:gsub("_", "-") end
    parts[#parts + 1] = "breaker " .. table.concat(shown, ", ") .. (#open > 3 and ", ..." or "")
  end
  return resil.redact(table.concat(parts, ", "))
end

-- resil.map's progress on stderr: on a terminal one line redrawn (at most
-- ten times a second, cleared to its end); elsewhere (a log file, CI) a
-- plain line at each tenth of the items and at the end.
local function progress_reporter(label, total, tty)
  local last, last_tenth, last_done, width_drawn = -1, 0, -1, 0
  return function(done, failed, final)
    local line
    if tty then
      local now = resil.clock.wall()
      if not final and now - last < 0.1 then return end
      last = now
      local width = 30
      local filled = total > 0 and math.floor(width * done / total) or width
      line = ("%s [%s%s] %d/%d"):format(label, ("#"):rep(filled), ("."):rep(width - filled), done, total)
    else
      if done == last_done then return end -- the end, already written at its last tenth
      local tenth = total > 0 and math.floor(10 * done / total) or 10
      if not final and tenth <= last_tenth then return end
      last_tenth, last_done = tenth, done
      line = ("%s: %d/%d"):format(label, done, total)
    end
    if failed > 0 then line = line .. (", %d failed"):format(failed) end
    local situation = progress_situation()
    if situation ~= "" then line = line .. ", " .. situation end
    if tty then
      -- redraw over the last line; pad when the new one is shorter
      io.stderr:write("\r", line, (" "):rep(math.max(width_drawn - #line, 0)), final and "\n" or "")
      width_drawn = #line
    else
      io.stderr:write(line, "\n")
    end
    io.stderr:flush()
  end
end

-- an item's fn that raised nil (error() with no value) was counted a success, its result nil:
-- its failure says where it was raised
local function nil_raised(e)
  if e ~= nil then return e end
  for level = 2, 40 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.currentline > 0 then
      return ("%s:%d: raised nil (error() with no value)"):format(info.short_src, info.currentline)
    end
  end
  return "raised nil (error() with no value)"
end

-- resil.map(items, fn, {concurrency=32, progress="label", key=fn(item, i)}) -> results, failures
-- results[i] is fn(items[i], i); failures is nil, or {[i] = err} for the
-- items whose fn raised or returned nil, err. Order follows items. key: what
-- names an item in a run (default: the item itself; see resil.run.item).
function resil.map(items, fn, opts)
  if type(items) ~= "table" then error("resil.map: items must be a table", 2) end
  if type(fn) ~= "function" then error("resil.map: fn must be a function", 2) end
  opts = opts or {}
  if opts.key ~= nil and type(opts.key) ~= "function" then error("resil.map: key must be a function", 2) end
  local n = #items
  local concurrency = opts.concurrency or 32
  if type(concurrency) ~= "number" or not (concurrency >= 1) then -- (NaN: every item skipped, unsaid)
    error(("resil.map: concurrency must be a number >= 1, got %s"):format(tostring(concurrency)), 2)
  end
  in_task("resil.map")
  concurrency = math.min(math.floor(concurrency), math.max(n, 1))
  local progress = opts.progress and progress_reporter(tostring(opts.progress), n, resil.isatty(2))
  local results, failures = {}, nil
  local next_index, done, failed = 0, 0, 0
  local parent_scope = resil.context()._step_scope
  -- (the map's place among the maps in its scope: each map's items have scopes of their own)
  local scope_prefix = resil.run and resil.run.map_scope(parent_scope) or (parent_scope and parent_scope .. "/" or "")

  local function worker()
    while next_index < n do
      next_index = next_index + 1
      local i = next_index
      -- steps inside an item are checkpointed under the item (resil.step)
      local scope = scope_prefix .. i
      resil.context({ item = i, _step_scope = scope })
      if resil.run then resil.run.item(scope, items[i], i, opts.key) end -- (its steps' records name the item)
      local ok, value, err = xpcall(fn, nil_raised, items[i], i)
      if resil.run then resil.run.item(scope, nil) end
      -- the run lost to another process, or diverged, or a step's result not checkpointed (stops_run):
      -- the script must stop, not carry on past the map
      if not ok and resil.is_error(value) and (value.kind == "run_held" or value.kind == "divergence" or
          value.stops_run == true) then
        error(value, 0)
      end
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
  for w = 1, concurrency do
    local ok, err = workers[w]:join()
    if not ok then
      -- the run lost or diverged: the others are canceled as this returns; those that met it too
      -- are joined here, so that it is said once, not again as each one's unjoined failure
      for o = 1, concurrency do
        if workers[o]:status() == "failed" then workers[o]:join() end
      end
      error(err, 0)
    end
  end
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

-- resil.reload() (C, src/reload.c): re-load the policy modules still required
-- (roots, below) into a fresh set and swap it in only when all load; one no
-- longer required is unloaded. Modules are required afresh,
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

-- What a policy starts as it loads belongs to that version of it: the tasks
-- (resil.spawn, resil.background), breaker listeners (br:on) and metric
-- collectors (resil.metrics.collect) its own code makes while a policies.*
-- module loads are ended when a reload replaces that module's version, or
-- when the load fails: a refresher or a listener made at load ran once more
-- per reload, each copy holding its old version, never collected. Tasks get
-- a normal cancel (their <close> handlers run); calls already running on the
-- old version are not touched. So are the tasks such a task starts (and
-- theirs): a refresher's per-round workers ran on beside each later version's.
-- Not owned: what the host's own modules start on a policy's behalf (a
-- store's sweeper, the trace poster), what a request or the main script
-- starts, and what resil.keep's init starts (kept, as its table is).
-- Servers (resil.server.listen, at load or from a task the version owns, the
-- policy's own call or a host module's on its behalf: resil.metrics.serve)
-- are the version's too: see owned_listen below.
local owners = {}       -- module name -> the record of its version loaded now
local pending           -- during a reload: module name -> the record of its new version
local loading, loading_co -- the record of the module loading now (the innermost) and its coroutine
local weak_keys = { __mode = "k" }
local spawn, background, running = resil.spawn, resil.background, resil.running
local owned_by = setmetatable({}, weak_keys) -- task -> the record of the version that owns it
local keeping = setmetatable({}, weak_keys)  -- coroutine -> true while it runs a resil.keep init
local serving = setmetatable({}, weak_keys)  -- server -> the record of the version it serves now

-- the function `level` levels above the caller is the host's own modules' (not the policies')
local function host_code(level)
  local info = debug.getinfo(level + 2, "S")
  return not info or info.source:sub(1, 7) == "=[resil"
end

-- the function `level` levels above the caller is the policies' code, running as one loads
-- -> the record of that load | nil
local function loading_record(level)
  if not loading or loading_co ~= coroutine.running() then return nil end
  if host_code(level + 1) then return nil end
  return loading
end

-- -> the record of the version whose task runs now (one it started at load, or their own
-- tasks'), unless it was replaced already (a task its cancel's <close> starts is nobody's)
local function task_record()
  local t = running()
  local rec = t and owned_by[t]
  if rec and not rec.retired and not keeping[coroutine.running()] then return rec end
  return nil
end

-- own(level, drop): drop() (a listener taken off) runs when the version loading now is replaced
local function own(level, drop)
  local rec = loading_record(level + 1)
  if rec then rec.drops[#rec.drops + 1] = drop end
end

local function cancel_all(tasks)
  for i = 1, #tasks do pcall(tasks[i].cancel, tasks[i]) end
end

-- a server of a version that ended: it stops accepting at once (its address is the new
-- version's now, or free), answers what it was answering (its old handler), then closes, its
-- idle keep-alive connections with it (their clients' next request opens a new one)
local sleep = resil.sleep
local function busy(s) return s:pending() > 0 or s:unsent() > 0 end
local function drain(servers)
  for _, s in ipairs(servers) do
    while select(2, pcall(busy, s)) == true do sleep(0.05) end -- (a policy may close it meanwhile)
    s:close()
  end
end
local function retire_servers(rec, entries)
  local draining = {}
  for _, entry in ipairs(entries) do
    local s = entry.server
    if serving[s] ~= rec then -- a later version serves on it
    elseif entry.handler_before and not rec.live then -- a failed load's: the version before's again
      pcall(s.set_handler, s, entry.handler_before)
      serving[s] = entry.serving_before
    elseif pcall(s.stop_accepting, s) then -- (not if the policy closed it itself)
      if busy(s) then draining[#draining + 1] = s else s:close() end
    end
  end
  if #draining > 0 then pcall(background, drain, draining) end
end

-- a version's end: its listeners go now (nothing of the policy's runs), its tasks are canceled
-- in a task of their own, after the reload (their <close> handlers are the policy's code: not
-- under the reload's caps, nor able to fail it)
local function retire(rec)
  if not rec then return end
  local drops, tasks, servers = rec.drops, {}, rec.servers
  for t in pairs(rec.tasks) do tasks[#tasks + 1] = t end
  rec.drops, rec.tasks, rec.collectors, rec.servers, rec.retired = {}, {}, {}, {}, true
  for i = 1, #drops do pcall(drops[i]) end
  retire_servers(rec, servers)
  if #tasks > 0 then pcall(spawn, cancel_all, tasks) end
end

-- rec becomes module name's version: the one before ends (what it handed over to rec, its
-- servers, stays rec's), and rec forgets the version before (else each kept its own before)
-- A server still draining (its kept-alive connections busy) follows the one that took its address
-- over: each later version's handler is handed on to it too. Before, it kept the handler of the
-- version that replaced it while its clients kept it busy: under steady keep-alive traffic, with
-- a setting changed at each reload, a client was answered by v3 after v11 was in.
local followers = setmetatable({}, weak_keys) -- server -> {draining server -> true}
local function install(name, rec)
  for _, entry in ipairs(rec.servers) do
    local s, from = entry.server, entry.shared_from
    if from then
      pcall(from.set_handler, from, entry.handler)
      -- (its followers follow s now: the set is weak, and from, once closed, may be collected)
      local mine = followers[s] or setmetatable({}, weak_keys)
      mine[from] = true
      for f in pairs(followers[from] or {}) do mine[f] = true end
      followers[s] = mine
    end
    for f in pairs(followers[s] or {}) do
      if type(entry.handler) == "function" then pcall(f.set_handler, f, entry.handler) end
    end
    entry.handler_before, entry.serving_before, entry.shared_from = nil, nil, nil
  end
  retire(owners[name])
  owners[name], rec.live, rec.took = rec, true, {}
end

-- (fn checked here, at the caller's line: the C's own check named this file's)
local function check_fn(name, ...)
  local fn = ...
  if type(fn) ~= "function" then
    error(("bad argument #1 to '%s' (function expected, got %s)"):format(name,
      select("#", ...) == 0 and "no value" or type(fn)), 3)
  end
end

-- resil.spawn, resil.background: a task started as a policy loads is its version's
local function owning(name, start)
  return function(...)
    check_fn(name, ...)
    local t = start(...)
    local rec = loading and loading_record(1)
    if not rec and next(owned_by) ~= nil then
      rec = task_record()
      if rec and host_code(1) then rec = nil end -- (resil.timeout's, resil.map's: ended with their caller)
    end
    if rec then rec.tasks[t], owned_by[t] = true, rec end
    return t
  end
end
resil.spawn, resil.background = owning("spawn", spawn), owning("background", background)

-- resil.server.listen as a version loads (or from a task it owns): the server is the version's,
-- closed when the version ends (retire_servers). A reload's new version that listens where the
-- version it replaces listened (the same host and port as given, port 0 included; its nth such
-- call meets the old one's nth) serves on that server: the requests read from then on run the
-- new handler (kept-alive connections' too), those under way finish on the old one, and no
-- connection is refused or closed. With other settings (tasks, max_body, ...) it is a server of
-- its own on the same listening socket (shared, never closed), the old server answering what it
-- was answering, then closing. A failed reload gives the old version its server back as it was.
-- Before, each reload's listen opened one more socket (port 0), or got address_in_use, the first
-- version's server (its old handler) serving on for good.
local listen = resil.server.listen
-- the servers that stopped accepting (server:stop_accepting: a drain begun): no version takes one
-- over, its listening socket closed (the new version's listen returned it, and nothing accepted)
local not_accepting = setmetatable({}, weak_keys)
do
  local methods = debug.getregistry()["resil.Server"].__index
  local stop_accepting = methods.stop_accepting
  methods.stop_accepting = function(s, ...)
    not_accepting[s] = true
    return stop_accepting(s, ...)
  end
end
local SETTINGS = { "tasks", "reuseport", "max_headers", "max_body", "read_timeout", "utf8" }
local function address_of(o)
  local port = o.port or 0
  return ("%s %s"):format(tostring(o.host or "127.0.0.1"), tostring(math.tointeger(tonumber(port)) or port))
end
local function owned_listen(opts)
  local rec = loading and loading_co == coroutine.running() and loading or task_record()
  if not rec or type(opts) ~= "table" then return listen(opts) end
  local address, settings = address_of(opts), {}
  for i, k in ipairs(SETTINGS) do settings[i] = opts[k] end
  local before -- the version before's server there
  local old = loading == rec and owners[rec.name]
  if old and old ~= rec then
    for _, entry in ipairs(old.servers) do
      if entry.address == address and not rec.took[entry] then
        rec.took[entry], before = true, entry
        break
      end
    end
  end
  -- a fixed address another file's version listened on, that file reloaded now (the server moved
  -- from a.lua to b.lua: before, b's listen got address_in_use at every reload while a's old
  -- server held the port); port 0 asks for any port, not that one
  if not before and pending and loading == rec and not tostring(address):match(" 0$") then
    for name, prev in pairs(owners) do
      if name ~= rec.name and pending[name] then
        for _, entry in ipairs(prev.servers) do
          if entry.address == address and serving[entry.server] == prev then before, old = entry, prev break end
        end
      end
      if before then break end
    end
  end
  -- (its server taken over by another file's new version in this reload: the address is that one's)
  if before and serving[before.server] ~= old then before = nil end
  local s, err, handler_before
  if before and serving[before.server] == old and not not_accepting[before.server] and
      type(opts.handler) == "function" then
    local same = true
    for i = 1, #SETTINGS do same = same and before.settings[i] == settings[i] end
    if same then
      local ok, h = pcall(before.server.set_handler, before.server, opts.handler)
      if ok then s, handler_before = before.server, h end
    end
  end
  if not s then
    -- (`from`: the version before's server, or none, whatever opts says)
    s, err = listen(setmetatable({ from = before and before.server or false }, { __index = opts }))
  end
  if s then
    -- (shared from: once this version is in, the old server's kept-alive connections run this
    -- handler too, if both run handlers as tasks or both not)
    local shared_from = s ~= (before and before.server) and before and before.settings[1] == settings[1] and
      before.server or nil
    rec.servers[#rec.servers + 1] = { address = address, server = s, settings = settings, handler = opts.handler,
                                      handler_before = handler_before, serving_before = serving[s],
                                      shared_from = shared_from }
    serving[s] = rec
  end
  return s, err
end
resil.server.listen = owned_listen

-- A policies.* module's loader runs with its own record; the record is the
-- version's once the loader returns (a reload's, once the whole set loads).
local loading_mt = {
  __close = function(g, err)
    loading, loading_co = g.prev, g.prev_co
    if err ~= nil then retire(g.rec) end
  end,
}
-- (the chunks of the policy files, by their loader: a call straight from one defines the host's
-- resil_* metrics under the sandbox, metrics.lua; a script's own loadfile of one is not there)
local private = debug.getregistry()["resil.private"]
private.policy_chunks = setmetatable({}, weak_keys)
-- A text for the operator's terminal (the CLI's tables: runs, costs, keys list): its control
-- characters, C0, DEL and C1 (UTF-8's U+0080..U+009F: a CSI acts as ESC [), as \xNN and \u00NN,
-- and Unicode's bidirectional controls (private.bidi_escaped)
function private.printable(s)
  return private.bidi_escaped((s:gsub("[%c\127]", function(c) return ("\\x%02x"):format(c:byte()) end)
    :gsub("\194([\128-\159])", function(c) return ("\\u%04x"):format(c:byte()) end)))
end
-- Unicode's bidirectional controls as \u202e: the embeddings and overrides U+202A..U+202E, the
-- isolates U+2066..U+2069, LRM, RLM and ALM reorder the rest of a line where they are shown (a
-- provider's error, a step's name: text backwards, columns out of place, "Trojan Source")
function private.bidi_escaped(s)
  if not s:find("[\216\226]") then return s end
  return (s:gsub("\226\128([\142\143\170-\174])", function(c) return ("\\u20%02x"):format(c:byte() - 128) end)
    :gsub("\226\129([\166-\169])", function(c) return ("\\u20%02x"):format(c:byte() - 128 + 64) end)
    :gsub("\216\156", "\\u061c"))
end
-- Text made UTF-8, each byte that is not as U+FFFD, for what a reader refuses whole over one bad
-- byte: a Prometheus scrape (resil.metrics), an OTLP batch of 256 spans (resil.trace)
-- (resil.json.utf8: one check in C, src/utf8.c)
private.valid_utf8 = resil.json.utf8
local CAPABILITY = { ["policies.ai"] = "ai_cache", ["policies.registry"] = "migrations",
  ["policies.gateway"] = "gateway_limits" }
-- Who requires each policy module, for a reload to load again only what is still required. A
-- module loaded from outside every policy's load (by a script, the host, a task, a resil.keep
-- init), or viewed with resil.policy, is a root, for good; one a policy requires as it loads is
-- that version's dependency. A reload loaded every module ever loaded: one no policy required any
-- more (its `require` line removed, its file deleted too) was loaded again at each reload, its
-- servers, tasks and rules on until a restart. (A script's own `require` of a module loaded
-- already is not seen: the table it holds is the version of then, as after any reload.)
local roots = {} -- module name -> true
local reloading_name -- the module a reload requires now, itself (its own require is no script's)
local function note_required(name)
  if type(name) ~= "string" or not name:find("^policies%.") then return end
  if loading and loading_co == coroutine.running() then loading.deps[name] = true
  elseif name ~= reloading_name then roots[name] = true end
end
private.note_required = note_required -- (the sandbox's require, which gives a loaded module itself)
local function owning_loader(loader)
  private.policy_chunks[loader] = true
  return function(name, ...)
    local rec = { name = name, tasks = setmetatable({}, weak_keys), drops = {}, collectors = {}, servers = {},
                  took = {}, deps = {} }
    note_required(name)
    -- (a reload's from the start: one a cap stops runs no <close>, and C's restore ends them all)
    if pending then pending[name] = rec end
    local _ <close> = setmetatable({ prev = loading, prev_co = loading_co, rec = rec }, loading_mt)
    loading, loading_co = rec, coroutine.running()
    -- (policies.ai gets the host's way to its cache's reserved keys, policies.registry to its
    -- migrations': a script's require gives the module's table, never its chunk, so the capability
    -- stays the policy's upvalue)
    -- Every policy chunk gets the host's metric constructors (and scrape) as its fourth argument:
    -- resil.metrics and require are the scripts', and one that ran first handed the policies fakes
    -- (or views) for resil_calls_total, the gateway's: they were never defined, the alerts blind.
    if private.policy_env and debug.getupvalue(loader, 1) == "_ENV" then debug.setupvalue(loader, 1, private.policy_env) end
    local mod = loader(name, (...), private[CAPABILITY[name]], private.metrics)
    if not pending then install(name, rec) end -- loaded on first use (or again, its package.loaded entry cleared)
    return mod
  end
end
-- require("resil.if_reload_fails")(fn): fn runs if the reload under way fails, after the set is
-- put back (in the reverse order of the calls): state kept across versions that a module's load
-- changes (ai.configure's providers, in one table for every version) goes back with the set,
-- or the old version served on with a failed version's settings. Outside a reload: nothing.
local undo_if_failed -- during a reload: those fns, in order
package.loaded["resil.if_reload_fails"] = function(fn)
  if undo_if_failed and type(fn) == "function" then undo_if_failed[#undo_if_failed + 1] = fn end
end

-- require("resil.next_versions_have")(name, { "fn", ... }): a reload whose new version of policies
-- module `name` lacks one of these functions fails, naming the file, and the version before serves
-- on: what calls into the version loaded now (the gateway's server: gateway.handle) found a copy
-- saved without it (`return {}`, an edit that dropped it) reloaded "ok", and every request after
-- it was a 500 "attempt to call a nil value". Kept for the process.
local next_versions_have = {} -- module name -> the function names its versions must have
package.loaded["resil.next_versions_have"] = function(name, fns)
  if type(name) == "string" and type(fns) == "table" then next_versions_have[name] = fns end
end
-- -> the function module `name`'s new version `mod` lacks, of those | nil
local function lacks(name, mod)
  for _, fn in ipairs(next_versions_have[name] or {}) do
    if type(mod) ~= "table" or type(rawget(mod, fn)) ~= "function" then return fn end
  end
end

-- require("resil.edit_distance")(a, b) -> the edits (a byte put in, taken out or changed) from a
-- to b: what "did you mean" takes the closest name by (resil.bucket's options, a registry's fields)
package.loaded["resil.edit_distance"] = function(a, b)
  if #a > #b then a, b = b, a end
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a:byte(i) == b:byte(j) and 0 or 1))
    end
    prev = cur
  end
  return prev[#b]
end

-- require("resil.as_version")(name, fn, ...) -> fn's results: what fn starts is the version of
-- policies module `name` loaded now's, as if it ran at its load (the gateway's config: run at
-- start by gateway.serve, again at each reload as policies.gateway loads)
local restore_mt = { __close = function(g) loading, loading_co = g.prev, g.prev_co end }
package.loaded["resil.as_version"] = function(name, fn, ...)
  local _ <close> = setmetatable({ prev = loading, prev_co = loading_co }, restore_mt)
  loading, loading_co = owners[name], owners[name] and coroutine.running()
  return fn(...)
end

-- during a reload: module name -> { loader, where } that module_exists found, for the reload's
-- require of it (each file was compiled twice per reload, to see that it exists and again to
-- load it: half the time a SIGHUP held the loop, every request with it)
local found
for i, searcher in ipairs(package.searchers) do
  package.searchers[i] = function(name, ...)
    local f = found and found[name]
    if f then
      found[name] = nil
      return f[1], f[2]
    end
    -- (through pcall: an error a C searcher raises names its caller's line, "[resil prelude]:N:")
    local ok, loader, where = pcall(searcher, name, ...)
    if not ok then error(loader, 0) end
    if type(loader) == "function" and type(name) == "string" and name:match("^policies%.") then
      return owning_loader(loader), where
    end
    return loader, where
  end
end

local replaced -- the set a reload in progress took out of package.loaded

-- Both series exported from the start at 0: a series born at 1 (the first
-- reload that fails) has no increase() in Prometheus, and the alert on it
-- (ResilReloadFailing) stayed quiet for a process's first broken save.
local reloads_total -- (made with both series once resil.metrics is loaded, below)
local function count_reload(result) reloads_total:inc({ result = result }) end

-- failed: true when C calls it, after a cap or a signal stopped the reload
-- (its own Lua could not count the failure then)
local function restore_policies(failed)
  local old = replaced
  replaced = nil -- (first: a restore cut short must not leave each later reload refused as under way)
  -- what the failed set started ends; the old version's runs on (a cap or a signal that stopped
  -- a load left no <close> of its to put back the one loading)
  local started, undo = pending or {}, undo_if_failed or {}
  pending, loading, loading_co, undo_if_failed, found, reloading_name = nil, nil, nil, nil, nil, nil
  for _, rec in pairs(started) do retire(rec) end
  for i = #undo, 1, -1 do
    local ok, err = pcall(undo[i])
    if not ok then log.error("policy reload: putting back what the failed reload changed failed", { error = tostring(err) }) end
  end
  if failed == true then count_reload("failed") end
  if not old then return end
  for _, n in ipairs(policy_names()) do package.loaded[n] = nil end
  for n, mod in pairs(old) do package.loaded[n] = mod end
end

-- the file a module comes from, for messages
local function module_file(name)
  for _, searcher in ipairs(package.searchers) do
    local loader, where = searcher(name)
    if type(loader) == "function" then return where end
  end
  return name
end

-- whether any searcher finds a module (one that finds a file it cannot
-- compile does: that is the reload's error to report)
local function module_exists(name)
  for _, searcher in ipairs(package.searchers) do
    local ok, loader, where = pcall(searcher, name)
    if not ok then return true end
    if type(loader) == "function" then
      if found then found[name] = { loader, where } end -- (the reload's require takes it)
      return true
    end
  end
  return false
end

-- A load error as the reload reports it: one that names no position (a
-- table raised, error(msg, 0)) gets the file:line it was raised at, in the
-- first policy file on the stack, or the log said "reload: table: 0x..."
-- and nothing of which file broke the reload. (xpcall's handler: level 1 is
-- itself)
-- A message that starts with the file it is about names its place: the gateway's config that ran
-- out of memory (src/main.c's run_config: no line is known, and the module that ran it,
-- policies.gateway, is not the file that allocated), a registry file of the wrong shape
-- ("pol/models.lua: registry keys must be model names, not 1": policies.registry raised it, and
-- its line came first, as if the shipped file had broken the reload)
local function names_its_file(err) return err:find("^[^%s:]+%.lua: ") ~= nil end
local function load_error(err)
  local ok, text = pcall(tostring, err)
  if not ok then text = "(error object is a " .. type(err) .. " value)" end
  -- (a plain table raised, error({code = 7}): its fields, as the command reports a script's, not
  -- "table: 0x55d0c2df800"; one JSON cannot hold keeps that)
  if type(err) == "table" and getmetatable(err) == nil then
    local encoded, json = pcall(resil.json.encode, err)
    if encoded then text = json end
  end
  if type(err) == "string" and (err:find(":%d+: ") or names_its_file(err)) then return text end
  -- an error that says all a user needs (traceback = false, as a task's failure reads it), kept
  -- as it is: the gateway's refusal of its config names the config; the position of the raise, or
  -- the module's file, was the shipped policies/gateway.lua's, logged first as if it had broken
  if type(err) == "table" and rawget(err, "traceback") == false then return err end
  for level = 2, 64 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.source:sub(1, 1) == "@" and info.currentline > 0 then
      return ("%s:%d: %s"):format(info.short_src, info.currentline, text)
    end
  end
  return text
end

-- a module a reload loads, checked: -> true, mod | false, message
local function checked(name, ok, mod)
  -- one that returned nothing or a number would fail every call that uses it (a save cut
  -- before its `return M` is valid Lua); a function is Lua's own idiom, and a file required
  -- for what it does as it loads (classify rules) returns nothing from the start: require took
  -- both, and refused here they failed every reload after, whatever file had changed
  if ok and type(mod) ~= "table" and type(mod) ~= "function" and not (mod == true and replaced[name] == true) then
    ok, mod = false, ("%s: %s returned %s, not a table or a function"):format(module_file(name), name,
      mod == true and "nothing" or type(mod))
  elseif ok and lacks(name, mod) then
    ok, mod = false, ("%s: %s has no function '%s' (the version loaded calls it, as it serves)"):format(
      module_file(name), name, lacks(name, mod))
  elseif not ok and type(mod) == "string" and not mod:find(":%d+: ") and not names_its_file(mod) then
    -- no handler runs for a memory error: "not enough memory" named none of the files
    mod = ("%s: %s"):format(module_file(name), mod)
  end
  return ok, mod
end

local function reload_policies()
  -- a policy that asks for a reload as it loads: the one under way loads the new versions
  -- already (run inside it, the nested one took its record of the old set, and a file broken
  -- after it was left unloaded, not the old version kept)
  if replaced then return false, "reload: a reload is under way (resil.reload called as policies load)" end
  local names = policy_names()
  replaced, pending, undo_if_failed, found = {}, {}, {}, {}
  local gone = {}
  for _, name in ipairs(names) do
    replaced[name] = package.loaded[name]
    package.loaded[name] = nil
    -- A module whose file was deleted (no longer used, or not saved back
    -- yet) keeps its loaded version: failing on it failed every reload
    -- after, until a restart. One that still requires it gets that version.
    if not module_exists(name) then
      gone[name] = true
      local kept_version = replaced[name]
      found[name] = { function() return kept_version end, "(its loaded version)" }
    end
  end
  -- Loaded again: the roots, and what a version kept (its file gone) required; the modules
  -- those require come with them. One none of them requires now is unloaded.
  local wanted = {}
  local function want(name)
    if wanted[name] or replaced[name] == nil then return end
    wanted[name] = true
    if gone[name] and owners[name] then for dep in pairs(owners[name].deps) do want(dep) end end
  end
  for _, name in ipairs(names) do if roots[name] then want(name) end end
  for pass = 1, 2 do
    for _, name in ipairs(names) do
      local ok, mod
      if pass == 1 and wanted[name] then
        reloading_name = name
        ok, mod = xpcall(require, load_error, name)
        reloading_name = nil
      elseif pass == 2 and not wanted[name] and package.loaded[name] ~= nil then ok, mod = true, package.loaded[name]
      end
      if ok ~= nil then ok, mod = checked(name, ok, mod) end
      if ok == false then
        restore_policies()
        local message = ("reload: %s"):format(tostring(mod))
        log.error("policy reload failed; the old version keeps serving", { error = message })
        count_reload("failed")
        return false, message
      end
    end
  end
  local kept, unloaded = {}, {}
  for _, name in ipairs(names) do
    if package.loaded[name] == nil then
      unloaded[#unloaded + 1] = name
    elseif gone[name] then
      kept[#kept + 1] = name
    end
  end
  replaced, found = nil, nil
  if #kept > 0 then
    log.warn("policy reload: these modules' files are gone; their loaded versions are kept", { modules = kept })
  end
  -- each module loaded again replaces its version, and ends what that version started; one
  -- unloaded ends with its version
  local started = pending
  pending, undo_if_failed = nil, nil
  for name, rec in pairs(started) do install(name, rec) end
  for _, name in ipairs(unloaded) do
    retire(owners[name])
    owners[name] = nil
  end
  names = policy_names()
  log.info("policies reloaded", { modules = names, unloaded = #unloaded > 0 and unloaded or nil })
  count_reload("ok")
  return true, names
end

resil.set_reload_steps(reload_policies, restore_policies)
resil.set_reload_steps = nil
-- (C's load_capped, for `resil-lua check`: kept out of the public API)
package.loaded["resil.load_capped"] = resil.load_capped
resil.load_capped = nil

-- resil.keep(name, init) -> a table that lives as long as the host, so a
-- policy's own state (a retry budget, a canary's counts) survives reloads.
-- What init starts (a task, a listener, a server) is kept as the table is:
-- not the loading policy version's (nor, run from a task a version owns, that
-- version's), ended at the next reload.
local kept = {}
local keep_mt = { __close = function(g) loading, loading_co, keeping[g.co] = g.prev, g.prev_co, g.keeping end }
function resil.keep(name, init)
  -- (a nil name, or a default table given for init, raised at a line of the host's)
  if not (type(name) == "string" or type(name) == "number" and name == name) then
    error(("resil.keep: name must be a string, got %s"):format(type(name) == "number" and "NaN" or type(name)), 2)
  end
  if init ~= nil and type(init) ~= "function" then
    error(("resil.keep: init must be a function that returns the table to keep, got %s"):format(type(init)), 2)
  end
  local t = kept[name]
  if t == nil then
    if init then
      local co = coroutine.running()
      local _ <close> = setmetatable({ prev = loading, prev_co = loading_co, co = co, keeping = keeping[co] },
        keep_mt)
      loading, loading_co, keeping[co] = nil, nil, true
      t = init()
    end
    t = t or {}
    kept[name] = t
  end
  return t
end

-- resil.policy(name) -> a view of policies.<name> that always reads the
-- version loaded now, so new calls use a reloaded policy while calls that
-- already started finish on the old one.
function resil.policy(name)
  if type(name) ~= "string" then -- (it raised "attempt to concatenate" at a line of the host's)
    error(("resil.policy: name must be a string (policies.<name>), got %s"):format(type(name)), 2)
  end
  local modname = "policies." .. name
  note_required(modname)
  -- a policy not found or broken is the caller's line, not this one (it said "[resil prelude]:NNN:")
  local ok, err = pcall(require, modname)
  if not ok then error(err, 2) end
  -- (every access goes to the version loaded now: pairs and # over the empty view gave nothing,
  -- and a field set on it shadowed that field of every later version)
  -- Under the sandbox the version's tables are read only to a script (sandbox_env's policy views)
  local view = private.policy_view
  if view then
    return setmetatable({}, {
      __index = function(_, k) return view(require(modname), modname)[k] end,
      __newindex = function(_, k) error(private.policy_read_only(("policies.%s.%s"):format(name, tostring(k))), 2) end,
      __pairs = function() return pairs(view(require(modname), modname)) end,
      __len = function() return #require(modname) end,
      __call = function(_, ...) return require(modname)(...) end,
      __tostring = function() return "policy " .. name end,
    })
  end
  return setmetatable({}, {
    __index = function(_, k) return require(modname)[k] end,
    __newindex = function(_, k, v) require(modname)[k] = v end,
    __pairs = function() return pairs(require(modname)) end,
    __len = function() return #require(modname) end,
    __call = function(_, ...) return require(modname)(...) end,
    __tostring = function() return "policy " .. name end,
  })
end

-- each of these adds its part of the API to resil
resil.metrics = require "resil.metrics"
-- a collector a policy adds as it loads runs while that version is the one loaded
do
  local collect = resil.metrics.collect
  function resil.metrics.collect(fn)
    local rec = type(fn) == "function" and loading and loading_record(1)
    if not rec then return collect(fn) end
    rec.collectors[#rec.collectors + 1] = fn
  end
  collect(function()
    for _, rec in pairs(owners) do
      for _, fn in ipairs(rec.collectors) do
        local ok, err = pcall(fn)
        if not ok then resil.log.warn("metrics: a collector failed", { error = tostring(err) }) end
      end
    end
  end)
end
reloads_total = resil.metrics.counter("resil_reloads_total", "Policy reloads, by result")
reloads_total:inc({ result = "ok" }, 0)
reloads_total:inc({ result = "failed" }, 0)
resil.mock = require "resil.mock"
resil.own_at_load = own -- (for limits' br:on)
for _, name in ipairs({ "store", "once", "runs", "costs", "budgets", "limits", "trace" }) do require("resil." .. name) end
resil.own_at_load = nil
-- A named limit is one object for every version, and a load that names it with options sets
-- them: a reload that failed left the broken set's (a budget cut to $1, a rate to 1/s) on the
-- version the log said keeps serving. The options each name was last given are kept, and a
-- reload that fails gives the names its files gave options to the ones before, as it puts
-- the set back. (Recorded before the constructor runs, which it calls as a tail call: its
-- errors name the caller's line, as they did.)
do
  local given = {}
  local function undoable(kind, ctor)
    local last = given[kind] or {} -- (a budget's two constructors: one object by its name)
    given[kind] = last
    return function(name, opts, ...)
      if type(opts) == "table" and name ~= nil then
        local before = last[name]
        last[name] = opts -- (the table itself: the gateway names a key's budget so per request)
        if undo_if_failed then
          undo_if_failed[#undo_if_failed + 1] = function()
            last[name] = before
            if before then ctor(name, before) end
          end
        end
      end
      return ctor(name, opts, ...)
    end
  end
  resil.bucket = undoable("bucket", resil.bucket)
  resil.breaker = undoable("breaker", resil.breaker)
  -- (the C constructor's own argument errors named the wrapper, "bad argument #2 to 'ctor'", at
  -- this file's line: said here, at the caller's, as they were)
  local semaphore = undoable("semaphore", resil.semaphore)
  resil.semaphore = function(name, opts, ...)
    if type(name) ~= "string" and type(name) ~= "number" then
      error(("bad argument #1 to 'semaphore' (string expected, got %s)"):format(type(name)), 2)
    elseif opts ~= nil and type(opts) ~= "table" then
      error(("bad argument #2 to 'semaphore' (table expected, got %s)"):format(type(opts)), 2)
    end
    return semaphore(name, opts, ...)
  end
  resil.budget = undoable("budget", resil.budget)
  private.host_budget = undoable("budget", private.host_budget)
end
-- the gateway's keys' budgets ("key:NAME") and buckets ("gateway:<key id>:rpm"...), names reserved
-- for the host under the sandbox: policies.gateway's chunk gets the constructors themselves
private.gateway_limits = { budget = private.host_budget, bucket = resil.bucket, semaphore = resil.semaphore }

-- The sandbox (resil_options.sandbox, --sandbox): the global environment of
-- scripts and policies is this allow-list, not the host's own (the host's
-- modules keep theirs, so they still open files and load C code). C calls
-- resil.sandbox_env once with a canonical(path) helper, the folders io.open
-- may use, and the policy folders (readable, and where require looks), and
-- makes the result the globals table.
local function refused(name)
  return function()
    error(("%s is not allowed in the sandbox (resil_options.sandbox, --sandbox)"):format(name), 2)
  end
end

-- a library table of allowed functions; the named others raise when called
local function library(lib, prefix, allowed, denied)
  local t = {}
  for _, k in ipairs(allowed) do t[k] = lib[k] end
  for _, k in ipairs(denied) do t[k] = refused(prefix .. k) end
  return t
end

-- a table whose every field is refused by name (debug, package's C loading)
local function refusing(prefix, t)
  return setmetatable(t or {}, {
    __index = function(_, k) error(("%s%s is not allowed in the sandbox (resil_options.sandbox, --sandbox)")
      :format(prefix, tostring(k)), 2) end,
  })
end

function resil.sandbox_env(canonical, dirs, policy_dirs)
  -- (what the host's modules refuse a sandboxed script, the store's reserved keys among them,
  -- asks the private table, which no script reaches)
  debug.getregistry()["resil.private"].sandbox = true
  local env = {}
  local check_file = resil.sqlite.check_file -- (the script's resil table may change it)
  for _, k in ipairs({ "assert", "error", "ipairs", "next", "pairs", "pcall", "print", "rawequal", "rawget",
    "rawlen", "rawset", "select", "setmetatable", "getmetatable", "tonumber", "tostring", "type", "xpcall",
    "_VERSION", "warn" }) do
    env[k] = _G[k]
  end
  env.collectgarbage = function(opt, ...)
    if opt == nil or opt == "collect" or opt == "count" or opt == "step" or opt == "isrunning" then
      return collectgarbage(opt, ...)
    end
    error(("collectgarbage(%q) is not allowed in the sandbox"):format(tostring(opt)), 2)
  end
  for _, lib in ipairs({ "string", "table", "math", "utf8", "coroutine" }) do
    local copy = {}
    for k, v in pairs(_G[lib]) do copy[k] = v end
    env[lib] = copy
  end
  -- Strings' metatable is one per state, its __index the string table the host's modules call
  -- too: a script that replaced string.format there ran in the host's own code (its metrics
  -- writer opened, truncated and moved away a file outside every folder). A script sees a
  -- view of it, its __index the script's own string table, read only.
  local strings_mt = setmetatable({}, {
    __index = { __index = env.string },
    __newindex = function() error("strings' metatable cannot be changed in the sandbox", 2) end,
    __metatable = false,
  })
  -- Nor are the methods of the host's objects: its C objects' (every bucket's, breaker's,
  -- semaphore's, task's: a script that replaced a local bucket's try there let every bucket of
  -- its process through; no script makes userdata of its own), and those of the metatables the
  -- host's modules name in private.host_metatables (shared buckets and breakers: outside the
  -- sandbox, specs make a second process's object with getmetatable).
  local private = debug.getregistry()["resil.private"]
  private.host_metatables = private.host_metatables or {}
  local host_mts = private.host_metatables -- (the host's modules that load later add theirs)
  host_mts[debug.getmetatable(strings_mt)] = true
  -- Nor through an object's own fields: each of the host's Lua classes is its own __index
  -- (Budget.__index = Budget), so `budget.__index` was the methods table every budget shares,
  -- writable (a script's `b.__index.reserve = f` let every budget of its process through, the
  -- gateway keys' too; `m.__index.inc`, every metric, the host's). Under the sandbox such a class's
  -- objects look their methods up in a copy without the metamethods: `obj.__index` is nil, and no
  -- script holds the copy. (A class a module registers later gets the same as it is registered.)
  local function methods_apart(mt)
    if rawget(mt, "__index") ~= mt then return end
    local methods = {}
    for k, v in pairs(mt) do
      if not (type(k) == "string" and k:sub(1, 2) == "__") then methods[k] = v end
    end
    mt.__index = methods
  end
  for mt in pairs(host_mts) do methods_apart(mt) end
  setmetatable(host_mts, { __newindex = function(t, mt, v)
    rawset(t, mt, v)
    if type(mt) == "table" then methods_apart(mt) end
  end })
  env.getmetatable = function(v)
    if type(v) == "string" then return strings_mt end
    if type(v) == "userdata" then return false end
    local mt = getmetatable(v)
    if host_mts[mt] then return false end
    return mt
  end
  env.setmetatable = function(t, mt)
    if type(t) == "table" and host_mts[getmetatable(t)] then
      error("setmetatable: the host's objects cannot be changed in the sandbox", 2)
    end
    return setmetatable(t, mt)
  end
  -- The host's objects (a store, a budget, a ticket, a module's view: their metatables are in
  -- host_mts too, hidden) refuse new fields; rawset went past that (a store's get set on the
  -- object every caller shares). By the object's own metatable: a script's table that hides
  -- its metatable (a read-only table it fills with rawset) is the script's.
  local real_metatable = debug.getmetatable
  env.rawset = function(t, k, v)
    if host_mts[real_metatable(t)] then
      error(("rawset: the host's objects cannot be changed in the sandbox (%s)"):format(tostring(k)), 2)
    end
    return rawset(t, k, v)
  end
  -- A bucket is every caller's by its name (a shared one every process's on the store): those
  -- under "gateway:" are the gateway's keys' (rpm, tpm, count_rpm), and a script drained a key's
  -- rate. The gateway makes them through private.gateway_limits.
  local bucket = private.gateway_limits.bucket
  resil.bucket = function(name, opts)
    if type(name) == "string" and name:sub(1, 8) == "gateway:" then
      error(("resil.bucket: bucket %q is the gateway's (names under \"gateway:\" are reserved in the sandbox:"
        .. " resil_options.sandbox, --sandbox)"):format(name), 2)
    end
    return bucket(name, opts)
  end
  -- So are the semaphores under "gateway:" (the gateway's permits: gateway:total, gateway:key:<key id>):
  -- a script released permits it never took (release only checks in_use > 0) and let more than
  -- max_concurrent in, or held them all. resil.semaphores() lists the others.
  local semaphore, semaphores = private.gateway_limits.semaphore, resil.semaphores
  resil.semaphore = function(name, ...)
    if type(name) == "string" and name:sub(1, 8) == "gateway:" then
      error(("resil.semaphore: semaphore %q is the gateway's (names under \"gateway:\" are reserved in the"
        .. " sandbox: resil_options.sandbox, --sandbox)"):format(name), 2)
    end
    return semaphore(name, ...)
  end
  resil.semaphores = function()
    local list = semaphores()
    for name in pairs(list) do
      if type(name) == "string" and name:sub(1, 8) == "gateway:" then list[name] = nil end
    end
    return list
  end
  env.os = library(os, "os.", { "clock", "date", "difftime", "getenv", "time" },
    { "execute", "exit", "remove", "rename", "tmpname", "setlocale" })
  env.debug = refusing("debug.", { traceback = debug.traceback })

  -- files: only under the configured folders (the policy folders: read only)
  local function under(path, list)
    for _, dir in ipairs(list) do
      if path == dir or path:sub(1, #dir + 1) == dir .. "/" then return true end
    end
    return false
  end
  local function check_path(fname, path, mode)
    if type(path) ~= "string" then error(("bad argument #1 to '%s' (string expected)"):format(fname), 3) end
    local full = canonical(path)
    local reading = mode == nil or mode == "r" or mode == "rb"
    -- (never the host's own store: the ledger; nor read as bytes, every key it keeps from a script)
    check_file(path, fname, 3, (reading and "read" or nil))
    -- (a policy folder inside an allowed one, --sandbox-dir . with ./policies, is read only all the same:
    -- a file a script wrote there was required as a policy, with the policies' own state, resil.keep of
    -- "policies.ai.config" (every provider's URL and key) among it)
    if full and not reading and under(full, policy_dirs) then
      error(("%s(%q) is not allowed in the sandbox: the policy folders are read only to a script (what is"
        .. " there is loaded as a policy)"):format(fname, path), 3)
    end
    if full and (under(full, dirs) or (reading and under(full, policy_dirs))) then return end
    error(("%s(%q) is not allowed in the sandbox: outside the folders it may use (--sandbox-dir DIR, or " ..
      "resil_options.sandbox_dirs when embedding)")
      :format(fname, path), 3)
  end
  env.io = library(io, "io.", { "write", "read", "type", "stdout", "stderr", "stdin" },
    { "popen", "tmpfile", "input", "output" })
  env.io.open = function(path, mode)
    check_path("io.open", path, mode)
    return io.open(path, mode)
  end
  env.io.lines = function(path, ...)
    if path == nil then return io.lines() end
    check_path("io.lines", path, "r")
    return io.lines(path, ...)
  end

  -- code: text only, in this environment
  local function text_only(fname, chunk)
    if type(chunk) == "string" and chunk:byte(1) == 27 then
      error(("%s: binary chunks are not allowed in the sandbox"):format(fname), 3)
    end
  end
  env.load = function(chunk, name, mode, chunk_env)
    text_only("load", chunk)
    if mode ~= nil and mode ~= "t" then error("load: binary chunks are not allowed in the sandbox", 2) end
    if chunk_env == nil then chunk_env = env end
    return load(chunk, name, "t", chunk_env)
  end
  env.loadfile = function(path, mode, chunk_env)
    if path == nil then error("loadfile from stdin is not allowed in the sandbox", 2) end
    check_path("loadfile", path, "r")
    if mode ~= nil and mode ~= "t" then error("loadfile: binary chunks are not allowed in the sandbox", 2) end
    return loadfile(path, "t", chunk_env == nil and env or chunk_env)
  end
  env.dofile = function(path)
    if path == nil then error("dofile from stdin is not allowed in the sandbox", 2) end
    check_path("dofile", path, "r")
    local f = assert(loadfile(path, "t", env))
    return f()
  end

  -- require: resil, the policy library, and modules in the policy folders
  local own = { string = env.string, table = env.table, math = env.math, utf8 = env.utf8,
    coroutine = env.coroutine, os = env.os, io = env.io, _G = env }
  local search = {}
  for _, dir in ipairs(policy_dirs) do search[#search + 1] = dir .. "/?.lua" end
  search = table.concat(search, ";")
  -- the host's own tools, which write files wherever they are told (the
  -- command line's, run by the operator, never sandboxed)
  -- (and the watchdog's unwatched(fn): a script's loop under it was never stopped)
  -- (and `resil-lua budgets`' own functions: a script set any budget's limit in force, a gateway
  -- key's among them, and released others' holds)
  -- (and the C primitives the host's modules are built on, resil.core.*: a view of
  -- resil.core.breaker still gave its methods table, every local breaker's, and a script that set
  -- methods.allow let every breaker of its process through, an isolated one too)
  local HOST_ONLY = setmetatable({ ["resil.report"] = true, ["resil.commands"] = true, ["resil.check"] = true,
    ["resil.budgets"] = true }, {
    __index = function(_, name) return type(name) == "string" and name:match("^resil%.core%.") ~= nil end,
  })
  -- A policy module's tables (require "policies.pricing", its `models` and every table in them) are
  -- read-only views to a script: the policies call what their own and each other's tables hold when
  -- they run (pricing.cost, ai.chat for the gateway, classify's rules), and a script that set a
  -- price to 0 or replaced ai.chat had every caller of its process billed at 0 (a gateway key's
  -- budget never spent) or served by its function (every client's prompt). The policies get the
  -- tables themselves (policy_env's require, below); a script changes them in a policy file of
  -- its own. One metatable for every view, the table viewed in a weak side table: nothing per view
  -- kept after it and its table are gone (a reload's old versions are collected).
  local viewed, view_name = setmetatable({}, { __mode = "k" }), setmetatable({}, { __mode = "k" })
  local policy_views = setmetatable({}, { __mode = "k" })
  local policy_view_mt = {}
  local VIEW_MARK = {} -- (resil.json.encode's, below)
  local function policy_view(t, name)
    local v = policy_views[t]
    if not v then
      v = setmetatable({ [VIEW_MARK] = false }, policy_view_mt)
      viewed[v], view_name[v], policy_views[t] = t, name, v
    end
    return v
  end
  local function field_name(v, k)
    if type(k) == "string" and k:match("^[%a_][%w_]*$") then return view_name[v] .. "." .. k end
    return ("%s[%s]"):format(view_name[v], type(k) == "string" and ("%q"):format(k) or tostring(k))
  end
  -- Some of the policies' functions return their state itself: pricing.price the price table's
  -- entry, ai.targets each target's provider conf (its URL, every caller's) and adapter, ai's
  -- provider_module a provider's module. To a script, what they return is a view too.
  local RETURNS_STATE = { ["policies.pricing"] = { price = true }, ["policies.pricing_media"] = { price = true },
    ["policies.ai"] = { targets = true, deployment_conf = true, provider_module = true } }
  local getters_of = setmetatable({}, { __mode = "k" }) -- module table -> its RETURNS_STATE entry
  local returning_views = setmetatable({}, { __mode = "k" })
  local function viewed_results(name, ...)
    local r = table.pack(...)
    for i = 1, r.n do
      if type(r[i]) == "table" and not host_mts[real_metatable(r[i])] then r[i] = policy_view(r[i], name) end
    end
    return table.unpack(r, 1, r.n)
  end
  -- (a table of the host's, a store or a budget the policy holds, or a view, is given as it is)
  local function viewed_value(v, k, x)
    local kind = type(x)
    if kind == "table" and not host_mts[real_metatable(x)] then return policy_view(x, field_name(v, k)) end
    if kind == "function" then
      local getters = getters_of[viewed[v]]
      if getters and getters[k] then
        local f = returning_views[x]
        if not f then
          local name = field_name(v, k) .. "(...)"
          f = function(...) return viewed_results(name, x(...)) end
          returning_views[x] = f
        end
        return f
      end
    end
    return x
  end
  policy_view_mt.__index = function(v, k) return viewed_value(v, k, viewed[v][k]) end
  local function read_only(field)
    return ("%s cannot be set in the sandbox: the policies' tables are read only to a script (set it in a policy"
      .. " file of your own, in the policy folders, which a reload runs again)"):format(field)
  end
  policy_view_mt.__newindex = function(v, k) error(read_only(field_name(v, k)), 2) end
  policy_view_mt.__pairs = function(v)
    local t = viewed[v]
    return function(_, k)
      local nk, x = next(t, k)
      return nk, viewed_value(v, nk, x)
    end, v, nil
  end
  policy_view_mt.__len = function(v) return #viewed[v] end
  policy_view_mt.__call = function(v, ...) return viewed[v](...) end
  policy_view_mt.__tostring = function(v) return view_name[v] end
  policy_view_mt.__metatable = false
  host_mts[policy_view_mt] = true
  -- (resil.policy(name)'s view reads through this too)
  private.policy_view = function(mod, name)
    if type(mod) ~= "table" then return mod end
    -- (by the module's table, not by the view's name: a module first reached as another's field)
    if RETURNS_STATE[name] then getters_of[mod] = RETURNS_STATE[name] end
    return policy_view(mod, name)
  end
  private.policy_read_only = read_only
  private.policy_viewed = function(v) return viewed[v] end -- (resil_call: is a view's table callable)
  -- The policies' state kept across reloads (resil.keep("policies.gateway.kept"): the gateway's
  -- config in force, its auth; "policies.ai.config": each provider's URL and key) is theirs the
  -- same way: a name under "policies." (and the two older names the shipped policies keep) is
  -- given to a policy file's chunk only, as it loads (private.policy_chunks; not through a tail
  -- call, which hides who called). A script that asked first would have made the policy's state
  -- its own table.
  local keep = resil.keep
  local POLICIES_KEPT = { ["retry.budgets"] = true, ["limit.releasers"] = true }
  resil.keep = function(name, init)
    if type(name) == "string" and (name:sub(1, 9) == "policies." or POLICIES_KEPT[name]) and
      (debug.getinfo(1, "t").istailcall or not private.policy_chunks[debug.getinfo(2, "f").func]) then
      error(("resil.keep: %q is the policies' state (names under \"policies.\" are reserved in the sandbox:"
        .. " resil_options.sandbox, --sandbox)"):format(name), 2)
    end
    return keep(name, init)
  end
  -- A host module's table (require "resil.owner", "resil.keys", ...) is a read-only view: the
  -- host's own modules call what is in it when they run (a script that replaced
  -- resil.owner.verdict had its process's store take a live process's once keys over and run
  -- their paid calls again; resil.keys.lookup is the gateway's). The resil table is not one:
  -- the host's modules took what they call from it at load.
  local views = setmetatable({}, { __mode = "k" })
  local function view_of(name, mod)
    if type(mod) ~= "table" or name == "resil" or not name:match("^resil%.") then return mod end
    -- (one the resil table holds, resil.metrics, resil.mock, resil.trace, is the script's there:
    -- `require("resil.metrics").max_series = n`, which README's resil.metrics.max_series is, raised)
    if rawget(resil, name:sub(7)) == mod then return mod end
    local v = views[mod]
    if not v then
      local mt = {
        __index = mod,
        __newindex = function(_, k)
          error(("%s.%s cannot be set in the sandbox: the host's module"):format(name, tostring(k)), 2)
        end,
        __pairs = function() return next, mod, nil end,
        __len = function() return #mod end,
        __metatable = false,
      }
      v, host_mts[mt] = setmetatable({}, mt), true
      views[mod] = v
    end
    return v
  end
  -- (a script's require gives a policy module as a read-only view, a policy's the module itself)
  local function script_view(name, mod)
    if name:match("^policies%.") then return private.policy_view(mod, name) end
    return view_of(name, mod)
  end
  local function require_with(view)
    return function(name)
      if type(name) ~= "string" then error("bad argument #1 to 'require' (string expected)", 2) end
      if own[name] then return own[name] end
      if HOST_ONLY[name] then
        error(("require %q is not allowed in the sandbox: a tool of the host's"):format(name), 2)
      end
      if name == "resil" or name:match("^resil%.") or name:match("^policies%.") then
        private.note_required(name)
        local loaded = package.loaded[name]
        if loaded ~= nil then return view(name, loaded) end
        -- require says "module ... not found" at its caller's line: this function's ("[resil
        -- prelude]:N"), where the script's or the policy's was meant (under xpcall, a C function's:
        -- none), given here; the module's own errors (a syntax error, a raise at load) name their
        -- file:line already and go on as they came
        local not_found
        local function where_not_found(e)
          if type(e) == "string" and e:find("^module '[^']*' not found:") then not_found = e end
          return e
        end
        local results = table.pack(xpcall(require, where_not_found, name))
        if results[1] then return view(name, table.unpack(results, 2, results.n)) end
        if not_found then error(not_found, 2) end
        error(results[2], 0)
      end
      local loaded = package.loaded[name]
      local path = package.searchpath(name, search)
      if path then
        if loaded ~= nil then return loaded end
        local chunk, err = loadfile(path, "t", env)
        if not chunk then error(err, 2) end
        local mod = chunk(name, path)
        if mod == nil then mod = true end
        package.loaded[name] = mod
        return mod, path
      end
      error(("require %q is not allowed in the sandbox: only resil, resil.* and modules in the policy folders"):format(name), 2)
    end
  end
  env.require = require_with(script_view)
  -- package.loaded: what require may give (the policy library reads its
  -- own current version there after a reload), read only
  local function visible(name)
    return type(name) == "string" and not HOST_ONLY[name] and (name == "resil" or name:match("^resil%.")
      or name:match("^policies%.") or package.searchpath(name, search) ~= nil)
  end
  local function loaded_with(view)
    return setmetatable({}, {
      __index = function(_, name)
        if own[name] then return own[name] end
        if visible(name) then return view(name, package.loaded[name]) end
        return nil
      end,
      __newindex = function(_, name)
        error(("package.loaded[%q] cannot be set in the sandbox"):format(tostring(name)), 2)
      end,
    })
  end
  local loaded_view = loaded_with(script_view)
  env.package = refusing("package.", { path = search, config = package.config, loaded = loaded_view })
  env.package.loadlib = refused("package.loadlib")
  env._G = env
  -- The policy chunks' own globals (owning_loader): the scripts' are theirs to change, and a gateway
  -- config that replaced `require` handed policies.gateway, at the next reload, a resil.keys of its
  -- making (any bearer let in). Policies get this allow-list as it is now, in tables no script
  -- reaches (the libraries copied too: string.format, table.concat); what a policy sets is the
  -- policies' own. Plain tables: a global's lookup costs what it did.
  local policy_env = {}
  for k, v in pairs(env) do policy_env[k] = v end
  for _, lib in ipairs({ "string", "table", "math", "utf8", "coroutine", "os", "io" }) do
    local copy = {}
    for k, v in pairs(env[lib]) do copy[k] = v end
    policy_env[lib] = copy
  end
  policy_env.debug = refusing("debug.", { traceback = debug.traceback })
  -- Nor is the resil table theirs: the policies look its functions up at each call
  -- (resil.http.request in policies.call, resil.now, resil.spawn), and a script that replaced
  -- resil.http.request was handed every provider request of its process, the API key in its
  -- headers, the gateway's clients' too. A policy's require "resil" gives a table of its own: the
  -- functions (and userdata, resil.json.null) as they are now, in copies of the plain sub-tables
  -- (resil.http, resil.json, resil.log, ...); anything else, and what the host adds later, is read
  -- through from the resil table. Plain tables: a lookup costs what it did.
  local function functions_of(t)
    local copy = {}
    for k, v in pairs(t) do
      local kind = type(v)
      if kind == "function" or kind == "userdata" then copy[k] = v end
    end
    return setmetatable(copy, { __index = t })
  end
  local policy_resil = functions_of(resil)
  for k, v in pairs(resil) do
    if type(v) == "table" and getmetatable(v) == nil then policy_resil[k] = functions_of(v) end
  end
  policy_resil.sandbox_env = nil -- (taken off resil by C once this returns)
  -- The gateway's Idempotency-Key answers are resil.once records under "gateway:<key id>:<key>", the
  -- host's as the store's gateway: keys are: a script's resil.once of such a key, the fingerprint its
  -- own, planted the answer a gateway client's request with that key was served (every process's on
  -- the store), and its resil.once_replay read a client's. The policies' resil (above) keeps the
  -- functions themselves; a tail call here, so that once's own argument errors name the script's line.
  -- (the key read once: once reads it again from what it is handed, a table whose __index said another
  -- key the second time; the spec handed on holds the key checked)
  local function checked_once_spec(fname, spec)
    local key = type(spec) == "table" and spec.key or spec
    if type(key) == "string" and key:sub(1, 8) == "gateway:" then
      error(("%s: key %q is the gateway's (once keys under \"gateway:\" are reserved in the sandbox:"
        .. " resil_options.sandbox, --sandbox)"):format(fname, key), 3)
    end
    if type(spec) ~= "table" then return spec end
    return setmetatable({ key = key }, { __index = spec })
  end
  -- A script's server shares no port (reuseport): the kernel spread a gateway's connections (gateway
  -- --workers N listens with SO_REUSEPORT) to a script that listened there too, and its handler was
  -- handed a share of the gateway's clients, their bearer keys and prompts. The gateway's own listen
  -- is the policies' resil's; reuseport is set false here, whatever opts's __index says next.
  -- (and resil.metrics.serve, which listens with the host's listen: its 404s took a share of a gateway's
  -- requests; in a gateway's worker its reuseport is on unless said otherwise; its options may be nil)
  local function without_reuseport(fname, fn, nil_ok)
    return function(opts, ...)
      if type(opts) ~= "table" and not (nil_ok and opts == nil) then return fn(opts, ...) end
      if opts and opts.reuseport then
        error(fname .. ": reuseport is not allowed in the sandbox (a port shared with another process:"
          .. " a gateway's --workers; resil_options.sandbox, --sandbox)", 2)
      end
      return fn(setmetatable({ reuseport = false }, { __index = opts }), ...)
    end
  end
  resil.server.listen = without_reuseport("resil.server.listen", resil.server.listen)
  resil.metrics.serve = without_reuseport("resil.metrics.serve", resil.metrics.serve, true)
  local once, once_replay = resil.once, resil.once_replay
  resil.once = function(spec, ...)
    return once(checked_once_spec("resil.once", spec), ...)
  end
  resil.once_replay = function(spec, ...)
    return once_replay(checked_once_spec("resil.once_replay", spec), ...)
  end
  -- A view holds nothing itself, and cjson reads tables raw: a script's resil.json.encode of a
  -- policy's table (or of its own table holding one) wrote {} without a word. Each view holds one
  -- key cjson refuses (VIEW_MARK, a table: "table key must be a number or string"), so the encode
  -- fails; the scripts' encode (not the policies', just copied) then hands cjson the tables viewed
  -- instead: a walk of the value's tables, and a copy only of those that hold a view. A value
  -- without a view costs a pcall more, not a walk.
  local json_encode = resil.json.encode
  -- Each table once (seen): a table that holds another twice, nested, is walked once per table, not
  -- once per path (a cycle held twice, t[1], t[2] = t, t, was 2^100 paths: a script's encode of it,
  -- or a log line's fields holding it, never returned, where cjson says "excessive nesting").
  local function unviewed(x, depth, seen)
    local t = viewed[x]
    if t then return t end
    if depth > 100 then return x end -- (cjson's own depth error, or its cycle's, comes after)
    seen = seen or {}
    if seen[x] then return seen[x] end
    seen[x] = x -- (as it is while it is walked: a cycle back to it is cjson's to refuse)
    local copy
    for k, v in next, x do
      if type(v) == "table" then
        local u = unviewed(v, depth + 1, seen)
        if u ~= v then
          if not copy then
            copy = setmetatable({}, real_metatable(x)) -- (json.array_mt's arrays stay arrays)
            for k2, v2 in next, x do rawset(copy, k2, v2) end
          end
          rawset(copy, k, u)
        end
      end
    end
    seen[x] = copy or x
    return copy or x
  end
  local function encoded(ok, ...)
    if ok then return ... end
    return nil, ...
  end
  resil.json.encode = function(v, ...)
    local s, err = encoded(pcall(json_encode, v, ...))
    if s ~= nil then return s end
    local plain = type(v) == "table" and unviewed(v, 0) or v
    if plain == v then error(err, 0) end -- (its own error, as cjson says it: no view in it)
    return json_encode(plain, ...)
  end
  -- (a log line's fields are read raw too: a view in them was written as its key for cjson)
  for _, level in ipairs({ "debug", "info", "warn", "error" }) do
    local log_at = resil.log[level]
    resil.log[level] = function(msg, fields)
      -- (its argument errors at the caller's line, as the C function's are)
      if type(msg) ~= "string" and type(msg) ~= "number" then
        error(("bad argument #1 to '%s' (string expected, got %s)"):format(level, type(msg)), 2)
      end
      if type(fields) == "table" then fields = unviewed(fields, 0)
      elseif fields ~= nil then
        error(("bad argument #2 to '%s' (table expected, got %s)"):format(level, type(fields)), 2)
      end
      return log_at(msg, fields)
    end
  end
  local function policy_side(name, mod)
    if name == "resil" then return policy_resil end
    return view_of(name, mod)
  end
  policy_env.require = require_with(policy_side)
  policy_env.package = refusing("package.", { path = search, config = package.config, loaded = loaded_with(policy_side),
    loadlib = env.package.loadlib })
  policy_env._G = policy_env
  private.policy_env = policy_env
  return env
end
