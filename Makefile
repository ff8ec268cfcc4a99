# resil-lua: a C host with Lua 5.4 policy scripts for resilient AI pipelines.
PREFIX   ?= /usr/local
DESTDIR  ?=
BUILD    ?= build
CC       ?= cc
PKGS      = lua5.4 lua5.4-cjson libcurl libevent sqlite3 hiredis libcrypto zlib
DEB_PKGS  = build-essential pkg-config liblua5.4-dev lua-cjson-dev libcurl4-openssl-dev libevent-dev \
            libhiredis-dev libsqlite3-dev zlib1g-dev libmimalloc-dev lua-busted redis-server nginx-light openssl wrk \
            libssl-dev ca-certificates prometheus clang valgrind chromium sqlite3 procps locales time

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
SAN        ?=
OPT        ?= -O2
CFLAGS     ?= $(OPT) -g
CFLAGS     += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fPIC -fvisibility=hidden $(SAN) $(PKG_CFLAGS) \
              -DRESIL_SHAREDIR='"$(PREFIX)/share/resil"'
LDFLAGS    += $(SAN)
LDLIBS     += $(PKG_LIBS) -lm
# The resil-lua binary allocates with mimalloc (libcurl and Lua allocate on
# every request; +18 % requests/s in bench/throughput.lua). Debian ships no
# .pc file for it. Not in sanitizer builds, which bring their own allocator;
# embedders keep theirs: libresil does not link it.
BIN_ALLOC  = $(if $(SAN),,-Wl,--push-state,--no-as-needed -lmimalloc -Wl,--pop-state)

