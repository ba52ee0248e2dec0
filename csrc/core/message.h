/* message.h: the tensor-carrying messages of the wire contract (proto/).
 *
 * Ownership follows sl_common.h: every function here that is given tensors (with
 * their release callbacks) owns them from the call on, and on failure has
 * released them before it returns.
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

/* How a message carries its tensors. */
typedef enum sl_msg_form {
  SL_FORM_SINGLE = 0,    /* one tensor in the fields of the original contract (data, shape)
                            plus our dtype/codec fields 16-18; in a ComputeRequest or
                            ComputeResponse also the original's KV cache entries */
  SL_FORM_MAP = 1,       /* named tensors (fields 19 and 20), no structure: a map by name */
  SL_FORM_STRUCTURE = 2  /* named tensors and a structure descriptor (field 21) */
} sl_msg_form;

/* One received tensor. */
typedef struct sl_tensor_item {
  const char *name;     /* points into the header; "" in the single form */
  sl_tensor_desc desc;  /* the tensor's dtype and shape, before encoding */
  void *data;           /* owned storage (sl_storage_free), or bytes lent by the received
                           message's owner (lender != NULL: unlend(lender) lets go of them);
                           set to NULL by a taker (sl_tensor_item_take) */
  size_t nbytes;        /* bytes in data */
  const char *codec;    /* points into the header, or SL_CODEC_RAW; never NULL */
  sl_meta meta;         /* the codec metadata, owned */
  int decoded;          /* 1: data holds the tensor (desc's bytes); 0: a codec's payload */
  /* the reader's bookkeeping: where the bytes start in the received spans, while
   * their copy waits for the end of the read (sl_tensor_msg_read_owned) */
  size_t src_span, src_off;
  int pending;
  void *lender;                 /* non-NULL: data is borrowed (see sl_span_owner.lend) */
  void (*unlend)(void *lender); /* lets go of it: runs once, from any thread */
} sl_tensor_item;

/* Take an item's data: *release(*owner) lets go of it when the taker is done
 * (any thread); the item's data is NULL afterwards. Data NULL: *release NULL. */
void sl_tensor_item_take(sl_tensor_item *it, void **data, void (**release)(void *), void **owner);

/* Let go of an item's data (sl_storage_free, or the lender's unlend); data NULL. */
void sl_tensor_item_free_data(sl_tensor_item *it);

/* Kinds of structure nodes: the numbers of StructureNode.Kind (proto/). */
typedef enum sl_node_kind {
  SL_NODE_TENSOR = 1,
  SL_NODE_NONE = 2,
  SL_NODE_TUPLE = 3,
  SL_NODE_LIST = 4,
  SL_NODE_DICT = 5,
  SL_NODE_INT = 6,
  SL_NODE_FLOAT = 7,
  SL_NODE_BOOL = 8,
  SL_NODE_STRING = 9
} sl_node_kind;

/* One node of a structure, in pre-order; the k-th TENSOR node is tensor k.
 * Strings are borrowed (from the received header, or from the sender). */
typedef struct sl_node {
  int kind;             /* sl_node_kind */
  uint32_t size;        /* TUPLE / LIST / DICT: number of children that follow */
  const char *key;      /* the node's key in its parent DICT; NULL or "" elsewhere */
  int64_t i;            /* INT, BOOL */
  double d;             /* FLOAT */
  const char *s;        /* STRING */
} sl_node;

/* Bounds on what one received message may carry. */
typedef struct sl_msg_limits {
  size_t max_tensors;   /* named tensors per message (0: SL_DEFAULT_MAX_TENSORS) */
  int max_depth;        /* containers nested in a structure (0: SL_DEFAULT_MAX_DEPTH) */
} sl_msg_limits;

#define SL_DEFAULT_MAX_TENSORS 4096
#define SL_DEFAULT_MAX_DEPTH 32

typedef struct sl_tensor_msg {
  sl_msg_kind kind;
  ProtobufCMessage *header; /* owned; every field but the tensor bytes; its memory is
                               all in `arena` (freed with it, never field by field) */
  sl_arena arena;           /* owned: the memory protobuf-c unpacked the header into */
  int form;                 /* sl_msg_form */
  sl_tensor_item *items;    /* owned array of n_items */
  size_t n_items;           /* SINGLE: 1 + 2 * n_kv */
  sl_node *nodes;           /* owned array (strings point into header); STRUCTURE only */
  size_t n_nodes;
  size_t n_kv;              /* SINGLE: KV cache entries; items[1 + 2i] is the key and
                               items[2 + 2i] the value of entry i */
} sl_tensor_msg;

