/* Unit tests: a tensor message received as a stream of chunks (stream.c) reads
 * the same as the whole message, each tensor's storage taken over (no second
 * copy), and malformed chunk sequences fail cleanly. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "message.h"
#include "sl_test.h"
#include "splitlearn_comm.pb-c.h"
#include "stream.h"
#include "tensor.h"

static void no_release(void *owner) { (void)owner; }

/* The whole packed message of a payload, flat. */
static uint8_t *flat(sl_payload *p, size_t *len) {
  size_t total = sl_payload_size(p), off = 0;
  uint8_t *buf = malloc(total ? total : 1);
  for (size_t i = 0; i < sl_payload_npieces(p); i++) {
    size_t l;
    const void *d = sl_payload_piece(p, i, &l);
    if (l) memcpy(buf + off, d, l);
    off += l;
  }
  *len = total;
  return buf;
}

/* Feed `msg` as chunks of `chunk` bytes, each Chunk itself cut into spans of 3
 * bytes; returns the status of the first failure or of sl_stream_rx_spans. */
static int feed_all(sl_stream_rx *rx, const uint8_t *msg, size_t len, size_t chunk, sl_err *err) {
  size_t off = 0;
  do {
    size_t n = len - off < chunk ? len - off : chunk;
    uint8_t pre[SL_WIRE_PREFIX_MAX];
    size_t pl = sl_stream_chunk_prefix(n, pre);
    uint8_t *c = malloc(pl + n + 1);
    sl_span spans[64];
    size_t ns = 0, at = 0, total = pl + n;
    int rc;
    memcpy(c, pre, pl);
    if (n) memcpy(c + pl, msg + off, n);
    while (at < total && ns < 63) {
      size_t k = total - at < 3 ? total - at : 3;
      if (ns == 62) k = total - at;
      spans[ns].ptr = c + at;
      spans[ns++].len = k;
      at += k;
    }
    rc = sl_stream_rx_feed_chunk(rx, spans, ns, err);
    free(c);
    if (rc != SL_OK) return rc;
    off += n;
  } while (off < len);
  return sl_stream_rx_spans(rx, err);
}

static void test_structure_streamed(void) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  float h[600];
  int64_t ids[40];
  sl_tensor_out items[2];
  sl_node nodes[3] = {{SL_NODE_TUPLE, 2, NULL, 0, 0, NULL},
                      {SL_NODE_TENSOR, 0, NULL, 0, 0, NULL},
                      {SL_NODE_TENSOR, 0, NULL, 0, 0, NULL}};
  sl_tensor_set set;
  sl_payload *p = NULL;
  sl_err err;
  uint8_t *msg;
  size_t len;
  for (int i = 0; i < 600; i++) h[i] = (float)i * 0.5f;
  for (int i = 0; i < 40; i++) ids[i] = -i;
  memset(items, 0, sizeof(items));
  items[0].desc = (sl_tensor_desc){SL_DTYPE_FLOAT32, 2, {20, 30}};
  items[0].data = h;
  items[0].nbytes = sizeof(h);
  items[0].name = "0";
  items[1].desc = (sl_tensor_desc){SL_DTYPE_INT64, 1, {40}};
  items[1].data = ids;
  items[1].nbytes = sizeof(ids);
  items[1].name = "1";
  items[0].release = items[1].release = no_release;
  set = (sl_tensor_set){items, 2, SL_FORM_STRUCTURE, nodes, 3, 0};
  req.model_id = "m";
  CHECK_EQ_INT(sl_tensor_set_pack(SL_MSG_COMPUTE_REQUEST, &req.base, &set, &p, &err), SL_OK);
  msg = flat(p, &len);
  for (size_t chunk = 1; chunk <= 4096; chunk *= 3) {
    sl_stream_rx rx;
    sl_tensor_msg m;
    sl_stream_rx_init(&rx, (size_t)1 << 30);
    CHECK_EQ_INT(feed_all(&rx, msg, len, chunk, &err), SL_OK);
    CHECK_EQ_INT(rx.n_pieces, 2);
    CHECK_EQ_INT(sl_tensor_msg_read_adopt(SL_MSG_COMPUTE_REQUEST, rx.spans, rx.n_spans, NULL,
                                          rx.owned, &m, &err),
                 SL_OK);
    CHECK_EQ_INT(m.n_items, 2);
    CHECK_EQ_INT(m.form, SL_FORM_STRUCTURE);
    if (m.n_items == 2) {
      CHECK(m.items[0].data == rx.spans[1].ptr); /* taken over, not copied */
      CHECK(rx.owned[1] == NULL && rx.owned[3] == NULL);
      CHECK(memcmp(m.items[0].data, h, sizeof(h)) == 0);
      CHECK(memcmp(m.items[1].data, ids, sizeof(ids)) == 0);
      CHECK(strcmp(((Splitlearn__Comm__ComputeRequest *)m.header)->model_id, "m") == 0);
    }
    sl_tensor_msg_clear(&m);
    sl_stream_rx_clear(&rx);
  }
  free(msg);
  sl_payload_unref(p);
}

