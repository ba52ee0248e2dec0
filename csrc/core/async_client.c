/* async_client.c: see async_client.h.
 *
 * Threads: the caller's thread packs the request and starts the first attempt;
 * the completion thread sees every batch end (tag = the call), decides between
 * success, a retry (a timer it keeps itself: a call sleeping before its next
 * attempt has `due` > 0) and failure, starts retries and runs `done`. `mu` guards
 * the live list, each call's `call`, `due`, `cancel_reason`, `finished` and refs.
 */
#include "async_client.h"

#include <grpc/grpc.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client_internal.h"
#include "methods.h"
#include "transport.h"

#define SLICE_S 0.2       /* longest wait of the completion thread */
#define TIMER_SLICE_S 0.02 /* while a call sleeps before a retry */

enum { CANCEL_NONE = 0, CANCEL_USER = 1, CANCEL_CLOSED = 2 };

struct sl_async_call {
  sl_async *eng;
  atomic_int refs;          /* the caller's handle, the engine until done */
  int backward;
  const char *method;       /* static string */
  sl_payload *payload;      /* one reference, dropped when the call is finished */
  grpc_metadata *md;        /* request metadata; slices owned; with a segment, one more
                               slot after n_md holds "sl-shm-req" */
  size_t n_md;
  /* the same-host channel (shm.h): a segment for the request, or NULL */
  sl_shm_seg *seg;
  sl_payload *empty;        /* the message sent instead of the request */
  int posted;               /* an attempt posted the request in the segment */
  int seg_md;               /* md[n_md] is the "sl-shm-req" slot */
  int via_seg;              /* the attempt in flight did */
  int broken;               /* the server held the segment when an attempt ended, or did
                               not know it: the next attempts go over the connection */
  int wait_for_ready;
  int has_retry;
  sl_retry_policy retry;
  sl_breaker *breaker;      /* borrowed */
  sl_codecs *codecs;        /* a reference: the custom codecs the reply may use, or NULL */
  sl_retry_fn on_retry;     /* NULL: none; called on the engine's thread */
  void *on_retry_user;
  double deadline;          /* whole call, sl_now() clock; 0: none */
  int retries;
  uint64_t rng;
  /* the attempt in flight */
  grpc_call *call;          /* NULL between attempts */
  grpc_byte_buffer *send_bb;
  grpc_byte_buffer *resp;
  grpc_metadata_array initial, trailing;
  grpc_status_code code;
  grpc_slice details;
  const char *error_string;
  /* state */
  int cancel_reason;
  atomic_int finished;
  double due;               /* > 0: sleeping until then before the next attempt */
  sl_async_call *prev, *next;
  sl_async_done_fn done;
  void *user;
  sl_async_result res;
};

struct sl_async {
  atomic_int refs;          /* the creator's, and sl_async_retain's */
  sl_client *client;        /* borrowed */
  grpc_channel *channel;    /* borrowed from the client */
  grpc_completion_queue *cq;
  pthread_t thread;
  int thread_started;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  sl_async_call *live;
  size_t n_live;
  int closing;
  int self_destroy;
  sl_async_thread_fn thread_start, thread_stop;
  void *thread_user;
};

/* Hand the call's segment back to the client's pool. */
static void give_segment(sl_async_call *k, int forget) {
  int reusable;
  if (k->seg == NULL) return;
  reusable = !k->broken && (!k->posted || sl_shm_seg_settle(k->seg));
  sl__client_shm_give(k->eng->client, k->seg, reusable, forget);
  k->seg = NULL;
}

static void call_free(sl_async_call *k) {
  give_segment(k, 0);
  if (k->empty != NULL) sl_payload_unref(k->empty);
  if (k->seg_md) {
    grpc_slice_unref(k->md[k->n_md].key);
    grpc_slice_unref(k->md[k->n_md].value);
  }
  for (size_t i = 0; i < k->n_md; i++) {
    grpc_slice_unref(k->md[i].key);
    grpc_slice_unref(k->md[i].value);
  }
  free(k->md);
  if (k->payload != NULL) sl_payload_unref(k->payload);
  sl_codecs_unref(k->codecs);
  free(k);
}

