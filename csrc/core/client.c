/* client.c: see client.h.
 *
 * Each attempt gets its own completion queue, polled only by the calling thread,
 * with one batch carrying every op of the unary call. Retries (built-in policies)
 * run here, attempts and sleeps alike, with no Python lock held.
 */
#include "client.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "client_internal.h"
#include "health.pb-c.h"
#include "methods.h"
#include "transport.h"

#define SLICE_S 0.2

struct sl_client {
  grpc_channel *channel;
  char *target;
  atomic_int refs;
  atomic_int closed; /* sl_client_destroy() ran: calls in flight end CANCELLED */
};

void sl_call_status_clear(sl_call_status *st) {
  int attempts = st->attempts;
  size_t sent = st->bytes_sent, received = st->bytes_received;
  free(st->details);
  free(st->debug);
  sl__kv_free(st->trailing, st->n_trailing);
  sl__kv_free(st->initial, st->n_initial);
  memset(st, 0, sizeof(*st));
  st->attempts = attempts;
  st->bytes_sent = sent;
  st->bytes_received = received;
}

int sl_client_create(const char *target, const sl_chan_arg *args, size_t nargs,
                     const sl_tls_client *tls, sl_client **out, sl_err *err) {
  int status;
  grpc_channel_args chargs = {0, NULL};
  grpc_channel_credentials *creds = NULL;
  sl_client *c = calloc(1, sizeof(*c));

  *out = NULL;
  if (c == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  grpc_init();
  atomic_init(&c->refs, 1);
  atomic_init(&c->closed, 0);
  c->target = sl_strndup(target, strlen(target));
  if (c->target == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  status = sl__channel_args_build(args, nargs, 0, &chargs, err);
  if (status != SL_OK) goto cleanup;
  if (tls != NULL) {
    grpc_ssl_pem_key_cert_pair pair = {tls->private_key, tls->cert_chain};
    if ((tls->cert_chain == NULL) != (tls->private_key == NULL)) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "a client certificate needs its private key, and the other way round");
      goto cleanup;
    }
    creds = grpc_ssl_credentials_create(tls->root_certs, tls->cert_chain ? &pair : NULL, NULL,
                                        NULL);
  } else {
    creds = grpc_insecure_credentials_create();
  }
  if (creds == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "invalid TLS credentials");
    goto cleanup;
  }
  c->channel = grpc_channel_create(target, creds, &chargs);
  if (c->channel == NULL) {
    status = sl_err_set(err, SL_EGRPC, SL_STATUS_INVALID_ARGUMENT,
                        "could not create a channel to '%s'", target);
    goto cleanup;
  }
  *out = c;
  c = NULL;
  status = SL_OK;
cleanup:
  if (creds != NULL) grpc_channel_credentials_release(creds);
  sl__channel_args_free(&chargs);
  if (c != NULL) sl_client_destroy(c);
  return status;
}

void sl_client_retain(sl_client *c) {
  if (c != NULL) atomic_fetch_add(&c->refs, 1);
}

void sl_client_destroy(sl_client *c) {
  if (c == NULL) return;
  atomic_store(&c->closed, 1);
  sl_client_release(c);
}

#define CLOSED_DETAILS "the client was closed while the call was in flight"

void sl_client_release(sl_client *c) {
  if (c == NULL || atomic_fetch_sub(&c->refs, 1) != 1) return;
  if (c->channel != NULL) grpc_channel_destroy(c->channel);
  free(c->target);
  free(c);
  grpc_shutdown();
}

static void destroy_queue(grpc_completion_queue *cq) {
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
}

int sl_client_connect(sl_client *c, double timeout, sl_interrupt_fn interrupt, void *user) {
  int status = SL_ETIMEDOUT, tag;
  double deadline = sl_now() + (timeout > 0 ? timeout : 0);
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  for (;;) {
    grpc_connectivity_state state = grpc_channel_check_connectivity_state(c->channel, 1);
    double left = deadline - sl_now();
    if (state == GRPC_CHANNEL_READY) {
      status = SL_OK;
      break;
    }
    if (state == GRPC_CHANNEL_SHUTDOWN || left <= 0) break;
    grpc_channel_watch_connectivity_state(c->channel, state,
                                          sl__deadline_in(left < SLICE_S ? left : SLICE_S), cq,
                                          &tag);
    grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (interrupt != NULL && interrupt(user)) {
      status = SL_EINTR;
      break;
    }
  }
  destroy_queue(cq);
  return status;
}

