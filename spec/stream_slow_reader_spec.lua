-- A stream whose reader is slower than its upstream: the transfer pauses at its high-water mark
-- (HTTP/1.1: TCP pushes back), and a pause is the reader's doing, not the upstream's silence.
-- On the virtual clock: the reader's waits take no real time, and the idle timer is the host's.
local resil = require "resil"
local ai = require "policies.ai"
local helpers = require "spec.helpers"

describe("a stream read more slowly than it arrives", function()
  local server
  before_each(function() resil.clock.virtual() end)
  after_each(function() if server then server:close() end; server = nil end)

  -- an upstream that writes `n` events of `size` bytes as fast as it can, then `last`
  local function upstream(n, event, last)
    server = assert(resil.server.listen({ tasks = true, handler = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
        for i = 1, n do write(event(i)) end
        write(last)
      end }
    end }))
    return ("http://127.0.0.1:%d"):format(server:port())
  end

  -- (before: "no data for 1 s (idle_timeout)" once the reader had slept past it with a megabyte
  -- buffered: the upstream, which was sending, was blamed and the stream cut)
  it("is not cut as idle while paused for its reader", function()
    local url = upstream(3000, function() return "data: " .. ("x"):rep(1000) .. "\n\n" end, "data: end\n\n")
    local s = assert(resil.http.stream({ url = url, idle_timeout = 1 }))
    assert(s:read_event())
    resil.sleep(30) -- the reader is busy elsewhere; the transfer pauses past 1 MiB
    local n, last = 1, nil
    while true do
      local ev, err = s:read_event()
      assert.is_nil(err)
      if not ev then break end
      n, last = n + 1, ev.data
    end
    assert.are.same({ 3001, "end" }, { n, last })
  end)

  it("is still cut as idle when its upstream goes silent after the reader caught up", function()
    server = assert(resil.server.listen({ tasks = true, handler = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
        for _ = 1, 3000 do write("data: " .. ("x"):rep(1000) .. "\n\n") end
        resil.sleep(3600)
      end }
    end }))
    local s = assert(resil.http.stream({ url = ("http://127.0.0.1:%d"):format(server:port()), idle_timeout = 1 }))
    assert(s:read_event())
    resil.sleep(30)
    local n = 1
    while true do
      local ev, err = s:read_event()
      if not ev then
        assert.are.equal("timeout", err.kind)
        assert.matches("idle_timeout", err.message)
        break
      end
      n = n + 1
    end
    assert.are.equal(3000, n)
  end)

  it("ai.stream: a pipeline slow between its deltas gets the whole answer, not stream_interrupted", function()
    resil.log.level("error")
    finally(function() resil.log.level("info") end)
    resil.store_config({ url = helpers.tmpname(".db") })
    local delta = function(i)
      return ('data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,' ..
        '"delta":{"content":"w%d "},"finish_reason":null}]}\n\n'):format(i)
    end
    local url = upstream(20000, delta, 'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini",' ..
      '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    ai.configure("openai", { base_url = url .. "/v1", api_key = "sk-spec-slow-0123456789", idle_timeout = 60 })
    local s = ai.stream({ model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi" } } })
    local n = 0
    for _ in s do
      n = n + 1
      if n == 1 then resil.sleep(120) end -- (a slow step of the pipeline's own)
    end
    assert.are.equal(20000, n)
    assert.are.equal("stop", assert(s:result()).finish_reason)
  end)
end)
