/*
 * server.c: an embedded HTTP server on libevent's evhttp, for the mock
 * provider and the metrics endpoint (resil.metrics.serve).
 *
 *   local s = resil.server.listen{ host = "127.0.0.1", port = 0,
 *                                  handler = function(req) return resp end,
 *                                  max_headers = 64 KiB, max_body = 16 MiB, read_timeout = 30,
 *                                  tasks = false, reuseport = false, from = server, utf8 = false }
 *   -- from: share that server's listening socket (no bind; a policy reload's handover)
 *   s:set_handler(fn) -> the handler before (the requests read from then on run fn)
 *   -- req  = { method, path, query, headers (lower-cased), body, peer }
 *   -- resp = { status, headers, body, delay = s, action = "hang"|"reset"|"truncate"|"raw",
 *   --          chunks = {...}, chunk_interval = s, stall_after = n }
 *
 * The handler runs on the host's main state through host_pcall (protected,
 * under the instruction and memory caps and the interrupt hook) and must
 * not wait. With tasks = true each request is a task of its own instead: the
 * handler may wait (HTTP, buckets, the store), a reply may be streamed
 * ({status, headers, stream = function(write) ... end, cut = "..."}: each
 * write is one chunk on the wire, and waits while the client is slow to
 * read; write(chunk, true) starts its ending; `cut` is what
 * server:cut_streams() sends before ending a stream not yet ending), and a
 * client that hangs up cancels the task, which aborts what it waits on and
 * gives back what it holds. Delays and chunk intervals use host timers (so they follow the
 * virtual clock); nothing blocks: any number of delayed replies can be
 * pending. Limits: a request whose headers pass max_headers gets a 431, a
 * body past max_body a 413 (at once when its Content-Length says so), and one not
 * read within read_timeout of its first byte a 408 (real time: clients live
 * in the real world); a malformed one a 400, an HTTP major version not 1 a 505; each
 * with the server's JSON error body (conn_output_cb) and a request id, in the
 * shape of the request's API (Anthropic's under /v1/messages, OpenAI's elsewhere). With
 * utf8 = true a body that is not UTF-8 is a 400 before any handler runs
 * (a JSON API's: RFC 8259 8.1).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <strings.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/http.h>
#include <event2/http_struct.h> /* a request's HTTP version (libevent 2.1 has no getter) */
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>

#include "host.h"

#define SERVER_MT "resil.Server"
#define DEFAULT_MAX_HEADERS (64 * 1024)
#define DEFAULT_MAX_BODY (16 * 1024 * 1024)
#define DEFAULT_READ_TIMEOUT 30.0

/* The server's own error replies (a request it refuses, one not read in
 * time, a handler that raised) are JSON in the shape of the API the request
 * speaks (conn_note_api; api_error_body), each with a request id of its own
 * in x-request-id (and request-id, where Anthropic's SDK reads it), as every
 * answer the gateway's handler makes has: a client's error.requestID was
 * undefined on these alone, and they were one hybrid shape for both APIs.
 * Their messages are constants, or made of bytes that need no JSON escape. */
#define REQUEST_ID_SIZE 25 /* "req_" and 20 hex digits, as the gateway's own ids */
#define HANDLER_ERROR "handler error"

typedef struct server server;
typedef struct conn conn;
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
  int own_date; /* the handler named a Date header */
  char *body;
  size_t body_len;
  char **chunks;
  size_t *chunk_lens; /* (a chunk may hold NUL bytes) */
  int nchunks, next_chunk, started;
  int stall_after; /* stall_after + 1 (0: none): a stream stalled before its first chunk too */
  double chunk_interval, delay;
  /* tasks = true: the task running the handler, until it has answered */
  task *task;
  int task_ref;
  struct reply_handle *handle;
  task *drain_waiter; /* a write waiting for the client to read */
  conn *c;            /* its connection's tracking, which outlives it */
  char *cut_tail;     /* a streamed reply's last chunk if the server cuts it (reply.cut) */
  size_t cut_tail_len;
} pending;

/* What a handler task holds: the reply it writes to, cleared when the
 * reply is gone (the client left, the server stopped). */
typedef struct reply_handle {
  pending *p;
} reply_handle;

/* One per accepted connection, to time the reading of each request: from
 * its first byte until evhttp hands it over. libevent 2.1's own timeout is
 * an idle timeout that closes without a reply. */
struct conn {
  server *srv;
  struct bufferevent *bev;
  struct evhttp_connection *evcon; /* known from set-up on */
  struct evbuffer_cb_entry *first_byte; /* enabled while waiting for a request, and its API (api_pending) */
  struct event *ev;                /* set-up, then the read deadline */
  evutil_socket_t fd;
  pending *streaming; /* the reply being streamed on it, told when its writes drain */
  int reading_untimed; /* a reply streams on it: only its writes are timed (reply_streams) */
  struct evbuffer_cb_entry *own_error; /* enabled while a request is read: libevent's error page, rewritten */
  int anthropic;                       /* the request read is Anthropic's API (conn_note_api) */
  int api_pending;                     /* its first bytes are here, its path not yet whole: first_byte watches on */
  /* The request as it arrives (conn_scan), for what libevent does not tell
   * apart: headers too large from malformed ones (both its 400), a malformed
   * chunk from a body too large (both its 413); and a Content-Length past
   * max_body, whose body libevent waits for before its 413. */
  int reading;      /* its first byte came */
  int scanning;     /* SCAN_*: what the next bytes are */
  int lines;        /* lines of its head so far */
  int http10;       /* its request line says HTTP/1.0 */
  int version;      /* VERSION_*: its request line's HTTP version, as RFC 9112 2.3 reads it */
  char version_seen[9]; /* (that version, for the 505's message) */
  int no_body;      /* HEAD or TRACE: libevent reads no body */
  int chunked;      /* its (first) Transfer-Encoding: 1 chunked, 2 another, 0 none */
  int te_headers;   /* its Transfer-Encoding headers (libevent refuses a second one, a 400) */
  int chunk_bad;    /* 1: a chunk size not 1*HEXDIG; 2: past its last chunk (the trailer); 3: a size line
                     * too long; 4: a chunk's data not followed by its line end */
  int chunk_state;  /* CHUNK_*: where the size line read so far is */
  int chunk_cr;     /* that line's last byte was a CR */
  int head_nul;     /* a NUL byte in its head */
  int folded;       /* a header line folded onto the one before (obs-fold): refused */
  size_t line0_len; /* its request line's length, once whole */
  int refused;      /* answered already (a 413 to an Expect): nothing more is sent */
  long long content_length; /* its first Content-Length, -1 none, -2 not digits */
  size_t head_size;         /* its head's bytes, as libevent counts them (without line ends) */
  double chunk_total;       /* a chunked body's bytes so far */
  long long chunk_left;     /* of the chunk being read */
  size_t line_len;          /* the current line's bytes so far */
  char line[48];            /* the start of a line that came in pieces */
  char tail[10];            /* its end (a request line's version) */
  conn *prev, *next;
};

struct server {
  resil_t *R;
  struct evhttp *http;
  struct evhttp_bound_socket *bound; /* its listening socket, until stop_accepting */
  int port;
  int handler_ref;
  int tasks; /* run the handler as a task */
  int utf8;  /* a body that is not UTF-8 is refused (utf8_invalid_at) */
  pending *pendings;
  conn *conns;
  conn **by_fd; /* request -> its connection */
  size_t by_fd_len;
  const struct timeval *read_timeout; /* a libevent common timeout */
  double max_body;                    /* (named in the 413's message) */
  double max_headers;                 /* (named in the 431's message) */
  struct timeval idle_timeout;        /* libevent's own, on each connection: read_timeout + 1 s */
  /* a handler (tasks = false) runs: a close (its own, or the collector's)
   * waits until it has returned, the server kept reachable meanwhile:
   * stopping inside libevent's request callback freed what it was using */
  int in_handler, stop_deferred, self_ref;
  struct event *accept_rest; /* re-enables the listener after accept() failed (accept_failed) */
  double accept_logged_at;   /* when that was last logged */
  server *next_listening;    /* the servers listening: libevent tells accept_failed only the evhttp */
  time_t date_at;            /* the second `date` was made for (add_date) */
  char date[40];
};

/* The servers listening, in every host of the process (hosts may run on
 * threads of their own, and move between them): accept_failed finds its own
 * by its evhttp. */
static server *listening;
static pthread_mutex_t listening_lock = PTHREAD_MUTEX_INITIALIZER;

static void listening_add(server *srv) {
  pthread_mutex_lock(&listening_lock);
  srv->next_listening = listening;
  listening = srv;
  pthread_mutex_unlock(&listening_lock);
}

static void listening_remove(server *srv) {
  pthread_mutex_lock(&listening_lock);
  for (server **at = &listening; *at; at = &(*at)->next_listening) {
    if (*at == srv) {
      *at = srv->next_listening;
      break;
    }
  }
  pthread_mutex_unlock(&listening_lock);
}

static server *listening_find(void *http) {
  pthread_mutex_lock(&listening_lock);
  server *srv = listening;
  while (srv && srv->http != http) srv = srv->next_listening;
  pthread_mutex_unlock(&listening_lock);
  return srv;
}

static void pending_clear_reply(pending *p) {
  free(p->body);
  for (int i = 0; i < p->nchunks; i++) free(p->chunks[i]);
  free(p->chunks);
  free(p->chunk_lens);
  free(p->cut_tail);
  p->cut_tail = NULL;
  p->cut_tail_len = 0;
  p->body = NULL;
  p->chunks = NULL;
  p->chunk_lens = NULL;
  p->body_len = 0;
  p->nchunks = p->stall_after = p->own_date = 0;
  p->chunk_interval = p->delay = 0;
  p->action = REPLY_NORMAL;
}

/* The handler's task no longer owns the reply: it answered, or the reply
 * is gone. A reply freed while its task still waits means the client left
 * (or the server stopped): the task is canceled, which aborts its transfers
 * and gives back what it holds. */
static void pending_detach(pending *p, int cancel) {
  task *t = p->task;
  int ref = p->task_ref;
  if (p->handle) p->handle->p = NULL;
  p->handle = NULL;
  p->task = p->drain_waiter = NULL;
  p->task_ref = LUA_NOREF;
  if (t && cancel) task_stop(t); /* -1 (it is the running one): it sees its handle cleared */
  if (ref != LUA_NOREF) luaL_unref(p->srv->R->L, LUA_REGISTRYINDEX, ref);
}

static void pending_free(pending *p) {
  pending_detach(p, 1);
  if (p->c && p->c->streaming == p) p->c->streaming = NULL;
  timer_free(&p->timer);
  if (p->client_watch) event_free(p->client_watch);
  pending_clear_reply(p);
  free(p);
}

static void pending_unlink(pending *p) {
  pending **pp = &p->srv->pendings;
  while (*pp && *pp != p) pp = &(*pp)->next;
  if (*pp) *pp = p->next;
}

/* The client went away (or the connection was freed): forget its replies. */
static void drop_pendings(server *srv, struct evhttp_connection *evcon) {
  pending **pp = &srv->pendings;
  while (*pp) {
    pending *p = *pp;
    if (p->conn == evcon) {
      *pp = p->next;
      /* a client that failed a write mid-reply: libevent detached the
       * request from the connection and leaves it to us to free */
      if (!evhttp_request_get_connection(p->req)) evhttp_request_free(p->req);
      pending_free(p);
    } else {
      pp = &p->next;
    }
  }
}

/* ---------- connections: the read deadline ---------- */

