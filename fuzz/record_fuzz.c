/*
 * record_fuzz.c: store records read back (a step's or a once key's stored
 * results) into Lua values. A record the store did not write, from a
 * corrupt file or a hand-edited key, must be refused with a reason, never
 * raise inside the library or crash. libFuzzer; make fuzz / make check.
 */
#include <stdint.h>

#include "fuzz_host.h"

static resil_t *R;
static int fn;

static const char code[] =
  "local decode = require('resil.store').decode_values\n"
  "return function(input)\n"
  "  local ok, values, why = pcall(decode, input)\n"
  "  assert(ok, 'decode_values raised: ' .. tostring(values))\n"
  "  assert(values ~= nil or type(why) == 'string', 'a refusal gives its reason')\n"
  "  if values then assert(math.type(values.n) == 'integer' and values.n >= 0) end\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!R) fn = fuzz_setup(&R, code);
  lua_State *L = resil_lua(R);
  lua_rawgeti(L, LUA_REGISTRYINDEX, fn);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) { /* an assertion: the library raised or answered wrongly */
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
    abort();
  }
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
