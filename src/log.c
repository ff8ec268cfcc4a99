/*
 * log.c: structured logs as JSON lines.
 *
 *   {"ts":"2026-11-26T22:30:00.123Z","level":"info","msg":"...","task":3,...}
 *
 * Every line carries the running task's context (resil.context{...}, which
 * spawned tasks inherit) and the caller's fields; each key appears once: a
 * field named like a key the logger writes (ts, level, msg, task, a context
 * field) is renamed field_<name>. Values of sensitive keys (authorization,
 * x-api-key, ...) are redacted on a copy, never in the caller's tables, and
 * every string goes through the host's redaction (redact.c: registered
 * secrets, credential query parameters). State lives in a userdata upvalue,
 * so two hosts in one process log independently.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "host.h"

#define LOG_MT "resil.Log"
#define LOG_REGISTRY_KEY "resil.log.functions"
#define LOG_BARE_KEY "resil.log.bare"

#define MAX_DEPTH 6

enum { LEVEL_DEBUG, LEVEL_INFO, LEVEL_WARN, LEVEL_ERROR, LEVEL_OFF };
static const char *const level_names[] = {"debug", "info", "warn", "error", "off", NULL};

/* A line written here (write_line), into a buffer of LINE_MOST bytes: a longer one goes through
 * json.encode */
#define LINE_MOST 16384
typedef struct line_buf {
  char text[LINE_MOST];
  size_t len;
} line_buf;

typedef struct {
  FILE *out;
  int owns_out;
  int level;
  log_sink *sink;  /* stderr written without blocking (log_sink.c); NULL: fwrite */
  int sink_tried;  /* log_sink_open asked for this output */
  dev_t out_dev;   /* what stderr's fd named then: a program that moves its stderr (dup2, freopen) */
  ino_t out_ino;   /* has the host's lines follow it, as its own do */
  char *path;      /* the log file's path (resil.log.output) */
  int follow;      /* a regular file: opened again when the path names another file */
  dev_t dev;       /* the file out writes */
  ino_t ino;
  unsigned long dropped; /* lines the log file could not take (its disk full), not yet said in it */
  int failing;     /* said on stderr that lines are dropped; said again once they were written again */
  time_t ts_second; /* the second ts_text says (line_timestamp) */
  char ts_text[32];
  struct line_buf *line; /* write_line's, made at its first line */
} log_state;

/* logrotate renames the log file (or someone deletes it) and expects the next line at the path: the
 * host wrote on into the renamed or deleted file for the rest of its life (a deleted one's space
 * never freed, the new file never made). Before each line the path is looked at (a stat, as
 * Python's WatchedFileHandler does) and opened again when it no longer names the file written.
 * A path that cannot be opened (its folder gone) leaves the lines where they went. */
static void follow_path(log_state *st) {
  if (!st->follow || !st->owns_out) return;
  struct stat now;
  if (stat(st->path, &now) == 0 && now.st_dev == st->dev && now.st_ino == st->ino) return;
  FILE *f = log_sink_open_file(st->path);
  if (!f) return;
  if (fstat(fileno(f), &now) != 0 || !S_ISREG(now.st_mode)) { /* (a FIFO put there: not followed) */
    fclose(f);
    return;
  }
  fclose(st->out);
  st->out = f;
  st->dev = now.st_dev;
  st->ino = now.st_ino;
}

static const char *const sensitive_keys[] = {
  "authorization", "proxy-authorization", "x-api-key", "api-key", "api_key", "apikey", "password",
  "secret", "access_token", "refresh_token", "cookie", "set-cookie", "x-goog-api-key", "xi-api-key",
  "x-auth-token", "ocp-apim-subscription-key", NULL};

/* 1: one of these names; 2: a name error reports redact (error.c's rule: private_key,
 * client_secret, x-vault-token, a passphrase; a log line printed what an uncaught table's report
 * redacted), whose value is redacted unless a number or a boolean (a per_token price is no
 * token); 0: neither */
static int is_sensitive(const char *key) {
  size_t len = strlen(key);
  if (len < 4) return 0; /* (auth is the shortest) */
  for (int i = 0; sensitive_keys[i]; i++)
    if (strlen(sensitive_keys[i]) == len && strcasecmp(key, sensitive_keys[i]) == 0) return 1;
  return resil_sensitive_field(key, len) ? 2 : 0;
}

/* Whether the value at value, under the name at idx, is written redacted: is_sensitive of the
 * name, remembered per name in a table of the registry: a line's
 * dozen names, each searched for a dozen words, cost a third of the line. At most
 * SENSITIVE_CACHED names are remembered (a table of a client's own keys logged must not grow
 * it without end); its count is kept at [1]. */
