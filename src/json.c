/*
 * json.c: resil.json, from lua-cjson. Each host gets its own cjson instances
 * (cjson keeps its configuration per instance, never in a C global).
 *
 * encode raises on values JSON cannot hold (a function, a cyclic table):
 * that is misuse. decode returns nil, err on bad input: that is the world.
 */
#include "host.h"

extern int luaopen_cjson(lua_State *L);
extern int luaopen_cjson_safe(lua_State *L);

/* upvalue 1: cjson.safe.decode */
static int json_decode(lua_State *L) {
  luaL_checkstring(L, 1);
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, 1, 2);
  if (!lua_isnil(L, 1)) {
    lua_settop(L, 1);
    return 1;
  }
  const char *why = lua_tostring(L, 2);
  return resil_error_result(L, "invalid_json", "%s", why ? why : "invalid JSON");
}

int luaopen_resil_json(lua_State *L) {
  lua_newtable(L);
  luaL_requiref(L, "cjson", luaopen_cjson, 0);
  lua_getfield(L, -1, "encode");
  lua_setfield(L, -3, "encode");
  lua_getfield(L, -1, "null");
  lua_setfield(L, -3, "null");
  lua_getfield(L, -1, "encode_sparse_array");
  lua_pushboolean(L, 1); /* a very sparse array becomes an object instead of an error */
  lua_call(L, 1, 0);
  lua_pop(L, 1);
  luaL_requiref(L, "cjson.safe", luaopen_cjson_safe, 0);
  lua_getfield(L, -1, "decode");
  lua_pushcclosure(L, json_decode, 1);
  lua_setfield(L, -3, "decode");
  lua_pop(L, 1);
  return 1;
}
