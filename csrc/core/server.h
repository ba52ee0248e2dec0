/* server.h: the splitlearn-comm server on the gRPC C core.
 *
 * `max_workers` pthreads serve calls; each owns a completion queue and serves one
 * call at a time from request to status, so at most max_workers calls run user
 * code at once and the rest wait inside gRPC. The server answers
 * splitlearn.comm.ComputeService (Compute, HealthCheck, GetServiceInfo;
 * ComputeBackward answers UNIMPLEMENTED until a compute function supports it) and
 * grpc.health.v1.Health/Check.
 *
 * User code is reached only through the hooks (sl_server_hooks), each called on a
 * worker thread with `user`. The core never takes any lock of the caller's
 * (such as Python's GIL); hooks take what they need.
 */
#ifndef SL_SERVER_H
#define SL_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "chanargs.h"
#include "message.h"
#include "payload.h"
#include "sl_common.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_server sl_server;

/* What a hook may know about the call it serves. Every pointer is owned by the
 * server and valid only during the hook. */
typedef struct sl_call_info {
  const char *method;            /* full method path, "/splitlearn.comm.ComputeService/Compute" */
  const char *peer;              /* "ipv4:127.0.0.1:40000" */
  double deadline;               /* sl_now()-clock deadline; 0 when none */
  const sl_kv *metadata;         /* invocation metadata */
  size_t n_metadata;
} sl_call_info;

/* The in/out record of the compute hook. */
typedef struct sl_compute_args {
  /* in */
  sl_tensor_msg *tensor;         /* received tensor; the hook may take tensor->data
                                    (then it sets it to NULL and frees it itself) */
  const sl_kv *req_metadata;     /* the request's metadata map */
  size_t n_req_metadata;
  int has_request_id;
  int32_t request_id;
  /* out, on success */
  sl_tensor_desc out_desc;
  const void *out_data;          /* the result's bytes, owned by out_owner */
  size_t out_nbytes;
  sl_release_fn out_release;     /* called exactly once, from any thread, when the
                                    server is done with out_data (even if sending fails) */
  void *out_owner;
  float compute_time_ms;
} sl_compute_args;

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
} sl_server_hooks;

typedef struct sl_server_config {
  const char *host;        /* "0.0.0.0", "127.0.0.1", "::", "localhost" */
  int port;                /* 0: the OS picks; see sl_server_port() */
  int max_workers;         /* >= 1 */
  const char *version;     /* reported by HealthCheck and GetServiceInfo */
  const sl_chan_arg *args; /* gRPC channel arguments; copied */
  size_t nargs;
} sl_server_config;

/* Create a server (nothing is bound yet). The config is copied; `hooks` is copied;
 * `user` is passed to every hook and must outlive the server. */
int sl_server_create(const sl_server_config *cfg, const sl_server_hooks *hooks, void *user,
                     sl_server **out, sl_err *err);

/* Bind, start the gRPC server and the workers; returns at once. A port that
 * cannot be bound (in use, bad host) fails with SL_EINVAL and a message naming the
 * address. May be called once. */
int sl_server_start(sl_server *s, sl_err *err);

/* The bound port (valid after a successful start). */
int sl_server_port(const sl_server *s);

/* Stop: new calls are refused, calls in flight get `grace` seconds to finish,
 * then are cancelled; returns when every worker has exited. Safe to call from
 * several threads and more than once. Must not be called from a hook. */
void sl_server_stop(sl_server *s, double grace);

/* Wait until the server has stopped, at most `timeout` seconds (< 0: forever).
 * Returns SL_OK when stopped, SL_ETIMEDOUT otherwise. */
int sl_server_wait(sl_server *s, double timeout);

/* 1 while running and serving. */
int sl_server_is_serving(const sl_server *s);

/* Calls of Compute served so far. */
int64_t sl_server_total_requests(const sl_server *s);

/* Stop (grace 0) if needed and free everything. */
void sl_server_destroy(sl_server *s);

#ifdef __cplusplus
}
#endif

#endif /* SL_SERVER_H */
