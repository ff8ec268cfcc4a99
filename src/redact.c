/*
 * redact.c: the one routine that keeps secrets out of the text a host
 * formats (stderr messages and tracebacks, tostring of error values, log
 * lines, metric labels, `runs show`, and the check that keeps them out of the
 * store).
 *
 * Two things are redacted:
 *   - values registered as secrets (resil.secret, resil.log.redact), by
 *     value, each also in its JSON-escaped form (so a secret with a "/" is
 *     found in the store's JSON too) and percent-encoded (in a URL a script
 *     built with it). Secrets shorter than REDACT_MIN_SECRET
 *     bytes are not registered: they would redact ordinary words.
 *   - the values of URL query parameters named like credentials
 *     (?key=..., &api_key=..., &token=..., &sig=...), registered or not, and
 *     the password of a URL's user information (redis://:password@host).
 *
 * The registry belongs to the host (resil_t), in C memory: messages are
 * redacted where Lua is not at hand (resil_error, a collected task's report).
 * Each secret is found with memmem, so a line costs O(secrets x length); a
 * host holds a handful of secrets, and matches are marked in a bitmap so
 * overlapping secrets are redacted whole.
 */
#include <ctype.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "host.h"

#define REDACTED REDACT_MARK
#define REDACTED_LEN (sizeof REDACTED - 1)

struct redact_secret {
  char *value;
  size_t len;
};

/* names compared case-insensitively; the value after "=" is redacted */
static const char *const credential_params[] = {
  "key", "api_key", "apikey", "api-key", "x-api-key", "xi-api-key", "token", "access_token", "access-token",
  "refresh_token", "id_token", "auth", "auth_token", "auth-token", "authtoken", "private_token", "private-token",
  "session_token", "client_secret", "client-secret", "signature", "sig", "password", "passwd", "pwd", "secret",
  "x-amz-signature",
  "x-amz-security-token", "x-amz-credential", "x-goog-signature", "x-goog-credential", NULL};

static int add_one(resil_t *R, const char *s, size_t len) {
  for (size_t i = 0; i < R->nsecrets; i++)
    if (R->secrets[i].len == len && memcmp(R->secrets[i].value, s, len) == 0) return 0;
  if (R->nsecrets == R->cap_secrets) {
    size_t cap = R->cap_secrets ? R->cap_secrets * 2 : 8;
    redact_secret *grown = realloc(R->secrets, cap * sizeof *grown);
    if (!grown) return -1;
    R->secrets = grown;
    R->cap_secrets = cap;
  }
  char *copy = malloc(len);
  if (!copy) return -1;
  memcpy(copy, s, len);
  R->secrets[R->nsecrets].value = copy;
  R->secrets[R->nsecrets].len = len;
  R->nsecrets++;
  return 1;
}

/* The secret as cjson writes it inside a string; NULL if the same. */
static char *json_escaped(const char *s, size_t len, size_t *out_len) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    n += c == '"' || c == '\\' || c == '/' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t' ? 2
         : c < 0x20 || c == 0x7f                                                                            ? 6
                                                                                                            : 1;
  }
  if (n == len) return NULL;
  char *out = malloc(n), *o = out;
  if (!out) return NULL;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    const char *esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '/' ? "\\/" : c == '\b' ? "\\b"
                    : c == '\f' ? "\\f" : c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
    if (esc) {
      *o++ = esc[0], *o++ = esc[1];
    } else if (c < 0x20 || c == 0x7f) {
      snprintf(o, 7, "\\u%04x", c);
      o += 6;
    } else {
      *o++ = (char)c;
    }
  }
  *out_len = n;
  return out;
}

/* The secret percent-encoded as in a URL (all but RFC 3986's unreserved
 * characters), hex digits in upper or lower case; NULL if the same. */
static int is_unreserved(unsigned char c) { return isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~'; }

static char *percent_encoded(const char *s, size_t len, int lower, size_t *out_len) {
  const char *hex = lower ? "0123456789abcdef" : "0123456789ABCDEF";
  size_t n = 0;
  for (size_t i = 0; i < len; i++) n += is_unreserved((unsigned char)s[i]) ? 1 : 3;
  if (n == len) return NULL;
  char *out = malloc(n), *o = out;
  if (!out) return NULL;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (is_unreserved(c)) {
      *o++ = (char)c;
    } else {
      *o++ = '%', *o++ = hex[c >> 4], *o++ = hex[c & 15];
    }
  }
  *out_len = n;
  return out;
}

