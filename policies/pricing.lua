-- policies/pricing.lua: what a call costs, from a dated table you can edit.
--
--   local pricing = require "policies.pricing"
--   pricing.models.openai["gpt-4o-mini"].output = 0.60          -- change a price
--   pricing.models.openai["my-finetune"] = { input = 0.30, output = 1.20 }
--   local usd, why = pricing.cost("openai", "gpt-4o-mini-2024-07-18",
--     { input_tokens = 2006, cached_input_tokens = 1920, output_tokens = 300 })
--
-- Prices are USD. Token prices are per 1M tokens; the other units are per
-- what their name says. A model is looked up as given, then without its date
-- suffix (gpt-4o-mini-2024-07-18 -> gpt-4o-mini, claude-sonnet-4-5-20250929 ->
-- claude-sonnet-4-5). No price: cost returns nil, why and warns once per
-- model; the call is then recorded without a price, never as a silent zero.
local resil = require "resil"

local pricing = {}

-- The day these prices were read from the providers' pricing pages. Check
-- them before you bill anyone by them.
pricing.date = "2025-11-15"

-- How each price field is counted, from a normalized usage table:
--   usage = { input_tokens,          -- all prompt tokens, cached ones included
--             cached_input_tokens,   -- prompt tokens read from the provider's cache
--             cache_write_tokens,    -- prompt tokens written to it (Anthropic)
--             cache_write_1h_tokens, -- the part of those written to the 1-hour cache
--             output_tokens,         -- completion tokens, reasoning included
--             images, seconds, characters, requests }
-- Uncached input is input_tokens - cached_input_tokens - cache_write_tokens.
-- A cached or cache-write price that a model lacks falls back to `input`; a
-- 1-hour cache-write price, to the cache-write price (then `input`).
pricing.units = {
  input = function(u) return ((u.input_tokens or 0) - (u.cached_input_tokens or 0) - (u.cache_write_tokens or 0)) / 1e6 end,
  cached_input = function(u) return (u.cached_input_tokens or 0) / 1e6 end,
  cache_write = function(u) return ((u.cache_write_tokens or 0) - (u.cache_write_1h_tokens or 0)) / 1e6 end,
  cache_write_1h = function(u) return (u.cache_write_1h_tokens or 0) / 1e6 end,
  output = function(u) return (u.output_tokens or 0) / 1e6 end,
  -- async jobs and speech (policies.jobs fills these for its providers)
  per_image = function(u) return u.images or 0 end,               -- per generated image
  per_second = function(u) return u.seconds or 0 end,             -- per second of output video or audio
  per_1k_characters = function(u) return (u.characters or 0) / 1000 end, -- text-to-speech input
  per_request = function(u) return u.requests or 1 end,           -- a flat price per call or job
  -- server tools the provider runs and bills per use, besides their tokens
  web_search = function(u) return u.web_search_requests or 0 end, -- per search (Anthropic's web search tool)
}

pricing.models = {
  openai = {
    ["gpt-4o-mini"] = { input = 0.15, cached_input = 0.075, output = 0.60 },
    ["gpt-4o"] = { input = 2.50, cached_input = 1.25, output = 10.00 },
    ["gpt-4o-2024-05-13"] = { input = 5.00, output = 15.00 },
    ["gpt-4.1"] = { input = 2.00, cached_input = 0.50, output = 8.00 },
    ["gpt-4.1-mini"] = { input = 0.40, cached_input = 0.10, output = 1.60 },
    ["gpt-4.1-nano"] = { input = 0.10, cached_input = 0.025, output = 0.40 },
    ["gpt-5"] = { input = 1.25, cached_input = 0.125, output = 10.00 },
    ["gpt-5-mini"] = { input = 0.25, cached_input = 0.025, output = 2.00 },
    ["gpt-5-nano"] = { input = 0.05, cached_input = 0.005, output = 0.40 },
    ["o3"] = { input = 2.00, cached_input = 0.50, output = 8.00 },
    ["o4-mini"] = { input = 1.10, cached_input = 0.275, output = 4.40 },
    -- embeddings: input tokens only
    ["text-embedding-3-small"] = { input = 0.02 },
    ["text-embedding-3-large"] = { input = 0.13 },
    ["text-embedding-ada-002"] = { input = 0.10 },
  },
  -- cache_write: the 5-minute cache (1.25x input); cache_write_1h: the 1-hour cache (2x);
  -- cached_input: cache reads (0.1x); web_search: $10 per 1,000 searches of the web search tool
  anthropic = {
    -- (platform.claude.com's model pages, 2026-12: cache writes 1.25x and 2x input, reads 0.1x)
    ["claude-fable-5-2"] = { input = 8.00, cache_write = 10.00, cache_write_1h = 16.00, cached_input = 0.80, output = 40.00, web_search = 0.01 },
    ["claude-fable-5-1"] = { input = 10.00, cache_write = 12.50, cache_write_1h = 20.00, cached_input = 1.00, output = 50.00, web_search = 0.01 },
    ["claude-opus-5-5"] = { input = 4.00, cache_write = 5.00, cache_write_1h = 8.00, cached_input = 0.40, output = 20.00, web_search = 0.01 },
    ["claude-sonnet-5-5"] = { input = 2.00, cache_write = 2.50, cache_write_1h = 4.00, cached_input = 0.20, output = 10.00, web_search = 0.01 },
    ["claude-sonnet-5"] = { input = 2.00, cache_write = 2.50, cache_write_1h = 4.00, cached_input = 0.20, output = 10.00, web_search = 0.01 },
    ["claude-sonnet-4-6"] = { input = 3.00, cache_write = 3.75, cache_write_1h = 6.00, cached_input = 0.30, output = 15.00, web_search = 0.01 },
    ["claude-opus-4-5"] = { input = 5.00, cache_write = 6.25, cache_write_1h = 10.00, cached_input = 0.50, output = 25.00, web_search = 0.01 },
    ["claude-opus-4-1"] = { input = 15.00, cache_write = 18.75, cache_write_1h = 30.00, cached_input = 1.50, output = 75.00, web_search = 0.01 },
    ["claude-opus-4"] = { input = 15.00, cache_write = 18.75, cache_write_1h = 30.00, cached_input = 1.50, output = 75.00, web_search = 0.01 },
    ["claude-sonnet-4-5"] = { input = 3.00, cache_write = 3.75, cache_write_1h = 6.00, cached_input = 0.30, output = 15.00, web_search = 0.01 },
    ["claude-sonnet-4"] = { input = 3.00, cache_write = 3.75, cache_write_1h = 6.00, cached_input = 0.30, output = 15.00, web_search = 0.01 },
    ["claude-3-7-sonnet"] = { input = 3.00, cache_write = 3.75, cache_write_1h = 6.00, cached_input = 0.30, output = 15.00, web_search = 0.01 },
    ["claude-haiku-4-5"] = { input = 1.00, cache_write = 1.25, cache_write_1h = 2.00, cached_input = 0.10, output = 5.00, web_search = 0.01 },
    ["claude-3-5-haiku"] = { input = 0.80, cache_write = 1.00, cache_write_1h = 1.60, cached_input = 0.08, output = 4.00, web_search = 0.01 },
  },
  -- Providers of async jobs and speech add their tables here, e.g.
  --   replicate = { ["black-forest-labs/flux-schnell"] = { per_image = 0.003 } },
  --   fal = { ["fal-ai/flux/dev"] = { per_image = 0.025 } },
  --   elevenlabs = { ["eleven_flash_v2_5"] = { per_1k_characters = 0.05 } },
}

-- Prices of the processing tiers other than the standard one, by provider,
-- tier and model: an answer that says it was served by one (OpenAI's
-- service_tier "priority", about twice the standard price, or "flex", half;
-- a project may default to priority without the request asking) is priced
-- here (usage.service_tier). A tier named here without a price for the
-- model, such as "scale" (bought ahead), has none: its row is written
-- without a price, never at the standard one. A tier not named here at all
-- (an OpenAI-compatible server's own, Groq's "on_demand") is priced as the
-- model is.
pricing.tiers = {
  openai = {
    priority = {
      ["gpt-4o-mini"] = { input = 0.25, cached_input = 0.125, output = 1.00 },
      ["gpt-4o"] = { input = 4.25, cached_input = 2.125, output = 17.00 },
      ["gpt-4o-2024-05-13"] = { input = 8.75, output = 26.25 },
      ["gpt-4.1"] = { input = 3.50, cached_input = 0.875, output = 14.00 },
      ["gpt-4.1-mini"] = { input = 0.70, cached_input = 0.175, output = 2.80 },
      ["gpt-4.1-nano"] = { input = 0.20, cached_input = 0.05, output = 0.80 },
      ["gpt-5"] = { input = 2.50, cached_input = 0.25, output = 20.00 },
      ["gpt-5-mini"] = { input = 0.45, cached_input = 0.045, output = 3.60 },
      ["o3"] = { input = 3.50, cached_input = 0.875, output = 14.00 },
      ["o4-mini"] = { input = 2.00, cached_input = 0.50, output = 8.00 },
    },
    flex = {
      ["gpt-5"] = { input = 0.625, cached_input = 0.0625, output = 5.00 },
      ["gpt-5-mini"] = { input = 0.125, cached_input = 0.0125, output = 1.00 },
      ["gpt-5-nano"] = { input = 0.025, cached_input = 0.0025, output = 0.20 },
      ["o3"] = { input = 1.00, cached_input = 0.25, output = 4.00 },
      ["o4-mini"] = { input = 0.55, cached_input = 0.1375, output = 2.20 },
    },
    scale = {}, -- Scale Tier: units bought ahead, no price a token
  },
}

-- The most input tokens one image may be billed at (high detail, at the largest size the
-- provider keeps), by provider and model: what a budget reserves for each image of a request,
-- which sends a link or a file id of a few bytes. OpenAI: 85 + 170 a tile, 8 tiles of a 2048x768
-- image (gpt-4o, gpt-4.1, o3), up to 1,536 patches x 2.46 (gpt-4.1-nano; other patch models
-- less), and gpt-4o-mini's 2,833 + 5,667 a tile; Anthropic: about (width x height) / 750, 1,600
-- at most. `default` for the provider's other models; pricing.image_tokens.default otherwise.
pricing.image_tokens = {
  default = 3780,
  openai = { default = 3780, ["gpt-4o-mini"] = 48169, ["gpt-4o"] = 1445, ["gpt-4.1"] = 1445, ["o3"] = 1445 },
  anthropic = { default = 1600 },
}

-- Token prices a model lacks fall back: cached_input and cache_write to input,
-- cache_write_1h to cache_write (then input), so a table written before
-- cache_write_1h prices those writes as it did (in priced, below)

-- (remembered: answers name the dated model, gpt-4o-mini-2024-07-18 for gpt-4o-mini, and the
-- three gsubs on each answer were nearly half of what pricing it cost. Bounded: clients name
-- any model they like)
local undated, undated_count = {}, 0
local function strip_date(model)
  local name = undated[model]
  if name then return name end
  name = model:gsub("%-%d%d%d%d%-%d%d%-%d%d$", ""):gsub("%-%d%d%d%d%d%d%d%d$", ""):gsub("%-latest$", "")
  if undated_count >= 1000 then undated, undated_count = {}, 0 end
  undated[model], undated_count = name, undated_count + 1
  return name
end

-- A price table prices a call only when each of its fields is a unit above
-- holding a finite number >= 0, and it has one at least: a typo ("inptu"),
-- an empty table or a garbage value ("abc", 0/0) would price calls at $0 or
-- raise after the provider was paid. Such a table is no price. -> ok | nil, why
local mathtype, HUGE = math.type, math.huge
local function malformed(price)
  if type(price) ~= "table" then return "not a table" end
  local any
  local units = pricing.units
  for field, p in pairs(price) do
    if not units[field] then return ("unknown field '%s'"):format(tostring(field)) end
    if mathtype(p) == nil or p ~= p or p < 0 or p == HUGE then
      return ("%s must be a number >= 0, not %s"):format(field, p ~= p and "NaN" or tostring(p))
    end
    any = true
  end
  if not any then return "no price field" end
  return nil
end

-- pricing.price(provider, model [, tier]) -> the price table | nil, why (a malformed table is
-- no price); tier: a processing tier's (pricing.tiers), nil for the standard one
-- (the tables and model names met here, remembered as such: a type() call each was some 400
-- instructions, a fifth of what pricing an answer cost. Tables weakly; names bounded, as above)
local tables = setmetatable({}, { __mode = "k" })
local names, names_count = {}, 0
local function price_entry(provider, model, tier) -- (the table's entry as it is, unchecked)
  local t = pricing.models[provider]
  -- (a tier the table does not name at all is another server's word for its standard one: an
  -- OpenAI-compatible server's "on_demand", priced as the model is)
  local tiers = pricing.tiers[provider]
  if tier ~= nil and type(tiers) == "table" and tiers[tier] ~= nil then t = tiers[tier] end
  if not tables[t] then
    if type(t) ~= "table" then return nil end
    tables[t] = true
  end
  if not names[model] then
    if type(model) ~= "string" then return nil end
    if names_count >= 1000 then names, names_count = {}, 0 end
    names[model], names_count = true, names_count + 1
  end
  return t[model] or t[strip_date(model)]
end
function pricing.price(provider, model, tier)
  local price = price_entry(provider, model, tier)
  if price == nil then return nil end
  local bad = malformed(price)
  if bad then return nil, bad end
  return price
end

-- pricing.estimate_tokens(text) -> about how many tokens a text is, before
-- the provider says (a reservation, a tokens-per-minute limit): 4 bytes a
-- token for ASCII (English, code, JSON), 2 for every other byte. A CJK
-- character is 3 bytes and 1 to 2 tokens: at 4 bytes a token it counted
-- 0.75, and a Chinese prompt could spend twice its hold's input part.
-- (ASCII is told by utf8.len, a loop in C: a pattern's class matched byte
-- by byte took 10 ms a megabyte of an English prompt, on the gateway's
-- request path, three times a JSON decode of it)
function pricing.estimate_tokens(text)
  local n = #text
  if utf8.len(text) == n then return math.ceil(n / 4) end
  local wide = n - #text:gsub("[\128-\255]+", "")
  return math.ceil((n - wide) / 4 + wide / 2)
end

-- pricing.image_tokens_for(provider, model) -> the most input tokens one image may cost
function pricing.image_tokens_for(provider, model)
  local t = pricing.image_tokens[provider]
  local n = type(t) == "table" and type(model) == "string" and (t[model] or t[strip_date(model)])
    or type(t) == "table" and t.default or pricing.image_tokens.default
  return math.type(n) and n >= 0 and n or 0
end

-- models warned about one by one, up to WARN_MAX (a gateway's clients name any
-- model they like: one line and one entry each grew the log and the memory
-- without end); past that, one line saying so, then none
local warned, warned_count, WARN_MAX = {}, 0, 100

-- a price table's cost of a usage, checked as it is summed (one walk of its fields: this runs
-- on every answer) -> usd | nil, why (malformed's)
-- (the numbers met as prices, remembered as such: a key there is a number, and was one >= 0
-- and finite; a type() call each was some 400 instructions. Bounded: a project may set any)
local fine, fine_count = {}, 0
-- (the usual price summed in C, the same doubles in the same order: pricing.units' own token
-- units, whole counts; nil for the rest, summed below. A host without it sums them all here)
local core_ok, core = pcall(require, "resil.core.flat_json")
local priced_in_c = core_ok and type(core) == "table" and core.pricer and core.pricer(pricing.units.input,
  pricing.units.cached_input, pricing.units.cache_write, pricing.units.cache_write_1h, pricing.units.output) or nil
local function priced(price, usage)
  local usd = priced_in_c and priced_in_c(price, usage, pricing.units)
  if usd then return usd end
  if not tables[price] then
    if type(price) ~= "table" then return nil, malformed(price) end
    tables[price] = true
  end
  -- the price's own few fields, then the cache prices it lacks at the price they fall back to
  local units, usd, any = pricing.units, 0, false
  for field, p in pairs(price) do
    local count = units[field]
    if not count then return nil, malformed(price) end
    if not fine[p] then
      if type(p) ~= "number" or not (p >= 0 and p < HUGE) then return nil, malformed(price) end -- (NaN too)
      if fine_count >= 1000 then fine, fine_count = {}, 0 end
      fine[p], fine_count = true, fine_count + 1
    end
    usd = usd + p * count(usage)
    any = true
  end
  if not any then return nil, malformed(price) end
  local input = price.input -- (FALLS_BACK, written out)
  if price.cached_input == nil and input then usd = usd + input * units.cached_input(usage) end
  if price.cache_write == nil and input then usd = usd + input * units.cache_write(usage) end
  if price.cache_write_1h == nil then
    local p = price.cache_write or input
    if p then usd = usd + p * units.cache_write_1h(usage) end
  end
  -- per_request counts 1 by default: only charge it where a price is set
  -- (// 1: math.floor's value without its call; its integer, divided, was the same float)
  return (usd * 1e9 + 0.5) // 1 / 1e9
end

-- A usage of parts (usage.parts: an Anthropic server-side fallback's hops, each a usage with its
-- model): each part priced at its own model's rate, what no part holds (web searches, a flat
-- price a call) at the model's. A part whose model has no price is priced at the model's (that
-- price's absence warned): a row without a price would settle its budget at nothing. Parts that
-- do not add up to the usage (the API says it is their sum; one capped or estimated since) are
-- not its breakdown: nil, and the usage is priced whole.
local COUNTED = { "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens" }
local function parts_cost(provider, model, usage)
  local parts = usage.parts
  for _, k in ipairs(COUNTED) do
    local sum = 0
    for _, part in ipairs(parts) do
      if type(part) ~= "table" then return nil end
      sum = sum + (tonumber(part[k]) or 0)
    end
    if sum ~= (usage[k] or 0) then return nil end
  end
  local tier, usd = usage.service_tier, 0
  for _, part in ipairs(parts) do
    local one = {}
    for k, v in pairs(part) do one[k] = v end
    one.model, one.service_tier, one.requests = nil, tier, 0
    local c = type(part.model) == "string" and pricing.cost(provider, part.model, one)
    if not c then
      local why
      c, why = pricing.cost(provider, model, one)
      if c == nil then return nil, why end
    end
    usd = usd + c
  end
  local rest, why = pricing.cost(provider, model, { service_tier = tier, requests = usage.requests,
    web_search_requests = usage.web_search_requests })
  if rest == nil then return nil, why end
  return math.floor((usd + rest) * 1e9 + 0.5) / 1e9
end

-- pricing.cost(provider, model, usage) -> usd | nil, why; usage.service_tier (a
-- tier other than the standard one) prices it from pricing.tiers; usage.parts, each
-- part at its own model (parts_cost)
function pricing.cost(provider, model, usage)
  if type(usage) ~= "table" then error("pricing.cost: usage must be a table", 2) end
  local parts = usage.parts -- (its type asked only when there are parts: most usages have none)
  if parts ~= nil and type(parts) == "table" and parts[1] ~= nil then
    local usd, why = parts_cost(provider, model, usage)
    if usd ~= nil or why then return usd, why end
  end
  local tier = usage.service_tier
  if tier ~= nil and type(tier) ~= "string" then tier = tostring(tier) end
  local price, usd, bad = price_entry(provider, model, tier), nil, nil
  if price ~= nil then usd, bad = priced(price, usage) end
  if usd == nil then
    local name = tostring(provider) .. "/" .. tostring(model) .. (tier and (" (" .. tier .. " tier)") or "")
    if not warned[name] and warned_count <= WARN_MAX then
      warned_count = warned_count + 1
      if warned_count <= WARN_MAX then
        warned[name] = true
        resil.log.warn(bad and "malformed price for model; its calls are recorded without a cost"
          or "no price for model; its calls are recorded without a cost",
          { provider = provider, model = model, service_tier = tier, prices_of = pricing.date, error = bad })
      else
        resil.log.warn("more models have no price: not warned about one by one (see resil_cost_unpriced_total)",
          { provider = provider, model = model, warned = WARN_MAX })
      end
    end
    return nil, (bad and "malformed price for %s: %s" or "no price for %s"):format(name, bad)
  end
  return usd
end

return pricing
