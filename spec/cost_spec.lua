-- The cost ledger against what the provider billed: every paid call is
-- recorded exactly once, however steps, resil.once, resil.map, retries and
-- resumed runs nest. The mock provider counts what it billed (responses and
-- dollars), so each test compares the ledger with the bill.
local resil = require "resil"
local helpers = require "spec.helpers"

local PRICE = { input = 0.0005, output = 0.0015 } -- the mock's default, USD per 1K tokens

local function fresh_store()
  resil.store_config({ url = helpers.tmpname(".db") })
  return assert(resil.store())
end

-- the ledger's rows and dollars
local function ledger()
  local rows, usd = 0, 0
  for _, g in ipairs(assert(resil.cost.breakdown("provider"))) do rows, usd = rows + g.calls, usd + g.usd end
  return rows, usd
end

local function assert_ledger_matches(billed)
  local rows, usd = ledger()
  assert.are.equal(billed.responses, rows, "ledger rows against responses billed")
  assert.is_true(math.abs(usd - billed.usd) < 1e-6 * math.max(rows, 1), ("ledger $%.6f, billed $%.6f"):format(usd,
    billed.usd))
end

-- a chat call to the mock that records what it cost; -> the reply
local function paid_call(url, prompt, extra)
  local res = assert(resil.http.request({ method = "POST", url = url .. "/v1/chat/completions",
    json = { model = "m", messages = { { role = "user", content = prompt } } } }))
  assert.are.equal(200, res.status)
  local body = resil.json.decode(res.body)
  local u = body.usage
  local entry = { provider = "mock", model = "m", operation = "chat",
    usd = (u.prompt_tokens * PRICE.input + u.completion_tokens * PRICE.output) / 1000 }
  for k, v in pairs(extra or {}) do entry[k] = v end
  assert(resil.cost.record(entry))
  return body.choices[1].message.content
end

