/*
 * reload.c: hot reload of policy modules: on demand (resil_reload and
 * resil.reload()), on SIGHUP, and on file changes (inotify, debounced). The
 * steps themselves are Lua (the prelude's reload_policies and
 * restore_policies); this file decides when, and runs them under the host's
 * caps.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <dlfcn.h>
#include <event2/event.h>

#include "host.h"

#define QUIET_SECONDS 0.1
#define WATCH_MASK (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE)
#define STEPS_KEY "resil.reload_steps" /* registry: { reload_policies, restore_policies } */

/* The policy folders --watch follows: by path, their inode seen when the
 * watches were made. inotify watches inodes, and deploys swap paths (a
 * release symlink renamed over `current`, a folder replaced by `mv`): a
 * folder whose path now leads elsewhere is watched again, and reloaded. */
#define WATCH_ROOTS 3
#define RECHECK_SECONDS 1

struct reload_state {
  int inotify_fd;
  double read_at; /* wall seconds the loop last read the watch's events (an event's change is later) */
  struct event *inotify_ev;
  struct event *debounce_ev; /* real time: file changes happen in the real world */
  struct event *recheck_ev;
  char roots[WATCH_ROOTS][PATH_MAX];
  dev_t root_dev[WATCH_ROOTS];
  ino_t root_ino[WATCH_ROOTS];
  struct event *sighup_ev;
  struct event *hup_reload_ev; /* the reload SIGHUPs ask for: one, however many came at once */
  /* symlinks in the watched folders (a policy file linked from elsewhere, a
   * Kubernetes ConfigMap's `x.lua -> ..data/x.lua`): inotify sees neither an
   * edit of their target nor a swap of a link further along, so each is
   * stat'ed through with the roots, every RECHECK_SECONDS */
  struct link_seen *links;
  size_t nlinks, cap_links;
  /* inotify short (fs.inotify.max_user_watches used up by an IDE or a container's neighbours:
   * a folder's watch refused with ENOSPC; max_user_instances: no inotify at all): --watch said
   * nothing of the first and never reloaded. Then every policy file is stat'ed as the links
   * are, each RECHECK_SECONDS, and one warning says why. */
  int poll_all;
  int poll_errno;
  /* the folder of each inotify watch (a change's file is stat'ed: when was it written?) */
  struct watched_folder *folders;
  size_t nfolders, cap_folders;
  char poll_dir[PATH_MAX];
  int poll_warned;
};

struct watched_folder {
  int wd;
  char *path;
};

struct link_seen {
  char path[PATH_MAX];
  dev_t dev;
  ino_t ino;
  off_t size;
  struct timespec mtime;
};

/* what path leads to now, following links (all zero: missing) */
static void link_stat(struct link_seen *l) {
  struct stat sb;
  if (stat(l->path, &sb) != 0) memset(&sb, 0, sizeof sb);
  l->dev = sb.st_dev;
  l->ino = sb.st_ino;
  l->size = sb.st_size;
  l->mtime = sb.st_mtim;
}

static void link_add(reload_state *st, const char *path) {
  if (st->nlinks == st->cap_links) {
    size_t cap = st->cap_links ? st->cap_links * 2 : 16;
    struct link_seen *more = realloc(st->links, cap * sizeof *more);
    if (!more) return;
    st->links = more;
    st->cap_links = cap;
  }
  struct link_seen *l = &st->links[st->nlinks++];
  snprintf(l->path, sizeof l->path, "%s", path);
  link_stat(l);
}

/* -> whether two looks at a path saw another file, or the file changed */
static int seen_differs(const struct link_seen *a, const struct link_seen *b) {
  return a->dev != b->dev || a->ino != b->ino || a->size != b->size || a->mtime.tv_sec != b->mtime.tv_sec ||
         a->mtime.tv_nsec != b->mtime.tv_nsec;
}

/* -> whether a link now leads to another file, or its file changed */
static int links_moved(reload_state *st) {
  int moved = 0;
  for (size_t i = 0; i < st->nlinks; i++) {
    struct link_seen now = st->links[i];
    link_stat(&now);
    if (seen_differs(&now, &st->links[i])) moved = 1;
    st->links[i] = now;
  }
  return moved;
}

