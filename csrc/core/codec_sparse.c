/* codec_sparse.c: the "sparse_coo" codec: the non-zero elements of a tensor of
 * any dtype, exactly.
 *
 * An element is zero when all its bytes are zero, so -0.0, NaN payloads and
 * every other bit pattern are non-zero and come back bit for bit.
 *
 * Payload (little-endian), no metadata:
 *   uint64            nnz, the count of non-zero elements (<= numel)
 *   nnz x index       their flat C-order indices, strictly increasing; uint32
 *                     when numel < 2^32, else uint64 (the width follows from
 *                     the shape, so it is not sent)
 *   nnz x value       their bytes, itemsize each
 * Length: exactly 8 + nnz * (index width + itemsize).
 *
 * Decoding checks nnz against numel and the length before it reads anything
 * else, then every index (below numel, greater than the one before, so a
 * corrupt payload cannot write twice or out of place); it writes only the
 * caller's dense output, zeroed first.
 */
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "codec_internal.h"

#define NAME "sparse_coo"

static size_t index_width(size_t numel) {
  return (uint64_t)numel <= UINT32_MAX ? 4 : 8;
}

static int is_nonzero(const unsigned char *p, size_t isz) {
  switch (isz) {
    case 1: return p[0] != 0;
    case 2: {
      uint16_t v;
      memcpy(&v, p, 2);
      return v != 0;
    }
    case 4: {
      uint32_t v;
      memcpy(&v, p, 4);
      return v != 0;
    }
    case 8: {
      uint64_t v;
      memcpy(&v, p, 8);
      return v != 0;
    }
    case 16: {
      uint64_t v[2];
      memcpy(v, p, 16);
      return (v[0] | v[1]) != 0;
    }
    default: {
      size_t i;
      for (i = 0; i < isz; i++) {
        if (p[i]) return 1;
      }
      return 0;
    }
  }
}

static inline void put_le(unsigned char *p, uint64_t v, size_t width) {
  size_t i;
  for (i = 0; i < width; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static inline uint64_t get_le(const unsigned char *p, size_t width) {
  uint64_t v = 0;
  size_t i;
  for (i = 0; i < width; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

int sl__sparse_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                      const void *data, size_t nbytes, void **payload, size_t *payload_len,
                      sl_meta *meta, sl_err *err) {
  int status = -1;
  const unsigned char *src = data;
  size_t isz = sl_dtype_itemsize(desc->dtype), iw = index_width(numel);
  size_t nnz = 0, i, len, k;
  unsigned char *buf = NULL, *idx, *val;
  (void)c;
  (void)nbytes;
  (void)meta;
  for (i = 0; i < numel; i++) nnz += (size_t)is_nonzero(src + i * isz, isz);
  if (sl__mul_size(nnz, iw + isz, &len) || sl__add_size(len, 8, &len)) {
    status = sl__codec_fail(err, SL_EINVAL, NAME, "the payload size overflows");
    goto cleanup;
  }
  if (sl_storage_alloc(len, (void **)&buf) != SL_OK) {
    status = sl__codec_fail(err, SL_ENOMEM, NAME, "cannot allocate %zu bytes", len);
    goto cleanup;
  }
  put_le(buf, nnz, 8);
  idx = buf + 8;
  val = idx + nnz * iw;
  for (i = 0, k = 0; i < numel; i++) {
    const unsigned char *e = src + i * isz;
    if (!is_nonzero(e, isz)) continue;
    if (iw == 4) {
      put_le(idx + 4 * k, i, 4);
    } else {
      put_le(idx + 8 * k, i, 8);
    }
    memcpy(val + isz * k, e, isz);
    k++;
  }
  *payload = buf;
  *payload_len = len;
  buf = NULL;
  status = SL_OK;
cleanup:
  sl_storage_free(buf);
  return status;
}

int sl__sparse_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                           const sl_meta *meta, size_t *max_len, sl_err *err) {
  size_t isz = sl_dtype_itemsize(desc->dtype), len;
  (void)nbytes;
  (void)meta;
  if (sl__mul_size(numel, index_width(numel) + isz, &len) || sl__add_size(len, 8, max_len)) {
    return sl__codec_fail(err, SL_EINVAL, NAME, "the payload size overflows");
  }
  return SL_OK;
}

int sl__sparse_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                      const void *payload, size_t payload_len, const sl_meta *meta, void *out,
                      sl_err *err) {
  const unsigned char *p = payload, *idx, *val;
  unsigned char *dst = out;
  size_t isz = sl_dtype_itemsize(desc->dtype), iw = index_width(numel), need, k;
  uint64_t nnz, prev = 0;
  (void)meta;
  if (payload_len < 8) {
    return sl__codec_fail(err, SL_EINVAL, NAME,
                          "payload has %zu bytes; it needs at least 8 (the count)", payload_len);
  }
  nnz = get_le(p, 8);
  if (nnz > (uint64_t)numel) {
    return sl__codec_fail(err, SL_EINVAL, NAME,
                          "the payload counts %llu non-zero elements; the tensor has %zu",
                          (unsigned long long)nnz, numel);
  }
  /* nnz <= numel, so this cannot overflow unless the dense tensor nearly fills
   * the address space; check anyway */
  if (sl__mul_size((size_t)nnz, iw + isz, &need) || sl__add_size(need, 8, &need) ||
      payload_len != need) {
    return sl__codec_fail(err, SL_EINVAL, NAME,
                          "payload has %zu bytes; %llu non-zero elements of %s need %llu",
                          payload_len, (unsigned long long)nnz, sl_dtype_name(desc->dtype),
                          (unsigned long long)(8 + nnz * (iw + isz)));
  }
  if (nbytes > 0) memset(dst, 0, nbytes);
  idx = p + 8;
  val = idx + (size_t)nnz * iw;
  for (k = 0; k < (size_t)nnz; k++) {
    uint64_t i;
    i = iw == 4 ? get_le(idx + 4 * k, 4) : get_le(idx + 8 * k, 8);
    if (i >= (uint64_t)numel) {
      return sl__codec_fail(err, SL_EINVAL, NAME,
                            "index %llu (entry %zu) is out of range for %zu elements",
                            (unsigned long long)i, k, numel);
    }
    if (k > 0 && i <= prev) {
      return sl__codec_fail(err, SL_EINVAL, NAME,
                            "indices are not strictly increasing at entry %zu (%llu after %llu)",
                            k, (unsigned long long)i, (unsigned long long)prev);
    }
    prev = i;
    memcpy(dst + (size_t)i * isz, val + isz * k, isz);
  }
  return SL_OK;
}
