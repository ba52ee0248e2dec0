/* codec_convert.c: float32 <-> float16 / bfloat16 conversion kernels, the
 * float dtype casts, and the "cast", "float16" and "bfloat16" codecs.
 *
 * Bit-exactness with PyTorch 2.13 (checked against torch on this project's
 * x86-64 CPU; the constants are in tests/c/test_codec.c):
 *  - float32 -> float16: round to nearest even; overflow (|x| >= 65520) gives
 *    +-inf; float32 values below half's range round to subnormals or +-0; NaN
 *    keeps its sign and becomes quiet with the top 10 payload bits kept:
 *    sign | 0x7E00 | (mantissa >> 13). This is what F16C's VCVTPS2PH does and what
 *    tensor.half() gives on every path.
 *  - float16 -> float32: exact; NaN keeps its sign and payload and is quietened:
 *    sign | 0x7FC00000 | (mantissa << 13) (VCVTPH2PS). tensor.float() gives this
 *    on its vectorized body; torch's scalar path (0-dim tensors and the last
 *    n % 8 elements) gives 0x7FFFFFFF for every NaN instead, which no one can
 *    match without copying torch's loop blocking.
 *  - float32 -> bfloat16: round to nearest even on the upper 16 bits (+-inf and
 *    overflow to inf follow), subnormals kept. Every NaN becomes SL__BF16_NAN,
 *    0xFFFF: that is what tensor.bfloat16() gives on a contiguous tensor on AVX2
 *    and AVX-512 CPUs (torch's Vectorized<BFloat16> conversion blends in
 *    0xffff). torch's scalar c10::BFloat16 path (0-dim or non-contiguous
 *    tensors, or ATEN_CPU_CAPABILITY=default) gives 0x7FC0 instead.
 *  - bfloat16 -> float32: the 16 bits shifted up (NaN payloads kept as they are).
 * The scalar kernels work on integers only, so neither the rounding mode nor
 * FTZ/DAZ changes their results, and they give the same bits as the vector ones
 * (tests/c/test_codec.c compares them; bench_codec --exhaustive does all 2^32).
 *
 * The vector kernels use F16C (VCVTPS2PH / VCVTPH2PS) and AVX2, compiled with
 * target attributes (no -mavx2 needed) and chosen at run time with
 * __builtin_cpu_supports; other CPUs and architectures use the scalar kernels.
 *
 * Payloads: "float16" / "bfloat16": numel 2-byte values; "cast": numel values of
 * the wire dtype named by the "wire_dtype" string metadata. Little-endian.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "codec_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define SL__HAVE_X86 1
#else
#define SL__HAVE_X86 0
#endif

/* The bfloat16 every float32 NaN converts to (see the top of the file). */
#define SL__BF16_NAN 0xFFFFu

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

/* ---- scalar kernels ---- */

static inline uint16_t f32_to_f16_bits(uint32_t x) {
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) { /* inf or NaN */
    if (a == 0x7F800000u) return (uint16_t)(sign | 0x7C00u);
    return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  }
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520: rounds to inf */
  if (a >= 0x38800000u) {                                    /* a half normal: >= 2^-14 */
    uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);              /* round to nearest even */
    return (uint16_t)(sign | ((r - (112u << 23)) >> 13));
  }
  if (a <= 0x33000000u) return (uint16_t)sign; /* <= 2^-25: rounds to zero (ties to even) */
  {
    /* a half subnormal (or the smallest normal, after rounding up) */
    uint32_t e = a >> 23; /* 102..112 */
    uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14..24 */
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
}

static inline uint32_t f16_to_f32_bits(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = ((uint32_t)h >> 10) & 0x1Fu;
  uint32_t m = (uint32_t)h & 0x3FFu;
  if (e == 0x1Fu) {
    if (m == 0) return sign | 0x7F800000u;
    return sign | 0x7FC00000u | (m << 13);
  }
  if (e == 0) {
    uint32_t p;
    if (m == 0) return sign;
    p = 31u - (uint32_t)__builtin_clz(m); /* highest set bit: 0..9 */
    return sign | ((p + 103u) << 23) | ((m << (23u - p)) & 0x7FFFFFu);
  }
  return sign | ((e + 112u) << 23) | (m << 13);
}

static inline uint16_t f32_to_bf16_bits(uint32_t x) {
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)SL__BF16_NAN;
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

