/*
 * resil.h: the public embedding API of resil-lua.
 *
 * A host instance (resil_t) owns one Lua 5.4 state and one libevent loop.
 * Scripts run as tasks (coroutines) on that loop. Several instances may live
 * in one process, one per thread: there is no global state.
 *
 * Threads: a host is not thread-safe. Every function below takes the host
 * and must be called from one thread at a time, the thread that runs its
 * loop; only resil_interrupt may be called from elsewhere (another thread or
 * a signal handler), and only while the host is open: join that thread or
 * take the handler away before resil_close (the host's memory goes there).
 * Two threads with a host each need no locking. A thread that runs a host
 * needs 64 KiB of stack at least (resil_open takes some 40 KiB of it, a call
 * with JSON as deep as resil.json takes some 30 KiB); 128 KiB for scripts
 * that nest calls through C (pcall in pcall) up to Lua's own 200 levels.
 *
 * Locale: while the host runs (these functions, and its callbacks on an
 * event base you dispatch), the calling thread is in the C locale
 * (uselocale), so Lua writes 0.5, never 0,5, whatever LC_NUMERIC the program
 * set; it has its own back on return. Your callbacks from the host (log,
 * done, resil_register's functions) run in the C locale.
 *
 * fork: a host belongs to the process that opened it. In a child of fork,
 * the functions below refuse the parent's host (RESIL_ERR_USAGE) and
 * resil_close leaves it as it is: its store, connections and loop are the
 * parent's. A child opens a host of its own.
 *
 * Strings handed in are copied or used only during the call; strings handed
 * out are the host's (valid until the next call on it) unless a function
 * says "malloc'd": those are the caller's to free().
 *
 * Build with `pkg-config --cflags --libs resil` (Lua 5.4 and libevent come
 * with it: the header hands out a lua_State and takes an event_base).
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

/* The public API; everything else in libresil is hidden (-fvisibility=hidden),
 * so an embedding program's own names (loop_run, timer_init, ...) never clash
 * with or interpose on the library's. */
#if defined(__GNUC__)
#define RESIL_API __attribute__((visibility("default")))
#else
#define RESIL_API
#endif

#define RESIL_VERSION "0.1.0"

