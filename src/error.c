/*
 * error.c: error values and messages, the bottom layer every primitive uses.
 *
 * Trouble from the world is an error value, {kind=, message=, ...} with a
 * __tostring (resil_push_error, resil_error_result, resil.error); misuse
 * raises a message located at the user's line (resil_raise). Every message
 * is redacted (redact.c), and any value becomes a message through
 * resil_describe, which never raises.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "host.h"

#define ERROR_MT "resil.Error"

static int tostring_unprotected(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* A __tostring runs outside every task (a failed task's error, after it
 * ended) and outside the caps: one that looped hung the process for good,
 * the watchdog (tasks only) and --max-instructions never stopping it. It
 * gets DESCRIBE_MAX instructions; past them every instruction raises (a
 * pcall inside it cannot swallow that). */
#define DESCRIBE_MAX 10000000
void describe_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, describe_hook, LUA_MASKCOUNT, 1);
  luaL_error(L, "__tostring ran more than %d instructions", DESCRIBE_MAX);
}

/* A table raised as an error (error({code = 1})) without a __tostring: its fields as JSON, so a
 * report says what it held, not "(error object is a table value)". Bounded: DESCRIBE_TEXT bytes
 * in all ("..." at the cut), DESCRIBE_DEPTH levels, a string's first DESCRIBE_STRING bytes; what
 * JSON has no value for is its type's name as a string. Raw reads only (lua_next): no
 * metamethod runs, nothing is allocated but the result. */
#define DESCRIBE_TEXT 1024
#define DESCRIBE_DEPTH 3
#define DESCRIBE_STRING 200
typedef struct {
  char text[DESCRIBE_TEXT + 4];
  size_t n;
  int cut;
} describe_buf;

static void describe_add(describe_buf *d, const char *s, size_t n) {
  if (d->cut) return;
  if (d->n + n > DESCRIBE_TEXT) {
    n = DESCRIBE_TEXT - d->n;
    d->cut = 1;
  }
  memcpy(d->text + d->n, s, n);
  d->n += n;
  if (d->cut) memcpy(d->text + d->n, "...", 3), d->n += 3;
}
static void describe_adds(describe_buf *d, const char *s) { describe_add(d, s, strlen(s)); }

static void describe_add_string(describe_buf *d, const char *s, size_t n) {
  size_t shown = n > DESCRIBE_STRING ? DESCRIBE_STRING : n;
  describe_adds(d, "\"");
  for (size_t i = 0; i < shown && !d->cut; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[8];
    if (c == '"' || c == '\\') {
      esc[0] = '\\', esc[1] = (char)c;
      describe_add(d, esc, 2);
    } else if (c < 0x20 || c == 0x7f) {
      snprintf(esc, sizeof esc, "\\u%04x", c);
      describe_adds(d, esc);
    } else {
      describe_add(d, (const char *)&s[i], 1);
    }
  }
  if (shown < n) describe_adds(d, "...");
  describe_adds(d, "\"");
}

static void describe_add_number(describe_buf *d, lua_State *L, int idx, int quoted) {
  char num[64];
  if (lua_isinteger(L, idx)) {
    snprintf(num, sizeof num, quoted ? "\"" LUA_INTEGER_FMT "\"" : LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
  } else {
    double v = (double)lua_tonumber(L, idx);
    if (v != v || v > 1.79e308 || v < -1.79e308) quoted = 1; /* (nan, inf: no JSON number) */
    snprintf(num, sizeof num, quoted ? "\"%.14g\"" : "%.14g", v);
  }
  describe_adds(d, num);
}

/* A field whose name says it holds a credential (a request's headers raised with the error, a
 * config's api_key) is written as the redaction mark: the report goes to logs and terminals, and
 * redaction finds only registered secrets and URL parameters, not a JSON field's value. The one
 * list for both reports: this one and a step's stored error (runs.lua, private.sensitive_field). */
int resil_sensitive_field(const char *name, size_t n) {
  /* (and a service account's private_key, a client's auth = "user:pass", credentials, a passphrase) */
  static const char *const parts[] = {"authoriz", "cookie", "api_key", "api-key", "apikey", "secret", "passw",
                                      "signature", "private_key", "private-key", "privatekey", "credential",
                                      "passphrase", NULL};
  for (int i = 0; parts[i]; i++)
    if (strcasestr(name, parts[i])) return 1;
  if (strcasecmp(name, "auth") == 0) return 1; /* (not author) */
  return n >= 5 && strcasecmp(name + n - 5, "token") == 0; /* (access_token; not max_tokens, a count) */
}

/* private.sensitive_field(name) -> whether a field of that name is written redacted */
int resil_l_sensitive_field(lua_State *L) {
  size_t n;
  const char *name = luaL_checklstring(L, 1, &n);
  lua_pushboolean(L, resil_sensitive_field(name, n));
  return 1;
}

static void describe_add_value(lua_State *L, describe_buf *d, int idx, int depth) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL: describe_adds(d, "null"); break;
  case LUA_TBOOLEAN: describe_adds(d, lua_toboolean(L, idx) ? "true" : "false"); break;
  case LUA_TNUMBER: describe_add_number(d, L, idx, 0); break;
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    describe_add_string(d, s, n);
    break;
  }
  case LUA_TTABLE: {
    if (depth >= DESCRIBE_DEPTH) {
      describe_adds(d, "{...}");
      break;
    }
    describe_adds(d, "{");
    int first = 1;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      if (d->cut) {
        lua_pop(L, 2);
        break;
      }
      if (!first) describe_adds(d, ",");
      first = 0;
      int sensitive = 0;
      if (lua_type(L, -2) == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, -2, &n);
        describe_add_string(d, s, n);
        sensitive = resil_sensitive_field(s, n);
      } else if (lua_type(L, -2) == LUA_TNUMBER) {
        describe_add_number(d, L, lua_absindex(L, -2), 1); /* (lua_tolstring would change the key lua_next needs) */
      } else {
        describe_adds(d, "\"");
        describe_adds(d, luaL_typename(L, -2));
        describe_adds(d, "\"");
      }
      describe_adds(d, ":");
      if (sensitive) describe_adds(d, "\"" REDACT_MARK "\"");
      else describe_add_value(L, d, lua_absindex(L, -1), depth + 1);
      lua_pop(L, 1);
    }
    describe_adds(d, "}");
    break;
  }
  default: /* a function, a userdata, a thread: its type's name, JSON having none of them */
    describe_adds(d, "\"");
    describe_adds(d, luaL_typename(L, idx));
    describe_adds(d, "\"");
  }
}

