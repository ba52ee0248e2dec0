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

/* ---- the header's memory: one arena per message ----
 * protobuf-c allocates each submessage, string and repeated array of a header
 * separately; a message with many named tensors made a handful of malloc calls
 * per tensor, and as many free calls. The message's sl_arena hands out the memory
 * and frees it all at once with the message. */
static void *header_alloc(void *data, size_t size) { return sl_arena_alloc(data, size); }

static void header_free_one(void *data, void *p) { /* freed with the whole arena */
  (void)data;
  (void)p;
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
      {{18, 2, 3}, "codec_metadata (a string value)"}, {{19, 1}, "tensors (a name)"},      \
      {{19, 2}, "tensors (a dtype)"}, {{19, 4}, "tensors (a codec)"},                          \
      {{19, 5, 1}, "tensors (a codec_metadata key)"},                                        \
      {{19, 5, 2, 3}, "tensors (a codec_metadata string value)"},                            \
      {{21, 3}, "structure (a key)"}, {{21, 6}, "structure (a string value)"}
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
SAME_LAYOUT(Splitlearn__Comm__NamedTensor__CodecMetadataEntry);

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

static void meta_fields_of_named(Splitlearn__Comm__NamedTensor *m, meta_fields *f) {
  f->n = &m->n_codec_metadata;
  f->entries = (meta_entry ***)&m->codec_metadata;
  f->entry_desc = &splitlearn__comm__named_tensor__codec_metadata_entry__descriptor;
}

static int meta_from_fields(const meta_fields *fp, sl_meta *out, sl_err *err);

/* The codec metadata of an unpacked message as an sl_meta (copied). */
static int meta_from_wire(sl_msg_kind kind, ProtobufCMessage *msg, sl_meta *out, sl_err *err) {
  meta_fields f = {NULL, NULL, NULL};
  meta_fields_of(kind, msg, &f);
  return meta_from_fields(&f, out, err);
}

static int meta_from_fields(const meta_fields *fp, sl_meta *out, sl_err *err) {
  meta_fields f = *fp;
  int rc = SL_OK;
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
static int meta_to_fields(const meta_fields *fp, const sl_meta *meta, void **mem);

static int meta_to_wire(sl_msg_kind kind, ProtobufCMessage *msg, const sl_meta *meta, void **mem) {
  meta_fields f = {NULL, NULL, NULL};
  meta_fields_of(kind, msg, &f);
  return meta_to_fields(&f, meta, mem);
}

static int meta_to_fields(const meta_fields *fp, const sl_meta *meta, void **mem) {
  meta_fields f = *fp;
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
      f->n_tensors = &m->n_tensors;
      f->tensors = &m->tensors;
      f->n_structure = &m->n_structure;
      f->structure = &m->structure;
      break;
    }
    case SL_MSG_COMPUTE_RESPONSE: {
      Splitlearn__Comm__ComputeResponse *m = (Splitlearn__Comm__ComputeResponse *)msg;
      f->n_shape = &m->n_shape;
      f->shape = &m->shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      f->n_tensors = &m->n_tensors;
      f->tensors = &m->tensors;
      f->n_structure = &m->n_structure;
      f->structure = &m->structure;
      break;
    }
    case SL_MSG_BACKWARD_REQUEST: {
      Splitlearn__Comm__BackwardRequest *m = (Splitlearn__Comm__BackwardRequest *)msg;
      f->n_shape = &m->n_grad_output_shape;
      f->shape = &m->grad_output_shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      f->n_tensors = &m->n_tensors;
      f->tensors = &m->tensors;
      f->n_structure = &m->n_structure;
      f->structure = &m->structure;
      break;
    }
    case SL_MSG_BACKWARD_RESPONSE: {
      Splitlearn__Comm__BackwardResponse *m = (Splitlearn__Comm__BackwardResponse *)msg;
      f->n_shape = &m->n_grad_input_shape;
      f->shape = &m->grad_input_shape;
      f->dtype = &m->dtype;
      f->codec = &m->codec;
      f->n_tensors = &m->n_tensors;
      f->tensors = &m->tensors;
      f->n_structure = &m->n_structure;
      f->structure = &m->structure;
      break;
    }
  }
}

/* In every tensor message the bulk fields of the multi-tensor form are these. */
#define TENSOR_DATA_FIELD 20u
#define KV_REQUEST_FIELD 8u  /* ComputeRequest.past_key_values */
#define KV_RESPONSE_FIELD 7u /* ComputeResponse.present_key_values */

static uint32_t kv_field_of(sl_msg_kind kind) {
  if (kind == SL_MSG_COMPUTE_REQUEST) return KV_REQUEST_FIELD;
  if (kind == SL_MSG_COMPUTE_RESPONSE) return KV_RESPONSE_FIELD;
  return 0;
}

static const char *known_dtypes(void) { return sl_dtype_names(); }

static int alloc_failed(size_t len, sl_err *err);

/* Allocate an item's storage for the one copy of the receive path (slices
 * straight into the final storage). With `defer`, the copy waits for
 * copy_pending() at the end of the read (the item records where its bytes are);
 * without, it happens now (`spans` may then be a sub-range of the message). */
static int item_fill(sl_tensor_item *it, const sl_span *spans, size_t nspans, size_t span,
                     size_t off, size_t len, int defer, void **adopt, sl_err *err) {
  while (span + 1 < nspans && off == spans[span].len) {
    span++;
    off = 0;
  }
  if (adopt != NULL && len > 0 && span < nspans && off == 0 && spans[span].len == len &&
      adopt[span] != NULL) {
    /* a streamed tensor already copied into its own storage (stream.h): take it over */
    it->data = adopt[span];
    adopt[span] = NULL;
    it->nbytes = len;
    return SL_OK;
  }
  it->nbytes = len;
  if (defer) {
    /* the storage comes with the copy (or a loan) in copy_pending() */
    it->src_span = span;
    it->src_off = off;
    it->pending = 1;
    return SL_OK;
  }
  if (sl_storage_alloc(len, &it->data) != SL_OK) return alloc_failed(len, err);
  sl_wire_copy_range(spans, nspans, span, off, len, it->data);
  return SL_OK;
}

static int alloc_failed(size_t len, sl_err *err) {
  return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                    "out of memory allocating %zu bytes for a received tensor", len);
}

/* Borrow a pending item's bytes from `owner` instead of copying them (see
 * sl_span_owner.lend); 1 when it did. */
