/*
 * embed.c: calling Lua from a C program: resil_call (drive the loop until
 * one call ends), resil_call_async (the loop is the embedder's; a callback
 * says when it ended), resil_step (one loop turn), resil_register (a C
 * function as resil.host.<name>).
 *
 * A call is a task like any other: it yields on I/O, meets the instruction
 * and memory caps, and can be canceled. Resolving the function and decoding
 * the arguments happen at once, under host_pcall, so a bad name or bad JSON
 * is refused before anything runs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"

#define HELPERS_KEY "resil.embed_helpers" /* registry: { prepare, body, fields } */

typedef struct embed_call embed_call;
struct embed_call {
  resil_t *R;
  void (*done)(void *ud, int status, const char *json_result); /* NULL: resil_call waits for it */
  void *ud;
  int finished;  /* the task ended: status and text are set */
  int abandoned; /* resil_call stopped waiting (an interrupt): freed when the task ends */
  int status;
  char *text; /* the JSON results, or the error message */
  embed_call *next, *prev; /* in the unfinished list, then in the completed queue */
};

typedef struct embed_state {
  embed_call *unfinished;
  embed_call *completed_head, *completed_tail; /* async calls whose callback is due */
  int hooked;                                  /* deliver() runs at each turn's end */
} embed_state;

/* The Lua half: resolve "name" or "module.fn" in the scripts' global
 * environment (through its require, so the sandbox applies), decode the
 * arguments, and turn results into JSON or nil, err into a message. */
