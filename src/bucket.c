/*
 * bucket.c: token buckets by name, with GCRA semantics.
 *
 * One stored value per bucket, the theoretical arrival time (TAT): taking n
 * tokens moves it n emission intervals (T = per / rate) past max(TAT, now),
 * and is allowed while it stays within burst * T of now. Times are integer
 * nanoseconds so that tables of expected values hold exactly.
 *
 * Waiters queue in FIFO order; one timer per bucket fires at the exact moment
 * the head of the queue can be served. Nothing polls.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>

#include "host.h"
#include "http.h" /* a response's headers, read from its raw lines */

#define BUCKET_MT "resil.Bucket"
#define REGISTRY "resil.buckets"
#define NS 1000000000.0
/* Virtual timers land on doubles; a request a microsecond early is on time. */
#define SLACK_NS 1000

typedef struct bucket bucket;
typedef struct waiter waiter;

struct waiter {
  bucket *b;
  task *t;
  double n;
  waiter *prev, *next;
  resil_timer timeout;
  int has_timeout;
  int outcome; /* 0 waiting, 1 served, 2 timed out */
  double retry_after;
};

struct bucket {
  resil_t *R;
  char name[64];
  char unit[16];       /* "requests" or "tokens": which provider headers apply */
  double rate, per, burst;
  int burst_given; /* else the burst follows the rate (a reload that lowers it lowers the burst too) */
  int64_t interval_ns; /* T */
  int64_t tat_ns;
  int64_t paused_until_ns;
  int64_t due_ns; /* when the armed timer was meant to fire */
  waiter *head, *tail;
  int waiting;
  lua_Integer waits, refusals; /* acquires that queued; that were refused (for metrics) */
  resil_timer timer;
};

/* The furthest ahead of now a TAT goes: a charge of what an answer says it
 * used (a provider's garbage count, 1e17 tokens) is a debt of years, not an
 * overflow of the integer nanoseconds that wraps into a full bucket. */
#define MAX_AHEAD_NS ((int64_t)1e18) /* about 31 years */

static int64_t now_ns(resil_t *R) { return (int64_t)llround(resil_now(R) * NS); }
static int64_t tokens_ns(const bucket *b, double n) {
  double ns = n * (double)b->interval_ns;
  return ns >= (double)MAX_AHEAD_NS ? MAX_AHEAD_NS : (int64_t)llround(ns);
}
static int64_t tolerance_ns(const bucket *b) { return tokens_ns(b, b->burst); }
/* The slack, less than half a token: at 1e7 a second a whole SLACK_NS was ten tokens past the
 * burst (and a remaining of burst + 1000 at 1e9) */
static int64_t slack_ns(const bucket *b) { return b->interval_ns / 2 < SLACK_NS ? b->interval_ns / 2 : SLACK_NS; }

/* Nanoseconds until n tokens can be taken (0: now). */
static int64_t wait_for(const bucket *b, double n, int64_t now) {
  int64_t start = b->tat_ns > now ? b->tat_ns : now;
  int64_t wait = start + tokens_ns(b, n) - now - tolerance_ns(b);
  if (b->paused_until_ns > now && b->paused_until_ns - now > wait) wait = b->paused_until_ns - now;
  return wait <= slack_ns(b) ? 0 : wait;
}

/* The wait for n tokens behind the queue's waiters up to `stop` (NULL: all
 * of them): FIFO, so they are served first. */
static int64_t wait_behind(const bucket *b, double n, int64_t now, const waiter *stop) {
  int64_t wait = wait_for(b, n, now);
  /* (saturating: a dozen waiters of a token a 1e9 s summed past int64 into a negative wait, and a
   * try behind them was granted at once) */
  for (const waiter *p = b->head; p && p != stop; p = p->next) {
    int64_t t = tokens_ns(b, p->n);
    wait = wait > INT64_MAX - t ? INT64_MAX : wait + t;
  }
  return wait;
}

static double remaining_at(const bucket *b, int64_t now) {
  int64_t start = b->tat_ns > now ? b->tat_ns : now;
  double r = floor((double)(now + tolerance_ns(b) - start + slack_ns(b)) / (double)b->interval_ns);
  return r < 0 ? 0 : r;
}