static reload_state *state_of(resil_t *R) {
  if (!R->reload) {
    R->reload = calloc(1, sizeof *R->reload);
    if (R->reload) R->reload->inotify_fd = -1;
  }
  return R->reload;
}

/* What a failed load allocated is garbage now: collected at once, not held
 * (gigabytes, for a policy that allocates without end at load, with no
 * --max-memory) until the heap doubles again, as new garbage piles on it. */
static void collect_failed(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT, 0);
  /* ...and given back to the machine: mimalloc (the resil-lua binary's
   * allocator; libresil does not link it) keeps freed pages, and a gateway
   * held the 1.3 GB a broken save reached, each of its --workers, for good */
  void (*mi_collect)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "mi_collect");
  if (mi_collect) mi_collect(1);
}

/* L stack: -> true, names | false, message. A policy file that loops or
 * allocates without end at load meets --max-instructions / --max-memory, and
 * a signal stops it; none of the reload's own Lua can run after that, so the
 * old set is put back from here, with hooks off. */
static int reload_on_watched(lua_State *L);
static int reload_on(lua_State *L) {
  /* A finalizer runs with hooks off: one that loops while a reload runs it
   * (collectgarbage() in a policy file, or a step the reload's allocation
   * makes) passed the instruction cap, and a reload from SIGHUP or --watch
   * is outside every resume the watchdog times: the loop was held for good.
   * Watched as the host's full collection is (a no-op inside a task's
   * resil.reload(), timed already). */
  resil_t *R = resil_from_lua(L);
  int watched = loop_host_section_begin(R, "a policy reload (its code, or a __gc finalizer it ran)");
  int n = reload_on_watched(L);
  loop_host_section_end(R, watched);
  return n;
}

static int reload_on_watched(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, STEPS_KEY);
  int steps = lua_gettop(L);
  lua_rawgeti(L, steps, 1);
  int status = host_pcall_load(L, "policy reload", 0, 2);
  if (status == LUA_OK) {
    lua_remove(L, steps);
    if (!lua_toboolean(L, -2)) collect_failed(L);
    return 2;
  }
  /* L stack: steps, error */
  collect_failed(L); /* (first: the old set comes back in what the failed load had taken) */
  lua_Hook hook = lua_gethook(L);
  int mask = lua_gethookmask(L), count = lua_gethookcount(L);
  lua_sethook(L, NULL, 0, 0);
  lua_rawgeti(L, steps, 2);
  lua_pushboolean(L, 1); /* counted as failed in resil_reloads_total: the reload's own Lua could not */
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) lua_pop(L, 1);
  lua_sethook(L, hook, mask, count);
  /* the traceback would only show where the hook fired again, in the reload's own code */
  const char *err = lua_tostring(L, -1);
  if (!err) err = "(error object is not a string)";
  const char *tb = strstr(err, "\nstack traceback:");
  lua_pushfstring(L, "reload: %s", tb ? lua_pushlstring(L, err, (size_t)(tb - err)) : err);
  if (tb) lua_remove(L, -2);
  lua_createtable(L, 0, 1);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "error");
  host_log(L, "error", "policy reload failed; the old version keeps serving");
  /* L stack: steps, error, message -> false, message */
  lua_pushboolean(L, 0);
  lua_replace(L, steps);
  lua_replace(L, steps + 1);
  return 2;
}

int resil_reload(resil_t *R) {
  if (resil_refused(R, "resil_reload")) return RESIL_ERR_USAGE;
  lua_State *L = R->L;
  int top = lua_gettop(L);
  locale_t caller = host_locale_enter(R);
  api_enter(R);
  /* an interrupt that came between calls is the next run's or call's to report: it cut every
   * reload until then ("[resil prelude]:704: interrupted by signal 2"); one that comes meanwhile
   * (another thread's, at a reload that loops) still stops it */
  sig_atomic_t pending = R->interrupted;
  R->interrupted = 0;
  reload_on(L);
  if (pending && !R->interrupted) R->interrupted = pending;
  host_locale_leave(caller);
  int ok = lua_toboolean(L, -2);
  if (!ok) resil_set_error(R, lua_tostring(L, -1));
  lua_settop(L, top);
  api_leave(R);
  return ok ? RESIL_OK : RESIL_ERR_SCRIPT;
}

/* resil.reload() -> true, names | false, message */
static int l_reload(lua_State *L) { return reload_on(L); }

