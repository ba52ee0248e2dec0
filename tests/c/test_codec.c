/* Unit tests: the built-in codecs (codec.h): metadata helpers, every codec on
 * every dtype it takes, float16/bfloat16 bit-exactness against PyTorch, the
 * vector kernels against the scalar ones, the int8 error bound, and corrupt,
 * truncated and over-long ("bomb") payloads for every decoder.
 *
 * Payloads handed to decoders in the corruption tests are copied into malloc'd
 * buffers of exactly their length, so that ASan reports any over-read.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "codec.h"
#include "codec_internal.h"
#include "sl_test.h"
#include "tensor.h"

/* ---- PyTorch reference values ----
 *
 * Produced with torch 2.13.0+cpu (CPU capability AVX512) by the script below
 * (tests were written against its output; torch.set_num_threads(1)):
 *
 *   xs = torch.tensor(np.array(EDGES, dtype=np.uint32).view(np.int32)).view(torch.float32)
 *   xs.half().view(torch.int16), xs.bfloat16().view(torch.int16)       # contiguous
 *   xs[i].bfloat16()                                                   # 0-dim
 *   h = torch.tensor(H16 ...).view(torch.float16); h.float().view(torch.int32)
 *   hashes: for the outputs o[k] of torch on inputs i[k], k = 0..N-1:
 *     sum over k of splitmix64_finalizer(o[k] | k << 32)  (mod 2^64)
 *   with i = all 65536 halves / bfloat16s, and for float32 inputs the sample
 *   i[k] = k * 251 for k * 251 < 2^32 (17111424 values, 66842 of them NaN).
 *
 * PyTorch is not consistent with itself on NaN: on a contiguous tensor on an
 * AVX2/AVX-512 CPU, tensor.bfloat16() gives 0xFFFF for every NaN, while a 0-dim
 * tensor (torch's scalar c10 path) gives 0x7FC0; tensor.float() of a half NaN
 * gives the F16C result (sign | 0x7FC00000 | payload << 13) on its vector body
 * and 0x7FFFFFFF on the scalar path (0-dim, and the last n % 8 elements). The
 * codec follows the vector body (what a whole tensor gets); the 0-dim values are
 * noted beside. Everything else (rounding, inf, overflow, subnormals) is the same
 * on every path.
 */
#define TORCH_HASH_F16_TO_F32 0x98a7955da8823497ULL
#define TORCH_HASH_BF16_TO_F32 0xff5c7ce1c45bb9e7ULL
#define TORCH_SAMPLE_N 17111424u
#define TORCH_SAMPLE_STEP 251u
#define TORCH_HASH_F32_TO_F16 0xb86f06e8027159f4ULL
#define TORCH_HASH_F32_TO_BF16 0xea2e77e180ac7bf4ULL

static const struct {
  uint32_t f32;
  uint16_t f16, bf16;
} torch_f32_edges[] = {
    {0x00000000, 0x0000, 0x0000}, /* +0 */
    {0x80000000, 0x8000, 0x8000}, /* -0 */
    {0x3F800000, 0x3C00, 0x3F80},
    {0xBF800000, 0xBC00, 0xBF80},
    {0x477FE000, 0x7BFF, 0x4780}, /* 65504, half's max */
    {0x477FEFFF, 0x7BFF, 0x4780},
    {0x477FF000, 0x7C00, 0x4780}, /* 65520: overflows half to inf */
    {0xC77FF000, 0xFC00, 0xC780},
    {0x7F7FFFFF, 0x7C00, 0x7F80}, /* FLT_MAX: overflows bfloat16 too */
    {0xFF7FFFFF, 0xFC00, 0xFF80},
    {0x7F800000, 0x7C00, 0x7F80}, /* inf */
    {0xFF800000, 0xFC00, 0xFF80},
    {0x33800000, 0x0001, 0x3380}, /* 2^-24, half's smallest subnormal */
    {0x33000000, 0x0000, 0x3300}, /* 2^-25: a tie, to even (0) */
    {0x33000001, 0x0001, 0x3300},
    {0xB3000001, 0x8001, 0xB300},
    {0x33C00000, 0x0002, 0x33C0}, /* 1.5 * 2^-24: tie to even (2) */
    {0x34200000, 0x0002, 0x3420}, /* 2.5 * 2^-24: tie to even (2) */
    {0x38800000, 0x0400, 0x3880}, /* 2^-14, half's smallest normal */
    {0x387FFFFF, 0x0400, 0x3880}, /* subnormal rounding up to the normal */
    {0x387FE000, 0x0400, 0x3880},
    {0x387FF000, 0x0400, 0x3880},
    {0x00000001, 0x0000, 0x0000}, /* float32 subnormals */
    {0x80000001, 0x8000, 0x8000},
    {0x00800000, 0x0000, 0x0080},
    {0x3F801000, 0x3C00, 0x3F80}, /* 1 + 2^-11: half tie to even */
    {0x3F803000, 0x3C02, 0x3F80},
    {0x3F801001, 0x3C01, 0x3F80},
    {0x3F808000, 0x3C04, 0x3F80}, /* 1 + 2^-8: bfloat16 tie to even */
    {0x3F818000, 0x3C0C, 0x3F82},
    {0x3F808001, 0x3C04, 0x3F81},
    {0x7F7F7FFF, 0x7C00, 0x7F7F},
    {0x7F7F8000, 0x7C00, 0x7F80}, /* bfloat16 tie rounding up to inf */
    {0x00008000, 0x0000, 0x0000},
    {0x00018000, 0x0000, 0x0002},
    {0x0000C000, 0x0000, 0x0001},
    {0x80008001, 0x8000, 0x8001},
    {0x40490FDB, 0x4248, 0x4049}, /* pi */
    {0xC0490FDB, 0xC248, 0xC049},
    {0x3DCCCCCD, 0x2E66, 0x3DCD}, /* 0.1 */
    {0x7FC00000, 0x7E00, 0xFFFF}, /* NaNs; bfloat16 of a 0-dim tensor: 0x7FC0 */
    {0xFFC00000, 0xFE00, 0xFFFF},
    {0x7F800001, 0x7E00, 0xFFFF},
    {0xFF800001, 0xFE00, 0xFFFF},
    {0x7FA00000, 0x7F00, 0xFFFF},
    {0x7FFFFFFF, 0x7FFF, 0xFFFF},
    {0xFFFFFFFF, 0xFFFF, 0xFFFF},
    {0x7F802000, 0x7E01, 0xFFFF},
    {0x7FC01000, 0x7E00, 0xFFFF},
};

static const struct {
  uint16_t f16;
  uint32_t f32;
} torch_f16_edges[] = {
    {0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x0001, 0x33800000}, {0x8001, 0xB3800000},
    {0x03FF, 0x387FC000}, {0x0200, 0x38000000}, {0x0400, 0x38800000}, {0x3C00, 0x3F800000},
    {0x3C01, 0x3F802000}, {0x7BFF, 0x477FE000}, {0xFBFF, 0xC77FE000}, {0x7C00, 0x7F800000},
    {0xFC00, 0xFF800000},
    /* NaNs; a 0-dim tensor gives 0x7FFFFFFF for each */
    {0x7C01, 0x7FC02000}, {0xFC01, 0xFFC02000}, {0x7D00, 0x7FE00000}, {0x7E00, 0x7FC00000},
    {0xFE00, 0xFFC00000}, {0x7FFF, 0x7FFFE000}, {0xFFFF, 0xFFFFE000}, {0x7E01, 0x7FC02000},
    {0x3555, 0x3EAAA000}, {0x0155, 0x37AA8000}, {0x8155, 0xB7AA8000},
};

static const struct {
  uint16_t bf16;
  uint32_t f32;
} torch_bf16_edges[] = {
    {0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x0001, 0x00010000}, {0x8001, 0x80010000},
    {0x007F, 0x007F0000}, {0x0080, 0x00800000}, {0x3F80, 0x3F800000}, {0x7F7F, 0x7F7F0000},
    {0x7F80, 0x7F800000}, {0xFF80, 0xFF800000}, {0x7F81, 0x7F810000}, {0xFF81, 0xFF810000},
    {0x7FC0, 0x7FC00000}, {0xFFC0, 0xFFC00000}, {0x7FFF, 0x7FFF0000}, {0xFFFF, 0xFFFF0000},
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ---- */

static uint64_t rng_state = 0x243F6A8885A308D3ULL;

static uint64_t rnd(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  rng_state = x;
  return x;
}

static double rnd_unit(void) { return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0); }

