/*
 * http.c: async HTTP for tasks, on libcurl's multi socket API driven by the
 * host's libevent loop (curl tells us which sockets and which timeout to
 * watch; libevent tells curl when they are ready).
 *
 * A transfer is an http_req owned by C and recycled with its easy handle, its
 * timers and its buffers (a request costs no allocation once the pool is
 * warm). A request (resil.http.request) belongs to the waiting task: the
 * continuation or the task's cancellation gives it back. A stream's belongs
 * to its userdata (http_stream.c). Connections live in the multi handles'
 * caches, so requests to the same host reuse them: one multi handle for
 * HTTP/1.1 (a connection per transfer in flight), one for HTTP/2 (a few
 * connections per origin, each carrying up to 100 streams; admit_parked).
 *
 * Network trouble never raises: the task gets nil, err{kind=...}. Misuse
 * (no url, a malformed url, a header with a line break) raises.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <ctype.h>
#include <string.h>
#include <strings.h>

#include <sys/socket.h>
#include <unistd.h>

#include <event2/event_struct.h>
#include <zlib.h>

#include "http.h"

#define DEFAULT_TIMEOUT 60.0
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_MAX_BODY (64u * 1024 * 1024)
/* libcurl 7.88 holds a response's headers to 300 KiB, not the trailers after a chunked (or h2)
 * body, which header_cb is given too: a server sending them without end grew the process until
 * the request's timeout. They are held to as much. */
#define MAX_TRAILER_BYTES (300 * 1024)
/* one server-sent event: a reply streamed as one event, not a runaway line */
#define DEFAULT_MAX_EVENT (8u * 1024 * 1024)
#define STREAM_HIGH_WATER (1u << 20)
#define REQ_POOL_MAX 256
/* a pooled request keeps buffers up to this size for the next one */
#define KEEP_BUFFER_MAX (64u * 1024)
#define RESPONSE_MT "resil.Response"
#define DEFAULT_AGENT "User-Agent: resil-lua/" RESIL_VERSION
#define ONE_SHOT_CONNECTIONS_ABOVE 512
/* per transfer: curl's 16 KiB default adds 130 MB at 10,000 in flight. 3 KiB
 * still reads 1.4 GB/s of large bodies on loopback (4 KiB: 1.5, 16 KiB: 1.8),
 * far beyond any provider, and keeps bench/scale.lua under 200 MB with
 * mimalloc (4 KiB: 202 MB). */
#define RECEIVE_BUFFER_SIZE 3072L
/* curl allocates a receive buffer one byte longer than CURLOPT_BUFFERSIZE
 * (for a NUL): told 3071, it asks for exactly 3 KiB, one of the allocator's
 * size classes (3072 would take a 3.5 KiB block: 5 MB at 10,000 in flight).
 * Sizes here and in resil.http.stats() are the blocks. */
#define CURL_BUFFER_OPTION(block) ((block) - 1)
/* libcurl < 8.1.0: the receive buffers an origin whose h2 header blocks
 * outgrew the last one gets (note_lost_header_block). 32 KiB holds the
 * blocks CDNs send (cookies, CSP, ids); the last is about libcurl 7.88's
 * limit on a header block. */
static const long header_block_buffers[] = {32768L, 131072L};
#define UPLOAD_BUFFER_SIZE 65536L /* libcurl's default */
/* HTTP/2 streams one connection carries before curl opens another (a lower
 * limit in the server's SETTINGS wins): 10,000 in flight on 100 connections */
#define H2_STREAMS_PER_CONNECTION 100L
#define H2_CONNECTIONS_PER_ORIGIN 100L
/* h2 connections an origin known to speak h2 may have opening at once: a
 * burst of 10,000 needs 100, and one at a time takes 100 handshakes' time
 * (about 10 s at a provider's 50 ms round trip) */
#define H2_OPENING_PER_ORIGIN 16
/* where a transfer let in to open a connection is (http_req.opener) */
enum { OPENER_ADMITTED = 1, OPENER_SOCKET };
/* origins remembered when idle: past this many, a new origin takes the slot
 * of one with no request and no connection (a process that calls thousands
 * of hosts, or follows redirects to them, does not grow without end) */
#define ORIGINS_KEPT 64

/* A request's header lines as a curl list, shared by the requests that send
 * the same headers (most pipelines send one set per provider): built once,
 * freed when the last request using it is collected and a newer set took
 * its place. */
struct header_set {
  struct curl_slist *list;
  char *text; /* the lines joined, to recognise the same set */
  size_t len;
  int refs;
};

/* A request URL parsed once, given to curl as CURLOPT_CURLU along with
 * CURLOPT_URL: libcurl 7.88 then copies the parsed URL for each transfer
 * instead of parsing the text and formatting it back (a byte at a time, in
 * its own printf), 10,000 instructions a request. Shared by the requests to
 * the same URL like a header set: freed when the last request using it is
 * given back and a newer URL took its place. */
struct url_set {
  CURLU *parsed;
  char *text;
  int refs;
};

/* scheme://host:port as the URL spells it: its open connections (counted
 * by the open and close socket callbacks) and the HTTP version it last
 * answered with */
typedef struct {
  char *name;
  size_t len;
  long connections, version;
  long mux_active, mux_connections; /* its transfers and connections on the h2 multi handle */
  http_req *parked, *parked_tail; /* h2 transfers waiting for a free stream */
  int nparked;               /* transfers in parked */
  int openers;               /* transfers let in to open one more connection each, not yet sent */
  int opener_sockets;        /* those of them whose connection's socket is open */
  http_req *probe;           /* an h2-handle transfer sent and not finished, and its local port: */
  int probe_port;            /* another sent from that port meanwhile shares its connection */
  int multiplexes;           /* one did: it speaks h2 */
  long recv_buffer;          /* its transfers' receive buffer (note_lost_header_block) */
  int users;                 /* requests taken for it and not given back */
} origin;

/* A libcurl multi handle driven by the loop. Two of them: HTTP/1.1 needs a
 * connection per transfer in flight, while h2 transfers must be held to a
 * few connections per origin (CURLMOPT_MAX_HOST_CONNECTIONS is per multi). */
struct curl_driver {
  http_state *H;
  CURLM *multi;
  struct event *timer_ev;
  struct event *kick_ev;    /* h2: calls curl again for data it holds (kick_cb) */
  int added;                /* transfers added in this loop turn */
};

enum { DRIVER_PLAIN, DRIVER_MUX, NDRIVERS };

struct http_state {
  resil_t *R;
  curl_driver drivers[NDRIVERS];
  CURLSH *share;            /* TLS sessions, resumed by every handle */
  origin *origins;
  int norigins, last_origin;
  int *socket_origin;       /* fd -> 2 x (index in origins + 1), + 1 on the h2 handle (0: not ours) */
  struct socket_watch **socket_watch; /* fd -> its watch, kept while curl does not watch it (socket_cb) */
  int socket_cap;
  int parked;               /* h2 transfers waiting, over all origins */
  http_req *uploading;      /* transfers whose upload buffer goes once the body is sent */
  int upload_buffers_kept;  /* libcurl < 8.7.0: see release_upload_buffers */
  http_req *fed;            /* h2 transfers given data by the last curl call, not finished */
  int h2_holds_data;        /* libcurl < 8.1.0: see kick_cb */
  int h2_loses_headers;     /* libcurl < 8.1.0: see note_lost_header_block */
  int kick_once_more;       /* the last kick handed over a full receive buffer */
  curl_socket_t acting_fd;  /* the socket of the curl call running (CURL_SOCKET_BAD: a timeout) */
  http_req *free_reqs;      /* recycled requests, each with its easy handle */
  int nfree;
  http_req *live;           /* requests in use, freed by http_free if still there */
  header_set *last_headers;
  url_set *last_url;        /* the last URL that parsed: the same URL is not parsed again */
  buffer scratch;
  buffer reply_head, reply_body; /* a finished request's buffers, swapped in to build its response */
};

static void header_set_release(http_state *H, header_set *hs) {
  if (!hs || --hs->refs > 0 || hs == H->last_headers) return;
  curl_slist_free_all(hs->list);
  free(hs->text);
  free(hs);
}

static void url_set_free(url_set *us) {
  curl_url_cleanup(us->parsed);
  free(us->text);
  free(us);
}

static void url_set_release(http_state *H, url_set *us) {
  if (us && --us->refs <= 0 && us != H->last_url) url_set_free(us);
}

/* url parsed (the last one, or a new one that becomes the last); raises on
 * a malformed url. Takes no reference. Parsed without curl's own flags
 * (CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME): they only change what a
 * URL without a scheme or with an unknown one parses to, and such URLs are
 * refused here. */
static url_set *url_set_for(lua_State *L, http_state *H, const char *url) {
  url_set *us = H->last_url;
  if (us && strcmp(us->text, url) == 0) return us;
  CURLU *parsed = curl_url();
  if (!parsed) luaL_error(L, "not enough memory");
  CURLUcode uc = curl_url_set(parsed, CURLUPART_URL, url, 0);
  if (uc != CURLUE_OK) {
    curl_url_cleanup(parsed);
    resil_raise(L, "http request: bad url '%s': %s", url, curl_url_strerror(uc));
  }
  us = calloc(1, sizeof *us);
  char *text = strdup(url);
  if (!us || !text) {
    curl_url_cleanup(parsed);
    free(us);
    free(text);
    luaL_error(L, "not enough memory");
  }
  us->parsed = parsed;
  us->text = text;
  url_set *old = H->last_url;
  H->last_url = us;
  if (old && old->refs <= 0) url_set_free(old);
  return us;
}

/* The length of url's scheme://host:port */
static size_t origin_length(const char *url) {
  const char *host = strstr(url, "://");
  host = host ? host + 3 : url;
  return (size_t)(host - url) + strcspn(host, "/?#");
}

/* An origin's slot can be given to another: nothing refers to its index (no
 * request, no socket, no transfer waiting) and it has learned nothing worth
 * keeping (a grown receive buffer is: forgetting it would lose a burst of
 * header blocks again). */
static int origin_idle(const origin *o) {
  return o->users == 0 && o->connections == 0 && o->mux_active == 0 && !o->parked && !o->openers &&
         o->recv_buffer == RECEIVE_BUFFER_SIZE;
}

/* url's origin: its index in H->origins, added if new; -1 without memory */
static int origin_index(http_state *H, const char *url) {
  size_t len = origin_length(url);
  origin *o = H->norigins ? &H->origins[H->last_origin] : NULL;
  if (o && o->len == len && strncasecmp(o->name, url, len) == 0) return H->last_origin;
  int idle = -1;
  for (int i = 0; i < H->norigins; i++) {
    o = &H->origins[i];
    if (o->len == len && strncasecmp(o->name, url, len) == 0) return H->last_origin = i;
    if (idle < 0 && origin_idle(o)) idle = i;
  }
  char *name = strndup(url, len);
  if (!name) return -1;
  int i = H->norigins >= ORIGINS_KEPT ? idle : -1;
  if (i < 0) {
    origin *grown = realloc(H->origins, (size_t)(H->norigins + 1) * sizeof *grown);
    if (!grown) {
      free(name);
      return -1;
    }
    H->origins = grown;
    i = H->norigins++;
  } else {
    free(H->origins[i].name);
  }
  o = &H->origins[i];
  o->name = name;
  o->len = len;
  o->connections = o->version = o->mux_active = o->mux_connections = 0;
  o->parked = o->parked_tail = NULL;
  o->nparked = o->openers = o->opener_sockets = o->multiplexes = 0;
  o->probe = NULL;
  o->recv_buffer = RECEIVE_BUFFER_SIZE;
  o->users = 0;
  return H->last_origin = i;
}

/* What a finished request's result is built from, copied out so that the
 * request can go back to the pool before anything that may raise. */
typedef struct {
  const char *url;
  long status, http_version;
  double elapsed, timeout, idle_timeout;
  size_t max_body, max_event;
  CURLcode result;
  abort_reason aborted;
  const char *detail;
  int client_fault;
  int unsent; /* curl never reached the request's sending (prereq_cb): no connection came */
  /* body bytes read before a non-stream transfer failed; -1 for a stream
   * (its reader accounts for what it read) */
  long long received;
} outcome;

typedef struct socket_watch {
  struct event ev; /* re-assigned in place when curl changes its interest */
  curl_driver *d;
  short flags;     /* what ev was assigned (0: never) */
  int armed;       /* ev is added */
  int idle;        /* curl no longer watches the socket (CURL_POLL_REMOVE): kept for its next transfer */
  int kept;        /* idle after an HTTP/1 answer: in curl's cache, no transfer's (shut_if_stray) */
} socket_watch;

/* ---------- buffers ---------- */

static int buffer_append(buffer *b, const char *data, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 512; /* a typical header block or JSON answer */
    while (cap < b->len + n + 1) cap *= 2;
    char *grown = realloc(b->data, cap);
    if (!grown) return -1;
    b->data = grown;
    b->cap = cap;
  }
  memcpy(b->data + b->len, data, n);
  b->len += n;
  b->data[b->len] = '\0';
  return 0;
}

/* ---------- completion ---------- */

static void unpark(http_req *r) {
  origin *o = &r->H->origins[r->origin];
  if (r->park_prev) r->park_prev->park_next = r->park_next;
  else o->parked = r->park_next;
  if (r->park_next) r->park_next->park_prev = r->park_prev;
  else o->parked_tail = r->park_prev;
  r->park_next = r->park_prev = NULL;
  r->parked = 0;
  o->nparked--;
  r->H->parked--;
}

static void upload_unlink(http_req *r) {
  if (r->up_prev) r->up_prev->up_next = r->up_next;
  else r->H->uploading = r->up_next;
  if (r->up_next) r->up_next->up_prev = r->up_prev;
  r->up_next = r->up_prev = NULL;
  r->uploading = 0;
}

/* libcurl before 8.7.0 gives a transfer that sends a body over TLS or h2 a
 * 64 KiB upload buffer (the page a small body is copied to is touched: 4 KB
 * of RSS) and keeps it until the transfer ends: 42 MB at 10,000 h2 POSTs in
 * flight, for bodies sent in their first millisecond (bench/README.md).
 * Once curl has sent all of the body (CURLINFO_SIZE_UPLOAD_T, counted as
 * bytes leave the buffer, per attempt) the buffer holds nothing, and setting
 * CURLOPT_UPLOAD_BUFFERSIZE frees it: the next transfer's upload reuses the
 * block. Called between curl calls, never from a callback. */
static void release_upload_buffers(http_state *H) {
  http_req *r = H->uploading;
  while (r) {
    http_req *next = r->up_next;
    curl_off_t sent = 0;
    if (curl_easy_getinfo(r->easy, CURLINFO_SIZE_UPLOAD_T, &sent) == CURLE_OK && sent >= r->set.body_len) {
      upload_unlink(r);
      curl_easy_setopt(r->easy, CURLOPT_UPLOAD_BUFFERSIZE, UPLOAD_BUFFER_SIZE);
    }
    r = next;
  }
}

/* A transfer just handed to curl: watched by release_upload_buffers if
 * curl will give it an upload buffer. */
static void upload_watch(http_req *r) {
  http_state *H = r->H;
  if (!r->req_body || r->set.body_len <= 0 || !H->upload_buffers_kept) return;
  if (r->driver != &H->drivers[DRIVER_MUX] && strncasecmp(r->url, "https:", 6) != 0) return; /* sent with the headers */
  r->uploading = 1;
  r->up_prev = NULL;
  r->up_next = H->uploading;
  if (H->uploading) H->uploading->up_prev = r;
  H->uploading = r;
}

