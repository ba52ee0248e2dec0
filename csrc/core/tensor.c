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
 * Every block carries a 64-byte header (its usable size, and when it entered the
 * pool) in front of the data, so that the data stays 64-byte aligned and
 * sl_storage_free() knows the size. Freed blocks of at least SL_POOL_MIN_BYTES are
 * kept in a small pool keyed by size: split learning sends the same shapes every
 * step, and reusing a block saves the page faults of a fresh allocation (a 32 MiB
 * receive costs ~20 ms more without it). The pool is process-wide, guarded by a
 * mutex, and bounded in blocks and bytes (sl_storage_pool_set_limit);
 * sl_storage_release_idle() gives back what has sat unused, and the allocator's
 * free pages with it. Its floor (64 KiB) and block count (128) let the many
 * mid-sized tensors of a structure (a KV cache: 24 x 192 KiB per call) be reused
 * too: below 256 KiB each one cost a fresh allocation and its page faults, about
 * 9 us per tensor per call.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <time.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#define SL_POOL_MIN_BYTES ((size_t)64 * 1024)
#define SL_POOL_MAX_BLOCKS 128
#define SL_POOL_DEFAULT_BYTES ((size_t)256 * 1024 * 1024)

typedef struct pool_block {
  size_t size;      /* usable bytes */
  double pooled_at; /* monotonic seconds when it entered the pool */
  int mapped;       /* 1: its own mmap (munmap'd when freed); 0: from malloc */
} pool_block;

/* Blocks this big get their own mapping: freed, they leave the process at once,
 * where glibc (whose mmap threshold grows with each large free, up to 32 MiB)
 * would keep them in an arena, fragmenting it. */
#define SL_MMAP_MIN_BYTES ((size_t)1024 * 1024)

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static void *pool_blocks[SL_POOL_MAX_BLOCKS]; /* base pointers (header included) */
static size_t pool_count;
static size_t pool_bytes;
static size_t pool_limit = SL_POOL_DEFAULT_BYTES;

static double mono_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void block_free(void *base) {
  pool_block *b = base;
  if (b->mapped)
    munmap(base, SL_STORAGE_ALIGN + b->size);
  else
    free(base);
}

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

/* Remove pool entry i (pool_mu held); returns its base pointer for the caller to
 * free once the lock is dropped. */
static void *pool_remove(size_t i) {
  void *old = pool_blocks[i];
  pool_bytes -= ((pool_block *)old)->size;
  pool_blocks[i] = pool_blocks[--pool_count];
  return old;
}

/* Keep `base` in the pool; returns 0 when there is no room (caller frees). The
 * oldest blocks make room for a newer one; blocks over the limit are freed after
 * the lock is dropped. */
static int pool_put(void *base, size_t size) {
  void *drop[SL_POOL_MAX_BLOCKS];
  size_t n_drop = 0;
  int kept = 0;
  pthread_mutex_lock(&pool_mu);
  if (size <= pool_limit) {
    while (pool_count > 0 && (pool_bytes + size > pool_limit || pool_count == SL_POOL_MAX_BLOCKS))
      drop[n_drop++] = pool_remove(0);
    ((pool_block *)base)->pooled_at = mono_now();
    pool_blocks[pool_count++] = base;
    pool_bytes += size;
    kept = 1;
  }
  pthread_mutex_unlock(&pool_mu);
  while (n_drop > 0) block_free(drop[--n_drop]);
  return kept;
}

