/* codec.c: see codec.h. The typed metadata helpers, the codec objects
 * (create/destroy/name/accepts), the encode/decode dispatch and the raw codec.
 *
 * The codecs themselves live in codec_convert.c (cast, float16, bfloat16 and the
 * conversion kernels), codec_quant.c (int8), codec_compress.c (zstd, zlib) and
 * codec_sparse.c (sparse_coo); codec_internal.h is their private interface.
 *
 * Metadata: sl_meta_get() returns the LAST value added under a key, as a
 * protobuf map parser keeps the last entry of a repeated key.
 *
 * Wire names and their metadata (every decoder ignores keys it does not know):
 *   raw         none; payload = the tensor's bytes
 *   cast        "wire_dtype" (string); payload = the tensor in wire_dtype
 *   float16     none; payload = numel IEEE binary16 values (float32 tensors only)
 *   bfloat16    none; payload = numel bfloat16 values (float32 tensors only)
 *   int8        see codec_quant.c
 *   zstd, zlib  see codec_compress.c
 *   sparse_coo  none; see codec_sparse.c
 * All multi-byte values on the wire are little-endian.
 *
 * Compression levels: zstd takes 1..22, and 0 for zstd's default (3); zlib takes
 * 0..9, and -1 for zlib's default (6).
 */
#include "codec.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec_internal.h"

#include <pthread.h>

/* ---- typed metadata ---- */

static int meta_append(sl_meta *m, const char *key, sl_meta_value *v) {
  sl_meta_value *items;
  if (m == NULL || key == NULL) return SL_EINVAL;
  if (m->n >= SIZE_MAX / sizeof(*items) - 1) return SL_ENOMEM;
  v->key = sl_strndup(key, strlen(key));
  if (v->key == NULL) return SL_ENOMEM;
  items = realloc(m->items, (m->n + 1) * sizeof(*items));
  if (items == NULL) {
    free(v->key);
    v->key = NULL;
    return SL_ENOMEM;
  }
  items[m->n] = *v;
  m->items = items;
  m->n++;
  return SL_OK;
}

int sl_meta_add_double(sl_meta *m, const char *key, double d) {
  sl_meta_value v = {0};
  v.type = SL_META_DOUBLE;
  v.d = d;
  return meta_append(m, key, &v);
}

int sl_meta_add_int(sl_meta *m, const char *key, int64_t i) {
  sl_meta_value v = {0};
  v.type = SL_META_INT;
  v.i = i;
  return meta_append(m, key, &v);
}

int sl_meta_add_bool(sl_meta *m, const char *key, int b) {
  sl_meta_value v = {0};
  v.type = SL_META_BOOL;
  v.i = b ? 1 : 0;
  return meta_append(m, key, &v);
}

static int meta_add_blob(sl_meta *m, const char *key, sl_meta_type type, const void *p,
                         size_t len) {
  sl_meta_value v = {0};
  int rc;
  if (p == NULL && len > 0) return SL_EINVAL;
  if (len == SIZE_MAX) return SL_ENOMEM;
  v.type = type;
  v.len = len;
  v.bytes = malloc(len + 1);
  if (v.bytes == NULL) return SL_ENOMEM;
  if (len > 0) memcpy(v.bytes, p, len);
  v.bytes[len] = '\0';
  rc = meta_append(m, key, &v);
  if (rc != SL_OK) free(v.bytes);
  return rc;
}

int sl_meta_add_string(sl_meta *m, const char *key, const char *s) {
  if (s == NULL) return SL_EINVAL;
  return meta_add_blob(m, key, SL_META_STRING, s, strlen(s));
}

int sl_meta_add_bytes(sl_meta *m, const char *key, const void *p, size_t len) {
  return meta_add_blob(m, key, SL_META_BYTES, p, len);
}