/* A table raised has no position (error() adds one to a string only): msg after the line it was
 * raised at, in the first frame from `level` on outside the host's own Lua, when there is one
 * (L's stack is where it was raised: a message handler's, or a coroutine's that died of it) */
static const char *describe_where(lua_State *L, int idx, int level, const char *msg) {
  if (luaL_getmetafield(L, idx, "__tostring") != LUA_TNIL) {
    lua_pop(L, 1);
    return msg;
  }
  /* (raised in a step's fn: where, as the step noted it before raising it again, runs.lua) */
  int value = lua_absindex(L, idx);
  if (lua_getfield(L, LUA_REGISTRYINDEX, "resil.raised_at") == LUA_TTABLE) {
    lua_pushvalue(L, value);
    if (lua_rawget(L, -2) == LUA_TSTRING) {
      const char *where = lua_pushfstring(L, "%s: %s", lua_tostring(L, -1), msg);
      lua_replace(L, -3); /* (one value pushed, as below: the table and its entry go) */
      lua_pop(L, 1);
      return where;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_Debug ar;
  for (; lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "Sl", &ar);
    if (ar.currentline > 0 && strncmp(ar.source, "=[resil", 7) != 0) {
      return lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, msg);
    }
  }
  return msg;
}

/* Push a message for the value at idx and return it. A __tostring runs
 * protected on the main state: one that raises, yields, loops or returns a
 * non-string gives the type's name instead, never a panic. */
const char *resil_describe(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (lua_type(L, idx) == LUA_TSTRING && strlen(s) < len) {
      /* a NUL in it as \0: the message ended there (resil_error, the logs), the rest of it unsaid */
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (size_t i = 0; i < len; i++) {
        if (s[i]) luaL_addchar(&b, s[i]);
        else luaL_addstring(&b, "\\0");
      }
      luaL_pushresult(&b);
      return lua_tostring(L, -1);
    }
    lua_pushvalue(L, idx);
    return lua_tostring(L, -1);
  }
  lua_State *main = resil_from_lua(L)->L;
  if (luaL_getmetafield(L, idx, "__tostring") != LUA_TNIL) {
    lua_pop(L, 1);
    lua_pushcfunction(main, tostring_unprotected);
    lua_pushvalue(L, idx);
    lua_xmove(L, main, 1);
    lua_Hook hook = lua_gethook(main); /* (a cap's, when this is host_pcall's message handler) */
    int mask = lua_gethookmask(main), count = lua_gethookcount(main);
    lua_sethook(main, describe_hook, LUA_MASKCOUNT, DESCRIBE_MAX);
    int status = lua_pcall(main, 1, 1, 0);
    lua_sethook(main, hook, mask, count);
    if (status == LUA_OK && lua_type(main, -1) == LUA_TSTRING) {
      lua_xmove(main, L, 1);
      return lua_tostring(L, -1);
    }
    lua_pop(main, 1);
    return lua_pushfstring(L, "(error object is a %s value; its __tostring failed)", luaL_typename(L, idx));
  }
  if (lua_type(L, idx) == LUA_TTABLE && lua_checkstack(L, 3 * DESCRIBE_DEPTH + 8)) {
    describe_buf d;
    d.n = 0, d.cut = 0;
    describe_add_value(L, &d, idx, 0);
    const char *msg = lua_pushlstring(L, d.text, d.n);
    /* (a task's coroutine that died of it keeps its stack: loop.c describes its error so) */
    if (lua_status(L) == LUA_ERRRUN) {
      int at = lua_gettop(L);
      msg = describe_where(L, idx, 0, msg);
      if (lua_gettop(L) > at) lua_remove(L, at); /* (one value pushed, as always) */
    }
    return msg;
  }
  return lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
}

