-- The demo's model registry (examples/pipeline.lua loads it). A project keeps
-- its own in policies/models.lua; `resil-lua check examples/models.lua` checks this one.
return {
  -- the script: Claude first, GPT when Anthropic is down
  writer = { use = "anthropic/claude-sonnet-4-5-20250929", fallbacks = { "openai/gpt-4o-mini-2024-07-18" } },

  -- shot prompts: 20 % of customers try the newer model; it rolls back by itself
  -- when it answers worse than the old one (here: garbage)
  prompter = { use = "openai/gpt-4o-mini-2024-07-18",
               migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 0.2, sticky = "user",
                           rollback = { error_rate = 0.05, invalid_output = 0.02, min_calls = 4 } } },

  -- the title step still names a retired snapshot: it is served by the replacement
  ["openai/gpt-4o-2024-05-13"] = { deprecated = true, replacement = "openai/gpt-4o-2024-08-06",
                                   sunset = "2025-06-30" },

  -- images on Replicate (pinned to a version) and fal, the video, the voice. A job
  -- past its deadline is canceled and made again (seconds: short for the demo's
  -- mock; a real video wants 900)
  still = { use = "replicate/black-forest-labs/flux-schnell:bf2f2e683d03a9549f484a37a0df1581514b28dd91d8d4a6e4bc1a0d8a8e9f2c",
            deadline = 1.5 },
  thumbnail = { use = "fal/fal-ai/flux/schnell", pinned = true, deadline = 1.5 },
  video = { use = "replicate/bytedance/seedance-1-lite:c4d7a4b9e1a24c0fd5c0d0e6fbd6e8f2a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8",
            deadline = 1.5 },
  voice = { use = "elevenlabs/eleven_flash_v2_5" },
}
