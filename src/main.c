/*
 * main.c: the resil-lua command, shaped like Lua's lua.c, and the first
 * client of the embedding API in resil.h.
 *
 *   resil-lua [options] script.lua [args...]
 *   resil-lua mock [scenario.lua] [--port N] [--host ADDR] [--metrics-addr A] [--metrics-file F]
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <sqlite3.h>

#include "host.h" /* sandbox_trust */
#include "resil.h"

#define PROGNAME "resil-lua"

/* The one C global: the host a signal handler interrupts (as lua.c does). */
static resil_t *signal_target;
static volatile sig_atomic_t received_signal;
/* in a gateway's worker: its pipe to the supervisor (start_worker), else -1 */
static int ready_fd = -1;

static void on_signal(int signo) {
  signal(signo, SIG_DFL); /* a second signal kills at once */
  received_signal = signo;
  if (signal_target) resil_interrupt(signal_target, signo);
}

/* The gateway stops gracefully: the first SIGTERM or SIGINT asks for a stop
 * (it stops accepting and finishes the requests in flight, whose answers and
 * ledger rows a cut would lose), the second interrupts as on_signal does,
 * still writing what the stores hold queued; a third kills at once. A stop
 * nobody waits for (the config still loading, a project's gateway.lua that
 * predates it) interrupts at once, as before. A repeat within a second is
 * the same stop told twice (systemd signals the whole group, whose
 * supervisor passes it on to its workers as well), not a second signal. */
static volatile sig_atomic_t stop_signals;
static double stop_first_at;
static pid_t supervisor_pid; /* in a gateway's worker: its supervisor's (fork_worker) */

/* one more stop signal: the first drains, the next interrupts */
static void stop_step(int signo, double at) {
  if (stop_signals++ == 0) {
    stop_first_at = at;
    received_signal = signo;
    if (ready_fd >= 0) { /* (a worker: its drain may be silent, the stores' last writes) */
      ssize_t n = write(ready_fd, "s", 1);
      (void)n;
    }
    if (signal_target && resil_request_stop(signal_target, signo)) return;
  }
  on_signal(signo);
}

/* A worker's supervisor counts the stop signals it gets and passes each on
 * with its rank (sigqueue, pass_on): the worker goes to that stage, however
 * soon after the first the second came (one within a second was taken for
 * the first told twice: the workers drained on). A signal from anyone
 * else is judged as before (systemd's to the whole group comes to a worker
 * from systemd and from its supervisor: counted once either way round). */
static void on_gateway_signal(int signo, siginfo_t *info, void *context) {
  (void)context;
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now); /* async-signal-safe */
  double at = (double)now.tv_sec + (double)now.tv_nsec / 1e9;
  if (supervisor_pid > 0 && info && info->si_code == SI_QUEUE && info->si_pid == supervisor_pid) {
    int rank = info->si_value.sival_int & 255, sent = info->si_value.sival_int >> 8;
    while (stop_signals < rank) stop_step(sent ? sent : signo, at); /* (pending together: the second may come first) */
    return;
  }
  /* its supervisor's death (PR_SET_PDEATHSIG: its pid, SI_USER; it passes on with SI_QUEUE only):
   * a stop, the first, not a second one in the middle of the drain */
  if (supervisor_pid > 0 && info && info->si_code == SI_USER && info->si_pid == supervisor_pid) {
    if (stop_signals == 0) stop_step(signo, at);
    return;
  }
  if (stop_signals == 1 && at - stop_first_at < 1.0) return;
  stop_step(signo, at);
}

static int is_subcommand(const char *s) {
  static const char *const names[] = {"mock", "runs", "costs", "budgets", "keys", "check", "gateway"};
  for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
    if (strcmp(s, names[k]) == 0) return 1;
  return 0;
}

static void usage(FILE *out) {
  fprintf(out,
          "usage: " PROGNAME " [options] [script [args...]]\n"
          "       " PROGNAME " mock [scenario.lua] [--port N] [--host ADDR] [--metrics-addr A] [--metrics-file F]\n"
          "       " PROGNAME " runs [show ID [--html FILE]] | forget ID | prune --older-than AGE [--dry-run]\n"
          "       " PROGNAME " costs [--by provider|model|user|day] [--since DATE|Nd] [--run ID] [--json|--csv]\n"
          "       " PROGNAME " budgets [--json] | show NAME [--json] | release NAME [--stale] | set NAME --limit USD [--per day|month|none]\n"
          "       " PROGNAME " gateway [--listen HOST:PORT] [--config FILE] [--workers N] [options]\n"
          "       " PROGNAME " keys add --name NAME [--budget USD[/day|/month]] [--rpm N] [--tpm N] [--concurrency N] [--models a,b] | list [--json] | revoke NAME|ID\n"
          "       " PROGNAME " check [--policies DIR] [files...] policy files and the model registry, without running\n"
          "Options:\n"
          "  -e CODE                 run CODE (before the script, if any)\n"
          "  -                       read the script from stdin\n"
          "  --                      stop handling options\n"
          "  --virtual-clock         start on the virtual clock (sleeps and timeouts are instant)\n"
          "  --max-instructions N    stop a task that runs N instructions without yielding\n"
          "  --max-task-seconds S    stop a task that runs S s of CPU without yielding (gateway: 5; 0: off)\n"
          "  --max-memory SIZE       cap the Lua state's memory (e.g. 64M, 1G)\n"
          "  --policies DIR          search DIR first for require \"policies.x\"\n"
          "  --watch                 reload policies when their files change (SIGHUP always reloads)\n"
          "  --listen HOST:PORT      gateway: the address it serves (default 127.0.0.1:8080; :PORT is loopback)\n"
          "  --config FILE           gateway: its config (models, auth, limits: README, Gateway)\n"
          "  --workers N             gateway: N processes on one port, sharing limits through the store\n"
          "  --worker-timeout S      gateway --workers: kill and replace a worker silent S s (default 30; 0: off)\n"
          "  --store PATH|URL        the store: a SQLite file (default .resil/state.db) or redis://host:port/db\n"
          "  --run ID                the run resil.step checkpoints into (default: from script and args)\n"
          "  --fresh                 start the run over, forgetting its checkpoints\n"
          "  --wait                  when another process holds the run, wait for it (default: stop)\n"
          "  --sandbox               run scripts and policies in the sandbox (no os.execute, io.popen, ...)\n"
          "  --sandbox-dir DIR       with --sandbox: a folder scripts may read and write files in (again for more)\n"
          "  --log-file PATH         append JSON log lines to PATH (default stderr)\n"
          "  --metrics-addr HOST:PORT  serve GET /metrics (Prometheus text) while the run lasts\n"
          "  --metrics-file PATH     write the metrics to PATH every 15 s and at exit (textfile collector)\n"
          "  --otlp-endpoint URL     export the run's spans as OTLP/HTTP JSON (URL or URL/v1/traces)\n"
          "  --log-level LEVEL       debug | info | warn | error | off\n"
          "  -v, --version           print the version\n"
          "  -h, --help              print this help\n");
}

/* (the argument with a URL's password and credential parameters redacted, as every message:
 * `--store=redis://:pw@host`, an option written with "=", was "unknown option" and its password
 * printed whole; no secret is registered yet, so the host is not needed) */
static int fail(const char *fmt, const char *arg) {
  char *shown = NULL;
  size_t n;
  if (arg && redact_text(NULL, arg, strlen(arg), REDACT_PARAMS, &shown, &n) < 0) arg = REDACT_MARK;
  fprintf(stderr, PROGNAME ": ");
  fprintf(stderr, fmt, shown ? shown : arg);
  fprintf(stderr, "\n");
  free(shown);
  return 1;
}

/* --policies DIR must be a folder: a misspelt one was searched for nothing, and the run
 * (or a gateway, or `check` in CI) went on with the shipped policies and registry, silently */
static int check_dir(const char *option, const char *dir) {
  struct stat sb;
  if (stat(dir, &sb) != 0) {
    fprintf(stderr, PROGNAME ": %s: %s is not a folder (%s)\n", option, dir, strerror(errno));
    return 1;
  }
  if (!S_ISDIR(sb.st_mode)) {
    fprintf(stderr, PROGNAME ": %s: %s is not a folder\n", option, dir);
    return 1;
  }
  return 0;
}
static int check_policies_dir(const char *dir) { return check_dir("--policies", dir); }

/* --sandbox-dir DIR (again for more): the folders a sandboxed script may read and write, as
 * resil_options.sandbox_dirs gives them to an embedder (a ':' list). Without it the command's
 * sandbox could read no file of the script's own (the demo's registry beside it), and the
 * refusal named a C option no command line reaches. -> 0 | 1 (said) */
static char *sandbox_dirs; /* (the process's: kept to its exit) */
static int add_sandbox_dir(char **dirs, const char *dir) {
  if (check_dir("--sandbox-dir", dir) != 0) return 1;
  if (strchr(dir, ':')) {
    fprintf(stderr, PROGNAME ": --sandbox-dir: %s: a folder with ':' in its name cannot be given\n", dir);
    return 1;
  }
  size_t had = *dirs ? strlen(*dirs) + 1 : 0;
  char *more = realloc(*dirs, had + strlen(dir) + 1);
  if (!more) return fail("%s", "out of memory");
  if (had) more[had - 1] = ':';
  strcpy(more + had, dir);
  *dirs = more;
  return 0;
}

/* "64M" -> bytes; at least 1 KiB, at most 1 PiB (a larger double would not
 * fit a size_t, and no machine has that much) */
static int parse_size(const char *s, size_t *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || !(v > 0)) return -1;
  switch (*end) {
  case 'k': case 'K': v *= 1024; end++; break;
  case 'm': case 'M': v *= 1024 * 1024; end++; break;
  case 'g': case 'G': v *= 1024.0 * 1024 * 1024; end++; break;
  default: break;
  }
  if (*end == 'B' || *end == 'b') end++;
  if (*end != '\0' || !(v >= 1024 && v <= 1125899906842624.0)) return -1;
  *out = (size_t)v;
  return 0;
}

