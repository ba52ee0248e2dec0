/* test_metrics.c: the server's counters (metrics.c): calls by method and status,
 * Compute / ComputeBackward calls by how their tensors came (sl_transport), and the
 * stage histograms by method. */
#include <string.h>

#include "metrics.h"
#include "sl_common.h"
#include "sl_test.h"

static void finish(sl_metrics *m, int method, int code, int transport) {
  sl_call_record r;
  memset(&r, 0, sizeof(r));
  r.method = method;
  r.code = code;
  r.transport = transport;
  r.tensor_call = method == SL_METHOD_COMPUTE || method == SL_METHOD_BACKWARD;
  sl_metrics_call_started(m);
  sl_metrics_call_finished(m, &r);
}

static void test_transport_names(void) {
  CHECK(strcmp(sl_transport_name(SL_TRANSPORT_UNARY), "unary") == 0);
  CHECK(strcmp(sl_transport_name(SL_TRANSPORT_STREAM), "stream") == 0);
  CHECK(strcmp(sl_transport_name(SL_TRANSPORT_SHM), "shared_memory") == 0);
  CHECK(strcmp(sl_transport_name(-1), "unary") == 0);
  CHECK(strcmp(sl_transport_name(SL_TRANSPORT_COUNT), "unary") == 0);
}

/* Tensor calls are counted by transport whatever their status; other methods,
 * and out-of-range values (counted as unary), do not break the counts. */
static void test_calls_by_transport(void) {
  sl_metrics *m = NULL;
  sl_metrics_snapshot snap;
  CHECK(sl_metrics_create(&m) == SL_OK);
  finish(m, SL_METHOD_COMPUTE, SL_STATUS_OK, SL_TRANSPORT_UNARY);
  finish(m, SL_METHOD_COMPUTE, SL_STATUS_OK, SL_TRANSPORT_STREAM);
  finish(m, SL_METHOD_BACKWARD, SL_STATUS_INTERNAL, SL_TRANSPORT_STREAM);
  finish(m, SL_METHOD_COMPUTE, SL_STATUS_OK, SL_TRANSPORT_SHM);
  finish(m, SL_METHOD_HEALTH, SL_STATUS_OK, SL_TRANSPORT_SHM); /* an offer: not a tensor call */
  finish(m, SL_METHOD_COMPUTE, SL_STATUS_OK, 99);
  sl_metrics_snapshot_take(m, &snap);
  CHECK(snap.transport[SL_TRANSPORT_UNARY] == 2);
  CHECK(snap.transport[SL_TRANSPORT_STREAM] == 2);
  CHECK(snap.transport[SL_TRANSPORT_SHM] == 1);
  CHECK(snap.requests[SL_METHOD_COMPUTE][SL_STATUS_OK] == 4);
  CHECK(snap.requests[SL_METHOD_BACKWARD][SL_STATUS_INTERNAL] == 1);
  CHECK(snap.requests[SL_METHOD_HEALTH][SL_STATUS_OK] == 1);
  CHECK(snap.in_flight == 0);
  CHECK(snap.latency[SL_STAGE_TOTAL].count == 5);
  sl_metrics_destroy(m);
}

/* The stage histograms are kept per method (Compute, ComputeBackward); the
 * snapshot's `latency` is the two together. */
static void test_latency_by_method(void) {
  sl_metrics *m = NULL;
  sl_metrics_snapshot snap;
  sl_call_record r;
  CHECK(sl_metrics_create(&m) == SL_OK);
  memset(&r, 0, sizeof(r));
  r.tensor_call = 1;
  r.method = SL_METHOD_COMPUTE;
  r.stage[SL_STAGE_COMPUTE] = 0.002;
  r.stage[SL_STAGE_TOTAL] = 0.003;
  for (int i = 0; i < 3; i++) {
    sl_metrics_call_started(m);
    sl_metrics_call_finished(m, &r);
  }
  r.method = SL_METHOD_BACKWARD;
  r.stage[SL_STAGE_COMPUTE] = 0.5;
  r.stage[SL_STAGE_TOTAL] = 0.6;
  sl_metrics_call_started(m);
  sl_metrics_call_finished(m, &r);
  sl_metrics_snapshot_take(m, &snap);
  CHECK(snap.latency_by_method[0][SL_STAGE_TOTAL].count == 3);
  CHECK(snap.latency_by_method[1][SL_STAGE_TOTAL].count == 1);
  CHECK(snap.latency[SL_STAGE_TOTAL].count == 4);
  CHECK(snap.latency_by_method[1][SL_STAGE_COMPUTE].sum > 0.49 &&
        snap.latency_by_method[1][SL_STAGE_COMPUTE].sum < 0.51);
  CHECK(snap.latency[SL_STAGE_COMPUTE].sum > 0.505 && snap.latency[SL_STAGE_COMPUTE].sum < 0.507);
  for (int b = 0; b <= SL_HIST_BUCKETS; b++) {
    CHECK(snap.latency[SL_STAGE_TOTAL].counts[b] ==
          snap.latency_by_method[0][SL_STAGE_TOTAL].counts[b] +
              snap.latency_by_method[1][SL_STAGE_TOTAL].counts[b]);
  }
  sl_metrics_destroy(m);
}

int main(void) {
  RUN(test_transport_names);
  RUN(test_calls_by_transport);
  RUN(test_latency_by_method);
  return sl_test_done("test_metrics");
}
