/* server.c: see server.h.
 *
 * Threads: sl_server_start() spawns max_workers workers and one finisher. The
 * workers share one completion queue registered with the server, on which each
 * idle worker keeps one request for a call pending (grpc_server_request_call);
 * whichever worker's wait returns a new call serves it. On an idle server that is
 * the thread polling for gRPC, which found the call itself, so no other thread is
 * woken to take it. The call is bound to a completion queue of its own, so that
 * only one thread polls it at a time: the worker while it serves the call, then,
 * when the compute hook deferred the call (sl_pending: an asynchronous compute
 * function), the finisher, which sends its response once sl_pending_complete()
 * has given the result. Meanwhile the worker serves other calls. Stopping:
 * grpc_server_shutdown_and_notify makes every pending request fail (ok=0), and a
 * worker whose wait returns a failed request ends; a worker about to ask for its
 * next call after that ends instead (requests_closed: a request made while gRPC
 * shuts down could be missed by the shutdown and never complete). In-flight
 * calls finish or are cancelled after the grace period, and deferred calls still
 * without a result are then answered UNAVAILABLE. While a worker moves a stream
 * (a streamed request in, its reply out), the idle workers wait outside gRPC and
 * that worker hands them the calls that arrive (see "Moving a stream alone").
 *
 * grpc.health.v1.Health/Watch streams live for as long as a client watches, so
 * they do not take workers: the method is registered on its own, and one watch
 * thread serves every stream from its own completion queue (see "Health/Watch"
 * below).
 */
#include "server.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "health.pb-c.h"
#include "transport.h"

#include "methods.h"
#include "shm.h"
#include "stream.h"

#define METHOD_COMPUTE SL_METHOD_PATH_COMPUTE
#define METHOD_BACKWARD SL_METHOD_PATH_BACKWARD
#define METHOD_HEALTH SL_METHOD_PATH_HEALTH
#define METHOD_INFO SL_METHOD_PATH_INFO
#define METHOD_STD_HEALTH SL_METHOD_PATH_STD_HEALTH
#define METHOD_STD_WATCH SL_METHOD_PATH_STD_WATCH
#define METHOD_COMPUTE_STREAM SL_METHOD_PATH_COMPUTE_STREAM
#define METHOD_BACKWARD_STREAM SL_METHOD_PATH_BACKWARD_STREAM
#define SERVICE_NAME SL_SERVICE_NAME
/* the health "service" that reports only that the process is up and serving
 * gRPC (SERVING until the server is shut down), whatever set_health and draining
 * say: for liveness probes, which must not restart a draining replica */
#define SERVICE_LIVENESS "liveness"
/* how often the watch thread looks for a changed status (it cannot be woken) */
#define WATCH_POLL_S 0.05
#define IDLE_RELEASE_S 1.0 /* quiet after calls before memory is given back */
/* Stopping: after the drain, wait (within the grace, at most SETTLE_MAX_S) until no
 * call has come for SETTLE_QUIET_S. Shutting gRPC down kills the calls still queued
 * for a worker, and their clients see CANCELLED, which no retry policy retries;
 * clients that watch the health status stop sending within a round trip of
 * hearing NOT_SERVING, so the queue is empty by then. */
#define SETTLE_QUIET_S 0.1
#define SETTLE_MAX_S 1.0

enum { ST_CREATED, ST_RUNNING, ST_STOPPING, ST_STOPPED };

typedef struct worker {
  sl_server *srv;
  pthread_t thread;
  int started;
} worker;

struct sl_server {
  char *host;
  int port_req;
  int port;
  int max_workers;
  char *version;
  grpc_channel_args chargs;
  sl_codec *codec;       /* a reference, or NULL */
  sl_codecs *codecs;     /* a reference: the custom codecs requests may use, or NULL */
  sl_server_hooks hooks;
  void *user;

  grpc_server *server;
  grpc_completion_queue *shutdown_cq;
  grpc_completion_queue *req_cq; /* the workers' requests for calls (worker_main) */
  worker *workers;
  int grpc_inited;
  /* Requests for calls (the workers', the Watch thread's) and gRPC's shutdown are
   * ordered by req_mu: a request is made only while requests_closed is 0, and
   * shutdown_server sets it before grpc_server_shutdown_and_notify. gRPC fails
   * the requests pending when its shutdown starts, but a request that races with
   * the shutdown can be queued after that and never complete: its thread would
   * wait forever (and stop() join it forever). */
  pthread_mutex_t req_mu;
  int requests_closed;
  /* Streams are moved with the idle workers out of gRPC (see "Moving a stream
   * alone" below): the workers waiting in gRPC for a call, the calls moving a
   * stream now, and the workers parked meanwhile (park_mu). */
  atomic_int listening;
  atomic_int alone;
  pthread_mutex_t park_mu;
  pthread_cond_t park_cv;
  struct served *handed; /* calls the receiver took from req_cq for parked workers */
  atomic_int n_handed;   /* how many */
  atomic_int park_stop;  /* the server is shutting down: nobody parks */
  grpc_channel *wake_channel; /* lame: a call on it fails at once, an event on req_cq */

  pthread_mutex_t mu;
  pthread_cond_t cv;
  int state;
  atomic_int serving;
  atomic_int health;        /* sl_server_set_health: 1 SERVING (default), 0 NOT_SERVING */
  atomic_int in_flight;
  atomic_llong total_requests;
  char **tokens;
  size_t *token_lens;
  size_t n_tokens;
  grpc_server_credentials *creds;
  sl_metrics *metrics;
  size_t max_decoded;
  size_t max_stream;     /* bytes of one streamed request: max_decoded, or less when
                            grpc.max_receive_message_length says so */
  atomic_llong decoded_in_use;
  sl_msg_limits limits;
  double started_at;
  /* deferred calls (sl_pending): all of them in `deferred`, those ready to be
   * answered in the finisher's queue; guarded by `mu` */
  struct served *deferred;
  atomic_int in_hook;    /* calls inside the compute hook right now */
  struct served *ready_head, *ready_tail;
  pthread_t finisher;
  int finisher_started;
  int finisher_stop;

  /* Health/Watch: the registered method, the watch thread and its queue */
  void *watch_method;
  grpc_completion_queue *watch_cq;
  pthread_t watch_thread;
  int watch_started;
  atomic_int watch_ending; /* end every stream: the server is shutting down */
  atomic_int watchers;     /* open Watch streams */
  atomic_llong last_call_us; /* sl_now() in microseconds when a worker last took a call */
  sl_shm_table *shm;         /* clients' shared-memory segments; NULL: refused (shm.h) */
  size_t max_recv, max_send; /* the channel's message limits, which bind shm messages too */
  atomic_llong last_done_us; /* sl_now() in microseconds when a call last ended */
  atomic_int used_memory;    /* calls ended since memory was last given back */
};

typedef struct served served;

/* ---- helpers -------------------------------------------------------------- */

static void destroy_queue(grpc_completion_queue *cq) {
  if (cq == NULL) return;
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
}

/* Wait for `tag` on a queue only this thread polls. Returns the event's success. */
static int wait_tag(grpc_completion_queue *cq, void *tag) {
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_OP_COMPLETE && ev.tag == tag) return ev.success;
    if (ev.type == GRPC_QUEUE_SHUTDOWN) return 0;
  }
}

/* A call's close watch: RECV_CLOSE_ON_SERVER started as soon as the request is
 * in, so that a cancelled call is noticed while it is being computed. */
typedef struct call_state {
  grpc_completion_queue *cq;     /* the call's own queue */
  pthread_mutex_t poll_mu;       /* one poller at a time (a deferred call's is_active
                                    runs on the completer's thread) */
  int finishing;                 /* the finisher owns the queue now: is_active says 0 */
  int started;   /* the RECV_CLOSE_ON_SERVER batch is pending or done */
  int closed;    /* it completed: the call is over (cancelled, during compute) */
  int cancelled; /* set by gRPC */
  double deadline;
  /* set while the call's thread holds the idle workers out of gRPC: its waits look
   * at the request queue (see "Moving a stream alone") */
  struct sl_server *looker;
  grpc_metadata *trailing; /* malloc'd; keys and values are owned slices */
  size_t n_trailing, cap_trailing;
} call_state;

/* Take one event (waiting at most until `until`); note the close. Returns the
 * event's tag, or NULL when none came. */
static void *next_event(call_state *cs, gpr_timespec until, int *success) {
  grpc_event ev = grpc_completion_queue_next(cs->cq, until, NULL);
  if (ev.type != GRPC_OP_COMPLETE) return NULL;
  if (ev.tag == (void *)cs) cs->closed = 1;
  *success = ev.success;
  return ev.tag;
}

static void look_at_requests(sl_server *s);
static void alone_set(served *sv, int on);
#define STREAM_LOOK_S 0.001 /* see "Moving a stream alone" */

/* Wait for `tag` while also noting the close event (and, with a looker, looking at
 * the request queue after every event and every STREAM_LOOK_S). */
static int wait_call_tag(call_state *cs, void *tag) {
  for (;;) {
    int success = 0;
    void *t = next_event(cs, cs->looker != NULL ? sl__deadline_in(STREAM_LOOK_S)
                                                : gpr_inf_future(GPR_CLOCK_REALTIME),
                         &success);
    if (cs->looker != NULL) look_at_requests(cs->looker);
    if (t == tag) return success;
  }
}

int sl_call_add_trailing(void *state, const char *key, const char *value, size_t value_len) {
  call_state *cs = state;
  if (cs->n_trailing == cs->cap_trailing) {
    size_t cap = cs->cap_trailing ? 2 * cs->cap_trailing : 4;
    grpc_metadata *bigger = realloc(cs->trailing, cap * sizeof(*bigger));
    if (bigger == NULL) return SL_ENOMEM;
    cs->trailing = bigger;
    cs->cap_trailing = cap;
  }
  memset(&cs->trailing[cs->n_trailing], 0, sizeof(grpc_metadata));
  cs->trailing[cs->n_trailing].key = grpc_slice_from_copied_string(key);
  cs->trailing[cs->n_trailing].value = grpc_slice_from_copied_buffer(value, value_len);
  cs->n_trailing++;
  return SL_OK;
}

int sl_call_is_active(void *state) {
  call_state *cs = state;
  int success, closed;
  if (cs == NULL) return 0;
  pthread_mutex_lock(&cs->poll_mu);
  if (cs->finishing) {
    pthread_mutex_unlock(&cs->poll_mu);
    return 0;
  }
  if (cs->started && !cs->closed) next_event(cs, gpr_time_0(GPR_CLOCK_REALTIME), &success);
  closed = cs->closed;
  pthread_mutex_unlock(&cs->poll_mu);
  if (closed) return 0;
  return cs->deadline <= 0 || sl_now() < cs->deadline;
}

static int streq_slice(grpc_slice s, const char *lit) {
  size_t n = strlen(lit);
  return GRPC_SLICE_LENGTH(s) == n && memcmp(GRPC_SLICE_START_PTR(s), lit, n) == 0;
}

void sl_service_info_clear(sl_service_info *info) {
  free(info->service_name);
  free(info->device);
  sl__kv_free(info->custom, info->n_custom);
  memset(info, 0, sizeof(*info));
}

/* An outgoing reply: either a payload (message) or none, plus a status, and the
 * record of the call for the metrics. */
typedef struct reply {
  sl_payload *payload; /* NULL: no message */
  sl_err err;          /* code and message of the status */
  sl_call_record rec;
} reply;

static void record_desc(const sl_tensor_desc *d, sl_dtype *dtype, int *ndim, int64_t *shape) {
  *dtype = d->dtype;
  *ndim = d->ndim;
  for (int i = 0; i < d->ndim && i < SL_RECORD_NDIM; i++) shape[i] = d->shape[i];
}

