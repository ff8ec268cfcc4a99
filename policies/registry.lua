-- policies/registry.lua: what a model name in a call means, from the
-- registry in policies/models.lua (aliases, pinned versions, deprecations,
-- migrations, deployments). policies.ai asks it on every call, so a reloaded
-- registry applies to the next call.
--
--   local registry = require "policies.registry"
--   local plan = registry.resolve("chat-fast", req)   -- raises on an unknown alias
--   -- plan.choices: the targets in order { model = "openai/...", deployment =, config = }
--   -- plan.alias, plan.routed = { from =, to =, reason = "sunset" }, plan.migration = { alias =, side = }
--   registry.problems(entries, { now = epoch }) -> { {level = "error"|"warning", message =, key =}, ... }
--
-- Migration state (the rollback) lives in the store under a fingerprint of
-- the migrate table, so every process sees it and editing the entry starts over.
local resil = require "resil"

local registry = {}

-- The random source for spreading and unsticky canary calls: specs seed it.
registry.random = math.random

-- Pinned model names, by provider: a model matching one of these is a fixed
-- version. Rules are data: add your provider's convention here.
registry.pinned = {
  ["*"] = { "%-%d%d%d%d%-%d%d%-%d%d$", "%-%d%d%d%d%d%d%d%d$", ":[%w]+$" },
  elevenlabs = { "_v%d[%d_]*$" },
  -- OpenAI's embedding models have no snapshots: a name is one model for good (vectors made by
  -- another would not compare)
  openai = { "^text%-embedding%-" },
  -- Anthropic's ids from Claude 4.6 on are snapshots without a date (claude-sonnet-4-6,
  -- claude-sonnet-5-5); claude-sonnet-4-5 and older undated names are aliases that moved
  anthropic = { "^claude%-%a+%-4%-[6-9]$", "^claude%-%a+%-[5-9]$", "^claude%-%a+%-[5-9]%-%d+$" },
}

local DEFAULTS = { window = 3600, min_calls = 50 }

---------------------------------------------------------------------------
-- loading and structural checks (a broken registry fails to load: a reload
-- keeps the old one serving, reported with file:line)

-- -> path, guessed (a path not found: messages name it, nothing reads it)
local function source_of(modname)
  local ok, searchers = pcall(function() return package.searchers end) -- the sandbox hides them
  for _, searcher in ipairs(ok and searchers or {}) do
    local loader, where = searcher(modname)
    if type(loader) == "function" and type(where) == "string" then return where end
  end
  -- the sandbox's package.path names the policy folders in the order require searches them
  local rest = modname:gsub("^policies%.", ""):gsub("%.", "/")
  local okp, path = pcall(function() return package.path end)
  for template in (okp and type(path) == "string" and path or ""):gmatch("[^;]+") do
    local file = template:gsub("%?", rest)
    local opened, f = pcall(io.open, file, "r")
    if opened and f then
      f:close()
      return file
    end
  end
  -- (a guess read for lines and keys written twice was another file: the working folder's
  -- policies/models.lua, whose duplicates refused the registry of --policies DIR)
  return "policies/" .. rest .. ".lua", true
end

-- the line an entry's key is written on, for messages
local function locate(file, key)
  local ok, f = pcall(io.open, file, "r") -- a sandbox may refuse it: then no line
  if not ok or not f then return nil end
  local n, plain = 0, tostring(key)
  for line in f:lines() do
    n = n + 1
    if line:find('["' .. plain .. '"]', 1, true) or line:find("[%s{,]" .. plain:gsub("%p", "%%%0") .. "%s*=")
      or line:find("^" .. plain:gsub("%p", "%%%0") .. "%s*=") then
      f:close()
      return n
    end
  end
  f:close()
  return nil
end
registry.locate = locate

local function where(file, key)
  local line = file and locate(file, key)
  return line and ("%s:%d"):format(file, line) or (file or "models")
end

-- A name (an alias, a model, a request field) is what a gateway's client may name
-- (policies/gateway.lua's check_model): printable ASCII without spaces, at most 256 bytes. It is
-- echoed in headers (x-resil-model), log lines and metric labels: an alias with a space or an
-- accent was listed by GET /v1/models and refused (a 400) to the client that named it, and a
-- target with a CR LF in it went into the x-resil-model header as written
local NAME_MAX = 256
local NAME_RULE = "1 to 256 printable ASCII characters, no spaces"
local function is_name(v) return type(v) == "string" and #v <= NAME_MAX and v:find("^[!-~]+$") ~= nil end

-- a value in a message: what is not printable ASCII escaped, a long one cut
local function shown(v)
  if v ~= v then return "NaN" end
  if type(v) ~= "string" then return tostring(v) end
  local s = v:sub(1, 80):gsub("[^ -~]", function(c) return ("\\x%02X"):format(c:byte()) end)
  return #v > 80 and s .. "..." or s
end

-- A table read as a list (ipairs) that is not one: `{ x = "..." }` or `{ "a", nil, "b" }` gave no
-- fallback, or only the first, without a word. -> why | nil
local function not_a_list(t)
  local n = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 then return ("has the key %s (a list has positions 1, 2, ...)"):format(shown(k)) end
    n = n + 1
  end
  for i = 1, n do
    if t[i] == nil then return ("has a hole at position %d"):format(i) end
  end
end

-- (NaN passes `x < 0 or x > 1` and infinity passes `x > 0`: a share of NaN sent every call to
-- the old side without a word, a deadline of NaN raised inside each call)
local function finite(v) return type(v) == "number" and v == v and v > -math.huge and v < math.huge end

-- a real day: "2026-13-45" was read as 2027-02-14
local function is_date(s)
  local y, m, d = (type(s) == "string" and s or ""):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)$")
  if not y then return false end
  y, m, d = tonumber(y), tonumber(m), tonumber(d)
  local leap = y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0)
  local days = { 31, leap and 29 or 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }
  return m >= 1 and m <= 12 and d >= 1 and d <= days[m]
end

local distance = require "resil.edit_distance"

-- The fields each table of an entry takes: one misspelt (`fallback = {...}`, `percent = 10`) was
-- dropped without a word, and the fallbacks or the split it meant were not there
local FIELDS_OF = {}
for kind, list in pairs({
  entry = { "use", "fallbacks", "deadline", "deployments", "strategy", "migrate", "pinned", "deprecated",
            "replacement", "sunset" },
  migrate = { "to", "share", "sticky", "rollback", "window" },
  rollback = { "error_rate", "invalid_output", "latency", "min_calls" },
  deployment = { "use", "weight", "name", "config" },
}) do
  local set = {}
  for _, f in ipairs(list) do set[f] = true end
  FIELDS_OF[kind] = { list = list, set = set }
end

