-- policies/providers/elevenlabs.lua: ElevenLabs text-to-speech
-- (https://elevenlabs.io/docs/api-reference/text-to-speech/convert).
--
--   ai.speech{ model = "elevenlabs/eleven_flash_v2_5", voice = "<voice id>", text = script,
--              output_format = "mp3_44100_128", voice_settings = { stability = 0.5 } }
--
-- Key: ELEVENLABS_API_KEY (the xi-api-key header). Base URL: the provider's `base_url`
-- configuration, else ELEVENLABS_BASE_URL, else https://api.elevenlabs.io.
-- POST /v1/text-to-speech/{voice_id}?output_format=... {text, model_id, voice_settings} ->
-- the audio bytes. Billed by characters of text.
local resil = require "resil"
local escape = require("policies.providers.replicate").escape -- a value as one path segment or query value

local elevenlabs = {
  name = "elevenlabs",
  key_env = "ELEVENLABS_API_KEY",
  base_env = "ELEVENLABS_BASE_URL",
  base_url = "https://api.elevenlabs.io",
}

function elevenlabs.target(rest)
  if not rest:match("^[%w%-_%.]+$") then
    return nil, ("elevenlabs model must be \"elevenlabs/<model_id>\", got \"elevenlabs/%s\""):format(rest)
  end
  return { model_id = rest }
end

-- characters as ElevenLabs counts them (UTF-8 code points)
function elevenlabs.characters(text) return utf8.len(text) or #text end

-- ctx: { base=, key=, target=, send= }, s: { voice=, text=, output_format=, voice_settings=,
-- language_code=, seed= } -> { audio=, content_type=, request_id=, characters= } | nil, err
function elevenlabs.speak(ctx, s)
  local format = s.output_format or "mp3_44100_128"
  -- (escaped: a voice "../../v1/user" was a POST with the key to /v1/user, "a?b=c" or "a#b" another
  -- request than the one asked for; a voice id or format that is not one is the provider's 404 or 422)
  local url = ("%s/v1/text-to-speech/%s?output_format=%s"):format(ctx.base, escape(s.voice), escape(format))
  local body = { text = s.text, model_id = ctx.target.model_id, voice_settings = s.voice_settings,
    language_code = s.language_code, seed = s.seed }
  local res, err = ctx.send({ method = "POST", url = url, json = body,
    headers = { ["xi-api-key"] = ctx.key, ["Content-Type"] = "application/json", ["Accept"] = "audio/mpeg" } })
  if not res then return nil, err end
  local ctype = res.headers["content-type"] or ""
  -- (a page is no audio: a captive portal's or a proxy's 200 text/html was returned as the audio and
  -- recorded as billed characters, though ElevenLabs never had the request)
  local media = ctype:lower()
  if res.body == nil or res.body == "" or media:match("json") or media:match("^%s*text/") or media:match("html")
    or media:match("xml") then
    return nil, resil.error("invalid_output", "elevenlabs: the answer is not audio (" .. ctype .. ")",
      { provider = "elevenlabs", retryable = true })
  end
  return { audio = res.body, content_type = ctype, request_id = res.headers["request-id"],
    characters = elevenlabs.billed(res.headers["x-character-count"], s.text) }
end

-- The characters an answer says it billed (x-character-count), read as a count: a whole number
-- from 0 to the text's bytes (more than the text holds is recorded at that most, said), else the
-- text's own count. A negative or infinite one raised out of ai.speech (the budget's settle
-- refused it), its hold kept; "1e12" recorded $50,000,000 for an 11-character text.
function elevenlabs.billed(header, text)
  local own = elevenlabs.characters(text)
  if header == nil then return own end
  local n = tonumber(header)
  n = n and n >= 0 and n < math.huge and math.tointeger(n) or nil
  if n and n <= #text then return n end
  resil.log.error("speech: the provider's x-character-count cannot be read or is more than the text holds; " ..
    (n and "recorded at the text's bytes" or "the text's own count is recorded"),
    { provider = "elevenlabs", value = tostring(header):sub(1, 40), characters = own })
  return n and #text or own
end

return elevenlabs