static int item_lend(sl_tensor_item *it, const sl_span *spans, size_t nspans,
                     const sl_span_owner *owner) {
  const uint8_t *p;
  size_t align = sl_dtype_itemsize(it->desc.dtype);
  if (owner == NULL || owner->lend == NULL || !it->decoded || it->nbytes < SL_LEND_MIN_BYTES ||
      it->src_span >= nspans || spans[it->src_span].ptr == NULL ||
      spans[it->src_span].len - it->src_off < it->nbytes) {
    return 0;
  }
  p = spans[it->src_span].ptr + it->src_off;
  if (align > 1 && (uintptr_t)p % align != 0) return 0;
  it->lender = owner->lend(owner->user);
  if (it->lender == NULL) return 0;
  it->unlend = owner->unlend;
  it->data = (void *)(uintptr_t)p;
  return 1;
}

void sl_tensor_item_free_data(sl_tensor_item *it) {
  if (it->lender != NULL) {
    it->unlend(it->lender);
  } else {
    sl_storage_free(it->data);
  }
  it->data = NULL;
  it->lender = NULL;
  it->unlend = NULL;
}

static void storage_release(void *p);

void sl_tensor_item_take(sl_tensor_item *it, void **data, void (**release)(void *), void **owner) {
  *data = it->data;
  *release = it->data == NULL ? NULL : it->lender != NULL ? it->unlend : storage_release;
  *owner = it->lender != NULL ? it->lender : it->data;
  it->data = NULL;
  it->lender = NULL;
  it->unlend = NULL;
}

static int pending_before(const void *a, const void *b) {
  const sl_tensor_item *x = *(const sl_tensor_item *const *)a;
  const sl_tensor_item *y = *(const sl_tensor_item *const *)b;
  if (x->src_span != y->src_span) return x->src_span < y->src_span ? -1 : 1;
  return x->src_off < y->src_off ? -1 : x->src_off > y->src_off;
}

/* Copy every pending item's bytes, in wire order, telling `owner` of each span no
 * later item needs once it is copied from (or skipped). Everything else of the
 * message has been read by now, so a span before the next item's start is done. */
static int copy_pending(sl_tensor_msg *m, const sl_span *spans, size_t nspans,
                        const sl_span_owner *owner, sl_err *err) {
  sl_tensor_item *one[1];
  sl_tensor_item **order = one;
  size_t n = 0, released = 0;
  for (size_t i = 0; i < m->n_items; i++) n += m->items[i].pending;
  if (n == 0) return SL_OK;
  if (n > 1) {
    order = malloc(n * sizeof(*order));
    if (order == NULL) {
      return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
  }
  n = 0;
  for (size_t i = 0; i < m->n_items; i++)
    if (m->items[i].pending) order[n++] = &m->items[i];
  qsort(order, n, sizeof(*order), pending_before);
  for (size_t k = 0; k < n; k++) {
    sl_tensor_item *it = order[k];
    size_t span = it->src_span, off = it->src_off, left = it->nbytes;
    size_t keep = k + 1 < n ? order[k + 1]->src_span : nspans; /* needed from here on */
    uint8_t *dst;
    it->pending = 0;
    if (item_lend(it, spans, nspans, owner)) continue;
    if (sl_storage_alloc(it->nbytes, &it->data) != SL_OK) {
      if (order != one) free(order);
      return alloc_failed(it->nbytes, err);
    }
    dst = it->data;
    while (left > 0 && span < nspans) {
      size_t avail = spans[span].len - off;
      size_t take = left < avail ? left : avail;
      if (take > 0) memcpy(dst, spans[span].ptr + off, take);
      dst += take;
      left -= take;
      if (take < avail) break; /* the item ends inside this span */
      span++;
      off = 0;
      while (owner != NULL && owner->release != NULL && released < span && released < keep)
        owner->release(owner->user, released++);
    }
  }
  if (order != one) free(order);
  return SL_OK;
}

/* Check a raw tensor's byte count; mark it decoded. */
static int item_raw_check(sl_tensor_item *it, size_t len, sl_err *err) {
  if (strcmp(it->codec, SL_CODEC_RAW) != 0) return SL_OK;
  if (sl_desc_check_len(&it->desc, len, err) != SL_OK) return SL_EINVAL;
  it->decoded = 1;
  return SL_OK;
}

/* The single form: the original contract's tensor (fields 1, 2, 16-18). */
static int read_single(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                       const sl_wire_split_result *split, void **adopt, sl_tensor_msg *out,
                       sl_err *err) {
  sl_tensor_fields f;
  sl_dtype dtype;
  size_t need = 0;
  sl_tensor_item *it = &out->items[0];
  int status;
  memset(&f, 0, sizeof(f));
  sl_tensor_msg_fields(kind, out->header, &f);
  it->name = "";
  it->codec = SL_CODEC_RAW;
  if (sl_dtype_from_name(*f.dtype, strlen(*f.dtype), &dtype) != SL_OK) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "unknown dtype '%.64s' in %s (known: %s)", *f.dtype, kind_name(kind),
                      known_dtypes());
  }
  if ((*f.codec)[0] != '\0') it->codec = *f.codec;
  status = sl_desc_from_wire(dtype, *f.shape, *f.n_shape, &it->desc, &need, err);
  if (status != SL_OK) return status;
  status = item_raw_check(it, split->data_len, err);
  if (status != SL_OK) return status;
  status = meta_from_wire(kind, out->header, &it->meta, err);
  if (status != SL_OK) return status;
  return item_fill(it, spans, nspans, split->data_span, split->data_off, split->data_len, 1, adopt,
                   err);
}

