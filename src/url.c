/*
 * url.c: resil.url, the pieces of a URL a handler or a store reads, decoded
 * by libevent's evhttp_uridecode (the server's own decoder), not by a
 * pattern per caller.
 *
 *   resil.url.unescape(s [, plus]) -> s percent-decoded ("%41" is "A", "%00"
 *       a NUL); a "%" without two hex digits is kept as written; plus = true:
 *       "+" is a space too (a query string's form encoding)
 *   resil.url.query(q) -> { name = value } of "a=1&b=2" (each side decoded,
 *       "+" a space; a pair without "=" is a name whose value is ""; the
 *       last of a name given twice; empty pairs skipped)
 */
#include <stdlib.h>
#include <string.h>

#include <event2/http.h>

#include "host.h"

/* pushes s[0..len) decoded (plus: "+" is a space) */
static void push_decoded(lua_State *L, const char *s, size_t len, int plus) {
  /* (evhttp_uridecode reads a C string: a NUL in the text, written raw, ends it. Such a
   * piece is decoded up to the NUL, the NUL kept, and the rest decoded on its own) */
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  while (len > 0) {
    size_t piece = strnlen(s, len);
    char *raw = malloc(piece + 1);
    if (!raw) luaL_error(L, "resil.url: out of memory");
    memcpy(raw, s, piece);
    raw[piece] = '\0';
    size_t out_len = 0;
    char *out = evhttp_uridecode(raw, plus, &out_len);
    free(raw);
    if (!out) luaL_error(L, "resil.url: out of memory");
    luaL_addlstring(&b, out, out_len);
    free(out);
    s += piece;
    len -= piece;
    if (len > 0) { /* the NUL itself */
      luaL_addchar(&b, '\0');
      s++;
      len--;
    }
  }
  luaL_pushresult(&b);
}

static int l_unescape(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  push_decoded(L, s, len, lua_toboolean(L, 2));
  return 1;
}

static int l_query(lua_State *L) {
  size_t len = 0;
  const char *q = lua_isnoneornil(L, 1) ? "" : luaL_checklstring(L, 1, &len);
  const char *end = q + len;
  lua_newtable(L);
  while (q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *pair_end = amp ? amp : end;
    if (pair_end > q) {
      const char *eq = memchr(q, '=', (size_t)(pair_end - q));
      push_decoded(L, q, (size_t)((eq ? eq : pair_end) - q), 1);
      if (eq) push_decoded(L, eq + 1, (size_t)(pair_end - eq - 1), 1);
      else lua_pushliteral(L, "");
      lua_rawset(L, -3);
    }
    q = amp ? amp + 1 : end;
  }
  return 1;
}

static const luaL_Reg url_functions[] = {{"unescape", l_unescape}, {"query", l_query}, {NULL, NULL}};

int luaopen_resil_url(lua_State *L) {
  luaL_newlib(L, url_functions);
  return 1;
}
