/* Unit tests: the tensor-aware protobuf reader and writer (wire.c, message.c),
 * over messages cut into spans at every kind of boundary. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "message.h"
#include "sl_test.h"
#include "splitlearn_comm.pb-c.h"
#include "wire.h"

/* A packed ComputeRequest with `ndata` bytes of tensor data and most other
 * fields set, so that the splitter must carry them into the header. */
static uint8_t *make_request(const uint8_t *data, size_t ndata, int32_t *shape, size_t nshape,
                             const char *dtype, size_t *len) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  Splitlearn__Comm__ComputeRequest__MetadataEntry e = SPLITLEARN__COMM__COMPUTE_REQUEST__METADATA_ENTRY__INIT;
  Splitlearn__Comm__ComputeRequest__MetadataEntry *ep = &e;
  uint8_t *buf;
  req.data.data = (uint8_t *)data;
  req.data.len = ndata;
  req.shape = shape;
  req.n_shape = nshape;
  req._request_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___REQUEST_ID_REQUEST_ID;
  req.request_id = 77;
  e.key = "trace";
  e.value = "abc";
  req.metadata = &ep;
  req.n_metadata = 1;
  req.model_id = "m1";
  req.dtype = (char *)dtype;
  *len = splitlearn__comm__compute_request__get_packed_size(&req);
  buf = malloc(*len);
  splitlearn__comm__compute_request__pack(&req, buf);
  return buf;
}

/* Cut `buf` into spans of the given sizes (cycled). */
static sl_span *cut(const uint8_t *buf, size_t len, const size_t *sizes, size_t nsizes,
                    size_t *nspans) {
  sl_span *spans = malloc((len + 1) * sizeof(*spans));
  size_t off = 0, n = 0, k = 0;
  while (off < len) {
    size_t s = sizes[k++ % nsizes];
    if (s > len - off) s = len - off;
    spans[n].ptr = buf + off;
    spans[n].len = s;
    n++;
    off += s;
  }
  *nspans = n;
  return spans;
}

static void check_request(const sl_span *spans, size_t nspans, const uint8_t *data, size_t ndata) {
  sl_tensor_msg m;
  sl_err err;
  Splitlearn__Comm__ComputeRequest *req;
  sl_err_clear(&err);
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, spans, nspans, &m, &err), SL_OK);
  if (err.status != SL_OK) {
    fprintf(stderr, "  error: %s\n", err.msg);
    return;
  }
  CHECK_EQ_INT(m.items[0].nbytes, ndata);
  CHECK(memcmp(m.items[0].data, data, ndata) == 0);
  CHECK_EQ_INT((uintptr_t)m.items[0].data % SL_STORAGE_ALIGN, 0);
  req = (Splitlearn__Comm__ComputeRequest *)m.header;
  CHECK_EQ_INT(req->request_id, 77);
  CHECK_EQ_INT(req->n_metadata, 1);
  CHECK(strcmp(req->model_id, "m1") == 0);
  CHECK_EQ_INT(req->data.len, 0); /* the tensor bytes never went through protobuf-c */
  CHECK_EQ_INT(m.items[0].desc.ndim, 2);
  sl_tensor_msg_clear(&m);
}

static void test_read_every_cut(void) {
  uint8_t data[24 * 4];
  int32_t shape[] = {4, 6};
  size_t len, nspans;
  uint8_t *buf;
  for (size_t i = 0; i < sizeof(data); i++) data[i] = (uint8_t)(i * 7 + 1);
  buf = make_request(data, sizeof(data), shape, 2, "float32", &len);
  for (size_t size = 1; size <= len; size++) {
    size_t sizes[] = {size, 1, 3};
    sl_span *spans = cut(buf, len, sizes, size < 5 ? 1 : 3, &nspans);
    check_request(spans, nspans, data, sizeof(data));
    free(spans);
  }
  free(buf);
}

static void test_read_with_empty_spans(void) {
  uint8_t data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  int32_t shape[] = {2, 1};
  size_t len;
  uint8_t *buf = make_request(data, sizeof(data), shape, 2, "int32", &len);
  sl_span spans[4] = {{buf, 0}, {buf, 5}, {buf + 5, 0}, {buf + 5, len - 5}};
  check_request(spans, 4, data, sizeof(data));
  free(buf);
}

static void test_data_field_last_wins(void) {
  uint8_t first[4] = {9, 9, 9, 9}, second[4] = {1, 2, 3, 4};
  int32_t shape[] = {1, 1};
  size_t len;
  uint8_t *buf = make_request(first, 4, shape, 2, "float32", &len);
  uint8_t *two = malloc(len + 6);
  sl_span span;
  sl_tensor_msg m;
  sl_err err;
  memcpy(two, buf, len);
  two[len] = 0x0a; /* field 1, wire type 2 */
  two[len + 1] = 4;
  memcpy(two + len + 2, second, 4);
  span.ptr = two;
  span.len = len + 6;
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, &span, 1, &m, &err), SL_OK);
  CHECK(m.items[0].data != NULL && memcmp(m.items[0].data, second, 4) == 0);
  sl_tensor_msg_clear(&m);
  free(two);
  free(buf);
}