int resil_traceback(lua_State *L) {
  const char *msg = resil_describe(L, 1);
  if (lua_status(L) == LUA_OK && lua_type(L, 1) == LUA_TTABLE) msg = describe_where(L, 1, 1, msg);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Raise a misuse error located at the user's line: frames of the host's own
 * Lua (the prelude, the mock) and C frames are skipped. */
int resil_raise(lua_State *L, const char *fmt, ...) {
  lua_Debug ar;
  int located = 0;
  for (int level = 1; lua_getstack(L, level, &ar); level++) {
    lua_getinfo(L, "Sl", &ar);
    if (ar.currentline > 0 && strncmp(ar.source, "=[resil", 7) != 0) {
      lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
      located = 1;
      break;
    }
  }
  if (!located) lua_pushliteral(L, "");
  char message[1024]; /* printf formats, unlike lua_pushfstring */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(message, sizeof message, fmt, ap);
  va_end(ap);
  lua_pushstring(L, message);
  lua_concat(L, 2);
  redact_push(L, -1, REDACT_ALL); /* "bad url 'https://...?key=...'" */
  return lua_error(L);
}

static int error_tostring(lua_State *L) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_getfield(L, 1, "kind");
  luaL_addvalue(&b);
  luaL_addstring(&b, ": ");
  lua_getfield(L, 1, "message");
  if (lua_isnil(L, -1)) lua_pop(L, 1);
  else luaL_addvalue(&b);
  lua_getfield(L, 1, "status");
  if (lua_isinteger(L, -1)) {
    lua_pushfstring(L, " (status %d)", (int)lua_tointeger(L, -1));
    lua_remove(L, -2);
    luaL_addvalue(&b);
  } else {
    lua_pop(L, 1);
  }
  luaL_pushresult(&b);
  redact_push(L, -1, REDACT_ALL); /* fields set after creation may hold a secret */
  return 1;
}

static void push_error_va(lua_State *L, const char *kind, const char *fmt, va_list ap) {
  lua_createtable(L, 0, 3);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  char message[1024]; /* printf formats, unlike lua_pushfstring */
  vsnprintf(message, sizeof message, fmt, ap);
  lua_pushstring(L, message);
  redact_push(L, -1, REDACT_ALL); /* a URL with ?key= in the message */
  lua_setfield(L, -3, "message");
  lua_pop(L, 1);
  luaL_setmetatable(L, ERROR_MT);
}

void resil_push_error(lua_State *L, const char *kind, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  push_error_va(L, kind, fmt, ap);
  va_end(ap);
}

int resil_error_result(lua_State *L, const char *kind, const char *fmt, ...) {
  va_list ap;
  lua_pushnil(L);
  va_start(ap, fmt);
  push_error_va(L, kind, fmt, ap);
  va_end(ap);
  return 2;
}

/* resil.error(kind [, message [, fields]]): fields are copied, not taken:
 * the table itself became the error, so a table of fields kept and given
 * again (local RETRY = {retryable = true}) made every such error one table,
 * each new one rewriting the kind and message of those before it. Fields
 * that are no table were ignored without a word. */
static int l_error(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  const char *message = luaL_optstring(L, 2, kind);
  if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
    return resil_raise(L, "resil.error: fields must be a table, got %s", luaL_typename(L, 3));
  lua_newtable(L);
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, message);
  redact_push(L, -1, REDACT_ALL); /* an error's message never carries a secret */
  lua_setfield(L, -3, "message");
  lua_pop(L, 1);
  luaL_setmetatable(L, ERROR_MT);
  return 1;
}

static int l_is_error(lua_State *L) {
  int is = 0;
  if (lua_getmetatable(L, 1)) {
    luaL_getmetatable(L, ERROR_MT);
    is = lua_rawequal(L, -1, -2);
  }
  lua_pushboolean(L, is);
  return 1;
}

/* The error metatable, and resil.error / resil.is_error. */
int luaopen_resil_error(lua_State *L) {
  luaL_newmetatable(L, ERROR_MT);
  lua_pushcfunction(L, error_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, l_error);
  lua_setfield(L, -2, "error");
  lua_pushcfunction(L, l_is_error);
  lua_setfield(L, -2, "is_error");
  return 1;
}
