/*
 * store_redis.c: a Redis connection for the store, hiredis async on the
 * host's libevent loop. A task sends a command and waits; the reply wakes it.
 * Nothing here blocks the loop.
 *
 * A lost connection fails the commands in flight with kind =
 * "store_unavailable" and is re-established on the next command. A server
 * that freezes rather than fails is the same: a command without a reply
 * within the timeout (real time, default 5 s) drops the connection, which
 * fails every command in flight on it.
 *
 * Down: after a command's timeout, or a connection that cannot be made, the
 * connection is marked down and every command fails at once, not sent
 * (err.sent = false), with the same store_unavailable, while a PING on a new
 * connection probes the server in the background: at once, then every
 * `down` seconds (1 s), twice that after each probe without an answer, up to
 * `down_max` (10 s). A probe waits for its answer until the next is due (at
 * least the timeout), so a frozen server always has one: its answer at the
 * thaw ends the down state. Without this every command during a freeze was
 * sent on a new connection and waited its whole timeout. Times here are real
 * time: they are about the server's, not the script's clock.
 *
 * A host name is resolved off the loop (evdns, with the system's resolv.conf
 * and /etc/hosts) at each new connection, the commands held meanwhile as for
 * the SELECT; hiredis is handed the address. hiredis's own getaddrinfo
 * blocked the loop for as long as a slow resolver took, at every connect and
 * every probe (4 s per command, every task stopped). The connections made at
 * the process's end (connect_blocking) still resolve as hiredis does.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <event2/dns.h>
#include <sys/stat.h>

#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "host.h"

#define CONN_MT "resil.RedisConn"
#define RECONNECT_EVERY 1.0 /* down = 0 only: otherwise the probe paces reconnects */
#define REPLICA_DROP_EVERY 1.0 /* drop_replica: a connection refused READONLY made anew at most so often */
#define DEFAULT_TIMEOUT 5.0
#define DEFAULT_DOWN 1.0
#define DEFAULT_DOWN_MAX 10.0
#define AUTH_UNKNOWN 0
#define AUTH_WITH_USER 1
#define AUTH_PASSWORD_ONLY 2
#define DNS_KEY "resil.redis.dns"
#define DNS_MT "resil.RedisDns"

/* The process's resolver for store host names: one, made at the first store
 * with a name, kept in the registry; the hosts file is read again when it
 * changed (a name moved to another address, as getaddrinfo sees it) */
typedef struct {
  struct evdns_base *dns;
  resil_t *R;
  struct timespec hosts_mtime;
  off_t hosts_size;
  ino_t hosts_ino;
} redis_dns;

/* a script this connection may send by SHA (conn:script_source) */
typedef struct script_source {
  char sha[41];
  char *body;
  size_t len;
  struct script_source *next;
} script_source;

typedef struct {
  resil_t *R;
  redisAsyncContext *ac;
  char host[128];
  int port, db;
  char *password;
  /* a URL's user (redis://alice:pw@host): AUTH alice pw, for Redis 6's ACL
   * users; a server that refuses it (before Redis 6, or without that user:
   * requirepass only, a Heroku-style redis://h:pw@host) is sent AUTH pw */
  char *username;
  int auth_form; /* AUTH_*: which this server took */
  int fallback_said; /* AUTH password taken, the user refused: logged once */
  int authing;   /* AUTH user pw on a new connection, the form not known: commands held for its answer */
  char auth_error[256]; /* the last connection's AUTH refused: said with the SELECT refused NOAUTH after it */
  redis_dns *dns; /* NULL: host is an address */
  /* the name being resolved for a new connection: the commands are held
   * (held_first) until it is; request NULL while resolving: answered at once */
  int resolving;
  struct evdns_getaddrinfo_request *request;
  /* the name resolved once in this process; and, never so, the resolver said it does not exist
   * (NXDOMAIN): a URL that names no host, which no wait mends, said store_error, not an outage (a
   * budget with on_outage = "allow" handed out unchecked tickets for as long as the URL was wrong).
   * A name that resolved before and then not is an outage, as a resolver that does not answer is. */
  int resolved_once, name_unknown;
  double last_attempt;
  int connected;
  char last_error[512];
  int ref_self; /* alive while commands are in flight */
  int pending;
  double timeout;
  int closing; /* collected: replies are no longer told to Lua */
  /* A new connection's SELECT not answered yet: the commands sent meanwhile
   * are held here, not pipelined behind it; a server without that database
   * would run them in database 0 (another app's keys, or another store's) */
  int selecting;
  /* SELECT of this database answered OK on this server before: a write that
   * must reach a frozen server (sends_when_down) is pipelined behind the
   * SELECT of a new connection instead of held, or it never reached it */
  int db_selected;
  /* the connection whose AUTH and SELECT answers the held commands wait for
   * (connect_to's last; compared, never used): one let go of before they
   * came answers for itself only, or its late answers sent the next
   * connection's held commands on it, failed them, and left that next
   * connection unselected: its commands ran in database 0 */
  const redisAsyncContext *setup_ac;
  /* the connection that has read a reply, any (compared, never used): a
   * protocol error before it is a server that does not speak Redis */
  const redisAsyncContext *replied_ac;
  struct redis_cmd *held_first, *held_last;
  /* answered commands whose task has not resumed yet (the continuation frees
   * each): at the host's close no task resumes, and they are freed here */
  struct redis_cmd *woken;
  /* down: commands fail at once while a probe (PING) finds out whether the
   * server answers again; down_first == 0: never down */
  double down_first, down_max;
  int down;
  double down_since;       /* monotonic, real time */
  double down_lasted;      /* the last time down, once back */
  double probe_every;      /* from this probe's start to the next's */
  double probe_started, probe_wait;
  int probes;              /* probes without an answer, this time down */
  long refused;            /* commands failed at once while down, ever */
  struct redis_cmd *probe; /* in flight */
  struct event *probe_timer, *notify;
  /* answered for a caller canceled before it resumed, that asked to be given back what it was
   * granted (conn:call_or_give_back): told on the loop, outside the cancel (tell_later) */
  struct redis_cmd *to_tell;
  struct event *tell_later;
  int told_down;    /* the state on_state last heard of */
  int ref_on_state; /* on_state(down, info), from the loop */
  script_source *sources;
  int kept; /* scripts sent by conn:send, not answered yet: the close waits for their answers */
  /* at the close: kept commands whose connection ended without their answer
   * (the server restarted, a reset): sent again on a connection of their own */
  struct orphan *orphans;
  /* at the close: kept commands the server answered with an error (past its
   * maxmemory, a replica since a failover, busy, loading): not written, and
   * no Lua is told at the close; said in one log line, the first error too */
  struct orphan *refused_writes;
  char refused_error[256];
  double replica_dropped; /* monotonic: drop_replica's last, at most one a second */
  /* connections no longer the store's (drop_replica's, conn:close's, a
   * refused SELECT's) whose replies are still to come: freed with the conn,
   * else their events and their commands' deadlines outlived it on an
   * embedder's base that runs on after the host's close */
  struct let_go *let_go;
} redis_conn;

typedef struct let_go {
  redisAsyncContext *ac;
  struct let_go *next;
} let_go;

/* a kept command's text, its answer never read */
typedef struct orphan {
  char *text;
  size_t len;
  struct orphan *next;
} orphan;

typedef struct redis_cmd {
  redis_conn *c;
  task *t;
  int ref_result; /* {n=, ...} or {err = message, kind = } */
  int ref_done;   /* conn:send: told the reply, no task waits; conn:call_or_give_back: its caller canceled */
  struct event *deadline; /* real time: a frozen server must not hold the task */
  /* the connection it was written on (NULL: held): its deadline drops that
   * one, which may no longer be c->ac (drop_replica's, conn:close's) */
  redisAsyncContext *ac;
  char *held;             /* held until the SELECT's reply: the command, formatted */
  int held_len;
  /* conn:send of a script (EVAL, EVALSHA: the ledger's rows and settles
   * nobody waits for, each safe to run twice): the command, formatted, kept
   * until its answer. An EVALSHA answered NOSCRIPT (the server's scripts
   * flushed) is sent again whole (EVAL) from here, once; at the close, one
   * whose connection ended unanswered is sent again on a new one. Both were
   * Lua's to do, and a closing host runs no Lua: the rows were lost. */
  char *resend;
  size_t resend_len;
  int resent;
  int probe; /* the down state's PING: no task, no Lua, not counted as I/O a task waits on */
  int bypass; /* held while resolving, to be sent at once behind the SELECT (sends_when_down) */
  struct redis_cmd *next;
  struct redis_cmd *woken_next, *woken_prev; /* on its conn's woken list */
} redis_cmd;

/* ac stops being c's connection: its replies still to come arrive, then it ends
 * (graceful), or it ends now */
static void send_held(redis_conn *c, redisAsyncContext *ac, int ok);

static void let_go_of(redis_conn *c, redisAsyncContext *ac, int graceful) {
  if (c->ac == ac) {
    c->ac = NULL;
    c->connected = 0;
  }
  if (c->setup_ac == ac) { /* its setup's answers are its own now: what waits for them fails, said */
    c->setup_ac = NULL;
    c->authing = 0;
    if (c->held_first)
      snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: the connection was closed before the server "
               "answered its AUTH or SELECT", c->host, c->port);
    send_held(c, ac, 0);
  }
  /* (with no reply to wait for and outside its callbacks, hiredis frees it at once) */
  int ends_now = ac->replies.head == NULL && !(ac->c.flags & REDIS_IN_CALLBACK);
  let_go *l = graceful && !ends_now ? malloc(sizeof *l) : NULL;
  if (l) {
    l->ac = ac;
    l->next = c->let_go;
    c->let_go = l;
  }
  if (graceful && (l || ends_now)) redisAsyncDisconnect(ac);
  else redisAsyncFree(ac); /* (or out of memory: its commands fail now, rather than outlive the conn) */
}

/* ac ended (or is freed here): no longer c's to free */
static void forget_let_go(redis_conn *c, const redisAsyncContext *ac) {
  for (let_go **p = &c->let_go; *p; p = &(*p)->next) {
    if ((*p)->ac == ac) {
      let_go *l = *p;
      *p = l->next;
      free(l);
      return;
    }
  }
}