const sl_meta_value *sl_meta_get(const sl_meta *m, const char *key) {
  size_t i;
  if (m == NULL || key == NULL) return NULL;
  for (i = m->n; i-- > 0;) {
    if (m->items[i].key != NULL && strcmp(m->items[i].key, key) == 0) return &m->items[i];
  }
  return NULL;
}

void sl_meta_clear(sl_meta *m) {
  size_t i;
  if (m == NULL) return;
  for (i = 0; i < m->n; i++) {
    free(m->items[i].key);
    free(m->items[i].bytes);
  }
  free(m->items);
  m->items = NULL;
  m->n = 0;
}

/* ---- shared helpers (codec_internal.h) ---- */

int sl__codec_fail(sl_err *err, int status, const char *codec, const char *fmt, ...) {
  char detail[SL_ERR_MSG_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof(detail), fmt, ap);
  va_end(ap);
  return sl_err_set(err, status,
                    status == SL_ENOMEM ? SL_STATUS_RESOURCE_EXHAUSTED
                                        : SL_STATUS_INVALID_ARGUMENT,
                    "codec '%s': %s", codec, detail);
}

size_t sl__desc_numel(const sl_tensor_desc *desc) {
  size_t n = 1;
  int i;
  for (i = 0; i < desc->ndim; i++) {
    if (desc->shape[i] == 0) return 0;
  }
  /* no zero dimension: the product fits, since the byte count does */
  for (i = 0; i < desc->ndim; i++) n *= (size_t)desc->shape[i];
  return n;
}

int sl__dtype_is_float(sl_dtype dt) {
  return dt == SL_DTYPE_FLOAT16 || dt == SL_DTYPE_BFLOAT16 || dt == SL_DTYPE_FLOAT32 ||
         dt == SL_DTYPE_FLOAT64;
}

static const char *meta_type_name(sl_meta_type t) {
  switch (t) {
    case SL_META_DOUBLE: return "double";
    case SL_META_INT: return "int";
    case SL_META_STRING: return "string";
    case SL_META_BYTES: return "bytes";
    case SL_META_BOOL: return "bool";
    default: return "unknown";
  }
}

int sl__meta_need(const sl_meta *meta, const char *codec, const char *key, sl_meta_type type,
                  const sl_meta_value **out, sl_err *err) {
  const sl_meta_value *v = sl_meta_get(meta, key);
  *out = NULL;
  if (v == NULL) {
    return sl__codec_fail(err, SL_EINVAL, codec, "metadata '%s' (%s) is missing", key,
                          meta_type_name(type));
  }
  if (v->type != type) {
    return sl__codec_fail(err, SL_EINVAL, codec, "metadata '%s' should be %s, not %s", key,
                          meta_type_name(type), meta_type_name(v->type));
  }
  if ((type == SL_META_STRING || type == SL_META_BYTES) && v->bytes == NULL && v->len > 0) {
    return sl__codec_fail(err, SL_EINVAL, codec, "metadata '%s' has no value", key);
  }
  *out = v;
  return SL_OK;
}

/* ---- raw ---- */

int sl__raw_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel, const void *data,
                   size_t nbytes, void **payload, size_t *payload_len, sl_meta *meta,
                   sl_err *err) {
  int status = -1;
  void *buf = NULL;
  (void)c;
  (void)desc;
  (void)numel;
  (void)meta;
  status = sl_storage_alloc(nbytes, &buf);
  if (status != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, "raw", "cannot allocate %zu bytes", nbytes);
    goto cleanup;
  }
  if (nbytes > 0) memcpy(buf, data, nbytes);
  *payload = buf;
  *payload_len = nbytes;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  return status;
}

int sl__raw_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                        const sl_meta *meta, size_t *max_len, sl_err *err) {
  (void)desc;
  (void)numel;
  (void)meta;
  (void)err;
  *max_len = nbytes;
  return SL_OK;
}