static double rnd_normal(void) {
  double u = rnd_unit(), v = rnd_unit();
  if (u < 1e-300) u = 1e-300;
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static float f32_of(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static sl_tensor_desc desc1(sl_dtype dt, int64_t n) {
  sl_tensor_desc d;
  memset(&d, 0, sizeof(d));
  d.dtype = dt;
  d.ndim = 1;
  d.shape[0] = n;
  return d;
}

static sl_tensor_desc desc3(sl_dtype dt, int64_t a, int64_t b, int64_t c) {
  sl_tensor_desc d;
  memset(&d, 0, sizeof(d));
  d.dtype = dt;
  d.ndim = 3;
  d.shape[0] = a;
  d.shape[1] = b;
  d.shape[2] = c;
  return d;
}

static size_t desc_bytes(const sl_tensor_desc *d) {
  size_t n = 0;
  CHECK_EQ_INT(sl_desc_nbytes(d, &n), SL_OK);
  return n;
}

static sl_codec *make(sl_codec_spec spec) {
  sl_codec *c = NULL;
  sl_err err;
  int rc = sl_codec_create(&spec, &c, &err);
  if (rc != SL_OK) fprintf(stderr, "  sl_codec_create: %s\n", err.msg);
  CHECK_EQ_INT(rc, SL_OK);
  return c;
}

static const sl_dtype all_dtypes[] = {
    SL_DTYPE_FLOAT16, SL_DTYPE_BFLOAT16, SL_DTYPE_FLOAT32, SL_DTYPE_FLOAT64,
    SL_DTYPE_COMPLEX64, SL_DTYPE_COMPLEX128, SL_DTYPE_INT8, SL_DTYPE_INT16,
    SL_DTYPE_INT32, SL_DTYPE_INT64, SL_DTYPE_UINT8, SL_DTYPE_UINT16,
    SL_DTYPE_UINT32, SL_DTYPE_UINT64, SL_DTYPE_BOOL};

static const sl_dtype float_dtypes[] = {SL_DTYPE_FLOAT16, SL_DTYPE_BFLOAT16, SL_DTYPE_FLOAT32,
                                        SL_DTYPE_FLOAT64};

/* Fill `n` elements of `dt` with plausible values: floats from a normal
 * distribution (with some exact zeros), integers random, bools 0/1. */
static void fill_random(sl_dtype dt, void *p, size_t n, double zero_frac) {
  size_t i, isz = sl_dtype_itemsize(dt);
  for (i = 0; i < n; i++) {
    unsigned char *e = (unsigned char *)p + i * isz;
    double x = rnd_normal() * 3.0;
    if (rnd_unit() < zero_frac) {
      memset(e, 0, isz);
      continue;
    }
    switch (dt) {
      case SL_DTYPE_FLOAT16: {
        uint16_t h = sl__f32_to_f16_one((float)x);
        memcpy(e, &h, 2);
        break;
      }
      case SL_DTYPE_BFLOAT16: {
        uint16_t b = sl__f32_to_bf16_one((float)x);
        memcpy(e, &b, 2);
        break;
      }
      case SL_DTYPE_FLOAT32: {
        float f = (float)x;
        memcpy(e, &f, 4);
        break;
      }
      case SL_DTYPE_FLOAT64: memcpy(e, &x, 8); break;
      case SL_DTYPE_COMPLEX64: {
        float f[2] = {(float)x, (float)rnd_normal()};
        memcpy(e, f, 8);
        break;
      }
      case SL_DTYPE_COMPLEX128: {
        double dd[2] = {x, rnd_normal()};
        memcpy(e, dd, 16);
        break;
      }
      case SL_DTYPE_BOOL: e[0] = 1; break;
      default: {
        uint64_t r = rnd() | 1; /* never all-zero bytes */
        memcpy(e, &r, isz);
        break;
      }
    }
  }
}

/* Encode then decode with `c`; returns the decoded storage (caller frees) or
 * NULL, and the payload/meta through the optional out-parameters. */
static void *roundtrip(const sl_codec *c, const sl_tensor_desc *d, const void *data,
                       void **payload_out, size_t *len_out, sl_meta *meta_out) {
  void *payload = NULL, *out = NULL;
  size_t len = 0, nbytes = desc_bytes(d);
  sl_meta meta = {0};
  sl_err err;
  int rc = sl_codec_encode(c, d, data, nbytes, &payload, &len, &meta, &err);
  if (rc != SL_OK) fprintf(stderr, "  encode %s: %s\n", sl_codec_name(c), err.msg);
  CHECK_EQ_INT(rc, SL_OK);
  if (rc == SL_OK) {
    rc = sl_codec_decode(sl_codec_name(c), d, payload, len, &meta, &out, &err);
    if (rc != SL_OK) fprintf(stderr, "  decode %s: %s\n", sl_codec_name(c), err.msg);
    CHECK_EQ_INT(rc, SL_OK);
  }
  if (payload_out) {
    *payload_out = payload;
    *len_out = len;
  } else {
    sl_storage_free(payload);
  }
  if (meta_out) {
    *meta_out = meta;
  } else {
    sl_meta_clear(&meta);
  }
  return out;
}

/* Decode a copy of payload[0..len) in a buffer of exactly len bytes at an odd
 * address offset (0 or 1). */
static int decode_exact(const char *name, const sl_tensor_desc *d, const void *payload, size_t len,
                        const sl_meta *meta, size_t offset, sl_err *err) {
  unsigned char *buf = malloc(len + offset + 1);
  void *out = (void *)0x1;
  int rc;
  if (buf == NULL) return SL_ENOMEM;
  if (len) memcpy(buf + offset, payload, len);
  rc = sl_codec_decode(name, d, len ? buf + offset : NULL, len, meta, &out, err);
  if (rc == SL_OK) {
    CHECK(out != NULL);
    sl_storage_free(out);
  } else {
    CHECK(out == NULL);
  }
  free(buf);
  return rc;
}

/* Every truncation, one byte too many, and bit flips: truncations and the extra
 * byte must fail with INVALID_ARGUMENT naming the codec; flips must fail
 * cleanly or decode (ASan checks the reads). */
static void fuzz_payload(const char *name, const sl_tensor_desc *d, const void *payload,
                         size_t len, const sl_meta *meta) {
  size_t cut, i;
  int bad = 0, flips_ok = 0, flips_failed = 0;
  sl_err err;
  unsigned char *mut;
  for (cut = 0; cut < len; cut++) {
    /* a prefix in an exact-size buffer: any over-read is caught */
    unsigned char *buf = malloc(cut ? cut : 1);
    void *out = NULL;
    int rc;
    memcpy(buf, payload, cut);
    rc = sl_codec_decode(name, d, cut ? buf : NULL, cut, meta, &out, &err);
    if (rc != SL_EINVAL || err.code != SL_STATUS_INVALID_ARGUMENT || out != NULL ||
        strstr(err.msg, name) == NULL) {
      if (bad++ < 3) {
        fprintf(stderr, "  %s: truncation to %zu of %zu: rc %d, msg '%s'\n", name, cut, len, rc,
                rc == SL_OK ? "" : err.msg);
      }
      sl_storage_free(out);
    }
    free(buf);
  }
  {
    unsigned char *longer = malloc(len + 1);
    memcpy(longer, payload, len);
    longer[len] = 0;
    if (decode_exact(name, d, longer, len + 1, meta, 0, &err) != SL_EINVAL) bad++;
    free(longer);
  }
  mut = malloc(len ? len : 1);
  memcpy(mut, payload, len);
  for (i = 0; i < len; i++) {
    int b;
    int nbits = len <= 512 ? 8 : 1;
    for (b = 0; b < nbits; b++) {
      int bit = nbits == 8 ? b : (int)((i * 5 + 3) % 8);
      int rc;
      mut[i] ^= (unsigned char)(1u << bit);
      rc = decode_exact(name, d, mut, len, meta, i & 1, &err);
      mut[i] ^= (unsigned char)(1u << bit);
      if (rc == SL_OK) {
        flips_ok++;
      } else if (rc == SL_EINVAL && err.code == SL_STATUS_INVALID_ARGUMENT) {
        flips_failed++;
      } else {
        if (bad++ < 3) fprintf(stderr, "  %s: flip at %zu: rc %d\n", name, i, rc);
      }
    }
  }
  free(mut);
  CHECK_EQ_INT(bad, 0);
  (void)flips_ok;
  (void)flips_failed;
}

/* A copy of `src` without entry `skip` (or with it retyped when retype != 0). */
static void meta_variant(const sl_meta *src, size_t skip, sl_meta_type retype, sl_meta *dst) {
  size_t i;
  memset(dst, 0, sizeof(*dst));
  for (i = 0; i < src->n; i++) {
    const sl_meta_value *v = &src->items[i];
    sl_meta_type t = v->type;
    if (i == skip) {
      if (retype == 0) continue;
      t = retype;
    }
    switch (t) {
      case SL_META_DOUBLE: sl_meta_add_double(dst, v->key, 1.0); break;
      case SL_META_INT: sl_meta_add_int(dst, v->key, i == skip ? 1 : v->i); break;
      case SL_META_BOOL: sl_meta_add_bool(dst, v->key, (int)v->i); break;
      case SL_META_STRING: sl_meta_add_string(dst, v->key, i == skip ? "x" : v->bytes); break;
      case SL_META_BYTES: sl_meta_add_bytes(dst, v->key, "x", 1); break;
    }
    if (i != skip && t == SL_META_DOUBLE) dst->items[dst->n - 1].d = v->d;
  }
}

/* Every metadata key is needed: removing it, or giving it another type, fails. */
static void fuzz_meta(const char *name, const sl_tensor_desc *d, const void *payload, size_t len,
                      const sl_meta *meta) {
  size_t k;
  sl_err err;
  for (k = 0; k < meta->n; k++) {
    sl_meta v;
    int t;
    meta_variant(meta, k, 0, &v);
    if (decode_exact(name, d, payload, len, &v, 0, &err) != SL_EINVAL) {
      fprintf(stderr, "  %s: decoding without '%s' did not fail\n", name, meta->items[k].key);
      CHECK(0);
    } else {
      CHECK_CONTAINS(err.msg, name);
    }
    sl_meta_clear(&v);
    for (t = SL_META_DOUBLE; t <= SL_META_BOOL; t++) {
      if ((sl_meta_type)t == meta->items[k].type) continue;
      meta_variant(meta, k, (sl_meta_type)t, &v);
      if (decode_exact(name, d, payload, len, &v, 0, &err) != SL_EINVAL) {
        fprintf(stderr, "  %s: '%s' retyped to %d did not fail\n", name, meta->items[k].key, t);
        CHECK(0);
      }
      sl_meta_clear(&v);
    }
  }
}

/* ---- metadata ---- */

static void test_meta_helpers(void) {
  sl_meta m = {0};
  const sl_meta_value *v;
  CHECK_EQ_INT(sl_meta_add_double(&m, "d", 2.5), SL_OK);
  CHECK_EQ_INT(sl_meta_add_int(&m, "i", -7), SL_OK);
  CHECK_EQ_INT(sl_meta_add_bool(&m, "b", 42), SL_OK);
  CHECK_EQ_INT(sl_meta_add_string(&m, "s", "hello"), SL_OK);
  CHECK_EQ_INT(sl_meta_add_bytes(&m, "y", "a\0b", 3), SL_OK);
  CHECK_EQ_INT(sl_meta_add_bytes(&m, "empty", NULL, 0), SL_OK);
  CHECK_EQ_INT(m.n, 6);
  v = sl_meta_get(&m, "d");
  CHECK(v != NULL && v->type == SL_META_DOUBLE && v->d == 2.5);
  v = sl_meta_get(&m, "i");
  CHECK(v != NULL && v->type == SL_META_INT && v->i == -7);
  v = sl_meta_get(&m, "b");
  CHECK(v != NULL && v->type == SL_META_BOOL && v->i == 1);
  v = sl_meta_get(&m, "s");
  CHECK(v != NULL && v->type == SL_META_STRING && v->len == 5 && strcmp(v->bytes, "hello") == 0);
  v = sl_meta_get(&m, "y");
  CHECK(v != NULL && v->type == SL_META_BYTES && v->len == 3 && memcmp(v->bytes, "a\0b", 3) == 0);
  v = sl_meta_get(&m, "empty");
  CHECK(v != NULL && v->len == 0 && v->bytes != NULL);
  CHECK(sl_meta_get(&m, "nope") == NULL);
  CHECK(sl_meta_get(NULL, "d") == NULL);
  /* a repeated key: the last one wins, as in a protobuf map */
  CHECK_EQ_INT(sl_meta_add_int(&m, "i", 9), SL_OK);
  v = sl_meta_get(&m, "i");
  CHECK(v != NULL && v->i == 9);
  CHECK_EQ_INT(sl_meta_add_string(&m, "s", NULL), SL_EINVAL);
  CHECK_EQ_INT(sl_meta_add_bytes(&m, "y", NULL, 3), SL_EINVAL);
  CHECK_EQ_INT(sl_meta_add_int(&m, NULL, 1), SL_EINVAL);
  sl_meta_clear(&m);
  CHECK(m.items == NULL && m.n == 0);
  sl_meta_clear(&m); /* twice is fine */
  sl_meta_clear(NULL);
}

static void test_builtin_names(void) {
  const char *names[] = {"raw", "cast", "float16", "bfloat16", "int8", "zstd", "zlib",
                         "sparse_coo"};
  size_t i;
  for (i = 0; i < NELEM(names); i++) CHECK(sl_codec_name_is_builtin(names[i]));
  CHECK(!sl_codec_name_is_builtin(""));
  CHECK(!sl_codec_name_is_builtin("RAW"));
  CHECK(!sl_codec_name_is_builtin("zstd "));
  CHECK(!sl_codec_name_is_builtin("my_codec"));
  CHECK(!sl_codec_name_is_builtin(NULL));
}

/* ---- codec objects ---- */

static void test_create_names_accepts(void) {
  sl_codec_spec inner_bf = {.kind = SL_CODEC_KIND_BFLOAT16};
  struct {
    sl_codec_spec spec;
    const char *name;
  } cases[] = {
      {{.kind = SL_CODEC_KIND_RAW}, "raw"},
      {{.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_BFLOAT16}, "cast"},
      {{.kind = SL_CODEC_KIND_FLOAT16}, "float16"},
      {{.kind = SL_CODEC_KIND_BFLOAT16}, "bfloat16"},
      {{.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = -1}, "int8"},
      {{.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 3}, "zstd"},
      {{.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = 6}, "zlib"},
      {{.kind = SL_CODEC_KIND_SPARSE_COO}, "sparse_coo"},
  };
  size_t i, j;
  for (i = 0; i < NELEM(cases); i++) {
    sl_codec *c = make(cases[i].spec);
    if (c == NULL) continue;
    CHECK(strcmp(sl_codec_name(c), cases[i].name) == 0);
    CHECK(sl_codec_name_is_builtin(sl_codec_name(c)));
    CHECK_EQ_INT(sl_codec_is_raw(c), i == 0);
    for (j = 0; j < NELEM(all_dtypes); j++) {
      sl_dtype dt = all_dtypes[j];
      int isf = dt == SL_DTYPE_FLOAT16 || dt == SL_DTYPE_BFLOAT16 || dt == SL_DTYPE_FLOAT32 ||
                dt == SL_DTYPE_FLOAT64;
      int want;
      switch (cases[i].spec.kind) {
        case SL_CODEC_KIND_CAST:
        case SL_CODEC_KIND_INT8: want = isf; break;
        case SL_CODEC_KIND_FLOAT16:
        case SL_CODEC_KIND_BFLOAT16: want = dt == SL_DTYPE_FLOAT32; break;
        default: want = 1;
      }
      CHECK_EQ_INT(sl_codec_accepts(c, dt), want);
    }
    CHECK_EQ_INT(sl_codec_accepts(c, SL_DTYPE_INVALID), 0);
    CHECK_EQ_INT(sl_codec_accepts(c, SL_DTYPE_COUNT), 0);
    sl_codec_destroy(c);
  }
  /* a compressed codec accepts what its inner codec accepts */
  {
    sl_codec_spec s = {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD,
                       .level = 1, .inner = &inner_bf};
    sl_codec *c = make(s);
    if (c != NULL) {
      CHECK(sl_codec_accepts(c, SL_DTYPE_FLOAT32));
      CHECK(!sl_codec_accepts(c, SL_DTYPE_FLOAT64));
      CHECK(!sl_codec_accepts(c, SL_DTYPE_INT32));
    }
    sl_codec_destroy(c);
  }
  sl_codec_destroy(NULL);
}

static void test_create_bad_specs(void) {
  sl_codec_spec zstd_inner = {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD,
                              .level = 3};
  sl_codec_spec bad_inner = {.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_INT32};
  sl_codec_spec bad[] = {
      {.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_INVALID},
      {.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_INT8},
      {.kind = SL_CODEC_KIND_INT8, .per_channel = 2},
      {.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = 1000},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 23},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = -1},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = 10},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = -2},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = (sl_compression)7, .level = 1},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .inner = &zstd_inner},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .inner = &bad_inner},
      {.kind = (sl_codec_kind)99},
  };
  size_t i;
  for (i = 0; i < NELEM(bad); i++) {
    sl_codec *c = (sl_codec *)0x1;
    sl_err err;
    sl_err_clear(&err);
    CHECK_EQ_INT(sl_codec_create(&bad[i], &c, &err), SL_EINVAL);
    CHECK(c == NULL);
    CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
    CHECK(err.msg[0] != '\0');
  }
  {
    sl_codec *c = NULL;
    sl_err err;
    CHECK_EQ_INT(sl_codec_create(NULL, &c, &err), SL_EINVAL);
    /* the defaults: zstd level 0 and zlib level -1 */
    sl_codec_spec z0 = {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD};
    sl_codec_spec zl = {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB,
                        .level = -1};
    c = make(z0);
    sl_codec_destroy(c);
    c = make(zl);
    sl_codec_destroy(c);
  }
}

