/*
 * flat_json.c: a ledger row's units as JSON, for src/lua/costs.lua; and the other pieces of a
 * paid call's row its every answer runs, in C where Lua's calls and checks were most of their
 * cost: the usual queued row (ledger_row, costs.lua), the usual price's sum (pricer,
 * policies/pricing.lua) and the usual chat answer's result (chat_parser,
 * policies/providers/openai.lua). Each does only the usual case and leaves the rest to the Lua
 * it stands for, which specs hold it equal to (cost_spec, ai_spec, openai_answer_spec).
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

/* A price table's cost of a usage as policies/pricing.lua's priced sums it, for the usual price
 * (token prices whose units are pricing.units' own, the usage's counts whole numbers or none):
 * the same walk in lua_next's order, the same doubles in the same order, without its hundred VM
 * instructions, four unit calls and the pairs walk's five. Anything else (a metatable, a unit a
 * project replaced or one not of tokens, a count that is no integer, a price priced raises or
 * refuses) is pricing.lua's to sum or refuse.
 * pricer(input, cached_input, cache_write, cache_write_1h, output) -> price(price, usage, units)
 * -> usd | nil; the price's upvalues: the five units (kept, so that no other function has their
 * addresses), their addresses, then the names it reads, as strings made once */
enum { U_INPUT = 1, U_CACHED, U_WRITE, U_WRITE_1H, U_OUTPUT, UV_UNITS = 6, UV_TOKENS = 7, UV_PRICES = 12 };
static const char *const TOKENS[] = {"input_tokens", "cached_input_tokens", "cache_write_tokens",
                                     "cache_write_1h_tokens", "output_tokens"};
static const char *const PRICES[] = {"input", "cached_input", "cache_write", "cache_write_1h"};
#define NPRICES 4
typedef struct {
  const void *fn[U_OUTPUT + 1]; /* [U_*]: the units' addresses */
} units_seen;

/* a table without a metatable at idx */
static int plain_table(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  if (lua_getmetatable(L, idx)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1;
}

/* which default unit the value at the top is (popped) -> U_* | 0 */
static int unit_of(lua_State *L, const units_seen *us) {
  const void *f = lua_type(L, -1) == LUA_TFUNCTION ? lua_topointer(L, -1) : NULL;
  lua_pop(L, 1);
  for (int i = U_INPUT; f && i <= U_OUTPUT; i++)
    if (us->fn[i] == f) return i;
  return 0;
}

/* Lua's a - b of two integers (wrapping, as lua_arith) */
static lua_Integer int_sub(lua_Integer a, lua_Integer b) { return (lua_Integer)((lua_Unsigned)a - (lua_Unsigned)b); }

/* unit u's count of the usage's tokens t[] (pricing.units' function, as Lua computes it) */
static double count_of(int u, const lua_Integer t[5]) {
  switch (u) {
  case U_INPUT: return (double)int_sub(int_sub(t[0], t[1]), t[2]) / 1e6;
  case U_CACHED: return (double)t[1] / 1e6;
  case U_WRITE: return (double)int_sub(t[2], t[3]) / 1e6;
  case U_WRITE_1H: return (double)t[3] / 1e6;
  default: return (double)t[4] / 1e6;
  }
}

/* table[upvalue uv] (raw: a plain table) pushed -> its type */
static int get_named(lua_State *L, int table, int uv) {
  lua_pushvalue(L, lua_upvalueindex(uv));
  return lua_rawget(L, table);
}

static int price(lua_State *L) {
  if (!plain_table(L, 1) || !plain_table(L, 2) || !plain_table(L, 3)) return 0;
  lua_settop(L, 3);
  const units_seen *us = lua_touserdata(L, lua_upvalueindex(UV_UNITS));
  lua_Integer t[5];
  for (int i = 0; i < 5; i++) { /* (u.x or 0): an integer or none */
    int type = get_named(L, 2, UV_TOKENS + i);
    if (type == LUA_TNIL) t[i] = 0;
    else if (lua_isinteger(L, -1)) t[i] = lua_tointeger(L, -1);
    else return 0;
    lua_pop(L, 1);
  }
  double usd = 0;
  int any = 0;
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    /* L stack: price, usage, units, field, p */
    lua_pushvalue(L, 4);
    lua_rawget(L, 3);
    int u = unit_of(L, us);
    if (!u || lua_type(L, 5) != LUA_TNUMBER) return 0;
    double p = lua_tonumber(L, 5);
    if (!(p >= 0 && p < HUGE_VAL)) return 0; /* (NaN too) */
    usd = usd + p * count_of(u, t);
    any = 1;
    lua_pop(L, 1);
  }
  if (!any) return 0;
  /* the cache prices it lacks, at the price they fall back to (pricing.lua's, written out alike) */
  for (int i = 0; i < NPRICES; i++) get_named(L, 1, UV_PRICES + i); /* 4 input, 5 cached_input, 6 cache_write, 7 _1h */
  int input = !lua_isnil(L, 4); /* (a number: walked above) */
  double in = input ? lua_tonumber(L, 4) : 0;
  if (lua_isnil(L, 5) && input) {
    get_named(L, 3, UV_PRICES + 1);
    if (unit_of(L, us) != U_CACHED) return 0;
    usd = usd + in * count_of(U_CACHED, t);
  }
  if (lua_isnil(L, 6) && input) {
    get_named(L, 3, UV_PRICES + 2);
    if (unit_of(L, us) != U_WRITE) return 0;
    usd = usd + in * count_of(U_WRITE, t);
  }
  if (lua_isnil(L, 7) && (!lua_isnil(L, 6) || input)) {
    double p = !lua_isnil(L, 6) ? lua_tonumber(L, 6) : in;
    get_named(L, 3, UV_PRICES + 3);
    if (unit_of(L, us) != U_WRITE_1H) return 0;
    usd = usd + p * count_of(U_WRITE_1H, t);
  }
  lua_pushnumber(L, floor(usd * 1e9 + 0.5) / 1e9);
  return 1;
}

