/* gen_corpus.c: write the seed corpora of the fuzz targets (tests/fuzz/corpus):
 * real messages of every kind carrying tensors in every built-in codec (made by
 * the same code that sends them), the same payloads in the codec target's
 * format, shapes at the edges, and the hostile inputs of issue 16. Run by
 * `make fuzz-corpus`; the output is committed. Test code only. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "codec.h"
#include "fuzz_input.h"
#include "message.h"
#include "splitlearn_comm.pb-c.h"
#include "tensor.h"

static const char *root = "tests/fuzz/corpus";

static void write_file(const char *dir, const char *name, const void *a, size_t alen,
                       const void *b, size_t blen) {
  char path[512];
  FILE *f;
  snprintf(path, sizeof(path), "%s/%s", root, dir);
  mkdir(path, 0755);
  snprintf(path, sizeof(path), "%s/%s/%s", root, dir, name);
  f = fopen(path, "wb");
  if (f == NULL) {
    perror(path);
    exit(1);
  }
  if (alen) fwrite(a, 1, alen, f);
  if (blen) fwrite(b, 1, blen, f);
  fclose(f);
}

/* ---- the codec target's format ---- */

typedef struct buf {
  uint8_t *p;
  size_t n, cap;
} buf;

static void put(buf *b, const void *p, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 64;
    b->p = realloc(b->p, b->cap);
    if (b->p == NULL) exit(1);
  }
  memcpy(b->p + b->n, p, n);
  b->n += n;
}

static void put8(buf *b, unsigned v) {
  uint8_t c = (uint8_t)v;
  put(b, &c, 1);
}

static void codec_seed(const char *name, const sl_tensor_desc *d, const sl_meta *meta,
                       const void *payload, size_t len, const char *file) {
  buf b = {0};
  size_t ci = 0;
  while (ci < FUZZ_NCODECS && strcmp(FUZZ_CODECS[ci], name) != 0) ci++;
  put8(&b, (unsigned)ci);
  put8(&b, (unsigned)d->dtype);
  put8(&b, (unsigned)d->ndim);
  for (int i = 0; i < d->ndim; i++) {
    put8(&b, (unsigned)(d->shape[i] & 0xff));
    put8(&b, (unsigned)((d->shape[i] >> 8) & 0xff));
  }
  put8(&b, meta ? (unsigned)meta->n : 0);
  for (size_t i = 0; meta && i < meta->n; i++) {
    const sl_meta_value *v = &meta->items[i];
    size_t klen = strlen(v->key);
    put8(&b, (unsigned)v->type);
    put8(&b, (unsigned)klen);
    put(&b, v->key, klen);
    switch (v->type) {
      case SL_META_DOUBLE: put(&b, &v->d, 8); break;
      case SL_META_INT: put(&b, &v->i, 8); break;
      case SL_META_BOOL: put8(&b, (unsigned)(v->i != 0)); break;
      case SL_META_STRING:
        put8(&b, (unsigned)v->len);
        put(&b, v->bytes, v->len);
        break;
      case SL_META_BYTES:
        put8(&b, (unsigned)(v->len & 0xff));
        put8(&b, (unsigned)(v->len >> 8));
        put(&b, v->bytes, v->len);
        break;
    }
  }
  put(&b, payload, len);
  write_file("codec", file, b.p, b.n, NULL, 0);
  free(b.p);
}

/* ---- messages ---- */