static const char helpers_lua[] =
  "local describe, from_c = ... -- (resil_describe: a table's fields, credentials redacted, as error.c reports them)\n"
  "local resil = require 'resil'\n"
  "local json, null = resil.json, resil.json.null\n"
  "local pack, unpack = table.pack, table.unpack\n"
  "local private = debug.getregistry()['resil.private']\n"
  "local function callable(v)\n"
  "  if type(v) == 'function' then return true end\n"
  "  -- (under the sandbox a policy's table is a view, its metatable hidden: a provider of\n"
  "  -- policies.call or a fallback chain was 'not a function (it is table)'; its table says)\n"
  "  if private.policy_viewed then v = private.policy_viewed(v) or v end\n"
  "  local mt = getmetatable(v)\n"
  "  return type(mt) == 'table' and mt.__call ~= nil\n"
  "end\n"
  "local function resolve(env, name)\n"
  "  local root = name:match('^[^.]*')\n"
  "  local v\n"
  "  if env[root] ~= nil or not name:find('.', 1, true) then\n"
  "    v = env\n"
  "    for part in name:gmatch('[^.]+') do\n"
  "      if type(v) ~= 'table' then v = nil break end\n"
  "      v = v[part]\n"
  "    end\n"
  "  else\n"
  "    local modname, field = name:match('^(.+)%.([^.]+)$')\n"
  "    if not modname then return nil end\n"
  "    -- (called from C, as the program named it: 'module not found' blamed [resil embed]:N)\n"
  "    local mod = from_c(env.require, modname)\n"
  "    v = type(mod) == 'table' and mod[field] or nil\n"
  "  end\n"
  "  return v\n"
  "end\n"
  "local function prepare(env, name, args_json)\n"
  "  -- (an empty part was skipped: 'add.' and '.add' called add, 'a..b' required 'a.')\n"
  "  if name == '' or name:find('^%.') or name:find('%.$') or name:find('..', 1, true) then\n"
  "    return nil, ('resil_call: \\'%s\\' is not a name (a global, a field path or module.fn)'):format(name)\n"
  "  end\n"
  "  local f = resolve(env, name)\n"
  "  if not callable(f) then\n"
  "    return nil, ('resil_call: %s is not a function (it is %s)'):format(name, type(f))\n"
  "  end\n"
  "  local args = { n = 0 }\n"
  "  if args_json then\n"
  "    local v, err = json.decode(args_json)\n"
  "    if v == nil then return nil, 'resil_call: json_args: ' .. tostring(err) end\n"
  "    if type(v) ~= 'table' or (next(v) == nil and getmetatable(v) ~= json.array_mt) then\n"
  "      return nil, 'resil_call: json_args must be a JSON array' -- ({} is an object: only [] is array_mt's)\n"
  "    end\n"
  "    local n = 0\n"
  "    for k in pairs(v) do\n"
  "      if math.type(k) ~= 'integer' or k < 1 then return nil, 'resil_call: json_args must be a JSON array' end\n"
  "      if k > n then n = k end\n"
  "    end\n"
  "    for i = 1, n do if v[i] == null then v[i] = nil end end\n"
  "    -- (a Lua stack holds about a million values: unpacked in the task, more raised\n"
  "    -- 'too many results to unpack' at [resil embed], naming nothing of the call)\n"
  "    if n > 8000 and not pcall(unpack, v, 1, n) then\n"
  "      return nil, ('resil_call: json_args has %d elements, more than a Lua call can take'):format(n)\n"
  "    end\n"
  "    v.n = n\n"
  "    args = v\n"
  "  end\n"
  "  return f, args\n"
  "end\n"
  "-- each byte that is not part of valid UTF-8 as U+FFFD, as log lines have it: cjson\n"
  "-- copies such bytes (a text cut mid-character), and the result was no JSON\n"
  "local valid_utf8 = json.utf8\n"
  "-- a plain table (no __tostring) as its fields, not its address ('table: 0x...', all that\n"
  "-- reached the program of an error{code = 42} or a nil, {kind =, message =}); nil otherwise\n"
  "local function fields(v)\n"
  "  if type(v) ~= 'table' then return nil end\n"
  "  local mt = getmetatable(v)\n"
  "  if type(mt) == 'table' and mt.__tostring ~= nil then return nil end\n"
  "  -- (its credential fields redacted, as a raised table's: a password, an Authorization went out whole)\n"
  "  local ok, text = pcall(describe, v)\n"
  "  return ok and type(text) == 'string' and valid_utf8(text) or nil\n"
  "end\n"
  "local function defined_at(f)\n"
  "  local where = type(f) == 'function' and debug.getinfo(f, 'S')\n"
  "  return where and where.linedefined > 0 and (' (%s:%d)'):format(where.short_src, where.linedefined) or ''\n"
  "end\n"
  "local function finish(name, f, r)\n"
  "  if r.n >= 2 and r[1] == nil and r[2] ~= nil then\n"
  "    local where = defined_at(f)\n"
  "    local err = r[2]\n"
  "    local kind = type(err) == 'table' and err.kind\n"
  "    local plain, text = fields(err), nil\n"
  "    if plain and type(kind) == 'string' and type(err.message) == 'string' then text = kind .. ': ' .. err.message\n"
  "    elseif plain then text = plain\n"
  "    else -- (a __tostring that raises: still the function's nil, err, RESIL_ERR_FAILED)\n"
  "      local ok, s = pcall(tostring, err)\n"
  "      text = ok and type(s) == 'string' and s or ('(a %s value; its __tostring failed)'):format(type(err))\n"
  "    end\n"
  "    return false, ('%s%s returned nil, %s'):format(name, where, kind and text or ('err: ' .. text))\n"
  "  end\n"
  "  local out = {}\n"
  "  for i = 1, r.n do if r[i] == nil then out[i] = null else out[i] = r[i] end end\n"
  "  if r.n == 0 then return true, '[]' end\n"
  "  -- (a NaN, a function, a cycle: cjson's 'Cannot serialise ...' alone named neither the call nor where)\n"
  "  local ok, text = pcall(json.encode, out)\n"
  "  if not ok then\n"
  "    error(('%s%s returned what JSON cannot hold: %s'):format(name, defined_at(f), tostring(text)), 0)\n"
  "  end\n"
  "  return true, valid_utf8(text)\n"
  "end\n"
  "-- (f called from C, as the program calls it: its error(msg, 2) blamed this line, [resil embed]:N)\n"
  "local function body(name, f, args)\n"
  "  return finish(name, f, pack(from_c(f, unpack(args, 1, args.n))))\n"
  "end\n"
  "return prepare, body, fields\n";

