/* retry.c: see retry.h. */
#include "retry.h"

#include <math.h>

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

double sl_retry_uniform(uint64_t *state) {
  uint64_t x = *state ? *state : 0x9E3779B97F4A7C15ull;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}
