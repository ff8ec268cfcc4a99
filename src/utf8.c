/*
 * utf8.c: UTF-8 checked and made valid, for what must be UTF-8 (JSON between systems, RFC 8259
 * 8.1): a request body the server refuses, a provider's text the gateway passes on, a log line.
 * Each byte that is not part of a valid sequence (overlong forms, surrogates and code points
 * past U+10FFFF too) counts, and is written as U+FFFD.
 */
#include <stdint.h>
#include <string.h>

#include "host.h"

/* A body's first byte that is not UTF-8 (RFC 3629: no overlong form, no
 * surrogate, nothing past U+10FFFF) -> its offset, or len when it all is.
 * JSON between systems is UTF-8 (RFC 8259 8.1), and cjson takes any byte
 * in a string: a body that is not went to the provider as it came, which
 * refused it after the gateway had admitted, reserved and sent it. ASCII
 * (most of a body) 32 bytes, then 8, a step: 0.55 instructions a byte by
 * callgrind (341 for a 531-byte chat body, 4,371 for 8 KB). */
size_t utf8_invalid_at(const unsigned char *s, size_t len) {
  const uint64_t high = 0x8080808080808080ULL;
  size_t i = 0;
  while (i < len) {
    uint64_t w[4];
    for (; len - i >= 32; i += 32) {
      memcpy(w, s + i, sizeof w);
      if ((w[0] | w[1] | w[2] | w[3]) & high) break;
    }
    for (; len - i >= 8; i += 8) {
      memcpy(w, s + i, 8);
      if (w[0] & high) break;
    }
    if (i == len) break;
    unsigned char c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t n; /* continuation bytes */
    unsigned char lo = 0x80, hi = 0xBF; /* the second byte's range (RFC 3629 4) */
    if (c >= 0xC2 && c <= 0xDF) n = 1;
    else if (c >= 0xE0 && c <= 0xEF) n = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) n = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return i;
    if (len - i <= n || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k <= n; k++)
      if ((s[i + k] & 0xC0) != 0x80) return i;
    i += n + 1;
  }
  return len;
}

/* L stack: -> the string at idx as it is, when UTF-8 (nearly all text: one scan, no copy), or a
 * copy with each byte that is not part of a character as U+FFFD */
const char *utf8_push_valid(lua_State *L, int idx, size_t *out_len) {
  size_t len;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, idx, &len);
  size_t at = utf8_invalid_at(s, len);
  if (at == len) {
    lua_pushvalue(L, idx);
    if (out_len) *out_len = len;
    return (const char *)s;
  }
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  size_t from = 0;
  while (at < len) {
    luaL_addlstring(&b, (const char *)s + from, at - from);
    luaL_addstring(&b, "\xEF\xBF\xBD");
    from = at + 1;
    at = from + utf8_invalid_at(s + from, len - from);
  }
  luaL_addlstring(&b, (const char *)s + from, len - from);
  luaL_pushresult(&b);
  return lua_tolstring(L, -1, out_len);
}
