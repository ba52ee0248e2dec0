/* metrics.c: see metrics.h. */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const double sl_hist_bounds[SL_HIST_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                                1.0,    2.5,     5.0,    10.0,  30.0};

typedef struct hist {
  atomic_ullong counts[SL_HIST_BUCKETS + 1];
  atomic_ullong sum_ns;
} hist;

struct sl_metrics {
  atomic_ullong requests[SL_METHOD_COUNT][17];
  atomic_llong in_flight;
  hist latency[2][SL_STAGE_COUNT]; /* [0] Compute, [1] ComputeBackward */
  atomic_ullong transport[SL_TRANSPORT_COUNT];
  atomic_ullong request_bytes, response_bytes;
  /* access log */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  sl_call_record *ring;
  size_t cap, head, len;
  atomic_ullong dropped;
  atomic_int log_on; /* set (release) once ring is allocated */
};

const char *sl_metric_method_name(int method) {
  static const char *const names[SL_METHOD_COUNT] = {"Compute",        "ComputeBackward",
                                                     "HealthCheck",    "GetServiceInfo",
                                                     "grpc.health.v1.Health/Check", "other"};
  return method >= 0 && method < SL_METHOD_COUNT ? names[method] : "other";
}

const char *sl_stage_name(int stage) {
  static const char *const names[SL_STAGE_COUNT] = {"receive", "decode", "queue", "compute",
                                                    "encode",  "send",   "total"};
  return stage >= 0 && stage < SL_STAGE_COUNT ? names[stage] : "?";
}

int sl_metrics_create(sl_metrics **out) {
  sl_metrics *m = calloc(1, sizeof(*m));
  *out = NULL;
  if (m == NULL) return SL_ENOMEM;
  pthread_mutex_init(&m->mu, NULL);
  pthread_cond_init(&m->cv, NULL);
  *out = m;
  return SL_OK;
}

void sl_metrics_destroy(sl_metrics *m) {
  if (m == NULL) return;
  pthread_mutex_destroy(&m->mu);
  pthread_cond_destroy(&m->cv);
  free(m->ring);
  free(m);
}

static void hist_add(hist *h, double seconds) {
  size_t b = 0;
  if (!(seconds >= 0)) seconds = 0; /* NaN and negatives (clock steps) count as 0 */
  while (b < SL_HIST_BUCKETS && seconds > sl_hist_bounds[b]) b++;
  atomic_fetch_add_explicit(&h->counts[b], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&h->sum_ns, (unsigned long long)llround(seconds * 1e9),
                            memory_order_relaxed);
}

void sl_metrics_call_started(sl_metrics *m) { atomic_fetch_add(&m->in_flight, 1); }

void sl_metrics_call_finished(sl_metrics *m, const sl_call_record *r) {
  int method = r->method >= 0 && r->method < SL_METHOD_COUNT ? r->method : SL_METHOD_OTHER;
  int code = r->code >= 0 && r->code <= 16 ? r->code : 2;
  atomic_fetch_add_explicit(&m->requests[method][code], 1, memory_order_relaxed);
  atomic_fetch_add(&m->in_flight, -1);
  if (method == SL_METHOD_COMPUTE || method == SL_METHOD_BACKWARD) {
    int t = r->transport > 0 && r->transport < SL_TRANSPORT_COUNT ? r->transport : 0;
    atomic_fetch_add_explicit(&m->transport[t], 1, memory_order_relaxed);
  }
  atomic_fetch_add_explicit(&m->request_bytes, r->bytes_in, memory_order_relaxed);
  atomic_fetch_add_explicit(&m->response_bytes, r->bytes_out, memory_order_relaxed);
  if (r->tensor_call) {
    hist *h = m->latency[method == SL_METHOD_BACKWARD];
    for (int s = 0; s < SL_STAGE_COUNT; s++) hist_add(&h[s], r->stage[s]);
  }
  if (atomic_load_explicit(&m->log_on, memory_order_acquire)) {
    pthread_mutex_lock(&m->mu);
    if (m->len == m->cap) {
      m->head = (m->head + 1) % m->cap; /* drop the oldest */
      m->len--;
      atomic_fetch_add(&m->dropped, 1);
    }
    m->ring[(m->head + m->len) % m->cap] = *r;
    m->len++;
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
  }
}

void sl_metrics_snapshot_take(sl_metrics *m, sl_metrics_snapshot *out) {
  memset(out, 0, sizeof(*out));
  for (int i = 0; i < SL_METHOD_COUNT; i++)
    for (int c = 0; c < 17; c++) out->requests[i][c] = atomic_load(&m->requests[i][c]);
  out->in_flight = atomic_load(&m->in_flight);
  for (int k = 0; k < 2; k++) {
    for (int s = 0; s < SL_STAGE_COUNT; s++) {
      sl_hist_snapshot *one = &out->latency_by_method[k][s], *all = &out->latency[s];
      for (int b = 0; b <= SL_HIST_BUCKETS; b++) {
        one->counts[b] = atomic_load(&m->latency[k][s].counts[b]);
        one->count += one->counts[b];
        all->counts[b] += one->counts[b];
      }
      one->sum = (double)atomic_load(&m->latency[k][s].sum_ns) * 1e-9;
      all->count += one->count;
      all->sum += one->sum;
    }
  }
  for (int t = 0; t < SL_TRANSPORT_COUNT; t++) out->transport[t] = atomic_load(&m->transport[t]);
  out->request_bytes = atomic_load(&m->request_bytes);
  out->response_bytes = atomic_load(&m->response_bytes);
  out->access_log_dropped = atomic_load(&m->dropped);
}

int sl_metrics_access_log_enable(sl_metrics *m, size_t capacity) {
  int status = SL_OK;
  pthread_mutex_lock(&m->mu);
  if (m->ring == NULL && capacity > 0) {
    m->ring = calloc(capacity, sizeof(*m->ring));
    if (m->ring == NULL) {
      status = SL_ENOMEM;
    } else {
      m->cap = capacity;
      atomic_store_explicit(&m->log_on, 1, memory_order_release);
    }
  }
  pthread_mutex_unlock(&m->mu);
  return status;
}

size_t sl_metrics_access_log_take(sl_metrics *m, sl_call_record *out, size_t max,
                                  double timeout) {
  size_t n = 0;
  pthread_mutex_lock(&m->mu);
  if (m->ring != NULL && m->len == 0 && timeout > 0) {
    struct timespec ts;
    sl_deadline_timespec(timeout, &ts);
    while (m->len == 0) {
      if (pthread_cond_timedwait(&m->cv, &m->mu, &ts) != 0) break;
    }
  }
  while (m->ring != NULL && n < max && m->len > 0) {
    out[n++] = m->ring[m->head];
    m->head = (m->head + 1) % m->cap;
    m->len--;
  }
  pthread_mutex_unlock(&m->mu);
  return n;
}