/* Pack a small (tensor-less) message into a payload. */
static int small_payload(const ProtobufCMessage *msg, sl_payload **out, sl_err *err) {
  size_t len = protobuf_c_message_get_packed_size(msg);
  uint8_t *buf = malloc(len ? len : 1);
  int rc;
  if (buf == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  protobuf_c_message_pack(msg, buf);
  rc = sl_payload_new(buf, len, NULL, 0, NULL, NULL, out); /* takes buf, failing or not */
  if (rc != SL_OK) return sl_err_set(err, rc, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  return SL_OK;
}

/* ---- the methods ------------------------------------------------------------ */

/* The grpc.health.v1 status: SERVING while running, not draining, and not set to
 * NOT_SERVING by sl_server_set_health. */
static int health_status(const sl_server *s) {
  return atomic_load(&s->serving) && atomic_load(&s->health)
             ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
             : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

enum { SVC_UNKNOWN, SVC_READY, SVC_LIVENESS };

static int service_kind(const char *name) {
  if (name[0] == '\0' || strcmp(name, SERVICE_NAME) == 0) return SVC_READY;
  if (strcmp(name, SERVICE_LIVENESS) == 0) return SVC_LIVENESS;
  return SVC_UNKNOWN;
}

/* The status of one health service (see service_kind). */
static int service_status(const sl_server *s, int kind) {
  if (kind == SVC_UNKNOWN)
    return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
  if (kind == SVC_LIVENESS)
    return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
  return health_status(s);
}

static void serve_health(sl_server *s, reply *r) {
  Splitlearn__Comm__HealthResponse resp = SPLITLEARN__COMM__HEALTH_RESPONSE__INIT;
  int serving = atomic_load(&s->serving);
  int healthy = serving && atomic_load(&s->health);
  resp.status = healthy ? "ok" : "unhealthy";
  resp.message = healthy ? "serving" : serving ? "not serving (set to NOT_SERVING)" : "stopping";
  resp.version = s->version;
  resp._uptime_seconds_case = SPLITLEARN__COMM__HEALTH_RESPONSE___UPTIME_SECONDS_UPTIME_SECONDS;
  resp.uptime_seconds = (float)(sl_now() - s->started_at);
  small_payload(&resp.base, &r->payload, &r->err);
}

static void serve_std_health(sl_server *s, const sl__bbspans *in, reply *r) {
  Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  Grpc__Health__V1__HealthCheckRequest *req = NULL;
  uint8_t *buf = NULL;
  size_t len = 0;
  for (size_t i = 0; i < in->n; i++) len += in->spans[i].len;
  buf = malloc(len ? len : 1);
  if (buf == NULL) {
    sl_err_set(&r->err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  len = 0;
  for (size_t i = 0; i < in->n; i++) {
    memcpy(buf + len, in->spans[i].ptr, in->spans[i].len);
    len += in->spans[i].len;
  }
  req = grpc__health__v1__health_check_request__unpack(NULL, len, buf);
  free(buf);
  if (req == NULL) {
    sl_err_set(&r->err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "malformed HealthCheckRequest");
    return;
  }
  if (service_kind(req->service) == SVC_UNKNOWN) {
    sl_err_set(&r->err, SL_ENOTFOUND, SL_STATUS_NOT_FOUND,
               "unknown service '%.128s' (this server answers '', '" SERVICE_NAME
               "' and '" SERVICE_LIVENESS "')",
               req->service);
  } else {
    resp.status = service_status(s, service_kind(req->service));
    small_payload(&resp.base, &r->payload, &r->err);
  }
  grpc__health__v1__health_check_request__free_unpacked(req, NULL);
}

static void serve_info(sl_server *s, reply *r) {
  Splitlearn__Comm__ServiceInfoResponse resp = SPLITLEARN__COMM__SERVICE_INFO_RESPONSE__INIT;
  Splitlearn__Comm__ServiceInfoResponse__CustomInfoEntry *entries = NULL;
  Splitlearn__Comm__ServiceInfoResponse__CustomInfoEntry **ptrs = NULL;
  sl_service_info info = {0};
  int rc = SL_OK;

  if (s->hooks.service_info != NULL) rc = s->hooks.service_info(s->user, &info, &r->err);
  if (rc != SL_OK) goto cleanup;
  resp.service_name = info.service_name ? info.service_name : "splitlearn-comm";
  resp.device = info.device ? info.device : "cpu";
  resp.version = s->version;
  resp._uptime_seconds_case = SPLITLEARN__COMM__SERVICE_INFO_RESPONSE___UPTIME_SECONDS_UPTIME_SECONDS;
  resp.uptime_seconds = (float)(sl_now() - s->started_at);
  resp.total_requests = atomic_load(&s->total_requests);
  if (info.n_custom > 0) {
    entries = calloc(info.n_custom, sizeof(*entries));
    ptrs = calloc(info.n_custom, sizeof(*ptrs));
    if (entries == NULL || ptrs == NULL) {
      sl_err_set(&r->err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
      goto cleanup;
    }
    for (size_t i = 0; i < info.n_custom; i++) {
      splitlearn__comm__service_info_response__custom_info_entry__init(&entries[i]);
      entries[i].key = (char *)info.custom[i].key;
      entries[i].value = (char *)info.custom[i].value;
      ptrs[i] = &entries[i];
    }
    resp.n_custom_info = info.n_custom;
    resp.custom_info = ptrs;
  }
  small_payload(&resp.base, &r->payload, &r->err);
cleanup:
  free(ptrs);
  free(entries);
  sl_service_info_clear(&info);
}

/* Prefix `err`'s message with the name of the tensor it is about (named forms). */
static int name_error(const sl_tensor_msg *msg, size_t i, int rc, sl_err *err) {
  char inner[SL_ERR_MSG_MAX];
  if (msg->form == SL_FORM_SINGLE) return rc;
  memcpy(inner, err->msg, sizeof(inner));
  sl_err_set(err, rc, err->code, "tensor '%.64s': %.400s", msg->items[i].name, inner);
  return rc;
}

/* Decode every tensor of the request with its codec (built in, or one of the
 * server's custom codecs, whose trampolines may run user code). What the
 * payloads of one call decode to is bounded, per call and for all calls at once:
 * a few bytes of sparse or compressed payload may declare any shape. */
static int decode_request(sl_server *s, sl_tensor_msg *msg, size_t *reserved, sl_err *err) {
  size_t need = 0;
  for (size_t i = 0; i < msg->n_items; i++) {
    sl_tensor_item *it = &msg->items[i];
    size_t n = 0;
    int rc;
    if (it->decoded) continue;
    rc = sl_codecs_bound(s->codecs, it->codec, &it->desc, &it->meta, &n, err);
    if (rc != SL_OK) {
      if (rc == SL_ECODEC && sl_codecs_find(s->codecs, it->codec) == NULL &&
          !sl_codec_name_is_builtin(it->codec)) {
        sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                   "unknown codec '%.64s' in the request; this server knows: %s", it->codec,
                   sl_codecs_names(s->codecs));
        rc = SL_EINVAL;
      }
      return name_error(msg, i, rc, err);
    }
    if (n > s->max_decoded - need) {
      return sl_err_set(err, SL_ETOOBIG, SL_STATUS_INVALID_ARGUMENT,
                        "codec '%.64s': the request's tensors would decode to more than this "
                        "server's limit of %zu bytes per call (max_decoded_bytes)",
                        it->codec, s->max_decoded);
    }
    need += n;
  }
  if (need > 0) {
    long long before = atomic_fetch_add(&s->decoded_in_use, (long long)need);
    if ((size_t)before + need > s->max_decoded) {
      atomic_fetch_sub(&s->decoded_in_use, (long long)need);
      return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                        "the server is decoding too much at once (%zu-byte limit for all "
                        "calls); try again",
                        s->max_decoded);
    }
    *reserved = need;
  }
  for (size_t i = 0; i < msg->n_items; i++) {
    int rc = sl_tensor_item_decode_with(&msg->items[i], s->codecs, err); /* checks bools too */
    if (rc != SL_OK) return name_error(msg, i, rc, err);
  }
  return SL_OK;
}

/* The codec the request came in: the one non-raw codec its tensors used (NULL
 * when none, or when they used several). Every item is decoded by now, so its
 * `codec` still names what it arrived in. */
static const sl_tensor_item *request_codec(const sl_tensor_msg *req) {
  const sl_tensor_item *found = NULL;
  for (size_t i = 0; i < req->n_items; i++) {
    const sl_tensor_item *it = &req->items[i];
    if (strcmp(it->codec, SL_CODEC_RAW) == 0) continue;
    if (found != NULL && strcmp(found->codec, it->codec) != 0) return NULL;
    if (found == NULL) found = it;
  }
  return found;
}

/* The codec a result tensor goes back with when the hook left the choice to us
 * (the one place that chooses): the server's, else the request's (a built-in
 * rebuilt from its metadata, or the server's custom codec of that name) when it
 * takes the tensor's dtype, else raw. *made is a reference taken here (the
 * caller drops it with sl_codec_destroy). */
static const sl_codec *response_codec(sl_server *s, const sl_tensor_msg *req, sl_dtype dtype,
                                      sl_codec **made) {
  const sl_codec *c = s->codec;
  if (c == NULL) {
    if (*made == NULL) {
      const sl_tensor_item *rc = request_codec(req);
      if (rc != NULL && sl_codec_name_is_builtin(rc->codec)) {
        sl_codec_create_from_wire(rc->codec, &rc->meta, made, NULL);
      } else if (rc != NULL) {
        *made = sl_codec_ref(sl_codecs_find(s->codecs, rc->codec));
      }
    }
    c = *made;
  }
  if (c != NULL && !sl_codec_accepts(c, dtype)) c = NULL; /* e.g. an int64 result of a float16 call */
  return c;
}

/* A Compute or ComputeBackward call from its request to its response payload;
 * kept on the heap with its call when the hook defers it. */
typedef struct tcall {
  int backward;
  int stream;          /* the reply goes as a stream: no 2 GiB bound */
  int active;          /* counted in in_flight */
  sl_tensor_msg msg;
  sl_compute_args args;
  sl_kv *reqmd;
  size_t reserved;
  double t1;           /* the hook started */
} tcall;

static void tcall_cleanup(sl_server *s, tcall *tc) {
  free(tc->reqmd);
  tc->reqmd = NULL;
  sl_tensor_msg_clear(&tc->msg);
  if (tc->reserved > 0) atomic_fetch_sub(&s->decoded_in_use, (long long)tc->reserved);
  tc->reserved = 0;
  if (tc->active) {
    atomic_store(&s->last_done_us, (long long)(sl_now() * 1e6));
    atomic_store(&s->used_memory, 1);
  }
  if (tc->active && atomic_fetch_sub(&s->in_flight, 1) == 1 && !atomic_load(&s->serving)) {
    pthread_mutex_lock(&s->mu);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
  }
  tc->active = 0;
}

/* The largest reply message: gRPC's 2 GiB - 1, or for a streamed reply what
 * one tensor may decode to (16 GiB). */
static size_t reply_max(const tcall *tc) {
  return tc->stream ? SL_MAX_DECODED_BYTES : SL_MAX_MESSAGE_BYTES;
}

/* After the hook: its status `rc` (result in tc->args.out on SL_OK) becomes the
 * reply's payload or error. */
static void tcall_end(sl_server *s, tcall *tc, int rc, reply *r) {
  Splitlearn__Comm__ComputeResponse resp = SPLITLEARN__COMM__COMPUTE_RESPONSE__INIT;
  Splitlearn__Comm__BackwardResponse bresp = SPLITLEARN__COMM__BACKWARD_RESPONSE__INIT;
  sl_compute_args *args = &tc->args;
  sl_codec *made = NULL;
  int have_out = 0;
  double t2 = sl_now();
  r->rec.stage[SL_STAGE_QUEUE] = args->queue_seconds;
  r->rec.stage[SL_STAGE_COMPUTE] = t2 - tc->t1 - args->queue_seconds;
  if (rc != SL_OK) {
    if (r->err.code == SL_STATUS_OK) {
      sl_err_set(&r->err, rc, SL_STATUS_INTERNAL, "compute failed: %s", sl_strerror(rc));
    }
    goto cleanup;
  }
  have_out = 1;
  if (args->out.n > 0) {
    record_desc(&args->out.items[0].desc, &r->rec.out_dtype, &r->rec.out_ndim, r->rec.out_shape);
  }
  for (size_t i = 0; i < args->out.n; i++) {
    sl_tensor_out *o = &args->out.items[i];
    if (o->encoded || o->codec != NULL) continue;
    if (args->out.form == SL_FORM_SINGLE && i > 0) continue; /* KV entries go raw */
    o->codec = response_codec(s, &tc->msg, o->desc.dtype, &made);
    o->raw_if_unencodable = 1;
  }
  have_out = 0; /* sl_tensor_set_pack releases the results on every path */
  if (tc->backward) {
    bresp.forward_id = (char *)(args->fields.forward_id ? args->fields.forward_id : "");
    bresp._backward_time_ms_case =
        SPLITLEARN__COMM__BACKWARD_RESPONSE___BACKWARD_TIME_MS_BACKWARD_TIME_MS;
    bresp.backward_time_ms = args->compute_time_ms;
    sl_tensor_set_pack_max(SL_MSG_BACKWARD_RESPONSE, &bresp.base, &args->out, reply_max(tc),
                           &r->payload, &r->err);
  } else {
    resp._compute_time_ms_case =
        SPLITLEARN__COMM__COMPUTE_RESPONSE___COMPUTE_TIME_MS_COMPUTE_TIME_MS;
    resp.compute_time_ms = args->compute_time_ms;
    if (args->has_request_id) {
      resp._request_id_case = SPLITLEARN__COMM__COMPUTE_RESPONSE___REQUEST_ID_REQUEST_ID;
      resp.request_id = args->request_id;
    }
    if (args->fields.forward_id != NULL) {
      resp._forward_id_case = SPLITLEARN__COMM__COMPUTE_RESPONSE___FORWARD_ID_FORWARD_ID;
      resp.forward_id = (char *)args->fields.forward_id;
    }
    sl_tensor_set_pack_max(SL_MSG_COMPUTE_RESPONSE, &resp.base, &args->out, reply_max(tc),
                           &r->payload, &r->err);
  }
  r->rec.stage[SL_STAGE_ENCODE] = sl_now() - t2;
cleanup:
  if (have_out) sl_tensor_set_release(&args->out);
  memset(&args->out, 0, sizeof(args->out));
  if (args->out_free != NULL) args->out_free(args->out_owner);
  args->out_free = NULL;
  args->out_owner = NULL;
  sl_codec_destroy(made);
  tcall_cleanup(s, tc);
}

/* Compute or ComputeBackward: read the tensor, decode it, run the hook. Returns
 * SL_EAGAIN when the hook deferred the call through `pending` (the reply comes
 * with sl_pending_complete); otherwise the reply is in `r` and tc is clean. */
static int tcall_begin(sl_server *s, const sl_call_info *ci, sl__bbspans *in, sl_stream_rx *rx,
                       sl_shm_use *shm, int backward, reply *r, tcall *tc, sl_pending *pending) {
  sl_msg_kind req_kind = backward ? SL_MSG_BACKWARD_REQUEST : SL_MSG_COMPUTE_REQUEST;
  sl_compute_args *args = &tc->args;
  double t0;
  int rc;

  memset(tc, 0, sizeof(*tc));
  tc->backward = backward;
  tc->stream = rx != NULL;
  tc->active = 1;
  atomic_fetch_add(&s->in_flight, 1);
  if (!atomic_load(&s->serving)) {
    sl_err_set(&r->err, SL_ESTATE, SL_STATUS_UNAVAILABLE, "the server is stopping");
    goto fail;
  }
  atomic_fetch_add(&s->total_requests, 1);
  t0 = sl_now();
  r->rec.tensor_call = 1;
  if (shm != NULL) r->rec.transport = SL_TRANSPORT_SHM;
  if (rx != NULL) {
    /* streamed: each tensor's bytes are in their storage already; the reader takes it */
    rc = sl_tensor_msg_read_adopt(req_kind, rx->spans, rx->n_spans, &s->limits, rx->owned,
                                  &tc->msg, &r->err);
  } else {
    /* the received message's slices go as their bytes are copied out; a request in
     * a shared-memory segment stays where it is, and lends its raw tensors */
    sl_span_owner owner = {sl__bbspans_release, in, NULL, NULL};
    sl_span_owner lender = {NULL, shm, sl_shm_use_lend, sl_shm_use_unlend};
    rc = sl_tensor_msg_read_owned(req_kind, in->spans, in->n, &s->limits,
                                  shm != NULL ? &lender : in->slices != NULL ? &owner : NULL,
                                  &tc->msg, &r->err);
  }
  if (rc != SL_OK) goto fail;
  if (tc->msg.n_items > 0) {
    sl_strlcpy(r->rec.codec, tc->msg.items[0].codec, sizeof(r->rec.codec));
    record_desc(&tc->msg.items[0].desc, &r->rec.in_dtype, &r->rec.in_ndim, r->rec.in_shape);
  }
  if (decode_request(s, &tc->msg, &tc->reserved, &r->err) != SL_OK) goto fail;
  sl_call_fields_from_request(req_kind, tc->msg.header, &args->fields);
  if (args->fields.forward_id != NULL) {
    sl_strlcpy(r->rec.forward_id, args->fields.forward_id, sizeof(r->rec.forward_id));
  }
  if (!backward) {
    Splitlearn__Comm__ComputeRequest *req = (Splitlearn__Comm__ComputeRequest *)tc->msg.header;
    if (req->n_metadata > 0) {
      tc->reqmd = calloc(req->n_metadata, sizeof(*tc->reqmd));
      if (tc->reqmd == NULL) {
        sl_err_set(&r->err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        goto fail;
      }
      for (size_t i = 0; i < req->n_metadata; i++) {
        tc->reqmd[i].key = req->metadata[i]->key;
        tc->reqmd[i].value = req->metadata[i]->value;
        tc->reqmd[i].value_len = strlen(req->metadata[i]->value);
      }
      args->n_req_metadata = req->n_metadata;
    }
  }
  args->backward = backward;
  args->tensor = &tc->msg;
  args->req_metadata = tc->reqmd;
  args->has_request_id = args->fields.has_request_id;
  args->request_id = args->fields.request_id;
  args->pending = pending;
  if (s->hooks.compute == NULL) {
    sl_err_set(&r->err, SL_ESTATE, SL_STATUS_UNIMPLEMENTED, "no compute function");
    goto fail;
  }
  r->rec.has_request_id = args->has_request_id;
  r->rec.request_id = args->request_id;
  tc->t1 = sl_now();
  r->rec.stage[SL_STAGE_DECODE] = tc->t1 - t0;
  atomic_fetch_add(&s->in_hook, 1);
  rc = s->hooks.compute(s->user, ci, args, &r->err);
  atomic_fetch_sub(&s->in_hook, 1);
  if (rc == SL_EAGAIN && pending != NULL) return SL_EAGAIN;
  if (rc == SL_EAGAIN) {
    sl_err_set(&r->err, SL_ESTATE, SL_STATUS_INTERNAL, "the compute hook deferred a call it may not");
  }
  tcall_end(s, tc, rc, r);
  return SL_OK;
fail:
  tcall_cleanup(s, tc);
  return SL_OK;
}

static int method_of(grpc_slice m) {
  if (streq_slice(m, METHOD_COMPUTE) || streq_slice(m, METHOD_COMPUTE_STREAM)) {
    return SL_METHOD_COMPUTE;
  }
  if (streq_slice(m, METHOD_BACKWARD) || streq_slice(m, METHOD_BACKWARD_STREAM)) {
    return SL_METHOD_BACKWARD;
  }
  if (streq_slice(m, METHOD_HEALTH)) return SL_METHOD_HEALTH;
  if (streq_slice(m, METHOD_INFO)) return SL_METHOD_INFO;
  if (streq_slice(m, METHOD_STD_HEALTH)) return SL_METHOD_STD_HEALTH;
  return SL_METHOD_OTHER;
}

/* Constant-time comparison of the "authorization" metadata with every token:
 * the time taken does not depend on where a guess first differs. A call with
 * more than one authorization header is refused whatever they hold (-1): with
 * "last one wins", "wrong, right" would be let in by us and read as "wrong" by a
 * proxy or interceptor that takes the first. */
static int authorized(const sl_server *s, const sl_kv *kv, size_t nkv) {
  const char *value = NULL;
  size_t vlen = 0, count = 0;
  int ok = 0;
  for (size_t i = 0; i < nkv; i++) {
    if (strcmp(kv[i].key, "authorization") == 0) {
      value = kv[i].value;
      vlen = kv[i].value_len;
      count++;
    }
  }
  if (count > 1) return -1;
  if (value == NULL) return 0;
  for (size_t t = 0; t < s->n_tokens; t++) {
    const unsigned char *a = (const unsigned char *)s->tokens[t];
    const unsigned char *b = (const unsigned char *)value;
    size_t n = s->token_lens[t];
    unsigned diff = (unsigned)(n ^ vlen);
    for (size_t i = 0; i < n; i++) diff |= (unsigned)(a[i] ^ b[i < vlen ? i : 0]);
    ok |= diff == 0;
  }
  return ok;
}

/* ---- one call, start to end ------------------------------------------------ */

/* Everything one call holds from its request to its status. A worker serves it on
 * its stack's behalf; a deferred call (sl_pending) lives on until the finisher
 * thread has answered it. Each call is bound to its own completion queue, so a
 * deferred call can be answered by another thread while the worker serves others. */
struct served {
  sl_server *srv;
  grpc_call *call;
  grpc_completion_queue *cq;
  call_state cs;
  reply r;
  grpc_byte_buffer *in_bb;
  sl_kv *kv;
  size_t nkv;
  char *method;
  char *peer;
  double t_start;
  int counted;       /* in the metrics */
  int responding;    /* got as far as sending a status */
  int no_message;    /* the request had no message (malformed, or the client left) */
  int stream;        /* ComputeStream / ComputeBackwardStream: chunks both ways */
  tcall tc;
  sl_shm_use *shm;   /* the request came through this shared-memory segment */
  grpc_call_details details; /* filled by gRPC when the call arrives */
  grpc_metadata_array md;
  /* deferral, guarded by srv->mu */
  int deferred;      /* the hook returned SL_EAGAIN */
  int handed_off;    /* the worker has let go */
  int completed;     /* sl_pending_complete ran (or the server abandoned the call) */
  int abandoned;     /* the server answered it without waiting for the completer */
  int refs;          /* the server's and the completer's, once deferred */
  int rc;            /* the completer's status */
  struct served *next_deferred, *prev_deferred, *next_ready;
  /* a wake event (a failed call on the lame channel), not a call for a worker */
  int wake;
  grpc_status_code wake_code;
  grpc_slice wake_details;
  /* a call handed to a parked worker (park_mu): the request's success */
  int handed_success;
  struct served *next_handed;
};

static void served_init(served *sv, sl_server *s, grpc_completion_queue *cq) {
  memset(sv, 0, sizeof(*sv));
  sv->srv = s;
  sv->cq = cq;
  sv->cs.cq = cq;
  pthread_mutex_init(&sv->cs.poll_mu, NULL);
  grpc_call_details_init(&sv->details);
  grpc_metadata_array_init(&sv->md);
}

/* Send the reply in sv->r (or the error), wait for the call to end, record it, and
 * free what the call held (not sv itself, its call or its queue). */
static void respond_and_finish(served *sv) {
  sl_server *s = sv->srv;
  call_state *cs = &sv->cs;
  grpc_byte_buffer *out_bb = NULL;
  grpc_slice details_slice;
  const char *details_str;
  grpc_op ops[3];
  size_t nops = 0;
  int tag2;
  double t_send = 0;
  size_t reply_off = 0, reply_len = 0;

  if (!sv->responding) goto cleanup;
  if (sv->r.err.status != SL_OK && sv->r.err.code == SL_STATUS_OK) sv->r.err.code = SL_STATUS_INTERNAL;
  if (sv->r.err.status != SL_OK && sv->r.payload != NULL) {
    sl_payload_unref(sv->r.payload);
    sv->r.payload = NULL;
  }
  memset(ops, 0, sizeof(ops));
  if (sv->r.payload != NULL && sv->shm != NULL && sv->r.err.status == SL_OK &&
      sl_payload_size(sv->r.payload) <= s->max_send &&
      sl_shm_use_reply(sv->shm, sv->r.payload, &reply_off, &reply_len) == SL_OK) {
    /* the reply is in the client's segment: an empty message, its length and
     * offset in the trailing metadata (a reply that does not fit goes over gRPC as
     * usual) */
    char len[48];
    snprintf(len, sizeof(len), "%zu %zu", reply_len, reply_off);
    if (sl_call_add_trailing(cs, SL_SHM_MD_REPLY, len, strlen(len)) == SL_OK) {
      sv->r.rec.bytes_out = sl_payload_size(sv->r.payload);
      sl_payload_unref(sv->r.payload);
      sv->r.payload = NULL;
      out_bb = grpc_raw_byte_buffer_create(NULL, 0);
      if (out_bb != NULL) {
        ops[nops].op = GRPC_OP_SEND_MESSAGE;
        ops[nops].data.send_message.send_message = out_bb;
        nops++;
      }
    }
  }
  sl_shm_use_end(s->shm, sv->shm);
  sv->shm = NULL;
  if (sv->r.payload != NULL && sv->stream) {
    /* every chunk but the last on its own (one send at a time); the last goes
     * with the status */
    size_t total = sl_payload_size(sv->r.payload), chunk = sl_stream_chunk_for(total, 0);
    size_t nch = sl_stream_chunks(total, chunk), last = (nch - 1) * chunk;
    int broken = 0;
    sv->r.rec.bytes_out = total;
    if (!sv->deferred) alone_set(sv, 1); /* until the status is out (a worker's call) */
    for (size_t k = 0; k + 1 < nch && !broken; k++) {
      grpc_op op;
      int tagc;
      grpc_byte_buffer *bb = sl__payload_chunk_byte_buffer(sv->r.payload, k * chunk, chunk);
      if (bb == NULL) {
        broken = 1;
        break;
      }
      memset(&op, 0, sizeof(op));
      op.op = GRPC_OP_SEND_MESSAGE;
      op.data.send_message.send_message = bb;
      broken = grpc_call_start_batch(sv->call, &op, 1, &tagc, NULL) != GRPC_CALL_OK ||
               !wait_call_tag(cs, &tagc);
      grpc_byte_buffer_destroy(bb);
    }
    if (!broken) {
      out_bb = sl__payload_chunk_byte_buffer(sv->r.payload, last, total - last);
      if (out_bb != NULL) {
        ops[nops].op = GRPC_OP_SEND_MESSAGE;
        ops[nops].data.send_message.send_message = out_bb;
        nops++;
      } else {
        sl_err_set(&sv->r.err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
      }
    } else {
      sl_err_set(&sv->r.err, SL_EGRPC, SL_STATUS_UNAVAILABLE, "the call broke while streaming");
    }
  } else if (sv->r.payload != NULL) {
    sv->r.rec.bytes_out = sl_payload_size(sv->r.payload);
    out_bb = sl__payload_byte_buffer(sv->r.payload);
    if (out_bb != NULL) {
      ops[nops].op = GRPC_OP_SEND_MESSAGE;
      ops[nops].data.send_message.send_message = out_bb;
      nops++;
    } else {
      sl_err_set(&sv->r.err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
  }
  details_str = sv->r.err.status != SL_OK ? sv->r.err.msg : "";
  details_slice = grpc_slice_from_copied_string(details_str);
  ops[nops].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[nops].data.send_status_from_server.status =
      sv->r.err.status != SL_OK ? (grpc_status_code)sv->r.err.code : GRPC_STATUS_OK;
  ops[nops].data.send_status_from_server.status_details = &details_slice;
  ops[nops].data.send_status_from_server.trailing_metadata_count = cs->n_trailing;
  ops[nops].data.send_status_from_server.trailing_metadata = cs->trailing;
  nops++;
  sv->r.rec.code = sv->r.err.status != SL_OK ? sv->r.err.code : SL_STATUS_OK;
  t_send = sl_now();
  if (grpc_call_start_batch(sv->call, ops, nops, &tag2, NULL) == GRPC_CALL_OK) {
    wait_call_tag(cs, &tag2);
  } else {
    grpc_call_cancel(sv->call, NULL); /* no status will be sent: end the call */
  }
  alone_set(sv, 0);
  grpc_slice_unref(details_slice);

cleanup:
  sl_shm_use_end(s->shm, sv->shm);
  sv->shm = NULL;
  /* the close watch completes when the call ends; it must before the call goes */
  if (cs->started && !cs->closed) wait_call_tag(cs, cs);
  if (sv->counted) {
    struct timespec wall;
    double now = sl_now();
    sv->r.rec.stage[SL_STAGE_SEND] = t_send > 0 ? now - t_send : 0;
    sv->r.rec.stage[SL_STAGE_TOTAL] = now - sv->t_start;
    /* cancelled: the client never saw our status; one that left during its
     * upload is a cancelled call, not a malformed one */
    if (cs->cancelled && (sv->r.rec.code == SL_STATUS_OK || sv->no_message)) {
      sv->r.rec.code = SL_STATUS_CANCELLED;
    }
    clock_gettime(CLOCK_REALTIME, &wall);
    sv->r.rec.wall_time = (double)wall.tv_sec + (double)wall.tv_nsec * 1e-9;
    sl_metrics_call_finished(s->metrics, &sv->r.rec);
  }
  for (size_t i = 0; i < cs->n_trailing; i++) {
    grpc_slice_unref(cs->trailing[i].key);
    grpc_slice_unref(cs->trailing[i].value);
  }
  free(cs->trailing);
  cs->trailing = NULL;
  cs->n_trailing = 0;
  if (out_bb != NULL) grpc_byte_buffer_destroy(out_bb);
  if (sv->r.payload != NULL) sl_payload_unref(sv->r.payload);
  sv->r.payload = NULL;
  if (sv->in_bb != NULL) grpc_byte_buffer_destroy(sv->in_bb);
  sv->in_bb = NULL;
  sl__kv_free(sv->kv, sv->nkv);
  sv->kv = NULL;
  free(sv->method);
  sv->method = NULL;
  if (sv->peer != NULL) gpr_free(sv->peer);
  sv->peer = NULL;
}

/* The shared-memory control metadata of a call (shm.h): taken out of the call's
 * metadata, so that no hook sees it. attach/req get the values (malloc'd, the
 * caller frees them; NULL when absent); returns -1 when a key comes twice. */
static int take_shm_metadata(served *sv, sl_kv *attach, sl_kv *req) {
  size_t j = 0;
  int dup = 0;
  memset(attach, 0, sizeof(*attach));
  memset(req, 0, sizeof(*req));
  for (size_t i = 0; i < sv->nkv; i++) {
    sl_kv *kv = &sv->kv[i];
    sl_kv *into = strcmp(kv->key, SL_SHM_MD_ATTACH) == 0 ? attach
                  : strcmp(kv->key, SL_SHM_MD_REQ) == 0  ? req
                                                         : NULL;
    if (into == NULL) {
      sv->kv[j++] = *kv;
      continue;
    }
    if (into->key != NULL) {
      dup = 1;
      free((void *)kv->key);
      free((void *)kv->value);
      continue;
    }
    *into = *kv;
  }
  sv->nkv = j;
  return dup ? -1 : 0;
}

/* A Compute/ComputeBackward call's shared-memory part: map the segment an attach
 * value names (the answer goes in the trailing metadata, the call itself is
 * served from its message as usual), and take the request from the segment a
 * request value names (*in then points into it). Returns SL_OK, or an error in r. */
static int shm_begin(served *sv, const sl_kv *attach, const sl_kv *req,
                     const sl__bbspans *received, sl_span *span, sl__bbspans *in) {
  sl_server *s = sv->srv;
  call_state *cs = &sv->cs;
  sl_err aerr;
  if (attach->key != NULL) {
    char msg[SL_ERR_MSG_MAX + 16];
    if (s->shm == NULL) {
      snprintf(msg, sizeof(msg), "refused: disabled on the server");
    } else if (sl_shm_table_attach(s->shm, attach->value, attach->value_len, &aerr) == SL_OK) {
      snprintf(msg, sizeof(msg), "attached");
    } else {
      snprintf(msg, sizeof(msg), "refused: %s", aerr.msg);
    }
    if (sl_call_add_trailing(cs, SL_SHM_MD_STATE, msg, strlen(msg)) != SL_OK) {
      return sl_err_set(&sv->r.err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
  }
  if (req->key == NULL) return SL_OK;
  for (size_t i = 0; i < received->n; i++) {
    if (received->spans[i].len == 0) continue;
    return sl_err_set(&sv->r.err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "a shared-memory request must carry an empty message");
  }
  if (s->shm == NULL || sl_shm_table_begin(s->shm, req->value, req->value_len, &sv->shm, span,
                                           &sv->r.err) == SL_ENOTFOUND) {
    /* the client offers its segment again when told it is unknown */
    if (s->shm == NULL) {
      sl_err_set(&sv->r.err, SL_ENOTFOUND, SL_STATUS_FAILED_PRECONDITION,
                 "shared memory is disabled on this server");
    }
    sl_call_add_trailing(cs, SL_SHM_MD_STATE, "unknown", 7);
    return sv->r.err.status;
  }
  if (sv->shm == NULL) return sv->r.err.status;
  if (span->len > s->max_recv) {
    /* the limit a message on the connection would meet, in gRPC's words */
    return sl_err_set(&sv->r.err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                      "Received message larger than max (%zu vs. %zu)", span->len, s->max_recv);
  }
  in->slices = NULL;
  in->spans = span;
  in->n = 1;
  sv->r.rec.bytes_in = span->len;
  return SL_OK;
}

/* ---- Moving a stream alone ----
 *
 * gRPC (epoll1) lets any thread waiting in a completion queue be its poller, the
 * one that reads and writes the sockets. A worker receiving a streamed request
 * reads a chunk, then copies it into place; when its wait returns with the chunk,
 * gRPC makes a worker idle in req_cq the poller, which reads the next chunks
 * meanwhile (and, while a reply streams out, finishes the writes). On a machine
 * with few CPUs that is one thread too many: the reading, the copying and the
 * peer compete for the CPUs, and hand the poller role back and forth. Measured on
 * 2 CPUs (a C-core echo of 32 MiB, 6 interleaved rounds): 1.48x the floor's round
 * trip with the idle workers in gRPC, 1.25x with them out for the whole stream,
 * 1.15x with a single worker (ARCHITECTURE.md, "A stream moves alone").
 *
 * So while a call moves a stream (its request coming in, its reply going out:
 * `alone` > 0) the idle workers step out of gRPC: the call's thread posts one wake
 * event on req_cq per worker listening there (a call on a lame channel, which
 * fails at once), and a worker that takes one waits on park_cv until no call is
 * moving a stream. User code (interceptors, compute()) never runs in this state.
 * New calls are not kept waiting: the call's thread looks at req_cq after each of
 * its events and every STREAM_LOOK_S while it waits (wait_call_tag with a
 * looker), without waiting, and hands each call it finds to a parked worker. */
static void served_free(served *sv);

static void wake_free(served *w) {
  grpc_slice_unref(w->wake_details);
  grpc_metadata_array_destroy(&w->md);
  grpc_call_details_destroy(&w->details);
  served_free(w);
}

/* Post one wake event on req_cq. */
static void wake_post(sl_server *s) {
  served *w = malloc(sizeof(*w));
  grpc_op ops[2];
  /* out of memory: a listening worker stays in gRPC, or a handed call waits for
   * the next worker that looks (at a stop, one that waits in gRPC could wait on) */
  if (w == NULL) return;
  served_init(w, s, NULL);
  w->wake = 1;
  w->wake_details = grpc_empty_slice();
  w->call = grpc_channel_create_call(s->wake_channel, NULL, GRPC_PROPAGATE_DEFAULTS, s->req_cq,
                                     grpc_slice_from_static_string("/wake"), NULL,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[1].data.recv_status_on_client.trailing_metadata = &w->md;
  ops[1].data.recv_status_on_client.status = &w->wake_code;
  ops[1].data.recv_status_on_client.status_details = &w->wake_details;
  if (w->call == NULL || grpc_call_start_batch(w->call, ops, 2, w, NULL) != GRPC_CALL_OK) {
    wake_free(w);
  }
}

/* Give a call (or a failed request) taken from req_cq to a parked worker, or to
 * a worker listening in req_cq: a wake event goes with every handed call, since a
 * parked worker may be taken already, and every worker waiting in gRPC needs an
 * event of its own (above all when the server stops: each then waits for one
 * failed request). A wake that finds nothing handed costs a turn of the loop. */
static void hand_over(sl_server *s, served *sv, int success) {
  pthread_mutex_lock(&s->park_mu);
  sv->handed_success = success;
  sv->next_handed = s->handed;
  s->handed = sv;
  atomic_fetch_add(&s->n_handed, 1);
  pthread_cond_signal(&s->park_cv);
  pthread_mutex_unlock(&s->park_mu);
  wake_post(s);
}

/* Take what req_cq holds now, without waiting: calls are handed over, wakes
 * dropped. A wake taken may have been meant to send a listening worker to a
 * handed call (hand_over): while calls wait in `handed`, as many of the wakes
 * taken are posted again, so that each such call keeps one on its way. */
static void look_at_requests(sl_server *s) {
  int took = 0, again;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(s->req_cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
    served *sv = ev.tag;
    if (ev.type != GRPC_OP_COMPLETE) break;
    if (sv->wake) {
      wake_free(sv);
      took++;
    } else {
      hand_over(s, sv, ev.success);
    }
  }
  if (took == 0) return;
  again = atomic_load(&s->n_handed);
  for (again = again < took ? again : took; again > 0; again--) wake_post(s);
}

/* Hold the idle workers out of gRPC (on: 1) while this call's thread moves a
 * stream, or let them back (0); idempotent. */
static void alone_set(served *sv, int on) {
  sl_server *s = sv->srv;
  if (s->wake_channel == NULL || s->max_workers < 2 || on == (sv->cs.looker != NULL)) return;
  if (on) {
    sv->cs.looker = s;
    if (atomic_fetch_add(&s->alone, 1) == 0) {
      for (int n = atomic_load(&s->listening); n > 0; n--) wake_post(s);
    }
  } else {
    sv->cs.looker = NULL;
    if (atomic_fetch_sub(&s->alone, 1) == 1) {
      pthread_mutex_lock(&s->park_mu);
      pthread_cond_broadcast(&s->park_cv);
      pthread_mutex_unlock(&s->park_mu);
    }
  }
}

/* Whether a call moves a stream alone and the server is not stopping. */
static int moving_alone(sl_server *s) {
  return atomic_load(&s->alone) > 0 && !atomic_load(&s->park_stop);
}

/* Whether an idle worker is to stay out of gRPC now (or take a handed call). */
static int parking(sl_server *s) {
  return moving_alone(s) || atomic_load(&s->n_handed) > 0;
}

/* For an idle worker: a call handed over (1, *sv and *success set), or 0 once no
 * call moves a stream (or the server is stopping). */
static int park(sl_server *s, served **sv, int *success) {
  int got = 0;
  pthread_mutex_lock(&s->park_mu);
  while (s->handed == NULL && moving_alone(s)) {
    pthread_cond_wait(&s->park_cv, &s->park_mu);
  }
  if (s->handed != NULL) {
    *sv = s->handed;
    s->handed = (*sv)->next_handed;
    *success = (*sv)->handed_success;
    atomic_fetch_sub(&s->n_handed, 1);
    got = 1;
  }
  pthread_mutex_unlock(&s->park_mu);
  return got;
}

/* A streamed request (ComputeStream / ComputeBackwardStream): the first Chunk is
 * in sv->in_bb; take the rest until the client half-closes. The next chunk's
 * receive is started before the current one is copied into place, so the copy
 * overlaps the transfer. The message is bounded by max_decoded_bytes. On
 * SL_OK rx holds the message (sl_stream_rx_spans done); on failure the error is
 * in sv->r.err. Either way the caller clears rx. */
static int receive_stream(served *sv, sl_stream_rx *rx) {
  sl_server *s = sv->srv;
  grpc_byte_buffer *cur = sv->in_bb;
  int rc = SL_OK, gone = 0;
  sv->in_bb = NULL;
  sv->r.rec.bytes_in = 0;
  sl_stream_rx_init(rx, s->max_stream);
  while (cur != NULL) {
    grpc_byte_buffer *next = NULL;
    grpc_op op;
    int tag, started;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &next;
    started = rc == SL_OK && grpc_call_start_batch(sv->call, &op, 1, &tag, NULL) == GRPC_CALL_OK;
    if (rc == SL_OK) {
      sl__bbspans sp;
      sv->r.rec.bytes_in += grpc_byte_buffer_length(cur);
      rc = sl__bbspans_init(cur, &sp, &sv->r.err);
      if (rc == SL_OK) {
        rc = sl_stream_rx_feed_chunk(rx, sp.spans, sp.n, &sv->r.err);
        sl__bbspans_clear(&sp);
      }
    }
    grpc_byte_buffer_destroy(cur);
    cur = NULL;
    if (!started) {
      gone = rc == SL_OK;
      break;
    }
    if (!wait_call_tag(&sv->cs, &tag)) {
      gone = 1; /* cancelled, past its deadline, or the client went away */
      if (next != NULL) grpc_byte_buffer_destroy(next);
      break;
    }
    cur = next;
  }
  if (rc != SL_OK) return rc; /* stop reading: the status ends the call */
  if (!gone && sv->cs.started && !sv->cs.closed) {
    /* the stream ended: a half-close, or a cancel whose close event may be queued
     * already (a cancelled call's pending receive ends with no message too) */
    int success = 0;
    next_event(&sv->cs, gpr_time_0(GPR_CLOCK_REALTIME), &success);
  }
  if (sv->cs.closed) gone = 1;
  if (gone) {
    sv->no_message = 1;
    return sl_err_set(&sv->r.err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "the stream ended before its message was complete (after %zu bytes in "
                      "%zu chunks)",
                      rx->total, rx->chunks);
  }
  rc = sl_stream_rx_spans(rx, &sv->r.err);
  /* a message cut short: its client left during the upload (CANCELLED in the
   * metrics when the close says so), or sent a truncated one */
  if (rc != SL_OK) sv->no_message = 1;
  return rc;
}

/* Serve one call bound to sv->cq. Returns 1 when the compute hook deferred it:
 * then sv (on the heap) belongs to the pending machinery. */
static int serve_call(served *sv, grpc_call_details *details, grpc_metadata_array *md) {
  sl_server *s = sv->srv;
  call_state *cs = &sv->cs;
  grpc_op ops[3];
  sl__bbspans in = {0}, shm_in = {0};
  sl_kv shm_attach = {0}, shm_req = {0};
  sl_span shm_span;
  sl_call_info ci;
  int tag1, deferred = 0;
  double remaining;

  sv->t_start = sl_now();
  memset(&ci, 0, sizeof(ci));
  memset(ops, 0, sizeof(ops));
  if (streq_slice(details->method, METHOD_COMPUTE_STREAM) ||
      streq_slice(details->method, METHOD_BACKWARD_STREAM)) {
    alone_set(sv, 1); /* until the request is in */
  }
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_RECV_MESSAGE;
  ops[1].data.recv_message.recv_message = &sv->in_bb;
  if (grpc_call_start_batch(sv->call, ops, 2, &tag1, NULL) != GRPC_CALL_OK) goto finish;
  if (!wait_call_tag(cs, &tag1)) goto finish; /* the client went away */
  sl_metrics_call_started(s->metrics);
  sv->counted = 1;
  sv->responding = 1;
  sv->r.rec.stage[SL_STAGE_RECEIVE] = sl_now() - sv->t_start;
  sv->r.rec.method = method_of(details->method);
  sv->stream = streq_slice(details->method, METHOD_COMPUTE_STREAM) ||
               streq_slice(details->method, METHOD_BACKWARD_STREAM);
  if (sv->stream) sv->r.rec.transport = SL_TRANSPORT_STREAM;
  if (sv->in_bb != NULL) sv->r.rec.bytes_in = grpc_byte_buffer_length(sv->in_bb);
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  ops[0].data.recv_close_on_server.cancelled = &cs->cancelled;
  cs->started = grpc_call_start_batch(sv->call, ops, 1, cs, NULL) == GRPC_CALL_OK;

  /* user code (interceptors, compute) sees a streamed call as its unary method:
   * streaming is how the bytes travel, not another operation */
  if (sv->stream) {
    const char *logical = streq_slice(details->method, METHOD_BACKWARD_STREAM) ? METHOD_BACKWARD
                                                                               : METHOD_COMPUTE;
    sv->method = sl_strndup(logical, strlen(logical));
  } else {
    sv->method = sl__slice_strdup(details->method);
  }
  sv->peer = grpc_call_get_peer(sv->call);
  if (sv->method == NULL || sl__kv_from_metadata(md, &sv->kv, &sv->nkv) != SL_OK) {
    sl_err_set(&sv->r.err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto finish;
  }
  if (take_shm_metadata(sv, &shm_attach, &shm_req) != 0) {
    sl_err_set(&sv->r.err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
               "shared-memory metadata given twice");
    goto finish;
  }
  ci.method = sv->method;
  ci.peer = sv->peer ? sv->peer : "";
  sl_strlcpy(sv->r.rec.method_name, sv->method, sizeof(sv->r.rec.method_name));
  sl_strlcpy(sv->r.rec.peer, ci.peer, sizeof(sv->r.rec.peer));
  remaining = sl__seconds_until(details->deadline);
  ci.deadline = remaining > 1e15 ? 0.0 : sl_now() + remaining;
  ci.metadata = sv->kv;
  ci.n_metadata = sv->nkv;
  ci.state = cs;
  cs->deadline = ci.deadline;

  if (s->n_tokens > 0 && !streq_slice(details->method, METHOD_STD_HEALTH)) {
    int auth = authorized(s, sv->kv, sv->nkv);
    if (auth != 1) {
      sl_err_set(&sv->r.err, SL_EINVAL, SL_STATUS_UNAUTHENTICATED, "%s",
                 auth < 0 ? "more than one authorization header; send exactly one"
                          : "missing or invalid authorization token");
      goto finish;
    }
  }
  if (s->hooks.intercept != NULL) {
    int looked = sv->cs.looker != NULL;
    alone_set(sv, 0); /* user code: the others serve meanwhile */
    if (s->hooks.intercept(s->user, &ci, &sv->r.err) != SL_OK) {
      if (sv->r.err.code == SL_STATUS_OK) sv->r.err.code = SL_STATUS_UNKNOWN;
      goto finish;
    }
    alone_set(sv, looked);
  }
  if (sv->in_bb == NULL) {
    /* the client half-closed without a message, or went away during its upload:
     * which one shows when the close watch completes (counted in respond_and_finish) */
    sv->no_message = 1;
    sl_err_set(&sv->r.err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
               "the call carried no request message");
    goto finish;
  }
  if (sv->stream) {
    sl_stream_rx rx;
    int backward = streq_slice(details->method, METHOD_BACKWARD_STREAM), received;
    if (shm_attach.key != NULL || shm_req.key != NULL) {
      sl_err_set(&sv->r.err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                 "shared-memory metadata on a streamed call");
      goto finish;
    }
    received = receive_stream(sv, &rx) == SL_OK;
    alone_set(sv, 0); /* compute() may take long: the others serve meanwhile */
    if (received) {
      deferred = tcall_begin(s, &ci, NULL, &rx, NULL, backward, &sv->r, &sv->tc,
                             (sl_pending *)sv) == SL_EAGAIN;
    }
    sl_stream_rx_clear(&rx); /* what the reader did not take over */
    goto finish;
  }
  if (sl__bbspans_take(&sv->in_bb, &in, &sv->r.err) != SL_OK) goto finish;

  if (streq_slice(details->method, METHOD_COMPUTE) || streq_slice(details->method, METHOD_BACKWARD)) {
    int backward = streq_slice(details->method, METHOD_BACKWARD);
    if (shm_begin(sv, &shm_attach, &shm_req, &in, &shm_span, &shm_in) != SL_OK) goto finish;
    if (tcall_begin(s, &ci, shm_in.spans != NULL ? &shm_in : &in, NULL,
                    shm_in.spans != NULL ? sv->shm : NULL, backward, &sv->r,
                    &sv->tc, (sl_pending *)sv) == SL_EAGAIN) {
      deferred = 1;
      goto finish;
    }
  } else if (streq_slice(details->method, METHOD_HEALTH)) {
    /* a client offers its segment on a health check before its first large call */
    sl_kv no_req = {0};
    if (shm_attach.key != NULL &&
        shm_begin(sv, &shm_attach, &no_req, &in, &shm_span, &shm_in) != SL_OK) {
      goto finish;
    }
    serve_health(s, &sv->r);
  } else if (streq_slice(details->method, METHOD_INFO)) {
    serve_info(s, &sv->r);
  } else if (streq_slice(details->method, METHOD_STD_HEALTH)) {
    serve_std_health(s, &in, &sv->r);
  } else {
    sl_err_set(&sv->r.err, SL_ENOTFOUND, SL_STATUS_UNIMPLEMENTED, "unknown method %s", sv->method);
  }

finish:
  alone_set(sv, 0);
  sl__bbspans_clear(&in);
  free((void *)shm_attach.key);
  free((void *)shm_attach.value);
  free((void *)shm_req.key);
  free((void *)shm_req.value);
  if (deferred) return 1;
  respond_and_finish(sv);
  return 0;
}

/* ---- deferred calls ---------------------------------------------------------- */

static void served_free(served *sv) {
  if (sv->call != NULL) grpc_call_unref(sv->call);
  destroy_queue(sv->cq);
  pthread_mutex_destroy(&sv->cs.poll_mu);
  free(sv);
}

/* With s->mu held: queue sv for the finisher. */
static void ready_push(sl_server *s, served *sv) {
  sv->next_ready = NULL;
  if (s->ready_tail != NULL) s->ready_tail->next_ready = sv; else s->ready_head = sv;
  s->ready_tail = sv;
  pthread_cond_broadcast(&s->cv);
}

/* With s->mu held: drop a reference; returns 1 when sv is to be freed. */
static int served_unref_locked(served *sv) { return --sv->refs == 0; }

/* The worker lets go of a deferred call. */
static void hand_off(sl_server *s, served *sv) {
  pthread_mutex_lock(&s->mu);
  sv->handed_off = 1;
  sv->refs = sv->completed ? 1 : 2; /* the completer's is gone once it completed */
  sv->next_deferred = s->deferred;
  sv->prev_deferred = NULL;
  if (s->deferred != NULL) s->deferred->prev_deferred = sv;
  s->deferred = sv;
  if (sv->completed) ready_push(s, sv);
  pthread_mutex_unlock(&s->mu);
}


void sl_pending_complete(sl_pending *p, int status, const sl_err *err, const sl_tensor_set *out,
                         void (*out_free)(void *out_owner), void *out_owner,
                         float compute_time_ms) {
  served *sv = (served *)p;
  sl_server *s = sv->srv;
  int free_it = 0;
  pthread_mutex_lock(&s->mu);
  if (sv->abandoned) {
    /* the server answered already (it was stopping): just let go */
    free_it = served_unref_locked(sv);
    pthread_mutex_unlock(&s->mu);
    if (status == SL_OK && out != NULL) sl_tensor_set_release(out);
    if (out_free != NULL) out_free(out_owner);
    if (free_it) served_free(sv);
    return;
  }
  sv->completed = 1;
  sv->rc = status;
  sv->tc.args.out_free = out_free;
  sv->tc.args.out_owner = out_owner;
  if (status == SL_OK && out != NULL) {
    sv->tc.args.out = *out;
    sv->tc.args.compute_time_ms = compute_time_ms;
  } else if (err != NULL) {
    sv->r.err = *err;
  }
  if (status != SL_OK && sv->r.err.status == SL_OK) {
    sl_err_set(&sv->r.err, status, SL_STATUS_INTERNAL, "compute failed: %s", sl_strerror(status));
  }
  if (sv->handed_off) {
    sv->refs--; /* the completer's */
    ready_push(s, sv);
  }
  pthread_mutex_unlock(&s->mu);
}

/* The finisher thread answers deferred calls once they are complete (or abandoned
 * by a stopping server), one at a time, in order. */
static void *finisher_main(void *arg) {
  sl_server *s = arg;
  for (;;) {
    served *sv;
    int free_it;
    pthread_mutex_lock(&s->mu);
    while (s->ready_head == NULL && !s->finisher_stop) pthread_cond_wait(&s->cv, &s->mu);
    sv = s->ready_head;
    if (sv == NULL) {
      pthread_mutex_unlock(&s->mu);
      break;
    }
    s->ready_head = sv->next_ready;
    if (s->ready_head == NULL) s->ready_tail = NULL;
    pthread_mutex_unlock(&s->mu);

    pthread_mutex_lock(&sv->cs.poll_mu);
    sv->cs.finishing = 1; /* the completer's is_active polls no more */
    pthread_mutex_unlock(&sv->cs.poll_mu);
    tcall_end(s, &sv->tc, sv->rc, &sv->r);
    respond_and_finish(sv);

    pthread_mutex_lock(&s->mu);
    if (sv->prev_deferred != NULL) sv->prev_deferred->next_deferred = sv->next_deferred;
    else s->deferred = sv->next_deferred;
    if (sv->next_deferred != NULL) sv->next_deferred->prev_deferred = sv->prev_deferred;
    free_it = served_unref_locked(sv);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (free_it) served_free(sv);
  }
  return NULL;
}

/* A stopping server (after its grace period) answers the deferred calls still
 * waiting for their result with UNAVAILABLE; their completers' later results are
 * dropped. Returns once no call is deferred or inside the compute hook. */
static void abandon_deferred(sl_server *s) {
  pthread_mutex_lock(&s->mu);
  for (;;) {
    struct timespec ts;
    for (served *sv = s->deferred; sv != NULL; sv = sv->next_deferred) {
      if (sv->completed || sv->abandoned) continue;
      sv->abandoned = 1;
      sv->rc = SL_ESTATE;
      sl_err_set(&sv->r.err, SL_ESTATE, SL_STATUS_UNAVAILABLE,
                 "the server stopped before the call finished");
      ready_push(s, sv);
    }
    if (s->deferred == NULL && atomic_load(&s->in_hook) == 0) break;
    sl_deadline_timespec(0.02, &ts);
    pthread_cond_timedwait(&s->cv, &s->mu, &ts);
  }
  pthread_mutex_unlock(&s->mu);
}

/* Ask gRPC for the next call on the shared request queue: a new served (its tag)
 * with its own call queue. 0 when the request is pending; -1 when none could be
 * made (out of memory, or gRPC refused: the server is shutting down). */
static int request_next(sl_server *s) {
  served *sv = malloc(sizeof(*sv));
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_call_error ce = GRPC_CALL_ERROR;
  if (sv == NULL || cq == NULL) {
    free(sv);
    if (cq != NULL) grpc_completion_queue_destroy(cq);
    return -1;
  }
  served_init(sv, s, cq);
  pthread_mutex_lock(&s->req_mu);
  if (!s->requests_closed) {
    ce = grpc_server_request_call(s->server, &sv->call, &sv->details, &sv->md, cq, s->req_cq, sv);
  }
  pthread_mutex_unlock(&s->req_mu);
  if (ce != GRPC_CALL_OK) {
    grpc_call_details_destroy(&sv->details);
    grpc_metadata_array_destroy(&sv->md);
    served_free(sv);
    return -1;
  }
  return 0;
}

/* Workers share one request queue, on which each keeps one request for a call
 * pending while it is idle: whichever thread gRPC's poller finds the call for
 * serves it (that thread is the poller itself on an idle server, so no other
 * thread is woken to take the call), then asks for the next one. */
static void *worker_main(void *arg) {
  worker *w = arg;
  sl_server *s = w->srv;
  int request = 1; /* 0: this worker's last request is still pending */
  if (s->hooks.worker_start != NULL) s->hooks.worker_start(s->user);
  for (;;) {
    grpc_event ev;
    served *sv = NULL;
    int deferred = 0, success = 0;
    if (request && request_next(s) != 0) break;
    request = 1;
    /* while a call moves a stream, out of gRPC (see "Moving a stream alone") */
    atomic_fetch_add(&s->listening, 1);
    if (parking(s)) {
      atomic_fetch_sub(&s->listening, 1);
      if (!park(s, &sv, &success)) {
        request = 0; /* the stream has moved: back to gRPC, where the request waits */
        continue;
      }
    } else {
      ev = grpc_completion_queue_next(s->req_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
      atomic_fetch_sub(&s->listening, 1);
      if (ev.type != GRPC_OP_COMPLETE) break; /* the queue was shut down */
      sv = ev.tag;
      success = ev.success;
      if (sv->wake) {
        wake_free(sv);
        request = 0; /* this worker's request is still pending */
        continue;
      }
    }
    if (success) {
      atomic_store(&s->last_call_us, (long long)(sl_now() * 1e6));
      deferred = serve_call(sv, &sv->details, &sv->md);
      sl_shm_table_maybe_sweep(s->shm, 1.0);
      sl_malloc_arena_note(); /* this thread reads requests: see tensor.h */
    }
    grpc_call_details_destroy(&sv->details);
    grpc_metadata_array_destroy(&sv->md);
    if (deferred) {
      hand_off(s, sv);
    } else {
      served_free(sv);
    }
    if (!success) break; /* the server is shutting down */
  }
  if (s->hooks.worker_stop != NULL) s->hooks.worker_stop(s->user);
  return NULL;
}

/* ---- Health/Watch ----------------------------------------------------------- */

/* One Watch stream. Its two tags are the addresses of send_tag and close_tag. */
typedef struct watcher {
  struct watcher *next;
  grpc_call *call;      /* owned: unref'd when the watcher is freed */
  grpc_byte_buffer *out; /* the message being sent, destroyed when the send completes */
  int sent;             /* the status last sent; -1: none yet */
  int kind;             /* the service watched: SVC_READY, SVC_LIVENESS or SVC_UNKNOWN */
  int sending;          /* a send batch is pending */
  int ended;            /* the final status went out (or the call broke): send nothing more */
  int closed;           /* RECV_CLOSE_ON_SERVER completed: the call is over */
  int cancelled;        /* set by gRPC */
  char send_tag, close_tag;
} watcher;

/* The pending request for the next Watch call. */
typedef struct watch_request {
  grpc_call *call;
  gpr_timespec deadline;
  grpc_metadata_array md;
  grpc_byte_buffer *payload;
} watch_request;

/* Ask gRPC for the next Watch call; 1 when the request is pending. */
static int watch_request_next(sl_server *s, watch_request *rq) {
  grpc_call_error ce = GRPC_CALL_ERROR;
  memset(rq, 0, sizeof(*rq));
  grpc_metadata_array_init(&rq->md);
  pthread_mutex_lock(&s->req_mu); /* see requests_closed */
  if (!s->requests_closed) {
    ce = grpc_server_request_registered_call(s->server, s->watch_method, &rq->call,
                                             &rq->deadline, &rq->md, &rq->payload, s->watch_cq,
                                             s->watch_cq, rq);
  }
  pthread_mutex_unlock(&s->req_mu);
  if (ce == GRPC_CALL_OK) return 1;
  grpc_metadata_array_destroy(&rq->md);
  return 0;
}

/* Start a batch sending `status` (a ServingStatus) as the stream's next message,
 * with the initial metadata when it is the first. */
static void watch_send(watcher *w, int status) {
  Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  uint8_t buf[16];
  grpc_slice slice;
  grpc_op ops[2];
  size_t nops = 0, len;

  resp.status = status;
  len = grpc__health__v1__health_check_response__pack(&resp, buf); /* at most 2 bytes */
  slice = grpc_slice_from_copied_buffer((const char *)buf, len);
  w->out = grpc_raw_byte_buffer_create(&slice, 1);
  grpc_slice_unref(slice);
  memset(ops, 0, sizeof(ops));
  if (w->sent < 0) ops[nops++].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[nops].op = GRPC_OP_SEND_MESSAGE;
  ops[nops].data.send_message.send_message = w->out;
  nops++;
  if (w->out != NULL && grpc_call_start_batch(w->call, ops, nops, &w->send_tag, NULL) ==
                            GRPC_CALL_OK) {
    w->sending = 1;
    w->sent = status;
    return;
  }
  if (w->out != NULL) grpc_byte_buffer_destroy(w->out);
  w->out = NULL;
  w->ended = 1;
  grpc_call_cancel(w->call, NULL);
}

/* End the stream with `code` and `message`. */
static void watch_finish(watcher *w, grpc_status_code code, const char *message) {
  grpc_slice details = grpc_slice_from_copied_string(message);
  grpc_op ops[2];
  size_t nops = 0;
  memset(ops, 0, sizeof(ops));
  if (w->sent < 0) ops[nops++].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[nops].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[nops].data.send_status_from_server.status = code;
  ops[nops].data.send_status_from_server.status_details = &details;
  nops++;
  w->ended = 1;
  if (grpc_call_start_batch(w->call, ops, nops, &w->send_tag, NULL) == GRPC_CALL_OK) {
    w->sending = 1;
    if (w->sent < 0) w->sent = 0;
  } else {
    grpc_call_cancel(w->call, NULL);
  }
  grpc_slice_unref(details);
}

/* A Watch call came in: read its request and make its watcher (NULL when out of
 * memory; the call is then cancelled). Takes the call and the payload. */
static watcher *watch_accept(sl_server *s, watch_request *rq) {
  Grpc__Health__V1__HealthCheckRequest *req = NULL;
  grpc_byte_buffer_reader reader;
  grpc_slice all = grpc_empty_slice();
  grpc_op op;
  watcher *w = calloc(1, sizeof(*w));

  if (rq->payload != NULL && grpc_byte_buffer_reader_init(&reader, rq->payload)) {
    all = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    req = grpc__health__v1__health_check_request__unpack(NULL, GRPC_SLICE_LENGTH(all),
                                                         GRPC_SLICE_START_PTR(all));
  }
  grpc_slice_unref(all);
  if (rq->payload != NULL) grpc_byte_buffer_destroy(rq->payload);
  grpc_metadata_array_destroy(&rq->md);
  if (w == NULL) {
    grpc_call_cancel(rq->call, NULL);
    grpc_call_unref(rq->call);
    if (req != NULL) grpc__health__v1__health_check_request__free_unpacked(req, NULL);
    return NULL;
  }
  w->call = rq->call;
  w->sent = -1;
  memset(&op, 0, sizeof(op));
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &w->cancelled;
  if (grpc_call_start_batch(w->call, &op, 1, &w->close_tag, NULL) != GRPC_CALL_OK) {
    w->closed = 1; /* no close event will come */
    w->ended = 1;
    grpc_call_cancel(w->call, NULL);
  } else if (req == NULL) {
    watch_finish(w, GRPC_STATUS_INVALID_ARGUMENT, "malformed HealthCheckRequest");
  } else {
    /* an unknown service gets SERVICE_UNKNOWN and the stream stays open, as the
     * protocol says; the first status goes out from the watch loop */
    w->kind = service_kind(req->service);
  }
  if (req != NULL) grpc__health__v1__health_check_request__free_unpacked(req, NULL);
  atomic_fetch_add(&s->watchers, 1);
  return w;
}

static void watcher_free(sl_server *s, watcher *w) {
  if (w->out != NULL) grpc_byte_buffer_destroy(w->out);
  grpc_call_unref(w->call);
  free(w);
  atomic_fetch_sub(&s->watchers, 1);
}

/* The watch thread: accepts Watch calls, sends each stream the status whenever it
 * changes (looked at every WATCH_POLL_S), ends every stream once the server stops,
 * and exits when the server has shut down and no stream is left. */
/* Once calls have ended and IDLE_RELEASE_S of quiet follows (nothing in flight,
 * no call taken or ended), give memory back: the storage pool's idle blocks and the
 * allocator's free pages (sl_storage_release_idle). Without it a server that served
 * a burst of large calls keeps the burst's peak resident while idle. Runs on the
 * watch thread, which wakes every WATCH_POLL_S anyway. */
static void release_memory_when_idle(sl_server *s) {
  long long now_us, quiet_since;
  if (!atomic_load(&s->used_memory) || atomic_load(&s->in_flight) > 0) return;
  now_us = (long long)(sl_now() * 1e6);
  quiet_since = atomic_load(&s->last_done_us);
  if (atomic_load(&s->last_call_us) > quiet_since) quiet_since = atomic_load(&s->last_call_us);
  if (now_us - quiet_since < (long long)(IDLE_RELEASE_S * 1e6)) return;
  atomic_store(&s->used_memory, 0);
  (void)sl_storage_release_idle(0);
}

static void *watch_main(void *arg) {
  sl_server *s = arg;
  watcher *list = NULL;
  watch_request rq;
  int requesting = watch_request_next(s, &rq);

  while (requesting || list != NULL) {
    /* With no stream open on a serving server, only look at the queue (a past
     * deadline: no wait) and sleep between looks. A thread blocked in
     * grpc_completion_queue_next takes turns with the workers as gRPC's one poller
     * of the sockets, and each turn costs a worker a wake-up (a futex hand-off) on
     * every event of every call; the workers poll for this queue meanwhile. */
    int idle = list == NULL && atomic_load(&s->serving) && !atomic_load(&s->watch_ending);
    grpc_event ev = grpc_completion_queue_next(
        s->watch_cq, idle ? gpr_inf_past(GPR_CLOCK_MONOTONIC) : sl__deadline_in(WATCH_POLL_S),
        NULL);
    int status, ending;
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (idle && ev.type == GRPC_QUEUE_TIMEOUT) {
      struct timespec ts = {0, (long)(WATCH_POLL_S * 1e9)};
      release_memory_when_idle(s);
      nanosleep(&ts, NULL);
      continue;
    }
    if (ev.type == GRPC_OP_COMPLETE && ev.tag == (void *)&rq) {
      requesting = 0;
      if (ev.success) {
        watcher *w = watch_accept(s, &rq);
        if (w != NULL) {
          w->next = list;
          list = w;
        }
        requesting = watch_request_next(s, &rq);
      } else { /* the server is shutting down */
        if (rq.payload != NULL) grpc_byte_buffer_destroy(rq.payload);
        grpc_metadata_array_destroy(&rq.md);
        if (rq.call != NULL) grpc_call_unref(rq.call);
      }
    } else if (ev.type == GRPC_OP_COMPLETE) {
      for (watcher *w = list; w != NULL; w = w->next) {
        if (ev.tag == (void *)&w->send_tag) {
          w->sending = 0;
          if (w->out != NULL) grpc_byte_buffer_destroy(w->out);
          w->out = NULL;
          if (!ev.success) w->ended = 1; /* the call broke */
          break;
        }
        if (ev.tag == (void *)&w->close_tag) {
          w->closed = 1;
          break;
        }
      }
    }
    release_memory_when_idle(s);
    ending = atomic_load(&s->watch_ending);
    for (watcher **pp = &list; *pp != NULL;) {
      watcher *w = *pp;
      if (w->sending) {
        pp = &w->next;
        continue;
      }
      if (w->closed) {
        *pp = w->next;
        watcher_free(s, w);
        continue;
      }
      /* a stopping server is NOT_SERVING: that goes out first, then the end */
      status = service_status(s, w->kind);
      if (ending && w->kind == SVC_READY)
        status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
      if (!w->ended && w->sent != status) {
        watch_send(w, status);
      } else if (!w->ended && ending) {
        watch_finish(w, GRPC_STATUS_UNAVAILABLE, "the server is stopping");
      }
      pp = &w->next;
    }
  }
  return NULL;
}

int sl_server_set_health(sl_server *s, int serving) {
  pthread_mutex_lock(&s->mu);
  int running = s->state == ST_RUNNING;
  if (running) atomic_store(&s->health, serving ? 1 : 0);
  pthread_mutex_unlock(&s->mu);
  return running ? SL_OK : SL_ESTATE;
}

int sl_server_health(const sl_server *s) {
  return health_status(s) == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
}

int sl_server_health_watchers(const sl_server *s) { return atomic_load(&s->watchers); }

/* ---- lifecycle ------------------------------------------------------------- */

int sl_server_create(const sl_server_config *cfg, const sl_server_hooks *hooks, void *user,
                     sl_server **out, sl_err *err) {
  int status = SL_ENOMEM;
  sl_server *s = NULL;

  *out = NULL;
  if (cfg->max_workers < 1 || cfg->max_workers > 4096) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "max_workers must be between 1 and 4096, not %d", cfg->max_workers);
  }
  if (cfg->port < 0 || cfg->port > 65535) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "port must be between 0 and 65535, not %d", cfg->port);
  }
  s = calloc(1, sizeof(*s));
  if (s == NULL) goto oom;
  pthread_mutex_init(&s->mu, NULL);
  pthread_mutex_init(&s->req_mu, NULL);
  pthread_mutex_init(&s->park_mu, NULL);
  pthread_cond_init(&s->park_cv, NULL);
  pthread_cond_init(&s->cv, NULL);
  s->state = ST_CREATED;
  s->host = sl_strndup(cfg->host ? cfg->host : "0.0.0.0", strlen(cfg->host ? cfg->host : "0.0.0.0"));
  s->version = sl_strndup(cfg->version ? cfg->version : "", strlen(cfg->version ? cfg->version : ""));
  s->workers = calloc((size_t)cfg->max_workers, sizeof(*s->workers));
  if (s->host == NULL || s->version == NULL || s->workers == NULL) goto oom;
  s->port_req = cfg->port;
  s->max_workers = cfg->max_workers;
  s->codec = sl_codec_ref(cfg->codec);
  s->codecs = sl_codecs_ref(cfg->codecs);
  s->max_decoded = cfg->max_decoded_bytes ? cfg->max_decoded_bytes : ((size_t)4 << 30);
  if (s->max_decoded > SL_MAX_DECODED_BYTES) s->max_decoded = SL_MAX_DECODED_BYTES;
  atomic_init(&s->decoded_in_use, 0);
  s->limits.max_tensors = cfg->max_tensors ? cfg->max_tensors : SL_DEFAULT_MAX_TENSORS;
  s->limits.max_depth = cfg->max_depth > 0 ? cfg->max_depth : SL_DEFAULT_MAX_DEPTH;
  if (cfg->n_auth_tokens > 0) {
    s->tokens = calloc(cfg->n_auth_tokens, sizeof(char *));
    s->token_lens = calloc(cfg->n_auth_tokens, sizeof(size_t));
    if (s->tokens == NULL || s->token_lens == NULL) goto oom;
    for (size_t i = 0; i < cfg->n_auth_tokens; i++) {
      s->token_lens[i] = strlen(cfg->auth_tokens[i]);
      s->tokens[i] = sl_strndup(cfg->auth_tokens[i], s->token_lens[i]);
      if (s->tokens[i] == NULL) goto oom;
      s->n_tokens = i + 1;
    }
  }
  s->hooks = *hooks;
  s->user = user;
  atomic_init(&s->serving, 0);
  atomic_init(&s->health, 1);
  atomic_init(&s->watch_ending, 0);
  atomic_init(&s->watchers, 0);
  atomic_init(&s->last_call_us, 0);
  atomic_init(&s->last_done_us, 0);
  atomic_init(&s->used_memory, 0);
  atomic_init(&s->in_flight, 0);
  atomic_init(&s->total_requests, 0);
  status = sl__channel_args_build(cfg->args, cfg->nargs, 1, &s->chargs, err);
  if (status != SL_OK) goto cleanup;
  s->max_stream = s->max_decoded;
  for (size_t i = 0; i < cfg->nargs; i++) {
    /* a receive limit the user set bounds streamed requests too */
    if (!cfg->args[i].is_string && cfg->args[i].ival >= 0 &&
        strcmp(cfg->args[i].key, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH) == 0 &&
        (size_t)cfg->args[i].ival < s->max_stream) {
      s->max_stream = (size_t)cfg->args[i].ival;
    }
  }
  if (sl_metrics_create(&s->metrics) != SL_OK) goto oom;
  if (sl_shm_env_enabled() && sl_shm_table_new(&s->shm) != SL_OK) goto oom;
  s->max_recv = s->max_send = SIZE_MAX;
  for (size_t i = 0; i < cfg->nargs; i++) {
    const sl_chan_arg *a = &cfg->args[i];
    if (a->is_string || a->ival < 0) continue;
    if (strcmp(a->key, "grpc.max_receive_message_length") == 0) s->max_recv = (size_t)a->ival;
    if (strcmp(a->key, "grpc.max_send_message_length") == 0) s->max_send = (size_t)a->ival;
  }
  grpc_init();
  s->grpc_inited = 1;
  if (cfg->tls != NULL) {
    grpc_ssl_pem_key_cert_pair pair = {cfg->tls->private_key, cfg->tls->cert_chain};
    if (cfg->tls->cert_chain == NULL || cfg->tls->private_key == NULL) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "TLS needs a certificate chain and a private key");
      goto cleanup;
    }
    if (cfg->tls->require_client_auth && cfg->tls->root_certs == NULL) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "require_client_auth needs root_certs to verify clients with");
      goto cleanup;
    }
    s->creds = grpc_ssl_server_credentials_create_ex(
        cfg->tls->root_certs, &pair, 1,
        cfg->tls->require_client_auth ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                      : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
    if (s->creds == NULL) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "the TLS certificate or key is not valid PEM");
      goto cleanup;
    }
  }
  *out = s;
  s = NULL;
  status = SL_OK;
  goto cleanup;
oom:
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
cleanup:
  if (s != NULL) sl_server_destroy(s);
  return status;
}

/* Tear down gRPC objects after the workers are gone (or were never started). */
static void teardown_grpc(sl_server *s) {
  if (s->server != NULL) {
    grpc_server_destroy(s->server);
    s->server = NULL;
  }
  if (s->req_cq != NULL) {
    /* wake events no worker took (their calls hold the lame channel) */
    grpc_event ev;
    grpc_completion_queue_shutdown(s->req_cq);
    while ((ev = grpc_completion_queue_next(s->req_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL))
               .type != GRPC_QUEUE_SHUTDOWN) {
      if (ev.type == GRPC_OP_COMPLETE && ((served *)ev.tag)->wake) wake_free(ev.tag);
    }
    grpc_completion_queue_destroy(s->req_cq);
    s->req_cq = NULL;
  }
  if (s->wake_channel != NULL) {
    grpc_channel_destroy(s->wake_channel);
    s->wake_channel = NULL;
  }
  destroy_queue(s->shutdown_cq);
  s->shutdown_cq = NULL;
  destroy_queue(s->watch_cq);
  s->watch_cq = NULL;
}


/* Shut the gRPC server down, give calls `grace` seconds, then cancel them. */
static void shutdown_server(sl_server *s, double grace) {
  int tag;
  grpc_event ev;
  pthread_mutex_lock(&s->req_mu); /* no request for a call from now on: see requests_closed */
  s->requests_closed = 1;
  pthread_mutex_unlock(&s->req_mu);
  pthread_mutex_lock(&s->park_mu); /* parked workers go back for their failed requests */
  atomic_store(&s->park_stop, 1);
  pthread_cond_broadcast(&s->park_cv);
  pthread_mutex_unlock(&s->park_mu);
  grpc_server_shutdown_and_notify(s->server, s->shutdown_cq, &tag);
  ev = grpc_completion_queue_next(s->shutdown_cq, sl__deadline_in(grace > 0 ? grace : 1e-6),
                                  NULL);
  if (ev.type != GRPC_OP_COMPLETE) {
    grpc_server_cancel_all_calls(s->server);
    abandon_deferred(s); /* a deferred call keeps its connection, hence the shutdown, open */
    wait_tag(s->shutdown_cq, &tag);
  }
}

static void stop_finisher(sl_server *s) {
  if (!s->finisher_started) return;
  pthread_mutex_lock(&s->mu);
  s->finisher_stop = 1;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  pthread_join(s->finisher, NULL);
  s->finisher_started = 0;
}

/* End the Watch streams, shut gRPC down (calls get `grace` seconds), and join
 * every thread. */
static void shutdown_and_join(sl_server *s, double grace) {
  atomic_store(&s->watch_ending, 1);
  shutdown_server(s, grace);
  for (int i = 0; i < s->max_workers; i++) {
    if (s->workers[i].started) pthread_join(s->workers[i].thread, NULL);
    s->workers[i].started = 0;
  }
  if (s->watch_started) pthread_join(s->watch_thread, NULL);
  s->watch_started = 0;
}

int sl_server_start(sl_server *s, sl_err *err) {
  int status = SL_EINVAL;
  char addr[512];
  grpc_server_credentials *creds = NULL;
  int started = 0;

  pthread_mutex_lock(&s->mu);
  if (s->state != ST_CREATED) {
    pthread_mutex_unlock(&s->mu);
    return sl_err_set(err, SL_ESTATE, SL_STATUS_FAILED_PRECONDITION,
                      "the server was already started");
  }
  s->state = ST_RUNNING; /* claimed; reset below on failure */
  pthread_mutex_unlock(&s->mu);
  sl_malloc_tune(); /* large messages: see tensor.h */

  if (strncmp(s->host, "unix:", 5) == 0 || strncmp(s->host, "unix-abstract:", 14) == 0) {
    snprintf(addr, sizeof(addr), "%s", s->host); /* a socket path: no port */
  } else if (strchr(s->host, ':') != NULL && s->host[0] != '[') {
    snprintf(addr, sizeof(addr), "[%s]:%d", s->host, s->port_req);
  } else {
    snprintf(addr, sizeof(addr), "%s:%d", s->host, s->port_req);
  }
  s->server = grpc_server_create(&s->chargs, NULL);
  s->shutdown_cq = grpc_completion_queue_create_for_next(NULL);
  if (s->server == NULL || s->shutdown_cq == NULL) {
    status = sl_err_set(err, SL_EGRPC, SL_STATUS_INTERNAL, "could not create the gRPC server");
    goto cleanup;
  }
  grpc_server_register_completion_queue(s->server, s->shutdown_cq, NULL);
  s->watch_method = grpc_server_register_method(s->server, METHOD_STD_WATCH, NULL,
                                                GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
  s->watch_cq = grpc_completion_queue_create_for_next(NULL);
  if (s->watch_method == NULL || s->watch_cq == NULL) {
    status = sl_err_set(err, SL_EGRPC, SL_STATUS_INTERNAL, "could not set up Health/Watch");
    goto cleanup;
  }
  grpc_server_register_completion_queue(s->server, s->watch_cq, NULL);
  s->req_cq = grpc_completion_queue_create_for_next(NULL);
  if (s->req_cq == NULL) {
    status = sl_err_set(err, SL_EGRPC, SL_STATUS_INTERNAL, "could not create a completion queue");
    goto cleanup;
  }
  grpc_server_register_completion_queue(s->server, s->req_cq, NULL);
  /* NULL: streams move with idle workers in gRPC (slower, not wrong) */
  s->wake_channel = grpc_lame_client_channel_create(NULL, GRPC_STATUS_UNAVAILABLE, "wake");
  for (int i = 0; i < s->max_workers; i++) s->workers[i].srv = s;
  creds = s->creds != NULL ? s->creds : grpc_insecure_server_credentials_create();
  s->creds = NULL; /* grpc_server_add_http2_port does not take it; released below */
  s->port = grpc_server_add_http2_port(s->server, addr, creds);
  if (s->port == 0) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_UNAVAILABLE,
                        "could not bind %s (address in use, or not an address of this host)",
                        addr);
    goto cleanup;
  }
  atomic_store(&s->park_stop, 0);
  grpc_server_start(s->server);
  started = 1;
  s->started_at = sl_now();
  atomic_store(&s->serving, 1);
  if (pthread_create(&s->watch_thread, NULL, watch_main, s) != 0) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                        "could not start the health watch thread");
    goto cleanup;
  }
  s->watch_started = 1;
  for (int i = 0; i < s->max_workers; i++) {
    if (pthread_create(&s->workers[i].thread, NULL, worker_main, &s->workers[i]) != 0) {
      status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                          "could not start worker thread %d of %d", i + 1, s->max_workers);
      goto cleanup;
    }
    s->workers[i].started = 1;
  }
  if (pthread_create(&s->finisher, NULL, finisher_main, s) != 0) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                        "could not start the finisher thread");
    goto cleanup;
  }
  s->finisher_started = 1;
  status = SL_OK;