int redact_add(resil_t *R, const char *s, size_t len) {
  if (len < REDACT_MIN_SECRET) return 0;
  int added = add_one(R, s, len);
  if (added <= 0) return added;
  /* and without the whitespace around it (a .env line's trailing space, a mounted file's
   * newline): a header's value reaches the provider without it, and the key it echoes
   * did not match the value as read, and was printed */
  size_t from = 0, to = len;
  while (from < to && isspace((unsigned char)s[from])) from++;
  while (to > from && isspace((unsigned char)s[to - 1])) to--;
  if ((from > 0 || to < len) && redact_add(R, s + from, to - from) < 0) added = -1;
  /* the forms it takes in the host's text, in JSON (the store) and in a URL a script built with
   * it (an error names the URL), are found by reading the text's escapes decoded
   * (mark_secrets_escaped); but for a secret holding a backslash or a %, whose own escapes that
   * reading takes for others ("\\" for a run of backslashes, "%25" for a URL encoded twice):
   * those forms are kept as secrets of their own */
  size_t elen = 0;
  char *forms[3] = {memchr(s, '\\', len) ? json_escaped(s, len, &elen) : NULL, NULL, NULL};
  size_t lens[3] = {elen, 0, 0};
  if (memchr(s, '%', len)) {
    forms[1] = percent_encoded(s, len, 0, &lens[1]);
    forms[2] = percent_encoded(s, len, 1, &lens[2]);
  }
  for (int i = 0; i < 3; i++) {
    if (forms[i] && add_one(R, forms[i], lens[i]) < 0) added = -1;
    free(forms[i]);
  }
  return added;
}

void redact_free(resil_t *R) {
  for (size_t i = 0; i < R->nsecrets; i++) {
    explicit_bzero(R->secrets[i].value, R->secrets[i].len);
    free(R->secrets[i].value);
  }
  free(R->secrets);
  R->secrets = NULL;
  R->nsecrets = R->cap_secrets = 0;
}

/* ---------- finding what to redact ---------- */

typedef struct {
  unsigned char *bits; /* one bit per byte of the text; NULL until a match */
  size_t len;
  int failed;
} marks;

static void mark(marks *m, size_t from, size_t to) {
  if (!m->bits && !m->failed) {
    m->bits = calloc(m->len / 8 + 1, 1);
    if (!m->bits) m->failed = 1;
  }
  if (!m->bits) return;
  for (size_t i = from; i < to; i++) m->bits[i / 8] |= (unsigned char)(1u << (i % 8));
}

static int marked(const marks *m, size_t i) { return (m->bits[i / 8] >> (i % 8)) & 1; }

static int is_name_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
         c == '.';
}

/* Where a query value ends: whitespace, quotes, brackets, the next
 * parameter, or a ": " (messages read "url: why"). */
static int ends_value(const char *s, size_t len, size_t i) {
  unsigned char c = (unsigned char)s[i];
  if (c <= ' ' || c == 0x7f) return 1;
  if (strchr("&#;,\"'<>`\\(){}[]|^", c)) return 1;
  return c == ':' && (i + 1 == len || s[i + 1] == ' ');
}

static int is_credential(const char *name, size_t len) {
  for (int k = 0; credential_params[k]; k++)
    if (strlen(credential_params[k]) == len && strncasecmp(name, credential_params[k], len) == 0) return 1;
  return 0;
}

/* From each "=" (memchr: most text has none) back over the name to a
 * separator: ?name=value, &name=value, ;name=value, #name=value. */
static void mark_params(marks *m, const char *s, size_t len) {
  size_t at = 0;
  const char *p;
  while (at < len && (p = memchr(s + at, '=', len - at))) {
    size_t eq = (size_t)(p - s), name = eq;
    while (name > 0 && eq - name <= 32 && is_name_char((unsigned char)s[name - 1])) name--;
    at = eq + 1;
    if (name == eq || name == 0 || !strchr("?&;#", s[name - 1]) || !is_credential(s + name, eq - name)) continue;
    size_t end = eq + 1;
    while (end < len && !ends_value(s, len, end)) end++;
    if (end > eq + 1) mark(m, eq + 1, end);
    at = end;
  }
}

/* Whether the scheme that ends at s[end] ("...redis" before "://") is redis's */
static int is_redis_scheme(const char *s, size_t end) {
  size_t from = end;
  while (from > 0 && (isalnum((unsigned char)s[from - 1]) || strchr("+.-", s[from - 1]))) from--;
  return (end - from == 5 && strncasecmp(s + from, "redis", 5) == 0) ||
         (end - from == 6 && strncasecmp(s + from, "rediss", 6) == 0);
}

