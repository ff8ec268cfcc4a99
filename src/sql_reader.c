/*
 * sql_reader.c: a SQLite store's reads that may scan without bound, off the loop.
 *
 * The ledger's sums and breakdowns, its rows and the runs list read every
 * row that passes a filter: on a ledger of 1M rows that held the loop 0.7 to
 * 1.8 s, every timer, transfer and gateway request of the process standing
 * still. Such a read runs here instead, on a thread of the store's own with
 * a connection of its own (read-only, query_only: it never writes, so it
 * never waits for the store's group commit nor holds it up; in WAL mode it
 * reads the last commit as of its first step, one snapshot for the whole
 * statement), a chunk of rows at a time: the loop takes each chunk (the
 * store converts it to Lua for the waiting task) and asks for the next, so
 * neither side holds more than a chunk. A read nobody wants any more (its
 * task canceled, its caller's callback raised) is dropped: its statement is
 * interrupted or finalized by the thread, and freed back on the loop.
 * (As wal_sync.c: the thread takes no signal meant for the process.)
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <sqlite3.h>

#include "host.h"

/* progress handler steps between looks at a canceled read */
#define CANCEL_STEPS 1000
#define READER_STACK (512 * 1024)

enum { READ_HELD, READ_QUEUED, READ_RUNNING, READ_DONE };

struct sql_reader {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  sql_read *todo, *todo_tail; /* under mu */
  sql_read *done;             /* under mu, the loop takes them (done_cb) */
  int stop;                   /* under mu */
  sql_read *all;              /* every read not freed: the loop's */
  sqlite3 *db;                /* the thread's */
  sql_read *current;          /* the thread's: the read its statement steps */
  char *path;
  int uri; /* path is a read-only URI */
  double timeout;
  int *pending; /* the host's disk_pending: reads with the thread (the virtual clock waits for them) */
  int efd;
  struct event *done_ev;
};

static void free_rows(sql_read *r) {
  for (int i = 0; i < r->nrows * r->ncols; i++) free(r->vals[i].s);
  free(r->vals);
  r->vals = NULL;
  r->nrows = 0;
}

static void read_free(sql_reader *rd, sql_read *r) {
  if (r->all_prev) r->all_prev->all_next = r->all_next;
  else rd->all = r->all_next;
  if (r->all_next) r->all_next->all_prev = r->all_prev;
  free_rows(r);
  for (int i = 0; i < r->nargs; i++) free(r->args[i].s);
  free(r->args);
  for (int i = 0; i < r->ncols; i++) free(r->names[i]);
  free(r->names);
  free(r->sql);
  free(r->errmsg);
  free(r);
}

/* ---------- the thread ---------- */

static int canceled_progress(void *arg) {
  sql_reader *rd = arg;
  return rd->current && atomic_load(&rd->current->canceled);
}

static int open_conn(sql_reader *rd) {
  if (rd->db) return SQLITE_OK;
  int rc = sqlite3_open_v2(rd->path, &rd->db,
                           (rd->uri ? SQLITE_OPEN_READONLY | SQLITE_OPEN_URI : SQLITE_OPEN_READWRITE) | SQLITE_OPEN_NOMUTEX,
                           NULL);
  if (rc != SQLITE_OK) return rc;
  /* off the loop: a file busy (another process recovering its WAL) is waited for here */
  sqlite3_busy_timeout(rd->db, (int)(rd->timeout * 1000));
  sqlite3_limit(rd->db, SQLITE_LIMIT_ATTACHED, 0);
  sqlite3_exec(rd->db, "PRAGMA query_only=1", NULL, NULL, NULL);
  sqlite3_progress_handler(rd->db, CANCEL_STEPS, canceled_progress, rd);
  return SQLITE_OK;
}

static char *copy_bytes(const void *p, int n) {
  char *s = malloc((size_t)n + 1);
  if (!s) return NULL;
  if (n) memcpy(s, p, (size_t)n);
  s[n] = '\0';
  return s;
}

static void failed(sql_reader *rd, sql_read *r, int rc) {
  r->rc = rc ? rc : SQLITE_ERROR;
  free(r->errmsg);
  r->errmsg = strdup(rd->db ? sqlite3_errmsg(rd->db) : sqlite3_errstr(rc));
  sqlite3_finalize(r->st);
  r->st = NULL;
  r->more = 0;
}

