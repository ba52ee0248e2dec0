/* client.c: see client.h.
 *
 * Each attempt gets its own completion queue, polled only by the calling thread,
 * with one batch carrying every op of the unary call. Retries (built-in policies)
 * run here, attempts and sleeps alike, with no Python lock held.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "client.h"

#include <grpc/grpc.h>
#include <stdatomic.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client_internal.h"
#include "health.pb-c.h"
#include "methods.h"
#include "shm.h"
#include "stream.h"
#include "transport.h"

#define SLICE_S 0.2

enum { SHM_OFF = -1, SHM_UNKNOWN = 0, SHM_ON = 1 };

struct sl_client {
  grpc_channel *channel;
  char *target;
  /* the same-host shared-memory channel (shm.h): NULL when disabled or the
   * target is not this host; shm_state says what the server answered */
  sl_shm_pool *shm;
  atomic_int shm_state;
  atomic_llong shm_calls;   /* calls whose request went through a segment */
  atomic_llong shm_reply_hint; /* the largest reply that did not fit a segment */
  pid_t shm_pid;               /* the process the segments belong to (a forked child
                                  shares their memory with its parent: it never uses them) */
  pthread_mutex_t note_mu;  /* guards note */
  char note[SL_ERR_MSG_MAX]; /* a change of state to log once ("" when none) */
  atomic_size_t stream_threshold; /* messages of this many bytes and more are streamed */
  atomic_size_t stream_chunk;     /* bytes of the message per Chunk (0: by its size) */
  size_t max_send, max_recv;      /* grpc.max_{send,receive}_message_length when set:
                                     they bound streamed and shm messages too */
  atomic_int no_stream[2];        /* the server answered UNIMPLEMENTED to ComputeStream
                                     [0] / ComputeBackwardStream [1]: unary from now on */
  atomic_int refs;
  atomic_int closed; /* sl_client_destroy() ran: calls in flight end CANCELLED */
  /* busy polling (sl_client_set_busy_poll): the window (0: off); polls in a row
   * whose reply did not come within it; calls left to sleep through before the
   * next poll, and how many the last back-off skipped. Updated without a lock:
   * a lost update between threads only moves a back-off by a call. */
  atomic_llong busy_poll_ns;
  atomic_int poll_misses, poll_skip, poll_backoff;
};

/* Whether a thread of this process busy-polls now: one at a time, so that busy
 * polling never keeps more than one CPU from the process's other work. A flag
 * changed only by compare-and-swap (taken) and store (given back): no lock. */
static atomic_int busy_polling;

static void set_note(sl_client *c, const char *fmt, const char *arg) {
  pthread_mutex_lock(&c->note_mu);
  snprintf(c->note, sizeof(c->note), fmt, arg);
  pthread_mutex_unlock(&c->note_mu);
}

int sl_client_shm_note(sl_client *c, char *buf, size_t n) {
  int any;
  pthread_mutex_lock(&c->note_mu);
  any = c->note[0] != '\0';
  if (any) snprintf(buf, n, "%s", c->note);
  c->note[0] = '\0';
  pthread_mutex_unlock(&c->note_mu);
  return any;
}

void sl_client_set_shm(sl_client *c, int enable) {
  if (!enable) atomic_store(&c->shm_state, SHM_OFF);
}

void sl_client_shm_stats(sl_client *c, int *state, size_t *segments, long long *calls) {
  *state = c->shm == NULL ? SHM_OFF : atomic_load(&c->shm_state);
  *segments = c->shm != NULL ? sl_shm_pool_count(c->shm) : 0;
  *calls = atomic_load(&c->shm_calls);
}

void sl_client_set_streaming(sl_client *c, size_t threshold, size_t chunk) {
  atomic_store(&c->stream_threshold, threshold);
  atomic_store(&c->stream_chunk, chunk);
}

void sl_client_set_busy_poll(sl_client *c, double seconds) {
  cpu_set_t cpus;
  long long ns = seconds > 0 ? (long long)(seconds * 1e9) : 0;
  /* one CPU: the reply's sender needs the CPU the poller would keep */
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) < 2) ns = 0;
  atomic_store(&c->busy_poll_ns, ns);
}

double sl_client_busy_poll(const sl_client *c) {
  return (double)atomic_load(&c->busy_poll_ns) * 1e-9;
}

/* After POLL_MISSES polls in a row whose reply came later than the window, the
 * client's calls sleep through the next POLL_BACKOFF_MIN calls, then poll once to
 * see whether polling pays again; each further miss doubles the calls skipped,
 * up to POLL_BACKOFF_MAX, and a poll that gets its reply ends the back-off. */
#define POLL_MISSES 4
#define POLL_BACKOFF_MIN 16
#define POLL_BACKOFF_MAX 1024

/* Busy polling (client.h): look at `cq` without sleeping until its one event
 * comes or the window ends. Returns 1 with the event taken, 0 when the caller is
 * to wait as usual (not polling now, or no event within the window). */
