/*
 * embed_interrupt_test.c: resil_interrupt when no Lua runs, as a program
 * meets it: its own event base waiting for I/O, between resil_step calls,
 * after the thread that ran the host's loop has ended, and from another
 * thread while a server handler loops on the program's own event base. Prints TAP lines;
 * spec/run counts them. A hang (a task that loops, never stopped) ends the
 * program with a "not ok" line (alarm).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>
#include <lua.h>

#include "resil.h"
#include "tap.h"


static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

static const char *running = "?";
static void on_hang(int signo) {
  (void)signo;
  char line[400];
  int n = snprintf(line, sizeof line, "not ok %d - %s (hung: the task that loops was never stopped)\n1..%d\n",
                   test_number + 1, running, test_number + 1);
  if (n > 0) {
    ssize_t ignored = write(1, line, (size_t)n);
    (void)ignored;
  }
  _exit(1);
}

static resil_t *open_host(struct event_base *base) {
  resil_options o = {0};
  o.log_level = "off";
  o.base = base;
  resil_t *R = resil_open(&o);
  if (!R || resil_load_string(R,
                              "local resil = require 'resil'\n"
                              "function napspin(s) resil.sleep(s) while true do end end\n"
                              "function id(...) return ... end\n",
                              "=setup") != RESIL_OK || resil_run(R) != RESIL_OK)
    exit(2);
  return R;
}

/* ---- the program's own event base, waiting for I/O as another thread interrupts ---- */
static struct event_base *own;
static resil_t *target;
static int done_status = -1;
static char done_error[300];
static void on_done(void *ud, int status, const char *json) {
  (void)ud, (void)json;
  done_status = status;
  snprintf(done_error, sizeof done_error, "%s", status == RESIL_OK ? "" : resil_error(target));
  event_base_loopbreak(own);
}
static void *interrupt_soon(void *arg) {
  (void)arg;
  usleep(100000); /* the call sleeps 0.5 s: nothing runs now */
  resil_interrupt(target, SIGINT);
  return NULL;
}

/* ---- the host's loop on a thread of its own, which ends ---- */
static void *run_once(void *arg) {
  resil_t *R = arg;
  char *out = NULL;
  int st = resil_call(R, "id", "[1]", &out);
  free(out);
  return (void *)(long)st;
}

/* ---- a server handler without tasks on the program's own event base ---- */
static int server_port;
static void *ask_server(void *arg) {
  (void)arg;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)server_port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
    static const char req[] = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    ssize_t ignored = write(fd, req, sizeof req - 1);
    (void)ignored;
    char buf[256];
    while (read(fd, buf, sizeof buf) > 0) {
    }
  }
  if (fd >= 0) close(fd);
  return NULL;
}
static void *interrupt_later(void *arg) {
  (void)arg;
  usleep(300000); /* the handler loops by now */
  resil_interrupt(target, SIGINT);
  return NULL;
}
static void end_dispatch(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what, (void)arg;
  event_base_loopbreak(own);
}

/* ---- a thread that blocks every signal (a daemon's, whose own thread takes them with sigwait) ---- */
static int blocked_watchdog = -1, blocked_interrupted = -1, blocked_served = -1;
static char blocked_error[300];
static void *interrupt_blocked(void *arg) {
  usleep(300000); /* the call loops by now */
  resil_interrupt(arg, SIGTERM);
  return NULL;
}
static void *run_blocked(void *arg) {
  (void)arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  resil_t *R = open_host(NULL);
  char *out = NULL;
  resil_set_max_task_seconds(R, 0.2);
  blocked_watchdog = resil_call(R, "napspin", "[0]", &out);
  snprintf(blocked_error, sizeof blocked_error, "%s", resil_error(R));
  resil_set_max_task_seconds(R, 0);
  pthread_t stopper;
  pthread_create(&stopper, NULL, interrupt_blocked, R);
  blocked_interrupted = resil_call(R, "napspin", "[0]", &out);
  pthread_join(stopper, NULL);
  blocked_served = resil_call(R, "id", "[7]", &out) == RESIL_OK && out && strcmp(out, "[7]") == 0;
  free(out);
  sigset_t now;
  pthread_sigmask(SIG_BLOCK, NULL, &now);
  blocked_served = blocked_served && sigismember(&now, SIGURG) == 1; /* (the thread's mask is its own again) */
  resil_close(R);
  return NULL;
}

