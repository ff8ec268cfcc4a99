/*
 * breaker.c: circuit breakers by name.
 *
 * Closed: outcomes go into a sliding window (the last N calls, or the last N
 * seconds in one-second slots); once min_calls are in it, a failure rate or a
 * slow-call rate at or above its threshold opens the breaker. Open: calls are
 * rejected until open_for has passed (growing by `backoff` on each re-open in
 * a row, up to open_for_max). Half-open: `half_open_calls` probes are let
 * through; a success share of at least `half_open_success` closes it, anything
 * less opens it again.
 *
 * Transitions are decided lazily in allow() and record(), so the breaker needs
 * no timer of its own. Listeners and a log line follow every transition.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

#define BREAKER_MT "resil.Breaker"
#define REGISTRY "resil.breakers"

typedef enum { CLOSED, OPEN, HALF_OPEN, ISOLATED } breaker_state;
static const char *const state_names[] = {"closed", "open", "half_open", "isolated"};

typedef struct {
  int calls, failures, slow;
  long stamp; /* time window: the second this slot counts; count window: unused */
} slot;

typedef struct {
  resil_t *R;
  char name[64];
  /* options */
  int time_window; /* 1: window is seconds; 0: window is calls */
  int window;
  double failure_rate, slow_call, slow_call_rate;
  int min_calls;
  double open_for, open_for_max, backoff;
  int open_for_max_given; /* else it follows open_for */
  int half_open_calls;
  double half_open_success;
  double probe_timeout; /* a probe not reported by then frees its slot */
  /* state */
  breaker_state state;
  double opened_at, open_until, current_open_for;
  int reopens;
  int probes_out, probes_ok, probes_failed;
  double probes_out_until; /* the latest probe let out, plus probe_timeout */
  /* the probes' round: a new one at each half-open, and when probe_timeout frees the slots of
   * probes never reported; a probe's outcome counts in its own round only (its third value) */
  lua_Integer round;
  slot *slots; /* time window: one per second; count window: one per call */
  int nslots, next;  /* count window: ring position */
  int calls, failures, slow; /* totals over the window */
  long expired_second;       /* time window: the second window_expire last ran in */
  long rejected;
} breaker;

/* The methods hold the metatable as their upvalue: one compare, not
 * luaL_checkudata's lookup of the name in the registry (allow and record
 * run on every provider attempt). Others, and a wrong value, take the
 * checked path and its error. */
static breaker *check_breaker(lua_State *L, int idx) {
  breaker *br = lua_touserdata(L, idx);
  if (br && lua_getmetatable(L, idx)) {
    int ours = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
    if (ours) return br;
  }
  return luaL_checkudata(L, idx, BREAKER_MT);
}

/* ---------- the window ---------- */

static void window_clear(breaker *br) {
  memset(br->slots, 0, sizeof(slot) * (size_t)br->nslots);
  br->calls = br->failures = br->slow = 0;
  br->next = 0;
  br->expired_second = LONG_MIN;
}

/* Time window: drop the slots older than `window` seconds. */
static void window_expire(breaker *br, double now) {
  if (!br->time_window) return;
  long second = (long)floor(now);
  /* a slot is stamped with the second it is written in: none gets old
   * within a second (record() runs on every call) */
  if (second == br->expired_second) return;
  br->expired_second = second;
  for (int i = 0; i < br->nslots; i++) {
    slot *s = &br->slots[i];
    if (s->calls && second - s->stamp >= br->window) {
      br->calls -= s->calls;
      br->failures -= s->failures;
      br->slow -= s->slow;
      memset(s, 0, sizeof *s);
    }
  }
}

