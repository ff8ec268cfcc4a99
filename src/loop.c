/*
 * loop.c: the task scheduler, the host clock (real or virtual) and timers.
 *
 * Every script runs in a coroutine (a task). A primitive that waits records
 * how to cancel its wait (task_wait), starts its event and yields with a
 * continuation; the event's callback calls task_wake, which queues the task;
 * the loop resumes queued tasks and the continuation pushes the results from
 * the state the callback left behind (OpenResty's "retval" pattern). Results
 * are therefore built inside the coroutine, under its protection.
 *
 * The virtual clock: when no task is ready and no real I/O is in flight (or
 * none arrived for a short grace period, waited out on time), time jumps
 * to the earliest virtual timer. libevent cannot run on a fake clock, so
 * virtual timers live in a small binary heap here; real timers are
 * libevent's.
 */
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "host.h"

#define TASK_MT "resil.Task"
#define HEAP_NONE ((size_t)-1)
#define VIRTUAL_GRACE_USEC 10000
/* A store command (Redis) answers in well under a millisecond unless the
 * store is frozen: on a loaded machine its server may not run within 10 ms,
 * and time jumped while a command was on its way (a hold's expiry read
 * against a clock that had moved). Bounded all the same by the command's
 * own timeout, which is real time. */
#define VIRTUAL_STORE_GRACE_USEC 250000
/* ended later than this: the process did not run all along (stopped, or
 * woken late), and I/O that became due meanwhile may be in the same turn */
#define GRACE_LATE_SECONDS 0.003 /* past the grace */
#define GRACES_INCONCLUSIVE_MAX 20 /* then time moves on all the same (a machine that never lets it run) */

typedef enum { TASK_READY, TASK_RUNNING, TASK_WAITING, TASK_DONE } task_state;

struct task {
  resil_t *R;
  lua_State *co;
  int ref_self, ref_co, ref_ctx;
  int id;
  task_state state;
  int nargs;               /* values on co's stack for the next resume */
  task *next_ready;
  const task_wait_ops *wait_ops; /* the wait in progress, until the continuation runs */
  void *wait_arg;
  int background;          /* does not keep the loop running (resil.background) */
  task **joiners;          /* tasks blocked in join on this one */
  int njoiners, cap_joiners;
  task *joining;           /* the task this one is blocked on */
  resil_timer timer;       /* sleep and join timeouts */
  int timed_out;
  int failed, canceled, joined;
  int canceling;           /* its <close> handlers are running: a second cancel is a no-op */
  int stop_raised;         /* the stop watch raised in it, this resume (stop_watch_hook) */
  int stop_cut;            /* ...and it ran on (the error caught): it yielded to be ended */
  char *stop_message;      /* what the stop raised: the error a cut task ends with (a pcall had swallowed it) */
  int resumes_after_stop;  /* coroutines it resumed since (resume_nested: cut past a pace's worth) */
  int yielded;             /* ready again by a bare yield (not woken): it waits for the next turn */
  int started;             /* resumed once at least (task_started) */
  long instructions;       /* charged to it this resume, a part at a time (instruction_hook) */
  int cancel_due;          /* canceled while its wait was settling, or shielded: stopped at its next wait */
  int shield;              /* resil.shield calls running: a cancel waits for them (cancel_due) */
  int shield_off;          /* a forced cancel came: shields no longer hold it off */
  int nres;                /* results (or 1 error) at the top of co */
  char *traceback;
  task_hold *holds;        /* given back as it ends (task_hold_add) */
  task_done_fn on_done;    /* resil_call: told once when the task ends */
  void *on_done_arg;
  char where[96];
  int where_line;          /* not yet appended to where */
};

/* A coroutine being resumed from Lua (coroutine.resume, wrap), linked from
 * R->nested while it runs: the guards a signal arms reach it (resume_nested) */
typedef struct nested_run {
  lua_State *co, *from;
  struct nested_run *outer;
} nested_run;

/* ---------- clock ---------- */

double monotonic_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double resil_now(resil_t *R) {
  return R->virtual_clock ? R->virtual_now : monotonic_seconds() + R->clock_lead;
}

/* the store's clock (store.lua): resil.now() without the lead a virtual clock left on the real one,
 * so that the store's time, which other processes share, is the wall clock's again on real time */
int resil_l_store_clock(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  lua_pushnumber(L, R->virtual_clock ? R->virtual_now : monotonic_seconds());
  return 1;
}

/* ---------- virtual timer heap, ordered by (deadline, seq) ---------- */

static int timer_before(const resil_timer *a, const resil_timer *b) {
  return a->deadline < b->deadline || (a->deadline == b->deadline && a->seq < b->seq);
}

static void heap_set(resil_t *R, size_t i, resil_timer *tm) {
  R->vheap[i] = tm;
  tm->heap_index = i;
}

static void heap_sift_up(resil_t *R, size_t i) {
  resil_timer *tm = R->vheap[i];
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!timer_before(tm, R->vheap[parent])) break;
    heap_set(R, i, R->vheap[parent]);
    i = parent;
  }
  heap_set(R, i, tm);
}

static void heap_sift_down(resil_t *R, size_t i) {
  resil_timer *tm = R->vheap[i];
  for (;;) {
    size_t child = 2 * i + 1;
    if (child >= R->vheap_len) break;
    if (child + 1 < R->vheap_len && timer_before(R->vheap[child + 1], R->vheap[child])) child++;
    if (!timer_before(R->vheap[child], tm)) break;
    heap_set(R, i, R->vheap[child]);
    i = child;
  }
  heap_set(R, i, tm);
}

static int heap_push(resil_t *R, resil_timer *tm) {
  if (R->vheap_len == R->vheap_cap) {
    size_t cap = R->vheap_cap ? R->vheap_cap * 2 : 64;
    resil_timer **grown = realloc(R->vheap, cap * sizeof *grown);
    if (!grown) return -1;
    R->vheap = grown;
    R->vheap_cap = cap;
  }
  heap_set(R, R->vheap_len++, tm);
  heap_sift_up(R, tm->heap_index);
  return 0;
}

static void heap_remove(resil_t *R, resil_timer *tm) {
  size_t i = tm->heap_index;
  resil_timer *last = R->vheap[--R->vheap_len];
  tm->heap_index = HEAP_NONE;
  if (i == R->vheap_len) return;
  heap_set(R, i, last);
  heap_sift_up(R, i);
  heap_sift_down(R, last->heap_index);
}

/* ---------- timers ---------- */

static void real_timer_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  resil_timer *tm = arg;
  tm->armed = 0;
  tm->fn(tm->arg);
}

void timer_init(resil_t *R, resil_timer *tm, resil_timer_fn fn, void *arg) {
  memset(tm, 0, sizeof *tm);
  tm->R = R;
  tm->fn = fn;
  tm->arg = arg;
  tm->heap_index = HEAP_NONE;
}

void timer_start(resil_timer *tm, double seconds) {
  resil_t *R = tm->R;
  timer_stop(tm);
  if (seconds < 0) seconds = 0;
  /* (on the virtual clock too: a sleep(math.huge) that fired there set the clock to inf, and
   * every bucket, breaker and deadline after it went wrong) */
  if (seconds > 1e9) seconds = 1e9;
  if (R->virtual_clock) {
    tm->deadline = R->virtual_now + seconds;
    tm->seq = R->timer_seq++;
    if (heap_push(R, tm) != 0) return; /* out of memory: the timer never fires */
  } else {
    if (!tm->ev) tm->ev = evtimer_new(R->base, real_timer_cb, tm);
    if (!tm->ev) return;
    struct timeval tv = {(time_t)seconds, (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)};
    evtimer_add(tm->ev, &tv);
  }
  tm->armed = 1;
}

void timer_stop(resil_timer *tm) {
  if (!tm->armed) return;
  if (tm->heap_index != HEAP_NONE) heap_remove(tm->R, tm);
  if (tm->ev) evtimer_del(tm->ev);
  tm->armed = 0;
}

void timer_free(resil_timer *tm) {
  timer_stop(tm);
  if (tm->ev) event_free(tm->ev);
  tm->ev = NULL;
}

/* Fire the earliest virtual timer, moving the clock to its deadline. */
static void virtual_advance(resil_t *R) {
  resil_timer *tm = R->vheap[0];
  heap_remove(R, tm);
  if (tm->deadline > R->virtual_now) R->virtual_now = tm->deadline;
  tm->armed = 0;
  tm->fn(tm->arg);
}

void clock_set_virtual(resil_t *R, int on) {
  if (on == R->virtual_clock) return;
  if (on) {
    /* a whole second to start from, so that whole and binary-fraction
     * durations subtract exactly */
    R->virtual_now = ceil(monotonic_seconds() + R->clock_lead);
    R->virtual_clock = 1;
    return;
  }
  /* back to real time, from where the virtual clock got (time never goes back): pending virtual
   * timers keep their remaining delay */
  double lead = R->virtual_now - monotonic_seconds();
  if (lead > R->clock_lead) R->clock_lead = lead;
  R->virtual_clock = 0;
  while (R->vheap_len > 0) {
    resil_timer *tm = R->vheap[0];
    double remaining = tm->deadline - R->virtual_now;
    heap_remove(R, tm);
    tm->armed = 0;
    timer_start(tm, remaining);
  }
}

/* ---------- tasks ---------- */

static task *task_of(lua_State *L) { return *(task **)lua_getextraspace(L); }

int task_id(const task *t) { return t->id; }
task *task_running(lua_State *L) { return task_of(L); }
int task_context_ref(const task *t) { return t->ref_ctx; }

task *task_current(lua_State *L, const char *what) {
  task *t = task_of(L);
  if (!t || t->state != TASK_RUNNING || !lua_isyieldable(L))
    luaL_error(L, "%s must be called from a task (resil.spawn), not from a plain coroutine, "
                  "a metamethod or a C callback", what);
  return t;
}

static void ready_push(resil_t *R, task *t) {
  /* outside resil_run/resil_step/resil_call (an embedder runs the event base
   * itself): libevent calls loop_pump to run it */
  if (!R->in_loop && !R->ready_head && R->pump_ev) event_active(R->pump_ev, EV_TIMEOUT, 0);
  t->state = TASK_READY;
  t->next_ready = NULL;
  if (R->ready_tail) R->ready_tail->next_ready = t;
  else R->ready_head = t;
  R->ready_tail = t;
}

