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

/* the bytes cjson writes as they are (it escapes the controls, '"', '\\', '/' and DEL): 1, by byte; one
 * load a byte, not five comparisons (a row's four names are some 60 bytes) */
static const unsigned char verbatim[256] = {
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0,
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1,
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};

/* the string at idx, quoted, at p (room for it checked) -> past it | NULL when cjson would escape a
 * byte of it (or it does not fit) */
static char *put_plain(lua_State *L, int idx, char *p, const char *end) {
  size_t len;
  const char *s = lua_tolstring(L, idx, &len);
  if (len + 2 > (size_t)(end - p)) return NULL;
  *p++ = '"';
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!verbatim[c]) return NULL;
    p[i] = (char)c;
  }
  p += len;
  *p++ = '"';
  return p;
}

/* the value at the top, at p -> past it | NULL when it is not one written here (or does not fit) */
static char *put_value(lua_State *L, char *p, const char *end) {
  switch (lua_type(L, -1)) {
  case LUA_TNUMBER: {
    if (!lua_isinteger(L, -1)) return NULL;
    /* an integer: its digits, as src/json.c writes them (json_number_text), here without a copy */
    lua_Integer i = lua_tointeger(L, -1);
    lua_Unsigned u = i < 0 ? 0u - (lua_Unsigned)i : (lua_Unsigned)i;
    char digits[24], *d = digits + sizeof digits;
    do {
      *--d = (char)('0' + u % 10);
      u /= 10;
    } while (u);
    if (i < 0) *--d = '-';
    size_t n = (size_t)(digits + sizeof digits - d);
    if (n > (size_t)(end - p)) return NULL;
    memcpy(p, d, n);
    return p + n;
  }
  case LUA_TBOOLEAN: {
    int b = lua_toboolean(L, -1);
    size_t n = b ? 4 : 5;
    if (n > (size_t)(end - p)) return NULL;
    memcpy(p, b ? "true" : "false", n);
    return p + n;
  }
  case LUA_TSTRING:
    return put_plain(L, -1, p, end);
  default:
    return NULL;
  }
}

/* flat_json(t) -> t as json.encode writes it | nil (not a table written here) */
static int flat_json(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getmetatable(L, 1)) return 0;
  char text[MOST];
  char *p = text, *end = text + MOST;
  lua_settop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    /* L stack: t, key, value */
    if (lua_type(L, 2) != LUA_TSTRING) return 0; /* (never lua_tolstring on a number key: next would lose it) */
    if (p == end) return 0;
    char sep = p == text ? '{' : ',';
    *p++ = sep;
    if (!(p = put_plain(L, 2, p, end)) || p == end) return 0;
    *p++ = ':';
    if (!(p = put_value(L, p, end))) return 0;
    lua_pop(L, 1);
  }
  if (p == text || p == end) return 0;
  *p++ = '}';
  lua_pushlstring(L, text, (size_t)(p - text));
  return 1;
}

/* require "resil.core.flat_json" -> flat_json (src/lua/costs.lua) */
int luaopen_resil_flat_json(lua_State *L) {
  lua_pushcfunction(L, flat_json);
  return 1;
}
