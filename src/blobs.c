/*
 * blobs.c: the Lua half of the host (the files in src/lua/), compiled into the
 * library as NUL-terminated strings, so an embedder needs no files at run
 * time. Each is registered as package.preload["resil.<name>"] (src/resil.c);
 * adding a module is adding its line to EMBEDDED below. The paths are
 * relative to the top of the tree, where make runs.
 */
#include "host.h"

#define EMBEDDED(X)                                                                  \
  X(prelude, "src/lua/prelude.lua")           /* map, timeout, streams, reload */    \
  X(metrics, "src/lua/metrics.lua")           /* counters, gauges, histograms */     \
  X(mock, "src/lua/mock.lua")                 /* the mock provider */                \
  X(mock_jobs, "src/lua/mock_jobs.lua")       /* its Replicate, fal, ElevenLabs APIs */ \
  X(mock_wire, "src/lua/mock_wire.lua")       /* what its APIs refuse in a conversation */ \
  X(owner, "src/lua/owner.lua")               /* who holds what, and are they alive */ \
  X(store, "src/lua/store.lua")               /* resil.store: URL, backends, kv */   \
  X(store_sqlite, "src/lua/store_sqlite.lua") /* the SQLite backend */               \
  X(store_redis, "src/lua/store_redis.lua")   /* the Redis backend */                \
  X(journal, "src/lua/journal.lua")           /* ledger writes kept for the store */ \
  X(once, "src/lua/once.lua")                 /* resil.once */                       \
  X(runs, "src/lua/runs.lua")                 /* resil.step, resil.run */            \
  X(costs, "src/lua/costs.lua")               /* resil.cost */                       \
  X(budgets, "src/lua/budgets.lua")           /* resil.budget */                     \
  X(limits, "src/lua/limits.lua")             /* resil.bucket, resil.breaker */      \
  X(trace, "src/lua/trace.lua")               /* W3C trace context, OTLP export */   \
  X(commands, "src/lua/commands.lua")         /* resil-lua runs | costs | budgets */ \
  X(report, "src/lua/report.lua")             /* runs show --html: the run report */  \
  X(keys, "src/lua/keys.lua")                 /* the gateway's keys; resil-lua keys */ \
  X(check, "src/lua/check.lua")               /* resil-lua check */

#define EMBED_LUA(name, file)                                                                                   \
  __asm__(".section .rodata\n.global resil_lua_" #name "\n.hidden resil_lua_" #name                             \
          "\n.type resil_lua_" #name ", @object\n.balign 16\n"                                                   \
          "resil_lua_" #name ":\n.incbin \"" file "\"\n.byte 0\n.previous\n");                                \
  extern const char resil_lua_##name[];
EMBEDDED(EMBED_LUA)

#define MODULE_ENTRY(name, file) {#name, resil_lua_##name},
const resil_lua_module resil_lua_modules[] = {EMBEDDED(MODULE_ENTRY){NULL, NULL}};