int sl__raw_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                   size_t payload_len, const sl_meta *meta, void *out, sl_err *err) {
  (void)numel;
  (void)meta;
  if (payload_len != nbytes) {
    return sl__codec_fail(err, SL_EINVAL, "raw",
                          "payload has %zu bytes; %zu elements of %s need %zu", payload_len,
                          numel, sl_dtype_name(desc->dtype), nbytes);
  }
  if (nbytes > 0) memcpy(out, payload, nbytes);
  return SL_OK;
}

/* ---- the codec table ---- */

static const sl__codec_entry codec_table[] = {
    {"raw", SL_CODEC_KIND_RAW, sl__raw_payload_max, sl__raw_decode},
    {"cast", SL_CODEC_KIND_CAST, sl__cast_payload_max, sl__cast_decode},
    {"float16", SL_CODEC_KIND_FLOAT16, sl__half_payload_max, sl__f16_decode},
    {"bfloat16", SL_CODEC_KIND_BFLOAT16, sl__half_payload_max, sl__bf16_decode},
    {"int8", SL_CODEC_KIND_INT8, sl__int8_payload_max, sl__int8_decode},
    {"zstd", SL_CODEC_KIND_COMPRESSED, NULL, NULL},
    {"zlib", SL_CODEC_KIND_COMPRESSED, NULL, NULL},
    {"sparse_coo", SL_CODEC_KIND_SPARSE_COO, sl__sparse_payload_max, sl__sparse_decode},
};

#define CODEC_TABLE_N (sizeof(codec_table) / sizeof(codec_table[0]))

const sl__codec_entry *sl__codec_lookup(const char *name) {
  size_t i;
  if (name == NULL) return NULL;
  for (i = 0; i < CODEC_TABLE_N; i++) {
    if (strcmp(codec_table[i].name, name) == 0) return &codec_table[i];
  }
  return NULL;
}

int sl_codec_name_is_builtin(const char *name) { return sl__codec_lookup(name) != NULL; }

static char codec_names[256];
static pthread_once_t codec_names_once = PTHREAD_ONCE_INIT;

static void make_codec_names(void) {
  size_t used = 0;
  for (size_t i = 0; i < CODEC_TABLE_N; i++) {
    used += (size_t)snprintf(codec_names + used, sizeof(codec_names) - used, "%s%s",
                             i ? ", " : "", codec_table[i].name);
    if (used >= sizeof(codec_names)) break;
  }
}

const char *sl_codec_builtin_names(void) {
  pthread_once(&codec_names_once, make_codec_names);
  return codec_names;
}

int sl__codec_kind_accepts(sl_codec_kind kind, sl_dtype dtype) {
  if (dtype <= SL_DTYPE_INVALID || dtype >= SL_DTYPE_COUNT) return 0;
  switch (kind) {
    case SL_CODEC_KIND_RAW:
    case SL_CODEC_KIND_SPARSE_COO:
    case SL_CODEC_KIND_COMPRESSED: return 1;
    case SL_CODEC_KIND_CAST:
    case SL_CODEC_KIND_INT8: return sl__dtype_is_float(dtype);
    case SL_CODEC_KIND_FLOAT16:
    case SL_CODEC_KIND_BFLOAT16: return dtype == SL_DTYPE_FLOAT32;
    default: return 0;
  }
}

/* ---- codec objects ---- */

static const char *kind_label(sl_codec_kind kind) {
  switch (kind) {
    case SL_CODEC_KIND_RAW: return "raw";
    case SL_CODEC_KIND_CAST: return "cast";
    case SL_CODEC_KIND_FLOAT16: return "float16";
    case SL_CODEC_KIND_BFLOAT16: return "bfloat16";
    case SL_CODEC_KIND_INT8: return "int8";
    case SL_CODEC_KIND_COMPRESSED: return "compressed";
    case SL_CODEC_KIND_SPARSE_COO: return "sparse_coo";
    default: return "?";
  }
}