static void ready_remove(resil_t *R, task *t) {
  task **p = &R->ready_head, *prev = NULL;
  while (*p && *p != t) prev = *p, p = &(*p)->next_ready;
  if (!*p) return;
  *p = t->next_ready;
  if (R->ready_tail == t) R->ready_tail = prev;
  t->next_ready = NULL;
}

void task_wait(task *t, const task_wait_ops *ops, void *arg) {
  t->state = TASK_WAITING;
  t->wait_ops = ops;
  t->wait_arg = arg;
}

/* The wait's ops stay with the task until it resumes: a cancel in between
 * must give back what the wake granted. */
void task_wake(task *t) {
  if (t->state != TASK_WAITING) return;
  t->nargs = 0;
  ready_push(t->R, t);
}

/* A canceled task's wait ends here, whichever side of the wake it is on. */
static void task_end_wait(task *t) {
  const task_wait_ops *ops = t->wait_ops;
  void *arg = t->wait_arg;
  t->wait_ops = NULL;
  t->wait_arg = NULL;
  if (!ops) return;
  if (t->state == TASK_WAITING && ops->cancel) ops->cancel(arg);
  else if (t->state == TASK_READY && ops->give_back) ops->give_back(arg);
}

static void joiners_remove(task *target, task *joiner) {
  for (int i = 0; i < target->njoiners; i++) {
    if (target->joiners[i] == joiner) {
      target->joiners[i] = target->joiners[--target->njoiners];
      return;
    }
  }
}

/* The task has finished: wake its joiners and let it be collected. */
static void task_done(task *t) {
  resil_t *R = t->R;
  t->state = TASK_DONE;
  timer_stop(&t->timer);
  while (t->holds) { /* before its joiners run: what it held is free for them */
    task_hold *h = t->holds;
    task_hold_remove(h);
    h->drop(h, 1);
  }
  for (int i = 0; i < t->njoiners; i++) {
    task *j = t->joiners[i];
    j->joining = NULL;
    timer_stop(&j->timer);
    task_wake(j);
  }
  t->njoiners = 0;
  if (!t->background) R->tasks_alive--;
  if (t->on_done) {
    t->joined = 1; /* its caller sees the failure: not reported again when collected */
    t->on_done(t->on_done_arg, t);
    t->on_done = NULL;
  }
  luaL_unref(R->L, LUA_REGISTRYINDEX, t->ref_self);
  t->ref_self = LUA_NOREF;
}

/* Build the traceback of a failed task, from the coroutine's own stack. */
static void task_record_failure(task *t) {
  lua_State *co = t->co;
  const char *msg = resil_describe(co, -1);
  /* an error that says all a user needs (traceback = false: a run another
   * process holds) is reported as its message alone */
  int bare = 0;
  if (lua_type(co, -2) == LUA_TTABLE) {
    lua_pushliteral(co, "traceback");
    bare = lua_rawget(co, -3) == LUA_TBOOLEAN && !lua_toboolean(co, -1);
    lua_pop(co, 1);
  }
  if (bare) lua_pushvalue(co, -1);
  else luaL_traceback(co, co, msg, 0);
  free(t->traceback);
  t->traceback = strdup(lua_tostring(co, -1));
  lua_pop(co, 2);
  t->failed = 1;
  t->nres = 1;
  /* stopped by a signal (resil_interrupt): the host says so once; not again,
   * with a traceback, as this task's unjoined failure when it is collected */
  if (t->R->interrupted) t->joined = 1;
}

static void guard_for_close(resil_t *R, lua_State *co);

/* A failed coroutine keeps its whole stack (and all it references) for
 * debug.traceback until reset; keep only the error value, so a task that hit
 * --max-memory gives its memory back at once, and close its pending
 * to-be-closed variables as coroutine.close would. L stack (co): ..., err -> err */
/* t's pending <close> handlers run (its thread reset) as a resume of its own:
 * under its caps and signals, and timed by the watchdog (a handler that
 * looped, run at a cancel or a failure, held the loop for good: the watchdog
 * saw no resume, or the canceling task's, whose thread it hooked) */
static int task_close_as_resume(task *t, lua_State *err_on) {
  resil_t *R = t->R;
  task *outer = R->current;
  resil_t *outer_host = watchdog_host;
  /* (inside another task's resume the count is odd: the handlers are timed as part of it, the
   * count unchanged, else a task that looped canceling others was never seen twice in one resume;
   * stopped there, the outer is timed afresh) */
  int nested = (atomic_load(&R->resume_seq) & 1) != 0;
  R->current = t;
  t->stop_raised = 0;
  t->resumes_after_stop = 0;
  watchdog_host = R;
  if (!nested) atomic_fetch_add(&R->resume_seq, 1);
  unsigned long seq = atomic_load(&R->resume_seq);
  int status = lua_resetthread(t->co);
  int stopped = t->stop_raised;
  if (!nested) atomic_fetch_add(&R->resume_seq, 1);
  watchdog_host = outer_host;
  R->current = outer;
  /* the watchdog asked as the handlers ran: a handler it stopped leaves the outer timed afresh;
   * else the time was the outer's, stopped now */
  if (nested && atomic_load(&R->runaway_request) == seq) {
    if (stopped) atomic_fetch_add(&R->resume_seq, 2);
    else loop_arm_runaway(R);
  }
  /* a handler that raised, or looped until the watchdog stopped it: said,
   * with its file:line (the task's own end says only canceled, or its
   * error). A task that failed resets with its error's status, and the error
   * (err_on's top, copied on its own top before) as it was unless a handler
   * raised another. */
  int raised = status != LUA_OK && lua_checkstack(t->co, 4);
  if (raised && err_on) {
    lua_pushvalue(err_on, -1);
    lua_xmove(err_on, t->co, 1);
    raised = !lua_rawequal(t->co, -1, -2);
    lua_pop(t->co, 1);
  }
  if (raised) {
    const char *why = lua_tostring(t->co, -1);
    lua_createtable(t->co, 0, 1); /* (the line names the task: the log finds it from its thread) */
    lua_pushstring(t->co, why ? why : "(an error object that is not a string)");
    lua_setfield(t->co, -2, "error");
    host_log(t->co, "error", "a task's <close> handler failed as the task ended");
  }
  return status;
}

static void task_drop_stack(task *t) {
  lua_State *co = t->co, *L = t->R->L;
  if (!lua_checkstack(L, 1)) return;
  lua_xmove(co, L, 1);
  guard_for_close(t->R, co);
  lua_pushvalue(L, -1); /* (a copy on its top: task_close_as_resume tells a handler's error from it) */
  lua_xmove(L, co, 1);
  task_close_as_resume(t, L);
  lua_settop(co, 0);
  lua_xmove(L, co, 1);
}

static void instruction_hook(lua_State *L, lua_Debug *ar);
static void stop_watch_hook(lua_State *L, lua_Debug *ar);
static int budget_part(const resil_t *R);
static const char *task_where(task *t);
static int push_results(lua_State *L, task *t);
static void describe_function(lua_State *L, int idx, task *t);

/* t ends canceled: its thread is reset, which runs its pending <close>
 * handlers (one may cancel it again: canceling keeps that from resetting the
 * thread twice, which corrupts it) */
static void task_end_canceled(task *t) {
  t->canceling = 1;
  task_close_as_resume(t, NULL);
  lua_settop(t->co, 0);
  resil_push_error(t->co, "canceled", "task %d was canceled", t->id);
  t->failed = t->canceled = 1;
  t->nres = 1;
  task_done(t);
}

/* t was cut after a stop it caught (stop_cut): it ends failed with the
 * stop's message, where the stop raised, and the traceback where it ran on
 * (cut_running): not a bare "task N was canceled" (the main task's, a
 * resil_call's) with no line and no word of the watchdog, and a spawned task's
 * not said at all, as a cancel is not */
static void task_end_cut(task *t) {
  if (!t->stop_message) {
    task_end_canceled(t);
    return;
  }
  t->canceling = 1;
  task_close_as_resume(t, NULL);
  lua_settop(t->co, 0);
  lua_pushstring(t->co, t->stop_message);
  if (!t->traceback) t->traceback = strdup(t->stop_message);
  t->failed = 1;
  t->nres = 1;
  task_done(t);
}

