/* message.c: see message.h. */
#include "message.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static const ProtobufCMessageDescriptor *descriptor_of(sl_msg_kind kind) {
  switch (kind) {
    case SL_MSG_COMPUTE_REQUEST: return &splitlearn__comm__compute_request__descriptor;
    case SL_MSG_COMPUTE_RESPONSE: return &splitlearn__comm__compute_response__descriptor;
    case SL_MSG_BACKWARD_REQUEST: return &splitlearn__comm__backward_request__descriptor;
    case SL_MSG_BACKWARD_RESPONSE: return &splitlearn__comm__backward_response__descriptor;
  }
  return NULL;
}

static const char *kind_name(sl_msg_kind kind) {
  switch (kind) {
    case SL_MSG_COMPUTE_REQUEST: return "ComputeRequest";
    case SL_MSG_COMPUTE_RESPONSE: return "ComputeResponse";
    case SL_MSG_BACKWARD_REQUEST: return "BackwardRequest";
    case SL_MSG_BACKWARD_RESPONSE: return "BackwardResponse";
  }
  return "message";
}

/* The text fields of each tensor message (proto/splitlearn_comm.proto): well-formed
 * UTF-8 without NUL bytes, or the message is refused naming the field. */
#define TEXT_COMMON                                                      \
  {{16}, "dtype"}, {{17}, "codec"}, {{18, 1}, "codec_metadata (a key)"}, \
      {{18, 2, 3}, "codec_metadata (a string value)"}
static const sl_wire_text_field text_compute_request[] = {
    {{4, 1}, "metadata (a key)"}, {{4, 2}, "metadata (a value)"}, {{5}, "model_id"},
    {{6}, "forward_id"}, {{40}, "session_id"}, TEXT_COMMON};
static const sl_wire_text_field text_compute_response[] = {{{6}, "forward_id"}, TEXT_COMMON};
static const sl_wire_text_field text_backward_request[] = {
    {{3}, "forward_id"}, {{4}, "model_id"}, {{40}, "session_id"}, TEXT_COMMON};
static const sl_wire_text_field text_backward_response[] = {{{3}, "forward_id"}, TEXT_COMMON};

static int check_text_fields(sl_msg_kind kind, const uint8_t *header, size_t len, const char *what,
                             sl_err *err) {
#define CHECK_TEXT(t) sl_wire_check_text(header, len, t, sizeof(t) / sizeof(t[0]), what, err)
  switch (kind) {
    case SL_MSG_COMPUTE_REQUEST: return CHECK_TEXT(text_compute_request);
    case SL_MSG_COMPUTE_RESPONSE: return CHECK_TEXT(text_compute_response);
    case SL_MSG_BACKWARD_REQUEST: return CHECK_TEXT(text_backward_request);
    case SL_MSG_BACKWARD_RESPONSE: return CHECK_TEXT(text_backward_response);
  }
#undef CHECK_TEXT
  return SL_OK;
}

/* In every tensor message the tensor bytes are field 1 and the shape field 2. */
#define TENSOR_FIELD 1u

/* Every tensor message's codec_metadata map entry has this layout (protobuf-c
 * generates one identical struct per message); checked below. */
typedef struct meta_entry {
  ProtobufCMessage base;
  char *key;
  Splitlearn__Comm__MetadataValue *value;
} meta_entry;