static void conn_free(conn *c) {
  server *srv = c->srv;
  if (c->prev) c->prev->next = c->next;
  else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  if (c->fd >= 0 && (size_t)c->fd < srv->by_fd_len && srv->by_fd[c->fd] == c) srv->by_fd[c->fd] = NULL;
  if (c->first_byte) evbuffer_remove_cb_entry(bufferevent_get_input(c->bev), c->first_byte);
  if (c->own_error) evbuffer_remove_cb_entry(bufferevent_get_output(c->bev), c->own_error);
  if (c->ev) event_free(c->ev);
  free(c);
}

static conn *conn_of(server *srv, struct evhttp_request *req) {
  struct evhttp_connection *evcon = evhttp_request_get_connection(req);
  struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
  evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
  conn *c = fd >= 0 && (size_t)fd < srv->by_fd_len ? srv->by_fd[fd] : NULL;
  return c && c->evcon == evcon ? c : NULL;
}

/* evhttp is closing the connection (the fd is still open). */
static void conn_closed(struct evhttp_connection *evcon, void *arg) {
  conn *c = arg;
  drop_pendings(c->srv, evcon);
  conn_free(c);
}

static void new_request_id(char id[REQUEST_ID_SIZE]) {
  unsigned char bytes[10];
  evutil_secure_rng_get_bytes(bytes, sizeof bytes);
  memcpy(id, "req_", 4);
  for (size_t i = 0; i < sizeof bytes; i++) snprintf(id + 4 + 2 * i, 3, "%02x", bytes[i]);
}

/* One of the server's own errors as the API's clients read theirs:
 * Anthropic's {"type": "error", "error": {"type", "message"}, "request_id"},
 * OpenAI's {"error": {"message", "type", "param", "code"}} -> its length (0:
 * it did not fit) */
static int api_error_body(int anthropic, int status, const char *message, const char *id, char *body, size_t size) {
  const char *type = status == 500 || status == 503 ? "api_error" : "invalid_request_error", *code = "null";
  if (status == 413) {
    if (anthropic) type = "request_too_large";
    code = "\"request_too_large\"";
  }
  int len = anthropic ? snprintf(body, size,
                                 "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":\"%s\"},"
                                 "\"request_id\":\"%s\"}\n",
                                 type, message, id)
                      : snprintf(body, size,
                                 "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,\"code\":%s}}\n",
                                 message, type, code);
  return len > 0 && (size_t)len < size ? len : 0;
}

static void conn_send_own(conn *c, int status, const char *phrase, const char *body, int body_len, const char *id);
static int own_error_body(conn *c, int status, const char *id, char *body, size_t size);

static void conn_deadline_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  conn *c = arg;
  /* not in the middle of one of evhttp's own error replies, nor after the 413 sent early */
  if (!c->refused && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0) {
    char id[REQUEST_ID_SIZE], body[400];
    new_request_id(id);
    int n = own_error_body(c, 408, id, body, sizeof body);
    conn_send_own(c, 408, "Request Timeout", body, n, id);
  }
  evhttp_connection_free(c->evcon); /* its close callback frees c */
}

/* The API a request speaks, by its path, for the type in the server's own
 * error replies: Anthropic's under /v1/messages (messages, count_tokens,
 * batches), OpenAI's elsewhere. Read from its first bytes as they arrive:
 * libevent forgets a request's URI before it answers one it refuses.
 * -> 0 while the bytes there do not tell yet: a request line split across
 * TCP segments ("POST /v1/mes", then the rest) was typed OpenAI's. */
static int conn_note_api(conn *c, struct evbuffer *in) {
  struct evbuffer_iovec v; /* (its first chunk, read in place: the request line is mostly in it) */
  char copy[32];
  c->anthropic = 0;
  if (evbuffer_peek(in, 32, NULL, &v, 1) < 1) return 0;
  const char *line = v.iov_base;
  size_t len = v.iov_len;
  if (len < sizeof copy && evbuffer_get_length(in) > len) { /* (the line across chunks) */
    ev_ssize_t n = evbuffer_copyout(in, copy, sizeof copy);
    line = copy, len = n > 0 ? (size_t)n : 0;
  }
  const char *sp = memchr(line, ' ', len < 16 ? len : 16);
  if (!sp) return len >= 16 || memchr(line, '\n', len);
  if ((size_t)(sp - line) + 14 > len) return memchr(sp, '\n', len - (size_t)(sp - line)) != NULL;
  c->anthropic = memcmp(sp + 1, "/v1/messages", 12) == 0 && (sp[13] == ' ' || sp[13] == '/' || sp[13] == '?');
  return 1;
}

/* ---------- the request as it arrives ---------- */

enum { SCAN_OFF, SCAN_HEAD, SCAN_CHUNK_LINE, SCAN_CHUNK_DATA, SCAN_CHUNK_END };

/* A request line's HTTP version (RFC 9112 2.3: "HTTP/" DIGIT "." DIGIT, its
 * last word). libevent reads it with sscanf("HTTP/%d.%d"): it took
 * "HTTP/1.2" (and "HTTP/+1.-1") and answered in that version, and refused
 * HTTP/2.0 as a malformed request. A later HTTP/1 minor version is served
 * as HTTP/1.1 (RFC 9110 2.5: its messages are HTTP/1.1's; the answer says
 * HTTP/1.1, RFC 9112 2.3); another major version is a 505, a version not
 * in that form a 400. */
enum { VERSION_1, VERSION_1_LATER, VERSION_OTHER, VERSION_MALFORMED };

/* A reply of the server's own, written straight to the socket (libevent has
 * nothing in the output: a request is being read), in the request's HTTP
 * version as its other replies are. Connection: close: what follows it is
 * not read as a request. */
