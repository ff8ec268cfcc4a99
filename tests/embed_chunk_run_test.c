/*
 * embed_chunk_run_test.c: the run a chunk given to resil_load_string checkpoints
 * into follows the chunk, as a script file's follows its path: two programs (or
 * one, loading one chunk after another) that run different code never replay
 * each other's step results. Prints TAP lines; spec/run counts them.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "resil.h"
#include "tap.h"


static char store[256];

/* A chunk's step: "charge", paid once, returns the global `value` (set before the chunk runs) */
static const char *CHUNK_A = "result = require('resil').step('charge', function() return value end)\n"
                             "run = require('resil').run.id()";
static const char *CHUNK_B = "result = require('resil').step('charge', function() return value .. '' end)\n"
                             "run = require('resil').run.id()";

static resil_t *open_host(void) {
  resil_options o = {0};
  o.store = store;
  o.log_level = "off";
  return resil_open(&o);
}

static void set_global(resil_t *R, const char *name, const char *v) {
  lua_pushstring(resil_lua(R), v);
  lua_setglobal(resil_lua(R), name);
}

static const char *global(resil_t *R, const char *name, char *out, size_t n) {
  lua_getglobal(resil_lua(R), name);
  const char *s = lua_tostring(resil_lua(R), -1);
  snprintf(out, n, "%s", s ? s : "(nil)");
  lua_pop(resil_lua(R), 1);
  return out;
}

/* In a process of its own (a program run again): the chunk with `value`; -> 0 when its step
 * returned `expect` */
static int run_apart(const char *code, const char *chunkname, const char *value, const char *expect) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    resil_t *R = open_host();
    if (!R) _exit(3);
    set_global(R, "value", value);
    if (resil_load_string(R, code, chunkname) != RESIL_OK || resil_run(R) != RESIL_OK) _exit(4);
    char got[256];
    global(R, "result", got, sizeof got);
    resil_close(R);
    _exit(strcmp(got, expect) == 0 ? 0 : 1);
  }
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int main(void) {
  char dir[] = "/tmp/resil-chunk-run-XXXXXX";
  if (!mkdtemp(dir)) return 2;
  snprintf(store, sizeof store, "%s/state.db", dir);

  check(run_apart(CHUNK_A, "=(string)", "paid by A", "paid by A") == 0, "a chunk's step runs and is checkpointed");
  /* (before: every chunk was the run "(script)-...": B's step was given A's paid result) */
  check(run_apart(CHUNK_B, "=(string)", "paid by B", "paid by B") == 0,
        "another chunk, run by another process, runs its own step: it is not given the first chunk's result");
  check(run_apart(CHUNK_A, "=(string)", "paid again", "paid by A") == 0,
        "the first chunk run again resumes its own run: its step is replayed, not paid again");

  /* one host, one chunk after another: each its own run, named by the chunk's name */
  resil_t *R = open_host();
  char a[256], b[256], result[256];
  set_global(R, "value", "one host, A");
  int ok = R && resil_load_string(R, CHUNK_A, "=nightly") == RESIL_OK && resil_run(R) == RESIL_OK;
  global(R, "run", a, sizeof a);
  set_global(R, "value", "one host, B");
  ok = ok && resil_load_string(R, CHUNK_B, "=nightly") == RESIL_OK && resil_run(R) == RESIL_OK;
  global(R, "run", b, sizeof b);
  global(R, "result", result, sizeof result);
  check(ok && strncmp(a, "nightly-", 8) == 0 && strncmp(b, "nightly-", 8) == 0 && strcmp(a, b) != 0,
        "in one host, chunks loaded one after another are runs of their own, named by the chunk's name");
  check(strcmp(result, "one host, B") == 0, "and the second chunk's step ran");
  resil_close(R);

  /* an interrupt between calls (a program's SIGINT handler: resil_interrupt while nothing runs),
   * then the next chunk loaded: the interrupt cut the load's naming of the chunk's run, and the
   * chunk's step was checkpointed in another run; the same code run again found nothing in its
   * own run and paid again */
  R = open_host();
  set_global(R, "value", "job A");
  ok = R && resil_load_string(R, CHUNK_A, "=job") == RESIL_OK && resil_run(R) == RESIL_OK;
  global(R, "run", a, sizeof a);
  resil_interrupt(R, SIGINT);
  set_global(R, "value", "job B, paid");
  ok = ok && resil_load_string(R, CHUNK_B, "=job") == RESIL_OK && resil_run(R) == RESIL_ERR_INTERRUPT &&
       resil_run(R) == RESIL_OK;
  global(R, "run", b, sizeof b);
  global(R, "result", result, sizeof result);
  check(ok && strcmp(result, "job B, paid") == 0 && strncmp(b, "job-", 4) == 0 && strcmp(a, b) != 0,
        "an interrupt between calls, then a chunk loaded: the interrupt is reported by resil_run, and the chunk "
        "then runs in its own run");
  if (strncmp(b, "job-", 4) != 0 || strcmp(a, b) == 0) printf("# the second chunk's run: %s (the first's %s)\n", b, a);
  resil_close(R);
  check(run_apart(CHUNK_B, "=job", "paid twice", "job B, paid") == 0,
        "and that chunk run again by another process resumes its run: its step is replayed, not paid again");

  /* the run of a chunk whose step failed: `runs show` names it as Lua names the chunk, and gives
   * no command to resume it (its program does; the line named a file "billing" that is none) */
  check(run_apart("require('resil').step('charge', function() error('declined') end)", "=billing", "x", "x") == 4,
        "a chunk whose step fails fails its run");
  const char *bin = getenv("RESIL");
  if (bin) {
    char cmd[1024], out[4096] = "";
    snprintf(cmd, sizeof cmd, "%s runs --store %s 2>&1 && %s runs show $(%s runs --store %s | awk '/^billing-/ { print $1 }') "
             "--store %s 2>&1", bin, store, bin, bin, store, store);
    FILE *p = popen(cmd, "r");
    size_t n = p ? fread(out, 1, sizeof out - 1, p) : 0;
    out[n] = '\0';
    if (p) pclose(p);
    check(strstr(out, "billing-") && strstr(out, " (=billing)") && !strstr(out, "resume:"),
          "runs show names the run of a chunk whose step failed \"=billing\", with no command to resume it");
  }

  /* a chunk loaded over one not yet run: refused (before: the first became a task like any other,
   * and its failure was said to nobody: resil_run returned RESIL_OK) */
  R = open_host();
  int first = resil_load_string(R, "error('the first chunk fails')", "=first");
  int second = resil_load_string(R, "done_second = true", "=second");
  check(first == RESIL_OK && second == RESIL_ERR_USAGE && strstr(resil_error(R), "has not run yet") != NULL,
        "resil_load_string over a chunk not yet run is refused (RESIL_ERR_USAGE)");
  int ran = resil_run(R);
  check(ran == RESIL_ERR_SCRIPT && strstr(resil_error(R), "first:1: the first chunk fails") != NULL,
        "and resil_run reports the first chunk's failure");
  check(resil_load_string(R, "done_second = true", "=second") == RESIL_OK && resil_run(R) == RESIL_OK,
        "a chunk loaded after the run is taken");
  resil_close(R);

  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