/* the read's next chunk of rows, or its end */
static void fetch(sql_reader *rd, sql_read *r) {
  int rc;
  if (!r->st) {
    if ((rc = open_conn(rd)) != SQLITE_OK) {
      failed(rd, r, rc);
      sqlite3_close(rd->db);
      rd->db = NULL;
      return;
    }
    if ((rc = sqlite3_prepare_v2(rd->db, r->sql, -1, &r->st, NULL)) != SQLITE_OK) return failed(rd, r, rc);
    for (int i = 0; i < r->nargs; i++) {
      sql_value *v = &r->args[i];
      switch (v->type) {
      case SQLITE_INTEGER: sqlite3_bind_int64(r->st, i + 1, v->i); break;
      case SQLITE_FLOAT: sqlite3_bind_double(r->st, i + 1, v->d); break;
      case SQLITE_TEXT: sqlite3_bind_text(r->st, i + 1, v->s, v->n, SQLITE_STATIC); break;
      default: sqlite3_bind_null(r->st, i + 1);
      }
    }
    r->ncols = sqlite3_column_count(r->st);
    r->names = calloc((size_t)r->ncols + 1, sizeof *r->names);
    if (!r->names) return failed(rd, r, SQLITE_NOMEM);
    for (int c = 0; c < r->ncols; c++)
      if (!(r->names[c] = strdup(sqlite3_column_name(r->st, c)))) return failed(rd, r, SQLITE_NOMEM);
  }
  int cap = 0;
  r->more = 0;
  while ((rc = sqlite3_step(r->st)) == SQLITE_ROW) {
    if (r->nrows == cap) {
      cap = cap ? cap * 2 : 64;
      if (cap > r->chunk) cap = r->chunk;
      sql_value *vals = realloc(r->vals, (size_t)cap * (size_t)(r->ncols ? r->ncols : 1) * sizeof *vals);
      if (!vals) return failed(rd, r, SQLITE_NOMEM);
      r->vals = vals;
    }
    sql_value *row = r->vals + (size_t)r->nrows * (size_t)r->ncols;
    /* the whole row cleared before it counts: a copy that fails midway leaves the columns after
     * it as NULLs, not as pointers free_rows would free */
    memset(row, 0, (size_t)r->ncols * sizeof *row);
    r->nrows++;
    for (int c = 0; c < r->ncols; c++) {
      sql_value *v = &row[c];
      v->type = sqlite3_column_type(r->st, c);
      if (v->type == SQLITE_INTEGER) v->i = sqlite3_column_int64(r->st, c);
      else if (v->type == SQLITE_FLOAT) v->d = sqlite3_column_double(r->st, c);
      else if (v->type != SQLITE_NULL) {
        const void *p = sqlite3_column_blob(r->st, c);
        v->n = sqlite3_column_bytes(r->st, c);
        v->type = SQLITE_TEXT; /* (a blob is a Lua string too) */
        if (!(v->s = copy_bytes(p, v->n))) {
          v->type = SQLITE_NULL;
          return failed(rd, r, SQLITE_NOMEM);
        }
      }
    }
    if (r->nrows == r->chunk) {
      r->more = 1;
      return; /* the statement stays, its read transaction with it: the next chunk is of the same snapshot */
    }
  }
  if (rc != SQLITE_DONE) return failed(rd, r, rc);
  sqlite3_finalize(r->st);
  r->st = NULL;
}

static void *reader_main(void *arg) {
  sql_reader *rd = arg;
  pthread_mutex_lock(&rd->mu);
  for (;;) {
    while (!rd->todo && !rd->stop) pthread_cond_wait(&rd->cv, &rd->mu);
    if (rd->stop) break; /* what is queued is freed by sql_reader_free */
    sql_read *r = rd->todo;
    rd->todo = r->next;
    if (!rd->todo) rd->todo_tail = NULL;
    r->state = READ_RUNNING;
    rd->current = r;
    pthread_mutex_unlock(&rd->mu);
    if (!atomic_load(&r->canceled)) fetch(rd, r);
    if (atomic_load(&r->canceled) && r->st) { /* nobody wants the rest */
      sqlite3_finalize(r->st);
      r->st = NULL;
    }
    pthread_mutex_lock(&rd->mu);
    rd->current = NULL;
    r->state = READ_DONE;
    r->next = rd->done;
    rd->done = r;
    uint64_t one = 1;
    ssize_t w = write(rd->efd, &one, sizeof one); /* the loop's done_cb */
    (void)w;
  }
  pthread_mutex_unlock(&rd->mu);
  return NULL;
}

/* ---------- the loop ---------- */

static void done_cb(evutil_socket_t fd, short what, void *arg) {
  sql_reader *rd = arg;
  uint64_t n;
  ssize_t got = read(rd->efd, &n, sizeof n);
  (void)got;
  pthread_mutex_lock(&rd->mu);
  sql_read *list = rd->done;
  rd->done = NULL;
  for (sql_read *r = list; r; r = r->next) r->state = READ_HELD;
  pthread_mutex_unlock(&rd->mu);
  /* (in the order they were done) */
  sql_read *rev = NULL;
  while (list) {
    sql_read *next = list->next;
    list->next = rev;
    rev = list;
    list = next;
  }
  while (rev) {
    sql_read *r = rev;
    rev = r->next;
    r->next = NULL;
    (*rd->pending)--;
    if (atomic_load(&r->canceled)) read_free(rd, r);
    else r->done(r);
  }
}