static void window_add(breaker *br, double now, int failed, int slow) {
  slot *s;
  if (br->time_window) {
    long second = (long)floor(now);
    if (second != br->expired_second) br->expired_second = LONG_MIN; /* (a clock set back: look again) */
    s = &br->slots[second % br->nslots];
    if (s->stamp != second) {
      br->calls -= s->calls, br->failures -= s->failures, br->slow -= s->slow;
      memset(s, 0, sizeof *s);
      s->stamp = second;
    }
  } else {
    s = &br->slots[br->next];
    br->next = (br->next + 1) % br->nslots;
    br->calls -= s->calls, br->failures -= s->failures, br->slow -= s->slow;
    memset(s, 0, sizeof *s);
  }
  s->calls++, br->calls++;
  if (failed) s->failures++, br->failures++;
  if (slow) s->slow++, br->slow++;
}

/* ---------- transitions ---------- */

/* Call listeners and log; the breaker userdata is at `self`. Listener errors
 * are logged, never raised into the caller. */
static void emit(lua_State *L, int self, breaker *br, const char *event, const char *from, const char *to) {
  self = lua_absindex(L, self);
  lua_getiuservalue(L, self, 1);
  if (lua_istable(L, -1) && lua_getfield(L, -1, event) == LUA_TTABLE) {
    int list = lua_gettop(L);
    for (lua_Integer i = 1; lua_rawgeti(L, list, i) == LUA_TFUNCTION; i++) {
      lua_pushvalue(L, self);
      lua_pushstring(L, from);
      lua_pushstring(L, to);
      if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
        const char *msg = lua_pushfstring(L, "breaker '%s': %s listener failed", br->name, event);
        lua_createtable(L, 0, 1);
        lua_pushvalue(L, -3);
        lua_setfield(L, -2, "error");
        host_log(L, "error", msg);
        lua_pop(L, 2); /* the message and the listener's error */
      }
    }
    lua_pop(L, 1);
  }
  lua_settop(L, self);
}

static void log_transition(lua_State *L, breaker *br, const char *from, const char *to) {
  lua_createtable(L, 0, 7);
  lua_pushstring(L, br->name), lua_setfield(L, -2, "breaker");
  lua_pushstring(L, from), lua_setfield(L, -2, "from");
  lua_pushstring(L, to), lua_setfield(L, -2, "to");
  lua_pushinteger(L, br->calls), lua_setfield(L, -2, "calls");
  lua_pushinteger(L, br->failures), lua_setfield(L, -2, "failures");
  lua_pushinteger(L, br->slow), lua_setfield(L, -2, "slow");
  if (strcmp(to, "open") == 0) lua_pushnumber(L, br->current_open_for), lua_setfield(L, -2, "open_for");
  host_log(L, strcmp(to, "closed") == 0 ? "info" : "warn", "breaker transition");
}

static void transition(lua_State *L, int self, breaker *br, breaker_state to, double now) {
  breaker_state from = br->state;
  if (from == to) return;
  br->state = to;
  if (to == OPEN) {
    /* re-opening straight from half-open grows the wait */
    if (from == HALF_OPEN) {
      br->reopens++;
      double grown = br->open_for * pow(br->backoff, br->reopens);
      br->current_open_for = grown < br->open_for_max ? grown : br->open_for_max;
    } else {
      br->reopens = 0;
      br->current_open_for = br->open_for;
    }
    br->opened_at = now;
    br->open_until = now + br->current_open_for;
  }
  if (to == HALF_OPEN) {
    br->probes_out = br->probes_ok = br->probes_failed = 0;
    br->round++;
  }
  if (to == CLOSED) {
    br->reopens = 0;
    window_clear(br);
  }
  log_transition(L, br, state_names[from], state_names[to]);
  emit(L, self, br, state_names[to], state_names[from], state_names[to]);
}

/* open -> half_open once open_for has passed */
static void refresh(lua_State *L, int self, breaker *br, double now) {
  if (br->state == OPEN && now >= br->open_until) transition(L, self, br, HALF_OPEN, now);
}

/* ---------- options ---------- */

