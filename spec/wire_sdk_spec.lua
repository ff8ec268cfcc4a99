-- The official TypeScript SDKs' own helpers (spec/sdk: the Anthropic SDK's
-- betaTool and toolRunner) against the strict mock and a gateway in front of
-- it (spec/sdk/wire_sdk_server.lua, spec/sdk/wire_sdk.mjs). Skips, saying
-- why, when node or the SDKs are absent.
local helpers = require "spec.helpers"


describe("the SDKs' helpers against the mock and the gateway", function()
  local why = helpers.sdk_skip_reason()
  if why then
    it("skipped: " .. why, function() print("# wire_sdk_spec skipped: " .. why) end)
    return
  end

  local results, out
  setup(function() results, out = helpers.sdk_against_gateway("spec/sdk/wire_sdk_server.lua", "wire_sdk.mjs") end)

  local CHECKS = {
    "anthropic: tools of type custom (the SDK's betaTool) are served by OpenAI, whole and streamed",
    "mock: tools in the other API's shape are refused, as each API refuses them",
    "mock: a message thread holds the conversation (the SDK's toolRunner runs its turns)",
    "mock: a message's usage has the fields the SDK types, whole and streamed",
    "mock: embeddings of an empty text, past 2048 inputs or past 8192 tokens are refused, as the API does",
    "mock: embeddings in an encoding_format other than float or base64 are refused, as the API does",
    "mock: a tool_choice naming no tool of the request, or two tools of one name, are refused, as the APIs refuse them",
    "mock: tool results after a text, or two tool_use blocks of one id, are refused, as Anthropic refuses them",
    "mock: more than four stop sequences are refused on the OpenAI route, not on Anthropic's",
    "mock and gateway: reasoning models take max_completion_tokens and the default sampling only",
    "anthropic: more than four stop sequences fall back to OpenAI, its first four sent",
    "openai: an allowed_tools choice calls an allowed tool, served by either API",
    "mock: a fault's should_retry = false reaches the OpenAI SDK, which does not retry it",
    "openai: a PNG sent as data:image/jpeg is served by Anthropic, its type told by its bytes",
    "mock: a prompt marked with cache_control is written to the cache, then read, whole and streamed",
    "mock: a prompt is cached from its model's minimum length",
    "mock: the beta's fallbacks serve a declined request, as the SDK reads it, whole and streamed",
    "anthropic: the SDK's toolRunner runs through the gateway, served by either API",
    "anthropic: an answer translated from OpenAI has inference_geo, speed and output_tokens_details null",
    "anthropic: speed fast and inference_geo us are refused (unpriced), the standard ones served",
    "anthropic: an answer translated from OpenAI without text has content [], not an empty text block",
    "anthropic: a tool loop a fallback served goes on at Anthropic with thinking on",
    "anthropic: a stream translated from OpenAI without text has content [], not an empty text block",
  }
  helpers.sdk_checks(it, CHECKS, function() return results, out end)
end)