static void test_encode_errors(void) {
  sl_codec *f16 = make((sl_codec_spec){.kind = SL_CODEC_KIND_FLOAT16});
  sl_codec *raw = make((sl_codec_spec){.kind = SL_CODEC_KIND_RAW});
  sl_codec *i8 = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = 3});
  double dd[4] = {1, 2, 3, 4};
  float ff[4] = {1, 2, 3, 4};
  sl_tensor_desc d64 = desc1(SL_DTYPE_FLOAT64, 4), d32 = desc1(SL_DTYPE_FLOAT32, 4);
  void *p = (void *)0x1;
  size_t len = 99;
  sl_meta meta = {0};
  sl_err err;
  /* a dtype the codec does not take: names both */
  CHECK_EQ_INT(sl_codec_encode(f16, &d64, dd, sizeof(dd), &p, &len, &meta, &err), SL_EINVAL);
  CHECK(p == NULL);
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.msg, "float16");
  CHECK_CONTAINS(err.msg, "float64");
  /* byte count that disagrees with the shape */
  CHECK_EQ_INT(sl_codec_encode(raw, &d32, ff, 12, &p, &len, &meta, &err), SL_EINVAL);
  /* no data */
  CHECK_EQ_INT(sl_codec_encode(raw, &d32, NULL, 16, &p, &len, &meta, &err), SL_EINVAL);
  /* metadata must start empty */
  sl_meta_add_int(&meta, "x", 1);
  CHECK_EQ_INT(sl_codec_encode(raw, &d32, ff, 16, &p, &len, &meta, &err), SL_EINVAL);
  sl_meta_clear(&meta);
  /* per-channel axis out of range for this tensor, and a scalar */
  CHECK_EQ_INT(sl_codec_encode(i8, &d32, ff, 16, &p, &len, &meta, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "axis");
  CHECK_EQ_INT(meta.n, 0);
  {
    sl_tensor_desc s = desc1(SL_DTYPE_FLOAT32, 1);
    s.ndim = 0;
    CHECK_EQ_INT(sl_codec_encode(i8, &s, ff, 4, &p, &len, &meta, &err), SL_EINVAL);
  }
  /* invalid shape */
  {
    sl_tensor_desc neg = desc1(SL_DTYPE_FLOAT32, -4);
    CHECK_EQ_INT(sl_codec_encode(raw, &neg, ff, 16, &p, &len, &meta, &err), SL_EINVAL);
  }
  CHECK_EQ_INT(sl_codec_encode(raw, &d32, ff, 16, NULL, &len, &meta, &err), SL_EINVAL);
  sl_codec_destroy(f16);
  sl_codec_destroy(raw);
  sl_codec_destroy(i8);
}

static void test_decode_errors(void) {
  float ff[4] = {1, 2, 3, 4};
  sl_tensor_desc d32 = desc1(SL_DTYPE_FLOAT32, 4), di = desc1(SL_DTYPE_INT32, 4);
  void *out = (void *)0x1;
  sl_err err;
  CHECK_EQ_INT(sl_codec_decode("nope", &d32, ff, 16, NULL, &out, &err), SL_EINVAL);
  CHECK(out == NULL);
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.msg, "nope");
  CHECK_EQ_INT(sl_codec_decode(NULL, &d32, ff, 16, NULL, &out, &err), SL_EINVAL);
  CHECK_EQ_INT(sl_codec_decode("raw", NULL, ff, 16, NULL, &out, &err), SL_EINVAL);
  CHECK_EQ_INT(sl_codec_decode("raw", &d32, NULL, 16, NULL, &out, &err), SL_EINVAL);
  /* the dtype must be one the codec decodes to */
  CHECK_EQ_INT(sl_codec_decode("float16", &di, ff, 8, NULL, &out, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "float16");
  CHECK_CONTAINS(err.msg, "int32");
  CHECK_EQ_INT(sl_codec_decode("int8", &di, ff, 4, NULL, &out, &err), SL_EINVAL);
  CHECK_EQ_INT(sl_codec_decode("cast", &di, ff, 16, NULL, &out, &err), SL_EINVAL);
  {
    sl_tensor_desc neg = desc1(SL_DTYPE_FLOAT32, -1), bad = desc1(SL_DTYPE_INVALID, 4);
    sl_tensor_desc huge = desc3(SL_DTYPE_FLOAT64, INT64_MAX / 4, 8, 8);
    CHECK_EQ_INT(sl_codec_decode("raw", &neg, ff, 16, NULL, &out, &err), SL_EINVAL);
    CHECK_EQ_INT(sl_codec_decode("raw", &bad, ff, 16, NULL, &out, &err), SL_EINVAL);
    CHECK_EQ_INT(sl_codec_decode("sparse_coo", &huge, ff, 16, NULL, &out, &err), SL_EINVAL);
    CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  }
  CHECK(out == NULL);
}

/* ---- raw ---- */

static void test_raw_all_dtypes(void) {
  sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_RAW});
  size_t i;
  for (i = 0; i < NELEM(all_dtypes); i++) {
    sl_tensor_desc d = desc3(all_dtypes[i], 3, 5, 7);
    size_t nb = desc_bytes(&d), len;
    void *data = malloc(nb), *payload = NULL, *out;
    sl_meta meta;
    fill_random(all_dtypes[i], data, 105, 0.2);
    out = roundtrip(c, &d, data, &payload, &len, &meta);
    CHECK(out != NULL && memcmp(out, data, nb) == 0);
    CHECK_EQ_INT(len, nb);
    CHECK(payload != NULL && memcmp(payload, data, nb) == 0);
    CHECK_EQ_INT(meta.n, 0);
    if (all_dtypes[i] == SL_DTYPE_INT64) fuzz_payload("raw", &d, payload, len, &meta);
    sl_storage_free(out);
    sl_storage_free(payload);
    sl_meta_clear(&meta);
    free(data);
  }
  /* empty and scalar tensors */
  {
    sl_tensor_desc e = desc3(SL_DTYPE_FLOAT32, 4, 0, 3), s = desc1(SL_DTYPE_INT16, 1);
    int16_t v = -5;
    void *out = roundtrip(c, &e, NULL, NULL, NULL, NULL);
    CHECK(out != NULL);
    sl_storage_free(out);
    s.ndim = 0;
    out = roundtrip(c, &s, &v, NULL, NULL, NULL);
    CHECK(out != NULL && memcmp(out, &v, 2) == 0);
    sl_storage_free(out);
  }
  sl_codec_destroy(c);
}

/* ---- float16 / bfloat16 kernels ---- */

typedef void (*f2h_fn)(const float *, uint16_t *, size_t);
typedef void (*h2f_fn)(const uint16_t *, float *, size_t);

static void check_f32_edges(f2h_fn to_f16, f2h_fn to_bf16, const char *label) {
  enum { N = NELEM(torch_f32_edges) };
  float in[N + 16];
  uint16_t h[N + 16], b[N + 16];
  size_t i;
  int bad = 0;
  /* at several offsets, so that each value goes through the vector body and the
   * scalar tail */
  for (size_t off = 0; off < 16; off += 5) {
    for (i = 0; i < N + 16; i++) in[i] = 0.0f;
    for (i = 0; i < N; i++) in[off + i] = f32_of(torch_f32_edges[i].f32);
    to_f16(in, h, N + 16);
    to_bf16(in, b, N + 16);
    for (i = 0; i < N; i++) {
      if (h[off + i] != torch_f32_edges[i].f16 || b[off + i] != torch_f32_edges[i].bf16) {
        if (bad++ < 5) {
          fprintf(stderr, "  %s: f32 0x%08X -> f16 0x%04X (torch 0x%04X), bf16 0x%04X (torch 0x%04X)\n",
                  label, torch_f32_edges[i].f32, h[off + i], torch_f32_edges[i].f16, b[off + i],
                  torch_f32_edges[i].bf16);
        }
      }
    }
  }
  CHECK_EQ_INT(bad, 0);
}

static void check_half_edges(h2f_fn f16_to, h2f_fn bf16_to, const char *label) {
  uint16_t hin[64];
  float out[64];
  size_t i;
  int bad = 0;
  memset(hin, 0, sizeof(hin));
  for (i = 0; i < NELEM(torch_f16_edges); i++) hin[i + 3] = torch_f16_edges[i].f16;
  f16_to(hin, out, 64);
  for (i = 0; i < NELEM(torch_f16_edges); i++) {
    if (bits_of(out[i + 3]) != torch_f16_edges[i].f32 && bad++ < 5) {
      fprintf(stderr, "  %s: f16 0x%04X -> 0x%08X (torch 0x%08X)\n", label, torch_f16_edges[i].f16,
              bits_of(out[i + 3]), torch_f16_edges[i].f32);
    }
  }
  memset(hin, 0, sizeof(hin));
  for (i = 0; i < NELEM(torch_bf16_edges); i++) hin[i + 5] = torch_bf16_edges[i].bf16;
  bf16_to(hin, out, 64);
  for (i = 0; i < NELEM(torch_bf16_edges); i++) {
    if (bits_of(out[i + 5]) != torch_bf16_edges[i].f32 && bad++ < 5) {
      fprintf(stderr, "  %s: bf16 0x%04X -> 0x%08X (torch 0x%08X)\n", label,
              torch_bf16_edges[i].bf16, bits_of(out[i + 5]), torch_bf16_edges[i].f32);
    }
  }
  CHECK_EQ_INT(bad, 0);
}

