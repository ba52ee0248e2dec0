/* payload.h: an outgoing message, shared by every attempt that sends it.
 *
 * A payload is an owned, malloc'd block of small bytes (the packed protobuf
 * header and the tag and length prefixes of the tensor fields) interleaved with
 * tensor bytes that are referenced, never copied: block[0, cut[0]), then segment
 * 0, then block[cut[0], cut[1]), then segment 1, ..., then block[cut[n-1], end).
 * The payload is reference counted: whoever creates it holds one reference, each
 * gRPC slice that points at tensor bytes holds another. When the last reference
 * goes, every segment's `release(owner)` runs exactly once, on whichever thread
 * dropped it (the creator's, or a gRPC thread that holds no Python lock): it is
 * how a tensor's owner learns that its memory is free again.
 *
 * Ownership (the rule of sl_common.h): sl_payload_new* own the block and the
 * segments from the call on; when they fail (SL_ENOMEM) they have freed the block
 * and run every segment's release before returning.
 */
#ifndef SL_PAYLOAD_H
#define SL_PAYLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*sl_release_fn)(void *owner);

typedef struct sl_payload sl_payload;

/* Tensor bytes referenced by a payload. */
typedef struct sl_segment {
  const void *data;
  size_t len;
  sl_release_fn release; /* may be NULL */
  void *owner;
} sl_segment;

/* Create a payload of one block and one segment, with one reference held by the
 * caller. Takes ownership of `header` (malloc'd, freed with free()) and of the
 * release; `data` stays owned by `owner` until `release(owner)` runs (release may
 * be NULL), which is at the last unref, or before returning on failure. Returns
 * SL_OK or SL_ENOMEM. */
int sl_payload_new(uint8_t *header, size_t header_len, const void *data, size_t data_len,
                   sl_release_fn release, void *owner, sl_payload **out);

/* The general form: `block` (malloc'd, taken) cut by `cuts` (nsegs increasing
 * offsets into it) around `nsegs` segments (copied; their releases taken). */
int sl_payload_new_segments(uint8_t *block, size_t block_len, const size_t *cuts,
                            const sl_segment *segs, size_t nsegs, sl_payload **out);

void sl_payload_ref(sl_payload *p);

/* Drop one reference; the last one runs every release and frees the payload. */
void sl_payload_unref(sl_payload *p);

/* The pieces in wire order: 2 * nsegs + 1 of them; even pieces are block bytes
 * (possibly empty), odd pieces segment bytes. */
size_t sl_payload_npieces(const sl_payload *p);
const void *sl_payload_piece(const sl_payload *p, size_t i, size_t *len);

/* Accessors of the single-segment form (the block, and segment 0). */
const uint8_t *sl_payload_header(const sl_payload *p, size_t *len);
const void *sl_payload_data(const sl_payload *p, size_t *len);
size_t sl_payload_size(const sl_payload *p); /* every byte of the message */

#ifdef __cplusplus
}
#endif

#endif /* SL_PAYLOAD_H */