static void test_every_truncation_fails_cleanly(void) {
  uint8_t data[40];
  int32_t shape[] = {10, 1};
  size_t len, valid_prefixes = 0;
  uint8_t *buf;
  memset(data, 3, sizeof(data));
  buf = make_request(data, sizeof(data), shape, 2, "float32", &len);
  for (size_t cutlen = 0; cutlen < len; cutlen++) {
    /* a fresh copy of exactly cutlen bytes, so ASan sees any over-read */
    uint8_t *part = malloc(cutlen ? cutlen : 1);
    sl_span span = {part, cutlen};
    sl_tensor_msg m;
    sl_err err;
    int rc;
    memcpy(part, buf, cutlen);
    sl_err_clear(&err);
    rc = sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, &span, 1, &m, &err);
    if (rc == SL_OK) {
      /* a prefix that ends between two fields after the tensor is itself a whole,
       * valid message (the later fields are simply absent) */
      valid_prefixes++;
      CHECK_EQ_INT(m.items[0].nbytes, sizeof(data));
      sl_tensor_msg_clear(&m);
    } else {
      CHECK_EQ_INT(rc, SL_EINVAL);
      CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
      CHECK(err.msg[0] != '\0');
    }
    free(part);
  }
  /* shape, request_id and metadata end at field boundaries; model_id and dtype
   * are the tail */
  CHECK(valid_prefixes >= 1 && valid_prefixes <= 4);
  free(buf);
}

static void test_malformed_inputs(void) {
  static const struct {
    uint8_t bytes[16];
    size_t len;
    const char *needle;
  } cases[] = {
      {{0x0a, 0x80}, 2, "truncated"},                                   /* length varint cut */
      {{0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, 12, "varint"},
      {{0x0b}, 1, "wire type 3"},                                       /* group start */
      {{0x08, 0x01}, 2, "tensor field 1"},                              /* data as varint */
      {{0x00, 0x00}, 2, "invalid field number"},
      {{0x0a, 0x05, 0x01}, 3, "truncated"},                             /* data longer than msg */
      {{0x15, 0x01, 0x02}, 3, "truncated"},                             /* fixed32 cut */
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    sl_span span = {cases[i].bytes, cases[i].len};
    sl_wire_split_result r;
    sl_err err;
    sl_err_clear(&err);
    CHECK_EQ_INT(sl_wire_split(&span, 1, 1, &r, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, cases[i].needle);
    CHECK(r.header == NULL);
  }
}

static void test_bad_dtype_and_shape(void) {
  uint8_t data[12] = {0};
  int32_t shape[] = {3};
  int32_t neg[] = {-3};
  size_t len;
  sl_span span;
  sl_tensor_msg m;
  sl_err err;
  uint8_t *buf = make_request(data, 12, shape, 1, "float128", &len);
  span.ptr = buf;
  span.len = len;
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, &span, 1, &m, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "unknown dtype 'float128'");
  free(buf);
  buf = make_request(data, 12, shape, 1, "int64", &len);
  span.ptr = buf;
  span.len = len;
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, &span, 1, &m, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "needs 24 bytes but the message carries 12");
  free(buf);
  buf = make_request(data, 12, neg, 1, "float32", &len);
  span.ptr = buf;
  span.len = len;
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, &span, 1, &m, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "negative");
  free(buf);
}

/* A float32 [3] ComputeRequest (or BackwardRequest) followed by field `field`
 * (length-delimited) holding `v` (`vlen` bytes), built by hand: protobuf-c
 * cannot pack a string with a NUL in it. */
static size_t with_field(uint8_t *buf, uint32_t field, const char *v, size_t vlen) {
  size_t n = 0;
  static const uint8_t head[] = {0x12, 0x01, 0x03, 0x0a, 0x0c};
  memcpy(buf, head, sizeof(head));
  n = sizeof(head);
  memset(buf + n, 0, 12);
  n += 12;
  n += sl_wire_put_varint(((uint64_t)field << 3) | 2, buf + n);
  n += sl_wire_put_varint(vlen, buf + n);
  memcpy(buf + n, v, vlen);
  return n + vlen;
}

static int read_kind(sl_msg_kind kind, const uint8_t *buf, size_t len, sl_err *err) {
  sl_span span = {buf, len};
  sl_tensor_msg m;
  int rc;
  sl_err_clear(err);
  rc = sl_tensor_msg_read(kind, &span, 1, &m, err);
  if (rc == SL_OK) sl_tensor_msg_clear(&m);
  return rc;
}

/* Names with a NUL in them, and text fields that are not UTF-8: refused,
 * naming the field (issue 16 D3, D6). */
