/*
 * embed_reload_call_test.c: a program that drives the host with resil_call
 * alone (no event base of its own, no resil_step) and asked for reloads on
 * SIGHUP, or resil_watch: the next call runs the reloaded policy. Prints TAP lines; spec/run
 * counts them.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "resil.h"
#include "tap.h"


static char result[4096];
static int call(resil_t *R, const char *fn, const char *args) {
  char *out = NULL;
  int status = resil_call(R, fn, args, &out);
  snprintf(result, sizeof result, "%s", out ? out : resil_error(R));
  free(out);
  return status;
}

static void write_policy(const char *path, int version) {
  FILE *f = fopen(path, "w");
  if (!f) return;
  fprintf(f, "local M = {}\nfunction M.version() return %d end\nreturn M\n", version);
  fclose(f);
}

int main(void) {
  char dir[] = "/tmp/resil-reload-call-XXXXXX", policy[200], command[300];
  if (!mkdtemp(dir)) return 1;
  snprintf(policy, sizeof policy, "%s/versioned.lua", dir);
  write_policy(policy, 1);

  /* The SIGHUP's event (and a watched edit's, a server's connection) waited for a turn that looked
   * at I/O, which a call that never waits does not make: the program's calls ran version 1 for good */
  resil_options o = {0};
  o.policies_dir = dir;
  o.store = ":memory:";
  o.log_level = "off";
  resil_t *R = resil_open(&o);
  check(resil_reload_on_sighup(R) == RESIL_OK && call(R, "policies.versioned.version", NULL) == RESIL_OK &&
            strcmp(result, "[1]") == 0,
        "a host driven by resil_call alone, reloading on SIGHUP, runs version 1");
  write_policy(policy, 2);
  raise(SIGHUP);
  int called = call(R, "policies.versioned.version", NULL);
  check(called == RESIL_OK && strcmp(result, "[2]") == 0, "the policy edited and SIGHUP sent: the next call runs version 2");
  if (called != RESIL_OK || strcmp(result, "[2]") != 0) printf("# got %.200s\n", result);

  /* an interrupt between calls (resil_interrupt while nothing runs) is reported by the next call,
   * which runs nothing; a reload meanwhile is the program's own: it was cut, every time until a
   * call came, "reload: [resil prelude]:704: interrupted by signal 2" */
  write_policy(policy, 3);
  resil_interrupt(R, SIGINT);
  int reloaded = resil_reload(R);
  check(reloaded == RESIL_OK, "an interrupt between calls, then resil_reload: the policy is reloaded");
  if (reloaded != RESIL_OK) printf("# %.200s\n", resil_error(R));
  check(call(R, "policies.versioned.version", NULL) == RESIL_ERR_INTERRUPT && call(R, "policies.versioned.version", NULL) ==
            RESIL_OK && strcmp(result, "[3]") == 0,
        "the next call reports the interrupt, running nothing, and the one after runs version 3");

  /* resil_watch: the edit was read by the next call's look, and its 100 ms of quiet counted from
   * then: that call, and any within 100 ms after it, ran the old version, however long ago it was
   * saved */
  check(resil_watch(R, 1) == RESIL_OK, "resil_watch on");
  write_policy(policy, 4);
  usleep(300 * 1000); /* (more than the 100 ms of quiet a watched edit waits for) */
  called = call(R, "policies.versioned.version", NULL);
  check(called == RESIL_OK && strcmp(result, "[4]") == 0,
        "a policy edited 0.3 s before a call, watched: that call runs version 4");
  if (called != RESIL_OK || strcmp(result, "[4]") != 0) printf("# got %.200s\n", result);
  resil_close(R);

  snprintf(command, sizeof command, "rm -rf %s", dir);
  if (system(command) != 0) printf("# could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
