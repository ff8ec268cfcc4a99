-- The official TypeScript SDKs (openai, @anthropic-ai/sdk; spec/sdk) against
-- the gateway: apps that change their base URL keep working, errors keep
-- their classes. Skips, saying why, when node or the SDKs are absent.
local resil = require "resil"
local helpers = require "spec.helpers"


describe("the official SDKs against the gateway", function()
  local why = helpers.sdk_skip_reason()
  if why then
    it("skipped: " .. why, function() print("# gateway_sdk_spec skipped: " .. why) end)
    return
  end

  local results, out
  setup(function() results, out = helpers.sdk_against_gateway("spec/sdk/gateway_server.lua", "gateway.mjs") end)

  local CHECKS = {
    "openai: chat through the gateway",
    "openai: the stream helper accumulates the final completion",
    "openai: embeddings.create through the gateway (base64 by default, decoded by the SDK)",
    "openai: embeddings are the model's own size, or the dimensions asked (base64 decoded by the SDK)",
    "openai: a stream with tools (chat-tools) ends with the tool call and its text",
    "anthropic: a stream with tools (chat-tools) ends with the tool_use block and its text",
    "openai: a stream with tools (claude-tools) ends with the tool call and its text",
    "anthropic: a stream with tools (claude-tools) ends with the tool_use block and its text",
    "anthropic: messages through the gateway",
    "anthropic: the stream helper accumulates the final message",
    "anthropic: a 529 on the primary falls back (the SDK sees a normal answer)",
    "anthropic: a tool conversation with an image falls back to OpenAI, translated",
    "openai: a tool conversation with an image served by Anthropic, translated",
    "openai: logprobs are sent upstream and come back with the usage details",
    "anthropic: thinking is sent upstream and its block comes back with its signature",
    "anthropic: a stream relays thinking with its signature, then the text",
    "openai: models.list and models.retrieve (an id with a slash too)",
    "anthropic: models.list and models.retrieve in its own shape",
    "anthropic: models.list({limit: 2}) pages by two, each model once, and back with before_id",
    "anthropic: a model has every field of the SDK's ModelInfo, listed or retrieved",
    "anthropic: a request without max_tokens is BadRequestError, as the API answers it",
    "anthropic: a refusal with no content is the SDK's message, stop_reason refusal, one call",
    "openai: invalid output, billed and tried again by the gateway, is not tried again by the SDK",
    "openai: an Anthropic refusal with no content is finish_reason content_filter",
    "openai: an answer from Anthropic tells its cached prompt tokens, streamed or not",
    "anthropic: top_k, thinking and metadata are left out of a fallback to OpenAI",
    "openai: a stream cut after its first delta raises in the SDK",
    "anthropic: a stream cut after its first delta raises in the SDK",
    "openai: a context overflow (chat-overflow) is BadRequestError, code context_length_exceeded, the provider's message",
    "openai: a context overflow (claude-overflow) is BadRequestError, code context_length_exceeded, the provider's message",
    "openai: the provider's param and code reach the SDK (a context overflow's param, a model it does not have)",
    "anthropic: a context overflow is BadRequestError with the API's message",
    "anthropic: an overloaded_error event after the first deltas is the SDK's error of that type",
    "openai: a bad request is BadRequestError",
    "openai: an unknown key is AuthenticationError",
    "openai: a revoked key is AuthenticationError",
    "anthropic: a revoked key is AuthenticationError, with its request id",
    "anthropic: the key's rate limit is RateLimitError, with its request id",
    "openai: the key's rate limit is RateLimitError",
    "openai and anthropic: a key's rate limit says retry-after-ms, the wait the SDKs read first",
    "openai: a chat-failing-500 the gateway tried again and gave up on is not tried again by the SDK",
    "openai: a chat-failing-408 the gateway tried again and gave up on is not tried again by the SDK",
    "openai: a chat-failing-reset the gateway tried again and gave up on is not tried again by the SDK",
    "anthropic: a claude-failing-529 the gateway tried again and gave up on is not tried again by the SDK",
    "anthropic: a claude-failing-503 the gateway tried again and gave up on is not tried again by the SDK",
    "openai: an exhausted budget is refused, not retried, no provider called",
    "openai: an Idempotency-Key replays the first answer, billed once",
    "openai: a client that aborts a stream cancels the upstream transfer",
  }
  helpers.sdk_checks(it, CHECKS, function() return results, out end)
end)
