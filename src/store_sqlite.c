/*
 * store_sqlite.c: the SQLite backend's engine, with group commit.
 *
 * A task submits an operation, fn(tx, ...), and waits. Once per loop turn
 * every operation submitted in that turn runs inside one BEGIN IMMEDIATE
 * transaction (each under its own savepoint, so one failing operation undoes
 * only itself), the transaction commits, a thread of its own makes the WAL
 * durable (wal_sync.c: the loop never waits for the disk), and only then do
 * the tasks continue. Many tasks writing checkpoints cost one fsync per turn
 * instead of one each, and the next batch waits for it, so nothing is read
 * or acted on before it is durable. Without that thread (it could not be
 * started) COMMIT syncs on the loop, synchronous=FULL, as before.
 *
 * The store's logic (idempotency, steps, ledger, budgets) is Lua in
 * src/lua/store_sqlite.lua; this file only runs SQL, fast and safely.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>
#include <string.h>

#include <sqlite3.h>

#include "host.h"

#define DB_MT "resil.SqliteDb"
#define TX_MT "resil.SqliteTx"
#define DEFAULT_TIMEOUT 5.0 /* seconds an operation may wait for another process's write lock */
/* a checkpoint, by the syncer thread, once the WAL holds this many frames
 * (SQLite's own wal_autocheckpoint): each ends with the store's batches
 * waiting for a short second one (checkpointing). 4,000 made those rarer but
 * the disk's bursts longer: a gateway's p99 at one connection went from 5.5
 * to 10-14 ms on a store of some 100,000 rows. */
#define CHECKPOINT_FRAMES 1000
/* A batch of db:commit_only writes only is synced this long after its commit
 * (with whatever commits before then): nobody waits for it, and a sync per
 * batch held every next batch behind it (a gateway's ledger row answered
 * 375 us at the median at one connection instead of 113 us). It bounds what
 * a power cut may lose of such writes; a crash of the process loses none. */
#define COMMIT_ONLY_SYNC_DELAY_US 10000
/* Detached ops (db:enqueue) are committed this long after the first of them
 * was queued, with whatever comes meanwhile, or sooner with an op a task
 * waits for. Committed in the same loop turn, a gateway's ledger row went
 * before the answer that queued it (libevent writes the answer a turn
 * later); the batch pays too: a commit per row gave p50 232 us at one
 * connection, the 2 ms batch 177 us (10 ms: 174 us, and more recent rows for
 * a crash of the host to lose). */
#define DETACHED_FLUSH_DELAY_US 2000
/* A detached op waits this long for another process's write lock, not the
 * store's timeout: nobody waits for it, and it records a call already paid
 * for. It stays queued meanwhile, so a stop (db_close_all) still writes it;
 * a task that retried it instead was dropped with the loop, and with it
 * every row of the gateway's answers while a backup held the lock. */
#define DETACHED_LOCK_WAIT 60.0

typedef struct op op;
struct op {
  task *t;
  struct store_db *d;
  int ref_fn_args; /* a table {fn, args...} in the registry */
  int ref_result;  /* {n = k, ...} after the flush */
  int failed;      /* 1: fn raised (result holds the error); 2: the store failed */
  int committed_enough; /* db:commit_only: its task continues at the commit, before the sync */
  int detached;    /* db:enqueue: no task waits; ref_done (if any) is told the outcome */
  int ref_done;
  int insert;      /* db:insert_later: the row statement's number + 1 (ref_fn_args: the row) */
  int changed;     /* ...and its statement wrote a row */
  struct timespec queued_at; /* a detached op's, for DETACHED_LOCK_WAIT */
  op *next;
  op *woken_prev, *woken_next; /* its task woken, its continuation not run yet (store_db's woken) */
  int is_woken;
};

/* A row statement (db:row_statement): one INSERT whose parameters are a
 * row array's first values, run in C at the group commit, and its callbacks. */
#define ROW_STATEMENTS 4
typedef struct row_statement {
  sqlite3_stmt *st;
  int nparams;
  int ref_committed; /* committed(rows, n): once per batch */
  int ref_failed;    /* failed(err, row): per row */
} row_statement;

typedef struct store_db {
  resil_t *R;
  sqlite3 *db;
  char *path;
  char *readonly_uri; /* the file is not ours to write: opened read-only by this (readonly_uri) */
  int group_commit;
  op *head, *tail;
  op *woken; /* ops done whose tasks have not resumed: freed at the host's close, as nothing else would */
  struct event *flush_ev;
  struct event *retry_ev; /* another process holds the write lock: try again later */
  int waiting_lock, lock_attempts;
  struct timespec lock_since;
  double timeout; /* the longest wait for the write lock; then store_unavailable */
  int ref_stmts; /* sql -> lightuserdata stmt */
  sqlite3_stmt *ctl[5]; /* the transaction statements, prepared once (see exec_ctl) */
  int in_tx;
  int task_tx; /* run_now's fn runs: its statements are a task's own, which the watchdog's stop interrupts */
  long commits, ops;
  wal_syncer *syncer; /* NULL: synchronous=FULL, COMMIT syncs */
  int sync_pending;   /* a sync is under way: the next batch waits for it (a commit during it
                       * would wait in the kernel for the pages being written back, on the loop),
                       * unless it is all db:commit_only (at most one sync per few ms then) */
  int wal_frames;     /* frames in the WAL after the last commit (wal_hook) */
  op *syncing;        /* the batch committed and being made durable */
  int sync_error;     /* errno of a failed sync: the store refuses operations from then on */
  int closing;        /* the detached ops written at close: a failed one's done is told closing = true */
  struct timespec close_wait_from; /* the host closing: when its first write at close began (lock_wait_ms) */
  int close_waited;                /* ...once it has */
  int unsynced;       /* commit_only batches committed since the last sync asked for */
  int unsynced_due;   /* their time came during a sync: synced after it (synced_cb) */
  int checkpointing;  /* 1: the syncer copies a long WAL, batches go on; 2: then what they
                       * wrote meanwhile, batches wait (so the next restarts the WAL) */
  struct timespec contended_at; /* when another process last held the write lock we asked for */
  struct event *unsynced_ev; /* syncs them (COMMIT_ONLY_SYNC_DELAY_US) */
  struct event *detached_ev; /* commits detached ops (DETACHED_FLUSH_DELAY_US) */
  row_statement rows[ROW_STATEMENTS];
  int nrows;
  int wal_known;       /* the WAL and -shm SQLite has open, once seen (wal_moved) */
  dev_t wal_dev, shm_dev;
  ino_t wal_ino, shm_ino;
  char *shm_path;        /* the -shm SQLite maps (shm_broken), once known */
  off_t shm_size;        /* its largest size seen */
  const char *shm_error; /* SHM_TRUNCATED or SHM_LOCKED: operations are refused from then on */
  int page_size;         /* the file's (a WAL frame is that and 24 bytes) */
  int room_checked_at;   /* the WAL's frames when the disk's free room was last looked at */
  int short_of_room;     /* too little of it for the WAL to reach CHECKPOINT_FRAMES (count_frames) */
  sql_reader *reader;    /* db:scan's thread, from its first read (sql_reader.c) */
} store_db;

static store_db *check_db(lua_State *L, int idx) {
  store_db *d = luaL_checkudata(L, idx, DB_MT);
  if (!d->db) luaL_error(L, "store: the database is closed");
  return d;
}

/* ---------- statements ---------- */

/* The statement of the SQL text at stack index `at`, prepared on first use.
 * Looked up by that Lua string itself: a constant in a script keeps its
 * hash, where a C string would be copied into a new one on every call. */
static sqlite3_stmt *prepare(lua_State *L, store_db *d, int at) {
  const char *sql = luaL_checkstring(L, at);
  lua_rawgeti(L, LUA_REGISTRYINDEX, d->ref_stmts);
  lua_pushvalue(L, at);
  lua_rawget(L, -2);
  sqlite3_stmt *st = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!st) {
    if (sqlite3_prepare_v2(d->db, sql, -1, &st, NULL) != SQLITE_OK) {
      lua_pop(L, 1);
      luaL_error(L, "store: %s in: %s", sqlite3_errmsg(d->db), sql);
    }
    lua_pushvalue(L, at);
    lua_pushlightuserdata(L, st);
    lua_rawset(L, -3);
  }
  lua_pop(L, 1);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return st;
}

static void bind_args(lua_State *L, sqlite3_stmt *st, int first, int last) {
  for (int i = first; i <= last; i++) {
    int pos = i - first + 1;
    switch (lua_type(L, i)) {
    case LUA_TNIL: sqlite3_bind_null(st, pos); break;
    case LUA_TBOOLEAN: sqlite3_bind_int(st, pos, lua_toboolean(L, i)); break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, i)) sqlite3_bind_int64(st, pos, lua_tointeger(L, i));
      else sqlite3_bind_double(st, pos, lua_tonumber(L, i));
      break;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, i, &len);
      sqlite3_bind_text(st, pos, s, (int)len, SQLITE_TRANSIENT);
      break;
    }
    default: luaL_error(L, "store: cannot bind a %s (parameter %d)", luaL_typename(L, i), pos);
    }
  }
}

static void push_column(lua_State *L, sqlite3_stmt *st, int col) {
  switch (sqlite3_column_type(st, col)) {
  case SQLITE_INTEGER: lua_pushinteger(L, sqlite3_column_int64(st, col)); break;
  case SQLITE_FLOAT: lua_pushnumber(L, sqlite3_column_double(st, col)); break;
  case SQLITE_NULL: lua_pushnil(L); break;
  default:
    lua_pushlstring(L, (const char *)sqlite3_column_blob(st, col), (size_t)sqlite3_column_bytes(st, col));
    break;
  }
}

/* A statement of d's that writes is under way. SQLite rolls the whole
 * transaction back when one is interrupted (sqlite3VdbeHalt: only a read
 * ends alone), savepoints and all */
static int writing(store_db *d) {
  for (sqlite3_stmt *s = sqlite3_next_stmt(d->db, NULL); s; s = sqlite3_next_stmt(d->db, s))
    if (sqlite3_stmt_busy(s) && !sqlite3_stmt_readonly(s)) return 1;
  return 0;
}

/* SQLite's progress handler, every WATCHDOG_SQL_STEPS of its VM: a task's
 * own statement (db:read, db:now) is interrupted once the watchdog stops the
 * task (watchdog.c), or at Ctrl-C in a task's resume (it ran to its end
 * first; the host's own statements as it closes are not cut). In the group
 * commit, an op's statement only at the watchdog's stop and only if it
 * reads: the batch's transaction holds other tasks' writes and the queued
 * ledger rows, which an interrupted write would roll back with it (a long
 * write there runs on; the stuck exit ends the process as before). */
static int task_statement_progress(void *arg) {
  store_db *d = arg;
  if (d->task_tx)
    return watchdog_sql_progress(d->R) || (d->R->interrupted && (atomic_load(&d->R->resume_seq) & 1) && d->R->current);
  return d->in_tx && watchdog_sql_progress(d->R) && !writing(d);
}

/* A failed statement. Trouble from the world (the file is read-only,
 * corrupt, the disk full, another process holds the lock) is raised as a
 * store_unavailable error value, which the waiting task receives as
 * nil, err; anything else is a bug in the SQL and raises as it is. */
/* rc is trouble from the world (the file, the disk, another process), not a bug in the SQL */
static int store_trouble(int rc) {
  switch (rc & 0xff) {
  case SQLITE_READONLY: case SQLITE_IOERR: case SQLITE_CORRUPT: case SQLITE_NOTADB: case SQLITE_FULL:
  case SQLITE_CANTOPEN: case SQLITE_BUSY: case SQLITE_LOCKED: case SQLITE_NOMEM: case SQLITE_PERM:
  case SQLITE_PROTOCOL:
    return 1;
  default: return 0;
  }
}

/* the bytes of one WAL frame: a page and its header */
static double frame_bytes(const store_db *d) { return (d->page_size > 0 ? d->page_size : 4096) + 24; }

