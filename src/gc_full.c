/*
 * gc_full.c: a full collection now and then under the generational collector.
 *
 * Lua's generational collector frees young garbage in minor collections and
 * runs a major (full) one only once the heap has doubled since the last. A
 * process whose garbage dies young (a gateway, a pipeline) keeps a flat heap,
 * so an object that had grown old before it became garbage was never
 * collected and its finalizer never ran: a stream dropped unread held its
 * transfer and connection for good, a kept ticket nobody referred to had its
 * hold extended for good (the incremental collector began a cycle once as
 * much had been allocated as the heap held). The same is done here: a full
 * collection once the Lua state has allocated as much as its heap held after
 * the last one, at most once a second, and at most 2% of the time (a heap of
 * many requests in flight takes longer to walk). Real time, on the virtual
 * clock too: it is about the machine's memory.
 */
#include <string.h>

#include "host.h"

#define GC_FULL_EVERY 1.0       /* seconds at least between two */
#define GC_FULL_COST_SHARE 50   /* and at least 50 times as long as the last one took */
#define GC_FULL_MIN_BYTES (1 << 20)

static void gc_full_due_after(resil_t *R) {
  size_t heap = R->mem_used > GC_FULL_MIN_BYTES ? R->mem_used : GC_FULL_MIN_BYTES;
  R->gc_full_due = R->allocated + heap;
}

/* After each turn: a look at one counter, unless a full collection is due. */
static void gc_full_check(void *arg) {
  resil_t *R = arg;
  if (R->allocated < R->gc_full_due) return;
  gc_full_due_after(R); /* (looked at again after as much more, whatever follows) */
  if (!R->gc_generational || !lua_gc(R->L, LUA_GCISRUNNING)) return;
  double now = monotonic_seconds();
  if (now < R->gc_full_next) return;
  /* (its finalizers run here, hooks off: one that loops is the watchdog's stuck exit) */
  int watched = loop_host_section_begin(R, "the host's full garbage collection (a __gc finalizer)");
  lua_gc(R->L, LUA_GCCOLLECT);
  loop_host_section_end(R, watched);
  /* Lua 5.4.4 leaves the next minor collection's debt as it was after a full
   * one in generational mode (fixed in later 5.4 releases): a step sets it */
  lua_gc(R->L, LUA_GCSTEP, 0);
  double took = monotonic_seconds() - now;
  R->gc_full_next = now + (took * GC_FULL_COST_SHARE > GC_FULL_EVERY ? took * GC_FULL_COST_SHARE : GC_FULL_EVERY);
  gc_full_due_after(R);
}

/* collectgarbage as Lua's, telling the host which mode a script chose */
static int host_collectgarbage(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  int mode = -1;
  if (lua_type(L, 1) == LUA_TSTRING) {
    if (strcmp(lua_tostring(L, 1), "generational") == 0) mode = 1;
    else if (strcmp(lua_tostring(L, 1), "incremental") == 0) mode = 0;
  }
  int n = lua_gettop(L);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, n, LUA_MULTRET);
  /* (refused, as from a finalizer, it returns nil: the mode is unchanged) */
  if (mode >= 0 && lua_type(L, 1) == LUA_TSTRING) R->gc_generational = mode;
  return lua_gettop(L);
}

/* The state in generational mode, with the full collections above; after
 * luaL_openlibs (collectgarbage is wrapped). */
void gc_full_init(resil_t *R) {
  lua_State *L = R->L;
  lua_gc(L, LUA_GCGEN, 0, 0);
  R->gc_generational = 1;
  gc_full_due_after(R);
  lua_getglobal(L, "collectgarbage");
  lua_pushcclosure(L, host_collectgarbage, 1);
  lua_setglobal(L, "collectgarbage");
  loop_on_turn_end(R, gc_full_check, R);
}
