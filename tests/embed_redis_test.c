/*
 * embed_redis_test.c: a host with a Redis connection, on an event base the
 * program owns and runs on after resil_close. A real redis-server is started
 * here (skipped, said so, when there is none). Prints TAP; spec/run counts it.
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

#include <event2/event.h>

#include "resil.h"
#include "tap.h"


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

/* redis-server on port, in the foreground of a child -> its pid, or -1 */
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

static void on_enough(evutil_socket_t fd, short what, void *arg) { event_base_loopbreak(arg); }

/* the program's base runs for ms, its own timer ending it */
static void run_for(struct event_base *base, int ms) {
  struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
  struct event *enough = evtimer_new(base, on_enough, base);
  evtimer_add(enough, &tv);
  event_base_dispatch(base);
  event_free(enough);
}

static int calls_done;
static void on_call_done(void *ud, int status, const char *json_result) { calls_done++; }

/* A command in flight on a connection the script closed (conn:close: its
 * reply still to come there) when the program closes the host and runs its
 * base on: before, that connection's events and the command's deadline
 * stayed on the base and fired into the freed host when the reply came. */
static void closed_connection_outlives_nothing(int port) {
  struct event_base *base = event_base_new();
  resil_options o = {0};
  o.base = base;
  o.sandbox = RESIL_SANDBOX_OFF; /* (resil.redis.connect, a raw connection, is refused in the sandbox) */
  resil_t *R = resil_open(&o);
  char code[1024];
  snprintf(code, sizeof code,
           "local resil = require 'resil'\n"
           "resil.log.level('off')\n"
           "C = resil.redis.connect({ port = %d, timeout = 3 })\n"
           "function waits()\n"
           "  assert(C:call('PING'))\n"
           "  resil.spawn(function() resil.sleep(0.2) C:close() end)\n"
           "  return C:call('BLPOP', 'nothing-here', '1')\n" /* answered in 1 s, on the closed connection */
           "end\n",
           port);
  int loaded = resil_load_string(R, code, "=closed_connection") == RESIL_OK && resil_run(R) == RESIL_OK;
  check(loaded, "the script loads and runs");
  int started = loaded && resil_call_async(R, "waits", "[]", on_call_done, NULL) == RESIL_OK;
  run_for(base, 500); /* the PING answered, the connection closed, the BLPOP waiting on it */
  check(started && calls_done == 0, "the call waits for a reply on the connection its script closed");
  resil_close(R);
  check(calls_done == 1, "resil_close ends the call");
  run_for(base, 10); /* (what the close queued on the base runs) */
  int left = event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE);
  printf("# events left on the program's base after resil_close: %d\n", left);
  check(left == 0, "the closed host leaves no event on the program's base");
  run_for(base, 1500); /* the BLPOP's reply comes now; its deadline would at 3 s */
  check(1, "the program's base runs on past the reply without touching the closed host");
  event_base_free(base);
}

/* Inside namespaces of its own (main): the store's host name sent to a
 * resolver that answers its A query and never its AAAA one, the host closed
 * while libevent waits for the second (getaddrinfo-allow-skew, 0.5 s).
 * Before, the request was left and the resolver freed at once: the skew
 * timer then fired into the freed resolver and the freed host. */
static int resolving_at_close(void) {
  struct event_base *base = event_base_new();
  resil_options o = {0};
  o.base = base;
  o.sandbox = RESIL_SANDBOX_OFF; /* (resil.redis.connect, a raw connection, is refused in the sandbox) */
  resil_t *R = resil_open(&o);
  const char *code = "local resil = require 'resil'\n"
                     "resil.log.level('off')\n"
                     "C = resil.redis.connect({ host = 'redis.invalid-name.test', port = 6379, timeout = 3 })\n"
                     "function waits() return C:call('PING') end\n";
  int loaded = resil_load_string(R, code, "=resolving") == RESIL_OK && resil_run(R) == RESIL_OK;
  check(loaded, "the script loads and runs");
  int started = loaded && resil_call_async(R, "waits", "[]", on_call_done, NULL) == RESIL_OK;
  run_for(base, 300);
  check(started && calls_done == 0, "the call waits for the store's host name's IPv6 answer, which never comes");
  resil_close(R);
  check(calls_done == 1, "resil_close ends the call");
  run_for(base, 10); /* (the resolver is freed from a zero timeout, after its canceled request's callback) */
  int left = event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE);
  printf("# events left on the program's base after resil_close: %d\n", left);
  check(left == 0, "the closed host leaves no event on the program's base, its resolver freed");
  run_for(base, 3500); /* past the skew timer, the resolver's own timeout and the command's */
  check(1, "the program's base runs on past every timeout without touching the closed host");
  event_base_free(base);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}