static int check_spec(const sl_codec_spec *spec, sl_err *err) {
  const char *name = kind_label(spec->kind);
  switch (spec->kind) {
    case SL_CODEC_KIND_RAW:
    case SL_CODEC_KIND_FLOAT16:
    case SL_CODEC_KIND_BFLOAT16:
    case SL_CODEC_KIND_SPARSE_COO: return SL_OK;
    case SL_CODEC_KIND_CAST:
      if (!sl__dtype_is_float(spec->wire_dtype)) {
        return sl__codec_fail(err, SL_EINVAL, name,
                              "wire_dtype must be float16, bfloat16, float32 or float64, not "
                              "'%s'",
                              sl_dtype_name(spec->wire_dtype));
      }
      return SL_OK;
    case SL_CODEC_KIND_INT8:
      if (spec->per_channel != 0 && spec->per_channel != 1) {
        return sl__codec_fail(err, SL_EINVAL, name, "per_channel must be 0 or 1, not %d",
                              spec->per_channel);
      }
      if (spec->per_channel && (spec->axis < -SL_MAX_NDIM || spec->axis >= SL_MAX_NDIM)) {
        return sl__codec_fail(err, SL_EINVAL, name, "axis %d is out of range", spec->axis);
      }
      return SL_OK;
    case SL_CODEC_KIND_COMPRESSED:
      if (spec->algorithm == SL_COMPRESS_ZSTD) {
        if (spec->level < 0 || spec->level > 22) {
          return sl__codec_fail(err, SL_EINVAL, "zstd",
                                "level %d is out of range (1..22, or 0 for the default)",
                                spec->level);
        }
      } else if (spec->algorithm == SL_COMPRESS_ZLIB) {
        if (spec->level < -1 || spec->level > 9) {
          return sl__codec_fail(err, SL_EINVAL, "zlib",
                                "level %d is out of range (0..9, or -1 for the default)",
                                spec->level);
        }
      } else {
        return sl__codec_fail(err, SL_EINVAL, name, "unknown compression algorithm %d",
                              (int)spec->algorithm);
      }
      if (spec->inner != NULL && spec->inner->kind == SL_CODEC_KIND_COMPRESSED) {
        return sl__codec_fail(err, SL_EINVAL, name,
                              "the inner codec cannot itself be a compressed codec");
      }
      return SL_OK;
    default:
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "unknown codec kind %d",
                        (int)spec->kind);
  }
}

static const sl_codec_funcs builtin_funcs_table; /* defined below */

int sl_codec_create(const sl_codec_spec *spec, sl_codec **out, sl_err *err) {
  int status = -1;
  sl_codec *c = NULL;
  if (out == NULL) return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "no output");
  *out = NULL;
  if (spec == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "no codec spec");
    goto cleanup;
  }
  status = check_spec(spec, err);
  if (status != SL_OK) goto cleanup;
  c = calloc(1, sizeof(*c));
  if (c == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  c->spec = *spec;
  c->spec.inner = NULL;
  c->refs = 1;
  c->funcs = builtin_funcs_table;
  c->user = c;
  if (spec->kind == SL_CODEC_KIND_COMPRESSED && spec->inner != NULL &&
      spec->inner->kind != SL_CODEC_KIND_RAW) {
    status = sl_codec_create(spec->inner, &c->inner, err);
    if (status != SL_OK) goto cleanup;
    c->spec.inner = &c->inner->spec;
  }
  if (spec->kind == SL_CODEC_KIND_INT8 && !spec->per_channel) c->spec.axis = 0;
  *out = c;
  c = NULL;
  status = SL_OK;
cleanup:
  sl_codec_destroy(c);
  return status;
}

void sl_codec_destroy(sl_codec *c) {
  if (c == NULL) return;
  if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  sl_codec_destroy(c->inner);
  if (c->name != NULL && c->funcs.free_user != NULL) c->funcs.free_user(c->user);
  free(c->name);
  free(c);
}

