/*
 * sse.c: server-sent events framing, by the line rules of the event-stream
 * format (https://html.spec.whatwg.org/multipage/server-sent-events.html,
 * "Interpreting an event stream"). Fed the bytes of a stream as they come,
 * in reads of any size; each byte is looked at once, and only a line that
 * a read cuts in two is copied aside, so framing is linear in the stream
 * whatever its events' sizes.
 *
 * Lines end at CRLF, LF or CR; a CR that ends one read and an LF that
 * starts the next are one line end. An empty line dispatches the event
 * (nothing when it has no data line). The fields are data (lines joined by
 * LF), event, id (ignored when it holds a NUL) and retry (digits only);
 * a line starting with ':' is a comment; a UTF-8 byte order mark at the
 * start of the stream is dropped. What one event holds (its fields and the
 * line being assembled) is bounded, so a peer cannot make it grow without
 * end.
 */
#include <stdlib.h>
#include <string.h>

#include "host.h"

typedef struct {
  char *data;
  size_t len, cap;
} sse_buffer;

struct sse_parser {
  sse_buffer line;       /* a line cut by the end of a read */
  sse_buffer data, event, id, retry;
  size_t data_start;     /* where data begins in its buffer (see sse_line) */
  size_t data_lines;     /* data lines in this event: none means no dispatch */
  int has_event, has_id, has_retry;
  int after_cr;          /* the last read ended in CR: an LF starting the next is its pair */
  int first_line;        /* the stream's first line, which may start with a BOM */
  int dispatched;        /* the fields belong to an event already handed out */
  size_t max_event;
};

/* Buffers larger than this are given back once their event is out. */
#define SSE_KEEP_MAX (64u * 1024)

static int sse_reserve(sse_buffer *b, size_t extra) {
  if (b->len + extra <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  char *grown = realloc(b->data, cap);
  if (!grown) return -1;
  b->data = grown;
  b->cap = cap;
  return 0;
}

static int sse_append(sse_buffer *b, const char *s, size_t n) {
  if (n == 0) return 0;
  if (sse_reserve(b, n) != 0) return -1;
  memcpy(b->data + b->len, s, n);
  b->len += n;
  return 0;
}

static int sse_set(sse_buffer *b, const char *s, size_t n) {
  b->len = 0;
  return sse_append(b, s, n);
}

static void sse_buffer_trim(sse_buffer *b) {
  b->len = 0;
  if (b->cap > SSE_KEEP_MAX) {
    free(b->data);
    b->data = NULL;
    b->cap = 0;
  }
}

sse_parser *sse_new(size_t max_event) {
  sse_parser *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->first_line = 1;
  p->max_event = max_event;
  return p;
}

void sse_free(sse_parser *p) {
  if (!p) return;
  free(p->line.data);
  free(p->data.data);
  free(p->event.data);
  free(p->id.data);
  free(p->retry.data);
  free(p);
}

/* What the event being built holds, the line being assembled included. */
static size_t sse_held(const sse_parser *p) {
  return p->line.len + p->data.len + p->event.len + p->id.len + p->retry.len;
}

/* The fields of the event handed out last make way for the next one. */
static void sse_clear_event(sse_parser *p) {
  sse_buffer_trim(&p->data);
  p->data_start = 0;
  sse_buffer_trim(&p->event);
  sse_buffer_trim(&p->id);
  sse_buffer_trim(&p->retry);
  p->data_lines = 0;
  p->has_event = p->has_id = p->has_retry = 0;
  p->dispatched = 0;
}

static int field_is(const char *name, size_t n, const char *literal) {
  return n == strlen(literal) && memcmp(name, literal, n) == 0;
}

static int all_digits(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] < '0' || s[i] > '9') return 0;
  return 1;
}

/* One complete line, its end removed: in p->line (in_line) or in the read.
 * Returns 1 when it dispatches an event, 0 when not, or an SSE_ error. */
