/*
 * embed_journal_test.c: a host closed while its SQLite store's write lock was
 * held by someone else keeps the cost rows it could not write in the ledger's
 * journal; the program's next host, in the same process, writes them to the
 * store once it answers, once. Prints TAP; spec/run counts it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

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

static resil_t *open_host(const char *store) {
  resil_options o = {0};
  o.store = store;
  o.log_level = "off";
  resil_t *R = resil_open(&o);
  if (resil_load_string(R,
                        "local resil = require 'resil'\n"
                        "function spend(id) return resil.cost.record({provider = 'embed', usd = 0.25, id = id,\n"
                        "  wait = false}) and 'recorded' end\n"
                        "function total(n) for _ = 1, 100 do\n"
                        "  local by = resil.cost.breakdown('provider')\n"
                        "  if n == 0 or by and by[1] and by[1].calls >= n then break end resil.sleep(0.05) end\n"
                        "  return ('%.2f'):format(resil.cost.total()) end\n",
                        "=journal") != RESIL_OK ||
      resil_run(R) != RESIL_OK)
    printf("# setup: %s\n", resil_error(R));
  return R;
}

int main(void) {
  char dir[] = "/tmp/resil-journal-XXXXXX", path[200], store[240], journal[240], command[300];
  if (!mkdtemp(dir)) return 1;
  snprintf(path, sizeof path, "%s/state.db", dir);
  snprintf(store, sizeof store, "%s?timeout=0.1", path);
  snprintf(journal, sizeof journal, "%s/journal", dir);
  setenv("RESIL_JOURNAL", journal, 1);

  resil_t *first = open_host(store);
  check(call(first, "total", "[0]") == RESIL_OK && strcmp(result, "[\"0.00\"]") == 0, "the store made: nothing spent");
  sqlite3 *other = NULL;
  int locked = sqlite3_open(path, &other) == SQLITE_OK &&
               sqlite3_exec(other, "BEGIN EXCLUSIVE", NULL, NULL, NULL) == SQLITE_OK;
  check(locked, "another connection holds the store's write lock");
  check(call(first, "spend", "[\"embed-1\"]") == RESIL_OK, "a paid call's row, the store locked");
  check(call(first, "spend", "[null]") == RESIL_OK, "and one without an id");
  resil_close(first);
  sqlite3_exec(other, "COMMIT", NULL, NULL, NULL);
  sqlite3_close(other);

  resil_t *second = open_host(store);
  check(call(second, "total", "[2]") == RESIL_OK && strcmp(result, "[\"0.50\"]") == 0,
        "the next host of the process writes both kept rows");
  resil_close(second);
  resil_t *third = open_host(store);
  check(call(third, "total", "[2]") == RESIL_OK && strcmp(result, "[\"0.50\"]") == 0, "and a third host, once");
  resil_close(third);

  snprintf(command, sizeof command, "rm -rf %s", dir);
  if (system(command) != 0) printf("# could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