static void test_text_fields_checked(void) {
  uint8_t buf[256], entry[64];
  size_t len, elen;
  sl_err err;
  static const struct {
    sl_msg_kind kind;
    uint32_t field;
    const char *v;
    size_t vlen;
    const char *needle;
  } cases[] = {
      {SL_MSG_COMPUTE_REQUEST, 16, "float32\0junk", 12, "field 'dtype' of ComputeRequest holds a NUL"},
      {SL_MSG_COMPUTE_REQUEST, 17, "raw\0x", 5, "field 'codec' of ComputeRequest holds a NUL"},
      {SL_MSG_COMPUTE_REQUEST, 16, "float\xff", 6, "field 'dtype' of ComputeRequest is not valid UTF-8"},
      {SL_MSG_COMPUTE_REQUEST, 5, "m\xc3", 2, "field 'model_id' of ComputeRequest is not valid UTF-8 (byte 1"},
      {SL_MSG_COMPUTE_REQUEST, 6, "\xed\xa0\x80", 3, "field 'forward_id' of ComputeRequest"},
      {SL_MSG_COMPUTE_RESPONSE, 6, "\xff", 1, "field 'forward_id' of ComputeResponse"},
      {SL_MSG_BACKWARD_REQUEST, 3, "\xff", 1, "field 'forward_id' of BackwardRequest"},
      {SL_MSG_BACKWARD_REQUEST, 4, "a\0", 2, "field 'model_id' of BackwardRequest holds a NUL"},
      {SL_MSG_COMPUTE_REQUEST, 40, "s\xff", 2, "field 'session_id' of ComputeRequest"},
      {SL_MSG_BACKWARD_REQUEST, 40, "s\0", 2, "field 'session_id' of BackwardRequest holds a NUL"},
      {SL_MSG_BACKWARD_RESPONSE, 17, "\x80", 1, "field 'codec' of BackwardResponse"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    len = with_field(buf, cases[i].field, cases[i].v, cases[i].vlen);
    CHECK_EQ_INT(read_kind(cases[i].kind, buf, len, &err), SL_EINVAL);
    CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
    CHECK_CONTAINS(err.msg, cases[i].needle);
  }
  /* map entries: metadata {key: 1, value: 2}, codec_metadata {key, MetadataValue} */
  elen = 0;
  entry[elen++] = 0x0a, entry[elen++] = 1, entry[elen++] = 'k';
  entry[elen++] = 0x12, entry[elen++] = 2, entry[elen++] = 'v', entry[elen++] = 0xc0;
  len = with_field(buf, 4, (const char *)entry, elen);
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_REQUEST, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "field 'metadata (a value)' of ComputeRequest is not valid UTF-8");
  entry[1] = 1, entry[2] = 0xfe;
  entry[6] = 'w';
  len = with_field(buf, 4, (const char *)entry, elen);
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_REQUEST, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "field 'metadata (a key)'");
  /* codec_metadata: key "k", value MetadataValue{string_value (3): "\xff"} */
  elen = 0;
  entry[elen++] = 0x0a, entry[elen++] = 1, entry[elen++] = 'k';
  entry[elen++] = 0x12, entry[elen++] = 3;
  entry[elen++] = 0x1a, entry[elen++] = 1, entry[elen++] = 0xff;
  len = with_field(buf, 18, (const char *)entry, elen);
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_REQUEST, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "codec_metadata (a string value)");
  /* bytes_value (4) of a MetadataValue may hold anything */
  entry[5] = 0x22;
  len = with_field(buf, 18, (const char *)entry, elen);
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_REQUEST, buf, len, &err), SL_OK);
  /* well-formed text of every width passes; so does the same bytes in a bytes field */
  len = with_field(buf, 5, "m\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80", 10);
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_REQUEST, buf, len, &err), SL_OK);
  len = with_field(buf, 7, "\xff", 1); /* a field this server does not know: skipped */
  CHECK_EQ_INT(read_kind(SL_MSG_BACKWARD_REQUEST, buf, len, &err), SL_OK);
  /* the named tensors' names and codec metadata, the structure's keys and strings */
  len = with_field(buf, 19, "\x0a\x02n\xff", 4); /* NamedTensor{name: "n\xff"} */
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_REQUEST, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "field 'tensors (a name)' of ComputeRequest is not valid UTF-8");
  /* NamedTensor{codec_metadata: {"k": MetadataValue{string_value: "\xff"}}} */
  len = with_field(buf, 19, "\x2a\x08\x0a\x01k\x12\x03\x1a\x01\xff", 10);
  CHECK_EQ_INT(read_kind(SL_MSG_COMPUTE_RESPONSE, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "tensors (a codec_metadata string value)");
  len = with_field(buf, 21, "\x1a\x02k\x00", 4); /* StructureNode{key: "k\0"} */
  CHECK_EQ_INT(read_kind(SL_MSG_BACKWARD_REQUEST, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "field 'structure (a key)' of BackwardRequest holds a NUL");
  len = with_field(buf, 21, "\x32\x01\xc0", 3); /* StructureNode{string_value: "\xc0"} */
  CHECK_EQ_INT(read_kind(SL_MSG_BACKWARD_RESPONSE, buf, len, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "field 'structure (a string value)'");
}

static void test_old_peer_message_is_float32(void) {
  /* the earlier pure-Python peer sends only data and shape */
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  float values[3] = {1.5f, -2.0f, 3.25f};
  int32_t shape[] = {3};
  uint8_t buf[64];
  size_t len;
  sl_span span;
  sl_tensor_msg m;
  sl_err err;
  req.data.data = (uint8_t *)values;
  req.data.len = sizeof(values);
  req.shape = shape;
  req.n_shape = 1;
  len = splitlearn__comm__compute_request__pack(&req, buf);
  span.ptr = buf;
  span.len = len;
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, &span, 1, &m, &err), SL_OK);
  CHECK_EQ_INT(m.items[0].desc.dtype, SL_DTYPE_FLOAT32);
  CHECK(strcmp(m.items[0].codec, SL_CODEC_RAW) == 0);
  CHECK(m.items[0].data != NULL && memcmp(m.items[0].data, values, sizeof(values)) == 0);
  sl_tensor_msg_clear(&m);
}

static int released;
static void count_release(void *owner) {
  (void)owner;
  released++;
}