/* h2 by ALPN or prior knowledge: multiplexed, or (libcurl < 8.0) h2c on a
 * connection of its own in the plain handle */
static int speaks_h2(http_req *r) {
  return r->driver == &r->H->drivers[DRIVER_MUX] || r->set.http_version == CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE;
}

static void fed_unlink(http_req *r) {
  if (r->fed_prev) r->fed_prev->fed_next = r->fed_next;
  else r->H->fed = r->fed_next;
  if (r->fed_next) r->fed_next->fed_prev = r->fed_prev;
  r->fed_next = r->fed_prev = NULL;
  r->fed = 0;
  r->fed_bytes = 0;
  r->fed_head = 0;
}

/* From write_cb and header_cb: an h2 transfer got data, header lines if
 * head (see kick_cb) */
static void note_fed(http_req *r, size_t len, int head) {
  http_state *H = r->H;
  if (!H->h2_holds_data || !speaks_h2(r)) return;
  if (H->acting_fd != CURL_SOCKET_BAD) r->conn_fd = H->acting_fd;
  r->fed_bytes += len;
  r->fed_head |= head;
  if (r->fed) return;
  r->fed = 1;
  r->fed_prev = NULL;
  r->fed_next = H->fed;
  if (H->fed) H->fed->fed_prev = r;
  H->fed = r;
}

/* r, let in to open a connection, has it (or a free stream), or is gone */
static void opener_done(http_req *r) {
  if (!r->opener) return;
  origin *o = &r->H->origins[r->origin];
  o->openers--;
  o->opener_sockets -= r->opener == OPENER_SOCKET;
  r->opener = 0;
}

/* Take the transfer off the multi handle (or out of its origin's queue);
 * the easy handle stays with r. */
static void forget_closed_sockets(http_req *r);

static void held_forget(http_req *r);

static void request_detach(http_req *r) {
  timer_stop(&r->deadline);
  held_forget(r);
  timer_stop(&r->idle);
  if (r->uploading) upload_unlink(r);
  if (r->fed) fed_unlink(r);
  if (r->active) {
    http_state *H = r->H;
    origin *o = &H->origins[r->origin];
    if (r->parked) {
      unpark(r);
    } else {
      curl_multi_remove_handle(r->driver->multi, r->easy);
      if (r->driver == &H->drivers[DRIVER_MUX]) o->mux_active--;
    }
    if (r->nopened) forget_closed_sockets(r);
    opener_done(r);
    if (o->probe == r) o->probe = NULL;
    r->active = 0;
    H->R->io_pending--;
  }
}

/* The version the response came with, remembered for its origin (whether
 * later requests there multiplex) */
static void note_http_version(http_req *r) {
  long v = 0;
  curl_easy_getinfo(r->easy, CURLINFO_HTTP_VERSION, &v);
  if (!v) return;
  r->http_version = v;
  if (r->set.http_version != CURL_HTTP_VERSION_1_1) /* what the origin offers, not what was asked */
    r->H->origins[r->origin].version = v;
}

/* libcurl before 8.1.0 loses the first receive buffer of an h2 header
 * block bigger than the transfer's receive buffer when the block is decoded
 * while curl reads for another stream of the connection (7.88 lib/http2.c:
 * the pending-header branch of cf_h2_recv ignores memlen; bench/README.md).
 * What is left starts mid-line and fails as "Received HTTP/0.9 when not
 * allowed", which no h2 stream can be otherwise (curl writes its status
 * line). Nothing restores the lost bytes, and the request may have been
 * processed, so it fails (kind "protocol", retryable by policies) and says
 * why; the origin's later transfers get a buffer the next size up. */
static int lost_header_block(const http_req *r, CURLcode result) {
  const origin *o = &r->H->origins[r->origin];
  return r->H->h2_loses_headers && result == CURLE_UNSUPPORTED_PROTOCOL &&
         r->driver == &r->H->drivers[DRIVER_MUX] && o->version != CURL_HTTP_VERSION_1_1 &&
         o->version != CURL_HTTP_VERSION_1_0 && strncmp(r->errbuf, "Received HTTP/0.9", 17) == 0;
}

static void note_lost_header_block(http_req *r) {
  origin *o = &r->H->origins[r->origin];
  long had = r->set.recv_buffer, next = had;
  for (size_t i = 0; i < sizeof header_block_buffers / sizeof *header_block_buffers && next <= had; i++)
    next = header_block_buffers[i];
  if (next <= had) {
    snprintf(r->errbuf, sizeof r->errbuf,
             "h2 header block larger than the %ld KiB receive buffer, lost by libcurl < 8.1.0 "
             "(\"Received HTTP/0.9 when not allowed\"); no larger buffer is tried", had / 1024);
    return;
  }
  if (o->recv_buffer < next) o->recv_buffer = next;
  snprintf(r->errbuf, sizeof r->errbuf,
           "h2 header block larger than the %ld KiB receive buffer, lost by libcurl < 8.1.0 "
           "(\"Received HTTP/0.9 when not allowed\"); later requests to this origin use %ld KiB",
           had / 1024, o->recv_buffer / 1024);
}

/* libcurl 7.88 reuses a kept HTTP/1 connection with bytes waiting on it (8.x does not reuse one
 * with input pending): bytes a server sent past its Content-Length, or after its answer, were
 * read as the next request's answer, and every later answer on that connection was the one
 * before it. A byte there is one no request asked for (or the server's close): the connection is
 * shut, its next send fails and curl sends that request again on a new connection, as it does
 * for a kept connection the server closed. Looked at as an HTTP/1 answer ends (fd: its socket),
 * and by the idle socket's watch for bytes that come later (socket_event_cb). (An h2
 * connection's idle bytes are frames, a PING or a GOAWAY, that curl reads.) */
static void shut_if_stray(http_state *H, curl_socket_t fd) {
  if (fd < 0 || fd >= H->socket_cap || !H->socket_origin[fd]) return;
  socket_watch *w = H->socket_watch[fd];
  if (!w || !w->idle) return; /* closed, or a transfer's again */
  char c;
  if (recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
    shutdown(fd, SHUT_RDWR);
  else
    w->kept = 1;
}

static const char *content_encoding(const http_req *r, size_t *n);

void request_finish(http_req *r, CURLcode result, abort_reason why) {
  if (r->done) return;
  if (r->easy && why == ABORT_NONE) {
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
    note_http_version(r);
    /* libcurl 7.88 ends some answers without a status it could read
     * ("HTTP/200...") as a success with status 0: not a response */
    /* (and one past three digits, "HTTP/204200 ...", read as 4200: found by fuzz/http_fuzz.c) */
    if ((result == CURLE_OK && (r->status < 100 || r->status > 999)) ||
        (r->status_invalid && result == CURLE_WRITE_ERROR)) {
      result = CURLE_WEIRD_SERVER_REPLY;
      if (r->status > 999) r->status = 0; /* (not said as the error's status either) */
      snprintf(r->errbuf, sizeof r->errbuf, "no valid HTTP status line in the response");
    }
    if (r->trailers_too_large && result == CURLE_WRITE_ERROR) {
      result = CURLE_OUT_OF_MEMORY; /* (too_large) */
      snprintf(r->errbuf, sizeof r->errbuf, "the response's trailers (after its body) ran past %d KiB",
               MAX_TRAILER_BYTES / 1024);
    }
    if (r->length_conflict && result == CURLE_WRITE_ERROR) {
      result = CURLE_WEIRD_SERVER_REPLY;
      snprintf(r->errbuf, sizeof r->errbuf, "the response has Content-Length headers that differ: where its body ends "
               "cannot be known");
    }
    /* the body's gzip stream ended before its end, or did not decode (gunzip) */
    if (result == CURLE_OK && r->gz_open) {
      result = CURLE_BAD_CONTENT_ENCODING;
      snprintf(r->errbuf, sizeof r->errbuf, "the body's gzip stream ended before its end: the answer is incomplete");
    } else if (r->decode_failed && result == CURLE_WRITE_ERROR) {
      result = (CURLcode)r->decode_failed;
      size_t n = 0;
      const char *v = content_encoding(r, &n);
      if (result == CURLE_OUT_OF_MEMORY) snprintf(r->errbuf, sizeof r->errbuf, "no memory to decode the body");
      else if (r->gz) snprintf(r->errbuf, sizeof r->errbuf, "a body that is no valid %.*s (%s)", v ? (int)(n > 16 ? 16 : n) : 4,
                               v ? v : "gzip", r->gz->msg ? r->gz->msg : "cannot decode");
      else snprintf(r->errbuf, sizeof r->errbuf, "a body in Content-Encoding %.*s, which is not decoded here (gzip is)",
                    v ? (int)(n > 64 ? 64 : n) : 1, v ? v : "?");
    }
    /* libcurl 7.88 refuses a header line over 100 KiB (CURL_MAX_HTTP_HEADER) as out of memory,
     * saying only "Out of memory": a user looked for a leak */
    if (result == CURLE_OUT_OF_MEMORY && !r->headers_done && !r->errbuf[0])
      snprintf(r->errbuf, sizeof r->errbuf, "a response header line longer than libcurl's limit (100 KiB), "
               "or no memory for the response's headers");
    if (lost_header_block(r, result)) {
      note_lost_header_block(r);
      r->client_fault = 1;
    }
    if (result == CURLE_OK && (r->http_version == CURL_HTTP_VERSION_1_1 || r->http_version == CURL_HTTP_VERSION_1_0)) {
      /* (a head curl read outside a socket's event, in a timer's run, says no socket: asked of curl
       * then, which looks through its connections) */
      curl_socket_t fd = r->http1_fd;
      if (fd == CURL_SOCKET_BAD && curl_easy_getinfo(r->easy, CURLINFO_ACTIVESOCKET, &fd) != CURLE_OK)
        fd = CURL_SOCKET_BAD;
      shut_if_stray(r->H, fd);
    }
  }
  r->done = 1;
  r->result = result;
  if (r->aborted == ABORT_NONE) r->aborted = why;
  r->elapsed = resil_now(r->H->R) - r->started;
  request_detach(r);
  if (r->waiter) {
    task *t = r->waiter;
    r->waiter = NULL;
    task_wake(t);
  }
}

static void check_multi_info(curl_driver *d) {
  CURLMsg *msg;
  int pending;
  while ((msg = curl_multi_info_read(d->multi, &pending))) {
    if (msg->msg != CURLMSG_DONE) continue;
    http_req *r = NULL;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
    if (r) request_finish(r, msg->data.result, ABORT_NONE);
  }
}

/* ---------- admission to h2 connections ---------- */

/* h2 transfers enter curl only as the origin's connections have free
 * streams, plus openers, each let in to open one more connection once those
 * are full: curl would otherwise open a connection for each transfer that
 * finds the others full (200 at once: 100 connections). Until the origin has
 * answered once, one opener, whose ALPN answer the others wait for
 * (CURLOPT_PIPEWAIT); then as many as the waiting transfers fill, up to
 * H2_OPENING_PER_ORIGIN at once, without PIPEWAIT (with it, curl 7.88 makes
 * each wait for the connections being opened: one handshake at a time). An
 * origin that turned out to speak HTTP/1.1 sends its waiting "auto"
 * transfers to the plain handle. */
static void admit_parked(http_state *H) {
  for (int i = 0; i < H->norigins && H->parked > 0; i++) {
    origin *o = &H->origins[i];
    int http1 = o->version == CURL_HTTP_VERSION_1_1 || o->version == CURL_HTTP_VERSION_1_0;
    while (o->parked) {
      http_req *r = o->parked;
      int plain = http1 && r->set.http_version == CURL_HTTP_VERSION_2TLS, opener = 0;
      /* an opener's connection has no room until it is up; until the origin
       * is known to multiplex, a connection may carry one transfer (an https
       * origin may speak only HTTP/1.1: curl would queue the rest behind
       * its connection limit, and they would not move to the plain handle) */
      int known = o->multiplexes || o->version == CURL_HTTP_VERSION_2_0;
      long ready = o->mux_connections - o->opener_sockets, per_connection = known ? H2_STREAMS_PER_CONNECTION : 1;
      if (!plain && o->mux_active >= per_connection * ready) {
        int sockets_coming = o->openers - o->opener_sockets;
        if (o->openers >= (known ? H2_OPENING_PER_ORIGIN : 1) || (long)o->openers * per_connection >= o->nparked ||
            o->mux_connections + sockets_coming >= H2_CONNECTIONS_PER_ORIGIN)
          break;
        opener = 1;
      }
      unpark(r);
      r->driver = &H->drivers[plain ? DRIVER_PLAIN : DRIVER_MUX];
      if (opener) {
        r->opener = OPENER_ADMITTED;
        o->openers++;
        if (known && !r->set.no_pipewait) {
          curl_easy_setopt(r->easy, CURLOPT_PIPEWAIT, 0L);
          r->set.no_pipewait = 1;
        }
      }
      if (curl_multi_add_handle(r->driver->multi, r->easy) != CURLM_OK) {
        r->active = 0; /* never in curl */
        H->R->io_pending--;
        opener_done(r);
        request_finish(r, CURLE_OUT_OF_MEMORY, ABORT_NONE);
        continue;
      }
      if (!plain) o->mux_active++;
      upload_watch(r);
      r->driver->added = 1;
    }
  }
}

/* A header that may carry a credential, by its name: Authorization, Cookie,
 * Proxy-Authorization and any whose name holds auth, key, token, secret,
 * cookie, session, password, credential or signature (x-api-key, api-key,
 * x-goog-api-key, x-auth-token, x-amz-security-token, ...), but an Idempotency-Key */
static int credential_header(const char *line) {
  static const char *const words[] = {"auth", "key", "token", "secret", "cookie", "session", "password",
                                      "credential", "signature"};
  size_t len = strcspn(line, ":;");
  /* (an Idempotency-Key names the call and opens nothing: dropped, the other origin could not tell
   * a POST sent again from a new one) */
  if ((len == 15 && strncasecmp(line, "idempotency-key", 15) == 0) ||
      (len == 17 && strncasecmp(line, "x-idempotency-key", 17) == 0))
    return 0;
  for (size_t w = 0; w < sizeof words / sizeof words[0]; w++) {
    size_t n = strlen(words[w]);
    for (size_t i = 0; i + n <= len; i++)
      if (strncasecmp(line + i, words[w], n) == 0) return 1;
  }
  return 0;
}

/* follow_redirects: a hop to another origin (scheme, host or port) than the
 * request's is sent without the caller's credential headers (libcurl strips
 * only Authorization and Cookie: an x-api-key went to whatever host the
 * Location named); a hop back to the request's origin sends them again.
 * Curl builds each hop's request after this (prereq_cb). -1: no memory. */
static int redirect_headers(http_req *r) {
  long hops = 0;
  char *url = NULL;
  if (curl_easy_getinfo(r->easy, CURLINFO_REDIRECT_COUNT, &hops) != CURLE_OK) hops = 1;
  struct curl_slist *want = r->req_headers->list;
  if (hops > 0) {
    size_t n = origin_length(r->url);
    int same = curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url &&
               origin_length(url) == n && strncasecmp(url, r->url, n) == 0;
    if (!same) {
      if (!r->hop_headers) { /* (never empty: a User-Agent line, ours or the caller's, is kept) */
        for (struct curl_slist *h = want; h; h = h->next)
          if (!credential_header(h->data)) {
            struct curl_slist *grown = curl_slist_append(r->hop_headers, h->data);
            if (!grown) return -1; /* (req_release frees what was made) */
            r->hop_headers = grown;
          }
      }
      want = r->hop_headers;
    }
  }
  if (r->set.headers != want) {
    r->set.headers = want;
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, want);
  }
  return 0;
}

