/*
 * wal_sync.c: makes a SQLite store's commits durable off the loop.
 *
 * With synchronous=FULL, SQLite's COMMIT calls fdatasync on the WAL: on the
 * loop thread, every request in flight stood still for it (204 us at the
 * median on a quiet VM disk, 2.2 ms at p99, 7.8 ms at worst, and as long as a
 * struggling disk takes). The store now commits with synchronous=NORMAL (the
 * WAL is written, not synced) and asks this thread to fdatasync the WAL; the
 * batch's tasks are woken only when that returns, so a caller still sees its
 * write durable, as with FULL, while the loop serves everyone else. The same
 * thread runs the checkpoints (on a connection of its own), which otherwise
 * happen inside a COMMIT, with two more syncs.
 *
 * One sync at a time per store; the store holds its next batch until then
 * (store_sqlite.c), so nothing committed is read or acted on before it is
 * durable. (Committing during a sync was tried: the commit's writes to the
 * WAL pages under writeback wait in the kernel, on the loop, and the
 * gateway ran slower.) The checkpoint that may follow a sync runs before the
 * loop is told; the store then has the few frames written meanwhile synced
 * and copied too, its batches waiting (store_sqlite.c), so that its next
 * write restarts the WAL from the top, which SQLite does only for a write
 * that begins with the WAL all copied. A write made with db:commit_only lets
 * its task go on at the commit: it survives a crash of the process, and is
 * synced with the commits of the next few milliseconds (store_sqlite.c), not
 * one by one.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "host.h"


struct wal_syncer {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int asked, stop; /* under mu */
  int checkpoint;  /* under mu: the WAL is long enough to checkpoint after the sync */
  int result;      /* errno of the last sync, under mu */
  int wal_fd;      /* the thread's own (SQLite holds no lock on the WAL: closing it drops none) */
  char *db_path, *wal_path;
  sqlite3 *checkpointer; /* the thread's own connection */
  int efd;               /* the thread tells the loop */
  struct event *done_ev;
  void (*done)(void *arg, int err);
  void *arg;
};

/* fdatasync the WAL as it is now: the file SQLite writes may have been made
 * again (a store closed by every process loses its WAL), so it is opened
 * again when its inode changed. -> 0 | errno */
static int sync_wal(wal_syncer *s) {
  struct stat now, held;
  if (stat(s->wal_path, &now) != 0) return errno == ENOENT ? 0 : errno; /* no WAL: nothing unsynced */
  if (s->wal_fd >= 0 && (fstat(s->wal_fd, &held) != 0 || held.st_ino != now.st_ino || held.st_dev != now.st_dev)) {
    close(s->wal_fd);
    s->wal_fd = -1;
  }
  if (s->wal_fd < 0) {
    s->wal_fd = open(s->wal_path, O_RDONLY | O_CLOEXEC);
    if (s->wal_fd < 0) return errno;
  }
  if (fdatasync(s->wal_fd) != 0) return errno;
  return 0;
}

/* Copy the WAL's pages into the database (after a sync: what it copies is
 * durable already). PASSIVE never waits for a reader or the writer, so the
 * loop commits meanwhile; the rest goes next time. */