/* One KVCacheEntry (the original's format: raw float32 key and value). */
static int read_kv_entry(const sl_span *spans, size_t nspans, const sl_wire_occ *occ, size_t index,
                         sl_tensor_item *key, sl_tensor_item *value, sl_err *err) {
  static const uint32_t kv_data[2] = {1u, 3u};
  sl_span *sub = NULL;
  size_t nsub = 0;
  sl_wire_split_result split;
  Splitlearn__Comm__KVCacheEntry *e = NULL;
  const sl_wire_occ *kocc = NULL, *vocc = NULL;
  size_t need = 0;
  int status;

  memset(&split, 0, sizeof(split));
  key->name = value->name = "";
  key->codec = value->codec = SL_CODEC_RAW;
  if (sl_wire_subspans(spans, nspans, occ, &sub, &nsub) != SL_OK) {
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  }
  status = sl_wire_split_bulk(sub, nsub, 0, kv_data, 2, &split, err);
  if (status != SL_OK) goto cleanup;
  e = splitlearn__comm__kvcache_entry__unpack(NULL, split.header_len, split.header);
  if (e == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "malformed KV cache entry %zu: its fields could not be parsed", index);
    goto cleanup;
  }
  for (size_t i = 0; i < split.n_occ; i++) {
    if (split.occ[i].field == 1u) kocc = &split.occ[i];
    if (split.occ[i].field == 3u) vocc = &split.occ[i];
  }
  status = sl_desc_from_wire(SL_DTYPE_FLOAT32, e->key_shape, e->n_key_shape, &key->desc, &need,
                             err);
  if (status == SL_OK) {
    status = sl_desc_from_wire(SL_DTYPE_FLOAT32, e->value_shape, e->n_value_shape, &value->desc,
                               &need, err);
  }
  if (status == SL_OK) status = item_raw_check(key, kocc ? kocc->len : 0, err);
  if (status == SL_OK) status = item_raw_check(value, vocc ? vocc->len : 0, err);
  if (status != SL_OK) {
    char inner[SL_ERR_MSG_MAX];
    memcpy(inner, err->msg, sizeof(inner));
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "KV cache entry %zu (raw float32 key and value): %.400s", index, inner);
    goto cleanup;
  }
  status = item_fill(key, sub, nsub, kocc ? kocc->span : 0, kocc ? kocc->off : 0,
                     kocc ? kocc->len : 0, 0, NULL, err);
  if (status == SL_OK) {
    status = item_fill(value, sub, nsub, vocc ? vocc->span : 0, vocc ? vocc->off : 0,
                       vocc ? vocc->len : 0, 0, NULL, err);
  }
cleanup:
  if (e != NULL) splitlearn__comm__kvcache_entry__free_unpacked(e, NULL);
  sl_wire_split_result_clear(&split);
  free(sub);
  return status;
}

static int cmp_str_ptr(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first string that occurs twice among `n` strings, or NULL. */
static int find_duplicate(const char **v, size_t n, const char **dup) {
  const char **sorted;
  *dup = NULL;
  if (n < 2) return SL_OK;
  sorted = malloc(n * sizeof(*sorted));
  if (sorted == NULL) return SL_ENOMEM;
  memcpy(sorted, v, n * sizeof(*sorted));
  qsort(sorted, n, sizeof(*sorted), cmp_str_ptr);
  for (size_t i = 1; i < n && *dup == NULL; i++) {
    if (strcmp(sorted[i - 1], sorted[i]) == 0) *dup = sorted[i];
  }
  free(sorted);
  return SL_OK;
}

/* Walk one subtree of the structure from nodes[*pos], checking it. */
static int check_node(const sl_node *nodes, size_t n, size_t *pos, int depth, int max_depth,
                      size_t *tensors, sl_err *err) {
  size_t at = *pos;
  const sl_node *node = &nodes[at];
  (*pos)++;
  switch (node->kind) {
    case SL_NODE_TENSOR: (*tensors)++; return SL_OK;
    case SL_NODE_NONE:
    case SL_NODE_INT:
    case SL_NODE_FLOAT:
    case SL_NODE_BOOL:
    case SL_NODE_STRING: return SL_OK;
    case SL_NODE_TUPLE:
    case SL_NODE_LIST:
    case SL_NODE_DICT: break;
    default:
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "structure node %zu has unknown kind %d", at, node->kind);
  }
  if (depth + 1 > max_depth) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "structure nests deeper than %d levels (node %zu); the limit is %d",
                      max_depth, at, max_depth);
  }
  if (node->size > n - *pos) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "structure does not match: node %zu declares %u children but only %zu "
                      "nodes follow",
                      at, node->size, n - *pos);
  }
  {
    const char **keys = NULL;
    size_t nk = 0;
    int status = SL_OK;
    if (node->kind == SL_NODE_DICT && node->size > 0) {
      keys = malloc(node->size * sizeof(*keys));
      if (keys == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    for (uint32_t c = 0; c < node->size && status == SL_OK; c++) {
      if (*pos >= n) {
        status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                            "structure does not match: it ends inside node %zu", at);
        break;
      }
      if (keys != NULL) keys[nk++] = nodes[*pos].key ? nodes[*pos].key : "";
      status = check_node(nodes, n, pos, depth + 1, max_depth, tensors, err);
    }
    if (status == SL_OK && keys != NULL) {
      const char *dup = NULL;
      if (find_duplicate(keys, nk, &dup) != SL_OK) {
        status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
      } else if (dup != NULL) {
        status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                            "duplicate key '%.64s' in the dict at structure node %zu", dup, at);
      }
    }
    free(keys);
    return status;
  }
}

int sl_structure_check(const sl_node *nodes, size_t n, size_t n_tensors, int max_depth,
                       sl_err *err) {
  size_t pos = 0, tensors = 0;
  int status;
  if (n == 0) return SL_OK;
  status = check_node(nodes, n, &pos, 0, max_depth > 0 ? max_depth : SL_DEFAULT_MAX_DEPTH,
                      &tensors, err);
  if (status != SL_OK) return status;
  if (pos != n) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "structure does not match: %zu nodes follow its root's subtree", n - pos);
  }
  if (tensors != n_tensors) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "structure does not match the tensors: it has %zu tensor leaves but the "
                      "message carries %zu tensors",
                      tensors, n_tensors);
  }
  return SL_OK;
}

/* The map and structure forms: named tensors (19), their bytes (20), the
 * structure (21). */
