-- A migration watched live: calls from 200 users a second through the alias
-- "writer", printing each second how they split between the old and the new
-- version. Edit `share` in examples/watch/models.lua while it runs: --watch
-- reloads the registry and the next calls follow it.
--
--   resil-lua --watch --policies examples/watch examples/migration_watch.lua [seconds]
--   (real providers: drop the configure line and export OPENAI_API_KEY)
local resil = require "resil"
local ai = require "policies.ai"

local SECONDS = tonumber(arg and arg[1]) or 30
resil.log.level("warn")
local mock = resil.mock.start({ strict = true, reply = "ok" })
ai.configure("openai", { base_url = mock.url .. "/v1", api_key = "sk-example-000000" })

local users = {}
for i = 1, 200 do users[i] = i end

for second = 1, SECONDS do
  local split = { old = 0, new = 0 }
  resil.map(users, function(i)
    local r = ai.chat({ model = "writer", user = "user-" .. i, max_tokens = 10,
      messages = { { role = "user", content = "hi" } } })
    if r then split[r.migration.side] = split[r.migration.side] + 1 end
    return true
  end, { concurrency = 50 })
  print(("%3d s  old %3d  new %3d  (new %.0f%%)"):format(second, split.old, split.new, 100 * split.new / 200))
  io.stdout:flush()
  resil.sleep(1)
end
mock:stop()
