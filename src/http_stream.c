/*
 * http_stream.c: resil.http.stream, a response read as it arrives.
 *
 * A stream's request belongs to its userdata ("resil.HttpStream"): the
 * transfer is one of http.c's, built and started like any request, but read
 * as it arrives instead of awaited whole. resil.http.stream returns once the
 * headers arrived; stream:read() hands over the body buffered so far,
 * stream:read_event() the next server-sent event (framed by sse.c). http.c's
 * write callback wakes the reader, and pauses the transfer when the reader
 * falls behind (STREAM_HIGH_WATER); a read resumes it. Closing the stream
 * aborts the transfer; collecting it (or `<close>`) also gives the request
 * back.
 */
#include <string.h>

#include "http.h"

#define STREAM_MT "resil.HttpStream"

typedef struct {
  http_req *r; /* NULL once closed and given back */
} http_stream;

/* The reader caught up with a transfer paused at the high-water mark: it
 * goes on, its idle clock again from now (http.c stops it at the pause: a
 * reader slow for longer than idle_timeout cut a healthy stream as idle). */
static void stream_resume(http_req *r) {
  if (!(r->paused && r->active)) return;
  r->paused = 0;
  if (r->idle_timeout > 0) timer_start(&r->idle, r->idle_timeout);
  curl_easy_pause(r->easy, CURLPAUSE_CONT);
}

static http_req *check_stream(lua_State *L, int idx) {
  http_stream *s = luaL_checkudata(L, idx, STREAM_MT);
  if (!s->r) luaL_error(L, "the stream is closed");
  return s->r;
}

static int stream_open_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  http_req *r = check_stream(L, -1);
  if (!r->headers_done && (r->aborted != ABORT_NONE || r->result != CURLE_OK)) return request_push_failure(L, r);
  return 1;
}

/* A task waiting for a stream's headers was canceled: abort the transfer;
 * the stream's userdata gives the request back when collected. */
static void stream_cancel(void *arg) {
  http_req *r = arg;
  r->waiter = NULL;
  r->aborted = ABORT_CANCELED;
  request_finish(r, CURLE_ABORTED_BY_CALLBACK, ABORT_CANCELED);
}

/* A cancel that comes once the request was sent, with cancel_grace > 0:
 * the server may have answered already (its status on the wire, or read and
 * the task not yet resumed), and a 200 is billed. The cancel then waits
 * (loop.c's settling) for the status, at most cancel_grace s from now: the
 * task resumes with its stream or its failure and is canceled at its next
 * wait, so its caller knows whether the server took it. Not sent yet (or
 * ended): canceled at once, as without it; so too once a stop was asked (a
 * gateway's drain: the process would end with the task still waiting, and
 * what its cancel records, the call's refused answers too, unwritten). */
static int stream_open_settling(void *arg) {
  http_req *r = arg;
  if (r->cancel_grace <= 0 || r->done || request_host_stopping(r)) return 0;
  if (r->headers_done) return 1;
  if (!request_sent(r)) return 0;
  request_bound(r, r->cancel_grace);
  return 1;
}

/* resil.http.stream{...} -> stream (once the headers arrived) | nil, err */
int http_stream_open(lua_State *L) {
  lua_settop(L, SLOT_LAST);
  luaL_checktype(L, SLOT_TABLE, LUA_TTABLE);
  task *t = task_current(L, "resil.http.stream");
  http_stream *s = lua_newuserdatauv(L, sizeof *s, 2); /* user values: the url and body strings */
  s->r = NULL;
  luaL_setmetatable(L, STREAM_MT);
  http_req *r = request_prepare(L, 1);
  s->r = r;
  lua_pushvalue(L, SLOT_URL);
  lua_setiuservalue(L, SLOT_STREAM, 1);
  lua_pushvalue(L, SLOT_BODY);
  lua_setiuservalue(L, SLOT_STREAM, 2);
  request_start(L, r);
  r->waiter = t;
  static const task_wait_ops stream_open_wait = {stream_cancel, NULL, stream_open_settling};
  task_wait(t, &stream_open_wait, r);
  return lua_yieldk(L, 0, 0, stream_open_k);
}

