/*
 * resil.c: a host instance. It owns the Lua state (with an optional memory
 * cap), the libevent loop, the `resil` module and the policy search path, and
 * turns a script into the first task.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lualib.h>

#include "host.h"

#ifndef RESIL_SHAREDIR
#define RESIL_SHAREDIR "/usr/local/share/resil"
#endif

/* The host is the allocator's user data: no registry lookup on hot paths. */
resil_t *resil_from_lua(lua_State *L) {
  void *R = NULL;
  lua_getallocf(L, &R);
  return R;
}

/* Every message an embedder or the CLI prints comes through here: redacted. */
void resil_set_error(resil_t *R, const char *msg) {
  char *copy = redact_strdup(R, msg ? msg : "unknown error");
  free(R->error);
  R->error = copy;
}

const char *resil_error(resil_t *R) {
  if (!R) return "no host (NULL)";
  return R->error ? R->error : "";
}

/* After fork the child has a copy of the host whose store thread is not in
 * it and whose connections, files and loop it shares with the parent:
 * running it hung (a store write waited for the missing thread) or mixed
 * the two processes' I/O. Refused instead; so is every call on a host
 * being closed. */
int resil_refused(resil_t *R, const char *what) {
  char msg[200];
  if (!R) return 1; /* no host to say why on: resil_error(NULL) says it */
  if (R->closing) {
    /* a done callback resil_close runs for a call that never ended: the Lua
     * state is gone (a new call from it crashed the program) */
    snprintf(msg, sizeof msg, "%s: the host is being closed (resil_close)", what);
    resil_set_error(R, msg);
    return 1;
  }
  if (R->pid == getpid()) return 0;
  snprintf(msg, sizeof msg, "%s: this host was opened by process %ld; after fork, a child opens a host of its own",
           what, (long)R->pid);
  resil_set_error(R, msg);
  return 1;
}
lua_State *resil_lua(resil_t *R) { return R ? R->L : NULL; }
struct event_base *resil_event_base(resil_t *R) {
  if (!R) return NULL;
  R->base_handed_out = 1; /* (resil_call no longer looks at its I/O: loop_look) */
  return R->base;
}

/* The memory cap applies to all Lua the host runs (tasks, and handlers and
 * reloads through host_pcall), all of it protected; the host's own
 * bookkeeping in between is never refused, so a cap can make a script fail
 * but can never abort or corrupt the host. */
static void *host_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  resil_t *R = ud;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    free(ptr);
    R->mem_used -= osize;
    return NULL;
  }
  int capped = R->current || R->host_L;
  if (R->mem_limit && capped && nsize > osize && R->mem_used + (nsize - osize) > R->mem_limit) return NULL;
  /* (mimalloc: a realloc of NULL goes through its realloc path first: some 4k
   * instructions a gateway request over the Lua state's new blocks) */
  void *p = ptr ? realloc(ptr, nsize) : malloc(nsize);
  if (p) {
    R->mem_used = R->mem_used - osize + nsize;
    if (nsize > osize) R->allocated += nsize - osize;
  }
  return p;
}

/* os.exit([code [, close]]): Lua's, except that close defaults to true and
 * closes as resil_close does: no task current (the memory cap would refuse
 * the finalizers), and R->L cleared, so that an embedder's resil_close at
 * exit does not close the state again. The stores' finalizers write what
 * is still queued (the ledger's rows nobody waited for); Lua's own
 * os.exit(code) dropped them without a word. What resil_close gives up or
 * writes at once (embed_give_up) is too: skipped here, a paid call's cost
 * row or settle still being tried, a resil.once result waiting for the
 * store, were lost with the store taking writes again. */
static int host_os_exit(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  int status = lua_isboolean(L, 1) ? (lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE)
                                   : (int)luaL_optinteger(L, 1, EXIT_SUCCESS);
  if (lua_isnoneornil(L, 2) || lua_toboolean(L, 2)) {
    R->current = NULL;
    R->host_L = NULL;
    R->closing = 1; /* as resil_close: no task resumes, finalizers free what tasks held */
    embed_give_up(R);
    lua_close(R->L);
    R->L = NULL;
  }
  exit(status);
}

/* __gc of the state's oldest finalizable object: lua_close has run every other finalizer */
static int finalizers_over(lua_State *L) {
  resil_from_lua(L)->finalizers_over = 1;
  return 0;
}

static int host_panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  redact_fprintf(resil_from_lua(L), stderr, "resil-lua: PANIC: unprotected error: %s\n", msg ? msg : "?");
  return 0;
}

int host_pcall(lua_State *L, const char *what, int nargs, int nresults) {
  resil_t *R = resil_from_lua(L);
  int base = lua_gettop(L) - nargs; /* the function, then the message handler below it */
  lua_pushcfunction(L, resil_traceback);
  lua_insert(L, base);
  lua_State *outer_L = R->host_L;
  const char *outer_what = R->host_what;
  lua_Hook outer_hook = lua_gethook(L); /* a task's cap, when a task reloads */
  int outer_mask = lua_gethookmask(L), outer_count = lua_gethookcount(L);
  R->host_L = L;
  R->host_what = what;
  R->host_stop[0] = '\0';
  /* the thread runs the host: resil_interrupt from another thread signals it, and the signal's
   * handler finds the host (a server handler on the embedder's own event base, outside any turn) */
  resil_t *outer_host = watchdog_host;
  watchdog_host = R;
  watchdog_loop_thread(R);
  int reblock = R->in_loop ? 0 : watchdog_signal_unblock(); /* (outside the loop: its turns unblock it) */
  loop_arm_hook(R, L); /* also when a signal came before: the first one must stop it */
  locale_t caller = host_locale_enter(R); /* a server handler on the embedder's own event base */
  int status = lua_pcall(L, nargs, nresults, base);
  host_locale_leave(caller);
  watchdog_signal_reblock(reblock);
  watchdog_host = outer_host;
  R->host_L = outer_L;
  R->host_what = outer_what;
  R->host_stop[0] = '\0';
  lua_sethook(L, outer_hook, outer_mask, outer_count);
  if (R->interrupted) loop_interrupt_running(R); /* the task or outer call this ran in stops too */
  lua_remove(L, base);
  return status;
}