/* the process's file-size limit (ulimit -f) in bytes; 0 for none */
static double file_size_limit(void) {
  struct rlimit lim;
  if (getrlimit(RLIMIT_FSIZE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY) return 0;
  return (double)lim.rlim_cur;
}

/* The file or its WAL within a page of the process's file-size limit
 * (ulimit -f): a write that failed there failed EFBIG, which SQLite reports
 * as a bare "disk I/O error" (its errno gone by then) */
static int at_file_size_limit(const store_db *d) {
  double most = file_size_limit();
  const char *full = d->db ? sqlite3_db_filename(d->db, "main") : NULL; /* (not d->path: relative, after a chdir) */
  if (!full || !*full || most == 0) return 0;
  double frame = frame_bytes(d);
  char wal[PATH_MAX];
  snprintf(wal, sizeof wal, "%s-wal", full);
  struct stat st;
  return (stat(full, &st) == 0 && (double)st.st_size + frame > most) ||
         (stat(wal, &st) == 0 && (double)st.st_size + frame > most);
}

/* what SQLite said, and why a write was refused when the file is not this
 * process's to write, or would grow past the file-size limit, or the disk
 * is full: SQLite says "disk I/O error" when the -shm beside a store nobody
 * has open cannot be made on a full disk (every command, `costs` and `runs
 * show` too, said only that) */
static int wal_without_shm(store_db *d);
static const char *refusal_note(store_db *d, int rc) {
  if (d->readonly_uri && (rc & 0xff) == SQLITE_READONLY)
    return " (this process may read the file, not write it: opened read-only)";
  if (d->readonly_uri && (rc & 0xff) == SQLITE_CANTOPEN && wal_without_shm(d))
    return " (its -wal holds what a writer left, and SQLite needs the -shm beside it, gone, to read that; this "
           "process may read the file, not make the -shm: open it once as a user who may write it)";
  if ((rc & 0xff) == SQLITE_IOERR && at_file_size_limit(d))
    return " (the file would grow past the process's file-size limit, ulimit -f)";
  if ((rc & 0xff) == SQLITE_IOERR && sqlite3_system_errno(d->db) == ENOSPC)
    return " (no space left on the disk)";
  if ((rc & 0xff) == SQLITE_IOERR && sqlite3_system_errno(d->db) == EDQUOT)
    return " (the disk quota is used up)";
  return "";
}

static int sql_failed(lua_State *L, store_db *d, int rc) {
  if ((rc & 0xff) == SQLITE_INTERRUPT) watchdog_sql_stopped(L, d->R); /* the watchdog's stop, if it was */
  if (!store_trouble(rc))
    return luaL_error(L, "store %s: %s%s", d->path ? d->path : "?", sqlite3_errmsg(d->db), refusal_note(d, rc));
  resil_push_error(L, "store_unavailable", "store %s: %s%s", d->path ? d->path : "?", sqlite3_errmsg(d->db),
                   refusal_note(d, rc));
  /* busy = true: worth another try (migrate, read): a read transaction's
   * first statement finds the file busy while another process recovers
   * the WAL it has just opened, or checkpoints it as it closes */
  if ((rc & 0xff) == SQLITE_BUSY) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "busy");
  }
  return lua_error(L);
}

/* Is the value at idx a store_unavailable error value? Leaves the stack as it was. */
static int is_store_unavailable(lua_State *L, int idx) {
  if (!lua_istable(L, idx)) return 0;
  lua_getfield(L, idx, "kind");
  int yes = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "store_unavailable") == 0;
  lua_pop(L, 1);
  return yes;
}

static store_db *check_tx(lua_State *L) {
  store_db **pd = luaL_checkudata(L, 1, TX_MT);
  if (!*pd || !(*pd)->in_tx) luaL_error(L, "store: a transaction handle used outside its transaction");
  /* SQLite rolled the whole transaction back (an interrupted or failed write: the watchdog's stop, a
   * full disk) and fn caught the error: a statement now would commit on its own, outside it */
  if (sqlite3_get_autocommit((*pd)->db))
    luaL_error(L, "store %s: the transaction was rolled back by a statement that failed; no statement runs in it "
               "any more", (*pd)->path ? (*pd)->path : "?");
  return *pd;
}

/* tx:exec(sql, ...) -> rows changed */
static int tx_exec(lua_State *L) {
  store_db *d = check_tx(L);
  sqlite3_stmt *st = prepare(L, d, 2);
  bind_args(L, st, 3, lua_gettop(L));
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {}
  if (rc != SQLITE_DONE) return sql_failed(L, d, rc);
  lua_pushinteger(L, sqlite3_changes(d->db));
  return 1;
}

/* tx:rows(sql, ...) -> { {col = value, ...}, ... } */
static int tx_rows(lua_State *L) {
  store_db *d = check_tx(L);
  sqlite3_stmt *st = prepare(L, d, 2);
  bind_args(L, st, 3, lua_gettop(L));
  lua_newtable(L);
  int rc, n = 0, cols = sqlite3_column_count(st);
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    lua_createtable(L, 0, cols);
    for (int c = 0; c < cols; c++) {
      push_column(L, st, c);
      lua_setfield(L, -2, sqlite3_column_name(st, c));
    }
    lua_rawseti(L, -2, ++n);
  }
  if (rc != SQLITE_DONE) return sql_failed(L, d, rc);
  return 1;
}

/* tx:each(sql, fn, ...) -> the rows given to fn one at a time as SQLite steps
 * (a table each, kept by no one: an export of a million ledger rows held
 * every row at once, hundreds of MB). fn runs inside the step: it cannot
 * yield, and what it raises ends the read. */
static int tx_each(lua_State *L) {
  store_db *d = check_tx(L);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  sqlite3_stmt *st = prepare(L, d, 2);
  bind_args(L, st, 4, lua_gettop(L));
  int rc, cols = sqlite3_column_count(st);
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    lua_pushvalue(L, 3);
    lua_createtable(L, 0, cols);
    for (int c = 0; c < cols; c++) {
      push_column(L, st, c);
      lua_setfield(L, -2, sqlite3_column_name(st, c));
    }
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
      sqlite3_reset(st);
      return lua_error(L);
    }
  }
  if (rc != SQLITE_DONE) return sql_failed(L, d, rc);
  return 0;
}

/* tx:row(sql, ...) -> the first row or nil */
static int tx_row(lua_State *L) {
  tx_rows(L);
  lua_rawgeti(L, -1, 1);
  return 1;
}

/* tx:value(sql, ...) -> the first column of the first row, or nil */
static int tx_value(lua_State *L) {
  store_db *d = check_tx(L);
  sqlite3_stmt *st = prepare(L, d, 2);
  bind_args(L, st, 3, lua_gettop(L));
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) push_column(L, st, 0);
  else if (rc == SQLITE_DONE) lua_pushnil(L);
  else return sql_failed(L, d, rc);
  sqlite3_reset(st);
  return 1;
}

/* ---------- group commit ---------- */

static int exec_sql(store_db *d, const char *sql) { return sqlite3_exec(d->db, sql, NULL, NULL, NULL); }

/* The statements every operation and batch runs, prepared once: parsing
 * them again for each op cost more than the op's own insert. */
enum { CTL_BEGIN, CTL_COMMIT, CTL_SAVEPOINT, CTL_RELEASE, CTL_ROLLBACK_TO };
static const char *const CTL_SQL[] = {"BEGIN IMMEDIATE", "COMMIT", "SAVEPOINT op", "RELEASE op", "ROLLBACK TO op"};

static int exec_ctl(store_db *d, int which) {
  sqlite3_stmt *st = d->ctl[which];
  if (!st) {
    int rc = sqlite3_prepare_v2(d->db, CTL_SQL[which], -1, &st, NULL);
    if (rc != SQLITE_OK) return rc;
    d->ctl[which] = st;
  }
  int rc = sqlite3_step(st);
  sqlite3_reset(st);
  return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static void op_free(lua_State *L, op *o) {
  luaL_unref(L, LUA_REGISTRYINDEX, o->ref_fn_args);
  luaL_unref(L, LUA_REGISTRYINDEX, o->ref_result);
  luaL_unref(L, LUA_REGISTRYINDEX, o->ref_done);
  free(o);
}

/* An op whose task was woken (its result due) is on its store's woken list until the task's
 * continuation takes it, or a cancel gives it back: a host closed in between (resil_close after
 * the commit, before the task ran again) leaked it (72 bytes each) */
static void woken_add(store_db *d, op *o) {
  o->woken_prev = NULL;
  o->woken_next = d->woken;
  if (d->woken) d->woken->woken_prev = o;
  d->woken = o;
  o->is_woken = 1;
}
static void woken_remove(op *o) {
  if (!o->is_woken) return;
  if (o->woken_prev) o->woken_prev->woken_next = o->woken_next;
  else o->d->woken = o->woken_next;
  if (o->woken_next) o->woken_next->woken_prev = o->woken_prev;
  o->is_woken = 0;
}

/* Run one op on L (the main state) under a savepoint; store its results.
 * timed: watchdog_batch_begin's */
static void run_op(lua_State *L, store_db *d, op *o, int txh, int timed) {
  exec_ctl(d, CTL_SAVEPOINT);
  int base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_fn_args);
  int n = (int)lua_rawlen(L, -1);
  int args = lua_gettop(L);
  lua_rawgeti(L, args, 1);
  lua_pushvalue(L, txh);
  for (int i = 2; i <= n; i++) lua_rawgeti(L, args, i);
  /* timed by the watchdog as a task's resume is: a loop in fn is stopped, its savepoint rolled back */
  if (timed == 1) watchdog_op_begin(d->R, o->detached + o->committed_enough, o->ref_fn_args);
  int rc = lua_pcall(L, n, LUA_MULTRET, 0); /* the error value as raised: tables stay tables */
  if (timed == 1) watchdog_op_end(d->R);
  if (rc != LUA_OK) {
    exec_ctl(d, CTL_ROLLBACK_TO);
    o->failed = 1;
  }
  exec_ctl(d, CTL_RELEASE);
  int nres = lua_gettop(L) - args;
  lua_createtable(L, nres, 1);
  for (int i = 1; i <= nres; i++) {
    lua_pushvalue(L, args + i);
    lua_rawseti(L, -2, i);
  }
  lua_pushinteger(L, nres);
  lua_setfield(L, -2, "n");
  o->ref_result = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_settop(L, base);
}

