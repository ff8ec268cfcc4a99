/*
 * watchdog.c: a task that runs too long without yielding is stopped.
 *
 * A policy that loops (a `while true do end` saved into a provider adapter)
 * holds the loop: on a gateway worker every request it serves waits, for
 * good. --max-instructions stops such a task but costs on every Lua
 * instruction (a count hook puts each one through the debugger's path), so
 * the gateway runs without it. The watchdog costs nothing while tasks
 * yield: a thread of the host's own looks at the resume counter the loop
 * bumps as each task resume starts and ends (odd: one is running), and when
 * the same resume has used `seconds` of the loop thread's CPU time (not
 * wall time: a process stopped with SIGSTOP, or a machine that runs other
 * work, does not count), has a hook set on the running task that raises
 * where it runs, as the instruction cap does.
 *
 * The hook is set on the loop's own thread: the watchdog's thread sends it
 * SIGURG (pthread_kill) and the handler sets it (loop_arm_runaway), as
 * lua.c sets its hook from SIGINT's handler. lua_sethook walks the Lua
 * thread's call frames, which another OS thread must not do while they
 * change. The two threads share only atomics: the resume counter, and the
 * resume the watchdog asks to stop (a handler that comes after that resume
 * ended does nothing). The handler passes SIGURG on to the program's own,
 * one it set before the first resil_open.
 *
 * While the loop's thread runs the host's loop it also times the turns: the
 * loop bumps the counter by 2 as each turn waits for I/O (base_loop; the wait
 * takes no CPU time), so the time between resumes is timed too, from the
 * last resume or turn. Lua runs there outside every task: a server handler
 * without tasks or a reload's code (host_pcall: stopped as its cap stops it,
 * loop_arm_host), a __gc finalizer that a collection step in a C callback
 * runs (hooks off: the stuck exit). A finalizer in a task's collection, or
 * one lua_close runs as the host closes, that is still running a `seconds`
 * after the stop was armed has its hooks turned back on (loop_hooks_back).
 * No cost a turn but one plain store.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "host.h"

/* SIGURG: ignored by default, so one that comes when no handler is set
 * (or after a host closed) does nothing; Go's runtime preempts with it
 * too. */
#define WATCHDOG_SIGNAL SIGURG

/* EX_SOFTWARE (sysexits.h): an internal error, not the script's exit */
#define WATCHDOG_STUCK_EXIT 70
#define STUCK_GRACE 10.0 /* CPU seconds at least, after the stop was asked, before the exit */

_Thread_local resil_t *watchdog_host;

/* A gateway worker's pipe to its supervisor (main.c), or -1: while the
 * host's own long work holds the loop (unwatched: a store's migration on a
 * large ledger), its heartbeat comes from here, the work being the host's
 * choice and not a stuck loop (the supervisor would kill it, and its
 * replacement at the same migration, without end). */
_Atomic int watchdog_heartbeat_fd = -1;

/* On the loop's thread, interrupted wherever it was: hooks only
 * (loop_arm_runaway), and only in the resume the watchdog saw run. */
static void arm_op(resil_t *R, unsigned long seq);

/* the program's own SIGURG handler, found when the host's was installed: called after the host's (a
 * Go runtime preempts with SIGURG; a program reads out-of-band socket data on it) */
static struct sigaction program_handler;

static void on_watchdog_signal(int signo, siginfo_t *info, void *context) {
  int saved = errno;
  resil_t *R = watchdog_host;
  int forwarded = R ? atomic_exchange(&R->forwarded, 0) : 0; /* from another thread (watchdog_forward) */
  if ((forwarded & FORWARD_INTERRUPT) && R->interrupted) loop_interrupt_running(R); /* (not one reported since) */
  if ((forwarded & FORWARD_STOP) && R->stop_requested) loop_watch_running(R);
  if (R) {
    unsigned long seq = atomic_load(&R->runaway_request);
    if (seq && atomic_load(&R->resume_seq) == seq && atomic_load(&R->runaway_hooks_back) == seq) {
      loop_hooks_back(R); /* (asked again: no hook ran, a finalizer's are off) */
    } else if (seq && atomic_load(&R->resume_seq) == seq) {
      if (R->closing) loop_arm_close(R); /* (lua_close's finalizers) */
      else if (R->current) loop_arm_runaway(R);
      else if (seq & 1) arm_op(R, seq); /* a store op's function, in the group commit (watchdog_op_begin) */
      else loop_arm_host(R, seq);       /* between resumes: a host call's Lua, if one runs */
    }
  }
  errno = saved;
  if (program_handler.sa_flags & SA_SIGINFO) {
    if (program_handler.sa_sigaction) program_handler.sa_sigaction(signo, info, context);
  } else if (program_handler.sa_handler != SIG_DFL && program_handler.sa_handler != SIG_IGN) {
    program_handler.sa_handler(signo);
  }
}