int host_pcall_load(lua_State *L, const char *what, int nargs, int nresults) {
  resil_t *R = resil_from_lua(L);
  long cap = R->max_instructions;
  size_t mem_cap = R->mem_limit;
  if (cap <= 0) R->max_instructions = LOAD_MAX_INSTRUCTIONS;
  if (mem_cap == 0) R->mem_limit = R->mem_used + LOAD_MAX_GROWTH;
  int status = host_pcall(L, what, nargs, nresults);
  R->max_instructions = cap;
  R->mem_limit = mem_cap;
  return status;
}

/* ---------- require "policies.x": the project's copy before the shipped one ---------- */

static int file_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* A policy file as last compiled: its bytes and the compiled chunk (lua_dump, with its debug
 * information: errors still name file:line). A reload (each SIGHUP, each --watch save) compiled
 * every loaded policy file again, about 15 ms for the gateway's, the loop and every request held
 * all the while; a file whose bytes are those compiled before is loaded from its compiled form,
 * ten times faster, so a reload compiles only the files that changed. Outside the Lua heap
 * (--max-memory caps what scripts allocate). */
struct policy_compiled {
  char *path, *src, *bin;
  size_t src_len, bin_len;
  struct policy_compiled *next;
};

/* path's bytes (malloc'd) | NULL */
static char *read_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    n += fread(buf + n, 1, cap - n, f);
    if (n < cap) break;
    char *more = cap < ((size_t)1 << 30) ? realloc(buf, cap * 2) : NULL;
    if (!more) free(buf);
    buf = more;
    cap *= 2;
  }
  int failed = ferror(f);
  fclose(f);
  if (failed) {
    free(buf);
    return NULL;
  }
  *len = n;
  return buf;
}

typedef struct dump_buf {
  char *data;
  size_t len, cap;
} dump_buf;

static int dump_write(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  dump_buf *b = ud;
  if (b->len + sz > b->cap) {
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + sz) cap *= 2;
    char *more = realloc(b->data, cap);
    if (!more) return 1;
    b->data = more, b->cap = cap;
  }
  memcpy(b->data + b->len, p, sz);
  b->len += sz;
  return 0;
}

/* L stack: -> the chunk of the policy file at path | an error message; LUA_OK or load's status.
 * Compiled from the bytes read (as luaL_loadfilex: a UTF-8 BOM and a first line starting with '#'
 * skipped, the line counted), or taken compiled when they are the bytes compiled before. */
static int load_policy_file(resil_t *R, lua_State *L, const char *path, const char *name, const char *mode) {
  size_t len = 0;
  char *src = read_all(path, &len);
  if (!src) return luaL_loadfilex(L, path, mode);
  struct policy_compiled *c = R->compiled;
  while (c && strcmp(c->path, path) != 0) c = c->next;
  const char *chunkname = lua_pushfstring(L, "@%s", name); /* (errors name the file as its folder was given) */
  int top = lua_gettop(L);
  if (c && c->src_len == len && memcmp(c->src, src, len) == 0) {
    if (luaL_loadbufferx(L, c->bin, c->bin_len, chunkname, "b") == LUA_OK) {
      lua_remove(L, -2);
      free(src);
      return LUA_OK;
    }
    lua_settop(L, top); /* (it failed: compiled again below) */
  }
  const char *p = src;
  size_t n = len;
  if (n >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) p += 3, n -= 3;
  if (n > 0 && *p == '#')
    while (n > 0 && *p != '\n') p++, n--;
  int status = luaL_loadbufferx(L, p, n, chunkname, mode);
  lua_remove(L, -2);
  if (status != LUA_OK) {
    free(src);
    return status;
  }
  dump_buf b = {0};
  if (lua_dump(L, dump_write, &b, 0) != 0 || !b.data) {
    free(b.data);
    free(src);
    return LUA_OK;
  }
  if (!c && (c = calloc(1, sizeof *c)) && !(c->path = strdup(path))) {
    free(c);
    c = NULL;
  } else if (c && !c->src) {
    c->next = R->compiled;
    R->compiled = c;
  }
  if (!c) {
    free(b.data);
    free(src);
    return LUA_OK;
  }
  free(c->src);
  free(c->bin);
  c->src = src, c->src_len = len, c->bin = b.data, c->bin_len = b.len;
  return LUA_OK;
}

/* --watch: the folders of the policy files loaded so far (reload.c) */
void policy_folders_watch(resil_t *R, lua_State *L) {
  for (struct policy_compiled *c = R->compiled; c; c = c->next) reload_watch_folder_of(R, L, c->path);
}

static void free_compiled(resil_t *R) {
  while (R->compiled) {
    struct policy_compiled *c = R->compiled;
    R->compiled = c->next;
    free(c->path);
    free(c->src);
    free(c->bin);
    free(c);
  }
}

static int policy_searcher(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  const char *name = luaL_checkstring(L, 1);
  if (strncmp(name, "policies.", 9) != 0) return 0;
  const char *rest = luaL_gsub(L, name + 9, ".", "/");
  const char *dirs[3] = {R->policies_dir, "policies", NULL};
  char shipped[PATH_MAX];
  if (R->share_dir) {
    snprintf(shipped, sizeof shipped, "%s/policies", R->share_dir);
    dirs[2] = shipped;
  }
  luaL_Buffer tried;
  luaL_buffinit(L, &tried);
  for (int i = 0; i < 3; i++) {
    if (!dirs[i]) continue;
    const char *path = lua_pushfstring(L, "%s/%s.lua", dirs[i], rest);
    /* (from the folder the host was opened in: after a program's chdir, the policy folders it
     * named were looked for in its new folder, and every call of a policy not loaded yet failed) */
    char full[PATH_MAX];
    const char *file = host_path(R, path, full, sizeof full);
    if (file_exists(file)) {
      reload_watch_folder_of(R, L, file); /* (before the load: a file saved broken is watched for its fix) */
      if (load_policy_file(R, L, file, path, R->sandbox ? "t" : NULL) != LUA_OK)
        return luaL_error(L, "error loading policy '%s':\n\t%s", name, lua_tostring(L, -1));
      lua_pushstring(L, path);
      return 2;
    }
    lua_pushfstring(L, "\n\tno file '%s'", path);
    lua_remove(L, -2);
    luaL_addvalue(&tried);
  }
  luaL_pushresult(&tried);
  return 1;
}

static void install_policy_searcher(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "searchers");
  int n = (int)luaL_len(L, -1);
  for (int i = n; i >= 2; i--) { /* shift to make room at position 2 */
    lua_rawgeti(L, -1, i);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushcfunction(L, policy_searcher);
  lua_rawseti(L, -2, 2);
  lua_pop(L, 2);
}