static void *dispatch_blocked(void *arg) {
  (void)arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  event_base_dispatch(own);
  return NULL;
}

/* another thread interrupts a server handler without tasks that loops, on the program's own
 * event base (a libevent callback of its dispatch, outside any turn of the host's) */
static void server_handler_loops(int blocked) {
  running = blocked ? "own event base dispatched by a thread that blocks every signal: resil_interrupt stops a server "
                      "handler that loops"
                    : "own event base: resil_interrupt from another thread stops a server handler that loops";
  alarm(20);
  own = event_base_new();
  resil_options so = {0};
  so.log_level = "off";
  so.base = own;
  target = resil_open(&so);
  if (!target || resil_load_string(target,
                                   "local resil = require 'resil'\n"
                                   "server = resil.server.listen({ port = 0, handler = function() while true do end end })\n",
                                   "=server") != RESIL_OK || resil_run(target) < 0)
    exit(2);
  lua_State *TL = resil_lua(target);
  lua_getglobal(TL, "server");
  lua_getfield(TL, -1, "port");
  lua_pushvalue(TL, -2);
  lua_call(TL, 1, 1);
  server_port = (int)lua_tointeger(TL, -1);
  lua_pop(TL, 2);
  pthread_t asker, stopper;
  if (pthread_create(&asker, NULL, ask_server, NULL) != 0 || pthread_create(&stopper, NULL, interrupt_later, NULL) != 0)
    exit(2);
  struct event *enough = evtimer_new(own, end_dispatch, NULL);
  struct timeval two = {2, 0};
  evtimer_add(enough, &two);
  if (blocked) { /* (the alarm still reaches this thread) */
    pthread_t dispatcher;
    if (pthread_create(&dispatcher, NULL, dispatch_blocked, NULL) != 0) exit(2);
    pthread_join(dispatcher, NULL);
  } else {
    event_base_dispatch(own);
  }
  pthread_join(stopper, NULL);
  check(1, running);
  event_free(enough);
  resil_close(target);
  pthread_join(asker, NULL);
  event_base_free(own);
  alarm(0);
}

