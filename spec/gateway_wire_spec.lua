-- The official TypeScript SDKs (openai, @anthropic-ai/sdk; spec/sdk) against
-- a gateway whose upstreams answer at the edges of the wire formats
-- (spec/sdk/wire_server.lua, spec/sdk/wire.mjs): what real servers send, and
-- what each API's clients send across to the other. Skips, saying why, when
-- node or the SDKs are absent.
local helpers = require "spec.helpers"


describe("the wire formats through the gateway, read by the official SDKs", function()
  local why = helpers.sdk_skip_reason()
  if why then
    it("skipped: " .. why, function() print("# gateway_wire_spec skipped: " .. why) end)
    return
  end

  local results, out
  setup(function() results, out = helpers.sdk_against_gateway("spec/sdk/wire_server.lua", "wire.mjs") end)

  local CHECKS = {
    "openai: embeddings from an upstream that ignores encoding_format reach the SDK as its vectors",
    "anthropic: an answer translated from OpenAI has stop_details and container null, streamed or not",
    "one tool call at most: disable_parallel_tool_use and parallel_tool_calls reach the provider, either way",
    "structured output reaches the other API: response_format json_schema <-> output_config.format",
    "openai: a system message part's cache_control reaches Anthropic as a cached system block",
    "openai: the 409 of an answer not kept under its Idempotency-Key is not retried by the SDK",
    "openai: cache_control on a tool and a tool result reaches Anthropic, not OpenAI",
    "anthropic: an answer translated from OpenAI has the usage fields the SDK types, streamed or not",
    "openai: a whitespace-only stop sequence is left out for Anthropic, the others kept",
    "openai: tool-call deltas without index or type from a compatible upstream reach the SDK whole",
    "openai: an assistant turn without content (a refusal sent back) is served by Anthropic",
    "openai: a conversation with a custom tool's call is served",
    "anthropic: an MCP toolset (a tool without a name) reaches Anthropic",
    "the server's own refusals (413, 431, 408) reach each SDK as an API error of its type",
    "an endpoint the gateway does not serve is the SDK's own 404 (or 405), with its request id",
    "openai: temperature over 1, and temperature with top_p, are served by Anthropic",
    "anthropic: countTokens is the upstream's count; a model another API serves is a 400 saying so",
    "anthropic: countTokens holds a permit, has its own bucket at the key's rpm, and meets an open breaker (or falls back)",
    "what the other API cannot say is BadRequestError naming it: logprobs for Anthropic, a prefill for OpenAI",
    "openai: a tool conversation's last turn without tools is served by Anthropic",
    "anthropic: an upstream 400's details reach the SDK, its class picked by their error_code",
    "anthropic: an upstream out of credit is billing_error (402) or invalid_request_error (400), not a rate limit",
    "anthropic: an error's body names its request id, as its request-id header does",
    "anthropic: tool calls a compatible server ended with \"stop\" are stop_reason tool_use, whole and streamed",
    "tool calls a compatible server sent without an id get one, for either API's client, whole and streamed",
  }
  helpers.sdk_checks(it, CHECKS, function() return results, out end)
end)
