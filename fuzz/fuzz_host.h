/*
 * fuzz_host.h: one resil host per fuzzing process, and a Lua function of
 * it to feed inputs to (the targets that read bytes through the Lua API).
 */
#ifndef FUZZ_HOST_H
#define FUZZ_HOST_H

#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "resil.h"

/* A host for one target, after running code; code's one result is left on
 * the host's stack. Targets that do real I/O want the real clock. */
static inline resil_t *fuzz_host(const char *code, int virtual_clock) {
  resil_options opts = {0};
  opts.sandbox = RESIL_SANDBOX_OFF;
  opts.log_level = "off";
  opts.virtual_clock = virtual_clock;
  resil_t *R = resil_open(&opts);
  if (!R) abort();
  lua_State *L = resil_lua(R);
  if (luaL_loadstring(L, code) != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK) {
    fprintf(stderr, "fuzz setup: %s\n", lua_tostring(L, -1));
    abort();
  }
  return R;
}

/* Compile code (which returns a function) once; returns its registry ref. */
static inline int fuzz_setup(resil_t **R, const char *code) {
  *R = fuzz_host(code, 1);
  return luaL_ref(resil_lua(*R), LUA_REGISTRYINDEX);
}

/* fn(input): a Lua error is fine (bad input is refused); a crash is not */
static inline void fuzz_call(resil_t *R, int ref, const unsigned char *data, size_t size) {
  lua_State *L = resil_lua(R);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) lua_pop(L, 1);
  lua_gc(L, LUA_GCSTEP, 0);
}

#endif
