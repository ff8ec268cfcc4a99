-- policies/pricing_media.lua: unit prices of async jobs and speech, in USD.
--
--   local pricing = require "policies.pricing_media"
--   pricing.models["replicate/acme/upscaler"] = { per_output = 0.002 }   -- add or correct a price
--   local usd = pricing.cost("fal", "fal/fal-ai/flux/dev", { outputs = 1 })  --> 0.025
--
-- A dated table you edit: providers change prices, check their pricing pages. Keys are the
-- `model` strings of ai.job / ai.speech; a Replicate version pin (":<version>") may be left
-- out. Units, any of them in one entry:
--   per_output            each image (or file) a job returns
--   per_video_second      each second of video (the input's `duration`; `duration = 5`, the
--                         model's default, when the input gives none: without it, unpriced)
--   per_predict_second    each second the provider ran the model (hardware-billed models)
--   per_1k_characters     each 1,000 characters of speech text
-- cost() returns nil for a model without a price: policies/jobs.lua records it unpriced and
-- warns once, never as a silent zero.
local pricing = {}

pricing.updated = "2026-11-30"

pricing.models = {
  -- Replicate: official models are billed per output, others per second on their hardware
  ["replicate/black-forest-labs/flux-schnell"] = { per_output = 0.003 },
  ["replicate/black-forest-labs/flux-dev"] = { per_output = 0.025 },
  ["replicate/black-forest-labs/flux-1.1-pro"] = { per_output = 0.04 },
  ["replicate/bytedance/seedance-1-lite"] = { per_video_second = 0.036, duration = 5 },
  -- fal: per image (about one megapixel) or per second of video
  ["fal/fal-ai/flux/dev"] = { per_output = 0.025 },
  ["fal/fal-ai/flux/schnell"] = { per_output = 0.003 },
  -- ElevenLabs: per 1,000 characters of text
  ["elevenlabs/eleven_flash_v2_5"] = { per_1k_characters = 0.05 },
  ["elevenlabs/eleven_turbo_v2_5"] = { per_1k_characters = 0.05 },
  ["elevenlabs/eleven_multilingual_v2"] = { per_1k_characters = 0.10 },
}

-- An entry prices a job only when each of its fields is a unit above (or `duration`) holding a
-- finite number >= 0, and it has one price at least: a typo ("per_outptu") priced every job at $0,
-- which writes no ledger row, NaN did the same, and a string ("abc") raised out of ai.job. Such an
-- entry is no price. -> nil | why
local UNITS = { per_output = true, per_video_second = true, per_predict_second = true, per_1k_characters = true }
local function malformed(p)
  if type(p) ~= "table" then return "not a table" end
  local any
  for field, v in pairs(p) do
    if not UNITS[field] and field ~= "duration" then return ("unknown field '%s'"):format(tostring(field)) end
    if math.type(v) == nil or v ~= v or v < 0 or v == math.huge then
      return ("%s must be a number >= 0, not %s"):format(field, tostring(v))
    end
    any = any or UNITS[field]
  end
  if not any then return "no price field" end
  return nil
end

-- the entry of a model: exact, then without a Replicate version pin -> the entry | nil, why (none,
-- or a malformed one, which is no price)
function pricing.price(model)
  local p = pricing.models[model]
  if p == nil then
    local unpinned = type(model) == "string" and model:match("^(.-):%x+$")
    p = unpinned and pricing.models[unpinned] or nil
  end
  if p == nil then return nil end
  local bad = malformed(p)
  if bad then return nil, ("malformed price for %s: %s"):format(tostring(model), bad) end
  return p
end

-- cost(provider, model, usage) -> usd | nil, why (no price for this model, or a malformed one)
-- usage: { outputs=, video_seconds=, predict_seconds=, characters= }
function pricing.cost(provider, model, usage)
  local p, why = pricing.price(model)
  if p == nil then return nil, why end
  usage = usage or {}
  local usd = 0
  if p.per_output then usd = usd + p.per_output * (usage.outputs or 0) end
  if p.per_video_second then usd = usd + p.per_video_second * (usage.video_seconds or 0) end
  if p.per_predict_second then usd = usd + p.per_predict_second * (usage.predict_seconds or 0) end
  if p.per_1k_characters then usd = usd + p.per_1k_characters * (usage.characters or 0) / 1000 end
  return usd
end

return pricing
