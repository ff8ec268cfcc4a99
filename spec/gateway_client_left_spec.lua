-- A gateway client that leaves just as the provider answers: the provider
-- billed once it answered 200 (a stream: its input, and what it generated;
-- an answer: all of it), so the ledger has one row, never none and never
-- two, and the key's budget keeps no hold. The window is reproduced without
-- timing: the mock's on_request hook cancels the client's own task as the
-- gateway's request reaches the provider, so the client's FIN reaches the
-- gateway before (or in the same loop turn as) the provider's 200, and the
-- handler is canceled while it waits for that status, or with it read and
-- not yet resumed to.
local resil = require "resil"
local helpers = require "spec.helpers"
local json = resil.json

local fresh_gateway = helpers.fresh_gateway
local CLAUDE = "anthropic/claude-sonnet-4-5-20250929"
local MINI = "openai/gpt-4o-mini"

-- the client task the mock cancels as the gateway's request arrives (one per spec)
local leaving

local function start(scenario, store_url)
  resil.clock.real()
  resil.log.level("off")
  resil.store_config({ url = store_url or helpers.tmpname(".db") })
  scenario.on_request = function()
    local t = leaving
    leaving = nil
    if t then t:cancel() end
  end
  local m = assert(resil.mock.start(scenario))
  local gateway, ai = fresh_gateway()
  local keys = require "resil.keys"
  for k in pairs(gateway.config) do gateway.config[k] = nil end
  local fast = { base = 0.001, cap = 0.005 }
  ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = fast })
  ai.configure("anthropic", { base_url = m.url, api_key = "sk-ant-test-123456", retry = fast })
  gateway.configure({ models = {}, auth = true, key_cache = 0 })
  local key = assert(keys.add({ name = "left", budget = "100/day", tpm = 100000 }))
  local s = gateway.serve({ listen = "127.0.0.1:0" })
  finally(function()
    leaving = nil
    s:close()
    m:stop()
    resil.log.level("info")
  end)
  return ("http://127.0.0.1:%d"):format(s:port()), m, key
end

local function path_of(api) return api == "openai" and "/v1/chat/completions" or "/v1/messages" end

