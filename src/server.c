/*
 * server.c: an embedded HTTP server on libevent's evhttp, for the mock
 * provider and the metrics endpoint (resil.metrics.serve).
 *
 *   local s = resil.server.listen{ host = "127.0.0.1", port = 0,
 *                                  handler = function(req) return resp end }
 *   -- req  = { method, path, query, headers (lower-cased), body, peer }
 *   -- resp = { status, headers, body, delay = s, action = "hang"|"reset"|"truncate"|"raw",
 *   --          chunks = {...}, chunk_interval = s, stall_after = n }
 *
 * The handler runs on the host's main state, protected, and must not wait.
 * Delays and chunk intervals use host timers (so they follow the virtual
 * clock); nothing blocks: any number of delayed replies can be pending.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#include "host.h"

#define SERVER_MT "resil.Server"

typedef struct server server;
typedef enum { REPLY_NORMAL, REPLY_HANG, REPLY_RESET, REPLY_TRUNCATE, REPLY_RAW } reply_action;

/* A reply that is not sent yet: waiting for its delay, between chunks, or
 * hanging until the client gives up. */
typedef struct pending {
  server *srv;
  struct evhttp_request *req;
  struct evhttp_connection *conn;
  struct pending *next;
  resil_timer timer;
  struct event *client_watch; /* notices a client that hangs up while we wait */
  reply_action action;
  int status;
  struct evkeyvalq headers;
  char *body;
  size_t body_len;
  char **chunks;
  int nchunks, next_chunk, stall_after, started;
  double chunk_interval;
} pending;

struct server {
  resil_t *R;
  struct evhttp *http;
  int port;
  int handler_ref;
  pending *pendings;
};

static void pending_free(pending *p) {
  timer_free(&p->timer);
  if (p->client_watch) event_free(p->client_watch);
  evhttp_clear_headers(&p->headers);
  free(p->body);
  for (int i = 0; i < p->nchunks; i++) free(p->chunks[i]);
  free(p->chunks);
  free(p);
}

static void pending_unlink(pending *p) {
  pending **pp = &p->srv->pendings;
  while (*pp && *pp != p) pp = &(*pp)->next;
  if (*pp) *pp = p->next;
}

/* The client went away (or the connection was freed): forget its replies. */
static void connection_closed(struct evhttp_connection *conn, void *arg) {
  server *srv = arg;
  pending **pp = &srv->pendings;
  while (*pp) {
    pending *p = *pp;
    if (p->conn == conn) {
      *pp = p->next;
      pending_free(p);
    } else {
      pp = &p->next;
    }
  }
}

/* evhttp does not read from a connection while a reply is outstanding, so
 * it would not notice the client leaving; peek at the socket ourselves. */
static void client_gone_cb(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  pending *p = arg;
  char c;
  ssize_t n = recv(fd, &c, 1, MSG_PEEK);
  if (n > 0) return; /* a pipelined request: not a hang-up; stop watching */
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
    event_add(p->client_watch, NULL);
    return;
  }
  evhttp_connection_free(p->conn); /* its close callback frees p */
}

static void watch_client(pending *p) {
  if (p->client_watch) return;
  struct bufferevent *bev = evhttp_connection_get_bufferevent(p->conn);
  evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
  if (fd < 0) return;
  p->client_watch = event_new(p->srv->R->base, fd, EV_READ, client_gone_cb, p);
  if (p->client_watch) event_add(p->client_watch, NULL);
}

static void copy_headers(struct evhttp_request *req, struct evkeyvalq *from) {
  struct evkeyvalq *out = evhttp_request_get_output_headers(req);
  for (struct evkeyval *h = from->tqh_first; h; h = h->next.tqe_next) evhttp_add_header(out, h->key, h->value);
}

/* Close the connection with a TCP reset, on the next loop turn (never from
 * inside evhttp's own callback). */
static void reset_later_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  struct evhttp_connection *conn = arg;
  struct bufferevent *bev = evhttp_connection_get_bufferevent(conn);
  evutil_socket_t sock = bev ? bufferevent_getfd(bev) : -1;
  if (sock >= 0) {
    struct linger lg = {1, 0};
    setsockopt(sock, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  }
  evhttp_connection_free(conn);
}

static void close_later_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  evhttp_connection_free(arg);
}

/* The first half of a truncated body is on the wire: hang up politely, so
 * the client sees a short body rather than a reset. */
