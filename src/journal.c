/*
 * journal.c: the files where ledger writes the store would not take wait for it
 * (src/lua/journal.lua). A paid call's cost row or budget settle that a store
 * down for longer than the retry's minute (a Redis outage, SQLite's lock held
 * by another process), or still unwritten as the process ends, was dropped
 * with a line in the log. It is now a line in a file of this process's, and
 * written to the store when it answers: by this process, or by the next one
 * that opens the store.
 *
 * Who owns a file is told by flock, not by names or pids: a process holds an
 * exclusive lock on each file it appends to for as long as it has it open,
 * and the kernel lets go of it when the process ends, however it ends
 * (kill -9 too). A file whose lock can be had has no writer left; taking the
 * lock is claiming it, so two processes never replay the same file at once.
 *
 * require "resil.core.journal" ->
 *   open(path)           -> file (its folder made) | nil, err  (locked: another's is "in use")
 *   file:append(text)    -> true | nil, err  (one write of the whole text, O_APPEND; none of it if it fails)
 *   file:sync()          -> true | nil, err  (fdatasync: past a power cut, not only a crash)
 *   file:close()         -> true | nil, err  (synced, its lock let go)
 *   claim(dir, prefix)   -> { claim, ... }: the files dir/prefix*.jsonl no process holds, locked now
 *                           (regular files of this user's only)
 *   claim:read()         -> the file's text | nil, err
 *   claim:done()         -> the file removed (its lines are written, or kept in another file)
 *   claim:release()      -> its lock let go, the file left as it is
 *   any(dir, prefix)     -> whether dir has a file dir/prefix*.jsonl (held or not)
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "host.h"

#define FILE_MT "resil.journal.file"
#define CLAIM_MT "resil.journal.claim"
#define MOST_CLAIMED 64               /* files claimed at once: the rest wait for the next pass */
#define MOST_READ (256 * 1024 * 1024) /* a file larger is not read whole (some 600,000 rows) */

typedef struct {
  int fd;
  char *path; /* (a claim's: removed by done; a file's: made again if removed under it, relink) */
} journal_file;

static int fail(lua_State *L, const char *what, const char *path) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s %s: %s", what, path, strerror(errno));
  return 2;
}

/* the folders of path made as mkdir -p would (0700: the ledger's figures are the owner's) */
static int make_parents(char *path) {
  for (char *p = strchr(path + 1, '/'); p; p = strchr(p + 1, '/')) {
    *p = '\0';
    int r = mkdir(path, 0700);
    *p = '/';
    if (r != 0 && errno != EEXIST) return -1;
  }
  return 0;
}

static journal_file *new_file(lua_State *L, const char *mt, int fd, const char *path) {
  journal_file *f = lua_newuserdatauv(L, sizeof *f, 0);
  f->fd = fd;
  f->path = path ? strdup(path) : NULL;
  luaL_setmetatable(L, mt);
  return f;
}

/* path opened for appending and locked, and still its name once locked -> fd | -1 (errno). Between
 * the open that made it and the lock, a replayer could claim the new empty file and remove it: the
 * lock was then had on a file no longer in the folder, and every line written to it lost. (Read
 * and write: a file removed under its writer is copied to its name again, relink.) */
static int open_locked(const char *path) {
  for (int tries = 0; tries < 8; tries++) {
    int fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return -1;
    struct stat st;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0 || fstat(fd, &st) != 0) {
      int e = errno;
      close(fd);
      errno = e;
      return -1;
    }
    if (st.st_nlink > 0) return fd;
    close(fd);
  }
  errno = EAGAIN;
  return -1;
}

static int l_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char *dirs = strdup(path);
  if (!dirs) return luaL_error(L, "out of memory");
  int r = make_parents(dirs);
  free(dirs);
  if (r != 0) return fail(L, "cannot make the journal's folder for", path);
  int fd = open_locked(path);
  if (fd < 0 && errno == EWOULDBLOCK) return fail(L, "the journal is in use:", path);
  if (fd < 0) return fail(L, "cannot open the journal", path);
  new_file(L, FILE_MT, fd, path);
  return 1;
}

