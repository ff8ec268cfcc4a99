-- `resil-lua runs show ID --html FILE`: one self-contained page (timeline,
-- cost by provider and model, latency by provider, retries and fallbacks by
-- class, failures). Its figures are the ledger's and the steps'; rendered in
-- a real browser (headless Chromium) with no script errors and no request
-- leaving the page. On SQLite and on a real redis-server.
local helpers = require "spec.helpers"

local function sh(cmd) return helpers.run(cmd) end

-- Six items over two providers. Item 2's caption retries a timeout once;
-- item 5's times out three times (failed after 2 retries); item 4's first
-- strategy times out and the chain falls back; item 3 fails outside a step
-- with an error holding a credential and markup.
local pipeline = [[
local resil = require "resil"
local retry = require "policies.retry"
local fallback = require "policies.fallback"
local function slow(attempt) resil.sleep(0.25 * attempt) end
resil.map({ 1, 2, 3, 4, 5, 6 }, function(i)
  resil.step("fetch", function()
    resil.sleep(10 - i)
    resil.cost.record{ provider = i % 2 == 0 and "openai" or "anthropic", model = "m" .. i % 3, usd = 0.01 * i }
    return i
  end)
  if i == 3 then error("boom <script>alert(1)</script> at https://api.example/v1?key=sekrit123") end
  return resil.step("caption", function()
    local chain = fallback.chain{
      { name = "first", on = { "timeout" }, fn = function()
        return retry.call(function(attempt)
          slow(attempt)
          if i == 4 or i == 5 or (i == 2 and attempt < 2) then
            return nil, resil.error("timeout", "provider too slow")
          end
          return i * 2
        end, { provider = "mock", max_retries = i == 4 and 0 or 2 })
      end },
      { name = "second", fn = function()
        return retry.call(function(attempt)
          slow(attempt)
          if i == 5 then return nil, resil.error("timeout", "provider too slow") end
          return i * 3
        end, { provider = "backup", max_retries = 0 })
      end },
    }
    return chain()
  end)
end, { concurrency = 6 })
]]

-- the ledger's calls and micro-dollars by provider and model, from `costs --csv`
local function ledger_by_model(url)
  local r = sh(("%s costs --run r1 --csv --store '%s'"):format(helpers.resil, url))
  assert.are.equal(0, r.code, r.stderr)
  local by, total = {}, 0
  for line in r.stdout:gmatch("[^\n]+") do
    local provider, model, usd = line:match("^[^,]*,([^,]*),([^,]*),[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,([^,]*),")
    if provider and provider ~= "provider" then
      local key = provider .. " " .. model
      local c = by[key] or { calls = 0, micro = 0 }
      by[key] = c
      c.calls = c.calls + 1
      c.micro = c.micro + math.floor(tonumber(usd) * 1e6 + 0.5)
      total = total + math.floor(tonumber(usd) * 1e6 + 0.5)
    end
  end
  return by, total
end

