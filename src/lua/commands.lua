-- The store's subcommands: `resil-lua runs [show ID [--html FILE] | forget ID | prune --older-than AGE]`,
-- `resil-lua costs [--by provider|model|user|day] [--since DATE] [--run ID] [--json|--csv]` and
-- `resil-lua budgets [show|release|set NAME ...]`.
-- The module is the command's entry point: the CLI runs
-- require("resil.commands")(arg) as its main task.
local resil = require "resil"
local backend_of = select(2, ...).backend_of -- (the private table's, src/resil.c: a store's backend)
local json = resil.json

-- What the commands print is redacted: step names and run ids may hold URLs
-- with credentials (?key=...), stored before anyone thought of it.
local redact = resil.redact

local function fail(fmt, ...)
  io.stderr:write("resil-lua: ", redact(fmt:format(...)), "\n")
  os.exit(1)
end

-- what a read of the store gave, or the command stops with its error on one
-- line (a store locked, frozen, corrupt: trouble from the world, not a bug
-- to trace back)
local function need(v, err)
  if v == nil then fail("%s", tostring(err)) end
  return v
end

-- Text from the store as a terminal shows it: control characters written
-- as \x1b and the like (C1 ones as \u009b), never sent as they are. A
-- step's error is a provider's or a model's text, and an escape sequence in
-- it acted on the operator's terminal (cleared it, retitled it, hid text,
-- made links).
local printable = select(2, ...).printable -- (prelude.lua's: keys list's too)

local function date(t) return t and os.date("!%Y-%m-%d %H:%M:%S", math.floor(t)) or "-" end

-- the columns a cell takes on a terminal: its characters, not its bytes (a budget or model named
-- "équipe" pushed every column after it one place left per accented letter)
local function columns(s) return utf8.len(s) or #s end

local function table_print(header, rows)
  local widths = {}
  for i, h in ipairs(header) do widths[i] = #h end
  for _, r in ipairs(rows) do
    for i, v in ipairs(r) do
      r[i] = printable(redact(tostring(v)))
      widths[i] = math.max(widths[i], columns(r[i]))
    end
  end
  local function line(r)
    local cells = {}
    -- (padded by hand: string.format takes widths of two digits only, and an
    -- error message makes a wider column)
    for i, v in ipairs(r) do
      v = tostring(v)
      cells[i] = v .. (" "):rep(widths[i] - columns(v))
    end
    -- (its trailing spaces cut by one anchored match: gsub("%s+$") tried each space of the line's
    -- padding in turn, quadratic in a wide column's, and `runs show` of 200 steps, one named by a
    -- 4 KB prompt, took minutes)
    print(table.concat(cells, "  "):match("^(.*%S)") or "")
  end
  line(header)
  for _, r in ipairs(rows) do line(r) end
  return line -- (for rows that come later)
end