static void conn_send_own(conn *c, int status, const char *phrase, const char *body, int body_len, const char *id) {
  char text[900];
  int len = snprintf(text, sizeof text,
                     "HTTP/1.%d %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     "x-request-id: %s\r\n%s%s%sConnection: close\r\n\r\n%s",
                     c->http10 ? 0 : 1, status, phrase, body_len, id, c->anthropic ? "request-id: " : "",
                     c->anthropic ? id : "", c->anthropic ? "\r\n" : "", body);
  if (len > 0 && (size_t)len < sizeof text) (void)!send(c->fd, text, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static const char *reason_phrase(int status);

/* The server's own refusal as the request is read, at once: the connection
 * then reads nothing more (what the client sends waits in its socket) until
 * the read deadline closes it, without its 408, and libevent's own reply to
 * what it read already is not sent (conn_output_cb) */
static void conn_refuse_now(conn *c, int status) {
  char id[REQUEST_ID_SIZE], body[400];
  new_request_id(id);
  int n = own_error_body(c, status, id, body, sizeof body);
  conn_send_own(c, status, reason_phrase(status), body, n, id);
  shutdown(c->fd, SHUT_WR);
  c->refused = 1;
  c->scanning = SCAN_OFF;
  bufferevent_disable(c->bev, EV_READ);
}

static void conn_scan_reset(conn *c) {
  c->reading = c->lines = c->http10 = c->version = c->no_body = c->chunked = c->te_headers = 0;
  c->chunk_bad = c->refused = c->chunk_state = c->chunk_cr = c->head_nul = c->folded = 0;
  c->line0_len = 0;
  c->scanning = SCAN_HEAD;
  c->content_length = -1;
  c->head_size = 0;
  c->chunk_total = 0;
  c->chunk_left = 0;
  c->line_len = 0;
}

/* a header's value (as libevent trims it: spaces before it) if the line
 * (len bytes) names the header (n bytes, lower case), else NULL; *vlen its
 * length */
static const char *header_value(const char *line, size_t len, const char *name, size_t n, size_t *vlen) {
  if (len <= n || line[n] != ':' || strncasecmp(line, name, n) != 0) return NULL;
  size_t i = n + 1;
  while (i < len && line[i] == ' ') i++;
  *vlen = len - i;
  return line + i;
}

static int is_value(const char *v, size_t vlen, const char *want, size_t n) {
  if (vlen < n || strncasecmp(v, want, n) != 0) return 0;
  for (size_t i = n; i < vlen; i++)
    if (v[i] != ' ' && v[i] != '\t') return 0;
  return 1;
}

/* a line of the head, whole (len: its length without its line end; ver:
 * its last 8 bytes, the byte before them readable, or NULL when it is
 * shorter than 9) */
static void head_line(conn *c, const char *line, size_t len, const char *ver) {
  if (c->lines++ == 0) { /* the request line */
    if (!ver || ver[-1] != ' ' || memcmp(ver, "HTTP/", 5) != 0 || ver[5] < '0' || ver[5] > '9' || ver[6] != '.' ||
        ver[7] < '0' || ver[7] > '9')
      c->version = VERSION_MALFORMED;
    else
      c->version = ver[5] != '1' ? VERSION_OTHER : ver[7] > '1' ? VERSION_1_LATER : VERSION_1;
    if (ver) memcpy(c->version_seen, ver, 8), c->version_seen[8] = '\0';
    c->http10 = c->version == VERSION_1 && ver[7] == '0';
    c->no_body = (len >= 5 && memcmp(line, "HEAD ", 5) == 0) || (len >= 6 && memcmp(line, "TRACE ", 6) == 0);
    c->line0_len = c->head_size;
    /* CONNECT: libevent answers its 501 with Connection: close, but keeps
     * the connection open for CONNECT alone, and read what the client sent
     * after it (the tunnel's bytes) as requests, served. Refused here, and
     * closed. */
    if (len >= 8 && memcmp(line, "CONNECT ", 8) == 0 && c->version != VERSION_OTHER) conn_refuse_now(c, 501);
    return;
  }
  if (len == 0) { /* its end */
    c->scanning = c->chunked == 1 ? SCAN_CHUNK_LINE : SCAN_OFF;
    /* A Content-Length past max_body: libevent reads and drops the body
     * before its 413, and a client that holds its body back (Expect:
     * 100-continue, which libevent would answer 100) or sends less than it
     * said waited for the read deadline's 408. The 413 goes now; a body sent
     * anyway is still read and dropped (the connection then closes), so the
     * client reads the 413, not a reset. */
    if (!c->no_body && c->chunked != 1 && c->content_length >= 0 && (double)c->content_length > c->srv->max_body &&
        (double)c->head_size <= c->srv->max_headers && c->version != VERSION_OTHER) { /* (else a 431, a 505) */
      char id[REQUEST_ID_SIZE], body[400];
      new_request_id(id);
      int n = own_error_body(c, 413, id, body, sizeof body);
      conn_send_own(c, 413, "Request Entity Too Large", body, n, id); /* (as libevent names its own 413s) */
      shutdown(c->fd, SHUT_WR); /* (a client reading to the end has it all; a body sent anyway is still read) */
      c->refused = 1;
    }
    return;
  }
  const char *v;
  size_t vlen;
  switch (line[0] | 0x20) { /* (a line that cannot be one of the two, at one compare) */
  case 'c': case 't': break;
  default: return;
  }
  if ((v = header_value(line, len, "content-length", 14, &vlen)) && c->content_length == -1) {
    long long n = 0;
    size_t i = 0;
    /* (by value, as libevent's strtoll: leading zeros are no larger a length) */
    for (; i < vlen && v[i] >= '0' && v[i] <= '9'; i++) n = n > (LLONG_MAX - 9) / 10 ? LLONG_MAX : n * 10 + (v[i] - '0');
    size_t digits = i;
    while (i < vlen && (v[i] == ' ' || v[i] == '\t')) i++;
    c->content_length = digits > 0 && i == vlen ? n : -2;
  } else if ((v = header_value(line, len, "transfer-encoding", 17, &vlen)) && !c->te_headers++) { /* (libevent reads the first) */
    c->chunked = is_value(v, vlen, "chunked", 7) ? 1 : 2;
  }
}

/* A chunk's size line, byte by byte as it comes (p: k bytes, without the
 * line's LF), or the line end due after a chunk's data. Read as RFC 9112 7.1
 * frames it: 1*HEXDIG, then an extension after a space (libevent refuses
 * one without). libevent reads the size with strtoll, which takes a 0x
 * prefix, a sign and white space before it, and skips empty lines where a
 * size is due (a chunk's data not followed by its CRLF): a proxy in front
 * that reads such a body by the RFC finds its end elsewhere, and the bytes
 * after that end are a request it never saw (request smuggling). Those are
 * refused (request_cb). chunk_left holds the size so far. */
enum { CHUNK_BAD = -1, CHUNK_START, CHUNK_DIGITS, CHUNK_SPACE, CHUNK_EXT };

static void chunk_bytes(conn *c, const char *p, size_t k) {
  for (size_t i = 0; i < k && c->chunk_state != CHUNK_BAD; i++) {
    unsigned char ch = (unsigned char)p[i];
    if (c->chunk_cr || (c->scanning == SCAN_CHUNK_END && ch != '\r')) { /* (a CR not before the LF; bytes after the data) */
      c->chunk_state = CHUNK_BAD;
    } else if (ch == '\r') {
      c->chunk_cr = 1;
    } else if (c->chunk_state == CHUNK_EXT) {
    } else if (((ch >= '0' && ch <= '9') || ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'f')) && c->chunk_state <= CHUNK_DIGITS) {
      int d = ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
      c->chunk_left = c->chunk_left > (LLONG_MAX - 15) / 16 ? LLONG_MAX : c->chunk_left * 16 + d;
      c->chunk_state = CHUNK_DIGITS;
    } else if (ch == ' ' && c->chunk_state == CHUNK_DIGITS) {
      c->chunk_state = CHUNK_SPACE;
    } else if (c->chunk_state == CHUNK_SPACE && (ch == ' ' || ch == '\t' || ch == ';')) {
      if (ch == ';') c->chunk_state = CHUNK_EXT;
    } else {
      c->chunk_state = CHUNK_BAD;
    }
  }
}

/* the line chunk_bytes read is whole */
static void chunk_line_end(conn *c) {
  int state = c->chunk_state;
  c->chunk_state = CHUNK_START, c->chunk_cr = 0;
  if (c->scanning == SCAN_CHUNK_END) { /* (the line end after a chunk's data) */
    if (state == CHUNK_BAD) {
      c->chunk_bad = 4;
      c->scanning = SCAN_OFF;
    } else {
      c->scanning = SCAN_CHUNK_LINE;
    }
    return;
  }
  c->scanning = SCAN_OFF; /* unless a chunk follows */
  long long n = c->chunk_left;
  c->chunk_left = 0;
  if (state != CHUNK_DIGITS && state != CHUNK_SPACE && state != CHUNK_EXT) {
    c->chunk_bad = 1;
  } else if (n == 0) {
    c->chunk_bad = 2; /* a 413 from here on is about the trailer */
  } else if (c->chunk_total + (double)n <= c->srv->max_body) {
    c->chunk_total += (double)n;
    c->chunk_left = n;
    c->scanning = SCAN_CHUNK_DATA;
  }
}

/* a chunk size line longer than this is refused (valid ones are a few
 * hex digits: libevent refuses chunk extensions but after a space) */
#define CHUNK_LINE_MAX 4096

/* the 400 for a chunk size line past CHUNK_LINE_MAX, at once; the
 * connection then reads nothing more (what the client sends waits in its
 * socket) until the read deadline closes it, without its 408 */
static void conn_refuse_chunk_line(conn *c) {
  c->chunk_bad = 3;
  conn_refuse_now(c, 400);
}

/* n more bytes of the request: each line read in place, or, one that came
 * in pieces, from its start and end kept (c->line, c->tail) */
static void scan_bytes(conn *c, const char *p, size_t n) {
  while (n > 0 && c->scanning != SCAN_OFF) {
    if (c->scanning == SCAN_CHUNK_DATA) {
      size_t k = (unsigned long long)c->chunk_left < n ? (size_t)c->chunk_left : n;
      p += k, n -= k, c->chunk_left -= (long long)k;
      if (c->chunk_left == 0) c->scanning = SCAN_CHUNK_END;
      continue;
    }
    const char *nl = memchr(p, '\n', n);
    size_t k = nl ? (size_t)(nl - p) : n;
    if (c->scanning != SCAN_HEAD) { /* a chunk's size line, or the line end after its data */
      chunk_bytes(c, p, k);
      c->line_len += k;
      if (!nl) {
        /* a chunk size line without its end: libevent buffers it whole and
         * searches all of it for the end at each read (one client held the
         * loop's CPU and tens of MB until its read deadline): refused past
         * CHUNK_LINE_MAX, as Go's server does */
        if (c->line_len > CHUNK_LINE_MAX) conn_refuse_chunk_line(c);
        return;
      }
      p += k + 1, n -= k + 1;
      c->line_len = 0;
      chunk_line_end(c);
      continue;
    }
    c->head_size += k;
    if (memchr(p, '\0', k)) c->head_nul = 1;
    const char *line = p, *ver = NULL;
    size_t len = k;
    if (!nl || c->line_len > 0) { /* a line in pieces */
      if (c->line_len < sizeof c->line) {
        size_t m = sizeof c->line - c->line_len;
        memcpy(c->line + c->line_len, p, k < m ? k : m);
      }
      if (k >= sizeof c->tail) {
        memcpy(c->tail, p + k - sizeof c->tail, sizeof c->tail);
      } else if (k > 0) {
        memmove(c->tail, c->tail + k, sizeof c->tail - k);
        memcpy(c->tail + sizeof c->tail - k, p, k);
      }
      c->line_len += k;
      if (!nl) return;
      line = c->line, len = c->line_len;
      c->line_len = 0;
    }
    p += k + 1, n -= k + 1;
    /* (libevent's line ends: \r\n or \n) */
    int cr = len > 0 && (line == c->line ? c->tail[sizeof c->tail - 1] : line[len - 1]) == '\r';
    len -= (size_t)cr;
    if (len >= 9 && c->lines == 0) ver = line == c->line ? c->tail + sizeof c->tail - cr - 8 : line + len - 8;
    c->head_size -= (size_t)cr;
    if (c->lines > 0 && len > 0 && (line[0] == ' ' || line[0] == '\t')) c->folded = 1;
    if (line == c->line && len > sizeof c->line && c->lines > 0)
      c->lines++; /* (a header in pieces, longer than the start kept: none read here is that long) */
    else
      head_line(c, line, line == c->line && len > sizeof c->line ? sizeof c->line : len, ver);
  }
}

/* the input's bytes from offset `from` on */
static void conn_scan(conn *c, struct evbuffer *in, size_t from) {
  struct evbuffer_ptr pos;
  struct evbuffer_iovec v[8];
  if (evbuffer_ptr_set(in, &pos, from, EVBUFFER_PTR_SET) < 0) return;
  for (;;) {
    int n = evbuffer_peek(in, -1, &pos, v, 8);
    size_t seen = 0;
    for (int i = 0; i < n && i < 8 && c->scanning != SCAN_OFF; i++) {
      scan_bytes(c, v[i].iov_base, v[i].iov_len);
      seen += v[i].iov_len;
    }
    if (n <= 8 || c->scanning == SCAN_OFF || evbuffer_ptr_set(in, &pos, seen, EVBUFFER_PTR_ADD) < 0) return;
  }
}

static void conn_error_reply_cb(evutil_socket_t fd, short what, void *arg);
static void conn_refused_close_cb(evutil_socket_t fd, short what, void *arg);

/* the first n bytes of a bufferevent's output (whose start is frozen to
 * evbuffer_copyout) -> how many there were */
static size_t output_start(struct evbuffer *out, char *dst, size_t n) {
  struct evbuffer_iovec v[4];
  int k = evbuffer_peek(out, (ev_ssize_t)n, NULL, v, 4);
  size_t got = 0;
  for (int i = 0; i < k && i < 4 && got < n; i++) {
    size_t m = v[i].iov_len < n - got ? v[i].iov_len : n - got;
    memcpy(dst + got, v[i].iov_base, m);
    got += m;
  }
  return got;
}

/* libevent's own error replies (400: a malformed request, or headers past
 * max_headers; 413: a body past max_body, or a malformed chunk; 417; 501: an
 * unknown method) are HTML pages, which API
 * clients cannot read as errors. While a request is read nothing else writes
 * to the connection, so its output is watched then: an error reply seen
 * starting is rewritten once whole (conn_error_reply_cb), in the same loop
 * pass, before any of it is written. */
static void conn_output_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg) {
  conn *c = arg;
  char start[12];
  if (info->orig_size != 0 || output_start(buf, start, sizeof start) < sizeof start) return;
  if (memcmp(start, "HTTP/1.", 7) == 0 && start[9] == '1' && c->version == VERSION_1_LATER) {
    /* a 100 Continue, which libevent writes in the request's version
     * ("HTTP/1.2 100 Continue"): said in HTTP/1.1, as the reply after it is
     * (request_cb). Its one digit, in place. */
    struct evbuffer_iovec v;
    if (evbuffer_peek(buf, 8, NULL, &v, 1) == 1 && v.iov_len >= 8) ((char *)v.iov_base)[7] = '1';
    return;
  }
  if (memcmp(start, "HTTP/1.", 7) != 0 || start[9] < '4') return;
  evbuffer_cb_clear_flags(buf, c->own_error, EVBUFFER_CB_ENABLED);
  if (c->first_byte) evbuffer_cb_clear_flags(bufferevent_get_input(c->bev), c->first_byte, EVBUFFER_CB_ENABLED);
  c->api_pending = 0; /* (what comes in now is a body libevent drops) */
  evtimer_del(c->ev); /* the reply closes the connection */
  /* (after the 413 sent early, libevent's own, once the body it read is dropped: not sent) */
  event_assign(c->ev, c->srv->R->base, -1, 0, c->refused ? conn_refused_close_cb : conn_error_reply_cb, c);
  event_active(c->ev, EV_TIMEOUT, 1);
}

/* the message of one of the server's refusals as the request is read */
static void own_error_message(conn *c, int status, char *message, size_t size) {
  if (status == 413) {
    snprintf(message, size, "the request body is larger than this server accepts (%.0f bytes)",
             c->srv->max_body);
  } else if (status == 408) {
    snprintf(message, size, "request not read in time");
  } else if (status == 431) {
    snprintf(message, size, "the request's headers are larger than this server accepts (%.0f bytes)",
             c->srv->max_headers);
  } else if (status == 400 && c->chunk_bad == 1) {
    snprintf(message, size, "a malformed chunked request body: a chunk size that is not a hexadecimal number");
  } else if (status == 400 && c->chunk_bad == 3) {
    snprintf(message, size, "a malformed chunked request body: a chunk size line longer than %d bytes",
             CHUNK_LINE_MAX);
  } else if (status == 400 && c->chunk_bad == 4) {
    snprintf(message, size, "a malformed chunked request body: a chunk's data not followed by its line end");
  } else if (status == 505) {
    snprintf(message, size, "HTTP version %s is not supported: this server speaks HTTP/1.1 (and HTTP/1.0)",
             c->version_seen);
  } else if (status == 414) {
    snprintf(message, size, "the request line is longer than this server accepts (%.0f bytes)",
             c->srv->max_headers);
  } else if (status == 400 && c->folded) {
    snprintf(message, size, "a header line folded onto the one before (obs-fold, RFC 9112 5.2)");
  } else if (status == 400 && c->version == VERSION_MALFORMED) {
    snprintf(message, size,
             "a malformed request line: not method, target and HTTP/1.1, one space apart (RFC 9112 3)");
  } else if (status == 400 && c->chunked == 1 && c->content_length != -1) { /* (libevent fails it at the trailer) */
    snprintf(message, size, "a request with both Transfer-Encoding and Content-Length");
  } else if (status == 400 && c->te_headers > 1) { /* (libevent refuses it as its head ends) */
    snprintf(message, size, "more than one Transfer-Encoding header (a request body is chunked once)");
  } else if (status == 400 && c->chunk_bad == 2) {
    snprintf(message, size, "a malformed trailer after a chunked request body");
  } else if (status == 400) {
    snprintf(message, size, "the request could not be read: a malformed request line or header");
  } else if (status == 417) {
    snprintf(message, size, "an Expect header other than 100-continue");
  } else if (status == 501) {
    snprintf(message, size, "a method this server does not serve");
  } else {
    snprintf(message, size, "the request was refused before it was read");
  }
}