static int read_named(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                      const sl_wire_split_result *split, const sl_msg_limits *lim,
                      void **adopt, sl_tensor_msg *out, sl_err *err) {
  sl_tensor_fields f;
  size_t n_data = 0, k = 0;
  const char **names = NULL;
  const char *dup = NULL;
  int status = SL_EINVAL;

  memset(&f, 0, sizeof(f));
  sl_tensor_msg_fields(kind, out->header, &f);
  for (size_t i = 0; i < split->n_occ; i++) n_data += split->occ[i].field == TENSOR_DATA_FIELD;
  if (*f.n_tensors > lim->max_tensors) {
    return sl_err_set(err, SL_ETOOBIG, SL_STATUS_INVALID_ARGUMENT,
                      "%s carries %zu tensors; the limit is %zu per message (max_tensors)",
                      kind_name(kind), *f.n_tensors, lim->max_tensors);
  }
  if (n_data != *f.n_tensors) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "%s has %zu tensor descriptors (field 19) but %zu tensor_data fields "
                      "(field 20); they must match one to one",
                      kind_name(kind), *f.n_tensors, n_data);
  }
  if (split->data_found || *f.n_shape > 0) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "%s carries both the single-tensor fields (data, shape) and named tensors",
                      kind_name(kind));
  }
  out->form = *f.n_structure > 0 ? SL_FORM_STRUCTURE : SL_FORM_MAP;
  if (*f.n_tensors > 0) {
    out->items = calloc(*f.n_tensors, sizeof(*out->items));
    names = malloc(*f.n_tensors * sizeof(*names));
    if (out->items == NULL || names == NULL) goto oom;
  }
  out->n_items = *f.n_tensors;
  for (size_t i = 0; i < out->n_items; i++) {
    Splitlearn__Comm__NamedTensor *d = (*f.tensors)[i];
    sl_tensor_item *it = &out->items[i];
    const sl_wire_occ *occ;
    sl_dtype dtype;
    size_t need = 0;
    meta_fields mf;
    it->codec = SL_CODEC_RAW;
    it->name = d->name;
    names[i] = d->name;
    while (split->occ[k].field != TENSOR_DATA_FIELD) k++;
    occ = &split->occ[k++];
    if (d->name[0] == '\0') {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "tensor %zu of %s has no name", i, kind_name(kind));
      goto cleanup;
    }
    if (sl_dtype_from_name(d->dtype, strlen(d->dtype), &dtype) != SL_OK) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "tensor '%.64s': unknown dtype '%.64s' (known: %s)", d->name, d->dtype,
                          known_dtypes());
      goto cleanup;
    }
    if (d->codec[0] != '\0') it->codec = d->codec;
    if (d->n_shape > SL_MAX_NDIM) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "tensor '%.64s' has %zu dimensions; at most %d are supported", d->name,
                          d->n_shape, SL_MAX_NDIM);
      goto cleanup;
    }
    it->desc.dtype = dtype;
    it->desc.ndim = (int)d->n_shape;
    for (size_t j = 0; j < d->n_shape; j++) it->desc.shape[j] = d->shape[j];
    if (sl_desc_nbytes(&it->desc, &need) != SL_OK) {
      char shp[128];
      sl_desc_format_shape(&it->desc, shp, sizeof(shp));
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "tensor '%.64s': shape %s of %s is negative or overflows", d->name, shp,
                          sl_dtype_name(dtype));
      goto cleanup;
    }
    if (item_raw_check(it, occ->len, err) != SL_OK) {
      char inner[SL_ERR_MSG_MAX];
      memcpy(inner, err->msg, sizeof(inner));
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "tensor '%.64s': %.400s",
                          d->name, inner);
      goto cleanup;
    }
    meta_fields_of_named(d, &mf);
    status = meta_from_fields(&mf, &it->meta, err);
    if (status != SL_OK) goto cleanup;
    status = item_fill(it, spans, nspans, occ->span, occ->off, occ->len, 1, adopt, err);
    if (status != SL_OK) goto cleanup;
  }
  if (find_duplicate(names, out->n_items, &dup) != SL_OK) goto oom;
  if (dup != NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "duplicate tensor name '%.64s' in %s", dup, kind_name(kind));
    goto cleanup;
  }
  if (out->form == SL_FORM_STRUCTURE) {
    out->nodes = calloc(*f.n_structure, sizeof(*out->nodes));
    if (out->nodes == NULL) goto oom;
    out->n_nodes = *f.n_structure;
    for (size_t i = 0; i < out->n_nodes; i++) {
      const Splitlearn__Comm__StructureNode *w = (*f.structure)[i];
      sl_node *nd = &out->nodes[i];
      nd->kind = (int)w->kind;
      nd->size = w->size;
      nd->key = w->key;
      nd->i = w->int_value;
      nd->d = w->float_value;
      nd->s = w->string_value;
    }
    status = sl_structure_check(out->nodes, out->n_nodes, out->n_items, lim->max_depth, err);
    if (status != SL_OK) goto cleanup;
  }
  status = SL_OK;
  goto cleanup;
oom:
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
cleanup:
  free(names);
  return status;
}

static int read_impl(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                     const sl_msg_limits *limits, const sl_span_owner *owner, void **adopt,
                     sl_tensor_msg *out, sl_err *err);

int sl_tensor_msg_read(sl_msg_kind kind, const sl_span *spans, size_t nspans, sl_tensor_msg *out,
                       sl_err *err) {
  return sl_tensor_msg_read_limited(kind, spans, nspans, NULL, out, err);
}

int sl_tensor_msg_read_limited(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                               const sl_msg_limits *limits, sl_tensor_msg *out, sl_err *err) {
  return read_impl(kind, spans, nspans, limits, NULL, NULL, out, err);
}

int sl_tensor_msg_read_owned(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                             const sl_msg_limits *limits, const sl_span_owner *owner,
                             sl_tensor_msg *out, sl_err *err) {
  return read_impl(kind, spans, nspans, limits, owner, NULL, out, err);
}

int sl_tensor_msg_read_adopt(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                             const sl_msg_limits *limits, void **adopt, sl_tensor_msg *out,
                             sl_err *err) {
  return read_impl(kind, spans, nspans, limits, NULL, adopt, out, err);
}