/* Parse a message of `kind` (`limits` NULL: the defaults). Fails with
 * INVALID_ARGUMENT (in `err`) on a malformed message, an unknown dtype, a bad
 * shape, a raw tensor whose byte count disagrees with its shape, duplicate or
 * missing tensor names, tensor descriptors that do not match the data fields, a
 * structure that does not match the tensors, more tensors than
 * limits->max_tensors, or a structure nested deeper than limits->max_depth; the
 * message names the problem. Any codec name is accepted here; the caller decides
 * which codecs it knows. Raw tensors are decoded (decoded = 1) at once; other
 * codecs' payloads are left for sl_tensor_item_decode() or the caller.
 * On success the caller owns `out` and clears it with sl_tensor_msg_clear(); on
 * failure `out` is left cleared. */
int sl_tensor_msg_read(sl_msg_kind kind, const sl_span *spans, size_t nspans, sl_tensor_msg *out,
                       sl_err *err);
int sl_tensor_msg_read_limited(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                               const sl_msg_limits *limits, sl_tensor_msg *out, sl_err *err);

/* Whoever owns the received spans, told when the reader is done with one of them
 * (span indices only grow), so that its memory can go before the whole message
 * is read: a large received message then never sits in memory beside all of its
 * copy. `release` must not touch the spans still to come. */
typedef struct sl_span_owner {
  void (*release)(void *user, size_t span); /* may be NULL */
  void *user;
  /* Optional (NULL: every tensor is copied): spans that stay valid after the read,
   * such as a shared-memory segment, may lend their bytes instead. A raw tensor of
   * at least SL_LEND_MIN_BYTES that lies in one span at an address aligned for its
   * dtype is then not copied: lend(user) returns a token (NULL: copy it after all)
   * that keeps the bytes valid until unlend(token), and the item borrows them. */
  void *(*lend)(void *user);
  void (*unlend)(void *token);
} sl_span_owner;

/* Tensors smaller than this are copied even from spans that can lend: a view would
 * hold the whole span hostage for a few bytes. */
#ifndef SL_LEND_MIN_BYTES /* (the fuzz builds lower it, to reach the loans) */
#define SL_LEND_MIN_BYTES ((size_t)64 << 10)
#endif

/* sl_tensor_msg_read_limited() that tells `owner` (NULL: nobody) as spans are
 * done with. The tensors' bytes are copied last, in wire order, each span
 * released as soon as no tensor still to copy starts in or before it. Whatever
 * the outcome, the spans the owner was not told of are still the owner's. */
int sl_tensor_msg_read_owned(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                             const sl_msg_limits *limits, const sl_span_owner *owner,
                             sl_tensor_msg *out, sl_err *err);

/* sl_tensor_msg_read_limited() that takes over tensor storage instead of copying:
 * `adopt` (NULL: none) is parallel to `spans`; when a tensor's bytes are exactly
 * span i and adopt[i] is not NULL, adopt[i] (storage from sl_storage_alloc holding
 * span i's bytes) becomes the item's data and the slot is set to NULL. The caller
 * still owns, and frees, the slots left. Used for streamed messages (stream.h). */
int sl_tensor_msg_read_adopt(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                             const sl_msg_limits *limits, void **adopt, sl_tensor_msg *out,
                             sl_err *err);

void sl_tensor_msg_clear(sl_tensor_msg *m);

/* Check a structure (pre-order nodes) against `n_tensors` tensors: known kinds,
 * children that exist, no container nested deeper than `max_depth` (0: the
 * default), unique keys in each dict, one TENSOR leaf per tensor. Fails with
 * INVALID_ARGUMENT naming the problem. */
int sl_structure_check(const sl_node *nodes, size_t n, size_t n_tensors, int max_depth,
                       sl_err *err);

/* The largest tensor a codec payload may decode to (16 GiB): a compressed or
 * sparse payload of a few bytes may declare any shape. */
#define SL_MAX_DECODED_BYTES ((size_t)16 << 30)

/* Decode an item's payload in place with its codec, a built-in or one of
 * `codecs` (which may be NULL: built-ins only): data becomes the tensor and desc
 * its description (a custom codec may decode to another shape or dtype),
 * decoded = 1. A codec's bound on the decoded size over SL_MAX_DECODED_BYTES is
 * RESOURCE_EXHAUSTED. An item already decoded is left as it is. An unknown codec
 * fails with SL_ECODEC naming the codecs known; a failing decoder with its own
 * message (INVALID_ARGUMENT). On failure the item's payload is gone (data NULL). */
