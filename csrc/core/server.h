/* server.h: the splitlearn-comm server on the gRPC C core.
 *
 * `max_workers` pthreads serve calls; each owns a completion queue and serves one
 * call at a time from request to status, so at most max_workers calls run user
 * code at once and the rest wait inside gRPC. The server answers
 * splitlearn.comm.ComputeService (Compute and ComputeBackward through the
 * compute hook, HealthCheck, GetServiceInfo) and grpc.health.v1.Health/Check and Watch.
 *
 * User code is reached only through the hooks (sl_server_hooks), each called on a
 * worker thread with `user`. The core never takes any lock of the caller's
 * (such as Python's GIL); hooks take what they need.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_SERVER_H
#define SL_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "chanargs.h"
#include "message.h"
#include "metrics.h"
#include "payload.h"
#include "sl_common.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_server sl_server;

/* A Compute or ComputeBackward call whose result comes later (see
 * sl_compute_args.pending and sl_pending_complete). */
typedef struct sl_pending sl_pending;

/* What a hook may know about the call it serves. Every pointer is owned by the
 * server and valid only during the hook. */
typedef struct sl_call_info {
  const char *method;            /* full method path, "/splitlearn.comm.ComputeService/Compute" */
  const char *peer;              /* "ipv4:127.0.0.1:40000" */
  double deadline;               /* sl_now()-clock deadline; 0 when none */
  const sl_kv *metadata;         /* invocation metadata */
  size_t n_metadata;
  void *state;                   /* pass to sl_call_is_active() and sl_call_add_trailing(),
                                    during the hook only */
} sl_call_info;

/* Add a trailing metadata entry to the call's status (sent whether the call ends
 * OK or not). The key and value are copied. SL_OK or SL_ENOMEM. */
int sl_call_add_trailing(void *state, const char *key, const char *value, size_t value_len);

/* 0 once the call was cancelled (the client went away or gave up, its deadline
 * passed, or the server is stopping): the result would reach no one, so a long
 * computation may stop early. 1 otherwise. Call it only from the thread running
 * the hook, with the hook's call->state. */
int sl_call_is_active(void *state);

/* The in/out record of the compute hook. */
typedef struct sl_compute_args {
  /* in */
  sl_tensor_msg *tensor;         /* the received tensors (items; nodes in the structure form).
                                    Every item is decoded (decoded = 1): its data holds the
                                    tensor, whatever codec (built in, or one of the config's
                                    custom `codecs`) item->codec names. The hook may take an
                                    item's data with sl_tensor_item_take (message.h), and
                                    lets go of it through the release it gets: the bytes
                                    may be lent by a shared-memory segment */
  int backward;                  /* 0: Compute; 1: ComputeBackward (the tensors are the
                                    gradients of the forward's outputs) */
  sl_call_fields fields;         /* forward_id, training_mode, learning_rate, use_cache, ... */
  const sl_kv *req_metadata;     /* the request's metadata map (Compute only) */
  size_t n_req_metadata;
  int has_request_id;
  int32_t request_id;
  /* out, on success: the results. An item with codec NULL (and encoded 0) lets the
     server choose: the config's codec, else the request's codec (built in or custom)
     when it takes the item's dtype, else raw. Each item's release(owner) runs exactly
     once, from any thread, even if sending fails. The arrays of `out` (items,
     nodes, their strings) belong to the hook: out_free(out_owner), when set, runs
     once after the reply was packed, on every path, even when the hook failed. */
  sl_tensor_set out;
  void (*out_free)(void *out_owner);
  void *out_owner;
  float compute_time_ms;
  double queue_seconds;          /* out, optional: time the hook waited before it could run
                                    user code (e.g. for the GIL); counted apart from compute */
  sl_pending *pending;           /* in: the hook may defer the call: keep this, return
                                    SL_EAGAIN, and call sl_pending_complete() exactly once
                                    later, from any thread. The worker serves other calls
                                    meanwhile. call->state stays valid (for
                                    sl_call_is_active / sl_call_add_trailing, from one
                                    thread at a time) until then; nothing else of `call`
                                    or `args` does. */
} sl_compute_args;

/* Finish a deferred call: `status` SL_OK with `out` (the results, as the hook would
 * have set args->out; each item's release runs exactly once, from any thread) and
 * the compute time, or a negative status with `err` naming the gRPC code and
 * message. `out_free(out_owner)`, when set, runs once after `out`'s arrays and
 * strings are no longer needed (as args->out_free), on every path.
 * Returns at once: one finisher thread of the server sends the response. When the
 * server stopped meanwhile (it answered UNAVAILABLE after its grace period), the
 * result is released and dropped. `p` is invalid afterwards. */
void sl_pending_complete(sl_pending *p, int status, const sl_err *err, const sl_tensor_set *out,
                         void (*out_free)(void *out_owner), void *out_owner,
                         float compute_time_ms);

/* Result of the service-info hook: strings are malloc'd by the hook and freed by
 * the server (sl_service_info_clear). */
typedef struct sl_service_info {
  char *service_name;
  char *device;
  sl_kv *custom; /* key and value malloc'd, array malloc'd */
  size_t n_custom;
} sl_service_info;

void sl_service_info_clear(sl_service_info *info);