static int read_impl(sl_msg_kind kind, const sl_span *spans, size_t nspans,
                     const sl_msg_limits *limits, const sl_span_owner *owner, void **adopt,
                     sl_tensor_msg *out, sl_err *err) {
  int status = SL_EINVAL;
  sl_wire_split_result split;
  sl_tensor_fields f;
  sl_msg_limits lim = {SL_DEFAULT_MAX_TENSORS, SL_DEFAULT_MAX_DEPTH};
  uint32_t bulk[2] = {TENSOR_DATA_FIELD, kv_field_of(kind)};
  size_t n_kv = 0;

  if (limits != NULL && limits->max_tensors > 0) lim.max_tensors = limits->max_tensors;
  if (limits != NULL && limits->max_depth > 0) lim.max_depth = limits->max_depth;
  memset(&split, 0, sizeof(split));
  memset(&f, 0, sizeof(f));
  memset(out, 0, sizeof(*out));
  out->kind = kind;
  status = sl_wire_split_bulk(spans, nspans, TENSOR_FIELD, bulk, bulk[1] ? 2 : 1, &split, err);
  if (status != SL_OK) goto cleanup;
  {
    ProtobufCAllocator alloc = {header_alloc, header_free_one, &out->arena};
    out->header = protobuf_c_message_unpack(descriptor_of(kind), &alloc, split.header_len,
                                            split.header);
  }
  if (out->header == NULL) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "malformed %s: its fields could not be parsed", kind_name(kind));
    goto cleanup;
  }
  status = check_text_fields(kind, split.header, split.header_len, kind_name(kind), err);
  if (status != SL_OK) goto cleanup;
  status = SL_EINVAL;
  sl_tensor_msg_fields(kind, out->header, &f);
  for (size_t i = 0; i < split.n_occ; i++) n_kv += bulk[1] != 0 && split.occ[i].field == bulk[1];
  if (*f.n_tensors > 0 || *f.n_structure > 0 || split.n_occ > n_kv) {
    if (n_kv > 0) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "%s carries both KV cache entries and named tensors; put the cache "
                          "among the named tensors",
                          kind_name(kind));
      goto cleanup;
    }
    status = read_named(kind, spans, nspans, &split, &lim, adopt, out, err);
    if (status == SL_OK) status = copy_pending(out, spans, nspans, owner, err);
    goto cleanup;
  }
  if (2 * n_kv + 1 > lim.max_tensors) {
    status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_INVALID_ARGUMENT,
                        "%s carries %zu KV cache entries (%zu tensors); the limit is %zu tensors "
                        "per message (max_tensors)",
                        kind_name(kind), n_kv, 2 * n_kv + 1, lim.max_tensors);
    goto cleanup;
  }
  out->form = SL_FORM_SINGLE;
  out->items = calloc(1 + 2 * n_kv, sizeof(*out->items));
  if (out->items == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  out->n_items = 1 + 2 * n_kv;
  out->n_kv = n_kv;
  status = read_single(kind, spans, nspans, &split, adopt, out, err);
  for (size_t i = 0, e = 0; status == SL_OK && i < split.n_occ; i++) {
    if (split.occ[i].field != bulk[1]) continue;
    status = read_kv_entry(spans, nspans, &split.occ[i], e, &out->items[1 + 2 * e],
                           &out->items[2 + 2 * e], err);
    e++;
  }
  if (status == SL_OK) status = copy_pending(out, spans, nspans, owner, err);
cleanup:
  sl_wire_split_result_clear(&split);
  if (status != SL_OK) sl_tensor_msg_clear(out);
  return status;
}

void sl_tensor_msg_clear(sl_tensor_msg *m) {
  for (size_t i = 0; i < m->n_items; i++) {
    sl_tensor_item_free_data(&m->items[i]);
    sl_meta_clear(&m->items[i].meta);
  }
  free(m->items);
  free(m->nodes);
  sl_arena_clear(&m->arena); /* the header's memory, all of it */
  memset(m, 0, sizeof(*m));
}

/* A bool tensor's bytes must be 0 or 1: anything else is not a bool to PyTorch. */
static int check_bools(const sl_tensor_item *m, sl_err *err) {
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

int sl_tensor_item_decode_with(sl_tensor_item *m, const sl_codecs *codecs, sl_err *err) {
  void *out = NULL, *payload;
  size_t bound = 0, out_len = 0;
  sl_tensor_desc od;
  int rc;
  if (m->decoded) return check_bools(m, err);
  rc = sl_codecs_bound(codecs, m->codec, &m->desc, &m->meta, &bound, err);
  if (rc != SL_OK) return rc;
  if (bound > SL_MAX_DECODED_BYTES) {
    /* a few bytes of sparse or compressed payload may declare any shape */
    return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                      "codec '%.64s': the decoded tensor would take %zu bytes, over the limit of "
                      "%zu bytes (16 GiB)",
                      m->codec, bound, (size_t)SL_MAX_DECODED_BYTES);
  }
  payload = m->data;
  m->data = NULL; /* the decoder's now, on every path */
  rc = sl_codecs_decode(codecs, m->codec, &m->desc, payload, m->nbytes, &m->meta, &od, &out,
                        &out_len, err);
  if (rc != SL_OK) {
    m->nbytes = 0;
    return rc;
  }
  m->data = out;
  m->desc = od;
  m->nbytes = out_len;
  m->decoded = 1;
  return check_bools(m, err);
}

int sl_tensor_item_decode(sl_tensor_item *m, sl_err *err) {
  return sl_tensor_item_decode_with(m, NULL, err);
}

int sl_tensor_msg_decode_with(sl_tensor_msg *m, const sl_codecs *codecs, sl_err *err) {
  for (size_t i = 0; i < m->n_items; i++) {
    int rc = sl_tensor_item_decode_with(&m->items[i], codecs, err);
    if (rc != SL_OK) {
      if (m->form != SL_FORM_SINGLE) {
        char inner[SL_ERR_MSG_MAX];
        memcpy(inner, err->msg, sizeof(inner));
        sl_err_set(err, rc, err->code, "tensor '%.64s': %.400s", m->items[i].name, inner);
      }
      return rc;
    }
  }
  return SL_OK;
}

int sl_tensor_msg_decode(sl_tensor_msg *m, sl_err *err) {
  return sl_tensor_msg_decode_with(m, NULL, err);
}

static void storage_release(void *p) { sl_storage_free(p); }

/* A tensor ready to frame: encoded if asked. Owns what `release` frees. */
typedef struct prepared {
  sl_tensor_desc desc; /* what the message declares (a custom codec may reshape) */
  const void *data;
  size_t nbytes;
  sl_release_fn release;
  void *owner;
  const char *codec_name;
  const sl_meta *meta;
  sl_meta encoded_meta;
} prepared;

/* Encode `t` if it asks for it. Consumes t's release on failure (it runs) and
 * moves it into `p` on success. */