static double opt_number(lua_State *L, int idx, breaker *br, const char *field, double dflt, double lo, double hi) {
  double v = dflt;
  if (lua_getfield(L, idx, field) != LUA_TNIL) {
    int isnum;
    v = lua_tonumberx(L, -1, &isnum);
    if (!isnum || !(v >= lo && v <= hi))
      resil_raise(L, "breaker '%s': %s must be a number in [%g, %g], got %s", br->name, field, lo, hi,
                  luaL_tolstring(L, -1, NULL));
  }
  lua_pop(L, 1);
  return v;
}

/* a count: 2.5 min_calls was taken as 2 without a word */
static int opt_count(lua_State *L, int idx, breaker *br, const char *field, int dflt, double hi) {
  double v = opt_number(L, idx, br, field, dflt, 1, hi);
  if (v != floor(v)) resil_raise(L, "breaker '%s': %s must be a whole number, got %g", br->name, field, v);
  return (int)v;
}

static void configure(lua_State *L, breaker *br, int opts) {
  int time_window = br->slots ? br->time_window : 1;
  if (lua_getfield(L, opts, "window_type") != LUA_TNIL) {
    const char *type = lua_tostring(L, -1);
    if (!type || (strcmp(type, "time") != 0 && strcmp(type, "count") != 0))
      resil_raise(L, "breaker '%s': window_type must be \"time\" or \"count\"", br->name);
    time_window = strcmp(type, "time") == 0;
  }
  lua_pop(L, 1);
  /* every option read and checked before any is taken: one refused (a reload's) left those before it
   * changed, half_open_success 0 among them */
  /* (whole seconds or calls: 2.5 was taken as 2 without a word) */
  int window = opt_count(L, opts, br, "window", br->slots ? br->window : (time_window ? 30 : 100), 86400);
  double failure_rate = opt_number(L, opts, br, "failure_rate", br->slots ? br->failure_rate : 0.5, 0, 1);
  double slow_call = opt_number(L, opts, br, "slow_call", br->slots ? br->slow_call : 0, 0, HUGE_VAL);
  double slow_call_rate = opt_number(L, opts, br, "slow_call_rate", br->slots ? br->slow_call_rate : 1, 0, 1);
  int min_calls = opt_count(L, opts, br, "min_calls", br->slots ? br->min_calls : 10, 1e9);
  /* (finite: open for inf was a breaker that never half-opens, retry_after inf; isolate() is that) */
  double open_for = opt_number(L, opts, br, "open_for", br->slots ? br->open_for : 30, 0, 1e9);
  int max_given = lua_getfield(L, opts, "open_for_max") != LUA_TNIL;
  lua_pop(L, 1);
  double open_for_max =
    opt_number(L, opts, br, "open_for_max", br->open_for_max_given ? br->open_for_max : open_for, 0, 1e9);
  double backoff = opt_number(L, opts, br, "backoff", br->slots ? br->backoff : 2, 1, 100);
  int half_open_calls = opt_count(L, opts, br, "half_open_calls", br->slots ? br->half_open_calls : 1, 1e6);
  double half_open_success =
    opt_number(L, opts, br, "half_open_success", br->slots ? br->half_open_success : 1, 0, 1);
  double probe_timeout = opt_number(L, opts, br, "probe_timeout", br->slots ? br->probe_timeout : 60, 0, 1e9);
  if (!(probe_timeout > 0))
    resil_raise(L, "breaker '%s': probe_timeout must be a number in (0, 1e+09] seconds, got 0", br->name);
  /* (0 closed the breaker on a failed probe: a share of none is no test) */
  if (!(half_open_success > 0))
    resil_raise(L, "breaker '%s': half_open_success must be a share of the probes above 0, up to 1", br->name);
  /* (a count window holds `window` calls: min_calls past that never opened it, a window of 5 with
   * min_calls left at 10 among them) */
  if (!time_window && min_calls > window)
    resil_raise(L, "breaker '%s': min_calls (%d) is more than its count window holds (%d calls): it would never open",
                br->name, min_calls, window);
  br->failure_rate = failure_rate;
  br->slow_call = slow_call;
  br->slow_call_rate = slow_call_rate;
  br->min_calls = min_calls;
  br->open_for = open_for;
  br->open_for_max = open_for_max < open_for ? open_for : open_for_max;
  if (max_given) br->open_for_max_given = 1;
  br->backoff = backoff;
  br->half_open_calls = half_open_calls;
  br->half_open_success = half_open_success;
  br->probe_timeout = probe_timeout;
  if (!br->slots || window != br->window || time_window != br->time_window) {
    slot *slots = calloc((size_t)window, sizeof(slot));
    if (!slots) luaL_error(L, "out of memory");
    free(br->slots);
    br->slots = slots;
    br->nslots = window;
    br->window = window;
    br->time_window = time_window;
    window_clear(br);
  }
}