static int has_policies(const char *dir) {
  char probe[PATH_MAX + 32];
  struct stat st;
  snprintf(probe, sizeof probe, "%s/policies", dir);
  return stat(probe, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The shipped policies: $RESIL_HOME; next to the binary in a build tree;
 * <prefix>/share/resil of the installation this code was loaded from
 * (libresil.so's folder, or the binary's, /../share/resil: right for a
 * prefix chosen at install time); else the prefix compiled in. */
static char *find_share_dir(void) {
  const char *env = getenv("RESIL_HOME");
  if (env && *env) return strdup(env);
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) {
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash) {
      *slash = '\0';
      char tree[PATH_MAX + 32];
      snprintf(tree, sizeof tree, "%s/src/resil.h", exe); /* the build tree, not any folder with policies */
      if (has_policies(exe) && file_exists(tree)) return strdup(exe);
    }
  }
  Dl_info info;
  char here[PATH_MAX], share[PATH_MAX + 32];
  if (dladdr((void *)find_share_dir, &info) && info.dli_fname && realpath(info.dli_fname, here)) {
    char *slash = strrchr(here, '/');
    if (slash) {
      *slash = '\0';
      snprintf(share, sizeof share, "%s/../share/resil", here);
      char real[PATH_MAX];
      if (realpath(share, real) && has_policies(real)) return strdup(real);
    }
  }
  return strdup(RESIL_SHAREDIR);
}

/* ---------- the resil module ---------- */

static const struct {
  const char *field; /* NULL: merged into resil itself */
  lua_CFunction open;
} primitives[] = {
  {NULL, luaopen_resil_error},
  {NULL, luaopen_resil_loop},
  {"http", luaopen_resil_http},
  {"json", luaopen_resil_json},
  {"log", luaopen_resil_log},
  {"server", luaopen_resil_server},
  {"crypto", luaopen_resil_crypto},
  {"url", luaopen_resil_url},
  {NULL, luaopen_resil_semaphore},
  {NULL, luaopen_resil_reload},
  {NULL, luaopen_resil_stop},
  {NULL, luaopen_resil_redact},
  {"sqlite", luaopen_resil_sqlite},
  {"redis", luaopen_resil_redis},
};

/* C primitives that a Lua module wraps and owns the public name of
 * (src/lua/limits.lua owns resil.bucket and resil.breaker): required, never
 * merged into resil. */
static const struct {
  const char *module;
  lua_CFunction open;
} internal_primitives[] = {
  {"resil.core.bucket", luaopen_resil_bucket},
  {"resil.core.breaker", luaopen_resil_breaker},
  {"resil.core.metrics", luaopen_resil_metrics},
  {"resil.core.flat_json", luaopen_resil_flat_json},
  {"resil.core.watchdog", luaopen_resil_watchdog},
  {"resil.core.journal", luaopen_resil_journal},
};

#define RESIL_TABLE_KEY "resil.module" /* the resil table, for the embedded modules' loaders */
#define HOST_ENV_KEY "resil.host_env"  /* the host's own globals: the sandbox is for scripts only */
#define PRIVATE_KEY "resil.private"    /* what the host's modules alone hold (below) */

void resil_push_host_env(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, HOST_ENV_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  }
}

/* package.preload["resil.<name>"]: compile the embedded module and run it
 * with the resil table (modules load while resil itself is still loading,
 * so they cannot require it) and the private table: what the host's modules
 * hold and scripts never get (the resil table, and every module table a
 * script may require, are the scripts' too, and theirs to change). */
static int load_embedded(lua_State *L) {
  const resil_lua_module *m = lua_touserdata(L, lua_upvalueindex(1));
  char chunkname[64];
  snprintf(chunkname, sizeof chunkname, "=[resil %s]", m->name);
  if (luaL_loadbuffer(L, m->source, strlen(m->source), chunkname) != LUA_OK) return lua_error(L);
  resil_push_host_env(L);
  lua_setupvalue(L, -2, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, RESIL_TABLE_KEY);
  lua_getfield(L, LUA_REGISTRYINDEX, PRIVATE_KEY);
  lua_call(L, 2, 1);
  return 1;
}

/* resil.redis.connect under the sandbox: refused. A raw connection sends any
 * command (FLUSHDB) to whatever server it names, the host's store's among
 * them, and no name of that server (localhost, 127.1, its address) can be
 * told from another's here: a sandboxed script uses Redis through
 * resil.store(url). The host's store connects through the private table. */
static int l_redis_connect(lua_State *L) {
  if (resil_from_lua(L)->sandbox)
    return luaL_error(L, "resil.redis.connect is not allowed in the sandbox (resil_options.sandbox, --sandbox): "
                         "a Redis store is used through resil.store(url)");
  luaL_checktype(L, 1, LUA_TTABLE); /* (here: called from this C function, the real one's error named no line) */
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

/* private.plain_file(path) -> whether path is a regular file or nothing (not a link, a device, a
 * FIFO): what a write through a temp file and a rename may replace (report.lua: `--html
 * /dev/stdout` replaced the system's /dev/stdout with a file, a symlinked page with a copy) */
static int l_plain_file(lua_State *L) {
  struct stat st;
  const char *path = luaL_checkstring(L, 1);
  lua_pushboolean(L, lstat(path, &st) == 0 ? S_ISREG(st.st_mode) : errno == ENOENT);
  return 1;
}

/* L stack: resil -> resil. The private table (the embedded modules' second
 * argument): the store's own opens, which may name the host's store (the
 * host's SQLite file; its Redis server), and what the Lua modules leave
 * there for each other (store.lua's backend_of: a store's backend, which
 * carries the raw db or connection, is never on the store object). */
static void make_private(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, resil_sqlite_open_store);
  lua_setfield(L, -2, "sqlite_open");
  lua_pushcfunction(L, resil_l_sensitive_field);
  lua_setfield(L, -2, "sensitive_field");
  lua_pushcfunction(L, resil_l_store_clock);
  lua_setfield(L, -2, "store_clock");
  lua_pushcfunction(L, l_plain_file);
  lua_setfield(L, -2, "plain_file");
  lua_pushcfunction(L, resil_l_owner_opened);
  lua_setfield(L, -2, "owner_opened");
  lua_pushcfunction(L, resil_l_owner_state);
  lua_setfield(L, -2, "owner_state");
  lua_getfield(L, -2, "redis");
  lua_getfield(L, -1, "connect");
  lua_pushvalue(L, -1);
  lua_setfield(L, -4, "redis_connect");
  lua_pushcclosure(L, l_redis_connect, 1);
  lua_setfield(L, -2, "connect");
  lua_pop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, PRIVATE_KEY);
}