/* This thread's kernel id, read once (the thread a fork leaves in the child is another: forgotten there) */
static _Thread_local pid_t own_tid;
static void forget_tid(void) { own_tid = 0; }

static pthread_once_t handler_once = PTHREAD_ONCE_INIT;
static void install_handler(void) {
  pthread_atfork(NULL, NULL, forget_tid);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_watchdog_signal;
  /* the loop's system calls go on; SA_ONSTACK: a Go runtime's threads need it of every handler */
  sa.sa_flags = SA_RESTART | SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(WATCHDOG_SIGNAL, &sa, &program_handler);
}

struct watchdog {
  resil_t *R;
  double seconds;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t wake;
  int stopping;
};

/* CPU seconds the loop's thread has used; -1 if it cannot be read. By the
 * thread's kernel id, as the signal goes: its pthread_t is written by the
 * loop's thread as it moves and is not this thread's to read, and one whose
 * thread has ended names freed memory (the clock of an ended tid is EINVAL).
 * The clock id is the kernel's ABI for a thread's CPU clock, the one glibc's
 * pthread_getcpuclockid makes: ~tid << 3, per thread (4), scheduler time (2). */
static double loop_cpu_seconds(pid_t tid) {
  struct timespec ts;
  if (tid <= 0) return -1;
  clockid_t cid = (clockid_t)((~(unsigned)tid << 3) | 6u);
  if (clock_gettime(cid, &ts) != 0) return -1;
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The stuck process's last line, on stderr, without ever blocking: a plain
 * write to a pipe its reader had stopped reading (full: a supervisor or a
 * log shipper stalled) waited there for good, and the stuck process never
 * ended. A pipe or a terminal is written through a description of our own
 * opened non-blocking, as log_sink.c does (never the shared one's flags: the
 * shell's, the supervisor's and the other workers' stderr too), a socket
 * with MSG_DONTWAIT; the reader is waited for at most LAST_WORD_WAIT_MS, then
 * the line is lost. A line under PIPE_BUF goes into a pipe whole or not at
 * all. */
#define LAST_WORD_WAIT_MS 1000
static void write_last_word(const char *line, size_t n) {
  struct stat st;
  if (fstat(2, &st) != 0) return;
  int sock = S_ISSOCK(st.st_mode), fd = 2, own = -1;
  if (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)) {
    own = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (own >= 0) fd = own;
    else if (errno == ENXIO) return; /* a FIFO nobody reads */
    else {                           /* no /proc: only a write the pipe has room for now */
      struct pollfd p = {2, POLLOUT, 0};
      if (poll(&p, 1, LAST_WORD_WAIT_MS) != 1 || !(p.revents & POLLOUT)) return;
    }
  }
  struct timespec t0, now;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  size_t done = 0;
  while (done < n) {
    ssize_t w = sock ? send(fd, line + done, n - done, MSG_DONTWAIT | MSG_NOSIGNAL) : write(fd, line + done, n - done);
    if (w > 0) {
      done += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      clock_gettime(CLOCK_MONOTONIC, &now);
      long left = LAST_WORD_WAIT_MS - ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000);
      if (left <= 0) break;
      struct pollfd p = {fd, POLLOUT, 0};
      poll(&p, 1, (int)left);
      continue;
    }
    break;
  }
  if (own >= 0) close(own);
}

/* The last word of a process whose loop is stuck outside Lua: the hook the
 * watchdog set never ran, since no Lua instruction came (a string pattern
 * that backtracks for hours runs in C, a finalizer runs with hooks off), and
 * nothing in the process can stop it. Every request the worker would serve
 * waits for good; ended, it is started again by its supervisor (`gateway
 * --workers`, systemd). The rows the store had queued and not yet committed
 * are lost as with kill -9. Written straight to stderr (write_last_word):
 * the log's own writer is the stuck loop's. */