int main(void) {
  signal(SIGALRM, on_hang);

  /* SIGURG held pending on the host's thread: the watchdog and resil_interrupt from another thread
   * never stopped a policy that looped, and the program never got its thread back */
  running = "a thread that blocks every signal: the watchdog and resil_interrupt stop a call that loops";
  alarm(20);
  pthread_t blocked;
  if (pthread_create(&blocked, NULL, run_blocked, NULL) != 0) return 2;
  pthread_join(blocked, NULL);
  alarm(0);
  check(blocked_watchdog == RESIL_ERR_SCRIPT && contains(blocked_error, "max-task-seconds"),
        "a thread that blocks every signal: the watchdog stops a call that loops (RESIL_ERR_SCRIPT)");
  check(blocked_interrupted == RESIL_ERR_INTERRUPT, "and resil_interrupt from another thread stops the next one");
  check(blocked_served == 1, "and the host serves the call after them, the thread's signal mask as it was");

  /* an interrupt while the program's event base waits (nothing runs): the call's task, resumed
   * after it, looped on unhooked and held the program's loop for good */
  running = "own event base: an interrupt while nothing runs stops the call's task once it resumes";
  alarm(20);
  own = event_base_new();
  target = open_host(own);
  resil_call_async(target, "napspin", "[0.5]", on_done, NULL);
  pthread_t t;
  if (pthread_create(&t, NULL, interrupt_soon, NULL) != 0) return 2;
  event_base_dispatch(own);
  pthread_join(t, NULL);
  check(done_status == RESIL_ERR_INTERRUPT && contains(done_error, "interrupted by signal 2"), running);
  if (done_status != RESIL_ERR_INTERRUPT) printf("# got %d: %.200s\n", done_status, done_error);
  done_status = -1;
  int queued = resil_call_async(target, "id", "[\"after\"]", on_done, NULL);
  if (queued == RESIL_OK) event_base_dispatch(own);
  check(queued == RESIL_OK && done_status == RESIL_OK, "own event base: the call after it runs");
  resil_close(target);
  event_base_free(own);
  alarm(0);

  /* resil_step after an interrupt between calls: the header's "returns RESIL_ERR_INTERRUPT and
   * runs nothing; the next one runs". It resumed the ready task unhooked (one that loops: for good) */
  running = "resil_step after an interrupt between calls returns -RESIL_ERR_INTERRUPT and runs nothing";
  alarm(20);
  resil_options o = {0};
  o.log_level = "off";
  resil_t *S = resil_open(&o);
  if (!S || resil_load_string(S, "ran = (ran or 0) + 1", "=step") != RESIL_OK) return 2;
  resil_interrupt(S, SIGINT);
  int stepped = resil_step(S, 0);
  lua_State *SL = resil_lua(S);
  lua_getglobal(SL, "ran");
  int ran_first = (int)lua_tointeger(SL, -1);
  lua_pop(SL, 1);
  check(stepped == -RESIL_ERR_INTERRUPT && contains(resil_error(S), "interrupted by signal 2") && ran_first == 0, running);
  if (stepped != -RESIL_ERR_INTERRUPT || ran_first) printf("# got %d (ran: %d): %.200s\n", stepped, ran_first, resil_error(S));
  int next = resil_step(S, 0);
  lua_getglobal(SL, "ran");
  int ran_next = (int)lua_tointeger(SL, -1);
  lua_pop(SL, 1);
  check(next == 0 && ran_next == 1, "and the next resil_step runs the task, once");
  if (next != 0 || ran_next != 1) printf("# got %d (ran: %d): %.200s\n", next, ran_next, resil_error(S));
  resil_close(S);
  alarm(0);

  /* the thread that ran the host's loop has ended (joined, its stack freed: one larger than
   * glibc's cache of stacks is unmapped at once): resil_interrupt from another thread sent the
   * loop's signal to that thread's freed descriptor (pthread_kill: SIGSEGV) */
  running = "resil_interrupt after the thread that ran the host's loop ended";
  alarm(20);
  resil_t *E = open_host(NULL);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, (size_t)256 << 20);
  void *ran = NULL;
  if (pthread_create(&t, &attr, run_once, E) != 0) return 2;
  pthread_join(t, &ran);
  pthread_attr_destroy(&attr);
  resil_interrupt(E, SIGINT); /* (this thread is not the one that ran the loop) */
  char *out = NULL;
  int after = resil_call(E, "id", "[2]", &out);
  check((long)ran == RESIL_OK && after == RESIL_ERR_INTERRUPT && contains(resil_error(E), "interrupted by signal 2"),
        "resil_interrupt after the thread that ran the host's loop ended: reported by the next call (it crashed)");
  free(out);
  out = NULL;
  check(resil_call(E, "id", "[3]", &out) == RESIL_OK && out && strcmp(out, "[3]") == 0, "and the call after it runs");
  free(out);
  resil_close(E);
  alarm(0);

  /* another thread interrupts a server handler without tasks that loops, on the program's own
   * event base (a libevent callback of its dispatch, outside any turn of the host's): the
   * signal's handler found no host on the thread, and nothing stopped it (fails until resil.c's
   * host_pcall points watchdog_host at the host while it runs) */
  server_handler_loops(0);
  server_handler_loops(1);

  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
