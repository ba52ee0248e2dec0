/* Unit tests: dtypes, tensor descriptors and validation, storage. */
#include <stdint.h>
#include <stdlib.h>

#include "dtype.h"
#include "sl_test.h"
#include "tensor.h"

static void test_dtype_names_roundtrip(void) {
  for (int i = 1; i < SL_DTYPE_COUNT; i++) {
    const char *name = sl_dtype_name((sl_dtype)i);
    sl_dtype back;
    CHECK(name[0] != '\0');
    CHECK_EQ_INT(sl_dtype_from_name(name, strlen(name), &back), SL_OK);
    CHECK_EQ_INT(back, i);
  }
}

static void test_dtype_empty_means_float32(void) {
  sl_dtype dt;
  CHECK_EQ_INT(sl_dtype_from_name("", 0, &dt), SL_OK);
  CHECK_EQ_INT(dt, SL_DTYPE_FLOAT32);
}

static void test_dtype_unknown(void) {
  sl_dtype dt;
  CHECK_EQ_INT(sl_dtype_from_name("float128", 8, &dt), SL_EINVAL);
  CHECK_EQ_INT(sl_dtype_from_name("float3", 6, &dt), SL_EINVAL);  /* prefix of a name */
  CHECK_EQ_INT(sl_dtype_from_name("float32x", 8, &dt), SL_EINVAL); /* longer than a name */
}

static void test_dtype_itemsizes(void) {
  CHECK_EQ_INT(sl_dtype_itemsize(SL_DTYPE_BOOL), 1);
  CHECK_EQ_INT(sl_dtype_itemsize(SL_DTYPE_BFLOAT16), 2);
  CHECK_EQ_INT(sl_dtype_itemsize(SL_DTYPE_COMPLEX128), 16);
  CHECK_EQ_INT(sl_dtype_itemsize(SL_DTYPE_INVALID), 0);
}

static void test_dtype_dlpack_roundtrip(void) {
  for (int i = 1; i < SL_DTYPE_COUNT; i++) {
    uint8_t code, bits;
    sl_dtype back;
    sl_dtype_to_dlpack((sl_dtype)i, &code, &bits);
    CHECK_EQ_INT(sl_dtype_from_dlpack(code, bits, 1, &back), SL_OK);
    CHECK_EQ_INT(back, i);
    CHECK_EQ_INT(sl_dtype_from_dlpack(code, bits, 4, &back), SL_EINVAL); /* vector lanes */
  }
  {
    sl_dtype dt;
    CHECK_EQ_INT(sl_dtype_from_dlpack(SL_DLPACK_BOOL_CODE, 8, 1, &dt), SL_OK);
    CHECK_EQ_INT(dt, SL_DTYPE_BOOL);
    CHECK_EQ_INT(sl_dtype_from_dlpack(2, 8, 1, &dt), SL_EINVAL); /* float8: not supported */
  }
}

static void test_nbytes(void) {
  sl_tensor_desc d = {SL_DTYPE_FLOAT32, 3, {2, 3, 4}};
  size_t n = 0;
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_OK);
  CHECK_EQ_INT(n, 96);
  d.ndim = 0; /* scalar */
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_OK);
  CHECK_EQ_INT(n, 4);
}

