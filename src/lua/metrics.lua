-- resil.metrics: counters, gauges and histograms with labels, exposed in the
-- Prometheus text format (resil.metrics.text(), or GET /metrics from
-- resil.metrics.serve{port=}). Metrics are kept by name for the life of the
-- host, so a policy reload keeps their values.
--
--   local retries = resil.metrics.counter("resil_retries_total", "Retries by provider and class")
--   retries:inc({ provider = "openai", class = "rate_limited" })
local resil, private = ...
-- each series' values (src/metrics.c): a counter's or gauge's cell, a
-- histogram's counts, and a bound series' methods as closures over them
local core = require "resil.core.metrics"
local new_cell, cell_add, cell_set, cell_get = core.cell, core.add, core.set, core.get
local new_histogram, histogram_observe, histogram_read = core.histogram, core.observe, core.read
-- (a folder's names: kept here, out of a sandboxed script's reach through require)
local list_dir = core.list
core.list = nil

local metrics = {}
local registry, order = {}, {}

-- label values and help are redacted (secrets, credential query parameters)
-- when a series is made, so two values that differ only by a secret are one series
local redact = resil.redact

-- (Text made UTF-8, each byte that is not as U+FFFD: Prometheus refuses the whole scrape over one
-- label value or help that is not, a model name or a user id cut mid-character, and promtool fails it)
local valid_utf8 = private.valid_utf8