-- the #costs table's body rows as {provider model = {calls=, micro=}}
local function page_costs(html)
  local body = assert(html:match('<table id="costs".-<tbody>(.-)</tbody>'), "no cost table")
  local by = {}
  for row in body:gmatch("<tr>(.-)</tr>") do
    local cells = {}
    for cell in row:gmatch("<td[^>]*>(.-)</td>") do cells[#cells + 1] = cell end
    by[cells[1] .. " " .. cells[2]] = { calls = tonumber(cells[3]),
      micro = math.floor(tonumber((cells[5]:gsub("%$", ""))) * 1e6 + 0.5) }
  end
  return by
end

local function check_figures(html, url)
  local ledger, total = ledger_by_model(url)
  assert.are.equal(6, (function() local n = 0 for _ in pairs(ledger) do n = n + 1 end return n end)())
  assert.are.same(ledger, page_costs(html))
  assert.truthy(html:find(('id="cost-total">$%.6f<'):format(total / 1e6), 1, true), "the total is the ledger's")
  assert.matches('id="sum%-cost"><b>%$0%.210000</b>', html)
  assert.matches('id="run%-status">done_with_failures<', html)
  assert.matches('id="sum%-failed"><b>2</b>', html)
  -- latency by provider: mock tried once for items 1, 4 and 6, twice for 2, three times for 5;
  -- backup once each for items 4 and 5; attempt n sleeps 0.25 n s on the virtual clock
  local latency = assert(html:match('<table id="latency".-<tbody>(.-)</tbody>'))
  assert.matches("<td>mock</td><td class=\"?n\"? data%-v=\"8\">8</td><td[^>]*>250 ms</td><td[^>]*>750 ms</td>", latency)
  assert.matches("<td>backup</td><td class=\"?n\"? data%-v=\"2\">2</td><td[^>]*>250 ms</td>", latency)
  -- retries by class (item 2: 1, item 5: 2) and fallbacks by class (items 4 and 5)
  assert.matches("<td>timeout</td><td class=\"?n\"? data%-v=\"3\">3</td><td class=\"?n\"? data%-v=\"2\">2</td>", html)
  -- failures with their errors, redacted and escaped
  local failures = assert(html:match('<table id="failures".-<tbody>(.-)</tbody>'))
  assert.matches("<td>3</td>.-%(item%).-boom &lt;script&gt;alert%(1%)&lt;/script&gt;", failures)
  assert.matches("<td>5</td>.-caption.-provider too slow", failures)
  assert.not_matches("sekrit123", html)
  assert.not_matches("<script>alert", html)
  -- a timeline bar per step
  local svg = assert(html:match('<svg id="timeline".-</svg>'))
  local bars = 0
  for _ in svg:gmatch("<rect ") do bars = bars + 1 end
  assert.are.equal(12, bars)
end

local function chromium_skip_reason()
  if sh("command -v chromium").code ~= 0 then
    return "chromium is not installed (make deps installs Debian's chromium)"
  end
  return nil
end

-- -> the DOM after scripts ran, and the browser's console lines
local function render(path)
  local profile = helpers.tmpname("-chromium")
  local r = sh(("timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-background-networking " ..
    "--disable-component-update --disable-sync --no-first-run --user-data-dir='%s' --enable-logging=stderr " ..
    "--v=0 --dump-dom 'file://%s'"):format(profile, path))
  os.execute("rm -rf '" .. profile .. "'")
  assert.are.equal(0, r.code, r.stderr)
  local console = {}
  for line in r.stderr:gmatch("[^\n]+") do
    if line:find(":CONSOLE", 1, true) then console[#console + 1] = line end
  end
  return r.stdout, console
end

for i, b in ipairs(helpers.store_backends()) do
  describe("runs show --html on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    local url, html_path, html

    setup(function()
      url = b.url()
      local script = helpers.write(helpers.tmpname(".lua"), pipeline)
      local r = sh(("%s --store '%s' --virtual-clock --log-level off --run r1 %s"):format(helpers.resil, url, script))
      assert.are.equal(0, r.code, r.stderr)
      html_path = helpers.tmpname(".html")
      local show = sh(("%s runs show r1 --html '%s' --store '%s'"):format(helpers.resil, html_path, url))
      assert.are.equal(0, show.code, show.stderr)
      local f = assert(io.open(html_path))
      html = f:read("a")
      f:close()
    end)

    it("writes one page whose figures are the ledger's and the steps'", function()
      check_figures(html, url)
      assert.matches("Resume: <code id=\"resume\">resil%-lua ", html)
    end)

    it("needs nothing from the network: no link, stylesheet or script from elsewhere", function()
      assert.not_matches("<link", html)
      assert.not_matches("src=", html)
      assert.not_matches("https?://[%w.]+/[%w/]*%.[jc]ss?", html)
      assert.matches("default%-src 'none'", html) -- the page's own CSP refuses any request
    end)

    -- (before: an item whose call had no price read $0.000000, and the run's cost said nothing of it)
    it("runs show counts the calls without a price, by item and in the run's cost, never as $0", function()
      local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.map({ 1, 2, 3 }, function(i)
  return resil.step("call", function()
    assert(resil.cost.record({ provider = "p", model = "m", usd = i == 1 and 0.5 or nil }))
  end)
end)
]])
      local r = sh(("%s --store '%s' --log-level off --run r2 %s"):format(helpers.resil, url, script))
      assert.are.equal(0, r.code, r.stderr)
      local show = sh(("%s runs show r2 --store '%s'"):format(helpers.resil, url))
      assert.matches("\n1%s+done%s+1%s+0%s+%$0%.500000\n", show.stdout)
      assert.matches("\n2%s+done%s+1%s+0%s+%$0%.000000 %(%+1 unpriced call%)\n", show.stdout)
      assert.matches("; cost %$0%.500000 %(%+2 unpriced calls%)\n", show.stdout)
    end)

    if i == 1 then
      it("refuses an unknown argument and a missing file name", function()
        local r = sh(("%s runs show r1 --html --store '%s'"):format(helpers.resil, url))
        assert.are.equal(1, r.code)
        assert.matches("%-%-html needs a file name", r.stderr)
        r = sh(("%s runs show r1 --pdf x --store '%s'"):format(helpers.resil, url))
        assert.are.equal(1, r.code)
        assert.matches("unknown argument '%-%-pdf'", r.stderr)
      end)

      -- (before: the bytes as they were, and the page was not UTF-8: a decoder refused it or guessed)
      it("writes a step name or error that is not UTF-8 as U+FFFD, control characters as escapes", function()
        local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
resil.step("caption \255\195(", function() return 1 end)
resil.step("tint \27[31m \194\155 x", function() error("cut \226\130", 0) end)
]])
        sh(("%s --store '%s' --log-level off --run latin1 %s"):format(helpers.resil, url, script))
        local page = helpers.tmpname(".html")
        assert.are.equal(0, sh(("%s runs show latin1 --html '%s' --store '%s'"):format(helpers.resil, page, url)).code)
        local text = helpers.slurp(page)
        assert.is_not_nil(utf8.len(text), "the page is not UTF-8")
        assert.matches("caption \u{FFFD}\u{FFFD}(", text, 1, true)
        assert.matches("tint \\x1b[31m \\u009b x", text, 1, true)
        assert.matches("cut \u{FFFD}\u{FFFD}", text, 1, true)
      end)

      local why = chromium_skip_reason()
      if why then
        it("skipped in a browser: " .. why, function() print("# report_spec: browser check skipped: " .. why) end)
      else
        it("renders in headless Chromium without script errors, showing the ledger's figures", function()
          local dom, console = render(html_path)
          assert.are.same({}, console) -- no script error, no CSP violation, nothing logged
          assert.matches('data%-ready="1"', dom) -- the page's script ran to its end
          check_figures(dom, url)
        end)
      end
    end
  end)
end
