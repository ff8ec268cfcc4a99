/*
 * headers_fuzz.c: the provider's rate-limit headers (src/bucket.c's
 * parsers: Retry-After as seconds or an HTTP date, retry-after-ms, OpenAI's
 * "6m0s" durations, Anthropic's RFC 3339 resets, remaining counts) through
 * bucket:observe and resil.retry_after. The input is the header values,
 * one per line. libFuzzer; make fuzz / make check.
 */
#include <stdint.h>

#include "fuzz_host.h"

static resil_t *R;
static int fn;

static const char code[] =
  "local resil = require 'resil'\n"
  "local names = { 'retry-after', 'retry-after-ms', 'x-ratelimit-remaining-requests',\n"
  "  'x-ratelimit-reset-requests', 'anthropic-ratelimit-requests-remaining',\n"
  "  'anthropic-ratelimit-requests-reset', 'x-ratelimit-remaining-tokens', 'x-ratelimit-reset-tokens' }\n"
  "local n = 0\n"
  "return function(input)\n"
  "  local headers, i = {}, 0\n"
  "  for line in (input .. '\\n'):gmatch('([^\\n]*)\\n') do\n"
  "    i = i + 1\n"
  "    if not names[i] then break end\n"
  "    headers[names[i]] = line\n"
  "  end\n"
  "  n = n + 1\n"
  "  local b = resil.bucket('fuzz' .. n % 4, { rate = 10, per = 1, unit = 'requests' })\n"
  "  local paused = b:observe(headers)\n"
  "  assert(type(paused) == 'number')\n"
  "  local after = resil.retry_after(headers)\n"
  "  assert(after == nil or type(after) == 'number')\n"
  "  b:try(1)\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!R) fn = fuzz_setup(&R, code);
  fuzz_call(R, fn, data, size);
  return 0;
}