/* the server's JSON error for one of its refusals as the request is read,
 * in the shape of the request's API (api_error_body) -> its length */
static int own_error_body(conn *c, int status, const char *id, char *body, size_t size) {
  char message[160];
  own_error_message(c, status, message, sizeof message);
  return api_error_body(c->anthropic, status, message, id, body, size);
}

/* libevent's error reply, whole in the output: its status line kept (but
 * for what libevent cannot tell apart, and the request's HTTP version), its
 * page replaced by the server's JSON error. */
static void conn_error_reply_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  conn *c = arg;
  struct evbuffer *out = bufferevent_get_output(c->bev);
  char line[80], body[400], id[REQUEST_ID_SIZE];
  size_t n = output_start(out, line, sizeof line - 1);
  line[n] = '\0';
  char *eol = strstr(line, "\r\n");
  if (!eol || eol - line < 12) return;
  *eol = '\0';
  const char *code = strchr(line, ' '); /* (libevent's status line says the request's version: HTTP/1.2, HTTP/1.10) */
  if (!code) return;
  int status = atoi(code + 1), was = status;
  /* libevent's 400 for headers past max_headers too: a head past the limit, counted as it counts, is a 431
   * (one malformed as well may have been refused for that first: it is too large all the same) */
  if (status == 400 && (double)c->head_size > c->srv->max_headers)
    status = c->lines == 0 || (double)c->line0_len > c->srv->max_headers ? 414 : 431; /* (RFC 9112 3: the line's, 414) */
  /* its 400 for a major version other than 1, as for a malformed request line */
  else if (status == 400 && c->version == VERSION_OTHER && c->lines > 0) status = 505;
  /* its 413 for a malformed chunk too (read alongside it by conn_scan) */
  if (status == 413 && c->chunk_bad) status = 400;
  /* (libevent answers HTTP/1.1 to an HTTP/1.0 request it refuses; its other replies, 1.0) */
  if (status != was) snprintf(line, sizeof line, "HTTP/1.%d %d %s", c->http10 ? 0 : 1, status, reason_phrase(status));
  else memmove(line + 9, code + 1, strlen(code)), memcpy(line, c->http10 ? "HTTP/1.0 " : "HTTP/1.1 ", 9);
  new_request_id(id);
  int len = own_error_body(c, status, id, body, sizeof body);
  /* (the output's start is frozen but to the bufferevent's own writes, which unfreeze it as this does) */
  evbuffer_unfreeze(out, 1);
  evbuffer_drain(out, evbuffer_get_length(out));
  evbuffer_freeze(out, 1);
  evbuffer_add_printf(out,
                      "%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nx-request-id: %s\r\n%s%s%s"
                      "Connection: close\r\n\r\n%s",
                      line, len, id, c->anthropic ? "request-id: " : "", c->anthropic ? id : "",
                      c->anthropic ? "\r\n" : "", body);
}

/* libevent's 413 after the one sent early (an Expect: 100-continue past
 * max_body), the body sent anyway read: the connection closes, unsent */
static void conn_refused_close_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  conn *c = arg;
  evhttp_connection_free(c->evcon); /* its close callback frees c */
}

/* The first byte of a request: its deadline starts; the next ones, until
 * its path is whole, tell its API. */
static void conn_input_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg) {
  conn *c = arg;
  if (info->n_added == 0) return;
  if (!c->reading) {
    c->reading = 1;
    evtimer_add(c->ev, c->srv->read_timeout);
    c->api_pending = 1;
  }
  if (c->api_pending) c->api_pending = !conn_note_api(c, buf);
  conn_scan(c, buf, info->orig_size);
  if (!c->api_pending && c->scanning == SCAN_OFF) evbuffer_cb_clear_flags(buf, c->first_byte, EVBUFFER_CB_ENABLED);
}

/* The reply is sent: wait for the next request's first byte (it may be
 * here already, pipelined). */
static void reply_done_cb(struct evhttp_request *req, void *arg) {
  (void)req;
  conn *c = arg;
  if (c->reading_untimed) { /* an idle kept-alive connection closes again */
    bufferevent_set_timeouts(c->bev, &c->srv->idle_timeout, &c->srv->idle_timeout);
    c->reading_untimed = 0;
  }
  struct evbuffer *in = bufferevent_get_input(c->bev);
  size_t len = evbuffer_get_length(in);
  if (c->own_error) evbuffer_cb_set_flags(bufferevent_get_output(c->bev), c->own_error, EVBUFFER_CB_ENABLED);
  conn_scan_reset(c);
  c->reading = len > 0;
  c->api_pending = len > 0 && !conn_note_api(c, in) && c->first_byte; /* (pipelined) */
  if (len > 0 && c->first_byte) conn_scan(c, in, 0);
  if (len > 0 || !c->first_byte) evtimer_add(c->ev, c->srv->read_timeout);
  if (c->first_byte && (len == 0 || c->api_pending || c->scanning != SCAN_OFF))
    evbuffer_cb_set_flags(in, c->first_byte, EVBUFFER_CB_ENABLED);
}

static int by_fd_set(server *srv, evutil_socket_t fd, conn *c) {
  if ((size_t)fd >= srv->by_fd_len) {
    size_t len = srv->by_fd_len ? srv->by_fd_len : 64;
    while (len <= (size_t)fd) len *= 2;
    conn **grown = realloc(srv->by_fd, len * sizeof *grown);
    if (!grown) return -1;
    memset(grown + srv->by_fd_len, 0, (len - srv->by_fd_len) * sizeof *grown);
    srv->by_fd = grown;
    srv->by_fd_len = len;
  }
  srv->by_fd[fd] = c;
  return 0;
}

/* Runs in the same loop pass as the accept, after evhttp made the
 * connection and before anything was read from it. */
static void conn_setup_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  conn *c = arg;
  struct bufferevent *bev = c->bev;
  void *evcon = NULL;
  bufferevent_getcb(bev, NULL, NULL, NULL, &evcon);
  c->fd = bufferevent_getfd(bev);
  if (!evcon || c->fd < 0 || by_fd_set(c->srv, c->fd, c) != 0) { /* evhttp gave up on it, or no memory */
    c->fd = -1;
    conn_free(c);
  } else {
    c->evcon = evcon;
    /* a streamed reply's writes go out as made: with Nagle's algorithm a
     * small chunk waited for the ACK of the one before, which a client that
     * has nothing to send delays (40 ms on Linux): on a kept-alive
     * connection each stream's second chunk came 40 ms late */
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    evhttp_connection_set_closecb(c->evcon, conn_closed, c);
    event_assign(c->ev, c->srv->R->base, -1, 0, conn_deadline_cb, c);
    conn_scan_reset(c);
    c->first_byte = evbuffer_add_cb(bufferevent_get_input(bev), conn_input_cb, c);
    c->own_error = evbuffer_add_cb(bufferevent_get_output(bev), conn_output_cb, c);
    if (!c->first_byte) evtimer_add(c->ev, c->srv->read_timeout);
  }
  bufferevent_decref(bev);
}

/* evhttp asks for each new connection's bufferevent: the moment to start
 * tracking it. Its evhttp_connection does not exist yet, so the set-up is
 * an event activated now, which runs before the socket is first read. */
static struct bufferevent *conn_new_cb(struct event_base *base, void *arg) {
  server *srv = arg;
  struct bufferevent *bev = bufferevent_socket_new(base, -1, 0); /* as evhttp's own */
  conn *c = bev ? calloc(1, sizeof *c) : NULL;
  if (c) c->ev = event_new(base, -1, 0, conn_setup_cb, c);
  if (!c || !c->ev) { /* untracked: its requests get a 503 */
    free(c);
    return bev;
  }
  c->srv = srv;
  c->bev = bev;
  c->fd = -1;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  bufferevent_incref(bev); /* until set-up, in case evhttp drops it first */
  event_active(c->ev, EV_TIMEOUT, 1);
  return bev;
}

/* evhttp does not read from a connection while a reply is outstanding, so
 * it would not notice the client leaving; peek at the socket ourselves. */
