-- A strict checker of the Prometheus text exposition format 0.0.4, for what promtool's linter lets
-- by: each family's HELP and TYPE at most once and before its samples, a family's lines together,
-- names and label names valid, label values escaped (only \\, \" and \n) and UTF-8, no series
-- twice, counters named _total, a histogram's buckets by rising le with +Inf, cumulative, the
-- +Inf bucket equal to its _count, and _sum and _count present.
--
--   local problems = require("spec.prom_strict")(text)  -- {} when the text is whole
local NAME = "^[a-zA-Z_:][a-zA-Z0-9_:]*$"
local LABEL = "^[a-zA-Z_][a-zA-Z0-9_]*$"

-- 'a="1",b="x\"y"' -> { {name, value}, ... } | nil, why
local function parse_labels(s)
  local out, i = {}, 1
  while i <= #s do
    local name, j = s:match("^([^=]*)=\"()", i)
    if not name then return nil, "a label without =\"" end
    if not name:match(LABEL) then return nil, ("label name %q"):format(name) end
    local value, k = {}, j
    while true do
      local c = s:sub(k, k)
      if c == "" then return nil, "a label value without its closing quote" end
      if c == '"' then break end
      if c == "\n" then return nil, "a raw newline in a label value" end
      if c == "\\" then
        local e = s:sub(k + 1, k + 1)
        if e == "\\" or e == '"' then value[#value + 1] = e
        elseif e == "n" then value[#value + 1] = "\n"
        else return nil, ("an escape \\%s in a label value"):format(e) end
        k = k + 2
      else
        value[#value + 1] = c
        k = k + 1
      end
    end
    out[#out + 1] = { name, table.concat(value) }
    i = k + 1
    if s:sub(i, i) == "," then i = i + 1 elseif i <= #s then return nil, "labels not separated by a comma" end
  end
  return out
end

local function family_of(name, types)
  for _, suffix in ipairs({ "_bucket", "_sum", "_count" }) do
    local base = name:sub(1, -#suffix - 1)
    if name:sub(-#suffix) == suffix and (types[base] == "histogram" or types[base] == "summary") then
      return base, suffix
    end
  end
  return name, ""
end

return function(text)
  local problems = {}
  local function bad(line_no, why, line)
    problems[#problems + 1] = ("line %d: %s: %s"):format(line_no, why, (line or ""):sub(1, 120))
  end
  if not utf8.len(text) then bad(0, "the text is not UTF-8") end
  if text ~= "" and text:sub(-1) ~= "\n" then bad(0, "the text does not end with a newline") end
  local helps, types, seen_samples, series = {}, {}, {}, {}
  local current, closed = nil, {}
  local hist = {} -- base .. labels without le -> { les = {}, counts = {}, count =, sum = }
  local n = 0
  for line in text:gmatch("([^\n]*)\n?") do
    n = n + 1
    if line == "" then goto next end
    do
      local kind, name, rest = line:match("^# (%u+) (%S+) ?(.*)$")
      if kind == "HELP" or kind == "TYPE" then
        if not name:match(NAME) then bad(n, "metric name", line) end
        local store = kind == "HELP" and helps or types
        if store[name] then bad(n, kind .. " twice", line) end
        if seen_samples[name] then bad(n, kind .. " after the family's samples", line) end
        if kind == "TYPE" and not ({ counter = 1, gauge = 1, histogram = 1, summary = 1, untyped = 1 })[rest] then
          bad(n, "unknown type", line)
        end
        if kind == "HELP" and rest:gsub("\\[\\n]", ""):find("\\", 1, true) then bad(n, "an escape in HELP other than \\\\ and \\n", line) end
        store[name] = rest
        if current ~= name then
          if closed[name] then bad(n, "the family's lines are not together", line) end
          if current then closed[current] = true end
          current = name
        end
        goto next
      elseif line:sub(1, 1) == "#" then
        goto next
      end
      local mname, labels, value = line:match("^([^{ ]+){(.*)} (%S+)$")
      if not mname then
        mname, value = line:match("^([^{ ]+) (%S+)$")
        labels = ""
      end
      if not mname then
        bad(n, "not a sample line", line)
        goto next
      end
      if not mname:match(NAME) then bad(n, "metric name", line) end
      if not (tonumber(value) or value == "+Inf" or value == "-Inf" or value == "NaN") then bad(n, "value", line) end
      local parsed, why = parse_labels(labels)
      if not parsed then
        bad(n, why, line)
        goto next
      end
      local names, without_le, le = {}, {}, nil
      for _, l in ipairs(parsed) do
        if names[l[1]] then bad(n, "label " .. l[1] .. " twice", line) end
        names[l[1]] = true
        if l[1] == "le" then le = l[2] else without_le[#without_le + 1] = l[1] .. "=" .. l[2] end
      end
      table.sort(without_le)
      local key = mname .. "\0" .. table.concat(without_le, "\0") .. "\0" .. (le or "")
      if series[key] then bad(n, "a series twice", line) end
      series[key] = true
      local base, suffix = family_of(mname, types)
      seen_samples[base] = true
      if current ~= base then
        if closed[base] then bad(n, "the family's lines are not together", line) end
        if current then closed[current] = true end
        current = base
      end
      if types[base] == "counter" and not base:match("_total$") then bad(n, "a counter not named _total", line) end
      if types[base] == "histogram" then
        if suffix == "" then bad(n, "a histogram sample that is not _bucket, _sum or _count", line) end
        local h = base .. "\0" .. table.concat(without_le, "\0")
        hist[h] = hist[h] or { les = {}, line = n }
        local entry = hist[h]
        if suffix == "_bucket" then
          if not le then bad(n, "a bucket without le", line)
          else entry.les[#entry.les + 1] = { le = le == "+Inf" and math.huge or tonumber(le), v = tonumber(value) } end
        elseif suffix == "_count" then entry.count = tonumber(value)
        elseif suffix == "_sum" then entry.sum = tonumber(value) or value end
      end
    end
    ::next::
  end
  for h, e in pairs(hist) do
    local name = h:gsub("%z", " ")
    local last_le, last_v = -math.huge, -math.huge
    for _, b in ipairs(e.les) do
      if not b.le or b.le <= last_le then bad(e.line, "buckets not by rising le", name) end
      if (b.v or 0) < last_v then bad(e.line, "buckets not cumulative", name) end
      last_le, last_v = b.le or last_le, b.v or last_v
    end
    if last_le ~= math.huge then bad(e.line, 'no le="+Inf" bucket', name)
    elseif e.count ~= last_v then bad(e.line, "the +Inf bucket is not the _count", name) end
    if e.count == nil then bad(e.line, "no _count", name) end
    if e.sum == nil then bad(e.line, "no _sum", name) end
  end
  return problems
end
