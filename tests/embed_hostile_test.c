/*
 * embed_hostile_test.c: the C API as a program uses it on a bad day: a
 * signal between calls, an interrupt on the program's own event base, JSON
 * that is not what the header promises. Prints TAP lines; spec/run counts
 * them.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <lua.h>

#include "resil.h"
#include "tap.h"


static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static char result[4096];
static int call(resil_t *R, const char *fn, const char *args) {
  char *out = NULL;
  int status = resil_call(R, fn, args, &out);
  snprintf(result, sizeof result, "%s", out ? out : "");
  free(out);
  return status;
}

static int host_nothing(lua_State *L) { return 0; }

/* resil.host.loader(): resil_load_string from inside a task -> its status */
static resil_t *loading_host;
static int host_loader(lua_State *L) {
  lua_pushinteger(L, resil_load_string(loading_host, "print('the second script ran')", "=second"));
  return 1;
}

static resil_t *open_host(struct event_base *base) {
  resil_options o = {0};
  o.log_level = "off";
  o.base = base;
  resil_t *R = resil_open(&o);
  if (!R || resil_load_string(R,
                              "local resil = require 'resil'\n"
                              "function id(...) return ... end\n"
                              "function spin() while true do end end\n"
                              "function nap(s) resil.sleep(s) end\n"
                              "function cut(s, n) return s:sub(1, n) end\n"
                              "function bytes(s) return s .. '\\xff', '\\xc3(' end\n",
                              "=setup") != RESIL_OK || resil_run(R) != RESIL_OK)
    exit(2);
  return R;
}

/* ---- the program's own event base ---- */
static struct event_base *own;
static int pending, spin_status = -1, later_status = -1;
static char later_text[200];
static void on_spin(void *ud, int status, const char *json) {
  spin_status = status;
  if (--pending == 0) event_base_loopbreak(own);
}
static void on_later(void *ud, int status, const char *json) {
  later_status = status;
  snprintf(later_text, sizeof later_text, "%s", json ? json : "");
  if (--pending == 0) event_base_loopbreak(own);
}
static void on_closed(void *ud, int status, const char *json) {
  later_status = status;
  snprintf(later_text, sizeof later_text, "%s", resil_error(ud));
}
static resil_t *alarmed;
static void on_alarm(int signo) { resil_interrupt(alarmed, signo); } /* async-signal-safe */
static void give_up(evutil_socket_t fd, short what, void *arg) { event_base_loopbreak(own); }

/* ---- resil_interrupt from another thread, as the header allows ---- */
static resil_t *hammered;
static atomic_int hammering;
static void *hammer(void *arg) {
  (void)arg;
  while (atomic_load(&hammering)) {
    resil_interrupt(hammered, SIGINT);
    usleep(50);
  }
  return NULL;
}

/* calls (coroutines, tasks) for `seconds` while another thread interrupts
 * every 50 us: each call ends OK or RESIL_ERR_INTERRUPT, never otherwise
 * (a hook set from the other thread walked the loop's Lua frames as they
 * changed: SIGSEGV, or a stray hook cut later calls as over a cap of 0) */
static long interrupted_elsewhere(int seconds, long *interrupted) {
  resil_options o = {0};
  o.log_level = "off";
  hammered = resil_open(&o);
  if (!hammered || resil_load_string(hammered,
                                     "local resil = require 'resil'\n"
                                     "function gen(n) local s = 0\n"
                                     "  for v in coroutine.wrap(function() for i = 1, n do coroutine.yield(i) end end) do s = s + v end\n"
                                     "  local ts = {} for i = 1, 3 do ts[i] = resil.spawn(function() return i end) end\n"
                                     "  for i = 1, 3 do ts[i]:join() end return s end\n",
                                     "=hammered") != RESIL_OK || resil_run(hammered) != RESIL_OK)
    return -1;
  atomic_store(&hammering, 1);
  pthread_t t;
  if (pthread_create(&t, NULL, hammer, NULL) != 0) return -1;
  long other = 0;
  *interrupted = 0;
  time_t end = time(NULL) + seconds;
  while (time(NULL) < end) {
    char *out = NULL;
    int st = resil_call(hammered, "gen", "[50]", &out);
    free(out);
    if (st == RESIL_ERR_INTERRUPT) (*interrupted)++;
    else if (st != RESIL_OK && other++ < 3) printf("# %d: %.200s\n", st, resil_error(hammered));
  }
  atomic_store(&hammering, 0);
  pthread_join(t, NULL);
  resil_close(hammered);
  return other;
}

static volatile sig_atomic_t program_urgs;
static void program_urg(int signo) { (void)signo; program_urgs++; }