static void fail_op(lua_State *L, op *o, const char *why) {
  o->failed = 2;
  lua_pushstring(L, why);
  o->ref_result = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* A row op (db:insert_later): its statement bound from the row's values
 * and run, in C. No savepoint: one statement that fails undoes only itself
 * (SQLite's statement journal), and one whose failure rolls the whole
 * transaction back stops the batch as an op's does (commit_batch). A value
 * that cannot be bound fails the row, never the batch. The strings are
 * bound without a copy: the row table, referenced by the op, holds them,
 * and the bindings are cleared before the op ends. */
static void run_row(lua_State *L, store_db *d, op *o) {
  row_statement *rs = &d->rows[o->insert - 1];
  sqlite3_stmt *st = rs->st;
  int base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_fn_args);
  int row = base + 1;
  for (int i = 1; i <= rs->nparams; i++) {
    int t = lua_rawgeti(L, row, i);
    if (t == LUA_TSTRING) {
      size_t len;
      const char *v = lua_tolstring(L, -1, &len);
      sqlite3_bind_text(st, i, v, (int)len, SQLITE_STATIC);
    } else if (t == LUA_TNUMBER) {
      if (lua_isinteger(L, -1)) sqlite3_bind_int64(st, i, lua_tointeger(L, -1));
      else sqlite3_bind_double(st, i, lua_tonumber(L, -1));
    } else if (t == LUA_TNIL) {
      /* NULL already: a statement's parameters are until bound, and each row's are cleared as it ends
       * (below; a row's are half of its fifteen) */
    } else if (t == LUA_TBOOLEAN) {
      sqlite3_bind_int(st, i, lua_toboolean(L, -1));
    } else {
      lua_pushfstring(L, "store: cannot bind a %s (parameter %d)", luaL_typename(L, -1), i);
      o->failed = 1;
      o->ref_result = luaL_ref(L, LUA_REGISTRYINDEX);
      sqlite3_clear_bindings(st);
      lua_settop(L, base);
      return;
    }
    lua_pop(L, 1);
  }
  int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) {
    o->changed = sqlite3_changes(d->db) > 0;
  } else {
    switch (rc & 0xff) { /* as sql_failed: trouble from the world, or a bug */
    case SQLITE_READONLY: case SQLITE_IOERR: case SQLITE_CORRUPT: case SQLITE_NOTADB: case SQLITE_FULL:
    case SQLITE_CANTOPEN: case SQLITE_BUSY: case SQLITE_LOCKED: case SQLITE_NOMEM: case SQLITE_PERM:
    case SQLITE_PROTOCOL: o->failed = 2; break;
    default: o->failed = 1;
    }
    lua_pushfstring(L, "store %s: %s%s", d->path ? d->path : "?", sqlite3_errmsg(d->db), refusal_note(d, rc));
    o->ref_result = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  lua_settop(L, base);
}

/* A file deleted (or replaced) under an open store: its writes would go to
 * an inode no one will ever open again, while the next process makes a
 * new, empty store and runs every step again. A write is refused instead
 * (one stat of the path, in a write transaction). */
#define FILE_MOVED "its file was deleted or replaced since it was opened; nothing is written to it any more"
#define WAL_MOVED "its -wal or -shm file was deleted or replaced since it was opened; nothing is written to it any " \
                  "more"

/* The -shm SQLite keeps beside a WAL ("x.db-wal" -> "x.db-shm") -> shm, or NULL (no WAL, too long) */
static const char *shm_name(const char *wal, char shm[PATH_MAX]) {
  if (!wal || snprintf(shm, PATH_MAX, "%.*s-shm", (int)strlen(wal) - 4, wal) >= PATH_MAX) return NULL;
  return shm;
}

/* The same for the WAL and its index (a cleanup of "temporary" files took state.db-wal or
 * state.db-shm): SQLite wrote on into the deleted WAL, which no other process reads (one opened
 * after both were gone saw none of its commits: a budget's spend $0), or kept its locks and index
 * in the deleted -shm while another process made a new one, both then writing the WAL unaware of
 * each other (the file was "not a database" after). SQLite never removes or replaces either while
 * a connection has them open, so one gone or another is that. (A stat of each by the names SQLite
 * uses, against what they were at open.) -> 1 moved */
static const char *wal_name(store_db *d) {
  const char *main = sqlite3_db_filename(d->db, "main");
  if (!main || !main[0]) return NULL; /* (a temporary or in-memory database: no file, no WAL) */
  const char *wal = sqlite3_filename_wal(main);
  return wal && wal[0] ? wal : NULL;
}

static int wal_moved(store_db *d) {
  const char *wal = wal_name(d);
  char buf[PATH_MAX];
  const char *shm = shm_name(wal, buf);
  if (!shm) return 0;
  struct stat w, m;
  int has_w = stat(wal, &w) == 0, has_m = stat(shm, &m) == 0;
  if (!d->wal_known) { /* (at open, or the first write: both exist once a read has begun) */
    if (!has_w || !has_m) return 0;
    d->wal_known = 1;
    d->wal_dev = w.st_dev, d->wal_ino = w.st_ino;
    d->shm_dev = m.st_dev, d->shm_ino = m.st_ino;
    return 0;
  }
  return !has_w || !has_m || w.st_dev != d->wal_dev || w.st_ino != d->wal_ino || m.st_dev != d->shm_dev ||
         m.st_ino != d->shm_ino;
}

/* Another process may have written since ours were deleted: into our WAL by an index of its own
 * (another -shm where ours was, our WAL still in its place), which ours does not know of, or into a
 * WAL of its own (frames in it, or pages its checkpoints copied into the file). A copy of our WAL
 * by our index as this one closes would then mix pages. */
static int others_wrote(store_db *d) {
  const char *wal = wal_name(d);
  char buf[PATH_MAX];
  const char *shm = shm_name(wal, buf);
  if (!d->wal_known || !shm) return 0;
  struct stat w, m;
  if (stat(wal, &w) != 0) return 0;
  if (w.st_dev != d->wal_dev || w.st_ino != d->wal_ino) return w.st_size > 0;
  return stat(shm, &m) == 0 && (m.st_dev != d->shm_dev || m.st_ino != d->shm_ino);
}

/* The store's file replaced (a backup moved over it) or deleted under this process: the -wal and
 * -shm by its name are still ours, of the file that went, and SQLite leaves them as it closes (it
 * does not checkpoint into a file that moved). The next process to open the path read our WAL's
 * pages over the new file: a restored backup was "malformed", its whole ledger gone. They are
 * unlinked once the move is seen (nothing in them belongs to the file now there); a -wal or -shm
 * of another inode is someone else's and left. */
static void drop_moved_wal(store_db *d) {
  const char *wal = wal_name(d);
  char buf[PATH_MAX];
  const char *shm = shm_name(wal, buf);
  if (!d->wal_known || !shm) return;
  struct stat w, m;
  if (stat(wal, &w) == 0 && w.st_dev == d->wal_dev && w.st_ino == d->wal_ino) unlink(wal);
  if (stat(shm, &m) == 0 && m.st_dev == d->shm_dev && m.st_ino == d->shm_ino) unlink(shm);
}

static int main_moved(store_db *d) {
  int moved = 0;
  return sqlite3_file_control(d->db, "main", SQLITE_FCNTL_HAS_MOVED, &moved) == SQLITE_OK && moved;
}

/* SQLite reads and writes the -shm through a shared mapping: one truncated (its pages gone) or
 * made immutable (chattr +i) under the process killed it with SIGBUS at its next transaction, or
 * as it closed. SQLite has no error for it short of a VFS of its own (unix-excl and
 * locking_mode=EXCLUSIVE keep the index in memory, but shut every other process out), so the
 * store looks before each transaction begins: one statx of the -shm while it is the file SQLite
 * mapped (its inode as seen). SQLite never shrinks it while a connection has it, so smaller than
 * seen is someone else's truncate. (By its name, not a descriptor of our own: closing one would
 * drop every fcntl lock this process holds on the file, SQLite's included.) Once seen, the store
 * refuses every operation and closes without its checkpoint (which writes there). A change
 * between the look and the transaction still kills the process. -> 0, or the reason */
#define SHM_TRUNCATED "its -shm file was truncated since it was opened; nothing is read from it or written to it " \
                      "any more (restart the process)"
#define SHM_LOCKED "its -shm file was made immutable or append-only (chattr); nothing is read from it or written to " \
                   "it any more (restart the process)"
static const char *shm_broken(store_db *d) {
  if (d->shm_error) return d->shm_error;
  if (!d->shm_path) { /* (once SQLite has made it: wal_moved saw it, its inode kept) */
    char buf[PATH_MAX];
    const char *shm = shm_name(wal_name(d), buf);
    if (!d->wal_known || !shm || !(d->shm_path = strdup(shm))) return NULL;
  }
  struct statx x;
  if (statx(AT_FDCWD, d->shm_path, 0, STATX_SIZE | STATX_INO, &x) != 0 || x.stx_ino != d->shm_ino ||
      makedev(x.stx_dev_major, x.stx_dev_minor) != d->shm_dev)
    return NULL; /* (gone or another's: WAL_MOVED) */
  if ((off_t)x.stx_size < d->shm_size) return d->shm_error = SHM_TRUNCATED;
  d->shm_size = (off_t)x.stx_size;
  if (x.stx_attributes_mask & x.stx_attributes & (STATX_ATTR_IMMUTABLE | STATX_ATTR_APPEND))
    return d->shm_error = SHM_LOCKED;
  return NULL;
}

/* A file opened read-only (another user's, a read-only mount) beside a -wal with frames and no -shm
 * (deleted after its writer died): every read failed "unable to open database file", saying nothing
 * of either. -> 1 so */
static int wal_without_shm(store_db *d) {
  const char *wal = wal_name(d);
  char buf[PATH_MAX];
  const char *shm = shm_name(wal, buf);
  struct stat w, m;
  return shm && stat(wal, &w) == 0 && w.st_size > 0 && stat(shm, &m) != 0 && errno == ENOENT;
}

/* -> 0, or the reason (FILE_MOVED, WAL_MOVED) */
static const char *file_moved(store_db *d) {
  if (main_moved(d)) {
    drop_moved_wal(d);
    return FILE_MOVED;
  }
  return wal_moved(d) ? WAL_MOVED : NULL;
}

/* One transaction for a list of ops; every op gets a result or a failure.
 * began: BEGIN IMMEDIATE already succeeded. */
static int commit_batch(lua_State *L, store_db *d, op *first, int began) {
  const char *moved = began ? file_moved(d) : NULL;
  if (moved) {
    exec_sql(d, "ROLLBACK");
    began = 0;
  }
  if (!began) {
    char why[512];
    if (moved) snprintf(why, sizeof why, "store %s: %s", d->path, moved);
    else if (d->shm_error) snprintf(why, sizeof why, "store %s: %s", d->path, d->shm_error); /* (at close) */
    else snprintf(why, sizeof why, "store %s: %s%s", d->path, sqlite3_errmsg(d->db),
                  refusal_note(d, sqlite3_extended_errcode(d->db)));
    for (op *o = first; o; o = o->next) fail_op(L, o, why);
    return 0;
  }
  store_db **txp = lua_newuserdatauv(L, sizeof *txp, 0);
  *txp = d;
  luaL_setmetatable(L, TX_MT);
  int txh = lua_gettop(L);
  /* SQLite may roll the whole transaction back on an op's error (disk full,
   * an I/O error, out of memory): the ops before it are gone, and each op
   * after it would run and commit on its own (its savepoint a transaction
   * of its own) while the batch reports it failed, so that its caller
   * writes it again: a ledger row twice. The batch stops there instead,
   * every op failed and none written. */
  char why[512] = "";
  d->in_tx = 1;
  op *stopped = NULL;
  int timed = watchdog_batch_begin(d->R, L);
  for (op *o = first; o; o = o->next) {
    if (o->insert) run_row(L, d, o);
    else run_op(L, d, o, txh, timed);
    if (sqlite3_get_autocommit(d->db)) {
      snprintf(why, sizeof why, "store %s: the transaction was rolled back: %s", d->path, sqlite3_errmsg(d->db));
      stopped = o->next;
      break;
    }
  }
  watchdog_batch_end(d->R, timed);
  d->in_tx = 0;
  *txp = NULL; /* a handle kept by fn is dead now */
  lua_pop(L, 1);
  int rc = SQLITE_ABORT;
  if (!why[0]) {
    rc = exec_ctl(d, CTL_COMMIT);
    if (rc != SQLITE_OK)
      snprintf(why, sizeof why, "store %s: commit failed: %s%s", d->path, sqlite3_errmsg(d->db), refusal_note(d, rc));
  }
  if (rc != SQLITE_OK) {
    if (!sqlite3_get_autocommit(d->db)) exec_sql(d, "ROLLBACK");
    for (op *o = first; o != stopped; o = o->next) {
      if (o->ref_result != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, o->ref_result);
      o->ref_result = LUA_NOREF;
      fail_op(L, o, why);
    }
    for (op *o = stopped; o; o = o->next) fail_op(L, o, why); /* never run */
  }
  d->commits++;
  return rc == SQLITE_OK;
}

/* A detached op's outcome, to its done(nil, results...) | done(err), called
 * on the loop outside any task (it may spawn one), or as the store closes
 * (commit_detached_at_close: err.closing, and done must neither spawn nor
 * wait); without a done, a failure is logged. */
static void tell_done(lua_State *L, store_db *d, op *o, int timed) {
  int top = lua_gettop(L);
  if (o->ref_done == LUA_NOREF && !o->failed) return;
  if (o->ref_done != LUA_NOREF) lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_done);
  int nargs = 1;
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_result);
  if (o->failed == 2) {
    const char *why = lua_tostring(L, -1);
    resil_push_error(L, "store_unavailable", "%s", why ? why : "store failed");
    lua_remove(L, -2);
    if (d->closing && lua_istable(L, -1)) { /* nothing will try it again */
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "closing");
    }
  } else if (o->failed == 1) {
    lua_rawgeti(L, -1, 1);
    lua_remove(L, -2);
  } else {
    int res = lua_gettop(L);
    lua_getfield(L, res, "n");
    int n = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    luaL_checkstack(L, n + 1, "store results");
    lua_pushnil(L);
    for (int i = 1; i <= n; i++) lua_rawgeti(L, res, i);
    lua_remove(L, res);
    nargs = n + 1;
  }
  if (o->ref_done == LUA_NOREF) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, d->path);
    lua_setfield(L, -2, "store");
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "error");
    host_log(L, "error", "store: a write nobody waited for failed");
  } else {
    if (timed == 1) watchdog_op_begin(d->R, 3, o->ref_done); /* timed as the op's fn was: a done that loops is stopped */
    int rc = lua_pcall(L, nargs, 0, 0);
    if (timed == 1) watchdog_op_end(d->R);
    if (rc != LUA_OK) {
      lua_createtable(L, 0, 1);
      lua_pushvalue(L, -2);
      lua_setfield(L, -2, "error");
      host_log(L, "error", "store: a write's done callback raised");
    }
  }
  lua_settop(L, top);
}

