/* tensor.c: see tensor.h. */
#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sl_desc_nbytes(const sl_tensor_desc *desc, size_t *nbytes) {
  size_t total = sl_dtype_itemsize(desc->dtype);
  int i;
  if (total == 0 || desc->ndim < 0 || desc->ndim > SL_MAX_NDIM) return SL_EINVAL;
  for (i = 0; i < desc->ndim; i++) {
    int64_t d = desc->shape[i];
    if (d < 0) return SL_EINVAL;
    if (d == 0) {
      total = 0;
      continue;
    }
    if (total != 0 && (uint64_t)d > SIZE_MAX / total) {
      /* keep scanning: a later zero dimension makes the tensor empty, and a
       * later negative one must still be reported as such */
      int j;
      for (j = i + 1; j < desc->ndim; j++) {
        if (desc->shape[j] < 0) return SL_EINVAL;
        if (desc->shape[j] == 0) {
          *nbytes = 0;
          return SL_OK;
        }
      }
      return SL_EOVERFLOW;
    }
    total *= (size_t)d;
  }
  *nbytes = total;
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
                      "shape %s of %s overflows the addressable size", shp, sl_dtype_name(dtype));
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

int sl_storage_alloc(size_t nbytes, void **out) {
  void *p = NULL;
  size_t size = nbytes;
  *out = NULL;
  if (size < SL_STORAGE_ALIGN) size = SL_STORAGE_ALIGN;
  if (size > SIZE_MAX - SL_STORAGE_ALIGN) return SL_ENOMEM;
  /* round up so that vectorised readers may touch the whole last line */
  size = (size + SL_STORAGE_ALIGN - 1) & ~(size_t)(SL_STORAGE_ALIGN - 1);
  if (posix_memalign(&p, SL_STORAGE_ALIGN, size) != 0) return SL_ENOMEM;
  *out = p;
  return SL_OK;
}

void sl_storage_free(void *p) { free(p); }
