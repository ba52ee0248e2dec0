/* codec_compress.c: the "zstd" and "zlib" codecs: lossless compression of an
 * inner codec's payload (raw when the spec names no inner codec).
 *
 * Payload: one zstd frame that declares its content size (ZSTD_compress), or
 * one zlib stream (RFC 1950, compress2). Nothing follows it.
 * Metadata:
 *   "inner"      (string) the inner codec's wire name; any built-in codec but
 *                zstd and zlib
 *   "inner_len"  (int)    the inner payload's length in bytes
 *   "inner.<k>"  the inner codec's metadata, each key prefixed with "inner."
 *
 * Decoding is bounded by the shape: the inner codec says how long a valid
 * inner payload of this tensor can be (exactly the tensor's bytes for raw, the
 * exact length for the fixed-size codecs, an upper bound for sparse_coo), and
 * "inner_len" must be within that before anything is allocated. zstd: the frame
 * must declare exactly inner_len bytes and ZSTD_decompress gets exactly that
 * capacity, so a frame (or a second frame) that would produce more fails.
 * zlib: inflate writes into exactly inner_len bytes; if the stream would go on
 * past them, or ends short, or has trailing bytes, the payload is refused. With
 * an inner raw codec the bytes are inflated straight into the tensor (no copy).
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "codec.h"
#include "codec_internal.h"

#define INNER_PREFIX "inner."
#define INNER_PREFIX_LEN 6

static const char *algo_name(sl_compression a) { return a == SL_COMPRESS_ZLIB ? "zlib" : "zstd"; }

/* Copy `inner`'s entries into `meta` with the "inner." prefix. */
static int add_inner_meta(sl_meta *meta, const sl_meta *inner) {
  size_t i;
  int rc = SL_OK;
  for (i = 0; i < inner->n && rc == SL_OK; i++) {
    const sl_meta_value *v = &inner->items[i];
    size_t klen = strlen(v->key);
    char *key = malloc(INNER_PREFIX_LEN + klen + 1);
    if (key == NULL) return SL_ENOMEM;
    memcpy(key, INNER_PREFIX, INNER_PREFIX_LEN);
    memcpy(key + INNER_PREFIX_LEN, v->key, klen + 1);
    switch (v->type) {
      case SL_META_DOUBLE: rc = sl_meta_add_double(meta, key, v->d); break;
      case SL_META_INT: rc = sl_meta_add_int(meta, key, v->i); break;
      case SL_META_BOOL: rc = sl_meta_add_bool(meta, key, (int)v->i); break;
      case SL_META_STRING: rc = sl_meta_add_string(meta, key, v->bytes); break;
      case SL_META_BYTES: rc = sl_meta_add_bytes(meta, key, v->bytes, v->len); break;
      default: rc = SL_EINVAL; break;
    }
    free(key);
  }
  return rc;
}

int sl__compress_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                        const void *data, size_t nbytes, void **payload, size_t *payload_len,
                        sl_meta *meta, sl_err *err) {
  int status = -1;
  const char *name = algo_name(c->spec.algorithm);
  sl_meta inner_meta = {0};
  void *inner_buf = NULL, *buf = NULL;
  const void *src = data;
  size_t src_len = nbytes, cap = 0, len = 0;
  (void)numel;
  if (c->inner != NULL) {
    status = sl_codec_encode(c->inner, desc, data, nbytes, &inner_buf, &src_len, &inner_meta, err);
    if (status != SL_OK) goto cleanup;
    src = inner_buf;
  }
  if (src_len > INT64_MAX) {
    status = sl__codec_fail(err, SL_EINVAL, name, "the inner payload is too large");
    goto cleanup;
  }
  if (sl_meta_add_string(meta, "inner", c->inner ? sl_codec_name(c->inner) : "raw") != SL_OK ||
      sl_meta_add_int(meta, "inner_len", (int64_t)src_len) != SL_OK ||
      add_inner_meta(meta, &inner_meta) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, name, "out of memory");
    goto cleanup;
  }
  if (c->spec.algorithm == SL_COMPRESS_ZSTD) {
    size_t r;
    cap = ZSTD_compressBound(src_len);
    if (ZSTD_isError(cap) || cap == 0) {
      status = sl__codec_fail(err, SL_EINVAL, name, "%zu bytes are too many to compress", src_len);
      goto cleanup;
    }
    if (sl_storage_alloc(cap, &buf) != SL_OK) {
      status = sl__codec_fail(err, SL_ENOMEM, name, "cannot allocate %zu bytes", cap);
      goto cleanup;
    }
    r = ZSTD_compress(buf, cap, src_len ? src : "", src_len, c->spec.level);
    if (ZSTD_isError(r)) {
      status = sl__codec_fail(err, SL_EINVAL, name, "compression failed: %s", ZSTD_getErrorName(r));
      goto cleanup;
    }
    len = r;
  } else {
    uLongf dlen;
    int zr;
    if ((uint64_t)src_len > (uint64_t)(uLong)-1 / 2) {
      status = sl__codec_fail(err, SL_EINVAL, name, "%zu bytes are too many to compress", src_len);
      goto cleanup;
    }
    cap = compressBound((uLong)src_len);
    if (sl_storage_alloc(cap, &buf) != SL_OK) {
      status = sl__codec_fail(err, SL_ENOMEM, name, "cannot allocate %zu bytes", cap);
      goto cleanup;
    }
    dlen = (uLongf)cap;
    zr = compress2(buf, &dlen, src_len ? src : (const void *)"", (uLong)src_len,
                   c->spec.level);
    if (zr != Z_OK) {
      status = sl__codec_fail(err, zr == Z_MEM_ERROR ? SL_ENOMEM : SL_EINVAL, name,
                              "compression failed (zlib error %d)", zr);
      goto cleanup;
    }
    len = (size_t)dlen;
  }
  /* give back the unused part of a large bound: one copy of the (small) output */
  if (cap >= ((size_t)1 << 20) && len <= cap / 2) {
    void *fit = NULL;
    if (sl_storage_alloc(len, &fit) == SL_OK) {
      memcpy(fit, buf, len);
      sl_storage_free(buf);
      buf = fit;
    }
  }
  *payload = buf;
  *payload_len = len;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  sl_storage_free(inner_buf);
  sl_meta_clear(&inner_meta);
  return status;
}

