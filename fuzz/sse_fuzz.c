/*
 * sse_fuzz.c: server-sent events framing (src/sse.c) over any bytes, fed in
 * reads of sizes the input itself chooses (its first byte), as a stream
 * arrives. libFuzzer; make fuzz / make check.
 */
#include <stdint.h>
#include <string.h>

#include "host.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  size_t chunk = (size_t)(data[0] % 17) + 1;
  data++, size--;
  sse_parser *p = sse_new(4096);
  if (!p) return 0;
  for (size_t off = 0; off < size;) {
    size_t len = size - off < chunk ? size - off : chunk;
    size_t used = 0;
    sse_event ev;
    int r;
    while ((r = sse_next(p, (const char *)data + off, len, &used, &ev)) == 1) {
      /* every field handed out must be readable for its length */
      volatile size_t sum = 0;
      for (size_t i = 0; i < ev.data_len; i++) sum += (unsigned char)ev.data[i];
      if (ev.event) sum += ev.event_len ? (unsigned char)ev.event[ev.event_len - 1] : 0;
      if (ev.id) sum += ev.id_len ? (unsigned char)ev.id[ev.id_len - 1] : 0;
      if (ev.retry) sum += ev.retry_len ? (unsigned char)ev.retry[ev.retry_len - 1] : 0;
      (void)sum;
    }
    if (r < 0) break; /* too large: the parser is done with */
    off += len;
  }
  sse_free(p);
  return 0;
}