static void test_half_edges_match_torch(void) {
  size_t i;
  check_f32_edges(sl_f32_to_f16, sl_f32_to_bf16, "dispatched");
  check_f32_edges(sl__f32_to_f16_scalar, sl__f32_to_bf16_scalar, "scalar");
  check_half_edges(sl_f16_to_f32, sl_bf16_to_f32, "dispatched");
  check_half_edges(sl__f16_to_f32_scalar, sl__bf16_to_f32_scalar, "scalar");
  if (sl__cpu_has_avx2_f16c()) {
    check_f32_edges(sl__f32_to_f16_avx2, sl__f32_to_bf16_avx2, "avx2");
    check_half_edges(sl__f16_to_f32_avx2, sl__bf16_to_f32_avx2, "avx2");
  }
  /* the one-element helpers and single-element calls (always scalar) */
  for (i = 0; i < NELEM(torch_f32_edges); i++) {
    float f = f32_of(torch_f32_edges[i].f32);
    uint16_t h, b;
    CHECK_EQ_INT(sl__f32_to_f16_one(f), torch_f32_edges[i].f16);
    CHECK_EQ_INT(sl__f32_to_bf16_one(f), torch_f32_edges[i].bf16);
    sl_f32_to_f16(&f, &h, 1);
    sl_f32_to_bf16(&f, &b, 1);
    CHECK_EQ_INT(h, torch_f32_edges[i].f16);
    CHECK_EQ_INT(b, torch_f32_edges[i].bf16);
  }
}

/* hashes of all 65536 half / bfloat16 conversions, and of the 17M-value float32
 * sample, against torch's */
static void test_half_hashes_match_torch(void) {
  enum { CH = 1 << 20 };
  static uint16_t hin[65536];
  float *fout = malloc(65536 * sizeof(float));
  float *fin = malloc(CH * sizeof(float));
  uint16_t *hout = malloc(CH * 2);
  uint64_t h_f16[3] = {0, 0, 0}, h_bf16[3] = {0, 0, 0};
  f2h_fn f16_fns[3] = {sl_f32_to_f16, sl__f32_to_f16_scalar, sl__f32_to_f16_avx2};
  f2h_fn bf16_fns[3] = {sl_f32_to_bf16, sl__f32_to_bf16_scalar, sl__f32_to_bf16_avx2};
  h2f_fn f16_back[3] = {sl_f16_to_f32, sl__f16_to_f32_scalar, sl__f16_to_f32_avx2};
  h2f_fn bf16_back[3] = {sl_bf16_to_f32, sl__bf16_to_f32_scalar, sl__bf16_to_f32_avx2};
  int paths = sl__cpu_has_avx2_f16c() ? 3 : 2, p;
  uint32_t k, i;
  for (i = 0; i < 65536; i++) hin[i] = (uint16_t)i;
  for (p = 0; p < paths; p++) {
    uint64_t a = 0, b = 0;
    f16_back[p](hin, fout, 65536);
    for (i = 0; i < 65536; i++) a += mix64(bits_of(fout[i]) | ((uint64_t)i << 32));
    bf16_back[p](hin, fout, 65536);
    for (i = 0; i < 65536; i++) b += mix64(bits_of(fout[i]) | ((uint64_t)i << 32));
    CHECK(a == TORCH_HASH_F16_TO_F32);
    CHECK(b == TORCH_HASH_BF16_TO_F32);
  }
  for (k = 0; k < TORCH_SAMPLE_N; k += CH) {
    uint32_t n = TORCH_SAMPLE_N - k < CH ? TORCH_SAMPLE_N - k : CH;
    for (i = 0; i < n; i++) fin[i] = f32_of((k + i) * TORCH_SAMPLE_STEP);
    for (p = 0; p < paths; p++) {
      f16_fns[p](fin, hout, n);
      for (i = 0; i < n; i++) h_f16[p] += mix64(hout[i] | ((uint64_t)(k + i) << 32));
      bf16_fns[p](fin, hout, n);
      for (i = 0; i < n; i++) h_bf16[p] += mix64(hout[i] | ((uint64_t)(k + i) << 32));
    }
  }
  for (p = 0; p < paths; p++) {
    if (h_f16[p] != TORCH_HASH_F32_TO_F16 || h_bf16[p] != TORCH_HASH_F32_TO_BF16) {
      fprintf(stderr, "  path %d: f16 hash 0x%016llx, bf16 hash 0x%016llx\n", p,
              (unsigned long long)h_f16[p], (unsigned long long)h_bf16[p]);
    }
    CHECK(h_f16[p] == TORCH_HASH_F32_TO_F16);
    CHECK(h_bf16[p] == TORCH_HASH_F32_TO_BF16);
  }
  free(fout);
  free(fin);
  free(hout);
}

/* The vector kernels give the scalar kernels' bits: random bit patterns (all
 * classes of float), every length 0..80 at every alignment 0..3 (tails), and
 * every half / bfloat16 value (the 65536 case is exhaustive). */
static void test_vector_matches_scalar(void) {
  enum { N = 1 << 22 };
  float *f = malloc((N + 4) * sizeof(float));
  uint16_t *a = malloc((N + 4) * 2), *b = malloc((N + 4) * 2);
  float *fa = malloc((N + 4) * sizeof(float)), *fb = malloc((N + 4) * sizeof(float));
  size_t i, len, off;
  int bad = 0;
  if (!sl__cpu_has_avx2_f16c()) {
    printf("     (no AVX2+F16C on this CPU: only the scalar kernels are used)\n");
    goto done;
  }
  for (i = 0; i < N + 4; i++) {
    uint32_t r = (uint32_t)rnd();
    /* half the values near half's and bfloat16's rounding-critical ranges */
    if (i & 1) r = (r & 0x80001FFFu) | ((0x330u + (uint32_t)(rnd() % 0x150)) << 20);
    memcpy(&f[i], &r, 4);
  }
  sl__f32_to_f16_avx2(f, a, N);
  sl__f32_to_f16_scalar(f, b, N);
  bad += memcmp(a, b, N * 2) != 0;
  sl__f32_to_bf16_avx2(f, a, N);
  sl__f32_to_bf16_scalar(f, b, N);
  bad += memcmp(a, b, N * 2) != 0;
  for (i = 0; i < N; i++) a[i] = (uint16_t)(i * 40503u);
  sl__f16_to_f32_avx2(a, fa, N);
  sl__f16_to_f32_scalar(a, fb, N);
  bad += memcmp(fa, fb, N * 4) != 0;
  sl__bf16_to_f32_avx2(a, fa, N);
  sl__bf16_to_f32_scalar(a, fb, N);
  bad += memcmp(fa, fb, N * 4) != 0;
  /* lengths and misaligned starts: the vector body plus every tail length */
  for (off = 0; off < 4; off++) {
    for (len = 0; len <= 80; len++) {
      memset(a, 0xAB, 200);
      memset(b, 0xAB, 200);
      sl__f32_to_f16_avx2(f + off, a + off, len);
      sl__f32_to_f16_scalar(f + off, b + off, len);
      bad += memcmp(a, b, 200) != 0;
      sl__f32_to_bf16_avx2(f + off, a + off, len);
      sl__f32_to_bf16_scalar(f + off, b + off, len);
      bad += memcmp(a, b, 200) != 0;
      memset(fa, 0xAB, 400);
      memset(fb, 0xAB, 400);
      sl__f16_to_f32_avx2(a + off, fa + off, len);
      sl__f16_to_f32_scalar(a + off, fb + off, len);
      bad += memcmp(fa, fb, 400) != 0;
      sl__bf16_to_f32_avx2(a + off, fa + off, len);
      sl__bf16_to_f32_scalar(a + off, fb + off, len);
      bad += memcmp(fa, fb, 400) != 0;
    }
  }
  CHECK_EQ_INT(bad, 0);
done:
  free(f);
  free(a);
  free(b);
  free(fa);
  free(fb);
}

/* ---- the float16 / bfloat16 codecs ---- */

static void test_half_codecs(void) {
  int which;
  for (which = 0; which < 2; which++) {
    sl_codec *c = make((sl_codec_spec){.kind = which ? SL_CODEC_KIND_BFLOAT16
                                                     : SL_CODEC_KIND_FLOAT16});
    const char *name = which ? "bfloat16" : "float16";
    sl_tensor_desc d = desc3(SL_DTYPE_FLOAT32, 4, 9, 11);
    size_t n = 396, len, i;
    float *x = malloc(n * 4);
    uint16_t *ref = malloc(n * 2);
    float *back = malloc(n * 4);
    void *payload, *out;
    sl_meta meta;
    fill_random(SL_DTYPE_FLOAT32, x, n, 0.1);
    for (i = 0; i < NELEM(torch_f32_edges); i++) x[i * 7] = f32_of(torch_f32_edges[i].f32);
    out = roundtrip(c, &d, x, &payload, &len, &meta);
    CHECK_EQ_INT(len, n * 2);
    (which ? sl__f32_to_bf16_scalar : sl__f32_to_f16_scalar)(x, ref, n);
    (which ? sl__bf16_to_f32_scalar : sl__f16_to_f32_scalar)(ref, back, n);
    CHECK(payload != NULL && memcmp(payload, ref, n * 2) == 0);
    CHECK(out != NULL && memcmp(out, back, n * 4) == 0);
    CHECK_EQ_INT(meta.n, 0);
    fuzz_payload(name, &d, payload, len, &meta);
    sl_storage_free(out);
    sl_storage_free(payload);
    sl_meta_clear(&meta);
    /* a payload at an odd address decodes the same (no misaligned loads) */
    {
      sl_err err;
      CHECK_EQ_INT(decode_exact(name, &d, ref, n * 2, NULL, 1, &err), SL_OK);
    }
    free(x);
    free(ref);
    free(back);
    sl_codec_destroy(c);
  }
}

/* ---- cast ---- */