static void register_modules(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (const resil_lua_module *m = resil_lua_modules; m->name; m++) {
    lua_pushfstring(L, "resil.%s", m->name);
    lua_pushlightuserdata(L, (void *)m);
    lua_pushcclosure(L, load_embedded, 1);
    lua_settable(L, -3);
  }
  for (size_t i = 0; i < sizeof internal_primitives / sizeof internal_primitives[0]; i++) {
    lua_pushcfunction(L, internal_primitives[i].open);
    lua_setfield(L, -2, internal_primitives[i].module);
  }
  lua_pop(L, 1);
}

/* resil.hash(s) -> 16 hex digits (FNV-1a, 64 bit): fingerprints and ids,
 * not security */
static int l_hash(lua_State *L) {
  size_t len;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  uint64_t h = 14695981039346656037ULL;
  for (size_t i = 0; i < len; i++) h = (h ^ s[i]) * 1099511628211ULL;
  char hex[17];
  snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
  lua_pushstring(L, hex);
  return 1;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static int luaopen_resil(lua_State *L) {
  lua_newtable(L);
  for (size_t i = 0; i < sizeof primitives / sizeof primitives[0]; i++) {
    lua_pushcfunction(L, primitives[i].open);
    lua_call(L, 0, 1);
    if (primitives[i].field) {
      lua_setfield(L, -2, primitives[i].field);
      continue;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_settable(L, -5);
    }
    lua_pop(L, 1);
  }
  lua_pushcfunction(L, l_isatty);
  lua_setfield(L, -2, "isatty");
  lua_pushcfunction(L, l_hash);
  lua_setfield(L, -2, "hash");
  lua_pushliteral(L, RESIL_VERSION);
  lua_setfield(L, -2, "version");
  lua_newtable(L); /* resil_register's functions */
  lua_setfield(L, -2, "host");

  /* the Lua half (src/lua/), starting with the prelude, which requires the rest */
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, RESIL_TABLE_KEY);
  make_private(L);
  register_modules(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil.prelude");
  lua_call(L, 1, 0);
  return 1;
}

/* ---------- the sandbox ---------- */

/* A path whose last name is a symbolic link is where the link points: the
 * folder alone was resolved, and a link in an allowed folder (one a policy
 * author put in the policy repository, `data.txt -> /etc/shadow`, or one to a
 * file not there yet, `notes.txt -> ~/.bashrc`, which opening to write makes)
 * was read or written wherever it pointed. -> 1 with the target in real, 0
 * for no link, -1 for a link to nothing (its target is not checked: refused). */
static int link_target(const char *path, char real[PATH_MAX]) {
  struct stat st;
  if (lstat(path, &st) != 0 || !S_ISLNK(st.st_mode)) return 0;
  return realpath(path, real) ? 1 : -1;
}

/* canonical(path) -> the absolute path with its folder resolved (symlinks,
 * "..") | nil when that folder does not exist: what io.open checks under the
 * sandbox. */
static int l_canonical(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char dir[PATH_MAX], real[PATH_MAX];
  switch (link_target(path, real)) {
  case 1: lua_pushstring(L, real); return 1;
  case -1: return 0;
  }
  const char *slash = strrchr(path, '/');
  const char *base = slash ? slash + 1 : path;
  if (!slash) snprintf(dir, sizeof dir, ".");
  else if (slash == path) snprintf(dir, sizeof dir, "/");
  else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
  if (!realpath(dir, real)) return 0;
  if (strcmp(base, "..") == 0 || strcmp(base, ".") == 0 || !*base) {
    lua_pushstring(L, real); /* a folder itself; checked as such */
    return 1;
  }
  lua_pushfstring(L, "%s%s%s", real, strcmp(real, "/") == 0 ? "" : "/", base);
  return 1;
}

static char *resolved_path(const char *path);

/* L stack: list -> list with dir appended (canonical). One not there yet is
 * appended where it would be: a script made ./policies in its folder (a store
 * there makes its folders) and wrote a file in it, which require then loaded
 * as a policy, with the policies' own state. */
static void add_dir(lua_State *L, const char *dir) {
  char real[PATH_MAX];
  if (!dir) return;
  if (realpath(dir, real)) lua_pushstring(L, real);
  else {
    char *placed = resolved_path(dir);
    if (!placed) return;
    lua_pushstring(L, placed);
    free(placed);
  }
  lua_rawseti(L, -2, (lua_Integer)luaL_len(L, -2) + 1);
}

/* path made absolute with its existing part resolved (symlinks, ".."), the
 * rest (folders not made yet) appended as written -> malloc'd | NULL when
 * the rest holds "." or ".." (it cannot be placed without the folders) */
static char *resolved_path(const char *path) {
  char head[PATH_MAX], real[PATH_MAX];
  switch (link_target(path, real)) {
  case 1: return strdup(real);
  case -1: return NULL;
  }
  if (snprintf(head, sizeof head, "%s", path) >= (int)sizeof head) return NULL;
  const char *rest = "";
  for (;;) {
    char *slash = strrchr(head, '/');
    if (!slash) { /* a name in the working directory, or a chain of missing folders in it */
      if (!realpath(".", real)) return NULL;
      rest = path;
      break;
    }
    *slash = '\0';
    if (realpath(*head ? head : "/", real)) {
      rest = path + (slash - head) + 1;
      break;
    }
  }
  for (const char *p = rest; *p;) { /* the part not resolved: no "." or ".." in it */
    size_t n = strcspn(p, "/");
    if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) return NULL;
    p += n + (p[n] == '/');
  }
  size_t len = strlen(real) + 1 + strlen(rest) + 1;
  char *out = malloc(len);
  if (out) snprintf(out, len, "%s%s%s", real, strcmp(real, "/") == 0 ? "" : "/", rest);
  return out;
}

/* The store and io.open are not the only way to a file: resil.sqlite.open (a
 * store at a URL the script names: resil.store(url), resil.store_config)
 * made a file, and its folders, anywhere, with content the script chose
 * (a row of text in a file named for cron or a shell's profile). */