#define SAME_LAYOUT(T)                                                              \
  _Static_assert(sizeof(T) == sizeof(meta_entry) &&                                 \
                     offsetof(T, key) == offsetof(meta_entry, key) &&               \
                     offsetof(T, value) == offsetof(meta_entry, value),             \
                 #T " differs from meta_entry")
SAME_LAYOUT(Splitlearn__Comm__ComputeRequest__CodecMetadataEntry);
SAME_LAYOUT(Splitlearn__Comm__ComputeResponse__CodecMetadataEntry);
SAME_LAYOUT(Splitlearn__Comm__BackwardRequest__CodecMetadataEntry);
SAME_LAYOUT(Splitlearn__Comm__BackwardResponse__CodecMetadataEntry);

typedef struct meta_fields {
  size_t *n;
  meta_entry ***entries;
  const ProtobufCMessageDescriptor *entry_desc;
} meta_fields;

static void meta_fields_of(sl_msg_kind kind, ProtobufCMessage *msg, meta_fields *f) {
  switch (kind) {
    case SL_MSG_COMPUTE_REQUEST: {
      Splitlearn__Comm__ComputeRequest *m = (Splitlearn__Comm__ComputeRequest *)msg;
      f->n = &m->n_codec_metadata;
      f->entries = (meta_entry ***)&m->codec_metadata;
      f->entry_desc = &splitlearn__comm__compute_request__codec_metadata_entry__descriptor;
      break;
    }
    case SL_MSG_COMPUTE_RESPONSE: {
      Splitlearn__Comm__ComputeResponse *m = (Splitlearn__Comm__ComputeResponse *)msg;
      f->n = &m->n_codec_metadata;
      f->entries = (meta_entry ***)&m->codec_metadata;
      f->entry_desc = &splitlearn__comm__compute_response__codec_metadata_entry__descriptor;
      break;
    }
    case SL_MSG_BACKWARD_REQUEST: {
      Splitlearn__Comm__BackwardRequest *m = (Splitlearn__Comm__BackwardRequest *)msg;
      f->n = &m->n_codec_metadata;
      f->entries = (meta_entry ***)&m->codec_metadata;
      f->entry_desc = &splitlearn__comm__backward_request__codec_metadata_entry__descriptor;
      break;
    }
    case SL_MSG_BACKWARD_RESPONSE: {
      Splitlearn__Comm__BackwardResponse *m = (Splitlearn__Comm__BackwardResponse *)msg;
      f->n = &m->n_codec_metadata;
      f->entries = (meta_entry ***)&m->codec_metadata;
      f->entry_desc = &splitlearn__comm__backward_response__codec_metadata_entry__descriptor;
      break;
    }
  }
}

/* The codec metadata of an unpacked message as an sl_meta (copied). */
static int meta_from_wire(sl_msg_kind kind, ProtobufCMessage *msg, sl_meta *out, sl_err *err) {
  meta_fields f = {NULL, NULL, NULL};
  int rc = SL_OK;
  meta_fields_of(kind, msg, &f);
  for (size_t i = 0; i < *f.n && rc == SL_OK; i++) {
    const meta_entry *e = (*f.entries)[i];
    const Splitlearn__Comm__MetadataValue *v = e->value;
    if (v == NULL) continue;
    switch (v->kind_case) {
      case SPLITLEARN__COMM__METADATA_VALUE__KIND_DOUBLE_VALUE:
        rc = sl_meta_add_double(out, e->key, v->double_value);
        break;
      case SPLITLEARN__COMM__METADATA_VALUE__KIND_INT_VALUE:
        rc = sl_meta_add_int(out, e->key, v->int_value);
        break;
      case SPLITLEARN__COMM__METADATA_VALUE__KIND_STRING_VALUE:
        rc = sl_meta_add_string(out, e->key, v->string_value);
        break;
      case SPLITLEARN__COMM__METADATA_VALUE__KIND_BYTES_VALUE:
        rc = sl_meta_add_bytes(out, e->key, v->bytes_value.data, v->bytes_value.len);
        break;
      case SPLITLEARN__COMM__METADATA_VALUE__KIND_BOOL_VALUE:
        rc = sl_meta_add_bool(out, e->key, v->bool_value);
        break;
      default:
        break; /* a value of a kind from the future: ignored */
    }
  }
  if (rc != SL_OK) {
    return sl_err_set(err, rc, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory reading codec metadata");
  }
  return SL_OK;
}

/* Point the message's codec_metadata at entries built from `meta`. The arrays are
 * malloc'd into *mem (freed by the caller with free() after packing); strings
 * point into `meta`. */
static int meta_to_wire(sl_msg_kind kind, ProtobufCMessage *msg, const sl_meta *meta, void **mem) {
  meta_fields f = {NULL, NULL, NULL};
  size_t n = meta ? meta->n : 0;
  char *block;
  meta_entry **ptrs;
  meta_entry *entries;
  Splitlearn__Comm__MetadataValue *values;
  *mem = NULL;
  if (n == 0) return SL_OK;
  block = calloc(n, sizeof(*ptrs) + sizeof(*entries) + sizeof(*values));
  if (block == NULL) return SL_ENOMEM;
  ptrs = (meta_entry **)block;
  entries = (meta_entry *)(block + n * sizeof(*ptrs));
  values = (Splitlearn__Comm__MetadataValue *)(block + n * (sizeof(*ptrs) + sizeof(*entries)));
  meta_fields_of(kind, msg, &f);
  for (size_t i = 0; i < n; i++) {
    const sl_meta_value *mv = &meta->items[i];
    protobuf_c_message_init(f.entry_desc, &entries[i]);
    splitlearn__comm__metadata_value__init(&values[i]);
    entries[i].key = mv->key;
    entries[i].value = &values[i];
    switch (mv->type) {
      case SL_META_DOUBLE:
        values[i].kind_case = SPLITLEARN__COMM__METADATA_VALUE__KIND_DOUBLE_VALUE;
        values[i].double_value = mv->d;
        break;
      case SL_META_INT:
        values[i].kind_case = SPLITLEARN__COMM__METADATA_VALUE__KIND_INT_VALUE;
        values[i].int_value = mv->i;
        break;
      case SL_META_STRING:
        values[i].kind_case = SPLITLEARN__COMM__METADATA_VALUE__KIND_STRING_VALUE;
        values[i].string_value = mv->bytes;
        break;
      case SL_META_BYTES:
        values[i].kind_case = SPLITLEARN__COMM__METADATA_VALUE__KIND_BYTES_VALUE;
        values[i].bytes_value.data = (uint8_t *)mv->bytes;
        values[i].bytes_value.len = mv->len;
        break;
      case SL_META_BOOL:
        values[i].kind_case = SPLITLEARN__COMM__METADATA_VALUE__KIND_BOOL_VALUE;
        values[i].bool_value = mv->i != 0;
        break;
    }
    ptrs[i] = &entries[i];
  }
  *f.n = n;
  *f.entries = ptrs;
  *mem = block;
  return SL_OK;
}

void sl_tensor_msg_fields(sl_msg_kind kind, ProtobufCMessage *msg, sl_tensor_fields *f) {
  switch (kind) {
    case SL_MSG_COMPUTE_REQUEST: {
      Splitlearn__Comm__ComputeRequest *m = (Splitlearn__Comm__ComputeRequest *)msg;
      f->n_shape = &m->n_shape;
      f->shape = &m->shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      break;
    }
    case SL_MSG_COMPUTE_RESPONSE: {
      Splitlearn__Comm__ComputeResponse *m = (Splitlearn__Comm__ComputeResponse *)msg;
      f->n_shape = &m->n_shape;
      f->shape = &m->shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      break;
    }
    case SL_MSG_BACKWARD_REQUEST: {
      Splitlearn__Comm__BackwardRequest *m = (Splitlearn__Comm__BackwardRequest *)msg;
      f->n_shape = &m->n_grad_output_shape;
      f->shape = &m->grad_output_shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      break;
    }
    case SL_MSG_BACKWARD_RESPONSE: {
      Splitlearn__Comm__BackwardResponse *m = (Splitlearn__Comm__BackwardResponse *)msg;
      f->n_shape = &m->n_grad_input_shape;
      f->shape = &m->grad_input_shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      break;
    }
  }
}

int sl_tensor_msg_read(sl_msg_kind kind, const sl_span *spans, size_t nspans, sl_tensor_msg *out,
                       sl_err *err) {
  int status = SL_EINVAL;
  sl_wire_split_result split = {0};
  sl_tensor_fields f = {NULL, NULL, NULL, NULL};
  sl_dtype dtype;
  size_t need = 0;

  memset(out, 0, sizeof(*out));
  out->kind = kind;
  out->codec = SL_CODEC_RAW;
  status = sl_wire_split(spans, nspans, TENSOR_FIELD, &split, err);
  if (status != SL_OK) goto cleanup;
  out->header = protobuf_c_message_unpack(descriptor_of(kind), NULL, split.header_len,
                                          split.header);
  if (out->header == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "malformed %s: its fields could not be parsed", kind_name(kind));
    goto cleanup;
  }
  status = check_text_fields(kind, split.header, split.header_len, kind_name(kind), err);
  if (status != SL_OK) goto cleanup;
  status = SL_EINVAL;
  sl_tensor_msg_fields(kind, out->header, &f);
  if (sl_dtype_from_name(*f.dtype, strlen(*f.dtype), &dtype) != SL_OK) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "unknown dtype '%.64s' in %s (known: float16, bfloat16, float32, "
                        "float64, complex64, complex128, int8, int16, int32, int64, uint8, "
                        "uint16, uint32, uint64, bool)",
                        *f.dtype, kind_name(kind));
    goto cleanup;
  }
  if ((*f.codec)[0] != '\0') out->codec = *f.codec;
  status = sl_desc_from_wire(dtype, *f.shape, *f.n_shape, &out->desc, &need, err);
  if (status != SL_OK) goto cleanup;
  if (strcmp(out->codec, SL_CODEC_RAW) == 0) {
    status = sl_desc_check_len(&out->desc, split.data_len, err);
    if (status != SL_OK) goto cleanup;
    out->decoded = 1;
  }
  status = meta_from_wire(kind, out->header, &out->meta, err);
  if (status != SL_OK) goto cleanup;
  status = sl_storage_alloc(split.data_len, &out->data);
  if (status != SL_OK) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                        "out of memory allocating %zu bytes for a received tensor",
                        split.data_len);
    goto cleanup;
  }
  /* the one copy of the receive path: slices straight into the final storage */
  sl_wire_copy_data(spans, nspans, &split, out->data);
  out->nbytes = split.data_len;
  status = SL_OK;