/* A redis URL's password, as the store reads it (store_redis.lua): the user
 * information runs to the URL's last "@", and is the password after its
 * first ":" (the whole of it without one). A password may hold "/", "?",
 * "#" or "@" unescaped, which the general rule below stops at, leaving the
 * rest of it. -> where the URL ends */
static size_t mark_redis_userinfo(marks *m, const char *s, size_t len, size_t start) {
  size_t end = start, last_at = 0, colon = 0;
  while (end < len && !strchr(" \t\r\n\"'<>`", s[end])) {
    if (s[end] == '@') last_at = end;
    end++;
  }
  if (!last_at) return end;
  for (size_t i = start; i < last_at && !colon; i++)
    if (s[i] == ':') colon = i;
  size_t from = colon ? colon + 1 : start;
  if (last_at > from) mark(m, from, last_at);
  return end;
}

/* a user name that reads as a token: a known token's prefix (GitHub's ghp_, GitLab's glpat-,
 * Stripe's sk_, Slack's xox), or 16 bytes or more with a digit among them (a Sentry DSN's key),
 * not a person's or a service's name (git, postgres, deploy, jane.doe) */
static int token_like(const char *s, size_t n) {
  static const char *const prefixes[] = {"ghp_", "gho_", "ghs_", "ghu_", "github_pat_", "glpat-", "sk_", "sk-", "xox"};
  for (size_t k = 0; k < sizeof prefixes / sizeof *prefixes; k++) {
    size_t p = strlen(prefixes[k]);
    if (n > p && memcmp(s, prefixes[k], p) == 0) return 1;
  }
  if (n < 16) return 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] >= '0' && s[i] <= '9') return 1;
  return 0;
}

/* scheme://user:password@host: the password; scheme://token:@host, a user name with an empty
 * password (Stripe's key), is the credential itself, and so is scheme://token@host when the user
 * name reads as a token (GitHub's https://<token>@github.com, a Sentry DSN): the user name. A
 * plain one (ssh://git@github.com, postgres://app@db) is kept */
static void mark_userinfo(marks *m, const char *s, size_t len) {
  size_t at = 0;
  const char *p;
  while (at < len && (p = memmem(s + at, len - at, "://", 3))) {
    size_t start = (size_t)(p - s) + 3, end = start, colon = 0;
    if (is_redis_scheme(s, (size_t)(p - s))) {
      end = mark_redis_userinfo(m, s, len, start);
      at = end > start ? end : start;
      continue;
    }
    while (end < len && !strchr("/?#@ \t\r\n\"'<>`", s[end])) {
      if (s[end] == ':' && !colon) colon = end;
      end++;
    }
    if (end < len && s[end] == '@' && colon && end > colon + 1) mark(m, colon + 1, end);
    else if (end < len && s[end] == '@' && (colon ? colon : end) > start &&
             (colon ? end == colon + 1 : token_like(s + start, end - start)))
      mark(m, start, colon ? colon : end);
    at = end > start ? end : start;
  }
}

static void mark_secrets(const resil_t *R, marks *m, const char *s, size_t len) {
  for (size_t k = 0; k < R->nsecrets; k++) {
    const redact_secret *sec = &R->secrets[k];
    size_t at = 0;
    const char *p;
    while (at < len && (p = memmem(s + at, len - at, sec->value, sec->len))) {
      size_t pos = (size_t)(p - s);
      mark(m, pos, pos + sec->len);
      at = pos + sec->len;
    }
  }
}

/* ---------- a secret written with escapes ---------- */