/* One attempt: send `p` to `method`, wait for the status. Returns SL_OK when the
 * call ended (whatever its status, in `st`), SL_EINTR when interrupted, or a local
 * failure with `err`. On SL_OK with status OK, *resp holds the response. */
static int attempt(sl_client *c, const char *method, sl_payload *p, double deadline,
                   const sl_call_opts *o, grpc_byte_buffer **resp, sl_call_status *st,
                   sl_err *err) {
  /* `deadline`: this attempt's, on the sl_now() clock (0: none) */
  int status = SL_EGRPC, interrupted = 0, closed = 0, tag;
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_call *call = NULL;
  grpc_slice method_slice = grpc_slice_from_static_string(method);
  grpc_metadata *md = NULL;
  grpc_metadata_array initial, trailing;
  grpc_byte_buffer *send_bb = NULL;
  grpc_status_code code = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  const char *error_string = NULL;
  grpc_op ops[6];
  grpc_call_error ce;
  gpr_timespec dl = deadline > 0 ? sl__deadline_in(deadline - sl_now() > 1e-6 ? deadline - sl_now() : 1e-6)
                                 : gpr_inf_future(GPR_CLOCK_MONOTONIC);

  *resp = NULL;
  grpc_metadata_array_init(&initial);
  grpc_metadata_array_init(&trailing);
  if (cq == NULL) goto cleanup;
  if (o->n_metadata > 0) {
    md = calloc(o->n_metadata, sizeof(*md));
    if (md == NULL) {
      status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
      goto cleanup;
    }
    for (size_t i = 0; i < o->n_metadata; i++) {
      md[i].key = grpc_slice_from_copied_string(o->metadata[i].key);
      md[i].value = grpc_slice_from_copied_buffer(o->metadata[i].value, o->metadata[i].value_len);
    }
  }
  call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method_slice,
                                  NULL, dl, NULL);
  send_bb = sl__payload_byte_buffer(p);
  if (call == NULL || send_bb == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "could not create a call");
    goto cleanup;
  }
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = o->n_metadata;
  ops[0].data.send_initial_metadata.metadata = md;
  ops[0].flags = o->wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                                         GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET
                                   : 0;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send_bb;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
  ops[5].data.recv_status_on_client.status = &code;
  ops[5].data.recv_status_on_client.status_details = &details;
  ops[5].data.recv_status_on_client.error_string = &error_string;
  ce = grpc_call_start_batch(call, ops, 6, &tag, NULL);
  if (ce != GRPC_CALL_OK) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        ce == GRPC_CALL_ERROR_INVALID_METADATA
                            ? "invalid request metadata (keys must be lowercase ASCII; "
                              "binary values need a key ending in -bin)"
                            : "could not start the call (gRPC error %d)",
                        (int)ce);
    goto cleanup;
  }
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(cq, sl__deadline_in(SLICE_S), NULL);
    if (ev.type == GRPC_OP_COMPLETE) break;
    if (!interrupted && o->interrupt != NULL && o->interrupt(o->interrupt_user)) {
      interrupted = 1;
      grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, "interrupted by the caller", NULL);
    } else if (!interrupted && !closed && atomic_load(&c->closed)) {
      closed = 1; /* a status, not an interruption: the caller gets CANCELLED */
      grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, CLOSED_DETAILS, NULL);
    }
  }
  st->bytes_sent += sl_payload_size(p);
  if (*resp != NULL) st->bytes_received += grpc_byte_buffer_length(*resp);
  st->code = (int)code;
  st->details = sl__slice_strdup(details);
  /* the peer's bytes: whatever they are, what goes on is UTF-8 */
  if (st->details != NULL) sl_utf8_sanitize(st->details);
  if (error_string != NULL) st->debug = sl_strndup(error_string, strlen(error_string));
  if (sl__kv_from_metadata(&trailing, &st->trailing, &st->n_trailing) != SL_OK ||
      sl__kv_from_metadata(&initial, &st->initial, &st->n_initial) != SL_OK ||
      st->details == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  status = interrupted ? SL_EINTR : SL_OK;
cleanup:
  if (status != SL_OK && *resp != NULL) {
    grpc_byte_buffer_destroy(*resp);
    *resp = NULL;
  }
  if (error_string != NULL) gpr_free((void *)error_string);
  grpc_slice_unref(details);
  if (send_bb != NULL) grpc_byte_buffer_destroy(send_bb);
  if (call != NULL) grpc_call_unref(call);
  if (md != NULL) {
    for (size_t i = 0; i < o->n_metadata; i++) {
      grpc_slice_unref(md[i].key);
      grpc_slice_unref(md[i].value);
    }
    free(md);
  }
  grpc_metadata_array_destroy(&initial);
  grpc_metadata_array_destroy(&trailing);
  if (cq != NULL) destroy_queue(cq);
  return status;
}

