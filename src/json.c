/*
 * json.c: resil.json, from lua-cjson. Each host gets its own cjson instances
 * (cjson keeps its configuration per instance, never in a C global).
 *
 * encode raises on values JSON cannot hold (a function, a cyclic table):
 * that is misuse. decode returns nil, err on bad input: that is the world.
 *
 * Exact both ways, where Debian's cjson (2.1.0) is not: it reads `[]` and
 * `{}` alike as an empty table and writes `{}` (a tool's `"required": []`
 * went upstream as `{}`, which the provider refuses), and it reads every
 * number as a double and writes it with at most 14 digits (a seed or an id
 * past 1e14 came out changed). So:
 *
 *   decode: an empty array is an empty table with json.array_mt; an
 *           integer of more than 14 digits is read by Lua (an integer when
 *           it fits, else the nearest double). A number with a fraction or
 *           an exponent cjson reads as Lua would: strtod's nearest double.
 *   encode: a table with json.array_mt is an array ([] when empty); an
 *           integer from 1e14 up, and a float that %.14g would change,
 *           are written exactly.
 *
 * Both by the same means: before cjson sees them, such values are swapped
 * for marker strings (a NUL, "rj", a random tag of this host, a kind), and
 * swapped back after. The text is looked at first (may_need_marks), so a
 * body without any costs a quick pass over its bytes (decode) or one over
 * its values (encode). The same walk finds short whole numbers, which the
 * layer writes for cjson (its %.14g is slow): see walk_table.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "host.h"

extern int luaopen_cjson(lua_State *L);
extern int luaopen_cjson_safe(lua_State *L);

/* The nesting both ways, cjson's and this layer's walks (cjson's own default is 1000). Each
 * level costs cjson some 100 bytes of the C stack, a walk's here as much: at 1000, JSON from
 * outside (a resil_call's arguments, a provider's body) nested 999 deep overflowed the 64 KiB
 * stack of a thread the README allows a host, and took the program down. 200 levels (Lua's own
 * limit on nested C calls) take some 22 KiB, and leave the rest of 64 KiB to the host. */
#define MAX_DEPTH 200
#define EXACT_DIGITS 14  /* what cjson writes (%.14g) */
#define TAG_LEN 16 /* hex digits: 64 random bits, never shown */

/* upvalues of encode and decode */
enum { UP_CJSON = 1, UP_ARRAY_MT, UP_MARKER, UP_SWAP_MARKERS };

/* the marker's head as cjson writes it ("\u0000rj" + tag) and as Lua holds it */
typedef struct {
  char text[6 + 2 + TAG_LEN + 1];
  char raw[1 + 2 + TAG_LEN + 1];
} marker;

/* made once per host (json_open): every decode looks for it */
static void marker_make(marker *m, const char *tag) {
  snprintf(m->text, sizeof m->text, "\\u0000rj%s", tag);
  m->raw[0] = '\0';
  snprintf(m->raw + 1, sizeof m->raw - 1, "rj%s", tag);
}

static const marker *marker_of(lua_State *L) { return lua_touserdata(L, lua_upvalueindex(UP_MARKER)); }
#define RAW_LEN (1 + 2 + TAG_LEN)

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
static int is_number_char(char c) {
  return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}

/* the length of the JSON number at s (RFC 8259's grammar: -?int frac? exp?),
 * or 0 if the run of number characters there is not exactly one: such text
 * is left to cjson, which refuses it */
static size_t json_number_len(const char *s, size_t n) {
  size_t i = 0;
  if (i < n && s[i] == '-') i++;
  if (i < n && s[i] == '0') i++;
  else if (i < n && s[i] >= '1' && s[i] <= '9') while (i < n && s[i] >= '0' && s[i] <= '9') i++;
  else return 0;
  if (i < n && s[i] == '.') {
    size_t d = ++i;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == d) return 0;
  }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    i++;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    size_t d = i;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == d) return 0;
  }
  return i == n ? n : 0;
}

/* significant digits of a JSON number's mantissa (leading zeros aside) */
static int significant_digits(const char *s, size_t n) {
  int digits = 0, leading = 1;
  for (size_t i = 0; i < n && s[i] != 'e' && s[i] != 'E'; i++) {
    if (s[i] < '0' || s[i] > '9') continue;
    if (leading && s[i] == '0') continue;
    leading = 0;
    digits++;
  }
  return digits;
}

/* a JSON number written as an integer (no fraction, no exponent): cjson reads
 * it as a double, which past 2^53 is not it, and below that not an integer.
 * One with a fraction or an exponent cjson reads with strtod, the nearest
 * double, as Lua does: it is left to cjson (an embeddings answer is millions
 * of them, each marked and read back cost a microsecond). */
static int is_integer_text(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] == '.' || s[i] == 'e' || s[i] == 'E') return 0;
  return 1;
}