/* The opener's connection is up (or it found a free stream): the origin has
 * room for more. Also counts the times curl sends a request: it resends one
 * that a GOAWAY or a dead reused connection refused. */
static int prereq_cb(void *clientp, char *primary_ip, char *local_ip, int primary_port, int local_port) {
  (void)primary_ip, (void)local_ip, (void)primary_port;
  http_req *r = clientp;
  opener_done(r);
  origin *o = &r->H->origins[r->origin];
  if (!o->multiplexes && r->driver == &r->H->drivers[DRIVER_MUX]) {
    /* the version is known when the answer comes; two transfers sent at once
     * from one local port share a connection: it multiplexes */
    if (!o->probe) {
      o->probe = r;
      o->probe_port = local_port;
    } else if (o->probe != r && o->probe_port == local_port) {
      o->multiplexes = 1;
    }
  }
  if (++r->sends > 1) {
    r->set.retried++; /* curl sent it again: see easy_retries_spent */
    /* what failed the last send (a kept connection reset) is past: libcurl keeps a transfer's first
     * failure's words, so this one's failure would say "Connection reset by peer" */
    r->errbuf[0] = '\0';
  }
  if (r->set.follow && redirect_headers(r) != 0) return CURL_PREREQFUNC_ABORT;
  return CURL_PREREQFUNC_OK;
}

static void http_flush(void *arg);

/* What follows every curl call: free upload buffers whose bodies went,
 * finish the transfers curl finished, and look again at h2 transfers that
 * got data and are not finished (kick_cb). */
static void after_action(curl_driver *d) {
  http_state *H = d->H;
  if (H->uploading) release_upload_buffers(H);
  check_multi_info(d);
  if (!H->fed) return;
  /* curl holds data only for a stream given a full receive buffer (the rest
   * paused) or part of a header block (the rest of the decoded block, a
   * buffer at a time: the partial line it keeps never reaches header_cb);
   * the run after the last such one reads what the pause left in the
   * connection's buffer for its neighbours */
  int full = 0;
  for (http_req *r = H->fed; r && !full; r = r->fed_next)
    full = r->fed_bytes >= (size_t)CURL_BUFFER_OPTION(r->set.recv_buffer) || (r->fed_head && !r->headers_done);
  if (full || H->kick_once_more) {
    H->kick_once_more = full;
    event_active(H->drivers[DRIVER_MUX].kick_ev, EV_TIMEOUT, 0);
  } else {
    while (H->fed) fed_unlink(H->fed);
  }
}

/* ---------- libcurl < 8.1.0: the end of a DATA frame it paused in ---------- */

/* libcurl 7.88 pauses nghttp2 inside a DATA frame that does not fit the
 * stream's receive buffer (NGHTTP2_ERR_PAUSE from its on_data_chunk_recv)
 * and hands the rest over from nghttp2's input; nghttp2 finishes the frame
 * (its END_STREAM: the stream closes) at its next nghttp2_session_mem_recv
 * only, which 7.7x made with 0 bytes once the rest was handed over and 7.88
 * makes only when more bytes come (lib/http2.c cf_h2_recv). A last frame
 * that carries both data and END_STREAM, with nothing after it on the
 * connection (a reply without Content-Length: nginx's gzip, sub_filter,
 * SSI), left the transfer waiting for its timeout, all of its body read.
 * So the executable and libresil.so interpose three nghttp2 functions (the
 * real ones by dlsym's RTLD_NEXT), for libcurl < 8.1.0's calls only:
 * curl's chunk callback is wrapped and a pause noted per session (one at a
 * time: curl's pause_stream_id); once the stream was handed the rest
 * (held_note_write), kick_cb, outside curl, makes the 0-byte call and runs
 * the connection again, where curl sees the stream's end. Until the rest
 * is handed over nothing is done: nghttp2 would go on and curl could read
 * over the input it still points into. curl's on_frame_recv reads the
 * transfer it is running, NULL outside its calls, so for the 0-byte call
 * its DATA case (which wakes a stream that still has data: these have
 * none) is skipped; on_stream_close needs no running transfer. */
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef int (*chunk_recv_fn)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *);
#define NGHTTP2_ERR_PAUSE (-526)
#define HELD_FRAMES_MAX 64

enum { HELD_PAUSED, HELD_FILLED, HELD_HANDED };
typedef struct {
  nghttp2_session *session;
  int32_t stream_id;
  void *easy;     /* the paused stream's transfer (its stream user data) */
  http_req *r;    /* ours, once write_cb saw it handed the rest */
  int state;
} held_frame;

/* per thread: curl's callbacks run in the thread driving its multi handle */
#define THREAD_TLS _Thread_local
static THREAD_TLS held_frame held_frames[HELD_FRAMES_MAX];
static THREAD_TLS int held_count;
typedef int (*frame_recv_fn)(nghttp2_session *, const void *, void *);
static chunk_recv_fn curl_chunk_recv;
static frame_recv_fn curl_frame_recv;
static THREAD_TLS int held_finishing; /* in held_finish's call: no transfer is curl's current one */
static void *(*real_stream_user_data)(nghttp2_session *, int32_t);
static ssize_t (*real_mem_recv)(nghttp2_session *, const uint8_t *, size_t);
static int32_t (*real_recv_data_length)(nghttp2_session *, int32_t);

static void held_drop(int i) { held_frames[i] = held_frames[--held_count]; }

static void *next_symbol(const char *name) {
  void *f = dlsym(RTLD_NEXT, name);
  if (!f) abort(); /* (only libcurl, through libnghttp2, calls these names: it is loaded) */
  return f;
}

static int chunk_recv_hook(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len, void *ud) {
  int rv = curl_chunk_recv(s, flags, id, data, len, ud);
  if (rv != NGHTTP2_ERR_PAUSE) return rv;
  void *easy = real_stream_user_data(s, id);
  int i = 0;
  while (i < held_count && held_frames[i].session != s) i++;
  if (i == held_count) {
    if (held_count == HELD_FRAMES_MAX) return rv; /* (that stream may wait for its timeout, as before) */
    held_count++;
  }
  held_frames[i] = (held_frame){ s, id, easy, NULL, HELD_PAUSED };
  return rv;
}

/* nghttp2_frame_hd, the start of every nghttp2_frame */
typedef struct { size_t length; int32_t stream_id; uint8_t type, flags, reserved; } frame_head;

/* curl's on_frame_recv reads the transfer it runs (NULL outside its calls)
 * for a DATA frame that ends its stream, to wake the stream if it still has
 * data: held_finish's streams have none, and their stream's end is seen by
 * on_stream_close, which needs no current transfer */
static int frame_recv_hook(nghttp2_session *s, const void *frame, void *ud) {
  if (held_finishing && ((const frame_head *)frame)->type == 0 /* DATA */) return 0;
  return curl_frame_recv(s, frame, ud);
}

/* libcurl 7.88.0 to 8.0.1: 7.87 and older make the 0-byte call themselves, 8.1.0 again */
static int called_by_old_curl(void *caller_address) {
  Dl_info caller, curl;
  void *curl_fn = dlsym(RTLD_DEFAULT, "curl_version");
  unsigned version = curl_fn ? curl_version_info(CURLVERSION_NOW)->version_num : 0;
  return version >= 0x075800 && version < 0x080100 && dladdr(caller_address, &caller) &&
         dladdr(curl_fn, &curl) && caller.dli_fbase == curl.dli_fbase;
}

__attribute__((visibility("default"))) void
nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *cbs, frame_recv_fn cb) {
  static void (*real)(nghttp2_session_callbacks *, frame_recv_fn);
  if (!real) real = (void (*)(nghttp2_session_callbacks *, frame_recv_fn))next_symbol(__func__);
  if (cb && called_by_old_curl(__builtin_return_address(0))) {
    curl_frame_recv = cb; /* (always the same function) */
    cb = frame_recv_hook;
  }
  real(cbs, cb);
}

__attribute__((visibility("default"))) void
nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *cbs, chunk_recv_fn cb) {
  static void (*real)(nghttp2_session_callbacks *, chunk_recv_fn);
  if (!real) real = (void (*)(nghttp2_session_callbacks *, chunk_recv_fn))next_symbol(__func__);
  if (cb && curl_frame_recv && called_by_old_curl(__builtin_return_address(0))) {
    if (!real_stream_user_data)
      real_stream_user_data = (void *(*)(nghttp2_session *, int32_t))next_symbol("nghttp2_session_get_stream_user_data");
    if (!real_mem_recv) real_mem_recv = (ssize_t (*)(nghttp2_session *, const uint8_t *, size_t))next_symbol("nghttp2_session_mem_recv");
    if (!real_recv_data_length)
      real_recv_data_length = (int32_t (*)(nghttp2_session *, int32_t))next_symbol("nghttp2_session_get_stream_effective_recv_data_length");
    curl_chunk_recv = cb; /* (always the same function) */
    cb = chunk_recv_hook;
  }
  real(cbs, cb);
}

/* a session curl deletes (its connection closed) is forgotten */
__attribute__((visibility("default"))) void nghttp2_session_del(nghttp2_session *s) {
  static void (*real)(nghttp2_session *);
  if (!real) real = (void (*)(nghttp2_session *))next_symbol(__func__);
  for (int i = held_count - 1; i >= 0; i--)
    if (held_frames[i].session == s) held_drop(i);
  real(s);
}

/* From write_cb: r was handed len bytes. Was that the rest of a paused frame? */
static void held_note_write(http_req *r, size_t len) {
  for (int i = 0; i < held_count; i++) {
    if (held_frames[i].easy != r->easy || held_frames[i].state > HELD_FILLED) continue;
    /* curl fills the buffer with the frame it pauses in (its first write,
     * shorter when the buffer began with the header lines) and hands the
     * rest over a buffer at a time: the next shorter write is its last.
     * Writes are at most CURL_MAX_WRITE_SIZE: a larger buffer's cannot tell. */
    size_t full = (size_t)CURL_BUFFER_OPTION(r->set.recv_buffer);
    /* exact: the stream's DATA bytes nghttp2 read (its receive window: no
     * WINDOW_UPDATE before 16 MiB, as curl's window is 32 MiB; padding
     * counts, and then they never match) are all written: nothing is left
     * in curl's hands, whatever the write sizes (a rest of whole buffers,
     * a buffer past 16 KiB) */
    int32_t read = real_recv_data_length(held_frames[i].session, held_frames[i].stream_id);
    int all_written = read > 0 && (size_t)read == r->h2_raw;
    if (!all_written && held_frames[i].state == HELD_PAUSED) {
      held_frames[i].state = HELD_FILLED;
    } else if (all_written || (len < full && full <= CURL_MAX_WRITE_SIZE)) {
      held_frames[i].r = r;
      held_frames[i].state = HELD_HANDED;
      event_active(r->driver->kick_ev, EV_TIMEOUT, 0);
    }
    return;
  }
}

/* r is done: no call for its frame */
static void held_forget(http_req *r) {
  for (int i = held_count - 1; i >= 0; i--)
    if (held_frames[i].r == r || held_frames[i].easy == r->easy) held_drop(i);
}

/* From kick_cb, outside curl: have nghttp2 finish the frames whose rest
 * was handed over (the end of its stream drains its transfer), and have
 * kick_cb run their connections */
static void held_finish(http_state *H) {
  for (int i = held_count - 1; i >= 0; i--) {
    http_req *r = held_frames[i].r;
    if (!r || r->H != H || held_frames[i].state != HELD_HANDED) continue;
    nghttp2_session *s = held_frames[i].session;
    held_drop(i);
    held_finishing = 1;
    real_mem_recv(s, NULL, 0); /* (an error: curl sees the session's trouble when it reads) */
    held_finishing = 0;
    note_fed(r, 0, 0);
  }
}

/* libcurl before 8.1.0 can hold an h2 stream's data that did not fit its
 * receive buffer (a paused DATA frame, the rest of the connection's read)
 * and not call for the transfer to run again: its data-pending check is
 * inverted (7.88 lib/http2.c, cf_h2_data_pending). Nothing more comes from
 * the socket, and the reply waits for a timer: a 10,000-byte reply took
 * 10 s (the connect timeout's), a 40 KB one timed out; a header block
 * bigger than the receive buffer never completed. So a transfer that
 * got data and is not finished has its connection's socket run once more,
 * after the events already due (each run hands over at most a receive
 * buffer per stream); a run that gives it nothing ends the kicks. */
static void kick_socket(curl_driver *d, curl_socket_t s) {
  int running;
  d->H->acting_fd = s;
  curl_multi_socket_action(d->multi, s, CURL_CSELECT_IN, &running);
  d->H->acting_fd = CURL_SOCKET_BAD;
  after_action(d);
}

typedef struct { curl_driver *d; curl_socket_t s; } kick_target;

static void kick_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  http_state *H = ((curl_driver *)arg)->H;
  curl_driver *mux = &H->drivers[DRIVER_MUX];
  kick_target socks[8];
  int n = 0, all = 0;
  if (held_count) held_finish(H);
  while (H->fed) {
    http_req *r = H->fed;
    curl_socket_t s = r->conn_fd;
    curl_driver *d = r->driver;
    if (d != mux && s == CURL_SOCKET_BAD) curl_easy_getinfo(r->easy, CURLINFO_ACTIVESOCKET, &s);
    fed_unlink(r);
    int seen = 0;
    for (int i = 0; i < n; i++) seen |= socks[i].s == s;
    if (seen) continue;
    /* (a plain handle's h2c connection is its transfer's alone: kicked by name) */
    if (d == mux && (s == CURL_SOCKET_BAD || n == (int)(sizeof socks / sizeof socks[0]))) all = 1;
    else if (n < (int)(sizeof socks / sizeof socks[0])) socks[n++] = (kick_target){ d, s };
    else kick_socket(d, s);
  }
  if (all) { /* data given in a timeout's run, or many connections: every multiplexed socket */
    for (int i = 0; i < n; i++)
      if (socks[i].d != mux) kick_socket(socks[i].d, socks[i].s);
    n = 0;
    for (int s = 0; s < H->socket_cap; s++)
      if (H->socket_origin[s] & 1) kick_socket(mux, s);
  }
  for (int i = 0; i < n; i++) kick_socket(socks[i].d, socks[i].s);
  if (H->parked) http_flush(H);
}

/* ---------- curl <-> libevent ---------- */

static void socket_event_cb(evutil_socket_t fd, short what, void *arg) {
  socket_watch *w = arg;
  if (w->idle) { /* a kept connection's EOF or stray bytes */
    event_del(&w->ev);
    w->armed = 0;
    if (w->kept) shutdown(fd, SHUT_RDWR); /* (an HTTP/1 connection's: see shut_if_stray) */
    return;
  }
  curl_driver *d = w->d; /* the watch may be freed during the action */
  int running, action = (what & EV_READ ? CURL_CSELECT_IN : 0) | (what & EV_WRITE ? CURL_CSELECT_OUT : 0);
  d->H->acting_fd = fd;
  curl_multi_socket_action(d->multi, fd, action, &running);
  d->H->acting_fd = CURL_SOCKET_BAD;
  after_action(d);
  if (d->H->parked) http_flush(d->H);
}

