/*
 * embed_close_test.c: resil_close with work of the host's still going (a
 * step running, a request out), then a host opened again in the same
 * process on the same store, as a long-lived program that opens a host per
 * job does; on SQLite, then on a real redis-server started here (skipped, said so,
 * when there is none). Prints TAP lines; spec/run counts them.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hiredis.h>
#include <lauxlib.h>
#include <lua.h>
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
                             "  held = true\n"
                             "  resil.sleep(3600)\n"
                             "  t:settle(0.1)\n"
                             "end\n"
                             "function reserved() return resil.budget('team-a', { limit = 1 }):state().reserved end\n"
                             "function held_now() resil.sleep(0.01) return held == true end\n"
                             "function paid() return resil.step('paid', function() resil.host.mark() return 'p' end) end\n"
                             "function settle_paid()\n"
                             "  local t = assert(resil.budget('team-b', { limit = 1 }):reserve(0.4))\n"
                             "  resil.host.mark()\n"
                             "  assert(t:settle(0.3))\n"
                             "end\n"
                             "function spent_b()\n"
                             "  local s = resil.budget('team-b', { limit = 1 }):state()\n"
                             "  return s.spent, s.reserved\n"
                             "end\n"
                             "function once_paid()\n"
                             "  return resil.once('charge-8', function() resil.host.mark() return 'charged' end)\n"
                             "end\n"
                             "function reserve_c()\n"
                             "  local t = assert(resil.budget('team-c', { limit = 1 }):reserve(0.4))\n"
                             "  resumed_c = true\n"
                             "  t:settle(0.1)\n"
                             "end\n"
                             "function reserved_c() return resil.budget('team-c', { limit = 1 }):state().reserved end\n"
                             "function claim_d()\n"
                             "  return resil.once('charge-9', function() resil.host.mark() return 'by the closed host' end)\n"
                             "end\n"
                             "function claim_d_again()\n"
                             "  return resil.once({ key = 'charge-9', wait = 0.2 }, function() return 'charged' end)\n"
                             "end\n"
                             "function crowd(n)\n"
                             "  local s = resil.semaphore('crowd', { size = 10 })\n"
                             "  for i = 1, n do\n"
                             "    resil.spawn(function()\n"
                             "      assert(s:acquire())\n"
                             "      local t = assert(resil.budget('team-e', { limit = 100 }):reserve(0.25))\n"
                             "      resil.sleep(0.001 * (i % 7))\n"
                             "      s:release()\n"
                             "      resil.sleep(3600)\n"
                             "      t:settle(0.1)\n"
                             "    end)\n"
                             "  end\n"
                             "end\n"
                             "function reserved_e() return resil.budget('team-e', { limit = 100 }):state().reserved end\n"
                             "function br_shared()\n"
                             "  return resil.breaker('shared-br', { shared = true, window_type = 'count', window = 1,\n"
                             "    min_calls = 1, failure_rate = 0.5, open_for = 0.05, probe_timeout = 3600 })\n"
                             "end\n"
                             "function probe_open() br_shared():record(false, 0.01) resil.sleep(0.2) end\n"
                             "function probe_slow() return br_shared():call(function() probing = true resil.sleep(3600) end) end\n"
                             "function probe_free()\n"
                             "  local ok, p = br_shared():allow()\n"
                             "  if ok and p == 'probe' then br_shared():record(true, 0.01) end\n"
                             "  return ok == true, p\n"
                             "end\n"
                             "function once_paid_again()\n"
                             "  return resil.once({ key = 'charge-8', wait = 0.2 }, function() return 'charged again' end)\n"
                             "end\n";

/* resil.host.mark(): the step's fn ran (it has no way back into the host) */
static int fn_ran;
static int mark(lua_State *L) {
  (void)L;
  fn_ran = 1;
  return 0;
}

static resil_t *open_on(const char *store) {
  resil_options o = {0};
  o.log_level = "off";
  o.store = store;
  o.run_id = "job-1";
  resil_t *R = resil_open(&o);
  if (!R || resil_register(R, "mark", mark) != RESIL_OK || resil_load_string(R, policy, "=job") != RESIL_OK ||
      resil_run(R) != RESIL_OK)
    exit(2);
  return R;
}

static void check_on(const char *on, int ok, const char *what) {
  char named[600];
  snprintf(named, sizeof named, "%s: %s", on, what);
  check(ok, named);
}