static void checkpoint_wal(wal_syncer *s) {
  if (!s->checkpointer &&
      sqlite3_open_v2(s->db_path, &s->checkpointer, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
    sqlite3_close(s->checkpointer);
    s->checkpointer = NULL;
    return; /* SQLite checkpoints at the next open */
  }
  sqlite3_exec(s->checkpointer, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL);
  int log = 0, copied = 0;
  sqlite3_wal_checkpoint_v2(s->checkpointer, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &copied);
  /* SQLite syncs the database file only when a checkpoint copies the whole
   * WAL; one that writes went on during leaves what it copied to the sync of
   * the next, which the store's batches wait for (store_sqlite.c: the second
   * copy). Synced here instead, while they go on. */
  if (copied < log) {
    /* (through the checkpointer's own descriptor: a close of one of ours dropped every fcntl lock
     * the process held on the file, SQLite's shared lock of each connection in it included, and
     * another process's close then took the file for its last user and deleted the WAL and -shm
     * under a second host of this one, which refused every write after) */
    sqlite3_file *db_file = NULL;
    if (sqlite3_file_control(s->checkpointer, "main", SQLITE_FCNTL_FILE_POINTER, &db_file) == SQLITE_OK && db_file &&
        db_file->pMethods)
      db_file->pMethods->xSync(db_file, SQLITE_SYNC_NORMAL | SQLITE_SYNC_DATAONLY);
  }
}

static void *syncer_main(void *arg) {
  wal_syncer *s = arg;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (!s->asked && !s->stop) pthread_cond_wait(&s->cv, &s->mu);
    if (!s->asked) break; /* stopped, with no sync asked for (one asked for is done first) */
    int checkpoint = s->checkpoint;
    s->asked = s->checkpoint = 0;
    pthread_mutex_unlock(&s->mu);
    int err = sync_wal(s);
    /* the loop hears of it after the checkpoint: its next write then finds
     * the WAL copied and starts it again from the top (a write begun during
     * the checkpoint appends, and under steady writes the WAL grew without
     * end: 160 MB in a minute, each checkpoint walking all of it) */
    if (checkpoint && !err) checkpoint_wal(s);
    pthread_mutex_lock(&s->mu);
    s->result = err;
    uint64_t one = 1;
    ssize_t w = write(s->efd, &one, sizeof one); /* the loop's done_cb */
    (void)w;
  }
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

static void done_cb(evutil_socket_t fd, short what, void *arg) {
  wal_syncer *s = arg;
  uint64_t n;
  ssize_t r = read(s->efd, &n, sizeof n);
  (void)r;
  pthread_mutex_lock(&s->mu);
  int err = s->result;
  pthread_mutex_unlock(&s->mu);
  s->done(s->arg, err);
}


wal_syncer *wal_syncer_new(struct event_base *base, const char *db_path, void (*done)(void *arg, int err),
                           void *arg) {
  wal_syncer *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->wal_fd = -1;
  s->db_path = strdup(db_path);
  s->wal_path = malloc(strlen(db_path) + 5);
  if (s->wal_path) sprintf(s->wal_path, "%s-wal", db_path);
  s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  s->done = done;
  s->arg = arg;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  /* the thread takes no signal meant for the process: a SIGINT or SIGTERM the kernel gave it ran the
   * program's handler here, off the loop's thread (as the watchdog's thread, watchdog.c) */
  sigset_t all, old;
  sigfillset(&all);
  int started = 0;
  if (s->db_path && s->wal_path && s->efd >= 0 &&
      (s->done_ev = event_new(base, s->efd, EV_READ | EV_PERSIST, done_cb, s)) && event_add(s->done_ev, NULL) == 0) {
    pthread_sigmask(SIG_BLOCK, &all, &old);
    started = pthread_create(&s->thread, NULL, syncer_main, s) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
  }
  if (!started) {
    if (s->done_ev) event_free(s->done_ev);
    if (s->efd >= 0) close(s->efd);
    free(s->db_path);
    free(s->wal_path);
    free(s);
    return NULL;
  }
  return s;
}

/* Make everything committed so far durable, then checkpoint if asked (the
 * store's WAL hook counts its frames); done(arg, err) on the loop.
 * (Like a SQLite connection, a store is not carried across fork: the CLI's
 * gateway workers fork before they open one.) */
void wal_syncer_request(wal_syncer *s, int checkpoint) {
  pthread_mutex_lock(&s->mu);
  s->asked = 1;
  s->checkpoint |= checkpoint;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

/* The same, here and now (db:now: setup and migrations, outside the loop's
 * turns), on a descriptor of its own: it may overlap the thread's sync,
 * which is harmless (each covers what was written before it began). */
int wal_syncer_sync_now(wal_syncer *s) {
  int fd = open(s->wal_path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? 0 : errno;
  int err = fdatasync(fd) == 0 ? 0 : errno;
  close(fd);
  return err;
}

void wal_syncer_free(wal_syncer *s) {
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  s->stop = 1;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
  pthread_join(s->thread, NULL);
  event_free(s->done_ev);
  close(s->efd);
  if (s->wal_fd >= 0) close(s->wal_fd);
  if (s->checkpointer) sqlite3_close(s->checkpointer);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  free(s->db_path);
  free(s->wal_path);
  free(s);
}
