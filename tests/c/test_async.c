/* Asynchronous calls in the C core alone: sl_async (client calls in flight, one
 * completion thread) against an sl_server whose compute hook defers calls
 * (sl_pending), over real sockets on 127.0.0.1 (port 0). */
#include <grpc/grpc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "async_client.h"
#include "client.h"
#include "server.h"
#include "sl_test.h"

#define MAXQ 256

static void free_storage(void *p) { sl_storage_free(p); }

/* ---- the server: defers calls with "defer" metadata into a queue ---- */

typedef struct deferred {
  sl_pending *p;
  void *data;
  size_t nbytes;
  sl_tensor_desc desc;
} deferred;

static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcv = PTHREAD_COND_INITIALIZER;
static deferred queue[MAXQ];
static int nqueued;
static atomic_int flaky_left;

static int has_md(const sl_call_info *call, const char *key) {
  for (size_t i = 0; i < call->n_metadata; i++)
    if (strcmp(call->metadata[i].key, key) == 0) return 1;
  return 0;
}

static int hook(void *user, const sl_call_info *call, sl_compute_args *a, sl_err *err) {
  (void)user;
  if (has_md(call, "flaky") && atomic_fetch_sub(&flaky_left, 1) > 0) {
    return sl_err_set(err, SL_EUSER, SL_STATUS_UNAVAILABLE, "warming up");
  }
  if (has_md(call, "defer") && a->pending != NULL) {
    pthread_mutex_lock(&qmu);
    queue[nqueued].p = a->pending;
    queue[nqueued].data = a->tensor->items[0].data;
    queue[nqueued].nbytes = a->tensor->items[0].nbytes;
    queue[nqueued].desc = a->tensor->items[0].desc;
    nqueued++;
    pthread_cond_broadcast(&qcv);
    pthread_mutex_unlock(&qmu);
    a->tensor->items[0].data = NULL; /* taken (the async client never uses shared memory, so
                                        the bytes are storage, never lent) */
    return SL_EAGAIN;
  }
  a->out.items = calloc(1, sizeof(*a->out.items));
  if (a->out.items == NULL) return SL_ENOMEM;
  a->out.n = 1;
  a->out_free = free;
  a->out_owner = a->out.items;
  a->out.items[0].desc = a->tensor->items[0].desc;
  a->out.items[0].nbytes = a->tensor->items[0].nbytes;
  {
    void *data; /* taken: the bytes may be lent by a shared-memory segment */
    sl_tensor_item_take(&a->tensor->items[0], &data, &a->out.items[0].release,
                        &a->out.items[0].owner);
    a->out.items[0].data = data;
  }
  return SL_OK;
}

/* Complete queued call i with its input doubled. */
static void complete_doubled(deferred *d) {
  sl_tensor_out *item = calloc(1, sizeof(*item)); /* freed by the server (out_free) */
  sl_tensor_set out;
  float *f = d->data;
  for (size_t i = 0; i < d->nbytes / 4; i++) f[i] *= 2.0f;
  CHECK(item != NULL);
  memset(&out, 0, sizeof(out));
  item->desc = d->desc;
  item->data = d->data;
  item->nbytes = d->nbytes;
  item->release = free_storage;
  item->owner = d->data;
  out.items = item;
  out.n = 1;
  sl_pending_complete(d->p, SL_OK, NULL, &out, free, item, 2.5f);
}

static int wait_queued(int n) {
  struct timespec ts;
  int ok = 1;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 30;
  pthread_mutex_lock(&qmu);
  while (nqueued < n && ok) ok = pthread_cond_timedwait(&qcv, &qmu, &ts) == 0;
  pthread_mutex_unlock(&qmu);
  return nqueued >= n;
}

static sl_server *start_server(int workers) {
  sl_server_config cfg = {0};
  sl_server_hooks hooks = {NULL, NULL, hook, NULL, NULL};
  sl_server *s = NULL;
  sl_err err;
  cfg.host = "127.0.0.1";
  cfg.max_workers = workers;
  cfg.version = "1";
  CHECK_EQ_INT(sl_server_create(&cfg, &hooks, NULL, &s, &err), SL_OK);
  CHECK_EQ_INT(sl_server_start(s, &err), SL_OK);
  nqueued = 0;
  return s;
}

