-- OpenAI's tool_choice allowed_tools sent to Anthropic: its mode over the tools it allows. One
-- that allows none of the request's tools sent "tools": {} (an object, which Anthropic refuses
-- with a 400) beside its tool_choice.
local resil = require "resil"
resil.log.level("off")
local anthropic = require "policies.providers.anthropic"
local json = resil.json

local MSGS = { { role = "user", content = "hi" } }
local TOOL_A = { type = "function", ["function"] = { name = "a", parameters = { type = "object" } } }

local function sent(choice)
  return json.decode(json.encode(anthropic.body({ messages = MSGS, max_tokens = 50, tools = { TOOL_A },
    tool_choice = choice }, "claude-sonnet-4-5", {})))
end

describe("an OpenAI allowed_tools choice sent to Anthropic", function()
  it("sends the tools it allows, and its mode", function()
    local b = sent({ type = "allowed_tools", allowed_tools = { mode = "required",
      tools = { { type = "function", ["function"] = { name = "a" } } } } })
    assert.are.same({ "a", "any" }, { b.tools[1].name, b.tool_choice.type })
  end)

  it("that allows none of the request's tools sends no tools list: none, not an object", function()
    local b = sent({ type = "allowed_tools", allowed_tools = { mode = "auto",
      tools = { { type = "function", ["function"] = { name = "b" } } } } })
    assert.is_nil(b.tools)
    assert.is_nil(b.tool_choice) -- (auto over no tools: a plain answer)
    b = sent({ type = "allowed_tools", allowed_tools = { mode = "required",
      tools = { { type = "function", ["function"] = { name = "b" } } } } })
    assert.is_nil(b.tools)
    assert.are.equal("any", b.tool_choice.type) -- (the API's own 400: the client required a tool it did not send)
  end)
end)