/* A view of the "inner." entries of `meta` with the prefix stripped. The view's
 * items array is malloc'd (freed by the caller with free()); its keys and bytes
 * point into `meta`. */
static int inner_meta_view(const sl_meta *meta, sl_meta *view) {
  size_t i, n = 0;
  view->items = NULL;
  view->n = 0;
  if (meta == NULL || meta->n == 0) return SL_OK;
  view->items = malloc(meta->n * sizeof(*view->items));
  if (view->items == NULL) return SL_ENOMEM;
  for (i = 0; i < meta->n; i++) {
    const sl_meta_value *v = &meta->items[i];
    if (v->key != NULL && strncmp(v->key, INNER_PREFIX, INNER_PREFIX_LEN) == 0) {
      view->items[n] = *v;
      view->items[n].key = v->key + INNER_PREFIX_LEN;
      n++;
    }
  }
  view->n = n;
  return SL_OK;
}

static int zstd_inflate(const void *src, size_t src_len, void *dst, size_t dst_len,
                        sl_err *err) {
  unsigned long long fcs;
  size_t r;
  fcs = ZSTD_getFrameContentSize(src, src_len);
  if (fcs == ZSTD_CONTENTSIZE_ERROR) {
    return sl__codec_fail(err, SL_EINVAL, "zstd", "the payload is not a zstd frame");
  }
  if (fcs == ZSTD_CONTENTSIZE_UNKNOWN) {
    return sl__codec_fail(err, SL_EINVAL, "zstd",
                          "the zstd frame does not declare its size (or is truncated)");
  }
  if (fcs != (unsigned long long)dst_len) {
    return sl__codec_fail(err, SL_EINVAL, "zstd",
                          "the zstd frame declares %llu bytes but 'inner_len' says %zu", fcs,
                          dst_len);
  }
  r = ZSTD_decompress(dst, dst_len, src, src_len);
  if (ZSTD_isError(r)) {
    return sl__codec_fail(err, SL_EINVAL, "zstd", "corrupt payload: %s", ZSTD_getErrorName(r));
  }
  if (r != dst_len) {
    return sl__codec_fail(err, SL_EINVAL, "zstd", "decompressed to %zu bytes, expected %zu", r,
                          dst_len);
  }
  return SL_OK;
}

static int zlib_inflate(const void *src, size_t src_len, void *dst, size_t dst_len,
                        sl_err *err) {
  int status = -1, zr, started = 0;
  z_stream zs;
  size_t in_left = src_len, out_left = dst_len;
  memset(&zs, 0, sizeof(zs));
  zr = inflateInit(&zs);
  if (zr != Z_OK) {
    status = sl__codec_fail(err, zr == Z_MEM_ERROR ? SL_ENOMEM : SL_EINVAL, "zlib",
                            "inflateInit failed (%d)", zr);
    goto cleanup;
  }
  started = 1;
  zs.next_in = (Bytef *)(uintptr_t)src;
  zs.next_out = dst;
  for (;;) {
    uInt in_chunk, out_chunk;
    /* hand zlib at most UINT_MAX bytes at a time: its counters are 32-bit */
    if (zs.avail_in == 0) {
      in_chunk = in_left > UINT_MAX ? UINT_MAX : (uInt)in_left;
      zs.avail_in = in_chunk;
      in_left -= in_chunk;
    }
    if (zs.avail_out == 0) {
      out_chunk = out_left > UINT_MAX ? UINT_MAX : (uInt)out_left;
      zs.avail_out = out_chunk;
      out_left -= out_chunk;
    }
    zr = inflate(&zs, Z_NO_FLUSH);
    if (zr == Z_STREAM_END) break;
    if (zr == Z_OK) continue; /* progress was made */
    if (zr == Z_BUF_ERROR) {
      /* no progress: out of input (the stream is cut short, perhaps only in its
       * checksum, after every byte of the data) or out of room while input
       * remains (the stream goes on past the declared size) */
      if (zs.avail_out == 0 && out_left == 0 && (zs.avail_in != 0 || in_left != 0)) {
        status = sl__codec_fail(err, SL_EINVAL, "zlib",
                                "the stream decompresses past the %zu bytes declared", dst_len);
      } else {
        status = sl__codec_fail(err, SL_EINVAL, "zlib", "the stream is truncated");
      }
      goto cleanup;
    }
    status = sl__codec_fail(err, zr == Z_MEM_ERROR ? SL_ENOMEM : SL_EINVAL, "zlib",
                            "corrupt payload: %s", zs.msg ? zs.msg : "inflate failed");
    goto cleanup;
  }
  if (zs.avail_out != 0 || out_left != 0) {
    status = sl__codec_fail(err, SL_EINVAL, "zlib", "the stream ends after %zu of %zu bytes",
                            dst_len - out_left - zs.avail_out, dst_len);
    goto cleanup;
  }
  if (zs.avail_in != 0 || in_left != 0) {
    status = sl__codec_fail(err, SL_EINVAL, "zlib", "%zu bytes follow the zlib stream",
                            (size_t)zs.avail_in + in_left);
    goto cleanup;
  }
  status = SL_OK;
cleanup:
  if (started) inflateEnd(&zs);
  return status;
}

