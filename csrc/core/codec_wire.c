/* codec_wire.c: an encoder rebuilt from what a payload carries on the wire (its
 * codec's name and metadata), so that a server can answer a request in the codec
 * it came in without being configured for it. See codec.h. */
#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "codec_internal.h"

/* Compression level when answering in a compressed codec (not on the wire). */
#define ZSTD_ANSWER_LEVEL 3
#define ZLIB_ANSWER_LEVEL 6

/* Fill `spec` for the non-compressed codec `name` from `meta`, reading keys under
 * `prefix` ("" or "inner."). */
static int spec_from(const char *name, const sl_meta *meta, const char *prefix,
                     sl_codec_spec *spec, sl_err *err) {
  const sl__codec_entry *e = sl__codec_lookup(name);
  char key[64];
  const sl_meta_value *v;
  memset(spec, 0, sizeof(*spec));
  if (e == NULL) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "'%.64s' is not a built-in codec",
                      name);
  }
  spec->kind = e->kind;
  if (e->kind == SL_CODEC_KIND_CAST) {
    snprintf(key, sizeof(key), "%swire_dtype", prefix);
    v = sl_meta_get(meta, key);
    if (v == NULL || v->type != SL_META_STRING ||
        sl_dtype_from_name(v->bytes, v->len, &spec->wire_dtype) != SL_OK) {
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "codec 'cast': no valid wire_dtype in its metadata");
    }
  } else if (e->kind == SL_CODEC_KIND_INT8) {
    snprintf(key, sizeof(key), "%sper_channel", prefix);
    v = sl_meta_get(meta, key);
    spec->per_channel = v != NULL && v->type == SL_META_BOOL && v->i != 0;
    snprintf(key, sizeof(key), "%saxis", prefix);
    v = sl_meta_get(meta, key);
    if (spec->per_channel && v != NULL && v->type == SL_META_INT) spec->axis = (int)v->i;
  }
  return SL_OK;
}

int sl_codec_create_from_wire(const char *name, const sl_meta *meta, sl_codec **out,
                              sl_err *err) {
  sl_codec_spec spec, inner;
  int rc;
  *out = NULL;
  if (strcmp(name, "zstd") == 0 || strcmp(name, "zlib") == 0) {
    const sl_meta_value *v = sl_meta_get(meta, "inner");
    memset(&spec, 0, sizeof(spec));
    spec.kind = SL_CODEC_KIND_COMPRESSED;
    spec.algorithm = name[1] == 's' ? SL_COMPRESS_ZSTD : SL_COMPRESS_ZLIB;
    spec.level = spec.algorithm == SL_COMPRESS_ZSTD ? ZSTD_ANSWER_LEVEL : ZLIB_ANSWER_LEVEL;
    if (v != NULL && v->type == SL_META_STRING && strcmp(v->bytes, "raw") != 0) {
      rc = spec_from(v->bytes, meta, "inner.", &inner, err);
      if (rc != SL_OK) return rc;
      spec.inner = &inner;
    }
    return sl_codec_create(&spec, out, err);
  }
  rc = spec_from(name, meta, "", &spec, err);
  if (rc != SL_OK) return rc;
  return sl_codec_create(&spec, out, err);
}
