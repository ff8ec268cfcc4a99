-- ai.stream canceled at each point of its life, as a pipeline script holds it (a plain local,
-- as the README's examples do, not `<close>`): what the ledger records (exactly once), what
-- the budget holds after, and whether the upstream transfer is really aborted (the provider
-- sees its connection go, the collector stopped so that nothing but the cancel closes it).
local resil = require "resil"
local helpers = require "spec.helpers"
local ai = require "policies.ai"

local MSGS = { { role = "user", content = "Say hello" } }

local function openai_delta(text)
  return 'data: {"id":"chatcmpl-c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":' ..
    '[{"index":0,"delta":{"content":"' .. text .. '"},"finish_reason":null}]}\n\n'
end
local OPENAI_FINISH = 'data: {"id":"chatcmpl-c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":' ..
  '[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
local ANTHROPIC_START = 'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_c","type":' ..
  '"message","role":"assistant","model":"claude-haiku-4-5","content":[],"stop_reason":null,"stop_sequence":null,' ..
  '"usage":{"input_tokens":321,"output_tokens":1}}}\n\nevent: content_block_start\ndata: {"type":' ..
  '"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
local function anthropic_delta(text)
  return 'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",' ..
    '"text":"' .. text .. '"}}\n\n'
end

-- a provider on loopback that streams `chunks` (per path) and then waits until its client goes
-- -> state { asked, gone (streams whose client went) }
local function upstream(chunks)
  local st = { asked = 0, gone = 0 }
  local server = assert(resil.server.listen({ tasks = true, handler = function(req)
    st.asked = st.asked + 1
    return { status = 200, headers = { ["content-type"] = "text/event-stream" }, stream = function(write)
      local _ <close> = setmetatable({}, { __close = function() st.gone = st.gone + 1 end })
      for _, c in ipairs(chunks[req.path]) do write(c) end
      resil.sleep(3600)
    end }
  end }))
  local url = ("http://127.0.0.1:%d"):format(server:port())
  ai.configure("openai", { base_url = url .. "/v1", api_key = "sk-spec-cancel-0123456789" })
  ai.configure("anthropic", { base_url = url, api_key = "sk-ant-spec-cancel-0123456789" })
  finally(function() server:close() end)
  return st
end

local function rows()
  local list = assert(helpers.backend(assert(resil.store())):cost_rows({}))
  return list
end

local CHUNKS = {
  ["/v1/chat/completions"] = { openai_delta("one "), openai_delta("two ") },
  ["/v1/messages"] = { ANTHROPIC_START, anthropic_delta("one "), anthropic_delta("two ") },
}

describe("a stream canceled between its deltas, held in a plain local", function()
  before_each(function()
    resil.clock.real()
    resil.log.level("error")
    resil.store_config({ url = helpers.tmpname(".db") })
    collectgarbage("stop") -- (only the cancel may close the stream)
  end)
  after_each(function()
    collectgarbage("restart")
    resil.log.level("info")
  end)

  for _, model in ipairs({ "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5" }) do
    for how, cancel in pairs({
      ["resil.timeout"] = function(reader) return resil.timeout(0.3, reader) end,
      ["task:cancel()"] = function(reader, st)
        local t = resil.spawn(reader)
        assert.is_true(helpers.wait_until(function() return st.asked == 1 end, 5))
        resil.sleep(0.2)
        t:cancel()
      end,
    }) do
      -- (before: nothing recorded, the hold kept until it lapsed, the transfer running on until the
      -- stream was collected)
      it(model .. ", by " .. how .. ": recorded once as what it streamed, its hold given back, the upstream cut",
        function()
          local st = upstream(CHUNKS)
          local budget = "stream-cancel-" .. model .. how
          local b = resil.budget(budget, { limit = 1 })
          local got = {}
          cancel(function()
            local s = ai.stream({ model = model, messages = MSGS, max_tokens = 100, budget = budget })
            for d in s do got[#got + 1] = d end
          end, st)
          assert.are.same({ "one ", "two " }, got)
          assert.is_true(helpers.wait_until(function() return st.gone == 1 end, 5), "the upstream saw no cancel")
          assert.is_true(helpers.wait_until(function() return #rows() == 1 end, 5), "rows: " .. #rows())
          local row = rows()[1]
          local units = resil.json.decode(row.units)
          assert.is_true(units.output_tokens >= 2, "output tokens: " .. tostring(units.output_tokens))
          if model:match("^anthropic") then assert.are.equal(321, units.input_tokens) end
          local s = b:state()
          assert.are.same({ 0, 0 }, { s.reserved, #s.holds })
          assert.is_true(s.spent > 0)
          resil.sleep(0.2)
          assert.are.equal(1, #rows()) -- once
        end)
    end
  end

  -- (before: nothing recorded and the hold kept until it lapsed, however often collected)
  it("canceled in its loop's body, not while it reads: recorded once when the stream is collected", function()
    local st = upstream(CHUNKS)
    local b = resil.budget("stream-cancel-body", { limit = 1 })
    local got = {}
    resil.timeout(0.3, function()
      local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "stream-cancel-body" })
      for d in s do got[#got + 1] = d; resil.sleep(3600) end
    end)
    assert.are.same({ "one " }, got)
    collectgarbage("restart")
    collectgarbage()
    collectgarbage()
    assert.is_true(helpers.wait_until(function() return st.gone == 1 end, 5), "the upstream saw no cancel")
    assert.is_true(helpers.wait_until(function() return #rows() == 1 end, 5), "rows: " .. #rows())
    local s = b:state()
    assert.are.same({ 0, 0 }, { s.reserved, #s.holds })
    resil.sleep(0.2)
    assert.are.equal(1, #rows())
  end)

  -- the usage chunk is the last before [DONE]: a cancel waiting for it records the text streamed
  it("openai, canceled after its finish_reason while the usage chunk is awaited: recorded once", function()
    local st = upstream({ ["/v1/chat/completions"] = { openai_delta("one "), OPENAI_FINISH } })
    local b = resil.budget("stream-cancel-usage", { limit = 1 })
    local got = {}
    resil.timeout(0.3, function()
      local s = ai.stream({ model = "openai/gpt-4o-mini", messages = MSGS, max_tokens = 100,
        budget = "stream-cancel-usage" })
      for d in s do got[#got + 1] = d end
    end)
    assert.are.same({ "one " }, got)
    assert.is_true(helpers.wait_until(function() return st.gone == 1 end, 5), "the upstream saw no cancel")
    assert.is_true(helpers.wait_until(function() return #rows() == 1 end, 5))
    local s = b:state()
    assert.are.same({ 0, 0 }, { s.reserved, #s.holds })
    resil.sleep(0.2)
    assert.are.equal(1, #rows())
  end)
end)