static void end_stuck(resil_t *R, unsigned long seq, double ran) {
  char what[sizeof R->runaway_what * 2];
  size_t n = 0;
  const char *src = atomic_load(&R->runaway_armed) == seq ? R->runaway_what : "a task";
  if (!(seq & 1)) { /* between resumes: the host's own work, named if a section of it (or a host call) runs */
    src = atomic_load_explicit(&R->host_section, memory_order_acquire);
    if (!src && atomic_load(&R->runaway_armed) == seq) src = R->runaway_what;
    if (!src) src = "the loop outside every task (a Lua callback the host runs there, such as a redis store's "
                    "on_state, a __gc finalizer that a collection step in a C callback ran, or a C function)";
  }
  for (; *src && n + 3 < sizeof what; src++) { /* JSON: the where is a file name */
    unsigned char ch = (unsigned char)*src;
    if (ch == '"' || ch == '\\') what[n++] = '\\';
    what[n++] = ch < 0x20 ? '?' : (char)ch;
  }
  what[n] = '\0';
  char ts[32];
  struct timespec now;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &now);
  gmtime_r(&now.tv_sec, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  char line[1024];
  int len = snprintf(line, sizeof line,
                     "{\"ts\":\"%s.%03dZ\",\"level\":\"error\",\"msg\":\"%s ran %.1f s without yielding and "
                     "did not stop at --max-task-seconds=%s: it is stuck outside Lua code (a string pattern that "
                     "backtracks, a finalizer that loops, a C function); the process ends with code %d so that it "
                     "can be started again\",\"exit_code\":%d}\n",
                     ts, (int)(now.tv_nsec / 1000000), what, ran, R->max_task_seconds_text, WATCHDOG_STUCK_EXIT,
                     WATCHDOG_STUCK_EXIT);
  if (len > 0) write_last_word(line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
  _exit(WATCHDOG_STUCK_EXIT);
}

static void *watch_main(void *arg) {
  watchdog *w = arg;
  resil_t *R = w->R;
  double every = w->seconds / 4 < 0.05 ? 0.05 : w->seconds / 4;
  unsigned long seen = 0;
  double seen_since = 0;
  int seeing = 0; /* seen is timed from seen_since */
  pthread_mutex_lock(&w->lock);
  while (!w->stopping) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    /* (a gateway worker's heartbeat is said four times a second at most: its bound may be 1 s) */
    double t = (double)until.tv_sec + (double)until.tv_nsec / 1e9 +
               (watchdog_heartbeat_fd >= 0 && every > 0.25 ? 0.25 : every);
    until.tv_sec = (time_t)t;
    until.tv_nsec = (long)((t - (double)until.tv_sec) * 1e9);
    while (!w->stopping && pthread_cond_timedwait(&w->wake, &w->lock, &until) != ETIMEDOUT) {
    }
    if (w->stopping) break;
    if (atomic_load(&R->watch_paused)) { /* the host's own long work: timed afresh once it ends */
      seeing = 0;
      if (watchdog_heartbeat_fd >= 0) {
        ssize_t n = write(watchdog_heartbeat_fd, "h", 1); /* (non-blocking) */
        (void)n;
      }
      continue;
    }
    /* a resume (odd), or the loop's own time between resumes in one turn (even: libevent's
     * callbacks and the collection steps their allocations make, the turn's end; base_loop
     * bumps the count by 2 at each turn, and the wait for I/O takes no CPU time) */
    unsigned long seq = atomic_load(&R->resume_seq);
    int timed = (seq & 1) || atomic_load(&R->turns_watched);
    pid_t tid = atomic_load(&R->loop_tid);
    double now = timed ? loop_cpu_seconds(tid) : -1;
    if (!seeing || seq != seen || now < 0) { /* nothing timed, or another resume or turn than last time */
      seeing = now >= 0;
      seen = seq;
      seen_since = now;
      continue;
    }
    if (now - seen_since < w->seconds) continue;
    if (atomic_load(&R->runaway_request) == seq) { /* asked once already */
      /* another `seconds` and still the same: no hook ran (a finalizer's, which Lua runs with
       * hooks off), asked again to turn them on (loop_hooks_back) */
      if (now - seen_since >= 2 * w->seconds && atomic_load(&R->runaway_hooks_back) != seq) {
        atomic_store(&R->runaway_hooks_back, seq);
        tgkill(getpid(), tid, WATCHDOG_SIGNAL);
      }
      /* another `seconds`, and at least STUCK_GRACE: C work that is long but ends (a JSON
       * decode of 90 MB, a report's query) is not taken for a stuck loop under a small limit */
      double grace = w->seconds > STUCK_GRACE ? w->seconds : STUCK_GRACE;
      if (R->stuck_exit && now - seen_since >= w->seconds + grace) end_stuck(R, seq, now - seen_since);
      continue;
    }
    /* the same resume for `seconds`: the loop's thread is told to stop it
     * (its handler does nothing if that resume has ended meanwhile) */
    atomic_store(&R->runaway_request_seconds, now - seen_since);
    atomic_store(&R->runaway_request, seq);
    tgkill(getpid(), tid, WATCHDOG_SIGNAL);
  }
  pthread_mutex_unlock(&w->lock);
  return NULL;
}