/* A file removed under its writer (by hand, a cleaner of old files) takes its lines with it when
 * it is closed, and those written after: it is made again under its name, what it had copied in.
 * -> 0 | -1 (errno; the file left as it was) */
static int relink(journal_file *f) {
  struct stat st;
  if (fstat(f->fd, &st) != 0) return -1;
  if (st.st_nlink > 0 || !f->path) return 0;
  int fd = open_locked(f->path);
  if (fd < 0) return -1;
  char buf[65536];
  off_t at = 0;
  for (;;) {
    ssize_t n = pread(f->fd, buf, sizeof buf, at);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) break;
    ssize_t w = n < 0 ? -1 : write(fd, buf, (size_t)n);
    if (w != n) {
      int e = n < 0 || w < 0 ? errno : ENOSPC;
      unlink(f->path); /* (the copy cut short: not left for a replayer as a file with half the lines) */
      close(fd);
      errno = e;
      return -1;
    }
    at += n;
  }
  close(f->fd);
  f->fd = fd;
  return 0;
}

static journal_file *open_file(lua_State *L, const char *mt) {
  journal_file *f = luaL_checkudata(L, 1, mt);
  if (f->fd < 0) luaL_error(L, "the journal file is closed");
  return f;
}

static int l_append(lua_State *L) {
  journal_file *f = open_file(L, FILE_MT);
  size_t len;
  const char *text = luaL_checklstring(L, 2, &len);
  if (relink(f) != 0) return fail(L, "cannot make again the removed journal", f->path);
  /* (a write cut short, the disk full, is taken back: the next line, once there is room, would have
   * followed the half line and been read with it as one line that is not a ledger write) */
  off_t start = lseek(f->fd, 0, SEEK_END);
  while (len > 0) {
    ssize_t n = write(f->fd, text, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      if (start >= 0 && ftruncate(f->fd, start) != 0) { /* (left as it is: its reader names the half line) */
      }
      errno = e;
      return fail(L, "cannot write to", "the journal");
    }
    text += n;
    len -= (size_t)n;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_sync(lua_State *L) {
  journal_file *f = open_file(L, FILE_MT);
  if (relink(f) != 0) return fail(L, "cannot make again the removed journal", f->path);
  if (fdatasync(f->fd) != 0) return fail(L, "cannot sync", "the journal");
  lua_pushboolean(L, 1);
  return 1;
}

static int close_file(journal_file *f) {
  int r = 0;
  if (f->fd >= 0) {
    r = close(f->fd); /* (the lock goes with the last descriptor of the file) */
    f->fd = -1;
  }
  free(f->path);
  f->path = NULL;
  return r;
}

static int l_close(lua_State *L) {
  journal_file *f = luaL_checkudata(L, 1, FILE_MT);
  int synced = f->fd < 0 || (relink(f) == 0 && fdatasync(f->fd) == 0);
  int e = errno;
  close_file(f);
  if (!synced) {
    errno = e;
    return fail(L, "cannot sync", "the journal");
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_gc(lua_State *L) {
  close_file(lua_touserdata(L, 1));
  return 0;
}

/* A file appended to, collected (the state closing: what was kept after the last sync, the lines the
 * host's close kept, is made durable as the README says, not only closed) */
static int l_file_gc(lua_State *L) {
  journal_file *f = lua_touserdata(L, 1);
  if (f->fd >= 0) fdatasync(f->fd);
  return l_gc(L);
}

static int is_journal(const char *name, const char *prefix, size_t plen) {
  size_t n = strlen(name);
  return n > plen + 6 && strncmp(name, prefix, plen) == 0 && strcmp(name + n - 6, ".jsonl") == 0;
}

static int l_claim(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  size_t plen;
  const char *prefix = luaL_checklstring(L, 2, &plen);
  lua_newtable(L);
  DIR *d = opendir(dir);
  if (!d) return 1; /* (no folder: nothing was ever kept) */
  struct dirent *e;
  int n = 0;
  while (n < MOST_CLAIMED && (e = readdir(d)) != NULL) {
    if (!is_journal(e->d_name, prefix, plen)) continue;
    lua_pushfstring(L, "%s/%s", dir, e->d_name);
    const char *path = lua_tostring(L, -1);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    /* held: its writer is alive (or another process is replaying it); no link left: replayed and
     * removed by another between the listing and the lock */
    /* (a folder or a fifo named like one: never a journal, not read each pass; another user's file, in
     * a folder others may write in (RESIL_JOURNAL=/tmp): its lines were written to the ledger, costs
     * and settles anyone on the machine could plant) */
    if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0 || fstat(fd, &st) != 0 || st.st_nlink == 0 ||
        !S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
      if (fd >= 0) close(fd);
      lua_pop(L, 1);
      continue;
    }
    new_file(L, CLAIM_MT, fd, path);
    lua_remove(L, -2);
    lua_rawseti(L, -2, ++n);
  }
  closedir(d);
  return 1;
}

static int l_any(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  size_t plen;
  const char *prefix = luaL_checklstring(L, 2, &plen);
  int found = 0;
  DIR *d = opendir(dir);
  struct dirent *e;
  while (d && !found && (e = readdir(d)) != NULL) found = is_journal(e->d_name, prefix, plen);
  if (d) closedir(d);
  lua_pushboolean(L, found);
  return 1;
}

static int l_claim_read(lua_State *L) {
  journal_file *f = open_file(L, CLAIM_MT);
  struct stat st;
  if (fstat(f->fd, &st) != 0) return fail(L, "cannot read", f->path);
  if (st.st_size > MOST_READ) {
    lua_pushnil(L);
    lua_pushfstring(L, "the journal %s is larger than %d bytes: written to the store in parts, by hand", f->path,
                    MOST_READ);
    return 2;
  }
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, (size_t)st.st_size);
  size_t got = 0;
  while (got < (size_t)st.st_size) {
    ssize_t n = pread(f->fd, out + got, (size_t)st.st_size - got, (off_t)got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(L, "cannot read", f->path);
    if (n == 0) break;
    got += (size_t)n;
  }
  luaL_pushresultsize(&b, got);
  return 1;
}

static int l_claim_done(lua_State *L) {
  journal_file *f = open_file(L, CLAIM_MT);
  /* removed while still locked: a process that listed it meanwhile finds no link and skips it */
  int r = unlink(f->path);
  int e = errno;
  char *path = strdup(f->path);
  close_file(f);
  if (r != 0) {
    errno = e;
    lua_pushnil(L);
    lua_pushfstring(L, "cannot remove the journal %s: %s", path ? path : "?", strerror(e));
    free(path);
    return 2;
  }
  free(path);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_claim_release(lua_State *L) {
  close_file(luaL_checkudata(L, 1, CLAIM_MT));
  return 0;
}

static int l_claim_path(lua_State *L) {
  journal_file *f = luaL_checkudata(L, 1, CLAIM_MT);
  lua_pushstring(L, f->path ? f->path : "");
  return 1;
}

int luaopen_resil_journal(lua_State *L) {
  static const luaL_Reg file_methods[] = {
    {"append", l_append}, {"sync", l_sync}, {"close", l_close}, {NULL, NULL}};
  static const luaL_Reg claim_methods[] = {
    {"read", l_claim_read}, {"done", l_claim_done}, {"release", l_claim_release}, {"path", l_claim_path},
    {NULL, NULL}};
  luaL_newmetatable(L, FILE_MT);
  luaL_newlib(L, file_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_file_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, CLAIM_MT);
  luaL_newlib(L, claim_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {{"open", l_open}, {"claim", l_claim}, {"any", l_any}, {NULL, NULL}};
  luaL_newlib(L, fns);
  return 1;
}