static void woken_unlink(redis_cmd *cmd) {
  if (cmd->woken_prev) cmd->woken_prev->woken_next = cmd->woken_next;
  else if (cmd->c->woken == cmd) cmd->c->woken = cmd->woken_next;
  if (cmd->woken_next) cmd->woken_next->woken_prev = cmd->woken_prev;
  cmd->woken_next = cmd->woken_prev = NULL;
}

static redis_conn *check_conn(lua_State *L, int idx) { return luaL_checkudata(L, idx, CONN_MT); }

static void probe_answered(redis_conn *c, int answered);

/* ---------- replies to Lua ---------- */

static void push_reply(lua_State *L, redisReply *r, int depth) {
  switch (r->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS: lua_pushlstring(L, r->str, r->len); break;
  case REDIS_REPLY_INTEGER: lua_pushinteger(L, r->integer); break;
  case REDIS_REPLY_NIL: lua_pushboolean(L, 0); break; /* false: an empty slot, inside arrays too */
  case REDIS_REPLY_ARRAY:
    lua_createtable(L, (int)r->elements, 0);
    if (depth < 16) {
      for (size_t i = 0; i < r->elements; i++) {
        push_reply(L, r->element[i], depth + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
    }
    break;
  default: lua_pushlstring(L, r->str ? r->str : "", r->str ? r->len : 0); break;
  }
}

/* An error reply that says the server cannot serve now, not that the
 * command is wrong: over its maxmemory (noeviction), loading its data after
 * a restart, busy with a long script, a replica since a failover, refusing
 * writes after a failed snapshot. The store is unavailable (a gateway's 503,
 * a settle tried again), not broken. Redis 7 gives the error of a command a
 * script called as it is ("OOM command not allowed ..."); older versions
 * wrap it ("ERR Error running script ...: -OOM command not allowed ..."). */
static int unavailable_reply(const char *s) {
  static const char *const codes[] = {"OOM", "LOADING", "BUSY", "READONLY", "MISCONF", "MASTERDOWN", "NOREPLICAS",
                                      "TRYAGAIN", "CLUSTERDOWN", NULL};
  char wrapped[32];
  /* (a server at its maxclients answers a new connection so, then closes it: an outage as any) */
  if (strncmp(s, "ERR max number of clients reached", 33) == 0) return 1;
  for (int i = 0; codes[i]; i++) {
    size_t n = strlen(codes[i]);
    if (strncmp(s, codes[i], n) == 0 && s[n] == ' ') return 1;
    snprintf(wrapped, sizeof wrapped, "-%s ", codes[i]);
    if (strstr(s, wrapped)) return 1;
  }
  return 0;
}

/* conn:send's reply to its done(reply) | done(nil, err), on the loop outside
 * any task; a done that raises is logged. */
static void tell_done(lua_State *L, redis_cmd *cmd) {
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, cmd->ref_result); /* L stack: res */
  int res = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, cmd->ref_done); /* res done */
  if (lua_getfield(L, res, "err") != LUA_TNIL) {     /* res done message */
    lua_getfield(L, res, "kind");                    /* res done message kind */
    const char *kind = lua_tostring(L, -1);
    lua_pushnil(L);
    resil_push_error(L, kind ? kind : "store_error", "%s", lua_tostring(L, -3));
    if (lua_getfield(L, res, "sent") == LUA_TBOOLEAN) lua_setfield(L, -2, "sent"); /* err.sent */
    else lua_pop(L, 1);
    lua_rotate(L, res + 2, 2); /* res done nil err message kind */
    lua_pop(L, 2);
  } else {
    lua_pop(L, 1);
    lua_rawgeti(L, res, 1);
    lua_pushnil(L); /* res done reply nil */
  }
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "error");
    host_log(L, "error", "redis: a command's done callback raised");
  }
  lua_settop(L, top);
}

static script_source *source_of(redis_conn *c, const char *sha, size_t len) {
  if (len != 40) return NULL;
  for (script_source *s = c->sources; s; s = s->next)
    if (memcmp(s->sha, sha, 40) == 0) return s;
  return NULL;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* a formatted EVALSHA of a script whose source is known -> the same as
 * EVAL with that source and the same keys and arguments, in *out (malloc),
 * its length in *out_len; -> 0 if it is not one. The text is
 * "*N\r\n$7\r\nEVALSHA\r\n$40\r\n<sha>\r\n" and the rest, kept as it is. */
static int eval_form(redis_conn *c, const char *f, size_t len, char **out, size_t *out_len) {
  const char *end = f + len, *line = memchr(f, '\n', len);
  static const char head[] = "$7\r\nEVALSHA\r\n$40\r\n";
  size_t head_len = sizeof head - 1;
  if (!line || (size_t)(end - line - 1) < head_len + 42 || memcmp(line + 1, head, head_len) != 0) return 0;
  const char *sha = line + 1 + head_len, *rest = sha + 42;
  script_source *src = source_of(c, sha, 40);
  if (!src) return 0;
  char len_text[32];
  int n = snprintf(len_text, sizeof len_text, "$4\r\nEVAL\r\n$%zu\r\n", src->len);
  size_t first = (size_t)(line + 1 - f), total = first + (size_t)n + src->len + 2 + (size_t)(end - rest);
  char *w = *out = malloc(total);
  if (!w) return 0;
  memcpy(w, f, first), w += first;
  memcpy(w, len_text, (size_t)n), w += n;
  memcpy(w, src->body, src->len), w += src->len;
  memcpy(w, "\r\n", 2), w += 2;
  memcpy(w, rest, (size_t)(end - rest));
  *out_len = total;
  return 1;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);
static void drop_replica(redis_conn *c, redisAsyncContext *ac, const redisReply *r);

/* cmd's EVALSHA, answered NOSCRIPT, sent again as EVAL -> 1 (its answer
 * comes to on_reply again), or 0. Once: a second NOSCRIPT is the caller's. */
static int resend_whole(redis_conn *c, redisAsyncContext *ac, redis_cmd *cmd) {
  char *whole;
  size_t len;
  if (cmd->resent || !eval_form(c, cmd->resend, cmd->resend_len, &whole, &len)) return 0;
  if (redisAsyncFormattedCommand(ac, on_reply, cmd, whole, len) != REDIS_OK) {
    free(whole);
    return 0;
  }
  free(cmd->resend);
  cmd->resend = whole;
  cmd->resend_len = len;
  cmd->resent = 1;
  cmd->ac = ac;
  return 1;
}

/* cmd's kept text, its answer r had: dropped; or, the host closing, an
 * orphan to be sent again (the connection ended without its answer), or
 * one refused (an error answer), to be said */
static void unkeep(redis_conn *c, redis_cmd *cmd, const redisReply *r) {
  int refused = r && r->type == REDIS_REPLY_ERROR;
  orphan **list = !c->closing ? NULL : !r ? &c->orphans : refused ? &c->refused_writes : NULL;
  orphan *o = list ? malloc(sizeof *o) : NULL;
  if (o) {
    o->text = cmd->resend;
    o->len = cmd->resend_len;
    o->next = *list;
    *list = o;
    if (refused && !c->refused_error[0]) snprintf(c->refused_error, sizeof c->refused_error, "%s", r->str);
  } else {
    free(cmd->resend);
  }
  cmd->resend = NULL;
  c->kept--;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  redis_cmd *cmd = privdata;
  redis_conn *c = cmd->c;
  if (cmd->probe) { /* any reply, an error one too: the server answers again */
    if (cmd->deadline) event_free(cmd->deadline);
    free(cmd);
    probe_answered(c, reply != NULL);
    return;
  }
  redisReply *r = reply;
  if (cmd->resend) {
    if (r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0 && ac && resend_whole(c, ac, cmd))
      return;
    unkeep(c, cmd, r);
  }
  lua_State *L = c->R->L;
  lua_createtable(L, 1, 2);
  if (r) c->replied_ac = ac;
  if (!r && ac && ac->err == REDIS_ERR_PROTOCOL && c->replied_ac != ac) {
    /* The connection's first reply was not Redis's protocol: the URL's port is another server's
     * (an HTTP server's, say). It ran nothing (err.sent = false), and no wait mends it
     * (store_error): said as a store that answers with an error, not an outage, a budget with
     * on_outage = "allow" handed out unchecked tickets for as long as the URL was wrong, and a
     * once claim was given up for a minute, holding the process's end. */
    lua_pushfstring(L, "redis %s:%d: not a Redis server (%s)", c->host, c->port, ac->errstr);
    lua_setfield(L, -2, "err");
    lua_pushliteral(L, "store_error");
    lua_setfield(L, -2, "kind");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "sent");
  } else if (!r) {
    if (c->last_error[0]) lua_pushstring(L, c->last_error);
    else /* (naming the server: "Server closed the connection" alone did not say which) */
      lua_pushfstring(L, "redis %s:%d: %s", c->host, c->port, ac && ac->errstr ? ac->errstr : "connection lost");
    lua_setfield(L, -2, "err");
    if (c->name_unknown) lua_pushliteral(L, "store_error"); /* (a name that does not exist: never sent) */
    else lua_pushliteral(L, "store_unavailable");
    lua_setfield(L, -2, "kind");
    /* the connection was up: the command may have reached the server, and a
     * frozen one runs it when it thaws (a timeout drops the connection; the
     * server still reads what it had received); never made, nothing was sent */
    /* (no cmd->ac: held, never sent; one failed as its SELECT was refused came with the connection's
     * ac, and said sent: a once claim so refused spawned a minute of give-ups) */
    lua_pushboolean(L, ac && cmd->ac && (ac->c.flags & REDIS_CONNECTED) != 0);
    lua_setfield(L, -2, "sent");
  } else if (r->type == REDIS_REPLY_ERROR && unavailable_reply(r->str)) {
    drop_replica(c, ac, r);
    lua_pushfstring(L, "redis %s:%d: %s", c->host, c->port, r->str);
    lua_setfield(L, -2, "err");
    lua_pushliteral(L, "store_unavailable");
    lua_setfield(L, -2, "kind");
    /* refused before it wrote anything (a script is refused OOM, READONLY or MISCONF only at its first
     * write; the rest before it runs), and never run later: err.sent = false (a reservation or a once
     * claim refused so was given back for a minute, each try refused too, and then logged as held) */
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "sent");
  } else if (r->type == REDIS_REPLY_ERROR) {
    /* Refused unauthenticated (no password, a wrong one): the server ran none of it, and never
     * will (err.sent = false: a once claim so refused spawned a minute of give-ups, each refused
     * too, that held the process's end and then logged the key as held). A command of more
     * than 10 arguments (a script's) is answered "Protocol error: unauthenticated multibulk
     * length" and the connection closed: said as the NOAUTH it is. */
    int unauth = strncmp(r->str, "ERR Protocol error: unauthenticated", 35) == 0;
    int noauth = unauth || strncmp(r->str, "NOAUTH", 6) == 0;
    /* a Redis Cluster's node refuses a command whose keys are not all its own before running it: the
     * store's scripts take several keys each, so it cannot be one (a key here or there worked) */
    int cluster = strncmp(r->str, "MOVED ", 6) == 0 || strncmp(r->str, "ASK ", 4) == 0 ||
                  strncmp(r->str, "CROSSSLOT ", 10) == 0;
    /* the user's ACL refuses the command or its keys, checked before it runs (one a script called
     * is said with "script: ...": it may have written before) */
    int noperm = strncmp(r->str, "NOPERM ", 7) == 0 && !strstr(r->str, " script: ");
    /* a command the server does not have (EVAL, EVALSHA renamed away by its configuration, as some
     * managed Redis do): refused before it ran (its outcome was said unseen, a reservation given
     * back and a once claim given up for a minute, each refused too, then logged as held), said
     * without naming the server, with the script's first hundred bytes */
    int unknown = strncmp(r->str, "ERR unknown command ", 20) == 0;
    if (cluster) {
      lua_pushfstring(L, "redis %s:%d: %s (a Redis Cluster: the store needs one Redis server, with replicas or not)",
                      c->host, c->port, r->str);
      lua_pushboolean(L, 0);
      lua_setfield(L, -3, "sent");
    } else if (noperm) {
      lua_pushfstring(L, "redis %s:%d: %s (the store's user needs every command and key under resil:)", c->host,
                      c->port, r->str);
      lua_pushboolean(L, 0);
      lua_setfield(L, -3, "sent");
    } else if (unknown) {
      const char *args = strstr(r->str, ", with args beginning with");
      lua_pushlstring(L, r->str, args ? (size_t)(args - r->str) : r->len);
      lua_pushfstring(L, "redis %s:%d: %s (%s)", c->host, c->port, lua_tostring(L, -1),
                      strstr(r->str, "'EVAL") || strstr(r->str, "'SCRIPT")
                          ? "the store needs the server's scripts: EVAL, EVALSHA and SCRIPT"
                          : "the server lacks a command the store needs");
      lua_remove(L, -2);
      lua_pushboolean(L, 0);
      lua_setfield(L, -3, "sent");
    } else if (noauth) {
      lua_pushfstring(L, "redis %s:%d: %s%s%s%s%s", c->host, c->port, unauth ? "NOAUTH Authentication required (" : "",
                      r->str, unauth ? ")" : "", c->auth_error[0] ? " (AUTH refused: " : "",
                      c->auth_error[0] ? c->auth_error : ""); /* (why: the AUTH's own answer) */
      if (c->auth_error[0]) lua_pushliteral(L, ")"), lua_concat(L, 2);
      lua_pushboolean(L, 0);
      lua_setfield(L, -3, "sent");
    } else {
      lua_pushlstring(L, r->str, r->len);
    }
    lua_setfield(L, -2, "err");
    lua_pushliteral(L, "store_error");
    lua_setfield(L, -2, "kind");
  } else {
    push_reply(L, r, 0);
    lua_rawseti(L, -2, 1);
  }
  cmd->ref_result = luaL_ref(L, LUA_REGISTRYINDEX);
  if (cmd->deadline) event_free(cmd->deadline);
  cmd->deadline = NULL;
  c->R->io_pending--;
  c->R->store_io_pending--;
  if (--c->pending == 0 && c->ref_self != LUA_NOREF) {
    luaL_unref(L, LUA_REGISTRYINDEX, c->ref_self);
    c->ref_self = LUA_NOREF;
  }
  if (cmd->t) {
    cmd->woken_next = c->woken; /* the continuation frees cmd (or conn_gc, at the host's close) */
    if (c->woken) c->woken->woken_prev = cmd;
    c->woken = cmd;
    task_wake(cmd->t);
    return;
  }
  if (cmd->ref_done != LUA_NOREF && !c->closing) tell_done(L, cmd);
  luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_done);
  luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_result);
  free(cmd);
}

