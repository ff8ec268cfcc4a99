/*
 * metrics.c: the values of resil.metrics' series, for src/lua/metrics.lua.
 *
 * The Lua module owns the API, the label sets, the bounds on series and the
 * exposition; this file holds what each series counts and the updates of a
 * bound series (metric:labels{...}), which run on every provider attempt and
 * ledger row: a C closure over the series' cell costs a fraction of a Lua
 * method's table lookups and bucket loop.
 *
 * A value is a Lua number kept as Lua keeps it: an integer while only
 * integers were added to it (wrapping as Lua's do), a float once a float
 * was, each addition the one Lua's `+` makes, so the exposition prints what
 * it printed when the values were Lua numbers (3, not 3.0). A histogram's
 * buckets are compared with an observation as Lua's `<=` compares them (an
 * integer and a float exactly).
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "host.h"

#define CELL_MT "resil.MetricCell"
#define HISTOGRAM_MT "resil.MetricHistogram"
#define BOUNDS_MT "resil.MetricBounds"

typedef struct {
  int is_int;
  lua_Integer i;
  lua_Number f;
} number;

/* a counter's or gauge's series */
typedef struct {
  number value;
} cell;

/* a histogram's upper bounds, sorted (shared by its series) */
typedef struct {
  int n;
  number bound[];
} bounds;

/* a histogram's series: one count per bucket (the first that holds an
 * observation; cumulated when exposed), the sum and the count */
typedef struct {
  const bounds *b; /* kept alive by the series' user value */
  lua_Integer count;
  number sum;
  lua_Integer counts[];
} histogram;

static number number_at(lua_State *L, int idx) {
  number n = {0, 0, 0};
  if (lua_isinteger(L, idx)) {
    n.is_int = 1;
    n.i = lua_tointeger(L, idx);
  } else {
    n.f = lua_tonumber(L, idx);
  }
  return n;
}

static void push_number(lua_State *L, const number *n) {
  if (n->is_int) lua_pushinteger(L, n->i);
  else lua_pushnumber(L, n->f);
}

static lua_Number as_float(const number *n) { return n->is_int ? (lua_Number)n->i : n->f; }

/* *to = *to + by, as Lua's + */
static void add(number *to, const number *by) {
  if (to->is_int && by->is_int) {
    to->i = (lua_Integer)((lua_Unsigned)to->i + (lua_Unsigned)by->i);
  } else {
    to->f = as_float(to) + as_float(by);
    to->is_int = 0;
  }
}

/* *to = *to - by, as Lua's - */
static void subtract(number *to, const number *by) {
  if (to->is_int && by->is_int) {
    to->i = (lua_Integer)((lua_Unsigned)to->i - (lua_Unsigned)by->i);
  } else {
    to->f = as_float(to) - as_float(by);
    to->is_int = 0;
  }
}

/* Lua's float-to-integer conversion (luaV_flttointns): f floored (mode < 0)
 * or ceiled (mode > 0) -> 1 and *p, or 0 when out of the integers' range */
static int float_to_integer(lua_Number f, int mode, lua_Integer *p) {
  lua_Number r = mode < 0 ? floor(f) : ceil(f);
  return lua_numbertointeger(r, p);
}

/* an integer that converts to a float exactly (Lua's l_intfitsf) */
static int int_fits_float(lua_Integer i) {
  const lua_Unsigned max = (lua_Unsigned)1 << 53;
  return (lua_Unsigned)i + max <= 2 * max;
}

/* a <= b, as Lua's <= (lvm.c LEnum, LEintfloat, LEfloatint) */
static int less_equal(const number *a, const number *b) {
  if (a->is_int && b->is_int) return a->i <= b->i;
  if (!a->is_int && !b->is_int) return a->f <= b->f;
  lua_Integer fi;
  if (a->is_int) {
    if (int_fits_float(a->i)) return (lua_Number)a->i <= b->f;
    if (float_to_integer(b->f, -1, &fi)) return a->i <= fi;
    return b->f > 0;
  }
  if (int_fits_float(b->i)) return a->f <= (lua_Number)b->i;
  if (float_to_integer(a->f, 1, &fi)) return fi <= b->i;
  return !(a->f > 0);
}

static void observe(histogram *h, const number *v) {
  const bounds *b = h->b;
  for (int i = 0; i < b->n; i++) {
    if (less_equal(v, &b->bound[i])) {
      h->counts[i]++;
      break;
    }
  }
  add(&h->sum, v);
  h->count++;
}

