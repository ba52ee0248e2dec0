/* codec.h: the built-in tensor codecs, in C, never touching Python.
 *
 * A codec turns a tensor (descriptor + contiguous bytes) into a payload (bytes on
 * the wire) plus typed metadata, and back. What travels with the payload is the
 * codec's wire name, the tensor's original dtype and shape (the message's dtype
 * and shape fields) and the metadata; decoding needs nothing else, so decoders
 * are stateless functions of (name, desc, payload, metadata): a receiver decodes
 * any built-in codec without being configured for it.
 *
 * Encoders are configured (sl_codec_spec) and immutable once created, so one
 * sl_codec may be used by many threads at once.
 *
 * Every decoder checks everything it reads: a truncated or corrupt payload, a
 * payload that would decompress past the size its shape declares, or metadata of
 * the wrong type fails with SL_EINVAL and an INVALID_ARGUMENT message naming the
 * codec and what was wrong, and allocates no more than the declared size.
 *
 * Ownership: payloads and decoded tensors are storage from sl_storage_alloc()
 * (tensor.h), owned by the caller and freed with sl_storage_free(). Metadata
 * (sl_meta) is owned by the caller and freed with sl_meta_clear().
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_CODEC_H
#define SL_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "sl_common.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- typed metadata (the wire's map<string, MetadataValue>) ---- */

typedef enum sl_meta_type {
  SL_META_DOUBLE = 1,
  SL_META_INT = 2,
  SL_META_STRING = 3,
  SL_META_BYTES = 4,
  SL_META_BOOL = 5
} sl_meta_type;

typedef struct sl_meta_value {
  char *key; /* malloc'd, NUL-terminated */
  sl_meta_type type;
  double d;    /* SL_META_DOUBLE */
  int64_t i;   /* SL_META_INT; SL_META_BOOL (0 or 1) */
  char *bytes; /* SL_META_STRING (NUL-terminated) and SL_META_BYTES; malloc'd */
  size_t len;  /* length of bytes (without the NUL) */
} sl_meta_value;

typedef struct sl_meta {
  sl_meta_value *items; /* malloc'd array */
  size_t n;
} sl_meta;

/* Append a value; the key and bytes are copied. SL_OK or SL_ENOMEM. */
int sl_meta_add_double(sl_meta *m, const char *key, double v);
int sl_meta_add_int(sl_meta *m, const char *key, int64_t v);
int sl_meta_add_bool(sl_meta *m, const char *key, int v);
int sl_meta_add_string(sl_meta *m, const char *key, const char *s);
int sl_meta_add_bytes(sl_meta *m, const char *key, const void *p, size_t len);

/* Look a key up; NULL when absent. */
const sl_meta_value *sl_meta_get(const sl_meta *m, const char *key);

void sl_meta_clear(sl_meta *m);

/* ---- built-in codecs ---- */

typedef enum sl_codec_kind {
  SL_CODEC_KIND_RAW = 0,    /* wire name "raw": the tensor's own bytes (the zero-copy path) */
  SL_CODEC_KIND_CAST,       /* "cast": the tensor cast to wire_dtype on the wire, original dtype restored */
  SL_CODEC_KIND_FLOAT16,    /* "float16": float32 -> IEEE half (round to nearest even) -> float32 */
  SL_CODEC_KIND_BFLOAT16,   /* "bfloat16": float32 -> bfloat16 (round to nearest even) -> float32 */
  SL_CODEC_KIND_INT8,       /* "int8": affine 8-bit quantization, per tensor or per channel;
                               encoding a tensor holding NaN or +-inf fails with SL_EINVAL */
  SL_CODEC_KIND_COMPRESSED, /* "zstd" / "zlib": lossless compression of an inner codec's payload */
  SL_CODEC_KIND_SPARSE_COO  /* "sparse_coo": indices + values of the non-zero elements, any dtype */
} sl_codec_kind;

typedef enum sl_compression { SL_COMPRESS_ZSTD = 0, SL_COMPRESS_ZLIB = 1 } sl_compression;

typedef struct sl_codec_spec {
  sl_codec_kind kind;
  sl_dtype wire_dtype;                /* CAST: the dtype on the wire */
  int per_channel;                    /* INT8: 0 per tensor, 1 per channel along `axis` */
  int axis;                           /* INT8: channel axis (negative counts from the end) */
  sl_compression algorithm;           /* COMPRESSED */
  int level;                          /* COMPRESSED: zstd 1..22 (0: zstd's default, 3),
                                         zlib 0..9 (-1: zlib's default, 6) */
  const struct sl_codec_spec *inner;  /* COMPRESSED: codec applied before compressing (NULL: raw) */
} sl_codec_spec;