void sl_async_call_unref(sl_async_call *k) {
  if (k != NULL && atomic_fetch_sub(&k->refs, 1) == 1) call_free(k);
}

/* Hand the result to `done` (completion thread, no lock held), then drop the
 * engine's reference. */
static void finish(sl_async *a, sl_async_call *k) {
  int last;
  give_segment(k, 0);
  if (k->payload != NULL) { /* lets the caller's tensor go as soon as possible */
    sl_payload_unref(k->payload);
    k->payload = NULL;
  }
  if (k->breaker != NULL && k->cancel_reason == CANCEL_NONE &&
      (k->res.rc == SL_OK || k->res.rc == SL_ESTATUS)) {
    sl_breaker_record(k->breaker, k->res.rc == SL_OK ? SL_STATUS_OK : k->res.st.code, sl_now());
  }
  pthread_mutex_lock(&a->mu);
  k->finished = 1;
  if (k->prev != NULL) k->prev->next = k->next; else a->live = k->next;
  if (k->next != NULL) k->next->prev = k->prev;
  k->prev = k->next = NULL;
  a->n_live--;
  pthread_mutex_unlock(&a->mu);
  k->done(k->user, &k->res);
  last = atomic_fetch_sub(&k->refs, 1) == 1;
  if (last) call_free(k);
  pthread_mutex_lock(&a->mu);
  if (a->closing && a->n_live == 0) pthread_cond_broadcast(&a->cv);
  pthread_mutex_unlock(&a->mu);
}

static void set_cancelled(sl_async_call *k) {
  const char *why = k->cancel_reason == CANCEL_CLOSED
                        ? "the client was closed with the call in flight"
                        : "cancelled by the caller";
  sl_call_status_clear(&k->res.st);
  sl_tensor_msg_clear(&k->res.out);
  k->res.st.code = SL_STATUS_CANCELLED;
  k->res.st.details = sl_strndup(why, strlen(why));
  k->res.rc = SL_ESTATUS;
}

/* Start one attempt of `k` on the engine's queue. On failure nothing is pending. */
static int start_attempt(sl_async *a, sl_async_call *k, sl_err *err) {
  double now = sl_now(), dl = k->deadline;
  grpc_call *call;
  grpc_op ops[6];
  grpc_call_error ce;
  gpr_timespec gdl;

  if (k->has_retry && k->retry.attempt_timeout > 0) {
    double own = now + k->retry.attempt_timeout;
    if (dl == 0 || own < dl) dl = own;
  }
  gdl = dl > 0 ? sl__deadline_in(dl - now > 1e-6 ? dl - now : 1e-6)
               : gpr_inf_future(GPR_CLOCK_MONOTONIC);
  k->via_seg = 0;
  if (k->seg != NULL && !k->broken && k->posted && !sl_shm_seg_settle(k->seg)) {
    k->broken = 1; /* the server still holds the last attempt's request */
  }
  if (k->seg != NULL && !k->broken) {
    /* each attempt copies the request into the segment again and posts it anew */
    char value[160];
    if (sl_shm_seg_put_request(k->seg, k->payload, value, sizeof(value)) == SL_OK) {
      grpc_slice_unref(k->md[k->n_md].value);
      k->md[k->n_md].value = grpc_slice_from_copied_string(value);
      k->posted = 1;
      k->via_seg = 1;
    } else {
      k->broken = 1; /* (cannot be: the segment was sized for it) */
    }
  }
  call = grpc_channel_create_call(a->channel, NULL, GRPC_PROPAGATE_DEFAULTS, a->cq,
                                  grpc_slice_from_static_string(k->method), NULL, gdl, NULL);
  k->send_bb = sl__payload_byte_buffer(k->via_seg ? k->empty : k->payload);
  if (call == NULL || k->send_bb == NULL) {
    if (call != NULL) grpc_call_unref(call);
    if (k->send_bb != NULL) grpc_byte_buffer_destroy(k->send_bb);
    k->send_bb = NULL;
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "could not create a call");
  }
  k->resp = NULL;
  k->code = GRPC_STATUS_UNKNOWN;
  k->details = grpc_empty_slice();
  k->error_string = NULL;
  grpc_metadata_array_init(&k->initial);
  grpc_metadata_array_init(&k->trailing);
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = k->n_md + (size_t)k->via_seg;
  ops[0].data.send_initial_metadata.metadata = k->md;
  ops[0].flags = k->wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                                         GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET
                                   : 0;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = k->send_bb;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &k->initial;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &k->resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &k->trailing;
  ops[5].data.recv_status_on_client.status = &k->code;
  ops[5].data.recv_status_on_client.status_details = &k->details;
  ops[5].data.recv_status_on_client.error_string = &k->error_string;
  pthread_mutex_lock(&a->mu);
  k->call = call;
  if (k->cancel_reason != CANCEL_NONE) {
    grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, "cancelled", NULL);
  }
  pthread_mutex_unlock(&a->mu);
  ce = grpc_call_start_batch(call, ops, 6, k, NULL);
  if (ce != GRPC_CALL_OK) {
    pthread_mutex_lock(&a->mu);
    k->call = NULL;
    pthread_mutex_unlock(&a->mu);
    grpc_call_unref(call);
    grpc_byte_buffer_destroy(k->send_bb);
    k->send_bb = NULL;
    grpc_metadata_array_destroy(&k->initial);
    grpc_metadata_array_destroy(&k->trailing);
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      ce == GRPC_CALL_ERROR_INVALID_METADATA
                          ? "invalid request metadata (keys must be lowercase ASCII; "
                            "binary values need a key ending in -bin)"
                          : "could not start the call (gRPC error %d)",
                      (int)ce);
  }
  return SL_OK;
}

