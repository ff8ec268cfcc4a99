/*
 * host.h: what the primitives of one host share. Private to libresil.
 */
#ifndef RESIL_HOST_H
#define RESIL_HOST_H

#include <locale.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <sys/types.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "resil.h"

typedef struct task task;
typedef struct resil_timer resil_timer;
typedef struct http_state http_state;
typedef struct reload_state reload_state;
typedef struct redact_secret redact_secret;

typedef void (*resil_timer_fn)(void *arg);

/* log_sink.c: log lines to stderr without blocking the loop (NULL from
 * open: write as before, blocking) */
typedef struct log_sink log_sink;
log_sink *log_sink_open(int fd, struct event_base *base);
void log_sink_write(log_sink *s, const char *line, size_t n);
void log_sink_close(log_sink *s); /* NULL-safe; waits a little for a slow reader */
void log_sink_abandon(log_sink *s); /* the same without waiting: what the reader does not take now is lost */
/* A log file opened for appending without ever waiting for a reader (a
 * FIFO nobody reads is refused, errno ENXIO, rather than hanging the
 * start): -> a FILE, line-buffered, or NULL with errno set;
 * log_file_error(errno) says why in words. */
FILE *log_sink_open_file(const char *path);
const char *log_file_error(int err);

/* A one-shot timer that follows the host clock: a libevent timer on the
 * real clock, an entry in the virtual timer heap on the virtual clock. */
struct resil_timer {
  resil_t *R;
  resil_timer_fn fn;
  void *arg;
  struct event *ev;   /* real clock; created on first use */
  double deadline;    /* virtual clock */
  uint64_t seq;       /* FIFO among equal deadlines */
  size_t heap_index;  /* position in the virtual heap, or (size_t)-1 */
  int armed;
};

struct resil {
  lua_State *L;
  struct event_base *base;
  int owns_base;
  int base_handed_out; /* resil_event_base gave the program the host's own base (it may dispatch it) */

  /* tasks */
  task *ready_head, *ready_tail;
  struct event *pump_ev; /* runs ready tasks when the embedder runs the event base */
  int in_loop;           /* inside resil_run, resil_step or resil_call */
  task *current;
  task *main_task;
  int main_ref; /* the registry's reference to it (0: none yet) */
  int tasks_alive;
  int next_task_id;
  int io_pending; /* real I/O that tasks wait on (HTTP transfers) */
  int store_io_pending; /* of which store commands (Redis): the virtual clock waits longer for them */
  int disk_pending; /* local disk work tasks wait on (a store's sync): the virtual clock waits for it, no grace */

  /* clock */
  int virtual_clock;
  double virtual_now;
  double clock_lead; /* the real clock's lead over CLOCK_MONOTONIC: the time a virtual clock ran ahead
                      * (switched back to real time, resil.now() went back by as much, and a breaker
                      * opened on the virtual clock stayed open that long) */
  resil_timer **vheap;
  size_t vheap_len, vheap_cap;
  uint64_t timer_seq;
  struct event *grace_ev;
  int grace_expired;
  int graces_inconclusive; /* in a row: a late or preempted grace is waited out again, a few times */