/* load_capped(fn, ...) -> true, fn's results | false, error: fn under the
 * memory cap a reload has without --max-memory (at most 1 GiB more than the
 * process holds), for `resil-lua check`, which loads a project's policy files
 * as a reload would: one that allocated without end at load (a string doubled
 * in a loop) took the machine's memory, gigabytes, before its instruction cap
 * came. Called from a task, so the host's allocator applies the cap. */
static int l_load_capped(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  size_t mem_cap = R->mem_limit;
  if (mem_cap == 0) R->mem_limit = R->mem_used + LOAD_MAX_GROWTH;
  int status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
  R->mem_limit = mem_cap;
  if (status != LUA_OK) {
    collect_failed(L);
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  lua_pushboolean(L, 1);
  lua_insert(L, 1);
  return lua_gettop(L);
}

/* resil.set_reload_steps(reload_policies, restore_policies): from the prelude, once */
static int l_set_reload_steps(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  lua_createtable(L, 2, 0);
  lua_insert(L, 1);
  lua_rawseti(L, 1, 2);
  lua_rawseti(L, 1, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, STEPS_KEY);
  return 0;
}

static void watch_dir(reload_state *st, const char *dir, int depth, int watch);

/* The links there now, their targets as they are: a file a deploy replaced
 * by a link (`ln -s ... tmp && mv tmp x.lua`) since the watches were made
 * was reloaded once, and the edits of its target never. */
static void links_rescan(reload_state *st) {
  st->nlinks = 0;
  for (int i = 0; i < WATCH_ROOTS; i++)
    if (st->roots[i][0]) watch_dir(st, st->roots[i], 2, 0);
}

/* A name a policy module may have: x.lua, not a dot-file, which require never loads (Emacs's lock
 * `.#x.lua`, made at a buffer's first change and taken at its save, reloaded every policy twice
 * before the file was saved) */
static int is_policy_file(const char *name) {
  size_t len = strlen(name);
  return len > 4 && name[0] != '.' && strcmp(name + len - 4, ".lua") == 0;
}

static void debounce_cb(evutil_socket_t fd, short what, void *arg) {
  resil_t *R = arg;
  links_rescan(R->reload);
  resil_reload(R);
}

static double wall_seconds(void) {
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* When the file an event names was last written or moved in (its ctime, which a copy that keeps
 * mtimes, `cp -p`, still sets), in wall seconds; now for one that is gone or unknown */
static double changed_at(reload_state *st, const struct inotify_event *ev, double now, double read_before) {
  for (size_t i = 0; i < st->nfolders; i++) {
    if (st->folders[i].wd != ev->wd) continue;
    char path[PATH_MAX];
    struct stat sb;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", st->folders[i].path, ev->name) >= sizeof path ||
        stat(path, &sb) != 0)
      return now;
    /* (a filesystem that keeps whole seconds, or a server whose clock is behind, gives a time
     * that looks older than the save: the quiet counted from it vanished, and a file half
     * written, or one of a deploy's several, was loaded; counted from now then, as before) */
    double at = (double)sb.st_ctim.tv_sec + (double)sb.st_ctim.tv_nsec / 1e9;
    if (sb.st_ctim.tv_nsec == 0 || at < read_before) return now;
    return at;
  }
  return now;
}

static void inotify_cb(evutil_socket_t fd, short what, void *arg) {
  resil_t *R = arg;
  char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
  int changed = 0, folders = 0;
  double now = wall_seconds(), newest = 0;
  double before = R->reload->read_at;
  R->reload->read_at = now;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    for (char *p = buf; p < buf + n;) {
      struct inotify_event *ev = (struct inotify_event *)p;
      if (ev->len && is_policy_file(ev->name)) {
        changed = 1;
        double at = changed_at(R->reload, ev, now, before);
        if (at > newest) newest = at;
      }
      /* the kernel's queue overflowed (a deploy writing thousands of files
       * while the loop was busy): what changed is lost, so reload */
      if (ev->mask & IN_Q_OVERFLOW) changed = 1, newest = now;
      /* a folder made or moved in (policies/providers replaced by `mv`): its
       * files are watched from now on, and what it brings is reloaded */
      if ((ev->mask & IN_ISDIR) && (ev->mask & (IN_CREATE | IN_MOVED_TO))) folders = 1;
      p += sizeof *ev + ev->len;
    }
  }
  if (folders) {
    /* frees this event with the others: nothing here touches it after */
    if (resil_watch(R, 1) != RESIL_OK) return;
    changed = 1, newest = now;
  }
  if (!changed) return;
  /* The quiet is counted from the last change, not from when the loop read it: a program that
   * drives the host with resil_call alone has it read by each call's look, and the reload was
   * put off past that call (and the next within 100 ms), an edit saved a minute before unseen */
  double quiet = QUIET_SECONDS - (now - newest);
  if (quiet > QUIET_SECONDS) quiet = QUIET_SECONDS; /* (a ctime ahead of this clock: a file from another machine) */
  if (quiet <= 0) {
    event_del(R->reload->debounce_ev);
    debounce_cb(-1, 0, R);
    return;
  }
  struct timeval wait = {0, (long)(quiet * 1e6)};
  event_add(R->reload->debounce_ev, &wait); /* re-adding restarts the wait */
}

