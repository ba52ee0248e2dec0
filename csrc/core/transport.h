/* transport.h: internal to the splitlearn-comm C core; not a public header.
 *
 * Glue between the gRPC C core and the rest of the core: received byte buffers as
 * spans, payloads as byte buffers, metadata and channel arguments.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_TRANSPORT_H
#define SL_TRANSPORT_H

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>

#include "payload.h"
#include "sl_common.h"
#include "tensor.h"
#include "wire.h"

/* The spans of a received byte buffer. Holds a reference on every slice until
 * sl__bbspans_clear(); the byte buffer itself stays owned by the caller. */
typedef struct sl__bbspans {
  grpc_slice *slices;
  sl_span *spans;
  size_t n;
  size_t released; /* bytes sl__bbspans_release() dropped since the allocator was trimmed */
} sl__bbspans;

/* Released bytes after which sl__bbspans_release() gives the allocator's free pages
 * back to the system. */
#define SL_BBSPANS_TRIM_BYTES ((size_t)16 << 20)

int sl__bbspans_init(grpc_byte_buffer *bb, sl__bbspans *out, sl_err *err);
void sl__bbspans_clear(sl__bbspans *s);

/* sl__bbspans_init() that then destroys `*bb` (and sets it to NULL) whatever the
 * outcome, so that the spans hold the only references to the message's memory and
 * sl__bbspans_release() can give it back slice by slice while it is read. */
int sl__bbspans_take(grpc_byte_buffer **bb, sl__bbspans *out, sl_err *err);

/* An sl_span_owner release hook (`user` is the sl__bbspans): drops slice `span`
 * now instead of at sl__bbspans_clear(), and after every SL_BBSPANS_TRIM_BYTES
 * dropped has the allocator return its free pages (sl_storage_trim_allocator). */
void sl__bbspans_release(void *user, size_t span);

/* A new byte buffer for one send of `p`: the header is copied (it is small), the
 * tensor bytes are referenced through a slice that holds a payload reference. The
 * caller owns the returned buffer (grpc_byte_buffer_destroy). NULL when out of
 * memory. */
grpc_byte_buffer *sl__payload_byte_buffer(sl_payload *p);

/* A new byte buffer holding one Chunk (stream.h) of `p`: the message bytes
 * [off, off + len), tensor bytes referenced as in sl__payload_byte_buffer. */
grpc_byte_buffer *sl__payload_chunk_byte_buffer(sl_payload *p, size_t off, size_t len);

/* Read a whole (small) message into one malloc'd buffer. */
int sl__bb_readall(grpc_byte_buffer *bb, uint8_t **out, size_t *len);

/* A channel argument as the public API takes it (see sl_chan_arg in client.h). */
#include "chanargs.h"

/* Build grpc_channel_args from the user's list plus our defaults (no message size
 * limits; for servers, no SO_REUSEPORT), skipping a default the user set. The
 * result is freed with sl__channel_args_free(). */
int sl__channel_args_build(const sl_chan_arg *args, size_t nargs, int for_server,
                           grpc_channel_args *out, sl_err *err);
void sl__channel_args_free(grpc_channel_args *a);

/* Copy a metadata array into malloc'd key/value pairs (keys and values are
 * NUL-terminated copies, value_len keeps binary values). Freed with sl__kv_free. */
int sl__kv_from_metadata(const grpc_metadata_array *md, sl_kv **out, size_t *n);
void sl__kv_free(sl_kv *kv, size_t n);

/* A gRPC slice's bytes as a new NUL-terminated malloc'd string (NULL on OOM). */
char *sl__slice_strdup(grpc_slice s);

/* Seconds from now until `deadline` (negative when past; a large number when
 * infinite). */
double sl__seconds_until(gpr_timespec deadline);

/* Absolute deadline `seconds` from now; infinite when seconds <= 0. */
gpr_timespec sl__deadline_in(double seconds);

#endif /* SL_TRANSPORT_H */
