/*
 * semaphore.c: counting semaphores by name, the bulkhead under
 * policies/limit.lua. A bounded FIFO queue of waiting tasks; a full queue or
 * a wait past its timeout is refused with kind="bulkhead_full".
 *
 * A permit is held by the task that took it (a sem_hold in its task_hold
 * list): release gives back one the calling task holds, else raises (a
 * second release, or one by a task that took none, let more than size
 * callers in); hand_over(t) makes t its holder; a task that ends holding
 * permits gives them back then. Permits taken outside any task (a server
 * handler without tasks) are the host's own, released outside any task;
 * a detached one (detach) is no task's: detach hands back a token, and only a
 * release that names it gives that permit back, once (a stray release, one
 * too many by a task that holds none, took it: another caller got in while
 * its holder still counted on it).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

#define SEMAPHORE_MT "resil.Semaphore"
#define REGISTRY "resil.semaphores"

typedef struct semaphore semaphore;
typedef struct sem_waiter sem_waiter;

struct sem_waiter {
  semaphore *s;
  task *t;
  sem_waiter *prev, *next;
  resil_timer timeout;
  int has_timeout;
  int granted;
  int refused; /* let go by s:refuse_waiting */
};

struct semaphore {
  resil_t *R;
  char name[64];
  int size, queue;  /* permits; waiters allowed (-1: unbounded) */
  int in_use, waiting;
  int loose; /* of in_use: taken outside any task */
  int detached; /* of in_use: detached from their task (s:detach), each released by its token */
  long detach_seq; /* the last token's number */
  long rejected;
  sem_waiter *head, *tail;
};

static semaphore *check_semaphore(lua_State *L, int idx) { return luaL_checkudata(L, idx, SEMAPHORE_MT); }

/* n permits of s held by one task */
typedef struct sem_hold {
  task_hold h;
  semaphore *s;
  int n;
} sem_hold;

static void grant(semaphore *s);

static void hold_drop(task_hold *h, int ended) {
  sem_hold *sh = (sem_hold *)h;
  if (ended) {
    sh->s->in_use -= sh->n;
    grant(sh->s);
  }
  free(sh);
}

static sem_hold *hold_of(const task *t, const semaphore *s) {
  for (task_hold *h = task_holds(t); h; h = h->next)
    if (h->drop == hold_drop && ((sem_hold *)h)->s == s) return (sem_hold *)h;
  return NULL;
}

/* One more permit of s (counted in in_use already) held by t (NULL: outside
 * any task). -> 0, or -1 out of memory (not recorded) */
static int hold_add(semaphore *s, task *t) {
  if (!t) {
    s->loose++;
    return 0;
  }
  sem_hold *sh = hold_of(t, s);
  if (sh) {
    sh->n++;
    return 0;
  }
  sh = malloc(sizeof *sh);
  if (!sh) return -1;
  sh->h.drop = hold_drop;
  sh->s = s;
  sh->n = 1;
  if (task_hold_add(t, &sh->h) != 0) { /* (t runs: it has not ended; else the host's, not lost) */
    free(sh);
    s->loose++;
  }
  return 0;
}

/* The permit just counted in in_use, held by the running task (or the host) */
static void take(lua_State *L, semaphore *s) {
  if (hold_add(s, s->R->current) == 0) return;
  s->in_use--;
  grant(s);
  luaL_error(L, "not enough memory");
}

static void unlink_waiter(semaphore *s, sem_waiter *w) {
  if (w->prev) w->prev->next = w->next;
  else s->head = w->next;
  if (w->next) w->next->prev = w->prev;
  else s->tail = w->prev;
  w->prev = w->next = NULL;
  s->waiting--;
}

/* Hand free permits to the queue in order. */
static void grant(semaphore *s) {
  while (s->head && s->in_use < s->size) {
    sem_waiter *w = s->head;
    unlink_waiter(s, w);
    s->in_use++;
    w->granted = 1;
    if (w->has_timeout) timer_stop(&w->timeout);
    task_wake(w->t);
  }
}

static void waiter_timed_out(void *arg) {
  sem_waiter *w = arg;
  unlink_waiter(w->s, w);
  task_wake(w->t);
}

static void waiter_canceled(void *arg) {
  sem_waiter *w = arg;
  if (w->has_timeout) timer_free(&w->timeout);
  w->has_timeout = 0;
  unlink_waiter(w->s, w);
}