static int hex_value(unsigned char c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static long hex4(const char *s, size_t len, size_t i) {
  if (i + 4 > len) return -1;
  long v = 0;
  for (size_t k = i; k < i + 4; k++) {
    int h = hex_value((unsigned char)s[k]);
    if (h < 0) return -1;
    v = v * 16 + h;
  }
  return v;
}

/* The escape at s[i], if one: JSON's \uXXXX (a surrogate pair as one character), \/, \", \n ...
 * after one backslash or more (a body quoted in a JSON string inside another is \\u0073), or a
 * URL's %XX (%25XX: encoded twice). -> its length, the bytes it stands for in out (UTF-8), 0 if
 * s[i] is no escape */
static size_t escape_at(const char *s, size_t len, size_t i, unsigned char out[4], size_t *n) {
  size_t j = i;
  if (s[i] == '%') {
    j++;
    while (j + 3 < len && s[j] == '2' && s[j + 1] == '5' && hex_value((unsigned char)s[j + 2]) >= 0 &&
           hex_value((unsigned char)s[j + 3]) >= 0)
      j += 2;
    if (j + 2 > len || hex_value((unsigned char)s[j]) < 0 || hex_value((unsigned char)s[j + 1]) < 0) return 0;
    out[0] = (unsigned char)(hex_value((unsigned char)s[j]) * 16 + hex_value((unsigned char)s[j + 1]));
    *n = 1;
    return j + 2 - i;
  }
  if (s[i] != '\\') return 0;
  while (j < len && s[j] == '\\') j++;
  if (j == len) return 0;
  static const char simple_from[] = "/\"'bfnrt", simple_to[] = "/\"'\b\f\n\r\t";
  const char *simple = strchr(simple_from, s[j]);
  if (simple && s[j]) {
    out[0] = (unsigned char)simple_to[simple - simple_from];
    *n = 1;
    return j + 1 - i;
  }
  if (s[j] != 'u') return 0;
  long cp = hex4(s, len, j + 1);
  if (cp < 0) return 0;
  size_t end = j + 5;
  if (cp >= 0xD800 && cp < 0xDC00) { /* a high surrogate: its low one follows, after as many backslashes */
    size_t k = end;
    while (k < len && s[k] == '\\') k++;
    long lo = k > end && k < len && s[k] == 'u' ? hex4(s, len, k + 1) : -1;
    if (lo < 0xDC00 || lo > 0xDFFF) return 0;
    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    end = k + 5;
  }
  if (cp < 0x80) {
    out[0] = (unsigned char)cp, *n = 1;
  } else if (cp < 0x800) {
    out[0] = (unsigned char)(0xC0 | cp >> 6), out[1] = (unsigned char)(0x80 | (cp & 0x3F)), *n = 2;
  } else if (cp < 0x10000) {
    out[0] = (unsigned char)(0xE0 | cp >> 12), out[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    out[2] = (unsigned char)(0x80 | (cp & 0x3F)), *n = 3;
  } else {
    out[0] = (unsigned char)(0xF0 | cp >> 18), out[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F)), out[3] = (unsigned char)(0x80 | (cp & 0x3F)), *n = 4;
  }
  return end - i;
}

/* Secrets in the text read with its escapes decoded: a provider that echoes the key in its error
 * may write it "\u0073k-..." (JSON allows any character escaped), a URL may encode it in part
 * (Python's quote leaves "/" as is, so "aK3/x%2BY" is neither the secret nor its encoded form).
 * The decoded text keeps, for each of its bytes, where it came from, and a secret found there
 * marks the escapes that wrote it. Only text with an escape in it is decoded. */
static int mark_secrets_escaped(const resil_t *R, marks *m, const char *s, size_t len) {
  if (!R->nsecrets || (!memchr(s, '\\', len) && !memchr(s, '%', len)) || len >= UINT32_MAX) return 0;
  unsigned char *d = NULL;
  uint32_t *from = NULL;
  size_t dn = 0;
  for (size_t i = 0; i < len;) {
    unsigned char bytes[4];
    size_t n = 0, used = s[i] == '\\' || s[i] == '%' ? escape_at(s, len, i, bytes, &n) : 0;
    if (!used) { /* a byte as it is; a run of backslashes that starts no escape, all of it (read again
                  * from each of its backslashes, a megabyte of them took minutes) */
      size_t run = 1;
      while (s[i] == '\\' && i + run < len && s[i + run] == '\\') run++;
      if (d)
        for (size_t k = 0; k < run; k++) d[dn] = (unsigned char)s[i + k], from[dn++] = (uint32_t)(i + k);
      i += run;
      continue;
    }
    if (!d) { /* the first escape: the text before it is copied as it is */
      d = malloc(len);
      from = malloc((len + 1) * sizeof *from);
      if (!d || !from) {
        free(d), free(from);
        return -1;
      }
      for (size_t k = 0; k < i; k++) d[k] = (unsigned char)s[k], from[k] = (uint32_t)k;
      dn = i;
    }
    for (size_t k = 0; k < n; k++) d[dn] = bytes[k], from[dn++] = (uint32_t)i;
    i += used;
  }
  if (!d) return 0;
  from[dn] = (uint32_t)len;
  for (size_t k = 0; k < R->nsecrets; k++) {
    const redact_secret *sec = &R->secrets[k];
    size_t at = 0;
    const unsigned char *p;
    while (at < dn && (p = memmem(d + at, dn - at, sec->value, sec->len))) {
      size_t pos = (size_t)(p - d);
      mark(m, from[pos], from[pos + sec->len]);
      at = pos + sec->len;
    }
  }
  free(d), free(from);
  return 0;
}

int redact_text(resil_t *R, const char *s, size_t len, int what, char **out, size_t *out_len) {
  marks m = {NULL, len, 0};
  *out = NULL;
  if (what & REDACT_SECRETS) {
    mark_secrets(R, &m, s, len);
    if (mark_secrets_escaped(R, &m, s, len) < 0) m.failed = 1;
  }
  if (what & REDACT_PARAMS) {
    mark_params(&m, s, len);
    mark_userinfo(&m, s, len);
  }
  if (m.failed) return -1;
  if (!m.bits) return 0;
  size_t n = 0;
  for (size_t i = 0; i < len;) {
    if (marked(&m, i)) {
      n += REDACTED_LEN;
      while (i < len && marked(&m, i)) i++;
    } else {
      n++, i++;
    }
  }
  char *o = malloc(n + 1);
  if (!o) {
    free(m.bits);
    return -1;
  }
  *out = o;
  for (size_t i = 0; i < len;) {
    if (marked(&m, i)) {
      memcpy(o, REDACTED, REDACTED_LEN);
      o += REDACTED_LEN;
      while (i < len && marked(&m, i)) i++;
    } else {
      *o++ = s[i++];
    }
  }
  *o = '\0';
  *out_len = n;
  free(m.bits);
  return 1;
}

char *redact_strdup(resil_t *R, const char *s) {
  char *out;
  size_t n;
  int r = redact_text(R, s, strlen(s), REDACT_ALL, &out, &n);
  if (r > 0) return out;
  return r == 0 ? strdup(s) : strdup(REDACTED " (out of memory while redacting)");
}

/* L stack: -> the string at idx, redacted (the same string if nothing was) */
const char *redact_push(lua_State *L, int idx, int what) {
  size_t len;
  const char *s = lua_tolstring(L, idx, &len);
  char *out;
  size_t n;
  int r = s ? redact_text(resil_from_lua(L), s, len, what, &out, &n) : 0;
  if (r < 0) luaL_error(L, "not enough memory to redact a message");
  if (r == 0) {
    lua_pushvalue(L, idx);
    return s;
  }
  const char *pushed = lua_pushlstring(L, out, n);
  free(out);
  return pushed;
}

void redact_fprintf(resil_t *R, FILE *f, const char *fmt, ...) {
  char small[1024], *text = small;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof small) {
    text = malloc((size_t)n + 1);
    if (!text) {
      fputs(REDACTED " (out of memory while redacting)\n", f);
      return;
    }
    va_start(ap, fmt);
    vsnprintf(text, (size_t)n + 1, fmt, ap);
    va_end(ap);
  }
  char *out;
  size_t len;
  int r = redact_text(R, text, (size_t)n, REDACT_ALL, &out, &len);
  if (r > 0) fwrite(out, 1, len, f);
  else if (r == 0) fwrite(text, 1, (size_t)n, f);
  else fputs(REDACTED " (out of memory while redacting)\n", f);
  free(out);
  if (text != small) free(text);
}