/* An inotify watch on dir (IN_MOVED_FROM: a file moved out of the folder is gone as a deleted
 * one is) -> 0; or -1, the kernel's watches spent (ENOSPC: a large tree beside node_modules):
 * the first such folder noted for the warning (warn_polling), and files are stat'ed each second
 * instead (poll_all) */
static int watch_folder(reload_state *st, const char *dir) {
  int wd = inotify_add_watch(st->inotify_fd, dir, WATCH_MASK);
  if (wd >= 0) {
    for (size_t i = 0; i < st->nfolders; i++)
      if (st->folders[i].wd == wd) return 0; /* (the same folder again, or by another path) */
    if (st->nfolders == st->cap_folders) {
      size_t cap = st->cap_folders ? st->cap_folders * 2 : 16;
      struct watched_folder *grown = realloc(st->folders, cap * sizeof *grown);
      if (!grown) return 0; /* (its changes are then timed from when they are read) */
      st->folders = grown, st->cap_folders = cap;
    }
    char *path = strdup(dir);
    if (path) st->folders[st->nfolders++] = (struct watched_folder){wd, path};
    return 0;
  }
  if (!st->poll_all) {
    st->poll_all = 1;
    st->poll_errno = errno;
    snprintf(st->poll_dir, sizeof st->poll_dir, "%s", dir);
  }
  return -1;
}

/* once a process, when a folder could not be watched: the line saying so, and what to raise */
static void warn_polling(reload_state *st, lua_State *L) {
  if (!st->poll_all || st->poll_warned) return;
  st->poll_warned = 1;
  lua_createtable(L, 0, 3);
  lua_pushstring(L, st->poll_dir);
  lua_setfield(L, -2, "folder");
  lua_pushstring(L, strerror(st->poll_errno));
  lua_setfield(L, -2, "error");
  if (st->poll_errno == ENOSPC || st->poll_errno == EMFILE || st->poll_errno == ENFILE) {
    lua_pushstring(L, st->inotify_fd < 0 ? "fs.inotify.max_user_instances (raise it to have the files watched)"
                                          : "fs.inotify.max_user_watches (raise it to have the files watched)");
    lua_setfield(L, -2, "sysctl");
  }
  host_log(L, "warn", "--watch: cannot watch a policy folder with inotify; its files are checked every second "
                      "instead");
}

/* watch: inotify watches too (else the links only) */
static void watch_dir(reload_state *st, const char *dir, int depth, int watch) {
  struct stat st_dir;
  if (stat(dir, &st_dir) != 0 || !S_ISDIR(st_dir.st_mode)) return;
  if (watch && st->inotify_fd >= 0) watch_folder(st, dir);
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    char sub[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
    struct stat sb;
    int is_lua = is_policy_file(e->d_name);
    int is_dir = stat(sub, &sb) == 0 && S_ISDIR(sb.st_mode);
    if ((is_lua || (is_dir && depth > 0)) && lstat(sub, &sb) == 0 && S_ISLNK(sb.st_mode)) link_add(st, sub);
    else if (is_lua && st->poll_all) link_add(st, sub); /* (inotify short: stat'ed each second) */
    if (e->d_name[0] == '.' || !is_dir || depth == 0) continue;
    watch_dir(st, sub, depth - 1, watch);
  }
  closedir(d);
}

