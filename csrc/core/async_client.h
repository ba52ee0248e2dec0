/* async_client.h: calls in flight while the caller works (Compute and
 * ComputeBackward started now, finished later).
 *
 * An sl_async belongs to one sl_client. It owns one gRPC completion queue and one
 * completion thread that polls it: every call started through it is bound to that
 * queue, so any number of calls may be in flight with no thread per call. When a
 * call ends (after its retries), the completion thread runs the call's `done`
 * callback once, with no lock of ours held. Retries, deadlines, metadata,
 * wait-for-ready and the circuit breaker follow the same rules as
 * sl_client_compute(); retry sleeps are timers of the completion thread.
 *
 * Ownership: sl_async_compute_start() returns a handle holding one reference to
 * the call; the engine holds another until `done` has run. Drop yours with
 * sl_async_call_unref() (before or after `done`). No function here touches
 * Python; the binding's `done` takes what locks it needs.
 */
#ifndef SL_ASYNC_CLIENT_H
#define SL_ASYNC_CLIENT_H

#include "client.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_async sl_async;
typedef struct sl_async_call sl_async_call;

/* The outcome of an asynchronous call, handed to `done`. `rc` is what
 * sl_client_compute() would have returned: SL_OK (`out` and `extra` hold the
 * result), SL_ESTATUS (`st` holds the non-OK status; CANCELLED with "cancelled
 * by the caller" after sl_async_call_cancel(), or "the client was closed ..."
 * after sl_async_destroy()), or a local failure described by `err`. `done` owns
 * `out` and `st` and must clear them (sl_tensor_msg_clear, sl_call_status_clear). */
typedef struct sl_async_result {
  int rc;
  sl_tensor_msg out;
  sl_compute_extra extra;
  sl_call_status st;
  sl_err err;
} sl_async_result;

/* Called on the completion thread (never on the thread that started the call),
 * once per started call, with no lock of the engine held. */
typedef void (*sl_async_done_fn)(void *user, sl_async_result *res);

/* Called on the completion thread as it starts and as it ends (either may be
 * NULL), with `user`: the binding keeps one Python thread state for the thread's
 * whole life instead of one per callback. */
typedef void (*sl_async_thread_fn)(void *user);

/* Create the engine of client `c` (borrowed: it must outlive the engine) and start
 * its completion thread. SL_OK, SL_ENOMEM or SL_EGRPC. */
int sl_async_create(sl_client *c, sl_async_thread_fn thread_start, sl_async_thread_fn thread_stop,
                    void *user, sl_async **out, sl_err *err);

/* Keep the engine's memory alive across a call made while another thread may run
 * sl_async_destroy() (the binding retains it before letting go of the GIL around
 * sl_async_compute_start). A destroyed engine refuses new calls with SL_ESTATE;
 * its memory goes with the last release. */
void sl_async_retain(sl_async *a);
void sl_async_release(sl_async *a);

/* Start a Compute (backward = 0) or ComputeBackward (backward = 1) call; returns
 * at once. The arguments mean what they mean for sl_client_compute(), except that
 * opts->interrupt is not used (cancel with sl_async_call_cancel()), opts->on_retry
 * runs on the engine's thread (on_retry_user must live until `done` has run), and
 * opts' metadata and retry policy are copied; opts->breaker is borrowed and must
 * outlive the call (until `done` has run).
 *   On SL_OK, *out is the caller's handle and `done(user, ...)` will run exactly
 * once. On any other return `done` never runs, *out is NULL, `st` says why when
 * the call was refused without a network attempt (SL_ESTATUS: the circuit breaker
 * is open) and `err` for local failures (SL_ESTATE: the engine is closing, a tensor
 * too big, out of memory). Every item's release(owner) runs exactly once on every
 * path, as for sl_client_compute(); `in`'s arrays and strings are needed only
 * until this returns. */
int sl_async_compute_start(sl_async *a, const sl_call_opts *opts, int backward,
                           const sl_tensor_set *in, const sl_call_fields *fields,
                           sl_async_done_fn done, void *user, sl_async_call **out,
                           sl_call_status *st, sl_err *err);

/* Cancel a call in flight: its gRPC call is cancelled (the server sees it as
 * cancelled), a retry sleep ends, and `done` runs with CANCELLED. No effect once
 * `done` has run. Thread-safe; call it from any thread, never after unref, and
 * not while sl_async_destroy() may be freeing the engine (the binding holds the
 * GIL, which `done` needs, so the engine cannot go meanwhile). */
void sl_async_call_cancel(sl_async_call *call);

/* Drop the caller's reference to a call. */
void sl_async_call_unref(sl_async_call *call);

/* Calls started and not yet done. */
size_t sl_async_in_flight(sl_async *a);

/* Close the engine: refuse new calls, cancel those in flight (their `done` runs
 * with CANCELLED, "the client was closed with the call in flight"), wait for every
 * `done` to have run, stop the completion thread and free everything. When called
 * from inside a `done` callback (on the completion thread), it returns at once and
 * the completion thread finishes the work and frees the engine itself. The client
 * must outlive this call; sl_async_call handles stay valid until unref'd. This
 * drops the creator's reference (see sl_async_retain). */
void sl_async_destroy(sl_async *a);

#ifdef __cplusplus
}
#endif

#endif /* SL_ASYNC_CLIENT_H */