static sl_client *connect_to(sl_server *s) {
  char target[64];
  sl_client *c = NULL;
  sl_err err;
  snprintf(target, sizeof(target), "127.0.0.1:%d", sl_server_port(s));
  CHECK_EQ_INT(sl_client_create(target, NULL, 0, NULL, &c, &err), SL_OK);
  CHECK_EQ_INT(sl_client_connect(c, 10.0, NULL, NULL), SL_OK);
  return c;
}

/* ---- the client side: results of `done` ---- */

typedef struct outcome {
  int rc;
  int code;
  int attempts;
  float first;
  char details[128];
} outcome;

static pthread_mutex_t dmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dcv = PTHREAD_COND_INITIALIZER;
static outcome outcomes[MAXQ];
static int ndone;
static atomic_int released;

static void done(void *user, sl_async_result *res) {
  outcome *o = user;
  o->rc = res->rc;
  o->code = res->st.code;
  o->attempts = res->st.attempts;
  if (res->rc == SL_OK && res->out.n_items > 0 && res->out.items[0].nbytes >= 4) {
    o->first = ((float *)res->out.items[0].data)[0];
  }
  snprintf(o->details, sizeof(o->details), "%s", res->st.details ? res->st.details : "");
  sl_tensor_msg_clear(&res->out);
  sl_call_status_clear(&res->st);
  pthread_mutex_lock(&dmu);
  ndone++;
  pthread_cond_broadcast(&dcv);
  pthread_mutex_unlock(&dmu);
}

static int wait_done(int n) {
  struct timespec ts;
  int ok = 1;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 30;
  pthread_mutex_lock(&dmu);
  while (ndone < n && ok) ok = pthread_cond_timedwait(&dcv, &dmu, &ts) == 0;
  pthread_mutex_unlock(&dmu);
  return ndone >= n;
}

static void release_input(void *owner) {
  free(owner);
  atomic_fetch_add(&released, 1);
}

/* Start a call sending [value, value]; returns its handle (NULL on failure). */
static sl_async_call *start(sl_async *a, float value, const char *md_key, double timeout,
                            const sl_retry_policy *retry, outcome *o) {
  float *in = malloc(2 * sizeof(float));
  sl_kv md = {md_key, "1", 1};
  sl_call_opts opts = {timeout, &md, md_key ? 1 : 0, 0, retry, NULL, NULL, NULL};
  sl_tensor_out t = {0};
  sl_tensor_set set = {0};
  sl_call_fields fields = {0};
  sl_call_status st = {0};
  sl_async_call *h = NULL;
  sl_err err;
  in[0] = in[1] = value;
  t.desc.dtype = SL_DTYPE_FLOAT32;
  t.desc.ndim = 1;
  t.desc.shape[0] = 2;
  t.data = in;
  t.nbytes = 2 * sizeof(float);
  t.release = release_input;
  t.owner = in;
  fields.training_mode = -1;
  set.items = &t;
  set.n = 1;
  CHECK_EQ_INT(sl_async_compute_start(a, &opts, 0, &set, &fields, done, o, &h, &st, &err), SL_OK);
  sl_call_status_clear(&st);
  return h;
}

static void reset(void) {
  ndone = 0;
  atomic_store(&released, 0);
  memset(outcomes, 0, sizeof(outcomes));
}

/* 64 calls in flight from one thread; the server (one worker) defers them all. */
static void test_many_deferred_calls_one_worker(void) {
  sl_server *s = start_server(1);
  sl_client *c = connect_to(s);
  sl_async *a = NULL;
  sl_async_call *h[64];
  sl_err err;
  reset();
  CHECK_EQ_INT(sl_async_create(c, NULL, NULL, NULL, &a, &err), SL_OK);
  for (int i = 0; i < 64; i++) h[i] = start(a, (float)i, "defer", 30, NULL, &outcomes[i]);
  CHECK(wait_queued(64)); /* the one worker deferred every call */
  CHECK_EQ_INT(ndone, 0);
  CHECK_EQ_INT(sl_async_in_flight(a), 64);
  for (int i = 0; i < 64; i++) complete_doubled(&queue[i]);
  CHECK(wait_done(64));
  for (int i = 0; i < 64; i++) {
    CHECK_EQ_INT(outcomes[i].rc, SL_OK);
    CHECK(outcomes[i].first == 2.0f * (float)i);
    sl_async_call_unref(h[i]);
  }
  sl_async_destroy(a);
  CHECK_EQ_INT(atomic_load(&released), 64);
  sl_client_destroy(c);
  sl_server_destroy(s);
}

