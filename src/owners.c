/*
 * owners.c: the owner identities (owner.lua) of the hosts open in this
 * process. Two hosts of one process are two owners with one pid, so the pid
 * alone cannot judge them: a host closed while its store was out (a Redis
 * blip, a SQLite file another process held locked) could not give up its
 * run, resil.once keys and budget holds, and every later host of the
 * process took their holder for alive while the process ran (the program's
 * next host: "held by pid N", its own, for good). A process-wide list, as
 * the hosts may be on threads of their own; a child of fork has its own pid.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

typedef struct open_owner {
  char *id;
  struct open_owner *next;
} open_owner;

/* the hosts open, and those closed (the last CLOSED_KEPT): a host of this process that is neither
 * is one of another copy of the library (a plugin that links libresil.a beside a program that links
 * libresil.so, each with its own list): alive as the process is, never taken over */
#define CLOSED_KEPT 1024
static open_owner *open_owners, *closed_owners;
static int closed_count;
static pthread_mutex_t open_owners_lock = PTHREAD_MUTEX_INITIALIZER;

/* a child of fork made while another thread held the lock would find it held for good (reviewer
 * R2): the child's is made anew, its one thread holding nothing */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void lock_anew_in_child(void) { pthread_mutex_init(&open_owners_lock, NULL); }
static void register_atfork(void) { pthread_atfork(NULL, NULL, lock_anew_in_child); }

/* private.owner_opened(id): the host's identity, made at its first use; open until resil_close */
int resil_l_owner_opened(lua_State *L) {
  const char *id = luaL_checkstring(L, 1);
  resil_t *R = resil_from_lua(L);
  if (R->owner_id) return 0; /* (made once per host: owner.lua keeps it) */
  open_owner *o = malloc(sizeof *o);
  char *copy = strdup(id);
  if (!o || !copy) {
    free(o), free(copy);
    return luaL_error(L, "not enough memory");
  }
  o->id = copy;
  pthread_once(&atfork_once, register_atfork);
  pthread_mutex_lock(&open_owners_lock);
  o->next = open_owners;
  open_owners = o;
  pthread_mutex_unlock(&open_owners_lock);
  R->owner_id = copy;
  return 0;
}

static int listed(const open_owner *o, const char *id) {
  for (; o; o = o->next)
    if (strcmp(o->id, id) == 0) return 1;
  return 0;
}

/* private.owner_state(id) -> "open" | "closed" (a host of this copy of the library with that
 * identity) | nil (none of its: another copy's, or one closed long ago) */
int resil_l_owner_state(lua_State *L) {
  const char *id = luaL_checkstring(L, 1);
  pthread_mutex_lock(&open_owners_lock);
  const char *state = listed(open_owners, id) ? "open" : listed(closed_owners, id) ? "closed" : NULL;
  pthread_mutex_unlock(&open_owners_lock);
  if (state) lua_pushstring(L, state);
  else lua_pushnil(L);
  return 1;
}

/* resil_close, once the host's Lua is gone: from here its identity is a dead holder's */
void owners_close(resil_t *R) {
  if (!R->owner_id) return;
  pthread_mutex_lock(&open_owners_lock);
  for (open_owner **at = &open_owners; *at; at = &(*at)->next) {
    if ((*at)->id == R->owner_id) {
      open_owner *o = *at;
      *at = o->next;
      o->next = closed_owners; /* (its id with it: R's copy is let go below) */
      closed_owners = o;
      R->owner_id = NULL;
      if (++closed_count > CLOSED_KEPT) { /* the oldest let go */
        open_owner **last = &closed_owners;
        while ((*last)->next) last = &(*last)->next;
        free((*last)->id);
        free(*last);
        *last = NULL;
        closed_count--;
      }
      break;
    }
  }
  pthread_mutex_unlock(&open_owners_lock);
  free(R->owner_id); /* (NULL once kept among the closed) */
  R->owner_id = NULL;
}