/* Parse a successful response into k->res.out / extra: from the segment when
 * `shm_span` is not NULL (its raw tensors view the segment), else from k->resp. */
static int read_response(sl_async_call *k, const sl_span *shm_span, sl_err *err) {
  sl_msg_kind resp_kind = k->backward ? SL_MSG_BACKWARD_RESPONSE : SL_MSG_COMPUTE_RESPONSE;
  sl__bbspans spans = {0};
  sl_tensor_msg *out = &k->res.out;
  int status;
  if (shm_span != NULL) {
    sl_span_owner lender = {NULL, k->seg, sl_shm_seg_lend, sl_shm_seg_unlend};
    status = sl_tensor_msg_read_owned(resp_kind, shm_span, 1, NULL, &lender, out, err);
  } else {
    status = sl__bbspans_take(&k->resp, &spans, err);
    if (status == SL_OK) {
      sl_span_owner owner = {sl__bbspans_release, &spans, NULL, NULL};
      status = sl_tensor_msg_read_owned(resp_kind, spans.spans, spans.n, NULL, &owner, out, err);
    }
  }
  if (status == SL_OK) status = sl_tensor_msg_decode_with(out, k->codecs, err);
  sl__bbspans_clear(&spans);
  if (status != SL_OK) {
    char inner[SL_ERR_MSG_MAX];
    memcpy(inner, err->msg, sizeof(inner));
    sl_err_set(err, status, SL_STATUS_INTERNAL, "%s: %.400s",
               status == SL_ECODEC ? "the response" : "bad response from the server", inner);
    sl_tensor_msg_clear(out);
    return status;
  }
  if (k->backward) {
    Splitlearn__Comm__BackwardResponse *b = (Splitlearn__Comm__BackwardResponse *)out->header;
    k->res.extra.has_compute_time_ms =
        b->_backward_time_ms_case ==
        SPLITLEARN__COMM__BACKWARD_RESPONSE___BACKWARD_TIME_MS_BACKWARD_TIME_MS;
    k->res.extra.compute_time_ms = b->backward_time_ms;
  } else {
    Splitlearn__Comm__ComputeResponse *r = (Splitlearn__Comm__ComputeResponse *)out->header;
    k->res.extra.has_request_id =
        r->_request_id_case == SPLITLEARN__COMM__COMPUTE_RESPONSE___REQUEST_ID_REQUEST_ID;
    k->res.extra.request_id = r->request_id;
    k->res.extra.has_compute_time_ms =
        r->_compute_time_ms_case ==
        SPLITLEARN__COMM__COMPUTE_RESPONSE___COMPUTE_TIME_MS_COMPUTE_TIME_MS;
    k->res.extra.compute_time_ms = r->compute_time_ms;
  }
  return SL_OK;
}