static void take(bucket *b, double n, int64_t now) {
  int64_t start = b->tat_ns > now ? b->tat_ns : now;
  int64_t ahead = start - now + tokens_ns(b, n);
  b->tat_ns = now + (ahead > MAX_AHEAD_NS ? MAX_AHEAD_NS : ahead);
}

/* whole token counts read as integers in Lua */
static void push_count(lua_State *L, double v) {
  if (v == floor(v) && fabs(v) < 9e15) lua_pushinteger(L, (lua_Integer)v);
  else lua_pushnumber(L, v);
}

/* ---------- the queue ---------- */

static void queue_remove(bucket *b, waiter *w) {
  if (w->prev) w->prev->next = w->next;
  else b->head = w->next;
  if (w->next) w->next->prev = w->prev;
  else b->tail = w->prev;
  w->prev = w->next = NULL;
  b->waiting--;
}

static void finish_waiter(waiter *w, int outcome) {
  if (w->has_timeout) timer_stop(&w->timeout);
  w->outcome = outcome;
  task_wake(w->t);
}

/* Serve the queue's head while tokens allow; else arm the timer for it.
 * Each waiter is admitted at its own conforming moment, even when the timer
 * fires late: a late wake-up must not lose tokens, or the admitted rate would
 * fall short of the configured one by the loop's timer latency. */
static void serve_from(bucket *b, int64_t clock) {
  timer_stop(&b->timer);
  int64_t now = now_ns(b->R);
  if (clock > now) clock = now;
  while (b->head) {
    waiter *w = b->head;
    int64_t wait = wait_for(b, w->n, clock);
    if (clock + wait > now) {
      b->due_ns = clock + wait;
      timer_start(&b->timer, (double)(b->due_ns - now) / NS);
      return;
    }
    clock += wait;
    take(b, w->n, clock);
    queue_remove(b, w);
    finish_waiter(w, 1);
  }
}

static void serve(bucket *b) { serve_from(b, now_ns(b->R)); }

static void bucket_timer_fired(void *arg) {
  bucket *b = arg;
  serve_from(b, b->due_ns);
}

static void waiter_timed_out(void *arg) {
  waiter *w = arg;
  bucket *b = w->b;
  /* its tokens due at its timeout's very moment (the bucket's timer, due then too, not yet run: two
   * timers of one deadline run in either order) are granted, not refused as 'available in 0.000 s' */
  serve(b);
  if (w->outcome == 1) return;
  w->retry_after = (double)wait_behind(b, w->n, now_ns(b->R), w) / NS;
  int was_head = b->head == w;
  queue_remove(b, w);
  finish_waiter(w, 2);
  if (was_head) serve(b);
}

static void waiter_canceled(void *arg) {
  waiter *w = arg;
  bucket *b = w->b;
  if (w->has_timeout) timer_free(&w->timeout);
  w->has_timeout = 0;
  int was_head = b->head == w;
  queue_remove(b, w);
  if (was_head) serve(b);
}

/* Woken and canceled before it resumed: served tokens go back (the TAT
 * moves back, as b:refund does), so the next waiter may be served now. */
static void waiter_give_back(void *arg) {
  waiter *w = arg;
  bucket *b = w->b;
  if (w->has_timeout) timer_free(&w->timeout);
  w->has_timeout = 0;
  if (w->outcome == 1) {
    w->outcome = 0;
    b->tat_ns -= tokens_ns(b, w->n);
    serve(b);
  }
}

static const task_wait_ops bucket_wait = {waiter_canceled, waiter_give_back, NULL};

/* ---------- options ---------- */

/* The methods hold the metatable as their upvalue: one compare, not
 * luaL_checkudata's lookup of the name in the registry (acquire and
 * observe run on every provider attempt). Others, and a wrong value, take
 * the checked path and its error. */
static bucket *check_bucket(lua_State *L, int idx) {
  bucket *b = lua_touserdata(L, idx);
  if (b && lua_getmetatable(L, idx)) {
    int ours = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
    if (ours) return b;
  }
  return luaL_checkudata(L, idx, BUCKET_MT);
}

