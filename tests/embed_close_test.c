/*
 * embed_close_test.c: resil_close with work of the host's still going (a
 * step running, a request out), then a host opened again in the same
 * process on the same store, as a long-lived program that opens a host per
 * job does. Prints TAP lines; spec/run counts them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "resil.h"

static int test_number;
static int failures;

static void check(int ok, const char *what) {
  test_number++;
  if (!ok) failures++;
  printf("%sok %d - %s\n", ok ? "" : "not ", test_number, what);
  fflush(stdout);
}

static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static char result[4096];
static int call(resil_t *R, const char *fn, const char *args) {
  char *out = NULL;
  int status = resil_call(R, fn, args, &out);
  snprintf(result, sizeof result, "%s", out ? out : resil_error(R));
  free(out);
  return status;
}

static int dones, done_status = -1;
static void on_done(void *ud, int status, const char *json) {
  dones++;
  done_status = status;
}

static const char policy[] = "local resil = require 'resil'\n"
                             "function quick() return resil.step('quick', function() return 'done' end) end\n"
                             "function slow() return resil.step('slow', function() resil.sleep(3600) return 'x' end) end\n"
                             "function once_slow() return resil.once('charge-7', function() resil.sleep(3600) end) end\n"
                             "function once_quick()\n"
                             "  return resil.once({ key = 'charge-7', wait = 0.2 }, function() return 'charged' end)\n"
                             "end\n"
                             "function hold()\n"
                             "  local t = assert(resil.budget('team-a', { limit = 1 }):reserve(0.4))\n"
                             "  resil.sleep(3600)\n"
                             "  t:settle(0.1)\n"
                             "end\n"
                             "function reserved() return resil.budget('team-a', { limit = 1 }):state().reserved end\n";

static resil_t *open_on(const char *store) {
  resil_options o = {0};
  o.log_level = "off";
  o.store = store;
  o.run_id = "job-1";
  resil_t *R = resil_open(&o);
  if (!R || resil_load_string(R, policy, "=job") != RESIL_OK || resil_run(R) != RESIL_OK) exit(2);
  return R;
}

int main(void) {
  char dir[] = "/tmp/resil-close-XXXXXX", store[600];
  if (!mkdtemp(dir)) return 1;
  snprintf(store, sizeof store, "%s/state.db", dir);

  /* a run whose steps all ended, its host closed: the next host of the process resumes it */
  resil_t *R = open_on(store);
  check(call(R, "quick", NULL) == RESIL_OK && strcmp(result, "[\"done\"]") == 0, "a step of the run job-1");
  resil_close(R);
  R = open_on(store);
  int again = call(R, "quick", NULL);
  check(again == RESIL_OK && strcmp(result, "[\"done\"]") == 0,
        "a host opened after resil_close takes the run the closed one had (it was refused run_held: 'held by "
        "pid <this process>', for as long as the process lived)");
  if (again != RESIL_OK) printf("# got %d: %.300s\n", again, result);

  /* a step still running at resil_close: its done hears the close; the run is given up all the same */
  resil_call_async(R, "slow", NULL, on_done, NULL);
  for (int i = 0; i < 5; i++) resil_step(R, 10);
  resil_close(R);
  check(dones == 1 && done_status == RESIL_ERR_INTERRUPT, "a step still running at resil_close: done hears RESIL_ERR_INTERRUPT");
  R = open_on(store);
  again = call(R, "quick", NULL);
  check(again == RESIL_OK && strcmp(result, "[\"done\"]") == 0 && !contains(result, "run_held"),
        "and a host opened after it takes the run (the step recorded as cut short: the run resumes)");
  if (again != RESIL_OK) printf("# got %d: %.300s\n", again, result);

  /* a resil.once key whose fn runs at resil_close: given up, as a fn that raised gives it up */
  resil_call_async(R, "once_slow", NULL, on_done, NULL);
  for (int i = 0; i < 5; i++) resil_step(R, 10);
  resil_close(R);
  R = open_on(store);
  again = call(R, "once_quick", NULL);
  check(again == RESIL_OK && strcmp(result, "[\"charged\"]") == 0,
        "a resil.once key whose fn ran at resil_close is free for the next host (it was in_progress, 'held by pid "
        "<this process>', for as long as the process lived)");
  if (again != RESIL_OK) printf("# got %d: %.300s\n", again, result);

  /* a budget's hold that a call still had at resil_close: given back, as a process's as it dies */
  resil_call_async(R, "hold", NULL, on_done, NULL);
  for (int i = 0; i < 5; i++) resil_step(R, 10);
  int held = call(R, "reserved", NULL) == RESIL_OK && strcmp(result, "[0.4]") == 0;
  resil_close(R);
  R = open_on(store);
  again = call(R, "reserved", NULL);
  check(held && again == RESIL_OK && strcmp(result, "[0]") == 0,
        "a budget's hold a call had at resil_close is given back (it counted 600 s more, the process alive)");
  if (again != RESIL_OK || strcmp(result, "[0]") != 0) printf("# got %d: %.300s\n", again, result);
  resil_close(R);

  char path[700];
  const char *files[] = {"state.db", "state.db-wal", "state.db-shm"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    unlink(path);
  }
  rmdir(dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