uint16_t sl__f32_to_f16_one(float f) { return f32_to_f16_bits(f32_bits(f)); }
float sl__f16_to_f32_one(uint16_t h) { return f32_from_bits(f16_to_f32_bits(h)); }
uint16_t sl__f32_to_bf16_one(float f) { return f32_to_bf16_bits(f32_bits(f)); }
float sl__bf16_to_f32_one(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

/* The kernels load and store through memcpy, so that a payload at any address
 * (a slice of a received message) is read without undefined behaviour; the
 * compiler makes plain loads of them. */
static inline uint32_t ld32(const void *p) {
  uint32_t v;
  memcpy(&v, p, sizeof(v));
  return v;
}
static inline uint16_t ld16(const void *p) {
  uint16_t v;
  memcpy(&v, p, sizeof(v));
  return v;
}
static inline void st32(void *p, uint32_t v) { memcpy(p, &v, sizeof(v)); }
static inline void st16(void *p, uint16_t v) { memcpy(p, &v, sizeof(v)); }

void sl__f32_to_f16_scalar(const float *in, uint16_t *out, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) st16(out + i, f32_to_f16_bits(ld32(in + i)));
}

void sl__f16_to_f32_scalar(const uint16_t *in, float *out, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) st32(out + i, f16_to_f32_bits(ld16(in + i)));
}

void sl__f32_to_bf16_scalar(const float *in, uint16_t *out, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) st16(out + i, f32_to_bf16_bits(ld32(in + i)));
}

void sl__bf16_to_f32_scalar(const uint16_t *in, float *out, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) st32(out + i, (uint32_t)ld16(in + i) << 16);
}

/* ---- AVX2 + F16C kernels ---- */

#if SL__HAVE_X86

int sl__cpu_has_avx2_f16c(void) {
  /* libgcc fills the CPU model in a constructor, before any of our code runs;
   * the avx2 check includes the OS's support for the AVX register state. F16C is
   * read from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not
   * know "f16c", and the fuzz targets are built with clang. */
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || (c & bit_F16C) == 0) return 0;
  return __builtin_cpu_supports("avx2");
}

__attribute__((target("avx2,f16c"))) void sl__f32_to_f16_avx2(const float *in, uint16_t *out,
                                                               size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 a = _mm256_loadu_ps(in + i);
    __m256 b = _mm256_loadu_ps(in + i + 8);
    __m256 c = _mm256_loadu_ps(in + i + 16);
    __m256 d = _mm256_loadu_ps(in + i + 24);
    __m256i ab = _mm256_set_m128i(_mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT),
                                  _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    __m256i cd = _mm256_set_m128i(_mm256_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT),
                                  _mm256_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT));
    _mm256_storeu_si256((__m256i *)(void *)(out + i), ab);
    _mm256_storeu_si256((__m256i *)(void *)(out + i + 16), cd);
  }
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128((__m128i *)(void *)(out + i), h);
  }
  sl__f32_to_f16_scalar(in + i, out + i, n - i);
}

__attribute__((target("avx2,f16c"))) void sl__f16_to_f32_avx2(const uint16_t *in, float *out,
                                                               size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i ab = _mm256_loadu_si256((const __m256i *)(const void *)(in + i));
    __m256i cd = _mm256_loadu_si256((const __m256i *)(const void *)(in + i + 16));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm256_castsi256_si128(ab)));
    _mm256_storeu_ps(out + i + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(ab, 1)));
    _mm256_storeu_ps(out + i + 16, _mm256_cvtph_ps(_mm256_castsi256_si128(cd)));
    _mm256_storeu_ps(out + i + 24, _mm256_cvtph_ps(_mm256_extracti128_si256(cd, 1)));
  }
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  sl__f16_to_f32_scalar(in + i, out + i, n - i);
}

__attribute__((target("avx2,f16c"))) static inline __m256i bf16_round8(__m256 f) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7FFF);
  const __m256i nan = _mm256_set1_epi32((int)SL__BF16_NAN);
  __m256i x = _mm256_castps_si256(f);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias), lsb), 16);
  __m256 isnan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, nan, _mm256_castps_si256(isnan));
}

__attribute__((target("avx2,f16c"))) void sl__f32_to_bf16_avx2(const float *in, uint16_t *out,
                                                                size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i a = bf16_round8(_mm256_loadu_ps(in + i));
    __m256i b = bf16_round8(_mm256_loadu_ps(in + i + 8));
    /* packus works per 128-bit lane: a0-3 b0-3 | a4-7 b4-7; put the quads back */
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256((__m256i *)(void *)(out + i), p);
  }
  sl__f32_to_bf16_scalar(in + i, out + i, n - i);
}

__attribute__((target("avx2,f16c"))) void sl__bf16_to_f32_avx2(const uint16_t *in, float *out,
                                                                size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(in + i));
    __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16);
    __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16);
    _mm256_storeu_si256((__m256i *)(void *)(out + i), lo);
    _mm256_storeu_si256((__m256i *)(void *)(out + i + 8), hi);
  }
  sl__bf16_to_f32_scalar(in + i, out + i, n - i);
}

#else /* !SL__HAVE_X86 */