static int pricer(lua_State *L) {
  for (int i = U_INPUT; i <= U_OUTPUT; i++) luaL_checktype(L, i, LUA_TFUNCTION);
  lua_settop(L, U_OUTPUT);
  units_seen *us = lua_newuserdatauv(L, sizeof *us, 0);
  for (int i = U_INPUT; i <= U_OUTPUT; i++) us->fn[i] = lua_topointer(L, i);
  for (int i = 0; i < 5; i++) lua_pushstring(L, TOKENS[i]);
  for (int i = 0; i < NPRICES; i++) lua_pushstring(L, PRICES[i]);
  lua_pushcclosure(L, price, UV_PRICES + NPRICES - 1);
  return 1;
}

/* The normalized result of the usual chat completion, as policies/providers/openai.lua's parse
 * makes it (its usage as openai.usage does), from the decoded answer: one choice whose message
 * has text or none and no tool calls, tables without metatables: openai.validate and parse of
 * the usual answer, 16k instructions in Lua (a hundred-odd VM instructions, a dozen type() calls,
 * num()'s), are 10k with this (most of it the two tables, made all the same). Anything else (more
 * choices or none, tool calls, content in parts, a metatable) is openai.lua's: nil. The tables
 * are made at the size, and their keys set in the order, of parse's constructors. The counts'
 * sum and comparisons are Lua's own (lua_arith, lua_compare: an integer's wrap, a float's).
 * ai_spec holds the two alike.
 * chat_parser(null) -> parse(data) -> r | nil (null: json.null) */
enum { C_NULL = 1, C_CHOICES, C_MESSAGE, C_TOOL_CALLS, C_CONTENT, C_FINISH, C_USAGE, C_TIER, C_REFUSAL, C_FUNCTION_CALL,
       C_AUDIO, C_ID, C_MODEL, C_TEXT, C_PROMPT, C_COMPLETION, C_PROMPT_DETAILS, C_COMPLETION_DETAILS, C_CACHED,
       C_REASONING, C_TOTAL, C_INPUT_TOKENS, C_OUTPUT_TOKENS, C_CACHED_INPUT, C_CACHE_WRITE, C_INPUT_UNREPORTED,
       C_OUTPUT_UNREPORTED, C_OTHER_OUTPUT, C_LAST = C_OTHER_OUTPUT };
/* (upvalues C_CHOICES on, made once) */
static const char *const CHAT[] = {"choices", "message", "tool_calls", "content", "finish_reason", "usage",
                                   "service_tier", "refusal", "function_call", "audio", "id", "model", "text",
                                   "prompt_tokens", "completion_tokens", "prompt_tokens_details",
                                   "completion_tokens_details", "cached_tokens", "reasoning_tokens", "total_tokens",
                                   "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
                                   "input_unreported", "output_unreported", "other_output"};
_Static_assert(sizeof CHAT / sizeof CHAT[0] == C_LAST - 1, "a name for each upvalue");

/* table[upvalue c] (raw) pushed -> its type */
static int field(lua_State *L, int table, int c) {
  lua_pushvalue(L, lua_upvalueindex(c));
  return lua_rawget(L, table);
}

/* the value at the top set as table[upvalue c] (popped); nil is not set, as a constructor's */
static void set_field(lua_State *L, int table, int c) {
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  lua_pushvalue(L, lua_upvalueindex(c));
  lua_insert(L, -2);
  lua_rawset(L, table);
}