static void test_nbytes_empty_and_overflow(void) {
  sl_tensor_desc d = {SL_DTYPE_FLOAT64, 3, {0, 3, 4}};
  size_t n = 1;
  /* a zero dimension makes the tensor empty */
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_OK);
  CHECK_EQ_INT(n, 0);
  /* but not valid whatever the other dimensions: the strides of
   * [0, huge, huge] do not fit in int64, and PyTorch refuses it after taking it */
  d.shape[1] = INT64_MAX / 2;
  d.shape[2] = INT64_MAX / 2;
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_EOVERFLOW);
  d.shape[2] = 0;
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_EOVERFLOW);
  d.shape[2] = 2;
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_EOVERFLOW);
  d.shape[2] = -1;
  CHECK_EQ_INT(sl_desc_nbytes(&d, &n), SL_EINVAL);
  /* [0, 2^31-1, 2^31-1, 2^31-1] and [0, 65536 x4], the shapes that crashed D1 */
  sl_tensor_desc a = {SL_DTYPE_FLOAT32, 4, {0, INT32_MAX, INT32_MAX, INT32_MAX}};
  CHECK_EQ_INT(sl_desc_nbytes(&a, &n), SL_EOVERFLOW);
  sl_tensor_desc b = {SL_DTYPE_FLOAT32, 5, {0, 65536, 65536, 65536, 65536}};
  CHECK_EQ_INT(sl_desc_nbytes(&b, &n), SL_EOVERFLOW);
  /* the largest extent that fits: itemsize * dims == 2^62 */
  sl_tensor_desc c = {SL_DTYPE_FLOAT32, 3, {0, (int64_t)1 << 30, (int64_t)1 << 30}};
  CHECK_EQ_INT(sl_desc_nbytes(&c, &n), SL_OK);
  CHECK_EQ_INT(n, 0);
  c.shape[0] = 2; /* 2^63 bytes: one past INT64_MAX */
  CHECK_EQ_INT(sl_desc_nbytes(&c, &n), SL_EOVERFLOW);
}

static void test_from_wire_negative(void) {
  int32_t shape[] = {4, -3};
  sl_tensor_desc d;
  size_t n;
  sl_err err;
  sl_err_clear(&err);
  CHECK_EQ_INT(sl_desc_from_wire(SL_DTYPE_FLOAT32, shape, 2, &d, &n, &err), SL_EINVAL);
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.msg, "dimension 1 is negative");
}

static void test_from_wire_too_many_dims(void) {
  int32_t shape[SL_MAX_NDIM + 1];
  sl_tensor_desc d;
  size_t n;
  sl_err err;
  for (int i = 0; i <= SL_MAX_NDIM; i++) shape[i] = 1;
  CHECK_EQ_INT(sl_desc_from_wire(SL_DTYPE_UINT8, shape, SL_MAX_NDIM + 1, &d, &n, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "dimensions");
  CHECK_EQ_INT(sl_desc_from_wire(SL_DTYPE_UINT8, shape, SL_MAX_NDIM, &d, &n, &err), SL_OK);
  CHECK_EQ_INT(n, 1);
}

static void test_from_wire_overflow(void) {
  int32_t shape[] = {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX};
  sl_tensor_desc d;
  size_t n;
  sl_err err;
  CHECK_EQ_INT(sl_desc_from_wire(SL_DTYPE_FLOAT64, shape, 5, &d, &n, &err), SL_EOVERFLOW);
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.msg, "overflows");
}

static void test_check_len(void) {
  sl_tensor_desc d = {SL_DTYPE_INT16, 2, {3, 5}};
  sl_err err;
  CHECK_EQ_INT(sl_desc_check_len(&d, 30, &err), SL_OK);
  CHECK_EQ_INT(sl_desc_check_len(&d, 29, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "shape [3, 5] of int16 needs 30 bytes but the message carries 29");
}

static void test_storage_alignment(void) {
  size_t sizes[] = {0, 1, 63, 64, 65, 4096, 1 << 20};
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    void *p = NULL;
    CHECK_EQ_INT(sl_storage_alloc(sizes[i], &p), SL_OK);
    CHECK(p != NULL);
    CHECK_EQ_INT((uintptr_t)p % SL_STORAGE_ALIGN, 0);
    memset(p, 0xab, sizes[i]);
    sl_storage_free(p);
  }
  {
    void *p = (void *)1;
    CHECK_EQ_INT(sl_storage_alloc(SIZE_MAX - 10, &p), SL_ENOMEM);

    CHECK(p == NULL);
  }
}