/* Sleep `seconds` before a retry, in slices, asking the interrupt hook between
 * them, and drive the channel meanwhile: ask it to connect and poll a queue that
 * watches its state. With Debian's gRPC (iomgr) a connection attempt advances
 * only while some thread polls; without this, a channel whose server went away
 * reconnects only when gRPC's backup poller runs (every 5 s), long after the
 * server is back. The sleep ends early when a channel that was not connected
 * becomes ready (the server is back: the rest of the backoff would only delay the
 * call); a channel that stays ready (an overloaded server) sleeps it out. Each
 * watch ends by the end of its slice, so none is pending when the queue goes. */
static int sleep_sliced(sl_client *c, double seconds, const sl_call_opts *o) {
  int status = SL_OK, tag, was_down = -1;
  double end = sl_now() + seconds;
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  for (;;) {
    double left = end - sl_now();
    grpc_connectivity_state state;
    if (left <= 0) break;
    if (left > SLICE_S) left = SLICE_S;
    state = grpc_channel_check_connectivity_state(c->channel, 1);
    if (was_down < 0) was_down = state != GRPC_CHANNEL_READY;
    if (was_down && state == GRPC_CHANNEL_READY) break;
    if (cq != NULL && state != GRPC_CHANNEL_SHUTDOWN) {
      /* completes when the state changes or at the end of the slice */
      grpc_channel_watch_connectivity_state(c->channel, state, sl__deadline_in(left), cq, &tag);
      grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    } else {
      struct timespec ts;
      ts.tv_sec = (time_t)left;
      ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
      nanosleep(&ts, NULL);
    }
    if (o->interrupt != NULL && o->interrupt(o->interrupt_user)) {
      status = SL_EINTR;
      break;
    }
  }
  if (cq != NULL) destroy_queue(cq);
  return status;
}

/* A name that does not resolve fails the same way on every attempt: retrying it
 * only delays the error (gRPC words it "DNS resolution failed for ..."). */
static int is_dns_failure(const sl_call_status *st) {
  static const char prefix[] = "DNS resolution failed";
  return st->code == SL_STATUS_UNAVAILABLE && st->details != NULL &&
         strncmp(st->details, prefix, sizeof(prefix) - 1) == 0;
}

/* The attempts of a unary call under the options' retry policy. Returns SL_OK
 * (status OK, *resp set), SL_ESTATUS (non-OK status in st), SL_EINTR, or a local
 * failure. */
