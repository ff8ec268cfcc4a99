/*
 * embed_step_test.c: resil_step is one loop turn, whatever the program's own
 * events on the shared event base do. Prints TAP lines; spec/run counts them.
 * A step that never returns ends the program with a "not ok" line (alarm).
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "resil.h"
#include "tap.h"


static const char *running = "?";
static void on_hang(int signo) {
  (void)signo;
  char line[400];
  int n = snprintf(line, sizeof line, "not ok %d - %s (hung: resil_step never returned)\n1..%d\n", test_number + 1,
                   running, test_number + 1);
  if (n > 0) {
    ssize_t ignored = write(1, line, (size_t)n);
    (void)ignored;
  }
  _exit(1);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* the program's own periodic work: longer than its period */
static int ticks;
static void on_tick(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what, (void)arg;
  double t0 = now();
  while (now() - t0 < 0.02) {
  }
  ticks++;
}

int main(void) {
  signal(SIGALRM, on_hang);
  struct event_base *base = event_base_new();
  resil_options o = {0};
  o.base = base;
  o.log_level = "off";
  resil_t *R = resil_open(&o);
  if (!R || !base) return 2;
  /* a task that yields each turn: every step runs it, then looks at I/O (ready tasks remain) */
  if (resil_load_string(R, "local resil = require 'resil' for _ = 1, 1e9 do resil.yield() end", "=yielder") != RESIL_OK)
    return 2;
  struct event *tick = event_new(base, -1, EV_PERSIST, on_tick, NULL);
  struct timeval every = {0, 10000}; /* 10 ms; its work takes 20 ms */
  event_add(tick, &every);

  /* (before: the look at I/O was libevent's EVLOOP_NONBLOCK, which runs pass after pass while
   * each finds an event due: the program's event, due again as each of its runs ended, held the
   * step for good) */
  running = "resil_step returns while the program's own event on the shared base runs longer than its period";
  alarm(20);
  int steps = 0;
  for (double t0 = now(); now() - t0 < 1 || ticks < 3; steps++) resil_step(R, 0);
  alarm(0);
  check(steps > 0 && ticks >= 3, running);

  running = "resil_step(R, 0) with no task ready only looks, as the program's event keeps coming due";
  resil_close(R);
  R = resil_open(&o);
  if (!R) return 2;
  /* a task that sleeps: nothing ready, so the step looks at I/O without waiting */
  if (resil_load_string(R, "require('resil').sleep(3600)", "=sleeper") != RESIL_OK || resil_step(R, 0) < 0) return 2;
  alarm(20);
  int before = ticks;
  for (double t0 = now(); now() - t0 < 1 || ticks < before + 3;) resil_step(R, 0);
  alarm(0);
  check(ticks >= before + 3, running);

  event_free(tick);
  resil_close(R);
  event_base_free(base);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
