/*
 * http_fuzz.c: HTTP response heads and bodies into Lua values (src/http.c's
 * header callback, the lower-cased header table, the status, the response
 * and stream objects). Two paths per input, after its first byte (the
 * mode):
 *  - push_header_table over the bytes as raw header lines (the seam res.headers
 *    is built by), its invariants checked in C;
 *  - a real transfer: a loopback server on the host's own event base answers
 *    resil.http.request (mode even) or resil.http.stream (mode odd, read by
 *    events or by chunks) with the bytes verbatim, then closes.
 * libFuzzer; make fuzz / make check.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "fuzz_host.h"
#include "http.h"

static resil_t *R;
static struct evconnlistener *listener;
static const uint8_t *reply;
static size_t reply_len;

static const char code[] =
  "local resil = require 'resil'\n"
  "local function check_headers(h)\n"
  "  assert(type(h) == 'table')\n"
  "  for k, v in pairs(h) do\n"
  "    assert(type(k) == 'string' and #k > 0 and not k:find('[A-Z:]'), 'header name ' .. k)\n"
  "    assert(type(v) == 'string' and not v:find('^[ \\t]') and not v:find('[\\r \\t]$'), 'header value')\n"
  "  end\n"
  "end\n"
  "function fuzz_http(url, mode)\n"
  "  local req = { url = url, timeout = 10, max_body = 65536, max_event = 512 }\n"
  "  if mode % 2 == 0 then\n"
  "    local res, err = resil.http.request(req)\n"
  "    if not res then assert(type(err) == 'table' and type(err.kind) == 'string', 'err'); return end\n"
  "    assert(math.type(res.status) == 'integer' and res.status >= 100 and res.status <= 999, 'status ' .. res.status)\n"
  "    assert(type(res.body) == 'string', 'body')\n"
  "    check_headers(res.headers)\n"
  "    assert(res.headers == res.headers, 'headers built once')\n"
  "  else\n"
  "    local s <close>, err = resil.http.stream(req)\n"
  "    if not s then assert(type(err) == 'table' and type(err.kind) == 'string', 'stream err'); return end\n"
  "    assert(math.type(s.status) == 'integer', 'stream status')\n"
  "    check_headers(s.headers)\n"
  "    for _ = 1, 10000 do\n"
  "      local v, e\n"
  "      if mode % 4 == 1 then v, e = s:read_event() else v, e = s:read() end\n"
  "      if v == nil then assert(e == nil or type(e.kind) == 'string', 'read err'); break end\n"
  "      if mode % 4 == 1 then assert(type(v) == 'table' and type(v.data) == 'string', 'event')\n"
  "      else assert(type(v) == 'string', 'chunk') end\n"
  "    end\n"
  "  end\n"
  "end\n";

/* ---------- the loopback server: writes the input, then closes ---------- */

static void conn_write_cb(struct bufferevent *bev, void *arg) {
  (void)arg;
  shutdown(bufferevent_getfd(bev), SHUT_WR); /* all written: the end of the response */
}

static void conn_read_cb(struct bufferevent *bev, void *arg) {
  (void)arg;
  evbuffer_drain(bufferevent_get_input(bev), evbuffer_get_length(bufferevent_get_input(bev)));
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg) {
  (void)arg;
  if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) bufferevent_free(bev);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int len, void *arg) {
  (void)sa, (void)len, (void)arg;
  struct bufferevent *bev = bufferevent_socket_new(evconnlistener_get_base(l), fd, BEV_OPT_CLOSE_ON_FREE);
  if (!bev) abort();
  bufferevent_setcb(bev, conn_read_cb, conn_write_cb, conn_event_cb, NULL);
  bufferevent_enable(bev, EV_READ | EV_WRITE);
  if (reply_len) bufferevent_write(bev, reply, reply_len);
  else shutdown(fd, SHUT_WR);
}

static int setup(void) {
  R = fuzz_host(code, 0);
  lua_pop(resil_lua(R), 1); /* the code defines globals and returns nothing */
  struct sockaddr_in sin = {0};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  listener = evconnlistener_new_bind(resil_event_base(R), accept_cb, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                                     64, (struct sockaddr *)&sin, sizeof sin);
  if (!listener) abort();
  socklen_t slen = sizeof sin;
  getsockname(evconnlistener_get_fd(listener), (struct sockaddr *)&sin, &slen);
  return ntohs(sin.sin_port);
}

/* ---------- the header table seam ---------- */

static void check_header_table(const uint8_t *data, size_t size) {
  lua_State *L = resil_lua(R);
  int top = lua_gettop(L);
  push_header_table(L, (const char *)data, size);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    size_t klen, vlen;
    const char *k = lua_tolstring(L, -2, &klen), *v = lua_tolstring(L, -1, &vlen);
    if (!k || !v || klen == 0 || memchr(k, ':', klen) || memchr(k, '\n', klen)) abort();
    for (size_t i = 0; i < klen; i++)
      if (k[i] >= 'A' && k[i] <= 'Z') abort();
    if (memchr(v, '\n', vlen)) abort();
    if (vlen && (v[0] == ' ' || v[0] == '\t' || v[vlen - 1] == '\r' || v[vlen - 1] == ' ')) abort();
    lua_pop(L, 1);
  }
  lua_settop(L, top);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int port;
  if (!R) port = setup();
  if (size == 0) return 0;
  int mode = data[0];
  data++, size--;
  check_header_table(data, size);
  reply = data, reply_len = size;
  char args[96];
  snprintf(args, sizeof args, "[\"http://127.0.0.1:%d/fuzz\", %d]", port, mode);
  char *out = NULL;
  int rc = resil_call(R, "fuzz_http", args, &out);
  if (rc != RESIL_OK) { /* an assertion: the library raised or answered wrongly */
    fprintf(stderr, "%s\n", resil_error(R));
    abort();
  }
  free(out);
  lua_gc(resil_lua(R), LUA_GCSTEP, 0);
  return 0;
}