cleanup:
  sl_wire_split_result_clear(&split);
  if (status != SL_OK) sl_tensor_msg_clear(out);
  return status;
}

void sl_tensor_msg_clear(sl_tensor_msg *m) {
  if (m->header != NULL) protobuf_c_message_free_unpacked(m->header, NULL);
  sl_storage_free(m->data);
  sl_meta_clear(&m->meta);
  memset(m, 0, sizeof(*m));
  m->codec = SL_CODEC_RAW;
}

/* A bool tensor's bytes must be 0 or 1: anything else is not a bool to PyTorch. */
static int check_bools(const sl_tensor_msg *m, sl_err *err) {
  const uint8_t *p = m->data;
  uint8_t bad = 0;
  if (m->desc.dtype != SL_DTYPE_BOOL) return SL_OK;
  for (size_t i = 0; i < m->nbytes; i++) bad |= p[i];
  if (bad > 1) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "bool tensor holds bytes other than 0 and 1");
  }
  return SL_OK;
}

int sl_tensor_msg_decode(sl_tensor_msg *m, sl_err *err) {
  void *out = NULL;
  size_t nbytes = 0;
  int rc;
  if (m->decoded || !sl_codec_name_is_builtin(m->codec)) return m->decoded ? check_bools(m, err) : SL_OK;
  rc = sl_desc_nbytes(&m->desc, &nbytes);
  if (rc != SL_OK) return sl_err_set(err, rc, SL_STATUS_INVALID_ARGUMENT, "invalid dtype or shape");
  if (nbytes > SL_MAX_DECODED_BYTES) {
    /* a few bytes of sparse or compressed payload may declare any shape */
    return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                      "codec '%.64s': the decoded tensor would take %zu bytes, over the limit of "
                      "%zu bytes (16 GiB)",
                      m->codec, nbytes, (size_t)SL_MAX_DECODED_BYTES);
  }
  rc = sl_codec_decode(m->codec, &m->desc, m->data, m->nbytes, &m->meta, &out, err);
  if (rc != SL_OK) return rc;
  sl_storage_free(m->data);
  m->data = out;
  m->nbytes = nbytes;
  m->decoded = 1;
  return check_bools(m, err);
}