/* A row op that failed: its statement's failed(err, row), err a
 * store_unavailable error (closing = true as the store closes) or, for a
 * bug (a value that cannot be bound), the message as raised */
static void tell_row_failed(lua_State *L, store_db *d, op *o) {
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, d->rows[o->insert - 1].ref_failed);
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_result);
  if (o->failed == 2) {
    const char *why = lua_tostring(L, -1);
    resil_push_error(L, "store_unavailable", "%s", why ? why : "store failed");
    lua_remove(L, -2);
    if (d->closing && lua_istable(L, -1)) {
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "closing");
    }
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_fn_args);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "error");
    host_log(L, "error", "store: a write's done callback raised");
  }
  lua_settop(L, top);
}

/* Every op of a batch gets its result: its task continues (its
 * continuation frees the op), a detached op's done is told, or the op is
 * freed (its task was canceled). Row ops (db:insert_later) are told per
 * statement, once for the batch: committed(rows written, rows done), the
 * rows done counting those a key already had (INSERT OR IGNORE); not as
 * the store closes (the loop is over), as no done is then. */
static void finish_batch(lua_State *L, store_db *d, op *batch) {
  int top = lua_gettop(L);
  int timed = watchdog_batch_begin(d->R, L);
  int list[ROW_STATEMENTS] = {0}, written[ROW_STATEMENTS] = {0}, done[ROW_STATEMENTS] = {0};
  for (op *o = batch; o;) {
    op *next = o->next;
    d->ops++;
    if (o->t && d->R->closing) { /* (a batch made durable as the host closes, db_close_all: its
                                   * task never runs again, and nothing is woken during the close) */
      op_free(L, o);
    } else if (o->t) {
      woken_add(d, o);
      task_wake(o->t);
    } else if (o->insert) {
      int i = o->insert - 1;
      if (o->failed) {
        tell_row_failed(L, d, o);
      } else {
        done[i]++;
        if (o->changed && !d->closing) {
          if (!list[i]) {
            luaL_checkstack(L, 2, "store rows");
            lua_createtable(L, 16, 0);
            list[i] = lua_gettop(L);
          }
          lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_fn_args);
          lua_rawseti(L, list[i], ++written[i]);
        }
      }
      op_free(L, o);
    } else {
      if (o->detached) tell_done(L, d, o, timed);
      op_free(L, o);
    }
    o = next;
  }
  for (int i = 0; i < d->nrows && !d->closing; i++) {
    if (!done[i]) continue;
    lua_rawgeti(L, LUA_REGISTRYINDEX, d->rows[i].ref_committed);
    if (list[i]) lua_pushvalue(L, list[i]);
    else lua_createtable(L, 0, 0);
    lua_pushinteger(L, done[i]);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
      lua_createtable(L, 0, 1);
      lua_pushvalue(L, -2);
      lua_setfield(L, -2, "error");
      host_log(L, "error", "store: a write's done callback raised");
      lua_pop(L, 1);
    }
  }
  watchdog_batch_end(d->R, timed);
  lua_settop(L, top);
}

/* After each commit: how long the WAL is, for the syncer's checkpoints */
/* A disk with little room: the WAL, copied at CHECKPOINT_FRAMES (4 MB of 4 KB pages), filled a disk
 * with less free than that before its first copy, and every write was refused from then on until
 * room was made (the copy itself needs room for the pages it adds to the file). Every
 * ROOM_CHECK_FRAMES frames the free room is looked at (one statvfs, and the file-size limit, which
 * the WAL reached alike); under twice what the WAL would take to CHECKPOINT_FRAMES, it is copied
 * from ROOM_CHECK_FRAMES on (wal_long), so that it stays short, its space reused from the top, and
 * the room goes to the rows. */
#define ROOM_CHECK_FRAMES 64
static int count_frames(void *arg, sqlite3 *db, const char *name, int frames) {
  store_db *d = arg;
  d->wal_frames = frames;
  if (frames < d->room_checked_at) d->room_checked_at = 0; /* (the WAL restarted from the top) */
  if (frames >= d->room_checked_at + ROOM_CHECK_FRAMES && d->shm_path) {
    d->room_checked_at = frames;
    struct statvfs v;
    double frame = frame_bytes(d), most = file_size_limit(); /* (a file-size limit is as little room, for the WAL itself) */
    d->short_of_room = (statvfs(d->shm_path, &v) == 0 && (double)v.f_bavail * v.f_frsize < 2.0 * CHECKPOINT_FRAMES * frame) ||
                       (most > 0 && most < 2.0 * CHECKPOINT_FRAMES * frame);
  }
  return SQLITE_OK;
}

static void request_sync(store_db *d, op *batch);

/* The syncer made the batch's commit durable (err 0) or could not. */
static void synced_cb(void *arg, int err) {
  store_db *d = arg;
  lua_State *L = d->R->L;
  op *batch = d->syncing;
  d->syncing = NULL;
  d->sync_pending = 0;
  d->R->disk_pending--;
  if (err && !d->sync_error) {
    /* The batch is committed (a retry would write it twice): its results
     * stand, but a disk that failed a sync takes no more writes. */
    d->sync_error = err;
    lua_createtable(L, 0, 2);
    lua_pushstring(L, d->path);
    lua_setfield(L, -2, "store");
    lua_pushstring(L, strerror(err));
    lua_setfield(L, -2, "error");
    host_log(L, "error", "store: the disk failed a sync; its operations are refused until it is opened again");
  }
  finish_batch(L, d, batch);
  if (d->checkpointing == 1 && !d->sync_error && d->syncer) { /* now what was written meanwhile (wal_long) */
    d->checkpointing = 2;
    request_sync(d, NULL);
    return; /* the queued batches wait for it: synced_cb again */
  }
  d->checkpointing = 0;
  /* also during a wait for the write lock: a batch that met the lock during
   * the sync stopped retrying to wait for it (flush_cb) */
  if (d->head) event_active(d->flush_ev, EV_TIMEOUT, 0);
  if (d->unsynced_due) { /* after that flush, whose own sync may cover them */
    struct timeval now = {0, 0};
    d->unsynced_due = 0;
    evtimer_add(d->unsynced_ev, &now);
  }
}

static double seconds_since(const struct timespec *t0) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - t0->tv_sec) + (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

/* How long a write outside the loop may wait inside SQLite for another
 * process's write lock, in ms: the store's timeout. As the host closes
 * (resil_close: what embed_give_up writes for the run, resil.once keys, cost
 * rows, budget holds and probes, then the queue as the store closes) its
 * writes share one such wait, from the first of them, and no later than a
 * graceful stop's end (R->close_by): each waited a timeout of its own, and
 * with the lock held throughout a program's shutdown took five (25 s). One
 * past it still tries once; what it could not write is said lost, row by
 * row. */
static int lock_wait_ms(store_db *d) {
  if (!d->R->closing) return (int)(d->timeout * 1000);
  if (!d->close_waited) {
    clock_gettime(CLOCK_MONOTONIC, &d->close_wait_from);
    d->close_waited = 1;
  }
  double left = d->timeout - seconds_since(&d->close_wait_from);
  if (d->R->close_by > 0) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double by = d->R->close_by - ((double)now.tv_sec + (double)now.tv_nsec / 1e9);
    if (by < left) left = by;
  }
  return left > 0 ? (int)(left * 1000) : 0;
}

/* A wait for another process's write lock begins (its timeout counts from
 * now); attempts: the back-off's step to start from */
static void begin_lock_wait(store_db *d, int attempts) {
  d->waiting_lock = 1;
  d->lock_attempts = attempts;
  d->R->io_pending++; /* real I/O: the virtual clock must not race ahead of it */
  clock_gettime(CLOCK_MONOTONIC, &d->lock_since);
}

/* ...and ends (the lock taken, given up, or nothing left to take it for) */
static void end_lock_wait(store_db *d) {
  if (!d->waiting_lock) return;
  evtimer_del(d->retry_ev);
  d->waiting_lock = 0;
  d->R->io_pending--;
}

/* 0.5 ms .. 4 ms: workers of one gateway take turns on the lock for every
 * group commit; a longer back-off left one idle with its batch queued */
static void retry_lock_later(store_db *d) {
  long usec = 500L << (d->lock_attempts < 3 ? d->lock_attempts : 3);
  d->lock_attempts++;
  struct timeval tv = {0, usec};
  evtimer_add(d->retry_ev, &tv);
}

/* Writes take the write lock without blocking the loop (the busy timeout is
 * 0): when another process holds it, the batch stays queued (and keeps
 * growing) while a timer retries with a growing delay, and the other tasks'
 * I/O goes on meanwhile; after d->timeout the batch fails. */
static int take_write_lock(store_db *d) {
  int rc = exec_ctl(d, CTL_BEGIN);
  if (rc != SQLITE_BUSY || (d->waiting_lock && seconds_since(&d->lock_since) >= d->timeout)) {
    end_lock_wait(d); /* done waiting (or given up: "database is locked") */
    return rc;
  }
  clock_gettime(CLOCK_MONOTONIC, &d->contended_at);
  if (!d->waiting_lock) begin_lock_wait(d, 0);
  retry_lock_later(d);
  return -1;
}

/* A WAL due for a checkpoint: its sync, which copies it, is asked for at once.
 * The copy comes in two (checkpointing): the long one while batches go on,
 * then what they wrote meanwhile while they wait, so that the next batch
 * begins with the WAL all copied and restarts it; otherwise SQLite appends to
 * it for ever (under steady writes: 51.6 MB from 6,000 of them). */
static int wal_long(const store_db *d) {
  return d->wal_frames >= CHECKPOINT_FRAMES || (d->short_of_room && d->wal_frames >= ROOM_CHECK_FRAMES);
}

/* Ask the syncer to make every commit so far durable; batch (may be NULL)
 * continues when it is. The next batch waits for it (sync_pending). */
static void request_sync(store_db *d, op *batch) {
  int checkpoint = wal_long(d);
  if (checkpoint && !d->checkpointing) d->checkpointing = 1;
  d->syncing = batch;
  d->sync_pending = 1;
  d->unsynced = 0; /* this sync covers them */
  evtimer_del(d->unsynced_ev);
  d->R->disk_pending++; /* the virtual clock stands still until it is: a disk always answers */
  wal_syncer_request(d->syncer, checkpoint);
}

/* commit_only batches committed a while ago: synced now, or after the sync
 * under way (they may have committed during it) */