static void truncated_chunk_sent(struct evhttp_connection *conn, void *arg) {
  event_base_once(arg, -1, EV_TIMEOUT, close_later_cb, conn, NULL);
}

static void send_next_chunk(void *arg);

static void pending_send(pending *p) {
  struct evhttp_request *req = p->req;
  copy_headers(req, &p->headers);
  switch (p->action) {
  case REPLY_HANG: watch_client(p); return; /* until the client gives up */
  case REPLY_RESET:
    pending_unlink(p);
    event_base_once(p->srv->R->base, -1, EV_TIMEOUT, reset_later_cb, p->conn, NULL);
    pending_free(p);
    return;
  case REPLY_TRUNCATE: {
    char len[32];
    snprintf(len, sizeof len, "%zu", p->body_len);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Length", len);
    evhttp_send_reply_start(req, p->status, "OK");
    struct evbuffer *buf = evbuffer_new();
    evbuffer_add(buf, p->body, p->body_len / 2);
    evhttp_send_reply_chunk_with_cb(req, buf, truncated_chunk_sent, p->srv->R->base);
    evbuffer_free(buf);
    pending_unlink(p);
    pending_free(p);
    return;
  }
  case REPLY_RAW: {
    /* bytes that are not HTTP at all (another protocol on the port), then
     * a polite close: the client must call it a protocol error */
    struct bufferevent *bev = evhttp_connection_get_bufferevent(p->conn);
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd >= 0) (void)!send(fd, p->body, p->body_len, MSG_NOSIGNAL);
    event_base_once(p->srv->R->base, -1, EV_TIMEOUT, close_later_cb, p->conn, NULL);
    pending_unlink(p);
    pending_free(p);
    return;
  }
  case REPLY_NORMAL: break;
  }
  if (p->nchunks > 0) {
    evhttp_send_reply_start(req, p->status, "OK");
    p->started = 1;
    watch_client(p);
    send_next_chunk(p);
    return;
  }
  struct evbuffer *buf = evbuffer_new();
  if (buf) evbuffer_add(buf, p->body, p->body_len);
  evhttp_send_reply(req, p->status, "OK", buf);
  if (buf) evbuffer_free(buf);
  pending_unlink(p);
  pending_free(p);
}

static void send_next_chunk(void *arg) {
  pending *p = arg;
  if (!p->started) {
    pending_send(p);
    return;
  }
  if (p->stall_after > 0 && p->next_chunk >= p->stall_after) return; /* stalled: hang mid-stream */
  if (p->next_chunk >= p->nchunks) {
    evhttp_send_reply_end(p->req);
    pending_unlink(p);
    pending_free(p);
    return;
  }
  struct evbuffer *buf = evbuffer_new();
  if (buf) {
    const char *c = p->chunks[p->next_chunk];
    evbuffer_add(buf, c, strlen(c));
    evhttp_send_reply_chunk(p->req, buf);
    evbuffer_free(buf);
  }
  p->next_chunk++;
  timer_start(&p->timer, p->chunk_interval);
}

/* ---------- request -> Lua -> reply ---------- */

/* L stack: -> req table */
static void push_request(lua_State *L, struct evhttp_request *req) {
  lua_createtable(L, 0, 6);
  static const struct {
    enum evhttp_cmd_type cmd;
    const char *name;
  } methods[] = {{EVHTTP_REQ_GET, "GET"},         {EVHTTP_REQ_POST, "POST"},   {EVHTTP_REQ_HEAD, "HEAD"},
                 {EVHTTP_REQ_PUT, "PUT"},         {EVHTTP_REQ_DELETE, "DELETE"}, {EVHTTP_REQ_OPTIONS, "OPTIONS"},
                 {EVHTTP_REQ_PATCH, "PATCH"}};
  const char *method = "OTHER";
  for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
    if (methods[i].cmd == evhttp_request_get_command(req)) method = methods[i].name;
  lua_pushstring(L, method);
  lua_setfield(L, -2, "method");
  const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
  const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
  const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
  lua_pushstring(L, path && *path ? path : "/");
  lua_setfield(L, -2, "path");
  lua_pushstring(L, query ? query : "");
  lua_setfield(L, -2, "query");
  lua_newtable(L);
  struct evkeyvalq *in = evhttp_request_get_input_headers(req);
  for (struct evkeyval *h = in->tqh_first; h; h = h->next.tqe_next) {
    luaL_Buffer name;
    luaL_buffinit(L, &name);
    for (const char *c = h->key; *c; c++) luaL_addchar(&name, (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c));
    luaL_pushresult(&name);
    lua_pushstring(L, h->value);
    lua_rawset(L, -3);
  }
  lua_setfield(L, -2, "headers");
  struct evbuffer *body = evhttp_request_get_input_buffer(req);
  size_t len = evbuffer_get_length(body);
  lua_pushlstring(L, (const char *)evbuffer_pullup(body, -1), len);
  lua_setfield(L, -2, "body");
  /* the client's address and port: one connection, one peer */
  struct evhttp_connection *conn = evhttp_request_get_connection(req);
  char *address = NULL;
  ev_uint16_t port = 0;
  if (conn) evhttp_connection_get_peer(conn, &address, &port);
  lua_pushfstring(L, "%s:%d", address ? address : "?", (int)port);
  lua_setfield(L, -2, "peer");
}

