-- A pipeline (resil.once in resil.step in resil.map items, ai.chat inside) whose provider had a bad
-- day: resumed once the provider is back, its key fixed or its credit added, each step calls the
-- provider again; a refusal of the request itself (a 400) is replayed, nothing sent. Real
-- processes, a real SQLite file, the mock provider in each process.
local helpers = require "spec.helpers"

local PIPELINE = [==[
local resil = require "resil"
local ai = require "policies.ai"
local faults = {
  unauthorized = { { route = "chat", status = 401 } },
  moved = { { route = "chat", status = 301 } },
  no_credit = { { route = "chat", status = 429, error_type = "insufficient_quota", error_code = "insufficient_quota" } },
  outage = { { route = "chat", status = 503 } },
  frozen = { { route = "chat", kind = "hang" } },
  refused = { { route = "chat", status = 400 } },
}
local m = resil.mock.start({ faults = faults[arg[1]] })
ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-test-123456", retry = { base = 0.01, max_retries = 1 },
  breaker = { window_type = "count", window = 4, min_calls = 2, failure_rate = 0.5, open_for = 600 } })
local prompt = arg[2] or "caption"
local out, failures = resil.map({ 1, 2, 3, 4 }, function(i)
  return resil.step("caption", function()
    return resil.once(resil.run.id() .. "/" .. i, function(text)
      local r, err = ai.chat({ model = "openai/gpt-4o-mini", max_tokens = 50, timeout = 0.2, deadline = 1,
        messages = { { role = "user", content = text .. " " .. i } } })
      if not r then return nil, err end
      return r.text
    end, prompt)
  end)
end, { concurrency = 1 })
local seen = {}
for i = 1, 4 do seen[i] = out[i] and "made" or failures[i].kind end
print(table.concat(seen, ","), m:stats().routes.chat or 0)
]==]

describe("a pipeline resumed after its provider's bad day", function()
  local cases = {
    { "unauthorized", "auth,auth,auth,auth" },
    { "moved", "redirect,redirect,redirect,redirect" },   -- a base_url that moved: the configuration's
    { "no_credit", "quota,quota,quota,quota" },
    { "outage", "circuit_open,circuit_open" },   -- its breaker opened
    { "frozen", "circuit_open,circuit_open" },
  }
  for _, case in ipairs(cases) do
    local day, first = case[1], case[2]
    it(("(%s) calls the provider again at each step, none replays the day's refusal"):format(day), function()
      local db = helpers.tmpname(".db")
      local script = helpers.write(helpers.tmpname(".lua"), PIPELINE)
      local opts = ("%s --store %s --run %s --log-level off %s "):format(helpers.resil, db, day, script)
      local r = helpers.run(opts .. day)
      assert.are.equal(0, r.code, r.stderr)
      -- (its day: nothing made; where the breaker opened, the later items refused circuit_open)
      assert.is_not.matches("made", r.stdout)
      assert.matches(first, r.stdout, 1, true)
      r = helpers.run(opts .. "fine")
      assert.are.equal(0, r.code, r.stderr)
      -- (before: the refusals after the first were kept under the steps' keys as permanent, and
      -- replayed at every resume for a day, nothing sent: "made,circuit_open,circuit_open,..." or
      -- "auth,auth,auth,auth 0")
      assert.are.equal("made,made,made,made\t4\n", r.stdout)
    end)
  end

  it("(its requests refused as bad, a 400) replays the refusal: nothing is sent again", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), PIPELINE)
    local opts = ("%s --store %s --run refused --log-level off %s "):format(helpers.resil, db, script)
    assert.are.equal("bad_request,bad_request,bad_request,bad_request\t4\n", helpers.run(opts .. "refused").stdout)
    assert.are.equal("bad_request,bad_request,bad_request,bad_request\t0\n", helpers.run(opts .. "fine").stdout)
  end)

  it("(its requests refused as bad, then fixed in the pipeline) sends the fixed requests under the same keys", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), PIPELINE)
    local opts = ("%s --store %s --run fixed --log-level off %s "):format(helpers.resil, db, script)
    assert.are.equal("bad_request,bad_request,bad_request,bad_request\t4\n", helpers.run(opts .. "refused").stdout)
    -- (before: "key_reused,key_reused,... 0" for a day, the record's retention: the refusal kept under each
    -- key barred every other request from it, though nothing had been paid for)
    local r = helpers.run(opts .. "fine 'a shorter caption'")
    assert.are.equal(0, r.code, r.stderr)
    assert.are.equal("made,made,made,made\t4\n", r.stdout)
    -- and a key whose answer was kept is still refused to other arguments (the run started over: same keys)
    assert.are.equal("key_reused,key_reused,key_reused,key_reused\t0\n", helpers.run(opts:gsub("%-%-run fixed",
      "--run fixed --fresh") .. "fine 'another'").stdout)
  end)
end)