static int attempts(sl_client *c, const char *method, sl_payload *p, const sl_call_opts *o,
                    grpc_byte_buffer **resp, sl_call_status *st, sl_err *err) {
  double deadline = o->timeout > 0 ? sl_now() + o->timeout : 0;
  uint64_t rng = (uint64_t)(uintptr_t)st ^ (uint64_t)(sl_now() * 1e9);
  int retry = 0;
  for (;;) {
    int rc;
    double attempt_deadline = deadline;
    if (o->retry != NULL && o->retry->attempt_timeout > 0) {
      double own = sl_now() + o->retry->attempt_timeout;
      if (attempt_deadline == 0 || own < attempt_deadline) attempt_deadline = own;
    }
    sl_call_status_clear(st);
    st->attempts = retry + 1;
    rc = attempt(c, method, p, attempt_deadline, o, resp, st, err);
    if (rc == SL_EINTR) {
      st->code = SL_STATUS_CANCELLED;
      return rc;
    }
    if (rc != SL_OK) return rc;
    if (st->code == SL_STATUS_OK) {
      if (*resp != NULL) return SL_OK;
      st->code = SL_STATUS_INTERNAL;
      free(st->details);
      st->details = sl_strndup("the server ended the call without a response message", 52);
      return SL_ESTATUS;
    }
    if (*resp != NULL) {
      grpc_byte_buffer_destroy(*resp);
      *resp = NULL;
    }
    if (o->retry == NULL || retry >= o->retry->max_retries ||
        !sl_retry_code_is_retryable(st->code) || is_dns_failure(st)) {
      return SL_ESTATUS;
    }
    {
      double delay = sl_retry_delay(o->retry, retry, sl_retry_uniform(&rng));
      if (deadline > 0 && sl_now() + delay >= deadline) return SL_ESTATUS;
      if (o->on_retry != NULL) {
        o->on_retry(o->on_retry_user, method, st->code, st->details ? st->details : "",
                    retry + 1, delay);
      }
      if (sleep_sliced(c, delay, o) == SL_EINTR) {
        st->code = SL_STATUS_CANCELLED;
        return SL_EINTR;
      }
    }
    if (atomic_load(&c->closed)) {
      sl_call_status_clear(st);
      st->code = SL_STATUS_CANCELLED;
      st->details = sl_strndup(CLOSED_DETAILS, strlen(CLOSED_DETAILS));
      return SL_ESTATUS;
    }
    retry++;
  }
}

/* A unary call: the circuit breaker (if any), then the attempts. */
static int unary(sl_client *c, const char *method, sl_payload *p, const sl_call_opts *o,
                 grpc_byte_buffer **resp, sl_call_status *st, sl_err *err) {
  int rc;
  if (o->breaker != NULL) {
    double now = sl_now(), retry_at = 0;
    int failures = 0;
    if (!sl_breaker_allow(o->breaker, now, &retry_at, &failures)) {
      char buf[SL_BREAKER_MESSAGE_MAX];
      sl_breaker_open_message(retry_at - now, failures, buf, sizeof(buf));
      sl_call_status_clear(st);
      st->attempts = 0;
      st->code = SL_STATUS_UNAVAILABLE;
      st->details = sl_strndup(buf, strlen(buf));
      return SL_ESTATUS;
    }
  }
  rc = attempts(c, method, p, o, resp, st, err);
  if (o->breaker != NULL && (rc == SL_OK || rc == SL_ESTATUS)) {
    sl_breaker_record(o->breaker, rc == SL_OK ? SL_STATUS_OK : st->code, sl_now());
  }
  return rc;
}