static char *dup_bytes(const char *s, size_t len) {
  char *copy = malloc(len + 1);
  if (copy) {
    memcpy(copy, s, len);
    copy[len] = '\0';
  }
  return copy;
}

/* L stack: resp table at idx -> fills p (all copied into C memory) */
static void read_reply(lua_State *L, int idx, pending *p) {
  lua_getfield(L, idx, "status");
  p->status = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 200;
  lua_pop(L, 1);
  lua_getfield(L, idx, "action");
  const char *action = lua_tostring(L, -1);
  if (action && strcmp(action, "hang") == 0) p->action = REPLY_HANG;
  else if (action && strcmp(action, "reset") == 0) p->action = REPLY_RESET;
  else if (action && strcmp(action, "truncate") == 0) p->action = REPLY_TRUNCATE;
  else if (action && strcmp(action, "raw") == 0) p->action = REPLY_RAW;
  lua_pop(L, 1);
  int has_type = 0;
  if (lua_getfield(L, idx, "headers") == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_isstring(L, -1)) {
        const char *k = lua_tostring(L, -2);
        if (strcasecmp(k, "content-type") == 0) has_type = 1;
        evhttp_add_header(&p->headers, k, lua_tostring(L, -1));
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  if (!has_type) evhttp_add_header(&p->headers, "Content-Type", "application/json");
  size_t len = 0;
  lua_getfield(L, idx, "body");
  const char *body = lua_tolstring(L, -1, &len);
  p->body = dup_bytes(body ? body : "", body ? len : 0);
  p->body_len = body ? len : 0;
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "chunks") == LUA_TTABLE) {
    int n = (int)luaL_len(L, -1);
    p->chunks = calloc((size_t)(n > 0 ? n : 1), sizeof *p->chunks);
    for (int i = 1; p->chunks && i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *c = lua_tolstring(L, -1, &len);
      p->chunks[p->nchunks++] = dup_bytes(c ? c : "", c ? len : 0);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, idx, "chunk_interval");
  p->chunk_interval = lua_tonumber(L, -1);
  lua_getfield(L, idx, "stall_after");
  p->stall_after = (int)lua_tointeger(L, -1);
  lua_pop(L, 2);
}

static void request_cb(struct evhttp_request *req, void *arg) {
  server *srv = arg;
  lua_State *L = srv->R->L;
  int top = lua_gettop(L);
  pending *p = calloc(1, sizeof *p);
  if (!p) {
    evhttp_send_error(req, 500, "out of memory");
    return;
  }
  p->srv = srv;
  p->req = req;
  p->conn = evhttp_request_get_connection(req);
  TAILQ_INIT(&p->headers);
  timer_init(srv->R, &p->timer, send_next_chunk, p);
  p->next = srv->pendings;
  srv->pendings = p;
  evhttp_connection_set_closecb(p->conn, connection_closed, srv);

  lua_pushcfunction(L, resil_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->handler_ref);
  push_request(L, req);
  if (lua_pcall(L, 1, 1, top + 1) != LUA_OK) {
    redact_fprintf(srv->R, stderr, "resil-lua: server handler failed: %s\n", lua_tostring(L, -1));
    lua_settop(L, top);
    lua_pushliteral(L, "handler error");
    p->status = 500;
    p->body = dup_bytes("{\"error\":{\"message\":\"handler error\"}}", 37);
    p->body_len = 37;
    evhttp_add_header(&p->headers, "Content-Type", "application/json");
  } else if (lua_istable(L, -1)) {
    read_reply(L, lua_gettop(L), p);
  } else {
    p->status = 404;
    p->body = dup_bytes("{\"error\":{\"message\":\"not found\"}}", 33);
    p->body_len = 33;
    evhttp_add_header(&p->headers, "Content-Type", "application/json");
  }
  double delay = 0;
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "delay");
    delay = lua_tonumber(L, -1);
  }
  lua_settop(L, top);
  if (delay > 0) {
    watch_client(p);
    timer_start(&p->timer, delay);
  } else {
    pending_send(p);
  }
}

