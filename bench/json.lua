-- resil.json (src/json.c: cjson made exact) against lua-cjson itself, on an embeddings answer:
-- N vectors of 1,536 numbers, once in the digits the API writes (float32s: 0.017291732) and once
-- as doubles that need 17 (what a vector unpacked from base64 is). CPU seconds of one decode and
-- one encode each, and the ratio to cjson's in the same run (cjson loses digits past 14: the
-- ratio is what exactness costs).
--   resil-lua bench/json.lua [N]
local resil = require "resil"
local json, cjson = resil.json, require "cjson"
local N = tonumber(arg[1]) or 500

local function vectors(digits)
  math.randomseed(7)
  local data = {}
  for i = 1, N do
    local e = {}
    for j = 1, 1536 do
      local f = string.unpack("<f", string.pack("<f", (math.random() - 0.5) * 0.1))
      e[j] = digits and tonumber(("%.9g"):format(f)) or f
    end
    data[i] = { object = "embedding", index = i - 1, embedding = e }
  end
  return { object = "list", data = data, model = "text-embedding-3-small" }
end

local function cpu(fn)
  local best = math.huge
  for _ = 1, 3 do
    local t = os.clock()
    fn()
    best = math.min(best, os.clock() - t)
  end
  return best
end

for _, case in ipairs({ { "float32 digits", vectors(true) }, { "17-digit doubles", vectors(false) } }) do
  local name, value = case[1], case[2]
  local text = cjson.encode(value)
  local exact = json.encode(value)
  local enc, cenc = cpu(function() json.encode(value) end), cpu(function() cjson.encode(value) end)
  local dec, cdec = cpu(function() json.decode(exact) end), cpu(function() cjson.decode(text) end)
  local n = N * 1536
  print(("json %-16s %d numbers: decode %.3f s (%.0f ns a number, %.2fx cjson), encode %.3f s (%.0f ns, %.2fx cjson)")
    :format(name, n, dec, dec / n * 1e9, dec / cdec, enc, enc / n * 1e9, enc / cenc))
end