/* text -> pushes it with what cjson would lose swapped for markers; -> 1 if
 * anything was swapped (else pushes nothing and returns 0) */
static int mark_text(lua_State *L, const char *s, size_t len, const marker *m) {
  luaL_Buffer b;
  size_t from = 0; /* bytes before it are in b */
  int changed = 0;
  for (size_t i = 0; i < len;) {
    char c = s[i];
    if (c == '"') { /* to its closing quote: one not escaped by an odd run of backslashes */
      const char *q = s + i;
      for (;;) {
        q = memchr(q + 1, '"', len - (size_t)(q + 1 - s));
        if (!q) break; /* unterminated: cjson's error */
        size_t slashes = 0;
        while (q - slashes - 1 > s + i && q[-(ptrdiff_t)slashes - 1] == '\\') slashes++;
        if (slashes % 2 == 0) break;
      }
      i = q ? (size_t)(q - s) + 1 : len;
      continue;
    }
    size_t end = i + 1;
    const char *kind = NULL;
    if (c == '[') {
      while (end < len && is_ws(s[end])) end++;
      if (end < len && s[end] == ']') kind = "[", end++;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      while (end < len && is_number_char(s[end])) end++;
      if (json_number_len(s + i, end - i) && is_integer_text(s + i, end - i) &&
          significant_digits(s + i, end - i) > EXACT_DIGITS)
        kind = "#";
    }
    if (!kind) {
      i = end;
      continue;
    }
    if (!changed) luaL_buffinit(L, &b), changed = 1;
    luaL_addlstring(&b, s + from, i - from);
    luaL_addchar(&b, '"');
    luaL_addstring(&b, m->text);
    luaL_addstring(&b, kind);
    if (*kind == '#') luaL_addlstring(&b, s + i, end - i);
    luaL_addchar(&b, '"');
    from = i = end;
  }
  if (!changed) return 0;
  luaL_addlstring(&b, s + from, len - from);
  luaL_pushresult(&b);
  return 1;
}

/* could mark_text swap anything in the text? A cheaper look that never says
 * no where it would: an empty array is a ']' after a '[' and blanks, and an
 * integer of more than 14 digits is a run of 15 or more digits without a
 * dot or an exponent, which holds all 8 bytes of some block at an offset
 * that is a multiple of 8 (looked at 8 bytes at a time) */
static int is_digit_or_dot(char c) { return (c >= '0' && c <= '9') || c == '.'; }
static int may_need_marks(const char *s, size_t len) {
  for (const char *p = s; (p = memchr(p, ']', len - (size_t)(p - s))) != NULL; p++) {
    const char *q = p;
    while (q > s && is_ws(q[-1])) q--;
    if (q > s && q[-1] == '[') return 1;
  }
  const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
  for (size_t i = 0; i + 8 <= len;) {
    uint64_t x;
    memcpy(&x, s + i, 8);
    /* (bytes all from '.' to '9': none below, none above) */
    if (((x - ones * '.') & ~x & highs) || (((x + ones * (127 - '9')) | x) & highs)) {
      i += 8;
      continue;
    }
    size_t from = i, to = i;
    while (to < i + 8 && is_digit_or_dot(s[to])) to++;
    if (to < i + 8) { /* (a '/') */
      i += 8;
      continue;
    }
    while (from > 0 && is_digit_or_dot(s[from - 1])) from--;
    while (to < len && is_digit_or_dot(s[to])) to++;
    /* (a run with a dot, or before an exponent, is a float's: cjson's) */
    if (to - from > EXACT_DIGITS && !memchr(s + from, '.', to - from) && !(to < len && (s[to] == 'e' || s[to] == 'E')))
      return 1;
    i = (to + 7) / 8 * 8;
  }
  return 0;
}

/* the value at the top, a marker string -> replaced by what it stands for */
static void unmark_value(lua_State *L, const marker *m) {
  size_t n;
  const char *s = lua_tolstring(L, -1, &n);
  if (n < RAW_LEN + 1 || memcmp(s, m->raw, RAW_LEN) != 0) return;
  if (s[RAW_LEN] == '[' && n == RAW_LEN + 1) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, lua_upvalueindex(UP_ARRAY_MT));
    lua_setmetatable(L, -2);
  } else if (s[RAW_LEN] == '#') {
    lua_pushlstring(L, s + RAW_LEN + 1, n - RAW_LEN - 1);
    if (lua_stringtonumber(L, lua_tostring(L, -1)) != 0) {
      lua_replace(L, -3);
      lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
    }
  }
}

/* the table at the top: markers below it swapped back, in place */
static void unmark_table(lua_State *L, const marker *m, int depth) {
  if (depth > MAX_DEPTH) return;
  luaL_checkstack(L, 4, "json: too deep");
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -1) == LUA_TSTRING) {
      unmark_value(L, m);
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4); /* (an existing key: allowed during lua_next) */
    } else {
      if (lua_type(L, -1) == LUA_TTABLE) unmark_table(L, m, depth + 1);
      lua_pop(L, 1);
    }
  }
}

