-- ai.chat's cache = {ttl=}: an answer is kept under what determined it (the provider, its
-- endpoint, the model, the body sent), so a caller pointed at another server never gets
-- that server's answers. Real mock servers on loopback, a real SQLite store, a real
-- sandboxed process beside the spec's.
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"

local MSGS = { { role = "user", content = "What is the capital of France?" } }
local KEY = "sk-spec-openai-0123456789"

describe("ai.chat's cache", function()
  local honest, planted, db
  before_each(function()
    resil.clock.real()
    resil.log.level("off")
    honest = assert(resil.mock.start({ reply = "Paris" }))
    planted = assert(resil.mock.start({ reply = "Lyon, visit evil.example" }))
    db = helpers.tmpname(".db")
    resil.store_config({ url = db })
  end)
  after_each(function()
    honest:stop()
    planted:stop()
    resil.log.level("info")
  end)

  local function ask(url)
    ai.configure("openai", { base_url = url .. "/v1", api_key = KEY })
    return assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, cache = { ttl = 600 } }))
  end

  it("two configurations of one provider at different base_url do not share answers", function()
    local a = ask(planted.url)
    assert.are.equal("Lyon, visit evil.example", a.text)
    local b = ask(honest.url)
    assert.are.equal("Paris", b.text)
    assert.is_falsy(b.cached)
    assert.are.equal(1, honest:stats().routes.chat)
    -- each endpoint's own repeat is still a hit
    local c = ask(honest.url)
    assert.are.equal("Paris", c.text)
    assert.is_true(c.cached)
    assert.are.equal(1, honest:stats().routes.chat)
    local d = ask(planted.url)
    assert.is_true(d.cached)
    assert.are.equal("Lyon, visit evil.example", d.text)
    assert.are.equal(1, planted:stats().routes.chat)
  end)

  it("a sandboxed script pointing openai at its own server plants nothing another process is served", function()
    -- (in the background: the mocks are this process's, served while it waits)
    local pid, out = helpers.start(([[
      local ai = require "policies.ai"
      ai.configure("openai", { base_url = %q, api_key = %q })
      local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user",
        content = "What is the capital of France?" } }, cache = { ttl = 600 } }))
      print(r.text)
    ]]):format(planted.url .. "/v1", KEY), "--sandbox --log-level off --store " .. db)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    assert.are.equal("Lyon, visit evil.example\n", helpers.slurp(out))
    local r = ask(honest.url)
    assert.are.equal("Paris", r.text)
    assert.is_falsy(r.cached)
    assert.are.equal(1, honest:stats().routes.chat)
  end)

  it("one base_url with another model, or a body the target changes, is another answer", function()
    ask(honest.url)
    ai.configure("openai", { base_url = honest.url .. "/v1", api_key = KEY })
    local r = assert(ai.chat({ model = "openai/gpt-4o", messages = MSGS, cache = { ttl = 600 } }))
    assert.is_falsy(r.cached)
    assert.are.equal(2, honest:stats().routes.chat)
  end)
end)

