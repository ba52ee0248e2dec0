/* fuzz_shape.c: libFuzzer target for shape validation (sl_desc_from_wire and
 * sl_desc_nbytes), checked against an independent computation in 128-bit
 * arithmetic: a shape is accepted exactly when no dimension is negative and
 * every contiguous byte stride (zero dimensions counted as 1) fits in int64,
 * and the byte count is then the exact product.
 *
 * Input: dtype (1 byte), ndim (1 byte, modulo SL_MAX_NDIM + 2, so that one too
 * many is tried), then ndim little-endian int32 dimensions (missing bytes are 0).
 */
#include <stdint.h>
#include <string.h>

#include "tensor.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  int32_t shape[SL_MAX_NDIM + 1];
  size_t ndim, itemsize, nbytes = 0, i;
  sl_dtype dtype;
  sl_tensor_desc desc;
  sl_err err;
  int rc, expect_ok = 1, empty = 0;
  unsigned __int128 extent, product = 1;
  char buf[64];

  if (size < 2) return 0;
  dtype = (sl_dtype)(data[0] % SL_DTYPE_COUNT);
  ndim = data[1] % (SL_MAX_NDIM + 2);
  data += 2;
  size -= 2;
  memset(shape, 0, sizeof(shape));
  for (i = 0; i < ndim && i * 4 < size; i++) {
    uint8_t b[4] = {0, 0, 0, 0};
    memcpy(b, data + i * 4, size - i * 4 < 4 ? size - i * 4 : 4);
    shape[i] = (int32_t)((uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                         (uint32_t)b[3] << 24);
  }
  itemsize = sl_dtype_itemsize(dtype);
  extent = itemsize;
  if (ndim > SL_MAX_NDIM || itemsize == 0) expect_ok = 0;
  for (i = 0; expect_ok && i < ndim; i++) {
    if (shape[i] < 0) {
      expect_ok = 0;
      break;
    }
    if (shape[i] == 0) {
      empty = 1;
    } else {
      extent *= (unsigned)shape[i];
      product *= (unsigned)shape[i];
    }
    if (extent > (unsigned __int128)INT64_MAX) expect_ok = 0;
  }
  sl_err_clear(&err);
  rc = sl_desc_from_wire(dtype, shape, ndim, &desc, &nbytes, &err);
  if ((rc == SL_OK) != expect_ok) __builtin_trap();
  if (rc != SL_OK) {
    if (err.code != SL_STATUS_INVALID_ARGUMENT) __builtin_trap();
    return 0;
  }
  if (nbytes != (empty ? 0 : (size_t)(product * itemsize))) __builtin_trap();
  if (sl_desc_nbytes(&desc, &nbytes) != SL_OK) __builtin_trap();
  /* the raw codec's length check agrees, one byte either way */
  if (sl_desc_check_len(&desc, nbytes, &err) != SL_OK) __builtin_trap();
  if (sl_desc_check_len(&desc, nbytes + 1, &err) == SL_OK) __builtin_trap();
  sl_desc_format_shape(&desc, buf, sizeof(buf));
  if (strlen(buf) >= sizeof(buf)) __builtin_trap();
  return 0;
}
