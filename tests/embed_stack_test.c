/*
 * embed_stack_test.c: a host on a thread with the smallest stack the README
 * allows (64 KiB), given hostile JSON: arguments nested far past the limit,
 * at it, a result nested past it, a body decoded inside a task, a table that
 * holds itself. Each is refused with an error saying what and where, never a
 * crash. Prints TAP lines; spec/run counts them.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resil.h"
#include "tap.h"

/* The README's smallest thread stack. A sanitizer's build spends several times as much a frame
 * on the host's own functions (not on Lua's or cjson's): its thread gets more, the rest is the same. */
#if defined(__SANITIZE_ADDRESS__)
#define STACK_BYTES ((size_t)256 << 10)
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define STACK_BYTES ((size_t)256 << 10)
#endif
#endif
#ifndef STACK_BYTES
#define STACK_BYTES ((size_t)64 << 10)
#endif

#define LIMIT 200 /* the README's: JSON nested deeper is refused */

static int contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

/* "[" x depth, "]" x depth: malloc'd */
static char *nested(int depth) {
  char *s = malloc((size_t)depth * 2 + 1);
  if (!s) exit(2);
  memset(s, '[', (size_t)depth);
  memset(s + depth, ']', (size_t)depth);
  s[depth * 2] = '\0';
  return s;
}

static void *run(void *arg) {
  (void)arg;
  resil_options o = {0};
  o.log_level = "off";
  resil_t *R = resil_open(&o);
  if (!R || resil_load_string(R,
                              "local resil = require 'resil'\n"
                              "function id(...) return ... end\n"
                              "function nest(n) local t = {} for _ = 2, n do t = { t } end return t end\n"
                              "function decode(s) local v, err = resil.json.decode(s) return v ~= nil, tostring(err) end\n"
                              "function cycle() local t = {} t[1] = t return resil.json.encode(t) end\n",
                              "=setup") != RESIL_OK ||
      resil_run(R) != RESIL_OK) {
    check(0, "a host opens and loads on a 64 KiB thread");
    return NULL;
  }
  char *out = NULL;

  /* (before: cjson recursed 1000 levels deep, some 100 bytes a level: the thread's stack overflowed) */
  char *deep = nested(999);
  int status = resil_call(R, "id", deep, &out);
  check(status == RESIL_ERR_USAGE && out == NULL, "json_args nested 999 deep: RESIL_ERR_USAGE, nothing ran");
  check(contains(resil_error(R), "resil_call: json_args:") && contains(resil_error(R), "more than 200 levels") &&
            contains(resil_error(R), "at character 201"),
        "its error says what (nested more than 200 levels) and where (the character)");
  free(out), out = NULL;

  char *at_limit = nested(LIMIT);
  status = resil_call(R, "id", at_limit, &out);
  check(status == RESIL_OK && out && strcmp(out, at_limit) == 0, "json_args nested 200 deep (the limit) is called, and comes back whole");
  free(out), out = NULL;

  status = resil_call(R, "nest", "[201]", &out);
  check(status == RESIL_ERR_SCRIPT && contains(resil_error(R), "nest (setup:3) returned what JSON cannot hold") &&
            contains(resil_error(R), "nesting"),
        "a result nested past the limit is RESIL_ERR_SCRIPT, naming the function and why");
  free(out), out = NULL;

  /* the same bytes from outside inside a task (a provider's body): nil, err */
  char args[4096];
  snprintf(args, sizeof args, "[\"%s\"]", deep);
  status = resil_call(R, "decode", args, &out);
  check(status == RESIL_OK && out && contains(out, "false") && contains(out, "more than 200 levels"),
        "resil.json.decode of a body nested 999 deep in a task: nil, err saying so");
  free(out), out = NULL;

  status = resil_call(R, "cycle", NULL, &out);
  check(status == RESIL_ERR_SCRIPT && contains(resil_error(R), "nesting"),
        "resil.json.encode of a table that holds itself: an error, not the stack's end");
  free(out), out = NULL;

  status = resil_call(R, "id", "[1, \"two\"]", &out);
  check(status == RESIL_OK && out && strcmp(out, "[1,\"two\"]") == 0, "the host still answers after all that");
  free(out);
  free(deep);
  free(at_limit);
  resil_close(R);
  return NULL;
}

int main(void) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  if (pthread_attr_setstacksize(&attr, STACK_BYTES) != 0) return 2;
  pthread_t thread;
  if (pthread_create(&thread, &attr, run, NULL) != 0) return 2;
  pthread_join(thread, NULL);
  pthread_attr_destroy(&attr);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