#define SENSITIVE_CACHED 2048
static const char sensitive_cache_key = 0;
/* L stack: -> the cache (made at first use) */
static void push_sensitive_cache(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &sensitive_cache_key) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_createtable(L, 1, 64);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &sensitive_cache_key);
}
/* is_sensitive of the string at idx, through the cache at cache */
static int sensitive_code(lua_State *L, int cache, int idx) {
  idx = lua_absindex(L, idx);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, cache) == LUA_TNUMBER) {
    int known = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return known;
  }
  lua_pop(L, 1);
  int r = is_sensitive(lua_tostring(L, idx));
  lua_Integer n = (lua_rawgeti(L, cache, 1), lua_tointeger(L, -1));
  lua_pop(L, 1);
  if (n < SENSITIVE_CACHED) {
    lua_pushvalue(L, idx);
    lua_pushinteger(L, r);
    lua_rawset(L, cache);
    lua_pushinteger(L, n + 1);
    lua_rawseti(L, cache, 1);
  }
  return r;
}
static int is_sensitive_at(lua_State *L, int idx, int value) {
  idx = lua_absindex(L, idx);
  value = lua_absindex(L, value);
  int plain = lua_type(L, value) == LUA_TNUMBER || lua_type(L, value) == LUA_TBOOLEAN;
  push_sensitive_cache(L);
  int r = sensitive_code(L, lua_gettop(L), idx);
  lua_pop(L, 1);
  return r == 1 || (r == 2 && !plain);
}

/* A line's field names as written (renamed if reserved, redacted, valid UTF-8), remembered per
 * name in a table of the registry: a line's dozen names, each checked and redacted on every line,
 * were a third of an access line (whether a name's value is redacted: the cache above). Made again
 * when the redacted secrets change (their count: they are only ever added) and once it holds
 * CLEAN_CACHED names (a client's own table of keys logged must not grow it without end); its
 * count at [1], the secrets' count it was made with at [2]. A name longer than CLEAN_CACHED_LEN
 * is worked out each time. */
#define CLEAN_CACHED 1024
#define CLEAN_CACHED_LEN 128
static const char names_cache_key = 0;
static void redact_string(lua_State *L);
/* L stack: -> the names table */
static void push_names_cache(lua_State *L) {
  lua_Integer secrets = (lua_Integer)resil_from_lua(L)->nsecrets;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &names_cache_key) == LUA_TTABLE) {
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    int kept = lua_tointeger(L, -1) == secrets && lua_tointeger(L, -2) < CLEAN_CACHED;
    lua_pop(L, 2);
    if (kept) return;
  }
  lua_pop(L, 1);
  lua_createtable(L, 2, 64);
  lua_pushinteger(L, 0);
  lua_rawseti(L, -2, 1);
  lua_pushinteger(L, secrets);
  lua_rawseti(L, -2, 2);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &names_cache_key);
}

/* upvalues: 1 log state, 2 json encode (resil.json's: exact) */
#define STATE_UPVALUE lua_upvalueindex(1)
#define ENCODE_UPVALUE lua_upvalueindex(2)

/* L stack: string -> redacted string, valid UTF-8 (a byte that is not part of a character as
 * U+FFFD: cjson copies such bytes as they are, and a line with them is not JSON; a reader that
 * decodes UTF-8 first, Python's json, serde_json in Vector, refused the whole line) */
static void redact_string(lua_State *L) {
  redact_push(L, -1, REDACT_ALL);
  lua_replace(L, -2);
  utf8_push_valid(L, -1, NULL);
  lua_replace(L, -2);
}

/* L stack: value -> redacted copy of value, one JSON can hold: cjson raises
 * on NaN, an infinity or a key that is neither string nor number, and a log
 * call must not fail the task that makes it (a rate over zero calls) */
