/* wire.h: the tensor-aware protobuf reader and writer.
 *
 * A received gRPC message is a list of spans (slices of at most 64 KiB, at
 * arbitrary boundaries). protobuf-c needs one contiguous buffer and copies
 * `bytes` fields, so the tensor bytes must never go through it. sl_wire_split()
 * walks the top-level fields of a message across the spans, copies every field
 * except the tensor field into a small contiguous header (for protobuf-c), and
 * records where the tensor bytes are; sl_wire_copy_data() then copies them once,
 * straight into the final storage.
 *
 * Sending is the mirror image: the packed header, then a tag and length prefix
 * (sl_wire_data_prefix), then the tensor bytes referenced, not copied.
 *
 * Nothing here knows gRPC or Python: input is plain (pointer, length) spans.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SL_WIRE_H
#define SL_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A read-only view of bytes owned by someone else. */
typedef struct sl_span {
  const uint8_t *ptr;
  size_t len;
} sl_span;

/* Where one length-delimited field's contents lie in a list of spans. */
typedef struct sl_wire_occ {
  uint32_t field;      /* its field number */
  size_t span;         /* index of the span where its contents start */
  size_t off;          /* offset of its first byte in that span */
  size_t len;          /* its length in bytes */
} sl_wire_occ;

typedef struct sl_wire_split_result {
  uint8_t *header;     /* malloc'd copy of every other field; caller frees with free() */
  size_t header_len;
  int data_found;      /* the tensor field was present */
  size_t data_len;     /* its length in bytes (0 when absent) */
  size_t data_span;    /* index of the span where the tensor bytes start */
  size_t data_off;     /* offset of the first tensor byte in that span */
  sl_wire_occ *occ;    /* malloc'd: every occurrence of the bulk fields, in wire order */
  size_t n_occ;
} sl_wire_split_result;

/* Split a protobuf message given as `nspans` spans into its tensor field number
 * `data_field` (a length-delimited field) and everything else. On success the
 * caller owns result->header. A truncated or malformed message, a group, or a
 * tensor field with the wrong wire type fails with SL_EINVAL and an
 * INVALID_ARGUMENT message naming the byte offset. When the field occurs more than
 * once, the last occurrence wins (protobuf's rule). Never allocates more than the
 * message's own length. */
int sl_wire_split(const sl_span *spans, size_t nspans, uint32_t data_field,
                  sl_wire_split_result *result, sl_err *err);

/* The padding field (number 100, reserved in proto/): filler that a sender may put
 * before a tensor so that its bytes start aligned (shm.c). Length-delimited. */
#define SL_WIRE_PAD_FIELD 100u

/* sl_wire_split() that also leaves out of the header every occurrence of the
 * `nbulk` length-delimited `bulk` fields (tensor_data, KV cache entries),
 * recording each in result->occ in wire order instead, and drops every padding
 * field (SL_WIRE_PAD_FIELD) unread, so that no parser sees the filler. A bulk field with another
 * wire type fails like a bad tensor field. `data_field` 0: none. */
int sl_wire_split_bulk(const sl_span *spans, size_t nspans, uint32_t data_field,
                       const uint32_t *bulk, size_t nbulk, sl_wire_split_result *result,
                       sl_err *err);

/* Copy the `len` bytes that start at (span, off) into dst. */
void sl_wire_copy_range(const sl_span *spans, size_t nspans, size_t span, size_t off, size_t len,
                        void *dst);

/* The spans covering one occurrence's contents (a view, no bytes copied): *out is
 * malloc'd (caller frees with free()). SL_OK or SL_ENOMEM. */
int sl_wire_subspans(const sl_span *spans, size_t nspans, const sl_wire_occ *occ, sl_span **out,
                     size_t *n);

/* Copy the tensor bytes located by sl_wire_split() into `dst` (which has room for
 * result->data_len bytes). */
void sl_wire_copy_data(const sl_span *spans, size_t nspans, const sl_wire_split_result *result,
                       void *dst);

/* Free result->header and clear the record. */
void sl_wire_split_result_clear(sl_wire_split_result *result);

/* A text (protobuf `string`) field that must hold well-formed UTF-8 and no NUL
 * byte (the core hands strings on as C strings, and Python decodes them
 * strictly). `path` lists field numbers from the top level, ended by 0 or by
 * its size: {5} is top-level field 5; {4, 1} is field 1 inside every message
 * of field 4 (a map's keys; {4, 2} its values); {18, 2, 3} one level deeper. */
#define SL_WIRE_TEXT_DEPTH 4
typedef struct sl_wire_text_field {
  uint32_t path[SL_WIRE_TEXT_DEPTH];
  const char *name; /* for the error message, e.g. "model_id", "metadata key" */
} sl_wire_text_field;

/* Check every occurrence of the `n` text fields in the contiguous message
 * msg[0..len). SL_OK, or SL_EINVAL with an INVALID_ARGUMENT message naming the
 * field ("field 'model_id' of ComputeRequest is not valid UTF-8 (byte 3)";
 * `what` names the message). A message that does not parse is SL_EINVAL too.
 * Reads only msg[0..len); allocates nothing. */
int sl_wire_check_text(const uint8_t *msg, size_t len, const sl_wire_text_field *fields,
                       size_t n, const char *what, sl_err *err);

/* Most bytes sl_wire_data_prefix() writes. */
#define SL_WIRE_PREFIX_MAX 16

/* Write the tag (field `field`, wire type 2) and the varint length `len` into
 * `out`; returns the number of bytes written. */
size_t sl_wire_data_prefix(uint32_t field, uint64_t len, uint8_t out[SL_WIRE_PREFIX_MAX]);

/* Encode a varint into `out` (room for 10 bytes); returns bytes written. */
size_t sl_wire_put_varint(uint64_t v, uint8_t *out);

#ifdef __cplusplus
}
#endif

#endif /* SL_WIRE_H */