  /* limits and interrupts */
  size_t mem_used, mem_limit;
  size_t allocated;      /* bytes the Lua state has allocated, ever (gc_full.c) */
  size_t gc_full_due;    /* a full collection once allocated reaches this */
  double gc_full_next;   /* and not before this (monotonic seconds) */
  int gc_generational;   /* the collector's mode (collectgarbage tells it) */
  long max_instructions;
  volatile sig_atomic_t interrupted;
  char interrupted_at[160]; /* "file:line: " of the Lua the interrupt stopped ("": none ran), for its report */
  int base_refused; /* event_base_loop refused to run: called from a callback of the base's own dispatch */
  lua_State *host_L;     /* the thread in host_pcall, if any */
  lua_State *warn_L;     /* log.c: Lua's warnings (a __gc finalizer's error) are logged on this thread */
  volatile sig_atomic_t finalizers_over; /* lua_close ran its last finalizer (resil.c): no Lua runs after */
  struct resil *close_outer_host;        /* watchdog_host before resil_close (loop_close_watched) */
  int close_reblock;                     /* ...and whether SIGURG was blocked */
  char warning[512];     /* ...the pieces of the one being said */
  int warnings_off;      /* ...a script's warn("@off") until warn("@on") (a finalizer's error is said still) */
  const char *host_what; /* what it runs, for messages */
  char host_stop[256];   /* why its cap stopped it, raised again until it returns */
  int wake_pipe[2];
  struct event *wake_ev;
  volatile sig_atomic_t stop_requested; /* resil_request_stop: the signal a graceful stop was asked with */
  task *stop_waiter;                    /* the task in resil.stop_requested(true) */
  volatile sig_atomic_t stop_awaited;   /* a task has waited for a stop: one asked for is acted on */
  double stop_grace;                    /* > 0: once a stop is asked, a task that runs this many seconds
                                         * without yielding is stopped (it would keep the drain from running) */
  double stop_watch_since;              /* when the watch first saw the running task (0: not yet) */
  double close_by;                      /* > 0: the monotonic time a graceful stop ends by (resil.stop_now):
                                         * the stores' last writes as the host closes wait no later */
  struct nested_run *volatile nested;   /* the coroutines being resumed from Lua, innermost first (loop.c) */
  /* the watchdog (watchdog.c): a task resume that runs --max-task-seconds
   * of CPU without yielding is stopped */
  struct watchdog *watchdog;            /* NULL: none */
  _Atomic unsigned long resume_seq;     /* bumped as a task resume starts and ends: odd while one runs;
                                         * by 2 as each loop turn waits for I/O (loop.c, base_loop) */
  _Atomic int forwarded;                /* FORWARD_*: hooks another thread asked the loop's to arm (watchdog_forward) */
  _Atomic int turns_watched;            /* 1: the loop's thread is in the host's loop (loop_enter, pump_cb):
                                         * the time between resumes is timed too, from turn to turn */
  _Atomic(const char *) host_section;   /* what the host's own work between resumes is (a full
                                         * collection, a reload): what a stuck exit there names */
  volatile unsigned long host_watch_seq; /* the turn whose host call (host_L) the watchdog stops (loop_arm_host) */
  struct resil *turns_outer_host;       /* watchdog_host before the loop was entered */
  int turns_reblock;                    /* the thread had SIGURG blocked before the loop was entered */
  _Atomic unsigned long runaway_request; /* the resume the watchdog stops (its hook raises only in it) */
  _Atomic unsigned long runaway_hooks_back; /* ...still running it later: its hooks turned on (a finalizer's) */
  _Atomic double runaway_request_seconds; /* ...and how long it had run (both written by the watchdog's thread) */
  _Atomic int watch_paused;             /* > 0: what runs is the host's own long work (unwatched), not timed */
  char max_task_seconds_text[32];       /* --max-task-seconds as the messages write it */
  /* the command line's (main.c): a resume still running max_task_seconds after its stop was
   * asked never reached a Lua instruction (a string pattern that backtracks, a finalizer that
   * loops, a C function): the process ends, for its supervisor to start another */
  int stuck_exit;
  char runaway_what[192];               /* "task N (where)", written by loop_arm_runaway for that last word */
  _Atomic unsigned long runaway_armed;  /* the resume runaway_what is about (after it is written) */
  struct {                              /* the group commit's op that runs, timed as a resume (watchdog.c) */
    lua_State *L;                       /* the thread its fn runs on */
    struct resil *outer_host;           /* watchdog_host before its batch */
    int kind, ref;                      /* db:tx...; its {fn, args...} in the registry */
    _Atomic unsigned long seq;          /* the resume it is (odd); 0: none runs */
    volatile sig_atomic_t raised, hooked;
    lua_Hook hook;                      /* L's hook before the stop's, restored as it ends */
    int mask, count;
    volatile sig_atomic_t interrupted;  /* a first SIGINT hooked L (loop_interrupt_running): unhooked
                                         * as the batch ends, so the host's own work after it runs */
  } watch_op;
  pthread_t loop_thread;                /* the thread of the running resume, read by that thread only (the one
                                         * that opened the host, before any loop or task ran) */
  _Atomic pid_t loop_tid;               /* ...its kernel id (0: no loop or task has run yet), written only when it
                                         * changes, before resume_seq marks the resume: the CPU clock the watchdog
                                         * reads, and where its and watchdog_forward's signals go (tgkill: a thread
                                         * that has ended since is no crash) */

