/* codec_internal.h: private to the codec module (codec.c, codec_convert.c,
 * codec_quant.c, codec_compress.c, codec_sparse.c); not a public header.
 *
 * The public API is codec.h. This header holds the codec object, the per-codec
 * entry points the dispatcher in codec.c calls, and helpers they share.
 *
 * Calling conventions of the per-codec entry points:
 *  - encode: `desc` is valid, `nbytes` is the tensor's byte count (already checked
 *    against desc), `numel` its element count, the dtype is one the codec accepts,
 *    `meta` is empty. On success *payload is sl_storage owned by the caller holding
 *    *payload_len bytes (the storage may be larger than that). On failure nothing
 *    is allocated and *payload is NULL; `meta` may hold entries the caller clears.
 *  - payload_max: the longest payload a valid encoding of `desc` with metadata
 *    `meta` can have (exact for every codec but sparse_coo, where it is an upper
 *    bound). Validates the metadata it reads. Used by the compressed codecs to
 *    bound decompression.
 *  - decode: writes exactly `nbytes` bytes of tensor to `out` (caller-allocated,
 *    owned by the caller), reading no more than `payload_len` bytes of `payload`.
 *    Every check fails with SL_EINVAL / INVALID_ARGUMENT naming the codec.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_CODEC_INTERNAL_H
#define SL_CODEC_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"

struct sl_codec {
  sl_codec_spec spec;   /* built-ins: a copy; spec.inner points at inner->spec, or is NULL */
  sl_codec *inner;      /* COMPRESSED: the inner encoder (owned), NULL for raw */
  int refs;             /* references (atomic builtins); the last destroy frees */
  char *name;           /* custom codecs: the wire name (malloc'd); NULL for built-ins */
  sl_codec_funcs funcs; /* the codec's table (built-ins: their C functions) */
  void *user;           /* given to every function (built-ins: the codec itself) */
};

/* Fill `err` with "codec '<name>': <message>" and return `status`. The gRPC code
 * is RESOURCE_EXHAUSTED for SL_ENOMEM, INVALID_ARGUMENT otherwise. */
int sl__codec_fail(sl_err *err, int status, const char *codec, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Element count of a valid descriptor (the byte count divided by the itemsize). */
size_t sl__desc_numel(const sl_tensor_desc *desc);

/* 1 for float16, bfloat16, float32, float64. */
int sl__dtype_is_float(sl_dtype dt);

/* Look up `key` in `meta` (which may be NULL) and check its type; fails with
 * SL_EINVAL naming the codec and the key when absent or of another type. */
int sl__meta_need(const sl_meta *meta, const char *codec, const char *key, sl_meta_type type,
                  const sl_meta_value **out, sl_err *err);

/* Overflow-checked size arithmetic: 0 on success, 1 on overflow. */
static inline int sl__mul_size(size_t a, size_t b, size_t *out) {
  return __builtin_mul_overflow(a, b, out);
}
static inline int sl__add_size(size_t a, size_t b, size_t *out) {
  return __builtin_add_overflow(a, b, out);
}

/* ---- per-codec entry points ---- */

typedef int (*sl__encode_fn)(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                             const void *data, size_t nbytes, void **payload,
                             size_t *payload_len, sl_meta *meta, sl_err *err);
typedef int (*sl__payload_max_fn)(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                                  const sl_meta *meta, size_t *max_len, sl_err *err);
typedef int (*sl__decode_fn)(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                             const void *payload, size_t payload_len, const sl_meta *meta,
                             void *out, sl_err *err);

/* codec.c: raw */
int sl__raw_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel, const void *data,
                   size_t nbytes, void **payload, size_t *payload_len, sl_meta *meta, sl_err *err);
int sl__raw_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                        const sl_meta *meta, size_t *max_len, sl_err *err);
int sl__raw_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                   size_t payload_len, const sl_meta *meta, void *out, sl_err *err);

/* codec_convert.c: cast, float16, bfloat16 */
int sl__cast_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                    const void *data, size_t nbytes, void **payload, size_t *payload_len,
                    sl_meta *meta, sl_err *err);