static void test_cast_all_pairs(void) {
  size_t s, w, i;
  for (s = 0; s < NELEM(float_dtypes); s++) {
    for (w = 0; w < NELEM(float_dtypes); w++) {
      sl_dtype src = float_dtypes[s], wire = float_dtypes[w];
      sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_CAST, .wire_dtype = wire});
      sl_tensor_desc d = desc3(src, 3, 7, 5);
      size_t n = 105, isz = sl_dtype_itemsize(src), len;
      unsigned char *x = malloc(n * isz), *mid = malloc(n * 8), *ref = malloc(n * isz);
      void *payload, *out;
      sl_meta meta;
      const sl_meta_value *v;
      fill_random(src, x, n, 0.1);
      out = roundtrip(c, &d, x, &payload, &len, &meta);
      CHECK_EQ_INT(len, n * sl_dtype_itemsize(wire));
      v = sl_meta_get(&meta, "wire_dtype");
      CHECK(v != NULL && v->type == SL_META_STRING && strcmp(v->bytes, sl_dtype_name(wire)) == 0);
      sl__cast_floats(src, x, wire, mid, n);
      sl__cast_floats(wire, mid, src, ref, n);
      CHECK(payload != NULL && memcmp(payload, mid, len) == 0);
      CHECK(out != NULL && memcmp(out, ref, n * isz) == 0);
      /* exact whenever the wire dtype holds every value of the source */
      if (sl_dtype_itemsize(wire) > isz || src == wire ||
          (src != SL_DTYPE_FLOAT64 && wire == SL_DTYPE_FLOAT32)) {
        CHECK(out != NULL && memcmp(out, x, n * isz) == 0);
      }
      if (s == 2 && w == 1) {
        fuzz_payload("cast", &d, payload, len, &meta);
        fuzz_meta("cast", &d, payload, len, &meta);
      }
      {
        sl_err err;
        CHECK_EQ_INT(decode_exact("cast", &d, payload, len, &meta, 1, &err), SL_OK);
      }
      sl_storage_free(out);
      sl_storage_free(payload);
      sl_meta_clear(&meta);
      free(x);
      free(mid);
      free(ref);
      sl_codec_destroy(c);
    }
  }
  /* float32 -> float16 on the wire gives exactly tensor.half().float() */
  {
    sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_CAST,
                                       .wire_dtype = SL_DTYPE_FLOAT16});
    float in[NELEM(torch_f32_edges)];
    sl_tensor_desc d = desc1(SL_DTYPE_FLOAT32, NELEM(torch_f32_edges));
    void *payload;
    size_t len;
    float *out;
    for (i = 0; i < NELEM(in); i++) in[i] = f32_of(torch_f32_edges[i].f32);
    out = roundtrip(c, &d, in, &payload, &len, NULL);
    for (i = 0; i < NELEM(in) && out; i++) {
      uint16_t h;
      memcpy(&h, (char *)payload + 2 * i, 2);
      CHECK_EQ_INT(h, torch_f32_edges[i].f16);
    }
    sl_storage_free(out);
    sl_storage_free(payload);
    sl_codec_destroy(c);
  }
  /* metadata naming a dtype that is not a float, or none at all */
  {
    sl_tensor_desc d = desc1(SL_DTYPE_FLOAT32, 2);
    float x[2] = {1, 2};
    sl_meta m = {0};
    sl_err err;
    void *out = NULL;
    sl_meta_add_string(&m, "wire_dtype", "int32");
    CHECK_EQ_INT(sl_codec_decode("cast", &d, x, 8, &m, &out, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "cast");
    sl_meta_clear(&m);
    sl_meta_add_string(&m, "wire_dtype", "");
    CHECK_EQ_INT(sl_codec_decode("cast", &d, x, 8, &m, &out, &err), SL_EINVAL);
    sl_meta_clear(&m);
    sl_meta_add_bytes(&m, "wire_dtype", "float32\0x", 9);
    CHECK_EQ_INT(sl_codec_decode("cast", &d, x, 8, &m, &out, &err), SL_EINVAL);
    sl_meta_clear(&m);
    CHECK_EQ_INT(sl_codec_decode("cast", &d, x, 8, NULL, &out, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "wire_dtype");
    CHECK(out == NULL);
  }
}

/* ---- int8 ---- */

static double load_any(sl_dtype dt, const void *p, size_t i) {
  switch (dt) {
    case SL_DTYPE_FLOAT16: {
      uint16_t h;
      memcpy(&h, (const char *)p + 2 * i, 2);
      return sl__f16_to_f32_one(h);
    }
    case SL_DTYPE_BFLOAT16: {
      uint16_t h;
      memcpy(&h, (const char *)p + 2 * i, 2);
      return sl__bf16_to_f32_one(h);
    }
    case SL_DTYPE_FLOAT32: {
      float f;
      memcpy(&f, (const char *)p + 4 * i, 4);
      return f;
    }
    default: {
      double d;
      memcpy(&d, (const char *)p + 8 * i, 8);
      return d;
    }
  }
}

static void store_any(sl_dtype dt, void *p, size_t i, double v) {
  switch (dt) {
    case SL_DTYPE_FLOAT16: {
      uint16_t h = sl__f32_to_f16_one((float)v);
      memcpy((char *)p + 2 * i, &h, 2);
      break;
    }
    case SL_DTYPE_BFLOAT16: {
      uint16_t h = sl__f32_to_bf16_one((float)v);
      memcpy((char *)p + 2 * i, &h, 2);
      break;
    }
    case SL_DTYPE_FLOAT32: {
      float f = (float)v;
      memcpy((char *)p + 4 * i, &f, 4);
      break;
    }
    default: memcpy((char *)p + 8 * i, &v, 8); break;
  }
}

/* how far rounding x' to the output dtype may move it */
static double out_rounding(sl_dtype dt, double v) {
  v = fabs(v);
  switch (dt) {
    case SL_DTYPE_FLOAT16: return v * 0x1p-10 + 0x1p-24; /* one ulp: rounded twice */
    case SL_DTYPE_BFLOAT16: return v * 0x1p-7 + 0x1p-133;
    case SL_DTYPE_FLOAT32: return v * 0x1p-24 + 0x1p-149;
    default: return v * 0x1p-53 + 0x1p-1074;
  }
}

/* Quantize x with `c`, decode, check |x - x'| <= scale/2 (+ rounding) for every
 * element; returns the worst |x - x'| / scale. */
static double check_int8_bound(sl_codec *c, const sl_tensor_desc *d, const void *x,
                               int per_channel, int axis) {
  size_t n = desc_bytes(d) / sl_dtype_itemsize(d->dtype), len, i;
  void *payload = NULL;
  sl_meta meta;
  void *out = roundtrip(c, d, x, &payload, &len, &meta);
  double worst = 0.0;
  int bad = 0;
  if (out == NULL) goto done;
  {
    const sl_meta_value *pc = sl_meta_get(&meta, "per_channel");
    CHECK(pc != NULL && pc->type == SL_META_BOOL && pc->i == per_channel);
  }
  for (i = 0; i < n; i++) {
    double xi = load_any(d->dtype, x, i), yi = load_any(d->dtype, out, i), scale;
    if (!per_channel) {
      scale = sl_meta_get(&meta, "scale")->d;
    } else {
      size_t inner = 1, ch;
      int k;
      for (k = axis + 1; k < d->ndim; k++) inner *= (size_t)d->shape[k];
      ch = (i / inner) % (size_t)d->shape[axis];
      memcpy(&scale, (char *)payload + 8 * ch, 8);
    }
    if (fabs(xi - yi) > scale * (0.5 + 1e-12) + out_rounding(d->dtype, yi)) {
      if (bad++ < 3) {
        fprintf(stderr, "  int8 %s: element %zu: %.17g -> %.17g, scale %.17g\n",
                sl_dtype_name(d->dtype), i, xi, yi, scale);
      }
    }
    if (scale > 0 && (fabs(xi - yi) - out_rounding(d->dtype, yi)) / scale > worst) {
      worst = (fabs(xi - yi) - out_rounding(d->dtype, yi)) / scale;
    }
    if (!isfinite(yi)) bad++;
  }
  CHECK_EQ_INT(bad, 0);
done:
  sl_storage_free(out);
  sl_storage_free(payload);
  sl_meta_clear(&meta);
  return worst;
}

static void test_int8_error_bound(void) {
  sl_codec *pt = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8});
  size_t f, i, n = 4 * 50 * 13;
  int kind;
  double worst = 0.0;
  for (f = 0; f < NELEM(float_dtypes); f++) {
    sl_dtype dt = float_dtypes[f];
    size_t isz = sl_dtype_itemsize(dt);
    unsigned char *x = malloc(n * isz);
    for (kind = 0; kind < 8; kind++) {
      sl_tensor_desc d = desc3(dt, 4, 50, 13);
      for (i = 0; i < n; i++) {
        double v;
        switch (kind) {
          case 0: v = rnd_normal(); break;                                 /* around 0 */
          case 1: v = 5.0 + 5.0 * rnd_unit(); break;                       /* positive */
          case 2: v = -1e-3 - 1e-3 * rnd_unit(); break;                    /* negative */
          case 3: v = (rnd_unit() - 0.3) * 6e4; break;                     /* half's range */
          case 4: v = rnd_normal() * 1e-6; break;                          /* small */
          case 5: v = (i % 7) ? 0.0 : rnd_normal(); break;                 /* mostly zeros */
          case 6: v = (rnd_unit() < 0.5 ? -1 : 1) * (dt == SL_DTYPE_FLOAT16 ? 65504.0
                                                       : dt == SL_DTYPE_FLOAT64 ? 1.7e308
                                                                                : 3.3e38);
            break; /* extremes: the grid would overflow without the clamp */
          default: v = (double)(i % 256) - 100.0; break;                   /* integers */
        }
        store_any(dt, x, i, v);
      }
      {
        double w = check_int8_bound(pt, &d, x, 0, 0);
        if (w > worst) worst = w;
      }
      {
        int axis;
        for (axis = -1; axis < 3; axis++) {
          sl_codec *pc = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8, .per_channel = 1,
                                              .axis = axis});
          double w = check_int8_bound(pc, &d, x, 1, axis < 0 ? 2 : axis);
          if (w > worst) worst = w;
          sl_codec_destroy(pc);
        }
      }
    }
    free(x);
  }
  /* float64 subnormals (the scale is raised to DBL_MIN) */
  {
    double x[33];
    sl_tensor_desc d = desc1(SL_DTYPE_FLOAT64, 33);
    for (i = 0; i < 33; i++) x[i] = (double)i * 4.9e-324 * (i & 1 ? -1 : 1);
    check_int8_bound(pt, &d, x, 0, 0);
  }
  printf("     (int8: worst error %.12f of a step, beyond the output dtype's rounding)\n",
         worst);
  CHECK(worst <= 0.5 + 1e-12);
  sl_codec_destroy(pt);
}

static void test_int8_constants_and_zeros(void) {
  sl_codec *pt = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8});
  sl_codec *pc = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = 0});
  float x[24];
  size_t i, len;
  void *payload, *out;
  sl_meta meta;
  sl_tensor_desc d = desc3(SL_DTYPE_FLOAT32, 2, 3, 4);
  /* all zeros (with -0.0): scale 0, zero point 0, +0.0 back */
  for (i = 0; i < 24; i++) x[i] = (i & 1) ? -0.0f : 0.0f;
  out = roundtrip(pt, &d, x, &payload, &len, &meta);
  CHECK(sl_meta_get(&meta, "scale") != NULL && sl_meta_get(&meta, "scale")->d == 0.0);
  CHECK(sl_meta_get(&meta, "zero_point") != NULL && sl_meta_get(&meta, "zero_point")->i == 0);
  for (i = 0; i < 24 && out; i++) CHECK_EQ_INT(bits_of(((float *)out)[i]), 0);
  sl_storage_free(out);
  sl_storage_free(payload);
  sl_meta_clear(&meta);
  /* a constant tensor: exactly 255 steps, comes back within the bound */
  for (i = 0; i < 24; i++) x[i] = 3.25f;
  out = roundtrip(pt, &d, x, &payload, &len, &meta);
  for (i = 0; i < 24 && out; i++) CHECK(fabs(((float *)out)[i] - 3.25) < 1e-6);
  sl_storage_free(out);
  sl_storage_free(payload);
  sl_meta_clear(&meta);
  /* per channel: one channel of zeros, one constant, one varying; exact zeros
   * stay exact */
  for (i = 0; i < 24; i++) x[i] = i < 12 ? 0.0f : (float)(i - 12) * 0.5f - 1.0f;
  out = roundtrip(pc, &d, x, &payload, &len, &meta);
  CHECK_EQ_INT(len, 2 * 9 + 24);
  for (i = 0; i < 24 && out; i++) {
    if (x[i] == 0.0f) CHECK(((float *)out)[i] == 0.0f);
  }
  sl_storage_free(out);
  sl_storage_free(payload);
  sl_meta_clear(&meta);
  /* empty tensors, and a scalar */
  {
    sl_tensor_desc e = desc3(SL_DTYPE_FLOAT32, 3, 0, 2), s = desc1(SL_DTYPE_FLOAT64, 1);
    double v = -2.5;
    out = roundtrip(pt, &e, NULL, &payload, &len, NULL);
    CHECK(out != NULL);
    CHECK_EQ_INT(len, 0);
    sl_storage_free(out);
    sl_storage_free(payload);
    out = roundtrip(pc, &e, NULL, &payload, &len, NULL);
    CHECK(out != NULL);
    CHECK_EQ_INT(len, 3 * 9);
    sl_storage_free(out);
    sl_storage_free(payload);
    s.ndim = 0;
    out = roundtrip(pt, &s, &v, NULL, NULL, NULL);
    CHECK(out != NULL && fabs(*(double *)out - v) <= 2.5 / 255 / 2 + 1e-15);
    sl_storage_free(out);
  }
  sl_codec_destroy(pt);
  sl_codec_destroy(pc);
}