-- messages for the fields of t that `kind` does not take
local function unknown_fields(t, kind, what)
  local known, out, names = FIELDS_OF[kind], {}, {}
  for k in pairs(t) do if not known.set[k] then names[#names + 1] = k end end
  table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
  for _, f in ipairs(names) do
    local near, best = nil, 3
    for _, k in ipairs(known.list) do
      local d = type(f) == "string" and distance(f:lower(), k) or best
      if d < best then near, best = k, d end
    end
    out[#out + 1] = ("%s: unknown field '%s'%s (it takes %s)"):format(what, shown(f),
      near and (", did you mean '" .. near .. "'?") or "", table.concat(known.list, ", "))
  end
  return out
end

-- How deep resolution may go below the name a call asks for (aliases naming aliases, fallbacks,
-- replacements); a registry going deeper is refused when it loads, not at each call
local MAX_DEPTH = 8

-- Keys written twice in one table of a registry file, as { line =, first =, key =, top = }: Lua
-- keeps the last without a word, so an edit of the first (the share of a migration written
-- twice in one entry, an alias written twice) changed nothing. A scan of the source, tokens
-- enough for table constructors; a file with a function in it is not scanned (its bodies'
-- assignments are not keys).
local SCAN_MAX = 256 * 1024
local function written_twice(file)
  local ok, f = pcall(io.open, file, "r") -- a sandbox may refuse it: then no scan
  if not ok or not f then return {} end
  -- (a file written by hand is a few KB; one past SCAN_MAX is a tool's output, and the scan of
  -- megabytes, a quarter of a second per 2.5 MB, would hold the loop at each reload)
  local src = f:read(SCAN_MAX + 1) or ""
  f:close()
  if #src > SCAN_MAX then return {} end
  local out, scopes = {}, {}
  local i, n, line = 1, #src, 1
  local prev, prev_field -- the token before ("{", ",", ";" start a field), and a "[" that starts one
  local function newlines(s)
    if s:find("\n", 1, true) then
      local _, c = s:gsub("\n", "")
      line = line + c
    end
  end
  local last -- the key of the field being written, which a "{" after it owns
  local function key(k, at)
    local scope = scopes[#scopes]
    if not scope then return end
    last = k
    if scope.keys[k] then
      out[#out + 1] = { line = at, first = scope.keys[k], key = k, top = #scopes == 1,
        model = scopes[2] and scopes[2].owner }
    else
      scope.keys[k] = at
    end
  end
  -- the index after an "=" that follows j (spaces and comments aside), or nil
  local function assign_after(j)
    local _, e = src:find("^%s*", j)
    j = e + 1
    if src:sub(j, j) == "=" and src:sub(j + 1, j + 1) ~= "=" then return j + 1 end
  end
  while true do
    -- (to the next token that matters, past blanks and numbers' digits at C speed: a registry of
    -- thousands of aliases is read at each reload, which the loop waits for)
    i = src:find("[^ \t\r%d%.]", i)
    if not i then break end
    local c = src:sub(i, i)
    if c == "\n" then
      line, i = line + 1, i + 1
    elseif c == "-" and src:sub(i + 1, i + 1) == "-" then
      local eq = src:match("^%-%-%[(=*)%[", i)
      local stop = eq and select(2, src:find("]" .. eq .. "]", i, true)) or (src:find("\n", i, true) or n + 1) - 1
      newlines(src:sub(i, stop))
      i = stop + 1
    elseif c == '"' or c == "'" then
      local j, stop = i + 1, "[\\" .. c .. "]"
      while true do
        j = src:find(stop, j) or n + 1
        if src:sub(j, j) ~= "\\" then break end
        j = j + 2
      end
      local value, at = src:sub(i + 1, j - 1), line
      newlines(value)
      i = j + 1
      -- ["key"] =
      if prev_field and prev == "[" and src:match("^%s*%]", i) then
        local close = select(2, src:find("^%s*%]", i))
        local after = assign_after(close + 1)
        if after and prev_field then key(value, at) end
      end
      prev = "string"
    elseif c == "[" and src:find("^%[=*%[", i) then
      local eq = src:match("^%[(=*)%[", i)
      local stop = select(2, src:find("]" .. eq .. "]", i, true)) or n
      newlines(src:sub(i, stop))
      i, prev = stop + 1, "string"
    elseif c:find("[%a_]") then
      local name = src:match("^[%w_]+", i)
      if name == "function" then return {} end
      i = i + #name
      if (prev == "{" or prev == "," or prev == ";") and assign_after(i) then key(name, line) end
      prev = "name"
    else
      if c == "{" then scopes[#scopes + 1] = { keys = {}, owner = prev == "=" and last or nil }
      elseif c == "}" then scopes[#scopes] = nil end
      prev_field = c == "[" and (prev == "{" or prev == "," or prev == ";")
      prev = c
      i = i + 1
    end
  end
  return out
end

-- Errors a registry must not load with: wrong shapes and values, references that lead nowhere,
-- alias cycles, resolution too deep, migrations inside migrations, keys written twice.
-- (unread: file is a guess, named in messages but not read for lines nor keys written twice)
local function structure_errors(entries, file, unread)
  local errs = {}
  local function bad(key, fmt, ...)
    errs[#errs + 1] = { level = "error", key = key,
      message = ("%s: model '%s': " .. fmt):format(unread and file or where(file, key), shown(key), ...) }
  end
  if type(entries) ~= "table" then
    return { { level = "error", message = ("%s: the registry must return a table, not %s"):format(file, type(entries)) } }
  end
  local keys = {}
  for key in pairs(entries) do
    if type(key) ~= "string" then
      errs[#errs + 1] = { level = "error", message = ("%s: registry keys must be model names, not %s"):format(file,
        shown(key)) }
    else
      keys[#keys + 1] = key
    end
  end
  table.sort(keys)
  local function alias(name) local e = entries[name] return type(e) == "table" and (e.use or e.deployments) ~= nil end
  local function full(name) return name:find("^[%w_%-]+/.") ~= nil end
  -- a model a field names ("provider/model" or an alias; one that is neither is `check`'s error
  -- and, for a fallback, warned about at its first call: the primary still serves)
  local function model_ref(key, v, what, provider_only)
    if not is_name(v) then
      bad(key, "%s must be \"provider/model\"%s (%s), not %s", what, provider_only and "" or " or an alias", NAME_RULE,
        type(v) == "string" and ("'" .. shown(v) .. "'") or tostring(v))
    elseif provider_only and not full(v) then -- (a deployment's is sent as it is: an alias there failed each call)
      bad(key, "%s '%s' must be \"provider/model\", not an alias", what, v)
    end
  end
  for _, key in ipairs(keys) do
    local e = entries[key]
    if not is_name(key) then
      bad(key, "a model's name must be %s", NAME_RULE)
    elseif type(e) ~= "table" then
      bad(key, "an entry must be a table")
    else
      for _, msg in ipairs(unknown_fields(e, "entry", "the entry")) do bad(key, "%s", msg) end
      if e.use ~= nil then model_ref(key, e.use, "use") end
      if e.use == nil and e.deployments == nil and not e.deprecated then
        bad(key, "needs use = \"provider/model\", deployments = {...} or deprecated = true")
      end
      if e.deprecated ~= nil and type(e.deprecated) ~= "boolean" then bad(key, "deprecated must be true or false") end
      if e.pinned ~= nil and type(e.pinned) ~= "boolean" then bad(key, "pinned must be true or false") end
      -- (an alias's sunset was never read: its calls kept going to its use past the date)
      if e.deprecated and (e.use ~= nil or e.deployments ~= nil) then
        bad(key, "deprecated = true marks a model's name, not an alias: to move an alias, change its use or migrate it")
      elseif not e.deprecated and (e.replacement ~= nil or e.sunset ~= nil) then
        bad(key, "replacement and sunset go with deprecated = true")
      end
      if e.fallbacks ~= nil and type(e.fallbacks) ~= "table" then bad(key, "fallbacks must be a list of models") end
      if type(e.fallbacks) == "table" then
        local why = not_a_list(e.fallbacks)
        if why then bad(key, "fallbacks must be a list of models: it %s", why) end
      end
      for i, f in ipairs(type(e.fallbacks) == "table" and e.fallbacks or {}) do model_ref(key, f, ("fallbacks[%d]"):format(i)) end
      if e.deadline ~= nil and not (finite(e.deadline) and e.deadline > 0) then bad(key, "deadline must be seconds > 0") end
      if e.sunset ~= nil and not is_date(e.sunset) then bad(key, "sunset must be a date \"YYYY-MM-DD\", not %s", shown(e.sunset)) end
      if e.replacement ~= nil then model_ref(key, e.replacement, "replacement") end
      if e.deployments ~= nil then
        if type(e.deployments) ~= "table" or #e.deployments == 0 then
          bad(key, "deployments must be a non-empty list of { use =, weight = }")
        elseif not_a_list(e.deployments) then
          bad(key, "deployments must be a list of { use =, weight = }: it %s", not_a_list(e.deployments))
        else
          for i, d in ipairs(e.deployments) do
            local what = ("deployments[%d]"):format(i)
            if type(d) ~= "table" then bad(key, "%s must be { use =, weight = }", what)
            else
              for _, msg in ipairs(unknown_fields(d, "deployment", what)) do bad(key, "%s", msg) end
              model_ref(key, d.use, what .. ".use", true)
              if d.weight ~= nil and not (finite(d.weight) and d.weight >= 0) then
                bad(key, "%s.weight must be a number >= 0", what)
              end
              if d.name ~= nil and not is_name(d.name) then bad(key, "%s.name must be %s", what, NAME_RULE) end
              if d.config ~= nil and type(d.config) ~= "table" then bad(key, "%s.config must be a table", what)
              -- (as ai.configure's: a TTL the store refuses left every answer uncached, each repeat paid for)
              elseif type(d.config) == "table" and d.config.cache ~= nil and not (type(d.config.cache) == "table"
                and finite(d.config.cache.ttl) and d.config.cache.ttl > 0) then
                bad(key, "%s.config.cache must be {ttl = seconds}, seconds > 0", what)
              end
            end
          end
        end
      end
      if e.strategy ~= nil and e.strategy ~= "weighted" and e.strategy ~= "least-wait" then
        bad(key, "strategy must be \"weighted\" or \"least-wait\"")
      end
      local m = e.migrate
      if m ~= nil then
        if type(m) ~= "table" then bad(key, "migrate must be { to =, share = }")
        else
          for _, msg in ipairs(unknown_fields(m, "migrate", "migrate")) do bad(key, "%s", msg) end
          model_ref(key, m.to, "migrate.to")
          if not (finite(m.share) and m.share >= 0 and m.share <= 1) then
            bad(key, "migrate.share must be a number from 0 to 1, not %s", shown(m.share))
          end
          if e.use == nil then bad(key, "migrate needs use = the model it migrates from") end
          if m.sticky ~= nil and m.sticky ~= false and not is_name(m.sticky) then
            bad(key, "migrate.sticky must name a request field (\"user\", \"session\") or be false (each call " ..
              "draws), not %s", shown(m.sticky))
          end
          if m.window ~= nil and not (finite(m.window) and m.window > 0) then bad(key, "migrate.window must be seconds > 0")
          elseif m.window ~= nil and m.window < 1 then
            -- (a window's number, now / window, is written as an integer: under 2e-10 s each call,
            -- answered and paid for, raised as its outcome was counted)
            bad(key, "migrate.window must be at least 1 second (its calls are counted per window), not %s", shown(m.window))
          end
          if m.rollback ~= nil and type(m.rollback) ~= "table" then bad(key, "migrate.rollback must be a table")
          elseif m.rollback ~= nil then
            for _, msg in ipairs(unknown_fields(m.rollback, "rollback", "migrate.rollback")) do bad(key, "%s", msg) end
            for _, f in ipairs(FIELDS_OF.rollback.list) do
              local v = m.rollback[f]
              if v ~= nil and not (finite(v) and v >= 0) then bad(key, "migrate.rollback.%s must be a number >= 0", f)
              -- (margins of rates written as percents, error_rate = 5, never rolled back: a
              -- difference of two rates is at most 1)
              elseif v ~= nil and (f == "error_rate" or f == "invalid_output") and v > 1 then
                bad(key, "migrate.rollback.%s is a difference of rates, from 0 to 1 (0.05: 5 points), not %s", f, shown(v))
              -- (a ratio under 1, latency = 0.5 as seconds, rolled back nearly every canary at min_calls)
              elseif v ~= nil and f == "latency" and v < 1 then
                bad(key, "migrate.rollback.latency is a ratio of the sides' mean latencies, 1 or more (2: twice as " ..
                  "slow), not %s", shown(v))
              end
            end
          end
        end
      end
    end
  end
  -- keys written twice (the file as written: a table has kept one of each)
  if file and not unread then
    for _, d in ipairs(written_twice(file)) do
      local what = d.top and "" or d.model and ("model '" .. shown(d.model) .. "': ") or ""
      errs[#errs + 1] = { level = "error", key = d.top and d.key or d.model,
        message = ("%s:%d: %s%s is written twice%s (lines %d and %d): Lua keeps the last one and drops the first " ..
          "without a word"):format(file, d.line, what, d.top and ("model '" .. shown(d.key) .. "'") or ("'" .. shown(d.key) .. "'"),
          d.top and "" or " in one table", d.first, d.line) }
    end
  end
  if #errs > 0 then return errs end -- (what follows walks references the checks above found sound)

  -- alias cycles: follow use, fallbacks, replacement and migrate.to through aliases
  local state = {}
  local function visit(key, path)
    if state[key] == "done" then return end
    if state[key] == "active" then
      local from = 1
      for i, k in ipairs(path) do if k == key then from = i break end end
      local cycle = {}
      for i = from, #path do cycle[#cycle + 1] = path[i] end
      cycle[#cycle + 1] = key
      bad(key, "alias cycle %s", table.concat(cycle, " -> "))
      return true
    end
    state[key] = "active"
    path[#path + 1] = key
    local e = entries[key]
    local refs = {}
    local function ref(r)
      if type(r) ~= "string" then return end
      if type(entries[r]) == "table" then refs[#refs + 1] = r return end
      -- a full name whose deprecation is keyed by the bare model name leads there too
      local bare = r:match("^[%w_%-]+/(.+)$")
      local d = bare and entries[bare]
      if type(d) == "table" and d.deprecated then refs[#refs + 1] = bare end
    end
    ref(e.use)
    ref(e.replacement)
    ref(type(e.migrate) == "table" and e.migrate.to or nil)
    for _, f in ipairs(type(e.fallbacks) == "table" and e.fallbacks or {}) do ref(f) end
    for _, d in ipairs(type(e.deployments) == "table" and e.deployments or {}) do
      if type(d) == "table" then ref(d.use) end
    end
    local found
    for _, r in ipairs(refs) do
      if visit(r, path) then found = true break end
    end
    path[#path] = nil
    state[key] = "done"
    return found
  end
  for _, key in ipairs(keys) do
    if state[key] == nil then visit(key, {}) end
  end
  if #errs > 0 then return errs end

  -- the replacement a full name is routed to past its sunset, if any
  local function replacement_of(name)
    local d = entries[name]
    if not (type(d) == "table" and d.deprecated) then
      local bare = name:match("^[%w_%-]+/(.+)$")
      d = bare and entries[bare]
    end
    return type(d) == "table" and d.deprecated and d.replacement ~= name and d.replacement or nil
  end
  -- the names a call's resolution passes below a name, as expand walks them: levels, the chain
  -- (a chain is kept to its first names, enough to show: kept whole, a registry of aliases each
  -- falling back to the next copied each chain into the one above it, and 20,000 of them took 45 s
  -- of the loop and a message of gigabytes to refuse)
  local SHOWN = MAX_DEPTH + 2
  local function longer(name, c)
    local out = { name }
    for i = 1, math.min(#c, SHOWN - 1) do out[i + 1] = c[i] end
    return out
  end
  local deep = {}
  local function depth(name)
    if deep[name] then return deep[name][1], deep[name][2] end
    deep[name] = { 0, { name } } -- (no cycles are left; this only guards)
    local e, next = entries[name], {}
    if alias(name) then
      next = { e.use, type(e.migrate) == "table" and e.migrate.to or nil }
      for _, f in ipairs(e.fallbacks or {}) do next[#next + 1] = f end
    elseif full(name) then
      next = { replacement_of(name) }
    end
    local levels, chain = 0, { name }
    for i = 1, 2 + #(e and e.fallbacks or {}) do
      local r = next[i]
      if r then
        local d, c = depth(r)
        if d + 1 > levels then levels, chain = d + 1, longer(name, c) end
      end
    end
    deep[name] = { levels, chain }
    return levels, chain
  end
  local too_deep = 0
  for _, key in ipairs(keys) do
    local e = entries[key]
    local levels, chain = depth(key)
    if not alias(key) and e.replacement then
      local d, c = depth(e.replacement)
      levels, chain = d + 1, longer(key, c)
    end
    if levels > MAX_DEPTH then
      too_deep = too_deep + 1
      -- (each name of a long chain is too deep: the first ones said, then how many more)
      if too_deep <= 20 then
        bad(key, "resolves through %d names (%s%s), more than %d: name a model nearer", levels + 1,
          table.concat(chain, " -> "), levels + 1 > #chain and " -> ..." or "", MAX_DEPTH + 1)
      end
    end
  end
  if too_deep > 20 then
    errs[#errs + 1] = { level = "error", message = ("%s: %d more models resolve through more than %d names"):format(
      file or "models", too_deep - 20, MAX_DEPTH + 1) }
  end

  -- a migration met inside another's sides: a call takes the first migration it meets, so the
  -- inner one never applied to the outer's calls (nor counted them for its rollback)
  for _, key in ipairs(keys) do
    local e = entries[key]
    if type(e.migrate) == "table" then
      local seen, inner = {}, nil
      local function reach(r)
        if inner or type(r) ~= "string" or seen[r] then return end
        seen[r] = true
        if alias(r) then
          local a = entries[r]
          -- (one at 0 sends every call to its use, one at 1 to its target, wherever it is met)
          if type(a.migrate) == "table" and a.migrate.share > 0 and a.migrate.share < 1 then inner = r return end
          if type(a.migrate) == "table" and a.migrate.share >= 1 then reach(a.migrate.to) end
          reach(a.use)
        elseif full(r) then
          reach(replacement_of(r))
        end
      end
      reach(e.use)
      reach(e.migrate.to)
      if inner then
        bad(key, "migrates through '%s', which has a migration of its own: a call takes the first migration it meets, " ..
          "so '%s''s never applies to the calls of '%s'; migrate one of them", inner, inner, key)
      end
    end
  end
  return errs
end
registry.structure_errors = structure_errors

-- load(entries, file) -> a registry view | raises "file:line: ..."
local function load(entries, file, unread)
  local errs = structure_errors(entries, file, unread)
  if #errs > 0 then
    local lines = {}
    for _, e in ipairs(errs) do lines[#lines + 1] = e.message end
    error(table.concat(lines, "\n"), 0)
  end
  return { entries = entries, file = file }
end

-- The registry a reload keeps: the one the version before served. A reload loads this module
-- afresh, and it read policies/models.lua again: a script that chose another registry
-- (registry.load, the demo's way; registry.use) was moved to the policy folder's at the first
-- SIGHUP or --watch save of any policy file, its aliases unknown or routed elsewhere.
local last = resil.keep("policies.registry.last") -- { module = the version loaded last }

-- a registry file's entries (plain data, run with nothing in reach) -> entries | nil, error
local function read_file(path)
  local chunk, err = loadfile(path, "t", {})
  if not chunk then return nil, err end
  local ok, entries = pcall(chunk)
  if not ok then return nil, entries end
  return entries
end

-- (models_entries: what tells a later reload to read policies/models.lua again)
local function from_models()
  local r = load(require "policies.models", source_of("policies.models"))
  registry.models_entries = r.entries
  return r
end

local prev, current = last.module, nil
if prev == nil or prev.entries == nil or rawequal(prev.entries, prev.models_entries) then
  current = from_models()
elseif prev.loaded_from and prev.file == prev.loaded_from then
  -- registry.load's file again, so a reload applies its edits (broken: the reload fails with its
  -- file:line, as for policies/models.lua); one deleted keeps what it held
  local entries, err = read_file(prev.loaded_from)
  if entries == nil and tostring(err):find("No such file", 1, true) then
    resil.log.warn("policy reload: the registry file is gone; the entries it held are kept", { file = prev.file })
    current = { entries = prev.entries, file = prev.file }
  elseif entries == nil then
    error(err, 0)
  else
    current = load(entries, prev.loaded_from)
  end
  registry.loaded_from = prev.loaded_from
else
  current = { entries = prev.entries, file = prev.file } -- registry.use's table (checked when it was used)
end
registry.entries, registry.file = current.entries, current.file
-- this version is the one the next reload asks, unless this reload fails
require("resil.if_reload_fails")(function() last.module = prev end)
last.module = registry

-- what registry.use / registry.load choose applies to the version loaded now too: a script's
-- `local registry = require "policies.registry"` is the version of its start, after a reload
local function choose(r, loaded_from, models_entries)
  for _, m in ipairs({ registry, last.module ~= registry and last.module or nil }) do
    m.entries, m.file, m.loaded_from = r.entries, r.file, loaded_from
    if models_entries then m.models_entries = models_entries end
  end
end

-- registry.use(entries[, file]): another registry for this module (specs, tools), in effect
-- across policy reloads; registry.use() goes back to policies/models.lua
function registry.use(entries, file)
  if entries == nil then
    local r = load(require "policies.models", source_of("policies.models"))
    choose(r, nil, r.entries)
    return
  end
  choose(load(entries, file or "(registry)"), nil)
end

-- registry.load(path): a registry file (plain data, run with nothing in
-- reach) for this module: a demo's or a tool's own, outside policies/; in
-- effect across policy reloads, each of which reads it again
function registry.load(path)
  local entries, err = read_file(path)
  if entries == nil then error(err, 2) end
  choose(load(entries, path), path)
end

---------------------------------------------------------------------------
-- names

local function split(model)
  local provider, name = model:match("^([%w_%-]+)/(.+)$")
  return provider, name
end
registry.split = split

-- A rule that is no Lua pattern ("[%d") raised from every call of an unpinned model of its
-- provider ("registry.lua: malformed pattern"): a rule of a warning failed the calls. It is
-- skipped, said once per rule.
-- (the registry's warnings said once per process, kept across reloads)
local once = resil.keep("policies.registry.once")
local function warn_once(key, msg, fields)
  if once[key] then return end
  once[key] = true
  resil.log.warn(msg, fields)
end

local function rule_matches(name, rule, provider)
  local ok, found = pcall(string.find, name, rule)
  if ok then return found ~= nil end
  warn_once("pinned\0" .. tostring(provider) .. "\0" .. tostring(rule),
    "model registry: a pinning rule (registry.pinned) is not a pattern; it is skipped",
    { provider = provider, rule = tostring(rule), error = tostring(found) })
  return false
end

function registry.is_pinned(model)
  local provider, name = split(model)
  if not provider then return false end
  local e = registry.entries[model] or registry.entries[name]
  if type(e) == "table" and e.pinned then return true end
  for _, rules in ipairs({ provider, "*" }) do
    for _, p in ipairs(registry.pinned[rules] or {}) do if rule_matches(name, p, rules) then return true end end
  end
  return false
end

-- every model name with a price, as "provider/model"
local function priced_models()
  local out = {}
  local okp, pricing = pcall(require, "policies.pricing")
  for p, models in pairs(okp and type(pricing.models) == "table" and pricing.models or {}) do
    for m in pairs(type(models) == "table" and models or {}) do out[#out + 1] = p .. "/" .. m end
  end
  local okm, media = pcall(require, "policies.pricing_media")
  for m in pairs(okm and type(media) == "table" and type(media.models) == "table" and media.models or {}) do
    out[#out + 1] = m
  end
  return out
end

-- the closest known names (aliases, then priced models), at most three
function registry.closest(name)
  local scored, lname = {}, name:lower()
  local function add(k, against)
    local a = against:lower()
    local d = distance(lname, a)
    if a:find(lname, 1, true) or lname:find(a, 1, true) then d = math.min(d, math.abs(#a - #lname) / 100) end
    scored[#scored + 1] = { k, d }
  end
  for k, e in pairs(registry.entries) do if type(e) == "table" and (e.use or e.deployments) then add(k, k) end end
  for _, k in ipairs(priced_models()) do add(k, k:match("^[^/]+/(.+)$") or k) end
  table.sort(scored, function(x, y) return x[2] < y[2] or (x[2] == y[2] and x[1] < y[1]) end)
  local out = {}
  for i = 1, math.min(3, #scored) do out[i] = scored[i][1] end
  return out
end

---------------------------------------------------------------------------
-- warnings once per process (kept across reloads): `once`, above

-- (the host's metric constructors, which prelude's owning_loader hands this chunk: resil.metrics is
-- the scripts', and under the sandbox one that ran first handed out fakes; a copy loaded otherwise
-- has resil.metrics)
local host_metrics = select(4, ...) or resil.metrics
local unpinned_total = host_metrics.counter("resil_model_unpinned_total",
  "Calls naming a model that is not pinned to a version, by model")
local sunset_days = host_metrics.gauge("resil_model_sunset_days",
  "Days left before a deprecated model's sunset, by model")
local routed_total = host_metrics.counter("resil_model_routed_total",
  "Calls routed from a model past its sunset to its replacement, by model and replacement")
local rollback_total = host_metrics.counter("resil_model_rollbacks_total",
  "Migrations rolled back automatically, by alias")
local side_total = host_metrics.counter("resil_model_migration_calls_total",
  "Calls of a migration, by alias, side (old|new) and outcome")

-- registry.reset_warnings(): warn again as a new process would (specs, tools)
local memo = { expires = -math.huge, plans = {}, size = 0, providers = {} } -- plans kept (see resolve)
function registry.reset_warnings()
  for k in pairs(once) do once[k] = nil end
  memo.expires = -math.huge -- a kept plan would not warn again
end

-- warn_once, with the line of the registry where fields.alias is written (read only the once)
local function warn_at(key, msg, fields)
  if once[key] then return end
  fields.where = where(registry.file, fields.alias)
  warn_once(key, msg, fields)
end

-- the store's clock: the virtual clock moves it in specs
local function now() return resil.store_now() end

-- midnight UTC of that day, as epoch seconds, by arithmetic (days from the civil date): os.time
-- reads local time, and the correction by the zone's offset of 1970 was an hour off wherever
-- that offset was not the date's (daylight saving time: in New York a sunset came at 23:00 UTC
-- the day before, in London an hour late in winter)
local function day_of(date)
  local y, m, d = date:match("^(%d+)-(%d+)-(%d+)$")
  y, m, d = tonumber(y), tonumber(m), tonumber(d)
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (m > 2 and m - 3 or m + 9) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return (era * 146097 + doe - 719468) * 86400
end
registry.day_of = day_of

-- the deprecation entry for a full model name, if any
local function deprecation(model)
  local _, name = split(model)
  local e = registry.entries[model] or (name and registry.entries[name])
  if type(e) == "table" and e.deprecated then return e end
  return nil
end

---------------------------------------------------------------------------
-- migrations: which side a call takes, outcomes per side, the rollback

local function fingerprint(alias, e)
  local m = e.migrate
  local rb = m.rollback or {}
  return resil.hash(table.concat({ alias, e.use, m.to, tostring(m.share), tostring(m.sticky),
    tostring(rb.error_rate), tostring(rb.invalid_output), tostring(rb.latency), tostring(rb.min_calls),
    tostring(m.window) }, "\0"))
end

-- The migrations' keys (models:migration:) are reserved for the host under the sandbox: the host
-- hands this chunk its way to them (prelude's owning_loader; a copy a script loads itself has
-- none and goes through the store object, refused there under the sandbox)
local host = select(3, ...)
local memory = host and host.memory or resil.keep("policies.registry.migrations") -- when the store is down

local in_memory = {
  get = function(_, k) return memory[k] end,
  set = function(_, k, v) memory[k] = v return true end,
  incr = function(_, k, n) memory[k] = (tonumber(memory[k]) or 0) + n return memory[k] end,
  del = function(_, k) memory[k] = nil return true end,
}

local function down(err)
  warn_once("store", "model registry: the store is unavailable; migration state is kept in this process only",
    { error = tostring(err) })
end

-- The store, each operation falling back to this process's memory when the
-- store fails it (a Redis that is down answers nil, err): the outcomes and a
-- rollback are kept here meanwhile, never lost nor raised into the call.
local over = setmetatable({}, { __mode = "k" })
local function store_or_memory()
  local s, err
  if host then s, err = host.open() else s, err = resil.store() end
  if not s then
    down(err)
    return in_memory
  end
  local w = over[s]
  if w then return w end
  local function op(name)
    local call = host and host[name] or s[name]
    return function(_, k, ...)
      local ok, v, e = pcall(call, s, k, ...)
      if ok and (v ~= nil or e == nil) then
        if v == nil and name == "get" then return memory[k] end -- one set while the store was down
        return v
      end
      down(ok and e or v)
      return in_memory[name](in_memory, k, ...)
    end
  end
  w = { get = op("get"), set = op("set"), incr = op("incr"), del = s.del and op("del") or in_memory.del }
  over[s] = w
  return w
end

local function safe(fn, ...)
  local ok, a, b = pcall(fn, ...)
  if ok then return a, b end
  return nil, a
end

-- the migration's state: { key, rolled_back = figures | nil }
function registry.migration_state(alias)
  local e = registry.entries[alias]
  if type(e) ~= "table" or type(e.migrate) ~= "table" then return nil end
  local key = "models:migration:" .. fingerprint(alias, e)
  local v = safe(store_or_memory().get, store_or_memory(), key .. ":rolled_back")
  local st = { key = key, share = e.migrate.share, to = e.migrate.to, from = e.use }
  if type(v) == "string" then
    st.rolled_back = resil.json.decode(v) or { reason = v }
    st.share = 0
  end
  return st
end

-- the fraction in [0, 1) a sticky key falls on
-- (FNV-1a, then murmur3's finalizer: FNV alone leaves keys that differ in
-- their last characters bunched together in the high bits)
local function point_of(alias, key)
  local h = math.tointeger(tonumber(resil.hash(alias .. "\0" .. tostring(key)), 16)) or 0
  h = h ~ (h >> 33)
  h = h * -49064778989728563 -- 0xff51afd7ed558ccd
  h = h ~ (h >> 33)
  h = h * -4265267296055464877 -- 0xc4ceb9fe1a85ec53
  h = h ~ (h >> 33)
  return ((h >> 11) & 0x1FFFFFFFFFFFFF) / 9007199254740992.0
end
registry.point_of = point_of

local function side_for(alias, e, req, anchor)
  local m = e.migrate
  if m.share >= 1 then return "new", nil end
  local st = registry.migration_state(alias)
  if st.share <= 0 then return "old", st end
  -- (sticky = false: each call draws. A gateway's `user` is the key's name, so a share of a
  -- gateway's calls is a share of its keys: with one key, all of them or none. A call made again
  -- as itself, a job resumed (`anchor`), lands where it did: drawn again, a resumed run took the
  -- other version, and made and paid a second job beside the one it had made)
  local key = m.sticky ~= false and type(req) == "table" and req[m.sticky or "user"] or nil
  local u = key ~= nil and point_of(alias, key) or anchor ~= nil and point_of(alias, "\0" .. anchor)
    or registry.random()
  return u < st.share and "new" or "old", st
end

local FIELDS = { "calls", "errors", "invalid", "latency_ms" }

local function window_of(m) return m.window or DEFAULTS.window end

local function read_side(s, key, side, m)
  local w = math.floor(now() / window_of(m))
  local out = {}
  for _, f in ipairs(FIELDS) do
    local total = 0
    for _, win in ipairs({ w, w - 1 }) do -- this window and the one before
      total = total + (tonumber(safe(s.get, s, ("%s:%s:%s:%d"):format(key, side, f, win))) or 0)
    end
    out[f] = total
  end
  return out
end

local function rates(c)
  local n = math.max(c.calls, 1)
  return c.errors / n, c.invalid / n, c.calls > 0 and c.latency_ms / c.calls or 0
end

-- the rollback's verdict: figures when the new side is worse by a margin
local function worse(m, old, new)
  local rb = m.rollback or {}
  local min_calls = rb.min_calls or DEFAULTS.min_calls
  if new.calls < min_calls then return nil end
  local oe, oi, ol = rates(old)
  local ne, ni, nl = rates(new)
  local reasons = {}
  if rb.error_rate and ne - oe > rb.error_rate then reasons[#reasons + 1] = "error_rate" end
  if rb.invalid_output and ni - oi > rb.invalid_output then reasons[#reasons + 1] = "invalid_output" end
  if rb.latency and ol > 0 and nl > ol * rb.latency then reasons[#reasons + 1] = "latency" end
  if #reasons == 0 then return nil end
  local function r3(x) return math.floor(x * 1000 + 0.5) / 1000 end
  return { reason = table.concat(reasons, ","), new_calls = new.calls, old_calls = old.calls,
    new_error_rate = r3(ne), old_error_rate = r3(oe), new_invalid_rate = r3(ni), old_invalid_rate = r3(oi),
    new_latency_ms = r3(nl), old_latency_ms = r3(ol), at = now() }
end

-- registry.record(migration, outcome): after a call on one side. outcome =
-- { ok = bool, class = "invalid_output" | ..., seconds = }
function registry.record(mig, outcome)
  local e = mig.entry or registry.entries[mig.alias]
  if type(e) ~= "table" or type(e.migrate) ~= "table" or e.migrate.share >= 1 then return end
  local m = e.migrate
  local s = store_or_memory()
  local key = "models:migration:" .. fingerprint(mig.alias, e)
  local w = math.floor(now() / window_of(m))
  local ttl = 2 * window_of(m) + 60
  local function incr(f, n) safe(s.incr, s, ("%s:%s:%s:%d"):format(key, mig.side, f, w), n, ttl) end
  incr("calls", 1)
  local label = outcome.ok and "ok" or (outcome.class or "error")
  side_total:inc({ alias = mig.alias, side = mig.side, outcome = label })
  if not outcome.ok then
    if outcome.class == "invalid_output" then incr("invalid", 1) else incr("errors", 1) end
  end
  incr("latency_ms", math.floor((outcome.seconds or 0) * 1000 + 0.5))
  if mig.side ~= "new" or mig.rolled_back then return end
  local new = read_side(s, key, "new", m)
  local old = read_side(s, key, "old", m)
  local figures = worse(m, old, new)
  if not figures then return end
  -- the first process to see it says so; the others find it in the store
  local first = safe(s.incr, s, key .. ":rollback_logged", 1)
  safe(s.set, s, key .. ":rolled_back", resil.json.encode(figures))
  if first == 1 or first == nil then
    rollback_total:inc({ alias = mig.alias })
    local fields = { alias = mig.alias, from = e.use, to = m.to, share = 0 }
    for k, v in pairs(figures) do fields[k] = v end
    resil.log.warn("model migration rolled back: the new version did worse; all calls go to the old one until the entry changes",
      fields)
  end
end

-- registry.reset_migration(alias): forget a migration's counts and rollback (tools, specs)
function registry.reset_migration(alias)
  if host then host.host_only("registry.reset_migration") end
  local st = registry.migration_state(alias)
  if not st then return end
  local s = store_or_memory()
  if not s.del then return end
  safe(s.del, s, st.key .. ":rolled_back")
  safe(s.del, s, st.key .. ":rollback_logged")
  -- and the counts the verdict reads (this window and the one before): kept, the next call on the
  -- new side read the figures that rolled it back, and rolled it back again, its fix untried
  local w = math.floor(now() / window_of(registry.entries[alias].migrate))
  for _, side in ipairs({ "old", "new" }) do
    for _, f in ipairs(FIELDS) do
      for _, win in ipairs({ w, w - 1 }) do safe(s.del, s, ("%s:%s:%s:%d"):format(st.key, side, f, win)) end
    end
  end
end

---------------------------------------------------------------------------
-- resolution

local UNPINNED_WARN_MAX = 100 -- unpinned models warned about one by one

local function unknown(name)
  local near = registry.closest(name)
  error(("ai: model '%s' must name its provider (\"openai/%s\") or be an alias in %s%s"):format(name, name,
    registry.file or "policies/models.lua", #near > 0 and ("; closest: " .. table.concat(near, ", ")) or ""), 0)
end

-- a full model name after deprecations: model, routed | nil, err
local function past_sunset(model)
  local dep = deprecation(model)
  if not dep then return model end
  local days = dep.sunset and (day_of(dep.sunset) - now()) / 86400
  if days and days > 0 then
    sunset_days:set({ model = model }, math.floor(days * 10 + 0.5) / 10)
    warn_once("deprecated:" .. model, "model is deprecated", { model = model, sunset = dep.sunset,
      days_left = math.ceil(days), replacement = dep.replacement })
    return model
  end
  if days == nil then -- no date yet: it still serves
    warn_once("deprecated:" .. model, "model is deprecated", { model = model, replacement = dep.replacement })
    return model
  end
  if not dep.replacement then
    -- (the registry's path in a field, not the message: a gateway hands the message to its client)
    return nil, resil.error("model_retired", ("model %s passed its sunset (%s) and the model registry names no " ..
      "replacement"):format(model, tostring(dep.sunset)), { model = model, class = "model_retired", retryable = false,
      file = registry.file })
  end
  sunset_days:set({ model = model }, 0)
  return dep.replacement, { from = model, to = dep.replacement, reason = "sunset", sunset = dep.sunset }
end

-- A provider a call can go to: one ai has an adapter for (a script's own, ai.adapters) or whose
-- file is there (policies/providers/NAME.lua; one that does not load is no business of this: the
-- call raises its file:line). A fallback, a migration's target or a deployment whose provider is
-- misspelt ("antrhopic/...") is a name that cannot be used, as a misspelt alias is: left out with
-- a warning, as the README says (`resil-lua check`'s error; "a primary still serves"). Before,
-- every call of the alias raised "unknown provider" from inside policies/ai.lua, a gateway's
-- client got a 400, and a 5 % canary so misspelt failed 5 % of the calls. Once per memo (a second).
local function provider_known(p)
  local known = memo.providers[p]
  if known == nil then
    local ok, ai = pcall(require, "policies.ai")
    known = not ok or type(ai) ~= "table" or ai.adapters[p] ~= nil
    if not known then
      local found, mod = pcall(ai.provider_module, p)
      known = not found or mod ~= nil
    end
    memo.providers[p] = known
  end
  return known
end

-- a full model name's provider, checked -> the model | raises (caught where it may be left out)
local function usable(model, plan)
  local p = split(model)
  if provider_known(p) then return model end
  if plan.alias then
    plan.unknown_provider = model -- (said to the operator by resolve, when the call fails on it)
    error(("ai: unknown provider '%s' in '%s' (model registry, alias '%s'; no policies/providers/%s.lua)"):format(
      p, model, plan.alias, p), 0)
  end
  error(("ai: unknown provider '%s' (no policies/providers/%s.lua)"):format(p, p), 0)
end

-- expand(name) -> list of choices for a name (an alias or provider/model), in order
local function expand(name, req, plan, depth)
  if depth > MAX_DEPTH then error(("model '%s': aliases nest too deep"):format(name), 0) end
  local e = registry.entries[name]
  if type(e) == "table" and (e.use or e.deployments) then
    -- An alias met again adds nothing its first time did not (a call tries each target once), and
    -- expanded again at each meeting, fallbacks naming the same aliases at each level grew as
    -- their product: 8 levels of 8 resolved into 2.4 million choices, seconds of the loop's time
    -- per resolve. Met as a fallback or not, apart: a migration applies to its own calls only.
    local met = (plan.in_fallback and "fallback\0" or "\0") .. name
    plan.met = plan.met or {}
    if plan.met[met] then return {} end
    plan.met[met] = true
    plan.alias = plan.alias or name
    if e.pinned and type(e.use) == "string" then
      plan.pinned = plan.pinned or {}
      plan.pinned[e.use] = true
    end
    -- (an alias's deadline is for its calls and those of an alias naming it, not for those that
    -- fall back to it: a fallback's 5 s cut its primary's calls at 5 s, the primary without one)
    if e.deadline and plan.deadline == nil and not plan.in_fallback then plan.deadline = e.deadline end
    local list = {}
    local function add_all(more) for _, c in ipairs(more) do list[#list + 1] = c end end
    -- a migration met on the way to the first target (not in a fallback) picks the side
    if e.migrate and not plan.migration and not plan.in_fallback then
      local side, st = side_for(name, e, req, plan.anchor)
      plan.migration = { alias = name, side = side, from = e.use, to = e.migrate.to,
        rolled_back = st and st.rolled_back ~= nil or nil,
        entry = e } -- its outcome counts for this entry, though a reload edits it meanwhile
      -- the new version's choices | nil: a target that cannot be used (past its sunset with no
      -- replacement) is a failure of the new side, its calls the old version's
      local function new_version()
        local ok, more = pcall(expand, e.migrate.to, req, plan, depth + 1)
        if ok then return more end
        warn_at("migrate\0" .. name .. "\0" .. tostring(e.migrate.to),
          "model registry: a migration's target cannot be used; its calls go to the old version",
          { alias = name, to = e.migrate.to, error = tostring(more) })
      end
      if side == "new" then
        local more = new_version()
        if more then
          add_all(more)
          plan.migration.primary = #list
        else
          plan.migration.side = "old"
        end
      end
      -- The old version retired under the migration, or failing: its calls go on to the new one, as
      -- the new side's go on to the old (not while the share is 0: paused, or rolled back). Before,
      -- the old one past its sunset failed every call of the alias, the new side's too, and one its
      -- provider retired (a 404) failed every call of the old side, the new version never tried.
      local open = side == "new" or (st and st.share or 0) > 0
      local ok, old = pcall(expand, e.use, req, plan, depth + 1)
      if ok then
        add_all(old)
        if plan.migration.side == "old" and side == "old" and open then add_all(new_version() or {}) end
      else
        if #list == 0 then -- (the old side's call: the new version's, if it can be used)
          local more = open and side == "old" and new_version()
          if not more then error(old, 0) end
          add_all(more)
          plan.migration.side, plan.migration.primary = "new", #list
        end
        warn_at("migrate-old\0" .. name, "model registry: a migration's old version cannot be used; its calls go " ..
          "to the new version", { alias = name, from = e.use, error = tostring(old) })
      end
    elseif e.migrate and e.migrate.share >= 1 then
      -- a completed migration met in a fallback or below another alias serves its target, as the
      -- alias's own calls do (before: the old version, which the provider may have retired since)
      local ok, more = pcall(expand, e.migrate.to, req, plan, depth + 1)
      if ok then add_all(more) else
        warn_at("migrate\0" .. name .. "\0" .. tostring(e.migrate.to),
          "model registry: a migration's target cannot be used; its calls go to the old version",
          { alias = name, to = e.migrate.to, error = tostring(more) })
      end
      add_all(expand(e.use, req, plan, depth + 1))
    elseif e.deployments then
      local group = { deployments = {}, strategy = e.strategy or "weighted" }
      local unusable
      for i, d in ipairs(e.deployments) do
        -- (one past its sunset with no replacement is left out as one that cannot be used: it
        -- failed every call of the alias, its other deployments serving)
        local model, routed = past_sunset(d.use)
        local ok, why = model ~= nil, routed
        if ok then
          if routed and not plan.in_fallback then plan.routed = plan.routed or routed end
          ok, why = pcall(usable, model, plan)
        end
        if ok then
          group.deployments[#group.deployments + 1] = { model = model, weight = d.weight or 1,
            name = d.name or (name .. "#" .. i), config = d.config }
        else
          unusable = unusable or why
          warn_at("deployment\0" .. name .. "\0" .. i, "model registry: a deployment cannot be used",
            { alias = name, deployment = d.name or (name .. "#" .. i), error = tostring(why) })
        end
      end
      if not group.deployments[1] then error(unusable, 0) end
      list[#list + 1] = group
    else
      add_all(expand(e.use, req, plan, depth + 1))
    end
    for _, f in ipairs(e.fallbacks or {}) do
      local was = plan.in_fallback
      plan.in_fallback = true
      local ok, more = pcall(expand, f, req, plan, depth + 1)
      plan.in_fallback = was
      -- once per alias and fallback: a broken entry must not write a line per call
      if ok then add_all(more) else warn_at("fallback\0" .. name .. "\0" .. tostring(f),
        "model registry: a fallback cannot be used", { alias = name, fallback = f, error = tostring(more) }) end
    end
    return list
  end
  if not split(name) then unknown(name) end
  local model, routed = past_sunset(name)
  if model == nil then error(routed, 0) end
  if routed then
    -- (the name asked for's routing: a fallback's said the call was routed where its primary served)
    if not plan.in_fallback then plan.routed = plan.routed or routed end
    if not once["routed:" .. name] then
      once["routed:" .. name] = true
      routed_total:inc({ model = name, replacement = model })
      resil.log.warn("model past its sunset: calls go to its replacement", routed)
    end
    if model ~= name then return expand(model, req, plan, depth + 1) end
  end
  if not registry.is_pinned(model) and not (plan.pinned and plan.pinned[model]) then
    if not once["unpinned:" .. model] then
      -- one line per model, for so many models: past that (a gateway's
      -- clients name what they like), one line saying so, then none
      local n = once["#unpinned"] or 0
      if n < UNPINNED_WARN_MAX then
        once["unpinned:" .. model] = true
        resil.log.warn("model is not pinned to a version: the provider may change it under you", { model = model })
      elseif n == UNPINNED_WARN_MAX then
        resil.log.warn("more models are not pinned to a version: not warned about one by one (see resil_model_unpinned_total)",
          { model = model, warned = n })
      end
      once["#unpinned"] = math.min(n + 1, UNPINNED_WARN_MAX + 1)
    end
    plan.unpinned = plan.unpinned or {}
    plan.unpinned[#plan.unpinned + 1] = model -- counted on every call, by resolve
  end
  return { { model = usable(model, plan) } }
end

-- Plans that do not depend on the call (no migration: its side is per key and
-- per stored state) are kept for a second: a gateway resolves the same few
-- names on every request. A new registry (registry.use, a reload, other
-- pinning rules) starts over at once; a sunset is seen within the second.
local MEMO_SECONDS, MEMO_MAX = 1, 1000
local unpinned_series, unpinned_count = {}, 0

-- every call naming an unpinned model counts, a plan kept or not
local function count_unpinned(plan)
  local list = plan.unpinned
  for i = 1, #list do
    local model = list[i]
    local series = unpinned_series[model]
    if not series then
      series = unpinned_total:labels({ model = model })
      if unpinned_count < MEMO_MAX then -- as many as the metric keeps label sets, about
        unpinned_series[model] = series
        unpinned_count = unpinned_count + 1
      end
    end
    series:inc()
  end
end

-- registry.resolve(name, req) -> plan { choices = {...}, alias, routed, migration, deadline }
-- A choice is { model = "provider/model" } or a group { deployments = {...}, strategy = }.
-- Raises on an unknown alias at `level` (as error's: 2 is resolve's caller);
-- a model past its sunset with no replacement is returned as plan.err.
-- A plan is shared by the calls that get it: read it, never change it.
-- listing: not a call (GET /v1/models asks what a name serves): not counted as one.
-- anchor: a call's own name across its resumes (a job's key): its migration side is drawn by it.
-- as_fallback: the name is a call's fallback (registry.resolve_fallback)
local function resolve(name, req, level, listing, anchor, as_fallback)
  level = level or 2
  if type(name) ~= "string" then error("model must be a string: an alias or \"provider/model\"", level) end
  local t = now()
  if memo.entries ~= registry.entries or memo.pinned ~= registry.pinned or t >= memo.expires then
    memo.entries, memo.pinned, memo.expires, memo.plans, memo.size, memo.providers = registry.entries,
      registry.pinned, t + MEMO_SECONDS, {}, 0, {}
  end
  local memo_key = as_fallback and ("\0fallback\0" .. name) or name
  local plan = memo.plans[memo_key]
  if plan then
    if plan.unpinned and not listing then count_unpinned(plan) end
    return plan
  end
  plan = { anchor = anchor, in_fallback = as_fallback or nil }
  local ok, choices = pcall(expand, name, req, plan, 0)
  plan.anchor, plan.met, plan.in_fallback = nil, nil, nil
  if not ok then
    if type(choices) == "table" and choices.kind then plan.err = choices return plan end
    -- an alias whose model names a provider with no adapter (misspelt): each call raises, which a
    -- gateway answers its client with a 400, and the operator, who can fix it, was told nothing
    if plan.unknown_provider and tostring(choices):find("unknown provider", 1, true) then
      warn_at("provider\0" .. plan.alias, "model registry: an alias's model names a provider with no adapter: " ..
        "its calls fail (resil-lua check says so)", { alias = plan.alias, model = plan.unknown_provider })
    end
    error(choices, level)
  end
  plan.choices = choices
  if plan.unpinned and not listing then count_unpinned(plan) end
  if not plan.migration and memo.size < MEMO_MAX then
    memo.plans[memo_key] = plan
    memo.size = memo.size + 1
  end
  return plan
end
function registry.resolve(name, req, level, listing, anchor) return resolve(name, req, level, listing, anchor) end

-- registry.resolve_fallback(name, req, level) -> the plan of a name a call falls back to (its
-- `fallback` list, its provider's): a migration in progress met there takes its old version, as
-- in the registry's own fallbacks (the canary is for the calls that name it). Resolved as a call's
-- own name, its canary drew a share of the fallback's calls, which its rollback never counted.
function registry.resolve_fallback(name, req, level) return resolve(name, req, level, nil, nil, true) end

-- a deployment group in the order to try it: the chosen one first.
-- state(d) -> open (bool), wait (seconds until its bucket admits one call)
function registry.order(group, state, left)
  local usable, skipped = {}, {}
  for _, d in ipairs(group.deployments) do
    local open, wait = state(d)
    d.wait = wait or 0
    if open or (left and d.wait > left) or d.weight <= 0 then skipped[#skipped + 1] = d else usable[#usable + 1] = d end
  end
  local first
  if #usable > 0 then
    if group.strategy == "least-wait" then
      first = usable[1]
      for _, d in ipairs(usable) do if d.wait < first.wait then first = d end end
    else
      local total = 0
      for _, d in ipairs(usable) do total = total + d.weight end
      local x = registry.random() * total
      first = usable[#usable]
      for _, d in ipairs(usable) do
        x = x - d.weight
        if x < 0 then first = d break end
      end
    end
  end
  local out = { first }
  for _, d in ipairs(usable) do if d ~= first then out[#out + 1] = d end end
  for _, d in ipairs(skipped) do out[#out + 1] = d end
  return out
end

---------------------------------------------------------------------------
-- problems for `resil-lua check`

-- registry.problems(entries, opts) -> list of { level, message, key }
-- opts: file, now (epoch), provider_known(p) -> bool, price(p, m) -> table|nil
function registry.problems(entries, opts)
  opts = opts or {}
  local file = opts.file
  local out = structure_errors(entries, file)
  if #out > 0 or type(entries) ~= "table" then return out end
  local t = opts.now or now()
  local function add(level, key, fmt, ...)
    out[#out + 1] = { level = level, key = key,
      message = ("%s: model '%s': " .. fmt):format(where(file, key), key, ...) }
  end
  local function check_model(key, what, m, need_pinned, pinned_here)
    if entries[m] and (entries[m].use or entries[m].deployments) then return end
    local p, name = split(m)
    if not p then -- (a deprecation's key names no provider either: a call naming it raised)
      add("error", key, "%s '%s' is neither an alias nor \"provider/model\"", what, m)
      return
    end
    if opts.provider_known and not opts.provider_known(p) then
      add("error", key, "%s '%s': unknown provider '%s' (no policies/providers/%s.lua)", what, m, p, p)
      return
    end
    if opts.price then
      local priced, why = opts.price(p, (name:gsub(":.*$", "")))
      if not priced and name:find(":", 1, true) then
        local whole, whole_why = opts.price(p, name)
        priced, why = whole, why or whole_why
      end
      if not priced and why then
        add("error", key, "%s '%s': %s: its calls would be recorded without a price", what, m, why)
      elseif not priced then
        add("error", key, "%s '%s' has no price (policies/pricing.lua): its calls would cost nothing in the ledger",
          what, m)
      end
    end
    if need_pinned and not registry.is_pinned(m) then
      add("error", key, "%s '%s' is not pinned to a version", what, m)
    elseif not registry.is_pinned(m) and not pinned_here then
      add("warning", key, "%s '%s' is not pinned to a version", what, m)
    end
  end
  local keys = {}
  for k in pairs(entries) do keys[#keys + 1] = k end
  table.sort(keys)
  local saved = registry.entries
  registry.entries = entries -- is_pinned reads pinned = true from the entries being checked
  for _, key in ipairs(keys) do
    local e = entries[key]
    -- an alias named as another provider's model: a call naming that model, the way a gateway's
    -- client names one, is served by someone else without a word (to pin a name, "openai/gpt-4o" =
    -- { use = "openai/gpt-4o-2024-08-06" }, is another matter)
    local named_for = split(key)
    local target = e.use or type(e.deployments) == "table" and type(e.deployments[1]) == "table" and e.deployments[1].use
    local served_by = type(target) == "string" and split(target)
    if named_for and served_by and named_for ~= served_by then
      add("warning", key, "is named as a model of '%s', but its calls go to %s: a call naming it is not served by %s",
        named_for, target, named_for)
    end
    if e.use then check_model(key, "use", e.use, false, e.pinned) end
    for _, d in ipairs(e.deployments or {}) do check_model(key, "deployment", d.use) end
    for _, f in ipairs(e.fallbacks or {}) do check_model(key, "fallback", f) end
    if e.migrate then check_model(key, "migrate.to", e.migrate.to, true) end
    if e.deprecated then
      if e.replacement then check_model(key, "replacement", e.replacement) end
      if e.sunset then
        local days = (day_of(e.sunset) - t) / 86400
        if days <= 0 and not e.replacement then
          add("error", key, "passed its sunset (%s) and has no replacement: its calls fail", e.sunset)
        elseif days <= 0 then
          add("warning", key, "passed its sunset (%s): its calls go to %s", e.sunset, e.replacement)
        elseif days > 0 and days <= 30 then
          add("warning", key, "sunset in %d days (%s)", math.ceil(days), e.sunset)
        end
      end
    end
  end
  registry.entries = saved
  return out
end

return registry