typedef struct sl_codec sl_codec;

/* Create an encoder from a spec (the spec is copied, inner specs included).
 * SL_EINVAL with a message for a bad spec (e.g. level out of range). */
int sl_codec_create(const sl_codec_spec *spec, sl_codec **out, sl_err *err);

/* ---- the codec table: every codec is one (name, functions, user pointer) ----
 *
 * A codec is a table of functions and a `void *user` they are given, as hiredis'
 * reader takes its redisReplyObjectFunctions: the built-in codecs fill it with
 * their C functions (user = the configured sl_codec), a binding fills it with
 * trampolines into its own language (csrc/py: Python codecs, which take the GIL).
 * The core calls only these functions, so it encodes and decodes every tensor,
 * whoever wrote the codec. All of them may be called from any thread, several at
 * once, and must not call back into the core.
 *
 *  - accepts: 1 when the codec encodes tensors of `dtype`, else 0.
 *  - encode: a contiguous tensor (`desc`, `data`, `nbytes`) becomes a payload
 *    (*payload: sl_storage, owned by the caller on success, *payload_len bytes)
 *    and metadata added to `meta` (which starts empty). `wire` starts as a copy
 *    of `desc` and is what the message declares (dtype and shape); a codec may
 *    change its shape (a Python codec returns the shape it wants its decoder to
 *    get). On failure nothing is allocated; the status is SL_EINVAL for a tensor
 *    the codec refuses, SL_ECODEC for a codec that failed.
 *  - decoded_bound: the most bytes a payload declaring `wire` with `meta` may
 *    decode to; checked before decode runs (against the receiver's budget) and
 *    after (against what decode produced).
 *  - decode: consumes `payload` (sl_storage of `payload_len` bytes; freed or
 *    kept by the codec on every path, the rule of sl_common.h) and produces a new
 *    tensor: *out (sl_storage, the caller's on success) of *out_len bytes
 *    described by *out_desc (for the built-ins, `wire` itself).
 *  - free_user: runs once, when the codec's last reference goes (NULL: none).
 */
typedef struct sl_codec_funcs {
  int (*accepts)(void *user, sl_dtype dtype);
  int (*encode)(void *user, const sl_tensor_desc *desc, const void *data, size_t nbytes,
                sl_tensor_desc *wire, void **payload, size_t *payload_len, sl_meta *meta,
                sl_err *err);
  int (*decoded_bound)(void *user, const sl_tensor_desc *wire, const sl_meta *meta,
                       size_t *bound, sl_err *err);
  int (*decode)(void *user, const sl_tensor_desc *wire, void *payload, size_t payload_len,
                const sl_meta *meta, sl_tensor_desc *out_desc, void **out, size_t *out_len,
                sl_err *err);
  void (*free_user)(void *user);
} sl_codec_funcs;

/* A codec from a table of functions (copied) and `user`, under wire name `name`
 * (copied; it must not be a built-in codec's name). Takes `user`: on failure
 * free_user(user) has already run. The codec starts with one reference. */
int sl_codec_create_custom(const char *name, const sl_codec_funcs *funcs, void *user,
                           sl_codec **out, sl_err *err);

/* Another reference to `c` (thread-safe); returns `c`. */
sl_codec *sl_codec_ref(sl_codec *c);

/* Drop a reference (thread-safe); the last one frees the codec (and runs its
 * free_user). NULL is ignored. */
void sl_codec_destroy(sl_codec *c);

/* 1 for a codec made by sl_codec_create_custom(). */
int sl_codec_is_custom(const sl_codec *c);

/* Encode as sl_codec_encode() does, and say what the message declares: `wire`
 * (the tensor's dtype and, for a custom codec, the shape its encoder chose). */
int sl_codec_encode_as(const sl_codec *c, const sl_tensor_desc *desc, const void *data,
                       size_t nbytes, sl_tensor_desc *wire, void **payload, size_t *payload_len,
                       sl_meta *meta, sl_err *err);

/* ---- the codecs one side knows: the built-ins and its custom ones ---- */

typedef struct sl_codecs sl_codecs;

/* A set of custom codecs (each gets a reference); n may be 0. Two codecs of one
 * name fail with SL_EINVAL naming it. Starts with one reference. */
