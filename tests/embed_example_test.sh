#!/usr/bin/env bash
# The embedding example as a user builds it: install into a temporary
# prefix, build examples/embed with pkg-config only, run it (two threads, a
# reload on SIGHUP). Prints TAP; spec/run counts it. VALGRIND=1 also runs
# the example under valgrind memcheck (.ci/run; not with a sanitizer build).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
build=${RESIL_LIBDIR:-build}
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -KILL $pid 2>/dev/null; rm -rf "$tmp"' EXIT
n=0
failed=0
ok() { # ok CONDITION-STATUS DESCRIPTION
  n=$((n + 1))
  if [ "$1" -eq 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi
}
unset RESIL_HOME MAKEFLAGS MFLAGS MAKELEVEL

prefix=$tmp/prefix
make -s -C "$root" install DESTDIR= PREFIX="$prefix" BUILD="$build" SAN="${SAN_FLAGS:-}" > "$tmp/install.log" 2>&1
ok $? "make install DESTDIR= PREFIX=<temporary prefix>"
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
flags=$(pkg-config --cflags --libs resil 2>&1)
[[ "$flags" == *"-I$prefix/include"* && "$flags" == *"-lresil"* && "$flags" == *"-llua5.4"* && "$flags" == *"-levent"* ]]
ok $? "pkg-config --cflags --libs resil names the prefix, libresil, Lua and libevent: $flags"

# (and the three nghttp2 functions it interposes for libcurl 7.88 to 8.0.1: src/http.c, held_frames)
exported=$(nm -D --defined-only "$prefix/lib/libresil.so" | awk '$3 !~ /^resil_/ && $3 !~ /^nghttp2_session_(callbacks_set_on_(frame|data_chunk)_recv_callback|del)$/ { print $3 }' | tr '\n' ' ')
[ -z "$exported" ]
ok $? "libresil.so exports the resil_* API and the three nghttp2 names it interposes only (no loop_run, timer_init, ... to clash with a program's own)${exported:+: $exported}"

# A plugin that uses libresil (a Python or Lua C module, a server module) is loaded with dlopen:
# libresil.so must not need more static TLS than glibc keeps for dlopen (initial-exec TLS of 2 KiB
# made it "cannot allocate memory in static TLS block")
cat > "$tmp/plugin.c" <<'PLUGIN'
#include <resil.h>
void *plugin_entry(void) { return (void *)resil_open; }
PLUGIN
cat > "$tmp/loader.c" <<'LOADER'
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!h) { printf("%s\n", dlerror()); return 1; }
  return dlsym(h, "plugin_entry") ? 0 : 1;
}
LOADER
cc -shared -fPIC ${SAN_FLAGS:-} -o "$tmp/plugin.so" "$tmp/plugin.c" $(pkg-config --cflags --libs resil) -Wl,-rpath,"$prefix/lib" > "$tmp/plugin.log" 2>&1 &&
  cc ${SAN_FLAGS:-} -o "$tmp/loader" "$tmp/loader.c" -ldl >> "$tmp/plugin.log" 2>&1 &&
  "$tmp/loader" "$tmp/plugin.so" >> "$tmp/plugin.log" 2>&1
status=$?
ok $status "a plugin linked with libresil loads with dlopen"
[ $status -eq 0 ] || sed 's/^/# /' "$tmp/plugin.log"