static void redact_value(lua_State *L, int depth) {
  int type = lua_type(L, -1);
  if (type == LUA_TSTRING) {
    redact_string(L);
    return;
  }
  if (type == LUA_TNUMBER && !lua_isinteger(L, -1)) {
    lua_Number n = lua_tonumber(L, -1);
    if (n != n || n == HUGE_VAL || n == -HUGE_VAL) {
      lua_pushstring(L, n != n ? "NaN" : n > 0 ? "Infinity" : "-Infinity");
      lua_replace(L, -2);
    }
    return;
  }
  if (type != LUA_TTABLE) {
    if (type == LUA_TFUNCTION || type == LUA_TTHREAD || type == LUA_TUSERDATA) {
      if (luaL_callmeta(L, -1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) {
        lua_replace(L, -2);
        redact_string(L);
        return;
      }
      lua_pushstring(L, luaL_typename(L, -1));
      lua_replace(L, -2);
    }
    return;
  }
  if (depth >= MAX_DEPTH) {
    lua_pop(L, 1);
    lua_pushliteral(L, "[...]");
    return;
  }
  luaL_checkstack(L, 4, "log fields too deep");
  lua_newtable(L);
  lua_pushnil(L);
  /* L stack: src, copy, key */
  while (lua_next(L, -3)) {
    if (lua_type(L, -2) == LUA_TSTRING && is_sensitive_at(L, -2, -1)) {
      lua_pop(L, 1);
      lua_pushliteral(L, REDACT_MARK);
    } else {
      redact_value(L, depth + 1);
    }
    /* L stack: src, copy, key, value; a key can hold a secret too */
    lua_pushvalue(L, -2);
    if (lua_type(L, -1) != LUA_TSTRING && !lua_isinteger(L, -1)) {
      luaL_tolstring(L, -1, NULL); /* true, inf, a table's address: as text */
      lua_replace(L, -2);
    }
    if (lua_type(L, -1) == LUA_TSTRING) redact_string(L);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  lua_replace(L, -2);
}

static void format_timestamp(char *buf, size_t len) {
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(buf + n, len - n, ".%03dZ", (int)(ts.tv_nsec / 1000000));
}

/* format_timestamp for a line: the date and time formatted once a second
 * (strftime was a tenth of a line's cost), the milliseconds each time */
static void line_timestamp(log_state *st, char ts[40]) {
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  if (now.tv_sec != st->ts_second || !st->ts_text[0]) {
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    if (!strftime(st->ts_text, sizeof st->ts_text, "%Y-%m-%dT%H:%M:%S", &tm)) st->ts_text[0] = '\0';
    st->ts_second = now.tv_sec;
  }
  int ms = (int)(now.tv_nsec / 1000000);
  size_t n = strlen(st->ts_text);
  memcpy(ts, st->ts_text, n);
  ts[n] = '.', ts[n + 1] = (char)('0' + ms / 100), ts[n + 2] = (char)('0' + ms / 10 % 10);
  ts[n + 3] = (char)('0' + ms % 10), ts[n + 4] = 'Z', ts[n + 5] = '\0';
}

/* Append cjson's output without its "\/" escapes: URLs stay readable in
 * logs, and "/" needs no escape in JSON. An escaped backslash ("\\") is
 * copied whole, so "\\/" keeps its meaning. */
static void add_json(luaL_Buffer *b, const char *s, size_t len) {
  const char *end = s + len, *slash;
  while ((slash = memchr(s, '\\', (size_t)(end - s))) && slash + 1 < end) {
    luaL_addlstring(b, s, (size_t)(slash - s) + (slash[1] != '/')); /* up to it, and it unless before "/" */
    luaL_addchar(b, slash[1]);
    s = slash + 2;
  }
  luaL_addlstring(b, s, (size_t)(end - s));
}

/* -> bytes of p written to fd, and errno set when not all */
static size_t write_all(int fd, const char *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, p + done, n - done);
    if (w > 0) done += (size_t)w;
    else if (w < 0 && errno == EINTR) continue;
    else {
      if (w == 0) errno = ENOSPC;
      break;
    }
  }
  return done;
}

/* A log file its disk cannot take a line in (ENOSPC, EDQUOT, EFBIG): stdio wrote the part that fit
 * and the next line that fitted went on from it, one line no JSON reader takes, and nothing said
 * the lines were lost. A line is written with one write; the part of one that fit is cut off again
 * when it is still the file's end (the file is shared by a gateway's workers); the line is counted
 * dropped, said once on stderr, and the count is written as a warn line once lines fit again. */
static void write_file(log_state *st, const char *line, size_t n) {
  int fd = fileno(st->out);
  size_t done = write_all(fd, line, n);
  if (done == n) {
    if (st->dropped) {
      char ts[40], say[256];
      format_timestamp(ts, sizeof ts);
      int k = snprintf(say, sizeof say, "{\"ts\":\"%s\",\"level\":\"warn\",\"msg\":\"log lines dropped: the log "
                       "file could not be written\",\"dropped\":%lu}\n", ts, st->dropped);
      if (write_all(fd, say, (size_t)k) == (size_t)k) {
        st->dropped = 0;
        st->failing = 0;
      }
    }
    return;
  }
  int err = errno;
  struct stat fs;
  char *tail = done > 0 ? malloc(done) : NULL;
  char self[64];
  snprintf(self, sizeof self, "/proc/self/fd/%d", fd); /* (out is write-only: read through a description of its own) */
  int rd = tail && fstat(fd, &fs) == 0 && S_ISREG(fs.st_mode) && (size_t)fs.st_size >= done
               ? open(self, O_RDONLY | O_CLOEXEC) : -1;
  /* (a cut that fails leaves the part, and the next line is written after it) */
  if (rd >= 0 && pread(rd, tail, done, fs.st_size - (off_t)done) == (ssize_t)done && memcmp(tail, line, done) == 0)
    (void)!ftruncate(fd, fs.st_size - (off_t)done);
  if (rd >= 0) close(rd);
  free(tail);
  st->dropped++;
  if (!st->failing) {
    st->failing = 1;
    fprintf(stderr, "resil-lua: log file %s: %s: log lines are dropped (and counted) until it takes them again\n",
            st->path ? st->path : "?", strerror(err));
  }
}