/* openai.lua's num(): the count at idx pushed (an integer where a float is whole) -> 1 | 0 (not
 * a count: nothing pushed) */
static int push_count(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TNUMBER) return 0;
  if (lua_isinteger(L, idx)) {
    if (lua_tointeger(L, idx) < 0) return 0;
    lua_pushvalue(L, idx);
    return 1;
  }
  lua_Number d = lua_tonumber(L, idx);
  if (!(d >= 0 && d < HUGE_VAL)) return 0; /* (NaN too) */
  int whole;
  lua_Integer i = lua_tointegerx(L, idx, &whole);
  if (whole) lua_pushinteger(L, i);
  else lua_pushnumber(L, d);
  return 1;
}

/* openai.lua's absent(): nil or null */
static int absent(lua_State *L, int idx) { return lua_isnil(L, idx) || lua_rawequal(L, idx, lua_upvalueindex(C_NULL)); }

/* a table with a metatable at idx (its fields are Lua's to read) */
static int has_metatable(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) return 0;
  lua_pop(L, 1);
  return 1;
}

/* openai.usage(u, tier) of the table u at idx (tier at tier_idx) pushed -> 1 | 0 (openai.lua's to
 * make: a detail with a metatable) */
static int push_usage(lua_State *L, int u, int tier_idx) {
  /* L stack: ..., then each slot below as it is pushed */
  int base = lua_gettop(L);
  int prompt = base + 1, completion = base + 2, input = base + 3, output = base + 4;
  field(L, u, C_PROMPT);
  field(L, u, C_COMPLETION);
  if (!push_count(L, prompt)) lua_pushnil(L);
  if (!push_count(L, completion)) lua_pushnil(L);
  int has_input = !lua_isnil(L, input), has_output = !lua_isnil(L, output);
  if ((!has_input && !absent(L, prompt)) || (!has_output && !absent(L, completion)) || (!has_input && !has_output)) {
    lua_settop(L, base);
    lua_pushnil(L);
    return 1;
  }
  int details = base + 5, out_details = base + 6, cached = base + 7, reasoning = base + 8;
  int dt = field(L, u, C_PROMPT_DETAILS), ot = field(L, u, C_COMPLETION_DETAILS);
  if ((dt == LUA_TTABLE && has_metatable(L, details)) || (ot == LUA_TTABLE && has_metatable(L, out_details))) {
    lua_settop(L, base);
    return 0;
  }
  /* cached: the details' count, at most the input; else 0 */
  int got = 0;
  if (dt == LUA_TTABLE) {
    field(L, details, C_CACHED);
    got = push_count(L, -1);
    lua_remove(L, got ? -2 : -1);
  }
  if (!got) lua_pushinteger(L, 0);
  else if (has_input && lua_compare(L, input, cached, LUA_OPLT)) lua_copy(L, input, cached); /* (math.min's: the first unless the second is less) */
  got = 0;
  if (ot == LUA_TTABLE) {
    field(L, out_details, C_REASONING);
    got = push_count(L, -1);
    lua_remove(L, got ? -2 : -1);
  }
  if (!got) lua_pushnil(L);
  /* reasoning a total of the three counts leaves out of completion_tokens: output */
  if (got && has_input && has_output) {
    lua_pushinteger(L, 0);
    int positive = lua_compare(L, -1, reasoning, LUA_OPLT);
    lua_pop(L, 1);
    if (positive) {
      field(L, u, C_TOTAL);
      lua_pushvalue(L, input);
      lua_pushvalue(L, output);
      lua_arith(L, LUA_OPADD);
      lua_pushvalue(L, reasoning);
      lua_arith(L, LUA_OPADD);
      int equal = lua_compare(L, -2, -1, LUA_OPEQ);
      lua_pop(L, 2);
      if (equal) {
        lua_pushvalue(L, output);
        lua_pushvalue(L, reasoning);
        lua_arith(L, LUA_OPADD);
        lua_replace(L, output);
      }
    }
  }
  lua_createtable(L, 0, 8);
  int t = lua_gettop(L);
  lua_pushvalue(L, has_input ? input : cached);
  set_field(L, t, C_INPUT_TOKENS);
  if (has_output) lua_pushvalue(L, output);
  else lua_pushinteger(L, 0);
  set_field(L, t, C_OUTPUT_TOKENS);
  lua_pushvalue(L, cached);
  set_field(L, t, C_CACHED_INPUT);
  lua_pushinteger(L, 0);
  set_field(L, t, C_CACHE_WRITE);
  if (!has_input) {
    lua_pushboolean(L, 1);
    set_field(L, t, C_INPUT_UNREPORTED);
  }
  if (!has_output) {
    lua_pushboolean(L, 1);
    set_field(L, t, C_OUTPUT_UNREPORTED);
  }
  lua_pushvalue(L, reasoning);
  set_field(L, t, C_REASONING);
  /* a tier that is not standard processing, its first 40 bytes (openai.service_tier) */
  size_t len;
  const char *tier = lua_type(L, tier_idx) == LUA_TSTRING ? lua_tolstring(L, tier_idx, &len) : NULL;
  if (tier && !(len == 7 && memcmp(tier, "default", 7) == 0) && !(len == 4 && memcmp(tier, "auto", 4) == 0) &&
      !(len == 8 && memcmp(tier, "standard", 8) == 0)) {
    lua_pushlstring(L, tier, len < 40 ? len : 40);
    set_field(L, t, C_TIER);
  }
  lua_replace(L, base + 1);
  lua_settop(L, base + 1);
  return 1;
}

