-- policies/models.lua: the model registry, plain data you edit and reload.
-- A project copies this file into its own policies/ folder (searched before
-- the shipped one) and edits it; `resil-lua check` validates it.
--
-- An entry is keyed by the name calls use (ai.chat{ model = "chat-fast" }):
--   use        = "provider/model[:version]"   the pinned model an alias stands for
--   fallbacks  = { "provider/model" | "alias", ... }   tried in order when it fails
--   deadline   = seconds for the whole call (retries and fallbacks included)
--   deployments = { { use =, weight =, name =, config = { base_url=, api_key_env=, rate=, breaker= } }, ... }
--              several deployments of one model; calls spread by weight and skip
--              one whose breaker is open or whose bucket cannot admit in time;
--              strategy = "least-wait" goes where the expected wait is shortest
--   migrate    = { to = "provider/model", share = 0.05, sticky = "user",
--                  rollback = { error_rate = 0.05, invalid_output = 0.02, latency = 2, min_calls = 50 },
--                  window = 3600 }
--              `share` of calls (sticky per request field) go to `to`; when that side
--              fails more than the old one by a margin, the share drops to 0 by itself
--              until this entry changes; share = 1 completes the migration
-- A deprecation is keyed by the model's name (with or without its provider):
--   deprecated = true, replacement = "provider/model", sunset = "YYYY-MM-DD"
--              before the sunset: a warning and a days-left metric; on and after
--              it calls go to the replacement
-- A model is pinned when it carries a date (gpt-4o-mini-2024-07-18,
-- claude-haiku-4-5-20251001) or a version (replicate/owner/model:hash);
-- `pinned = true` on an entry marks one that is pinned by its name.
return {
  ["chat-fast"] = { use = "openai/gpt-4o-mini-2024-07-18", fallbacks = { "anthropic/claude-haiku-4-5-20251001" } },
  -- (Anthropic retired claude-sonnet-4-5-20250929 in 2026-11: its calls were 404s, each one
  -- falling back and paying for the round trip)
  ["chat-best"] = { use = "anthropic/claude-sonnet-5-5", fallbacks = { "openai/gpt-4.1-2025-04-14" } },
  ["chat-cheap"] = { use = "openai/gpt-4.1-nano-2025-04-14", fallbacks = { "chat-fast" } },

  -- OpenAI retired these snapshots; calls that still name them move on by themselves
  ["gpt-4o-2024-05-13"] = { deprecated = true, replacement = "openai/gpt-4o-2024-08-06", sunset = "2026-06-30" },
  ["claude-3-5-haiku-20241022"] = { deprecated = true, replacement = "anthropic/claude-haiku-4-5-20251001",
                                    sunset = "2026-02-19" },
}
