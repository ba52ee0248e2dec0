/* metrics.h: what a server measures about itself, kept in C (atomics and
 * fixed-bucket histograms: no lock and no Python on the call path), and the
 * opt-in access log (a bounded ring of records, drained by one reader).
 *
 * Ownership: an sl_metrics is owned by its server; snapshots and records are plain
 * values copied out to the caller.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_METRICS_H
#define SL_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "sl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Methods counted apart. */
typedef enum sl_metric_method {
  SL_METHOD_COMPUTE = 0,
  SL_METHOD_BACKWARD,
  SL_METHOD_HEALTH,
  SL_METHOD_INFO,
  SL_METHOD_STD_HEALTH,
  SL_METHOD_OTHER,
  SL_METHOD_COUNT
} sl_metric_method;

const char *sl_metric_method_name(int method); /* "Compute", ... (static) */

/* Stages of a Compute / ComputeBackward call, each with a latency histogram. */
typedef enum sl_stage {
  SL_STAGE_RECEIVE = 0, /* from the call's start until its request is in */
  SL_STAGE_DECODE,      /* parsing, the one copy, codec decoding */
  SL_STAGE_QUEUE,       /* waiting for the Python interpreter (the GIL) */
  SL_STAGE_COMPUTE,     /* the compute function */
  SL_STAGE_ENCODE,      /* codec encoding and framing the response */
  SL_STAGE_SEND,        /* until gRPC took the response and status */
  SL_STAGE_TOTAL,
  SL_STAGE_COUNT
} sl_stage;

const char *sl_stage_name(int stage); /* "receive", ... (static) */

#define SL_HIST_BUCKETS 17
/* Upper bounds (seconds) of the finite buckets; a last bucket holds the rest. */
extern const double sl_hist_bounds[SL_HIST_BUCKETS];

typedef struct sl_hist_snapshot {
  uint64_t counts[SL_HIST_BUCKETS + 1]; /* per bucket, not cumulative */
  uint64_t count;
  double sum; /* seconds */
} sl_hist_snapshot;

typedef struct sl_metrics_snapshot {
  uint64_t requests[SL_METHOD_COUNT][17]; /* by method and gRPC status code */
  int64_t in_flight;                      /* calls being served now (all methods) */
  sl_hist_snapshot latency[SL_STAGE_COUNT]; /* Compute and ComputeBackward together */
  sl_hist_snapshot latency_by_method[2][SL_STAGE_COUNT]; /* [0] Compute, [1] ComputeBackward */
  uint64_t transport[SL_TRANSPORT_COUNT]; /* Compute / ComputeBackward calls by how
                                            their request came (sl_transport) */
  uint64_t request_bytes;  /* message bytes received (all calls) */
  uint64_t response_bytes; /* message bytes sent */
  uint64_t access_log_dropped;
} sl_metrics_snapshot;

/* One call, as the access log and the histograms see it. */
#define SL_RECORD_NDIM 8 /* shapes of more dims are cut (ndim keeps the truth) */
typedef struct sl_call_record {
  double wall_time; /* seconds since the epoch, when the call ended */
  int method;       /* sl_metric_method */
  char method_name[96];
  char peer[64];
  int code;         /* gRPC status code sent */
  int has_request_id;
  int32_t request_id;
  char forward_id[64];
  sl_dtype in_dtype, out_dtype; /* INVALID when there was no tensor */
  int in_ndim, out_ndim;
  int64_t in_shape[SL_RECORD_NDIM], out_shape[SL_RECORD_NDIM];
  char codec[32];
  uint64_t bytes_in, bytes_out;
  double stage[SL_STAGE_COUNT]; /* seconds; 0 for stages the call did not go through */
  int tensor_call;              /* 1 for Compute / ComputeBackward */
  int transport;                /* sl_transport: how the request's tensors came */
} sl_call_record;

typedef struct sl_metrics sl_metrics;

int sl_metrics_create(sl_metrics **out);
void sl_metrics_destroy(sl_metrics *m);

void sl_metrics_call_started(sl_metrics *m);
/* Count a finished call; add it to the access log when that is on. */
void sl_metrics_call_finished(sl_metrics *m, const sl_call_record *r);

void sl_metrics_snapshot_take(sl_metrics *m, sl_metrics_snapshot *out);

/* The access log: off by default; `capacity` records are kept (oldest dropped). */
int sl_metrics_access_log_enable(sl_metrics *m, size_t capacity);

/* Take up to `max` records, waiting at most `timeout` seconds for the first one.
 * Returns how many were copied into `out`. */
size_t sl_metrics_access_log_take(sl_metrics *m, sl_call_record *out, size_t max, double timeout);

#ifdef __cplusplus
}
#endif

#endif /* SL_METRICS_H */