static int prepare_out(const sl_tensor_out *t, prepared *p, sl_err *err) {
  int status;
  void *encoded = NULL;
  memset(p, 0, sizeof(*p));
  p->desc = t->desc;
  p->data = t->data;
  p->nbytes = t->nbytes;
  p->release = t->release;
  p->owner = t->owner;
  p->codec_name = SL_CODEC_RAW;
  if (t->encoded) {
    p->codec_name = t->codec_name ? t->codec_name : SL_CODEC_RAW;
    p->meta = t->meta;
    return SL_OK;
  }
  status = sl_desc_check_len(&t->desc, t->nbytes, err);
  if (status != SL_OK) goto fail;
  if (t->codec != NULL && !sl_codec_is_raw(t->codec)) {
    size_t len = 0;
    status = sl_codec_encode_as(t->codec, &t->desc, t->data, t->nbytes, &p->desc, &encoded,
                                &len, &p->encoded_meta, err);
    if (status == SL_EINVAL && t->raw_if_unencodable) {
      /* the codec was our choice, not the caller's: send the tensor as it is */
      sl_err_clear(err);
      sl_meta_clear(&p->encoded_meta);
      p->desc = t->desc;
      return SL_OK;
    }
    if (status != SL_OK) goto fail;
    /* the tensor itself is no longer needed: give it back now */
    if (p->release != NULL) p->release(p->owner);
    p->release = storage_release;
    p->owner = encoded;
    p->data = encoded;
    p->nbytes = len;
    p->codec_name = sl_codec_name(t->codec);
    p->meta = &p->encoded_meta;
  }
  return SL_OK;
fail:
  sl_meta_clear(&p->encoded_meta);
  if (p->release != NULL) p->release(p->owner);
  p->release = NULL;
  return status;
}

static void prepared_clear(prepared *p) {
  if (p->release != NULL) p->release(p->owner);
  p->release = NULL;
  sl_meta_clear(&p->encoded_meta);
}

void sl_tensor_set_release(const sl_tensor_set *set) {
  for (size_t i = 0; i < set->n; i++) {
    if (set->items[i].release != NULL) set->items[i].release(set->items[i].owner);
  }
}

static size_t varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

/* A packed int32 shape field (KVCacheEntry key_shape / value_shape). */
static size_t put_shape32(uint32_t field, const sl_tensor_desc *d, uint8_t *out) {
  size_t body = 0, n;
  for (int i = 0; i < d->ndim; i++) body += varint_len((uint64_t)d->shape[i]);
  if (d->ndim == 0) return 0;
  n = sl_wire_data_prefix(field, body, out);
  for (int i = 0; i < d->ndim; i++) n += sl_wire_put_varint((uint64_t)d->shape[i], out + n);
  return n;
}

static size_t shape32_len(uint32_t field, const sl_tensor_desc *d) {
  size_t body = 0;
  uint8_t tmp[SL_WIRE_PREFIX_MAX];
  if (d->ndim == 0) return 0;
  for (int i = 0; i < d->ndim; i++) body += varint_len((uint64_t)d->shape[i]);
  return sl_wire_data_prefix(field, body, tmp) + body;
}

/* Most block bytes one KV entry adds: entry prefix, two data prefixes, two shapes. */
#define KV_BLOCK_MAX (3 * SL_WIRE_PREFIX_MAX + 2 * (SL_WIRE_PREFIX_MAX + 10 * SL_MAX_NDIM))

static int out_pack_max(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_out *t,
                        size_t max_bytes, sl_payload **out, sl_err *err);
static int msg_pack_max(sl_msg_kind kind, const ProtobufCMessage *header, const void *data,
                        size_t data_len, sl_release_fn release, void *owner, size_t max_bytes,
                        sl_payload **out, sl_err *err);

int sl_tensor_set_pack(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_set *set,
                       sl_payload **out, sl_err *err) {
  return sl_tensor_set_pack_max(kind, header, set, SL_MAX_MESSAGE_BYTES, out, err);
}