sl_codec *sl_codec_ref(sl_codec *c) {
  if (c != NULL) __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
  return c;
}

int sl_codec_is_custom(const sl_codec *c) { return c != NULL && c->name != NULL; }

int sl_codec_create_custom(const char *name, const sl_codec_funcs *funcs, void *user,
                           sl_codec **out, sl_err *err) {
  int status = -1;
  sl_codec *c = NULL;
  if (out != NULL) *out = NULL;
  if (out == NULL || funcs == NULL || funcs->accepts == NULL || funcs->encode == NULL ||
      funcs->decoded_bound == NULL || funcs->decode == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "sl_codec_create_custom: missing output or codec function");
    goto fail;
  }
  if (name == NULL || name[0] == '\0' || strlen(name) > 255) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "a codec's name must be 1 to 255 bytes");
    goto fail;
  }
  if (sl__codec_lookup(name) != NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "codec name '%s' is a built-in codec's (%s); choose another",
                        name, sl_codec_builtin_names());
    goto fail;
  }
  c = calloc(1, sizeof(*c));
  if (c == NULL || (c->name = sl_strndup(name, strlen(name))) == NULL) {
    free(c);
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto fail;
  }
  c->refs = 1;
  c->funcs = *funcs;
  c->user = user;
  *out = c;
  return SL_OK;
fail:
  if (funcs != NULL && funcs->free_user != NULL) funcs->free_user(user);
  return status;
}

const char *sl_codec_name(const sl_codec *c) {
  if (c == NULL) return "";
  if (c->name != NULL) return c->name;
  if (c->spec.kind == SL_CODEC_KIND_COMPRESSED) {
    return c->spec.algorithm == SL_COMPRESS_ZLIB ? "zlib" : "zstd";
  }
  return kind_label(c->spec.kind);
}

int sl_codec_is_raw(const sl_codec *c) {
  return c != NULL && c->name == NULL && c->spec.kind == SL_CODEC_KIND_RAW;
}

int sl_codec_accepts(const sl_codec *c, sl_dtype dtype) {
  if (c == NULL || dtype <= SL_DTYPE_INVALID || dtype >= SL_DTYPE_COUNT) return 0;
  return c->funcs.accepts(c->user, dtype) ? 1 : 0;
}

/* ---- the built-in codecs' table ---- */

static int builtin_accepts(void *user, sl_dtype dtype) {
  const sl_codec *c = user;
  if (c->spec.kind == SL_CODEC_KIND_COMPRESSED && c->inner != NULL) {
    return sl_codec_accepts(c->inner, dtype);
  }
  return sl__codec_kind_accepts(c->spec.kind, dtype);
}

static sl__encode_fn encoder_of(sl_codec_kind kind);

static int builtin_encode(void *user, const sl_tensor_desc *desc, const void *data,
                          size_t nbytes, sl_tensor_desc *wire, void **payload,
                          size_t *payload_len, sl_meta *meta, sl_err *err) {
  const sl_codec *c = user;
  sl__encode_fn enc = encoder_of(c->spec.kind);
  (void)wire; /* the message declares the tensor itself */
  if (enc == NULL) return sl__codec_fail(err, SL_EINVAL, sl_codec_name(c), "no encoder");
  return enc(c, desc, sl__desc_numel(desc), data, nbytes, payload, payload_len, meta, err);
}

static int builtin_bound(void *user, const sl_tensor_desc *wire, const sl_meta *meta,
                         size_t *bound, sl_err *err) {
  (void)user;
  (void)meta;
  if (sl_desc_nbytes(wire, bound) != SL_OK) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "invalid dtype or shape");
  }
  return SL_OK;
}

