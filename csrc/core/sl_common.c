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
  }
  return status;
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