int sl_tensor_item_decode_with(sl_tensor_item *it, const sl_codecs *codecs, sl_err *err);
int sl_tensor_item_decode(sl_tensor_item *it, sl_err *err); /* codecs NULL */

/* sl_tensor_item_decode_with() on every item; an error names the tensor. */
int sl_tensor_msg_decode_with(sl_tensor_msg *m, const sl_codecs *codecs, sl_err *err);
int sl_tensor_msg_decode(sl_tensor_msg *m, sl_err *err); /* codecs NULL */

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
  int has_use_cache;         /* ComputeRequest.use_cache is set (0: absent) */
  int use_cache;             /* its value, 0 or 1 */
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
  const sl_codec *codec;  /* encoded = 0: encode with it here (NULL or raw: send as is); a
                             custom codec's encoder may declare another shape */
  int raw_if_unencodable; /* 1: a tensor `codec` refuses (dtype, NaN for int8, ...) goes raw */
  const char *name;       /* the tensor's name (copied into the message); MAP/STRUCTURE form */
} sl_tensor_out;

/* The tensors of an outgoing message. */
typedef struct sl_tensor_set {
  sl_tensor_out *items;   /* n items; each release runs exactly once (see below) */
  size_t n;
  int form;               /* sl_msg_form; SINGLE: n == 1 + 2 * n_kv */
  const sl_node *nodes;   /* STRUCTURE: the structure, pre-order (strings copied) */
  size_t n_nodes;
  size_t n_kv;            /* SINGLE: items[1..] are n_kv (key, value) pairs sent in the
                             original's KV cache fields (ComputeRequest.past_key_values,
                             ComputeResponse.present_key_values): raw float32 only */
} sl_tensor_set;

/* Pack a message of `kind` carrying `set`: encode each tensor that asks for it
 * (in C, no locks held), set the tensor fields of `header` (a message of `kind`
 * whose other fields the caller has set) and wrap it all in a payload whose
 * tensor bytes are referenced, not copied. A single-form set of one tensor gives
 * exactly the bytes sl_tensor_out_pack() gives. Every item's release(owner) runs
 * exactly once on every path, success or failure (this function always consumes
 * the tensors it is given): at once when a tensor was encoded into a new buffer
 * or on failure, otherwise when the payload is done. On return the header holds
 * no pointer into memory freed here. */
int sl_tensor_set_pack(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_set *set,
                       sl_payload **out, sl_err *err);

/* sl_tensor_set_pack() with another bound on the message than gRPC's 2 GiB - 1
 * (a streamed message, stream.h). */
int sl_tensor_set_pack_max(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_set *set,
                           size_t max_bytes, sl_payload **out, sl_err *err);

/* Release every item of `set` (for callers that fail before packing it). */
void sl_tensor_set_release(const sl_tensor_set *set);

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
  size_t *n_tensors;                      /* field 19 */
  Splitlearn__Comm__NamedTensor ***tensors;
  size_t *n_structure;                    /* field 21 */
  Splitlearn__Comm__StructureNode ***structure;
} sl_tensor_fields;

/* The tensor-describing fields of `msg` (a message of `kind`). */
void sl_tensor_msg_fields(sl_msg_kind kind, ProtobufCMessage *msg, sl_tensor_fields *f);

/* Fill `shape32` (room for SL_MAX_NDIM) from `desc`; SL_ETOOBIG with a message
 * when a dimension does not fit the wire's int32. */
int sl_shape_to_wire(const sl_tensor_desc *desc, int32_t *shape32, sl_err *err);

/* Pack `header` (a message of `kind` whose tensor field is empty) and append the
 * tensor field prefix for `data_len` bytes, then wrap it with the tensor bytes in
 * a payload (one reference, the caller's). Refuses with RESOURCE_EXHAUSTED a
 * message over SL_MAX_MESSAGE_BYTES, naming the limit. Takes the release (the
 * rule of sl_common.h): release(owner) runs exactly once, at the payload's last
 * unref, or before returning on failure. */
int sl_tensor_msg_pack(sl_msg_kind kind, const ProtobufCMessage *header, const void *data,
                       size_t data_len, sl_release_fn release, void *owner, sl_payload **out,
                       sl_err *err);

#ifdef __cplusplus
}
#endif

#endif /* SL_MESSAGE_H */