static int chat_parse(lua_State *L) {
  if (lua_type(L, 1) != LUA_TTABLE || has_metatable(L, 1)) return 0;
  lua_settop(L, 1);
  luaL_checkstack(L, 30, "chat answer");
  /* L stack: data 1, choices 2, first 3, message 4 */
  if (field(L, 1, C_CHOICES) != LUA_TTABLE || has_metatable(L, 2) || lua_rawlen(L, 2) != 1) return 0;
  if (lua_rawgeti(L, 2, 1) != LUA_TTABLE || has_metatable(L, 3)) return 0;
  if (field(L, 3, C_MESSAGE) != LUA_TTABLE || has_metatable(L, 4)) return 0;
  /* 5 tool_calls, 6 content, 7 finish_reason, 8 usage, 9 service_tier */
  if (field(L, 4, C_TOOL_CALLS) != LUA_TNIL) return 0;
  int content = field(L, 4, C_CONTENT);
  if (content == LUA_TTABLE) return 0; /* (parts: content_text's) */
  field(L, 3, C_FINISH);
  int usage = field(L, 1, C_USAGE);
  field(L, 1, C_TIER);
  if (usage == LUA_TTABLE) {
    if (has_metatable(L, 8) || !push_usage(L, 8, 9)) return 0;
  } else {
    lua_pushnil(L);
  }
  /* 10 the usage | nil; r 11 */
  lua_createtable(L, 0, 13);
  int r = 11;
  field(L, 1, C_ID);
  set_field(L, r, C_ID);
  field(L, 1, C_MODEL);
  set_field(L, r, C_MODEL);
  if (content == LUA_TSTRING) lua_pushvalue(L, 6);
  else lua_pushliteral(L, "");
  set_field(L, r, C_TEXT);
  if (lua_type(L, 7) == LUA_TSTRING) lua_pushvalue(L, 7);
  else lua_pushnil(L);
  set_field(L, r, C_FINISH);
  lua_pushvalue(L, 10);
  set_field(L, r, C_USAGE);
  field(L, 4, C_REFUSAL);
  if (lua_toboolean(L, -1) && !lua_rawequal(L, -1, lua_upvalueindex(C_NULL))) set_field(L, r, C_REFUSAL);
  else lua_pop(L, 1);
  /* an answer in a field of its own (a legacy function_call, audio) */
  int other = field(L, 4, C_FUNCTION_CALL) == LUA_TTABLE || field(L, 4, C_AUDIO) == LUA_TTABLE;
  if (other) {
    lua_pushboolean(L, 1);
    set_field(L, r, C_OTHER_OUTPUT);
  }
  lua_settop(L, r);
  return 1;
}

static int chat_parser(lua_State *L) {
  lua_settop(L, 1);
  luaL_checkstack(L, C_LAST, "chat parser");
  for (int i = 0; i < C_LAST - 1; i++) lua_pushstring(L, CHAT[i]);
  lua_pushcclosure(L, chat_parse, C_LAST);
  return 1;
}

/* require "resil.core.flat_json" -> { write = flat_json, row = ledger_row } (src/lua/costs.lua),
 * pricer (policies/pricing.lua), chat_parser (policies/providers/openai.lua) */
int luaopen_resil_flat_json(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_pushcfunction(L, flat_json);
  lua_setfield(L, -2, "write");
  for (int i = 0; i < NFIELDS; i++) lua_pushstring(L, FIELDS[i]);
  for (int i = 0; i < 4; i++) lua_pushstring(L, COUNTS[i]);
  lua_pushcclosure(L, ledger_row, NFIELDS + 4);
  lua_setfield(L, -2, "row");
  lua_pushcfunction(L, pricer);
  lua_setfield(L, -2, "pricer");
  lua_pushcfunction(L, chat_parser);
  lua_setfield(L, -2, "chat_parser");
  return 1;
}