static int sandbox_dir_ok(resil_t *R, const char *path) {
  if (strcmp(path, ":memory:") == 0 || !*path) return 1; /* no file */
  if (strncmp(path, "file:", 5) == 0) return 0; /* SQLite reads it as a URI: the file is elsewhere in it */
  char *full = resolved_path(path);
  int ok = 0;
  for (char **d = R->sandbox_dirs; full && *d && !ok; d++) {
    size_t n = strlen(*d);
    ok = strncmp(full, *d, n) == 0 && (full[n] == '/' || full[n] == '\0' || strcmp(*d, "/") == 0);
  }
  free(full);
  return ok;
}

int sandbox_file_ok(resil_t *R, const char *path) {
  if (!R->sandbox || !R->sandbox_dirs || R->sandbox_trusted > 0) return 1;
  if (R->sandbox_store && strcmp(path, R->sandbox_store) == 0) return 1;
  return sandbox_dir_ok(R, path);
}

/* path is the host's own store or one of SQLite's files beside it */
int sandbox_is_store_file(resil_t *R, const char *path) {
  if (!R->sandbox_store || !*R->sandbox_store || strcmp(R->sandbox_store, ":memory:") == 0) return 0;
  char *full = resolved_path(path), *store = resolved_path(R->sandbox_store);
  int same = 0;
  if (full && store) {
    size_t n = strlen(store);
    same = strncmp(full, store, n) == 0 && (full[n] == '\0' || strcmp(full + n, "-wal") == 0 ||
                                            strcmp(full + n, "-shm") == 0 || strcmp(full + n, "-journal") == 0);
  }
  free(full);
  free(store);
  return same;
}

/* A file a sandboxed script writes itself (a metrics file, io.open to write):
 * in its folders, and never the host's own store (the exception above is
 * for opening it as a store: written over, the ledger was gone) */
int sandbox_plain_file_ok(resil_t *R, const char *path) {
  if (!R->sandbox || !R->sandbox_dirs || R->sandbox_trusted > 0) return 1;
  return !sandbox_is_store_file(R, path) && sandbox_dir_ok(R, path);
}

void sandbox_trust(resil_t *R, int on) { R->sandbox_trusted += on ? 1 : -1; }

const char *host_path(resil_t *R, const char *path, char *out, size_t size) {
  if (path[0] == '/' || !R->open_dir || !*path || strcmp(path, ":memory:") == 0 || strncmp(path, "file:", 5) == 0)
    return path;
  if (snprintf(out, size, "%s%s%s", R->open_dir, strcmp(R->open_dir, "/") == 0 ? "" : "/", path) >= (int)size)
    return path;
  return out;
}

/* the SQLite file a store URL names (sqlite://PATH?query or PATH) | NULL for Redis */
static char *store_file(const char *url) {
  if (strncmp(url, "redis://", 8) == 0 || strncmp(url, "rediss://", 9) == 0) return NULL;
  if (strncmp(url, "sqlite://", 9) == 0) url += 9;
  return strndup(url, strcspn(url, "?"));
}

/* the folders sandboxed scripts may write in, as resil.sandbox_env gets them */
static void keep_sandbox_dirs(resil_t *R, const resil_options *opts) {
  const char *env = getenv("RESIL_STORE");
  char *named = store_file(opts->store ? opts->store : env && *env ? env : ".resil/state.db"), full[PATH_MAX];
  const char *file = named ? host_path(R, named, full, sizeof full) : NULL; /* (as the store's open names it) */
  R->sandbox_store = file == full ? strdup(full) : named;
  if (file == full) free(named);
  int n = 0;
  char *copy = opts->sandbox_dirs ? strdup(opts->sandbox_dirs) : NULL, *save = NULL;
  for (const char *p = copy; p && *p; p++) n += *p == ':';
  R->sandbox_dirs = calloc((size_t)n + 2, sizeof *R->sandbox_dirs);
  if (!R->sandbox_dirs) {
    free(copy);
    return;
  }
  int i = 0;
  for (char *d = copy ? strtok_r(copy, ":", &save) : NULL; d; d = strtok_r(NULL, ":", &save)) {
    char real[PATH_MAX];
    if (realpath(d, real) && (R->sandbox_dirs[i] = strdup(real))) i++;
  }
  free(copy);
}

/* L stack: resil -> resil. Scripts get resil.sandbox_env's table as their
 * globals; what was loaded before (the host's modules) keeps the old one. */
static void apply_sandbox(resil_t *R, const resil_options *opts) {
  lua_State *L = R->L;
  keep_sandbox_dirs(R, opts);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_setfield(L, LUA_REGISTRYINDEX, HOST_ENV_KEY);
  lua_getfield(L, -1, "sandbox_env");
  lua_pushcfunction(L, l_canonical);
  lua_newtable(L);
  for (char **d = R->sandbox_dirs; d && *d; d++) { /* (canonical already) */
    lua_pushstring(L, *d);
    lua_rawseti(L, -2, (lua_Integer)(d - R->sandbox_dirs) + 1);
  }
  lua_newtable(L);
  add_dir(L, R->policies_dir);
  add_dir(L, "policies");
  if (R->share_dir) {
    char shipped[PATH_MAX];
    snprintf(shipped, sizeof shipped, "%s/policies", R->share_dir);
    add_dir(L, shipped);
  }
  if (lua_pcall(L, 3, 1, 0) != LUA_OK) { /* only without memory: scripts keep the host's globals */
    resil_set_error(R, lua_tostring(L, -1));
    lua_pop(L, 1);
    return;
  }
  lua_rawseti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  /* the C loaders stay out of reach of the scripts' require: they use the
   * host's, which only the sandbox's require calls, for resil and policies */
  lua_getfield(L, LUA_REGISTRYINDEX, HOST_ENV_KEY);
  lua_getfield(L, -1, "package");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "cpath");
  lua_getfield(L, -1, "searchers");
  for (lua_Integer i = luaL_len(L, -1); i > 3; i--) { /* preload, policies, Lua files: the C ones go */
    lua_pushnil(L);
    lua_rawseti(L, -2, i);
  }
  lua_pop(L, 3);
}

/* ---------- lifecycle ---------- */

/* A peer that hung up makes the next write to its socket raise SIGPIPE,
 * whose default kills the process: libevent's bufferevents write with plain
 * writev, so one client that sent pipelined requests and reset its
 * connection killed a gateway (exit 141, its queued ledger rows lost). The
 * write's EPIPE is handled where it happens. So for SIGXFSZ: a write past the
 * process's file-size limit (ulimit -f, a service's LimitFSIZE) killed it
 * (153) at the SQLite store's next commit, saying nothing; ignored, the write
 * fails EFBIG and the store refuses it unwritten, as on a full disk. A
 * program that chose its own disposition (a handler, or ignoring it) keeps it. */
