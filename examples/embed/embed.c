/*
 * embed.c: resil-lua inside a C program. It loads a policy
 * (policies/answer.lua, which uses the shipped policy library), calls it
 * with resil_call against the mock provider, calls it from two threads with
 * a host each, and reloads it on SIGHUP.
 *
 *   make && ./embed [policies-dir] [--wait-for-sighup]
 *
 * Build: examples/embed/Makefile, pkg-config only.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <resil.h>

static const char *policies = "policies";

/* a host with the mock provider running in its loop; the mock's URL in url, as JSON text */
static resil_t *open_host(char *url, size_t url_len) {
  resil_options opts = {0};
  opts.policies_dir = policies;
  opts.log_level = "warn";
  resil_t *R = resil_open(&opts);
  if (!R) return NULL;
  char *out = NULL;
  if (resil_load_string(R, "mock = require('resil').mock.start({ seed = 1 })\n"
                           "function mock_url() return mock.url end\n", "=setup") != RESIL_OK ||
      resil_run(R) != RESIL_OK || resil_call(R, "mock_url", NULL, &out) != RESIL_OK) {
    fprintf(stderr, "embed: setup: %s\n", resil_error(R));
    resil_close(R);
    return NULL;
  }
  /* out is ["http:\/\/127.0.0.1:port"] (JSON may escape a slash): url keeps
   * the element as JSON text, "http:\/\/...", for the arguments of calls */
  snprintf(url, url_len, "%.*s", (int)strlen(out) - 2, out + 1);
  free(out);
  return R;
}

/* s as a JSON string into out (cap bytes): a question is the user's text,
 * and one with a quote, a backslash or a newline pasted into "[\"%s\"]" as it
 * is made bad JSON (RESIL_ERR_USAGE) or arguments of its own. -> 0, or -1 if
 * it does not fit */
static int json_string(char *out, size_t cap, const char *s) {
  size_t n = 0;
  if (cap < 3) return -1;
  out[n++] = '"';
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    char esc[8];
    if (c == '"' || c == '\\') snprintf(esc, sizeof esc, "\\%c", c);
    else if (c < 0x20) snprintf(esc, sizeof esc, "\\u%04x", c);
    else esc[0] = (char)c, esc[1] = '\0';
    size_t len = strlen(esc);
    if (n + len + 2 > cap) return -1;
    memcpy(out + n, esc, len);
    n += len;
  }
  out[n++] = '"';
  out[n] = '\0';
  return 0;
}

/* policies.answer.ask(url, question) -> 0 and prints the answer, or -1 (url: JSON text) */
static int ask(resil_t *R, const char *url, const char *who, const char *question) {
  char args[1024], question_json[600];
  if (json_string(question_json, sizeof question_json, question) != 0) return -1;
  snprintf(args, sizeof args, "[%s, %s]", url, question_json);
  char *result = NULL;
  int status = resil_call(R, "policies.answer.ask", args, &result);
  if (status != RESIL_OK) {
    fprintf(stderr, "embed: %s: %s\n", who, resil_error(R));
    return -1;
  }
  printf("%s: %s\n", who, result); /* ["Mock reply to: ...", version] */
  free(result);
  return 0;
}

static void *worker(void *arg) {
  const char *name = arg;
  char url[256];
  resil_t *R = open_host(url, sizeof url);
  long failed = R == NULL;
  for (int i = 0; R && i < 3; i++) {
    char question[64];
    snprintf(question, sizeof question, "%s question %d", name, i + 1);
    if (ask(R, url, name, question) != 0) failed++;
  }
  resil_close(R);
  return (void *)failed;
}

static int policy_version(resil_t *R) {
  char *out = NULL;
  int version = -1;
  if (resil_call(R, "policies.answer.current_version", NULL, &out) == RESIL_OK) version = atoi(out + 1);
  else fprintf(stderr, "embed: %s\n", resil_error(R));
  free(out);
  return version;
}

int main(int argc, char **argv) {
  int wait_for_sighup = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--wait-for-sighup") == 0) wait_for_sighup = 1;
    else policies = argv[i];
  }
  setvbuf(stdout, NULL, _IOLBF, 0);

  char url[256];
  resil_t *R = open_host(url, sizeof url);
  if (!R || ask(R, url, "main", "hello") != 0 || ask(R, url, "main", "a \"quoted\" one,\nwith a \\") != 0) return 1;

  /* two threads, a host each: no locking, no shared state */
  pthread_t threads[2];
  char *names[2] = {"thread-1", "thread-2"};
  for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, worker, names[i]);
  long failed = 0;
  for (int i = 0; i < 2; i++) {
    void *r;
    pthread_join(threads[i], &r);
    failed += (long)r;
  }
  if (failed) return 1;

  if (wait_for_sighup) {
    /* SIGHUP is handled in the host's loop: let it run a turn at a time */
    resil_reload_on_sighup(R);
    int before = policy_version(R);
    printf("policy version %d; waiting for SIGHUP\n", before);
    for (int i = 0; i < 300 && policy_version(R) == before; i++) resil_step(R, 100);
    printf("policy version %d after reload\n", policy_version(R));
    if (ask(R, url, "main", "after reload") != 0) return 1;
  }
  resil_close(R);
  return 0;
}