/* Cancel, deadline and retries. */
static void test_cancel_deadline_retry(void) {
  sl_server *s = start_server(2);
  sl_client *c = connect_to(s);
  sl_async *a = NULL;
  sl_async_call *h;
  sl_retry_policy retry = {3, 0, 0.01, 0.01, 1.0, 0.0};
  sl_err err;
  reset();
  CHECK_EQ_INT(sl_async_create(c, NULL, NULL, NULL, &a, &err), SL_OK);
  h = start(a, 1, "defer", 30, NULL, &outcomes[0]);
  CHECK(wait_queued(1));
  sl_async_call_cancel(h);
  CHECK(wait_done(1));
  CHECK_EQ_INT(outcomes[0].rc, SL_ESTATUS);
  CHECK_EQ_INT(outcomes[0].code, SL_STATUS_CANCELLED);
  CHECK_CONTAINS(outcomes[0].details, "cancelled by the caller");
  sl_async_call_cancel(h); /* after done: nothing */
  sl_async_call_unref(h);
  complete_doubled(&queue[0]); /* the server's result for a cancelled call goes nowhere */

  h = start(a, 1, "defer", 0.2, NULL, &outcomes[1]);
  CHECK(wait_done(2));
  CHECK_EQ_INT(outcomes[1].code, SL_STATUS_DEADLINE_EXCEEDED);
  sl_async_call_unref(h);
  CHECK(wait_queued(2));
  complete_doubled(&queue[1]);

  atomic_store(&flaky_left, 2);
  h = start(a, 3, "flaky", 30, &retry, &outcomes[2]);
  CHECK(wait_done(3));
  CHECK_EQ_INT(outcomes[2].rc, SL_OK);
  CHECK_EQ_INT(outcomes[2].attempts, 3);
  CHECK(outcomes[2].first == 3.0f);
  sl_async_call_unref(h);
  sl_async_destroy(a);
  sl_client_destroy(c);
  sl_server_destroy(s);
}

/* Closing the engine fails the calls in flight; stopping the server answers
 * deferred calls UNAVAILABLE and drops their later results. */
static void test_close_and_stop_with_calls_pending(void) {
  sl_server *s = start_server(1);
  sl_client *c = connect_to(s);
  sl_async *a = NULL;
  sl_async_call *h[4];
  sl_err err;
  reset();
  CHECK_EQ_INT(sl_async_create(c, NULL, NULL, NULL, &a, &err), SL_OK);
  for (int i = 0; i < 2; i++) h[i] = start(a, 1, "defer", 30, NULL, &outcomes[i]);
  CHECK(wait_queued(2));
  sl_async_destroy(a);
  CHECK_EQ_INT(ndone, 2);
  for (int i = 0; i < 2; i++) {
    CHECK_EQ_INT(outcomes[i].code, SL_STATUS_CANCELLED);
    CHECK_CONTAINS(outcomes[i].details, "closed");
    sl_async_call_unref(h[i]);
    complete_doubled(&queue[i]);
  }

  CHECK_EQ_INT(sl_async_create(c, NULL, NULL, NULL, &a, &err), SL_OK);
  for (int i = 2; i < 4; i++) h[i] = start(a, 1, "defer", 30, NULL, &outcomes[i]);
  CHECK(wait_queued(4));
  sl_server_stop(s, 0.05);
  CHECK(wait_done(4));
  for (int i = 2; i < 4; i++) {
    CHECK_EQ_INT(outcomes[i].code, SL_STATUS_UNAVAILABLE);
    sl_async_call_unref(h[i]);
    complete_doubled(&queue[i]); /* after the stop: released, not sent */
  }
  sl_async_destroy(a);
  sl_client_destroy(c);
  sl_server_destroy(s);
}

int main(void) {
  grpc_init();
  RUN(test_many_deferred_calls_one_worker);
  RUN(test_cancel_deadline_retry);
  RUN(test_close_and_stop_with_calls_pending);
  grpc_shutdown();
  return sl_test_done("test_async");
}