/* ---------- down: fail at once, probe in the background ---------- */

static double monotonic_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static struct timeval timeval_of(double seconds) {
  struct timeval tv = {(time_t)seconds, (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)};
  return tv;
}

/* on_state hears of it from the loop (notify_cb), never from inside the
 * command that found it out */
static void tell_state(redis_conn *c) {
  if (c->notify && !c->closing) event_active(c->notify, EV_TIMEOUT, 0);
}

/* A command without a reply in time, or a connection that cannot be made:
 * the next commands would wait or fail the same way. The first probe goes
 * from the loop (probe_fire), not from inside the command that found it. */
static void mark_down(redis_conn *c) {
  if (c->down || c->down_first <= 0 || c->closing || !c->probe_timer) return;
  c->down = 1;
  c->down_since = monotonic_now();
  c->probes = 0;
  c->probe_every = c->down_first;
  struct timeval now = {0, 0};
  evtimer_add(c->probe_timer, &now);
  tell_state(c);
}

/* The probe's outcome: back, or the next probe when it is due (at once
 * after one that waited its whole time), twice as far from this one. */
static void probe_answered(redis_conn *c, int answered) {
  c->probe = NULL;
  if (!c->down || c->closing) return;
  if (answered) {
    c->down = 0;
    c->probes = 0;
    c->down_lasted = monotonic_now() - c->down_since;
    tell_state(c);
    return;
  }
  double due = c->probe_started + c->probe_every - monotonic_now();
  c->probes++;
  c->probe_every = c->probe_every * 2 < c->down_max ? c->probe_every * 2 : c->down_max;
  struct timeval tv = timeval_of(due > 0 ? due : 0);
  evtimer_add(c->probe_timer, &tv);
}

/* ---------- the connection ---------- */

static void on_connect(const redisAsyncContext *ac, int status) {
  redis_conn *c = ac->data;
  if (!c) return;
  if (status != REDIS_OK) {
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: %s", c->host, c->port, ac->errstr);
    if (c->ac == ac) { /* (not one dropped before, whose successor it is now) */
      c->connected = 0;
      c->ac = NULL; /* hiredis frees it */
    } else {
      forget_let_go(c, ac);
    }
    mark_down(c);
    return;
  }
  if (c->ac != ac) return; /* (one let go of while it connected: not the store's) */
  c->connected = 1;
  if (!c->down) c->last_error[0] = '\0'; /* (down: why, until a probe is answered) */
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  redis_conn *c = ac->data;
  if (!c) return;
  if (status != REDIS_OK)
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: %s", c->host, c->port,
             ac->errstr[0] ? ac->errstr : "connection lost");
  /* a connection dropped while its replies came (drop_replica's, a refused
   * SELECT's) ends after a new one was made: that one is kept */
  if (c->ac == ac) {
    c->connected = 0;
    c->ac = NULL;
  } else {
    forget_let_go(c, ac);
  }
}

/* A write refused READONLY: the server is a replica now (a failover). The
 * connection is dropped, so that the next command connects anew to what the
 * store's name leads to now (a managed Redis's DNS name moves to the new
 * primary); kept, every write was refused for as long as it lived. Its
 * replies still to come arrive, then it ends. At most once a second: a
 * replica for good (a misconfigured URL) is not a new connection per write. */
static void drop_replica(redis_conn *c, redisAsyncContext *ac, const redisReply *r) {
  if (!ac || ac != c->ac || c->closing || r->type != REDIS_REPLY_ERROR) return;
  if (strncmp(r->str, "READONLY ", 9) != 0 && !strstr(r->str, "-READONLY ")) return;
  double now = monotonic_now();
  if (c->replica_dropped > 0 && now - c->replica_dropped < REPLICA_DROP_EVERY) return;
  c->replica_dropped = now;
  let_go_of(c, ac, 1);
}

static void on_auth_reply(redisAsyncContext *ac, void *reply, void *privdata);

static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  redis_conn *c = privdata;
  redisReply *r = reply;
  if (r) c->replied_ac = ac;
  if (ac != c->setup_ac) return; /* a connection let go of: not the conn's setup any more */
  if (r && r->type == REDIS_REPLY_ERROR)
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: %s", c->host, c->port, r->str);
  if (r) snprintf(c->auth_error, sizeof c->auth_error, "%s", r->type == REDIS_REPLY_ERROR ? r->str : "");
  /* AUTH password, the form this server took before, refused: it may have
   * moved to ACL users (the default user off). The user is tried again, on
   * this connection (the commands after it are served) and the next ones;
   * kept, every command was refused NOAUTH until a restart. */
  if (r && r->type == REDIS_REPLY_ERROR && c->username && c->auth_form == AUTH_PASSWORD_ONLY) {
    c->auth_form = AUTH_UNKNOWN;
    redisAsyncCommand(ac, on_auth_reply, c, "AUTH %s %s", c->username, c->password);
  }
}

/* The setup answered: the held commands sent now, in their order; or (not
 * ok) each failed. */
static void send_held(redis_conn *c, redisAsyncContext *ac, int ok) {
  c->selecting = 0;
  redis_cmd *cmd = c->held_first;
  c->held_first = c->held_last = NULL;
  while (cmd) {
    redis_cmd *next = cmd->next;
    cmd->next = NULL;
    int sent = ok && redisAsyncFormattedCommand(ac, on_reply, cmd, cmd->held, (size_t)cmd->held_len) == REDIS_OK;
    redisFreeCommand(cmd->held);
    cmd->held = NULL;
    if (sent) cmd->ac = ac;
    else on_reply(ac, NULL, cmd);
    cmd = next;
  }
}

