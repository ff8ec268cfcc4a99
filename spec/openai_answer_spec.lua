-- An OpenAI chat completion's answer parsed in C (src/flat_json.c's chat_parser) for the usual
-- answer is what openai.lua's Lua makes of it, field by field (types too: a whole float count is
-- parse's integer) and in the same lua_next order, over providers' real answers and random ones.
-- Each accepted input is compared: a fast path wrong for any input it takes fails here.
local resil = require "resil"
local json = resil.json
local openai = require "policies.providers.openai"
local flat = require "resil.core.flat_json"

local parse_usual = flat.chat_parser(json.null)

-- a and b alike: types (math.type too, -0.0 from 0.0), values, metatables, keys both ways
local function same(a, b, path)
  path = path or "value"
  if type(a) ~= type(b) then return false, ("%s: %s vs %s"):format(path, type(a), type(b)) end
  if type(a) == "number" then
    if math.type(a) ~= math.type(b) then return false, ("%s: %s vs %s"):format(path, math.type(a), math.type(b)) end
    if a ~= b and (a == a or b == b) then return false, ("%s: %s vs %s"):format(path, tostring(a), tostring(b)) end
    if a == 0 and math.type(a) == "float" and 1 / a ~= 1 / b then return false, path .. ": -0.0 vs 0.0" end
    return true
  end
  if type(a) ~= "table" then
    if a ~= b then return false, ("%s: %q vs %q"):format(path, tostring(a), tostring(b)) end
    return true
  end
  if getmetatable(a) ~= getmetatable(b) then return false, path .. ": metatables differ" end
  for k, v in pairs(a) do
    local ok, why = same(v, rawget(b, k), path .. "." .. tostring(k))
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if rawget(a, k) == nil then return false, path .. "." .. tostring(k) .. ": only in the second" end
  end
  return true
end

-- parse's result in Lua (openai.usage replaced by a call of itself: parse's C path is not taken)
local lua_usage = openai.usage
local function parse_in_lua(data)
  openai.usage = function(...) return lua_usage(...) end
  local ok, r, why = pcall(openai.parse, data)
  openai.usage = lua_usage
  assert(ok, r)
  return r, why
end

