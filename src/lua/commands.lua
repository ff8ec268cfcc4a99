-- The store's subcommands: `resil-lua runs [show ID]` and
-- `resil-lua costs [--by provider|model|user|day] [--since DATE] [--json]`.
-- The module is the command's entry point: the CLI runs
-- require("resil.commands")(arg) as its main task.
local resil = require "resil"
local json = resil.json

-- What the commands print is redacted: step names and run ids may hold URLs
-- with credentials (?key=...), stored before anyone thought of it.
local redact = resil.redact

local function fail(fmt, ...)
  io.stderr:write("resil-lua: ", redact(fmt:format(...)), "\n")
  os.exit(1)
end

local function date(t) return t and os.date("!%Y-%m-%d %H:%M:%S", math.floor(t)) or "-" end

local function table_print(header, rows)
  local widths = {}
  for i, h in ipairs(header) do widths[i] = #h end
  for _, r in ipairs(rows) do
    for i, v in ipairs(r) do
      r[i] = redact(tostring(v))
      widths[i] = math.max(widths[i], #r[i])
    end
  end
  local function line(r)
    local cells = {}
    for i, v in ipairs(r) do cells[i] = ("%-" .. widths[i] .. "s"):format(tostring(v)) end
    print((table.concat(cells, "  "):gsub("%s+$", "")))
  end
  line(header)
  for _, r in ipairs(rows) do line(r) end
end

local commands = {}

-- "2/10" before "10": items in their order, each scope split at "/"
local function scope_less(a, b)
  if a == b then return false end
  local pa, pb = {}, {}
  for p in a:gmatch("[^/]+") do pa[#pa + 1] = p end
  for p in b:gmatch("[^/]+") do pb[#pb + 1] = p end
  for i = 1, math.max(#pa, #pb) do
    local x, y = pa[i], pb[i]
    if x == nil then return true end
    if y == nil then return false end
    if x ~= y then
      local nx, ny = tonumber(x), tonumber(y)
      if nx and ny then return nx < ny end
      return x < y
    end
  end
  return false
end

local function shell_quote(v)
  v = tostring(v)
  if v:match("^[%w%./_:=@%-+,]+$") then return v end
  return "'" .. v:gsub("'", "'\\''") .. "'"
end

local function money(usd) return ("$%.6f"):format(usd or 0) end

-- The run as `runs show` sees it: -> { run =, items = { {scope=, steps = {...}, state=, retries=, usd=} }, ... }
local function run_report(s, id)
  local run = s.backend:run_get(id)
  local steps = assert(s.backend:run_steps(id))
  if not run and #steps == 0 then return nil end
  local items, by_scope = {}, {}
  for _, st in ipairs(steps) do
    local it = by_scope[st.scope]
    if not it then
      it = { scope = st.scope, steps = {}, retries = 0, usd = 0, state = "done" }
      by_scope[st.scope] = it
      items[#items + 1] = it
    end
    it.steps[#it.steps + 1] = st
    it.retries = it.retries + (st.retries or 0)
    if st.state == "failed" then it.state = "failed"
    elseif st.state == "pending" and it.state ~= "failed" then it.state = "pending" end
  end
  local costs = assert(resil.cost.breakdown("item", { run = id }))
  local total = 0
  for _, c in ipairs(costs) do
    total = total + c.usd
    local it = by_scope[c.key or ""]
    if it then it.usd = it.usd + c.usd end
  end
  table.sort(items, function(a, b) return scope_less(a.scope, b.scope) end)
  for _, it in ipairs(items) do table.sort(it.steps, function(a, b) return a.seq < b.seq end) end
  return { run = run or { id = id }, items = items, usd = total }
end

local function resume_command(s, run)
  local args = run.args and json.decode(run.args) or {}
  local parts = { "resil-lua" }
  if s.url ~= ".resil/state.db" then parts[#parts + 1] = "--store " .. shell_quote(s.url) end
  parts[#parts + 1] = "--run " .. shell_quote(run.id)
  parts[#parts + 1] = shell_quote(run.script or "SCRIPT")
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  return table.concat(parts, " ")
end

local function runs_show(s, args)
  local id = args[2] or fail("runs show: which run? (resil-lua runs lists them)")
  local report = run_report(s, id) or fail("runs show: no steps recorded for run '%s'", id)
  local run = report.run
  print(("run %s: %s%s"):format(run.id, run.status or "?", run.script and (" (" .. run.script .. ")") or ""))
  local rows, counts = {}, { done = 0, failed = 0, pending = 0 }
  local retries = 0
  for _, it in ipairs(report.items) do
    counts[it.state] = counts[it.state] + 1
    retries = retries + it.retries
    for _, st in ipairs(it.steps) do
      rows[#rows + 1] = { st.scope == "" and "-" or st.scope, st.seq, st.name, st.state, st.retries or 0,
                          date(st.at), st.error and (st.error:gsub("%s+", " ")) or "" }
    end
  end
  table_print({ "ITEM", "SEQ", "STEP", "STATE", "RETRIES", "AT (UTC)", "ERROR" }, rows)
  print("")
  local item_rows = {}
  for _, it in ipairs(report.items) do
    item_rows[#item_rows + 1] = { it.scope == "" and "-" or it.scope, it.state, #it.steps, it.retries, money(it.usd) }
  end
  table_print({ "ITEM", "STATE", "STEPS", "RETRIES", "COST" }, item_rows)
  print("")
  print(("%d items: %d done, %d failed, %d pending; %d retries; cost %s"):format(#report.items, counts.done,
    counts.failed, counts.pending, retries, money(report.usd)))
  if run.status ~= "done" and run.status ~= "running" then
    print("resume: " .. redact(resume_command(s, run)))
  end
end

function commands.runs(args)
  local s, err = resil.store()
  if not s then fail("%s", tostring(err)) end
  if args[1] == "show" then return runs_show(s, args) end
  if args[1] then fail("runs: unknown argument '%s' (runs, or runs show ID)", args[1]) end
  local runs = assert(s.backend:runs_list(resil.store_now()))
  local rows = {}
  for _, r in ipairs(runs) do
    -- who runs it now (a process that died while holding it shows as gone)
    local h = r.holder
    local holder = h and h.pid and ("pid %d on %s since %s%s"):format(h.pid, h.host, date(r.owner_since),
      r.holder_alive and "" or " (gone)") or ""
    rows[#rows + 1] = { r.id, r.status, r.steps, date(r.created_at), date(r.updated_at), holder }
  end
  if #rows == 0 then print("no runs recorded in " .. s.url) return end
  table_print({ "RUN", "STATUS", "STEPS DONE", "STARTED (UTC)", "UPDATED (UTC)", "HOLDER" }, rows)
end

local function parse_since(v)
  local y, m, d = v:match("^(%d%d%d%d)-(%d%d)-(%d%d)$")
  if y then
    y, m, d = tonumber(y), tonumber(m), tonumber(d)
    local t = os.time({ year = y, month = m, day = d, hour = 12 })
    local back = os.date("*t", t) -- os.time normalises 2026-13-45 into a real date: refuse that
    if back.year ~= y or back.month ~= m or back.day ~= d then
      fail("costs: --since %s is not a date (YYYY-MM-DD)", v)
    end
    return os.time({ year = y, month = m, day = d, hour = 0 }) - os.time(os.date("!*t", 0))
  end
  local n, unit = v:match("^(%d+)([dh])$")
  if n then return resil.store_now() - tonumber(n) * (unit == "d" and 86400 or 3600) end
  fail("costs: --since takes YYYY-MM-DD, Nd or Nh, not '%s'", v)
end

function commands.costs(args)
  local by, since, as_json = nil, nil, false
  local i = 1
  while args[i] do
    local a = args[i]
    if a == "--by" then
      by = args[i + 1] or fail("costs: --by needs provider, model, user or day")
      if not ({ provider = 1, model = 1, user = 1, day = 1 })[by] then
        fail("costs: --by takes provider, model, user or day, not '%s'", by)
      end
      i = i + 2
    elseif a == "--since" then
      since = parse_since(args[i + 1] or fail("costs: --since needs a date"))
      i = i + 2
    elseif a == "--json" then
      as_json, i = true, i + 1
    else
      fail("costs: unknown argument '%s'", a)
    end
  end
  local filter = { since = since }
  if by then
    local rows = assert(resil.cost.breakdown(by, filter))
    if as_json then print(json.encode(#rows > 0 and rows or json.decode("[]"))) return end
    local out, total = {}, 0
    for _, r in ipairs(rows) do
      out[#out + 1] = { r.key or "-", r.calls, ("$%.6f"):format(r.usd) }
      total = total + r.usd
    end
    out[#out + 1] = { "TOTAL", "", ("$%.6f"):format(total) }
    table_print({ by:upper(), "CALLS", "USD" }, out)
  else
    local total = assert(resil.cost.total(filter))
    if as_json then print(json.encode({ usd = total })) return end
    print(("total $%.6f"):format(total))
  end
end

return function(args)
  local name = args[0]
  local fn = commands[name] or fail("unknown command '%s'", tostring(name))
  fn(args)
end