static void read_cancel(void *arg) { ((http_req *)arg)->waiter = NULL; }

/* A read after stream:close(): canceled, as the close of a stream still coming ends it, also when
 * it had all come (its events were handed out after the close, as if it were open) */
static int push_closed(lua_State *L, const http_req *r) {
  lua_pushnil(L);
  resil_push_error(L, "canceled", "%s: the stream was closed", r->url);
  return 2;
}

static int stream_read_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  http_req *r = check_stream(L, 1);
  if (r->reader_closed) return push_closed(L, r);
  if (r->body.len > 0) {
    lua_pushlstring(L, r->body.data, r->body.len);
    r->body.len = 0;
    stream_resume(r);
    return 1;
  }
  if (r->done) {
    if (r->aborted != ABORT_NONE || r->result != CURLE_OK) return request_push_failure(L, r);
    lua_pushnil(L);
    return 1;
  }
  task *t = task_current(L, "stream:read");
  r->waiter = t;
  static const task_wait_ops stream_read_wait = {read_cancel, NULL, NULL};
  task_wait(t, &stream_read_wait, r);
  return lua_yieldk(L, 0, 0, stream_read_k);
}

/* stream:read() -> the next chunk | nil at the end | nil, err */
static int stream_read(lua_State *L) {
  lua_settop(L, 1);
  http_req *r = check_stream(L, 1);
  if (r->waiter) return luaL_error(L, "another task is already reading this stream");
  if (r->sse) return luaL_error(L, "this stream is read by events (stream:read_event)");
  return stream_read_k(L, LUA_OK, 0);
}

/* L stack: -> {data =, event =, id =, retry =} (the last three when the
 * event had them) */
static void push_event(lua_State *L, const sse_event *ev) {
  lua_createtable(L, 0, 4);
  lua_pushlstring(L, ev->data, ev->data_len);
  lua_setfield(L, -2, "data");
  if (ev->event) {
    lua_pushlstring(L, ev->event, ev->event_len);
    lua_setfield(L, -2, "event");
  }
  if (ev->id) {
    lua_pushlstring(L, ev->id, ev->id_len);
    lua_setfield(L, -2, "id");
  }
  if (ev->retry) {
    lua_pushlstring(L, ev->retry, ev->retry_len);
    lua_setfield(L, -2, "retry");
  }
}

/* resil.http.sse_events(text) -> the list of the events the text frames, as read_event gives
 * them (a stream a server sent whole, labelled as something else: framed by the same parser,
 * not by a second one) | nil, err past 8 MiB an event */
int http_sse_events(lua_State *L) {
  size_t len, used = 0;
  const char *text = luaL_checklstring(L, 1, &len);
  sse_parser *p = sse_new(8u * 1024 * 1024);
  if (!p) return luaL_error(L, "not enough memory");
  lua_newtable(L);
  sse_event ev;
  int rc, n = 0;
  while ((rc = sse_next(p, text, len, &used, &ev)) == 1) {
    push_event(L, &ev);
    lua_rawseti(L, -2, ++n);
  }
  sse_free(p);
  if (rc < 0) {
    lua_pushnil(L);
    lua_pushstring(L, rc == SSE_TOO_LARGE ? "an event past 8 MiB" : "not enough memory");
    return 2;
  }
  return 1;
}

/* Frames the body from where the last event ended: no byte is scanned
 * twice, and the body is handed back to curl once all of it is framed. */