static void task_resume(resil_t *R, task *t) {
  int nres = 0, nargs = t->nargs;
  t->nargs = 0;
  t->state = TASK_RUNNING;
  t->started = 1;
  t->wait_ops = NULL; /* the continuation owns what the wait granted now */
  t->wait_arg = NULL;
  R->current = t;
  t->stop_raised = 0;
  t->resumes_after_stop = 0;
  t->instructions = 0;
  if (t->stop_message) { /* (a stop an earlier resume caught, and it yielded since) */
    free(t->stop_message);
    t->stop_message = NULL;
  }
  if (R->max_instructions > 0) lua_sethook(t->co, instruction_hook, LUA_MASKCOUNT, budget_part(R));
  else if (R->stop_requested && R->stop_grace > 0) loop_watch_running(R);
  watchdog_loop_thread(R); /* (not rewritten at each resume: read by the watchdog) */
  resil_t *outer_host = watchdog_host;
  watchdog_host = R; /* the watchdog's signal finds the host it stops here (watchdog.c) */
  /* an interrupt that came while no task ran (the program's own event base waiting for I/O, or
   * just before this resume) armed nothing: the task is stopped at its first instruction (it ran
   * on, unhooked, for good). Once R->current, the loop's thread and watchdog_host say this
   * resume: a signal from here on arms it itself. */
  atomic_signal_fence(memory_order_seq_cst);
  if (R->interrupted) lua_sethook(t->co, instruction_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  atomic_fetch_add(&R->resume_seq, 1); /* odd: a resume runs */
  int status = lua_resume(t->co, R->L, nargs, &nres);
  atomic_fetch_add(&R->resume_seq, 1);
  watchdog_host = outer_host;
  R->current = NULL;
  if (status == LUA_YIELD && t->stop_cut) { /* the stop watch's: ended with the stop, its <close> handlers run */
    t->stop_cut = 0;
    lua_pop(t->co, nres);
    task_end_cut(t);
    return;
  }
  if (status == LUA_YIELD) {
    if (t->state == TASK_RUNNING) { /* a bare coroutine.yield: let others run */
      lua_pop(t->co, nres);
      ready_push(R, t);
      t->yielded = 1;
    }
    /* a cancel that waited for a settling wait, or for the shield it met */
    if (t->cancel_due && t->state != TASK_RUNNING && (!t->shield || t->shield_off)) {
      t->cancel_due = 0;
      task_stop(t);
    }
    return;
  }
  if (t->cancel_due) { /* canceled while settling, and it ended before it waited again */
    t->cancel_due = 0;
    task_end_canceled(t);
    return;
  }
  if (status == LUA_OK) {
    t->nres = nres;
  } else {
    task_record_failure(t);
    task_drop_stack(t);
  }
  task_done(t);
}

/* Tasks run after the ones ready at a turn's start, in the same turn (CHAIN_MAX at most) */
#define CHAIN_MAX 64

/* Resume the tasks that are ready now, then those they woke or spawned, in
 * the same turn: a gateway request's handler, the task it spawns for the
 * upstream call and the handler again once that ended took a turn each, each
 * with a look at I/O (an epoll_wait) between. Once a task of the turn yielded
 * (a bare yield, sleep(0): "let the others and I/O in"), the tasks woken
 * meanwhile wait for the next turn, after I/O is polled, as all did before
 * (a script that spawns a task and yields sees it at its first wait); so do
 * the tasks past CHAIN_MAX: tasks that wake each other cannot keep I/O from
 * being polled. */
static void loop_run_ready(resil_t *R) {
  int initial = 0, chained = 0, yielded = 0; /* (counted, not the tail task: a cancel may take it off the list) */
  for (task *t = R->ready_head; t; t = t->next_ready) initial++;
  while (R->ready_head) {
    task *t = R->ready_head;
    if (initial-- <= 0 && (yielded || chained++ == CHAIN_MAX)) break;
    R->ready_head = t->next_ready;
    if (!R->ready_head) R->ready_tail = NULL;
    t->next_ready = NULL;
    t->yielded = 0;
    task_resume(R, t);
    yielded |= t->yielded; /* (t is not collected before the next resume) */
    if (R->interrupted) break;
    if (R->main_task && R->main_task->failed) break;
  }
}

/* --max-instructions: a task's budget is shared by every thread it runs
 * (its own and the coroutines it resumes), and a count hook counts per
 * thread, so each thread charges the task a part at a time. A thread's count
 * runs on across its resumes (resume_nested does not reset it): a loop that
 * bounces between threads is charged in full, and a coroutine that tasks
 * share charges one at most a part early. */
#define BUDGET_PARTS 16

static int budget_part(const resil_t *R) {
  return (int)((R->max_instructions + BUDGET_PARTS - 1) / BUDGET_PARTS);
}

/* The <close> handlers of a thread a guard failed get a part of the budget,
 * not the one instruction a spent one allows, and none once interrupted
 * (what they give back matters; a second signal kills). An error a hook
 * raised left the thread's hooks off, and a handler that looped ran for
 * good: they are turned back on first (hooks_back.c). */
static void guard_for_close(resil_t *R, lua_State *co) {
  hooks_back_on(co);
  if (lua_gethook(co) != instruction_hook) return;
  if (R->max_instructions > 0 && !R->interrupted) lua_sethook(co, instruction_hook, LUA_MASKCOUNT, budget_part(R));
  else lua_sethook(co, NULL, 0, 0);
}

/* Is L host_pcall's thread, or a coroutine resumed from it? Its cap is then
 * the host call's own. */
static int runs_for_host(resil_t *R, lua_State *L) {
  if (!R->host_L) return 0;
  if (R->host_L == L || !R->current) return 1;
  for (nested_run *n = R->nested; n; n = n->outer)
    if (n->from == R->host_L) return 1;
  return 0;
}

static void instruction_hook(lua_State *L, lua_Debug *ar) {
  resil_t *R = resil_from_lua(L);
  task *t = R->current;
  int host = runs_for_host(R, L);
  if (!R->interrupted && !host && t && R->max_instructions > 0 && ar->event == LUA_HOOKCOUNT &&
      (t->instructions += lua_gethookcount(L)) < R->max_instructions)
    return;
  /* no cap to raise and nothing to stop: a hook left over. An interrupt's met after the interrupt was
   * reported and cleared (resil_call reports a pending one once; one from another thread is armed when
   * its signal lands), or lua_newthread's copy of a capped host_pcall's (a task a policy started at
   * load, in a reload, was cut at a cap it had no part of) */
  if (!R->interrupted && !host && R->max_instructions <= 0) {
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  /* keep firing on every instruction so that a pcall cannot swallow it */
  lua_sethook(L, instruction_hook, LUA_MASKCOUNT, 1);
  /* located where it runs (luaL_error's level 1, in a hook, is the caller:
   * for a resil_call, the host's own "[resil embed]:62:") */
  lua_Debug ar0;
  char at[128] = "";
  if (lua_getstack(L, 0, &ar0) && lua_getinfo(L, "Sl", &ar0) && ar0.currentline > 0)
    snprintf(at, sizeof at, "%s:%d: ", ar0.short_src, ar0.currentline);
  if (R->interrupted) {
    /* the first place it stopped, for the run's report: a Ctrl-C of a policy that loops said
     * only "interrupted by signal 2", never where */
    if (!R->interrupted_at[0]) snprintf(R->interrupted_at, sizeof R->interrupted_at, "%s", at);
    lua_pushfstring(L, "%sinterrupted by signal %d", at, (int)R->interrupted);
    lua_error(L);
  }
  if (host) { /* host_pcall: where it first looped */
    unsigned long seq = atomic_load_explicit(&R->resume_seq, memory_order_relaxed);
    if (!R->host_stop[0] && R->host_watch_seq && R->host_watch_seq == seq) { /* the watchdog's (loop_arm_host) */
      char ran[32];
      snprintf(ran, sizeof ran, "%.1f", atomic_load(&R->runaway_request_seconds));
      snprintf(R->host_stop, sizeof R->host_stop, "%s%s ran %s s without yielding (--max-task-seconds=%s)", at,
               R->host_what, ran, R->max_task_seconds_text);
      /* raised again until host_pcall returns (host_stop); what the turn runs after it is timed afresh */
      R->host_watch_seq = 0;
      atomic_store_explicit(&R->resume_seq, seq + 2, memory_order_release);
    }
    /* a load's own cap (host_pcall_load, without --max-instructions) is not the option's: a file
     * that loops as it loads was told to raise an option the user never passed */
    if (!R->host_stop[0] && R->max_instructions == LOAD_MAX_INSTRUCTIONS)
      snprintf(R->host_stop, sizeof R->host_stop, "%s%s ran more than %ld instructions as it loaded (a file must "
               "return to load: a loop that never ends, or work that belongs in a task)", at, R->host_what,
               R->max_instructions);
    else if (!R->host_stop[0])
      snprintf(R->host_stop, sizeof R->host_stop, "%s%s ran more than --max-instructions=%ld", at, R->host_what,
               R->max_instructions);
    lua_pushstring(L, R->host_stop);
    lua_error(L);
  }
  lua_pushfstring(L, "%stask %d (%s) ran more than --max-instructions=%I without yielding", at, t ? t->id : 0,
                  t ? task_where(t) : "?", (lua_Integer)R->max_instructions);
  lua_error(L);
}

/* A stop asked for (resil_request_stop) is acted on by a task, in the loop:
 * a task that never yields keeps it from ever running, and the first SIGTERM
 * of a gateway whose request handler looped did nothing. Once a stop is
 * asked, with resil.stop_requested(true, grace), the running task is
 * watched (a count hook: nothing costs while none is asked) and stopped
 * after `grace` seconds without yielding, as --max-instructions stops one. */
#define STOP_WATCH_EVERY (1 << 20) /* instructions between looks at the clock (real time) */

/* The stop's message (on L's top) kept for t, in case it runs on after a pcall caught it */
static void note_stop(lua_State *L, task *t) {
  if (!t) return;
  free(t->stop_message);
  t->stop_message = strdup(lua_tostring(L, -1));
}

/* (located where it runs, as the watchdog's: luaL_error's level 1, in a hook, is the looping
 * function's caller, a handler's pcall, which has no line) */
static int stop_watch_error(lua_State *L, resil_t *R, task *t, double now) {
  lua_Debug ar0;
  char at[128] = "";
  for (int lv = 0; lua_getstack(L, lv, &ar0) && lua_getinfo(L, "Sl", &ar0); lv++) {
    if (ar0.currentline > 0) {
      snprintf(at, sizeof at, "%s:%d: ", ar0.short_src, ar0.currentline);
      break;
    }
  }
  char ran[32];
  snprintf(ran, sizeof ran, "%.1f", now - R->stop_watch_since);
  lua_pushfstring(L, "%stask %d (%s) ran %s s without yielding while the host stops", at, t ? t->id : 0,
                  t ? task_where(t) : "?", ran);
  note_stop(L, t);
  return lua_error(L);
}

/* A guard raised in t and it runs on after the error (a pcall caught it):
 * a yield no pcall catches, and the task is ended with the stop's error
 * (task_resume, task_end_cut); from a coroutine the task resumed, each resume passes the
 * yield on (resume_nested). -> 0 where it cannot yield (the guard raises
 * again) */
static int cut_running(lua_State *L, resil_t *R, task *t) {
  if (L == (R->nested ? R->nested->co : t->co) && lua_isyieldable(L)) {
    t->stop_cut = 1;
    if (t->stop_message && lua_checkstack(L, 4)) { /* the stop, and where it ran on */
      luaL_traceback(L, L, t->stop_message, 0);
      free(t->traceback);
      t->traceback = strdup(lua_tostring(L, -1));
      lua_pop(L, 1);
    }
    lua_sethook(L, NULL, 0, 0);
    lua_yield(L, 0);
    return 1;
  }
  return 0;
}

static void stop_watch_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  resil_t *R = resil_from_lua(L);
  task *t = R->current;
  double now = monotonic_seconds();
  if (t && t->stop_raised) {
    if (cut_running(L, R, t)) return;
  } else {
    if (R->stop_watch_since == 0) {
      R->stop_watch_since = now;
      return;
    }
    if (now - R->stop_watch_since < R->stop_grace) return;
    if (t) t->stop_raised = 1;
  }
  /* an error its request answers (a 500); the hook stays at its pace, so that
   * the <close> handlers the error runs on its way (a call's guard giving
   * back its hold) are not cut in turn */
  lua_sethook(L, stop_watch_hook, LUA_MASKCOUNT, STOP_WATCH_EVERY);
  stop_watch_error(L, R, t, now);
}

static void runaway_hook(lua_State *L, lua_Debug *ar);

/* The watchdog's stop raised in L, t's thread or a coroutine it runs, at the
 * line of the first Lua function from `level` up, `how` after the message;
 * the hooks left at the stop watch's pace (once raised, a pcall that goes on
 * is cut at the next hook) */
static void runaway_raise(lua_State *L, resil_t *R, task *t, int level, const char *how) {
  t->stop_raised = 1;
  /* at the stop watch's pace: the <close> handlers the error runs (a call's
   * guard giving back its hold) are not cut in turn */
  lua_sethook(L, runaway_hook, LUA_MASKCOUNT, STOP_WATCH_EVERY);
  /* so do the threads that resumed L: one that gets the error as
   * coroutine.resume's false, err runs on as after a pcall, not cut at its
   * next instruction with the message lost */
  if (t->co != L) lua_sethook(t->co, runaway_hook, LUA_MASKCOUNT, STOP_WATCH_EVERY);
  for (nested_run *n = R->nested; n; n = n->outer)
    if (n->co != L) lua_sethook(n->co, runaway_hook, LUA_MASKCOUNT, STOP_WATCH_EVERY);
  lua_Debug ar0;
  char at[128] = "";
  for (int lv = level; lua_getstack(L, lv, &ar0) && lua_getinfo(L, "Sl", &ar0); lv++) {
    if (ar0.currentline > 0) {
      snprintf(at, sizeof at, "%s:%d: ", ar0.short_src, ar0.currentline);
      break;
    }
    if (level == 0) break; /* (the hook's: where it runs) */
  }
  char ran[32];
  snprintf(ran, sizeof ran, "%.1f", atomic_load(&R->runaway_request_seconds));
  lua_pushfstring(L, "%stask %d (%s) ran %s s without yielding (--max-task-seconds=%s)%s", at, t->id, task_where(t),
                  ran, R->max_task_seconds_text, how);
  note_stop(L, t);
  lua_error(L);
}

/* The watchdog's (watchdog.c): the resume it saw run max_task_seconds is
 * stopped where it runs, as --max-instructions stops a task; a hook left
 * on a thread after its resume ended takes itself off. */
static void runaway_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  resil_t *R = resil_from_lua(L);
  task *t = R->current;
  if (!t || atomic_load(&R->resume_seq) != atomic_load(&R->runaway_request)) {
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  if (t->stop_raised && cut_running(L, R, t)) return;
  runaway_raise(L, R, t, 0, "");
}

/* A C function the watchdog's stop interrupted (a SQLite statement,
 * watchdog_sql_stopped): the stop raised as the hook raises it, at the line
 * that called the function. -> 0 (nothing raised) if the running resume is
 * not one the watchdog stops */
int loop_raise_runaway(lua_State *L, const char *how) {
  resil_t *R = resil_from_lua(L);
  task *t = R->current;
  if (!t || atomic_load(&R->resume_seq) != atomic_load(&R->runaway_request)) return 0;
  runaway_raise(L, R, t, 1, how);
  return 0;
}

/* From the watchdog's signal handler, on the loop's own thread, in the
 * resume `seq` (as lua.c sets its hook from SIGINT's handler: Lua allows it
 * there, not from another thread, since lua_sethook walks the thread's call
 * frames), the resume R->runaway_request names still running: only hooks,
 * on the task's thread and the coroutines it is running. */
/* (in a signal handler: no snprintf) */
static size_t put_text(char *dst, size_t at, size_t cap, const char *s) {
  while (*s && at + 1 < cap) dst[at++] = *s++;
  dst[at] = '\0';
  return at;
}
static size_t put_int(char *dst, size_t at, size_t cap, long v) {
  char digits[24];
  int n = 0;
  unsigned long u = v < 0 ? 0UL - (unsigned long)v : (unsigned long)v;
  do digits[n++] = (char)('0' + u % 10); while ((u /= 10) && n < 23);
  if (v < 0 && at + 1 < cap) dst[at++] = '-';
  while (n > 0 && at + 1 < cap) dst[at++] = digits[--n];
  dst[at] = '\0';
  return at;
}

void loop_arm_runaway(resil_t *R) {
  task *t = R->current;
  if (!t) return;
  /* what the watchdog names if the hook never gets to run (stuck outside Lua) */
  size_t n = put_text(R->runaway_what, 0, sizeof R->runaway_what, "task ");
  n = put_int(R->runaway_what, n, sizeof R->runaway_what, t->id);
  n = put_text(R->runaway_what, n, sizeof R->runaway_what, " (");
  n = put_text(R->runaway_what, n, sizeof R->runaway_what, t->where);
  if (t->where_line > 0) {
    n = put_text(R->runaway_what, n, sizeof R->runaway_what, ":");
    n = put_int(R->runaway_what, n, sizeof R->runaway_what, t->where_line);
  }
  put_text(R->runaway_what, n, sizeof R->runaway_what, ")");
  atomic_store(&R->runaway_armed, atomic_load(&R->runaway_request));
  lua_sethook(t->co, runaway_hook, LUA_MASKCOUNT, 1);
  for (nested_run *n = R->nested; n; n = n->outer) lua_sethook(n->co, runaway_hook, LUA_MASKCOUNT, 1);
}

/* From the watchdog's signal handler, the stop armed a `seconds` ago and the
 * same resume (or the host's close) still running: no hook ran, so no Lua
 * instruction came with hooks on. A __gc finalizer that loops runs with its
 * thread's hooks off (Lua's GCTM): the program waited for good (the CLI's
 * stuck exit ended it). Turned on, the stop raises in the finalizer, which Lua
 * catches (the log says it: log.c's warn function), then in the task, which
 * ends as any the watchdog stops. (Not at the first stop: a finalizer that
 * happened to run then, such as a dropped stream's that records its cost,
 * would have been cut.) */
void loop_hooks_back(resil_t *R) {
  if (R->closing) {
    if (R->L && !R->finalizers_over) hooks_back_on(R->L);
    return;
  }
  task *t = R->current;
  if (!t) return;
  hooks_back_on(t->co);
  for (nested_run *n = R->nested; n; n = n->outer) hooks_back_on(n->co);
}

/* From the watchdog's signal handler, between resumes in the turn `seq`
 * (even): Lua the host runs outside any task (host_pcall: a server handler
 * without tasks, a policy reload's code) ran the watchdog's limit. Stopped as
 * host_pcall's --max-instructions cap stops it (instruction_hook, which raises
 * again until host_pcall returns): only hooks, and what the stuck exit names
 * if none runs (a finalizer, hooks off). Else nothing: no Lua with hooks runs. */
void loop_arm_host(resil_t *R, unsigned long seq) {
  if (!R->host_L || !R->host_what || R->host_stop[0]) return;
  put_text(R->runaway_what, 0, sizeof R->runaway_what, R->host_what);
  atomic_store(&R->runaway_armed, seq);
  R->host_watch_seq = seq;
  lua_sethook(R->host_L, instruction_hook, LUA_MASKCOUNT, 1);
  for (nested_run *n = R->nested; n; n = n->outer) lua_sethook(n->co, instruction_hook, LUA_MASKCOUNT, 1);
}

/* A finalizer lua_close runs (resil_close) that ran the watchdog's limit:
 * raised in once, where it runs, its hooks turned back on (Lua runs it with
 * them off). Lua catches the error and goes on with the others; the log says
 * it (log.c's warn function). */
static void close_stop_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  resil_t *R = resil_from_lua(L);
  lua_sethook(L, NULL, 0, 0);
  char ran[32];
  snprintf(ran, sizeof ran, "%.1f", atomic_load(&R->runaway_request_seconds));
  luaL_where(L, 0);
  lua_pushfstring(L, "%sthe host's close: a __gc finalizer ran %s s without yielding (--max-task-seconds=%s)",
                  lua_tostring(L, -1), ran, R->max_task_seconds_text);
  lua_error(L);
}