/* a count for lua_sethook, which takes an int */
static int parse_count(const char *s, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v <= 0 || v > INT_MAX) return -1;
  *out = v;
  return 0;
}

/* the log file can be opened for appending (its folder exists, we may write).
 * A FIFO stays open (*held) until the host has opened it itself: closed
 * here, it ended its reader's input (`cat` leaves at that end), and the
 * host's open then found nobody reading it. */
static int check_log_file(const char *path, FILE **held) {
  FILE *f = log_sink_open_file(path);
  if (!f) {
    fprintf(stderr, PROGNAME ": --log-file: cannot open %s: %s\n", path, log_file_error(errno));
    return -1;
  }
  struct stat st;
  if (*held) fclose(*held), *held = NULL;
  if (fstat(fileno(f), &st) == 0 && S_ISFIFO(st.st_mode)) *held = f;
  else fclose(f);
  return 0;
}

/* what resil_open could not honour (a store URL of an unknown scheme) */
static int open_failed(resil_t *R) {
  if (!*resil_error(R)) return 0;
  fprintf(stderr, PROGNAME ": %s\n", resil_error(R));
  resil_close(R);
  return 1;
}

/* Many concurrent transfers need many descriptors: take what we may. */
static void raise_fd_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

static int report(resil_t *R, int status) {
  if (status == RESIL_OK) return 0;
  fprintf(stderr, PROGNAME ": %s\n", resil_error(R));
  return 1;
}


/* L stack: options -> nothing. require("resil.metrics")[fn](options), as the
 * operator's or the supervisor's (sandbox_trust: the files it names are
 * not a script's) -> 0 | -1 (reported) */
#define METRICS_FINISH "resil.main.metrics_finish" /* (registry) metrics.finish, as it was at start */
static int metrics_call(resil_t *R, const char *fn) {
  lua_State *L = resil_lua(R);
  int options = lua_gettop(L), rc = 0;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil.metrics");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_getfield(L, -1, fn) == LUA_TFUNCTION) {
    /* finish, taken now, before any script runs: the module is the scripts' to write (one that set
     * resil.metrics.finish skipped the last --metrics-file write) */
    if (lua_getfield(L, -2, "finish") == LUA_TFUNCTION) lua_setfield(L, LUA_REGISTRYINDEX, METRICS_FINISH);
    else lua_pop(L, 1);
    lua_pushvalue(L, options);
    sandbox_trust(R, 1);
    int status = lua_pcall(L, 1, 0, 0);
    sandbox_trust(R, 0);
    if (status != LUA_OK) {
      fprintf(stderr, PROGNAME ": %s\n", lua_tostring(L, -1));
      rc = -1;
    }
  }
  lua_settop(L, options - 1);
  return rc;
}

/* --metrics-addr / --metrics-file: GET /metrics and the textfile for the
 * life of the run (src/lua/metrics.lua). -> 0 | -1 (reported) */
static int export_metrics(resil_t *R, const char *addr, const char *file) {
  if (!addr && !file) return 0;
  lua_State *L = resil_lua(R);
  lua_createtable(L, 0, 2);
  if (addr) lua_pushstring(L, addr), lua_setfield(L, -2, "addr");
  if (file) lua_pushstring(L, file), lua_setfield(L, -2, "file");
  return metrics_call(R, "export");
}

/* gateway --workers N: the supervisor's folder for its workers' metrics
 * ("" without workers), and the slot of this worker (-1 in the supervisor) */
static char metrics_dir[PATH_MAX];
static long worker_slot = -1;

/* In a worker: its metrics written to the supervisor's folder, and every
 * scrape (GET /metrics, --metrics-addr, --metrics-file) answered with all
 * the workers' merged (src/lua/metrics.lua, metrics.shard). -> 0 | -1 (reported) */
static int shard_metrics(resil_t *R) {
  if (worker_slot < 0) return 0;
  lua_State *L = resil_lua(R);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, metrics_dir), lua_setfield(L, -2, "dir");
  lua_pushinteger(L, worker_slot), lua_setfield(L, -2, "slot");
  return metrics_call(R, "shard");
}

/* --otlp-endpoint URL: the run's spans exported as OTLP/HTTP JSON (src/lua/trace.lua) */
static int export_traces(resil_t *R, const char *url) {
  if (!url) return 0;
  lua_State *L = resil_lua(R);
  int top = lua_gettop(L), rc = 0;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil.trace");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_getfield(L, -1, "export") == LUA_TFUNCTION) {
    lua_createtable(L, 0, 1);
    lua_pushstring(L, url);
    lua_setfield(L, -2, "url");
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
      fprintf(stderr, PROGNAME ": --otlp-endpoint: %s\n", lua_tostring(L, -1));
      rc = -1;
    }
  } else {
    fprintf(stderr, PROGNAME ": --otlp-endpoint: %s\n", lua_tostring(L, -1));
    rc = -1;
  }
  lua_settop(L, top);
  return rc;
}

/* The run's root span ends and what is queued is sent: a last task on the
 * loop (HTTP needs it), after the script's. */
static void finish_traces(resil_t *R, const char *url, const char *status) {
  if (!url) return;
  char code[128];
  snprintf(code, sizeof code, "require('resil.trace').finish('%s')", status);
  if (resil_load_string(R, code, "=[trace export]") != RESIL_OK || resil_run(R) != RESIL_OK)
    fprintf(stderr, PROGNAME ": --otlp-endpoint: %s\n", resil_error(R));
}

/* the metrics file written a last time, with every count the run made */
static void finish_metrics(resil_t *R) {
  lua_State *L = resil_lua(R);
  int top = lua_gettop(L);
  if (lua_getfield(L, LUA_REGISTRYINDEX, METRICS_FINISH) != LUA_TFUNCTION) { /* (no --metrics-*: a script's export) */
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "resil.metrics");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK || lua_getfield(L, -1, "finish") != LUA_TFUNCTION) {
      lua_settop(L, top);
      return;
    }
  }
  if (lua_pcall(L, 0, 0, 0) != LUA_OK)
    fprintf(stderr, PROGNAME ": --metrics-file: %s\n", lua_tostring(L, -1));
  lua_settop(L, top);
}

/* (a scenario's mistake is one line, as a bad option's: it came with a traceback of this driver) */
static const char mock_driver[] =
  "local resil = require 'resil'\n"
  "local path, port, host = arg[1], tonumber(arg[2]), arg[3]\n"
  "local function fail(msg) io.stderr:write('resil-lua: ', tostring(msg), '\\n') os.exit(1) end\n"
  "local scenario = {}\n"
  "if path then\n"
  "  local chunk, err = loadfile(path)\n"
  "  if not chunk then fail(err) end\n"
  "  local ok, s = pcall(chunk)\n"
  "  if not ok then fail(s) end\n"
  "  scenario = s\n"
  "  if type(scenario) ~= 'table' then fail(path .. ': a scenario file must return a table') end\n"
  "end\n"
  "local ok, m, err = pcall(resil.mock.start, scenario, { port = port, host = host })\n"
  "if not ok then fail((path or 'the scenario') .. ': ' .. tostring(m):gsub('^mock:%d+: ', '')) end\n"
  "if not m then fail(err) end\n"
  "io.stdout:write(m.url, '\\n')\n"
  "io.stdout:flush()\n"
  "resil.sleep(math.huge)\n";

static int run_mock(int argc, char **argv) {
  const char *scenario = NULL, *port = "0", *host = "127.0.0.1", *metrics_addr = NULL, *metrics_file = NULL;
  for (int i = 0; i < argc; i++) {
    if (i + 1 == argc && (strcmp(argv[i], "--port") == 0 || strcmp(argv[i], "--host") == 0 ||
                          strcmp(argv[i], "--metrics-addr") == 0 || strcmp(argv[i], "--metrics-file") == 0))
      return fail("mock: option '%s' needs an argument", argv[i]);
    if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) port = argv[++i];
    else if (strcmp(argv[i], "--host") == 0 && i + 1 < argc) host = argv[++i];
    else if (strcmp(argv[i], "--metrics-addr") == 0 && i + 1 < argc) metrics_addr = argv[++i];
    else if (strcmp(argv[i], "--metrics-file") == 0 && i + 1 < argc) metrics_file = argv[++i];
    else if (argv[i][0] == '-') return fail("mock: unknown option '%s' (try --help)", argv[i]);
    else if (!scenario) scenario = argv[i];
    else return fail("mock: unexpected argument '%s'", argv[i]);
  }
  long port_number;
  if (strcmp(port, "0") != 0 && (parse_count(port, &port_number) != 0 || port_number > 65535))
    return fail("mock: bad port '%s'", port);
  resil_options mock_opts = {0};
  mock_opts.sandbox = RESIL_SANDBOX_OFF; /* the command's own script */
  resil_t *R = resil_open(&mock_opts);
  if (!R) return fail("%s", "cannot create the host");
  lua_State *L = resil_lua(R);
  lua_createtable(L, 3, 1);
  lua_pushliteral(L, "mock");
  lua_rawseti(L, -2, 0);
  if (scenario) lua_pushstring(L, scenario);
  else lua_pushnil(L);
  lua_rawseti(L, -2, 1);
  lua_pushstring(L, port);
  lua_rawseti(L, -2, 2);
  lua_pushstring(L, host);
  lua_rawseti(L, -2, 3);
  lua_setglobal(L, "arg");
  if (export_metrics(R, metrics_addr, metrics_file) != 0) {
    resil_close(R);
    return 1;
  }
  signal_target = R;
  /* a signal is how a mock ends: taken as a script's (130/143), so that its --metrics-file is
   * written a last time (killed where it stood, it kept its last 15-s write) */
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  /* a scenario file that loops at load (or a fault function that does) held the mock for good */
  R->stuck_exit = 1; /* a loop stuck outside Lua ends the mock (watchdog.c) */
  resil_set_max_task_seconds(R, 10);
  int status = resil_load_string(R, mock_driver, "=mock");
  if (status == RESIL_OK) status = resil_run(R);
  int code = status == RESIL_ERR_INTERRUPT ? 128 + (int)received_signal : report(R, status);
  finish_metrics(R);
  signal_target = NULL;
  resil_close(R);
  return code;
}

