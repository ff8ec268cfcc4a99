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
