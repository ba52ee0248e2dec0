/* transport.c: see transport.h. */
#include "transport.h"

#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdlib.h>
#include <string.h>

#include "stream.h"

int sl__bbspans_init(grpc_byte_buffer *bb, sl__bbspans *out, sl_err *err) {
  int status = SL_ENOMEM;
  grpc_byte_buffer_reader reader;
  int reader_ok = 0;
  size_t cap = 0, n = 0;
  grpc_slice s;
  grpc_slice *slices = NULL;

  memset(out, 0, sizeof(*out));
  if (!grpc_byte_buffer_reader_init(&reader, bb)) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "could not read the received message (decompression failed)");
    goto cleanup;
  }
  reader_ok = 1;
  if (bb->type == GRPC_BB_RAW) cap = bb->data.raw.slice_buffer.count;
  if (cap == 0) cap = 4;
  slices = malloc(cap * sizeof(*slices));
  if (slices == NULL) goto oom;
  while (grpc_byte_buffer_reader_next(&reader, &s)) {
    if (n == cap) {
      grpc_slice *bigger = realloc(slices, 2 * cap * sizeof(*slices));
      if (bigger == NULL) {
        grpc_slice_unref(s);
        goto oom;
      }
      slices = bigger;
      cap *= 2;
    }
    slices[n++] = s;
  }
  out->spans = malloc((n ? n : 1) * sizeof(*out->spans));
  if (out->spans == NULL) goto oom;
  for (size_t i = 0; i < n; i++) {
    out->spans[i].ptr = GRPC_SLICE_START_PTR(slices[i]);
    out->spans[i].len = GRPC_SLICE_LENGTH(slices[i]);
  }
  out->slices = slices;
  out->n = n;
  slices = NULL;
  status = SL_OK;
  goto cleanup;
oom:
  status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                      "out of memory reading a received message");
cleanup:
  if (slices != NULL) {
    for (size_t i = 0; i < n; i++) grpc_slice_unref(slices[i]);
    free(slices);
  }
  if (status != SL_OK) {
    free(out->spans);
    memset(out, 0, sizeof(*out));
  }
  if (reader_ok) grpc_byte_buffer_reader_destroy(&reader);
  return status;
}

int sl__bbspans_take(grpc_byte_buffer **bb, sl__bbspans *out, sl_err *err) {
  int status = sl__bbspans_init(*bb, out, err);
  grpc_byte_buffer_destroy(*bb);
  *bb = NULL;
  return status;
}

void sl__bbspans_release(void *user, size_t span) {
  sl__bbspans *s = user;
  if (span >= s->n) return;
  s->released += s->spans[span].len;
  grpc_slice_unref(s->slices[span]);
  s->slices[span] = grpc_empty_slice();
  s->spans[span].ptr = NULL;
  s->spans[span].len = 0;
  /* gRPC's slices are small heap blocks (64 KiB): freed, they stay resident in the
   * allocator, so without this a large message would sit in memory beside the
   * whole of its copy (2x the payload at the peak instead of ~1x) */
  if (s->released >= SL_BBSPANS_TRIM_BYTES) {
    s->released = 0;
    sl_storage_trim_allocator();
  }
}

void sl__bbspans_clear(sl__bbspans *s) {
  for (size_t i = 0; i < s->n; i++) grpc_slice_unref(s->slices[i]);
  free(s->slices);
  free(s->spans);
  memset(s, 0, sizeof(*s));
}

/* Called by gRPC (any thread, no Python lock) when it is done with the bytes. */
static void payload_slice_done(void *user) { sl_payload_unref((sl_payload *)user); }