static double opt_positive(lua_State *L, int idx, const char *bucket_name, const char *field, double dflt) {
  int type = lua_getfield(L, idx, field);
  double v = dflt;
  if (type != LUA_TNIL) {
    int isnum;
    v = lua_tonumberx(L, -1, &isnum);
    if (!isnum || !(v > 0) || isinf(v))
      resil_raise(L, "bucket '%s': %s must be a positive number, got %s", bucket_name, field,
                  luaL_tolstring(L, -1, NULL));
  }
  lua_pop(L, 1);
  return v;
}

static void configure(lua_State *L, bucket *b, int opts) {
  double rate = opt_positive(L, opts, b->name, "rate", b->rate);
  double per = opt_positive(L, opts, b->name, "per", b->per ? b->per : 1);
  if (!(rate > 0)) resil_raise(L, "bucket '%s': rate is required (tokens per `per` seconds)", b->name);
  /* T is whole nanoseconds up to MAX_AHEAD_NS: 1 per 1e12 s overflowed the integer (it wrapped
   * to 1 ns, a billion a second), and 3e9 a second was rounded to 1e9 */
  double interval_d = per / rate * NS;
  if (!(interval_d >= 1 && interval_d <= (double)MAX_AHEAD_NS))
    resil_raise(L, "bucket '%s': %g per %g s is out of range: from one token per %g s to %g tokens a second",
                b->name, rate, per, (double)MAX_AHEAD_NS / NS, NS);
  int burst_given = lua_getfield(L, opts, "burst") != LUA_TNIL || b->burst_given;
  lua_pop(L, 1);
  /* (a burst that follows the rate is one token at least: at 0.5 a second it was half a token, and
   * every acquire of one was refused, "can never be granted") */
  double burst = opt_positive(L, opts, b->name, "burst", b->burst_given ? b->burst : rate < 1 ? 1 : rate);
  /* (one that was no string, unit = 5, was taken as requests without a word) */
  int unit_type = lua_getfield(L, opts, "unit");
  if (unit_type != LUA_TNIL) {
    const char *unit = unit_type == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    if (!unit || (strcmp(unit, "requests") != 0 && strcmp(unit, "tokens") != 0))
      resil_raise(L, "bucket '%s': unit must be \"requests\" or \"tokens\", got %s", b->name,
                  luaL_tolstring(L, -1, NULL));
    snprintf(b->unit, sizeof b->unit, "%s", unit);
  }
  lua_pop(L, 1);
  int64_t interval = (int64_t)llround(interval_d);
  if (b->interval_ns && interval != b->interval_ns) {
    /* keep the fill level in tokens, not in time, across a rate change */
    int64_t now = now_ns(b->R);
    if (b->tat_ns > now) {
      /* (within MAX_AHEAD_NS: a debt of 1e9 s at a rate lowered a hundredfold overflowed, and wrapped
       * into a full bucket) */
      double ahead = (double)(b->tat_ns - now) / (double)b->interval_ns * (double)interval;
      b->tat_ns = now + (ahead >= (double)MAX_AHEAD_NS ? MAX_AHEAD_NS : (int64_t)llround(ahead));
    }
  }
  b->rate = rate;
  b->per = per;
  b->burst = burst;
  b->burst_given = burst_given; /* (once taken: one refused above leaves it following the rate) */
  b->interval_ns = interval;
  serve(b); /* a faster rate may serve waiters now */
}

/* resil.bucket(name [, opts]): the same bucket for the same name. */
static int l_bucket(lua_State *L) {
  lua_settop(L, 2);
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  if (len == 0 || len >= sizeof ((bucket *)0)->name) resil_raise(L, "bucket name must be 1 to 63 characters");
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REGISTRY);
  if (lua_getfield(L, -1, name) != LUA_TNIL) {
    if (lua_istable(L, 2)) configure(L, check_bucket(L, -1), 2);
    return 1;
  }
  lua_pop(L, 1);
  if (!lua_istable(L, 2)) resil_raise(L, "bucket '%s' does not exist yet: give its options {rate=, per=, burst=}", name);
  bucket *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  b->R = resil_from_lua(L);
  memcpy(b->name, name, len + 1);
  strcpy(b->unit, "requests");
  timer_init(b->R, &b->timer, bucket_timer_fired, b);
  luaL_setmetatable(L, BUCKET_MT);
  configure(L, b, 2);
  b->tat_ns = now_ns(b->R);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, name);
  return 1;
}