static void message_seed(sl_msg_kind kind, unsigned cut, const sl_tensor_out *t, const char *file) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  Splitlearn__Comm__ComputeResponse resp = SPLITLEARN__COMM__COMPUTE_RESPONSE__INIT;
  Splitlearn__Comm__BackwardRequest breq = SPLITLEARN__COMM__BACKWARD_REQUEST__INIT;
  Splitlearn__Comm__BackwardResponse bresp = SPLITLEARN__COMM__BACKWARD_RESPONSE__INIT;
  Splitlearn__Comm__ComputeRequest__MetadataEntry e =
      SPLITLEARN__COMM__COMPUTE_REQUEST__METADATA_ENTRY__INIT;
  Splitlearn__Comm__ComputeRequest__MetadataEntry *ep = &e;
  ProtobufCMessage *h = NULL;
  sl_payload *p = NULL;
  sl_err err;
  const uint8_t *hdr;
  const void *data;
  size_t hlen, dlen;
  uint8_t first = (uint8_t)((unsigned)kind | (cut << 2));
  switch (kind) {
    case SL_MSG_COMPUTE_REQUEST:
      e.key = "trace-id";
      e.value = "caf\xc3\xa9";
      req.metadata = &ep;
      req.n_metadata = 1;
      req.model_id = "model-1";
      req._forward_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___FORWARD_ID_FORWARD_ID;
      req.forward_id = "fwd-42";
      req._request_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___REQUEST_ID_REQUEST_ID;
      req.request_id = 7;
      if (cut & 1) { /* half of them in a session */
        req._session_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_ID_SESSION_ID;
        req.session_id = "sess-1";
        req._session_step_case = SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_STEP_SESSION_STEP;
        req.session_step = 1;
      }
      h = &req.base;
      break;
    case SL_MSG_COMPUTE_RESPONSE:
      resp._forward_id_case = SPLITLEARN__COMM__COMPUTE_RESPONSE___FORWARD_ID_FORWARD_ID;
      resp.forward_id = "fwd-42";
      h = &resp.base;
      break;
    case SL_MSG_BACKWARD_REQUEST:
      breq.forward_id = "fwd-42";
      if (cut & 1) {
        breq._session_id_case = SPLITLEARN__COMM__BACKWARD_REQUEST___SESSION_ID_SESSION_ID;
        breq.session_id = "sess-1";
      }
      breq._learning_rate_case = SPLITLEARN__COMM__BACKWARD_REQUEST___LEARNING_RATE_LEARNING_RATE;
      breq.learning_rate = 0.01f;
      h = &breq.base;
      break;
    case SL_MSG_BACKWARD_RESPONSE:
      bresp.forward_id = "fwd-42";
      h = &bresp.base;
      break;
  }
  if (sl_tensor_out_pack(kind, h, t, &p, &err) != SL_OK) return; /* e.g. int8 per channel of a scalar */
  hdr = sl_payload_header(p, &hlen);
  data = sl_payload_data(p, &dlen);
  {
    uint8_t *all = malloc(1 + hlen + dlen);
    all[0] = first;
    memcpy(all + 1, hdr, hlen);
    if (dlen) memcpy(all + 1 + hlen, data, dlen);
    write_file("message", file, all, 1 + hlen + dlen, NULL, 0);
    free(all);
  }
  sl_payload_unref(p);
}

static void fill(sl_dtype dt, void *x, size_t n) {
  for (size_t i = 0; i < n; i++) {
    double v = (i % 3 == 0) ? 0.0 : sin((double)i) * 4.0;
    switch (dt) {
      case SL_DTYPE_FLOAT32: ((float *)x)[i] = (float)v; break;
      case SL_DTYPE_FLOAT64: ((double *)x)[i] = v; break;
      case SL_DTYPE_INT32: ((int32_t *)x)[i] = (int32_t)(v * 100); break;
      case SL_DTYPE_UINT8: ((uint8_t *)x)[i] = (uint8_t)(i * 7); break;
      case SL_DTYPE_BOOL: ((uint8_t *)x)[i] = (uint8_t)(i & 1); break;
      default: memset(x, 0, n * sl_dtype_itemsize(dt)); return;
    }
  }
}

