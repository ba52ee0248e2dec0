/* tensor.h: tensor descriptors, shape validation and tensor storage.
 *
 * A descriptor (sl_tensor_desc) is a plain value: dtype, rank and shape, no
 * pointers. Storage returned by sl_storage_alloc() is 64-byte aligned and owned by
 * the caller until handed on; it is freed with sl_storage_free() from any thread
 * (no GIL, no lock held by the caller is needed).
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_TENSOR_H
#define SL_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "sl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most dimensions a tensor may have (NumPy's limit; PyTorch allows fewer). */
#define SL_MAX_NDIM 64

/* The largest gRPC message: its length travels as a 32-bit prefix and protobuf
 * limits a message to 2 GiB - 1. */
#define SL_MAX_MESSAGE_BYTES ((size_t)2147483647u)

/* Alignment of every tensor storage this library allocates. */
#define SL_STORAGE_ALIGN 64

typedef struct sl_tensor_desc {
  sl_dtype dtype;
  int ndim; /* 0 for a scalar */
  int64_t shape[SL_MAX_NDIM];
} sl_tensor_desc;

/* Fill `desc` from a wire shape (int32 values, as the proto carries them) and a
 * dtype, checking that no dimension is negative and that the byte count fits in
 * size_t; `*nbytes` gets the byte count. On failure fills `err` with
 * INVALID_ARGUMENT naming the bad dimension. */
int sl_desc_from_wire(sl_dtype dtype, const int32_t *shape, size_t ndim, sl_tensor_desc *desc,
                      size_t *nbytes, sl_err *err);

/* Byte count of a descriptor (elements times itemsize), with overflow and sign
 * checks. A shape is valid only if every byte stride of its contiguous layout
 * fits in int64, zero dimensions counted as 1 (what PyTorch and NumPy require
 * before they accept a tensor): an empty tensor with huge other dimensions is
 * refused too. Returns SL_OK, SL_EINVAL (negative dimension or bad dtype) or
 * SL_EOVERFLOW. */
int sl_desc_nbytes(const sl_tensor_desc *desc, size_t *nbytes);

/* Check that `data_len` bytes on the wire are exactly what `desc` needs (raw codec).
 * On mismatch fills `err` with INVALID_ARGUMENT saying both numbers. */
int sl_desc_check_len(const sl_tensor_desc *desc, size_t data_len, sl_err *err);

/* Format a shape as "[2, 3, 4]" into buf (always NUL-terminated). */
void sl_desc_format_shape(const sl_tensor_desc *desc, char *buf, size_t buflen);

/* Allocate `nbytes` of 64-byte aligned storage (at least one alignment unit, so
 * that an empty tensor still has a valid pointer), reusing a pooled block of the
 * same size when there is one. Returns SL_OK or SL_ENOMEM. The
 * caller owns `*out` and frees it with sl_storage_free(). */
int sl_storage_alloc(size_t nbytes, void **out);

/* Free storage from sl_storage_alloc(); NULL is a no-op. Safe from any thread.
 * Blocks of 64 KiB and more go back to a small bounded pool (128 blocks, and at
 * most sl_storage_pool_set_limit() bytes, 256 MiB by default; the oldest blocks
 * leave first) and are reused by the next allocation of the same size. */
void sl_storage_free(void *p);

/* Free every pooled block (tests, and processes that want the memory back). */
void sl_storage_pool_trim(void);

/* Bound the pool to `max_bytes` (0: no pooling); blocks over it are freed now.
 * Process-wide, safe from any thread. */
void sl_storage_pool_set_limit(size_t max_bytes);

/* What the pool holds now, and its limit; any pointer may be NULL. */
void sl_storage_pool_stats(size_t *bytes, size_t *blocks, size_t *limit);

/* Give memory back to the system after a busy period: free the pooled blocks that
 * have sat unused for at least `min_age_s` seconds (all for <= 0), the free tops
 * of the threads' arenas (sl_malloc_arena_note), then ask the C allocator to
 * return its free pages (glibc: malloc_trim). Returns the pool bytes
 * freed. Costs a walk of the allocator's arenas: call it when idle, not per call
 * (the server does, once a second of quiet follows calls). */
size_t sl_storage_release_idle(double min_age_s);

/* Ask the C allocator to return its free pages to the system (glibc: malloc_trim;
 * elsewhere nothing). Milliseconds at most; safe from any thread. */
void sl_storage_trim_allocator(void);

/* Set glibc's malloc thresholds once per process: mmap 32 MiB (the most its
 * dynamic rule reaches) and trim 32 MiB; elsewhere, or with
 * SPLITLEARN_MALLOC_TUNING=0 in the environment, nothing. gRPC reads a large
 * message into slices of a few MiB from malloc, while our storage maps its large
 * blocks itself (so glibc never sees a large free and leaves its trim threshold
 * at twice the slices' size): each 32 MiB message then left more than that free
 * at the top of an arena, which glibc gave back, and the next message faulted it
 * all in again (a 32 MiB TCP round trip: ~45 ms untuned, ~30 ms tuned).
 * sl_server_start() and sl_client_create() call it; safe from any thread.
 * Returns 1 when it changed the allocator's settings (this call or an earlier
 * one), 0 when not. */
int sl_malloc_tune(void);

/* Called by a thread after each call it made or served: once per release it keeps
 * a small block of its own malloc arena, by which sl_storage_release_idle() gives
 * back the free space at the arena's top (which glibc's malloc_trim leaves, and
 * which the raised trim threshold keeps). Nothing unless sl_malloc_tune() changed
 * the allocator; a thread-local compare otherwise. */
void sl_malloc_arena_note(void);

#ifdef __cplusplus
}
#endif

#endif /* SL_TENSOR_H */