static embed_state *state_of(resil_t *R) {
  if (!R->embed) R->embed = calloc(1, sizeof *R->embed);
  return R->embed;
}

static void unlink_unfinished(embed_state *st, embed_call *c) {
  if (c->prev) c->prev->next = c->next;
  else if (st->unfinished == c) st->unfinished = c->next;
  if (c->next) c->next->prev = c->prev;
  c->next = c->prev = NULL;
}

static void free_call(embed_call *c) {
  free(c->text);
  free(c);
}

/* A failure at max_memory names the cap: a bare "not enough memory" (with no traceback:
 * the message handler had no memory either) read as the machine's memory running out, and a
 * program that set a cap too small to load its policies was not told which. */
void embed_name_memory_cap(resil_t *R) {
  static const char bare[] = "not enough memory";
  const char *e = R->error, *at = e ? strstr(e, bare) : NULL; /* (also where a policy's load failed) */
  if (!R->mem_limit || !at || strstr(e, "max_memory")) return;
  size_t len = strlen(e) + 160;
  char *msg = malloc(len);
  if (!msg) return;
  snprintf(msg, len, "%.*s%s: the Lua state is capped at %zu bytes (resil_options.max_memory, --max-memory)%s",
           (int)(at - e), e, bare, R->mem_limit, at + sizeof bare - 1);
  resil_set_error(R, msg);
  free(msg);
}

/* The async calls that ended: their callbacks run here, at the end of a
 * loop turn, never from inside a task, so a callback may start new calls. */
static void deliver(void *arg) {
  resil_t *R = arg;
  embed_state *st = R->embed;
  embed_call *c;
  int interrupted = st && R->interrupted; /* (one that comes during the callbacks is the next call's) */
  while (st && (c = st->completed_head)) {
    st->completed_head = c->next;
    if (!st->completed_head) st->completed_tail = NULL;
    if (c->status != RESIL_OK) resil_set_error(R, c->text), embed_name_memory_cap(R);
    c->done(c->ud, c->status, c->status == RESIL_OK ? c->text : NULL);
    free_call(c);
  }
  /* on the program's own event base (the pump's turn, no resil_* function below): the
   * turn acted on an interrupt (the calls it stopped heard RESIL_ERR_INTERRUPT); nothing
   * else ever reported it, and left set it refused every later call and handler, for good */
  if (interrupted && R->in_loop && !R->in_api && !R->current && !R->host_L) R->interrupted = 0;
}

static char *copy_or_placeholder(const char *s, const char *placeholder) { return strdup(s ? s : placeholder); }

/* A plain table raised (error{code = 42}): the traceback's message is "(error object is a
 * table value)", all the program learnt of it; its fields go in as JSON. -> malloc'd, or
 * NULL (not such a table). L stack (R->L): unchanged. */
static char *with_fields(resil_t *R, int idx, const char *tb) {
  static const char opaque[] = "(error object is a table value)";
  lua_State *L = R->L;
  if (!tb || strncmp(tb, opaque, sizeof opaque - 1) != 0 || lua_type(L, idx) != LUA_TTABLE) return NULL;
  if (lua_getfield(L, LUA_REGISTRYINDEX, HELPERS_KEY) != LUA_TTABLE) {
    lua_pop(L, 1);
    return NULL;
  }
  lua_rawgeti(L, -1, 3);
  lua_pushvalue(L, idx);
  char *out = NULL;
  if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING) {
    const char *plain = lua_tostring(L, -1), *rest = tb + sizeof opaque - 1;
    size_t len = sizeof opaque + strlen(plain) + strlen(rest) + 4;
    if ((out = malloc(len))) snprintf(out, len, "(error object is a table value: %s)%s", plain, rest);
  }
  lua_pop(L, 2);
  return out;
}

/* describe(v) -> resil_describe's message (the helpers' fields) */
static int l_describe(lua_State *L) {
  resil_describe(L, 1);
  return 1;
}