static void test_storage_pool_reuses_same_size(void) {
  void *a = NULL, *b = NULL, *c = NULL;
  sl_storage_pool_trim();
  CHECK_EQ_INT(sl_storage_alloc(1 << 20, &a), SL_OK);
  memset(a, 1, 1 << 20);
  sl_storage_free(a);
  CHECK_EQ_INT(sl_storage_alloc(1 << 20, &b), SL_OK);
  CHECK(a == b); /* the pooled block came back */
  CHECK_EQ_INT(sl_storage_alloc(1 << 20, &c), SL_OK);
  CHECK(c != b);
  CHECK_EQ_INT((uintptr_t)c % SL_STORAGE_ALIGN, 0);
  sl_storage_free(b);
  sl_storage_free(c);
  sl_storage_pool_trim();
}

static void test_storage_pool_bounded_by_bytes(void) {
  void *blocks[4] = {NULL, NULL, NULL, NULL};
  size_t bytes = 0, count = 0, limit = 0;
  sl_storage_pool_trim();
  sl_storage_pool_set_limit((size_t)3 << 20); /* room for three 1 MiB blocks */
  for (int i = 0; i < 4; i++) CHECK_EQ_INT(sl_storage_alloc(1 << 20, &blocks[i]), SL_OK);
  for (int i = 0; i < 4; i++) sl_storage_free(blocks[i]);
  sl_storage_pool_stats(&bytes, &count, &limit);
  CHECK_EQ_INT(count, 3); /* the oldest made room for the newest */
  CHECK_EQ_INT(bytes, (size_t)3 << 20);
  CHECK_EQ_INT(limit, (size_t)3 << 20);
  sl_storage_pool_set_limit((size_t)1 << 20); /* lowering the bound frees at once */
  sl_storage_pool_stats(&bytes, &count, NULL);
  CHECK_EQ_INT(count, 1);
  CHECK_EQ_INT(bytes, (size_t)1 << 20);
  sl_storage_pool_set_limit(0); /* no pooling */
  CHECK_EQ_INT(sl_storage_alloc(1 << 20, &blocks[0]), SL_OK);
  sl_storage_free(blocks[0]);
  sl_storage_pool_stats(&bytes, &count, NULL);
  CHECK_EQ_INT(count, 0);
  CHECK_EQ_INT(bytes, 0);
  sl_storage_pool_set_limit((size_t)256 << 20);
}

static void test_storage_release_idle_by_age(void) {
  void *a = NULL;
  size_t count = 0;
  sl_storage_pool_trim();
  CHECK_EQ_INT(sl_storage_alloc(1 << 20, &a), SL_OK);
  sl_storage_free(a);
  CHECK_EQ_INT(sl_storage_release_idle(3600), 0); /* too young to go */
  sl_storage_pool_stats(NULL, &count, NULL);
  CHECK_EQ_INT(count, 1);
  CHECK_EQ_INT(sl_storage_release_idle(0), (size_t)1 << 20);
  sl_storage_pool_stats(NULL, &count, NULL);
  CHECK_EQ_INT(count, 0);
}

int main(void) {
  RUN(test_dtype_names_roundtrip);
  RUN(test_dtype_empty_means_float32);
  RUN(test_dtype_unknown);
  RUN(test_dtype_itemsizes);
  RUN(test_dtype_dlpack_roundtrip);
  RUN(test_nbytes);
  RUN(test_nbytes_empty_and_overflow);
  RUN(test_from_wire_negative);
  RUN(test_from_wire_too_many_dims);
  RUN(test_from_wire_overflow);
  RUN(test_check_len);
  RUN(test_storage_alignment);
  RUN(test_storage_pool_reuses_same_size);
  RUN(test_storage_pool_bounded_by_bytes);
  RUN(test_storage_release_idle_by_age);
  return sl_test_done("test_tensor");
}