/* A line's text and fields written as JSON here, byte for byte as resil.json.encode writes them
 * and add_json then takes "\/" back: two encodes of a line (its message, its fields) were half
 * its cost, some 40k instructions of a gateway's access line. Fields that hold a table (a nested
 * value) go through json.encode as before. */
static const char *const CONTROL_ESCAPES[32] = {
  "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007",
  "\\b",     "\\t",     "\\n",     "\\u000b", "\\f",     "\\r",     "\\u000e", "\\u000f",
  "\\u0010", "\\u0011", "\\u0012", "\\u0013", "\\u0014", "\\u0015", "\\u0016", "\\u0017",
  "\\u0018", "\\u0019", "\\u001a", "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f"};

static int put(line_buf *o, const char *s, size_t n) {
  if (n > LINE_MOST - o->len) return 0;
  memcpy(o->text + o->len, s, n);
  o->len += n;
  return 1;
}

/* s escaped as cjson escapes a string (controls, '"', '\\', DEL), '/' left as it is, in one pass:
 * the runs between escapes copied whole -> 0 when it does not fit */
static int put_text(line_buf *o, const char *s, size_t n) {
  size_t run = 0; /* where the bytes written as they are begin */
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    const char *esc = c < 32 ? CONTROL_ESCAPES[c] : c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == 127 ? "\\u007f" : NULL;
    if (esc) {
      if (!(put(o, s + run, i - run) && put(o, esc, strlen(esc)))) return 0;
      run = i + 1;
    }
  }
  return put(o, s + run, n - run);
}

/* the flat value at idx (a string, a number, a boolean) as JSON -> 0 when it is not one (a
 * table) or does not fit */
static int put_value(lua_State *L, int idx, line_buf *o) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING: {
    size_t n;
    const char *v = lua_tolstring(L, idx, &n);
    return put(o, "\"", 1) && put_text(o, v, n) && put(o, "\"", 1);
  }
  case LUA_TNUMBER: {
    char buf[32];
    return put(o, buf, json_number_text(L, idx, buf));
  }
  case LUA_TBOOLEAN: return lua_toboolean(L, idx) ? put(o, "true", 4) : put(o, "false", 5);
  default: return 0;
  }
}

/* The fields table at idx as JSON object members, each ',"key":value', in lua_next's order (as
 * cjson walks it) -> 0 when a value is not flat or the line does not fit. Its keys are strings
 * (merge_into made them so). */
static int put_fields(lua_State *L, int idx, line_buf *o) {
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    size_t kn;
    const char *k = lua_tolstring(L, -2, &kn);
    if (!(put(o, ",\"", 2) && put_text(o, k, kn) && put(o, "\":", 2) && put_value(L, -1, o))) {
      lua_pop(L, 2);
      return 0;
    }
    lua_pop(L, 1);
  }
  return 1;
}