/* Folders are walked two below a policy folder (a project's tree may be large: `--policies .`
 * beside node_modules); a module deeper (policies.team.shared.lib.x: pol/team/shared/lib/x.lua)
 * was never watched, and its edits reloaded nothing. The folder of each policy file the searcher
 * loads is watched as it loads (inotify keeps one watch per folder, so again is nothing), and
 * those loaded before --watch started, as it starts. */
void reload_watch_folder_of(resil_t *R, lua_State *L, const char *path) {
  reload_state *st = R->reload;
  if (!st || st->inotify_fd < 0) return;
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", path);
  char *slash = strrchr(dir, '/');
  if (!slash) return; /* (a policy file is always found as folder/name.lua) */
  *slash = '\0';
  if (watch_folder(st, dir) == 0) return;
  /* (no watch left: the file itself is stat'ed each second, once, however often it loads) */
  for (size_t i = 0; i < st->nlinks; i++)
    if (strcmp(st->links[i].path, path) == 0) return;
  link_add(st, path);
  warn_polling(st, L); /* (the caller's: a task's require, its context in the line) */
}

static void watch_stop(reload_state *st) {
  st->poll_all = 0;
  if (st->inotify_ev) event_free(st->inotify_ev);
  if (st->debounce_ev) event_free(st->debounce_ev);
  if (st->recheck_ev) event_free(st->recheck_ev);
  if (st->inotify_fd >= 0) close(st->inotify_fd);
  st->inotify_ev = st->debounce_ev = st->recheck_ev = NULL;
  st->inotify_fd = -1;
  st->nlinks = 0;
  for (size_t i = 0; i < st->nfolders; i++) free(st->folders[i].path);
  st->nfolders = 0;
}

/* the roots' inodes now (0: missing); -> whether one changed since last time */
static int roots_moved(reload_state *st) {
  int moved = 0;
  for (int i = 0; i < WATCH_ROOTS; i++) {
    struct stat sb;
    dev_t dev = 0;
    ino_t ino = 0;
    if (st->roots[i][0] && stat(st->roots[i], &sb) == 0) dev = sb.st_dev, ino = sb.st_ino;
    if (dev != st->root_dev[i] || ino != st->root_ino[i]) moved = 1;
    st->root_dev[i] = dev;
    st->root_ino[i] = ino;
  }
  return moved;
}

/* inotify short: the policy files there now against those seen a second
 * before. A list of the files seen then shows an edit or a deletion, never a
 * file made since (a new override of a shipped policy, a module a policy now
 * requires, a folder made later): the folders are read again each time. */
static int files_moved(reload_state *st) {
  struct link_seen *before = st->links;
  size_t n_before = st->nlinks;
  st->links = NULL;
  st->nlinks = st->cap_links = 0;
  links_rescan(st);
  int moved = st->nlinks != n_before;
  for (size_t i = 0; i < st->nlinks && !moved; i++) {
    const struct link_seen *now = &st->links[i], *was = NULL;
    /* (readdir's order: the same index unless the folder changed) */
    if (i < n_before && strcmp(before[i].path, now->path) == 0) was = &before[i];
    for (size_t j = 0; !was && j < n_before; j++)
      if (strcmp(before[j].path, now->path) == 0) was = &before[j];
    if (!was || seen_differs(now, was)) moved = 1;
  }
  free(before);
  return moved;
}

static void recheck_cb(evutil_socket_t fd, short what, void *arg) {
  resil_t *R = arg;
  reload_state *st = R->reload;
  int moved = roots_moved(st);
  if (st->poll_all ? files_moved(st) : links_moved(st)) moved = 1;
  if (!moved) return;
  if (resil_watch(R, 1) != RESIL_OK) return; /* watches made again (this event with them) */
  struct timeval quiet = {0, (long)(QUIET_SECONDS * 1e6)};
  event_add(R->reload->debounce_ev, &quiet);
}