/* json.decode(text) -> value | nil, err (kind invalid_json). A NUL byte is
 * none of JSON's (in a string it is written \u0000), and cjson reads one as
 * the text's end: what followed it was dropped unread ('{"a":1}\0anything'
 * decoded), and one inside a string was "unexpected end of string". */
static int json_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  const char *nul = memchr(s, '\0', len);
  if (nul)
    return resil_error_result(L, "invalid_json",
                              "a NUL byte at character %d: JSON holds none (in a string it is written \\u0000)",
                              (int)(nul - s) + 1);
  const marker *m = marker_of(L);
  lua_settop(L, 1);
  int marked = may_need_marks(s, len) && mark_text(L, s, len, m);
  lua_getfield(L, lua_upvalueindex(UP_CJSON), "decode");
  lua_pushvalue(L, marked ? 2 : 1);
  lua_call(L, 1, 2);
  if (lua_isnil(L, -2)) {
    const char *why = lua_tostring(L, -1);
    long where;
    /* (cjson's "Found too many nested data structures (201) at character 201" named no limit) */
    if (why && sscanf(why, "Found too many nested data structures (%*d) at character %ld", &where) == 1)
      return resil_error_result(L, "invalid_json", "too many nested arrays and objects: more than %d levels at character %ld",
                                MAX_DEPTH, where);
    return resil_error_result(L, "invalid_json", "%s", why ? why : "invalid JSON");
  }
  lua_pop(L, 1);
  if (marked) {
    if (lua_type(L, -1) == LUA_TSTRING) unmark_value(L, m);
    else if (lua_type(L, -1) == LUA_TTABLE) unmark_table(L, m, 1);
  }
  return 1;
}

/* a number cjson would write otherwise than exactly */
static int needs_exact(lua_State *L, int idx) {
  if (lua_isinteger(L, idx)) {
    lua_Integer i = lua_tointeger(L, idx);
    return i >= 100000000000000LL || i <= -100000000000000LL;
  }
  double x = lua_tonumber(L, idx);
  if (!isfinite(x)) return 0; /* (cjson's own error) */
  if (x == floor(x) && fabs(x) < 1e14) return 0; /* a whole number: %.14g writes it all */
  char buf[32];
  snprintf(buf, sizeof buf, "%.14g", x);
  return strtod(buf, NULL) != x;
}

static int is_array_mt(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) return 0;
  int same = lua_rawequal(L, -1, lua_upvalueindex(UP_ARRAY_MT));
  lua_pop(L, 1);
  return same;
}

/* does the value at idx hold anything cjson would write otherwise? visits:
 * at most MAX_VISITS values in all (a table that holds itself twice would
 * take 2^1000; past it cjson finds the cycle itself) */
