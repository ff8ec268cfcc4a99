/*
 * embed_interrupt_test.c: resil_interrupt when no Lua runs, as a program
 * meets it: its own event base waiting for I/O, and between resil_step calls. Prints TAP lines;
 * spec/run counts them. A hang (a task that loops, never stopped) ends the
 * program with a "not ok" line (alarm).
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>
#include <lua.h>

#include "resil.h"

static int test_number;
static int failures;

static void check(int ok, const char *what) {
  test_number++;
  if (!ok) failures++;
  printf("%s %d - %s\n", ok ? "ok" : "not ok", test_number, what);
  fflush(stdout);
}

static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static const char *running = "?";
static void on_hang(int signo) {
  (void)signo;
  char line[400];
  int n = snprintf(line, sizeof line, "not ok %d - %s (hung: the task that loops was never stopped)\n1..%d\n",
                   test_number + 1, running, test_number + 1);
  if (n > 0) {
    ssize_t ignored = write(1, line, (size_t)n);
    (void)ignored;
  }
  _exit(1);
}

static resil_t *open_host(struct event_base *base) {
  resil_options o = {0};
  o.log_level = "off";
  o.base = base;
  resil_t *R = resil_open(&o);
  if (!R || resil_load_string(R,
                              "local resil = require 'resil'\n"
                              "function napspin(s) resil.sleep(s) while true do end end\n"
                              "function id(...) return ... end\n",
                              "=setup") != RESIL_OK || resil_run(R) != RESIL_OK)
    exit(2);
  return R;
}

/* ---- the program's own event base, waiting for I/O as another thread interrupts ---- */
static struct event_base *own;
static resil_t *target;
static int done_status = -1;
static char done_error[300];
static void on_done(void *ud, int status, const char *json) {
  (void)ud, (void)json;
  done_status = status;
  snprintf(done_error, sizeof done_error, "%s", status == RESIL_OK ? "" : resil_error(target));
  event_base_loopbreak(own);
}
static void *interrupt_soon(void *arg) {
  (void)arg;
  usleep(100000); /* the call sleeps 0.5 s: nothing runs now */
  resil_interrupt(target, SIGINT);
  return NULL;
}

int main(void) {
  signal(SIGALRM, on_hang);

  /* an interrupt while the program's event base waits (nothing runs): the call's task, resumed
   * after it, looped on unhooked and held the program's loop for good */
  running = "own event base: an interrupt while nothing runs stops the call's task once it resumes";
  alarm(20);
  own = event_base_new();
  target = open_host(own);
  resil_call_async(target, "napspin", "[0.5]", on_done, NULL);
  pthread_t t;
  if (pthread_create(&t, NULL, interrupt_soon, NULL) != 0) return 2;
  event_base_dispatch(own);
  pthread_join(t, NULL);
  check(done_status == RESIL_ERR_INTERRUPT && contains(done_error, "interrupted by signal 2"), running);
  if (done_status != RESIL_ERR_INTERRUPT) printf("# got %d: %.200s\n", done_status, done_error);
  done_status = -1;
  int queued = resil_call_async(target, "id", "[\"after\"]", on_done, NULL);
  if (queued == RESIL_OK) event_base_dispatch(own);
  check(queued == RESIL_OK && done_status == RESIL_OK, "own event base: the call after it runs");
  resil_close(target);
  event_base_free(own);
  alarm(0);

  /* resil_step after an interrupt between calls: the header's "returns RESIL_ERR_INTERRUPT and
   * runs nothing; the next one runs". It resumed the ready task unhooked (one that loops: for good) */
  running = "resil_step after an interrupt between calls returns -RESIL_ERR_INTERRUPT and runs nothing";
  alarm(20);
  resil_options o = {0};
  o.log_level = "off";
  resil_t *S = resil_open(&o);
  if (!S || resil_load_string(S, "ran = (ran or 0) + 1", "=step") != RESIL_OK) return 2;
  resil_interrupt(S, SIGINT);
  int stepped = resil_step(S, 0);
  lua_State *SL = resil_lua(S);
  lua_getglobal(SL, "ran");
  int ran_first = (int)lua_tointeger(SL, -1);
  lua_pop(SL, 1);
  check(stepped == -RESIL_ERR_INTERRUPT && contains(resil_error(S), "interrupted by signal 2") && ran_first == 0, running);
  if (stepped != -RESIL_ERR_INTERRUPT || ran_first) printf("# got %d (ran: %d): %.200s\n", stepped, ran_first, resil_error(S));
  int next = resil_step(S, 0);
  lua_getglobal(SL, "ran");
  int ran_next = (int)lua_tointeger(SL, -1);
  lua_pop(SL, 1);
  check(next == 0 && ran_next == 1, "and the next resil_step runs the task, once");
  if (next != 0 || ran_next != 1) printf("# got %d (ran: %d): %.200s\n", next, ran_next, resil_error(S));
  resil_close(S);
  alarm(0);

  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