/* The SELECT's reply: the held commands are sent now, in their order; or,
 * when it failed (a database the server does not have) or never came (the
 * connection lost), each fails, and a refused SELECT drops the connection,
 * so that no command ever runs in another database. */
static void on_select_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  redis_conn *c = privdata;
  redisReply *r = reply;
  if (r) c->replied_ac = ac;
  if (ac != c->setup_ac) return; /* a connection let go of: not the conn's setup any more */
  int ok = r && r->type != REDIS_REPLY_ERROR;
  /* refused (a server restarted with fewer databases): the writes pipelined
   * behind this SELECT ran in database 0; the next are held again, not each
   * retried write sent there in turn */
  if (r) c->db_selected = ok;
  if (r && !ok)
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: database %d: %s%s%s%s", c->host, c->port, c->db,
             r->str, c->auth_error[0] ? " (AUTH refused: " : "", c->auth_error, c->auth_error[0] ? ")" : "");
  send_held(c, ac, ok);
  if (r && !ok && c->ac == ac) let_go_of(c, ac, 1);
}

static int hold_command(redis_conn *c, redis_cmd *cmd, int len);

/* AUTH password, after AUTH user password was refused: the form this server takes, if it does */
static void on_auth_fallback_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  redis_conn *c = privdata;
  redisReply *r = reply;
  if (r) c->replied_ac = ac;
  if (ac != c->setup_ac) return; /* a connection let go of: not the conn's setup any more */
  if (r && r->type == REDIS_REPLY_ERROR)
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: %s (and as user %s: refused)", c->host, c->port, r->str,
             c->username);
  else if (r)
    c->auth_form = AUTH_PASSWORD_ONLY;
  /* the user refused, the default user taken as it shares the password: said
   * (once per conn), not silently another user's rights */
  if (r && r->type != REDIS_REPLY_ERROR && !c->fallback_said && !c->closing) {
    c->fallback_said = 1;
    lua_State *L = c->R->L;
    lua_createtable(L, 0, 3);
    lua_pushfstring(L, "%s:%d", c->host, c->port);
    lua_setfield(L, -2, "store");
    lua_pushstring(L, c->username);
    lua_setfield(L, -2, "user");
    lua_pushstring(L, c->auth_error);
    lua_setfield(L, -2, "error");
    host_log(L, "warn", "redis: the server refused the user; AUTH with the password alone took it: the store runs "
                        "as the server's default user, without the user's own rights");
  }
  if (r) snprintf(c->auth_error, sizeof c->auth_error, "%s", r->type == REDIS_REPLY_ERROR ? r->str : "");
}

/* The answer to AUTH user password: refused (an error), AUTH password is
 * sent. A new connection's commands held for it (the form not known: those
 * pipelined behind a refused one were refused NOAUTH) go now, behind the
 * SELECT if there is one. */
static void on_auth_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  redis_conn *c = privdata;
  redisReply *r = reply;
  if (r) c->replied_ac = ac;
  if (ac != c->setup_ac) return; /* a connection let go of: not the conn's setup any more */
  int waited = c->authing;
  c->authing = 0;
  if (r && r->type == REDIS_REPLY_ERROR) {
    if (c->auth_form == AUTH_WITH_USER) c->auth_form = AUTH_UNKNOWN; /* (the next connection waits for the form again) */
    snprintf(c->auth_error, sizeof c->auth_error, "%s", r->str);     /* (said by the fallback's warning) */
    redisAsyncCommand(ac, on_auth_fallback_reply, c, "AUTH %s", c->password);
  }
  else if (r)
    c->auth_form = AUTH_WITH_USER, c->auth_error[0] = '\0';
  if (!waited) return;
  c->selecting = 0;
  if (r && c->db) c->selecting = redisAsyncCommand(ac, on_select_reply, c, "SELECT %d", c->db) == REDIS_OK;
  if (!c->selecting) send_held(c, ac, r && !c->db); /* (no reply, or a SELECT not sent: each fails) */
}

/* hiredis's connection to addr (the host's address), its AUTH and SELECT
 * queued -> 1; 0: not made (last_error says why) */
static int connect_to(redis_conn *c, const char *addr) {
  redisAsyncContext *ac = redisAsyncConnect(addr, c->port);
  if (!ac) {
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: out of memory", c->host, c->port);
    return 0;
  }
  if (ac->err) {
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: %s", c->host, c->port, ac->errstr);
    redisAsyncFree(ac);
    mark_down(c);
    return 0;
  }
  /* close-on-exec (hiredis 0.14 has no option for it): a program the
   * script or the embedder started held the connection open */
  fcntl(ac->c.fd, F_SETFD, FD_CLOEXEC);
  /* TCP keepalive: a peer gone without a word (a NAT or a load balancer that
   * dropped the idle connection, a host powered off) is found out; before, an
   * idle connection looked up, and the next command waited its timeout on it */
  redisEnableKeepAlive(&ac->c);
  ac->data = c;
  redisLibeventAttach(ac, c->R->base);
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  c->ac = ac;
  c->setup_ac = ac;
  /* queued before any command: authenticate, pick the database */
  c->authing = 0;
  if (c->password && c->username && c->auth_form != AUTH_PASSWORD_ONLY) {
    int sent = redisAsyncCommand(ac, on_auth_reply, c, "AUTH %s %s", c->username, c->password) == REDIS_OK;
    c->authing = sent && c->auth_form == AUTH_UNKNOWN;
  } else if (c->password) {
    redisAsyncCommand(ac, on_setup_reply, c, "AUTH %s", c->password);
  }
  if (c->authing) c->selecting = 1; /* (the SELECT after its answer: on_auth_reply) */
  else if (c->db) c->selecting = redisAsyncCommand(ac, on_select_reply, c, "SELECT %d", c->db) == REDIS_OK;
  return 1;
}

/* ---------- the host's name, resolved off the loop ---------- */

static void dns_free_later(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  evdns_base_free(arg, 0);
}

/* At the host's close, each conn (collected before) canceled its request, or
 * on the host's own base, which never runs again, left it (cancel_resolve).
 * An embedder's base runs on: the cancels' callbacks are queued there and
 * run first, and the resolver is freed after them (event_base_once), never
 * under them; if the base never runs again, it is not freed at all. */
static int dns_gc(lua_State *L) {
  redis_dns *d = luaL_checkudata(L, 1, DNS_MT);
  struct timeval now = {0, 0};
  if (d->dns && d->R->owns_base) evdns_base_free(d->dns, 0);
  else if (d->dns) event_base_once(d->R->base, -1, EV_TIMEOUT, dns_free_later, d->dns, &now); /* (refused: left) */
  d->dns = NULL;
  return 0;
}

/* The process's resolver, made at the first store with a host name, before
 * that store's conn (collected first, at the close) -> it, or NULL: none
 * could be made, and hiredis resolves the name, as before */
static redis_dns *dns_get(lua_State *L, resil_t *R) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, DNS_KEY) == LUA_TUSERDATA) {
    redis_dns *d = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return d->dns ? d : NULL;
  }
  lua_pop(L, 1);
  redis_dns *d = lua_newuserdatauv(L, sizeof *d, 0);
  memset(d, 0, sizeof *d);
  d->R = R;
  /* the system's resolv.conf (nameservers, search, timeout, attempts) and
   * hosts file; inactive, it holds no event that keeps the loop running */
  d->dns = evdns_base_new(R->base, EVDNS_BASE_INITIALIZE_NAMESERVERS | EVDNS_BASE_DISABLE_WHEN_INACTIVE);
  if (d->dns) {
    /* (0x20 case randomizing: a resolver that answers in another case was refused) */
    evdns_base_set_option(d->dns, "randomize-case:", "0");
    /* an answer for A or AAAA waits at most this long for the other (3 s):
     * a resolver that drops AAAA queries cost each connect 3 s */
    evdns_base_set_option(d->dns, "getaddrinfo-allow-skew:", "0.5");
  }
  if (luaL_newmetatable(L, DNS_MT)) {
    lua_pushcfunction(L, dns_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, DNS_KEY);
  return d->dns ? d : NULL;
}

/* The hosts file read again if it changed since: a name moved to another
 * address there is seen at the next connection, as getaddrinfo saw it */
static void dns_hosts_fresh(redis_dns *d) {
  struct stat st;
  if (stat("/etc/hosts", &st) != 0) memset(&st, 0, sizeof st);
  if (st.st_mtim.tv_sec == d->hosts_mtime.tv_sec && st.st_mtim.tv_nsec == d->hosts_mtime.tv_nsec &&
      st.st_size == d->hosts_size && st.st_ino == d->hosts_ino)
    return;
  d->hosts_mtime = st.st_mtim;
  d->hosts_size = st.st_size;
  d->hosts_ino = st.st_ino;
  evdns_base_clear_host_addresses(d->dns);
  evdns_base_load_hosts(d->dns, "/etc/hosts");
}

/* The held commands failed, none sent: the name not resolved, or no
 * connection made to its address. */
static void fail_held(redis_conn *c) {
  redis_cmd *cmd = c->held_first;
  c->held_first = c->held_last = NULL;
  while (cmd) {
    redis_cmd *next = cmd->next;
    cmd->next = NULL;
    redisFreeCommand(cmd->held);
    cmd->held = NULL;
    on_reply(NULL, NULL, cmd);
    cmd = next;
  }
}

/* The name resolved and the connection begun: the held commands sent, in
 * their order, but those that still wait for the SELECT (on_select_reply). */
static void release_held(redis_conn *c) {
  redis_cmd *cmd = c->held_first;
  c->held_first = c->held_last = NULL;
  while (cmd) {
    redis_cmd *next = cmd->next;
    cmd->next = NULL;
    if (c->selecting && !cmd->bypass) {
      hold_command(c, cmd, cmd->held_len);
    } else {
      int sent = redisAsyncFormattedCommand(c->ac, on_reply, cmd, cmd->held, (size_t)cmd->held_len) == REDIS_OK;
      redisFreeCommand(cmd->held);
      cmd->held = NULL;
      if (sent) cmd->ac = c->ac;
      else on_reply(c->ac, NULL, cmd);
    }
    cmd = next;
  }
}

