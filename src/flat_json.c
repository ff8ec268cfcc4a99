/*
 * flat_json.c: a ledger row's units as JSON, for src/lua/costs.lua.
 *
 * resil.json.encode (src/json.c) swaps each number of a value for a marker
 * and back, some 12k instructions for a call's four token counts, on every
 * ledger row. The units are nearly always a flat object of plain names and
 * whole numbers: written here, byte for byte as json.encode writes them (in
 * lua_next's order, as cjson walks a table; a whole number exact, as
 * src/json.c writes it), for a tenth of that. Anything else (a float, text
 * cjson escapes, a nested table, a metatable such as json.array_mt, an empty
 * table, a long text) is not written: nil, and the caller asks json.encode.
 */
#include <string.h>

#include "host.h"

#define MOST 1024 /* bytes of text written here; longer units are json.encode's */

typedef struct {
  char text[MOST];
  size_t len;
} out;

/* a byte cjson writes as it is (it escapes the controls, '"', '\\', '/' and DEL) */
static int verbatim(unsigned char c) { return c >= 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '/'; }

/* -> 0 when it does not fit */
static int put(out *o, const char *s, size_t len) {
  if (len > MOST - o->len) return 0;
  memcpy(o->text + o->len, s, len);
  o->len += len;
  return 1;
}

/* the string at idx, quoted -> 0 when cjson would escape a byte of it (or it does not fit) */
static int put_plain(lua_State *L, int idx, out *o) {
  size_t len;
  const char *s = lua_tolstring(L, idx, &len);
  for (size_t i = 0; i < len; i++)
    if (!verbatim((unsigned char)s[i])) return 0;
  return put(o, "\"", 1) && put(o, s, len) && put(o, "\"", 1);
}

/* the value at the top -> 0 when it is not one written here */
static int put_value(lua_State *L, out *o) {
  switch (lua_type(L, -1)) {
  case LUA_TNUMBER: {
    if (!lua_isinteger(L, -1)) return 0;
    char digits[32];
    return put(o, digits, json_number_text(L, -1, digits)); /* (an integer: its digits) */
  }
  case LUA_TBOOLEAN:
    return lua_toboolean(L, -1) ? put(o, "true", 4) : put(o, "false", 5);
  case LUA_TSTRING:
    return put_plain(L, -1, o);
  default:
    return 0;
  }
}

/* flat_json(t) -> t as json.encode writes it | nil (not a table written here) */
static int flat_json(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getmetatable(L, 1)) return 0;
  out o;
  o.len = 0;
  lua_settop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    /* L stack: t, key, value */
    if (lua_type(L, 2) != LUA_TSTRING) return 0; /* (never lua_tolstring on a number key: next would lose it) */
    if (!(put(&o, o.len ? "," : "{", 1) && put_plain(L, 2, &o) && put(&o, ":", 1) && put_value(L, &o))) return 0;
    lua_pop(L, 1);
  }
  if (o.len == 0 || !put(&o, "}", 1)) return 0;
  lua_pushlstring(L, o.text, o.len);
  return 1;
}

/* require "resil.core.flat_json" -> flat_json (src/lua/costs.lua) */
int luaopen_resil_flat_json(lua_State *L) {
  lua_pushcfunction(L, flat_json);
  return 1;
}
