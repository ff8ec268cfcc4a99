-- resil.http.stream's cancel_grace: a cancel that comes once the request was
-- sent waits (bounded) for the status, so that its caller learns whether the
-- server answered (a provider bills a stream it answered 200). Both sides of
-- the header's wake: still waiting, and woken with the headers read but not
-- yet resumed to. A loopback server in this process; no sleeps decide.
local resil = require "resil"
local helpers = require "spec.helpers"

-- a server whose requests are answered (200, the headers of a stream that then sends nothing) only once `open` is
-- called, all in the order of their paths given: -> url, open(paths...), stats
local function held_server()
  local waiting, st = {}, { asked = 0 }
  local server = assert(resil.server.listen({ port = 0, tasks = true, handler = function(req)
    st.asked = st.asked + 1
    local gate = resil.spawn(resil.sleep, 30)
    waiting[req.path] = gate
    gate:join() -- until open() ends it
    return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function()
      resil.sleep(3600) -- (the headers only)
    end }
  end }))
  finally(function() server:close() end)
  local url = ("http://127.0.0.1:%d"):format(server:port())
  -- the handlers' tasks woken in this order: their replies go out in it, in one loop turn
  local function open(...) for _, path in ipairs({ ... }) do waiting[path]:cancel() end end
  return url, open, st
end

local function stream(url, path, grace)
  return resil.http.stream({ url = url .. path, timeout = 30, cancel_grace = grace })
end

describe("resil.http.stream cancel_grace", function()
  before_each(function() resil.clock.real() end)

  it("a cancel while the status is on its way: the task gets its stream, canceled at its next wait", function()
    local url, open, st = held_server()
    local got = {}
    local reader = resil.spawn(function()
      local s = stream(url, "/a", 5)
      got.status = s.status -- (before any further wait: the cancel is done at the next one)
      got.pending = resil.running():cancel_pending() -- (its caller can tell nobody waits for it)
      got.event = s:read_event()
      got.after = true
    end)
    assert.is_true(helpers.wait_until(function() return st.asked == 1 end, 5))
    reader:cancel()
    assert.are.equal("waiting", reader:status()) -- (the request was sent: its status is waited for)
    open("/a")
    assert.is_true(helpers.wait_until(function() return reader:status() ~= "waiting" end, 5))
    assert.are.equal("canceled", reader:status())
    assert.are.equal(200, got.status)
    assert.is_true(got.pending)
    assert.is_nil(got.after)
  end)

  -- (before the change to loop.c: a task woken with its headers and canceled before it resumed
  -- never saw them)
  it("a cancel once the headers were read, before the task resumed: it gets its stream", function()
    local url, open, st = held_server()
    local got, seen = {}, {}
    local reader
    -- b's headers come first, in the same loop turn as a's: b resumes first and cancels a,
    -- woken with its headers and not yet resumed to
    local canceler = resil.spawn(function()
      local s = stream(url, "/b")
      seen.reader = reader:status()
      reader:cancel()
      s:close()
    end)
    reader = resil.spawn(function()
      local s = stream(url, "/a", 5)
      got.status = s.status
      got.event = s:read_event()
      got.after = true
    end)
    assert.is_true(helpers.wait_until(function() return st.asked == 2 end, 5))
    open("/b", "/a")
    assert.is_true(helpers.wait_until(function() return reader:status() ~= "waiting" and reader:status() ~= "ready" end, 5))
    assert.is_true(canceler:join())
    assert.are.equal("ready", seen.reader) -- (the case this spec is for: woken, not resumed)
    assert.are.equal("canceled", reader:status())
    assert.are.equal(200, got.status)
    assert.is_nil(got.after)
  end)

  it("a server that never answers: the cancel's wait ends at the grace, not at the request's timeout", function()
    local url, _, st = held_server()
    local got = {}
    local reader = resil.spawn(function()
      local s, err = stream(url, "/a", 0.2)
      got.s, got.err = s, err
    end)
    assert.is_true(helpers.wait_until(function() return st.asked == 1 end, 5))
    reader:cancel()
    assert.is_true(helpers.wait_until(function() return reader:status() == "canceled" end, 5),
      "the cancel waited past its grace")
    assert.is_nil(got.s)
  end)

  it("without cancel_grace, or before the request was sent, a cancel is done at once", function()
    local url, _, st = held_server()
    local reader = resil.spawn(function() stream(url, "/a") end)
    assert.is_true(helpers.wait_until(function() return st.asked == 1 end, 5))
    reader:cancel()
    assert.are.equal("canceled", reader:status())
    -- not sent: nothing listens there, the connect is refused or pending
    reader = resil.spawn(function() stream("http://10.255.255.1:9", "/a", 5) end)
    resil.sleep(0)
    reader:cancel()
    assert.are.equal("canceled", reader:status())
  end)

  -- (request_sent reads the handle's counters only once curl began this request: a reused
  -- handle's are its last request's before that, with some libcurl versions)
  it("a cancel before curl began the request, on a handle reused from one it sent: done at once", function()
    local url, open, st = held_server()
    local first = resil.spawn(function() return stream(url, "/first") end)
    assert.is_true(helpers.wait_until(function() return st.asked == 1 end, 5))
    open("/first")
    local ok, s = first:join()
    assert(ok and s)
    s:close()
    s = nil
    collectgarbage() -- (its request back in the pool, its handle reused next)
    local reader = resil.spawn(function() stream(url, "/a", 5) end)
    local canceler = resil.spawn(function() reader:cancel() end) -- (in this turn, before curl runs)
    assert.is_true(canceler:join())
    assert.are.equal("canceled", reader:status())
    resil.sleep(0.2)
    assert.are.equal(1, st.asked) -- (never sent)
  end)

  -- (found in review, helper R: the grace's bound stayed on the transfer once the status came, and
  -- a task the stream was handed to, not canceled, had its read cut as canceled at the grace)
  it("once the status came within the grace, the transfer keeps its own timeout: a task it is handed to reads on",
    function()
      local gate
      local server = assert(resil.server.listen({ port = 0, tasks = true, handler = function()
        gate = resil.spawn(resil.sleep, 30)
        gate:join()
        return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
          resil.sleep(0.6) -- (past the grace below)
          write("data: late\n\n")
          resil.sleep(3600)
        end }
      end }))
      finally(function() server:close() end)
      local got = {}
      local reader = resil.spawn(function()
        local s = resil.http.stream({ url = ("http://127.0.0.1:%d/a"):format(server:port()), timeout = 30,
          cancel_grace = 0.2 })
        got.status = s.status
        -- (no wait before the hand-over: this task's cancel is done at its next one)
        got.handed = resil.spawn(function()
          got.event, got.err = s:read_event()
          s:close()
        end)
        resil.sleep(60)
      end)
      assert.is_true(helpers.wait_until(function() return gate ~= nil end, 5))
      reader:cancel()
      gate:cancel() -- the status goes out within the grace
      assert.is_true(helpers.wait_until(function() return got.handed ~= nil end, 5))
      assert.is_true(got.handed:join(5))
      assert.are.equal("canceled", reader:status())
      assert.are.equal(200, got.status)
      assert.is_nil(got.err and tostring(got.err.kind or got.err))
      assert.are.equal("late", got.event and got.event.data)
    end)

  it("cancel_grace that is not a number raises at the caller's line", function()
    local ok, err = pcall(resil.http.stream, { url = "http://127.0.0.1:9/", cancel_grace = "soon" })
    assert.is_false(ok)
    assert.matches("cancel_grace", tostring(err))
  end)
end)