/* resil.breaker(name [, opts]): the same breaker for the same name. */
static int l_breaker(lua_State *L) {
  lua_settop(L, 2);
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  if (len == 0 || len >= sizeof ((breaker *)0)->name) resil_raise(L, "breaker name must be 1 to 63 characters");
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  else {
    lua_newtable(L);
    lua_replace(L, 2);
  }
  luaL_getsubtable(L, LUA_REGISTRYINDEX, REGISTRY);
  if (lua_getfield(L, -1, name) != LUA_TNIL) {
    configure(L, check_breaker(L, -1), 2);
    return 1;
  }
  lua_pop(L, 1);
  breaker *br = lua_newuserdatauv(L, sizeof *br, 1);
  memset(br, 0, sizeof *br);
  br->R = resil_from_lua(L);
  memcpy(br->name, name, len + 1);
  luaL_setmetatable(L, BREAKER_MT);
  configure(L, br, 2);
  lua_newtable(L); /* listeners by event */
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, name);
  return 1;
}

static int push_open(lua_State *L, breaker *br, double now) {
  double retry_after = br->state == OPEN ? br->open_until - now : 0;
  if (br->state == ISOLATED)
    resil_push_error(L, "circuit_open", "breaker '%s' is isolated", br->name);
  else if (br->state == HALF_OPEN)
    resil_push_error(L, "circuit_open", "breaker '%s' is half-open and its probes are out", br->name);
  else
    resil_push_error(L, "circuit_open", "breaker '%s' is open for %.3f s more", br->name, retry_after);
  if (br->state != ISOLATED) {
    lua_pushnumber(L, retry_after);
    lua_setfield(L, -2, "retry_after");
  }
  lua_pushstring(L, br->name);
  lua_setfield(L, -2, "breaker");
  return 1;
}

/* br:allow() -> true [, "probe", round] | nil, err{kind="circuit_open", retry_after=} */
static int br_allow(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  lua_settop(L, 1);
  double now = resil_now(br->R);
  refresh(L, 1, br, now);
  if (br->state == CLOSED) {
    lua_pushboolean(L, 1);
    return 1;
  }
  /* probes let out and never reported (a caller that raised or was canceled between allow and
   * record) no longer hold their slots: they held them for good, and every call was refused */
  if (br->state == HALF_OPEN && br->probes_out > 0 && now >= br->probes_out_until) {
    br->probes_out = 0;
    br->round++; /* (their outcomes, should they come, are late: another's slot was counted for them) */
  }
  if (br->state == HALF_OPEN && br->probes_out + br->probes_ok + br->probes_failed < br->half_open_calls) {
    br->probes_out++;
    br->probes_out_until = now + br->probe_timeout;
    lua_pushboolean(L, 1);
    lua_pushliteral(L, "probe"); /* the caller holds a probe: record() or record(nil) must follow */
    lua_pushinteger(L, br->round);
    return 3;
  }
  br->rejected++;
  emit(L, 1, br, "reject", state_names[br->state], state_names[br->state]);
  lua_pushnil(L);
  push_open(L, br, now);
  return 2;
}

/* br:record(ok, seconds [, probe [, round]]): the outcome of a call that allow() let
 * through. ok == nil: the call did not finish (canceled); it frees its probe
 * and is not counted. probe: allow()'s second value, "probe", or false for a
 * call let through closed, which a half-open breaker does not count; left
 * out, any outcome while probes are out is taken for a probe's. */