static void storage_release(void *p) { sl_storage_free(p); }

int sl_tensor_out_pack(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_out *t,
                       sl_payload **out, sl_err *err) {
  int status;
  sl_tensor_fields f = {NULL, NULL, NULL, NULL};
  int32_t shape32[SL_MAX_NDIM];
  const void *data = t->data;
  size_t nbytes = t->nbytes;
  sl_release_fn release = t->release;
  void *owner = t->owner;
  const char *codec_name = SL_CODEC_RAW;
  const sl_meta *meta = t->meta;
  sl_meta encoded_meta = {NULL, 0};
  void *encoded = NULL, *meta_mem = NULL;

  *out = NULL;
  if (t->encoded) {
    codec_name = t->codec_name ? t->codec_name : SL_CODEC_RAW;
  } else {
    meta = NULL;
    status = sl_desc_check_len(&t->desc, t->nbytes, err);
    if (status != SL_OK) goto cleanup;
    if (t->codec != NULL && !sl_codec_is_raw(t->codec)) {
      size_t len = 0;
      status = sl_codec_encode(t->codec, &t->desc, t->data, t->nbytes, &encoded, &len,
                               &encoded_meta, err);
      if (status == SL_EINVAL && t->raw_if_unencodable) {
        /* the codec was our choice, not the caller's: send the tensor as it is */
        sl_err_clear(err);
        sl_meta_clear(&encoded_meta);
        status = SL_OK;
        goto framing;
      }
      if (status != SL_OK) goto cleanup;
      /* the tensor itself is no longer needed: give it back now */
      if (release != NULL) release(owner);
      release = storage_release;
      owner = encoded;
      data = encoded;
      nbytes = len;
      encoded = NULL;
      codec_name = sl_codec_name(t->codec);
      meta = &encoded_meta;
    }
  }
framing:
  status = sl_shape_to_wire(&t->desc, shape32, err);
  if (status != SL_OK) goto cleanup;
  sl_tensor_msg_fields(kind, header, &f);
  *f.n_shape = (size_t)t->desc.ndim;
  *f.shape = shape32;
  *f.dtype = (char *)sl_dtype_name(t->desc.dtype);
  *f.codec = (char *)codec_name;
  status = meta_to_wire(kind, header, meta, &meta_mem);
  if (status != SL_OK) {
    status = sl_err_set(err, status, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  status = sl_tensor_msg_pack(kind, header, data, nbytes, release, owner, out, err);
  if (status == SL_OK) release = NULL; /* the payload owns it now */
cleanup:
  /* the header must not keep pointers into memory freed here */
  if (f.shape != NULL) {
    *f.shape = NULL;
    *f.n_shape = 0;
  }
  {
    meta_fields mf = {NULL, NULL, NULL};
    meta_fields_of(kind, header, &mf);
    *mf.entries = NULL;
    *mf.n = 0;
  }
  free(meta_mem);
  sl_meta_clear(&encoded_meta);
  sl_storage_free(encoded);
  if (release != NULL) release(owner);
  return status;
}

int sl_shape_to_wire(const sl_tensor_desc *desc, int32_t *shape32, sl_err *err) {
  for (int i = 0; i < desc->ndim; i++) {
    if (desc->shape[i] < 0 || desc->shape[i] > INT32_MAX) {
      return sl_err_set(err, SL_ETOOBIG, SL_STATUS_OUT_OF_RANGE,
                        "dimension %d of size %lld does not fit the wire's int32 shape", i,
                        (long long)desc->shape[i]);
    }
    shape32[i] = (int32_t)desc->shape[i];
  }
  return SL_OK;
}

int sl_tensor_msg_pack(sl_msg_kind kind, const ProtobufCMessage *header, const void *data,
                       size_t data_len, sl_release_fn release, void *owner, sl_payload **out,
                       sl_err *err) {
  int status = SL_ENOMEM;
  uint8_t *buf = NULL;
  size_t hlen = protobuf_c_message_get_packed_size(header);
  uint8_t prefix[SL_WIRE_PREFIX_MAX];
  size_t plen = data_len ? sl_wire_data_prefix(TENSOR_FIELD, data_len, prefix) : 0;

  *out = NULL;
  if (data_len > SL_MAX_MESSAGE_BYTES || hlen + plen > SL_MAX_MESSAGE_BYTES - data_len) {
    status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                        "%s of %zu bytes is over gRPC's message limit of %zu bytes (2 GiB - 1); "
                        "split the tensor or use a compressing codec",
                        kind_name(kind), hlen + plen + data_len, SL_MAX_MESSAGE_BYTES);
    goto cleanup;
  }
  buf = malloc(hlen + plen ? hlen + plen : 1);
  if (buf == NULL) goto oom;
  if (protobuf_c_message_pack(header, buf) != hlen) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INTERNAL, "could not pack %s", kind_name(kind));
    goto cleanup;
  }
  memcpy(buf + hlen, prefix, plen);
  status = sl_payload_new(buf, hlen + plen, data, data_len, release, owner, out);
  if (status != SL_OK) goto oom;
  buf = NULL;
  status = SL_OK;
  goto cleanup;
