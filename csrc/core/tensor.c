/* tensor.c: see tensor.h. */
#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sl_desc_nbytes(const sl_tensor_desc *desc, size_t *nbytes) {
  /* The extent is the byte stride of a dimension of size 1 placed in front of
   * the shape: itemsize times every dimension, zero dimensions counted as 1, as
   * PyTorch and NumPy compute contiguous strides. Every stride of the tensor
   * divides it, so one check keeps all of them within int64 even when a zero
   * dimension makes the tensor empty ([0, 2^31-1, 2^31-1, 2^31-1] has no bytes
   * but strides no consumer can represent). */
  uint64_t extent = sl_dtype_itemsize(desc->dtype);
  int empty = 0;
  int i;
  if (extent == 0 || desc->ndim < 0 || desc->ndim > SL_MAX_NDIM) return SL_EINVAL;
  for (i = 0; i < desc->ndim; i++) {
    if (desc->shape[i] < 0) return SL_EINVAL;
  }
  for (i = 0; i < desc->ndim; i++) {
    uint64_t d = (uint64_t)desc->shape[i];
    if (d == 0) {
      empty = 1;
      continue;
    }
    if (d > (uint64_t)INT64_MAX / extent) return SL_EOVERFLOW;
    extent *= d;
  }
  if (extent > (uint64_t)SIZE_MAX) return SL_EOVERFLOW;
  *nbytes = empty ? 0 : (size_t)extent;
  return SL_OK;
}

void sl_desc_format_shape(const sl_tensor_desc *desc, char *buf, size_t buflen) {
  size_t used = 0;
  int i;
  if (buflen == 0) return;
  buf[0] = '\0';
  used += (size_t)snprintf(buf, buflen, "[");
  for (i = 0; i < desc->ndim && used < buflen; i++) {
    used += (size_t)snprintf(buf + used, buflen - used, "%s%lld", i ? ", " : "",
                             (long long)desc->shape[i]);
  }
  if (used < buflen) snprintf(buf + used, buflen - used, "]");
}

int sl_desc_from_wire(sl_dtype dtype, const int32_t *shape, size_t ndim, sl_tensor_desc *desc,
                      size_t *nbytes, sl_err *err) {
  size_t i;
  int rc;
  char shp[128];
  if (ndim > SL_MAX_NDIM) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "tensor has %zu dimensions; at most %d are supported", ndim, SL_MAX_NDIM);
  }
  desc->dtype = dtype;
  desc->ndim = (int)ndim;
  for (i = 0; i < ndim; i++) {
    if (shape[i] < 0) {
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "shape dimension %zu is negative (%d)", i, (int)shape[i]);
    }
    desc->shape[i] = shape[i];
  }
  rc = sl_desc_nbytes(desc, nbytes);
  if (rc == SL_EOVERFLOW) {
    sl_desc_format_shape(desc, shp, sizeof(shp));
    return sl_err_set(err, rc, SL_STATUS_INVALID_ARGUMENT,
                      "shape %s of %s overflows: its byte strides do not fit in 64 bits",
                      shp, sl_dtype_name(dtype));
  }
  if (rc != SL_OK) {
    return sl_err_set(err, rc, SL_STATUS_INVALID_ARGUMENT, "invalid dtype or shape");
  }
  return SL_OK;
}

int sl_desc_check_len(const sl_tensor_desc *desc, size_t data_len, sl_err *err) {
  size_t need = 0;
  char shp[128];
  int rc = sl_desc_nbytes(desc, &need);
  if (rc != SL_OK) {
    return sl_err_set(err, rc, SL_STATUS_INVALID_ARGUMENT, "invalid dtype or shape");
  }
  if (need != data_len) {
    sl_desc_format_shape(desc, shp, sizeof(shp));
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "shape %s of %s needs %zu bytes but the message carries %zu", shp,
                      sl_dtype_name(desc->dtype), need, data_len);
  }
  return SL_OK;
}