int sl__cast_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                         const sl_meta *meta, size_t *max_len, sl_err *err);
int sl__cast_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                    size_t payload_len, const sl_meta *meta, void *out, sl_err *err);
int sl__half_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                    const void *data, size_t nbytes, void **payload, size_t *payload_len,
                    sl_meta *meta, sl_err *err);
int sl__half_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                         const sl_meta *meta, size_t *max_len, sl_err *err);
int sl__f16_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                   size_t payload_len, const sl_meta *meta, void *out, sl_err *err);
int sl__bf16_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                    size_t payload_len, const sl_meta *meta, void *out, sl_err *err);

/* codec_quant.c: int8 */
int sl__int8_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                    const void *data, size_t nbytes, void **payload, size_t *payload_len,
                    sl_meta *meta, sl_err *err);
int sl__int8_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                         const sl_meta *meta, size_t *max_len, sl_err *err);
int sl__int8_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                    size_t payload_len, const sl_meta *meta, void *out, sl_err *err);

/* codec_compress.c: zstd, zlib (decode is by name, so it takes the algorithm) */
int sl__compress_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                        const void *data, size_t nbytes, void **payload, size_t *payload_len,
                        sl_meta *meta, sl_err *err);
int sl__compress_decode(sl_compression algorithm, const sl_tensor_desc *desc, size_t numel,
                        size_t nbytes, const void *payload, size_t payload_len,
                        const sl_meta *meta, void *out, sl_err *err);

/* codec_sparse.c: sparse_coo */
int sl__sparse_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                      const void *data, size_t nbytes, void **payload, size_t *payload_len,
                      sl_meta *meta, sl_err *err);
int sl__sparse_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                           const sl_meta *meta, size_t *max_len, sl_err *err);
int sl__sparse_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                      const void *payload, size_t payload_len, const sl_meta *meta, void *out,
                      sl_err *err);

/* ---- codec.c: lookup by wire name, for the compressed codecs' inner codec ---- */

typedef struct sl__codec_entry {
  const char *name;
  sl_codec_kind kind;
  sl__payload_max_fn payload_max; /* NULL for zstd/zlib (they cannot be inner codecs) */
  sl__decode_fn decode;           /* NULL for zstd/zlib (decoded by sl__compress_decode) */
} sl__codec_entry;

/* The built-in codec named `name`, or NULL. */
const sl__codec_entry *sl__codec_lookup(const char *name);

/* Whether a decoder of `kind` takes tensors of `dtype` (`meta` gives the inner
 * codec of the compressed ones; for those only the dtype's validity is checked
 * here, the inner decoder checks the rest). */
int sl__codec_kind_accepts(sl_codec_kind kind, sl_dtype dtype);

/* ---- codec_convert.c: kernels and element helpers ---- */

/* Scalar reference kernels (any CPU) and the AVX2+F16C ones (call only when
 * sl__cpu_has_avx2_f16c() is 1). Both give the same bits for every input. */
void sl__f32_to_f16_scalar(const float *in, uint16_t *out, size_t n);
void sl__f16_to_f32_scalar(const uint16_t *in, float *out, size_t n);
void sl__f32_to_bf16_scalar(const float *in, uint16_t *out, size_t n);
void sl__bf16_to_f32_scalar(const uint16_t *in, float *out, size_t n);
void sl__f32_to_f16_avx2(const float *in, uint16_t *out, size_t n);
void sl__f16_to_f32_avx2(const uint16_t *in, float *out, size_t n);
void sl__f32_to_bf16_avx2(const float *in, uint16_t *out, size_t n);
void sl__bf16_to_f32_avx2(const uint16_t *in, float *out, size_t n);
int sl__cpu_has_avx2_f16c(void);

uint16_t sl__f32_to_f16_one(float f);
float sl__f16_to_f32_one(uint16_t h);
uint16_t sl__f32_to_bf16_one(float f);
float sl__bf16_to_f32_one(uint16_t b);

/* Convert `n` elements between two float dtypes (float16, bfloat16, float32,
 * float64), as PyTorch's tensor.to(dtype) does (double to half/bfloat16 goes
 * through float32, as PyTorch's does). `in` and `out` must not overlap. */
void sl__cast_floats(sl_dtype from, const void *in, sl_dtype to, void *out, size_t n);

#endif /* SL_CODEC_INTERNAL_H */