static void test_single_and_empty(void) {
  Splitlearn__Comm__BackwardRequest req = SPLITLEARN__COMM__BACKWARD_REQUEST__INIT;
  uint8_t bytes[100];
  sl_tensor_out t;
  sl_payload *p = NULL;
  sl_err err;
  uint8_t *msg;
  size_t len;
  for (int i = 0; i < 100; i++) bytes[i] = (uint8_t)i;
  memset(&t, 0, sizeof(t));
  t.desc = (sl_tensor_desc){SL_DTYPE_UINT8, 1, {100}};
  t.data = bytes;
  t.nbytes = 100;
  t.release = no_release;
  req.forward_id = "f";
  CHECK_EQ_INT(sl_tensor_out_pack(SL_MSG_BACKWARD_REQUEST, &req.base, &t, &p, &err), SL_OK);
  msg = flat(p, &len);
  {
    sl_stream_rx rx;
    sl_tensor_msg m;
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(feed_all(&rx, msg, len, 7, &err), SL_OK);
    CHECK_EQ_INT(sl_tensor_msg_read_adopt(SL_MSG_BACKWARD_REQUEST, rx.spans, rx.n_spans, NULL,
                                          rx.owned, &m, &err),
                 SL_OK);
    CHECK_EQ_INT(m.n_items, 1);
    if (m.n_items == 1) CHECK(memcmp(m.items[0].data, bytes, 100) == 0);
    sl_tensor_msg_clear(&m);
    sl_stream_rx_clear(&rx);
  }
  {
    /* an empty message (one empty chunk): a float32 0-d tensor would need 4 bytes */
    sl_stream_rx rx;
    sl_span none = {(const uint8_t *)"", 0};
    sl_tensor_msg m;
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed_chunk(&rx, &none, 1, &err), SL_OK);
    CHECK_EQ_INT(sl_stream_rx_spans(&rx, &err), SL_OK);
    CHECK_EQ_INT(sl_tensor_msg_read_adopt(SL_MSG_COMPUTE_REQUEST, rx.spans, rx.n_spans, NULL,
                                          rx.owned, &m, &err),
                 SL_EINVAL);
    sl_stream_rx_clear(&rx);
  }
  {
    /* every truncation of the stream fails cleanly, and frees what it holds */
    for (size_t cut = 1; cut < len; cut++) {
      sl_stream_rx rx;
      sl_stream_rx_init(&rx, 1 << 20);
      CHECK_EQ_INT(sl_stream_rx_feed(&rx, msg, cut, &err), SL_OK);
      if (sl_stream_rx_spans(&rx, &err) == SL_OK) {
        sl_tensor_msg m;
        /* ended on a field boundary: the reader judges it */
        if (sl_tensor_msg_read_adopt(SL_MSG_BACKWARD_REQUEST, rx.spans, rx.n_spans, NULL,
                                     rx.owned, &m, &err) == SL_OK) {
          sl_tensor_msg_clear(&m);
        }
      } else {
        CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
      }
      sl_stream_rx_clear(&rx);
    }
  }
  free(msg);
  sl_payload_unref(p);
}

static void test_malformed_chunks(void) {
  sl_err err;
  sl_stream_rx rx;
  /* a Chunk with another field */
  {
    const uint8_t bad[] = {0x10, 0x01};
    sl_span s = {bad, sizeof(bad)};
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed_chunk(&rx, &s, 1, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "Chunk 1");
    sl_stream_rx_clear(&rx);
  }
  /* a Chunk whose length disagrees with its bytes */
  {
    const uint8_t bad[] = {0x0a, 0x05, 0x01};
    sl_span s = {bad, sizeof(bad)};
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed_chunk(&rx, &s, 1, &err), SL_EINVAL);
    sl_stream_rx_clear(&rx);
  }
  /* a group in the message */
  {
    const uint8_t bad[] = {0x0a, 0x01, 0x0b};
    sl_span s = {bad, sizeof(bad)};
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed_chunk(&rx, &s, 1, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "group");
    sl_stream_rx_clear(&rx);
  }
  /* a tensor field declaring more than the limit: refused before allocating */
  {
    const uint8_t big[] = {0x0a, 0x06, 0x0a, 0x80, 0x80, 0x80, 0x80, 0x10};
    sl_span s = {big, sizeof(big)};
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed_chunk(&rx, &s, 1, &err), SL_ETOOBIG);
    CHECK_EQ_INT(err.code, SL_STATUS_RESOURCE_EXHAUSTED);
    CHECK_EQ_INT(rx.n_pieces, 0);
    sl_stream_rx_clear(&rx);
  }
  /* a varint over 10 bytes */
  {
    const uint8_t bad[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed(&rx, bad, sizeof(bad), &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "10 bytes");
    sl_stream_rx_clear(&rx);
  }
  /* more bytes than the limit */
  {
    uint8_t zeros[64];
    memset(zeros, 0, sizeof(zeros));
    sl_stream_rx_init(&rx, 16);
    CHECK_EQ_INT(sl_stream_rx_feed(&rx, zeros, 17, &err), SL_ETOOBIG);
    sl_stream_rx_clear(&rx);
  }
  /* a stream that stops inside a tensor field frees its storage (ASan checks) */
  {
    const uint8_t part[] = {0x0a, 0x80, 0x01, 1, 2, 3};
    sl_stream_rx_init(&rx, 1 << 20);
    CHECK_EQ_INT(sl_stream_rx_feed(&rx, part, sizeof(part), &err), SL_OK);
    CHECK_EQ_INT(rx.n_pieces, 1);
    CHECK_EQ_INT(sl_stream_rx_spans(&rx, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "middle of a field");
    sl_stream_rx_clear(&rx);
  }
  CHECK_EQ_INT(sl_stream_chunks(0, 0), 1);
  CHECK_EQ_INT(sl_stream_chunks(10, 4), 3);
}

int main(void) {
  RUN(test_structure_streamed);
  RUN(test_single_and_empty);
  RUN(test_malformed_chunks);
  return sl_test_done("stream");
}