static void on_resolved(int result, struct evutil_addrinfo *res, void *arg) {
  redis_conn *c = arg;
  /* (cancel_resolve: it failed the held commands; c may be freed since,
   * the callback queued on the loop) */
  if (result == EVUTIL_EAI_CANCEL) {
    if (res) evutil_freeaddrinfo(res);
    return;
  }
  c->resolving = 0;
  c->request = NULL;
  /* an IPv4 address first, as hiredis's own lookup */
  char addr[INET6_ADDRSTRLEN] = "";
  for (int pass = 0; pass < 2 && !addr[0]; pass++) {
    for (struct evutil_addrinfo *ai = res; ai && !addr[0]; ai = ai->ai_next) {
      if (pass == 0 && ai->ai_family == AF_INET)
        evutil_inet_ntop(AF_INET, &((struct sockaddr_in *)ai->ai_addr)->sin_addr, addr, sizeof addr);
      else if (pass == 1 && ai->ai_family == AF_INET6)
        evutil_inet_ntop(AF_INET6, &((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr, addr, sizeof addr);
    }
  }
  if (res) evutil_freeaddrinfo(res);
  if (addr[0]) c->resolved_once = 1, c->name_unknown = 0;
  if (!addr[0]) {
    c->name_unknown = result == EVUTIL_EAI_NONAME && !c->resolved_once;
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: cannot resolve the host name %s: %s%s", c->host,
             c->port, c->host, result ? evutil_gai_strerror(result) : "no address",
             c->name_unknown ? " (the resolver says it does not exist: the store's URL is wrong)" : "");
    mark_down(c);
    fail_held(c);
  } else if (!connect_to(c, addr)) {
    fail_held(c);
  } else {
    release_held(c);
  }
}

/* A resolve in flight at the host's close, on the host's own base (which
 * never runs again), is left as it is, its base freed after (dns_gc), and
 * kept reachable here: canceled, libevent queued its callback for a loop
 * that never runs again, and that memory was lost (a leak sanitizer's exit
 * code for a process that ended during a DNS outage). On an embedder's base,
 * which runs on, it is canceled: left, its skew timer or its answer ran
 * there on the freed resolver and the freed conn. */
#define ABANDONED_MAX 16
static struct evdns_getaddrinfo_request *volatile abandoned[ABANDONED_MAX]; /* (volatile: never read, still written) */
static int n_abandoned;

/* The resolving given up (no answer in time, the host closing): the held
 * commands fail. */
static void cancel_resolve(redis_conn *c) {
  if (!c->resolving) return;
  c->resolving = 0;
  int kept = c->request && c->R->closing && c->closing && c->R->owns_base;
  if (kept) {
    int i = __atomic_fetch_add(&n_abandoned, 1, __ATOMIC_RELAXED);
    if (i < ABANDONED_MAX) abandoned[i] = c->request;
    else kept = 0;
  }
  if (c->request && !kept) evdns_getaddrinfo_cancel(c->request); /* (on_resolved, canceled, from the loop) */
  c->request = NULL;
  fail_held(c);
}

/* A connection, or one being made: -> 1 (c->ac, or the name being resolved:
 * commands are held), or 0 (last_error says why). A host name is resolved
 * again at each new connection: a failover behind it reaches the new address. */
static int ensure_connected(redis_conn *c) {
  if (c->ac || c->resolving) return 1;
  double now = resil_now(c->R);
  if (c->down_first <= 0 && c->last_attempt > 0 && now - c->last_attempt < RECONNECT_EVERY) return 0;
  c->last_attempt = now;
  if (!c->dns) return connect_to(c, c->host);
  dns_hosts_fresh(c->dns);
  struct evutil_addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  c->resolving = 1;
  c->request = NULL;
  struct evdns_getaddrinfo_request *req = evdns_getaddrinfo(c->dns->dns, c->host, NULL, &hints, on_resolved, c);
  if (c->resolving) c->request = req; /* (NULL, and resolved already: the hosts file's) */
  return c->ac || c->resolving;
}

/* No reply in time: the server is frozen or the network is. Dropping the
 * connection answers every command on it (hiredis calls each callback with
 * no reply), so each is freed by the one path in on_reply. That is the
 * connection cmd is on: one dropped since (a READONLY answer, conn:close)
 * still has its replies to come, and a new one, or a name being resolved
 * for it, is not cmd's (before, its held commands failed, none late). */
static void cmd_timed_out(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  redis_cmd *cmd = arg;
  redis_conn *c = cmd->c;
  if (!cmd->ac && c->resolving) { /* cmd is held: failed, freed */
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: the host name %s not resolved within %g s", c->host,
             c->port, c->host, c->timeout);
    mark_down(c);
    cancel_resolve(c);
    return;
  }
  snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: no reply within %g s", c->host, c->port, c->timeout);
  redisAsyncContext *ac = cmd->ac ? cmd->ac : c->ac; /* (held: for the SELECT on c->ac) */
  if (ac == c->ac) {
    c->ac = NULL;
    c->connected = 0;
  }
  mark_down(c);
  if (ac) forget_let_go(c, ac), redisAsyncFree(ac);
}

static void start_deadline(redis_conn *c, redis_cmd *cmd) {
  cmd->deadline = evtimer_new(c->R->base, cmd_timed_out, cmd);
  if (cmd->deadline) {
    struct timeval tv = timeval_of(c->timeout);
    evtimer_add(cmd->deadline, &tv);
  }
}

/* a formatted command's copy in *to (freed as redisFreeCommand does) -> its length, or -1 */
static int copy_command(char **to, const char *f, size_t len) {
  *to = malloc(len);
  if (!*to) return -1;
  memcpy(*to, f, len);
  return (int)len;
}

/* The command formatted and held until the SELECT's reply (on_select_reply) */
static int hold_command(redis_conn *c, redis_cmd *cmd, int len) {
  if (len < 0) return 0;
  cmd->held_len = len;
  if (c->held_last) c->held_last->next = cmd;
  else c->held_first = cmd;
  c->held_last = cmd;
  return 1;
}

/* No answer to the probe until the next is due: its connection dropped. */
static void probe_timed_out(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  redis_cmd *cmd = arg;
  redis_conn *c = cmd->c;
  if (!cmd->ac && c->resolving) { /* the probe is held: failed (probe_answered) */
    snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: the host name %s not resolved within %g s", c->host,
             c->port, c->host, c->probe_wait);
    cancel_resolve(c);
    return;
  }
  snprintf(c->last_error, sizeof c->last_error, "redis %s:%d: no reply within %g s", c->host, c->port,
           c->probe_wait);
  redisAsyncContext *ac = cmd->ac ? cmd->ac : c->ac; /* (as cmd_timed_out) */
  if (ac == c->ac) {
    c->ac = NULL;
    c->connected = 0;
  }
  if (ac) forget_let_go(c, ac), redisAsyncFree(ac); /* the probe's on_reply, with no reply */
}

/* The probe's timer: a PING on a new connection, waiting for its answer
 * until the next probe is due, at least the store's timeout. */
static void probe_fire(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  redis_conn *c = arg;
  if (!c->down || c->probe || c->closing) return;
  c->probe_started = monotonic_now();
  redis_cmd *cmd = ensure_connected(c) ? calloc(1, sizeof *cmd) : NULL;
  if (!cmd) {
    probe_answered(c, 0);
    return;
  }
  cmd->c = c;
  cmd->probe = 1;
  cmd->ref_result = cmd->ref_done = LUA_NOREF;
  int sent = c->selecting || c->resolving ? hold_command(c, cmd, redisFormatCommand(&cmd->held, "PING"))
                          : redisAsyncCommand(c->ac, on_reply, cmd, "PING") == REDIS_OK;
  if (!sent) {
    free(cmd);
    probe_answered(c, 0);
    return;
  }
  if (!cmd->held) cmd->ac = c->ac;
  c->probe = cmd;
  c->probe_wait = c->probe_every > c->timeout ? c->probe_every : c->timeout;
  cmd->deadline = evtimer_new(c->R->base, probe_timed_out, cmd);
  if (cmd->deadline) {
    struct timeval tv = timeval_of(c->probe_wait);
    evtimer_add(cmd->deadline, &tv);
  }
}

static void cmd_canceled(void *arg) {
  redis_cmd *cmd = arg;
  cmd->t = NULL; /* the reply will still come; nobody waits for it */
}

/* Answered and canceled before it resumed: drop the reply, or hand it to its
 * give_back (conn:call_or_give_back) from the loop: a cancel may come from
 * inside a task, where no other Lua may run. */
static void cmd_give_back(void *arg) {
  redis_cmd *cmd = arg;
  redis_conn *c = cmd->c;
  woken_unlink(cmd);
  if (cmd->ref_done != LUA_NOREF && c->tell_later && !c->closing) {
    cmd->t = NULL;
    cmd->next = c->to_tell;
    c->to_tell = cmd;
    event_active(c->tell_later, EV_TIMEOUT, 0);
    return;
  }
  luaL_unref(c->R->L, LUA_REGISTRYINDEX, cmd->ref_done);
  luaL_unref(c->R->L, LUA_REGISTRYINDEX, cmd->ref_result);
  free(cmd);
}

static void tell_later_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  redis_conn *c = arg;
  lua_State *L = c->R->L;
  while (c->to_tell && !c->closing) {
    redis_cmd *cmd = c->to_tell;
    c->to_tell = cmd->next;
    tell_done(L, cmd);
    luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_done);
    luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_result);
    free(cmd);
  }
}

static const task_wait_ops redis_cmd_wait = {cmd_canceled, cmd_give_back, NULL};