cleanup:
  if (creds != NULL) grpc_server_credentials_release(creds);
  if (status != SL_OK) {
    atomic_store(&s->serving, 0);
    if (started) shutdown_and_join(s, 0);
    stop_finisher(s);
    if (!started && s->server != NULL) {
      /* a server never started is destroyed without shutdown */
    }
    teardown_grpc(s);
    pthread_mutex_lock(&s->mu);
    s->state = ST_STOPPED;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
  }
  return status;
}

int sl_server_port(const sl_server *s) { return s->port; }

void sl_server_stop(sl_server *s, double grace) {
  pthread_mutex_lock(&s->mu);
  if (s->state == ST_CREATED) {
    s->state = ST_STOPPED;
    pthread_cond_broadcast(&s->cv);
  }
  if (s->state != ST_RUNNING) {
    while (s->state != ST_STOPPED) pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return;
  }
  s->state = ST_STOPPING;
  atomic_store(&s->serving, 0);
  /* drain: let the Compute calls in flight finish, at most `grace` seconds */
  {
    double end = sl_now() + (grace > 0 ? grace : 0);
    while (atomic_load(&s->in_flight) > 0 && sl_now() < end) {
      struct timespec ts;
      double left = end - sl_now();
      if (left > 0.05) left = 0.05;
      sl_deadline_timespec(left, &ts);
      pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    /* settle (see SETTLE_QUIET_S) */
    double settle_end = sl_now() + SETTLE_MAX_S < end ? sl_now() + SETTLE_MAX_S : end;
    while (sl_now() < settle_end &&
           sl_now() - (double)atomic_load(&s->last_call_us) * 1e-6 < SETTLE_QUIET_S) {
      struct timespec ts;
      sl_deadline_timespec(0.01, &ts);
      pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    grace = end - sl_now();
  }
  pthread_mutex_unlock(&s->mu);

  shutdown_and_join(s, grace);
  abandon_deferred(s);
  stop_finisher(s);
  teardown_grpc(s);

  pthread_mutex_lock(&s->mu);
  s->state = ST_STOPPED;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

int sl_server_wait(sl_server *s, double timeout) {
  int status = SL_OK;
  pthread_mutex_lock(&s->mu);
  if (timeout < 0) {
    while (s->state != ST_STOPPED) pthread_cond_wait(&s->cv, &s->mu);
  } else {
    struct timespec ts;
    sl_deadline_timespec(timeout, &ts);
    while (s->state != ST_STOPPED) {
      if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) != 0) break;
    }
    if (s->state != ST_STOPPED) status = SL_ETIMEDOUT;
  }
  pthread_mutex_unlock(&s->mu);
  return status;
}

int sl_server_is_serving(const sl_server *s) { return atomic_load(&s->serving); }

int sl_server_in_flight(const sl_server *s) { return atomic_load(&s->in_flight); }

void sl_server_metrics(sl_server *s, sl_metrics_snapshot *out) {
  sl_metrics_snapshot_take(s->metrics, out);
}

int sl_server_access_log_enable(sl_server *s, size_t capacity) {
  return sl_metrics_access_log_enable(s->metrics, capacity);
}

size_t sl_server_access_log_take(sl_server *s, sl_call_record *out, size_t max, double timeout) {
  return sl_metrics_access_log_take(s->metrics, out, max, timeout);
}

int64_t sl_server_total_requests(const sl_server *s) { return atomic_load(&s->total_requests); }

long sl_server_shm_segments(sl_server *s) {
  if (s->shm == NULL) return -1;
  sl_shm_table_sweep(s->shm);
  return (long)sl_shm_table_count(s->shm);
}

void sl_server_destroy(sl_server *s) {
  if (s == NULL) return;
  sl_server_stop(s, 0);
  sl__channel_args_free(&s->chargs);
  if (s->grpc_inited) grpc_shutdown();
  pthread_mutex_destroy(&s->mu);
  pthread_mutex_destroy(&s->req_mu);
  pthread_mutex_destroy(&s->park_mu);
  pthread_cond_destroy(&s->park_cv);
  pthread_cond_destroy(&s->cv);
  sl_metrics_destroy(s->metrics);
  sl_shm_table_free(s->shm);
  for (size_t i = 0; i < s->n_tokens; i++) free(s->tokens[i]);
  free(s->tokens);
  free(s->token_lens);
  if (s->creds != NULL) grpc_server_credentials_release(s->creds);
  sl_codec_destroy(s->codec);
  sl_codecs_unref(s->codecs);
  free(s->workers);
  free(s->host);
  free(s->version);
  free(s);
}