static int stream_read_event_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  http_req *r = check_stream(L, 1);
  if (r->reader_closed) return push_closed(L, r);
  if (r->sse && r->body.len > r->sse_used) {
    sse_event ev;
    int rc = sse_next(r->sse, r->body.data, r->body.len, &r->sse_used, &ev);
    if (rc < 0) { /* the stream is over: give back what it held now, not when it is collected */
      r->aborted = rc == SSE_TOO_LARGE ? ABORT_EVENT_TOO_LARGE : ABORT_CANCELED;
      request_finish(r, CURLE_ABORTED_BY_CALLBACK, r->aborted);
      sse_free(r->sse);
      r->sse = NULL;
      buffer_free(&r->body);
      r->sse_used = 0;
      if (rc == SSE_NO_MEMORY) return luaL_error(L, "not enough memory");
    } else {
      if (r->sse_used == r->body.len) {
        r->body.len = r->sse_used = 0;
        stream_resume(r);
      }
      if (rc > 0) {
        push_event(L, &ev);
        return 1;
      }
    }
  }
  if (r->done) {
    if (r->aborted != ABORT_NONE || r->result != CURLE_OK) return request_push_failure(L, r);
    lua_pushnil(L);
    return 1;
  }
  task *t = task_current(L, "stream:read_event");
  r->waiter = t;
  static const task_wait_ops event_read_wait = {read_cancel, NULL, NULL};
  task_wait(t, &event_read_wait, r);
  return lua_yieldk(L, 0, 0, stream_read_event_k);
}

/* stream:read_event() -> the next server-sent event | nil at the end | nil, err */
static int stream_read_event(lua_State *L) {
  lua_settop(L, 1);
  http_req *r = check_stream(L, 1);
  if (r->waiter) return luaL_error(L, "another task is already reading this stream");
  if (!r->sse && r->aborted != ABORT_EVENT_TOO_LARGE && !(r->sse = sse_new(r->max_event)))
    return luaL_error(L, "not enough memory");
  return stream_read_event_k(L, LUA_OK, 0);
}

static int stream_close(lua_State *L) {
  http_req *r = check_stream(L, 1);
  r->reader_closed = 1;
  r->body.len = r->sse_used = 0; /* (what came and was not read is nobody's) */
  if (!r->done) {
    r->aborted = ABORT_CANCELED;
    request_finish(r, CURLE_ABORTED_BY_CALLBACK, ABORT_CANCELED);
  }
  return 0;
}

static int stream_index(lua_State *L) {
  http_req *r = check_stream(L, 1);
  const char *key = luaL_checkstring(L, 2);
  if (strcmp(key, "status") == 0) lua_pushinteger(L, r->status);
  else if (strcmp(key, "headers") == 0) push_header_table(L, r->head.data, r->head.len);
  else if (strcmp(key, "read") == 0) lua_pushcfunction(L, stream_read);
  else if (strcmp(key, "read_event") == 0) lua_pushcfunction(L, stream_read_event);
  else if (strcmp(key, "close") == 0) lua_pushcfunction(L, stream_close);
  else if (strcmp(key, "response") == 0) request_push_head(L, r);
  else lua_pushnil(L);
  return 1;
}

/* Collected or closed by `<close>`: abort a transfer nobody reads. */
static int stream_gc(lua_State *L) {
  http_stream *s = luaL_checkudata(L, 1, STREAM_MT);
  if (s->r) {
    http_req *r = s->r;
    s->r = NULL;
    /* Closed by `<close>` while another task waits to read it: that task is
     * woken (its read finds the stream closed). Left waiting, it never woke,
     * and its cancel later cleared the waiter of whichever request had been
     * given this one's recycled struct, which then never woke either. */
    if (r->waiter) {
      task *t = r->waiter;
      r->waiter = NULL;
      task_wake(t);
    }
    req_release(r);
  }
  return 0;
}

static const luaL_Reg stream_meta[] = {
  {"__index", stream_index}, {"__gc", stream_gc}, {"__close", stream_gc}, {NULL, NULL}};

void http_stream_register(lua_State *L) {
  luaL_newmetatable(L, STREAM_MT);
  luaL_setfuncs(L, stream_meta, 0);
  lua_pop(L, 1);
}