/* The call's task ended (task_done): keep its outcome. L stack (R->L): unchanged. */
static void call_done(void *arg, task *t) {
  embed_call *c = arg;
  resil_t *R = c->R;
  lua_State *L = R->L;
  int top = lua_gettop(L);
  int n = lua_checkstack(L, 8) ? task_push_results(L, t) : 0;
  if (n == 0 || !lua_toboolean(L, top + 1)) { /* it raised, or was canceled */
    const char *tb = task_traceback(t);
    c->status = R->interrupted ? RESIL_ERR_INTERRUPT : RESIL_ERR_SCRIPT;
    c->text = n >= 2 ? with_fields(R, top + 2, tb) : NULL;
    if (!c->text)
      c->text = copy_or_placeholder(tb ? tb : (n >= 2 ? resil_describe(L, top + 2) : NULL), "resil_call: the call failed");
  } else {
    c->status = lua_toboolean(L, top + 2) ? RESIL_OK : RESIL_ERR_FAILED;
    /* (the JSON holds no NUL; a nil, err message may: resil_describe writes it \0) */
    c->text = copy_or_placeholder(c->status == RESIL_OK || lua_type(L, top + 3) != LUA_TSTRING ? lua_tostring(L, top + 3)
                                                                                                : resil_describe(L, top + 3),
                                  "resil_call: no result");
  }
  lua_settop(L, top);
  c->finished = 1;
  embed_state *st = R->embed;
  unlink_unfinished(st, c);
  if (c->abandoned) {
    free_call(c);
  } else if (c->done) {
    if (st->completed_tail) st->completed_tail->next = c;
    else st->completed_head = c;
    st->completed_tail = c;
  }
}

/* from_c(f, ...) -> f(...): f's caller is C, the program's resil_call, so an error(msg, 2) in f
 * names no line (as Lua's own for a function a C program calls), not the helpers' own */
static int from_c_done(lua_State *L, int status, lua_KContext ctx) {
  (void)status, (void)ctx;
  return lua_gettop(L);
}
static int l_from_c(lua_State *L) {
  lua_callk(L, lua_gettop(L) - 1, LUA_MULTRET, 0, from_c_done);
  return lua_gettop(L);
}

/* L stack: -> helpers table (compiled once per host, run with the host's
 * own globals, not the scripts' sandbox). */
static int push_helpers(resil_t *R) {
  lua_State *L = R->L;
  if (lua_getfield(L, LUA_REGISTRYINDEX, HELPERS_KEY) == LUA_TTABLE) return LUA_OK;
  lua_pop(L, 1);
  if (luaL_loadbuffer(L, helpers_lua, sizeof helpers_lua - 1, "=[resil embed]") != LUA_OK) return LUA_ERRSYNTAX;
  resil_push_host_env(L);
  lua_setupvalue(L, -2, 1);
  lua_pushcfunction(L, l_describe);
  lua_pushcfunction(L, l_from_c);
  if (host_pcall(L, "resil_call", 2, 3) != LUA_OK) return LUA_ERRRUN;
  lua_createtable(L, 3, 0);
  lua_insert(L, -4);
  lua_rawseti(L, -4, 3);
  lua_rawseti(L, -3, 2);
  lua_rawseti(L, -2, 1);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, HELPERS_KEY);
  return LUA_OK;
}