/* the argument at idx, a number (what is not one raises as the Lua
 * module's check_number does, at the caller's line) */
static number checked_number(lua_State *L, int idx, const char *what) {
  if (lua_type(L, idx) != LUA_TNUMBER) luaL_error(L, "metrics: %s must be a number", what);
  return number_at(L, idx);
}

/* the optional increment at idx: 1 when absent, nil or false (Lua's `n or 1`) */
static number increment_at(lua_State *L, int idx) {
  if (!lua_toboolean(L, idx)) return (number){1, 1, 0};
  return checked_number(L, idx, "the increment");
}

/* ---------- a bound series' methods: closures over its cell ---------- */

#define UPVALUE_CELL(L) ((cell *)lua_touserdata(L, lua_upvalueindex(1)))

/* counter series:inc([n]) */
static int bound_counter_inc(lua_State *L) {
  number n = increment_at(L, 2);
  if (n.is_int ? n.i < 0 : !(n.f >= 0)) luaL_error(L, "metrics: a counter only goes up");
  add(&UPVALUE_CELL(L)->value, &n);
  return 0;
}

/* gauge series:inc([n]), :dec([n]), :set(v) */
static int bound_gauge_inc(lua_State *L) {
  number n = increment_at(L, 2);
  add(&UPVALUE_CELL(L)->value, &n);
  return 0;
}

static int bound_gauge_dec(lua_State *L) {
  number n = increment_at(L, 2);
  subtract(&UPVALUE_CELL(L)->value, &n);
  return 0;
}

static int bound_gauge_set(lua_State *L) {
  UPVALUE_CELL(L)->value = checked_number(L, 2, "the value");
  return 0;
}

/* histogram series:observe(v) */
static int bound_observe(lua_State *L) {
  number v = checked_number(L, 2, "the observation");
  observe(lua_touserdata(L, lua_upvalueindex(1)), &v);
  return 0;
}

/* ---------- for the Lua module ---------- */

/* cell() -> a new series of a counter or gauge, at 0 */
static int l_cell(lua_State *L) {
  cell *c = lua_newuserdatauv(L, sizeof *c, 0);
  c->value = (number){1, 0, 0};
  luaL_setmetatable(L, CELL_MT);
  return 1;
}

/* add(cell, n): n a number the caller checked */
static int l_add(lua_State *L) {
  cell *c = luaL_checkudata(L, 1, CELL_MT);
  number n = checked_number(L, 2, "the increment");
  add(&c->value, &n);
  return 0;
}

/* set(cell, v) */
static int l_set(lua_State *L) {
  cell *c = luaL_checkudata(L, 1, CELL_MT);
  c->value = checked_number(L, 2, "the value");
  return 0;
}

/* get(cell) -> its value */
static int l_get(lua_State *L) {
  push_number(L, &((cell *)luaL_checkudata(L, 1, CELL_MT))->value);
  return 1;
}

/* bounds({b1, b2, ...}) -> a histogram's upper bounds (sorted by the caller) */
static int l_bounds(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 1);
  if (n < 0 || n > 10000) return luaL_error(L, "resil.metrics.histogram: too many buckets");
  bounds *b = lua_newuserdatauv(L, sizeof *b + (size_t)n * sizeof(number), 0);
  b->n = (int)n;
  for (int i = 0; i < b->n; i++) {
    if (lua_rawgeti(L, 1, i + 1) != LUA_TNUMBER) return luaL_error(L, "resil.metrics.histogram: a bucket is not a number");
    b->bound[i] = number_at(L, -1);
    lua_pop(L, 1);
  }
  luaL_setmetatable(L, BOUNDS_MT);
  return 1;
}

/* histogram(bounds) -> a new series of a histogram, with no observation */
static int l_histogram(lua_State *L) {
  const bounds *b = luaL_checkudata(L, 1, BOUNDS_MT);
  histogram *h = lua_newuserdatauv(L, sizeof *h + (size_t)b->n * sizeof(lua_Integer), 1);
  h->b = b;
  h->count = 0;
  h->sum = (number){1, 0, 0};
  memset(h->counts, 0, (size_t)b->n * sizeof(lua_Integer));
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  luaL_setmetatable(L, HISTOGRAM_MT);
  return 1;
}