/* C linkage for a C++ program that includes this header */
#ifdef __cplusplus
extern "C" {
#endif

typedef struct resil resil_t;
struct lua_State;
struct event_base;

enum {
  RESIL_OK = 0,
  RESIL_ERR_SCRIPT = 1,   /* a syntax error, or the main task raised */
  RESIL_ERR_FILE = 2,     /* a script file could not be read */
  RESIL_ERR_MEMORY = 3,   /* allocation failed */
  RESIL_ERR_INTERRUPT = 4, /* stopped by resil_interrupt(), or the host closed first */
  RESIL_ERR_FAILED = 5,    /* resil_call: the function returned nil, err */
  RESIL_ERR_USAGE = 6      /* a bad argument or a call from the wrong place; nothing ran */
};

/* resil_options.sandbox */
enum {
  RESIL_SANDBOX_DEFAULT = 0, /* on: what resil_open(NULL) gives */
  RESIL_SANDBOX_ON = 1,
  RESIL_SANDBOX_OFF = -1 /* scripts get the whole standard library (the CLI's default) */
};

typedef struct resil_options {
  struct event_base *base;  /* run on this loop instead of a private one; it must outlive the host:
                               resil_close, then event_base_free (the host's events are on it) */
  long max_instructions;    /* per task between yields; 0 = unlimited */
  size_t max_memory;        /* bytes for the Lua state; 0 = unlimited */
  int virtual_clock;        /* start with the virtual clock */
  /* The folder that holds the policy files themselves: require "policies.x"
   * loads <policies_dir>/x.lua first, then ./policies/x.lua, then the shipped
   * library (<prefix>/share/resil/policies of the installation, or
   * $RESIL_HOME/policies). A relative folder (and ./policies) is from the
   * working directory at resil_open. */
  const char *policies_dir;
  const char *log_file;     /* JSON lines go here instead of stderr */
  const char *log_level;    /* "debug" | "info" | "warn" | "error" */
  const char *store;        /* store URL: a SQLite path or redis://host:port/db; NULL: $RESIL_STORE or
                               .resil/state.db; a relative path is from the working directory at resil_open */
  const char *run_id;       /* the run resil.step checkpoints into; NULL: derived from script + args */
  int fresh;                /* start the run over: forget its checkpoints */
  /* Each JSON log line (no trailing newline, NUL-terminated, valid during
   * the call) goes here instead of stderr or log_file. Called from the
   * host's thread, from inside Lua: it must not call back into the host. A
   * script's resil.log.output() switches to the file it names. */
  void (*log)(void *log_ud, const char *line);
  void *log_ud;
  /* Scripts and policies run with an allow-list environment: os.execute,
   * io.popen, os.exit, os.remove, os.rename, package.loadlib, debug, binary
   * chunks in load/loadfile/dofile and as the main script, and io.open/io.lines outside
   * sandbox_dirs and the policy folders are refused with an error naming the
   * function; require finds only resil and modules in the policy folders.
   * C code (resil_lua, resil_register's functions) is not limited. */
  int sandbox;              /* RESIL_SANDBOX_DEFAULT (on) | _ON | _OFF */
  const char *sandbox_dirs; /* ':'-separated folders io.open may read and write under the sandbox */
} resil_options;

/* A new host; opts may be NULL (all defaults, the sandbox on). NULL only when memory is exhausted;
 * every function below given a NULL host refuses it (RESIL_ERR_USAGE, NULL, 0, or nothing), and
 * resil_error(NULL) says so.
 * SIGPIPE, when it still has its default disposition (which kills the process at a write to a
 * socket its peer reset), is caught by a handler that does nothing from here on: the host's
 * servers handle EPIPE instead (and programs it starts get the default back at exec). An
 * option it could not honour (a log file it cannot open, a store URL of an
 * unknown scheme) leaves resil_error() non-empty: the host then logs to
 * stderr and has no store URL set. */
RESIL_API resil_t *resil_open(const resil_options *opts);

/* Compile a script (path "-" or NULL reads stdin) and queue it as the first
 * task with argv[0..argc-1] as its arguments (`...`) and as the global arg.
 * From inside the loop (a resil_register function, a callback) both are refused
 * with RESIL_ERR_USAGE, as resil_run is: the main task under way is not replaced. So is
 * a chunk loaded over one that has not run yet (resil_run or resil_step it first): the
 * first would have run as a task like any other, its failure reported to nobody. */
RESIL_API int resil_load_file(resil_t *R, const char *path, int argc, char **argv);
RESIL_API int resil_load_string(resil_t *R, const char *code, const char *chunkname); /* code NULL: RESIL_ERR_USAGE */

/* Run the loop until no task is left (or the main task fails). From inside the loop (a task's
 * resil_register function, a callback, one of the program's own events that its
 * event_base_dispatch of the host's base runs) it is refused with RESIL_ERR_USAGE, as resil_call
 * is. (From such an event of the program's, resil_call finds out at its first wait: libevent
 * refuses the loop there and says so on stderr; the call's task goes on, as after an interrupt.) */
RESIL_API int resil_run(resil_t *R);

/* The last error message, with a traceback when a task raised. Values read
 * through resil.secret and credential URL parameters (?key=...) are replaced
 * by [REDACTED]; a NUL byte in a script's message is written \0. */
RESIL_API const char *resil_error(resil_t *R);

/* The watchdog: a task that runs `seconds` of CPU time without yielding (a
 * policy that loops) is stopped with an error where it runs, "file:line:
 * task N (...) ran S s without yielding (--max-task-seconds=S)", as
 * max_instructions stops one (a __gc finalizer that loops in a task's
 * collection or as resil_close closes the state too, though Lua runs it
 * with hooks off: the log says it), but
 * at no cost while tasks yield (a thread of
 * the host's own looks at the loop four times a `seconds`). 0 turns it off
 * (the default; the CLI's gateway runs with 5). RESIL_ERR_USAGE for a
 * negative or NaN value. */
RESIL_API int resil_set_max_task_seconds(resil_t *R, double seconds);

/* Async-signal-safe: stop the running task and the loop. One that comes
 * while nothing runs (between calls) is reported once, by what runs next:
 * resil_run, resil_step, resil_call or resil_call_async returns
 * RESIL_ERR_INTERRUPT (-RESIL_ERR_INTERRUPT) and runs nothing; the next
 * one runs. On an event base you dispatch, the calls it stopped hear
 * RESIL_ERR_INTERRUPT in their done, and calls made after it run. From a
 * thread other than the one that runs the host (or a signal handler the
 * kernel ran on one), the running Lua is stopped by that thread itself: it
 * is sent SIGURG, whose handler resil_open installs (the watchdog's; it
 * passes SIGURG on to a handler the program set before the first
 * resil_open). A thread that blocks SIGURG has it unblocked while it runs
 * the host, and its mask back as the host returns. */
RESIL_API void resil_interrupt(resil_t *R, int signo);

/* Async-signal-safe: ask for a graceful stop. Nothing is cut: the task
 * waiting in resil.stop_requested(true) wakes with signo and decides (the
 * gateway stops accepting and finishes what is in flight). Returns 1 if a
 * task has waited for a stop, 0 if none has: nothing will act on it, and
 * the caller may resil_interrupt instead. */
RESIL_API int resil_request_stop(resil_t *R, int signo);

/* Re-load every loaded policy module into a fresh environment (hot reload):
 * only when all of them load are they swapped in; otherwise the old ones keep
 * serving and resil_error() says what failed, with file:line. Call it from
 * the thread that runs the host, outside resil_run or between loop turns
 * (e.g. from a libevent callback on resil_event_base()). */
RESIL_API int resil_reload(resil_t *R);

/* Reload whenever a .lua file changes in a policy folder (--policies DIR,
 * ./policies, the shipped library), after 100 ms of quiet. on = 0 stops.
 * The reload runs in a loop turn: resil_run, resil_step, your dispatch of
 * resil_options.base, or resil_call, which looks at the host's own base's
 * I/O first (unless resil_event_base handed that base to the program). */
RESIL_API int resil_watch(resil_t *R, int on);

/* Reload on SIGHUP (through libevent: the reload runs in the loop).
 * libevent hands signals to one event base per process, the one that added
 * a signal or looped last: a program with signal events on a libevent base
 * of its own (its SIGTERM, say) gives the host that base (resil_options.base),
 * or those events go missing while the host's own base holds the signals;
 * and of two hosts on bases of their own, only one would reload. Such a
 * program catches SIGHUP on its base and calls resil_reload for each host. */
RESIL_API int resil_reload_on_sighup(resil_t *R);

/* ---------- calling Lua from C ---------- */

/* Call fn with the arguments in json_args (a JSON array; NULL: none) as a
 * task, run the loop until it ends, and hand its results back as a JSON
 * array in *json_result (malloc'd: the caller frees it; NULL on failure),
 * UTF-8: a byte of a result string that is not valid UTF-8 (a text cut
 * mid-character) comes back as U+FFFD, as in log lines.
 * fn is a global ("decide"), a field path from a global ("limits.check"),
 * or "module.fn": the module is loaded with require (so "policies.retry.
 * decide" finds the policy library's file, hot reload included). JSON null
 * in the arguments is nil; nil among the results is null.
 * Returns RESIL_OK; RESIL_ERR_SCRIPT when fn raised (or its module failed to
 * load, or a cap stopped it: resil_error() has file:line and a traceback; or
 * it returned what JSON cannot hold, a NaN, a function or a cycle: resil_error()
 * names fn, where it is defined and what);
 * RESIL_ERR_FAILED when it returned nil, err (resil_error(): "fn (file:line)
 * returned nil, kind: message"); RESIL_ERR_USAGE when fn is not a function,
 * json_args is not a JSON array ({} is an object) or nests arrays and objects more than 200
 * levels deep (resil.json's limit: what fits the 64 KiB stack a host's thread needs at least;
 * resil_error() says at which character), or resil_call was called from inside the
 * loop (from a task, a handler, a resil_call_async callback or any libevent
 * callback on the host's event base): use resil_call_async there;
 * RESIL_ERR_INTERRUPT after resil_interrupt (the call's task goes on and
 * ends in a later run; one that came before the call: nothing ran). Other tasks run meanwhile; resil_call returns when
 * its own call ends, even if they go on. max_instructions and max_memory
 * apply to the call as to any task. Resolving fn (its module's first load)
 * and decoding json_args run at once, outside any task: the watchdog does
 * not time them, and without max_instructions or max_memory they have a
 * reload's caps (200 million instructions, 1 GiB more), so a module that
 * loops at load is RESIL_ERR_SCRIPT at its line, not a hang. A module that
 * waits at load (resil.sleep, a request, the store) raises there: load it
 * from a task first (resil_load_string "require ..." and resil_run). */
RESIL_API int resil_call(resil_t *R, const char *fn, const char *json_args, char **json_result);

/* The same without waiting, for a program that runs the loop itself
 * (resil_options.base with event_base_dispatch, or resil_step, or
 * resil_run). The host keeps events of its own on the base (the wake-up of
 * resil_interrupt, an open store's, a server's): event_base_dispatch does not
 * return by itself when the calls are done; break it from done. Resolving fn and decoding json_args happen now: a failure
 * returns its code and done is not called. Otherwise done(ud, status,
 * json_result) is called once, from the loop at the end of a turn (never
 * from inside Lua, so it may start new calls): json_result (the host's,
 * valid during the callback) on RESIL_OK, NULL with resil_error() set
 * otherwise. A call still running at resil_close gets RESIL_ERR_INTERRUPT
 * from resil_close (resil_error() says the host closed). */
RESIL_API int resil_call_async(resil_t *R, const char *fn, const char *json_args,
                     void (*done)(void *ud, int status, const char *json_result), void *ud);

/* One loop turn, for a program whose loop is not libevent's: run the tasks
 * that are ready, or else wait for I/O up to timeout_ms (0: only look; -1:
 * until something happens, and not at all when no task is left). The turns
 * also serve the host's servers (resil.server, the mock) and SIGHUP. Returns 1 while tasks remain, 0 when none is
 * left, -RESIL_ERR_SCRIPT once when the main task failed (resil_error()
 * says why), -RESIL_ERR_INTERRUPT after resil_interrupt, -RESIL_ERR_USAGE
 * when called from inside the loop. */
RESIL_API int resil_step(resil_t *R, int timeout_ms);

/* Make f callable from Lua as resil.host.<name> (also under the sandbox).
 * name must be a Lua identifier (not a reserved word); a second registration replaces the first.
 * f runs on the host's thread inside a task or handler: it may raise with
 * lua_error/luaL_error (the caller sees it at its line) but must not block
 * or call resil_call. Returns RESIL_OK or RESIL_ERR_USAGE. */
RESIL_API int resil_register(resil_t *R, const char *name, int (*f)(struct lua_State *L));

/* The host's Lua state (for bindings of your own) and its event base:
 * resil_options.base, or one the host made, which resil_close frees: free
 * events of your own on that one first. */
RESIL_API struct lua_State *resil_lua(resil_t *R);
RESIL_API struct event_base *resil_event_base(resil_t *R);

/* Close the host: its tasks end, its calls still running get
 * RESIL_ERR_INTERRUPT, its memory, connections and files go. What it holds in
 * its store is given up as a process's end gives it up: its run is recorded
 * ("interrupted" with steps running; a later host resumes it), and its
 * resil.once keys in flight, unsettled budget holds and shared breakers'
 * unreported half-open probes are released (those the store made for a task
 * that never resumed to see them too). Another process holding a SQLite
 * store's write lock is waited for once, the store's timeout, for all of it;
 * what could not be written is logged (each cost row by amount and id). From a callback
 * the host made (a resil_call_async done, a resil_register function), the
 * host is in use below it: it is closed once control is back with the
 * program, as the resil_* function that called back returns (resil_step then
 * returns 0), or, on an event base you dispatch, at the base's next turn;
 * from a done callback that resil_close itself calls (RESIL_ERR_INTERRUPT),
 * it does nothing more, and a new call from there (a retry) is refused with
 * RESIL_ERR_USAGE. */
RESIL_API void resil_close(resil_t *R);

#ifdef __cplusplus
}
#endif

#endif
