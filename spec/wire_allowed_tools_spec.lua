-- OpenAI's tool_choice allowed_tools sent to Anthropic: its mode over the tools it allows. One
-- that allows none of the request's tools sent "tools": {} (an object, which Anthropic refuses
-- with a 400) beside its tool_choice: now all of them, with tool_choice none.
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

  it("that allows none of the request's tools sends them all, none to be called: never \"tools\": {}", function()
    -- (without the tools, a conversation holding tool_use blocks is refused too)
    for _, mode in ipairs({ "auto", "required" }) do
      local b = sent({ type = "allowed_tools", allowed_tools = { mode = mode,
        tools = { { type = "function", ["function"] = { name = "b" } } } } })
      assert.are.same({ "a", "none" }, { b.tools[1] and b.tools[1].name, b.tool_choice.type }, mode)
    end
  end)
end)