static int br_record(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  int counted = !lua_isnoneornil(L, 2);
  /* ("yes" counted as a success and a NaN duration as never slow, without a word) */
  if (counted && lua_type(L, 2) != LUA_TBOOLEAN)
    resil_raise(L, "breaker '%s': record's ok must be true, false or nil (the call did not finish), got %s", br->name,
                luaL_typename(L, 2));
  int ok = lua_toboolean(L, 2);
  double seconds = 0;
  if (!lua_isnoneornil(L, 3)) {
    int isnum;
    seconds = lua_tonumberx(L, 3, &isnum);
    if (!isnum || seconds != seconds)
      resil_raise(L, "breaker '%s': record's seconds must be a number, got %s", br->name, luaL_tolstring(L, 3, NULL));
  }
  /* (without it, a call sent as the outage began that timed out while the probe was out re-opened
   * the breaker, and the probe's success was dropped; a late success closed it) */
  int probe_known = !lua_isnoneornil(L, 4), probe = 0;
  if (probe_known) {
    probe = lua_type(L, 4) == LUA_TSTRING && strcmp(lua_tostring(L, 4), "probe") == 0;
    if (!probe && !(lua_type(L, 4) == LUA_TBOOLEAN && !lua_toboolean(L, 4)))
      resil_raise(L, "breaker '%s': record's probe must be allow()'s \"probe\" or false (a call let through closed), "
                     "got %s", br->name, luaL_tolstring(L, 4, NULL));
  }
  /* round: allow()'s third value beside "probe". A probe of an earlier round (out as the breaker
   * re-opened, or freed by probe_timeout) was taken for one of this round's: its late outcome
   * closed the breaker, or took a slot whose own probe's outcome was then dropped */
  int late = 0;
  if (!lua_isnoneornil(L, 5)) {
    int isint;
    lua_Integer round = lua_tointegerx(L, 5, &isint);
    if (!isint)
      resil_raise(L, "breaker '%s': record's round must be allow()'s third value, an integer, got %s", br->name,
                  luaL_tolstring(L, 5, NULL));
    late = probe && round != br->round;
  }
  lua_settop(L, 1);
  double now = resil_now(br->R);
  int slow = br->slow_call > 0 && seconds >= br->slow_call;
  switch (br->state) {
  case CLOSED:
    if (!counted) break;
    window_expire(br, now);
    window_add(br, now, !ok, slow);
    /* (a rate of 0 is "any failure": 0/10 >= 0 opened a breaker on ten successes) */
    if (br->calls >= br->min_calls &&
        ((br->failures > 0 && (double)br->failures / br->calls >= br->failure_rate) ||
         (br->slow_call > 0 && br->slow > 0 && (double)br->slow / br->calls >= br->slow_call_rate)))
      transition(L, 1, br, OPEN, now);
    break;
  case HALF_OPEN:
    if (br->probes_out == 0 || (probe_known && !probe) || late) break; /* a call from before this round */
    br->probes_out--;
    if (!counted) break;
    if (ok && !slow) br->probes_ok++;
    else br->probes_failed++;
    /* decide as soon as the outcome is certain */
    double needed = ceil(br->half_open_success * br->half_open_calls - 1e-9);
    if (br->probes_ok >= needed) transition(L, 1, br, CLOSED, now);
    else if (br->half_open_calls - br->probes_failed < needed) transition(L, 1, br, OPEN, now);
    break;
  default: /* open or isolated: late results of earlier calls do not count */
    break;
  }
  return 0;
}

/* br:state() -> "closed" | "open" | "half_open" | "isolated" */
static int br_state(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  lua_settop(L, 1);
  refresh(L, 1, br, resil_now(br->R));
  lua_pushstring(L, state_names[br->state]);
  return 1;
}