oom:
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory packing %s",
                      kind_name(kind));
cleanup:
  free(buf);
  return status;
}

void sl_call_fields_from_request(sl_msg_kind kind, const ProtobufCMessage *msg, sl_call_fields *f) {
  memset(f, 0, sizeof(*f));
  f->training_mode = -1;
  if (kind == SL_MSG_COMPUTE_REQUEST) {
    const Splitlearn__Comm__ComputeRequest *m = (const Splitlearn__Comm__ComputeRequest *)msg;
    if (m->_forward_id_case == SPLITLEARN__COMM__COMPUTE_REQUEST___FORWARD_ID_FORWARD_ID) {
      f->forward_id = m->forward_id;
    }
    if (m->_training_mode_case == SPLITLEARN__COMM__COMPUTE_REQUEST___TRAINING_MODE_TRAINING_MODE) {
      f->training_mode = m->training_mode ? 1 : 0;
    }
    f->model_id = m->model_id;
    f->has_request_id = m->_request_id_case == SPLITLEARN__COMM__COMPUTE_REQUEST___REQUEST_ID_REQUEST_ID;
    f->request_id = m->request_id;
    if (m->_session_id_case == SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_ID_SESSION_ID) {
      f->session_id = m->session_id;
    }
    if (m->_session_step_case == SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_STEP_SESSION_STEP) {
      f->session_step = m->session_step;
    }
    if (m->_session_close_case == SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_CLOSE_SESSION_CLOSE) {
      f->session_close = m->session_close ? 1 : 0;
    }
  } else if (kind == SL_MSG_BACKWARD_REQUEST) {
    const Splitlearn__Comm__BackwardRequest *m = (const Splitlearn__Comm__BackwardRequest *)msg;
    f->forward_id = m->forward_id;
    if (m->_model_id_case == SPLITLEARN__COMM__BACKWARD_REQUEST___MODEL_ID_MODEL_ID) {
      f->model_id = m->model_id;
    }
    f->has_learning_rate =
        m->_learning_rate_case == SPLITLEARN__COMM__BACKWARD_REQUEST___LEARNING_RATE_LEARNING_RATE;
    f->learning_rate = m->learning_rate;
    f->has_accumulation_step = m->_accumulation_step_case ==
                               SPLITLEARN__COMM__BACKWARD_REQUEST___ACCUMULATION_STEP_ACCUMULATION_STEP;
    f->accumulation_step = m->accumulation_step;
    if (m->_backward_seq_case == SPLITLEARN__COMM__BACKWARD_REQUEST___BACKWARD_SEQ_BACKWARD_SEQ) {
      f->backward_seq = m->backward_seq;
    }
    if (m->_session_id_case == SPLITLEARN__COMM__BACKWARD_REQUEST___SESSION_ID_SESSION_ID) {
      f->session_id = m->session_id;
    }
  }
}