  /* values registered through resil.secret: redacted from every message */
  redact_secret *secrets;
  size_t nsecrets, cap_secrets;

  /* what runs after each pass over the ready tasks (loop_on_turn_end) */
  struct {
    void (*fn)(void *arg);
    void *arg;
  } turn_end[4];
  int nturn_end;

  http_state *http;
  reload_state *reload;
  void (*log_fn)(void *ud, const char *line); /* resil_options.log */
  void *log_ud;
  struct embed_state *embed; /* embed.c: resil_call_async's calls */
  int sandbox;
  char **sandbox_dirs; /* canonical, NULL-terminated: the folders sandboxed scripts may write in */
  char *sandbox_store; /* the SQLite file of the host's own store (opts->store, RESIL_STORE or the default) */
  int sandbox_trusted; /* > 0: the host itself names a file (the command line's --metrics-file) */
  char *policies_dir;
  char *open_dir; /* the working directory at resil_open (host_path), or NULL */
  char *owner_id;  /* owners.c: its identity in the store (owner.lua), once made */
  struct policy_compiled *compiled; /* resil.c: the policy files compiled, for a reload's unchanged ones */
  char *share_dir;
  int status;
  char *error;
  pid_t pid; /* the process that opened it: a child of fork has a copy it must not run or close */
  int in_api;        /* inside resil_run, resil_call, resil_step, ...: what to close waits for it */
  int close_pending; /* resil_close was called from a callback: closed once control is back with the program */
  int closing;       /* resil_close is under way: a done callback it calls may close again */
  locale_t c_locale;      /* what the host runs in (host_locale_enter) */
  locale_t caller_locale; /* the thread's own, while the host's loop runs */
};

/* Lua writes numbers in the thread's LC_NUMERIC (tostring, string.format,
 * numbers as Redis arguments): in a program that had set a locale with a
 * decimal comma, the Redis store was sent "1,5" (budgets, idempotency and
 * shared buckets failed) and the metrics said le="0,5". The host runs in
 * the C locale while it runs, on its own thread only (uselocale), and gives
 * the thread its own back. -> the locale to give back */
static inline locale_t host_locale_enter(resil_t *R) { return R->c_locale ? uselocale(R->c_locale) : (locale_t)0; }
static inline void host_locale_leave(locale_t caller) {
  if (caller) uselocale(caller);
}

/* resil.c */
resil_t *resil_from_lua(lua_State *L);
void resil_set_error(resil_t *R, const char *msg);
/* Run Lua from C outside a task (a server handler, a policy reload): the
 * function below nargs arguments, protected with a traceback, under
 * --max-instructions, --max-memory and the interrupt hook. `what` names it
 * in errors. Returns lua_pcall's status. */
int host_pcall(lua_State *L, const char *what, int nargs, int nresults);
/* host_pcall of policy code loaded outside a task (a reload, resil_call's module): without
 * --max-instructions and --max-memory of the program's own, under a load's caps (LOAD_MAX_*:
 * loading policies takes thousands of instructions and kilobytes; one that looped or allocated
 * without end at load held the loop for good) */
#define LOAD_MAX_INSTRUCTIONS 200000000L
#define LOAD_MAX_GROWTH ((size_t)1 << 30)
int host_pcall_load(lua_State *L, const char *what, int nargs, int nresults);
void resil_push_host_env(lua_State *L); /* the host's own globals, not the scripts' sandbox */
/* May a SQLite file be opened at path? Always, but under the sandbox only the
 * host's own store and files under sandbox_dirs. */
int sandbox_file_ok(resil_t *R, const char *path);
int sandbox_plain_file_ok(resil_t *R, const char *path); /* not the host's store: a file the script writes */
int sandbox_is_store_file(resil_t *R, const char *path);
void sandbox_trust(resil_t *R, int on); /* around the host's own calls that name files */
/* A SQLite file's path as the host names it: a relative one from the working directory the host
 * was opened in (a program's chdir after resil_open put the store in a new file there) -> path,
 * or out holding it made absolute */