int sl__cpu_has_avx2_f16c(void) { return 0; }
void sl__f32_to_f16_avx2(const float *in, uint16_t *out, size_t n) {
  sl__f32_to_f16_scalar(in, out, n);
}
void sl__f16_to_f32_avx2(const uint16_t *in, float *out, size_t n) {
  sl__f16_to_f32_scalar(in, out, n);
}
void sl__f32_to_bf16_avx2(const float *in, uint16_t *out, size_t n) {
  sl__f32_to_bf16_scalar(in, out, n);
}
void sl__bf16_to_f32_avx2(const uint16_t *in, float *out, size_t n) {
  sl__bf16_to_f32_scalar(in, out, n);
}

#endif

/* ---- public kernels: dispatch ---- */

void sl_f32_to_f16(const float *in, uint16_t *out, size_t n) {
  if (n >= 8 && sl__cpu_has_avx2_f16c()) {
    sl__f32_to_f16_avx2(in, out, n);
  } else {
    sl__f32_to_f16_scalar(in, out, n);
  }
}

void sl_f16_to_f32(const uint16_t *in, float *out, size_t n) {
  if (n >= 8 && sl__cpu_has_avx2_f16c()) {
    sl__f16_to_f32_avx2(in, out, n);
  } else {
    sl__f16_to_f32_scalar(in, out, n);
  }
}

void sl_f32_to_bf16(const float *in, uint16_t *out, size_t n) {
  if (n >= 16 && sl__cpu_has_avx2_f16c()) {
    sl__f32_to_bf16_avx2(in, out, n);
  } else {
    sl__f32_to_bf16_scalar(in, out, n);
  }
}

void sl_bf16_to_f32(const uint16_t *in, float *out, size_t n) {
  if (n >= 16 && sl__cpu_has_avx2_f16c()) {
    sl__bf16_to_f32_avx2(in, out, n);
  } else {
    sl__bf16_to_f32_scalar(in, out, n);
  }
}

/* ---- float dtype casts ---- */

/* float32 -> `to`; in and out do not overlap */
static void from_f32(const float *in, sl_dtype to, void *out, size_t n) {
  size_t i;
  switch (to) {
    case SL_DTYPE_FLOAT16: sl_f32_to_f16(in, out, n); break;
    case SL_DTYPE_BFLOAT16: sl_f32_to_bf16(in, out, n); break;
    case SL_DTYPE_FLOAT32: memcpy(out, in, n * sizeof(float)); break;
    case SL_DTYPE_FLOAT64:
      for (i = 0; i < n; i++) {
        double d = (double)f32_from_bits(ld32(in + i));
        memcpy((char *)out + i * sizeof(d), &d, sizeof(d));
      }
      break;
    default: break;
  }
}

/* `from` -> float32 */
static void to_f32(sl_dtype from, const void *in, float *out, size_t n) {
  size_t i;
  switch (from) {
    case SL_DTYPE_FLOAT16: sl_f16_to_f32(in, out, n); break;
    case SL_DTYPE_BFLOAT16: sl_bf16_to_f32(in, out, n); break;
    case SL_DTYPE_FLOAT32: memcpy(out, in, n * sizeof(float)); break;
    case SL_DTYPE_FLOAT64:
      for (i = 0; i < n; i++) {
        double d;
        memcpy(&d, (const char *)in + i * sizeof(d), sizeof(d));
        st32(out + i, f32_bits((float)d));
      }
      break;
    default: break;
  }
}

void sl__cast_floats(sl_dtype from, const void *in, sl_dtype to, void *out, size_t n) {
  enum { CHUNK = 1024 };
  float tmp[CHUNK];
  size_t done = 0;
  size_t isz_in = sl_dtype_itemsize(from), isz_out = sl_dtype_itemsize(to);
  if (n == 0) return;
  if (from == to) {
    memcpy(out, in, n * isz_in);
  } else if (from == SL_DTYPE_FLOAT32) {
    from_f32(in, to, out, n);
  } else if (to == SL_DTYPE_FLOAT32) {
    to_f32(from, in, out, n);
  } else {
    /* through float32, in chunks (exact when widening; the double rounding of
     * float64 -> float32 -> half/bfloat16 is what PyTorch does too) */
    while (done < n) {
      size_t k = n - done < CHUNK ? n - done : CHUNK;
      to_f32(from, (const char *)in + done * isz_in, tmp, k);
      from_f32(tmp, to, (char *)out + done * isz_out, k);
      done += k;
    }
  }
}

/* ---- "cast" ---- */