static void test_pack_then_read(void) {
  Splitlearn__Comm__ComputeResponse resp = SPLITLEARN__COMM__COMPUTE_RESPONSE__INIT;
  int64_t values[5] = {1, -2, 3, INT64_MIN, INT64_MAX};
  int32_t shape[] = {5};
  sl_payload *p = NULL;
  sl_err err;
  size_t hlen, dlen;
  const uint8_t *h;
  const void *d;
  uint8_t *whole;
  sl_span spans[2];
  sl_tensor_msg m;
  resp.shape = shape;
  resp.n_shape = 1;
  resp.dtype = "int64";
  resp.codec = "raw";
  released = 0;
  CHECK_EQ_INT(sl_tensor_msg_pack(SL_MSG_COMPUTE_RESPONSE, &resp.base, values, sizeof(values),
                                  count_release, NULL, &p, &err),
               SL_OK);
  h = sl_payload_header(p, &hlen);
  d = sl_payload_data(p, &dlen);
  CHECK(d == (const void *)values); /* referenced, not copied */
  CHECK_EQ_INT(dlen, sizeof(values));
  spans[0].ptr = h;
  spans[0].len = hlen;
  spans[1].ptr = d;
  spans[1].len = dlen;
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_RESPONSE, spans, 2, &m, &err), SL_OK);
  CHECK(m.items[0].data != NULL && memcmp(m.items[0].data, values, sizeof(values)) == 0);
  CHECK_EQ_INT(m.items[0].desc.dtype, SL_DTYPE_INT64);
  sl_tensor_msg_clear(&m);
  /* and protobuf-c agrees with our framing */
  whole = malloc(hlen + dlen);
  memcpy(whole, h, hlen);
  memcpy(whole + hlen, d, dlen);
  {
    Splitlearn__Comm__ComputeResponse *r =
        splitlearn__comm__compute_response__unpack(NULL, hlen + dlen, whole);
    CHECK(r != NULL);
    if (r != NULL) {
      CHECK_EQ_INT(r->data.len, sizeof(values));
      CHECK(memcmp(r->data.data, values, sizeof(values)) == 0);
      splitlearn__comm__compute_response__free_unpacked(r, NULL);
    }
  }
  free(whole);
  CHECK_EQ_INT(released, 0);
  sl_payload_ref(p);
  sl_payload_unref(p);
  CHECK_EQ_INT(released, 0);
  sl_payload_unref(p);
  CHECK_EQ_INT(released, 1); /* exactly once, at the last reference */
}

static void test_pack_refuses_over_limit(void) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  sl_payload *p = (sl_payload *)1;
  sl_err err;
  released = 0;
  /* the data pointer is never read: the size check comes first */
  CHECK_EQ_INT(sl_tensor_msg_pack(SL_MSG_COMPUTE_REQUEST, &req.base, (void *)16,
                                  SL_MAX_MESSAGE_BYTES, count_release, NULL, &p, &err),
               SL_ETOOBIG);
  CHECK(p == NULL);
  CHECK_EQ_INT(err.code, SL_STATUS_RESOURCE_EXHAUSTED);
  CHECK_CONTAINS(err.msg, "2 GiB");
  CHECK_EQ_INT(released, 1); /* the rule of sl_common.h: a failed call released it */
}

static void test_prefix_and_varint(void) {
  uint8_t out[SL_WIRE_PREFIX_MAX];
  CHECK_EQ_INT(sl_wire_data_prefix(1, 0, out), 2);
  CHECK_EQ_INT(out[0], 0x0a);
  CHECK_EQ_INT(sl_wire_data_prefix(1, 300, out), 3);
  CHECK_EQ_INT(out[1], 0xac);
  CHECK_EQ_INT(out[2], 0x02);
  CHECK_EQ_INT(sl_wire_put_varint(UINT64_MAX, out), 10);
}

/* Gather a payload's pieces as spans, each cut into pieces of at most `cut` bytes
 * (the fragmentation gRPC gives). *buf keeps the span array; caller frees. */
static size_t payload_spans(const sl_payload *p, size_t cut, sl_span **out) {
  size_t n = 0, cap = 16;
  sl_span *v = malloc(cap * sizeof(*v));
  for (size_t i = 0; i < sl_payload_npieces(p); i++) {
    size_t len;
    const uint8_t *d = sl_payload_piece(p, i, &len);
    for (size_t off = 0; off < len; off += cut) {
      if (n == cap) {
        cap *= 2;
        v = realloc(v, cap * sizeof(*v));
      }
      v[n].ptr = d + off;
      v[n].len = len - off < cut ? len - off : cut;
      n++;
    }
  }
  *out = v;
  return n;
}

static uint8_t *payload_flat(const sl_payload *p, size_t *len) {
  uint8_t *whole = malloc(sl_payload_size(p) + 1);
  size_t off = 0;
  for (size_t i = 0; i < sl_payload_npieces(p); i++) {
    size_t l;
    const void *d = sl_payload_piece(p, i, &l);
    memcpy(whole + off, d, l);
    off += l;
  }
  *len = off;
  return whole;
}