int main(void) {
  /* the program's own SIGURG handler, set before the first host opens: still called after (the host's
   * handler, which resil_interrupt from another thread and the watchdog use, passes the signal on) */
  signal(SIGURG, program_urg);
  resil_t *R = open_host(NULL);
  raise(SIGURG);
  check(program_urgs == 1, "a SIGURG handler the program set before resil_open is still called after it");

  /* JSON in and out */
  check(call(R, "id", "{}") == RESIL_ERR_USAGE && contains(resil_error(R), "must be a JSON array") &&
            call(R, "id", "[]") == RESIL_OK && strcmp(result, "[]") == 0,
        "json_args {} (an object) is RESIL_ERR_USAGE as {\"a\": 1} is; [] is no arguments");
  check(call(R, "cut", "[\"h\xc3\xa9llo\", 2]") == RESIL_OK && strcmp(result, "[\"h\xef\xbf\xbd\"]") == 0,
        "a result string cut mid-character comes back as U+FFFD: the result is JSON (UTF-8)");
  check(call(R, "bytes", "[\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"]") == RESIL_OK &&
            strcmp(result, "[\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\xef\xbf\xbd\",\"\xef\xbf\xbd(\"]") == 0,
        "each byte that is not UTF-8 is one U+FFFD; valid text is kept byte for byte");
  if (!contains(result, "(\"]")) printf("# got %s\n", result);
  size_t many = 1100000;
  char *args = malloc(2 * many + 2), *p = args;
  if (!args) return 1;
  *p++ = '[';
  for (size_t i = 0; i < many; i++) *p++ = '0', *p++ = ',';
  p[-1] = ']', *p = '\0';
  int too_many = call(R, "id", args);
  check(too_many == RESIL_ERR_USAGE && contains(resil_error(R), "json_args has 1100000 elements"),
        "json_args with more elements than a Lua call can take is RESIL_ERR_USAGE, saying so (it raised "
        "'too many results to unpack' at [resil embed]:77)");
  if (too_many != RESIL_ERR_USAGE) printf("# got %d: %.200s\n", too_many, resil_error(R));
  free(args);
  check(call(R, "select", "[\"#\", 1, 2, 3]") == RESIL_OK && strcmp(result, "[3]") == 0, "and a few are counted as before");

  check(resil_register(R, "end", host_nothing) == RESIL_ERR_USAGE && resil_register(R, "function", host_nothing) ==
            RESIL_ERR_USAGE && resil_register(R, "end_", host_nothing) == RESIL_OK,
        "resil_register refuses a Lua reserved word (resil.host.end does not compile): it is no identifier");

  /* a signal between calls: the program's SIGINT handler called resil_interrupt while it did
   * something else */
  resil_interrupt(R, SIGINT);
  int first = call(R, "id", "[1]");
  check(first == RESIL_ERR_INTERRUPT && contains(resil_error(R), "interrupted by signal 2"),
        "an interrupt that came between calls: the next resil_call returns RESIL_ERR_INTERRUPT, nothing run");
  if (first != RESIL_ERR_INTERRUPT) printf("# got %d: %.200s\n", first, resil_error(R));
  int second = call(R, "id", "[2]"), third = call(R, "id", "[3]");
  check(second == RESIL_OK && strcmp(result, "[3]") == 0 && third == RESIL_OK,
        "reported once: the calls after it run (each was RESIL_ERR_SCRIPT, for good, until a resil_run)");
  if (second != RESIL_OK) printf("# got %d: %.200s\n", second, resil_error(R));
  resil_interrupt(R, SIGINT);
  check(resil_call_async(R, "id", "[4]", on_later, NULL) == RESIL_ERR_INTERRUPT && call(R, "id", "[5]") == RESIL_OK,
        "likewise resil_call_async: RESIL_ERR_INTERRUPT once, no callback, and the next call runs");

  resil_close(R);

  /* a call still running at resil_close: its done hears why, not what failed last */
  R = open_host(NULL);
  call(R, "no_such_function", NULL);
  later_status = -1;
  resil_call_async(R, "nap", "[3600]", on_closed, R);
  resil_close(R);
  check(later_status == RESIL_ERR_INTERRUPT && contains(later_text, "resil_close"),
        "a call still running at resil_close: done gets RESIL_ERR_INTERRUPT with resil_error saying the host closed "
        "(it said whatever had failed last)");
  if (!contains(later_text, "resil_close")) printf("# got %s\n", later_text);

  /* the program's own event base: an interrupt stops a call that loops; the calls after it run */
  own = event_base_new();
  R = open_host(own);
  struct event *guard = evtimer_new(own, give_up, NULL);
  struct timeval enough = {10, 0};
  pending = 1;
  resil_call_async(R, "spin", NULL, on_spin, NULL);
  evtimer_add(guard, &enough);
  alarmed = R;
  signal(SIGALRM, on_alarm);
  struct itimerval in_a_while = {{0, 0}, {0, 100000}};
  setitimer(ITIMER_REAL, &in_a_while, NULL);
  event_base_dispatch(own);
  check(spin_status == RESIL_ERR_INTERRUPT, "own event base: resil_interrupt stops a call that loops (done: RESIL_ERR_INTERRUPT)");
  pending = 1;
  int queued = resil_call_async(R, "id", "[\"after\"]", on_later, NULL);
  evtimer_add(guard, &enough);
  if (queued == RESIL_OK) event_base_dispatch(own);
  check(queued == RESIL_OK && later_status == RESIL_OK && strcmp(later_text, "[\"after\"]") == 0,
        "own event base: the calls after the interrupt run (each was refused, for good: nothing reported it)");
  if (queued != RESIL_OK) printf("# got %d: %.200s\n", queued, resil_error(R));
  event_free(guard);
  resil_close(R);
  event_base_free(own);

  /* a policy module that loops at load, under resil_call: its load runs outside any task, where
   * the watchdog times nothing (resil_call_async held the program's event loop too) */
  char dir[] = "/tmp/resil-hostile-XXXXXX", path[600];
  if (!mkdtemp(dir)) return 1;
  snprintf(path, sizeof path, "%s/looper.lua", dir);
  FILE *f = fopen(path, "w");
  if (!f) return 1;
  fputs("local n = 0\nwhile true do n = n + 1 end\nreturn { f = function() return 'loaded' end }\n", f);
  fclose(f);
  snprintf(path, sizeof path, "%s/starter.lua", dir);
  f = fopen(path, "w");
  if (!f) return 1;
  /* a refresher a policy starts at load, which runs long (more than the load's cap) between
   * its yields' counts */
  fputs("local resil = require 'resil'\nlocal M = { done = false }\n"
        "M.refresher = resil.spawn(function()\n"
        "  local n = 0\n"
        "  for i = 1, 6e7 do n = n + i if i % 1e6 == 0 then resil.sleep(0) end end\n"
        "  M.done = true\n"
        "end)\n"
        "function M.f() return 'loaded' end\n"
        "function M.wait() local ok, err = M.refresher:join() return M.done, err and tostring(err) or nil end\n"
        "return M\n",
        f);
  fclose(f);
  resil_options o = {0};
  o.log_level = "off";
  o.policies_dir = dir;
  R = resil_open(&o);
  resil_set_max_task_seconds(R, 0.5);
  alarmed = R; /* (without a cap the test ends, failed, rather than hanging) */
  /* the guard counts the process's CPU time, as the cap counts instructions: 5 s of wall time
   * interrupted the load before its 200,000,000 instructions on a busy machine under ASan */
  signal(SIGPROF, on_alarm);
  struct itimerval guard_cpu = {{0, 0}, {30, 0}}, off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_PROF, &guard_cpu, NULL);
  int looped = call(R, "policies.looper.f", NULL);
  setitimer(ITIMER_PROF, &off, NULL);
  check(looped == RESIL_ERR_SCRIPT && contains(resil_error(R), "looper.lua:2: ") &&
            contains(resil_error(R), "instructions as it loaded"),
        "resil_call of a module that loops at load ends with RESIL_ERR_SCRIPT at its file:line (it held the call "
        "for good; the watchdog does not time a load)");
  if (looped != RESIL_ERR_SCRIPT) printf("# got %d: %.200s\n", looped, resil_error(R));
  check(call(R, "policies.starter.f", NULL) == RESIL_OK && call(R, "policies.starter.wait", NULL) == RESIL_OK &&
            strcmp(result, "[true,null]") == 0,
        "a task a module starts at load is not cut by the load's cap (its thread had copied the load's hook)");
  if (strcmp(result, "[true,null]") != 0) printf("# got %.300s\n", result);
  int reloaded = resil_reload(R); /* (the same copy of a reload's hook, in loop.c, before this session) */
  check(reloaded == RESIL_OK && call(R, "policies.starter.wait", NULL) == RESIL_OK && strcmp(result, "[true,null]") == 0,
        "a task a policy starts at load in a hot reload (resil_reload) is not cut by the reload's cap");
  if (strcmp(result, "[true,null]") != 0) printf("# got %d %.300s\n", reloaded, result);
  resil_close(R);
  snprintf(path, sizeof path, "%s/looper.lua", dir);
  unlink(path);
  snprintf(path, sizeof path, "%s/starter.lua", dir);
  unlink(path);
  rmdir(dir);

  /* resil_load_file's own misuse: what and where, never Lua's panic */
  resil_options lo = {0};
  lo.log_level = "off";
  resil_t *L1 = resil_open(&lo);
  check(L1 && resil_load_file(L1, "/tmp", 0, NULL) == RESIL_ERR_FILE && contains(resil_error(L1), "/tmp"),
        "resil_load_file of a directory is RESIL_ERR_FILE naming it, as the header says (it was RESIL_ERR_SCRIPT)");
  char *no_args[] = {NULL};
  check(L1 && resil_load_file(L1, "-", -1, no_args) == RESIL_ERR_USAGE && contains(resil_error(L1), "argc"),
        "resil_load_file with argc < 0 is RESIL_ERR_USAGE (Lua panicked and aborted the process)");
  if (L1) resil_close(L1);
  lo.log_level = "verbose";
  resil_t *L2 = resil_open(&lo);
  check(L2 && contains(resil_error(L2), "log_level") && contains(resil_error(L2), "verbose"),
        "an unknown log_level is named in resil_error (it said \"bad argument #1 to '?'\")");
  if (L2) resil_close(L2);

  /* a bulkhead held across calls: each resil_call is a task of its own, which gives back what it holds as
   * it ends; a permit detached from it stays taken until a later call releases it by its token */
  lo.log_level = "off";
  resil_t *B = resil_open(&lo);
  int loaded = B && resil_load_string(B,
                                      "local resil = require 'resil'\n"
                                      "local s = resil.semaphore('bulkhead', { size = 1 })\n"
                                      "function enter() if s:try() then return s:detach() end return false end\n"
                                      "function leave(token) s:release(token) return true end\n",
                                      "=bulkhead") == RESIL_OK && resil_run(B) == RESIL_OK;
  int b_first = loaded && call(B, "enter", "[]") == RESIL_OK && strcmp(result, "[\"bulkhead#1\"]") == 0;
  int b_second = loaded && call(B, "enter", "[]") == RESIL_OK && strcmp(result, "[false]") == 0;
  int stray = loaded && call(B, "leave", "[]") == RESIL_ERR_SCRIPT && contains(resil_error(B), "holds none of its permits");
  int still = loaded && call(B, "enter", "[]") == RESIL_OK && strcmp(result, "[false]") == 0;
  int left = loaded && call(B, "leave", "[\"bulkhead#1\"]") == RESIL_OK;
  int twice = loaded && call(B, "leave", "[\"bulkhead#1\"]") == RESIL_ERR_SCRIPT;
  int again = loaded && call(B, "enter", "[]") == RESIL_OK && strcmp(result, "[\"bulkhead#2\"]") == 0;
  check(b_first && b_second && left && again,
        "a permit detached in one resil_call stays taken (the next is refused) until a later call releases it");
  check(stray && still && twice,
        "a release without the detached permit's token, or with it a second time, is refused and frees nothing (it "
        "took the detached permit: another caller got in while its holder still counted on it)");
  if (B) resil_close(B);

  /* errors that are tables: what the program reads of them is their fields, never an address */
  resil_t *E = resil_open(&lo);
  int defined = E && resil_load_string(E,
                                       "function raise_plain() error({ code = 42, reason = 'quota' }) end\n"
                                       "function fail_plain() return nil, { kind = 'quota', message = 'over by 3' } end\n"
                                       "function fail_fields() return nil, { code = 7 } end\n"
                                       "function fail_bad_tostring()\n"
                                       "  return nil, setmetatable({}, { __tostring = function() error('no') end })\n"
                                       "end\n"
                                       "function fail_secret()\n"
                                       "  return nil, { code = 7, password = 'hunter2', headers = { Authorization = 'Bearer sk-9' } }\n"
                                       "end\n",
                                       "=errors") == RESIL_OK && resil_run(E) == RESIL_OK;
  int raised = defined ? call(E, "raise_plain", NULL) : -1;
  check(raised == RESIL_ERR_SCRIPT && contains(resil_error(E), "\"code\":42") &&
            contains(resil_error(E), "\"reason\":\"quota\"") && contains(resil_error(E), "errors:1"),
        "a plain table raised (error{code = 42}): resil_error has its fields and the line (it said only "
        "'(error object is a table value)')");
  if (raised != RESIL_ERR_SCRIPT || !contains(resil_error(E), "42")) printf("# got %d: %.300s\n", raised, resil_error(E));
  int failed = defined ? call(E, "fail_plain", NULL) : -1;
  check(failed == RESIL_ERR_FAILED && contains(resil_error(E), "returned nil, quota: over by 3"),
        "nil, {kind =, message =} (a plain table) is 'fn (file:line) returned nil, kind: message' as the header "
        "says (it was 'table: 0x...')");
  if (failed != RESIL_ERR_FAILED || !contains(resil_error(E), "over by 3"))
    printf("# got %d: %.300s\n", failed, resil_error(E));
  failed = defined ? call(E, "fail_fields", NULL) : -1;
  check(failed == RESIL_ERR_FAILED && contains(resil_error(E), "returned nil, err: {\"code\":7}"),
        "nil, {code = 7}: its fields");
  if (failed != RESIL_ERR_FAILED || !contains(resil_error(E), "code")) printf("# got %d: %.300s\n", failed, resil_error(E));
  failed = defined ? call(E, "fail_secret", NULL) : -1;
  check(failed == RESIL_ERR_FAILED && contains(resil_error(E), "\"password\":\"[REDACTED]\"") &&
            !contains(resil_error(E), "hunter2") && !contains(resil_error(E), "sk-9"),
        "nil, {password =, headers = {Authorization =}}: its credential fields redacted, as a raised table's are "
        "(they reached the program whole)");
  if (failed != RESIL_ERR_FAILED || contains(resil_error(E), "hunter2")) printf("# got %d: %.300s\n", failed, resil_error(E));
  failed = defined ? call(E, "fail_bad_tostring", NULL) : -1;
  check(failed == RESIL_ERR_FAILED && contains(resil_error(E), "fail_bad_tostring (errors:4) returned nil"),
        "nil, err whose __tostring raises is still RESIL_ERR_FAILED naming the function (it was RESIL_ERR_SCRIPT, "
        "the __tostring's error as the call's)");
  if (failed != RESIL_ERR_FAILED) printf("# got %d: %.300s\n", failed, resil_error(E));
  if (E) resil_close(E);

  /* max_memory too small for the policies: the failure names the cap */
  resil_options mo = lo;
  mo.max_memory = 200000;
  resil_t *M = resil_open(&mo);
  int loaded_m = M ? resil_load_string(M, "require 'policies.ai'", "=small") : -1;
  int ran = loaded_m == RESIL_OK ? resil_run(M) : -1;
  check(ran == RESIL_ERR_SCRIPT && contains(resil_error(M), "not enough memory") &&
            contains(resil_error(M), "capped at 200000 bytes (resil_options.max_memory"),
        "max_memory too small to load the policies: resil_run's error names the cap (it said 'not enough memory', "
        "no more)");
  if (!contains(M ? resil_error(M) : NULL, "max_memory")) printf("# got %d: %.300s\n", ran, M ? resil_error(M) : "");
  int capped = M ? call(M, "policies.retry.decide", NULL) : -1;
  check(capped == RESIL_ERR_SCRIPT && contains(resil_error(M), "capped at 200000 bytes"),
        "and resil_call's, its module failing to load under the cap");
  if (!contains(M ? resil_error(M) : NULL, "max_memory")) printf("# got %d: %.300s\n", capped, M ? resil_error(M) : "");
  if (M) resil_close(M);

  /* a script loaded from a callback replaced the main task under way: resil_run said RESIL_OK of a
   * first script that raised */
  resil_options lho = {0};
  lho.log_level = "off";
  loading_host = resil_open(&lho);
  int registered = loading_host ? resil_register(loading_host, "loader", host_loader) : -1;
  int first_loaded = registered == RESIL_OK ? resil_load_string(loading_host,
      "local resil = require 'resil'\nLOADED = resil.host.loader()\nerror('the first script failed')\n", "=first") : -1;
  int first_run = first_loaded == RESIL_OK ? resil_run(loading_host) : -1;
  check(first_run == RESIL_ERR_SCRIPT && contains(resil_error(loading_host), "the first script failed"),
        "resil_load_string from inside a task is refused; the script under way fails as it did");
  if (first_run != RESIL_ERR_SCRIPT) printf("# got %d: %.300s\n", first_run, loading_host ? resil_error(loading_host) : "");
  if (loading_host) resil_close(loading_host);

  long interrupted = 0, other = interrupted_elsewhere(3, &interrupted);
  check(other == 0 && interrupted > 0,
        "resil_interrupt from another thread every 50 us: each call is OK or RESIL_ERR_INTERRUPT (it crashed, or "
        "left hooks that failed later calls)");

  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