static void client_gone_cb(evutil_socket_t fd, short what, void *arg) {
  pending *p = arg;
  char c;
  ssize_t n = what & EV_CLOSED ? 0 : recv(fd, &c, 1, MSG_PEEK);
  if (n > 0) {
    /* a pipelined request: not a hang-up. A close behind it is not seen by
     * a read until its bytes are read (one larger than libevent reads at
     * once waits in the socket: its client's call retried for no one);
     * where the backend tells a peer's close apart (epoll's EPOLLRDHUP),
     * that is watched for instead */
    if (event_base_get_features(p->srv->R->base) & EV_FEATURE_EARLY_CLOSE) {
      event_assign(p->client_watch, p->srv->R->base, fd, EV_CLOSED, client_gone_cb, p);
      event_add(p->client_watch, NULL);
    }
    return;
  }
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

/* libevent writes a Date on each HTTP/1.1 reply, through gmtime and a
 * printf (some 3.5k instructions a reply); the same line, made once a second
 * and given to evhttp, which then adds none. Added after the handler's
 * headers and before a Content-Length, where libevent put its own (a chunked
 * reply keeps libevent's, after its Transfer-Encoding). */
static void add_date(pending *p) {
  struct evhttp_request *req = p->req;
  if (p->own_date || req->major != 1 || req->minor < 1) return; /* (HTTP/1.0: libevent sends none) */
  server *srv = p->srv;
  time_t now = time(NULL);
  if (now != srv->date_at) {
    struct tm tm;
    gmtime_r(&now, &tm);
    evutil_date_rfc1123(srv->date, sizeof srv->date, &tm);
    srv->date_at = now;
  }
  evhttp_add_header(evhttp_request_get_output_headers(req), "Date", srv->date);
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

/* The standard reason phrases (RFC 9110; 429 from RFC 6585). libevent
 * 2.1's table stops at 417, so it cannot name a 429. */
static const char *reason_phrase(int status) {
  switch (status) {
  case 100: return "Continue";
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 203: return "Non-Authoritative Information";
  case 204: return "No Content";
  case 205: return "Reset Content";
  case 206: return "Partial Content";
  case 300: return "Multiple Choices";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 303: return "See Other";
  case 304: return "Not Modified";
  case 307: return "Temporary Redirect";
  case 308: return "Permanent Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 402: return "Payment Required";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 406: return "Not Acceptable";
  case 407: return "Proxy Authentication Required";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 410: return "Gone";
  case 411: return "Length Required";
  case 412: return "Precondition Failed";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 415: return "Unsupported Media Type";
  case 416: return "Range Not Satisfiable";
  case 417: return "Expectation Failed";
  case 421: return "Misdirected Request";
  case 422: return "Unprocessable Content";
  case 425: return "Too Early";
  case 426: return "Upgrade Required";
  case 428: return "Precondition Required";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 451: return "Unavailable For Legal Reasons";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  case 529: return "Overloaded"; /* Anthropic's */
  default: break;
  }
  static const char *const classes[] = {"Informational", "Success", "Redirection", "Client Error", "Server Error"};
  return status >= 100 && status < 600 ? classes[status / 100 - 1] : "Unknown";
}

static void send_next_chunk(void *arg);
static void close_when_sent(pending *p);

/* libevent times a connection's reading while it writes a reply, with its
 * idle timeout, and a client reading a stream sends nothing: a stream that
 * paused that long between two writes (an upstream slow between deltas, a
 * model thinking) was closed without its end. While a reply streams only a
 * stalled write times out (a client that stopped reading); reply_done_cb
 * puts the idle timeout back for the next request. */
static void reply_streams(pending *p) {
  p->started = 1;
  if (!p->c) return;
  bufferevent_set_timeouts(p->c->bev, NULL, &p->srv->idle_timeout);
  p->c->reading_untimed = 1;
}

/* A reply to HEAD has no body (RFC 9110 9.3.2). libevent drops a chunked
 * reply's chunks, but writes a whole reply's body as it is given, without a
 * Content-Length: a client on the kept-alive connection read the body as the
 * start of its next reply. A whole reply's Content-Length is the body's
 * length all the same, as the GET's (9.3.2, 8.6: libevent sent none, and
 * `curl -I` or a monitor sizing the resource saw none); a handler that
 * answers HEAD with no body says nothing of the GET's, so none is sent. */
static int is_head(struct evhttp_request *req) { return evhttp_request_get_command(req) == EVHTTP_REQ_HEAD; }

/* The status line of a chunked or streamed reply. HTTP/1.0 has no chunked
 * framing, only the close: a keep-alive the client asked for is not granted
 * (libevent framed such a reply as Content-Length: 0, and its body was read
 * as the start of the next reply on the connection). */
static void start_unframed(pending *p) {
  struct evhttp_request *req = p->req;
  if (req->major == 1 && req->minor == 0) evhttp_remove_header(evhttp_request_get_input_headers(req), "Connection");
  evhttp_send_reply_start(req, p->status, reason_phrase(p->status));
}

static void pending_send(pending *p) {
  struct evhttp_request *req = p->req;
  switch (p->action) {
  case REPLY_HANG: watch_client(p); return; /* until the client gives up */
  case REPLY_RESET:
    pending_unlink(p);
    event_base_once(p->srv->R->base, -1, EV_TIMEOUT, reset_later_cb, p->conn, NULL);
    pending_free(p);
    return;
  case REPLY_TRUNCATE: {
    /* a streamed reply's chunks: the first half of them, then the close
     * (send_next_chunk). Its Content-Length of its no body made a cut stream
     * a whole, empty 200, which every client took for an answer of nothing */
    if (p->nchunks > 0) break;
    char len[32];
    snprintf(len, sizeof len, "%zu", p->body_len);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Length", len);
    add_date(p);
    evhttp_send_reply_start(req, p->status, reason_phrase(p->status));
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
  /* A server that stopped accepting (a reload's old one draining, a gateway
   * stopping) closes each connection after its reply, as nginx does: a
   * kept-alive client opens its next one where connections are accepted,
   * instead of keeping the old server (its old handler) busy for good */
  struct evkeyvalq *out_headers = evhttp_request_get_output_headers(req);
  if (!p->srv->bound && !evhttp_find_header(out_headers, "Connection"))
    evhttp_add_header(out_headers, "Connection", "close");
  if (is_head(req)) {
    if (p->nchunks == 0 && p->body_len > 0) {
      char len[32];
      snprintf(len, sizeof len, "%zu", p->body_len);
      evhttp_add_header(out_headers, "Content-Length", len);
    }
    add_date(p);
    evhttp_send_reply(req, p->status, reason_phrase(p->status), NULL);
    pending_unlink(p);
    pending_free(p);
    return;
  }
  if (p->nchunks > 0) {
    start_unframed(p);
    reply_streams(p);
    watch_client(p);
    send_next_chunk(p);
    return;
  }
  add_date(p);
  /* (the body straight into the request's own buffer, where evhttp_send_reply moves a given one) */
  evbuffer_add(evhttp_request_get_output_buffer(req), p->body, p->body_len);
  evhttp_send_reply(req, p->status, reason_phrase(p->status), NULL);
  pending_unlink(p);
  pending_free(p);
}

/* The end of a chunked or streamed reply (evhttp_send_reply_end): to an
 * HTTP/1.0 client (no chunked framing: the close ends the body) whose bytes
 * were all written, libevent closes the connection within the call, and its
 * close callback (conn_closed) frees the conn and the pendings still on the
 * server's list. So the reply's pending is freed (or taken off the list, its
 * conn forgotten) before: a proxy speaks HTTP/1.0 upstream (nginx's
 * default), and the pending freed twice, or its freed conn written, corrupted
 * the heap. */
static void send_next_chunk(void *arg) {
  pending *p = arg;
  if (!p->started) {
    pending_send(p);
    return;
  }
  /* chunk_interval 0: the chunks back to back, in this turn. A timer of 0 s
   * between them was a virtual-clock jump each, made once the client's
   * transfer had gone quiet: a 400-word mock stream took 5 s of real time in
   * a spec, stream_interval = 0 or not */
  for (;;) {
    if (p->action == REPLY_TRUNCATE && p->next_chunk >= p->nchunks / 2) {
      /* truncated: the connection closed without the last chunk, a cut reply */
      pending_unlink(p);
      close_when_sent(p);
      pending_free(p);
      return;
    }
    if (p->stall_after > 0 && p->next_chunk >= p->stall_after - 1) return; /* stalled: hang mid-stream */
    if (p->next_chunk >= p->nchunks) {
      struct evhttp_request *req = p->req;
      pending_unlink(p);
      pending_free(p); /* first (above) */
      evhttp_send_reply_end(req);
      return;
    }
    struct evbuffer *buf = evbuffer_new();
    if (buf) {
      const char *c = p->chunks[p->next_chunk];
      evbuffer_add(buf, c ? c : "", p->chunk_lens[p->next_chunk]);
      evhttp_send_reply_chunk(p->req, buf);
      evbuffer_free(buf);
    }
    p->next_chunk++;
    if (p->chunk_interval > 0) break;
  }
  timer_start(&p->timer, p->chunk_interval);
}

/* ---------- request -> Lua -> reply ---------- */

static const char *method_name(struct evhttp_request *req) {
  static const struct {
    enum evhttp_cmd_type cmd;
    const char *name;
  } methods[] = {{EVHTTP_REQ_GET, "GET"},         {EVHTTP_REQ_POST, "POST"},   {EVHTTP_REQ_HEAD, "HEAD"},
                 {EVHTTP_REQ_PUT, "PUT"},         {EVHTTP_REQ_DELETE, "DELETE"}, {EVHTTP_REQ_OPTIONS, "OPTIONS"},
                 {EVHTTP_REQ_PATCH, "PATCH"}};
  for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
    if (methods[i].cmd == evhttp_request_get_command(req)) return methods[i].name;
  return "OTHER";
}

/* L stack: -> req table */
static void push_request(lua_State *L, struct evhttp_request *req) {
  lua_createtable(L, 0, 6);
  lua_pushstring(L, method_name(req));
  lua_setfield(L, -2, "method");
  const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
  const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
  const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
  /* an origin-form target's path as sent: libevent reads "//x/metrics" as
   * a network-path reference (an authority x, the path /metrics), and a
   * proxy in front that refused /metrics passed it on (RFC 9112 3.2.1: the
   * path is "//x/metrics") */
  const char *target = evhttp_request_get_uri(req);
  if (target && target[0] == '/' && target[1] == '/') lua_pushlstring(L, target, strcspn(target, "?#"));
  else lua_pushstring(L, path && *path ? path : "/");
  lua_setfield(L, -2, "path");
  lua_pushstring(L, query ? query : "");
  lua_setfield(L, -2, "query");
  struct evkeyvalq *in = evhttp_request_get_input_headers(req);
  int nheaders = 0;
  for (struct evkeyval *h = in->tqh_first; h; h = h->next.tqe_next) nheaders++;
  lua_createtable(L, 0, nheaders); /* sized once, not grown header by header */
  for (struct evkeyval *h = in->tqh_first; h; h = h->next.tqe_next) {
    char lower[128]; /* most names; a longer one through a Lua buffer */
    size_t n = 0;
    for (const char *c = h->key; *c && n < sizeof lower; c++) lower[n++] = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
    if (h->key[n] == '\0') {
      lua_pushlstring(L, lower, n);
    } else {
      luaL_Buffer name;
      luaL_buffinit(L, &name);
      for (const char *c = h->key; *c; c++) luaL_addchar(&name, (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c));
      luaL_pushresult(&name);
    }
    /* a name sent twice is one field of both values, joined as RFC 9110 5.3 joins a list (a
     * cookie's with "; "): taken as the last one, two Authorization headers meant one key here
     * and the other to a proxy in front that reads the first (Node, Go, nginx); joined, a
     * credential sent twice reads as none, whichever order */
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) == LUA_TSTRING) {
      lua_pushstring(L, strcmp(lua_tostring(L, -2), "cookie") == 0 ? "; " : ", ");
      lua_pushstring(L, h->value);
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushstring(L, h->value);
    }
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
  if (!address) address = "?";
  char peer[80]; /* "address:port", without a printf */
  size_t at = strlen(address);
  if (at > sizeof peer - 7) at = sizeof peer - 7; /* (an address is at most 45 characters) */
  memcpy(peer, address, at);
  peer[at++] = ':';
  char digits[5];
  int nd = 0;
  do digits[nd++] = (char)('0' + port % 10); while ((port /= 10) > 0);
  while (nd > 0) peer[at++] = digits[--nd];
  lua_pushlstring(L, peer, at);
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

/* A header name is an RFC 9110 token: one with ": " in it made a header the
 * handler never named. */
static int is_token(const char *s) {
  /* its characters, ALPHA DIGIT !#$%&'*+-.^_`|~, as bits: 0-63, 64-127 */
  static const unsigned long long tchar[2] = {0x03ff6cfa00000000ULL, 0x57ffffffc7fffffeULL};
  if (!*s) return 0;
  for (const unsigned char *c = (const unsigned char *)s; *c; c++)
    if (*c >= 128 || !(tchar[*c >> 6] >> (*c & 63) & 1)) return 0;
  return 1;
}

/* L stack: resp table at idx -> fills p (all copied into C memory).
 * Raises (the handler's 500) on a reply HTTP cannot carry: a status that
 * is not a final one, a header name that is not a token, a value with a
 * line break. The server frames the body itself: a handler's own
 * Content-Length or Transfer-Encoding could only disagree with it. */
static void read_reply(lua_State *L, int idx, pending *p) {
  struct evkeyvalq *out = evhttp_request_get_output_headers(p->req);
  lua_getfield(L, idx, "status");
  p->status = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 200;
  lua_pop(L, 1);
  if (p->status < 200 || p->status > 599) luaL_error(L, "reply status %d is not a final status (200-599)", p->status);
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
        const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
        if (!is_token(k)) luaL_error(L, "reply header name '%s' is not a token", k);
        if (strpbrk(v, "\r\n")) luaL_error(L, "reply header '%s' has a line break in its value", k);
        int framing = 0; /* Content-Length, Transfer-Encoding: the server's own */
        switch (k[0] | 0x20) { /* (compared only where the first letter may start one: x-resil-* never do) */
        case 'c':
          if (strcasecmp(k, "content-type") == 0) has_type = 1;
          else framing = strcasecmp(k, "content-length") == 0;
          break;
        case 'd': p->own_date |= strcasecmp(k, "date") == 0; break;
        case 't': framing = strcasecmp(k, "transfer-encoding") == 0; break;
        default: break;
        }
        if (!framing) evhttp_add_header(out, k, v);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  if (!has_type) evhttp_add_header(out, "Content-Type", "application/json");
  size_t len = 0;
  lua_getfield(L, idx, "body");
  const char *body = lua_tolstring(L, -1, &len);
  if (p->status == 204 || p->status == 304) body = NULL; /* no body: bytes after the head read as the next reply */
  p->body = dup_bytes(body ? body : "", body ? len : 0);
  p->body_len = body ? len : 0;
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "chunks") == LUA_TTABLE) {
    int n = (int)luaL_len(L, -1);
    p->chunks = calloc((size_t)(n > 0 ? n : 1), sizeof *p->chunks);
    p->chunk_lens = calloc((size_t)(n > 0 ? n : 1), sizeof *p->chunk_lens);
    for (int i = 1; p->chunks && p->chunk_lens && i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *c = lua_tolstring(L, -1, &len);
      char *copy = dup_bytes(c ? c : "", c ? len : 0);
      p->chunk_lens[p->nchunks] = copy && c ? len : 0;
      p->chunks[p->nchunks++] = copy;
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, idx, "chunk_interval");
  p->chunk_interval = lua_tonumber(L, -1);
  lua_getfield(L, idx, "stall_after"); /* (0 was taken for none: the stream was served whole) */
  lua_Integer stall_after = lua_tointeger(L, -1);
  p->stall_after = lua_isnumber(L, -1) && stall_after >= 0 && stall_after < INT_MAX ? (int)stall_after + 1 : 0;
  lua_getfield(L, idx, "delay");
  p->delay = lua_tonumber(L, -1);
  lua_pop(L, 3);
  if (lua_getfield(L, idx, "cut") == LUA_TSTRING && luaL_len(L, -1) > 0) {
    const char *tail = lua_tolstring(L, -1, &len);
    if ((p->cut_tail = dup_bytes(tail, len))) p->cut_tail_len = len;
  }
  lua_pop(L, 1);
}

/* L stack: srv, req, p (light userdata) -> nothing; p holds the reply.
 * Runs under host_pcall: the request's copy, the handler and the reading of
 * its reply (which may have metamethods) are all capped and protected. */
static int handle_request(lua_State *L) {
  server *srv = lua_touserdata(L, 1);
  struct evhttp_request *req = lua_touserdata(L, 2);
  pending *p = lua_touserdata(L, 3);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->handler_ref);
  push_request(L, req);
  lua_call(L, 1, 1);
  if (!lua_istable(L, -1)) return luaL_error(L, "the handler returned %s, not a response table", luaL_typename(L, -1));
  read_reply(L, lua_gettop(L), p);
  return 0;
}

/* L stack: reply table, p (light userdata): read_reply, protected (its
 * metamethods may raise, loop past the cap, or try to wait) */
static int read_reply_protected(lua_State *L) {
  read_reply(L, 1, lua_touserdata(L, 2));
  return 0;
}

/* ---------- tasks = true: the handler runs as a task ---------- */

#define REPLY_HANDLE_MT "resil.ServerReply"
#define WRITE_HIGH_WATER (256 * 1024) /* a write waits while the client has this much unread */

/* The server's own answer to a request its handler could not serve: status, body, and for a 503
 * a Retry-After (and retry-after-ms, which the SDKs read first) */
static void answer_error(pending *p, int status, const char *message) {
  struct evkeyvalq *out = evhttp_request_get_output_headers(p->req);
  char id[REQUEST_ID_SIZE], body[400];
  int anthropic = p->c && p->c->anthropic;
  new_request_id(id);
  int len = api_error_body(anthropic, status, message, id, body, sizeof body);
  pending_clear_reply(p);
  evhttp_clear_headers(out); /* (those of a reply read part way) */
  p->status = status;
  p->body = dup_bytes(body, (size_t)len);
  p->body_len = p->body ? (size_t)len : 0;
  evhttp_add_header(out, "Content-Type", "application/json");
  evhttp_add_header(out, "x-request-id", id);
  if (anthropic) evhttp_add_header(out, "request-id", id);
  if (status == 503) {
    evhttp_add_header(out, "Retry-After", "1");
    evhttp_add_header(out, "retry-after-ms", "1000");
  }
}

static void answer_500(pending *p) { answer_error(p, 500, HANDLER_ERROR); }

/* A handler task that could not be started for want of memory (--max-memory, spent by the
 * requests in flight): a 503 with Retry-After, which clients and load balancers retry later or
 * elsewhere, as the gateway answers the same want met inside its handler; a 500 said the server
 * had a bug. */
static void answer_unavailable(pending *p) {
  answer_error(p, 503, "the server is out of memory for now; retry shortly");
}

/* host_pcall's status, and the error it left at the top: Lua's memory error (LUA_ERRMEM; or a C
 * function's that said it, luaL_error "not enough memory", a status of LUA_ERRRUN) */
static int out_of_memory(lua_State *L, int status) {
  if (status == LUA_ERRMEM) return 1;
  const char *msg = lua_tostring(L, -1);
  return msg && strstr(msg, "not enough memory") != NULL;
}

/* L stack: error -> nothing; logs it with the request it came from */
static void log_handler_error(lua_State *L, pending *p, const char *msg) {
  /* (the id its client got in the error answered, to find this line by) */
  const char *id = evhttp_find_header(evhttp_request_get_output_headers(p->req), "x-request-id");
  lua_createtable(L, 0, 3);
  lua_insert(L, -2);
  lua_setfield(L, -2, "error");
  lua_pushfstring(L, "%s %s", method_name(p->req), evhttp_request_get_uri(p->req));
  lua_setfield(L, -2, "request");
  if (id) {
    lua_pushstring(L, id);
    lua_setfield(L, -2, "request_id");
  }
  host_log(L, "error", msg);
}

/* The output of a connection drained; arg is its conn, which lives as long
 * as the connection (libevent keeps this callback until the next write) */
static void chunk_drained(struct evhttp_connection *evcon, void *arg) {
  (void)evcon;
  pending *p = ((conn *)arg)->streaming;
  if (p && p->drain_waiter) task_wake(p->drain_waiter);
}

static void drain_cancel(void *arg) { ((pending *)arg)->drain_waiter = NULL; }

static int write_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  reply_handle *h = lua_touserdata(L, lua_upvalueindex(1));
  if (h->p) h->p->drain_waiter = NULL;
  if (!h->p) return resil_error_result(L, "closed", "the client has gone");
  lua_pushboolean(L, 1);
  return 1;
}

/* write(chunk) -> true | nil, err{kind="closed"}: one chunk of a streamed
 * reply, sent now; waits while the client is slow to read it. */
static int reply_write(lua_State *L) {
  reply_handle *h = lua_touserdata(L, lua_upvalueindex(1));
  size_t len;
  const char *chunk = luaL_checklstring(L, 1, &len);
  pending *p = h->p;
  if (!p) return resil_error_result(L, "closed", "the client has gone");
  if (lua_toboolean(L, 2)) { /* write(chunk, true): the reply's ending: a cut adds nothing after it */
    free(p->cut_tail);
    p->cut_tail = NULL;
    p->cut_tail_len = 0;
  }
  if (len == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  struct evbuffer *buf = evbuffer_new();
  if (!buf || evbuffer_add(buf, chunk, len) != 0) {
    if (buf) evbuffer_free(buf);
    return luaL_error(L, "not enough memory");
  }
  evhttp_send_reply_chunk_with_cb(p->req, buf, chunk_drained, p->c);
  evbuffer_free(buf);
  struct bufferevent *bev = evhttp_connection_get_bufferevent(p->conn);
  task *me = task_running(L);
  if (bev && me && lua_isyieldable(L) && evbuffer_get_length(bufferevent_get_output(bev)) > WRITE_HIGH_WATER) {
    static const task_wait_ops drain_wait = {drain_cancel, NULL, NULL};
    p->drain_waiter = me;
    task_wait(me, &drain_wait, p);
    return lua_yieldk(L, 0, 0, write_k);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static void output_drained_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg) {
  if (info->n_deleted == 0 || evbuffer_get_length(buf) > 0) return;
  evbuffer_remove_cb(buf, output_drained_cb, arg); /* libevent's loop over callbacks allows this */
  event_base_once(bufferevent_get_base(evhttp_connection_get_bufferevent(arg)), -1, EV_TIMEOUT, close_later_cb, arg,
                  NULL);
}

/* Close p's connection once what was written reached the client (a cut
 * reply: its status and deltas arrive, its end never does). */
static void close_when_sent(pending *p) {
  struct bufferevent *bev = evhttp_connection_get_bufferevent(p->conn);
  struct evbuffer *out = bev ? bufferevent_get_output(bev) : NULL;
  if (out && evbuffer_get_length(out) > 0 && evbuffer_add_cb(out, output_drained_cb, p->conn)) return;
  event_base_once(p->srv->R->base, -1, EV_TIMEOUT, close_later_cb, p->conn, NULL);
}

enum { STAGE_HANDLER, STAGE_STREAM };

/* Send what the handler's reply table says, or start a streamed reply and
 * call its stream(write). L stack: handle, handler, req, traceback, result */
static int serve_k(lua_State *L, int status, lua_KContext stage) {
  reply_handle *h = luaL_checkudata(L, 1, REPLY_HANDLE_MT);
  pending *p = h->p;
  if (status == LUA_YIELD) status = LUA_OK; /* pcallk's success after a yield */
  if (!p) return 0; /* the client left meanwhile */
  if (stage == STAGE_STREAM) {
    pending_unlink(p);
    pending_detach(p, 0);
    if (status != LUA_OK) {
      /* the status line is gone already: end the connection without the
       * last chunk, so the client sees a cut reply, never a complete one */
      log_handler_error(L, p, "server stream failed; connection closed");
      close_when_sent(p);
      pending_free(p);
    } else {
      struct evhttp_request *req = p->req;
      pending_free(p); /* first: the end may free the connection (send_next_chunk) */
      evhttp_send_reply_end(req);
    }
    return 0;
  }
  if (status == LUA_OK && !lua_istable(L, -1)) {
    lua_pushfstring(L, "the handler returned %s, not a response table", luaL_typename(L, -1));
    status = LUA_ERRRUN;
  }
  if (status == LUA_OK) { /* read here, where a failure is still the handler's 500 */
    lua_pushcfunction(L, read_reply_protected);
    lua_pushvalue(L, -2);
    lua_pushlightuserdata(L, p);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) status = LUA_ERRRUN;
  }
  if (status != LUA_OK) {
    answer_500(p);
    log_handler_error(L, p, "server handler failed; answered 500");
  } else if (lua_getfield(L, -1, "stream") == LUA_TFUNCTION) {
    /* L stack: ..., result, stream */
    start_unframed(p);
    reply_streams(p);
    p->c->streaming = p;
    lua_pushvalue(L, 1);
    lua_pushcclosure(L, reply_write, 1);
    return serve_k(L, lua_pcallk(L, 1, 0, 4, STAGE_STREAM, serve_k), STAGE_STREAM);
  } else {
    lua_pop(L, 1);
  }
  pending_detach(p, 0);
  if (p->delay > 0) timer_start(&p->timer, p->delay);
  else pending_send(p);
  return 0;
}

/* The task's body. L stack: handle, handler, req */
static int serve_task(lua_State *L) {
  lua_pushcfunction(L, resil_traceback);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  return serve_k(L, lua_pcallk(L, 1, 1, 4, STAGE_HANDLER, serve_k), STAGE_HANDLER);
}

/* L stack: srv, req, p (light userdata) -> nothing; p's task is started */
static int spawn_handler(lua_State *L) {
  server *srv = lua_touserdata(L, 1);
  struct evhttp_request *req = lua_touserdata(L, 2);
  pending *p = lua_touserdata(L, 3);
  lua_pushcfunction(L, serve_task);
  reply_handle *h = lua_newuserdatauv(L, sizeof *h, 0);
  h->p = NULL;
  luaL_setmetatable(L, REPLY_HANDLE_MT);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->handler_ref);
  push_request(L, req);
  p->task = task_spawn(L, 3);
  h->p = p;
  p->handle = h;
  p->task_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static void server_stop(lua_State *L, server *srv);

/* a close asked for while a handler ran, now that libevent's callback is over */
static void deferred_stop_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  server *srv = arg;
  lua_State *L = srv->R->L;
  server_stop(L, srv);
  luaL_unref(L, LUA_REGISTRYINDEX, srv->self_ref); /* collectable again (its __gc has run, or will find it stopped) */
  srv->self_ref = LUA_NOREF;
}

/* How a request's body is framed, as a proxy in front may read it otherwise
 * than libevent does (request smuggling): the bytes after the body would be
 * a request the proxy never saw. Refused (RFC 9112 5.1, 6.1, 6.3):
 * - a header name that is not a token ("Content-Length : 5": libevent
 *   keeps "Content-Length " as another header, a proxy may not);
 * - a Content-Length that is not digits ("+5"), or two that differ;
 * - a Transfer-Encoding other than chunked (libevent reads no body);
 * - a Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1: its framing
 *   is faulty): an HTTP/1.0 proxy knows no chunked, and libevent read it so
 *   and kept the connection alive for what followed;
 * - a HEAD with a body (a Content-Length past 0, or chunked): libevent reads
 *   none for a HEAD, and its bytes were read as the next request on the
 *   connection; a proxy frames a request's body whatever its method (RFC
 *   9112 6.3), and RFC 9110 9.3.2 has such a HEAD refused for this reason.
 * And, as RFC 9112 3.2 has a server refuse them (libevent served them), an
 * HTTP/1.1 request without Host and one with two: which host it is for is
 * what a proxy in front and this server could read otherwise.
 * -> NULL, or the status and the JSON body of the refusal */
static const char *framing_problem(struct evhttp_request *req, int *status) {
  const char *length = NULL;
  struct evkeyval *h;
  int hosts = 0, chunked = 0;
  *status = 400;
  TAILQ_FOREACH(h, evhttp_request_get_input_headers(req), next) {
    if (!is_token(h->key)) return "a header name that is not a token";
    if (evutil_ascii_strcasecmp(h->key, "host") == 0) {
      if (++hosts > 1) return "more than one Host header (RFC 9112 3.2)";
      /* uri-host [":" port] (RFC 3986 3.2.2): a space, a slash, an @ are another authority to a proxy.
       * (Around it, optional whitespace, RFC 9112 5.1: libevent drops a leading tab's spaces alone.) */
      const char *v = h->value + strspn(h->value, " \t");
      v += strspn(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:[]");
      if (v[strspn(v, " \t")])
        return "a Host header that is not a host and port (RFC 9112 3.2)";
    }
    if (evutil_ascii_strcasecmp(h->key, "content-length") == 0) {
      /* (optional whitespace before the value, RFC 9110 5.5: libevent keeps a leading tab, and its
       * strtoll skips it: "Content-Length:<TAB>5" is 5, as a proxy in front reads it) */
      const char *digits = h->value + strspn(h->value, " \t");
      if (!digits[0] || digits[strspn(digits, "0123456789")] != '\0')
        return "Content-Length is not a number";
      if (length && strcmp(length, digits) != 0)
        return "conflicting Content-Length headers";
      length = digits;
    } else if (evutil_ascii_strcasecmp(h->key, "transfer-encoding") == 0) {
      if (evutil_ascii_strcasecmp(h->value, "chunked") != 0) {
        *status = 501;
        return "unsupported Transfer-Encoding: only chunked";
      }
      chunked = 1;
    }
  }
  if (chunked && req->major == 1 && req->minor == 0)
    return "a Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)";
  if (evhttp_request_get_command(req) == EVHTTP_REQ_HEAD && (chunked || (length && length[strspn(length, "0")])))
    return "a HEAD request with a body (RFC 9110 9.3.2)";
  /* (HTTP/1.0 has no Host to require; a later HTTP/1 minor version is served as HTTP/1.1) */
  if (!hosts && req->major == 1 && req->minor >= 1)
    return "an HTTP/1.1 request without a Host header (RFC 9112 3.2)";
  return NULL;
}


/* the server's own refusal, before any handler; the connection closes,
 * since what follows the body on it cannot be trusted */
static void refuse_request(struct evhttp_request *req, conn *c, int status, const char *message) {
  struct evkeyvalq *out = evhttp_request_get_output_headers(req);
  struct evbuffer *body = evbuffer_new();
  char id[REQUEST_ID_SIZE], json_body[400];
  int anthropic = c && c->anthropic;
  new_request_id(id);
  int len = api_error_body(anthropic, status, message, id, json_body, sizeof json_body);
  evhttp_add_header(out, "Content-Type", "application/json");
  evhttp_add_header(out, "x-request-id", id);
  if (anthropic) evhttp_add_header(out, "request-id", id);
  evhttp_add_header(out, "Connection", "close");
  if (body) evbuffer_add(body, json_body, (size_t)len);
  evhttp_send_reply(req, status, reason_phrase(status), body);
  if (body) evbuffer_free(body);
}

static void request_cb(struct evhttp_request *req, void *arg) {
  server *srv = arg;
  lua_State *L = srv->R->L;
  conn *c = conn_of(srv, req);
  if (c && c->own_error) evbuffer_cb_clear_flags(bufferevent_get_output(c->bev), c->own_error, EVBUFFER_CB_ENABLED);
  if (c && c->api_pending) { /* (its path was whole: not reached) */
    evbuffer_cb_clear_flags(bufferevent_get_input(c->bev), c->first_byte, EVBUFFER_CB_ENABLED);
    c->api_pending = 0;
  }
  int status = 400;
  /* what the scan found as the request came (conn_scan): a NUL in its head, which libevent
   * reads as the end of the value (RFC 9110 5.5: refused), or a chunk libevent read otherwise
   * than RFC 9112 frames it */
  const char *refusal = !c ? NULL
    : c->version == VERSION_MALFORMED
      ? "a malformed request line: not method, target and HTTP/1.1, one space apart (RFC 9112 3)"
    : c->head_nul ? "a NUL byte in the request's headers"
    : c->folded ? "a header line folded onto the one before (obs-fold, RFC 9112 5.2)"
    : c->chunk_bad == 1 ? "a malformed chunked request body: a chunk size that is not a hexadecimal number"
    : c->chunk_bad == 4 ? "a malformed chunked request body: a chunk's data not followed by its line end"
    : NULL;
  if (!refusal) refusal = framing_problem(req, &status);
  char own[256];
  if (c && c->version == VERSION_OTHER) { /* (HTTP/0.x: libevent refuses 2 and later) */
    own_error_message(c, 505, own, sizeof own);
    status = 505;
    refusal = own;
  }
  if (c && c->version != VERSION_1) req->major = 1, req->minor = 1; /* (its reply says HTTP/1.1) */
  struct evbuffer *body = evhttp_request_get_input_buffer(req);
  size_t body_len = srv->utf8 && !refusal ? evbuffer_get_length(body) : 0;
  if (body_len > 0) { /* (made whole here, as push_request would) */
    const unsigned char *bytes = evbuffer_pullup(body, -1);
    size_t at = bytes ? utf8_invalid_at(bytes, body_len) : body_len;
    /* a body sent compressed (gzip's 1F 8B is never UTF-8) is not read here: a 415 naming its
     * encoding (RFC 9110 15.5.16), not "not UTF-8 (byte 0x8B at offset 1)" of a JSON that was fine */
    const char *coding = at < body_len ? evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Encoding")
                                       : NULL;
    if (coding && evutil_ascii_strcasecmp(coding, "identity") != 0 && strlen(coding) < 64 &&
        !coding[strspn(coding, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_., ")]) {
      snprintf(own, sizeof own,
               "the request body came with Content-Encoding: %s, which this server does not decode: send it uncompressed",
               coding);
      evhttp_add_header(evhttp_request_get_output_headers(req), "Accept-Encoding", "identity");
      status = 415;
      refusal = own;
    } else if (at < body_len) {
      snprintf(own, sizeof own, "the request body is not valid JSON: it is not UTF-8 (byte 0x%02X at offset %zu)",
               bytes[at], at);
      refusal = own;
    }
  }
  if (refusal) {
    if (c) evtimer_del(c->ev); /* read in time; the reply closes it */
    refuse_request(req, c, status, refusal);
    return;
  }
  pending *p = c ? calloc(1, sizeof *p) : NULL;
  if (!p) { /* (no memory) */
    refuse_request(req, c, 503, "the server cannot take this request now; retry");
    return;
  }
  evtimer_del(c->ev); /* read in time */
  evhttp_request_set_on_complete_cb(req, reply_done_cb, c);
  p->srv = srv;
  p->req = req;
  p->conn = c->evcon;
  p->c = c;
  timer_init(srv->R, &p->timer, send_next_chunk, p);
  p->next = srv->pendings;
  srv->pendings = p;

  p->task_ref = LUA_NOREF;
  int top = lua_gettop(L);
  if (srv->tasks) {
    lua_pushcfunction(L, spawn_handler);
    lua_pushlightuserdata(L, srv);
    lua_pushlightuserdata(L, req);
    lua_pushlightuserdata(L, p);
    int started = host_pcall(L, "server handler", 3, 0);
    if (started == LUA_OK) {
      lua_settop(L, top);
      watch_client(p); /* a client that leaves cancels the task */
      return;
    }
    pending_detach(p, 1);
    if (out_of_memory(L, started)) { /* (the server's memory spent by the requests in flight: not this one's fault) */
      answer_unavailable(p);
      log_handler_error(L, p, "server handler not started (out of memory); answered 503");
    } else {
      answer_500(p);
      log_handler_error(L, p, "server handler not started; answered 500");
    }
    lua_settop(L, top);
    pending_send(p);
    return;
  }
  lua_pushcfunction(L, handle_request);
  lua_pushlightuserdata(L, srv);
  lua_pushlightuserdata(L, req);
  lua_pushlightuserdata(L, p);
  srv->in_handler++;
  int handled = host_pcall(L, "server handler", 3, 0);
  srv->in_handler--;
  if (srv->stop_deferred && !srv->in_handler) event_base_once(srv->R->base, -1, EV_TIMEOUT, deferred_stop_cb, srv, NULL);
  if (handled != LUA_OK) {
    answer_500(p); /* L stack: error */
    log_handler_error(L, p, "server handler failed; answered 500");
  }
  lua_settop(L, top);
  if (p->delay > 0) {
    watch_client(p);
    timer_start(&p->timer, p->delay);
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
  listening_remove(srv);
  if (srv->accept_rest) {
    event_free(srv->accept_rest);
    srv->accept_rest = NULL;
  }
  if (srv->http) {
    evhttp_free(srv->http); /* closes connections; their close callbacks drop pendings and conns */
    srv->http = NULL;
    srv->bound = NULL;
  }
  while (srv->conns) { /* accepted, not yet set up */
    struct bufferevent *bev = srv->conns->bev;
    conn_free(srv->conns);
    bufferevent_decref(bev);
  }
  free(srv->by_fd);
  srv->by_fd = NULL;
  srv->by_fd_len = 0;
  while (srv->pendings) {
    pending *p = srv->pendings;
    srv->pendings = p->next;
    pending_free(p);
  }
  if (srv->handler_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, srv->handler_ref);
  srv->handler_ref = LUA_NOREF;
}

/* opts[field], a number >= min (or the default when absent) */
static double opt_limit(lua_State *L, const char *field, double dflt, double min) {
  int type = lua_getfield(L, 1, field);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (type == LUA_TNIL) return dflt;
  if (type != LUA_TNUMBER || !(v >= min) || v > 1e15)
    resil_raise(L, "resil.server.listen: %s must be a number >= %g", field, min);
  return v;
}

/* accept() failed other than for a retry: out of file descriptors (EMFILE,
 * ENFILE) or memory. The listening socket stays readable, and libevent's
 * listener tried again at once, forever: a core at 100 % and megabytes of
 * warnings a second on stderr. It rests ACCEPT_REST_MS instead (connections
 * wait in the backlog meanwhile), and says so through resil.log at most
 * every ACCEPT_LOG_EVERY seconds. */
#define ACCEPT_REST_MS 100
#define ACCEPT_LOG_EVERY 10.0

static void accept_resume(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  server *srv = arg;
  if (srv->bound) evconnlistener_enable(evhttp_bound_socket_get_listener(srv->bound));
}

static void accept_failed(struct evconnlistener *lev, void *http) {
  int e = EVUTIL_SOCKET_ERROR();
  server *srv = listening_find(http); /* (the server is this host's: only its own loop calls this) */
  if (!srv) return;
  evconnlistener_disable(lev);
  if (!srv->accept_rest) srv->accept_rest = evtimer_new(srv->R->base, accept_resume, srv);
  struct timeval rest = {0, ACCEPT_REST_MS * 1000};
  if (srv->accept_rest) evtimer_add(srv->accept_rest, &rest);
  else evconnlistener_enable(lev); /* (no memory for the timer: as before) */
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  double now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
  if (srv->accept_logged_at > 0 && now - srv->accept_logged_at < ACCEPT_LOG_EVERY) return;
  srv->accept_logged_at = now;
  lua_State *L = srv->R->L;
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, srv->port);
  lua_setfield(L, -2, "port");
  lua_pushstring(L, evutil_socket_error_to_string(e));
  lua_setfield(L, -2, "error");
  lua_pushinteger(L, ACCEPT_REST_MS);
  lua_setfield(L, -2, "retry_ms");
  host_log(L, "error", "server: cannot accept connections; new ones wait in the backlog (is the open-files "
                       "limit, ulimit -n, too low?)");
}

/* resil.server.listen{host=, port=, handler=, max_headers=, max_body=, read_timeout=} -> server */
static int l_listen(lua_State *L) {
  /* (the checks below said "[resil prelude]:431: bad argument #-1 to 'listen' (function expected,
   * got nil)" for a handler misspelt: a line of the host's, and an argument number of none) */
  if (!lua_istable(L, 1))
    return resil_raise(L, "resil.server.listen: expects a table {port=, handler=, ...}, got %s", luaL_typename(L, 1));
  resil_t *R = resil_from_lua(L);
  double max_headers = opt_limit(L, "max_headers", DEFAULT_MAX_HEADERS, 256);
  double max_body = opt_limit(L, "max_body", DEFAULT_MAX_BODY, 0);
  double read_timeout = opt_limit(L, "read_timeout", DEFAULT_READ_TIMEOUT, 0.001);
  lua_getfield(L, 1, "host");
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
    return resil_raise(L, "resil.server.listen: host must be a string, got %s", luaL_typename(L, -1));
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  int whole = 1;
  lua_Integer port = lua_isnil(L, -1) ? 0 : lua_tointegerx(L, -1, &whole);
  if (!whole || port < 0 || port > 65535)
    return resil_raise(L, "resil.server.listen: port must be a whole number from 0 to 65535, got %s",
                       lua_isnumber(L, -1) || lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
  lua_getfield(L, 1, "tasks");
  int tasks = lua_toboolean(L, -1);
  lua_getfield(L, 1, "reuseport");
  int reuseport = lua_toboolean(L, -1);
  lua_getfield(L, 1, "utf8");
  int utf8 = lua_toboolean(L, -1);
  lua_pop(L, 3);
  /* from: a server whose listening socket this one shares (a copy of its
   * descriptor, no bind: a policy reload's new version takes its address
   * over from the old one's, the prelude's listen) */
  lua_getfield(L, 1, "from");
  server *from = luaL_testudata(L, -1, SERVER_MT);
  lua_pop(L, 1);
  lua_getfield(L, 1, "handler");
  if (!lua_isfunction(L, -1))
    return resil_raise(L, "resil.server.listen: handler must be a function, got %s", luaL_typename(L, -1));

  server *srv = lua_newuserdatauv(L, sizeof *srv, 0);
  memset(srv, 0, sizeof *srv);
  srv->R = R;
  srv->handler_ref = srv->self_ref = LUA_NOREF;
  srv->tasks = tasks;
  srv->utf8 = utf8;
  srv->max_body = max_body;
  srv->max_headers = max_headers;
  luaL_setmetatable(L, SERVER_MT);
  srv->http = evhttp_new(R->base);
  if (!srv->http) return luaL_error(L, "server: cannot create the HTTP server");
  evhttp_set_allowed_methods(srv->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT |
                                            EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
  evhttp_set_gencb(srv->http, request_cb, srv);
  evhttp_set_bevcb(srv->http, conn_new_cb, srv);
  evhttp_set_max_headers_size(srv->http, (ev_ssize_t)max_headers);
  evhttp_set_max_body_size(srv->http, (ev_ssize_t)max_body);
  /* a body past max_body is read and dropped before the 413 goes out: closed
   * at once, the client still sending got a reset that could destroy the 413
   * in its receive buffer (curl saw no status at all) */
  evhttp_set_flags(srv->http, EVHTTP_SERVER_LINGERING_CLOSE);
  struct timeval tv = {(time_t)read_timeout, (suseconds_t)((read_timeout - (double)(time_t)read_timeout) * 1e6)};
  srv->read_timeout = event_base_init_common_timeout(R->base, &tv); /* O(1) timers: one duration */
  /* libevent's idle timeout (silent close) covers idle keep-alive
   * connections and stalled writes; a slow request meets our 408 first */
  tv.tv_sec += 1;
  srv->idle_timeout = tv;
  evhttp_set_timeout_tv(srv->http, &tv);
  /* our own listening socket: evhttp's default backlog (128) drops
   * connections when thousands of clients arrive at once */
  struct evutil_addrinfo hints = {0}, *ai = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = EVUTIL_AI_PASSIVE | EVUTIL_AI_NUMERICHOST;
  char port_text[16];
  snprintf(port_text, sizeof port_text, "%d", (int)port);
  evutil_socket_t fd = -1;
  int not_numeric = 0;
  if (from && from->http && from->bound) {
    fd = fcntl(evhttp_bound_socket_get_fd(from->bound), F_DUPFD_CLOEXEC, 0);
  } else if (evutil_getaddrinfo(host, port_text, &hints, &ai) != 0 || !ai) {
    not_numeric = 1;
  } else {
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    /* reuseport: several processes (gateway --workers) accept on one port, the kernel spreads connections */
    if (fd >= 0 && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
                    (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) ||
                    bind(fd, ai->ai_addr, (socklen_t)ai->ai_addrlen) != 0 || listen(fd, 65535) != 0)) {
      evutil_closesocket(fd);
      fd = -1;
    }
    evutil_freeaddrinfo(ai);
  }
  if (fd < 0 || !(srv->bound = evhttp_accept_socket_with_handle(srv->http, fd))) {
    if (fd >= 0) evutil_closesocket(fd);
    evhttp_free(srv->http);
    srv->http = NULL;
    /* a port in use is trouble from the world, not misuse: nil, err */
    int e = not_numeric ? EINVAL : errno;
    if (not_numeric) /* (errno was whatever came before: "No such file or directory") */
      resil_error_result(L, "listen", "server: cannot listen on %s:%d (%s is not a numeric address: an IP address "
                         "such as 127.0.0.1 or ::1, never a name)", host, (int)port, host);
    else
      resil_error_result(L, e == EADDRINUSE ? "address_in_use" : "listen", "server: cannot listen on %s:%d (%s)", host,
                         (int)port, strerror(e));
    lua_pushinteger(L, e);
    lua_setfield(L, -2, "errno");
    return 2;
  }
  evconnlistener_set_error_cb(evhttp_bound_socket_get_listener(srv->bound), accept_failed);
  listening_add(srv);
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

/* server:unsent() -> connections whose answer is not all handed to the
 * kernel yet (a reply is written a loop turn after it is sent, and a slow
 * reader holds the rest): closing the server now would cut them */
static int server_unsent(lua_State *L) {
  int n = 0;
  for (conn *c = check_server(L, 1)->conns; c; c = c->next)
    if (c->bev && evbuffer_get_length(bufferevent_get_output(c->bev)) > 0) n++;
  lua_pushinteger(L, n);
  return 1;
}

/* server:cut_streams() -> how many: each streamed reply that named its last
 * words (reply.cut: an SSE error event) gets them and its end now, and its
 * task is canceled (as when its client leaves: the upstream stream is
 * closed and recorded). A graceful stop's end: its clients read an error
 * their SDK raises, not a reply cut mid-way by the close. */
static int server_cut_streams(lua_State *L) {
  server *srv = check_server(L, 1);
  int n = 0;
  /* taken off the list first: a canceled task's <close> handlers run
   * inside pending_free, and may close this server */
  pending *cut = NULL, **pp = &srv->pendings;
  while (*pp) {
    pending *p = *pp;
    if (!(p->cut_tail && p->started && p->c && p->c->streaming == p)) {
      pp = &p->next;
      continue;
    }
    *pp = p->next;
    p->next = cut;
    cut = p;
  }
  /* their last words and ends, before any Lua runs */
  for (pending *p = cut; p; p = p->next) {
    struct evbuffer *buf = evbuffer_new();
    if (buf) {
      evbuffer_add(buf, p->cut_tail, p->cut_tail_len);
      evhttp_send_reply_chunk(p->req, buf);
      evbuffer_free(buf);
    }
    p->c->streaming = NULL;
    p->c = NULL;
    evhttp_send_reply_end(p->req); /* after: it may free the connection (send_next_chunk) */
    n++;
  }
  while (cut) {
    pending *p = cut;
    cut = p->next;
    pending_free(p);
  }
  lua_pushinteger(L, n);
  return 1;
}

/* server:stop_accepting(): the listening socket is closed (with SO_REUSEPORT
 * new connections go to the other processes on the port); connections
 * already open are served until the server is closed */
static int server_stop_accepting(lua_State *L) {
  server *srv = check_server(L, 1);
  if (srv->http && srv->bound) evhttp_del_accept_socket(srv->http, srv->bound);
  srv->bound = NULL;
  return 0;
}

/* server:set_handler(fn) -> the handler before: the requests read from now on
 * run fn, those under way finish on theirs (a policy reload's new version
 * serving on the server the version before opened: the prelude's listen) */
static int server_set_handler(lua_State *L) {
  server *srv = check_server(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->handler_ref);
  lua_pushvalue(L, 2);
  lua_rawseti(L, LUA_REGISTRYINDEX, srv->handler_ref);
  return 1;
}

static int server_close(lua_State *L) {
  server *srv = luaL_checkudata(L, 1, SERVER_MT);
  if (srv->in_handler) { /* (a __gc too: the reference makes it reachable again until then) */
    if (!srv->stop_deferred) {
      srv->stop_deferred = 1;
      lua_pushvalue(L, 1);
      srv->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
  }
  server_stop(L, srv);
  return 0;
}

static const luaL_Reg server_methods[] = {
  {"port", server_port},   {"pending", server_pending}, {"unsent", server_unsent},
  {"close", server_close}, {"stop_accepting", server_stop_accepting}, {"cut_streams", server_cut_streams},
  {"set_handler", server_set_handler}, {NULL, NULL}};

static const luaL_Reg server_meta[] = {{"__gc", server_close}, {"__close", server_close}, {NULL, NULL}};

int luaopen_resil_server(lua_State *L) {
  luaL_newmetatable(L, REPLY_HANDLE_MT);
  lua_pop(L, 1);
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