int sl_tensor_set_pack_max(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_set *set,
                           size_t max_bytes, sl_payload **out, sl_err *err) {
  int status = SL_EINVAL;
  size_t n = set->n, hlen, blen = 0, total, nsegs = 0;
  prepared *pr = NULL;
  size_t n_prepared = 0;
  Splitlearn__Comm__NamedTensor *named = NULL, **named_ptrs = NULL;
  Splitlearn__Comm__StructureNode *snodes = NULL, **snode_ptrs = NULL;
  int64_t *shapes = NULL;
  void **meta_mem = NULL;
  sl_tensor_fields f;
  uint8_t *block = NULL;
  size_t *cuts = NULL;
  sl_segment *segs = NULL;
  uint32_t kv_field = kv_field_of(kind);

  *out = NULL;
  memset(&f, 0, sizeof(f));
  if (set->form == SL_FORM_SINGLE) {
    if (n != 1 + 2 * set->n_kv || (set->n_kv > 0 && kv_field == 0)) {
      sl_tensor_set_release(set);
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "a single-tensor %s carries one tensor%s", kind_name(kind),
                        kv_field ? " and KV cache pairs" : "");
    }
    if (set->n_kv == 0) return out_pack_max(kind, header, &set->items[0], max_bytes, out, err);
    for (size_t i = 1; i < n; i++) {
      const sl_tensor_out *t = &set->items[i];
      if (t->encoded || t->desc.dtype != SL_DTYPE_FLOAT32) {
        sl_tensor_set_release(set);
        return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "KV cache entries travel as raw float32 (the original's format), not "
                          "%s; convert the cache with .float() first",
                          t->encoded ? "an encoded payload" : sl_dtype_name(t->desc.dtype));
      }
    }
  }
  pr = calloc(n ? n : 1, sizeof(*pr));
  if (pr == NULL) {
    sl_tensor_set_release(set);
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  }
  /* encode every tensor that asks for it; from here on pr[] owns the releases */
  for (size_t i = 0; i < n; i++) {
    sl_tensor_out t = set->items[i];
    if (set->form == SL_FORM_SINGLE && i > 0) t.codec = NULL; /* KV entries: raw */
    status = prepare_out(&t, &pr[i], err);
    n_prepared = i + 1;
    if (status != SL_OK) {
      for (size_t j = i + 1; j < n; j++) {
        if (set->items[j].release != NULL) set->items[j].release(set->items[j].owner);
      }
      if (set->form != SL_FORM_SINGLE && set->items[i].name != NULL) {
        char inner[SL_ERR_MSG_MAX];
        memcpy(inner, err->msg, sizeof(inner));
        sl_err_set(err, status, err->code, "tensor '%.64s': %.400s", set->items[i].name, inner);
      }
      goto cleanup;
    }
  }
  sl_tensor_msg_fields(kind, header, &f);
  if (set->form == SL_FORM_SINGLE) {
    int32_t shape32[SL_MAX_NDIM];
    const sl_tensor_desc *d0 = &pr[0].desc;
    status = sl_shape_to_wire(d0, shape32, err);
    if (status != SL_OK) goto cleanup;
    for (size_t i = 1; i < n; i++) {
      int32_t tmp[SL_MAX_NDIM];
      status = sl_shape_to_wire(&set->items[i].desc, tmp, err);
      if (status != SL_OK) goto cleanup;
    }
    *f.n_shape = (size_t)d0->ndim;
    *f.shape = shape32;
    *f.dtype = (char *)sl_dtype_name(d0->dtype);
    *f.codec = (char *)pr[0].codec_name;
    meta_mem = calloc(1, sizeof(*meta_mem));
    if (meta_mem == NULL || meta_to_wire(kind, header, pr[0].meta, &meta_mem[0]) != SL_OK) goto oom;
    hlen = protobuf_c_message_get_packed_size(header);
    /* block: header, data prefix | key | entry prefix + key prefix ... */
    block = malloc(hlen + SL_WIRE_PREFIX_MAX + set->n_kv * KV_BLOCK_MAX);
    cuts = malloc(n * sizeof(*cuts));
    segs = malloc(n * sizeof(*segs));
    if (block == NULL || cuts == NULL || segs == NULL) goto oom;
    if (protobuf_c_message_pack(header, block) != hlen) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INTERNAL, "could not pack %s", kind_name(kind));
      goto cleanup;
    }
    blen = hlen;
    if (pr[0].nbytes > 0) blen += sl_wire_data_prefix(TENSOR_FIELD, pr[0].nbytes, block + blen);
    cuts[nsegs] = blen;
    segs[nsegs++] = (sl_segment){pr[0].data, pr[0].nbytes, NULL, NULL};
    for (size_t e = 0; e < set->n_kv; e++) {
      const prepared *k = &pr[1 + 2 * e], *v = &pr[2 + 2 * e];
      const sl_tensor_desc *kd = &set->items[1 + 2 * e].desc, *vd = &set->items[2 + 2 * e].desc;
      uint8_t tmp[SL_WIRE_PREFIX_MAX];
      size_t kp = k->nbytes ? sl_wire_data_prefix(1, k->nbytes, tmp) : 0;
      size_t vp = v->nbytes ? sl_wire_data_prefix(3, v->nbytes, tmp) : 0;
      size_t entry = kp + k->nbytes + shape32_len(2, kd) + vp + v->nbytes + shape32_len(4, vd);
      blen += sl_wire_data_prefix(kv_field, entry, block + blen);
      if (k->nbytes) blen += sl_wire_data_prefix(1, k->nbytes, block + blen);
      cuts[nsegs] = blen;
      segs[nsegs++] = (sl_segment){k->data, k->nbytes, NULL, NULL};
      blen += put_shape32(2, kd, block + blen);
      if (v->nbytes) blen += sl_wire_data_prefix(3, v->nbytes, block + blen);
      cuts[nsegs] = blen;
      segs[nsegs++] = (sl_segment){v->data, v->nbytes, NULL, NULL};
      blen += put_shape32(4, vd, block + blen);
    }
  } else {
    size_t ndims = 0;
    for (size_t i = 0; i < n; i++) ndims += (size_t)pr[i].desc.ndim;
    named = calloc(n ? n : 1, sizeof(*named));
    named_ptrs = calloc(n ? n : 1, sizeof(*named_ptrs));
    shapes = calloc(ndims ? ndims : 1, sizeof(*shapes));
    meta_mem = calloc(n ? n : 1, sizeof(*meta_mem));
    snodes = calloc(set->n_nodes ? set->n_nodes : 1, sizeof(*snodes));
    snode_ptrs = calloc(set->n_nodes ? set->n_nodes : 1, sizeof(*snode_ptrs));
    if (named == NULL || named_ptrs == NULL || shapes == NULL || meta_mem == NULL ||
        snodes == NULL || snode_ptrs == NULL) {
      goto oom;
    }
    ndims = 0;
    for (size_t i = 0; i < n; i++) {
      const sl_tensor_out *t = &set->items[i];
      meta_fields mf;
      splitlearn__comm__named_tensor__init(&named[i]);
      named[i].name = (char *)(t->name ? t->name : "");
      named[i].dtype = (char *)sl_dtype_name(pr[i].desc.dtype);
      named[i].codec = (char *)(strcmp(pr[i].codec_name, SL_CODEC_RAW) == 0 ? "" : pr[i].codec_name);
      named[i].n_shape = (size_t)pr[i].desc.ndim;
      named[i].shape = shapes + ndims;
      for (int j = 0; j < pr[i].desc.ndim; j++) shapes[ndims++] = pr[i].desc.shape[j];
      meta_fields_of_named(&named[i], &mf);
      if (meta_to_fields(&mf, pr[i].meta, &meta_mem[i]) != SL_OK) goto oom;
      named_ptrs[i] = &named[i];
    }
    for (size_t i = 0; i < set->n_nodes; i++) {
      const sl_node *nd = &set->nodes[i];
      splitlearn__comm__structure_node__init(&snodes[i]);
      snodes[i].kind = (Splitlearn__Comm__StructureNode__Kind)nd->kind;
      snodes[i].size = nd->size;
      snodes[i].key = (char *)(nd->key ? nd->key : "");
      snodes[i].int_value = nd->i;
      snodes[i].float_value = nd->d;
      snodes[i].string_value = (char *)(nd->s ? nd->s : "");
      snode_ptrs[i] = &snodes[i];
    }
    *f.n_tensors = n;
    *f.tensors = named_ptrs;
    *f.n_structure = set->form == SL_FORM_STRUCTURE ? set->n_nodes : 0;
    *f.structure = snode_ptrs;
    hlen = protobuf_c_message_get_packed_size(header);
    block = malloc(hlen + n * SL_WIRE_PREFIX_MAX + 1);
    cuts = malloc((n ? n : 1) * sizeof(*cuts));
    segs = malloc((n ? n : 1) * sizeof(*segs));
    if (block == NULL || cuts == NULL || segs == NULL) goto oom;
    if (protobuf_c_message_pack(header, block) != hlen) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INTERNAL, "could not pack %s", kind_name(kind));
      goto cleanup;
    }
    blen = hlen;
    for (size_t i = 0; i < n; i++) {
      /* every tensor gets its tensor_data field, empty ones too (they pair by order) */
      blen += sl_wire_data_prefix(TENSOR_DATA_FIELD, pr[i].nbytes, block + blen);
      cuts[nsegs] = blen;
      segs[nsegs++] = (sl_segment){pr[i].data, pr[i].nbytes, NULL, NULL};
    }
  }
  total = blen;
  for (size_t i = 0; i < nsegs; i++) {
    if (segs[i].len > max_bytes - total) {
      total = SIZE_MAX;
      break;
    }
    total += segs[i].len;
  }
  if (total > max_bytes) {
    if (max_bytes == SL_MAX_MESSAGE_BYTES) {
      status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                          "%s of more than %zu bytes is over gRPC's message limit of %zu bytes "
                          "(2 GiB - 1); split the tensors or use a compressing codec",
                          kind_name(kind), SL_MAX_MESSAGE_BYTES, SL_MAX_MESSAGE_BYTES);
    } else {
      status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                          "%s of more than %zu bytes is over the limit of a streamed message",
                          kind_name(kind), max_bytes);
    }
    goto cleanup;
  }
  /* the releases move from pr[] to the segments (their data pointers are pr's) */
  for (size_t i = 0; i < nsegs; i++) {
    segs[i].release = pr[i].release;
    segs[i].owner = pr[i].owner;
  }
  /* the block and the releases are the payload's now, failing or not */
  status = sl_payload_new_segments(block, blen, cuts, segs, nsegs, out);
  block = NULL;
  for (size_t i = 0; i < n_prepared; i++) pr[i].release = NULL;
  if (status != SL_OK) goto oom;
  status = SL_OK;
  goto cleanup;