static void watchdog_stop(resil_t *R) {
  watchdog *w = R->watchdog;
  if (!w) return;
  pthread_mutex_lock(&w->lock);
  w->stopping = 1;
  pthread_cond_signal(&w->wake);
  pthread_mutex_unlock(&w->lock);
  pthread_join(w->thread, NULL);
  pthread_cond_destroy(&w->wake);
  pthread_mutex_destroy(&w->lock);
  free(w);
  R->watchdog = NULL;
}

/* The handler, for watchdog_forward as for the watchdog: installed when a
 * host opens, never from a signal handler (pthread_once is not
 * async-signal-safe). */
void watchdog_signal_install(void) { pthread_once(&handler_once, install_handler); }

/* resil_interrupt (what = FORWARD_INTERRUPT) and resil_request_stop (FORWARD_STOP) from another thread, or from a
 * signal handler the kernel ran on one (a process's SIGINT may land on any
 * thread that does not block it): the hooks are armed by the loop's own
 * thread, in this signal's handler. Armed from here, lua_sethook walked the
 * frames of Lua states the loop's thread was running as they changed (a
 * crash), and left a hook on the host's main state that every task made
 * later copied. The loop's thread is the one that last ran the host (the
 * one that opened it, before). Its handler arms nothing unless that thread
 * runs the host's loop or a task: the interrupt is then reported by the
 * host's next call or turn. Async-signal-safe. -> 1 if the loop's thread
 * was asked, 0 if the caller is that thread (it arms the hooks itself). */
int watchdog_forward(resil_t *R, int what) {
  /* By the thread's kernel id (tgkill), not its pthread_t: the thread that ran the loop may have
   * ended since, its descriptor freed with its stack (pthread_kill read it: SIGSEGV); a tid that
   * is gone is ESRCH, and one reused by another thread of ours only runs a handler that finds
   * nothing of this host's to arm. No loop or task has run yet (0): the thread that opened the host. */
  pid_t tid = atomic_load(&R->loop_tid);
  if (tid ? tid == gettid() : pthread_equal(R->loop_thread, pthread_self())) return 0;
  atomic_fetch_or(&R->forwarded, what);
  if (tid) tgkill(getpid(), tid, WATCHDOG_SIGNAL);
  return 1;
}

/* The calling thread runs the host now (a resume, a loop's turns, a group commit): what the
 * watchdog times and signals, and watchdog_forward signals. A thread-local read and a compare. */
void watchdog_loop_thread(resil_t *R) {
  pid_t tid = own_tid ? own_tid : (own_tid = gettid());
  if (atomic_load_explicit(&R->loop_tid, memory_order_relaxed) == tid) return;
  R->loop_thread = pthread_self();
  atomic_store_explicit(&R->loop_tid, tid, memory_order_release);
}

/* A program that blocks every signal in its threads (a daemon whose own thread takes them with
 * sigwait) held SIGURG pending on the host's thread: a policy that looped was never stopped, by
 * the watchdog or by resil_interrupt from another thread, and the program never got its thread
 * back. Unblocked while the thread runs the host's loop, blocked again after if it was (one
 * system call as the loop is entered). */