-- What --json prints of the store's text, as the table prints it: redacted (a budget or user named
-- by a URL with its credentials was printed whole), and UTF-8 (a byte of another encoding, a model
-- named from a provider's bytes, made output no JSON parser reads): U+FFFD, as metrics and traces
local valid_utf8 = resil.json.utf8
local function json_text(v)
  if type(v) == "string" then return valid_utf8(redact(v)) end
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = json_text(x) end
  return out
end

-- cjson writes an empty table as {}: a list says []
local function json_list(items)
  if #items == 0 then return "[]" end
  local parts = {}
  for i, v in ipairs(items) do parts[i] = type(v) == "string" and v or json.encode(v) end
  return "[" .. table.concat(parts, ",") .. "]"
end

local commands = {}

-- "2/10" before "10": items in their order, each scope split at "/" (once per scope, in
-- `parts`: split at each comparison, a run of 20,000 items took 11 s to sort)
local function scope_parts(parts, s)
  local p = parts[s]
  if not p then
    p = { n = {} }
    p.map = {} -- (a scope's second map's items, "m2/1", after its first's: runs.lua's map_scope)
    for x in s:gmatch("[^/]+") do
      p[#p + 1], p.n[#p + 1], p.map[#p + 1] = x, tonumber(x), tonumber(x:match("^m(%d+)$")) or 1
    end
    parts[s] = p
  end
  return p
end
local function scope_less(parts, a, b)
  if a == b then return false end
  local pa, pb = scope_parts(parts, a), scope_parts(parts, b)
  for i = 1, math.max(#pa, #pb) do
    local x, y = pa[i], pb[i]
    if x == nil then return true end
    if y == nil then return false end
    if x ~= y then
      if pa.map[i] ~= pb.map[i] then return pa.map[i] < pb.map[i] end
      local nx, ny = pa.n[i], pb.n[i]
      if nx and ny then return nx < ny end
      return x < y
    end
  end
  return false
end

local function shell_quote(v)
  v = tostring(v)
  if v:match("^[%w%./_:=@%-+,]+$") then return v end
  -- (a line break or another control character, an -e's code of several lines: $'...', which the
  -- shells read back as it was; printed raw, each was \x0a and the command another code)
  if v:find("[%c\127]") then
    return "$'" .. v:gsub("[\\'%c\127]", function(c)
      if c == "\\" or c == "'" then return "\\" .. c end
      return c == "\n" and "\\n" or c == "\t" and "\\t" or ("\\x%02x"):format(c:byte())
    end) .. "'"
  end
  return "'" .. v:gsub("'", "'\\''") .. "'"
end

local function money(usd) return ("$%.6f"):format(usd or 0) end

-- A run still "running" whose holder died (kill -9, a crash, a machine gone) is resumed by hand:
-- -> its holder, as `runs` describes it ("pid N on HOST since T (gone)"), and whether it is gone
local function holder_of(s, run)
  if run.status ~= "running" or not run.owner then return nil end
  local backend = backend_of[s]
  if backend.holder_alive then -- (Redis: one holder asked, not every run read)
    local h, alive = require("resil.owner").describe(run.owner), backend:holder_alive(run.owner)
    if not (h and h.pid) then return nil end
    return ("pid %d on %s since %s%s"):format(h.pid, h.host, date(run.owner_since), alive and "" or " (gone)"),
      not alive
  end
  for _, r in ipairs(need(backend:runs_list(resil.store_now()))) do
    if r.id == run.id and r.holder and r.holder.pid then
      return ("pid %d on %s since %s%s"):format(r.holder.pid, r.holder.host, date(r.owner_since),
        r.holder_alive and "" or " (gone)"), not r.holder_alive
    end
  end
end

-- an item's state from its steps': the worst of them
local ITEM_STATE = { done = 1, running = 2, pending = 3, interrupted = 4, failed = 5 }

-- The run as `runs show` sees it: -> { run =, items = { {scope=, steps = {...}, state=, retries=, usd=} }, ...,
-- holder =, gone = }
local function run_report(s, id)
  local run, rerr = backend_of[s]:run_get(id)
  if run == nil and rerr ~= nil then need(nil, rerr) end -- (not "no such run": it could not be read)
  local steps = need(backend_of[s]:run_steps(id))
  if not run and #steps == 0 then
    -- a script that ran no step (or has not reached one) is its run in the ledger: its rows carry
    -- the id (runs.lua's current_id); it holds nothing and has nothing to resume
    local costs = need(resil.cost.breakdown("provider", { run = id }))
    if #costs == 0 then return nil end
    local usd, unpriced = 0, 0
    for _, c in ipairs(costs) do usd, unpriced = usd + c.usd, unpriced + (c.unpriced or 0) end
    return { run = { id = id, status = "no steps" }, items = {}, usd = usd, unpriced = unpriced, no_steps = true }
  end
  -- A step begun and not ended is running while its run's holder lives; otherwise its process died
  -- in it (kill -9, a crash): interrupted, and its item not done (it was listed done, its step
  -- missing: the operator read a half-done item as finished). Resuming runs it again.
  local holder, gone
  if run then holder, gone = holder_of(s, run) end
  local live = run and run.status == "running" and holder and not gone
  local done_at = {}
  for _, st in ipairs(steps) do if st.state == "done" then done_at[st.scope .. "|" .. st.seq] = true end end
  local items, by_scope = {}, {}
  local reason
  for _, st in ipairs(steps) do
    -- why the run failed outside its steps (runs.lua's resil.run.finish): the run's, not an item's step
    if st.scope == "" and st.name == "(run)" and st.state == "failed" then
      reason = st.error
      goto next
    end
    if st.state == "running" and not live then
      st.state = "interrupted"
      st.error = st.error or "its process ended (killed, crashed) before the step did; resuming runs it again"
    end
    local it = by_scope[st.scope]
    if not it then
      it = { scope = st.scope, steps = {}, retries = 0, usd = 0, unpriced = 0, state = "done" }
      by_scope[st.scope] = it
      items[#items + 1] = it
    end
    -- (a begun record of a place that has its result: the result is what happened)
    if not (st.state ~= "done" and done_at[st.scope .. "|" .. st.seq]) then
      it.steps[#it.steps + 1] = st
      it.retries = it.retries + (st.retries or 0)
      if (ITEM_STATE[st.state] or 5) > ITEM_STATE[it.state] then it.state = st.state end
    end
    ::next::
  end
  local costs = need(resil.cost.breakdown("item", { run = id }))
  local total, unpriced = 0, 0
  for _, c in ipairs(costs) do
    total, unpriced = total + c.usd, unpriced + (c.unpriced or 0)
    local it = by_scope[c.key or ""]
    if it then it.usd, it.unpriced = it.usd + c.usd, it.unpriced + (c.unpriced or 0) end
  end
  local parts = {}
  table.sort(items, function(a, b) return scope_less(parts, a.scope, b.scope) end)
  for _, it in ipairs(items) do table.sort(it.steps, function(a, b) return a.seq < b.seq end) end
  run = run or { id = id }
  run.reason = reason
  return { run = run, items = items, usd = total, unpriced = unpriced, holder = holder, gone = gone }
end

-- -> the command that resumes the run, or nil when none can be said: an `-e` run recorded
-- without its code (by versions before, or past 8 KB) is resumed only by its code, a program's
-- chunk (resil_load_string, "=name") by its program
local function resume_command(s, run)
  local args = run.args and json.decode(run.args) or {}
  if run.script == "-e" and type(args[1]) ~= "string" then return nil end
  if type(run.script) == "string" and run.script:sub(1, 1) == "=" then return nil end -- (an embedder's chunk)
  local parts = { "resil-lua" }
  if s.url ~= ".resil/state.db" then parts[#parts + 1] = "--store " .. shell_quote(s.url) end
  parts[#parts + 1] = "--run " .. shell_quote(run.id)
  parts[#parts + 1] = shell_quote(run.script or "SCRIPT")
  for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
  return table.concat(parts, " ")
end

-- calls in the ledger without a price are not a $0 (costs --by says UNPRICED, the page too): an
-- item whose only call had no price read "$0.000000", and the run's cost said nothing of it
local function unpriced_note(n)
  if n == 0 then return "" end
  return (" (+%d unpriced call%s)"):format(n, n == 1 and "" or "s")
end

-- A run's default id is its script's name and a hash of its arguments (pipeline-010adb046611):
-- `runs show pipeline` said only that no run has that name. -> "; ..., the runs named after it" | ""
local function runs_named_after(s, name)
  local list = backend_of[s]:runs_list(resil.store_now())
  local found = {}
  for _, r in ipairs(list or {}) do
    if r.id:sub(1, #name + 1) == name .. "-" and r.id:sub(#name + 2):match("^%x%x%x%x%x%x%x%x%x%x%x%x$") then
      found[#found + 1] = r.id
    end
  end
  if #found == 0 then return "" end
  local more = #found > 5 and (" and %d more"):format(#found - 5) or ""
  for i = #found, 6, -1 do found[i] = nil end
  return printable(redact(("; the runs named after %s.lua and its arguments: %s%s"):format(name,
    table.concat(found, ", "), more)))
end

local function runs_show(s, args)
  local id = args[2] or fail("runs show: which run? (resil-lua runs lists them)")
  local html
  if args[3] == "--html" then html = args[4] or fail("runs show: --html needs a file name") end
  local extra = args[html and 5 or 3]
  -- (`--html -`, as tools take it, made a file named '-' in the working directory and said "wrote -";
  -- it is the standard output itself, not /dev/stdout opened again: that truncated a file the
  -- output was appended to with >>, and failed on a socket)
  if extra then fail("runs show: unknown argument '%s' (runs show ID [--html FILE])", extra) end
  local report = run_report(s, id) or fail("runs show: no steps recorded for run '%s'%s", id, runs_named_after(s, id))
  local run = report.run
  if report.no_steps and not html then
    -- (or `runs forget` let its steps go: the line said its script had checkpointed nothing)
    print(printable(redact(("run %s: no steps recorded (its script checkpointed nothing, or the run was forgotten; " ..
      "nothing to resume); cost %s%s"):format(run.id, money(report.usd), unpriced_note(report.unpriced)))))
    return
  end
  -- (a run whose holder died says "running" for good: it was shown as one going on, without
  -- its holder or the command that resumes it)
  local holder, gone = report.holder, report.gone
  run.holder = holder
  local resume = run.status ~= "done" and not report.no_steps and (run.status ~= "running" or gone) and
    resume_command(s, run) or nil
  if html then -- the page: src/lua/report.lua
    local ok, err = require("resil.report").write(html, report, need(backend_of[s]:cost_rows({ run = id })), resume)
    if not ok then fail("runs show: cannot write %s: %s", html == "-" and "the standard output" or html, tostring(err)) end
    -- (not after a page written through /dev/stdout: the line went over the page's first bytes)
    if err then print(("wrote %s"):format(html)) end
    return
  end
  print(printable(redact(("run %s: %s%s%s"):format(run.id, run.status or "?",
    run.script and (" (" .. run.script .. ")") or "", holder and (", held by " .. holder) or ""))))
  if run.reason then print(printable(redact("why: " .. run.reason:gsub("%s+", " ")))) end
  local rows, counts = {}, { done = 0, failed = 0, pending = 0, interrupted = 0, running = 0 }
  local retries = 0
  for _, it in ipairs(report.items) do
    counts[it.state] = (counts[it.state] or 0) + 1
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
    item_rows[#item_rows + 1] = { it.scope == "" and "-" or it.scope, it.state, #it.steps, it.retries,
                                  money(it.usd) .. unpriced_note(it.unpriced) }
  end
  table_print({ "ITEM", "STATE", "STEPS", "RETRIES", "COST" }, item_rows)
  print("")
  -- (interrupted and running only when there are some: the line kept its form)
  print(("%d items: %d done, %d failed, %d pending%s%s; %d retries; cost %s%s"):format(#report.items, counts.done,
    counts.failed, counts.pending, counts.interrupted > 0 and (", %d interrupted"):format(counts.interrupted) or "",
    counts.running > 0 and (", %d running"):format(counts.running) or "", retries, money(report.usd),
    unpriced_note(report.unpriced)))
  if resume then print("resume: " .. printable(redact(resume))) end
end

-- the holder a forget was refused for, as `runs` shows it
local function holder_text(holder)
  local h = require("resil.owner").describe(holder)
  return h and h.pid and ("pid %d on %s"):format(h.pid, h.host) or "another process"
end

-- `runs forget ID`: the run and its checkpointed results gone (its next start runs every step
-- again); its ledger rows stay. Refused while a live process holds the run.
local function runs_forget(s, args)
  local id = args[2] or fail("runs forget: which run? (resil-lua runs lists them)")
  if args[3] then fail("runs forget: unknown argument '%s' (runs forget ID)", args[3]) end
  local ok, why, holder = backend_of[s]:run_forget(id, resil.store_now())
  if ok == nil then fail("runs forget: %s", tostring(why)) end
  if not ok and why == "unknown" then
    fail("runs forget: no run '%s' (resil-lua runs lists them)%s", printable(id), runs_named_after(s, id))
  end
  if not ok then fail("runs forget: run '%s' is held by %s: stop it first", printable(id), holder_text(holder)) end
  print(("forgot run %s"):format(printable(redact(id))))
end

-- `runs prune --older-than AGE [--dry-run]`: every run last updated before now - AGE (30d, 12h,
-- 90m, 0s) and held by no live process is forgotten. Step results are kept until then: a
-- store of a pipeline that runs every day grows by its results, up to 32 MB a step.
local function runs_prune(s, args)
  local age, dry
  local i = 2
  while args[i] do
    if args[i] == "--older-than" then
      local n, unit = tostring(args[i + 1]):match("^(%d+%.?%d*)([dhms])$")
      if not n then fail("runs prune: --older-than takes an age such as 30d, 12h, 90m or 0s") end
      age = tonumber(n) * ({ d = 86400, h = 3600, m = 60, s = 1 })[unit]
      i = i + 2
    elseif args[i] == "--dry-run" then
      dry, i = true, i + 1
    else
      fail("runs prune: unknown argument '%s' (runs prune --older-than AGE [--dry-run])", args[i])
    end
  end
  if not age then fail("runs prune: --older-than AGE is required (30d, 12h, 90m, 0s)") end
  local now = resil.store_now()
  local gone, kept = 0, 0
  for _, r in ipairs(need(backend_of[s]:runs_list(now))) do
    local old = (tonumber(r.updated_at) or now) <= now - age
    if old and not r.holder_alive then
      if dry then
        print(("would forget %s (%s, updated %s)"):format(printable(redact(r.id)), r.status, date(r.updated_at)))
        gone = gone + 1
      else
        local ok, why = backend_of[s]:run_forget(r.id, now)
        if ok == nil then fail("runs prune: %s", tostring(why)) end
        -- (one another prune or `runs forget` let go since the list is neither: it was counted kept)
        if ok then gone = gone + 1 elseif why ~= "unknown" then kept = kept + 1 end
      end
    else
      kept = kept + 1
    end
  end
  print(("%s %d run%s, kept %d (newer, or held by a live process)"):format(dry and "would forget" or "forgot",
    gone, gone == 1 and "" or "s", kept))
end

local RUNS_SUBCOMMANDS = { show = runs_show, forget = runs_forget, prune = runs_prune }
function commands.runs(args)
  -- (before the store: a typo was "no store at .resil/state.db" in a folder without one)
  if args[1] and not RUNS_SUBCOMMANDS[args[1]] then
    fail("runs: unknown argument '%s' (runs, runs show ID, runs forget ID, runs prune --older-than AGE)", args[1])
  end
  local s, err = resil.store(nil, { existing = true })
  if not s then fail("%s", tostring(err)) end
  if args[1] then return RUNS_SUBCOMMANDS[args[1]](s, args) end
  local runs = need(backend_of[s]:runs_list(resil.store_now()))
  local rows = {}
  for _, r in ipairs(runs) do
    -- who runs it now (a process that died while holding it shows as gone)
    local h = r.holder
    local holder = h and h.pid and ("pid %d on %s since %s%s"):format(h.pid, h.host, date(r.owner_since),
      r.holder_alive and "" or " (gone)") or ""
    rows[#rows + 1] = { r.id, r.status, r.steps, date(r.created_at), date(r.updated_at), holder }
  end
  if #rows == 0 then print("no runs recorded in " .. redact(s.url)) return end
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
    -- UTC midnight, as the ledger's days are, by the civil calendar's day count (H. Hinnant's
    -- days_from_civil): the local-time round trip it replaced was off by the zone's DST hour
    -- (Berlin or New York in summer: --since 2026-07-01 counted 23:00-24:00 UTC of June 30)
    local yy = m <= 2 and y - 1 or y
    local era = yy // 400
    local yoe = yy - era * 400
    local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
    return (era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468) * 86400
  end
  local n, unit = v:match("^(%d+)([dh])$")
  if n then return resil.store_now() - tonumber(n) * (unit == "d" and 86400 or 3600) end
  fail("costs: --since takes YYYY-MM-DD, Nd or Nh, not '%s'", v)
end

local function csv_cell(v)
  if v == nil then return "" end
  v = redact(tostring(v))
  -- a text a spreadsheet would take for a formula (=, +, -, @, a tab or CR first) is kept as
  -- text: a ledger's model is what the provider's answer said, "=HYPERLINK(...)" ran as one
  if v:find("^[=+%-@\t\r]") and not tonumber(v) then v = "'" .. v end
  if v:find('[,"\r\n]') then return '"' .. v:gsub('"', '""') .. '"' end
  return v
end

local function csv_print(header, rows)
  local function line(r)
    local cells = {}
    for i = 1, #header do cells[i] = csv_cell(r[i]) end
    io.stdout:write(table.concat(cells, ","), "\n")
  end
  line(header)
  for _, r in ipairs(rows) do line(r) end
  return line -- (for rows that come later)
end

function commands.costs(args)
  local by, since, as_json, as_csv, run = nil, nil, false, false, nil
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
    elseif a == "--run" then
      run = args[i + 1] or fail("costs: --run needs a run id (resil-lua runs lists them)")
      i = i + 2
    elseif a == "--json" then
      as_json, i = true, i + 1
    elseif a == "--csv" then
      as_csv, i = true, i + 1
    else
      fail("costs: unknown argument '%s'", a)
    end
  end
  if as_json and as_csv then fail("costs: --json or --csv, not both") end
  local filter = { since = since, run = run }
  local s, err = resil.store(nil, { existing = true }) -- (the one resil.cost reads too)
  if not s then fail("%s", tostring(err)) end
  if run then
    -- a run id typed wrong read as a run that spent nothing ("total $0.000000", exit 0); a run the
    -- store knows, or one forgotten whose rows the ledger keeps, is answered as before
    local rows = need(resil.cost.breakdown("provider", { run = run }))
    local known, gerr = #rows > 0 or backend_of[s]:run_get(run)
    if known == nil and gerr ~= nil then fail("costs: %s", tostring(gerr)) end
    if not known then
      fail("costs: no run '%s' in the store, and no ledger rows for it (resil-lua runs lists the runs)%s",
        printable(redact(run)), runs_named_after(s, run))
    end
  end
  if as_csv and not by then -- the ledger's rows, for a spreadsheet, written as they are read
    local header = { "at", "provider", "model", "operation", "user", "run", "item", "step", "budget", "usd", "units" }
    local line = csv_print(header, {})
    need(backend_of[s]:cost_rows(filter, function(r)
      line({ os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(r.at)), r.provider, r.model, r.operation, r.user,
             r.run, r.item, r.step, r.budget, r.micro_usd and ("%.6f"):format(r.micro_usd / 1e6) or "", r.units })
    end))
    return
  end
  -- Money is said from the ledger's whole micro-dollars, written out as digits: a double past
  -- $8e9 has no room for them (ten rows of $999,999,999.999999 and one of $0.000007 said
  -- "usd":10000000000 in --json, $9999999999.999998 as a TOTAL, for 9999999999.999997)
  local function usd_text(micro)
    micro = math.tointeger(micro) or math.floor(micro + 0.5)
    return ("%d.%06d"):format(micro // 1000000, micro % 1000000)
  end
  local function usd_json(micro) -- (a JSON number, without the zeros after its last digit)
    return (usd_text(micro):gsub("%.?0+$", ""))
  end
  if by then
    local rows = need(backend_of[s]:cost_query(by, filter)) -- (resil.cost.breakdown's, in micro-dollars)
    for _, r in ipairs(rows) do
      r.unpriced = (r.unpriced or 0) > 0 and r.unpriced or nil
    end
    if as_json then
      local out = {}
      for i, r in ipairs(rows) do
        out[i] = ('{"usd":%s,'):format(usd_json(r.micro_usd)) ..
          -- (a row of calls without one has its key too, null: it had none, and row["key"] failed)
          json.encode({ key = r.key == nil and json.null or json_text(r.key), calls = r.calls,
            unpriced = r.unpriced }):sub(2)
      end
      print(json_list(out))
      return
    end
    if as_csv then
      local out = {}
      -- (with the calls that had no price, as the table and --json say them: a model only
      -- unpriced calls reached read "0.000000" in a spreadsheet, a silent zero)
      for i, r in ipairs(rows) do out[i] = { r.key, r.calls, usd_text(r.micro_usd), r.unpriced or 0 } end
      csv_print({ by, "calls", "usd", "unpriced" }, out)
      return
    end
    local out, total, unpriced = {}, 0, 0
    for _, r in ipairs(rows) do
      out[#out + 1] = { r.key or "-", r.calls, "$" .. usd_text(r.micro_usd), r.unpriced or "" }
      total, unpriced = total + r.micro_usd, unpriced + (r.unpriced or 0)
    end
    out[#out + 1] = { "TOTAL", "", "$" .. usd_text(total), unpriced > 0 and unpriced or "" }
    table_print({ by:upper(), "CALLS", "USD", "UNPRICED" }, out)
  else
    -- (with the calls without a price counted too: "total $0.000000" said nothing of a thousand
    -- calls the ledger could not price)
    local row = need(backend_of[s]:cost_query(nil, filter))[1] or { micro_usd = 0 }
    local unpriced = row.unpriced or 0
    if as_json then
      print(('{"usd":%s%s}'):format(usd_json(row.micro_usd), unpriced > 0 and (',"unpriced":%d'):format(unpriced) or ""))
      return
    end
    print(("total $%s%s"):format(usd_text(row.micro_usd), unpriced_note(unpriced)))
  end
end

local function age(seconds)
  if not seconds then return "-" end
  if seconds < 120 then return ("%ds"):format(math.floor(seconds)) end
  if seconds < 7200 then return ("%dm"):format(math.floor(seconds / 60)) end
  return ("%.1fh"):format(seconds / 3600)
end

local function holder_text(o)
  if not o then return "-" end
  return o.pid and ("pid %d on %s"):format(o.pid, o.host) or tostring(o.host or "-")
end

-- one budget as JSON text (its holds a list, even when empty)
local function budget_json(b)
  local holds = {}
  for i, h in ipairs(b.holds) do
    holds[i] = json_text({ ticket = h.ticket, usd = h.usd, owner = h.owner, expires_at = h.expires_at, age = h.age })
  end
  local head = json.encode(json_text({ name = b.name, limit = b.limit, per = b.per, period = b.period,
    source = b.source, spent = b.spent, reserved = b.reserved, remaining = b.remaining }))
  return head:sub(1, -2) .. ',"holds":' .. json_list(holds) .. "}"
end

local function opt_money(v) return v and money(v) or "-" end

-- budgets set's arguments -> limit, per (nil: kept), checked before the store is opened:
-- set makes the store (a limit may come before the first run), and one refused for its usage (a
-- typo, typed in another folder) left an empty .resil/state.db there, where `budgets` then listed
-- nothing rather than saying that no store is there
local function set_args(args)
  if not args[2] then fail("budgets set: which budget?") end
  -- (`budgets set --limit 5`, the name left out, named the budget '--limit': "unknown argument '5'")
  if args[2] == "--limit" or args[2] == "--per" then
    fail("budgets set: which budget? (budgets set NAME --limit USD [--per day|month|none])")
  end
  local limit, per
  local i = 3
  while args[i] do
    local a, v = args[i], args[i + 1]
    if (a == "--limit" or a == "--per") and v == nil then fail("budgets set: %s needs a value", a) end
    if a == "--limit" then
      -- (decimal only: Lua's tonumber took 0x10 as $16)
      limit = v:match("^%-?%d*%.?%d*[eE]?[-+]?%d*$") and v:find("%d") and tonumber(v)
      -- (as resil.budget's: past 1e12 USD its micro-dollars pass 2^63 and are stored as a float)
      if not limit or not (limit >= 0 and limit <= 1e12) then
        -- (keys add --budget takes 50/day: the same typed here gets the option that says it)
        local period = v:match("^[%d.]+/(%a+)$")
        fail("budgets set: --limit takes an amount in USD from 0 to 1e12, not '%s'%s", v,
          period and (" (a period is --per %s)"):format(period) or "")
      end
      -- (a limit the ledger holds as $0 was set so)
      if require("resil.costs").below_unit(limit) then
        fail("budgets set: --limit %s is below the ledger's unit, $0.000001 (0 is a limit that lets nothing " ..
          "through)", v)
      end
    elseif a == "--per" then
      if v ~= "day" and v ~= "month" and v ~= "none" then
        fail("budgets set: --per takes day, month or none, not '%s'", tostring(v))
      end
      per = v
    else
      fail("budgets set: unknown argument '%s'", a)
    end
    i = i + 2
  end
  if not limit then fail("budgets set: --limit USD is needed") end
  return limit, per
end

-- resil-lua budgets [--json] | show NAME [--json] | release NAME [--stale] | set NAME --limit USD [--per P]
local BUDGETS_USAGE = "(budgets, budgets show NAME, budgets release NAME [--stale], " ..
  "budgets set NAME --limit USD [--per day|month|none])"
local BUDGETS_SUBCOMMANDS = { ["--json"] = true, show = true, release = true, set = true }
function commands.budgets(args)
  local sub = args[1]
  -- (before the store, as runs does)
  if sub ~= nil and not BUDGETS_SUBCOMMANDS[sub] then fail("budgets: unknown argument '%s' %s", sub, BUDGETS_USAGE) end
  local set_limit, set_per
  if sub == "set" then set_limit, set_per = set_args(args) end
  local s, err = resil.store(nil, { existing = sub ~= "set" }) -- (set may come before any run)
  if not s then fail("%s", tostring(err)) end
  local admin = require "resil.budgets"
  local as_json = false
  for i = 1, #args do if args[i] == "--json" then as_json = true end end
  if sub == nil or sub == "--json" then
    for i = 1, #args do if args[i] ~= "--json" then fail("budgets: unknown argument '%s'", args[i]) end end
    local list, lerr = admin.list(s)
    if not list then fail("budgets: %s", tostring(lerr or "the store is unavailable")) end
    if as_json then
      local out = {}
      for i, b in ipairs(list) do out[i] = budget_json(b) end
      print(json_list(out))
      return
    end
    if #list == 0 then print("no budgets recorded in " .. redact(s.url)) return end
    local rows = {}
    for _, b in ipairs(list) do
      rows[#rows + 1] = { b.name, opt_money(b.limit), b.per, b.period, money(b.spent), money(b.reserved),
                          opt_money(b.remaining), #b.holds, b.source or "-" }
    end
    table_print({ "BUDGET", "LIMIT", "PER", "PERIOD", "SPENT", "RESERVED", "REMAINING", "HOLDS", "LIMIT SET BY" },
      rows)
    return
  end
  local name = args[2]
  -- the budget of the live key named n, when it has one
  -- Each read that fails stops it with the store's error: taken for "none", each went on to the
  -- next, and against a frozen Redis (?down=0) each waited its timeout (six of them)
  local function key_budget(n)
    local list, kerr = require("resil.keys").list()
    if not list then fail("budgets %s: %s", sub, tostring(kerr)) end
    for _, rec in ipairs(list) do
      if rec.name == n and rec.budget and not rec.revoked then return rec.budget end
    end
  end
  -- n's settings as the store keeps them; a live key's budget, not yet reserved against, is
  -- in its record; any other name the store has no budget for is an error (a mistyped name
  -- showed $0 spent, exit 0), with the key's budget's name when n is a key's
  local function known(n)
    local cfg, cerr = backend_of[s]:budget_config(n)
    if cfg ~= nil then return cfg end
    if cerr ~= nil then fail("budgets %s: %s", sub, tostring(cerr)) end
    local kb = n:match("^key:(.+)$") and key_budget(n:sub(5))
    if kb then
      return { name = n, declared_micro = math.floor(kb.limit * 1e6 + 0.5), declared_per = kb.per or "none",
               source = "keys add" }
    end
    local hint = ""
    if not n:find("^key:") and (backend_of[s]:budget_config("key:" .. n) or key_budget(n)) then
      hint = ("; the gateway key %s's budget is 'key:%s'"):format(printable(n), printable(n))
    end
    fail("budgets %s: no budget '%s' in %s%s (resil-lua budgets lists them)", sub, printable(n), redact(s.url), hint)
  end
  if sub == "show" then
    name = name or fail("budgets show: which budget? (resil-lua budgets lists them)")
    for i = 3, #args do if args[i] ~= "--json" then fail("budgets show: unknown argument '%s'", args[i]) end end
    local b, berr = admin.show(s, name, known(name))
    if not b then fail("budgets show: %s", tostring(berr)) end
    if as_json then print(budget_json(b)) return end
    print(("budget %s: limit %s per %s (%s), period %s"):format(b.name, opt_money(b.limit), b.per,
      b.source and ("set by " .. (b.source == "set" and "budgets set" or b.source)) or "not known to the store", b.period))
    print(("spent %s, reserved %s, remaining %s"):format(money(b.spent), money(b.reserved), opt_money(b.remaining)))
    if #b.holds == 0 then print("no open holds") return end
    local rows = {}
    for _, h in ipairs(b.holds) do
      rows[#rows + 1] = { h.ticket, money(h.usd), holder_text(h.owner), age(h.age), date(h.expires_at) }
    end
    table_print({ "HOLD", "USD", "OWNER", "AGE", "EXPIRES (UTC)" }, rows)
    return
  end
  if sub == "release" then
    name = name or fail("budgets release: which budget?")
    local stale = false
    for i = 3, #args do
      if args[i] == "--stale" then stale = true else fail("budgets release: unknown argument '%s'", args[i]) end
    end
    known(name)
    local n, rerr = admin.release(s, name, stale)
    if not n then fail("budgets release: %s", tostring(rerr)) end
    print(("released %d %shold%s of budget %s"):format(n, stale and "stale " or "", n == 1 and "" or "s", name))
    return
  end
  if sub == "set" then
    local limit, per = set_limit, set_per
    -- a gateway key's budget is "key:NAME": `budgets set NAME` made a budget
    -- nothing reserves against, and the key went on spending to its old limit
    local function config_of(n)
      local cfg, cerr = backend_of[s]:budget_config(n)
      if cfg == nil and cerr ~= nil then fail("budgets set: %s", tostring(cerr)) end
      return cfg
    end
    if not name:find("^key:") and not config_of(name) and (key_budget(name) or config_of("key:" .. name)) then
      fail("budgets set: no budget is named '%s'; the gateway key %s's budget is 'key:%s' " ..
        "(resil-lua budgets set key:%s --limit ...)", name, name, name, name)
    end
    if not per then -- keep the period the budget has
      local cfg = config_of(name) or {}
      -- (a key's budget before the gateway's first reservation: its record's period, not none)
      local kb = not cfg.per and not cfg.declared_per and name:match("^key:(.+)$") and key_budget(name:sub(5))
      per = cfg.per or cfg.declared_per or kb and kb.per or "none"
    end
    local ok, serr = admin.set(s, name, limit, per)
    if not ok then fail("budgets set: %s", tostring(serr)) end
    print(("budget %s: limit %s per %s (every process reserves against it from now on)"):format(name, money(limit),
      per))
    return
  end
  fail("budgets: unknown argument '%s' %s", sub, BUDGETS_USAGE)
end

return function(args)
  local name = args[0]
  local fn = commands[name] or fail("unknown command '%s'", tostring(name))
  fn(args)
end