static int busy_poll(sl_client *c, grpc_completion_queue *cq) {
  long long window = atomic_load_explicit(&c->busy_poll_ns, memory_order_relaxed);
  int idle = 0, done = 0, backoff;
  double until;
  if (window <= 0) return 0;
  if (atomic_load_explicit(&c->poll_skip, memory_order_relaxed) > 0) {
    atomic_fetch_sub_explicit(&c->poll_skip, 1, memory_order_relaxed);
    return 0;
  }
  if (!atomic_compare_exchange_strong(&busy_polling, &idle, 1)) return 0;
  until = sl_now() + (double)window * 1e-9;
  do {
    /* a past deadline: one look at the queue and one poll of the sockets */
    done = grpc_completion_queue_next(cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL).type ==
           GRPC_OP_COMPLETE;
    /* a thread waiting for this CPU (the server's, on the same host) runs first */
    if (!done) sched_yield();
  } while (!done && sl_now() < until);
  atomic_store(&busy_polling, 0);
  if (done) {
    atomic_store_explicit(&c->poll_misses, 0, memory_order_relaxed);
    atomic_store_explicit(&c->poll_backoff, 0, memory_order_relaxed);
  } else if (atomic_fetch_add_explicit(&c->poll_misses, 1, memory_order_relaxed) + 1 >=
                 POLL_MISSES ||
             atomic_load_explicit(&c->poll_backoff, memory_order_relaxed) > 0) {
    /* a run of misses, or the probe after a back-off missed too */
    backoff = atomic_load_explicit(&c->poll_backoff, memory_order_relaxed);
    backoff = backoff == 0 ? POLL_BACKOFF_MIN : backoff >= POLL_BACKOFF_MAX / 2 ? POLL_BACKOFF_MAX
                                                                             : 2 * backoff;
    atomic_store_explicit(&c->poll_backoff, backoff, memory_order_relaxed);
    atomic_store_explicit(&c->poll_misses, 0, memory_order_relaxed);
    atomic_store_explicit(&c->poll_skip, backoff, memory_order_relaxed);
  }
  return done;
}

void sl_client_streaming(const sl_client *c, size_t *threshold, size_t *chunk, int *no_stream,
                         int *no_stream_backward) {
  if (threshold != NULL) *threshold = atomic_load(&c->stream_threshold);
  if (chunk != NULL) *chunk = atomic_load(&c->stream_chunk);
  if (no_stream != NULL) *no_stream = atomic_load(&c->no_stream[0]);
  if (no_stream_backward != NULL) *no_stream_backward = atomic_load(&c->no_stream[1]);
}

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
  sl_malloc_tune(); /* large messages: see tensor.h */
  sl_client_set_streaming(c, SL_STREAM_THRESHOLD_DEFAULT, SL_STREAM_CHUNK_DEFAULT);
  {
    const char *v = getenv("SPLITLEARN_BUSY_POLL");
    sl_client_set_busy_poll(c, v != NULL && strcmp(v, "0") == 0 ? 0 : SL_BUSY_POLL_DEFAULT);
  }
  c->max_send = c->max_recv = SL_MAX_DECODED_BYTES;
  for (size_t i = 0; i < nargs; i++) {
    if (args[i].is_string || args[i].ival < 0) continue;
    if (strcmp(args[i].key, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH) == 0) c->max_send = (size_t)args[i].ival;
    if (strcmp(args[i].key, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH) == 0) c->max_recv = (size_t)args[i].ival;
  }
  atomic_init(&c->refs, 1);
  atomic_init(&c->closed, 0);
  pthread_mutex_init(&c->note_mu, NULL);
  atomic_init(&c->shm_state, SHM_UNKNOWN);
  atomic_init(&c->shm_calls, 0);
  atomic_init(&c->shm_reply_hint, 0);
  c->shm_pid = getpid();
  if (sl_shm_env_enabled() && sl_shm_target_is_local(target) && tls == NULL &&
      sl_shm_pool_new(&c->shm) != SL_OK) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
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
  sl_shm_pool_free(c->shm);
  pthread_mutex_destroy(&c->note_mu);
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

/* A call whose request goes through a shared-memory segment (shm.h). Its options'
 * metadata ends with one more entry, "sl-shm-req", whose value each attempt
 * rewrites: every attempt copies the request into the segment again (the server
 * writes its reply over it) and posts a new sequence number. */
typedef struct shm_call {
  sl_shm_seg *seg;
  sl_payload *empty;  /* the message sent instead of the request */
  sl_kv *md;          /* the options' metadata plus the control entry */
  char value[160];
  int posted;         /* an attempt posted the request */
  int broken;         /* the server held the segment when an attempt gave up: it is
                         never used again, and the next attempts go over TCP */
} shm_call;

/* One attempt: send `p` to `method`, wait for the status. Returns SL_OK when the
 * call ended (whatever its status, in `st`), SL_EINTR when interrupted, or a local
 * failure with `err`. On SL_OK with status OK, *resp holds the response. With `sc`,
 * the request goes through its segment (unless it broke: then over TCP). */