/* observe(histogram, v) */
static int l_observe(lua_State *L) {
  histogram *h = luaL_checkudata(L, 1, HISTOGRAM_MT);
  number v = checked_number(L, 2, "the observation");
  observe(h, &v);
  return 0;
}

/* read(histogram) -> count, sum, {count of each bucket} */
static int l_read(lua_State *L) {
  histogram *h = luaL_checkudata(L, 1, HISTOGRAM_MT);
  lua_pushinteger(L, h->count);
  push_number(L, &h->sum);
  lua_createtable(L, h->b->n, 0);
  for (int i = 0; i < h->b->n; i++) {
    lua_pushinteger(L, h->counts[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 3;
}

/* counter_inc(cell) -> a bound counter series' inc */
static int l_counter_inc(lua_State *L) {
  luaL_checkudata(L, 1, CELL_MT);
  lua_settop(L, 1);
  lua_pushcclosure(L, bound_counter_inc, 1);
  return 1;
}

/* gauge_methods(cell) -> a bound gauge series' inc, dec, set */
static int l_gauge_methods(lua_State *L) {
  luaL_checkudata(L, 1, CELL_MT);
  lua_settop(L, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, bound_gauge_inc, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, bound_gauge_dec, 1);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, bound_gauge_set, 1);
  return 3;
}

/* observer(histogram) -> a bound histogram series' observe */
static int l_observer(lua_State *L) {
  luaL_checkudata(L, 1, HISTOGRAM_MT);
  lua_settop(L, 1);
  lua_pushcclosure(L, bound_observe, 1);
  return 1;
}

/* ---------- a ledger row's series (src/lua/costs.lua) ----------
 *
 * The series one provider, model and operation's rows count in: the USD
 * counter (slot 0) and, for each token field (input_tokens, prompt_tokens,
 * output_tokens, completion_tokens: slots 1-4), its tokens counter and usage
 * histogram. Each is bound on its first use, by the Lua module (a series
 * exists once bound: one never needed is never shown), from a bound series'
 * own methods; one past the metric's bound counts nothing. A row is then one
 * call, not five method calls and their lookups. */
#define ROW_MT "resil.MetricRow"
#define ROW_SLOTS 5

typedef struct {
  int bound[ROW_SLOTS]; /* 0: not yet; 1: bound (a past-the-bound series: NULL pointers) */
  cell *counter[ROW_SLOTS];
  histogram *usage[ROW_SLOTS]; /* (slot 0 has none) */
} row_series;

/* row_series() -> a row's series, none bound (their cells are kept as its user values) */
static int l_row_series(lua_State *L) {
  row_series *r = lua_newuserdatauv(L, sizeof *r, 2 * ROW_SLOTS);
  memset(r, 0, sizeof *r);
  luaL_setmetatable(L, ROW_MT);
  return 1;
}

/* the series under a bound method at idx (of kind fn), kept as user value uv of the row at 1 | NULL
 * (a past-the-bound series' method, a Lua function) */
static void *bound_series(lua_State *L, int idx, lua_CFunction fn, int uv) {
  if (lua_tocfunction(L, idx) != fn || !lua_getupvalue(L, idx, 1)) return NULL;
  void *series = lua_touserdata(L, -1);
  lua_setiuservalue(L, 1, uv);
  return series;
}

/* row_bind(row, slot, counter_inc [, usage_observe]): a slot's series, from its bound methods */
static int l_row_bind(lua_State *L) {
  row_series *r = luaL_checkudata(L, 1, ROW_MT);
  lua_Integer slot = luaL_checkinteger(L, 2);
  luaL_argcheck(L, slot >= 0 && slot < ROW_SLOTS, 2, "no such slot");
  r->counter[slot] = bound_series(L, 3, bound_counter_inc, 1 + 2 * (int)slot);
  r->usage[slot] = slot > 0 ? bound_series(L, 4, bound_observe, 2 + 2 * (int)slot) : NULL;
  r->bound[slot] = 1;
  return 0;
}

/* a token count as the Lua module counted one: a number from 0 up (NaN, a string: not counted) */
static int is_count(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TNUMBER) return 0;
  return lua_isinteger(L, idx) ? lua_tointeger(L, idx) >= 0 : lua_tonumber(L, idx) >= 0;
}

/* row_observe(row, usd, input, prompt, output, completion): the row counted, usd (a number from 0
 * up, or nil: not counted here) in slot 0 and each count in its slot's counter and histogram
 * -> nothing | the first slot it needs that is not bound yet (then nothing is counted) */
static int l_row_observe(lua_State *L) {
  row_series *r = luaL_checkudata(L, 1, ROW_MT);
  int counted[ROW_SLOTS];
  counted[0] = !lua_isnil(L, 2);
  for (int slot = 1; slot < ROW_SLOTS; slot++) counted[slot] = is_count(L, 2 + slot);
  for (int slot = 0; slot < ROW_SLOTS; slot++) {
    if (counted[slot] && !r->bound[slot]) {
      lua_pushinteger(L, slot);
      return 1;
    }
  }
  for (int slot = 0; slot < ROW_SLOTS; slot++) {
    if (!counted[slot]) continue;
    number n = checked_number(L, 2 + slot, "the increment");
    if (r->counter[slot]) add(&r->counter[slot]->value, &n);
    if (r->usage[slot]) observe(r->usage[slot], &n);
  }
  return 0;
}

/* find(known, labels) -> the series known for a label set of one or two
 * string values, or nothing. src/lua/metrics.lua remembers them: known[2]
 * [name][value] for one label, known[3][name1][value1][name2][value2] (in
 * both orders) for two. known[1] is the count of secrets their keys were
 * made under: once another is registered, nothing is found until the Lua
 * module starts them over. */
static int l_find(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_rawgeti(L, 1, 1) != LUA_TNUMBER || lua_tointeger(L, -1) != (lua_Integer)resil_from_lua(L)->nsecrets)
    return 0;
  if (lua_type(L, 2) != LUA_TTABLE || lua_getmetatable(L, 2)) return 0;
  lua_settop(L, 2);
  lua_pushnil(L);
  if (!lua_next(L, 2) || lua_type(L, 4) != LUA_TSTRING) return 0; /* 3: name1, 4: value1 */
  lua_pushvalue(L, 3);
  if (!lua_next(L, 2)) {
    if (lua_rawgeti(L, 1, 2) != LUA_TTABLE) return 0;
    lua_pushvalue(L, 3);
    if (lua_rawget(L, -2) != LUA_TTABLE) return 0;
    lua_pushvalue(L, 4);
    lua_rawget(L, -2);
    return 1;
  }
  if (lua_type(L, 6) != LUA_TSTRING) return 0; /* 5: name2, 6: value2 */
  lua_pushvalue(L, 5);
  if (lua_next(L, 2)) return 0; /* a third label */
  if (lua_rawgeti(L, 1, 3) != LUA_TTABLE) return 0;
  for (int i = 3; i <= 5; i++) {
    lua_pushvalue(L, i);
    if (lua_rawget(L, -2) != LUA_TTABLE) return 0;
  }
  lua_pushvalue(L, 6);
  lua_rawget(L, -2);
  return 1;
}

