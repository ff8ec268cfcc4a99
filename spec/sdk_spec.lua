-- The official TypeScript SDKs (openai, @anthropic-ai/sdk; spec/sdk) against
-- the mock provider: clients no one here wrote keep the mock true to the wire.
-- Skips, saying why, when node or the installed SDKs are absent (`make deps`).
local resil = require "resil"
local helpers = require "spec.helpers"


describe("the official SDKs against the mock", function()
  local why = helpers.sdk_skip_reason()
  if why then
    it("skipped: " .. why, function() print("# sdk_spec skipped: " .. why) end)
    return
  end

  local results, out
  setup(function()
    -- the mock runs in a process of its own: node runs while this one waits
    local scenario = helpers.write(helpers.tmpname(".lua"),
      'return { strict = true, reply = "one two three four five six", api_keys = { "sk-spec-sdk-0123456789" } }')
    local log
    out, log = helpers.with_server(("%s mock %s"):format(helpers.resil, scenario), "(http://[%d%.:]+)", function(url)
      return helpers.run(("cd spec/sdk && MOCK_URL=%s node check.mjs"):format(url))
    end)
    assert(out, "the mock did not start: " .. tostring(log))
    results = helpers.sdk_results(out.stdout)
  end)

  local CHECKS = {
    "openai: chat.completions.create parses",
    "openai: n and max_tokens (finish_reason length)",
    "openai: n past 128 or under 1 is refused as the API refuses it",
    "openai: a raw stream parses chunk by chunk, usage last",
    "openai: the stream helper accumulates the final completion",
    "openai: 429 is RateLimitError",
    "openai: a wrong key is AuthenticationError",
    "openai: 500 is InternalServerError",
    "anthropic: messages.create parses",
    "anthropic: max_tokens stops with stop_reason max_tokens",
    "anthropic: the stream helper accumulates the final message",
    "anthropic: an error event after the 200 raises",
    "anthropic: 429 is RateLimitError",
    "anthropic: a wrong key is AuthenticationError",
    "anthropic: 529 is InternalServerError (overloaded_error)",
    "anthropic: a request without max_tokens is refused as the API does (400)",
    "openai: a json_schema response_format is answered with JSON of the schema (parse())",
    "openai: a tool_choice that forces a call is answered with one, whole and streamed",
    "openai: logprobs are answered, whole and streamed",
    "openai: top_logprobs past 20 is refused as the API refuses it",
    "openai: embeddings, a list of token ids is one input, its usage that many tokens",
    "openai: embeddings dimensions past 65536 are refused for a model the mock does not know, as its message says",
    "anthropic: a tool_choice that forces a call is answered with a tool_use block, whole and streamed",
    "openai and anthropic: a forced tool call past max_tokens is cut there, billed at most max_tokens, whole and streamed",
    "anthropic: output_config.format json_schema is answered with JSON of the schema",
    "openai and anthropic: a schema's formats and bounds are answered within them, whole and streamed",
    "openai: stop ends the answer before the first stop sequence, finish_reason stop",
    "anthropic: extended thinking is answered with a thinking block and its signature, whole and streamed",
    "anthropic: a thinking budget the API refuses is BadRequestError",
    "openai: models.list and models.retrieve, an unknown model NotFoundError model_not_found",
    "anthropic: models.list({limit: 2}) pages by two, each model once, and models.retrieve (an alias too)",
    "openai and anthropic: a max_tokens under 1 is refused as each API refuses it",
    "anthropic: a model has every field of the SDK's ModelInfo, listed or retrieved",
    "openai and anthropic: a truncated stream raises, never ends as an answer",
  }
  helpers.sdk_checks(it, CHECKS, function() return results, out end)
end)