static void test_structure_roundtrip(void) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  float h[6] = {1, 2, 3, 4, 5, 6};
  int64_t ids[4] = {7, 8, 9, 10};
  uint8_t flag = 1;
  sl_tensor_out items[3];
  sl_node nodes[7] = {
      {SL_NODE_DICT, 4, NULL, 0, 0, NULL},  {SL_NODE_TENSOR, 0, "a", 0, 0, NULL},
      {SL_NODE_TUPLE, 2, "b", 0, 0, NULL},  {SL_NODE_TENSOR, 0, NULL, 0, 0, NULL},
      {SL_NODE_INT, 0, NULL, -5, 0, NULL},  {SL_NODE_TENSOR, 0, "c", 0, 0, NULL},
      {SL_NODE_NONE, 0, "d", 0, 0, NULL}};
  sl_tensor_set set;
  sl_payload *p = NULL;
  sl_err err;
  sl_span *spans;
  size_t nspans;
  sl_tensor_msg m;
  memset(items, 0, sizeof(items));
  items[0].desc = (sl_tensor_desc){SL_DTYPE_FLOAT32, 2, {2, 3}};
  items[0].data = h;
  items[0].nbytes = sizeof(h);
  items[0].name = "a";
  items[1].desc = (sl_tensor_desc){SL_DTYPE_INT64, 1, {4}};
  items[1].data = ids;
  items[1].nbytes = sizeof(ids);
  items[1].name = "b.0";
  items[2].desc = (sl_tensor_desc){SL_DTYPE_BOOL, 0, {0}};
  items[2].data = &flag;
  items[2].nbytes = 1;
  items[2].name = "c";
  for (int i = 0; i < 3; i++) items[i].release = count_release;
  set = (sl_tensor_set){items, 3, SL_FORM_STRUCTURE, nodes, 7, 0};
  released = 0;
  CHECK_EQ_INT(sl_tensor_set_pack(SL_MSG_COMPUTE_REQUEST, &req.base, &set, &p, &err), SL_OK);
  CHECK(req.tensors == NULL && req.n_tensors == 0); /* no pointer into freed memory */
  {
    size_t len;
    CHECK(sl_payload_piece(p, 1, &len) == (const void *)h); /* referenced, not copied */
    CHECK(sl_payload_piece(p, 3, &len) == (const void *)ids);
  }
  for (size_t cut = 1; cut <= 64; cut *= 4) {
    nspans = payload_spans(p, cut, &spans);
    CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, spans, nspans, &m, &err), SL_OK);
    CHECK_EQ_INT(m.form, SL_FORM_STRUCTURE);
    CHECK_EQ_INT(m.n_items, 3);
    CHECK_EQ_INT(m.n_nodes, 7);
    if (m.n_items == 3 && m.n_nodes == 7) {
      CHECK(strcmp(m.items[1].name, "b.0") == 0);
      CHECK(memcmp(m.items[0].data, h, sizeof(h)) == 0);
      CHECK(memcmp(m.items[1].data, ids, sizeof(ids)) == 0);
      CHECK_EQ_INT(m.items[2].desc.ndim, 0);
      CHECK_EQ_INT(m.items[2].desc.dtype, SL_DTYPE_BOOL);
      CHECK_EQ_INT(m.nodes[4].kind, SL_NODE_INT);
      CHECK_EQ_INT(m.nodes[4].i, -5);
      CHECK(strcmp(m.nodes[6].key, "d") == 0);
    }
    sl_tensor_msg_clear(&m);
    free(spans);
  }
  {
    /* protobuf-c agrees with our framing */
    size_t len;
    uint8_t *whole = payload_flat(p, &len);
    Splitlearn__Comm__ComputeRequest *r = splitlearn__comm__compute_request__unpack(NULL, len, whole);
    CHECK(r != NULL);
    if (r != NULL) {
      CHECK_EQ_INT(r->n_tensors, 3);
      CHECK_EQ_INT(r->n_tensor_data, 3);
      CHECK_EQ_INT(r->n_structure, 7);
      CHECK_EQ_INT(r->n_shape, 0);
      CHECK_EQ_INT(r->tensor_data[1].len, sizeof(ids));
      splitlearn__comm__compute_request__free_unpacked(r, NULL);
    }
    free(whole);
  }
  CHECK_EQ_INT(released, 0);
  sl_payload_unref(p);
  CHECK_EQ_INT(released, 3); /* each exactly once */
}

static void test_kv_cache_fields(void) {
  Splitlearn__Comm__ComputeResponse resp = SPLITLEARN__COMM__COMPUTE_RESPONSE__INIT;
  float x[4] = {1, 2, 3, 4}, k0[6] = {1, 1, 1, 2, 2, 2}, v0[6] = {3, 3, 3, 4, 4, 4};
  float k1[2] = {5, 6}, v1[2] = {7, 8};
  sl_tensor_out items[5];
  sl_tensor_set set;
  sl_payload *p = NULL;
  sl_err err;
  sl_span *spans;
  size_t nspans, len;
  sl_tensor_msg m;
  uint8_t *whole;
  memset(items, 0, sizeof(items));
  items[0].desc = (sl_tensor_desc){SL_DTYPE_FLOAT32, 1, {4}};
  items[0].data = x;
  items[1].desc = (sl_tensor_desc){SL_DTYPE_FLOAT32, 4, {1, 1, 2, 3}};
  items[1].data = k0;
  items[2].desc = items[1].desc;
  items[2].data = v0;
  items[3].desc = (sl_tensor_desc){SL_DTYPE_FLOAT32, 4, {1, 1, 1, 2}};
  items[3].data = k1;
  items[4].desc = items[3].desc;
  items[4].data = v1;
  items[0].nbytes = sizeof(x);
  items[1].nbytes = items[2].nbytes = sizeof(k0);
  items[3].nbytes = items[4].nbytes = sizeof(k1);
  for (int i = 0; i < 5; i++) items[i].release = count_release;
  set = (sl_tensor_set){items, 5, SL_FORM_SINGLE, NULL, 0, 2};
  released = 0;
  CHECK_EQ_INT(sl_tensor_set_pack(SL_MSG_COMPUTE_RESPONSE, &resp.base, &set, &p, &err), SL_OK);
  whole = payload_flat(p, &len);
  {
    /* what a stock protobuf reader (the original's grpcio client) sees */
    Splitlearn__Comm__ComputeResponse *r = splitlearn__comm__compute_response__unpack(NULL, len, whole);
    CHECK(r != NULL);
    if (r != NULL) {
      CHECK_EQ_INT(r->data.len, sizeof(x));
      CHECK_EQ_INT(r->n_present_key_values, 2);
      if (r->n_present_key_values == 2) {
        CHECK_EQ_INT(r->present_key_values[0]->n_key_shape, 4);
        CHECK_EQ_INT(r->present_key_values[0]->key_shape[3], 3);
        CHECK(memcmp(r->present_key_values[1]->value_data.data, v1, sizeof(v1)) == 0);
      }
      splitlearn__comm__compute_response__free_unpacked(r, NULL);
    }
  }
  free(whole);
  nspans = payload_spans(p, 3, &spans);
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_RESPONSE, spans, nspans, &m, &err), SL_OK);
  CHECK_EQ_INT(m.form, SL_FORM_SINGLE);
  CHECK_EQ_INT(m.n_kv, 2);
  if (m.n_items == 5) {
    CHECK(memcmp(m.items[2].data, v0, sizeof(v0)) == 0);
    CHECK(memcmp(m.items[3].data, k1, sizeof(k1)) == 0);
    CHECK_EQ_INT(m.items[1].desc.shape[3], 3);
  }
  sl_tensor_msg_clear(&m);
  free(spans);
  sl_payload_unref(p);
  CHECK_EQ_INT(released, 5);
  /* a KV cache entry that is not float32 is refused, and everything released */
  items[2].desc.dtype = SL_DTYPE_INT32;
  released = 0;
  CHECK_EQ_INT(sl_tensor_set_pack(SL_MSG_COMPUTE_RESPONSE, &resp.base, &set, &p, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "raw float32");
  CHECK_EQ_INT(released, 5);
}