/* The same program again (argv[1] dns) in a user, mount and network
 * namespace whose /etc/resolv.conf names a server on 127.0.0.1 that answers
 * only for IPv4 -> its exit status, or -1 when this machine cannot make one */
static int run_with_silent_resolver(void) {
  char dir[] = "/tmp/resil-embed-dns-XXXXXX";
  if (system("unshare -rmn true 2>/dev/null") != 0 || system("command -v python3 >/dev/null") != 0 || !mkdtemp(dir))
    return -1;
  char path[256], cmd[4096], self[1024];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return -1;
  self[n] = '\0';
  snprintf(path, sizeof path, "%s/resolv.conf", dir);
  FILE *f = fopen(path, "w");
  if (!f) return -1;
  fputs("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n", f);
  fclose(f);
  snprintf(path, sizeof path, "%s/silent.py", dir);
  f = fopen(path, "w");
  if (!f) return -1;
  /* A queries answered (127.0.0.1) at once, AAAA never: the resolver waits
   * for the other answer (its skew timer) when the host closes */
  fprintf(f, "import socket, struct\n"
             "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "u.bind(('127.0.0.1', 53))\n"
             "open('%s/ready', 'w').close()\n"
             "while True:\n"
             "    q, peer = u.recvfrom(512)\n"
             "    end = q.index(b'\\0', 12) + 5\n"
             "    if struct.unpack('>H', q[end - 4:end - 2])[0] != 1: continue\n"
             "    a = struct.pack('>HHHHHH', struct.unpack('>H', q[:2])[0], 0x8180, 1, 1, 0, 0) + q[12:end]\n"
             "    a += struct.pack('>HHHIH', 0xc00c, 1, 1, 60, 4) + socket.inet_aton('127.0.0.1')\n"
             "    u.sendto(a, peer)\n", dir);
  fclose(f);
  fflush(stdout);
  snprintf(cmd, sizeof cmd,
           "unshare -rmn sh -c 'ip link set lo up && mount --bind %s/resolv.conf /etc/resolv.conf && "
           "{ python3 %s/silent.py & } && while [ ! -e %s/ready ]; do sleep 0.05; done; "
           "%s dns; code=$?; kill $!; exit $code' > %s/out 2>&1; code=$?; sed 's/^/#   /' %s/out; rm -rf %s; "
           "exit $code",
           dir, dir, dir, self, dir, dir, dir);
  int st = system(cmd); /* (its TAP lines shown as comments: one line here counts them) */
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc > 1 && strcmp(argv[1], "dns") == 0) return resolving_at_close();
  int port = free_port();
  pid_t redis = port > 0 ? start_redis(port) : -1;
  if (redis < 0) {
    printf("ok 1 # SKIP no redis-server could be started here\n1..1\n");
    return 0;
  }
  closed_connection_outlives_nothing(port);
  kill(redis, SIGTERM);
  waitpid(redis, NULL, 0);
  /* (its TAP lines, numbered from 1, become one line here) */
  int dns = run_with_silent_resolver();
  if (dns < 0) printf("ok %d # SKIP unshare -rmn (or python3) cannot run here: no namespace for a silent resolver\n",
                      ++test_number);
  else check(dns == 0, "a host closed while its store's host name is being resolved (the lines above)");
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