int watchdog_signal_unblock(void) {
  sigset_t urg, old;
  sigemptyset(&urg);
  sigaddset(&urg, WATCHDOG_SIGNAL);
  return pthread_sigmask(SIG_UNBLOCK, &urg, &old) == 0 && sigismember(&old, WATCHDOG_SIGNAL) == 1;
}

void watchdog_signal_reblock(int blocked) {
  if (!blocked) return;
  sigset_t urg;
  sigemptyset(&urg);
  sigaddset(&urg, WATCHDOG_SIGNAL);
  pthread_sigmask(SIG_BLOCK, &urg, NULL);
}

int watchdog_set(resil_t *R, double seconds) {
  watchdog_stop(R);
  if (!(seconds > 0)) return 0;
  pthread_once(&handler_once, install_handler);
  watchdog *w = calloc(1, sizeof *w);
  if (!w) return -1;
  w->R = R;
  w->seconds = seconds;
  pthread_mutex_init(&w->lock, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&w->wake, &attr);
  pthread_condattr_destroy(&attr);
  /* the thread takes no signal meant for the process (SIGTERM, SIGHUP) */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  int failed = pthread_create(&w->thread, NULL, watch_main, w);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (failed) {
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    free(w);
    return -1;
  }
  R->watchdog = w;
  snprintf(R->max_task_seconds_text, sizeof R->max_task_seconds_text, "%g", seconds);
  return 0;
}

void watchdog_free(resil_t *R) { watchdog_stop(R); }

static int op_stopping(resil_t *R);
static void op_raise(lua_State *L, resil_t *R, int level, const char *how);

/* A task's own SQLite statement (db:read, db:now) runs in C, where no hook
 * runs: a script's query over tens of millions of rows, or a report's, in a
 * gateway worker ran on past the watchdog's stop until the stuck exit ended
 * the process. SQLite's progress handler on each connection (store_sqlite.c,
 * every WATCHDOG_SQL_STEPS VM steps, while such a statement runs) asks this:
 * non-zero interrupts the statement. Only once the signal's handler has
 * armed the stop of the resume that runs (on this same thread: the hooks
 * are set, the task named), and never in the host's own unwatched work (a
 * migration). Three atomic loads. A store op's statement in the group
 * commit likewise (its resume is the op's: watchdog_op_begin), if it only
 * reads (store_sqlite.c: an interrupted write rolls the whole batch back). */
int watchdog_sql_progress(void *arg) {
  resil_t *R = arg;
  unsigned long seq = atomic_load_explicit(&R->resume_seq, memory_order_relaxed);
  return (seq & 1) && atomic_load_explicit(&R->runaway_armed, memory_order_relaxed) == seq &&
         atomic_load_explicit(&R->watch_paused, memory_order_relaxed) == 0;
}

/* A statement that failed SQLITE_INTERRUPT: the watchdog's stop, raised as
 * its hook raises it (at the script's line, the task or the op's function
 * named, <close> handlers not cut), if the interrupt was its; Ctrl-C's
 * (SIGINT: the progress handler asks R->interrupted too), as its hook says
 * it; else it returns */
void watchdog_sql_stopped(lua_State *L, resil_t *R) {
  static const char how[] = "; its SQLite statement was interrupted";
  if (R->interrupted) { /* Ctrl-C: as the hook it set says it (loop.c, instruction_hook) */
    luaL_where(L, 1);
    lua_pushfstring(L, "interrupted by signal %d", (int)R->interrupted);
    lua_concat(L, 2);
    lua_error(L);
  }
  if (!watchdog_sql_progress(R)) return;
  if (R->current) loop_raise_runaway(L, how);
  else if (op_stopping(R)) op_raise(L, R, 1, how);
}

/* unwatched(f, ...) -> f(...): f's time is not the task's. For the host's
 * own work that runs long in SQLite without yielding: a store's migration
 * on a large ledger (5 million rows: 6 s), which the gateway's 5 s stopped
 * at each first request, its transaction rolled back, so that the store
 * never opened. f must not yield. */