#define MAX_VISITS 10000000L
static int needs_marks(lua_State *L, int idx, int depth, long *visits) {
  int t = lua_type(L, idx);
  if (t == LUA_TNUMBER) return needs_exact(L, idx);
  if (t != LUA_TTABLE || depth > MAX_DEPTH || ++*visits > MAX_VISITS) return 0;
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 3, "json: too deep");
  if (is_array_mt(L, idx)) {
    lua_pushnil(L);
    if (!lua_next(L, idx)) return 1; /* an empty array */
    lua_pop(L, 2);
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (needs_marks(L, -1, depth + 1, visits)) {
      lua_pop(L, 2);
      return 1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* the number at idx that needs_exact says cjson would change -> its exact
 * text in buf: an integer's digits, or the shortest that reads back the same */
static size_t exact_text(lua_State *L, int idx, char buf[32]) {
  if (lua_isinteger(L, idx)) return (size_t)snprintf(buf, 32, LUA_INTEGER_FMT, lua_tointeger(L, idx));
  double x = lua_tonumber(L, idx);
  int n = 0;
  for (int digits = EXACT_DIGITS + 1; digits < 17; digits++) {
    n = snprintf(buf, 32, "%.*g", digits, x);
    if (strtod(buf, NULL) == x) return (size_t)n;
  }
  return (size_t)snprintf(buf, 32, "%.17g", x); /* (17 digits always read back the same double) */
}

/* The number at idx as json.encode writes it -> its length in buf: an integer's digits, a float as
 * cjson writes it (%.14g) where that reads back the same, else its shortest exact text. For
 * src/log.c, which writes a log line's flat fields itself. */
static size_t integer_text(lua_Integer i, char buf[32]) {
  char digits[24];
  size_t n = sizeof digits;
  lua_Unsigned u = i < 0 ? 0u - (lua_Unsigned)i : (lua_Unsigned)i;
  do {
    digits[--n] = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  if (i < 0) digits[--n] = '-';
  memcpy(buf, digits + n, sizeof digits - n);
  return sizeof digits - n;
}
/* x as %.14g writes it when x is a decimal of at most 6 places, 1e-6 <= |x| < 1e8 (a duration in
 * ms to the microsecond, a cost in dollars to the micro-dollar): x is then r / 10^d correctly
 * rounded, for the fewest places d, and %.14g writes r's digits (at most 14), which strtod reads
 * back as x: with its point d places from the right, or below 1e-4 as its exponent form
 * ("1.2e-05"). A snprintf and a strtod, some 2k instructions a number, for a few multiplications.
 * -> its length | 0 (not such a number) */
static size_t short_decimal_text(double x, char buf[32]) {
  static const double scale[] = {1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6};
  double a = fabs(x);
  if (!(a >= 1e-6 && a < 1e8)) return 0;
  for (int d = 1; d <= 6; d++) {
    double r = floor(a * scale[d] + 0.5);
    if (r / scale[d] != a) continue;
    /* (d the fewest: r's last digit is not 0, which %.14g would have trimmed) */
    uint64_t whole = (uint64_t)r, unit = (uint64_t)scale[d];
    size_t n = 0;
    if (x < 0) buf[n++] = '-';
    if (a < 1e-4) { /* r < 100: "Ne-0X" or "N.Me-0X" */
      int k = whole >= 10 ? 2 : 1;
      buf[n++] = (char)('0' + (k == 2 ? whole / 10 : whole));
      if (k == 2) buf[n++] = '.', buf[n++] = (char)('0' + whole % 10);
      int e = d - (k - 1);
      memcpy(buf + n, "e-0", 3);
      buf[n + 3] = (char)('0' + e);
      return n + 4;
    }
    char frac[8];
    uint64_t f = whole % unit;
    for (int i = d - 1; i >= 0; i--, f /= 10) frac[i] = (char)('0' + f % 10);
    n += integer_text((lua_Integer)(whole / unit), buf + n);
    buf[n++] = '.';
    memcpy(buf + n, frac, (size_t)d);
    return n + (size_t)d;
  }
  return 0;
}

size_t json_number_text(lua_State *L, int idx, char buf[32]) {
  if (lua_isinteger(L, idx)) return integer_text(lua_tointeger(L, idx), buf);
  double x = lua_tonumber(L, idx);
  /* a whole number below 1e14: %.14g writes its digits (-0 as "-0") */
  if (x == floor(x) && fabs(x) < 1e14) {
    if (x == 0) return signbit(x) ? (memcpy(buf, "-0", 2), 2) : (buf[0] = '0', 1);
    return integer_text((lua_Integer)x, buf);
  }
  size_t n = short_decimal_text(x, buf);
  if (n) return n;
  /* (one %.14g and its read back: needs_exact's, its text kept) */
  n = (size_t)snprintf(buf, 32, "%.14g", x);
  if (!isfinite(x) || strtod(buf, NULL) == x) return n;
  return exact_text(L, idx, buf);
}

/* pushes the value at idx with such values swapped for markers (tables
 * copied; a copy shares nothing cjson could see twice) */
static void push_marked(lua_State *L, int idx, const marker *m, int depth) {
  int t = lua_type(L, idx);
  idx = lua_absindex(L, idx);
  if (t == LUA_TNUMBER && needs_exact(L, idx)) {
    char buf[RAW_LEN + 1 + 32]; /* one string: the number's text alone was interned as one more */
    memcpy(buf, m->raw, RAW_LEN);
    buf[RAW_LEN] = '#';
    size_t n = exact_text(L, idx, buf + RAW_LEN + 1);
    lua_pushlstring(L, buf, RAW_LEN + 1 + n);
    return;
  }
  if (t != LUA_TTABLE) {
    lua_pushvalue(L, idx);
    return;
  }
  /* (as cjson says it: a table that holds itself would take 2^depth copies) */
  if (depth > MAX_DEPTH) luaL_error(L, "Cannot serialise, excessive nesting (%d)", depth);
  luaL_checkstack(L, 4, "json: too deep");
  lua_pushnil(L);
  if (!lua_next(L, idx)) {
    if (is_array_mt(L, idx)) {
      lua_pushlstring(L, m->raw, RAW_LEN);
      lua_pushliteral(L, "[");
      lua_concat(L, 2);
    } else {
      lua_newtable(L);
    }
    return;
  }
  lua_pop(L, 2);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    push_marked(L, -1, m, depth + 1);
    lua_remove(L, -2);
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
}

/* A value is written by cjson from the caller's own tables, but its numbers
 * need not be: cjson writes each with snprintf("%.14g"), some 2k
 * instructions, where the same digits are written here for a few hundred
 * (whole numbers below 1e14, by hand). Each such number is swapped in its
 * table, for the length of cjson's encode, for a marker that says where it
 * was found ("$" and the number of its group, below: made once per host and
 * kept), then swapped back. That costs a copy of cjson's text, more than one
 * number saves: a value with fewer than SWAPS_MIN of them is left to cjson as
 * it is. What cjson would write otherwise (a number %.14g changes, an empty
 * array) is swapped the same way, however few: its exact text, or "[]",
 * goes in for the marker. (They were written from a copy of the whole value
 * with each swapped for a marker: a Redis store's entry, whose time needs
 * 17 digits, cost some 60k instructions a gateway request so.)
 *
 * The walk leaves on the stack, from its base, groups of four slots: a
 * value's key, the value, its marker and its table (a swap), or a nested
 * table's key, the table and two nils (kept so that the key can be pushed
 * again). Markers are all found before the first swap: what can fail (an
 * allocation) fails while every table is as the caller left it. */
#define SWAPS_MIN 2
#define GC_LENT_KB (1 << 30) /* a TiB: more than any encode's text */
#define GROUPS_MAX 1024 /* past it, the way of before: cjson writes the numbers */
enum { WALK_SWAPS, WALK_COPY, WALK_PLAIN, WALK_GIVE_UP };
enum { NUMBER_LEFT, NUMBER_SWAPPED, NUMBER_EXACT };

typedef struct {
  long visits; /* tables, as needs_marks counts them */
  int base;  /* the first group's slot */
  int top;   /* the last group's last slot */
  int swaps; /* values to swap */
  int must;  /* of them, those cjson would write otherwise: swapped however few */
} walk;

/* a whole number below 1e14 (%.14g writes its digits, -0.0 as "-0")? */
static int is_short_whole(lua_State *L, int idx) {
  if (lua_isinteger(L, idx)) {
    lua_Integer i = lua_tointeger(L, idx);
    return i < 100000000000000LL && i > -100000000000000LL;
  }
  double x = lua_tonumber(L, idx);
  return x == floor(x) && fabs(x) < 1e14;
}

/* the short whole number at idx -> its digits as %.14g writes them, in buf */
static size_t short_whole_text(lua_State *L, int idx, char buf[24]) {
  lua_Integer i;
  int negative;
  if (lua_isinteger(L, idx)) {
    i = lua_tointeger(L, idx);
    negative = i < 0;
  } else {
    double x = lua_tonumber(L, idx);
    i = (lua_Integer)x;
    negative = signbit(x);
  }
  char *d = buf + 24;
  unsigned long long u = i < 0 ? 0ULL - (unsigned long long)i : (unsigned long long)i;
  do *--d = (char)('0' + u % 10); while (u /= 10);
  if (negative) *--d = '-';
  size_t n = (size_t)(buf + 24 - d);
  memmove(buf, d, n);
  return n;
}

/* the number at idx -> NUMBER_*: swapped, exact (swapped, however few), or
 * left to cjson (NaN, inf: its error; a float that %.14g writes exactly) */
static int number_kind(lua_State *L, int idx) {
  if (is_short_whole(L, idx)) return NUMBER_SWAPPED;
  return needs_exact(L, idx) ? NUMBER_EXACT : NUMBER_LEFT;
}

/* is the text at q (a '"') the head of a marker push_marked or a swap
 * makes: "[" alone, "#" and a number's characters, or (with w) "$" and the
 * number of a swap's group? -> its closing quote, else NULL */
static const char *marker_at(const char *q, const char *end, const marker *m, size_t head, const walk *w) {
  if ((size_t)(end - q) <= head + 2 || memcmp(q + 1, m->text, head) != 0) return NULL;
  const char *v = q + 1 + head, *close = memchr(v, '"', (size_t)(end - v));
  if (!close) return NULL;
  if (*v == '[') return close == v + 1 ? close : NULL;
  if (*v == '$') {
    if (!w || close == v + 1 || close - v > 8) return NULL;
    for (const char *c = v + 1; c < close; c++) if (*c < '0' || *c > '9') return NULL;
    return close;
  }
  if (*v != '#' || close == v + 1) return NULL;
  for (const char *c = v + 1; c < close; c++) if (!is_number_char(*c)) return NULL;
  return close;
}

/* cjson's text -> pushes it with each marker string replaced by its value
 * (the numbers of w's swaps, when w). A marker starts `"\u0000`: the
 * backslashes are looked for (memchr), which are fewer than quotes */
static void unmark_text(lua_State *L, const char *s, size_t len, const marker *m, const walk *w) {
  size_t head = strlen(m->text);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  const char *from = s, *p = s, *end = s + len; /* from: bytes before it are in b */
  while (p < end) {
    const char *slash = memchr(p, '\\', (size_t)(end - p));
    if (!slash) break;
    const char *q = slash - 1, *close = q >= from && *q == '"' ? marker_at(q, end, m, head, w) : NULL;
    const char *v = q + 1 + head;
    int g = 0;
    if (close && *v == '$') {
      for (const char *c = v + 1; c < close; c++) g = 10 * g + (*c - '0'); /* (digits: marker_at) */
      g = w->base + 4 * g;
      if (g + 3 > w->top || lua_type(L, g + 1) != LUA_TNUMBER || lua_type(L, g + 3) != LUA_TTABLE) close = NULL;
    }
    if (!close) {
      p = slash + 1;
      continue;
    }
    luaL_addlstring(&b, from, (size_t)(q - from));
    if (*v == '[') {
      luaL_addstring(&b, "[]");
    } else if (*v == '$') {
      char digits[32];
      luaL_addlstring(&b, digits, is_short_whole(L, g + 1) ? short_whole_text(L, g + 1, digits)
                                                           : exact_text(L, g + 1, digits));
    } else {
      luaL_addlstring(&b, v + 1, (size_t)(close - v - 1));
    }
    from = p = close + 1;
  }
  luaL_addlstring(&b, from, (size_t)(end - from));
  luaL_pushresult(&b);
}

/* pushes the marker of the swap in group g (from base) */
static void push_swap_marker(lua_State *L, int g, const marker *m) {
  if (lua_rawgeti(L, lua_upvalueindex(UP_SWAP_MARKERS), g) == LUA_TSTRING) return;
  lua_pop(L, 1);
  char buf[RAW_LEN + 16];
  memcpy(buf, m->raw, RAW_LEN);
  int n = snprintf(buf + RAW_LEN, sizeof buf - RAW_LEN, "$%d", g);
  lua_pushlstring(L, buf, RAW_LEN + (size_t)n);
  lua_pushvalue(L, -1);
  lua_rawseti(L, lua_upvalueindex(UP_SWAP_MARKERS), g);
}

static int is_empty_array(lua_State *L, int idx) {
  if (!is_array_mt(L, idx)) return 0;
  lua_pushnil(L);
  if (!lua_next(L, idx < 0 ? idx - 1 : idx)) return 1;
  lua_pop(L, 2);
  return 0;
}

/* the table at t -> WALK_* (its groups pushed) */
static int walk_table(lua_State *L, int t, int depth, walk *w, const marker *m) {
  if (++w->visits > MAX_VISITS) return WALK_PLAIN; /* (needs_marks' answer too) */
  if (is_array_mt(L, t)) {
    lua_pushnil(L);
    if (!lua_next(L, t)) return WALK_COPY; /* an empty array */
    lua_pop(L, 2);
  }
  lua_pushnil(L);
  while (lua_next(L, t)) { /* (the key on top after each value) */
    int type = lua_type(L, -1);
    if (type == LUA_TNUMBER) {
      int kind = number_kind(L, -1);
      if (kind == NUMBER_LEFT) {
        lua_pop(L, 1);
        continue;
      }
      if ((lua_gettop(L) - w->base) / 4 >= GROUPS_MAX || !lua_checkstack(L, 4)) return WALK_GIVE_UP;
      lua_pushnil(L); /* (its marker, when it is swapped) */
      lua_pushvalue(L, t);
      lua_pushvalue(L, -4);
      w->swaps++;
      w->must += kind == NUMBER_EXACT;
    } else if (type == LUA_TTABLE && is_empty_array(L, -1)) {
      if ((lua_gettop(L) - w->base) / 4 >= GROUPS_MAX || !lua_checkstack(L, 4)) return WALK_GIVE_UP;
      char text[RAW_LEN + 1];
      memcpy(text, m->raw, RAW_LEN);
      text[RAW_LEN] = '[';
      lua_pushlstring(L, text, sizeof text); /* its marker: "[]" goes in for it */
      lua_pushvalue(L, t);
      lua_pushvalue(L, -4);
      w->swaps++;
      w->must++;
    } else if (type == LUA_TTABLE && depth < MAX_DEPTH) {
      if ((lua_gettop(L) - w->base) / 4 >= GROUPS_MAX || !lua_checkstack(L, 6)) return WALK_GIVE_UP;
      lua_pushnil(L);
      lua_pushnil(L);
      int group = lua_gettop(L) - 3;
      int found = walk_table(L, group + 1, depth + 1, w, m);
      if (found != WALK_SWAPS) return found;
      if (lua_gettop(L) == group + 3) lua_settop(L, group); /* nothing to swap below: the key alone */
      else lua_pushvalue(L, group);
    } else {
      lua_pop(L, 1);
    }
  }
  return WALK_SWAPS;
}

/* each swap of w: its marker in (back = 0) or its value back (back = 1) */
static void swap_values(lua_State *L, const walk *w, int back) {
  if (!back) {
    /* first the values as they are now, to put back: the walk's markers were allocations, and
     * a collection step they made ran finalizers that may have written them since (the swap
     * back wrote the walk's value over theirs); all read before any marker goes in, as a table
     * met twice (two groups, one key) would read the other's marker */
    for (int g = w->base; g + 3 <= w->top; g += 4) {
      if (lua_type(L, g + 3) != LUA_TTABLE) continue; /* (a nested table's group) */
      lua_pushvalue(L, g);
      lua_rawget(L, g + 3);
      lua_replace(L, g + 1);
    }
  }
  for (int g = w->base; g + 3 <= w->top; g += 4) {
    if (lua_type(L, g + 3) != LUA_TTABLE) continue;
    if (!back && lua_isnil(L, g + 1)) continue; /* gone since the walk: it stays gone */
    lua_pushvalue(L, g);
    lua_pushvalue(L, back ? g + 1 : g + 2);
    lua_rawset(L, g + 3); /* (a key the table has, or nil for one it lost: nothing is allocated) */
  }
}

/* cjson's error (a string) raised again with the caller's file:line, as luaL_error
 * would name it: cjson raises from under this C function, which named no line
 * ("Cannot serialise number: must not be NaN or Inf", wherever the NaN was).
 * Not for the host's own modules' calls: they say what failed themselves. */
static int raise_at_caller(lua_State *L, int status) {
  lua_Debug ar;
  if (status == LUA_ERRRUN && lua_type(L, -1) == LUA_TSTRING && lua_getstack(L, 1, &ar) &&
      lua_getinfo(L, "Sl", &ar) && ar.currentline > 0 && strncmp(ar.source, "=[resil", 7) != 0) {
    luaL_where(L, 1);
    lua_insert(L, -2);
    lua_concat(L, 2);
  }
  return lua_error(L);
}

/* cjson writes its text in memory of its own (malloc), past the Lua state's
 * cap, and ends the process when that fails ("Out of memory", exit 255): a
 * table that holds one table twice, nested 20 deep, is a text of 2^20 times
 * that table's, and a script under --max-memory 32M (a sandboxed one too)
 * took gigabytes and then the whole process with it. A text that cannot fit
 * the cap can never be the result, so under a cap the value is measured
 * first: the least cjson writes for each value (a string's bytes and its
 * quotes, a key's, one byte a number, two a table), against the room the cap
 * leaves. Past it, one full collection (garbage cjson's text would have had
 * reclaimed), then the cap's own error, as the result's allocation would
 * have raised it. Stops at cjson's depth (a table that holds itself: cjson's
 * error comes first). No walk without a cap. */
typedef struct {
  resil_t *R;
  size_t least, room;
  int collected;
} text_size;

static void text_needs(lua_State *L, text_size *ts, size_t bytes) {
  ts->least += bytes;
  if (ts->least <= ts->room) return;
  if (!ts->collected) {
    ts->collected = 1;
    lua_gc(L, LUA_GCCOLLECT);
    ts->room = ts->R->mem_limit > ts->R->mem_used ? ts->R->mem_limit - ts->R->mem_used : 0;
    if (ts->least <= ts->room) return;
  }
  lua_newuserdatauv(L, ts->least, 0); /* (refused by the cap: its error, at the caller's line) */
  lua_pop(L, 1);
  ts->room = ts->least; /* (it fit after all: the cap moved) */
}

/* -> 0 past cjson's depth (it raises there itself) */
static int text_measure(lua_State *L, int idx, int depth, text_size *ts) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING: text_needs(L, ts, lua_rawlen(L, idx) + 2); return 1;
  case LUA_TTABLE: break;
  default: text_needs(L, ts, 1); return 1;
  }
  if (depth > MAX_DEPTH || !lua_checkstack(L, 3)) return 0;
  idx = lua_absindex(L, idx);
  text_needs(L, ts, 2);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) == LUA_TSTRING) text_needs(L, ts, lua_rawlen(L, -2) + 3);
    if (!text_measure(L, -1, depth + 1, ts)) {
      lua_pop(L, 2);
      return 0;
    }
    lua_pop(L, 1);
  }
  return 1;
}

