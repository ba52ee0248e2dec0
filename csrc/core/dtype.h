/* dtype.h: the element types that cross the wire, their wire names (spelled as
 * PyTorch spells them) and their DLPack codes. Pure data; nothing is allocated. */
#ifndef SL_DTYPE_H
#define SL_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sl_dtype {
  SL_DTYPE_INVALID = 0,
  SL_DTYPE_FLOAT16,
  SL_DTYPE_BFLOAT16,
  SL_DTYPE_FLOAT32,
  SL_DTYPE_FLOAT64,
  SL_DTYPE_COMPLEX64,
  SL_DTYPE_COMPLEX128,
  SL_DTYPE_INT8,
  SL_DTYPE_INT16,
  SL_DTYPE_INT32,
  SL_DTYPE_INT64,
  SL_DTYPE_UINT8,
  SL_DTYPE_UINT16,
  SL_DTYPE_UINT32,
  SL_DTYPE_UINT64,
  SL_DTYPE_BOOL,
  SL_DTYPE_COUNT
} sl_dtype;

/* DLPack's type code for booleans (added in DLPack 0.8; Debian's dlpack.h 0.6
 * lacks it, but PyTorch and NumPy use it). */
#define SL_DLPACK_BOOL_CODE 6

/* The wire name ("float32", ...), a static string; "" for an invalid dtype. */
const char *sl_dtype_name(sl_dtype dt);

/* Every dtype's wire name, "float16, bfloat16, ..., bool" (a static string made
 * from the dtype table: the one list, for messages and for Python). */
const char *sl_dtype_names(void);

/* Bytes per element; 0 for an invalid dtype. */
size_t sl_dtype_itemsize(sl_dtype dt);

/* Look up a wire name of `len` bytes (not necessarily NUL-terminated). The empty
 * name means float32 (a message from a peer that predates dtypes). Returns SL_OK
 * or SL_EINVAL. */
int sl_dtype_from_name(const char *name, size_t len, sl_dtype *out);

/* Map a DLPack (code, bits, lanes) triple; SL_EINVAL when unsupported. */
int sl_dtype_from_dlpack(uint8_t code, uint8_t bits, uint16_t lanes, sl_dtype *out);

/* The DLPack (code, bits) of a dtype; lanes are always 1. */
void sl_dtype_to_dlpack(sl_dtype dt, uint8_t *code, uint8_t *bits);

#ifdef __cplusplus
}
#endif

#endif /* SL_DTYPE_H */