/* stdout a pipe or socket whose reader has left: an output longer than the
 * pipe holds failed mid-run (EPIPE then, its errno lost by the time of the
 * last flush, which has nothing left to write) */
static int reader_gone(void) {
  struct pollfd p = {.fd = STDOUT_FILENO, .events = POLLOUT};
  return poll(&p, 1, 0) == 1 && (p.revents & (POLLERR | POLLHUP));
}

/* RESIL_STORE, given to the host as --store is, so that a URL it refuses is refused
 * as the command starts (one line): read on first use, it was a command's traceback,
 * and a pipeline ran on with every step failing. Empty is unset (store.lua). */
static const char *env_store(void) {
  const char *env = getenv("RESIL_STORE");
  return env && *env ? env : NULL;
}

/* resil-lua runs|costs|budgets|keys [--store URL] args...: the store's subcommands */
static int run_command(const char *name, const char *chunk, int argc, char **argv) {
  resil_options opts = {0};
  opts.log_level = "warn";
  opts.sandbox = RESIL_SANDBOX_OFF;
  for (int i = 0; i < argc; i++) {
    if (strcmp(name, "check") == 0 && strcmp(argv[i], "--policies") == 0) { /* (check reads it too) */
      if (i + 1 >= argc) return fail("%s: --policies needs a folder", name);
      if (check_policies_dir(argv[i + 1]) != 0) return 1;
      opts.policies_dir = argv[i + 1];
    }
    if (strcmp(argv[i], "--store") != 0) continue;
    if (i + 1 >= argc) return fail("%s: --store needs a path or URL", name);
    opts.store = argv[i + 1];
  }
  if (!opts.store) opts.store = env_store();
  resil_t *R = resil_open(&opts);
  if (!R) return fail("%s", "cannot create the host");
  if (open_failed(R)) return 1;
  /* arg: the command's own arguments, without --store and its value */
  lua_State *L = resil_lua(R);
  lua_newtable(L);
  lua_pushstring(L, name);
  lua_rawseti(L, -2, 0);
  for (int i = 0, n = 0; i < argc; i++) {
    if (strcmp(argv[i], "--store") == 0) {
      i++;
      continue;
    }
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, ++n);
  }
  lua_setglobal(L, "arg");
  signal_target = R;
  int status = resil_load_string(R, chunk, "=[resil commands]");
  if (status == RESIL_OK) status = resil_run(R);
  int code = report(R, status);
  signal_target = NULL;
  resil_close(R);
  /* What it printed was cut (costs --csv > FILE on a full disk, > /dev/full): the exit status
   * said 0 over a CSV missing rows. A reader that left (| head) ends it as SIGPIPE would have,
   * silently: the host ignores SIGPIPE for its sockets. */
  errno = 0;
  int flushed = fflush(stdout) == 0, e = errno;
  if ((!flushed || ferror(stdout)) && code == 0) {
    if ((!flushed && e == EPIPE) || reader_gone()) return 128 + SIGPIPE;
    fprintf(stderr, PROGNAME ": %s: its output could not be written%s%s\n", name, flushed ? "" : ": ",
            flushed ? "" : strerror(e));
    code = 1;
  }
  return code;
}

/* --wait: a run held by another live process is waited for, not refused. */
static void wait_for_run(resil_t *R) {
  lua_State *L = resil_lua(R);
  int top = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_getfield(L, -1, "store_config") == LUA_TFUNCTION) {
    lua_createtable(L, 0, 1);
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "wait");
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) fprintf(stderr, PROGNAME ": --wait: %s\n", lua_tostring(L, -1));
  }
  lua_settop(L, top);
}

/* The config's chunk run where it cannot wait (called from C: not
 * yieldable), at start as at each reload. A reload runs it as
 * policies.gateway loads, outside any task, and never yields (no request
 * sees half a set of policies: docs/decisions.md), so a config that waited
 * (resil.sleep, a store's read, an HTTP call) started and then failed
 * every SIGHUP. It fails at start now, at its file:line, saying why. */
/* "file:line: " in msg, as Lua's positions read */
static int has_position(const char *msg) {
  for (const char *p = strchr(msg, ':'); p; p = strchr(p + 1, ':')) {
    const char *d = p + 1;
    if (*d < '0' || *d > '9') continue;
    while (*d >= '0' && *d <= '9') d++;
    if (d[0] == ':' && d[1] == ' ') return 1;
  }
  return 0;
}

/* A raise that names no line (error(msg, 0), a table raised, but not the host's errors, which say
 * where): the config's line it came from, found here where it was raised. Re-raised from C, it was
 * named by policies/gateway.lua's own line (a reload's "gateway.lua:2211: boom", the start's
 * "gateway.lua:2224: {...}"), the operator sent to the shipped file. */
static int config_error_where(lua_State *L) {
  int type = lua_type(L, 1);
  if (type == LUA_TSTRING && has_position(lua_tostring(L, 1))) return 0;
  if (type == LUA_TTABLE) {
    lua_pushliteral(L, "kind");
    int host_error = lua_rawget(L, 1) == LUA_TSTRING;
    lua_pop(L, 1);
    if (host_error) return 0;
  }
  lua_Debug ar;
  for (int level = 1; lua_getstack(L, level, &ar); level++) {
    if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0) continue;
    const char *text = resil_describe(L, 1);
    lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, text);
    lua_replace(L, 1);
    lua_settop(L, 1);
    return 1;
  }
  return 0;
}

static int config_error(lua_State *L) {
  config_error_where(L);
  const char *msg = lua_tostring(L, 1);
  if (msg && (strstr(msg, "must be called from a task") || strstr(msg, "attempt to yield"))) {
    lua_pushfstring(L, "%s (a gateway's config runs again at each policy reload, where nothing may wait: "
                       "wait in a task it starts, resil.spawn)", msg);
    return 1;
  }
  lua_settop(L, 1);
  return 1;
}

static int run_config(lua_State *L) {
  int n = lua_gettop(L);
  lua_pushcfunction(L, config_error);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_rotate(L, 1, 2);
  int status = lua_pcall(L, n, LUA_MULTRET, 1);
  /* (no handler runs for it, and it names nothing: the reload's log blamed policies/gateway.lua) */
  if (status == LUA_ERRMEM) lua_pushfstring(L, "%s: not enough memory", lua_tostring(L, lua_upvalueindex(2)));
  if (status != LUA_OK) return lua_error(L);
  return lua_gettop(L) - 1;
}

/* gateway --config FILE: the operator's, loaded as the main script is (text only under
 * --sandbox, in the scripts' environment, wherever it is: the sandbox's loadfile reads only
 * its folders) -> the chunk | nil, error. Loads that file only (a policy reload runs it again). */
static int load_config(lua_State *L) {
  const char *path = lua_tostring(L, lua_upvalueindex(1));
  int sandboxed = lua_toboolean(L, lua_upvalueindex(2));
  if (luaL_loadfilex(L, path, sandboxed ? "t" : NULL) == LUA_OK) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, run_config, 2);
    return 1;
  }
  if (strncmp(lua_tostring(L, -1), "attempt to load a binary chunk", 30) == 0)
    lua_pushfstring(L, "%s: binary chunks are not allowed in the sandbox", path);
  lua_pushnil(L);
  lua_insert(L, -2);
  return 2;
}

static int to_text(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* Steps that did not run, the store unavailable before their fn (locked, read-only, corrupt, Redis
 * down): the script went on with their nil, err and exited 0, as one whose work was all done, and
 * a cron job's failure went unseen. Said in one line. -> 1 (some did not run) | 0 */
static int steps_not_run(resil_t *R) {
  lua_State *L = resil_lua(R);
  int top = lua_gettop(L), some = 0;
  if (lua_getfield(L, LUA_REGISTRYINDEX, "resil.runs.not_run") == LUA_TFUNCTION && lua_pcall(L, 0, 3, 0) == LUA_OK) {
    lua_Integer n = lua_tointeger(L, -3);
    if (n > 0) {
      some = 1;
      fprintf(stderr, PROGNAME ": run %s: %lld step%s did not run, the store unavailable (%s); resume the run once it "
              "is back\n", lua_isstring(L, -2) ? lua_tostring(L, -2) : "?", (long long)n, n == 1 ? "" : "s",
              lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
    }
  }
  lua_settop(L, top);
  return some;
}

/* Record how the run ended, if the script used resil.step. Synchronous:
 * after an error or a signal, other tasks must not run again. */
static void finish_run(resil_t *R, int status) {
  lua_State *L = resil_lua(R);
  int top = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "resil");
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_getfield(L, -1, "run") == LUA_TTABLE &&
      lua_getfield(L, -1, "finish") == LUA_TFUNCTION) {
    lua_pushstring(L, status == RESIL_OK ? "done" : status == RESIL_ERR_INTERRUPT ? "interrupted" : "failed");
    /* and why it failed, which `runs show` says (it said "failed" and nothing else when the
     * error was outside any step: the script's own code, a divergence) */
    if (status != RESIL_OK && status != RESIL_ERR_INTERRUPT) lua_pushstring(L, resil_error(R));
    else lua_pushnil(L);
    /* -> true | nil, err, or it raised; an error value is a table: its
     * __tostring (protected) says what */
    int raised = lua_pcall(L, 2, 2, 0) != LUA_OK;
    if (raised || (lua_isnil(L, -2) && !lua_isnil(L, -1))) {
      lua_pushcfunction(L, to_text);
      lua_insert(L, -2);
      const char *why = lua_pcall(L, 1, 1, 0) == LUA_OK ? lua_tostring(L, -1) : NULL;
      fprintf(stderr, PROGNAME ": recording the run's end: %s\n", why ? why : "(an error without a message)");
    }
  }
  lua_settop(L, top);
}