const char *host_path(resil_t *R, const char *path, char *out, size_t size);
/* 1, with resil_error set, when called in a child of fork (the host is the
 * parent's) or on a host being closed (a done callback resil_close runs) */
int resil_refused(resil_t *R, const char *what);
/* Around the public functions that run Lua or the loop: api_leave closes the
 * host if a callback asked to (resil_close) and returns 1; R is gone then. */
void api_enter(resil_t *R);
int api_leave(resil_t *R);

/* embed.c */
void embed_free(resil_t *R);
void embed_give_up(resil_t *R);
void embed_name_memory_cap(resil_t *R);

/* loop.c: tasks */
task *task_current(lua_State *L, const char *what); /* raises outside a task */
task *task_running(lua_State *L);                    /* NULL outside a task */
/* How a wait ends when its task is canceled, the one lifetime scheme for
 * every wait (luv's setup_req/cleanup_req). cancel: the event has not
 * happened yet, unregister it. give_back: it happened and the task was woken
 * with something granted (a permit, tokens, a finished transfer, a store
 * reply), but the continuation that would consume it will never run. */
typedef struct task_wait_ops {
  void (*cancel)(void *arg);
  void (*give_back)(void *arg);
  /* optional: 1 while the wait cannot be abandoned (what it waits for has
   * happened and only its result is due): a cancel then waits for the
   * result and takes effect at the task's next wait, so the task holds what
   * it was granted (and its <close> handlers can give it back). Asked at
   * the cancel, while the task waits or once woken before it resumes; a
   * wait may bound itself then (resil.http.stream's cancel_grace) */
  int (*settling)(void *arg);
} task_wait_ops;
void task_wait(task *t, const task_wait_ops *ops, void *arg);
void task_wake(task *t);
int task_id(const task *t);
int task_context_ref(const task *t);
task *task_spawn_main(resil_t *R, int nargs); /* function + args on R->L */
/* L stack: fn, args... (nargs) -> task userdata; a task of its own, not main */
task *task_spawn(lua_State *L, int nargs);
/* Cancel from C, as t:cancel(): 1 canceled, 0 already ended, -1 it is the running task */
int task_stop(task *t);
/* fn(arg, t) once when t ends, from the loop (before it may be collected);
 * there, task_push_results gives true, results... | false, err and
 * task_traceback the failure's message with its traceback (NULL if none). */
typedef void (*task_done_fn)(void *arg, task *t);
void task_on_done(task *t, task_done_fn fn, void *arg);
/* What a task holds that goes back when it ends, however it ends (a
 * semaphore's permits): drop(h, 1) as it ends, unlinked first; drop(h, 0)
 * when it is collected without having ended (the host closing: free only). */
typedef struct task_hold task_hold;
struct task_hold {
  void (*drop)(task_hold *h, int ended);
  task *owner;
  task_hold *prev, *next;
};
int task_hold_add(task *t, task_hold *h); /* -1: t has ended (h not linked) */
void task_hold_remove(task_hold *h);
task_hold *task_holds(const task *t); /* the first of t's, ->next for the others */
task *task_check(lua_State *L, int idx); /* a task object argument */
int task_ended(const task *t);
int task_started(const task *t); /* resumed once at least, or ended (canceled before it ran) */
void task_describe(task *t, lua_State *L, int idx); /* messages name the function at idx as the task's */
int task_push_results(lua_State *L, task *t);
const char *task_traceback(const task *t);
/* Call fn(arg) after each pass over the ready tasks: work that the tasks of
 * one turn queued, done once for all of them (HTTP starts their transfers). */