/* "codec 'int8': ..." from an inner codec becomes "codec 'zstd': inner codec
 * 'int8': ..." (its metadata keys are the ones after "inner."). */
static void wrap_inner_error(sl_err *err, int status, const char *name) {
  char inner_msg[SL_ERR_MSG_MAX];
  if (err == NULL) return;
  memcpy(inner_msg, err->msg, sizeof(inner_msg));
  inner_msg[sizeof(inner_msg) - 1] = '\0';
  sl__codec_fail(err, status, name, "inner %s", inner_msg);
}

int sl__compress_decode(sl_compression algorithm, const sl_tensor_desc *desc, size_t numel,
                        size_t nbytes, const void *payload, size_t payload_len,
                        const sl_meta *meta, void *out, sl_err *err) {
  int status = -1;
  const char *name = algo_name(algorithm);
  const sl_meta_value *vin, *vlen;
  const sl__codec_entry *inner;
  sl_meta view = {0};
  size_t limit = 0, inner_len;
  void *tmp = NULL;
  status = sl__meta_need(meta, name, "inner", SL_META_STRING, &vin, err);
  if (status != SL_OK) goto cleanup;
  status = sl__meta_need(meta, name, "inner_len", SL_META_INT, &vlen, err);
  if (status != SL_OK) goto cleanup;
  inner = strlen(vin->bytes) == vin->len ? sl__codec_lookup(vin->bytes) : NULL;
  if (inner == NULL || inner->kind == SL_CODEC_KIND_COMPRESSED) {
    status = sl__codec_fail(err, SL_EINVAL, name,
                            "metadata 'inner' is '%.32s', not a codec that can be compressed",
                            vin->bytes);
    goto cleanup;
  }
  if (!sl__codec_kind_accepts(inner->kind, desc->dtype)) {
    status = sl__codec_fail(err, SL_EINVAL, name, "inner codec '%s' does not decode to %s",
                            inner->name, sl_dtype_name(desc->dtype));
    goto cleanup;
  }
  if (inner_meta_view(meta, &view) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, name, "out of memory");
    goto cleanup;
  }
  status = inner->payload_max(desc, numel, nbytes, &view, &limit, err);
  if (status != SL_OK) {
    wrap_inner_error(err, status, name);
    goto cleanup;
  }
  if (vlen->i < 0 || (uint64_t)vlen->i > (uint64_t)limit) {
    status = sl__codec_fail(err, SL_EINVAL, name,
                            "metadata 'inner_len' is %lld; a '%s' payload of this tensor has at "
                            "most %zu bytes",
                            (long long)vlen->i, inner->name, limit);
    goto cleanup;
  }
  inner_len = (size_t)vlen->i;
  if (inner->kind == SL_CODEC_KIND_RAW) {
    if (inner_len != nbytes) {
      status = sl__codec_fail(err, SL_EINVAL, name,
                              "metadata 'inner_len' is %zu; the tensor has %zu bytes", inner_len,
                              nbytes);
      goto cleanup;
    }
    status = algorithm == SL_COMPRESS_ZSTD ? zstd_inflate(payload, payload_len, out, nbytes, err)
                                           : zlib_inflate(payload, payload_len, out, nbytes, err);
    goto cleanup;
  }
  if (sl_storage_alloc(inner_len, &tmp) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, name, "cannot allocate %zu bytes", inner_len);
    goto cleanup;
  }
  status = algorithm == SL_COMPRESS_ZSTD ? zstd_inflate(payload, payload_len, tmp, inner_len, err)
                                         : zlib_inflate(payload, payload_len, tmp, inner_len, err);
  if (status != SL_OK) goto cleanup;
  status = inner->decode(desc, numel, nbytes, tmp, inner_len, &view, out, err);
  if (status != SL_OK) wrap_inner_error(err, status, name);
cleanup:
  sl_storage_free(tmp);
  free(view.items);
  return status;
}