# every C file but the CLI's is the library: adding a primitive is adding its file
LIB_SRC  = $(filter-out src/main.c,$(sort $(wildcard src/*.c)))
LIB_OBJ  = $(LIB_SRC:src/%.c=$(BUILD)/%.o)
LUA_SRC  = $(wildcard src/lua/*.lua)
BIN      = $(if $(filter build,$(BUILD)),resil-lua,$(BUILD)/resil-lua)

.PHONY: all deps demo test check fuzz fuzz-build fuzz-smoke bench install uninstall clean

all: $(BIN) $(BUILD)/libresil.a $(BUILD)/libresil.so

# every object depends on every private header: adding one needs no rule
$(BUILD)/%.o: src/%.c $(wildcard src/*.h) | $(BUILD)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/blobs.o: src/blobs.c $(LUA_SRC) | $(BUILD)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD):
	mkdir -p $(BUILD)

$(BUILD)/libresil.a: $(LIB_OBJ)
	ar rcs $@ $^

# The shared library's SONAME names its ABI (0: the C API may still change);
# programs linked against libresil.so record libresil.so.0
SONAME = libresil.so.0
# -z nodelete: a dlclose leaves it mapped. The SIGPIPE and SIGURG handlers a host sets stay the
# process's after resil_close (other hosts, other threads may rely on them); unmapped with the
# library, the program's next SIGPIPE jumped into nothing
$(BUILD)/$(SONAME): $(LIB_OBJ)
	$(CC) -shared -Wl,-soname,$(SONAME) -Wl,-z,nodelete $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/libresil.so: $(BUILD)/$(SONAME)
	ln -sf $(SONAME) $@

$(BIN): $(BUILD)/main.o $(BUILD)/libresil.a
	$(CC) $(LDFLAGS) -o $@ $(BUILD)/main.o $(BUILD)/libresil.a $(BIN_ALLOC) $(LDLIBS)

# the C tests: one program per file in tests/, each printing TAP
C_TESTS  = $(patsubst tests/%.c,$(BUILD)/%,$(wildcard tests/*_test.c))

$(BUILD)/%_test: tests/%_test.c tests/tap.h $(BUILD)/libresil.a
	$(CC) $(CFLAGS) -Isrc -o $@ $< $(BUILD)/libresil.a $(LDFLAGS) $(LDLIBS) -lpthread

# Installs the Debian packages the project needs; nothing when all are present.
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing:$$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi
	@# the official OpenAI and Anthropic SDKs that spec/sdk_spec.lua runs against the mock
	@if command -v npm >/dev/null 2>&1; then \
	  cmp -s spec/sdk/package-lock.json spec/sdk/node_modules/.installed-lock.json \
	    || (cd spec/sdk && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock.json); \
	else echo "npm not found: spec/sdk_spec.lua will be skipped"; fi

demo: all
	./resil-lua examples/pipeline.lua

test: all $(C_TESTS)
	RESIL=$(abspath $(BIN)) EMBED_TEST="$(abspath $(C_TESTS) $(wildcard tests/*_test.sh))" RESIL_HOME=$(CURDIR) \
	  RESIL_LIBDIR=$(BUILD) SAN_FLAGS="$(SAN)" spec/run

check:
	$(MAKE) BUILD=build/asan OPT=-O1 SAN="-fsanitize=address,undefined -fno-omit-frame-pointer" test
	$(MAKE) fuzz-smoke

# libFuzzer targets (fuzz/*_fuzz.c) for what reads bytes from outside, on a
# library built by clang with ASan+UBSan. `make fuzz` runs each for
# FUZZ_TIME seconds, new inputs in build/fuzz/corpus/, crashes as
# build/fuzz/crash-*; `make check` runs each for a few seconds over the
# committed seeds (fuzz/corpus/<target>/). A crash becomes a seed and a spec.
FUZZ_CC      ?= clang
FUZZ_BUILD    = build/fuzz
FUZZ_SAN      = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_TARGETS  = $(patsubst fuzz/%_fuzz.c,%,$(wildcard fuzz/*_fuzz.c))
FUZZ_TIME    ?= 60
FUZZ_SMOKE   ?= 3

fuzz-build:
	$(MAKE) BUILD=$(FUZZ_BUILD) CC=$(FUZZ_CC) OPT=-O1 SAN="$(FUZZ_SAN) -fsanitize=fuzzer-no-link" $(FUZZ_BUILD)/libresil.a
	$(MAKE) $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%_fuzz)

$(FUZZ_BUILD)/%_fuzz: fuzz/%_fuzz.c fuzz/fuzz_host.h $(FUZZ_BUILD)/libresil.a
	$(FUZZ_CC) -O1 -g $(FUZZ_SAN) -fsanitize=fuzzer -D_GNU_SOURCE -Isrc $(PKG_CFLAGS) -o $@ $< $(FUZZ_BUILD)/libresil.a $(LDLIBS)

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t; echo "fuzz: $$t for $(FUZZ_TIME) s"; \
	  $(FUZZ_BUILD)/$${t}_fuzz -max_total_time=$(FUZZ_TIME) -artifact_prefix=$(FUZZ_BUILD)/$$t- \
	    $(FUZZ_BUILD)/corpus/$$t fuzz/corpus/$$t > $(FUZZ_BUILD)/$$t.log 2>&1; status=$$?; \
	  if [ $$status -ne 0 ]; then echo "fuzz: $$t FAILED"; tail -40 $(FUZZ_BUILD)/$$t.log; exit 1; fi; \
	  echo "fuzz: $$t ok ($$(grep -o 'DONE.*' $(FUZZ_BUILD)/$$t.log | head -1))"; \
	done

fuzz-smoke: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  scratch=$$(mktemp -d); \
	  $(FUZZ_BUILD)/$${t}_fuzz -max_total_time=$(FUZZ_SMOKE) -artifact_prefix=$(FUZZ_BUILD)/$$t- $$scratch fuzz/corpus/$$t \
	    > $(FUZZ_BUILD)/$$t.log 2>&1; status=$$?; rm -rf $$scratch; \
	  if [ $$status -ne 0 ]; then echo "fuzz: $$t FAILED"; tail -40 $(FUZZ_BUILD)/$$t.log; exit 1; fi; \
	  echo "fuzz: $$t ok ($$(grep -o 'DONE.*' $(FUZZ_BUILD)/$$t.log | head -1))"; \
	done

bench: all
	bench/run

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include \
	  $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/share/resil/policies
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/
	install -m 644 $(BUILD)/libresil.a $(BUILD)/$(SONAME) $(DESTDIR)$(PREFIX)/lib/
	ln -sf $(SONAME) $(DESTDIR)$(PREFIX)/lib/libresil.so
	install -m 644 src/resil.h $(DESTDIR)$(PREFIX)/include/
	cp -R policies/. $(DESTDIR)$(PREFIX)/share/resil/policies/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(shell sed -n 's/.*RESIL_VERSION "\(.*\)"/\1/p' src/resil.h)|' \
	  -e 's|@REQUIRES@|$(filter-out lua5.4,$(PKGS))|' resil.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/resil.pc
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(shell sed -n 's/.*RESIL_VERSION "\(.*\)"/\1/p' src/resil.h)|' \
	  -e 's|@REQUIRES@|$(PKGS)|' resil-static.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/resil-static.pc

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/resil-lua $(DESTDIR)$(PREFIX)/lib/libresil.a $(DESTDIR)$(PREFIX)/lib/libresil.so \
	  $(DESTDIR)$(PREFIX)/lib/$(SONAME) \
	  $(DESTDIR)$(PREFIX)/include/resil.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/resil.pc \
	  $(DESTDIR)$(PREFIX)/lib/pkgconfig/resil-static.pc
	rm -rf $(DESTDIR)$(PREFIX)/share/resil

clean:
	rm -rf build resil-lua