static void on_quiet_signal(int signo) { (void)signo; }
static void quiet_default_signal(int signo) {
  struct sigaction now;
  if (sigaction(signo, NULL, &now) != 0 || (now.sa_flags & SA_SIGINFO) || now.sa_handler != SIG_DFL) return;
  /* a handler that does nothing, not SIG_IGN, which exec keeps: the
   * programs os.execute and io.popen start get SIGPIPE at its default (a
   * shell's `producer | head -1` ends) */
  struct sigaction quiet = {0};
  quiet.sa_handler = on_quiet_signal;
  quiet.sa_flags = SA_RESTART;
  sigemptyset(&quiet.sa_mask);
  sigaction(signo, &quiet, NULL);
}

static resil_t *open_host(const resil_options *opts) {
  resil_t *R = calloc(1, sizeof *R);
  if (!R) return NULL;
  R->wake_pipe[0] = R->wake_pipe[1] = -1;
  R->pid = getpid();
  R->loop_thread = pthread_self(); /* until a loop runs elsewhere: where resil_interrupt's signal goes */
  R->max_instructions = opts->max_instructions;
  R->mem_limit = opts->max_memory;
  if (pipe2(R->wake_pipe, O_NONBLOCK | O_CLOEXEC) != 0) R->wake_pipe[0] = R->wake_pipe[1] = -1;
  R->base = opts->base;
  if (!R->base) {
    /* the changelist turns curl's frequent del+add of a socket's interest
     * into one epoll_ctl per loop turn */
    struct event_config *cfg = event_config_new();
    if (cfg) event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    R->base = cfg ? event_base_new_with_config(cfg) : event_base_new();
    if (cfg) event_config_free(cfg);
    R->owns_base = 1;
  }
  R->L = R->base ? lua_newstate(host_alloc, R) : NULL;
  if (!R->L) {
    resil_close(R);
    return NULL;
  }
  R->policies_dir = opts->policies_dir ? strdup(opts->policies_dir) : NULL;
  /* `--policies conf/`, as a shell completes it: every message named conf//x.lua */
  for (size_t n = R->policies_dir ? strlen(R->policies_dir) : 0; n > 1 && R->policies_dir[n - 1] == '/'; n--)
    R->policies_dir[n - 1] = '\0';
  char cwd[PATH_MAX];
  R->open_dir = getcwd(cwd, sizeof cwd) ? strdup(cwd) : NULL;
  R->share_dir = find_share_dir();
  loop_init(R);

  lua_State *L = R->L;
  /* new threads copy the main thread's extra space: NULL means "not a task" */
  *(void **)lua_getextraspace(L) = NULL;
  lua_atpanic(L, host_panic);
  /* The state's oldest object with a finalizer: lua_close runs finalizers newest first, so when
   * this one runs no Lua runs again (the watchdog's stop of a looping one is armed until then) */
  lua_newuserdatauv(L, 0, 0);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, finalizers_over);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  luaL_ref(L, LUA_REGISTRYINDEX);
  luaL_openlibs(L);
  log_warnings_init(R);
  /* Generational GC: a gateway request's garbage dies young, and the
   * incremental collector's cycles over the whole heap (policies, registry,
   * caches) ran inside requests: p99 at one connection 0.92 -> 0.50 ms,
   * throughput unchanged. Old garbage is collected in full now and then
   * (gc_full.c). A script may still choose collectgarbage("incremental"). */
  gc_full_init(R);
  loop_guard_coroutines(L); /* before any script can keep the library's own */
  hooks_back_check(L);
  lua_getglobal(L, "os");
  lua_pushcfunction(L, host_os_exit);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
  install_policy_searcher(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_resil);
  lua_setfield(L, -2, "resil");
  lua_pop(L, 1);

  /* load resil now so that a broken build fails here, not mid-script */
  lua_pushcfunction(L, resil_traceback);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil");
  if (lua_pcall(L, 1, 1, -3) != LUA_OK) {
    fprintf(stderr, "resil-lua: cannot load the resil module: %s\n", lua_tostring(L, -1));
    resil_close(R);
    return NULL;
  }
  if (opts->log_file || opts->log_level) {
    lua_getfield(L, -1, "log");
    if (opts->log_file) {
      lua_getfield(L, -1, "output");
      lua_pushstring(L, opts->log_file);
      if (lua_pcall(L, 1, 2, 0) != LUA_OK) {
        resil_set_error(R, lua_tostring(L, -1));
        lua_pop(L, 1);
      } else {
        if (lua_isnil(L, -2)) { /* nil, err: the file cannot be opened */
          resil_set_error(R, resil_describe(L, -1));
          lua_pop(L, 1);
        }
        lua_pop(L, 2);
      }
    }
    if (opts->log_level) {
      lua_getfield(L, -1, "level");
      lua_pushstring(L, opts->log_level);
      if (lua_pcall(L, 1, 0, 0) != LUA_OK) { /* (the option named: Lua's own says "bad argument #1 to '?'") */
        char msg[256];
        snprintf(msg, sizeof msg, "resil_options.log_level: '%.64s' is not a level (debug, info, warn, error, off)",
                 opts->log_level);
        resil_set_error(R, msg);
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  /* the store's settings, read when a script first uses the store; an
   * unknown URL scheme is refused now */
  lua_getfield(L, -1, "store_config");
  lua_createtable(L, 0, 3);
  if (opts->store) lua_pushstring(L, opts->store), lua_setfield(L, -2, "url");
  if (opts->run_id) lua_pushstring(L, opts->run_id), lua_setfield(L, -2, "run");
  lua_pushboolean(L, opts->fresh), lua_setfield(L, -2, "fresh");
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    resil_set_error(R, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
  if (opts->virtual_clock) clock_set_virtual(R, 1);
  R->sandbox = opts->sandbox != RESIL_SANDBOX_OFF;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil");
  lua_call(L, 1, 1);
  if (R->sandbox) apply_sandbox(R, opts);
  lua_pushnil(L);
  lua_setfield(L, -2, "sandbox_env");
  lua_pop(L, 1);
  if (opts->log) { /* after log_file: the callback wins */
    R->log_fn = opts->log;
    R->log_ud = opts->log_ud;
  }
  return R;
}

resil_t *resil_open(const resil_options *opts) {
  resil_options defaults = {0};
  if (!opts) opts = &defaults;
  quiet_default_signal(SIGPIPE);
  quiet_default_signal(SIGXFSZ);
  watchdog_signal_install(); /* (resil_interrupt from another thread, and the watchdog, signal the loop's) */
  locale_t c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
  locale_t caller = c_locale ? uselocale(c_locale) : (locale_t)0;
  resil_t *R = open_host(opts);
  host_locale_leave(caller);
  if (R) R->c_locale = c_locale;
  else if (c_locale) freelocale(c_locale);
  return R;
}

static void name_run(resil_t *R, const char *name, const char *code);

/* L stack: chunk -> (queued as the main task) */
static int start_main(resil_t *R, int argc, char **argv, const char *script, const char *source, size_t source_len) {
  lua_State *L = R->L;
  lua_createtable(L, argc, 1);
  lua_pushstring(L, script);
  lua_rawseti(L, -2, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushvalue(L, -1);
  lua_setglobal(L, "arg");
  /* the default run id derives from the script and its arguments: set through the private
   * table's store_config_host, as under the sandbox a script's store_config refuses them */
  lua_getfield(L, LUA_REGISTRYINDEX, PRIVATE_KEY);
  lua_getfield(L, -1, "store_config_host");
  lua_createtable(L, 0, 3);
  lua_pushstring(L, script), lua_setfield(L, -2, "script");
  lua_pushvalue(L, -4), lua_setfield(L, -2, "args");
  char abs[PATH_MAX];
  if (source) { /* stdin: no path; the text names the run (two scripts piped in were one run) */
    lua_pushliteral(L, "-\n");
    lua_pushlstring(L, source, source_len);
    lua_concat(L, 2);
    lua_setfield(L, -2, "script_path");
  } else if (realpath(script, abs)) lua_pushstring(L, abs), lua_setfield(L, -2, "script_path");
  lua_call(L, 1, 0);
  lua_pop(L, 2);
  name_run(R, NULL, NULL);
  for (int i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
  task_spawn_main(R, argc);
  return RESIL_OK;
}

/* L stack: message -> (resil_error). Under the sandbox the main script is
 * source text, as load and loadfile's are: Lua does not check bytecode, and
 * a crafted chunk reads and writes the process's memory. */
static void set_load_error(resil_t *R, const char *name) {
  const char *msg = lua_tostring(R->L, -1);
  char refused[PATH_MAX + 64];
  if (msg && strncmp(msg, "attempt to load a binary chunk", 30) == 0) {
    snprintf(refused, sizeof refused, "%s: binary chunks are not allowed in the sandbox", name);
    msg = refused;
  }
  resil_set_error(R, msg);
  lua_pop(R->L, 1);
}

static int load_file(resil_t *R, const char *path, int argc, char **argv) {
  int is_stdin = path == NULL || strcmp(path, "-") == 0;
  if (!is_stdin) {
    FILE *f = fopen(path, "r");
    if (!f) {
      char msg[PATH_MAX + 64];
      snprintf(msg, sizeof msg, "cannot open %s: %s", path, strerror(errno));
      resil_set_error(R, msg);
      return RESIL_ERR_FILE;
    }
    fclose(f);
  }
  if (is_stdin) { /* read whole: its text names its run (start_main) */
    luaL_Buffer b;
    luaL_buffinit(R->L, &b);
    size_t n;
    do {
      char *p = luaL_prepbuffer(&b);
      n = fread(p, 1, LUAL_BUFFERSIZE, stdin);
      luaL_addsize(&b, n);
    } while (n == LUAL_BUFFERSIZE);
    luaL_pushresult(&b); /* (kept under the chunk until start_main has it) */
    size_t len;
    const char *text = lua_tolstring(R->L, -1, &len);
    const char *body = text;
    size_t body_len = len;
    if (body_len >= 3 && memcmp(body, "\xEF\xBB\xBF", 3) == 0) body += 3, body_len -= 3; /* a BOM, as luaL_loadfilex */
    if (body_len > 0 && body[0] == '#') { /* a #! line, as luaL_loadfilex skips it */
      const char *nl = memchr(body, '\n', body_len);
      body_len = nl ? body_len - (size_t)(nl - body) : 0;
      body = nl ? nl : body + len;
    }
    if (luaL_loadbufferx(R->L, body, body_len, "=stdin", R->sandbox ? "t" : NULL) != LUA_OK) {
      set_load_error(R, "stdin");
      lua_pop(R->L, 1);
      return RESIL_ERR_SCRIPT;
    }
    int status = start_main(R, argc, argv, "-", text, len); /* (takes the chunk above the text) */
    lua_pop(R->L, 1);
    return status;
  }
  int loaded = luaL_loadfilex(R->L, path, R->sandbox ? "t" : NULL);
  if (loaded != LUA_OK) {
    set_load_error(R, path);
    /* (a file that cannot be read, a directory: not a script's error) */
    return loaded == LUA_ERRFILE ? RESIL_ERR_FILE : RESIL_ERR_SCRIPT;
  }
  return start_main(R, argc, argv, path, NULL, 0);
}

/* From a callback (a resil_register function, the log callback): a script loaded there replaced
 * the main task under way, and resil_run said RESIL_OK of a first script that had raised */
static int loaded_in_loop(resil_t *R, const char *what) {
  char msg[200];
  if (R->in_loop || R->current || R->host_L) {
    snprintf(msg, sizeof msg, "%s: called from inside the host's loop (a task, a handler or a callback)", what);
  } else if (R->main_task && !task_started(R->main_task)) {
    /* (it became a task like any other: its failure was said to nobody, resil_run returned
     * RESIL_OK, and its steps went to the next chunk's run) */
    snprintf(msg, sizeof msg, "%s: the chunk loaded before has not run yet (resil_run or resil_step it first)", what);
  } else {
    return 0;
  }
  resil_set_error(R, msg);
  return 1;
}

int resil_load_file(resil_t *R, const char *path, int argc, char **argv) {
  if (resil_refused(R, "resil_load_file") || loaded_in_loop(R, "resil_load_file")) return RESIL_ERR_USAGE;
  if (argc < 0 || (argc > 0 && !argv)) {
    resil_set_error(R, "resil_load_file: argc must be >= 0, with argv holding argc strings");
    return RESIL_ERR_USAGE;
  }
  locale_t caller = host_locale_enter(R);
  int status = load_file(R, path, argc, argv);
  host_locale_leave(caller);
  return status;
}

/* The run a chunk's steps go to follows the chunk: its name and its code (runs.lua's name_chunk;
 * every chunk was one run, and two programs running different code replayed each other's paid
 * step results). The run held under the last chunk's or script's is ended as the last resil_run
 * ended (end_other_run). name NULL: a script, named already (start_main). */
static void name_run(resil_t *R, const char *name, const char *code) {
  lua_State *L = R->L;
  int top = lua_gettop(L);
  /* an interrupt that came between calls is the next run's to report (it runs nothing): it cut
   * this bookkeeping instead, and the chunk's steps were checkpointed in another chunk's run
   * (resumed later, its paid steps ran again); one that comes meanwhile still stops it */
  sig_atomic_t pending = R->interrupted;
  R->interrupted = 0;
  lua_getfield(L, LUA_REGISTRYINDEX, PRIVATE_KEY);
  if (lua_getfield(L, -1, name ? "name_chunk" : "end_other_run") == LUA_TFUNCTION) {
    if (name) lua_pushstring(L, *name ? name : "(string)"), lua_pushstring(L, code);
    lua_pushstring(L, R->status == RESIL_OK ? "done" : R->status == RESIL_ERR_INTERRUPT ? "interrupted" : "failed");
    if (host_pcall(L, "resil_load", name ? 3 : 1, 0) != LUA_OK) /* (the chunk runs all the same) */
      redact_fprintf(R, stderr, "resil-lua: naming the chunk's run: %s\n", lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
  }
  if (pending && !R->interrupted) R->interrupted = pending;
  lua_settop(L, top);
}

int resil_load_string(resil_t *R, const char *code, const char *chunkname) {
  if (resil_refused(R, "resil_load_string") || loaded_in_loop(R, "resil_load_string")) return RESIL_ERR_USAGE;
  if (!code) {
    resil_set_error(R, "resil_load_string: no code");
    return RESIL_ERR_USAGE;
  }
  const char *name = chunkname ? chunkname : "=(string)";
  if (luaL_loadbufferx(R->L, code, strlen(code), name, R->sandbox ? "t" : NULL) != LUA_OK) {
    set_load_error(R, name + (*name == '=' || *name == '@'));
    return RESIL_ERR_SCRIPT;
  }
  name_run(R, name + (*name == '=' || *name == '@'), code);
  task_spawn_main(R, 0);
  return RESIL_OK;
}

int resil_run(resil_t *R) {
  if (resil_refused(R, "resil_run")) return RESIL_ERR_USAGE;
  /* from a callback (a resil_register function): a loop inside the loop waited for
   * the task that called it, which cannot end while it waits: a hang */
  if (R->in_loop || R->current || R->host_L) {
    resil_set_error(R, "resil_run: called from inside the host's loop (a task, a handler or a callback)");
    return RESIL_ERR_USAGE;
  }
  api_enter(R);
  int status = R->status = loop_run(R);
  if (status == RESIL_ERR_SCRIPT) embed_name_memory_cap(R);
  api_leave(R);
  return status;
}

void api_enter(resil_t *R) { R->in_api++; }

int api_leave(resil_t *R) {
  if (--R->in_api > 0 || !R->close_pending || R->in_loop) return 0;
  R->close_pending = 0;
  resil_close(R);
  return 1;
}

int resil_set_max_task_seconds(resil_t *R, double seconds) {
  if (!R || R->pid != getpid() || R->closing) return RESIL_ERR_USAGE;
  if (seconds != seconds || seconds < 0 || seconds > 1e9) return RESIL_ERR_USAGE;
  return watchdog_set(R, seconds) == 0 ? RESIL_OK : RESIL_ERR_MEMORY;
}

void resil_interrupt(resil_t *R, int signo) {
  if (!R) return;
  R->interrupted_at[0] = '\0'; /* (where the last one stopped, reported already) */
  R->interrupted = signo ? signo : SIGINT;
  if (!watchdog_forward(R, FORWARD_INTERRUPT)) loop_interrupt_running(R);
  if (R->wake_pipe[1] >= 0) {
    ssize_t ignored = write(R->wake_pipe[1], "!", 1);
    (void)ignored;
  }
}

/* Re-load every loaded policy module into a fresh environment; swap them in
 * only if all of them load, so a broken edit leaves the old version serving. */
void resil_close(resil_t *R) {
  if (!R) return;
  /* a child of fork leaves the parent's copy as it is: closing it waited
   * forever for the store's thread (not in the child), and its finalizers
   * would end connections and files the parent still uses. Its memory is
   * the parent's pages, shared until written. */
  if (R->pid != getpid() || R->closing) return;
  /* from a callback (a call's done, a resil_register function): the loop,
   * a task or a handler is in use below it. Closed when the public function
   * that called back returns, or, on the program's own event base, by the
   * pump at its next turn; it freed all of that under them. */
  if (R->in_loop || R->current || R->host_L || R->in_api) {
    if (!R->close_pending && !R->in_api && R->pump_ev) event_active(R->pump_ev, EV_TIMEOUT, 0);
    R->close_pending = 1;
    return;
  }
  R->closing = 1;
  /* the watchdog times the finalizers lua_close runs (one that looped held the exit for good); its
   * thread reads only atomics, and its signal's handler arms nothing there (loop_close_watched) */
  loop_close_watched(R, 1);
  locale_t c_locale = R->c_locale; /* the finalizers run Lua */
  locale_t caller = host_locale_enter(R);
  if (R->L) {
    R->current = NULL;
    embed_give_up(R);
    lua_close(R->L);
  }
  R->L = NULL;
  R->warn_L = NULL;
  owners_close(R); /* (after the give-up above, which wrote in its name) */
  loop_close_watched(R, 0);
  watchdog_free(R);
  embed_free(R);
  http_free(R);
  reload_free(R);
  redact_free(R);
  loop_free(R);
  if (R->base && R->owns_base) event_base_free(R->base);
  if (R->wake_pipe[0] >= 0) close(R->wake_pipe[0]);
  if (R->wake_pipe[1] >= 0) close(R->wake_pipe[1]);
  free(R->policies_dir);
  free(R->open_dir);
  free_compiled(R);
  free(R->share_dir);
  for (char **d = R->sandbox_dirs; d && *d; d++) free(*d);
  free(R->sandbox_dirs);
  free(R->sandbox_store);
  free(R->error);
  free(R);
  host_locale_leave(caller);
  if (c_locale) freelocale(c_locale);
}