static int l_unwatched(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  /* a gateway worker says so to its supervisor ('u', then a heartbeat): without a watchdog
   * (--max-task-seconds 0) no thread says 'h' meanwhile, and the migration was killed, again
   * in each replacement */
  if (atomic_fetch_add(&R->watch_paused, 1) == 0 && watchdog_heartbeat_fd >= 0) {
    ssize_t n = write(watchdog_heartbeat_fd, "u", 1); /* (non-blocking) */
    (void)n;
  }
  int status = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
  if (atomic_fetch_sub(&R->watch_paused, 1) == 1 && watchdog_heartbeat_fd >= 0) {
    ssize_t n = write(watchdog_heartbeat_fd, "h", 1);
    (void)n;
  }
  if (status != LUA_OK) return lua_error(L);
  return lua_gettop(L);
}

/* ---------- the group commit's op functions ----------
 *
 * A db:tx, db:commit_only or db:enqueue function runs in the store's group
 * commit (store_sqlite.c, run_op), on the loop outside any task, and so does
 * a db:enqueue's done after it: a loop or a long query there held the loop
 * for good, the watchdog seeing no resume. Each such call is timed as a
 * resume of its own (the resume counter bumped around it: a few plain stores
 * a call, the thread-local and the loop's thread set once a batch; no hook
 * until the watchdog asks), and
 * stopped as a task is: a hook on the thread it runs on (and the coroutines
 * it resumes) raises the stop's error, naming the function. run_op's pcall
 * catches it and rolls its savepoint back: the op fails (its task gets the
 * error from db:tx, a db:enqueue's done gets it), the batch's other ops
 * commit as usual. The op that runs is R->watch_op (one at a time: a batch
 * runs outside any resume, and nothing in it runs the loop). */
#define OP_STOP_PACE (1 << 20) /* instructions between the hook's looks, once it has raised */

static const char *const OP_KIND[] = {"db:tx function", "db:commit_only function", "db:enqueue function",
                                      "db:enqueue done callback"};

static void op_hook(lua_State *L, lua_Debug *ar);

/* The stop's error in L, at the line of the first Lua function from `level`
 * up; the hooks left at OP_STOP_PACE so that the <close> handlers the error
 * runs are not cut, then (a pcall in fn caught it and fn runs on) on every
 * instruction, until run_op's pcall has it */
static void op_raise(lua_State *L, resil_t *R, int level, const char *how) {
  int pace = R->watch_op.raised ? 1 : OP_STOP_PACE;
  R->watch_op.raised = 1;
  lua_sethook(L, op_hook, LUA_MASKCOUNT, pace);
  if (R->watch_op.L != L) lua_sethook(R->watch_op.L, op_hook, LUA_MASKCOUNT, pace);
  loop_hook_nested(R, L, op_hook, pace);
  lua_Debug ar;
  char at[128] = "";
  for (int lv = level; lua_getstack(L, lv, &ar) && lua_getinfo(L, "Sl", &ar); lv++) {
    if (ar.currentline > 0) {
      snprintf(at, sizeof at, "%s:%d: ", ar.short_src, ar.currentline);
      break;
    }
    if (level == 0) break; /* (the hook's: where it runs) */
  }
  char where[128] = "?"; /* where fn is defined: the op's {fn, args...}, or the done callback */
  int t = lua_rawgeti(L, LUA_REGISTRYINDEX, R->watch_op.ref);
  if (t == LUA_TTABLE) {
    lua_rawgeti(L, -1, 1);
    lua_remove(L, -2);
  }
  if (lua_type(L, -1) == LUA_TFUNCTION && lua_getinfo(L, ">S", &ar))
    snprintf(where, sizeof where, "%s:%d", ar.short_src, ar.linedefined);
  else lua_pop(L, 1);
  char ran[32];
  snprintf(ran, sizeof ran, "%.1f", atomic_load(&R->runaway_request_seconds));
  lua_pushfstring(L, "%sa %s (%s) ran %s s without yielding (--max-task-seconds=%s)%s", at,
                  OP_KIND[R->watch_op.kind], where, ran, R->max_task_seconds_text, how);
  lua_error(L);
}

/* the op that runs is the resume the watchdog stops */
static int op_stopping(resil_t *R) {
  unsigned long seq = atomic_load(&R->resume_seq);
  return (seq & 1) && atomic_load(&R->watch_op.seq) == seq && atomic_load(&R->runaway_request) == seq;
}

