/* test_common.c: the error record and the UTF-8 helpers of sl_common. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sl_common.h"
#include "sl_test.h"

/* A message cut at SL_ERR_MSG_MAX - 1 bytes never ends inside a character. */
static void test_err_cut_on_character_boundary(void) {
  char big[2 * SL_ERR_MSG_MAX];
  sl_err err;
  /* "x" then two-, three- and four-byte characters, so that every cut offset
   * falls inside one for some prefix length */
  const char *chars[] = {"\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\x98\x80"};
  for (size_t c = 0; c < 3; c++) {
    for (size_t pad = 0; pad < 4; pad++) {
      size_t n = 0;
      memset(big, 'x', pad);
      n = pad;
      while (n + strlen(chars[c]) < sizeof(big) - 1) {
        memcpy(big + n, chars[c], strlen(chars[c]));
        n += strlen(chars[c]);
      }
      big[n] = '\0';
      sl_err_set(&err, SL_EINVAL, SL_STATUS_INTERNAL, "%s", big);
      CHECK(strlen(err.msg) < SL_ERR_MSG_MAX);
      CHECK(strlen(err.msg) + 4 > SL_ERR_MSG_MAX - 1);
      CHECK(sl_utf8_valid(err.msg, strlen(err.msg), NULL));
    }
  }
}

/* Bytes that are not UTF-8 (quoted from a peer with %.64s, say) become '?'. */
static void test_err_replaces_bad_bytes(void) {
  sl_err err;
  sl_err_set(&err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "unknown codec '%.5s'",
             "ab\xe4\xb8\xad");
  CHECK(strcmp(err.msg, "unknown codec 'ab\xe4\xb8\xad'") == 0);
  /* %.4s cuts the three-byte character in the middle of the message */
  sl_err_set(&err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "unknown codec '%.4s'",
             "ab\xe4\xb8\xad");
  CHECK(strcmp(err.msg, "unknown codec 'ab?" "?'") == 0);
  sl_err_set(&err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "%s", "a\xff" "b\xc0\xaf" "c");
  CHECK(strcmp(err.msg, "a?b??c") == 0);
  CHECK(sl_utf8_valid(err.msg, strlen(err.msg), NULL));
}

static void test_utf8_valid(void) {
  size_t bad = 99;
  CHECK(sl_utf8_valid("", 0, NULL));
  CHECK(sl_utf8_valid("plain ascii", 11, NULL));
  CHECK(sl_utf8_valid("\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80", 9, NULL));
  CHECK(sl_utf8_valid("a\0b", 3, NULL)); /* NUL is UTF-8; callers refuse it where needed */
  CHECK(!sl_utf8_valid("ab\xff", 3, &bad));
  CHECK_EQ_INT(bad, 2);
  CHECK(!sl_utf8_valid("\xc0\x80", 2, &bad));         /* overlong NUL */
  CHECK(!sl_utf8_valid("\xe0\x80\xaf", 3, &bad));     /* overlong '/' */
  CHECK(!sl_utf8_valid("\xed\xa0\x80", 3, &bad));     /* a surrogate */
  CHECK(!sl_utf8_valid("\xf4\x90\x80\x80", 4, &bad)); /* past U+10FFFF */
  CHECK(!sl_utf8_valid("x\xe4\xb8", 3, &bad));        /* cut off */
  CHECK_EQ_INT(bad, 1);
  CHECK(!sl_utf8_valid("\x80", 1, &bad));             /* stray continuation byte */
  CHECK_EQ_INT(sl_utf8_seq_len((const uint8_t *)"\xf0\x9f\x98\x80", 4), 4);
  CHECK_EQ_INT(sl_utf8_seq_len((const uint8_t *)"\xf0\x9f\x98\x80", 3), 0);
}

/* The bump allocator: aligned blocks that never move, past the first chunk and
 * larger than any chunk, all freed by one clear (ASan: no leak, no overlap). */
static void test_arena_blocks_stay_put_until_cleared(void) {
  sl_arena a = SL_ARENA_INIT;
  char *first, *blocks[64];
  size_t sizes[64];
  first = sl_arena_alloc(&a, 1);
  CHECK(first != NULL);
  first[0] = 'x';
  for (int i = 0; i < 64; i++) {
    sizes[i] = (size_t)(i * 97 % 700) + 1; /* 64 blocks: several chunks */
    blocks[i] = sl_arena_alloc(&a, sizes[i]);
    CHECK(blocks[i] != NULL);
    CHECK_EQ_INT((uintptr_t)blocks[i] % sizeof(max_align_t), 0);
    memset(blocks[i], i, sizes[i]);
  }
  {
    char *big = sl_arena_alloc(&a, 3 * SL_ARENA_FIRST); /* over a chunk's size */
    CHECK(big != NULL);
    memset(big, 0xee, 3 * SL_ARENA_FIRST);
  }
  CHECK(sl_arena_alloc(&a, SIZE_MAX - 4) == NULL); /* rounding up overflows */
  CHECK(first[0] == 'x'); /* earlier blocks did not move or get overwritten */
  for (int i = 0; i < 64; i++) {
    for (size_t j = 0; j < sizes[i]; j++) CHECK(blocks[i][j] == (char)i);
  }
  sl_arena_clear(&a);
  CHECK(a.head == NULL);
  CHECK(sl_arena_alloc(&a, 8) != NULL); /* usable again */
  sl_arena_clear(&a);
}

/* sl_strlcpy gives what snprintf(dst, size, "%s", src) gives. */
static void test_strlcpy_is_snprintf_of_a_string(void) {
  const char *srcs[] = {"", "a", "exactly8", "longer than the buffer"};
  for (size_t i = 0; i < 4; i++) {
    for (size_t size = 1; size <= 12; size++) {
      char a[16], b[16];
      memset(a, '#', sizeof(a));
      memset(b, '#', sizeof(b));
      sl_strlcpy(a, srcs[i], size);
      snprintf(b, size, "%s", srcs[i]);
      CHECK(memcmp(a, b, sizeof(a)) == 0);
    }
  }
}

int main(void) {
  RUN(test_err_cut_on_character_boundary);
  RUN(test_err_replaces_bad_bytes);
  RUN(test_utf8_valid);
  RUN(test_arena_blocks_stay_put_until_cleared);
  RUN(test_strlcpy_is_snprintf_of_a_string);
  return sl_test_done("test_common");
}