/* L stack: merged fields table -> nothing; writes one line */
static void write_line(lua_State *L, log_state *st, int level, const char *msg, size_t msg_len) {
  char ts[40];
  line_timestamp(st, ts);
  int fields = lua_gettop(L);
  lua_pushlstring(L, msg, msg_len); /* whole: a NUL in it cut the message short */
  redact_string(L);
  size_t text_len;
  const char *text = lua_tolstring(L, -1, &text_len);
  /* (the state's buffer: nothing in the writing runs Lua, no line is made inside another) */
  if (!st->line) st->line = malloc(sizeof *st->line);
  line_buf *o = st->line;
  int flat = o != NULL;
  if (flat) {
    o->len = 0;
    flat = put(o, "{\"ts\":\"", 7) && put(o, ts, strlen(ts)) && put(o, "\",\"level\":\"", 11) &&
           put(o, level_names[level], strlen(level_names[level])) && put(o, "\",\"msg\":\"", 9) &&
           put_text(o, text, text_len) && put(o, "\"", 1) && put_fields(L, fields, o) && put(o, "}\n", 2);
  }
  if (flat) {
    lua_pushnil(L); /* L stack: fields, text, nil, line: as many as the encodes leave */
    lua_pushlstring(L, o->text, o->len);
  } else {
    lua_pushvalue(L, ENCODE_UPVALUE);
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    size_t msg_json_len;
    const char *msg_json = lua_tolstring(L, -1, &msg_json_len);

    lua_pushvalue(L, ENCODE_UPVALUE);
    lua_pushvalue(L, fields);
    lua_call(L, 1, 1);
    size_t rest_len;
    const char *rest = lua_tolstring(L, -1, &rest_len);

    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "{\"ts\":\"");
    luaL_addstring(&b, ts);
    luaL_addstring(&b, "\",\"level\":\"");
    luaL_addstring(&b, level_names[level]);
    luaL_addstring(&b, "\",\"msg\":");
    add_json(&b, msg_json, msg_json_len);
    if (rest_len > 2) { /* "{...}" -> ",..." */
      luaL_addchar(&b, ',');
      add_json(&b, rest + 1, rest_len - 1);
    } else {
      luaL_addchar(&b, '}');
    }
    luaL_addchar(&b, '\n');
    luaL_pushresult(&b);
  }
  size_t line_len;
  const char *line = lua_tolstring(L, -1, &line_len);
  resil_t *R = resil_from_lua(L);
  if (R->log_fn) {
    lua_pushlstring(L, line, line_len - 1); /* without the newline */
    R->log_fn(R->log_ud, lua_tostring(L, -1));
    lua_pop(L, 1);
  } else {
    /* stderr only: stdout is print()'s too, whose buffered text must stay ahead of a line */
    /* (or a FIFO given as the log file: its reader may stall as stderr's) */
    follow_path(st);
    struct stat fs;
    if (st->sink_tried && st->out == stderr &&
        (fstat(fileno(stderr), &fs) != 0 || fs.st_dev != st->out_dev || fs.st_ino != st->out_ino)) {
      /* the program sent its stderr elsewhere (a daemon leaving its terminal, a log reopened on
       * SIGHUP): the sink's description of its own, or a socket's fd now another file, still
       * wrote the old one, and the host's lines never reached the new */
      log_sink_abandon(st->sink);
      st->sink = NULL;
      st->sink_tried = 0;
    }
    if (!st->sink_tried && (st->out == stderr || st->owns_out)) {
      st->sink = log_sink_open(fileno(st->out), R->base);
      if (fstat(fileno(st->out), &fs) == 0) st->out_dev = fs.st_dev, st->out_ino = fs.st_ino;
    }
    st->sink_tried = 1;
    if (st->sink) {
      log_sink_write(st->sink, line, line_len);
    } else if (st->owns_out) {
      write_file(st, line, line_len);
    } else {
      fwrite(line, 1, line_len, st->out);
      fflush(st->out);
    }
  }
  lua_pop(L, 4);
}

/* the keys every line has; fields of these names become field_<name> */
static int is_reserved(const char *key) {
  return strcmp(key, "ts") == 0 || strcmp(key, "level") == 0 || strcmp(key, "msg") == 0 || strcmp(key, "task") == 0;
}

/* How many fields src holds: dst is made that size at once (grown a field at
 * a time, a line of 15 fields was rehashed five times) */
static int field_count(lua_State *L, int src) {
  int n = 0;
  lua_pushnil(L);
  while (lua_next(L, src)) {
    lua_pop(L, 1);
    n++;
  }
  return n;
}

/* Copy src's fields into dst, redacted as they are copied (a table's are
 * copied, never changed: they are the caller's). A field named like a
 * reserved key, or like a key of the context table ctx (0: none), is renamed
 * field_<name>; numeric keys become strings, so the line stays one JSON
 * object; any other key that is not a string is written as its text. The
 * value of a key named like a credential is REDACT_MARK. The context's keys
 * that start with "_" (is_context) are left out: its own bookkeeping. */
