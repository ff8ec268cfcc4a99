/* hooks_back.c: Lua's hooks turned back on for a thread that an error
 * raised from a hook ended, before its <close> handlers run.
 *
 * luaD_hook clears a thread's `allowhook` while its hook runs and sets it
 * again when the hook returns. A guard's hook that raises (the instruction
 * cap, the watchdog's stop) never returns, and unless a pcall inside the
 * thread catches the error (luaD_pcall restores the flag) the thread is left
 * with its hooks off for good: lua_resetthread then ran its pending <close>
 * handlers with no hook at all, and one that looped was never stopped
 * (--max-instructions alone ran it for good; an embedder waited for good).
 *
 * Lua 5.4 has no API for the flag. It is the byte after `status` at the head
 * of every lua_State (lstate.h, since 5.4.0: CommonHeader, then status, then
 * allowhook). That layout is checked once against the library the host runs
 * with, by a thread made to meet each case; if the library does not behave as
 * the layout says, nothing is ever written and the handlers run as before. */
#include <stdatomic.h>
#include <stddef.h>

#include <lauxlib.h>
#include <lua.h>

#include "host.h"

/* CommonHeader: a GCObject pointer, then the type and mark bytes */
#define STATUS_AT (sizeof(void *) + 2)
#define ALLOWHOOK_AT (STATUS_AT + 1)

/* (one for the process: it describes the Lua library linked in, which every host shares) */
static atomic_int layout_checked; /* 0 unknown, 1 as expected, -1 not */
static _Thread_local int flag_in_hook; /* the probe's reading inside its hook */

static unsigned char *head(lua_State *co) { return (unsigned char *)co; }

static void reading_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  flag_in_hook = head(L)[ALLOWHOOK_AT];
  lua_sethook(L, NULL, 0, 0);
}

static void raising_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "hooks_back probe");
}

/* A fresh thread reads OK and hooks on; inside a hook, hooks off, and on
 * again once it returned; dead of an error its hook raised, its status the
 * error's and hooks off. */
static int layout_as_expected(lua_State *L) {
  lua_State *co = lua_newthread(L);
  int nres, ok = head(co)[STATUS_AT] == LUA_OK && head(co)[ALLOWHOOK_AT] == 1;
  if (ok) {
    flag_in_hook = -1;
    ok = luaL_loadstring(co, "local n = 0 for i = 1, 3 do n = n + i end return n") == LUA_OK;
    lua_sethook(co, reading_hook, LUA_MASKCOUNT, 1);
    ok = ok && lua_resume(co, L, 0, &nres) == LUA_OK && flag_in_hook == 0 && head(co)[ALLOWHOOK_AT] == 1;
  }
  if (ok) {
    lua_settop(co, 0);
    ok = luaL_loadstring(co, "local n = 0 for i = 1, 3 do n = n + i end return n") == LUA_OK;
    lua_sethook(co, raising_hook, LUA_MASKCOUNT, 1);
    ok = ok && lua_resume(co, L, 0, &nres) == LUA_ERRRUN && head(co)[STATUS_AT] == LUA_ERRRUN &&
         head(co)[ALLOWHOOK_AT] == 0;
    if (ok) head(co)[ALLOWHOOK_AT] = 1;
    lua_resetthread(co);
  }
  lua_pop(L, 1);
  return ok;
}

void hooks_back_check(lua_State *L) {
#if LUA_VERSION_NUM == 504
  if (atomic_load(&layout_checked) == 0) atomic_store(&layout_checked, layout_as_expected(L) ? 1 : -1);
#else
  (void)L; /* another Lua's layout is not known here: the handlers run as Lua leaves them */
  atomic_store(&layout_checked, -1);
#endif
}

void hooks_back_on(lua_State *co) {
  if (atomic_load(&layout_checked) == 1 && head(co)[ALLOWHOOK_AT] == 0) head(co)[ALLOWHOOK_AT] = 1;
}
