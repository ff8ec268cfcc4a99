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

/* Push a message for the value at idx and return it. A __tostring runs
 * protected on the main state: one that raises, yields, loops or returns a
 * non-string gives the type's name instead, never a panic. */
const char *resil_describe(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
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
  return lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, idx));
}

int resil_traceback(lua_State *L) {
  luaL_traceback(L, L, resil_describe(L, 1), 1);
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

static int l_error(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  const char *message = luaL_optstring(L, 2, kind);
  if (lua_istable(L, 3)) lua_pushvalue(L, 3);
  else lua_newtable(L);
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
