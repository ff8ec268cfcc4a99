/*
 * call_test.c: calling Lua from C (resil_call, resil_call_async,
 * resil_step, resil_register, resil_options.log) and the sandbox, as a C
 * program uses them (resil.h, plus the Lua API for a host function).
 * Prints TAP lines; spec/run counts them.
 */
#include <locale.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>
#include <lauxlib.h>
#include <lua.h>

#include "resil.h"
#include "tap.h"


static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static char dir[] = "/tmp/resil-call-XXXXXX";

static void write_file(const char *name, const char *text) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  if (!f) exit(2);
  fputs(text, f);
  fclose(f);
}

/* resil_call with a string result: "" on failure, the caller frees nothing */
static char result[4096];
static int call(resil_t *R, const char *fn, const char *args) {
  char *out = NULL;
  int status = resil_call(R, fn, args, &out);
  snprintf(result, sizeof result, "%s", out ? out : "");
  free(out);
  return status;
}

static void load(resil_t *R, const char *code) {
  if (resil_load_string(R, code, "=setup") != RESIL_OK || resil_run(R) != RESIL_OK) {
    fprintf(stderr, "setup failed: %s\n", resil_error(R));
    exit(2);
  }
}

/* ---------- a host function ---------- */

static int host_add(lua_State *L) {
  lua_pushinteger(L, luaL_checkinteger(L, 1) + luaL_checkinteger(L, 2));
  return 1;
}

static resil_t *reentrant_host;
static int host_reenter(lua_State *L) {
  char *out = NULL;
  int status = resil_call(reentrant_host, "add", "[1,2]", &out);
  free(out);
  lua_pushinteger(L, status);
  return 1;
}

static int host_run(lua_State *L) {
  lua_pushinteger(L, resil_run(reentrant_host));
  return 1;
}

/* ---------- the log callback ---------- */

static char log_lines[8192];
static void on_log(void *ud, const char *line) {
  int *count = ud;
  (*count)++;
  strncat(log_lines, line, sizeof log_lines - strlen(log_lines) - 2);
  strcat(log_lines, "\n");
}

/* ---------- async ---------- */

typedef struct {
  int calls, status;
  char text[256];
  struct event_base *base;
  int stop_after;
} async_seen;

static void on_done(void *ud, int status, const char *json) {
  async_seen *s = ud;
  s->calls++;
  s->status = status;
  snprintf(s->text, sizeof s->text, "%s", json ? json : "(null)");
  if (s->base && s->calls == s->stop_after) event_base_loopbreak(s->base);
}

/* ---------- the embedder's own callback on the host's event base ---------- */

/* resil_call and resil_run from a callback of the program's own event_base_dispatch: libevent
 * refuses a loop inside it, and the host's loop, waiting on it, spun forever */
static resil_t *dispatched_host;
static int dispatched_call_status = -1, dispatched_run_status = -1;
static char dispatched_error[512];
static void call_from_dispatch(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  char *out = NULL;
  alarm(20); /* (a loop that spins fails the test instead of hanging it) */
  dispatched_call_status = resil_call(dispatched_host, "policies.router.wait", "[0.05]", &out);
  snprintf(dispatched_error, sizeof dispatched_error, "%s", resil_error(dispatched_host));
  free(out);
  resil_load_string(dispatched_host, "require('resil').sleep(0.05)", "=inside");
  dispatched_run_status = resil_run(dispatched_host);
  alarm(0);
  event_base_loopbreak(arg);
}

/* ---------- resil_interrupt from another thread ---------- */

static void *interrupt_soon(void *arg) {
  usleep(100000);
  resil_interrupt(arg, 15);
  return NULL;
}

/* ---------- closing the host from a callback ---------- */

static resil_t *closing_host;
static int closed_in_callback;
static void close_when_done(void *ud, int status, const char *json) {
  (void)ud, (void)status, (void)json;
  closed_in_callback++;
  resil_close(closing_host);
}
/* a program that calls again when a call fails: resil_close tells it so for a call still running */
static int again_status = -1, again_sync_status = -1;
static void call_again(void *ud, int status, const char *json) {
  (void)ud, (void)status, (void)json;
  char *out = NULL;
  again_status = resil_call_async(closing_host, "nap", NULL, call_again, NULL);
  again_sync_status = resil_call(closing_host, "nap", NULL, &out);
  free(out);
}
static int host_close(lua_State *L) {
  resil_close(closing_host);
  lua_pushboolean(L, 1);
  return 1;
}
static resil_t *host_for_closing(struct event_base *base) {
  resil_options o = {0};
  o.base = base;
  o.log_level = "off";
  closing_host = resil_open(&o);
  resil_register(closing_host, "close", host_close);
  if (resil_load_string(closing_host, "local resil = require 'resil'\n"
                                      "function nap() resil.sleep(0.01) return 'slept' end\n"
                                      "function close_me() resil.host.close() resil.sleep(0.01) return 'after close' end\n",
                        "=closing") != RESIL_OK ||
      resil_run(closing_host) != RESIL_OK)
    exit(2);
  return closing_host;
}

