-- resil.http.stream closed (by `<close>`, or collected) while another task waits to read it: the
-- reader wakes, and nothing of the stream's request, recycled for another, is touched after.
local resil = require "resil"

describe("a stream closed while another task waits to read it", function()
  local server, url
  before_each(function()
    resil.clock.real()
    -- one event, then silence: a reader waits for the next one
    server = assert(resil.server.listen({ tasks = true, handler = function()
      return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
        write("data: 1\n\n")
        resil.sleep(3600)
      end }
    end }))
    url = ("http://127.0.0.1:%d/"):format(server:port())
  end)
  after_each(function() server:close() end)

  -- a reader task over a stream its owner closes with <close> once it stops waiting for it -> the reader
  local function reader_of_closed_stream(read)
    local reader
    do
      local s <close> = assert(resil.http.stream({ url = url }))
      reader = resil.spawn(function()
        while true do
          local ev, err = read(s)
          if not ev then return "ended", err end
        end
      end)
      local joined, why = reader:join(0.2)
      assert.is_nil(joined)
      assert.matches("did not finish in time", why)
    end
    return reader
  end

  for what, read in pairs({ ["read_event()"] = function(s) return s:read_event() end,
    ["read()"] = function(s) return s:read() end }) do
    -- (before: the reader was never woken, and the host never exited)
    it("wakes its reader by " .. what .. ", which is told the stream is closed", function()
      local reader = reader_of_closed_stream(read)
      local ok, err = reader:join(5)
      assert.is_false(ok)
      assert.matches("the stream is closed", tostring(err), 1, true)
    end)
  end

  -- (before: the reader's cancel cleared the waiter of the request that had been given the stream's
  -- recycled struct: that request never ended, its own timeout passed unseen)
  it("leaves a request that reuses its struct alone when the reader is canceled", function()
    local reader = reader_of_closed_stream(function(s) return s:read_event() end)
    local other = resil.spawn(function() return resil.http.request({ url = url .. "other", timeout = 0.5 }) end)
    resil.sleep(0.05)
    reader:cancel()
    local ok, res, err = other:join(10)
    assert.is_true(ok, tostring(res))
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
  end)
end)