static int call_k(lua_State *L, int status, lua_KContext ctx) {
  redis_cmd *cmd = (redis_cmd *)ctx;
  woken_unlink(cmd);
  lua_rawgeti(L, LUA_REGISTRYINDEX, cmd->ref_result);
  luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_result);
  luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_done);
  free(cmd);
  int res = lua_gettop(L);
  if (lua_getfield(L, res, "err") != LUA_TNIL) {
    lua_getfield(L, res, "kind");
    const char *kind = lua_tostring(L, -1);
    int pushed = resil_error_result(L, kind ? kind : "store_error", "%s", lua_tostring(L, -2));
    if (lua_getfield(L, res, "sent") == LUA_TBOOLEAN) lua_setfield(L, -2, "sent"); /* err.sent */
    else lua_pop(L, 1);
    return pushed;
  }
  lua_pop(L, 1);
  lua_rawgeti(L, res, 1);
  return 1;
}

/* a command's arguments as hiredis takes them: on the C stack up to
 * ARGS_ON_STACK, past that in a userdata pushed on the Lua stack (above the
 * arguments, collected after the call). A fixed 64 raised for a script's
 * keys and arguments past it (resil.acquire_all with 16 shared buckets). */
#define ARGS_ON_STACK 64
#define ARGS_MAX 1000000
typedef struct {
  const char *s_stack[ARGS_ON_STACK];
  size_t len_stack[ARGS_ON_STACK];
  const char **s;
  size_t *len;
  int argc;
} command_argv;

/* The arguments at first.. (to the top) as a's argv; raises on a bad one. */
static void command_args(lua_State *L, int first, command_argv *a) {
  int argc = lua_gettop(L) - first + 1;
  if (argc < 1) luaL_error(L, "redis: call needs a command");
  if (argc > ARGS_MAX) luaL_error(L, "redis: at most %d arguments", ARGS_MAX);
  a->argc = argc;
  a->s = a->s_stack;
  a->len = a->len_stack;
  if (argc > ARGS_ON_STACK) {
    char *buf = lua_newuserdatauv(L, (size_t)argc * (sizeof *a->s + sizeof *a->len), 0);
    a->len = (size_t *)buf;
    a->s = (const char **)(buf + (size_t)argc * sizeof *a->len);
  }
  const char **argv_s = a->s;
  size_t *argv_len = a->len;
  for (int i = 0; i < argc; i++) {
    int idx = i + first;
    if (lua_type(L, idx) != LUA_TSTRING && lua_type(L, idx) != LUA_TNUMBER)
      luaL_error(L, "redis: argument %d must be a string or a number, got %s", i + 1, luaL_typename(L, idx));
    argv_s[i] = lua_tolstring(L, idx, &argv_len[i]); /* numbers become strings in place */
  }
}

/* The command sent (queued on the connection, in order): -> it, or NULL
 * with nil, err pushed. The conn is at index 1. */
/* The calling task's writes go to a store that is down too: those tried again
 * until the store takes them (store.lua's retry_write: a give-up, a settle,
 * a once record). Refused at once, none reached a frozen server, which runs
 * what it had received as it thaws: past their minute of tries a claim or a
 * reservation sent before the freeze ran then and was never given up. */
static int sends_when_down(lua_State *L) {
  int yes = 0;
  if (lua_getfield(L, LUA_REGISTRYINDEX, "resil.redis.sends_when_down") == LUA_TTABLE) {
    lua_pushthread(L);
    yes = lua_rawget(L, -2) != LUA_TNIL;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return yes;
}

static redis_cmd *send_command(lua_State *L, redis_conn *c, int argc, const char **argv_s, size_t *argv_len,
                               int keep) {
  if (c->down && !sends_when_down(L)) { /* not sent: it cannot run when the server thaws (err.sent = false) */
    c->refused++;
    const char *kind = c->name_unknown ? "store_error" : "store_unavailable";
    if (c->last_error[0]) resil_error_result(L, kind, "%s (the store is down: not sent)", c->last_error);
    else resil_error_result(L, kind, "redis %s:%d: the store is down: not sent", c->host, c->port);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "sent");
    return NULL;
  }
  if (!ensure_connected(c)) {
    resil_error_result(L, c->name_unknown ? "store_error" : "store_unavailable", "%s",
                       c->last_error[0] ? c->last_error : "redis: not connected");
    return NULL;
  }
  redis_cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) luaL_error(L, "out of memory");
  cmd->c = c;
  cmd->ref_result = cmd->ref_done = LUA_NOREF;
  if (keep) {
    int n = (int)redisFormatCommandArgv(&cmd->resend, argc, argv_s, argv_len); /* (hiredis 0.14: malloc) */
    if (n < 0) {
      free(cmd);
      luaL_error(L, "out of memory");
    }
    cmd->resend_len = (size_t)n;
  }
  /* after the SELECT's reply (on_select_reply); a write retried through an
   * outage goes behind it at once if this database was selected before: held,
   * it never reached a frozen server (the connection dropped at each timeout),
   * which then ran the claim or reservation it was to give up, and no other */
  cmd->bypass = (c->selecting || c->resolving) && c->db_selected && sends_when_down(L);
  if (c->resolving || (c->selecting && !cmd->bypass)) {
    int held = keep ? copy_command(&cmd->held, cmd->resend, cmd->resend_len)
                    : (int)redisFormatCommandArgv(&cmd->held, argc, argv_s, argv_len);
    if (!hold_command(c, cmd, held)) {
      free(cmd->resend);
      free(cmd);
      luaL_error(L, "out of memory");
    }
  } else if ((keep ? redisAsyncFormattedCommand(c->ac, on_reply, cmd, cmd->resend, cmd->resend_len)
                   : redisAsyncCommandArgv(c->ac, on_reply, cmd, argc, argv_s, argv_len)) != REDIS_OK) {
    free(cmd->resend);
    free(cmd);
    resil_error_result(L, "store_unavailable", "redis %s:%d: %s", c->host, c->port,
                       c->ac && c->ac->errstr[0] ? c->ac->errstr : "cannot send");
    return NULL;
  } else {
    cmd->ac = c->ac;
  }
  if (keep) c->kept++;
  c->R->io_pending++; /* real I/O: the virtual clock waits for it, as for HTTP, and longer (loop.c) */
  c->R->store_io_pending++;
  start_deadline(c, cmd);
  if (c->pending++ == 0) {
    lua_pushvalue(L, 1);
    c->ref_self = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  return cmd;
}

/* conn:call(cmd, args...) -> reply | nil, err{kind="store_unavailable"|"store_error"}
 * Replies: strings, integers, arrays as tables; a nil reply is false. */
static int call_from(lua_State *L, int first, int give_back) {
  redis_conn *c = check_conn(L, 1);
  command_argv a;
  command_args(L, first, &a);
  task *t = task_current(L, "redis commands");
  redis_cmd *cmd = send_command(L, c, a.argc, a.s, a.len, 0);
  if (!cmd) return 2;
  cmd->t = t;
  if (give_back) {
    lua_pushvalue(L, give_back);
    cmd->ref_done = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  task_wait(t, &redis_cmd_wait, cmd);
  return lua_yieldk(L, 0, (lua_KContext)cmd, call_k);
}

static int conn_call(lua_State *L) { return call_from(L, 2, 0); }

/* conn:call_or_give_back(give_back, cmd, args...) -> as conn:call; a caller
 * canceled before it resumed with the reply (a client that left while a
 * shared bucket's take was on its way) has give_back(reply) | give_back(nil,
 * err) called with it, on the loop outside any task, to give back what the
 * server granted nobody. */
static int conn_call_or_give_back(lua_State *L) {
  luaL_checktype(L, 2, LUA_TFUNCTION);
  return call_from(L, 3, 2);
}

/* conn:send(done, cmd, args...) -> true | nil, err: the command is sent
 * without waiting, from a task or not: after every command sent before it on
 * this connection, before every one sent after (a read that follows sees a
 * write sent so). Its reply goes to done(reply) | done(nil, err), called on
 * the loop outside any task. For writes nobody waits for (the ledger's
 * wait = false rows); sent commands still in this process when the
 * connection is collected are written then (conn_gc). A script (EVAL,
 * EVALSHA) sent so must be safe to run twice: the connection may send it
 * again (a NOSCRIPT answer; at the close, a connection that ended without
 * its answer). */
static int conn_send(lua_State *L) {
  redis_conn *c = check_conn(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  command_argv a;
  command_args(L, 3, &a);
  int script = (a.len[0] == 7 && memcmp(a.s[0], "EVALSHA", 7) == 0) || (a.len[0] == 4 && memcmp(a.s[0], "EVAL", 4) == 0);
  redis_cmd *cmd = send_command(L, c, a.argc, a.s, a.len, script);
  if (!cmd) return 2;
  lua_pushvalue(L, 2);
  cmd->ref_done = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:script_source(sha, body): the script a SHA stands for, so that a
 * conn:send by that SHA answered NOSCRIPT is sent again whole (on_reply) */
static int conn_script_source(lua_State *L) {
  redis_conn *c = check_conn(L, 1);
  size_t sha_len, len;
  const char *sha = luaL_checklstring(L, 2, &sha_len);
  const char *body = luaL_checklstring(L, 3, &len);
  if (sha_len != 40) return luaL_argerror(L, 2, "a SHA-1 in 40 hex digits");
  if (source_of(c, sha, sha_len)) return 0;
  script_source *src = calloc(1, sizeof *src);
  if (src) src->body = malloc(len ? len : 1);
  if (!src || !src->body) {
    free(src);
    return luaL_error(L, "out of memory");
  }
  memcpy(src->sha, sha, 40);
  memcpy(src->body, body, len);
  src->len = len;
  src->next = c->sources;
  c->sources = src;
  return 0;
}

/* A setup reply (AUTH, SELECT): freed when it succeeded; a failure (an
 * error reply, or none) stays in *r for the caller to report. */
static int setup_ok(redisReply **r) {
  if (!*r || (*r)->type == REDIS_REPLY_ERROR) return 0;
  freeReplyObject(*r);
  *r = NULL;
  return 1;
}

/* A blocking connection of its own (limit: its connect and each reply),
 * authenticated and in c's database -> it (NULL: out of memory; rc->err:
 * not made), *refused the AUTH's or SELECT's failure (an error reply, or
 * none), else NULL. */
static redisContext *connect_blocking(redis_conn *c, struct timeval limit, redisReply **refused) {
  *refused = NULL;
  redisContext *rc = redisConnectWithTimeout(c->host, c->port, limit);
  if (!rc || rc->err) return rc;
  redisSetTimeout(rc, limit);
  redisEnableKeepAlive(rc); /* (as the loop's) */
  redisReply *r = NULL;
  if (c->password && c->username && c->auth_form != AUTH_PASSWORD_ONLY) {
    r = redisCommand(rc, "AUTH %s %s", c->username, c->password);
    if (r && r->type == REDIS_REPLY_ERROR) { /* (as on_auth_reply) */
      freeReplyObject(r);
      r = redisCommand(rc, "AUTH %s", c->password);
    }
  } else if (c->password) {
    r = redisCommand(rc, "AUTH %s", c->password);
  }
  int ready = !c->password || setup_ok(&r);
  if (ready && c->db) {
    r = redisCommand(rc, "SELECT %d", c->db);
    ready = setup_ok(&r);
  }
  if (!ready) *refused = r;
  return rc;
}

/* conn:call_now(cmd, args...) -> reply | nil, err: one command on a blocking
 * connection of its own (1 s timeouts), for when the loop has stopped: a
 * run's end is recorded after its last task. Never from a task. */
static int conn_call_now(lua_State *L) {
  redis_conn *c = check_conn(L, 1);
  command_argv a;
  command_args(L, 2, &a);
  struct timeval limit = {1, 0};
  redisReply *r = NULL;
  redisContext *rc = connect_blocking(c, limit, &r);
  if (!rc || rc->err) {
    int pushed = resil_error_result(L, "store_unavailable", "redis %s:%d: %s", c->host, c->port,
                                    rc ? rc->errstr : "cannot connect");
    if (rc) redisFree(rc);
    return pushed;
  }
  if (!r) r = redisCommandArgv(rc, a.argc, a.s, a.len);
  int pushed;
  if (!r) {
    pushed = resil_error_result(L, "store_unavailable", "redis %s:%d: %s", c->host, c->port, rc->errstr);
  } else if (r->type == REDIS_REPLY_ERROR) {
    pushed = unavailable_reply(r->str)
                 ? resil_error_result(L, "store_unavailable", "redis %s:%d: %s", c->host, c->port, r->str)
                 : resil_error_result(L, "store_error", "redis: %s", r->str);
  } else {
    push_reply(L, r, 0);
    pushed = 1;
  }
  if (r) freeReplyObject(r);
  redisFree(rc);
  return pushed;
}

static int conn_close(lua_State *L) {
  redis_conn *c = check_conn(L, 1);
  /* A probe on it holds no reference to the conn: waiting for its reply
   * there, it outlived a conn collected meanwhile (its deadline and reply
   * wrote to freed memory), and no probe followed it. Freed now, it fails,
   * and the next is made on a connection of its own. Else its pending
   * replies still arrive, then it is freed. */
  if (c->ac) let_go_of(c, c->ac, !c->probe);
  return 0;
}

static double seconds_since(const struct timespec *t0) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - t0->tv_sec) + (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

/* The server has read everything sent: our side is shut, and its replies
 * read (and dropped) until it closes its side too. Closing at once with
 * replies unread sends a reset, and the server drops what it had not read
 * yet: a burst of 200 ledger rows at the end of a script lost 116. */
static void drain_until_closed(redis_conn *c, const struct timespec *t0, double limit) {
  int fd = c->ac->c.fd;
  if (shutdown(fd, SHUT_WR) != 0) return;
  char buf[16384];
  for (;;) {
    double left = limit - seconds_since(t0);
    if (left <= 0) return;
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, (int)(left * 1000) + 1) <= 0) return;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) return;
  }
}