static void test_int8_nonfinite_refused(void) {
  sl_codec *pt = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8});
  sl_codec *pc = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = 1});
  const float bad[3] = {NAN, INFINITY, -INFINITY};
  const char *words[3] = {"NaN", "+inf", "-inf"};
  size_t b;
  for (b = 0; b < 3; b++) {
    float x[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    sl_tensor_desc d = desc3(SL_DTYPE_FLOAT32, 2, 3, 2);
    void *payload = (void *)0x1;
    size_t len;
    sl_meta meta = {0};
    sl_err err;
    int which;
    x[7] = bad[b];
    for (which = 0; which < 2; which++) {
      CHECK_EQ_INT(sl_codec_encode(which ? pc : pt, &d, x, sizeof(x), &payload, &len, &meta, &err),
                   SL_EINVAL);
      CHECK(payload == NULL);
      CHECK_EQ_INT(meta.n, 0);
      CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
      CHECK_CONTAINS(err.msg, "int8");
      CHECK_CONTAINS(err.msg, "element 7");
      CHECK_CONTAINS(err.msg, words[b]);
    }
  }
  {
    /* float16 inf and float64 NaN too */
    uint16_t h[4] = {0x3C00, 0x7C00, 0, 0};
    double dd[2] = {1.0, NAN};
    sl_tensor_desc dh = desc1(SL_DTYPE_FLOAT16, 4), dd_ = desc1(SL_DTYPE_FLOAT64, 2);
    void *payload = NULL;
    size_t len;
    sl_meta meta = {0};
    sl_err err;
    CHECK_EQ_INT(sl_codec_encode(pt, &dh, h, 8, &payload, &len, &meta, &err), SL_EINVAL);
    CHECK_EQ_INT(sl_codec_encode(pt, &dd_, dd, 16, &payload, &len, &meta, &err), SL_EINVAL);
  }
  sl_codec_destroy(pt);
  sl_codec_destroy(pc);
}

static void test_int8_corrupt(void) {
  int per;
  for (per = 0; per < 2; per++) {
    sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_INT8, .per_channel = per,
                                       .axis = 1});
    sl_tensor_desc d = desc3(SL_DTYPE_BFLOAT16, 3, 4, 5);
    uint16_t x[60];
    void *payload, *out;
    size_t len;
    sl_meta meta;
    fill_random(SL_DTYPE_BFLOAT16, x, 60, 0.1);
    out = roundtrip(c, &d, x, &payload, &len, &meta);
    CHECK_EQ_INT(len, per ? 4 * 9 + 60 : 60);
    fuzz_payload("int8", &d, payload, len, &meta);
    fuzz_meta("int8", &d, payload, len, &meta);
    {
      sl_err err;
      CHECK_EQ_INT(decode_exact("int8", &d, payload, len, &meta, 1, &err), SL_OK);
    }
    if (per) {
      /* a NaN / negative / infinite channel scale */
      double bads[3] = {NAN, -1.0, INFINITY};
      int k;
      for (k = 0; k < 3; k++) {
        unsigned char *p = malloc(len);
        sl_err err;
        memcpy(p, payload, len);
        memcpy(p + 8 * 2, &bads[k], 8);
        CHECK_EQ_INT(decode_exact("int8", &d, p, len, &meta, 0, &err), SL_EINVAL);
        CHECK_CONTAINS(err.msg, "channel 2");
        free(p);
      }
      {
        /* axis out of range */
        sl_meta m = {0};
        sl_err err;
        sl_meta_add_bool(&m, "per_channel", 1);
        sl_meta_add_int(&m, "axis", 3);
        CHECK_EQ_INT(decode_exact("int8", &d, payload, len, &m, 0, &err), SL_EINVAL);
        sl_meta_clear(&m);
        sl_meta_add_bool(&m, "per_channel", 1);
        sl_meta_add_int(&m, "axis", -1);
        CHECK_EQ_INT(decode_exact("int8", &d, payload, len, &m, 0, &err), SL_EINVAL);
        sl_meta_clear(&m);
      }
    } else {
      double bads[4] = {NAN, -0.5, INFINITY, -INFINITY};
      int64_t zps[2] = {-1, 256};
      int k;
      for (k = 0; k < 6; k++) {
        sl_meta m = {0};
        sl_err err;
        sl_meta_add_bool(&m, "per_channel", 0);
        sl_meta_add_double(&m, "scale", k < 4 ? bads[k] : 0.1);
        sl_meta_add_int(&m, "zero_point", k < 4 ? 3 : zps[k - 4]);
        CHECK_EQ_INT(decode_exact("int8", &d, payload, len, &m, 0, &err), SL_EINVAL);
        CHECK_CONTAINS(err.msg, "int8");
        sl_meta_clear(&m);
      }
      {
        /* a huge but finite scale is clamped to the dtype's range, not inf */
        sl_meta m = {0};
        void *o = NULL;
        sl_err err;
        size_t i;
        sl_meta_add_bool(&m, "per_channel", 0);
        sl_meta_add_double(&m, "scale", 1e300);
        sl_meta_add_int(&m, "zero_point", 0);
        CHECK_EQ_INT(sl_codec_decode("int8", &d, payload, len, &m, &o, &err), SL_OK);
        for (i = 0; i < 60 && o; i++) CHECK(isfinite(load_any(SL_DTYPE_BFLOAT16, o, i)));
        sl_storage_free(o);
        sl_meta_clear(&m);
      }
    }
    sl_storage_free(out);
    sl_storage_free(payload);
    sl_meta_clear(&meta);
    sl_codec_destroy(c);
  }
}

/* ---- sparse_coo ---- */

static void test_sparse_all_dtypes(void) {
  sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_SPARSE_COO});
  size_t t;
  for (t = 0; t < NELEM(all_dtypes); t++) {
    sl_dtype dt = all_dtypes[t];
    size_t isz = sl_dtype_itemsize(dt), n = 210, nnz = 0, i, len;
    sl_tensor_desc d = desc3(dt, 5, 6, 7);
    unsigned char *x = malloc(n * isz);
    void *payload, *out;
    sl_meta meta;
    fill_random(dt, x, n, 0.7);
    /* -0.0 and NaN payloads are non-zero bytes: they must come back exactly */
    if (dt == SL_DTYPE_FLOAT32) {
      uint32_t negz = 0x80000000u, nan = 0x7FA01234u;
      memcpy(x + 3 * isz, &negz, 4);
      memcpy(x + 4 * isz, &nan, 4);
    } else if (dt == SL_DTYPE_FLOAT64) {
      uint64_t negz = 0x8000000000000000ull;
      memcpy(x + 3 * isz, &negz, 8);
    } else if (dt == SL_DTYPE_BFLOAT16 || dt == SL_DTYPE_FLOAT16) {
      uint16_t negz = 0x8000;
      memcpy(x + 3 * isz, &negz, 2);
    }
    for (i = 0; i < n; i++) {
      size_t j, z = 1;
      for (j = 0; j < isz; j++) z &= x[i * isz + j] == 0;
      nnz += !z;
    }
    out = roundtrip(c, &d, x, &payload, &len, &meta);
    CHECK(out != NULL && memcmp(out, x, n * isz) == 0);
    CHECK_EQ_INT(len, 8 + nnz * (4 + isz));
    CHECK_EQ_INT(meta.n, 0);
    if (dt == SL_DTYPE_FLOAT32 || dt == SL_DTYPE_BOOL || dt == SL_DTYPE_COMPLEX128) {
      fuzz_payload("sparse_coo", &d, payload, len, &meta);
    }
    {
      sl_err err;
      CHECK_EQ_INT(decode_exact("sparse_coo", &d, payload, len, &meta, 1, &err), SL_OK);
    }
    sl_storage_free(out);
    sl_storage_free(payload);
    sl_meta_clear(&meta);
    free(x);
  }
  /* all zeros, fully dense, empty */
  {
    float z[16] = {0}, dense[16];
    sl_tensor_desc d = desc1(SL_DTYPE_FLOAT32, 16), e = desc3(SL_DTYPE_INT8, 2, 0, 9);
    void *payload, *out;
    size_t len, i;
    out = roundtrip(c, &d, z, &payload, &len, NULL);
    CHECK_EQ_INT(len, 8);
    CHECK(out != NULL && memcmp(out, z, sizeof(z)) == 0);
    sl_storage_free(out);
    sl_storage_free(payload);
    for (i = 0; i < 16; i++) dense[i] = (float)i + 1;
    out = roundtrip(c, &d, dense, &payload, &len, NULL);
    CHECK_EQ_INT(len, 8 + 16 * 8);
    CHECK(out != NULL && memcmp(out, dense, sizeof(dense)) == 0);
    sl_storage_free(out);
    sl_storage_free(payload);
    out = roundtrip(c, &e, NULL, &payload, &len, NULL);
    CHECK_EQ_INT(len, 8);
    CHECK(out != NULL);
    sl_storage_free(out);
    sl_storage_free(payload);
  }
  sl_codec_destroy(c);
}

static void put64(unsigned char *p, uint64_t v) {
  int i;
  for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put32(unsigned char *p, uint32_t v) {
  int i;
  for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void test_sparse_corrupt(void) {
  sl_tensor_desc d = desc1(SL_DTYPE_INT16, 10);
  unsigned char p[8 + 3 * 4 + 3 * 2];
  sl_err err;
  /* a valid payload: elements 1, 4, 9 */
  put64(p, 3);
  put32(p + 8, 1);
  put32(p + 12, 4);
  put32(p + 16, 9);
  memset(p + 20, 0x11, 6);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_OK);
  /* index out of range */
  put32(p + 16, 10);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "out of range");
  put32(p + 16, 0xFFFFFFFFu);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  /* a duplicate, and a decreasing index */
  put32(p + 16, 4);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "increasing");
  put32(p + 16, 2);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  put32(p + 16, 9);
  /* counts that disagree with the length, or exceed the tensor */
  put64(p, 2);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  put64(p, 11);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "non-zero");
  put64(p, UINT64_MAX);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  put64(p, (UINT64_MAX / 6) + 1); /* would wrap 8 + nnz * 6 */
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_EINVAL);
  put64(p, 3);
  CHECK_EQ_INT(decode_exact("sparse_coo", &d, p, sizeof(p), NULL, 0, &err), SL_OK);
  fuzz_payload("sparse_coo", &d, p, sizeof(p), NULL);
  /* a tensor of 2^32 elements or more takes 8-byte indices: a payload with
   * 4-byte ones has the wrong length (refused before anything is written) */
  {
    sl_tensor_desc big = desc1(SL_DTYPE_BOOL, ((int64_t)1 << 32) + 3);
    unsigned char q[8 + 4 + 1];
    void *out = NULL;
    put64(q, 1);
    put32(q + 8, 7);
    q[12] = 1;
    CHECK_EQ_INT(sl_codec_decode("sparse_coo", &big, q, sizeof(q), NULL, &out, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "need 17");
    CHECK(out == NULL);
  }
}

/* ---- zstd / zlib ---- */