static void unsynced_cb(evutil_socket_t fd, short what, void *arg) {
  store_db *d = arg;
  if (!d->unsynced || !d->syncer) return;
  if (d->sync_pending) {
    d->unsynced_due = 1;
    return;
  }
  request_sync(d, NULL);
}

/* Ops that all continue at their commit: they need not wait for a sync under
 * way (theirs comes with the next, COMMIT_ONLY_SYNC_DELAY_US later)... */
static int only_commit_only(const op *o) {
  for (; o; o = o->next)
    if (!o->committed_enough) return 0;
  return 1;
}

/* ...unless other processes write the store too: then every batch waits for
 * the sync of the one before, as the others' do, which spaces the commits
 * out (committing every turn, two gateway workers took the write lock from
 * each other and served 11 % less)... */
static int contended(const store_db *d) {
  return d->contended_at.tv_sec != 0 && seconds_since(&d->contended_at) < 1.0;
}

/* The queue's ops that `take` picks, taken out of it in order (the others
 * stay queued, in order) -> them */
static op *take_ops(store_db *d, int (*take)(const op *)) {
  op *taken = NULL, **taken_tail = &taken, **link = &d->head;
  d->tail = NULL;
  while (*link) {
    op *o = *link;
    if (take(o)) {
      *link = o->next;
      o->next = NULL;
      *taken_tail = o;
      taken_tail = &o->next;
    } else {
      d->tail = o;
      link = &o->next;
    }
  }
  return taken;
}

/* The lock's wait gave up after the store's timeout: the ops whose tasks
 * waited for it fail; detached ops wait again, up to DETACHED_LOCK_WAIT. */
static int past_lock_wait(const op *o) {
  return !o->detached || seconds_since(&o->queued_at) >= DETACHED_LOCK_WAIT;
}

static int is_detached(const op *o) { return o->detached; }

static void flush_head(lua_State *L, store_db *d, int began);

static void flush_cb(evutil_socket_t fd, short what, void *arg) {
  store_db *d = arg;
  lua_State *L = d->R->L;
  /* after the sync (synced_cb flushes again), unless nobody would wait for one */
  if (!d->head || (d->sync_pending && (contended(d) || d->checkpointing == 2 || !only_commit_only(d->head)))) return;
  if (d->sync_error) {
    char why[512];
    snprintf(why, sizeof why, "store %s: the disk failed a sync (%s): operations are refused until it is opened again",
             d->path, strerror(d->sync_error));
    op *batch = d->head;
    d->head = d->tail = NULL;
    for (op *o = batch; o; o = o->next) fail_op(L, o, why);
    finish_batch(L, d, batch);
    return;
  }
  if (shm_broken(d)) {
    char why[512];
    snprintf(why, sizeof why, "store %s: %s", d->path, d->shm_error);
    op *batch = d->head;
    d->head = d->tail = NULL;
    for (op *o = batch; o; o = o->next) fail_op(L, o, why);
    finish_batch(L, d, batch);
    return;
  }
  int rc = take_write_lock(d);
  if (rc == -1) return; /* retried by the timer */
  if (rc == SQLITE_BUSY) { /* waited the timeout: the tasks' ops fail, detached ops wait on */
    op *failing = take_ops(d, past_lock_wait);
    if (d->head) { /* detached ops wait on, at the longest back-off: the lock has been held a while */
      begin_lock_wait(d, 3);
      retry_lock_later(d);
    }
    if (!failing) return;
    commit_batch(L, d, failing, 0);
    finish_batch(L, d, failing);
    return;
  }
  flush_head(L, d, rc == SQLITE_OK);
}

/* The queue's ops in one transaction (began: BEGIN IMMEDIATE succeeded; else
 * they fail), then their tasks continue, now or after the sync. */
static void flush_head(lua_State *L, store_db *d, int began) {
  op *batch = d->head;
  if (d->group_commit) {
    d->head = d->tail = NULL;
  } else { /* one operation per transaction: the rest wait for the next turn */
    op *rest = batch->next;
    batch->next = NULL;
    d->head = rest;
    if (!rest) d->tail = NULL;
    else event_active(d->flush_ev, EV_TIMEOUT, 0);
  }
  int committed = commit_batch(L, d, batch, began);
  if (committed && d->syncer) {
    /* db:commit_only ops continue now; the others when the batch is durable (synced_cb) */
    op *wait = NULL, **tail = &wait, *now = NULL, **now_tail = &now;
    for (op *o = batch, *next; o; o = next) {
      next = o->next;
      o->next = NULL;
      if (o->committed_enough) {
        *now_tail = o;
        now_tail = &o->next;
      } else {
        *tail = o;
        tail = &o->next;
      }
    }
    /* nobody waits for the sync: soon, with the commits until then; or after
     * the sync under way (only such a batch commits during one: a second
     * request would take the place of the batch that one makes durable) */
    if (!wait && (d->sync_pending || (!contended(d) && !wal_long(d)))) {
      if (!d->unsynced) {
        struct timeval tv = {0, COMMIT_ONLY_SYNC_DELAY_US};
        evtimer_add(d->unsynced_ev, &tv);
      }
      d->unsynced = 1;
      finish_batch(L, d, now);
      return;
    }
    request_sync(d, wait);
    finish_batch(L, d, now);
    return;
  }
  finish_batch(L, d, batch);
}

/* Canceled while queued (a flush wakes every task it ran, so a waiting
 * task's op has not run): it never runs. A reservation made for a caller
 * that gave up would hold budget nobody settles. */
static void op_canceled(void *arg) {
  op *o = arg;
  store_db *d = o->d;
  op *prev = NULL;
  for (op *p = d->head; p; prev = p, p = p->next) {
    if (p != o) continue;
    if (prev) prev->next = o->next;
    else d->head = o->next;
    if (d->tail == o) d->tail = prev;
    op_free(d->R->L, o);
    if (!d->head) end_lock_wait(d); /* nothing left to take the lock for */
    return;
  }
  o->t = NULL; /* not queued (cannot happen): it runs, and nobody waits */
}

/* Flushed and canceled before it resumed: nobody will read the result. */
static void op_give_back(void *arg) {
  op *o = arg;
  woken_remove(o);
  op_free(o->d->R->L, o);
}

/* Committed and being made durable: it has happened; its task gets the
 * result before a cancel takes effect (loop.c, task_stop). */
static int op_settling(void *arg) {
  op *o = arg;
  if (o->is_woken) return 0; /* its task woken: a cancel gives the result back (op_give_back) */
  for (op *p = o->d->head; p; p = p->next)
    if (p == o) return 0;
  return 1;
}

static const task_wait_ops store_op_wait = {op_canceled, op_give_back, op_settling};

static int tx_k(lua_State *L, int status, lua_KContext ctx) {
  op *o = (op *)ctx;
  int failed = o->failed;
  woken_remove(o);
  luaL_unref(L, LUA_REGISTRYINDEX, o->ref_fn_args);
  lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_result);
  luaL_unref(L, LUA_REGISTRYINDEX, o->ref_result);
  free(o);
  int res = lua_gettop(L);
  /* Such a failure was not written, and never will be: the batch was rolled back or never
   * began (a full disk, the lock held past the timeout), or the op's savepoint was. err.sent =
   * false says so, as for a Redis command never sent: a reservation or a claim whose outcome
   * its caller saw has nothing to give back (each spawned a minute of writes to a full disk,
   * which logged that a hold it never made "counts until its hold ends"). */
  if (failed == 2) {
    resil_error_result(L, "store_unavailable", "%s", lua_tostring(L, res));
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "sent");
    return 2;
  }
  lua_getfield(L, res, "n");
  int n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (failed == 1) {
    lua_rawgeti(L, res, 1);
    if (is_store_unavailable(L, -1)) {
      lua_pushboolean(L, 0);
      lua_setfield(L, -2, "sent");
      lua_pushnil(L);
      lua_insert(L, -2);
      return 2; /* nil, err: the file or the disk failed, not the caller */
    }
    return lua_error(L);
  }
  luaL_checkstack(L, n, "store results");
  for (int i = 1; i <= n; i++) lua_rawgeti(L, res, i);
  return n;
}

static void queue_op(store_db *d, op *o, int detached);

/* queues fn(tx, ...) (the values from index `first` on) for the next group
 * commit: this loop turn's, or a detached op's (see DETACHED_FLUSH_DELAY_US) */
static op *enqueue(lua_State *L, store_db *d, int first, int detached) {
  luaL_checktype(L, first, LUA_TFUNCTION);
  int n = lua_gettop(L) - first + 1;
  lua_createtable(L, n, 0);
  for (int i = 1; i <= n; i++) {
    lua_pushvalue(L, first + i - 1);
    lua_rawseti(L, -2, i);
  }
  op *o = calloc(1, sizeof *o); /* freed by the continuation, or by the flush */
  if (!o) luaL_error(L, "out of memory");
  o->ref_fn_args = luaL_ref(L, LUA_REGISTRYINDEX);
  queue_op(d, o, detached);
  return o;
}

/* o at the queue's end, its flush scheduled */
static void queue_op(store_db *d, op *o, int detached) {
  o->ref_result = o->ref_done = LUA_NOREF;
  o->d = d;
  if (d->tail) d->tail->next = o;
  else d->head = o;
  d->tail = o;
  if (d->waiting_lock) return; /* the lock's retry timer flushes */
  /* (on the virtual clock, this turn: time would move on past the real
   * delay, and a sleep of hours end before a row recorded ahead of it) */
  if (!detached || d->R->virtual_clock) {
    event_active(d->flush_ev, EV_TIMEOUT, 0);
  } else if (!evtimer_pending(d->detached_ev, NULL)) {
    struct timeval tv = {0, DETACHED_FLUSH_DELAY_US};
    evtimer_add(d->detached_ev, &tv);
  }
}

/* queues fn(tx, ...) for the next group commit; the task waits for it */
static int submit(lua_State *L, int committed_enough) {
  store_db *d = check_db(L, 1);
  task *t = task_current(L, "store operations");
  op *o = enqueue(L, d, 2, 0);
  o->t = t;
  o->committed_enough = committed_enough;
  task_wait(t, &store_op_wait, o);
  return lua_yieldk(L, 0, (lua_KContext)o, tx_k);
}

/* db:tx(fn, ...) -> fn(tx, ...)'s results, once durable | nil, err{kind="store_unavailable"} */
static int db_tx(lua_State *L) { return submit(L, 0); }

/* db:commit_only(fn, ...): the same, continuing once committed: the write
 * survives a crash of this process (the WAL is in the kernel's hands) and
 * is synced to the disk within COMMIT_ONLY_SYNC_DELAY_US, without the caller
 * waiting for it (a power cut may lose it). For writes an answer need not
 * wait for. */
static int db_commit_only(lua_State *L) { return submit(L, 1); }

/* db:enqueue(done, fn, ...): fn(tx, ...) in the next group commit, like
 * db:commit_only, but nobody waits: it returns at once, from a task or not
 * (how many may be queued is bounded by the caller: costs.lua, LATER_MAX).
 * After the commit, done(nil, fn's results...), or done(err) when fn raised
 * or the store failed (done may be nil: a failure is then logged). Called
 * on the loop, outside any task. For writes no answer should wait for (the
 * gateway's ledger rows): a crash of the process loses those not committed
 * yet, as it loses a call whose answer came back before its row was
 * written; closing the store commits those still queued. Another process's
 * write lock is waited for up to DETACHED_LOCK_WAIT, queued. */
static int db_enqueue(lua_State *L) {
  store_db *d = check_db(L, 1);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_checktype(L, 3, LUA_TFUNCTION); /* before done is referenced: a raise would leave it so */
  lua_pushvalue(L, 2);
  int ref_done = luaL_ref(L, LUA_REGISTRYINDEX); /* LUA_REFNIL for nil */
  op *o = enqueue(L, d, 3, 1);
  o->detached = o->committed_enough = 1;
  clock_gettime(CLOCK_MONOTONIC, &o->queued_at);
  o->ref_done = ref_done == LUA_REFNIL ? LUA_NOREF : ref_done;
  return 0;
}

