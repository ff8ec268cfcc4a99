/*
 * embed_close_locked_test.c: resil_close while another process holds the
 * SQLite store's write lock (a `resil-lua costs` run, a backup, a second
 * program mid-commit), with what a closing host has to write: its run with a
 * step running, a resil.once key, a budget hold, a cost row the store
 * refused (retry = true) and one queued (wait = false). The close waits for
 * the lock once, the store's timeout, not once a step; each cost row it could
 * not write is in the log, never dropped without a word; and one the lock let
 * go in time is written. Prints TAP lines; spec/run counts them.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "resil.h"
#include "tap.h"

static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* the host's log lines, kept */
static char logged[65536];
static void on_log(void *ud, const char *line) {
  (void)ud;
  size_t used = strlen(logged);
  snprintf(logged + used, sizeof logged - used, "%s\n", line);
}
/* a log line holding both needles */
static int logged_line(const char *a, const char *b) {
  for (const char *line = logged; *line;) {
    const char *end = strchr(line, '\n');
    size_t len = end ? (size_t)(end - line) : strlen(line);
    char one[4096];
    snprintf(one, sizeof one, "%.*s", (int)(len < sizeof one ? len : sizeof one - 1), line);
    if (strstr(one, a) && strstr(one, b)) return 1;
    line += len + (end ? 1 : 0);
  }
  return 0;
}

static void on_done(void *ud, int status, const char *json) { (void)ud, (void)status, (void)json; }

static const char policy[] =
  "local resil = require 'resil'\n"
  "function quick() return resil.step('quick', function() return 'done' end) end\n"
  "function slow() return resil.step('slow', function() resil.sleep(3600) return 'x' end) end\n"
  "function once_slow() return resil.once('charge-7', function() resil.sleep(3600) end) end\n"
  "function hold() local t = assert(resil.budget('team-a', { limit = 1 }):reserve(0.4)) resil.sleep(3600) t:settle(0.1) end\n"
  "function warm() resil.cost.total{} return resil.budget('team-a', { limit = 1 }):state().reserved end\n"
  "function queued()\n"
  "  return resil.cost.record{ provider = 'openai', model = 'gpt-4o-mini', operation = 'chat', usd = 0.25,\n"
  "    id = 'call-queued', wait = false }\n"
  "end\n"
  "function refused()\n"
  "  return resil.cost.record{ provider = 'openai', model = 'gpt-4o-mini', operation = 'chat', usd = 0.5,\n"
  "    id = 'call-refused', retry = true }\n"
  "end\n";

/* A second process that takes the store's write lock (BEGIN IMMEDIATE) and keeps it: for good
 * (release_after < 0), or until release_after seconds after the byte that *go gets written. */
static pid_t hold_lock(const char *path, double release_after, int *go) {
  int ready[2], start[2];
  if (pipe(ready) != 0 || pipe(start) != 0) exit(2);
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    sqlite3 *db = NULL;
    sqlite3_open(path, &db);
    sqlite3_busy_timeout(db, 10000);
    int rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (write(ready[1], rc == SQLITE_OK ? "y" : "n", 1) != 1) _exit(1);
    char c;
    if (release_after < 0 || read(start[0], &c, 1) != 1) pause();
    usleep((useconds_t)(release_after * 1e6));
    sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    sqlite3_close(db);
    _exit(0);
  }
  char c = 'n';
  if (read(ready[0], &c, 1) != 1 || c != 'y') exit(2);
  close(ready[0]), close(ready[1]), close(start[0]);
  *go = start[1];
  return pid;
}

/* the ledger's rows and their sum in micro-dollars, read beside the host */
static void ledger(const char *path, int *rows, long long *micro) {
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  *rows = -1, *micro = -1;
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
      sqlite3_prepare_v2(db, "SELECT count(*), coalesce(sum(micro_usd), 0) FROM costs", -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW)
    *rows = sqlite3_column_int(st, 0), *micro = sqlite3_column_int64(st, 1);
  sqlite3_finalize(st);
  sqlite3_close(db);
}

static char result[4096];
static int call(resil_t *R, const char *fn) {
  char *out = NULL;
  int status = resil_call(R, fn, NULL, &out);
  snprintf(result, sizeof result, "%s", out ? out : resil_error(R));
  free(out);
  return status;
}

/* a host with a run (a step running), a resil.once key, a budget hold: all in flight */
static resil_t *busy_host(const char *url) {
  resil_options o = {0};
  o.store = url;
  o.log = on_log;
  o.run_id = "job-1";
  resil_t *R = resil_open(&o);
  if (!R || resil_load_string(R, policy, "=policy") != RESIL_OK || resil_run(R) != RESIL_OK) exit(2);
  if (call(R, "warm") != RESIL_OK) exit(2);
  resil_call_async(R, "slow", NULL, on_done, NULL);
  resil_call_async(R, "once_slow", NULL, on_done, NULL);
  resil_call_async(R, "hold", NULL, on_done, NULL);
  for (int i = 0; i < 20; i++) resil_step(R, 10);
  return R;
}

