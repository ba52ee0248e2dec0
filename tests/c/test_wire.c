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
  CHECK_EQ_INT(m.nbytes, ndata);
  CHECK(memcmp(m.data, data, ndata) == 0);
  CHECK_EQ_INT((uintptr_t)m.data % SL_STORAGE_ALIGN, 0);
  req = (Splitlearn__Comm__ComputeRequest *)m.header;
  CHECK_EQ_INT(req->request_id, 77);
  CHECK_EQ_INT(req->n_metadata, 1);
  CHECK(strcmp(req->model_id, "m1") == 0);
  CHECK_EQ_INT(req->data.len, 0); /* the tensor bytes never went through protobuf-c */
  CHECK_EQ_INT(m.desc.ndim, 2);
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
  CHECK(m.data != NULL && memcmp(m.data, second, 4) == 0);
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
      CHECK_EQ_INT(m.nbytes, sizeof(data));
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
  CHECK_EQ_INT(m.desc.dtype, SL_DTYPE_FLOAT32);
  CHECK(strcmp(m.codec, SL_CODEC_RAW) == 0);
  CHECK(m.data != NULL && memcmp(m.data, values, sizeof(values)) == 0);
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
  CHECK(m.data != NULL && memcmp(m.data, values, sizeof(values)) == 0);
  CHECK_EQ_INT(m.desc.dtype, SL_DTYPE_INT64);
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
  CHECK_EQ_INT(released, 0); /* failure leaves ownership with the caller */
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

int main(void) {
  RUN(test_read_every_cut);
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
  RUN(test_session_fields_roundtrip);
  return sl_test_done("test_wire");
}