/* Collected (the host closing) with commands this process has sent and not
 * had the replies of (conn:send's: the ledger's rows nobody waited for):
 * those still queued here are written now, and the server is given the
 * time to read them all, up to the timeout (limit, from t0), so that it runs
 * them. The answers of kept ones (scripts) are read: a NOSCRIPT one is sent
 * again whole, and those the connection ends without become orphans
 * (send_orphans); other replies are not read. A connection still being made
 * is finished first. A graceful stop's end (R->close_by, resil.stop_now)
 * comes first: a frozen server never reads them, and waiting its whole
 * timeout kept a stopping gateway past its drain_timeout. What was handed to
 * the kernel by then is still there for a server that thaws (our side's
 * close is a FIN after it). */
static void write_queued(redis_conn *c, const struct timespec *t0, double limit) {
  for (;;) {
    redisContext *rc = c->ac ? &c->ac->c : NULL;
    if (!rc || rc->err) return;
    int done = 0;
    short want = POLLOUT;
    if (rc->flags & REDIS_CONNECTED) {
      if (redisBufferWrite(rc, &done) != REDIS_OK) return;
      if (done) {
        if (!c->selecting && c->kept == 0) {
          drain_until_closed(c, t0, limit);
          return;
        }
        /* the SELECT's reply: then the commands held for it are queued (or
         * failed); or the answers to the kept ones: a NOSCRIPT one is sent
         * again whole (on_reply) */
        want = POLLIN;
      }
    } else {
      redisAsyncHandleWrite(c->ac); /* completes the connect (or fails it: c->ac is then NULL) */
    }
    double left = limit - seconds_since(t0);
    if (left <= 0 || !c->ac) return;
    struct pollfd p = {c->ac->c.fd, want, 0};
    int n = poll(&p, 1, (int)(left * 1000) + 1);
    if (n < 0) return;
    if (n > 0 && want == POLLIN) redisAsyncHandleRead(c->ac);
  }
}

/* The orphans (kept commands whose connection ended unanswered: a server
 * restarted, a reset) sent again, in their order, on a connection of their
 * own, within the time left. Each is safe to run twice (a row's dedupe key,
 * a settle's ticket), and goes whole (EVAL): a restarted server knows no
 * script. -> how many were answered (they leave the list) */
static int send_orphans(redis_conn *c, double left) {
  orphan *in_order = NULL; /* (kept newest first; in order, they are also said so) */
  while (c->orphans) {
    orphan *o = c->orphans;
    c->orphans = o->next;
    o->next = in_order;
    in_order = o;
  }
  c->orphans = in_order;
  if (!c->orphans || left <= 0) return 0;
  struct timeval limit = timeval_of(left);
  redisReply *refused = NULL;
  redisContext *rc = connect_blocking(c, limit, &refused);
  int sent = 0, answered = 0, written = 0;
  if (rc && !rc->err && !refused) {
    for (orphan *o = c->orphans; o; o = o->next) {
      char *whole;
      size_t len;
      if (eval_form(c, o->text, o->len, &whole, &len)) {
        free(o->text);
        o->text = whole;
        o->len = len;
      }
      if (redisAppendFormattedCommand(rc, o->text, o->len) != REDIS_OK) break;
      sent++;
    }
    /* an error answer (a server restarted LOADING its data, past its
     * maxmemory) is a refusal, said as one (report_refused), not as a
     * command a thawing server may still run */
    for (; answered < sent; answered++) {
      redisReply *r = NULL;
      if (redisGetReply(rc, (void **)&r) != REDIS_OK || !r) break;
      orphan *o = c->orphans;
      c->orphans = o->next;
      if (r->type == REDIS_REPLY_ERROR) {
        if (!c->refused_error[0]) snprintf(c->refused_error, sizeof c->refused_error, "%s", r->str);
        o->next = c->refused_writes;
        c->refused_writes = o;
      } else {
        free(o->text);
        free(o);
        written++;
      }
      freeReplyObject(r);
    }
  }
  if (refused) freeReplyObject(refused);
  if (rc) redisFree(rc);
  return written;
}

/* a formatted command's argument i (0: the command's name) -> 1, in *arg, *arg_len; 0 if it has none */
static int command_arg(const char *f, size_t len, long i, const char **arg, size_t *arg_len) {
  const char *end = f + len;
  char *next;
  if (len < 1 || f[0] != '*') return 0;
  long argc = strtol(f + 1, &next, 10);
  if (i < 0 || i >= argc) return 0;
  for (long k = 0;; k++) {
    if (end - next < 3 || next[0] != '\r' || next[1] != '\n' || next[2] != '$') return 0;
    long n = strtol(next + 3, &next, 10);
    if (n < 0 || end - next < 2 || (size_t)(end - next - 2) < (size_t)n + 2) return 0;
    if (k == i) {
      *arg = next + 2;
      *arg_len = (size_t)n;
      return 1;
    }
    next += 2 + n;
  }
}

/* A kept script's first argument after its keys, as a log names it: a row's
 * id, a settle's ticket -> pushed (nothing if it has none) */
static int push_orphan_id(lua_State *L, const orphan *o) {
  const char *a;
  size_t n;
  if (!command_arg(o->text, o->len, 2, &a, &n) || n > 9) return 0;
  char digits[10];
  memcpy(digits, a, n);
  digits[n] = '\0';
  if (!command_arg(o->text, o->len, 3 + atol(digits), &a, &n)) return 0;
  lua_pushlstring(L, a, n);
  return 1;
}

#define ORPHAN_IDS_LOGGED 1000

/* The commands of *list freed, their ids (a row's id, a settle's ticket)
 * pushed in a table, in *list's order -> how many there were */
static int pop_ids(lua_State *L, orphan **list) {
  int n = 0;
  lua_newtable(L);
  while (*list) {
    orphan *o = *list;
    *list = o->next;
    if (n < ORPHAN_IDS_LOGGED && push_orphan_id(L, o)) lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    free(o->text);
    free(o);
    n++;
  }
  return n;
}

/* The kept commands refused at the close (an error answer), said and freed:
 * their rows and settles were not written. Before, nothing said so: a script
 * that ended as its Redis reached its maxmemory lost its last rows without
 * a word (at run time each is tried again, store.lua's retry_write). */