static void watch_free(socket_watch *w) {
  if (w->armed) event_del(&w->ev);
  free(w);
}

/* curl stops watching a kept connection's socket as each transfer on it
 * ends and watches it again for the next one: an epoll_ctl DEL and ADD a
 * request. A socket of ours (opened and closed through our callbacks, so
 * its watch goes before its close: close_socket_cb) keeps its watch, idle,
 * and the next transfer finds it as it was. */
static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
  (void)easy;
  curl_driver *d = userp;
  http_state *H = d->H;
  socket_watch *w = socketp;
  int ours = s >= 0 && s < H->socket_cap && H->socket_origin[s];
  if (what == CURL_POLL_REMOVE) {
    if (!w) return 0;
    curl_multi_assign(d->multi, s, NULL);
    if (ours && H->socket_watch[s] == w) w->idle = 1;
    else watch_free(w);
    return 0;
  }
  short flags = EV_PERSIST | (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
  if (!w && ours && H->socket_watch[s] && H->socket_watch[s]->d == d) {
    w = H->socket_watch[s];
    curl_multi_assign(d->multi, s, w);
  } else if (!w) {
    w = calloc(1, sizeof *w);
    if (!w) return -1;
    w->d = d;
    curl_multi_assign(d->multi, s, w);
    if (ours && !H->socket_watch[s]) H->socket_watch[s] = w;
  }
  w->idle = w->kept = 0;
  if (w->armed && w->flags == flags) return 0;
  if (w->armed) event_del(&w->ev);
  w->armed = 0;
  if (event_assign(&w->ev, H->R->base, s, flags, socket_event_cb, w) != 0) return -1;
  w->flags = flags;
  w->armed = event_add(&w->ev, NULL) == 0;
  return 0;
}

static void curl_timer_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  curl_driver *d = arg;
  int running;
  curl_multi_socket_action(d->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  after_action(d);
  if (d->H->parked) http_flush(d->H);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
  (void)multi;
  curl_driver *d = userp;
  if (timeout_ms < 0) {
    evtimer_del(d->timer_ev);
    return 0;
  }
  struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  evtimer_add(d->timer_ev, &tv);
  return 0;
}

static void driver_free(curl_driver *d) {
  if (d->multi) curl_multi_cleanup(d->multi); /* closes its cached connections: H still counts them */
  if (d->timer_ev) event_free(d->timer_ev);
  if (d->kick_ev) event_free(d->kick_ev);
  d->multi = NULL;
  d->timer_ev = NULL;
  d->kick_ev = NULL;
}

/* libcurl's default cache limit is 4 x the transfers attached right now;
 * ours are detached as they finish and re-attached when their tasks run,
 * so a burst of completions would shrink the cache and close connections
 * that the next requests need. A fixed size keeps them. */
static int driver_init(http_state *H, curl_driver *d, int mux) {
  d->H = H;
  d->multi = curl_multi_init();
  d->timer_ev = evtimer_new(H->R->base, curl_timer_cb, d);
  d->kick_ev = event_new(H->R->base, -1, 0, kick_cb, d);
  if (!d->multi || !d->timer_ev || !d->kick_ev) return -1;
  curl_multi_setopt(d->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(d->multi, CURLMOPT_SOCKETDATA, d);
  curl_multi_setopt(d->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  curl_multi_setopt(d->multi, CURLMOPT_TIMERDATA, d);
  curl_multi_setopt(d->multi, CURLMOPT_MAXCONNECTS, (long)ONE_SHOT_CONNECTIONS_ABOVE);
  if (mux) {
    /* h2: transfers to one origin share its connections, up to this many
     * streams each, and at most this many connections: past them transfers
     * wait in curl for a free stream rather than open a connection each.
     * Transfers started together wait for the first connection's ALPN
     * answer (CURLOPT_PIPEWAIT) to share it. */
    curl_multi_setopt(d->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
    curl_multi_setopt(d->multi, CURLMOPT_MAX_CONCURRENT_STREAMS, H2_STREAMS_PER_CONNECTION);
    curl_multi_setopt(d->multi, CURLMOPT_MAX_HOST_CONNECTIONS, H2_CONNECTIONS_PER_ORIGIN);
  } else {
    curl_multi_setopt(d->multi, CURLMOPT_PIPELINING, CURLPIPE_NOTHING);
  }
  return 0;
}

static http_state *http_get(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  if (R->http) return R->http;
  static int global_init_done; /* curl_global_init is process-wide by design */
  if (!global_init_done) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) luaL_error(L, "curl_global_init failed");
    global_init_done = 1;
  }
  http_state *H = calloc(1, sizeof *H);
  if (!H) {
    luaL_error(L, "not enough memory");
    return NULL;
  }
  H->R = R;
  H->upload_buffers_kept = curl_version_info(CURLVERSION_NOW)->version_num < 0x080700;
  H->h2_holds_data = curl_version_info(CURLVERSION_NOW)->version_num < 0x080100;
  H->h2_loses_headers = H->h2_holds_data;
  H->acting_fd = CURL_SOCKET_BAD;
  if (driver_init(H, &H->drivers[DRIVER_PLAIN], 0) != 0 || driver_init(H, &H->drivers[DRIVER_MUX], 1) != 0) {
    for (int i = 0; i < NDRIVERS; i++) driver_free(&H->drivers[i]);
    free(H);
    luaL_error(L, "cannot start the HTTP client");
    return NULL;
  }
  /* TLS sessions shared by all handles: a new connection to a known server
   * resumes (one round trip and no certificate check). Single-threaded: no
   * locks. */
  H->share = curl_share_init();
  if (H->share) curl_share_setopt(H->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
  if (loop_on_turn_end(R, http_flush, H) != 0) {
    for (int i = 0; i < NDRIVERS; i++) driver_free(&H->drivers[i]);
    if (H->share) curl_share_cleanup(H->share);
    free(H);
    luaL_error(L, "cannot start the HTTP client: no room for its turn-end hook");
    return NULL;
  }
  R->http = H;
  return H;
}

static void req_destroy(http_req *r);

/* A redirect's headers (redirect_headers) freed, the handle told first: a
 * later list at the same address must not pass for what it has */
static void hop_headers_free(http_req *r) {
  if (!r->hop_headers) return;
  if (r->set.headers == r->hop_headers) {
    r->set.headers = NULL;
    if (r->easy) curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, NULL);
  }
  curl_slist_free_all(r->hop_headers);
  r->hop_headers = NULL;
}

/* Start now the transfers that tasks added in this loop turn, all in one
 * call, rather than on curl's 0 ms timer in the next turn: the requests of
 * one turn leave together and the upstream wakes once for them (+5 % in
 * bench/throughput.lua over starting each at once). */
static void http_flush(void *arg) {
  http_state *H = arg;
  if (H->parked) admit_parked(H);
  for (int i = 0; i < NDRIVERS; i++) {
    curl_driver *d = &H->drivers[i];
    if (!d->added) continue;
    d->added = 0;
    int running;
    curl_multi_socket_action(d->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    after_action(d);
  }
}

void http_free(resil_t *R) {
  http_state *H = R->http;
  if (!H) return;
  while (H->live) { /* requests of tasks that never finished */
    http_req *r = H->live;
    H->live = r->next;
    request_detach(r);
    header_set_release(H, r->req_headers);
    url_set_release(H, r->req_url);
    req_destroy(r);
  }
  while (H->free_reqs) {
    http_req *r = H->free_reqs;
    H->free_reqs = r->next;
    req_destroy(r);
  }
  if (H->last_headers && H->last_headers->refs == 0) {
    curl_slist_free_all(H->last_headers->list);
    free(H->last_headers->text);
    free(H->last_headers);
  }
  if (H->last_url && H->last_url->refs <= 0) url_set_free(H->last_url);
  free(H->scratch.data);
  free(H->reply_head.data);
  free(H->reply_body.data);
  for (int i = 0; i < NDRIVERS; i++) driver_free(&H->drivers[i]);
  for (int s = 0; s < H->socket_cap; s++) /* (closed by curl_multi_cleanup, through close_socket_cb) */
    if (H->socket_watch[s]) watch_free(H->socket_watch[s]);
  if (H->share) curl_share_cleanup(H->share);
  for (int i = 0; i < H->norigins; i++) free(H->origins[i].name);
  free(H->origins);
  free(H->socket_origin);
  free(H->socket_watch);
  free(H);
  R->http = NULL;
}

/* ---------- curl callbacks for one transfer ---------- */

/* Body bytes (decoded) into the body buffer, within max_body. */
static int body_take(http_req *r, const char *data, size_t len) {
  r->total_received += len;
  if (r->total_received > r->max_body) {
    r->aborted = ABORT_TOO_LARGE;
    return -1; /* curl stops the transfer: nothing is buffered past the limit */
  }
  return buffer_append(&r->body, data, len);
}

static const char *content_encoding(const http_req *r, size_t *n);
static int deflate_encoded(const http_req *r) {
  size_t n = 0;
  const char *v = content_encoding(r, &n);
  return v && n == 7 && strncasecmp(v, "deflate", 7) == 0;
}

/* A gzip (or deflate) body, decoded here rather than by libcurl, which
 * never checks that the stream reached its end (7.88): a body cut before its
 * trailer passed for a whole answer. Members that follow one another are
 * read as one body; bytes after a deflate stream's end are ignored, as
 * curl did. -1: stop the transfer (decode_failed or too large). */
static int gunzip(http_req *r, const char *data, size_t len) {
  z_stream *z = r->gz;
  unsigned char out[16384];
  int first = z->total_in == 0 && z->total_out == 0 && !r->gz_raw; /* the body's first bytes */
  z->next_in = (Bytef *)data;
  z->avail_in = (uInt)len;
  for (;;) {
    if (z->avail_in > 0 && !r->gz_open && z->total_in > 0) { /* a member ended and more follows */
      if (*z->next_in != 0x1f) return 0;
      if (inflateReset(z) != Z_OK) break;
    }
    z->next_out = out;
    z->avail_out = sizeof out;
    const Bytef *before = z->next_in;
    int rc = inflate(z, Z_NO_FLUSH);
    if (z->next_in != before) r->gz_open = 1;
    size_t got = sizeof out - z->avail_out;
    if (got && body_take(r, (const char *)out, got) != 0) return -1;
    if (rc == Z_STREAM_END) {
      r->gz_open = 0;
      if (z->avail_in == 0) return 0;
    } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
      /* a "deflate" body without zlib's header (servers send one so; libcurl read it) */
      if (rc == Z_DATA_ERROR && first && z->total_out == 0 && deflate_encoded(r) && inflateReset2(z, -15) == Z_OK) {
        r->gz_raw = 1;
        first = 0;
        z->next_in = (Bytef *)data;
        z->avail_in = (uInt)len;
        continue;
      }
      break;
    } else if (z->avail_out != 0) {
      return 0; /* all of the input taken and all it gives given out */
    }
  }
  r->decode_failed = CURLE_BAD_CONTENT_ENCODING;
  return -1;
}

/* One "Name: value" line of raw header lines (not the status line, nor a
 * line without a name): the name as sent and the value without the blanks
 * around it. */
typedef struct {
  const char *name, *value;
  size_t nlen, vlen;
} header_line;

/* The next header line from *p (before end) into h, *p moved past it; 0 at the end */
static int next_header_line(const char **p, const char *end, header_line *h) {
  while (*p && *p < end) {
    const char *line = *p;
    const char *eol = memchr(line, '\n', (size_t)(end - line));
    if (!eol) eol = end;
    *p = eol < end ? eol + 1 : end;
    const char *colon = memchr(line, ':', (size_t)(eol - line));
    if (!colon || colon == line) continue;
    const char *v = colon + 1, *vend = eol;
    while (v < vend && (*v == ' ' || *v == '\t')) v++;
    while (vend > v && (vend[-1] == '\r' || vend[-1] == ' ' || vend[-1] == '\t')) vend--;
    h->name = line;
    h->nlen = (size_t)(colon - line);
    h->value = v;
    h->vlen = (size_t)(vend - v);
    return 1;
  }
  return 0;
}

/* a header line's name is `lower` (lower-cased, as res.headers spells it) */
static int header_named(const header_line *h, const char *lower, size_t len) {
  if (h->nlen != len) return 0;
  for (size_t i = 0; i < len; i++) {
    char c = h->name[i];
    if ((c >= 'A' && c <= 'Z' ? c + 32 : c) != lower[i]) return 0;
  }
  return 1;
}

/* The final response's Content-Encoding (its last line): NULL for none */
static const char *content_encoding(const http_req *r, size_t *n) {
  const char *p = r->head.data, *v = NULL;
  header_line h;
  while (next_header_line(&p, r->head.data + r->head.len, &h))
    if (header_named(&h, "content-encoding", 16)) v = h.value, *n = h.vlen;
  return v;
}

/* The final response's Content-Length lines disagree ("5" and "7", or "5, 7" in one line):
 * RFC 9110 makes that an error, since the body's end cannot be known; libcurl 7.88 takes the
 * last one, and what followed the shorter body would be read as the next answer */
static int length_conflict(const http_req *r) {
  const char *p = r->head.data;
  header_line h;
  long long seen = -1;
  while (next_header_line(&p, r->head.data + r->head.len, &h)) {
    if (!header_named(&h, "content-length", 14)) continue;
    const char *v = h.value, *e = h.value + h.vlen;
    while (v < e) { /* each value of a comma-separated list */
      while (v < e && (*v == ' ' || *v == '\t' || *v == ',')) v++;
      if (v >= e) break;
      long long n = 0;
      int digits = 0;
      while (v < e && *v >= '0' && *v <= '9' && digits < 19) n = n * 10 + (*v++ - '0'), digits++;
      if (!digits) break; /* (not a number: curl's own check says so) */
      if (seen >= 0 && n != seen) return 1;
      seen = n;
      while (v < e && *v != ',') v++;
    }
  }
  return 0;
}

/* A decoder for the final response's gzip (x-gzip) or deflate body; an
 * encoding we cannot decode (we ask for gzip only) fails the transfer at
 * its first body byte. 0: none needed. */
static int content_decoder(http_req *r) {
  size_t n = 0;
  const char *v = content_encoding(r, &n);
  if (!v || n == 0 || (n == 8 && strncasecmp(v, "identity", 8) == 0)) return 0;
  if (!((n == 4 && strncasecmp(v, "gzip", 4) == 0) || (n == 6 && strncasecmp(v, "x-gzip", 6) == 0) ||
        (n == 7 && strncasecmp(v, "deflate", 7) == 0))) {
    r->decode_failed = CURLE_BAD_CONTENT_ENCODING;
    return 1;
  }
  z_stream *z = calloc(1, sizeof *z);
  if (!z || inflateInit2(z, 15 + 32) != Z_OK) { /* (gzip or zlib, by its header) */
    free(z);
    r->decode_failed = CURLE_OUT_OF_MEMORY;
    return 1;
  }
  r->gz = z;
  return 1;
}

static void gunzip_free(http_req *r) {
  if (!r->gz) return;
  inflateEnd(r->gz);
  free(r->gz);
  r->gz = NULL;
}

static size_t write_cb(char *data, size_t size, size_t n, void *userp) {
  http_req *r = userp;
  size_t len = size * n;
  /* The reader is behind: let TCP push back. Not on h2, where libcurl 7.88
   * stops reading the whole connection for a paused stream and its
   * neighbours stall: there the buffer may grow to max_body. */
  if (r->stream && r->body.len >= STREAM_HIGH_WATER && r->http_version != CURL_HTTP_VERSION_2_0) {
    r->paused = 1;
    /* the upstream is not idle, our reader is slow: no idle clock while
     * paused (the stream's read that resumes it starts it again) */
    timer_stop(&r->idle);
    return CURL_WRITEFUNC_PAUSE;
  }
  if (r->decode_failed) return 0;
  if (r->gz ? gunzip(r, data, len) : body_take(r, data, len)) return 0;
  note_fed(r, len, 0);
  r->h2_raw += len;
  if (held_count) held_note_write(r, len);
  if (r->idle_timeout > 0) timer_start(&r->idle, r->idle_timeout);
  if (r->stream && r->waiter) {
    task *t = r->waiter;
    r->waiter = NULL;
    task_wake(t);
  }
  return len;
}

/* A 3xx that curl follows (follow_redirects, a Location given; libcurl 7.88
 * follows any number of them, never a 304) is no more the answer than a 1xx:
 * its status and headers are not the response's, whose body is the next one's */
static int redirect_followed(const http_req *r, long code) {
  if (!r->set.follow || code < 300 || code > 399 || code == 304) return 0;
  const char *p = r->head.data, *end = p + r->head.len;
  while (p && p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) eol = end;
    if (eol - p > 9 && strncasecmp(p, "location:", 9) == 0) {
      const char *v = p + 9;
      while (v < eol && (*v == ' ' || *v == '\t' || *v == '\r')) v++;
      if (v < eol) return 1;
    }
    p = eol + 1;
  }
  return 0;
}

