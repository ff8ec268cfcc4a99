-- `resil-lua runs show ID --html FILE`: the run as one HTML page that opens
-- without a network (CSS, SVG and the little script inline): a timeline of
-- each item's steps, cost by provider and model from the ledger, attempt
-- latency by provider, retries and fallbacks by class, and the failures with
-- their errors. The charts are SVG drawn here, so the page reads the same
-- with scripts off; the script only sorts tables.
-- Every text from the store passes resil.redact, then is escaped.
local resil = require "resil"
local plain_file = select(2, ...).plain_file
local bidi_escaped = select(2, ...).bidi_escaped
local json = resil.json
local redact = resil.redact

local M = {}

-- Text as the page's UTF-8 can hold it: each byte that is no part of a valid sequence (a step
-- named from a Latin-1 file, a provider's error cut mid-character) is U+FFFD. Written raw, the
-- page was not UTF-8 (a validator, an HTML parser, a browser's decoder rejected it or guessed);
-- control characters are shown as the terminal shows them (\x1b, \u009b), never sent as they are.
local function utf8_text(s)
  if not utf8.len(s) then
    local out, i = {}, 1
    while i <= #s do
      local n, bad = utf8.len(s, i)
      if n then out[#out + 1] = s:sub(i) break end
      out[#out + 1] = s:sub(i, bad - 1)
      out[#out + 1] = "\u{FFFD}"
      i = bad + 1
    end
    s = table.concat(out)
  end
  -- (and the bidirectional controls, which reorder a page's text as a terminal's)
  return bidi_escaped((s:gsub("[%z\1-\8\11\12\14-\31\127]", function(c) return ("\\x%02x"):format(c:byte()) end)
    :gsub("\194([\128-\159])", function(c) return ("\\u%04x"):format(c:byte()) end)))
end

local ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }
local function esc(v) return (utf8_text(redact(tostring(v == nil and "" or v))):gsub("[&<>\"']", ESCAPES)) end
local function money(usd) return ("$%.6f"):format(usd or 0) end
local function utc(t) return t and os.date("!%Y-%m-%d %H:%M:%S", math.floor(t)) or "-" end

local function seconds(s)
  if s == nil then return "-" end
  if s < 1 then return ("%.0f ms"):format(s * 1000) end
  if s < 120 then return ("%.2f s"):format(s) end
  return ("%.1f min"):format(s / 60)
end

local function decode_detail(text)
  if type(text) ~= "string" or text == "" then return {} end
  local d = json.decode(text)
  return type(d) == "table" and d or {}
end

-- sorted keys of a table, by value descending when by_value
local function keys(t, by_value)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out, function(a, b)
    if by_value and t[a] ~= t[b] then return t[a] > t[b] end
    return tostring(a) < tostring(b)
  end)
  return out
end

local function quantile(sorted, q)
  if #sorted == 0 then return nil end
  return sorted[math.max(1, math.ceil(q * #sorted))]
end

-- what the page shows, from runs show's report and the run's ledger rows
local function figures(report, ledger)
  local f = { items = #report.items, done = 0, failed = 0, pending = 0, interrupted = 0, running = 0, retries = 0,
              steps = 0,
              latency = {}, retries_by = {}, fallbacks_by = {}, failures = {}, costs = {}, usd = 0, calls = 0,
              unpriced = 0 }
  for _, it in ipairs(report.items) do
    f[it.state] = (f[it.state] or 0) + 1
    f.retries = f.retries + it.retries
    for _, st in ipairs(it.steps) do
      f.steps = f.steps + 1
      local first = st.started or st.at
      if first and (not f.from or first < f.from) then f.from = first end
      if st.at and (not f.to or st.at > f.to) then f.to = st.at end
      local d = decode_detail(st.detail)
      for provider, list in pairs(type(d.latency) == "table" and d.latency or {}) do
        local all = f.latency[provider] or {}
        f.latency[provider] = all
        for _, s in ipairs(list) do if type(s) == "number" then all[#all + 1] = s end end
      end
      for class, n in pairs(type(d.retries) == "table" and d.retries or {}) do
        f.retries_by[class] = (f.retries_by[class] or 0) + n
      end
      for class, n in pairs(type(d.fallbacks) == "table" and d.fallbacks or {}) do
        f.fallbacks_by[class] = (f.fallbacks_by[class] or 0) + n
      end
      if st.state ~= "done" and st.state ~= "running" then f.failures[#f.failures + 1] = st end
    end
  end
  -- cost by provider and model, in integer micro-dollars as the ledger keeps it
  local by = {}
  for _, r in ipairs(ledger) do
    local key = tostring(r.provider or "-") .. "\0" .. tostring(r.model or "-")
    local c = by[key]
    if not c then
      c = { provider = r.provider or "-", model = r.model or "-", calls = 0, micro = 0, unpriced = 0 }
      by[key] = c
      f.costs[#f.costs + 1] = c
    end
    c.calls = c.calls + 1
    f.calls = f.calls + 1
    if r.micro_usd then c.micro = c.micro + r.micro_usd else c.unpriced, f.unpriced = c.unpriced + 1, f.unpriced + 1 end
  end
  local micro = 0
  for _, c in ipairs(f.costs) do c.usd = c.micro / 1e6; micro = micro + c.micro end
  f.usd = micro / 1e6
  table.sort(f.costs, function(a, b)
    if a.micro ~= b.micro then return a.micro > b.micro end
    return tostring(a.provider) .. tostring(a.model) < tostring(b.provider) .. tostring(b.model)
  end)
  for _, list in pairs(f.latency) do table.sort(list) end
  return f
end

local CSS = [[
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:2em;border-bottom:1px solid #ddd}
.summary{display:flex;flex-wrap:wrap;gap:.5em 2em;margin:1em 0}.summary div b{display:block;font-size:1.3em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;
vertical-align:top}th{cursor:pointer;background:#f6f6f6;user-select:none}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}td.err{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.bar{display:inline-block;height:.8em;background:#4a7bd0;vertical-align:middle}
.done{fill:#3c9a5f}.failed{fill:#d0453c}.pending{fill:#a0a0a0}.interrupted{fill:#e0a030}.running{fill:#4a7bd0}
.muted{color:#777}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .axis{stroke:#ccc}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
]]

-- sort a table by the header clicked (numbers by data-v when there is one)
local SCRIPT = [[
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.dir !== "asc"; th.dataset.dir = up ? "asc" : "desc";
    function key(r) {
      var c = r.cells[col], v = c.dataset.v;
      return v !== undefined ? parseFloat(v) : c.textContent;
    }
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.documentElement.dataset.ready = "1";
]]

local MAX_GANTT_ITEMS = 300 -- beyond this the chart is the first ones; the tables keep everything

local function gantt(out, report, f)
  if f.steps == 0 or not f.from then
    out[#out + 1] = "<p class=muted>No steps recorded.</p>"
    return
  end
  local span = math.max((f.to or f.from) - f.from, 1e-3)
  local shown = math.min(#report.items, MAX_GANTT_ITEMS)
  local label_w, chart_w, row_h, top = 120, 900, 18, 20
  local height = top + shown * row_h + 10
  out[#out + 1] = ('<svg id="timeline" role="img" aria-label="timeline of steps per item" width="%d" height="%d" ' ..
    'viewBox="0 0 %d %d">'):format(label_w + chart_w + 10, height, label_w + chart_w + 10, height)
  for i = 0, 4 do -- the time axis, in seconds from the first step's start
    local x = label_w + chart_w * i / 4
    out[#out + 1] = ('<line class="axis" x1="%.1f" y1="%d" x2="%.1f" y2="%d"/><text x="%.1f" y="12" ' ..
      'text-anchor="%s">+%s</text>'):format(x, top - 4, x, height - 6, x, i == 4 and "end" or "middle",
      esc(seconds(span * i / 4)))
  end
  for row = 1, shown do
    local it = report.items[row]
    local y = top + (row - 1) * row_h
    out[#out + 1] = ('<text x="%d" y="%d" text-anchor="end">%s</text>'):format(label_w - 6, y + 12,
      esc(it.scope == "" and "(run)" or ("item " .. it.scope)))
    for _, st in ipairs(it.steps) do
      local at = st.at or f.from
      local start = st.started or at
      local x = label_w + chart_w * (start - f.from) / span
      local w = math.max(chart_w * (at - start) / span, 2)
      out[#out + 1] = ('<rect class="%s" x="%.1f" y="%d" width="%.1f" height="%d" rx="2"><title>%s</title></rect>')
        :format(esc(st.state), x, y + 2, w, row_h - 5, esc(("item %s, step %d %s: %s, %s%s"):format(
          it.scope == "" and "-" or it.scope, st.seq, st.name, st.state,
          st.started and seconds(at - start) or "start not recorded",
          (st.retries or 0) > 0 and (", %d retries"):format(st.retries) or "")))
    end
  end
  out[#out + 1] = "</svg>"
  out[#out + 1] = '<p class="legend muted"><span class="bar" style="background:#3c9a5f"></span>done' ..
    '<span class="bar" style="background:#d0453c"></span>failed<span class="bar" style="background:#a0a0a0"></span>' ..
    "pending (cut short)" .. (f.interrupted > 0 and
    '<span class="bar" style="background:#e0a030"></span>interrupted (its process died)' or "") ..
    (f.running > 0 and '<span class="bar" style="background:#4a7bd0"></span>running' or "")
  if shown < #report.items then out[#out + 1] = (" &middot; first %d of %d items"):format(shown, #report.items) end
  out[#out + 1] = "</p>"
end

local function cost_table(out, f)
  if #f.costs == 0 then
    out[#out + 1] = "<p class=muted>No calls in the ledger for this run.</p>"
    return
  end
  local max = 0
  for _, c in ipairs(f.costs) do max = math.max(max, c.usd) end
  out[#out + 1] = '<table id="costs" class="sortable"><thead><tr><th>Provider</th><th>Model</th>' ..
    '<th class=n>Calls</th><th class=n>Unpriced</th><th class=n>USD</th><th></th></tr></thead><tbody>'
  for _, c in ipairs(f.costs) do
    out[#out + 1] = ('<tr><td>%s</td><td>%s</td><td class=n data-v="%d">%d</td><td class=n data-v="%d">%s</td>' ..
      '<td class=n data-v="%.6f">%s</td><td><span class="bar" style="width:%.0fpx"></span></td></tr>'):format(
      esc(c.provider), esc(c.model), c.calls, c.calls, c.unpriced, c.unpriced > 0 and c.unpriced or "",
      c.usd, money(c.usd), max > 0 and 200 * c.usd / max or 0)
  end
  out[#out + 1] = ('</tbody><tfoot><tr><th>Total</th><th></th><th class=n>%d</th><th class=n>%s</th>' ..
    '<th class=n id="cost-total">%s</th><th></th></tr></tfoot></table>'):format(f.calls,
    f.unpriced > 0 and f.unpriced or "", money(f.usd))
end

local LATENCY_BOUNDS = { 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.huge }

local function histogram_svg(list)
  local counts, max = {}, 0
  local j = 1
  for _, s in ipairs(list) do -- list is sorted
    while s > LATENCY_BOUNDS[j] do j = j + 1 end
    counts[j] = (counts[j] or 0) + 1
    max = math.max(max, counts[j])
  end
  local bw = 26
  local w, h = #LATENCY_BOUNDS * bw, 60
  local out = { ('<svg class="histogram" width="%d" height="%d" viewBox="0 0 %d %d">'):format(w, h + 14, w, h + 14) }
  for i, bound in ipairs(LATENCY_BOUNDS) do
    local n = counts[i] or 0
    local bh = max > 0 and h * n / max or 0
    local label = bound == math.huge and "&gt;60" or ("%g"):format(bound):gsub("^0%.", ".")
    out[#out + 1] = ('<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="#4a7bd0"><title>%s: %d</title></rect>' ..
      '<text x="%d" y="%d" text-anchor="middle" font-size="9">%s</text>'):format((i - 1) * bw + 2, h - bh, bw - 4,
      bh, bound == math.huge and "over 60 s" or ("up to %s s"):format(label), n, (i - 1) * bw + bw // 2, h + 11, label)
  end
  out[#out + 1] = "</svg>"
  return table.concat(out)
end

local function latency_table(out, f)
  local providers = keys(f.latency)
  if #providers == 0 then
    out[#out + 1] = "<p class=muted>No attempts recorded inside steps (latency is noted by policies/retry.lua " ..
      "for calls made in a resil.step).</p>"
    return
  end
  out[#out + 1] = '<table id="latency" class="sortable"><thead><tr><th>Provider</th><th class=n>Attempts</th>' ..
    '<th class=n>p50</th><th class=n>p90</th><th class=n>p99</th><th class=n>Max</th>' ..
    '<th>Attempts by seconds taken (upper bounds)</th>' ..
    "</tr></thead><tbody>"
  for _, p in ipairs(providers) do
    local list = f.latency[p]
    out[#out + 1] = ('<tr><td>%s</td><td class=n data-v="%d">%d</td>'):format(esc(p), #list, #list)
    for _, q in ipairs({ 0.5, 0.9, 0.99, 1 }) do
      local v = quantile(list, q)
      out[#out + 1] = ('<td class=n data-v="%.4f">%s</td>'):format(v or 0, esc(seconds(v)))
    end
    out[#out + 1] = "<td>" .. histogram_svg(list) .. "</td></tr>"
  end
  out[#out + 1] = "</tbody></table>"
end

local function classes_table(out, f)
  local all = {}
  for c in pairs(f.retries_by) do all[c] = true end
  for c in pairs(f.fallbacks_by) do all[c] = true end
  local classes = keys(all)
  if #classes == 0 then
    out[#out + 1] = ("<p class=muted>No retries or fallbacks%s.</p>"):format(f.retries > 0 and
      (" recorded by class (%d retries counted per step)"):format(f.retries) or "")
    return
  end
  out[#out + 1] = '<table id="classes" class="sortable"><thead><tr><th>Class</th><th class=n>Retries</th>' ..
    '<th class=n>Fallbacks</th></tr></thead><tbody>'
  for _, c in ipairs(classes) do
    local r, fb = f.retries_by[c] or 0, f.fallbacks_by[c] or 0
    out[#out + 1] = ('<tr><td>%s</td><td class=n data-v="%d">%d</td><td class=n data-v="%d">%d</td></tr>'):format(
      esc(c), r, r, fb, fb)
  end
  out[#out + 1] = "</tbody></table>"
end

local function failures_table(out, f)
  if #f.failures == 0 then
    out[#out + 1] = "<p>No failed, pending or interrupted steps.</p>"
    return
  end
  out[#out + 1] = '<table id="failures" class="sortable"><thead><tr><th>Item</th><th class=n>Seq</th><th>Step</th>' ..
    '<th>State</th><th class=n>Retries</th><th>At (UTC)</th><th>Error</th></tr></thead><tbody>'
  for _, st in ipairs(f.failures) do
    out[#out + 1] = ('<tr class="%s"><td>%s</td><td class=n data-v="%d">%d</td><td>%s</td><td>%s</td>' ..
      '<td class=n data-v="%d">%d</td><td>%s</td><td class="err">%s</td></tr>'):format(esc(st.state),
      esc(st.scope == "" and "-" or st.scope), st.seq, st.seq, esc(st.name), esc(st.state), st.retries or 0,
      st.retries or 0, utc(st.at), esc(st.error or (st.state == "pending" and "cut short: the run ended first" or "")))
  end
  out[#out + 1] = "</tbody></table>"
end

-- report: what runs show builds ({run=, items=, usd=}); ledger: the run's
-- cost rows (backend:cost_rows{run=}); resume: the command that resumes it
function M.render(report, ledger, resume)
  local run = report.run
  local f = figures(report, ledger)
  local out = {}
  out[#out + 1] = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">' ..
    '<meta name="viewport" content="width=device-width, initial-scale=1">' ..
    "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; " ..
    "script-src 'unsafe-inline'; img-src data:\">" ..
    "<title>run %s</title><style>%s</style></head><body>"):format(esc(run.id), CSS)
  out[#out + 1] = ('<h1>Run <span id="run-id">%s</span>: <span id="run-status">%s</span></h1>'):format(esc(run.id),
    esc(run.status or "?"))
  out[#out + 1] = ('<p class=muted>%s &middot; started %s UTC &middot; updated %s UTC%s</p>'):format(
    esc(run.script or "(script not recorded)"), utc(run.created_at), utc(run.updated_at),
    run.holder and (' &middot; held by <span id="run-holder">%s</span>'):format(esc(run.holder)) or "")
  if run.reason then out[#out + 1] = ('<p>Why: <code id="run-reason">%s</code></p>'):format(esc(run.reason)) end
  out[#out + 1] = '<div class="summary">'
  local cells = {
    { "items", f.items }, { "done", f.done }, { "failed", f.failed }, { "pending", f.pending },
    { "interrupted", f.interrupted },
    { "retries", f.retries }, { "calls", f.calls }, { "cost", money(f.usd) },
    { "wall time", seconds(f.from and f.to and f.to - f.from) },
  }
  if f.running > 0 then table.insert(cells, 6, { "running", f.running }) end
  for _, c in ipairs(cells) do
    out[#out + 1] = ('<div id="sum-%s"><b>%s</b>%s</div>'):format(c[1]:gsub(" ", "-"), esc(c[2]), c[1])
  end
  out[#out + 1] = "</div>"
  if resume then out[#out + 1] = ('<p>Resume: <code id="resume">%s</code></p>'):format(esc(resume)) end
  out[#out + 1] = "<h2>Timeline</h2>"
  gantt(out, report, f)
  out[#out + 1] = "<h2>Cost by provider and model</h2>"
  cost_table(out, f)
  out[#out + 1] = "<h2>Attempt latency by provider</h2>"
  latency_table(out, f)
  out[#out + 1] = "<h2>Retries and fallbacks by class</h2>"
  classes_table(out, f)
  out[#out + 1] = "<h2>Failures</h2>"
  failures_table(out, f)
  out[#out + 1] = ("<p class=muted>Written by resil-lua at %s UTC.</p><script>%s</script></body></html>\n"):format(
    utc(os.time()), SCRIPT)
  return table.concat(out)
end

-- -> true, whether path was a plain file | nil, message; written whole or not at all (temp file,
-- rename), but through what is not a plain file (/dev/stdout, a symlink, a FIFO), which a rename
-- would replace
function M.write(path, report, ledger, resume)
  local html = M.render(report, ledger, resume)
  if path == "-" then -- the standard output as it is (appended to, a pipe, a socket)
    local ok, werr = io.stdout:write(html)
    local flushed, ferr = io.stdout:flush()
    if not (ok and flushed) then return nil, werr or ferr end
    return true, false
  end
  local tmp = plain_file(path) and path .. ".tmp" or path
  local fh, err = io.open(tmp, "wb")
  if not fh then return nil, err end
  -- (the close's result too: a full disk fails there, at the flush of what was buffered, and the
  -- cut page was renamed into place and "wrote FILE" said)
  local ok, werr = fh:write(html)
  local closed, cerr = fh:close()
  if not (ok and closed) then
    if tmp ~= path then os.remove(tmp) end
    return nil, werr or cerr
  end
  if tmp == path then return true, false end
  local renamed, rerr = os.rename(tmp, path)
  if not renamed then os.remove(tmp) return nil, rerr end
  return true, true
end

return M