/* the host of "HOST:PORT" or "[HOST]:PORT" (up to colon) is an IPv4 or IPv6 address */
static int numeric_host(const char *addr, const char *colon) {
  char host[256];
  const char *start = addr, *end = colon;
  if (*start == '[' && end > start && end[-1] == ']') start++, end--;
  if (end - start >= (long)sizeof host) return 0;
  memcpy(host, start, (size_t)(end - start));
  host[end - start] = '\0';
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_flags = AI_NUMERICHOST;
  if (getaddrinfo(host, NULL, &hints, &ai) != 0) return 0;
  freeaddrinfo(ai);
  return 1;
}

/* gateway --config FILE: one the gateway cannot open (a typo, a folder) is one line (its
 * syntax and its errors are the config's load's, with their file:line). -> 0 | 1 (said) */
static int check_config_file(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  int e = fd < 0 ? errno : fstat(fd, &st) != 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
  if (fd >= 0) close(fd);
  if (e) fprintf(stderr, PROGNAME ": gateway: --config: cannot open %s: %s\n", path, strerror(e));
  return e != 0;
}

/* gateway --config FILE that is itself policies.gateway, the first gateway.lua of the policy
 * folders (--policies DIR, then ./policies): the README's name for a config, kept where --watch
 * follows it. Loaded as the handler, the start said "a project's copy of policies/gateway.lua must
 * keep the shipped file's", of a copy never made. -> 0 | 1 (said) */
static int check_config_not_handler(const char *config, const char *policies_dir) {
  const char *dirs[] = {policies_dir, "policies"};
  struct stat cs, hs;
  if (stat(config, &cs) != 0) return 0;
  for (size_t k = 0; k < sizeof dirs / sizeof dirs[0]; k++) {
    char handler[PATH_MAX];
    if (!dirs[k] || snprintf(handler, sizeof handler, "%s/gateway.lua", dirs[k]) >= (int)sizeof handler) continue;
    if (stat(handler, &hs) != 0) continue;
    if (hs.st_dev != cs.st_dev || hs.st_ino != cs.st_ino) return 0; /* (the handler is another file) */
    fprintf(stderr,
            PROGNAME ": gateway: --config %s is policies.gateway too (a gateway.lua in the policy folder %s takes "
                     "the place of the gateway's handler, policies/gateway.lua): name the config otherwise, "
                     "gateway_config.lua say\n",
            config, dirs[k]);
    return 1;
  }
  return 0;
}

/* ---------- gateway --listen: the address must be free ---------- */

/* A gateway refuses an address another process already listens on. Its
 * workers share the port with SO_REUSEPORT, which lets any other process of
 * the same user join in (a second gateway, another config and keys): the
 * kernel then splits the connections between them without a word. Bound
 * without SO_REUSEPORT (SO_REUSEADDR kept: a port in TIME_WAIT from the last
 * run is free), this probe fails with EADDRINUSE while any socket listens
 * there, reuseport or not; it is closed before the workers bind. A --listen
 * the gateway will refuse anyway (malformed, a name, port 0: an ephemeral
 * port is free) is left to it. The workers' --metrics-addr is probed so
 * too (option: the option that named the address). -> 0, or 1 having said why */
static int check_gateway_address(const char *listen_at, const char *option) {
  char host[256];
  const char *colon = strrchr(listen_at, ':');
  if (!colon || colon == listen_at || colon - listen_at >= (long)sizeof host) return 0;
  const char *start = listen_at, *end = colon;
  if (*start == '[' && end[-1] == ']') start++, end--;
  memcpy(host, start, (size_t)(end - start));
  host[end - start] = '\0';
  const char *port = colon + 1;
  if (!*port || strlen(port) > 5 || strspn(port, "0123456789") != strlen(port) || atoi(port) == 0 ||
      atoi(port) > 65535)
    return 0;
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
  if (getaddrinfo(host, port, &hints, &ai) != 0 || !ai) return 0;
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, e = 0;
  if (fd >= 0 && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
                  bind(fd, ai->ai_addr, ai->ai_addrlen) != 0))
    e = errno;
  if (fd >= 0) close(fd);
  freeaddrinfo(ai);
  if (e == EADDRINUSE) {
    fprintf(stderr, PROGNAME ": gateway: cannot listen on %s: the address is in use (another gateway, or another "
                    "program, listens there; stop it or choose another %s)\n", listen_at, option);
    return 1;
  }
  if (e) { /* the workers would fail the same way, one after the other */
    fprintf(stderr, PROGNAME ": gateway: cannot listen on %s: %s\n", listen_at, strerror(e));
    return 1;
  }
  return 0;
}

/* "HOST:PORT", "[HOST]:PORT" or ":PORT" (loopback) -> host (a wildcard as ""), port; 0 if not one */
static int split_address(const char *addr, char *host, size_t size, long *port) {
  const char *colon = strrchr(addr, ':');
  if (!colon || !colon[1] || strspn(colon + 1, "0123456789") != strlen(colon + 1)) return 0;
  const char *start = addr, *end = colon;
  if (*start == '[' && end > start && end[-1] == ']') start++, end--;
  if ((size_t)(end - start) >= size) return 0;
  memcpy(host, start, (size_t)(end - start));
  host[end - start] = '\0';
  if (colon == addr) strcpy(host, "127.0.0.1");
  if (strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0 || strcmp(host, "*") == 0) host[0] = '\0';
  *port = atol(colon + 1);
  return 1;
}

/* --metrics-addr on the gateway's own --listen address: each worker listens
 * there twice (SO_REUSEPORT), and the kernel handed a share of the clients'
 * requests to the metrics server, a 404 each; without --workers the gateway
 * could not listen (a traceback). The gateway serves GET /metrics itself.
 * -> 0, or 1 having said why */
static int check_metrics_address(const char *listen_at, const char *metrics_addr) {
  char lhost[256], mhost[256];
  long lport, mport;
  if (!split_address(listen_at, lhost, sizeof lhost, &lport) ||
      !split_address(metrics_addr, mhost, sizeof mhost, &mport))
    return 0;
  if (lport == 0 || lport != mport || (lhost[0] && mhost[0] && strcmp(lhost, mhost) != 0)) return 0;
  fprintf(stderr, PROGNAME ": gateway: --metrics-addr %s is where the gateway listens (--listen %s), and it "
                  "serves GET /metrics there itself: leave --metrics-addr out, or give it another port\n",
          metrics_addr, listen_at);
  return 1;
}

/* ---------- gateway --workers N: a supervisor and its workers ---------- */

/* In a worker: the write end of its pipe to the supervisor, which reads
 * from it that the worker loads ('l': its gateway.lua says when it listens)
 * and then that it listens ('r'). A worker that dies between the two died
 * as it started, however long its load took (a config that raises after a
 * store's connect timeout was replaced at once, without end: one that took a
 * second or more to fail never counted as dying as it starts). */
#define SAID_LOADING 1
#define SAID_LISTENING 2
#define SAID_HEARD 4    /* a heartbeat ('h'): its loop turns */
#define SAID_STOPPING 8 /* 's': told to stop, it drains (its silence then is not judged) */
#define SAID_UNWATCHED 32 /* 'u': the host's own long work holds its loop (a migration), until its next word */

/* --worker-timeout: a worker whose loop has said nothing for this long (a
 * SIGSTOP, a C call blocked where the watchdog, which counts CPU time, sees
 * nothing) is killed and replaced; 0: never. Its loop says 'h' every
 * heartbeat_seconds() from a libevent timer, nothing on a request's path. */
static double worker_timeout = -1; /* -1: the default, set by main from --max-task-seconds */

static double heartbeat_seconds(void) { return worker_timeout / 4 < 1 ? worker_timeout / 4 : 1; }

static void heartbeat(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what, (void)arg;
  ssize_t n = write(ready_fd, "h", 1); /* (non-blocking: a supervisor that stopped reading loses some) */
  (void)n;
}

/* gateway.main's o.ready("loading" | "listening") */
static int worker_ready(lua_State *L) {
  const char *state = luaL_checkstring(L, 1);
  if (ready_fd >= 0) {
    ssize_t n = write(ready_fd, strcmp(state, "listening") == 0 ? "r" : "l", 1);
    (void)n; /* (the supervisor gone: nothing to tell) */
  }
  return 0;
}

static volatile sig_atomic_t supervisor_signal, supervisor_signals, supervisor_hup, supervisor_alarm;
static void supervisor_on_signal(int sig) {
  if (sig == SIGHUP) {
    supervisor_hup = 1;
  } else if (sig == SIGALRM) {
    supervisor_alarm = 1;
  } else if (sig != SIGCHLD) {
    if (!supervisor_signal) supervisor_signal = sig;
    supervisor_signals++; /* each is passed on: the second stops the workers at once, the third kills */
  }
}

static double seconds_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A stop signal to a worker, the supervisor's rank-th (on_gateway_signal).
 * The second goes as the other of SIGTERM and SIGINT: a standard signal
 * does not queue, sigqueue's neither, and one sent while the first was still
 * pending was dropped (the worker drained on). The third is SIGKILL. */
static void pass_on(pid_t pid, int sig, int rank) {
  if (rank >= 3) {
    kill(pid, SIGKILL);
    return;
  }
  union sigval v = {.sival_int = rank | sig << 8}; /* (the supervisor's own signal: the worker's exit code) */
  if (rank == 2) sig = sig == SIGTERM ? SIGINT : SIGTERM;
  if (sigqueue(pid, sig, v) != 0 && errno != ESRCH) kill(pid, sig);
}