/* An attempt's batch ended (completion thread): finish, or sleep before a retry. */
static void attempt_done(sl_async *a, sl_async_call *k) {
  sl_call_status *st = &k->res.st;
  grpc_call *call;
  int oom, cancel, in_seg = 0, unknown = 0;
  sl_span shm_span = {NULL, 0};

  pthread_mutex_lock(&a->mu);
  call = k->call;
  k->call = NULL;
  cancel = k->cancel_reason;
  pthread_mutex_unlock(&a->mu);
  sl_call_status_clear(st);
  st->attempts = k->retries + 1;
  st->transport = k->via_seg ? SL_TRANSPORT_SHM : SL_TRANSPORT_UNARY;
  st->bytes_sent += sl_payload_size(k->payload);
  if (k->resp != NULL) st->bytes_received += grpc_byte_buffer_length(k->resp);
  st->code = (int)k->code;
  st->details = sl__slice_strdup(k->details);
  if (k->error_string != NULL) st->debug = sl_strndup(k->error_string, strlen(k->error_string));
  oom = sl__kv_from_metadata(&k->trailing, &st->trailing, &st->n_trailing) != SL_OK ||
        sl__kv_from_metadata(&k->initial, &st->initial, &st->n_initial) != SL_OK ||
        st->details == NULL;
  if (k->error_string != NULL) gpr_free((void *)k->error_string);
  k->error_string = NULL;
  grpc_slice_unref(k->details);
  grpc_metadata_array_destroy(&k->initial);
  grpc_metadata_array_destroy(&k->trailing);
  grpc_byte_buffer_destroy(k->send_bb);
  k->send_bb = NULL;
  grpc_call_unref(call);
  if (!oom && k->via_seg) {
    in_seg = sl__client_shm_reply(a->client, k->seg, st, &shm_span, &unknown);
  }
  if (cancel == CANCEL_NONE && !oom && unknown && st->code == SL_STATUS_FAILED_PRECONDITION) {
    /* the server does not know the segment (it restarted, or another replica
     * answered): the call was not served; send it again over the connection */
    if (k->resp != NULL) grpc_byte_buffer_destroy(k->resp);
    k->resp = NULL;
    give_segment(k, 1); /* still good: the server never took it */
    if (start_attempt(a, k, &k->res.err) == SL_OK) return;
    k->res.rc = k->res.err.status;
    finish(a, k);
    return;
  }

  if (cancel != CANCEL_NONE) {
    set_cancelled(k);
  } else if (oom) {
    k->res.rc = sl_err_set(&k->res.err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  } else if (in_seg < 0) {
    k->res.rc = SL_ESTATUS; /* over the receive limit: st says so */
  } else if (st->code == SL_STATUS_OK && in_seg) {
    k->res.rc = read_response(k, &shm_span, &k->res.err);
  } else if (st->code == SL_STATUS_OK && k->resp != NULL) {
    if (k->via_seg) sl__client_shm_reply_hint(a->client, grpc_byte_buffer_length(k->resp));
    k->res.rc = read_response(k, NULL, &k->res.err);
  } else if (st->code == SL_STATUS_OK) {
    st->code = SL_STATUS_INTERNAL;
    free(st->details);
    st->details = sl_strndup("the server ended the call without a response message", 52);
    k->res.rc = SL_ESTATUS;
  } else {
    k->res.rc = SL_ESTATUS;
    if (k->has_retry && k->retries < k->retry.max_retries &&
        sl_retry_code_is_retryable(st->code)) {
      double delay = sl_retry_delay(&k->retry, k->retries, sl_retry_uniform(&k->rng));
      double now = sl_now();
      if (k->deadline <= 0 || now + delay < k->deadline) {
        if (k->resp != NULL) grpc_byte_buffer_destroy(k->resp);
        k->resp = NULL;
        if (k->on_retry != NULL) {
          k->on_retry(k->on_retry_user, k->method, st->code, st->details ? st->details : "",
                      k->retries + 1, delay);
        }
        pthread_mutex_lock(&a->mu);
        k->due = now + delay > now ? now + delay : now + 1e-9;
        pthread_mutex_unlock(&a->mu);
        return; /* the timer starts the next attempt */
      }
    }
  }
  if (k->resp != NULL) grpc_byte_buffer_destroy(k->resp);
  k->resp = NULL;
  finish(a, k);
}

/* Calls whose retry sleep is over (or that were cancelled while sleeping). */
static void run_timers(sl_async *a) {
  for (;;) {
    sl_async_call *k = NULL;
    double now = sl_now();
    pthread_mutex_lock(&a->mu);
    for (sl_async_call *c = a->live; c != NULL; c = c->next) {
      if (c->due > 0 && (c->due <= now || c->cancel_reason != CANCEL_NONE)) {
        k = c;
        k->due = 0;
        break;
      }
    }
    pthread_mutex_unlock(&a->mu);
    if (k == NULL) return;
    if (k->cancel_reason != CANCEL_NONE) {
      set_cancelled(k);
      finish(a, k);
      continue;
    }
    k->retries++;
    if (start_attempt(a, k, &k->res.err) != SL_OK) {
      k->res.rc = k->res.err.status;
      finish(a, k);
    }
  }
}

static void *completion_main(void *arg) {
  sl_async *a = arg;
  sl_async_thread_fn stop = a->thread_stop;
  void *stop_user = a->thread_user;
  if (a->thread_start != NULL) a->thread_start(a->thread_user);
  for (;;) {
    double wait = SLICE_S;
    grpc_event ev;
    int free_self;
    pthread_mutex_lock(&a->mu);
    for (sl_async_call *c = a->live; c != NULL; c = c->next) {
      if (c->due > 0) {
        wait = TIMER_SLICE_S;
        break;
      }
    }
    pthread_mutex_unlock(&a->mu);
    ev = grpc_completion_queue_next(a->cq, sl__deadline_in(wait), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type == GRPC_OP_COMPLETE) {
      attempt_done(a, (sl_async_call *)ev.tag);
      sl_malloc_arena_note(); /* this thread reads replies: see tensor.h */
    }
    run_timers(a);
    pthread_mutex_lock(&a->mu);
    free_self = a->self_destroy && a->n_live == 0;
    pthread_mutex_unlock(&a->mu);
    if (free_self) {
      grpc_completion_queue_shutdown(a->cq);
      while (grpc_completion_queue_next(a->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
             GRPC_QUEUE_SHUTDOWN) {
      }
      grpc_completion_queue_destroy(a->cq);
      a->cq = NULL;
      pthread_detach(a->thread);
      if (stop != NULL) stop(stop_user);
      sl_async_release(a);
      return NULL;
    }
  }
  if (stop != NULL) stop(stop_user);
  return NULL;
}

void sl_async_retain(sl_async *a) { atomic_fetch_add(&a->refs, 1); }

void sl_async_release(sl_async *a) {
  if (a == NULL || atomic_fetch_sub(&a->refs, 1) != 1) return;
  pthread_mutex_destroy(&a->mu);
  pthread_cond_destroy(&a->cv);
  free(a);
  grpc_shutdown();
}

int sl_async_create(sl_client *c, sl_async_thread_fn thread_start, sl_async_thread_fn thread_stop,
                    void *user, sl_async **out, sl_err *err) {
  sl_async *a = calloc(1, sizeof(*a));
  *out = NULL;
  if (a == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  a->thread_start = thread_start;
  a->thread_stop = thread_stop;
  a->thread_user = user;
  atomic_init(&a->refs, 1);
  grpc_init();
  a->client = c;
  a->channel = sl__client_channel(c);
  a->cq = grpc_completion_queue_create_for_next(NULL);
  pthread_mutex_init(&a->mu, NULL);
  pthread_cond_init(&a->cv, NULL);
  if (a->cq == NULL || pthread_create(&a->thread, NULL, completion_main, a) != 0) {
    if (a->cq != NULL) grpc_completion_queue_destroy(a->cq);
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    free(a);
    grpc_shutdown();
    return sl_err_set(err, SL_EGRPC, SL_STATUS_INTERNAL,
                      "could not start the completion thread of asynchronous calls");
  }
  a->thread_started = 1;
  *out = a;
  return SL_OK;
}

int sl_async_compute_start(sl_async *a, const sl_call_opts *o, int backward,
                           const sl_tensor_set *in, const sl_call_fields *fields,
                           sl_async_done_fn done, void *user, sl_async_call **out,
                           sl_call_status *st, sl_err *err) {
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  Splitlearn__Comm__BackwardRequest breq = SPLITLEARN__COMM__BACKWARD_REQUEST__INIT;
  sl_msg_kind req_kind = backward ? SL_MSG_BACKWARD_REQUEST : SL_MSG_COMPUTE_REQUEST;
  ProtobufCMessage *header = backward ? &breq.base : &req.base;
  sl_async_call *k = NULL;
  sl_payload *p = NULL;
  int status, closing;

  *out = NULL;
  pthread_mutex_lock(&a->mu);
  closing = a->closing;
  pthread_mutex_unlock(&a->mu);
  if (closing) {
    sl_tensor_set_release(in);
    return sl_err_set(err, SL_ESTATE, SL_STATUS_CANCELLED, "the client is closed");
  }
  for (size_t i = 0; i < in->n; i++) {
    if (in->items[i].nbytes > SL_MAX_MESSAGE_BYTES - 64) {
      size_t nb = in->items[i].nbytes;
      sl_tensor_set_release(in);
      return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                        "tensor of %zu bytes is over gRPC's message limit of %zu bytes (2 GiB - "
                        "1); split the tensor or use a compressing codec",
                        nb, SL_MAX_MESSAGE_BYTES);
    }
  }
  if (fields != NULL) sl_call_fields_to_request(req_kind, header, fields);
  status = sl_tensor_set_pack(req_kind, header, in, &p, err); /* releases `in` on every path */
  if (status != SL_OK) return status;
  if (o->breaker != NULL) {
    double now = sl_now(), retry_at = 0;
    int failures = 0;
    if (!sl_breaker_allow(o->breaker, now, &retry_at, &failures)) {
      char buf[SL_BREAKER_MESSAGE_MAX];
      sl_breaker_open_message(retry_at - now, failures, buf, sizeof(buf)); /* the one wording */
      sl_call_status_clear(st);
      st->attempts = 0;
      st->code = SL_STATUS_UNAVAILABLE;
      st->details = sl_strndup(buf, strlen(buf));
      sl_payload_unref(p);
      return SL_ESTATUS;
    }
  }
  k = calloc(1, sizeof(*k));
  if (k == NULL) goto oom;
  k->eng = a;
  atomic_init(&k->refs, 2); /* the caller's handle and the engine */
  atomic_init(&k->finished, 0);
  k->backward = backward;
  k->method = backward ? SL_METHOD_PATH_BACKWARD : SL_METHOD_PATH_COMPUTE;
  k->on_retry = o->on_retry;
  k->on_retry_user = o->on_retry_user;
  k->payload = p;
  p = NULL;
  /* a segment when the channel has one (offered now when the server does not know
   * it yet); the metadata then gets one more slot */
  k->seg = sl__client_shm_take(a->client, o, k->payload);
  if (k->seg != NULL &&
      sl_payload_new(malloc(1), 0, NULL, 0, NULL, NULL, &k->empty) != SL_OK) {
    goto oom;
  }
  if (o->n_metadata > 0 || k->seg != NULL) {
    k->md = calloc(o->n_metadata + 1, sizeof(*k->md));
    if (k->md == NULL) goto oom;
    for (size_t i = 0; i < o->n_metadata; i++) {
      k->md[i].key = grpc_slice_from_copied_string(o->metadata[i].key);
      k->md[i].value = grpc_slice_from_copied_buffer(o->metadata[i].value,
                                                     o->metadata[i].value_len);
      k->n_md = i + 1;
    }
  }
  if (k->seg != NULL) {
    k->md[k->n_md].key = grpc_slice_from_static_string(SL_SHM_MD_REQ);
    k->md[k->n_md].value = grpc_empty_slice();
    k->seg_md = 1;
  }
  k->wait_for_ready = o->wait_for_ready;
  k->codecs = sl_codecs_ref(o->codecs);
  if (o->retry != NULL) {
    k->has_retry = 1;
    k->retry = *o->retry;
  }
  k->breaker = o->breaker;
  k->deadline = o->timeout > 0 ? sl_now() + o->timeout : 0;
  k->rng = (uint64_t)(uintptr_t)k ^ (uint64_t)(sl_now() * 1e9);
  k->done = done;
  k->user = user;
  sl_err_clear(&k->res.err);
  pthread_mutex_lock(&a->mu);
  if (a->closing) {
    pthread_mutex_unlock(&a->mu);
    call_free(k);
    return sl_err_set(err, SL_ESTATE, SL_STATUS_CANCELLED, "the client is closed");
  }
  k->next = a->live;
  if (a->live != NULL) a->live->prev = k;
  a->live = k;
  a->n_live++;
  pthread_mutex_unlock(&a->mu);
  status = start_attempt(a, k, err);
  if (status != SL_OK) {
    pthread_mutex_lock(&a->mu);
    if (k->prev != NULL) k->prev->next = k->next; else a->live = k->next;
    if (k->next != NULL) k->next->prev = k->prev;
    a->n_live--;
    if (a->closing && a->n_live == 0) pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    call_free(k);
    return status;
  }
  *out = k;
  return SL_OK;
oom:
  if (k != NULL) call_free(k);
  if (p != NULL) sl_payload_unref(p);
  return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
}

void sl_async_call_cancel(sl_async_call *k) {
  sl_async *a = k->eng;
  if (atomic_load(&k->finished)) return; /* the engine may be gone */
  pthread_mutex_lock(&a->mu);
  if (!k->finished && k->cancel_reason == CANCEL_NONE) {
    k->cancel_reason = CANCEL_USER;
    if (k->call != NULL) {
      grpc_call_cancel_with_status(k->call, GRPC_STATUS_CANCELLED, "cancelled by the caller",
                                   NULL);
    }
  }
  pthread_mutex_unlock(&a->mu);
}

size_t sl_async_in_flight(sl_async *a) {
  size_t n;
  pthread_mutex_lock(&a->mu);
  n = a->n_live;
  pthread_mutex_unlock(&a->mu);
  return n;
}

void sl_async_destroy(sl_async *a) {
  if (a == NULL) return;
  pthread_mutex_lock(&a->mu);
  a->closing = 1;
  for (sl_async_call *k = a->live; k != NULL; k = k->next) {
    if (k->cancel_reason == CANCEL_NONE) k->cancel_reason = CANCEL_CLOSED;
    if (k->call != NULL) {
      grpc_call_cancel_with_status(k->call, GRPC_STATUS_CANCELLED,
                                   "the client was closed with the call in flight", NULL);
    }
  }
  if (a->thread_started && pthread_equal(pthread_self(), a->thread)) {
    a->self_destroy = 1; /* inside `done`: the completion thread frees the engine */
    pthread_mutex_unlock(&a->mu);
    return;
  }
  while (a->n_live > 0) pthread_cond_wait(&a->cv, &a->mu);
  pthread_mutex_unlock(&a->mu);
  grpc_completion_queue_shutdown(a->cq);
  if (a->thread_started) pthread_join(a->thread, NULL);
  grpc_completion_queue_destroy(a->cq);
  a->cq = NULL;
  sl_async_release(a);
}