int sl_client_compute(sl_client *c, const sl_call_opts *opts, int backward,
                      const sl_tensor_set *in, const sl_call_fields *fields, sl_tensor_msg *out,
                      sl_compute_extra *extra_out, sl_call_status *st, sl_err *err) {
  int status;
  Splitlearn__Comm__ComputeRequest req = SPLITLEARN__COMM__COMPUTE_REQUEST__INIT;
  Splitlearn__Comm__BackwardRequest breq = SPLITLEARN__COMM__BACKWARD_REQUEST__INIT;
  sl_msg_kind req_kind = backward ? SL_MSG_BACKWARD_REQUEST : SL_MSG_COMPUTE_REQUEST;
  sl_msg_kind resp_kind = backward ? SL_MSG_BACKWARD_RESPONSE : SL_MSG_COMPUTE_RESPONSE;
  ProtobufCMessage *header = backward ? &breq.base : &req.base;
  const char *method = backward ? SL_METHOD_PATH_BACKWARD : SL_METHOD_PATH_COMPUTE;
  sl_payload *p = NULL;
  grpc_byte_buffer *resp = NULL;
  sl__bbspans spans = {0};

  memset(out, 0, sizeof(*out));
  memset(extra_out, 0, sizeof(*extra_out));
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
  status = sl_tensor_set_pack(req_kind, header, in, &p, err);
  if (status != SL_OK) return status;
  status = unary(c, method, p, opts, &resp, st, err);
  if (status != SL_OK) goto cleanup;
  status = sl__bbspans_take(&resp, &spans, err);
  if (status == SL_OK) {
    sl_span_owner owner = {sl__bbspans_release, &spans};
    status = sl_tensor_msg_read_owned(resp_kind, spans.spans, spans.n, NULL, &owner, out, err);
  }
  if (status == SL_OK) status = sl_tensor_msg_decode(out, err);
  if (status != SL_OK) {
    char inner[SL_ERR_MSG_MAX];
    memcpy(inner, err->msg, sizeof(inner));
    sl_err_set(err, status, SL_STATUS_INTERNAL, "bad response from the server: %.400s", inner);
    sl_tensor_msg_clear(out);
    goto cleanup;
  }
  if (backward) {
    Splitlearn__Comm__BackwardResponse *b = (Splitlearn__Comm__BackwardResponse *)out->header;
    extra_out->has_compute_time_ms =
        b->_backward_time_ms_case ==
        SPLITLEARN__COMM__BACKWARD_RESPONSE___BACKWARD_TIME_MS_BACKWARD_TIME_MS;
    extra_out->compute_time_ms = b->backward_time_ms;
  } else {
    Splitlearn__Comm__ComputeResponse *r = (Splitlearn__Comm__ComputeResponse *)out->header;
    extra_out->has_request_id =
        r->_request_id_case == SPLITLEARN__COMM__COMPUTE_RESPONSE___REQUEST_ID_REQUEST_ID;
    extra_out->request_id = r->request_id;
    extra_out->has_compute_time_ms =
        r->_compute_time_ms_case ==
        SPLITLEARN__COMM__COMPUTE_RESPONSE___COMPUTE_TIME_MS_COMPUTE_TIME_MS;
    extra_out->compute_time_ms = r->compute_time_ms;
  }
cleanup:
  sl__bbspans_clear(&spans);
  if (resp != NULL) grpc_byte_buffer_destroy(resp);
  sl_payload_unref(p); /* the releases run once gRPC has let go of the bytes too */
  return status;
}