static size_t header_cb(char *data, size_t size, size_t n, void *userp) {
  http_req *r = userp;
  size_t len = size * n;
  int blank = len <= 2 && (data[0] == '\r' || data[0] == '\n');
  if (r->headers_done && !blank) { /* a trailer line: counted, then kept as the others */
    r->trailer_bytes += len;
    if (r->trailer_bytes > MAX_TRAILER_BYTES) {
      r->trailers_too_large = 1;
      return 0;
    }
  } else if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
    r->head.len = 0; /* a new response (after 100-continue or a redirect) */
    r->h2_raw = 0;
  } else if (blank) {
    long code = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &code);
    if (code > 999) { /* (no valid status: the transfer ends, request_finish says so) */
      r->status_invalid = 1;
      return 0;
    }
    if (code >= 200 && !redirect_followed(r, code)) {
      if (!r->headers_done && length_conflict(r)) {
        r->length_conflict = 1;
        return 0;
      }
      if (!r->headers_done && content_decoder(r) && r->decode_failed == CURLE_OUT_OF_MEMORY) return 0;
      note_fed(r, len, 0);
      r->status = code;
      r->headers_done = 1;
      note_http_version(r);
      if (r->http_version == CURL_HTTP_VERSION_1_1 || r->http_version == CURL_HTTP_VERSION_1_0)
        r->http1_fd = r->H->acting_fd; /* (its socket: shut_if_stray) */
      if (r->grace_cut) { /* the status came within a cancel's grace: the transfer's own timeout again (a
                           * read its task makes under resil.shield was cut at the grace, as canceled) */
        r->grace_cut = 0;
        double left = r->started + r->timeout - resil_now(r->H->R);
        timer_start(&r->deadline, left > 0 ? left : 0);
      }
      if (r->stream && r->waiter) {
        task *t = r->waiter;
        r->waiter = NULL;
        task_wake(t);
      }
    }
    return len;
  }
  if (buffer_append(&r->head, data, len) != 0) return 0;
  note_fed(r, len, 1);
  if (r->idle_timeout > 0) timer_start(&r->idle, r->idle_timeout);
  return len;
}

static void deadline_cb(void *arg) {
  http_req *r = arg;
  if (r->grace_cut) { /* a cancel's wait for the status (request_bound): it ends as the cancel */
    r->aborted = ABORT_CANCELED;
    request_finish(r, CURLE_ABORTED_BY_CALLBACK, ABORT_CANCELED);
    return;
  }
  r->aborted = ABORT_TIMEOUT;
  request_finish(r, CURLE_OPERATION_TIMEDOUT, ABORT_TIMEOUT);
}

/* (sends: curl reached this request's prereq_cb; before it, a reused handle's counters are its
 * last request's) */
int request_sent(http_req *r) {
  if (!r->active || !r->easy || r->sends == 0) return 0;
  long head = 0;
  curl_off_t body = 0;
  if (curl_easy_getinfo(r->easy, CURLINFO_REQUEST_SIZE, &head) != CURLE_OK || head <= 0) return 0;
  if (r->set.body_len <= 0) return 1;
  return curl_easy_getinfo(r->easy, CURLINFO_SIZE_UPLOAD_T, &body) == CURLE_OK && body >= r->set.body_len;
}

int request_host_stopping(const http_req *r) { return r->H->R->stop_requested != 0; }

void request_bound(http_req *r, double seconds) {
  if (r->done || r->grace_cut) return;
  double left = r->started + r->timeout - resil_now(r->H->R);
  r->grace_cut = 1;
  timer_start(&r->deadline, left < seconds ? (left > 0 ? left : 0) : seconds);
}

static void idle_cb(void *arg) {
  http_req *r = arg;
  /* a request still sending its body (a large prompt up a slow link) that the server takes as it
   * comes is not idle: bytes go, not come. Asked here, when the timer runs out, not on each send
   * (what the kernel's buffers hold once curl handed the last byte is the server's to take within
   * idle_timeout) */
  curl_off_t sent = 0;
  if (r->easy && r->req_body && !r->headers_done && curl_easy_getinfo(r->easy, CURLINFO_SIZE_UPLOAD_T, &sent) == CURLE_OK &&
      (long long)sent != r->idle_sent) {
    r->idle_sent = (long long)sent;
    timer_start(&r->idle, r->idle_timeout);
    return;
  }
  r->aborted = ABORT_IDLE;
  request_finish(r, CURLE_OPERATION_TIMEDOUT, ABORT_IDLE);
}

/* ---------- the request pool ---------- */

/* What H knows of socket s (its watch, its origin's count of connections)
 * dropped: it is closed, or about to be. behind: closed without our
 * callback, where a watch curl did not say CURL_POLL_REMOVE for may still be
 * curl's (curl_multi_assign): it stays. */
static void forget_socket(http_state *H, curl_socket_t s, int behind) {
  if (s >= 0 && s < H->socket_cap && H->socket_watch[s] && (!behind || H->socket_watch[s]->idle)) {
    /* (curl told CURL_POLL_REMOVE before) */
    watch_free(H->socket_watch[s]);
    H->socket_watch[s] = NULL;
  }
  if (s >= 0 && s < H->socket_cap && H->socket_origin[s]) {
    origin *o = &H->origins[H->socket_origin[s] / 2 - 1];
    o->connections--;
    o->mux_connections -= H->socket_origin[s] & 1;
    H->socket_origin[s] = 0;
  }
}

/* libcurl 7.88 closes the socket of a connect that timed out without its
 * close callback: the origin kept counting a connection that was gone (its
 * h2 admission counted it as one to open streams on, and the origin was
 * never idle, never forgotten) and the socket's watch stayed with libevent
 * for whatever next got that descriptor ("Epoll ADD ... failed"). A
 * transfer's sockets are looked at as it leaves curl; one closed behind our
 * back is forgotten then (or when curl opens a socket of that number). */
static void forget_closed_sockets(http_req *r) {
  http_state *H = r->H;
  for (int i = 0; i < r->nopened && i < 2; i++) {
    curl_socket_t s = r->opened[i];
    if (s < 0 || s >= H->socket_cap || (!H->socket_origin[s] && !H->socket_watch[s])) continue;
    if (fcntl(s, F_GETFD) == -1 && errno == EBADF) forget_socket(H, s, 1);
  }
}

/* Connections counted per origin, for resil.http.stats(): every socket curl
 * opens is an origin's until curl closes it (the close callback is the
 * connection's, given H, so it runs whichever handle closes it). */
static curl_socket_t open_socket_cb(void *clientp, curlsocktype purpose, struct curl_sockaddr *a) {
  (void)purpose;
  http_req *r = clientp;
  http_state *H = r->H;
  /* close-on-exec: a program the script or the embedder starts held the
   * provider's connection open (the peer saw no FIN until that child ended) */
  curl_socket_t s = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
  if (s == CURL_SOCKET_BAD || s < 0) return CURL_SOCKET_BAD;
  forget_socket(H, s, 1); /* the kernel gave s again: what we knew of it was of a socket closed behind our back */
  r->opened[r->nopened++ % 2] = s;
  char *url = NULL; /* a redirect's target, or the request's url */
  curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &url);
  int i = origin_index(H, url ? url : r->url);
  if (i < 0) return s;
  if (s >= H->socket_cap) {
    int cap = H->socket_cap ? H->socket_cap : 256;
    while (cap <= s) cap *= 2;
    int *grown = realloc(H->socket_origin, (size_t)cap * sizeof *grown);
    if (!grown) return s;
    memset(grown + H->socket_cap, 0, (size_t)(cap - H->socket_cap) * sizeof *grown);
    H->socket_origin = grown;
    socket_watch **watches = realloc(H->socket_watch, (size_t)cap * sizeof *watches);
    if (!watches) return s; /* (socket_origin grown, socket_cap not yet: the next one tries again) */
    memset(watches + H->socket_cap, 0, (size_t)(cap - H->socket_cap) * sizeof *watches);
    H->socket_watch = watches;
    H->socket_cap = cap;
  }
  int mux = r->driver == &H->drivers[DRIVER_MUX];
  H->socket_origin[s] = 2 * (i + 1) + mux;
  if (r->opener == OPENER_ADMITTED) {
    r->opener = OPENER_SOCKET;
    H->origins[r->origin].opener_sockets++;
  }
  H->origins[i].connections++;
  H->origins[i].mux_connections += mux;
  return s;
}

static int close_socket_cb(void *clientp, curl_socket_t s) {
  forget_socket(clientp, s, 0);
  return close(s);
}

/* libcurl reads the proxy variables (http_proxy, no_proxy, ...) from the
 * environment at every transfer, some 1,600 instructions a request. When
 * none is set as the process starts (the environment of a process does not
 * change under it), the empty proxy (and exceptions) say so once: the same
 * transfers. */
static int proxy_env_set(void) {
  static int set = -1;
  static const char *const names[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                                      "ALL_PROXY"};
  if (set < 0) {
    set = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
      if (getenv(names[i]) && *getenv(names[i])) set = 1;
  }
  return set;
}

/* What every transfer sets alike: on a new easy handle, and again after a
 * reset (a request with TLS options of its own). */
static void easy_defaults(http_req *r) {
  CURL *e = r->easy;
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
  curl_easy_setopt(e, CURLOPT_PRIVATE, r);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
  curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "gzip");
  curl_easy_setopt(e, CURLOPT_HTTP_CONTENT_DECODING, 0L); /* we decode (gunzip) */
  curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(e, CURLOPT_BUFFERSIZE, CURL_BUFFER_OPTION(RECEIVE_BUFFER_SIZE));
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  /* follow_redirects: libcurl 7.88 follows any number (8.3 and later, 30); a
   * loop went on for some 2,300 requests, a POST's body sent with each 307 */
  curl_easy_setopt(e, CURLOPT_MAXREDIRS, 30L);
  /* h2 transfers started together wait for the first connection's ALPN
   * answer and share it, instead of each opening its own */
  curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  if (r->H->share) curl_easy_setopt(e, CURLOPT_SHARE, r->H->share);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
  curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, r);
  curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
  curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, r->H);
  curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, prereq_cb);
  curl_easy_setopt(e, CURLOPT_PREREQDATA, r);
  if (!proxy_env_set()) {
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_NOPROXY, "");
  }
  free(r->set.url);
  free(r->set.ca_file);
  memset(&r->set, 0, sizeof r->set); /* libcurl's defaults */
  r->set.recv_buffer = RECEIVE_BUFFER_SIZE;
  r->set.body_len = -1;
  r->set.http_version = CURL_HTTP_VERSION_2TLS;
}

static CURL *new_easy(http_req *r) {
  if (!(r->easy = curl_easy_init())) return NULL;
  easy_defaults(r);
  return r->easy;
}

static void req_destroy(http_req *r) {
  if (r->easy) curl_easy_cleanup(r->easy);
  r->easy = NULL;
  hop_headers_free(r);
  sse_free(r->sse);
  free(r->set.url);
  free(r->set.ca_file);
  timer_free(&r->deadline);
  timer_free(&r->idle);
  gunzip_free(r);
  buffer_free(&r->body);
  buffer_free(&r->head);
  free(r);
}

/* A request from the pool (or a new one), on the live list, cleared. */
static http_req *req_take(lua_State *L, http_state *H) {
  http_req *r = H->free_reqs;
  if (r) {
    H->free_reqs = r->next;
    H->nfree--;
  } else {
    r = calloc(1, sizeof *r);
    if (!r) luaL_error(L, "not enough memory");
    r->H = H;
    timer_init(H->R, &r->deadline, deadline_cb, r);
    timer_init(H->R, &r->idle, idle_cb, r);
  }
  if (!r->easy && !(r->easy = new_easy(r))) {
    req_destroy(r);
    luaL_error(L, "cannot create an HTTP transfer");
  }
  memset(&r->waiter, 0, sizeof *r - offsetof(http_req, waiter));
  r->conn_fd = r->http1_fd = CURL_SOCKET_BAD;
  r->body.len = r->head.len = 0;
  r->errbuf[0] = '\0';
  r->prev = NULL;
  r->next = H->live;
  if (H->live) H->live->prev = r;
  H->live = r;
  return r;
}

/* libcurl before 8.1.0 keeps a pointer to the last response header of a
 * handle's previous transfer (curl/curl#11103): a response whose first
 * header line is folded is unfolded into that freed header. Found by
 * fuzz/http_fuzz.c. There a handle serves one transfer (connections are
 * still reused: they belong to the multi handle). */
static int handles_reusable(void) {
  static int reusable = -1;
  if (reusable < 0) reusable = curl_version_info(CURLVERSION_NOW)->version_num >= 0x080100;
  return reusable;
}

static int h2c_reuse_broken(void) {
  static int broken = -1;
  if (broken < 0) broken = curl_version_info(CURLVERSION_NOW)->version_num < 0x080000;
  return broken;
}