grpc_byte_buffer *sl__payload_byte_buffer(sl_payload *p) {
  grpc_slice small[8];
  grpc_slice *slices = small;
  size_t n = 0, np = sl_payload_npieces(p);
  grpc_byte_buffer *bb;

  if (np > sizeof(small) / sizeof(small[0])) {
    slices = malloc(np * sizeof(*slices));
    if (slices == NULL) return NULL;
  }
  for (size_t i = 0; i < np; i++) {
    size_t len;
    const void *d = sl_payload_piece(p, i, &len);
    if (len == 0) continue;
    if (i % 2 == 0) {
      /* header and field prefixes: small, copied */
      slices[n++] = grpc_slice_from_copied_buffer((const char *)d, len);
    } else {
      sl_payload_ref(p);
      /* the slice owns one payload reference, given back in payload_slice_done */
      slices[n++] = grpc_slice_new_with_user_data((void *)d, len, payload_slice_done, p);
    }
  }
  bb = grpc_raw_byte_buffer_create(slices, n);
  for (size_t i = 0; i < n; i++) grpc_slice_unref(slices[i]);
  if (slices != small) free(slices);
  return bb;
}

grpc_byte_buffer *sl__payload_chunk_byte_buffer(sl_payload *p, size_t off, size_t len) {
  uint8_t pre[SL_WIRE_PREFIX_MAX];
  size_t np = sl_payload_npieces(p), n = 0, at = 0, end = off + len;
  grpc_slice small[8];
  grpc_slice *slices = small;
  grpc_byte_buffer *bb;

  if (np + 1 > sizeof(small) / sizeof(small[0])) {
    slices = malloc((np + 1) * sizeof(*slices));
    if (slices == NULL) return NULL;
  }
  slices[n++] = grpc_slice_from_copied_buffer((const char *)pre, sl_stream_chunk_prefix(len, pre));
  for (size_t i = 0; i < np && at < end; i++) {
    size_t plen, lo, hi;
    const uint8_t *d = sl_payload_piece(p, i, &plen);
    lo = off > at ? off - at : 0;
    hi = end - at < plen ? end - at : plen;
    at += plen;
    if (lo >= hi) continue;
    if (i % 2 == 0) {
      slices[n++] = grpc_slice_from_copied_buffer((const char *)d + lo, hi - lo);
    } else {
      sl_payload_ref(p);
      slices[n++] = grpc_slice_new_with_user_data((void *)(d + lo), hi - lo, payload_slice_done, p);
    }
  }
  bb = grpc_raw_byte_buffer_create(slices, n);
  for (size_t i = 0; i < n; i++) grpc_slice_unref(slices[i]);
  if (slices != small) free(slices);
  return bb;
}

int sl__bb_readall(grpc_byte_buffer *bb, uint8_t **out, size_t *len) {
  sl__bbspans s;
  size_t total = 0, off = 0;
  uint8_t *buf;
  int rc = sl__bbspans_init(bb, &s, NULL);
  *out = NULL;
  *len = 0;
  if (rc != SL_OK) return rc;
  for (size_t i = 0; i < s.n; i++) total += s.spans[i].len;
  buf = malloc(total ? total : 1);
  if (buf == NULL) {
    sl__bbspans_clear(&s);
    return SL_ENOMEM;
  }
  for (size_t i = 0; i < s.n; i++) {
    memcpy(buf + off, s.spans[i].ptr, s.spans[i].len);
    off += s.spans[i].len;
  }
  sl__bbspans_clear(&s);
  *out = buf;
  *len = total;
  return SL_OK;
}

static int has_key(const sl_chan_arg *args, size_t nargs, const char *key) {
  for (size_t i = 0; i < nargs; i++)
    if (strcmp(args[i].key, key) == 0) return 1;
  return 0;
}