int loop_on_turn_end(resil_t *R, void (*fn)(void *arg), void *arg); /* -1: no room */
void gc_full_init(resil_t *R);
void loop_init(resil_t *R);
void loop_free(resil_t *R);
int loop_run(resil_t *R);
int loop_run_until(resil_t *R, const int *done); /* until *done, no task left or an interrupt */
int loop_step(resil_t *R, int timeout_ms);       /* resil_step */
void loop_look(resil_t *R);                      /* resil_call: the host's own base's I/O, not waiting */
void loop_interrupt_running(resil_t *R); /* async-signal-safe */
void loop_watch_running(resil_t *R);     /* async-signal-safe: a stop asked, the running task watched */
void loop_arm_runaway(resil_t *R); /* from the watchdog's signal handler */
void loop_arm_host(resil_t *R, unsigned long seq); /* ...between resumes: a host call's Lua (host_pcall) */
void loop_arm_close(resil_t *R); /* ...as the host closes: a finalizer lua_close runs */
void loop_hooks_back(resil_t *R); /* ...the stop armed and no hook ran since: in a finalizer, hooks off */
void loop_close_watched(resil_t *R, int on);       /* resil_close: lua_close's finalizers timed (1), then not (0) */
int loop_raise_runaway(lua_State *L, const char *how); /* a C function the watchdog's stop interrupted */
/* the host's own Lua work outside any task (a full collection's finalizers), named: stuck there
 * past the watchdog's limit, the command's stuck exit (70) names `what`. -> begun? */
int loop_host_section_begin(resil_t *R, const char *what);
void loop_host_section_end(resil_t *R, int begun);
extern _Thread_local resil_t *watchdog_host; /* the host whose task this thread is resuming (watchdog.c) */
typedef struct watchdog watchdog;
int watchdog_set(resil_t *R, double seconds); /* 0 or less: none; -1 if its thread cannot start */
void watchdog_free(resil_t *R);
extern _Atomic int watchdog_heartbeat_fd; /* a gateway worker's heartbeat while unwatched work holds its loop (main.c) */
void watchdog_signal_install(void); /* at resil_open: the handler watchdog_forward's signal needs */
enum { FORWARD_INTERRUPT = 1, FORWARD_STOP = 2 };
int watchdog_forward(resil_t *R, int what); /* off the loop's thread: its hooks armed there, by a signal -> 1 */
void watchdog_loop_thread(resil_t *R);       /* the calling thread runs the host now (loop_thread, loop_tid) */
int watchdog_signal_unblock(void);          /* SIGURG reaches this thread while it runs the host -> 1 if it was blocked */
void watchdog_signal_reblock(int blocked);  /* as it was, once the host is left */
int luaopen_resil_journal(lua_State *L);  /* require "resil.core.journal": src/lua/journal.lua's files */
int luaopen_resil_watchdog(lua_State *L); /* require "resil.core.watchdog" -> {unwatched = f} */
/* A task's own SQLite statement (store_sqlite.c, db:read and db:now) is interrupted once the watchdog
 * stops the task: what its progress handler asks every WATCHDOG_SQL_STEPS of SQLite's VM, and the
 * error that says so (raised if the interrupt was the watchdog's; else it returns) */
#define WATCHDOG_SQL_STEPS 10000
int watchdog_sql_progress(void *R);
void watchdog_sql_stopped(lua_State *L, resil_t *R);
/* ...and a store op's function in the group commit (run_op), timed as a resume of its own: a batch's
 * begin -> 1 if its ops are timed (given back to its end), then each op's begin and end */
int watchdog_batch_begin(resil_t *R, lua_State *L);
void watchdog_batch_end(resil_t *R, int timed);
void watchdog_op_begin(resil_t *R, int kind, int ref); /* kind: 0 db:tx, 1 db:commit_only, 2 db:enqueue, 3 done */
void watchdog_op_end(resil_t *R);
void loop_hook_nested(resil_t *R, lua_State *except, lua_Hook hook, int count); /* async-signal-safe */
void loop_arm_hook(resil_t *R, lua_State *L); /* the hook Lua on L needs now: interrupt, count or none */
void loop_guard_coroutines(lua_State *L);      /* coroutine.resume and wrap pass the guards on (at start-up) */
void hooks_back_check(lua_State *L);         /* hooks_back.c: once, at start-up: may hooks_back_on write? */
void hooks_back_on(lua_State *co);           /* a thread a hook's error ended gets its hooks back */