static int attempt(sl_client *c, const char *method, sl_payload *p, double deadline,
                   const sl_call_opts *o, shm_call *sc, grpc_byte_buffer **resp,
                   sl_call_status *st, sl_err *err) {
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

  size_t n_md = o->n_metadata;
  sl_payload *send = p;

  *resp = NULL;
  grpc_metadata_array_init(&initial);
  grpc_metadata_array_init(&trailing);
  if (cq == NULL) goto cleanup;
  if (sc != NULL) {
    if (sc->posted && !sc->broken && !sl_shm_seg_settle(sc->seg)) sc->broken = 1;
    if (sc->broken) {
      n_md--; /* no control entry: the request goes over TCP */
    } else {
      if (sl_shm_seg_put_request(sc->seg, p, sc->value, sizeof(sc->value)) == SL_OK) {
        sc->md[n_md - 1].value_len = strlen(sc->value);
        sc->posted = 1;
        send = sc->empty;
        st->transport = SL_TRANSPORT_SHM;
      } else {
        sc->broken = 1; /* (cannot be: the segment was sized for it) */
        n_md--;
      }
    }
  }
  if (n_md > 0) {
    md = calloc(n_md, sizeof(*md));
    if (md == NULL) {
      status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
      goto cleanup;
    }
    for (size_t i = 0; i < n_md; i++) {
      md[i].key = grpc_slice_from_copied_string(o->metadata[i].key);
      md[i].value = grpc_slice_from_copied_buffer(o->metadata[i].value, o->metadata[i].value_len);
    }
  }
  call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method_slice,
                                  NULL, dl, NULL);
  send_bb = sl__payload_byte_buffer(send);
  if (call == NULL || send_bb == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "could not create a call");
    goto cleanup;
  }
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = n_md;
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
  for (int polled = busy_poll(c, cq); !polled;) {
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
    for (size_t i = 0; i < n_md; i++) {
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

/* Request metadata as gRPC metadata (the caller frees it with md_free). */
static grpc_metadata *md_make(const sl_call_opts *o) {
  grpc_metadata *md = calloc(o->n_metadata ? o->n_metadata : 1, sizeof(*md));
  if (md == NULL) return NULL;
  for (size_t i = 0; i < o->n_metadata; i++) {
    md[i].key = grpc_slice_from_copied_string(o->metadata[i].key);
    md[i].value = grpc_slice_from_copied_buffer(o->metadata[i].value, o->metadata[i].value_len);
  }
  return md;
}

static void md_free(grpc_metadata *md, size_t n) {
  if (md == NULL) return;
  for (size_t i = 0; i < n; i++) {
    grpc_slice_unref(md[i].key);
    grpc_slice_unref(md[i].value);
  }
  free(md);
}

/* One streamed attempt (ComputeStream / ComputeBackwardStream): `p` goes out as
 * Chunks of `chunk` bytes, one send at a time, while the response's Chunks come in
 * and are copied into place by `rx` (each one while the next is on the wire).
 * Returns like attempt(); on SL_OK with status OK, rx holds the whole response
 * (sl_stream_rx_spans done). A response that does not assemble cancels the call
 * and fails locally (INTERNAL, in `err`). */
static int attempt_stream(sl_client *c, const char *method, sl_payload *p, size_t chunk,
                          double deadline, const sl_call_opts *o, sl_stream_rx *rx,
                          sl_call_status *st, sl_err *err) {
  int status = SL_EGRPC, interrupted = 0, closed = 0, bad = 0;
  int send_tag, recv_tag, status_tag;
  int sending = 0, receiving = 0, have_status = 0, status_started = 0;
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_call *call = NULL;
  grpc_slice method_slice = grpc_slice_from_static_string(method);
  grpc_metadata *md = NULL;
  grpc_metadata_array initial, trailing;
  grpc_byte_buffer *send_bb = NULL, *recv_bb = NULL;
  grpc_status_code code = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  const char *error_string = NULL;
  size_t total = sl_payload_size(p), nch = sl_stream_chunks(total, chunk), next = 0;
  grpc_op ops[3];
  grpc_call_error ce;
  sl_err rx_err;
  gpr_timespec dl = deadline > 0 ? sl__deadline_in(deadline - sl_now() > 1e-6 ? deadline - sl_now() : 1e-6)
                                 : gpr_inf_future(GPR_CLOCK_MONOTONIC);

  sl_err_clear(&rx_err);
  grpc_metadata_array_init(&initial);
  grpc_metadata_array_init(&trailing);
  if (cq == NULL) goto cleanup;
  md = md_make(o);
  call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method_slice,
                                  NULL, dl, NULL);
  if (md == NULL || call == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "could not create a call");
    goto cleanup;
  }
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[0].data.recv_status_on_client.trailing_metadata = &trailing;
  ops[0].data.recv_status_on_client.status = &code;
  ops[0].data.recv_status_on_client.status_details = &details;
  ops[0].data.recv_status_on_client.error_string = &error_string;
  ce = grpc_call_start_batch(call, ops, 1, &status_tag, NULL);
  status_started = ce == GRPC_CALL_OK;
  if (ce == GRPC_CALL_OK) {
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[0].data.recv_initial_metadata.recv_initial_metadata = &initial;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &recv_bb;
    ce = grpc_call_start_batch(call, ops, 2, &recv_tag, NULL);
    receiving = ce == GRPC_CALL_OK;
  }
  if (ce == GRPC_CALL_OK) {
    send_bb = sl__payload_chunk_byte_buffer(p, 0, chunk < total ? chunk : total);
    if (send_bb == NULL) {
      grpc_call_cancel(call, NULL);
    } else {
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
      next = 1;
      ce = grpc_call_start_batch(call, ops, nch == 1 ? 3 : 2, &send_tag, NULL);
      sending = ce == GRPC_CALL_OK;
    }
  }
  if (ce != GRPC_CALL_OK) {
    /* the status batch may be pending: cancel, then drain below */
    grpc_call_cancel(call, NULL);
    if (ce == GRPC_CALL_ERROR_INVALID_METADATA) {
      sl_err_set(&rx_err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                 "invalid request metadata (keys must be lowercase ASCII; binary values need a "
                 "key ending in -bin)");
      bad = 1;
    }
  }
  if (!status_started) {
    status = sl_err_set(err, SL_EGRPC, SL_STATUS_INTERNAL, "could not start the call");
    goto cleanup;
  }
  while (sending || receiving || !have_status) {
    grpc_event ev = grpc_completion_queue_next(cq, sl__deadline_in(SLICE_S), NULL);
    if (ev.type != GRPC_OP_COMPLETE) {
      if (!interrupted && o->interrupt != NULL && o->interrupt(o->interrupt_user)) {
        interrupted = 1;
        grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, "interrupted by the caller",
                                     NULL);
      } else if (!interrupted && !closed && atomic_load(&c->closed)) {
        closed = 1; /* a status, not an interruption: the caller gets CANCELLED */
        grpc_call_cancel_with_status(call, GRPC_STATUS_CANCELLED, CLOSED_DETAILS, NULL);
      }
      continue;
    }
    if (ev.tag == &status_tag) {
      have_status = 1;
    } else if (ev.tag == &send_tag) {
      grpc_byte_buffer_destroy(send_bb);
      send_bb = NULL;
      sending = 0;
      if (ev.success && next < nch) {
        size_t off = next * chunk, n = total - off < chunk ? total - off : chunk;
        send_bb = sl__payload_chunk_byte_buffer(p, off, n);
        if (send_bb == NULL) {
          grpc_call_cancel(call, NULL);
          continue;
        }
        memset(ops, 0, sizeof(ops));
        ops[0].op = GRPC_OP_SEND_MESSAGE;
        ops[0].data.send_message.send_message = send_bb;
        ops[1].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        next++;
        sending = grpc_call_start_batch(call, ops, next == nch ? 2 : 1, &send_tag, NULL) ==
                  GRPC_CALL_OK;
        if (!sending) grpc_call_cancel(call, NULL);
      }
    } else if (ev.tag == &recv_tag) {
      grpc_byte_buffer *got = recv_bb;
      recv_bb = NULL;
      receiving = 0;
      if (got == NULL) continue; /* the response stream ended (or the call broke) */
      st->bytes_received += grpc_byte_buffer_length(got);
      if (!bad) {
        /* the next chunk's receive first, then this one's copy */
        memset(ops, 0, sizeof(ops));
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &recv_bb;
        receiving = grpc_call_start_batch(call, ops, 1, &recv_tag, NULL) == GRPC_CALL_OK;
        {
          sl__bbspans sp;
          if (sl__bbspans_init(got, &sp, &rx_err) != SL_OK ||
              sl_stream_rx_feed_chunk(rx, sp.spans, sp.n, &rx_err) != SL_OK) {
            bad = 1;
            grpc_call_cancel(call, NULL);
          }
          sl__bbspans_clear(&sp);
        }
      }
      grpc_byte_buffer_destroy(got);
    }
  }
  st->bytes_sent += total;
  st->code = (int)code;
  st->details = sl__slice_strdup(details);
  if (st->details != NULL) sl_utf8_sanitize(st->details);
  if (error_string != NULL) st->debug = sl_strndup(error_string, strlen(error_string));
  if (sl__kv_from_metadata(&trailing, &st->trailing, &st->n_trailing) != SL_OK ||
      sl__kv_from_metadata(&initial, &st->initial, &st->n_initial) != SL_OK ||
      st->details == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  if (interrupted) {
    status = SL_EINTR;
  } else if (bad && rx_err.code == SL_STATUS_RESOURCE_EXHAUSTED) {
    /* over this client's receive limit: the status a unary reply over it gets */
    free(st->details);
    st->details = sl_strndup(rx_err.msg, strlen(rx_err.msg));
    st->code = SL_STATUS_RESOURCE_EXHAUSTED;
    status = st->details != NULL ? SL_OK
                                 : sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                                              "out of memory");
  } else if (bad && rx_err.code == SL_STATUS_INVALID_ARGUMENT && st->bytes_received == 0) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "%s", rx_err.msg);
  } else if (bad) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INTERNAL, "bad response from the server: %.400s",
                        rx_err.msg);
  } else {
    status = SL_OK;
  }