/* db:row_statement(sql, committed, failed) -> n: one INSERT for
 * db:insert_later, prepared once; its parameters are a row array's first
 * values, in order (an array: no field looked up by name). After each group commit, committed(rows, n)
 * once: the rows it wrote and how many were done (with those a key already
 * had: INSERT OR IGNORE writes nothing); failed(err, row) for each that was
 * not written (err as db:enqueue's done gets it). */
static int db_row_statement(lua_State *L) {
  store_db *d = check_db(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  if (d->nrows == ROW_STATEMENTS) return luaL_error(L, "store: too many row statements");
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(d->db, sql, -1, &st, NULL) != SQLITE_OK)
    return luaL_error(L, "store: %s in: %s", sqlite3_errmsg(d->db), sql);
  row_statement *rs = &d->rows[d->nrows];
  rs->st = st;
  rs->nparams = sqlite3_bind_parameter_count(st);
  lua_settop(L, 4);
  rs->ref_failed = luaL_ref(L, LUA_REGISTRYINDEX);
  rs->ref_committed = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushinteger(L, ++d->nrows);
  return 1;
}

/* db:insert_later(n, row): row statement n's INSERT of the row in the next
 * group commit, as db:enqueue's ops are (nobody waits; the same delay, the
 * same wait for another process's lock, written at close), run in C, its
 * outcome told to the statement's callbacks. */
static int db_insert_later(lua_State *L) {
  store_db *d = check_db(L, 1);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 1 && n <= d->nrows, 2, "not a row statement");
  luaL_checktype(L, 3, LUA_TTABLE);
  op *o = calloc(1, sizeof *o);
  if (!o) return luaL_error(L, "out of memory");
  lua_settop(L, 3);
  o->ref_fn_args = luaL_ref(L, LUA_REGISTRYINDEX);
  o->insert = (int)n;
  o->detached = o->committed_enough = 1;
  clock_gettime(CLOCK_MONOTONIC, &o->queued_at);
  queue_op(d, o, 1);
  return 0;
}

/* db:now(fn, ...) -> fn(tx, ...) at once, in its own transaction (setup,
 * migrations, reads outside tasks). */
static int run_now(lua_State *L, const char *begin) {
  store_db *d = check_db(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (d->in_tx) return luaL_error(L, "store: db:now inside a transaction");
  int n = lua_gettop(L) - 2;
  if (shm_broken(d)) return resil_error_result(L, "store_unavailable", "store %s: %s", d->path, d->shm_error);
  if (exec_sql(d, begin) != SQLITE_OK) {
    int busy = sqlite3_errcode(d->db) == SQLITE_BUSY;
    int pushed = resil_error_result(L, "store_unavailable", "store %s: %s", d->path, sqlite3_errmsg(d->db));
    lua_pushboolean(L, busy);
    lua_setfield(L, -2, "busy");
    return pushed;
  }
  const char *moved = strcmp(begin, "BEGIN") != 0 ? file_moved(d) : NULL;
  if (moved) {
    exec_sql(d, "ROLLBACK");
    return resil_error_result(L, "store_unavailable", "store %s: %s", d->path, moved);
  }
  store_db **txp = lua_newuserdatauv(L, sizeof *txp, 0);
  *txp = d;
  luaL_setmetatable(L, TX_MT);
  lua_insert(L, 3);
  d->in_tx = 1;
  d->task_tx = 1;
  int rc = lua_pcall(L, n + 1, LUA_MULTRET, 0);
  d->task_tx = 0;
  d->in_tx = 0;
  *txp = NULL;
  if (rc != LUA_OK) {
    exec_sql(d, "ROLLBACK");
    if (is_store_unavailable(L, -1)) {
      lua_pushnil(L);
      lua_insert(L, -2);
      return 2;
    }
    return lua_error(L);
  }
  int commit_rc = exec_sql(d, "COMMIT");
  if (commit_rc != SQLITE_OK) {
    /* the reason before the ROLLBACK's: SQLite may have rolled back itself
     * (a full disk, an I/O error), and then the ROLLBACK fails on its own */
    int pushed = resil_error_result(L, "store_unavailable", "store %s: commit failed: %s%s", d->path,
                                    sqlite3_errmsg(d->db), refusal_note(d, commit_rc));
    if (!sqlite3_get_autocommit(d->db)) exec_sql(d, "ROLLBACK");
    return pushed;
  }
  int err = d->syncer && strcmp(begin, "BEGIN") != 0 ? wal_syncer_sync_now(d->syncer) : 0;
  if (err) {
    d->sync_error = err;
    return resil_error_result(L, "store_unavailable", "store %s: the commit could not be made durable: %s", d->path,
                              strerror(err));
  }
  return lua_gettop(L) - 1;
}

/* db:blocking(on): outside tasks (set-up, the CLI, the run's end after the
 * loop) db:now may wait for the lock inside SQLite, up to the timeout. */
static int db_blocking(lua_State *L) {
  store_db *d = check_db(L, 1);
  sqlite3_busy_timeout(d->db, lua_toboolean(L, 2) ? lock_wait_ms(d) : 0);
  return 0;
}

static int db_now(lua_State *L) { return run_now(L, "BEGIN IMMEDIATE"); }

/* db:read(fn, ...): the same for reading only; in WAL mode a reader never
 * waits for another process's writer. */
static int db_read(lua_State *L) { return run_now(L, "BEGIN"); }

/* db:queued() -> true while writes this process queued are not committed
 * (a read that must see them goes through db:tx, after them) */
static int db_queued(lua_State *L) {
  lua_pushboolean(L, check_db(L, 1)->head != NULL);
  return 1;
}

/* db:readonly() -> true when the file was opened read-only (readonly_uri) */
static int db_readonly(lua_State *L) {
  lua_pushboolean(L, check_db(L, 1)->readonly_uri != NULL);
  return 1;
}

/* db:in_memory() -> true for a database in memory or a temporary one (":memory:", "",
 * "file::memory:", a "mode=memory" URI): SQLite names no file for it, and another connection
 * (the reader thread's) opens another, empty database */
static int db_in_memory(lua_State *L) {
  const char *file = sqlite3_db_filename(check_db(L, 1)->db, "main");
  lua_pushboolean(L, file == NULL || file[0] == '\0');
  return 1;
}

static int db_stats(lua_State *L) {
  store_db *d = check_db(L, 1);
  lua_createtable(L, 0, 2);
  lua_pushinteger(L, d->commits);
  lua_setfield(L, -2, "commits");
  lua_pushinteger(L, d->ops);
  lua_setfield(L, -2, "ops");
  return 1;
}

/* ---------- reads off the loop ---------- */

/* rows a chunk of db:scan brings to the loop at a time: the loop converts and hands them to `each`
 * in one go (some ms at most), then goes on while the thread reads the next */
#define SCAN_CHUNK 2000

static int scan_k(lua_State *L, int status, lua_KContext ctx);

static void scan_done(sql_read *r) { task_wake(r->t); }

static void scan_drop(void *arg) {
  sql_read *r = arg;
  sql_read_drop(((store_db *)r->arg)->reader, r);
}

static const task_wait_ops scan_wait_ops = {scan_drop, scan_drop, NULL};

static int scan_wait(lua_State *L, store_db *d, sql_read *r) {
  sql_read_submit(d->reader, r);
  task_wait(r->t, &scan_wait_ops, r);
  return lua_yieldk(L, 0, (lua_KContext)r, scan_k);
}

static int scan_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  sql_read *r = (sql_read *)ctx;
  store_db *d = r->arg;
  if (r->rc) {
    int rc = r->rc;
    lua_pushstring(L, r->errmsg ? r->errmsg : sqlite3_errstr(rc));
    sql_read_drop(d->reader, r);
    /* (as sql_failed, but returned: a read the caller may take as the store unavailable) */
    if (!store_trouble(rc)) return luaL_error(L, "store %s: %s", d->path ? d->path : "?", lua_tostring(L, -1));
    int pushed = resil_error_result(L, "store_unavailable", "store %s: %s", d->path ? d->path : "?",
                                    lua_tostring(L, -1));
    lua_pushboolean(L, (rc & 0xff) == SQLITE_BUSY);
    lua_setfield(L, -2, "busy");
    return pushed;
  }
  for (int i = 0; i < r->nrows; i++) {
    const sql_value *row = r->vals + (size_t)i * (size_t)r->ncols;
    lua_pushvalue(L, 3);
    lua_createtable(L, 0, r->ncols);
    for (int c = 0; c < r->ncols; c++) {
      const sql_value *v = &row[c];
      if (v->type == SQLITE_NULL) continue;
      if (v->type == SQLITE_INTEGER) lua_pushinteger(L, v->i);
      else if (v->type == SQLITE_FLOAT) lua_pushnumber(L, v->d);
      else lua_pushlstring(L, v->s, (size_t)v->n);
      lua_setfield(L, -2, r->names[c]);
    }
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
      sql_read_drop(d->reader, r);
      return lua_error(L);
    }
  }
  if (r->more && d->reader) return scan_wait(L, d, r);
  if (d->reader) sql_read_drop(d->reader, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* db:scan(sql, each, ...) -> true | nil, err{kind="store_unavailable"}: one SELECT, run on a thread
 * of the store's own with a connection of its own (sql_reader.c), each(row) called on the loop for
 * every row, a chunk at a time, in one snapshot. In a task (which waits meanwhile); each cannot
 * yield, and what it raises ends the read. For reads that may scan without bound (the ledger's
 * sums, its rows, the runs): on the loop (db:read) they held every other task of the process up. */
static int db_scan(lua_State *L) {
  store_db *d = check_db(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  task *t = task_current(L, "store reads");
  int nargs = lua_gettop(L) - 3;
  for (int i = 4; i <= lua_gettop(L); i++) {
    int ty = lua_type(L, i);
    if (ty != LUA_TNIL && ty != LUA_TBOOLEAN && ty != LUA_TNUMBER && ty != LUA_TSTRING)
      return luaL_error(L, "store: cannot bind a %s (parameter %d)", luaL_typename(L, i), i - 3);
  }
  if (!d->reader && !(d->reader = sql_reader_new(d->R->base, d->readonly_uri ? d->readonly_uri : d->path,
                                                 d->readonly_uri != NULL, d->timeout, &d->R->disk_pending)))
    return luaL_error(L, "store %s: cannot start its reader thread", d->path);
  sql_read *r = sql_read_new(d->reader, sql, nargs, SCAN_CHUNK);
  if (!r) return luaL_error(L, "out of memory");
  for (int i = 0; i < nargs; i++) {
    sql_value *v = &r->args[i];
    int at = 4 + i;
    switch (lua_type(L, at)) {
    case LUA_TBOOLEAN: v->type = SQLITE_INTEGER, v->i = lua_toboolean(L, at); break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, at)) v->type = SQLITE_INTEGER, v->i = lua_tointeger(L, at);
      else v->type = SQLITE_FLOAT, v->d = lua_tonumber(L, at);
      break;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, at, &len);
      v->type = SQLITE_TEXT;
      v->n = (int)len;
      v->s = malloc(len + 1);
      if (!v->s) {
        v->type = SQLITE_NULL;
        sql_read_drop(d->reader, r);
        return luaL_error(L, "out of memory");
      }
      memcpy(v->s, s, len + 1);
      break;
    }
    default: v->type = SQLITE_NULL;
    }
  }
  r->done = scan_done;
  r->arg = d;
  r->t = t;
  lua_settop(L, 3);
  return scan_wait(L, d, r);
}

/* Closing with detached ops still queued (db:enqueue; a gateway stopped
 * mid-traffic, another process holding the write lock): they are written
 * now, waiting for the lock inside SQLite up to the timeout, since nobody
 * will queue them again. Ops whose tasks wait stay where they are: those
 * tasks will not run again. */