static void merge_into(lua_State *L, int src, int dst, int ctx, int is_context) {
  luaL_checkstack(L, 8, "log fields");
  push_names_cache(L);
  push_sensitive_cache(L);
  int names = lua_gettop(L) - 1, codes = names + 1;
  lua_pushnil(L);
  while (lua_next(L, src)) {
    /* L stack: key, value */
    const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (key && is_context && key[0] == '_') { /* the context's own bookkeeping (a step's place in its run): not written */
      lua_pop(L, 1);
      continue;
    }
    int clash = 0;
    if (key && ctx && !is_reserved(key)) {
      clash = lua_getfield(L, ctx, key) != LUA_TNIL;
      lua_pop(L, 1);
    }
    int code;
    if (key && !clash) {
      lua_pushvalue(L, -2);
      if (lua_rawget(L, names) != LUA_TSTRING) {
        lua_pop(L, 1);
        if (is_reserved(key)) lua_pushfstring(L, "field_%s", key);
        else lua_pushvalue(L, -2);
        redact_string(L); /* a key can hold a secret too */
        if (lua_rawlen(L, -3) <= CLEAN_CACHED_LEN) {
          lua_pushvalue(L, -3);
          lua_pushvalue(L, -2);
          lua_rawset(L, names);
          lua_rawgeti(L, names, 1);
          lua_pushinteger(L, lua_tointeger(L, -1) + 1);
          lua_rawseti(L, names, 1);
          lua_pop(L, 1);
        }
      }
      code = sensitive_code(L, codes, -3); /* (a reserved name's is its own: none is a credential's) */
    } else { /* a name the context has too, a number, or another value as its text: worked out each time */
      lua_pushvalue(L, -2);
      if (lua_type(L, -1) == LUA_TNUMBER) lua_tostring(L, -1); /* converts the copy, not the key next() needs */
      if (lua_type(L, -1) == LUA_TSTRING) {
        const char *name = lua_tostring(L, -1);
        int renamed = clash; /* (a number's text may be the context's too) */
        if (!renamed && ctx) {
          renamed = lua_getfield(L, ctx, name) != LUA_TNIL;
          lua_pop(L, 1);
        }
        if (renamed) {
          lua_pushfstring(L, "field_%s", name);
          lua_replace(L, -2);
        }
        code = is_sensitive(lua_tostring(L, -1));
      } else {
        luaL_tolstring(L, -1, NULL); /* true, a table's address: as text */
        lua_replace(L, -2);
        code = 0;
      }
      redact_string(L); /* a key can hold a secret too */
    }
    /* L stack: key, value, new key */
    int plain = lua_type(L, -2) == LUA_TNUMBER || lua_type(L, -2) == LUA_TBOOLEAN;
    if (code == 1 || (code == 2 && !plain)) {
      lua_pushliteral(L, REDACT_MARK);
    } else {
      lua_pushvalue(L, -2);
      redact_value(L, 1);
    }
    lua_rawset(L, dst);
    lua_pop(L, 1);
  }
  lua_pop(L, 2);
}

static int log_at(lua_State *L, int level) {
  log_state *st = lua_touserdata(L, STATE_UPVALUE);
  if (level < st->level) return 0;
  size_t msg_len;
  const char *msg = luaL_checklstring(L, 1, &msg_len);
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  task *t = task_running(L);
  int has_ctx = t && task_context_ref(t) != LUA_NOREF; /* LUA_NOREF: no context yet */
  if (has_ctx) lua_rawgeti(L, LUA_REGISTRYINDEX, task_context_ref(t));
  else lua_pushnil(L);
  /* 3: the context (or nil), 4: the line's fields, merged and redacted */
  lua_createtable(L, 0, (has_ctx ? field_count(L, 3) : 0) + (lua_istable(L, 2) ? field_count(L, 2) : 0) + 1);
  if (has_ctx) merge_into(L, 3, 4, 0, 1);
  if (lua_istable(L, 2)) merge_into(L, 2, 4, has_ctx ? 3 : 0, 0);
  if (t) {
    lua_pushinteger(L, task_id(t));
    lua_setfield(L, 4, "task");
  }
  write_line(L, st, level, msg, msg_len);
  return 0;
}

/* L stack: fields table -> nothing. A line through resil.log (so with the
 * task's context, redaction and the chosen output) from C code; never raises. */
/* C's way to log through resil.log: the log table is kept in the registry
 * when the module opens, so no require from C. Pops the fields table. */
void host_log(lua_State *L, const char *level, const char *msg) {
  int fields = lua_gettop(L);
  if (lua_getfield(L, LUA_REGISTRYINDEX, LOG_REGISTRY_KEY) == LUA_TTABLE && lua_getfield(L, -1, level) == LUA_TFUNCTION) {
    lua_pushstring(L, msg);
    lua_pushvalue(L, fields);
    lua_pcall(L, 2, 0, 0); /* a log line that cannot be written is dropped, never raised */
  }
  lua_settop(L, fields - 1);
}

/* (level, msg, fields): a line without the running task's context (the host's own report about
 * another task, from a finalizer that may run inside any task) */
