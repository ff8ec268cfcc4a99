-- The registry examples/migration_watch.lua serves from (run it with --watch
-- --policies examples/watch). Edit `share` and save: the split moves.
return {
  writer = { use = "openai/gpt-4o-mini-2024-07-18",
             migrate = { to = "openai/gpt-4.1-mini-2025-04-14", share = 0.2, sticky = "user" } },
}