/* Fork one worker: 0 in the worker (signals as they were), its pid in the
 * supervisor, -1 if fork failed. */
static pid_t fork_worker(const sigset_t *worker_mask) {
  pid_t supervisor = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* a supervisor killed with -9 takes its workers along */
    if (getppid() != supervisor) _exit(1); /* it died before that was set */
    supervisor_pid = supervisor;
    signal(SIGCHLD, SIG_DFL);
    signal(SIGALRM, SIG_DFL);
    signal(SIGPIPE, SIG_DFL); /* (the supervisor's SIG_IGN: the host sets its own, which exec does not keep) */
    /* a reload passed on before the worker's handler is set (main,
     * resil_reload_on_sighup) would kill it; it reads its config and
     * policies after that point anyway */
    signal(SIGHUP, SIG_IGN);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigprocmask(SIG_SETMASK, worker_mask, NULL);
  }
  return pid;
}

/* Worker w's slot: started (1), or fork failed (-1, its pid -1: tried again
 * when its due time comes); 0 in the new worker itself. The slot's pipe
 * (rfds[w], its read end, non-blocking) is made anew, what it said cleared;
 * without a pipe (none left) the worker is judged by its time alone. */
static int start_worker(pid_t *pids, double *started, int *rfds, unsigned char *said, long n, long w,
                        const sigset_t *worker_mask) {
  int fds[2] = {-1, -1};
  if (rfds[w] >= 0) close(rfds[w]);
  rfds[w] = -1, said[w] = 0;
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) fds[0] = fds[1] = -1;
  fflush(NULL);
  pid_t pid = fork_worker(worker_mask);
  if (pid == 0) {
    worker_slot = w;
    for (long k = 0; k < n; k++)
      if (rfds[k] >= 0) close(rfds[k]);
    if (fds[0] >= 0) close(fds[0]);
    ready_fd = fds[1]; /* (non-blocking: a heartbeat never holds the loop) */
    return 0;
  }
  if (fds[1] >= 0) close(fds[1]);
  if (pid < 0 && fds[0] >= 0) close(fds[0]), fds[0] = -1;
  rfds[w] = fds[0];
  pids[w] = pid < 0 ? -1 : pid;
  started[w] = seconds_now();
  return pid < 0 ? -1 : 1;
}

/* what each slot's worker has said on its pipe so far, and when it was
 * last heard (a pipe at its end, the worker gone: closed, as no pipe) */
static void read_said(int *rfds, unsigned char *said, double *heard, long n) {
  char buf[64];
  double now = seconds_now();
  for (long w = 0; w < n; w++) {
    ssize_t got;
    while (rfds[w] >= 0 && (got = read(rfds[w], buf, sizeof buf)) != 0) {
      if (got < 0) {
        if (errno == EINTR) continue;
        break;
      }
      heard[w] = now;
      for (ssize_t i = 0; i < got; i++) {
        if (buf[i] == 'u') { /* the host's own long work (unwatched) holds its loop until its next word */
          said[w] |= SAID_UNWATCHED;
          continue;
        }
        said[w] &= (unsigned char)~SAID_UNWATCHED;
        said[w] |= buf[i] == 'r' ? SAID_LISTENING : buf[i] == 'h' ? SAID_HEARD : buf[i] == 's' ? SAID_STOPPING
                                                                                                 : SAID_LOADING;
      }
    }
    if (rfds[w] >= 0 && got == 0) close(rfds[w]), rfds[w] = -1;
  }
}

/* every file in a folder, then the folder */
static void remove_folder(const char *dir) {
  DIR *d = opendir(dir);
  struct dirent *e;
  char path[PATH_MAX + 300];
  while (d && (e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    unlink(path);
  }
  if (d) closedir(d);
  rmdir(dir);
}

/* The folders of supervisors that are gone without removing theirs (killed
 * with -9): this user's, whose pid no longer runs. */
static void remove_stale_metrics_dirs(const char *tmp) {
  DIR *d = opendir(tmp);
  struct dirent *e;
  char path[PATH_MAX + 300];
  while (d && (e = readdir(d)) != NULL) {
    int pid = 0, end = 0;
    if (sscanf(e->d_name, "resil-lua-metrics-%d-%n", &pid, &end) != 1 || end == 0 || pid <= 0) continue;
    snprintf(path, sizeof path, "%s/%s", tmp, e->d_name);
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid()) continue;
    if (kill(pid, 0) == 0 || errno != ESRCH) continue;
    remove_folder(path);
  }
  if (d) closedir(d);
}

/* The folder the workers write their metrics to, made private (0700) under
 * $TMPDIR and named by this process. -> 0 | -1 (reported) */
static int make_metrics_dir(void) {
  const char *tmp = getenv("TMPDIR");
  if (!tmp || !*tmp) tmp = "/tmp";
  remove_stale_metrics_dirs(tmp);
  snprintf(metrics_dir, sizeof metrics_dir, "%s/resil-lua-metrics-%d-XXXXXX", tmp, (int)getpid());
  if (!mkdtemp(metrics_dir)) {
    fprintf(stderr, PROGNAME ": gateway: cannot make a folder for the workers' metrics in %s: %s\n", tmp,
            strerror(errno));
    metrics_dir[0] = '\0';
    return -1;
  }
  return 0;
}

/* A reaped worker's metrics file kept as a dead one's: its counts stay in
 * every later scrape's sums (a counter that went down would read as a
 * reset), its gauges leave them (src/lua/metrics.lua). */
static void keep_dead_metrics(long w, pid_t pid) {
  char from[PATH_MAX + 64], to[PATH_MAX + 64];
  snprintf(from, sizeof from, "%s/w-%ld-%d.prom", metrics_dir, w, (int)pid);
  snprintf(to, sizeof to, "%s/d-%ld-%d.prom", metrics_dir, w, (int)pid);
  rename(from, to);
  snprintf(from, sizeof from, "%s/w-%ld-%d.prom.%d.tmp", metrics_dir, w, (int)pid, (int)pid);
  unlink(from); /* (killed while it wrote) */
}

/* at the supervisor's exit, its workers all gone */
static void remove_metrics_dir(void) {
  if (metrics_dir[0]) remove_folder(metrics_dir);
}

/* Arm the alarm for the earliest due time of the vacant slots (pids -1), or
 * disarm it: each slot waits out its own delay (one alarm(delay) for all
 * moved a slot's restart whenever another slot set its own).
 * -> the number of vacant slots */
static int arm_for_vacant(const pid_t *pids, const double *due, long n) {
  int vacant = 0;
  double earliest = 0;
  for (long w = 0; w < n; w++)
    if (pids[w] == -1 && (vacant++ == 0 || due[w] < earliest)) earliest = due[w];
  struct itimerval at = {0};
  if (vacant) {
    double in = earliest - seconds_now();
    if (in < 0.001) in = 0.001; /* (a zero time would disarm it) */
    at.it_value.tv_sec = (time_t)in;
    at.it_value.tv_usec = (suseconds_t)((in - (double)at.it_value.tv_sec) * 1e6);
  }
  setitimer(ITIMER_REAL, &at, NULL);
  return vacant;
}

#define SAID_KILLED 16 /* (the supervisor's own mark: killed for its silence, not yet reaped) */

/* The CPU seconds the loop's thread of a worker (its main thread) has used; -1 if unknown. */
static double worker_loop_cpu(pid_t pid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/task/%d/stat", (int)pid, (int)pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t got = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (got <= 0) return -1;
  buf[got] = '\0';
  const char *p = strrchr(buf, ')'); /* (the name, in parentheses, may hold spaces) */
  unsigned long long utime, stime;
  /* after the name: the state, 5 numbers, 5 counts, then utime and stime (proc(5)) */
  if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2) return -1;
  long hz = sysconf(_SC_CLK_TCK);
  return (double)(utime + stime) / (double)(hz > 0 ? hz : 100);
}

/* A silent worker whose loop runs on the CPU is judged by its CPU time, as
 * the watchdog judges it: past --worker-timeout of wall time it is killed
 * only once its loop stands still (it used no CPU over a second: frozen, or
 * blocked in a C call) or has used --worker-timeout more of CPU time. On a
 * busy machine (or a container's CPU quota) a loop stuck in a pattern had
 * 30 s of wall time for the watchdog's 10.3 s of CPU and got a fifth of a
 * core: it was killed as silent, with no word of where it was stuck, before
 * the watchdog's own line (the default's promise). */
#define SILENT_LOOK_SECONDS 1.0
static double look_heard[256], look_at[256], look_cpu[256], look_mark[256];
static pid_t look_pid[256];

/* -> 1 if slot w's silent worker is still running on the CPU within its time */
static int silent_but_running(long w, pid_t pid, double heard, double now) {
  if (look_pid[w] != pid || look_heard[w] != heard) { /* the first look since it went silent */
    look_pid[w] = pid, look_heard[w] = heard, look_at[w] = now;
    look_cpu[w] = look_mark[w] = worker_loop_cpu(pid);
    return look_cpu[w] >= 0; /* (judged at the next look) */
  }
  if (now - look_at[w] < SILENT_LOOK_SECONDS) return look_cpu[w] >= 0;
  double cpu = worker_loop_cpu(pid);
  int ran = cpu >= 0 && look_cpu[w] >= 0 && cpu > look_cpu[w];
  look_at[w] = now, look_cpu[w] = cpu;
  return ran && cpu - look_mark[w] < worker_timeout;
}