static int sse_line(sse_parser *p, const char *s, size_t n, int in_line) {
  if (p->first_line) {
    p->first_line = 0;
    if (n >= 3 && memcmp(s, "\xEF\xBB\xBF", 3) == 0) s += 3, n -= 3;
  }
  if (n == 0) {
    if (p->data_lines == 0) { /* no data: nothing to dispatch, the event's fields are dropped */
      sse_clear_event(p);
      return 0;
    }
    p->dispatched = 1;
    return 1;
  }
  if (s[0] == ':') return 0;
  const char *colon = memchr(s, ':', n);
  size_t name_len = colon ? (size_t)(colon - s) : n;
  const char *value = colon ? colon + 1 : s + n;
  size_t value_len = n - (size_t)(value - s);
  if (value_len > 0 && value[0] == ' ') value++, value_len--;
  /* the fields only: the line is on its way into one of them */
  size_t held = p->data.len + p->event.len + p->id.len + p->retry.len;
  sse_buffer *target = NULL;
  int *flag = NULL;
  if (field_is(s, name_len, "data")) {
    if (held + (p->data_lines > 0) + value_len > p->max_event) return SSE_TOO_LARGE;
    if (in_line && p->data_lines == 0) {
      /* the first data line, assembled across reads (a large event is
       * usually one such line): its buffer becomes the data, uncopied */
      sse_buffer swap = p->data;
      p->data = p->line;
      p->line = swap;
      p->data_start = (size_t)(value - p->data.data);
      p->data_lines = 1;
      return 0;
    }
    if (p->data_lines > 0 && sse_append(&p->data, "\n", 1) != 0) return SSE_NO_MEMORY;
    if (sse_append(&p->data, value, value_len) != 0) return SSE_NO_MEMORY;
    p->data_lines++;
    return 0;
  } else if (field_is(s, name_len, "event")) {
    target = &p->event, flag = &p->has_event;
  } else if (field_is(s, name_len, "id")) {
    if (memchr(value, '\0', value_len)) return 0;
    target = &p->id, flag = &p->has_id;
  } else if (field_is(s, name_len, "retry")) {
    if (!all_digits(value, value_len)) return 0;
    target = &p->retry, flag = &p->has_retry;
  } else {
    return 0;
  }
  if (held - target->len + value_len > p->max_event) return SSE_TOO_LARGE;
  if (sse_set(target, value, value_len) != 0) return SSE_NO_MEMORY;
  *flag = 1;
  return 0;
}

/* The first CR or LF in s[off..len), or len: eight bytes at a time (a
 * byte is CR or LF when it XORs to zero with one of them). */
static size_t line_end(const char *s, size_t off, size_t len) {
  const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
  while (len - off >= 8) {
    uint64_t x, lf, cr;
    memcpy(&x, s + off, 8);
    lf = x ^ (ones * '\n');
    cr = x ^ (ones * '\r');
    if ((((lf - ones) & ~lf) | ((cr - ones) & ~cr)) & highs) break;
    off += 8;
  }
  while (off < len && s[off] != '\n' && s[off] != '\r') off++;
  return off;
}

int sse_next(sse_parser *p, const char *bytes, size_t len, size_t *used, sse_event *ev) {
  if (p->dispatched) sse_clear_event(p);
  size_t off = *used;
  while (off < len) {
    if (p->after_cr) {
      p->after_cr = 0;
      if (bytes[off] == '\n') {
        off++;
        continue;
      }
    }
    size_t end = line_end(bytes, off, len);
    if (end == len) { /* the read ends inside a line: keep what it has so far */
      if (sse_held(p) + (len - off) > p->max_event) return *used = len, SSE_TOO_LARGE;
      if (sse_append(&p->line, bytes + off, len - off) != 0) return *used = len, SSE_NO_MEMORY;
      off = len;
      break;
    }
    int rc;
    if (p->line.len > 0) {
      if (sse_held(p) + (end - off) > p->max_event) return *used = len, SSE_TOO_LARGE;
      if (sse_append(&p->line, bytes + off, end - off) != 0) return *used = len, SSE_NO_MEMORY;
      rc = sse_line(p, p->line.data, p->line.len, 1);
      sse_buffer_trim(&p->line);
    } else {
      rc = sse_line(p, bytes + off, end - off, 0);
    }
    off = end + 1;
    if (bytes[end] == '\r') {
      if (off < len) {
        if (bytes[off] == '\n') off++;
      } else {
        p->after_cr = 1;
      }
    }
    if (rc < 0) return *used = len, rc;
    if (rc > 0) {
      *used = off;
      ev->data = p->data.data ? p->data.data + p->data_start : "";
      ev->data_len = p->data.len - p->data_start;
      ev->event = p->has_event ? (p->event.data ? p->event.data : "") : NULL;
      ev->event_len = p->event.len;
      ev->id = p->has_id ? (p->id.data ? p->id.data : "") : NULL;
      ev->id_len = p->id.len;
      ev->retry = p->has_retry ? p->retry.data : NULL;
      ev->retry_len = p->retry.len;
      return 1;
    }
  }
  *used = off;
  return 0;
}
