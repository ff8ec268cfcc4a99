-- The exposition stays one Prometheus takes whole, whatever names and labels a script picks:
-- a label or a metric name that collides with a series the exposition writes itself (a
-- histogram's le, h_sum, h_count, h_bucket; a merge = "worker" gauge's worker; __name__) is
-- refused where it is made, rather than failing every scrape after it.
local resil = require "resil"

local has_promtool = os.execute("command -v promtool > /dev/null 2>&1") == true

-- promtool check metrics on the text -> ok, its output
local function promtool(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  local p = io.popen(("promtool check metrics < %s 2>&1"):format(path))
  local out = p:read("a")
  local ok = p:close()
  os.remove(path)
  return ok, out
end

describe("metrics exposition under hostile names", function()
  it("refuses a histogram label named le, and label names under __", function()
    local h = resil.metrics.histogram("spec_expo_seconds", "Latency", { buckets = { 1 } })
    local ok, err = pcall(h.observe, h, { le = "x" }, 0.5)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('label name "le" is reserved', 1, true))
    assert.is_false((pcall(h.labels, h, { le = "x" })))
    local c = resil.metrics.counter("spec_expo_total", "Total")
    ok, err = pcall(c.inc, c, { __name__ = "other" })
    assert.is_false(ok)
    assert.truthy(tostring(err):find('"__name__" is reserved', 1, true))
    c:inc({ kind = "fine" })
    local g = resil.metrics.gauge("spec_expo_per_worker", "Per worker", { merge = "worker" })
    assert.is_false((pcall(g.set, g, { worker = "w" }, 1)))
    local text = resil.metrics.text()
    assert.is_nil(text:find("spec_expo_seconds_bucket{le=", 1, true))
    assert.truthy(text:find('spec_expo_total{kind="fine"} 1\n', 1, true))
    if has_promtool then
      local good, out = promtool(text)
      assert.is_true(good, out)
    end
  end)

  it("refuses a metric named like a histogram's series, whichever comes first", function()
    resil.metrics.histogram("spec_expo_latency", "Latency")
    for _, name in ipairs({ "spec_expo_latency_sum", "spec_expo_latency_count", "spec_expo_latency_bucket" }) do
      local ok, err = pcall(resil.metrics.counter, name, "Collides")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("collides with the histogram 'spec_expo_latency'", 1, true), err)
    end
    resil.metrics.gauge("spec_expo_queue_count", "Queue")
    local ok, err = pcall(resil.metrics.histogram, "spec_expo_queue", "Queue time")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("collides with the gauge 'spec_expo_queue_count'", 1, true), err)
  end)

  it("label values with quotes, backslashes, newlines, bad UTF-8 and great length stay valid", function()
    local c = resil.metrics.counter("spec_expo_hostile_total", 'Help with \\ and "quotes"\nand a newline')
    c:inc({ v = 'a"b\\c\nd\re\255\254f' })
    c:inc({ v = ("x"):rep(100000) })
    local text = resil.metrics.text()
    assert.truthy(text:find('spec_expo_hostile_total{v="a\\"b\\\\c\\nd\re\u{FFFD}\u{FFFD}f"} 1\n', 1, true))
    assert.truthy(text:find('# HELP spec_expo_hostile_total Help with \\\\ and "quotes" and a newline\n', 1, true))
    assert.are.same({}, require("spec.prom_strict")(text))
    if has_promtool then
      local good, out = promtool(text)
      assert.is_true(good, out)
    end
  end)
end)