/* json.encode(value) -> text (raises on what JSON cannot hold) */
static int json_encode(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  resil_t *R = resil_from_lua(L);
  if (R->mem_limit && (R->current || R->host_L) && lua_type(L, 1) == LUA_TTABLE) {
    text_size ts = { R, 0, R->mem_limit > R->mem_used ? R->mem_limit - R->mem_used : 0, 0 };
    text_measure(L, 1, 1, &ts);
  }
  lua_getfield(L, lua_upvalueindex(UP_CJSON), "encode");
  const marker *m = marker_of(L);
  walk w = { 0, 3, 0, 0, 0 };
  int found = lua_type(L, 1) == LUA_TTABLE ? walk_table(L, 1, 1, &w, m) : WALK_GIVE_UP;
  if (found == WALK_SWAPS && (w.swaps >= SWAPS_MIN || w.must > 0)) {
    w.top = lua_gettop(L);
    for (int g = w.base; g + 3 <= w.top; g += 4) {
      if (lua_type(L, g + 1) != LUA_TNUMBER) continue;
      push_swap_marker(L, (g - w.base) / 4, m);
      lua_replace(L, g + 2);
    }
    /* No collection step while the markers are in: cjson's text is an
     * allocation, and the step it triggered ran finalizers that read the
     * markers (and wrote where the swap back then wrote over). The step is
     * put off, not stopped: the collector's debt is lent for the encode
     * and paid back after (a stop and restart reset it: a minor collection
     * after every encode). Not while stopped, or inside a finalizer (-1). */
    int put_off = lua_gc(L, LUA_GCISRUNNING) == 1;
    if (put_off) lua_gc(L, LUA_GCSTEP, -GC_LENT_KB);
    swap_values(L, &w, 0);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 1);
    int status = lua_pcall(L, 1, 1, 0);
    swap_values(L, &w, 1);
    if (put_off) lua_gc(L, LUA_GCSTEP, GC_LENT_KB); /* (the step now, if one is due) */
    if (status != LUA_OK) return raise_at_caller(L, status);
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    unmark_text(L, s, len, m, &w);
    return 1;
  }
  lua_settop(L, 2);
  long visits = 0;
  if (found == WALK_SWAPS || found == WALK_PLAIN || !needs_marks(L, 1, 1, &visits) || visits > MAX_VISITS) {
    lua_pushvalue(L, 1);
    int status = lua_pcall(L, 1, 1, 0);
    if (status != LUA_OK) return raise_at_caller(L, status);
    return 1;
  }
  push_marked(L, 1, m, 1);
  int status = lua_pcall(L, 1, 1, 0);
  if (status != LUA_OK) return raise_at_caller(L, status);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  unmark_text(L, s, len, m, NULL);
  return 1;
}