/* Woken (granted or timed out) and canceled before it resumed: a granted
 * permit goes to the next waiter, or the bulkhead would shrink for good. */
static void waiter_give_back(void *arg) {
  sem_waiter *w = arg;
  if (w->has_timeout) timer_free(&w->timeout);
  w->has_timeout = 0;
  if (w->granted) {
    w->granted = 0;
    w->s->in_use--;
    grant(w->s);
  }
}

static const task_wait_ops semaphore_wait = {waiter_canceled, waiter_give_back, NULL};

static int opt_count(lua_State *L, int idx, const char *name, const char *field, int dflt, int lo) {
  int v = dflt;
  if (lua_getfield(L, idx, field) != LUA_TNIL) {
    int isnum;
    lua_Integer n = lua_tointegerx(L, -1, &isnum);
    if (!isnum || n < lo || n > 1000000000)
      resil_raise(L, "semaphore '%s': %s must be an integer >= %d, got %s", name, field, lo,
                  luaL_tolstring(L, -1, NULL));
    v = (int)n;
  }
  lua_pop(L, 1);
  return v;
}

/* resil.semaphore(name [, {size=, queue=}]): the same one for the same name. */
static int l_semaphore(lua_State *L) {
  lua_settop(L, 2);
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  if (len == 0 || len >= sizeof ((semaphore *)0)->name) resil_raise(L, "semaphore name must be 1 to 63 characters");
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REGISTRY);
  semaphore *s = NULL;
  if (lua_getfield(L, -1, name) != LUA_TNIL) s = check_semaphore(L, -1);
  else if (!lua_istable(L, 2)) resil_raise(L, "semaphore '%s' does not exist yet: give its options {size=}", name);
  /* the options are checked before a new one is kept by name: one refused (size = 0) stayed, and
   * every acquire of that name after waited for a permit there never was */
  int size = 0, queue = -1;
  if (lua_istable(L, 2)) {
    size = opt_count(L, 2, name, "size", s ? s->size : 0, 1);
    if (size < 1) resil_raise(L, "semaphore '%s': size is required", name);
    queue = opt_count(L, 2, name, "queue", s ? s->queue : -1, -1);
    /* (limit.run and policies.call's concurrency give the acquire's timeout with these options: -1
     * at creation was taken without a word where no acquire with it came) */
    if (lua_getfield(L, 2, "timeout") != LUA_TNIL) {
      int isnum;
      double timeout = lua_tonumberx(L, -1, &isnum);
      if (!isnum || !(timeout >= 0))
        resil_raise(L, "semaphore '%s': timeout must be a non-negative number of seconds, got %s", name,
                    luaL_tolstring(L, -1, NULL));
    }
    lua_pop(L, 1);
  }
  if (!s) {
    lua_pop(L, 1);
    s = lua_newuserdatauv(L, sizeof *s, 1);
    memset(s, 0, sizeof *s);
    lua_newtable(L); /* the detached permits' tokens: token -> true */
    lua_setiuservalue(L, -2, 1);
    s->R = resil_from_lua(L);
    memcpy(s->name, name, len + 1);
    s->queue = -1;
    luaL_setmetatable(L, SEMAPHORE_MT);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, name);
  }
  if (lua_istable(L, 2)) {
    s->size = size;
    s->queue = queue;
    grant(s);
  }
  return 1;
}

static int push_full(lua_State *L, semaphore *s, const char *why) {
  s->rejected++;
  lua_pushnil(L);
  resil_push_error(L, "bulkhead_full", "'%s': %s (%d in use, %d waiting)", s->name, why, s->in_use, s->waiting);
  lua_pushstring(L, s->name);
  lua_setfield(L, -2, "limit");
  return 2;
}

static int acquire_k(lua_State *L, int status, lua_KContext ctx) {
  sem_waiter *w = (sem_waiter *)ctx;
  if (w->has_timeout) timer_free(&w->timeout);
  w->has_timeout = 0;
  if (w->granted) {
    w->granted = 0;
    take(L, w->s);
    lua_pushboolean(L, 1);
    return 1;
  }
  return push_full(L, w->s, w->refused ? "its queue was let go (refuse_waiting)" : "no permit within the wait timeout");
}

