/* stream.h: a tensor message carried as a stream of chunks (the ComputeStream and
 * ComputeBackwardStream methods, docs/protocol.md).
 *
 * The bytes of the chunks, concatenated, are exactly the serialized unary message
 * (ComputeRequest, BackwardRequest, or their responses). Each chunk is a `Chunk`
 * message: one `bytes data = 1` field holding the next piece (an empty chunk is
 * allowed). A sender cuts its message anywhere; nothing is aligned to fields.
 *
 * Receiving (sl_stream_rx): each chunk is fed as it arrives. A scanner walks the
 * top-level fields of the message across chunk boundaries; the contents of every
 * tensor-byte field (field 1: data / grad_output_data / grad_input_data, and
 * field 20: tensor_data) are copied straight into their own fresh 64-byte aligned
 * storage, allocated when the field's length prefix arrives; every other byte
 * (tags, lengths, descriptors, structure, metadata, the original's KV cache
 * entries) goes into a small header buffer. At the end, sl_stream_rx_spans() gives
 * the whole message as spans (header pieces and the tensor storages, in wire order)
 * plus, parallel to them, the storages that sl_tensor_msg_read_adopt() may take
 * over instead of copying: the receive path keeps its one copy per tensor, done
 * chunk by chunk while the next chunk is on the wire.
 *
 * Sending: sl_stream_chunks() counts the chunks of a payload; the transport glue
 * (transport.h: sl__payload_chunk_byte_buffer) makes each chunk's byte buffer,
 * referencing the tensor bytes (0 copies).
 *
 * Ownership (sl_common.h): the rx owns its header buffer and storages until a
 * reader adopts a storage (it then sets the slot to NULL); sl_stream_rx_clear()
 * frees what is left, on every path.
 */
#ifndef SL_STREAM_H
#define SL_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"
#include "wire.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Piece of a message per chunk (bytes of the Chunk's data field) when none is
 * set: an eighth of the message, within [SL_STREAM_CHUNK_MIN, SL_STREAM_CHUNK_MAX]
 * (sl_stream_chunk_for): enough chunks for the copies to overlap the transfer, few
 * enough that the per-chunk cost stays small (benchmarks/results.md). */
#define SL_STREAM_CHUNK_DEFAULT ((size_t)0)
#define SL_STREAM_CHUNK_MIN ((size_t)512 << 10)
#define SL_STREAM_CHUNK_MAX (((size_t)4 << 20) - 64) /* a Chunk message stays under 4 MiB,
                                                         other gRPC stacks' default limit */
/* Default message size from which our client streams (settable per client). */
#define SL_STREAM_THRESHOLD_DEFAULT ((size_t)4 << 20)

typedef struct sl_stream_piece {
  size_t hdr_end; /* header bytes that come before this tensor field's contents */
  void *data;     /* owned storage (sl_storage_free), or NULL once adopted */
  size_t len;
} sl_stream_piece;

typedef struct sl_stream_rx {
  size_t max_bytes;   /* the most message bytes accepted */
  size_t total;       /* message bytes fed so far */
  size_t chunks;      /* chunks fed */
  int state;          /* scanner state (stream.c) */
  uint64_t acc;       /* varint being read */
  int shift;
  uint32_t field;     /* the current field */
  size_t remaining;   /* bytes left of the current field's contents or fixed value */
  uint8_t *hdr;       /* malloc'd; every byte but the tensor fields' contents */
  size_t hdr_len, hdr_cap;
  sl_stream_piece *pieces; /* malloc'd, in wire order */
  size_t n_pieces, cap_pieces;
  /* filled by sl_stream_rx_spans */
  sl_span *spans;
  void **owned;       /* parallel to spans: the storage a reader may adopt, or NULL */
  size_t n_spans;
} sl_stream_rx;

/* Start receiving a message of at most `max_bytes` bytes (the server's
 * max_decoded_bytes, or a client's bound). */
void sl_stream_rx_init(sl_stream_rx *rx, size_t max_bytes);

/* Feed one received Chunk message (as spans). Fails with INVALID_ARGUMENT (a
 * malformed chunk, a malformed message so far: a bad tag, a group, a varint over
 * 10 bytes) or RESOURCE_EXHAUSTED (the message would pass max_bytes, or a storage
 * could not be allocated). After a failure the rx is only to be cleared. */
int sl_stream_rx_feed_chunk(sl_stream_rx *rx, const sl_span *spans, size_t nspans, sl_err *err);

/* Feed message bytes directly (the contents of a Chunk's data field). */
int sl_stream_rx_feed(sl_stream_rx *rx, const uint8_t *p, size_t len, sl_err *err);

/* The stream ended: check that the message ended on a field boundary and build
 * rx->spans / rx->owned / rx->n_spans (valid until sl_stream_rx_clear). */
int sl_stream_rx_spans(sl_stream_rx *rx, sl_err *err);

/* Free everything not adopted. The rx may be initialized again afterwards. */
void sl_stream_rx_clear(sl_stream_rx *rx);

/* The piece per chunk for a message of `total` bytes: `chunk`, or when it is 0
 * the default above. */
size_t sl_stream_chunk_for(size_t total, size_t chunk);

/* Number of chunks a message of `total` bytes is cut into with pieces of `chunk`
 * bytes (0: sl_stream_chunk_for's), at least 1. */
size_t sl_stream_chunks(size_t total, size_t chunk);

/* Write the prefix of a Chunk carrying `len` bytes (tag and length) into out;
 * returns its length. */
size_t sl_stream_chunk_prefix(size_t len, uint8_t out[SL_WIRE_PREFIX_MAX]);

#ifdef __cplusplus
}
#endif

#endif /* SL_STREAM_H */
