-- A semaphore's permit is held by the task that took it: released once, by
-- that task (or the task it was handed over to), and given back when that
-- task ends. (Before: any code could release any permit of a semaphore it
-- could name; a second release let more than `size` callers in.)
local resil = require "resil"

local seq = 0
local function name(prefix)
  seq = seq + 1
  return ("semaphore-spec-%s-%d"):format(prefix, seq)
end

-- how many of n callers (tasks that each try for a permit and keep it) get in at once
-- -> that count, a function that lets them go
local function admitted(s, n)
  local got, stop = 0, false
  for _ = 1, n do
    resil.spawn(function()
      if not s:try() then return end
      got = got + 1
      while not stop do resil.sleep(1) end
      s:release()
    end)
  end
  resil.yield()
  return got, function() stop = true end
end

-- a task that takes a permit and waits until told to go (-> the task, its "go" function)
local function holder(s)
  local go = false
  local t = resil.spawn(function()
    assert(s:acquire())
    while not go do resil.sleep(1) end
    s:release()
  end)
  resil.yield()
  return t, function() go = true end
end

describe("a semaphore's permit", function()
  before_each(function() resil.clock.virtual() end)
  after_each(function() resil.clock.real() end)

  it("released twice by the task that took it: the second release raises, and lets nobody more in", function()
    local s = resil.semaphore(name("twice"), { size = 2 })
    local _, go = holder(s)
    local double = resil.spawn(function()
      assert(s:acquire())
      s:release()
      s:release() -- the bug under test: a second release
    end)
    local ok, err = double:join()
    -- one holder still runs: one more caller gets in, not two (a third and fourth at once before)
    local got, let_go = admitted(s, 2)
    assert.are.equal(1, got)
    assert.are.equal(2, s:state().in_use)
    go(); let_go()
    assert.is_false(ok)
    assert.matches("semaphore_spec.lua:%d+: semaphore 'semaphore%-spec%-twice%-%d+': release by task %d+, " ..
      "which holds none of its permits", tostring(err))
  end)

  it("released by a task that never took one: raises; the holders keep theirs", function()
    local s = resil.semaphore(name("foreign"), { size = 2 })
    local _, go1 = holder(s)
    local _, go2 = holder(s)
    local stranger = resil.spawn(function() s:release(); s:release() end)
    local ok, err = stranger:join()
    local got, let_go = admitted(s, 2)
    assert.are.equal(0, got, "a stranger's release freed a holder's permit")
    let_go()
    assert.are.same({ 2, 0 }, { s:state().in_use, s:state().waiting })
    assert.is_false(ok)
    assert.matches("which holds none of its permits", tostring(err))
    go1(); go2()
    resil.sleep(2)
    assert.are.equal(0, s:state().in_use) -- (never below zero, nor a holder's own release refused)
  end)

  it("released by the main task, which holds none: raises at the script's line", function()
    local s = resil.semaphore(name("main"), { size = 1 })
    local ok, err = pcall(s.release, s)
    assert.is_false(ok)
    assert.matches("^[^:]*semaphore_spec.lua:%d+: semaphore '.-': release by task", err)
    assert.are.equal(0, s:state().in_use)
  end)

  it("is given back once when its task returns, fails or is canceled holding it", function()
    local s = resil.semaphore(name("ends"), { size = 1 })
    local returns = resil.spawn(function() return s:acquire() end)
    assert.is_true(select(2, returns:join()))
    assert.are.equal(0, s:state().in_use)
    local fails = resil.spawn(function() assert(s:acquire()); error("boom") end)
    assert.is_false((fails:join()))
    assert.are.equal(0, s:state().in_use)
    local canceled = resil.spawn(function() assert(s:acquire()); resil.sleep(60) end)
    resil.yield()
    assert.are.equal(1, s:state().in_use)
    local waiter = resil.spawn(function() return s:acquire({ timeout = 5 }) end)
    resil.yield()
    assert.are.equal(1, s:state().waiting)
    canceled:cancel()
    -- the waiter was granted the permit the canceled task gave back, and ended holding it
    assert.is_true(select(2, waiter:join()))
    assert.are.same({ 0, 0 }, { s:state().in_use, s:state().waiting })
    -- a task that released its own, then ended: nothing given back twice
    local tidy = resil.spawn(function() assert(s:acquire()); s:release() end)
    assert.is_true((tidy:join()))
    assert.are.equal(0, s:state().in_use)
    assert.is_true(s:try()); s:release()
  end)

  it("given back by a <close> handler as its task is canceled, is not given back again at its end", function()
    local s = resil.semaphore(name("close"), { size = 2 })
    local t = resil.spawn(function()
      assert(s:acquire())
      local _ <close> = setmetatable({}, { __close = function() s:release() end })
      resil.sleep(60)
    end)
    resil.yield()
    local _, go = holder(s)
    t:cancel()
    assert.are.equal(1, s:state().in_use)
    go()
    resil.sleep(2)
    assert.are.equal(0, s:state().in_use)
  end)

  it("a waiter canceled in the queue takes nothing", function()
    local s = resil.semaphore(name("queued"), { size = 1 })
    local _, go = holder(s)
    local w = resil.spawn(function() return s:acquire({ timeout = 30 }) end)
    resil.yield()
    assert.are.equal(1, s:state().waiting)
    w:cancel()
    assert.are.same({ 1, 0 }, { s:state().in_use, s:state().waiting })
    go()
    resil.sleep(2)
    assert.are.equal(0, s:state().in_use)
    local got, let_go = admitted(s, 2)
    assert.are.equal(1, got)
    let_go()
  end)

  it("handed over to another task: held until that task releases it or ends, not the giver's any more", function()
    local s = resil.semaphore(name("hand"), { size = 1 })
    local go = false
    local worker
    local giver = resil.spawn(function()
      assert(s:acquire())
      worker = resil.spawn(function()
        while not go do resil.sleep(1) end
        s:release()
      end)
      assert.is_true(s:hand_over(worker))
      return pcall(s.release, s) -- no longer the giver's to release
    end)
    local _, ok, err = giver:join()
    assert.is_false(ok)
    assert.matches("which holds none of its permits", err)
    -- the giver ended: the permit stayed with the worker
    assert.are.equal(1, s:state().in_use)
    assert.is_false(s:try())
    go = true
    assert.is_true((worker:join()))
    assert.are.equal(0, s:state().in_use)

    -- handed to a task that ends without releasing: given back at its end
    local quiet = resil.spawn(function() resil.sleep(1) end)
    assert(s:acquire())
    assert.is_true(s:hand_over(quiet))
    assert.is_false(s:try())
    quiet:join()
    assert.are.equal(0, s:state().in_use)

    -- handed to a task that has ended: given back at once
    assert(s:acquire())
    assert.is_false(s:hand_over(quiet))
    assert.are.equal(0, s:state().in_use)
    assert.has_error(function() s:hand_over(quiet) end)
  end)

  it("several permits of one task are released one each, the count never below zero", function()
    local s = resil.semaphore(name("several"), { size = 3 })
    assert.is_true(s:try()); assert.is_true(s:try())
    s:release(); s:release()
    assert.has_error(function() s:release() end)
    assert.are.equal(0, s:state().in_use)
    local got, let_go = admitted(s, 4)
    assert.are.equal(3, got)
    let_go()
  end)
end)

describe("resil.semaphore timeout at creation", function()
  it("refuses a negative or NaN timeout where it is made", function()
    local ok, err = pcall(resil.semaphore, "neg-timeout-sem", { size = 2, timeout = -1 })
    assert.is_false(ok)
    assert.matches("semaphore_spec.lua:%d+: semaphore 'neg%-timeout%-sem': timeout must be a non%-negative number", err)
    assert.is_false((pcall(resil.semaphore, "nan-timeout-sem", { size = 2, timeout = 0 / 0 })))
    assert.truthy(resil.semaphore("ok-timeout-sem", { size = 2, queue = 1, timeout = 3, name = "ok-timeout-sem" }))
  end)
end)

-- (before: sem:acquire(30) ignored its options, no table, and waited with no timeout at all)
describe("resil.semaphore's acquire", function()
  it("refuses options that are no table, or a timeout that is no number, at the caller's line, waiting for nothing",
    function()
    local sem = resil.semaphore("acquire-opts-sem", { size = 1 })
    assert.is_true(sem:acquire())
    for _, c in ipairs({
      { function() local ok = sem:acquire(30); return ok end, "acquire's options must be a table {timeout=}, got number" },
      { function() local ok = sem:acquire({ timeout = "soon" }); return ok end, "timeout must be a non%-negative number" },
    }) do
      local t = resil.spawn(pcall, c[1])
      local done, ok, err = t:join(1) -- (it waited for good)
      t:cancel()
      assert.is_true(done, "still waiting")
      assert.is_false(ok)
      assert.matches("semaphore_spec%.lua:" .. debug.getinfo(c[1], "S").linedefined .. ": semaphore 'acquire%-opts%-sem': " .. c[2], err)
    end
    assert.is_nil((sem:acquire({ timeout = 0 })))
    sem:release()
  end)
end)

describe("a semaphore's permit outside any task", function()
  local http = resil.http

  -- (a server without tasks runs its handler outside any task: what it takes is the host's)
  it("taken by a handler without a task, is released by one", function()
    local s = resil.semaphore(name("handler"), { size = 1 })
    local server = assert(resil.server.listen({ port = 0, handler = function(req)
      if req.path == "/take" then return { status = 200, body = tostring(s:try()) } end
      local ok, err = pcall(s.release, s)
      return { status = 200, body = ok and "released" or err }
    end }))
    local url = ("http://127.0.0.1:%d"):format(server:port())
    assert.are.equal("true", http.request({ url = url .. "/take" }).body)
    assert.are.equal("false", http.request({ url = url .. "/take" }).body)
    -- the main task holds none of them
    assert.has_error(function() s:release() end)
    assert.are.equal("released", http.request({ url = url .. "/release" }).body)
    assert.matches("release outside any task, where none of its permits is held",
      http.request({ url = url .. "/release" }).body)
    assert.are.equal(0, s:state().in_use)
    server:close()
  end)
  -- (an embedding program's resil_call that enters a bulkhead, and a later one that leaves it:
  -- each call is a task of its own, which gave the permit back as it ended)
  it("detached from its task, stays taken until a release names its token, once", function()
    local s = resil.semaphore(name("detach"), { size = 1 })
    local enter = resil.spawn(function() assert(s:try()); return s:detach() end)
    local _, token = enter:join()
    assert.is_string(token)
    assert.are.equal(1, s:state().in_use)
    assert.is_false((s:try()))
    -- a task that never took one gives the detached one back by its token, and only once
    local second
    local leave = resil.spawn(function()
      s:release(token)
      local ok, err = pcall(s.release, s, token)
      second = ok and "released" or tostring(err)
    end)
    leave:join()
    assert.matches("none of its detached permits", second)
    assert.are.equal(0, s:state().in_use)
    -- detach needs a permit of the caller's own
    assert.has_error(function() s:detach() end)
  end)

  it("a stray release (one too many, by a task that holds none) never takes a detached permit", function()
    local s = resil.semaphore(name("stray"), { size = 2 })
    local _, token = resil.spawn(function() assert(s:try()); return s:detach() end):join()
    local stray
    resil.spawn(function()
      assert(s:acquire())
      s:release()
      local ok, err = pcall(s.release, s) -- a double release
      stray = ok and "released" or tostring(err)
    end):join()
    -- (it took the detached permit: a third caller got in while the first still counted on its own)
    assert.matches("holds none of its permits", stray)
    assert.matches("released by the token detach returned", stray)
    assert.are.equal(1, s:state().in_use)
    -- nor does a release outside any task, nor another semaphore's token, nor a made-up one
    assert.has_error(function() s:release() end)
    local other = resil.semaphore(name("stray-other"), { size = 1 })
    local _, other_token = resil.spawn(function() assert(other:try()); return other:detach() end):join()
    assert.has_error(function() s:release(other_token) end, nil)
    assert.has_error(function() s:release(token .. "0") end)
    assert.has_error(function() s:release(1) end)
    assert.are.equal(1, s:state().in_use)
    s:release(token)
    other:release(other_token)
    assert.are.equal(0, s:state().in_use)
    assert.are.equal(0, other:state().in_use)
  end)
end)

describe("a semaphore's options", function()
  before_each(function() resil.clock.virtual() end)

  it("refused at creation keep no semaphore of that name; a reload refused on queue changes nothing", function()
    -- (before: resil.semaphore(n, {size = 0}) raised but kept a semaphore of size 0 by that name:
    -- every acquire of it after waited for a permit there never was)
    local n = name("bad")
    for _, o in ipairs({ { size = 0 }, { size = 1.5 }, { size = "x" }, { size = 0 / 0 }, { size = 2, queue = -2 } }) do
      local ok, err = pcall(resil.semaphore, n, o)
      assert.is_false(ok)
      assert.matches("semaphore_spec.lua:%d+: semaphore '" .. n:gsub("%-", "%%-") .. "': ", err)
    end
    local ok, err = pcall(resil.semaphore, n)
    assert.is_false(ok)
    assert.matches("does not exist yet", err)
    local s = resil.semaphore(n, { size = 1, queue = 0 })
    assert.is_false((pcall(resil.semaphore, n, { size = 5, queue = "x" })))
    assert.is_true((s:acquire()))
    local _, full = s:acquire({ timeout = 1 })
    assert.are.equal("bulkhead_full", full.kind)
    assert.are.equal(1, s:state().size)
  end)
end)

describe("resil.semaphore options", function()
  it("refuses an unknown option at the caller's line, naming the one it is close to", function()
    local ok, err = pcall(resil.semaphore, "typo-sem", { size = 2, qeue = 3 })
    assert.is_false(ok)
    assert.matches("semaphore_spec.lua:%d+: semaphore 'typo%-sem': unknown option 'qeue', did you mean 'queue'%?", err)
  end)
end)

describe("semaphore:refuse_waiting", function()
  it("answers every queued task bulkhead_full at once; the permits held and later acquires are as before", function()
    local s = resil.semaphore(name("refused"), { size = 1 })
    local _, go = holder(s)
    local got = {}
    for i = 1, 2 do
      resil.spawn(function() got[i] = { s:acquire({ timeout = 30 }) } end)
    end
    resil.spawn(function() got[3] = { s:acquire() } end) -- (no timeout at all)
    resil.yield()
    assert.are.equal(3, s:state().waiting)
    assert.are.equal(3, s:refuse_waiting())
    resil.yield()
    for i = 1, 3 do
      assert.is_nil(got[i][1])
      assert.are.equal("bulkhead_full", got[i][2].kind)
    end
    assert.are.same({ 1, 0 }, { s:state().in_use, s:state().waiting })
    assert.are.equal(0, s:refuse_waiting())
    go()
    resil.sleep(2)
    assert.are.equal(0, s:state().in_use)
    assert.is_true((s:acquire({ timeout = 1 })))
    s:release()
  end)
end)