static int builtin_decode(void *user, const sl_tensor_desc *wire, void *payload,
                          size_t payload_len, const sl_meta *meta, sl_tensor_desc *out_desc,
                          void **out, size_t *out_len, sl_err *err) {
  const sl_codec *c = user;
  int rc = sl_codec_decode(sl_codec_name(c), wire, payload, payload_len, meta, out, err);
  sl_storage_free(payload);
  if (rc != SL_OK) return rc;
  *out_desc = *wire;
  sl_desc_nbytes(wire, out_len);
  return SL_OK;
}

static const sl_codec_funcs builtin_funcs_table = {builtin_accepts, builtin_encode,
                                                   builtin_bound, builtin_decode, NULL};

/* ---- the codecs one side knows ---- */

struct sl_codecs {
  int refs;
  sl_codec **codecs; /* a reference each */
  size_t n;
  char *names;       /* "raw, ..., sparse_coo, custom..." */
};

int sl_codecs_create(sl_codec *const *codecs, size_t n, sl_codecs **out, sl_err *err) {
  int status = -1;
  sl_codecs *t = NULL;
  size_t len = strlen(sl_codec_builtin_names()) + 1;
  *out = NULL;
  for (size_t i = 0; i < n; i++) {
    if (codecs[i] == NULL || !sl_codec_is_custom(codecs[i])) {
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "a codec set takes custom codecs only (the built-ins are always known)");
    }
    for (size_t j = 0; j < i; j++) {
      if (strcmp(codecs[i]->name, codecs[j]->name) == 0) {
        return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "two different codecs are named '%s'", codecs[i]->name);
      }
    }
    len += strlen(codecs[i]->name) + 2;
  }
  t = calloc(1, sizeof(*t));
  if (t == NULL) goto oom;
  t->refs = 1;
  t->codecs = calloc(n ? n : 1, sizeof(*t->codecs));
  t->names = malloc(len);
  if (t->codecs == NULL || t->names == NULL) goto oom;
  strcpy(t->names, sl_codec_builtin_names());
  for (size_t i = 0; i < n; i++) {
    t->codecs[i] = sl_codec_ref(codecs[i]);
    t->n = i + 1;
    strcat(t->names, ", ");
    strcat(t->names, codecs[i]->name);
  }
  *out = t;
  return SL_OK;
oom:
  sl_codecs_unref(t);
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  return status;
}

sl_codecs *sl_codecs_ref(sl_codecs *t) {
  if (t != NULL) __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
  return t;
}

