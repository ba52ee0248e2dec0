/* sl_common.c: see sl_common.h. */
#include "sl_common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void sl_err_clear(sl_err *err) {
  if (err == NULL) return;
  err->status = SL_OK;
  err->code = SL_STATUS_OK;
  err->msg[0] = '\0';
}

int sl_err_set(sl_err *err, int status, int code, const char *fmt, ...) {
  if (err != NULL) {
    va_list ap;
    err->status = status;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    /* the message travels as a status message (HTTP/2 text) and becomes a Python
     * str: never cut inside a character, never pass on bytes that are not UTF-8
     * (a peer's names quoted with %.64s can be either) */
    sl_utf8_sanitize(err->msg);
  }
  return status;
}

size_t sl_utf8_seq_len(const uint8_t *s, size_t n) {
  uint8_t c;
  if (n == 0) return 0;
  c = s[0];
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    return n >= 2 && (s[1] & 0xC0) == 0x80 ? 2 : 0;
  }
  if (c >= 0xE0 && c <= 0xEF) {
    /* E0: no overlong forms (second byte >= A0); ED: no surrogates (< A0) */
    uint8_t lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    return n >= 3 && s[1] >= lo && s[1] <= hi && (s[2] & 0xC0) == 0x80 ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    /* F0: no overlong forms (>= 90); F4: nothing past U+10FFFF (< 90) */
    uint8_t lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return n >= 4 && s[1] >= lo && s[1] <= hi && (s[2] & 0xC0) == 0x80 &&
                   (s[3] & 0xC0) == 0x80
               ? 4
               : 0;
  }
  return 0;
}

int sl_utf8_valid(const char *s, size_t n, size_t *bad_at) {
  const uint8_t *p = (const uint8_t *)s;
  size_t i = 0;
  while (i < n) {
    size_t k = sl_utf8_seq_len(p + i, n - i);
    if (k == 0) {
      if (bad_at != NULL) *bad_at = i;
      return 0;
    }
    i += k;
  }
  return 1;
}

void sl_utf8_sanitize(char *s) {
  uint8_t *p = (uint8_t *)s;
  size_t n = strlen(s), i = 0;
  while (i < n) {
    size_t k = sl_utf8_seq_len(p + i, n - i);
    if (k > 0) {
      i += k;
      continue;
    }
    /* a lead byte whose sequence the end of the string cut off: drop the tail */
    if (p[i] >= 0xC2 && p[i] <= 0xF4) {
      size_t need = p[i] >= 0xF0 ? 4 : p[i] >= 0xE0 ? 3 : 2, j = i + 1;
      while (j < n && (p[j] & 0xC0) == 0x80) j++;
      if (j == n && n - i < need) {
        p[i] = '\0';
        return;
      }
    }
    p[i++] = '?';
  }
}

const char *sl_strerror(int status) {
  switch (status) {
    case SL_OK: return "ok";
    case SL_ENOMEM: return "out of memory";
    case SL_EINVAL: return "invalid argument";
    case SL_EOVERFLOW: return "size overflow";
    case SL_ETOOBIG: return "over the size limit";
    case SL_ESTATE: return "wrong state";
    case SL_EGRPC: return "gRPC core error";
    case SL_ETIMEDOUT: return "timed out";
    case SL_EAGAIN: return "not done yet";
    case SL_EINTR: return "interrupted";
    case SL_ESTATUS: return "call failed";
    case SL_ENOTFOUND: return "not found";
    case SL_EUSER: return "user hook failed";
    case SL_ECODEC: return "codec failed";
    default: return "unknown error";
  }
}

const char *sl_status_name(int code) {
  static const char *const names[] = {
      "OK",        "CANCELLED",         "UNKNOWN",
      "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS",   "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED",        "OUT_OF_RANGE",
      "UNIMPLEMENTED",    "INTERNAL",          "UNAVAILABLE",
      "DATA_LOSS",        "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return "UNKNOWN";
  return names[code];
}

char *sl_strndup(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (p == NULL) return NULL;
  if (n) memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

void sl_strlcpy(char *dst, const char *src, size_t size) {
  size_t n = strnlen(src, size - 1);
  memcpy(dst, src, n);
  dst[n] = '\0';
}

struct sl_arena_chunk {
  struct sl_arena_chunk *next;
  size_t used, cap;
  max_align_t data[]; /* cap bytes */
};

#define SL_ARENA_ALIGN (sizeof(max_align_t))

void *sl_arena_alloc(sl_arena *a, size_t size) {
  struct sl_arena_chunk *c = a->head;
  size_t need = (size + SL_ARENA_ALIGN - 1) & ~(size_t)(SL_ARENA_ALIGN - 1);
  if (need < size) return NULL; /* overflow */
  if (c == NULL || c->cap - c->used < need) {
    size_t cap = c == NULL ? SL_ARENA_FIRST : 2 * c->cap;
    if (cap < need) cap = need;
    if (cap > SIZE_MAX - sizeof(*c)) return NULL;
    c = malloc(sizeof(*c) + cap);
    if (c == NULL) return NULL;
    c->next = a->head;
    c->used = 0;
    c->cap = cap;
    a->head = c;
  }
  c->used += need;
  return (char *)c->data + (c->used - need);
}

void sl_arena_clear(sl_arena *a) {
  while (a->head != NULL) {
    struct sl_arena_chunk *next = a->head->next;
    free(a->head);
    a->head = next;
  }
}

const char *sl_transport_name(int transport) {
  static const char *const names[SL_TRANSPORT_COUNT] = {"unary", "stream", "shared_memory"};
  return transport > 0 && transport < SL_TRANSPORT_COUNT ? names[transport] : names[0];
}

double sl_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void sl_deadline_timespec(double seconds, struct timespec *out) {
  clock_gettime(CLOCK_REALTIME, out);
  if (seconds < 0) seconds = 0;
  out->tv_sec += (time_t)seconds;
  out->tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
  if (out->tv_nsec >= 1000000000L) {
    out->tv_sec++;
    out->tv_nsec -= 1000000000L;
  }
}