static double check_tokens(lua_State *L, int idx, bucket *b) {
  double n = luaL_optnumber(L, idx, 1);
  if (!(n >= 0) || isinf(n)) resil_raise(L, "bucket '%s': token count must be a non-negative number", b->name);
  return n;
}

static int push_limited(lua_State *L, bucket *b, double n, double retry_after) {
  b->refusals++;
  if (retry_after < 0) {
    resil_push_error(L, "rate_limited", "bucket '%s': %g tokens can never be granted (burst is %g)", b->name, n,
                     b->burst);
    /* (no wait cures it: a policies.retry loop retried it five times, 15 s of backoff before a fallback) */
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "retryable");
  } else {
    resil_push_error(L, "rate_limited", "bucket '%s': %g tokens available in %.3f s", b->name, n, retry_after);
    lua_pushnumber(L, retry_after);
    lua_setfield(L, -2, "retry_after");
  }
  lua_pushstring(L, b->name);
  lua_setfield(L, -2, "bucket");
  lua_pushnil(L);
  lua_insert(L, -2);
  return 2;
}

/* b:try(n) -> true, remaining | false, seconds_until_possible */
static int b_try(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  double n = check_tokens(L, 2, b);
  int64_t now = now_ns(b->R);
  if (n > b->burst) {
    lua_pushboolean(L, 0);
    lua_pushnumber(L, HUGE_VAL);
    return 2;
  }
  int64_t wait = wait_behind(b, n, now, NULL);
  if (b->head && wait == 0) wait = 1; /* waiters asking for 0 tokens still go first */
  if (wait > 0) {
    lua_pushboolean(L, 0);
    lua_pushnumber(L, (double)wait / NS);
    return 2;
  }
  take(b, n, now);
  lua_pushboolean(L, 1);
  push_count(L, remaining_at(b, now));
  return 2;
}

static int acquire_k(lua_State *L, int status, lua_KContext ctx) {
  waiter *w = (waiter *)ctx;
  bucket *b = w->b;
  if (w->has_timeout) timer_free(&w->timeout);
  w->has_timeout = 0;
  if (w->outcome == 1) {
    lua_pushboolean(L, 1);
    push_count(L, remaining_at(b, now_ns(b->R)));
    return 2;
  }
  return push_limited(L, b, w->n, w->retry_after);
}

/* b:acquire(n [, {timeout=}]) -> true, remaining | nil, err{kind="rate_limited"} */
static int b_acquire(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  double n = check_tokens(L, 2, b);
  double timeout = -1;
  /* (options that were no table, acquire(1, 5), were ignored: no timeout at all; a timeout that was
   * no number said "bad argument #-2 to 'acquire'") */
  if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
    resil_raise(L, "bucket '%s': acquire's options must be a table {timeout=}, got %s", b->name, luaL_typename(L, 3));
  if (lua_istable(L, 3) && lua_getfield(L, 3, "timeout") != LUA_TNIL) {
    timeout = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : -1;
    if (!(timeout >= 0)) resil_raise(L, "bucket '%s': timeout must be a non-negative number", b->name);
  }
  lua_settop(L, 2);
  if (n > b->burst) return push_limited(L, b, n, -1);
  int64_t now = now_ns(b->R);
  int64_t wait = wait_for(b, n, now);
  if (!b->head && wait == 0) {
    take(b, n, now);
    lua_pushboolean(L, 1);
    push_count(L, remaining_at(b, now));
    return 2;
  }
  wait = wait_behind(b, n, now, NULL);
  if (timeout >= 0 && (double)wait / NS > timeout) return push_limited(L, b, n, (double)wait / NS);
  task *t = task_current(L, "bucket:acquire");
  waiter *w = lua_newuserdatauv(L, sizeof *w, 0); /* anchored on the task's stack while it waits */
  memset(w, 0, sizeof *w);
  w->b = b;
  w->t = t;
  w->n = n;
  w->prev = b->tail;
  if (b->tail) b->tail->next = w;
  else b->head = w;
  b->tail = w;
  b->waiting++;
  b->waits++;
  if (timeout >= 0) {
    timer_init(b->R, &w->timeout, waiter_timed_out, w);
    w->has_timeout = 1;
    timer_start(&w->timeout, timeout);
  }
  task_wait(t, &bucket_wait, w);
  if (b->head == w) serve(b);
  return lua_yieldk(L, 0, (lua_KContext)w, acquire_k);
}

