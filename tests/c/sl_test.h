/* sl_test.h: a minimal unit-test harness for the C core (no Python).
 *
 * CHECK(cond) records a failure with file and line and goes on; RUN(fn) runs a
 * test function and reports it; sl_test_done() prints "N passed, N failed" and
 * returns the exit status. */
#ifndef SL_TEST_H
#define SL_TEST_H

#include <stdio.h>
#include <string.h>

static int sl_test_failures_in_test;
static int sl_test_passed;
static int sl_test_failed;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
      sl_test_failures_in_test++;                                                     \
    }                                                                                 \
  } while (0)

#define CHECK_EQ_INT(a, b)                                                            \
  do {                                                                                \
    long long sl_a_ = (long long)(a), sl_b_ = (long long)(b);                         \
    if (sl_a_ != sl_b_) {                                                             \
      fprintf(stderr, "  %s:%d: %s == %s failed (%lld vs %lld)\n", __FILE__, __LINE__, \
              #a, #b, sl_a_, sl_b_);                                                  \
      sl_test_failures_in_test++;                                                     \
    }                                                                                 \
  } while (0)

#define CHECK_CONTAINS(haystack, needle)                                              \
  do {                                                                                \
    if (strstr((haystack), (needle)) == NULL) {                                       \
      fprintf(stderr, "  %s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__, \
              (haystack), (needle));                                                  \
      sl_test_failures_in_test++;                                                     \
    }                                                                                 \
  } while (0)

#define RUN(fn)                                                \
  do {                                                         \
    sl_test_failures_in_test = 0;                              \
    fn();                                                      \
    if (sl_test_failures_in_test == 0) {                       \
      sl_test_passed++;                                        \
      printf("ok   %s\n", #fn);                                \
    } else {                                                   \
      sl_test_failed++;                                        \
      printf("FAIL %s\n", #fn);                                \
    }                                                          \
    fflush(stdout);                                            \
  } while (0)

static inline int sl_test_done(const char *suite) {
  printf("%s: %d passed, %d failed\n", suite, sl_test_passed, sl_test_failed);
  return sl_test_failed ? 1 : 0;
}

#endif /* SL_TEST_H */