static void commit_detached_at_close(lua_State *L, store_db *d) {
  op *detached = take_ops(d, is_detached);
  if (!detached) return;
  end_lock_wait(d);
  int began = 0;
  if (!d->sync_error && !shm_broken(d)) {
    sqlite3_busy_timeout(d->db, lock_wait_ms(d));
    began = exec_ctl(d, CTL_BEGIN) == SQLITE_OK;
    sqlite3_busy_timeout(d->db, 0);
  }
  int committed = commit_batch(L, d, detached, began);
  if (committed) d->unsynced = 1; /* synced below, with the rest */
  /* the done callbacks of those written are not called (the loop is over);
   * those the store refused (the lock still held) are told, with
   * closing = true, so that their callers say what is lost (the ledger
   * names each row); any without a done are counted in one line here */
  long unwritten = 0;
  for (op *o = detached; o; o = o->next) {
    if (o->failed == 2) {
      if (o->ref_done == LUA_NOREF && !o->insert) {
        if (!unwritten++) lua_rawgeti(L, LUA_REGISTRYINDEX, o->ref_result); /* L stack: why */
        o->failed = 0; /* counted here, not told again */
      }
    } else {
      luaL_unref(L, LUA_REGISTRYINDEX, o->ref_done);
      o->ref_done = LUA_NOREF;
    }
  }
  if (unwritten) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, d->path);
    lua_setfield(L, -2, "store");
    lua_pushinteger(L, unwritten);
    lua_setfield(L, -2, "writes");
    lua_rotate(L, -2, 1); /* L stack: fields why */
    lua_setfield(L, -2, "error");
    host_log(L, "error", "store: writes nobody waited for could not be written as it closed; they are lost");
  }
  d->closing = 1;
  finish_batch(L, d, detached);
  d->closing = 0;
}

static void db_close_all(lua_State *L, store_db *d) {
  if (!d->db) return;
  commit_detached_at_close(L, d);
  sql_reader_free(d->reader); /* (reads still wanted: their tasks never resume, the host closes) */
  d->reader = NULL;
  /* the host closing (resil_close) with tasks waiting for their ops (a step's checkpoint): not
   * written, as those tasks never run again; freed here, as nothing else would free them */
  if (d->R->closing) {
    op *o = d->head;
    d->head = d->tail = NULL;
    while (o) {
      op *next = o->next;
      op_free(L, o);
      o = next;
    }
    while ((o = d->woken)) { /* (done, their tasks never to run again) */
      woken_remove(o);
      op_free(L, o);
    }
  }
  /* closing: durable now (also with a sync under way: these may have
   * committed after it began) */
  if (d->unsynced && d->syncer) wal_syncer_sync_now(d->syncer);
  d->unsynced = 0;
  wal_syncer_free(d->syncer); /* finishes a sync asked for or under way */
  d->syncer = NULL;
  if (d->sync_pending) { /* its done_cb will not come: the batch is durable now */
    d->sync_pending = 0;
    d->R->disk_pending--;
    op *batch = d->syncing;
    d->syncing = NULL;
    finish_batch(L, d, batch);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, d->ref_stmts);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    sqlite3_finalize(lua_touserdata(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, d->ref_stmts);
  for (size_t i = 0; i < sizeof d->ctl / sizeof d->ctl[0]; i++) sqlite3_finalize(d->ctl[i]);
  for (int i = 0; i < d->nrows; i++) {
    row_statement *rs = &d->rows[i];
    sqlite3_finalize(rs->st);
    luaL_unref(L, LUA_REGISTRYINDEX, rs->ref_committed);
    luaL_unref(L, LUA_REGISTRYINDEX, rs->ref_failed);
  }
  d->nrows = 0;
  memset(d->ctl, 0, sizeof d->ctl);
  /* our WAL or index deleted and another process may have written since: no copy of our WAL as
   * this one closes (SQLite's checkpoint at the last close), which would mix its pages with that
   * process's (the file was "not a database" after). Otherwise it is copied in: what this process
   * wrote before the deletion is kept (another process that opened meanwhile could not read the
   * WAL our index names, and wrote nothing). */
  if (others_wrote(d) || shm_broken(d)) sqlite3_db_config(d->db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, (int *)NULL);
  if (d->path && main_moved(d)) drop_moved_wal(d); /* (no write saw it) */
  sqlite3_close(d->db);
  d->db = NULL;
  free(d->shm_path);
  d->shm_path = NULL;
  if (d->flush_ev) event_free(d->flush_ev);
  if (d->retry_ev) event_free(d->retry_ev);
  if (d->unsynced_ev) event_free(d->unsynced_ev);
  if (d->detached_ev) event_free(d->detached_ev);
  d->flush_ev = d->retry_ev = d->unsynced_ev = d->detached_ev = NULL;
  free(d->path);
  d->path = NULL;
  free(d->readonly_uri);
  d->readonly_uri = NULL;
}

static int db_close(lua_State *L) {
  store_db *d = luaL_checkudata(L, 1, DB_MT);
  for (op *o = d->head; o; o = o->next)
    if (!o->detached) return luaL_error(L, "store: close with operations pending");
  if (sql_reader_busy(d->reader)) return luaL_error(L, "store: close with reads pending");
  db_close_all(L, d);
  return 0;
}

static int db_gc(lua_State *L) {
  db_close_all(L, luaL_checkudata(L, 1, DB_MT));
  return 0;
}

/* Create the folders above path (like mkdir -p), so that the default
 * .resil/state.db works in a fresh directory. Failures show at open. */
static void make_parents(const char *path) {
  char dir[PATH_MAX];
  if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) return;
  for (char *p = dir + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    mkdir(dir, 0777);
    *p = '/';
  }
}

/* Why the system refuses a file at path, as " (reason)" in out ("" if it gives none). SQLite's errno
 * is that of its read-only retry: ENOENT for a new file in a folder it may not write in. So for a file
 * not there, the folder is asked here, with an unnamed file (O_TMPFILE) that leaves nothing behind. */
static void why_refused(const char *path, int sqlite_errno, char *out, size_t size) {
  struct stat st;
  int why = sqlite_errno;
  char dir[PATH_MAX] = "";
  if (stat(path, &st) != 0 && errno == ENOENT) {
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else snprintf(dir, sizeof dir, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    int fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
    if (fd >= 0) close(fd);
    else if (errno != EOPNOTSUPP && errno != EISDIR) why = errno; /* (EISDIR: no O_TMPFILE there) */
    if (why == sqlite_errno) dir[0] = '\0';
  }
  if (!why) snprintf(out, size, "%s", "");
  else if (dir[0]) snprintf(out, size, " (folder %s: %s)", dir, strerror(why));
  else snprintf(out, size, " (%s)", strerror(why));
}

/* Another program's database: tables, and the schema version 0 that no store has once it has any (the
 * first migration sets 1 in the transaction that makes them). One statement, so one snapshot. -> 1 yes,
 * 0 no (or not a database: said by the open's next step), -1 the file busy (another process holds it):
 * nothing read, so nothing decided. Read before the write lock, so it only spares such a file the switch
 * to WAL; the store's first migration decides again under the lock (store_sqlite.lua, apply_migrations). */
static int foreign_database(sqlite3 *db) {
  sqlite3_stmt *st = NULL;
  int foreign = 0;
  int rc = sqlite3_prepare_v2(db, "SELECT (SELECT user_version FROM pragma_user_version) = 0 AND "
                                  "EXISTS (SELECT 1 FROM sqlite_master)", -1, &st, NULL);
  if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) foreign = sqlite3_column_int(st, 0) == 1;
  sqlite3_finalize(st);
  return (rc & 0xff) == SQLITE_BUSY ? -1 : foreign;
}

/* L stack: nil, err -> nil, err. The open given up, its error just pushed; busy: another process holds
 * the file (err.busy: worth another try) */
static int open_failed(lua_State *L, store_db *d, int busy) {
  if (busy) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "busy");
  }
  sqlite3_close(d->db);
  d->db = NULL;
  free(d->readonly_uri);
  d->readonly_uri = NULL;
  return 2;
}

/* The sandbox keeps a script from naming a file outside the folders it
 * may write in: raised at the Lua function `level` up (luaL_where's count) */
static int refuse_file(lua_State *L, const char *what, const char *path, int level) {
  luaL_where(L, level);
  lua_pushfstring(L, "%s: %s is outside the folders the sandbox may write in (resil_options.sandbox_dirs)", what,
                  path);
  lua_concat(L, 2);
  return lua_error(L);
}

/* The host's own store is the scripts' to use through resil.store only: its
 * SQL (a DELETE of the ledger) is not theirs */
static int refuse_store_as(lua_State *L, const char *what, const char *path, int level, const char *verb) {
  luaL_where(L, level);
  lua_pushfstring(L, "%s: %s is the host's own store: a sandboxed script %s it only through resil.store", what,
                  path, verb);
  lua_concat(L, 2);
  return lua_error(L);
}
static int refuse_store(lua_State *L, const char *what, const char *path, int level) {
  return refuse_store_as(L, what, path, level, "writes");
}

/* resil.sqlite.check_file(path, what [, level [, "read"]]): raises unless the sandbox
 * lets a file be written at path (checked here: a script may replace what
 * the resil table holds, not the C behind it). With "read", only the host's
 * own store (and its -wal, -shm, -journal) is refused, the folders being the
 * caller's to check: read as bytes, it held every key the store keeps from a
 * script (the gateway's keys, its clients' Idempotency-Key answers, the AI
 * cache's) and every other script's values. */
static int l_check_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1), *what = luaL_checkstring(L, 2);
  resil_t *R = resil_from_lua(L);
  if (lua_isstring(L, 4) && strcmp(lua_tostring(L, 4), "read") == 0) {
    if (!R->sandbox || R->sandbox_trusted > 0 || !sandbox_is_store_file(R, path)) return 0;
    return refuse_store_as(L, what, path, (int)luaL_optinteger(L, 3, 1), "reads");
  }
  if (sandbox_plain_file_ok(R, path)) return 0;
  if (sandbox_is_store_file(R, path)) return refuse_store(L, what, path, (int)luaL_optinteger(L, 3, 1));
  return refuse_file(L, what, path, (int)luaL_optinteger(L, 3, 1));
}

/* resil.sqlite.check_store_file(path, what [, level]): the same for a store
 * the script opens (the host's own store is one) */
static int l_check_store_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1), *what = luaL_checkstring(L, 2);
  char full[PATH_MAX];
  resil_t *R = resil_from_lua(L);
  if (!sandbox_file_ok(R, host_path(R, path, full, sizeof full)))
    return refuse_file(L, what, path, (int)luaL_optinteger(L, 3, 1));
  return 0;
}

/* resil.sqlite.resolve(path) -> the file at path, as one string per file (a store's key in a process):
 * absolute, the part that exists resolved (symlinks, ".", ".."; the file itself when it is there), the
 * folders and the file not made yet appended with "." and ".." applied as written (no symlink among
 * them: the open makes them) | nil when it is too long, or outside the sandbox's folders (nothing to
 * learn there: no store opens) */
static int l_resolve(lua_State *L) {
  resil_t *R = resil_from_lua(L);
  char head[PATH_MAX], out[PATH_MAX], full[PATH_MAX];
  const char *path = host_path(R, luaL_checkstring(L, 1), full, sizeof full); /* (the file the store opens) */
  size_t len = strlen(path);
  if (len >= sizeof head || !sandbox_file_ok(R, path)) return 0;
  memcpy(head, path, len + 1);
  const char *rest = NULL; /* what follows head in path (NULL: head is all of it) */
  while (!realpath(rest ? head : path, out)) { /* the longest part of path that exists */
    char *slash = strrchr(head, '/');
    if (!slash) { /* a name in the working directory, or a chain of folders to make there */
      if (!realpath(".", out)) return 0;
      rest = path;
      break;
    }
    *slash = '\0';
    rest = path + (slash - head) + 1;
    if (!*head) head[0] = '/', head[1] = '\0';
  }
  if (!rest) rest = "";
  size_t n = strlen(out);
  for (const char *p = rest; *p; p += strcspn(p, "/"), p += *p == '/') {
    size_t part = strcspn(p, "/");
    if (part == 0 || (part == 1 && p[0] == '.')) continue;
    if (part == 2 && p[0] == '.' && p[1] == '.') { /* out has no symlink: its parent is its dirname */
      while (n > 1 && out[n - 1] != '/') n--;
      if (n > 1) n--;
      continue;
    }
    if (n + 1 + part >= sizeof out) return 0;
    if (out[n - 1] != '/') out[n++] = '/';
    memcpy(out + n, p, part);
    n += part;
  }
  lua_pushlstring(L, out, n);
  return 1;
}