/* b:refund(n) -> remaining: give back tokens taken for an estimate that was
 * too high. The TAT goes back no further than now: a bucket is full there,
 * and more given back than was taken grants nothing past the burst. */
static int b_refund(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  double n = check_tokens(L, 2, b);
  int64_t now = now_ns(b->R);
  int64_t back = tokens_ns(b, n);
  b->tat_ns = b->tat_ns - now > back ? b->tat_ns - back : now;
  serve(b);
  push_count(L, remaining_at(b, now_ns(b->R)));
  return 1;
}

/* b:charge(n) -> remaining: take tokens without waiting (usage above the
 * estimate); may leave the bucket in debt, which later callers wait out. */
static int b_charge(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  double n = check_tokens(L, 2, b);
  take(b, n, now_ns(b->R));
  push_count(L, remaining_at(b, now_ns(b->R)));
  return 1;
}

/* ---------- provider headers ---------- */

/* A provider's word on waiting is believed up to a day: a larger one (or a
 * garbled one) must not park the bucket for good, nor overflow the clock's
 * integer nanoseconds (headers_fuzz found "1e300"). */
#define MAX_PAUSE_S 86400.0

/* OpenAI's durations: "6m0s", "1.5s", "20ms", "1h2m3s"; also plain seconds. */
static int parse_duration(const char *s, double *out) {
  char *end;
  double total = 0;
  int parts = 0;
  while (*s) {
    double v = strtod(s, &end);
    if (end == s) return 0;
    s = end;
    if (strncmp(s, "ms", 2) == 0) v /= 1000, s += 2;
    else if (*s == 'h') v *= 3600, s++;
    else if (*s == 'm') v *= 60, s++;
    else if (*s == 's') s++;
    else if (*s != '\0') return 0;
    total += v;
    parts++;
  }
  if (!isfinite(total)) return 0; /* "1e309s", "nan": not a duration */
  *out = total;
  return parts > 0;
}

/* Anthropic's resets: RFC 3339 timestamps, e.g. "2025-01-01T00:00:30Z". */
static int parse_rfc3339(const char *s, double *seconds_from_now) {
  struct tm tm;
  memset(&tm, 0, sizeof tm);
  const char *rest = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
  if (!rest) return 0;
  double frac = 0;
  if (*rest == '.') {
    char *after;
    frac = strtod(rest, &after);
    rest = after;
  }
  time_t at = timegm(&tm);
  if (*rest == '+' || *rest == '-') {
    int hh = 0, mm = 0;
    if (sscanf(rest + 1, "%d:%d", &hh, &mm) != 2) return 0;
    long off = hh * 3600L + mm * 60L;
    at -= *rest == '+' ? off : -off;
  } else if (*rest != 'Z' && *rest != 'z') {
    return 0;
  }
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  *seconds_from_now = (double)at + frac - ((double)now.tv_sec + now.tv_nsec / NS);
  return 1;
}

/* Retry-After: delta seconds or an HTTP date. */
static int parse_retry_after(const char *s, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (end != s && *end == '\0') {
    *out = v;
    return isfinite(v); /* "1e309", "nan", "inf": not a number of seconds */
  }
  time_t at = curl_getdate(s, NULL);
  if (at == -1) return 0;
  *out = difftime(at, time(NULL));
  if (*out < 0) *out = 0; /* a date already past: come back now */
  return 1;
}

static const char *header(lua_State *L, int headers, const char *name) {
  lua_getfield(L, headers, name);
  const char *v = lua_tostring(L, -1);
  lua_pop(L, 1); /* the string stays alive in the headers table */
  return v;
}

static void pause_for(bucket *b, double seconds) {
  if (!(seconds > 0)) return;
  if (seconds > MAX_PAUSE_S) seconds = MAX_PAUSE_S;
  int64_t until = now_ns(b->R) + (int64_t)llround(seconds * NS);
  if (until > b->paused_until_ns) b->paused_until_ns = until;
  serve(b);
}

