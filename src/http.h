/*
 * http.h: what the HTTP client's two files share: http.c (transfers on
 * libcurl's multi API, the request pool, header sets, responses,
 * resil.http.request) and http_stream.c (resil.http.stream and its reads).
 * Private to those two, but for a response's headers read without
 * building res.headers (response_headers, push_raw_headers: b:observe in
 * bucket.c): the rest of the host sees only http_free (host.h; the flush is
 * a turn-end hook), and no libcurl type.
 */
#ifndef RESIL_HTTP_H
#define RESIL_HTTP_H

#include <stdlib.h>

#include <curl/curl.h>

#include "host.h"

typedef struct {
  char *data;
  size_t len, cap;
} buffer;

static inline void buffer_free(buffer *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

typedef struct header_set header_set;
typedef struct url_set url_set;

typedef enum { ABORT_NONE, ABORT_TIMEOUT, ABORT_IDLE, ABORT_TOO_LARGE, ABORT_EVENT_TOO_LARGE, ABORT_CANCELED } abort_reason;

/* What an easy handle was last given: a recycled handle is only told what
 * changed (options are most of the per-request work in libcurl). */
typedef struct {
  char *url;
  char *ca_file;             /* with insecure: TLS options a later request must not inherit */
  long connect_ms, follow, one_shot, insecure, tls_custom, http_version;
  long recv_buffer;          /* the receive buffer: its origin's (CURLOPT_BUFFERSIZE is one less) */
  long retried;              /* resends curl made on this handle (easy_retries_spent) */
  int no_pipewait;           /* CURLOPT_PIPEWAIT off: an opener that need not wait (admit_parked) */
  curl_off_t max_body;
  struct curl_slist *headers;
  CURLU *curlu;
  const char *body;          /* with body_len and method: the request line and body */
  curl_off_t body_len;
  char method[16];
  int method_set;
} easy_options;

typedef struct http_req http_req;
typedef struct curl_driver curl_driver;

struct http_req {
  /* kept across reuse */
  http_state *H;
  http_req *next, *prev;     /* the free list, or the live list */
  CURL *easy;
  curl_driver *driver;       /* the multi handle it runs on, while active */
  easy_options set;
  resil_timer deadline, idle;
  buffer body, head;
  char errbuf[CURL_ERROR_SIZE];
  /* per request, cleared by req_take */
  task *waiter;              /* the task blocked on this transfer, if any */
  header_set *req_headers;
  struct curl_slist *hop_headers; /* req_headers without credentials: a redirect's hop to another origin */
  url_set *req_url;          /* the parsed url, given to curl as CURLOPT_CURLU */
  const char *req_body;      /* a Lua string anchored by the caller (stack slot or user value) */
  const char *url;           /* likewise */
  size_t max_body, total_received;
  sse_parser *sse;           /* a stream read by events (stream:read_event) */
  struct z_stream_s *gz;     /* a gzip or deflate body's decoder (header_cb) */
  size_t h2_raw;              /* body bytes curl wrote since the response's status line (held_note_write) */
  int gz_open;               /* it took bytes of a gzip member not yet ended: the body is incomplete */
  int gz_raw;                /* its deflate body came without zlib's header: read as raw deflate */
  int decode_failed;         /* CURLE_BAD_CONTENT_ENCODING or CURLE_OUT_OF_MEMORY: why decoding stopped */
  int length_conflict;       /* the final response named two different Content-Lengths */
  int status_invalid;        /* libcurl read a status past 999 ("HTTP/204200"): no response */
  size_t trailer_bytes;      /* the trailers read after its body (a chunked one's, h2's) */
  long long idle_sent;       /* body bytes sent when the idle timer last looked (idle_cb) */
  int trailers_too_large;    /* past MAX_TRAILER_BYTES: the transfer stopped */
  size_t sse_used;           /* body bytes it has framed */
  size_t max_event;
  long status;
  long http_version;         /* negotiated: CURL_HTTP_VERSION_1_1, _2_0, ... (0: none yet) */
  int origin;                /* index in http_state's origins */
  http_req *park_next, *park_prev; /* waiting for room on its origin's h2 connections */
  http_req *up_next, *up_prev; /* in curl with its body not all sent (release_upload_buffers) */
  http_req *fed_next, *fed_prev; /* an h2 transfer given data by the last curl call (kick_cb) */
  size_t fed_bytes;          /* how much, in that call */
  int fed_head;              /* some of it header lines */
  curl_socket_t conn_fd;     /* the socket curl was driving when it last gave this transfer data */
  curl_socket_t http1_fd;    /* an HTTP/1 answer's socket, as its head ended (shut_if_stray) */
  int parked, opener, sends, uploading, fed;
  int active, done, stream, headers_done, paused;
  int client_fault;          /* failed by libcurl's fault, not the server's (a lost h2 header block) */
  int reader_closed;         /* stream:close() was called: a read says canceled (http_stream.c) */
  int progress_ref;          /* the request's `progress` table (a registry ref; 0: none), told at a cancel */
  int grace_cut;             /* a stream's cancel waits for its status (cancel_grace): its deadline is that wait's */
  curl_socket_t opened[2];   /* the last sockets curl opened for it (forget_closed_sockets) */
  int nopened;
  CURLcode result;
  abort_reason aborted;
  double timeout, idle_timeout, started, elapsed;
  double cancel_grace;       /* resil.http.stream: how long a cancel waits for the status of a request sent */
};

/* L stack of resil.http.request and resil.http.stream: the request table,
 * then the strings that must stay anchored while the transfer runs, then
 * (streams) the stream's userdata. */
enum { SLOT_TABLE = 1, SLOT_URL, SLOT_BODY, SLOT_HEADERS, SLOT_JSON, SLOT_LAST = SLOT_JSON, SLOT_STREAM };

/* http.c: the life of a request */
/* L stack: the request table at 1, nil in slots 2..5 -> the slots filled
 * (read_fields): a request on the live list, not started. Raises on misuse. */
http_req *request_prepare(lua_State *L, int stream);
void request_start(lua_State *L, http_req *r); /* raises, giving r back, if curl refuses it */
void request_finish(http_req *r, CURLcode result, abort_reason why); /* wakes the waiter */
void req_release(http_req *r); /* back to the pool, the transfer aborted if still running */
int request_sent(http_req *r);  /* 1 once all of the request (headers and body) went to the server */
void request_bound(http_req *r, double seconds); /* it ends, canceled, within seconds (its deadline) */
int request_host_stopping(const http_req *r);    /* 1 once a stop was asked of its host */

/* http.c: results */
int request_push_failure(lua_State *L, const http_req *r); /* nil, err: returns 2 */
void request_push_head(lua_State *L, const http_req *r);   /* a response without its body */
void push_header_table(lua_State *L, const char *p, size_t len);
/* the headers of a response at idx, pushed: raw lines (string) or res.headers
 * once built; LUA_TNONE (nothing pushed) if idx is no response */
int response_headers(lua_State *L, int idx);
/* names[0..n-1] (lower-case, n <= 8) of raw lines as res.headers gives them:
 * those present pushed, values[i] pointing to each (NULL: absent) */
int push_raw_headers(lua_State *L, const char *raw, size_t len, const char *const *names, int n,
                     const char **values);

/* http_stream.c */
int http_stream_open(lua_State *L);     /* resil.http.stream{...} */
int http_sse_events(lua_State *L);      /* resil.http.sse_events(text) */
void http_stream_register(lua_State *L); /* its metatable */

#endif