/* ---------- two threads, a host each ---------- */

static void *thread_main(void *arg) {
  long id = (long)arg;
  resil_options o = {0};
  o.policies_dir = dir;
  o.log_level = "off";
  resil_t *R = resil_open(&o);
  if (!R) return (void *)1;
  long bad = 0;
  for (int i = 0; i < 200; i++) {
    char args[64], want[64];
    char *out = NULL;
    snprintf(args, sizeof args, "[%ld, %d]", id, i);
    snprintf(want, sizeof want, "[%ld]", id * 1000 + i);
    if (resil_call(R, "policies.router.combine", args, &out) != RESIL_OK || !out || strcmp(out, want) != 0) bad++;
    free(out);
  }
  resil_close(R);
  return (void *)bad;
}

int main(void) {
  if (!mkdtemp(dir)) return 1;
  write_file("router.lua",
             "local resil = require 'resil'\n"
             "local M = {}\n"
             "function M.pick(req) return { model = req.tokens > 100 and 'large' or 'small' }, 'second' end\n"
             "function M.broken() error('no route for this') end\n"
             "function M.unavailable()\n"
             "  return nil, resil.error('rate_limited', 'try later')\n"
             "end\n"
             "function M.plain_nil_err() return nil, 'just a string' end\n"
             "function M.nothing() end\n"
             "function M.holes() return 1, nil, 3 end\n"
             "function M.combine(a, b) return a * 1000 + b end\n"
             "function M.wait(seconds) resil.sleep(seconds) return 'woke' end\n"
             "M.doubler = setmetatable({}, { __call = function(_, x) return 2 * x end })\n"
             "M.table = { x = 1 }\n"
             "function M.ratio(a, b) return { ratio = a / b } end\n"
             "return M\n");
  write_file("data.txt", "inside\n");

  int log_count = 0;
  resil_options o = {0};
  o.policies_dir = dir;
  o.log = on_log;
  o.log_ud = &log_count;
  o.max_instructions = 1000000;
  o.max_memory = 64 << 20;
  o.virtual_clock = 1;
  resil_t *R = resil_open(&o);
  check(R != NULL && resil_error(R)[0] == '\0', "a host with the log callback, caps and a policy folder");

  /* ---- resil_call ---- */
  check(call(R, "policies.router.pick", "[{\"tokens\": 500}]") == RESIL_OK &&
            strcmp(result, "[{\"model\":\"large\"},\"second\"]") == 0,
        "resil_call runs a policy function found through require and returns its results as a JSON array");
  check(call(R, "policies.router.holes", "[]") == RESIL_OK && strcmp(result, "[1,null,3]") == 0,
        "nil among the results is null");
  check(call(R, "policies.router.nothing", NULL) == RESIL_OK && strcmp(result, "[]") == 0,
        "no results is an empty array, and NULL args are no arguments");
  load(R, "function add(a, b) return a + b end\n"
          "function args_seen(...) return select('#', ...), (select(2, ...)) == nil end\n"
          "limits = { double = function(x) return 2 * x end }\n");
  check(call(R, "add", "[2, 40]") == RESIL_OK && strcmp(result, "[42]") == 0, "a global function of a loaded script");
  check(call(R, "limits.double", "[21]") == RESIL_OK && strcmp(result, "[42]") == 0, "a field path from a global table");
  check(call(R, "args_seen", "[1, null, 3]") == RESIL_OK && strcmp(result, "[3,true]") == 0,
        "null in the arguments is nil, and the count is kept");

  check(call(R, "policies.router.broken", "[]") == RESIL_ERR_SCRIPT && contains(resil_error(R), "router.lua:4: no route for this") &&
            contains(resil_error(R), "stack traceback"),
        "a raise is RESIL_ERR_SCRIPT with file:line and a traceback");
  /* (before: "[resil embed]:111: need_string: ...", a line of the host's own call helper) */
  load(R, "function need_string(x)\n"
          "  if type(x) ~= 'string' then error('need_string: x must be a string', 2) end\n"
          "  return x\n"
          "end\n");
  check(call(R, "need_string", "[42]") == RESIL_ERR_SCRIPT &&
            strncmp(resil_error(R), "need_string: x must be a string\n", 32) == 0,
        "error(msg, 2) in the function called blames its caller, the program: no line of the host's");
  if (strncmp(resil_error(R), "need_string: x must be a string\n", 32) != 0) printf("# got %.80s\n", resil_error(R));
  load(R, "function nul_raise() error('before\\0after') end\n"
          "function nul_fail() return nil, 'before\\0after' end\n");
  check(call(R, "nul_raise", NULL) == RESIL_ERR_SCRIPT && contains(resil_error(R), "before\\0after") &&
            call(R, "nul_fail", NULL) == RESIL_ERR_FAILED && contains(resil_error(R), "before\\0after"),
        "an error message with a NUL in it reaches resil_error whole, the NUL as \\0 (it ended there)");
  check(call(R, "policies.router.unavailable", "[]") == RESIL_ERR_FAILED &&
            contains(resil_error(R), "policies.router.unavailable (") && contains(resil_error(R), "router.lua:5)") &&
            contains(resil_error(R), "rate_limited: try later"),
        "nil, err is RESIL_ERR_FAILED naming the function's file:line and the error's kind");
  check(call(R, "policies.router.plain_nil_err", "[]") == RESIL_ERR_FAILED && contains(resil_error(R), "err: just a string"),
        "nil, a string is RESIL_ERR_FAILED with the string");
  check(call(R, "policies.router.missing", "[]") == RESIL_ERR_USAGE && contains(resil_error(R), "policies.router.missing is not a function (it is nil)"),
        "an unknown function is RESIL_ERR_USAGE and nothing runs");
  /* (a provider made by policies.call, a fallback chain: callable tables, which the policies' view
   * under the sandbox hid: "is not a function (it is table)", RESIL_ERR_USAGE) */
  check(call(R, "policies.router.doubler", "[21]") == RESIL_OK && strcmp(result, "[42]") == 0,
        "a policy's callable table (__call) runs under the sandbox as a function does");
  check(call(R, "policies.router.table", "[]") == RESIL_ERR_USAGE &&
            contains(resil_error(R), "policies.router.table is not a function (it is table)"),
        "a policy's plain table is RESIL_ERR_USAGE and nothing runs");
  /* (before: "Cannot serialise number: must not be NaN or Inf", naming neither the function nor where) */
  check(call(R, "policies.router.ratio", "[0, 0]") == RESIL_ERR_SCRIPT &&
            contains(resil_error(R), "policies.router.ratio (") && contains(resil_error(R), "router.lua:15)") &&
            contains(resil_error(R), "must not be NaN or Inf"),
        "a result JSON cannot hold is RESIL_ERR_SCRIPT naming the function, its file:line and why");
  check(call(R, "policies.nowhere.fn", "[]") == RESIL_ERR_SCRIPT && contains(resil_error(R), "module 'policies.nowhere' not found"),
        "a module that cannot be found is RESIL_ERR_SCRIPT");
  check(strncmp(resil_error(R), "module 'policies.nowhere' not found", 35) == 0,
        "naming no line of the host's own (it said [resil embed]:26:, the program named the module)");
  check(call(R, "add.", "[1, 2]") == RESIL_ERR_USAGE && call(R, ".add", "[1, 2]") == RESIL_ERR_USAGE &&
            call(R, "limits..double", "[1]") == RESIL_ERR_USAGE && call(R, "", NULL) == RESIL_ERR_USAGE &&
            contains(resil_error(R), "'' is not a name"),
        "a name with an empty part is RESIL_ERR_USAGE, nothing run ('add.' called add)");
  check(call(R, "add", "[1, 2") == RESIL_ERR_USAGE && contains(resil_error(R), "json_args"),
        "bad JSON is RESIL_ERR_USAGE");
  check(call(R, "add", "{\"a\": 1}") == RESIL_ERR_USAGE && contains(resil_error(R), "must be a JSON array"),
        "a JSON object is RESIL_ERR_USAGE");
  char *out = (char *)1;
  check(resil_call(R, NULL, "[]", &out) == RESIL_ERR_USAGE && out == NULL, "no function name: RESIL_ERR_USAGE, result NULL");
  load(R, "function returns_function() return print end\n");
  check(call(R, "returns_function", NULL) == RESIL_ERR_SCRIPT && contains(resil_error(R), "serialise"),
        "a result JSON cannot hold is RESIL_ERR_SCRIPT");

  /* a call that waits: it yields, time passes (virtual), it resumes */
  check(call(R, "policies.router.wait", "[3600]") == RESIL_OK && strcmp(result, "[\"woke\"]") == 0,
        "a call that sleeps an hour on the virtual clock finishes");

  /* caps inside resil_call */
  load(R, "function spin() local n = 0 while true do n = n + 1 end end\n"
          "function hog() local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(1 << 20) .. i end end\n");
  check(call(R, "spin", NULL) == RESIL_ERR_SCRIPT && contains(resil_error(R), "ran more than --max-instructions=1000000"),
        "max_instructions stops a call that never yields");
  check(strncmp(resil_error(R), "setup:1: task ", 14) == 0,
        "the error names the line that loops first, not the host's own code that called it");
  if (strncmp(resil_error(R), "setup:1: task ", 14) != 0) printf("# got %.80s\n", resil_error(R));
  check(call(R, "hog", NULL) == RESIL_ERR_SCRIPT && contains(resil_error(R), "not enough memory"),
        "max_memory stops a call that allocates without end");
  check(call(R, "add", "[1, 1]") == RESIL_OK && strcmp(result, "[2]") == 0, "and the host serves the next call");

  /* a call against the mock provider over real HTTP */
  load(R, "local resil = require 'resil'\n"
          "mock = resil.mock.start({})\n"
          "function ask(text)\n"
          "  local res, err = resil.http.request({ method = 'POST', url = mock.url .. '/v1/chat/completions',\n"
          "    json = { model = 'm', messages = { { role = 'user', content = text } } } })\n"
          "  if not res then return nil, err end\n"
          "  return res.status, resil.json.decode(res.body).object\n"
          "end\n");
  check(call(R, "ask", "[\"hello\"]") == RESIL_OK && strcmp(result, "[200,\"chat.completion\"]") == 0,
        "resil_call makes HTTP requests to the mock and returns their results");

  /* resil_register */
  check(resil_register(R, "add", host_add) == RESIL_OK, "resil_register adds a host function");
  check(resil_register(R, "not a name", host_add) == RESIL_ERR_USAGE, "resil_register refuses a name that is not an identifier");
  check(resil_register(R, "lookup", NULL) == RESIL_ERR_USAGE && contains(resil_error(R), "f is NULL"),
        "resil_register refuses a NULL function, saying so (it said the name was no identifier)");
  load(R, "function use_host(a, b) return require('resil').host.add(a, b) end\n"
          "function misuse_host() return require('resil').host.add('x', 1) end\n");
  check(call(R, "use_host", "[20, 22]") == RESIL_OK && strcmp(result, "[42]") == 0, "Lua calls it as resil.host.<name>");
  check(call(R, "misuse_host", NULL) == RESIL_ERR_SCRIPT && contains(resil_error(R), "bad argument #1 to 'add'"),
        "its errors reach the caller as RESIL_ERR_SCRIPT");
  reentrant_host = R;
  resil_register(R, "reenter", host_reenter);
  load(R, "function reenter() return require('resil').host.reenter() end\n");
  check(call(R, "reenter", NULL) == RESIL_OK && strcmp(result, "[6]") == 0,
        "resil_call from inside a task is refused with RESIL_ERR_USAGE");
  resil_register(R, "run", host_run);
  load(R, "function run_inside() return require('resil').host.run() end\n");
  check(call(R, "run_inside", NULL) == RESIL_OK && strcmp(result, "[6]") == 0 &&
            contains(resil_error(R), "resil_run: called from inside the host's loop"),
        "resil_run from inside a task is refused with RESIL_ERR_USAGE (a loop inside the loop hung)");
  check(resil_load_string(R, NULL, "=null") == RESIL_ERR_USAGE && contains(resil_error(R), "no code"),
        "resil_load_string with no code is refused with RESIL_ERR_USAGE");
  /* no host (a resil_open that failed, unchecked): refused, never a crash */
  check(resil_load_string(NULL, "x = 1", "=null") == RESIL_ERR_USAGE && resil_load_file(NULL, "x.lua", 0, NULL) ==
            RESIL_ERR_USAGE && resil_run(NULL) == RESIL_ERR_USAGE && resil_reload(NULL) == RESIL_ERR_USAGE &&
            resil_watch(NULL, 1) == RESIL_ERR_USAGE && resil_reload_on_sighup(NULL) == RESIL_ERR_USAGE &&
            resil_request_stop(NULL, 0) == 0 && resil_lua(NULL) == NULL && resil_event_base(NULL) == NULL &&
            contains(resil_error(NULL), "no host"),
        "a NULL host is refused by every entry point (RESIL_ERR_USAGE), and resil_error(NULL) says so");
  resil_interrupt(NULL, SIGINT);
  resil_close(NULL);

  /* the log callback */
  load(R, "require('resil').log.info('from the script', { answer = 42 })\n");
  check(log_count > 0 && contains(log_lines, "\"msg\":\"from the script\"") && contains(log_lines, "\"answer\":42") &&
            !contains(log_lines, "42}\n\n"),
        "resil_options.log receives each JSON line");

  /* a task that failed and was never joined is reported where the host's logs go, not on stderr */
  log_lines[0] = '\0';
  char err_path[] = "/tmp/resil-call-stderr-XXXXXX";
  int err_file = mkstemp(err_path), saved_err = dup(2);
  fflush(stderr);
  dup2(err_file, 2);
  load(R, "local resil = require 'resil'\n"
          "resil.spawn(function() error('lost failure 42') end)\n"
          "resil.sleep(0)\n");
  load(R, "collectgarbage() collectgarbage()\n");
  /* and by a host that logs to a file, as it closes with the task still referred to */
  char log_path[] = "/tmp/resil-call-log-XXXXXX";
  close(mkstemp(log_path));
  resil_options fo = {0};
  fo.log_file = log_path;
  resil_t *F = resil_open(&fo);
  load(F, "local resil = require 'resil'\n"
          "kept = resil.spawn(function() error('lost failure 43') end)\n"
          "resil.sleep(0)\n");
  resil_close(F);
  fflush(stderr);
  dup2(saved_err, 2);
  close(saved_err);
  char seen_err[4096] = "", seen_file[4096] = "";
  ssize_t got = pread(err_file, seen_err, sizeof seen_err - 1, 0);
  seen_err[got > 0 ? got : 0] = '\0';
  close(err_file);
  unlink(err_path);
  FILE *lf = fopen(log_path, "r");
  got = lf ? (ssize_t)fread(seen_file, 1, sizeof seen_file - 1, lf) : 0;
  seen_file[got > 0 ? got : 0] = '\0';
  if (lf) fclose(lf);
  unlink(log_path);
  check(contains(log_lines, "never joined") && contains(log_lines, "lost failure 42") &&
            contains(log_lines, "\"level\":\"error\"") && !contains(seen_err, "lost failure 42"),
        "a task that failed and was never joined is reported through resil_options.log (it went to stderr)");
  check(contains(seen_file, "never joined") && contains(seen_file, "lost failure 43") && !contains(seen_err, "lost failure 43"),
        "and into resil_options.log_file, at resil_close too (it went to stderr)");
  if (!contains(log_lines, "lost failure 42") || !contains(seen_file, "lost failure 43"))
    printf("# log: %.500s\n# file: %.500s\n# stderr: %.500s\n", log_lines, seen_file, seen_err);

  /* resil_step drives a run to completion */
  load(R, "mock:stop()\n");
  check(resil_load_string(R,
                          "local resil = require 'resil'\n"
                          "local a = resil.spawn(function() resil.sleep(5) return 2 end)\n"
                          "local b = resil.spawn(function() resil.sleep(1) return 3 end)\n"
                          "stepped = select(2, a:join()) * select(2, b:join())\n",
                          "=stepped") == RESIL_OK,
        "a run loads for stepping");
  int steps = 0, n;
  while ((n = resil_step(R, 100)) > 0 && steps < 1000) steps++;
  lua_State *L = resil_lua(R);
  lua_getglobal(L, "stepped");
  check(n == 0 && steps > 1 && lua_tointeger(L, -1) == 6, "resil_step runs it a turn at a time until no task is left");
  lua_pop(L, 1);
  check(resil_step(R, 0) == 0, "resil_step with nothing to do returns 0 at once");
  resil_load_string(R, "require('resil').sleep(1) error('late failure')", "=stepfail");
  while ((n = resil_step(R, 10)) > 0) {
  }
  check(n == -RESIL_ERR_SCRIPT && contains(resil_error(R), "stepfail:1: late failure"),
        "resil_step returns -RESIL_ERR_SCRIPT when the main task fails");

  /* (before: a sandboxed script's resil.log.output made and appended to a file anywhere the process
   * may write, and a refused or failed one still took the lines away from the program's callback) */
  char elsewhere[700];
  snprintf(elsewhere, sizeof elsewhere, "%s/../diverted-%d.log", dir, (int)getpid());
  load(R, "function divert(path)\n"
          "  local resil = require 'resil'\n"
          "  local ok, err = pcall(resil.log.output, path)\n"
          "  resil.log.warn('still the program\\'s')\n"
          "  return ok, tostring(err)\n"
          "end\n");
  char divert_args[800];
  snprintf(divert_args, sizeof divert_args, "[\"%s\"]", elsewhere);
  log_lines[0] = '\0';
  int diverted = call(R, "divert", divert_args);
  check(diverted == RESIL_OK && contains(result, "[false,") &&
            contains(result, "is outside the folders the sandbox may write in") && access(elsewhere, F_OK) != 0,
        "sandbox: resil.log.output to a file outside sandbox_dirs is refused, and no file is made");
  check(contains(log_lines, "still the program's"), "a refused resil.log.output leaves the lines with the log callback");
  unlink(elsewhere);
  resil_close(R);

  /* resil_call_async on the embedder's own event base, run by event_base_dispatch */
  struct event_base *base = event_base_new();
  resil_options ob = {0};
  ob.base = base;
  ob.policies_dir = dir;
  ob.log_level = "off";
  resil_t *RB = resil_open(&ob);
  async_seen seen = {0}, seen2 = {0};
  seen.base = seen2.base = base;
  seen.stop_after = 1;
  seen2.stop_after = 99;
  check(resil_call_async(RB, "policies.router.wait", "[0.02]", on_done, &seen) == RESIL_OK &&
            resil_call_async(RB, "policies.router.combine", "[1, 2]", on_done, &seen2) == RESIL_OK,
        "resil_call_async queues two calls");
  event_base_dispatch(base);
  check(seen.calls == 1 && seen.status == RESIL_OK && strcmp(seen.text, "[\"woke\"]") == 0 && seen2.calls == 1 &&
            strcmp(seen2.text, "[1002]") == 0,
        "the embedder's event_base_dispatch runs them and each callback fires once with the results");
  async_seen bad = {0};
  check(resil_call_async(RB, "nope", NULL, on_done, &bad) == RESIL_ERR_USAGE && bad.calls == 0,
        "a call refused at once returns its code and no callback");
  async_seen failing = {0};
  failing.base = base;
  failing.stop_after = 1;
  resil_call_async(RB, "policies.router.broken", NULL, on_done, &failing);
  event_base_dispatch(base);
  check(failing.calls == 1 && failing.status == RESIL_ERR_SCRIPT && strcmp(failing.text, "(null)") == 0 &&
            contains(resil_error(RB), "no route for this"),
        "a failing async call reports its status, with resil_error set");
  async_seen pending = {0};
  resil_call_async(RB, "policies.router.wait", "[3600]", on_done, &pending);
  resil_close(RB);
  check(pending.calls == 1 && pending.status == RESIL_ERR_INTERRUPT, "a call still running at resil_close hears RESIL_ERR_INTERRUPT");
  event_base_free(base);

  /* resil_call and resil_run from the program's own callback on the host's event base */
  base = event_base_new();
  ob.base = base;
  dispatched_host = resil_open(&ob);
  struct event *own_timer = evtimer_new(base, call_from_dispatch, base);
  struct timeval soon = {0, 1000};
  evtimer_add(own_timer, &soon);
  event_base_dispatch(base);
  check(dispatched_call_status == RESIL_ERR_USAGE && contains(dispatched_error, "event_base_dispatch") &&
            dispatched_run_status == RESIL_ERR_USAGE,
        "resil_call and resil_run from a callback of the program's own dispatch of the host's base are refused "
        "with RESIL_ERR_USAGE (they spun forever)");
  event_free(own_timer);
  resil_close(dispatched_host);
  event_base_free(base);

  /* resil_call_async under resil_step */
  ob.base = NULL;
  resil_t *RS = resil_open(&ob);
  async_seen stepped = {0};
  resil_call_async(RS, "policies.router.combine", "[7, 7]", on_done, &stepped);
  while (resil_step(RS, 100) > 0) {
  }
  check(stepped.calls == 1 && strcmp(stepped.text, "[7007]") == 0, "resil_step delivers async calls too");
  resil_close(RS);

  /* two threads, a host each */
  pthread_t threads[2];
  for (long i = 0; i < 2; i++) pthread_create(&threads[i], NULL, thread_main, (void *)(i + 1));
  long bad_results = 0;
  for (int i = 0; i < 2; i++) {
    void *r;
    pthread_join(threads[i], &r);
    bad_results += (long)r;
  }
  check(bad_results == 0, "two threads with a host each call a policy 200 times each and get their own results");

  /* ---------- the sandbox ---------- */
  char allowed[600];
  snprintf(allowed, sizeof allowed, "%s", dir);
  resil_options os = {0};
  os.policies_dir = dir;
  os.sandbox_dirs = allowed;
  os.log_level = "off";
  resil_t *SB = resil_open(&os);
  load(SB, "function try(code) return load(code)() end\n"
           "function try_bin() return load(string.dump(function() return 1 end)) end\n");
  static const struct {
    const char *code, *refusal;
  } refusals[] = {
    {"os.execute('true')", "os.execute is not allowed in the sandbox"},
    {"io.popen('ls')", "io.popen is not allowed in the sandbox"},
    {"os.exit(1)", "os.exit is not allowed in the sandbox"},
    {"os.remove('/tmp/x')", "os.remove is not allowed in the sandbox"},
    {"io.open('/etc/hostname')", "io.open(\"/etc/hostname\") is not allowed in the sandbox"},
    {"io.lines('/etc/hostname')", "io.lines(\"/etc/hostname\") is not allowed in the sandbox"},
    {"debug.getinfo(1)", "debug.getinfo is not allowed in the sandbox"},
    {"debug.sethook()", "debug.sethook is not allowed in the sandbox"},
    {"package.loadlib('x', 'y')", "package.loadlib is not allowed in the sandbox"},
    {"return package.cpath", "package.cpath is not allowed in the sandbox"},
    {"return package.searchers", "package.searchers is not allowed in the sandbox"},
    {"package.loaded.os = {}", "package.loaded[\"os\"] cannot be set in the sandbox"},
    {"require 'socket'", "require \"socket\" is not allowed in the sandbox"},
    {"require 'debug'", "require \"debug\" is not allowed in the sandbox"},
    {"load('return 1', 'x', 'b')", "load: binary chunks are not allowed in the sandbox"},
    {"dofile('/etc/hostname')", "dofile(\"/etc/hostname\") is not allowed in the sandbox"},
    {"collectgarbage('stop')", "collectgarbage(\"stop\") is not allowed in the sandbox"},
  };
  for (size_t i = 0; i < sizeof refusals / sizeof refusals[0]; i++) {
    char args[400], what[300];
    snprintf(args, sizeof args, "[\"%s\"]", refusals[i].code);
    /* JSON-escape the quotes of the snippet */
    char escaped[300];
    size_t k = 0;
    for (const char *p = refusals[i].code; *p && k < sizeof escaped - 3; p++) {
      if (*p == '"') escaped[k++] = '\\';
      escaped[k++] = *p;
    }
    escaped[k] = '\0';
    snprintf(args, sizeof args, "[\"%s\"]", escaped);
    snprintf(what, sizeof what, "sandbox: %s is refused, naming the function", refusals[i].code);
    int status = call(SB, "try", args);
    check(status == RESIL_ERR_SCRIPT && contains(resil_error(SB), refusals[i].refusal), what);
    if (status != RESIL_ERR_SCRIPT || !contains(resil_error(SB), refusals[i].refusal))
      printf("# got %d: %s\n", status, resil_error(SB));
  }
  check(call(SB, "try_bin", NULL) == RESIL_ERR_SCRIPT && contains(resil_error(SB), "load: binary chunks are not allowed"),
        "sandbox: load of a binary chunk is refused");
  char args[700];
  snprintf(args, sizeof args, "[\"local f = assert(io.open('%s/data.txt')) local s = f:read('l') f:close() return s\"]", dir);
  check(call(SB, "try", args) == RESIL_OK && strcmp(result, "[\"inside\"]") == 0, "sandbox: io.open inside sandbox_dirs works");
  check(call(SB, "try", "[\"return require('resil').version, os.time() > 0, string.rep('a', 2), require('policies.router').combine(1, 1)\"]") == RESIL_OK &&
            contains(result, "\"aa\",1001]"),
        "sandbox: resil, the safe libraries and the policies are there");
  check(call(SB, "try", "[\"return package.loaded.os == os, package.loaded.debug == nil, package.loaded['policies.router'] ~= nil\"]") == RESIL_OK &&
            strcmp(result, "[true,true,true]") == 0,
        "sandbox: package.loaded shows the sandbox's libraries and the policies, not the host's");
  check(call(SB, "try", "[\"local s = require('resil').sqlite.open(':memory:') return s ~= nil\"]") == RESIL_OK,
        "sandbox: the host's own modules keep working");
  snprintf(args, sizeof args, "[\"return require('resil').sqlite.open('%s/sub/in.db') ~= nil\"]", dir);
  check(call(SB, "try", args) == RESIL_OK && strcmp(result, "[true]") == 0,
        "sandbox: a SQLite file under sandbox_dirs (and its folder) is made");
  snprintf(args, sizeof args, "[\"return require('resil').sqlite.open('%s/../out-%d.db')\"]", dir, (int)getpid());
  check(call(SB, "try", args) == RESIL_ERR_SCRIPT && contains(resil_error(SB), "outside the folders the sandbox may write"),
        "sandbox: a SQLite file outside sandbox_dirs is refused");
  resil_close(SB);

  resil_options off = os;
  off.sandbox = RESIL_SANDBOX_OFF;
  resil_t *NS = resil_open(&off);
  load(NS, "function try(code) return load(code)() end\n");
  check(call(NS, "try", "[\"return type(os.execute), type(debug.getinfo)\"]") == RESIL_OK &&
            strcmp(result, "[\"function\",\"function\"]") == 0,
        "RESIL_SANDBOX_OFF gives the whole standard library");
  resil_close(NS);

  /* a call that never yields, stopped from another thread */
  resil_t *SP = resil_open(&(resil_options){.log_level = "off"});
  load(SP, "function spin() local n = 0 while true do n = n + 1 end end\n");
  pthread_t interrupter;
  pthread_create(&interrupter, NULL, interrupt_soon, SP);
  check(call(SP, "spin", NULL) == RESIL_ERR_INTERRUPT && strncmp(resil_error(SP), "setup:1: interrupted by signal 15", 33) == 0,
        "resil_interrupt from another thread stops a call that never yields, naming the line it stopped");
  if (strncmp(resil_error(SP), "setup:1: ", 9) != 0) printf("# got %.80s\n", resil_error(SP));
  pthread_join(interrupter, NULL);
  check(call(SP, "spin", "x") == RESIL_ERR_USAGE && call(SP, "tostring", "[\"next\"]") == RESIL_OK &&
            strcmp(result, "[\"next\"]") == 0,
        "and the host serves the next call");
  resil_close(SP);

  /* resil_close from a callback the host called: closed once control is back with the program */
  struct event_base *own = event_base_new();
  closed_in_callback = 0;
  resil_call_async(host_for_closing(own), "nap", NULL, close_when_done, NULL);
  event_base_dispatch(own);
  check(closed_in_callback == 1 && event_base_get_num_events(own, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE) == 0,
        "resil_close from a done callback on the program's own base: the host is gone, nothing of it left on the base");
  event_base_free(own);
  closed_in_callback = 0;
  resil_call_async(host_for_closing(NULL), "nap", NULL, close_when_done, NULL);
  int turns = 0, turn;
  while ((turn = resil_step(closing_host, 100)) > 0 && turns < 100) turns++;
  check(closed_in_callback == 1 && turn == 0, "resil_close from a done callback under resil_step: the step returns 0");
  check(call(host_for_closing(NULL), "close_me", NULL) == RESIL_OK && strcmp(result, "[\"after close\"]") == 0,
        "resil_close from a resil_register function: the call ends, then the host closes");
  closed_in_callback = 0;
  resil_call_async(host_for_closing(NULL), "nap", NULL, close_when_done, NULL);
  resil_close(closing_host);
  check(closed_in_callback == 1, "resil_close from the done callback of a call that resil_close interrupts: closed once");
  resil_call_async(host_for_closing(NULL), "nap", NULL, call_again, NULL);
  resil_close(closing_host); /* (a new call from its callback crashed the program: the Lua state was gone) */
  check(again_status == RESIL_ERR_USAGE && again_sync_status == RESIL_ERR_USAGE,
        "a call made from the done callback of a call that resil_close interrupts is refused with RESIL_ERR_USAGE");

  /* a program that set a locale with a decimal comma (setlocale(LC_ALL, "") in Germany) */
  char locales[] = "/tmp/resil-locale-XXXXXX", command[300];
  if (mkdtemp(locales)) {
    snprintf(command, sizeof command, "localedef -i de_DE -f UTF-8 %s/de_DE.UTF-8 > /dev/null 2>&1", locales);
    if (system(command) != 0) printf("# localedef could not make de_DE.UTF-8 (Debian: the locales package)\n");
    setenv("LOCPATH", locales, 1);
  }
  if (!setlocale(LC_ALL, "de_DE.UTF-8")) {
    printf("ok %d # SKIP no de_DE.UTF-8 locale\n", ++test_number);
  } else {
    const char *numbers = "local resil = require 'resil'\n"
                          "local wait = resil.metrics.histogram('wait_seconds', 'Wait', { buckets = { 0.5 } })\n"
                          "function observe(x)\n"
                          "  wait:observe(nil, x)\n"
                          "  return tostring(x), resil.metrics.text():match('wait_seconds_bucket{le=\"[^\"]*\"}')\n"
                          "end\n";
    resil_options lo = {0};
    lo.log_level = "off";
    resil_t *LC = resil_open(&lo);
    load(LC, numbers);
    check(call(LC, "observe", "[0.5]") == RESIL_OK && strcmp(result, "[\"0.5\",\"wait_seconds_bucket{le=\\\"0.5\\\"}\"]") == 0,
          "in a program's decimal-comma locale, Lua writes numbers with a point (tostring, the metrics' le=\"0.5\")");
    if (!contains(result, "0.5\\\"}")) printf("# got %s\n", result);
    char mine[16];
    snprintf(mine, sizeof mine, "%.1f", 0.5);
    check(strcmp(mine, "0,5") == 0, "and the program's own locale is its own again after the call");
    resil_close(LC);

    struct event_base *base = event_base_new();
    lo.base = base;
    LC = resil_open(&lo);
    load(LC, numbers);
    async_seen seen = {0};
    seen.base = base;
    seen.stop_after = 1;
    resil_call_async(LC, "observe", "[0.25]", on_done, &seen);
    event_base_dispatch(base);
    check(seen.calls == 1 && strcmp(seen.text, "[\"0.25\",\"wait_seconds_bucket{le=\\\"0.5\\\"}\"]") == 0,
          "likewise on the program's own event base (resil_call_async)");
    if (seen.calls != 1 || !contains(seen.text, "0.5\\\"}")) printf("# got %s\n", seen.text);
    snprintf(mine, sizeof mine, "%.1f", 0.5);
    check(strcmp(mine, "0,5") == 0, "and the program's locale is its own again once its loop ran the call");
    resil_close(LC);
    event_base_free(base);
    setlocale(LC_ALL, "C");
  }
  snprintf(command, sizeof command, "rm -rf %s", locales);
  if (system(command) != 0) printf("# could not remove %s\n", locales);

  /* a log file named relative to the working directory stays that file when the program changes
   * folder (a daemon's chdir("/")): each line looks at the path again, for logrotate, and a relative
   * path looked at from the new folder moved the lines to a new file there */
  {
    char here[700], there[700], first[800], second[800], old_cwd[4096];
    snprintf(here, sizeof here, "%s/cwd-a", dir);
    snprintf(there, sizeof there, "%s/cwd-b", dir);
    mkdir(here, 0755);
    mkdir(there, 0755);
    if (!getcwd(old_cwd, sizeof old_cwd) || chdir(here) != 0) printf("# chdir %s failed\n", here);
    resil_options ro = {0};
    ro.log_file = "app.log";
    resil_t *RL = resil_open(&ro);
    load(RL, "require('resil').log.info('line one')\n");
    if (chdir(there) != 0) printf("# chdir %s failed\n", there);
    load(RL, "require('resil').log.info('line two')\n");
    resil_close(RL);
    if (chdir(old_cwd) != 0) printf("# chdir back failed\n");
    snprintf(first, sizeof first, "%s/app.log", here);
    snprintf(second, sizeof second, "%s/app.log", there);
    char text[4096] = "";
    FILE *lf = fopen(first, "r");
    size_t n = lf ? fread(text, 1, sizeof text - 1, lf) : 0;
    text[n] = '\0';
    if (lf) fclose(lf);
    check(contains(text, "line one") && contains(text, "line two") && access(second, F_OK) != 0,
          "a relative log_file stays the file it named when the program changes its working directory");
    unlink(first);
    unlink(second);
    rmdir(here);
    rmdir(there);
  }

  char path[600];
  snprintf(path, sizeof path, "%s/router.lua", dir);
  unlink(path);
  snprintf(path, sizeof path, "%s/data.txt", dir);
  unlink(path);
  snprintf(path, sizeof path, "%s/sub/in.db", dir);
  unlink(path);
  snprintf(path, sizeof path, "%s/sub", dir);
  rmdir(path);
  rmdir(dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
