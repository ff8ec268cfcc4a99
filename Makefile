# resil-lua: a C host with Lua 5.4 policy scripts for resilient AI pipelines.
PREFIX   ?= /usr/local
DESTDIR  ?=
BUILD    ?= build
CC       ?= cc
PKGS      = lua5.4 lua5.4-cjson libcurl libevent sqlite3 hiredis libcrypto
DEB_PKGS  = build-essential pkg-config liblua5.4-dev lua-cjson-dev libcurl4-openssl-dev libevent-dev \
            libhiredis-dev libsqlite3-dev libmimalloc-dev lua-busted redis-server nginx-light openssl wrk \
            libssl-dev ca-certificates

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
SAN        ?=
OPT        ?= -O2
CFLAGS     ?= $(OPT) -g
CFLAGS     += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fPIC $(SAN) $(PKG_CFLAGS) \
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

.PHONY: all deps demo test check bench install uninstall clean

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

$(BUILD)/libresil.so: $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BIN): $(BUILD)/main.o $(BUILD)/libresil.a
	$(CC) $(LDFLAGS) -o $@ $(BUILD)/main.o $(BUILD)/libresil.a $(BIN_ALLOC) $(LDLIBS)

$(BUILD)/embed_test: tests/embed_test.c $(BUILD)/libresil.a
	$(CC) $(CFLAGS) -Isrc -o $@ $< $(BUILD)/libresil.a $(LDFLAGS) $(LDLIBS)

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

test: all $(BUILD)/embed_test
	RESIL=$(abspath $(BIN)) EMBED_TEST=$(abspath $(BUILD)/embed_test) RESIL_HOME=$(CURDIR) \
	  RESIL_LIBDIR=$(BUILD) SAN_FLAGS="$(SAN)" spec/run

check:
	$(MAKE) BUILD=build/asan OPT=-O1 SAN="-fsanitize=address,undefined -fno-omit-frame-pointer" test

bench: all
	bench/run

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include \
	  $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/share/resil/policies
	install -m 755 resil-lua $(DESTDIR)$(PREFIX)/bin/
	install -m 644 $(BUILD)/libresil.a $(BUILD)/libresil.so $(DESTDIR)$(PREFIX)/lib/
	install -m 644 src/resil.h $(DESTDIR)$(PREFIX)/include/
	cp -R policies/. $(DESTDIR)$(PREFIX)/share/resil/policies/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(shell sed -n 's/.*RESIL_VERSION "\(.*\)"/\1/p' src/resil.h)|' \
	  -e 's|@REQUIRES@|$(PKGS)|' resil.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/resil.pc

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/resil-lua $(DESTDIR)$(PREFIX)/lib/libresil.a $(DESTDIR)$(PREFIX)/lib/libresil.so \
	  $(DESTDIR)$(PREFIX)/include/resil.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/resil.pc
	rm -rf $(DESTDIR)$(PREFIX)/share/resil

clean:
	rm -rf build resil-lua