/* ---------- Lua API ---------- */

static server *check_server(lua_State *L, int idx) {
  server *srv = luaL_checkudata(L, idx, SERVER_MT);
  if (!srv->http) luaL_error(L, "attempt to use a stopped server");
  return srv;
}

static void server_stop(lua_State *L, server *srv) {
  if (srv->http) {
    evhttp_free(srv->http); /* closes connections; their close callbacks drop pendings */
    srv->http = NULL;
  }
  while (srv->pendings) {
    pending *p = srv->pendings;
    srv->pendings = p->next;
    pending_free(p);
  }
  if (srv->handler_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, srv->handler_ref);
  srv->handler_ref = LUA_NOREF;
}

/* resil.server.listen{host=, port=, handler=} -> server */
static int l_listen(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  resil_t *R = resil_from_lua(L);
  lua_getfield(L, 1, "host");
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  lua_Integer port = luaL_optinteger(L, -1, 0);
  lua_getfield(L, 1, "handler");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  if (port < 0 || port > 65535) return luaL_error(L, "server: port %d out of range", (int)port);

  server *srv = lua_newuserdatauv(L, sizeof *srv, 0);
  memset(srv, 0, sizeof *srv);
  srv->R = R;
  srv->handler_ref = LUA_NOREF;
  luaL_setmetatable(L, SERVER_MT);
  srv->http = evhttp_new(R->base);
  if (!srv->http) return luaL_error(L, "server: cannot create the HTTP server");
  evhttp_set_allowed_methods(srv->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT |
                                            EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
  evhttp_set_gencb(srv->http, request_cb, srv);
  /* our own listening socket: evhttp's default backlog (128) drops
   * connections when thousands of clients arrive at once */
  struct evutil_addrinfo hints = {0}, *ai = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = EVUTIL_AI_PASSIVE | EVUTIL_AI_NUMERICHOST;
  char port_text[16];
  snprintf(port_text, sizeof port_text, "%d", (int)port);
  evutil_socket_t fd = -1;
  if (evutil_getaddrinfo(host, port_text, &hints, &ai) == 0 && ai) {
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd >= 0 && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
                    bind(fd, ai->ai_addr, (socklen_t)ai->ai_addrlen) != 0 || listen(fd, 65535) != 0)) {
      evutil_closesocket(fd);
      fd = -1;
    }
    evutil_freeaddrinfo(ai);
  }
  if (fd < 0 || !evhttp_accept_socket_with_handle(srv->http, fd)) {
    if (fd >= 0) evutil_closesocket(fd);
    evhttp_free(srv->http);
    srv->http = NULL;
    return luaL_error(L, "server: cannot listen on %s:%d (%s)", host, (int)port, strerror(errno));
  }
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &len);
  srv->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  lua_pushvalue(L, -2);
  srv->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static int server_port(lua_State *L) {
  lua_pushinteger(L, check_server(L, 1)->port);
  return 1;
}

static int server_pending(lua_State *L) {
  int n = 0;
  for (pending *p = check_server(L, 1)->pendings; p; p = p->next) n++;
  lua_pushinteger(L, n);
  return 1;
}

static int server_close(lua_State *L) {
  server_stop(L, luaL_checkudata(L, 1, SERVER_MT));
  return 0;
}

static const luaL_Reg server_methods[] = {
  {"port", server_port}, {"pending", server_pending}, {"close", server_close}, {NULL, NULL}};

static const luaL_Reg server_meta[] = {{"__gc", server_close}, {"__close", server_close}, {NULL, NULL}};

int luaopen_resil_server(lua_State *L) {
  luaL_newmetatable(L, SERVER_MT);
  luaL_setfuncs(L, server_meta, 0);
  luaL_newlib(L, server_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, l_listen);
  lua_setfield(L, -2, "listen");
  return 1;
}