/* From the watchdog's signal handler (async-signal-safe: hooks only), while
 * lua_close runs finalizers on the main thread; nothing once the last ran. */
void loop_arm_close(resil_t *R) {
  if (!R->L || R->finalizers_over) return;
  lua_sethook(R->L, close_stop_hook, LUA_MASKCOUNT, 1);
}

/* A finalizer runs with hooks off, so one that loops in the host's own
 * collection between turns held the loop for good, outside every resume.
 * The watchdog times the loop's turns (base_loop), and the stuck exit names
 * `what` if the host is stuck in such a section. Inside a resume, or inside
 * another section, nothing: those name it. */
int loop_host_section_begin(resil_t *R, const char *what) {
  if ((atomic_load_explicit(&R->resume_seq, memory_order_relaxed) & 1) ||
      atomic_load_explicit(&R->host_section, memory_order_relaxed))
    return 0;
  atomic_store_explicit(&R->host_section, what, memory_order_release);
  return 1;
}

void loop_host_section_end(resil_t *R, int begun) {
  if (begun) atomic_store_explicit(&R->host_section, NULL, memory_order_relaxed);
}

/* From task_resume, and from a signal handler (resil_request_stop): only
 * hooks, on the task's thread and the coroutines it is running. */
void loop_watch_running(resil_t *R) {
  task *t = R->current;
  if (!t || R->max_instructions > 0) return;
  R->stop_watch_since = 0;
  lua_sethook(t->co, stop_watch_hook, LUA_MASKCOUNT, STOP_WATCH_EVERY);
  for (nested_run *n = R->nested; n; n = n->outer) lua_sethook(n->co, stop_watch_hook, LUA_MASKCOUNT, STOP_WATCH_EVERY);
}

/* hook on the coroutines being resumed from Lua but `except` (watchdog.c,
 * a store op's stop; async-signal-safe: only hooks) */
void loop_hook_nested(resil_t *R, lua_State *except, lua_Hook hook, int count) {
  for (nested_run *n = R->nested; n; n = n->outer)
    if (n->co != except) lua_sethook(n->co, hook, LUA_MASKCOUNT, count);
}

/* Called from a signal handler (through resil_interrupt): only hooks. */
void loop_interrupt_running(resil_t *R) {
  task *t = R->current;
  int mask = LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT;
  if (t) lua_sethook(t->co, instruction_hook, mask, 1);
  if (R->host_L) lua_sethook(R->host_L, instruction_hook, mask, 1);
  for (nested_run *n = R->nested; n; n = n->outer) lua_sethook(n->co, instruction_hook, mask, 1);
  /* a group commit's db:tx (or enqueue, done) function that runs now: a loop there held the first
   * signal off, until the second killed the process */
  if (R->watch_op.L) {
    R->watch_op.interrupted = 1;
    lua_sethook(R->watch_op.L, instruction_hook, mask, 1);
  }
}

