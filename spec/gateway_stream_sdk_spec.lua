-- The official TypeScript SDKs' streams through the gateway on a bad day
-- (spec/sdk/stream_badday.mjs): clients that leave at each point, a
-- fallback before the first delta, an Idempotency-Key; the ledger and the
-- key's budget checked after each. Skips, saying why, when node or the SDKs
-- are absent.
local helpers = require "spec.helpers"

describe("the official SDKs' streams through the gateway on a bad day", function()
  local why = helpers.sdk_skip_reason()
  if why then
    it("skipped: " .. why, function() print("# gateway_stream_sdk_spec skipped: " .. why) end)
    return
  end

  local results, out
  setup(function() results, out = helpers.sdk_against_gateway("spec/sdk/stream_badday_server.lua", "stream_badday.mjs") end)

  helpers.sdk_checks(it, {
    "openai: 250 streams at once, a fifth of their clients leaving at each point: a ledger row for each stream the " ..
      "gateway saw a provider start, no hold left",
    "anthropic: 250 streams at once, a fifth of their clients leaving at each point: a ledger row for each stream " ..
      "the gateway saw a provider start, no hold left",
    "openai: a stream whose primary ends before its first delta is the fallback's, whole",
    "openai and anthropic: an Idempotency-Key on a stream serves each request whole (streams are not replayed), " ..
      "each one row",
    "openai and anthropic: a stream the provider breaks after its first delta raises, never a silently cut answer; " ..
      "a whole one labelled application/json returns whole",
  }, function() return results, out end)
end)
