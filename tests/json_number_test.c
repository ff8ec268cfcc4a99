/*
 * json_number_test.c: json_number_text, which writes the numbers of log lines and ledger units
 * without json.encode, writes each float as json.encode does: %.14g when it reads back as the
 * same double, else the exact digits. Checked against that rule, byte for byte, over the
 * decimals its short path takes (a duration in ms, a cost in dollars) and over random doubles.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"
#include "tap.h"

/* the rule for a float that %.14g reads back: its %.14g text */
static int matches_rule(lua_State *L, double x, int *compared) {
  char want[32], got[32];
  snprintf(want, sizeof want, "%.14g", x);
  if (strtod(want, NULL) != x) return 1; /* (the exact path: not this test's) */
  lua_pushnumber(L, x);
  size_t n = json_number_text(L, -1, got);
  lua_pop(L, 1);
  got[n] = '\0';
  (*compared)++;
  if (strcmp(want, got) != 0) {
    fprintf(stderr, "%.17g: want %s, got %s\n", x, want, got);
    return 0;
  }
  return 1;
}

static uint64_t state = 88172645463325252ull;
static uint64_t next_random(void) { /* xorshift64: the same numbers each run */
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

int main(void) {
  lua_State *L = luaL_newstate();
  static const double scale[] = {1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7};
  int ok = 1, compared = 0;
  for (int d = 1; d <= 7; d++) {
    for (int i = 0; i < 200000 && ok; i++) {
      /* r of 1 to 15 digits, its decimal point d places from the right */
      uint64_t digits = 1 + next_random() % 15, r = next_random() % (uint64_t)pow(10, (double)digits);
      double x = (double)r / scale[d];
      ok = matches_rule(L, x, &compared) && matches_rule(L, -x, &compared);
    }
  }
  check(ok, "a decimal of 1 to 7 places, up to 15 digits, is written as %.14g writes it");
  int edges_ok = 1;
  static const double edges[] = {0.0001, 0.00011, 0.0005, 0.001, 0.000999, 0.1, 0.5, 0.437, 12.5, 99999999.999999,
                                 1e8 + 0.5, 1e-5, 0.00001234, 123456.789, 1e13 + 0.5, 0.000001, 1.1e-6,
                                 1.2e-5, 5e-5, 9.9e-5, 1e-6, 2e-6, 0.000099, 0.0000105, 1e-7, 9e-7};
  for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
    edges_ok = matches_rule(L, edges[i], &compared) && matches_rule(L, -edges[i], &compared) && edges_ok;
  check(edges_ok, "the edges of fixed notation and of the places taken");
  int random_ok = 1;
  for (int i = 0; i < 500000 && random_ok; i++) {
    uint64_t bits = next_random();
    double x;
    memcpy(&x, &bits, sizeof x);
    if (isfinite(x)) random_ok = matches_rule(L, x, &compared);
  }
  check(random_ok, "random doubles that %.14g reads back are written as it writes them");
  check(compared > 2000000, "enough numbers were compared");
  lua_close(L);
  printf("1..%d\n", test_number);
  return failures ? 1 : 0;
}
