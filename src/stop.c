/*
 * stop.c: a graceful stop, asked for from outside the loop (SIGTERM to a
 * gateway) and waited for by a task, which then finishes what is in flight
 * before the host ends. Unlike resil_interrupt, which stops the running Lua
 * at once, a stop request only wakes its waiter: nothing is cut.
 */
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "host.h"

/* Async-signal-safe: the flag, then a byte down the wake pipe so that a loop
 * asleep in epoll notices (loop.c's wake callback calls stop_notice).
 * -> 1 if a task has waited for a stop (it will act on it), 0 if none has. */
int resil_request_stop(resil_t *R, int signo) {
  if (!R) return 0; /* no host: nothing will act on it */
  R->stop_requested = signo ? signo : SIGTERM;
  /* a task that loops now would keep the stop from running (armed on the loop's thread) */
  if (R->stop_grace > 0 && !watchdog_forward(R, FORWARD_STOP)) loop_watch_running(R);
  if (R->wake_pipe[1] >= 0) {
    ssize_t ignored = write(R->wake_pipe[1], "s", 1);
    (void)ignored;
  }
  return R->stop_awaited;
}

/* From the loop: a stop asked for wakes the task waiting for one. */
void stop_notice(resil_t *R) {
  if (!R->stop_requested || !R->stop_waiter) return;
  task *t = R->stop_waiter;
  R->stop_waiter = NULL;
  task_wake(t);
}

static void stop_wait_cancel(void *arg) {
  resil_t *R = arg;
  R->stop_waiter = NULL;
}

static int stop_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  lua_pushinteger(L, resil_from_lua(L)->stop_requested);
  return 1;
}

/* resil.stop_requested([wait [, grace]]) -> the signal a stop was asked for
 * with, or nil; wait = true: the task waits for one (one waiter at a time);
 * grace: once it is asked, a task that runs that many seconds without
 * yielding is stopped (loop.c, stop_watch_hook). */
static int l_stop_requested(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  if (!lua_isnoneornil(L, 2)) {
    double grace = luaL_checknumber(L, 2);
    luaL_argcheck(L, grace > 0 && grace < 1e9, 2, "grace must be a number of seconds > 0");
    R->stop_grace = grace;
  }
  if (R->stop_requested) {
    lua_pushinteger(L, R->stop_requested);
    return 1;
  }
  if (!lua_toboolean(L, 1)) {
    lua_pushnil(L);
    return 1;
  }
  task *me = task_current(L, "resil.stop_requested(true)");
  if (R->stop_waiter) return luaL_error(L, "resil.stop_requested: another task waits for the stop already");
  R->stop_awaited = 1;
  static const task_wait_ops stop_wait = {stop_wait_cancel, NULL, NULL};
  R->stop_waiter = me;
  task_wait(me, &stop_wait, R);
  return lua_yieldk(L, 0, 0, stop_k);
}

/* resil.stop_now([signo [, close_within]]) -> true if it stopped anything:
 * the end of a graceful stop's grace. Tasks other than the caller's still
 * running (a call a client left, finishing for its Idempotency-Key) are
 * interrupted as by a second signal, so that the host ends now; the stores
 * still write what they hold queued as they close, waiting at most
 * close_within seconds from now (else each its own timeout: a frozen Redis
 * kept a stopping gateway that long past its drain_timeout). */
static int l_stop_now(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  int signo = (int)luaL_optinteger(L, 1, R->stop_requested ? R->stop_requested : SIGTERM);
  if (!lua_isnoneornil(L, 2)) {
    double within = luaL_checknumber(L, 2);
    luaL_argcheck(L, within >= 0 && within < 1e9, 2, "close_within must be a number of seconds >= 0");
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    R->close_by = (double)now.tv_sec + (double)now.tv_nsec / 1e9 + within;
  }
  int others = R->tasks_alive - (task_running(L) ? 1 : 0);
  if (others > 0) resil_interrupt(R, signo);
  lua_pushboolean(L, others > 0);
  return 1;
}

int luaopen_resil_stop(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_stop_requested);
  lua_setfield(L, -2, "stop_requested");
  lua_pushcfunction(L, l_stop_now);
  lua_setfield(L, -2, "stop_now");
  return 1;
}
