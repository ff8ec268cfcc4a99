/*
 * embed_chdir_test.c: a program that changes its working directory while a
 * host is open (a daemon's chdir("/") after its setup, a worker that moves
 * into a job's folder) keeps the host's files: relative paths it gave the
 * host name what they named at resil_open. Prints TAP lines; spec/run
 * counts them.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "resil.h"
#include "tap.h"


static long file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static char result[4096];
static int call(resil_t *R, const char *fn, const char *args) {
  char *out = NULL;
  int status = resil_call(R, fn, args, &out);
  snprintf(result, sizeof result, "%s", out ? out : resil_error(R));
  free(out);
  return status;
}

int main(void) {
  char dir[] = "/tmp/resil-chdir-XXXXXX", home[PATH_MAX], elsewhere[PATH_MAX + 16], path[PATH_MAX + 64];
  if (!mkdtemp(dir) || !getcwd(home, sizeof home)) return 1;
  snprintf(elsewhere, sizeof elsewhere, "%s/elsewhere", dir);
  mkdir(elsewhere, 0755);
  if (chdir(dir) != 0) return 1;

  /* The store opened before the chdir: SQLite has its file by its full name, but the thread that
   * syncs and checkpoints its WAL had the relative one, and from the new folder found no WAL
   * ("nothing unsynced": commits were told durable unsynced) and no file to checkpoint into: the
   * WAL grew with every commit, for good. 800 commits of 3 pages each: past 2,400 frames without
   * a checkpoint, at most some 1,000 (the checkpoint's) with. */
  {
    resil_options o = {0};
    o.store = "data/state.db";
    o.log_level = "off";
    resil_t *R = resil_open(&o);
    int loaded = resil_load_string(R,
                                   "local resil = require('resil')\n"
                                   "function put(n)\n"
                                   "  local value = ('x'):rep(8000)\n"
                                   "  for i = 1, n do assert(resil.store():set('k' .. i % 50, value)) end\n"
                                   "  return n\n"
                                   "end\n",
                                   "=put") == RESIL_OK &&
                 resil_run(R) == RESIL_OK;
    check(loaded && call(R, "put", "[1]") == RESIL_OK, "a store at a relative path opens and takes a write");
    if (chdir(elsewhere) != 0) printf("# chdir %s failed\n", elsewhere);
    check(call(R, "put", "[800]") == RESIL_OK, "the program changes folder: the store takes 800 more commits");
    snprintf(path, sizeof path, "%s/data/state.db-wal", dir);
    long wal = file_size(path);
    long frame = 4096 + 24;
    check(wal > 0 && wal < 1600 * frame, "its WAL is checkpointed as before (at most some 1,000 frames, not one per commit)");
    if (wal >= 1600 * frame) printf("# the WAL is %ld bytes, %ld frames\n", wal, wal / frame);
    resil_close(R);
    if (chdir(dir) != 0) printf("# chdir %s failed\n", dir);
  }

  /* The store first used after the chdir (a store opens at its first use): it was a new, empty file
   * in the new folder, the budgets' spend, the once keys and the ledger of the host's first folder
   * out of its sight (a key paid for there ran, and was paid for, again). Under the sandbox,
   * resil_open's default, as without. */
  for (int sandbox = 0; sandbox < 2; sandbox++) {
    resil_options o = {0};
    o.store = "shared/state.db";
    o.log_level = "off";
    o.sandbox = sandbox ? RESIL_SANDBOX_ON : RESIL_SANDBOX_OFF;
    static const char *code = "function put(k, v) assert(require('resil').store():set(k, v)) return true end\n"
                              "function get(k) return (require('resil').store():get(k)) end\n";
    resil_t *first = resil_open(&o);
    resil_load_string(first, code, "=first");
    resil_run(first);
    if (chdir(elsewhere) != 0) printf("# chdir %s failed\n", elsewhere);
    int put = call(first, "put", sandbox ? "[\"paid\", \"sandboxed\"]" : "[\"paid\", \"yes\"]");
    check(put == RESIL_OK, sandbox ? "sandbox: a host opened before the chdir writes its store after it"
                                   : "a host opened before the chdir writes its store after it");
    if (put != RESIL_OK) printf("# %s\n", result);
    resil_close(first);
    snprintf(path, sizeof path, "%s/shared/state.db", elsewhere);
    check(file_size(path) < 0, "no store was made in the program's new folder");
    if (chdir(dir) != 0) printf("# chdir %s failed\n", dir);
    resil_t *second = resil_open(&o); /* (in the first host's folder) */
    resil_load_string(second, code, "=second");
    resil_run(second);
    check(call(second, "get", "[\"paid\"]") == RESIL_OK &&
              strcmp(result, sandbox ? "[\"sandboxed\"]" : "[\"yes\"]") == 0,
          "a host opened in the first one's folder reads what it wrote: one store");
    resil_close(second);
  }

  /* The policy folder given relative (opts.policies_dir), and ./policies: after the chdir every call
   * of a policy not loaded yet failed, "module 'policies.double' not found", and a reload found
   * none. Errors still name the file as its folder was given. */
  {
    snprintf(path, sizeof path, "%s/pol", dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/pol/double.lua", dir);
    FILE *f = fopen(path, "w");
    if (f) fputs("local M = {}\nfunction M.f(x) return x * 2 end\nfunction M.fail() error('no') end\nreturn M\n", f), fclose(f);
    resil_options o = {0};
    o.policies_dir = "pol";
    o.store = ":memory:";
    o.log_level = "off";
    resil_t *R = resil_open(&o);
    if (chdir(elsewhere) != 0) printf("# chdir %s failed\n", elsewhere);
    int called = call(R, "policies.double.f", "[21]");
    check(called == RESIL_OK && strcmp(result, "[42]") == 0, "a relative policies_dir is the folder it named at resil_open");
    if (called != RESIL_OK) printf("# %.300s\n", result);
    check(call(R, "policies.double.fail", NULL) == RESIL_ERR_SCRIPT && strstr(result, "pol/double.lua:3: no"),
          "and its errors name the file as the folder was given (pol/double.lua:3)");
    f = fopen(path, "w");
    if (f) fputs("local M = {}\nfunction M.f(x) return x * 3 end\nreturn M\n", f), fclose(f);
    check(resil_reload(R) == RESIL_OK && call(R, "policies.double.f", "[21]") == RESIL_OK && strcmp(result, "[63]") == 0,
          "resil_reload finds it there too");
    resil_close(R);
    if (chdir(dir) != 0) printf("# chdir %s failed\n", dir);
  }

  char command[PATH_MAX + 32];
  snprintf(command, sizeof command, "rm -rf %s", dir);
  if (chdir(home) != 0 || system(command) != 0) printf("# could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
