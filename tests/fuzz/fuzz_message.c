/* fuzz_message.c: libFuzzer target for the wire reader and the message parser
 * (sl_wire_split, sl_tensor_msg_read_owned: the protobuf header, text fields, dtype,
 * shape, codec metadata) and, for a message that parses, the built-in codec's
 * decode, exactly as the server and the client run them on what they receive.
 *
 * Input: one byte, then the message. The byte's low 2 bits pick the message
 * kind (ComputeRequest, ComputeResponse, BackwardRequest, BackwardResponse); the
 * rest pick how the message is cut into spans (gRPC hands a message over in
 * slices at arbitrary boundaries), from one span to spans of 1 byte.
 *
 * The same message is also read from one span that lends its bytes, as a
 * shared-memory segment does (the fuzz build lowers SL_LEND_MIN_BYTES to 1): same
 * verdict, same bytes, every loan inside the span, aligned, and given back.
 *
 * The same message is also received as a stream (stream.h: the spans fed as
 * pieces, the tensor fields copied into storage as they arrive, then read with
 * sl_tensor_msg_read_adopt): it must give the same verdict and the same tensors. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "message.h"
#include "stream.h"
#include "tensor.h"

#define FUZZ_MAX_DECODED (1u << 20)

/* The spans' owner, as the server and the client have one: a released span is
 * freed at once, so that ASan sees any later read of it. Releases come in order. */
typedef struct fuzz_owner {
  sl_span *spans;
  size_t next;
} fuzz_owner;

static void fuzz_release(void *user, size_t span) {
  fuzz_owner *o = user;
  if (span != o->next) __builtin_trap();
  free((void *)o->spans[span].ptr);
  o->spans[span].ptr = NULL;
  o->next = span + 1;
}

/* A lender over one span: counts its loans. */
typedef struct fuzz_lender {
  int out;
} fuzz_lender;

static void *fuzz_lend(void *user) {
  ((fuzz_lender *)user)->out++;
  return user;
}

static void fuzz_unlend(void *token) { ((fuzz_lender *)token)->out--; }

/* Read `msg` as one lending span; trap unless it agrees with `ref` (rc_ref its
 * verdict) and every loan is inside the span, aligned, and given back. */