/* Back to the pool: the transfer aborted if still running. */
void req_release(http_req *r) {
  http_state *H = r->H;
  r->waiter = NULL;
  if (r->progress_ref > 0) luaL_unref(H->R->L, LUA_REGISTRYINDEX, r->progress_ref);
  r->progress_ref = 0;
  request_detach(r);
  H->origins[r->origin].users--;
  header_set_release(H, r->req_headers);
  r->req_headers = NULL;
  hop_headers_free(r);
  url_set_release(H, r->req_url);
  r->req_url = NULL;
  sse_free(r->sse);
  r->sse = NULL;
  if (r->prev) r->prev->next = r->next;
  else H->live = r->next;
  if (r->next) r->next->prev = r->prev;
  gunzip_free(r);
  if (H->nfree >= REQ_POOL_MAX) {
    req_destroy(r);
    return;
  }
  if (!handles_reusable() && r->easy) {
    curl_easy_cleanup(r->easy);
    r->easy = NULL; /* req_take makes a new one */
  }
  if (r->body.cap > KEEP_BUFFER_MAX) buffer_free(&r->body);
  if (r->head.cap > KEEP_BUFFER_MAX) buffer_free(&r->head);
  r->next = H->free_reqs;
  H->free_reqs = r;
  H->nfree++;
}

/* L stack: the progress table, its status (or nil), the body bytes read.
 * Raw sets: a table's metamethods do not run in a cancel. */
static int tell_progress_protected(lua_State *L) {
  if (!lua_isnil(L, 2)) {
    lua_pushliteral(L, "status");
    lua_pushvalue(L, 2);
    lua_rawset(L, 1);
  }
  lua_pushliteral(L, "received");
  lua_pushvalue(L, 3);
  lua_rawset(L, 1);
  return 0;
}

/* A canceled request's `progress` table is told how far it got: its
 * status, once a response's headers were read, and the body bytes read.
 * A 2xx canceled while its body was read was answered, and is billed: the
 * caller's cleanup counts it (a cancel never returns to the caller).
 * Protected on the main state: a cancel comes from C paths that cannot
 * raise (a timer, another task's t:cancel()); without memory the table
 * stays as it was. */
static void tell_progress(http_req *r) {
  lua_State *L = r->H->R->L;
  if (!lua_checkstack(L, 4)) return;
  lua_pushcfunction(L, tell_progress_protected);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->progress_ref);
  if (r->headers_done) lua_pushinteger(L, r->status);
  else lua_pushnil(L);
  lua_pushinteger(L, (lua_Integer)r->body.len);
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) lua_pop(L, 1);
}

/* A request's task was canceled: abort the transfer now and give
 * the request back (the continuation will never run). */
static void request_cancel(void *arg) {
  http_req *r = arg;
  if (r->progress_ref > 0) tell_progress(r);
  r->waiter = NULL;
  r->aborted = ABORT_CANCELED;
  request_finish(r, CURLE_ABORTED_BY_CALLBACK, ABORT_CANCELED);
  req_release(r);
}

/* The task was canceled after its transfer finished, before it resumed. */
static void request_give_back(void *arg) {
  http_req *r = arg;
  if (r->progress_ref > 0) tell_progress(r);
  req_release(r);
}

/* ---------- results ---------- */

/* curl 7.88 reports response headers past its limits as out of memory (one
 * line past 100 KB) or as a receive error (all of them past 300 KB): both
 * are too_large. */
static const char *error_kind(CURLcode rc, const char *detail) {
  if (rc == CURLE_RECV_ERROR && strncmp(detail, "Too large response headers", 26) == 0) return "too_large";
  switch (rc) {
  case CURLE_OUT_OF_MEMORY: return "too_large";
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_RESOLVE_PROXY: return "dns";
  case CURLE_COULDNT_CONNECT: return "connect";
  case CURLE_OPERATION_TIMEDOUT: return "timeout";
  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ENGINE_NOTFOUND:
  case CURLE_SSL_ENGINE_SETFAILED:
  case CURLE_SSL_ENGINE_INITFAILED:
  case CURLE_USE_SSL_FAILED: return "tls";
  case CURLE_SEND_ERROR:
  case CURLE_RECV_ERROR:
  case CURLE_GOT_NOTHING:
  case CURLE_PARTIAL_FILE:
  case CURLE_HTTP2:        /* the connection's h2 session failed (GOAWAY with an error, ...) */
  case CURLE_HTTP2_STREAM: /* this stream reset by the server */
    return "reset";
  case CURLE_FILESIZE_EXCEEDED: return "too_large";
  case CURLE_ABORTED_BY_CALLBACK: return "canceled";
  default: return "protocol";
  }
}

static void outcome_of(const http_req *r, outcome *o) {
  o->url = r->url;
  o->status = r->status;
  o->http_version = r->http_version;
  o->elapsed = r->done ? r->elapsed : resil_now(r->H->R) - r->started;
  o->timeout = r->timeout;
  o->idle_timeout = r->idle_timeout;
  o->max_body = r->max_body;
  o->max_event = r->max_event;
  o->result = r->result;
  o->aborted = r->aborted;
  o->detail = r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->result);
  o->client_fault = r->client_fault;
  o->unsent = r->sends == 0;
  o->received = -1;
}

static int failed(const outcome *o) { return o->aborted != ABORT_NONE || o->result != CURLE_OK; }

static int push_failure(lua_State *L, const outcome *o) {
  switch (o->aborted) {
  case ABORT_TIMEOUT:
    return resil_error_result(L, "timeout", "%s: no complete response within %.3g s", o->url, o->timeout);
  case ABORT_IDLE:
    return resil_error_result(L, "timeout", "%s: no data for %g s (idle_timeout)", o->url, o->idle_timeout);
  case ABORT_TOO_LARGE:
    return resil_error_result(L, "too_large", "%s: response body larger than max_body (%zu bytes)", o->url,
                              o->max_body);
  case ABORT_EVENT_TOO_LARGE:
    return resil_error_result(L, "too_large", "%s: a server-sent event larger than max_event (%zu bytes)", o->url,
                              o->max_event);
  case ABORT_CANCELED: return resil_error_result(L, "canceled", "%s: request canceled", o->url);
  case ABORT_NONE:
    /* (curl refuses a Content-Length past CURLOPT_MAXFILESIZE before the body: "Maximum file size
     * exceeded", where a body found larger as it came said max_body) */
    if (o->result == CURLE_FILESIZE_EXCEEDED)
      return resil_error_result(L, "too_large", "%s: response body larger than max_body (%zu bytes), as its "
                                "Content-Length says", o->url, o->max_body);
    break;
  }
  const char *kind = error_kind(o->result, o->detail);
  /* curl's own timeout is connect_timeout's (the whole request's is our timer): a connection that
   * never came, the request not sent, as a refused one is "connect" (or a name not resolved in
   * time, "dns"), not a timeout that may have reached the server */
  if (o->result == CURLE_OPERATION_TIMEDOUT && o->unsent)
    kind = strncmp(o->detail, "Resolving", 9) == 0 ? "dns" : "connect";
  int n = resil_error_result(L, kind, "%s: %s", o->url, o->detail);
  if (o->client_fault) { /* libcurl's, not the server's: not counted against it (classify) */
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "client_fault");
  }
  return n;
}

/* A 2xx whose body did not arrive whole (cut, timed out, past max_body):
 * the provider answered, and bills for it. The error says so (status,
 * received: body bytes read) so that the caller can count the charge. */
static int push_failure_after_answer(lua_State *L, const outcome *o) {
  int n = push_failure(L, o);
  if (o->received >= 0 && o->status >= 200 && o->status < 300 && o->aborted != ABORT_CANCELED) {
    lua_pushinteger(L, o->status);
    lua_setfield(L, -2, "status");
    lua_pushinteger(L, o->received);
    lua_setfield(L, -2, "received");
  }
  return n;
}

/* The values of a repeated header (the strings of the list at the top of the stack, each not
 * empty) joined as HTTP allows, ", " between: one buffer. (Joined a line at a time, a header
 * repeated 35,000 times within libcurl's 300 KiB made 35,000 strings of up to 100 KB: 0.4 s of
 * the loop's for one response of a hostile server, and res.headers of each stream reads them.) */
static void push_joined(lua_State *L) {
  int list = lua_gettop(L);
  lua_Integer n = (lua_Integer)lua_rawlen(L, list);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (lua_Integer i = 1; i <= n; i++) {
    if (i > 1) luaL_addlstring(&b, ", ", 2);
    lua_rawgeti(L, list, i);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
}

/* Raw header lines -> { ["lower-cased-name"] = "value", ... }; a repeated
 * header's values are joined, as HTTP allows; an empty value adds no element
 * to the list (not "a, " nor ", "). */
void push_header_table(lua_State *L, const char *p, size_t len) {
  const char *end = p ? p + len : NULL;
  int lines = 0;
  for (const char *c = p; c && c < end; c++) lines += *c == '\n';
  luaL_checkstack(L, 8, NULL);
  lua_createtable(L, 0, lines); /* sized once: no rehash per header */
  int t = lua_gettop(L), lists = 0; /* lists: { name = {value, ...} } of the repeated ones, made once one is */
  header_line h;
  while (next_header_line(&p, end, &h)) {
    char small[128];
    char *name = h.nlen <= sizeof small ? small : lua_newuserdatauv(L, h.nlen, 0);
    for (size_t i = 0; i < h.nlen; i++) name[i] = (char)(h.name[i] >= 'A' && h.name[i] <= 'Z' ? h.name[i] + 32 : h.name[i]);
    lua_pushlstring(L, name, h.nlen);
    if (name != small) lua_remove(L, -2);
    lua_pushvalue(L, -1);
    lua_rawget(L, t); /* name, the value so far */
    if (lua_isnil(L, -1) || (lua_rawlen(L, -1) == 0 && h.vlen > 0)) { /* the first, or one after empty ones */
      lua_pop(L, 1);
      lua_pushlstring(L, h.value, h.vlen);
      lua_rawset(L, t);
      continue;
    }
    if (h.vlen == 0) { /* empty: the value so far stands */
      lua_pop(L, 2);
      continue;
    }
    if (!lists) {
      lua_newtable(L);
      lua_insert(L, -3);
      lists = t + 1;
    }
    lua_pushvalue(L, -2);
    lua_rawget(L, lists); /* name, value so far, its list or nil */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_createtable(L, 4, 0);
      lua_pushvalue(L, -2);
      lua_rawseti(L, -2, 1);
      lua_pushvalue(L, -3);
      lua_pushvalue(L, -2);
      lua_rawset(L, lists);
    }
    lua_Integer next = (lua_Integer)lua_rawlen(L, -1) + 1;
    lua_pushlstring(L, h.value, h.vlen);
    lua_rawseti(L, -2, next);
    lua_pop(L, 3);
  }
  if (lists) {
    lua_pushnil(L);
    while (lua_next(L, lists)) { /* name, list */
      push_joined(L);
      lua_pushvalue(L, -3);
      lua_pushvalue(L, -2);
      lua_rawset(L, t);
      lua_pop(L, 2);
    }
    lua_remove(L, lists);
  }
}

/* The headers names[0..n-1] (lower-case) of raw header lines, as
 * res.headers[name] would give them, read in one pass without building the
 * table: each one present is pushed (in the order of names) and values[i]
 * points to it (anchored there); values[i] is NULL for one absent. Returns
 * the number pushed. */
int push_raw_headers(lua_State *L, const char *raw, size_t len, const char *const *names, int n,
                     const char **values) {
  enum { MAX_NAMES = 8 };
  size_t lens[MAX_NAMES];
  header_line first[MAX_NAMES];
  int seen[MAX_NAMES];
  if (n > MAX_NAMES) luaL_error(L, "push_raw_headers: at most %d names", MAX_NAMES);
  luaL_checkstack(L, n + 6, NULL); /* (a repeated one: its list, a buffer, a value) */
  for (int i = 0; i < n; i++) {
    lens[i] = strlen(names[i]);
    seen[i] = 0;
  }
  const char *p = raw, *end = raw ? raw + len : NULL;
  header_line h;
  while (next_header_line(&p, end, &h))
    for (int i = 0; i < n; i++)
      if (header_named(&h, names[i], lens[i]) && seen[i]++ == 0) first[i] = h;
  int pushed = 0;
  for (int i = 0; i < n; i++) {
    values[i] = NULL;
    if (!seen[i]) continue;
    if (seen[i] == 1) {
      lua_pushlstring(L, first[i].value, first[i].vlen);
    } else { /* repeated: joined as push_header_table joins it */
      lua_createtable(L, seen[i], 0);
      lua_Integer k = 0;
      p = raw;
      while (next_header_line(&p, end, &h))
        if (header_named(&h, names[i], lens[i]) && h.vlen > 0) {
          lua_pushlstring(L, h.value, h.vlen);
          lua_rawseti(L, -2, ++k);
        }
      push_joined(L);
      lua_remove(L, -2);
    }
    values[i] = lua_tostring(L, -1);
    pushed++;
  }
  return pushed;
}

static const char raw_headers_key = 'H';
static const char response_mt_key = 'R'; /* RESPONSE_MT, also kept here */

/* res.headers, built on first use: most successful calls never read them,
 * and a table of strings per response is most of a response's cost. Its
 * raw lines' entry becomes false: the response's headers are the table. */
static int response_index(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING || strcmp(lua_tostring(L, 2), "headers") != 0) return 0;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &raw_headers_key);
  lua_pushvalue(L, 1);
  lua_rawget(L, -2);
  size_t len = 0;
  const char *raw = lua_tolstring(L, -1, &len);
  push_header_table(L, raw, len);
  lua_pushvalue(L, -1);
  lua_setfield(L, 1, "headers"); /* from now on a plain field */
  lua_pushvalue(L, 1);
  lua_pushboolean(L, 0);
  lua_rawset(L, -5);
  return 1;
}

/* If the value at idx is a response of resil.http.request (or a stream's),
 * pushes its headers as they are now, and returns their type: its raw header
 * lines (a string) until res.headers is built, then res.headers (a table,
 * unless replaced). For any other value nothing is pushed: LUA_TNONE. */
int response_headers(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) != LUA_TTABLE) return LUA_TNONE;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &raw_headers_key);
  lua_pushvalue(L, idx);
  int t = lua_rawget(L, -2);
  lua_remove(L, -2);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return LUA_TNONE;
  }
  if (t == LUA_TBOOLEAN) {
    lua_pop(L, 1);
    lua_pushliteral(L, "headers");
    t = lua_rawget(L, idx);
  }
  return t;
}

/* head, body: the raw header lines and the body (NULL: no body field) */
static void push_response(lua_State *L, const outcome *o, const buffer *head, const buffer *body) {
  /* room for status, body, time, http_version and what readers add (res.data
   * of policies.classify, res.headers once read, a field or two of the
   * caller's): one hash part of 8, no rehash as they come */
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, o->status);
  lua_setfield(L, -2, "status");
  lua_rawgetp(L, LUA_REGISTRYINDEX, &raw_headers_key);
  lua_pushvalue(L, -2);
  lua_pushlstring(L, head->data ? head->data : "", head->len);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &response_mt_key); /* (luaL_setmetatable: a lookup by name) */
  lua_setmetatable(L, -2);
  if (body) {
    lua_pushlstring(L, body->data ? body->data : "", body->len);
    lua_setfield(L, -2, "body");
  }
  lua_pushnumber(L, o->elapsed);
  lua_setfield(L, -2, "time");
  const char *version = o->http_version == CURL_HTTP_VERSION_2_0   ? "2"
                        : o->http_version == CURL_HTTP_VERSION_1_1 ? "1.1"
                        : o->http_version == CURL_HTTP_VERSION_1_0 ? "1.0"
                        : o->http_version == CURL_HTTP_VERSION_3   ? "3"
                                                                   : NULL;
  if (version) {
    lua_pushstring(L, version);
    lua_setfield(L, -2, "http_version");
  }
}

