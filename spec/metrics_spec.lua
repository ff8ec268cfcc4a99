local resil = require "resil"

describe("resil.metrics", function()
  it("counts by label set, whatever the order the labels come in", function()
    local c = resil.metrics.counter("spec_requests_total", "Requests")
    c:inc({ provider = "openai", class = "ok" })
    c:inc({ class = "ok", provider = "openai" }, 2)
    c:labels({ provider = "anthropic", class = "ok" }):inc()
    assert.are.equal(3, c:value({ provider = "openai", class = "ok" }))
    assert.are.equal(1, c:value({ provider = "anthropic", class = "ok" }))
    assert.has_error(function() c:inc(nil, -1) end)
    assert.are.equal(c, resil.metrics.counter("spec_requests_total")) -- one per name
    assert.has_error(function() resil.metrics.gauge("spec_requests_total") end)
  end)

  it("exposes the Prometheus text format, histograms cumulative", function()
    local h = resil.metrics.histogram("spec_seconds", "Latency", { buckets = { 0.1, 1 } })
    h:observe({ provider = "p" }, 0.05)
    h:observe({ provider = "p" }, 0.5)
    h:observe({ provider = "p" }, 5)
    local g = resil.metrics.gauge("spec_inflight", "In flight")
    g:set(nil, 3)
    g:dec()
    local text = resil.metrics.text()
    assert.truthy(text:find('# TYPE spec_seconds histogram\n', 1, true))
    assert.truthy(text:find('spec_seconds_bucket{provider="p",le="0.1"} 1\n', 1, true))
    assert.truthy(text:find('spec_seconds_bucket{provider="p",le="1"} 2\n', 1, true))
    assert.truthy(text:find('spec_seconds_bucket{provider="p",le="+Inf"} 3\n', 1, true))
    assert.truthy(text:find('spec_seconds_count{provider="p"} 3\n', 1, true))
    assert.truthy(text:find('spec_seconds_sum{provider="p"} 5.55\n', 1, true))
    assert.truthy(text:find('spec_inflight 2\n', 1, true))
  end)

  -- (before: { 1, 1, 2, math.huge } wrote le="1" twice and le="+Inf" twice, series a scraper drops or
  -- refuses, with the caller's own table sorted in place; a NaN or a string among them raised
  -- "attempt to compare number with string" from inside table.sort, or was taken)
  it("takes a histogram's buckets as Prometheus does: each once, +Inf its own, the caller's table left as it is", function()
    local given = { 5, 1, math.huge, 2 }
    local h = resil.metrics.histogram("spec_given_buckets_seconds", "Given", { buckets = given })
    h:observe(nil, 1.5)
    h:observe(nil, 50)
    local text = resil.metrics.text()
    local les = {}
    for le in text:gmatch('spec_given_buckets_seconds_bucket{le="([^"]*)"}') do les[#les + 1] = le end
    assert.are.same({ "1", "2", "5", "+Inf" }, les)
    assert.truthy(text:find('spec_given_buckets_seconds_bucket{le="+Inf"} 2\n', 1, true))
    assert.are.same({ 5, 1, math.huge, 2 }, given)
    for _, case in ipairs({
      { { 1, 1, 2 }, "bucket 1 is given twice" },
      { { 1, 0 / 0 }, "bucket 2 must be a number, not NaN" },
      { { "1", 2 }, "bucket 1 must be a number, not a string" },
    }) do
      local ok, err = pcall(resil.metrics.histogram, "spec_bad_buckets_seconds", "Bad", { buckets = case[1] })
      assert.is_false(ok)
      assert.matches("resil.metrics.histogram: " .. case[2], err, 1, true)
    end
  end)

  -- (a policy reload's new version gave its histogram other buckets and got the first ones, without a word)
  it("says so when a histogram is made again with other buckets, which it does not take", function()
    local helpers = require "spec.helpers"
    resil.metrics.histogram("spec_rebucketed_seconds", "Rebucketed", { buckets = { 1, 5 } })
    local lines = helpers.logged(function()
      resil.metrics.histogram("spec_rebucketed_seconds", "Rebucketed", { buckets = { 5, 1, math.huge } }) -- the same
      resil.metrics.histogram("spec_rebucketed_seconds", "Rebucketed") -- none given
      resil.metrics.histogram("spec_rebucketed_seconds", "Rebucketed", { buckets = { 0.5, 1, 5 } })
    end)
    assert.are.equal(1, #lines)
    assert.are.equal("warn", lines[1].level)
    assert.matches("keeps the buckets it was made with", lines[1].msg)
    assert.are.equal("spec_rebucketed_seconds", lines[1].metric)
    assert.are.same({ 1, 5 }, lines[1].buckets)
  end)

  -- (a bound histogram series has no value until its first observation: it was admitted at labels() and
  -- again at that observation, so it took two places of max_series; the ledger's token usage by model
  -- dropped series, and warned, at half its bound)
  -- (a policy file edited to make its counter a gauge failed every reload after, "already a
  -- counter", with no word of the way out)
  it("refuses a name made again as another kind at the caller's line, saying it stays what it is until a restart",
    function()
    resil.metrics.counter("kind_changed_total", "a count")
    local ok, err = pcall(function() local g = resil.metrics.gauge("kind_changed_total", "now a level"); return g end)
    assert.is_false(ok)
    assert.matches("metrics_spec.lua:%d+: resil.metrics.gauge: 'kind_changed_total' is already a counter, which it " ..
      "stays for the process's life", err)
    assert.matches("give the gauge another name, or restart the process", err, 1, true)
  end)

  it("a histogram's series bound with labels() takes one place of max_series, as a counter's does", function()
    local h = resil.metrics.histogram("spec_bound_once_seconds", "Bound", { max_series = 2, buckets = { 1 } })
    local a, b = h:labels({ model = "a" }), h:labels({ model = "b" })
    a:observe(0.5)
    b:observe(2)
    a:observe(3)
    assert.are.same({ count = 2, sum = 3.5 }, h:value({ model = "a" }))
    assert.are.same({ count = 1, sum = 2 }, h:value({ model = "b" }))
    local text = resil.metrics.text()
    assert.matches('spec_bound_once_seconds_count{model="b"} 1\n', text, 1, true)
    assert.is_nil(text:find('resil_metrics_series_dropped_total{metric="spec_bound_once_seconds"}', 1, true))
    -- its place is its own: a third label set is past the bound
    h:observe({ model = "c" }, 1)
    assert.are.same({ count = 0, sum = 0 }, h:value({ model = "c" }))
  end)

  -- (a bound series checks only what its kind needs: a gauge set to a string through one made every
  -- later exposition raise, and a NaN was written "-nan", which Prometheus refuses with the whole scrape)
  it("a bound gauge refuses a value that is not a number, as gauge:set does; a NaN is exposed as NaN", function()
    local g = resil.metrics.gauge("spec_bound_checked_gauge", "Bound gauge")
    local s = g:labels({ k = "v" })
    assert.error_matches(function() s:set("x") end, "metrics: the value must be a number")
    assert.error_matches(function() s:inc("1") end, "metrics: the increment must be a number")
    s:set(2)
    assert.are.equal(2, g:value({ k = "v" }))
    local h = resil.metrics.histogram("spec_bound_nan", "Bound NaN", { buckets = { 1 } })
    h:labels({ k = "v" }):observe(0 / 0)
    local text = resil.metrics.text()
    assert.matches('spec_bound_checked_gauge{k="v"} 2\n', text, 1, true)
    assert.matches('spec_bound_nan_sum{k="v"} NaN\n', text, 1, true)
  end)

  -- (a Prometheus client's counter.inc(5): labels come first here; it said
  -- "[resil metrics]:45: bad argument #1 to 'next' (table expected, got number)")
  it("refuses labels that are not a table at the caller's line, naming them, and counts nothing", function()
    local c = resil.metrics.counter("spec_labels_not_table_total", "Labels")
    local g = resil.metrics.gauge("spec_labels_not_table", "Labels")
    local h = resil.metrics.histogram("spec_labels_not_table_seconds", "Labels")
    local calls = {
      function() c:inc(5) end, function() g:dec(2) end, function() g:set("x", 1) end,
      function() h:observe(true, 1) end, function() c:labels("x") end, function() c:value(5) end,
    }
    for i, f in ipairs(calls) do
      local line = debug.getinfo(f, "S").linedefined
      local ok, err = pcall(f)
      assert.is_false(ok, i)
      assert.matches("metrics_spec%.lua:" .. line .. ": metrics: labels must be a table", err)
    end
    assert.are.equal(0, c:value())
    assert.are.equal(0, g:value())
  end)

  it("a bound series counts as the metric's own methods do: integers stay integers, errors the same", function()
    local c = resil.metrics.counter("spec_bound_total", "Bound")
    local ints, floats = c:labels({ kind = "ints" }), c:labels({ kind = "floats" })
    ints:inc()
    ints:inc(2)
    c:inc({ kind = "ints" })
    floats:inc(0.1)
    floats:inc(0.2)
    assert.are.equal(math.tointeger(4), c:value({ kind = "ints" }))
    assert.are.equal("float", math.type(c:value({ kind = "floats" })))
    local g = resil.metrics.gauge("spec_bound_gauge", "Bound")
    local gs = g:labels({ k = "v" })
    gs:set(5)
    gs:dec()
    gs:inc(0.5)
    local h = resil.metrics.histogram("spec_bound_tokens", "Bound", { buckets = { 10, 100 } })
    local hs = h:labels({ t = "input" })
    hs:observe(7)
    hs:observe(70)
    h:observe({ t = "input" }, 700)
    local text = resil.metrics.text()
    assert.truthy(text:find('spec_bound_total{kind="ints"} 4\n', 1, true))
    assert.truthy(text:find('spec_bound_total{kind="floats"} 0.3\n', 1, true))
    assert.truthy(text:find('spec_bound_gauge{k="v"} 4.5\n', 1, true))
    assert.truthy(text:find('spec_bound_tokens_bucket{t="input",le="10"} 1\n', 1, true))
    assert.truthy(text:find('spec_bound_tokens_bucket{t="input",le="100"} 2\n', 1, true))
    assert.truthy(text:find('spec_bound_tokens_bucket{t="input",le="+Inf"} 3\n', 1, true))
    assert.truthy(text:find('spec_bound_tokens_sum{t="input"} 777\n', 1, true))
    assert.are.same({ count = 3, sum = 777 }, h:value({ t = "input" }))
    assert.has_error(function() ints:inc(-1) end, "metrics: a counter only goes up")
    assert.has_error(function() ints:inc(0 / 0) end, "metrics: a counter only goes up")
    assert.has_error(function() ints:set(1) end, "metrics: only a gauge is set")
    assert.has_error(function() ints:observe(1) end, "metrics: observe() is for histograms")
    assert.has_error(function() gs:observe(1) end, "metrics: observe() is for histograms")
    assert.has_error(function() hs:inc() end, "metrics: use observe() on a histogram")
    assert.has_error(function() hs:dec() end, "metrics: only a gauge goes down")
    assert.matches("metrics: the increment must be a number", select(2, pcall(ints.inc, ints, "2")))
    assert.matches("metrics: the value must be a number", select(2, pcall(gs.set, gs, "x")))
    assert.matches("metrics: the observation must be a number", select(2, pcall(hs.observe, hs, {})))
    assert.are.equal(math.tointeger(4), c:value({ kind = "ints" })) -- what raised counted nothing
  end)

  -- (a bound histogram series counted once when bound and again at its first
  -- observation: a histogram kept half the series its bound said)
  it("a bound histogram series counts once towards the metric's bound", function()
    local h = resil.metrics.histogram("spec_bound_seconds", "Bound", { max_series = 2 })
    local a, b = h:labels({ u = "a" }), h:labels({ u = "b" })
    a:observe(1)
    b:observe(2)
    local text = resil.metrics.text()
    assert.truthy(text:find('spec_bound_seconds_count{u="a"} 1\n', 1, true))
    assert.truthy(text:find('spec_bound_seconds_count{u="b"} 1\n', 1, true))
    assert.is_nil(text:find('resil_metrics_series_dropped_total{metric="spec_bound_seconds"}', 1, true))
    resil.log.level("error")
    h:labels({ u = "c" }):observe(3) -- past the bound: dropped
    resil.log.level("info")
    assert.truthy(resil.metrics.text():find('resil_metrics_series_dropped_total{metric="spec_bound_seconds"} 1\n', 1,
      true))
  end)

  -- (label sets of one or two string values are looked up by their values,
  -- not by a key made anew each time)
  it("finds a label set's series again, and redacts a secret registered after it was first seen", function()
    local c = resil.metrics.counter("spec_known_total", "Known")
    local value = "tok-spec-known-0123456789"
    c:inc({ user = value, k = "v" })
    c:inc({ k = "v", user = value })
    c:inc({ user = value })
    c:inc({ k = "v" })
    c:inc({ k = value })
    c:inc({ k = "v", n = 1 })
    c:inc({ k = "v", n = "1" })
    resil.log.redact(value)
    c:inc({ k = "v", user = value })
    c:inc({ user = value })
    c:inc({ user = value })
    c:inc({ k = "v" })
    local text = resil.metrics.text()
    local function count(series) return tonumber(text:match("\n" .. series:gsub("%p", "%%%0") .. " (%d+)\n")) end
    assert.are.equal(2, count('spec_known_total{k="v",user="tok-spec-known-0123456789"}'))
    assert.are.equal(1, count('spec_known_total{k="v",user="[REDACTED]"}'))
    assert.are.equal(1, count('spec_known_total{user="tok-spec-known-0123456789"}'))
    assert.are.equal(2, count('spec_known_total{user="[REDACTED]"}'))
    assert.are.equal(2, count('spec_known_total{k="v"}'))
    assert.are.equal(1, count('spec_known_total{k="tok-spec-known-0123456789"}'))
    assert.are.equal(2, count('spec_known_total{k="v",n="1"}'))
    assert.has_error(function() c:inc({ ["bad-name"] = "v" }) end)
    assert.has_error(function() c:inc({ k = "v", [1] = "x" }) end)
  end)

  it("breakers count their transitions and rejections", function()
    resil.log.level("error")
    local br = resil.breaker("metrics-br", { window_type = "count", window = 2, min_calls = 2 })
    br:record(false, 0.1)
    br:record(false, 0.1)
    br:allow()
    resil.log.level("info")
    assert.are.equal(1, resil.metrics.counter("resil_breaker_transitions_total"):value({ breaker = "metrics-br",
      to = "open" }))
    assert.are.equal(1, resil.metrics.counter("resil_breaker_rejected_total"):value({ breaker = "metrics-br" }))
  end)

  it("escapes label values", function()
    local c = resil.metrics.counter("spec_escaped_total", "Escapes")
    c:inc({ path = 'a"b\\c\nd' })
    assert.truthy(resil.metrics.text():find('spec_escaped_total{path="a\\"b\\\\c\\nd"} 1', 1, true))
  end)

  it("serves GET /metrics over HTTP", function()
    local s = resil.metrics.serve({ port = 0 })
    local res = assert(resil.http.request({ url = ("http://127.0.0.1:%d/metrics"):format(s:port()) }))
    s:close()
    assert.are.equal(200, res.status)
    assert.matches("^text/plain", res.headers["content-type"])
    assert.truthy(res.body:find("# TYPE spec_requests_total counter", 1, true))
  end)

  it("answers HEAD /metrics as GET without the body, and another method with 405 and Allow", function()
    -- (before: HEAD, as `curl -I` or a load balancer's check sends it, was a 404 for a path that serves)
    local s = resil.metrics.serve({ port = 0 })
    local url = ("http://127.0.0.1:%d/metrics"):format(s:port())
    local head = assert(resil.http.request({ url = url, method = "HEAD" }))
    local post = assert(resil.http.request({ url = url, method = "POST", body = "x" }))
    local other = assert(resil.http.request({ url = url:gsub("/metrics$", "/nope") }))
    s:close()
    assert.are.equal(200, head.status)
    assert.matches("^text/plain", head.headers["content-type"])
    assert.are.equal("", head.body)
    assert.are.equal(405, post.status)
    assert.are.equal("GET, HEAD", post.headers["allow"])
    assert.are.equal(404, other.status)
    assert.matches("^text/plain", other.headers["content-type"])
  end)

  it("the policies count what they do: retries and calls by provider and outcome", function()
    resil.clock.virtual()
    resil.log.level("error")
    local call = require "policies.call"
    local m = resil.mock.start({ sequence = { chat = { 503, "ok" } } })
    local p = call.provider("metrics-spec", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
                                              retry = { base = 0.01 } })
    assert(p({ json = { messages = {} } }))
    m:stop()
    resil.log.level("info")
    local calls = resil.metrics.counter("resil_calls_total")
    assert.are.equal(1, calls:value({ provider = "metrics-spec", outcome = "server_error" }))
    assert.are.equal(1, calls:value({ provider = "metrics-spec", outcome = "ok" }))
    assert.are.equal(1, resil.metrics.counter("resil_retries_total"):value({ provider = "metrics-spec",
      class = "server_error" }))
  end)
  -- (before: the gauges were set at each reserve only, so a budget whose calls had all ended
  -- still showed the last one's hold as reserved until the next reserve)
  it("a budget's gauges follow its tickets to their end: settled and released holds are no longer reserved", function()
    local helpers = require "spec.helpers"
    resil.store_config({ url = helpers.tmpname(".db") })
    local b = resil.budget("metrics-spec-budget", { limit = 10 })
    local gauge = function(name) return resil.metrics.gauge(name):value({ budget = "metrics-spec-budget" }) end
    local t1 = assert(b:reserve(1))
    local t2 = assert(b:reserve(2))
    assert.are.equal(3, gauge("resil_budget_reserved_usd"))
    assert(t1:settle(0.25, { provider = "p", model = "m" }))
    assert.are.equal(2, gauge("resil_budget_reserved_usd"))
    assert.are.equal(0.25, gauge("resil_budget_spent_usd"))
    t1:settle(0.25) -- (a second settle changes nothing, here as in the store)
    assert(t2:release())
    assert.are.equal(0, gauge("resil_budget_reserved_usd"))
    assert.are.equal(0.25, gauge("resil_budget_spent_usd"))
    assert.are.equal(9.75, gauge("resil_budget_remaining_usd"))
    local st = b:state()
    assert.are.same({ 0.25, 0 }, { st.spent, st.reserved })
  end)

  -- A budget is shared state (the store's): every process that uses it shows the store's figures
  -- when its metrics are exposed, another process's spend and a new day's start included. Before,
  -- each showed its own last view: gateway workers scraped in turn gave different values for one
  -- budget, and a process idle since its last call showed that call's day for good.
  it("a budget's gauges are the store's figures when exposed: another process's spend, a new day", function()
    local helpers = require "spec.helpers"
    resil.clock.virtual()
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    local name = "metrics_spec_shared"
    local b = resil.budget(name, { limit = 10, per = "day" })
    assert(assert(b:reserve(1)):settle(0.5, { provider = "p", model = "m" }))
    local r = helpers.run_script(([[
local t = assert(require("resil").budget(%q, { limit = 10, per = "day" }):reserve(3))
assert(t:settle(2, { provider = "p", model = "m" }))
]]):format(name), "--store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    local function exposed(metric)
      return tonumber(resil.metrics.text():match(metric .. '{budget="' .. name .. '"} (%S+)\n'))
    end
    assert.are.equal(2.5, exposed("resil_budget_spent_usd"))
    assert.are.equal(7.5, exposed("resil_budget_remaining_usd"))
    resil.sleep(86400 - resil.store_now() % 86400 + 1) -- the next day, nothing reserved since
    assert.are.equal(0, exposed("resil_budget_spent_usd"))
    assert.are.equal(10, exposed("resil_budget_remaining_usd"))
    resil.clock.real()
  end)

  -- (before, on SQLite: a scrape read a killed process's holds as reserved until their end, ten
  -- minutes by default, while `budgets show` and every reservation had them gone: a gateway
  -- worker's crash showed its key's budget still held on every dashboard)
  it("a budget's gauges leave out the holds of a process that died (kill -9), as `budgets show` does", function()
    local helpers = require "spec.helpers"
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    local name = "metrics_spec_dead_holder"
    local pid, out = helpers.start(([[
local resil = require "resil"
assert(resil.budget(%q, { limit = 10 }):reserve(3))
print("held"); io.stdout:flush()
while true do resil.sleep(1) end
]]):format(name), "--store " .. db .. " --log-level off")
    finally(function() if helpers.alive(pid) then os.execute("kill -9 " .. pid) end end)
    assert(helpers.wait_until(function() return helpers.slurp(out):match("held") ~= nil end, 20), helpers.slurp(out))
    os.execute("kill -9 " .. pid)
    assert(helpers.wait_until(function() return not helpers.alive(pid) end, 10))
    assert(assert(resil.budget(name, { limit = 10 }):reserve(1)):release()) -- (fits: nothing judged dead)
    local function exposed(metric)
      return tonumber(resil.metrics.text():match(metric .. '{budget="' .. name .. '"} (%S+)\n'))
    end
    assert.are.equal(0, exposed("resil_budget_reserved_usd"))
    assert.are.equal(10, exposed("resil_budget_remaining_usd"))
  end)

  -- (budget:state() is a write on SQLite: read at a scrape, it waited for the lock and failed)
  it("a budget's gauges are read without waiting for another process's write lock", function()
    local helpers = require "spec.helpers"
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db .. "?timeout=0.3" })
    local name = "metrics_spec_locked"
    assert(assert(resil.budget(name, { limit = 10, per = "day" }):reserve(1)):settle(0.5, { provider = "p" }))
    local r = helpers.run_script(([[
assert(assert(require("resil").budget(%q, { limit = 10, per = "day" }):reserve(3)):settle(2, { provider = "p" }))
]]):format(name), "--store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    local release = helpers.hold_write_lock(db)
    finally(function() helpers.write(release, "") end)
    local text = resil.metrics.text()
    helpers.write(release, "")
    -- (the holder's commit, before the suite ends: spec/run fails a suite that leaves a process)
    assert(helpers.wait_until(function()
      return helpers.run("sqlite3 " .. db .. " 'BEGIN IMMEDIATE; COMMIT;'").code == 0
    end, 15))
    assert.are.equal(2.5, tonumber(text:match('resil_budget_spent_usd{budget="' .. name .. '"} (%S+)\n')))
  end)
end)