static void report_refused(redis_conn *c) {
  orphan *in_order = NULL; /* (kept newest first) */
  while (c->refused_writes) {
    orphan *o = c->refused_writes;
    c->refused_writes = o->next;
    o->next = in_order;
    in_order = o;
  }
  lua_State *L = c->R->L;
  int n = pop_ids(L, &in_order);
  lua_createtable(L, 0, 4);
  lua_rotate(L, -2, 1);
  lua_setfield(L, -2, "ids");
  lua_pushfstring(L, "%s:%d", c->host, c->port);
  lua_setfield(L, -2, "store");
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "refused");
  lua_pushfstring(L, "redis %s:%d: %s", c->host, c->port, c->refused_error);
  lua_setfield(L, -2, "error");
  host_log(L, "error", "redis: ledger writes (rows, settles) the server refused as the process ended were not "
                       "written; their costs are not in the ledger (ids: a row's id, a settle's ticket)");
}

/* What is left of the orphans, said and freed: their answers never came (a
 * frozen server, which may run them when it thaws; or none could be had).
 * Each is named (ids: a row's id, a settle's ticket), so that an operator
 * can look for it in the ledger: the count alone named none. */
static void report_orphans(redis_conn *c, int sent_again) {
  lua_State *L = c->R->L;
  int n = pop_ids(L, &c->orphans); /* ids */
  if (n == 0 && sent_again == 0) {
    lua_pop(L, 1);
    return;
  }
  int ids = lua_gettop(L);
  lua_createtable(L, 0, 4);
  if (n > 0) {
    lua_pushvalue(L, ids);
    lua_setfield(L, -2, "ids");
  }
  lua_remove(L, ids);
  lua_pushfstring(L, "%s:%d", c->host, c->port);
  lua_setfield(L, -2, "store");
  lua_pushinteger(L, sent_again);
  lua_setfield(L, -2, "sent_again");
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "unanswered");
  if (n == 0) {
    host_log(L, "warn", "redis: the connection ended with ledger writes unanswered as the process ended; "
                        "each was sent again on a new connection and answered");
  } else {
    lua_pushstring(L, c->last_error[0] ? c->last_error : "no answer in time");
    lua_setfield(L, -2, "error");
    host_log(L, "error", "redis: ledger writes (rows, settles) had no answer as the process ended: a frozen "
                         "server runs them when it thaws, a lost one may not have them; look for their ids or "
                         "tickets (ids) in the ledger");
  }
}

static int conn_gc(lua_State *L) {
  redis_conn *c = check_conn(L, 1);
  c->closing = 1;
  if (c->probe_timer) event_free(c->probe_timer);
  if (c->notify) event_free(c->notify);
  if (c->tell_later) event_free(c->tell_later);
  c->probe_timer = c->notify = c->tell_later = NULL;
  while (c->to_tell) { /* (no Lua is told at the close) */
    redis_cmd *cmd = c->to_tell;
    c->to_tell = cmd->next;
    luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_done);
    luaL_unref(L, LUA_REGISTRYINDEX, cmd->ref_result);
    free(cmd);
  }
  /* a graceful stop's end comes first (write_queued) */
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  double limit = c->timeout;
  if (c->R->close_by > 0) {
    double left = c->R->close_by - monotonic_now();
    if (left < limit) limit = left > 0 ? left : 0;
  }
  if (c->ac && c->pending > 0) write_queued(c, &t0, limit);
  cancel_resolve(c); /* (its kept commands become orphans: on_reply) */
  if (c->ac) {
    c->ac->data = NULL;
    redisAsyncFree(c->ac); /* (kept commands still unanswered become orphans: on_reply) */
    c->ac = NULL;
  }
  while (c->let_go) { /* likewise: their commands fail (or become orphans) now */
    let_go *l = c->let_go;
    c->let_go = l->next;
    l->ac->data = NULL;
    redisAsyncFree(l->ac);
    free(l);
  }
  if (c->orphans) report_orphans(c, send_orphans(c, limit - seconds_since(&t0)));
  if (c->refused_writes) report_refused(c);
  /* answered (now, or before) for tasks the host's close will never resume: a
   * conn is collected only once no task waits on it, but at the close its
   * tasks go together with it */
  while (c->R->closing && c->woken) {
    redis_cmd *cmd = c->woken;
    woken_unlink(cmd);
    free(cmd);
  }
  free(c->password);
  free(c->username);
  c->password = c->username = NULL;
  while (c->sources) {
    script_source *next = c->sources->next;
    free(c->sources->body);
    free(c->sources);
    c->sources = next;
  }
  return 0;
}

static int conn_connected(lua_State *L) {
  lua_pushboolean(L, check_conn(L, 1)->connected);
  return 1;
}

/* {down=, probes=, probe_every=, down_for=, refused=, error=}: down_for is
 * how long it has been down, or (just back) how long it was */
static void push_state(lua_State *L, redis_conn *c) {
  lua_createtable(L, 0, 6);
  lua_pushboolean(L, c->down);
  lua_setfield(L, -2, "down");
  lua_pushinteger(L, c->probes);
  lua_setfield(L, -2, "probes");
  lua_pushinteger(L, c->refused);
  lua_setfield(L, -2, "refused");
  if (c->down) {
    lua_pushnumber(L, c->probe_every);
    lua_setfield(L, -2, "probe_every");
  }
  if (c->down_since > 0) {
    lua_pushnumber(L, c->down ? monotonic_now() - c->down_since : c->down_lasted);
    lua_setfield(L, -2, "down_for");
  }
  if (c->last_error[0]) {
    lua_pushstring(L, c->last_error);
    lua_setfield(L, -2, "error");
  }
}

/* conn:state() -> {down=, probes=, probe_every=, refused=, ...} */
static int conn_state(lua_State *L) {
  push_state(L, check_conn(L, 1));
  return 1;
}

/* on_state(down, state), on the loop outside any task, once per change */
static void notify_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  redis_conn *c = arg;
  if (c->closing || c->ref_on_state == LUA_NOREF || c->told_down == c->down) return;
  c->told_down = c->down;
  lua_State *L = c->R->L;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref_on_state);
  lua_pushboolean(L, c->down);
  push_state(L, c);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "error");
    host_log(L, "error", "redis: the store's on_state raised");
  }
  lua_settop(L, top);
}

/* seconds in [0, 86400] from opts[name], else dflt; raises naming it */
static double opt_seconds(lua_State *L, const char *name, double dflt) {
  lua_getfield(L, 1, name);
  double v = luaL_optnumber(L, -1, dflt);
  lua_pop(L, 1);
  if (!(v >= 0 && v <= 86400)) luaL_error(L, "redis: %s must be in [0, 86400] seconds", name);
  return v;
}

/* resil.redis.connect{host=, port=, db=, password=, timeout=5, down=1, down_max=10, on_state=}
 * -> conn (connects lazily). down = 0: never down, each command tries the
 * server (a new connection at most once a second). */
static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  /* a host name: the resolver made before the conn, so that it is collected after it */
  lua_getfield(L, 1, "host");
  unsigned char addr[16];
  struct in_addr v4;
  const char *name = lua_tostring(L, -1);
  /* (inet_aton: the short forms getaddrinfo takes as addresses too, 127.1,
   * 0x7f.1; not one with text after a space, which it takes as a name) */
  int numeric = name && (evutil_inet_pton(AF_INET6, name, addr) == 1 ||
                         (inet_aton(name, &v4) != 0 && !strpbrk(name, " \t\n")));
  redis_dns *dns = name && !numeric ? dns_get(L, resil_from_lua(L)) : NULL;
  lua_pop(L, 1);
  redis_conn *c = lua_newuserdatauv(L, sizeof *c, 0);
  memset(c, 0, sizeof *c);
  c->dns = dns;
  c->R = resil_from_lua(L);
  c->ref_self = LUA_NOREF;
  luaL_setmetatable(L, CONN_MT);
  lua_getfield(L, 1, "host");
  snprintf(c->host, sizeof c->host, "%s", luaL_optstring(L, -1, "127.0.0.1"));
  lua_getfield(L, 1, "port");
  c->port = (int)luaL_optinteger(L, -1, 6379);
  lua_getfield(L, 1, "db");
  lua_Integer db = luaL_optinteger(L, -1, 0);
  if (db < 0 || db > INT_MAX) return luaL_error(L, "redis: db must be from 0 to %d", INT_MAX); /* (was cut to an int) */
  c->db = (int)db;
  lua_getfield(L, 1, "password");
  if (lua_isstring(L, -1)) c->password = strdup(lua_tostring(L, -1));
  lua_getfield(L, 1, "username");
  if (lua_isstring(L, -1) && lua_rawlen(L, -1) > 0) c->username = strdup(lua_tostring(L, -1));
  lua_pop(L, 1);
  lua_getfield(L, 1, "timeout");
  c->timeout = luaL_optnumber(L, -1, DEFAULT_TIMEOUT);
  if (!(c->timeout > 0 && c->timeout <= 86400)) return luaL_error(L, "redis: timeout must be in (0, 86400] seconds");
  lua_pop(L, 5);
  c->ref_on_state = LUA_NOREF;
  c->down_first = opt_seconds(L, "down", DEFAULT_DOWN);
  c->down_max = opt_seconds(L, "down_max", c->down_first > DEFAULT_DOWN_MAX ? c->down_first : DEFAULT_DOWN_MAX);
  if (c->down_max < c->down_first) return luaL_error(L, "redis: down_max must be at least down");
  if (lua_getfield(L, 1, "on_state") == LUA_TFUNCTION) c->ref_on_state = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  c->tell_later = event_new(c->R->base, -1, 0, tell_later_cb, c);
  if (c->down_first > 0) {
    c->probe_timer = evtimer_new(c->R->base, probe_fire, c);
    c->notify = event_new(c->R->base, -1, 0, notify_cb, c);
  }
  return 1;
}

static const luaL_Reg conn_methods[] = {
  {"call", conn_call},   {"send", conn_send},           {"call_now", conn_call_now}, {"script_source", conn_script_source},
  {"close", conn_close}, {"connected", conn_connected}, {"state", conn_state},
  {"call_or_give_back", conn_call_or_give_back},        {NULL, NULL}};

int luaopen_resil_redis(lua_State *L) {
  luaL_newmetatable(L, CONN_MT);
  luaL_newlib(L, conn_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, conn_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, l_connect);
  lua_setfield(L, -2, "connect");
  return 1;
}