/* L: the thread to log on (resil.watch's own, inside a task; else the main one, idle) */
static int watch_on(resil_t *R, lua_State *L, int on) {
  reload_state *st = state_of(R);
  if (!st) return RESIL_ERR_MEMORY;
  watch_stop(st);
  if (!on) return RESIL_OK;
  st->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  st->poll_all = st->inotify_fd < 0;
  if (st->poll_all) {
    st->poll_errno = errno;
    snprintf(st->poll_dir, sizeof st->poll_dir, "%s", "(inotify)");
  }
  char full[PATH_MAX]; /* (the folders the searcher reads: from the folder the host was opened in) */
  snprintf(st->roots[0], PATH_MAX, "%s", R->policies_dir ? host_path(R, R->policies_dir, full, sizeof full) : "");
  snprintf(st->roots[1], PATH_MAX, "%s", host_path(R, "policies", full, sizeof full));
  snprintf(st->roots[2], PATH_MAX, "%s%s", R->share_dir ? R->share_dir : "", R->share_dir ? "/policies" : "");
  roots_moved(st);
  for (int i = 0; i < WATCH_ROOTS; i++)
    if (st->roots[i][0]) watch_dir(st, st->roots[i], 2, 1);
  policy_folders_watch(R, L); /* (the policy files loaded so far, however deep) */
  if (st->inotify_fd >= 0) st->inotify_ev = event_new(R->base, st->inotify_fd, EV_READ | EV_PERSIST, inotify_cb, R);
  st->debounce_ev = evtimer_new(R->base, debounce_cb, R);
  st->recheck_ev = event_new(R->base, -1, EV_PERSIST, recheck_cb, R);
  struct timeval every = {RECHECK_SECONDS, 0};
  if ((st->inotify_fd >= 0 && (!st->inotify_ev || event_add(st->inotify_ev, NULL) != 0)) || !st->debounce_ev ||
      !st->recheck_ev || event_add(st->recheck_ev, &every) != 0) {
    watch_stop(st);
    return RESIL_ERR_MEMORY;
  }
  warn_polling(st, L); /* (once a process: the watches are made again as folders come) */
  return RESIL_OK;
}

int resil_watch(resil_t *R, int on) {
  if (resil_refused(R, "resil_watch")) return RESIL_ERR_USAGE;
  return watch_on(R, R->L, on);
}

static void hup_reload_cb(evutil_socket_t fd, short what, void *arg) { resil_reload(arg); }

/* libevent calls this once per signal caught: a storm of SIGHUPs (a script
 * sending one per file it deployed) ran as many full reloads back to back,
 * the loop and every request held all the while. They ask for one reload,
 * run after all of them (an event made active again before it runs is run
 * once). */
static void sighup_cb(evutil_socket_t sig, short what, void *arg) {
  resil_t *R = arg;
  event_active(R->reload->hup_reload_ev, EV_TIMEOUT, 0);
}

int resil_reload_on_sighup(resil_t *R) {
  if (resil_refused(R, "resil_reload_on_sighup")) return RESIL_ERR_USAGE;
  reload_state *st = state_of(R);
  if (!st) return RESIL_ERR_MEMORY;
  if (st->sighup_ev) return RESIL_OK;
  st->hup_reload_ev = event_new(R->base, -1, 0, hup_reload_cb, R);
  st->sighup_ev = evsignal_new(R->base, SIGHUP, sighup_cb, R);
  if (!st->hup_reload_ev || !st->sighup_ev || evsignal_add(st->sighup_ev, NULL) != 0) return RESIL_ERR_MEMORY;
  return RESIL_OK;
}

/* resil.watch(on): the same from a script */
static int l_watch(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  if (resil_refused(R, "resil_watch")) return resil_raise(L, "resil.watch: %s", resil_error(R));
  if (watch_on(R, L, lua_toboolean(L, 1)) != RESIL_OK) return resil_raise(L, "resil.watch: %s", resil_error(R));
  return 0;
}

int luaopen_resil_reload(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_watch);
  lua_setfield(L, -2, "watch");
  lua_pushcfunction(L, l_reload);
  lua_setfield(L, -2, "reload");
  lua_pushcfunction(L, l_set_reload_steps);
  lua_setfield(L, -2, "set_reload_steps");
  lua_pushcfunction(L, l_load_capped);
  lua_setfield(L, -2, "load_capped");
  return 1;
}

void reload_free(resil_t *R) {
  reload_state *st = R->reload;
  if (!st) return;
  watch_stop(st);
  if (st->sighup_ev) event_free(st->sighup_ev);
  if (st->hup_reload_ev) event_free(st->hup_reload_ev);
  free(st->links);
  free(st->folders);
  free(st);
  R->reload = NULL;
}
