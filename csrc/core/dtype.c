/* dtype.c: see dtype.h. */
#include "dtype.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "sl_common.h"

/* DLPack codes, as numbered by dlpack.h (kDLInt 0, kDLUInt 1, kDLFloat 2,
 * kDLBfloat 4, kDLComplex 5) plus kDLBool 6. */
enum { DL_INT = 0, DL_UINT = 1, DL_FLOAT = 2, DL_BFLOAT = 4, DL_COMPLEX = 5 };

typedef struct dtype_row {
  const char *name;
  uint8_t code;
  uint8_t bits;
} dtype_row;

static const dtype_row table[SL_DTYPE_COUNT] = {
    [SL_DTYPE_INVALID] = {"", 0, 0},
    [SL_DTYPE_FLOAT16] = {"float16", DL_FLOAT, 16},
    [SL_DTYPE_BFLOAT16] = {"bfloat16", DL_BFLOAT, 16},
    [SL_DTYPE_FLOAT32] = {"float32", DL_FLOAT, 32},
    [SL_DTYPE_FLOAT64] = {"float64", DL_FLOAT, 64},
    [SL_DTYPE_COMPLEX64] = {"complex64", DL_COMPLEX, 64},
    [SL_DTYPE_COMPLEX128] = {"complex128", DL_COMPLEX, 128},
    [SL_DTYPE_INT8] = {"int8", DL_INT, 8},
    [SL_DTYPE_INT16] = {"int16", DL_INT, 16},
    [SL_DTYPE_INT32] = {"int32", DL_INT, 32},
    [SL_DTYPE_INT64] = {"int64", DL_INT, 64},
    [SL_DTYPE_UINT8] = {"uint8", DL_UINT, 8},
    [SL_DTYPE_UINT16] = {"uint16", DL_UINT, 16},
    [SL_DTYPE_UINT32] = {"uint32", DL_UINT, 32},
    [SL_DTYPE_UINT64] = {"uint64", DL_UINT, 64},
    [SL_DTYPE_BOOL] = {"bool", SL_DLPACK_BOOL_CODE, 8},
};

static int valid(sl_dtype dt) { return dt > SL_DTYPE_INVALID && dt < SL_DTYPE_COUNT; }

const char *sl_dtype_name(sl_dtype dt) { return valid(dt) ? table[dt].name : ""; }

static char names[256];
static pthread_once_t names_once = PTHREAD_ONCE_INIT;

static void make_names(void) {
  size_t used = 0;
  for (int dt = SL_DTYPE_INVALID + 1; dt < SL_DTYPE_COUNT; dt++) {
    used += (size_t)snprintf(names + used, sizeof(names) - used, "%s%s",
                             dt > SL_DTYPE_INVALID + 1 ? ", " : "", table[dt].name);
    if (used >= sizeof(names)) break;
  }
}

const char *sl_dtype_names(void) {
  pthread_once(&names_once, make_names);
  return names;
}

size_t sl_dtype_itemsize(sl_dtype dt) { return valid(dt) ? table[dt].bits / 8u : 0u; }

int sl_dtype_from_name(const char *name, size_t len, sl_dtype *out) {
  int i;
  if (len == 0) {
    *out = SL_DTYPE_FLOAT32;
    return SL_OK;
  }
  for (i = 1; i < SL_DTYPE_COUNT; i++) {
    if (strlen(table[i].name) == len && memcmp(table[i].name, name, len) == 0) {
      *out = (sl_dtype)i;
      return SL_OK;
    }
  }
  *out = SL_DTYPE_INVALID;
  return SL_EINVAL;
}

int sl_dtype_from_dlpack(uint8_t code, uint8_t bits, uint16_t lanes, sl_dtype *out) {
  int i;
  *out = SL_DTYPE_INVALID;
  if (lanes != 1) return SL_EINVAL;
  /* NumPy exports bool as kDLBool (8 bits); older producers used kDLUInt 1 bit
   * is not a thing in practice, so only the current form is accepted. */
  for (i = 1; i < SL_DTYPE_COUNT; i++) {
    if (table[i].code == code && table[i].bits == bits) {
      *out = (sl_dtype)i;
      return SL_OK;
    }
  }
  return SL_EINVAL;
}

void sl_dtype_to_dlpack(sl_dtype dt, uint8_t *code, uint8_t *bits) {
  *code = valid(dt) ? table[dt].code : 0;
  *bits = valid(dt) ? table[dt].bits : 0;
}