/* ---- storage and its pool ----
 *
 * Every block carries a 64-byte header (its usable size) in front of the data, so
 * that the data stays 64-byte aligned and sl_storage_free() knows the size. Freed
 * blocks of at least SL_POOL_MIN_BYTES are kept in a small pool keyed by size:
 * split learning sends the same shapes every step, and reusing a block saves the
 * page faults of a fresh mmap (a 32 MiB receive costs ~20 ms more without it).
 * The pool is process-wide, guarded by a mutex, and bounded in blocks and bytes.
 * Its floor (64 KiB) and block count (128) let the many mid-sized tensors of a
 * structure (a KV cache: 24 x 192 KiB per call) be reused too: below 256 KiB each
 * one cost a fresh allocation and its page faults, about 9 us per tensor per call.
 */
#include <pthread.h>

#define SL_POOL_MIN_BYTES ((size_t)64 * 1024)
#define SL_POOL_MAX_BLOCKS 128
#define SL_POOL_MAX_BYTES ((size_t)512 * 1024 * 1024)

typedef struct pool_block {
  size_t size; /* usable bytes */
} pool_block;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static void *pool_blocks[SL_POOL_MAX_BLOCKS]; /* base pointers (header included) */
static size_t pool_count;
static size_t pool_bytes;

static size_t round_size(size_t nbytes) {
  size_t size = nbytes < SL_STORAGE_ALIGN ? SL_STORAGE_ALIGN : nbytes;
  size_t unit = size >= SL_POOL_MIN_BYTES ? 4096 : SL_STORAGE_ALIGN;
  return (size + unit - 1) & ~(unit - 1);
}

static void *pool_take(size_t size) {
  void *base = NULL;
  pthread_mutex_lock(&pool_mu);
  for (size_t i = pool_count; i-- > 0;) {
    if (((pool_block *)pool_blocks[i])->size == size) {
      base = pool_blocks[i];
      pool_blocks[i] = pool_blocks[--pool_count];
      pool_bytes -= size;
      break;
    }
  }
  pthread_mutex_unlock(&pool_mu);
  return base;
}

/* Keep `base` in the pool; returns 0 when there is no room (caller frees). */
static int pool_put(void *base, size_t size) {
  int kept = 0;
  pthread_mutex_lock(&pool_mu);
  if (pool_bytes + size > SL_POOL_MAX_BYTES && pool_count > 0) {
    /* make room by dropping the oldest blocks */
    while (pool_count > 0 && pool_bytes + size > SL_POOL_MAX_BYTES) {
      void *old = pool_blocks[0];
      pool_bytes -= ((pool_block *)old)->size;
      pool_blocks[0] = pool_blocks[--pool_count];
      free(old);
    }
  }
  if (pool_count < SL_POOL_MAX_BLOCKS && pool_bytes + size <= SL_POOL_MAX_BYTES) {
    pool_blocks[pool_count++] = base;
    pool_bytes += size;
    kept = 1;
  }
  pthread_mutex_unlock(&pool_mu);
  return kept;
}

int sl_storage_alloc(size_t nbytes, void **out) {
  void *base = NULL;
  size_t size;
  *out = NULL;
  if (nbytes > SIZE_MAX - 2 * 4096 - SL_STORAGE_ALIGN) return SL_ENOMEM;
  size = round_size(nbytes);
  if (size >= SL_POOL_MIN_BYTES) base = pool_take(size);
  if (base == NULL) {
    if (posix_memalign(&base, SL_STORAGE_ALIGN, SL_STORAGE_ALIGN + size) != 0) return SL_ENOMEM;
    ((pool_block *)base)->size = size;
  }
  *out = (char *)base + SL_STORAGE_ALIGN;
  return SL_OK;
}

void sl_storage_free(void *p) {
  void *base;
  size_t size;
  if (p == NULL) return;
  base = (char *)p - SL_STORAGE_ALIGN;
  size = ((pool_block *)base)->size;
  if (size >= SL_POOL_MIN_BYTES && pool_put(base, size)) return;
  free(base);
}

void sl_storage_pool_trim(void) {
  pthread_mutex_lock(&pool_mu);
  while (pool_count > 0) free(pool_blocks[--pool_count]);
  pool_bytes = 0;
  pthread_mutex_unlock(&pool_mu);
}