/* Resolve and decode now, then queue the call's task. */
static int start_call(resil_t *R, const char *fn, const char *json_args, embed_call *c) {
  lua_State *L = R->L;
  int top = lua_gettop(L);
  if (!lua_checkstack(L, 8)) {
    resil_set_error(R, "resil_call: not enough memory");
    return RESIL_ERR_MEMORY;
  }
  if (push_helpers(R) != LUA_OK) {
    resil_set_error(R, lua_tostring(L, -1));
    embed_name_memory_cap(R);
    lua_settop(L, top);
    return R->interrupted ? RESIL_ERR_INTERRUPT : RESIL_ERR_SCRIPT;
  }
  int helpers = lua_gettop(L);
  /* L stack: helpers, prepare, env, name, args */
  lua_rawgeti(L, helpers, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_pushstring(L, fn);
  if (json_args) lua_pushstring(L, json_args);
  else lua_pushnil(L);
  /* fn's module loads here, outside any task: one that looped at load held
   * resil_call (resil_call_async: the program's event loop) for good. Without
   * caps of the program's own, a load's (host_pcall_load). */
  int loaded = host_pcall_load(L, "resil_call (fn's module at load, json_args)", 3, 2);
  if (loaded != LUA_OK) { /* a policy that fails to load, or a signal */
    resil_set_error(R, resil_describe(L, -1));
    embed_name_memory_cap(R);
    lua_settop(L, top);
    return R->interrupted ? RESIL_ERR_INTERRUPT : RESIL_ERR_SCRIPT;
  }
  if (lua_isnil(L, -2)) {
    resil_set_error(R, lua_tostring(L, -1));
    lua_settop(L, top);
    return RESIL_ERR_USAGE;
  }
  /* L stack: helpers, f, args -> body, name, f, args */
  lua_rawgeti(L, helpers, 2);
  lua_insert(L, -3);
  lua_pushstring(L, fn);
  lua_insert(L, -3);
  lua_remove(L, helpers);
  lua_pushvalue(L, -2); /* f, to name the task after it rather than the wrapper */
  lua_insert(L, -5);
  task *t = task_spawn(L, 3);
  lua_pop(L, 1); /* the task's handle: the call holds the task through task_on_done */
  task_describe(t, L, -1);
  c->R = R;
  task_on_done(t, call_done, c);
  embed_state *st = R->embed;
  c->next = st->unfinished;
  if (st->unfinished) st->unfinished->prev = c;
  st->unfinished = c;
  lua_settop(L, top);
  return RESIL_OK;
}

static int refuse(resil_t *R, const char *msg) {
  if (R) resil_set_error(R, msg);
  return RESIL_ERR_USAGE;
}

/* An interrupt that came between calls (a SIGINT while the program was
 * elsewhere), or stopped this one as its function's module loaded: reported
 * once, as resil_run reports it, and the next call starts afresh. Left set,
 * it stopped every later call at its first instruction, each as
 * RESIL_ERR_SCRIPT, until a resil_run or resil_step (on the program's own
 * event base: for good). Not the call's to report while Lua runs below (a
 * resil_register function: the running task is still to stop) or a loop of
 * the host's own that reports it (resil_call's, resil_step's, resil_run's:
 * a done callback). */
static int interrupt_is_ours(resil_t *R) {
  return R->interrupted && !R->current && !R->host_L && !(R->in_loop && R->in_api);
}

/* -> RESIL_ERR_INTERRUPT (reported), or RESIL_OK when none is pending */
static int interrupt_reported(resil_t *R, const char *what) {
  if (!interrupt_is_ours(R)) return RESIL_OK;
  char msg[128];
  snprintf(msg, sizeof msg, "%s: interrupted by signal %d before it started (resil_interrupt): nothing ran", what,
           (int)R->interrupted);
  resil_set_error(R, msg);
  R->interrupted = 0;
  return RESIL_ERR_INTERRUPT;
}

static int call_and_wait(resil_t *R, const char *fn, const char *json_args, char **json_result) {
  if (json_result) *json_result = NULL;
  if (!R || !fn) return refuse(R, "resil_call: no host or no function name");
  if (resil_refused(R, "resil_call")) return RESIL_ERR_USAGE;
  if (R->in_loop || R->current || R->host_L)
    return refuse(R, "resil_call: called from inside the host's loop (a task, a handler or a callback); "
                     "use resil_call_async there");
  if (interrupt_reported(R, "resil_call") != RESIL_OK) return RESIL_ERR_INTERRUPT;
  if (!state_of(R)) return RESIL_ERR_MEMORY;
  embed_call *c = calloc(1, sizeof *c);
  if (!c) return RESIL_ERR_MEMORY;
  loop_look(R); /* (a reload due runs before fn is resolved) */
  int status = start_call(R, fn, json_args, c);
  if (status != RESIL_OK) {
    if (status == RESIL_ERR_INTERRUPT && interrupt_is_ours(R)) R->interrupted = 0; /* (reported: its message says where) */
    free(c);
    return status;
  }
  int loop_status = loop_run_until(R, &c->finished);
  if (!c->finished) { /* interrupted: the task may end later; it frees the call then */
    c->abandoned = 1;
    if (loop_status == RESIL_OK) resil_set_error(R, "resil_call: the loop stopped before the call ended");
    return loop_status == RESIL_OK ? RESIL_ERR_INTERRUPT : loop_status;
  }
  status = c->status;
  if (status == RESIL_OK) {
    if (json_result) *json_result = c->text;
    else free(c->text);
    c->text = NULL;
  } else {
    resil_set_error(R, c->text);
    embed_name_memory_cap(R);
  }
  free_call(c);
  return status;
}

int resil_call(resil_t *R, const char *fn, const char *json_args, char **json_result) {
  if (!R) return call_and_wait(R, fn, json_args, json_result);
  api_enter(R);
  int status = call_and_wait(R, fn, json_args, json_result);
  api_leave(R);
  return status;
}

static int call_async(resil_t *R, const char *fn, const char *json_args,
                      void (*done)(void *ud, int status, const char *json_result), void *ud) {
  if (!R || !fn || !done) return refuse(R, "resil_call_async: no host, function name or callback");
  if (resil_refused(R, "resil_call_async")) return RESIL_ERR_USAGE;
  if (interrupt_reported(R, "resil_call_async") != RESIL_OK) return RESIL_ERR_INTERRUPT;
  embed_state *st = state_of(R);
  if (!st) return RESIL_ERR_MEMORY;
  if (!st->hooked) {
    if (loop_on_turn_end(R, deliver, R) != 0) return refuse(R, "resil_call_async: no room for the turn-end hook");
    st->hooked = 1;
  }
  embed_call *c = calloc(1, sizeof *c);
  if (!c) return RESIL_ERR_MEMORY;
  c->done = done;
  c->ud = ud;
  int status = start_call(R, fn, json_args, c);
  if (status != RESIL_OK) free(c);
  if (status == RESIL_ERR_INTERRUPT && interrupt_is_ours(R)) R->interrupted = 0;
  return status;
}

int resil_call_async(resil_t *R, const char *fn, const char *json_args,
                     void (*done)(void *ud, int status, const char *json_result), void *ud) {
  if (!R) return call_async(R, fn, json_args, done, ud);
  api_enter(R);
  int status = call_async(R, fn, json_args, done, ud);
  api_leave(R);
  return status;
}

static int step(resil_t *R, int timeout_ms) {
  if (!R) return -RESIL_ERR_USAGE;
  if (resil_refused(R, "resil_step")) return -RESIL_ERR_USAGE;
  if (R->in_loop || R->current || R->host_L) {
    resil_set_error(R, "resil_step: called from inside the host's loop");
    return -RESIL_ERR_USAGE;
  }
  int status = loop_step(R, timeout_ms);
  if (status == -RESIL_ERR_SCRIPT) embed_name_memory_cap(R);
  deliver(R); /* calls that ended outside a pass over the ready tasks (canceled from a handler) */
  return status;
}

int resil_step(resil_t *R, int timeout_ms) {
  if (!R) return -RESIL_ERR_USAGE;
  api_enter(R);
  int status = step(R, timeout_ms);
  return api_leave(R) && status > 0 ? 0 : status; /* closed: no task is left */
}

static int valid_name(const char *s) {
  /* (a reserved word is no identifier: resil.host.end does not compile) */
  static const char *const reserved[] = {"and", "break", "do", "else", "elseif", "end", "false", "for",
                                         "function", "goto", "if", "in", "local", "nil", "not", "or",
                                         "repeat", "return", "then", "true", "until", "while"};
  if (!s || !(*s == '_' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))) return 0;
  for (size_t i = 0; i < sizeof reserved / sizeof reserved[0]; i++)
    if (strcmp(s, reserved[i]) == 0) return 0;
  for (; *s; s++)
    if (!(*s == '_' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9'))) return 0;
  return 1;
}

int resil_register(resil_t *R, const char *name, int (*f)(struct lua_State *L)) {
  if (R && !f) return refuse(R, "resil_register: no function (f is NULL)"); /* (it said the name was no identifier) */
  if (!R || !valid_name(name)) return refuse(R, "resil_register: the name must be a Lua identifier");
  if (resil_refused(R, "resil_register")) return RESIL_ERR_USAGE;
  lua_State *L = R->L;
  if (!lua_checkstack(L, 4)) return RESIL_ERR_MEMORY;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "resil") != LUA_TTABLE || lua_getfield(L, -1, "host") != LUA_TTABLE) {
    lua_pop(L, 3);
    return refuse(R, "resil_register: the resil module is not loaded");
  }
  lua_pushcfunction(L, f);
  lua_setfield(L, -2, name);
  lua_pop(L, 3);
  return RESIL_OK;
}

