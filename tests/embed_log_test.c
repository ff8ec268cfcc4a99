/*
 * embed_log_test.c: the host's log lines follow the program's stderr. A
 * program that sends its stderr elsewhere while it runs (a daemon that
 * detaches from its terminal, one that reopens its log file on SIGHUP with
 * dup2 or freopen) finds the host's lines there too, as its own. Prints TAP
 * lines; spec/run counts them.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "resil.h"
#include "tap.h"


static int log_line(resil_t *R, const char *msg) {
  char code[200];
  snprintf(code, sizeof code, "require('resil').log.info('%s')", msg);
  return resil_load_string(R, code, "=log") == RESIL_OK && resil_run(R) == RESIL_OK;
}

/* the text of a file, or of what a pipe holds now (its write end closed) */
static char *slurp_fd(int fd) {
  static char buf[1 << 16];
  size_t n = 0;
  ssize_t r;
  while (n < sizeof buf - 1 && (r = read(fd, buf + n, sizeof buf - 1 - n)) > 0) n += (size_t)r;
  buf[n] = '\0';
  return buf;
}

int main(void) {
  char dir[] = "/tmp/resil-embed-log-XXXXXX";
  if (!mkdtemp(dir)) return 2;
  char file_a[256], file_b[256];
  snprintf(file_a, sizeof file_a, "%s/a.log", dir);
  snprintf(file_b, sizeof file_b, "%s/b.log", dir);
  int saved = dup(2);

  /* stderr a pipe (a terminal's, a container runtime's, a supervisor's): the host writes it
   * without blocking, through a description of its own */
  int p[2];
  if (saved < 0 || pipe(p) != 0) return 2;
  dup2(p[1], 2);
  close(p[1]);
  resil_t *R = resil_open(NULL);
  if (!R) return 2;
  int logged = log_line(R, "to the pipe");

  /* the program sends its stderr to a file now */
  int fa = open(file_a, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
  dup2(fa, 2);
  close(fa);
  logged = log_line(R, "to the file") && logged;
  fprintf(stderr, "the program's own line\n");

  /* and to another pipe (a new log shipper) */
  int q[2];
  if (pipe(q) != 0) return 2;
  dup2(q[1], 2);
  close(q[1]);
  logged = log_line(R, "to the second pipe") && logged;
  resil_close(R);

  /* a freopen of stderr, as a program that reopens its log does */
  R = resil_open(NULL);
  if (!R) return 2;
  logged = log_line(R, "before the freopen") && logged;
  FILE *re = freopen(file_b, "a", stderr);
  logged = re && log_line(R, "after the freopen") && logged;
  resil_close(R);

  dup2(saved, 2);
  close(saved);
  check(logged, "the scripts that log ran");

  char *old_pipe = strdup(slurp_fd(p[0]));
  int a = open(file_a, O_RDONLY);
  char *in_a = strdup(slurp_fd(a));
  close(a);
  char *new_pipe = strdup(slurp_fd(q[0]));
  int b = open(file_b, O_RDONLY);
  char *in_b = strdup(slurp_fd(b));
  close(b);

  check(strstr(old_pipe, "\"msg\":\"to the pipe\"") != NULL, "a line logged while stderr is a pipe reaches the pipe");
  check(strstr(in_a, "\"msg\":\"to the file\"") != NULL && strstr(old_pipe, "to the file") == NULL,
        "after the program moves its stderr to a file (dup2), the host's lines go to that file, not the old pipe");
  check(strstr(in_a, "the program's own line") != NULL, "(the program's own line is there too)");
  check(strstr(new_pipe, "\"msg\":\"to the second pipe\"") != NULL && strstr(in_a, "to the second pipe") == NULL,
        "moved again to another pipe: the host's lines follow it");
  check(strstr(in_b, "\"msg\":\"after the freopen\"") != NULL,
        "after freopen(path, \"a\", stderr) the host's lines go to the file it opened");
  if (failures) printf("# old pipe: %s# file: %s# new pipe: %s# freopen file: %s", old_pipe, in_a, new_pipe, in_b);

  free(old_pipe);
  free(in_a);
  free(new_pipe);
  free(in_b);
  close(p[0]);
  close(q[0]);
  unlink(file_a);
  unlink(file_b);
  rmdir(dir);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