/* resil.json.utf8(s) -> s, or a copy with each byte that is not part of a character as U+FFFD:
 * JSON is UTF-8 (RFC 8259 8.1), and cjson writes any byte as it is */
static int json_utf8(lua_State *L) {
  utf8_push_valid(L, 1, NULL);
  return 1;
}

/* -> the host's one resil.json (its array_mt and tag are the same for every
 * caller: resil.json and the HTTP client's json = body) */
int luaopen_resil_json(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, "resil.json") == LUA_TTABLE) return 1;
  lua_pop(L, 1);
  lua_newtable(L);
  int module = lua_gettop(L);
  lua_pushvalue(L, module);
  lua_setfield(L, LUA_REGISTRYINDEX, "resil.json");
  luaL_requiref(L, "cjson", luaopen_cjson, 0);
  int cjson = lua_gettop(L);
  lua_getfield(L, -1, "encode_sparse_array");
  lua_pushboolean(L, 1); /* a very sparse array becomes an object instead of an error */
  lua_call(L, 1, 0);
  lua_getfield(L, -1, "encode_max_depth");
  lua_pushinteger(L, MAX_DEPTH);
  lua_call(L, 1, 0);
  lua_getfield(L, -1, "null");
  lua_setfield(L, module, "null");
  luaL_requiref(L, "cjson.safe", luaopen_cjson_safe, 0);
  int safe = lua_gettop(L);
  lua_getfield(L, -1, "decode_max_depth");
  lua_pushinteger(L, MAX_DEPTH);
  lua_call(L, 1, 0);

  lua_newtable(L); /* json.array_mt: a table that is a list, empty or not */
  lua_pushliteral(L, "array");
  lua_setfield(L, -2, "__name");
  lua_pushvalue(L, -1);
  lua_setfield(L, module, "array_mt");
  int array_mt = lua_gettop(L);

  unsigned char raw[TAG_LEN / 2];
  char tag[TAG_LEN + 1];
  if (RAND_bytes(raw, sizeof raw) != 1) memset(raw, 0x5a, sizeof raw);
  for (size_t i = 0; i < sizeof raw; i++) snprintf(tag + 2 * i, 3, "%02x", raw[i]);

  marker_make(lua_newuserdatauv(L, sizeof(marker), 0), tag);
  int mark = lua_gettop(L);

  lua_pushvalue(L, cjson);
  lua_pushvalue(L, array_mt);
  lua_pushvalue(L, mark);
  lua_newtable(L); /* the swaps' markers, by group */
  lua_pushcclosure(L, json_encode, 4);
  lua_setfield(L, module, "encode");
  lua_pushvalue(L, safe);
  lua_pushvalue(L, array_mt);
  lua_pushvalue(L, mark);
  lua_pushcclosure(L, json_decode, 3);
  lua_setfield(L, module, "decode");
  lua_pushcfunction(L, json_utf8);
  lua_setfield(L, module, "utf8");
  lua_pushinteger(L, MAX_DEPTH);
  lua_setfield(L, module, "max_depth");
  lua_settop(L, module);
  return 1;
}
