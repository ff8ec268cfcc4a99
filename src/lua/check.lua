-- `resil-lua check [files...]`: load policy files and the model registry
-- without running a pipeline, and say what is wrong with file:line.
--   - every file: syntax errors; a policy module (under a policies/ folder)
--     is also loaded as require would, so its load-time errors show
--   - a registry (a file named models.lua, and always the registry in effect):
--     shapes, alias cycles, unknown providers, fallbacks to unknown models,
--     models without a price, sunsets passed with no replacement,
--     migrations to unpinned targets
-- Exit status 1 on any error; 0 with the warnings printed. No files: the
-- policy folders' *.lua (--policies DIR's, then ./policies') and the registry in effect.
local resil = require "resil"
local load_capped = require "resil.load_capped" -- fn under a reload's memory cap (src/reload.c)

local function quoted(dir) -- (./-x: not an option)
  return "'" .. (dir:sub(1, 1) == "-" and "./" or "") .. dir:gsub("'", "'\\''") .. "'"
end
-- dir's *.lua, as require finds them (names NUL-separated: `ls dir/*.lua` listed a folder named
-- x.lua by its files, each "no such file", and split a name with a line break in it)
-- (each name after its type, a symlink's target's: a FIFO named x.lua was opened to be read, and
-- check waited for a writer for good; one is listed in not_files instead)
local not_files = {}
local function list_dir(dir)
  local p = io.popen(("find %s/ -mindepth 1 -maxdepth 1 -name '*.lua' ! -name '.*' -printf '%%Y%%f\\0' 2>/dev/null")
    :format(quoted(dir)))
  local out = {}
  if not p then return out end
  for entry in p:read("a"):gmatch("%Z+") do
    local path = dir .. "/" .. entry:sub(2)
    out[#out + 1] = path
    if entry:find("^[pscb]") then not_files[path] = true end
  end
  -- (a find that cannot list a folder that is there, one without GNU's -printf (busybox, BSD):
  -- read as an empty folder, a project's broken policies passed as "0 errors")
  if not p:close() and os.execute("test -d " .. quoted(dir)) then
    error(("check: cannot list %s: find failed (GNU find's -printf is needed)"):format(dir), 0)
  end
  table.sort(out)
  return out
end

-- a folder's device:inode (nil: none there): `--policies ./policies` is the project's folder itself
local function folder_id(dir)
  local p = io.popen(("find -H %s -maxdepth 0 -printf '%%D:%%i' 2>/dev/null"):format(quoted(dir)))
  if not p then return nil end
  local id = p:read("a")
  p:close()
  return id ~= "" and id or nil
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

-- the file require "policies.models" finds (the project's copy first)
-- -> path | nil | nil, message (a file found there that does not compile: the searcher raised,
-- which stopped the command with a traceback of its own)
local function registry_in_effect()
  for _, searcher in ipairs(package.searchers) do
    local ok, loader, where = pcall(searcher, "policies.models")
    if not ok then return nil, tostring(loader):match("\n%s*(.-)$") or tostring(loader) end
    if type(loader) == "function" and type(where) == "string" then return where end
  end
  return nil
end

-- a file that loops at load must not hang a pre-commit hook or a CI step:
-- its chunk runs under an instruction budget and fails with file:line
local BUDGET = 50000000
-- (the files' own debug.sethook is refused while check runs: one that cleared the budget and
-- looped hung check)
local sethook = debug.sethook
-- fn(...) in a coroutine of its own under the budget -> the coroutine, resume's results packed
local function capped(fn, ...)
  local co = coroutine.create(fn)
  sethook(co, function()
    sethook(co, function() error("ran more than " .. BUDGET .. " instructions at load (a loop?)", 2) end,
      "", 1) -- keeps firing, so a pcall inside cannot swallow it
    error("ran more than " .. BUDGET .. " instructions at load (a loop?)", 2)
  end, "", BUDGET)
  -- ...and allocations under the memory cap a reload has (one that doubled a string took
  -- the machine's memory before the instruction cap came)
  local r = table.pack(load_capped(coroutine.resume, co, ...))
  if r[1] then return co, table.pack(table.unpack(r, 2, r.n)) end
  return co, table.pack(false, r[2]) -- (the cap hit resume itself)
end
-- what a chunk raised, said with the file and line it raised at: an error that is not a string
-- (error({...})) or has no position (error("...", 0)) was printed as "table: 0x..." or bare
local function failure_at(co, path, e)
  if type(e) == "string" and e:find("^[^\n]-:%d+: ") then return e end
  local where = path
  for level = 0, 50 do
    local info = debug.getinfo(co, level, "Sl")
    if not info then break end
    if info.currentline and info.currentline > 0 then
      where = ("%s:%d"):format(info.short_src, info.currentline)
      break
    end
  end
  if type(e) == "string" or type(e) == "number" then return where .. ": " .. e end
  -- its __tostring is the policy's code too: under the same budget (one that looped hung check)
  local mt = getmetatable(e)
  if type(mt) == "table" and mt.__tostring then
    local co, r = capped(tostring, e)
    if r[1] and coroutine.status(co) == "dead" and type(r[2]) == "string" then return where .. ": " .. r[2] end
  end
  return ("%s: (error object is a %s value)"):format(where, type(e))
end
local function run_capped(path, chunk, ...)
  local co, r = capped(chunk, ...)
  if not r[1] then return false, failure_at(co, path, r[2]) end
  if coroutine.status(co) ~= "dead" then return false, failure_at(co, path, "it yielded at load") end
  return true, table.unpack(r, 2, r.n)
end

-- whether a searcher finds a file for a module (one it cannot compile included)
local function module_found(name)
  for _, searcher in ipairs(package.searchers) do
    local ok, loader = pcall(searcher, name)
    if not ok or type(loader) == "function" then return true end
  end
  return false
end

-- the file require would load a module from, or nil
local function module_file(name)
  for _, searcher in ipairs(package.searchers) do
    local ok, loader, where = pcall(searcher, name)
    if ok and type(loader) == "function" and type(where) == "string" then return where end
  end
end

-- require(name) under the budget: the modules check itself needs (the
-- registry's logic, a provider, the prices) are the project's code too, and
-- one that looped at load hung check -> true, module | false, message
local loaded_capped = {}
local function require_capped(name)
  local r = loaded_capped[name]
  if not r then
    r = table.pack(run_capped(name, require, name))
    if not r[1] then
      package.loaded[name] = nil -- a half-run loader left its sentinel
      -- a file that does not compile: said as the file's own check says it
      r[2] = tostring(r[2]):match("^[^\n]-error loading [^\n]*:\n%s*(.*)$") or r[2]
    end
    loaded_capped[name] = r
  end
  return r[1], r[2]
end

-- the registry's logic, whatever state the registry file in effect is in
local function registry_module()
  local saved = package.loaded["policies.models"]
  package.loaded["policies.models"] = {}
  local ok, reg = run_capped("policies.registry", require, "policies.registry")
  package.loaded["policies.models"] = saved
  package.loaded["policies.registry"] = nil -- a later require loads the real one
  if not ok then return nil, reg end
  return reg
end

-- what `resil-lua gateway` calls of policies.gateway: main (src/main.c) and handle (every version's
-- server); not stopping_reply, which a copy from before the gateway's drain lacks, and runs without
local GATEWAY_FUNCTIONS = { "main", "handle" }

-- os.exit while a file loads is that file's error: it ended check with the status the file gave
-- (0: a CI step passed, the files after it unchecked), as it would end a host that reloads it
local exit = os.exit
local function exit_at_load() error("os.exit at load (a reload of this file would end the process)", 2) end
local function sethook_at_load() error("debug.sethook at load (check runs each file under a budget)", 2) end

return function(args)
  os.exit, debug.sethook = exit_at_load, sethook_at_load
  local files, seen = {}, {}
  -- --policies DIR: the policy folder, as a pipeline's or gateway's (src/main.c has
  -- also made require find it first); its files are checked when none are named
  local dir = "policies"
  local i = 1
  while i <= #args do
    if args[i] == "--policies" and args[i + 1] then
      dir = (args[i + 1]:gsub("/+$", ""))
      i = i + 2
    elseif args[i]:sub(1, 1) == "-" then
      io.stderr:write(("resil-lua check: unknown option '%s' (usage: resil-lua check [--policies DIR] [files...])\n")
        :format(resil.redact(args[i]))) -- (--store=redis://:pw@host: its password)
      exit(1) -- (bad usage is 1 for every command, as the README says; it was 2)
    else
      files[#files + 1] = args[i]
      i = i + 1
    end
  end
  -- a file of the policy folder is the module require finds by its name
  local function module_of(path)
    local rest = path:sub(1, #dir + 1) == dir .. "/" and path:sub(#dir + 2) or path:match("policies/(.+)$")
    local name = rest and rest:match("^([^/]+)%.lua$") or rest and rest:match("^providers/([^/]+)%.lua$")
    if not name then return nil end
    return rest:match("^providers/") and "policies.providers." .. name or "policies." .. name
  end
  local problems, said = {}, {}
  local function add(level, message)
    if said[message] then return end -- (a module two others require fails once)
    said[message] = true
    problems[#problems + 1] = { level = level, message = message }
  end
  if #files == 0 then
    -- the folders require searches, in its order: --policies DIR, then ./policies (a pipeline or
    -- gateway run with --policies loads an override there that DIR lacks; check read DIR only,
    -- "0 errors", and the run failed on the broken ./policies file). A module in both is DIR's.
    local dirs = { dir }
    if dir ~= "policies" and folder_id(dir) ~= folder_id("policies") then dirs[2] = "policies" end
    local first = {}
    for _, d in ipairs(dirs) do
      -- a project's own provider adapters are policy files too (one broken was
      -- reported only as "unknown provider ... (no policies/providers/x.lua)")
      for _, sub in ipairs({ "", "/providers" }) do
        for _, f in ipairs(list_dir(d .. sub)) do
          local name = sub .. "/" .. f:sub(#d + #sub + 2)
          if first[name] then
            add("warning", ("%s: never loaded: %s is found first (--policies %s)"):format(f, first[name], dir))
          else
            first[name] = f
            files[#files + 1] = f
          end
        end
      end
    end
  end

  local reg, why = registry_module()
  if not reg then
    why = tostring(why)
    add("error", why:find("^[^\n]-:%d+: ") and why or "policies/registry.lua: " .. why)
  end

  -- a provider is known when its adapter file is there; one that does not
  -- load is that file's error, not an unknown provider
  local function provider_known(p)
    local name = "policies.providers." .. p
    if not module_found(name) then return false end
    local ok, mod = require_capped(name)
    if not ok then add("error", tostring(mod)) end
    return true
  end
  -- a model's price; prices that do not load are their file's error, not
  -- every model's missing price
  -- -> true | false[, why: a price written that is no price (NaN, negative, a field misspelt), with
  -- its file:line: "has no price" sent the reader looking for one that was there]
  local function price(p, m)
    local okp, pricing = require_capped("policies.pricing")
    if not okp then add("error", tostring(pricing)) return true end
    local found, bad
    if type(pricing) == "table" then found, bad = pricing.price(p, m) end
    if found then return true end
    local okm, media = require_capped("policies.pricing_media")
    if not okm then add("error", tostring(media)) return true end
    if type(media) == "table" and media.price(p .. "/" .. m) ~= nil then return true end
    if not bad then return false end
    local file = module_file("policies.pricing")
    local line = file and reg and (reg.locate(file, m) or reg.locate(file, (m:gsub("%-%d%d%d%d%-?%d%d%-?%d%d$", ""))))
    return false, ("its price in %s is no price: %s"):format(line and ("%s:%d"):format(file, line) or
      (file or "policies/pricing.lua"), bad)
  end

  local function check_registry(path, entries)
    if not reg then return end
    for _, p in ipairs(reg.problems(entries, { file = path, provider_known = provider_known, price = price })) do
      add(p.level, p.message)
    end
  end

  local registry_checked = false
  for _, path in ipairs(files) do
    seen[path] = true
    if not_files[path] then
      add("error", path .. ": not a file (a FIFO, a socket or a device): not read")
    elseif not exists(path) then
      add("error", path .. ": no such file")
    else
      local chunk, err
      if path:match("models%.lua$") then chunk, err = loadfile(path, "t", {}) else chunk, err = loadfile(path, "t") end
      if not chunk then
        -- (a binary chunk's refusal names no file)
        add("error", err:find(path, 1, true) == 1 and err or path .. ": " .. err)
      elseif path:match("models%.lua$") then
        -- data only: run it with nothing in reach
        local ok, entries = run_capped(path, chunk)
        if not ok then add("error", tostring(entries)) else check_registry(path, entries) end
        registry_checked = true
      elseif module_of(path) then
        local modname = module_of(path)
        local ok, mod = run_capped(path, chunk, modname)
        if not ok then add("error", tostring(mod))
        -- (nothing: a file required for what it does as it loads, which a reload takes where its
        -- version before returned nothing too; one whose caller uses its value fails at the start)
        elseif mod ~= nil and type(mod) ~= "table" and type(mod) ~= "function" then -- (as a reload refuses)
          add("error", ("%s: a policy module must return a table or a function; it returned %s"):format(path,
            type(mod)))
        elseif modname == "policies.gateway" then
          -- (a copy without them, or a config named gateway.lua in the policy folder, passed and the
          -- gateway refused to start, or answered every request a 500)
          for _, fn in ipairs(GATEWAY_FUNCTIONS) do
            if type(mod) ~= "table" or type(rawget(mod, fn)) ~= "function" then
              add("error", ("%s: policies.gateway has no function '%s' (the gateway calls it: a copy of " ..
                "policies/gateway.lua keeps the shipped file's; a gateway config is named otherwise)"):format(path, fn))
              break
            end
          end
        end
      end
    end
  end
  if not registry_checked then
    local path, perr = registry_in_effect()
    if perr then add("error", perr) end
    if path and not seen[path] then
      local chunk, err = loadfile(path, "t", {})
      if not chunk then add("error", err)
      else
        local ok, entries = run_capped(path, chunk)
        if not ok then add("error", tostring(entries)) else check_registry(path, entries) end
      end
    end
  end

  local errors, warnings = 0, 0
  for _, p in ipairs(problems) do
    if p.level == "error" then errors = errors + 1 else warnings = warnings + 1 end
    io.stdout:write(p.level, ": ", resil.redact(p.message), "\n")
  end
  io.stdout:write(("%d error%s, %d warning%s\n"):format(errors, errors == 1 and "" or "s", warnings,
    warnings == 1 and "" or "s"))
  -- a report that could not be written whole (check > FILE on a full disk) is not a pass: it exited 0
  -- with the report lost, where costs and runs exit 1 saying so (a reader that left: as SIGPIPE would)
  local written, werr, code = io.stdout:flush()
  if not written then
    if code == 32 then exit(141, false) end -- (EPIPE)
    io.stderr:write("resil-lua: check: its report could not be written: ", tostring(werr), "\n")
    exit(1, false)
  end
  -- at once: a task a policy started at load (a refresher that sleeps and loops) kept check
  -- running when its verdict was out, for good, and the state's finalizers are the policies' too
  exit(errors > 0 and 1 or 0, false)
end
