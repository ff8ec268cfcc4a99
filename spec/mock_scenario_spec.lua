-- A mock scenario's mistakes are said at the caller's line, naming the
-- entry: a misspelt fault kind or a status given as a string was served as
-- a normal 200, so a spec of an outage passed without one.
local resil = require "resil"
local http = resil.http

local function raised(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok)
  return tostring(err)
end

describe("resil.mock scenarios", function()
  it("refuses a misspelt fault kind in a sequence, naming the entry", function()
    local err = raised(function() resil.mock.start({ sequence = { chat = { 503, "hnag", "ok" } } }) end)
    -- (was: accepted, and the second call answered 200)
    assert.matches("resil.mock: sequence.chat%[2%]: unknown fault kind 'hnag'", err)
  end)

  it("refuses a status that is not an HTTP status number", function()
    local err = raised(function() resil.mock.start({ faults = { { route = "chat", status = "503" } } }) end)
    assert.matches("resil.mock: status must be an HTTP status number %(100%-599%), not '503'", err)
    err = raised(function() resil.mock.start({ sequence = { chat = { { status = 1503 } } } }) end)
    assert.matches("sequence.chat%[1%]: status must be", err)
  end)

  it("says the caller's file:line, from start and from configure", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() resil.mock.start({ faults = { { kind = "hnag" } } }) end)
    -- (was "[resil mock]:NN:", a line of the mock's own code)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: unknown fault kind 'hnag'", err)
    local m = assert(resil.mock.start({}))
    line = debug.getinfo(1, "l").currentline + 1
    err = raised(function() m:configure({ sequence = { chat = { "hnag" } } }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: sequence.chat%[1%]", err)
    m:stop()
  end)

  -- (each was accepted and did nothing: a spec of an outage, its `sequnce` or its route `chats`
  -- misspelt, was served normal 200s, and passed without the outage it was written for)
  it("refuses a misspelt name: a scenario key, a route, a fault's field, at the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() resil.mock.start({ sequnce = { chat = { 503 } } }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: unknown scenario key 'sequnce'", err)
    assert.matches("sequence", err:match("%((.*)%)")) -- (the keys it takes)
    err = raised(function() resil.mock.start({ sequence = { chats = { 503 } } }) end)
    assert.matches("resil%.mock: sequence%.chats: unknown route 'chats' %(routes: chat, ", err)
    err = raised(function() resil.mock.start({ faults = { { route = "chatt", status = 429 } } }) end)
    assert.matches("resil%.mock: faults%[1%]: unknown route 'chatt'", err)
    err = raised(function() resil.mock.start({ faults = { { route = "chat", probabilty = 1, status = 429 } } }) end)
    assert.matches("resil%.mock: faults%[1%]: unknown field 'probabilty'", err)
    err = raised(function() resil.mock.start({ sequence = { chat = { { status = 429, retry_afterr = 2 } } } }) end)
    assert.matches("resil%.mock: sequence%.chat%[1%]: unknown field 'retry_afterr'", err)
    local m = assert(resil.mock.start({}))
    line = debug.getinfo(1, "l").currentline + 1
    err = raised(function() m:configure({ fault = { { status = 503 } } }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: unknown scenario key 'fault'", err)
    m:stop()
  end)

  -- (a seed that was no whole number failed inside the mock ("[resil mock]:52: attempt to mul a
  -- 'string'"), or at the first fault it drew; a latency of another shape was no latency, or each
  -- request's 500 "handler error")
  it("refuses a seed that is no whole number and a latency that is no number of seconds, at the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() resil.mock.start({ seed = "x" }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: seed must be a whole number, not 'x'", err)
    assert.matches("seed must be a whole number, not 1.5", raised(function() resil.mock.start({ seed = 1.5 }) end))
    for _, latency in ipairs({ "fast", -1, 0 / 0, { min = "a" }, { min = 2, max = 1 }, { mean = 1, stddev = -1 },
      { max = math.huge }, {} }) do
      err = raised(function() resil.mock.start({ latency = latency }) end)
      assert.matches("resil%.mock: latency must be seconds", err)
    end
    err = raised(function() resil.mock.start({ faults = { { route = "chat", latency = "x" } } }) end)
    assert.matches("resil%.mock: faults%[1%]: latency must be seconds", err)
    for _, latency in ipairs({ 0, 0.5, { min = 0.1, max = 0.2 }, { min = 0.1 }, { mean = 1, stddev = 0.5 } }) do
      assert(resil.mock.start({ seed = 7, latency = latency })):stop()
    end
  end)

  -- (before: an option misspelt, { prot = 8080 }, was ignored, and opts that were no table failed
  -- inside the mock, "[resil mock]:256: attempt to index a number value (local 'opts')")
  it("refuses start options it does not take, or that are no table, at the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() resil.mock.start({}, { prot = 8080 }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock%.start: unknown option 'prot' %(it takes "
      .. "host, port, max_headers, max_body, read_timeout%)", err)
    assert.matches("resil%.mock%.start: options must be a table", raised(function() resil.mock.start({}, 5) end))
    local m = assert(resil.mock.start({}, { port = 0, max_body = 1024, read_timeout = 5 }))
    m:stop()
  end)

  -- (before: taken, and never matched: "/v1/audio/speech" without its method, "post /x" in lower case;
  -- a reply given as no function failed at the request, its 500 "handler error")
  it("refuses a custom route that is not \"METHOD /path\" = function, at the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() resil.mock.start({ routes = { ["/v1/audio/speech"] = function() end } }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: routes%['/v1/audio/speech'%]: a custom "
      .. "route is \"METHOD /path\"", err)
    assert.matches("routes%['post /x'%]: a custom route is", raised(function()
      resil.mock.start({ routes = { ["post /x"] = function() end } }) end))
    assert.matches("routes%['POST /x'%]: its handler must be a function, not number", raised(function()
      resil.mock.start({ routes = { ["POST /x"] = 5 } }) end))
  end)

  -- (before: ignored: a spec of a stuck job whose `stuk` was misspelt got jobs that succeeded)
  it("refuses a jobs key, or a route of jobs.errors, it does not know", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local err = raised(function() resil.mock.start({ jobs = { pols = 2 } }) end)
    assert.matches("^spec/mock_scenario_spec%.lua:" .. line .. ": resil%.mock: jobs: unknown key 'pols' %(jobs takes polls, ",
      err)
    assert.matches("resil%.mock: jobs%.errors%.predictons: unknown route 'predictons' %(routes: predictions, ",
      raised(function() resil.mock.start({ jobs = { errors = { predictons = { 429 } } } }) end))
    assert.matches("resil%.mock: jobs must be a table", raised(function() resil.mock.start({ jobs = 2 }) end))
    -- (before: a fate misspelt, "faild", made a job that succeeded)
    assert.matches("resil%.mock: jobs%.fates%[2%]: unknown fate 'faild' %(fates: succeeded, failed, stuck, aborted, lost%)",
      raised(function() resil.mock.start({ jobs = { fates = { "stuck", { "faild", polls = 0 } } } }) end))
    assert(resil.mock.start({ jobs = { fates = { "succeeded", "failed", { "stuck" }, "aborted", "lost" } } })):stop()
    assert(resil.mock.start({ jobs = { polls = 1, duration = 2, fail = 0.1, stuck = 0.1, output = "x", usd = 0.01,
      predict_time = 1, error = "why", fates = { "stuck" }, cancel_takes = 1, errors = { tts = { 429 } } } })):stop()
  end)

  it("takes every route it serves by name, a custom route by its pattern, and '*' in a sequence", function()
    for _, route in ipairs({ "chat", "messages", "count_tokens", "embeddings", "models", "model", "predictions",
      "prediction", "prediction_list", "cancel", "fal_submit", "fal_status", "fal_result", "fal_cancel", "tts" }) do
      local m = assert(resil.mock.start({ sequence = { [route] = { 503 } }, faults = { { route = route, status = 429 } } }))
      m:stop()
    end
    local m = assert(resil.mock.start({ routes = { ["POST /v1/audio/speech"] = function() return { status = 200 } end },
      sequence = { ["POST /v1/audio/speech"] = { 503 }, ["*"] = { 502 } } }))
    local res = assert(http.request({ method = "POST", url = m.url .. "/v1/audio/speech", body = "{}" }))
    assert.are.equal(503, res.status)
    m:stop()
  end)

  it("on_request is told of each request before it is answered; one that is no function is refused", function()
    assert.matches("on_request must be a function", raised(function() resil.mock.start({ on_request = true }) end))
    local seen = {}
    local m = assert(resil.mock.start({ strict = true, on_request = function(req) seen[#seen + 1] = req.path end }))
    local res = assert(http.request({ method = "POST", url = m.url .. "/v1/chat/completions",
      headers = { authorization = "Bearer sk-test-123456" }, json = {
      model = "gpt-4o-mini", messages = { { role = "user", content = "hi" } } } }))
    assert.are.equal(200, res.status, res.body)
    assert.are.same({ "/v1/chat/completions" }, seen)
    m:stop()
  end)

  it("answers an x-mock-fault it does not know with a 400 naming it, in the route's API shape", function()
    local m = assert(resil.mock.start({}))
    local res = assert(http.request({ method = "POST", url = m.url .. "/v1/messages", json = { messages = {} },
      headers = { ["x-mock-fault"] = "hnag" } }))
    assert.are.equal(400, res.status) -- (was: 200, a normal answer)
    local body = resil.json.decode(res.body)
    assert.are.equal("error", body.type)
    assert.matches("x%-mock%-fault: 'hnag' is neither a status", body.error.message)
    res = assert(http.request({ method = "POST", url = m.url .. "/v1/chat/completions", json = { messages = {} },
      headers = { ["x-mock-fault"] = "503" } }))
    assert.are.equal(503, res.status)
    m:stop()
  end)
end)
