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

static open_owner *open_owners;
static pthread_mutex_t open_owners_lock = PTHREAD_MUTEX_INITIALIZER;

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
  pthread_mutex_lock(&open_owners_lock);
  o->next = open_owners;
  open_owners = o;
  pthread_mutex_unlock(&open_owners_lock);
  R->owner_id = copy;
  return 0;
}

/* private.owner_is_open(id) -> whether a host of this process with that identity is open */
int resil_l_owner_is_open(lua_State *L) {
  const char *id = luaL_checkstring(L, 1);
  int found = 0;
  pthread_mutex_lock(&open_owners_lock);
  for (open_owner *o = open_owners; o && !found; o = o->next) found = strcmp(o->id, id) == 0;
  pthread_mutex_unlock(&open_owners_lock);
  lua_pushboolean(L, found);
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
      free(o);
      break;
    }
  }
  pthread_mutex_unlock(&open_owners_lock);
  free(R->owner_id);
  R->owner_id = NULL;
}