/* resil_close, before the Lua state goes: what the host holds in its store in its own name
 * is given up, as the command gives it up at its end. Kept, it was held by this process for
 * as long as it lived: the run it took (resil.step; recorded "interrupted" with steps still
 * running) refused every later host, the program's next or another process's, run_held; a
 * resil.once key whose fn it ran told every later caller in_progress; a budget's hold that no
 * settle or release ended counted until its end (hold, 600 s); a shared breaker's half-open
 * probe, never reported, kept every process from probing until its end (probe_timeout, 60 s). */
void embed_give_up(resil_t *R) {
  static const char *const closers[] = {"resil.runs.close", "resil.once.close", "resil.costs.close",
                                        "resil.budgets.close", "resil.limits.close"};
  static const char *const what[] = {"run", "resil.once keys", "cost rows", "budget holds", "shared breakers' probes"};
  lua_State *L = R->L;
  if (!lua_checkstack(L, 3)) return;
  for (size_t i = 0; i < sizeof closers / sizeof closers[0]; i++) {
    if (lua_getfield(L, LUA_REGISTRYINDEX, closers[i]) != LUA_TFUNCTION) { /* (the module never loaded) */
      lua_pop(L, 1);
      continue;
    }
    /* -> true | nil, err: the store's failure is said (the holder is judged dead with the process) */
    if (lua_pcall(L, 0, 2, 0) != LUA_OK) {
      lua_pushnil(L);
      lua_insert(L, -2);
    }
    if (lua_isnil(L, -2) && !lua_isnil(L, -1)) {
      /* (where the program has its lines, resil_options.log or log_file: said on stderr alone, it
       * went unseen by a program that logs elsewhere, a daemon's stderr /dev/null) */
      const char *why = resil_describe(L, -1);
      char msg[120];
      snprintf(msg, sizeof msg, "resil_close: could not give up the host's %s", what[i]);
      lua_createtable(L, 0, 1);
      lua_pushvalue(L, -2);
      lua_setfield(L, -2, "error");
      if (!host_log_elsewhere(L, "error", msg)) fprintf(stderr, "resil_close: giving up the host's %s: %s\n", what[i], why);
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
}

/* resil_close: calls still running never end; their callbacks hear so. */
void embed_free(resil_t *R) {
  embed_state *st = R->embed;
  if (!st) return;
  deliver(R);
  while (st->unfinished) {
    embed_call *c = st->unfinished;
    unlink_unfinished(st, c);
    if (c->done && !c->abandoned) { /* (resil_error said whatever failed last) */
      resil_set_error(R, "resil_call_async: the host was closed (resil_close) before the call ended");
      c->done(c->ud, RESIL_ERR_INTERRUPT, NULL);
    }
    free_call(c);
  }
  free(st);
  R->embed = NULL;
}