sql_reader *sql_reader_new(struct event_base *base, const char *path, int uri, double timeout, int *pending) {
  sql_reader *rd = calloc(1, sizeof *rd);
  if (!rd) return NULL;
  rd->path = strdup(path);
  rd->uri = uri;
  rd->timeout = timeout;
  rd->pending = pending;
  rd->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  pthread_mutex_init(&rd->mu, NULL);
  pthread_cond_init(&rd->cv, NULL);
  sigset_t all, old;
  sigfillset(&all);
  int started = 0;
  if (rd->path && rd->efd >= 0 &&
      (rd->done_ev = event_new(base, rd->efd, EV_READ | EV_PERSIST, done_cb, rd)) && event_add(rd->done_ev, NULL) == 0) {
    /* a small stack: SQLite needs little, and a process under an address-space limit (ulimit -v) has the
     * default 8 MB to spare no more than the exports it runs (costs_export_spec) */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, READER_STACK);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    started = pthread_create(&rd->thread, &attr, reader_main, rd) == 0;
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
  }
  if (!started) {
    if (rd->done_ev) event_free(rd->done_ev);
    if (rd->efd >= 0) close(rd->efd);
    pthread_mutex_destroy(&rd->mu);
    pthread_cond_destroy(&rd->cv);
    free(rd->path);
    free(rd);
    return NULL;
  }
  return rd;
}

sql_read *sql_read_new(sql_reader *rd, const char *sql, int nargs, int chunk) {
  sql_read *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->sql = strdup(sql);
  r->args = calloc((size_t)nargs + 1, sizeof *r->args);
  if (!r->sql || !r->args) {
    free(r->sql);
    free(r->args);
    free(r);
    return NULL;
  }
  r->nargs = nargs;
  r->chunk = chunk > 0 ? chunk : 1;
  r->state = READ_HELD;
  r->all_next = rd->all;
  if (rd->all) rd->all->all_prev = r;
  rd->all = r;
  return r;
}

/* the read's first chunk, or its next (the last one's rows are freed): r->done(r) on the loop */
void sql_read_submit(sql_reader *rd, sql_read *r) {
  free_rows(r);
  (*rd->pending)++;
  pthread_mutex_lock(&rd->mu);
  r->state = READ_QUEUED;
  r->next = NULL;
  if (rd->todo_tail) rd->todo_tail->next = r;
  else rd->todo = r;
  rd->todo_tail = r;
  pthread_cond_signal(&rd->cv);
  pthread_mutex_unlock(&rd->mu);
}

/* Nobody wants the read any more: freed now, or once the thread lets go of it (done is not called) */
void sql_read_drop(sql_reader *rd, sql_read *r) {
  atomic_store(&r->canceled, 1);
  pthread_mutex_lock(&rd->mu);
  int held = r->state == READ_HELD;
  pthread_mutex_unlock(&rd->mu);
  if (!held) return; /* the thread has it, or done_cb will: freed there */
  if (r->st) { /* its statement is the thread's connection's: finalized there */
    free_rows(r);
    sql_read_submit(rd, r);
    return;
  }
  read_free(rd, r);
}

int sql_reader_busy(const sql_reader *rd) {
  int n = 0;
  for (const sql_read *r = rd ? rd->all : NULL; r; r = r->all_next) n += !atomic_load(&r->canceled);
  return n;
}

/* Stops the thread; every read, wanted or not, is freed (their tasks never resume: the host closes) */
void sql_reader_free(sql_reader *rd) {
  if (!rd) return;
  for (sql_read *r = rd->all; r; r = r->all_next) atomic_store(&r->canceled, 1); /* a long statement stops */
  pthread_mutex_lock(&rd->mu);
  rd->stop = 1;
  pthread_cond_signal(&rd->cv);
  pthread_mutex_unlock(&rd->mu);
  pthread_join(rd->thread, NULL);
  for (sql_read *r = rd->todo; r; r = r->next) (*rd->pending)--;
  for (sql_read *r = rd->done; r; r = r->next) (*rd->pending)--;
  while (rd->all) {
    sqlite3_finalize(rd->all->st);
    rd->all->st = NULL;
    read_free(rd, rd->all);
  }
  if (rd->db) sqlite3_close(rd->db);
  event_free(rd->done_ev);
  close(rd->efd);
  pthread_mutex_destroy(&rd->mu);
  pthread_cond_destroy(&rd->cv);
  free(rd->path);
  free(rd);
}