/* A worker that has been heard (a heartbeat, or it listens) and is silent
 * past --worker-timeout is killed with SIGKILL: frozen (SIGSTOP) or blocked
 * in a C call, it holds the connections the kernel queued on its socket for
 * good, and the watchdog, which counts its CPU time, sees none. Not one that
 * drains ('s'): the stores' last writes come after its loop, and the second
 * signal stops a stuck drain. A live worker says 's' from its handler as the
 * stop is passed on; one frozen then never says it, and the gateway's stop
 * (systemd's, a deploy's) waited for it for good: it is judged as before,
 * killed and, the gateway stopping, not replaced. Reaped otherwise, it is
 * replaced as any dead worker is. */
static void kill_silent(const pid_t *pids, const int *rfds, unsigned char *said, const double *heard, long n) {
  if (!(worker_timeout > 0)) return;
  double now = seconds_now();
  for (long w = 0; w < n; w++) {
    if (pids[w] <= 0 || rfds[w] < 0 || !(said[w] & (SAID_HEARD | SAID_LISTENING)) ||
        (said[w] & (SAID_STOPPING | SAID_KILLED | SAID_UNWATCHED)) || now - heard[w] < worker_timeout ||
        silent_but_running(w, pids[w], heard[w], now))
      continue;
    fprintf(stderr,
            PROGNAME ": gateway: worker %d said nothing for %.1f s (--worker-timeout=%g: stopped, or stuck where "
            "the watchdog cannot stop it); killing it (SIGKILL)\n",
            (int)pids[w], now - heard[w], worker_timeout);
    kill(pids[w], SIGKILL);
    said[w] |= SAID_KILLED;
  }
}

/* Wait for a signal (as sigsuspend, with the handlers' mask) or a worker's
 * word on its pipe, looking at the silences at least every heartbeat. A wait
 * that ended far later than asked: the supervisor itself stood still (a
 * SIGSTOP of the whole group, a frozen container), its workers with it; what
 * they said meanwhile is not judged as silence. */
static void wait_for_workers(int *rfds, unsigned char *said, double *heard, long n, const sigset_t *mask) {
  struct pollfd fds[256];
  nfds_t k = 0;
  for (long w = 0; w < n; w++)
    if (rfds[w] >= 0) fds[k].fd = rfds[w], fds[k].events = POLLIN, k++;
  int judged = worker_timeout > 0;
  double wait = judged ? heartbeat_seconds() : 0, before = seconds_now();
  struct timespec at = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
  ppoll(fds, k, judged ? &at : NULL, mask);
  double now = seconds_now();
  if (judged && now - before > wait + worker_timeout / 2)
    for (long w = 0; w < n; w++)
      if (heard[w] < now) heard[w] = now;
  read_said(rfds, said, heard, n);
}

/* The process that started N workers on one SO_REUSEPORT socket serves none
 * itself: it forks them (before anything is opened: a store, a loop or
 * libcurl's threads do not survive fork) and starts another when one dies (a
 * crash, the OOM killer, kill -9), so the gateway keeps its N processes.
 * SIGTERM and SIGINT stop them all; SIGHUP is passed on (each reloads). A
 * worker that ends on its own is replaced whatever its exit code; one that
 * dies within a second of starting three times in a row (a bad config, a
 * port in use) stops the gateway with its exit code (1 for 0), unless
 * another has served for a second: then it is started again after a second,
 * then 2, 4, ... up to 60 while it keeps dying as it starts (each slot on its
 * own count and due time), or at once on a SIGHUP (the files fixed).
 * -> -1 in a worker (go on and serve), the exit code in the supervisor */
static int supervise_workers(long n) {
  pid_t pids[256];
  double started[256], due[256] = {0}; /* due: when a vacant slot is started again */
  int rfds[256]; /* each slot's pipe from its worker (start_worker) */
  unsigned char said[256] = {0};
  double heard[256] = {0}; /* when each slot's worker last said something */
  /* a worker started again (after a death) that has not said it listens yet: it reads the
   * policy files and the config as they are now, and once it listens the others are told to
   * reload, so that they serve what it serves. Files edited since the last reload, not
   * signalled yet, were served by the replacement alone, the others on the version before, each
   * request answered by one or the other until the next SIGHUP. */
  unsigned char replaced[256] = {0};
  for (long w = 0; w < n; w++) rfds[w] = -1;
  /* deaths in a row within a second of starting: the gateway's (any slot's)
   * decide that it cannot start; each slot's own set its backoff, so that
   * one slot's broken restarts do not lengthen another's */
  int quick_deaths = 0, slot_quick_deaths[256] = {0}, code = 0, passed_on = 0;
  sigset_t block, worker_mask;
  sigemptyset(&block);
  sigaddset(&block, SIGCHLD);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGHUP);
  sigaddset(&block, SIGALRM);
  sigprocmask(SIG_BLOCK, &block, &worker_mask);
  struct sigaction sa = {0};
  sa.sa_handler = supervisor_on_signal;
  sa.sa_mask = block; /* (a handler interrupted by another lost a count) */
  const int handled[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGALRM};
  for (size_t i = 0; i < sizeof handled / sizeof *handled; i++) sigaction(handled[i], &sa, NULL);
  /* its stderr's reader gone (a log shipper that died, `| head`): its line
   * about a dead worker raised SIGPIPE, which killed it (141) and, with it,
   * every worker; the line is lost instead (each worker sets its own again) */
  signal(SIGPIPE, SIG_IGN);
  for (long w = 0; w < n; w++) {
    int started_one = start_worker(pids, started, rfds, said, n, w, &worker_mask);
    if (started_one == 0) return -1;
    if (started_one < 0) {
      fprintf(stderr, PROGNAME ": gateway: fork: %s\n", strerror(errno));
      n = w; /* stop those started */
      supervisor_signal = SIGTERM;
      code = 1;
      break;
    }
  }
  int running = (int)n, vacant = 0; /* vacant: slots to start again when due (pids -1) */
  while (running > 0 || (vacant && !supervisor_signal)) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      read_said(rfds, said, heard, n); /* (what the dead one wrote is in its pipe still) */
      long w = 0;
      while (w < n && pids[w] != pid) w++;
      if (w == n) continue;
      keep_dead_metrics(w, pid);
      pids[w] = 0;
      running--;
      /* stopping; otherwise a worker that ended, even with 0 (a policy's
       * os.exit), left the gateway a process short: it is replaced */
      if (supervisor_signal) {
        /* (one killed as it drained took its requests in flight along: said, not replaced) */
        int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0; /* (not those it was sent: pass_on) */
        if (sig && sig != SIGTERM && sig != SIGINT && !(sig == SIGKILL && passed_on >= 3))
          fprintf(stderr, PROGNAME ": gateway: worker %d killed by signal %d as the gateway stopped\n", (int)pid, sig);
        continue;
      }
      double now = seconds_now();
      /* within a second of its start, or (a worker that says when it listens) before it listened */
      int quick = now - started[w] < 1.0 || (said[w] & (SAID_LOADING | SAID_LISTENING)) == SAID_LOADING;
      quick_deaths = quick ? quick_deaths + 1 : 0;
      int slot_quick = slot_quick_deaths[w] = quick ? slot_quick_deaths[w] + 1 : 0;
      /* Another worker serving for a second or more: the gateway is up. A
       * replacement that cannot start (a policy file saved broken, which
       * the running workers refused to reload, keeping the old version)
       * is tried again each second; stopping would take the serving ones
       * down with it. */
      int serving = 0;
      for (long k = 0; k < n; k++)
        if (k != w && pids[k] > 0 &&
            ((said[k] & SAID_LISTENING) || (!(said[k] & SAID_LOADING) && now - started[k] >= 1.0)))
          serving = 1;
      int give_up = quick_deaths >= 3 && !serving, later = slot_quick >= 3 && serving;
      /* each try that dies again waits twice as long, up to a minute: a
       * broken policy file printed its traceback every second for as long
       * as it stayed broken */
      unsigned delay = later ? 1u << (slot_quick - 3 < 6 ? slot_quick - 3 : 6) : 0;
      if (delay > 60) delay = 60;
      char when[48] = "";
      if (later) snprintf(when, sizeof when, delay == 1 ? " in a second" : " in %u seconds", delay);
      if (WIFSIGNALED(status))
        fprintf(stderr, PROGNAME ": gateway: worker %d killed by signal %d; starting another%s\n", (int)pid,
                WTERMSIG(status), when);
      else
        fprintf(stderr, PROGNAME ": gateway: worker %d exited with code %d%s%s\n", (int)pid, WEXITSTATUS(status),
                give_up ? "" : "; starting another", when);
      if (later) {
        pids[w] = -1; /* started again when due, as after a failed fork */
        due[w] = now + delay;
        vacant = arm_for_vacant(pids, due, n);
        continue;
      }
      if (give_up) {
        fprintf(stderr, PROGNAME ": gateway: workers keep dying as they start; stopping\n");
        code = WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status) : 1;
        supervisor_signal = SIGTERM;
        passed_on = supervisor_signals = 1; /* (a signal to the supervisor later is passed on as the second) */
        for (long k = 0; k < n; k++)
          if (pids[k] > 0) pass_on(pids[k], SIGTERM, 1);
        continue;
      }
      if (quick) { /* (signals let in meanwhile: two blocked for its time were one) */
        struct timespec pause = {0, 200 * 1000 * 1000};
        ppoll(NULL, 0, &pause, &worker_mask);
      }
      int again = start_worker(pids, started, rfds, said, n, w, &worker_mask);
      if (again == 0) return -1;
      if (again > 0) {
        running++;
        replaced[w] = 1;
      } else { /* without a retry, the gateway would stay a worker short for good */
        fprintf(stderr, PROGNAME ": gateway: fork: %s; trying again in a second\n", strerror(errno));
        due[w] = seconds_now() + 1;
        vacant = arm_for_vacant(pids, due, n);
      }
    }
    if (supervisor_alarm) {
      supervisor_alarm = 0;
      double now = seconds_now();
      for (long w = 0; w < n && !supervisor_signal; w++) {
        if (pids[w] != -1 || due[w] > now) continue; /* (the others' alarm is armed below) */
        int again = start_worker(pids, started, rfds, said, n, w, &worker_mask);
        if (again == 0) return -1;
        if (again > 0)
          running++, replaced[w] = 1;
        else
          due[w] = seconds_now() + 1;
      }
      vacant = arm_for_vacant(pids, due, n);
    }
    for (long w = 0; w < n && !supervisor_signal; w++) {
      if (!replaced[w] || pids[w] <= 0 || !(said[w] & SAID_LISTENING)) continue;
      replaced[w] = 0;
      for (long k = 0; k < n; k++)
        if (k != w && pids[k] > 0) kill(pids[k], SIGHUP);
    }
    if (supervisor_hup) {
      supervisor_hup = 0;
      for (long w = 0; w < n; w++)
        if (pids[w] > 0) kill(pids[w], SIGHUP);
      /* a reload says the files were changed: a worker waiting out its
       * backoff (up to a minute, its policy file saved broken) is tried at
       * once, not after the gateway stayed a worker short that long */
      if (vacant && !supervisor_signal) {
        for (long w = 0; w < n; w++)
          if (pids[w] == -1) due[w] = 0;
        supervisor_alarm = 1;
        continue;
      }
    }
    /* each stop signal passed on, with its rank: two that came together are two */
    while (supervisor_signal && passed_on < supervisor_signals) {
      passed_on++;
      for (long w = 0; w < n; w++)
        if (pids[w] > 0) pass_on(pids[w], supervisor_signal, passed_on);
      if (!code) code = 128 + (int)supervisor_signal;
    }
    if (running > 0 || (vacant && !supervisor_signal)) {
      wait_for_workers(rfds, said, heard, n, &worker_mask);
      kill_silent(pids, rfds, said, heard, n);
    }
  }
  return code;
}