/* For streams, whose request is read while it runs. */
int request_push_failure(lua_State *L, const http_req *r) {
  outcome o;
  outcome_of(r, &o);
  return push_failure(L, &o);
}

void request_push_head(lua_State *L, const http_req *r) {
  outcome o;
  outcome_of(r, &o);
  push_response(L, &o, &r->head, NULL);
}

/* ---------- building a transfer ---------- */

/* unit: "seconds" or "bytes", for the message */
static double number_field(lua_State *L, const char *field, const char *unit) {
  if (lua_type(L, -1) != LUA_TNUMBER) resil_raise(L, "http request: '%s' must be a number of %s", field, unit);
  double v = lua_tonumber(L, -1);
  if (v != v || v < 0) resil_raise(L, "http request: '%s' must be >= 0", field);
  return v;
}

static const char *string_field(lua_State *L, const char *field) {
  if (lua_type(L, -1) != LUA_TSTRING) resil_raise(L, "http request: '%s' must be a string", field);
  return lua_tostring(L, -1);
}

static void check_header_text(lua_State *L, const char *name, const char *s, size_t len, const char *what) {
  for (size_t i = 0; i < len; i++)
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
      resil_raise(L, "http request: the %s of header '%s' contains a line break or NUL", what, name);
}

/* RFC 9110's token: a name with a colon or a space would send another header than the one named */
static int header_name_ok(const char *s, size_t len) {
  if (len == 0) return 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c && strchr("!#$%&'*+-.^_`|~", c))))
      return 0;
  }
  return 1;
}

#define EXPECT_100_AT (1024 * 1024) /* libcurl's EXPECT_100_THRESHOLD: it asks past this */

/* The request's header lines, each ending in "\n", into H's scratch buffer
 * (reused, so an error raised half-way leaks nothing). */
static void header_text(lua_State *L, http_state *H, int t, int json, int big_body) {
  buffer *b = &H->scratch;
  int has_agent = 0, has_type = 0;
  b->len = 0;
  if (lua_type(L, t) == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, t)) {
      if (lua_type(L, -2) != LUA_TSTRING) resil_raise(L, "http request: header names must be strings");
      if (!lua_isstring(L, -1)) resil_raise(L, "http request: header '%s' must be a string", lua_tostring(L, -2));
      size_t nlen, vlen;
      const char *name = lua_tolstring(L, -2, &nlen);
      const char *value = lua_tolstring(L, -1, &vlen);
      check_header_text(L, name, name, nlen, "name");
      if (!header_name_ok(name, nlen)) resil_raise(L, "http request: header name '%s' is not a token (RFC 9110)", name);
      check_header_text(L, name, value, vlen, "value");
      /* the body's framing is the host's, from the body it sends: a caller's
       * Content-Length that differs from it (or a Transfer-Encoding) would
       * end the request early on the wire and make the rest of the body the
       * next request on the kept connection, whose answer another caller
       * reads (as resil.server drops a handler's own) */
      if ((nlen == 14 && strncasecmp(name, "content-length", 14) == 0) ||
          (nlen == 17 && strncasecmp(name, "transfer-encoding", 17) == 0)) {
        lua_pop(L, 1);
        continue;
      }
      has_agent |= nlen == 10 && strncasecmp(name, "user-agent", 10) == 0;
      has_type |= nlen == 12 && strncasecmp(name, "content-type", 12) == 0;
      int ok = buffer_append(b, name, nlen) == 0;
      if (vlen) ok = ok && buffer_append(b, ": ", 2) == 0 && buffer_append(b, value, vlen) == 0;
      else ok = ok && buffer_append(b, ";", 1) == 0; /* curl's way to send an empty header */
      if (!ok || buffer_append(b, "\n", 1) != 0) luaL_error(L, "not enough memory");
      lua_pop(L, 1);
    }
  }
  /* no "Expect: 100-continue" round trip on large bodies (libcurl asks for
   * one past 1 MiB only: below, the line would only cost curl a compare with
   * each header it adds); our User-Agent unless the request has its own (a
   * header line: cheaper for curl than CURLOPT_USERAGENT, which it formats
   * anew for every request) */
  if (big_body && buffer_append(b, "Expect:\n", 8) != 0) luaL_error(L, "not enough memory");
  if (json && !has_type && buffer_append(b, "Content-Type: application/json\n", 31) != 0)
    luaL_error(L, "not enough memory");
  if (!has_agent && buffer_append(b, DEFAULT_AGENT "\n", sizeof DEFAULT_AGENT) != 0) luaL_error(L, "not enough memory");
}

/* The header set for the headers table at t: the last one when the lines
 * are the same, else a new one that becomes the last. Takes no reference. */
static header_set *header_set_for(lua_State *L, http_state *H, int t, int json, int big_body) {
  header_text(L, H, t, json, big_body);
  const char *text = H->scratch.data;
  size_t len = H->scratch.len;
  header_set *hs = H->last_headers;
  if (!hs || hs->len != len || memcmp(hs->text, text, len) != 0) {
    hs = calloc(1, sizeof *hs);
    char *copy = malloc(len + 1);
    if (!hs || !copy) {
      free(hs);
      free(copy);
      luaL_error(L, "not enough memory");
    }
    memcpy(copy, text, len + 1);
    hs->text = copy;
    hs->len = len;
    for (char *line = copy, *end; *line; line = end + 1) {
      end = strchr(line, '\n');
      *end = '\0';
      struct curl_slist *grown = curl_slist_append(hs->list, line);
      *end = '\n';
      if (!grown) {
        curl_slist_free_all(hs->list);
        free(copy);
        free(hs);
        luaL_error(L, "not enough memory");
      }
      hs->list = grown;
    }
    header_set *old = H->last_headers;
    H->last_headers = hs;
    if (old && old->refs == 0) {
      old->refs = 1;
      header_set_release(H, old);
    }
  }
  return hs;
}

/* The fields of a request table, read in one pass over it. */
typedef struct {
  const char *method, *ca_file;
  double timeout, idle_timeout, connect_timeout, max_body, max_event, cancel_grace;
  int insecure, follow;
  int http_version; /* 0 auto, 11 "1.1", 20 "2" */
  int extras; /* on_chunk or on_event: for the prelude's stream_request */
  int progress; /* the stack index of the table whose `progress` table is told what the transfer had when
                   its task is canceled (0: none) */
  int headers_merged; /* SLOT_HEADERS holds a table made here, the tables' headers merged */
} request_fields;

/* The stack index of a request's table `layer` (0: the first): the first at
 * SLOT_TABLE, the others (resil.http.request(t1, t2, ...)) after the slots */
static int layer_index(int layer) { return layer == 0 ? SLOT_TABLE : SLOT_LAST + layer; }

/* L stack: a later table's headers on top -> SLOT_HEADERS has them over
 * those it had, by name (a table made for the request, never the caller's) */
static void merge_headers(lua_State *L, request_fields *f) {
  if (!f->headers_merged) {
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, SLOT_HEADERS)) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
    lua_replace(L, SLOT_HEADERS);
    f->headers_merged = 1;
  }
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, SLOT_HEADERS);
  }
}

/* L stack: the request's tables (layer_index), nil in slots 2..5 -> the
 * slots hold its url, body, headers and json: the strings stay anchored
 * while the transfer runs. Of several tables, a later one's field replaces
 * an earlier one's, and their headers are merged by name. */
static void read_fields(lua_State *L, request_fields *f, int layers) {
  f->method = f->ca_file = NULL;
  f->timeout = DEFAULT_TIMEOUT;
  f->idle_timeout = f->cancel_grace = 0;
  f->connect_timeout = DEFAULT_CONNECT_TIMEOUT;
  f->max_body = DEFAULT_MAX_BODY;
  f->max_event = DEFAULT_MAX_EVENT;
  f->insecure = f->follow = f->extras = f->http_version = f->progress = f->headers_merged = 0;
  for (int layer = 0; layer < layers; layer++) {
    int t = layer_index(layer);
    lua_pushnil(L);
    while (lua_next(L, t)) {
      size_t n;
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &n) : NULL;
      if (!k) n = 0;
#define IS(name) (n == sizeof name - 1 && memcmp(k, name, sizeof name - 1) == 0)
      if (IS("url")) {
        size_t ulen;
        const char *u = string_field(L, "url");
        lua_tolstring(L, -1, &ulen);
        if (strlen(u) != ulen) /* curl would read the url up to it: another url than the one given */
          resil_raise(L, "http request: bad url '%s': contains a NUL byte", u);
        lua_copy(L, -1, SLOT_URL);
      } else if (IS("body")) {
        if (lua_type(L, -1) != LUA_TSTRING)
          resil_raise(L, "http request: 'body' must be a string (use 'json' for a table)");
        lua_copy(L, -1, SLOT_BODY);
      } else if (IS("headers")) {
        if (lua_type(L, -1) != LUA_TTABLE) resil_raise(L, "http request: 'headers' must be a table");
        if (lua_isnil(L, SLOT_HEADERS)) lua_copy(L, -1, SLOT_HEADERS);
        else merge_headers(L, f);
      } else if (IS("method")) {
        f->method = string_field(L, "method");
        /* (an empty method went out as a request line without one; "G\0ET" as "G") */
        if (!*f->method || strlen(f->method) != lua_rawlen(L, -1))
          resil_raise(L, "http request: bad method '%s'", f->method);
      } else if (IS("timeout")) {
        f->timeout = number_field(L, "timeout", "seconds");
      } else if (IS("idle_timeout")) {
        f->idle_timeout = number_field(L, "idle_timeout", "seconds");
      } else if (IS("cancel_grace")) {
        f->cancel_grace = number_field(L, "cancel_grace", "seconds");
      } else if (IS("connect_timeout")) {
        f->connect_timeout = number_field(L, "connect_timeout", "seconds");
      } else if (IS("max_body")) {
        f->max_body = number_field(L, "max_body", "bytes");
      } else if (IS("max_event")) {
        f->max_event = number_field(L, "max_event", "bytes");
      } else if (IS("ca_file")) {
        f->ca_file = string_field(L, "ca_file");
      } else if (IS("insecure")) { /* (a string from a config, "false" or "0", turned verification off) */
        if (!lua_isboolean(L, -1)) resil_raise(L, "http request: 'insecure' must be true or false");
        f->insecure = lua_toboolean(L, -1);
      } else if (IS("http_version")) {
        const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
        if (strcmp(v, "auto") == 0) f->http_version = 0;
        else if (strcmp(v, "1.1") == 0) f->http_version = 11;
        else if (strcmp(v, "2") == 0) f->http_version = 20;
        else resil_raise(L, "http request: 'http_version' must be \"1.1\", \"2\" or \"auto\"");
      } else if (IS("follow_redirects")) {
        if (!lua_isboolean(L, -1)) resil_raise(L, "http request: 'follow_redirects' must be true or false");
        f->follow = lua_toboolean(L, -1);
      } else if (IS("json")) {
        lua_copy(L, -1, SLOT_JSON);
      } else if (IS("on_chunk") || IS("on_event")) {
        /* (else the first chunk raised "attempt to call a ... value" from the prelude, the request sent) */
        int callable = lua_isfunction(L, -1);
        if (!callable && luaL_getmetafield(L, -1, "__call") != LUA_TNIL) {
          lua_pop(L, 1);
          callable = 1;
        }
        if (!callable) resil_raise(L, "http request: '%s' must be a function", lua_tostring(L, -2));
        f->extras = 1;
      } else if (IS("progress")) { /* false: none (a later table's drops an earlier one's) */
        if (lua_type(L, -1) != LUA_TTABLE && !(lua_isboolean(L, -1) && !lua_toboolean(L, -1)))
          resil_raise(L, "http request: 'progress' must be a table");
        f->progress = lua_istable(L, -1) ? t : 0;
      }
#undef IS
      lua_pop(L, 1);
    }
  }
  if (lua_isnil(L, SLOT_URL)) resil_raise(L, "http request: 'url' is required");
  if (f->method) {
    for (const char *c = f->method; *c; c++)
      if (!((*c >= 'A' && *c <= 'Z') || *c == '-' || *c == '_'))
        resil_raise(L, "http request: bad method '%s'", f->method);
  }
}

/* Turning TLS verification off is never silent: a warning through resil.log,
 * once per scheme://host:port. */
static void warn_insecure(lua_State *L, const char *url) {
  size_t origin_len = origin_length(url);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, "resil.http.insecure_warned");
  lua_pushlstring(L, url, origin_len);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    lua_pushlstring(L, url, origin_len);
    lua_pushboolean(L, 1);
    lua_rawset(L, -4);
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, url, origin_len);
    lua_setfield(L, -2, "origin");
    host_log(L, "warn", "TLS verification is off (insecure = true): the peer is not authenticated");
  }
  lua_pop(L, 2);
}

#define SET_IF_CHANGED(r, field, option, value)                                                                  \
  do {                                                                                                           \
    if ((r)->set.field != (value)) {                                                                             \
      (r)->set.field = (value);                                                                                  \
      curl_easy_setopt((r)->easy, option, (r)->set.field);                                                       \
    }                                                                                                            \
  } while (0)

/* The method and body: set again only when they differ from the handle's
 * last request (the same body string and method is the common case). */
static void set_method(http_req *r, const char *method, size_t body_len) {
  easy_options *o = &r->set;
  CURL *e = r->easy;
  const char *m = method ? method : "";
  if (o->method_set && o->body == r->req_body && o->body_len == (curl_off_t)body_len && strcmp(o->method, m) == 0)
    return;
  o->method_set = strlen(m) < sizeof o->method;
  if (o->method_set) strcpy(o->method, m);
  o->body = r->req_body;
  o->body_len = (curl_off_t)body_len;
  curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, (char *)NULL);
  if (r->req_body) {
    curl_easy_setopt(e, CURLOPT_NOBODY, 0L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->req_body);
    if (method && strcmp(method, "POST") != 0) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  } else {
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    if (method && strcmp(method, "HEAD") == 0) curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else if (method && strcmp(method, "GET") != 0) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  }
}

/* Back to libcurl's defaults and ours (verified against the system's CAs). */
static void easy_reset(http_req *r) {
  curl_easy_reset(r->easy);
  easy_defaults(r);
}

/* libcurl 7.88 counts the resends of a refused request (a stream past a
 * GOAWAY's last id, a reused connection found dead) per easy handle, never
 * per transfer, and gives up at 5 ("Connection died, tried 5 times"): a
 * recycled handle would fail a request after a few GOAWAYs that it would
 * have sent on a new connection (nginx's default keepalive_requests sends
 * one every 1,000 requests). A reset clears the count: a handle that resent
 * is reset before its next request (rare: a reset costs its options). */
static void easy_retries_spent(http_req *r) {
  if (r->set.retried > 0) easy_reset(r);
}

static int same_string(const char *a, const char *b) { return a == b || (a && b && strcmp(a, b) == 0); }

/* TLS options are set only on the handle whose request asks for them; the
 * next request with other options starts from a reset handle (so it never
 * inherits a CA file or verification turned off). */
