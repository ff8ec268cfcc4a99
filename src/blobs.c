/*
 * blobs.c: the Lua half of the host (the files in src/lua/), compiled into the
 * library as NUL-terminated strings, so an embedder needs no files at run
 * time. The paths are relative to the top of the tree, where make runs.
 */
#define EMBED_LUA(name, file)                                                                    \
  __asm__(".section .rodata\n.global " #name "\n.type " #name ", @object\n.balign 16\n" #name \
          ":\n.incbin \"" file "\"\n.byte 0\n.previous\n")

EMBED_LUA(resil_prelude_lua, "src/lua/prelude.lua");
EMBED_LUA(resil_mock_lua, "src/lua/mock.lua");
EMBED_LUA(resil_store_lua, "src/lua/store.lua");
EMBED_LUA(resil_owner_lua, "src/lua/owner.lua");
EMBED_LUA(resil_store_sqlite_lua, "src/lua/store_sqlite.lua");
EMBED_LUA(resil_store_redis_lua, "src/lua/store_redis.lua");
EMBED_LUA(resil_commands_lua, "src/lua/commands.lua");
EMBED_LUA(resil_metrics_lua, "src/lua/metrics.lua");
