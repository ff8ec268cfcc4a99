/*
 * host.h: what the primitives of one host share. Private to libresil.
 */
#ifndef RESIL_HOST_H
#define RESIL_HOST_H

#include <signal.h>
#include <stdint.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "resil.h"

typedef struct task task;
typedef struct resil_timer resil_timer;
typedef struct http_state http_state;
typedef struct reload_state reload_state;

typedef void (*resil_timer_fn)(void *arg);

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

  /* tasks */
  task *ready_head, *ready_tail;
  struct event *ready_ev;
  task *current;
  task *main_task;
  int tasks_alive;
  int next_task_id;
  int io_pending; /* real I/O that tasks wait on (HTTP transfers) */

  /* clock */
  int virtual_clock;
  double virtual_now;
  resil_timer **vheap;
  size_t vheap_len, vheap_cap;
  uint64_t timer_seq;
  struct event *grace_ev;
  int grace_expired;

  /* limits and interrupts */
  size_t mem_used, mem_limit;
  long max_instructions;
  volatile sig_atomic_t interrupted;
  lua_State *host_L;     /* the thread in host_pcall, if any */
  const char *host_what; /* what it runs, for messages */
  char host_stop[256];   /* why its cap stopped it, raised again until it returns */
  int wake_pipe[2];
  struct event *wake_ev;

  http_state *http;
  reload_state *reload;
  char *policies_dir;
  char *share_dir;
  int status;
  char *error;
};

/* resil.c */
resil_t *resil_from_lua(lua_State *L);
void resil_set_error(resil_t *R, const char *msg);
int resil_traceback(lua_State *L); /* message handler for lua_pcall */
int resil_raise(lua_State *L, const char *fmt, ...); /* misuse, at the user's line */
/* Run Lua from C outside a task (a server handler, a policy reload): the
 * function below nargs arguments, protected with a traceback, under
 * --max-instructions, --max-memory and the interrupt hook. `what` names it
 * in errors. Returns lua_pcall's status. */
int host_pcall(lua_State *L, const char *what, int nargs, int nresults);

/* loop.c: tasks */
task *task_current(lua_State *L, const char *what); /* raises outside a task */
task *task_running(lua_State *L);                    /* NULL outside a task */
void task_wait(task *t, void (*cancel)(void *), void *arg);
/* A resource the task's continuation gives back: released by a cancel that
 * comes after the task was woken but before it resumed. */
void task_hold(task *t, void (*release)(void *), void *arg);
void task_wake(task *t);
int task_id(const task *t);
int task_context_ref(const task *t);
task *task_spawn_main(resil_t *R, int nargs); /* function + args on R->L */
void loop_init(resil_t *R);
void loop_free(resil_t *R);
int loop_run(resil_t *R);
void loop_interrupt_running(resil_t *R); /* async-signal-safe */
void loop_arm_hook(resil_t *R, lua_State *L); /* the hook Lua on L needs now: interrupt, count or none */

/* loop.c: clock and timers */
double resil_now(resil_t *R);
void clock_set_virtual(resil_t *R, int on);
void timer_init(resil_t *R, resil_timer *tm, resil_timer_fn fn, void *arg);
void timer_start(resil_timer *tm, double seconds);
void timer_stop(resil_timer *tm);
void timer_free(resil_timer *tm);

/* error values: {kind=, message=, ...} with a __tostring */
void resil_push_error(lua_State *L, const char *kind, const char *fmt, ...);
int resil_error_result(lua_State *L, const char *kind, const char *fmt, ...);

/* http.c */
void http_free(resil_t *R);
void http_flush(resil_t *R);

/* reload.c */
void reload_free(resil_t *R);

/* openers, one per primitive */
int luaopen_resil_loop(lua_State *L);
int luaopen_resil_http(lua_State *L);
int luaopen_resil_json(lua_State *L);
int luaopen_resil_log(lua_State *L);
void host_log(lua_State *L, const char *level, const char *msg); /* pops a fields table */
int luaopen_resil_server(lua_State *L);
int luaopen_resil_bucket(lua_State *L);
int luaopen_resil_breaker(lua_State *L);
int luaopen_resil_semaphore(lua_State *L);
int luaopen_resil_reload(lua_State *L);
int luaopen_resil_sqlite(lua_State *L);
int luaopen_resil_redis(lua_State *L);

/* the Lua half of the host, compiled in from src/lua/ */
extern const char resil_prelude_lua[];
extern const char resil_mock_lua[];
extern const char resil_store_lua[];
extern const char resil_store_sqlite_lua[];
extern const char resil_store_redis_lua[];
extern const char resil_metrics_lua[];

#endif