/* A new turn for the watchdog (watchdog.c), outside every resume: what runs from here is timed from
 * here. resume_seq by 2, even as between resumes; a plain store, the loop's thread its only writer. */
static void turn_begins(resil_t *R) {
  unsigned long seq = atomic_load_explicit(&R->resume_seq, memory_order_relaxed);
  if (!(seq & 1)) atomic_store_explicit(&R->resume_seq, seq + 2, memory_order_release);
}

/* (host_pcall's, as it starts.) A host call outside every resume and every other Lua running on L
 * (a server handler without tasks, a reload from SIGHUP) is a turn of its own for the watchdog:
 * timed from its start, as a resume is. libevent runs every request that came together in one
 * pass, and 40 handlers of 40 ms, timed as one turn, had the one running at 0.5 s stopped as
 * having run 0.5 s (its client a 500). Nested in another host call or a finalizer (L runs a
 * frame), it is part of that one's time: an outer loop that calls it stays seen. */
void loop_arm_hook(resil_t *R, lua_State *L) {
  lua_Debug ar;
  if (!lua_getstack(L, 0, &ar)) turn_begins(R);
  if (R->interrupted) lua_sethook(L, instruction_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  else if (R->max_instructions > 0) lua_sethook(L, instruction_hook, LUA_MASKCOUNT, (int)R->max_instructions);
  else lua_sethook(L, NULL, 0, 0);
}

/* ---------- coroutines a task runs itself ---------- */

/* Hooks are per thread, and a thread copies its creator's hook only when it
 * is made: a coroutine a task resumes (a generator, coroutine.wrap) was not
 * under the guards set on the task's thread (--max-instructions, the stop
 * watch, an interrupt). The library's resume and wrap are replaced with
 * these, which give the coroutine its resumer's guard as they resume it:
 * at resume, not at creation, since a coroutine may be made anywhere (at
 * load, by another task, before a stop was asked). While it runs it is
 * linked in R->nested, so that a guard a signal arms meanwhile reaches it.
 * With no guard armed, no hook is set. */

static int is_guard(lua_Hook hook) {
  return hook == instruction_hook || hook == stop_watch_hook || hook == runaway_hook || hook == describe_hook;
}

/* A coroutine a task resumes charges the task NESTED_PART at a time, and
 * NESTED_PART up front each time its count starts over (resume_nested): what
 * it ran since its hook last fired never reaches the hook if it dies (a fresh
 * coroutine each time round a loop, each running less than a part, was never
 * charged at all). Small, as it may charge a tiny coroutine that much. */
#define NESTED_PART 256

static int nested_part(const resil_t *R) {
  int part = budget_part(R);
  return part < NESTED_PART ? part : NESTED_PART;
}

/* co runs under from's guard, or none; a hook set with debug.sethook (a
 * coverage tool's, check's budget) is neither passed on nor replaced.
 * -> 1 if co's count starts over under a task's budget (to be charged) */
static int guard_nested(lua_State *from, lua_State *co) {
  resil_t *R = resil_from_lua(from);
  lua_Hook hook = lua_gethook(from), has = lua_gethook(co);
  int restarted = 0;
  if (!hook && !has) return 0; /* the common case: nothing armed */
  lua_rawgeti(from, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  int main_thread = lua_tothread(from, -1) == co; /* (its resume fails: it must not keep a task's guard) */
  lua_pop(from, 1);
  if (main_thread) return 0;
  int mask, count;
  do { /* again if a signal armed from meanwhile: what it set on co must not be undone */
    hook = lua_gethook(from), mask = lua_gethookmask(from), count = lua_gethookcount(from);
    has = lua_gethook(co);
    if (has && !is_guard(has)) return 0;
    int want = count;
    int budget = hook == instruction_hook && mask == LUA_MASKCOUNT && R->current && R->max_instructions > 0 &&
                 !R->interrupted && !runs_for_host(R, from);
    if (budget) want = nested_part(R);
    restarted = 0;
    if (!is_guard(hook)) {
      if (has) lua_sethook(co, NULL, 0, 0);
    } else if (has != hook || lua_gethookmask(co) != mask || lua_gethookcount(co) != want) {
      lua_sethook(co, hook, mask, want); /* an unchanged one is left: its count runs on (BUDGET_PARTS) */
      restarted = budget;
    } else if (budget) { /* made with this hook (lua_newthread copies it): its count starts with it */
      lua_Debug ar;
      restarted = lua_status(co) == LUA_OK && lua_gettop(co) > 0 && !lua_getstack(co, 0, &ar);
    }
  } while (hook != lua_gethook(from) || mask != lua_gethookmask(from) || count != lua_gethookcount(from));
  return restarted;
}

/* Did a guard stop what runs now? Then no one will close a coroutine it
 * stopped (its task is ending), and it is closed at once. */
static int guard_raised(resil_t *R) {
  task *t = R->current;
  return R->interrupted || (R->host_L && R->host_stop[0]) ||
         (t && (t->stop_raised || (R->max_instructions > 0 && t->instructions >= R->max_instructions)));
}

/* Close a coroutine that died of an error, its <close> handlers run as a
 * failed task's are (guard_for_close). co stack -> the error (of the last
 * failing handler, else its own) */
static int close_failed(resil_t *R, lua_State *co) {
  guard_for_close(R, co);
  return lua_resetthread(co);
}

#define RESUME_CUT (-2)

/* lcorolib's auxresume, the guard passed on -> the number of results moved
 * to L, -1 (an error on L's top), or RESUME_CUT: the stop watch cut co (it
 * is closed) and L is to be cut too. */
static int resume_nested(lua_State *L, lua_State *co, int narg) {
  resil_t *R = resil_from_lua(L);
  int nres;
  if (!lua_checkstack(co, narg)) {
    lua_pushliteral(L, "too many arguments to resume");
    return -1;
  }
  /* A stop raised in the task, which runs on (a pcall or a resume had the error): the hooks come at
   * the stop watch's pace, each thread counting its own, and a fresh coroutine each time round a
   * loop (each shorter than the pace) never reached it: the process ran to the stuck exit. Each
   * such resume counts as a nested part; past the pace's worth the task is cut here. */
  task *cur = R->current;
  if (cur && cur->stop_raised && (lua_gethook(L) == runaway_hook || lua_gethook(L) == stop_watch_hook) &&
      ++cur->resumes_after_stop > STOP_WATCH_EVERY / NESTED_PART) {
    cur->stop_cut = 1;
    return RESUME_CUT;
  }
  nested_run run = {co, L, R->nested};
  /* whole before a signal handler can follow the link */
  __atomic_store_n(&R->nested, &run, __ATOMIC_RELEASE);
  if (guard_nested(L, co)) R->current->instructions += nested_part(R); /* what its hook may never see */
  lua_xmove(L, co, narg);
  int status = lua_resume(co, L, narg, &nres);
  task *t = R->current;
  if (status == LUA_YIELD && t && t->stop_cut) { /* stop_watch_hook's yield, or a resume's passing it on */
    lua_pop(co, nres);
    /* its <close> handlers run at the stop watch's pace, co still the nested run the watchdog
     * hooks: with its hook off (cut_running's) one that looped ran for good, and the process
     * ended as a stuck one */
    lua_Hook guard = lua_gethook(L);
    if (is_guard(guard)) lua_sethook(co, guard, LUA_MASKCOUNT, STOP_WATCH_EVERY);
    lua_resetthread(co);
    __atomic_store_n(&R->nested, run.outer, __ATOMIC_SEQ_CST);
    lua_settop(co, 0);
    return RESUME_CUT;
  }
  __atomic_store_n(&R->nested, run.outer, __ATOMIC_SEQ_CST);
  if (status == LUA_OK || status == LUA_YIELD) {
    if (!lua_checkstack(L, nres + 1)) {
      lua_pop(co, nres);
      lua_pushliteral(L, "too many results to resume");
      return -1;
    }
    lua_xmove(co, L, nres);
    return nres;
  }
  lua_xmove(co, L, 1);
  return -1;
}

/* A coroutine L resumed was cut: L yields in turn, up to the task's thread
 * (task_resume ends it as canceled); where it cannot yield (inside a C
 * call), the stop's error is raised and the watch cuts it later. */
static int cut_resumer(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  if (lua_isyieldable(L)) {
    if (is_guard(lua_gethook(L))) lua_sethook(L, NULL, 0, 0); /* its <close> handlers run uncut, as the task's */
    return lua_yield(L, 0);
  }
  R->current->stop_cut = 0;
  return stop_watch_error(L, R, R->current, monotonic_seconds());
}

/* A task's own coroutine is the loop's to resume: it waits on a timer, a
 * transfer or a store reply whose continuation the host runs when it comes.
 * A script's resume (or close) ran that continuation early, which freed the
 * wait; the reply then landed in freed memory (SIGSEGV). */
static const char *TASK_COROUTINE = "a task's coroutine is resumed by its loop only (join the task, or cancel it)";

static int guarded_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "thread");
  if (task_of(co)) {
    lua_pushboolean(L, 0);
    lua_pushfstring(L, "coroutine.resume: %s", TASK_COROUTINE);
    return 2;
  }
  int r = resume_nested(L, co, lua_gettop(L) - 1);
  if (r == RESUME_CUT) return cut_resumer(L);
  if (r < 0) {
    int stat = lua_status(co);
    resil_t *R = resil_from_lua(L);
    if (stat != LUA_OK && stat != LUA_YIELD && guard_raised(R)) {
      close_failed(R, co);
      lua_pop(L, 1);
      lua_xmove(co, L, 1);
      lua_settop(co, 0); /* dead, as coroutine.close leaves it */
    }
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  lua_pushboolean(L, 1);
  lua_insert(L, -(r + 1));
  return r + 1;
}

static int guarded_auxwrap(lua_State *L) {
  lua_State *co = lua_tothread(L, lua_upvalueindex(1));
  int r = resume_nested(L, co, lua_gettop(L));
  if (r == RESUME_CUT) return cut_resumer(L);
  if (r < 0) {
    int stat = lua_status(co);
    if (stat != LUA_OK && stat != LUA_YIELD) { /* an error in the coroutine */
      stat = close_failed(resil_from_lua(L), co);
      lua_xmove(co, L, 1);
    }
    if (stat != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
      luaL_where(L, 1);
      lua_insert(L, -2);
      lua_concat(L, 2);
    }
    return lua_error(L);
  }
  return r;
}

static int guarded_wrap(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_State *co = lua_newthread(L);
  lua_pushvalue(L, 1);
  lua_xmove(L, co, 1);
  lua_pushcclosure(L, guarded_auxwrap, 1);
  return 1;
}

/* coroutine.close, but not of a task's coroutine (above); upvalue 1: the
 * library's own */
static int guarded_close(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "thread");
  if (task_of(co)) return luaL_error(L, "coroutine.close: %s", TASK_COROUTINE);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

void loop_guard_coroutines(lua_State *L) {
  lua_getglobal(L, "coroutine");
  lua_pushcfunction(L, guarded_resume);
  lua_setfield(L, -2, "resume");
  lua_getfield(L, -1, "close");
  lua_pushcclosure(L, guarded_close, 1);
  lua_setfield(L, -2, "close");
  lua_pushcfunction(L, guarded_wrap);
  lua_setfield(L, -2, "wrap");
  lua_pop(L, 1);
}

static task *check_task(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, TASK_MT);
}