/* s:acquire([{timeout=}]) -> true | nil, err{kind="bulkhead_full"} */
static int s_acquire(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  double timeout = -1;
  /* (options that were no table, acquire(30), were ignored: no timeout at all) */
  if (!lua_isnoneornil(L, 2) && !lua_istable(L, 2))
    resil_raise(L, "semaphore '%s': acquire's options must be a table {timeout=}, got %s", s->name,
                luaL_typename(L, 2));
  if (lua_istable(L, 2) && lua_getfield(L, 2, "timeout") != LUA_TNIL) {
    timeout = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : -1;
    if (!(timeout >= 0)) resil_raise(L, "semaphore '%s': timeout must be a non-negative number", s->name);
  }
  lua_settop(L, 1);
  if (!s->head && s->in_use < s->size) {
    s->in_use++;
    take(L, s);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (s->queue >= 0 && s->waiting >= s->queue) return push_full(L, s, "queue full");
  if (timeout == 0) return push_full(L, s, "no permit free");
  task *t = task_current(L, "semaphore:acquire");
  /* A task that holds every permit waits for one of its own, which it cannot
   * release while it waits: an acquire inside one it holds (limit.run of the
   * same name within itself) held the task, and a spec, for good */
  sem_hold *mine = hold_of(t, s);
  if (timeout < 0 && mine && mine->n >= s->size)
    resil_raise(L,
                "semaphore '%s': task %d holds all %d of its permits and would wait for ever for one of its own "
                "(an acquire inside one it holds: a limit.run of the same name within itself)",
                s->name, task_id(t), s->size);
  sem_waiter *w = lua_newuserdatauv(L, sizeof *w, 0);
  memset(w, 0, sizeof *w);
  w->s = s;
  w->t = t;
  w->prev = s->tail;
  if (s->tail) s->tail->next = w;
  else s->head = w;
  s->tail = w;
  s->waiting++;
  if (timeout > 0) {
    timer_init(s->R, &w->timeout, waiter_timed_out, w);
    w->has_timeout = 1;
    timer_start(&w->timeout, timeout);
  }
  task_wait(t, &semaphore_wait, w);
  return lua_yieldk(L, 0, (lua_KContext)w, acquire_k);
}

/* s:refuse_waiting() -> how many: every task queued for a permit gets its
 * answer now, nil, err{kind="bulkhead_full"}, as at its wait's timeout (a
 * server that stops answers the requests still queued rather than cutting
 * them) */
static int s_refuse_waiting(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  int n = 0;
  while (s->head) {
    sem_waiter *w = s->head;
    unlink_waiter(s, w);
    if (w->has_timeout) timer_stop(&w->timeout);
    w->refused = 1;
    task_wake(w->t);
    n++;
  }
  lua_pushinteger(L, n);
  return 1;
}

/* s:try() -> true, permits left | false: the same shape as bucket:try,
 * without a wait to offer (a permit comes back when a holder releases it). */
static int s_try(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  if (s->head || s->in_use >= s->size) {
    lua_pushboolean(L, 0);
    return 1;
  }
  s->in_use++;
  take(L, s);
  lua_pushboolean(L, 1);
  lua_pushinteger(L, s->size - s->in_use);
  return 2;
}

/* One permit off t's count (NULL: the host's, outside any task), in_use
 * unchanged. -> 0 | -1: t holds none */
static int unhold(semaphore *s, task *t) {
  if (!t) {
    if (s->loose <= 0) return -1;
    s->loose--;
    return 0;
  }
  sem_hold *sh = hold_of(t, s);
  if (!sh) return -1;
  if (--sh->n == 0) {
    task_hold_remove(&sh->h);
    free(sh);
  }
  return 0;
}

static void give_back(semaphore *s) {
  s->in_use--;
  grant(s);
}

/* s:release([token]): one of the permits the calling task holds goes back
 * (outside any task: one of the host's); with a token, the detached permit
 * it names, once */
static int s_release(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  if (!lua_isnoneornil(L, 2)) {
    lua_settop(L, 2);
    lua_getiuservalue(L, 1, 1);
    int held = 0;
    if (lua_type(L, 2) == LUA_TSTRING) {
      lua_pushvalue(L, 2);
      held = lua_rawget(L, 3) != LUA_TNIL;
      lua_pop(L, 1);
    }
    if (!held)
      return resil_raise(L, "semaphore '%s': release of %s, which is none of its detached permits (released "
                            "already, or another semaphore's)", s->name, luaL_tolstring(L, 2, NULL));
    lua_pushvalue(L, 2);
    lua_pushnil(L);
    lua_rawset(L, 3);
    s->detached--;
    give_back(s);
    return 0;
  }
  task *t = s->R->current;
  if (unhold(s, t) == 0) {
    give_back(s);
    return 0;
  }
  const char *detached = s->detached > 0 ? " (a detached permit is released by the token detach returned)" : "";
  if (!t)
    resil_raise(L, "semaphore '%s': release outside any task, where none of its permits is held%s", s->name, detached);
  return resil_raise(L, "semaphore '%s': release by task %d, which holds none of its permits (released already, "
                        "taken by another task, handed over or detached)%s", s->name, task_id(t), detached);
}

/* s:hand_over(t) -> true: one of the calling task's permits is t's now, given
 * back when t releases it or ends | false: t had ended, so it went back */
static int s_hand_over(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  task *to = task_check(L, 2);
  task *t = s->R->current;
  sem_hold *sh = t ? hold_of(t, s) : NULL;
  if (!t && s->loose <= 0)
    resil_raise(L, "semaphore '%s': hand_over outside any task, where none of its permits is held", s->name);
  if (t && !sh)
    resil_raise(L, "semaphore '%s': hand_over by task %d, which holds none of its permits", s->name, task_id(t));
  if (to == t) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (task_ended(to)) {
    unhold(s, t);
    give_back(s);
    lua_pushboolean(L, 0);
    return 1;
  }
  if (sh && sh->n == 1 && !hold_of(to, s)) { /* the whole hold moves: no allocation */
    task_hold_remove(&sh->h);
    task_hold_add(to, &sh->h);
  } else {
    if (hold_add(s, to) != 0) return luaL_error(L, "not enough memory");
    unhold(s, t);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* s:detach() -> token: one of the calling task's permits is no task's now:
 * it stays taken after the task ends, until s:release(token) gives it back.
 * For a permit held across calls (an embedding program's resil_call that
 * enters a bulkhead, and a later one that leaves it, handed the token). */
static int s_detach(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  task *t = s->R->current;
  if (!t && s->loose <= 0) /* outside any task: one of the host's */
    resil_raise(L, "semaphore '%s': detach outside any task, where none of its permits is held", s->name);
  if (t && !hold_of(t, s))
    resil_raise(L, "semaphore '%s': detach by task %d, which holds none of its permits", s->name, task_id(t));
  lua_settop(L, 1);
  lua_getiuservalue(L, 1, 1);
  lua_pushfstring(L, "%s#%I", s->name, (lua_Integer)(s->detach_seq + 1));
  lua_pushvalue(L, -1);
  lua_pushboolean(L, 1);
  lua_rawset(L, 2); /* (before the permit moves: it may raise, out of memory) */
  if (t) unhold(s, t);
  else s->loose--;
  s->detach_seq++;
  s->detached++;
  return 1;
}

static int s_state(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, s->name), lua_setfield(L, -2, "name");
  lua_pushinteger(L, s->size), lua_setfield(L, -2, "size");
  lua_pushinteger(L, s->in_use), lua_setfield(L, -2, "in_use");
  lua_pushinteger(L, s->waiting), lua_setfield(L, -2, "waiting");
  lua_pushinteger(L, s->rejected), lua_setfield(L, -2, "rejected");
  return 1;
}

static int s_tostring(lua_State *L) {
  semaphore *s = check_semaphore(L, 1);
  lua_pushfstring(L, "semaphore '%s' (%d/%d in use, %d waiting)", s->name, s->in_use, s->size, s->waiting);
  return 1;
}

static const luaL_Reg semaphore_methods[] = {
  {"acquire", s_acquire}, {"try", s_try}, {"release", s_release}, {"hand_over", s_hand_over}, {"detach", s_detach},
  {"refuse_waiting", s_refuse_waiting}, {"state", s_state}, {NULL, NULL}};

/* resil.semaphores() -> {name = semaphore, ...}: every named semaphore (for metrics) */
static int l_semaphores(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REGISTRY);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, -3)) { /* L stack: registry, copy, name, semaphore */
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  return 1;
}

int luaopen_resil_semaphore(lua_State *L) {
  luaL_newmetatable(L, SEMAPHORE_MT);
  luaL_newlib(L, semaphore_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, s_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, l_semaphore);
  lua_setfield(L, -2, "semaphore");
  lua_pushcfunction(L, l_semaphores);
  lua_setfield(L, -2, "semaphores");
  return 1;
}