int main(void) {
  char dir[] = "/tmp/resil-close-locked-XXXXXX";
  if (!mkdtemp(dir)) return 2;
  char path[256], url[300], journal[256];
  snprintf(path, sizeof path, "%s/state.db", dir);
  /* (the ledger's journal of this test's own: what the first close keeps is written by the last host) */
  snprintf(journal, sizeof journal, "%s/journal", dir);
  setenv("RESIL_JOURNAL", journal, 1);

  /* the lock held throughout: the store's timeout is 1 s */
  snprintf(url, sizeof url, "%s?timeout=1", path);
  resil_t *R = busy_host(url);
  int go;
  pid_t holder = hold_lock(path, -1, &go);
  int queued = call(R, "queued");
  int refused = call(R, "refused"); /* (waits the timeout, then is the store's to write later) */
  check(queued == RESIL_OK && refused == RESIL_ERR_FAILED && contains(result, "store_unavailable"),
        "with the lock held: a queued cost row is taken, a waited-for one is refused (its retry is the host's)");
  double t0 = now();
  resil_close(R);
  double took = now() - t0;
  /* (before: the run, the once key, the cost row, the hold and the queue each waited the timeout:
   * five of them; a store's default timeout is 5 s, and a program's shutdown hung 25 s) */
  check(took < 3.0, "resil_close waits for the lock once, the store's timeout (1 s), not once per thing it writes");
  if (took >= 3.0) printf("# resil_close took %.1f s\n", took);
  /* (kept in the ledger's journal, src/lua/journal.lua: before it, each "was not written before the
   * process ended", for an operator to enter by hand) */
  check(logged_line("a cost row is kept in the ledger's journal", "\"usd\":0.25") &&
            logged_line("a cost row is kept in the ledger's journal", "call-refused"),
        "each cost row it could not write is kept in the ledger's journal, named in the log (none dropped)");
  kill(holder, SIGKILL);
  waitpid(holder, NULL, 0);
  close(go);
  int rows;
  long long micro;
  ledger(path, &rows, &micro);
  check(rows == 0, "and the ledger has neither (what the log says is what is missing)");

  /* the lock let go 0.3 s into the close (the store's timeout: 3 s, room for a loaded machine):
   * everything is written */
  char first[256];
  snprintf(first, sizeof first, "%s", path);
  snprintf(path, sizeof path, "%s/state2.db", dir); /* (another store: the first's journal is not its) */
  logged[0] = '\0';
  snprintf(url, sizeof url, "%s?timeout=3", path);
  R = busy_host(url);
  holder = hold_lock(path, 0.3, &go);
  queued = call(R, "queued");
  refused = call(R, "refused");
  if (write(go, "g", 1) != 1) return 2;
  resil_close(R);
  waitpid(holder, NULL, 0);
  close(go);
  ledger(path, &rows, &micro);
  check(queued == RESIL_OK && refused == RESIL_ERR_FAILED && rows == 2 && micro == 750000,
        "the lock let go within the close's wait: both cost rows are in the ledger ($0.75)");
  if (rows != 2 || micro != 750000) printf("# ledger: %d rows, %lld micro-dollars; log:\n%s", rows, micro, logged);
  check(!contains(logged, "was not written"), "and the log says nothing is missing");

  /* nothing is held after either close: a host opened next takes the run, the key and the budget */
  resil_options o = {0};
  o.store = path;
  o.log = on_log;
  o.run_id = "job-1";
  R = resil_open(&o);
  int ok = R && resil_load_string(R, policy, "=policy") == RESIL_OK && resil_run(R) == RESIL_OK;
  check(ok && call(R, "quick") == RESIL_OK && call(R, "warm") == RESIL_OK && strcmp(result, "[0]") == 0,
        "a host opened next takes the run, and the budget holds nothing");
  resil_close(R);

  /* the first store's next host writes what its close kept, once */
  o.store = first;
  o.run_id = "job-2";
  R = resil_open(&o);
  ok = R && resil_load_string(R, policy, "=policy") == RESIL_OK && resil_run(R) == RESIL_OK;
  ok = ok && call(R, "warm") == RESIL_OK; /* (the store opened: its journal written first) */
  if (!ok) printf("# the host: %s\n", R ? resil_error(R) : "not opened");
  for (int i = 0; ok && i < 300 && (ledger(first, &rows, &micro), rows != 2); i++) resil_step(R, 10);
  check(ok && rows == 2 && micro == 750000, "the first store's next host writes the rows its close kept ($0.75)");
  if (rows != 2 || micro != 750000) printf("# ledger: %d rows, %lld micro-dollars; log:\n%s", rows, micro, logged);
  resil_close(R);

  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) printf("# could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