void sl_codecs_unref(sl_codecs *t) {
  if (t == NULL || __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  for (size_t i = 0; i < t->n; i++) sl_codec_destroy(t->codecs[i]);
  free(t->codecs);
  free(t->names);
  free(t);
}

sl_codec *sl_codecs_find(const sl_codecs *t, const char *name) {
  if (t == NULL || name == NULL) return NULL;
  for (size_t i = 0; i < t->n; i++) {
    if (strcmp(t->codecs[i]->name, name) == 0) return t->codecs[i];
  }
  return NULL;
}

const char *sl_codecs_names(const sl_codecs *t) {
  return t != NULL ? t->names : sl_codec_builtin_names();
}

static int unknown_codec(const sl_codecs *t, const char *name, sl_err *err) {
  return sl_err_set(err, SL_ECODEC, SL_STATUS_INVALID_ARGUMENT,
                    "unknown codec '%.64s'; known codecs: %s", name ? name : "(null)",
                    sl_codecs_names(t));
}

int sl_codecs_bound(const sl_codecs *t, const char *name, const sl_tensor_desc *wire,
                    const sl_meta *meta, size_t *bound, sl_err *err) {
  const sl_codec *c;
  *bound = 0;
  if (sl__codec_lookup(name) != NULL) return builtin_bound(NULL, wire, meta, bound, err);
  c = sl_codecs_find(t, name);
  if (c == NULL) return unknown_codec(t, name, err);
  return c->funcs.decoded_bound(c->user, wire, meta, bound, err);
}

int sl_codecs_decode(const sl_codecs *t, const char *name, const sl_tensor_desc *wire,
                     void *payload, size_t payload_len, const sl_meta *meta,
                     sl_tensor_desc *out_desc, void **out, size_t *out_len, sl_err *err) {
  const sl_codec *c;
  size_t bound = 0;
  int rc;
  *out = NULL;
  *out_len = 0;
  if (sl__codec_lookup(name) != NULL) {
    rc = sl_codec_decode(name, wire, payload, payload_len, meta, out, err);
    sl_storage_free(payload);
    if (rc != SL_OK) return rc;
    *out_desc = *wire;
    sl_desc_nbytes(wire, out_len);
    return SL_OK;
  }
  c = sl_codecs_find(t, name);
  if (c == NULL) {
    sl_storage_free(payload);
    return unknown_codec(t, name, err);
  }
  rc = c->funcs.decoded_bound(c->user, wire, meta, &bound, err);
  if (rc != SL_OK) {
    sl_storage_free(payload);
    return rc;
  }
  rc = c->funcs.decode(c->user, wire, payload, payload_len, meta, out_desc, out, out_len, err);
  if (rc != SL_OK) {
    *out = NULL;
    return rc;
  }
  if (*out_len > bound) {
    sl_storage_free(*out);
    *out = NULL;
    return sl__codec_fail(err, SL_ECODEC, name,
                          "decode() produced %zu bytes, more than the %zu bytes a payload "
                          "of this shape may decode to",
                          *out_len, bound);
  }
  return SL_OK;
}

/* ---- dispatch ---- */

static int check_desc(const char *codec, const sl_tensor_desc *desc, size_t *nbytes,
                      sl_err *err) {
  char shp[128];
  int rc;
  if (desc == NULL) return sl__codec_fail(err, SL_EINVAL, codec, "no tensor descriptor");
  if (desc->ndim < 0 || desc->ndim > SL_MAX_NDIM) {
    return sl__codec_fail(err, SL_EINVAL, codec, "tensor has %d dimensions", desc->ndim);
  }
  rc = sl_desc_nbytes(desc, nbytes);
  if (rc != SL_OK) {
    sl_desc_format_shape(desc, shp, sizeof(shp));
    return sl__codec_fail(err, SL_EINVAL, codec, "invalid tensor: shape %s of dtype '%s' (%s)",
                          shp, sl_dtype_name(desc->dtype), sl_strerror(rc));
  }
  return SL_OK;
}

static sl__encode_fn encoder_of(sl_codec_kind kind) {
  switch (kind) {
    case SL_CODEC_KIND_RAW: return sl__raw_encode;
    case SL_CODEC_KIND_CAST: return sl__cast_encode;
    case SL_CODEC_KIND_FLOAT16:
    case SL_CODEC_KIND_BFLOAT16: return sl__half_encode;
    case SL_CODEC_KIND_INT8: return sl__int8_encode;
    case SL_CODEC_KIND_COMPRESSED: return sl__compress_encode;
    case SL_CODEC_KIND_SPARSE_COO: return sl__sparse_encode;
    default: return NULL;
  }
}

int sl_codec_encode(const sl_codec *c, const sl_tensor_desc *desc, const void *data,
                    size_t nbytes, void **payload, size_t *payload_len, sl_meta *meta,
                    sl_err *err) {
  sl_tensor_desc wire;
  return sl_codec_encode_as(c, desc, data, nbytes, &wire, payload, payload_len, meta, err);
}

int sl_codec_encode_as(const sl_codec *c, const sl_tensor_desc *desc, const void *data,
                       size_t nbytes, sl_tensor_desc *wire, void **payload, size_t *payload_len,
                       sl_meta *meta, sl_err *err) {
  int status = -1;
  const char *name = sl_codec_name(c);
  size_t need = 0;
  void *buf = NULL;
  size_t len = 0;
  if (payload == NULL || payload_len == NULL || meta == NULL || c == NULL || wire == NULL) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "sl_codec_encode: missing codec or output argument");
  }
  *payload = NULL;
  *payload_len = 0;
  if (meta->n != 0) {
    return sl__codec_fail(err, SL_EINVAL, name, "the metadata to fill must start empty");
  }
  status = check_desc(name, desc, &need, err);
  if (status != SL_OK) goto cleanup;
  *wire = *desc;
  if (!sl_codec_accepts(c, desc->dtype)) {
    status = sl__codec_fail(err, SL_EINVAL, name, "does not take %s tensors",
                            sl_dtype_name(desc->dtype));
    goto cleanup;
  }
  if (need != nbytes) {
    status = sl__codec_fail(err, SL_EINVAL, name,
                            "the tensor's shape needs %zu bytes but %zu were given", need, nbytes);
    goto cleanup;
  }
  if (data == NULL && nbytes > 0) {
    status = sl__codec_fail(err, SL_EINVAL, name, "no tensor data");
    goto cleanup;
  }
  status = c->funcs.encode(c->user, desc, data, nbytes, wire, &buf, &len, meta, err);
  if (status != SL_OK) {
    buf = NULL; /* a failed encoder allocated nothing */
    goto cleanup;
  }
  *payload = buf;
  *payload_len = len;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  if (status != SL_OK) sl_meta_clear(meta);
  return status;
}