static int log_bare(lua_State *L) {
  log_state *st = lua_touserdata(L, STATE_UPVALUE);
  int level = luaL_checkoption(L, 1, NULL, level_names);
  size_t msg_len;
  const char *msg = luaL_checklstring(L, 2, &msg_len);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (level < st->level) return 0;
  lua_settop(L, 3);
  redact_value(L, 0);
  write_line(L, st, level, msg, msg_len);
  return 0;
}

/* L stack: fields table -> nothing. When the host's lines go where the program chose
 * (resil_options.log or log_file, resil.log.output) rather than stderr, the line is written
 * there, without a task's context (at the level in force), -> 1; else nothing is written -> 0,
 * and the caller says it on stderr its own way. Never raises. */
int host_log_elsewhere(lua_State *L, const char *level, const char *msg) {
  int fields = lua_gettop(L), elsewhere = 0;
  if (lua_getfield(L, LUA_REGISTRYINDEX, LOG_BARE_KEY) == LUA_TFUNCTION && lua_getupvalue(L, -1, 1)) {
    log_state *st = lua_touserdata(L, -1);
    lua_pop(L, 1);
    elsewhere = st && (resil_from_lua(L)->log_fn || st->out != stderr);
    if (elsewhere) {
      lua_pushstring(L, level);
      lua_pushstring(L, msg);
      lua_pushvalue(L, fields);
      lua_pcall(L, 3, 0, 0); /* a log line that cannot be written is dropped, never raised */
    }
  }
  lua_settop(L, fields - 1);
  return elsewhere;
}

/* Lua's warnings (lua_warning): the error a __gc finalizer raised, which Lua catches to go on
 * collecting ("error in __gc (file:line: message)"), and a script's warn(). Without a warn
 * function Lua drops them: a finalizer that raised (one that was to release a hold, close a
 * file, write a row) failed without a word. Said in the log, from a thread of the log's own:
 * the one that ran the finalizer is inside a collection step. Pieces are joined up to the
 * buffer's size. */
static void host_warn(void *ud, const char *msg, int tocont) {
  resil_t *R = ud;
  size_t used = strlen(R->warning);
  /* a control message: "@off" silences a script's warnings until "@on", as Lua's manual has it */
  if (!used && !tocont && msg[0] == '@') {
    if (strcmp(msg, "@off") == 0) R->warnings_off = 1;
    else if (strcmp(msg, "@on") == 0) R->warnings_off = 0;
    return;
  }
  snprintf(R->warning + used, sizeof R->warning - used, "%s", msg);
  if (tocont) return;
  char text[sizeof R->warning];
  memcpy(text, R->warning, sizeof text);
  R->warning[0] = '\0'; /* (the log line may run a finalizer that warns again) */
  lua_State *W = R->warn_L;
  if (!W || !lua_checkstack(W, 4)) return;
  static const char gc[] = "error in __gc";
  const char *detail = strncmp(text, gc, sizeof gc - 1) == 0 ? strstr(text, " (") : NULL;
  if (!detail && R->warnings_off) return;
  lua_createtable(W, 0, 1);
  if (detail) { /* its message, without Lua's "error in __gc (...)" around it */
    size_t len = strlen(detail + 2);
    lua_pushlstring(W, detail + 2, len && detail[2 + len - 1] == ')' ? len - 1 : len);
    lua_setfield(W, -2, "error");
    host_log(W, "error", "a __gc finalizer raised an error; what it had left to do was not done");
  } else {
    host_log(W, "warn", text);
  }
}

void log_warnings_init(resil_t *R) {
  R->warn_L = lua_newthread(R->L);
  luaL_ref(R->L, LUA_REGISTRYINDEX); /* (kept until the state closes) */
  lua_setwarnf(R->L, host_warn, R);
}

static int log_debug(lua_State *L) { return log_at(L, LEVEL_DEBUG); }
static int log_info(lua_State *L) { return log_at(L, LEVEL_INFO); }
static int log_warn(lua_State *L) { return log_at(L, LEVEL_WARN); }
static int log_error(lua_State *L) { return log_at(L, LEVEL_ERROR); }

/* resil.log.level([name]) -> the level in force (after setting it) */
static int log_level(lua_State *L) {
  log_state *st = lua_touserdata(L, STATE_UPVALUE);
  if (!lua_isnoneornil(L, 1)) st->level = luaL_checkoption(L, 1, NULL, level_names);
  lua_pushstring(L, level_names[st->level]);
  return 1;
}

static void close_output(log_state *st) {
  log_sink_close(st->sink);
  st->sink = NULL;
  st->sink_tried = 0;
  if (st->owns_out && st->out) fclose(st->out);
  st->out = stderr;
  st->owns_out = 0;
  free(st->path);
  st->path = NULL;
  st->follow = 0;
  st->dropped = 0;
  st->failing = 0;
}

