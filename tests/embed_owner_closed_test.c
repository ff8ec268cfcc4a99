/*
 * embed_owner_closed_test.c: a host closed while its SQLite store was locked
 * by someone else could not give up what it held there (a resil.once key, a
 * budget hold). The program's next host, in the same process, took their
 * holder for alive, its pid being its own: the key "held by pid N" and the
 * budget full for as long as the program ran. Prints TAP; spec/run counts it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include <sqlite3.h>

#include "resil.h"
#include "tap.h"


static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static char result[4096];
static int call(resil_t *R, const char *fn, const char *args) {
  char *out = NULL;
  int status = resil_call(R, fn, args, &out);
  snprintf(result, sizeof result, "%s", out ? out : resil_error(R));
  free(out);
  return status;
}

static char logged[4096];
static void log_line(void *ud, const char *line) {
  strncat(logged, line, sizeof logged - strlen(logged) - 2);
  strcat(logged, "\n");
}

static resil_t *open_host(const char *store, void (*log)(void *, const char *)) {
  resil_options o = {0};
  o.store = store;
  o.log_level = log ? "error" : "off";
  o.log = log;
  resil_t *R = resil_open(&o);
  if (resil_load_string(R,
                        "local resil = require 'resil'\n"
                        "function once(s) return resil.once({key = 'report', wait = 0.3}, function()\n"
                        "  resil.sleep(s) return 'ran' end) end\n"
                        "function hold(s) local b = resil.budget('team', {limit = 1, per = 'day'})\n"
                        "  local t, err = b:reserve(1) if not t then return nil, err end\n"
                        "  resil.sleep(s) t:settle(0) return 'reserved' end\n",
                        "=owner") != RESIL_OK ||
      resil_run(R) != RESIL_OK)
    printf("# setup: %s\n", resil_error(R));
  return R;
}

static void ignore_done(void *ud, int status, const char *json) {}

int main(void) {
  char dir[] = "/tmp/resil-owner-XXXXXX", path[200], store[240], command[300];
  if (!mkdtemp(dir)) return 1;
  snprintf(path, sizeof path, "%s/state.db", dir);
  snprintf(store, sizeof store, "%s?timeout=0.2", path); /* (the give-up's wait for the lock: short) */

  resil_t *first = open_host(store, log_line);
  resil_call_async(first, "once", "[3600]", ignore_done, NULL);
  resil_call_async(first, "hold", "[3600]", ignore_done, NULL);
  for (int i = 0; i < 20; i++) resil_step(first, 10);

  resil_t *second = open_host(store, NULL);
  int held = call(second, "once", "[0]");
  check(held == RESIL_ERR_FAILED && contains(result, "in_progress"),
        "another host of the process, open, holds the key: in_progress");
  held = call(second, "hold", "[0]");
  check(held == RESIL_ERR_FAILED && contains(result, "budget_exceeded"), "and its hold fills the budget");

  /* someone else's transaction (a backup, a migration) holds the store's write lock as the host closes */
  sqlite3 *other = NULL;
  int locked = sqlite3_open(path, &other) == SQLITE_OK &&
               sqlite3_exec(other, "BEGIN EXCLUSIVE", NULL, NULL, NULL) == SQLITE_OK;
  char stderr_path[240], said[1000] = "";
  snprintf(stderr_path, sizeof stderr_path, "%s/stderr", dir);
  fflush(stderr);
  int saved_stderr = dup(2), to_file = open(stderr_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  dup2(to_file, 2);
  resil_close(first);
  fflush(stderr);
  dup2(saved_stderr, 2);
  close(saved_stderr), close(to_file);
  FILE *f = fopen(stderr_path, "r");
  if (f) said[fread(said, 1, sizeof said - 1, f)] = '\0', fclose(f);
  sqlite3_exec(other, "COMMIT", NULL, NULL, NULL);
  sqlite3_close(other);
  check(locked, "the first host closes while another connection holds the store locked");
  check(contains(logged, "\"msg\":\"resil_close: could not give up the host's resil.once keys\"") &&
            contains(logged, "could not give up the host's budget holds") && contains(logged, "database is locked") &&
            said[0] == '\0',
        "what it could not give up is said through the program's log callback, not on stderr");
  if (said[0]) printf("# stderr: %.300s\n", said);

  int ran = call(second, "once", "[0]");
  check(ran == RESIL_OK && strcmp(result, "[\"ran\"]") == 0,
        "the closed host's resil.once key is taken over: its holder is gone, though its pid runs");
  if (ran != RESIL_OK) printf("# %.300s\n", result);
  int reserved = call(second, "hold", "[0]");
  check(reserved == RESIL_OK && strcmp(result, "[\"reserved\"]") == 0,
        "and its budget hold no longer counts");
  if (reserved != RESIL_OK) printf("# %.300s\n", result);
  resil_close(second);

  snprintf(command, sizeof command, "rm -rf %s", dir);
  if (system(command) != 0) printf("# could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