int sl_codec_decode(const char *name, const sl_tensor_desc *desc, const void *payload,
                    size_t payload_len, const sl_meta *meta, void **out, sl_err *err) {
  int status = -1;
  const sl__codec_entry *e;
  size_t nbytes = 0;
  void *buf = NULL;
  if (out == NULL) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "sl_codec_decode: missing output argument");
  }
  *out = NULL;
  e = sl__codec_lookup(name);
  if (e == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "unknown codec '%.64s'; the built-in codecs are %s",
                        name == NULL ? "(null)" : name, sl_codec_builtin_names());
    goto cleanup;
  }
  status = check_desc(e->name, desc, &nbytes, err);
  if (status != SL_OK) goto cleanup;
  if (!sl__codec_kind_accepts(e->kind, desc->dtype)) {
    status = sl__codec_fail(err, SL_EINVAL, e->name, "does not decode to %s tensors",
                            sl_dtype_name(desc->dtype));
    goto cleanup;
  }
  if (payload == NULL && payload_len > 0) {
    status = sl__codec_fail(err, SL_EINVAL, e->name, "no payload bytes");
    goto cleanup;
  }
  if (e->payload_max != NULL) {
    /* check the metadata and the length before allocating the tensor (the
     * decoder checks the exact length again) */
    size_t max_len = 0;
    status = e->payload_max(desc, sl__desc_numel(desc), nbytes, meta, &max_len, err);
    if (status != SL_OK) goto cleanup;
    if (payload_len > max_len) {
      status = sl__codec_fail(err, SL_EINVAL, e->name,
                              "payload has %zu bytes; a payload for this tensor has at most %zu",
                              payload_len, max_len);
      goto cleanup;
    }
  }
  status = sl_storage_alloc(nbytes, &buf);
  if (status != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, e->name, "cannot allocate %zu bytes", nbytes);
    goto cleanup;
  }
  if (e->kind == SL_CODEC_KIND_COMPRESSED) {
    status = sl__compress_decode(strcmp(e->name, "zlib") == 0 ? SL_COMPRESS_ZLIB
                                                              : SL_COMPRESS_ZSTD,
                                 desc, sl__desc_numel(desc), nbytes, payload, payload_len, meta,
                                 buf, err);
  } else {
    status = e->decode(desc, sl__desc_numel(desc), nbytes, payload, payload_len, meta, buf, err);
  }
  if (status != SL_OK) goto cleanup;
  *out = buf;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  return status;
}