-- the keys of t in lua_next's order
local function order(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  return keys
end

-- data parsed in C, when it is taken there, is openai.parse's -> whether it was taken
local function check_parse(data, label)
  local fast = parse_usual(data)
  if fast == nil then return false end
  local slow = parse_in_lua(data)
  local ok, why = same(fast, slow, "r")
  assert(ok, ("%s\nfor %s"):format(tostring(why), label or json.encode(data)))
  -- (made at the size and in the order of parse's constructors: walked alike)
  assert.are.same(order(slow), order(fast))
  if slow.usage then assert.are.same(order(slow.usage), order(fast.usage)) end
  assert(same(openai.parse(data), fast, "r")) -- (openai.parse takes it)
  return true
end

-- answers as providers send them
local ANSWERS = {
  bench = [[{"id":"chatcmpl-4f1c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}]],
  openai = [[{
  "id": "chatcmpl-BPcfqXYZ01",
  "object": "chat.completion",
  "created": 1745427586,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Hello! How can I assist you today?\n\nHere is \"code\": `a\\b` and a path C:\/x\tdone.",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1911,
    "completion_tokens": 10,
    "total_tokens": 1921,
    "prompt_tokens_details": {
      "cached_tokens": 1792,
      "audio_tokens": 0
    },
    "completion_tokens_details": {
      "reasoning_tokens": 0,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_f5bdcc3276"
}
]],
  o3 = [[{"id":"chatcmpl-o3x","object":"chat.completion","created":1745000000,"model":"o3-2025-04-16","choices":[{"index":0,"message":{"role":"assistant","content":"42","refusal":null,"annotations":[]},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":500,"total_tokens":520,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":448,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"flex","system_fingerprint":null}]],
  refusal = [[{"id":"chatcmpl-r","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I'm sorry, I can't help with that."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":9,"total_tokens":39}}]],
  tools = [[{"id":"chatcmpl-t","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}],"refusal":null},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":80,"completion_tokens":17,"total_tokens":97}}]],
  azure = [[{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}},"finish_reason":"stop","index":0,"logprobs":null,"message":{"annotations":[],"content":"Bonjour ! \u00c7a va ? \ud83d\ude00","refusal":null,"role":"assistant"}}],"created":1740000000,"id":"chatcmpl-az","model":"gpt-4o-2024-11-20","object":"chat.completion","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false}}}],"system_fingerprint":"fp_ee1d74bde0","usage":{"completion_tokens":12,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":25,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":37}}]],
  groq = [[{"id":"chatcmpl-g","object":"chat.completion","created":1730241104,"model":"llama3-8b-8192","choices":[{"index":0,"message":{"role":"assistant","content":"Fast."},"logprobs":null,"finish_reason":"stop"}],"usage":{"queue_time":0.037493756,"prompt_tokens":18,"prompt_time":0.000680594,"completion_tokens":556,"completion_time":0.463333333,"total_tokens":574,"total_time":0.464013927},"system_fingerprint":"fp_179b0f92c9","x_groq":{"id":"req_01jbd6g2qdfw2adyrt2az8hz4w"}}]],
  vllm = [[{"id":"chatcmpl-v","object":"chat.completion","created":1719245340,"model":"meta-llama/Meta-Llama-3-8B-Instruct","choices":[{"index":0,"message":{"role":"assistant","reasoning_content":null,"content":"Sure.","tool_calls":[]},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":17,"total_tokens":48,"completion_tokens":31,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}]],
  ollama = [[{"id":"chatcmpl-123","object":"chat.completion","created":1730000000,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":26,"completion_tokens":10,"total_tokens":36}}]],
  openrouter = [[{"id":"gen-1745","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion","created":1735000000,"choices":[{"logprobs":null,"finish_reason":"stop","native_finish_reason":"stop","index":0,"message":{"role":"assistant","content":"ok","refusal":null,"reasoning":null}}],"usage":{"prompt_tokens":14,"completion_tokens":9,"total_tokens":23,"cost":0.00000765,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}]],
  deepseek = [[{"id":"930c60df","object":"chat.completion","created":1705651092,"model":"deepseek-reasoner","choices":[{"index":0,"message":{"role":"assistant","content":"9.11 < 9.8","reasoning_content":"Compare the decimals..."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":13,"completion_tokens":400,"total_tokens":413,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":350},"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":13},"system_fingerprint":"fp_7e73fd9a08"}]],
  xai = [[{"id":"x1","object":"chat.completion","created":1745000000,"model":"grok-3-mini","choices":[{"index":0,"message":{"role":"assistant","content":"101","reasoning_content":"..."},"finish_reason":"stop"}],"usage":{"prompt_tokens":30,"completion_tokens":1,"total_tokens":331,"prompt_tokens_details":{"text_tokens":30,"audio_tokens":0,"image_tokens":0,"cached_tokens":6},"completion_tokens_details":{"reasoning_tokens":300,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0},"num_sources_used":0},"system_fingerprint":"fp_x"}]],
  mistral = [[{"id":"m1","object":"chat.completion","created":1,"model":"magistral-medium","choices":[{"index":0,"message":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"hmm"}]},{"type":"text","text":"Hi"}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}]],
  empty = [[{"id":"e","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":""},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":0,"total_tokens":5}}]],
  two = [[{"id":"n2","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"a"},"finish_reason":"stop"},{"index":1,"message":{"role":"assistant","content":"b"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}]],
  audio = [[{"id":"au","object":"chat.completion","created":1,"model":"gpt-4o-audio-preview","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":null,"audio":{"id":"audio_1","data":"UklGRg==","expires_at":1729018505,"transcript":"Yes"}},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":90,"total_tokens":107}}]],
}

describe("openai answers parsed in C (src/flat_json.c's chat_parser)", function()
  it("take the usual answers, as openai.parse makes their results", function()
    for _, name in ipairs({ "bench", "openai", "o3", "refusal", "azure", "ollama", "deepseek", "xai", "empty",
      "audio", "groq", "openrouter" }) do
      assert(check_parse(json.decode(ANSWERS[name])), name .. " is not parsed in C")
    end
    -- tool calls, content in parts, more choices: openai.lua's
    for _, name in ipairs({ "tools", "vllm", "mistral", "two" }) do
      assert.is_false(check_parse(json.decode(ANSWERS[name])), name)
    end
  end)

  it("are openai.parse's for any usage, tier, refusal, content and finish reason", function()
    math.randomseed(7)
    local R = math.random
    local function pick(list) return list[R(#list)] end
    local COUNTS = { 0, 1, 3, 1792, 2006, -1, -0.0, 0.0, 5.0, 5.5, 1e15, 2 ^ 53, 2 ^ 53 + 2, 2 ^ 63, 1 / 0, -1 / 0,
      0 / 0, math.maxinteger, math.mininteger, math.maxinteger - 1, "5", true, json.null, {}, 1e-300 }
    local function count() return R(3) == 1 and pick(COUNTS) or R(0, 4000) end
    local function maybe(v) return R(4) > 1 and v or nil end
    local function usage()
      local u = { prompt_tokens = maybe(count()), completion_tokens = maybe(count()), total_tokens = maybe(count()) }
      if R(3) == 1 and type(u.prompt_tokens) == "number" and type(u.completion_tokens) == "number" then
        local reasoning = R(0, 500)
        u.completion_tokens_details = { reasoning_tokens = reasoning }
        u.total_tokens = R(2) == 1 and u.prompt_tokens + u.completion_tokens + reasoning or u.total_tokens
      end
      if R(3) == 1 then u.prompt_tokens_details = pick({ { cached_tokens = count() }, {}, json.null, 5, "x" }) end
      if R(5) == 1 then u.completion_tokens_details = pick({ { reasoning_tokens = count() }, {}, json.null, false }) end
      return u
    end
    local taken = 0
    for i = 1, 5000 do
      local message = { role = "assistant", content = pick({ "hello", "", "  \n", json.null, 5, false, nil, "x" }),
        refusal = pick({ nil, json.null, "no", "", false, true, {} }) }
      if R(20) == 1 then message.function_call = pick({ { name = "f", arguments = "{}" }, "f", json.null }) end
      if R(20) == 1 then message.audio = pick({ { id = "a" }, json.null, 1 }) end
      local data = { id = pick({ "chatcmpl-" .. i, nil, 5, json.null, {} }), object = "chat.completion",
        model = pick({ "gpt-4o-mini", nil, json.null, 1 }),
        choices = { { index = 0, message = message,
          finish_reason = pick({ "stop", "length", "content_filter", nil, json.null, 5, {}, true }) } },
        usage = pick({ usage(), usage(), usage(), nil, json.null, "u", 3 }),
        service_tier = pick({ nil, "default", "auto", "standard", "priority", "flex", "scale", json.null, 7,
          ("t"):rep(50), "" }) }
      if check_parse(data, "random answer " .. i) then taken = taken + 1 end
    end
    assert.is_true(taken > 4000, "few random answers parsed in C: " .. taken)
  end)

  it("leave to openai.lua what it reads through a metatable, or a shape of its own", function()
    local function answer() return json.decode(ANSWERS.openai) end
    local d = answer()
    setmetatable(d, {})
    assert.is_nil(parse_usual(d))
    d = answer()
    setmetatable(d.choices, json.array_mt)
    assert.is_nil(parse_usual(d))
    d = answer()
    setmetatable(d.usage.prompt_tokens_details, { __index = function() return 5 end })
    assert.is_nil(parse_usual(d))
    d = answer()
    d.choices[1].message = json.null
    assert.is_nil(parse_usual(d))
    d = answer()
    d.choices = {}
    assert.is_nil(parse_usual(d))
    assert.is_nil(parse_usual("x"))
    -- a project's own usage or tier is called, as before
    local own = openai.service_tier
    openai.service_tier = function() return "mine" end
    assert.are.equal("mine", openai.parse(json.decode(ANSWERS.o3)).usage.service_tier)
    openai.service_tier = own
    assert.are.equal("flex", openai.parse(json.decode(ANSWERS.o3)).usage.service_tier)
  end)
end)