local function request(url, key, api, body, headers)
  body.max_tokens = body.max_tokens or 200
  body.messages = body.messages or { { role = "user", content = "hello there, how are you today?" } }
  local h = { authorization = "Bearer " .. key, ["content-type"] = "application/json",
    ["anthropic-version"] = "2023-06-01" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return { method = "POST", url = url .. path_of(api), timeout = 30, body = json.encode(body), headers = h }
end

-- a client that sends the request and is gone as the provider gets it
local function leave(req, stream)
  local t = resil.spawn(function()
    if stream then return resil.http.stream(req) end
    return resil.http.request(req)
  end)
  leaving = t
  return t
end

local function rows() return assert(helpers.backend(assert(resil.store())):cost_rows({})) end

local function held()
  local b = assert(resil.budget("key:left"):state())
  return #b.holds + b.reserved
end

-- the key's budget: no hold left, its spend the ledger's
local function settled()
  local b = assert(resil.budget("key:left"):state())
  assert.are.same({ 0, 0 }, { #b.holds, b.reserved })
  assert.is_true(math.abs(b.spent - resil.cost.total({})) <= 1e-6, b.spent .. " spent, " .. resil.cost.total({}))
end

-- the gateway is idle again: no hold, no call running (a row still on its way would land by then)
local function idle() return held() == 0 end

local CASES = { { "openai", MINI }, { "anthropic", MINI }, { "openai", CLAUDE }, { "anthropic", CLAUDE } }

for _, b in ipairs(helpers.store_backends()) do
  describe("gateway: a client that leaves as the provider answers a stream, on " .. b.name, function()
    teardown(function() if b.stop then b.stop() end end)
    -- (before: the handler was canceled in resil.http.stream's wait for the status, the provider's
    -- 200 on the wire or read but not resumed to: no row, though the provider billed the input;
    -- with 150 streams on one loop, half the client cancels fell there)
    for _, case in ipairs(CASES) do
      local api, model = case[1], case[2]
      it(("records its input once and keeps no hold (%s client, %s)"):format(api, model), function()
        local url, m, key = start({ strict = true, stream_interval = 0.05 }, b.url())
        local client = leave(request(url, key, api, { model = model, stream = true }), true)
        assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
        assert.is_true(helpers.wait_until(function() return #rows() >= 1 and idle() end, 10),
          "the stream the provider answered has no row")
        assert.are.equal(1, m:stats().total)
        local list = rows()
        assert.are.equal(1, #list)
        local u = json.decode(list[1].units)
        assert.is_true(u.input_tokens > 0 and list[1].micro_usd > 0, list[1].units)
        -- (OpenAI's stream tells its usage at its end: the input estimated from the prompt;
        -- Anthropic's message_start, read with the headers, told its count)
        if model == MINI then assert.is_true(u.estimated, list[1].units) end
        settled()
      end)
    end
  end)
end

describe("gateway: a client that leaves as the provider answers a stream", function()
  -- the provider's first delta comes with its headers: the stream opens in the turn the cancel
  -- waited for, and the handler would end before it waits again, its reply (the stream in it)
  -- dropped unread: recorded, its hold given back and the upstream closed only when collected
  it("the first delta in the same read as the 200: recorded once, the upstream closed, no hold", function()
    local function chunk(delta, finish)
      return "data: " .. json.encode({ id = "c1", object = "chat.completion.chunk", created = 1, model = "gpt-4o-mini",
        choices = { { index = 0, delta = delta, finish_reason = finish or json.null } } }) .. "\n\n"
    end
    local url, m, key = start({ strict = true, routes = { ["POST /v1/chat/completions"] = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, chunks = {
        chunk({ role = "assistant", content = "hello " }) .. chunk({ content = "world" }), chunk({}, "stop") },
        chunk_interval = 30 }
    end } })
    local client = leave(request(url, key, "openai", { model = MINI, stream = true }), true)
    assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
    collectgarbage("stop") -- (only the gateway may close the stream, not its collection)
    finally(function() collectgarbage("restart") end)
    assert.is_true(helpers.wait_until(function() return #rows() >= 1 and idle() end, 10),
      "the stream the provider answered has no row, or its hold was kept")
    assert.are.equal(1, m:stats().total)
    assert.are.equal(1, #rows())
    settled()
  end)

  -- the other points a client leaves at: one row each, whatever it read
  it("a client leaving at each point of a stream: one row per stream, the budget settled", function()
    local url, m, key = start({ strict = true, reply = ("word "):rep(20), stream_interval = 0.002 })
    local n = 0
    for _, case in ipairs(CASES) do
      local api, model = case[1], case[2]
      for _, after in ipairs({ 0, 1, 2, 5, 12, 1000 }) do
        local s = assert(resil.http.stream(request(url, key, api, { model = model, stream = true })))
        assert.are.equal(200, s.status)
        for _ = 1, after do if not s:read_event() then break end end
        s:close()
        n = n + 1
      end
    end
    assert.is_true(helpers.wait_until(function() return #rows() >= n and idle() end, 10))
    assert.are.equal(n, m:stats().total)
    assert.are.equal(n, #rows())
    settled()
  end)

  -- The load the window was found under: 150 streams on one loop, each client leaving at a time
  -- of its own. The mock answers each request as it arrives, so every request it saw was a 200
  -- the provider billed: one row each. (Before: a few of them had none, seed 1 three.) A guard:
  -- which cancels fall in the window is the loop's doing; the spec above is the reproduction.
  it("150 streams on one loop, their clients leaving at random: a row for every stream the provider answered",
    function()
    local url, m, key = start({ strict = true, reply = ("word "):rep(30), stream_interval = 0.003 })
    math.randomseed(1)
    local random = math.random
    local clients = {}
    for i = 1, 150 do
      local api, model = CASES[i % 4 + 1][1], CASES[i % 4 + 1][2]
      local req = request(url, key, api, { model = model, stream = true, max_tokens = 100 })
      local t = resil.spawn(function()
        local s = resil.http.stream(req)
        while s and s:read_event() do end
      end)
      clients[i] = t
      resil.spawn(function()
        resil.sleep(random() * 0.6)
        t:cancel()
      end)
    end
    for _, t in ipairs(clients) do t:join() end
    assert.is_true(helpers.wait_until(function() return idle() and #rows() >= m:stats().total end, 15))
    assert.is_true(m:stats().total > 0)
    assert.are.equal(m:stats().total, #rows())
    settled()
  end)

  -- the provider answers 200 and then sends nothing: the cancel is done at the first read, not
  -- after the stream's idle timeout (60 s); nothing waits on the loop
  it("an upstream frozen after its headers: recorded at once, the upstream cut", function()
    local url, m, key = start({ strict = true, faults = { { route = "messages", kind = "stall", after = 1 } } })
    local client = leave(request(url, key, "anthropic", { model = CLAUDE, stream = true }), true)
    local since = resil.now()
    assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
    assert.is_true(helpers.wait_until(function() return #rows() >= 1 and idle() end, 10))
    assert.is_true(resil.now() - since < 30, "the gateway waited for the frozen stream's idle timeout")
    assert.are.equal(1, #rows())
    assert.are.equal(1, m:stats().total)
    settled()
  end)

  -- the provider refuses it (a 429, a 529): not billed, so no row; and not tried again for nobody
  it("an error status in the window: no row, no retry, no hold", function()
    local url, m, key = start({ strict = true, faults = { { route = "messages", status = 529 } } })
    local client = leave(request(url, key, "anthropic", { model = CLAUDE, stream = true }), true)
    assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
    assert.is_true(helpers.wait_until(function() return m:stats().total >= 1 and idle() end, 10))
    resil.sleep(0.3) -- (a retry would come within the retry's backoff, 5 ms at most here)
    assert.are.equal(1, m:stats().total)
    assert.are.equal(0, #rows())
    settled()
  end)

  -- the provider never answers: the cancel waits for its status a bounded while, then the
  -- attempt ends as never answered (no row: it is not known to be billed), the hold given back
  it("an upstream that never answers: the cancel's wait for the status is bounded, no row, no hold", function()
    local url, m, key = start({ strict = true, faults = { { route = "chat", kind = "hang" } } })
    local client = leave(request(url, key, "openai", { model = MINI, stream = true }), true)
    assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
    assert.is_true(helpers.wait_until(function() return m:stats().total == 1 and idle() end, 10),
      "the hold of a stream whose client left was kept")
    assert.are.equal(0, #rows())
    settled()
    -- the loop was never held: the same key is served meanwhile and after
    m:configure({ strict = true })
    local r = assert(resil.http.request(request(url, key, "openai", { model = MINI })))
    assert.are.equal(200, r.status)
    assert.is_true(helpers.wait_until(function() return #rows() == 1 end, 10))
  end)
end)

describe("gateway: a client that leaves as the provider answers a call not streamed", function()
  for _, case in ipairs(CASES) do
    local api, model = case[1], case[2]
    it(("records the whole answer once, as the provider reported it (%s client, %s)"):format(api, model), function()
      local url, m, key = start({ strict = true, latency = 0.05 })
      local client = leave(request(url, key, api, { model = model }), false)
      assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
      assert.is_true(helpers.wait_until(function() return #rows() >= 1 and idle() end, 10))
      assert.are.equal(1, m:stats().total)
      local list = rows()
      assert.are.equal(1, #list)
      local u = json.decode(list[1].units)
      assert.is_falsy(u.estimated, list[1].units)
      assert.is_true(u.output_tokens > 0, list[1].units)
      settled()
    end)
  end

  -- resil_gateway_requests_total counted the answer nobody got as a 200 (the call run to its end
  -- under resil.shield), and a request under an Idempotency-Key whose client left not at all
  it("is counted in resil_gateway_requests_total as 499, with an Idempotency-Key or without", function()
    local url, m, key = start({ strict = true, latency = 0.2 })
    local function count(status)
      local body = assert(resil.http.request({ url = url .. "/metrics" })).body
      return tonumber(body:match('resil_gateway_requests_total{route="/v1/chat/completions",status="' .. status ..
        '"} (%d+)')) or 0
    end
    -- (the counters are the process's: the specs before this one counted theirs)
    local ok0, left0 = count(200), count(499)
    for i, headers in ipairs({ {}, { ["idempotency-key"] = "left-counted" } }) do
      local client = leave(request(url, key, "openai", { model = MINI }, headers), false)
      assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
      assert.is_true(helpers.wait_until(function() return #rows() >= i and idle() end, 10))
      assert.is_true(helpers.wait_until(function() return count(499) == left0 + i end, 10),
        "499 counted " .. count(499) - left0)
    end
    assert.are.equal(ok0, count(200))
    assert(resil.http.request(request(url, key, "openai", { model = MINI })))
    assert.is_true(helpers.wait_until(function() return count(200) == ok0 + 1 end, 10))
    assert.are.equal(left0 + 2, count(499))
    assert.are.equal(3, m:stats().total)
  end)

  -- the first client leaves, its twin with the same Idempotency-Key gets the answer the first
  -- one paid for: one provider call, one row
  it("the same Idempotency-Key sent again after its first client left: one call, one row", function()
    local url, m, key = start({ strict = true, latency = 0.2 })
    local req = request(url, key, "openai", { model = MINI }, { ["idempotency-key"] = "left-twice" })
    local client = leave(req, false)
    assert.is_true(helpers.wait_until(function() return client:status() == "canceled" end, 10))
    local r = assert(resil.http.request(req))
    assert.are.equal(200, r.status)
    assert.is_true(helpers.wait_until(function() return #rows() >= 1 and idle() end, 10))
    assert.are.equal(1, m:stats().total)
    assert.are.equal(1, #rows())
    settled()
  end)
end)
