/*
 * embed_shared_store_test.c: two hosts of one program on one SQLite store
 * (the README's two threads with a host each, on the default store), and the
 * program's own SQLite connection reading the ledger: one host closing leaves
 * the other's store whole. Prints TAP lines; spec/run counts them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
                        "function put(n)\n"
                        "  local value = ('x'):rep(8000)\n"
                        "  for i = 1, n do assert(require('resil').store():set('k' .. i % 50, value)) end\n"
                        "  return n\n"
                        "end\n",
                        "=put") != RESIL_OK ||
      resil_run(R) != RESIL_OK)
    printf("# setup: %s\n", resil_error(R));
  return R;
}

int main(void) {
  char dir[] = "/tmp/resil-shared-XXXXXX", store[200], wal[220], command[300];
  if (!mkdtemp(dir)) return 1;
  snprintf(store, sizeof store, "%s/state.db", dir);
  snprintf(wal, sizeof wal, "%s-wal", store);
  struct stat st;

  /* A checkpoint that could not copy the whole WAL (the program's own read held an older
   * snapshot) had the store's syncer sync the file through a descriptor of its own, closed with
   * the store: a close that dropped every fcntl lock the process held on the file, SQLite's
   * shared lock of the other host's connection too. The next process to read the store and close
   * (`resil-lua costs`, sqlite3) took itself for the file's last user and deleted the WAL and
   * -shm under the other host, which refused every write from then on ("its -wal or -shm file
   * was deleted or replaced"). */
  resil_t *A = open_host(store), *B = open_host(store);
  check(call(A, "put", "[1]") == RESIL_OK && call(B, "put", "[1]") == RESIL_OK, "two hosts of one program write one store");
  sqlite3 *mine = NULL;
  int reading = sqlite3_open(store, &mine) == SQLITE_OK &&
                sqlite3_exec(mine, "BEGIN; SELECT count(*) FROM kv;", NULL, NULL, NULL) == SQLITE_OK;
  check(reading && call(A, "put", "[1100]") == RESIL_OK,
        "one host writes 1,100 commits while the program's own connection reads the store");
  sqlite3_exec(mine, "COMMIT", NULL, NULL, NULL);
  resil_close(A);
  snprintf(command, sizeof command, "sqlite3 %s 'SELECT count(*) FROM kv' > /dev/null 2>&1", store);
  int other = system(command);
  check(other == 0 && stat(wal, &st) == 0,
        "that host closes; another process reads the store and closes: the WAL the other host has is still there");
  int put = call(B, "put", "[5]");
  check(put == RESIL_OK && strcmp(result, "[5]") == 0, "and the other host goes on writing");
  if (put != RESIL_OK) printf("# %.300s\n", result);
  resil_close(B);
  sqlite3_close(mine);

  snprintf(command, sizeof command, "rm -rf %s", dir);
  if (system(command) != 0) printf("# could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
