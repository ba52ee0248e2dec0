/* client.h: the splitlearn-comm client on the gRPC C core.
 *
 * One client owns one gRPC channel (one HTTP/2 connection, reconnected by gRPC
 * when it drops); any number of threads may call it at once. Every wait happens in
 * the calling thread, in slices of about 200 ms; between slices the caller's
 * interrupt hook is asked whether to give up (this is how Ctrl-C reaches a
 * blocking call). No function here touches Python; callers release their own
 * locks (the GIL) around them.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_CLIENT_H
#define SL_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "chanargs.h"
#include "message.h"
#include "payload.h"
#include "retry.h"
#include "sl_common.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_client sl_client;

/* Called between wait slices; return nonzero to abandon the call (it is cancelled
 * and the call returns SL_EINTR). */
typedef int (*sl_interrupt_fn)(void *user);

/* Called in the calling thread, without any lock, when an attempt failed and the
 * retry policy will retry it: `method` is the full method path, `code` and
 * `details` the attempt's status (`details` valid only during the call),
 * `attempt` the number of the failed attempt (1 for the first) and `delay` the
 * seconds the client sleeps before the next one. */
typedef void (*sl_retry_fn)(void *user, const char *method, int code, const char *details,
                            int attempt, double delay);

typedef struct sl_call_opts {
  double timeout;            /* overall seconds for all attempts and sleeps; <= 0: none */
  const sl_kv *metadata;     /* request metadata (copied per attempt) */
  size_t n_metadata;
  int wait_for_ready;        /* wait for the server to come up instead of failing fast */
  const sl_retry_policy *retry; /* NULL: a single attempt */
  sl_breaker *breaker;          /* NULL: none; else consulted before and told after the call */
  sl_interrupt_fn interrupt;
  void *interrupt_user;
  sl_retry_fn on_retry;      /* NULL: none; else told of every retry before its delay */
  void *on_retry_user;
  sl_codecs *codecs;         /* custom codecs the reply may use (NULL: built-ins only);
                                borrowed for a blocking call, referenced by an async one */
} sl_call_opts;

/* How a call ended. Strings and arrays are malloc'd; sl_call_status_clear frees. */
typedef struct sl_call_status {
  int code;            /* gRPC status code; SL_STATUS_OK on success */
  char *details;       /* status message ("" when none) */
  sl_kv *trailing;     /* trailing metadata */
  size_t n_trailing;
  sl_kv *initial;      /* initial metadata */
  size_t n_initial;
  char *debug;         /* gRPC's debug error string, or NULL */
  int attempts;        /* attempts made */
  size_t bytes_sent;     /* message bytes sent, all attempts */
  size_t bytes_received; /* message bytes received */
  int transport;         /* sl_transport: how the last attempt sent the request */
} sl_call_status;

void sl_call_status_clear(sl_call_status *st);

/* TLS for a client: PEM strings, copied. */
typedef struct sl_tls_client {
  const char *root_certs;  /* CAs to trust; NULL: the system's */
  const char *cert_chain;  /* client certificate for mutual TLS, or NULL */
  const char *private_key; /* its key, or NULL */
} sl_tls_client;

/* Create a client for `target` ("host:port", any gRPC target), over TLS when `tls`
 * is not NULL. Nothing connects until the first call or sl_client_connect(). */
int sl_client_create(const char *target, const sl_chan_arg *args, size_t nargs,
                     const sl_tls_client *tls, sl_client **out, sl_err *err);

/* Streaming (stream.h, docs/protocol.md): a Compute or ComputeBackward request of
 * `threshold` bytes or more goes to ComputeStream / ComputeBackwardStream as
 * Chunks of `chunk` bytes (0: by the message's size, sl_stream_chunk_for), and the
 * response comes back the same way; SIZE_MAX: never stream. Defaults: SL_STREAM_THRESHOLD_DEFAULT and
 * SL_STREAM_CHUNK_DEFAULT. A server that answers the streaming method with
 * UNIMPLEMENTED gets the same call again on the unary method, and every later
 * call of that direction goes unary on this client. Safe from any thread. */
void sl_client_set_streaming(sl_client *c, size_t threshold, size_t chunk);

/* The settings above, and whether the server refused a streaming method (1). */
void sl_client_streaming(const sl_client *c, size_t *threshold, size_t *chunk, int *no_stream,
                         int *no_stream_backward);

/* Busy polling: a blocking unary call looks for its reply without sleeping (it
 * polls its completion queue, and with it the sockets) for up to `seconds` before
 * it sleeps as usual. A reply that comes meanwhile is read by a thread already
 * running instead of one the kernel has to wake, which on a machine whose idle
 * CPUs sleep costs tens of microseconds per call. It polls only where it pays:
 * after a few polls in a row whose reply came later than the window, the client's
 * calls sleep at once, and poll again only now and then (after 16 calls, then
 * 32, ... up to 1024) to see whether the replies are quick again; one thread of
 * the process polls at a time (the others sleep as usual); and a process that may
 * run on one CPU only (checked here) never polls. 0 turns it off; default SL_BUSY_POLL_DEFAULT
 * (0 when the environment has SPLITLEARN_BUSY_POLL=0).
 * Streamed calls and asynchronous calls do not poll. Safe from any thread. */
