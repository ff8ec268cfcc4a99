/*
 * redact_fuzz.c: src/redact.c over hostile text: registered secrets found as
 * they are and through JSON and URL escapes (one backslash or more, %25XX),
 * credential query parameters, URL user information. Whatever the bytes, the
 * text redacted holds no registered secret as it is. libFuzzer; make fuzz /
 * make check.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>

#include "fuzz_host.h"
#include "host.h"

static resil_t *R;
static const char *const secrets[] = {"sk-proj-Ab3/x+Y=", " key with spaces\n", "cl\xc3\xa9-s\xc3\xa8" "cret-1",
                                      "\\u0073-esc%41pe", NULL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!R) {
    R = fuzz_host("return nil", 1);
    for (int i = 0; secrets[i]; i++)
      if (redact_add(R, secrets[i], strlen(secrets[i])) < 0) abort();
  }
  for (int what = REDACT_SECRETS; what <= REDACT_ALL; what++) {
    char *out = NULL;
    size_t n = 0;
    int r = redact_text(R, (const char *)data, size, what, &out, &n);
    if (r < 0) continue; /* (no memory) */
    const char *text = r ? out : (const char *)data;
    size_t len = r ? n : size;
    if (r && strlen(out) != n && !memchr(data, 0, size)) abort(); /* NUL-terminated at its length */
    if (what & REDACT_SECRETS)
      for (int i = 0; secrets[i]; i++)
        if (memmem(text, len, secrets[i], strlen(secrets[i]))) abort(); /* a secret left as it is */
    free(out);
  }
  return 0;
}