/* A unary call whose request and response are small protobuf-c messages. */
static int small_call(sl_client *c, const sl_call_opts *opts, const char *method,
                      const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
                      ProtobufCMessage **out, sl_call_status *st, sl_err *err) {
  int status;
  size_t len = protobuf_c_message_get_packed_size(req), rlen = 0;
  uint8_t *buf = malloc(len ? len : 1), *rbuf = NULL;
  sl_payload *p = NULL;
  grpc_byte_buffer *resp = NULL;

  *out = NULL;
  if (buf == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  protobuf_c_message_pack(req, buf);
  status = sl_payload_new(buf, len, NULL, 0, NULL, NULL, &p); /* takes buf, failing or not */
  if (status != SL_OK) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  status = unary(c, method, p, opts, &resp, st, err);
  if (status != SL_OK) goto cleanup;
  status = sl__bb_readall(resp, &rbuf, &rlen);
  if (status != SL_OK) {
    status = sl_err_set(err, status, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  *out = protobuf_c_message_unpack(resp_desc, NULL, rlen, rbuf);
  if (*out == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INTERNAL, "malformed response to %s", method);
  }
cleanup:
  free(rbuf);
  if (resp != NULL) grpc_byte_buffer_destroy(resp);
  sl_payload_unref(p);
  return status;
}

void sl_health_clear(sl_health *h) {
  free(h->status);
  free(h->message);
  free(h->version);
  memset(h, 0, sizeof(*h));
}

/* A string the server sent, made well-formed UTF-8 (protobuf-c does not check). */
static char *dup_str(const char *s) {
  char *d = sl_strndup(s, strlen(s));
  if (d != NULL) sl_utf8_sanitize(d);
  return d;
}

int sl_client_health(sl_client *c, const sl_call_opts *opts, sl_health *out, sl_call_status *st,
                     sl_err *err) {
  Splitlearn__Comm__HealthRequest req = SPLITLEARN__COMM__HEALTH_REQUEST__INIT;
  Splitlearn__Comm__HealthResponse *r = NULL;
  int status = small_call(c, opts, SL_METHOD_PATH_HEALTH, &req.base,
                          &splitlearn__comm__health_response__descriptor,
                          (ProtobufCMessage **)&r, st, err);
  memset(out, 0, sizeof(*out));
  if (status != SL_OK) return status;
  out->status = dup_str(r->status);
  out->message = dup_str(r->message);
  out->version = dup_str(r->version);
  out->has_uptime =
      r->_uptime_seconds_case == SPLITLEARN__COMM__HEALTH_RESPONSE___UPTIME_SECONDS_UPTIME_SECONDS;
  out->uptime_seconds = r->uptime_seconds;
  splitlearn__comm__health_response__free_unpacked(r, NULL);
  if (out->status == NULL || out->message == NULL || out->version == NULL) {
    sl_health_clear(out);
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  }
  return SL_OK;
}

void sl_info_result_clear(sl_info_result *r) {
  free(r->service_name);
  free(r->version);
  free(r->device);
  sl__kv_free(r->custom, r->n_custom);
  memset(r, 0, sizeof(*r));
}

int sl_client_service_info(sl_client *c, const sl_call_opts *opts, sl_info_result *out,
                           sl_call_status *st, sl_err *err) {
  Splitlearn__Comm__ServiceInfoRequest req = SPLITLEARN__COMM__SERVICE_INFO_REQUEST__INIT;
  Splitlearn__Comm__ServiceInfoResponse *r = NULL;
  int status = small_call(c, opts, SL_METHOD_PATH_INFO, &req.base,
                          &splitlearn__comm__service_info_response__descriptor,
                          (ProtobufCMessage **)&r, st, err);
  int oom = 0;
  memset(out, 0, sizeof(*out));
  if (status != SL_OK) return status;
  out->service_name = dup_str(r->service_name);
  out->version = dup_str(r->version);
  out->device = dup_str(r->device);
  out->has_uptime = r->_uptime_seconds_case ==
                    SPLITLEARN__COMM__SERVICE_INFO_RESPONSE___UPTIME_SECONDS_UPTIME_SECONDS;
  out->uptime_seconds = r->uptime_seconds;
  out->total_requests = r->total_requests;
  oom = out->service_name == NULL || out->version == NULL || out->device == NULL;
  if (!oom && r->n_custom_info > 0) {
    out->custom = calloc(r->n_custom_info, sizeof(*out->custom));
    oom = out->custom == NULL;
    for (size_t i = 0; !oom && i < r->n_custom_info; i++) {
      out->custom[i].key = dup_str(r->custom_info[i]->key);
      out->custom[i].value = dup_str(r->custom_info[i]->value);
      out->n_custom = i + 1;
      oom = out->custom[i].key == NULL || out->custom[i].value == NULL;
      if (!oom) out->custom[i].value_len = strlen(out->custom[i].value);
    }
  }
  splitlearn__comm__service_info_response__free_unpacked(r, NULL);
  if (oom) {
    sl_info_result_clear(out);
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  }
  return SL_OK;
}

int sl_client_std_health(sl_client *c, const sl_call_opts *opts, const char *service, int *status_out,
                         sl_call_status *st, sl_err *err) {
  Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  Grpc__Health__V1__HealthCheckResponse *r = NULL;
  int status;
  req.service = (char *)service;
  status = small_call(c, opts, SL_METHOD_PATH_STD_HEALTH, &req.base,
                      &grpc__health__v1__health_check_response__descriptor,
                      (ProtobufCMessage **)&r, st, err);
  *status_out = 0;
  if (status != SL_OK) return status;
  *status_out = (int)r->status;
  grpc__health__v1__health_check_response__free_unpacked(r, NULL);
  return SL_OK;
}

grpc_channel *sl__client_channel(sl_client *c) { return c->channel; }