/* A ComputeRequest with named tensors built by protobuf-c alone (as a foreign
 * sender would), then read; returns the read status. */
static int read_named(size_t n_desc, const char *const *names, size_t n_data,
                      const sl_node *nodes, size_t n_nodes, int with_single,
                      const sl_msg_limits *lim, sl_err *err) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  Splitlearn__Comm__NamedTensor nt[8], *ntp[8];
  Splitlearn__Comm__StructureNode sn[64], *snp[64];
  ProtobufCBinaryData data[8];
  float one = 1.0f;
  int64_t shape1[1] = {1};
  int32_t shape32[1] = {1};
  uint8_t *buf;
  size_t len;
  sl_span span;
  sl_tensor_msg m;
  int rc;
  for (size_t i = 0; i < n_desc; i++) {
    splitlearn__comm__named_tensor__init(&nt[i]);
    nt[i].name = (char *)names[i];
    nt[i].dtype = "float32";
    nt[i].n_shape = 1;
    nt[i].shape = shape1;
    ntp[i] = &nt[i];
  }
  for (size_t i = 0; i < n_data; i++) {
    data[i].data = (uint8_t *)&one;
    data[i].len = 4;
  }
  for (size_t i = 0; i < n_nodes; i++) {
    splitlearn__comm__structure_node__init(&sn[i]);
    sn[i].kind = (Splitlearn__Comm__StructureNode__Kind)nodes[i].kind;
    sn[i].size = nodes[i].size;
    sn[i].key = (char *)(nodes[i].key ? nodes[i].key : "");
    snp[i] = &sn[i];
  }
  req.n_tensors = n_desc;
  req.tensors = ntp;
  req.n_tensor_data = n_data;
  req.tensor_data = data;
  req.n_structure = n_nodes;
  req.structure = snp;
  if (with_single) {
    req.data.data = (uint8_t *)&one;
    req.data.len = 4;
    req.n_shape = 1;
    req.shape = shape32;
  }
  len = splitlearn__comm__compute_request__get_packed_size(&req);
  buf = malloc(len + 1);
  splitlearn__comm__compute_request__pack(&req, buf);
  span.ptr = buf;
  span.len = len;
  rc = sl_tensor_msg_read_limited(SL_MSG_COMPUTE_REQUEST, &span, 1, lim, &m, err);
  if (rc == SL_OK) sl_tensor_msg_clear(&m);
  free(buf);
  return rc;
}