/* a loopback port nobody listens on now */
static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  int port = -1;
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) close(fd);
  return port;
}

static int answers_on(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
  if (fd >= 0) close(fd);
  return ok;
}

/* redis-server on port, in the foreground of a child -> its pid, or -1 (as embed_redis_test.c) */
static pid_t start_redis(int port) {
  char port_s[16];
  snprintf(port_s, sizeof port_s, "%d", port);
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* (this test crashing leaves no server behind) */
    int null = open("/dev/null", O_WRONLY);
    dup2(null, 1), dup2(null, 2);
    execlp("redis-server", "redis-server", "--port", port_s, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", "/tmp", "--loglevel", "warning", (char *)NULL);
    _exit(127);
  }
  for (int i = 0; pid > 0 && i < 200; i++) {
    if (answers_on(port)) return pid;
    if (waitpid(pid, NULL, WNOHANG) == pid) return -1; /* (not installed, or refused to start) */
    usleep(25000);
  }
  if (pid > 0) kill(pid, SIGKILL), waitpid(pid, NULL, 0);
  return -1;
}

/* the state of resil.once key's record in the store, read beside the hosts ("" for none) */
static const char *once_state(const char *store, const char *key) {
  static char state[32];
  state[0] = '\0';
  int port;
  if (sscanf(store, "redis://127.0.0.1:%d", &port) == 1) {
    redisContext *rc = redisConnect("127.0.0.1", port);
    redisReply *r = rc && !rc->err ? redisCommand(rc, "HGET resil:once:%s state", key) : NULL;
    if (r && r->type == REDIS_REPLY_STRING) snprintf(state, sizeof state, "%s", r->str);
    if (r) freeReplyObject(r);
    if (rc) redisFree(rc);
    return state;
  }
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  if (sqlite3_open_v2(store, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
      sqlite3_prepare_v2(db, "SELECT state FROM idempotency WHERE key = ?", -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) snprintf(state, sizeof state, "%s", (const char *)sqlite3_column_text(st, 0));
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return state;
}

/* who holds the run id in the store, read beside the hosts ("" for nobody) */
static const char *run_owner(const char *store, const char *id) {
  static char holder[300];
  holder[0] = '\0';
  int port;
  if (sscanf(store, "redis://127.0.0.1:%d", &port) == 1) {
    redisContext *rc = redisConnect("127.0.0.1", port);
    redisReply *r = rc && !rc->err ? redisCommand(rc, "HGET resil:run:%s owner", id) : NULL;
    if (r && r->type == REDIS_REPLY_STRING) snprintf(holder, sizeof holder, "%s", r->str);
    if (r) freeReplyObject(r);
    if (rc) redisFree(rc);
    return holder;
  }
  sqlite3 *db = NULL;
  sqlite3_stmt *st = NULL;
  if (sqlite3_open_v2(store, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
      sqlite3_prepare_v2(db, "SELECT owner FROM runs WHERE id = ?", -1, &st, NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
      snprintf(holder, sizeof holder, "%s", (const char *)sqlite3_column_text(st, 0));
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return holder;
}

/* resil.run.started() of R, read from C between turns (no task runs it) */
static int run_started(resil_t *R) {
  lua_State *L = resil_lua(R);
  int started = 0;
  if (luaL_dostring(L, "return require('resil').run.started()") == LUA_OK) started = lua_toboolean(L, -1);
  lua_settop(L, 0);
  return started;
}

/* what = "SQLite" | "Redis": the checks' names say which */
static void scenario(const char *store, const char *on) {
  dones = 0, done_status = -1;

  /* a run whose steps all ended, its host closed: the next host of the process resumes it */
  resil_t *R = open_on(store);
  check_on(on, call(R, "quick", NULL) == RESIL_OK && strcmp(result, "[\"done\"]") == 0, "a step of the run job-1");
  resil_close(R);
  R = open_on(store);
  int again = call(R, "quick", NULL);
  check_on(on, again == RESIL_OK && strcmp(result, "[\"done\"]") == 0,
        "a host opened after resil_close takes the run the closed one had (it was refused run_held: 'held by "
        "pid <this process>', for as long as the process lived)");
  if (again != RESIL_OK) printf("# got %d: %.300s\n", again, result);

  /* a step still running at resil_close: its done hears the close; the run is given up all the same */
  resil_call_async(R, "slow", NULL, on_done, NULL);
  for (int i = 0; i < 5; i++) resil_step(R, 10);
  resil_close(R);
  check_on(on, dones == 1 && done_status == RESIL_ERR_INTERRUPT, "a step still running at resil_close: done hears RESIL_ERR_INTERRUPT");
  R = open_on(store);
  again = call(R, "quick", NULL);
  check_on(on, again == RESIL_OK && strcmp(result, "[\"done\"]") == 0 && !contains(result, "run_held"),
        "and a host opened after it takes the run (the step recorded as cut short: the run resumes)");
  if (again != RESIL_OK) printf("# got %d: %.300s\n", again, result);

  /* a resil.once key whose fn runs at resil_close: given up, as a fn that raised gives it up */
  resil_call_async(R, "once_slow", NULL, on_done, NULL);
  for (int i = 0; i < 5; i++) resil_step(R, 10);
  resil_close(R);
  R = open_on(store);
  again = call(R, "once_quick", NULL);
  check_on(on, again == RESIL_OK && strcmp(result, "[\"charged\"]") == 0,
        "a resil.once key whose fn ran at resil_close is free for the next host (it was in_progress, 'held by pid "
        "<this process>', for as long as the process lived)");
  if (again != RESIL_OK) printf("# got %d: %.300s\n", again, result);

  /* a budget's hold that a call still had at resil_close: given back, as a process's as it dies */
  resil_call_async(R, "hold", NULL, on_done, NULL);
  for (int i = 0; i < 5; i++) resil_step(R, 10);
  int held = 0; /* (the ticket the call has: its reservation's answer read) */
  for (int i = 0; i < 200 && !held; i++) held = call(R, "held_now", NULL) == RESIL_OK && strcmp(result, "[true]") == 0;
  held = held && call(R, "reserved", NULL) == RESIL_OK && strcmp(result, "[0.4]") == 0;
  resil_close(R);
  R = open_on(store);
  again = call(R, "reserved", NULL);
  check_on(on, held && again == RESIL_OK && strcmp(result, "[0]") == 0,
        "a budget's hold a call had at resil_close is given back (it counted 600 s more, the process alive)");
  if (again != RESIL_OK || strcmp(result, "[0]") != 0) printf("# got %d: %.300s\n", again, result);
  resil_close(R);

  /* a resil.once fn that ran (and was paid for), closed while the store takes its record: the
   * key is not given up, which made the next caller run fn, and pay, again; its record is written */
  R = open_on(store);
  fn_ran = 0;
  resil_call_async(R, "once_paid", NULL, on_done, NULL);
  for (int i = 0; i < 200 && !fn_ran; i++) resil_step(R, 10);
  resil_close(R);
  R = open_on(store);
  again = call(R, "once_paid_again", NULL);
  check_on(on, fn_ran && again == RESIL_OK && strcmp(result, "[\"charged\"]") == 0,
           "a resil.once fn that ran, closed before its record was stored: the next caller gets its result "
           "(its key was given up, and the next caller's fn ran, paid, again)");
  if (again != RESIL_OK || strcmp(result, "[\"charged\"]") != 0) printf("# got %d: %.300s\n", again, result);
  resil_close(R);

  /* a call's settle the store was taking at resil_close: written (its cost was paid), not lost
   * with the host, its hold counted until its end and the spend never */
  R = open_on(store);
  fn_ran = 0;
  resil_call_async(R, "settle_paid", NULL, on_done, NULL);
  for (int i = 0; i < 200 && !fn_ran; i++) resil_step(R, 10);
  resil_close(R);
  R = open_on(store);
  again = call(R, "spent_b", NULL);
  check_on(on, fn_ran && again == RESIL_OK && strcmp(result, "[0.3,0]") == 0,
           "a settle the store was taking at resil_close is written: the budget's spent counts it, no hold left "
           "(it was lost: spent 0, the 0.4 hold counted 600 s)");
  if (again != RESIL_OK || strcmp(result, "[0.3,0]") != 0) printf("# got %d: %.300s\n", again, result);
  resil_close(R);

  /* a reservation the store made (its answer in), closed before its task resumed: the task never
   * saw its ticket, so no settle or release; the hold is given back at close all the same. A second
   * host in the process watches the store: the first's task has not run since (its global) */
  R = open_on(store);
  resil_t *W = open_on(store);
  resil_call_async(R, "reserve_c", NULL, on_done, NULL);
  int made = 0, resumed = 0;
  for (int i = 0; i < 400 && !made; i++) {
    resil_step(R, 10);
    made = call(W, "reserved_c", NULL) == RESIL_OK && strcmp(result, "[0.4]") == 0;
  }
  lua_State *RL = resil_lua(R);
  resumed = lua_getglobal(RL, "resumed_c") != LUA_TNIL;
  lua_pop(RL, 1);
  resil_close(R);
  again = call(W, "reserved_c", NULL);
  check_on(on, made && !resumed && again == RESIL_OK && strcmp(result, "[0]") == 0,
           "a reservation made in the store, closed before its task resumed: its hold is given back at close "
           "(it counted 600 s more, the process alive)");
  if (!made || resumed || again != RESIL_OK || strcmp(result, "[0]") != 0)
    printf("# made %d resumed %d got %d: %.300s\n", made, resumed, again, result);
  resil_close(W);

  /* the same for a resil.once claim the store made: its fn never ran, and the key is free for the
   * next caller (in_progress, 'held by pid <this process>', for as long as the process lived) */
  R = open_on(store);
  fn_ran = 0;
  resil_call_async(R, "claim_d", NULL, on_done, NULL);
  made = 0;
  for (int i = 0; i < 400 && !made; i++) {
    resil_step(R, 10);
    made = strcmp(once_state(store, "charge-9"), "running") == 0;
  }
  int ran = fn_ran;
  resil_close(R);
  R = open_on(store);
  again = call(R, "claim_d_again", NULL);
  check_on(on, made && !ran && again == RESIL_OK && strcmp(result, "[\"charged\"]") == 0,
           "a resil.once claim made in the store, closed before its task resumed: the key is free for the next "
           "host (it was in_progress for as long as the process lived)");
  if (!made || ran || again != RESIL_OK || strcmp(result, "[\"charged\"]") != 0)
    printf("# made %d ran %d got %d: %.300s\n", made, ran, again, result);
  resil_close(R);

  /* the run itself, taken in the store for a task that never resumed to see it: given up too
   * (the next host was refused run_held, 'held by pid <this process>', for as long as it lived) */
  resil_close(open_on(store)); /* (nobody holds job-1 now) */
  R = open_on(store);
  resil_call_async(R, "quick", NULL, on_done, NULL);
  int taken = 0, seen_started = 0;
  for (int i = 0; i < 400 && !taken; i++) {
    resil_step(R, 10);
    seen_started = run_started(R);
    taken = run_owner(store, "job-1")[0] != '\0';
  }
  resil_close(R);
  R = open_on(store);
  again = call(R, "quick", NULL);
  check_on(on, taken && !seen_started && again == RESIL_OK && strcmp(result, "[\"done\"]") == 0,
           "a run taken in the store for a task that never resumed: given up at resil_close, the next host takes it "
           "(it was refused run_held for as long as the process lived)");
  if (!taken || seen_started || again != RESIL_OK) printf("# taken %d started %d got %d: %.300s\n", taken, seen_started, again, result);
  resil_close(R);

  /* a shared breaker's half-open probe a call had at resil_close: its slot is free for the next
   * caller (every process was refused, "open (shared)", until probe_timeout) */
  R = open_on(store);
  int opened = call(R, "probe_open", NULL) == RESIL_OK;
  resil_call_async(R, "probe_slow", NULL, on_done, NULL);
  int probing = 0;
  for (int i = 0; i < 200 && !probing; i++) {
    resil_step(R, 10);
    probing = lua_getglobal(resil_lua(R), "probing") != LUA_TNIL;
    lua_pop(resil_lua(R), 1);
  }
  resil_close(R);
  R = open_on(store);
  again = call(R, "probe_free", NULL);
  check_on(on, opened && probing && again == RESIL_OK && strcmp(result, "[true,\"probe\"]") == 0,
           "a shared breaker's probe a call had at resil_close is given back: the next caller probes (it was "
           "refused until probe_timeout)");
  if (!opened || !probing || again != RESIL_OK || strcmp(result, "[true,\"probe\"]") != 0)
    printf("# opened %d probing %d got %d: %.300s\n", opened, probing, again, result);
  resil_close(R);

  /* a bad day: 100 tasks through a bulkhead of 10, each holding a reservation, closed mid-way (tickets
   * held, reservations out or answered, permits granted to tasks not yet resumed): every hold is
   * given back, and the host closes without waking anyone */
  R = open_on(store);
  W = open_on(store);
  resil_call_async(R, "crowd", "[100]", on_done, NULL);
  double seen = 0;
  for (int i = 0; i < 2000 && seen < 10; i++) {
    resil_step(R, 2);
    if (i % 5 == 0 && call(W, "reserved_e", NULL) == RESIL_OK) seen = atof(result + 1);
  }
  resil_close(R);
  again = call(W, "reserved_e", NULL);
  check_on(on, seen >= 10 && again == RESIL_OK && strcmp(result, "[0]") == 0,
           "100 tasks holding permits and reservations at resil_close: every hold is given back");
  if (seen < 10 || again != RESIL_OK || strcmp(result, "[0]") != 0) printf("# seen %g got %d: %.300s\n", seen, again, result);
  resil_close(W);

  /* a step whose fn ran, closed while the store takes its result: the run says so, and the step's
   * record is written as the host closes (its fn paid: the next host would have run it again) */
  const char *cli = getenv("RESIL");
  if (strcmp(on, "SQLite") != 0 || !cli) return;
  R = open_on(store);
  call(R, "quick", NULL); /* (the run's first step, replayed: steps are counted in order) */
  fn_ran = 0;
  resil_call_async(R, "paid", NULL, on_done, NULL);
  for (int i = 0; i < 200 && !fn_ran; i++) resil_step(R, 10); /* (the turn fn ran in ends with it waiting) */
  resil_close(R);
  char cmd[1400], shown[4096] = "";
  snprintf(cmd, sizeof cmd, "'%s' runs --store '%s' show job-1 2>&1", cli, store);
  FILE *p = popen(cmd, "r");
  size_t got = p ? fread(shown, 1, sizeof shown - 1, p) : 0;
  shown[got] = '\0';
  if (p) pclose(p);
  check_on(on, fn_ran && contains(shown, "run job-1: interrupted") && contains(shown, "paid   done"),
           "a step whose fn ran, closed before its result was stored: the run is 'interrupted', the step's "
           "record written as the host closes (it said 'done', no trace of the step, which the next host ran again)");
  if (!contains(shown, "paid   done")) printf("# fn_ran %d dones %d status %d: %s\n", fn_ran, dones, done_status, shown);

  /* a step begun whose fn has not run yet, closed while its task waits for the step's record (the
   * run's take answered): the run is not done either (it said 'done', and the step never ran) */
  R = open_on(store);
  call(R, "quick", NULL);
  resil_close(R); /* (the run ended 'done': nothing in flight) */
  R = open_on(store);
  fn_ran = 0;
  resil_call_async(R, "paid", NULL, on_done, NULL);
  int started = 0;
  for (int i = 0; i < 400 && !started; i++) resil_step(R, 10), started = run_started(R);
  int paid_ran = fn_ran;
  resil_close(R);
  p = popen(cmd, "r");
  got = p ? fread(shown, 1, sizeof shown - 1, p) : 0;
  shown[got] = '\0';
  if (p) pclose(p);
  check_on(on, started && !paid_ran && contains(shown, "run job-1: interrupted"),
           "a step begun, closed before its fn ran (the run taken, its record asked for): the run is "
           "'interrupted' (it said 'done')");
  if (!started || paid_ran || !contains(shown, "run job-1: interrupted")) printf("# started %d fn_ran %d: %s\n", started, paid_ran, shown);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  char dir[] = "/tmp/resil-close-XXXXXX", store[600];
  if (!mkdtemp(dir)) return 1;
  snprintf(store, sizeof store, "%s/state.db", dir);
  scenario(store, "SQLite");
  char path[700];
  const char *files[] = {"state.db", "state.db-wal", "state.db-shm"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    unlink(path);
  }
  rmdir(dir);

  int port = free_port();
  pid_t redis = port > 0 ? start_redis(port) : -1;
  if (redis < 0) {
    printf("ok %d # SKIP no redis-server could be started here\n", ++test_number);
  } else {
    snprintf(store, sizeof store, "redis://127.0.0.1:%d/0", port);
    scenario(store, "Redis");
    kill(redis, SIGTERM);
    waitpid(redis, NULL, 0);
  }
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
