/* sl_common.h: status codes, the error record and allocation helpers shared by
 * every module of the splitlearn-comm C core.
 *
 * The core is pure C: it never includes a CPython API header. Every function that can fail returns an int:
 * SL_OK (0) or a negative SL_E* code; when it also takes an `sl_err *`, the record
 * holds the gRPC status code to report and a human-readable message naming what
 * went wrong. Out-parameters come last.
 *
 * Ownership rule, the same for every function of the core and the bindings:
 * a function that is given ownership of something (a buffer, a tensor with its
 * release callback, storage) owns it from the moment it is called, on every
 * path. When it fails, it has already freed or released what it was given; the
 * caller never cleans up after a failed call. A release callback therefore runs
 * exactly once whatever the outcome. Functions that only borrow say "borrowed";
 * out-parameters are owned by the caller only on success. Each header restates
 * the rule for its functions.
 */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SL_OK 0
#define SL_ENOMEM (-1)    /* allocation failed */
#define SL_EINVAL (-2)    /* invalid argument or malformed input */
#define SL_EOVERFLOW (-3) /* a size computation overflowed */
#define SL_ETOOBIG (-4)   /* over a message or size limit */
#define SL_ESTATE (-5)    /* called in the wrong state */
#define SL_EGRPC (-6)     /* the gRPC core refused an operation */
#define SL_ETIMEDOUT (-7) /* a wait ran out of time */
#define SL_EAGAIN (-8)    /* not done yet: call again */
#define SL_EINTR (-9)     /* interrupted by the caller's interrupt hook */
#define SL_ESTATUS (-10)  /* the call ended with a non-OK gRPC status */
#define SL_ENOTFOUND (-11)
#define SL_EUSER (-12)    /* a user hook failed; detail in the sl_err record */
#define SL_ECODEC (-13)   /* a codec failed, or is unknown; detail in the sl_err record */

/* gRPC status codes, numbered as in grpc/status.h, so that the core's callers do
 * not need the gRPC headers to read an sl_err. */
enum {
  SL_STATUS_OK = 0,
  SL_STATUS_CANCELLED = 1,
  SL_STATUS_UNKNOWN = 2,
  SL_STATUS_INVALID_ARGUMENT = 3,
  SL_STATUS_DEADLINE_EXCEEDED = 4,
  SL_STATUS_NOT_FOUND = 5,
  SL_STATUS_ALREADY_EXISTS = 6,
  SL_STATUS_PERMISSION_DENIED = 7,
  SL_STATUS_RESOURCE_EXHAUSTED = 8,
  SL_STATUS_FAILED_PRECONDITION = 9,
  SL_STATUS_ABORTED = 10,
  SL_STATUS_OUT_OF_RANGE = 11,
  SL_STATUS_UNIMPLEMENTED = 12,
  SL_STATUS_INTERNAL = 13,
  SL_STATUS_UNAVAILABLE = 14,
  SL_STATUS_DATA_LOSS = 15,
  SL_STATUS_UNAUTHENTICATED = 16
};

#define SL_ERR_MSG_MAX 512

/* An error record. Owned by whoever declares it (usually on the stack); it holds
 * no pointers, so there is nothing to free. */
typedef struct sl_err {
  int status;                /* the SL_E* code that was returned */
  int code;                  /* gRPC status code to report (SL_STATUS_*) */
  char msg[SL_ERR_MSG_MAX];  /* NUL-terminated message */
} sl_err;

/* Clear `err` (status 0, code OK, empty message). `err` may be NULL. */
void sl_err_clear(sl_err *err);

/* Fill `err` (which may be NULL) and return `status`, so that callers can write
 * `return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "...", ...)`. */
int sl_err_set(sl_err *err, int status, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A static, human-readable name for an SL_E* code. Never NULL. */
const char *sl_strerror(int status);

/* A static name for a gRPC status code ("INVALID_ARGUMENT", ...). Never NULL. */
const char *sl_status_name(int code);

/* Duplicate `n` bytes of `s` into a new NUL-terminated malloc'd string, or NULL
 * when out of memory. The caller frees it with free(). */
char *sl_strndup(const char *s, size_t n);

/* Copy `src` into dst[size] (size > 0), cut to size - 1 bytes and NUL-terminated:
 * what snprintf(dst, size, "%s", src) gives, without parsing a format (a copy
 * per call for the access log). */
void sl_strlcpy(char *dst, const char *src, size_t size);

/* Length of the well-formed UTF-8 sequence at s[0..n) (1 to 4), or 0 when the
 * bytes there are not one (a stray continuation byte, an overlong form, a
 * surrogate, a code point past U+10FFFF, or a sequence cut off by `n`). The same
 * rules as Python's strict UTF-8 decoder. */
size_t sl_utf8_seq_len(const uint8_t *s, size_t n);

/* 1 when s[0..n) is well-formed UTF-8, else 0 with *bad_at (when not NULL) set to
 * the offset of the first byte that is not. */
int sl_utf8_valid(const char *s, size_t n, size_t *bad_at);

/* Make the NUL-terminated string `s` well-formed UTF-8 in place: a sequence cut
 * off at the end of the string is dropped, and every other byte that does not
 * start a well-formed sequence becomes '?'. Used on messages before they leave
 * (status details) and on text that came from a peer. */
void sl_utf8_sanitize(char *s);

/* A key/value pair of strings. Who owns the strings is said by each user. */
typedef struct sl_kv {
  const char *key;
  const char *value;
  size_t value_len; /* values may hold binary ("-bin" metadata keys) */
} sl_kv;

/* A bump allocator: memory handed out from a list of chunks that never move (the
 * first of SL_ARENA_FIRST bytes, each next one twice the last, or the request if
 * larger), all freed at once by sl_arena_clear(). For what lives exactly as long
 * as one owner: a received header's fields (message.c), a call's strings
 * (tensors_py.c). Zero-initialise it (SL_ARENA_INIT); not thread-safe. */
typedef struct sl_arena {
  struct sl_arena_chunk *head; /* owned: newest first */
} sl_arena;

#define SL_ARENA_INIT {NULL}
#define SL_ARENA_FIRST 4096u

/* `size` bytes aligned for any type, valid until sl_arena_clear(); NULL when out
 * of memory. */
void *sl_arena_alloc(sl_arena *a, size_t size);

/* Free every chunk; the arena is empty (and usable) again. */
void sl_arena_clear(sl_arena *a);

/* How the tensor bytes of a Compute / ComputeBackward request travelled: in one
 * gRPC message, as a stream of Chunk messages, or through a shared-memory segment
 * (gRPC carrying only the control message). Counted by the server's metrics and
 * reported with each of the client's replies. */
typedef enum sl_transport {
  SL_TRANSPORT_UNARY = 0,
  SL_TRANSPORT_STREAM,
  SL_TRANSPORT_SHM,
  SL_TRANSPORT_COUNT
} sl_transport;

/* "unary", "stream" or "shared_memory" (static); "unary" for an unknown value. */
const char *sl_transport_name(int transport);

/* Monotonic clock, in seconds. */
double sl_now(void);

struct timespec;
/* The CLOCK_REALTIME instant `seconds` from now (for pthread_cond_timedwait). */
void sl_deadline_timespec(double seconds, struct timespec *out);

#ifdef __cplusplus
}
#endif

#endif /* SL_COMMON_H */