/* Where the task's function is defined: the source now, "file:line" only
 * when a message needs it (formatting on every spawn is measurable). */
static void describe_function(lua_State *L, int idx, task *t) {
  lua_Debug ar;
  lua_pushvalue(L, idx);
  if (!lua_getinfo(L, ">S", &ar)) ar.what = "?";
  /* (copied, not printed: a snprintf per task spawned, two a gateway request) */
  const char *src = ar.what[0] == 'C' ? "[C]" : ar.short_src;
  size_t n = strnlen(src, sizeof t->where - 1);
  memcpy(t->where, src, n);
  t->where[n] = '\0';
  t->where_line = ar.linedefined > 0 ? ar.linedefined : 0;
}

static const char *task_where(task *t) {
  if (t->where_line > 0) {
    size_t n = strlen(t->where);
    snprintf(t->where + n, sizeof t->where - n, ":%d", t->where_line);
    t->where_line = 0;
  }
  return t->where;
}

/* L stack: fn, args... (nargs of them) -> task userdata */
static task *task_create(lua_State *L, resil_t *R, int nargs, task *parent) {
  int fn_index = lua_gettop(L) - nargs;
  task *t = lua_newuserdatauv(L, sizeof *t, 0);
  memset(t, 0, sizeof *t);
  t->R = R;
  t->ref_self = t->ref_co = t->ref_ctx = LUA_NOREF;
  timer_init(R, &t->timer, NULL, t);
  luaL_setmetatable(L, TASK_MT);
  t->id = ++R->next_task_id;
  describe_function(L, fn_index, t);
  /* a C function running a Lua one (a server's handler task, resil.spawn(pcall, f)) is named by
   * that one: a message saying "task 7 ([C])" told the operator nothing */
  if (t->where[0] == '[')
    for (int i = fn_index + 1; i <= fn_index + nargs; i++)
      if (lua_type(L, i) == LUA_TFUNCTION && !lua_iscfunction(L, i)) {
        describe_function(L, i, t);
        break;
      }

  t->co = lua_newthread(L);
  t->ref_co = luaL_ref(L, LUA_REGISTRYINDEX);
  *(task **)lua_getextraspace(t->co) = t;

  /* log context: a copy of the parent's, so children may extend it; none
   * at all (made on first use) when the parent has none */
  if (parent && parent->ref_ctx != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, parent->ref_ctx);
    lua_pushnil(L);
    if (lua_next(L, -2)) {
      lua_pop(L, 2);
      lua_newtable(L);
      lua_insert(L, -2);
      lua_pushnil(L);
      while (lua_next(L, -2)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -5);
      }
      lua_pop(L, 1);
      t->ref_ctx = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
      lua_pop(L, 1);
    }
  }

  /* L stack: fn, args..., task */
  lua_insert(L, fn_index);
  lua_xmove(L, t->co, nargs + 1);
  t->nargs = nargs;
  lua_pushvalue(L, fn_index);
  t->ref_self = luaL_ref(L, LUA_REGISTRYINDEX);
  R->tasks_alive++;
  ready_push(R, t);
  return t;
}

task *task_spawn_main(resil_t *R, int nargs) {
  task *t = task_create(R->L, R, nargs, NULL);
  /* pinned until the next main task: resil_run, resil_step and resil_call
   * read it after it ended */
  if (R->main_ref > 0) luaL_unref(R->L, LUA_REGISTRYINDEX, R->main_ref);
  R->main_ref = luaL_ref(R->L, LUA_REGISTRYINDEX);
  R->main_task = t;
  return t;
}

task *task_spawn(lua_State *L, int nargs) {
  return task_create(L, resil_from_lua(L), nargs, task_of(L));
}

static int l_spawn(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  task_create(L, R, lua_gettop(L) - 1, task_of(L));
  return 1;
}

/* resil.background(fn, ...): a task that does not keep the loop running
 * (heartbeats, housekeeping): the host ends when only these are left. */
static int l_background(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  task *t = task_create(L, R, lua_gettop(L) - 1, task_of(L));
  t->background = 1;
  R->tasks_alive--;
  return 1;
}

void task_describe(task *t, lua_State *L, int idx) { describe_function(L, idx, t); }

int task_hold_add(task *t, task_hold *h) {
  if (t->state == TASK_DONE) return -1;
  h->owner = t;
  h->prev = NULL;
  h->next = t->holds;
  if (t->holds) t->holds->prev = h;
  t->holds = h;
  return 0;
}

void task_hold_remove(task_hold *h) {
  if (h->prev) h->prev->next = h->next;
  else h->owner->holds = h->next;
  if (h->next) h->next->prev = h->prev;
  h->prev = h->next = NULL;
  h->owner = NULL;
}

task_hold *task_holds(const task *t) { return t->holds; }
task *task_check(lua_State *L, int idx) { return check_task(L, idx); }
int task_ended(const task *t) { return t->state == TASK_DONE; }
int task_started(const task *t) { return t->started || t->state == TASK_DONE; }

void task_on_done(task *t, task_done_fn fn, void *arg) {
  t->on_done = fn;
  t->on_done_arg = arg;
}

const char *task_traceback(const task *t) { return t->failed ? t->traceback : NULL; }

int task_push_results(lua_State *L, task *t) { return push_results(L, t); }

/* L stack on return: true, results... | false, err */
static int push_results(lua_State *L, task *t) {
  lua_State *co = t->co;
  int n = t->nres, top = lua_gettop(co);
  t->joined = 1;
  luaL_checkstack(L, n + 1, "too many results to join");
  lua_pushboolean(L, !t->failed);
  for (int i = top - n + 1; i <= top; i++) {
    lua_pushvalue(co, i);
    lua_xmove(co, L, 1);
  }
  return n + 1;
}

static void join_timeout_cb(void *arg) {
  task *me = arg;
  if (me->joining) joiners_remove(me->joining, me);
  me->joining = NULL;
  me->timed_out = 1;
  task_wake(me);
}

static void join_cancel(void *arg) {
  task *me = arg;
  if (me->joining) joiners_remove(me->joining, me);
  me->joining = NULL;
  timer_stop(&me->timer);
}

static int join_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  task *t = check_task(L, 1), *me = task_of(L);
  if (me->timed_out) {
    me->timed_out = 0;
    return resil_error_result(L, "timeout", "task %d did not finish in time", t->id);
  }
  return push_results(L, t);
}

/* t:join([timeout]) -> true, results... | false, err | nil, err{kind="timeout"} */
static int task_join(lua_State *L) {
  task *t = check_task(L, 1);
  /* (none: no limit; a NaN, as from a deadline that was NaN, had none either, and a negative one,
   * a deadline already passed, waited for good: the second is up at once, NaN refused) */
  double timeout = luaL_optnumber(L, 2, -1);
  if (timeout != timeout) return luaL_argerror(L, 2, "NaN");
  if (timeout < 0 && !lua_isnoneornil(L, 2)) timeout = 0;
  lua_settop(L, 1);
  if (t->state == TASK_DONE) return push_results(L, t);
  task *me = task_current(L, "task:join");
  if (me == t) return luaL_error(L, "a task cannot join itself");
  if (t->njoiners == t->cap_joiners) {
    int cap = t->cap_joiners ? t->cap_joiners * 2 : 4;
    task **grown = realloc(t->joiners, (size_t)cap * sizeof *grown);
    if (!grown) return luaL_error(L, "not enough memory");
    t->joiners = grown;
    t->cap_joiners = cap;
  }
  t->joiners[t->njoiners++] = me;
  me->joining = t;
  me->timed_out = 0;
  if (timeout >= 0) {
    me->timer.fn = join_timeout_cb;
    timer_start(&me->timer, timeout);
  }
  static const task_wait_ops join_wait = {join_cancel, NULL, NULL};
  task_wait(me, &join_wait, me);
  return lua_yieldk(L, 0, 0, join_k);
}

static int task_stop_as(task *t, int force);

/* t:cancel([force]) -> true if it was still running. Its pending wait (a
 * transfer, a timer) is aborted at once and its to-be-closed variables are
 * closed; under resil.shield that waits for the shield's end, unless force. */
static int task_cancel(lua_State *L) {
  task *t = check_task(L, 1);
  if (t->state == TASK_RUNNING && !t->canceling)
    return luaL_error(L, "a task cannot cancel itself; return or error() instead");
  lua_pushboolean(L, task_stop_as(t, lua_toboolean(L, 2)) == 1);
  return 1;
}

/* t:cancel_pending() -> true while a cancel waits to be done: for its
 * resil.shield, or for what a settling wait had in hand (a stream's status),
 * done at its next wait (a task that runs on to its end without one would
 * otherwise not know that nobody takes what it returns) */
static int task_cancel_pending(lua_State *L) {
  task *t = check_task(L, 1);
  lua_pushboolean(L, t->cancel_due);
  return 1;
}

/* resil.shield(fn, ...) -> fn's results: fn runs to its end in this task,
 * a cancel meanwhile (t:cancel(), a server's client that left) held off
 * until it returns or raises, then done at the task's next wait (or as it
 * ends). t:cancel(true) goes through. For work that must end whole once
 * begun (a paid call whose answer is to be recorded). */
static int shield_k(lua_State *L, int status, lua_KContext ctx) {
  (void)ctx;
  task *t = task_of(L);
  if (t && t->shield > 0) t->shield--;
  if (status != LUA_OK && status != LUA_YIELD) return lua_error(L);
  return lua_gettop(L);
}