/* What a provider's headers say of one limit (the header names of its
 * unit): seconds to pause (retry-after; an exhausted limit's reset, 0: none)
 * and, unless exhausted with a reset, how many it has left. Read by the local
 * bucket's observe and, through limit_headers, by a shared one's. */
typedef struct {
  double pause;
  int have_remaining;
  double remaining;
} limit_view;

/* the header whose name is the string at stack index `name` | NULL */
static const char *header_at(lua_State *L, int headers, int name) {
  lua_pushvalue(L, name);
  lua_gettable(L, headers);
  const char *v = lua_tostring(L, -1);
  lua_pop(L, 1); /* the string stays alive in the headers table */
  return v;
}

/* The names read_limit looks up, for a unit (requests, tokens), in this
 * order. A headers table is read by them as Lua strings made once
 * (b:observe keeps them with the metatable: a lookup by a C string makes
 * Lua find its string anew each time, ~370 instructions); a response's raw
 * header lines by these. */
enum { LIMIT_RETRY_AFTER, LIMIT_REMAINING, LIMIT_RESET, LIMIT_ANTHROPIC_REMAINING, LIMIT_ANTHROPIC_RESET, LIMIT_NAMES };
static const char *const limit_names[2][LIMIT_NAMES] = {
  {"retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
   "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"},
  {"retry-after", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "anthropic-ratelimit-tokens-remaining",
   "anthropic-ratelimit-tokens-reset"}};
static int unit_index(const char *unit) { return strcmp(unit, "tokens") == 0; }
static void push_limit_names(lua_State *L, int unit) {
  for (int i = 0; i < LIMIT_NAMES; i++) lua_pushstring(L, limit_names[unit][i]);
}

/* Where read_limit finds the headers: a headers table (headers: its stack
 * index, names: the index of the first of the LIMIT_NAMES names), or the
 * values found in a response's raw lines (headers 0) */
typedef struct {
  lua_State *L;
  int headers, names;
  const char *raw_values[LIMIT_NAMES];
} limit_source;

static const char *limit_header(limit_source *src, int i) {
  return src->headers ? header_at(src->L, src->headers, src->names + i) : src->raw_values[i];
}

static limit_view read_limit(limit_source *src) {
  limit_view view = {0, 0, 0};
  double seconds;
  const char *v = limit_header(src, LIMIT_RETRY_AFTER);
  if (v && parse_retry_after(v, &seconds) && seconds > 0) view.pause = seconds;

  int have_remaining = 0, have_reset = 0;
  double remaining = 0, reset = 0;
  if ((v = limit_header(src, LIMIT_REMAINING))) have_remaining = sscanf(v, "%lf", &remaining) == 1;
  if ((v = limit_header(src, LIMIT_RESET))) have_reset = parse_duration(v, &reset);
  if (!have_remaining && (v = limit_header(src, LIMIT_ANTHROPIC_REMAINING)))
    have_remaining = sscanf(v, "%lf", &remaining) == 1;
  if (!have_reset && (v = limit_header(src, LIMIT_ANTHROPIC_RESET))) have_reset = parse_rfc3339(v, &reset);
  if (have_remaining && !isfinite(remaining)) remaining = remaining < 0 ? 0 : NAN; /* -1e309: none left */
  if (have_remaining && isnan(remaining)) have_remaining = 0;
  if (have_remaining && remaining < 0) remaining = 0;

  if (have_remaining && remaining <= 0 && have_reset) {
    if (reset > view.pause) view.pause = reset;
  } else if (have_remaining) {
    view.have_remaining = 1;
    view.remaining = remaining;
  }
  if (view.pause > MAX_PAUSE_S) view.pause = MAX_PAUSE_S;
  return view;
}

/* L stack: headers or a response at `arg` -> what its headers say of the
 * unit's limit. A response of resil.http.request is read from its raw
 * header lines while res.headers is not built (building that table for five
 * names cost more than the rest of the observe); values found stay on the
 * stack. A headers table is read by the unit's names as Lua strings: from
 * the table at stack index `names` (b:observe's metatable: requests' at
 * [1..], tokens' after them), or made here (names 0). */
