/*
 * embed_test.c: the embedding API as a C program uses it (resil.h only).
 * Prints TAP lines; spec/run counts them.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "resil.h"
#include "tap.h"


static const char *global_string(resil_t *R, const char *name) {
  lua_State *L = resil_lua(R);
  lua_getglobal(L, name);
  const char *s = lua_tostring(L, -1);
  lua_pop(L, 1);
  return s ? s : "";
}

/* a policy's os.exit in an embedder that closes its host at exit (atexit) */
static resil_t *exiting_host;
static void close_exiting_host(void) { resil_close(exiting_host); }

static int exit_status_of(const char *code) {
  pid_t pid = fork();
  if (pid == 0) {
    resil_options o = {0};
    o.sandbox = RESIL_SANDBOX_OFF; /* (os.exit is refused in the sandbox) */
    exiting_host = resil_open(&o);
    atexit(close_exiting_host);
    resil_load_string(exiting_host, code, "=exiting");
    resil_run(exiting_host);
    _exit(99); /* os.exit did not exit */
  }
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* A child of fork with its parent's host (a store open): it is refused a
 * call, closes without waiting for the store's thread (which the child does
 * not have), and the parent's host goes on. -> the child's exit status:
 * 0 all as expected, 1 the call was not refused, 128 + signal if it hung */
static int forked_child_status(resil_t *R) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(10); /* a hang ends here */
    char *out = NULL;
    int status = resil_call(R, "put", "[\"child\"]", &out);
    int refused = status == RESIL_ERR_USAGE && out == NULL && strstr(resil_error(R), "after fork") != NULL;
    resil_close(R);
    _exit(refused ? 0 : 1);
  }
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* lua_dump's writer: the chunk's bytes to a file */
static int write_chunk(lua_State *L, const void *p, size_t n, void *f) {
  (void)L;
  return fwrite(p, 1, n, f) == n ? 0 : 1;
}

static int embedder_signals;
static void on_embedder_signal(evutil_socket_t sig, short what, void *arg) { embedder_signals++; }
static void on_enough(evutil_socket_t fd, short what, void *arg) { event_base_loopbreak(arg); }

