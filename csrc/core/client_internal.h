/* client_internal.h: internal to the C core (client.c and async_client.c); not a
 * public header. */
#ifndef SL_CLIENT_INTERNAL_H
#define SL_CLIENT_INTERNAL_H

#include <grpc/grpc.h>

#include "client.h"

#include "shm.h"

/* The client's channel (borrowed: valid until sl_client_destroy). */
grpc_channel *sl__client_channel(sl_client *c);

/* The same-host channel for an asynchronous call (shm.h, docs/shm.md).
 *
 * sl__client_shm_take: a free segment the server knows, for the request `p`, or
 * NULL (the call goes over the connection). A segment the server does not
 * know yet is offered on a HealthCheck first (blocking: once per segment), with
 * `o`'s metadata.
 * sl__client_shm_reply: after an attempt that posted its request in `seg`, strip the
 * sl-shm entries from `st`'s trailing metadata; 1 when the reply is in the segment
 * (*span), 0 when not (*unknown: the server did not know the segment), -1 when it
 * is over the client's receive limit (`st` then says so).
 * sl__client_shm_reply_hint: a reply of `len` bytes came over the connection: size
 * later segments for it.
 * sl__client_shm_give: hand the segment back (`reusable` 0: drop it; `forget`: the
 * server did not know it, so none of the pool is known any more). */
sl_shm_seg *sl__client_shm_take(sl_client *c, const sl_call_opts *o, const sl_payload *p);
int sl__client_shm_reply(sl_client *c, sl_shm_seg *seg, sl_call_status *st, sl_span *span,
                         int *unknown);
void sl__client_shm_reply_hint(sl_client *c, size_t len);
void sl__client_shm_give(sl_client *c, sl_shm_seg *seg, int reusable, int forget);

#endif /* SL_CLIENT_INTERNAL_H */