static void check_lent_read(sl_msg_kind kind, const uint8_t *msg, size_t size, int rc_ref,
                            const sl_tensor_msg *ref) {
  fuzz_lender l = {0};
  sl_span one = {msg, size};
  sl_span_owner lender = {NULL, &l, fuzz_lend, fuzz_unlend};
  sl_tensor_msg m;
  sl_err err;
  int rc;
  sl_err_clear(&err);
  rc = sl_tensor_msg_read_owned(kind, &one, 1, NULL, &lender, &m, &err);
  if ((rc == SL_OK) != (rc_ref == SL_OK)) __builtin_trap();
  if (rc == SL_OK) {
    if (m.n_items != ref->n_items) __builtin_trap();
    for (size_t i = 0; i < m.n_items; i++) {
      const sl_tensor_item *it = &m.items[i];
      size_t align = sl_dtype_itemsize(it->desc.dtype);
      if (it->nbytes != ref->items[i].nbytes) __builtin_trap();
      if (it->nbytes && memcmp(it->data, ref->items[i].data, it->nbytes) != 0) __builtin_trap();
      if (it->lender == NULL) continue;
      if ((const uint8_t *)it->data < msg || it->nbytes > size ||
          (const uint8_t *)it->data > msg + size - it->nbytes) {
        __builtin_trap();
      }
      if (align > 1 && (uintptr_t)it->data % align != 0) __builtin_trap();
    }
    sl_tensor_msg_clear(&m);
  }
  if (l.out != 0) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const size_t cuts[][3] = {{0, 0, 0}, {1, 1, 1}, {1, 2, 3}, {7, 1, 64},
                                   {3, 0, 5}, {16, 16, 16}, {64, 1, 1}, {2, 9, 4}};
  sl_msg_kind kind;
  const size_t *cut;
  sl_span *spans;
  size_t nspans = 0, off = 0, k = 0, nbytes = 0;
  uint8_t *msg;
  sl_tensor_msg m;
  sl_err err;
  int rc;

  if (size < 1) return 0;
  kind = (sl_msg_kind)(data[0] & 3);
  cut = cuts[(data[0] >> 2) % (sizeof(cuts) / sizeof(cuts[0]))];
  data++;
  size--;
  /* each span in its own allocation, so that ASan sees a read past any of them */
  spans = calloc(size + 4, sizeof(*spans));
  msg = malloc(size ? size : 1);
  if (spans == NULL || msg == NULL) abort();
  memcpy(msg, data, size);
  do {
    size_t len = cut[0] == 0 ? size - off : cut[k++ % 3]; /* 0: an empty span */
    if (len > size - off) len = size - off;
    spans[nspans].ptr = len ? malloc(len) : NULL;
    if (len) memcpy((uint8_t *)spans[nspans].ptr, msg + off, len);
    spans[nspans].len = len;
    nspans++;
    off += len;
  } while (off < size && nspans < size + 4);
  sl_err_clear(&err);
  {
    /* first as a stream (the spans are still whole: the owned read below frees them) */
    sl_stream_rx rx;
    sl_tensor_msg m2;
    sl_err err2;
    int rc2 = SL_OK;
    sl_err_clear(&err2);
    memset(&m2, 0, sizeof(m2));
    sl_stream_rx_init(&rx, FUZZ_MAX_DECODED); /* inputs are smaller: a longer field is cut */
    for (size_t i = 0; rc2 == SL_OK && i < nspans; i++) {
      rc2 = sl_stream_rx_feed(&rx, spans[i].ptr, spans[i].len, &err2);
    }
    if (rc2 == SL_OK) rc2 = sl_stream_rx_spans(&rx, &err2);
    if (rc2 == SL_OK) {
      rc2 = sl_tensor_msg_read_adopt(kind, rx.spans, rx.n_spans, NULL, rx.owned, &m2, &err2);
    }
    if (rc2 != SL_OK && err2.code == SL_STATUS_OK) __builtin_trap();
    {
      fuzz_owner o = {spans, 0};
      sl_span_owner owner = {fuzz_release, &o};
      rc = sl_tensor_msg_read_owned(kind, spans, nspans, NULL, &owner, &m, &err);
    }
    check_lent_read(kind, msg, size, rc, &m);
    /* the stream reads what the whole message reads, and refuses what it refuses (it
     * may refuse earlier) */
    if (rc2 != SL_OK && rc == SL_OK) __builtin_trap();
    if (rc2 == SL_OK) {
      if (rc != SL_OK || m2.n_items != m.n_items || m2.form != m.form) __builtin_trap();
      for (size_t i = 0; i < m.n_items; i++) {
        if (m2.items[i].nbytes != m.items[i].nbytes) __builtin_trap();
        if (m.items[i].nbytes &&
            memcmp(m2.items[i].data, m.items[i].data, m.items[i].nbytes) != 0) {
          __builtin_trap();
        }
      }
      sl_tensor_msg_clear(&m2);
    }
    sl_stream_rx_clear(&rx);
  }
  if (rc == SL_OK) {
    size_t total = 0;
    for (size_t i = 0; i < m.n_items; i++) {
      const sl_tensor_item *it = &m.items[i];
      if (it->data == NULL && it->nbytes > 0) __builtin_trap();
      if (sl_desc_nbytes(&it->desc, &nbytes) != SL_OK) __builtin_trap(); /* validated */
      if (it->decoded && it->nbytes != nbytes) __builtin_trap();
      total += nbytes;
    }
    if (total <= FUZZ_MAX_DECODED) {
      rc = sl_tensor_msg_decode(&m, &err);
      for (size_t i = 0; rc == SL_OK && i < m.n_items; i++) {
        const sl_tensor_item *it = &m.items[i];
        if (sl_desc_nbytes(&it->desc, &nbytes) != SL_OK) __builtin_trap();
        if (it->decoded && it->nbytes != nbytes) __builtin_trap();
      }
    }
    sl_tensor_msg_clear(&m);
  }
  if (rc != SL_OK) {
    if (err.code == SL_STATUS_OK) __builtin_trap();
    if (!sl_utf8_valid(err.msg, strlen(err.msg), NULL)) __builtin_trap();
  }
  for (size_t i = 0; i < nspans; i++) free((void *)spans[i].ptr);
  free(spans);
  free(msg);
  return 0;
}
