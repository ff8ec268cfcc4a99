-- A wait that was granted (a permit, tokens, a store reply) and then canceled
-- before its task resumed must give back what it was granted: under client
-- disconnects, a bulkhead would otherwise shrink to nothing.
local resil = require "resil"
local helpers = require "spec.helpers"

local seq = 0
local function name(prefix)
  seq = seq + 1
  return ("cancel-spec-%s-%d"):format(prefix, seq)
end

describe("a task canceled after its wait was granted", function()
  before_each(function() resil.clock.virtual() end)

  it("gives a semaphore's permit to the next waiter", function()
    local s = resil.semaphore(name("sem"), { size = 1 })
    assert.is_true(s:try())
    local waiter = resil.spawn(function() return s:acquire() end)
    resil.yield() -- the waiter queues
    s:release()   -- granted: the waiter is woken, not yet resumed
    assert.are.equal("ready", waiter:status())
    waiter:cancel()
    assert.are.equal(0, s:state().in_use)
    assert.is_true(s:try(), "the permit was lost with the canceled waiter")
    s:release()
  end)

  it("gives it back every time: 100 such cancels leave the bulkhead its full size", function()
    local s = resil.semaphore(name("sem"), { size = 2 })
    for _ = 1, 100 do
      assert.is_true(s:try()); assert.is_true(s:try())
      local w = resil.spawn(function() return s:acquire({ timeout = 5 }) end)
      resil.yield()
      s:release()
      w:cancel()
      s:release()
    end
    assert.are.same({ 0, 0 }, { s:state().in_use, s:state().waiting })
    assert.is_true(s:try()); assert.is_true(s:try())
  end)

  it("gives a bucket's served tokens back", function()
    local b = resil.bucket(name("bucket"), { rate = 1, per = 1, burst = 1 })
    assert.is_true((b:try()))
    local waiter = resil.spawn(function() return b:acquire(1, { timeout = 10 }) end)
    resil.yield() -- the waiter queues
    b:refund(1)   -- a token is back: the waiter is served and woken, not yet resumed
    assert.are.equal("ready", waiter:status())
    waiter:cancel()
    assert.is_true((b:try()), "the served token was lost with the canceled waiter")
  end)

  -- (the leak this spec would show is the operation itself: make check's
  -- LeakSanitizer reports it)
  it("frees a store operation's result and keeps the store usable", function()
    local path = helpers.tmpname(".db")
    local store = assert(resil.store(path))
    local t = resil.spawn(function() return store:set("k", "v") end)
    resil.yield() -- it submits its operation and waits
    assert.are.equal("waiting", t:status())
    -- let the flush run and wake it, then cancel it before it resumes
    while t:status() == "waiting" do resil.yield() end
    assert.are.equal("ready", t:status())
    t:cancel()
    assert.are.equal("v", store:get("k"))
    os.remove(path)
  end)

  it("runs <close> handlers at the cancel; cleanup that needs I/O goes in a task they start", function()
    local path = helpers.tmpname(".db")
    local store = assert(resil.store(path))
    assert.is_true(store:set("lock", "mine"))
    local errors, cleanup = {}, nil
    local t = resil.spawn(function()
      local _ <close> = setmetatable({}, { __close = function()
        -- waiting here (for a write's commit) raises (no task is running a __close at a cancel) ...
        local ok, err = pcall(store.set, store, "other", "x")
        errors[#errors + 1] = not ok and tostring(err) or nil
        -- ... a task started from here does the I/O
        cleanup = resil.spawn(store.del, store, "lock")
      end })
      resil.sleep(100)
    end)
    resil.yield()
    t:cancel()
    assert.matches("must be called from a task", errors[1])
    assert.is_true(cleanup:join()) -- the cleanup task ran, its delete committed
    assert.is_nil(store:get("lock"))
    os.remove(path)
  end)
end)

describe("a task canceled from inside its own <close> handler", function()
  it("is canceled once: the second cancel returns false and every handler runs", function()
    local closed, second = {}, nil
    local t
    t = resil.spawn(function()
      local _a <close> = setmetatable({}, { __close = function() closed[#closed + 1] = "a" end })
      local _b <close> = setmetatable({}, { __close = function()
        second = { pcall(t.cancel, t) }
        closed[#closed + 1] = "b"
      end })
      resil.sleep(10)
    end)
    resil.yield()
    assert.is_true(t:cancel())
    assert.are.same({ true, false }, second)
    assert.are.same({ "b", "a" }, closed)
    assert.are.equal("canceled", t:status())
  end)
end)

describe("a store operation canceled while queued", function()
  it("never runs: a reservation for a caller that gave up holds nothing", function()
    resil.clock.real()
    local path = helpers.tmpname(".db")
    resil.store_config({ url = path })
    local budget = resil.budget("canceled-reserve", { limit = 1 })
    assert(budget:state())
    -- another process holds the write lock: the reservation queues
    local holder, out = helpers.start(([[
      local resil = require "resil"
      local db = assert(resil.sqlite.open(%q))
      db:now(function(tx) io.stdout:write("holding\n"); io.stdout:flush(); os.execute("sleep 1") end)
    ]]):format(path))
    assert(helpers.wait_until(function() return helpers.slurp(out):match("holding") end, 10))
    local t = resil.spawn(function() return budget:reserve(0.9) end)
    resil.sleep(0.1)
    assert.are.equal("waiting", t:status())
    t:cancel()
    assert(helpers.wait_until(function() return not helpers.alive(holder) end, 10))
    local state = assert(budget:state())
    assert.are.equal(0, state.reserved)
    assert.is_truthy(budget:reserve(0.5), "the canceled reservation still holds the budget")
    resil.store_config({ url = false })
    os.remove(path)
  end)
end)

describe("resil.shield", function()
  before_each(function() resil.clock.virtual() end)

  it("holds a cancel off until its function ends: the function's waits and results are whole, then the task " ..
     "is canceled at its next wait, and its <close> handlers run", function()
    local steps, closed = {}, false
    local t = resil.spawn(function()
      local _ <close> = setmetatable({}, { __close = function() closed = true end })
      local a, b = resil.shield(function()
        resil.sleep(1)
        steps[#steps + 1] = "slept"
        resil.sleep(1)
        steps[#steps + 1] = "slept again"
        return "paid", 2
      end)
      steps[#steps + 1] = a .. b
      resil.sleep(1)
      steps[#steps + 1] = "not reached"
    end)
    resil.sleep(0.5)
    assert.is_true(t:cancel())
    assert.is_true(t:cancel_pending())
    assert.is_false(closed)
    local ok, err = t:join()
    assert.is_false(ok)
    assert.are.equal("canceled", err.kind)
    assert.are.same({ "slept", "slept again", "paid2" }, steps)
    assert.is_true(closed)
    assert.are.equal("canceled", t:status())
    assert.is_false(t:cancel_pending())
  end)

  it("a task that ends past its shield without waiting again ends canceled", function()
    local t = resil.spawn(function()
      resil.shield(resil.sleep, 1)
      return "answer"
    end)
    resil.sleep(0.5)
    t:cancel()
    local ok, err = t:join()
    assert.is_false(ok)
    assert.are.equal("canceled", err.kind)
  end)

  it("cancel(true) goes through it at once: its wait is aborted", function()
    local reached = false
    local t = resil.spawn(function()
      resil.shield(function()
        resil.sleep(60)
        reached = true
      end)
    end)
    resil.sleep(0.5)
    assert.is_true(t:cancel())
    assert.are.equal("waiting", t:status())
    assert.is_true(t:cancel(true))
    assert.are.equal("canceled", t:status())
    resil.sleep(120)
    assert.is_false(reached)
  end)

  it("an error in its function is raised to its caller, and a later cancel is not held off", function()
    local t = resil.spawn(function()
      local ok, err = pcall(resil.shield, function() error("refused", 0) end)
      assert(not ok and err == "refused")
      resil.sleep(60)
    end)
    resil.sleep(0.5)
    assert.is_true(t:cancel())
    assert.are.equal("canceled", t:status())
  end)

  it("is for tasks only", function()
    local co = coroutine.wrap(function() return pcall(resil.shield, function() end) end)
    local ok, err = co()
    assert.is_false(ok)
    assert.matches("must be called from a task", err)
  end)
end)
