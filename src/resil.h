/*
 * resil.h: the public embedding API of resil-lua.
 *
 * A host instance (resil_t) owns one Lua 5.4 state and one libevent loop.
 * Scripts run as tasks (coroutines) on that loop. Several instances may live
 * in one process, one per thread: there is no global state.
 *
 *   resil_t *R = resil_open(NULL);
 *   if (resil_load_file(R, "pipeline.lua", argc, argv) != RESIL_OK ||
 *       resil_run(R) != RESIL_OK)
 *     fprintf(stderr, "%s\n", resil_error(R));
 *   resil_close(R);
 */
#ifndef RESIL_H
#define RESIL_H

#include <stddef.h>

#define RESIL_VERSION "0.1.0"

typedef struct resil resil_t;
struct lua_State;
struct event_base;

enum {
  RESIL_OK = 0,
  RESIL_ERR_SCRIPT = 1,   /* a syntax error, or the main task raised */
  RESIL_ERR_FILE = 2,     /* a script file could not be read */
  RESIL_ERR_MEMORY = 3,   /* allocation failed */
  RESIL_ERR_INTERRUPT = 4 /* stopped by resil_interrupt() */
};

typedef struct resil_options {
  struct event_base *base;  /* run on this loop instead of a private one */
  long max_instructions;    /* per task between yields; 0 = unlimited */
  size_t max_memory;        /* bytes for the Lua state; 0 = unlimited */
  int virtual_clock;        /* start with the virtual clock */
  const char *policies_dir; /* searched first for require "policies.x" */
  const char *log_file;     /* JSON lines go here instead of stderr */
  const char *log_level;    /* "debug" | "info" | "warn" | "error" */
  const char *store;        /* store URL: a SQLite path or redis://host:port/db; NULL: $RESIL_STORE or
                               .resil/state.db */
  const char *run_id;       /* the run resil.step checkpoints into; NULL: derived from script + args */
  int fresh;                /* start the run over: forget its checkpoints */
} resil_options;

/* A new host; opts may be NULL. NULL only when memory is exhausted. An
 * option it could not honour (a log file it cannot open, a store URL of an
 * unknown scheme) leaves resil_error() non-empty: the host then logs to
 * stderr and has no store URL set. */
resil_t *resil_open(const resil_options *opts);

/* Compile a script (path "-" or NULL reads stdin) and queue it as the first
 * task with argv[0..argc-1] as its arguments (`...`) and as the global arg. */
int resil_load_file(resil_t *R, const char *path, int argc, char **argv);
int resil_load_string(resil_t *R, const char *code, const char *chunkname);

/* Run the loop until no task is left (or the main task fails). */
int resil_run(resil_t *R);

/* The last error message, with a traceback when a task raised. Values read
 * through resil.secret and credential URL parameters (?key=...) are replaced
 * by [REDACTED]. */
const char *resil_error(resil_t *R);

/* Async-signal-safe: stop the running task and the loop. */
void resil_interrupt(resil_t *R, int signo);

/* Re-load every loaded policy module into a fresh environment (hot reload):
 * only when all of them load are they swapped in; otherwise the old ones keep
 * serving and resil_error() says what failed, with file:line. Call it from
 * the thread that runs the host, outside resil_run or between loop turns
 * (e.g. from a libevent callback on resil_event_base()). */
int resil_reload(resil_t *R);

/* Reload whenever a .lua file changes in a policy folder (--policies DIR,
 * ./policies, the shipped library), after 100 ms of quiet. on = 0 stops. */
int resil_watch(resil_t *R, int on);

/* Reload on SIGHUP (through libevent: the reload runs in the loop). */
int resil_reload_on_sighup(resil_t *R);

struct lua_State *resil_lua(resil_t *R);
struct event_base *resil_event_base(resil_t *R);

void resil_close(resil_t *R);

#endif
