/*
 * json_fuzz.c: JSON bodies into Lua values (resil.json.decode, the path
 * of every provider response and store record read back), and the values
 * back out (encode, decode again: the round trip keeps them). libFuzzer;
 * make fuzz / make check.
 */
#include <stdint.h>

#include "fuzz_host.h"

static resil_t *R;
static int fn;

static const char code[] =
  "local json = require('resil').json\n"
  "return function(input)\n"
  "  local v = json.decode(input)\n"
  "  if v == nil then return end\n"
  "  local ok, text = pcall(json.encode, v)\n"
  "  if not ok then return end -- a value JSON cannot hold again (a very sparse array, a huge depth)\n"
  "  local again = json.decode(text)\n"
  "  assert(again ~= nil, 'what encode wrote decodes again')\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!R) fn = fuzz_setup(&R, code);
  fuzz_call(R, fn, data, size);
  return 0;
}