static limit_view read_limit_of(lua_State *L, int arg, int unit, int names) {
  limit_source src = {L, 0, 0, {NULL}};
  int t = response_headers(L, arg);
  if (t == LUA_TSTRING) {
    size_t len;
    const char *raw = lua_tolstring(L, -1, &len);
    push_raw_headers(L, raw, len, limit_names[unit], LIMIT_NAMES, src.raw_values);
    return read_limit(&src);
  }
  if (t == LUA_TNONE) {
    luaL_checktype(L, arg, LUA_TTABLE);
    src.headers = arg;
  } else if (t == LUA_TTABLE) {
    src.headers = lua_gettop(L);
  } else { /* a response whose headers were replaced by something else: none */
    limit_view none = {0, 0, 0};
    return none;
  }
  src.names = lua_gettop(L) + 1;
  if (names) {
    for (int i = 1; i <= LIMIT_NAMES; i++) lua_rawgeti(L, names, unit * LIMIT_NAMES + i);
  } else {
    push_limit_names(L, unit);
  }
  return read_limit(&src);
}

/* b:observe(headers | response): learn the provider's view of this limit.
 * Returns the seconds the bucket is now paused for (0 when not paused). */
static int b_observe(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  lua_settop(L, 2);
  limit_view view = read_limit_of(L, 2, unit_index(b->unit), lua_upvalueindex(1));
  pause_for(b, view.pause);
  int64_t now = now_ns(b->R);
  if (view.have_remaining && view.remaining < remaining_at(b, now)) {
    /* the provider counts calls we did not see: lower ours to match */
    b->tat_ns = now + tolerance_ns(b) - tokens_ns(b, view.remaining);
  }
  lua_pushnumber(L, b->paused_until_ns > now ? (double)(b->paused_until_ns - now) / NS : 0);
  return 1;
}

/* limit_headers(headers | response, unit) -> pause_seconds, remaining | nil:
 * what b:observe reads, for a bucket kept elsewhere (a shared one, in the
 * store) */
static int l_limit_headers(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE); /* (a response is one) */
  const char *unit = luaL_checkstring(L, 2);
  if (strcmp(unit, "requests") != 0 && strcmp(unit, "tokens") != 0)
    resil_raise(L, "unit must be \"requests\" or \"tokens\", got \"%s\"", unit);
  lua_settop(L, 2);
  limit_view view = read_limit_of(L, 1, unit_index(unit), 0);
  lua_pushnumber(L, view.pause);
  if (!view.have_remaining) return 1;
  push_count(L, view.remaining);
  return 2;
}

/* resil.retry_after(headers) -> seconds | nil: the provider's own word on
 * when to come back: retry-after-ms, retry-after (seconds or HTTP date), and
 * the reset of any x-ratelimit / anthropic-ratelimit limit that is exhausted. */
static int l_retry_after(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double best = -1, v;
  const char *s;
  if ((s = header(L, 1, "retry-after-ms")) && parse_duration(s, &v)) best = v / 1000;
  if ((s = header(L, 1, "retry-after")) && parse_retry_after(s, &v) && v > best) best = v;
  static const char *const units[] = {"requests", "tokens", "input-tokens", "output-tokens"};
  for (int i = 0; i < 4; i++) {
    char name[96];
    snprintf(name, sizeof name, "x-ratelimit-remaining-%s", units[i]);
    const char *remaining = header(L, 1, name);
    snprintf(name, sizeof name, "x-ratelimit-reset-%s", units[i]);
    if ((!remaining || atof(remaining) <= 0) && (s = header(L, 1, name)) && parse_duration(s, &v) && v > best)
      best = v;
    snprintf(name, sizeof name, "anthropic-ratelimit-%s-remaining", units[i]);
    remaining = header(L, 1, name);
    snprintf(name, sizeof name, "anthropic-ratelimit-%s-reset", units[i]);
    if (remaining && atof(remaining) <= 0 && (s = header(L, 1, name)) && parse_rfc3339(s, &v) && v > best) best = v;
  }
  if (best < 0) return 0;
  lua_pushnumber(L, best > MAX_PAUSE_S ? MAX_PAUSE_S : best);
  return 1;
}