-- (before: the cache's keys were the scripts' kv keys, and the key is reproducible (ai.wire_request
-- is exported, the hash resil.hash of a canonical string): a sandboxed script set a forged answer
-- under it and every caller on the store, a gateway's clients too, was served that answer; it read
-- others' cached answers, and deleted them. Under the sandbox ai:cache: is the host's, reached
-- by policies.ai alone, through what the host hands its chunk.)
describe("ai.chat's cache under the sandbox", function()
  local FORGE = [[
local resil = require "resil"
local store, key = resil.store(), arg[1]
local forged = resil.json.encode({ text = "Lyon, visit evil.example", provider = "openai", model = "gpt-4o-mini",
  finish_reason = "stop", usage = { input_tokens = 1, output_tokens = 1 } })
print("get", pcall(store.get, store, key))
print("del", pcall(store.del, store, key))
print("incr", pcall(store.incr, store, "ai:cache:n"))
print("own", store:set("ai:cached", "mine"), store:get("ai:cached"))
store:set(key, forged)
]]

  -- the one cached answer's kv key in the store at url
  local function cache_key(url)
    local port, db = url:match("^redis://[^:]+:(%d+)/(%d+)")
    if port then
      local p = io.popen(("redis-cli -p %s -n %s --raw keys 'resil:kv:ai:cache:*'"):format(port, db))
      local k = p:read("l")
      p:close()
      return k and k:gsub("^resil:kv:", "")
    end
    return helpers.backend(assert(resil.store(url))).db:read(function(tx)
      return tx:value("SELECT key FROM kv WHERE key LIKE 'ai:cache:%'")
    end)
  end

  local function no_forged_answer(url)
    resil.clock.real()
    resil.log.level("off")
    resil.store_config({ url = url })
    local honest = assert(resil.mock.start({ reply = "Paris" }))
    finally(function()
      honest:stop()
      resil.store_config({ url = helpers.tmpname(".db") })
      resil.log.level("info")
    end)
    -- policies.ai caches under the sandbox as outside it: a sandboxed process's second ask is a hit,
    -- and what it cached is served to this (unsandboxed) one
    local pid, out = helpers.start(([[
      local ai = require "policies.ai"
      ai.configure("openai", { base_url = %q, api_key = %q })
      for _ = 1, 2 do
        local r = assert(ai.chat({ model = "openai/gpt-4o-mini", messages = { { role = "user",
          content = "What is the capital of France?" } }, cache = { ttl = 600 } }))
        print(r.text, r.cached)
      end
    ]]):format(honest.url .. "/v1", KEY), "--sandbox --log-level off --store " .. url)
    assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 30))
    assert.are.equal("Paris\tnil\nParis\ttrue\n", helpers.slurp(out))
    ai.configure("openai", { base_url = honest.url .. "/v1", api_key = KEY })
    local function ask()
      return assert(ai.chat({ model = "openai/gpt-4o-mini", messages = MSGS, cache = { ttl = 600 } }))
    end
    local r = ask()
    assert.are.same({ "Paris", true }, { r.text, r.cached })
    assert.are.equal(1, honest:stats().routes.chat)
    -- a sandboxed script given the key (it can compute it) plants nothing, reads and deletes nothing
    local key = assert(cache_key(url))
    local script = helpers.write(helpers.tmpname(".lua"), FORGE)
    local f = helpers.run(("%s --sandbox --log-level off --store %s %s %s"):format(helpers.resil, url, script, key))
    os.remove(script)
    -- served what the honest server said, from the cache
    r = ask()
    assert.are.same({ "Paris", true }, { r.text, r.cached })
    assert.are.equal(1, honest:stats().routes.chat)
    local lines = {}
    for l in f.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    local function refused(call, k)
      return ("^%s\tfalse\t.-store:%s: key \"%s\" is the host's own %%(keys under \"ai:cache:\" are reserved%%)")
        :format(call, call, k:gsub("%p", "%%%0"))
    end
    assert.matches(refused("get", key), lines[1] or "")
    assert.matches(refused("del", key), lines[2] or "")
    assert.matches(refused("incr", "ai:cache:n"), lines[3] or "")
    assert.are.equal("own\ttrue\tmine", lines[4])
    assert.are.equal(1, f.code, f.stderr)
    assert.matches(script:gsub("%p", "%%%0") .. ":9: store:set: key \"ai:cache:%x+\" is the host's own", f.stderr)
  end

  it("a script cannot plant, read or delete a cached answer (SQLite)", function()
    no_forged_answer(helpers.tmpname(".db"))
  end)

  it("a script cannot plant, read or delete a cached answer (Redis)", function()
    local redis = helpers.redis_server()
    finally(redis.stop)
    no_forged_answer(redis.url())
  end)
end)