describe("resil.cost inside steps and once (one process)", function()
  local m
  before_each(function()
    resil.clock.virtual()
    resil.log.level("error")
    fresh_store()
    m = resil.mock.start({ latency = 0.01 })
  end)
  after_each(function()
    m:stop()
    resil.log.level("info")
  end)

  it("three paid calls, each under its own resil.once, inside one step: three rows, as billed", function()
    resil.step("three images", function()
      for i = 1, 3 do resil.once("image-" .. i, paid_call, m.url, "topic " .. i) end
      return true
    end)
    assert.are.equal(3, m:stats().billed.responses)
    assert_ledger_matches(m:stats().billed)
  end)

  it("nested steps, map items, once inside once and retried calls: one row per billed call", function()
    local call = require "policies.call"
    m:configure({ latency = 0.01, sequence = { chat = { 503, 429, "ok" } } })
    local chat = call.provider("cost-spec", { request = { method = "POST", url = m.url .. "/v1/chat/completions" },
      retry = { base = 0.01 }, validate = "chat" })
    local function retried(prompt)
      local res = assert(chat({ json = { model = "m", messages = { { role = "user", content = prompt } } } }))
      local u = resil.json.decode(res.body).usage
      assert(resil.cost.record({ provider = "mock", usd = (u.prompt_tokens * PRICE.input
        + u.completion_tokens * PRICE.output) / 1000 }))
      return true
    end
    resil.step("outer", function()
      resil.once("retried", retried, "retried after 503 and 429") -- the first chat calls: 503, 429, then ok
      paid_call(m.url, "outer 1")
      resil.step("inner", function()
        paid_call(m.url, "inner 1")
        resil.once("inner-once", function()
          paid_call(m.url, "once 1")
          resil.once("nested-once", paid_call, m.url, "nested once")
          return paid_call(m.url, "once 2")
        end)
        return paid_call(m.url, "inner 2")
      end)
      return paid_call(m.url, "outer 2")
    end)
    resil.map({ "a", "b", "c", "d" }, function(x)
      return resil.step("item", function()
        paid_call(m.url, x .. " plain")
        resil.once("item-" .. x, paid_call, m.url, x .. " once")
        return resil.step("item inner", paid_call, m.url, x .. " inner")
      end)
    end, { concurrency = 4 })
    local s = m:stats()
    assert.are.equal(8 + 4 * 3, s.billed.responses)
    assert.are.equal(2, s.statuses["503"] + s.statuses["429"]) -- the retried attempts, not billed
    assert_ledger_matches(s.billed)
  end)

  it("a replayed once result records nothing: the provider was not called", function()
    for _ = 1, 3 do
      resil.step("replayed", function() return resil.once("same-key", paid_call, m.url, "once only") end)
    end
    assert.are.equal(1, m:stats().routes.chat)
    assert_ledger_matches(m:stats().billed)
  end)

  it("only an explicit id dedupes: the same response recorded twice is kept once", function()
    m:configure({ latency = 0.01, idempotency = true })
    local function idempotent_call()
      local res = assert(resil.http.request({ method = "POST", url = m.url .. "/v1/chat/completions",
        headers = { ["Idempotency-Key"] = "order-9" }, json = { model = "m", messages = {} } }))
      local body = resil.json.decode(res.body)
      assert(resil.cost.record({ provider = "mock", id = body.id, usd = (body.usage.prompt_tokens * PRICE.input
        + body.usage.completion_tokens * PRICE.output) / 1000 }))
      return body.id
    end
    -- the same call made twice (a crash between the record and once's commit does this):
    -- the provider replays its answer, unbilled, with the same id
    local first = resil.step("idempotent", idempotent_call)
    assert.are.equal(first, resil.step("idempotent again", idempotent_call))
    assert.are.equal(2, m:stats().routes.chat)
    assert.are.equal(1, m:stats().replayed)
    assert_ledger_matches(m:stats().billed)
    -- two costs without an id, identical in every field, are two costs
    resil.cost.record({ provider = "p", usd = 1 })
    resil.cost.record({ provider = "p", usd = 1 })
    assert.are.equal(2, resil.cost.breakdown("provider")[1].calls)
  end)

  it("wait = false: the caller goes on at once; the rows are written with the next commit, once per id, " ..
     "and counted once in the metrics", function()
    local function metric()
      return tonumber(resil.metrics.text():match('resil_cost_usd_total{model="m",provider="later"} (%S+)')) or 0
    end
    local before = metric()
    for _ = 1, 2 do assert(resil.cost.record({ provider = "later", model = "m", usd = 0.25, id = "same", wait = false })) end
    assert(resil.cost.record({ provider = "later", model = "m", usd = 0.5, wait = false }))
    local budget = resil.budget("later", { limit = 10 })
    local ticket = assert(budget:reserve(1))
    assert.is_true(ticket:settle(0.125, { provider = "later", model = "m", wait = false }))
    -- a read goes through the same queue: it sees every row before it
    assert.are.equal(0.875, resil.cost.total({ provider = "later" }))
    assert.are.equal(0.875, metric() - before)
    local st = assert(budget:state())
    assert.are.equal(0.125, st.spent)
    assert.are.equal(0, st.reserved)
  end)

  it("wait = false: the metrics count the call as it was recorded, not the caller's table as changed after",
    function()
      local function metric(provider)
        return tonumber(resil.metrics.text():match('resil_cost_usd_total{model="m",provider="' .. provider ..
          '"} (%S+)')) or 0
      end
      local before = metric("kept")
      local e = { provider = "kept", model = "m", usd = 0.25, units = { input_tokens = 10 }, wait = false }
      assert(resil.cost.record(e))
      -- the caller's table, reused for its next call before the row is committed
      e.provider, e.usd, e.units.input_tokens = "changed", 100, 1e6
      assert.are.equal(0.25, resil.cost.total({ provider = "kept" }))
      assert.are.equal(0.25, metric("kept") - before)
      assert.are.equal(0, metric("changed"))
      assert.matches('resil_tokens_total{model="m",provider="kept",type="input"} 10\n', resil.metrics.text(), 1, true)
    end)

  -- (a row's usual units are written without json.encode, which swaps each number for a marker: the
  -- text must be json.encode's all the same, byte for byte, key order included)
  it("writes a row's units as json.encode writes them, whatever their names and values", function()
    local cases = {
      { input_tokens = 3, output_tokens = 1, cached_input_tokens = 0, cache_write_tokens = 0 },
      { input_tokens = 1500, output_tokens = 20, service_tier = "default", input_unreported = true, estimated = false },
      { big = math.maxinteger, small = math.mininteger, edge = 100000000000000, less = -99999999999999 },
      { whole_float = 3.0, half = 0.5, third = 1 / 3, huge = 1e300 },
      { path = "a/b", quote = 'say "hi"', tab = "a\tb", accent = "café", empty = "" },
      { words = "a b:c,d{e}[f]~!", [""] = 0, nothing = "" },
      { del = "x\127", n = 1 },
      { long = ("x"):rep(2000) },
      { n = 1, long = ("y"):rep(1000) }, -- (just past the 1 KB flat_json writes)
      { service_tier = "on demand: {x}", n = -7, yes = true, no = false },
      { ["odd/key"] = 1, ["with space"] = 2, ["ok-key.v2"] = 3 },
      { 1, 2, 3 },
      { nested = { input_tokens = 1 } },
      {},
      setmetatable({}, resil.json.array_mt),
      setmetatable({ 1 }, resil.json.array_mt),
      { [1] = 5, name = "mixed" },
    }
    for i = 1, 40 do -- (many keys: the table's own order, as next walks it)
      cases[#cases + 1] = { ["k" .. i] = i, ["j" .. i * 7] = i % 2 == 0, ["w" .. i] = "v" .. i }
    end
    for i, units in ipairs(cases) do
      local want = resil.json.encode(units)
      assert(resil.cost.record({ provider = "units", model = "m" .. i, usd = 0, units = units, wait = i % 2 == 0 }))
      local rows = assert(helpers.backend(assert(resil.store())):cost_rows({ model = "m" .. i }))
      assert.are.equal(1, #rows)
      assert.are.equal(want, rows[1].units, "case " .. i)
    end
  end)

  -- (rows nobody waits for share one statement in C, a nil column not bound: each row's fields are
  -- its own, none left from the row before it in the batch)
  it("wait = false: rows committed together keep each its own fields, a field one row lacks empty in it",
    function()
    fresh_store()
    local rows = {
      { provider = "p", model = "full", operation = "chat", user = "u1", usd = 0.5, units = { input_tokens = 1 },
        run = "r1", step = "s1", item = "i1", id = "id-1" },
      { provider = "p", model = "bare" },
      { provider = "p", model = "some", user = "u3", usd = 0 },
      { model = "none" },
      { provider = "p", model = "full2", operation = "embed", user = "u5", usd = 1.25, units = { output_tokens = 2 },
        run = "r5", step = "s5", item = "i5" },
      { provider = "p", model = "bare2", usd = 0.1 },
      { provider = "p", model = "half", usd = 0.0000005 }, -- (half a micro-dollar rounds up)
      { provider = "p", model = "less", usd = 0.00000049 },
      { provider = "p", model = "most", usd = 1e9 },
    }
    for _, e in ipairs(rows) do
      e.wait = false
      assert(resil.cost.record(e))
    end
    local got = {}
    for _, r in ipairs(assert(helpers.backend(assert(resil.store())):cost_rows({}))) do got[r.model] = r end
    local function row(model)
      local r = assert(got[model], model)
      return { r.provider, r.operation, r.user, r.micro_usd, r.units, r.step, r.item }
    end
    assert.are.same({ "p", "chat", "u1", 500000, '{"input_tokens":1}', "s1", "i1" }, row("full"))
    assert.are.same({ "p" }, row("bare"))
    assert.are.same({ "p", nil, "u3", 0 }, row("some"))
    assert.are.same({}, row("none"))
    assert.are.same({ "p", "embed", "u5", 1250000, '{"output_tokens":2}', "s5", "i5" }, row("full2"))
    assert.are.same({ "p", nil, nil, 100000 }, row("bare2"))
    assert.are.equal("r1", got.full.run)
    assert.are.equal("r5", got.full2.run)
    assert.are.equal(got.bare.run, got.bare2.run) -- (the script's own run, as a row without one gets)
    -- (micro-dollars are the ledger's integers: a float there would be a REAL in the column)
    for model, micro in pairs({ half = 1, less = 0, most = 1000000000000000, full = 500000, bare2 = 100000 }) do
      assert.are.equal(micro, got[model].micro_usd, model)
      assert.are.equal("integer", math.type(got[model].micro_usd), model)
    end
  end)

  -- (the usual queued row is made in C, src/flat_json.c's row; a record with a metatable, or fields it
  -- does not take, is costs.lua's cost_row: the two must write the same row and count the same metrics)
  it("wait = false: a row made in C is the row costs.lua makes, column by column, in a step too; so are its metrics",
    function()
    fresh_store()
    local cases = {
      { provider = "p", usd = 0.000123, units = { input_tokens = 3, output_tokens = 1, cached_input_tokens = 0,
        cache_write_tokens = 0 }, operation = "chat" },
      { provider = "p", usd = 0, units = { prompt_tokens = 4, completion_tokens = 2 }, user = "u", id = "resp-1" },
      { provider = "p", usd = 7, units = { input_tokens = 1, estimated = true, service_tier = "flex" }, sync = false },
      { provider = "p", usd = 1e9, run = "r", step = "s", item = "i", period = "2026-12" },
      { provider = "p", usd = 0.0000005 },
      { provider = "p" },
      { provider = "p", units = { input_tokens = 2 ^ 40, output_tokens = -1 } },
      { provider = "p", usd = 2, units = { input_tokens = 1.5 } }, -- (json.encode's units: costs.lua's, both)
      { provider = "p", usd = 3, id = 42, user = 7, run = 9 }, -- (numbers: costs.lua's, both)
    }
    local function record_both(prefix)
      for i, c in ipairs(cases) do
        for _, how in ipairs({ "c", "lua" }) do
          local e = { model = ("%s%d-%s"):format(prefix, i, how), wait = false }
          for k, v in pairs(c) do e[k] = v end
          if e.id then e.id = e.id .. prefix .. how end
          if how == "lua" then setmetatable(e, {}) end
          assert(resil.cost.record(e))
        end
      end
    end
    record_both("plain")
    resil.step("in a step", function() record_both("step") end)
    resil.map({ "x" }, function() resil.step("item", function() record_both("item") end) end)
    local db = assert(resil.sqlite.open(resil.store().url, {}))
    local rows = {}
    assert(resil.cost.total()) -- (the queue written)
    db:tx(function(tx)
      for _, r in ipairs(tx:rows("SELECT * FROM costs")) do rows[r.model] = r end
    end)
    db:close()
    local metrics = resil.metrics.text()
    local n = 0
    for _, prefix in ipairs({ "plain", "step", "item" }) do
      for i, c in ipairs(cases) do
        local a, b = rows[("%s%d-c"):format(prefix, i)], rows[("%s%d-lua"):format(prefix, i)]
        assert(a and b, prefix .. i)
        for _, col in ipairs({ "at", "day", "provider", "operation", "user", "run", "step", "micro_usd", "units", "budget",
          "period", "ticket", "item" }) do
          assert.are.equal(b[col], a[col], ("%s%d %s"):format(prefix, i, col))
          assert.are.equal(math.type(b[col]), math.type(a[col]), ("%s%d %s"):format(prefix, i, col))
        end
        if c.id then
          assert.are.equal(tostring(c.id) .. prefix .. "c", a.dedupe)
        else
          assert.is_nil(a.dedupe)
        end
        local function lines(model)
          local out = {}
          for line in metrics:gmatch("[^\n]+") do
            if line:find('model="' .. model .. '"', 1, true) or line:find('gen_ai_request_model="' .. model .. '"', 1, true)
            then
              out[#out + 1] = (line:gsub((model:gsub("%p", "%%%0")), "M"))
            end
          end
          table.sort(out)
          return out
        end
        local la = lines(("%s%d-c"):format(prefix, i))
        assert.are.same(lines(("%s%d-lua"):format(prefix, i)), la)
        n = n + #la
      end
    end
    assert.is_true(n > 20, n)
    assert.are.equal("i", rows["plain4-c"].item)
    assert.truthy(rows["step1-c"].step)
    assert.truthy(rows["item1-c"].item)
  end)

  -- (rows nobody waits for are written in C, one statement each and no savepoint: one that fails must
  -- undo only itself, and the metrics count what was written, once per commit)
  it("wait = false: a row the ledger refuses (here a trigger's) is refused in the log; the rows " ..
     "committed with it are written and counted, their token counts by type", function()
    -- (a table as its run id was such a row; it is refused at the caller's line now, so the store refuses it)
    local db = assert(resil.sqlite.open(resil.store().url, {}))
    db:tx(function(tx)
      tx:exec("CREATE TRIGGER refuse_a_dollar BEFORE INSERT ON costs WHEN NEW.micro_usd = 1000000 " ..
        "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    end)
    db:close()
    local text
    local lines = helpers.logged(function()
      assert(resil.cost.record({ provider = "mixed", model = "m", usd = 0.25, id = "mixed-1",
        units = { prompt_tokens = 4, completion_tokens = 2 }, wait = false }))
      assert(resil.cost.record({ provider = "mixed", model = "m", usd = 1, wait = false }))
      assert(resil.cost.record({ provider = "mixed", model = "m", usd = 0.5, id = "mixed-1", wait = false }))
      assert(resil.cost.record({ provider = "mixed", model = "m", units = { input_tokens = 3 }, wait = false }))
      assert.are.equal(0.25, resil.cost.total({ provider = "mixed" }))
      assert.are.equal(2, resil.cost.breakdown("provider", { provider = "mixed" })[1].calls)
      text = resil.metrics.text()
    end)
    local refused = {}
    for _, l in ipairs(lines) do
      if l.msg == "the ledger refused a row; its cost is not in it" then refused[#refused + 1] = l end
    end
    assert.are.equal(1, #refused)
    assert.are.equal(1, refused[1].usd)
    assert.are.equal(0, resil.cost.unwritten())
    assert.matches('resil_cost_usd_total{model="m",provider="mixed"} 0.25\n', text, 1, true)
    assert.matches('resil_cost_unpriced_total{model="m",provider="mixed"} 1\n', text, 1, true)
    assert.matches('resil_tokens_total{model="m",provider="mixed",type="input"} 7\n', text, 1, true)
    assert.matches('resil_tokens_total{model="m",provider="mixed",type="output"} 2\n', text, 1, true)
    assert.matches('gen_ai_client_token_usage_count{gen_ai_provider_name="mixed",gen_ai_request_model="m",gen_ai_system="mixed",' ..
      'gen_ai_token_type="input"} 2\n', text, 1, true)
  end)

  -- (before: OpenTelemetry's required gen_ai.operation.name was on the attempt's span only, so a
  -- dashboard could not tell chat tokens and latency from embeddings')
  it("GenAI metrics say the conventions' operation: chat (streams too) and embeddings, a row's own name " ..
     "else, a provider's own (generate_content)", function()
    local call = require "policies.call"
    for op, n in pairs({ chat = 3, stream = 4, embed = 5, translate = 6, none = 7 }) do
      assert(resil.cost.record({ provider = "ops", model = "m", operation = op ~= "none" and op or nil,
        units = { input_tokens = n } }))
    end
    local embeddings = call.provider("ops-embed", { request = { method = "POST", url = m.url .. "/v1/embeddings" } })
    assert(embeddings({ json = { model = "e-1", input = "hi" } }))
    local chat = call.provider("ops-chat", { request = { method = "POST", url = m.url .. "/v1/chat/completions" } })
    assert(chat({ json = { model = "c-1", messages = { { role = "user", content = "hi" } } } }))
    local made = call.provider("ops-made", { operation = "generate_content",
      request = { method = "POST", url = m.url .. "/v1/chat/completions" } })
    assert(made({ json = { model = "g-1", messages = { { role = "user", content = "hi" } } } }))
    assert.has_error(function() call.provider("ops-bad", { operation = 7 }) end,
      "call.provider 'ops-bad': operation must be a name (OpenTelemetry's gen_ai.operation.name: chat, " ..
      "embeddings, generate_content, ...), got number")
    local text = resil.metrics.text()
    local usage = 'gen_ai_client_token_usage_sum{%sgen_ai_provider_name="ops",gen_ai_request_model="m",' ..
      'gen_ai_system="ops",gen_ai_token_type="input"} %d\n'
    assert.matches(usage:format('gen_ai_operation_name="chat",', 7), text, 1, true)
    assert.matches(usage:format('gen_ai_operation_name="embeddings",', 5), text, 1, true)
    assert.matches(usage:format('gen_ai_operation_name="translate",', 6), text, 1, true)
    assert.matches(usage:format("", 7), text, 1, true)
    assert.matches('gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="embeddings",' ..
      'gen_ai_provider_name="ops-embed",gen_ai_request_model="e-1",gen_ai_system="ops-embed"} 1\n', text, 1, true)
    assert.matches('gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",' ..
      'gen_ai_provider_name="ops-chat",gen_ai_request_model="c-1",gen_ai_system="ops-chat"} 1\n', text, 1, true)
    assert.matches('gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="generate_content",' ..
      'gen_ai_provider_name="ops-made",gen_ai_request_model="g-1",gen_ai_system="ops-made"} 1\n', text, 1, true)
  end)

  -- (a row's series are counted in one call of src/metrics.c, each bound at its first use: a series
  -- no row needed is never shown, and what is not a count from 0 up counts nowhere)
  it("counts a row's USD and token fields in the series its fields name, and only those", function()
    local rows = {
      { usd = 0.5, units = { input_tokens = 3 } },
      { usd = 0.25, units = { prompt_tokens = 4, completion_tokens = 2 }, wait = false },
      { units = { output_tokens = 5 }, operation = "embed" },
      { usd = 0, units = { input_tokens = -1, output_tokens = -0.5, prompt_tokens = "7", completion_tokens = 1.5 } },
      { usd = 1, units = { input_tokens = 2 }, operation = "embed", wait = false },
    }
    for _, r in ipairs(rows) do
      r.provider, r.model = "rowmetrics", "m"
      assert(resil.cost.record(r))
    end
    assert.are.equal(1.75, resil.cost.total({ provider = "rowmetrics" })) -- (the queued rows committed)
    assert.is_true(helpers.wait_until(function() return resil.cost.unwritten() == 0 end, 5))
    local lines = {}
    for line in resil.metrics.text():gmatch("[^\n]+") do
      if line:find('"rowmetrics"', 1, true) and not line:find("_bucket", 1, true) then lines[#lines + 1] = line end
    end
    table.sort(lines)
    assert.are.same({
      'gen_ai_client_token_usage_count{gen_ai_operation_name="embeddings",gen_ai_provider_name="rowmetrics",' ..
        'gen_ai_request_model="m",gen_ai_system="rowmetrics",gen_ai_token_type="input"} 1',
      'gen_ai_client_token_usage_count{gen_ai_operation_name="embeddings",gen_ai_provider_name="rowmetrics",' ..
        'gen_ai_request_model="m",gen_ai_system="rowmetrics",gen_ai_token_type="output"} 1',
      'gen_ai_client_token_usage_count{gen_ai_provider_name="rowmetrics",gen_ai_request_model="m",' ..
        'gen_ai_system="rowmetrics",gen_ai_token_type="input"} 2',
      'gen_ai_client_token_usage_count{gen_ai_provider_name="rowmetrics",gen_ai_request_model="m",' ..
        'gen_ai_system="rowmetrics",gen_ai_token_type="output"} 2',
      'gen_ai_client_token_usage_sum{gen_ai_operation_name="embeddings",gen_ai_provider_name="rowmetrics",' ..
        'gen_ai_request_model="m",gen_ai_system="rowmetrics",gen_ai_token_type="input"} 2',
      'gen_ai_client_token_usage_sum{gen_ai_operation_name="embeddings",gen_ai_provider_name="rowmetrics",' ..
        'gen_ai_request_model="m",gen_ai_system="rowmetrics",gen_ai_token_type="output"} 5',
      'gen_ai_client_token_usage_sum{gen_ai_provider_name="rowmetrics",gen_ai_request_model="m",' ..
        'gen_ai_system="rowmetrics",gen_ai_token_type="input"} 7',
      'gen_ai_client_token_usage_sum{gen_ai_provider_name="rowmetrics",gen_ai_request_model="m",' ..
        'gen_ai_system="rowmetrics",gen_ai_token_type="output"} 3.5',
      'resil_cost_unpriced_total{model="m",provider="rowmetrics"} 1',
      'resil_cost_usd_total{model="m",provider="rowmetrics"} 1.75',
      'resil_tokens_total{model="m",provider="rowmetrics",type="input"} 9',
      'resil_tokens_total{model="m",provider="rowmetrics",type="output"} 8.5',
    }, lines)
  end)

  -- a row nobody waits for failed only in the next group commit ("cannot bind a table"): the cost
  -- was lost with "the ledger refused a row", the caller told true
  it("refuses a provider, model or operation that is not text, and units JSON cannot hold, at the caller's line",
    function()
      local before = resil.cost.total()
      for _, bad in ipairs({ { provider = {} }, { model = 5 }, { operation = true }, { units = "3 tokens" },
                             { units = { input_tokens = function() end } } }) do
        for _, wait in ipairs({ true, false }) do
          local e = { provider = "p", model = "m", usd = 0.5, wait = wait }
          for k, v in pairs(bad) do e[k] = v end
          local ok, err = pcall(function() local r = resil.cost.record(e); return r end)
          assert.is_false(ok)
          assert.matches("cost_spec%.lua:%d+: resil%.cost%.record: %a+ must be", err)
        end
      end
      assert.are.equal(before, resil.cost.total())
    end)

  -- (before: total{usr = "u42"} ignored the typo and summed every user's cost; since = "2026-01-01" summed
  -- nothing on SQLite; a list or a bad `by` raised "[resil store_sqlite]:736: ..." from inside the host)
  it("a filter or a breakdown the ledger cannot apply raises at the caller's line, rather than a wrong sum", function()
    fresh_store()
    assert(resil.cost.record({ provider = "p", model = "m", user = "u42", usd = 0.5 }))
    assert(resil.cost.record({ provider = "p", model = "m", user = "u7", usd = 0.25 }))
    local calls = {
      { function() local v = resil.cost.total({ usr = "u42" }); return v end, "unknown filter 'usr'" },
      { function() local v = resil.cost.total({ since = "2026-01-01" }); return v end, "since must be a time in epoch seconds" },
      { function() local v = resil.cost.total({ ["until"] = 0 / 0 }); return v end, "until must be a time in epoch seconds" },
      { function() local v = resil.cost.total({ provider = { "p" } }); return v end, "filter provider must be a string" },
      { function() local v = resil.cost.total("u42"); return v end, "the filter must be a table" },
      { function() local v = resil.cost.breakdown("models"); return v end, "cannot break down by 'models'" },
      { function() local v = resil.cost.breakdown("model", { modle = "m" }); return v end, "unknown filter 'modle'" },
    }
    for _, c in ipairs(calls) do
      local ok, err = pcall(c[1])
      assert.is_false(ok, c[2])
      assert.matches("cost_spec%.lua:" .. debug.getinfo(c[1], "S").linedefined .. ": resil%.cost%.%a+: " .. c[2]:gsub("%p", "%%%0"), err)
    end
    assert.are.equal(0.5, resil.cost.total({ user = "u42" }))
    assert.are.equal(0.75, resil.cost.total({ since = resil.clock.wall() - 60 }))
    assert.are.equal("m", resil.cost.breakdown("model", { provider = "p" })[1].key)
  end)

  -- (before: "[resil costs]:414: attempt to index a nil value (local 'e')" and "[resil budgets]:499: bad
  -- argument #1 to 'for iterator' (table expected, got string)", from inside the host)
  it("a record or a settle's fields that are not a table raise at the caller's line; nothing is written",
    function()
    local before = resil.cost.total()
    for _, bad in ipairs({ false, "p", 5 }) do
      local ok, err = pcall(function() local r = resil.cost.record(bad); return r end)
      assert.is_false(ok)
      assert.matches("cost_spec%.lua:%d+: resil%.cost%.record: expects a table", err)
    end
    local ok, err = pcall(function() local r = resil.cost.record(); return r end)
    assert.matches("cost_spec%.lua:%d+: resil%.cost%.record: expects a table", err)
    local b = resil.budget("cost-fields", { limit = 10 })
    local t = assert(b:reserve(1))
    ok, err = pcall(function() local r = t:settle(0.5, "openai"); return r end)
    assert.is_false(ok)
    assert.matches("cost_spec%.lua:%d+: ticket:settle: cost fields must be a table or nil", err)
    assert.are.equal(before, resil.cost.total())
    assert.are.equal(1, b:state().reserved)
    assert.is_true(t:settle(0.5, { provider = "p" }))
  end)

  it("a ticket's settle is kept once, inside a step too", function()
    local b = resil.budget("cost-spec", { limit = 10 })
    resil.step("settled", function()
      for _ = 1, 3 do
        local t = assert(b:reserve(1))
        assert.is_true(t:settle(0.5, { provider = "p" }))
        assert.is_false(t:settle(0.5, { provider = "p" }))
      end
      return true
    end)
    assert.are.equal(1.5, resil.cost.total({ budget = "cost-spec" }))
    assert.are.equal(1.5, b:state().spent)
  end)
end)

describe("resil.cost across real processes", function()
  local mock_pid, url

  -- (a gateway's first answers while its store could not be opened yet: Redis down, the SQLite
  -- file busy; their rows were dropped with "ai: the cost was not recorded")
  it("wait = false before the store can be opened: the row is tried again and written once it can", function()
    local blocker = helpers.write(helpers.tmpname(".file"), "") -- a file where the store's folder would be
    finally(function() os.execute("rm -rf " .. blocker) end)
    local r = helpers.run_script(([[
      local resil = require "resil"
      resil.store_config({ url = %q })
      resil.spawn(function() resil.sleep(0.3); os.remove(%q) end)
      print(resil.cost.record({ provider = "early", model = "m", usd = 0.25, wait = false }))
    ]]):format(blocker .. "/state.db", blocker), "--log-level off")
    assert.are.equal("true\n", r.stdout, r.stderr)
    local total = helpers.run_script('print(require("resil").cost.total({ provider = "early" }))',
      "--store " .. blocker .. "/state.db")
    assert.are.equal("0.25\n", total.stdout, total.stderr)
  end)

  -- the mock in a process of its own, so it counts across runs and kills
  local function start_mock(scenario)
    local file = helpers.write(helpers.tmpname(".lua"), scenario)
    local out, pidfile = helpers.tmpname(".out"), helpers.tmpname(".pid")
    os.execute(("%s mock %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, file, out, pidfile))
    mock_pid = helpers.slurp(pidfile):match("%d+")
    assert(helpers.wait_until(function() return helpers.slurp(out):match("http://") end, 10))
    url = helpers.slurp(out):match("(http://%S+)")
  end

  local function billed()
    local res = assert(resil.http.request({ url = url .. "/__mock/stats" }))
    return resil.json.decode(res.body)
  end

  before_each(function() resil.clock.real() end)
  after_each(function()
    if mock_pid then os.execute("kill " .. mock_pid) end
    mock_pid = nil
  end)

  it("a step re-run after a failure pays again, and the ledger records it again", function()
    start_mock("return {}")
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    local marker = helpers.tmpname(".marker")
    local script = helpers.write(helpers.tmpname(".lua"), [[
local resil = require "resil"
local url, marker = arg[1], arg[2]
resil.step("pay", function()
  local res = assert(resil.http.request({ method = "POST", url = url .. "/v1/chat/completions",
    json = { model = "m", messages = { { role = "user", content = "paid twice" } } } }))
  local u = resil.json.decode(res.body).usage
  assert(resil.cost.record({ provider = "mock", usd = (u.prompt_tokens * 0.0005 + u.completion_tokens * 0.0015) / 1000 }))
  if not io.open(marker) then io.open(marker, "w"):close(); error("failed after paying") end
  return true
end)
print("done")
]])
    local cmd = ("%s --store %s --run repaid --log-level off %s %s %s"):format(helpers.resil, db, script, url, marker)
    assert.are.equal(1, helpers.run(cmd).code)
    local second = helpers.run(cmd)
    assert.are.equal("done\n", second.stdout, second.stderr)
    local s = billed()
    assert.are.equal(2, s.billed.responses)
    assert_ledger_matches(s.billed)
  end)

  it("kill -9 at random points: each real call is recorded once, replayed once-results are not", function()
    start_mock("return { idempotency = true, latency = { min = 0.01, max = 0.03 } }")
    local seed = tonumber(os.getenv("COST_SEED") or "") or os.time()
    print(("# cost kill spec: COST_SEED=%d"):format(seed))
    math.randomseed(seed)
    local db = helpers.tmpname(".db")
    resil.store_config({ url = db })
    local source = [[
local resil = require "resil"
local call = require "policies.call"
local url = arg[1]
io.stdout:write("started\n"); io.stdout:flush()
local chat = call.provider("cost-kill", { request = { method = "POST", url = url .. "/v1/chat/completions" },
  timeout = 5, validate = "chat", idempotency = true, retry = { base = 0.01 } })
-- three images per topic, each under its own once key, inside one step per topic
for topic = 1, 6 do
  resil.step("topic " .. topic, function()
    for image = 1, 3 do
      resil.once(("%s/%d/%d"):format(resil.run.id(), topic, image), function()
        local res = assert(chat({ json = { model = "m", messages = { { role = "user", content = "t" .. topic .. image } } } }))
        local body = resil.json.decode(res.body)
        -- the provider's response id: a replayed answer (same Idempotency-Key) is not a second cost
        assert(resil.cost.record({ provider = "mock", id = body.id,
          usd = (body.usage.prompt_tokens * 0.0005 + body.usage.completion_tokens * 0.0015) / 1000 }))
        return body.id
      end)
    end
    return true
  end)
end
print("finished")
]]
    local kills = 0
    for trial = 1, 3 do
      local finished = false
      for launch = 1, 40 do
        local pid, out = helpers.start(source, ("--store %s --run cost-%d --log-level off"):format(db, trial), url)
        -- (the last launches run to the end: the kills are the first 30)
        local delay = launch <= 30 and 0.02 + math.random() * 0.25 or nil
        if helpers.kill_after_start(pid, out, delay) then kills = kills + 1 end
        local output = helpers.slurp(out)
        if output:match("finished") then finished = true break end
        if output:match("resil%-lua:") then error("the run failed on its own: " .. output) end
      end
      assert.is_true(finished, "trial " .. trial .. " did not finish in 40 launches")
    end
    assert.is_true(kills >= 3, "the test must actually kill runs")
    local s = billed()
    local keys = 0
    for key, paid in pairs(s.paid_keys) do
      keys = keys + 1
      assert.are.equal(1, paid, "key " .. key .. " was paid " .. paid .. " times")
    end
    assert.are.equal(3 * 6 * 3, keys)
    assert_ledger_matches(s.billed)
  end)
end)

describe("the ledger's schema", function()
  it("a store from before migration 8 keeps its rows and ids, and its keys still dedupe", function()
    local path = helpers.tmpname(".db")
    -- a version-7 store: made current in a process of its own, then its ledger put back as version 7 had it
    local r = helpers.run_script(([[
local resil = require "resil"
assert(resil.store())
local db = assert(resil.sqlite.open(%q, {}))
db:tx(function(tx)
  tx:exec("DROP TABLE costs")
  tx:exec("CREATE TABLE costs (id INTEGER PRIMARY KEY, dedupe TEXT UNIQUE, at REAL NOT NULL, day TEXT NOT NULL, " ..
    "provider TEXT, model TEXT, operation TEXT, user TEXT, run TEXT, step TEXT, micro_usd INTEGER, units TEXT, " ..
    "budget TEXT, period TEXT, ticket TEXT UNIQUE, item TEXT)")
  tx:exec("CREATE INDEX costs_budget ON costs(budget, period)")
  tx:exec("CREATE INDEX costs_day ON costs(day)")
  tx:exec("INSERT INTO costs (id, dedupe, at, day, provider, micro_usd) VALUES (7, 'openai:r1', 1, '2026-01-01', " ..
    "'openai', 1500)")
  tx:exec("INSERT INTO costs (id, at, day, provider, micro_usd, ticket, budget, period) VALUES (9, 2, " ..
    "'2026-01-01', 'anthropic', 2500, 't-1', 'team', 'all')")
  tx:exec("PRAGMA user_version = 7")
end)
db:close()
]]):format(path), "--store " .. path)
    assert.are.equal(0, r.code, r.stderr)
    r = helpers.run_script([[
local resil = require "resil"
-- the provider's id again: the same charge, kept once; a new one is a row of its own
assert(resil.cost.record({ provider = "openai", id = "openai:r1", usd = 0.0015 }))
assert(resil.cost.record({ provider = "openai", id = "openai:r2", usd = 0.001 }))
assert(resil.cost.record({ provider = "openai", usd = 0.001 }))
assert(resil.cost.record({ provider = "openai", usd = 0.001 }))
for _, g in ipairs(resil.cost.breakdown("provider")) do print(g.key, g.calls, ("%.6f"):format(g.usd)) end
local db = assert(resil.sqlite.open(resil.store().url, {}))
print(db:tx(function(tx) return tx:value("PRAGMA user_version") end),
  db:tx(function(tx) return tx:value("SELECT group_concat(id) FROM (SELECT id FROM costs WHERE id < 10 ORDER BY id)") end))
-- the budget's spend as its reservations read it: the rows it had, summed once (migration 10)
local b = resil.budget("team", { limit = 1 })
print(b:state().spent)
]], "--store " .. path)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("openai\t4\t0.004500\nanthropic\t1\t0.002500\n11\t7,9\n0.0025\n", r.stdout) -- (11: the newest schema)
  end)

  -- (provider, model and operation met as strings before are remembered: a lookup instead of a
  -- type() call a row; a value of another type after them is refused all the same)
  it("refuses a provider, model or operation that is not a string, at the caller's line; a user is kept as text",
    function()
    fresh_store()
    for _, wait in ipairs({ true, false }) do
      assert(resil.cost.record({ provider = "p", model = "m", operation = "chat", user = 42, usd = 0.5, wait = wait }))
      for _, field in ipairs({ "provider", "model", "operation" }) do
        local e = { provider = "p", model = "m", operation = "chat", usd = 0.5, wait = wait }
        e[field] = { "p" }
        local ok, err = pcall(function() local r = resil.cost.record(e); return r end)
        assert.is_false(ok)
        assert.matches("cost_spec.lua:%d+: resil.cost.record: " .. field .. " must be a string or nil, not a table", err)
      end
    end
    resil.sleep(0.05) -- (the row nobody waits for: the next group commit)
    local users = assert(resil.cost.breakdown("user"))
    assert.are.equal(1, #users)
    assert.are.same({ "42", 2, 1 }, { users[1].key, users[1].calls, users[1].usd })
  end)

  -- (before: a table as a row's run, step, item, budget or period failed its insert: raised from inside the
  -- store, or, for a row nobody waits for, lost at the next commit with "the ledger refused a row")
  it("refuses a run, step, item, budget or period that is not a string, at the caller's line", function()
    fresh_store()
    for _, wait in ipairs({ true, false }) do
      for _, field in ipairs({ "run", "step", "item", "budget", "period" }) do
        local e = { provider = "p", usd = 0.5, wait = wait }
        e[field] = { "x" }
        local ok, err = pcall(function() local r = resil.cost.record(e); return r end)
        assert.is_false(ok)
        assert.matches("cost_spec.lua:%d+: resil.cost.record: " .. field .. " must be a string or nil, not a table", err)
      end
    end
  end)

  -- (before: the migration ran in the first task that opened the store, and the watchdog stopped
  -- it: a gateway (5 s) on a ledger of 5 million rows answered each request 503 after 6 s, its
  -- migration rolled back, and never opened its store)
  it("a migration that runs longer than --max-task-seconds on a large ledger is not stopped", function()
    local path = helpers.tmpname(".db")
    local r = helpers.run_script(([[
local resil = require "resil"
assert(resil.store())
local db = assert(resil.sqlite.open(%q, {}))
db:tx(function(tx) -- a version-9 ledger of 600,000 rows of a budget's
  for _, t in ipairs({ "insert", "update", "delete" }) do tx:exec("DROP TRIGGER costs_spent_" .. t) end
  tx:exec("DROP TABLE budget_spent")
  tx:exec("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600000) " ..
    "INSERT INTO costs (at, day, provider, micro_usd, budget, period) " ..
    "SELECT i, '2026-01-01', 'openai', 1, 'key' || (i %% 500), 'p' || (i %% 300) FROM n")
  tx:exec("PRAGMA user_version = 9")
end)
]]):format(path), "--store " .. path)
    assert.are.equal(0, r.code, r.stderr)
    r = helpers.run_script([[
local resil = require "resil"
local db = assert(resil.sqlite.open(resil.store().url, {}))
print(db:tx(function(tx) return tx:value("PRAGMA user_version") end),
  db:tx(function(tx) return tx:value("SELECT sum(micro_usd) FROM budget_spent") end))
]], "--max-task-seconds 0.1 --store " .. path)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("11\t600000\n", r.stdout)
  end)
end)

-- (before: `--since DATE` went through local time and back, off by the zone's DST hour: in
-- Berlin or New York in summer, --since 2027-07-01 counted what was spent 23:00-24:00 UTC of June 30)
describe("resil-lua costs --since DATE", function()
  it("counts from that day's midnight UTC, the ledger's days, in any local time zone", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local function at(utc) resil.sleep(utc - resil.store_now()) end
at(1814398200) -- 2027-06-30 23:30 UTC
assert(resil.cost.record({ provider = "p", model = "m", usd = 1 }))
at(1814401800) -- 2027-07-01 00:30 UTC
assert(resil.cost.record({ provider = "p", model = "m", usd = 2 }))
]], "--virtual-clock --log-level off --store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    for _, tz in ipairs({ "UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Pacific/Chatham" }) do
      r = helpers.run(("TZ=%s %s costs --since 2027-07-01 --store %s"):format(tz, helpers.resil, db))
      assert.are.equal("total $2.000000\n", r.stdout, tz .. " " .. r.stderr)
      r = helpers.run(("TZ=%s %s costs --since 2027-06-30 --by day --store %s"):format(tz, helpers.resil, db))
      assert.matches("2027%-06%-30%s+1%s+%$1%.000000", r.stdout, nil, tz)
      assert.matches("TOTAL%s+%$3%.000000", r.stdout, nil, tz)
    end
  end)
end)

-- (before: a model an upstream named "=HYPERLINK(...)" was a formula in the spreadsheet that
-- opened the ledger's CSV: the model is what the provider's answer said)
describe("resil-lua costs --csv", function()
  it("writes a text a spreadsheet would run as a formula as text", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
assert(resil.cost.record({ provider = "p", model = '=HYPERLINK("http://x.example/?"&A1,"open")', usd = 1 }))
assert(resil.cost.record({ provider = "p", model = "@SUM(1+1)", usd = 2 }))
assert(resil.cost.record({ provider = "p", model = "-1", usd = 3 }))
]], "--log-level off --store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    r = helpers.run(("%s costs --csv --store %s"):format(helpers.resil, db))
    assert.matches(',"\'=HYPERLINK(""http://x.example/?""&A1,""open"")",', r.stdout, 1, true)
    assert.matches(",'@SUM(1+1),", r.stdout, 1, true)
    assert.matches(",-1,", r.stdout, 1, true) -- (a number stays one)
    r = helpers.run(("%s costs --by model --csv --store %s"):format(helpers.resil, db))
    assert.matches("\n'@SUM(1+1),1,2.000000,0\n", r.stdout, 1, true)
  end)
end)

-- (before: "total $0.000000" for a ledger of calls it could not price, as if they cost nothing)
describe("resil-lua costs", function()
  it("counts the calls without a price beside the total, never as $0", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
assert(resil.cost.record({ provider = "p", model = "m", usd = 0.1 }))
assert(resil.cost.record({ provider = "p", model = "m", usd = 0.2 }))
assert(resil.cost.record({ provider = "q", model = "unknown" }))
assert(resil.cost.record({ provider = "q", model = "unknown" }))
]], "--log-level off --store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    r = helpers.run(("%s costs --store %s"):format(helpers.resil, db))
    assert.are.equal("total $0.300000 (+2 unpriced calls)\n", r.stdout)
    local j = resil.json.decode(helpers.run(("%s costs --json --store %s"):format(helpers.resil, db)).stdout)
    assert.are.equal(0.3, j.usd) -- (to the micro-dollar: 0.1 + 0.2 is not 0.30000000000000004 here)
    assert.are.equal(2, j.unpriced)
  end)
end)

-- (before: a call with a budget wrapped its give_up to hold each paid refusal's retry, and the
-- wrapper, never nil, took the place of the provider's own retry.give_up: a budgeted call no longer
-- asked it, and retried, paid, to its max_retries after it said to stop)
describe("ai.chat with a budget", function()
  it("asks the provider's retry.give_up, as a call without one does", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run_script([[
local resil = require "resil"
local ai = require "policies.ai"
local sent = 0
local m = assert(resil.mock.start({ routes = { ["POST /v1/chat/completions"] = function()
  sent = sent + 1
  return { status = 500, headers = { ["content-type"] = "application/json" }, body = '{"error":{"message":"down"}}' }
end } }))
resil.budget("give-up-spec", { limit = 10 })
ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456",
  retry = { max_retries = 3, base = 0.01, cap = 0.01, give_up = function() return "stopping" end } })
for _, budget in ipairs({ false, "give-up-spec" }) do
  sent = 0
  local _, err = ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 5, messages = { { role = "user", content = "hi" } },
    budget = budget or nil })
  print(budget, sent, err.gave_up)
end
m:stop()
]], "--log-level off --store " .. db)
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("false\t0\tstopping\ngive-up-spec\t0\tstopping\n", r.stdout)
  end)
end)
