/* message.h: the tensor-carrying messages of the wire contract (proto/).
 *
 * Reading: a received message (as spans) becomes an sl_tensor_msg: the unpacked
 * protobuf-c header (every field but the tensor bytes), the tensor descriptor, and
 * the tensor bytes copied exactly once into fresh 64-byte aligned storage.
 * Writing: a header message (protobuf-c struct with its tensor field empty) is
 * packed and followed by the tensor field's prefix; the tensor bytes themselves
 * are referenced by an sl_payload (payload.h).
 */
#ifndef SL_MESSAGE_H
#define SL_MESSAGE_H

#include <protobuf-c/protobuf-c.h>

#include "codec.h"
#include "payload.h"
#include "sl_common.h"
#include "splitlearn_comm.pb-c.h"
#include "tensor.h"
#include "wire.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sl_msg_kind {
  SL_MSG_COMPUTE_REQUEST = 0,
  SL_MSG_COMPUTE_RESPONSE,
  SL_MSG_BACKWARD_REQUEST,
  SL_MSG_BACKWARD_RESPONSE
} sl_msg_kind;

/* Name of the built-in raw codec (also what an empty codec field means). */
#define SL_CODEC_RAW "raw"

typedef struct sl_tensor_msg {
  sl_msg_kind kind;
  ProtobufCMessage *header; /* owned; every field but the tensor bytes */
  sl_tensor_desc desc;      /* from the shape and dtype fields: the tensor's, before encoding */
  void *data;               /* owned storage (sl_storage_free) unless set to NULL by a taker */
  size_t nbytes;            /* bytes in data */
  const char *codec;        /* points into header, or SL_CODEC_RAW; never NULL */
  sl_meta meta;             /* the codec metadata, owned */
  int decoded;              /* 1: data holds the tensor (desc's bytes); 0: a codec's payload */
} sl_tensor_msg;

/* Parse a message of `kind`. Fails with INVALID_ARGUMENT (in `err`) on a
 * malformed message, an unknown dtype, a bad shape, or (raw codec) a byte count
 * that disagrees with the shape. Any codec name is accepted here; the caller
 * decides which codecs it knows. A raw tensor is decoded (decoded = 1) at once;
 * any other codec's payload is left for sl_tensor_msg_decode() or the caller.
 * On success the caller owns `out` and clears it with sl_tensor_msg_clear(). */
int sl_tensor_msg_read(sl_msg_kind kind, const sl_span *spans, size_t nspans, sl_tensor_msg *out,
                       sl_err *err);

void sl_tensor_msg_clear(sl_tensor_msg *m);

/* The largest tensor a codec payload may decode to (16 GiB): a compressed or
 * sparse payload of a few bytes may declare any shape. */
#define SL_MAX_DECODED_BYTES ((size_t)16 << 30)

/* Decode a built-in codec's payload in place (data becomes the tensor, decoded =
 * 1). A decoded size over SL_MAX_DECODED_BYTES is RESOURCE_EXHAUSTED. A message already decoded, or whose codec is not built in, is left as it
 * is (check `decoded`). Fails with the codec's INVALID_ARGUMENT message. */
int sl_tensor_msg_decode(sl_tensor_msg *m, sl_err *err);

/* The scalar fields of a tensor call besides the tensor (split-learning training:
 * ComputeRequest.forward_id / training_mode / model_id and the BackwardRequest
 * fields). Strings are borrowed. */
typedef struct sl_call_fields {
  const char *forward_id;    /* NULL: unset */
  int training_mode;         /* -1: unset; 0 or 1 */
  const char *model_id;      /* NULL or "": unset */
  int has_learning_rate;
  float learning_rate;
  int has_accumulation_step;
  int32_t accumulation_step;
  int32_t backward_seq;      /* 0: unset (means 1); BackwardRequest only */
  const char *session_id;    /* NULL: unset (not in a session) */
  int64_t session_step;      /* 0: unset; ComputeRequest only */
  int session_close;         /* 1: end the session; ComputeRequest only */
  int has_request_id;
  int32_t request_id;
} sl_call_fields;

/* Read the fields of an unpacked request (ComputeRequest or BackwardRequest);
 * strings point into the message. */
void sl_call_fields_from_request(sl_msg_kind kind, const ProtobufCMessage *msg, sl_call_fields *f);

/* Set them on a request message being built (strings borrowed). */
void sl_call_fields_to_request(sl_msg_kind kind, ProtobufCMessage *msg, const sl_call_fields *f);

/* A tensor to send, as a client request or a server response. */
typedef struct sl_tensor_out {
  sl_tensor_desc desc;    /* the tensor's dtype and shape (before encoding) */
  const void *data;       /* the tensor's bytes (encoded = 0) or a codec payload (encoded = 1) */
  size_t nbytes;
  sl_release_fn release;  /* release(owner) runs exactly once when data is no longer needed */
  void *owner;
  int encoded;            /* 1: data is already a payload of codec `codec_name` */
  const char *codec_name; /* encoded = 1: the payload's codec (copied into the message) */
  const sl_meta *meta;    /* encoded = 1: its metadata (copied), or NULL */
  const sl_codec *codec;  /* encoded = 0: encode with it here, in C (NULL or raw: send as is) */
  int raw_if_unencodable; /* 1: a tensor `codec` refuses (dtype, NaN for int8, ...) goes raw */
} sl_tensor_out;

/* Pack a tensor message of `kind`: encode `t` if asked (in C, no locks held),
 * set the shape, dtype, codec and codec metadata fields of `header` (a message of
 * `kind` whose other fields the caller has set), and wrap it all in a payload.
 * t->release(owner) runs exactly once on every path: at once when the tensor was
 * encoded into a new buffer or on failure, otherwise when the payload is done. */
int sl_tensor_out_pack(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_out *t,
                       sl_payload **out, sl_err *err);

/* Shape/dtype/codec of the header of a tensor message, whatever its kind. */
typedef struct sl_tensor_fields {
  size_t *n_shape;
  int32_t **shape;
  char **dtype;
  char **codec;
} sl_tensor_fields;

/* The tensor-describing fields of `msg` (a message of `kind`). */
void sl_tensor_msg_fields(sl_msg_kind kind, ProtobufCMessage *msg, sl_tensor_fields *f);

/* Fill `shape32` (room for SL_MAX_NDIM) from `desc`; SL_ETOOBIG with a message
 * when a dimension does not fit the wire's int32. */
int sl_shape_to_wire(const sl_tensor_desc *desc, int32_t *shape32, sl_err *err);

/* Pack `header` (a message of `kind` whose tensor field is empty) and append the
 * tensor field prefix for `data_len` bytes, then wrap it with the tensor bytes in
 * a payload (one reference, the caller's). Refuses with RESOURCE_EXHAUSTED a
 * message over SL_MAX_MESSAGE_BYTES, naming the limit. On failure release is not
 * called and the caller keeps `data`. */
int sl_tensor_msg_pack(sl_msg_kind kind, const ProtobufCMessage *header, const void *data,
                       size_t data_len, sl_release_fn release, void *owner, sl_payload **out,
                       sl_err *err);

#ifdef __cplusplus
}
#endif

#endif /* SL_MESSAGE_H */