int main(int argc, char **argv) {
  sl_codec_spec raw = {.kind = SL_CODEC_KIND_RAW};
  sl_codec_spec int8 = {.kind = SL_CODEC_KIND_INT8};
  sl_codec_spec sparse = {.kind = SL_CODEC_KIND_SPARSE_COO};
  struct {
    const char *label;
    sl_codec_spec spec;
    sl_dtype dtype;
  } cases[] = {
      {"raw", raw, SL_DTYPE_FLOAT32},
      {"cast", {.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_FLOAT16}, SL_DTYPE_FLOAT64},
      {"float16", {.kind = SL_CODEC_KIND_FLOAT16}, SL_DTYPE_FLOAT32},
      {"bfloat16", {.kind = SL_CODEC_KIND_BFLOAT16}, SL_DTYPE_FLOAT32},
      {"int8", int8, SL_DTYPE_FLOAT32},
      {"int8-channel", {.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = -1}, SL_DTYPE_FLOAT32},
      {"sparse_coo", sparse, SL_DTYPE_FLOAT32},
      {"sparse_coo-int32", sparse, SL_DTYPE_INT32},
      {"sparse_coo-bool", sparse, SL_DTYPE_BOOL},
      {"zstd", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 3},
       SL_DTYPE_FLOAT32},
      {"zstd-int8", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 1,
                     .inner = &int8}, SL_DTYPE_FLOAT32},
      {"zlib", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = 6},
       SL_DTYPE_UINT8},
      {"zlib-sparse", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = 1,
                       .inner = &sparse}, SL_DTYPE_FLOAT32},
  };
  sl_tensor_desc shapes[] = {{SL_DTYPE_FLOAT32, 2, {3, 4}}, {SL_DTYPE_FLOAT32, 1, {17}},
                             {SL_DTYPE_FLOAT32, 3, {2, 0, 5}}, {SL_DTYPE_FLOAT32, 0, {0}}};
  if (argc > 1) root = argv[1];
  mkdir(root, 0755);
  for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
    sl_codec *codec = NULL;
    sl_err err;
    if (sl_codec_create(&cases[c].spec, &codec, &err) != SL_OK) {
      fprintf(stderr, "%s: %s\n", cases[c].label, err.msg);
      return 1;
    }
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
      sl_tensor_desc d = shapes[s];
      size_t nbytes = 0, numel, len = 0;
      void *x, *payload = NULL;
      sl_meta meta = {NULL, 0};
      char file[128];
      d.dtype = cases[c].dtype;
      sl_desc_nbytes(&d, &nbytes);
      numel = nbytes / sl_dtype_itemsize(d.dtype);
      x = calloc(1, nbytes ? nbytes : 1);
      fill(d.dtype, x, numel);
      if (!sl_codec_is_raw(codec)) {
        if (sl_codec_encode(codec, &d, x, nbytes, &payload, &len, &meta, &err) == SL_OK) {
          snprintf(file, sizeof(file), "%s-%zu", cases[c].label, s);
          codec_seed(sl_codec_name(codec), &d, &meta, payload, len, file);
        }
        sl_storage_free(payload);
        sl_meta_clear(&meta);
      }
      for (int k = 0; k < 4; k++) {
        sl_tensor_out t;
        memset(&t, 0, sizeof(t));
        t.desc = d;
        t.data = x;
        t.nbytes = nbytes;
        t.codec = codec;
        snprintf(file, sizeof(file), "k%d-%s-%zu", k, cases[c].label, s);
        message_seed((sl_msg_kind)k, (unsigned)(c + s + (size_t)k) % 8, &t, file);
      }
      free(x);
    }
    sl_codec_destroy(codec);
  }
  /* hand-made: the inputs of issue 16 and shapes at the edges */
  {
    /* D1: float32 [0, 2^31-1, 2^31-1, 2^31-1], no data, no token */
    static const uint8_t d1[] = {0x00, 0x12, 0x10, 0x00, 0xff, 0xff, 0xff, 0xff, 0x07,
                                 0xff, 0xff, 0xff, 0xff, 0x07, 0xff, 0xff, 0xff, 0xff, 0x07};
    /* D3: model_id (5) not UTF-8; D6: dtype (16) "float32\0junk" */
    static const uint8_t d3[] = {0x00, 0x0a, 0x04, 0, 0, 0, 0, 0x12, 0x01, 0x01,
                                 0x2a, 0x02, 'm', 0xff};
    static const uint8_t d6[] = {0x00, 0x0a, 0x04, 0, 0, 0, 0, 0x12, 0x01, 0x01, 0x82, 0x01, 12,
                                 'f', 'l', 'o', 'a', 't', '3', '2', 0, 'j', 'u', 'n', 'k'};
    write_file("message", "issue16-d1-huge-empty-shape", d1, sizeof(d1), NULL, 0);
    write_file("message", "issue16-d3-model-id-not-utf8", d3, sizeof(d3), NULL, 0);
    write_file("message", "issue16-d6-dtype-nul", d6, sizeof(d6), NULL, 0);
  }
  {
    /* shapes: dtype, ndim, then int32 dims */
    static const uint8_t s1[] = {3, 4, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f,
                                 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0x7f};
    static const uint8_t s2[] = {3, 5, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0,
                                 0, 0, 1, 0, 0, 0, 1, 0};
    static const uint8_t s3[] = {3, 2, 3, 0, 0, 0, 4, 0, 0, 0};
    static const uint8_t s4[] = {0, 1, 0xff, 0xff, 0xff, 0xff};
    write_file("shape", "huge-empty", s1, sizeof(s1), NULL, 0);
    write_file("shape", "65536-pow4-empty", s2, sizeof(s2), NULL, 0);
    write_file("shape", "3x4", s3, sizeof(s3), NULL, 0);
    write_file("shape", "negative", s4, sizeof(s4), NULL, 0);
  }
  printf("seed corpora written under %s\n", root);
  return 0;
}