static void test_compressed_roundtrips(void) {
  sl_codec_spec inners[] = {
      {.kind = SL_CODEC_KIND_RAW},
      {.kind = SL_CODEC_KIND_BFLOAT16},
      {.kind = SL_CODEC_KIND_FLOAT16},
      {.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_FLOAT16},
      {.kind = SL_CODEC_KIND_INT8},
      {.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = -1},
      {.kind = SL_CODEC_KIND_SPARSE_COO},
  };
  const char *inner_names[] = {"raw", "bfloat16", "float16", "cast", "int8", "int8",
                               "sparse_coo"};
  int algo;
  size_t k;
  for (algo = 0; algo < 2; algo++) {
    const char *name = algo ? "zlib" : "zstd";
    for (k = 0; k < NELEM(inners) + 1; k++) {
      int null_inner = k == NELEM(inners);
      sl_codec_spec spec = {.kind = SL_CODEC_KIND_COMPRESSED,
                            .algorithm = algo ? SL_COMPRESS_ZLIB : SL_COMPRESS_ZSTD,
                            .level = algo ? 6 : 3,
                            .inner = null_inner ? NULL : &inners[k]};
      sl_codec *c = make(spec), *plain = NULL;
      sl_tensor_desc d = desc3(SL_DTYPE_FLOAT32, 6, 10, 16);
      size_t n = 960, len, plen, i;
      float *x = malloc(n * 4);
      void *payload, *out, *ppay = NULL, *pout = NULL;
      sl_meta meta, pmeta;
      const sl_meta_value *v;
      for (i = 0; i < n; i++) x[i] = (i % 3) ? 0.0f : (float)rnd_normal();
      out = roundtrip(c, &d, x, &payload, &len, &meta);
      CHECK(strcmp(sl_codec_name(c), name) == 0);
      v = sl_meta_get(&meta, "inner");
      CHECK(v != NULL && strcmp(v->bytes, null_inner ? "raw" : inner_names[k]) == 0);
      /* the result is exactly what the inner codec alone gives */
      if (!null_inner && inners[k].kind != SL_CODEC_KIND_RAW) {
        plain = make(inners[k]);
        pout = roundtrip(plain, &d, x, &ppay, &plen, &pmeta);
        CHECK(out != NULL && pout != NULL && memcmp(out, pout, n * 4) == 0);
        v = sl_meta_get(&meta, "inner_len");
        CHECK(v != NULL && v->type == SL_META_INT && (size_t)v->i == plen);
        for (i = 0; i < pmeta.n; i++) {
          char key[64];
          const sl_meta_value *w;
          snprintf(key, sizeof(key), "inner.%s", pmeta.items[i].key);
          w = sl_meta_get(&meta, key);
          CHECK(w != NULL && w->type == pmeta.items[i].type);
        }
        sl_storage_free(pout);
        sl_storage_free(ppay);
        sl_meta_clear(&pmeta);
        sl_codec_destroy(plain);
      } else {
        CHECK(out != NULL && memcmp(out, x, n * 4) == 0);
        v = sl_meta_get(&meta, "inner_len");
        CHECK(v != NULL && v->i == (int64_t)(n * 4));
      }
      CHECK(len < n * 4);
      if (k == 0 || k == 5 || k == 6) {
        fuzz_payload(name, &d, payload, len, &meta);
        fuzz_meta(name, &d, payload, len, &meta);
      }
      sl_storage_free(out);
      sl_storage_free(payload);
      sl_meta_clear(&meta);
      free(x);
      sl_codec_destroy(c);
    }
  }
  /* every dtype through zstd(raw) and zlib(sparse_coo); empty tensors */
  {
    sl_codec_spec sp = {.kind = SL_CODEC_KIND_SPARSE_COO};
    sl_codec *zs = make((sl_codec_spec){.kind = SL_CODEC_KIND_COMPRESSED,
                                        .algorithm = SL_COMPRESS_ZSTD, .level = 19});
    sl_codec *zl = make((sl_codec_spec){.kind = SL_CODEC_KIND_COMPRESSED,
                                        .algorithm = SL_COMPRESS_ZLIB, .level = 0, .inner = &sp});
    for (k = 0; k < NELEM(all_dtypes); k++) {
      sl_tensor_desc d = desc1(all_dtypes[k], 77), e = desc3(all_dtypes[k], 0, 4, 4);
      size_t nb = desc_bytes(&d);
      void *x = malloc(nb), *o;
      fill_random(all_dtypes[k], x, 77, 0.5);
      o = roundtrip(zs, &d, x, NULL, NULL, NULL);
      CHECK(o != NULL && memcmp(o, x, nb) == 0);
      sl_storage_free(o);
      o = roundtrip(zl, &d, x, NULL, NULL, NULL);
      CHECK(o != NULL && memcmp(o, x, nb) == 0);
      sl_storage_free(o);
      o = roundtrip(zs, &e, NULL, NULL, NULL, NULL);
      CHECK(o != NULL);
      sl_storage_free(o);
      o = roundtrip(zl, &e, NULL, NULL, NULL, NULL);
      CHECK(o != NULL);
      sl_storage_free(o);
      free(x);
    }
    sl_codec_destroy(zs);
    sl_codec_destroy(zl);
  }
  /* an inner codec that does not take the dtype: refused at encode */
  {
    sl_codec_spec bf = {.kind = SL_CODEC_KIND_BFLOAT16};
    sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_COMPRESSED,
                                       .algorithm = SL_COMPRESS_ZSTD, .level = 1, .inner = &bf});
    sl_tensor_desc d = desc1(SL_DTYPE_INT32, 4);
    int32_t x[4] = {1, 2, 3, 4};
    void *p = NULL;
    size_t len;
    sl_meta meta = {0};
    sl_err err;
    CHECK_EQ_INT(sl_codec_encode(c, &d, x, 16, &p, &len, &meta, &err), SL_EINVAL);
    CHECK_EQ_INT(meta.n, 0);
    sl_codec_destroy(c);
  }
}

/* Decompression bombs: payloads that would decompress past what the shape
 * declares are refused, without allocating more than the shape's size. */