void sl_call_fields_to_request(sl_msg_kind kind, ProtobufCMessage *msg, const sl_call_fields *f) {
  if (kind == SL_MSG_COMPUTE_REQUEST) {
    Splitlearn__Comm__ComputeRequest *m = (Splitlearn__Comm__ComputeRequest *)msg;
    if (f->forward_id != NULL) {
      m->_forward_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___FORWARD_ID_FORWARD_ID;
      m->forward_id = (char *)f->forward_id;
    }
    if (f->training_mode >= 0) {
      m->_training_mode_case = SPLITLEARN__COMM__COMPUTE_REQUEST___TRAINING_MODE_TRAINING_MODE;
      m->training_mode = f->training_mode != 0;
    }
    if (f->model_id != NULL) m->model_id = (char *)f->model_id;
    if (f->has_request_id) {
      m->_request_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___REQUEST_ID_REQUEST_ID;
      m->request_id = f->request_id;
    }
    if (f->session_id != NULL) {
      m->_session_id_case = SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_ID_SESSION_ID;
      m->session_id = (char *)f->session_id;
    }
    if (f->session_step > 0) {
      m->_session_step_case = SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_STEP_SESSION_STEP;
      m->session_step = f->session_step;
    }
    if (f->session_close) {
      m->_session_close_case = SPLITLEARN__COMM__COMPUTE_REQUEST___SESSION_CLOSE_SESSION_CLOSE;
      m->session_close = 1;
    }
  } else if (kind == SL_MSG_BACKWARD_REQUEST) {
    Splitlearn__Comm__BackwardRequest *m = (Splitlearn__Comm__BackwardRequest *)msg;
    if (f->forward_id != NULL) m->forward_id = (char *)f->forward_id;
    if (f->model_id != NULL && f->model_id[0] != '\0') {
      m->_model_id_case = SPLITLEARN__COMM__BACKWARD_REQUEST___MODEL_ID_MODEL_ID;
      m->model_id = (char *)f->model_id;
    }
    if (f->has_learning_rate) {
      m->_learning_rate_case = SPLITLEARN__COMM__BACKWARD_REQUEST___LEARNING_RATE_LEARNING_RATE;
      m->learning_rate = f->learning_rate;
    }
    if (f->has_accumulation_step) {
      m->_accumulation_step_case =
          SPLITLEARN__COMM__BACKWARD_REQUEST___ACCUMULATION_STEP_ACCUMULATION_STEP;
      m->accumulation_step = f->accumulation_step;
    }
    if (f->backward_seq > 0) {
      m->_backward_seq_case = SPLITLEARN__COMM__BACKWARD_REQUEST___BACKWARD_SEQ_BACKWARD_SEQ;
      m->backward_seq = f->backward_seq;
    }
    if (f->session_id != NULL) {
      m->_session_id_case = SPLITLEARN__COMM__BACKWARD_REQUEST___SESSION_ID_SESSION_ID;
      m->session_id = (char *)f->session_id;
    }
  }
}