static int l_shield(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  task *t = task_current(L, "resil.shield");
  /* a cancel that came before it (held while a wait settled) is not held off:
   * it is done at the first wait, this shield's too */
  if (t->cancel_due && !t->shield) t->shield_off = 1;
  t->shield++;
  return shield_k(L, lua_pcallk(L, lua_gettop(L) - 1, LUA_MULTRET, 0, 0, shield_k), 0);
}

/* 1: canceled (or due, past its shield); 0: it had ended (or is being
 * canceled); -1: it is running. force: through resil.shield too. */
static int task_stop_as(task *t, int force) {
  if (t->state == TASK_DONE || t->canceling) return 0;
  if (force && t->shield && !t->shield_off) {
    t->shield_off = 1;
    t->cancel_due = 0; /* (a cancel the shield held off: now this one) */
  }
  if (t->cancel_due) return 0;
  if (t->shield && !t->shield_off) {
    t->cancel_due = 1; /* task_resume stops it at its first wait past the shield, or it ends so */
    return 1;
  }
  if (t->state == TASK_RUNNING) return -1;
  /* (woken too: what it waited for is in hand, its continuation not run yet) */
  if ((t->state == TASK_WAITING || t->state == TASK_READY) && t->wait_ops && t->wait_ops->settling &&
      t->wait_ops->settling(t->wait_arg)) {
    t->cancel_due = 1; /* task_resume stops it when it waits next, its result in hand */
    return 1;
  }
  task_end_wait(t);
  if (t->state == TASK_READY) ready_remove(t->R, t);
  task_end_canceled(t);
  return 1;
}

int task_stop(task *t) { return task_stop_as(t, 0); }

static int task_status(lua_State *L) {
  task *t = check_task(L, 1);
  static const char *const names[] = {"ready", "running", "waiting", "done"};
  if (t->state == TASK_DONE && t->canceled) lua_pushliteral(L, "canceled");
  else if (t->state == TASK_DONE && t->failed) lua_pushliteral(L, "failed");
  else lua_pushstring(L, names[t->state]);
  return 1;
}

static int task_getid(lua_State *L) {
  lua_pushinteger(L, check_task(L, 1)->id);
  return 1;
}

static int task_tostring(lua_State *L) {
  task *t = check_task(L, 1);
  lua_pushfstring(L, "task %d (%s)", t->id, task_where(t));
  return 1;
}

/* (t): its failure, where the program sends the host's logs -> true | false: they go to stderr */
static int report_unjoined(lua_State *L) {
  task *t = lua_touserdata(L, 1);
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, t->id);
  lua_setfield(L, -2, "failed_task"); /* (not "task": the line's is the running one's) */
  lua_pushstring(L, task_where(t));
  lua_setfield(L, -2, "where");
  lua_pushstring(L, t->traceback);
  lua_setfield(L, -2, "error");
  char msg[160];
  snprintf(msg, sizeof msg, "task %d (%.100s) failed and was never joined", t->id, task_where(t));
  lua_pushboolean(L, host_log_elsewhere(L, "error", msg));
  return 1;
}

/* Collected: report a failure nobody looked at, free what C holds. */
static int task_gc(lua_State *L) {
  task *t = check_task(L, 1);
  if (t->failed && !t->joined && !t->canceled && t != t->R->main_task && t->traceback) {
    lua_pushcfunction(L, report_unjoined);
    lua_pushlightuserdata(L, t);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK || !lua_toboolean(L, -1))
      redact_fprintf(t->R, stderr, "resil-lua: task %d (%s) failed and was never joined: %s\n", t->id, task_where(t),
                     t->traceback);
    lua_pop(L, 1);
  }
  if (t->R->main_task == t) t->R->main_task = NULL; /* collected once it ended: resil_call and resil_step look later */
  while (t->holds) { /* never ended: the host is closing */
    task_hold *h = t->holds;
    task_hold_remove(h);
    h->drop(h, 0);
  }
  timer_free(&t->timer);
  free(t->joiners);
  t->joiners = NULL;
  free(t->traceback);
  t->traceback = NULL;
  free(t->stop_message);
  t->stop_message = NULL;
  if (t->ref_co != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, t->ref_co);
  if (t->ref_ctx != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, t->ref_ctx);
  t->ref_co = t->ref_ctx = LUA_NOREF;
  return 0;
}

static void sleep_fired(void *arg) { task_wake(arg); }
static void sleep_cancel(void *arg) { timer_stop(&((task *)arg)->timer); }

static int sleep_k(lua_State *L, int status, lua_KContext ctx) {
  (void)L, (void)status, (void)ctx;
  return 0;
}

/* resil.sleep(seconds): 0 or less just lets other tasks run. */
static int l_sleep(lua_State *L) {
  double seconds = luaL_checknumber(L, 1);
  task *t = task_current(L, "resil.sleep");
  if (seconds != seconds) return luaL_argerror(L, 1, "NaN");
  if (seconds <= 0) return lua_yield(L, 0);
  t->timer.fn = sleep_fired;
  timer_start(&t->timer, seconds);
  static const task_wait_ops sleep_wait = {sleep_cancel, NULL, NULL};
  task_wait(t, &sleep_wait, t);
  return lua_yieldk(L, 0, 0, sleep_k);
}

static int l_yield(lua_State *L) {
  task_current(L, "resil.yield");
  return lua_yield(L, 0);
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, resil_now(resil_from_lua(L)));
  return 1;
}

static int l_running(lua_State *L) {
  task *t = task_of(L);
  if (!t || t->ref_self == LUA_NOREF) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref_self);
  return 1;
}

