/*
 * reload.c: hot reload of policy modules: on demand (resil_reload), on
 * SIGHUP, and on file changes (inotify, debounced). The work itself is
 * resil.reload() in the prelude; this file decides when.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dirent.h>
#include <event2/event.h>

#include "host.h"

#define QUIET_SECONDS 0.1

struct reload_state {
  int inotify_fd;
  struct event *inotify_ev;
  struct event *debounce_ev; /* real time: file changes happen in the real world */
  struct event *sighup_ev;
};

static reload_state *state_of(resil_t *R) {
  if (!R->reload) {
    R->reload = calloc(1, sizeof *R->reload);
    if (R->reload) R->reload->inotify_fd = -1;
  }
  return R->reload;
}

int resil_reload(resil_t *R) {
  lua_State *L = R->L;
  lua_pushcfunction(L, resil_traceback);
  if (luaL_loadstring(L, "return require('resil').reload()") != LUA_OK || lua_pcall(L, 0, 2, -2) != LUA_OK) {
    resil_set_error(R, lua_tostring(L, -1));
    lua_pop(L, 2);
    return RESIL_ERR_SCRIPT;
  }
  int ok = lua_toboolean(L, -2);
  if (!ok) resil_set_error(R, lua_tostring(L, -1));
  lua_pop(L, 3);
  return ok ? RESIL_OK : RESIL_ERR_SCRIPT;
}

static void debounce_cb(evutil_socket_t fd, short what, void *arg) { resil_reload(arg); }

static void inotify_cb(evutil_socket_t fd, short what, void *arg) {
  resil_t *R = arg;
  char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
  int changed = 0;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    for (char *p = buf; p < buf + n;) {
      struct inotify_event *ev = (struct inotify_event *)p;
      size_t len = ev->len ? strlen(ev->name) : 0;
      if (len > 4 && strcmp(ev->name + len - 4, ".lua") == 0) changed = 1;
      p += sizeof *ev + ev->len;
    }
  }
  if (changed) {
    struct timeval quiet = {0, (long)(QUIET_SECONDS * 1e6)};
    event_add(R->reload->debounce_ev, &quiet); /* re-adding restarts the wait */
  }
}

static void watch_dir(int fd, const char *dir, int depth) {
  struct stat st;
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return;
  inotify_add_watch(fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE);
  if (depth == 0) return;
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char sub[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
    watch_dir(fd, sub, depth - 1);
  }
  closedir(d);
}

static void watch_stop(reload_state *st) {
  if (st->inotify_ev) event_free(st->inotify_ev);
  if (st->debounce_ev) event_free(st->debounce_ev);
  if (st->inotify_fd >= 0) close(st->inotify_fd);
  st->inotify_ev = st->debounce_ev = NULL;
  st->inotify_fd = -1;
}

int resil_watch(resil_t *R, int on) {
  reload_state *st = state_of(R);
  if (!st) return RESIL_ERR_MEMORY;
  watch_stop(st);
  if (!on) return RESIL_OK;
  st->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (st->inotify_fd < 0) {
    resil_set_error(R, strerror(errno));
    return RESIL_ERR_FILE;
  }
  if (R->policies_dir) watch_dir(st->inotify_fd, R->policies_dir, 2);
  watch_dir(st->inotify_fd, "policies", 2);
  if (R->share_dir) {
    char shipped[PATH_MAX];
    snprintf(shipped, sizeof shipped, "%s/policies", R->share_dir);
    watch_dir(st->inotify_fd, shipped, 2);
  }
  st->inotify_ev = event_new(R->base, st->inotify_fd, EV_READ | EV_PERSIST, inotify_cb, R);
  st->debounce_ev = evtimer_new(R->base, debounce_cb, R);
  if (!st->inotify_ev || !st->debounce_ev || event_add(st->inotify_ev, NULL) != 0) {
    watch_stop(st);
    return RESIL_ERR_MEMORY;
  }
  return RESIL_OK;
}

static void sighup_cb(evutil_socket_t sig, short what, void *arg) { resil_reload(arg); }

int resil_reload_on_sighup(resil_t *R) {
  reload_state *st = state_of(R);
  if (!st) return RESIL_ERR_MEMORY;
  if (st->sighup_ev) return RESIL_OK;
  st->sighup_ev = evsignal_new(R->base, SIGHUP, sighup_cb, R);
  if (!st->sighup_ev || evsignal_add(st->sighup_ev, NULL) != 0) return RESIL_ERR_MEMORY;
  return RESIL_OK;
}

/* resil.watch(on): the same from a script */
static int l_watch(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  if (resil_watch(R, lua_toboolean(L, 1)) != RESIL_OK) return resil_raise(L, "resil.watch: %s", resil_error(R));
  return 0;
}

int luaopen_resil_reload(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_watch);
  lua_setfield(L, -2, "watch");
  return 1;
}

void reload_free(resil_t *R) {
  reload_state *st = R->reload;
  if (!st) return;
  watch_stop(st);
  if (st->sighup_ev) event_free(st->sighup_ev);
  free(st);
  R->reload = NULL;
}
