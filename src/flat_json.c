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
#include <math.h>
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

/* the table at idx as json.encode writes it, pushed -> 1 | 0 (not a table written here; the stack
 * above idx is left as it was then, or cleared to idx) */
static int push_flat(lua_State *L, int idx) {
  if (lua_getmetatable(L, idx)) {
    lua_pop(L, 1);
    return 0;
  }
  int top = lua_gettop(L);
  char text[MOST];
  char *p = text, *end = text + MOST;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    /* L stack: ..., key (top + 1), value */
    if (lua_type(L, top + 1) != LUA_TSTRING || /* (never lua_tolstring on a number key: next would lose it) */
        p == end) {
      lua_settop(L, top);
      return 0;
    }
    char sep = p == text ? '{' : ',';
    *p++ = sep;
    if (!(p = put_plain(L, top + 1, p, end)) || p == end || (*p++ = ':', !(p = put_value(L, p, end)))) {
      lua_settop(L, top);
      return 0;
    }
    lua_pop(L, 1);
  }
  if (p == text || p == end) return 0;
  *p++ = '}';
  lua_pushlstring(L, text, (size_t)(p - text));
  return 1;
}

/* flat_json(t) -> t as json.encode writes it | nil (not a table written here) */
static int flat_json(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  return push_flat(L, 1);
}

/* The usual ledger row, made here: src/lua/costs.lua's cost_row for a record whose fields are
 * what a gateway's or a policy's paid call gives (strings or nothing, a price within the
 * ledger's range, units of plain names and whole numbers), without the hundred VM instructions
 * and four C calls of its checks and its table (1.8k instructions a row). Anything else (a
 * metatable, a number where text goes, a budget, units json.encode writes) is costs.lua's: it
 * checks, raises at its caller's line and makes the row as ever. cost_spec holds the two alike.
 * row(e, at, day, run, ctx) -> the row array of cost_row (run: runs.current_id()'s, for e.run
 * nil; ctx: resil.context()) | nil: not such a record */
enum { E_USD = 6, E_PROVIDER, E_MODEL, E_OPERATION, E_USER, E_ID, E_RUN, E_STEP, E_ITEM, E_BUDGET, E_PERIOD,
       E_UNITS, E_SYNC, E_LAST = E_SYNC };
/* (its upvalues 1-13, the names as Lua strings: made once, not at each row) */
static const char *const FIELDS[] = {"usd", "provider", "model", "operation", "user", "id", "run", "step", "item",
                                     "budget", "period", "units", "sync"};
/* (upvalues 14-17) */
static const char *const COUNTS[] = {"input_tokens", "prompt_tokens", "output_tokens", "completion_tokens"};
#define NFIELDS (int)(sizeof FIELDS / sizeof FIELDS[0])
#define MAX_USD 1e9 /* (costs.lua's) */

static int string_or_nil(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  return t == LUA_TNIL || t == LUA_TSTRING;
}

static int ledger_row(lua_State *L) {
  if (lua_type(L, 1) != LUA_TTABLE || lua_getmetatable(L, 1)) return 0; /* (a metatable: its fields are Lua's) */
  lua_settop(L, 5);
  luaL_checkstack(L, 40, "ledger row");
  for (int i = 1; i <= NFIELDS; i++) {
    lua_pushvalue(L, lua_upvalueindex(i));
    lua_rawget(L, 1);
  }
  /* costs.lua's checks, passed as they pass there; what would not pass, or pass otherwise, is its */
  int t = lua_type(L, E_USD);
  if (t == LUA_TNUMBER) {
    lua_Number usd = lua_tonumber(L, E_USD);
    if (!(usd >= 0 && usd <= MAX_USD)) return 0; /* (NaN too) */
  } else if (t != LUA_TNIL) {
    return 0;
  }
  for (int i = E_PROVIDER; i <= E_PERIOD; i++)
    if (!string_or_nil(L, i)) return 0;
  if (!lua_isnil(L, E_BUDGET)) return 0; /* (a budget's row: its period asked there) */
  int units = lua_type(L, E_UNITS);
  if (units == LUA_TTABLE) {
    if (!push_flat(L, E_UNITS)) return 0; /* (json.encode's, there) */
  } else if (units == LUA_TNIL) {
    lua_pushnil(L);
  } else {
    return 0;
  }
  int text = lua_gettop(L);
  /* the row, in cost_row's order (its comment there) */
  lua_createtable(L, 21, 0);
  int row = text + 1;
#define SET(n, from) (lua_pushvalue(L, from), lua_rawseti(L, row, n))
  SET(1, E_ID);
  SET(2, 2); /* at */
  SET(3, 3); /* its day */
  SET(4, E_PROVIDER);
  SET(5, E_MODEL);
  SET(6, E_OPERATION);
  SET(7, E_USER);
  SET(8, lua_isnil(L, E_RUN) ? 4 : E_RUN);
  if (lua_isnil(L, E_STEP)) { /* e.step or ctx.step or nil */
    lua_getfield(L, 5, "step");
    if (!lua_toboolean(L, -1)) {
      lua_pop(L, 1);
      lua_pushnil(L);
    }
    lua_rawseti(L, row, 9);
  } else {
    SET(9, E_STEP);
  }
  if (t == LUA_TNUMBER) { /* floor(usd * 1e6 + 0.5), the integer (usd is at most 1e9) */
    lua_pushinteger(L, (lua_Integer)floor(lua_tonumber(L, E_USD) * 1e6 + 0.5));
    lua_rawseti(L, row, 10);
  }
  SET(11, text);
  SET(13, E_PERIOD);
  if (lua_isnil(L, E_ITEM)) { /* e.item or ctx._step_scope */
    lua_getfield(L, 5, "_step_scope");
    lua_rawseti(L, row, 15);
  } else {
    SET(15, E_ITEM);
  }
  SET(16, E_USD);
  if (units == LUA_TTABLE) { /* the counts the metrics take, copied (the caller may reuse its table) */
    for (int i = 0; i < 4; i++) {
      lua_pushvalue(L, lua_upvalueindex(NFIELDS + 1 + i));
      lua_rawget(L, E_UNITS);
      lua_rawseti(L, row, 17 + i);
    }
  }
  SET(21, E_SYNC);
#undef SET
  return 1;
}

/* require "resil.core.flat_json" -> { write = flat_json, row = ledger_row } (src/lua/costs.lua) */
int luaopen_resil_flat_json(lua_State *L) {
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, flat_json);
  lua_setfield(L, -2, "write");
  for (int i = 0; i < NFIELDS; i++) lua_pushstring(L, FIELDS[i]);
  for (int i = 0; i < 4; i++) lua_pushstring(L, COUNTS[i]);
  lua_pushcclosure(L, ledger_row, NFIELDS + 4);
  lua_setfield(L, -2, "row");
  return 1;
}
