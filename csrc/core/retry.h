/* retry.h: retry policies of the built-in strategies (ExponentialBackoff,
 * FixedDelay). Plain values; the loop that uses them lives in client.c and runs
 * without any Python lock. */
#ifndef SL_RETRY_H
#define SL_RETRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_retry_policy {
  int max_retries;      /* retries after the first attempt; 0: one attempt */
  double attempt_timeout; /* seconds each attempt may take (0: the call's whole timeout) */
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

/* ---- circuit breaker ----
 *
 * Shared by every call of a client (thread-safe). CLOSED: calls go through;
 * `failure_threshold` failures in a row open it. OPEN: calls fail at once with
 * UNAVAILABLE until `reset_timeout` seconds have passed. HALF_OPEN: calls go
 * through as probes; `half_open_attempts` successes close it, one failure opens it
 * again. A failure is a call that ended (after its retries) with a retryable code
 * (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED): the server or the network
 * is in trouble. Any other ending (OK, or an error the server chose, such as
 * INVALID_ARGUMENT or INTERNAL) counts as a success of the transport. */
typedef struct sl_breaker sl_breaker;

enum { SL_BREAKER_CLOSED = 0, SL_BREAKER_OPEN = 1, SL_BREAKER_HALF_OPEN = 2 };

/* Create a breaker; SL_OK or SL_ENOMEM. Freed with sl_breaker_destroy. */
int sl_breaker_create(int failure_threshold, double reset_timeout, int half_open_attempts,
                      sl_breaker **out);
void sl_breaker_destroy(sl_breaker *b);

/* May a call go through now (`now` on the sl_now() clock)? 1 yes; 0 no, with
 * *retry_at set to when it may (sl_now() clock) and *failures to the failures that
 * opened it. */
int sl_breaker_allow(sl_breaker *b, double now, double *retry_at, int *failures);

/* Record how a call ended (its final gRPC status code). */
void sl_breaker_record(sl_breaker *b, int code, double now);

/* The state (SL_BREAKER_*) and the current run of failures. */
int sl_breaker_state(sl_breaker *b, int *failures);

/* The message of a call refused by an open breaker (the one wording, used by the
 * C client and, through the binding, by Python strategies): `wait` seconds until
 * it lets calls through, after `failures` failures in a row. Always
 * NUL-terminated. */
#define SL_BREAKER_MESSAGE_MAX 160
void sl_breaker_open_message(double wait, int failures, char *buf, size_t buflen);

/* A small thread-safe PRNG step (xorshift64*); returns a uniform value in [0, 1). */
double sl_retry_uniform(uint64_t *state);

#ifdef __cplusplus
}
#endif

#endif /* SL_RETRY_H */