cleanup:
  if (error_string != NULL) gpr_free((void *)error_string);
  grpc_slice_unref(details);
  if (send_bb != NULL) grpc_byte_buffer_destroy(send_bb);
  if (recv_bb != NULL) grpc_byte_buffer_destroy(recv_bb);
  if (call != NULL) grpc_call_unref(call);
  md_free(md, o->n_metadata);
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

/* A call that may be streamed: where the response goes and which method. */
typedef struct sl__streaming {
  sl_stream_rx *rx;    /* NULL: unary */
  const char *method;  /* the streaming method's path */
  size_t chunk;
  int backward;
} sl__streaming;

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
                    shm_call *sc, const sl__streaming *sm, grpc_byte_buffer **resp,
                    sl_call_status *st, sl_err *err) {
  double deadline = o->timeout > 0 ? sl_now() + o->timeout : 0;
  uint64_t rng = (uint64_t)(uintptr_t)st ^ (uint64_t)(sl_now() * 1e9);
  int retry = 0, streaming = sm != NULL && sm->rx != NULL;
  for (;;) {
    int rc;
    double attempt_deadline = deadline;
    if (o->retry != NULL && o->retry->attempt_timeout > 0) {
      double own = sl_now() + o->retry->attempt_timeout;
      if (attempt_deadline == 0 || own < attempt_deadline) attempt_deadline = own;
    }
    sl_call_status_clear(st);
    st->attempts = retry + 1;
    if (streaming) {
      sl_stream_rx_clear(sm->rx); /* what an earlier attempt received */
      st->transport = SL_TRANSPORT_STREAM;
      rc = attempt_stream(c, sm->method, p, sm->chunk, attempt_deadline, o, sm->rx, st, err);
      if (rc == SL_OK && st->code == SL_STATUS_UNIMPLEMENTED) {
        /* a server without the streaming method (an older one, or another gRPC
         * stack): the unary method from now on, on this client */
        atomic_store(&c->no_stream[sm->backward], 1);
        streaming = 0;
        sm->rx->chunks = 0;
        if (sl_payload_size(p) > SL_MAX_MESSAGE_BYTES) {
          return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                            "the server does not know %s and the request (%zu bytes) is over "
                            "gRPC's message limit of %zu bytes (2 GiB - 1) for the unary method",
                            sm->method, sl_payload_size(p), SL_MAX_MESSAGE_BYTES);
        }
        continue;
      }
      if (rc == SL_OK && st->code == SL_STATUS_OK) {
        rc = sl_stream_rx_spans(sm->rx, err);
        if (rc != SL_OK) {
          char inner[SL_ERR_MSG_MAX];
          memcpy(inner, err->msg, sizeof(inner));
          return sl_err_set(err, rc, SL_STATUS_INTERNAL, "bad response from the server: %.400s",
                            inner);
        }
        if (sm->rx->chunks > 0) return SL_OK;
      }
    } else {
      rc = attempt(c, method, p, attempt_deadline, o, sc, resp, st, err);
    }
    if (rc == SL_EINTR) {
      st->code = SL_STATUS_CANCELLED;
      return rc;
    }
    if (rc != SL_OK) return rc;
    if (st->code == SL_STATUS_OK) {
      if (!streaming && *resp != NULL) return SL_OK;
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
                 shm_call *sc, const sl__streaming *sm, grpc_byte_buffer **resp,
                 sl_call_status *st, sl_err *err) {
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
  rc = attempts(c, method, p, o, sc, sm, resp, st, err);
  if (o->breaker != NULL && (rc == SL_OK || rc == SL_ESTATUS)) {
    sl_breaker_record(o->breaker, rc == SL_OK ? SL_STATUS_OK : st->code, sl_now());
  }
  return rc;
}

/* What the server said about shared memory in the trailing metadata of a call;
 * the entries are taken out of st->trailing. `attaching`: the call offered a
 * segment. Returns 1 when the segment is attached; *unknown when the server did
 * not know the call's segment; *reply_len the length of a reply in the segment
 * (-1: none). */
static int shm_answer(sl_client *c, sl_call_status *st, int attaching, int *unknown,
                      long long *reply_len, long long *reply_off) {
  int attached = 0, answered = 0;
  size_t j = 0;
  *unknown = 0;
  *reply_len = -1;
  *reply_off = 0;
  for (size_t i = 0; i < st->n_trailing; i++) {
    sl_kv *kv = &st->trailing[i];
    if (strcmp(kv->key, SL_SHM_MD_STATE) == 0) {
      answered = 1;
      if (strcmp(kv->value, "attached") == 0) {
        attached = attaching;
        if (attaching) {
          int was = SHM_UNKNOWN;
          if (atomic_compare_exchange_strong(&c->shm_state, &was, SHM_ON)) {
            set_note(c, "shared memory in use with %s", c->target);
          }
        }
      } else if (strcmp(kv->value, "unknown") == 0) {
        *unknown = 1;
      } else if (strncmp(kv->value, "refused", 7) == 0) {
        char why[SL_ERR_MSG_MAX];
        snprintf(why, sizeof(why), "shared memory with %s refused (%.400s); tensors go over TCP",
                 c->target, kv->value);
        atomic_store(&c->shm_state, SHM_OFF);
        set_note(c, "%s", why);
      }
    } else if (strcmp(kv->key, SL_SHM_MD_REPLY) == 0) {
      /* "<len> [<off>]" */
      char *end = NULL, *end2 = NULL;
      long long n = strtoll(kv->value, &end, 10), off = 0;
      if (end != kv->value && *end == ' ') off = strtoll(end + 1, &end2, 10);
      else end2 = end;
      if (end != kv->value && end2 != NULL && *end2 == '\0' && n >= 0 && off >= 0) {
        *reply_len = n;
        *reply_off = off;
      }
    } else {
      st->trailing[j++] = *kv;
      continue;
    }
    free((void *)kv->key);
    free((void *)kv->value);
  }
  st->n_trailing = j;
  if (attaching && !answered && st->code == SL_STATUS_OK) {
    /* a peer that does not know the channel ignores the offer */
    atomic_store(&c->shm_state, SHM_OFF);
    set_note(c, "%s does not offer shared memory; tensors go over TCP", c->target);
  }
  return attached;
}

static int small_call(sl_client *c, const sl_call_opts *opts, const char *method,
                      const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
                      ProtobufCMessage **out, sl_call_status *st, sl_err *err);

/* Offer a segment on a HealthCheck call (`o` carries the offer), so that the large
 * call that needs it can already go through it. 1 when the server attached it; 0
 * when it refused (the channel is then off), does not speak the channel (off too),
 * or the call failed (the large call then offers it itself). */
static int offer_on_health(sl_client *c, const sl_call_opts *o) {
  Splitlearn__Comm__HealthRequest req = SPLITLEARN__COMM__HEALTH_REQUEST__INIT;
  ProtobufCMessage *r = NULL;
  sl_call_status st;
  sl_err err;
  int unknown, attached = 0;
  long long len, off;
  memset(&st, 0, sizeof(st));
  if (small_call(c, o, SL_METHOD_PATH_HEALTH, &req.base,
                 &splitlearn__comm__health_response__descriptor, &r, &st, &err) == SL_OK) {
    attached = shm_answer(c, &st, 1, &unknown, &len, &off);
  }
  if (r != NULL) protobuf_c_message_free_unpacked(r, NULL);
  sl_call_status_clear(&st);
  return attached;
}

/* A reply in a segment over the client's receive limit: the status a message on
 * the connection would meet, in gRPC's words. */
static void status_over_limit(sl_client *c, sl_call_status *st, long long len) {
  char msg[128];
  snprintf(msg, sizeof(msg), "Received message larger than max (%lld vs. %zu)", len,
           c->max_recv);
  sl_call_status_clear(st);
  st->code = SL_STATUS_RESOURCE_EXHAUSTED;
  st->details = sl_strndup(msg, strlen(msg));
}

/* The segment capacity a request of `req` bytes asks for: room for it and, beside
 * it, a reply as big (or as the largest seen), each on its own 64-byte boundary:
 * the server's tensors may view the request while it writes the reply; when both do
 * not fit, the reply goes over the request (if nothing views it by then). */
static size_t shm_need(sl_client *c, const sl_payload *p) {
  size_t req = sl_shm_payload_room(p), reply = req, need;
  long long hint = atomic_load(&c->shm_reply_hint);
  if (hint > 0 && (unsigned long long)hint > reply &&
      (unsigned long long)hint <= SL_SHM_MAX_CAPACITY) {
    reply = (size_t)hint;
  }
  need = req + reply + 2 * SL_SHM_ALIGN;
  if (need > SL_SHM_MAX_CAPACITY) need = (req > reply ? req : reply) + SL_SHM_ALIGN;
  return need;
}

/* Whether a message of `len` bytes may go through a segment at all. */
static int shm_fits(sl_client *c, size_t len) {
  return c->shm != NULL && atomic_load(&c->shm_state) != SHM_OFF && getpid() == c->shm_pid &&
         len <= SL_SHM_MAX_CAPACITY && len <= c->max_send && len <= SL_MAX_MESSAGE_BYTES;
}

sl_shm_seg *sl__client_shm_take(sl_client *c, const sl_call_opts *o, const sl_payload *p) {
  sl_shm_seg *seg;
  sl_err serr;
  int attached = 0;
  if (!shm_fits(c, sl_payload_size(p)) || sl_payload_size(p) < SL_SHM_MIN_MESSAGE) return NULL;
  seg = sl_shm_pool_acquire(c->shm, shm_need(c, p), &attached, &serr);
  if (seg == NULL || attached) return seg;
  {
    /* a segment the server does not know yet: offered on a HealthCheck now */
    char value[200];
    sl_kv *md = malloc((o->n_metadata + 1) * sizeof(*md));
    sl_call_opts o2 = *o;
    if (md != NULL && sl_shm_seg_attach_value(seg, value, sizeof(value)) == SL_OK) {
      if (o->n_metadata > 0) memcpy(md, o->metadata, o->n_metadata * sizeof(*md));
      md[o->n_metadata].key = SL_SHM_MD_ATTACH;
      md[o->n_metadata].value = value;
      md[o->n_metadata].value_len = strlen(value);
      o2.metadata = md;
      o2.n_metadata = o->n_metadata + 1;
      attached = offer_on_health(c, &o2);
    }
    free(md);
  }
  sl_shm_pool_release(c->shm, seg, 1, attached);
  if (!attached) return NULL;
  /* again from the pool: this one, or another free one the server knows */
  seg = sl_shm_pool_acquire(c->shm, shm_need(c, p), &attached, &serr);
  if (seg != NULL && !attached) {
    sl_shm_pool_release(c->shm, seg, 1, 0);
    seg = NULL;
  }
  return seg;
}

int sl__client_shm_reply(sl_client *c, sl_shm_seg *seg, sl_call_status *st, sl_span *span,
                         int *unknown) {
  long long len, off;
  shm_answer(c, st, 0, unknown, &len, &off);
  if (st->code != SL_STATUS_OK || len < 0) return 0;
  if ((unsigned long long)len > c->max_recv) {
    status_over_limit(c, st, len);
    return -1;
  }
  if ((unsigned long long)off > sl_shm_seg_capacity(seg) ||
      (unsigned long long)len > sl_shm_seg_capacity(seg) - (unsigned long long)off ||
      !sl_shm_seg_reply_ready(seg)) {
    return 0;
  }
  span->ptr = sl_shm_seg_data(seg) + off;
  span->len = (size_t)len;
  st->bytes_received += (size_t)len;
  atomic_fetch_add(&c->shm_calls, 1);
  return 1;
}

void sl__client_shm_reply_hint(sl_client *c, size_t len) {
  if ((long long)len > atomic_load(&c->shm_reply_hint)) atomic_store(&c->shm_reply_hint, (long long)len);
}

void sl__client_shm_give(sl_client *c, sl_shm_seg *seg, int reusable, int forget) {
  sl_shm_pool_release(c->shm, seg, reusable, !forget);
  if (forget) sl_shm_pool_forget(c->shm);
}

/* A tensor call: through a shared-memory segment when the channel has one for it,
 * otherwise over TCP. The first call on a new segment goes over TCP and offers
 * the segment to the server. On SL_OK with *seg set, the reply is in the segment
 * (*span); the caller reads it, then gives the segment back (sl_shm_pool_release,
 * reusable and attached). `may_post` 0: offer, never post (a retry after the
 * server did not know the segment). `sm`: how a call over TCP streams (stream.h;
 * calls through a segment, and those that offer one, never stream); a message
 * over gRPC's 2 GiB limit always goes streamed over TCP. */
static int tensor_call(sl_client *c, const char *method, sl_payload *p, const sl_call_opts *o,
                       int may_post, const sl__streaming *sm, grpc_byte_buffer **resp,
                       sl_call_status *st, sl_err *err, sl_shm_seg **seg_out, sl_span *span) {
  sl_shm_seg *seg;
  sl_err serr;
  int attached = 0, unknown = 0, rc, reusable;
  long long reply_len = -1, reply_off = 0;
  sl_kv *md = NULL;
  sl_call_opts o2;
  shm_call sc;
  char value[200];

  *seg_out = NULL;
  span->ptr = NULL;
  span->len = 0;
  if (!shm_fits(c, sl_payload_size(p)) ||
      (sl_payload_size(p) < SL_SHM_MIN_MESSAGE && atomic_load(&c->shm_state) == SHM_ON)) {
    /* a small message once the channel is decided: as fast over gRPC (only the
     * first call, still undecided, offers a segment whatever its size) */
    return unary(c, method, p, o, NULL, sm, resp, st, err);
  }
  seg = sl_shm_pool_acquire(c->shm, shm_need(c, p), &attached, &serr);
  if (seg == NULL) return unary(c, method, p, o, NULL, sm, resp, st, err);
  md = malloc((o->n_metadata + 2) * sizeof(*md));
  if (md == NULL) {
    sl_shm_pool_release(c->shm, seg, 1, attached);
    return unary(c, method, p, o, NULL, sm, resp, st, err);
  }
  if (o->n_metadata > 0) memcpy(md, o->metadata, o->n_metadata * sizeof(*md));
  o2 = *o;
  o2.metadata = md;
  o2.n_metadata = o->n_metadata;
  if (!attached) {
    if (sl_shm_seg_attach_value(seg, value, sizeof(value)) != SL_OK) {
      /* no boot id to name this host by */
      atomic_store(&c->shm_state, SHM_OFF);
      set_note(c, "%s", "shared memory off: /proc/sys/kernel/random/boot_id unreadable");
      sl_shm_pool_release(c->shm, seg, 0, 0);
      free(md);
      return unary(c, method, p, o, NULL, sm, resp, st, err);
    }
    md[o2.n_metadata].key = SL_SHM_MD_ATTACH;
    md[o2.n_metadata].value = value;
    md[o2.n_metadata].value_len = strlen(value);
    o2.n_metadata++;
    if (may_post && atomic_load(&c->shm_state) == SHM_UNKNOWN &&
        sl_payload_size(p) >= SL_SHM_MIN_MESSAGE && offer_on_health(c, &o2)) {
      attached = 1;     /* this call goes through the segment already */
      o2.n_metadata--; /* and needs no offer */
    }
  }
  if (!attached && (!may_post || atomic_load(&c->shm_state) != SHM_ON)) {
    /* a server not yet known to speak the channel gets the request over TCP: one
     * that does not would take the empty message for the request */
    rc = unary(c, method, p, &o2, NULL, NULL, resp, st, err); /* offers go unary */
    attached = shm_answer(c, st, 1, &unknown, &reply_len, &reply_off);
    sl_shm_pool_release(c->shm, seg, 1, attached);
    free(md);
    return rc;
  }
  /* the request through the segment; a new segment is offered by the same call */
  memset(&sc, 0, sizeof(sc));
  sc.seg = seg;
  sc.md = md;
  md[o2.n_metadata].key = SL_SHM_MD_REQ;
  md[o2.n_metadata].value = sc.value;
  md[o2.n_metadata].value_len = 0;
  o2.n_metadata++;
  if (sl_payload_new(malloc(1), 0, NULL, 0, NULL, NULL, &sc.empty) != SL_OK) {
    sl_shm_pool_release(c->shm, seg, 1, attached);
    free(md);
    return unary(c, method, p, o, NULL, sm, resp, st, err);
  }
  rc = unary(c, method, p, &o2, &sc, NULL, resp, st, err);
  if (!attached) attached = shm_answer(c, st, 1, &unknown, &reply_len, &reply_off);
  else shm_answer(c, st, 0, &unknown, &reply_len, &reply_off);
  sl_payload_unref(sc.empty);
  free(md);
  if (rc == SL_OK && sc.posted && !sc.broken && reply_len >= 0 &&
      (unsigned long long)reply_len > c->max_recv) {
    status_over_limit(c, st, reply_len);
    if (*resp != NULL) grpc_byte_buffer_destroy(*resp);
    *resp = NULL;
    sl_shm_pool_release(c->shm, seg, 1, attached);
    return SL_ESTATUS;
  }
  if (rc == SL_OK && sc.posted && !sc.broken && reply_len >= 0 &&
      (unsigned long long)reply_off <= sl_shm_seg_capacity(seg) &&
      (unsigned long long)reply_len <= sl_shm_seg_capacity(seg) - (unsigned long long)reply_off &&
      sl_shm_seg_reply_ready(seg)) {
    span->ptr = sl_shm_seg_data(seg) + reply_off;
    span->len = (size_t)reply_len;
    st->bytes_received += (size_t)reply_len;
    atomic_fetch_add(&c->shm_calls, 1);
    *seg_out = seg;
    return SL_OK;
  }
  if (rc == SL_OK && *resp != NULL) {
    /* the reply did not fit: size the next segments for it */
    long long n = (long long)grpc_byte_buffer_length(*resp);
    if (n > atomic_load(&c->shm_reply_hint)) atomic_store(&c->shm_reply_hint, n);
  }
  reusable = !sc.broken && (!sc.posted || sl_shm_seg_settle(seg));
  if (unknown && rc == SL_ESTATUS && st->code == SL_STATUS_FAILED_PRECONDITION) {
    /* the server does not know the segment (it restarted, or another replica
     * answered): the call was not served; send it again, offering the segment */
    sl_shm_pool_release(c->shm, seg, reusable, 0);
    sl_shm_pool_forget(c->shm); /* a new server knows none of them */
    if (*resp != NULL) grpc_byte_buffer_destroy(*resp);
    *resp = NULL;
    return tensor_call(c, method, p, o, 0, sm, resp, st, err, seg_out, span);
  }
  if (rc == SL_OK) atomic_fetch_add(&c->shm_calls, 1);
  sl_shm_pool_release(c->shm, seg, reusable, attached);
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
  sl_shm_seg *seg = NULL;
  sl_span shm_span;
  sl_stream_rx rx;
  sl__streaming sm = {NULL, NULL, 0, 0};
  int can_stream = atomic_load(&c->stream_threshold) < SIZE_MAX && !atomic_load(&c->no_stream[backward]);
  double t0;

  sl_malloc_arena_note(); /* this thread reads the reply: see tensor.h */
  sl_stream_rx_init(&rx, c->max_recv);
  memset(out, 0, sizeof(*out));
  memset(extra_out, 0, sizeof(*extra_out));
  for (size_t i = 0; i < in->n && !can_stream; i++) {
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
  t0 = sl_now();
  status = sl_tensor_set_pack_max(req_kind, header, in,
                                  can_stream ? SL_MAX_DECODED_BYTES : SL_MAX_MESSAGE_BYTES, &p, err);
  if (status != SL_OK) return status;
  extra_out->encode_s = sl_now() - t0;
  if (can_stream && (sl_payload_size(p) >= atomic_load(&c->stream_threshold) ||
                     sl_payload_size(p) > SL_MAX_MESSAGE_BYTES)) {
    /* (a message over gRPC's limit goes streamed whatever the threshold) */
    if (sl_payload_size(p) > c->max_send) {
      /* what gRPC says of a unary message over it */
      status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                          "the request (%zu bytes) is over this client's limit of %zu bytes "
                          "(grpc.max_send_message_length)",
                          sl_payload_size(p), c->max_send);
      goto cleanup;
    }
    sm.rx = &rx;
    sm.method = backward ? SL_METHOD_PATH_BACKWARD_STREAM : SL_METHOD_PATH_COMPUTE_STREAM;
    sm.chunk = sl_stream_chunk_for(sl_payload_size(p), atomic_load(&c->stream_chunk));
    sm.backward = backward;
  } else if (sl_payload_size(p) > SL_MAX_MESSAGE_BYTES) {
    status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                        "the request (%zu bytes) is over gRPC's message limit of %zu bytes (2 GiB "
                        "- 1) and streaming is off for this server; split the tensor or use a "
                        "compressing codec",
                        sl_payload_size(p), SL_MAX_MESSAGE_BYTES);
    goto cleanup;
  }
  status = tensor_call(c, method, p, opts, 1, &sm, &resp, st, err, &seg, &shm_span);
  if (status != SL_OK) goto cleanup;
  t0 = sl_now();
  if (seg != NULL) {
    /* the reply's raw tensors view the segment (it is not reused while they live) */
    sl_span_owner lender = {NULL, seg, sl_shm_seg_lend, sl_shm_seg_unlend};
    status = sl_tensor_msg_read_owned(resp_kind, &shm_span, 1, NULL, &lender, out, err);
    sl_shm_pool_release(c->shm, seg, 1, 1);
  } else if (resp == NULL) {
    /* streamed: each tensor is already in its own storage */
    status = sl_tensor_msg_read_adopt(resp_kind, rx.spans, rx.n_spans, NULL, rx.owned, out, err);
  } else {
    status = sl__bbspans_take(&resp, &spans, err);
    if (status == SL_OK) {
      sl_span_owner owner = {sl__bbspans_release, &spans, NULL, NULL};
      status = sl_tensor_msg_read_owned(resp_kind, spans.spans, spans.n, NULL, &owner, out, err);
    }
  }
  if (status == SL_OK) status = sl_tensor_msg_decode_with(out, opts->codecs, err);
  extra_out->decode_s = sl_now() - t0;
  if (status != SL_OK) {
    char inner[SL_ERR_MSG_MAX];
    memcpy(inner, err->msg, sizeof(inner));
    sl_err_set(err, status, SL_STATUS_INTERNAL, "%s: %.400s",
               status == SL_ECODEC ? "the response" : "bad response from the server", inner);
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
  sl_stream_rx_clear(&rx);
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
  status = unary(c, method, p, opts, NULL, NULL, &resp, st, err);
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