int main(int argc, char **argv) {
  resil_options opts = {0};
  opts.sandbox = RESIL_SANDBOX_OFF; /* the sandbox is for embedders and --sandbox */
  const char *codes[64];
  int ncodes = 0, i = 1, watch = 0, wait = 0;
  const char *metrics_addr = NULL, *metrics_file = NULL, *otlp_endpoint = NULL;
  FILE *held_log = NULL; /* a FIFO named by --log-file, kept open until the host opens it (check_log_file) */

  /* No SQLite memory statistics (nothing here reads them): with them every
   * allocation SQLite makes takes a global mutex and counts, some 13 a ledger
   * row (Debian's build has no lookaside). Only the program sets it: SQLite's
   * configuration is the whole process's, an embedder's own to choose. */
  sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
  /* `resil-lua check --help`: the usage, which has the subcommands' lines (it was "unknown
   * option '-h'", and the mock's said "unknown option '--help' (try --help)") */
  if (argc > 2 && is_subcommand(argv[1]) && strcmp(argv[1], "gateway") != 0)
    for (int k = 2; k < argc && strcmp(argv[k], "--") != 0; k++)
      if (strcmp(argv[k], "-h") == 0 || strcmp(argv[k], "--help") == 0) {
        usage(stdout);
        return 0;
      }
  if (argc > 1 && strcmp(argv[1], "mock") == 0) return run_mock(argc - 2, argv + 2);
  if (argc > 1 && (strcmp(argv[1], "runs") == 0 || strcmp(argv[1], "costs") == 0 || strcmp(argv[1], "budgets") == 0))
    return run_command(argv[1], "require('resil.commands')(arg)", argc - 2, argv + 2);
  if (argc > 1 && strcmp(argv[1], "keys") == 0)
    return run_command("keys", "require('resil.keys').main(arg)", argc - 2, argv + 2);
  if (argc > 1 && strcmp(argv[1], "check") == 0)
    return run_command("check", "require('resil.check')(arg)", argc - 2, argv + 2);
  /* A SIGHUP asks for a reload, which the host sets up once it is open
   * (resil_reload_on_sighup): one that came before, while it opened, killed
   * the process (a deploy's reload right after a start). Ignored until then:
   * what loads next reads the files as they are now. */
  signal(SIGHUP, SIG_IGN);
  /* the gateway: the usual options, plus its own, and policies.gateway for a script */
  int gateway = argc > 1 && strcmp(argv[1], "gateway") == 0;
  const char *gw_listen = "127.0.0.1:8080", *gw_config = NULL;
  long gw_workers = 1;
  if (gateway) i = 2;
  /* a gateway worker is left alone: a policy that loops would hold every
   * request it serves, for good (watchdog.c) */
  double max_task_seconds = gateway ? 5 : 0;

  for (; i < argc; i++) {
    const char *a = argv[i];
    const char *next = i + 1 < argc ? argv[i + 1] : NULL;
    if (a[0] != '-' || strcmp(a, "-") == 0) break;
    if (strcmp(a, "--") == 0) {
      i++;
      break;
    }
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      return 0;
    }
    if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
      printf(PROGNAME " " RESIL_VERSION " (" LUA_RELEASE ")\n");
      return 0;
    }
    if (gateway && (strcmp(a, "--listen") == 0 || strcmp(a, "--config") == 0 || strcmp(a, "--workers") == 0)) {
      if (!next) return fail("gateway: option '%s' needs an argument", a);
      i++;
      if (a[2] == 'l') {
        /* said here, on one line: the gateway's own refusal came with a traceback of its code */
        const char *colon = strrchr(next, ':');
        const char *port = colon ? colon + 1 : "";
        if (!*port || strlen(port) > 5 || strspn(port, "0123456789") != strlen(port) || atoi(port) > 65535)
          return fail("gateway: --listen wants host:port (a port from 0 to 65535), not '%s'", next);
        gw_listen = next;
        /* :PORT is loopback, as for --metrics-addr; a host name (localhost) is refused here, on one
         * line: the server binds numeric addresses only, and said "No such file or directory" */
        static char loopback[32];
        if (colon == next) {
          snprintf(loopback, sizeof loopback, "127.0.0.1%s", colon);
          gw_listen = loopback;
        } else if (!numeric_host(next, colon)) {
          return fail("gateway: --listen wants a numeric address and a port (127.0.0.1:8080, 0.0.0.0:8080, "
                      "[::1]:8080, :8080 for loopback), not '%s'", next);
        }
      }
      else if (a[2] == 'c') gw_config = next;
      else if (parse_count(next, &gw_workers) != 0 || gw_workers > 256)
        return fail("gateway: --workers: bad count '%s' (1 to 256)", next);
      continue;
    }
    if (gateway && strcmp(a, "--worker-timeout") == 0) {
      if (!next) return fail("gateway: option '%s' needs an argument", a);
      i++;
      char *end;
      errno = 0;
      worker_timeout = strtod(next, &end);
      if (errno || end == next || *end || !(worker_timeout >= 0 && worker_timeout <= 1e6))
        return fail("gateway: --worker-timeout: bad number of seconds '%s' (0 to 1000000; 0: off)", next);
      continue;
    }
    if (strcmp(a, "--virtual-clock") == 0) {
      opts.virtual_clock = 1;
      continue;
    }
    if (strcmp(a, "--watch") == 0) {
      watch = 1;
      continue;
    }
    if (strcmp(a, "--fresh") == 0) {
      opts.fresh = 1;
      continue;
    }
    if (strcmp(a, "--wait") == 0) {
      wait = 1;
      continue;
    }
    if (strcmp(a, "--sandbox") == 0) {
      opts.sandbox = RESIL_SANDBOX_ON;
      continue;
    }
    if (strcmp(a, "--sandbox-dir") == 0) {
      if (!next) return fail("option '%s' needs an argument", a);
      i++;
      if (add_sandbox_dir(&sandbox_dirs, next) != 0) return 1;
      continue;
    }
    if (strcmp(a, "-e") == 0 || strcmp(a, "--max-instructions") == 0 || strcmp(a, "--max-memory") == 0 ||
        strcmp(a, "--policies") == 0 || strcmp(a, "--log-file") == 0 || strcmp(a, "--log-level") == 0 ||
        strcmp(a, "--store") == 0 || strcmp(a, "--run") == 0 || strcmp(a, "--metrics-addr") == 0 ||
        strcmp(a, "--metrics-file") == 0 || strcmp(a, "--otlp-endpoint") == 0 || strcmp(a, "--max-task-seconds") == 0) {
      if (!next) return fail("option '%s' needs an argument", a);
      i++;
      if (a[1] == 'e') {
        if (ncodes == (int)(sizeof codes / sizeof codes[0])) return fail("%s", "too many -e options");
        codes[ncodes++] = next;
      } else if (strcmp(a, "--max-instructions") == 0) {
        if (parse_count(next, &opts.max_instructions) != 0)
          return fail("--max-instructions: bad count '%s' (1 to 2147483647)", next);
      } else if (strcmp(a, "--max-task-seconds") == 0) {
        char *end;
        errno = 0;
        max_task_seconds = strtod(next, &end);
        if (errno || end == next || *end || !(max_task_seconds >= 0 && max_task_seconds <= 1e6))
          return fail("--max-task-seconds: bad number of seconds '%s' (0 to 1000000; 0: off)", next);
      } else if (strcmp(a, "--max-memory") == 0) {
        if (parse_size(next, &opts.max_memory) != 0)
          return fail("--max-memory: bad size '%s' (try 64M; 1K to 1048576G)", next);
      } else if (strcmp(a, "--policies") == 0) {
        if (check_policies_dir(next) != 0) return 1;
        opts.policies_dir = next;
      } else if (strcmp(a, "--store") == 0) {
        opts.store = next;
      } else if (strcmp(a, "--run") == 0) {
        opts.run_id = next;
      } else if (strcmp(a, "--metrics-addr") == 0) {
        metrics_addr = next;
      } else if (strcmp(a, "--metrics-file") == 0) {
        metrics_file = next;
      } else if (strcmp(a, "--otlp-endpoint") == 0) {
        otlp_endpoint = next;
      } else if (strcmp(a, "--log-file") == 0) {
        if (check_log_file(next, &held_log) != 0) return 1;
        opts.log_file = next;
      } else {
        static const char *const levels[] = {"debug", "info", "warn", "error", "off"};
        int ok = 0;
        for (int k = 0; k < 5; k++) ok |= strcmp(next, levels[k]) == 0;
        if (!ok) return fail("--log-level: unknown level '%s' (debug, info, warn, error, off)", next);
        opts.log_level = next;
      }
      continue;
    }
    /* `resil-lua --listen :8080 gateway`: an option --help lists, said "unknown" */
    if (!gateway && (strcmp(a, "--listen") == 0 || strcmp(a, "--config") == 0 || strcmp(a, "--workers") == 0 ||
                     strcmp(a, "--worker-timeout") == 0)) {
      fprintf(stderr, PROGNAME ": '%s' is an option of the gateway: name the subcommand first, its options after it "
                      "(" PROGNAME " gateway %s ...)\n", a, a);
      return 1;
    }
    /* `--store=x.db`, as many commands take it: said "unknown option '--store=x.db'" */
    const char *eq = strchr(a, '=');
    if (a[1] == '-' && eq && eq > a + 2) {
      char spaced[PATH_MAX];
      snprintf(spaced, sizeof spaced, "%.*s %s", (int)(eq - a), a, eq + 1);
      return fail("an option's value comes after a space: %s", spaced);
    }
    fail("unknown option '%s'", a);
    usage(stderr);
    return 1;
  }
  if (sandbox_dirs) {
    if (opts.sandbox != RESIL_SANDBOX_ON) return fail("%s", "--sandbox-dir goes with --sandbox");
    opts.sandbox_dirs = sandbox_dirs;
  }
  if (gateway && i < argc) return fail("gateway: unexpected argument '%s'", argv[i]);
  const char *script = i < argc ? argv[i++] : NULL;
  /* `resil-lua --store x.db costs`: a subcommand after an option was read as a script,
   * "cannot open costs: No such file or directory" */
  if (script && is_subcommand(script) && access(script, F_OK) != 0) {
    fprintf(stderr, PROGNAME ": '%s' is a subcommand: name it first, its options after it (" PROGNAME " %s ...)\n",
            script, script);
    return 1;
  }
  if (!script && ncodes == 0 && !gateway) {
    usage(stderr);
    return 1;
  }

  raise_fd_limit();
  /* said here, once: the gateway's own refusal came from each worker, with a traceback of its
   * code, three times before "workers keep dying as they start" */
  if (gateway && gw_workers > 1 && atoi(strrchr(gw_listen, ':') + 1) == 0)
    return fail("gateway: --workers needs a fixed port in --listen, not '%s'", gw_listen);
  if (gateway && gw_config && check_config_file(gw_config) != 0) return 1;
  if (gateway && gw_config && check_config_not_handler(gw_config, opts.policies_dir) != 0) return 1;
  if (gateway && check_gateway_address(gw_listen, "--listen") != 0) return 1;
  if (gateway && metrics_addr && check_metrics_address(gw_listen, metrics_addr) != 0) return 1;
  /* gateway --workers N: N processes on one SO_REUSEPORT socket, each with
   * its own loop, sharing keys, limits and budgets through the store, kept
   * at N by this process (supervise_workers) */
  if (gateway && gw_workers > 1) {
    /* A worker's silence is judged well after the watchdog's stuck exit
     * (max_task_seconds, then as long again and 10 s at least, of CPU): a
     * loop it can end ends with its own line */
    if (worker_timeout < 0) {
      double stuck = max_task_seconds + (max_task_seconds > 10 ? max_task_seconds : 10);
      worker_timeout = max_task_seconds > 0 && 2 * stuck > 30 ? 2 * stuck : 30;
    }
    /* each worker serves --metrics-addr with SO_REUSEPORT, as the gateway's
     * port: a second gateway's metrics there would be split with ours */
    if (metrics_addr) {
      char addr[300];
      snprintf(addr, sizeof addr, "%s%s", metrics_addr[0] == ':' ? "127.0.0.1" : "", metrics_addr);
      if (check_gateway_address(addr, "--metrics-addr") != 0) return 1;
    }
    if (make_metrics_dir() != 0) return 1;
    int code = supervise_workers(gw_workers);
    if (code >= 0) {
      remove_metrics_dir();
      return code;
    }
  }
  if (!opts.store) opts.store = env_store();
  resil_t *R = resil_open(&opts);
  if (held_log) fclose(held_log); /* the host has the log open now (or said it could not) */
  if (!R) return fail("%s", "cannot create the host (out of memory?)");
  if (open_failed(R)) return 1;
  R->stuck_exit = 1; /* a loop stuck outside Lua ends the process, for its supervisor to start another (watchdog.c) */
  if (max_task_seconds > 0 && resil_set_max_task_seconds(R, max_task_seconds) != RESIL_OK) {
    fprintf(stderr, PROGNAME ": --max-task-seconds: cannot start the watchdog's thread\n");
    resil_close(R);
    return 1;
  }
  /* a worker's heartbeat, from its loop (kill_silent); freed before the host's base is */
  struct event *beat = NULL;
  if (ready_fd >= 0 && worker_timeout > 0 && (beat = event_new(R->base, -1, EV_PERSIST, heartbeat, NULL))) {
    double every = heartbeat_seconds();
    struct timeval tv = {(time_t)every, (suseconds_t)((every - (double)(time_t)every) * 1e6)};
    evtimer_add(beat, &tv);
    watchdog_heartbeat_fd = ready_fd;
  }
  if (wait) wait_for_run(R);
  if (shard_metrics(R) != 0 || export_metrics(R, metrics_addr, metrics_file) != 0 ||
      export_traces(R, otlp_endpoint) != 0) {
    resil_close(R);
    return 1;
  }
  signal_target = R;
  if (gateway) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_gateway_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
  } else {
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
  }
  resil_reload_on_sighup(R);
  if (watch && resil_watch(R, 1) != RESIL_OK) fprintf(stderr, PROGNAME ": --watch: %s\n", resil_error(R));

  int status = RESIL_OK;
  for (int k = 0; k < ncodes && status == RESIL_OK; k++) {
    /* the run its steps go to: named by the code, not by "(script)", which every -e shared (one
     * code's steps replayed another's results) */
    lua_State *L = resil_lua(R);
    lua_getfield(L, LUA_REGISTRYINDEX, "resil.private");
    lua_getfield(L, -1, "store_config_host");
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "-e");
    lua_setfield(L, -2, "script");
    lua_pushliteral(L, "-e\n");
    lua_pushstring(L, codes[k]);
    lua_concat(L, 2);
    lua_setfield(L, -2, "script_path");
    lua_call(L, 1, 0);
    lua_pop(L, 1);
    status = resil_load_string(R, codes[k], "=(command line)");
    if (status == RESIL_OK) status = resil_run(R);
  }
  if (status == RESIL_OK && gateway) {
    lua_State *L = resil_lua(R);
    lua_createtable(L, 0, 6);
    lua_pushstring(L, gw_listen);
    lua_setfield(L, -2, "listen");
    if (gw_config) {
      lua_pushstring(L, gw_config);
      lua_pushvalue(L, -1);
      lua_pushboolean(L, opts.sandbox == RESIL_SANDBOX_ON);
      lua_pushcclosure(L, load_config, 2);
      lua_setfield(L, -3, "load_config");
    } else lua_pushnil(L);
    lua_setfield(L, -2, "config");
    lua_pushinteger(L, gw_workers);
    lua_setfield(L, -2, "workers");
    if (ready_fd >= 0) { /* (a worker: it tells its supervisor when it loads, then listens) */
      lua_pushcfunction(L, worker_ready);
      lua_setfield(L, -2, "ready");
    }
    /* the host's hook functions (a policy's debug is refused under --sandbox): the config's
     * instruction cap and the handler's catch (policies/gateway.lua keeps them in closures) */
    lua_pushcfunction(L, luaopen_debug);
    lua_call(L, 0, 1);
    lua_getfield(L, -1, "gethook");
    lua_setfield(L, -3, "gethook");
    lua_getfield(L, -1, "sethook");
    lua_setfield(L, -3, "sethook");
    lua_pop(L, 1);
    lua_setglobal(L, "gateway_options");
    /* (taken off the globals before any policy loads: gateway.main's only) */
    status = resil_load_string(R, "local o = gateway_options; gateway_options = nil; "
                               "local g = require('policies.gateway'); "
                               "if type(g) ~= 'table' or type(g.main) ~= 'function' then "
                               "error(require('resil').error('bad_config', \"policies.gateway has no function 'main': "
                               "a project's copy of policies/gateway.lua must keep the shipped file's (the gateway "
                               "command runs it)\", { traceback = false }), 0) "
                               "end; g.main(o)", "=[gateway]");
    if (status == RESIL_OK) status = resil_run(R);
  }
  if (status == RESIL_OK && script) {
    status = resil_load_file(R, script, argc - i, argv + i);
    if (status == RESIL_OK) status = resil_run(R);
  }
  int code = report(R, status);
  if (status != RESIL_ERR_FILE) finish_run(R, status);
  if (status == RESIL_OK && code == 0 && steps_not_run(R)) code = 1;
  finish_traces(R, otlp_endpoint, status == RESIL_OK ? "done" : status == RESIL_ERR_INTERRUPT ? "interrupted" : "failed");
  finish_metrics(R);
  if (status == RESIL_ERR_INTERRUPT) code = 128 + (int)received_signal; /* 130 for SIGINT, 143 for SIGTERM */
  if (gateway && status == RESIL_OK && stop_signals > 0) code = 128 + (int)received_signal; /* stopped gracefully */
  signal_target = NULL;
  if (beat) event_free(beat);
  resil_close(R);
  return code;
}