int main(void) {
  resil_t *R = resil_open(NULL);
  check(R != NULL, "resil_open with no options gives a host");
  check(resil_load_string(R,
                          "local resil = require 'resil'\n"
                          "local t = resil.spawn(function() resil.sleep(0.01) return 'child' end)\n"
                          "local _, v = t:join()\n"
                          "result = v .. ' ok'\n",
                          "=embedded") == RESIL_OK,
        "a chunk loads as the first task");
  check(resil_run(R) == RESIL_OK, "resil_run runs until no task is left");
  check(strcmp(global_string(R, "result"), "child ok") == 0, "tasks ran and joined");

  check(resil_load_string(R, "error('from C test')", "=failing") == RESIL_OK, "a failing chunk loads");
  check(resil_run(R) == RESIL_ERR_SCRIPT, "a raising main task gives RESIL_ERR_SCRIPT");
  check(strstr(resil_error(R), "failing:1: from C test") != NULL, "the error names chunk and line");
  check(strstr(resil_error(R), "stack traceback") != NULL, "the error has a traceback");

  check(resil_load_string(R, "local x = = 1", "=syntax") == RESIL_ERR_SCRIPT, "a syntax error is refused at load");
  check(strstr(resil_error(R), "syntax:1:") != NULL, "the syntax error names chunk and line");
  check(resil_load_file(R, "/no/such/file.lua", 0, NULL) == RESIL_ERR_FILE, "a missing file gives RESIL_ERR_FILE");

  /* closed with a transfer in flight: the host frees it (make check's LeakSanitizer watches) */
  resil_t *R4 = resil_open(NULL);
  check(resil_load_string(R4,
                          "local resil = require 'resil'\n"
                          "local m = resil.mock.start({ sequence = { chat = { 'hang' } } })\n"
                          "resil.spawn(resil.http.request, { url = m.url .. '/v1/chat/completions', json = {} })\n"
                          "while resil.http.stats().in_flight == 0 do resil.yield() end\n"
                          "error('leaving with a request in flight')\n",
                          "=inflight") == RESIL_OK,
        "a chunk with a hanging request loads");
  check(resil_run(R4) == RESIL_ERR_SCRIPT, "its main task fails while the request hangs");
  resil_close(R4);

  /* a second host in the same process, on the caller's own event base */
  struct event_base *base = event_base_new();
  resil_options opts = {0};
  opts.base = base;
  opts.virtual_clock = 1;
  resil_t *R2 = resil_open(&opts);
  check(R2 != NULL && resil_event_base(R2) == base, "a host can run on the embedder's event base");
  resil_load_string(R2,
                    "local resil = require 'resil'\n"
                    "local t0 = resil.now(); resil.sleep(3600); elapsed = tostring(resil.now() - t0)\n",
                    "=virtual");
  check(resil_run(R2) == RESIL_OK && strcmp(global_string(R2, "elapsed"), "3600.0") == 0,
        "the virtual clock option makes an hour pass at once");
  check(strcmp(global_string(R, "elapsed"), "") == 0, "two hosts share no globals");

  resil_interrupt(R2, 2);
  resil_load_string(R2, "require('resil').sleep(1)", "=interrupted");
  check(resil_run(R2) == RESIL_ERR_INTERRUPT, "resil_interrupt stops the loop");
  resil_close(R2);
  event_base_free(base);

  resil_close(R);

  /* the store and policy reload through the options and the C API */
  char dir[] = "/tmp/resil-embed-XXXXXX";
  if (!mkdtemp(dir)) return 1;
  char path[256], store[256];
  snprintf(path, sizeof path, "%s/greet.lua", dir);
  snprintf(store, sizeof store, "%s/state.db", dir);
  FILE *f = fopen(path, "w");
  fputs("return { version = 1 }", f);
  fclose(f);
  resil_options o3 = {0};
  o3.policies_dir = dir;
  o3.store = store;
  o3.run_id = "embedded-run";
  o3.log_level = "off";
  resil_t *R3 = resil_open(&o3);
  resil_load_string(R3,
                    "local resil = require 'resil'\n"
                    "greet = resil.policy 'greet'\n"
                    "step = resil.step('one', function() return 'done' end) .. ' ' .. resil.run.id()\n",
                    "=store");
  check(resil_run(R3) == RESIL_OK && strcmp(global_string(R3, "step"), "done embedded-run") == 0,
        "the store and run id come from the options");
  f = fopen(path, "w");
  fputs("return { version = 2 }", f);
  fclose(f);
  check(resil_reload(R3) == RESIL_OK, "resil_reload loads the changed policy");
  lua_State *L3 = resil_lua(R3);
  (void)luaL_dostring(L3, "version = tostring(greet.version)");
  check(strcmp(global_string(R3, "version"), "2") == 0, "new calls see the new version");
  f = fopen(path, "w");
  fputs("return {", f);
  fclose(f);
  check(resil_reload(R3) == RESIL_ERR_SCRIPT && strstr(resil_error(R3), "greet.lua:1:") != NULL,
        "a broken policy is refused with file:line");
  (void)luaL_dostring(L3, "version = tostring(greet.version)");
  check(strcmp(global_string(R3, "version"), "2") == 0, "and the old version keeps serving");
  resil_close(R3);

  /* a reload runs under the caps: a policy that loops at load is refused */
  f = fopen(path, "w");
  fputs("return { version = 5 }", f);
  fclose(f);
  resil_options o5 = o3;
  o5.max_instructions = 100000;
  resil_t *R5 = resil_open(&o5);
  lua_State *L5 = resil_lua(R5);
  (void)luaL_dostring(L5, "greet = require('resil').policy 'greet'");
  f = fopen(path, "w");
  fputs("local n = 0\nwhile true do n = n + 1 end\n", f);
  fclose(f);
  check(resil_reload(R5) == RESIL_ERR_SCRIPT && strstr(resil_error(R5), "greet.lua:2: policy reload ran more than") != NULL,
        "resil_reload refuses a policy that loops past max_instructions, naming file:line");
  (void)luaL_dostring(L5, "version = tostring(greet.version)");
  check(strcmp(global_string(R5, "version"), "5") == 0, "and the old version keeps serving");
  resil_close(R5);

  resil_options o6 = {0};
  o6.store = "ftp://example.com/x";
  resil_t *R6 = resil_open(&o6);
  check(R6 != NULL && strstr(resil_error(R6), "unknown URL scheme 'ftp'") != NULL,
        "resil_open reports a store URL of an unknown scheme through resil_error");
  resil_close(R6);
  unlink(path);
  unlink(store);
  char side[300];
  snprintf(side, sizeof side, "%s-wal", store);
  unlink(side);
  snprintf(side, sizeof side, "%s-shm", store);
  unlink(side);
  rmdir(dir);

  check(exit_status_of("require('resil').spawn(function() os.exit(7) end)") == 7,
        "a policy's os.exit(7) from a task closes the Lua state, and the embedder's resil_close at exit does not "
        "close it again");
  check(exit_status_of("os.exit(true, false)") == 0, "os.exit(true, false) exits at once with 0");

  /* the program's own signal event and the host's SIGHUP reload on one base (what resil.h advises) */
  char hup_dir[] = "/tmp/resil-hup-XXXXXX";
  if (!mkdtemp(hup_dir)) return 1;
  snprintf(path, sizeof path, "%s/greet.lua", hup_dir);
  f = fopen(path, "w");
  fputs("return { version = 1 }", f);
  fclose(f);
  struct event_base *shared = event_base_new();
  struct event *own_signal = evsignal_new(shared, SIGUSR1, on_embedder_signal, NULL);
  struct event *enough = evtimer_new(shared, on_enough, shared);
  evsignal_add(own_signal, NULL);
  resil_options o8 = {0};
  o8.base = shared;
  o8.policies_dir = hup_dir;
  o8.log_level = "off";
  resil_t *R8 = resil_open(&o8);
  resil_load_string(R8, "greet = require('resil').policy 'greet'", "=hup");
  resil_run(R8);
  check(resil_reload_on_sighup(R8) == RESIL_OK, "resil_reload_on_sighup on the program's own base");
  f = fopen(path, "w");
  fputs("return { version = 2 }", f);
  fclose(f);
  raise(SIGUSR1);
  raise(SIGHUP);
  struct timeval a_moment = {0, 300000};
  evtimer_add(enough, &a_moment);
  event_base_dispatch(shared);
  (void)luaL_dostring(resil_lua(R8), "version = tostring(greet.version)");
  check(embedder_signals == 1 && strcmp(global_string(R8, "version"), "2") == 0,
        "the program's signal event and the host's SIGHUP reload both work on one base");
  resil_close(R8);
  event_free(own_signal);
  event_free(enough);
  event_base_free(shared);
  unlink(path);
  rmdir(hup_dir);

  /* a precompiled chunk as the main script of a sandboxed host (Lua does not check bytecode) */
  char chunk[] = "/tmp/resil-chunk-XXXXXX";
  int chunk_fd = mkstemp(chunk);
  FILE *chunk_file = chunk_fd >= 0 ? fdopen(chunk_fd, "wb") : NULL;
  lua_State *plain = luaL_newstate();
  if (!chunk_file || luaL_loadstring(plain, "ran = 'the binary chunk'") != LUA_OK ||
      lua_dump(plain, write_chunk, chunk_file, 0) != 0)
    return 1;
  fclose(chunk_file);
  lua_close(plain);
  resil_t *R9 = resil_open(NULL);
  check(resil_load_file(R9, chunk, 0, NULL) == RESIL_ERR_SCRIPT &&
            strstr(resil_error(R9), "binary chunks are not allowed in the sandbox") != NULL &&
            strncmp(resil_error(R9), chunk, strlen(chunk)) == 0,
        "the sandbox refuses a binary chunk as the main script, naming the file");
  resil_run(R9);
  check(strcmp(global_string(R9, "ran"), "") == 0, "and nothing of it ran");
  resil_close(R9);
  resil_options o9 = {0};
  o9.sandbox = RESIL_SANDBOX_OFF;
  R9 = resil_open(&o9);
  check(resil_load_file(R9, chunk, 0, NULL) == RESIL_OK && resil_run(R9) == RESIL_OK &&
            strcmp(global_string(R9, "ran"), "the binary chunk") == 0,
        "without the sandbox it runs");
  resil_close(R9);
  unlink(chunk);

  char fork_dir[] = "/tmp/resil-fork-XXXXXX";
  if (!mkdtemp(fork_dir)) return 1;
  char fork_store[256];
  snprintf(fork_store, sizeof fork_store, "%s/state.db", fork_dir);
  resil_options o7 = {0};
  o7.store = fork_store;
  o7.log_level = "off";
  resil_t *R7 = resil_open(&o7);
  char *stepped = NULL;
  check(resil_load_string(R7, "function put(k) return require('resil').step(k, function() return k end) end", "=put") ==
            RESIL_OK &&
            resil_run(R7) == RESIL_OK && resil_call(R7, "put", "[\"before\"]", &stepped) == RESIL_OK,
        "a host with a SQLite store checkpoints a step before a fork");
  free(stepped);
  stepped = NULL;
  check(forked_child_status(R7) == 0,
        "a child of fork is refused a call on its parent's host (not left waiting for the store's thread) and closes it");
  check(resil_call(R7, "put", "[\"after\"]", &stepped) == RESIL_OK && stepped && strcmp(stepped, "[\"after\"]") == 0,
        "the parent's host goes on after the child closed its copy");
  free(stepped);
  resil_close(R7);
  const char *suffixes[] = {"", "-wal", "-shm"};
  for (int i = 0; i < 3; i++) {
    snprintf(side, sizeof side, "%s%s", fork_store, suffixes[i]);
    unlink(side);
  }
  rmdir(fork_dir);

  /* the watchdog: a loop is stopped where it runs, the host goes on; misuse refused */
  resil_t *Rw = resil_open(NULL);
  check(resil_set_max_task_seconds(Rw, -1) == RESIL_ERR_USAGE && resil_set_max_task_seconds(Rw, 0.0 / 0.0) ==
            RESIL_ERR_USAGE && resil_set_max_task_seconds(NULL, 1) == RESIL_ERR_USAGE,
        "resil_set_max_task_seconds refuses a negative or NaN time and a NULL host");
  check(resil_set_max_task_seconds(Rw, 0.2) == RESIL_OK &&
            resil_load_string(Rw, "local n = 0\nwhile true do n = n + 1 end", "=spin") == RESIL_OK &&
            resil_run(Rw) == RESIL_ERR_SCRIPT &&
            strstr(resil_error(Rw), "spin:2: task 1 (spin) ran ") != NULL &&
            strstr(resil_error(Rw), "without yielding (--max-task-seconds=0.2)") != NULL,
        "resil_set_max_task_seconds stops a task that loops, naming file:line");
  char *answer = NULL;
  check(resil_load_string(Rw, "function ping() return 'pong' end", "=ping") == RESIL_OK && resil_run(Rw) == RESIL_OK &&
            resil_call(Rw, "ping", "[]", &answer) == RESIL_OK && answer && strcmp(answer, "[\"pong\"]") == 0,
        "and the host serves on");
  free(answer);
  /* a loop whose pcall swallows the stop is cut: the call and the run say the stop, at its line
   * (before: resil_call's error was "canceled: task N was canceled" and resil_run's "main task
   * failed", with no line and no word of the watchdog) */
  answer = NULL;
  int swallowed = resil_load_string(Rw, "function keeps_on()\n  while true do pcall(function() while true do end end) end\nend",
                                    "=swallow") == RESIL_OK && resil_run(Rw) == RESIL_OK
                      ? resil_call(Rw, "keeps_on", NULL, &answer) : -1;
  check(swallowed == RESIL_ERR_SCRIPT && !answer &&
            strstr(resil_error(Rw), "swallow:2: task ") != NULL &&
            strstr(resil_error(Rw), "without yielding (--max-task-seconds=0.2)") != NULL,
        "resil_call of a loop that swallows the watchdog's stop in pcall fails with the stop, at its line");
  if (swallowed != RESIL_ERR_SCRIPT || !strstr(resil_error(Rw), "swallow:2: task ")) printf("# got %d: %.60s\n", swallowed, resil_error(Rw));
  check(resil_load_string(Rw, "while true do pcall(function() while true do end end) end", "=swallow_main") == RESIL_OK &&
            resil_run(Rw) == RESIL_ERR_SCRIPT && strstr(resil_error(Rw), "swallow_main:1: task ") != NULL &&
            strstr(resil_error(Rw), "without yielding (--max-task-seconds=0.2)") != NULL,
        "and so does resil_run of a main chunk that does it");
  check(resil_set_max_task_seconds(Rw, 0) == RESIL_OK, "a watchdog is turned off with 0");
  resil_close(Rw);

  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