static int cast_wire_dtype(const sl_meta *meta, sl_dtype *wire, sl_err *err) {
  const sl_meta_value *v;
  int rc = sl__meta_need(meta, "cast", "wire_dtype", SL_META_STRING, &v, err);
  if (rc != SL_OK) return rc;
  if (v->len == 0 || sl_dtype_from_name(v->bytes, v->len, wire) != SL_OK ||
      !sl__dtype_is_float(*wire)) {
    return sl__codec_fail(err, SL_EINVAL, "cast",
                          "metadata 'wire_dtype' is '%.32s'; it must be float16, bfloat16, "
                          "float32 or float64",
                          v->bytes);
  }
  return SL_OK;
}

int sl__cast_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                    const void *data, size_t nbytes, void **payload, size_t *payload_len,
                    sl_meta *meta, sl_err *err) {
  int status = -1;
  void *buf = NULL;
  sl_dtype wire = c->spec.wire_dtype;
  size_t len = numel * sl_dtype_itemsize(wire); /* <= 4x nbytes: checked below */
  (void)nbytes;
  if (numel > 0 && len / numel != sl_dtype_itemsize(wire)) {
    status = sl__codec_fail(err, SL_EINVAL, "cast", "the payload size overflows");
    goto cleanup;
  }
  if (sl_meta_add_string(meta, "wire_dtype", sl_dtype_name(wire)) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, "cast", "out of memory");
    goto cleanup;
  }
  if (sl_storage_alloc(len, &buf) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, "cast", "cannot allocate %zu bytes", len);
    goto cleanup;
  }
  sl__cast_floats(desc->dtype, data, wire, buf, numel);
  *payload = buf;
  *payload_len = len;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  return status;
}

int sl__cast_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                         const sl_meta *meta, size_t *max_len, sl_err *err) {
  sl_dtype wire;
  int rc;
  (void)desc;
  (void)nbytes;
  rc = cast_wire_dtype(meta, &wire, err);
  if (rc != SL_OK) return rc;
  if (sl__mul_size(numel, sl_dtype_itemsize(wire), max_len)) {
    return sl__codec_fail(err, SL_EINVAL, "cast", "the payload size overflows");
  }
  return SL_OK;
}

int sl__cast_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                    size_t payload_len, const sl_meta *meta, void *out, sl_err *err) {
  size_t need;
  sl_dtype wire;
  int rc = sl__cast_payload_max(desc, numel, nbytes, meta, &need, err);
  if (rc != SL_OK) return rc;
  (void)cast_wire_dtype(meta, &wire, err);
  if (payload_len != need) {
    return sl__codec_fail(err, SL_EINVAL, "cast",
                          "payload has %zu bytes; %zu elements of %s need %zu", payload_len,
                          numel, sl_dtype_name(wire), need);
  }
  sl__cast_floats(wire, payload, desc->dtype, out, numel);
  return SL_OK;
}

/* ---- "float16" and "bfloat16" ---- */

int sl__half_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                    const void *data, size_t nbytes, void **payload, size_t *payload_len,
                    sl_meta *meta, sl_err *err) {
  int status = -1;
  void *buf = NULL;
  size_t len = numel * 2; /* half of nbytes: cannot overflow */
  (void)desc;
  (void)nbytes;
  (void)meta;
  if (sl_storage_alloc(len, &buf) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, sl_codec_name(c), "cannot allocate %zu bytes", len);
    goto cleanup;
  }
  if (c->spec.kind == SL_CODEC_KIND_FLOAT16) {
    sl_f32_to_f16(data, buf, numel);
  } else {
    sl_f32_to_bf16(data, buf, numel);
  }
  *payload = buf;
  *payload_len = len;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  return status;
}

int sl__half_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                         const sl_meta *meta, size_t *max_len, sl_err *err) {
  (void)desc;
  (void)nbytes;
  (void)meta;
  (void)err;
  *max_len = numel * 2; /* the tensor (float32) is 4 * numel bytes: no overflow */
  return SL_OK;
}

static int half_decode(const char *name, int bf16, size_t numel, const void *payload,
                       size_t payload_len, void *out, sl_err *err) {
  if (payload_len != numel * 2) {
    return sl__codec_fail(err, SL_EINVAL, name,
                          "payload has %zu bytes; %zu elements of %s need %zu", payload_len,
                          numel, name, numel * 2);
  }
  if (bf16) {
    sl_bf16_to_f32(payload, out, numel);
  } else {
    sl_f16_to_f32(payload, out, numel);
  }
  return SL_OK;
}

int sl__f16_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                   size_t payload_len, const sl_meta *meta, void *out, sl_err *err) {
  (void)desc;
  (void)nbytes;
  (void)meta;
  return half_decode("float16", 0, numel, payload, payload_len, out, err);
}

int sl__bf16_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                    size_t payload_len, const sl_meta *meta, void *out, sl_err *err) {
  (void)desc;
  (void)nbytes;
  (void)meta;
  return half_decode("bfloat16", 1, numel, payload, payload_len, out, err);
}