/* br:stats() -> the window's counts and the time until half-open */
static int br_stats(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  lua_settop(L, 1);
  double now = resil_now(br->R);
  refresh(L, 1, br, now);
  window_expire(br, now);
  lua_createtable(L, 0, 8);
  lua_pushstring(L, br->name), lua_setfield(L, -2, "name");
  lua_pushstring(L, state_names[br->state]), lua_setfield(L, -2, "state");
  lua_pushinteger(L, br->calls), lua_setfield(L, -2, "calls");
  lua_pushinteger(L, br->failures), lua_setfield(L, -2, "failures");
  lua_pushinteger(L, br->slow), lua_setfield(L, -2, "slow");
  lua_pushinteger(L, br->rejected), lua_setfield(L, -2, "rejected");
  lua_pushnumber(L, br->calls ? (double)br->failures / br->calls : 0), lua_setfield(L, -2, "failure_rate");
  lua_pushnumber(L, br->state == OPEN ? br->open_until - now : 0), lua_setfield(L, -2, "retry_after");
  lua_pushnumber(L, br->current_open_for), lua_setfield(L, -2, "open_for");
  return 1;
}

/* br:isolate(): forced open until reset() */
static int br_isolate(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  lua_settop(L, 1);
  transition(L, 1, br, ISOLATED, resil_now(br->R));
  return 0;
}

static int br_reset(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  lua_settop(L, 1);
  transition(L, 1, br, CLOSED, resil_now(br->R));
  window_clear(br);
  br->reopens = 0;
  return 0;
}

/* br:on(event, fn): event is open, close(d), half_open, isolated or reject;
 * fn(breaker, from, to). */
static int br_on(lua_State *L) {
  check_breaker(L, 1);
  const char *event = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  if (strcmp(event, "close") == 0) event = "closed";
  if (strcmp(event, "open") != 0 && strcmp(event, "closed") != 0 && strcmp(event, "half_open") != 0 &&
      strcmp(event, "isolated") != 0 && strcmp(event, "reject") != 0)
    resil_raise(L, "breaker:on: unknown event '%s' (open, close, half_open, isolated, reject)", event);
  lua_getiuservalue(L, 1, 1);
  luaL_getsubtable(L, -1, event);
  lua_pushvalue(L, 3);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

static int br_name(lua_State *L) {
  lua_pushstring(L, check_breaker(L, 1)->name);
  return 1;
}

static int br_tostring(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  lua_pushfstring(L, "breaker '%s' (%s)", br->name, state_names[br->state]);
  return 1;
}

static int br_gc(lua_State *L) {
  breaker *br = check_breaker(L, 1);
  free(br->slots);
  br->slots = NULL;
  return 0;
}

static const luaL_Reg breaker_methods[] = {
  {"allow", br_allow}, {"record", br_record}, {"state", br_state}, {"stats", br_stats}, {"isolate", br_isolate},
  {"reset", br_reset}, {"on", br_on},         {"name", br_name},   {NULL, NULL}};

/* require "resil.core.breaker" -> {breaker = constructor, methods = the
 * breakers' method table}. src/lua/limits.lua owns resil.breaker and adds
 * the one method that composes the others, call (a pcall around fn that can
 * yield reads best in Lua). */
int luaopen_resil_breaker(lua_State *L) {
  luaL_newmetatable(L, BREAKER_MT);
  luaL_newlibtable(L, breaker_methods);
  lua_pushvalue(L, -2);
  luaL_setfuncs(L, breaker_methods, 1); /* the metatable, for check_breaker */
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, "__index");
  /* L stack: metatable, methods */
  lua_pushcfunction(L, br_tostring);
  lua_setfield(L, -3, "__tostring");
  lua_pushcfunction(L, br_gc);
  lua_setfield(L, -3, "__gc");
  lua_createtable(L, 0, 2);
  lua_insert(L, -2);
  lua_setfield(L, -2, "methods");
  lua_pushcfunction(L, l_breaker);
  lua_setfield(L, -2, "breaker");
  lua_remove(L, -2); /* the metatable */
  return 1;
}