/* resil.context([fields]): the current task's log context table */
static int l_context(lua_State *L) {
  task *t = task_of(L);
  if (!t) {
    lua_newtable(L);
    return 1;
  }
  if (t->ref_ctx == LUA_NOREF) {
    lua_newtable(L);
    t->ref_ctx = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref_ctx);
  if (lua_istable(L, 1)) {
    lua_pushnil(L);
    while (lua_next(L, 1)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  return 1;
}

static int l_clock_virtual(lua_State *L) {
  clock_set_virtual(resil_from_lua(L), 1);
  return 0;
}

static int l_clock_real(lua_State *L) {
  clock_set_virtual(resil_from_lua(L), 0);
  return 0;
}

static int l_clock_is_virtual(lua_State *L) {
  lua_pushboolean(L, resil_from_lua(L)->virtual_clock);
  return 1;
}

static int l_clock_wall(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
  return 1;
}

/* ---------- the loop ---------- */

static void grace_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  ((resil_t *)arg)->grace_expired = 1;
}

static void wake_cb(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  char buf[64];
  while (read(fd, buf, sizeof buf) > 0) {
  }
  stop_notice(arg); /* a graceful stop asked for (resil_request_stop) */
}

static void pump_cb(evutil_socket_t fd, short what, void *arg);

int loop_on_turn_end(resil_t *R, void (*fn)(void *arg), void *arg) {
  if (R->nturn_end >= (int)(sizeof R->turn_end / sizeof R->turn_end[0])) return -1; /* a fixed few, by design */
  R->turn_end[R->nturn_end].fn = fn;
  R->turn_end[R->nturn_end].arg = arg;
  R->nturn_end++;
  return 0;
}

void loop_init(resil_t *R) {
  R->grace_ev = evtimer_new(R->base, grace_cb, R);
  if (R->wake_pipe[0] >= 0) R->wake_ev = event_new(R->base, R->wake_pipe[0], EV_READ | EV_PERSIST, wake_cb, R);
  if (R->wake_ev) event_add(R->wake_ev, NULL);
  R->pump_ev = event_new(R->base, -1, 0, pump_cb, R);
}

void loop_free(resil_t *R) {
  if (R->grace_ev) event_free(R->grace_ev);
  if (R->wake_ev) event_free(R->wake_ev);
  if (R->pump_ev) event_free(R->pump_ev);
  R->grace_ev = R->wake_ev = R->pump_ev = NULL;
  free(R->vheap);
  R->vheap = NULL;
  R->vheap_len = R->vheap_cap = 0;
}

/* Times this thread was preempted (involuntary context switches); -1 unknown. */
static long preemptions(void) {
  struct rusage ru;
  return getrusage(RUSAGE_THREAD, &ru) == 0 ? ru.ru_nivcsw : -1;
}

/* A look at I/O, not waiting. On a program's base, one pass: EVLOOP_NONBLOCK alone runs pass after
 * pass while each finds an event due, and a program's own periodic event whose work outlasts its
 * period held resil_step (one turn) for good, the watchdog seeing one endless turn. On the host's
 * own base every event is the host's and short: passes go on while events are due (one pass a
 * look cost the gateway about 1.5 % of its throughput). */
#define LOOK_AT_IO (R->owns_base ? EVLOOP_NONBLOCK : EVLOOP_NONBLOCK | EVLOOP_ONCE)

/* A pass of the event base. From a callback of the base's own dispatch (the program's
 * event_base_dispatch running an event of its own), libevent refuses it: the host's loop, waiting
 * on it, spun forever; it stops instead (loop_status: RESIL_ERR_USAGE). */
static void base_loop(resil_t *R, int flags) {
  /* a new turn for the watchdog: what runs until the next one outside any resume (libevent's
   * callbacks, the collection steps their allocations make, the turn's end) is timed from here */
  turn_begins(R);
  if (event_base_loop(R->base, flags) == -1) R->base_refused = 1;
}

/* Wait for I/O; on the virtual clock, jump to the next timer once idle. */
static void loop_wait(resil_t *R) {
  if (!R->virtual_clock || R->vheap_len == 0 || R->disk_pending > 0) {
    base_loop(R, EVLOOP_ONCE);
    return;
  }
  if (R->io_pending == 0) {
    base_loop(R, LOOK_AT_IO);
  } else {
    long grace_usec = R->store_io_pending > 0 ? VIRTUAL_STORE_GRACE_USEC : VIRTUAL_GRACE_USEC;
    struct timeval grace = {0, grace_usec};
    double waited_from = monotonic_seconds();
    long preempted = preemptions();
    R->grace_expired = 0;
    evtimer_add(R->grace_ev, &grace);
    base_loop(R, EVLOOP_ONCE);
    evtimer_del(R->grace_ev);
    if (!R->grace_expired) {
      R->graces_inconclusive = 0;
      return;
    }
    /* A grace that ended late, or with the thread preempted meanwhile, says
     * nothing about the I/O: the process stood stopped or unscheduled, and
     * the I/O events that became due are run in the same turn as the grace
     * (often without waking a task: a server's write). It is waited out
     * again, a few times. */
    if ((monotonic_seconds() - waited_from > 1e-6 * grace_usec + GRACE_LATE_SECONDS || preemptions() != preempted) &&
        ++R->graces_inconclusive < GRACES_INCONCLUSIVE_MAX)
      return;
    R->graces_inconclusive = 0;
  }
  /* (a store's flush in that turn may have left its tasks waiting for the disk) */
  if (!R->ready_head && R->vheap_len > 0 && !R->interrupted && R->disk_pending == 0 && !R->base_refused)
    virtual_advance(R);
}

/* One turn: the ready tasks (then the turn-end work and a look at I/O),
 * or a wait for I/O (on the virtual clock, time jumps once idle). */
static void loop_turn(resil_t *R) {
  if (R->ready_head) {
    loop_run_ready(R);
    for (int i = 0; i < R->nturn_end; i++) R->turn_end[i].fn(R->turn_end[i].arg);
    if (R->ready_head && !R->interrupted) base_loop(R, LOOK_AT_IO);
  } else {
    loop_wait(R);
  }
}

/* The outcome once the loop stops: an interrupt, else the main task's
 * failure. main: 0 not looked at (resil_call), 1 reported each time
 * (resil_run stops on it), 2 reported once (resil_step). */
static int loop_status(resil_t *R, int main) {
  if (R->base_refused) {
    R->base_refused = 0;
    resil_set_error(R, "called from a callback of the host's event base while the program's event_base_dispatch "
                       "runs it (libevent refuses a loop there): use resil_call_async there");
    return RESIL_ERR_USAGE;
  }
  if (R->interrupted) {
    char msg[256];
    snprintf(msg, sizeof msg, "%sinterrupted by signal %d", R->interrupted_at, (int)R->interrupted);
    resil_set_error(R, msg);
    R->interrupted = 0; /* reported once; a later run starts afresh */
    R->interrupted_at[0] = '\0';
    return RESIL_ERR_INTERRUPT;
  }
  task *m = R->main_task;
  if (main && m && m->failed && (main == 1 || !m->joined)) {
    resil_set_error(R, m->traceback ? m->traceback : "main task failed");
    m->joined = 1;
    return RESIL_ERR_SCRIPT;
  }
  return RESIL_OK;
}

/* Entering the host's own loop: the pump is not needed (a pending one would
 * end the first wait at once); leaving it with tasks ready: it is again. */
/* The watchdog times the turns (the time between resumes too) only while
 * this thread runs the host's loop: the CPU clock it reads is this thread's,
 * and an embedder's time between resil_step calls is its own. */
static void turns_watched(resil_t *R) {
  watchdog_loop_thread(R);
  R->turns_reblock = watchdog_signal_unblock();
  R->turns_outer_host = watchdog_host;
  watchdog_host = R; /* the signal's handler finds the host here (a host call's stop: loop_arm_host) */
  atomic_store_explicit(&R->turns_watched, 1, memory_order_release);
}

static void turns_unwatched(resil_t *R) {
  atomic_store_explicit(&R->turns_watched, 0, memory_order_release);
  watchdog_host = R->turns_outer_host;
  watchdog_signal_reblock(R->turns_reblock);
}

/* resil_close: the finalizers lua_close runs (hooks off) are timed as a
 * turn of their own, so that one that loops is stopped (loop_arm_close)
 * instead of holding the program for good (the command's stuck exit ended
 * it). The signal's handler finds the host until its last finalizer ran
 * (R->finalizers_over): it arms nothing while Lua's objects are freed. */
void loop_close_watched(resil_t *R, int on) {
  if (!on) {
    atomic_store_explicit(&R->turns_watched, 0, memory_order_release);
    atomic_store_explicit(&R->host_section, NULL, memory_order_relaxed);
    watchdog_host = R->close_outer_host;
    watchdog_signal_reblock(R->close_reblock);
    return;
  }
  watchdog_loop_thread(R);
  R->close_reblock = watchdog_signal_unblock();
  R->close_outer_host = watchdog_host;
  watchdog_host = R;
  atomic_store(&R->host_section, "the host's close (a __gc finalizer run as the Lua state closes)");
  unsigned long seq = atomic_load(&R->resume_seq);
  atomic_store(&R->resume_seq, (seq | 1) + 1); /* a turn of its own, even */
  atomic_store_explicit(&R->turns_watched, 1, memory_order_release);
}

static void loop_enter(resil_t *R) {
  if (R->in_loop++ == 0) {
    R->caller_locale = host_locale_enter(R);
    turns_watched(R);
  }
  if (R->pump_ev) event_del(R->pump_ev);
}

static void loop_leave(resil_t *R) {
  if (--R->in_loop == 0) {
    turns_unwatched(R);
    host_locale_leave(R->caller_locale);
  }
  if (!R->in_loop && R->ready_head && R->pump_ev) event_active(R->pump_ev, EV_TIMEOUT, 0);
}

/* The tasks ended: what was dropped unclosed and not collected yet (a stream whose reader was
 * canceled in its loop's body: its cost is recorded by a task its finalizer spawns) is collected
 * now, while the loop can still run those tasks; at lua_close their tasks never ran, and a
 * script that ended soon after such a cancel paid for the stream and had no ledger row for it.
 * -> 1 when the finalizers left tasks to run (at most twice: a finalizer may spawn forever) */
static int loop_collect_at_end(resil_t *R, int *collections) {
  if (R->tasks_alive > 0 || R->interrupted || R->base_refused || (R->main_task && R->main_task->failed) ||
      (*collections)++ >= 2)
    return 0;
  int watched = loop_host_section_begin(R, "the host's full garbage collection at the end (a __gc finalizer)");
  lua_gc(R->L, LUA_GCCOLLECT);
  loop_host_section_end(R, watched);
  return R->tasks_alive > 0;
}

int loop_run(resil_t *R) {
  loop_enter(R);
  int collections = 0;
  do {
    while (R->tasks_alive > 0 && !R->interrupted && !R->base_refused) {
      if (R->main_task && R->main_task->failed) break;
      loop_turn(R);
    }
  } while (loop_collect_at_end(R, &collections));
  loop_leave(R);
  return loop_status(R, 1);
}

int loop_run_until(resil_t *R, const int *done) {
  loop_enter(R);
  while (!*done && R->tasks_alive > 0 && !R->interrupted && !R->base_refused) loop_turn(R);
  loop_leave(R);
  return loop_status(R, 0);
}

static void step_timeout_cb(evutil_socket_t fd, short what, void *arg) { (void)fd, (void)what, (void)arg; }

/* A program that drives the host with resil_call alone (quick calls, no resil_step, no base of
 * its own) never had a turn look at I/O: a policy edit resil_watch saw, a SIGHUP for
 * resil_reload_on_sighup and a server's connections waited for good, and every call ran the old
 * policy. Each call looks first (one epoll_wait that does not wait). On a program's own base its
 * dispatch does that. */
void loop_look(resil_t *R) {
  /* (nor once the program has the host's base: from a callback of its own dispatch of it, libevent
   * refuses the loop, and the call would be refused) */
  if (!R->owns_base || R->base_handed_out || R->interrupted) return;
  loop_enter(R);
  base_loop(R, LOOK_AT_IO);
  loop_leave(R);
}

int loop_step(resil_t *R, int timeout_ms) {
  loop_enter(R);
  if (R->interrupted) {
    /* one that came between calls: reported below, nothing run (a ready task that looped ran on) */
  } else if (R->ready_head) {
    loop_turn(R);
  } else if (R->tasks_alive > 0 || timeout_ms >= 0) { /* servers and signals need turns too */
    if (timeout_ms == 0) {
      base_loop(R, LOOK_AT_IO);
      if (R->virtual_clock && !R->ready_head && R->io_pending == 0 && R->disk_pending == 0 && R->vheap_len > 0)
        virtual_advance(R);
    } else {
      struct event *tm = NULL;
      if (timeout_ms > 0 && (tm = evtimer_new(R->base, step_timeout_cb, R))) {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(tm, &tv);
      }
      loop_wait(R);
      if (tm) event_free(tm);
    }
  }
  loop_leave(R);
  int status = loop_status(R, 2);
  if (status != RESIL_OK) return -status;
  return R->tasks_alive > 0;
}

/* The embedder runs the event base itself (resil_call_async): libevent
 * calls this whenever a task became ready outside the host's own loops. */
static void pump_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  resil_t *R = arg;
  if (R->in_loop || R->in_api) return; /* resil_run or resil_step is running them */
  if (R->close_pending) { /* resil_close from a callback that had the host in use */
    R->close_pending = 0;
    resil_close(R);
    return;
  }
  R->in_loop++;
  turns_watched(R);
  turn_begins(R);
  locale_t caller = host_locale_enter(R);
  if (R->ready_head) {
    loop_run_ready(R);
    for (int i = 0; i < R->nturn_end; i++) R->turn_end[i].fn(R->turn_end[i].arg);
  }
  if (!R->ready_head && R->virtual_clock && R->io_pending == 0 && R->disk_pending == 0 && R->vheap_len > 0 &&
      R->tasks_alive > 0)
    virtual_advance(R);
  host_locale_leave(caller);
  turns_unwatched(R);
  R->in_loop--;
  if (R->ready_head || R->close_pending) event_active(R->pump_ev, EV_TIMEOUT, 0); /* after this turn's I/O */
}

static const luaL_Reg task_methods[] = {
  {"join", task_join}, {"cancel", task_cancel}, {"status", task_status}, {"id", task_getid},
  {"cancel_pending", task_cancel_pending}, {NULL, NULL}};

static const luaL_Reg task_meta[] = {{"__tostring", task_tostring}, {"__gc", task_gc}, {NULL, NULL}};

static const luaL_Reg loop_functions[] = {{"spawn", l_spawn},     {"background", l_background}, {"sleep", l_sleep},     {"yield", l_yield},
                                          {"now", l_now},         {"shield", l_shield},         {"running", l_running}, {"context", l_context},
                                          {NULL, NULL}};

static const luaL_Reg clock_functions[] = {{"virtual", l_clock_virtual}, {"real", l_clock_real},
                                           {"is_virtual", l_clock_is_virtual}, {"wall", l_clock_wall},
                                           {"now", l_now}, {NULL, NULL}};

int luaopen_resil_loop(lua_State *L) {
  luaL_newmetatable(L, TASK_MT);
  luaL_setfuncs(L, task_meta, 0);
  luaL_newlib(L, task_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newlib(L, loop_functions);
  luaL_newlib(L, clock_functions);
  lua_setfield(L, -2, "clock");
  return 1;
}