/* loop.c: clock and timers */
double resil_now(resil_t *R);
double monotonic_seconds(void); /* real time, whatever the host's clock */
void clock_set_virtual(resil_t *R, int on);
void timer_init(resil_t *R, resil_timer *tm, resil_timer_fn fn, void *arg);
void timer_start(resil_timer *tm, double seconds);
void timer_stop(resil_timer *tm);
void timer_free(resil_timer *tm);

/* error.c: error values, {kind=, message=, ...} with a __tostring, and messages */
int resil_traceback(lua_State *L); /* message handler for lua_pcall */
const char *resil_describe(lua_State *L, int idx); /* pushes a message for any value; never raises */
int resil_sensitive_field(const char *name, size_t n); /* error.c: a field written redacted in error reports */
int resil_l_store_clock(lua_State *L); /* ...as private.store_clock(): resil.now() without that lead */
int resil_l_sensitive_field(lua_State *L);              /* ...as private.sensitive_field(name) */
void describe_hook(lua_State *L, lua_Debug *ar); /* error.c: resil_describe's cap on a __tostring */
int resil_raise(lua_State *L, const char *fmt, ...); /* misuse, at the user's line */
void resil_push_error(lua_State *L, const char *kind, const char *fmt, ...);
int resil_error_result(lua_State *L, const char *kind, const char *fmt, ...);

/* redact.c: one routine for every message the host formats */
#define REDACT_MIN_SECRET 6 /* shorter values are not registered */
#define REDACT_MARK "[REDACTED]"
enum { REDACT_SECRETS = 1, REDACT_PARAMS = 2, REDACT_ALL = 3 };
int redact_add(resil_t *R, const char *s, size_t len); /* 1 added, 0 too short or known, -1 no memory */
/* 0: nothing to redact (*out NULL); 1: *out is a malloc'd, NUL-terminated copy; -1: no memory.
 * R may be NULL when what is REDACT_PARAMS (an argument, before any host) */
int redact_text(resil_t *R, const char *s, size_t len, int what, char **out, size_t *out_len);
char *redact_strdup(resil_t *R, const char *s);                 /* malloc'd; NULL only without memory */
const char *redact_push(lua_State *L, int idx, int what);        /* pushes the redacted string at idx */
void redact_fprintf(resil_t *R, FILE *f, const char *fmt, ...); /* format, redact, write */
void redact_free(resil_t *R);

/* utf8.c: UTF-8 checked (-> the offset of the first byte not part of a character, len when
 * none) and made valid (pushes the string at idx, or a copy with such bytes as U+FFFD) */
size_t utf8_invalid_at(const unsigned char *s, size_t len);
const char *utf8_push_valid(lua_State *L, int idx, size_t *out_len);

/* http.c */
void http_free(resil_t *R);

/* sse.c: server-sent events framing, fed a stream's bytes in reads of any
 * size. sse_next parses bytes[*used..len) until an event is complete (1,
 * *ev valid until the next call), all is used (0), or an SSE_ error (the
 * parser is then done with). */
typedef struct sse_parser sse_parser;
typedef struct {
  const char *data, *event, *id, *retry; /* event, id, retry: NULL when the event had none */
  size_t data_len, event_len, id_len, retry_len;
} sse_event;
enum { SSE_TOO_LARGE = -1, SSE_NO_MEMORY = -2 };
sse_parser *sse_new(size_t max_event); /* NULL: out of memory */
void sse_free(sse_parser *p);
int sse_next(sse_parser *p, const char *bytes, size_t len, size_t *used, sse_event *ev);

/* owners.c: the identities of the hosts open in this process (private.owner_opened, owner_state) */
int resil_l_owner_opened(lua_State *L);
int resil_l_owner_state(lua_State *L);
void owners_close(resil_t *R);

/* reload.c */
void reload_free(resil_t *R);
/* --watch: the folder of a policy file the searcher loaded is watched too, however deep */
void reload_watch_folder_of(resil_t *R, lua_State *L, const char *path);
void policy_folders_watch(resil_t *R, lua_State *L); /* resil.c: reload_watch_folder_of each policy file loaded */

