/* message.c: see message.h. */
#include "message.h"

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

/* In every tensor message the tensor bytes are field 1 and the shape field 2. */
#define TENSOR_FIELD 1u

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
  }
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
  memset(m, 0, sizeof(*m));
  m->codec = SL_CODEC_RAW;
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