static void set_tls(http_req *r, const char *ca_file, long insecure) {
  easy_options *o = &r->set;
  long custom = ca_file || insecure;
  if (o->tls_custom == custom && o->insecure == insecure && same_string(o->ca_file, ca_file)) return;
  if (o->tls_custom) easy_reset(r);
  o->tls_custom = custom; /* a failed strdup below only costs a reset next time */
  if (ca_file) {
    o->ca_file = strdup(ca_file);
    curl_easy_setopt(r->easy, CURLOPT_CAINFO, ca_file);
  }
  if (insecure) {
    o->insecure = 1;
    curl_easy_setopt(r->easy, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(r->easy, CURLOPT_SSL_VERIFYHOST, 0L);
  }
}

static const char json_encode_key = 'J';

/* json = table: encoded into the body slot (a POST unless a method is given) */
static void encode_json_body(lua_State *L) {
  if (!lua_isnil(L, SLOT_BODY)) resil_raise(L, "http request: give 'body' or 'json', not both");
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &json_encode_key) != LUA_TFUNCTION) {
    lua_pop(L, 1);
    /* resil.json's exact encode (src/json.c), from the host's own module */
    lua_pushcfunction(L, luaopen_resil_json);
    lua_call(L, 0, 1);
    lua_getfield(L, -1, "encode");
    lua_remove(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &json_encode_key);
  }
  lua_pushvalue(L, SLOT_JSON);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) resil_raise(L, "http request: cannot encode 'json': %s", lua_tostring(L, -1));
  lua_replace(L, SLOT_BODY);
}

/* L stack: slots as read_fields left them, f what it read -> a request on
 * the live list, not started. */
static http_req *request_new(lua_State *L, int stream, const request_fields *fp) {
  http_state *H = http_get(L);
  request_fields f = *fp;
  const char *url = lua_tostring(L, SLOT_URL);
  url_set *us = url_set_for(L, H, url);
  int json = !lua_isnil(L, SLOT_JSON);
  if (json) encode_json_body(L);
  size_t body_len = 0;
  const char *body = lua_tolstring(L, SLOT_BODY, &body_len);
  header_set *hs = header_set_for(L, H, SLOT_HEADERS, json, body_len > EXPECT_100_AT);
  if (f.insecure) warn_insecure(L, url);
  int origin = origin_index(H, url);
  if (origin < 0) luaL_error(L, "not enough memory");

  http_req *r = req_take(L, H); /* nothing raises from here on */
  r->origin = origin;
  H->origins[origin].users++;
  hs->refs++;
  r->req_headers = hs;
  us->refs++;
  r->req_url = us;
  r->stream = stream;
  r->url = url;
  r->req_body = body;
  r->timeout = f.timeout;
  r->idle_timeout = f.idle_timeout;
  r->cancel_grace = f.cancel_grace;
  /* past what curl's limit holds (math.huge, 2^64): no limit, not a cast's 0 or a negative curl refuses */
  r->max_body = f.max_body >= 0x1p63 ? (size_t)INT64_MAX : (size_t)f.max_body;
  r->max_event = f.max_event >= (double)SIZE_MAX ? SIZE_MAX : (size_t)f.max_event;

  easy_retries_spent(r); /* first, with set_tls: they may reset the handle */
  set_tls(r, f.ca_file, f.insecure);
  CURL *e = r->easy;
  if (!r->set.url || strcmp(r->set.url, url) != 0) {
    char *copy = strdup(url);
    if (copy) {
      free(r->set.url);
      r->set.url = copy;
    }
    curl_easy_setopt(e, CURLOPT_URL, url); /* what CURLINFO_EFFECTIVE_URL tells */
  }
  SET_IF_CHANGED(r, curlu, CURLOPT_CURLU, us->parsed);
  SET_IF_CHANGED(r, headers, CURLOPT_HTTPHEADER, r->req_headers->list);
  /* set before the transfer starts: libcurl allocates the buffer then */
  if (r->set.recv_buffer != H->origins[origin].recv_buffer) {
    r->set.recv_buffer = H->origins[origin].recv_buffer;
    curl_easy_setopt(r->easy, CURLOPT_BUFFERSIZE, CURL_BUFFER_OPTION(r->set.recv_buffer));
  }
  /* curl takes 0 for its default (300 s) and refuses what a long cannot hold, keeping the handle's
   * last value: 0 is at once (1 ms), math.huge the longest a timer holds (1e9 s) */
  double connect_ms = f.connect_timeout * 1000;
  SET_IF_CHANGED(r, connect_ms, CURLOPT_CONNECTTIMEOUT_MS,
                 connect_ms < 1 ? 1L : connect_ms > 1e12 ? (long)1e12 : (long)connect_ms);
  SET_IF_CHANGED(r, max_body, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)r->max_body);
  SET_IF_CHANGED(r, follow, CURLOPT_FOLLOWLOCATION, (long)f.follow);
  int https = strncasecmp(url, "https:", 6) == 0;
  long version = f.http_version == 11 ? CURL_HTTP_VERSION_1_1
                 : f.http_version == 0 ? CURL_HTTP_VERSION_2TLS /* h2 if TLS offers it */
                 : https               ? CURL_HTTP_VERSION_2_0
                                       : CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE; /* h2c */
  SET_IF_CHANGED(r, http_version, CURLOPT_HTTP_VERSION, version);
  if (r->set.no_pipewait) { /* the last transfer on this handle opened a connection */
    curl_easy_setopt(r->easy, CURLOPT_PIPEWAIT, 1L);
    r->set.no_pipewait = 0;
  }
  /* libcurl 7.88 walks every cached connection when a transfer that kept its
   * connection is removed (and when it looks for one to reuse), which is
   * quadratic with thousands in flight. Transfers beyond this many in flight
   * use a one-shot connection, so the cache stays this size. Not those that
   * may multiplex: h2 needs few connections, and a one-shot one would defeat
   * it (an https origin counts as h2 until it answers in HTTP/1.1). */
  /* libcurl before 8.0.0 breaks an h2c (prior knowledge) connection it
   * reuses or multiplexes onto: the first request is answered, every later
   * one fails "Error in the HTTP2 framing layer" (curl/curl#10634). There
   * each h2c request has a connection of its own. */
  int h2c_alone = f.http_version == 20 && !https && h2c_reuse_broken();
  int multiplexed = !h2c_alone &&
                    (f.http_version == 20 ||
                     (https && f.http_version == 0 && H->origins[origin].version != CURL_HTTP_VERSION_1_1 &&
                      H->origins[origin].version != CURL_HTTP_VERSION_1_0));
  r->driver = &H->drivers[multiplexed ? DRIVER_MUX : DRIVER_PLAIN];
  long one_shot = h2c_alone || (!multiplexed && H->R->io_pending >= ONE_SHOT_CONNECTIONS_ABOVE);
  if (r->set.one_shot != one_shot) {
    r->set.one_shot = one_shot;
    curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, one_shot);
    curl_easy_setopt(e, CURLOPT_FORBID_REUSE, one_shot);
  }
  set_method(r, f.method, body_len);
  return r;
}

/* read_fields and request_new in one, for http_stream.c */
http_req *request_prepare(lua_State *L, int stream) {
  request_fields f;
  read_fields(L, &f, 1);
  return request_new(L, stream, &f);
}

void request_start(lua_State *L, http_req *r) {
  http_state *H = r->H;
  if (r->driver == &H->drivers[DRIVER_MUX]) { /* into curl at the turn's end (admit_parked) */
    origin *o = &H->origins[r->origin];
    r->park_prev = o->parked_tail;
    if (o->parked_tail) o->parked_tail->park_next = r;
    else o->parked = r;
    o->parked_tail = r;
    o->nparked++;
    r->parked = 1;
    H->parked++;
  } else {
    if (curl_multi_add_handle(r->driver->multi, r->easy) != CURLM_OK) {
      req_release(r);
      luaL_error(L, "cannot start the HTTP transfer");
    }
    upload_watch(r);
    r->driver->added = 1;
  }
  r->active = 1;
  H->R->io_pending++;
  r->started = resil_now(H->R);
  /* 0 is no time left (a deadline's remainder that reached 0), not no limit: math.huge is that */
  timer_start(&r->deadline, r->timeout);
  if (r->idle_timeout > 0) timer_start(&r->idle, r->idle_timeout);
}

/* The request goes back to the pool before the result is built (building
 * may raise): its buffers are swapped into H's for the response. */
static int request_result_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  http_req *r = (http_req *)ctx;
  http_state *H = r->H;
  outcome o;
  char detail[CURL_ERROR_SIZE];
  outcome_of(r, &o);
  if (failed(&o)) {
    snprintf(detail, sizeof detail, "%s", o.detail);
    o.detail = detail;
    o.received = (long long)r->body.len;
    req_release(r);
    return push_failure_after_answer(L, &o);
  }
  buffer swap = H->reply_head;
  H->reply_head = r->head;
  r->head = swap;
  swap = H->reply_body;
  H->reply_body = r->body;
  r->body = swap;
  req_release(r);
  push_response(L, &o, &H->reply_head, &H->reply_body);
  return 1;
}

/* Start the request and wait for all of it: request_result_k continues. */
static int request_await(lua_State *L, task *t, const request_fields *f) {
  http_req *r = request_new(L, 0, f);
  if (f->progress) {
    lua_getfield(L, f->progress, "progress");
    r->progress_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  request_start(L, r);
  r->waiter = t;
  static const task_wait_ops request_wait = {request_cancel, request_give_back, NULL};
  task_wait(t, &request_wait, r);
  return lua_yieldk(L, 0, (lua_KContext)r, request_result_k);
}

static const char request_extras_key = 'X';

static int results_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  return lua_gettop(L);
}

/* The request's tables as one, for the prelude's reader: their fields in
 * order, headers merged (read_fields) -> replaces the first */
static void merge_layers(lua_State *L, int layers) {
  lua_newtable(L);
  for (int layer = 0; layer < layers; layer++) {
    lua_pushnil(L);
    while (lua_next(L, layer_index(layer))) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, -4);
    }
  }
  lua_pushvalue(L, SLOT_HEADERS);
  lua_setfield(L, -2, "headers");
  lua_replace(L, SLOT_TABLE);
}

/* resil.http.request(req [, more, ...]) -> response | nil, err. Tables
 * after the first add to it, each over those before (read_fields): a
 * provider's base request, a call's fields and an attempt's are sent
 * without being copied into one. A request is sent and awaited here; one
 * with `on_chunk` or `on_event` goes through the prelude's Lua (registered
 * with set_request_extras), which reads a stream. */
static int l_request(lua_State *L) {
  int layers = lua_gettop(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  for (int i = 2; i <= layers; i++) luaL_checktype(L, i, LUA_TTABLE);
  if (layers < 1) layers = 1;
  /* slots 2..SLOT_LAST after the first table, the others after them */
  lua_settop(L, layers + SLOT_LAST - 1);
  if (layers > 1) lua_rotate(L, 2, SLOT_LAST - 1);
  request_fields f;
  read_fields(L, &f, layers);
  if (!f.extras) return request_await(L, task_current(L, "resil.http.request"), &f);
  if (layers > 1) merge_layers(L, layers);
  lua_settop(L, SLOT_TABLE);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &request_extras_key);
  lua_insert(L, 1);
  lua_callk(L, 1, LUA_MULTRET, 0, results_k);
  return lua_gettop(L);
}

/* resil.http.stats() -> {in_flight =, open =, pooled =, connections =,
 * receive_buffers =}: transfers running, requests not given back yet
 * (running, finished but not yet read by their task, open streams), recycled
 * requests ready for reuse, {[origin] = TCP connections open, busy or idle}
 * and {[origin] = bytes of each transfer's receive buffer} for the origins
 * requested so far (note_lost_header_block) */
static int l_stats(lua_State *L) {
  http_state *H = resil_from_lua(L)->http;
  lua_Integer open = 0, in_flight = 0;
  for (http_req *r = H ? H->live : NULL; r; r = r->next) {
    open++;
    in_flight += r->active;
  }
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, in_flight);
  lua_setfield(L, -2, "in_flight");
  lua_pushinteger(L, open);
  lua_setfield(L, -2, "open");
  lua_pushinteger(L, H ? H->nfree : 0);
  lua_setfield(L, -2, "pooled");
  lua_newtable(L);
  for (int i = 0; H && i < H->norigins; i++) {
    if (H->origins[i].connections <= 0) continue;
    lua_pushlstring(L, H->origins[i].name, H->origins[i].len);
    lua_pushinteger(L, H->origins[i].connections);
    lua_rawset(L, -3);
  }
  lua_setfield(L, -2, "connections");
  lua_createtable(L, 0, H ? H->norigins : 0);
  for (int i = 0; H && i < H->norigins; i++) {
    lua_pushlstring(L, H->origins[i].name, H->origins[i].len);
    lua_pushinteger(L, H->origins[i].recv_buffer);
    lua_rawset(L, -3);
  }
  lua_setfield(L, -2, "receive_buffers");
  return 1;
}

/* http.set_request_extras(fn): the prelude's reader for requests with
 * on_chunk or on_event (JSON bodies are encoded here, in C) */
static int l_set_request_extras(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &request_extras_key);
  return 0;
}

/* resil.http.header(res, name [, name2]) -> the value of the first of the
 * headers named (any case) that the response has, as res.headers[name] would
 * give it, or nil; read from the raw lines without building res.headers (a
 * provider's request id, read from every answer). A table that is no
 * response: its headers field's. */
static int l_header(lua_State *L) {
  enum { NAME_MAX_LEN = 128 };
  int n = lua_gettop(L) - 1;
  if (n < 1 || n > 2) return luaL_error(L, "resil.http.header(res, name [, name2])");
  char lower[2][NAME_MAX_LEN];
  const char *names[2];
  for (int i = 0; i < n; i++) {
    size_t len;
    const char *name = luaL_checklstring(L, 2 + i, &len);
    if (len >= NAME_MAX_LEN) luaL_argerror(L, 2 + i, "a header name of at most 127 bytes");
    for (size_t k = 0; k <= len; k++) lower[i][k] = (char)tolower((unsigned char)name[k]);
    names[i] = lower[i];
  }
  int t = response_headers(L, 1);
  if (t == LUA_TNONE && lua_type(L, 1) == LUA_TTABLE) t = lua_getfield(L, 1, "headers");
  if (t == LUA_TSTRING) {
    size_t len;
    const char *raw = lua_tolstring(L, -1, &len);
    const char *values[2];
    int pushed = push_raw_headers(L, raw, len, names, n, values);
    for (int i = 0; i < n; i++)
      if (values[i]) { /* (pushed in the order of names: the first present is the deepest) */
        lua_pushvalue(L, -pushed);
        return 1;
      }
    lua_pushnil(L);
    return 1;
  }
  if (t == LUA_TTABLE) {
    for (int i = 0; i < n; i++)
      if (lua_getfield(L, -1 - i, names[i]) != LUA_TNIL) return 1;
  }
  lua_pushnil(L);
  return 1;
}

static const luaL_Reg http_functions[] = {{"request", l_request},
                                          {"header", l_header},
                                          {"stream", http_stream_open},
                                          {"sse_events", http_sse_events},
                                          {"stats", l_stats},
                                          {"set_request_extras", l_set_request_extras},
                                          {NULL, NULL}};

int luaopen_resil_http(lua_State *L) {
  luaL_newmetatable(L, RESPONSE_MT);
  lua_pushcfunction(L, response_index);
  lua_setfield(L, -2, "__index");
  lua_rawsetp(L, LUA_REGISTRYINDEX, &response_mt_key);
  lua_newtable(L); /* response -> its raw header lines until res.headers is built, then false */
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &raw_headers_key);
  http_stream_register(L);
  luaL_newlib(L, http_functions);
  return 1;
}