/* A read-only URI for path: mode=ro, and immutable=1 when it has no WAL (no writer has it open: the
 * last one's close folded the WAL in), since a reader in WAL mode needs the -shm beside the file and
 * may not be let make it. A writer that opens it meanwhile is not seen by this reader (its reads are
 * of the file as it was). -> malloc'd | NULL */
static char *readonly_uri(const char *path) {
  char wal[PATH_MAX];
  struct stat st;
  int immutable = snprintf(wal, sizeof wal, "%s-wal", path) < (int)sizeof wal && stat(wal, &st) != 0;
  size_t n = strlen(path);
  char *uri = malloc(3 * n + 40);
  if (!uri) return NULL;
  char *o = uri + sprintf(uri, "file:");
  for (const unsigned char *p = (const unsigned char *)path; *p; p++) {
    if (*p == '%' || *p == '?' || *p == '#' || *p < 0x21 || *p >= 0x7f) o += sprintf(o, "%%%02X", *p);
    else *o++ = (char)*p;
  }
  sprintf(o, "?mode=ro%s", immutable ? "&immutable=1" : "");
  return uri;
}

/* resil.sqlite.open(path, {group_commit = true, store = false, timeout = 5, wait = timeout}) -> db | nil, err;
 * store: refuse another program's database (the store's own open); wait: how long the open itself may
 * wait for another process holding the file, in SQLite, on the loop: the store's open, in a task, passes
 * 0 and tries again on a timer when err.busy */
static int open_db(lua_State *L, int host) {
  const char *path = luaL_checkstring(L, 1); /* (as named, in messages) */
  int group_commit = 1, store = 0;
  double timeout = DEFAULT_TIMEOUT, wait = -1;
  if (lua_istable(L, 2)) {
    if (lua_getfield(L, 2, "group_commit") != LUA_TNIL) group_commit = lua_toboolean(L, -1);
    if (lua_getfield(L, 2, "timeout") != LUA_TNIL) timeout = luaL_checknumber(L, -1);
    store = lua_getfield(L, 2, "store") != LUA_TNIL && lua_toboolean(L, -1);
    if (lua_getfield(L, 2, "wait") != LUA_TNIL) wait = luaL_checknumber(L, -1);
    lua_pop(L, 4);
  }
  if (wait < 0) wait = timeout;
  resil_t *R = resil_from_lua(L);
  /* a relative path from the folder the host was opened in: looked at from the program's new one
   * (a chdir after resil_open), the store was a new, empty file there, its spend and keys elsewhere */
  char full[PATH_MAX];
  const char *file = host_path(R, path, full, sizeof full);
  if (!host && !sandbox_plain_file_ok(R, file) && sandbox_is_store_file(R, file))
    return refuse_store(L, "store", path, 1);
  if (!sandbox_file_ok(R, file)) return refuse_file(L, "store", path, 1);
  store_db *d = lua_newuserdatauv(L, sizeof *d, 0);
  memset(d, 0, sizeof *d);
  d->R = R;
  d->group_commit = group_commit;
  d->timeout = timeout;
  d->ref_stmts = LUA_NOREF;
  luaL_setmetatable(L, DB_MT);
  /* --store /dev/null (for "no store") said "disk I/O error" and left /dev/null-journal in /dev */
  struct stat st;
  if (store && stat(file, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
    lua_pushnil(L);
    resil_push_error(L, "store_unavailable", "store: %s is not a regular file (a device, a pipe or a socket); a "
                     "SQLite store is a file", path);
    return 2;
  }
  /* A store file this user may read and not write (an operator's `runs` or `costs` as another user,
   * a read-only mount): opened read-only, with no WAL switch, syncer or schema change. Read-write it
   * failed, "attempt to write a readonly database", as SQLite could not make the -shm beside it. */
  if (store && stat(file, &st) == 0 && S_ISREG(st.st_mode) && access(file, W_OK) != 0 &&
      (errno == EACCES || errno == EROFS || errno == EPERM))
    d->readonly_uri = readonly_uri(file);
  if (!d->readonly_uri) make_parents(file);
  int rc = d->readonly_uri
             ? sqlite3_open_v2(d->readonly_uri, &d->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX, NULL)
             : sqlite3_open_v2(file, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
  if (rc != SQLITE_OK) {
    const char *why = d->db ? sqlite3_errmsg(d->db) : sqlite3_errstr(rc);
    /* and the system's reason: SQLite's "unable to open database file" alone did not say that the path is
     * a folder, or that a folder above it is a file */
    char reason[PATH_MAX + 64];
    why_refused(file, d->db ? sqlite3_system_errno(d->db) : 0, reason, sizeof reason);
    resil_error_result(L, "store_unavailable", "store: cannot open %s: %s%s", path, why, reason);
    return open_failed(L, d, 0);
  }
  sqlite3_progress_handler(d->db, WATCHDOG_SQL_STEPS, task_statement_progress, d);
  /* no ATTACH (nor VACUUM INTO, which attaches its target): the host needs
   * neither, and through a db's SQL either makes a file wherever it names */
  sqlite3_limit(d->db, SQLITE_LIMIT_ATTACHED, 0);
  /* Switching a new file to WAL needs its lock for a moment (another process may be creating it too, or
   * hold it): waited for in SQLite up to `wait` (a file already in WAL mode takes no lock here). */
  sqlite3_busy_timeout(d->db, (int)(wait * 1000));
  struct timespec opened_at;
  clock_gettime(CLOCK_MONOTONIC, &opened_at);
  /* A store path naming another program's database (a --store typo): it was switched to WAL, which that
   * program may not expect, and given the store's tables; one with a table named as one of them (kv,
   * runs, costs) failed midway, raising at a line of the host's own Lua. Refused before either. */
  int foreign = store ? foreign_database(d->db) : 0;
  if (foreign > 0) {
    resil_error_result(L, "store_unavailable", "store: %s is another program's SQLite database (it has tables "
                       "and no store schema); not made a store", path);
    return open_failed(L, d, 0);
  }
  if (foreign < 0) {
    resil_error_result(L, "store_unavailable", "store: %s: %s", path, sqlite3_errmsg(d->db));
    return open_failed(L, d, 1);
  }
  char *err = NULL;
  int wal = SQLITE_READONLY; /* (a read-only file: nothing to switch, sync or checkpoint) */
  /* Processes creating the file at once can find it busy without SQLite's
   * busy handler being called (each holds the read lock that the other's
   * switch to WAL waits for, so SQLite refuses at once rather than
   * deadlock): 2 of 80 processes opening a new store together failed. Try
   * again, up to `wait` (and the store's open tries again on a timer). */
  for (int pause_ms = 1; !d->readonly_uri; pause_ms = pause_ms < 16 ? pause_ms * 2 : pause_ms) {
    wal = sqlite3_exec(d->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", NULL, NULL, &err);
    if (wal != SQLITE_BUSY || seconds_since(&opened_at) >= wait) break;
    sqlite3_free(err);
    err = NULL;
    sqlite3_sleep(pause_ms);
  }
  /* commits made durable by the syncer thread (wal_sync.c), which also
   * checkpoints; without it COMMIT syncs, and checkpoints, on the loop. By SQLite's full name
   * of the file: a relative path, looked at after the program changed its working directory,
   * was no WAL to sync (commits were told durable unsynced) and no file to checkpoint into */
  const char *sqlite_name = sqlite3_db_filename(d->db, "main");
  if (!sqlite_name || !*sqlite_name) sqlite_name = file;
  if (wal == SQLITE_OK && (d->syncer = wal_syncer_new(R->base, sqlite_name, synced_cb, d)) != NULL) {
    sqlite3_exec(d->db, "PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;", NULL, NULL, NULL);
    sqlite3_wal_hook(d->db, count_frames, d);
    sqlite3_stmt *ps;
    if (sqlite3_prepare_v2(d->db, "PRAGMA page_size", -1, &ps, NULL) == SQLITE_OK && sqlite3_step(ps) == SQLITE_ROW)
      d->page_size = sqlite3_column_int(ps, 0);
    sqlite3_finalize(ps);
  }
  /* from now on never wait for a lock inside SQLite: that would block the
   * loop (writes wait on a timer instead, take_write_lock) */
  sqlite3_busy_timeout(d->db, 0);
  if (wal != SQLITE_OK && !d->readonly_uri) {
    /* (an existing file in a folder it may not write in: its -wal and -shm cannot be made) */
    char wal_path[PATH_MAX], reason[PATH_MAX + 64] = "";
    snprintf(wal_path, sizeof wal_path, "%s-wal", file);
    if ((wal & 0xff) == SQLITE_CANTOPEN) why_refused(wal_path, sqlite3_system_errno(d->db), reason, sizeof reason);
    else snprintf(reason, sizeof reason, "%s", refusal_note(d, wal));
    resil_error_result(L, "store_unavailable", "store: %s: %s%s", path, err ? err : "cannot set WAL mode", reason);
    sqlite3_free(err);
    /* busy: another process held the new file past the wait: it passes */
    return open_failed(L, d, (wal & 0xff) == SQLITE_BUSY);
  }
  d->path = strdup(path);
  wal_moved(d); /* (its WAL as opened) */
  shm_broken(d); /* (its -shm's size as opened) */
  lua_newtable(L);
  d->ref_stmts = luaL_ref(L, LUA_REGISTRYINDEX);
  d->flush_ev = event_new(R->base, -1, 0, flush_cb, d);
  d->retry_ev = evtimer_new(R->base, flush_cb, d);
  d->unsynced_ev = evtimer_new(R->base, unsynced_cb, d);
  d->detached_ev = evtimer_new(R->base, flush_cb, d);
  return 1;
}

/* resil.sqlite.open: under the sandbox, never the host's own store (a script
 * ran its own SQL there, the ledger's rows deleted) */
static int l_open(lua_State *L) { return open_db(L, 0); }

/* the store's own open (src/lua/store_sqlite.lua), which the host's modules
 * alone hold (resil.c, the private table): the host's store too */
int resil_sqlite_open_store(lua_State *L) { return open_db(L, 1); }

static const luaL_Reg db_methods[] = {{"tx", db_tx},         {"commit_only", db_commit_only},
                                      {"enqueue", db_enqueue},
                                      {"row_statement", db_row_statement}, {"insert_later", db_insert_later},
                                      {"now", db_now},       {"read", db_read},
                                      {"scan", db_scan},
                                      {"queued", db_queued},
                                      {"readonly", db_readonly},
                                      {"in_memory", db_in_memory},
                                      {"blocking", db_blocking}, {"stats", db_stats},
                                      {"close", db_close},   {NULL, NULL}};
static const luaL_Reg tx_methods[] = {
  {"exec", tx_exec}, {"rows", tx_rows}, {"each", tx_each}, {"row", tx_row}, {"value", tx_value}, {NULL, NULL}};

int luaopen_resil_sqlite(lua_State *L) {
  luaL_newmetatable(L, DB_MT);
  luaL_newlib(L, db_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, db_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, TX_MT);
  luaL_newlib(L, tx_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, l_open);
  lua_setfield(L, -2, "open");
  lua_pushcfunction(L, l_check_file);
  lua_setfield(L, -2, "check_file");
  lua_pushcfunction(L, l_check_store_file);
  lua_setfield(L, -2, "check_store_file");
  lua_pushcfunction(L, l_resolve);
  lua_setfield(L, -2, "resolve");
  return 1;
}
