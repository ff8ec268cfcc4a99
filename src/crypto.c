/*
 * crypto.c: what issuing and checking secrets needs, from OpenSSL's
 * libcrypto (already linked through libcurl): never the host's fast FNV
 * hash (resil.hash), which is for fingerprints, not for secrets.
 *
 *   resil.crypto.random(n)     -> n bytes from the OS's cryptographic source (RAND_bytes)
 *   resil.crypto.sha256(s)     -> 64 hex digits
 *   resil.crypto.equal(a, b)   -> true | false, in time that does not depend on where they differ
 *   resil.crypto.base64(s)     -> s in base64 (RFC 4648, padded, one line): the embeddings the
 *                                 SDKs ask for as packed floats (a loop in Lua took ~0.3 ms a vector)
 */
#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "host.h"

static int l_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  if (n < 1 || n > 4096) return resil_raise(L, "resil.crypto.random: n must be 1 to 4096");
  unsigned char buf[4096];
  if (RAND_bytes(buf, (int)n) != 1) return luaL_error(L, "resil.crypto.random: no random bytes from OpenSSL");
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  OPENSSL_cleanse(buf, (size_t)n);
  return 1;
}

static int l_sha256(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  /* fetched and allocated once: OpenSSL 3's implicit fetch in EVP_Digest
   * cost more than the digest of a key (the gateway hashes one per request) */
  static EVP_MD *sha256;
  static EVP_MD_CTX *ctx;
  if (!sha256) sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
  if (!ctx) ctx = EVP_MD_CTX_new();
  if (!sha256 || !ctx || EVP_DigestInit_ex2(ctx, sha256, NULL) != 1 || EVP_DigestUpdate(ctx, s, len) != 1 ||
      EVP_DigestFinal_ex(ctx, md, &mdlen) != 1)
    return luaL_error(L, "resil.crypto.sha256 failed");
  static const char hex[] = "0123456789abcdef";
  char out[2 * EVP_MAX_MD_SIZE];
  for (unsigned int i = 0; i < mdlen; i++) {
    out[2 * i] = hex[md[i] >> 4];
    out[2 * i + 1] = hex[md[i] & 15];
  }
  lua_pushlstring(L, out, 2 * (size_t)mdlen);
  return 1;
}

/* Strings of different lengths differ at once (lengths are not secret
 * here: digests all have one length). */
static int l_equal(lua_State *L) {
  size_t la, lb;
  const char *a = luaL_checklstring(L, 1, &la);
  const char *b = luaL_checklstring(L, 2, &lb);
  lua_pushboolean(L, la == lb && CRYPTO_memcmp(a, b, la) == 0);
  return 1;
}

static int l_base64(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (len > (size_t)INT_MAX / 4 * 3 - 3) return resil_raise(L, "resil.crypto.base64: the string is too long");
  luaL_Buffer b;
  unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, (len + 2) / 3 * 4 + 1);
  int n = EVP_EncodeBlock(out, (const unsigned char *)s, (int)len); /* (its NUL is not pushed) */
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

static const luaL_Reg crypto_functions[] = {
  {"random", l_random}, {"sha256", l_sha256}, {"equal", l_equal}, {"base64", l_base64}, {NULL, NULL}};

int luaopen_resil_crypto(lua_State *L) {
  luaL_newlib(L, crypto_functions);
  return 1;
}