#define SL_BUSY_POLL_DEFAULT 200e-6
void sl_client_set_busy_poll(sl_client *c, double seconds);
/* The window in seconds (0: off). */
double sl_client_busy_poll(const sl_client *c);

/* Wait until the channel is ready, at most `timeout` seconds. Returns SL_OK when
 * ready, SL_ETIMEDOUT or SL_EINTR. */
int sl_client_connect(sl_client *c, double timeout, sl_interrupt_fn interrupt, void *user);

/* Extra fields of a Compute request / response. */
typedef struct sl_compute_extra {
  int has_request_id;
  int32_t request_id;
  int has_compute_time_ms;
  float compute_time_ms;
  /* this side's own work (seconds, blocking calls; 0 for asynchronous ones):
   * packing the request (its codecs' encode included, the last attempt's not
   * counted twice: it is packed once) and reading the reply (decoding included) */
  double encode_s, decode_s;
} sl_compute_extra;

/* Send tensors to Compute (backward = 0) or ComputeBackward (backward = 1: the
 * tensors are the gradients of the forward call's outputs, fields->forward_id
 * names that call) and wait for the result. `fields` may be NULL.
 *   `in`: the tensors (one in the single form), each raw or to be encoded in C by
 *   its codec (without any lock), or a payload already encoded by the caller
 *   (item->encoded). The caller keeps each item's data valid until its
 *   release(owner) runs: exactly once, on every return path, possibly after this
 *   function has returned, on any thread (this function always consumes them).
 * On SL_OK, `out` holds the result (caller clears it) and `extra_out` its fields:
 * each item decoded when raw or built in (decoded = 1), otherwise the payload of
 * its codec for the caller to decode. On a non-OK status, returns
 * SL_ESTATUS with `st` filled; SL_EINTR when interrupted; other negative codes
 * with `err` for local failures (a tensor too big for one message, out of memory,
 * an undecodable response). `st` is always filled as far as known. */
int sl_client_compute(sl_client *c, const sl_call_opts *opts, int backward,
                      const sl_tensor_set *in, const sl_call_fields *fields, sl_tensor_msg *out,
                      sl_compute_extra *extra_out, sl_call_status *st, sl_err *err);

/* Result of HealthCheck. Strings malloc'd; sl_health_clear frees. */
typedef struct sl_health {
  char *status;
  char *message;
  char *version;
  int has_uptime;
  float uptime_seconds;
} sl_health;
void sl_health_clear(sl_health *h);

int sl_client_health(sl_client *c, const sl_call_opts *opts, sl_health *out, sl_call_status *st,
                     sl_err *err);

/* Result of GetServiceInfo. Strings malloc'd; sl_info_result_clear frees. */
typedef struct sl_info_result {
  char *service_name;
  char *version;
  char *device;
  int has_uptime;
  float uptime_seconds;
  int64_t total_requests;
  sl_kv *custom;
  size_t n_custom;
} sl_info_result;
void sl_info_result_clear(sl_info_result *r);

int sl_client_service_info(sl_client *c, const sl_call_opts *opts, sl_info_result *out,
                           sl_call_status *st, sl_err *err);

/* grpc.health.v1.Health/Check for `service` ("" for the whole server). `*status`
 * gets the ServingStatus number (1 SERVING, 2 NOT_SERVING). */
int sl_client_std_health(sl_client *c, const sl_call_opts *opts, const char *service, int *status,
                         sl_call_status *st, sl_err *err);

/* The same-host shared-memory channel (shm.h, docs/shm.md). A client made for a
 * target on this host (sl_shm_target_is_local, no TLS, SPLITLEARN_SHM not "0")
 * offers the server a segment on its first tensor call; when the server attaches
 * it, later tensor calls carry their bytes through segments. sl_client_set_shm(c,
 * 0) turns it off for this client (before its first call). */
void sl_client_set_shm(sl_client *c, int enable);
/* state: -1 off (disabled, not local, or refused), 0 not decided yet, 1 in use;
 * segments: held now; calls: tensor calls that went through a segment. */
void sl_client_shm_stats(sl_client *c, int *state, size_t *segments, long long *calls);
/* A change of the channel's state worth a debug log line, once: copies it into
 * buf and returns 1, or returns 0. */
int sl_client_shm_note(sl_client *c, char *buf, size_t n);

/* A client is reference counted: sl_client_create() returns it with one reference
 * (the creator's), sl_client_destroy() drops that one. A caller that uses the
 * client while another thread may destroy it (a call in flight while the owner
 * closes it) holds its own reference: sl_client_retain() before, and
 * sl_client_release() after, the call. The channel goes with the last reference.
 * Both are safe from any thread; NULL is a no-op. */
void sl_client_retain(sl_client *c);
void sl_client_release(sl_client *c);
void sl_client_destroy(sl_client *c);

#ifdef __cplusplus
}
#endif

#endif /* SL_CLIENT_H */