/* ---------- Lua ---------- */

/* resil.redact(s [, "all" | "secrets"]) -> s with secrets (and, for "all",
 * credential query parameters) replaced by [REDACTED] */
static int l_redact(lua_State *L) {
  static const char *const modes[] = {"all", "secrets", NULL};
  luaL_checkstring(L, 1);
  int mode = luaL_checkoption(L, 2, "all", modes);
  redact_push(L, 1, mode == 0 ? REDACT_ALL : REDACT_SECRETS);
  return 1;
}

/* resil.secret(name) -> the environment variable's value, registered as a
 * secret | nil, err{kind="missing_secret"}. A value shorter than
 * REDACT_MIN_SECRET bytes is returned but not registered (with a warning):
 * redacting it would garble ordinary text. */
static int l_secret(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const char *value = getenv(name);
  if (!value || !*value) return resil_error_result(L, "missing_secret", "%s is not set in the environment", name);
  size_t len = strlen(value);
  if (redact_add(resil_from_lua(L), value, len) < 0) return luaL_error(L, "not enough memory to register a secret");
  if (len < REDACT_MIN_SECRET) {
    const char *msg = lua_pushfstring(L, "resil.secret: a value shorter than %d bytes is not redacted (too short "
                                         "to tell from ordinary text)", REDACT_MIN_SECRET);
    lua_createtable(L, 0, 1);
    lua_pushstring(L, name);
    lua_setfield(L, -2, "name");
    host_log(L, "warn", msg);
    lua_pop(L, 1);
  }
  lua_pushstring(L, value);
  return 1;
}

int luaopen_resil_redact(lua_State *L) {
  static const luaL_Reg functions[] = {{"redact", l_redact}, {"secret", l_secret}, {NULL, NULL}};
  luaL_newlib(L, functions);
  return 1;
}