/* wal_sync.c: a store's commits made durable by a thread of its own */
typedef struct wal_syncer wal_syncer;
wal_syncer *wal_syncer_new(struct event_base *base, const char *db_path, void (*done)(void *arg, int err),
                           void *arg);
void wal_syncer_request(wal_syncer *s, int checkpoint); /* done(arg, errno or 0) on the loop, when durable */
int wal_syncer_sync_now(wal_syncer *s); /* the same, blocking: -> 0 | errno */
void wal_syncer_free(wal_syncer *s);

/* sql_reader.c: a SQLite store's reads that may scan without bound, on a thread of its own with a
 * connection of its own, a chunk of rows at a time */
typedef struct sql_reader sql_reader;
typedef struct sql_value {
  int type; /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT (s, n: a blob too) or SQLITE_NULL */
  long long i;
  double d;
  char *s;
  int n;
} sql_value;
typedef struct sql_read sql_read;
struct sql_read {
  char *sql;
  sql_value *args; /* nargs of them, filled by the caller before the first submit (s: malloc'd, freed here) */
  int nargs, chunk;
  void (*done)(sql_read *r); /* on the loop: the chunk below is the caller's until it submits again */
  void *arg;
  task *t; /* the task that waits for it, if any */
  /* the chunk: nrows rows of ncols values (names[c]); more: rows follow; rc != 0: failed (errmsg) */
  int ncols, nrows, more, rc;
  char **names;
  sql_value *vals;
  char *errmsg;
  /* the reader's */
  struct sqlite3_stmt *st;
  atomic_int canceled;
  int state;
  sql_read *next, *all_next, *all_prev;
};
/* path: a file name, or with uri a read-only SQLite URI (store_sqlite.c's readonly_uri) */
sql_reader *sql_reader_new(struct event_base *base, const char *path, int uri, double timeout, int *pending);
sql_read *sql_read_new(sql_reader *rd, const char *sql, int nargs, int chunk); /* NULL: out of memory */
void sql_read_submit(sql_reader *rd, sql_read *r);
void sql_read_drop(sql_reader *rd, sql_read *r);
int sql_reader_busy(const sql_reader *rd); /* reads someone still wants */
void sql_reader_free(sql_reader *rd);

/* openers, one per primitive */
int luaopen_resil_error(lua_State *L);
int luaopen_resil_loop(lua_State *L);
int luaopen_resil_http(lua_State *L);
int luaopen_resil_json(lua_State *L);
size_t json_number_text(lua_State *L, int idx, char buf[32]); /* as json.encode writes it */
int luaopen_resil_log(lua_State *L);
void host_log(lua_State *L, const char *level, const char *msg); /* pops a fields table */
/* pops a fields table: written (-> 1) only where the program sends the host's logs, not stderr */
int host_log_elsewhere(lua_State *L, const char *level, const char *msg);
void log_warnings_init(resil_t *R); /* Lua's warnings into the log (lua_setwarnf) */
int luaopen_resil_server(lua_State *L);
int luaopen_resil_crypto(lua_State *L);
int luaopen_resil_url(lua_State *L);
int luaopen_resil_bucket(lua_State *L);
int luaopen_resil_breaker(lua_State *L);
int luaopen_resil_metrics(lua_State *L);
int luaopen_resil_flat_json(lua_State *L);
int luaopen_resil_semaphore(lua_State *L);
int luaopen_resil_reload(lua_State *L);
int luaopen_resil_stop(lua_State *L);
int luaopen_resil_redact(lua_State *L);
int luaopen_resil_sqlite(lua_State *L);
int luaopen_resil_redis(lua_State *L);
int resil_sqlite_open_store(lua_State *L); /* resil.sqlite.open for the store itself: the host's own store too */

/* stop.c */
void stop_notice(resil_t *R); /* from the loop's wake callback */

/* the Lua half of the host, compiled in from src/lua/ (blobs.c): each is
 * package.preload["resil.<name>"], run with the resil table as its `...` */
typedef struct {
  const char *name;
  const char *source;
} resil_lua_module;
extern const resil_lua_module resil_lua_modules[];

#endif