local function escape(v)
  return (valid_utf8(redact(tostring(v))):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

-- A label name the exposition writes itself: a histogram's le, a merge = "worker" gauge's worker
-- (the series had the label twice, and Prometheus refuses the whole scrape over one such line),
-- and names under __, which Prometheus keeps for its own (__name__).
local function own_label(m, k)
  if k:sub(1, 2) == "__" then return "names under __ are Prometheus' own" end
  if m and m.kind == "histogram" and k == "le" then return "a histogram writes le itself (its buckets)" end
  if m and m.merge == "worker" and k == "worker" then return 'a merge = "worker" gauge writes worker itself' end
end

-- {b = 2, a = 1} -> 'a="1",b="2"' (sorted: one series per label set)
-- (level: where a bad label name is reported, 3 unless told; m: the metric, for the names it writes itself)
local function label_key(labels, level, m)
  if labels == nil then return "" end
  -- (counter:inc(5), a Prometheus client's habit, raised from next() at this file's line)
  if type(labels) ~= "table" then
    local t = type(labels)
    error(("metrics: labels must be a table of name = value (or nil), got %s"):format((t == "number" or
      t == "string" or t == "boolean") and ("%s %q"):format(t, labels) or t), level or 3)
  end
  if next(labels) == nil then return "" end
  local names = {}
  for k in pairs(labels) do
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") then
      error(("metrics: bad label name %q"):format(tostring(k)), level or 3)
    end
    local why = own_label(m, k)
    if why then error(("metrics: %s: label name %q is reserved: %s"):format(m and m.name or "", k, why), level or 3) end
    if redact(k) ~= k then error("metrics: a label name holds a secret (resil.secret)", level or 3) end
    names[#names + 1] = k
  end
  table.sort(names)
  local parts = {}
  for i, k in ipairs(names) do parts[i] = ('%s="%s"'):format(k, escape(labels[k])) end
  return table.concat(parts, ",")
end

local function check_number(n, what)
  if type(n) ~= "number" or n ~= n then error(("metrics: %s must be a number"):format(what), 3) end
end

local Metric = {}
Metric.__index = Metric

-- Label values are bounded: a metric keeps at most max_series series (its
-- own opts.max_series, else metrics.max_series); label sets beyond that are
-- dropped, counted, and warned about once per metric. Memory stays bounded
-- whatever a label is fed (user ids, URLs, model names from responses).
-- Under the sandbox the host's metrics (names under resil_ and gen_ai_, m.host) keep at least
-- HOST_MAX_SERIES whatever a script sets (metrics.max_series = 0 in a script that ran before the
-- policies loaded dropped every series of the host's: resil_calls_total, the gateway's, the budgets'):
-- host_max_series is max_series, raised to that. Both kept out of the table, set through its
-- __newindex (below); read only where a series is made, never on an update's path.
local HOST_MAX_SERIES = 1000
local max_series, host_max_series = HOST_MAX_SERIES, HOST_MAX_SERIES
local dropped_total -- resil_metrics_series_dropped_total, defined below

-- (a key the metric has no series of yet)
local function admit(m, key)
  if m.nseries < (m.max_series or (m.host and host_max_series or max_series)) then
    m.nseries = m.nseries + 1
    return true
  end
  if m ~= dropped_total then dropped_total:inc({ metric = m.name }) end
  if not m.warned then
    m.warned = true
    resil.log.warn("metrics: too many label sets, new ones are dropped", { metric = m.name,
      max_series = m.max_series or (m.host and host_max_series or max_series) })
  end
  return false
end

-- Under `gateway --workers N` each worker counts on its own and a scrape
-- answers with every worker's figures merged (metrics.shard): counters and
-- histograms summed over every worker that ran, gauges over the live ones by
-- their `merge`: "sum" (the default: tasks waiting, permits in use), "max",
-- "min", "mostrecent" (the figure of the worker that read its figures last,
-- the one answering the scrape: one each worker reads from the store, which
-- a sum would multiply), "worker" (each live worker's own series, labelled
-- worker="slot").
-- metrics.merges: the merge of the built-in gauges defined elsewhere (read only under the sandbox:
-- resil.metrics is the scripts' table, and a script's merges.resil_store_down = "x" failed the
-- Redis backend's load, so the host's store, when its gauge was defined; "sum" would have summed
-- every worker's reading of a budget's spend)
local MERGES = { sum = true, max = true, min = true, mostrecent = true, worker = true }
local merges = {
  -- (the scraping worker's, read from the store then, if it used the budget: a
  -- new period's 0 or a lowered limit shows at once, as max would not)
  resil_budget_spent_usd = "mostrecent", resil_budget_reserved_usd = "mostrecent",
  resil_budget_limit_usd = "mostrecent", resil_budget_soft_limit_usd = "mostrecent",
  resil_budget_remaining_usd = "mostrecent",
  resil_store_down = "max", -- (1: some worker finds the store down)
  resil_breaker_state = "max", -- (1 for each state some worker's breaker is in)
  resil_model_sunset_days = "min",
}
metrics.merges = setmetatable({}, {
  __index = merges,
  __newindex = function(_, k, v)
    local private = debug.getregistry()["resil.private"]
    if private and private.sandbox then
      error(("resil.metrics.merges.%s cannot be set in the sandbox: the host's gauges"):format(tostring(k)), 2)
    end
    merges[k] = v
  end,
  __pairs = function() return next, merges, nil end,
  __metatable = false,
})

-- The host's metric names, under the sandbox: a script got the host's own object by its name
-- (resil.metrics.gauge("resil_store_down"):set(...): a false alarm, or an outage hidden from
-- alerts; or it made one of them first, of another kind, and the host's module defining it
-- failed to load). Under the sandbox a name under one of these prefixes gives a script a
-- read-only view of the host's metric (value() as before; a change raises at its line), and a
-- new one is refused. Policies define theirs as they load (calls, retries, the gateway's, the
-- registry's) through private.metrics, which prelude's owning_loader hands each policy chunk as
-- its fourth argument (resil.metrics, and require's resil, are the scripts': one that ran first
-- handed them fakes); a call straight from a policy chunk the host loaded from its policy folders
-- (private.policy_chunks: an operator's policy file that calls resil.metrics) gets the metric
-- itself too. A host module that loads after scripts may run defines through private.metrics.
local RESERVED = { "resil_", "gen_ai_" }
local function reserved(name)
  for i = 1, #RESERVED do
    if name:sub(1, #RESERVED[i]) == RESERVED[i] then return RESERVED[i] end
  end
end

local function unchanged(v) error(("resil.metrics: %s is the host's metric: a sandboxed script cannot change it")
  :format(v.name), 2) end
local function changes(what)
  return function(v)
    error(("resil.metrics: %s is the host's metric: a sandboxed script reads it (value) and cannot %s it"
      .. " (names under resil_ and gen_ai_ are reserved in the sandbox)"):format(v.name, what), 2)
  end
end
local view_methods = { inc = changes("inc"), dec = changes("dec"), set = changes("set"),
  observe = changes("observe"), labels = changes("bind (labels)"), collected = changes("set") }
local views = {} -- name -> its view
local function view_of(m)
  local v = views[m.name]
  if not v then
    v = setmetatable({}, { __index = function(_, k)
      if k == "name" or k == "kind" or k == "help" then return m[k] end
      if k == "value" then return function(_, labels) return m:value(labels) end end
      return view_methods[k]
    end, __newindex = unchanged, __metatable = false })
    views[m.name] = v
  end
  return v
end

local define_host
local function define(kind, name, help, opts)
  -- (called from metrics.counter/gauge/histogram, not as a tail call: level 3 is their caller; one
  -- that reached them by a tail call is not that caller: a script's wrapper of resil.metrics.counter
  -- that tail-called it with a name of its own, from a policy chunk's call, passed as the chunk)
  if private.sandbox and type(name) == "string" and reserved(name) then
    local caller = debug.getinfo(3, "f")
    if debug.getinfo(2, "t").istailcall or not (caller and private.policy_chunks[caller.func]) then
      local m = registry[name]
      if not m then
        error(("resil.metrics.%s: %q: names under %q are reserved for the host's metrics in the sandbox"
          .. " (resil_options.sandbox, --sandbox), and the host has no such metric"):format(kind, name, reserved(name)), 3)
      end
      if m.kind ~= kind then
        error(("resil.metrics.%s: '%s' is already a %s"):format(kind, name, m.kind), 3)
      end
      return view_of(m)
    end
  end
  return define_host(kind, name, help, opts)
end

-- A histogram h writes h_bucket, h_sum and h_count: a metric of one of those names beside it made
-- an exposition Prometheus refuses whole (its parser reads h_sum as h's), so the second is refused.
local HISTOGRAM_SUFFIXES = { "_bucket", "_sum", "_count" }
local function collision(kind, name)
  for _, suffix in ipairs(HISTOGRAM_SUFFIXES) do
    local base = name:sub(1, -#suffix - 1)
    if #name > #suffix and name:sub(-#suffix) == suffix and registry[base] and registry[base].kind == "histogram" then
      return ("collides with the histogram '%s' (its %s series)"):format(base, name)
    end
    if kind == "histogram" and registry[name .. suffix] then
      return ("collides with the %s '%s%s' (a histogram writes %s%s series)"):format(registry[name .. suffix].kind,
        name, suffix, name, suffix)
    end
  end
end

function define_host(kind, name, help, opts)
  if type(name) ~= "string" or not name:match("^[%a_:][%w_:]*$") then
    error(("resil.metrics.%s: bad metric name %q"):format(kind, tostring(name)), 3)
  end
  if redact(name) ~= name then error("metrics: a metric name holds a secret (resil.secret)", 3) end
  local m = registry[name]
  if m then
    -- (a reload's version that made it another kind failed every reload after, with nothing said of
    -- a way out: series already scraped cannot change kind under their name)
    if m.kind ~= kind then
      error(("resil.metrics.%s: '%s' is already a %s, which it stays for the process's life (its series were "
        .. "exposed as one): give the %s another name, or restart the process"):format(kind, name, m.kind, kind), 3)
    end
    -- (a reload's version that gave it other buckets got the first ones without a word: its
    -- dashboard's quantiles stayed on the old bounds and nothing said why)
    local given = kind == "histogram" and type(opts) == "table" and type(opts.buckets) == "table" and opts.buckets
    if given then
      local bounds = {}
      for _, b in ipairs(given) do if b ~= math.huge then bounds[#bounds + 1] = b end end
      table.sort(bounds, function(a, b) return type(a) == "number" and type(b) == "number" and a < b end)
      local same = #bounds == #m.buckets
      for i = 1, #bounds do same = same and bounds[i] == m.buckets[i] end
      if not same then
        resil.log.warn("metrics: a histogram keeps the buckets it was made with until the process restarts; "
          .. "others given again are not taken", { metric = name, buckets = m.buckets })
      end
    end
    return m
  end
  local clash = collision(kind, name)
  if clash then error(("resil.metrics.%s: '%s' %s"):format(kind, name, clash), 3) end
  m = setmetatable({ kind = kind, name = name, help = help or name, series = {}, nseries = 0,
                     max_series = opts and opts.max_series, known = {}, nknown = 0,
                     host = reserved(name) ~= nil }, Metric)
  if kind == "gauge" then
    m.merge = (opts and opts.merge) or merges[name] or "sum"
    if not MERGES[m.merge] then
      error(("resil.metrics.gauge: merge must be sum, max, min, mostrecent or worker, not %q")
        :format(tostring(m.merge)), 3)
    end
  end
  if kind == "histogram" then
    -- (a copy, sorted: the caller's table was sorted in place; a bucket given twice, or +Inf, which the
    -- exposition writes itself, made two series of one le, which a scraper drops or refuses)
    local given = (opts and opts.buckets) or { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 }
    local buckets = {}
    for i, b in ipairs(given) do
      if type(b) ~= "number" or b ~= b then
        error(("resil.metrics.histogram: bucket %d must be a number, not %s"):format(i,
          b ~= b and "NaN" or "a " .. type(b)), 3)
      end
      if b ~= math.huge then buckets[#buckets + 1] = b end
    end
    table.sort(buckets)
    for i = 2, #buckets do
      if buckets[i] == buckets[i - 1] then
        error(("resil.metrics.histogram: bucket %.14g is given twice"):format(buckets[i]), 3)
      end
    end
    m.buckets = buckets
    m.bounds = core.bounds(m.buckets)
  end
  registry[name] = m
  order[#order + 1] = name
  return m
end

-- opts.max_series: the most label sets this metric keeps (default metrics.max_series)
-- (not tail calls: define reads who called these, and its errors name that caller's line)
function metrics.counter(name, help, opts)
  local m = define("counter", name, help, opts)
  return m
end
function metrics.gauge(name, help, opts)
  local m = define("gauge", name, help, opts)
  return m
end
-- opts.buckets: upper bounds in seconds (or any unit), sorted for you
function metrics.histogram(name, help, opts)
  local m = define("histogram", name, help, opts)
  return m
end
-- (the host's modules that load after scripts may run: resil.metrics is the scripts' table)
private.metrics = {}
for _, kind in ipairs({ "counter", "gauge", "histogram" }) do
  private.metrics[kind] = function(name, help, opts)
    local m = define_host(kind, name, help, opts)
    return m
  end
end
-- (every metric's methods, the host's among them: hidden from a sandboxed script, which replaced
-- Metric.inc there and no host counter counted)
private.host_metatables = private.host_metatables or {}
private.host_metatables[Metric] = true

-- the series of a label key, made at its first use (nil: past the bound)
local function series_of(m, key)
  local s = m.series[key]
  if s ~= nil then return s end
  if not admit(m, key) then return nil end
  s = m.kind == "histogram" and new_histogram(m.bounds) or new_cell()
  m.series[key] = s
  return s
end

-- Label sets already looked up, by their values, each -> its series:
-- m.known[2][name][value] for one label, m.known[3][name1][value1][name2]
-- [value2] (in both orders) for two; string values of up to KNOWN_VALUE_MAX
-- bytes, in tables without a metatable, at most as many as the metric keeps
-- series. A label key is a sort, a redaction and an escape of each value:
-- too much for a metric updated with a fresh labels table on every request
-- (the budgets' gauges). m.known[1] is the count of secrets the keys were
-- made under: once another is registered, a value's key may hold it
-- unredacted, and they are made anew (core.find finds nothing until then).
local KNOWN_VALUE_MAX = 256
local find_known, secrets_count = core.find, core.secrets

-- t[k], made if need be
local function sub(t, k)
  local by = t[k]
  if by == nil then
    by = {}
    t[k] = by
  end
  return by
end

-- (labels made the key of series s)
local function remember(m, labels, s)
  if getmetatable(labels) ~= nil then return end
  local k1, v1 = next(labels)
  if type(v1) ~= "string" or #v1 > KNOWN_VALUE_MAX then return end
  local k2, v2 = next(labels, k1)
  if k2 ~= nil and (type(v2) ~= "string" or #v2 > KNOWN_VALUE_MAX or next(labels, k2) ~= nil) then return end
  local known = m.known
  if known[1] ~= secrets_count() then
    known = { secrets_count(), {}, {} }
    m.known, m.nknown = known, 0
  end
  if m.nknown >= (m.max_series or (m.host and host_max_series or max_series)) then return end
  if k2 == nil then
    sub(known[2], k1)[v1] = s
  else
    sub(sub(sub(known[3], k1), v1), k2)[v2] = s
    sub(sub(sub(known[3], k2), v2), k1)[v1] = s
  end
  m.nknown = m.nknown + 1
end

-- metric, labels -> the series of the label set (made at its first use), or
-- nil past the metric's bound; a bad label name raises at level 3 (the
-- caller of the method that called this)
local function series_for(m, labels)
  if labels == nil then return series_of(m, "") end
  local s = find_known(m.known, labels)
  if s then return s end
  s = series_of(m, label_key(labels, 4, m))
  if s then remember(m, labels, s) end
  return s
end

-- counter:inc([labels], [n]), gauge:inc / dec
function Metric:inc(labels, n)
  n = n or 1
  check_number(n, "the increment")
  if self.kind == "counter" and n < 0 then error("metrics: a counter only goes up", 2) end
  if self.kind == "histogram" then error("metrics: use observe() on a histogram", 2) end
  local s = series_for(self, labels)
  if s then cell_add(s, n) end
end

function Metric:dec(labels, n)
  if self.kind ~= "gauge" then error("metrics: only a gauge goes down", 2) end
  return self:inc(labels, -(n or 1)) -- (a tail call: inc's errors name dec's caller)
end

function Metric:set(labels, v)
  if self.kind ~= "gauge" then error("metrics: only a gauge is set", 2) end
  check_number(v, "the value")
  local s = series_for(self, labels)
  if s then cell_set(s, v) end
end

-- histogram:observe([labels], value): one count in the first bucket that
-- holds value (cumulated when exposed)
function Metric:observe(labels, v)
  if self.kind ~= "histogram" then error("metrics: observe() is for histograms", 2) end
  check_number(v, "the observation")
  local s = series_for(self, labels)
  if s then histogram_observe(s, v) end
end

-- metric:labels{...} -> one series, bound once: inc/dec/set/observe without
-- sorting labels on every call (for hot paths). A bound series is a table of
-- its kind's methods, C closures over the series (src/metrics.c: an update
-- is one call, no table lookups); a method of another kind raises as the
-- metric's own would. Its series is made, and counts towards the bound, when
-- it is bound: a histogram's is exposed from its first observation.
local function only_gauge_set() error("metrics: only a gauge is set", 2) end
local function only_gauge_down() error("metrics: only a gauge goes down", 2) end
local function only_histogram() error("metrics: observe() is for histograms", 2) end
local function use_observe() error("metrics: use observe() on a histogram", 2) end

local bind = {
  counter = function(s)
    return { inc = core.counter_inc(s), set = only_gauge_set, dec = only_gauge_down, observe = only_histogram }
  end,
  gauge = function(s)
    local inc, dec, set = core.gauge_methods(s)
    return { inc = inc, dec = dec, set = set, observe = only_histogram }
  end,
  histogram = function(s)
    return { observe = core.observer(s), inc = use_observe, set = only_gauge_set, dec = only_gauge_down }
  end,
}

-- a label set past the metric's bound: a series that keeps nothing
local Dropped = {}
Dropped.__index = function() return function() end end

function Metric:labels(labels)
  local s = series_for(self, labels)
  if not s then return setmetatable({}, Dropped) end
  return bind[self.kind](s)
end

-- metric:value([labels]) -> the counter or gauge value (0 if never set);
-- for a histogram {count=, sum=}
function Metric:value(labels)
  local s = self.series[label_key(labels)]
  if self.kind == "histogram" then
    if not s then return { count = 0, sum = 0 } end
    local count, sum = histogram_read(s)
    return { count = count, sum = sum }
  end
  return s and cell_get(s) or 0
end

local function number(v)
  if v ~= v then return "NaN" end -- (printf's "-nan" fails the whole scrape)
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if math.type(v) == "integer" then return tostring(v) end
  return ("%.14g"):format(v) -- shortest readable form; metrics need no more
end

local function with(key, extra)
  if key == "" then return extra == "" and "" or ("{" .. extra .. "}") end
  return "{" .. key .. (extra ~= "" and ("," .. extra) or "") .. "}"
end

-- resil.metrics.collect(fn): fn() runs before each exposition, to set the
-- metrics that are read from state (queue depths, breaker states) rather
-- than counted as things happen. A collector that raises is logged and skipped.
local collectors = {}
function metrics.collect(fn)
  if type(fn) ~= "function" then error("resil.metrics.collect: fn must be a function", 2) end
  collectors[#collectors + 1] = fn
end

-- counter:collected(labels, total): a counter read from a primitive's own
-- running total (it only goes up; not for counting things yourself)
function Metric:collected(labels, total)
  local s = series_for(self, labels)
  if s then cell_set(s, total) end
end

dropped_total = metrics.counter("resil_metrics_series_dropped_total",
  "Label sets dropped because a metric reached its bound on series, by metric")

-- (for_merge: with a "# MERGE name how" line for each gauge not summed, for the merge)
-- (stale: the collectors not run, the figures read from state left as last read)
local function exposition(for_merge, stale)
  for _, fn in ipairs(stale and {} or collectors) do
    local ok, err = pcall(fn)
    if not ok then resil.log.warn("metrics: a collector failed", { error = tostring(err) }) end
  end
  local out = {}
  for _, name in ipairs(order) do
    local m = registry[name]
    out[#out + 1] = ("# HELP %s %s"):format(name, (valid_utf8(redact(m.help)):gsub("\\", "\\\\"):gsub("\n", " ")))
    out[#out + 1] = ("# TYPE %s %s"):format(name, m.kind)
    if for_merge and m.merge and m.merge ~= "sum" then out[#out + 1] = ("# MERGE %s %s"):format(name, m.merge) end
    local keys = {}
    for key in pairs(m.series) do keys[#keys + 1] = key end
    table.sort(keys)
    for _, key in ipairs(keys) do
      local s = m.series[key]
      if m.kind == "histogram" then
        local count, sum, counts = histogram_read(s)
        if count > 0 then -- (a bound series not yet observed is not exposed)
          local cumulative = 0
          for i, bound in ipairs(m.buckets) do
            cumulative = cumulative + counts[i]
            out[#out + 1] = ("%s_bucket%s %d"):format(name, with(key, ('le="%s"'):format(number(bound))), cumulative)
          end
          out[#out + 1] = ("%s_bucket%s %d"):format(name, with(key, 'le="+Inf"'), count)
          out[#out + 1] = ("%s_sum%s %s"):format(name, with(key, ""), number(sum))
          out[#out + 1] = ("%s_count%s %d"):format(name, with(key, ""), count)
        end
      else
        out[#out + 1] = ("%s%s %s"):format(name, with(key, ""), number(cell_get(s)))
      end
    end
  end
  return table.concat(out, "\n") .. "\n"
end

-- resil.metrics.text() -> the Prometheus text exposition of this process's metrics
function metrics.text() return exposition(false) end
-- (the host's own scrapes, GET /metrics and the files, call scrape and serve as this file has them:
-- the table's are the scripts', and a sandboxed script's resil.metrics.scrape answered for the host)
local scrape, serve

local pid
local function own_pid()
  if not pid then
    local f = io.open("/proc/self/stat")
    pid = f and f:read("n") or math.random(1 << 30)
    if f then f:close() end
  end
  return pid
end

-- Under the sandbox, a script names no file outside the folders it may
-- write in (the file is renamed over whatever was there). Kept here: a
-- script may replace what the resil table holds.
local sandbox_check = resil.sqlite.check_file
local function check_file(path, what)
  if type(path) ~= "string" then error(("%s: the file must be a path"):format(what), 3) end
  sandbox_check(path, what, 3)
end

-- the exposition written whole, then renamed over path (node-exporter's
-- textfile collector never reads half a file)
local function write_text(path, text)
  local tmp = ("%s.%s.tmp"):format(path, own_pid())
  local f, err = io.open(tmp, "w")
  if not f then return nil, resil.error("io", ("metrics file: %s"):format(err)) end
  local ok, werr = f:write(text)
  local closed, cerr = f:close()
  if not (ok and closed) then
    os.remove(tmp)
    return nil, resil.error("io", ("metrics file %s: %s"):format(tmp, tostring(werr or cerr)))
  end
  local renamed, rerr = os.rename(tmp, path)
  if not renamed then
    os.remove(tmp)
    return nil, resil.error("io", ("metrics file %s: %s"):format(path, rerr))
  end
  return true
end

-- ---------- gateway --workers N: each worker's file, merged at a scrape ----------

-- In a worker: { dir = the supervisor's folder, slot = "0".., file = this
-- process's own file there, w-SLOT-PID.prom } (metrics.shard)
local shard

-- (stale: see exposition). The first line says when the figures were read
-- (the collectors run), for mostrecent: a write that did not run them is no
-- fresher than the last that did.
local collected_at = -math.huge
local function write_shard(stale)
  if not stale then collected_at = resil.clock.wall() end
  local text = exposition(true, stale)
  return write_text(shard.file, ("# AT %.6f\n"):format(collected_at) .. text)
end

local function parse_value(v)
  if v == "+Inf" then return math.huge elseif v == "-Inf" then return -math.huge elseif v == "NaN" then return 0 / 0 end
  return tonumber(v)
end

-- name{a="1"} -> name{a="1",worker="0"}
local function with_worker(key, slot)
  if key:sub(-1) == "}" then return ('%s,worker="%s"}'):format(key:sub(1, -2), slot) end
  return ('%s{worker="%s"}'):format(key, slot)
end

local combine = {
  sum = function(a, b) return a + b end,
  max = function(a, b) return b > a and b or a end,
  min = function(a, b) return b < a and b or a end,
  worker = function(a, b) return a + b end, -- (two live files of one slot: only between a death and its reaping)
}

-- dir -> its workers' files, each { name =, live =, slot =, text = }: the
-- live workers' (w-SLOT-PID.prom), those of workers that ended (f-SLOT-PID:
-- renamed so as they exited, metrics.finish) and the dead ones' (d-SLOT-ID.prom:
-- renamed so by the supervisor when it reaped them, kept for the gateway's life, or
-- several merged into one by worker 0, which names those it replaces, each on
-- a "# REPLACES name" line: they are left out while they are still there).
-- A file listed but gone when opened (renamed by the supervisor, or merged
-- away) would take its counts off this scrape: the folder is read again.
local function read_files(dir)
  for _ = 1, 10 do
    local names, err = list_dir(dir)
    if not names then error("metrics: the workers' folder: " .. tostring(err), 0) end
    table.sort(names)
    local files, replaced, complete = {}, {}, true
    for _, fname in ipairs(names) do
      local state, slot = fname:match("^([wdf])%-(%d+)%-%w+%.prom$")
      if state then
        local f = io.open(dir .. "/" .. fname)
        if not f then
          complete = false
          break
        end
        local text = f:read("a") or ""
        f:close()
        for gone in ("\n" .. text):gmatch("\n# REPLACES (%S+)") do replaced[gone] = true end
        files[#files + 1] = { name = fname, live = state == "w", slot = slot, text = text }
      end
    end
    if complete then
      local kept = {}
      for _, file in ipairs(files) do if not replaced[file.name] then kept[#kept + 1] = file end end
      return kept, replaced
    end
  end
  error("metrics: the workers' folder changed under each of 10 reads", 0)
end

-- The exposition of the files merged. A sample is summed over all of them:
-- a counter never goes down when a worker dies and another takes its place
-- (Prometheus would read a reset); a gauge is merged over the live ones only,
-- by its merge. Each file only moves forward and a scrape reads them all
-- (its own written first): scrapes answered by different workers never go
-- down either; another worker's counts are at most a second old (the period
-- of its file), its figures read by the collectors at most ten writes old
-- (metrics.shard).
local function merge(files)
  local families, order_of = {}, {}
  for _, file in ipairs(files) do
    local live, slot, fam, at = file.live, file.slot, nil, -math.huge
    for line in file.text:gmatch("[^\n]+") do
      if line:sub(1, 1) == "#" then
        local what, name, rest = line:match("^# (%u+) (%S+) ?(.*)$")
        if what == "AT" then
          at = tonumber(name) or at
        elseif what == "HELP" or what == "TYPE" or what == "MERGE" then
          fam = families[name]
          if not fam then
            fam = { samples = {}, keys = {} }
            families[name], order_of[#order_of + 1] = fam, name
          end
          if what == "HELP" then fam.help = fam.help or rest
          elseif what == "TYPE" then fam.kind = fam.kind or rest
          else fam.merge = fam.merge or rest end
        end
      elseif fam then
        local key, v = line:match("^(.-) (%S+)$")
        v = key and parse_value(v)
        local gauge = fam.kind == "gauge"
        if v and (live or not gauge) then
          local how = gauge and MERGES[fam.merge] and fam.merge or "sum"
          if how == "worker" then key = with_worker(key, slot) end
          local had = fam.samples[key]
          if had == nil then fam.keys[#fam.keys + 1] = key end
          if how == "mostrecent" then
            fam.at = fam.at or {}
            if had == nil or at > fam.at[key] then fam.samples[key], fam.at[key] = v, at end
          else
            fam.samples[key] = had == nil and v or combine[how](had, v)
          end
        end
      end
    end
  end
  local out = {}
  for _, name in ipairs(order_of) do
    local fam = families[name]
    if fam.help then out[#out + 1] = ("# HELP %s %s"):format(name, fam.help) end
    if fam.kind then out[#out + 1] = ("# TYPE %s %s"):format(name, fam.kind) end
    for _, key in ipairs(fam.keys) do out[#out + 1] = ("%s %s"):format(key, number(fam.samples[key])) end
  end
  return table.concat(out, "\n") .. "\n"
end

local function merged(dir) return merge((read_files(dir))) end

-- Dead workers' files, one more at each restart (a worker crashing for days
-- would leave thousands, each read at every scrape): past DEAD_MAX, worker 0
-- (as it starts, then every 10th write) merges them into one, which names those it replaces before they are
-- removed (worker 0 killed in between: the merge leaves them out, the next
-- compaction removes them). Only worker 0 does it, one process at a time.
local DEAD_MAX, compactions = 8, 0
local function compact(dir)
  local files, replaced = read_files(dir)
  for gone in pairs(replaced) do os.remove(dir .. "/" .. gone) end -- (a compaction cut short)
  local dead, lines = {}, {}
  for _, file in ipairs(files) do
    if not file.live then
      dead[#dead + 1] = file
      lines[#lines + 1] = "# REPLACES " .. file.name
    end
  end
  if #dead <= DEAD_MAX then return true end
  compactions = compactions + 1
  local name = ("d-0-%sn%d.prom"):format(own_pid(), compactions)
  lines[#lines + 1] = merge(dead)
  local ok, err = write_text(dir .. "/" .. name, table.concat(lines, "\n"))
  if not ok then return nil, err end
  for _, file in ipairs(dead) do os.remove(dir .. "/" .. file.name) end
  return true
end

-- metrics.scrape() -> what GET /metrics answers: metrics.text(), or under
-- gateway --workers every worker's figures merged (this one's file written first)
-- A worker whose file cannot be written (the folder's disk full) raises: the merge would answer its
-- figures as they were at the last write, a 200 whose counts froze while it served (its files'
-- folder is everyone's, so the others' froze too); a failed scrape is Prometheus' up = 0, which
-- alerts, and no count is lost (nor goes down: a merge of this worker's memory with the others'
-- old files could read lower than the next scrape another worker answers).
function scrape()
  if not shard then return exposition(false) end
  if not shard.final then
    local ok, err = write_shard()
    if not ok then error(("metrics: this worker's figures could not be written for the merge: %s"):format(
      tostring(type(err) == "table" and err.message or err)), 0) end
  end
  return merged(shard.dir)
end

metrics.scrape = scrape

-- the exposition written whole, then renamed over path (a scrape that fails: nil, err)
local function write_file(path)
  local ok, text = pcall(scrape)
  if not ok then return nil, resil.error("io", tostring(text)) end
  return write_text(path, text)
end

-- metrics.shard{dir =, slot =}: this process is worker `slot` of a gateway
-- whose supervisor made `dir` (src/main.c): its figures are written there,
-- each second and at each scrape, for every worker's scrape to merge. Only
-- the timer and the scrape write: nothing on a request's path.
function metrics.shard(opts)
  check_file(opts.dir .. "/x", "resil.metrics.shard")
  shard = { dir = opts.dir, slot = tostring(opts.slot),
            file = ("%s/w-%s-%s.prom"):format(opts.dir, opts.slot, own_pid()) }
  local ok, err = write_shard()
  if not ok then error("metrics: " .. tostring(err), 0) end
  -- worker 0 merges the dead ones' files as it starts too: one that dies before its 10th
  -- write (a crash at a request, again and again) never did, and they piled up, one a death
  local function compact_dead()
    local cok, done, cerr = pcall(compact, shard.dir)
    if not (cok and done) then
      resil.log.warn("metrics: dead workers' files not merged", { error = tostring(cok and cerr or done) })
    end
  end
  if shard.slot == "0" then compact_dead() end
  -- each second the counts; the figures read from state (the collectors: a
  -- budget's are store reads) every 10th time, and at each of its scrapes.
  -- A write takes the loop from the requests: one that took t waits 100 t
  -- at least (at most 1% of the loop; 15,000 series take some 20 ms).
  local n, took, failing = 0, 0, false
  local wall = resil.clock.wall
  resil.background(function()
    while true do
      resil.sleep(math.max(opts.interval or 1, 100 * took))
      n = n + 1
      local t0 = wall()
      local wrote, werr = write_shard(n % 10 ~= 0)
      took = wall() - t0
      -- (said once while it keeps failing: the folder removed under the gateway)
      if not wrote and not failing then
        resil.log.warn("metrics: this worker's file not written", { error = tostring(werr) })
      end
      failing = not wrote
      if n % 10 == 0 and shard.slot == "0" then compact_dead() end
    end
  end)
  return true
end

-- metrics.write_file(path) -> true | nil, err
function metrics.write_file(path)
  check_file(path, "resil.metrics.write_file")
  return write_file(path)
end

-- "HOST:PORT", "[::1]:PORT" or ":PORT" -> host, port | nil
local function parse_addr(addr)
  local host, port = addr:match("^%[([^%]]+)%]:(%d+)$")
  if not host then host, port = addr:match("^([^:]*):(%d+)$") end
  port = tonumber(port)
  if not port or port > 65535 then return nil end
  return host ~= "" and host or "127.0.0.1", port
end

-- The command line's --metrics-addr and --metrics-file, for the life of the
-- run: GET /metrics on addr; the file written every `interval` seconds (in a
-- background task, which does not keep the process running) and at exit
-- (metrics.finish, called by the CLI). -> true | raises with the reason
local exported
function metrics.export(opts)
  exported = exported or {}
  if opts.addr then
    local host, port = parse_addr(opts.addr)
    if not host then error(("--metrics-addr: '%s' is not HOST:PORT"):format(opts.addr), 0) end
    local ok, srv, err = pcall(serve, { host = host, port = port })
    if not ok or not srv then
      local why = not ok and srv or (type(err) == "table" and err.message or err) -- raised, or nil, err
      error(("--metrics-addr %s: %s"):format(opts.addr, tostring(why)), 0)
    end
    exported.server = srv
  end
  if opts.file then
    check_file(opts.file, "resil.metrics.export")
    local ok, err = write_file(opts.file)
    if not ok then error("--metrics-file: " .. tostring(err), 0) end
    exported.file = opts.file
    local interval = opts.interval or 15
    -- (a gateway's worker 0 writes the merge; at exit, each does, the last with every count)
    if shard and shard.slot ~= "0" then return true end
    resil.background(function()
      local failing = false
      while true do
        resil.sleep(interval)
        local wrote, werr = write_file(opts.file)
        -- said once while it keeps failing (a full disk: a line every 15 s for days), and once as it ends
        if not wrote and not failing then resil.log.warn("metrics file not written", { error = tostring(werr) })
        elseif wrote and failing then resil.log.info("metrics file written again", { file = opts.file }) end
        failing = not wrote
      end
    end)
  end
  return true
end

-- at exit: the file written a last time (every count the run made)
function metrics.finish()
  if shard and not shard.final then
    -- this worker's figures written a last time, then marked final (f-...):
    -- the --metrics-file is written by the worker that finds no other live
    -- one, so that it holds every worker's last counts (each wrote its own
    -- before looking); one that finds another leaves it to that one
    local ok, err = write_shard()
    if not ok then io.stderr:write("resil-lua: ", tostring(err), "\n") end
    os.rename(shard.file, (shard.file:gsub("/w(%-[^/]+)$", "/f%1")))
    shard.final = true
    for _, name in ipairs(list_dir(shard.dir) or {}) do
      if name:match("^w%-%d+%-%w+%.prom$") then return end
    end
  end
  if exported and exported.file then
    local ok, err = write_file(exported.file)
    if not ok then io.stderr:write("resil-lua: ", tostring(err), "\n") end
  end
end

-- (the host's listen, taken at load: under the sandbox a script's resil.server.listen refuses
-- reuseport, which a gateway worker's metrics server takes)
local listen = resil.server.listen
-- resil.metrics.serve{host = "127.0.0.1", port = 9464} -> server (GET /metrics)
function serve(opts)
  if opts ~= nil and type(opts) ~= "table" then -- (serve(9464): "attempt to index a number value" at this file's line)
    error(("resil.metrics.serve: expects a table {host=, port=}, got %s"):format(type(opts)), 2)
  end
  opts = opts or {}
  -- (in a gateway's worker, every worker listens there: one answers, with the merge)
  local reuseport = opts.reuseport
  if reuseport == nil then reuseport = shard ~= nil end
  return listen({
    host = opts.host or "127.0.0.1",
    port = opts.port or 9464,
    reuseport = reuseport,
    handler = function(req)
      if req.path == "/metrics" then
        -- (HEAD as GET, its body left out by the server: a `curl -I` or a load balancer's check
        -- got a 404 for a path that serves)
        if req.method ~= "GET" and req.method ~= "HEAD" then
          return { status = 405, headers = { allow = "GET, HEAD", ["content-type"] = "text/plain" },
                   body = "GET /metrics\n" }
        end
        local ok, text = pcall(scrape)
        if not ok then return { status = 503, body = tostring(text) .. "\n" } end -- (a failed scrape: up = 0)
        return { status = 200, headers = { ["content-type"] = "text/plain; version=0.0.4" }, body = text }
      end
      return { status = 404, headers = { ["content-type"] = "text/plain" }, body = "not found: try GET /metrics\n" }
    end,
  })
end

metrics.serve = serve
-- (the policies' own scrape: GET /metrics of policies.gateway)
private.metrics.scrape = scrape

-- resil.metrics.max_series: read and set through the table, kept in max_series above
setmetatable(metrics, {
  __index = function(_, k) if k == "max_series" then return max_series end end,
  __newindex = function(t, k, v)
    if k ~= "max_series" then return rawset(t, k, v) end
    if not private.sandbox then
      max_series, host_max_series = v, v
      return
    end
    if type(v) ~= "number" or v ~= v then error("resil.metrics.max_series must be a number", 2) end
    max_series, host_max_series = v, math.max(v, HOST_MAX_SERIES)
  end,
  __metatable = false,
})

return metrics
