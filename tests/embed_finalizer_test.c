/*
 * embed_finalizer_test.c: a policy's __gc finalizer that loops, with the
 * watchdog on (resil_set_max_task_seconds). Lua runs finalizers with its
 * hooks off, so the watchdog's stop, a hook, never ran there: the program
 * waited for good. Now the finalizer is stopped where it runs, said in the
 * log, and the call that ran into it returns; the host goes on. One left
 * for resil_close is stopped as lua_close runs it. Prints TAP lines; spec/run counts them.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "resil.h"
#include "tap.h"

static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static void on_hang(int signo) {
  (void)signo;
  static const char line[] = "not ok - the host hung in a finalizer that loops (the watchdog never stopped it)\n";
  ssize_t ignored = write(1, line, sizeof line - 1);
  (void)ignored;
  _exit(1);
}

static char logged[16384];
static void on_log(void *ud, const char *line) {
  (void)ud;
  size_t used = strlen(logged);
  snprintf(logged + used, sizeof logged - used, "%s\n", line);
}

int main(void) {
  signal(SIGALRM, on_hang);
  alarm(60);
  resil_options o = {0};
  o.store = ":memory:";
  o.log = on_log;
  resil_t *R = resil_open(&o);
  if (!R || resil_set_max_task_seconds(R, 0.5) != RESIL_OK ||
      resil_load_string(R,
                        "local resil = require 'resil'\n"
                        "function litter() setmetatable({}, { __gc = function() while true do end end }) return 1 end\n"
                        "function sweep() collectgarbage() collectgarbage() return 'swept' end\n"
                        "function ok() return 'fine' end\n",
                        "=policy") != RESIL_OK ||
      resil_run(R) != RESIL_OK)
    return 2;
  char *out = NULL;
  int status = resil_call(R, "litter", NULL, &out);
  free(out), out = NULL;
  check(status == RESIL_OK, "an object whose __gc loops is made");

  /* (the call itself goes on from its collection, or is cut at its next hook: either way it returns) */
  status = resil_call(R, "sweep", NULL, &out);
  check(status == RESIL_OK || (status == RESIL_ERR_SCRIPT && contains(resil_error(R), "without yielding")),
        "the call whose collection runs the looping finalizer returns: the watchdog stopped the finalizer");
  free(out), out = NULL;
  check(contains(logged, "a __gc finalizer raised an error") && contains(logged, "policy:2: task") &&
            contains(logged, "without yielding (--max-task-seconds=0.5)"),
        "the finalizer's stop is in the log, at its line, with the watchdog's reason");
  if (!contains(logged, "without yielding")) printf("# log:\n%s", logged);

  status = resil_call(R, "ok", NULL, &out);
  check(status == RESIL_OK && out && strcmp(out, "[\"fine\"]") == 0, "the host answers the next call");
  free(out), out = NULL;

  /* one left for the host's close: lua_close runs it, hooks off as in any collection */
  logged[0] = '\0';
  status = resil_call(R, "litter", NULL, &out);
  free(out);
  resil_close(R);
  check(status == RESIL_OK, "resil_close with an object whose __gc loops returns: the watchdog stopped it");
  check(contains(logged, "a __gc finalizer raised an error") &&
            contains(logged, "policy:2: the host's close: a __gc finalizer ran"),
        "and the log says so, at the finalizer's line");
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