/* resil.parse_duration("6m0s") -> 360 | nil */
static int l_parse_duration(lua_State *L) {
  double v;
  if (!parse_duration(luaL_checkstring(L, 1), &v)) return 0;
  lua_pushnumber(L, v);
  return 1;
}

/* ---------- introspection ---------- */

/* b:state() -> {remaining=, waiting=, paused_for=, rate=, per=, burst=, waits=, refusals=} */
static int b_state(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  int64_t now = now_ns(b->R);
  lua_createtable(L, 0, 10);
  lua_pushinteger(L, b->waits);
  lua_setfield(L, -2, "waits");
  lua_pushinteger(L, b->refusals);
  lua_setfield(L, -2, "refusals");
  lua_pushstring(L, b->name);
  lua_setfield(L, -2, "name");
  push_count(L, remaining_at(b, now));
  lua_setfield(L, -2, "remaining");
  lua_pushinteger(L, b->waiting);
  lua_setfield(L, -2, "waiting");
  lua_pushnumber(L, b->paused_until_ns > now ? (double)(b->paused_until_ns - now) / NS : 0);
  lua_setfield(L, -2, "paused_for");
  push_count(L, b->rate);
  lua_setfield(L, -2, "rate");
  push_count(L, b->per);
  lua_setfield(L, -2, "per");
  push_count(L, b->burst);
  lua_setfield(L, -2, "burst");
  lua_pushstring(L, b->unit);
  lua_setfield(L, -2, "unit");
  return 1;
}

/* buckets() -> {name = bucket, ...}: every named bucket (for metrics) */
static int l_buckets(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REGISTRY);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, -3)) { /* L stack: registry, copy, name, bucket */
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  return 1;
}

static int b_remaining(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  push_count(L, remaining_at(b, now_ns(b->R)));
  return 1;
}

/* b:wait_time(n): seconds until n tokens could be taken, counting waiters. */
static int b_wait_time(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  double n = check_tokens(L, 2, b);
  if (n > b->burst) {
    lua_pushnumber(L, HUGE_VAL);
    return 1;
  }
  lua_pushnumber(L, (double)wait_behind(b, n, now_ns(b->R), NULL) / NS);
  return 1;
}

static int b_tostring(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  char buf[160];
  snprintf(buf, sizeof buf, "bucket '%s' (%g per %g s, burst %g)", b->name, b->rate, b->per, b->burst);
  lua_pushstring(L, buf);
  return 1;
}

static int b_gc(lua_State *L) {
  bucket *b = check_bucket(L, 1);
  timer_free(&b->timer);
  return 0;
}

static int b_name(lua_State *L) {
  lua_pushstring(L, check_bucket(L, 1)->name);
  return 1;
}

static const luaL_Reg bucket_methods[] = {
  {"try", b_try},       {"acquire", b_acquire},     {"refund", b_refund},       {"charge", b_charge},
  {"observe", b_observe}, {"state", b_state},       {"remaining", b_remaining}, {"wait_time", b_wait_time},
  {"name", b_name},     {NULL, NULL}};

int luaopen_resil_bucket(lua_State *L) {
  luaL_newmetatable(L, BUCKET_MT);
  luaL_newlibtable(L, bucket_methods);
  lua_pushvalue(L, -2);
  luaL_setfuncs(L, bucket_methods, 1); /* the metatable, for check_bucket */
  lua_setfield(L, -2, "__index");
  push_limit_names(L, 0); /* for b_observe: requests', then tokens' */
  push_limit_names(L, 1);
  for (int i = 2 * LIMIT_NAMES; i >= 1; i--) lua_rawseti(L, -1 - i, i);
  lua_pushcfunction(L, b_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, b_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, l_bucket);
  lua_setfield(L, -2, "bucket");
  lua_pushcfunction(L, l_retry_after);
  lua_setfield(L, -2, "retry_after");
  lua_pushcfunction(L, l_parse_duration);
  lua_setfield(L, -2, "parse_duration");
  lua_pushcfunction(L, l_limit_headers);
  lua_setfield(L, -2, "limit_headers");
  lua_pushcfunction(L, l_buckets);
  lua_setfield(L, -2, "buckets");
  return 1;
}