typedef struct sl_server_hooks {
  /* Called on a worker thread as it starts and as it ends (may be NULL). */
  void (*worker_start)(void *user);
  void (*worker_stop)(void *user);
  /* Serve one Compute call. Return SL_OK with the out fields set, or a negative
   * status with `err` naming the gRPC code and message the client receives. */
  int (*compute)(void *user, const sl_call_info *call, sl_compute_args *args, sl_err *err);
  /* Fill the service info (GetServiceInfo). NULL: name "splitlearn-comm", device "cpu". */
  int (*service_info)(void *user, sl_service_info *out, sl_err *err);
  /* Called for every call before it is served (interceptors); NULL: none. A
   * negative return ends the call with err's code and message. */
  int (*intercept)(void *user, const sl_call_info *call, sl_err *err);
} sl_server_hooks;

/* TLS for a server: PEM strings, copied. */
typedef struct sl_tls_server {
  const char *cert_chain;   /* the server's certificate chain */
  const char *private_key;  /* its key */
  const char *root_certs;   /* CAs that sign client certificates (mutual TLS); NULL: none */
  int require_client_auth;  /* 1: clients must present a certificate signed by root_certs */
} sl_tls_server;

typedef struct sl_server_config {
  const char *host;        /* "0.0.0.0", "127.0.0.1", "::", "localhost" */
  sl_codec *codec;         /* codec of responses (the server takes a reference); NULL:
                              answer with the request's codec */
  sl_codecs *codecs;       /* custom codecs requests may use, besides the built-ins (the
                              server takes a reference); NULL: built-ins only */
  int port;                /* 0: the OS picks; see sl_server_port() */
  int max_workers;         /* >= 1 */
  const char *version;     /* reported by HealthCheck and GetServiceInfo */
  const sl_chan_arg *args; /* gRPC channel arguments; copied */
  size_t nargs;
  const char *const *auth_tokens; /* accepted "authorization" metadata values; copied.
                                     None: no check. The standard health check is exempt. */
  size_t n_auth_tokens;
  const sl_tls_server *tls;       /* NULL: plaintext */
  size_t max_decoded_bytes;       /* bytes that codec payloads may decode to, per
                                     call (all its tensors) and for all calls at once;
                                     0: 4 GiB */
  size_t max_tensors;             /* named tensors per request; 0: SL_DEFAULT_MAX_TENSORS */
  int max_depth;                  /* structure nesting per request; 0: SL_DEFAULT_MAX_DEPTH */
} sl_server_config;

/* Create a server (nothing is bound yet). The config is copied (the server takes
 * references to cfg->codec and cfg->codecs); `hooks` is copied; `user` is passed to
 * every hook and must outlive the server. */
int sl_server_create(const sl_server_config *cfg, const sl_server_hooks *hooks, void *user,
                     sl_server **out, sl_err *err);

/* Bind, start the gRPC server and the workers; returns at once. A port that
 * cannot be bound (in use, bad host) fails with SL_EINVAL and a message naming the
 * address. May be called once. */
int sl_server_start(sl_server *s, sl_err *err);

/* The bound port (valid after a successful start). */
int sl_server_port(const sl_server *s);

/* Stop gracefully. First the server drains: health checks answer NOT_SERVING
 * ("unhealthy"), new Compute calls get UNAVAILABLE, and the calls in flight get
 * up to `grace` seconds to finish; then, still within `grace` and for at most 1 s,
 * it waits until no call has come for 100 ms (clients watching the health status
 * have moved away), so that no call is left queued. Then gRPC is shut down, whatever is still
 * running is cancelled, and this returns once every worker has exited. Safe to
 * call from several threads and more than once. Must not be called from a hook. */
void sl_server_stop(sl_server *s, double grace);

/* Wait until the server has stopped, at most `timeout` seconds (< 0: forever).
 * Returns SL_OK when stopped, SL_ETIMEDOUT otherwise. */
int sl_server_wait(sl_server *s, double timeout);

/* 1 while running and serving. */
int sl_server_is_serving(const sl_server *s);

/* Set what grpc.health.v1 (Check and Watch) and HealthCheck report while the
 * server runs: serving = 0 makes it NOT_SERVING, so that clients balancing with
 * client-side health checking send it no new calls (calls that still come are
 * served); 1 makes it SERVING again. Watch streams see the change within about
 * 50 ms. A stopping server is NOT_SERVING whatever was set. Returns SL_ESTATE
 * when the server is not running. */
int sl_server_set_health(sl_server *s, int serving);

/* 1 when grpc.health.v1 reports SERVING. */
int sl_server_health(const sl_server *s);

/* grpc.health.v1.Health/Watch streams open right now. */
int sl_server_health_watchers(const sl_server *s);

/* Compute calls being served right now. */
int sl_server_in_flight(const sl_server *s);

/* A snapshot of the server's metrics (see metrics.h). */
void sl_server_metrics(sl_server *s, sl_metrics_snapshot *out);

/* Turn the access log on (keeping at most `capacity` records until taken). */
int sl_server_access_log_enable(sl_server *s, size_t capacity);

/* Take up to `max` access log records, waiting at most `timeout` seconds. */
size_t sl_server_access_log_take(sl_server *s, sl_call_record *out, size_t max, double timeout);

/* Calls of Compute served so far. */
int64_t sl_server_total_requests(const sl_server *s);

/* The clients' shared-memory segments the server maps now, after unmapping those
 * of clients that closed them or died (shm.h); -1 when shared memory is disabled
 * (SPLITLEARN_SHM=0 when the server was created). */
long sl_server_shm_segments(sl_server *s);

/* Stop (grace 0) if needed and free everything. */
void sl_server_destroy(sl_server *s);

#ifdef __cplusplus
}
#endif

#endif /* SL_SERVER_H */