static void test_compressed_bombs(void) {
  enum { BIG = 8 << 20, SMALL = 1 << 20 };
  unsigned char *zeros = calloc(1, BIG);
  size_t cap = ZSTD_compressBound(BIG);
  unsigned char *zbuf = malloc(cap);
  size_t zlen = ZSTD_compress(zbuf, cap, zeros, BIG, 3);
  uLongf zl_len = compressBound(BIG);
  unsigned char *zlbuf = malloc(zl_len);
  sl_tensor_desc small = desc1(SL_DTYPE_UINT8, SMALL);
  sl_meta m = {0};
  sl_err err;
  CHECK(!ZSTD_isError(zlen));
  CHECK_EQ_INT(compress2(zlbuf, &zl_len, zeros, BIG, 9), Z_OK);

  /* 1. inner_len honest (8 MiB) but above the shape's 1 MiB: refused before
   * anything is allocated */
  sl_meta_add_string(&m, "inner", "raw");
  sl_meta_add_int(&m, "inner_len", BIG);
  CHECK_EQ_INT(decode_exact("zstd", &small, zbuf, zlen, &m, 0, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "inner_len");
  CHECK_EQ_INT(decode_exact("zlib", &small, zlbuf, zl_len, &m, 0, &err), SL_EINVAL);
  sl_meta_clear(&m);

  /* 2. inner_len lies (1 MiB, as the shape says) about an 8 MiB stream */
  sl_meta_add_string(&m, "inner", "raw");
  sl_meta_add_int(&m, "inner_len", SMALL);
  CHECK_EQ_INT(decode_exact("zstd", &small, zbuf, zlen, &m, 0, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "declares");
  CHECK_EQ_INT(decode_exact("zlib", &small, zlbuf, zl_len, &m, 0, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "past");

  /* 3. zstd: a frame that does not declare its size */
  {
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    ZSTD_inBuffer in = {zeros, BIG, 0};
    ZSTD_outBuffer out = {zbuf, cap, 0};
    size_t r;
    ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0);
    do {
      r = ZSTD_compressStream2(cc, &out, &in, ZSTD_e_end);
    } while (r != 0 && !ZSTD_isError(r));
    CHECK(!ZSTD_isError(r));
    ZSTD_freeCCtx(cc);
    CHECK_EQ_INT(decode_exact("zstd", &small, zbuf, out.pos, &m, 0, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "does not declare");
  }

  /* 4. zstd: two frames, the first declaring exactly the shape's size */
  {
    size_t a = ZSTD_compress(zbuf, cap, zeros, SMALL, 1);
    size_t b = ZSTD_compress(zbuf + a, cap - a, zeros, SMALL, 1);
    CHECK(!ZSTD_isError(a) && !ZSTD_isError(b));
    CHECK_EQ_INT(decode_exact("zstd", &small, zbuf, a, &m, 0, &err), SL_OK);
    CHECK_EQ_INT(decode_exact("zstd", &small, zbuf, a + b, &m, 0, &err), SL_EINVAL);
    /* trailing garbage after a valid frame */
    zbuf[a] = 0x55;
    CHECK_EQ_INT(decode_exact("zstd", &small, zbuf, a + 1, &m, 0, &err), SL_EINVAL);
  }

  /* 5. zlib: a valid stream followed by more bytes; a stream that ends short */
  {
    uLongf l1 = compressBound(SMALL);
    unsigned char *z1 = malloc(l1 + 1);
    CHECK_EQ_INT(compress2(z1, &l1, zeros, SMALL, 1), Z_OK);
    CHECK_EQ_INT(decode_exact("zlib", &small, z1, l1, &m, 0, &err), SL_OK);
    z1[l1] = 0;
    CHECK_EQ_INT(decode_exact("zlib", &small, z1, l1 + 1, &m, 0, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "follow");
    l1 = compressBound(SMALL);
    CHECK_EQ_INT(compress2(z1, &l1, zeros, SMALL / 2, 1), Z_OK);
    CHECK_EQ_INT(decode_exact("zlib", &small, z1, l1, &m, 0, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "ends after");
    /* every cut inside the trailing Adler-32 checksum: all the data is there,
     * the stream is truncated (not "decompresses past") */
    l1 = compressBound(SMALL);
    CHECK_EQ_INT(compress2(z1, &l1, zeros, SMALL, 1), Z_OK);
    for (size_t cut = 1; cut <= 4; cut++) {
      CHECK_EQ_INT(decode_exact("zlib", &small, z1, l1 - cut, &m, 0, &err), SL_EINVAL);
      CHECK_CONTAINS(err.msg, "truncated");
      CHECK(strstr(err.msg, "past") == NULL);
    }
    free(z1);
  }
  sl_meta_clear(&m);

  /* 6. an inner codec's bound: bfloat16 payloads are exactly 2 bytes per element */
  {
    sl_tensor_desc f = desc1(SL_DTYPE_FLOAT32, SMALL / 4);
    sl_meta_add_string(&m, "inner", "bfloat16");
    sl_meta_add_int(&m, "inner_len", SMALL);
    CHECK_EQ_INT(decode_exact("zstd", &f, zbuf, zlen, &m, 0, &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "at most");
    sl_meta_clear(&m);
    /* sparse_coo: bounded by 8 + numel * (4 + itemsize) */
    sl_meta_add_string(&m, "inner", "sparse_coo");
    sl_meta_add_int(&m, "inner_len", 8 + (SMALL / 4) * 8 + 1);
    CHECK_EQ_INT(decode_exact("zlib", &f, zlbuf, zl_len, &m, 0, &err), SL_EINVAL);
    sl_meta_clear(&m);
    /* a negative inner_len; an inner codec that cannot be inner */
    sl_meta_add_string(&m, "inner", "raw");
    sl_meta_add_int(&m, "inner_len", -1);
    CHECK_EQ_INT(decode_exact("zstd", &f, zbuf, zlen, &m, 0, &err), SL_EINVAL);
    sl_meta_clear(&m);
    sl_meta_add_string(&m, "inner", "zstd");
    sl_meta_add_int(&m, "inner_len", 16);
    CHECK_EQ_INT(decode_exact("zstd", &f, zbuf, zlen, &m, 0, &err), SL_EINVAL);
    sl_meta_clear(&m);
    sl_meta_add_string(&m, "inner", "nope");
    sl_meta_add_int(&m, "inner_len", 16);
    CHECK_EQ_INT(decode_exact("zlib", &f, zbuf, zlen, &m, 0, &err), SL_EINVAL);
    sl_meta_clear(&m);
    sl_meta_add_string(&m, "inner", "float16");
    sl_meta_add_int(&m, "inner_len", 16);
    {
      sl_tensor_desc i32 = desc1(SL_DTYPE_INT32, 8);
      CHECK_EQ_INT(decode_exact("zlib", &i32, zbuf, zlen, &m, 0, &err), SL_EINVAL);
    }
    sl_meta_clear(&m);
  }
  free(zeros);
  free(zbuf);
  free(zlbuf);
}

/* Many threads may share one codec (it is immutable): encode/decode from
 * several threads at once (a smoke test; run under TSan by hand). */

static void *thread_body(void *arg) {
  const sl_codec *c = arg;
  sl_tensor_desc d = desc1(SL_DTYPE_FLOAT32, 4096);
  float *x = malloc(4096 * 4);
  int i, bad = 0;
  for (i = 0; i < 4096; i++) x[i] = (float)(i % 17) - 8.0f;
  for (i = 0; i < 20; i++) {
    void *p = NULL, *o = NULL;
    size_t len;
    sl_meta m = {0};
    sl_err err;
    if (sl_codec_encode(c, &d, x, 4096 * 4, &p, &len, &m, &err) != SL_OK ||
        sl_codec_decode(sl_codec_name(c), &d, p, len, &m, &o, &err) != SL_OK ||
        memcmp(o, x, 4096 * 4) != 0) {
      bad++;
    }
    sl_storage_free(p);
    sl_storage_free(o);
    sl_meta_clear(&m);
  }
  free(x);
  return (void *)(intptr_t)bad;
}

static void test_threads_share_codec(void) {
  sl_codec_spec sp = {.kind = SL_CODEC_KIND_SPARSE_COO};
  sl_codec *c = make((sl_codec_spec){.kind = SL_CODEC_KIND_COMPRESSED,
                                     .algorithm = SL_COMPRESS_ZSTD, .level = 3, .inner = &sp});
  pthread_t th[4];
  int i;
  void *r;
  for (i = 0; i < 4; i++) pthread_create(&th[i], NULL, thread_body, c);
  for (i = 0; i < 4; i++) {
    pthread_join(th[i], &r);
    CHECK(r == NULL);
  }
  sl_codec_destroy(c);
}


/* ---- the codec table: a custom codec (as the Python binding registers its
 * trampolines), the set of custom codecs, bounds and unknown names ---- */

typedef struct xor_user {
  int frees;
  int decode_extra; /* bytes a misbehaving decoder adds to its output */
} xor_user;

static int xor_accepts(void *user, sl_dtype dtype) {
  (void)user;
  return dtype == SL_DTYPE_UINT8 || dtype == SL_DTYPE_FLOAT32;
}

static int xor_encode(void *user, const sl_tensor_desc *desc, const void *data, size_t nbytes,
                      sl_tensor_desc *wire, void **payload, size_t *payload_len, sl_meta *meta,
                      sl_err *err) {
  uint8_t *out = NULL;
  (void)user;
  (void)desc;
  if (sl_storage_alloc(nbytes, (void **)&out) != SL_OK) {
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "oom");
  }
  for (size_t i = 0; i < nbytes; i++) out[i] = ((const uint8_t *)data)[i] ^ 0x5A;
  wire->ndim = 1; /* the wire declares the bytes, flat */
  wire->shape[0] = (int64_t)(nbytes / sl_dtype_itemsize(desc->dtype));
  *payload = out;
  *payload_len = nbytes;
  return sl_meta_add_int(meta, "k", 0x5A);
}

static int xor_bound(void *user, const sl_tensor_desc *wire, const sl_meta *meta, size_t *bound,
                     sl_err *err) {
  (void)user;
  (void)meta;
  (void)err;
  return sl_desc_nbytes(wire, bound);
}

static int xor_decode(void *user, const sl_tensor_desc *wire, void *payload, size_t payload_len,
                      const sl_meta *meta, sl_tensor_desc *out_desc, void **out, size_t *out_len,
                      sl_err *err) {
  xor_user *u = user;
  uint8_t *buf = NULL;
  size_t n = payload_len + (size_t)u->decode_extra;
  (void)meta;
  if (payload_len == 3) {
    sl_storage_free(payload);
    return sl_err_set(err, SL_ECODEC, SL_STATUS_INVALID_ARGUMENT, "codec 'xor': three bytes");
  }
  if (sl_storage_alloc(n, (void **)&buf) != SL_OK) {
    sl_storage_free(payload);
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "oom");
  }
  memset(buf, 0, n);
  for (size_t i = 0; i < payload_len; i++) buf[i] = ((uint8_t *)payload)[i] ^ 0x5A;
  sl_storage_free(payload);
  *out_desc = *wire;
  out_desc->shape[0] += u->decode_extra / (int64_t)sl_dtype_itemsize(wire->dtype);
  *out = buf;
  *out_len = n;
  return SL_OK;
}

static void xor_free(void *user) { ((xor_user *)user)->frees++; }

static const sl_codec_funcs xor_funcs = {xor_accepts, xor_encode, xor_bound, xor_decode,
                                         xor_free};

static void *copy_payload(const void *p, size_t n) {
  void *out = NULL;
  if (sl_storage_alloc(n, &out) != SL_OK) return NULL;
  memcpy(out, p, n);
  return out;
}

static void test_custom_codec_table(void) {
  xor_user u = {0, 0};
  sl_codec *c = NULL, *shadow = NULL;
  sl_codecs *set = NULL, *dup = NULL;
  sl_err e;
  float x[6] = {1, 2, 3, 4, 5, 6};
  sl_tensor_desc d = {SL_DTYPE_FLOAT32, 2, {2, 3}}, wire, od;
  void *payload = NULL, *out = NULL;
  size_t plen = 0, olen = 0, bound = 0;
  sl_meta meta = {NULL, 0};

  sl_err_clear(&e);
  CHECK_EQ_INT(sl_codec_create_custom("xor", &xor_funcs, &u, &c, &e), SL_OK);
  CHECK(sl_codec_is_custom(c) && !sl_codec_is_raw(c));
  CHECK(strcmp(sl_codec_name(c), "xor") == 0);
  CHECK(sl_codec_accepts(c, SL_DTYPE_FLOAT32) && !sl_codec_accepts(c, SL_DTYPE_INT64));
  /* a built-in's name is refused, and the user pointer is given back */
  CHECK_EQ_INT(sl_codec_create_custom("float16", &xor_funcs, &u, &shadow, &e), SL_EINVAL);
  CHECK(shadow == NULL && u.frees == 1);
  CHECK_CONTAINS(e.msg, "built-in");
  /* encode through the table: the wire may declare another shape */
  CHECK_EQ_INT(sl_codec_encode_as(c, &d, x, sizeof(x), &wire, &payload, &plen, &meta, &e), SL_OK);
  CHECK(plen == sizeof(x) && wire.ndim == 1 && wire.shape[0] == 6 && wire.dtype == d.dtype);
  CHECK(sl_meta_get(&meta, "k") != NULL);
  CHECK_EQ_INT(sl_codec_encode_as(c, &(sl_tensor_desc){SL_DTYPE_INT64, 1, {1}}, x, 8, &od,
                                  &out, &olen, &(sl_meta){NULL, 0}, &e),
               SL_EINVAL); /* a dtype it does not take */
  /* a set of custom codecs: duplicates refused, names listed after the built-ins */
  CHECK_EQ_INT(sl_codecs_create(&c, 1, &set, &e), SL_OK);
  CHECK_EQ_INT(sl_codecs_create((sl_codec *[]){c, c}, 2, &dup, &e), SL_EINVAL);
  CHECK(dup == NULL);
  CHECK_CONTAINS(sl_codecs_names(set), "sparse_coo, xor");
  CHECK(sl_codecs_find(set, "xor") == c && sl_codecs_find(set, "raw") == NULL);
  sl_codec_destroy(c); /* the set keeps its own reference */
  CHECK_EQ_INT(u.frees, 1);
  CHECK_EQ_INT(sl_codecs_bound(set, "xor", &wire, &meta, &bound, &e), SL_OK);
  CHECK(bound == sizeof(x));
  /* decode: consumes the payload, gives a new tensor */
  CHECK_EQ_INT(sl_codecs_decode(set, "xor", &wire, payload, plen, &meta, &od, &out, &olen, &e),
               SL_OK);
  CHECK(olen == sizeof(x) && memcmp(out, x, sizeof(x)) == 0 && od.shape[0] == 6);
  sl_storage_free(out);
  /* a decoder's own failure, and one that produces more than its bound */
  CHECK_EQ_INT(sl_codecs_decode(set, "xor", &wire, copy_payload("abc", 3), 3, &meta, &od, &out,
                                &olen, &e),
               SL_ECODEC);
  CHECK(out == NULL);
  CHECK_CONTAINS(e.msg, "three bytes");
  u.decode_extra = 8;
  CHECK_EQ_INT(sl_codecs_decode(set, "xor", &wire, copy_payload(x, sizeof(x)), sizeof(x), &meta,
                                &od, &out, &olen, &e),
               SL_ECODEC);
  CHECK(out == NULL);
  CHECK_CONTAINS(e.msg, "more than the 24 bytes");
  /* unknown names list what is known; built-ins decode through the same call */
  CHECK_EQ_INT(sl_codecs_decode(set, "nope", &wire, copy_payload(x, 4), 4, &meta, &od, &out,
                                &olen, &e),
               SL_ECODEC);
  CHECK_CONTAINS(e.msg, "unknown codec 'nope'; known codecs: raw, ");
  CHECK_CONTAINS(e.msg, "xor");
  CHECK_EQ_INT(sl_codecs_decode(NULL, "raw", &wire, copy_payload(x, sizeof(x)), sizeof(x), NULL,
                                &od, &out, &olen, &e),
               SL_OK);
  CHECK(olen == sizeof(x) && memcmp(out, x, sizeof(x)) == 0);
  sl_storage_free(out);
  sl_meta_clear(&meta);
  sl_codecs_unref(set); /* the last reference: free_user runs once */
  CHECK_EQ_INT(u.frees, 2);
}

int main(void) {
  RUN(test_meta_helpers);
  RUN(test_custom_codec_table);
  RUN(test_builtin_names);
  RUN(test_create_names_accepts);
  RUN(test_create_bad_specs);
  RUN(test_encode_errors);
  RUN(test_decode_errors);
  RUN(test_raw_all_dtypes);
  RUN(test_half_edges_match_torch);
  RUN(test_half_hashes_match_torch);
  RUN(test_vector_matches_scalar);
  RUN(test_half_codecs);
  RUN(test_cast_all_pairs);
  RUN(test_int8_error_bound);
  RUN(test_int8_constants_and_zeros);
  RUN(test_int8_nonfinite_refused);
  RUN(test_int8_corrupt);
  RUN(test_sparse_all_dtypes);
  RUN(test_sparse_corrupt);
  RUN(test_compressed_roundtrips);
  RUN(test_compressed_bombs);
  RUN(test_threads_share_codec);
  sl_storage_pool_trim();
  return sl_test_done("test_codec");
}