/* secrets() -> how many secrets the host redacts (it only grows): a label
 * key made before one was registered may hold it unredacted */
static int l_secrets(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)resil_from_lua(L)->nsecrets);
  return 1;
}

/* list(dir) -> the names in a folder (a gateway's workers' metrics files,
 * merged at a scrape), | nil, err */
static int l_list(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  DIR *d = opendir(path);
  if (!d) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  lua_newtable(L);
  lua_Integer n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.') lua_pushstring(L, e->d_name), lua_rawseti(L, -2, ++n);
  closedir(d);
  return 1;
}

/* require "resil.core.metrics" (src/lua/metrics.lua owns resil.metrics) */
int luaopen_resil_metrics(lua_State *L) {
  luaL_newmetatable(L, CELL_MT);
  luaL_newmetatable(L, HISTOGRAM_MT);
  luaL_newmetatable(L, BOUNDS_MT);
  luaL_newmetatable(L, ROW_MT);
  lua_pop(L, 4);
  static const luaL_Reg functions[] = {
    {"cell", l_cell},       {"add", l_add},         {"set", l_set},
    {"get", l_get},         {"bounds", l_bounds},   {"histogram", l_histogram},
    {"observe", l_observe}, {"read", l_read},       {"counter_inc", l_counter_inc},
    {"gauge_methods", l_gauge_methods},             {"observer", l_observer},
    {"row_series", l_row_series},                   {"row_bind", l_row_bind},
    {"row_observe", l_row_observe},
    {"find", l_find},       {"secrets", l_secrets},   {"list", l_list},
    {NULL, NULL}};
  luaL_newlib(L, functions);
  return 1;
}