int sl_storage_alloc(size_t nbytes, void **out) {
  void *base = NULL;
  size_t size;
  *out = NULL;
  if (nbytes > SIZE_MAX - 2 * 4096 - SL_STORAGE_ALIGN) return SL_ENOMEM;
  size = round_size(nbytes);
  if (size >= SL_POOL_MIN_BYTES) base = pool_take(size);
  if (base == NULL && size >= SL_MMAP_MIN_BYTES) {
    /* size is a multiple of 4096 here, and the header one alignment unit */
    base = mmap(NULL, SL_STORAGE_ALIGN + size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                -1, 0);
    if (base == MAP_FAILED) return SL_ENOMEM;
    ((pool_block *)base)->size = size;
    ((pool_block *)base)->mapped = 1;
  } else if (base == NULL) {
    if (posix_memalign(&base, SL_STORAGE_ALIGN, SL_STORAGE_ALIGN + size) != 0) return SL_ENOMEM;
    ((pool_block *)base)->size = size;
    ((pool_block *)base)->mapped = 0;
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
  block_free(base);
}

/* Free the pooled blocks that entered the pool at least `min_age_s` ago (all of
 * them for min_age_s <= 0); returns the bytes freed. */
static size_t pool_release(double min_age_s) {
  void *drop[SL_POOL_MAX_BLOCKS];
  size_t n_drop = 0, bytes = 0;
  double cutoff = mono_now() - min_age_s;
  pthread_mutex_lock(&pool_mu);
  for (size_t i = pool_count; i-- > 0;) {
    pool_block *b = pool_blocks[i];
    if (min_age_s <= 0 || b->pooled_at <= cutoff) {
      bytes += b->size;
      drop[n_drop++] = pool_remove(i);
    }
  }
  pthread_mutex_unlock(&pool_mu);
  while (n_drop > 0) block_free(drop[--n_drop]);
  return bytes;
}

void sl_storage_pool_trim(void) { (void)pool_release(0); }

void sl_storage_pool_set_limit(size_t max_bytes) {
  void *drop[SL_POOL_MAX_BLOCKS];
  size_t n_drop = 0;
  pthread_mutex_lock(&pool_mu);
  pool_limit = max_bytes;
  while (pool_count > 0 && pool_bytes > pool_limit) drop[n_drop++] = pool_remove(0);
  pthread_mutex_unlock(&pool_mu);
  while (n_drop > 0) block_free(drop[--n_drop]);
}

void sl_storage_pool_stats(size_t *bytes, size_t *blocks, size_t *limit) {
  pthread_mutex_lock(&pool_mu);
  if (bytes != NULL) *bytes = pool_bytes;
  if (blocks != NULL) *blocks = pool_count;
  if (limit != NULL) *limit = pool_limit;
  pthread_mutex_unlock(&pool_mu);
}

void sl_storage_trim_allocator(void) {
#if defined(__GLIBC__)
  /* glibc keeps freed memory in its arenas (one per thread that allocated, up to
   * 8 per core), and its dynamic mmap threshold grows with every large free, so
   * after a burst of large messages most of it stays resident. malloc_trim gives
   * each arena's free pages back to the system. */
  malloc_trim(0);
#endif
}

static void arena_tops_release(void);

size_t sl_storage_release_idle(double min_age_s) {
  size_t bytes = pool_release(min_age_s);
  arena_tops_release();
  sl_storage_trim_allocator();
  return bytes;
}

/* ---- the C allocator's thresholds (sl_malloc_tune) ---- */

#define SL_MALLOC_MMAP_THRESHOLD (32 * 1024 * 1024) /* glibc's DEFAULT_MMAP_THRESHOLD_MAX */
/* what an arena keeps free at its top: one 32 MiB message's read buffers stay for
 * the next message (glibc's own rule would keep twice the mmap threshold, which
 * let a 256 MiB message peak at up to 1.8x its size on a server instead of 1.3x) */
#define SL_MALLOC_TRIM_THRESHOLD SL_MALLOC_MMAP_THRESHOLD

static pthread_once_t malloc_tune_once = PTHREAD_ONCE_INIT;
static atomic_int malloc_tuned;

static void malloc_tune_run(void) {
#if defined(__GLIBC__)
  const char *v = getenv("SPLITLEARN_MALLOC_TUNING");
  if (v != NULL && strcmp(v, "0") == 0) return;
  /* setting either turns glibc's dynamic thresholds off: set both (the mmap one to
   * the most that rule reaches) */
  atomic_store(&malloc_tuned, mallopt(M_MMAP_THRESHOLD, SL_MALLOC_MMAP_THRESHOLD) == 1 &&
                                  mallopt(M_TRIM_THRESHOLD, SL_MALLOC_TRIM_THRESHOLD) == 1);
#endif
}

int sl_malloc_tune(void) {
  pthread_once(&malloc_tune_once, malloc_tune_run);
  return atomic_load(&malloc_tuned);
}

/* ---- the tops of glibc's per-thread arenas ----
 *
 * malloc_trim() gives back the free pages inside each arena but not the free
 * space at the top of a thread's arena (only the main one's): glibc shrinks that
 * when a free in the arena finds the top over the trim threshold, which
 * sl_malloc_tune() raised. So each thread that makes or serves calls keeps one
 * small block from its own arena (a token), and the release frees every token
 * with the threshold lowered for the moment: each free trims its arena's top. A
 * thread takes a new token on its next call. */

#define SL_ARENA_TOKEN_BYTES ((size_t)128 * 1024) /* freed, it reaches glibc's trim check
                                                     (64 KiB and more) */
#define SL_ARENA_MAX_TOKENS 256

static pthread_mutex_t token_mu = PTHREAD_MUTEX_INITIALIZER;
static void *tokens[SL_ARENA_MAX_TOKENS]; /* guarded by token_mu */
static size_t n_tokens;
static atomic_uint token_gen = 1; /* the release's count; a thread holds a token of it */
static _Thread_local unsigned my_token_gen;

void sl_malloc_arena_note(void) {
  unsigned gen;
  void *t;
  if (!atomic_load_explicit(&malloc_tuned, memory_order_relaxed)) return;
  gen = atomic_load_explicit(&token_gen, memory_order_relaxed);
  if (my_token_gen == gen) return;
  t = malloc(SL_ARENA_TOKEN_BYTES);
  if (t == NULL) return;
  pthread_mutex_lock(&token_mu);
  if (n_tokens < SL_ARENA_MAX_TOKENS && gen == atomic_load(&token_gen)) {
    tokens[n_tokens++] = t;
    t = NULL;
    my_token_gen = gen;
  }
  pthread_mutex_unlock(&token_mu);
  free(t);
}

/* Free every token with a low trim threshold: each arena a token came from gives
 * back the free space at its top. */
static void arena_tops_release(void) {
#if defined(__GLIBC__)
  void *taken[SL_ARENA_MAX_TOKENS];
  size_t n;
  if (!atomic_load(&malloc_tuned)) return;
  pthread_mutex_lock(&token_mu);
  atomic_fetch_add(&token_gen, 1);
  n = n_tokens;
  memcpy(taken, tokens, n * sizeof(*taken));
  n_tokens = 0;
  pthread_mutex_unlock(&token_mu);
  if (n == 0) return;
  mallopt(M_TRIM_THRESHOLD, (int)SL_ARENA_TOKEN_BYTES);
  while (n > 0) free(taken[--n]);
  mallopt(M_TRIM_THRESHOLD, SL_MALLOC_TRIM_THRESHOLD);
#endif
}
