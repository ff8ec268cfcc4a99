/*
 * tap.h: what every C test of the embedding API shares: TAP lines, counted
 * (spec/run counts them). Each test ends with printf("1..%d\n", test_number)
 * and exits non-zero when failures is.
 */
#ifndef RESIL_TESTS_TAP_H
#define RESIL_TESTS_TAP_H

#include <stdio.h>

static int test_number;
static int failures;

/* (flushed: a test that then hangs or dies still shows how far it got) */
static void check(int ok, const char *what) {
  test_number++;
  if (!ok) failures++;
  printf("%s %d - %s\n", ok ? "ok" : "not ok", test_number, what);
  fflush(stdout);
}

#endif