/* resil.log.output("stderr" | "stdout" | path): lines are appended to path */
static int log_output(lua_State *L) {
  log_state *st = lua_touserdata(L, STATE_UPVALUE);
  const char *where = luaL_checkstring(L, 1);
  if (strcmp(where, "stderr") == 0 || strcmp(where, "stdout") == 0) {
    resil_from_lua(L)->log_fn = NULL; /* the script's choice wins over resil_options.log */
    close_output(st);
    st->out = where[3] == 'e' ? stderr : stdout;
    lua_pushboolean(L, 1);
    return 1;
  }
  /* under the sandbox a log file is a file the script writes, as io.open's: it made one, 0644, and
   * appended lines of its choosing to one, anywhere the process may write */
  if (!sandbox_plain_file_ok(resil_from_lua(L), where))
    return luaL_error(L, "resil.log.output: %s %s", where, sandbox_is_store_file(resil_from_lua(L), where)
                      ? "is the host's own store: a sandboxed script writes it only through resil.store"
                      : "is outside the folders the sandbox may write in (resil_options.sandbox_dirs)");
  FILE *f = log_sink_open_file(where);
  if (!f) return resil_error_result(L, "io", "resil.log.output: cannot open %s: %s", where, log_file_error(errno));
  resil_from_lua(L)->log_fn = NULL; /* (a path refused or not opened leaves the lines where they went) */
  close_output(st);
  st->out = f;
  st->owns_out = 1;
  struct stat fs;
  /* (absolute: the path is looked at again before each line, and a relative one looked at after the
   * program changed its working directory, a daemon's chdir("/"), moved the lines to a new file there) */
  char cwd[PATH_MAX];
  if (where[0] != '/' && getcwd(cwd, sizeof cwd)) {
    size_t len = strlen(cwd) + 1 + strlen(where) + 1;
    if ((st->path = malloc(len))) snprintf(st->path, len, "%s%s%s", cwd, strcmp(cwd, "/") == 0 ? "" : "/", where);
  } else {
    st->path = strdup(where); /* (no memory for it: not followed, "?" in an error) */
  }
  if (st->path && fstat(fileno(f), &fs) == 0 && S_ISREG(fs.st_mode)) {
    st->follow = 1;
    st->dev = fs.st_dev;
    st->ino = fs.st_ino;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* resil.log.redact(value): register value as a secret, as resil.secret does:
 * the host never prints it again (logs, errors, metrics) */
static int log_redact(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (len < REDACT_MIN_SECRET)
    return luaL_argerror(L, 1, lua_pushfstring(L, "a secret shorter than %d bytes cannot be redacted safely",
                                               REDACT_MIN_SECRET));
  if (redact_add(resil_from_lua(L), s, len) < 0) return luaL_error(L, "not enough memory to register a secret");
  return 0;
}

static int log_state_gc(lua_State *L) {
  log_state *st = luaL_checkudata(L, 1, LOG_MT);
  close_output(st);
  free(st->line);
  st->line = NULL;
  return 0;
}

static const luaL_Reg log_functions[] = {{"debug", log_debug},   {"info", log_info},     {"warn", log_warn},
                                         {"error", log_error},   {"level", log_level},   {"output", log_output},
                                         {"redact", log_redact}, {NULL, NULL}};

int luaopen_resil_log(lua_State *L) {
  luaL_newlibtable(L, log_functions);
  log_state *st = lua_newuserdatauv(L, sizeof *st, 0);
  st->out = stderr;
  st->owns_out = 0;
  st->level = LEVEL_INFO;
  st->sink = NULL;
  st->sink_tried = 0;
  st->path = NULL;
  st->follow = 0;
  st->dropped = 0;
  st->failing = 0;
  st->ts_second = 0;
  st->ts_text[0] = '\0';
  st->line = NULL;
  if (luaL_newmetatable(L, LOG_MT)) {
    lua_pushcfunction(L, log_state_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  /* resil.json's encode, not cjson's: cjson writes %.14g, and an id or a count past 14 digits
   * (1234567890123456789) was logged as another number (1.2345678901235e+18) */
  luaopen_resil_json(L);
  lua_getfield(L, -1, "encode");
  lua_remove(L, -2);
  lua_pushvalue(L, -2);
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, log_bare, 2);
  lua_setfield(L, LUA_REGISTRYINDEX, LOG_BARE_KEY); /* for host_log_elsewhere */
  luaL_setfuncs(L, log_functions, 2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, LOG_REGISTRY_KEY); /* for host_log */
  return 1;
}