# Two plugins in one process, each with libresil.a linked in: two copies of the library, each with
# its own list of the hosts it opened (src/owners.c). A host open in one copy was judged dead by the
# other (its pid this process's, not in that copy's list), which could take its once keys, budget
# holds and run over; one the other copy never opened is alive as the process is.
cat > "$tmp/twin.c" <<'TWIN'
#include <stdio.h>
#include <resil.h>
static resil_t *R;
__attribute__((visibility("default"))) char *twin_call(const char *fn, const char *args, const char *db) {
  if (!R) {
    resil_options o = {0};
    o.store = db;
    R = resil_open(&o);
    if (!R || resil_load_string(R, "local owner = require 'resil.owner'\n"
        "function my_id() return {id = owner.me().id} end\n"
        "function verdict(a) return {v = owner.verdict(a.id)} end", "twin") != RESIL_OK || resil_run(R) != RESIL_OK)
      return NULL;
  }
  char *out = NULL;
  return resil_call(R, fn, args, &out) == RESIL_OK ? out : NULL;
}
TWIN
cat > "$tmp/twins.c" <<'TWINS'
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef char *(*callf)(const char *, const char *, const char *);
int main(int argc, char **argv) {
  void *a = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL), *b = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
  if (!a || !b) { printf("%s\n", dlerror()); return 1; }
  callf ca = (callf)dlsym(a, "twin_call"), cb = (callf)dlsym(b, "twin_call");
  char *ida = ca("my_id", NULL, argv[3]);
  const char *p = ida ? strstr(ida, "\"id\":\"") : NULL;
  if (!p) { printf("no id: %s\n", ida ? ida : "(null)"); return 1; }
  p += 6;
  char args[512];
  snprintf(args, sizeof args, "[{\"id\":\"%.*s\"}]", (int)(strchr(p, '"') - p), p);
  free(ida); /* (resil_call's results are the caller's to free) */
  char *v = cb("verdict", args, argv[3]);
  printf("%s\n", v ? v : "(null)");
  int alive = v && strstr(v, "\"alive\"");
  free(v);
  return alive ? 0 : 1;
}
TWINS
twin_flags=$(pkg-config --cflags --libs resil-static)
cc -shared -fPIC ${SAN_FLAGS:-} -o "$tmp/twin_a.so" "$tmp/twin.c" $twin_flags > "$tmp/twins.log" 2>&1 &&
  cc -shared -fPIC ${SAN_FLAGS:-} -o "$tmp/twin_b.so" "$tmp/twin.c" $twin_flags >> "$tmp/twins.log" 2>&1 &&
  cc ${SAN_FLAGS:-} -o "$tmp/twins" "$tmp/twins.c" -ldl >> "$tmp/twins.log" 2>&1 &&
  "$tmp/twins" "$tmp/twin_a.so" "$tmp/twin_b.so" "$tmp/twins.db" >> "$tmp/twins.log" 2>&1
status=$?
ok $status "two plugins each with libresil.a: a host open in one is alive to the other"
[ $status -eq 0 ] || sed 's/^/# /' "$tmp/twins.log"

# ...and is unloaded with dlclose (a server's module at a graceful restart, a binding let go): the
# handlers the host set for SIGPIPE and SIGURG stay the process's, so libresil must stay mapped (it
# was unmapped with them: the program's next write to a peer that left, SIGPIPE, was a segfault)
cat > "$tmp/unload.c" <<'UNLOAD'
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <resil.h>
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!h) { printf("%s\n", dlerror()); return 1; }
  resil_t *(*open_host)(const resil_options *) = (resil_t *(*)(const resil_options *))dlsym(h, "resil_open");
  void (*close_host)(resil_t *) = (void (*)(resil_t *))dlsym(h, "resil_close");
  resil_t *R = open_host ? open_host(NULL) : NULL;
  if (!R || !close_host) return 1;
  close_host(R);
  if (dlclose(h) != 0) return 1;
  raise(SIGPIPE); /* (the host's handler: nothing happens) */
  raise(SIGURG);
  printf("after dlclose, SIGPIPE and SIGURG are harmless\n");
  return 0;
}
UNLOAD
cc ${SAN_FLAGS:-} -o "$tmp/unload" "$tmp/unload.c" $(pkg-config --cflags resil) -ldl > "$tmp/unload.log" 2>&1 &&
  "$tmp/unload" "$prefix/lib/libresil.so" >> "$tmp/unload.log" 2>&1
status=$?
ok $status "a program that dlopens libresil, closes its host and dlcloses it survives a SIGPIPE and a SIGURG after"
[ $status -eq 0 ] || { echo "# exit status $status"; sed 's/^/# /' "$tmp/unload.log"; }