static void op_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  resil_t *R = resil_from_lua(L);
  if (!op_stopping(R)) { /* left on a thread after its op ended */
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  op_raise(L, R, 0, "");
}

/* From the signal's handler, in op resume `seq`: hooks only, as
 * loop_arm_runaway sets them, and what the stuck exit's line names */
static void arm_op(resil_t *R, unsigned long seq) {
  if (atomic_load(&R->watch_op.seq) != seq || R->watch_op.hooked) return;
  const char *src = OP_KIND[R->watch_op.kind];
  size_t n = 0;
  for (const char *p = "a "; *p;) R->runaway_what[n++] = *p++;
  while (*src && n + 1 < sizeof R->runaway_what) R->runaway_what[n++] = *src++;
  R->runaway_what[n] = '\0';
  atomic_store(&R->runaway_armed, seq);
  lua_State *L = R->watch_op.L;
  R->watch_op.hook = lua_gethook(L);
  R->watch_op.mask = lua_gethookmask(L);
  R->watch_op.count = lua_gethookcount(L);
  R->watch_op.hooked = 1;
  lua_sethook(L, op_hook, LUA_MASKCOUNT, 1);
  loop_hook_nested(R, L, op_hook, 1);
}

/* store_sqlite.c's commit_batch and finish_batch, around their ops, run on L: -> 1 if they are
 * timed (watchdog_batch_end ends it); 0 with no watchdog, or inside a task's
 * resume (db:close in a task: their time is the task's) */
int watchdog_batch_begin(resil_t *R, lua_State *L) {
  if (atomic_load(&R->resume_seq) & 1) return 0;
  if (!R->watchdog) { /* not timed; known all the same to a first SIGINT (loop_interrupt_running) */
    R->watch_op.L = L;
    if (R->interrupted) loop_interrupt_running(R); /* (one that came before the batch) */
    return 2;
  }
  watchdog_loop_thread(R); /* (as task_resume sets it) */
  R->watch_op.L = L;
  R->watch_op.outer_host = watchdog_host;
  watchdog_host = R; /* the signal's handler finds the host here */
  if (R->interrupted) loop_interrupt_running(R);
  return 1;
}

void watchdog_batch_end(resil_t *R, int timed) {
  if (!timed) return;
  if (timed == 1) watchdog_host = R->watch_op.outer_host;
  if (R->watch_op.interrupted) { /* (its fns ended by the interrupt's hook: L runs the host's work next) */
    lua_sethook(R->watch_op.L, NULL, 0, 0);
    R->watch_op.interrupted = 0;
  }
  R->watch_op.L = NULL;
}

/* ...and around each op's fn (run_op), in a batch that is timed, and a
 * db:enqueue's done (finish_batch). kind: 0 db:tx, 1 db:commit_only, 2
 * db:enqueue, 3 a done; ref: its {fn, args...}, or the done. The counter by
 * stores, not atomic adds: the loop's thread is its only writer, and a
 * locked add an op costs more than the rest (an op is some 9,000
 * instructions; these, about 25). */
void watchdog_op_begin(resil_t *R, int kind, int ref) {
  R->watch_op.kind = kind;
  R->watch_op.ref = ref;
  unsigned long seq = atomic_load_explicit(&R->resume_seq, memory_order_relaxed) + 1;
  atomic_store_explicit(&R->watch_op.seq, seq, memory_order_release); /* whole before the count says it runs */
  atomic_store_explicit(&R->resume_seq, seq, memory_order_release);
}

void watchdog_op_end(resil_t *R) {
  unsigned long seq = atomic_load_explicit(&R->resume_seq, memory_order_relaxed) + 1;
  atomic_store_explicit(&R->resume_seq, seq, memory_order_release); /* no handler arms it from here on */
  atomic_store_explicit(&R->watch_op.seq, 0, memory_order_relaxed);
  if (R->watch_op.hooked) { /* a stop was armed in it (raised and hooked stay 0 until one is) */
    lua_sethook(R->watch_op.L, R->watch_op.hook, R->watch_op.mask, R->watch_op.count);
    R->watch_op.raised = R->watch_op.hooked = 0;
  }
}

int luaopen_resil_watchdog(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_unwatched);
  lua_setfield(L, -2, "unwatched");
  return 1;
}
