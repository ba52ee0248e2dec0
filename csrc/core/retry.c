/* retry.c: see retry.h. */
#include "retry.h"

#include <stdio.h>

#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "sl_common.h"

int sl_retry_code_is_retryable(int code) {
  return code == SL_STATUS_UNAVAILABLE || code == SL_STATUS_DEADLINE_EXCEEDED ||
         code == SL_STATUS_RESOURCE_EXHAUSTED;
}

double sl_retry_delay(const sl_retry_policy *p, int retry, double u) {
  double d = p->initial_delay;
  double factor;
  if (retry > 0 && p->multiplier > 1.0) {
    d = p->initial_delay * pow(p->multiplier, (double)retry);
  }
  if (p->max_delay > 0 && d > p->max_delay) d = p->max_delay;
  factor = 1.0 + p->jitter * (2.0 * u - 1.0);
  if (factor < 0) factor = 0;
  d *= factor;
  return d < 0 ? 0 : d;
}

void sl_breaker_open_message(double wait, int failures, char *buf, size_t buflen) {
  if (buflen == 0) return;
  snprintf(buf, buflen,
           "circuit breaker is open for another %.1f s after %d failed calls in a row; calls "
           "fail at once until then",
           wait, failures);
}

double sl_retry_uniform(uint64_t *state) {
  uint64_t x = *state ? *state : 0x9E3779B97F4A7C15ull;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}

struct sl_breaker {
  pthread_mutex_t mu;
  int threshold;
  double reset_timeout;
  int half_open_attempts;
  int state;
  int failures;  /* consecutive failures (CLOSED) or those that opened it (OPEN) */
  int successes; /* probes that succeeded (HALF_OPEN) */
  double opened_at;
};

int sl_breaker_create(int failure_threshold, double reset_timeout, int half_open_attempts,
                      sl_breaker **out) {
  sl_breaker *b = calloc(1, sizeof(*b));
  *out = NULL;
  if (b == NULL) return SL_ENOMEM;
  pthread_mutex_init(&b->mu, NULL);
  b->threshold = failure_threshold < 1 ? 1 : failure_threshold;
  b->reset_timeout = reset_timeout < 0 ? 0 : reset_timeout;
  b->half_open_attempts = half_open_attempts < 1 ? 1 : half_open_attempts;
  b->state = SL_BREAKER_CLOSED;
  *out = b;
  return SL_OK;
}

void sl_breaker_destroy(sl_breaker *b) {
  if (b == NULL) return;
  pthread_mutex_destroy(&b->mu);
  free(b);
}

int sl_breaker_allow(sl_breaker *b, double now, double *retry_at, int *failures) {
  int allowed = 1;
  pthread_mutex_lock(&b->mu);
  if (b->state == SL_BREAKER_OPEN) {
    if (now - b->opened_at >= b->reset_timeout) {
      b->state = SL_BREAKER_HALF_OPEN;
      b->successes = 0;
    } else {
      allowed = 0;
      *retry_at = b->opened_at + b->reset_timeout;
      *failures = b->failures;
    }
  }
  pthread_mutex_unlock(&b->mu);
  return allowed;
}

void sl_breaker_record(sl_breaker *b, int code, double now) {
  int failed = sl_retry_code_is_retryable(code);
  pthread_mutex_lock(&b->mu);
  switch (b->state) {
    case SL_BREAKER_CLOSED:
      b->failures = failed ? b->failures + 1 : 0;
      if (b->failures >= b->threshold) {
        b->state = SL_BREAKER_OPEN;
        b->opened_at = now;
      }
      break;
    case SL_BREAKER_HALF_OPEN:
      if (failed) {
        b->state = SL_BREAKER_OPEN;
        b->opened_at = now;
        b->failures++;
      } else if (++b->successes >= b->half_open_attempts) {
        b->state = SL_BREAKER_CLOSED;
        b->failures = 0;
      }
      break;
    default: /* OPEN: a call let through before it opened; keep it open */
      break;
  }
  pthread_mutex_unlock(&b->mu);
}

int sl_breaker_state(sl_breaker *b, int *failures) {
  int state;
  pthread_mutex_lock(&b->mu);
  state = b->state;
  *failures = b->failures;
  pthread_mutex_unlock(&b->mu);
  return state;
}
