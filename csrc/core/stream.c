/* stream.c: see stream.h. */
#include "stream.h"

#include <stdlib.h>
#include <string.h>

#include "tensor.h"

/* the tensor-byte fields of every tensor message (proto/): data = 1, tensor_data = 20 */
#define TENSOR_FIELD 1u
#define TENSOR_DATA_FIELD 20u
/* the Chunk message's one field */
#define CHUNK_DATA_FIELD 1u

enum {
  ST_TAG = 0, /* reading a tag varint */
  ST_VARINT,  /* reading a varint value */
  ST_FIXED,   /* reading a 4- or 8-byte value */
  ST_LEN,     /* reading a length prefix */
  ST_BODY,    /* copying a length-delimited field's contents into the header */
  ST_BULK     /* copying a tensor field's contents into its storage */
};

void sl_stream_rx_init(sl_stream_rx *rx, size_t max_bytes) {
  memset(rx, 0, sizeof(*rx));
  rx->max_bytes = max_bytes;
  rx->state = ST_TAG;
}

void sl_stream_rx_clear(sl_stream_rx *rx) {
  for (size_t i = 0; i < rx->n_pieces; i++) {
    if (rx->pieces[i].data != NULL) sl_storage_free(rx->pieces[i].data);
  }
  for (size_t i = 0; rx->owned != NULL && i < rx->n_spans; i++) {
    if (rx->owned[i] != NULL) sl_storage_free(rx->owned[i]);
  }
  free(rx->pieces);
  free(rx->hdr);
  free(rx->spans);
  free(rx->owned);
  sl_stream_rx_init(rx, rx->max_bytes);
}

static int oom(sl_err *err) {
  return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                    "out of memory receiving a streamed message");
}

static int hdr_append(sl_stream_rx *rx, const uint8_t *p, size_t n, sl_err *err) {
  if (n > SL_MAX_MESSAGE_BYTES - rx->hdr_len) {
    return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                      "a streamed message's fields besides the tensor bytes pass %zu bytes",
                      SL_MAX_MESSAGE_BYTES);
  }
  if (rx->hdr_len + n > rx->hdr_cap) {
    size_t cap = rx->hdr_cap ? rx->hdr_cap : 256;
    uint8_t *bigger;
    while (cap < rx->hdr_len + n) cap *= 2;
    bigger = realloc(rx->hdr, cap);
    if (bigger == NULL) return oom(err);
    rx->hdr = bigger;
    rx->hdr_cap = cap;
  }
  memcpy(rx->hdr + rx->hdr_len, p, n);
  rx->hdr_len += n;
  return SL_OK;
}

static int malformed(const sl_stream_rx *rx, sl_err *err, const char *what) {
  return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                    "malformed streamed message at byte %zu (chunk %zu): %s", rx->total,
                    rx->chunks, what);
}

/* A tensor field's length arrived: its storage. */
static int bulk_begin(sl_stream_rx *rx, size_t len, sl_err *err) {
  sl_stream_piece *pc;
  if (rx->n_pieces == rx->cap_pieces) {
    size_t cap = rx->cap_pieces ? 2 * rx->cap_pieces : 8;
    sl_stream_piece *bigger = realloc(rx->pieces, cap * sizeof(*bigger));
    if (bigger == NULL) return oom(err);
    rx->pieces = bigger;
    rx->cap_pieces = cap;
  }
  pc = &rx->pieces[rx->n_pieces];
  pc->hdr_end = rx->hdr_len;
  pc->len = len;
  if (sl_storage_alloc(len, &pc->data) != SL_OK) {
    pc->data = NULL;
    return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                      "out of memory allocating %zu bytes for a streamed tensor", len);
  }
  rx->n_pieces++;
  return SL_OK;
}

int sl_stream_rx_feed(sl_stream_rx *rx, const uint8_t *p, size_t len, sl_err *err) {
  const uint8_t *end;
  if (len == 0) return SL_OK; /* an empty span: its pointer may be NULL */
  end = p + len;
  if (len > rx->max_bytes - rx->total) {
    return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                      "streamed message over this peer's limit of %zu bytes per call",
                      rx->max_bytes);
  }
  while (p < end) {
    size_t avail = (size_t)(end - p);
    switch (rx->state) {
      case ST_TAG:
      case ST_VARINT:
      case ST_LEN: {
        uint8_t b = *p;
        if (hdr_append(rx, p, 1, err) != SL_OK) return err->status;
        p++;
        rx->total++;
        if (rx->shift >= 70) return malformed(rx, err, "a varint over 10 bytes");
        /* bits past 64 are dropped, as the whole-message reader (wire.c) does */
        if (rx->shift < 64) rx->acc |= (uint64_t)(b & 0x7f) << rx->shift;
        rx->shift += 7;
        if (b & 0x80) break;
        {
          uint64_t v = rx->acc;
          rx->acc = 0;
          rx->shift = 0;
          if (rx->state == ST_VARINT) {
            rx->state = ST_TAG;
          } else if (rx->state == ST_TAG) {
            uint32_t wt = (uint32_t)(v & 7);
            if ((v >> 3) == 0 || (v >> 3) > 0x1fffffffu) return malformed(rx, err, "field number 0 or too large");
            rx->field = (uint32_t)(v >> 3);
            if (wt == 0) {
              rx->state = ST_VARINT;
            } else if (wt == 1 || wt == 5) {
              rx->state = ST_FIXED;
              rx->remaining = wt == 1 ? 8 : 4;
            } else if (wt == 2) {
              rx->state = ST_LEN;
            } else {
              return malformed(rx, err, "a group or an unknown wire type");
            }
          } else { /* ST_LEN */
            if (v > rx->max_bytes - rx->total) {
              return sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED,
                                "a streamed field declares %llu bytes; over this peer's limit "
                                "of %zu bytes per call",
                                (unsigned long long)v, rx->max_bytes);
            }
            rx->remaining = (size_t)v;
            if (rx->field == TENSOR_FIELD || rx->field == TENSOR_DATA_FIELD) {
              if (v > 0 && bulk_begin(rx, (size_t)v, err) != SL_OK) return err->status;
              rx->state = v > 0 ? ST_BULK : ST_TAG;
            } else {
              rx->state = v > 0 ? ST_BODY : ST_TAG;
            }
          }
        }
        break;
      }
      case ST_FIXED:
      case ST_BODY: {
        size_t k = avail < rx->remaining ? avail : rx->remaining;
        if (hdr_append(rx, p, k, err) != SL_OK) return err->status;
        p += k;
        rx->total += k;
        rx->remaining -= k;
        if (rx->remaining == 0) rx->state = ST_TAG;
        break;
      }
      case ST_BULK: {
        sl_stream_piece *pc = &rx->pieces[rx->n_pieces - 1];
        size_t k = avail < rx->remaining ? avail : rx->remaining;
        memcpy((uint8_t *)pc->data + (pc->len - rx->remaining), p, k);
        p += k;
        rx->total += k;
        rx->remaining -= k;
        if (rx->remaining == 0) rx->state = ST_TAG;
        break;
      }
      default:
        return malformed(rx, err, "internal state");
    }
  }
  return SL_OK;
}