int sl__channel_args_build(const sl_chan_arg *args, size_t nargs, int for_server,
                           grpc_channel_args *out, sl_err *err) {
  static const char *const unlimited[] = {GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                                          GRPC_ARG_MAX_SEND_MESSAGE_LENGTH};
  size_t cap = nargs + 3, n = 0;
  grpc_arg *a = calloc(cap, sizeof(*a));
  out->num_args = 0;
  out->args = NULL;
  if (a == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  for (size_t i = 0; i < nargs; i++) {
    a[n].key = sl_strndup(args[i].key, strlen(args[i].key));
    if (args[i].is_string) {
      a[n].type = GRPC_ARG_STRING;
      a[n].value.string = sl_strndup(args[i].sval, strlen(args[i].sval));
      if (a[n].value.string == NULL) {
        free(a[n].key);
        a[n].key = NULL;
      }
    } else {
      a[n].type = GRPC_ARG_INTEGER;
      a[n].value.integer = args[i].ival;
    }
    if (a[n].key == NULL) goto oom;
    n++;
  }
  /* gRPC's default 4 MiB receive limit would refuse ordinary activations:
   * the library default is the largest message gRPC allows. */
  for (size_t i = 0; i < 2; i++) {
    if (has_key(args, nargs, unlimited[i])) continue;
    a[n].type = GRPC_ARG_INTEGER;
    a[n].key = sl_strndup(unlimited[i], strlen(unlimited[i]));
    a[n].value.integer = -1;
    if (a[n].key == NULL) goto oom;
    n++;
  }
  /* With SO_REUSEPORT a second server on a busy port binds silently and steals
   * a share of the connections; a busy port must be an error. */
  if (for_server && !has_key(args, nargs, GRPC_ARG_ALLOW_REUSEPORT)) {
    a[n].type = GRPC_ARG_INTEGER;
    a[n].key = sl_strndup(GRPC_ARG_ALLOW_REUSEPORT, strlen(GRPC_ARG_ALLOW_REUSEPORT));
    a[n].value.integer = 0;
    if (a[n].key == NULL) goto oom;
    n++;
  }
  out->args = a;
  out->num_args = n;
  return SL_OK;
oom:
  out->args = a;
  out->num_args = n;
  sl__channel_args_free(out);
  return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
}

void sl__channel_args_free(grpc_channel_args *a) {
  for (size_t i = 0; i < a->num_args; i++) {
    free(a->args[i].key);
    if (a->args[i].type == GRPC_ARG_STRING) free(a->args[i].value.string);
  }
  free(a->args);
  a->args = NULL;
  a->num_args = 0;
}

char *sl__slice_strdup(grpc_slice s) {
  return sl_strndup((const char *)GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s));
}

int sl__kv_from_metadata(const grpc_metadata_array *md, sl_kv **out, size_t *n) {
  sl_kv *kv = NULL;
  size_t count = md->count;
  *out = NULL;
  *n = 0;
  if (count == 0) return SL_OK;
  kv = calloc(count, sizeof(*kv));
  if (kv == NULL) return SL_ENOMEM;
  for (size_t i = 0; i < count; i++) {
    kv[i].key = sl__slice_strdup(md->metadata[i].key);
    kv[i].value = sl__slice_strdup(md->metadata[i].value);
    kv[i].value_len = GRPC_SLICE_LENGTH(md->metadata[i].value);
    if (kv[i].key == NULL || kv[i].value == NULL) {
      sl__kv_free(kv, i + 1);
      return SL_ENOMEM;
    }
  }
  *out = kv;
  *n = count;
  return SL_OK;
}

void sl__kv_free(sl_kv *kv, size_t n) {
  if (kv == NULL) return;
  for (size_t i = 0; i < n; i++) {
    free((char *)kv[i].key);
    free((char *)kv[i].value);
  }
  free(kv);
}

double sl__seconds_until(gpr_timespec deadline) {
  gpr_timespec now, d;
  deadline = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
  if (gpr_time_cmp(deadline, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0) return 1e18;
  now = gpr_now(GPR_CLOCK_MONOTONIC);
  d = gpr_time_sub(deadline, now);
  return (double)d.tv_sec + (double)d.tv_nsec * 1e-9;
}

gpr_timespec sl__deadline_in(double seconds) {
  if (seconds <= 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
  if (seconds > 1e9) seconds = 1e9;
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                      gpr_time_from_nanos((int64_t)(seconds * 1e9), GPR_TIMESPAN));
}
