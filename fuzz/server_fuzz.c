/*
 * server_fuzz.c: the embedded server's requests into Lua (src/server.c's
 * push_request: method, path, query, lower-cased headers, body, peer). The
 * input is written verbatim as a client's bytes to a resil.server on
 * loopback (libevent's evhttp parses them, as in production), whose handler
 * checks the request table it is given and answers. The client half-closes
 * and the loop turns until the server closes. libFuzzer; make fuzz / make check.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_host.h"

static resil_t *R;
static int port;

static const char code[] =
  "local resil = require 'resil'\n"
  "local methods = { GET = 1, POST = 1, HEAD = 1, PUT = 1, DELETE = 1, OPTIONS = 1, PATCH = 1, OTHER = 1 }\n"
  "local function check(req)\n"
  "  assert(methods[req.method], 'method')\n"
  "  assert(type(req.path) == 'string' and #req.path > 0, 'path')\n"
  "  assert(type(req.query) == 'string', 'query')\n"
  "  assert(type(req.body) == 'string', 'body')\n"
  "  assert(type(req.peer) == 'string' and req.peer:find('^127%.0%.0%.1:%d+$'), 'peer ' .. tostring(req.peer))\n"
  "  for k, v in pairs(req.headers) do\n"
  "    assert(type(k) == 'string' and not k:find('[A-Z]'), 'header name')\n"
  "    assert(type(v) == 'string', 'header value')\n"
  "  end\n"
  "end\n"
  "fuzz_failure = false\n"
  "fuzz_server = resil.server.listen({ handler = function(req)\n"
  "  local ok, err = pcall(check, req)\n"
  "  if not ok then fuzz_failure = err end\n"
  "  return { status = 200, body = req.body, headers = { ['x-path'] = req.path } }\n"
  "end })\n"
  "return fuzz_server:port() -- a global: the server lives as long as the process\n";

static void setup(void) {
  R = fuzz_host(code, 0);
  lua_State *L = resil_lua(R);
  port = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!R) setup();
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) abort();
  struct sockaddr_in sin = {0};
  sin.sin_family = AF_INET;
  sin.sin_port = htons((uint16_t)port);
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&sin, sizeof sin) != 0) abort(); /* loopback: the backlog takes it */
  /* loopback's socket buffer holds any input libFuzzer makes by default */
  if (size && send(fd, data, size, MSG_NOSIGNAL) != (ssize_t)size) abort();
  shutdown(fd, SHUT_WR);
  char sink[4096];
  for (int turn = 0; turn < 2000; turn++) { /* the server closes once it has answered or given up */
    resil_step(R, 1);
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 0) <= 0) continue;
    ssize_t n = recv(fd, sink, sizeof sink, 0);
    if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) break;
  }
  close(fd);
  lua_State *L = resil_lua(R);
  if (lua_getglobal(L, "fuzz_failure") == LUA_TSTRING) { /* the request table was wrong */
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
    abort();
  }
  lua_pop(L, 1);
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
