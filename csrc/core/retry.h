/* retry.h: retry policies of the built-in strategies (ExponentialBackoff,
 * FixedDelay). Plain values; the loop that uses them lives in client.c and runs
 * without any Python lock. */
#ifndef SL_RETRY_H
#define SL_RETRY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_retry_policy {
  int max_retries;      /* retries after the first attempt; 0: one attempt */
  double initial_delay; /* seconds before the first retry */
  double max_delay;     /* cap on any one delay */
  double multiplier;    /* 2 for exponential backoff, 1 for a fixed delay */
  double jitter;        /* each delay is scaled by a uniform factor in [1-jitter, 1+jitter] */
} sl_retry_policy;

/* 1 when a call that ended with gRPC status `code` may be retried by the built-in
 * strategies: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED. Never a compute
 * error (INTERNAL): retrying it would run the user's function again. */
int sl_retry_code_is_retryable(int code);

/* The delay before retry number `retry` (0 for the first retry), given a uniform
 * random value `u` in [0, 1). */
double sl_retry_delay(const sl_retry_policy *p, int retry, double u);

/* A small thread-safe PRNG step (xorshift64*); returns a uniform value in [0, 1). */
double sl_retry_uniform(uint64_t *state);

#ifdef __cplusplus
}
#endif

#endif /* SL_RETRY_H */