# A C++ program includes the same header: its declarations are C's (extern "C"), or every resil_*
# call was a C++ name libresil does not have ("undefined reference to resil_open(resil_options const*)")
cat > "$tmp/app.cpp" <<'CPP'
#include <resil.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
int main() {
  resil_t *R = resil_open(nullptr);
  char *out = nullptr;
  int status = R ? resil_load_string(R, "function twice(x) return 2 * x end", "=cpp") : RESIL_ERR_MEMORY;
  if (status == RESIL_OK) status = resil_run(R);
  if (status == RESIL_OK) status = resil_call(R, "twice", "[21]", &out);
  if (status == RESIL_OK && std::strcmp(out, "[42]") != 0) status = 99;
  if (status != RESIL_OK) std::fprintf(stderr, "%d %s\n", status, resil_error(R));
  std::free(out);
  resil_close(R);
  return status;
}
CPP
c++ -Wall -Wextra ${SAN_FLAGS:-} -o "$tmp/app-cpp" "$tmp/app.cpp" $(pkg-config --cflags --libs resil) -Wl,-rpath,"$prefix/lib" > "$tmp/cpp.log" 2>&1 &&
  "$tmp/app-cpp" >> "$tmp/cpp.log" 2>&1
status=$?
ok $status "a C++ program builds against resil.h through pkg-config, links and calls the host"
[ $status -eq 0 ] || sed 's/^/# /' "$tmp/cpp.log" | head -20

(cd "$tmp" && "$prefix/bin/resil-lua" -e "assert(require('policies.retry')) print(package.searchpath('x', 'y') or 'found')" > "$tmp/policies.out" 2>&1)
ok $? "the installed resil-lua finds the shipped policies under the prefix (no RESIL_HOME)"

cp -R "$root/examples/embed" "$tmp/example"
rm -f "$tmp/example/embed"
san=${SAN_FLAGS:-}
make -s -C "$tmp/example" CFLAGS="-O1 -g $san" LDFLAGS="$san" > "$tmp/build.log" 2>&1
status=$?
ok $status "examples/embed builds with its own Makefile through pkg-config only"
[ $status -eq 0 ] || sed 's/^/# /' "$tmp/build.log"

run=()
[ "${VALGRIND:-}" = 1 ] && run=(valgrind -q --leak-check=full --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect --error-exitcode=99)
cd "$tmp/example"
"${run[@]}" ./embed --wait-for-sighup > "$tmp/run.out" 2> "$tmp/run.err" &
pid=$!
for _ in $(seq 600); do grep -q "waiting for SIGHUP" "$tmp/run.out" && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done
grep -q '^main: \["Mock reply to: hello",1\]$' "$tmp/run.out"
ok $? "it calls the policy with resil_call against the mock"
grep -qF 'main: ["Mock reply to: a \"quoted\" one,\nwith a \\",1]' "$tmp/run.out"
ok $? "a question with quotes, a newline and a backslash reaches the policy as it is (the JSON is escaped)"
[ "$(grep -c '^thread-1: \["Mock reply to: thread-1 question' "$tmp/run.out")" = 3 ] &&
  [ "$(grep -c '^thread-2: \["Mock reply to: thread-2 question' "$tmp/run.out")" = 3 ]
ok $? "and from two threads with a host each"
sed -i 's/version = 1/version = 2/' policies/answer.lua
kill -HUP $pid 2>/dev/null
wait $pid
status=$?
pid=
grep -q '^policy version 2 after reload$' "$tmp/run.out" && grep -q '^main: \["Mock reply to: after reload",2\]$' "$tmp/run.out"
ok $? "SIGHUP reloads the policy and new calls see the new version"
ok $status "the example exits 0${VALGRIND:+ under valgrind memcheck (no leaks, no errors)}"
if [ $failed -ne 0 ]; then
  sed 's/^/# out: /' "$tmp/run.out"
  sed 's/^/# err: /' "$tmp/run.err"
fi
echo "1..$n"
exit $failed