/* Read a varint from the spans at (*i, *off); 0 when it is not there whole. */
static int span_varint(const sl_span *spans, size_t n, size_t *i, size_t *off, uint64_t *v) {
  uint64_t acc = 0;
  int shift = 0;
  for (;;) {
    uint8_t b;
    while (*i < n && *off == spans[*i].len) {
      (*i)++;
      *off = 0;
    }
    if (*i >= n || shift > 63) return 0;
    b = spans[*i].ptr[(*off)++];
    acc |= (uint64_t)(b & 0x7f) << shift;
    shift += 7;
    if (!(b & 0x80)) break;
  }
  *v = acc;
  return 1;
}

int sl_stream_rx_feed_chunk(sl_stream_rx *rx, const sl_span *spans, size_t nspans, sl_err *err) {
  size_t i = 0, off = 0, total = 0, len;
  uint64_t tag = 0, v = 0;
  rx->chunks++;
  for (size_t k = 0; k < nspans; k++) total += spans[k].len;
  if (total == 0) return SL_OK; /* an empty chunk */
  if (!span_varint(spans, nspans, &i, &off, &tag) || tag != ((CHUNK_DATA_FIELD << 3) | 2) ||
      !span_varint(spans, nspans, &i, &off, &v)) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "malformed Chunk %zu: it must hold exactly one data field (1)", rx->chunks);
  }
  {
    size_t used = off;
    for (size_t k = 0; k < i && k < nspans; k++) used += spans[k].len;
    if (v != total - used) {
      return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                        "malformed Chunk %zu: its data field declares %llu bytes but %zu follow",
                        rx->chunks, (unsigned long long)v, total - used);
    }
  }
  len = (size_t)v;
  while (len > 0) {
    size_t k;
    if (off == spans[i].len) {
      i++;
      off = 0;
      continue;
    }
    k = spans[i].len - off;
    if (k > len) k = len;
    if (sl_stream_rx_feed(rx, spans[i].ptr + off, k, err) != SL_OK) return err->status;
    off += k;
    len -= k;
  }
  return SL_OK;
}

int sl_stream_rx_spans(sl_stream_rx *rx, sl_err *err) {
  size_t n = 2 * rx->n_pieces + 1, k = 0, at = 0;
  if (rx->state != ST_TAG || rx->shift != 0) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "the stream ended in the middle of a field (after %zu bytes in %zu chunks)",
                      rx->total, rx->chunks);
  }
  free(rx->spans);
  free(rx->owned);
  rx->spans = calloc(n, sizeof(*rx->spans));
  rx->owned = calloc(n, sizeof(*rx->owned));
  if (rx->spans == NULL || rx->owned == NULL) return oom(err);
  for (size_t i = 0; i < rx->n_pieces; i++) {
    sl_stream_piece *pc = &rx->pieces[i];
    rx->spans[k].ptr = rx->hdr + at;
    rx->spans[k++].len = pc->hdr_end - at;
    at = pc->hdr_end;
    rx->spans[k].ptr = pc->data;
    rx->spans[k].len = pc->len;
    rx->owned[k++] = pc->data; /* owned[] holds it from now on */
    pc->data = NULL;
  }
  rx->spans[k].ptr = rx->hdr != NULL ? rx->hdr + at : (const uint8_t *)"";
  rx->spans[k++].len = rx->hdr_len - at;
  rx->n_spans = k;
  return SL_OK;
}

size_t sl_stream_chunk_for(size_t total, size_t chunk) {
  if (chunk != 0) return chunk;
  chunk = total / 8;
  if (chunk < SL_STREAM_CHUNK_MIN) chunk = SL_STREAM_CHUNK_MIN;
  if (chunk > SL_STREAM_CHUNK_MAX) chunk = SL_STREAM_CHUNK_MAX;
  return chunk;
}

size_t sl_stream_chunks(size_t total, size_t chunk) {
  chunk = sl_stream_chunk_for(total, chunk);
  return total == 0 ? 1 : (total + chunk - 1) / chunk;
}

size_t sl_stream_chunk_prefix(size_t len, uint8_t out[SL_WIRE_PREFIX_MAX]) {
  return sl_wire_data_prefix(CHUNK_DATA_FIELD, len, out);
}