int sl_codecs_create(sl_codec *const *codecs, size_t n, sl_codecs **out, sl_err *err);
sl_codecs *sl_codecs_ref(sl_codecs *t);
void sl_codecs_unref(sl_codecs *t); /* NULL is ignored */

/* The custom codec named `name` in `t` (NULL: none; `t` may be NULL). Borrowed. */
sl_codec *sl_codecs_find(const sl_codecs *t, const char *name);

/* Every codec name `t` knows (`t` may be NULL): "raw, cast, ..., sparse_coo" then
 * the custom ones: the one list error messages give. Valid while `t` lives. */
const char *sl_codecs_names(const sl_codecs *t);

/* The most bytes a payload of codec `name` declaring `wire` may decode to: the
 * tensor's bytes for a built-in, the custom codec's decoded_bound otherwise. An
 * unknown codec fails with SL_ECODEC and INVALID_ARGUMENT "unknown codec 'x';
 * known codecs: ...". */
int sl_codecs_bound(const sl_codecs *t, const char *name, const sl_tensor_desc *wire,
                    const sl_meta *meta, size_t *bound, sl_err *err);

/* Decode a payload of codec `name` (built in, or custom in `t`). Consumes
 * `payload` (sl_storage) on every path. On success *out (sl_storage, the
 * caller's) holds *out_len bytes of a tensor described by *out_desc, and
 * *out_len is at most the codec's bound (a custom decoder that produced more
 * fails with SL_ECODEC naming both sizes). */
int sl_codecs_decode(const sl_codecs *t, const char *name, const sl_tensor_desc *wire,
                     void *payload, size_t payload_len, const sl_meta *meta,
                     sl_tensor_desc *out_desc, void **out, size_t *out_len, sl_err *err);

/* The codec's wire name ("raw", "cast", "float16", "bfloat16", "int8", "zstd",
 * "zlib", "sparse_coo"). Static string. */
const char *sl_codec_name(const sl_codec *c);

/* 1 when the codec is the raw codec (the caller then sends the tensor's bytes
 * without calling encode). */
int sl_codec_is_raw(const sl_codec *c);

/* Which dtypes a codec accepts: 1 or 0. */
int sl_codec_accepts(const sl_codec *c, sl_dtype dtype);

/* Encode a contiguous tensor. On success *payload (sl_storage) holds *payload_len
 * bytes and `meta` (which must start empty) the metadata the decoder needs. A
 * dtype the codec does not take fails with SL_EINVAL naming both. */
int sl_codec_encode(const sl_codec *c, const sl_tensor_desc *desc, const void *data,
                    size_t nbytes, void **payload, size_t *payload_len, sl_meta *meta,
                    sl_err *err);

/* The built-in codecs' wire names, "raw, cast, ..., sparse_coo" (a static string
 * made from the codec table: the one list, for messages and for Python). */
const char *sl_codec_builtin_names(void);

/* 1 when `name` is a built-in codec's wire name. */
int sl_codec_name_is_builtin(const char *name);

/* An encoder with the parameters of the one that produced a payload of built-in
 * codec `name` with metadata `meta` (a server answers with the codec the request
 * used). SL_EINVAL when `name` is not built in. */
int sl_codec_create_from_wire(const char *name, const sl_meta *meta, sl_codec **out, sl_err *err);

/* Decode a payload of built-in codec `name` into a new tensor of `desc` (the
 * message's dtype and shape: the original tensor's). *out (sl_storage) holds
 * exactly the tensor's bytes. */
int sl_codec_decode(const char *name, const sl_tensor_desc *desc, const void *payload,
                    size_t payload_len, const sl_meta *meta, void **out, sl_err *err);

/* ---- conversion kernels (exposed for tests and benchmarks) ---- */

/* float32 <-> IEEE 754 binary16, round to nearest even; NaN, inf and subnormals
 * as PyTorch's tensor.half() gives them (bit-identical). */
void sl_f32_to_f16(const float *in, uint16_t *out, size_t n);
void sl_f16_to_f32(const uint16_t *in, float *out, size_t n);

/* float32 <-> bfloat16, round to nearest even, bit-identical to tensor.bfloat16().
 * Every NaN becomes 0xFFFF, as tensor.bfloat16() gives on a contiguous tensor on
 * AVX2/AVX-512 CPUs (torch's scalar path gives 0x7FC0); see codec_convert.c. */
void sl_f32_to_bf16(const float *in, uint16_t *out, size_t n);
void sl_bf16_to_f32(const uint16_t *in, float *out, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* SL_CODEC_H */
