/*
 * log_sink.c: where log lines go when that is stderr, without ever blocking
 * the loop.
 *
 * stderr is usually a pipe or a socket to something that reads it (a
 * terminal, journald, a container runtime, `| tee`). When that reader stalls,
 * a blocking write stops the whole process: a gateway with 64 KB of warnings
 * unread stopped answering, /health included, until the reader woke up. So
 * the sink writes without blocking:
 *
 *   - a socket (journald's stdout stream): send() with MSG_DONTWAIT;
 *   - a pipe or a terminal: a description of its own, opened through
 *     /proc/self/fd with O_NONBLOCK (never the shared one: O_NONBLOCK there
 *     would change the shell's, and every child's, stderr);
 *   - anything else (a regular file, /dev/null, no /proc): written as before.
 *
 * What the reader does not take at once waits in order in a buffer (at most
 * PENDING_MAX bytes) and goes out when the fd is writable again (a libevent
 * event on the host's loop) or with the next line. Past the bound, whole
 * lines are dropped and counted; a line saying how many follows once the
 * reader catches up. Closing waits for the rest at most CLOSE_WAIT_MS.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "host.h"

#define PENDING_MAX (4u << 20) /* 4 MiB: minutes of warnings, never the process's memory */
#define CLOSE_WAIT_MS 1000

struct log_sink {
  int fd;      /* the fd written to (our own description for a pipe or a terminal) */
  int owns_fd; /* ours to close */
  int socket;  /* send() with MSG_DONTWAIT */
  char *pending;
  size_t len, cap;
  unsigned long dropped; /* whole lines, since the reader last caught up */
  struct event_base *base;
  struct event *writable;
};

log_sink *log_sink_open(int fd, struct event_base *base) {
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) return NULL;
  log_sink *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->base = base;
  if (S_ISSOCK(st.st_mode)) {
    s->fd = fd;
    s->socket = 1;
    return s;
  }
  int mode = fcntl(fd, F_GETFL);
  /* (a read-only fd is no output: with stderr closed at start, fd 2 is whatever the host opened first, the
   * read end of its own wake pipe, and a description reopened for writing sent the lines into that) */
  if (mode >= 0 && (mode & O_ACCMODE) != O_RDONLY && (S_ISFIFO(st.st_mode) || (S_ISCHR(st.st_mode) && isatty(fd)))) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int own = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (own >= 0) {
      s->fd = own;
      s->owns_fd = 1;
      return s;
    }
  }
  free(s); /* written as before, blocking */
  return NULL;
}

FILE *log_sink_open_file(const char *path) {
  int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC | O_NOCTTY, 0644);
  if (fd < 0) return NULL;
  struct stat st;
  /* (anything but a FIFO blocks as a file does: the lines of a log_sink go out without blocking for a FIFO) */
  if (fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  FILE *f = fdopen(fd, "a");
  if (!f) {
    int e = errno;
    close(fd);
    errno = e;
    return NULL;
  }
  setvbuf(f, NULL, _IOLBF, 0);
  return f;
}

const char *log_file_error(int err) {
  return err == ENXIO ? "it is a FIFO that no process reads" : strerror(err);
}

/* -> how many bytes of p went out (all of them if the reader is gone: a
 * line nobody can read is not kept) */
static size_t write_some(log_sink *s, const char *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = s->socket ? send(s->fd, p + done, n - done, MSG_DONTWAIT | MSG_NOSIGNAL)
                          : write(s->fd, p + done, n - done);
    if (w > 0) {
      done += (size_t)w;
    } else if (w < 0 && errno == EINTR) {
      continue;
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return done;
    } else {
      return n;
    }
  }
  return done;
}

/* write_some, a write at a time of whole lines that fit in PIPE_BUF: a write
 * that size to a pipe is all or nothing, so another writer to the same pipe
 * (another worker, the supervisor, io.stderr) never lands inside one of our
 * lines; a line longer than that is written on its own. -> bytes out */
static size_t write_lines(log_sink *s, const char *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    const char *q = p + done;
    size_t left = n - done, end = 0;
    while (end < left) {
      const char *nl = memchr(q + end, '\n', left - end);
      size_t next = nl ? (size_t)(nl - q) + 1 : left;
      if (end && next > PIPE_BUF) break;
      end = next;
    }
    size_t out = write_some(s, q, end);
    done += out;
    if (out < end) break;
  }
  return done;
}

static int keep(log_sink *s, const char *p, size_t n) {
  if (s->len + n > s->cap) {
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < s->len + n) cap *= 2;
    char *grown = realloc(s->pending, cap);
    if (!grown) return -1;
    s->pending = grown;
    s->cap = cap;
  }
  memcpy(s->pending + s->len, p, n);
  s->len += n;
  return 0;
}

static void say_dropped(log_sink *s) {
  char ts[32], line[256];
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  int n = snprintf(line, sizeof line,
                   "{\"ts\":\"%s\",\"level\":\"warn\",\"msg\":\"log lines dropped: the log's reader did not keep "
                   "up\",\"dropped\":%lu}\n", ts, s->dropped);
  s->dropped = 0;
  size_t out = write_some(s, line, (size_t)n);
  if (out < (size_t)n) keep(s, line + out, (size_t)n - out);
}

static void arm(log_sink *s);

/* the pending bytes, as many as the reader takes now; once all are out,
 * the count of the lines dropped meanwhile */
static void send_pending(log_sink *s) {
  size_t out = write_lines(s, s->pending, s->len);
  memmove(s->pending, s->pending + out, s->len - out);
  s->len -= out;
  if (s->len == 0 && s->dropped) say_dropped(s);
}

static void flush_pending(log_sink *s) {
  if (s->len == 0) return;
  send_pending(s);
  if (s->len) arm(s);
}

static void on_writable(evutil_socket_t fd, short what, void *arg) {
  (void)fd, (void)what;
  flush_pending(arg);
}

/* wake up when the reader has room again (without a loop: with the next line) */
static void arm(log_sink *s) {
  if (!s->base) return;
  if (!s->writable) s->writable = event_new(s->base, s->fd, EV_WRITE, on_writable, s);
  if (s->writable && !event_pending(s->writable, EV_WRITE, NULL)) event_add(s->writable, NULL);
}

void log_sink_write(log_sink *s, const char *line, size_t n) {
  flush_pending(s);
  size_t out = s->len ? 0 : write_some(s, line, n);
  if (out == n) return;
  /* the rest of a line begun must follow it, whatever the bound: the next
   * line would otherwise be glued to half of it */
  if ((out == 0 && s->len + n > PENDING_MAX) || keep(s, line + out, n - out) != 0) {
    s->dropped++;
    return;
  }
  arm(s);
}

static void sink_close(log_sink *s, long wait_ms) {
  if (!s) return;
  if (s->writable) event_free(s->writable);
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) { /* a slow reader still gets the last lines (and the count of those dropped), a stalled one not for long */
    if (s->len == 0 && s->dropped) say_dropped(s);
    if (s->len == 0) break;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long left = wait_ms - (long)((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
    struct pollfd p = {.fd = s->fd, .events = POLLOUT};
    if (left < 0 || poll(&p, 1, (int)left) <= 0) break;
    send_pending(s);
  }
  if (s->owns_fd) close(s->fd);
  free(s->pending);
  free(s);
}

void log_sink_close(log_sink *s) { sink_close(s, CLOSE_WAIT_MS); }

/* (the program moved its stderr elsewhere: the old reader gets what it takes now, never a wait) */
void log_sink_abandon(log_sink *s) { sink_close(s, 0); }