static void test_named_malformed(void) {
  const char *ab[] = {"a", "b", "c"};
  const char *aa[] = {"a", "a"};
  const char *empty[] = {""};
  sl_node tup2[] = {{SL_NODE_TUPLE, 2, NULL, 0, 0, NULL}, {SL_NODE_TENSOR, 0, NULL, 0, 0, NULL},
                    {SL_NODE_TENSOR, 0, NULL, 0, 0, NULL}};
  sl_node dupkey[] = {{SL_NODE_DICT, 2, NULL, 0, 0, NULL}, {SL_NODE_TENSOR, 0, "k", 0, 0, NULL},
                      {SL_NODE_TENSOR, 0, "k", 0, 0, NULL}};
  sl_node bad_kind[] = {{SL_NODE_TUPLE, 1, NULL, 0, 0, NULL}, {42, 0, NULL, 0, 0, NULL}};
  sl_node short_tuple[] = {{SL_NODE_TUPLE, 5, NULL, 0, 0, NULL}, {SL_NODE_TENSOR, 0, NULL, 0, 0, NULL}};
  sl_node deep[40];
  sl_msg_limits two = {2, 0}, shallow = {0, 4};
  sl_err err;
  CHECK_EQ_INT(read_named(2, ab, 2, tup2, 3, 0, NULL, &err), SL_OK);
  CHECK_EQ_INT(read_named(2, ab, 2, NULL, 0, 0, NULL, &err), SL_OK); /* a map by name */
  CHECK_EQ_INT(read_named(2, aa, 2, NULL, 0, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "duplicate tensor name 'a'");
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  CHECK_EQ_INT(read_named(1, empty, 1, NULL, 0, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "has no name");
  CHECK_EQ_INT(read_named(2, ab, 1, NULL, 0, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "2 tensor descriptors (field 19) but 1 tensor_data");
  CHECK_EQ_INT(read_named(3, ab, 3, NULL, 0, 0, &two, &err), SL_ETOOBIG);
  CHECK_CONTAINS(err.msg, "carries 3 tensors; the limit is 2");
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  CHECK_EQ_INT(read_named(1, ab, 1, tup2, 3, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "2 tensor leaves but the message carries 1");
  CHECK_EQ_INT(read_named(2, ab, 2, dupkey, 3, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "duplicate key 'k'");
  CHECK_EQ_INT(read_named(0, ab, 0, bad_kind, 2, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "unknown kind 42");
  CHECK_EQ_INT(read_named(1, ab, 1, short_tuple, 2, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "declares 5 children");
  CHECK_EQ_INT(read_named(2, ab, 2, tup2, 3, 1, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "both the single-tensor fields");
  for (int i = 0; i < 39; i++) deep[i] = (sl_node){SL_NODE_LIST, 1, NULL, 0, 0, NULL};
  deep[39] = (sl_node){SL_NODE_TENSOR, 0, NULL, 0, 0, NULL};
  CHECK_EQ_INT(read_named(1, ab, 1, deep, 40, 0, NULL, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "deeper than 32 levels");
  CHECK_EQ_INT(read_named(1, ab, 1, deep + 34, 6, 0, NULL, &err), SL_OK);
  CHECK_EQ_INT(read_named(1, ab, 1, deep + 34, 6, 0, &shallow, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "deeper than 4 levels");
}

/* The session fields (ComputeRequest 40-42, BackwardRequest 40) survive
 * sl_call_fields_to_request -> pack -> unpack -> sl_call_fields_from_request;
 * unset ones stay absent on the wire. */
static void test_session_fields_roundtrip(void) {
  sl_call_fields in, out;
  uint8_t buf[256];
  size_t len;
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  Splitlearn__Comm__ComputeRequest *back;
  Splitlearn__Comm__BackwardRequest breq = SPLITLEARN__COMM__BACKWARD_REQUEST__INIT;
  Splitlearn__Comm__BackwardRequest *bback;

  memset(&in, 0, sizeof(in));
  in.training_mode = -1;
  in.session_id = "0123abcd";
  in.session_step = (int64_t)1 << 40;
  in.session_close = 1;
  sl_call_fields_to_request(SL_MSG_COMPUTE_REQUEST, &req.base, &in);
  len = splitlearn__comm__compute_request__pack(&req, buf);
  back = splitlearn__comm__compute_request__unpack(NULL, len, buf);
  CHECK(back != NULL);
  if (back != NULL) {
    sl_call_fields_from_request(SL_MSG_COMPUTE_REQUEST, &back->base, &out);
    CHECK(out.session_id != NULL && strcmp(out.session_id, "0123abcd") == 0);
    CHECK_EQ_INT(out.session_step, (int64_t)1 << 40);
    CHECK_EQ_INT(out.session_close, 1);
    splitlearn__comm__compute_request__free_unpacked(back, NULL);
  }

  /* outside a session: nothing on the wire, nothing read back */
  memset(&in, 0, sizeof(in));
  in.training_mode = -1;
  req = (Splitlearn__Comm__ComputeRequest)SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  sl_call_fields_to_request(SL_MSG_COMPUTE_REQUEST, &req.base, &in);
  len = splitlearn__comm__compute_request__pack(&req, buf);
  CHECK_EQ_INT(len, 0);
  back = splitlearn__comm__compute_request__unpack(NULL, len, buf);
  CHECK(back != NULL);
  if (back != NULL) {
    sl_call_fields_from_request(SL_MSG_COMPUTE_REQUEST, &back->base, &out);
    CHECK(out.session_id == NULL);
    CHECK_EQ_INT(out.session_step, 0);
    CHECK_EQ_INT(out.session_close, 0);
    splitlearn__comm__compute_request__free_unpacked(back, NULL);
  }

  memset(&in, 0, sizeof(in));
  in.training_mode = -1;
  in.forward_id = "f";
  in.session_id = "s";
  sl_call_fields_to_request(SL_MSG_BACKWARD_REQUEST, &breq.base, &in);
  len = splitlearn__comm__backward_request__pack(&breq, buf);
  bback = splitlearn__comm__backward_request__unpack(NULL, len, buf);
  CHECK(bback != NULL);
  if (bback != NULL) {
    sl_call_fields_from_request(SL_MSG_BACKWARD_REQUEST, &bback->base, &out);
    CHECK(out.session_id != NULL && strcmp(out.session_id, "s") == 0);
    splitlearn__comm__backward_request__free_unpacked(bback, NULL);
  }
}

/* An owner of spans that holds each in its own heap block and frees it when the
 * reader says it is done with it: under ASan, a read of a released span fails. */
typedef struct span_owner_test {
  sl_span *spans;
  size_t n;
  size_t released; /* how many, in order */
  int out_of_order;
} span_owner_test;

static void owner_release(void *user, size_t span) {
  span_owner_test *o = user;
  if (span != o->released) o->out_of_order = 1;
  free((void *)o->spans[span].ptr);
  o->spans[span].ptr = NULL;
  o->released = span + 1;
}

static void owner_init(span_owner_test *o, const uint8_t *buf, size_t len, size_t cut_at) {
  size_t sizes[1] = {cut_at};
  sl_span *view = cut(buf, len, sizes, 1, &o->n);
  o->spans = view;
  for (size_t i = 0; i < o->n; i++) {
    uint8_t *copy = malloc(view[i].len);
    memcpy(copy, view[i].ptr, view[i].len);
    o->spans[i].ptr = copy;
  }
  o->released = 0;
  o->out_of_order = 0;
}

static void owner_clear(span_owner_test *o) {
  for (size_t i = o->released; i < o->n; i++) free((void *)o->spans[i].ptr);
  free(o->spans);
}

static void test_read_owned_releases_spans_as_copied(void) {
  uint8_t data[4096];
  int32_t shape[1] = {1024};
  size_t len;
  uint8_t *buf;
  span_owner_test o;
  sl_span_owner owner = {owner_release, &o};
  sl_tensor_msg m;
  sl_err err;
  for (size_t i = 0; i < sizeof(data); i++) data[i] = (uint8_t)(i * 7);
  buf = make_request(data, sizeof(data), shape, 1, "float32", &len);
  for (size_t cut_at = 1; cut_at <= 4096; cut_at *= 8) {
    owner_init(&o, buf, len, cut_at);
    CHECK_EQ_INT(sl_tensor_msg_read_owned(SL_MSG_COMPUTE_REQUEST, o.spans, o.n, NULL, &owner, &m,
                                          &err),
                 SL_OK);
    CHECK(memcmp(m.items[0].data, data, sizeof(data)) == 0);
    CHECK(!o.out_of_order);
    /* every span wholly before the tensor's last byte went during the copy */
    CHECK(o.released + 1 >= sizeof(data) / cut_at);
    sl_tensor_msg_clear(&m);
    owner_clear(&o);
  }
  free(buf);
}

static void test_read_owned_structure(void) {
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
  size_t len;
  uint8_t *whole;
  sl_tensor_msg m;
  span_owner_test o;
  sl_span_owner owner = {owner_release, &o};
  for (int i = 0; i < 600; i++) h[i] = (float)i;
  for (int i = 0; i < 40; i++) ids[i] = i * 3;
  memset(items, 0, sizeof(items));
  items[0].desc = (sl_tensor_desc){SL_DTYPE_FLOAT32, 1, {600}};
  items[0].data = h;
  items[0].nbytes = sizeof(h);
  items[0].name = "0";
  items[1].desc = (sl_tensor_desc){SL_DTYPE_INT64, 1, {40}};
  items[1].data = ids;
  items[1].nbytes = sizeof(ids);
  items[1].name = "1";
  set = (sl_tensor_set){items, 2, SL_FORM_STRUCTURE, nodes, 3, 0};
  CHECK_EQ_INT(sl_tensor_set_pack(SL_MSG_COMPUTE_REQUEST, &req.base, &set, &p, &err), SL_OK);
  whole = payload_flat(p, &len);
  for (size_t cut_at = 3; cut_at <= 3000; cut_at *= 10) {
    owner_init(&o, whole, len, cut_at);
    CHECK_EQ_INT(sl_tensor_msg_read_owned(SL_MSG_COMPUTE_REQUEST, o.spans, o.n, NULL, &owner, &m,
                                          &err),
                 SL_OK);
    CHECK_EQ_INT(m.n_items, 2);
    if (m.n_items == 2) {
      CHECK(memcmp(m.items[0].data, h, sizeof(h)) == 0);
      CHECK(memcmp(m.items[1].data, ids, sizeof(ids)) == 0);
    }
    CHECK(!o.out_of_order);
    CHECK(o.released > 0);
    sl_tensor_msg_clear(&m);
    owner_clear(&o);
  }
  free(whole);
  sl_payload_unref(p);
}

/* A padding field (SL_WIRE_PAD_FIELD) anywhere is dropped by the splitter: the
 * message reads as without it, and protobuf-c never sees it (no unknown field). */
static void test_padding_never_reaches_the_header(void) {
  uint8_t data[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  int32_t shape[2] = {3, 1};
  size_t len, padded_len, nspans;
  uint8_t *buf = make_request(data, sizeof(data), shape, 2, "float32", &len);
  uint8_t *padded = malloc(len + 2 * 13);
  uint8_t pad[13] = {0xA2, 0x06, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}; /* field 100, 10 bytes */
  const size_t sizes[] = {1, 3, 7};
  sl_span *spans;
  sl_tensor_msg m;
  sl_err err;
  /* one padding field first, one last */
  memcpy(padded, pad, sizeof(pad));
  memcpy(padded + sizeof(pad), buf, len);
  memcpy(padded + sizeof(pad) + len, pad, sizeof(pad));
  padded_len = len + 2 * sizeof(pad);
  spans = cut(padded, padded_len, sizes, 3, &nspans);
  check_request(spans, nspans, data, sizeof(data));
  sl_err_clear(&err);
  CHECK_EQ_INT(sl_tensor_msg_read(SL_MSG_COMPUTE_REQUEST, spans, nspans, &m, &err), SL_OK);
  CHECK_EQ_INT(m.header->n_unknown_fields, 0);
  sl_tensor_msg_clear(&m);
  free(spans);
  free(padded);
  free(buf);
}

int main(void) {
  RUN(test_read_every_cut);
  RUN(test_padding_never_reaches_the_header);
  RUN(test_read_with_empty_spans);
  RUN(test_data_field_last_wins);
  RUN(test_every_truncation_fails_cleanly);
  RUN(test_malformed_inputs);
  RUN(test_bad_dtype_and_shape);
  RUN(test_text_fields_checked);
  RUN(test_old_peer_message_is_float32);
  RUN(test_pack_then_read);
  RUN(test_pack_refuses_over_limit);
  RUN(test_prefix_and_varint);
  RUN(test_structure_roundtrip);
  RUN(test_kv_cache_fields);
  RUN(test_named_malformed);
  RUN(test_session_fields_roundtrip);
  RUN(test_read_owned_releases_spans_as_copied);
  RUN(test_read_owned_structure);
  return sl_test_done("test_wire");
}