oom:
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory packing %s",
                      kind_name(kind));
cleanup:
  /* the header must not keep pointers into memory freed here */
  if (f.n_shape != NULL) {
    meta_fields mf = {NULL, NULL, NULL};
    *f.shape = NULL;
    *f.n_shape = 0;
    *f.tensors = NULL;
    *f.n_tensors = 0;
    *f.structure = NULL;
    *f.n_structure = 0;
    meta_fields_of(kind, header, &mf);
    *mf.entries = NULL;
    *mf.n = 0;
  }
  if (meta_mem != NULL) {
    size_t nm = set->form == SL_FORM_SINGLE ? 1 : n;
    for (size_t i = 0; i < nm; i++) free(meta_mem[i]);
  }
  free(meta_mem);
  for (size_t i = 0; i < n_prepared; i++) prepared_clear(&pr[i]);
  free(pr);
  free(named);
  free(named_ptrs);
  free(shapes);
  free(snodes);
  free(snode_ptrs);
  free(block);
  free(cuts);
  free(segs);
  return status;
}


int sl_tensor_out_pack(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_out *t,
                       sl_payload **out, sl_err *err) {
  return out_pack_max(kind, header, t, SL_MAX_MESSAGE_BYTES, out, err);
}

static int out_pack_max(sl_msg_kind kind, ProtobufCMessage *header, const sl_tensor_out *t,
                        size_t max_bytes, sl_payload **out, sl_err *err) {
  int status;
  sl_tensor_fields f;
  int32_t shape32[SL_MAX_NDIM];
  prepared p;
  void *meta_mem = NULL;

  *out = NULL;
  memset(&f, 0, sizeof(f));
  status = prepare_out(t, &p, err); /* consumes t's release on failure */
  if (status != SL_OK) return status;
  status = sl_shape_to_wire(&p.desc, shape32, err);
  if (status != SL_OK) goto cleanup;
  sl_tensor_msg_fields(kind, header, &f);
  *f.n_shape = (size_t)p.desc.ndim;
  *f.shape = shape32;
  *f.dtype = (char *)sl_dtype_name(p.desc.dtype);
  *f.codec = (char *)p.codec_name;
  status = meta_to_wire(kind, header, p.meta, &meta_mem);
  if (status != SL_OK) {
    status = sl_err_set(err, status, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  status = msg_pack_max(kind, header, p.data, p.nbytes, p.release, p.owner, max_bytes, out, err);
  p.release = NULL; /* taken by msg_pack_max, failing or not */
cleanup:
  /* the header must not keep pointers into memory freed here */
  if (f.shape != NULL) {
    meta_fields mf = {NULL, NULL, NULL};
    *f.shape = NULL;
    *f.n_shape = 0;
    meta_fields_of(kind, header, &mf);
    *mf.entries = NULL;
    *mf.n = 0;
  }
  free(meta_mem);
  prepared_clear(&p);
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
  return msg_pack_max(kind, header, data, data_len, release, owner, SL_MAX_MESSAGE_BYTES, out,
                      err);
}

static int msg_pack_max(sl_msg_kind kind, const ProtobufCMessage *header, const void *data,
                        size_t data_len, sl_release_fn release, void *owner, size_t max_bytes,
                        sl_payload **out, sl_err *err) {
  int status = SL_ENOMEM;
  uint8_t *buf = NULL;
  size_t hlen = protobuf_c_message_get_packed_size(header);
  uint8_t prefix[SL_WIRE_PREFIX_MAX];
  size_t plen = data_len ? sl_wire_data_prefix(TENSOR_FIELD, data_len, prefix) : 0;

  *out = NULL;
  if (data_len > max_bytes || hlen + plen > max_bytes - data_len) {
    if (max_bytes == SL_MAX_MESSAGE_BYTES) {
      status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                          "%s of %zu bytes is over gRPC's message limit of %zu bytes (2 GiB - 1); "
                          "split the tensor or use a compressing codec",
                          kind_name(kind), hlen + plen + data_len, SL_MAX_MESSAGE_BYTES);
    } else {
      status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                          "%s of %zu bytes is over the limit of a streamed message (%zu bytes)",
                          kind_name(kind), hlen + plen + data_len, max_bytes);
    }
    goto cleanup;
  }
  buf = malloc(hlen + plen ? hlen + plen : 1);
  if (buf == NULL) goto oom;
  if (protobuf_c_message_pack(header, buf) != hlen) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INTERNAL, "could not pack %s", kind_name(kind));
    goto cleanup;
  }
  memcpy(buf + hlen, prefix, plen);
  /* sl_payload_new takes the buffer and the release, failing or not */
  status = sl_payload_new(buf, hlen + plen, data, data_len, release, owner, out);
  buf = NULL;
  release = NULL;
  if (status != SL_OK) goto oom;
  status = SL_OK;
  goto cleanup;
oom:
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory packing %s",
                      kind_name(kind));
cleanup:
  free(buf);
  if (release != NULL) release(owner); /* the rule of sl_common.h */
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
    f->has_use_cache = m->_use_cache_case == SPLITLEARN__COMM__COMPUTE_REQUEST___USE_CACHE_USE_CACHE;
    f->use_cache = f->has_use_cache && m->use_cache ? 1 : 0;
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
    if (f->has_use_cache) {
      m->_use_cache_case = SPLITLEARN__COMM__COMPUTE_REQUEST___USE_CACHE_USE_CACHE;
      m->use_cache = f->use_cache != 0;
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
